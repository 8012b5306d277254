//! The package under a real systemd: each test boots a throwaway systemd in namespaces of its own
//! ([`Container`], tests/util/container.rs), installs the freshly built .deb there with
//! `dpkg -i`, writes /etc/warren/warren.toml for a queue of its own with the broker URL in a
//! credential, and drives warren.service (or an instance of warren@.service) with `systemctl`.
//! What it checks, it reads where an operator would: `systemctl show` properties, the broker's own
//! counts, and the journal.
//!
//! These tests need the package: `.ci/run systemd` builds it and runs them; by hand,
//! `cargo deb --locked && cargo test --test systemd` (or set `WARREN_TEST_DEB`). They need root
//! and a kernel that lets them make the namespaces, and fail saying so where it does not. Plain
//! `cargo test` leaves them out (`test = false` in Cargo.toml): they need the package first.

mod util;

use std::time::{Duration, Instant};

use util::container::{self, Container};
use util::{amqp_url, publish_ok, queue_counts, ready_and_unacked, BrokerLock, ConfigFile};

const UNIT: &str = "warren.service";

/// How long a start may take: the unit's TimeoutStartSec= is 90s, but a reachable broker makes it
/// a second or two.
const START: Duration = Duration::from_secs(30);

/// The handler of most tests: records each body, one a line, in warren's state directory (the
/// only place the unit lets it write, with its private /tmp).
const RECORD: &str = "#!/bin/sh\n\
    body=$(cat)\n\
    echo \"$body\" >>/var/lib/warren/bodies\n";

/// A container with the package installed.
fn installed(what: &str) -> Container {
    let container = Container::boot(what);
    container.install(&container::package());
    container
}

/// Writes `config` as /etc/warren/NAME.toml without its broker URL, and that URL as the systemd
/// credential /etc/warren/NAME.broker-url (root only), loaded by a drop-in for `unit`, as
/// docs/deployment.md says to.
fn configure(container: &Container, unit: &str, name: &str, config: ConfigFile) {
    let text = config.unset("broker.url").text();
    container.write(&format!("/etc/warren/{name}.toml"), text.as_bytes(), 0o644);
    container.write(
        &format!("/etc/warren/{name}.broker-url"),
        format!("{}\n", amqp_url()).as_bytes(),
        0o600,
    );
    container.write(
        &format!("/etc/systemd/system/{unit}.d/credential.conf"),
        format!("[Service]\nLoadCredential=broker-url:/etc/warren/{name}.broker-url\n").as_bytes(),
        0o644,
    );
    container.text(&["systemctl", "daemon-reload"]);
}

/// Writes an executable script at `path` in the container.
fn script(container: &Container, path: &str, text: &str) {
    container.write(path, text.as_bytes(), 0o755);
}

/// `systemctl start UNIT`, which returns once warren said READY=1 (or the start failed).
fn start(container: &Container, unit: &str) {
    let began = Instant::now();
    let out = container.systemctl(&["start", unit]);
    assert!(
        out.status.success(),
        "systemctl start {unit} failed after {:?}:\n{}",
        began.elapsed(),
        container.status(unit)
    );
}

/// The bodies the RECORD handler wrote, in order.
fn recorded(container: &Container) -> Vec<String> {
    container
        .read("/var/lib/warren/bodies")
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

#[test]
fn start_reaches_active_with_the_workers_in_its_status_and_tasks_flow() {
    let broker = BrokerLock::shared();
    let queue = broker.queue("systemd-start");
    let host_config = ConfigFile::new(&queue).write_in(broker.dir.path());
    let container = installed("start");

    let user = container.text(&["getent", "passwd", "warren"]);
    assert!(
        user.contains(":/var/lib/warren:"),
        "the package made the warren user with its home: {user}"
    );

    script(&container, "/usr/local/bin/record", RECORD);
    configure(
        &container,
        UNIT,
        "warren",
        ConfigFile::new(&queue)
            .workers(2)
            .command(std::path::Path::new("/usr/local/bin/record")),
    );
    start(&container, UNIT);
    assert_eq!(container.show(UNIT, "ActiveState"), "active");
    assert_eq!(container.show(UNIT, "SubState"), "running");
    let status = container.show(UNIT, "StatusText");
    assert!(
        status.contains("of 2 workers") && status.ends_with("broker connected"),
        "STATUS shows the workers: {status}"
    );
    assert_eq!(queue_counts(&queue).1, 2, "both workers consume");

    publish_ok(&host_config, &["one", "two", "three"]);
    container.wait_show(UNIT, "StatusText", START, |s| s.contains(" 3 done,"));
    let mut bodies = recorded(&container);
    bodies.sort();
    assert_eq!(bodies, ["one", "three", "two"]);
    assert_eq!(ready_and_unacked(&queue), (0, 0));

    let out = container.systemctl(&["stop", UNIT]);
    assert!(out.status.success(), "{}", container.status(UNIT));
    assert_eq!(container.show(UNIT, "ActiveState"), "inactive");
    assert_eq!(container.show(UNIT, "Result"), "success");
    assert_eq!(container.show(UNIT, "ExecMainStatus"), "0");
    assert_eq!(queue_counts(&queue).1, 0, "no consumer is left");
}
