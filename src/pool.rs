//! The worker pool: N worker threads, each with its own consuming connection and channel (and a
//! second connection to publish retried and dead-lettered copies), and the supervisor thread
//! that starts them, restarts them when they fail, and stops them.
//!
//! This file holds what both sides share: the [`Event`]s workers and signal handlers send, how a
//! worker ends ([`Exit`]) and how the pool ends ([`Report`]), and the handles a caller holds
//! ([`Pool`], [`RunningPool`], [`Stopper`]). The supervisor's `match` loop is in
//! `pool/supervisor.rs`; a worker's life is in `pool/worker.rs`. The supervisor owns all pool
//! state, so nothing here is shared or locked.

mod breaker;
mod supervisor;
mod worker;

use std::fmt;
use std::io;
use std::panic;
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::Duration;

use crossbeam_channel::{bounded, unbounded, Sender};

use crate::amqp::AmqpError;
use crate::config::Config;
use crate::handler::HandlerFactory;
use crate::metrics::Metrics;
use breaker::Probe;
use supervisor::Supervisor;

/// How long [`Controller::ask`] waits for the supervisor's answer.
const ANSWER_WAIT: Duration = Duration::from_secs(10);

/// Everything the supervisor reacts to. Workers and the signal handler send these.
pub enum Event {
    /// Ctrl+C or SIGTERM: stop gracefully; a second one stops at once.
    Signal,
    /// A worker is connected, with its queues declared.
    Ready { worker: usize },
    /// A worker thread has ended, and how.
    Exited { worker: usize, exit: Exit },
    /// A worker's attempt failed in a way the handler's dependency may be to blame for: the
    /// circuit breaker counts it. `message` tells messages apart (`worker::message_key`).
    /// `counted` is answered once it is counted, after the orders a trip sends: the worker
    /// waits for that before it settles the message, so that it reads a pause its own failure
    /// caused while its prefetch is still full (see `Worker::run`).
    Failed {
        worker: usize,
        message: u64,
        counted: Sender<()>,
    },
    /// A worker tried one message for the circuit breaker, and this is how it went.
    Probed { worker: usize, probe: Probe },
    /// The operator asks something of the pool; the answer goes to `reply`.
    Control {
        request: Request,
        reply: Sender<Reply>,
    },
}

/// What the operator can ask of a running pool (`warren pause`, `resume`, `reload`, SIGHUP).
pub enum Request {
    /// Take no new messages until resumed; tasks in flight finish.
    Pause,
    /// Take messages again, closing the circuit breaker too.
    Resume,
    /// Apply a configuration read again: the worker count and the handler now, without dropping
    /// a running task; the keys that need a restart are reported, not applied.
    Reload {
        config: Box<Config>,
        factory: HandlerFactory,
    },
}

impl fmt::Debug for Request {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Request::Pause => f.write_str("Pause"),
            Request::Resume => f.write_str("Resume"),
            Request::Reload { config, .. } => write!(f, "Reload({})", config.path.display()),
        }
    }
}

/// The supervisor's answer to a [`Request`]: one line saying what it did, or why it refused.
pub type Reply = Result<String, Declined>;

/// Why the supervisor did not do what was asked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Declined {
    /// A reloaded configuration that cannot apply to the running one.
    #[error("{0}")]
    Config(String),
    /// warren is stopping, or did not answer.
    #[error("{0}")]
    Busy(String),
}

/// What the supervisor tells one worker, on a channel of that worker's own. A worker reads it
/// between tasks, never during one.
#[derive(Clone)]
enum Order {
    /// Take no new message: cancel the consumer and return what it delivered unprocessed.
    Pause,
    /// Consume again.
    Resume,
    /// Take one message from the queue without consuming, run it, and report how it went.
    Probe,
    /// From the next message on, use this configuration and handler.
    Reload(Arc<Config>, HandlerFactory),
    /// Stop for good, as at a stop signal: the pool has fewer workers now.
    Retire,
}

/// How a worker ended.
#[derive(Debug)]
pub enum Exit {
    /// It stopped because the pool is stopping. `requeued` names the messages whose tasks were
    /// abandoned at the end of the grace and put back on the queue.
    Stopped { requeued: Vec<String> },
    /// It could not connect (or was refused, if the error is fatal).
    ConnectFailed(AmqpError),
    /// Its connection or channel was lost after it had connected.
    Lost(AmqpError),
    /// The broker refused something retrying cannot fix, such as a queue declare.
    Fatal(AmqpError),
    /// The handler (or warren) panicked on this worker's thread.
    Panicked(String),
}

