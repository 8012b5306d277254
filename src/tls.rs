//! TLS for `amqps://` nodes: the `[broker.tls]` settings, the connector built from them when
//! the configuration is loaded (so that an unreadable CA or key is a config error, not a
//! connection error at 3 a.m.), and one-line texts for failed handshakes.
//!
//! OpenSSL, through native-tls, does the work: it verifies the server's chain against the
//! configured CA (or the system's roots) and its name against the URL's host or
//! `server_name`, and presents the client certificate when one is configured.

use std::fmt;
use std::path::{Path, PathBuf};

use native_tls::{Certificate, Identity, TlsConnector};
use serde::{Deserialize, Serialize, Serializer};

/// `[broker.tls]` as written in the file (relative paths are relative to the file's
/// directory), or as loaded (the paths joined to that directory).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSection {
    /// The CA certificate(s), PEM, that signed the broker's certificate. When set, only these
    /// are trusted; otherwise the system's roots are.
    #[serde(skip_serializing_if = "Option::is_none", serialize_with = "lossy")]
    pub ca_file: Option<PathBuf>,
    /// The client certificate (PEM, optionally followed by its chain), for mutual TLS.
    #[serde(skip_serializing_if = "Option::is_none", serialize_with = "lossy")]
    pub cert_file: Option<PathBuf>,
    /// The client certificate's private key, PEM in PKCS#8 (`BEGIN PRIVATE KEY`).
    #[serde(skip_serializing_if = "Option::is_none", serialize_with = "lossy")]
    pub key_file: Option<PathBuf>,
    /// The name the broker's certificate must carry, when it is not the URL's host (a node
    /// reached by IP address or through a load balancer).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server_name: Option<String>,
}

/// A ready TLS configuration: cheap to clone (the connector is reference-counted inside).
#[derive(Clone)]
pub struct Tls {
    connector: TlsConnector,
    /// The settings it was built from, with the file paths joined to the config file's
    /// directory.
    pub settings: TlsSection,
}

/// A path as `Path::display` shows it, so that a path that is not UTF-8 still serializes.
fn lossy<S: Serializer>(path: &Option<PathBuf>, serializer: S) -> Result<S::Ok, S::Error> {
    match path {
        Some(path) => serializer.collect_str(&path.display()),
        None => serializer.serialize_none(),
    }
}

/// Serialized as its settings.
impl Serialize for Tls {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.settings.serialize(serializer)
    }
}

impl fmt::Debug for Tls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.settings.fmt(f)
    }
}

/// A `[broker.tls]` key that is wrong, and why.
#[derive(Debug)]
pub struct TlsKeyError {
    pub key: &'static str,
    pub message: String,
}

impl Tls {
    /// Reads the files `section` names (relative to `base`) and builds the connector. With no
    /// section, the system's roots are trusted and no client certificate is sent.
    pub fn load(section: Option<&TlsSection>, base: &Path) -> Result<Tls, TlsKeyError> {
        let default = TlsSection::default();
        let section = section.unwrap_or(&default);
        let mut builder = TlsConnector::builder();
        let settings = TlsSection {
            ca_file: section.ca_file.as_ref().map(|path| base.join(path)),
            cert_file: section.cert_file.as_ref().map(|path| base.join(path)),
            key_file: section.key_file.as_ref().map(|path| base.join(path)),
            server_name: section.server_name.clone(),
        };
        if let Some(path) = &settings.ca_file {
            let pem = read(path, "ca_file")?;
            let certificates = Certificate::stack_from_pem(&pem)
                .ok()
                .filter(|certificates| !certificates.is_empty())
                .ok_or_else(|| TlsKeyError {
                    key: "ca_file",
                    message: format!("{}: no PEM certificate in it", path.display()),
                })?;
            builder.disable_built_in_roots(true);
            for certificate in certificates {
                builder.add_root_certificate(certificate);
            }
        }
        match (&settings.cert_file, &settings.key_file) {
            (Some(cert_path), Some(key_path)) => {
                let cert = read(cert_path, "cert_file")?;
                let key = read(key_path, "key_file")?;
                if !key.starts_with(b"-----BEGIN PRIVATE KEY-----") {
                    return Err(TlsKeyError {
                        key: "key_file",
                        message: format!(
                            "{}: not a PKCS#8 PEM key (BEGIN PRIVATE KEY); convert it with `openssl pkcs8 -topk8 -nocrypt -in KEY -out KEY.pk8`",
                            key_path.display()
                        ),
                    });
                }
                let identity = Identity::from_pkcs8(&cert, &key).map_err(|e| TlsKeyError {
                    key: "cert_file",
                    message: format!("{} with {}: {e}", cert_path.display(), key_path.display()),
                })?;
                builder.identity(identity);
            }
            (Some(_), None) => {
                return Err(TlsKeyError {
                    key: "cert_file",
                    message: "needs key_file, the certificate's private key".into(),
                })
            }
            (None, Some(_)) => {
                return Err(TlsKeyError {
                    key: "key_file",
                    message: "needs cert_file, the client certificate".into(),
                })
            }
            (None, None) => {}
        }
        if settings.server_name.as_deref() == Some("") {
            return Err(TlsKeyError {
                key: "server_name",
                message: "must not be empty".into(),
            });
        }
        let connector = builder.build().map_err(|e| TlsKeyError {
            key: "ca_file",
            message: format!("cannot set up TLS: {e}"),
        })?;
        Ok(Tls {
            connector,
            settings,
        })
    }

