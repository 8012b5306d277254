//! What warren counts: the Prometheus metrics, and the live figures that `/healthz` and
//! systemd's `STATUS=` line are made from.
//!
//! One [`Metrics`] is shared (behind an `Arc`) by the supervisor, the workers, the queue depth
//! poller and the HTTP server. Its counters and gauges are atomics, so updating them takes no
//! lock and never waits for a scrape; the one lock guards the line that says why workers take no
//! messages, which only the supervisor writes, at most once a second. This is the one piece of
//! state that threads share, and it only ever counts and shows. It does not decide anything: the
//! supervisor does.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

type Labels = Vec<(&'static str, String)>;

/// How a task ended, as the `outcome` label says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaskOutcome {
    Ack,
    Retry,
    DeadLetter,
}

impl TaskOutcome {
    fn label(self) -> &'static str {
        match self {
            TaskOutcome::Ack => "ack",
            TaskOutcome::Retry => "retry",
            TaskOutcome::DeadLetter => "dead_letter",
        }
    }
}

/// Why a `pipe` program was recycled: the `handler` key whose limit it reached, which is also the
/// `reason` label of `warren_pipe_recycles_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecycleReason {
    MaxTasks = 0,
    MaxMemory = 1,
    MaxAge = 2,
}

impl RecycleReason {
    const ALL: [RecycleReason; 3] = [
        RecycleReason::MaxTasks,
        RecycleReason::MaxMemory,
        RecycleReason::MaxAge,
    ];

    /// The key's name in `[handler]`.
    pub fn key(self) -> &'static str {
        match self {
            RecycleReason::MaxTasks => "max_tasks",
            RecycleReason::MaxMemory => "max_memory",
            RecycleReason::MaxAge => "max_age",
        }
    }
}

/// The circuit breaker's state, as `warren_breaker_state` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    Closed = 0,
    HalfOpen = 1,
    Open = 2,
}

/// `warren_published_messages_total` for `queue`, alone, in Prometheus' text format: what
/// `warren publish --metrics-file` writes. A short-lived publisher has no endpoint to scrape,
/// so its count goes through a file that node_exporter's textfile collector reads.
pub fn published_textfile(queue: &str, n: u64) -> String {
    let mut registry = Registry::with_prefix("warren");
    let published = Family::<Labels, Counter>::default();
    registry.register(
        "published_messages",
        "Messages published and confirmed by warren publish",
        published.clone(),
    );
    published
        .get_or_create(&vec![("queue", queue.to_string())])
        .inc_by(n);
    let mut text = String::new();
    if encode(&mut text, &registry).is_err() {
        let _ = writeln!(text, "# encoding failed");
    }
    text
}

/// The metrics of one warren process, for one work queue. The label sets never change, so each
/// series is looked up once, here, and a task costs a few atomic operations.
pub struct Metrics {
    registry: Registry,
    acked: Counter,
    retried: Counter,
    dead_lettered: Counter,
    duration: Histogram,
    busy: Gauge,
    consuming: Gauge,
    /// Workers consuming, per node of `broker.urls` (by index).
    consuming_on: Vec<Gauge>,
    restarts: Counter,
    losses: Counter,
    reconnects: Counter,
    /// How many workers the pool runs.
    workers: Gauge,
    breaker: Gauge,
    trips: Counter,
    paused: Gauge,
    /// Ready messages and consumers of each queue, by the queue's name; set by the depth poller.
    ready: Family<Labels, Gauge>,
    consumers: Family<Labels, Gauge>,
    depth_errors: Counter,
    /// Pipe programs recycled, in the order of [`RecycleReason::ALL`].
    recycles: [Counter; 3],
    queue: String,
    /// Why workers take no messages, while they do not.
    pause: Mutex<Option<String>>,
    /// The broker could not be reached on the last try, and workers are waiting for it.
    broker_down: AtomicBool,
    stopping: AtomicBool,
}

