//! When the broker is away, `warren run` keeps retrying, with one log line per round for the
//! whole daemon, and resumes when it returns; persistent messages in a durable queue survive a
//! broker restart. A broker that refuses the credentials is a config error, and the password
//! never reaches the log. A login that a dying node cuts, or that a busy node leaves unanswered,
//! is not taken for refused credentials: `warren run` retries it, and `warren publish` tries a
//! cut login once more and calls an unanswered one an unavailable broker (exit 69).
//!
//! A broker that is away, or a node that cuts a login, is a loopback proxy to the one test broker
//! (`util::Proxy`), so that the broker stays up for the other tests.

mod util;

use std::time::Duration;

use nix::sys::signal::Signal;
use util::{
    drain_and_stop, publish_ok, queue_counts, ready_and_unacked, wait_for_ready, AppGuard,
    BrokerLock, ConfigFile, LoginFault, Proxy, Warren,
};

/// A proxy standing in for the one node, and a config for `queue` through it for one `dots`
/// worker.
fn one_node(queue: &str) -> (Proxy, ConfigFile) {
    let node = Proxy::start(Proxy::free_port());
    let config = ConfigFile::new(queue).urls(&[node.url()]).workers(1).dots();
    (node, config)
}

#[test]
fn an_unreachable_broker_is_retried_with_one_line_per_round_until_it_returns() {
    let broker = BrokerLock::shared();
    let queue = broker.queue("outage");
    let port = Proxy::free_port();
    let config = ConfigFile::new(&queue)
        .url(&util::proxied_url(port))
        .workers(3)
        .dots()
        .write_in(broker.dir.path());

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
        &ConfigFile::new(&queue).dots().write_in(broker.dir.path()),
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
    let broker = BrokerLock::shared();
    let queue = broker.queue("refused");
    let bad = util::amqp_url().replacen(":guest@", ":wr0ng-s3cret@", 1);
    assert_ne!(
        bad,
        util::amqp_url(),
        "the test URL carries a password to replace"
    );
    let config = ConfigFile::new(&queue)
        .url(&bad)
        .workers(2)
        .dots()
        .write_in(broker.dir.path());

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
    let broker = BrokerLock::exclusive();
    let queue = broker.queue("persist");
    let config = ConfigFile::new(&queue)
        .workers(2)
        .dots()
        .write_in(broker.dir.path());
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

#[test]
fn a_node_that_ends_the_login_is_tried_again_not_taken_for_refused_credentials() {
    let broker = BrokerLock::shared();
    let queue = broker.queue("logincut");
    let (node, config) = one_node(&queue);
    let config = config.write_in(broker.dir.path());

    // amiquip reports any connection that ends between the login and its acceptance as
    // invalid credentials; a node that goes away at that moment must not stop warren (exit 78,
    // which systemd does not restart).
    node.fail_next_login(LoginFault::Cut);
    let mut warren = Warren::run(&config, &[]);
    warren.wait_consuming(&queue, 1);
    assert_eq!(node.login_faults_left(), 0, "the first login was cut");
    warren.wait_for_log(
        "closed the connection during the login; trying once more",
        Duration::from_secs(5),
    );

    // warren publish tells the two apart the same way.
    node.fail_next_login(LoginFault::Cut);
    publish_ok(&config, &["after", "the cut"]);
    assert_eq!(node.login_faults_left(), 0, "publish's first login was cut");
    warren.wait_for_count(" done ", 2, Duration::from_secs(20));
    assert!(
        warren.lines_with("invalid credentials").is_empty(),
        "{:#?}",
        warren.log()
    );
    warren.signal(Signal::SIGTERM);
    assert_eq!(warren.wait_exit(Duration::from_secs(10)).code(), Some(0));
    assert_eq!(ready_and_unacked(&queue), (0, 0));
}

#[test]
fn a_login_the_broker_does_not_answer_in_time_is_retried_and_says_why() {
    let broker = BrokerLock::shared();
    let queue = broker.queue("loginstall");
    let (node, config) = one_node(&queue);
    let config = config
        .set("broker.connect_timeout", "1s")
        .write_in(broker.dir.path());

    // warren publish: an unavailable broker (69), not refused credentials (78).
    node.fail_next_login(LoginFault::Stall);
    let (status, log) = util::publish(&config, &["stalled"]);
    assert_eq!(status.code(), Some(69), "{status}\n{log}");
    assert!(
        log.contains("no answer to the login within 1s")
            && log.contains("check them too")
            && !log.contains("invalid credentials"),
        "the line says the login timed out, and that with so short a timeout wrong credentials look the same:\n{log}"
    );

    // warren run retries it.
    node.fail_next_login(LoginFault::Stall);
    let warren = Warren::run(&config, &[]);
    let line = warren.wait_for_log("no answer to the login", Duration::from_secs(10));
    assert!(line.contains("retrying in"), "{line}");
    warren.wait_consuming(&queue, 1);
    drain_and_stop(warren, &config, &queue, &["answered"]);
}
