//! The topology an operator owns: with `queue.declare = false` warren declares nothing, checks
//! that its queues and exchanges exist, and stops with exit 78 and one line naming what is
//! missing and what it needs; it then runs as a user without the configure permission, binding
//! and consuming, where `queue.declare = true` is refused. `check-config --connect` and
//! `warren publish` check the same. And what warren adds to what it declares or consumes:
//! `queue.arguments` on the work queue (a queue declared with others is exit 78, as for any
//! parameter), `queue.consumer_priority` on every consumer.

mod util;

use std::path::Path;
use std::process::Output;
use std::time::Duration;

use util::{
    publish, publish_ok, rabbitmqctl, ready_and_unacked, session, wait_until, BrokerLock,
    ConfigFile, Exchanges, User, Warren,
};
use warren::retry::Topology;

const WAIT: Duration = Duration::from_secs(20);

/// Declares, as the guest account, the queues that `config` gives warren, except those named in
/// `except`: what an operator's definitions would make.
fn make_queues(config: &ConfigFile, except: &[&str]) -> Topology {
    let config = config.parse();
    let topology = Topology::new(&config.queue, &config.retry);
    let session = session();
    for spec in topology.all() {
        if !except.contains(&spec.name.as_str()) {
            session
                .declare(spec)
                .expect("declare the queue as the operator");
        }
    }
    topology
}

/// The queues of vhost `/`, by name.
fn queue_exists(queue: &str) -> bool {
    util::queue_table("/").contains_key(queue)
}

/// Runs `warren ARGS --config CONFIG` to completion.
fn warren(args: &[&str], config: &Path) -> Output {
    util::warren_command(args)
        .arg("--config")
        .arg(config)
        .output()
        .expect("run warren")
}

#[test]
fn with_declare_false_a_missing_dead_letter_queue_stops_warren_with_78_and_its_arguments() {
    let broker = BrokerLock::shared();
    let queue = broker.queue("owned-nodlq");
    let dead = format!("{queue}.dead");
    let config = ConfigFile::new(&queue)
        .quorum()
        .set("queue.declare", false)
        .dots();
    make_queues(&config, &[&dead]);

    let mut warren = Warren::run(&config.write_in(broker.dir.path()), &[]);
    assert_eq!(warren.wait_exit(WAIT).code(), Some(78));
    let errors = warren.lines_with("ERROR");
    assert_eq!(errors.len(), 1, "one line: {errors:#?}");
    let expected = format!(
        "queue.declare = false, and the broker lacks: queue {dead:?} (the dead-letter queue; \
         durable, x-queue-type = \"quorum\")"
    );
    assert!(
        errors[0].ends_with(&expected),
        "the line names only the dead-letter queue, and its arguments:\n{}\nshould end with\n{expected}",
        errors[0]
    );
    assert!(!queue_exists(&dead), "warren declared {dead}");
}

#[test]
fn with_declare_false_a_user_without_configure_permission_binds_consumes_and_acks() {
    let broker = BrokerLock::shared();
    let queue = broker.queue("owned-noconf");
    let exchange = format!("{queue}.in");
    let _exchanges = Exchanges(vec![exchange.clone()]);
    // The operator's topology: the queues, and the exchange, bound with another key than the
    // one warren binds, so that routing by warren's key proves warren's own binding.
    let operator = ConfigFile::new(&queue).binding(&exchange, "topic", &["operator.only"]);
    let topology = make_queues(&operator, &[]);
    session()
        .bind(&topology.bindings[0])
        .expect("declare the exchange as the operator");

    let user = User::create("noconf").with_permissions("", ".*", ".*");
    let config = ConfigFile::new(&queue)
        .url(&user.url())
        .binding(&exchange, "topic", &["jobs.#"])
        .set("queue.declare", false)
        .workers(1)
        .dots();
    let path = config.write_in(broker.dir.path());
    let running = Warren::run(&path, &[]);
    running.wait_consuming(&queue, 1);
    let bindings = rabbitmqctl(&[
        "list_bindings",
        "-p",
        "/",
        "-q",
        "--no-table-headers",
        "source_name",
        "destination_name",
        "routing_key",
    ]);
    assert!(
        bindings
            .lines()
            .any(|l| l.split('\t').collect::<Vec<_>>() == [exchange.as_str(), &queue, "jobs.#"]),
        "warren bound {queue} to {exchange} with jobs.#: {bindings}"
    );

    // Through warren's binding, and (publish checking and binding as the worker did) straight
    // to the queue, both as the user.
    let (status, log) = publish(
        &path,
        &[
            "--no-declare",
            "--exchange",
            &exchange,
            "--routing-key",
            "jobs.a",
            "routed",
        ],
    );
    assert!(status.success(), "{status}\n{log}");
    let (status, log) = publish(&path, &["direct"]);
    assert!(status.success(), "{status}\n{log}");
    running.wait_for_count(" done ", 2, WAIT);
    util::wait_until(WAIT, "the queue to be empty", || {
        ready_and_unacked(&queue) == (0, 0)
    });
    running.stop(WAIT);

    // The same user may not declare: the test above means something.
    let declaring = config
        .set("queue.declare", true)
        .write_in(broker.dir.path());
    let mut refused = Warren::run(&declaring, &[]);
    assert_eq!(refused.wait_exit(WAIT).code(), Some(78));
    let errors = refused.lines_with("ERROR");
    assert!(
        errors.len() == 1 && errors[0].contains("ACCESS_REFUSED"),
        "{errors:#?}"
    );
}

