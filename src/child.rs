//! Running handler programs: the command every program starts with, one `command` task run to
//! its end on the worker thread, and the pieces the `pipe` handler shares (waiting on a pipe
//! together with the abort, logging a program's output line by line).
//!
//! A task runs without a thread of its own: the worker writes the body, reads the program's
//! stdout and stderr, and learns of its exit (through a pidfd) in one `poll` loop that also
//! watches the abort's pipe and the deadline. Starting and joining threads per task would cost
//! more than a short program's whole run. For the first `QUIET` of a run the loop leaves the
//! output pipes out and reads them once the program exits: most programs a queue runs are
//! short, and each wake-up is a trip through the scheduler on the path of every message.

use std::ffi::{CStr, CString, OsString};
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::{fcntl, FcntlArg, OFlag};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::spawn::{posix_spawnp, PosixSpawnAttr, PosixSpawnFileActions, PosixSpawnFlags};
use nix::sys::signal::{killpg, SigSet, Signal};
use nix::unistd::{pipe2, Pid};
use rustix::process::WaitOptions;

use crate::abort::Abort;
use crate::config;
use crate::context;

/// Longest line of a program's output that goes to the log as one line; longer lines are split.
const MAX_LOG_LINE: usize = 4096;
/// How much of each output stream of one task goes to the log; the rest is read and dropped,
/// so that a chatty program neither floods the log nor blocks on a full pipe.
pub const MAX_LOGGED_OUTPUT: usize = 64 * 1024;
/// How long to wait, after a program exits, for its output to be logged. A descendant that keeps
/// the pipes open must not hold up the worker.
const OUTPUT_DRAIN: Duration = Duration::from_millis(250);
/// Without a pidfd (Linux before 5.3), how often the loop checks whether the program exited.
const EXIT_CHECK: Duration = Duration::from_millis(10);
/// How long after its start a program's output pipes are left out of the `poll`. A program that
/// exits within it wakes the worker once, for its exit, rather than also for each write and for
/// each pipe it closes: running `/bin/cat` per message, the worker thread went to sleep 3 times
/// per message (the spawn, the exit, the next delivery) instead of 5.3 (BENCHMARKS.md). Its
/// output is read when it exits or once this has passed; a program that fills a pipe (64 KiB)
/// sooner waits for the rest of it, once.
const QUIET: Duration = Duration::from_millis(10);

/// The command that starts `argv` for a worker: never through a shell, with the environment
/// every handler program gets, all three standard streams piped, in a process group of its own.
/// A `pipe` program starts this way; a `command` one, once per message, through [`Program`].
pub fn program(argv: &[String], queue: &str, worker: usize) -> Command {
    let mut command = Command::new(&argv[0]);
    command
        .args(&argv[1..])
        .env_clear()
        .envs(environment(queue, worker))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Its own process group: a Ctrl+C at the terminal does not reach the task, which
        // should finish within the grace, and a kill reaches all of its descendants.
        .process_group(0);
    command
}

/// The environment every handler program of `worker` starts with: warren's own, without what
/// is warren's alone or could pass for a message's, and with the queue and the worker's number.
fn environment(queue: &str, worker: usize) -> Vec<(OsString, OsString)> {
    let mut vars: Vec<(OsString, OsString)> = std::env::vars_os()
        .filter(|(name, _)| {
            let name = name.as_encoded_bytes();
            // A message's variables are the message's: none comes from warren's own
            // environment.
            !(name.starts_with(context::HEADER_PREFIX.as_bytes())
                || [
                    // It may hold the broker password; tasks have no business with it.
                    config::BROKER_URL_ENV,
                    // systemd's notify socket and watchdog are warren's, not its tasks'.
                    "NOTIFY_SOCKET",
                    "WATCHDOG_USEC",
                    "WATCHDOG_PID",
                    context::OMITTED,
                    context::TRACEPARENT,
                    context::TRACESTATE,
                    "WARREN_QUEUE",
                    "WARREN_WORKER",
                ]
                .iter()
                .any(|var| name == var.as_bytes()))
        })
        .collect();
    vars.push(("WARREN_QUEUE".into(), queue.into()));
    vars.push(("WARREN_WORKER".into(), worker.to_string().into()));
    vars
}

