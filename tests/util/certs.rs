//! Test certificates made with the `openssl` command: a CA with server and client certificates,
//! and the broken cases (another CA and a client certificate it signed, an expired certificate).
//!
//! Every file is world-readable (keys included, they are throwaway) in a world-readable
//! directory under `/tmp`, so that a RabbitMQ node, which runs as the `rabbitmq` user, can read
//! its certificate and key.
#![allow(dead_code)]

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread;

/// The `openssl ca` and `openssl req` configuration: one database for both CAs, and the
/// extensions of each kind of certificate.
const OPENSSL_CNF: &str = "\
[ca]
default_ca = test_ca

[test_ca]
dir = .
database = $dir/index.txt
new_certs_dir = $dir/issued
serial = $dir/serial
default_md = sha256
policy = any_name
unique_subject = no
copy_extensions = none
email_in_dn = no

[any_name]
commonName = supplied

[req]
distinguished_name = dn
prompt = no

[dn]
CN = unused

[ca_cert]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash

[server_cert]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth
subjectAltName = DNS:localhost
authorityKeyIdentifier = keyid

[client_cert]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = clientAuth
authorityKeyIdentifier = keyid
";

/// Certificates and keys in PEM files (keys in PKCS#8, "BEGIN PRIVATE KEY"), deleted when this
/// drops.
pub struct Certs {
    pub dir: tempfile::TempDir,
    /// The CA that signed the server and client certificates.
    pub ca_cert: PathBuf,
    pub ca_key: PathBuf,
    /// For `localhost` only (not 127.0.0.1: connecting by address is the host-mismatch case),
    /// signed by the CA, valid for ten years.
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    /// A client certificate (CN `warren-test-client`) signed by the CA.
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
    /// A CA unrelated to the other one, which trusts none of the certificates above.
    pub other_ca_cert: PathBuf,
    pub other_ca_key: PathBuf,
    /// A client certificate signed by the other CA, which the test nodes do not trust.
    pub other_client_cert: PathBuf,
    pub other_client_key: PathBuf,
    /// As the server certificate, but valid only during 2020.
    pub expired_cert: PathBuf,
    pub expired_key: PathBuf,
}

impl Certs {
    /// Generates every certificate in a new temporary directory.
    pub fn generate() -> Certs {
        let dir = tempfile::Builder::new()
            .prefix("warren-certs-")
            .tempdir_in("/tmp")
            .expect("create the certificates directory");
        let path = dir.path();
        fs::create_dir(path.join("issued")).expect("create issued/");
        fs::write(path.join("index.txt"), "").expect("write index.txt");
        fs::write(path.join("openssl.cnf"), OPENSSL_CNF).expect("write openssl.cnf");

        // The keys (with the CAs' certificates and the others' requests) first, in parallel:
        // RSA key generation is most of the time.
        let cas = [
            ("ca", "warren-test-CA"),
            ("other-ca", "warren-other-test-CA"),
        ];
        let leaves = [
            ("server", "localhost", "ca", "server_cert"),
            ("client", "warren-test-client", "ca", "client_cert"),
            (
                "other-client",
                "warren-test-client",
                "other-ca",
                "client_cert",
            ),
            ("expired", "localhost", "ca", "server_cert"),
        ];
        let requests = (cas.iter())
            .map(|(name, cn)| {
                format!(
                    "req -x509 -config openssl.cnf -extensions ca_cert -days 3650 -newkey rsa:2048 \
                     -nodes -subj /CN={cn} -keyout {name}.key -out {name}.pem"
                )
            })
            .chain(leaves.iter().map(|(name, cn, _, _)| {
                format!(
                    "req -new -config openssl.cnf -newkey rsa:2048 -nodes -subj /CN={cn} \
                     -keyout {name}.key -out {name}.csr"
                )
            }));
        let failed: Vec<String> = thread::scope(|scope| {
            let threads: Vec<_> = requests
                .map(|args| scope.spawn(move || openssl(path, &args)))
                .collect();
            (threads.into_iter())
                .filter_map(|thread| thread.join().expect("openssl thread").err())
                .collect()
        });
        assert!(failed.is_empty(), "{}", failed.join("\n"));
        // Then the signatures, one at a time: they share the CA database.
        for (name, _, ca, kind) in leaves {
            let validity = match name {
                "expired" => "-startdate 20200101000000Z -enddate 20210101000000Z",
                _ => "-days 3650",
            };
            openssl(
                path,
                &format!(
                    "ca -batch -notext -rand_serial -config openssl.cnf -extensions {kind} \
                     -cert {ca}.pem -keyfile {ca}.key -in {name}.csr -out {name}.pem {validity}"
                ),
            )
            .unwrap_or_else(|e| panic!("{e}"));
        }

        for entry in fs::read_dir(path).expect("list the certificates") {
            let entry = entry.expect("list the certificates");
            let mode = if entry.path().is_dir() { 0o755 } else { 0o644 };
            fs::set_permissions(entry.path(), fs::Permissions::from_mode(mode))
                .expect("chmod a certificate file");
        }
        fs::set_permissions(path, fs::Permissions::from_mode(0o755))
            .expect("chmod the certificates directory");

        let file = |name: &str| path.join(name);
        Certs {
            ca_cert: file("ca.pem"),
            ca_key: file("ca.key"),
            server_cert: file("server.pem"),
            server_key: file("server.key"),
            client_cert: file("client.pem"),
            client_key: file("client.key"),
            other_ca_cert: file("other-ca.pem"),
            other_ca_key: file("other-ca.key"),
            other_client_cert: file("other-client.pem"),
            other_client_key: file("other-client.key"),
            expired_cert: file("expired.pem"),
            expired_key: file("expired.key"),
            dir,
        }
    }

    /// `rabbitmq.conf` lines for a TLS listener on the node's `{tls_port}` that presents `cert`
    /// (with `key`), trusts this CA, asks clients for a certificate and, if
    /// `require_client_cert`, refuses those without one. For [`super::nodes::Cluster::start_with`].
    pub fn tls_conf(&self, cert: &Path, key: &Path, require_client_cert: bool) -> String {
        format!(
            "listeners.ssl.default = {{tls_port}}\n\
             ssl_options.cacertfile = {}\n\
             ssl_options.certfile = {}\n\
             ssl_options.keyfile = {}\n\
             ssl_options.verify = verify_peer\n\
             ssl_options.fail_if_no_peer_cert = {require_client_cert}\n",
            self.ca_cert.display(),
            cert.display(),
            key.display()
        )
    }
}

/// Runs `openssl` in `dir` with `args` (split at whitespace); says how it failed if it did.
fn openssl(dir: &Path, args: &str) -> Result<(), String> {
    let out = Command::new("openssl")
        .args(args.split_whitespace())
        .current_dir(dir)
        .output()
        .map_err(|e| format!("cannot run openssl (is it installed?): {e}"))?;
    if out.status.success() {
        return Ok(());
    }
    Err(format!(
        "openssl {args} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    ))
}