    /// The connector, for amiquip.
    pub fn connector(&self) -> TlsConnector {
        self.connector.clone()
    }

    /// The name to verify the certificate of `host` against (and to send as SNI).
    pub fn server_name<'a>(&'a self, host: &'a str) -> &'a str {
        self.settings.server_name.as_deref().unwrap_or(host)
    }
}

fn read(path: &Path, key: &'static str) -> Result<Vec<u8>, TlsKeyError> {
    std::fs::read(path).map_err(|e| TlsKeyError {
        key,
        message: format!("cannot read {}: {e}", path.display()),
    })
}

/// A failed handshake's OpenSSL text, made short and actionable. OpenSSL says
/// `error:0A000086:SSL routines:tls_post_process_server_certificate:certificate verify
/// failed:../ssl/statem/statem_clnt.c:1889: (certificate has expired)`; this returns
/// `certificate verify failed: certificate has expired`, with a hint for the usual causes.
pub fn describe_handshake_error(text: &str, server_name: &str) -> String {
    let verify = text
        .rsplit_once(" (")
        .and_then(|(_, reason)| reason.strip_suffix(')'))
        .filter(|_| text.contains("certificate verify failed"));
    let Some(reason) = verify else {
        // Not a verification failure: keep OpenSSL's reason, the `:`-field before the source
        // file (`error:CODE:LIBRARY:FUNCTION:REASON:FILE.c:LINE:DATA`).
        let fields: Vec<&str> = text.split(':').collect();
        let reason = fields
            .iter()
            .position(|field| field.ends_with(".c"))
            .and_then(|file| file.checked_sub(1))
            .map_or(text, |reason| fields[reason].trim());
        return format!("TLS handshake failed: {reason}");
    };
    let hint = match reason {
        r if r.contains("expired") => " (the broker's certificate is out of date: renew it)".to_string(),
        r if r.contains("not yet valid") => " (check the clocks of this host and the broker)".to_string(),
        // "hostname mismatch", or "IP address mismatch" for a URL with an address.
        r if r.contains("mismatch") => format!(
            " (the certificate is not for {server_name:?}: connect by a name it lists, or set broker.tls.server_name)"
        ),
        r if r.contains("issuer") || r.contains("self-signed") || r.contains("self signed") => {
            " (the broker's certificate is not signed by a trusted CA: check broker.tls.ca_file)".to_string()
        }
        _ => String::new(),
    };
    format!("TLS handshake failed: certificate verify failed: {reason}{hint}")
}

impl Tls {
    /// What to add to an error that ended the AMQP handshake over TLS without an alert (a
    /// reset connection): the broker may have refused the client's side of the handshake, and
    /// the alert that said so was lost with the connection.
    pub fn refusal_hint(&self) -> &'static str {
        if self.settings.cert_file.is_some() {
            " (during the TLS handshake: does the broker trust the client certificate in broker.tls.cert_file?)"
        } else {
            " (during the TLS handshake: if the broker requires a client certificate, set broker.tls.cert_file and key_file)"
        }
    }
}

