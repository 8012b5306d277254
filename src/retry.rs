//! Bounded retries and dead-lettering: the queues warren declares around the work queue, how a
//! message's attempt is counted, where a failed message goes next, and the headers it carries.
//!
//! Everything here is a pure function of the configuration and the message. The broker calls are
//! in `amqp.rs`; the worker in `pool.rs` acts on the [`Decision`].
//!
//! A failed message is not requeued in place: a copy goes to a retry queue whose fixed TTL is the
//! delay, and which dead-letters back into the work queue when the TTL expires. Per-message TTLs
//! would not do, because the broker only expires messages at the head of a queue. There is one
//! retry queue per distinct delay, so every queue holds messages of one TTL.
//!
//! With `queue.declare = false` the operator makes these queues: [`Topology::needed`] says what
//! must exist, with the properties and arguments of the same [`QueueSpec`]s warren would declare.

use std::time::{Duration, SystemTime};

use crate::amqp::{Arg, BindingSpec, Delivery, Header, Lookup, QueueSpec};
use crate::config::{ArgValue, Queue, QueueType, Retry};
use crate::context;

/// The attempt a copy of a message is on, 1 for the first. warren sets it on every copy it
/// publishes to a retry queue.
pub const ATTEMPT: &str = "x-warren-attempt";
/// Why the previous attempt failed.
pub const LAST_FAILURE: &str = "x-warren-last-failure";
/// On a dead-lettered message: why it was dead-lettered.
pub const REASON: &str = "x-warren-reason";
/// On a dead-lettered message: how its last attempt ended ("exit status 3", "timed out after
/// 10m", "killed by signal 9 (SIGKILL)").
pub const EXIT_STATUS: &str = "x-warren-exit-status";
/// On a dead-lettered message: how many attempts it had.
pub const ATTEMPTS: &str = "x-warren-attempts";
/// On a dead-lettered message: when, in RFC 3339 (UTC).
pub const DEAD_LETTERED_AT: &str = "x-warren-dead-lettered-at";
/// On a dead-lettered message: the work queue it came from.
pub const QUEUE: &str = "x-warren-queue";
/// Set by quorum queues: how many times this copy was delivered and not settled (a requeue, or
/// a consumer lost before its ack).
const DELIVERY_COUNT: &str = "x-delivery-count";

/// Headers the broker set on the original that must not travel with a copy: the copy's
/// `x-warren-attempt` already counts them.
pub const NOT_COPIED: &[&str] = &[DELIVERY_COUNT];

/// Set by the broker on a message it dead-lettered: expired from a retry queue, or over a quorum
/// queue's delivery limit.
pub const DEATH: &str = "x-death";

/// The headers `warren dead-letters requeue` leaves out of the copy it puts back in the work
/// queue, so that the message starts again at attempt 1 with no trace of its earlier failures.
pub const RESET_ON_REQUEUE: &[&str] = &[
    ATTEMPT,
    LAST_FAILURE,
    REASON,
    EXIT_STATUS,
    ATTEMPTS,
    DEAD_LETTERED_AT,
    QUEUE,
    DEATH,
    DELIVERY_COUNT,
];

/// The queues of one work queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topology {
    pub work: QueueSpec,
    /// One per distinct retry delay, shortest first.
    pub retries: Vec<QueueSpec>,
    pub dead: QueueSpec,
    /// The work queue's bindings, one per exchange and routing key, in the file's order.
    pub bindings: Vec<BindingSpec>,
}

