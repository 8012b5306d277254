//! Helpers shared by the integration tests: the real broker, unique queues, config files, the
//! `warren` binary as a child process, and waiting on conditions with deadlines.
//!
//! Every test talks to the RabbitMQ named by `WARREN_TEST_AMQP_URL` (default: the local guest
//! account). A test that cannot reach it fails with a message that says so; none skip. Tests
//! that stop the broker take the broker lock exclusively; every other test holds it shared.
#![allow(dead_code)]

pub mod certs;
pub mod nodes;

use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant, SystemTime};

use nix::fcntl::{Flock, FlockArg};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use warren::amqp::{Fetched, Header, PublishEvent, Session};
use warren::config::Config;

pub const DEFAULT_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// The broker URL the tests use.
pub fn amqp_url() -> String {
    std::env::var("WARREN_TEST_AMQP_URL").unwrap_or_else(|_| DEFAULT_URL.to_string())
}

/// `host:port` of the test broker itself, as warren names a node in its log.
pub fn broker_address() -> String {
    let url = url::Url::parse(&amqp_url()).expect("WARREN_TEST_AMQP_URL parses");
    format!(
        "{}:{}",
        url.host_str().unwrap_or("127.0.0.1"),
        url.port().unwrap_or(5672)
    )
}

/// A test's claim on the broker: holds the broker lock (shared, or exclusive for tests that stop
/// the broker) and gives unique queue names that are deleted when it drops.
pub struct Broker {
    _lock: Flock<File>,
    queues: Mutex<Vec<String>>,
    pub dir: tempfile::TempDir,
}

impl Broker {
    /// For ordinary tests, which may run in parallel with each other.
    pub fn shared() -> Broker {
        Broker::with_lock(FlockArg::LockShared)
    }

    /// For tests that stop or restart the broker: no other test runs meanwhile.
    pub fn exclusive() -> Broker {
        Broker::with_lock(FlockArg::LockExclusive)
    }

    fn with_lock(arg: FlockArg) -> Broker {
        let path = std::env::temp_dir().join("warren-tests-broker.lock");
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .expect("open the broker lock file");
        let lock =
            Flock::lock(file, arg).unwrap_or_else(|(_, e)| panic!("lock {}: {e}", path.display()));
        // A session is opened and dropped only to fail early, and clearly, when the broker is away.
        session();
        Broker {
            _lock: lock,
            queues: Mutex::new(Vec::new()),
            dir: tempfile::tempdir().expect("create a temporary directory"),
        }
    }

    /// A queue name no other test uses; the queue is deleted when this `Broker` drops.
    pub fn queue(&self, what: &str) -> String {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let name = format!(
            "warren-test-{what}-{}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed),
            fastrand::u32(..)
        );
        self.queues.lock().unwrap().push(name.clone());
        name
    }

