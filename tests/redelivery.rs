//! Ack after work: a message whose task was running when warren died is not lost. The broker
//! requeues it and the next `warren run` processes it.

mod util;

use std::time::Duration;

use nix::sys::signal::Signal;
use util::{publish_ok, ready_and_unacked, wait_for_ready, BrokerLock, ConfigFile, Warren};

#[test]
fn an_unacked_message_is_redelivered_after_sigkill() {
    let broker = BrokerLock::shared();
    let queue = broker.queue("sigkill");
    let config = ConfigFile::new(&queue)
        .workers(1)
        .dots()
        .write_in(broker.dir.path());
    publish_ok(&config, &["interrupted..."]);

    let mut first = Warren::run(&config, &[]);
    first.wait_for_log("received", Duration::from_secs(10));
    first.signal(Signal::SIGKILL);
    first.wait_exit(Duration::from_secs(5));
    assert!(first.lines_with(" done ").is_empty());
    wait_for_ready(&queue, 1, Duration::from_secs(10));

    let mut second = Warren::run(&config, &[]);
    let line = second.wait_for_log("received", Duration::from_secs(10));
    assert!(
        line.contains("(attempt 1, redelivered)"),
        "the broker flags it as redelivered: {line}"
    );
    second.wait_for_log(" done ", Duration::from_secs(10));
    second.signal(Signal::SIGTERM);
    assert_eq!(second.wait_exit(Duration::from_secs(10)).code(), Some(0));
    assert_eq!(ready_and_unacked(&queue), (0, 0));
}
