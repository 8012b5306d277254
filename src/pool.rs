//! The worker pool: N worker threads, each with its own consuming connection and channel (and a
//! second connection to publish retried and dead-lettered copies), and the supervisor thread
//! that starts them, restarts them when they fail, and stops them.
//!
//! The supervisor is a `match` loop over a closed [`Event`] enum received on one crossbeam
//! channel; it owns all pool state, so nothing here is shared or locked. Workers never restart
//! themselves and never decide to exit the process: they report how they ended and the
//! supervisor decides. A worker acks a message on the channel that delivered it, and only after
//! its handler succeeded or a copy of it was confirmed in a retry queue or the dead-letter
//! queue; any other ending leaves the message to be requeued.

use std::any::Any;
use std::convert::Infallible;
use std::io;
use std::panic::{self, AssertUnwindSafe};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, unbounded, Receiver, RecvTimeoutError, Sender};

use crate::amqp::{AmqpError, Confirmed, Delivery, Header, Next, Publisher, Session, Subscription};
use crate::config::Config;
use crate::handler::{Abort, AbortTrigger, HandlerFactory, Outcome, Task};
use crate::metrics::{Metrics, TaskOutcome};
use crate::notify::Notifier;
use crate::retry::{self, Decision, Topology};

/// The first restart delay; it doubles per consecutive failure up to [`MAX_BACKOFF`].
const MIN_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// A worker that stayed connected this long has its restart backoff reset.
const HEALTHY_AFTER: Duration = Duration::from_secs(60);
/// After the grace has run out and tasks were told to abort, how long to wait for workers to
/// report before giving up on them. The broker requeues whatever they held when we exit.
const ABORT_WAIT: Duration = Duration::from_secs(5);
/// How long a worker waits before requeueing a message whose copy the broker refused.
const REFUSED_PAUSE: Duration = Duration::from_secs(1);
/// How long a worker waits for the broker to confirm a retried or dead-lettered copy (time
/// blocked by a broker alarm does not count).
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(30);
/// After a second stop signal, how long to wait for handlers to kill their tasks before exiting.
const KILL_WAIT: Duration = Duration::from_secs(1);
/// How many bytes of a body the log shows.
const PREVIEW_BYTES: usize = 64;

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

/// What a worker thread needs. The receivers fire by their senders being dropped, which the
/// supervisor alone holds.
struct Worker {
    id: usize,
    /// Which of the broker's nodes to connect to, an index into `broker.urls`.
    node: usize,
    config: Arc<Config>,
    factory: HandlerFactory,
    events: Sender<Event>,
    stop: Receiver<Infallible>,
    abort: Abort,
    metrics: Arc<Metrics>,
}

impl Worker {
    fn name(&self) -> String {
        format!("worker-{}", self.id)
    }

