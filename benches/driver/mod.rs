//! The benchmark driver: measures a consumer process from the outside, as an operator sees it,
//! against the real broker. The consumer is `warren run`; the baseline, a bare amiquip consume
//! loop that does nothing but ack, which tells how much of a figure is warren's own cost; or
//! `amqp-consume` (rabbitmq-c's amqp-tools), the stock tool that runs a program per message, to
//! hold the `command` handler against.
//!
//! Each run has a fresh durable queue of its own, prefilled with persistent messages through
//! warren's publish path (publisher confirms, collected asynchronously). The consumer runs as a
//! separate process with its output in a log file, as in production, and the driver times it by
//! passive declares on a connection of its own, every [`POLL`]: startup (spawn until every worker
//! consumes), drain (first delivery until no message is ready) and shutdown (SIGTERM until the
//! process exits, which must be with status 0). The queue, and the queues warren declares around
//! it, are deleted when the run ends, failed or not.
//!
//! A binary that includes this module serves as the baseline when it calls
//! [`baseline_worker_if_asked`] first: the driver re-executes it with [`BASELINE_ENV`] set. The
//! request travels in the environment rather than as a flag so that the smoke test's binary,
//! whose libtest harness refuses unknown flags, can serve too. This file lives in
//! `benches/driver/` so that `benches/warren.rs` and `tests/bench_smoke.rs` share it; it is not
//! part of the warren crate.

use std::fmt;
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use amiquip::{Connection, ConsumerMessage, ConsumerOptions};
use crossbeam_channel::{select, Receiver};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use warren::amqp::Session;
use warren::config::Config;
use warren::publish::{self, Options};
use warren::retry::Topology;

/// Set to `QUEUE WORKERS PREFETCH URL`, it turns a binary that includes this module into the
/// baseline consumer.
pub const BASELINE_ENV: &str = "WARREN_BENCH_BASELINE";

/// How often the driver asks the broker for the queue's counts.
const POLL: Duration = Duration::from_millis(2);
/// How long every worker may take to be consuming.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a stopped consumer may take to exit, and the last deliveries to be acked.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(30);
/// A deliberate measurement window: after the workers start consuming (or the queue is
/// drained) memory is read this much later, once the new connections have settled.
const SETTLE: Duration = Duration::from_secs(1);
/// warren's shutdown grace in the bench config. Idle workers stop at once; the grace only
/// bounds a broken run.
const GRACE: &str = "5s";

