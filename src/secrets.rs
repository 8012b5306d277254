//! Where the broker's password may live besides the config file, and the warning about a config
//! file that shows one to every user of the host.
//!
//! The broker URL is taken from the first of: `WARREN_BROKER_URL`; the systemd credential
//! `broker-url` (the file `$CREDENTIALS_DIRECTORY/broker-url`, which `LoadCredential=` provides);
//! `broker.url` / `broker.urls` in the file. This module only reads those sources and the file's
//! mode: `config.rs` parses and validates, and nothing here touches the broker or logs a
//! password.

use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use crate::config::{BrokerUrl, ConfigError, UrlOverride, UrlSource, BROKER_URL_ENV};

/// The name of the systemd credential that holds the broker URL.
pub const CREDENTIAL: &str = "broker-url";

/// The broker URL that overrides the file's, if any: `WARREN_BROKER_URL`, else the credential.
/// Either may list several nodes, separated by commas.
pub fn broker_url_override() -> Result<Option<UrlOverride>, ConfigError> {
    match std::env::var(BROKER_URL_ENV) {
        Ok(urls) => Ok(Some(UrlOverride {
            urls,
            source: UrlSource::Environment,
        })),
        Err(std::env::VarError::NotPresent) => credential(),
        Err(std::env::VarError::NotUnicode(_)) => Err(ConfigError::new(format!(
            "{BROKER_URL_ENV}: not valid UTF-8"
        ))),
    }
}

/// The credential's path, when systemd passed credentials to this process.
pub fn credential_path() -> Option<PathBuf> {
    std::env::var_os("CREDENTIALS_DIRECTORY")
        .filter(|dir| !dir.is_empty())
        .map(|dir| Path::new(&dir).join(CREDENTIAL))
}

/// The credential's contents, trimmed, checked here so that a bad one is reported under its own
/// name rather than as `WARREN_BROKER_URL`. A credentials directory without it is no error:
/// the unit passes other credentials, or none.
fn credential() -> Result<Option<UrlOverride>, ConfigError> {
    let Some(path) = credential_path() else {
        return Ok(None);
    };
    let text = match fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(ConfigError::new(format!(
                "{}: cannot read: {e}",
                path.display()
            )))
        }
    };
    let urls = text.trim();
    if urls.is_empty() {
        return Err(ConfigError::new(format!(
            "{}: empty; write the broker URL, such as amqp://user:password@host:5672/%2f",
            path.display()
        )));
    }
    for url in urls.split(',') {
        BrokerUrl::parse(url.trim())
            .map_err(|e| ConfigError::new(format!("{}: {e}", path.display())))?;
    }
    Ok(Some(UrlOverride {
        urls: urls.to_string(),
        source: UrlSource::Credential(path),
    }))
}

/// Logs one warning, naming the file and the key, when the config file at `path` holds a broker
/// password and every user of the host may read it. Whether the URL is overridden does not
/// matter: the password is readable all the same.
pub fn warn_if_password_readable(path: &Path) {
    let Ok(mode) = fs::metadata(path).map(|meta| meta.permissions().mode()) else {
        return;
    };
    if mode & 0o004 == 0 {
        return;
    }
    let Some(key) = fs::read_to_string(path)
        .ok()
        .and_then(|source| key_with_password(&source))
    else {
        return;
    };
    log::warn!(
        "{}: {key}: holds a broker password, and the file is readable by every user (mode {:04o}); \
         move the password to {BROKER_URL_ENV} or the systemd credential {CREDENTIAL}, or take \
         the read permission from others (chmod o-r) and leave it to the user warren runs as",
        path.display(),
        mode & 0o7777
    );
}

/// `broker.url` or `broker.urls`, whichever holds a URL with a password, in a config file's
/// text. RabbitMQ's default account, guest:guest, does not count: its password is no secret.
fn key_with_password(source: &str) -> Option<&'static str> {
    let file: toml::Table = source.parse().ok()?;
    let broker = file.get("broker")?.as_table()?;
    if broker
        .get("url")
        .and_then(|url| url.as_str())
        .is_some_and(has_password)
    {
        return Some("broker.url");
    }
    let urls = broker.get("urls").and_then(|urls| urls.as_array())?;
    urls.iter()
        .filter_map(|url| url.as_str())
        .any(has_password)
        .then_some("broker.urls")
}

fn has_password(url: &str) -> bool {
    let Ok(url) = url::Url::parse(url.trim()) else {
        return false;
    };
    match url.password() {
        None | Some("") => false,
        Some(password) => !(url.username() == "guest" && password == "guest"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_password_in_url_or_urls_is_found_but_not_the_guest_account() {
        let with = |broker: &str| key_with_password(&format!("[broker]\n{broker}\n"));
        assert_eq!(
            with("url = \"amqp://app:s3cret@rabbit:5672/%2f\""),
            Some("broker.url")
        );
        assert_eq!(
            with("urls = [\"amqp://rabbit-1\", \"amqp://app:s3cret@rabbit-2\"]"),
            Some("broker.urls")
        );
        assert_eq!(
            with("url = \"amqp://guest:guest@127.0.0.1:5672/%2f\""),
            None
        );
        assert_eq!(with("url = \"amqp://app@rabbit:5672/%2f\""), None);
        assert_eq!(with("url = \"amqp://app:@rabbit\""), None);
        assert_eq!(key_with_password("[queue]\nname = \"q\"\n"), None);
        assert_eq!(key_with_password("not toml ["), None);
    }
}