    /// Connects, consumes and handles messages until stopped or until something fails.
    fn run(&self) -> Exit {
        let config = &self.config;
        let name = self.name();
        let pid = std::process::id();
        let open = |role: &str| {
            Session::open(
                &config.broker,
                self.node,
                &format!("warren {name}{role} pid {pid}"),
            )
            .map_err(|e| {
                if e.is_fatal() {
                    Exit::Fatal(e)
                } else {
                    Exit::ConnectFailed(e)
                }
            })
        };
        let session = match open("") {
            Ok(session) => session,
            Err(exit) => return exit,
        };
        // Retried and dead-lettered copies go out on a connection of their own, so that a
        // broker alarm that blocks publishing does not also hold up this worker's acks.
        let publishing = match open(" publisher") {
            Ok(session) => session,
            Err(exit) => return exit,
        };
        let topology = Topology::new(&config.queue, &config.retry);
        if let Err(e) = topology.all().try_for_each(|queue| session.declare(queue)) {
            return lost_or_fatal(e);
        }
        let mut publisher = match publishing.publisher() {
            Ok(publisher) => publisher,
            Err(e) => return lost_or_fatal(e),
        };
        let subscription = match session.subscribe(&config.queue.name, config.workers.prefetch) {
            Ok(subscription) => subscription,
            Err(e) => return lost_or_fatal(e),
        };
        let _ = self.events.send(Event::Ready { worker: self.id });
        log::debug!(
            "{name} consuming queue {} on {}",
            config.queue.name,
            session.address()
        );
        let mut handler = (self.factory)(self.id);
        handler.start();
        let mut abandoned = None;

        loop {
            let delivery = match subscription.next(&self.stop) {
                Next::Delivery(delivery) => delivery,
                Next::Stop => break,
                Next::Ended(e) => {
                    drop(subscription);
                    return Exit::Lost(session.close_after(e));
                }
            };
            let id = delivery.message_id().unwrap_or("-").to_string();
            let (attempt, warning) = retry::attempt(&delivery);
            if let Some(warning) = warning {
                log::warn!("{name} {id}: {warning}");
            }
            // At debug: at thousands of tasks a second, two lines per task cost about a tenth
            // of the throughput (BENCHMARKS.md) and would trip journald's rate limit, which
            // would drop the warnings too.
            log::debug!(
                "{name} received {id} (attempt {attempt}{}) {}",
                if delivery.redelivered() {
                    ", redelivered"
                } else {
                    ""
                },
                preview(delivery.body())
            );
            self.metrics.task_started();
            let started = Instant::now();
            let task = Task {
                body: delivery.body(),
                message_id: delivery.message_id(),
                redelivered: delivery.redelivered(),
                queue: &config.queue.name,
                worker: self.id,
                attempt,
            };
            let outcome = handler.handle(&task, &self.abort);
            let took = started.elapsed();
            let counted;
            let settled = match outcome {
                Outcome::Done => {
                    counted = Some(TaskOutcome::Ack);
                    subscription
                        .ack(delivery)
                        .map(|()| log::debug!("{name} done {id} (attempt {attempt}) in {took:.2?}"))
                }
                Outcome::Retry(status) => {
                    match retry::after_failure(attempt, &config.queue, &config.retry) {
                        Decision::Retry { queue, delay, next } => {
                            counted = Some(TaskOutcome::Retry);
                            log::warn!(
                                "{name} failed {id} (attempt {attempt} of {}) after {took:.2?}: {status}; retrying in {}",
                                config.retry.max_attempts,
                                humantime::format_duration(delay)
                            );
                            let headers = retry::retry_headers(next, &status);
                            self.forward(&mut publisher, &subscription, delivery, &queue, headers)
                        }
                        Decision::DeadLetter { reason } => {
                            counted = Some(TaskOutcome::DeadLetter);
                            log::warn!(
                                "{name} failed {id} (attempt {attempt} of {}) after {took:.2?}: {status}; {reason}: dead-lettered to {}",
                                config.retry.max_attempts,
                                config.queue.dead_letter
                            );
                            let headers = retry::dead_letter_headers(
                                &reason,
                                &status,
                                attempt,
                                &config.queue.name,
                            );
                            let dead = &config.queue.dead_letter;
                            self.forward(&mut publisher, &subscription, delivery, dead, headers)
                        }
                    }
                }
                Outcome::DeadLetter { status, reason } => {
                    counted = Some(TaskOutcome::DeadLetter);
                    log::warn!(
                        "{name} rejected {id} (attempt {attempt}) after {took:.2?}: {status}{}; dead-lettered to {}",
                        reason.as_deref().map(|r| format!(": {r}")).unwrap_or_default(),
                        config.queue.dead_letter
                    );
                    let reason =
                        reason.unwrap_or_else(|| format!("rejected by the handler ({status})"));
                    let headers =
                        retry::dead_letter_headers(&reason, &status, attempt, &config.queue.name);
                    let dead = &config.queue.dead_letter;
                    self.forward(&mut publisher, &subscription, delivery, dead, headers)
                }
                Outcome::Aborted => {
                    log::warn!("{name} abandoned {id} (attempt {attempt}) after {took:.2?}: warren is stopping and cannot wait for it; requeued");
                    self.metrics.task_finished(None, took);
                    // Requeued after the consumer is cancelled, or the broker would hand it
                    // straight back to this consumer.
                    abandoned = Some((id, delivery));
                    break;
                }
            };
            // A task whose outcome could not be settled is counted in the duration only.
            self.metrics
                .task_finished(settled.as_ref().ok().and(counted), took);
            if let Err(e) = settled {
                // The broker requeues the message of a lost channel by itself; the task may run
                // again, which at-least-once allows.
                drop(subscription);
                let e = session.close_after(e);
                log::warn!("{name} could not settle {id} after {took:.2?}: {e}");
                return Exit::Lost(e);
            }
        }

        // Stop taking messages. A delivery that arrived between the last ack and the cancel goes
        // back to the queue unprocessed.
        match subscription.cancel() {
            Ok(stragglers) => {
                for delivery in stragglers {
                    let id = delivery.message_id().unwrap_or("-").to_string();
                    log::info!("{name} returned {id} to the queue unprocessed");
                    if let Err(e) = subscription.requeue(delivery) {
                        log::warn!("{name} could not return {id}: {e}");
                    }
                }
            }
            Err(e) => log::warn!("{name} could not cancel its consumer: {e}"),
        }
        let mut requeued = Vec::new();
        if let Some((id, delivery)) = abandoned {
            if let Err(e) = subscription.requeue(delivery) {
                // Closing the connection requeues it all the same.
                log::warn!("{name} could not requeue {id}: {e}");
            }
            requeued.push(id);
        }
        drop(subscription);
        drop(publisher);
        for result in [session.close(), publishing.close()] {
            if let Err(e) = result {
                log::warn!("{name} could not close a connection cleanly: {e}");
            }
        }
        log::debug!("{name} stopped");
        Exit::Stopped { requeued }
    }

