//! warren on a real 3-node RabbitMQ cluster with a quorum queue, while nodes fail: thousands of
//! numbered tasks go through three `warren run` processes (standing in for three hosts, 4
//! workers each, `broker.urls` listing every node) while the node leading the queue is killed
//! with SIGKILL, the nodes are restarted one by one with a publisher running, or one node is
//! down for the whole run.
//!
//! Every scenario checks that no task was lost (each was completed; none dead-lettered, since
//! the handler always succeeds), counts duplicates, and measures the longest pause in
//! processing: the longest gap between two completions. Each prints one line, `cluster:
//! scenario=... tasks=N node_failures=N lost=0 duplicates=N longest_pause=T`, whose figures
//! RELIABILITY.md quotes; run `cargo test --test cluster -- --nocapture 2>&1 | grep '^cluster:'`.
//!
//! The nodes are extra RabbitMQ nodes on this machine (tests/util/nodes.rs); the system broker
//! is not involved. Tests that use extra nodes run one at a time.

mod util;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use util::nodes::Cluster;
use util::tally::{Publisher, Tally, Tasks};
use util::{wait_until, ConfigFile, Warren};

const QUEUE: &str = "cluster-jobs";
/// warren processes, each standing in for a host.
const HOSTS: usize = 3;
const WORKERS: usize = 4;
/// How long the work may take to finish once the faults are over.
const SETTLE: Duration = Duration::from_secs(120);

/// The handler: a `pipe` program that, for each task, waits a little, appends `ID TIME` to the
/// file named by its first argument (one write, so lines of many programs do not mix) and acks.
const RECORDER: &str = r#"import json, sys, time
done = open(sys.argv[1], "ab", buffering=0)
delay = float(sys.argv[2])
tasks = sys.stdin.buffer
while True:
    header = tasks.readline()
    if not header:
        break
    header = json.loads(header)
    body = tasks.read(header["size"])
    time.sleep(delay)
    done.write(b"%s %.6f\n" % (body, time.time()))
    sys.stdout.write("%d ack\n" % header["tag"])
    sys.stdout.flush()
"#;

/// One scenario: a fresh 3-node cluster, a config that lists every node, and the file the
/// handlers record completions in.
struct Scenario {
    name: &'static str,
    started: Instant,
    tasks: Tasks,
    _dir: tempfile::TempDir,
    // Last: the nodes stop (and the nodes lock is released) after everything else.
    cluster: Cluster,
}

impl Scenario {
    /// Starts the cluster and writes the config: a quorum queue, 4 workers with prefetch 1, and
    /// the recorder, which spends `delay` per task.
    fn new(name: &'static str, delay: Duration) -> Scenario {
        let cluster = Cluster::start(3);
        let dir = tempfile::tempdir().expect("create a temporary directory");
        let recorder = dir.path().join("recorder.py");
        fs::write(&recorder, RECORDER).unwrap();
        fs::set_permissions(&recorder, fs::Permissions::from_mode(0o644)).unwrap();
        let done = dir.path().join("done");
        let config = ConfigFile::new(QUEUE)
            .urls(&cluster.urls())
            .set("broker.connect_timeout", "3s")
            .quorum()
            .workers(WORKERS)
            .prefetch(1)
            .pipe(&[
                "python3",
                &recorder.display().to_string(),
                &done.display().to_string(),
                &delay.as_secs_f64().to_string(),
            ])
            .write_to(&dir.path().join("warren.toml"));
        Scenario {
            name,
            started: Instant::now(),
            tasks: Tasks { config, done },
            _dir: dir,
            cluster,
        }
    }

    /// Starts the `warren run` processes and waits until all their workers consume.
    fn start_warrens(&self) -> Vec<Warren> {
        let warrens: Vec<Warren> = (0..HOSTS)
            .map(|_| {
                Warren::spawn(
                    Command::new(util::warren_bin())
                        .args(["run", "--config"])
                        .arg(&self.tasks.config)
                        .env("RUST_LOG", "info"),
                )
            })
            .collect();
        wait_until(
            Duration::from_secs(60),
            "every worker of every warren to consume",
            || {
                self.queue_info(QUEUE)
                    .is_some_and(|(_, _, consumers)| consumers == HOSTS * WORKERS)
            },
        );
        warrens
    }

