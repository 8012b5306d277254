//! The `pipe` handler: one long-lived program per worker, with messages streamed to it, for
//! handlers too costly to start once per message (an interpreter, a model, a connection pool).
//!
//! The protocol, one message at a time:
//! - warren writes one line of JSON to the program's stdin, `{"id": …, "queue": …, "attempt":
//!   1, "redelivered": false, "size": N}`, then exactly N bytes of body. The length framing makes
//!   any body safe, binary included.
//! - The program answers with one line on stdout: `ack`, `retry` or `dead`, optionally followed
//!   by a space and a reason. Its stderr goes to warren's log.
//! - A program that dies mid-message, answers anything else, answers out of turn or overruns
//!   `handler.timeout` fails the attempt like a failing command, and is killed (its whole process
//!   group) and started again, with a backoff when it keeps failing.
//! - When warren stops or restarts the worker it closes the program's stdin; the program should
//!   then exit. [`STOP_WAIT`] later its process group is killed.
//!
//! The worker thread writes the frames itself (without blocking past the deadline: stdin is
//! non-blocking), and two threads per program read its stdout and its stderr, so a wait on the
//! answer is a `select!` over the answer, the program's exit, the abort and the deadline.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::fd::{AsFd, AsRawFd};
use std::process::{ChildStdin, ExitStatus};
use std::thread;
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, select, unbounded, Receiver, Sender};
use nix::fcntl::{fcntl, FcntlArg, OFlag};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use serde::Serialize;

use crate::handler::{self, Abort, Handler, Outcome, Task};

/// After closing a program's stdin, how long warren waits for it to exit before killing it.
pub const STOP_WAIT: Duration = Duration::from_secs(1);
/// The longest answer line read; the rest of a longer line is a protocol error all the same.
const MAX_ANSWER: usize = 4096;
/// The restart delay after the second failure in a row; it doubles up to [`MAX_BACKOFF`]. The
/// first restart is immediate: one crash is usually one bad message.
const MIN_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(10);
/// How long to wait for a program that closed its stdout to report its exit, and for an answer
/// written just before an exit to be read.
const SETTLE: Duration = Duration::from_millis(500);
/// While a frame does not fit in the pipe, how often the writer checks the abort signal.
const WRITE_SLICE: Duration = Duration::from_millis(100);

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
    id: Option<&'a str>,
    queue: &'a str,
    attempt: u32,
    redelivered: bool,
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
    /// The program is not started again before this.
    restart_at: Option<Instant>,
    /// The frame being written, kept to reuse its allocation.
    frame: Vec<u8>,
}

/// A running program.
struct Program {
    pid: Pid,
    stdin: ChildStdin,
    /// Answer lines from its stdout; disconnected when it closes stdout.
    answers: Receiver<Vec<u8>>,
    /// Its exit status, once it has exited.
    exited: Receiver<io::Result<ExitStatus>>,
}

impl Program {
    fn start(
        argv: &[String],
        queue: &str,
        worker: usize,
        name: &str,
    ) -> io::Result<(Program, u32)> {
        let mut child = handler::program(argv, queue, worker).spawn()?;
        let pid = child.id();
        let stdin = child.stdin.take().expect("invariant: stdin is piped");
        let stdout = child.stdout.take().expect("invariant: stdout is piped");
        // The stderr logger's end is not waited for: the program is long-lived.
        if let Some(stderr) = child.stderr.take() {
            handler::log_output(stderr, name, "stderr", None, None);
        }
        // Frames are written without blocking, so that a program that stops reading cannot
        // hold the worker past its deadline.
        let flags = OFlag::from_bits_truncate(fcntl(stdin.as_raw_fd(), FcntlArg::F_GETFL)?);
        fcntl(
            stdin.as_raw_fd(),
            FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK),
        )?;

