//! A hostile broker, for real: one that enforces a consumer_timeout shorter than a task (it
//! closes the channel; the message comes back once, and warren fits its own timeout inside the
//! broker's), stops answering while keeping its sockets open (a SIGSTOPped node, or a network
//! gone dead: heartbeats catch it, and the task in flight is redelivered), counts deliveries
//! against a quorum queue's limit, or blocks publishers under a memory alarm (`warren publish`
//! and a worker's retry wait for it to lift instead of timing out or losing the message). Each
//! test asserts on what the broker and the handler saw: the runs a handler recorded, queue
//! counts, dead letters and log lines.
//!
//! Some tests start RabbitMQ nodes of their own (`util::nodes`); the others use the system
//! broker, through a loopback proxy (`util::Proxy`) when the network must die for one client. The
//! alarm and consumer timeout tests on the system broker change broker-wide settings, so they
//! hold the broker exclusively and restore the settings in a `Drop` guard even when they fail.

mod util;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use util::nodes::Cluster;
use util::{
    broker_address, connections_named, declare_durable, publish_ok, queue_counts, rabbitmqctl,
    ready_and_unacked, recorded, wait_until, BrokerLock, ConfigFile, Proxy, Queues, Warren,
};
use warren::amqp::Session;

const QUEUE: &str = "hostile-jobs";

/// A `command` handler that appends `$WARREN_ATTEMPT` to the file named by its first argument,
/// then sleeps for its second argument (seconds).
const SLOW: &str = "#!/bin/sh\necho \"$WARREN_ATTEMPT\" >> \"$1\"\nexec sleep \"$2\"\n";

/// A directory with the handler script and the file it records runs in.
struct Scratch {
    dir: tempfile::TempDir,
}

impl Scratch {
    fn new() -> Scratch {
        let dir = tempfile::tempdir().expect("create a temporary directory");
        let script = dir.path().join("slow.sh");
        fs::write(&script, SLOW).expect("write the handler");
        fs::set_permissions(&script, fs::Permissions::from_mode(0o755)).expect("chmod");
        Scratch { dir }
    }

    fn script(&self) -> PathBuf {
        self.dir.path().join("slow.sh")
    }

    fn runs_file(&self) -> PathBuf {
        self.dir.path().join("runs")
    }

    /// The attempts the handler recorded, one per run.
    fn runs(&self) -> Vec<String> {
        util::recorded(&self.runs_file())
    }

    fn config(&self, url: &str, sleep: &str) -> PathBuf {
        ConfigFile::at(url, QUEUE)
            .set("broker.heartbeat", "2s")
            .workers(1)
            .command_argv(&[
                &self.script().display().to_string(),
                &self.runs_file().display().to_string(),
                sleep,
            ])
            .set("handler.timeout", "1m")
            .fast_retries()
            .control(&self.dir.path().join("warren.sock"))
            .write_to(&self.dir.path().join("warren.toml"))
    }
}

fn session(url: &str) -> Session {
    util::session_at(url).unwrap_or_else(|e| panic!("cannot reach the test node at {url}: {e}"))
}

/// Ready messages and consumers of `queue` on the node at `url`.
fn counts(url: &str, queue: &str) -> (u32, u32) {
    session(url)
        .queue_counts(queue)
        .unwrap_or_else(|e| panic!("passive declare of {queue}: {e}"))
}

fn publish(config: &Path, body: &str) {
    util::publish_ok(config, &[body]);
}

/// The worker (`worker-N`) and the message id of a `worker-N received ID ...` log line.
fn received(line: &str) -> (String, String) {
    let (head, rest) = line
        .split_once(" received ")
        .unwrap_or_else(|| panic!("not a received line: {line}"));
    let worker = head.rsplit(' ').next().unwrap_or_default().to_string();
    let id = rest
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string();
    (worker, id)
}

/// Waits until `warren` has logged a line with `then` after a line with `first`.
fn wait_for_log_after(warren: &Warren, first: &str, then: &str, timeout: Duration) {
    wait_until(
        timeout,
        &format!("warren to log {then:?} after {first:?}"),
        || {
            let log = warren.log();
            log.iter()
                .position(|l| l.contains(first))
                .is_some_and(|at| log[at..].iter().any(|l| l.contains(then)))
        },
    );
}

/// A running `warren publish` whose log is collected as it comes, for publishes that must wait.
fn spawn_publish(config: &Path, args: &[&str]) -> Warren {
    Warren::spawn(
        Command::new(util::warren_bin())
            .arg("publish")
            .arg("--config")
            .arg(config)
            .args(args),
    )
}

