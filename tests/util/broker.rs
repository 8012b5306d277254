//! The system broker, as the tests share it: [`BrokerLock`] (a test's claim on the broker, with
//! its unique queue names and scratch directory), sessions, queue counts, `rabbitmqctl` and what
//! it lists, [`Queues`], [`Exchanges`], and the vhosts, users (with the permissions a test
//! gives them) and stopped app of a single test. Nothing here starts warren or writes its config.

use std::collections::HashMap;
use std::fs::{self, File};
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use nix::fcntl::{Flock, FlockArg};
use nix::unistd::Pid;
use warren::amqp::Session;

use super::{proxied_url, wait_until, ConfigFile};

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

/// A test's claim on the system broker: holds the broker lock (shared, or exclusive for tests
/// that stop the broker) and gives unique queue names that are deleted when it drops, and a
/// scratch directory for the test's config files, scripts and whatever its handlers record.
pub struct BrokerLock {
    _lock: Flock<File>,
    queues: Mutex<Vec<String>>,
    pub dir: tempfile::TempDir,
}

impl BrokerLock {
    /// For ordinary tests, which may run in parallel with each other.
    pub fn shared() -> BrokerLock {
        BrokerLock::with_lock(FlockArg::LockShared)
    }

    /// For tests that stop or restart the broker: no other test runs meanwhile.
    pub fn exclusive() -> BrokerLock {
        BrokerLock::with_lock(FlockArg::LockExclusive)
    }

    fn with_lock(arg: FlockArg) -> BrokerLock {
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
        BrokerLock {
            _lock: lock,
            queues: Mutex::new(Vec::new()),
            dir: tempfile::tempdir().expect("create a temporary directory"),
        }
    }

    /// A queue name no other test uses; the queue is deleted when this `BrokerLock` drops.
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

    /// As [`BrokerLock::script_in_dir`], for a script run by `shell`.
    pub fn script_in_dir_for(&self, shell: &str, name: &str, body: &str) -> PathBuf {
        let dir = self.dir.path().display().to_string();
        assert!(
            !dir.contains('\''),
            "the temporary directory needs no quoting"
        );
        self.script_for(shell, name, &format!("DIR='{dir}'\n{body}"))
    }
}

impl Drop for BrokerLock {
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

/// The queues warren declares around one work queue under [`ConfigFile::fast_retries`]. Dropping
/// it deletes the
/// retry queues, which `BrokerLock` does not know about (it deletes only the default ones).
pub struct Queues {
    pub work: String,
    pub retries: [String; 2],
    pub dead: String,
}

impl Queues {
    pub fn new(broker: &BrokerLock, what: &str) -> Queues {
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

pub fn try_session() -> Result<Session, warren::amqp::AmqpError> {
    session_at(&amqp_url())
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

/// Waits until `queue` holds exactly `ready` messages.
pub fn wait_for_ready(queue: &str, ready: u32, timeout: Duration) {
    wait_until(
        timeout,
        &format!("{queue} to hold {ready} ready messages"),
        || queue_counts(queue).0 == ready,
    );
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
        User { name, password }.with_permissions(".*", ".*", ".*")
    }

    /// Gives the user only these permissions (regular expressions, `""` for none) in the test
    /// broker's vhost, as `rabbitmqctl set_permissions` takes them.
    pub fn with_permissions(self, configure: &str, write: &str, read: &str) -> User {
        rabbitmqctl(&[
            "set_permissions",
            "-p",
            &test_vhost(),
            &self.name,
            configure,
            write,
            read,
        ]);
        self
    }

    /// The URL of the test broker, as this user.
    pub fn url(&self) -> String {
        let mut url = url::Url::parse(&amqp_url()).expect("WARREN_TEST_AMQP_URL parses");
        url.set_username(&self.name).expect("set the user");
        url.set_password(Some(&self.password))
            .expect("set the password");
        url.to_string()
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

/// The vhost of the test broker's URL.
fn test_vhost() -> String {
    let url = url::Url::parse(&amqp_url()).expect("WARREN_TEST_AMQP_URL parses");
    match percent_encoding::percent_decode_str(url.path().trim_start_matches('/'))
        .decode_utf8_lossy()
        .into_owned()
    {
        vhost if vhost.is_empty() => "/".to_string(),
        vhost => vhost,
    }
}

/// Deletes the exchanges named when dropped, as [`BrokerLock`] does for its queues.
pub struct Exchanges(pub Vec<String>);

impl Drop for Exchanges {
    fn drop(&mut self) {
        if let Ok(session) = try_session() {
            for exchange in &self.0 {
                let _ = session.delete_exchange(exchange);
            }
        }
    }
}

/// A session with the broker at `url` (the test broker in another vhost, or through a proxy).
pub fn session_at(url: &str) -> Result<Session, warren::amqp::AmqpError> {
    let config = ConfigFile::at(url, "unused").dots().parse();
    Session::open(&config.broker, 0, "warren tests")
}