impl Metrics {
    /// `nodes` are the `host:port` of the nodes in `broker.urls`, in order.
    pub fn new(queue: &str, nodes: &[String]) -> Metrics {
        let mut registry = Registry::with_prefix("warren");
        let tasks = Family::<Labels, Counter>::default();
        registry.register(
            "tasks",
            "Tasks finished, by outcome: ack, retry (to a retry queue) or dead_letter",
            tasks.clone(),
        );
        let duration = Family::<Labels, Histogram>::new_with_constructor(|| {
            // 1 ms to about 9 hours.
            Histogram::new(exponential_buckets(0.001, 4.0, 13))
        });
        registry.register(
            "handler_duration_seconds",
            "How long the handler ran, per task",
            duration.clone(),
        );
        let busy = Family::<Labels, Gauge>::default();
        registry.register("workers_busy", "Workers running a task now", busy.clone());
        let consuming = Family::<Labels, Gauge>::default();
        registry.register(
            "workers_consuming",
            "Workers connected and consuming now",
            consuming.clone(),
        );
        let by_node = Family::<Labels, Gauge>::default();
        registry.register(
            "node_workers_consuming",
            "Workers connected and consuming now, by the broker node they are connected to",
            by_node.clone(),
        );
        let restarts = Family::<Labels, Counter>::default();
        registry.register(
            "worker_restarts",
            "Worker threads started again after they ended while warren was running",
            restarts.clone(),
        );
        let losses = Family::<Labels, Counter>::default();
        registry.register(
            "connection_losses",
            "Connections or channels lost after they were established",
            losses.clone(),
        );
        let reconnects = Family::<Labels, Counter>::default();
        registry.register(
            "reconnects",
            "Workers consuming again after a lost connection or an unreachable broker",
            reconnects.clone(),
        );
        let workers = Family::<Labels, Gauge>::default();
        registry.register(
            "workers",
            "Workers the pool runs (workers.count, or --workers)",
            workers.clone(),
        );
        let breaker = Family::<Labels, Gauge>::default();
        registry.register(
            "breaker_state",
            "The circuit breaker: 0 closed (taking messages), 1 half-open (one probe), 2 open (taking none)",
            breaker.clone(),
        );
        let trips = Family::<Labels, Counter>::default();
        registry.register(
            "breaker_trips",
            "Times the circuit breaker opened because the handler's attempts kept failing",
            trips.clone(),
        );
        let paused = Family::<Labels, Gauge>::default();
        registry.register(
            "paused",
            "1 while the operator has paused the pool (warren pause), else 0",
            paused.clone(),
        );
        let ready = Family::<Labels, Gauge>::default();
        registry.register(
            "queue_messages_ready",
            "Messages ready in the work queue, its retry queues and its dead-letter queue, as the broker last said (metrics.queue_depth_interval)",
            ready.clone(),
        );
        let consumers = Family::<Labels, Gauge>::default();
        registry.register(
            "queue_consumers",
            "Consumers of the work queue, its retry queues and its dead-letter queue, over every host, as the broker last said",
            consumers.clone(),
        );
        let depth_errors = Family::<Labels, Counter>::default();
        registry.register(
            "queue_depth_errors",
            "Failed polls of the queues' depth (the broker did not answer)",
            depth_errors.clone(),
        );
        let recycles = Family::<Labels, Counter>::default();
        registry.register(
            "pipe_recycles",
            "Pipe programs replaced by a fresh one between two messages, by the handler key whose limit they reached: max_tasks, max_memory or max_age",
            recycles.clone(),
        );
        let labels: Labels = vec![("queue", queue.to_string())];
        let outcome = |outcome: TaskOutcome| {
            let mut labels = labels.clone();
            labels.push(("outcome", outcome.label().to_string()));
            tasks.get_or_create(&labels).clone()
        };
        let metrics = Metrics {
            acked: outcome(TaskOutcome::Ack),
            retried: outcome(TaskOutcome::Retry),
            dead_lettered: outcome(TaskOutcome::DeadLetter),
            duration: duration.get_or_create(&labels).clone(),
            busy: busy.get_or_create(&labels).clone(),
            consuming: consuming.get_or_create(&labels).clone(),
            consuming_on: (nodes.iter())
                .map(|node| {
                    let mut labels = labels.clone();
                    labels.push(("node", node.clone()));
                    by_node.get_or_create(&labels).clone()
                })
                .collect(),
            restarts: restarts.get_or_create(&labels).clone(),
            losses: losses.get_or_create(&labels).clone(),
            reconnects: reconnects.get_or_create(&labels).clone(),
            workers: workers.get_or_create(&labels).clone(),
            breaker: breaker.get_or_create(&labels).clone(),
            trips: trips.get_or_create(&labels).clone(),
            paused: paused.get_or_create(&labels).clone(),
            ready,
            consumers,
            depth_errors: depth_errors.get_or_create(&labels).clone(),
            recycles: RecycleReason::ALL.map(|reason| {
                let mut labels = labels.clone();
                labels.push(("reason", reason.key().to_string()));
                recycles.get_or_create(&labels).clone()
            }),
            queue: queue.to_string(),
            pause: Mutex::new(None),
            registry,
            broker_down: AtomicBool::new(false),
            stopping: AtomicBool::new(false),
        };
        metrics
    }

    /// A worker started a task.
    pub fn task_started(&self) {
        self.busy.inc();
    }

    /// A worker finished a task: how, and how long the handler ran.
    pub fn task_finished(&self, outcome: Option<TaskOutcome>, took: Duration) {
        self.busy.dec();
        self.duration.observe(took.as_secs_f64());
        if let Some(outcome) = outcome {
            self.counter(outcome).inc();
        }
    }