/// The broker the driver uses: `WARREN_TEST_AMQP_URL`, as for the tests, else the local guest
/// account.
pub fn amqp_url() -> String {
    std::env::var("WARREN_TEST_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_string())
}

/// Replaces the `[broker]` keys of the configs the driver writes (`url = ...` by default), for
/// a broker reached differently, such as over TLS: `url = "amqps://..."` followed by a
/// `[broker.tls]` table. The driver's own connections use the same keys.
pub const BROKER_ENV: &str = "WARREN_BENCH_BROKER";

/// The RabbitMQ node `rabbitmqctl` asks about the queues, when it is not the local default one.
pub const NODE_ENV: &str = "WARREN_BENCH_RABBITMQ_NODE";

/// The `[broker]` keys of the configs the driver writes: [`BROKER_ENV`], else the URL of
/// [`amqp_url`].
fn broker_keys() -> String {
    std::env::var(BROKER_ENV).unwrap_or_else(|_| format!("url = \"{}\"", amqp_url()))
}

/// The consumer a scenario measures.
pub enum Consumer {
    /// `warren run` (the binary cargo built with the bench or test) with these `[handler]` keys.
    Warren { handler: String },
    /// The baseline: the current executable, run with `args` and [`BASELINE_ENV`].
    Baseline { args: Vec<String> },
    /// `amqp-consume` running `command` per message: one process (and connection) per worker,
    /// each with `basic.qos` of the scenario's prefetch; it writes the body to the program's
    /// stdin, waits for it to exit, and acks if it exited with 0. Its programs' output goes to
    /// the run's log.
    AmqpConsume { command: Vec<String> },
}

/// One configuration to measure.
pub struct Scenario {
    /// Short, for queue names and messages: `dots`, `command`, `baseline`.
    pub name: String,
    pub consumer: Consumer,
    pub workers: usize,
    pub prefetch: u16,
    /// Messages prefilled for a drain; for [`memory`], drained after the idle reading.
    pub messages: usize,
}

/// One measured drain.
#[derive(Debug, Clone)]
pub struct Measurement {
    /// The queue the run used; deleted by the time the measurement is returned.
    pub queue: String,
    /// Messages per second over the drain, leaving out the workers × prefetch messages still in
    /// flight when the last one is delivered.
    pub rate: f64,
    pub startup: Duration,
    pub drain: Duration,
    pub shutdown: Duration,
    /// How many bodies (`task N`) the consumer's log shows once it stopped: every one, once,
    /// when each message's program copies its stdin to its stdout, as `/bin/cat` does (warren
    /// logs a program's stdout; amqp-consume's programs write to the log directly).
    pub echoed: usize,
}

/// `VmRSS` and `VmHWM` of a process, in KiB.
#[derive(Debug, Clone, Copy)]
pub struct ProcMemory {
    pub rss_kib: u64,
    pub hwm_kib: u64,
}

/// A consumer's memory with its workers idle, and again after a drain if one was asked for.
#[derive(Debug, Clone, Copy)]
pub struct Memory {
    pub idle: ProcMemory,
    pub drained: Option<ProcMemory>,
}

/// CPU time as `/proc/PID/stat` counts it, in clock ticks (`getconf CLK_TCK` a second).
#[derive(Debug, Clone, Copy)]
pub struct CpuTime {
    pub ticks: u64,
    pub ticks_per_second: u64,
}

impl CpuTime {
    pub fn seconds(&self) -> f64 {
        self.ticks as f64 / self.ticks_per_second as f64
    }
}

/// Why a measurement failed.
#[derive(Debug)]
pub enum Error {
    /// The consumer exited 78: it refused its configuration (such as a handler kind it does not
    /// know). The bench skips a scenario for this; anything else fails it.
    Misconfigured(String),
    Failed(String),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Misconfigured(why) | Error::Failed(why) => f.write_str(why),
        }
    }
}

fn failed(why: impl Into<String>) -> Error {
    Error::Failed(why.into())
}

/// Prefills a queue with `scenario.messages`, starts the consumer, and measures its startup,
/// drain rate and shutdown.
pub fn measure(scenario: &Scenario) -> Result<Measurement, Error> {
    let in_flight = scenario.workers * usize::from(scenario.prefetch);
    if scenario.messages <= in_flight {
        return Err(failed(format!(
            "{} messages cannot time a drain with {in_flight} in flight (workers × prefetch)",
            scenario.messages
        )));
    }
    let mut run = Run::start(scenario, scenario.messages)?;
    let (workers, prefilled) = (run.workers, run.prefilled);
    let spawned = run.process.spawned;
    let (mut startup, mut first, mut last) = (None, None, None);
    let (startup, drain) = run.watch(
        drain_timeout(scenario.messages),
        "every worker consuming and the queue empty",
        |now, ready, consumers| {
            if startup.is_none() && consumers == workers {
                startup = Some(now - spawned);
            }
            if first.is_none() && ready < prefilled {
                first = Some(now);
            }
            if last.is_none() && ready == 0 {
                last = Some(now);
            }
            Some((startup?, last? - first?))
        },
    )?;
    if drain.is_zero() {
        return Err(failed(format!(
            "queue {} emptied between two polls; use more messages",
            run.setup.queue
        )));
    }
    run.wait_acked(SETTLE_TIMEOUT)?;
    let shutdown = run.stop()?;
    Ok(Measurement {
        queue: run.setup.queue.clone(),
        rate: (scenario.messages - in_flight) as f64 / drain.as_secs_f64(),
        startup,
        drain,
        shutdown,
        echoed: run.setup.bodies_in_log()?,
    })
}

