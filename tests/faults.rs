//! Fault injection: a few thousand numbered tasks go through `warren run` while the broker closes
//! every connection, stops and starts its app, the network goes dead, warren itself is killed
//! with SIGKILL, or the handler fails, crashes and hangs at random; on a classic and on a quorum
//! queue.
//!
//! Every scenario checks the same things at the end: each task was completed or dead-lettered
//! (none lost), duplicates stay within what at-least-once allows (one per worker per fault, with
//! prefetch 1), and every queue warren declared (work, retry and dead-letter queues) ends empty
//! with nothing unacked. Each prints one line, `faults: scenario=... lost=0 duplicates=N
//! dead_lettered=N recovery=T`, whose figures RELIABILITY.md quotes; run
//! `cargo test --test faults -- --nocapture 2>&1 | grep '^faults:'` to see them.

mod util;

use std::collections::BTreeMap;
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use util::tally::{Tally, Tasks};
use util::{
    queue_table, rabbitmqctl, wait_until, AppGuard, BrokerLock, ConfigFile, Proxy, Vhost, Warren,
};
use warren::amqp::{Header, Session};
use warren::retry::{self, Topology};

/// Tasks per scenario, published as the bodies "1" to "2000".
const TASKS: usize = 2000;
/// Workers of every `warren run`; with prefetch 1 each holds at most one unacked task, so one
/// fault can make at most this many tasks run twice.
const WORKERS: usize = 4;
/// How long the work may take to finish after the fault.
const SETTLE: Duration = Duration::from_secs(60);

/// The handler of the fault scenarios: a little work, then the task's id appended to the `done`
/// file. Appends of short lines are atomic, so the file can be shared by the workers. A task
/// whose body never arrived (warren was killed before it wrote stdin) fails.
const RECORD_DONE: &str =
    "read -r id\n[ -n \"$id\" ] || exit 1\nsleep 0.01\necho \"$id\" >> \"$DIR/done\"\n";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum QueueType {
    Classic,
    Quorum,
}

impl QueueType {
    fn name(self) -> &'static str {
        match self {
            QueueType::Classic => "classic",
            QueueType::Quorum => "quorum",
        }
    }
}

/// One scenario: its queues, its `warren run` config and the files its handler writes. The
/// fields drop in order: the queues are deleted, then the vhost, then the broker lock released.
struct Scenario {
    name: &'static str,
    kind: QueueType,
    started: Instant,
    /// The broker URL of the scenario's vhost, for the test's own connections.
    url: String,
    /// The vhost, for `rabbitmqctl list_queues -p`.
    vhost_name: String,
    /// The config that `tasks.config` holds, for variants of it.
    file: ConfigFile,
    tasks: Tasks,
    topology: Topology,
    _cleanup: DeleteQueues,
    _vhost: Option<Vhost>,
    broker: BrokerLock,
}

impl Scenario {
    /// A scenario on `broker`'s lock, in `vhost` (or `/`), whose handler script runs `handler`
    /// (with `$DIR`, the test's directory) under `shell`, and whose config `configure` adds to.
    fn new(
        name: &'static str,
        broker: BrokerLock,
        kind: QueueType,
        vhost: Option<Vhost>,
        shell: &str,
        handler: &str,
        configure: impl FnOnce(ConfigFile) -> ConfigFile,
    ) -> Scenario {
        let queue = broker.queue(&format!("faults-{name}"));
        let script = broker.script_in_dir_for(shell, "handler", handler);
        let url = vhost.as_ref().map_or_else(util::amqp_url, Vhost::url);
        let mut file = ConfigFile::new(&queue)
            .url(&url)
            .workers(WORKERS)
            .prefetch(1)
            .command(&script);
        if kind == QueueType::Quorum {
            file = file.quorum();
        }
        let file = configure(file);
        let loaded = file.parse();
        let topology = Topology::new(&loaded.queue, &loaded.retry);
        Scenario {
            name,
            kind,
            started: Instant::now(),
            vhost_name: vhost.as_ref().map_or("/".into(), |v| v.name.clone()),
            _cleanup: DeleteQueues {
                url: url.clone(),
                queues: topology.all().map(|q| q.name.clone()).collect(),
            },
            url,
            tasks: Tasks {
                config: file.write_in(broker.dir.path()),
                done: broker.dir.path().join("done"),
            },
            file,
            topology,
            _vhost: vhost,
            broker,
        }
    }