/// How a worker starts a `command` program for each message, made once: its arguments and the
/// environment it inherits as C strings, so that a start copies only the message's variables.
/// The start is a `posix_spawn` that std's `Command` also makes, without `Command`'s copy of
/// the whole environment into a map and back on every start.
pub struct Program {
    argv: Vec<CString>,
    /// The inherited variables no message can set.
    environment: Vec<CString>,
    /// The inherited variables named `WARREN_*`, which a message's variable of the same name
    /// replaces.
    overridable: Vec<(Vec<u8>, CString)>,
}

impl Program {
    /// The program `argv` (no argument holds a NUL byte: the configuration refuses one) for
    /// `worker` of `queue`.
    pub fn new(argv: &[String], queue: &str, worker: usize) -> Program {
        let c = |text: Vec<u8>| CString::new(text).expect("invariant: no NUL byte");
        let mut program = Program {
            argv: argv.iter().map(|arg| c(arg.clone().into_bytes())).collect(),
            environment: Vec::new(),
            overridable: Vec::new(),
        };
        for (name, value) in environment(queue, worker) {
            let name = name.into_encoded_bytes();
            let var = c([&name[..], b"=", value.as_encoded_bytes()].concat());
            if name.starts_with(b"WARREN_") {
                program.overridable.push((name, var));
            } else {
                program.environment.push(var);
            }
        }
        program
    }

    /// The program's name, for messages.
    pub fn name(&self) -> std::borrow::Cow<'_, str> {
        self.argv[0].to_string_lossy()
    }

    /// Starts the program with the message's `vars` on top of its environment, its three
    /// standard streams piped (warren's ends non-blocking) and in a process group of its own.
    fn spawn(&self, vars: &[(String, String)]) -> io::Result<Spawned> {
        let message = vars
            .iter()
            .map(|(name, value)| CString::new(format!("{name}={value}")))
            .collect::<Result<Vec<_>, _>>()?;
        let inherited = self.overridable.iter().filter_map(|(name, var)| {
            let replaced = vars
                .iter()
                .any(|(set, _)| set.as_bytes() == name.as_slice());
            (!replaced).then_some(var)
        });
        let envp: Vec<&CStr> = self
            .environment
            .iter()
            .chain(inherited)
            .chain(&message)
            .map(CString::as_c_str)
            .collect();
        // Every end is close-on-exec; the three the program gets are duplicated onto 0, 1 and
        // 2, which clears it. Each end is an open file of its own: warren's are made
        // non-blocking, the program's stay blocking.
        let (stdin, stdin_writer) = pipe2(OFlag::O_CLOEXEC)?;
        let (stdout_reader, stdout) = pipe2(OFlag::O_CLOEXEC)?;
        let (stderr_reader, stderr) = pipe2(OFlag::O_CLOEXEC)?;
        for end in [&stdin_writer, &stdout_reader, &stderr_reader] {
            fcntl(end, FcntlArg::F_SETFL(OFlag::O_NONBLOCK))?;
        }
        let mut actions = PosixSpawnFileActions::init()?;
        actions.add_dup2(stdin.as_raw_fd(), 0)?;
        actions.add_dup2(stdout.as_raw_fd(), 1)?;
        actions.add_dup2(stderr.as_raw_fd(), 2)?;
        let mut attributes = PosixSpawnAttr::init()?;
        attributes.set_flags(
            PosixSpawnFlags::POSIX_SPAWN_SETPGROUP
                | PosixSpawnFlags::POSIX_SPAWN_SETSIGMASK
                | PosixSpawnFlags::POSIX_SPAWN_SETSIGDEF,
        )?;
        // Its own process group: a Ctrl+C at the terminal does not reach the task, which
        // should finish within the grace, and a kill reaches all of its descendants.
        attributes.set_pgroup(Pid::from_raw(0))?;
        // No signal blocked, and SIGPIPE's default action, which Rust's runtime ignores.
        attributes.set_sigmask(&SigSet::empty())?;
        attributes.set_sigdefault(&SigSet::from(Signal::SIGPIPE))?;
        let pid = posix_spawnp(&self.argv[0], &actions, &attributes, &self.argv, &envp)?;
        Ok(Spawned {
            pid,
            stdin: File::from(stdin_writer),
            stdout: File::from(stdout_reader),
            stderr: File::from(stderr_reader),
        })
    }
}