/// A memory alarm on the broker: a high watermark of 0 makes every node blow it, and the broker
/// blocks every connection that publishes. Dropping the guard restores the watermark, so that a
/// failing test cannot leave the broker blocking every other test's publishes.
struct MemoryAlarm {
    watermark: String,
}

impl MemoryAlarm {
    fn raise() -> MemoryAlarm {
        let current = rabbitmqctl(&["eval", "vm_memory_monitor:get_vm_memory_high_watermark()."]);
        // A relative watermark (a fraction of the RAM) is restored as it was; anything else as
        // the broker's default.
        let watermark = match current.trim().parse::<f64>() {
            Ok(fraction) if fraction > 0.0 => current.trim().to_string(),
            _ => "0.4".to_string(),
        };
        let alarm = MemoryAlarm { watermark };
        rabbitmqctl(&["set_vm_memory_high_watermark", "0"]);
        alarm
    }
}

impl Drop for MemoryAlarm {
    fn drop(&mut self) {
        let restored = Command::new("rabbitmqctl")
            .args(["set_vm_memory_high_watermark", &self.watermark])
            .output();
        if !restored.is_ok_and(|out| out.status.success()) && !thread::panicking() {
            panic!(
                "could not restore the broker's memory high watermark to {}: run rabbitmqctl set_vm_memory_high_watermark {}",
                self.watermark, self.watermark
            );
        }
    }
}

/// A setting of the broker's `rabbit` application, changed for one test and restored when the
/// guard drops. Channels read these when they open, so set them before warren connects.
struct RabbitEnv {
    key: &'static str,
    original: String,
}

impl RabbitEnv {
    fn set(key: &'static str, value: &str) -> RabbitEnv {
        let current = rabbitmqctl(&["eval", &format!("application:get_env(rabbit, {key}).")]);
        let original = current
            .trim()
            .strip_prefix("{ok,")
            .and_then(|rest| rest.strip_suffix('}'))
            .unwrap_or_else(|| panic!("rabbit {key} is not set: {current}"))
            .to_string();
        let guard = RabbitEnv { key, original };
        rabbitmqctl(&[
            "eval",
            &format!("application:set_env(rabbit, {key}, {value})."),
        ]);
        guard
    }
}

impl Drop for RabbitEnv {
    fn drop(&mut self) {
        let _ = Command::new("rabbitmqctl")
            .args([
                "eval",
                &format!(
                    "application:set_env(rabbit, {}, {}).",
                    self.key, self.original
                ),
            ])
            .output();
    }
}

/// The broker enforces a consumer_timeout of 2 s, checked every half second, while warren's
/// configuration says 30 minutes and lets a task run for a minute. The first run of the task
/// outlives the broker's limit: the broker closes the channel and requeues the message. warren
/// learns the real limit from the broker's reason and fits its own timeout inside it, so the
/// message comes back once, its attempts end by warren's timeout, and it is dead-lettered with
/// that reason: one redelivery, one reconnect, no loop.
#[test]
fn a_broker_consumer_timeout_shorter_than_a_task_ends_in_one_redelivery_and_no_restart_loop() {
    let cluster = Cluster::start_with(1, "consumer_timeout = 2000");
    let node = cluster.node(0);
    // New channels check their deliveries every 500 ms instead of every minute.
    node.rabbitmqctl(&[
        "eval",
        "application:set_env(rabbit, channel_tick_interval, 500).",
    ]);
    let url = node.amqp_url();
    let scratch = Scratch::new();
    let config = scratch.config(&url, "6");
    let warren = Warren::spawn(
        Command::new(util::warren_bin())
            .args(["run", "--config"])
            .arg(&config)
            .env("RUST_LOG", "info"),
    );
    wait_until(Duration::from_secs(30), "warren to consume", || {
        session(&url)
            .queue_counts(QUEUE)
            .is_ok_and(|(_, consumers)| consumers == 1)
    });
    publish(&config, "slow");

    let dead = format!("{QUEUE}.dead");
    wait_until(
        Duration::from_secs(60),
        "the task to be dead-lettered",
        || counts(&url, &dead).0 == 1,
    );
    assert_eq!(
        scratch.runs(),
        ["1", "1", "2", "3"],
        "the first run, the broker's one redelivery (still attempt 1), then attempts 2 and 3"
    );
    let fitted = warren.lines_with("outlived its consumer_timeout of 2s, not the 30m");
    assert_eq!(fitted.len(), 1, "one error line: {fitted:?}");
    assert!(
        fitted[0].contains("tasks get handler.timeout 1s and handler.kill_grace 500ms"),
        "{}",
        fitted[0]
    );
    assert_eq!(
        warren.lines_with("restarting it in").len(),
        1,
        "one reconnect, after the broker closed the channel"
    );
    let message = session(&url)
        .get(&dead)
        .expect("basic.get")
        .expect("the dead letter");
    util::assert_dead_letter_headers(
        &message,
        QUEUE,
        "failed all 3 attempts",
        "timed out after 1s",
        3,
    );
    assert_eq!(counts(&url, QUEUE).0, 0, "nothing left in the work queue");
    warren.stop(Duration::from_secs(15));
}

