//! The `warren` binary as a child process: [`Warren`] (a running `warren run`, or any
//! subcommand, whose log is collected line by line as it comes), one-shot subcommands, waiting
//! for processes to go away, and what a running warren serves over HTTP (`/metrics`,
//! `/healthz`). Config files come from `config.rs`, messages from `messages.rs`.

use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use super::{publish_ok, ready_and_unacked, try_session, wait_until};

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

/// Publishes `messages` to `queue` through `config`, waits until `warren` has done them all,
/// stops it with SIGTERM (exit 0) and checks that the queue holds nothing, unacked or not.
pub fn drain_and_stop(mut warren: Warren, config: &Path, queue: &str, messages: &[&str]) {
    publish_ok(config, messages);
    warren.wait_for_count(" done ", messages.len(), Duration::from_secs(20));
    warren.signal(Signal::SIGTERM);
    assert_eq!(warren.wait_exit(Duration::from_secs(10)).code(), Some(0));
    assert_eq!(ready_and_unacked(queue), (0, 0));
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