    /// Writes a config file for `queue` with `extra` TOML (sections) appended after the
    /// `[broker]` and `[queue]` sections, and returns its path.
    pub fn config(&self, queue: &str, extra: &str) -> PathBuf {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let path = self.dir.path().join(format!(
            "warren-{}.toml",
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let text = format!(
            "[broker]\nurl = \"{}\"\nheartbeat = \"5s\"\n\n[queue]\nname = \"{queue}\"\n\n{extra}\n",
            amqp_url()
        );
        fs::write(&path, text).expect("write the config file");
        path
    }

    /// Writes an executable script into the test's directory and returns its path.
    pub fn script(&self, name: &str, body: &str) -> PathBuf {
        self.script_for("/bin/sh", name, body)
    }

    /// Writes an executable script run by `shell` into the test's directory and returns its path.
    pub fn script_for(&self, shell: &str, name: &str, body: &str) -> PathBuf {
        let path = self.dir.path().join(name);
        fs::write(&path, format!("#!{shell}\n{body}\n")).expect("write the script");
        fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).expect("chmod the script");
        path
    }

    /// Writes an executable script that runs `body` with `$DIR` set to the test's directory, and
    /// returns its path.
    pub fn script_in_dir(&self, name: &str, body: &str) -> PathBuf {
        self.script_in_dir_for("/bin/sh", name, body)
    }

    /// As [`Broker::script_in_dir`], for a script run by `shell`.
    pub fn script_in_dir_for(&self, shell: &str, name: &str, body: &str) -> PathBuf {
        let dir = self.dir.path().display().to_string();
        assert!(
            !dir.contains('\''),
            "the temporary directory needs no quoting"
        );
        self.script_for(shell, name, &format!("DIR='{dir}'\n{body}"))
    }

    /// Writes a config for `queue` with `workers` workers running `script` as a `command`
    /// handler, and `extra` TOML (sections) after it, and returns its path.
    pub fn command_config(
        &self,
        queue: &str,
        workers: usize,
        script: &Path,
        extra: &str,
    ) -> PathBuf {
        self.config(
            queue,
            &format!(
                "[workers]\ncount = {workers}\n\n[handler]\n{}\n{extra}",
                command_keys(script)
            ),
        )
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let queues = std::mem::take(&mut *self.queues.lock().unwrap());
        if queues.is_empty() {
            return;
        }
        if let Ok(session) = try_session() {
            for queue in queues {
                let _ = session.delete_queue(&queue);
                // The queues warren declares around it, with the default retry delays.
                for suffix in [".dead", ".retry.1s", ".retry.2s", ".retry.4s", ".retry.8s"] {
                    let _ = session.delete_queue(&format!("{queue}{suffix}"));
                }
            }
        }
    }
}

/// The `[handler]` keys that run `script` as a `command` handler.
pub fn command_keys(script: &Path) -> String {
    format!("kind = \"command\"\ncommand = [\"{}\"]\n", script.display())
}

/// Three attempts, 100ms and then 200ms apart, so that warren declares the retry queues
/// `<queue>.retry.100ms` and `<queue>.retry.200ms`.
pub const RETRY: &str = "[retry]\nmax_attempts = 3\ndelay = \"100ms\"\nmax_delay = \"400ms\"\n";

/// The queues warren declares around one work queue under [`RETRY`]. Dropping it deletes the
/// retry queues, which `Broker` does not know about (it deletes only the default ones).
pub struct Queues {
    pub work: String,
    pub retries: [String; 2],
    pub dead: String,
}

impl Queues {
    pub fn new(broker: &Broker, what: &str) -> Queues {
        let work = broker.queue(what);
        Queues {
            retries: [format!("{work}.retry.100ms"), format!("{work}.retry.200ms")],
            dead: format!("{work}.dead"),
            work,
        }
    }

    /// Waits until the work queue and the retry queues are empty, with nothing unacked, and the
    /// dead-letter queue holds `dead` ready messages.
    pub fn wait_settled(&self, dead: u64) {
        let names = [
            self.work.as_str(),
            self.retries[0].as_str(),
            self.retries[1].as_str(),
            self.dead.as_str(),
        ];
        let want = [(0, 0), (0, 0), (0, 0), (dead, 0)];
        wait_until(
            Duration::from_secs(20),
            &format!("{names:?} to hold (ready, unacked) {want:?}"),
            || ready_and_unacked_in("/", &names) == want,
        );
    }
}

impl Drop for Queues {
    fn drop(&mut self) {
        if let Ok(session) = try_session() {
            for queue in &self.retries {
                let _ = session.delete_queue(queue);
            }
        }
    }
}

/// A config that only carries the broker, for opening sessions from tests.
pub fn broker_config() -> Config {
    let text = format!(
        "[broker]\nurl = \"{}\"\n[queue]\nname = \"unused\"\n[handler]\nkind = \"dots\"\n",
        amqp_url()
    );
    Config::parse(Path::new("test.toml"), &text, None).expect("the test broker config parses")
}

pub fn try_session() -> Result<Session, warren::amqp::AmqpError> {
    Session::open(&broker_config().broker, 0, "warren tests")
}

/// A plain durable queue named `name`, as a test declares one.
pub fn durable_queue(name: impl Into<String>) -> warren::amqp::QueueSpec {
    warren::amqp::QueueSpec {
        name: name.into(),
        durable: true,
        arguments: Vec::new(),
    }
}

/// Declares `name` as a plain durable queue on the test broker, as warren does.
pub fn declare_durable(name: &str) {
    session()
        .declare(&durable_queue(name))
        .expect("declare the queue");
}

/// A session with the test broker, or a panic that says how to start it.
pub fn session() -> Session {
    try_session().unwrap_or_else(|e| {
        panic!(
            "cannot reach the test broker: {e}. Start RabbitMQ (rabbitmq-server -detached && \
             rabbitmqctl await_startup) or set WARREN_TEST_AMQP_URL"
        )
    })
}

/// Ready messages and consumers of `queue`, by a passive declare.
pub fn queue_counts(queue: &str) -> (u32, u32) {
    session()
        .queue_counts(queue)
        .unwrap_or_else(|e| panic!("passive declare of {queue}: {e}"))
}

/// Ready and unacknowledged messages of `queue` in vhost `/`, as the broker reports them.
pub fn ready_and_unacked(queue: &str) -> (u64, u64) {
    ready_and_unacked_in("/", &[queue])[0]
}

/// Ready and unacknowledged messages of each of `queues` in `vhost`, from one `rabbitmqctl
/// list_queues`.
pub fn ready_and_unacked_in(vhost: &str, queues: &[&str]) -> Vec<(u64, u64)> {
    let table = queue_table(vhost);
    queues
        .iter()
        .map(|queue| {
            *table
                .get(*queue)
                .unwrap_or_else(|| panic!("queue {queue} is not in vhost {vhost}: {table:?}"))
        })
        .collect()
}

/// Ready and unacknowledged messages of every queue in `vhost`, by name, as the broker reports
/// them: one `rabbitmqctl list_queues` for all of them.
pub fn queue_table(vhost: &str) -> HashMap<String, (u64, u64)> {
    let out = rabbitmqctl(&[
        "list_queues",
        "-p",
        vhost,
        "-q",
        "--no-table-headers",
        "name",
        "messages_ready",
        "messages_unacknowledged",
    ]);
    out.lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            match fields.as_slice() {
                [name, ready, unacked] => Some((
                    name.to_string(),
                    (ready.parse().ok()?, unacked.parse().ok()?),
                )),
                _ => None,
            }
        })
        .collect()
}