/// A `command` handler for the delivery-limit test: it records `BODY ATTEMPT`, fails at once on
/// the last attempt of `fails-last`, and otherwise works for 3 s. The test closes the worker's
/// connection as soon as a run starts; the worker notices when it tries to ack.
const STUBBORN: &str = "#!/bin/sh\nbody=$(cat)\necho \"$body $WARREN_ATTEMPT\" >> \"$1\"\n\
if [ \"$body\" = fails-last ] && [ \"$WARREN_ATTEMPT\" = 3 ]; then exit 3; fi\nexec sleep 3\n";

/// A quorum queue counts every delivery that ends without an ack (here: the worker's connection
/// closed mid-task) against `x-delivery-limit` (`retry.max_attempts - 1`). warren counts them
/// too, in its attempt number, so the two never disagree about the last attempt: a message whose
/// last attempt fails is dead-lettered by warren with its reason, and one whose last delivery
/// is lost too is dead-lettered by the broker into the same queue. Neither is dropped.
#[test]
fn a_quorum_queue_delivery_limit_never_drops_a_message_that_belongs_in_the_dead_letter_queue() {
    let broker = BrokerLock::shared();
    let queues = Queues::new(&broker, "delivery-limit");
    let runs = broker.dir.path().join("runs");
    let script = broker.script("stubborn.sh", STUBBORN);
    let config = ConfigFile::new(&queues.work)
        .quorum()
        .workers(1)
        .command_argv(&[&script.display().to_string(), &runs.display().to_string()])
        .fast_retries()
        .write_in(broker.dir.path());
    let warren = Warren::run(&config, &[]);
    warren.wait_consuming(&queues.work, 1);
    let recorded = || util::recorded(&runs);
    // Cuts the worker's connection once the handler has started run `run` of `body`.
    let cut_during = |body: &str, attempt: u32| {
        let line = format!("{body} {attempt}");
        wait_until(Duration::from_secs(20), &format!("run {line:?}"), || {
            recorded().contains(&line)
        });
        for connection in util::connections_of(warren.pid()) {
            util::rabbitmqctl(&["close_connection", &connection, "hostile test"]);
        }
    };

    util::publish_ok(&config, &["fails-last"]);
    cut_during("fails-last", 1);
    cut_during("fails-last", 2);
    wait_until(
        Duration::from_secs(20),
        "fails-last in the dead-letter queue",
        || util::queue_counts(&queues.dead).0 == 1,
    );
    util::assert_dead_letter_headers(
        &util::take_only(&queues.dead),
        &queues.work,
        "failed all 3 attempts",
        "exit status 3",
        3,
    );

    util::publish_ok(&config, &["never-ends"]);
    cut_during("never-ends", 1);
    cut_during("never-ends", 2);
    cut_during("never-ends", 3);
    wait_until(
        Duration::from_secs(20),
        "never-ends in the dead-letter queue",
        || util::queue_counts(&queues.dead).0 == 1,
    );
    let dead = util::take_only(&queues.dead);
    assert_eq!(dead.body, b"never-ends");
    let death = dead
        .header("x-death")
        .unwrap_or_else(|| panic!("the broker dead-lettered it, with x-death: {dead:?}"));
    assert!(
        format!("{death:?}").contains("delivery_limit"),
        "x-death says delivery_limit: {death:?}"
    );
    assert_eq!(
        recorded(),
        [
            "fails-last 1",
            "fails-last 2",
            "fails-last 3",
            "never-ends 1",
            "never-ends 2",
            "never-ends 3"
        ],
        "each delivery ran once, with warren's attempt counting the broker's deliveries"
    );
    wait_until(
        Duration::from_secs(20),
        "nothing left in the work queue",
        || util::ready_and_unacked(&queues.work) == (0, 0),
    );
    warren.stop(Duration::from_secs(15));
}