/// Starts the consumer on an empty queue and reads its memory once every worker consumes; then,
/// if `scenario.messages` is not 0, publishes that many messages, waits until all are acked, and
/// reads it again.
pub fn memory(scenario: &Scenario) -> Result<Memory, Error> {
    let mut run = Run::start(scenario, 0)?;
    run.wait_consuming()?;
    thread::sleep(SETTLE);
    let idle = run.memory()?;
    let mut drained = None;
    if scenario.messages > 0 {
        fill(&run.setup.config, scenario.messages)?;
        run.wait_acked(drain_timeout(scenario.messages))?;
        thread::sleep(SETTLE);
        drained = Some(run.memory()?);
    }
    run.stop()?;
    Ok(Memory { idle, drained })
}

/// Starts the consumer on an empty queue and returns the CPU time (user and system) it uses
/// over `window` once every worker consumes.
pub fn idle_cpu(scenario: &Scenario, window: Duration) -> Result<CpuTime, Error> {
    let ticks_per_second = clock_ticks()?;
    let mut run = Run::start(scenario, 0)?;
    run.wait_consuming()?;
    thread::sleep(SETTLE);
    let before = cpu_ticks(run.process.pid())?;
    thread::sleep(window);
    let after = cpu_ticks(run.process.pid())?;
    run.stop()?;
    Ok(CpuTime {
        ticks: after.saturating_sub(before),
        ticks_per_second,
    })
}

/// Runs `warren publish --stdin` with `lines` lines and returns its rate: lines per second of
/// the process's wall time, start and connection included. The queue must hold every line
/// afterwards.
pub fn publish_stdin(lines: usize) -> Result<f64, Error> {
    let mut setup = Setup::new("publish", 1, 1, "kind = \"dots\"")?;
    let input: String = (0..lines).map(|i| format!("task {i}\n")).collect();
    let mut command = Command::new(warren_bin());
    command
        .arg("publish")
        .arg("--config")
        .arg(&setup.config_path)
        .arg("--stdin");
    let mut process = setup.spawn(command, Stdio::piped())?;
    let mut stdin = process
        .child
        .stdin
        .take()
        .expect("invariant: stdin is piped");
    let written = stdin.write_all(input.as_bytes());
    drop(stdin);
    let exited = process.wait_exit(drain_timeout(lines));
    let elapsed = process.spawned.elapsed();
    match (written, exited) {
        (Ok(()), Ok(status)) if status.success() => {}
        (Err(e), _) => {
            let why = format!("cannot write to warren publish: {e}");
            return Err(failed(setup.with_log(why)));
        }
        (_, Ok(status)) => {
            let why = format!("warren publish exited with {status}");
            return Err(failed(setup.with_log(why)));
        }
        (_, Err(why)) => return Err(failed(setup.with_log(format!("warren publish: {why}")))),
    }
    let (ready, _) = setup
        .session()?
        .queue_counts(&setup.queue)
        .map_err(|e| failed(format!("cannot count queue {}: {e}", setup.queue)))?;
    if ready as usize != lines {
        let why = format!(
            "queue {} holds {ready} messages after publishing {lines}",
            setup.queue
        );
        return Err(failed(setup.with_log(why)));
    }
    Ok(lines as f64 / elapsed.as_secs_f64())
}

/// How long a drain of `messages` may take: a minute, plus 10 ms a message (100 msg/s).
fn drain_timeout(messages: usize) -> Duration {
    Duration::from_secs(60) + Duration::from_millis(10) * messages as u32
}

/// The `warren` binary to measure: [`BIN_ENV`] if set (another build, for a before-and-after in
/// one sitting), else the one cargo built for this bench or test: the release build under
/// `cargo bench`, the debug build under `cargo test`.
fn warren_bin() -> PathBuf {
    std::env::var_os(BIN_ENV)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_warren")))
}

/// Names another `warren` binary to measure instead of this build's.
pub const BIN_ENV: &str = "WARREN_BENCH_BIN";

/// A run's queue, its config file, and a directory for the log; the queues are deleted when it
/// drops.
struct Setup {
    queue: String,
    config: Config,
    config_path: PathBuf,
    log_path: PathBuf,
    /// Taken and kept, not deleted, when the run fails, so that its log can be read.
    dir: Option<tempfile::TempDir>,
    _queues: Queues,
}

