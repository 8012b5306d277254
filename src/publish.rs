//! `warren publish`: the tutorial's `new_task`, with publisher confirms always on.
//!
//! It succeeds only when the broker has confirmed every message it was given. Confirms are
//! collected as they arrive while publishing continues, so a large `--stdin` batch costs one
//! round trip in all, not one per message. This module reads input and counts confirms; the
//! broker calls themselves are in `amqp.rs`.

use std::collections::BTreeSet;
use std::io::BufRead;
use std::time::{Duration, Instant};

use crate::amqp::{AmqpError, PublishEvent, Publisher, Session};
use crate::config::Config;
use crate::retry::Topology;

/// At most this many messages wait for their confirms at once; publishing pauses beyond it, so
/// that a huge input does not pile up in memory if the broker slows down.
const MAX_UNCONFIRMED: usize = 4096;

/// What to publish and how.
pub struct Options {
    pub queue: String,
    pub declare: bool,
    pub confirm_timeout: Duration,
    /// Where to write the published count for node_exporter's textfile collector, if anywhere.
    pub metrics_file: Option<std::path::PathBuf>,
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
    /// The input could not be read.
    #[error("cannot read standard input: {0}")]
    Input(std::io::Error),
}

/// A publish run's result.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Summary {
    pub confirmed: usize,
    pub skipped_empty: usize,
}

/// Publishes each of `messages` (already split: one item, one message).
pub fn publish(
    config: &Config,
    options: &Options,
    messages: impl Iterator<Item = std::io::Result<Vec<u8>>>,
) -> Result<Summary, PublishError> {
    let session = open_any(config)?;
    if options.declare {
        // Another queue than queue.name gets its own default dead-letter queue.
        let queue = if options.queue == config.queue.name {
            config.queue.clone()
        } else {
            crate::config::Queue {
                name: options.queue.clone(),
                dead_letter: format!("{}.dead", options.queue),
                ..config.queue.clone()
            }
        };
        let work = Topology::new(&queue, &config.retry).work;
        session.declare(&work).map_err(unavailable_or_lost)?;
    }
    let mut publisher = session.publisher().map_err(unavailable_or_lost)?;
    let mut tracker = Tracker::default();
    let mut summary = Summary::default();

    for message in messages {
        let body = message.map_err(PublishError::Input)?;
        if body.is_empty() {
            summary.skipped_empty += 1;
            continue;
        }
        while tracker.pending.len() >= MAX_UNCONFIRMED {
            tracker.wait(&publisher, options.confirm_timeout)?;
        }
        let id = uuid::Uuid::new_v4().to_string();
        let tag = publisher
            .publish(&options.queue, &body, &id)
            .map_err(|e| PublishError::NotConfirmed(e.to_string()))?;
        log::debug!("published {id} {}", crate::pool::preview(&body));
        tracker.pending.insert(tag);
        tracker.ids.push(id);
        // Take whatever confirms have already arrived, without waiting.
        tracker.drain(&publisher)?;
    }
    while !tracker.pending.is_empty() {
        tracker.wait(&publisher, options.confirm_timeout)?;
    }
    // The broker sends a message's return before its ack: all returns are in by now.
    tracker.drain(&publisher)?;
    if !tracker.problems.is_empty() {
        let shown: Vec<_> = tracker.problems.iter().take(5).cloned().collect();
        let more = tracker.problems.len().saturating_sub(shown.len());
        return Err(PublishError::NotConfirmed(format!(
            "{} of {} messages to queue {:?} were not stored: {}{}",
            tracker.problems.len(),
            tracker.ids.len(),
            options.queue,
            shown.join("; "),
            if more > 0 {
                format!("; and {more} more")
            } else {
                String::new()
            }
        )));
    }
    summary.confirmed = tracker.ids.len();
    drop(publisher);
    if let Err(e) = session.close() {
        log::debug!("closing the connection after publishing: {e}");
    }
    Ok(summary)
}

/// Splits `input` into messages, one per line, without the newline. Lines are bytes: they need
/// not be UTF-8.
pub fn lines(input: impl BufRead) -> impl Iterator<Item = std::io::Result<Vec<u8>>> {
    input.split(b'\n')
}

/// Connects to the first of the broker's nodes that answers.
fn open_any(config: &Config) -> Result<Session, PublishError> {
    let name = format!("warren publish pid {}", std::process::id());
    Session::open_any(&config.broker, &name)
        .map(|(session, _)| session)
        .map_err(PublishError::Unavailable)
}

fn unavailable_or_lost(e: AmqpError) -> PublishError {
    match e {
        AmqpError::Lost { .. } => PublishError::NotConfirmed(e.to_string()),
        other => PublishError::Unavailable(other),
    }
}

/// The messages published and not yet confirmed.
#[derive(Default)]
struct Tracker {
    pending: BTreeSet<u64>,
    /// Message ids by tag - 1.
    ids: Vec<String>,
    problems: Vec<String>,
    /// The broker has blocked the connection (a memory or disk alarm): the confirm timeout
    /// does not run while it lasts.
    blocked: bool,
}

impl Tracker {
    fn id(&self, tag: u64) -> &str {
        self.ids.get(tag as usize - 1).map_or("?", String::as_str)
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
                self.problems.push(format!(
                    "{} returned as unroutable: {reason}",
                    message_id.as_deref().unwrap_or("?")
                ));
                return;
            }
        };
        let settled: Vec<u64> = if multiple {
            self.pending.range(..=tag).copied().collect()
        } else {
            vec![tag]
        };
        for tag in settled {
            if self.pending.remove(&tag) && nacked {
                let problem = format!("{} nacked by the broker", self.id(tag));
                self.problems.push(problem);
            }
        }
    }

    fn drain(&mut self, publisher: &Publisher<'_>) -> Result<(), PublishError> {
        while let Some(event) = publisher.next_event(Duration::ZERO).map_err(lost)? {
            self.apply(event);
        }
        Ok(())
    }

    /// Waits for at least one confirm, for up to `timeout`.
    fn wait(&mut self, publisher: &Publisher<'_>, timeout: Duration) -> Result<(), PublishError> {
        let mut deadline = Instant::now() + timeout;
        let before = self.pending.len();
        while self.pending.len() == before {
            let left = deadline.saturating_duration_since(Instant::now());
            match publisher.next_event(left).map_err(lost)? {
                Some(event) => {
                    let was_blocked = self.blocked;
                    self.apply(event);
                    if was_blocked && !self.blocked {
                        deadline = Instant::now() + timeout;
                    }
                }
                None if self.blocked => deadline = Instant::now() + timeout,
                None if Instant::now() >= deadline => {
                    return Err(PublishError::NotConfirmed(format!(
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

fn lost(e: AmqpError) -> PublishError {
    PublishError::NotConfirmed(e.to_string())
}
