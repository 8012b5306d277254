//! The supervisor: one thread, one `match` loop over the closed [`Event`] enum received on one
//! crossbeam channel. It starts the workers, restarts them with backoff when they fail, moves
//! them between the broker's nodes, waits out an unreachable broker with one probe at a time,
//! and runs the stop: no new messages, the grace for tasks in flight, then the abort.
//!
//! It also decides whether workers take messages at all: not while the operator has paused the
//! pool, nor while the circuit breaker (`breaker.rs`) is open. It tells each worker so on the
//! worker's own command channel, sends one worker to probe when the breaker's cool-down is over,
//! and applies a reloaded configuration: the handler from each worker's next message on, and the
//! worker count by starting workers or retiring the last ones.
//!
//! It owns all pool state; workers only report to it. It never talks to the broker itself.

use std::convert::Infallible;
use std::io;
use std::panic::{self, AssertUnwindSafe};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, unbounded, Receiver, RecvTimeoutError, Sender};

use super::breaker::{self, Breaker, Probe, Trip};
use super::worker::{panic_message, Worker};
use super::{Declined, Event, Exit, Order, Reply, Report, Request};
use crate::abort::{Abort, AbortTrigger};
use crate::amqp::AmqpError;
use crate::config::Config;
use crate::handler::HandlerFactory;
use crate::metrics::{BreakerState, Metrics, TaskOutcome};
use crate::notify::Notifier;

/// The first restart delay; it doubles per consecutive failure up to [`MAX_BACKOFF`].
const MIN_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// A worker that stayed connected this long has its restart backoff reset.
const HEALTHY_AFTER: Duration = Duration::from_secs(60);
/// After the grace has run out and tasks were told to abort, how long to wait for workers to
/// report before giving up on them. The broker requeues whatever they held when we exit.
const ABORT_WAIT: Duration = Duration::from_secs(5);
/// After a second stop signal, how long to wait for handlers to kill their tasks before exiting.
const KILL_WAIT: Duration = Duration::from_secs(1);

/// The restart delay after `failures` consecutive failures: exponential, capped, with jitter so
/// that workers (and hosts) that failed together do not retry together.
fn backoff(failures: u32) -> Duration {
    let ceiling = MIN_BACKOFF
        .saturating_mul(1 << failures.min(16))
        .min(MAX_BACKOFF);
    ceiling / 2 + ceiling.mul_f64(fastrand::f64() / 2.0)
}

/// What becomes of the tasks running when the pool is paused, in words.
fn running(busy: i64) -> String {
    match busy {
        0 => "no task was running".to_string(),
        1 => "the 1 task running finishes as usual".to_string(),
        n => format!("the {n} tasks running finish as usual"),
    }
}

/// `duration` rounded up to whole seconds, for a line that says how long until something.
fn whole_seconds(duration: Duration) -> Duration {
    Duration::from_secs(duration.as_secs() + u64::from(duration.subsec_nanos() > 0))
}

/// One worker slot, as the supervisor sees it.
#[derive(Default)]
struct Slot {
    thread: Option<JoinHandle<()>>,
    /// When its current thread reported ready.
    ready_since: Option<Instant>,
    /// Consecutive failures, for its restart backoff.
    failures: u32,
    /// When to restart it, if it is waiting out a backoff.
    restart_at: Option<Instant>,
    /// Waiting for the broker to come back.
    parked: bool,
    /// The broker node its worker connects to, an index into `broker.urls`. Workers start
    /// spread over the nodes, round-robin from a random one; a failed connect moves to the next
    /// node, a lost connection to the least used other node ([`Supervisor::failover_node`]).
    node: usize,
    /// Failed connects since it was last consuming: once it has tried every node, the broker
    /// as a whole is unreachable.
    connect_failures: usize,
    /// Its worker has been started before: the next start is a restart.
    started: bool,
    /// Its worker has been consuming before: the next time is a reconnect.
    consumed: bool,
    /// The command channel of its current thread.
    orders: Option<Sender<Order>>,
    /// It was told to retire: when its thread ends, it is not started again unless the pool has
    /// grown back over it meanwhile.
    retiring: bool,
}

impl Slot {
    /// Notes that the worker's thread ended at `now`. A worker that had been healthy for a while
    /// failed for a new reason, so its backoff starts again from the shortest delay.
    fn ended(&mut self, now: Instant) {
        if self
            .ready_since
            .is_some_and(|t| now.saturating_duration_since(t) >= HEALTHY_AFTER)
        {
            self.failures = 0;
        }
    }