impl Setup {
    fn new(name: &str, workers: usize, prefetch: u16, handler: &str) -> Result<Setup, Error> {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let queue = format!(
            "bench-{name}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let dir = tempfile::tempdir()
            .map_err(|e| failed(format!("cannot create a temporary directory: {e}")))?;
        let config_path = dir.path().join("warren.toml");
        let text = format!(
            "[broker]\n{}\n\n[queue]\nname = \"{queue}\"\n\n[workers]\ncount = {workers}\n\
             prefetch = {prefetch}\n\n[handler]\n{handler}\n\n[shutdown]\ngrace = \"{GRACE}\"\n",
            broker_keys()
        );
        fs::write(&config_path, &text)
            .map_err(|e| failed(format!("cannot write {}: {e}", config_path.display())))?;
        let config = Config::parse(&config_path, &text, None)
            .map_err(|e| failed(format!("the bench config does not parse: {e}")))?;
        let queues = Queues {
            names: Topology::new(&config.queue, &config.retry)
                .all()
                .map(|spec| spec.name.clone())
                .collect(),
            config: config.clone(),
        };
        Ok(Setup {
            log_path: dir.path().join("consumer.log"),
            queue,
            config,
            config_path,
            dir: Some(dir),
            _queues: queues,
        })
    }

    /// A connection of the driver's own.
    fn session(&self) -> Result<Session, Error> {
        Session::open(&self.config.broker, 0, "warren bench driver")
            .map_err(|e| failed(format!("cannot connect the driver: {e}")))
    }

    /// Starts `command` with its standard output and error appended to the run's log file.
    fn spawn(&self, mut command: Command, stdin: Stdio) -> Result<Process, Error> {
        // Appended, for several processes of one run write to it.
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .map_err(|e| failed(format!("cannot create {}: {e}", self.log_path.display())))?;
        let stdout = log
            .try_clone()
            .map_err(|e| failed(format!("cannot share {}: {e}", self.log_path.display())))?;
        // The default log level and format, as in production, whatever the bench's environment.
        for name in [
            "RUST_LOG",
            "WARREN_BROKER_URL",
            "WARREN_CONFIG",
            "JOURNAL_STREAM",
            "NOTIFY_SOCKET",
        ] {
            command.env_remove(name);
        }
        // Nor cargo's: its LD_LIBRARY_PATH (target/ and the toolchain's lib/) would make the
        // dynamic loader search those first in every program a handler starts, which costs
        // /bin/true about 12% of its start here.
        for (name, _) in std::env::vars_os() {
            let name = name.to_string_lossy();
            if name == "LD_LIBRARY_PATH" || name.starts_with("CARGO") || name.starts_with("RUSTUP")
            {
                command.env_remove(&*name);
            }
        }
        // To measure what logging costs: WARREN_BENCH_RUST_LOG=warn cargo bench --bench warren.
        if let Ok(level) = std::env::var("WARREN_BENCH_RUST_LOG") {
            command.env("RUST_LOG", level);
        }
        command.stdin(stdin).stdout(stdout).stderr(log);
        let spawned = Instant::now();
        let child = command.spawn().map_err(|e| {
            failed(format!(
                "cannot start {}: {e}",
                command.get_program().to_string_lossy()
            ))
        })?;
        Ok(Process { child, spawned })
    }

    /// How many message bodies, `task` and a number, the run's log holds.
    fn bodies_in_log(&self) -> Result<usize, Error> {
        let log = fs::read(&self.log_path)
            .map_err(|e| failed(format!("cannot read {}: {e}", self.log_path.display())))?;
        let body = b"task ";
        Ok(log
            .windows(body.len() + 1)
            .filter(|w| w.starts_with(body) && w[body.len()].is_ascii_digit())
            .count())
    }

    /// `why`, with the last line of the run's log and where the log is; the log is kept.
    fn with_log(&mut self, why: impl fmt::Display) -> String {
        let last = fs::read_to_string(&self.log_path)
            .ok()
            .and_then(|log| {
                log.lines()
                    .rev()
                    .find(|line| !line.trim().is_empty())
                    .map(str::to_string)
            })
            .unwrap_or_else(|| "(none)".to_string());
        if let Some(dir) = self.dir.take() {
            let _ = dir.keep();
        }
        format!(
            "{why}; last log line: {last}; log kept in {}",
            self.log_path.display()
        )
    }
}

/// Deletes a run's queues when dropped: the work queue and the dead-letter and retry queues
/// warren declares around it.
struct Queues {
    names: Vec<String>,
    config: Config,
}

impl Drop for Queues {
    fn drop(&mut self) {
        // A failed delete closes its session's channel, so the next one opens a new session.
        let mut session = None;
        for name in &self.names {
            if session.is_none() {
                session = Session::open(&self.config.broker, 0, "warren bench cleanup").ok();
            }
            if let Some(open) = &session {
                if open.delete_queue(name).is_err() {
                    session = None;
                }
            }
        }
    }
}

/// A child process, killed if it is still running when this drops.
struct Process {
    child: Child,
    spawned: Instant,
}

impl Process {
    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for the process to exit, checking every millisecond.
    fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus, String> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.child.try_wait() {
                Ok(Some(status)) => return Ok(status),
                Ok(None) if Instant::now() >= deadline => {
                    return Err(format!("it did not exit within {timeout:?}"))
                }
                Ok(None) => thread::sleep(Duration::from_millis(1)),
                Err(e) => return Err(format!("cannot wait for it: {e}")),
            }
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// One consumer process on a queue of its own, watched on the driver's own connection.
struct Run {
    // Drop order is field order: the processes go before their queues are deleted.
    process: Process,
    /// amqp-consume's processes past the first, one per worker.
    more: Vec<Process>,
    session: Session,
    setup: Setup,
    /// The consumer, for messages: "warren run" or "the baseline".
    what: &'static str,
    workers: u32,
    prefilled: u32,
}

impl Run {
    /// Declares the scenario's queue as warren does, prefills it with `prefill` messages and
    /// starts the consumer.
    fn start(scenario: &Scenario, prefill: usize) -> Result<Run, Error> {
        let handler = match &scenario.consumer {
            Consumer::Warren { handler } => handler.as_str(),
            // Unused by the others, but it makes the config one warren would accept.
            Consumer::Baseline { .. } | Consumer::AmqpConsume { .. } => "kind = \"dots\"",
        };
        let setup = Setup::new(&scenario.name, scenario.workers, scenario.prefetch, handler)?;
        fill(&setup.config, prefill)?;
        let session = setup.session()?;
        let mut more = Vec::new();
        let (command, what) = match &scenario.consumer {
            Consumer::Warren { .. } => {
                let mut command = Command::new(warren_bin());
                command.arg("run").arg("--config").arg(&setup.config_path);
                (command, "warren run")
            }
            Consumer::AmqpConsume { command } => {
                // "--": the program's own arguments are not amqp-consume's options.
                let amqp_consume = || {
                    let mut consume = Command::new("amqp-consume");
                    consume
                        .args(["--url", &amqp_url(), "--queue", &setup.queue])
                        .args(["--prefetch-count", &scenario.prefetch.to_string()])
                        .arg("--")
                        .args(command);
                    consume
                };
                for _ in 1..scenario.workers {
                    more.push(setup.spawn(amqp_consume(), Stdio::null())?);
                }
                (amqp_consume(), "amqp-consume")
            }
            Consumer::Baseline { args } => {
                let exe = std::env::current_exe()
                    .map_err(|e| failed(format!("cannot find the current executable: {e}")))?;
                let mut command = Command::new(exe);
                command.args(args).env(
                    BASELINE_ENV,
                    format!(
                        "{} {} {} {}",
                        setup.queue,
                        scenario.workers,
                        scenario.prefetch,
                        amqp_url()
                    ),
                );
                (command, "the baseline")
            }
        };
        let process = setup.spawn(command, Stdio::null())?;
        Ok(Run {
            process,
            more,
            session,
            setup,
            what,
            workers: u32::try_from(scenario.workers)
                .map_err(|_| failed(format!("{} workers are too many", scenario.workers)))?,
            prefilled: u32::try_from(prefill)
                .map_err(|_| failed(format!("{prefill} messages are too many")))?,
        })
    }