    /// Publishes the tasks "1" to TASKS with `warren publish --stdin`, which declares the work
    /// queue as `warren run` does.
    fn publish(&self) {
        self.tasks.publish(1..=TASKS as u64);
    }

    /// Waits until `percent` of the tasks are done, and checks that some are still left, so that
    /// the fault comes in the middle of the run. Returns how many are done.
    fn wait_for_percent_done(&self, percent: usize) -> usize {
        let target = TASKS * percent / 100;
        wait_until(
            SETTLE,
            &format!("{percent}% of the tasks to be done"),
            || self.tasks.completions().len() >= target,
        );
        let done = self.tasks.distinct();
        assert!(
            done < TASKS,
            "the run ended before the fault could be injected"
        );
        done
    }

    /// Ready and unacked messages of every queue of the scenario's vhost.
    fn queue_table(&self) -> std::collections::HashMap<String, (u64, u64)> {
        queue_table(&self.vhost_name)
    }

    /// Waits until every task is done or dead-lettered and nothing is in flight, stops `warren`
    /// (which must exit 0), takes every message off the dead-letter queue, checks that no task
    /// was lost and every queue is empty, and prints the scenario's summary line.
    fn finish(&self, warren: &mut Warren, recovery: Option<Duration>) -> Tally {
        let dead_queue = self.topology.dead.name.clone();
        let mut session: Option<Session> = None;
        wait_until(
            SETTLE,
            "every task to be done or dead-lettered, with nothing in flight",
            || {
                let done = self.tasks.distinct();
                if session.is_none() {
                    session = util::session_at(&self.url).ok();
                }
                let Some(counts) = session.as_ref().map(|s| s.queue_counts(&dead_queue)) else {
                    return false;
                };
                let dead = match counts {
                    Ok((ready, _)) => ready as usize,
                    Err(_) => {
                        session = None;
                        return false;
                    }
                };
                if done + dead < TASKS {
                    return false;
                }
                let table = self.queue_table();
                self.topology.all().all(|queue| {
                    table.get(&queue.name).is_some_and(|&(ready, unacked)| {
                        unacked == 0 && (ready == 0 || queue.name == dead_queue)
                    })
                })
            },
        );
        drop(session);
        warren.signal(Signal::SIGTERM);
        let status = warren.wait_exit(Duration::from_secs(30));
        assert_eq!(status.code(), Some(0), "warren stopped cleanly: {status}");

        let session = util::session_at(&self.url).expect("connect to the scenario's vhost");
        let mut dead = Vec::new();
        while let Some(message) = session
            .get(&dead_queue)
            .expect("read the dead-letter queue")
        {
            let id = std::str::from_utf8(&message.body)
                .ok()
                .and_then(|body| body.parse::<u64>().ok())
                .unwrap_or_else(|| panic!("a dead-lettered body is not a task id: {message:?}"));
            dead.push((id, message));
        }
        drop(session);

        let tally = self.tasks.tally(TASKS as u64, dead);
        eprintln!(
            "faults: scenario={} queue={} tasks={TASKS} lost={} duplicates={} dead_lettered={} recovery={} took={:.1?}",
            self.name,
            self.kind.name(),
            tally.lost.len(),
            tally.duplicates,
            tally.dead.len(),
            recovery.map_or("n/a".into(), |r| format!("{:.2}s", r.as_secs_f64())),
            self.started.elapsed(),
        );
        tally.assert_none_lost();
        wait_until(
            Duration::from_secs(10),
            "every queue of the scenario to be empty with nothing unacked",
            || {
                let table = self.queue_table();
                self.topology
                    .all()
                    .all(|queue| table.get(&queue.name) == Some(&(0, 0)))
            },
        );
        tally
    }
}

/// Checks the outcome of a scenario whose handler always succeeds: nothing dead-lettered, and
/// no more tasks run twice than `faults` faults can explain.
fn assert_all_done(tally: &Tally, faults: usize) {
    assert!(
        tally.dead.is_empty(),
        "tasks whose handler succeeds were dead-lettered: {:?}",
        tally.dead.keys().collect::<Vec<_>>()
    );
    assert!(
        tally.duplicates <= WORKERS * faults,
        "{} duplicate completions, more than one per worker per fault ({WORKERS} x {faults})",
        tally.duplicates
    );
}

