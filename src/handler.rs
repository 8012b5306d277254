//! What runs for each message: the [`Handler`] trait, and the handlers a configuration can name
//! (`dots` and `command`).
//!
//! A handler decides an [`Outcome`]; it never acks, nacks or talks to the broker, which is the
//! worker's job. A handler must return promptly once its [`Abort`] fires (the shutdown grace has
//! run out), so it waits on that signal rather than sleeping or blocking blind.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use crossbeam_channel::{bounded, select, Receiver, Sender};
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;

use crate::config;
use crate::pipe::PipeHandler;

/// One message, as a handler sees it.
#[derive(Debug, Clone, Copy)]
pub struct Task<'a> {
    pub body: &'a [u8],
    /// The `message_id` property, if the publisher set one.
    pub message_id: Option<&'a str>,
    /// True when the broker delivered this message before, to this or another consumer.
    pub redelivered: bool,
    pub queue: &'a str,
    /// The worker running the task, 1…N.
    pub worker: usize,
    /// Which attempt this is, from 1 (see `retry::attempt`).
    pub attempt: u32,
}

/// What the worker does with the message once the handler returns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The work is done: ack.
    Done,
    /// The work failed and may succeed later: retry the message, unless it has had all its
    /// attempts. The text says how the attempt ended ("exit status 3", "timed out after 10m").
    Retry(String),
    /// The message can never succeed: dead-letter it now. `status` says how the attempt ended
    /// ("exit status 65", "answered dead"); `reason`, if the handler gave one, becomes the
    /// dead-letter reason.
    DeadLetter {
        status: String,
        reason: Option<String>,
    },
    /// The [`Abort`] fired (the shutdown grace ran out, or a second stop signal came) and the
    /// work was abandoned: requeue it, unprocessed.
    Aborted,
}

/// Runs tasks. Each worker owns its own handler, made by a [`HandlerFactory`], so a handler may
/// keep state (such as a long-lived child process) without locks.
pub trait Handler: Send {
    /// Called once the worker is consuming, before its first message, so that a handler can
    /// start what it keeps running instead of making the first message wait for it.
    fn start(&mut self) {}

    fn handle(&mut self, task: &Task<'_>, abort: &Abort) -> Outcome;
}

/// Makes the handler of worker `n` (1…N). Called again when a worker is restarted.
pub type HandlerFactory = Arc<dyn Fn(usize) -> Box<dyn Handler> + Send + Sync>;

/// Fires when tasks in flight must be abandoned: the shutdown grace has run out, or a second stop
/// signal came. It fires by its sender being dropped, so it reaches every clone at once.
#[derive(Clone)]
pub struct Abort(Receiver<std::convert::Infallible>);

impl Abort {
    pub fn new(receiver: Receiver<std::convert::Infallible>) -> Abort {
        Abort(receiver)
    }

    /// An abort signal that never fires, for running a handler outside a pool.
    pub fn never() -> Abort {
        let (sender, receiver) = bounded(0);
        // Leaking the sender keeps the channel open for the life of the process.
        std::mem::forget(sender);
        Abort(receiver)
    }

    pub fn receiver(&self) -> &Receiver<std::convert::Infallible> {
        &self.0
    }