/// The broker's refusal of our side of the handshake, if `text` is one. With TLS 1.3 the client
/// finishes its handshake first, so a broker that refuses the client certificate says so in an
/// alert on the first read, which reaches warren as an I/O error during the AMQP handshake.
pub fn describe_alert(text: &str) -> Option<String> {
    let reason = if text.contains("alert certificate required") {
        "the broker requires a client certificate: set broker.tls.cert_file and key_file"
    } else if text.contains("alert unknown ca") || text.contains("alert bad certificate") {
        "the broker does not trust the client certificate (broker.tls.cert_file): it is not signed by a CA the broker trusts"
    } else if text.contains("alert certificate expired") {
        "the broker refused the client certificate as expired (broker.tls.cert_file)"
    } else {
        return None;
    };
    Some(format!("TLS handshake failed: {reason}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handshake_errors_are_one_short_line_with_a_hint() {
        let expired = "TLS handshake failed: error:0A000086:SSL routines:tls_post_process_server_certificate:certificate verify failed:../ssl/statem/statem_clnt.c:1889: (certificate has expired)";
        assert_eq!(
            describe_handshake_error(expired, "localhost"),
            "TLS handshake failed: certificate verify failed: certificate has expired (the broker's certificate is out of date: renew it)"
        );
        let issuer = "error:0A000086:SSL routines:tls_post_process_server_certificate:certificate verify failed:../ssl/statem/statem_clnt.c:1889: (unable to get local issuer certificate)";
        assert!(describe_handshake_error(issuer, "h").contains("check broker.tls.ca_file"));
        let name = "error:0A000086:SSL routines::certificate verify failed:../ssl/statem/statem_clnt.c:1889: (hostname mismatch)";
        assert!(
            describe_handshake_error(&name.replace("hostname", "IP address"), "10.0.0.1")
                .contains("set broker.tls.server_name")
        );
        assert!(describe_handshake_error(name, "10.0.0.1").contains(
            "not for \"10.0.0.1\": connect by a name it lists, or set broker.tls.server_name"
        ));
        let alert = "error:0A00045C:SSL routines:ssl3_read_bytes:tlsv13 alert certificate required:../ssl/record/rec_layer_s3.c:1586:SSL alert number 116";
        assert_eq!(
            describe_handshake_error(alert, "h"),
            "TLS handshake failed: tlsv13 alert certificate required"
        );
        // amqps:// pointed at a plain AMQP port.
        let plain = "TLS handshake failed: error:0A00010B:SSL routines:ssl3_get_record:wrong version number:../ssl/record/ssl3_record.c:354:";
        assert_eq!(
            describe_handshake_error(plain, "h"),
            "TLS handshake failed: wrong version number"
        );
        let read = format!("I/O error while reading socket: {alert}");
        assert_eq!(
            describe_alert(&read).unwrap(),
            "TLS handshake failed: the broker requires a client certificate: set broker.tls.cert_file and key_file"
        );
        assert!(describe_alert("I/O error: ...:tlsv13 alert unknown ca:...")
            .unwrap()
            .contains("does not trust the client certificate"));
        assert_eq!(describe_alert("Connection reset by peer"), None);
    }

    #[test]
    fn a_key_that_is_not_pkcs8_and_a_missing_pair_are_named() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("c.pem"), "x").unwrap();
        std::fs::write(
            dir.path().join("k.pem"),
            "-----BEGIN RSA PRIVATE KEY-----\n",
        )
        .unwrap();
        let section = |cert: Option<&str>, key: Option<&str>| TlsSection {
            cert_file: cert.map(PathBuf::from),
            key_file: key.map(PathBuf::from),
            ..TlsSection::default()
        };
        let err = Tls::load(Some(&section(Some("c.pem"), Some("k.pem"))), dir.path()).unwrap_err();
        assert_eq!(err.key, "key_file");
        assert!(
            err.message.contains("not a PKCS#8 PEM key"),
            "{}",
            err.message
        );
        let err = Tls::load(Some(&section(Some("c.pem"), None)), dir.path()).unwrap_err();
        assert_eq!(
            (err.key, err.message.as_str()),
            ("cert_file", "needs key_file, the certificate's private key")
        );
        let err = Tls::load(
            Some(&TlsSection {
                ca_file: Some("missing.pem".into()),
                ..TlsSection::default()
            }),
            dir.path(),
        )
        .unwrap_err();
        assert_eq!(err.key, "ca_file");
        assert!(err.message.starts_with(&format!(
            "cannot read {}",
            dir.path().join("missing.pem").display()
        )));
    }
}