/// Deletes the scenario's queues when dropped, including retry queues with delays that
/// `BrokerLock`'s own cleanup does not know.
struct DeleteQueues {
    url: String,
    queues: Vec<String>,
}

impl Drop for DeleteQueues {
    fn drop(&mut self) {
        if let Ok(session) = util::session_at(&self.url) {
            for queue in &self.queues {
                let _ = session.delete_queue(queue);
            }
        }
    }
}

/// Waits until warren has completed a task that it received after its log line `from` (not one
/// that was already running when the fault hit) and returns the time since `since`.
fn time_to_recover(warren: &Warren, from: usize, since: Instant) -> Duration {
    wait_until(
        SETTLE,
        "warren to complete a task received after the fault",
        || fresh_completion(&warren.log()[from..]),
    );
    since.elapsed()
}

/// True when `lines` hold a "worker-N received ID" line followed by "worker-N done ID".
fn fresh_completion(lines: &[String]) -> bool {
    lines.iter().enumerate().any(|(i, line)| {
        let Some((before, after)) = line.split_once(" received ") else {
            return false;
        };
        let (Some(worker), Some(id)) = (
            before.split_whitespace().last(),
            after.split_whitespace().next(),
        ) else {
            return false;
        };
        let done = format!("{worker} done {id} ");
        lines[i + 1..].iter().any(|l| l.contains(&done))
    })
}

fn close_all_connections_twice(kind: QueueType) {
    let broker = BrokerLock::shared();
    let vhost = Vhost::create("faults");
    let scenario = Scenario::new(
        "close_all",
        broker,
        kind,
        Some(vhost),
        "/bin/sh",
        RECORD_DONE,
        |config| config,
    );
    scenario.publish();
    let mut warren = Warren::run(&scenario.tasks.config, &[]);
    let mut recovery = Duration::ZERO;
    for percent in [25, 50] {
        scenario.wait_for_percent_done(percent);
        rabbitmqctl(&[
            "close_all_connections",
            "-p",
            &scenario.vhost_name,
            "fault test",
        ]);
        let (from, since) = (warren.log().len(), Instant::now());
        recovery = recovery.max(time_to_recover(&warren, from, since));
    }
    let closed = warren
        .lines_with("closed by the broker or an operator")
        .len();
    assert!(
        closed >= WORKERS,
        "warren saw its worker connections closed ({closed} lines)"
    );
    assert_all_done(&scenario.finish(&mut warren, Some(recovery)), 2);
}

#[test]
fn no_task_is_lost_when_the_broker_closes_every_connection_twice() {
    close_all_connections_twice(QueueType::Classic);
}

#[test]
fn no_task_is_lost_when_the_broker_closes_every_connection_twice_on_a_quorum_queue() {
    close_all_connections_twice(QueueType::Quorum);
}

#[test]
fn no_task_is_lost_when_the_broker_app_stops_and_starts_again() {
    let scenario = Scenario::new(
        "stop_app",
        BrokerLock::exclusive(),
        QueueType::Classic,
        None,
        "/bin/sh",
        RECORD_DONE,
        |config| config,
    );
    scenario.publish();
    let mut warren = Warren::run(&scenario.tasks.config, &[]);
    scenario.wait_for_percent_done(30);
    let app = AppGuard::stop_app();
    warren.wait_for_log("cannot reach the broker", Duration::from_secs(20));
    // The outage itself: long enough for the reconnect backoff to grow.
    thread::sleep(Duration::from_secs(3));
    rabbitmqctl(&["start_app"]);
    let (from, since) = (warren.log().len(), Instant::now());
    let recovery = time_to_recover(&warren, from, since);
    drop(app);
    assert_all_done(&scenario.finish(&mut warren, Some(recovery)), 1);
}

fn sigkill_and_restart(kind: QueueType) {
    let scenario = Scenario::new(
        "sigkill",
        BrokerLock::shared(),
        kind,
        None,
        "/bin/sh",
        RECORD_DONE,
        |config| config,
    );
    scenario.publish();
    let mut first = Warren::run(&scenario.tasks.config, &[]);
    scenario.wait_for_percent_done(30);
    first.signal(Signal::SIGKILL);
    let status = first.wait_exit(Duration::from_secs(10));
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(9)
    );
    // The broker requeues what the dead process held once it sees its connections close.
    let work = scenario.topology.work.name.clone();
    wait_until(
        Duration::from_secs(20),
        "the broker to requeue the killed warren's tasks",
        || scenario.queue_table().get(&work).is_some_and(|q| q.1 == 0),
    );

    let since = Instant::now();
    let mut second = Warren::run(&scenario.tasks.config, &[]);
    let recovery = time_to_recover(&second, 0, since);
    assert_all_done(&scenario.finish(&mut second, Some(recovery)), 1);
}

