//! One worker's life: connect and declare, take and settle one delivery at a time, wind down;
//! between deliveries, the supervisor's orders (pause, resume, probe, reload, retire).
//!
//! A worker owns its two connections (one consumes and acks, one publishes the copies of retried
//! and dead-lettered messages) and its handler. It acks a message on the channel that delivered
//! it, and only after its handler succeeded or a copy of it was confirmed in a retry queue or the
//! dead-letter queue; any other ending leaves the message to be requeued. It never restarts
//! itself and never decides to exit the process: it reports how it ended, as an [`Exit`], and the
//! supervisor decides.

use std::any::Any;
use std::convert::Infallible;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, select_biased, Receiver, Sender, TryRecvError};

use super::breaker::Probe;
use super::{Event, Exit, Order};
use crate::abort::Abort;
use crate::amqp::{AmqpError, Confirmed, Delivery, Header, Next, Publisher, Session, Subscription};
use crate::config::{Config, QueueType};
use crate::handler::{Handler, HandlerFactory, Outcome, Task};
use crate::logging::{self, preview};
use crate::metrics::{Metrics, TaskOutcome};
use crate::retry::{self, Decision, Topology};

/// How long a worker waits for the supervisor to count a failed attempt before it settles the
/// message anyway: the supervisor answers at once unless it is stopping.
const COUNTED_WAIT: Duration = Duration::from_secs(1);
/// How long a worker waits before requeueing a message whose copy the broker refused.
const REFUSED_PAUSE: Duration = Duration::from_secs(1);
/// How long a worker waits for the broker to confirm a retried or dead-lettered copy (time
/// blocked by a broker alarm does not count).
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(30);

/// What a worker thread needs. The receivers fire by their senders being dropped, which the
/// supervisor alone holds.
pub(super) struct Worker {
    pub id: usize,
    /// Which of the broker's nodes to connect to, an index into `broker.urls`.
    pub node: usize,
    pub config: Arc<Config>,
    pub factory: HandlerFactory,
    pub events: Sender<Event>,
    pub stop: Receiver<Infallible>,
    /// The supervisor's orders to this worker alone.
    pub orders: Receiver<Order>,
    /// Start without consuming: the pool is paused.
    pub paused: bool,
    pub abort: Abort,
    pub metrics: Arc<Metrics>,
    /// This worker's slot has consumed before: a topology found missing now was there before
    /// (an operator recreating it), so it is waited for rather than fatal.
    pub reconnect: bool,
}

/// A worker's two connections: one consumes and settles, one publishes copies.
struct Link {
    session: Session,
    publishing: Session,
}

/// How a delivery was taken.
enum Taking<'a> {
    /// From the consumer; this runs after the handler and before the settle.
    Consumed(&'a mut dyn FnMut() -> Result<(), AmqpError>),
    /// By a probe of the circuit breaker.
    Probe,
}

/// How taking one delivery ended, when the connection is still there.
// Settled is the common case; boxing the rare delivery would cost more.
#[allow(clippy::large_enum_variant)]
enum Taken {
    /// Acked, or moved to a retry queue or the dead-letter queue.
    Settled,
    /// The abort fired while the handler ran: the delivery must go back to the queue once the
    /// consumer is cancelled (or the broker would hand it straight back to this consumer).
    Abandoned { id: String, delivery: Delivery },
}

impl Worker {
    pub fn name(&self) -> String {
        format!("worker-{}", self.id)
    }

