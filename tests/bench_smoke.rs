//! The benchmark driver (`benches/driver/`) works end to end: on a tiny scenario against the
//! real broker it measures `warren run` (the debug build here) and the baseline consumer, and
//! deletes the queues it used. This keeps `cargo bench --bench warren`, which is run rarely and
//! takes minutes, from rotting in between.

// The smoke test drives only `measure`; the bench uses the rest of the driver.
#[allow(dead_code)]
#[path = "../benches/driver/mod.rs"]
mod driver;
mod util;

use std::time::Duration;

use driver::{Consumer, Scenario};

/// The driver re-executes this test binary, filtered to this one test, as the baseline consumer.
const THIS_TEST: &str = "the_driver_measures_warren_and_the_baseline_and_deletes_their_queues";

#[test]
fn the_driver_measures_warren_and_the_baseline_and_deletes_their_queues() {
    // In the re-executed copy, this runs the baseline consumer and exits.
    driver::baseline_worker_if_asked();
    let _broker = util::BrokerLock::shared();
    let consumers = [
        Consumer::Warren {
            handler: "kind = \"dots\"".into(),
        },
        Consumer::Baseline {
            args: vec![THIS_TEST.into(), "--exact".into(), "--nocapture".into()],
        },
    ];
    for consumer in consumers {
        let what = match consumer {
            Consumer::Warren { .. } => "warren",
            Consumer::Baseline { .. } => "the baseline",
            Consumer::AmqpConsume { .. } => "amqp-consume",
        };
        let scenario = Scenario {
            name: "smoke".into(),
            consumer,
            workers: 1,
            prefetch: 1,
            messages: 300,
        };
        let measured =
            driver::measure(&scenario).unwrap_or_else(|e| panic!("measuring {what}: {e}"));
        assert!(
            measured.rate.is_finite() && measured.rate > 0.0,
            "{what}: rate {}",
            measured.rate
        );
        assert!(measured.startup > Duration::ZERO, "{what}: {measured:?}");
        for queue in [measured.queue.clone(), format!("{}.dead", measured.queue)] {
            assert!(!exists(&queue), "{what}: queue {queue} is left behind");
        }
    }
}

/// Whether `queue` exists, by a passive declare on a session of its own (a failed one closes
/// its channel).
fn exists(queue: &str) -> bool {
    match util::session().queue_counts(queue) {
        Ok(_) => true,
        Err(e) if e.to_string().contains("code 404") => false,
        Err(e) => panic!("passive declare of {queue}: {e}"),
    }
}