#[test]
fn with_declare_false_check_config_connect_names_a_missing_retry_queue_and_exchange_and_their_needs(
) {
    let broker = BrokerLock::shared();
    let queue = broker.queue("owned-check");
    let retry = format!("{queue}.retry.2s");
    let exchange = format!("{queue}.absent");
    let config = ConfigFile::new(&queue)
        .binding(&exchange, "fanout", &[])
        .set("queue.declare", false)
        .dots();
    make_queues(&config, &[&retry]);

    let ran = warren(
        &["check-config", "--connect"],
        &config.write_in(broker.dir.path()),
    );
    let stdout = String::from_utf8_lossy(&ran.stdout);
    assert_eq!(ran.status.code(), Some(1), "{stdout}");
    let lines: Vec<&str> = stdout.lines().collect();
    let missing = format!(
        "FAIL  retry queue {retry}: missing; queue.declare = false, so the operator must make it: \
         durable, x-message-ttl = 2000, x-dead-letter-exchange = \"\", \
         x-dead-letter-routing-key = {queue:?}"
    );
    assert!(
        lines.contains(&missing.as_str()),
        "{missing:?} in\n{stdout}"
    );
    let found = format!("ok    dead-letter queue {queue}.dead: exists, 0 ready, 0 consumers");
    assert!(lines.contains(&found.as_str()), "{found:?} in\n{stdout}");
    let absent = format!(
        "FAIL  exchange {exchange}: missing; queue.declare = false, so the operator must make it: \
         fanout, durable"
    );
    assert!(lines.contains(&absent.as_str()), "{absent:?} in\n{stdout}");
    assert_eq!(lines.last(), Some(&"2 of 9 checks failed"), "{stdout}");
    assert!(!queue_exists(&retry), "check-config declared {retry}");
}

#[test]
fn with_declare_false_publish_refuses_a_missing_queue_with_78_and_declares_nothing() {
    let broker = BrokerLock::shared();
    let queue = broker.queue("owned-publish");
    let config = ConfigFile::new(&queue)
        .set("queue.declare", false)
        .write_in(broker.dir.path());
    let (status, log) = publish(&config, &["lost?"]);
    assert_eq!(status.code(), Some(78), "{log}");
    assert!(
        log.contains(&format!(
            "queue.declare = false, and the broker lacks: queue {queue:?} (the work queue; durable)"
        )),
        "{log}"
    );
    assert!(!queue_exists(&queue), "publish declared {queue}");
}

#[test]
fn queue_arguments_are_declared_on_the_work_queue_and_enforced_by_the_broker() {
    let broker = BrokerLock::shared();
    let queue = broker.queue("arguments");
    let mut arguments = toml::Table::new();
    arguments.insert("x-max-length".into(), 2_i64.into());
    // On a quorum queue: on a classic one, x-max-length would lose messages and is refused.
    let config = ConfigFile::new(&queue)
        .quorum()
        .set("queue.arguments", arguments)
        .workers(1)
        .dots()
        .write_in(broker.dir.path());
    // Declared by a worker...
    let running = Warren::run(&config, &[]);
    running.wait_consuming(&queue, 1);
    running.stop(WAIT);
    let listed = rabbitmqctl(&[
        "list_queues",
        "-p",
        "/",
        "-q",
        "--no-table-headers",
        "name",
        "arguments",
    ]);
    let row = listed
        .lines()
        .find(|l| l.split('\t').next() == Some(queue.as_str()))
        .unwrap_or_else(|| panic!("no row for {queue}: {listed}"));
    assert!(
        row.contains("{\"x-max-length\",2}") && row.contains("{\"x-overflow\",\"reject-publish\"}"),
        "the argument, and warren's own overflow: {row}"
    );
    // ...and kept by the broker: once it is full, a message is refused, not queued. A quorum
    // queue counts its length as its leader applies each message, so fill it one at a time.
    let mut accepted = 0;
    let refused = loop {
        let (status, log) = publish(&config, &[&format!("m{accepted}")]);
        if status.code() == Some(75) {
            break log;
        }
        assert!(status.success(), "{log}");
        accepted += 1;
        assert!(accepted <= 3, "x-max-length = 2 let {accepted} in");
    };
    assert!(refused.contains("nack"), "{refused}");
    assert!(accepted >= 2, "only {accepted} accepted");
}

