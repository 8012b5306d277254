//! The supervisor: a worker whose handler panics, or whose connection is force-closed by the
//! broker, is restarted, and the message it held is not lost.

mod util;

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use nix::sys::signal::Signal;
use util::{
    publish_ok, queue_counts, rabbitmqctl, ready_and_unacked, recorded, wait_until, BrokerLock,
    ConfigFile, Warren,
};
use warren::abort::Abort;
use warren::config::Config;
use warren::handler::{Handler, HandlerFactory, Outcome, Task};
use warren::pool::{Pool, Report};

/// Panics on a message's first delivery; records its id on the redelivery.
struct PanicsOnce {
    record: PathBuf,
}

impl Handler for PanicsOnce {
    fn handle(&mut self, task: &Task<'_>, _: &Abort) -> Outcome {
        if !task.redelivered {
            panic!("the test handler panics on a first delivery");
        }
        let mut file = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.record)
            .unwrap();
        writeln!(file, "{}", task.message_id.unwrap_or("-")).unwrap();
        Outcome::Done
    }
}

fn load(path: &Path) -> Config {
    Config::load(path, None).expect("the test config loads")
}

#[test]
fn a_worker_whose_handler_panics_is_restarted_and_its_message_is_not_lost() {
    let broker = BrokerLock::shared();
    let queue = broker.queue("panic");
    let config = ConfigFile::new(&queue)
        .workers(1)
        .dots()
        .write_in(broker.dir.path());
    publish_ok(&config, &["explodes"]);

    let record = broker.dir.path().join("done");
    let made = Arc::new(AtomicUsize::new(0));
    let factory: HandlerFactory = {
        let (record, made) = (record.clone(), Arc::clone(&made));
        Arc::new(move |_| {
            made.fetch_add(1, Ordering::SeqCst);
            Box::new(PanicsOnce {
                record: record.clone(),
            })
        })
    };
    let pool = Pool::new(Arc::new(load(&config)), factory)
        .unwrap()
        .start()
        .unwrap();
    wait_until(
        Duration::from_secs(20),
        "the redelivered message to be handled",
        || recorded(&record).len() == 1,
    );
    assert_eq!(
        made.load(Ordering::SeqCst),
        2,
        "the worker was restarted once, with a new handler"
    );

    pool.stopper().stop();
    assert!(matches!(pool.wait(), Report::Clean));
    assert_eq!(
        ready_and_unacked(&queue),
        (0, 0),
        "the message was acked after the restart"
    );
}

#[test]
fn a_worker_whose_connection_is_force_closed_is_restarted_and_goes_on_consuming() {
    let broker = BrokerLock::shared();
    let queue = broker.queue("forced");
    let config = ConfigFile::new(&queue)
        .workers(2)
        .dots()
        .write_in(broker.dir.path());
    let mut warren = Warren::run(&config, &[]);
    warren.wait_consuming(&queue, 2);

    let connections = util::connections_of(warren.pid());
    assert_eq!(
        connections.len(),
        2,
        "one connection per worker: {connections:?}"
    );
    rabbitmqctl(&[
        "close_connection",
        &connections[0],
        "closed by the warren test suite",
    ]);

    warren.wait_for_log(
        "closed by the broker or an operator",
        Duration::from_secs(10),
    );
    wait_until(
        Duration::from_secs(20),
        "a new connection to replace the closed one",
        || {
            let now = util::connections_of(warren.pid());
            now.len() == 2 && !now.contains(&connections[0])
        },
    );
    warren.wait_consuming(&queue, 2);

    publish_ok(&config, &["after", "the", "restart"]);
    warren.wait_for_count(" done ", 3, Duration::from_secs(20));
    assert_eq!(queue_counts(&queue).0, 0);
    warren.signal(Signal::SIGTERM);
    assert!(warren.wait_exit(Duration::from_secs(10)).success());
}
