//! Recycled `pipe` programs through the real `warren run` binary: a program that reached
//! `handler.max_tasks` or `handler.max_memory` is closed between two messages (after the one it
//! answered is settled) and a fresh one takes the next, with one INFO line saying why and
//! `warren_pipe_recycles_total{reason}` counting it. No message is lost or handled twice, and a
//! recycle is no failure: nothing is retried. The keys' checks are unit tests in `src/config.rs`;
//! the age limit (`handler.max_age`) is a unit test in `src/pipe.rs`.

mod util;

use std::collections::BTreeMap;
use std::time::Duration;

use util::{
    http_get, metric_sample, publish_confirmed, wait_gone, BrokerLock, ConfigFile, Proxy, Queues,
    Warren,
};

const WAIT: Duration = Duration::from_secs(20);
const STOP: Duration = Duration::from_secs(15);

/// A pipe program that acks every message after appending `pid id` to `$DIR/seen`, and keeps
/// `LEAK` more bytes for every message (the script sets `DIR` and `LEAK` first). It exits when
/// its stdin closes.
const RECORDS: &str = r#"
import json, os, sys

kept = []
stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
while True:
    line = stdin.readline()
    if not line:
        sys.exit(0)
    header = json.loads(line)
    stdin.read(header["size"])
    # Bytes written, so that they are resident, not merely reserved.
    kept.append(b"x" * LEAK)
    with open(os.path.join(DIR, "seen"), "a") as seen:
        seen.write("%d %s\n" % (os.getpid(), header["id"]))
    stdout.write(b"%d ack\n" % header["tag"])
    stdout.flush()
"#;

/// Starts warren with one worker running [`RECORDS`] (keeping `leak` bytes per message), with
/// `/metrics` on `port` and the `[handler]` keys `limits`, and waits until it consumes.
fn start(
    broker: &BrokerLock,
    queues: &Queues,
    port: u16,
    leak: usize,
    limits: &[(&str, toml::Value)],
) -> Warren {
    let program = broker.script_in_dir_for(
        "/usr/bin/env python3",
        "records.py",
        &format!("LEAK = {leak}\n{RECORDS}"),
    );
    let mut config = ConfigFile::new(&queues.work)
        .workers(1)
        .pipe(&[&program.display().to_string()])
        .fast_retries()
        .metrics(port);
    for (key, value) in limits {
        config = config.set(&format!("handler.{key}"), value.clone());
    }
    let warren = Warren::run(&config.write_in(broker.dir.path()), &[]);
    warren.wait_consuming(&queues.work, 1);
    warren
}

/// Publishes `n` messages with ids `m-0`… and returns the ids.
fn publish(queue: &str, n: usize) -> Vec<String> {
    let ids: Vec<String> = (0..n).map(|i| format!("m-{i}")).collect();
    let messages: Vec<(&str, &[u8])> = ids.iter().map(|id| (id.as_str(), &b"work"[..])).collect();
    util::declare_durable(queue);
    publish_confirmed(queue, &messages, Duration::from_secs(10));
    ids
}

/// The ids each program handled, by its pid, from the `seen` file.
fn handled_by_pid(broker: &BrokerLock) -> BTreeMap<String, Vec<String>> {
    let mut by_pid: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for line in util::recorded(&broker.dir.path().join("seen")) {
        let (pid, id) = line
            .split_once(' ')
            .unwrap_or_else(|| panic!("bad record {line:?}"));
        by_pid.entry(pid.into()).or_default().push(id.into());
    }
    by_pid
}

/// Checks that each of `ids` was handled exactly once, and nothing else.
fn assert_each_handled_once(by_pid: &BTreeMap<String, Vec<String>>, ids: &[String]) {
    let mut handled: Vec<&String> = by_pid.values().flatten().collect();
    handled.sort();
    let mut want: Vec<&String> = ids.iter().collect();
    want.sort();
    assert_eq!(
        handled, want,
        "every message handled once, by programs {by_pid:?}"
    );
}

/// `warren_pipe_recycles_total` of `queue` for `reason`, from `/metrics` on `port`.
fn recycles(port: u16, queue: &str, reason: &str) -> f64 {
    let (status, metrics) = http_get(port, "/metrics");
    assert_eq!(status, 200, "{metrics}");
    metric_sample(
        &metrics,
        &format!("warren_pipe_recycles_total{{queue=\"{queue}\",reason=\"{reason}\"}}"),
    )
}

#[test]
fn a_program_is_recycled_every_max_tasks_messages_and_none_is_lost_or_handled_twice() {
    let broker = BrokerLock::shared();
    let queues = Queues::new(&broker, "recycle-tasks");
    let port = Proxy::free_port();
    let warren = start(&broker, &queues, port, 0, &[("max_tasks", 3.into())]);
    let ids = publish(&queues.work, 10);
    queues.wait_settled(0);

    let by_pid = handled_by_pid(&broker);
    assert_each_handled_once(&by_pid, &ids);
    assert!(by_pid.len() >= 4, "3 + 3 + 3 + 1 at least: {by_pid:?}");
    assert!(
        by_pid.values().all(|handled| handled.len() <= 3),
        "no program handled more than handler.max_tasks: {by_pid:?}"
    );
    warren.wait_for_count(" after 3 tasks (handler.max_tasks)", 3, WAIT);
    let line = warren.wait_for_log("recycling the pipe program (pid ", WAIT);
    assert!(
        line.contains("INFO") && line.contains("worker-1: recycling the pipe program (pid "),
        "{line}"
    );
    assert!(recycles(port, &queues.work, "max_tasks") >= 3.0);
    assert_eq!(recycles(port, &queues.work, "max_memory"), 0.0);
    assert!(
        warren.lines_with(" failed ").is_empty(),
        "nothing was retried"
    );
    assert!(
        warren
            .lines_with("starting the pipe program again in")
            .is_empty(),
        "no backoff after a recycle"
    );
    // The programs that reached the limit were closed.
    for (pid, _) in by_pid.iter().filter(|(_, handled)| handled.len() == 3) {
        wait_gone(pid, Duration::from_secs(5));
    }
    warren.stop(STOP);
}

#[test]
fn a_program_that_leaks_is_recycled_at_max_memory_and_none_is_lost_or_handled_twice() {
    let broker = BrokerLock::shared();
    let queues = Queues::new(&broker, "recycle-memory");
    let port = Proxy::free_port();
    let warren = start(
        &broker,
        &queues,
        port,
        8 << 20,
        &[("max_memory", "40MiB".into())],
    );
    let ids = publish(&queues.work, 12);
    queues.wait_settled(0);

    let by_pid = handled_by_pid(&broker);
    assert_each_handled_once(&by_pid, &ids);
    assert!(by_pid.len() >= 2, "recycled at least once: {by_pid:?}");
    assert!(
        by_pid.values().all(|handled| handled.len() <= 5),
        "5 messages keep 40 MiB: no program handled more before it was recycled: {by_pid:?}"
    );
    let line = warren.wait_for_log("reached handler.max_memory (40 MiB)", WAIT);
    assert!(
        line.contains("worker-1: recycling the pipe program (pid ")
            && line.contains(": its resident memory "),
        "{line}"
    );
    assert!(recycles(port, &queues.work, "max_memory") >= 1.0);
    assert_eq!(recycles(port, &queues.work, "max_tasks"), 0.0);
    assert!(
        warren.lines_with(" failed ").is_empty(),
        "nothing was retried"
    );
    warren.stop(STOP);
}
