//! Stopping: Ctrl+C and SIGTERM let tasks in flight finish within the grace and exit 0; past the
//! grace, tasks are killed and their messages requeued (exit 1); a second Ctrl+C exits at once
//! (130). Nothing is acked that did not finish.

mod util;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use util::{
    publish_ok, ready_and_unacked, wait_for_ready, wait_until, BrokerLock, ConfigFile, Warren,
};

/// A one-worker config for `queue`, for the caller to complete and write, whose command (the
/// script `name`) starts a `sleep 60` grandchild, records its pid and then its own in the
/// returned pids file, and waits.
fn pid_recording_config(broker: &BrokerLock, queue: &str, name: &str) -> (PathBuf, ConfigFile) {
    let pids = broker.dir.path().join("pids");
    let script = broker.script(
        name,
        &format!(
            "sleep 60 &\necho $! > {0}\necho $$ >> {0}\nwait",
            pids.display()
        ),
    );
    let config = ConfigFile::new(queue).workers(1).command(&script);
    (pids, config)
}

/// Waits until the task of [`pid_recording_config`] has recorded both of its pids in `pids`.
fn wait_for_pids(pids: &Path) {
    wait_until(
        Duration::from_secs(10),
        "the task to record its pids",
        || util::recorded(pids).len() == 2,
    );
}

/// Waits until every process recorded in `pids` is gone.
fn wait_all_killed(pids: &Path) {
    for pid in util::recorded(pids) {
        let pid = Pid::from_raw(pid.parse().unwrap());
        wait_until(
            Duration::from_secs(5),
            &format!("process {pid} to be killed"),
            || kill(pid, None).is_err(),
        );
    }
}

#[test]
fn sigterm_during_a_task_lets_it_finish_and_be_acked_then_exits_zero() {
    let broker = BrokerLock::shared();
    let queue = broker.queue("term-busy");
    let config = ConfigFile::new(&queue)
        .workers(2)
        .dots()
        .write_in(broker.dir.path());
    let mut warren = Warren::run(&config, &[]);
    warren.wait_consuming(&queue, 2);
    publish_ok(&config, &["two seconds.."]);
    warren.wait_for_log("received", Duration::from_secs(10));

    warren.signal(Signal::SIGTERM);
    let status = warren.wait_exit(Duration::from_secs(20));
    assert_eq!(status.code(), Some(0), "a graceful stop exits 0");
    assert_eq!(
        warren.lines_with(" done ").len(),
        1,
        "the task in flight completed"
    );
    assert_eq!(ready_and_unacked(&queue), (0, 0), "and was acked");
}

#[test]
fn sigterm_with_idle_workers_exits_in_well_under_a_second() {
    let broker = BrokerLock::shared();
    let queue = broker.queue("term-idle");
    let config = ConfigFile::new(&queue)
        .workers(4)
        .dots()
        .write_in(broker.dir.path());
    let mut warren = Warren::run(&config, &[]);
    warren.wait_consuming(&queue, 4);

    let signalled = Instant::now();
    warren.signal(Signal::SIGTERM);
    let status = warren.wait_exit(Duration::from_secs(10));
    let took = signalled.elapsed();
    assert_eq!(status.code(), Some(0));
    assert!(
        took < Duration::from_secs(1),
        "idle workers took {took:?} to stop"
    );
}

#[test]
fn deliveries_not_yet_started_at_sigterm_are_returned_to_the_queue_unprocessed() {
    let broker = BrokerLock::shared();
    let queue = broker.queue("stragglers");
    // Prefetch 5 hands the worker messages it has not started; they must go back, not be acked.
    let config = ConfigFile::new(&queue)
        .workers(1)
        .prefetch(5)
        .dots()
        .write_in(broker.dir.path());
    publish_ok(&config, &["first.", "second", "third", "fourth", "fifth"]);
    let mut warren = Warren::run(&config, &[]);
    warren.wait_for_log("\"first.\"", Duration::from_secs(10));

    warren.signal(Signal::SIGTERM);
    assert_eq!(warren.wait_exit(Duration::from_secs(20)).code(), Some(0));
    assert_eq!(
        warren.lines_with(" done ").len(),
        1,
        "only the task in flight ran"
    );
    assert_eq!(warren.lines_with("to the queue unprocessed").len(), 4);
    assert_eq!(
        ready_and_unacked(&queue),
        (4, 0),
        "the four others wait in the queue again"
    );
}