/// The system broker's Erlang VM, stopped with SIGSTOP while the guard lives and continued with
/// SIGCONT when it drops, a failing test included.
struct Frozen(i32);

impl Frozen {
    fn broker() -> Frozen {
        let out = util::rabbitmqctl(&["eval", "os:getpid()."]);
        let pid: i32 = out
            .trim()
            .trim_matches('"')
            .parse()
            .unwrap_or_else(|_| panic!("the broker's pid from {out:?}"));
        signal_pid(pid, Signal::SIGSTOP);
        Frozen(pid)
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        signal_pid(self.0, Signal::SIGCONT);
    }
}

fn signal_pid(pid: i32, signal: Signal) {
    kill(Pid::from_raw(pid), signal).unwrap_or_else(|e| panic!("kill -{signal} {pid}: {e}"));
}

/// A broker that stops answering but keeps its sockets open (its VM SIGSTOPped, as a hung or
/// swapped-out node) is detected by heartbeats within two heartbeat intervals; with no other
/// node to go to, the workers wait, reconnecting with a timeout, and consume again once the VM
/// is continued. Nothing is lost.
#[test]
fn a_hung_broker_is_detected_within_two_heartbeats_and_workers_resume_when_it_returns() {
    let broker = BrokerLock::exclusive();
    let queue = broker.queue("hung");
    let runs = broker.dir.path().join("runs");
    let script = broker.script("record.sh", "#!/bin/sh\ncat >> \"$1\"\necho >> \"$1\"\n");
    let config = ConfigFile::new(&queue)
        .set("broker.heartbeat", "2s")
        .set("broker.connect_timeout", "2s")
        .workers(2)
        .command_argv(&[&script.display().to_string(), &runs.display().to_string()])
        .write_to(&broker.dir.path().join("hung.toml"));
    let warren = Warren::run(&config, &[]);
    warren.wait_consuming(&queue, 2);
    util::publish_ok(&config, &["before-1", "before-2"]);
    wait_until(
        Duration::from_secs(20),
        "the first messages to be done",
        || util::recorded(&runs).len() == 2,
    );

    let frozen = Frozen::broker();
    let stopped = Instant::now();
    wait_until(
        Duration::from_secs(20),
        "both workers to miss the broker's heartbeats",
        || warren.lines_with("missed heartbeats from the broker").len() >= 2,
    );
    let detected = stopped.elapsed();
    // Two intervals, and the time for the worker to log it.
    assert!(
        detected <= Duration::from_secs(4) + Duration::from_millis(1500),
        "detected after {detected:?}, more than two 2s heartbeats"
    );
    // Hung, the broker still accepts TCP connections (the kernel does), but never logs them in.
    thread::sleep(Duration::from_secs(5));
    drop(frozen);
    let continued = Instant::now();
    // The broker still lists the old consumers until it notices their connections are gone:
    // the workers' own log says when they consume again.
    warren.wait_for_count(" is consuming queue ", 4, Duration::from_secs(30));
    eprintln!(
        "hung broker: detected after {detected:.1?}; consuming again {:.1?} after SIGCONT",
        continued.elapsed()
    );
    util::publish_ok(&config, &["after-1", "after-2"]);
    wait_until(
        Duration::from_secs(20),
        "the later messages to be done",
        || util::recorded(&runs).len() == 4,
    );
    let mut done = util::recorded(&runs);
    done.sort();
    assert_eq!(done, ["after-1", "after-2", "before-1", "before-2"]);
    assert_eq!(util::ready_and_unacked(&queue), (0, 0));
    warren.stop(Duration::from_secs(15));
}

