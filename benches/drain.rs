//! Drain rate: how fast a pool empties a queue of no-op messages, with 1 and 4 workers, against
//! the real broker (`WARREN_TEST_AMQP_URL`, default the local guest account). Also reports the
//! rate of `warren publish --stdin`'s path (publish with asynchronous confirms).
//!
//! Run: `cargo bench --bench drain` (optional args: MESSAGES RUNS PREFETCH). Each configuration runs
//! RUNS times, interleaved, and the median is reported, with the 4-worker/1-worker ratio, because
//! on a shared 2-core machine one absolute time is noise.

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, Sender};
use warren::abort::Abort;
use warren::amqp::Session;
use warren::config::Config;
use warren::handler::{Handler, HandlerFactory, Outcome, Task};
use warren::pool::Pool;
use warren::publish::{self, Options};
use warren::retry::Topology;

/// Acks at once, and reports when the pool has handled `target` messages.
struct NoOp {
    done: Arc<AtomicUsize>,
    target: usize,
    finished: Sender<Instant>,
}

impl Handler for NoOp {
    fn handle(&mut self, _: &Task<'_>, _: &Abort) -> Outcome {
        if self.done.fetch_add(1, Ordering::SeqCst) + 1 == self.target {
            let _ = self.finished.send(Instant::now());
        }
        Outcome::Done
    }
}

fn config(queue: &str, workers: usize, prefetch: u16) -> Config {
    let url = std::env::var("WARREN_TEST_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into());
    let text = format!(
        "[broker]\nurl = \"{url}\"\n[queue]\nname = \"{queue}\"\n[workers]\ncount = {workers}\nprefetch = {prefetch}\n[handler]\nkind = \"dots\"\n"
    );
    Config::parse(Path::new("bench.toml"), &text, None).expect("bench config")
}

/// Publishes `n` messages and returns messages per second.
fn fill(config: &Config, n: usize) -> f64 {
    let options = Options {
        target: warren::publish::Target::Queue(config.queue.name.clone()),
        declare: true,
        confirm_timeout: Duration::from_secs(60),
        stamp: Default::default(),
        metrics_file: None,
    };
    let started = Instant::now();
    let bodies = (0..n).map(|i| Ok(format!("task {i}").into_bytes()));
    let summary = publish::publish(config, &options, bodies).expect("publish");
    assert_eq!(summary.confirmed, n);
    n as f64 / started.elapsed().as_secs_f64()
}

/// Drains a queue of `n` messages with `workers` workers and returns messages per second.
fn drain(run: usize, workers: usize, n: usize, prefetch: u16) -> (f64, f64) {
    let queue = format!("warren-bench-{}-{run}-{workers}", std::process::id());
    let config = config(&queue, workers, prefetch);
    let published = fill(&config, n);

    let done = Arc::new(AtomicUsize::new(0));
    let (finished, finish) = bounded(1);
    let factory: HandlerFactory = {
        let done = Arc::clone(&done);
        Arc::new(move |_| {
            Box::new(NoOp {
                done: Arc::clone(&done),
                target: n,
                finished: finished.clone(),
            })
        })
    };
    let started = Instant::now();
    let pool = Pool::new(Arc::new(config.clone()), factory)
        .expect("set up the pool")
        .start()
        .expect("start the pool");
    let ended = finish
        .recv_timeout(Duration::from_secs(300))
        .expect("drained in time");
    let rate = n as f64 / (ended - started).as_secs_f64();
    pool.stopper().stop();
    pool.wait();

    let session = Session::open(&config.broker, 0, "warren bench").expect("connect");
    let (ready, _) = session.queue_counts(&queue).expect("count");
    assert_eq!(ready, 0, "the queue is empty after the drain");
    // The work queue and the retry and dead-letter queues the pool declared around it.
    for spec in Topology::new(&config.queue, &config.retry).all() {
        session
            .delete_queue(&spec.name)
            .expect("delete the bench queues");
    }
    (rate, published)
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(|a, b| a.total_cmp(b));
    xs[xs.len() / 2]
}

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let n: usize = args.first().and_then(|a| a.parse().ok()).unwrap_or(10_000);
    let runs: usize = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(5);
    let prefetch: u16 = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(1);
    let (mut one, mut four, mut publish) = (Vec::new(), Vec::new(), Vec::new());
    for run in 0..runs {
        let (rate, published) = drain(run, 1, n, prefetch);
        one.push(rate);
        publish.push(published);
        let (rate, published) = drain(run, 4, n, prefetch);
        four.push(rate);
        publish.push(published);
        println!(
            "run {run}: 1 worker {:.0} msg/s, 4 workers {:.0} msg/s",
            one[run], four[run]
        );
    }
    let (one, four, publish) = (median(one), median(four), median(publish));
    println!("{n} no-op messages, prefetch {prefetch}, median of {runs} runs:");
    println!("  drain, 1 worker:  {one:.0} msg/s");
    println!(
        "  drain, 4 workers: {four:.0} msg/s ({:.2}x one worker)",
        four / one
    );
    println!("  publish with confirms: {publish:.0} msg/s");
}