    /// Polls the queue's ready messages and consumers until `done(now, ready, consumers)` gives
    /// a result. Fails if the consumer exits ([`Error::Misconfigured`] if with 78) or after `timeout`.
    fn watch<T>(
        &mut self,
        timeout: Duration,
        waiting_for: &str,
        mut done: impl FnMut(Instant, u32, u32) -> Option<T>,
    ) -> Result<T, Error> {
        let deadline = Instant::now() + timeout;
        loop {
            self.check_running(waiting_for)?;
            let (ready, consumers) = self
                .session
                .queue_counts(&self.setup.queue)
                .map_err(|e| failed(format!("cannot count queue {}: {e}", self.setup.queue)))?;
            if let Some(result) = done(Instant::now(), ready, consumers) {
                return Ok(result);
            }
            if Instant::now() >= deadline {
                return Err(failed(self.setup.with_log(format!(
                    "no {waiting_for} within {timeout:?} ({ready} ready, {consumers} consumers)"
                ))));
            }
            thread::sleep(POLL);
        }
    }

    fn check_running(&mut self, waiting_for: &str) -> Result<(), Error> {
        let mut exited = None;
        for process in std::iter::once(&mut self.process).chain(&mut self.more) {
            match process.child.try_wait() {
                Ok(None) => {}
                Ok(Some(status)) => exited = Some(status),
                Err(e) => return Err(failed(format!("cannot wait for {}: {e}", self.what))),
            }
        }
        let Some(status) = exited else {
            return Ok(());
        };
        let why = self.setup.with_log(format!(
            "{} exited with {status} while the driver waited for {waiting_for}",
            self.what
        ));
        Err(match status.code() {
            Some(78) => Error::Misconfigured(why),
            _ => Error::Failed(why),
        })
    }