        let (answer_tx, answers) = unbounded();
        let (exit_tx, exited) = bounded(1);
        let reader = thread::Builder::new()
            .name(format!("{name}-stdout"))
            .spawn(move || read_answers(stdout, answer_tx));
        let waiter = thread::Builder::new()
            .name(format!("{name}-wait"))
            .spawn(move || {
                let _ = exit_tx.send(child.wait());
            });
        let program = Program {
            pid: Pid::from_raw(pid as i32),
            stdin,
            answers,
            exited,
        };
        if let Err(e) = reader.and(waiter) {
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
            Ok(Ok(status)) => handler::describe(status),
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
}

/// Sends each line of `stdout` (without its newline) to `answers`, until it closes.
fn read_answers(stdout: impl Read, answers: Sender<Vec<u8>>) {
    let mut reader = BufReader::new(stdout);
    loop {
        let mut line = Vec::new();
        match (&mut reader)
            .take(MAX_ANSWER as u64)
            .read_until(b'\n', &mut line)
        {
            Ok(0) | Err(_) => return,
            Ok(_) => {
                if line.last() == Some(&b'\n') {
                    line.pop();
                }
                if answers.send(line).is_err() {
                    return;
                }
            }
        }
    }
}

/// What a program's answer line means, or why it means nothing.
fn parse_answer(line: &[u8]) -> Result<Outcome, String> {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let text = String::from_utf8_lossy(line);
    let (verb, reason) = match text.split_once(' ') {
        Some((verb, reason)) if !reason.trim().is_empty() => (verb, Some(reason.trim())),
        Some((verb, _)) => (verb, None),
        None => (&*text, None),
    };
    match verb {
        "ack" => Ok(Outcome::Done),
        "retry" => Ok(Outcome::Retry(match reason {
            Some(reason) => format!("answered retry: {reason}"),
            None => "answered retry".to_string(),
        })),
        "dead" => Ok(Outcome::DeadLetter {
            status: "answered dead".to_string(),
            reason: reason.map(str::to_string),
        }),
        _ => Err(format!(
            "answered {:?}, which is not ack, retry or dead",
            preview(&text)
        )),
    }
}

fn preview(text: &str) -> String {
    match text.char_indices().nth(80) {
        Some((end, _)) => format!("{}…", &text[..end]),
        None => text.to_string(),
    }
}

/// How writing a frame ended, short of success.
enum WriteEnd {
    Aborted,
    TimedOut,
    Failed(io::Error),
}

/// Writes `frame` to the non-blocking `stdin`, waiting for room in the pipe until `deadline`.
fn write_frame(
    stdin: &mut ChildStdin,
    mut frame: &[u8],
    deadline: Instant,
    abort: &Abort,
) -> Result<(), WriteEnd> {
    while !frame.is_empty() {
        match stdin.write(frame) {
            Ok(0) => return Err(WriteEnd::Failed(io::ErrorKind::WriteZero.into())),
            Ok(n) => frame = &frame[n..],
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                // The program has not read what came before: wait for room, keeping an eye on
                // the abort and the deadline.
                if abort
                    .receiver()
                    .try_recv()
                    .is_err_and(|e| e.is_disconnected())
                {
                    return Err(WriteEnd::Aborted);
                }
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(WriteEnd::TimedOut);
                }
                let wait = left.min(WRITE_SLICE).as_millis().max(1) as u16;
                let mut fds = [PollFd::new(stdin.as_fd(), PollFlags::POLLOUT)];
                match poll(&mut fds, PollTimeout::from(wait)) {
                    Ok(_) | Err(nix::errno::Errno::EINTR) => {}
                    Err(e) => return Err(WriteEnd::Failed(e.into())),
                }
            }
            Err(e) => return Err(WriteEnd::Failed(e)),
        }
    }
    Ok(())
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
            restart_at: None,
            frame: Vec::new(),
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
        let Some(program) = &self.program else {
            return;
        };
        if let Ok(status) = program.exited.try_recv() {
            let status = match status {
                Ok(status) => handler::describe(status),
                Err(e) => e.to_string(),
            };
            log::warn!(
                "{}: the pipe program exited between messages ({status}); starting it again",
                self.worker
            );
            self.program = None;
            self.failed();
        } else if let Ok(line) = program.answers.try_recv() {
            let why = format!(
                "wrote {:?} between messages, when no answer was due",
                preview(&String::from_utf8_lossy(&line))
            );
            log::warn!("{}: the pipe program {why}; restarting it", self.worker);
            program.kill();
            self.program = None;
            self.failed();
        }
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
        let deadline = Instant::now() + self.timeout;
        let mut frame = std::mem::take(&mut self.frame);
        frame.clear();
        let header = Frame {
            id: task.message_id,
            queue: task.queue,
            attempt: task.attempt,
            redelivered: task.redelivered,
            size: task.body.len(),
        };
        serde_json::to_writer(&mut frame, &header).expect("invariant: the header serialises");
        frame.push(b'\n');
        frame.extend_from_slice(task.body);

        let written = match self.ensure_started(abort) {
            Ok(program) => write_frame(&mut program.stdin, &frame, deadline, abort),
            Err(outcome) => {
                self.frame = frame;
                return outcome;
            }
        };
        self.frame = frame;
        match written {
            Ok(()) => {}
            Err(WriteEnd::Aborted) => {
                self.fail("was stopped: warren is stopping".into());
                return Outcome::Aborted;
            }
            Err(WriteEnd::TimedOut) => return self.time_out(abort),
            // A broken pipe: it has exited, or closed its stdin.
            Err(WriteEnd::Failed(e)) if e.kind() == io::ErrorKind::BrokenPipe => {
                return self.died()
            }
            Err(WriteEnd::Failed(e)) => return self.fail(format!("could not be written to: {e}")),
        }

        let program = self.program.as_ref().expect("invariant: written to above");
        let left = deadline.saturating_duration_since(Instant::now());
        let waited = select! {
            recv(program.answers) -> line => Wait::Answer(line.ok()),
            recv(program.exited) -> status => {
                // An answer written just before exiting may still be on its way.
                let answer = program.answers.recv_timeout(SETTLE).ok();
                Wait::Exited(answer, status.ok())
            }
            recv(abort.receiver()) -> _ => {
                program.kill();
                Wait::Killed(program.answers.try_recv().ok())
            }
            default(left) => Wait::TimedOut,
        };
        match waited {
            Wait::Answer(Some(line)) => match parse_answer(&line) {
                Ok(outcome) => {
                    self.failures = 0;
                    outcome
                }
                Err(why) => self.fail(why),
            },
            Wait::Answer(None) => self.died(),
            Wait::Exited(answer, status) => {
                let status = match status {
                    Some(Ok(status)) => handler::describe(status),
                    Some(Err(e)) => format!("cannot wait for it: {e}"),
                    None => "its exit status is unknown".to_string(),
                };
                match answer.map(|line| parse_answer(&line)) {
                    Some(Ok(outcome)) => {
                        // It did its work, then exited: start it again for the next message.
                        log::warn!(
                            "{}: the pipe program exited after answering ({status}); starting it again",
                            self.worker
                        );
                        self.program = None;
                        self.failures = 0;
                        outcome
                    }
                    Some(Err(why)) => self.fail(why),
                    None => self.fail(format!("exited mid-message ({status})")),
                }
            }
            Wait::Killed(answer) => match answer.map(|line| parse_answer(&line)) {
                // It finished just before the kill landed: its answer stands.
                Some(Ok(outcome)) => {
                    self.program = None;
                    outcome
                }
                _ => {
                    self.fail("was killed: warren is stopping and cannot wait for it".into());
                    Outcome::Aborted
                }
            },
            Wait::TimedOut => self.time_out(abort),
        }
    }
}