    /// The delay before the next restart, counting this failure.
    fn next_delay(&mut self) -> Duration {
        let delay = backoff(self.failures);
        self.failures += 1;
        delay
    }
}

/// Whether the broker is reachable, as far as the supervisor knows. While it is not, one worker
/// at a time probes it, so that the log gets one line per round and the broker is not hit by
/// every worker of every host at once when it returns.
enum Reachability {
    Up,
    Down {
        rounds: u32,
        since: Instant,
        next_probe: Option<Instant>,
        probe: Option<usize>,
    },
}

enum Phase {
    Running,
    /// The stop signal has fired; tasks in flight have until the deadline.
    Stopping {
        deadline: Instant,
    },
    /// The grace ran out and the abort has fired.
    Aborting {
        deadline: Instant,
    },
}

pub(super) struct Supervisor {
    config: Arc<Config>,
    factory: HandlerFactory,
    pub(super) events: Sender<Event>,
    inbox: Receiver<Event>,
    /// This is the only sender of the stop channel, so dropping it tells every worker to stop
    /// taking messages.
    stop: Option<Sender<Infallible>>,
    stop_signal: Receiver<Infallible>,
    /// The only trigger of the abort, so dropping it tells every handler to abandon its task.
    abort: Option<AbortTrigger>,
    abort_signal: Abort,
    slots: Vec<Slot>,
    /// By node: a connect to it failed, and no worker has consumed there since. A worker that
    /// loses its connection goes to another node, not to one of these if it can help it.
    failing: Vec<bool>,
    broker: Reachability,
    phase: Phase,
    requeued: Vec<String>,
    fatal: Option<AmqpError>,
    /// A stop signal has arrived; the next one stops at once. A stop for a fatal error does not
    /// count, so that the operator's first Ctrl+C during it still waits for the grace.
    signalled: bool,
    pub(super) metrics: Arc<Metrics>,
    notifier: Notifier,
    breaker: Breaker,
    /// The trip that opened the breaker, while it is not closed.
    trip: Option<Trip>,
    /// The handler's limits were fitted to the broker's consumer_timeout at least once.
    fitted: bool,
    /// The operator paused the pool.
    paused: bool,
}

impl Supervisor {
    pub fn new(
        config: Arc<Config>,
        factory: HandlerFactory,
        metrics: Arc<Metrics>,
        events: Sender<Event>,
        inbox: Receiver<Event>,
    ) -> io::Result<Supervisor> {
        let (stop, stop_signal) = bounded(0);
        let config_breaker = config.breaker.clone();
        let (abort, abort_signal) = Abort::new()?;
        metrics.set_workers(config.workers.count);
        // Round-robin from a random node, so that many warren hosts with the same list of
        // nodes do not all put their first worker on the first node.
        let nodes = config.broker.urls.len();
        let first = fastrand::usize(..nodes);
        let slots = (0..config.workers.count)
            .map(|i| Slot {
                node: (first + i) % nodes,
                ..Slot::default()
            })
            .collect();
        Ok(Supervisor {
            config,
            factory,
            events,
            inbox,
            stop: Some(stop),
            stop_signal,
            abort: Some(abort),
            abort_signal,
            slots,
            failing: vec![false; nodes],
            broker: Reachability::Up,
            phase: Phase::Running,
            requeued: Vec::new(),
            fatal: None,
            signalled: false,
            metrics,
            notifier: Notifier::from_env(),
            breaker: Breaker::new(config_breaker),
            trip: None,
            fitted: false,
            paused: false,
        })
    }

