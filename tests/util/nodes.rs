//! Extra RabbitMQ nodes on this machine, for tests of clusters, node failures and TLS listeners,
//! next to the system broker (which they never touch).
//!
//! A [`Cluster`] starts up to [`MAX_NODES`] nodes named `warren-t1@HOST` to `warren-t3@HOST`
//! (`HOST` as `hostname -s` prints it), each with its own directory `/tmp/warren-nodes/tN`
//! (mnesia, logs, pid file, `rabbitmq.conf`, an empty plugin list, the server's output in
//! `server.out`) owned by the `rabbitmq` user, as whom the Debian wrappers run the server and
//! `rabbitmqctl`. Ports are fixed: node N listens for AMQP on 127.0.0.1:568N, may listen for TLS
//! on 569N (see [`Node::tls_port`]) and for Erlang distribution on 127.0.0.1:2568N. The nodes
//! share the system broker's Erlang cookie (`/var/lib/rabbitmq/.erlang.cookie`, the `rabbitmq`
//! user's home), so `rabbitmqctl -n warren-tN@HOST` works as for the system broker.
//! `/etc/rabbitmq/rabbitmq-env.conf` still applies to them, but its `NODENAME` gives way to
//! `RABBITMQ_NODENAME`; `/etc/rabbitmq/rabbitmq.conf` does not (each node has its own).
//!
//! The nodes boot in parallel; nodes 2..n join node 1 as they boot (classic config peer
//! discovery), which saves the `stop_app`, `join_cluster`, `start_app` round after boot. A node
//! that gives up waiting for node 1, or fails its boot while joining it, boots alone and gets
//! that round after all, as every node of
//! [`Cluster::start_joined_by_hand`] does. Once all run, every feature flag is enabled
//! (`rabbitmqctl enable_feature_flag all`) and checked on each node: joining by peer discovery
//! can leave `quorum_queue` disabled on RabbitMQ 3.10.
//!
//! Tests that use extra nodes run one at a time, across threads and processes: a `Cluster` holds
//! an exclusive lock on `/tmp/warren-tests-nodes.lock` (not the broker lock). Since names, ports
//! and directories are fixed, whatever a killed test run left behind is stopped and wiped by the
//! next `Cluster::start`; a `Cluster` stops its nodes and removes their directories when it
//! drops, a failing test included.
#![allow(dead_code)]

use std::any::Any;
use std::fs::{self, File};
use std::io::{Read, Seek, SeekFrom, Write};
use std::net::{TcpListener, TcpStream};
use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use nix::fcntl::{Flock, FlockArg};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// How many nodes a cluster may have: the names, directories and ports are reserved for this
/// many.
pub const MAX_NODES: usize = 3;
/// Where the nodes' directories live; the `rabbitmq` user must be able to reach it.
pub const NODES_DIR: &str = "/tmp/warren-nodes";
/// The lock that serialises the tests that start extra nodes.
pub const NODES_LOCK: &str = "/tmp/warren-tests-nodes.lock";
/// How long a node may take to boot (or to come back) before the test fails.
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(60);
/// How long one `rabbitmqctl` call may take before it is abandoned.
const CTL_TIMEOUT: Duration = Duration::from_secs(60);
/// How long teardown waits for `rabbitmqctl stop` before it kills the node.
const STOP_TIMEOUT: Duration = Duration::from_secs(15);

/// The AMQP port of node `index` (0-based): 5681, 5682, 5683.
fn amqp_port_of(index: usize) -> u16 {
    5681 + index as u16
}

/// The TLS port reserved for node `index`: 5691, 5692, 5693.
fn tls_port_of(index: usize) -> u16 {
    5691 + index as u16
}

/// The Erlang distribution port of node `index`: 25681, 25682, 25683.
fn dist_port_of(index: usize) -> u16 {
    25681 + index as u16
}

/// This machine's short host name, as `hostname -s` prints it and RabbitMQ names nodes.
pub fn short_hostname() -> String {
    let name = fs::read_to_string("/proc/sys/kernel/hostname").expect("read the host name");
    name.trim()
        .split('.')
        .next()
        .unwrap_or_default()
        .to_string()
}

/// One queue's line of `rabbitmqctl list_queues`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueCounts {
    pub name: String,
    pub ready: u64,
    pub unacked: u64,
    pub consumers: usize,
}

/// One extra RabbitMQ node: its name, ports and directory, and the faults a test can inflict on
/// it. Nodes belong to a [`Cluster`], which starts and removes them.
pub struct Node {
    index: usize,
    name: String,
    port: u16,
    tls_port: u16,
    dist_port: u16,
    dir: PathBuf,
    conf: String,
}