    /// Moves `delivery` to `queue` (a retry queue or the dead-letter queue): the copy is
    /// published and confirmed before the original is acked, so a crash in between can
    /// duplicate the message but never lose it. If the copy is refused, the original goes back
    /// to the work queue after a pause instead.
    fn forward(
        &self,
        publisher: &mut Publisher<'_>,
        subscription: &Subscription<'_>,
        delivery: Delivery,
        queue: &str,
        headers: Vec<(String, Header)>,
    ) -> Result<(), AmqpError> {
        let id = delivery.message_id().unwrap_or("-").to_string();
        let problem = match publisher.republish_and_wait(
            &delivery,
            queue,
            headers,
            retry::NOT_COPIED,
            CONFIRM_TIMEOUT,
            self.abort.receiver(),
        ) {
            Ok(Confirmed::Stored) => return subscription.ack(delivery),
            Ok(Confirmed::Refused(why)) => why,
            Ok(Confirmed::TimedOut) => format!("no confirm within {CONFIRM_TIMEOUT:?}"),
            Err(e) => {
                let _ = subscription.requeue(delivery);
                return Err(e);
            }
        };
        let pause = REFUSED_PAUSE;
        log::warn!(
            "worker-{} could not move {id} to queue {queue}: {problem}; requeued in {pause:.1?}",
            self.id
        );
        // A pause, so that a broker that keeps refusing is not hammered; a stop cuts it short.
        let _ = self.stop.recv_timeout(pause);
        subscription.requeue(delivery)
    }
}

fn lost_or_fatal(e: AmqpError) -> Exit {
    if e.is_fatal() {
        Exit::Fatal(e)
    } else {
        Exit::Lost(e)
    }
}

/// The first bytes of a body, escaped, for the log. Never the whole body.
pub fn preview(body: &[u8]) -> String {
    let shown = &body[..body.len().min(PREVIEW_BYTES)];
    let more = if body.len() > PREVIEW_BYTES {
        format!("… ({} bytes)", body.len())
    } else {
        String::new()
    };
    format!("\"{}\"{more}", shown.escape_ascii())
}

/// The restart delay after `failures` consecutive failures: exponential, capped, with jitter so
/// that workers (and hosts) that failed together do not retry together.
pub fn backoff(failures: u32) -> Duration {
    let ceiling = MIN_BACKOFF
        .saturating_mul(1 << failures.min(16))
        .min(MAX_BACKOFF);
    ceiling / 2 + ceiling.mul_f64(fastrand::f64() / 2.0)
}