    pub fn run(mut self) -> Report {
        for id in 1..=self.slots.len() {
            self.spawn(id);
        }
        loop {
            let event = match self.next_deadline() {
                Some(deadline) => match self.inbox.recv_deadline(deadline) {
                    Ok(event) => Some(event),
                    Err(RecvTimeoutError::Timeout) => None,
                    Err(RecvTimeoutError::Disconnected) => {
                        unreachable!("the supervisor holds a sender")
                    }
                },
                None => Some(
                    self.inbox
                        .recv()
                        .expect("invariant: the supervisor holds a sender"),
                ),
            };
            match event {
                Some(Event::Signal) if self.signalled => {
                    // Exit 130 says the operator cut the stop short; the error that began it
                    // would otherwise never reach the log.
                    if let Some(fatal) = &self.fatal {
                        log::error!("{fatal}");
                    }
                    log::warn!("second stop signal: killing tasks in flight and exiting now; the broker requeues unacked messages");
                    self.kill_tasks();
                    return Report::Interrupted;
                }
                Some(Event::Signal) => {
                    self.signalled = true;
                    log::info!(
                        "stopping: no new messages; tasks in flight have {:?} to finish (press Ctrl+C again to exit now)",
                        self.config.shutdown.grace
                    );
                    if matches!(self.phase, Phase::Running) {
                        self.begin_stop();
                    }
                }
                Some(Event::Ready { worker }) => {
                    self.on_ready(worker);
                    // READY=1 as soon as the last worker is consuming, not at the next tick.
                    self.notifier.tick(&self.metrics);
                }
                Some(Event::Exited { worker, exit }) => self.on_exit(worker, exit),
                Some(Event::Failed {
                    worker,
                    message,
                    counted,
                }) => {
                    self.on_failed(worker, message);
                    let _ = counted.send(());
                }
                Some(Event::Probed { worker, probe }) => self.on_probed(worker, probe),
                Some(Event::Control { request, reply }) => {
                    let answer = self.on_request(request);
                    let _ = reply.send(answer);
                    self.notifier.tick(&self.metrics);
                }
                None => {}
            }
            self.fire_timers();
            if Instant::now() >= self.notifier.deadline() {
                self.breaker
                    .sample(Instant::now(), self.metrics.count(TaskOutcome::Ack));
                self.show_pause();
                self.notifier.tick(&self.metrics);
            }
            if !matches!(self.phase, Phase::Running)
                && self.slots.iter().all(|s| s.thread.is_none())
            {
                return self.report(Vec::new());
            }
            if let Phase::Aborting { deadline } = self.phase {
                if Instant::now() >= deadline {
                    let stuck = (1..=self.slots.len())
                        .filter(|&id| self.slots[id - 1].thread.is_some())
                        .collect();
                    return self.report(stuck);
                }
            }
        }
    }

    /// Fires the abort, so that handlers kill their tasks (a command's whole process group),
    /// and waits briefly for the workers to requeue them and close.
    fn kill_tasks(&mut self) {
        self.abort = None;
        let deadline = Instant::now() + KILL_WAIT;
        while self.slots.iter().any(|s| s.thread.is_some()) {
            match self.inbox.recv_deadline(deadline) {
                Ok(Event::Exited { worker, .. }) => {
                    if let Some(thread) = self.slots[worker - 1].thread.take() {
                        let _ = thread.join();
                    }
                }
                Ok(_) => {}
                Err(_) => return,
            }
        }
    }

    fn report(&mut self, stuck: Vec<usize>) -> Report {
        if let Some(fatal) = self.fatal.take() {
            if !self.requeued.is_empty() {
                log::error!("requeued unfinished messages: {}", self.requeued.join(", "));
            }
            for worker in stuck {
                log::error!("worker-{worker} did not stop; the broker requeues what it held");
            }
            return Report::Fatal(fatal);
        }
        if self.requeued.is_empty() && stuck.is_empty() {
            Report::Clean
        } else {
            Report::Abandoned {
                requeued: std::mem::take(&mut self.requeued),
                stuck,
            }
        }
    }

    fn spawn(&mut self, id: usize) {
        let (orders, received) = unbounded();
        let mut worker = Worker {
            id,
            node: self.slots[id - 1].node,
            config: Arc::clone(&self.config),
            factory: Arc::clone(&self.factory),
            events: self.events.clone(),
            stop: self.stop_signal.clone(),
            orders: received,
            paused: !self.taking(),
            abort: self.abort_signal.clone(),
            metrics: Arc::clone(&self.metrics),
            reconnect: self.slots[id - 1].consumed,
        };
        let slot = &mut self.slots[id - 1];
        slot.orders = Some(orders);
        slot.retiring = false;
        if slot.started {
            self.metrics.worker_restarted();
        }
        slot.started = true;
        slot.restart_at = None;
        slot.parked = false;
        slot.ready_since = None;
        let spawned = thread::Builder::new().name(worker.name()).spawn(move || {
            let exit = match panic::catch_unwind(AssertUnwindSafe(|| worker.run())) {
                Ok(exit) => exit,
                Err(payload) => Exit::Panicked(panic_message(payload)),
            };
            let _ = worker.events.send(Event::Exited { worker: id, exit });
        });
        match spawned {
            Ok(handle) => slot.thread = Some(handle),
            Err(e) => {
                // Out of threads or memory: try again later rather than give up on the worker.
                let delay = slot.next_delay();
                log::error!("cannot start worker-{id}: {e}; retrying in {delay:.1?}");
                slot.restart_at = Some(Instant::now() + delay);
            }
        }
    }

