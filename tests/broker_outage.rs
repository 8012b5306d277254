//! When the broker is away, `warren run` keeps retrying, with one log line per round for the
//! whole daemon, and resumes when it returns; persistent messages in a durable queue survive a
//! broker restart. A broker that refuses the credentials is a config error, and the password
//! never reaches the log.

mod util;

use std::time::Duration;

use nix::sys::signal::Signal;
use util::{
    publish_ok, queue_counts, ready_and_unacked, wait_for_ready, AppGuard, Broker, Proxy, Warren,
};

#[test]
fn an_unreachable_broker_is_retried_with_one_line_per_round_until_it_returns() {
    let broker = Broker::shared();
    let queue = broker.queue("outage");
    let port = Proxy::free_port();
    let config = broker.config(
        &queue,
        "[workers]\ncount = 3\n\n[handler]\nkind = \"dots\"\n",
    );
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(
        &config,
        text.replace(&util::amqp_url(), &util::proxied_url(port)),
    )
    .unwrap();

    let mut warren = Warren::run(&config, &[]);
    warren.wait_for_log("(round 3)", Duration::from_secs(20));
    let log = warren.log();
    let rounds = log
        .iter()
        .filter_map(|l| {
            l.split("(round ")
                .nth(1)?
                .split(')')
                .next()?
                .parse::<usize>()
                .ok()
        })
        .max()
        .unwrap();
    let lines = log
        .iter()
        // Lines at the default level: at debug, each waiting worker says so too.
        .filter(|l| l.contains("cannot reach the broker") && !l.contains(" DEBUG]"))
        .count();
    assert_eq!(
        lines, rounds,
        "one line per retry round, not one per worker: {log:#?}"
    );

    let _proxy = Proxy::start(port);
    warren.wait_for_log("reachable again", Duration::from_secs(20));
    warren.wait_consuming(&queue, 3);
    publish_ok(
        &broker.config(&queue, "[handler]\nkind = \"dots\"\n"),
        &["back"],
    );
    warren.wait_for_log(" done ", Duration::from_secs(10));
    warren.signal(Signal::SIGTERM);
    assert_eq!(warren.wait_exit(Duration::from_secs(10)).code(), Some(0));
    assert!(
        warren.log().iter().all(|l| !l.contains(":guest@")),
        "the password is masked"
    );
}

#[test]
fn refused_credentials_exit_78_without_logging_the_password() {
    let broker = Broker::shared();
    let queue = broker.queue("refused");
    let config = broker.config(
        &queue,
        "[workers]\ncount = 2\n\n[handler]\nkind = \"dots\"\n",
    );
    let text = std::fs::read_to_string(&config).unwrap();
    let bad = util::amqp_url().replacen(":guest@", ":wr0ng-s3cret@", 1);
    assert_ne!(
        bad,
        util::amqp_url(),
        "the test URL carries a password to replace"
    );
    std::fs::write(&config, text.replace(&util::amqp_url(), &bad)).unwrap();

    let mut warren = Warren::run(&config, &[]);
    assert_eq!(warren.wait_exit(Duration::from_secs(20)).code(), Some(78));
    let log = warren.log().join("\n");
    assert!(
        log.contains("refused the connection: invalid credentials"),
        "{log}"
    );
    assert!(!log.contains("wr0ng-s3cret"), "the password leaked: {log}");
    assert!(log.contains(":***@"), "the URL is shown masked: {log}");
}

#[test]
fn persistent_messages_survive_a_broker_restart_and_are_then_processed() {
    let broker = Broker::exclusive();
    let queue = broker.queue("persist");
    let config = broker.config(
        &queue,
        "[workers]\ncount = 2\n\n[handler]\nkind = \"dots\"\n",
    );
    let mut warren = Warren::run(&config, &[]);
    warren.wait_consuming(&queue, 2);
    warren.signal(Signal::SIGTERM);
    assert_eq!(warren.wait_exit(Duration::from_secs(10)).code(), Some(0));

    publish_ok(&config, &["kept", "across", "the restart"]);
    assert_eq!(queue_counts(&queue).0, 3);
    let app = AppGuard::stop_app();
    let mut warren = Warren::run(&config, &[]);
    warren.wait_for_log("cannot reach the broker", Duration::from_secs(20));
    drop(app); // start_app, then await_startup

    wait_for_ready(&queue, 0, Duration::from_secs(60));
    warren.wait_for_count(" done ", 3, Duration::from_secs(30));
    warren.signal(Signal::SIGTERM);
    assert_eq!(warren.wait_exit(Duration::from_secs(10)).code(), Some(0));
    assert_eq!(ready_and_unacked(&queue), (0, 0));
}