/// A program [`Program::spawn`] started: its pid and warren's ends of its pipes.
struct Spawned {
    pid: Pid,
    stdin: File,
    stdout: File,
    stderr: File,
}

/// How a program ended, for the log and the dead-letter headers.
pub fn describe(status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit status {code}"),
        (None, Some(signal)) => match Signal::try_from(signal) {
            Ok(name) => format!("killed by signal {signal} ({name})"),
            Err(_) => format!("killed by signal {signal}"),
        },
        _ => status.to_string(),
    }
}

/// Logs a stream's bytes line by line with a prefix, splitting lines longer than
/// [`MAX_LOG_LINE`], up to `limit` bytes; past that, one line says the rest is not logged.
pub struct LineLog {
    prefix: String,
    line: Vec<u8>,
    logged: usize,
    limit: usize,
    /// Instead of logging: the bytes kept (up to `limit`), or how many there were past it.
    kept: Option<Result<Vec<u8>, usize>>,
}

impl LineLog {
    pub fn new(prefix: String, limit: Option<usize>) -> LineLog {
        LineLog {
            prefix,
            line: Vec::new(),
            logged: 0,
            limit: limit.unwrap_or(usize::MAX),
            kept: None,
        }
    }

    /// Keeps the stream's bytes, up to `limit`, instead of logging them (a command's reply).
    pub fn keeping(prefix: String, limit: usize) -> LineLog {
        LineLog {
            kept: Some(Ok(Vec::new())),
            ..LineLog::new(prefix, Some(limit))
        }
    }

    /// What [`LineLog::keeping`] kept: the bytes, or how many there were when more than its
    /// limit. `None` for a log.
    pub fn take_kept(&mut self) -> Option<Result<Vec<u8>, usize>> {
        self.kept.take()
    }

    pub fn feed(&mut self, mut bytes: &[u8]) {
        match &mut self.kept {
            Some(Ok(kept)) if kept.len() + bytes.len() <= self.limit => {
                return kept.extend_from_slice(bytes)
            }
            Some(Ok(kept)) => {
                let total = kept.len() + bytes.len();
                self.kept = Some(Err(total));
                return;
            }
            Some(Err(total)) => return *total = total.saturating_add(bytes.len()),
            None => {}
        }
        while !bytes.is_empty() {
            let room = MAX_LOG_LINE - self.line.len();
            match bytes[..bytes.len().min(room)]
                .iter()
                .position(|&b| b == b'\n')
            {
                Some(end) => {
                    self.line.extend_from_slice(&bytes[..=end]);
                    bytes = &bytes[end + 1..];
                    self.emit();
                }
                None => {
                    let take = bytes.len().min(room);
                    self.line.extend_from_slice(&bytes[..take]);
                    bytes = &bytes[take..];
                    if self.line.len() == MAX_LOG_LINE {
                        self.emit();
                    }
                }
            }
        }
    }

    /// Feeds what `pipe` holds until it would block (false) or is closed or fails (true).
    pub fn read_from(&mut self, pipe: &mut impl Read) -> bool {
        let mut chunk = [0; 8192];
        loop {
            match pipe.read(&mut chunk) {
                Ok(0) => return true,
                Ok(n) => self.feed(&chunk[..n]),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return false,
                Err(e) => {
                    log::warn!("{} cannot read: {e}", self.prefix);
                    return true;
                }
            }
        }
    }

    /// Logs what is left of an unfinished last line.
    pub fn finish(&mut self) {
        if !self.line.is_empty() {
            self.emit();
        }
    }