    fn wait_consuming(&mut self) -> Result<(), Error> {
        let workers = self.workers;
        self.watch(
            STARTUP_TIMEOUT,
            "every worker consuming",
            |_, _, consumers| (consumers == workers).then_some(()),
        )
    }

    /// Waits until the broker reports nothing ready and nothing unacknowledged in the queue.
    fn wait_acked(&mut self, timeout: Duration) -> Result<(), Error> {
        let vhost = self.setup.config.broker.urls[0].vhost();
        let deadline = Instant::now() + timeout;
        loop {
            self.check_running("every message acked")?;
            // Each rabbitmqctl call takes most of a second: no pause is needed between them.
            let (ready, unacked) = ready_and_unacked(&vhost, &self.setup.queue)?;
            if (ready, unacked) == (0, 0) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(failed(self.setup.with_log(format!(
                    "queue {} still holds {ready} ready and {unacked} unacked messages after {timeout:?}",
                    self.setup.queue
                ))));
            }
        }
    }

    fn memory(&self) -> Result<ProcMemory, Error> {
        proc_memory(self.process.pid())
    }

    /// Sends SIGTERM and returns how long the consumer took to exit, which it must with 0
    /// (amqp-consume, which has no handler for it, by the signal).
    fn stop(&mut self) -> Result<Duration, Error> {
        let mut processes: Vec<&mut Process> = std::iter::once(&mut self.process)
            .chain(&mut self.more)
            .collect();
        for process in &processes {
            let pid = i32::try_from(process.pid())
                .map_err(|_| failed(format!("pid {} does not fit a pid_t", process.pid())))?;
            kill(Pid::from_raw(pid), Signal::SIGTERM)
                .map_err(|e| failed(format!("cannot send SIGTERM to {}: {e}", self.what)))?;
        }
        let sent = Instant::now();
        let mut exits = Vec::new();
        for process in &mut processes {
            exits.push(process.wait_exit(SETTLE_TIMEOUT));
        }
        let took = sent.elapsed();
        let by_sigterm = self.what == "amqp-consume";
        for exited in exits {
            match exited {
                Ok(status) if status.success() => {}
                Ok(status) if by_sigterm && status.signal() == Some(Signal::SIGTERM as i32) => {}
                Ok(status) => {
                    return Err(failed(self.setup.with_log(format!(
                        "{} exited with {status} after SIGTERM",
                        self.what
                    ))))
                }
                Err(why) => {
                    return Err(failed(
                        self.setup
                            .with_log(format!("{} after SIGTERM: {why}", self.what)),
                    ))
                }
            }
        }
        Ok(took)
    }
}

/// Publishes `count` persistent messages to the config's queue with confirms, through warren's
/// publish path; declares the queue as `warren run` does, even for none.
fn fill(config: &Config, count: usize) -> Result<(), Error> {
    let options = Options {
        target: publish::Target::Queue(config.queue.name.clone()),
        declare: true,
        confirm_timeout: Duration::from_secs(60),
        stamp: Default::default(),
        metrics_file: None,
    };
    let bodies = (0..count).map(|i| Ok(format!("task {i}").into_bytes()));
    let summary = publish::publish(config, &options, bodies)
        .map_err(|e| failed(format!("cannot fill {}: {e}", options.target)))?;
    if summary.confirmed != count {
        return Err(failed(format!(
            "{}: {} of {count} messages confirmed",
            options.target, summary.confirmed
        )));
    }
    Ok(())
}

/// Ready and unacknowledged messages of `queue`, as `rabbitmqctl list_queues` reports them (on
/// the node [`NODE_ENV`] names, if set).
fn ready_and_unacked(vhost: &str, queue: &str) -> Result<(u64, u64), Error> {
    let mut rabbitmqctl = Command::new("rabbitmqctl");
    if let Ok(node) = std::env::var(NODE_ENV) {
        rabbitmqctl.args(["-n", &node]);
    }
    let out = rabbitmqctl
        .args(["list_queues", "-p", vhost, "-q", "--no-table-headers"])
        .args(["name", "messages_ready", "messages_unacknowledged"])
        .output()
        .map_err(|e| failed(format!("cannot run rabbitmqctl: {e}")))?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        return Err(failed(format!(
            "rabbitmqctl list_queues failed: {}",
            stderr.lines().next().unwrap_or("").trim()
        )));
    }
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(
            |line| match line.split_whitespace().collect::<Vec<_>>()[..] {
                [name, ready, unacked] if name == queue => {
                    Some((ready.parse().ok()?, unacked.parse().ok()?))
                }
                _ => None,
            },
        )
        .ok_or_else(|| {
            failed(format!(
                "rabbitmqctl list_queues does not show queue {queue}"
            ))
        })
}

