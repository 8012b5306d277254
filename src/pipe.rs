//! The `pipe` handler: one long-lived program per worker, with messages streamed to it, for
//! handlers too costly to start once per message (an interpreter, a model, a connection pool).
//!
//! The protocol (version [`PROTOCOL`], in the program's `WARREN_PIPE_PROTOCOL`), one message at
//! a time:
//! - warren writes one line of JSON to the program's stdin, `{"tag": T, "id": …, "queue": …,
//!   "attempt": 1, "redelivered": false, …, "size": N}` (the message's context from `context.rs`
//!   where the dots are), then exactly N bytes of body. The length
//!   framing makes any body safe, binary included. T grows with every message, so a program never
//!   sees the same tag twice (a new handler, after a reconnect or a reload, starts a new program
//!   and counts from 1 again).
//! - The program answers with one line on stdout that names the message: `T ack`, `T retry` or
//!   `T dead`, optionally followed by a space and a reason. Its stderr goes to warren's log.
//! - A program that dies mid-message, answers anything else (another message's tag, an answer
//!   without a tag), answers out of turn or overruns `handler.timeout` fails the attempt like a
//!   failing command, and is killed (its whole process group) and started again, with a backoff
//!   when it keeps failing. An answer is only ever taken for the message whose tag it names, so
//!   a late or repeated answer can never settle another message.
//! - When warren stops or restarts the worker it closes the program's stdin; the program should
//!   then exit. [`STOP_WAIT`] later its process group is killed.
//! - A program that reached a limit of its [`Recycle`] (tasks, resident memory, age) is stopped
//!   the same way and a fresh one started, between two messages, never during one: after the
//!   worker settled a message ([`Handler::between`]), or before a message is written to a
//!   program that sat idle past its age. A recycle is not a failure: no backoff follows it.
//!
//! The worker thread does the I/O itself, with no thread hand-off per message: it writes the
//! frame and reads the answer on non-blocking pipes, `poll`ing them together with the abort's
//! pipe until the deadline. One thread per program logs its stderr and one waits for its exit.

use std::fs;
use std::io::{self, Read, Write};
use std::os::fd::AsFd;
use std::process::{ChildStdin, ChildStdout, ExitStatus};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, select, Receiver};
use nix::poll::PollFlags;
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use serde::Serialize;

use crate::abort::Abort;
use crate::child::{self, set_nonblocking, wait_ready, Waited};
use crate::config::{size_text, Recycle};
use crate::context::Context;
use crate::handler::{Handler, Outcome, Task, MAX_REPLY};
use crate::logging::preview;
use crate::metrics::{Metrics, RecycleReason};

/// The version of the protocol, given to the program as `WARREN_PIPE_PROTOCOL`. Version 1 had
/// answers without a tag; warren refuses them (each attempt fails, and says why).
pub const PROTOCOL: &str = "2";
/// After closing a program's stdin, how long warren waits for it to exit before killing it.
pub const STOP_WAIT: Duration = Duration::from_secs(1);
/// The longest answer line read; the rest of a longer line is a protocol error all the same.
const MAX_ANSWER: usize = 4096;
/// The restart delay after the second failure in a row; it doubles up to [`MAX_BACKOFF`]. The
/// first restart is immediate: one crash is usually one bad message.
const MIN_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(10);
/// How long to wait for a program that closed its stdout, or was killed, to report its exit.
const SETTLE: Duration = Duration::from_millis(500);

/// How long to wait before starting the program again after `failures` failures in a row.
fn backoff(failures: u32) -> Duration {
    match failures {
        0 | 1 => Duration::ZERO,
        n => MIN_BACKOFF
            .saturating_mul(1 << (n - 2).min(16))
            .min(MAX_BACKOFF),
    }
}

/// The header line that precedes each body.
#[derive(Serialize)]
struct Frame<'a> {
    tag: u64,
    id: Option<&'a str>,
    queue: &'a str,
    attempt: u32,
    redelivered: bool,
    /// The message's routing, properties and headers (see `context.rs`).
    #[serde(flatten)]
    context: &'a Context<'a>,
    /// Last, so that a program may read the header line as it likes and still find it there.
    size: usize,
}