    /// Waits until every task `1..=tasks` is done and the queues are empty with nothing
    /// unacked, stops the warrens (each must exit 0), and checks and reports the outcome.
    fn finish(&self, warrens: Vec<Warren>, tasks: u64, node_failures: usize) -> Tally {
        self.tasks.wait_done(tasks as usize, SETTLE);
        wait_until(
            Duration::from_secs(30),
            "the work and dead-letter queues to be empty with nothing unacked",
            || {
                let dead = format!("{QUEUE}.dead");
                [QUEUE, dead.as_str()].iter().all(|queue| {
                    self.queue_info(queue)
                        .is_some_and(|(ready, unacked, _)| ready == 0 && unacked == 0)
                })
            },
        );
        for mut warren in warrens {
            warren.signal(Signal::SIGTERM);
            let status = warren.wait_exit(Duration::from_secs(30));
            assert_eq!(status.code(), Some(0), "warren stopped cleanly: {status}");
        }
        let tally = self.tasks.tally(tasks, Vec::new());
        eprintln!(
            "cluster: scenario={} tasks={tasks} node_failures={node_failures} lost={} duplicates={} longest_pause={:.2}s took={:.1?}",
            self.name,
            tally.lost.len(),
            tally.duplicates,
            tally.longest_pause.expect("invariant: the recorder writes each task's time"),
            self.started.elapsed()
        );
        tally.assert_none_lost();
        tally
    }

    /// Ready and unacked messages and consumers of `queue`, from the first node that answers
    /// `list_queues`.
    fn queue_info(&self, queue: &str) -> Option<(u64, u64, usize)> {
        self.cluster.nodes().iter().find_map(|node| {
            let queues = node.queues(Duration::from_secs(15))?;
            let found = queues.into_iter().find(|q| q.name == queue)?;
            Some((found.ready, found.unacked, found.consumers))
        })
    }
}

/// Feeds task ids to a publisher at about `per_second` from a thread, until stopped.
struct Feed {
    stop: Arc<AtomicBool>,
    fed: Arc<AtomicU64>,
    thread: Option<thread::JoinHandle<Publisher>>,
}

impl Feed {
    fn start(mut publisher: Publisher, per_second: u64) -> Feed {
        let stop = Arc::new(AtomicBool::new(false));
        let fed = Arc::new(AtomicU64::new(0));
        let (stop2, fed2) = (Arc::clone(&stop), Arc::clone(&fed));
        let thread = thread::spawn(move || {
            let started = Instant::now();
            while !stop2.load(Ordering::Relaxed) {
                let due = (started.elapsed().as_secs_f64() * per_second as f64) as u64;
                let from = fed2.load(Ordering::Relaxed);
                if due > from {
                    let lines: String = (from + 1..=due).map(|id| format!("{id}\n")).collect();
                    publisher.write(&lines);
                    fed2.store(due, Ordering::Relaxed);
                }
                thread::sleep(Duration::from_millis(20));
            }
            publisher
        });
        Feed {
            stop,
            fed,
            thread: Some(thread),
        }
    }

    fn fed(&self) -> u64 {
        self.fed.load(Ordering::Relaxed)
    }

    /// Stops feeding; returns how many ids were fed and the publisher's log once it has exited 0.
    fn finish(mut self) -> (u64, String) {
        self.stop.store(true, Ordering::Relaxed);
        let publisher = self.thread.take().unwrap().join().expect("the feed thread");
        let log = publisher.finish();
        (self.fed(), log)
    }
}

/// How many messages `warren publish` says it published again after a lost connection.
fn republished(log: &str) -> usize {
    log.lines()
        .flat_map(|line| line.split(" ("))
        .find_map(|part| {
            part.strip_suffix(
                " published again after a lost connection: the queue may hold duplicates)",
            )
        })
        .map_or(0, |n| n.parse().expect("a count"))
}

#[test]
fn three_warrens_drain_a_quorum_queue_through_every_node() {
    const TASKS: u64 = 3000;
    let scenario = Scenario::new("three-hosts", Duration::from_millis(2));
    let warrens = scenario.start_warrens();
    scenario.tasks.publish(1..=TASKS);
    // Each warren spreads its 4 workers over the 3 nodes, two connections per worker.
    let counts: Vec<usize> = scenario
        .cluster
        .nodes()
        .iter()
        .map(|node| node.connection_count())
        .collect();
    assert!(
        counts.iter().all(|&n| n >= 2),
        "every node has connections: {counts:?}"
    );
    assert_eq!(
        counts.iter().sum::<usize>(),
        HOSTS * WORKERS * 2,
        "{counts:?}"
    );
    let tally = scenario.finish(warrens, TASKS, 0);
    assert_eq!(tally.duplicates, 0, "no fault, no duplicates");
}