#[test]
fn no_task_is_lost_when_warren_is_killed_and_restarted() {
    sigkill_and_restart(QueueType::Classic);
}

#[test]
fn no_task_is_lost_when_warren_is_killed_and_restarted_on_a_quorum_queue() {
    sigkill_and_restart(QueueType::Quorum);
}

#[test]
fn a_dead_network_is_noticed_by_heartbeats_and_no_task_is_lost() {
    let scenario = Scenario::new(
        "dead_network",
        BrokerLock::shared(),
        QueueType::Classic,
        None,
        "/bin/sh",
        RECORD_DONE,
        |config| config,
    );
    let heartbeat = Duration::from_secs(2);
    let proxy = Proxy::start(Proxy::free_port());
    let proxied = (scenario.file.clone())
        .url(&proxy.url())
        .set("broker.heartbeat", "2s")
        .write_in(scenario.broker.dir.path());

    scenario.publish();
    let mut warren = Warren::run(&proxied, &[]);
    scenario.wait_for_percent_done(30);
    proxy.freeze();
    let frozen = Instant::now();
    let from = warren.log().len();
    wait_until(
        Duration::from_secs(20),
        "warren to notice the dead network",
        || {
            warren.log()[from..]
                .iter()
                .any(|l| l.contains("lost the connection"))
        },
    );
    let noticed = frozen.elapsed();
    assert!(
        noticed <= 2 * heartbeat + Duration::from_secs(2),
        "warren noticed the dead network after {noticed:?}, more than two heartbeat intervals \
         ({heartbeat:?}) and some slack"
    );
    // The rest of the outage: a network that stays dead for a while, not a blip.
    thread::sleep(Duration::from_secs(8).saturating_sub(frozen.elapsed()));
    proxy.thaw();
    let (from_thaw, since) = (warren.log().len(), Instant::now());
    let recovery = time_to_recover(&warren, from_thaw, since);
    let lost: Vec<String> = warren.log()[from..from_thaw]
        .iter()
        .filter(|l| l.contains("lost the connection"))
        .cloned()
        .collect();
    eprintln!(
        "faults: scenario=dead_network noticed={:.2}s",
        noticed.as_secs_f64()
    );
    assert_all_done(&scenario.finish(&mut warren, Some(recovery)), 1);
    // An operator reading the log must be able to tell a dead network from a closed connection.
    assert!(
        lost.iter()
            .all(|l| l.contains("missed heartbeats from the broker")),
        "warren's lines about the lost connections do not say that heartbeats were missed: \
         {lost:#?}"
    );
}

/// Fails about 31% of attempts, in every way a task can fail: exit 1, exit 75, SIGKILL, a hang
/// that SIGTERM ends at handler.timeout, and a hang that ignores SIGTERM until the SIGKILL after
/// handler.kill_grace. Each attempt is recorded as "id attempt" first.
const FLAKY: &str = r#"read -r id
echo "$id $WARREN_ATTEMPT" >> "$DIR/attempts"
roll=$((RANDOM % 1000))
if [ $roll -lt 100 ]; then exit 1; fi
if [ $roll -lt 200 ]; then exit 75; fi
if [ $roll -lt 300 ]; then kill -KILL $$; fi
if [ $roll -lt 305 ]; then exec sleep 30; fi
if [ $roll -lt 310 ]; then trap '' TERM; sleep 30; fi
echo "$id" >> "$DIR/done"
"#;

const MAX_ATTEMPTS: u32 = 3;