impl Node {
    fn new(index: usize, host: &str, extra_conf: &str, join: Join) -> Node {
        let port = amqp_port_of(index);
        let tls_port = tls_port_of(index);
        let mut conf = format!(
            "listeners.tcp.local = 127.0.0.1:{port}\nlog.file.level = info\nlog.console = false\n"
        );
        if index > 0 && join == Join::AtBoot {
            // Joins the first node as it boots, which is faster than `join_cluster` after boot.
            // A blank node retries until the first node's database is up (for up to 20 s
            // here), then starts alone; `Cluster::start` then joins it by hand.
            conf.push_str(&format!(
                "cluster_formation.peer_discovery_backend = classic_config\n\
                 cluster_formation.classic_config.nodes.1 = warren-t1@{host}\n\
                 cluster_formation.discovery_retry_limit = 40\n\
                 cluster_formation.discovery_retry_interval = 500\n"
            ));
        }
        conf.push_str(
            &extra_conf
                .replace("{port}", &port.to_string())
                .replace("{tls_port}", &tls_port.to_string()),
        );
        conf.push('\n');
        Node {
            index,
            name: format!("warren-t{}@{host}", index + 1),
            port,
            tls_port,
            dist_port: dist_port_of(index),
            dir: Path::new(NODES_DIR).join(format!("t{}", index + 1)),
            conf,
        }
    }

    /// The node's full name, `warren-tN@HOST`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The part of the name before the `@`, as epmd knows the node.
    fn short_name(&self) -> &str {
        self.name.split('@').next().unwrap_or_default()
    }

    /// Its index in the cluster, from 0 (`warren-t1`).
    pub fn index(&self) -> usize {
        self.index
    }

    /// The AMQP port, on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// A port reserved for a TLS listener of this node: `extra_conf` of [`Cluster::start_with`]
    /// names it `{tls_port}` (e.g. `listeners.ssl.default = {tls_port}`).
    pub fn tls_port(&self) -> u16 {
        self.tls_port
    }

    /// The Erlang distribution port, on 127.0.0.1.
    pub fn dist_port(&self) -> u16 {
        self.dist_port
    }

    /// The node's directory (mnesia, log, config).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The URL of the node's AMQP listener, with the guest account (which may log in from
    /// loopback only) and vhost `/`.
    pub fn amqp_url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    /// The URL of the node's TLS listener, by the name `localhost` (which the test server
    /// certificates carry), with the guest account and vhost `/`.
    pub fn amqps_url(&self) -> String {
        format!("amqps://guest:guest@localhost:{}/%2f", self.tls_port)
    }

    /// The node's main log file.
    pub fn log_path(&self) -> PathBuf {
        self.dir.join("log").join(format!("{}.log", self.name))
    }

    /// For failure messages: the first error lines and the last `lines` lines of the server's
    /// output (where a boot that fails early says why) and of the node's log.
    pub fn log_tail(&self, lines: usize) -> String {
        let mut text = String::new();
        for path in [self.dir.join("server.out"), self.log_path()] {
            let content = fs::read_to_string(&path).unwrap_or_default();
            let all: Vec<&str> = content.lines().collect();
            if all.is_empty() {
                text.push_str(&format!("--- {} is empty or missing ---\n", path.display()));
                continue;
            }
            let errors: Vec<&str> = (all.iter())
                .filter(|line| line.contains("[error]"))
                .take(lines)
                .copied()
                .collect();
            if !errors.is_empty() {
                let first = format!("first {} error lines of {}", errors.len(), path.display());
                text.push_str(&format!("--- {first} ---\n{}\n", errors.join("\n")));
            }
            let tail = &all[all.len().saturating_sub(lines)..];
            let last = format!("last {} lines of {}", tail.len(), path.display());
            text.push_str(&format!("--- {last} ---\n{}\n", tail.join("\n")));
        }
        text
    }

    /// Runs `rabbitmqctl -n NODE args` and returns its standard output, or a description of how
    /// it failed (exit status, output) if it failed or took longer than `timeout`.
    pub fn try_rabbitmqctl(&self, args: &[&str], timeout: Duration) -> Result<String, String> {
        self.try_tool("rabbitmqctl", args, timeout)
    }

    /// Runs RabbitMQ's command line `tool` (`rabbitmqctl`, `rabbitmq-queues`, ...) with `-n
    /// NODE args`, as [`Node::try_rabbitmqctl`] does.
    pub fn try_tool(&self, tool: &str, args: &[&str], timeout: Duration) -> Result<String, String> {
        run(
            Command::new(tool).arg("-n").arg(&self.name).args(args),
            timeout,
        )
    }