/// Runs rabbitmqctl and returns its standard output; panics if it fails.
pub fn rabbitmqctl(args: &[&str]) -> String {
    let out = Command::new("rabbitmqctl")
        .args(args)
        .output()
        .expect("run rabbitmqctl (is RabbitMQ installed?)");
    assert!(
        out.status.success(),
        "rabbitmqctl {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Waits until `condition` holds, or panics naming `what` after `timeout`.
pub fn wait_until(timeout: Duration, what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !condition() {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        thread::sleep(Duration::from_millis(20));
    }
}

/// Waits until `queue` holds exactly `ready` messages.
pub fn wait_for_ready(queue: &str, ready: u32, timeout: Duration) {
    wait_until(
        timeout,
        &format!("{queue} to hold {ready} ready messages"),
        || queue_counts(queue).0 == ready,
    );
}

/// The path of the `warren` binary under test.
pub fn warren_bin() -> &'static str {
    env!("CARGO_BIN_EXE_warren")
}

/// A `warren` command with `args` and the environment of the tests: no `WARREN_CONFIG`,
/// `WARREN_BROKER_URL` or `RUST_LOG`, stdin empty, stdout and stderr piped.
pub fn warren_command(args: &[&str]) -> Command {
    let mut command = Command::new(warren_bin());
    command
        .args(args)
        .env_remove("WARREN_CONFIG")
        .env_remove("WARREN_BROKER_URL")
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    command
}

/// Waits up to `timeout` for `child` to exit and returns its status; if it is still running
/// then, kills and reaps it and returns `None`.
pub fn wait_or_kill(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().expect("wait for warren") {
            return Some(status);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        thread::sleep(Duration::from_millis(10));
    }
}

/// Runs `warren publish` to completion and returns its exit status and log.
pub fn publish(config: &Path, args: &[&str]) -> (ExitStatus, String) {
    let out = Command::new(warren_bin())
        .arg("publish")
        .arg("--config")
        .arg(config)
        .args(args)
        .env_remove("WARREN_BROKER_URL")
        .output()
        .expect("run warren publish");
    (
        out.status,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Starts `warren publish --stdin --config CONFIG` with `args` appended, its standard input and
/// error piped, at log level info.
pub fn spawn_publish_stdin(config: &Path, args: &[&str]) -> Child {
    Command::new(warren_bin())
        .args(["publish", "--stdin", "--config"])
        .arg(config)
        .args(args)
        .env_remove("WARREN_BROKER_URL")
        .env("RUST_LOG", "info")
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start warren publish")
}

/// Publishes each message with `warren publish` and asserts that it succeeded.
pub fn publish_ok(config: &Path, messages: &[&str]) {
    for message in messages {
        let (status, log) = publish(config, &[message]);
        assert!(
            status.success(),
            "warren publish {message:?} failed: {status}\n{log}"
        );
    }
}

/// Publishes `count` messages, `PREFIX-0` to `PREFIX-<count-1>`, with `warren publish`, and
/// returns them.
pub fn publish_numbered(config: &Path, prefix: &str, count: usize) -> Vec<String> {
    let messages: Vec<String> = (0..count).map(|i| format!("{prefix}-{i}")).collect();
    publish_ok(
        config,
        &messages.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    messages
}

/// Publishes each `(message id, body)` to the existing `queue` with the library's publisher and
/// returns once the broker has confirmed them all; panics if it has not within `timeout`.
pub fn publish_confirmed(queue: &str, messages: &[(&str, &[u8])], timeout: Duration) {
    let session = session();
    let mut publisher = session.publisher().expect("enable publisher confirms");
    let mut pending = BTreeMap::new();
    for (id, body) in messages {
        pending.insert(publisher.publish(queue, body, id).expect("publish"), *id);
    }
    let deadline = Instant::now() + timeout;
    while !pending.is_empty() {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(
            !left.is_zero(),
            "the broker did not confirm messages {:?} in time",
            pending.values()
        );
        match publisher.next_event(left).expect("wait for confirms") {
            Some(PublishEvent::Ack {
                tag,
                multiple: true,
            }) => pending.retain(|&t, _| t > tag),
            Some(PublishEvent::Ack { tag, .. }) => {
                pending.remove(&tag);
            }
            Some(other) => panic!(
                "the broker did not store messages {:?}: {other:?}",
                pending.values()
            ),
            None => {}
        }
    }
}

/// A running `warren` process whose log is collected line by line.
pub struct Warren {
    child: Child,
    log: Arc<Mutex<Vec<String>>>,
    reader: Option<thread::JoinHandle<()>>,
}

impl Warren {
    /// Starts `warren run --config CONFIG` with `args` appended.
    pub fn run(config: &Path, args: &[&str]) -> Warren {
        Warren::spawn(
            Command::new(warren_bin())
                .arg("run")
                .arg("--config")
                .arg(config)
                .args(args),
        )
    }

    /// Starts `command` (a `warren` command line) with its log collected. `RUST_LOG` is
    /// `$WARREN_TEST_LOG`, else `info,warren=debug`, unless `command` sets it.
    pub fn spawn(command: &mut Command) -> Warren {
        if !command.get_envs().any(|(key, _)| key == "RUST_LOG") {
            command.env(
                "RUST_LOG",
                std::env::var("WARREN_TEST_LOG").unwrap_or_else(|_| "info,warren=debug".into()),
            );
        }
        let mut child = command
            .env_remove("WARREN_BROKER_URL")
            .env_remove("WARREN_CONFIG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start warren");
        let stderr = child.stderr.take().expect("stderr is piped");
        let log = Arc::new(Mutex::new(Vec::new()));
        let lines = Arc::clone(&log);
        let pid = child.id();
        let reader = thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                eprintln!("warren[{pid}] {line}");
                lines.lock().unwrap().push(line);
            }
        });
        Warren {
            child,
            log,
            reader: Some(reader),
        }
    }

    pub fn pid(&self) -> Pid {
        Pid::from_raw(self.child.id() as i32)
    }

    /// Every line logged so far.
    pub fn log(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }

    /// Lines logged so far that contain `needle`.
    pub fn lines_with(&self, needle: &str) -> Vec<String> {
        self.log()
            .into_iter()
            .filter(|l| l.contains(needle))
            .collect()
    }

    /// Waits until a logged line contains `needle` and returns it.
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) -> String {
        let mut found = None;
        wait_until(timeout, &format!("warren to log {needle:?}"), || {
            found = self.lines_with(needle).into_iter().next();
            found.is_some()
        });
        found.expect("found")
    }

    /// Waits until `count` logged lines contain `needle`.
    pub fn wait_for_count(&self, needle: &str, count: usize, timeout: Duration) {
        wait_until(
            timeout,
            &format!("{count} log lines with {needle:?}"),
            || self.lines_with(needle).len() >= count,
        );
    }

    /// Waits until all `workers` are consuming, by the broker's consumer count.
    pub fn wait_consuming(&self, queue: &str, workers: u32) {
        wait_until(
            Duration::from_secs(20),
            &format!("{workers} consumers on {queue}"),
            || {
                try_session()
                    .ok()
                    .and_then(|s| s.queue_counts(queue).ok())
                    .is_some_and(|(_, consumers)| consumers == workers)
            },
        );
    }

    pub fn signal(&self, signal: Signal) {
        kill(self.pid(), signal).expect("signal warren");
    }

    /// Waits for the process to exit and for its log to be read to the end.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait for warren") {
                if let Some(reader) = self.reader.take() {
                    let _ = reader.join();
                }
                return status;
            }
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                panic!("warren did not exit within {timeout:?}");
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Sends SIGTERM and checks that warren stops cleanly within `timeout`.
    pub fn stop(mut self, timeout: Duration) {
        self.signal(Signal::SIGTERM);
        let status = self.wait_exit(timeout);
        assert!(status.success(), "warren stopped with {status}");
    }
}