#[test]
fn a_work_queue_that_exists_with_other_arguments_stops_warren_with_78_naming_them() {
    let broker = BrokerLock::shared();
    let queue = broker.queue("otherarguments");
    let with_length = |length: i64| {
        let mut arguments = toml::Table::new();
        arguments.insert("x-max-length".into(), length.into());
        ConfigFile::new(&queue)
            .quorum()
            .set("queue.arguments", arguments)
            .dots()
            .write_in(broker.dir.path())
    };
    publish_ok(&with_length(2), &["waits"]);

    let mut warren = Warren::run(&with_length(3), &[]);
    assert_eq!(warren.wait_exit(WAIT).code(), Some(78));
    let errors = warren.lines_with("ERROR");
    assert!(
        errors.len() == 1
            && errors[0].contains(&format!("queue {queue:?}"))
            && errors[0]
                .contains("exists with x-max-length = 2, but the config wants x-max-length = 3"),
        "{errors:#?}"
    );
    wait_until(WAIT, "the queued message to be counted, untouched", || {
        ready_and_unacked(&queue) == (1, 0)
    });
}

#[test]
fn consumer_priority_is_the_x_priority_of_every_worker_consumer() {
    let broker = BrokerLock::shared();
    let queue = broker.queue("priority");
    let config = ConfigFile::new(&queue)
        .set("queue.consumer_priority", 5)
        .workers(2)
        .dots()
        .write_in(broker.dir.path());
    let running = Warren::run(&config, &[]);
    running.wait_consuming(&queue, 2);
    let consumers = rabbitmqctl(&[
        "list_consumers",
        "-p",
        "/",
        "-q",
        "--no-table-headers",
        "queue_name",
        "arguments",
    ]);
    let rows: Vec<&str> = consumers
        .lines()
        .filter(|l| l.split('\t').next() == Some(queue.as_str()))
        .collect();
    assert_eq!(rows.len(), 2, "{consumers}");
    for row in rows {
        assert!(row.contains("{\"x-priority\",5}"), "{row}");
    }
    running.stop(WAIT);
}

/// A queue that goes missing while warren runs (an operator recreating it) stops nothing: the
/// worker that reconnects meanwhile waits for it, as for a broker that is down; only a start
/// without it is a configuration error.
#[test]
fn with_declare_false_a_queue_missing_at_a_reconnect_is_waited_for_not_fatal() {
    let broker = BrokerLock::shared();
    let queue = broker.queue("owned-gone");
    let config = ConfigFile::new(&queue)
        .set("queue.declare", false)
        .workers(1)
        .dots();
    let topology = make_queues(&config, &[]);
    let path = config.write_in(broker.dir.path());
    let running = Warren::run(&path, &[]);
    running.wait_consuming(&queue, 1);

    let retry = topology.retries[0].name.clone();
    session()
        .delete_queue(&retry)
        .expect("delete a retry queue");
    for connection in util::connections_of(running.pid()) {
        rabbitmqctl(&["close_connection", &connection, "warren test"]);
    }
    running.wait_for_log(
        &format!("the broker lacks: queue {retry:?} (a retry queue"),
        WAIT,
    );
    assert!(
        running.lines_with("ERROR").is_empty() && !util::gone(running.pid().as_raw()),
        "a reconnect without the queue is not fatal: {:#?}",
        running.log()
    );
    make_queues(&config, &[]);
    running.wait_consuming(&queue, 1);
    publish_ok(&path, &["after"]);
    running.wait_for_log(" done ", WAIT);
    running.stop(WAIT);
}
