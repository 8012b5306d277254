//! `warren publish`: the tutorial's `new_task`, with publisher confirms always on.
//!
//! It succeeds only when the broker has confirmed every message it was given. Confirms are
//! collected as they arrive while publishing continues, so a large `--stdin` batch costs one
//! round trip in all, not one per message. A lost connection is not the end: publishing goes on
//! through the next node that answers, and what was unconfirmed is published again (at least
//! once: duplicates are possible, loss is not). This module reads input and counts confirms;
//! the broker calls themselves are in `amqp.rs`.

use std::collections::{BTreeMap, VecDeque};
use std::io::BufRead;
use std::time::{Duration, Instant};

use crate::amqp::{AmqpError, Lookup, PublishEvent, Publisher, Session, Stamp};
use crate::config::Config;
use crate::retry::{self, Needed, Topology};

/// At most this many messages wait for their confirms at once; publishing pauses beyond it, so
/// that a huge input does not pile up in memory if the broker slows down.
const MAX_UNCONFIRMED: usize = 4096;

/// What to publish and how.
pub struct Options {
    pub target: Target,
    pub declare: bool,
    pub confirm_timeout: Duration,
    /// The correlation id and headers of every message.
    pub stamp: Stamp,
    /// Where to write the published count for node_exporter's textfile collector, if anywhere.
    pub metrics_file: Option<std::path::PathBuf>,
}

/// Where messages are published.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// A queue by name, through the default exchange.
    Queue(String),
    /// An exchange, with a routing key.
    Exchange { name: String, routing_key: String },
}

impl Target {
    fn exchange(&self) -> &str {
        match self {
            Target::Queue(_) => "",
            Target::Exchange { name, .. } => name,
        }
    }

    fn routing_key(&self) -> &str {
        match self {
            Target::Queue(queue) => queue,
            Target::Exchange { routing_key, .. } => routing_key,
        }
    }

    /// The target with its names quoted, for an error line.
    fn quoted(&self) -> String {
        match self {
            Target::Queue(queue) => format!("queue {queue:?}"),
            Target::Exchange { name, routing_key } => {
                format!("exchange {name:?} with routing key {routing_key:?}")
            }
        }
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Queue(queue) => write!(f, "queue {queue}"),
            Target::Exchange { name, routing_key } => {
                write!(f, "exchange {name} with routing key {routing_key:?}")
            }
        }
    }
}

/// Why publishing failed, sorted by exit code.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// The broker could not be reached or refused the connection (exit 69).
    #[error(transparent)]
    Unavailable(AmqpError),
    /// Some messages were not stored: nacked, returned as unroutable, unconfirmed in time, or the
    /// connection was lost (exit 75: try again).
    #[error("{0}")]
    NotConfirmed(String),
    /// After a lost connection, the next node refused what only a configuration change can fix,
    /// such as the login (exit 78); the text says how many messages were left unconfirmed.
    #[error("{0}")]
    Misconfigured(String),
    /// The input could not be read.
    #[error("cannot read standard input: {0}")]
    Input(std::io::Error),
}

/// A publish run's result.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Summary {
    pub confirmed: usize,
    pub skipped_empty: usize,
    /// Messages published a second time because a connection was lost before their confirm:
    /// the queue may hold up to this many duplicates.
    pub republished: usize,
}