/// How the pool ended. The binary maps it to an exit code.
#[derive(Debug)]
pub enum Report {
    /// Every task in flight finished within the grace.
    Clean,
    /// The grace ran out: these messages were requeued unfinished, and these workers did not
    /// even report back (the broker requeues what they held when the process exits).
    Abandoned {
        requeued: Vec<String>,
        stuck: Vec<usize>,
    },
    /// A second signal arrived: stop now.
    Interrupted,
    /// A worker hit an error that retrying cannot fix.
    Fatal(AmqpError),
}

/// Sends the stop signal to a pool, from any thread (the Ctrl+C handler holds one).
#[derive(Clone)]
pub struct Stopper(Sender<Event>);

impl Stopper {
    /// Asks the pool to stop gracefully; the second call asks it to stop at once.
    pub fn stop(&self) {
        // The supervisor may already have ended, in which case there is nothing to stop.
        let _ = self.0.send(Event::Signal);
    }
}

/// Asks a pool things on the operator's behalf, from any thread (the control socket and the
/// SIGHUP handler hold one).
#[derive(Clone)]
pub struct Controller(Sender<Event>);

impl Controller {
    /// Sends `request` to the supervisor and waits for its answer.
    pub fn ask(&self, request: Request) -> Reply {
        let (reply, answer) = bounded(1);
        self.0
            .send(Event::Control { request, reply })
            .map_err(|_| Declined::Busy("warren is stopping".into()))?;
        answer
            .recv_timeout(ANSWER_WAIT)
            .map_err(|_| Declined::Busy(format!("warren did not answer within {ANSWER_WAIT:?}")))?
    }
}

/// A pool that has not started yet: take its [`Stopper`] and [`Controller`] (for signal handlers
/// and the control socket) first, so that no signal can arrive before something is ready to hear
/// it.
pub struct Pool {
    supervisor: Supervisor,
}

impl Pool {
    pub fn new(config: Arc<Config>, factory: HandlerFactory) -> io::Result<Pool> {
        let metrics = Pool::metrics_for(&config);
        Pool::with_metrics(config, factory, metrics)
    }

    /// Like [`Pool::new`], counting in `metrics`, made by [`Pool::metrics_for`] beforehand so
    /// that the handler factory can count in them too.
    pub fn with_metrics(
        config: Arc<Config>,
        factory: HandlerFactory,
        metrics: Arc<Metrics>,
    ) -> io::Result<Pool> {
        let (events, inbox) = unbounded();
        Ok(Pool {
            supervisor: Supervisor::new(config, factory, metrics, events, inbox)?,
        })
    }

    /// New metrics for a pool of `config`: its queue and broker nodes.
    pub fn metrics_for(config: &Config) -> Arc<Metrics> {
        let addresses: Vec<String> = config.broker.urls.iter().map(|u| u.address()).collect();
        Arc::new(Metrics::new(&config.queue.name, &addresses))
    }

    /// The pool's metrics, for the HTTP server.
    pub fn metrics(&self) -> Arc<Metrics> {
        Arc::clone(&self.supervisor.metrics)
    }

    pub fn stopper(&self) -> Stopper {
        Stopper(self.supervisor.events.clone())
    }

    pub fn controller(&self) -> Controller {
        Controller(self.supervisor.events.clone())
    }

    /// Starts the supervisor, which starts the workers.
    pub fn start(self) -> io::Result<RunningPool> {
        let events = self.supervisor.events.clone();
        let supervisor = self.supervisor;
        let supervisor = thread::Builder::new()
            .name("supervisor".into())
            .spawn(move || supervisor.run())?;
        Ok(RunningPool { events, supervisor })
    }
}

/// A running pool.
pub struct RunningPool {
    events: Sender<Event>,
    supervisor: JoinHandle<Report>,
}

impl RunningPool {
    pub fn stopper(&self) -> Stopper {
        Stopper(self.events.clone())
    }

    /// Waits for the pool to end.
    pub fn wait(self) -> Report {
        drop(self.events);
        self.supervisor.join().unwrap_or_else(|payload| {
            panic::resume_unwind(payload);
        })
    }
}