    /// Connects, consumes and handles messages until stopped or until something fails. Between
    /// tasks it obeys the supervisor's orders: pause, resume, probe, reload, retire.
    pub fn run(&mut self) -> Exit {
        let link = match self.connect() {
            Ok(link) => link,
            Err(exit) => return exit,
        };
        let mut publisher = match link.publishing.publisher() {
            Ok(publisher) => publisher,
            Err(e) => return lost_or_fatal(e),
        };
        let mut subscription = None;
        if !self.paused {
            match self.subscribe(&link.session) {
                Ok(subscribed) => subscription = Some(subscribed),
                Err(e) => return lost_or_fatal(e),
            }
        }
        let _ = self.events.send(Event::Ready { worker: self.id });
        let mut handler = (self.factory)(self.id);
        handler.start();

        let mut abandoned = None;
        // An order read early, while a task ran, to be obeyed next.
        let mut pending = None;
        loop {
            let next = match (pending.take(), &subscription) {
                (Some(order), _) => Next::Command(order),
                (None, Some(subscription)) => subscription.next(&self.stop, &self.orders),
                (None, None) => self.idle(),
            };
            let taken = match next {
                Next::Delivery(delivery) => {
                    let mut returned = Vec::new();
                    // A pause that came while the task ran cancels the consumer before the ack:
                    // its prefetch is still full then, so the broker has no delivery in flight
                    // to it that the cancel would bounce back (which a quorum queue counts as
                    // a delivery of that message).
                    let mut before_settle = || {
                        if let Ok(order) = self.orders.try_recv() {
                            if matches!(order, Order::Pause) {
                                if let Some(paused) = subscription.take() {
                                    returned = paused.cancel()?;
                                    log::debug!("{} paused", self.name());
                                }
                            }
                            pending = Some(order);
                        }
                        Ok(())
                    };
                    let taken = self.take(
                        delivery,
                        handler.as_mut(),
                        &link.session,
                        &mut publisher,
                        Taking::Consumed(&mut before_settle),
                    );
                    match taken {
                        Ok(Taken::Settled) => {
                            self.put_back(returned, &link.session, &mut publisher)
                        }
                        other => other,
                    }
                }
                Next::Stop | Next::Command(Order::Retire) => break,
                Next::Ended(e) => {
                    drop(subscription);
                    return Exit::Lost(link.session.close_after(e));
                }
                Next::Command(Order::Pause) => match subscription.take() {
                    Some(paused) => paused.cancel().and_then(|returned| {
                        log::debug!("{} paused", self.name());
                        self.put_back(returned, &link.session, &mut publisher)
                    }),
                    None => Ok(Taken::Settled),
                },
                Next::Command(Order::Resume) => {
                    if subscription.is_none() {
                        match self.subscribe(&link.session) {
                            Ok(subscribed) => subscription = Some(subscribed),
                            Err(e) => return lost_or_fatal(e),
                        }
                    }
                    Ok(Taken::Settled)
                }
                Next::Command(Order::Probe) => {
                    self.probe(handler.as_mut(), &link.session, &mut publisher)
                }
                Next::Command(Order::Reload(config, factory)) => {
                    self.config = config;
                    self.factory = factory;
                    // The old handler goes first: a pipe program stops before the new one starts.
                    drop(handler);
                    handler = (self.factory)(self.id);
                    handler.start();
                    Ok(Taken::Settled)
                }
            };
            match taken {
                Ok(Taken::Settled) => {}
                Ok(Taken::Abandoned { id, delivery }) => {
                    abandoned = Some((id, delivery));
                    break;
                }
                Err(e) => {
                    // The broker requeues what a lost channel held by itself; the task may run
                    // again, which at-least-once allows.
                    drop(subscription);
                    return Exit::Lost(link.session.close_after(e));
                }
            }
        }
        let requeued = self.cancel(subscription.as_ref(), &link.session, abandoned);
        drop(subscription);
        drop(publisher);
        self.wind_down(link);
        Exit::Stopped { requeued }
    }

    /// Opens both connections, declares the work queue, its retry queues and its dead-letter
    /// queue (or, with `queue.declare = false`, checks that they and the exchanges exist), and
    /// binds the work queue to the exchanges of `queue.bindings`.
    fn connect(&self) -> Result<Link, Exit> {
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
        let mut session = open("")?;
        // Retried and dead-lettered copies go out on a connection of their own, so that a
        // broker alarm that blocks publishing does not also hold up this worker's acks.
        let publishing = open(" publisher")?;
        let topology = Topology::new(&config.queue, &config.retry);
        if config.queue.declare {
            topology
                .all()
                .try_for_each(|queue| session.declare(queue))
                .map_err(lost_or_fatal)?;
        } else {
            let lacking = retry::lacking(topology.needed(), |lookup| session.exists(lookup))
                .map_err(lost_or_fatal)?;
            if let Some(lacking) = lacking {
                let missing = AmqpError::Missing(lacking);
                return Err(if self.reconnect {
                    Exit::Lost(missing)
                } else {
                    Exit::Fatal(missing)
                });
            }
        }
        // With queue.declare = false the bindings' exchanges are only looked up: binding needs
        // write on the queue and read on the exchange, not configure.
        (topology.bindings.iter())
            .try_for_each(|binding| session.bind(binding))
            .map_err(lost_or_fatal)?;
        Ok(Link {
            session,
            publishing,
        })
    }