    fn emit(&mut self) {
        let n = self.line.len();
        if self.logged >= self.limit {
            if self.logged == self.limit {
                log::warn!(
                    "{} more than {} bytes of output; the rest is not logged",
                    self.prefix,
                    self.limit
                );
            }
            self.logged = self.logged.saturating_add(n);
        } else {
            self.logged = self.logged.saturating_add(n).min(self.limit);
            let text = self.line.strip_suffix(b"\n").unwrap_or(&self.line);
            log::info!("{} {}", self.prefix, String::from_utf8_lossy(text));
        }
        self.line.clear();
    }
}

/// Logs a long-lived program's output stream on a thread of its own, with no limit.
pub fn log_output(pipe: impl Read + Send + 'static, worker: &str, stream: &str) {
    let mut log = LineLog::new(format!("{worker} {stream}:"), None);
    let spawned = thread::Builder::new()
        .name(format!("{worker}-{stream}"))
        .spawn(move || {
            let mut pipe = pipe;
            log.read_from(&mut pipe);
            log.finish();
        });
    if let Err(e) = spawned {
        log::warn!("{worker}: cannot start a thread to log the program's {stream}: {e}");
    }
}

pub fn set_nonblocking(fd: BorrowedFd<'_>) -> io::Result<()> {
    let flags = OFlag::from_bits_truncate(fcntl(fd, FcntlArg::F_GETFL)?);
    fcntl(fd, FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK))?;
    Ok(())
}

/// How a wait on a pipe ended.
pub enum Waited {
    Ready,
    Aborted,
    TimedOut,
    Failed(io::Error),
}

/// Waits until `fd` is ready for `events`, the abort fires or `deadline` passes.
pub fn wait_ready(
    fd: BorrowedFd<'_>,
    events: PollFlags,
    deadline: Instant,
    abort: &Abort,
) -> Waited {
    loop {
        let Some(timeout) = poll_timeout(Some(deadline)) else {
            return Waited::TimedOut;
        };
        let mut fds = [
            PollFd::new(fd, events),
            PollFd::new(abort.fd(), PollFlags::POLLIN),
        ];
        match poll(&mut fds, timeout) {
            Ok(0) | Err(Errno::EINTR) => {}
            Ok(_) if ready(&fds[1]) => return Waited::Aborted,
            Ok(_) => return Waited::Ready,
            Err(e) => return Waited::Failed(e.into()),
        }
    }
}

/// The `poll` timeout until `deadline` (rounded up, so that the wait does not end just short of
/// it), or `None` once it has passed. No deadline waits for ever.
fn poll_timeout(deadline: Option<Instant>) -> Option<PollTimeout> {
    let Some(deadline) = deadline else {
        return Some(PollTimeout::NONE);
    };
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return None;
    }
    let millis = left.as_nanos().div_ceil(1_000_000).min(i32::MAX as u128) as i32;
    Some(PollTimeout::try_from(millis).unwrap_or(PollTimeout::MAX))
}

/// Adds `fd`, if there is one, to the poll set; returns its index there.
fn slot<'a>(
    fds: &mut Vec<PollFd<'a>>,
    fd: Option<BorrowedFd<'a>>,
    events: PollFlags,
) -> Option<usize> {
    let fd = fd?;
    fds.push(PollFd::new(fd, events));
    Some(fds.len() - 1)
}

fn ready(fd: &PollFd<'_>) -> bool {
    fd.revents().is_some_and(|r| !r.is_empty())
}

/// How a task's program ended.
pub struct Run {
    pub status: ExitStatus,
    /// Its standard output, when [`Limits::keep_stdout`] asked for it: the bytes, or how many
    /// there were when more than the limit.
    pub stdout: Option<Result<Vec<u8>, usize>>,
    /// It ran past the timeout and was stopped.
    pub timed_out: bool,
    /// The abort fired and it was killed (it may have exited by itself just before).
    pub aborted: bool,
}