impl Topology {
    pub fn new(queue: &Queue, retry: &Retry) -> Topology {
        let quorum = queue.kind == QueueType::Quorum;
        let type_arg = |kind: &str| ("x-queue-type".to_string(), Arg::Str(kind.into()));
        let mut work = QueueSpec {
            name: queue.name.clone(),
            durable: queue.durable,
            arguments: Vec::new(),
        };
        let mut dead = QueueSpec {
            name: queue.dead_letter.clone(),
            durable: queue.durable,
            arguments: Vec::new(),
        };
        if quorum {
            // The broker counts deliveries and dead-letters a copy that was delivered and not
            // settled max_attempts times: a message that crashes warren itself every time.
            work.arguments = vec![
                type_arg("quorum"),
                (
                    "x-delivery-limit".into(),
                    Arg::Int(i64::from(retry.max_attempts) - 1),
                ),
            ];
            work.arguments
                .extend(dead_letter_to(&queue.dead_letter, quorum));
            dead.arguments = vec![type_arg("quorum")];
        }
        // The config refuses any that warren sets above (config::owned_argument).
        work.arguments
            .extend((queue.arguments.iter()).map(|(name, value)| (name.clone(), argument(value))));
        let mut delays: Vec<Duration> = (1..retry.max_attempts)
            .map(|attempt| retry.delay_after(attempt))
            .collect();
        delays.dedup();
        let retries = delays
            .into_iter()
            .map(|delay| {
                let mut arguments = Vec::new();
                if quorum {
                    // Replicated like the work queue: a classic retry queue lives on one node,
                    // and while that node is down its messages wait and its declare fails.
                    arguments.push(type_arg("quorum"));
                }
                arguments.push(("x-message-ttl".into(), Arg::Int(delay.as_millis() as i64)));
                arguments.extend(dead_letter_to(&queue.name, quorum));
                QueueSpec {
                    name: retry_queue(queue, delay),
                    durable: queue.durable,
                    arguments,
                }
            })
            .collect();
        let bindings = queue
            .bindings
            .iter()
            .flat_map(|binding| {
                let arguments: Vec<(String, Arg)> = (binding.arguments.iter())
                    .map(|(key, value)| (key.clone(), argument(value)))
                    .collect();
                binding.keys().into_iter().map(move |key| BindingSpec {
                    exchange: binding.exchange.clone(),
                    kind: binding.kind,
                    durable: binding.durable,
                    passive: binding.is_predeclared() || !queue.declare,
                    queue: queue.name.clone(),
                    routing_key: key.to_string(),
                    arguments: arguments.clone(),
                })
            })
            .collect();
        Topology {
            work,
            retries,
            dead,
            bindings,
        }
    }

    /// Every queue with its kind, as the commands and the metrics name them: "work", "retry"
    /// (each retry queue) and "dead".
    pub fn kinds(&self) -> Vec<(&'static str, &QueueSpec)> {
        std::iter::once(("work", &self.work))
            .chain(self.retries.iter().map(|spec| ("retry", spec)))
            .chain(std::iter::once(("dead", &self.dead)))
            .collect()
    }

    /// Every queue, work queue first.
    pub fn all(&self) -> impl Iterator<Item = &QueueSpec> {
        std::iter::once(&self.work)
            .chain(&self.retries)
            .chain(std::iter::once(&self.dead))
    }

    /// What must exist on the broker for warren to run when it declares nothing
    /// (`queue.declare = false`): every queue, then each exchange of the bindings once.
    pub fn needed(&self) -> Vec<Needed<'_>> {
        let queues = (self.kinds().into_iter()).map(|(kind, spec)| Needed::Queue { kind, spec });
        let mut exchanges: Vec<&BindingSpec> = Vec::new();
        for binding in &self.bindings {
            if !exchanges.iter().any(|b| b.exchange == binding.exchange) {
                exchanges.push(binding);
            }
        }
        queues
            .chain(exchanges.into_iter().map(Needed::Exchange))
            .collect()
    }
}

/// A queue or exchange that must exist when warren declares nothing, with what the operator
/// must give it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Needed<'a> {
    /// `kind` as [`Topology::kinds`] names it: "work", "retry" or "dead".
    Queue {
        kind: &'static str,
        spec: &'a QueueSpec,
    },
    /// The exchange of a binding.
    Exchange(&'a BindingSpec),
}

impl Needed<'_> {
    /// What a passive declare looks up.
    pub fn lookup(&self) -> Lookup<'_> {
        match self {
            Needed::Queue { spec, .. } => Lookup::Queue(&spec.name),
            Needed::Exchange(binding) => Lookup::Exchange(&binding.exchange),
        }
    }

    /// Its properties and arguments, as the operator must make it: `durable, x-queue-type =
    /// "quorum"`, or `topic, durable`.
    pub fn properties(&self) -> String {
        let durable = |durable: bool| if durable { "durable" } else { "not durable" };
        match self {
            Needed::Queue { spec, .. } => std::iter::once(durable(spec.durable).to_string())
                .chain((spec.arguments.iter()).map(|(name, value)| format!("{name} = {value}")))
                .collect::<Vec<_>>()
                .join(", "),
            Needed::Exchange(binding) => {
                format!("{}, {}", binding.kind.name(), durable(binding.durable))
            }
        }
    }
}

/// `queue "jobs.dead" (the dead-letter queue; durable)`.
impl std::fmt::Display for Needed<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let properties = self.properties();
        match self {
            Needed::Queue { kind, spec } => {
                let role = match *kind {
                    "work" => "the work queue",
                    "retry" => "a retry queue",
                    _ => "the dead-letter queue",
                };
                write!(f, "queue {:?} ({role}; {properties})", spec.name)
            }
            Needed::Exchange(binding) => write!(
                f,
                "exchange {:?} (of queue.bindings; {properties})",
                binding.exchange
            ),
        }
    }
}