/// `VmRSS` and `VmHWM` from `/proc/PID/status`.
fn proc_memory(pid: u32) -> Result<ProcMemory, Error> {
    let path = format!("/proc/{pid}/status");
    let text = fs::read_to_string(&path).map_err(|e| failed(format!("cannot read {path}: {e}")))?;
    let kib = |key: &str| {
        text.lines()
            .find_map(|line| line.strip_prefix(key))
            .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
            .ok_or_else(|| failed(format!("{path} has no {key} line in kB")))
    };
    Ok(ProcMemory {
        rss_kib: kib("VmRSS:")?,
        hwm_kib: kib("VmHWM:")?,
    })
}

/// User plus system CPU time of the whole process (all its threads), in clock ticks, from
/// `/proc/PID/stat`.
fn cpu_ticks(pid: u32) -> Result<u64, Error> {
    let path = format!("/proc/{pid}/stat");
    let text = fs::read_to_string(&path).map_err(|e| failed(format!("cannot read {path}: {e}")))?;
    // Field 2, the command name in parentheses, may hold spaces: count from after it, where
    // field 3 (the state) starts.
    let after_name: Vec<&str> = text
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let field = |n: usize| {
        after_name
            .get(n - 3)
            .and_then(|value| value.parse::<u64>().ok())
            .ok_or_else(|| failed(format!("{path} has no numeric field {n}")))
    };
    Ok(field(14)? + field(15)?)
}