/// Limits on one run.
pub struct Limits<'a> {
    pub timeout: Duration,
    pub kill_grace: Duration,
    pub abort: &'a Abort,
    /// Keep up to this many bytes of standard output, instead of logging it.
    pub keep_stdout: Option<usize>,
}

/// Starts `command`, writes `body` to its stdin and closes it, logs its stdout and stderr (each
/// up to [`MAX_LOGGED_OUTPUT`]) with `worker`'s prefix, and waits for it to exit. Past the
/// timeout its process group gets SIGTERM, and SIGKILL after the kill grace; when the abort
/// fires it gets SIGKILL at once.
pub fn run(
    program: &Program,
    vars: &[(String, String)],
    body: &[u8],
    worker: &str,
    limits: &Limits<'_>,
) -> Result<Run, RunError> {
    let spawned = program.spawn(vars).map_err(RunError::Start)?;
    let mut task = Task::new(spawned, worker, limits.keep_stdout);
    task.run(body, worker, limits).map_err(|e| {
        // Nothing may outlive a run that warren gave up on.
        let _ = killpg(task.pid, Signal::SIGKILL);
        let _ = task.wait(WaitOptions::empty());
        RunError::Wait(e)
    })
}

/// Why a task's program could not be run to its end.
#[derive(Debug)]
pub enum RunError {
    /// It could not be started.
    Start(io::Error),
    /// Watching it failed; it was killed.
    Wait(io::Error),
}

/// What one `poll` found ready.
struct Ready {
    stdin: bool,
    stdout: bool,
    stderr: bool,
    exited: bool,
    abort: bool,
}

/// The pipes of a running task.
struct Task {
    pid: Pid,
    stdin: Option<File>,
    stdout: Option<(File, LineLog)>,
    stderr: Option<(File, LineLog)>,
    /// Readable once the program has exited; `None` where the kernel has no pidfds.
    pidfd: Option<OwnedFd>,
    /// What stdout kept, once it closed, when it keeps rather than logs.
    kept_stdout: Option<Result<Vec<u8>, usize>>,
}

