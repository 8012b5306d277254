//! The queue declare: warren declares its queue at start, and a queue that already exists with
//! other parameters stops warren with one line and exit 78, as the tutorial warns ("RabbitMQ
//! does not allow redefining an existing queue with different parameters").

mod util;

use std::time::Duration;

use util::{publish_ok, queue_counts, BrokerLock, ConfigFile, Warren};

#[test]
fn a_queue_declared_with_other_parameters_stops_warren_with_exit_78() {
    let broker = BrokerLock::shared();
    let queue = broker.queue("mismatch");
    let durable = ConfigFile::new(&queue).dots().write_in(broker.dir.path());
    publish_ok(&durable, &["waits"]);

    let transient = ConfigFile::new(&queue)
        .set("queue.durable", false)
        .dots()
        .write_in(broker.dir.path());
    let mut warren = Warren::run(&transient, &[]);
    assert_eq!(warren.wait_exit(Duration::from_secs(20)).code(), Some(78));
    let errors = warren.lines_with("ERROR");
    assert_eq!(errors.len(), 1, "one line: {errors:#?}");
    assert!(
        errors[0].contains(&format!("queue {queue:?}"))
            && errors[0]
                .contains("exists with durable = true, but the config wants durable = false"),
        "the line names the queue, the argument, what exists and what is wanted: {errors:#?}"
    );
    assert_eq!(
        queue_counts(&queue).0,
        1,
        "the message already queued is untouched"
    );
}

#[test]
fn a_classic_queue_cannot_become_a_quorum_queue_by_config() {
    let broker = BrokerLock::shared();
    let queue = broker.queue("retype");
    let classic = ConfigFile::new(&queue).dots().write_in(broker.dir.path());
    publish_ok(&classic, &["waits"]);

    let quorum = ConfigFile::new(&queue)
        .quorum()
        .dots()
        .write_in(broker.dir.path());
    let mut warren = Warren::run(&quorum, &[]);
    assert_eq!(warren.wait_exit(Duration::from_secs(20)).code(), Some(78));
    let errors = warren.lines_with("ERROR");
    assert!(
        errors.iter().any(
            |l| l.contains(&format!("queue {queue:?}: it exists with x-"))
                && l.contains("= (not set), but the config wants x-")
        ),
        "{errors:#?}"
    );
    assert_eq!(
        queue_counts(&queue).0,
        1,
        "the message already queued is untouched"
    );
}
