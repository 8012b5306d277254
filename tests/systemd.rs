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

/// The broker URL of the config files: a port where nothing listens. The real URL comes from the
/// credential (or the environment file), which overrides it, so a warren that works shows that
/// the credential reached it.
const DECOY_URL: &str = "amqp://guest:guest@127.0.0.1:1/%2f";

/// The text of `config` as the container gets it: with [`DECOY_URL`].
fn file_text(config: ConfigFile) -> String {
    config.url(DECOY_URL).text()
}

/// A container with the package installed.
fn installed(what: &str) -> Container {
    let package = container::package();
    let container = Container::boot(what);
    container.install(&package);
    container
}

/// Writes `config` as /etc/warren/NAME.toml with [`DECOY_URL`], and the test broker's URL as the
/// systemd credential /etc/warren/NAME.broker-url (root only), loaded by a drop-in for `unit`,
/// as docs/deployment.md says to.
fn configure(container: &Container, unit: &str, name: &str, config: ConfigFile) {
    let text = file_text(config);
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

/// A container with the package installed, the executable `scripts` (path, text) written,
/// `config` as warren.service's configuration (see [`configure`]), and warren.service started.
fn running(what: &str, scripts: &[(&str, &str)], config: ConfigFile) -> Container {
    let container = installed(what);
    for (path, text) in scripts {
        script(&container, path, text);
    }
    configure(&container, UNIT, "warren", config);
    start(&container, UNIT);
    container
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
    let (_, starting) = container.wait_journal(UNIT, "starting 2 workers", START);
    assert!(
        starting.contains(&format!("@{}/", util::broker_address())),
        "warren took the broker URL from its credential, not the file: {starting}"
    );

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

/// A handler that sleeps as many seconds as its body says, recording the body when it begins (in
/// `started`) and when it is done (in `bodies`).
const SLOW: &str = "#!/bin/sh\n\
    body=$(cat)\n\
    echo \"$body\" >>/var/lib/warren/started\n\
    sleep \"$body\"\n\
    echo \"$body\" >>/var/lib/warren/bodies\n";

/// A container running warren.service with the SLOW handler, one worker and `grace`.
fn slow_warren(what: &str, queue: &str, grace: &str) -> Container {
    running(
        what,
        &[("/usr/local/bin/slow", SLOW)],
        ConfigFile::new(queue)
            .workers(1)
            .command(std::path::Path::new("/usr/local/bin/slow"))
            .set("shutdown.grace", grace),
    )
}

/// Waits until the SLOW handler began the task `body`.
fn wait_started(container: &Container, body: &str) {
    util::wait_until(START, &format!("the task {body:?} to begin"), || {
        container
            .read("/var/lib/warren/started")
            .is_some_and(|text| text.lines().any(|line| line == body))
    });
}

#[test]
fn stop_during_a_long_task_gives_it_its_grace_and_acks_it() {
    let broker = BrokerLock::shared();
    let queue = broker.queue("systemd-grace");
    let host_config = ConfigFile::new(&queue).write_in(broker.dir.path());
    let container = slow_warren("grace", &queue, "20s");

    publish_ok(&host_config, &["3"]);
    wait_started(&container, "3");
    let began = Instant::now();
    let out = container.systemctl(&["stop", UNIT]);
    let took = began.elapsed();
    assert!(out.status.success(), "{}", container.status(UNIT));

    assert_eq!(recorded(&container), ["3"], "the task ran to its end");
    assert!(
        took < Duration::from_secs(15),
        "the stop ended with the task, well within the grace ({took:?})"
    );
    assert_eq!(ready_and_unacked(&queue), (0, 0), "the message was acked");
    assert_eq!(container.show(UNIT, "ActiveState"), "inactive");
    assert_eq!(container.show(UNIT, "Result"), "success");
    assert_eq!(container.show(UNIT, "ExecMainStatus"), "0");
}

#[test]
fn stop_outlasting_the_grace_kills_the_handler_group_and_requeues() {
    let broker = BrokerLock::shared();
    let queue = broker.queue("systemd-abandon");
    let host_config = ConfigFile::new(&queue).write_in(broker.dir.path());
    let container = slow_warren("abandon", &queue, "2s");

    publish_ok(&host_config, &["600"]);
    wait_started(&container, "600");
    let began = Instant::now();
    // The stop fails: warren exits 1 when it requeued unfinished tasks.
    container.systemctl(&["stop", UNIT]);
    let took = began.elapsed();

    assert!(
        took < Duration::from_secs(15),
        "warren ended the task at the grace, long before TimeoutStopSec= (45s) ({took:?})"
    );
    assert_eq!(container.show(UNIT, "ActiveState"), "failed");
    assert_eq!(container.show(UNIT, "Result"), "exit-code");
    assert_eq!(container.show(UNIT, "ExecMainStatus"), "1");
    assert_eq!(
        ready_and_unacked(&queue),
        (1, 0),
        "the message was requeued"
    );
    let journal = container.journal(UNIT);
    assert!(
        journal
            .iter()
            .any(|(priority, line)| *priority == 3 && line.contains("requeued unfinished messages")),
        "warren said what it requeued, as an error: {journal:#?}"
    );
    assert!(
        journal
            .iter()
            .any(|(priority, line)| *priority == 4 && line.contains("grace of 2s ran out")),
        "warren warned that the grace ran out, as a warning: {journal:#?}"
    );
    // Had warren left the handler's processes behind, systemd would have killed them once warren
    // exited, and said so.
    assert!(
        !journal
            .iter()
            .any(|(_, line)| line.contains("Killing process")),
        "warren killed the handler's process group itself: {journal:#?}"
    );
    assert_eq!(recorded(&container), Vec::<String>::new());
}

#[test]
fn a_hung_supervisor_is_killed_by_the_watchdog_and_restarted() {
    let broker = BrokerLock::shared();
    let queue = broker.queue("systemd-watchdog");
    let host_config = ConfigFile::new(&queue).write_in(broker.dir.path());
    let container = running(
        "watchdog",
        &[("/usr/local/bin/record", RECORD)],
        ConfigFile::new(&queue)
            .workers(1)
            .command(std::path::Path::new("/usr/local/bin/record")),
    );
    let hung = container.show(UNIT, "MainPID");

    // Every thread of warren stops, the supervisor's watchdog pings with them.
    container.text(&[
        "systemctl",
        "kill",
        "--kill-whom=main",
        "--signal=SIGSTOP",
        UNIT,
    ]);
    // WatchdogSec=30s, then SIGABRT, RestartSec=2 and a new start.
    container.wait_show(UNIT, "NRestarts", Duration::from_secs(60), |n| n == "1");
    container.wait_property(UNIT, "ActiveState", "active", START);
    assert_ne!(container.show(UNIT, "MainPID"), hung, "a new warren runs");
    let journal = container.journal(UNIT);
    assert!(
        journal
            .iter()
            .any(|(_, line)| line.contains("Watchdog timeout")),
        "systemd's watchdog fired: {journal:#?}"
    );

    publish_ok(&host_config, &["after"]);
    container.wait_show(UNIT, "StatusText", START, |s| s.contains(" 1 done,"));
    assert_eq!(recorded(&container), ["after"]);
}

#[test]
fn a_bad_config_fails_with_status_78_and_is_not_restarted() {
    let broker = BrokerLock::shared();
    let queue = broker.queue("systemd-bad-config");
    let container = installed("bad-config");
    configure(
        &container,
        UNIT,
        "warren",
        ConfigFile::new(&queue).dots().set("workers.count", "many"),
    );

    let out = container.systemctl(&["start", UNIT]);
    assert!(!out.status.success(), "the start failed");
    assert_eq!(container.show(UNIT, "ActiveState"), "failed");
    assert_eq!(container.show(UNIT, "Result"), "exit-code");
    assert_eq!(container.show(UNIT, "ExecMainStatus"), "78");
    // RestartSec=2: a restart would have come by now. Nothing can be awaited for one that must
    // not come.
    std::thread::sleep(Duration::from_secs(5));
    assert_eq!(container.show(UNIT, "NRestarts"), "0");
    assert_eq!(container.show(UNIT, "ActiveState"), "failed");

    let journal = container.journal(UNIT);
    let error = journal
        .iter()
        .find(|(_, line)| {
            line.contains("/etc/warren/warren.toml") && line.contains("workers.count")
        })
        .unwrap_or_else(|| panic!("the journal names the file and key: {journal:#?}"));
    assert_eq!(error.0, 3, "the error is logged at priority err: {error:?}");
}

#[test]
fn the_journal_has_warren_s_lines_at_their_priorities() {
    let broker = BrokerLock::shared();
    let queue = broker.queue("systemd-journal");
    let container = running("journal", &[], ConfigFile::new(&queue).workers(1).dots());
    // A reload of a file that does not validate is refused with an error, and warren runs on.
    let config = container
        .read("/etc/warren/warren.toml")
        .expect("the config is there");
    container.write(
        "/etc/warren/warren.toml",
        config.replace("count = 1", "count = \"many\"").as_bytes(),
        0o644,
    );
    container.systemctl(&["kill", "--kill-whom=main", "--signal=SIGHUP", UNIT]);
    let (priority, _) = container.wait_journal(UNIT, "reload refused", START);
    assert_eq!(priority, 3, "an error is at priority err");
    assert_eq!(container.show(UNIT, "ActiveState"), "active");

    let journal = container.journal(UNIT);
    let info = journal
        .iter()
        .find(|(_, line)| line.contains("SIGHUP: reloading"))
        .unwrap_or_else(|| panic!("the journal has warren's info line: {journal:#?}"));
    assert_eq!(info.0, 6, "an info line is at priority info: {info:?}");
    assert!(
        journal.iter().all(|(_, line)| !line.starts_with('<')),
        "journald read every <N> prefix rather than showing it: {journal:#?}"
    );
}

#[test]
fn the_hardened_unit_runs_the_python_pipe_example() {
    let broker = BrokerLock::shared();
    let queue = broker.queue("systemd-pipe");
    let host_config = ConfigFile::new(&queue).write_in(broker.dir.path());
    let container = running(
        "pipe",
        &[],
        ConfigFile::new(&queue).workers(2).pipe(&[
            "/usr/bin/python3",
            "/usr/share/doc/warren/examples/pipe_handler.py",
        ]),
    );
    publish_ok(&host_config, &["one.", "two", "three"]);
    container.wait_show(UNIT, "StatusText", START, |s| s.contains(" 3 done,"));
    assert_eq!(ready_and_unacked(&queue), (0, 0));
    let out = container.systemctl(&["stop", UNIT]);
    assert!(out.status.success(), "{}", container.status(UNIT));
    assert_eq!(container.show(UNIT, "Result"), "success");
}

/// A command handler that records what the sandbox lets it do, one `what: yes|no` a line.
const PROBE: &str = "#!/bin/sh\n\
    cat >/dev/null\n\
    out=/var/lib/warren/probe\n\
    can() { if \"$@\" 2>/dev/null; then echo yes; else echo no; fi; }\n\
    echo \"user: $(id -un)\" >$out\n\
    echo \"state: $(can touch /var/lib/warren/file)\" >>$out\n\
    echo \"tmp: $(can touch /tmp/file)\" >>$out\n\
    echo \"etc: $(can touch /etc/warren/file)\" >>$out\n\
    echo \"usr: $(can touch /usr/local/bin/file)\" >>$out\n\
    echo \"root: $(can ls /root)\" >>$out\n\
    echo \"home: $(can ls /home)\" >>$out\n";

#[test]
fn the_hardened_unit_runs_a_command_inside_its_sandbox() {
    let broker = BrokerLock::shared();
    let queue = broker.queue("systemd-sandbox");
    let host_config = ConfigFile::new(&queue).write_in(broker.dir.path());
    let container = running(
        "sandbox",
        &[("/usr/local/bin/probe", PROBE)],
        ConfigFile::new(&queue)
            .workers(1)
            .command(std::path::Path::new("/usr/local/bin/probe")),
    );
    publish_ok(&host_config, &["probe"]);
    container.wait_show(UNIT, "StatusText", START, |s| s.contains(" 1 done,"));
    let probe = container
        .read("/var/lib/warren/probe")
        .expect("the probe wrote its file");
    assert_eq!(
        probe, "user: warren\nstate: yes\ntmp: yes\netc: no\nusr: no\nroot: no\nhome: no\n",
        "the task runs as warren, may write its state directory and its /tmp only, and sees no \
         home directory"
    );
    assert!(
        container.read("/tmp/file").is_none(),
        "the task's /tmp is private"
    );
}

#[test]
fn an_instance_of_the_template_runs_beside_warren_service() {
    let broker = BrokerLock::shared();
    let jobs = broker.queue("systemd-jobs");
    let orders = broker.queue("systemd-orders");
    let jobs_config = ConfigFile::new(&jobs).write_in(broker.dir.path());
    let orders_config = ConfigFile::new(&orders).write_in(broker.dir.path());
    let container = installed("template");
    script(&container, "/usr/local/bin/record", RECORD);
    let record = std::path::Path::new("/usr/local/bin/record");
    configure(
        &container,
        UNIT,
        "warren",
        ConfigFile::new(&jobs).workers(1).command(record),
    );
    // The instance takes its broker URL from its environment file instead of a credential.
    let text = file_text(ConfigFile::new(&orders).workers(2).command(record));
    container.write("/etc/warren/orders.toml", text.as_bytes(), 0o644);
    container.write(
        "/etc/warren/orders.env",
        format!("WARREN_BROKER_URL={}\n", amqp_url()).as_bytes(),
        0o600,
    );
    let instance = "warren@orders.service";
    start(&container, UNIT);
    start(&container, instance);
    assert_eq!(queue_counts(&jobs).1, 1);
    assert_eq!(queue_counts(&orders).1, 2);
    assert!(container
        .show(instance, "StatusText")
        .contains("of 2 workers"));
    assert_ne!(
        container.show(UNIT, "MainPID"),
        container.show(instance, "MainPID")
    );

    publish_ok(&jobs_config, &["job"]);
    publish_ok(&orders_config, &["order"]);
    container.wait_show(UNIT, "StatusText", START, |s| s.contains(" 1 done,"));
    container.wait_show(instance, "StatusText", START, |s| s.contains(" 1 done,"));
    let mut bodies = recorded(&container);
    bodies.sort();
    assert_eq!(bodies, ["job", "order"]);

    // Both control sockets share /run/warren; stopping one instance leaves the other's.
    container.sh("test -S /run/warren/warren.sock && test -S /run/warren/orders.sock");
    let out = container.systemctl(&["stop", instance]);
    assert!(out.status.success(), "{}", container.status(instance));
    container.sh("test -S /run/warren/warren.sock");
    assert_eq!(container.show(UNIT, "ActiveState"), "active");
}

#[test]
fn reload_applies_a_new_worker_count_and_refuses_a_bad_file() {
    let broker = BrokerLock::shared();
    let queue = broker.queue("systemd-reload");
    let container = running("reload", &[], ConfigFile::new(&queue).workers(1).dots());
    let pid = container.show(UNIT, "MainPID");

    let text = file_text(ConfigFile::new(&queue).workers(3).dots());
    container.write("/etc/warren/warren.toml", text.as_bytes(), 0o644);
    let out = container.systemctl(&["reload", UNIT]);
    assert!(out.status.success(), "{}", container.status(UNIT));
    container.wait_show(UNIT, "StatusText", START, |s| {
        s.contains("of 3 workers") && s.ends_with("broker connected")
    });
    assert_eq!(container.show(UNIT, "MainPID"), pid, "the same warren runs");
    util::wait_until(START, "3 consumers", || queue_counts(&queue).1 == 3);

    container.write(
        "/etc/warren/warren.toml",
        text.replace("count = 3", "count = \"many\"").as_bytes(),
        0o644,
    );
    let out = container.systemctl(&["reload", UNIT]);
    assert!(!out.status.success(), "the reload of a bad file fails");
    assert_eq!(container.show(UNIT, "ActiveState"), "active");
    assert!(container.show(UNIT, "StatusText").contains("of 3 workers"));
}

#[test]
fn pause_and_resume_reach_the_service_through_its_control_socket() {
    let broker = BrokerLock::shared();
    let queue = broker.queue("systemd-pause");
    let container = running("pause", &[], ConfigFile::new(&queue).workers(2).dots());

    container.text(&["warren", "pause", "--config", "/etc/warren/warren.toml"]);
    container.wait_show(UNIT, "StatusText", START, |s| s.starts_with("paused:"));
    util::wait_until(START, "no consumer while paused", || {
        queue_counts(&queue).1 == 0
    });
    container.text(&["warren", "resume", "--config", "/etc/warren/warren.toml"]);
    container.wait_show(UNIT, "StatusText", START, |s| {
        !s.starts_with("paused:") && s.ends_with("broker connected")
    });
    assert_eq!(queue_counts(&queue).1, 2);
}

#[test]
fn a_start_while_the_broker_is_down_stays_activating_until_it_returns() {
    // This test stops the broker's app: no other test may run meanwhile.
    let broker = BrokerLock::exclusive();
    let queue = broker.queue("systemd-outage");
    let host_config = ConfigFile::new(&queue).write_in(broker.dir.path());
    let container = installed("outage");
    script(&container, "/usr/local/bin/record", RECORD);
    configure(
        &container,
        UNIT,
        "warren",
        ConfigFile::new(&queue)
            .workers(1)
            .command(std::path::Path::new("/usr/local/bin/record")),
    );

    let app = util::AppGuard::stop_app();
    let began = Instant::now();
    container.text(&["systemctl", "start", "--no-block", UNIT]);
    let status = container.wait_show(UNIT, "StatusText", START, |s| {
        s.contains("broker unreachable")
    });
    assert_eq!(
        container.show(UNIT, "ActiveState"),
        "activating",
        "no READY=1 while the broker is away ({status})"
    );
    drop(app);
    // TimeoutStartSec=90s from the start.
    container.wait_property(UNIT, "ActiveState", "active", Duration::from_secs(90));
    assert!(began.elapsed() < Duration::from_secs(90));
    assert_eq!(container.show(UNIT, "NRestarts"), "0", "one start did it");

    publish_ok(&host_config, &["back"]);
    container.wait_show(UNIT, "StatusText", START, |s| s.contains(" 1 done,"));
    assert_eq!(recorded(&container), ["back"]);
}
