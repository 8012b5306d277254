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
use std::time::Duration;

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
