//! TLS against a real RabbitMQ node with a TLS listener, started for the test with certificates
//! the test generates: warren consumes and publishes over `amqps://` with a client certificate
//! (the node refuses clients without one), and a broker it cannot trust (a wrong CA, a
//! certificate for another name, an expired certificate) or a missing client certificate gives
//! one clear line: exit 69 for `warren publish`, a retried connection error for `warren run`.

mod util;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::sys::signal::Signal;
use util::certs::Certs;
use util::nodes::{Cluster, Node};
use util::{wait_until, ConfigFile, Warren};

/// The `[broker.tls]` keys of a test config.
struct TlsKeys<'a> {
    ca: &'a Path,
    client: Option<(&'a Path, &'a Path)>,
    server_name: Option<&'a str>,
}

impl<'a> TlsKeys<'a> {
    /// The CA that signed the node's certificate and a client certificate it signed too.
    fn good(certs: &'a Certs) -> TlsKeys<'a> {
        TlsKeys {
            ca: &certs.ca_cert,
            client: Some((&certs.client_cert, &certs.client_key)),
            server_name: None,
        }
    }

    /// `config` with these keys.
    fn set_in(&self, config: ConfigFile) -> ConfigFile {
        let path = |path: &Path| path.display().to_string();
        let mut config = config.set("broker.tls.ca_file", path(self.ca));
        if let Some((cert, key)) = self.client {
            config = config
                .set("broker.tls.cert_file", path(cert))
                .set("broker.tls.key_file", path(key));
        }
        if let Some(name) = self.server_name {
            config = config.set("broker.tls.server_name", name);
        }
        config
    }
}

/// Writes a config for `url` with `tls` into `dir` as `name`, with a `command` handler that
/// appends each body to `dir/done`.
fn config(dir: &Path, name: &str, url: &str, tls: &TlsKeys) -> PathBuf {
    let script = dir.join("record.sh");
    fs::write(
        &script,
        format!(
            "#!/bin/sh\ncat >> '{}/done'\necho >> '{}/done'\n",
            dir.display(),
            dir.display()
        ),
    )
    .unwrap();
    fs::set_permissions(&script, fs::Permissions::from_mode(0o755)).unwrap();
    let config = ConfigFile::at(url, "tls-jobs")
        .set("broker.connect_timeout", "5s")
        .workers(2)
        .command(&script);
    tls.set_in(config).write_to(&dir.join(name))
}

/// Runs `warren publish MESSAGE` and returns its exit code and its log.
fn publish(config: &Path, message: &str) -> (Option<i32>, String) {
    let (status, log) = util::publish(config, &[message]);
    (status.code(), log)
}

/// The password of the URLs of the configs whose connections fail during the TLS handshake,
/// before any login: it must appear in no log line.
const SECRET: &str = "tls-s3cret-pw";

/// `url` with the password [`SECRET`].
fn with_secret(url: &str) -> String {
    let secret = url.replacen(":guest@", &format!(":{SECRET}@"), 1);
    assert_ne!(secret, url, "the URL carries guest's password: {url}");
    secret
}

/// Asserts that `warren publish` exits 69 with one error line that contains `reason`.
fn assert_refused(config: &Path, reason: &str) -> String {
    let (code, log) = publish(config, "never stored");
    let errors: Vec<&str> = log.lines().filter(|l| l.contains("ERROR")).collect();
    assert_eq!(code, Some(69), "an untrusted broker is unavailable: {log}");
    assert_eq!(errors.len(), 1, "one error line: {log}");
    assert!(
        errors[0].contains(reason),
        "the line says {reason:?}: {log}"
    );
    assert!(
        !log.contains(SECRET) && !log.contains("guest:guest"),
        "no password in the log: {log}"
    );
    eprintln!("tls: refused: {}", errors[0]);
    errors[0].to_string()
}

/// Asserts that `warren publish` is refused (exit 69, one line) for its client certificate: the
/// line says `alert` when warren read the broker's TLS alert, or ends with `reset_hint` when the
/// connection was reset before it could.
fn assert_client_refused(config: &Path, alert: &str, reset_hint: &str) {
    let line = assert_refused(config, "cannot reach the broker at localhost:");
    assert!(line.contains(alert) || line.contains(reset_hint), "{line}");
}

/// The `ssl` flag of every client connection of `node`.
fn connections_over_tls(node: &Node) -> Vec<String> {
    node.rabbitmqctl(&["list_connections", "-q", "--no-table-headers", "ssl"])
        .lines()
        .map(|line| line.trim().to_string())
        .filter(|line| !line.is_empty())
        .collect()
}

#[test]
fn warren_works_over_mutual_tls_and_refuses_a_broker_it_cannot_trust() {
    let certs = Certs::generate();
    let cluster = Cluster::start_with(
        1,
        &certs.tls_conf(&certs.server_cert, &certs.server_key, true),
    );
    let node = cluster.node(0);
    let dir = tempfile::tempdir().unwrap();
    let good = config(
        dir.path(),
        "good.toml",
        &node.amqps_url(),
        &TlsKeys::good(&certs),
    );

    // Publish and consume over TLS, presenting the client certificate.
    for message in ["one", "two", "three"] {
        let (code, log) = publish(&good, message);
        assert_eq!(code, Some(0), "publish over TLS: {log}");
    }
    let mut warren = Warren::run(&good, &[]);
    let done = dir.path().join("done");
    wait_until(
        Duration::from_secs(30),
        "the three tasks to be done over TLS",
        || fs::read_to_string(&done).is_ok_and(|text| text.lines().count() == 3),
    );
    let flags = connections_over_tls(node);
    assert!(
        !flags.is_empty() && flags.iter().all(|ssl| ssl == "true"),
        "every connection to the node is TLS: {flags:?}"
    );
    warren.signal(Signal::SIGTERM);
    assert_eq!(warren.wait_exit(Duration::from_secs(10)).code(), Some(0));

    // By IP address, the certificate (for localhost) does not match; server_name fixes it.
    let by_ip = node.amqps_url().replace("@localhost:", "@127.0.0.1:");
    let mismatch = config(
        dir.path(),
        "ip.toml",
        &with_secret(&by_ip),
        &TlsKeys::good(&certs),
    );
    let line = assert_refused(&mismatch, "certificate verify failed: IP address mismatch");
    assert!(line.contains("set broker.tls.server_name"), "{line}");
    // By a name the certificate does not list.
    let other_name = TlsKeys {
        server_name: Some("other.example"),
        ..TlsKeys::good(&certs)
    };
    let misnamed = config(
        dir.path(),
        "other-name.toml",
        &with_secret(&node.amqps_url()),
        &other_name,
    );
    let line = assert_refused(&misnamed, "certificate verify failed: hostname mismatch");
    assert!(
        line.contains("the certificate is not for \"other.example\""),
        "{line}"
    );
    let named = TlsKeys {
        server_name: Some("localhost"),
        ..TlsKeys::good(&certs)
    };
    let (code, log) = publish(&config(dir.path(), "named.toml", &by_ip, &named), "by ip");
    assert_eq!(
        code,
        Some(0),
        "server_name = \"localhost\" verifies by that name: {log}"
    );

    // A CA that did not sign the node's certificate.
    let wrong_ca = TlsKeys {
        ca: &certs.other_ca_cert,
        ..TlsKeys::good(&certs)
    };
    let wrong = config(
        dir.path(),
        "wrong-ca.toml",
        &with_secret(&node.amqps_url()),
        &wrong_ca,
    );
    // The node sends the CA with its certificate: OpenSSL finds a self-signed one it does not
    // trust in the chain.
    let line = assert_refused(&wrong, "certificate verify failed: self-signed certificate");
    assert!(line.contains("check broker.tls.ca_file"), "{line}");

    // No client certificate: the node (fail_if_no_peer_cert) refuses the connection.
    let anonymous = TlsKeys {
        client: None,
        ..TlsKeys::good(&certs)
    };
    let no_cert = config(
        dir.path(),
        "no-cert.toml",
        &with_secret(&node.amqps_url()),
        &anonymous,
    );
    assert_client_refused(
        &no_cert,
        "the broker requires a client certificate",
        "if the broker requires a client certificate, set broker.tls.cert_file",
    );

    // A client certificate from a CA the node does not trust.
    let stranger = TlsKeys {
        client: Some((&certs.other_client_cert, &certs.other_client_key)),
        ..TlsKeys::good(&certs)
    };
    let untrusted = config(
        dir.path(),
        "untrusted.toml",
        &with_secret(&node.amqps_url()),
        &stranger,
    );
    assert_client_refused(
        &untrusted,
        "the broker does not trust the client certificate",
        "does the broker trust the client certificate in broker.tls.cert_file?",
    );

    // warren run retries a broker it cannot trust, saying why, and stops cleanly.
    let mut warren = Warren::run(&wrong, &[]);
    let line = warren.wait_for_log("retrying in", Duration::from_secs(30));
    assert!(
        line.contains("certificate verify failed: self-signed certificate"),
        "the retried error says why: {line}"
    );
    warren.signal(Signal::SIGTERM);
    assert_eq!(warren.wait_exit(Duration::from_secs(10)).code(), Some(0));
    let log = warren.log().join("\n");
    assert!(!log.contains(SECRET), "no password in the log: {log}");
    assert!(log.contains(":***@"), "the URL is shown masked: {log}");
    drop(cluster);
}

#[test]
fn an_expired_broker_certificate_is_refused_with_one_line() {
    let certs = Certs::generate();
    let cluster = Cluster::start_with(
        1,
        &certs.tls_conf(&certs.expired_cert, &certs.expired_key, false),
    );
    let dir = tempfile::tempdir().unwrap();
    let url = with_secret(&cluster.node(0).amqps_url());
    let expired = config(dir.path(), "expired.toml", &url, &TlsKeys::good(&certs));
    let line = assert_refused(
        &expired,
        "certificate verify failed: certificate has expired",
    );
    assert!(line.contains("renew it"), "{line}");
}