    /// Sleeps for `duration` unless the abort fires first. Returns false if it fired.
    pub fn sleep(&self, duration: Duration) -> bool {
        self.0.recv_timeout(duration).is_err_and(|e| e.is_timeout())
    }
}

/// The factory for the configured handler.
pub fn from_config(handler: &config::Handler, queue: &str) -> HandlerFactory {
    let timeout = handler.timeout;
    match &handler.kind {
        config::HandlerKind::Dots => Arc::new(move |_| Box::new(Dots { timeout })),
        config::HandlerKind::Pipe { argv } => {
            let (argv, queue, kill_grace) = (argv.clone(), queue.to_string(), handler.kill_grace);
            Arc::new(move |worker| {
                Box::new(PipeHandler::new(
                    argv.clone(),
                    &queue,
                    worker,
                    timeout,
                    kill_grace,
                ))
            })
        }
        config::HandlerKind::Command { argv } => {
            let command = CommandHandler {
                argv: argv.clone(),
                queue: queue.to_string(),
                timeout,
                kill_grace: handler.kill_grace,
            };
            Arc::new(move |_| Box::new(command.clone()))
        }
    }
}

/// The exit status by which a command asks for a retry (sysexits' EX_TEMPFAIL).
pub const EXIT_RETRY: i32 = 75;
/// The exit status by which a command says the message can never succeed (EX_DATAERR).
pub const EXIT_DEAD_LETTER: i32 = 65;

/// The tutorial's handler: one second of "work" per `.` in the body.
pub struct Dots {
    pub timeout: Duration,
}

impl Handler for Dots {
    fn handle(&mut self, task: &Task<'_>, abort: &Abort) -> Outcome {
        let dots = task.body.iter().filter(|&&b| b == b'.').count() as u32;
        let work = Duration::from_secs(1) * dots;
        if !abort.sleep(work.min(self.timeout)) {
            Outcome::Aborted
        } else if work > self.timeout {
            Outcome::Retry(format!(
                "timed out after {}",
                humantime::format_duration(self.timeout)
            ))
        } else {
            Outcome::Done
        }
    }
}

/// Runs a program per message, with the body on stdin and never through a shell.
#[derive(Clone)]
pub struct CommandHandler {
    argv: Vec<String>,
    queue: String,
    timeout: Duration,
    kill_grace: Duration,
}

/// Longest line of a child's output that goes to the log as one line; longer lines are split.
const MAX_LOG_LINE: usize = 4096;
/// How much of each output stream of one task goes to the log; the rest is read and dropped,
/// so that a chatty program neither floods the log nor blocks on a full pipe.
const MAX_LOGGED_OUTPUT: usize = 64 * 1024;

/// How long to wait, after a child exits, for its output to be logged. A grandchild that keeps
/// the pipes open must not hold up the worker.
const OUTPUT_DRAIN: Duration = Duration::from_millis(250);

impl Handler for CommandHandler {
    fn handle(&mut self, task: &Task<'_>, abort: &Abort) -> Outcome {
        let worker = format!("worker-{}", task.worker);
        let mut child = match program(&self.argv, &self.queue, task.worker)
            .env("WARREN_MESSAGE_ID", task.message_id.unwrap_or(""))
            .env(
                "WARREN_REDELIVERED",
                if task.redelivered { "1" } else { "0" },
            )
            .env("WARREN_ATTEMPT", task.attempt.to_string())
            .spawn()
        {
            Ok(child) => child,
            Err(e) => return Outcome::Retry(format!("cannot start {}: {e}", self.argv[0])),
        };

        let (logged_tx, logged) = bounded::<()>(2);
        if let Some(stdout) = child.stdout.take() {
            log_output(
                stdout,
                &worker,
                "stdout",
                Some(MAX_LOGGED_OUTPUT),
                Some(&logged_tx),
            );
        }
        if let Some(stderr) = child.stderr.take() {
            log_output(
                stderr,
                &worker,
                "stderr",
                Some(MAX_LOGGED_OUTPUT),
                Some(&logged_tx),
            );
        }
        drop(logged_tx);

        let pid = Pid::from_raw(child.id() as i32);
        let exited = match feed_and_wait(child, task.body.to_vec(), &worker) {
            Ok(exited) => exited,
            Err(e) => {
                let _ = killpg(pid, Signal::SIGKILL);
                return Outcome::Retry(format!("cannot run {}: {e}", self.argv[0]));
            }
        };
        let mut timed_out = false;
        let status = select! {
            recv(exited) -> status => status.ok(),
            recv(abort.receiver()) -> _ => {
                // The grace is over: kill the task and everything it started. A task that
                // exited successfully just before the kill landed did its work.
                let _ = killpg(pid, Signal::SIGKILL);
                match exited.recv() {
                    Ok(Ok(status)) if status.success() => Some(Ok(status)),
                    _ => return Outcome::Aborted,
                }
            }
            recv(crossbeam_channel::after(self.timeout)) -> _ => {
                // Ask the whole group to stop, then insist.
                timed_out = true;
                log::warn!(
                    "{worker}: the task ran past handler.timeout ({}); sending SIGTERM to its process group",
                    humantime::format_duration(self.timeout)
                );
                let _ = killpg(pid, Signal::SIGTERM);
                select! {
                    recv(exited) -> status => status.ok(),
                    recv(abort.receiver()) -> _ => {
                        let _ = killpg(pid, Signal::SIGKILL);
                        let _ = exited.recv();
                        return Outcome::Aborted;
                    }
                    recv(crossbeam_channel::after(self.kill_grace)) -> _ => {
                        log::warn!("{worker}: the task outlived handler.kill_grace; sending SIGKILL");
                        let _ = killpg(pid, Signal::SIGKILL);
                        exited.recv().ok()
                    }
                }
            }
        };
        // Each logger holds a sender and drops it when its pipe closes, which disconnects the
        // channel; wait for that, briefly, so that the task's output comes before its "done"
        // line.
        let _ = logged.recv_timeout(OUTPUT_DRAIN);

        match status {
            _ if timed_out => Outcome::Retry(format!(
                "timed out after {}",
                humantime::format_duration(self.timeout)
            )),
            Some(Ok(status)) if status.success() => Outcome::Done,
            Some(Ok(status)) if status.code() == Some(EXIT_DEAD_LETTER) => Outcome::DeadLetter {
                status: describe(status),
                reason: None,
            },
            Some(Ok(status)) if status.code() == Some(EXIT_RETRY) => {
                Outcome::Retry(format!("{} (asked for a retry)", describe(status)))
            }
            Some(Ok(status)) => Outcome::Retry(describe(status)),
            Some(Err(e)) => Outcome::Retry(format!("cannot wait for {}: {e}", self.argv[0])),
            None => Outcome::Retry("the task's waiter thread died".into()),
        }
    }
}

/// Writes `body` to the child's stdin and waits for it to exit, on a thread of its own, so that
/// the worker can give up on it when the abort fires.
fn feed_and_wait(
    mut child: Child,
    body: Vec<u8>,
    worker: &str,
) -> io::Result<Receiver<io::Result<ExitStatus>>> {
    let (sender, receiver) = bounded(1);
    thread::Builder::new()
        .name(format!("{worker}-task"))
        .spawn(move || {
            if let Some(mut stdin) = child.stdin.take() {
                // A program may exit or close stdin without reading it all; that is its choice,
                // and its exit status says whether it succeeded.
                match stdin.write_all(&body) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::BrokenPipe => {}
                    Err(e) => log::warn!("cannot write the message body to the task's stdin: {e}"),
                }
            }
            let _ = sender.send(child.wait());
        })?;
    Ok(receiver)
}