/// The one line that stops warren when the broker lacks some of `needed` and `queue.declare =
/// false` forbids declaring it, or `None` when it has all of it. `exists` looks each up (a
/// passive declare); everything missing is named at once, so that one round with the operator
/// fixes it.
pub fn lacking<'a, E>(
    needed: impl IntoIterator<Item = Needed<'a>>,
    mut exists: impl FnMut(Lookup<'_>) -> Result<bool, E>,
) -> Result<Option<String>, E> {
    let mut missing = Vec::new();
    for needed in needed {
        if !exists(needed.lookup())? {
            missing.push(needed.to_string());
        }
    }
    Ok((!missing.is_empty()).then(|| {
        format!(
            "queue.declare = false, and the broker lacks: {}",
            missing.join("; ")
        )
    }))
}

/// A configured argument as the broker gets it.
fn argument(value: &ArgValue) -> Arg {
    match value {
        ArgValue::Str(s) => Arg::Str(s.clone()),
        ArgValue::Int(i) => Arg::Int(*i),
        ArgValue::Bool(b) => Arg::Bool(*b),
    }
}

/// The `x-` arguments that dead-letter a queue's messages to the queue `target` through the
/// default exchange; on a quorum queue at least once, which needs the queue to refuse
/// publishes when full rather than drop its oldest messages.
fn dead_letter_to(target: &str, quorum: bool) -> Vec<(String, Arg)> {
    let mut arguments = vec![
        ("x-dead-letter-exchange".into(), Arg::Str(String::new())),
        ("x-dead-letter-routing-key".into(), Arg::Str(target.into())),
    ];
    if quorum {
        arguments.extend([
            (
                "x-dead-letter-strategy".into(),
                Arg::Str("at-least-once".into()),
            ),
            ("x-overflow".into(), Arg::Str("reject-publish".into())),
        ]);
    }
    arguments
}

/// The retry queue that holds messages for `delay`: `<queue>.retry.<delay>`, such as
/// `task_queue.retry.4s` or `task_queue.retry.1500ms`.
pub fn retry_queue(queue: &Queue, delay: Duration) -> String {
    let ms = delay.as_millis();
    if ms % 1000 == 0 {
        format!("{}.retry.{}s", queue.name, ms / 1000)
    } else {
        format!("{}.retry.{ms}ms", queue.name)
    }
}

/// Which attempt `delivery` is, from 1, and a warning when a header could not be read.
///
/// The count is warren's `x-warren-attempt` header (copies made by retries) plus, on quorum
/// queues, the broker's `x-delivery-count` (deliveries of this copy that ended without an
/// outcome, such as a crash of warren). On a classic queue such deliveries leave no trace but
/// the `redelivered` flag, which does not say how many there were.
pub fn attempt(delivery: &Delivery) -> (u32, Option<String>) {
    let mut warning = None;
    let copies = match delivery.header(ATTEMPT) {
        None => 1,
        Some(Header::Int(n)) if n >= 1 => n,
        Some(Header::Str(s)) if s.trim().parse::<i64>().is_ok_and(|n| n >= 1) => {
            s.trim().parse().expect("checked just above")
        }
        Some(other) => {
            warning = Some(format!(
                "header {ATTEMPT} is {other:?}, not a positive integer; counting from attempt 1"
            ));
            1
        }
    };
    let returned = match delivery.header(DELIVERY_COUNT) {
        Some(Header::Int(n)) if n >= 0 => n,
        None => 0,
        Some(other) => {
            warning = Some(format!(
                "header {DELIVERY_COUNT} is {other:?}, not a count; ignoring it"
            ));
            0
        }
    };
    let attempt = copies
        .saturating_add(returned)
        .clamp(1, i64::from(u32::MAX));
    (attempt as u32, warning)
}

/// Where a message goes after a failed attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Into `queue` for `delay`, then back to the work queue as attempt `next`.
    Retry {
        queue: String,
        delay: Duration,
        next: u32,
    },
    /// Into the dead-letter queue, for `reason`.
    DeadLetter { reason: String },
}

/// The decision after `attempt` failed and may be retried.
pub fn after_failure(attempt: u32, queue: &Queue, retry: &Retry) -> Decision {
    if attempt >= retry.max_attempts {
        let reason = match retry.max_attempts {
            1 => "failed its only attempt".to_string(),
            n => format!("failed all {n} attempts"),
        };
        return Decision::DeadLetter { reason };
    }
    let delay = retry.delay_after(attempt);
    Decision::Retry {
        queue: retry_queue(queue, delay),
        delay,
        next: attempt + 1,
    }
}

