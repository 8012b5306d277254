//! The circuit breaker, against the real broker: while the handler's dependency is down, warren
//! stops taking messages instead of spending their attempts, probes with one message at a time,
//! and resumes by itself; a poison message never trips it; the messages that failed keep honest
//! attempt counts.

mod util;

use std::collections::BTreeSet;
use std::io::Write;
use std::thread;
use std::time::{Duration, Instant};

use util::{
    epoch_ms, http_get, metric_sample, publish_ok, queue_counts, spawn_publish_stdin, wait_until,
    BrokerLock, ConfigFile, Dependency, Proxy, Warren,
};

/// What one run of the outage scenario saw.
#[derive(Debug)]
struct Outage {
    published: usize,
    /// Tasks published while the dependency was down.
    during: usize,
    /// Handler calls that found the dependency down.
    calls_during: usize,
    dead: u32,
    lost: usize,
    /// From the dependency's return to the first success after it.
    resumed_after: Duration,
}

/// Rate, outage and length of the scenario: after a burst of healthy tasks, tasks arrive every
/// 100 ms for 70 s; the dependency is down from the 5th second to the 65th.
const EVERY: Duration = Duration::from_millis(100);
const TASKS: usize = 700;
/// The healthy tasks first, all at once: with them, the breaker's window holds far more
/// successes than the outage's first failures, as it does after hours of healthy work.
const WARM_UP: usize = 300;
const DOWN_AT: usize = 50;
const UP_AT: usize = 650;

/// Four workers with the default settings (but the breaker off unless `breaker`) and a command
/// handler whose dependency fails for 60 s while tasks arrive steadily.
fn outage(what: &str, breaker: bool) -> Outage {
    let broker = BrokerLock::shared();
    let queue = broker.queue(what);
    let dependency = Dependency::new(&broker, what);
    let port = Proxy::free_port();
    let mut config = ConfigFile::new(&queue)
        .workers(4)
        .command(&dependency.script)
        .metrics(port);
    if !breaker {
        config = config.set("breaker.enabled", false);
    }
    let config = config.write_in(broker.dir.path());
    let warren = Warren::run(&config, &[]);
    warren.wait_consuming(&queue, 4);

    let mut publisher = spawn_publish_stdin(&config, &[]);
    let mut input = publisher.stdin.take().expect("stdin is piped");
    for i in 0..WARM_UP {
        writeln!(input, "w-{i}").expect("feed warren publish");
    }
    wait_until(Duration::from_secs(30), "the healthy burst", || {
        dependency.done().len() == WARM_UP
    });
    let started = Instant::now();
    let (mut down_ms, mut recovered_ms) = (0, 0);
    for i in 0..TASKS {
        if i == DOWN_AT {
            dependency.fail();
            down_ms = epoch_ms();
        }
        if i == UP_AT {
            dependency.recover();
            recovered_ms = epoch_ms();
        }
        if i == 400 && breaker {
            // Half way through the outage: open or probing, and healthy.
            let (status, body) = http_get(port, "/healthz");
            assert_eq!(status, 200, "{body}");
            assert!(body.starts_with("ok; paused: breaker "), "{body}");
            let metrics = http_get(port, "/metrics").1;
            let state = metric_sample(
                &metrics,
                &format!("warren_breaker_state{{queue=\"{queue}\"}}"),
            );
            assert!(state > 0.0, "the breaker is not closed: {state}");
        }
        writeln!(input, "t-{i}").expect("feed warren publish");
        let next = started + EVERY * (i as u32 + 1);
        thread::sleep(next.saturating_duration_since(Instant::now()));
    }
    drop(input);
    let status = publisher.wait().expect("wait for warren publish");
    assert!(status.success(), "warren publish failed: {status}");

    let all: BTreeSet<String> = (0..TASKS)
        .map(|i| format!("t-{i}"))
        .chain((0..WARM_UP).map(|i| format!("w-{i}")))
        .collect();
    let dead_queue = format!("{queue}.dead");
    wait_until(
        Duration::from_secs(120),
        "every task to succeed or be dead-lettered",
        || dependency.done().len() + queue_counts(&dead_queue).0 as usize >= all.len(),
    );
    let calls = dependency.calls();
    let done = dependency.done();
    let dead = queue_counts(&dead_queue).0;
    let resumed_at = calls
        .iter()
        .filter(|call| call.ok && call.at_ms >= recovered_ms)
        .map(|call| call.at_ms)
        .min()
        .unwrap_or(recovered_ms);
    let outage = Outage {
        published: all.len(),
        during: UP_AT - DOWN_AT,
        calls_during: calls.iter().filter(|call| !call.ok).count(),
        dead,
        lost: all.len().saturating_sub(done.len() + dead as usize),
        resumed_after: Duration::from_millis(resumed_at - recovered_ms),
    };
    eprintln!(
        "outage ({what}): {} tasks ({WARM_UP} healthy ones at once first), {} while the \
         dependency was down for 60s; {} handler calls \
         found it down ({:.2} per task of the outage); {} dead-lettered; {} lost; first success \
         {:.1?} after it returned",
        outage.published,
        outage.during,
        outage.calls_during,
        outage.calls_during as f64 / outage.during as f64,
        outage.dead,
        outage.lost,
        outage.resumed_after
    );
    // The timeline, in seconds from the start of the outage.
    let at = |ms: u64| (ms.saturating_sub(down_ms)) as f64 / 1000.0;
    let failed: Vec<String> = (calls.iter())
        .filter(|call| !call.ok)
        .map(|call| format!("{:.1}", at(call.at_ms)))
        .collect();
    let last = calls.iter().map(|call| call.at_ms).max().unwrap_or(down_ms);
    eprintln!(
        "outage ({what}) timeline: failed calls at [{}]s; the dependency back at {:.1}s; first \
         success after it at {:.1}s; last task done at {:.1}s",
        if failed.len() > 40 {
            format!(
                "{} … {} ({} calls)",
                failed[..20].join(", "),
                failed[failed.len() - 5..].join(", "),
                failed.len()
            )
        } else {
            failed.join(", ")
        },
        at(recovered_ms),
        at(resumed_at),
        at(last)
    );
    for line in warren.lines_with("breaker ") {
        eprintln!("outage ({what}) log: {line}");
    }
    let trips = warren.lines_with("breaker open: ").len();
    warren.stop(Duration::from_secs(20));
    if breaker {
        assert!(trips >= 1, "the breaker never opened");
    }
    outage
}