impl Task {
    fn new(spawned: Spawned, worker: &str, keep_stdout: Option<usize>) -> Task {
        let Spawned {
            pid,
            stdin,
            stdout,
            stderr,
        } = spawned;
        let pidfd = rustix::process::Pid::from_raw(pid.as_raw()).and_then(|pid| {
            rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::empty()).ok()
        });
        let log =
            |stream: &str| LineLog::new(format!("{worker} {stream}:"), Some(MAX_LOGGED_OUTPUT));
        Task {
            pid,
            stdin: Some(stdin),
            stdout: Some(match keep_stdout {
                Some(limit) => (stdout, LineLog::keeping(format!("{worker} stdout:"), limit)),
                None => (stdout, log("stdout")),
            }),
            stderr: Some((stderr, log("stderr"))),
            pidfd,
            kept_stdout: None,
        }
    }

    /// The program's exit status once it has exited: `NOHANG` returns `None` while it runs.
    fn wait(&self, options: WaitOptions) -> io::Result<Option<ExitStatus>> {
        use std::os::unix::process::ExitStatusExt;
        let pid = rustix::process::Pid::from_raw(self.pid.as_raw());
        loop {
            match rustix::process::waitpid(pid, options) {
                Err(rustix::io::Errno::INTR) => {}
                Err(e) => return Err(e.into()),
                Ok(waited) => {
                    return Ok(waited.map(|(_, status)| ExitStatus::from_raw(status.as_raw())))
                }
            }
        }
    }

    fn run(&mut self, mut body: &[u8], worker: &str, limits: &Limits<'_>) -> io::Result<Run> {
        let started = Instant::now();
        if body.is_empty() {
            self.stdin = None;
        } else {
            // A body that fits the pipe goes in at once, without a `poll` first.
            body = self.feed(body);
        }
        let mut deadline = Some(started + limits.timeout);
        // Only the exit is seen without waking for it: no quiet start without a pidfd.
        let mut quiet = self.pidfd.is_some().then_some(started + QUIET);
        let mut timed_out = false;
        let mut aborted = false;
        let status = loop {
            let mut wait = deadline;
            if self.pidfd.is_none() {
                let check = Instant::now() + EXIT_CHECK;
                wait = Some(wait.map_or(check, |d| d.min(check)));
            }
            if let Some(until) = quiet {
                if Instant::now() >= until {
                    quiet = None;
                } else {
                    wait = Some(wait.map_or(until, |d| d.min(until)));
                }
            }
            let timeout = poll_timeout(wait).unwrap_or(PollTimeout::ZERO);
            let ready = self.poll(
                self.pidfd.as_ref().map(|p| p.as_fd()),
                (!aborted).then_some(limits.abort),
                quiet.is_none(),
                timeout,
            )?;
            if ready.stdin {
                body = self.feed(body);
            }
            self.read_output(&ready);
            if ready.abort {
                // The grace is over: kill the task and everything it started.
                aborted = true;
                let _ = killpg(self.pid, Signal::SIGKILL);
            }
            // Without a pidfd, every round checks for the exit.
            if ready.exited || self.pidfd.is_none() {
                if let Some(status) = self.wait(WaitOptions::NOHANG)? {
                    break status;
                }
            }
            if deadline.is_some_and(|d| Instant::now() >= d) && !aborted {
                if timed_out {
                    log::warn!("{worker}: the task outlived handler.kill_grace; sending SIGKILL");
                    let _ = killpg(self.pid, Signal::SIGKILL);
                    deadline = None;
                } else {
                    // Ask the whole group to stop, then insist.
                    timed_out = true;
                    log::warn!(
                        "{worker}: the task ran past handler.timeout ({}); sending SIGTERM to its process group",
                        humantime::format_duration(limits.timeout)
                    );
                    let _ = killpg(self.pid, Signal::SIGTERM);
                    deadline = Some(Instant::now() + limits.kill_grace);
                }
            }
        };
        self.stdin = None;
        self.drain_output();
        Ok(Run {
            status,
            // A descendant may still hold the pipe open: what came until now is the output.
            stdout: (self.kept_stdout.take())
                .or_else(|| self.stdout.as_mut().and_then(|(_, log)| log.take_kept())),
            timed_out,
            aborted,
        })
    }

    /// One `poll` over stdin if it is open, the output pipes if `output` and they are open,
    /// and the pidfd and the abort if given.
    fn poll(
        &self,
        pidfd: Option<BorrowedFd<'_>>,
        abort: Option<&Abort>,
        output: bool,
        timeout: PollTimeout,
    ) -> io::Result<Ready> {
        let mut fds = Vec::with_capacity(5);
        let stdin = slot(
            &mut fds,
            self.stdin.as_ref().map(|p| p.as_fd()),
            PollFlags::POLLOUT,
        );
        let stdout = slot(
            &mut fds,
            self.stdout
                .as_ref()
                .filter(|_| output)
                .map(|(p, _)| p.as_fd()),
            PollFlags::POLLIN,
        );
        let stderr = slot(
            &mut fds,
            self.stderr
                .as_ref()
                .filter(|_| output)
                .map(|(p, _)| p.as_fd()),
            PollFlags::POLLIN,
        );
        let exited = slot(&mut fds, pidfd, PollFlags::POLLIN);
        let aborted = slot(&mut fds, abort.map(|a| a.fd()), PollFlags::POLLIN);
        match poll(&mut fds, timeout) {
            Ok(_) | Err(Errno::EINTR) => {}
            Err(e) => return Err(e.into()),
        }
        let is = |i: Option<usize>| i.is_some_and(|i| ready(&fds[i]));
        Ok(Ready {
            stdin: is(stdin),
            stdout: is(stdout),
            stderr: is(stderr),
            exited: is(exited),
            abort: is(aborted),
        })
    }

    /// Logs what the output pipes that are ready hold.
    fn read_output(&mut self, ready: &Ready) {
        if ready.stdout {
            if let Some(kept) = drain(&mut self.stdout) {
                self.kept_stdout = Some(kept);
            }
        }
        if ready.stderr {
            drain(&mut self.stderr);
        }
    }

    /// Writes as much of `body` as the pipe takes; returns the rest. Closes stdin once it is
    /// all written, or when the program will not read it (it exited or closed stdin: its exit
    /// status says whether it succeeded).
    fn feed<'b>(&mut self, body: &'b [u8]) -> &'b [u8] {
        let Some(stdin) = &mut self.stdin else {
            return body;
        };
        match stdin.write(body) {
            Ok(n) if n < body.len() => &body[n..],
            Ok(_) => {
                self.stdin = None;
                &[]
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                ) =>
            {
                body
            }
            Err(e) => {
                if e.kind() != io::ErrorKind::BrokenPipe {
                    log::warn!("cannot write the message body to the task's stdin: {e}");
                }
                self.stdin = None;
                &[]
            }
        }
    }

    /// After the exit: logs what is left in the pipes, until they close or [`OUTPUT_DRAIN`]
    /// passes, so that the task's output comes before its outcome.
    fn drain_output(&mut self) {
        let deadline = Instant::now() + OUTPUT_DRAIN;
        // Usually the program took its ends of the pipes with it: read to their end without a
        // `poll` first.
        let mut ready = Ready {
            stdin: false,
            stdout: true,
            stderr: true,
            exited: false,
            abort: false,
        };
        loop {
            self.read_output(&ready);
            if self.stdout.is_none() && self.stderr.is_none() {
                break;
            }
            let Some(timeout) = poll_timeout(Some(deadline)) else {
                break;
            };
            match self.poll(None, None, true, timeout) {
                Ok(now) => ready = now,
                Err(_) => break,
            }
        }
        if let Some((_, log)) = &mut self.stdout {
            log.finish();
        }
        if let Some((_, log)) = &mut self.stderr {
            log.finish();
        }
    }
}