/// The pipe handler of one worker.
pub struct PipeHandler {
    argv: Vec<String>,
    queue: String,
    /// The worker's number, and its name for the log.
    id: usize,
    worker: String,
    timeout: Duration,
    kill_grace: Duration,
    program: Option<Program>,
    /// Failures in a row, for the restart backoff; a valid answer resets it.
    failures: u32,
    /// The tag of the last message written; it only grows, across restarts of the program, so
    /// that no program sees a tag twice.
    tag: u64,
    /// The program is not started again before this.
    restart_at: Option<Instant>,
    /// When the program is replaced by a fresh one, and where that is counted.
    recycle: Recycle,
    metrics: Option<Arc<Metrics>>,
}

/// A running program.
struct Program {
    pid: Pid,
    stdin: ChildStdin,
    stdout: ChildStdout,
    /// Bytes read from stdout and not yet taken as an answer.
    pending: Vec<u8>,
    /// The frame being written, kept to reuse its allocation.
    frame: Vec<u8>,
    /// Its exit status, once it has exited.
    exited: Receiver<io::Result<ExitStatus>>,
    started: Instant,
    /// Messages written to it.
    tasks: u64,
}

/// How waiting for an answer line ended.
enum Answer {
    Line(Vec<u8>),
    /// The program closed its stdout (it exited, most likely).
    Closed,
    Aborted,
    TimedOut,
    Failed(io::Error),
}

impl Program {
    fn start(
        argv: &[String],
        queue: &str,
        worker: usize,
        name: &str,
    ) -> io::Result<(Program, u32)> {
        let mut child = child::program(argv, queue, worker)
            .env("WARREN_PIPE_PROTOCOL", PROTOCOL)
            .spawn()?;
        let pid = child.id();
        let stdin = child.stdin.take().expect("invariant: stdin is piped");
        let stdout = child.stdout.take().expect("invariant: stdout is piped");
        // The stderr logger's end is not waited for: the program is long-lived.
        if let Some(stderr) = child.stderr.take() {
            child::log_output(stderr, name, "stderr");
        }
        let (exit_tx, exited) = bounded(1);
        let program = Program {
            pid: Pid::from_raw(pid as i32),
            stdin,
            stdout,
            pending: Vec::new(),
            frame: Vec::new(),
            exited,
            started: Instant::now(),
            tasks: 0,
        };
        let waiter = thread::Builder::new()
            .name(format!("{name}-wait"))
            .spawn(move || {
                let _ = exit_tx.send(child.wait());
            });
        // Non-blocking, so that a program that stops reading or writing cannot hold the worker
        // past its deadline or the abort.
        let ready = waiter
            .and_then(|_| set_nonblocking(program.stdin.as_fd()))
            .and_then(|()| set_nonblocking(program.stdout.as_fd()));
        if let Err(e) = ready {
            program.kill();
            return Err(e);
        }
        Ok((program, pid))
    }

    /// Kills the program and everything it started.
    fn kill(&self) {
        let _ = killpg(self.pid, Signal::SIGKILL);
    }

    /// Waits up to `wait` for the program to exit, and describes how it ended.
    fn exit_status(&self, wait: Duration) -> String {
        match self.exited.recv_timeout(wait) {
            Ok(Ok(status)) => child::describe(status),
            Ok(Err(e)) => format!("cannot wait for it: {e}"),
            Err(_) => "its exit status is unknown".to_string(),
        }
    }

    /// Closes its stdin, which asks it to exit, and kills it if it has not after [`STOP_WAIT`].
    fn stop(self) {
        let Program {
            pid, stdin, exited, ..
        } = self;
        drop(stdin);
        if exited.recv_timeout(STOP_WAIT).is_err() {
            let _ = killpg(pid, Signal::SIGKILL);
        }
    }