    /// Starts consuming the work queue.
    fn subscribe<'a>(&self, session: &'a Session) -> Result<Subscription<'a>, AmqpError> {
        let config = &self.config;
        let subscription = session.subscribe(
            &config.queue.name,
            config.workers.prefetch,
            config.queue.consumer_priority,
        )?;
        log::debug!(
            "{} consuming queue {} on {}",
            self.name(),
            config.queue.name,
            session.address()
        );
        Ok(subscription)
    }

    /// Waits, without consuming, for an order or the stop.
    fn idle(&self) -> Next<Order> {
        select_biased! {
            recv(self.stop) -> _ => Next::Stop,
            recv(self.orders) -> order => match order {
                Ok(order) => Next::Command(order),
                Err(_) => Next::Stop,
            },
        }
    }

    /// Returns what a consumer cancelled for a pause had delivered, unprocessed, to the queue
    /// without spending an attempt of it: on a classic queue by a requeue, which the attempt
    /// count ignores; on a quorum queue, where a requeue counts as a delivery (RabbitMQ before
    /// 4.3) and could end in the broker's dead-lettering, by a confirmed copy at the same attempt.
    fn put_back(
        &self,
        returned: Vec<Delivery>,
        session: &Session,
        publisher: &mut Publisher<'_>,
    ) -> Result<Taken, AmqpError> {
        let name = self.name();
        for delivery in returned {
            let id = delivery.message_id().unwrap_or("-").to_string();
            match self.config.queue.kind {
                QueueType::Classic => session.requeue(delivery)?,
                QueueType::Quorum => {
                    let (attempt, _) = retry::attempt(&delivery);
                    let headers = retry::unstarted_headers(attempt);
                    let work = &self.config.queue.name;
                    self.forward(publisher, session, delivery, work, headers)?;
                }
            }
            log::debug!("{name} returned {id} to the queue unprocessed: the pool is paused");
        }
        Ok(Taken::Settled)
    }

    /// Takes one message from the work queue, without consuming, runs it, and reports how it
    /// went (the circuit breaker's probe).
    fn probe(
        &self,
        handler: &mut dyn Handler,
        session: &Session,
        publisher: &mut Publisher<'_>,
    ) -> Result<Taken, AmqpError> {
        match session.take(&self.config.queue.name)? {
            Some(delivery) => self.take(delivery, handler, session, publisher, Taking::Probe),
            None => {
                self.report_probe(Probe::Empty);
                Ok(Taken::Settled)
            }
        }
    }

    fn report_probe(&self, probe: Probe) {
        let _ = self.events.send(Event::Probed {
            worker: self.id,
            probe,
        });
    }

    /// Runs the handler on one delivery and settles it: ack, a retry, or the dead-letter queue.
    /// A failed attempt is reported to the circuit breaker; a probe's outcome is reported once
    /// it is settled. An error means the connection is gone and the message is the broker's
    /// again.
    fn take(
        &self,
        delivery: Delivery,
        handler: &mut dyn Handler,
        session: &Session,
        publisher: &mut Publisher<'_>,
        taking: Taking<'_>,
    ) -> Result<Taken, AmqpError> {
        let probe = matches!(taking, Taking::Probe);
        let config = &self.config;
        let name = self.name();
        let id = delivery.message_id().unwrap_or("-").to_string();
        let (attempt, warning) = retry::attempt(&delivery);
        if let Some(warning) = warning {
            log::warn!("{name} {id}: {warning}");
        }
        // At debug, under their own target (see logging::TASKS).
        log::debug!(
            target: logging::TASKS,
            "{name} received {id} (attempt {attempt}{}{}) {}",
            if delivery.redelivered() {
                ", redelivered"
            } else {
                ""
            },
            if probe { ", a probe" } else { "" },
            preview(delivery.body())
        );
        self.metrics.task_started();
        let started = Instant::now();
        let outcome = {
            let context = delivery.context();
            let task = Task {
                body: delivery.body(),
                message_id: delivery.message_id(),
                redelivered: delivery.redelivered(),
                queue: &config.queue.name,
                worker: self.id,
                attempt,
                context: &context,
            };
            handler.handle(&task, &self.abort)
        };
        let took = started.elapsed();
        let verdict = match &outcome {
            Outcome::Done | Outcome::Reply(_) => Probe::Succeeded,
            Outcome::Retry(status) => {
                if !probe {
                    let (counted, answer) = bounded(1);
                    let sent = self.events.send(Event::Failed {
                        worker: self.id,
                        message: message_key(&delivery),
                        counted,
                    });
                    // Until the breaker has counted it: a trip it causes pauses this worker
                    // before the settle, while the prefetch is full. A pause read after the
                    // ack would cancel a consumer the broker may be sending the next message
                    // to, and a quorum queue counts that bounced delivery as an attempt.
                    if sent.is_ok() {
                        let _ = answer.recv_timeout(COUNTED_WAIT);
                    }
                }
                Probe::Failed(status.clone())
            }
            Outcome::DeadLetter { .. } | Outcome::Aborted => Probe::Inconclusive,
        };
        if let (Taking::Consumed(before_settle), false) =
            (taking, matches!(outcome, Outcome::Aborted))
        {
            before_settle()?;
        }
        let counted;
        let settled = match outcome {
            Outcome::Done => {
                counted = Some(TaskOutcome::Ack);
                session
                    .ack(delivery)
                    .map(|()| {
                        log::debug!(target: logging::TASKS, "{name} done {id} (attempt {attempt}) in {took:.2?}")
                    })
            }
            Outcome::Reply(answer) => match self.reply(publisher, session, delivery, &answer) {
                Ok(true) => {
                    counted = Some(TaskOutcome::Ack);
                    log::debug!(target: logging::TASKS, "{name} done {id} (attempt {attempt}) in {took:.2?}, answered");
                    Ok(())
                }
                Ok(false) => {
                    counted = None;
                    Ok(())
                }
                Err(e) => {
                    counted = None;
                    Err(e)
                }
            },
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
                        self.forward(publisher, session, delivery, &queue, headers)
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
                        self.forward(publisher, session, delivery, dead, headers)
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
                self.forward(publisher, session, delivery, dead, headers)
            }
            Outcome::Aborted => {
                log::warn!("{name} abandoned {id} (attempt {attempt}) after {took:.2?}: warren is stopping and cannot wait for it; requeued");
                self.metrics.task_finished(None, took);
                if probe {
                    self.report_probe(verdict);
                }
                return Ok(Taken::Abandoned { id, delivery });
            }
        };
        // A task whose outcome could not be settled is counted in the duration only.
        self.metrics
            .task_finished(settled.as_ref().ok().and(counted), took);
        match settled {
            Ok(()) => {
                if probe {
                    self.report_probe(verdict);
                }
                // Only now, with the message settled, may the handler take its time; not when
                // warren is stopping, which would start a pipe program only to stop it.
                if matches!(self.stop.try_recv(), Err(TryRecvError::Empty)) {
                    handler.between();
                }
                Ok(Taken::Settled)
            }
            Err(e) => {
                log::warn!("{name} could not settle {id} after {took:.2?}: {e}");
                Err(e)
            }
        }
    }

    /// Stops taking messages, and returns what this worker holds unprocessed to the queue: a
    /// delivery that arrived between the last ack and the cancel, and the `abandoned` one.
    /// Returns the ids of the abandoned messages.
    fn cancel(
        &self,
        subscription: Option<&Subscription<'_>>,
        session: &Session,
        abandoned: Option<(String, Delivery)>,
    ) -> Vec<String> {
        let name = self.name();
        match subscription.map(Subscription::cancel) {
            Some(Ok(stragglers)) => {
                for delivery in stragglers {
                    let id = delivery.message_id().unwrap_or("-").to_string();
                    log::info!("{name} returned {id} to the queue unprocessed");
                    if let Err(e) = session.requeue(delivery) {
                        log::warn!("{name} could not return {id}: {e}");
                    }
                }
            }
            Some(Err(e)) => log::warn!("{name} could not cancel its consumer: {e}"),
            None => {}
        }
        let mut requeued = Vec::new();
        if let Some((id, delivery)) = abandoned {
            if let Err(e) = session.requeue(delivery) {
                // Closing the connection requeues it all the same.
                log::warn!("{name} could not requeue {id}: {e}");
            }
            requeued.push(id);
        }
        requeued
    }

    /// Closes both connections.
    fn wind_down(&self, link: Link) {
        let name = self.name();
        for result in [link.session.close(), link.publishing.close()] {
            if let Err(e) = result {
                log::warn!("{name} could not close a connection cleanly: {e}");
            }
        }
        log::debug!("{name} stopped");
    }

    /// Moves `delivery` to `queue` (a retry queue or the dead-letter queue): the copy is
    /// published and confirmed before the original is acked, so a crash in between can
    /// duplicate the message but never lose it. If the copy is refused, the original goes back
    /// to the work queue after a pause instead.
    fn forward(
        &self,
        publisher: &mut Publisher<'_>,
        session: &Session,
        delivery: Delivery,
        queue: &str,
        mut headers: Vec<(String, Header)>,
    ) -> Result<(), AmqpError> {
        let id = delivery.message_id().unwrap_or("-").to_string();
        headers.extend(retry::origin_headers(&delivery));
        let problem = match publisher.republish_and_wait(
            &delivery,
            queue,
            headers,
            retry::NOT_COPIED,
            CONFIRM_TIMEOUT,
            self.abort.receiver(),
        ) {
            Ok(Confirmed::Stored) => return session.ack(delivery),
            Ok(Confirmed::NotStored(why) | Confirmed::Returned(why)) => why,
            Ok(Confirmed::TimedOut) => format!("no confirm within {CONFIRM_TIMEOUT:?}"),
            Err(e) => {
                let _ = session.requeue(delivery);
                return Err(e);
            }
        };
        self.requeue_refused(
            session,
            delivery,
            &format!("move {id} to queue {queue}: {problem}"),
        )
    }

    /// Publishes a handler's `answer` to the message's `reply_to`, with the message's correlation
    /// id (its message id if it has none), and acks the message once the broker has confirmed
    /// the answer. An answer that no queue takes (the requester is gone) is dropped with a
    /// warning and the message acked all the same: its work is done, and doing it again would
    /// not bring the requester back. An answer the broker refused, or did not confirm, sends the
    /// message back to the queue, to be done and answered again. True once the message is acked.
    fn reply(
        &self,
        publisher: &mut Publisher<'_>,
        session: &Session,
        delivery: Delivery,
        answer: &[u8],
    ) -> Result<bool, AmqpError> {
        let Some(reply_to) = delivery.reply_to().map(str::to_string) else {
            return session.ack(delivery).map(|()| true);
        };
        let id = delivery.message_id().unwrap_or("-").to_string();
        let correlation_id = (delivery.correlation_id())
            .or(delivery.message_id())
            .map(str::to_string);
        let problem = match publisher.reply_and_wait(
            &reply_to,
            correlation_id.as_deref(),
            answer,
            CONFIRM_TIMEOUT,
            self.abort.receiver(),
        ) {
            Ok(Confirmed::Stored) => return session.ack(delivery).map(|()| true),
            Ok(Confirmed::Returned(why)) => {
                log::warn!(
                    "{} dropped the reply to {id}: {why} (nothing waits at reply_to {reply_to:?} any more); the message is done and acked",
                    self.name()
                );
                return session.ack(delivery).map(|()| true);
            }
            Ok(Confirmed::NotStored(why)) => why,
            Ok(Confirmed::TimedOut) => format!("no confirm within {CONFIRM_TIMEOUT:?}"),
            Err(e) => {
                let _ = session.requeue(delivery);
                return Err(e);
            }
        };
        self.requeue_refused(
            session,
            delivery,
            &format!("reply to {id} at {reply_to:?}: {problem}"),
        )
        .map(|()| false)
    }

    /// The broker did not store what settling `delivery` needed (`what` says which copy and
    /// why): requeue it after a pause, so that a broker that keeps refusing is not hammered; a
    /// stop cuts the pause short.
    fn requeue_refused(
        &self,
        session: &Session,
        delivery: Delivery,
        what: &str,
    ) -> Result<(), AmqpError> {
        let pause = REFUSED_PAUSE;
        log::warn!("{} could not {what}; requeued in {pause:.1?}", self.name());
        let _ = self.stop.recv_timeout(pause);
        session.requeue(delivery)
    }
}

/// What tells a message apart for the circuit breaker: its message id, or its body when it has
/// none. Copies of one message (its retries) have the same key.
fn message_key(delivery: &Delivery) -> u64 {
    let mut hasher = DefaultHasher::new();
    match delivery.message_id() {
        Some(id) => id.hash(&mut hasher),
        None => delivery.body().hash(&mut hasher),
    }
    hasher.finish()
}

fn lost_or_fatal(e: AmqpError) -> Exit {
    if e.is_fatal() {
        Exit::Fatal(e)
    } else {
        Exit::Lost(e)
    }
}

/// The text of a panic's payload, for the log.
pub(super) fn panic_message(payload: Box<dyn Any + Send>) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".into())
}
