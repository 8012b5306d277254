//! The topology warren declares at start: its queue, where a queue that already exists with
//! other parameters stops warren with one line and exit 78, as the tutorial warns ("RabbitMQ
//! does not allow redefining an existing queue with different parameters"); and the exchanges of
//! `[[queue.bindings]]`, bound to the queue, which `warren publish --exchange` publishes to.

mod util;

use std::time::Duration;

use util::{
    publish, publish_ok, queue_counts, ready_and_unacked, BrokerLock, ConfigFile, Exchanges, Warren,
};

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

#[test]
fn a_topic_exchange_with_two_bindings_delivers_only_what_matches_and_a_fanout_everything() {
    let broker = BrokerLock::shared();
    let queue = broker.queue("bound");
    let (topic, fanout) = (format!("{queue}.orders"), format!("{queue}.all"));
    let _exchanges = Exchanges(vec![topic.clone(), fanout.clone()]);
    let config = ConfigFile::new(&queue)
        .binding(&topic, "topic", &["order.created", "order.*.eu"])
        .binding(&fanout, "fanout", &[])
        .workers(1)
        .dots()
        .write_in(broker.dir.path());
    let warren = Warren::run(&config, &[]);
    warren.wait_consuming(&queue, 1);

    let send = |exchange: &str, key: &str, body: &str| {
        publish(
            &config,
            &["--exchange", exchange, "--routing-key", key, body],
        )
    };
    for (key, body) in [("order.created", "created"), ("order.paid.eu", "paid-eu")] {
        let (status, log) = send(&topic, key, body);
        assert!(status.success(), "{key} is bound: {status}\n{log}");
    }
    for (key, body) in [("order.paid.us", "paid-us"), ("invoice.created", "invoice")] {
        let (status, log) = send(&topic, key, body);
        assert_eq!(status.code(), Some(75), "{key} matches no binding: {log}");
        assert!(log.contains("unroutable"), "{log}");
    }
    let (status, log) = send(&fanout, "any.key", "fanned");
    assert!(
        status.success(),
        "a fanout exchange routes every key: {status}\n{log}"
    );

    warren.wait_for_count(" done ", 3, Duration::from_secs(20));
    util::wait_until(Duration::from_secs(10), "the queue to be empty", || {
        ready_and_unacked(&queue) == (0, 0)
    });
    let received = warren.lines_with(" received ");
    for body in ["created", "paid-eu", "fanned"] {
        assert!(
            received.iter().any(|l| l.ends_with(&format!("\"{body}\""))),
            "{body} was delivered: {received:#?}"
        );
    }
    assert_eq!(
        received.len(),
        3,
        "nothing else was delivered: {received:#?}"
    );
}

#[test]
fn publishing_to_a_missing_exchange_is_a_config_error_and_sends_nothing() {
    let broker = BrokerLock::shared();
    let queue = broker.queue("noexchange");
    let config = ConfigFile::new(&queue).dots().write_in(broker.dir.path());
    let missing = format!("{queue}.missing");
    let (status, log) = publish(&config, &["--exchange", &missing, "lost?"]);
    assert_eq!(status.code(), Some(78), "{log}");
    assert!(
        log.contains(&format!("exchange {missing:?} does not exist")),
        "{log}"
    );
    assert_eq!(queue_counts(&queue).0, 0);
}

#[test]
fn an_exchange_declared_with_another_type_stops_warren_with_exit_78() {
    let broker = BrokerLock::shared();
    let queue = broker.queue("exchangetype");
    let exchange = format!("{queue}.events");
    let _exchanges = Exchanges(vec![exchange.clone()]);
    let fanout = ConfigFile::new(&queue)
        .binding(&exchange, "fanout", &[])
        .dots()
        .write_in(broker.dir.path());
    // Through the exchange: publish declares the queue's bindings first.
    let (status, log) = publish(&fanout, &["--exchange", &exchange, "through the fanout"]);
    assert!(status.success(), "{status}\n{log}");

    let topic = ConfigFile::new(&queue)
        .binding(&exchange, "topic", &["events.#"])
        .dots()
        .write_in(broker.dir.path());
    let mut warren = Warren::run(&topic, &[]);
    assert_eq!(warren.wait_exit(Duration::from_secs(20)).code(), Some(78));
    let errors = warren.lines_with("ERROR");
    assert!(
        errors.len() == 1 && errors[0].contains(&format!("exchange {exchange:?}")),
        "one line naming the exchange: {errors:#?}"
    );
    assert_eq!(queue_counts(&queue).0, 1, "the queued message is untouched");
}

#[test]
fn a_headers_exchange_routes_by_the_headers_warren_publish_sets() {
    let broker = BrokerLock::shared();
    let queue = broker.queue("by-headers");
    let exchange = format!("{queue}.tenants");
    let _exchanges = Exchanges(vec![exchange.clone()]);
    let config = ConfigFile::new(&queue)
        .binding(&exchange, "headers", &[])
        .binding_arguments(&[("x-match", "all"), ("tenant", "acme"), ("region", "eu")])
        .dots()
        .write_in(broker.dir.path());
    let send = |headers: &[&str]| {
        let mut args = vec!["--exchange", exchange.as_str()];
        for header in headers {
            args.extend(["--header", header]);
        }
        args.push("report");
        publish(&config, &args)
    };

    let (status, log) = send(&["tenant=acme", "region=eu"]);
    assert!(status.success(), "both headers match: {status}\n{log}");
    for headers in [&["tenant=acme"][..], &["tenant=other", "region=eu"]] {
        let (status, log) = send(headers);
        assert_eq!(
            status.code(),
            Some(75),
            "{headers:?} do not all match: {log}"
        );
    }
    assert_eq!(
        queue_counts(&queue).0,
        1,
        "only the matching message is queued"
    );

    let (status, log) = send(&["no-equals-sign"]);
    assert_eq!(
        status.code(),
        Some(64),
        "a header without = is a usage error: {log}"
    );
    assert!(log.contains("is not NAME=VALUE"), "{log}");
    let long = "c".repeat(256);
    let (status, log) = publish(&config, &["--correlation-id", &long, "x"]);
    assert_eq!(status.code(), Some(64), "{log}");
    assert!(
        log.contains("256 bytes, more than the 255 AMQP allows"),
        "{log}"
    );
}