    /// Runs `rabbitmqctl -n NODE args` and returns its standard output; panics with its output
    /// if it fails.
    pub fn rabbitmqctl(&self, args: &[&str]) -> String {
        self.try_rabbitmqctl(args, CTL_TIMEOUT)
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// The node's environment for `rabbitmq-server`: everything it writes goes to its directory.
    fn env(&self) -> Vec<(&'static str, String)> {
        let dir = self.dir.display();
        vec![
            ("RABBITMQ_NODENAME", self.name.clone()),
            ("RABBITMQ_NODE_IP_ADDRESS", "127.0.0.1".into()),
            ("RABBITMQ_NODE_PORT", self.port.to_string()),
            ("RABBITMQ_DIST_PORT", self.dist_port.to_string()),
            ("RABBITMQ_MNESIA_BASE", format!("{dir}/mnesia")),
            ("RABBITMQ_LOG_BASE", format!("{dir}/log")),
            ("RABBITMQ_PID_FILE", format!("{dir}/pid")),
            (
                "RABBITMQ_ENABLED_PLUGINS_FILE",
                format!("{dir}/enabled_plugins"),
            ),
            ("RABBITMQ_CONFIG_FILE", format!("{dir}/rabbitmq.conf")),
            // Not /etc/rabbitmq/conf.d, whose files (a listener, say) are the system broker's.
            ("RABBITMQ_CONFIG_FILES", format!("{dir}/conf.d")),
            (
                "RABBITMQ_ADVANCED_CONFIG_FILE",
                format!("{dir}/advanced.config"),
            ),
            // Not the default, the current directory: /var/lib/rabbitmq.
            ("ERL_CRASH_DUMP", format!("{dir}/erl_crash.dump")),
        ]
    }

    /// The marker by which the node's processes are found in `/proc/PID/environ`.
    fn env_marker(&self) -> String {
        format!("RABBITMQ_MNESIA_BASE={}/mnesia", self.dir.display())
    }

    /// The live processes of this node (the Erlang VM and its helpers), found by their
    /// environment, so that a stale pid file can never name another process.
    fn processes(&self) -> Vec<i32> {
        processes_with_env(&self.env_marker())
    }

    /// The OS process id of the node's Erlang VM (`beam.smp`), if it runs.
    pub fn os_pid(&self) -> Option<i32> {
        let from_file = fs::read_to_string(self.dir.join("pid"))
            .ok()
            .and_then(|pid| pid.trim().parse::<i32>().ok());
        let processes = self.processes();
        from_file
            .filter(|pid| processes.contains(pid))
            .or_else(|| processes.into_iter().find(|&pid| comm(pid) == "beam.smp"))
    }

    /// True while the node's Erlang VM runs (its app may be stopped).
    pub fn is_running(&self) -> bool {
        self.os_pid().is_some()
    }

    /// Writes a fresh directory for the node: config, empty plugin list, owned by `rabbitmq`.
    fn prepare(&self) {
        fs::create_dir_all(self.dir.join("mnesia")).expect("create the node's mnesia directory");
        fs::create_dir_all(self.dir.join("log")).expect("create the node's log directory");
        fs::create_dir_all(self.dir.join("conf.d")).expect("create the node's conf.d");
        fs::write(self.dir.join("enabled_plugins"), "[].\n").expect("write enabled_plugins");
        fs::write(self.dir.join("rabbitmq.conf"), &self.conf).expect("write rabbitmq.conf");
        chown_rabbitmq(&self.dir);
    }

    /// Starts the node's server and waits until it has booted.
    ///
    /// The server runs in the foreground of a child process whose output goes to `server.out`
    /// in the node's directory, not with `-detached`: a detached node that fails to boot (on a
    /// bad `rabbitmq.conf`, say) says why on its standard output, which is lost, not in its log.
    /// It still outlives this process, like a detached one (the wrapper's `su` puts it in a
    /// session of its own). A thread reaps the child when the node stops.
    fn launch(&self) {
        let out = File::options()
            .create(true)
            .append(true)
            .open(self.dir.join("server.out"))
            .expect("open server.out");
        let mut server = Command::new("rabbitmq-server")
            .envs(self.env())
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("clone the server.out handle"))
            .stderr(out)
            .spawn()
            .expect("run rabbitmq-server (is RabbitMQ installed?)");
        let (report, exited) = mpsc::channel();
        thread::spawn(move || report.send(server.wait()));
        let started = Instant::now();
        self.await_boot(&exited, BOOT_TIMEOUT);
        eprintln!("nodes: {} booted in {:.1?}", self.name, started.elapsed());
    }