#[test]
fn killing_the_quorum_leader_mid_run_loses_nothing() {
    const TASKS: u64 = 4000;
    let scenario = Scenario::new("kill-leader", Duration::from_millis(10));
    let warrens = scenario.start_warrens();
    let leader = scenario.cluster.quorum_leader(QUEUE);
    scenario.tasks.publish(1..=TASKS);
    scenario.tasks.wait_done(TASKS as usize * 3 / 10, SETTLE);
    let done_at_kill = scenario.tasks.distinct();
    scenario.cluster.node(leader).kill9();
    assert!(
        done_at_kill < TASKS as usize,
        "the run ended before the fault"
    );
    // The queue stays available: a new leader is elected and the drain goes on without the node.
    scenario.tasks.wait_done(TASKS as usize, SETTLE);
    let new_leader = scenario.cluster.quorum_leader(QUEUE);
    assert_ne!(new_leader, leader, "another node leads the queue");
    scenario.cluster.node(leader).restart();
    scenario.cluster.wait_all_running(Duration::from_secs(60));
    let tally = scenario.finish(warrens, TASKS, 1);
    assert!(
        tally.duplicates <= HOSTS * WORKERS,
        "at most one duplicate per worker: {}",
        tally.duplicates
    );
}

/// Continues a SIGSTOPped node's VM when dropped, a failing test included.
struct Frozen(i32);

impl Drop for Frozen {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.0), Signal::SIGCONT);
    }
}

/// A node that hangs (its VM SIGSTOPped: sockets open, nothing answers) is noticed by the
/// workers on it within two heartbeat intervals; they move to the other nodes and the work goes
/// on while it hangs, with a publisher feeding tasks throughout. The hung node is a follower of
/// the queue, so the queue keeps its majority; it hangs for less than the Erlang distribution's
/// tick (60 s), so it comes back into the cluster rather than partitioned from it.
#[test]
fn a_hung_node_is_left_within_two_heartbeats_and_nothing_is_lost() {
    let scenario = Scenario::new("hung-node", Duration::from_millis(5));
    let warrens = scenario.start_warrens();
    let hung = (scenario.cluster.quorum_leader(QUEUE) + 1) % 3;
    let feed = Feed::start(Publisher::start(&scenario.tasks.config), 150);
    scenario.tasks.wait_done(300, SETTLE);
    let pid = scenario.cluster.node(hung).os_pid().expect("the node runs");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), Signal::SIGSTOP)
        .expect("SIGSTOP the node");
    let frozen = Frozen(pid);
    let stopped = Instant::now();
    let missed = || {
        (warrens.iter())
            .map(|w| w.lines_with("missed heartbeats from the broker").len())
            .sum::<usize>()
    };
    wait_until(
        Duration::from_secs(20),
        "a worker to miss heartbeats",
        || missed() > 0,
    );
    let detected = stopped.elapsed();
    // The config's heartbeat is 5 s: two intervals, and the time to log it.
    assert!(
        detected <= Duration::from_secs(12),
        "noticed after {detected:?}, more than two 5 s heartbeats"
    );
    // The workers that were on it consume from the others: tasks fed after the detection are done
    // while it still hangs.
    let before = scenario.tasks.distinct();
    scenario
        .tasks
        .wait_done(before + 200, Duration::from_secs(30));
    let hung_for = stopped.elapsed();
    drop(frozen);
    eprintln!(
        "cluster: scenario=hung-node detected={:.1}s hung_for={:.1}s missed_heartbeat_lines={}",
        detected.as_secs_f64(),
        hung_for.as_secs_f64(),
        missed()
    );
    scenario.cluster.wait_all_running(Duration::from_secs(60));
    let (tasks, log) = feed.finish();
    let republished = republished(&log);
    let tally = scenario.finish(warrens, tasks, 1);
    assert!(
        tally.duplicates <= HOSTS * WORKERS + republished,
        "at most one duplicate per worker, and the publisher's {republished} copies: {}",
        tally.duplicates
    );
}