#[test]
fn a_task_still_running_after_the_grace_is_killed_and_its_message_requeued() {
    let broker = BrokerLock::shared();
    let queue = broker.queue("grace");
    // The task starts a grandchild too: the whole process group must die.
    let (pids, config) = pid_recording_config(&broker, &queue, "slow-job");
    let config = config
        .set("shutdown.grace", "1s")
        .write_in(broker.dir.path());
    publish_ok(&config, &["never finishes"]);
    let mut warren = Warren::run(&config, &[]);
    let received = warren.wait_for_log("received", Duration::from_secs(10));
    let id = received
        .split_whitespace()
        .skip_while(|w| *w != "received")
        .nth(1)
        .unwrap()
        .to_string();
    wait_for_pids(&pids);

    warren.signal(Signal::SIGTERM);
    let status = warren.wait_exit(Duration::from_secs(20));
    assert_eq!(
        status.code(),
        Some(1),
        "an abandoned task makes the exit code 1"
    );
    let line = warren.wait_for_log("requeued unfinished messages", Duration::from_secs(1));
    assert!(
        line.contains(&id),
        "the last line names the requeued message: {line}"
    );
    assert!(warren.lines_with(" done ").is_empty());
    assert_eq!(
        ready_and_unacked(&queue),
        (1, 0),
        "the message is back in the queue, not acked"
    );
    wait_all_killed(&pids);
}

#[test]
fn a_dots_task_is_abandoned_at_the_end_of_the_grace_not_slept_out() {
    let broker = BrokerLock::shared();
    let queue = broker.queue("grace-dots");
    let config = ConfigFile::new(&queue)
        .workers(1)
        .dots()
        .set("shutdown.grace", "500ms")
        .write_in(broker.dir.path());
    publish_ok(
        &config,
        &["a minute of work............................................................"],
    );
    let mut warren = Warren::run(&config, &[]);
    warren.wait_for_log("received", Duration::from_secs(10));

    warren.signal(Signal::SIGTERM);
    assert_eq!(warren.wait_exit(Duration::from_secs(15)).code(), Some(1));
    assert_eq!(ready_and_unacked(&queue), (1, 0));
}

#[test]
fn a_second_ctrl_c_exits_at_once_with_130_and_the_broker_requeues() {
    let broker = BrokerLock::shared();
    let queue = broker.queue("twice");
    let config = ConfigFile::new(&queue)
        .workers(1)
        .dots()
        .write_in(broker.dir.path());
    publish_ok(&config, &["long.........."]);
    let mut warren = Warren::run(&config, &[]);
    warren.wait_for_log("received", Duration::from_secs(10));

    warren.signal(Signal::SIGINT);
    warren.wait_for_log("stopping", Duration::from_secs(5));
    warren.signal(Signal::SIGINT);
    assert_eq!(warren.wait_exit(Duration::from_secs(5)).code(), Some(130));
    wait_for_ready(&queue, 1, Duration::from_secs(10));
}

#[test]
fn a_second_ctrl_c_kills_a_running_command_with_its_process_group() {
    let broker = BrokerLock::shared();
    let queue = broker.queue("twice-command");
    let (pids, config) = pid_recording_config(&broker, &queue, "stubborn-job");
    let config = config.write_in(broker.dir.path());
    publish_ok(&config, &["takes a minute"]);
    let mut warren = Warren::run(&config, &[]);
    wait_for_pids(&pids);

    warren.signal(Signal::SIGINT);
    warren.wait_for_log("stopping", Duration::from_secs(5));
    warren.signal(Signal::SIGINT);
    assert_eq!(warren.wait_exit(Duration::from_secs(5)).code(), Some(130));
    wait_all_killed(&pids);
    wait_for_ready(&queue, 1, Duration::from_secs(10));
}

#[test]
fn a_second_signal_during_a_stop_for_a_refused_login_exits_130_and_still_says_why() {
    let broker = BrokerLock::shared();
    let queue = broker.queue("fatalstop");
    let user = util::User::create("fatalstop");
    let proxy = util::Proxy::start(util::Proxy::free_port());
    let config = ConfigFile::at(&user.url_at(proxy.port), &queue)
        .workers(2)
        .dots()
        .set("shutdown.grace", "2m")
        .write_in(broker.dir.path());
    let mut warren = Warren::run(&config, &[]);
    warren.wait_consuming(&queue, 2);
    publish_ok(
        &config,
        &["a long task ............................................"],
    );
    let received = warren.wait_for_log(" received ", Duration::from_secs(10));
    let idle = if received.contains("worker-1 ") { 2 } else { 1 };

    // The password is rotated and the idle worker's connection dropped: its reconnect is
    // refused, which stops warren, and the stop waits for the busy worker's task.
    user.change_password();
    let marker = format!("warren worker-{idle} pid {}\"", warren.pid());
    let connections = util::connections_named(&marker);
    assert_eq!(connections.len(), 1, "{marker}: {connections:?}");
    util::rabbitmqctl(&["close_connection", &connections[0].0, "warren test"]);
    warren.wait_for_log("retrying cannot fix", Duration::from_secs(30));
    warren.signal(Signal::SIGTERM);
    warren.wait_for_log("stopping: no new messages", Duration::from_secs(10));
    warren.signal(Signal::SIGTERM);
    assert_eq!(warren.wait_exit(Duration::from_secs(10)).code(), Some(130));
    let log = warren.log();
    assert!(
        log.iter()
            .any(|l| l.contains("ERROR") && l.contains("refused the connection")),
        "the refused login that began the stop is logged: {log:#?}"
    );
    assert!(
        !log.join("\n").contains(user.password()),
        "no password in the log"
    );
}