    fn on_ready(&mut self, worker: usize) {
        let slot = &mut self.slots[worker - 1];
        slot.ready_since = Some(Instant::now());
        slot.connect_failures = 0;
        self.failing[slot.node] = false;
        self.metrics.worker_consuming(slot.node, slot.consumed);
        slot.consumed = true;
        log::debug!(
            "worker-{worker} is consuming queue {}",
            self.config.queue.name
        );
        // A probe that found no worker to run it can run now.
        self.probe_if_due(Instant::now());
        if let Reachability::Down { rounds, since, .. } = self.broker {
            self.broker = Reachability::Up;
            self.metrics.set_broker_down(false);
            let parked: Vec<usize> = (1..=self.slots.len())
                .filter(|&id| self.slots[id - 1].parked)
                .collect();
            log::info!(
                "broker at {} is reachable again after {:.1?} ({rounds} rounds); starting the {} waiting workers",
                self.config.broker.describe(),
                since.elapsed(),
                parked.len()
            );
            if matches!(self.phase, Phase::Running) {
                for id in parked {
                    self.spawn(id);
                }
            }
        }
    }

    fn on_exit(&mut self, worker: usize, exit: Exit) {
        let slot = &mut self.slots[worker - 1];
        if let Some(thread) = slot.thread.take() {
            // The thread sent its last event; joining only reaps it.
            let _ = thread.join();
        }
        slot.orders = None;
        slot.ended(Instant::now());
        if self.breaker.state() == (breaker::State::HalfOpen { worker }) {
            self.on_probed(worker, Probe::Lost);
        }
        let slot = &mut self.slots[worker - 1];
        if slot.ready_since.is_some() {
            // Its node has not changed since it was ready: that happens below, for a restart.
            self.metrics.worker_stopped_consuming(slot.node);
        }
        if matches!(exit, Exit::Lost(_)) {
            self.metrics.connection_lost();
        }
        if !matches!(self.phase, Phase::Running) {
            match exit {
                Exit::Stopped { requeued } => self.requeued.extend(requeued),
                // The first fatal error is the one reported; the others are usually the same.
                Exit::Fatal(e) if self.fatal.is_some() => log::debug!("worker-{worker}: {e}"),
                Exit::Fatal(e) => self.fatal = Some(e),
                other => log::info!("worker-{worker} ended while stopping: {other:?}"),
            }
            return;
        }
        if self.slots[worker - 1].retiring && !matches!(exit, Exit::Fatal(_)) {
            return self.retired(worker, &exit);
        }
        match exit {
            Exit::ConnectFailed(e) => {
                let nodes = self.config.broker.urls.len();
                let slot = &mut self.slots[worker - 1];
                self.failing[slot.node] = true;
                // Every node in turn, so that the broker counts as unreachable only once each
                // has failed.
                slot.node = (slot.node + 1) % nodes;
                slot.connect_failures += 1;
                if slot.connect_failures < nodes {
                    // Another node may answer: fail over to it at once.
                    let next = &self.config.broker.urls[slot.node];
                    log::warn!("worker-{worker}: {e}; failing over to {next}");
                    slot.restart_at = Some(Instant::now());
                } else {
                    self.on_unreachable(worker, e);
                }
            }
            Exit::Fatal(e) => {
                log::warn!("worker-{worker} hit an error that retrying cannot fix; stopping");
                self.fatal = Some(e);
                self.begin_stop();
            }
            Exit::Lost(e) => {
                if let AmqpError::AckTimeout { timeout, .. } = e {
                    self.fit_consumer_timeout(worker, timeout);
                }
                self.schedule_restart(worker, &format!("worker-{worker}: {e}"))
            }
            Exit::Panicked(message) => self.schedule_restart(
                worker,
                &format!("worker-{worker} panicked ({message}); its unacked message returns to the queue"),
            ),
            Exit::Stopped { .. } => self.schedule_restart(worker, &format!("worker-{worker} stopped unexpectedly")),
        }
    }

    /// Whether workers take messages: neither the operator nor the circuit breaker holds them.
    fn taking(&self) -> bool {
        !self.paused && self.breaker.state() == breaker::State::Closed
    }