fn random_failures(kind: QueueType) {
    let scenario = Scenario::new(
        "random_failures",
        BrokerLock::shared(),
        kind,
        None,
        "/bin/bash",
        FLAKY,
        |config| {
            config
                .set("handler.timeout", "1s")
                .set("handler.kill_grace", "1s")
                .set("retry.max_attempts", MAX_ATTEMPTS)
                .set("retry.delay", "100ms")
                .set("retry.max_delay", "400ms")
        },
    );
    let retries: Vec<&str> = scenario
        .topology
        .retries
        .iter()
        .map(|q| q.name.as_str())
        .collect();
    let work = &scenario.topology.work.name;
    assert_eq!(
        retries,
        [format!("{work}.retry.100ms"), format!("{work}.retry.200ms")],
        "max_attempts 3 means two retry steps"
    );
    scenario.publish();
    let mut warren = Warren::run(&scenario.tasks.config, &[]);
    let tally = scenario.finish(&mut warren, None);
    assert!(
        !warren.lines_with("handler.timeout").is_empty()
            && !warren.lines_with("handler.kill_grace").is_empty(),
        "some tasks hung past handler.timeout, and some of those past handler.kill_grace too"
    );

    let mut attempts: BTreeMap<u64, Vec<u32>> = BTreeMap::new();
    let path = scenario.broker.dir.path().join("attempts");
    for line in util::recorded(&path) {
        let parsed = line
            .split_once(' ')
            .and_then(|(id, attempt)| Some((id.parse().ok()?, attempt.parse().ok()?)));
        let (id, attempt) = parsed.unwrap_or_else(|| panic!("attempts holds {line:?}"));
        attempts.entry(id).or_default().push(attempt);
    }
    assert_eq!(
        tally.duplicates, 0,
        "without faults of the broker or of warren, no task ends twice"
    );
    for (id, runs) in &attempts {
        let mut sorted = runs.clone();
        sorted.sort_unstable();
        let expected: Vec<u32> = (1..=sorted.len() as u32).collect();
        assert_eq!(
            sorted, expected,
            "task {id} ran as attempts 1, 2, … once each"
        );
        if tally.dead.contains_key(id) {
            assert_eq!(
                runs.len(),
                MAX_ATTEMPTS as usize,
                "dead-lettered task {id} ran exactly max_attempts times"
            );
        } else {
            assert!(
                runs.len() <= MAX_ATTEMPTS as usize,
                "task {id} ran {} times",
                runs.len()
            );
        }
    }
    assert_eq!(attempts.len(), TASKS, "every task ran at least once");
    for (id, copies) in &tally.dead {
        let [message] = copies.as_slice() else {
            panic!("task {id} was dead-lettered {} times", copies.len());
        };
        assert!(
            !tally.done.contains_key(id),
            "task {id} was done and dead-lettered"
        );
        let header = |name: &str| message.header(name).cloned();
        assert_eq!(
            header(retry::ATTEMPTS),
            Some(Header::Int(MAX_ATTEMPTS.into())),
            "{id}: {message:?}"
        );
        assert_eq!(
            header(retry::REASON),
            Some(Header::Str(format!("failed all {MAX_ATTEMPTS} attempts"))),
            "{id}: {message:?}"
        );
        assert_eq!(header(retry::QUEUE), Some(Header::Str(work.clone())));
        let Some(Header::Str(status)) = header(retry::EXIT_STATUS) else {
            panic!("{id} has no exit status: {message:?}");
        };
        // How the last attempt ended, possibly followed by a remark such as "(asked for a
        // retry)".
        assert!(
            [
                "exit status 1",
                "exit status 75",
                "killed by signal 9 (SIGKILL)",
                "timed out after 1s"
            ]
            .iter()
            .any(|s| status == *s || status.starts_with(&format!("{s} "))),
            "{id}: unexpected exit status {status:?}"
        );
        let Some(Header::Str(at)) = header(retry::DEAD_LETTERED_AT) else {
            panic!("{id} has no dead-lettering time: {message:?}");
        };
        assert!(
            humantime::parse_rfc3339(&at).is_ok(),
            "{id}: dead-lettered at {at:?}"
        );
    }
    // About 3% of the tasks fail all three attempts (0.31³); none or all would be a bug.
    assert!(
        !tally.dead.is_empty() && tally.dead.len() < TASKS / 10,
        "{} tasks were dead-lettered",
        tally.dead.len()
    );
}

#[test]
fn tasks_that_fail_at_random_end_done_or_dead_lettered_after_exactly_max_attempts() {
    random_failures(QueueType::Classic);
}

#[test]
fn tasks_that_fail_at_random_end_done_or_dead_lettered_after_exactly_max_attempts_on_a_quorum_queue(
) {
    random_failures(QueueType::Quorum);
}