    /// Sends `task` under `tag` (its header line, then its body) and reads the answer line, all before
    /// `deadline`.
    fn exchange(&mut self, tag: u64, task: &Task<'_>, deadline: Instant, abort: &Abort) -> Answer {
        let mut frame = std::mem::take(&mut self.frame);
        frame.clear();
        let header = Frame {
            tag,
            id: task.message_id,
            queue: task.queue,
            attempt: task.attempt,
            redelivered: task.redelivered,
            context: task.context,
            size: task.body.len(),
        };
        serde_json::to_writer(&mut frame, &header).expect("invariant: the header serialises");
        frame.push(b'\n');
        frame.extend_from_slice(task.body);
        let written = self.write(&frame, deadline, abort);
        self.frame = frame;
        match written {
            Ok(()) => self.read_line(deadline, abort),
            Err(end) => end,
        }
    }

    /// Writes all of `frame`, waiting for room in the pipe until `deadline`; or says how the
    /// wait ended.
    fn write(&mut self, mut frame: &[u8], deadline: Instant, abort: &Abort) -> Result<(), Answer> {
        while !frame.is_empty() {
            match self.stdin.write(frame) {
                Ok(0) => return Err(Answer::Failed(io::ErrorKind::WriteZero.into())),
                Ok(n) => frame = &frame[n..],
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    // The program has not read what came before: wait for room.
                    if let Some(end) = waited(wait_ready(
                        self.stdin.as_fd(),
                        PollFlags::POLLOUT,
                        deadline,
                        abort,
                    )) {
                        return Err(end);
                    }
                }
                Err(e) => return Err(Answer::Failed(e)),
            }
        }
        Ok(())
    }

    /// Reads the next answer line, waiting for it until `deadline`.
    fn read_line(&mut self, deadline: Instant, abort: &Abort) -> Answer {
        self.read_until(deadline, abort, Program::take_line)
            .map_or_else(|end| end, Answer::Line)
    }

    /// Reads the `size` bytes of a reply, which follow its answer line, waiting for them until
    /// `deadline`.
    fn read_exact(
        &mut self,
        size: usize,
        deadline: Instant,
        abort: &Abort,
    ) -> Result<Vec<u8>, Answer> {
        self.read_until(deadline, abort, |program| program.take_exact(size))
    }

    /// Reads stdout until `take` finds what it wants in what was read, waiting until
    /// `deadline`; or says how the wait ended.
    fn read_until<T>(
        &mut self,
        deadline: Instant,
        abort: &Abort,
        mut take: impl FnMut(&mut Program) -> Option<T>,
    ) -> Result<T, Answer> {
        loop {
            if let Some(found) = take(self) {
                return Ok(found);
            }
            if let Some(end) = waited(wait_ready(
                self.stdout.as_fd(),
                PollFlags::POLLIN,
                deadline,
                abort,
            )) {
                return Err(end);
            }
            match self.fill() {
                Ok(0) => return Err(Answer::Closed),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(Answer::Failed(e)),
            }
        }
    }

    /// The first `size` bytes read so far, once there are that many.
    fn take_exact(&mut self, size: usize) -> Option<Vec<u8>> {
        (self.pending.len() >= size).then(|| self.pending.drain(..size).collect())
    }

    /// The next complete line read so far, without its newline; or everything read so far once
    /// that is longer than an answer can be.
    fn take_line(&mut self) -> Option<Vec<u8>> {
        match self.pending.iter().position(|&b| b == b'\n') {
            Some(end) => {
                let mut line: Vec<u8> = self.pending.drain(..=end).collect();
                line.pop();
                Some(line)
            }
            None if self.pending.len() >= MAX_ANSWER => Some(std::mem::take(&mut self.pending)),
            None => None,
        }
    }

    /// Reads what stdout holds into `pending`, without waiting. Ok(0) means end of file.
    fn fill(&mut self) -> io::Result<usize> {
        let mut chunk = [0; 4096];
        loop {
            match self.stdout.read(&mut chunk) {
                Ok(n) => {
                    self.pending.extend_from_slice(&chunk[..n]);
                    return Ok(n);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// Whatever the program wrote while no answer was due: a line, or end of file.
    fn unasked(&mut self) -> Option<Answer> {
        if self.pending.is_empty() {
            match self.fill() {
                Ok(0) => return Some(Answer::Closed),
                Ok(_) => {}
                Err(_) => return None,
            }
        }
        let line = self
            .take_line()
            .unwrap_or_else(|| std::mem::take(&mut self.pending));
        Some(Answer::Line(line))
    }
}

/// The resident memory of process `pid` (VmRSS in `/proc/PID/status`) in bytes, unless it is
/// gone.
fn resident_memory(pid: Pid) -> Option<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))?
        .trim()
        .strip_suffix("kB")?
        .trim()
        .parse::<u64>()
        .ok()?;
    Some(kib * 1024)
}