    /// Waits until the node's VM has registered with epmd and the broker has booted; panics
    /// with the tail of its output and log if the server exits (`exited` receives its status)
    /// or has not booted within `timeout`.
    fn await_boot(&self, exited: &mpsc::Receiver<std::io::Result<ExitStatus>>, timeout: Duration) {
        let started = Instant::now();
        let fail = |why: &str| -> ! {
            panic!(
                "node {} did not start ({why}) after {:.1?}\n{}",
                self.name,
                started.elapsed(),
                self.log_tail(15)
            )
        };
        let check_exit = || match exited.try_recv() {
            Ok(Ok(status)) => fail(&format!("rabbitmq-server exited, {status}")),
            Ok(Err(e)) => fail(&format!("cannot wait for rabbitmq-server: {e}")),
            Err(_) if started.elapsed() > timeout => fail("timed out"),
            Err(_) => {}
        };
        // `rabbitmqctl await_startup` fails at once while the node is unreachable, and every
        // rabbitmqctl costs half a second of CPU: wait for the VM's epmd registration first.
        while !epmd_names().iter().any(|name| name == self.short_name()) {
            check_exit();
            thread::sleep(Duration::from_millis(50));
        }
        loop {
            let left = timeout.saturating_sub(started.elapsed());
            let secs = left.as_secs().max(1).to_string();
            match self.try_rabbitmqctl(&["await_startup", "-t", &secs], left + STOP_TIMEOUT) {
                Ok(_) => return,
                Err(e) if started.elapsed() > timeout => fail(&e),
                Err(_) => {
                    check_exit();
                    thread::sleep(Duration::from_millis(200));
                }
            }
        }
    }

    /// Stops the broker app (`rabbitmqctl stop_app`); the VM keeps running, clients are
    /// disconnected and the port is closed.
    pub fn stop_app(&self) {
        self.rabbitmqctl(&["stop_app"]);
    }

    /// Starts the broker app again (`rabbitmqctl start_app`) and waits until it has booted.
    pub fn start_app(&self) {
        self.rabbitmqctl(&["start_app"]);
        self.rabbitmqctl(&["await_startup", "-t", &BOOT_TIMEOUT.as_secs().to_string()]);
    }

    /// Stops the whole node cleanly (`rabbitmqctl stop`); [`Node::restart`] starts it again.
    pub fn stop(&self) {
        let seen = self.processes();
        self.rabbitmqctl(&["stop"]);
        self.wait_down(seen, Duration::from_secs(30));
    }

    /// Kills the node's Erlang VM with SIGKILL, as a crash or power loss would, and waits until
    /// it is gone and epmd has forgotten it. [`Node::restart`] starts it again.
    pub fn kill9(&self) {
        let pid = self
            .os_pid()
            .unwrap_or_else(|| panic!("node {} is not running", self.name));
        kill(Pid::from_raw(pid), Signal::SIGKILL)
            .unwrap_or_else(|e| panic!("kill -9 {pid} ({}): {e}", self.name));
        self.wait_down(vec![pid], Duration::from_secs(10));
    }

    /// Starts a stopped or killed node again, with the same name, ports and data, and waits
    /// until it has booted. A cluster member rejoins its cluster by itself.
    pub fn restart(&self) {
        assert!(
            !self.is_running(),
            "node {} still runs: kill9() or stop() it before restart()",
            self.name
        );
        self.launch();
    }

    /// Waits until the node's processes are gone and epmd no longer lists it, so that its name
    /// and ports are free again; panics after `timeout`.
    fn wait_down(&self, seen: Vec<i32>, timeout: Duration) {
        assert!(
            self.wait_down_quietly(seen, timeout),
            "node {} still runs {timeout:?} after it was stopped",
            self.name
        );
    }