/// How the wait for an answer ended.
enum Wait {
    /// A line, or `None` when the program closed its stdout.
    Answer(Option<Vec<u8>>),
    /// The program exited, perhaps after answering.
    Exited(Option<Vec<u8>>, Option<io::Result<ExitStatus>>),
    /// The abort fired and the program was killed, perhaps after answering.
    Killed(Option<Vec<u8>>),
    TimedOut,
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

    #[test]
    fn answers_are_ack_retry_or_dead_with_an_optional_reason() {
        assert_eq!(parse_answer(b"ack"), Ok(Outcome::Done));
        assert_eq!(parse_answer(b"ack\r"), Ok(Outcome::Done));
        assert_eq!(
            parse_answer(b"retry"),
            Ok(Outcome::Retry("answered retry".into()))
        );
        assert_eq!(
            parse_answer(b"retry database is down"),
            Ok(Outcome::Retry("answered retry: database is down".into()))
        );
        assert_eq!(
            parse_answer(b"dead no such invoice"),
            Ok(Outcome::DeadLetter {
                status: "answered dead".into(),
                reason: Some("no such invoice".into())
            })
        );
        assert_eq!(
            parse_answer(b"dead "),
            Ok(Outcome::DeadLetter {
                status: "answered dead".into(),
                reason: None
            })
        );
        for bad in [&b""[..], b"ACK", b"ok", b"acknowledged", b" ack"] {
            let why = parse_answer(bad).unwrap_err();
            assert!(why.contains("not ack, retry or dead"), "{why}");
        }
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
