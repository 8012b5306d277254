//! Where warren takes the broker password from, and how it treats one left in the config file:
//! the systemd credential `broker-url` (`$CREDENTIALS_DIRECTORY/broker-url`) overrides the file's
//! `broker.url`, `WARREN_BROKER_URL` overrides both, a bad credential is a config error (exit 78)
//! that names its file, and a config file that holds a password and is readable by every user
//! gets one warning at start that names the file and the key, and never the password.

mod util;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use nix::sys::signal::Signal;
use util::{BrokerLock, ConfigFile, Warren};

/// A broker URL where nothing listens, with a password that must never be logged. A warren that
/// used it instead of the credential would never consume.
const NOWHERE: &str = "amqp://warren:s3cret-in-file@127.0.0.1:1/%2f";

/// The start of the warning about a readable password, after the file's path.
const WARNING: &str = "holds a broker password, and the file is readable by every user";

/// Writes a config for `queue` whose `broker.url` is `url`, with mode `mode`.
fn config(broker: &BrokerLock, queue: &str, url: &str, mode: u32) -> PathBuf {
    let path = ConfigFile::at(url, queue)
        .set("broker.connect_timeout", "1s")
        .workers(1)
        .dots()
        .write_to(&broker.dir.path().join(format!("{queue}.toml")));
    fs::set_permissions(&path, fs::Permissions::from_mode(mode)).expect("chmod the config file");
    path
}

/// A credentials directory, as systemd's `LoadCredential=` makes one, holding `broker-url`.
fn credentials(broker: &BrokerLock, url: &str) -> PathBuf {
    let dir = broker.dir.path().join("credentials");
    fs::create_dir_all(&dir).expect("create the credentials directory");
    fs::write(dir.join("broker-url"), format!("{url}\n")).expect("write the credential");
    dir
}

/// Starts `warren run --config CONFIG` with `CREDENTIALS_DIRECTORY` set to `credentials`.
fn run_with_credentials(config: &Path, credentials: &Path) -> Warren {
    Warren::spawn(
        Command::new(util::warren_bin())
            .arg("run")
            .arg("--config")
            .arg(config)
            .env("CREDENTIALS_DIRECTORY", credentials),
    )
}

#[test]
fn warren_run_reaches_the_broker_through_the_broker_url_credential() {
    let broker = BrokerLock::shared();
    let queue = broker.queue("credential");
    let config = config(&broker, &queue, NOWHERE, 0o600);
    let credentials = credentials(&broker, &util::amqp_url());

    let warren = run_with_credentials(&config, &credentials);
    warren.wait_consuming(&queue, 1);
    let start = warren.wait_for_log("starting 1 workers", Duration::from_secs(5));
    assert!(
        start.contains(&util::broker_address()) && !start.contains("127.0.0.1:1/"),
        "the start line names the credential's broker, not the file's: {start}"
    );
    warren.stop(Duration::from_secs(20));
}

#[test]
fn warren_broker_url_overrides_the_credential() {
    let broker = BrokerLock::shared();
    let queue = broker.queue("env-over-credential");
    let config = config(&broker, &queue, NOWHERE, 0o600);
    let credentials = credentials(&broker, NOWHERE);

    let out = Command::new(util::warren_bin())
        .args(["publish", "--config"])
        .arg(&config)
        .arg("hello")
        .env("WARREN_BROKER_URL", util::amqp_url())
        .env("CREDENTIALS_DIRECTORY", &credentials)
        .env_remove("WARREN_CONFIG")
        .stdin(Stdio::null())
        .output()
        .expect("run warren publish");
    assert!(
        out.status.success(),
        "warren publish used WARREN_BROKER_URL and reached the broker: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(util::queue_counts(&queue).0, 1, "the message is in {queue}");
}

#[test]
fn a_bad_credential_is_a_config_error_that_names_its_file() {
    let dir = tempfile::tempdir().unwrap();
    let config = ConfigFile::at(NOWHERE, "q")
        .dots()
        .write_to(&dir.path().join("warren.toml"));
    let credential = dir.path().join("broker-url");
    for (contents, reason) in [
        ("http://rabbit.example\n", "unsupported scheme"),
        ("\n", "empty"),
    ] {
        fs::write(&credential, contents).unwrap();
        // Refused at once; a warren that wrongly used the file's URL would retry it until
        // wait_exit kills it and fails the test.
        let mut warren = run_with_credentials(&config, dir.path());
        let status = warren.wait_exit(Duration::from_secs(10));
        let log = warren.log();
        assert_eq!(
            status.code(),
            Some(78),
            "a bad credential exits 78 (EX_CONFIG); log:\n{log:#?}"
        );
        let expected = format!("] {}: {reason}", credential.display());
        assert!(
            log.len() == 1 && log[0].contains("ERROR") && log[0].contains(&expected),
            "one error line that contains {expected:?}; log:\n{log:#?}"
        );
    }
}

#[test]
fn a_world_readable_config_with_a_password_is_warned_about_at_start() {
    let broker = BrokerLock::shared();
    let queue = broker.queue("readable");
    let config = config(&broker, &queue, NOWHERE, 0o644);
    let credentials = credentials(&broker, &util::amqp_url());

    let mut warren = run_with_credentials(&config, &credentials);
    let warning = warren.wait_for_log(WARNING, Duration::from_secs(5));
    let expected = format!("{}: broker.url: {WARNING} (mode 0644)", config.display());
    assert!(
        warning.contains("WARN") && warning.contains(&expected),
        "the warning names the file, the key and the mode ({expected:?}): {warning}"
    );
    warren.wait_consuming(&queue, 1);
    warren.signal(Signal::SIGTERM);
    let status = warren.wait_exit(Duration::from_secs(20));
    assert!(status.success(), "warren stopped with {status}");
    let log = warren.log().join("\n");
    assert!(
        !log.contains("s3cret-in-file"),
        "the password is never logged:\n{log}"
    );
    assert_eq!(
        warren.lines_with(WARNING).len(),
        1,
        "one warning line:\n{log}"
    );
}

/// Runs warren with the broker URL credential on a config of mode `mode` that names `url`, for
/// a queue named after `name`, and checks that it starts and consumes without warning about it.
fn assert_not_warned_about(name: &str, url: &str, mode: u32) {
    let broker = BrokerLock::shared();
    let queue = broker.queue(name);
    let config = config(&broker, &queue, url, mode);
    let credentials = credentials(&broker, &util::amqp_url());

    let warren = run_with_credentials(&config, &credentials);
    // The config is loaded, and any warning about it logged, before this line.
    warren.wait_for_log("starting 1 workers", Duration::from_secs(5));
    warren.wait_consuming(&queue, 1);
    assert_eq!(warren.lines_with(WARNING), Vec::<String>::new());
    warren.stop(Duration::from_secs(20));
}

#[test]
fn a_config_readable_only_by_its_owner_is_not_warned_about() {
    assert_not_warned_about("owner-only", NOWHERE, 0o600);
}

#[test]
fn the_guest_account_in_a_world_readable_config_is_not_warned_about() {
    assert_not_warned_about("guest", "amqp://guest:guest@127.0.0.1:1/%2f", 0o644);
}