    /// As [`Node::wait_down`], but says whether it happened instead of panicking. Processes
    /// `seen` before are waited for too: an exiting process's environment reads empty before
    /// it is gone.
    fn wait_down_quietly(&self, mut seen: Vec<i32>, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            for pid in self.processes() {
                if !seen.contains(&pid) {
                    seen.push(pid);
                }
            }
            let down = seen.iter().all(|&pid| super::gone(pid))
                && !epmd_names().iter().any(|name| name == self.short_name());
            if down {
                return true;
            }
            if Instant::now() > deadline {
                return false;
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops whatever runs under this node's name or directory (`rabbitmqctl stop` for at most
    /// `stop_timeout` when its VM runs, then SIGKILL) and removes its directory. Never panics.
    fn remove(&self, stop_timeout: Duration) {
        let registered = || epmd_names().iter().any(|name| name == self.short_name());
        let mut seen = self.processes();
        if !seen.is_empty() || registered() {
            let _ = self.try_rabbitmqctl(&["stop"], stop_timeout);
        }
        // Only processes that still carry the node's environment: a pid seen before may be gone
        // and reused.
        for pid in self.processes() {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            seen.push(pid);
        }
        if !self.wait_down_quietly(seen.clone(), Duration::from_secs(10)) && registered() {
            // A node of this name that is not ours (started by hand from another directory).
            let _ = self.try_rabbitmqctl(&["stop"], STOP_TIMEOUT);
            let _ = self.wait_down_quietly(seen, Duration::from_secs(10));
        }
        let _ = fs::remove_dir_all(&self.dir);
    }

    /// Every queue of the node's cluster, as `rabbitmqctl list_queues` on this node reports it;
    /// None if the node does not answer within `timeout`.
    pub fn queues(&self, timeout: Duration) -> Option<Vec<QueueCounts>> {
        let out = self
            .try_rabbitmqctl(
                &[
                    "list_queues",
                    "-q",
                    "--no-table-headers",
                    "name",
                    "messages_ready",
                    "messages_unacknowledged",
                    "consumers",
                ],
                timeout,
            )
            .ok()?;
        Some(
            out.lines()
                .filter_map(
                    |line| match line.split_whitespace().collect::<Vec<_>>()[..] {
                        [name, ready, unacked, consumers] => Some(QueueCounts {
                            name: name.to_string(),
                            ready: ready.parse().ok()?,
                            unacked: unacked.parse().ok()?,
                            consumers: consumers.parse().ok()?,
                        }),
                        _ => None,
                    },
                )
                .collect(),
        )
    }

    /// The number of client connections to this node (not to the rest of its cluster).
    pub fn connection_count(&self) -> usize {
        // Connection pids are printed as <NODE.N.N.N>; list_connections lists the whole cluster.
        let prefix = format!("<{}.", self.name);
        self.rabbitmqctl(&["list_connections", "-q", "--no-table-headers", "pid"])
            .lines()
            .filter(|line| line.trim_start().starts_with(&prefix))
            .count()
    }

    /// The feature flags this node reports as not enabled, by `list_feature_flags`.
    pub fn disabled_feature_flags(&self) -> Vec<String> {
        let out = self.rabbitmqctl(&["list_feature_flags", "name", "state", "--formatter", "json"]);
        let flags: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|e| {
            panic!(
                "list_feature_flags of {} is not JSON ({e}): {out}",
                self.name
            )
        });
        (flags.as_array().into_iter().flatten())
            .filter(|flag| flag["state"] != "enabled")
            .filter_map(|flag| flag["name"].as_str().map(str::to_string))
            .collect()
    }

    /// The nodes of this node's cluster that run the broker app, by `cluster_status`.
    pub fn running_nodes(&self) -> Vec<String> {
        let out = self.rabbitmqctl(&["cluster_status", "--formatter", "json"]);
        let status: serde_json::Value = serde_json::from_str(&out)
            .unwrap_or_else(|e| panic!("cluster_status of {} is not JSON ({e}): {out}", self.name));
        status["running_nodes"]
            .as_array()
            .unwrap_or_else(|| {
                panic!(
                    "cluster_status of {} has no running_nodes: {out}",
                    self.name
                )
            })
            .iter()
            .filter_map(|node| node.as_str().map(str::to_string))
            .collect()
    }
}

/// How the nodes of a [`Cluster`] come to form one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Join {
    /// Nodes 2..n find node 1 as they boot (classic config peer discovery); one that gives up
    /// on it is joined by hand after boot.
    AtBoot,
    /// Every node boots alone; nodes 2..n are then joined by hand.
    ByHand,
}

/// Up to [`MAX_NODES`] extra RabbitMQ nodes, clustered, and the lock that keeps other tests
/// from starting theirs meanwhile. Dropping it stops the nodes and removes their directories.
pub struct Cluster {
    nodes: Vec<Node>,
    _lock: Flock<File>,
}

impl Cluster {
    /// Starts `n` nodes and clusters them: nodes 2..n join node 1 as they boot. Returns once
    /// every node runs in the cluster.
    pub fn start(n: usize) -> Cluster {
        Cluster::start_with(n, "")
    }

    /// As [`Cluster::start`], but the nodes boot alone and nodes 2..n then join node 1 with
    /// `stop_app`, `join_cluster` and `start_app`, as an operator adds a node to a cluster.
    pub fn start_joined_by_hand(n: usize) -> Cluster {
        Cluster::start_as(n, "", Join::ByHand)
    }

    /// As [`Cluster::start`], with `extra_conf` appended to every node's `rabbitmq.conf`
    /// (sysctl format). In it, `{tls_port}` and `{port}` stand for the node's
    /// [`Node::tls_port`] and AMQP port; see [`super::certs::Certs::tls_conf`].
    pub fn start_with(n: usize, extra_conf: &str) -> Cluster {
        Cluster::start_as(n, extra_conf, Join::AtBoot)
    }