impl Drop for Warren {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Restarts the broker's app when dropped, so that a failing test does not leave it stopped.
pub struct AppGuard;

impl AppGuard {
    pub fn stop_app() -> AppGuard {
        rabbitmqctl(&["stop_app"]);
        AppGuard
    }
}

impl Drop for AppGuard {
    fn drop(&mut self) {
        let _ = Command::new("rabbitmqctl").arg("start_app").status();
        let _ = Command::new("rabbitmqctl")
            .args(["await_startup", "-t", "60"])
            .status();
    }
}

/// Reads the ids a recording handler wrote, one per line.
pub fn recorded(path: &Path) -> Vec<String> {
    fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

/// The consuming connections of the workers of the process `pid`, as the connection process ids
/// that `rabbitmqctl close_connection` takes. warren names them "warren worker-N pid P" (its
/// publishing connections "warren worker-N publisher pid P", and the queue depth poller's
/// "warren queue-depth pid P").
pub fn connections_of(pid: Pid) -> Vec<String> {
    connections_named(&format!(" pid {pid}\""))
        .into_iter()
        .filter(|(_, line)| line.contains("warren worker-") && !line.contains(" publisher pid "))
        .map(|(conn, _)| conn)
        .collect()
}

/// Every broker connection whose client properties contain `marker`: its connection process id
/// and its line of `rabbitmqctl list_connections`.
pub fn connections_named(marker: &str) -> Vec<(String, String)> {
    let out = rabbitmqctl(&[
        "list_connections",
        "-q",
        "--no-table-headers",
        "pid",
        "client_properties",
    ]);
    out.lines()
        .filter(|line| line.contains(marker))
        .filter_map(|line| Some((line.split_once('\t')?.0.to_string(), line.to_string())))
        .collect()
}

/// What a [`Proxy`] does to a connection's login: the client's first frame after the protocol
/// header (connection.start-ok, which carries the credentials).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoginFault {
    /// Closes the connection instead of passing the login on: a node that dies or stops just
    /// then.
    Cut,
    /// Keeps the connection open and never passes the login on: a node too busy to answer.
    Stall,
}

/// A loopback TCP proxy to the test broker, to make the broker appear and disappear for one
/// client without stopping it for every test.
pub struct Proxy {
    ip: std::net::IpAddr,
    pub port: u16,
    /// While set, the proxy keeps every connection open but forwards nothing: a dead network.
    frozen: Arc<std::sync::atomic::AtomicBool>,
    /// Faults for the logins of the next connections, one each, in order of their accept.
    login_faults: Arc<std::sync::Mutex<std::collections::VecDeque<LoginFault>>>,
    /// Bytes read from clients, forwarded or held.
    received: Arc<std::sync::atomic::AtomicU64>,
    stop: Option<crossbeam_channel::Sender<()>>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Proxy {
    /// A free loopback port on which nothing listens yet.
    pub fn free_port() -> u16 {
        std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("find a free port")
            .port()
    }

    /// Starts forwarding `port` of 127.0.0.1 to the test broker.
    pub fn start(port: u16) -> Proxy {
        Proxy::start_on(std::net::Ipv4Addr::LOCALHOST.into(), port)
    }

    /// Starts forwarding `port` of the loopback address `ip` to the test broker.
    pub fn start_on(ip: std::net::IpAddr, port: u16) -> Proxy {
        use std::net::{TcpListener, TcpStream};
        let url = url::Url::parse(&amqp_url()).expect("WARREN_TEST_AMQP_URL parses");
        let target = format!(
            "{}:{}",
            url.host_str().unwrap_or("127.0.0.1"),
            url.port().unwrap_or(5672)
        );
        let listener = TcpListener::bind((ip, port)).expect("bind the proxy port");
        listener
            .set_nonblocking(true)
            .expect("nonblocking listener");
        let (stop, stopped) = crossbeam_channel::bounded::<()>(0);
        let frozen = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let frozen_in_thread = Arc::clone(&frozen);
        let received = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let received_in_thread = Arc::clone(&received);
        let login_faults = Arc::default();
        let login_faults_in_thread = Arc::clone(&login_faults);
        let thread = thread::spawn(move || {
            let frozen = frozen_in_thread;
            let received = received_in_thread;
            let login_faults: Arc<std::sync::Mutex<std::collections::VecDeque<LoginFault>>> =
                login_faults_in_thread;
            let mut open: Vec<TcpStream> = Vec::new();
            loop {
                if !matches!(
                    stopped.try_recv(),
                    Err(crossbeam_channel::TryRecvError::Empty)
                ) {
                    for stream in open {
                        let _ = stream.shutdown(std::net::Shutdown::Both);
                    }
                    return;
                }
                match listener.accept() {
                    Ok((client, _)) => {
                        let _ = client.set_nonblocking(false);
                        let Ok(server) = TcpStream::connect(&target) else {
                            continue;
                        };
                        let fault = login_faults.lock().expect("login faults").pop_front();
                        for (mut from, mut to, count, fault) in [
                            (
                                client.try_clone().unwrap(),
                                server.try_clone().unwrap(),
                                Some(Arc::clone(&received)),
                                fault,
                            ),
                            (
                                server.try_clone().unwrap(),
                                client.try_clone().unwrap(),
                                None,
                                None,
                            ),
                        ] {
                            let frozen = Arc::clone(&frozen);
                            thread::spawn(move || {
                                use std::io::{Read, Write};
                                let mut buf = [0u8; 16 * 1024];
                                // The client's bytes so far: the protocol header is 8, and
                                // the login comes after it.
                                let mut sent = 0;
                                while let Ok(n @ 1..) = from.read(&mut buf) {
                                    if let Some(count) = &count {
                                        count.fetch_add(n as u64, Ordering::SeqCst);
                                    }
                                    sent += n;
                                    match fault {
                                        Some(LoginFault::Cut) if sent > 8 => {
                                            let _ = from.shutdown(std::net::Shutdown::Both);
                                            break;
                                        }
                                        Some(LoginFault::Stall) if sent > 8 => continue,
                                        _ => {}
                                    }
                                    // Hold what was read until the network "comes back".
                                    while frozen.load(Ordering::SeqCst) {
                                        thread::sleep(Duration::from_millis(10));
                                    }
                                    if to.write_all(&buf[..n]).is_err() {
                                        break;
                                    }
                                }
                                let _ = to.shutdown(std::net::Shutdown::Both);
                            });
                        }
                        open.push(client);
                        open.push(server);
                    }
                    Err(_) => thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Proxy {
            ip,
            port,
            frozen,
            login_faults,
            received,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    /// Stops forwarding without closing anything, as a dead network does.
    pub fn freeze(&self) {
        self.frozen.store(true, Ordering::SeqCst);
    }

    /// Makes the login of the next connection accepted fail with `fault`; called again, of the
    /// connection after it.
    pub fn fail_next_login(&self, fault: LoginFault) {
        self.login_faults
            .lock()
            .expect("login faults")
            .push_back(fault);
    }

    /// Login faults not yet used by a connection.
    pub fn login_faults_left(&self) -> usize {
        self.login_faults.lock().expect("login faults").len()
    }

    /// Forwards again, including what was held while frozen.
    pub fn thaw(&self) {
        self.frozen.store(false, Ordering::SeqCst);
    }

    /// How many bytes clients have sent through the proxy so far (forwarded or held).
    pub fn received(&self) -> u64 {
        self.received.load(Ordering::SeqCst)
    }

    /// The test broker's URL, through this proxy.
    pub fn url(&self) -> String {
        let host = match self.ip {
            std::net::IpAddr::V4(ip) => ip.to_string(),
            std::net::IpAddr::V6(ip) => format!("[{ip}]"),
        };
        url_at(&host, self.port)
    }
}

/// The test broker's URL with its port replaced by `port`, on 127.0.0.1.
pub fn proxied_url(port: u16) -> String {
    url_at("127.0.0.1", port)
}

fn url_at(host: &str, port: u16) -> String {
    let mut url = url::Url::parse(&amqp_url()).expect("WARREN_TEST_AMQP_URL parses");
    url.set_host(Some(host)).expect("set host");
    url.set_port(Some(port)).expect("set port");
    url.to_string()
}

impl Drop for Proxy {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        // The connections are shut down: what a frozen proxy held is dropped, not delivered,
        // and its forwarding threads end.
        self.frozen.store(false, Ordering::SeqCst);
    }
}

/// A vhost of the test's own, for faults that reach a whole vhost (such as `rabbitmqctl
/// close_all_connections`) and must not reach other tests' connections. The test account may
/// use it; it is deleted, with its queues, when this drops.
pub struct Vhost {
    pub name: String,
}

impl Vhost {
    pub fn create(what: &str) -> Vhost {
        let name = format!(
            "warren-test-{what}-{}-{}",
            std::process::id(),
            fastrand::u32(..)
        );
        let url = url::Url::parse(&amqp_url()).expect("WARREN_TEST_AMQP_URL parses");
        let user = match url.username() {
            "" => "guest".to_string(),
            user => percent_encoding::percent_decode_str(user)
                .decode_utf8_lossy()
                .into_owned(),
        };
        rabbitmqctl(&["add_vhost", &name]);
        let vhost = Vhost { name };
        rabbitmqctl(&[
            "set_permissions",
            "-p",
            &vhost.name,
            &user,
            ".*",
            ".*",
            ".*",
        ]);
        vhost
    }

    /// The test broker's URL with this vhost, percent-encoded, as its path.
    pub fn url(&self) -> String {
        let mut url = url::Url::parse(&amqp_url()).expect("WARREN_TEST_AMQP_URL parses");
        let path =
            percent_encoding::utf8_percent_encode(&self.name, percent_encoding::NON_ALPHANUMERIC);
        url.set_path(&format!("/{path}"));
        url.to_string()
    }
}

impl Drop for Vhost {
    fn drop(&mut self) {
        let _ = Command::new("rabbitmqctl")
            .args(["delete_vhost", &self.name])
            .output();
    }
}

/// A broker user of the test's own, allowed everything in the test broker's vhost, whose
/// password the test can change under a running warren. It is deleted when this drops.
pub struct User {
    pub name: String,
    password: String,
}

impl User {
    pub fn create(what: &str) -> User {
        let name = format!(
            "warren-test-{what}-{}-{}",
            std::process::id(),
            fastrand::u32(..)
        );
        let password = format!("pw-{}", fastrand::u64(..));
        rabbitmqctl(&["add_user", &name, &password]);
        let user = User { name, password };
        let url = url::Url::parse(&amqp_url()).expect("WARREN_TEST_AMQP_URL parses");
        let vhost = match percent_encoding::percent_decode_str(url.path().trim_start_matches('/'))
            .decode_utf8_lossy()
            .into_owned()
        {
            vhost if vhost.is_empty() => "/".to_string(),
            vhost => vhost,
        };
        rabbitmqctl(&[
            "set_permissions",
            "-p",
            &vhost,
            &user.name,
            ".*",
            ".*",
            ".*",
        ]);
        user
    }

    /// The URL of the test broker's port `port` on 127.0.0.1 (a [`Proxy`]'s), as this user.
    pub fn url_at(&self, port: u16) -> String {
        let mut url = url::Url::parse(&proxied_url(port)).expect("a proxied URL parses");
        url.set_username(&self.name).expect("set the user");
        url.set_password(Some(&self.password))
            .expect("set the password");
        url.to_string()
    }

    pub fn password(&self) -> &str {
        &self.password
    }

    /// Gives the user another password: logins with the old one are refused from now on.
    pub fn change_password(&self) {
        rabbitmqctl(&[
            "change_password",
            &self.name,
            &format!("{}-changed", self.password),
        ]);
    }
}

impl Drop for User {
    fn drop(&mut self) {
        let _ = Command::new("rabbitmqctl")
            .args(["delete_user", &self.name])
            .output();
    }
}

/// A session with the broker at `url` (the test broker in another vhost, or through a proxy).
pub fn session_at(url: &str) -> Result<Session, warren::amqp::AmqpError> {
    let text = format!(
        "[broker]\nurl = \"{url}\"\n[queue]\nname = \"unused\"\n[handler]\nkind = \"dots\"\n"
    );
    let config = Config::parse(Path::new("test.toml"), &text, None).expect("the test URL parses");
    Session::open(&config.broker, 0, "warren tests")
}

/// Takes the one message of `queue` and checks that there is no second one.
pub fn take_only(queue: &str) -> Fetched {
    let session = session();
    let message = session
        .get(queue)
        .expect("basic.get")
        .unwrap_or_else(|| panic!("{queue} holds no message"));
    assert!(
        session.get(queue).expect("basic.get").is_none(),
        "{queue} holds a second copy"
    );
    message
}

pub fn str_header<'a>(message: &'a Fetched, name: &str) -> &'a str {
    match message.header(name) {
        Some(Header::Str(s)) => s,
        other => panic!(
            "header {name} is {other:?}, not a string; headers: {:?}",
            message.headers
        ),
    }
}

pub fn int_header(message: &Fetched, name: &str) -> i64 {
    match message.header(name) {
        Some(Header::Int(i)) => *i,
        other => panic!(
            "header {name} is {other:?}, not an integer; headers: {:?}",
            message.headers
        ),
    }
}

/// Checks warren's five dead-letter headers: the reason contains `reason`, the exit status
/// starts with `status`, and the attempts, the time and the work queue are right.
pub fn assert_dead_letter_headers(
    message: &Fetched,
    queue: &str,
    reason: &str,
    status: &str,
    attempts: i64,
) {
    let said = str_header(message, "x-warren-reason");
    assert!(
        said.contains(reason),
        "x-warren-reason {said:?} says {reason:?}"
    );
    let exit = str_header(message, "x-warren-exit-status");
    assert!(
        exit.starts_with(status),
        "x-warren-exit-status {exit:?} starts with {status:?}"
    );
    assert_eq!(int_header(message, "x-warren-attempts"), attempts);
    assert_eq!(str_header(message, "x-warren-queue"), queue);
    let at = str_header(message, "x-warren-dead-lettered-at");
    let at = humantime::parse_rfc3339(at)
        .unwrap_or_else(|e| panic!("x-warren-dead-lettered-at {at:?} is not RFC 3339: {e}"));
    let now = SystemTime::now();
    assert!(
        at <= now + Duration::from_secs(5) && at + Duration::from_secs(300) >= now,
        "x-warren-dead-lettered-at {at:?} is about now ({now:?})"
    );
}

/// Takes the one message of the dead-letter queue of `queues` and checks that it is `id` with
/// its original `body` and the dead-letter headers of [`assert_dead_letter_headers`].
pub fn assert_dead_lettered(
    queues: &Queues,
    id: &str,
    body: &[u8],
    reason: &str,
    status: &str,
    attempts: i64,
) {
    let dead = take_only(&queues.dead);
    assert_eq!(dead.body, body);
    assert_eq!(dead.message_id.as_deref(), Some(id));
    assert_dead_letter_headers(&dead, &queues.work, reason, status, attempts);
}

/// True once process `pid` is gone (or a zombie waiting to be reaped).
pub fn gone(pid: i32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
    }
}

pub fn wait_gone(pid: &str, timeout: Duration) {
    let pid: i32 = pid.parse().unwrap_or_else(|e| panic!("pid {pid:?}: {e}"));
    wait_until(timeout, &format!("process {pid} to be killed"), || {
        gone(pid)
    });
}

/// The status code and body of `GET path` on `port`.
pub fn http_get(port: u16, path: &str) -> (u16, String) {
    let mut stream =
        std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect to the metrics port");
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    write!(stream, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP response: {response}"));
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// The value of the sample `name` (with its labels, exactly as written) in `metrics`.
pub fn metric_sample(metrics: &str, name: &str) -> f64 {
    metric_value(metrics, name).unwrap_or_else(|| panic!("no sample {name} in\n{metrics}"))
}

/// The value of the sample `name` in `metrics`, if there is one yet.
pub fn metric_value(metrics: &str, name: &str) -> Option<f64> {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

/// A `command` handler whose dependency the test switches off and on, for the circuit breaker
/// and the pause tests. Each call appends `<epoch ms> <body> <attempt> ok|fail` to `calls`; it
/// fails (exit 1) while the file `down` exists, and a body that starts with `slow` sleeps 2s
/// first. A body that is `poison` always fails.
pub struct Dependency {
    pub script: PathBuf,
    pub down: PathBuf,
    pub calls: PathBuf,
}

/// One line of a [`Dependency`]'s calls.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Call {
    pub at_ms: u64,
    pub body: String,
    pub attempt: u32,
    pub ok: bool,
}

impl Dependency {
    pub fn new(broker: &Broker, name: &str) -> Dependency {
        let down = broker.dir.path().join(format!("{name}.down"));
        let calls = broker.dir.path().join(format!("{name}.calls"));
        let script = broker.script(
            &format!("{name}.sh"),
            &format!(
                "body=$(cat)\n\
                 case \"$body\" in slow*) sleep 2 ;; esac\n\
                 if [ -e '{down}' ] || [ \"$body\" = poison ]; then verdict=fail; else verdict=ok; fi\n\
                 echo \"$(date +%s%3N) $body $WARREN_ATTEMPT $verdict\" >> '{calls}'\n\
                 [ $verdict = ok ]",
                down = down.display(),
                calls = calls.display()
            ),
        );
        Dependency {
            script,
            down,
            calls,
        }
    }

    /// The dependency fails from now on.
    pub fn fail(&self) {
        fs::write(&self.down, "").expect("create the down flag");
    }

    /// The dependency works again.
    pub fn recover(&self) {
        let _ = fs::remove_file(&self.down);
    }

    /// Every call so far.
    pub fn calls(&self) -> Vec<Call> {
        recorded(&self.calls)
            .iter()
            .map(|line| {
                let fields: Vec<&str> = line.split(' ').collect();
                assert_eq!(fields.len(), 4, "a call line: {line:?}");
                Call {
                    at_ms: fields[0].parse().expect("a time"),
                    body: fields[1].to_string(),
                    attempt: fields[2].parse().expect("an attempt"),
                    ok: fields[3] == "ok",
                }
            })
            .collect()
    }

    /// The bodies that succeeded, each once.
    pub fn done(&self) -> std::collections::BTreeSet<String> {
        self.calls()
            .into_iter()
            .filter(|call| call.ok)
            .map(|call| call.body)
            .collect()
    }
}

/// Milliseconds since the epoch, as the [`Dependency`] script records them.
pub fn epoch_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .expect("after 1970")
        .as_millis() as u64
}