    /// A worker is consuming through node `node` of `broker.urls`; `reconnect` if it consumed
    /// before.
    pub fn worker_consuming(&self, node: usize, reconnect: bool) {
        self.consuming.inc();
        self.consuming_on[node].inc();
        if reconnect {
            self.reconnects.inc();
        }
    }

    /// A worker that consumed through node `node` stopped.
    pub fn worker_stopped_consuming(&self, node: usize) {
        self.consuming.dec();
        self.consuming_on[node].dec();
    }

    pub fn worker_restarted(&self) {
        self.restarts.inc();
    }

    pub fn connection_lost(&self) {
        self.losses.inc();
    }

    /// A worker's pipe program was replaced because it reached a `handler` limit.
    pub fn pipe_recycled(&self, reason: RecycleReason) {
        self.recycles[reason as usize].inc();
    }

    fn counter(&self, outcome: TaskOutcome) -> &Counter {
        match outcome {
            TaskOutcome::Ack => &self.acked,
            TaskOutcome::Retry => &self.retried,
            TaskOutcome::DeadLetter => &self.dead_lettered,
        }
    }

    pub fn set_workers(&self, n: usize) {
        self.workers.set(n as i64);
    }

    pub fn set_broker_down(&self, down: bool) {
        self.broker_down.store(down, Ordering::Relaxed);
    }

    pub fn set_stopping(&self) {
        self.stopping.store(true, Ordering::Relaxed);
    }

    /// Tasks finished with `outcome` so far.
    pub fn count(&self, outcome: TaskOutcome) -> u64 {
        self.counter(outcome).get()
    }

    /// Workers running a task now.
    pub fn busy(&self) -> i64 {
        self.busy.get().max(0)
    }

    pub fn set_breaker(&self, state: BreakerState) {
        self.breaker.set(state as i64);
    }

    pub fn breaker_tripped(&self) {
        self.trips.inc();
    }

    pub fn set_paused(&self, paused: bool) {
        self.paused.set(i64::from(paused));
    }

    /// Why workers take no messages (`None` while they do), for `/healthz` and the status line.
    pub fn set_pause(&self, why: Option<String>) {
        *self.pause.lock().unwrap_or_else(|e| e.into_inner()) = why;
    }