#[test]
fn an_outage_of_the_dependency_for_a_minute_dead_letters_nothing_and_costs_few_calls() {
    let outage = outage("outage", true);
    assert_eq!(outage.lost, 0, "{outage:?}");
    assert_eq!(outage.dead, 0, "nothing is dead-lettered: {outage:?}");
    assert!(
        outage.calls_during * 3 < outage.during,
        "the handler was called fewer than a third as many times as tasks arrived: {outage:?}"
    );
}

/// The same outage without the breaker, to show what the one above protects against: the
/// retries run out while the dependency is down.
#[test]
fn without_the_breaker_the_same_outage_dead_letters_tasks() {
    let outage = outage("no-breaker", false);
    assert_eq!(outage.lost, 0, "{outage:?}");
    assert!(outage.dead > 0, "{outage:?}");
    assert!(outage.calls_during > outage.during, "{outage:?}");
}

#[test]
fn a_poison_message_among_healthy_ones_never_trips_the_breaker_and_is_dead_lettered() {
    let broker = BrokerLock::shared();
    let queue = broker.queue("poison");
    let dependency = Dependency::new(&broker, "poison");
    // Ten quick attempts: the poison message's failures become far more than 80% of the
    // outcomes, so only its being one message keeps the breaker closed.
    let config = ConfigFile::new(&queue)
        .workers(2)
        .command(&dependency.script)
        .set("retry.max_attempts", 10)
        .set("retry.delay", "50ms")
        .set("retry.max_delay", "100ms")
        .write_in(broker.dir.path());
    let warren = Warren::run(&config, &[]);
    warren.wait_consuming(&queue, 2);
    publish_ok(&config, &["poison", "h-1", "h-2"]);

    let dead_queue = format!("{queue}.dead");
    util::wait_for_ready(&dead_queue, 1, Duration::from_secs(20));
    let dead = util::take_only(&dead_queue);
    assert_eq!(dead.body, b"poison");
    assert_eq!(
        util::str_header(&dead, "x-warren-reason"),
        "failed all 10 attempts"
    );
    wait_until(Duration::from_secs(10), "the healthy messages", || {
        dependency.done().len() == 2
    });
    let poison: Vec<u32> = (dependency.calls().into_iter())
        .filter(|call| call.body == "poison")
        .map(|call| call.attempt)
        .collect();
    assert_eq!(poison, (1..=10).collect::<Vec<u32>>());
    assert!(
        warren.lines_with("breaker").is_empty(),
        "{:#?}",
        warren.lines_with("breaker")
    );
    warren.stop(Duration::from_secs(10));
}

#[test]
fn a_pipe_program_that_crashes_on_every_message_trips_the_breaker() {
    let broker = BrokerLock::shared();
    let queue = broker.queue("pipe-crash");
    let program = broker.script("crash.sh", "exit 3");
    let config = ConfigFile::new(&queue)
        .workers(2)
        .pipe(&[&program.display().to_string()])
        .write_in(broker.dir.path());
    let warren = Warren::run(&config, &[]);
    warren.wait_consuming(&queue, 2);
    util::publish_numbered(&config, "m", 20);

    let line = warren.wait_for_log("breaker open: ", Duration::from_secs(20));
    assert!(line.contains(" WARN "), "{line}");
    // The messages wait: none is dead-lettered, and most were never tried.
    thread::sleep(Duration::from_secs(1));
    assert_eq!(queue_counts(&format!("{queue}.dead")).0, 0);
    let tried = warren
        .lines_with("the pipe program exited mid-message")
        .len();
    assert!(tried < 20, "{tried} attempts failed");
    warren.stop(Duration::from_secs(10));
}