/// Publishes each of `messages` (already split: one item, one message).
///
/// When the connection is lost, publishing goes on through the next node that answers (the
/// same one, for a single node), and every message not yet confirmed is published again with
/// its message id: a message may be stored twice, never lost.
pub fn publish(
    config: &Config,
    options: &Options,
    mut messages: impl Iterator<Item = std::io::Result<Vec<u8>>>,
) -> Result<Summary, PublishError> {
    let name = format!("warren publish pid {}", std::process::id());
    let (mut session, mut node) =
        Session::open_any(&config.broker, &name).map_err(PublishError::Unavailable)?;
    let mut tracker = Tracker::default();
    let mut summary = Summary::default();
    // Failovers in a row with no confirm in between: a broker that drops every connection
    // must not keep warren publishing the same messages forever.
    let mut fruitless = 0;
    loop {
        let confirmed = tracker.confirmed;
        let lost = match publish_on(
            &mut session,
            config,
            options,
            &mut tracker,
            &mut summary,
            &mut messages,
        ) {
            Ok(()) => break,
            Err(Stop::Failed(e)) => return Err(e),
            // A node that stops answering without closing anything (powered off, cut off)
            // holds the connection until heartbeats give up on it, long after the confirm
            // timeout, and a clean close would wait as long: cut it. With other nodes to go
            // to, that is a lost connection too.
            Err(Stop::Silent(why)) => {
                let address = session.address();
                session.cut();
                if config.broker.urls.len() == 1 {
                    return Err(PublishError::NotConfirmed(why));
                }
                AmqpError::Lost {
                    address,
                    reason: format!("{why}: the node has gone silent"),
                }
            }
            Err(Stop::Lost(e)) => match session.close_after_channel(e) {
                Ok(closed) => {
                    return Err(PublishError::NotConfirmed(format!(
                        "{closed}: the broker closed the channel but not the connection, for an error another node would give too (such as access refused or a message over its size limit); not publishing again"
                    )))
                }
                // The connection's own error says more than a channel that stopped answering.
                Err(lost) => lost,
            },
        };
        fruitless = if tracker.confirmed > confirmed {
            1
        } else {
            fruitless + 1
        };
        let nodes = config.broker.urls.len();
        if fruitless > 2 * nodes {
            return Err(PublishError::NotConfirmed(format!(
                "{lost}; giving up after {fruitless} connections in a row lost with nothing confirmed"
            )));
        }
        let unconfirmed = tracker.unconfirmed();
        log::warn!(
            "{lost}; publishing again through {}, {unconfirmed} unconfirmed messages first",
            if nodes > 1 {
                "another node"
            } else {
                "a new connection"
            }
        );
        (session, node) = Session::open_from(&config.broker, node + 1, &name).map_err(|e| {
            if e.is_fatal() {
                // Users and permissions are the cluster's: every other node would refuse too.
                PublishError::Misconfigured(format!(
                    "{e}; publishing stopped with {unconfirmed} messages not confirmed since warren {lost}"
                ))
            } else {
                PublishError::NotConfirmed(format!(
                    "{lost}; {unconfirmed} messages were not confirmed, and no node answered: {e}"
                ))
            }
        })?;
        log::info!("publishing through {}", session.address());
    }
    // The broker sends a message's return before its ack: all returns are in by now, and each
    // was settled by its ack. One left over was still not stored.
    let unsettled = std::mem::take(&mut tracker.returned);
    tracker.problems.extend(
        unsettled
            .into_iter()
            .map(|(id, reason)| format!("{id} returned as unroutable: {reason}")),
    );
    if !tracker.problems.is_empty() {
        let shown: Vec<_> = tracker.problems.iter().take(5).cloned().collect();
        let more = tracker.problems.len().saturating_sub(shown.len());
        return Err(PublishError::NotConfirmed(format!(
            "{} of {} messages to {} were not stored: {}{}",
            tracker.problems.len(),
            tracker.messages,
            options.target.quoted(),
            shown.join("; "),
            if more > 0 {
                format!("; and {more} more")
            } else {
                String::new()
            }
        )));
    }
    summary.confirmed = tracker.messages;
    summary.republished = tracker.republished;
    if let Err(e) = session.close() {
        log::debug!("closing the connection after publishing: {e}");
    }
    Ok(summary)
}

/// Why publishing on one connection stopped early.
enum Stop {
    /// The connection or channel was lost: go on through another.
    Lost(AmqpError),
    /// The broker confirmed nothing within the confirm timeout, and did not close anything
    /// either; the reason says how many messages wait.
    Silent(String),
    Failed(PublishError),
}

impl From<PublishError> for Stop {
    fn from(e: PublishError) -> Stop {
        Stop::Failed(e)
    }
}

