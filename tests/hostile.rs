//! A hostile broker, for real: RabbitMQ nodes of the test's own (`util::nodes`) that enforce a
//! consumer_timeout shorter than a task, or stop answering while keeping their sockets open
//! (SIGSTOP), or count deliveries against a quorum queue's limit. Each test asserts on what the
//! broker and the handler saw: the runs a handler recorded, queue counts, dead letters and log
//! lines.

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
use util::{wait_until, Warren};
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

    fn config(&self, url: &str, sleep: &str, extra: &str) -> PathBuf {
        let path = self.dir.path().join("warren.toml");
        let text = format!(
            "[broker]\nurl = \"{url}\"\nheartbeat = \"2s\"\n\n[queue]\nname = \"{QUEUE}\"\n\n\
             [workers]\ncount = 1\n\n[handler]\nkind = \"command\"\ncommand = [\"{}\", \"{}\", \"{sleep}\"]\n\
             timeout = \"1m\"\n\n{}\n\n[control]\nsocket = \"{}\"\n{extra}",
            self.script().display(),
            self.runs_file().display(),
            util::RETRY,
            self.dir.path().join("warren.sock").display(),
        );
        fs::write(&path, text).expect("write the config");
        path
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
    let config = scratch.config(&url, "6", "");
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
    let broker = util::Broker::shared();
    let queues = util::Queues::new(&broker, "delivery-limit");
    let runs = broker.dir.path().join("runs");
    let script = broker.script("stubborn.sh", STUBBORN);
    let config = broker.config(
        &queues.work,
        &format!(
            "type = \"quorum\"\n\n[workers]\ncount = 1\n\n[handler]\nkind = \"command\"\n\
             command = [\"{}\", \"{}\"]\n\n{}",
            script.display(),
            runs.display(),
            util::RETRY
        ),
    );
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
    let broker = util::Broker::exclusive();
    let queue = broker.queue("hung");
    let runs = broker.dir.path().join("runs");
    let script = broker.script("record.sh", "#!/bin/sh\ncat >> \"$1\"\necho >> \"$1\"\n");
    let config = broker.dir.path().join("hung.toml");
    fs::write(
        &config,
        format!(
            "[broker]\nurl = \"{}\"\nheartbeat = \"2s\"\nconnect_timeout = \"2s\"\n\n\
             [queue]\nname = \"{queue}\"\n\n[workers]\ncount = 2\n\n\
             [handler]\nkind = \"command\"\ncommand = [\"{}\", \"{}\"]\n",
            util::amqp_url(),
            script.display(),
            runs.display()
        ),
    )
    .expect("write the config");
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
