//! The queue depth poller: every `metrics.queue_depth_interval`, the ready messages and the
//! consumers of the work queue, its retry queues and its dead-letter queue, read by passive
//! declares on a connection of its own, into the gauges of [`Metrics`]. So an operator can alert
//! on a growing dead-letter queue without the management plugin.
//!
//! It never creates a queue, never holds a message, and never slows a worker: a broker that
//! does not answer costs it a failed poll, counted, and a new connection at the next one. AMQP
//! does not say how many messages are delivered and unacked; `warren_workers_busy` shows this
//! process's share of those.

use std::convert::Infallible;
use std::io;
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::Instant;

use crossbeam_channel::{bounded, select, Receiver, Sender};

use crate::amqp::{AmqpError, Session};
use crate::config::Config;
use crate::metrics::Metrics;
use crate::retry::Topology;

/// The running poller. Dropping it stops the thread and closes its connection.
pub struct Poller {
    /// The only sender: dropping it ends the poller's wait.
    stop: Option<Sender<Infallible>>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for Poller {
    fn drop(&mut self) {
        self.stop = None;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Starts polling, unless the interval is zero.
pub fn start(config: &Config, metrics: Arc<Metrics>) -> io::Result<Option<Poller>> {
    if config.metrics.queue_depth_interval.is_zero() {
        return Ok(None);
    }
    let (stop, stopped) = bounded(0);
    let config = config.clone();
    let thread = thread::Builder::new()
        .name("queue-depth".into())
        .spawn(move || poll(&config, &metrics, &stopped))?;
    Ok(Some(Poller {
        stop: Some(stop),
        thread: Some(thread),
    }))
}

fn poll(config: &Config, metrics: &Metrics, stop: &Receiver<Infallible>) {
    let topology = Topology::new(&config.queue, &config.retry);
    let queues = topology.kinds();
    let name = format!("warren queue-depth pid {}", std::process::id());
    let interval = config.metrics.queue_depth_interval;
    let mut session: Option<Session> = None;
    let mut next = Instant::now();
    loop {
        if session.is_none() {
            match Session::open_any(&config.broker, &name) {
                Ok((opened, _)) => session = Some(opened),
                Err(e) => failed(metrics, &e),
            }
        }
        if let Some(open) = &mut session {
            let polled = queues.iter().try_for_each(|(kind, spec)| {
                match open.inspect(&spec.name)? {
                    Some(state) => {
                        metrics.set_queue_depth(&spec.name, kind, state.ready, state.consumers)
                    }
                    // Not declared yet (the workers declare it once they connect), or deleted:
                    // no figure rather than a stale one.
                    None => metrics.forget_queue_depth(&spec.name, kind),
                }
                Ok::<(), AmqpError>(())
            });
            if let Err(e) = polled {
                failed(metrics, &e);
                if let Some(lost) = session.take() {
                    lost.cut();
                }
            }
        }
        // A slow poll delays the next one rather than making them bunch up.
        next = (next + interval).max(Instant::now());
        select! {
            recv(stop) -> _ => break,
            default(next.saturating_duration_since(Instant::now())) => {}
        }
    }
    if let Some(open) = session {
        if let Err(e) = open.close() {
            log::debug!("queue depth: closing the connection: {e}");
        }
    }
}

fn failed(metrics: &Metrics, e: &AmqpError) {
    metrics.queue_depth_failed();
    log::debug!("queue depth: {e}");
}