/// A duration for the log, to the millisecond under 10 s and to the second above.
fn rounded(duration: Duration) -> humantime::FormattedDuration {
    humantime::format_duration(if duration < Duration::from_secs(10) {
        Duration::from_millis(duration.as_millis() as u64)
    } else {
        Duration::from_secs(duration.as_secs())
    })
}

/// How a wait ended, as an answer, unless the pipe is ready.
fn waited(waited: Waited) -> Option<Answer> {
    match waited {
        Waited::Ready => None,
        Waited::Aborted => Some(Answer::Aborted),
        Waited::TimedOut => Some(Answer::TimedOut),
        Waited::Failed(e) => Some(Answer::Failed(e)),
    }
}

/// What a valid answer line means.
#[derive(Debug, PartialEq)]
enum Verdict {
    Settle(Outcome),
    /// `T reply N`: the work is done, and its answer is the N bytes after the line.
    Reply(usize),
}

/// What a program's answer line to the message tagged `tag` means, or why it means nothing.
fn parse_answer(line: &[u8], tag: u64) -> Result<Verdict, String> {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let text = String::from_utf8_lossy(line);
    let (named, rest) = text.split_once(' ').unwrap_or((&*text, ""));
    let (verb, reason) = match rest.split_once(' ') {
        Some((verb, reason)) if !reason.trim().is_empty() => (verb, Some(reason.trim())),
        Some((verb, _)) => (verb, None),
        None => (rest, None),
    };
    let digits = !named.is_empty() && named.bytes().all(|b| b.is_ascii_digit());
    match named {
        _ if digits && named == tag.to_string() => {}
        _ if digits => {
            return Err(format!(
                "answered {} for tag {named} while tag {tag} was in flight",
                preview(line)
            ))
        }
        "ack" | "retry" | "dead" | "reply" => {
            return Err(format!(
                "answered {} without a tag; pipe protocol {PROTOCOL} answers begin with the message's tag, as in \"{tag} {named}\"",
                preview(line)
            ))
        }
        _ => {
            return Err(format!(
                "answered {}, which is not \"{tag} ack|retry|dead|reply SIZE\"",
                preview(line)
            ))
        }
    }
    let settle = |outcome| Ok(Verdict::Settle(outcome));
    match verb {
        "ack" => settle(Outcome::Done),
        "retry" => settle(Outcome::Retry(match reason {
            Some(reason) => format!("answered retry: {reason}"),
            None => "answered retry".to_string(),
        })),
        "dead" => settle(Outcome::DeadLetter {
            status: "answered dead".to_string(),
            reason: reason.map(str::to_string),
        }),
        "reply" => match reason.map(|size| size.parse::<usize>()) {
            Some(Ok(size)) if size <= MAX_REPLY => Ok(Verdict::Reply(size)),
            Some(Ok(size)) => Err(format!(
                "answered a reply of {size} bytes, more than the {MAX_REPLY} a reply may have"
            )),
            _ => Err(format!(
                "answered {}, which is not \"{tag} reply SIZE\"",
                preview(line)
            )),
        },
        _ => Err(format!(
            "answered {}, which is not \"{tag} ack|retry|dead|reply SIZE\"",
            preview(line)
        )),
    }
}

impl PipeHandler {
    pub fn new(
        argv: Vec<String>,
        queue: &str,
        worker: usize,
        timeout: Duration,
        kill_grace: Duration,
    ) -> PipeHandler {
        PipeHandler {
            argv,
            queue: queue.to_string(),
            id: worker,
            worker: format!("worker-{worker}"),
            timeout,
            kill_grace,
            program: None,
            failures: 0,
            tag: 0,
            restart_at: None,
            recycle: Recycle::default(),
            metrics: None,
        }
    }