    /// Tells every worker that is not retiring, in order, what it must do next.
    fn tell_all(&self, command: Order) {
        for slot in self.slots.iter().filter(|slot| !slot.retiring) {
            if let Some(orders) = &slot.orders {
                // A worker that has just ended has no receiver left; its restart reads the gate.
                let _ = orders.send(command.clone());
            }
        }
    }

    /// After a change of the pause or the breaker: tells the workers to stop or start taking
    /// messages if that changed from `was_taking`, and shows the new state.
    fn gate(&mut self, was_taking: bool) {
        let taking = self.taking();
        if taking != was_taking && matches!(self.phase, Phase::Running) {
            self.tell_all(if taking { Order::Resume } else { Order::Pause });
        }
        self.show_state();
    }

    /// Writes the breaker's state and the pause to the metrics, with the line that says why
    /// workers take no messages.
    fn show_state(&self) {
        self.metrics.set_breaker(match self.breaker.state() {
            breaker::State::Closed => BreakerState::Closed,
            breaker::State::Open { .. } => BreakerState::Open,
            breaker::State::HalfOpen { .. } => BreakerState::HalfOpen,
        });
        self.metrics.set_paused(self.paused);
        self.show_pause();
    }

    /// Writes why workers take no messages, if they do not, where `/healthz` and the status line
    /// read it.
    fn show_pause(&self) {
        let now = Instant::now();
        let mut parts = Vec::new();
        if self.paused {
            parts.push("by the operator (warren pause)".to_string());
        }
        match self.breaker.state() {
            breaker::State::Closed => {}
            breaker::State::Open { probe_at } => parts.push(format!(
                "breaker open after {}; next probe in {}",
                self.trip.as_ref().map_or_else(String::new, Trip::describe),
                humantime::format_duration(whole_seconds(probe_at.saturating_duration_since(now)))
            )),
            breaker::State::HalfOpen { worker } => parts.push(format!(
                "breaker half-open: worker-{worker} tries one message"
            )),
        }
        self.metrics
            .set_pause((!parts.is_empty()).then(|| parts.join("; ")));
    }

    /// A worker's attempt failed: the breaker counts it, and may open.
    fn on_failed(&mut self, worker: usize, message: u64) {
        let was_taking = self.taking();
        let acked = self.metrics.count(TaskOutcome::Ack);
        let Some(trip) = self.breaker.failed(Instant::now(), message, acked) else {
            return;
        };
        log::warn!(
            "breaker open: {}, the last on worker-{worker}; no worker takes a new message and tasks in flight finish; first probe in {}",
            trip.describe(),
            humantime::format_duration(trip.cooldown)
        );
        self.metrics.breaker_tripped();
        self.trip = Some(trip);
        self.gate(was_taking);
    }

    /// Whether a probe may run now: not while the operator holds the pool, nor while stopping.
    fn may_probe(&self) -> bool {
        !self.paused && matches!(self.phase, Phase::Running)
    }

    /// A worker that can run a probe: connected, and not retiring.
    fn probe_candidate(&self) -> Option<usize> {
        (1..=self.slots.len()).find(|&id| {
            let slot = &self.slots[id - 1];
            slot.thread.is_some() && slot.ready_since.is_some() && !slot.retiring
        })
    }

    /// Sends a worker to probe if the breaker's cool-down is over.
    fn probe_if_due(&mut self, now: Instant) {
        if self.breaker.probe_at().is_none_or(|at| now < at) || !self.may_probe() {
            return;
        }
        let Some(worker) = self.probe_candidate() else {
            return;
        };
        let open = self
            .breaker
            .opened_at()
            .map_or(Duration::ZERO, |at| now.saturating_duration_since(at));
        log::warn!("breaker half-open after {open:.1?} open: worker-{worker} tries one message");
        self.breaker.probing(worker);
        if let Some(orders) = &self.slots[worker - 1].orders {
            let _ = orders.send(Order::Probe);
        }
        self.show_state();
    }

