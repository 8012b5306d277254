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

use std::ffi::OsString;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Child, ChildStderr, ChildStdin, ChildStdout, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::thread;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::{fcntl, FcntlArg, OFlag};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;

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
pub fn program(argv: &[String], queue: &str, worker: usize) -> Command {
    let mut command = Command::new(&argv[0]);
    command
        .args(&argv[1..])
        .env("WARREN_QUEUE", queue)
        .env("WARREN_WORKER", worker.to_string())
        // It may hold the broker password; tasks have no business with it.
        .env_remove(config::BROKER_URL_ENV)
        // systemd's notify socket and watchdog are warren's, not its tasks'.
        .env_remove("NOTIFY_SOCKET")
        .env_remove("WATCHDOG_USEC")
        .env_remove("WATCHDOG_PID")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Its own process group: a Ctrl+C at the terminal does not reach the task, which
        // should finish within the grace, and a kill reaches all of its descendants.
        .process_group(0);
    // A message's variables are the message's: none comes from warren's own environment.
    for name in inherited_message_vars() {
        command.env_remove(name);
    }
    command
}

/// The variables of warren's environment that a program could take for a message's: any
/// `WARREN_HEADER_*`, the headers left out, the trace context.
fn inherited_message_vars() -> &'static [OsString] {
    static INHERITED: OnceLock<Vec<OsString>> = OnceLock::new();
    INHERITED.get_or_init(|| {
        std::env::vars_os()
            .map(|(name, _)| name)
            .filter(|name| {
                let name = name.as_encoded_bytes();
                name.starts_with(context::HEADER_PREFIX.as_bytes())
                    || [context::OMITTED, context::TRACEPARENT, context::TRACESTATE]
                        .iter()
                        .any(|var| name == var.as_bytes())
            })
            .collect()
    })
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
    mut command: Command,
    body: &[u8],
    worker: &str,
    limits: &Limits<'_>,
) -> Result<Run, RunError> {
    let mut child = command.spawn().map_err(RunError::Start)?;
    let pid = Pid::from_raw(child.id() as i32);
    let run = Task::new(&mut child, worker, limits.keep_stdout)
        .and_then(|mut task| task.run(&mut child, body, worker, limits));
    run.map_err(|e| {
        // Nothing may outlive a run that warren gave up on.
        let _ = killpg(pid, Signal::SIGKILL);
        let _ = child.wait();
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
    stdin: Option<ChildStdin>,
    stdout: Option<(ChildStdout, LineLog)>,
    stderr: Option<(ChildStderr, LineLog)>,
    /// Readable once the program has exited; `None` where the kernel has no pidfds.
    pidfd: Option<OwnedFd>,
    /// What stdout kept, once it closed, when it keeps rather than logs.
    kept_stdout: Option<Result<Vec<u8>, usize>>,
}

impl Task {
    fn new(child: &mut Child, worker: &str, keep_stdout: Option<usize>) -> io::Result<Task> {
        let pid = Pid::from_raw(child.id() as i32);
        let pidfd = rustix::process::Pid::from_raw(pid.as_raw()).and_then(|pid| {
            rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::empty()).ok()
        });
        let stdin = child.stdin.take();
        let stdout = child.stdout.take();
        let stderr = child.stderr.take();
        for fd in [
            stdin.as_ref().map(|p| p.as_fd()),
            stdout.as_ref().map(|p| p.as_fd()),
            stderr.as_ref().map(|p| p.as_fd()),
        ]
        .into_iter()
        .flatten()
        {
            set_nonblocking(fd)?;
        }
        let log =
            |stream: &str| LineLog::new(format!("{worker} {stream}:"), Some(MAX_LOGGED_OUTPUT));
        Ok(Task {
            pid,
            stdin,
            stdout: stdout.map(|p| match keep_stdout {
                Some(limit) => (p, LineLog::keeping(format!("{worker} stdout:"), limit)),
                None => (p, log("stdout")),
            }),
            stderr: stderr.map(|p| (p, log("stderr"))),
            pidfd,
            kept_stdout: None,
        })
    }

    fn run(
        &mut self,
        child: &mut Child,
        mut body: &[u8],
        worker: &str,
        limits: &Limits<'_>,
    ) -> io::Result<Run> {
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
                if let Some(status) = child.try_wait()? {
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
        let limits = Limits {
            timeout: Duration::from_secs(30),
            kill_grace: Duration::from_secs(1),
            abort: &never,
            keep_stdout: None,
        };
        // Far more than a pipe holds, on both streams, at once.
        let argv = [
            "sh",
            "-c",
            "head -c 1000000 /dev/zero; head -c 1000000 /dev/zero >&2",
        ]
        .map(String::from);
        let started = Instant::now();
        let run = run(program(&argv, "q", 1), b"", "worker-1", &limits)
            .unwrap_or_else(|e| panic!("{e:?}"));
        assert!(run.status.success() && !run.timed_out && !run.aborted);
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "no pipe stayed full"
        );
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