    fn pause(&self) -> Option<String> {
        self.pause.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// What the broker said of one queue around the work queue: `name`, of `kind` ("work",
    /// "retry" or "dead").
    pub fn set_queue_depth(&self, name: &str, kind: &str, ready: u32, consumers: u32) {
        let labels = self.depth_labels(name, kind);
        self.ready.get_or_create(&labels).set(ready.into());
        self.consumers.get_or_create(&labels).set(consumers.into());
    }

    /// A queue that does not exist: its series go, rather than stay at a stale figure.
    pub fn forget_queue_depth(&self, name: &str, kind: &str) {
        let labels = self.depth_labels(name, kind);
        self.ready.remove(&labels);
        self.consumers.remove(&labels);
    }

    fn depth_labels(&self, name: &str, kind: &str) -> Labels {
        vec![
            ("queue", self.queue.clone()),
            ("kind", kind.to_string()),
            ("name", name.to_string()),
        ]
    }

    pub fn queue_depth_failed(&self) {
        self.depth_errors.inc();
    }

    /// Workers consuming now, and how many there are.
    pub fn consuming(&self) -> (usize, usize) {
        let consuming = self.consuming.get().max(0) as usize;
        (consuming, self.workers.get().max(0) as usize)
    }

    /// `Ok` when every worker is connected, with what holds them back if anything does (a pause,
    /// the circuit breaker: the process is healthy even if its dependency is not); otherwise why
    /// not, in a few words.
    pub fn health(&self) -> Result<Option<String>, String> {
        let (consuming, workers) = self.consuming();
        if self.stopping.load(Ordering::Relaxed) {
            Err("stopping".into())
        } else if self.broker_down.load(Ordering::Relaxed) {
            Err(format!(
                "the broker is unreachable; {consuming} of {workers} workers consuming"
            ))
        } else if consuming < workers {
            Err(format!("{consuming} of {workers} workers consuming"))
        } else {
            Ok(self.pause())
        }
    }

    /// One line for systemd's `STATUS=`: what the workers do, what they did, and the broker.
    pub fn status(&self) -> String {
        let (consuming, workers) = self.consuming();
        let busy = self.busy.get().max(0);
        let idle = (consuming as i64 - busy).max(0);
        let broker = if self.broker_down.load(Ordering::Relaxed) {
            "broker unreachable, retrying"
        } else if consuming == workers {
            "broker connected"
        } else {
            "connecting"
        };
        let paused = self
            .pause()
            .map(|why| format!("paused: {why}; "))
            .unwrap_or_default();
        format!(
            "{paused}{busy} busy, {idle} idle of {workers} workers; {} done, {} retried, {} dead-lettered; {broker}",
            self.count(TaskOutcome::Ack),
            self.count(TaskOutcome::Retry),
            self.count(TaskOutcome::DeadLetter),
        )
    }

    /// The metrics in Prometheus' text format.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        if encode(&mut text, &self.registry).is_err() {
            // Writing to a String cannot fail; say so in the output rather than panic.
            let _ = writeln!(text, "# encoding failed");
        }
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tasks_are_counted_by_outcome_with_the_queue_label() {
        let metrics = Metrics::new("jobs", &["rabbit-1:5672".into(), "rabbit-2:5672".into()]);
        metrics.set_workers(2);
        metrics.worker_consuming(1, false);
        assert_eq!(metrics.health(), Err("1 of 2 workers consuming".into()));
        metrics.worker_consuming(1, true);
        assert_eq!(metrics.health(), Ok(None));
        metrics.task_started();
        assert!(metrics
            .status()
            .starts_with("1 busy, 1 idle of 2 workers; 0 done"));
        metrics.task_finished(Some(TaskOutcome::Ack), Duration::from_millis(20));
        metrics.task_started();
        metrics.task_finished(Some(TaskOutcome::DeadLetter), Duration::from_millis(5));
        assert_eq!(
            metrics.status(),
            "0 busy, 2 idle of 2 workers; 1 done, 0 retried, 1 dead-lettered; broker connected"
        );
        let text = metrics.encode();
        assert!(
            text.contains("warren_tasks_total{queue=\"jobs\",outcome=\"ack\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("warren_handler_duration_seconds_count{queue=\"jobs\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("warren_reconnects_total{queue=\"jobs\"} 1"),
            "{text}"
        );
        // Every node has its series, the unused one at 0, for an alert on a node with none.
        assert!(
            text.contains("warren_node_workers_consuming{queue=\"jobs\",node=\"rabbit-2:5672\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("warren_node_workers_consuming{queue=\"jobs\",node=\"rabbit-1:5672\"} 0"),
            "{text}"
        );
        metrics.worker_stopped_consuming(1);
        assert!(
            metrics
                .encode()
                .contains("warren_node_workers_consuming{queue=\"jobs\",node=\"rabbit-2:5672\"} 1"),
            "{text}"
        );
        metrics.set_broker_down(true);
        assert!(metrics
            .health()
            .unwrap_err()
            .starts_with("the broker is unreachable"));
    }

    #[test]
    fn a_pause_is_healthy_and_shown_in_the_status_line_and_the_gauges() {
        let metrics = Metrics::new("jobs", &["rabbit-1:5672".into()]);
        metrics.set_workers(1);
        metrics.worker_consuming(0, false);
        metrics.set_pause(Some("breaker open after 5 failed attempts".into()));
        metrics.set_breaker(BreakerState::Open);
        metrics.breaker_tripped();
        assert_eq!(
            metrics.health(),
            Ok(Some("breaker open after 5 failed attempts".into()))
        );
        assert!(
            metrics
                .status()
                .starts_with("paused: breaker open after 5 failed attempts; 0 busy, 1 idle"),
            "{}",
            metrics.status()
        );
        metrics.set_queue_depth("jobs.dead", "dead", 7, 0);
        let text = metrics.encode();
        for line in [
            "warren_breaker_state{queue=\"jobs\"} 2",
            "warren_breaker_trips_total{queue=\"jobs\"} 1",
            "warren_paused{queue=\"jobs\"} 0",
            "warren_queue_messages_ready{queue=\"jobs\",kind=\"dead\",name=\"jobs.dead\"} 7",
            "warren_queue_consumers{queue=\"jobs\",kind=\"dead\",name=\"jobs.dead\"} 0",
        ] {
            assert!(text.contains(line), "{line} in {text}");
        }
        metrics.set_pause(None);
        assert_eq!(metrics.health(), Ok(None));
    }

    #[test]
    fn pipe_recycles_are_counted_by_reason_each_series_there_from_the_start() {
        let metrics = Metrics::new("jobs", &["rabbit-1:5672".into()]);
        metrics.pipe_recycled(RecycleReason::MaxMemory);
        metrics.pipe_recycled(RecycleReason::MaxMemory);
        metrics.pipe_recycled(RecycleReason::MaxAge);
        let text = metrics.encode();
        for line in [
            "warren_pipe_recycles_total{queue=\"jobs\",reason=\"max_tasks\"} 0",
            "warren_pipe_recycles_total{queue=\"jobs\",reason=\"max_memory\"} 2",
            "warren_pipe_recycles_total{queue=\"jobs\",reason=\"max_age\"} 1",
        ] {
            assert!(text.contains(line), "{line} in {text}");
        }
    }
}