    /// The same handler, replacing its program when it reaches one of `limits`, and counting
    /// each time in `metrics`.
    pub fn recycled(mut self, limits: Recycle, metrics: Arc<Metrics>) -> PipeHandler {
        self.recycle = limits;
        self.metrics = Some(metrics);
        self
    }

    /// The limit the program has reached, if any, and what the log says of it. `idle`: it sat
    /// between messages, so only its age can have changed.
    fn limit_reached(&self, program: &Program, idle: bool) -> Option<(RecycleReason, String)> {
        let limits = &self.recycle;
        if let Some(max) = limits
            .max_tasks
            .filter(|&max| !idle && program.tasks >= max)
        {
            return Some((
                RecycleReason::MaxTasks,
                format!(" after {max} tasks (handler.max_tasks)"),
            ));
        }
        if let Some(max) = limits.max_memory.filter(|_| !idle) {
            if let Some(rss) = resident_memory(program.pid).filter(|&rss| rss >= max) {
                return Some((
                    RecycleReason::MaxMemory,
                    format!(
                        ": its resident memory {} reached handler.max_memory ({})",
                        bytesize::ByteSize(rss).display().iec(),
                        size_text(max)
                    ),
                ));
            }
        }
        let age = program.started.elapsed();
        if let Some(max) = limits.max_age.filter(|&max| age >= max) {
            return Some((
                RecycleReason::MaxAge,
                format!(
                    ": it ran for {} (handler.max_age {})",
                    rounded(age),
                    humantime::format_duration(max)
                ),
            ));
        }
        None
    }

    /// Replaces the program with a fresh one if it has reached a limit: it is stopped as at a
    /// stop (stdin closed, its group killed after [`STOP_WAIT`]) and the next one started now,
    /// so that the next message does not wait for it. A recycle is not a failure: it sets no
    /// backoff (a fresh program that cannot start does, as always).
    fn recycle_if_due(&mut self, idle: bool) {
        let Some(program) = &self.program else {
            return;
        };
        let Some((reason, why)) = self.limit_reached(program, idle) else {
            return;
        };
        let program = self.program.take().expect("invariant: checked above");
        log::info!(
            "{}: recycling the pipe program (pid {}){why}",
            self.worker,
            program.pid
        );
        program.stop();
        if let Some(metrics) = &self.metrics {
            metrics.pipe_recycled(reason);
        }
        if let Err(why) = self.launch() {
            log::warn!("{}: {why}; trying again at the next message", self.worker);
        }
    }

    /// Starts the program if it is not running, after the backoff.
    fn ensure_started(&mut self, abort: &Abort) -> Result<&mut Program, Outcome> {
        if self.program.is_none() {
            if let Some(at) = self.restart_at.take() {
                let wait = at.saturating_duration_since(Instant::now());
                if !wait.is_zero() {
                    log::info!(
                        "{}: starting the pipe program again in {wait:.1?}",
                        self.worker
                    );
                    if !abort.sleep(wait) {
                        return Err(Outcome::Aborted);
                    }
                }
            }
            self.launch().map_err(Outcome::Retry)?;
        }
        Ok(self.program.as_mut().expect("invariant: started above"))
    }

    /// Starts the program now.
    fn launch(&mut self) -> Result<(), String> {
        match Program::start(&self.argv, &self.queue, self.id, &self.worker) {
            Ok((program, pid)) => {
                log::info!(
                    "{}: started pipe program {:?} (pid {pid})",
                    self.worker,
                    self.argv
                );
                self.program = Some(program);
                Ok(())
            }
            Err(e) => {
                self.failed();
                Err(format!("cannot start {}: {e}", self.argv[0]))
            }
        }
    }

    /// Counts a failure and sets when the program may start again.
    fn failed(&mut self) {
        self.failures += 1;
        self.restart_at = Some(Instant::now() + backoff(self.failures));
    }