/// Publishes on `session`: first the messages a lost connection left unconfirmed, then the rest
/// of `messages`, and waits for every confirm.
fn publish_on(
    session: &mut Session,
    config: &Config,
    options: &Options,
    tracker: &mut Tracker,
    summary: &mut Summary,
    messages: &mut impl Iterator<Item = std::io::Result<Vec<u8>>>,
) -> Result<(), Stop> {
    if options.declare {
        // Another queue than queue.name gets its own default dead-letter queue, and no
        // bindings; through an exchange, queue.name and its bindings are declared, so that the
        // exchange routes to it.
        let mut queue = config.queue.clone();
        if let Target::Queue(name) = &options.target {
            queue.bindings.clear();
            if *name != queue.name {
                queue.dead_letter = format!("{name}.dead");
                queue.name = name.clone();
            }
        }
        let topology = Topology::new(&queue, &config.retry);
        if queue.declare {
            session.declare(&topology.work).map_err(stop)?;
        } else {
            // What a worker checks, less the retry and dead-letter queues, which publishing
            // never declared.
            let needed = (topology.needed().into_iter())
                .filter(|needed| !matches!(needed, Needed::Queue { kind, .. } if *kind != "work"));
            if let Some(lacking) =
                retry::lacking(needed, |lookup| session.exists(lookup)).map_err(stop)?
            {
                return Err(Stop::Failed(PublishError::Misconfigured(lacking)));
            }
        }
        for binding in &topology.bindings {
            session.bind(binding).map_err(stop)?;
        }
    }
    if let Target::Exchange { name, .. } = &options.target {
        // Publishing to a missing exchange would close the channel at the first message.
        if !session.exists(Lookup::Exchange(name)).map_err(stop)? {
            return Err(Stop::Failed(PublishError::Misconfigured(format!(
                "exchange {name:?} does not exist on the broker; bind queue.name to it in \
                 [[queue.bindings]], or declare it"
            ))));
        }
    }
    let mut publisher = session.publisher().map_err(stop)?;
    while let Some(message) = tracker.resend.pop_front() {
        tracker.send(&mut publisher, options, message)?;
    }
    for message in messages {
        let body = message.map_err(PublishError::Input)?;
        if body.is_empty() {
            summary.skipped_empty += 1;
            continue;
        }
        let id = uuid::Uuid::new_v4().to_string();
        log::debug!("publishing {id} {}", crate::logging::preview(&body));
        tracker.messages += 1;
        let message = Message { id, body, sends: 0 };
        tracker.send(&mut publisher, options, message)?;
    }
    while !tracker.pending.is_empty() {
        tracker.wait(&publisher, options.confirm_timeout)?;
    }
    // Every message is confirmed, and returns come before acks: a connection lost now loses
    // nothing, and must not make warren publish anything again.
    match tracker.drain(&publisher) {
        Err(Stop::Lost(e)) => log::debug!("after the last confirm: {e}"),
        other => other?,
    }
    Ok(())
}
/// Splits `input` into messages, one per line, without the newline. Lines are bytes: they need
/// not be UTF-8.
pub fn lines(input: impl BufRead) -> impl Iterator<Item = std::io::Result<Vec<u8>>> {
    input.split(b'\n')
}

/// A lost connection goes on through another; any other broker error ends the run.
fn stop(e: AmqpError) -> Stop {
    match e {
        AmqpError::Lost { .. } | AmqpError::AckTimeout { .. } => Stop::Lost(e),
        other => Stop::Failed(PublishError::Unavailable(other)),
    }
}

/// A message taken from the input, kept until the broker confirms it.
struct Message {
    id: String,
    body: Vec<u8>,
    /// How often it was published: more than once after a lost connection.
    sends: u32,
}

/// The messages published and not yet confirmed.
#[derive(Default)]
struct Tracker {
    /// Published on the current channel and not yet confirmed, by delivery tag.
    pending: BTreeMap<u64, Message>,
    /// Left unconfirmed by a lost connection, oldest first: published again before the rest.
    resend: VecDeque<Message>,
    /// Messages taken from the input (each counted once, however often it was published).
    messages: usize,
    /// Confirms received.
    confirmed: usize,
    /// Messages confirmed after they were published more than once.
    republished: usize,
    /// Ids of messages the broker returned as unroutable, until their confirm settles them.
    returned: BTreeMap<String, String>,
    problems: Vec<String>,
    /// The broker has blocked the connection (a memory or disk alarm): the confirm timeout
    /// does not run while it lasts.
    blocked: bool,
}