#[test]
fn a_dead_network_is_caught_by_heartbeats_and_the_task_in_flight_is_redelivered() {
    let broker = BrokerLock::shared();
    let queue = broker.queue("heartbeat");
    let direct = ConfigFile::new(&queue).dots().write_in(broker.dir.path());
    let proxy = Proxy::start(Proxy::free_port());
    let config = ConfigFile::new(&queue)
        .url(&proxy.url())
        .set("broker.heartbeat", "2s")
        .workers(2)
        .dots()
        .write_in(broker.dir.path());

    let mut warren = Warren::run(&config, &[]);
    warren.wait_consuming(&queue, 2);
    // Six seconds of work: longer than the two heartbeat intervals it takes to notice the
    // network is dead, so the task is still running when its connection goes.
    publish_ok(&direct, &["in flight......"]);
    let (holder, id) = received(&warren.wait_for_log("received", Duration::from_secs(10)));

    let marker = format!(" pid {}\"", warren.pid());
    let before: Vec<String> = connections_named(&marker)
        .into_iter()
        .map(|(conn, _)| conn)
        .collect();
    assert_eq!(
        before.len(),
        4,
        "a consuming and a publishing connection per worker: {before:?}"
    );

    let frozen = Instant::now();
    proxy.freeze();
    let lost = format!("lost the connection to 127.0.0.1:{}", proxy.port);
    let detected = warren.wait_for_log(&lost, Duration::from_secs(10));
    let took = frozen.elapsed();
    eprintln!("the dead network was noticed after {took:.2?}: {detected}");
    assert!(
        took >= Duration::from_secs(1),
        "the connection was given up after {took:?}, before any heartbeat was missed: {detected}"
    );

    // Thaw only once the broker, too, has given up on every connection that went silent, and
    // so requeued the message: a network that came back sooner would let the first run's ack
    // through on its old connection, which is right but not what this test is about.
    wait_until(
        Duration::from_secs(20),
        "the broker to close warren's silent connections",
        || {
            let now = connections_named(&marker);
            !now.iter().any(|(conn, _)| before.contains(conn))
        },
    );
    eprintln!(
        "the broker closed the silent connections after {:.2?}",
        frozen.elapsed()
    );
    proxy.thaw();
    // The message may run again while its first run is still going: at least once, not exactly
    // once.
    let (rerun_by, _) = received(&warren.wait_for_log(
        &format!("received {id} (attempt 1, redelivered)"),
        Duration::from_secs(30),
    ));
    let line = warren.wait_for_log(
        &format!("{holder} could not settle {id}"),
        Duration::from_secs(20),
    );
    assert!(
        line.contains(&lost),
        "the first run's ack had no connection to go to: {line}"
    );
    wait_for_log_after(
        &warren,
        &format!("received {id} (attempt 1, redelivered)"),
        &format!("{rerun_by} done {id}"),
        Duration::from_secs(20),
    );

    warren.wait_consuming(&queue, 2);
    publish_ok(&direct, &["after the network came back"]);
    let (_, after) =
        received(&warren.wait_for_log("\"after the network came back\"", Duration::from_secs(20)));
    warren.wait_for_log(&format!("done {after}"), Duration::from_secs(20));

    warren.signal(Signal::SIGTERM);
    assert_eq!(warren.wait_exit(Duration::from_secs(10)).code(), Some(0));
    assert_eq!(ready_and_unacked(&queue), (0, 0));
    // Checked last, so that the recovery above is checked even if the reason is missing.
    let reasons = warren.lines_with(&lost);
    assert!(
        reasons
            .iter()
            .any(|l| l.contains("missed heartbeats from the broker")),
        "the log says why the connection was given up: {reasons:#?}"
    );
}

#[test]
fn publish_waits_out_a_memory_alarm_longer_than_its_confirm_timeout() {
    let broker = BrokerLock::exclusive();
    let queue = broker.queue("alarm");
    let config = ConfigFile::new(&queue).write_in(broker.dir.path());
    // The queue exists before the alarm, so that only the publish itself is held.
    declare_durable(&queue);

    let alarm = MemoryAlarm::raise();
    let mut publish = spawn_publish(&config, &["--confirm-timeout", "2s", "held back"]);
    let line = publish.wait_for_log("blocked publishing", Duration::from_secs(20));
    assert!(line.contains("waiting until it lifts the alarm"), "{line}");
    // The fault must outlast the confirm timeout: time blocked by an alarm does not count.
    thread::sleep(Duration::from_secs(4));
    assert!(
        publish.lines_with("ERROR").is_empty(),
        "publish gave up during the alarm: {:#?}",
        publish.log()
    );
    assert_eq!(
        queue_counts(&queue).0,
        0,
        "the broker holds the publish back while the alarm lasts"
    );

    drop(alarm);
    let status = publish.wait_exit(Duration::from_secs(20));
    assert_eq!(status.code(), Some(0), "{:#?}", publish.log());
    assert_eq!(queue_counts(&queue).0, 1, "the message was stored");
}