    /// A probe ended: the breaker closes, or opens again.
    fn on_probed(&mut self, worker: usize, probe: Probe) {
        if self.breaker.state() != (breaker::State::HalfOpen { worker }) {
            return;
        }
        let was_taking = self.taking();
        let now = Instant::now();
        let open = self
            .breaker
            .opened_at()
            .map_or(Duration::ZERO, |at| now.saturating_duration_since(at));
        let wait = |at: Instant| humantime::format_duration(whole_seconds(at - now));
        match (self.breaker.probed(now, &probe), &probe) {
            (breaker::State::Closed, _) => {
                log::warn!("breaker closed: worker-{worker}'s probe succeeded after {open:.1?} open; every worker takes messages again");
                self.trip = None;
            }
            (breaker::State::Open { probe_at }, Probe::Failed(status)) => log::warn!(
                "breaker open again: worker-{worker}'s probe failed ({status}); next probe in {}",
                wait(probe_at)
            ),
            (breaker::State::Open { probe_at }, Probe::Lost) => log::warn!(
                "breaker open again: worker-{worker} ended before its probe was settled; next probe in {}",
                wait(probe_at)
            ),
            (breaker::State::Open { probe_at }, Probe::Empty) => log::warn!(
                "breaker open: the queue had no message to probe with; next probe in {}",
                wait(probe_at)
            ),
            (breaker::State::Open { .. }, _) => log::warn!(
                "breaker open: worker-{worker}'s probe message was dead-lettered for its own fault, which says nothing of the dependency; probing with another"
            ),
            (breaker::State::HalfOpen { .. }, _) => {
                unreachable!("a probe's outcome never leaves the breaker half-open")
            }
        }
        self.gate(was_taking);
    }

    /// The operator's pause, resume or reload.
    fn on_request(&mut self, request: Request) -> Reply {
        if !matches!(self.phase, Phase::Running) {
            return Err(Declined::Busy("warren is stopping".into()));
        }
        let busy = self.metrics.busy();
        let was_taking = self.taking();
        let reply = match request {
            Request::Pause if self.paused => Ok(format!("already paused; {}", running(busy))),
            Request::Pause => {
                self.paused = true;
                log::warn!(
                    "paused by the operator: no worker takes a new message; {}",
                    running(busy)
                );
                Ok(format!(
                    "paused: no worker takes a new message; {}",
                    running(busy)
                ))
            }
            Request::Resume if was_taking => Ok("not paused: workers take messages".into()),
            Request::Resume => {
                self.paused = false;
                let breaker = if self.breaker.state() == breaker::State::Closed {
                    ""
                } else {
                    self.breaker.close(Instant::now());
                    self.trip = None;
                    " and the circuit breaker closed"
                };
                log::warn!("resumed by the operator{breaker}: every worker takes messages again");
                Ok(format!("resumed{breaker}: workers take messages again"))
            }
            Request::Reload { config, factory } => self.reload(*config, factory),
        };
        self.gate(was_taking);
        reply
    }

    /// Applies a configuration read again: the handler from each worker's next message on, the
    /// breaker's settings, the shutdown grace, and the worker count.
    fn reload(&mut self, new: Config, factory: HandlerFactory) -> Reply {
        let reloaded = self.config.reloaded(new).map_err(Declined::Config)?;
        let config = Arc::new(reloaded.config);
        self.config = Arc::clone(&config);
        self.factory = Arc::clone(&factory);
        self.breaker.configure(config.breaker.clone());
        if self.breaker.state() == breaker::State::Closed {
            self.trip = None;
        }
        if reloaded.handler_changed {
            self.tell_all(Order::Reload(Arc::clone(&config), factory));
        }
        self.resize(config.workers.count);
        let mut text = format!("reloaded {}", config.path.display());
        if reloaded.applied.is_empty() {
            text.push_str(": nothing to apply");
        } else {
            text.push_str(&format!(": {}", reloaded.applied.join(", ")));
            if reloaded.handler_changed {
                text.push_str(" (busy workers switch handlers after their current task)");
            }
        }
        if !reloaded.restart.is_empty() {
            text.push_str(&format!(
                "; not applied, they need a restart: {}",
                reloaded.restart.join(", ")
            ));
        }
        log::info!("{text}");
        Ok(text)
    }