#[test]
fn the_breaker_probes_with_one_message_backs_off_and_closes_when_one_succeeds() {
    let broker = BrokerLock::shared();
    let queue = broker.queue("probe");
    let dependency = Dependency::new(&broker, "probe");
    let config = ConfigFile::new(&queue)
        .workers(3)
        .command(&dependency.script)
        .set("breaker.cooldown", "1s")
        .set("breaker.max_cooldown", "4s")
        .write_in(broker.dir.path());
    let warren = Warren::run(&config, &[]);
    warren.wait_consuming(&queue, 3);
    dependency.fail();
    util::publish_numbered(&config, "p", 30);

    warren.wait_for_log("breaker open: ", Duration::from_secs(20));
    // Paused workers cancel their consumers: the broker sees none while the breaker is open.
    wait_until(Duration::from_secs(5), "no consumer while open", || {
        queue_counts(&queue).1 == 0
    });
    // A probe takes exactly one message: one call between two reopenings.
    warren.wait_for_count("breaker open again: ", 1, Duration::from_secs(20));
    let after_first = dependency.calls().len();
    warren.wait_for_count("breaker open again: ", 2, Duration::from_secs(20));
    assert_eq!(dependency.calls().len(), after_first + 1);
    dependency.recover();
    let closed = warren.wait_for_log("breaker closed: ", Duration::from_secs(20));
    assert!(closed.contains("probe succeeded"), "{closed}");
    let lines = warren.log();
    let reopened: Vec<&String> = lines
        .iter()
        .filter(|l| l.contains("breaker open again: "))
        .collect();
    assert!(
        reopened[0].contains("next probe in 2s") && reopened[1].contains("next probe in 4s"),
        "the cool-down doubles: {reopened:#?}"
    );
    wait_until(Duration::from_secs(20), "every message", || {
        dependency.done().len() == 30
    });
    assert_eq!(queue_counts(&format!("{queue}.dead")).0, 0);
    assert_honest_attempts(&dependency, "p", 30);
    warren.stop(Duration::from_secs(10));
}

#[test]
fn the_failure_that_trips_the_breaker_on_a_quorum_queue_spends_no_attempt_of_the_next_message() {
    let broker = BrokerLock::shared();
    let queue = broker.queue("trip-quorum");
    let dependency = Dependency::new(&broker, "trip-quorum");
    // The second failure (of two messages) trips it. One worker at prefetch 1: once the failed
    // message is settled,
    // the broker sends the next one at once; a pause read only then would cancel the consumer
    // with that delivery in flight, and the quorum queue would count it as an attempt.
    let config = ConfigFile::at(&util::amqp_url(), &queue)
        .quorum()
        .workers(1)
        .command(&dependency.script)
        .set("breaker.min_failures", 2)
        .set("breaker.min_messages", 2)
        .set("breaker.cooldown", "1s")
        .write_in(broker.dir.path());
    let warren = Warren::run(&config, &[]);
    warren.wait_consuming(&queue, 1);
    dependency.fail();
    util::publish_numbered(&config, "t", 5);
    warren.wait_for_log("breaker open: ", Duration::from_secs(20));
    dependency.recover();
    wait_until(Duration::from_secs(30), "every message", || {
        dependency.done().len() == 5
    });
    // The worker read the pause before it settled the failure that tripped the breaker: its
    // consumer was cancelled with the failed message still unacked, so nothing was in flight.
    let lines = warren.log();
    let paused = lines.iter().position(|l| l.contains("worker-1 paused"));
    let tripping = (lines.iter().enumerate())
        .filter(|(_, l)| l.contains("worker-1 failed "))
        .nth(1)
        .map(|(i, _)| i);
    assert!(
        paused.is_some() && tripping.is_some() && paused < tripping,
        "paused before the failure that tripped the breaker was settled: {lines:#?}"
    );
    assert_honest_attempts(&dependency, "t", 5);
    warren.stop(Duration::from_secs(10));
}

/// Honest attempt counts: the attempts of each of the `count` messages `prefix-0`, `prefix-1`, …
/// that `dependency` saw are 1, 2, … with no gap.
fn assert_honest_attempts(dependency: &Dependency, prefix: &str, count: usize) {
    let calls = dependency.calls();
    for i in 0..count {
        let body = format!("{prefix}-{i}");
        let attempts: Vec<u32> = (calls.iter())
            .filter(|call| call.body == body)
            .map(|call| call.attempt)
            .collect();
        let expected: Vec<u32> = (1..=attempts.len() as u32).collect();
        assert_eq!(attempts, expected, "{body}: {calls:#?}");
    }
}