    fn start_as(n: usize, extra_conf: &str, join: Join) -> Cluster {
        assert!(
            (1..=MAX_NODES).contains(&n),
            "a cluster has 1 to {MAX_NODES} nodes"
        );
        let lock = lock_nodes();
        let started = Instant::now();
        let host = short_hostname();
        // Whatever an earlier, killed run left behind goes first: every reserved name, not
        // only the first n.
        let stale: Vec<Node> = (0..MAX_NODES)
            .map(|i| Node::new(i, &host, "", join))
            .collect();
        in_parallel(&stale, |node| node.remove(Duration::from_secs(5)));
        fs::create_dir_all(NODES_DIR).expect("create the nodes directory");
        chown_rabbitmq(Path::new(NODES_DIR));
        let cluster = Cluster {
            nodes: (0..n)
                .map(|i| Node::new(i, &host, extra_conf, join))
                .collect(),
            _lock: lock,
        };
        // From here on a panic drops `cluster`, which removes whatever was started.
        for node in &cluster.nodes {
            for port in [node.port, node.tls_port, node.dist_port] {
                if let Err(e) = TcpListener::bind(("127.0.0.1", port)) {
                    panic!(
                        "port {port}, reserved for node {}, is taken: {e}",
                        node.name
                    );
                }
            }
            node.prepare();
        }
        // A node that fails its boot while joining node 1 by peer discovery is wiped and booted
        // alone, once, to be joined by hand below: RabbitMQ 3.10 can refuse such a boot with
        // `schema_integrity_check_failed` (its users and vhosts tables created before it took
        // on the cluster's feature flags), seen in CI with node 3 of 3.
        let launched = in_parallel(&cluster.nodes, |node| {
            let Err(panic) = panic::catch_unwind(AssertUnwindSafe(|| node.launch())) else {
                return;
            };
            if node.index == 0 || join != Join::AtBoot {
                panic::resume_unwind(panic);
            }
            eprintln!(
                "nodes: {} did not boot joining the cluster; booting it alone",
                node.name
            );
            node.remove(STOP_TIMEOUT);
            // Node 1 may count it as a member already: it is to join again, from scratch.
            let first = &cluster.nodes[0];
            let _ = first.try_rabbitmqctl(&["forget_cluster_node", &node.name], STOP_TIMEOUT);
            let alone = Node::new(node.index, &host, extra_conf, Join::ByHand);
            alone.prepare();
            alone.launch();
        });
        if let Some(panic) = launched {
            panic::resume_unwind(panic);
        }
        if n > 1 {
            cluster.join_stragglers();
            cluster.enable_feature_flags();
        }
        eprintln!("nodes: {n} node(s) running in {:.1?}", started.elapsed());
        cluster
    }

    /// Joins to node 1 (`stop_app`, `join_cluster`, `start_app`) the nodes that booted without
    /// joining it, and waits until all run in the cluster.
    fn join_stragglers(&self) {
        let first = &self.nodes[0];
        let running = first.running_nodes();
        let alone: Vec<&Node> = (self.nodes.iter())
            .filter(|node| !running.iter().any(|name| name == node.name()))
            .collect();
        if alone.is_empty() {
            return;
        }
        eprintln!(
            "nodes: {running:?} run; joining the others to {}",
            first.name
        );
        let joined = in_parallel(alone, |node| {
            node.rabbitmqctl(&["stop_app"]);
            node.rabbitmqctl(&["join_cluster", first.name()]);
            node.rabbitmqctl(&["start_app"]);
        });
        if let Some(panic) = joined {
            panic::resume_unwind(panic);
        }
        self.wait_all_running(BOOT_TIMEOUT);
    }

    /// Enables every feature flag on the cluster and checks each node sees them enabled.
    ///
    /// A node that joins by peer discovery as it boots can sync its feature flags against the
    /// wrong list of nodes and leave stable flags disabled across the cluster (fixed after
    /// 3.10, rabbitmq/rabbitmq-server#8477). CI once saw every quorum queue declare refused
    /// with "the corresponding feature flag is disabled" after a node was stopped: a flag is
    /// only enabled while every node runs. Operators run `rabbitmqctl enable_feature_flag all`
    /// after forming a cluster; so do we.
    fn enable_feature_flags(&self) {
        let first = &self.nodes[0];
        let disabled = first.disabled_feature_flags();
        if !disabled.is_empty() {
            eprintln!(
                "nodes: feature flags {disabled:?} are disabled on the new cluster; enabling them"
            );
        }
        first.rabbitmqctl(&["enable_feature_flag", "all"]);
        for node in &self.nodes {
            let disabled = node.disabled_feature_flags();
            assert!(
                disabled.is_empty(),
                "feature flags {disabled:?} are still disabled on {} after enable_feature_flag all",
                node.name()
            );
        }
    }