    /// The program failed the attempt: kill it (its whole group), count the failure and say why.
    fn fail(&mut self, why: String) -> Outcome {
        if let Some(program) = self.program.take() {
            program.kill();
            let _ = program.exited.recv_timeout(SETTLE);
        }
        self.failed();
        Outcome::Retry(format!("the pipe program {why}"))
    }

    /// The program ended without answering: say how.
    fn died(&mut self) -> Outcome {
        let status = match &self.program {
            Some(program) => program.exit_status(SETTLE),
            None => "it is gone".to_string(),
        };
        self.fail(format!("exited mid-message ({status})"))
    }

    /// Checks that a program idle between messages is still there and quiet.
    fn check_idle(&mut self) {
        let Some(program) = &mut self.program else {
            return;
        };
        let problem = match program.unasked() {
            Some(Answer::Line(line)) => format!(
                "wrote {} between messages, when no answer was due",
                preview(&line)
            ),
            closed => match (program.exited.try_recv(), closed) {
                (Ok(Ok(status)), _) => {
                    format!("exited between messages ({})", child::describe(status))
                }
                (_, Some(_)) => "closed its stdout between messages".to_string(),
                (_, None) => return,
            },
        };
        log::warn!(
            "{}: the pipe program {problem}; starting it again",
            self.worker
        );
        program.kill();
        self.program = None;
        self.failed();
    }

    /// The program overran the timeout: SIGTERM to its group, SIGKILL after the kill grace.
    fn time_out(&mut self, abort: &Abort) -> Outcome {
        let took = humantime::format_duration(self.timeout);
        if let Some(program) = &self.program {
            log::warn!(
                "{}: the pipe program ran past handler.timeout ({took}); sending SIGTERM to its process group",
                self.worker
            );
            let _ = killpg(program.pid, Signal::SIGTERM);
            select! {
                recv(program.exited) -> _ => {}
                recv(abort.receiver()) -> _ => {}
                default(self.kill_grace) => {
                    log::warn!("{}: the pipe program outlived handler.kill_grace; sending SIGKILL", self.worker);
                }
            }
        }
        self.fail(format!("timed out after {took}"))
    }
}

impl Handler for PipeHandler {
    fn start(&mut self) {
        if let Err(why) = self.launch() {
            log::warn!("{}: {why}; trying again at the first message", self.worker);
        }
    }

    fn handle(&mut self, task: &Task<'_>, abort: &Abort) -> Outcome {
        self.check_idle();
        self.recycle_if_due(true);
        let deadline = Instant::now() + self.timeout;
        self.tag += 1;
        let tag = self.tag;
        let answer = match self.ensure_started(abort) {
            Ok(program) => {
                program.tasks += 1;
                program.exchange(tag, task, deadline, abort)
            }
            Err(outcome) => return outcome,
        };
        let answer = match answer {
            Answer::Line(line) => match parse_answer(&line, tag) {
                Ok(Verdict::Settle(outcome)) => {
                    self.failures = 0;
                    return outcome;
                }
                Ok(Verdict::Reply(size)) => {
                    let program = self.program.as_mut().expect("invariant: running");
                    match program.read_exact(size, deadline, abort) {
                        Ok(body) => {
                            self.failures = 0;
                            return Outcome::Reply(body);
                        }
                        // How the wait for the rest of the reply ended.
                        Err(end) => end,
                    }
                }
                Err(why) => return self.fail(why),
            },
            other => other,
        };
        match answer {
            Answer::Line(_) => self.fail("answered a reply whose body was not read".into()),
            Answer::Closed => self.died(),
            // A broken pipe: it has exited, or closed its stdin.
            Answer::Failed(e) if e.kind() == io::ErrorKind::BrokenPipe => self.died(),
            Answer::Failed(e) => self.fail(format!("could not be written to or read from: {e}")),
            Answer::TimedOut => self.time_out(abort),
            Answer::Aborted => {
                let program = self.program.as_mut().expect("invariant: running");
                program.kill();
                let _ = program.fill();
                let verdict = program.take_line().map(|line| parse_answer(&line, tag));
                let finished = match verdict {
                    Some(Ok(Verdict::Settle(outcome))) => Some(outcome),
                    Some(Ok(Verdict::Reply(size))) => program.take_exact(size).map(Outcome::Reply),
                    _ => None,
                };
                match finished {
                    // It finished just before the kill landed: its answer stands.
                    Some(outcome) => {
                        self.program = None;
                        outcome
                    }
                    _ => {
                        self.fail("was killed: warren is stopping and cannot wait for it".into());
                        Outcome::Aborted
                    }
                }
            }
        }
    }