/// Clock ticks per second, the unit of `/proc/PID/stat`'s times.
fn clock_ticks() -> Result<u64, Error> {
    let out = Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .map_err(|e| failed(format!("cannot run getconf CLK_TCK: {e}")))?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.trim()
        .parse()
        .map_err(|_| failed(format!("getconf CLK_TCK printed {:?}", text.trim())))
}

/// Runs the baseline consumer and exits, if [`BASELINE_ENV`] asks for it; returns otherwise.
/// Call it first thing in a binary that serves as the baseline.
pub fn baseline_worker_if_asked() {
    let Some(request) = std::env::var_os(BASELINE_ENV) else {
        return;
    };
    let code = match baseline(&request.to_string_lossy()) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("baseline: {e}");
            1
        }
    };
    std::process::exit(code);
}

/// The baseline: `QUEUE WORKERS PREFETCH URL`, one consuming thread per worker, until SIGTERM
/// or Ctrl+C.
fn baseline(request: &str) -> Result<(), String> {
    let usage =
        || format!("{BASELINE_ENV} must be \"QUEUE WORKERS PREFETCH URL\", not {request:?}");
    let [queue, workers, prefetch, url] = request.split(' ').collect::<Vec<_>>()[..] else {
        return Err(usage());
    };
    let workers: usize = workers.parse().map_err(|_| usage())?;
    let prefetch: u16 = prefetch.parse().map_err(|_| usage())?;
    // The only sender: the signal thread drops it, and every worker sees the disconnect.
    let (stop, stopped) = crossbeam_channel::bounded::<()>(0);
    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGINT,
    ])
    .map_err(|e| format!("cannot handle SIGTERM: {e}"))?;
    thread::spawn(move || {
        signals.forever().next();
        drop(stop);
    });
    let threads = (0..workers)
        .map(|n| {
            let (queue, url, stopped) = (queue.to_string(), url.to_string(), stopped.clone());
            thread::Builder::new()
                .name(format!("baseline-{n}"))
                .spawn(move || consume(&queue, prefetch, &url, &stopped))
                .map_err(|e| format!("cannot start thread baseline-{n}: {e}"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    for (n, thread) in threads.into_iter().enumerate() {
        thread
            .join()
            .map_err(|_| format!("thread baseline-{n} panicked"))?
            .map_err(|e| format!("baseline-{n}: {e}"))?;
    }
    Ok(())
}

/// One baseline worker: its own connection and channel, fair dispatch with `prefetch`, and an
/// ack for each delivery as it arrives, until `stopped` disconnects.
fn consume(queue: &str, prefetch: u16, url: &str, stopped: &Receiver<()>) -> Result<(), String> {
    let mut connection =
        Connection::insecure_open(url).map_err(|e| format!("cannot connect: {e}"))?;
    let channel = connection
        .open_channel(None)
        .map_err(|e| format!("cannot open a channel: {e}"))?;
    channel
        .qos(0, prefetch, false)
        .map_err(|e| format!("basic.qos: {e}"))?;
    let consumer = channel
        .basic_consume(queue, ConsumerOptions::default())
        .map_err(|e| format!("cannot consume queue {queue}: {e}"))?;
    loop {
        select! {
            recv(consumer.receiver()) -> message => match message {
                Ok(ConsumerMessage::Delivery(delivery)) => consumer
                    .ack(delivery)
                    .map_err(|e| format!("cannot ack: {e}"))?,
                other => return Err(format!("the consumer of queue {queue} ended: {other:?}")),
            },
            recv(stopped) -> _ => break,
        }
    }
    // amiquip's I/O thread fails if a consumer is dropped before the broker confirms its
    // cancel, so wait for that. A delivery that arrives meanwhile stays unacked, and the broker
    // requeues it when the connection closes.
    consumer
        .cancel()
        .map_err(|e| format!("cannot cancel the consumer: {e}"))?;
    for message in consumer.receiver().iter() {
        if !matches!(message, ConsumerMessage::Delivery(_)) {
            break;
        }
    }
    drop(consumer);
    drop(channel);
    connection
        .close()
        .map_err(|e| format!("cannot close the connection: {e}"))
}