    /// Node `i`, from 0 (`warren-t1`, the node the others joined).
    pub fn node(&self, i: usize) -> &Node {
        &self.nodes[i]
    }

    /// All the nodes, in order.
    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    /// The AMQP URLs of the nodes, in order.
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(Node::amqp_url).collect()
    }

    /// Runs `rabbitmqctl -n NODE args` against node `i` and returns its standard output; panics
    /// with its output if it fails.
    pub fn rabbitmqctl(&self, i: usize, args: &[&str]) -> String {
        self.nodes[i].rabbitmqctl(args)
    }

    /// The index of the first node whose VM runs and answers `rabbitmqctl`, to ask about the
    /// cluster while other nodes are down.
    fn any_running(&self) -> usize {
        self.nodes
            .iter()
            .position(|node| node.is_running())
            .unwrap_or_else(|| panic!("no node of the cluster runs"))
    }

    /// The names of the nodes that run the broker app, by `cluster_status` on a running node.
    pub fn running_nodes(&self) -> Vec<String> {
        self.nodes[self.any_running()].running_nodes()
    }

    /// Waits until `cluster_status` shows every node running; panics after `timeout`.
    pub fn wait_all_running(&self, timeout: Duration) {
        let want: Vec<&str> = self.nodes.iter().map(Node::name).collect();
        let deadline = Instant::now() + timeout;
        loop {
            let running = self.running_nodes();
            if want.iter().all(|name| running.iter().any(|r| r == name)) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "timed out after {timeout:?} waiting for {want:?} to run, running: {running:?}"
            );
            thread::sleep(Duration::from_millis(200));
        }
    }

    /// The index of the node that leads quorum queue `queue` (in vhost `/`), by the queue's
    /// members themselves (`rabbitmq-queues quorum_status`): after the leader failed, this
    /// waits (up to 30s) for the election of another.
    pub fn quorum_leader(&self, queue: &str) -> usize {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match self.try_quorum_leader(queue) {
                Ok(leader) => return leader,
                Err(e) if Instant::now() > deadline => {
                    panic!("quorum queue {queue} has no leader after 30s: {e}")
                }
                Err(_) => thread::sleep(Duration::from_millis(100)),
            }
        }
    }

    /// The index of the node that leads quorum queue `queue` now, or why there is none (the
    /// members are electing one, or the queue does not exist).
    ///
    /// (`rabbitmqctl list_queues name leader` would be one call cheaper, but it leaves a quorum
    /// queue out while the node of its recorded leader is down.)
    pub fn try_quorum_leader(&self, queue: &str) -> Result<usize, String> {
        let mut why = String::from("no node runs");
        for node in self.nodes.iter().filter(|node| node.is_running()) {
            let asked = node.try_tool(
                "rabbitmq-queues",
                &[
                    "quorum_status",
                    queue,
                    "--vhost",
                    "/",
                    "--formatter",
                    "json",
                ],
                CTL_TIMEOUT,
            );
            let out = match asked {
                Ok(out) => out,
                Err(e) => {
                    why = e;
                    continue;
                }
            };
            let members: serde_json::Value = serde_json::from_str(&out)
                .map_err(|e| format!("quorum_status is not JSON ({e}): {out}"))?;
            let leaders: Vec<&str> = (members.as_array().into_iter().flatten())
                .filter(|member| member["Raft State"] == "leader")
                .filter_map(|member| member["Node Name"].as_str())
                .collect();
            return match leaders.as_slice() {
                [leader] => (self.nodes.iter())
                    .position(|node| node.name == *leader)
                    .ok_or_else(|| {
                        format!("{queue} is led by {leader}, not a node of the cluster")
                    }),
                _ => Err(format!("{queue} has no single leader: {out}")),
            };
        }
        Err(why)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // `remove` does not panic; if anything else did, it must not escape a drop.
        let _ = in_parallel(&self.nodes, |node| node.remove(STOP_TIMEOUT));
    }
}

