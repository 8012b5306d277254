//! The worker pool: N worker threads, each with its own consuming connection and channel (and a
//! second connection to publish retried and dead-lettered copies), and the supervisor thread
//! that starts them, restarts them when they fail, and stops them.
//!
//! This file holds what both sides share: the [`Event`]s workers and signal handlers send, how a
//! worker ends ([`Exit`]) and how the pool ends ([`Report`]), and the handles a caller holds
//! ([`Pool`], [`RunningPool`], [`Stopper`]). The supervisor's `match` loop is in
//! `pool/supervisor.rs`; a worker's life is in `pool/worker.rs`. The supervisor owns all pool
//! state, so nothing here is shared or locked.

mod supervisor;
mod worker;

use std::io;
use std::panic;
use std::sync::Arc;
use std::thread::{self, JoinHandle};

use crossbeam_channel::{unbounded, Sender};

use crate::amqp::AmqpError;
use crate::config::Config;
use crate::handler::HandlerFactory;
use crate::metrics::Metrics;
use supervisor::Supervisor;

/// Everything the supervisor reacts to. Workers and the signal handler send these.
#[derive(Debug)]
pub enum Event {
    /// Ctrl+C or SIGTERM: stop gracefully; a second one stops at once.
    Signal,
    /// A worker is connected and consuming.
    Ready { worker: usize },
    /// A worker thread has ended, and how.
    Exited { worker: usize, exit: Exit },
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

/// A pool that has not started yet: take its [`Stopper`] (for a signal handler) first, so that
/// no signal can arrive before something is ready to hear it.
pub struct Pool {
    supervisor: Supervisor,
}

impl Pool {
    pub fn new(config: Arc<Config>, factory: HandlerFactory) -> io::Result<Pool> {
        let (events, inbox) = unbounded();
        Ok(Pool {
            supervisor: Supervisor::new(config, factory, events, inbox)?,
        })
    }

    /// The pool's metrics, for the HTTP server.
    pub fn metrics(&self) -> Arc<Metrics> {
        Arc::clone(&self.supervisor.metrics)
    }

    pub fn stopper(&self) -> Stopper {
        Stopper(self.supervisor.events.clone())
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