#[test]
fn a_retry_published_during_a_memory_alarm_waits_for_it_to_lift_and_is_not_lost() {
    let broker = BrokerLock::exclusive();
    let queue = broker.queue("alarmretry");
    let go = broker.dir.path().join("go");
    let attempts = broker.dir.path().join("attempts");
    // The first attempt fails, once the test says so; the second succeeds.
    let script = broker.script(
        "fails-once.sh",
        &format!(
            "echo \"$WARREN_ATTEMPT\" >> {attempts}\n\
             if [ \"$WARREN_ATTEMPT\" = 1 ]; then\n\
               while [ ! -e {go} ]; do sleep 0.05; done\n\
               exit 1\n\
             fi\n\
             exit 0",
            attempts = attempts.display(),
            go = go.display()
        ),
    );
    let config = ConfigFile::new(&queue)
        .workers(1)
        .command(&script)
        .set("retry.max_attempts", 2)
        .set("retry.delay", "1s")
        .write_in(broker.dir.path());
    let retry_queue = format!("{queue}.retry.1s");

    let mut warren = Warren::run(&config, &[]);
    warren.wait_consuming(&queue, 1);
    publish_ok(&config, &["retried"]);
    warren.wait_for_log("received", Duration::from_secs(10));

    let alarm = MemoryAlarm::raise();
    fs::write(&go, "").expect("tell the task to fail");
    warren.wait_for_log("(attempt 1 of 2)", Duration::from_secs(10));
    let line = warren.wait_for_log("blocked publishing", Duration::from_secs(20));
    assert!(line.contains("waiting until it lifts the alarm"), "{line}");
    assert_eq!(
        ready_and_unacked(&queue),
        (0, 1),
        "the worker holds the original until its copy is confirmed"
    );
    assert_eq!(ready_and_unacked(&retry_queue), (0, 0));

    drop(alarm);
    warren.wait_for_log("unblocked publishing", Duration::from_secs(20));
    warren.wait_for_log("(attempt 2)", Duration::from_secs(20));
    warren.wait_for_count(" done ", 1, Duration::from_secs(20));
    assert_eq!(recorded(&attempts), ["1", "2"]);
    assert!(
        warren.lines_with("could not move").is_empty(),
        "the copy was not given up on: {:#?}",
        warren.log()
    );

    warren.signal(Signal::SIGTERM);
    assert_eq!(warren.wait_exit(Duration::from_secs(10)).code(), Some(0));
    assert_eq!(ready_and_unacked(&queue), (0, 0));
    assert_eq!(ready_and_unacked(&retry_queue), (0, 0));
    assert_eq!(ready_and_unacked(&format!("{queue}.dead")), (0, 0));
}

#[test]
fn a_channel_closed_by_the_broker_consumer_timeout_is_reopened_and_the_message_redelivered() {
    let broker = BrokerLock::exclusive();
    let queue = broker.queue("brokertimeout");
    // The broker checks its consumer timeout on each channel tick, once a minute by default.
    let _timeout = RabbitEnv::set("consumer_timeout", "2000");
    let _tick = RabbitEnv::set("channel_tick_interval", "500");
    // The first delivery outlasts the broker's timeout; the redelivery is quick.
    let script = broker.script(
        "slow-first.sh",
        "if [ \"$WARREN_REDELIVERED\" = 1 ]; then exit 0; fi\nsleep 6",
    );
    let config = ConfigFile::new(&queue)
        .workers(1)
        .command(&script)
        .write_in(broker.dir.path());

    let mut warren = Warren::run(&config, &[]);
    warren.wait_consuming(&queue, 1);
    publish_ok(&config, &["slow"]);
    let (_, id) = received(&warren.wait_for_log("received", Duration::from_secs(10)));
    let line = warren.wait_for_log("could not settle", Duration::from_secs(20));
    assert!(
        line.contains("closed the channel: a task outlived its consumer_timeout (2s)"),
        "the broker's reason and limit are logged: {line}"
    );
    warren.wait_for_log(
        &format!(
            "worker-1: the broker at {} closed the channel",
            broker_address()
        ),
        Duration::from_secs(5),
    );
    // The 6 s handler does not fit the broker's 2 s: warren fits it, once.
    assert_eq!(
        warren
            .lines_with("outlived its consumer_timeout of 2s, not the 30m")
            .len(),
        1
    );
    wait_for_log_after(
        &warren,
        &format!("received {id} (attempt 1, redelivered)"),
        &format!("done {id}"),
        Duration::from_secs(20),
    );

    warren.signal(Signal::SIGTERM);
    assert_eq!(warren.wait_exit(Duration::from_secs(10)).code(), Some(0));
    assert_eq!(ready_and_unacked(&queue), (0, 0));
}
