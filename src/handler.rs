//! What runs for each message: the [`Handler`] trait, and the handlers a configuration can name
//! (`dots` and `command`).
//!
//! A handler decides an [`Outcome`]; it never acks, nacks or talks to the broker, which is the
//! worker's job. A handler must return promptly once its [`Abort`] fires (the shutdown grace has
//! run out), so it waits on that signal rather than sleeping or blocking blind.

use std::sync::Arc;
use std::time::Duration;

use crate::abort::Abort;
use crate::child;
use crate::context::Context;

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
    /// Its routing, properties and headers, for handler programs.
    pub context: &'a Context<'a>,
}

/// What the worker does with the message once the handler returns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The work is done: ack.
    Done,
    /// The work is done and this is its answer: publish it to the message's `reply_to`, and ack
    /// once the broker has confirmed it (see `Worker::reply`).
    Reply(Vec<u8>),
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

    /// Called after each message is settled (acked, or its copy confirmed, or requeued), before
    /// the next is taken: where a handler may replace what it keeps running without holding up
    /// a message or its ack (a `pipe` program that reached its limits is recycled here). Not
    /// called once warren is stopping.
    fn between(&mut self) {}
}

/// Makes the handler of worker `n` (1…N). Called again when a worker is restarted.
pub type HandlerFactory = Arc<dyn Fn(usize) -> Box<dyn Handler> + Send + Sync>;

/// The largest answer a handler may give to a message with `reply_to`, in bytes.
pub const MAX_REPLY: usize = 16 << 20;

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
        if work.is_zero() {
            return Outcome::Done;
        }
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
pub struct CommandHandler {
    program: child::Program,
    timeout: Duration,
    kill_grace: Duration,
    /// Its standard output answers a message that has `reply_to` (`handler.reply`).
    reply: bool,
}

impl CommandHandler {
    /// The handler of `worker`, which runs `argv` for each message of `queue`.
    pub fn new(
        argv: &[String],
        queue: &str,
        worker: usize,
        timeout: Duration,
        kill_grace: Duration,
    ) -> Self {
        CommandHandler {
            program: child::Program::new(argv, queue, worker),
            timeout,
            kill_grace,
            reply: false,
        }
    }

    /// With `reply`, the program's standard output is the answer to a message that has
    /// `reply_to`, instead of going to the log.
    pub fn replying(self, reply: bool) -> Self {
        CommandHandler { reply, ..self }
    }
}

impl Handler for CommandHandler {
    fn handle(&mut self, task: &Task<'_>, abort: &Abort) -> Outcome {
        let mut vars = vec![
            (
                "WARREN_MESSAGE_ID".to_string(),
                task.message_id.unwrap_or("").to_string(),
            ),
            (
                "WARREN_REDELIVERED".to_string(),
                if task.redelivered { "1" } else { "0" }.to_string(),
            ),
            ("WARREN_ATTEMPT".to_string(), task.attempt.to_string()),
        ];
        vars.extend(task.context.environment().vars);
        let limits = child::Limits {
            timeout: self.timeout,
            kill_grace: self.kill_grace,
            abort,
            keep_stdout: (self.reply && task.context.reply_to.is_some()).then_some(MAX_REPLY),
        };
        let worker = format!("worker-{}", task.worker);
        let run = match child::run(&self.program, &vars, task.body, &worker, &limits) {
            Ok(run) => run,
            Err(child::RunError::Start(e)) => {
                return Outcome::Retry(format!("cannot start {}: {e}", self.program.name()))
            }
            Err(child::RunError::Wait(e)) => {
                return Outcome::Retry(format!("cannot run {}: {e}", self.program.name()))
            }
        };
        // When the grace is over the task is killed; one that exited successfully just before
        // the kill landed did its work.
        if run.aborted && (run.timed_out || !run.status.success()) {
            return Outcome::Aborted;
        }
        let status = run.status;
        match status {
            _ if run.timed_out => Outcome::Retry(format!(
                "timed out after {}",
                humantime::format_duration(self.timeout)
            )),
            status if status.success() => match run.stdout {
                None => Outcome::Done,
                Some(Ok(answer)) => Outcome::Reply(answer),
                Some(Err(size)) => Outcome::Retry(format!(
                    "wrote a reply of {size} bytes, more than the {MAX_REPLY} a reply may have"
                )),
            },
            status if status.code() == Some(EXIT_DEAD_LETTER) => Outcome::DeadLetter {
                status: child::describe(status),
                reason: None,
            },
            status if status.code() == Some(EXIT_RETRY) => {
                Outcome::Retry(format!("{} (asked for a retry)", child::describe(status)))
            }
            status => Outcome::Retry(child::describe(status)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::context;
    use crate::context::Context;
    use std::thread;

    fn task(body: &[u8]) -> Task<'_> {
        Task {
            body,
            message_id: Some("m-1"),
            redelivered: false,
            queue: "q",
            worker: 3,
            attempt: 1,
            context: &context::NONE,
        }
    }

    fn command(argv: &[&str]) -> CommandHandler {
        let argv: Vec<String> = argv.iter().map(|s| s.to_string()).collect();
        CommandHandler::new(
            &argv,
            "q",
            3,
            Duration::from_secs(60),
            Duration::from_secs(5),
        )
    }

    #[test]
    fn dots_sleeps_one_second_per_dot_until_aborted() {
        let (trigger, abort) = Abort::new().unwrap();
        let mut dots = Dots {
            timeout: Duration::from_millis(200),
        };
        assert_eq!(dots.handle(&task(b"no dots"), &abort), Outcome::Done);
        assert_eq!(
            dots.handle(&task(b"one."), &abort),
            Outcome::Retry("timed out after 200ms".into())
        );
        drop(trigger);
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
    fn a_replying_command_answers_with_its_stdout_only_a_message_with_reply_to() {
        let never = Abort::never();
        let asking = Context {
            reply_to: Some("replies"),
            ..Context::default()
        };
        let mut shout = command(&["tr", "a-z", "A-Z"]).replying(true);
        let ask = Task {
            context: &asking,
            ..task(b"hello")
        };
        assert_eq!(
            shout.handle(&ask, &never),
            Outcome::Reply(b"HELLO".to_vec())
        );
        assert_eq!(shout.handle(&task(b"hello"), &never), Outcome::Done);
        let mut quiet = command(&["tr", "a-z", "A-Z"]);
        assert_eq!(quiet.handle(&ask, &never), Outcome::Done, "replying is off");

        let mut huge = command(&["head", "-c", "16777217", "/dev/zero"]).replying(true);
        assert_eq!(
            huge.handle(&ask, &never),
            Outcome::Retry(
                "wrote a reply of 16777217 bytes, more than the 16777216 a reply may have".into()
            )
        );
        let mut failing = command(&["sh", "-c", "echo partial; exit 3"]).replying(true);
        assert_eq!(
            failing.handle(&ask, &never),
            Outcome::Retry("exit status 3".into()),
            "a failed attempt sends no answer"
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
        let (trigger, abort) = Abort::new().unwrap();
        let killer = thread::spawn(move || {
            thread::sleep(Duration::from_millis(200));
            drop(trigger);
        });
        let started = std::time::Instant::now();
        let outcome =
            command(&["sh", "-c", "sleep 30 & sleep 30; wait"]).handle(&task(b""), &abort);
        killer.join().unwrap();
        assert_eq!(outcome, Outcome::Aborted);
        assert!(started.elapsed() < Duration::from_secs(10));
    }
}