impl Tracker {
    /// Publishes `message`, after waiting while too many are unconfirmed, and takes whatever
    /// confirms have already arrived, without waiting.
    fn send(
        &mut self,
        publisher: &mut Publisher<'_>,
        options: &Options,
        mut message: Message,
    ) -> Result<(), Stop> {
        while self.pending.len() >= MAX_UNCONFIRMED {
            if let Err(e) = self.wait(publisher, options.confirm_timeout) {
                // Not published yet: it goes first on the next connection.
                self.resend.push_front(message);
                return Err(e);
            }
        }
        let target = &options.target;
        match publisher.publish(
            target.exchange(),
            target.routing_key(),
            &message.body,
            &message.id,
            &options.stamp,
        ) {
            Ok(tag) => {
                message.sends += 1;
                self.pending.insert(tag, message);
                self.drain(publisher)
            }
            Err(e) => {
                self.resend.push_front(message);
                Err(stop(e))
            }
        }
    }

    /// After a lost connection: every message not confirmed is to be published again, in the
    /// order it was first published. Returns how many of them were published (and not just
    /// read).
    fn unconfirmed(&mut self) -> usize {
        let pending = std::mem::take(&mut self.pending);
        for message in pending.into_values().rev() {
            self.resend.push_front(message);
        }
        // Their returns are settled by the confirms of their next publication.
        self.returned.clear();
        self.blocked = false;
        self.resend
            .iter()
            .filter(|message| message.sends > 0)
            .count()
    }

    fn apply(&mut self, event: PublishEvent) {
        let (tag, multiple, nacked) = match event {
            PublishEvent::Ack { tag, multiple } => (tag, multiple, false),
            PublishEvent::Nack { tag, multiple } => (tag, multiple, true),
            PublishEvent::Blocked { .. } => {
                self.blocked = true;
                return;
            }
            PublishEvent::Unblocked => {
                self.blocked = false;
                return;
            }
            PublishEvent::Returned { message_id, reason } => {
                let id = message_id.unwrap_or_else(|| "?".into());
                self.returned.insert(id, reason);
                return;
            }
        };
        let settled: Vec<u64> = if multiple {
            self.pending.range(..=tag).map(|(tag, _)| *tag).collect()
        } else {
            vec![tag]
        };
        for tag in settled {
            let Some(message) = self.pending.remove(&tag) else {
                continue;
            };
            if nacked {
                let problem = format!("{} nacked by the broker", message.id);
                self.problems.push(problem);
            } else if let Some(reason) = self.returned.remove(&message.id) {
                // The broker sends a message's return before its ack.
                let problem = format!("{} returned as unroutable: {reason}", message.id);
                self.problems.push(problem);
            } else {
                self.confirmed += 1;
                self.republished += usize::from(message.sends > 1);
            }
        }
    }

    fn drain(&mut self, publisher: &Publisher<'_>) -> Result<(), Stop> {
        while let Some(event) = publisher.next_event(Duration::ZERO).map_err(stop)? {
            self.apply(event);
        }
        Ok(())
    }

    /// Waits for at least one confirm, for up to `timeout`.
    fn wait(&mut self, publisher: &Publisher<'_>, timeout: Duration) -> Result<(), Stop> {
        let mut deadline = Instant::now() + timeout;
        let before = self.pending.len();
        while self.pending.len() == before {
            let left = deadline.saturating_duration_since(Instant::now());
            match publisher.next_event(left).map_err(stop)? {
                Some(event) => {
                    let was_blocked = self.blocked;
                    self.apply(event);
                    if was_blocked && !self.blocked {
                        deadline = Instant::now() + timeout;
                    }
                }
                None if self.blocked => deadline = Instant::now() + timeout,
                None if Instant::now() >= deadline => {
                    return Err(Stop::Silent(format!(
                        "{} messages were not confirmed within {timeout:?}",
                        self.pending.len()
                    )))
                }
                None => {}
            }
        }
        Ok(())
    }
}