/// The command that starts `argv` for a worker: never through a shell, with the environment
/// every handler program gets, all three standard streams piped, in a process group of its own.
pub(crate) fn program(argv: &[String], queue: &str, worker: usize) -> Command {
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
    command
}

/// Logs a program's output stream on a thread of its own (see [`log_lines`]); the thread drops
/// its clone of `done`, if given, when the stream closes.
pub(crate) fn log_output(
    pipe: impl Read + Send + 'static,
    worker: &str,
    stream: &str,
    limit: Option<usize>,
    done: Option<&Sender<()>>,
) {
    let prefix = format!("{worker} {stream}:");
    let done = done.cloned();
    let spawned = thread::Builder::new()
        .name(format!("{worker}-{stream}"))
        .spawn(move || {
            log_lines(pipe, &prefix, limit);
            drop(done);
        });
    if let Err(e) = spawned {
        log::warn!("{worker}: cannot start a thread to log the task's {stream}: {e}");
    }
}

/// How a program ended, for the log and the dead-letter headers.
pub(crate) fn describe(status: ExitStatus) -> String {
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

/// Logs each line of `pipe` with `prefix`, splitting lines longer than [`MAX_LOG_LINE`], up to
/// `limit` bytes if there is one; then reads the rest without logging it.
fn log_lines(pipe: impl Read, prefix: &str, limit: Option<usize>) {
    let mut reader = BufReader::new(pipe);
    let mut line = Vec::new();
    let limit = limit.unwrap_or(usize::MAX);
    let mut logged = 0;
    loop {
        line.clear();
        match (&mut reader)
            .take(MAX_LOG_LINE as u64)
            .read_until(b'\n', &mut line)
        {
            Ok(0) => return,
            Ok(n) if logged >= limit => {
                if logged == limit {
                    log::warn!(
                        "{prefix} more than {limit} bytes of output; the rest is not logged"
                    );
                }
                logged = logged.saturating_add(n);
            }
            Ok(n) => {
                logged = logged.saturating_add(n).min(limit);
                let text = line.strip_suffix(b"\n").unwrap_or(&line);
                log::info!("{prefix} {}", String::from_utf8_lossy(text));
            }
            Err(e) => {
                log::warn!("{prefix} cannot read: {e}");
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task(body: &[u8]) -> Task<'_> {
        Task {
            body,
            message_id: Some("m-1"),
            redelivered: false,
            queue: "q",
            worker: 3,
            attempt: 1,
        }
    }

    fn command(argv: &[&str]) -> CommandHandler {
        CommandHandler {
            argv: argv.iter().map(|s| s.to_string()).collect(),
            queue: "q".into(),
            timeout: Duration::from_secs(60),
            kill_grace: Duration::from_secs(5),
        }
    }

    #[test]
    fn dots_sleeps_one_second_per_dot_until_aborted() {
        let (sender, receiver) = bounded(0);
        let abort = Abort::new(receiver);
        let mut dots = Dots {
            timeout: Duration::from_millis(200),
        };
        assert_eq!(dots.handle(&task(b"no dots"), &abort), Outcome::Done);
        assert_eq!(
            dots.handle(&task(b"one."), &abort),
            Outcome::Retry("timed out after 200ms".into())
        );
        drop(sender);
        assert_eq!(dots.handle(&task(b"many....."), &abort), Outcome::Aborted);
    }

    #[test]
    fn a_command_exit_status_decides_the_outcome() {
        let never = Abort::never();
        assert_eq!(command(&["true"]).handle(&task(b""), &never), Outcome::Done);
        assert_eq!(
            command(&["sh", "-c", "exit 3"]).handle(&task(b""), &never),
            Outcome::Retry("exit status 3".into())
        );
        assert_eq!(
            command(&["sh", "-c", "exit 75"]).handle(&task(b""), &never),
            Outcome::Retry("exit status 75 (asked for a retry)".into())
        );
        assert_eq!(
            command(&["sh", "-c", "exit 65"]).handle(&task(b""), &never),
            Outcome::DeadLetter {
                status: "exit status 65".into(),
                reason: None
            }
        );
        assert_eq!(
            command(&["sh", "-c", "kill -9 $$"]).handle(&task(b""), &never),
            Outcome::Retry("killed by signal 9 (SIGKILL)".into())
        );
        let missing = command(&["/nonexistent/warren-job"]).handle(&task(b""), &never);
        assert!(
            matches!(missing, Outcome::Retry(ref why) if why.starts_with("cannot start /nonexistent/warren-job"))
        );
    }

    #[test]
    fn a_command_that_ignores_stdin_still_succeeds() {
        let body = vec![b'x'; 1 << 20];
        assert_eq!(
            command(&["true"]).handle(&task(&body), &Abort::never()),
            Outcome::Done
        );
    }

    #[test]
    fn a_command_past_its_timeout_gets_sigterm_then_sigkill_with_its_group() {
        let mut polite = CommandHandler {
            timeout: Duration::from_millis(300),
            ..command(&["sh", "-c", "sleep 30 & wait"])
        };
        let started = std::time::Instant::now();
        assert_eq!(
            polite.handle(&task(b""), &Abort::never()),
            Outcome::Retry("timed out after 300ms".into())
        );
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "SIGTERM ended it"
        );

        let mut stubborn = CommandHandler {
            timeout: Duration::from_millis(300),
            kill_grace: Duration::from_millis(300),
            ..command(&["sh", "-c", "trap '' TERM; sleep 30 & wait; sleep 30"])
        };
        let started = std::time::Instant::now();
        assert_eq!(
            stubborn.handle(&task(b""), &Abort::never()),
            Outcome::Retry("timed out after 300ms".into())
        );
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "SIGKILL ended it"
        );
    }

    #[test]
    fn an_aborted_command_is_killed_with_its_process_group() {
        let (sender, receiver) = bounded(0);
        let abort = Abort::new(receiver);
        let killer = thread::spawn(move || {
            thread::sleep(Duration::from_millis(200));
            drop(sender);
        });
        let started = std::time::Instant::now();
        let outcome =
            command(&["sh", "-c", "sleep 30 & sleep 30; wait"]).handle(&task(b""), &abort);
        killer.join().unwrap();
        assert_eq!(outcome, Outcome::Aborted);
        assert!(started.elapsed() < Duration::from_secs(10));
    }
}