/// Runs `f` on each of `nodes`, each in a thread of its own, and waits for all. Returns the
/// payload of the first panic, if any, for the caller to raise again with its own message (a
/// plain `thread::scope` would panic with "a scoped thread panicked") or to drop.
fn in_parallel<'a>(
    nodes: impl IntoIterator<Item = &'a Node>,
    f: impl Fn(&'a Node) + Sync,
) -> Option<Box<dyn Any + Send>> {
    let f = &f;
    thread::scope(|scope| {
        let threads: Vec<_> = (nodes.into_iter())
            .map(|node| {
                thread::Builder::new()
                    .name(format!("node-{}", node.name))
                    .spawn_scoped(scope, move || f(node))
                    // No thread: run it here instead.
                    .map_err(|_| panic::catch_unwind(AssertUnwindSafe(|| f(node))))
            })
            .collect();
        let mut first = None;
        for thread in threads {
            let outcome = match thread {
                Ok(thread) => thread.join(),
                Err(ran_here) => ran_here,
            };
            if let (Err(panic), None) = (outcome, &first) {
                first = Some(panic);
            }
        }
        first
    })
}

/// Takes the nodes lock exclusively, waiting for any other test that holds it.
fn lock_nodes() -> Flock<File> {
    let file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(NODES_LOCK)
        .unwrap_or_else(|e| panic!("open {NODES_LOCK}: {e}"));
    Flock::lock(file, FlockArg::LockExclusive)
        .unwrap_or_else(|(_, e)| panic!("lock {NODES_LOCK}: {e}"))
}

/// Gives `path` (recursively) to the `rabbitmq` user, as whom the server runs.
fn chown_rabbitmq(path: &Path) {
    let status = Command::new("chown")
        .args(["-R", "rabbitmq:rabbitmq"])
        .arg(path)
        .status()
        .expect("run chown");
    assert!(
        status.success(),
        "chown -R rabbitmq {}: {status}",
        path.display()
    );
}

/// The names (before the `@`) that epmd on 127.0.0.1 has registered; none if it does not run.
pub fn epmd_names() -> Vec<String> {
    let ask = || -> std::io::Result<Vec<u8>> {
        let address = "127.0.0.1:4369".parse().expect("a socket address");
        let mut stream = TcpStream::connect_timeout(&address, Duration::from_secs(1))?;
        stream.set_read_timeout(Some(Duration::from_secs(2)))?;
        // NAMES_REQ: a two-byte length, then 'n'. The answer is epmd's port (four bytes), then
        // lines "name NAME at port PORT".
        stream.write_all(&[0, 1, b'n'])?;
        let mut answer = Vec::new();
        stream.read_to_end(&mut answer)?;
        Ok(answer)
    };
    let answer = ask().unwrap_or_default();
    String::from_utf8_lossy(answer.get(4..).unwrap_or_default())
        .lines()
        .filter_map(|line| line.strip_prefix("name ")?.split(" at port ").next())
        .map(str::to_string)
        .collect()
}

/// The live (not zombie) processes whose environment holds `entry` (`NAME=VALUE`).
fn processes_with_env(entry: &str) -> Vec<i32> {
    let Ok(dir) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&pid| {
            fs::read(format!("/proc/{pid}/environ")).is_ok_and(|environ| {
                environ
                    .split(|&b| b == 0)
                    .any(|var| var == entry.as_bytes())
            }) && !super::gone(pid)
        })
        .collect()
}

/// The command name of process `pid` (`/proc/PID/comm`), or "" if it is gone.
fn comm(pid: i32) -> String {
    fs::read_to_string(format!("/proc/{pid}/comm"))
        .map(|c| c.trim().to_string())
        .unwrap_or_default()
}

/// Runs `command` with its output in files (so that no process it leaves behind can block a
/// pipe) and returns its standard output, or a description of its failure, including a run
/// longer than `timeout` (after which it is killed).
fn run(command: &mut Command, timeout: Duration) -> Result<String, String> {
    let what = format!("{command:?}");
    let files =
        tempfile::tempfile().and_then(|out| Ok((out.try_clone()?, out, tempfile::tempfile()?)));
    let (out, mut out_read, mut err) = files.map_err(|e| format!("{what}: temporary file: {e}"))?;
    let err_write = err.try_clone().map_err(|e| format!("{what}: {e}"))?;
    let mut child = command
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err_write)
        .spawn()
        .map_err(|e| format!("cannot run {what}: {e}"))?;
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Ok(status),
            Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(10)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                break Err(format!("timed out after {timeout:?}"));
            }
            Err(e) => break Err(format!("wait: {e}")),
        }
    };
    let read = |file: &mut File| {
        let mut text = String::new();
        let _ = file.seek(SeekFrom::Start(0));
        let _ = file.read_to_string(&mut text);
        text
    };
    let (stdout, stderr) = (read(&mut out_read), read(&mut err));
    match status {
        Ok(status) if status.success() => Ok(stdout),
        Ok(status) => Err(format!("{what} failed ({status}): {stdout}{stderr}")),
        Err(why) => Err(format!("{what} {why}: {stdout}{stderr}")),
    }
}