    fn between(&mut self) {
        self.recycle_if_due(false);
    }
}

impl Drop for PipeHandler {
    fn drop(&mut self) {
        if let Some(program) = self.program.take() {
            program.stop();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What `parse_answer` makes of an answer that settles the message at once.
    fn settled(line: &[u8], tag: u64) -> Result<Outcome, String> {
        parse_answer(line, tag).map(|verdict| match verdict {
            Verdict::Settle(outcome) => outcome,
            Verdict::Reply(size) => panic!("a reply of {size} bytes"),
        })
    }

    #[test]
    fn answers_are_the_tag_then_ack_retry_or_dead_with_an_optional_reason() {
        assert_eq!(settled(b"7 ack", 7), Ok(Outcome::Done));
        assert_eq!(settled(b"7 ack\r", 7), Ok(Outcome::Done));
        assert_eq!(
            settled(b"7 retry", 7),
            Ok(Outcome::Retry("answered retry".into()))
        );
        assert_eq!(
            settled(b"7 retry database is down", 7),
            Ok(Outcome::Retry("answered retry: database is down".into()))
        );
        assert_eq!(
            settled(b"7 dead no such invoice", 7),
            Ok(Outcome::DeadLetter {
                status: "answered dead".into(),
                reason: Some("no such invoice".into())
            })
        );
        assert_eq!(
            settled(b"7 dead ", 7),
            Ok(Outcome::DeadLetter {
                status: "answered dead".into(),
                reason: None
            })
        );
        for bad in [
            &b""[..],
            b"7",
            b"7 ",
            b"7 ACK",
            b"7 ok",
            b"7  ack",
            b" 7 ack",
            b"x7 ack",
        ] {
            let why = settled(bad, 7).unwrap_err();
            assert!(
                why.contains("which is not \"7 ack|retry|dead|reply SIZE\""),
                "{why}"
            );
        }
    }

    #[test]
    fn a_reply_answer_gives_the_size_of_the_body_that_follows_it() {
        assert_eq!(parse_answer(b"7 reply 5", 7), Ok(Verdict::Reply(5)));
        assert_eq!(parse_answer(b"7 reply 0\r", 7), Ok(Verdict::Reply(0)));
        for bad in [&b"7 reply"[..], b"7 reply x", b"7 reply -1", b"7 reply 5 6"] {
            let why = parse_answer(bad, 7).unwrap_err();
            assert!(why.contains("which is not \"7 reply SIZE\""), "{why}");
        }
        let too_big = format!("7 reply {}", MAX_REPLY + 1);
        let why = parse_answer(too_big.as_bytes(), 7).unwrap_err();
        assert!(
            why.contains("more than the 16777216 a reply may have"),
            "{why}"
        );
    }

    #[test]
    fn an_answer_that_names_another_message_is_refused() {
        for (line, tag) in [
            (&b"6 ack"[..], "6"),
            (b"8 ack", "8"),
            (b"0 dead", "0"),
            (b"07 ack", "07"),
        ] {
            let why = settled(line, 7).unwrap_err();
            assert!(
                why.contains(&format!("for tag {tag} while tag 7 was in flight")),
                "{why}"
            );
        }
    }

    #[test]
    fn a_protocol_1_answer_is_refused_with_what_to_answer_instead() {
        for (line, verb) in [
            (&b"ack"[..], "ack"),
            (b"retry later", "retry"),
            (b"dead", "dead"),
        ] {
            let why = settled(line, 7).unwrap_err();
            assert!(why.contains("without a tag"), "{why}");
            assert!(why.contains(&format!("as in \"7 {verb}\"")), "{why}");
        }
    }

    /// A pipe program that acks every message.
    const ACKS: &str = "import json, sys\n\
        while True:\n\
        \x20   line = sys.stdin.buffer.readline()\n\
        \x20   if not line:\n\
        \x20       sys.exit(0)\n\
        \x20   header = json.loads(line)\n\
        \x20   sys.stdin.buffer.read(header['size'])\n\
        \x20   print(header['tag'], 'ack', flush=True)\n";

    fn acking(recycle: Recycle, metrics: &Arc<Metrics>) -> PipeHandler {
        let argv = ["python3", "-c", ACKS].map(String::from).to_vec();
        let timeout = Duration::from_secs(20);
        PipeHandler::new(argv, "q", 1, timeout, Duration::from_secs(1))
            .recycled(recycle, Arc::clone(metrics))
    }

    fn task() -> Task<'static> {
        Task {
            body: b"hello",
            message_id: None,
            redelivered: false,
            queue: "q",
            worker: 1,
            attempt: 1,
            context: &crate::context::NONE,
        }
    }

    fn pid(handler: &PipeHandler) -> Pid {
        handler.program.as_ref().expect("a program runs").pid
    }

    fn recycles(metrics: &Metrics, reason: &str) -> bool {
        let line = format!("warren_pipe_recycles_total{{queue=\"q\",reason=\"{reason}\"}} 1");
        metrics.encode().contains(&line)
    }

    #[test]
    fn a_program_is_recycled_between_messages_once_it_ran_max_tasks_and_tags_keep_growing() {
        let metrics = Arc::new(Metrics::new("q", &[]));
        let limits = Recycle {
            max_tasks: Some(2),
            ..Recycle::default()
        };
        let mut handler = acking(limits, &metrics);
        handler.start();
        let first = pid(&handler);
        for _ in 0..2 {
            assert_eq!(handler.handle(&task(), &Abort::never()), Outcome::Done);
            assert_eq!(pid(&handler), first, "never during a message");
        }
        handler.between();
        let second = pid(&handler);
        assert_ne!(second, first, "a fresh program after the second message");
        assert!(recycles(&metrics, "max_tasks"), "{}", metrics.encode());
        assert_eq!(handler.failures, 0, "a recycle is no failure");
        assert!(handler.restart_at.is_none(), "and no backoff follows it");
        assert_eq!(handler.handle(&task(), &Abort::never()), Outcome::Done);
        assert_eq!(handler.tag, 3, "tags go on growing across programs");
        handler.between();
        assert_eq!(pid(&handler), second, "one message is below the limit");
    }

    #[test]
    fn a_program_idle_past_max_age_is_recycled_before_the_next_message_is_written() {
        let metrics = Arc::new(Metrics::new("q", &[]));
        let limits = Recycle {
            max_age: Some(Duration::from_millis(300)),
            ..Recycle::default()
        };
        let mut handler = acking(limits, &metrics);
        handler.start();
        let first = pid(&handler);
        // The age is the condition: nothing else to wait for.
        thread::sleep(Duration::from_millis(400));
        assert_eq!(handler.handle(&task(), &Abort::never()), Outcome::Done);
        assert_ne!(pid(&handler), first, "the message went to a fresh program");
        assert!(recycles(&metrics, "max_age"), "{}", metrics.encode());
    }

    #[test]
    fn resident_memory_is_read_from_proc_and_none_once_the_process_is_gone() {
        let own = resident_memory(Pid::this()).expect("this process's VmRSS");
        assert!(own > 1 << 20, "{own} bytes");
        assert_eq!(resident_memory(Pid::from_raw(i32::MAX)), None);
    }

    #[test]
    fn restarts_back_off_after_the_second_failure_in_a_row() {
        let delays: Vec<Duration> = (1..=12).map(backoff).collect();
        assert_eq!(delays[0], Duration::ZERO, "one crash is one bad message");
        assert_eq!(
            delays[1..4],
            [MIN_BACKOFF, MIN_BACKOFF * 2, MIN_BACKOFF * 4]
        );
        assert_eq!(delays[11], MAX_BACKOFF);
    }
}