    /// The broker closed `worker`'s channel because a task outlived `limit`, its real
    /// consumer_timeout. Unless the handler's limits fit inside it already, they shrink to fit
    /// (`Config::fit_consumer_timeout`), from each worker's next task on: the message the broker
    /// requeued comes back once, and its next attempts end by warren's own timeout, so it is
    /// retried and dead-lettered like any task that runs too long, not redelivered for ever.
    fn fit_consumer_timeout(&mut self, worker: usize, limit: Duration) {
        let mut config = (*self.config).clone();
        let configured = config.broker.consumer_timeout;
        let Some((timeout, grace)) = config.fit_consumer_timeout(limit) else {
            // The handler fits the limit, which the running configuration now records. Unless
            // a task started before an earlier fit outlived it, what did was a message
            // prefetched behind running tasks.
            if config.workers.prefetch > 1 && !self.fitted {
                log::warn!(
                    "worker-{worker}: a message prefetched behind running tasks waited longer than the broker's consumer_timeout ({}); lower workers.prefetch in {}",
                    humantime::format_duration(limit),
                    config.path.display()
                );
            }
            self.config = Arc::new(config);
            return;
        };
        self.fitted = true;
        let d = humantime::format_duration;
        log::error!(
            "the broker closed worker-{worker}'s channel because a task outlived its consumer_timeout of {}, not the {} that broker.consumer_timeout in {} says; until warren restarts, tasks get handler.timeout {} and handler.kill_grace {}. Set broker.consumer_timeout and handler.timeout to fit the broker, or raise its consumer_timeout",
            d(limit),
            d(configured),
            config.path.display(),
            d(timeout),
            d(grace),
        );
        let handler = config
            .handler
            .as_ref()
            .expect("invariant: fitted a handler");
        let factory = crate::factory::from_config(handler, &config.queue.name, &self.metrics);
        let config = Arc::new(config);
        self.config = Arc::clone(&config);
        self.factory = Arc::clone(&factory);
        self.tell_all(Order::Reload(config, factory));
    }

    /// Grows the pool to `count` workers, or retires the last ones: they finish their task and
    /// stop as at a stop signal.
    fn resize(&mut self, count: usize) {
        self.metrics.set_workers(count);
        let nodes = self.config.broker.urls.len();
        while self.slots.len() < count {
            let mut load = vec![0usize; nodes];
            for slot in &self.slots {
                load[slot.node] += 1;
            }
            let node = (0..nodes)
                .min_by_key(|&node| load[node])
                .expect("invariant: a config names at least one node");
            self.slots.push(Slot {
                node,
                ..Slot::default()
            });
            self.spawn(self.slots.len());
        }
        for id in count + 1..=self.slots.len() {
            let slot = &mut self.slots[id - 1];
            slot.restart_at = None;
            slot.parked = false;
            if slot.thread.is_some() && !slot.retiring {
                slot.retiring = true;
                if let Some(orders) = &slot.orders {
                    let _ = orders.send(Order::Retire);
                }
            }
        }
        self.forget_retired();
    }

    /// A retired worker has ended: gone for good, unless the pool grew back over it meanwhile.
    fn retired(&mut self, worker: usize, exit: &Exit) {
        if worker <= self.config.workers.count {
            self.spawn(worker);
        } else {
            log::info!(
                "worker-{worker} retired{}: the pool has {} workers",
                match exit {
                    Exit::Stopped { .. } => String::new(),
                    other => format!(" ({other:?})"),
                },
                self.config.workers.count
            );
            self.forget_retired();
        }
    }

    /// Drops the slots past the worker count whose threads have ended.
    fn forget_retired(&mut self) {
        while self.slots.len() > self.config.workers.count
            && self.slots.last().is_some_and(|slot| slot.thread.is_none())
        {
            self.slots.pop();
        }
    }

    fn schedule_restart(&mut self, worker: usize, why: &str) {
        let node = self.failover_node(worker);
        let slot = &mut self.slots[worker - 1];
        slot.node = node;
        let delay = slot.next_delay();
        slot.restart_at = Some(Instant::now() + delay);
        log::warn!("{why}; restarting it in {delay:.1?}");
    }

    /// Where `worker` goes after its connection ended. The node may be what failed, so another
    /// one if there are several: the one with the fewest of this process's workers, so that a
    /// rolling restart of the nodes does not end with every worker on the node restarted first,
    /// and one that no connect has just failed on if there is such a node. Ties go to the node
    /// after its own, in the order of `broker.urls`.
    fn failover_node(&self, worker: usize) -> usize {
        let nodes = self.config.broker.urls.len();
        let current = self.slots[worker - 1].node;
        let mut load = vec![0usize; nodes];
        for (id, slot) in (1..).zip(&self.slots) {
            if id != worker && (slot.thread.is_some() || slot.restart_at.is_some()) {
                load[slot.node] += 1;
            }
        }
        (1..nodes.max(2))
            .map(|step| (current + step) % nodes)
            .min_by_key(|&node| (self.failing[node], load[node]))
            .expect("invariant: there is at least one step")
    }