/// Reads what an output pipe holds into its log; at end of file (or an error) closes it.
/// Reads what `stream` holds; at its end, closes it and returns what it kept, if it keeps.
fn drain<P: Read>(stream: &mut Option<(P, LineLog)>) -> Option<Result<Vec<u8>, usize>> {
    let (pipe, log) = stream.as_mut()?;
    if !log.read_from(pipe) {
        return None;
    }
    log.finish();
    let kept = log.take_kept();
    *stream = None;
    kept
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(abort: &Abort, keep_stdout: Option<usize>) -> Limits<'_> {
        Limits {
            timeout: Duration::from_secs(30),
            kill_grace: Duration::from_secs(1),
            abort,
            keep_stdout,
        }
    }

    #[test]
    fn long_lines_are_split_and_partial_lines_kept_until_their_end() {
        let mut log = LineLog::new("p:".into(), Some(10_000));
        log.feed(b"ab");
        assert_eq!(log.line, b"ab");
        log.feed(b"c\nde");
        assert_eq!((log.line.as_slice(), log.logged), (&b"de"[..], 4));
        log.feed(&vec![b'x'; MAX_LOG_LINE * 2]);
        assert_eq!(log.logged, 4 + MAX_LOG_LINE * 2, "two full lines went out");
        assert_eq!(log.line, b"xx", "the rest waits for its end");
        log.finish();
        assert!(log.line.is_empty());
    }

    #[test]
    fn a_program_that_fills_its_pipes_before_they_are_watched_still_runs_to_its_end() {
        let never = Abort::never();
        let limits = limits(&never, None);
        // Far more than a pipe holds, on both streams, at once.
        let argv = [
            "sh",
            "-c",
            "head -c 1000000 /dev/zero; head -c 1000000 /dev/zero >&2",
        ]
        .map(String::from);
        let started = Instant::now();
        let run = run(&Program::new(&argv, "q", 1), &[], b"", "worker-1", &limits)
            .unwrap_or_else(|e| panic!("{e:?}"));
        assert!(run.status.success() && !run.timed_out && !run.aborted);
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "no pipe stayed full"
        );
    }

    /// What `argv` writes to stdout, run as `worker` 7's program for a message with `vars`,
    /// after warren's own environment got `inherited`.
    fn output(argv: &[&str], inherited: &[&str], vars: &[(String, String)]) -> String {
        let never = Abort::never();
        let limits = limits(&never, Some(1 << 20));
        let argv: Vec<String> = argv.iter().map(|a| a.to_string()).collect();
        let mut program = Program::new(&argv, "q", 7);
        for var in inherited {
            let name = var.split('=').next().unwrap().as_bytes().to_vec();
            (program.overridable).push((name, CString::new(*var).unwrap()));
        }
        // Blocked here, as warren blocks the signals its signal thread waits for.
        let blocked = SigSet::from(Signal::SIGUSR1);
        blocked.thread_block().unwrap();
        let run = run(&program, vars, b"", "worker-7", &limits);
        blocked.thread_unblock().unwrap();
        let run = run.unwrap_or_else(|e| panic!("{e:?}"));
        assert!(run.status.success());
        String::from_utf8(run.stdout.unwrap().unwrap()).unwrap()
    }

    #[test]
    fn a_message_variable_replaces_an_inherited_one_of_the_same_name() {
        let vars = [("WARREN_ATTEMPT".to_string(), "2".to_string())];
        let inherited = ["WARREN_ATTEMPT=stale", "WARREN_CONFIG=/etc/w.toml"];
        // env(1) prints the environment as it is, duplicates and all.
        let out = output(&["env"], &inherited, &vars);
        let mut lines: Vec<&str> = out.lines().collect();
        let paths = lines.iter().filter(|l| l.starts_with("PATH=")).count();
        lines.retain(|l| l.starts_with("WARREN_"));
        lines.sort();
        assert_eq!(
            lines,
            [
                "WARREN_ATTEMPT=2",
                "WARREN_CONFIG=/etc/w.toml",
                "WARREN_QUEUE=q",
                "WARREN_WORKER=7"
            ],
            "{out}"
        );
        assert_eq!(paths, 1, "{out}");
    }

    #[test]
    fn a_program_runs_in_its_own_process_group_with_no_signal_blocked_or_ignored() {
        // No shell between: one could reset what is checked.
        let out = output(&["cat", "/proc/self/stat", "/proc/self/status"], &[], &[]);
        let lines: Vec<&str> = out.lines().collect();
        // pid (comm) state ppid pgrp ...
        let (pid, rest) = lines[0].split_once(' ').unwrap();
        let pgrp = rest.rsplit_once(')').unwrap().1.split_whitespace().nth(2);
        assert_eq!(Some(pid), pgrp, "its pid is its process group: {out}");
        let field = |name: &str| {
            let line = lines.iter().find(|l| l.starts_with(name)).unwrap();
            u64::from_str_radix(line[name.len()..].trim(), 16).unwrap()
        };
        assert_eq!(field("SigBlk:"), 0, "{out}");
        let ignored = field("SigIgn:");
        assert_eq!(ignored & (1 << (libc::SIGPIPE - 1)), 0, "SIGPIPE: {out}");
    }

    #[test]
    fn a_program_that_does_not_exist_cannot_start() {
        let never = Abort::never();
        let limits = limits(&never, None);
        let program = Program::new(&["/nonexistent/job".to_string()], "q", 1);
        match run(&program, &[], b"body", "worker-1", &limits) {
            Err(RunError::Start(e)) => assert_eq!(e.kind(), io::ErrorKind::NotFound),
            Err(e) => panic!("{e:?}"),
            Ok(_) => panic!("it ran"),
        }
    }

    #[test]
    fn output_past_the_limit_is_counted_but_not_logged() {
        let mut log = LineLog::new("p:".into(), Some(10));
        log.feed(b"0123456789abc\n");
        assert_eq!(log.logged, 10, "capped at the limit once logged");
        log.feed(b"more\n");
        assert_eq!(log.logged, 15, "then only counted");
    }
}