/// The headers of the copy that goes to a retry queue.
pub fn retry_headers(next: u32, failure: &str) -> Vec<(String, Header)> {
    vec![
        (ATTEMPT.into(), Header::Int(next.into())),
        (LAST_FAILURE.into(), Header::Str(failure.into())),
    ]
}

/// The headers that keep, on every copy warren republishes, where the producer published the
/// message, as [`Delivery::context`] sees it: the route of the first delivery, carried on by the
/// later copies.
pub fn origin_headers(delivery: &Delivery) -> Vec<(String, Header)> {
    let context = delivery.context();
    vec![
        (
            context::EXCHANGE_HEADER.into(),
            Header::Str(context.exchange.into()),
        ),
        (
            context::ROUTING_KEY_HEADER.into(),
            Header::Str(context.routing_key.into()),
        ),
    ]
}

/// The headers of the copy of a message that goes back to the work queue unprocessed (a pause
/// returned it): the same attempt, since this one never ran.
pub fn unstarted_headers(attempt: u32) -> Vec<(String, Header)> {
    vec![(ATTEMPT.into(), Header::Int(attempt.into()))]
}

/// The headers of the copy that goes to the dead-letter queue.
pub fn dead_letter_headers(
    reason: &str,
    status: &str,
    attempts: u32,
    queue: &str,
) -> Vec<(String, Header)> {
    vec![
        (REASON.into(), Header::Str(reason.into())),
        (EXIT_STATUS.into(), Header::Str(status.into())),
        (ATTEMPTS.into(), Header::Int(attempts.into())),
        (
            DEAD_LETTERED_AT.into(),
            Header::Str(humantime::format_rfc3339_seconds(SystemTime::now()).to_string()),
        ),
        (QUEUE.into(), Header::Str(queue.into())),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn retry(max_attempts: u32) -> Retry {
        Retry {
            max_attempts,
            delay: Duration::from_secs(1),
            max_delay: Duration::from_secs(5),
        }
    }

    #[test]
    fn there_is_one_retry_queue_per_delay_each_dead_lettering_back_to_the_work_queue() {
        let topology = Topology::new(&Queue::classic("jobs"), &retry(6));
        let names: Vec<_> = topology.retries.iter().map(|q| q.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "jobs.retry.1s",
                "jobs.retry.2s",
                "jobs.retry.4s",
                "jobs.retry.5s"
            ]
        );
        assert_eq!(
            topology.retries[2].arguments,
            [
                ("x-message-ttl".to_string(), Arg::Int(4000)),
                (
                    "x-dead-letter-exchange".to_string(),
                    Arg::Str(String::new())
                ),
                (
                    "x-dead-letter-routing-key".to_string(),
                    Arg::Str("jobs".into())
                ),
            ]
        );
        assert!(topology.work.arguments.is_empty());
        assert_eq!(topology.dead.name, "jobs.dead");
        assert_eq!(topology.all().count(), 6);
        assert!(Topology::new(&Queue::classic("jobs"), &retry(1))
            .retries
            .is_empty());
    }

    /// The value of `spec`'s argument `name`, if it has one.
    fn argument(spec: &QueueSpec, name: &str) -> Option<Arg> {
        (spec.arguments.iter())
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
    }

    #[test]
    fn a_quorum_queue_counts_deliveries_and_dead_letters_at_least_once() {
        let queue = Queue {
            kind: QueueType::Quorum,
            ..Queue::classic("jobs")
        };
        let topology = Topology::new(&queue, &retry(5));
        let arg = |name: &str| argument(&topology.work, name);
        assert_eq!(arg("x-queue-type"), Some(Arg::Str("quorum".into())));
        assert_eq!(arg("x-delivery-limit"), Some(Arg::Int(4)));
        assert_eq!(
            arg("x-dead-letter-routing-key"),
            Some(Arg::Str("jobs.dead".into()))
        );
        assert_eq!(
            arg("x-dead-letter-strategy"),
            Some(Arg::Str("at-least-once".into()))
        );
        assert_eq!(arg("x-overflow"), Some(Arg::Str("reject-publish".into())));
        // The retry queues are replicated too, so that losing a node loses no retry.
        for retry_queue in &topology.retries {
            let arg = |name: &str| argument(retry_queue, name);
            assert_eq!(arg("x-queue-type"), Some(Arg::Str("quorum".into())));
            assert_eq!(
                arg("x-dead-letter-routing-key"),
                Some(Arg::Str("jobs".into()))
            );
            assert_eq!(
                arg("x-dead-letter-strategy"),
                Some(Arg::Str("at-least-once".into()))
            );
        }
    }

    #[test]
    fn every_argument_warren_sets_on_a_work_queue_is_refused_in_queue_arguments() {
        for kind in [QueueType::Classic, QueueType::Quorum] {
            let queue = Queue {
                kind,
                ..Queue::classic("jobs")
            };
            for (name, _) in &Topology::new(&queue, &retry(5)).work.arguments {
                assert!(
                    crate::config::owned_argument(name, kind).is_some(),
                    "{name} on a {kind:?} work queue"
                );
            }
        }
    }

    #[test]
    fn queue_arguments_go_on_the_work_queue_alone() {
        let mut queue = Queue::classic("jobs");
        queue.arguments = [
            ("x-max-length".to_string(), ArgValue::Int(2)),
            (
                "x-overflow".to_string(),
                ArgValue::Str("reject-publish".into()),
            ),
        ]
        .into();
        let topology = Topology::new(&queue, &retry(3));
        assert_eq!(argument(&topology.work, "x-max-length"), Some(Arg::Int(2)));
        assert_eq!(
            argument(&topology.work, "x-overflow"),
            Some(Arg::Str("reject-publish".into()))
        );
        for spec in topology.all().skip(1) {
            assert_eq!(argument(spec, "x-max-length"), None, "{}", spec.name);
        }
    }

    #[test]
    fn what_is_missing_is_named_with_the_arguments_warren_would_declare() {
        let mut queue = Queue {
            kind: QueueType::Quorum,
            ..Queue::classic("jobs")
        };
        queue.declare = false;
        queue.bindings = vec![crate::config::Binding {
            exchange: "orders".into(),
            kind: crate::config::ExchangeType::Topic,
            durable: true,
            routing_keys: vec!["a.*".into(), "b.*".into()],
            arguments: Default::default(),
        }];
        let topology = Topology::new(&queue, &retry(2));
        assert!(
            topology.bindings.iter().all(|b| b.passive),
            "looked up, not declared"
        );
        let needed = topology.needed();
        let names: Vec<String> = needed.iter().map(|n| n.lookup().to_string()).collect();
        assert_eq!(
            names,
            [
                "queue \"jobs\"",
                "queue \"jobs.retry.1s\"",
                "queue \"jobs.dead\"",
                "exchange \"orders\""
            ]
        );
        // The broker has the work queue only.
        let has = |lookup: Lookup<'_>| Ok::<_, ()>(lookup.to_string() == "queue \"jobs\"");
        assert_eq!(lacking(needed.iter().copied().take(1), has), Ok(None));
        assert_eq!(
            lacking(needed, has).unwrap().unwrap(),
            "queue.declare = false, and the broker lacks: \
             queue \"jobs.retry.1s\" (a retry queue; durable, x-queue-type = \"quorum\", \
             x-message-ttl = 1000, x-dead-letter-exchange = \"\", x-dead-letter-routing-key = \"jobs\", \
             x-dead-letter-strategy = \"at-least-once\", x-overflow = \"reject-publish\"); \
             queue \"jobs.dead\" (the dead-letter queue; durable, x-queue-type = \"quorum\"); \
             exchange \"orders\" (of queue.bindings; topic, durable)"
        );
        let classic = Topology::new(&Queue::classic("jobs"), &retry(2));
        assert_eq!(
            classic.needed()[0].to_string(),
            "queue \"jobs\" (the work queue; durable)"
        );
    }

    #[test]
    fn failures_are_retried_with_growing_delays_until_the_last_attempt() {
        let queue = Queue::classic("jobs");
        let r = retry(3);
        assert_eq!(
            after_failure(1, &queue, &r),
            Decision::Retry {
                queue: "jobs.retry.1s".into(),
                delay: Duration::from_secs(1),
                next: 2
            }
        );
        assert_eq!(
            after_failure(2, &queue, &r),
            Decision::Retry {
                queue: "jobs.retry.2s".into(),
                delay: Duration::from_secs(2),
                next: 3
            }
        );
        assert_eq!(
            after_failure(3, &queue, &r),
            Decision::DeadLetter {
                reason: "failed all 3 attempts".into()
            }
        );
        let odd = Retry {
            delay: Duration::from_millis(1500),
            ..r
        };
        assert_eq!(retry_queue(&queue, odd.delay_after(1)), "jobs.retry.1500ms");
    }
}