    fn on_unreachable(&mut self, worker: usize, e: AmqpError) {
        self.slots[worker - 1].parked = true;
        match &mut self.broker {
            Reachability::Up => {
                let delay = backoff(0);
                log::warn!("{e}; retrying in {delay:.1?}");
                self.metrics.set_broker_down(true);
                self.broker = Reachability::Down {
                    rounds: 1,
                    since: Instant::now(),
                    next_probe: Some(Instant::now() + delay),
                    probe: None,
                };
            }
            Reachability::Down {
                rounds,
                next_probe,
                probe,
                ..
            } => {
                if *probe == Some(worker) {
                    let delay = backoff(*rounds);
                    *rounds += 1;
                    *probe = None;
                    *next_probe = Some(Instant::now() + delay);
                    log::warn!("{e} (round {rounds}); retrying in {delay:.1?}");
                } else {
                    log::debug!("worker-{worker} waits for the broker: {e}");
                }
            }
        }
    }

    fn begin_stop(&mut self) {
        self.stop = None;
        self.metrics.set_stopping();
        self.notifier.stopping(&self.metrics);
        self.phase = Phase::Stopping {
            deadline: Instant::now() + self.config.shutdown.grace,
        };
        for slot in &mut self.slots {
            slot.restart_at = None;
            slot.parked = false;
        }
        self.broker = Reachability::Up;
    }

    fn next_deadline(&self) -> Option<Instant> {
        let restarts = self.slots.iter().filter_map(|s| s.restart_at);
        let probe = match self.broker {
            Reachability::Down { next_probe, .. } => next_probe,
            Reachability::Up => None,
        };
        let phase = match self.phase {
            Phase::Running => None,
            Phase::Stopping { deadline } | Phase::Aborting { deadline } => Some(deadline),
        };
        // Only when a worker can run it: otherwise the next Ready event does.
        let breaker = self
            .breaker
            .probe_at()
            .filter(|_| self.probe_candidate().is_some() && self.may_probe());
        restarts
            .chain(probe)
            .chain(breaker)
            .chain(phase)
            .chain(std::iter::once(self.notifier.deadline()))
            .min()
    }

    fn fire_timers(&mut self) {
        let now = Instant::now();
        match self.phase {
            Phase::Stopping { deadline } if now >= deadline => {
                let busy = self.slots.iter().filter(|s| s.thread.is_some()).count();
                log::warn!(
                    "the shutdown grace of {:?} ran out with {busy} workers busy; abandoning their tasks",
                    self.config.shutdown.grace
                );
                self.abort = None;
                self.phase = Phase::Aborting {
                    deadline: now + ABORT_WAIT,
                };
                return;
            }
            Phase::Running => {}
            _ => return,
        }
        for id in 1..=self.slots.len() {
            if self.slots[id - 1].restart_at.is_some_and(|t| now >= t) {
                self.spawn(id);
            }
        }
        self.probe_if_due(now);
        if let Reachability::Down {
            next_probe: Some(at),
            ..
        } = self.broker
        {
            if now >= at {
                let first_parked = (1..=self.slots.len()).find(|&id| self.slots[id - 1].parked);
                if let Reachability::Down {
                    next_probe, probe, ..
                } = &mut self.broker
                {
                    *next_probe = None;
                    *probe = first_parked;
                }
                if let Some(id) = first_parked {
                    self.spawn(id);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_from_100ms_to_30s_with_jitter() {
        for _ in 0..100 {
            let first = backoff(0);
            assert!(first >= Duration::from_millis(50) && first <= Duration::from_millis(100));
            let third = backoff(2);
            assert!(third >= Duration::from_millis(200) && third <= Duration::from_millis(400));
            let late = backoff(40);
            assert!(late >= Duration::from_secs(15) && late <= Duration::from_secs(30));
        }
    }

    #[test]
    fn restart_backoff_grows_with_failures_and_resets_after_a_healthy_minute() {
        let now = Instant::now();
        let mut slot = Slot::default();
        let delays: Vec<Duration> = (0..4).map(|_| slot.next_delay()).collect();
        assert!(delays[3] >= Duration::from_millis(400), "{delays:?}");

        slot.ready_since = Some(now - Duration::from_secs(10));
        slot.ended(now);
        assert!(
            slot.next_delay() >= Duration::from_millis(800),
            "a short run keeps the backoff"
        );

        slot.ready_since = Some(now - HEALTHY_AFTER);
        slot.ended(now);
        assert!(
            slot.next_delay() <= MIN_BACKOFF,
            "a healthy minute resets it"
        );
    }
}
