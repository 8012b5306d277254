//! The Work Queues tutorial end to end: `warren publish` the tutorial's five messages, `warren
//! run` two workers with the `dots` handler, and check what the broker and the log saw; and
//! `warren run -v`, which prints each task's lines as the tutorial's worker does.

mod util;

use std::time::Duration;

use nix::sys::signal::Signal;
use util::{publish_ok, queue_counts, ready_and_unacked, BrokerLock, ConfigFile, Warren};

const TUTORIAL: [&str; 5] = [
    "First message.",
    "Second message..",
    "Third message...",
    "Fourth message....",
    "Fifth message.....",
];

#[test]
fn the_tutorial_messages_are_all_processed_and_spread_over_both_workers() {
    let broker = BrokerLock::shared();
    let queue = broker.queue("tutorial");
    let config = ConfigFile::new(&queue)
        .workers(2)
        .dots()
        .write_in(broker.dir.path());
    publish_ok(&config, &TUTORIAL);
    assert_eq!(
        queue_counts(&queue).0,
        5,
        "all five messages wait in the queue"
    );

    let mut warren = Warren::run(&config, &[]);
    warren.wait_for_count(" done ", 5, Duration::from_secs(30));
    let (ready, unacked) = ready_and_unacked(&queue);
    assert_eq!(
        (ready, unacked),
        (0, 0),
        "the queue ends empty, with nothing unacked"
    );

    let done = warren.lines_with(" done ");
    for worker in ["worker-1 done", "worker-2 done"] {
        assert!(
            done.iter().any(|l| l.contains(worker)),
            "{worker} did some of the work: {done:#?}"
        );
    }
    for message in TUTORIAL {
        assert_eq!(
            warren.lines_with(&format!("\"{message}\"")).len(),
            1,
            "{message} was received once"
        );
    }
    warren.signal(Signal::SIGTERM);
    assert!(warren.wait_exit(Duration::from_secs(10)).success());
}

#[test]
fn a_busy_worker_is_not_handed_a_second_message_while_another_is_free() {
    let broker = BrokerLock::shared();
    let queue = broker.queue("fair");
    let config = ConfigFile::new(&queue)
        .workers(2)
        .prefetch(1)
        .dots()
        .write_in(broker.dir.path());
    let warren = Warren::run(&config, &[]);
    warren.wait_consuming(&queue, 2);

    // A long task first; while it runs, three short ones must all go to the other worker.
    publish_ok(&config, &["long......"]);
    let long = warren.wait_for_log("received", Duration::from_secs(10));
    let busy = long
        .split_whitespace()
        .find(|w| w.starts_with("worker-"))
        .unwrap()
        .to_string();
    publish_ok(&config, &["short", "short", "short"]);
    warren.wait_for_count("\"short\"", 3, Duration::from_secs(10));
    warren.wait_for_count(" done ", 3, Duration::from_secs(10));

    let short = warren.lines_with("\"short\"");
    assert!(
        short.iter().all(|l| !l.contains(&format!("{busy} "))),
        "{busy} was busy yet got a short task: {short:#?}"
    );
    assert!(
        warren.lines_with(&format!("{busy} done")).is_empty(),
        "the long task is still running"
    );
}

#[test]
fn on_a_terminal_warren_says_it_is_waiting_for_messages() {
    let broker = BrokerLock::shared();
    let queue = broker.queue("terminal");
    let config = ConfigFile::new(&queue)
        .workers(1)
        .dots()
        .write_in(broker.dir.path());
    // script(1) runs warren on a pseudo-terminal and copies what it prints to our stderr pipe.
    let command = format!("{} run --config {}", util::warren_bin(), config.display());
    let warren = Warren::spawn(std::process::Command::new("sh").args([
        "-c",
        "exec script -qfec \"$0\" /dev/null >&2",
        &command,
    ]));
    warren.wait_for_log(
        " [*] Waiting for messages. To exit press CTRL+C",
        Duration::from_secs(10),
    );
    warren.wait_consuming(&queue, 1);
    // Dropping `warren` kills script(1), which hangs up the terminal: warren gets SIGHUP, and on
    // a terminal that stops it (elsewhere SIGHUP reloads the configuration).
    drop(warren);
    util::wait_until(
        Duration::from_secs(10),
        "warren to stop at the hangup",
        || util::queue_counts(&queue).1 == 0,
    );
}

#[test]
fn run_verbose_logs_each_task_received_and_done_as_the_tutorial_worker_prints_them() {
    let broker = BrokerLock::shared();
    let queue = broker.queue("verbose");
    let config = ConfigFile::new(&queue)
        .workers(1)
        .dots()
        .write_in(broker.dir.path());
    // With RUST_LOG empty, the default filter, as for an operator who sets nothing. Each run
    // does one task and stops, so that its log is complete when it is read.
    let run = |args: &[&str], body: &str| {
        let mut command = std::process::Command::new(util::warren_bin());
        command.args(["run", "--config", config.to_str().unwrap()]);
        let mut warren = Warren::spawn(command.args(args).env("RUST_LOG", ""));
        warren.wait_consuming(&queue, 1);
        publish_ok(&config, &[body]);
        util::wait_until(Duration::from_secs(10), "the task to be done", || {
            ready_and_unacked(&queue) == (0, 0)
        });
        warren.signal(Signal::SIGTERM);
        assert!(warren.wait_exit(Duration::from_secs(10)).success());
        warren.log()
    };

    let quiet = run(&[], "quiet.");
    assert!(
        !quiet
            .iter()
            .any(|l| l.contains("received") || l.contains(" done ")),
        "without -v no line per task: {quiet:#?}"
    );

    let verbose = run(&["-v"], "loud.");
    let received = verbose
        .iter()
        .find(|l| l.contains("worker-1 received "))
        .unwrap_or_else(|| panic!("no received line: {verbose:#?}"));
    assert!(
        received.contains("(attempt 1)") && received.ends_with("\"loud.\""),
        "{received}"
    );
    assert!(
        verbose.iter().any(|l| l.contains("worker-1 done ")),
        "no done line: {verbose:#?}"
    );
    // Only the task lines: the rest of warren's debug lines stay hidden.
    assert!(
        !verbose.iter().any(|l| l.contains("consuming queue")),
        "-v shows other debug lines: {verbose:#?}"
    );
}