#[test]
fn a_rolling_restart_with_a_publisher_running_loses_nothing() {
    let scenario = Scenario::new("rolling-restart", Duration::from_millis(5));
    let warrens = scenario.start_warrens();
    let feed = Feed::start(Publisher::start(&scenario.tasks.config), 150);
    scenario.tasks.wait_done(300, SETTLE);
    for i in 0..3 {
        let node = scenario.cluster.node(i);
        node.stop_app();
        // Work goes on while the node is down.
        let before = scenario.tasks.distinct();
        scenario.tasks.wait_done(before + 200, SETTLE);
        node.start_app();
        scenario.cluster.wait_all_running(Duration::from_secs(60));
        let before = scenario.tasks.distinct();
        scenario.tasks.wait_done(before + 200, SETTLE);
    }
    // Workers that lose their node go to the least used of the others, so the restart does not
    // end with them all on one node (moving each to the next node would put all on node 0).
    let mut counts = Vec::new();
    util::wait_until(
        Duration::from_secs(30),
        "the workers' connections to be spread over two nodes",
        || {
            counts = (scenario.cluster.nodes().iter())
                .map(|node| node.connection_count())
                .collect();
            counts.iter().filter(|&&n| n >= HOSTS * WORKERS / 2).count() >= 2
        },
    );
    eprintln!("cluster: scenario=rolling-restart connections_after={counts:?}");
    let (tasks, log) = feed.finish();
    assert!(tasks >= 1000, "the publisher ran throughout: {tasks} tasks");
    assert!(
        log.contains("publishing again through another node"),
        "the publisher failed over at least once: {log}"
    );
    // Copies the publisher sent again after losing its node are duplicates too.
    let republished = republished(&log);
    let tally = scenario.finish(warrens, tasks, 3);
    eprintln!("cluster: scenario=rolling-restart republished={republished}");
    assert!(
        tally.duplicates <= 3 * HOSTS * WORKERS + republished,
        "at most one duplicate per worker per restart, and the publisher's {republished} copies: {}",
        tally.duplicates
    );
}

#[test]
fn one_node_down_for_the_whole_run_loses_nothing() {
    const TASKS: u64 = 3000;
    let scenario = Scenario::new("one-node-down", Duration::from_millis(2));
    let down = scenario.cluster.node(2);
    down.stop_app();
    let warrens = scenario.start_warrens();
    let feed = Feed::start(Publisher::start(&scenario.tasks.config), 1000);
    wait_until(SETTLE, "the publisher to feed every task", || {
        feed.fed() >= TASKS
    });
    // The feed may overshoot a little: every task it fed counts.
    let (tasks, _) = feed.finish();
    for warren in &warrens {
        assert!(
            !warren.lines_with("failing over to").is_empty(),
            "each warren has a worker whose first node was the stopped one: {:#?}",
            warren.log()
        );
    }
    let tally = scenario.finish(warrens, tasks, 1);
    assert_eq!(
        tally.duplicates, 0,
        "a node that is down from the start costs nothing"
    );
    down.start_app();
}

#[test]
fn a_classic_queue_whose_node_is_down_is_waited_for_not_fatal() {
    // Clustered as an operator adds a node (stop_app, join_cluster, start_app); the queue must
    // be seen from the other node for the test to pass.
    let cluster = Cluster::start_joined_by_hand(2);
    let dir = tempfile::tempdir().unwrap();
    let done = dir.path().join("done");
    let recorder = dir.path().join("recorder.py");
    fs::write(&recorder, RECORDER).unwrap();
    let write_config = |name: &str, urls: &[String]| {
        ConfigFile::at_nodes(urls, QUEUE)
            .workers(1)
            .pipe(&[
                "python3",
                &recorder.display().to_string(),
                &done.display().to_string(),
                "0",
            ])
            .write_to(&dir.path().join(name))
    };
    // The classic queue (and its retry and dead-letter queues) live on node 1, which declared them.
    let on_first = write_config("first.toml", &cluster.urls()[..1]);
    let (status, log) = util::publish(&on_first, &["1"]);
    assert!(status.success(), "publish through node 1: {log}");
    cluster.node(0).stop_app();

    let both = write_config("both.toml", &cluster.urls());
    // The operator's check does not call the queue missing: it says where it is.
    let check = util::warren_command(&["check-config", "--connect", "--config"])
        .arg(&both)
        .output()
        .expect("run warren check-config");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );
    assert_ne!(check.status.code(), Some(0), "{said}");
    assert!(
        said.contains("is down or inaccessible") && !said.contains("missing;"),
        "{said}"
    );
    let mut warren = Warren::run(&both, &[]);
    let line = warren.wait_for_log("is down or inaccessible", Duration::from_secs(30));
    assert!(
        line.contains("restarting it in"),
        "retried, not fatal: {line}"
    );
    assert!(
        warren.lines_with("ERROR").is_empty(),
        "nothing fatal: {:#?}",
        warren.log()
    );
    cluster.node(0).start_app();
    wait_until(Duration::from_secs(60), "the task to be done", || {
        fs::read_to_string(&done).is_ok_and(|text| text.starts_with("1 "))
    });
    warren.signal(Signal::SIGTERM);
    assert_eq!(warren.wait_exit(Duration::from_secs(10)).code(), Some(0));
}