fn panic_message(payload: Box<dyn Any + Send>) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".into())
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
enum Broker {
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

struct Supervisor {
    config: Arc<Config>,
    factory: HandlerFactory,
    events: Sender<Event>,
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
    broker: Broker,
    phase: Phase,
    requeued: Vec<String>,
    fatal: Option<AmqpError>,
    /// A stop signal has arrived; the next one stops at once. A stop for a fatal error does not
    /// count, so that the operator's first Ctrl+C during it still waits for the grace.
    signalled: bool,
    metrics: Arc<Metrics>,
    notifier: Notifier,
}

impl Supervisor {
    fn new(
        config: Arc<Config>,
        factory: HandlerFactory,
        events: Sender<Event>,
        inbox: Receiver<Event>,
    ) -> io::Result<Supervisor> {
        let (stop, stop_signal) = bounded(0);
        let (abort, abort_signal) = Abort::new()?;
        let addresses: Vec<String> = config.broker.urls.iter().map(|u| u.address()).collect();
        let metrics = Arc::new(Metrics::new(&config.queue.name, &addresses));
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
            broker: Broker::Up,
            phase: Phase::Running,
            requeued: Vec::new(),
            fatal: None,
            signalled: false,
            metrics,
            notifier: Notifier::from_env(),
        })
    }

    fn run(mut self) -> Report {
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
                None => {}
            }
            self.fire_timers();
            if Instant::now() >= self.notifier.deadline() {
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
        let worker = Worker {
            id,
            node: self.slots[id - 1].node,
            config: Arc::clone(&self.config),
            factory: Arc::clone(&self.factory),
            events: self.events.clone(),
            stop: self.stop_signal.clone(),
            abort: self.abort_signal.clone(),
            metrics: Arc::clone(&self.metrics),
        };
        let slot = &mut self.slots[id - 1];
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
        if let Broker::Down { rounds, since, .. } = self.broker {
            self.broker = Broker::Up;
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
        slot.ended(Instant::now());
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
            Exit::Lost(e) => self.schedule_restart(worker, &format!("worker-{worker}: {e}")),
            Exit::Panicked(message) => self.schedule_restart(
                worker,
                &format!("worker-{worker} panicked ({message}); its unacked message returns to the queue"),
            ),
            Exit::Stopped { .. } => self.schedule_restart(worker, &format!("worker-{worker} stopped unexpectedly")),
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
            Broker::Up => {
                let delay = backoff(0);
                log::warn!("{e}; retrying in {delay:.1?}");
                self.metrics.set_broker_down(true);
                self.broker = Broker::Down {
                    rounds: 1,
                    since: Instant::now(),
                    next_probe: Some(Instant::now() + delay),
                    probe: None,
                };
            }
            Broker::Down {
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
        self.broker = Broker::Up;
    }

    fn next_deadline(&self) -> Option<Instant> {
        let restarts = self.slots.iter().filter_map(|s| s.restart_at);
        let probe = match self.broker {
            Broker::Down { next_probe, .. } => next_probe,
            Broker::Up => None,
        };
        let phase = match self.phase {
            Phase::Running => None,
            Phase::Stopping { deadline } | Phase::Aborting { deadline } => Some(deadline),
        };
        restarts
            .chain(probe)
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
        if let Broker::Down {
            next_probe: Some(at),
            ..
        } = self.broker
        {
            if now >= at {
                let first_parked = (1..=self.slots.len()).find(|&id| self.slots[id - 1].parked);
                if let Broker::Down {
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

    #[test]
    fn previews_are_short_and_escaped() {
        assert_eq!(preview(b"Hello..."), "\"Hello...\"");
        assert_eq!(preview(b"a\"\n\xff"), "\"a\\\"\\n\\xff\"");
        let long = vec![b'x'; 1000];
        let shown = preview(&long);
        assert!(shown.starts_with(&format!("\"{}\"", "x".repeat(64))));
        assert!(shown.ends_with("… (1000 bytes)"));
    }
}
