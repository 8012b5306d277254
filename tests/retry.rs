//! Bounded retries through the real `warren run` binary. A `command` program sees its attempt in
//! `WARREN_ATTEMPT`; exit status 75 (or any other failure: an exit status, a signal, a timeout)
//! sends the message to a retry queue for a growing delay, from which it comes back as the next
//! attempt; after the last attempt, or at once on exit status 65, it goes to the dead-letter queue
//! with its original body and properties and headers that say why. A task that outlives
//! `handler.timeout` has its whole process group stopped, SIGTERM first and SIGKILL after
//! `handler.kill_grace`. On a quorum queue the broker counts deliveries too, so that even a
//! message that kills warren itself every time ends in the dead-letter queue.

mod util;

use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::time::{Duration, Instant};

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use util::{
    assert_dead_letter_headers, assert_dead_lettered, publish_confirmed, queue_counts, take_only,
    wait_gone, wait_until, BrokerLock, ConfigFile, Queues, Warren,
};
use warren::amqp::Header;

const WAIT: Duration = Duration::from_secs(20);

/// The type (classic, quorum) of `queue`, as the broker reports it.
fn queue_type(queue: &str) -> String {
    let out = util::rabbitmqctl(&["list_queues", "-q", "--no-table-headers", "name", "type"]);
    out.lines()
        .find_map(|line| {
            let (name, kind) = line.split_once('\t')?;
            (name == queue).then(|| kind.trim().to_string())
        })
        .unwrap_or_else(|| panic!("queue {queue} is not in rabbitmqctl list_queues"))
}

/// A config for `queue` with one worker and the retries of [`ConfigFile::fast_retries`]; the
/// caller adds the handler.
fn config(queue: &str) -> ConfigFile {
    ConfigFile::new(queue).workers(1).fast_retries()
}

/// Starts a one-worker warren with `config` and waits until it consumes `queue` (by then it has
/// declared every queue around it).
fn start(config: &Path, queue: &str) -> Warren {
    let warren = Warren::run(config, &[]);
    warren.wait_consuming(queue, 1);
    warren
}

/// The first word of each line the test's scripts recorded in `name`.
fn first_words(broker: &BrokerLock, name: &str) -> Vec<String> {
    util::recorded(&broker.dir.path().join(name))
        .iter()
        .map(|line| line.split_whitespace().next().unwrap_or("").to_string())
        .collect()
}

/// How long the attempt of a `failed` log line took ("... after 1.00s: ...").
fn took(line: &str) -> Duration {
    let text = line
        .split_once(") after ")
        .and_then(|(_, rest)| rest.split_once(':'))
        .map(|(took, _)| took)
        .unwrap_or_else(|| panic!("no duration in {line:?}"));
    let (number, unit) = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .map(|i| text.split_at(i))
        .unwrap_or_else(|| panic!("no unit in {text:?}"));
    let number: f64 = number.parse().unwrap_or_else(|e| panic!("{text:?}: {e}"));
    let seconds = match unit {
        "s" => number,
        "ms" => number / 1e3,
        "µs" => number / 1e6,
        "ns" => number / 1e9,
        _ => panic!("unknown unit in {text:?}"),
    };
    Duration::from_secs_f64(seconds)
}

#[test]
fn a_program_that_exits_75_is_retried_with_growing_delays_until_it_succeeds() {
    let broker = BrokerLock::shared();
    let queues = Queues::new(&broker, "tempfail");
    let script = broker.script_in_dir(
        "tempfail",
        "cat > /dev/null\n\
         echo \"$WARREN_ATTEMPT $(date +%s%N)\" >> \"$DIR/$WARREN_MESSAGE_ID.runs\"\n\
         [ \"$WARREN_ATTEMPT\" -ge 3 ] && exit 0\n\
         exit 75",
    );
    let config = config(&queues.work)
        .command(&script)
        .write_in(broker.dir.path());
    let warren = start(&config, &queues.work);
    publish_confirmed(&queues.work, &[("tempfail-1", b"try again")], WAIT);
    warren.wait_for_log(" done tempfail-1 ", WAIT);

    let runs = util::recorded(&broker.dir.path().join("tempfail-1.runs"));
    let runs: Vec<(String, u128)> = runs
        .iter()
        .map(|line| {
            let (attempt, nanos) = line.split_once(' ').expect("attempt and time");
            (attempt.to_string(), nanos.parse().expect("nanoseconds"))
        })
        .collect();
    assert_eq!(
        runs.iter().map(|(a, _)| a.as_str()).collect::<Vec<_>>(),
        ["1", "2", "3"],
        "WARREN_ATTEMPT counts the runs"
    );
    let gap = |i: usize| Duration::from_nanos((runs[i + 1].1 - runs[i].1) as u64);
    assert!(
        gap(0) >= Duration::from_millis(100),
        "the second attempt waited the first delay of 100ms, not {:?}",
        gap(0)
    );
    assert!(
        gap(1) >= Duration::from_millis(200),
        "the third attempt waited the doubled delay of 200ms, not {:?}",
        gap(1)
    );

    let failed = warren.lines_with(" failed tempfail-1 ");
    assert_eq!(failed.len(), 2, "two failures: {failed:#?}");
    assert!(
        failed[0].contains("(attempt 1 of 3)")
            && failed[0].ends_with(": exit status 75 (asked for a retry); retrying in 100ms"),
        "{}",
        failed[0]
    );
    assert!(
        failed[1].contains("(attempt 2 of 3)")
            && failed[1].ends_with(": exit status 75 (asked for a retry); retrying in 200ms"),
        "{}",
        failed[1]
    );
    warren.wait_for_log(" received tempfail-1 (attempt 3) ", WAIT);
    queues.wait_settled(0);
    warren.stop(WAIT);
    assert_eq!(
        first_words(&broker, "tempfail-1.runs").len(),
        3,
        "the acked message did not run again"
    );
}

#[test]
fn a_program_that_always_fails_is_dead_lettered_after_max_attempts_with_headers_that_say_why() {
    let broker = BrokerLock::shared();
    let queues = Queues::new(&broker, "doomed");
    let script = broker.script_in_dir(
        "doomed",
        "cat > /dev/null\necho \"$WARREN_ATTEMPT\" >> \"$DIR/runs\"\nexit 3",
    );
    let config = config(&queues.work)
        .command(&script)
        .write_in(broker.dir.path());
    let warren = start(&config, &queues.work);
    publish_confirmed(&queues.work, &[("doomed-1", b"the original body")], WAIT);

    let last = warren.wait_for_log(" failed doomed-1 (attempt 3 of 3)", WAIT);
    assert!(
        last.ends_with(&format!(
            ": exit status 3; failed all 3 attempts: dead-lettered to {}",
            queues.dead
        )),
        "{last}"
    );
    queues.wait_settled(1);
    assert_eq!(
        first_words(&broker, "runs"),
        ["1", "2", "3"],
        "exactly max_attempts runs"
    );

    assert_dead_lettered(
        &queues,
        "doomed-1",
        b"the original body",
        "failed all 3 attempts",
        "exit status 3",
        3,
    );
    warren.stop(WAIT);
}

#[test]
fn a_program_that_exits_65_is_dead_lettered_at_once() {
    let broker = BrokerLock::shared();
    let queues = Queues::new(&broker, "reject");
    let script = broker.script_in_dir(
        "reject",
        "cat > /dev/null\necho \"$WARREN_ATTEMPT\" >> \"$DIR/runs\"\nexit 65",
    );
    let config = config(&queues.work)
        .command(&script)
        .write_in(broker.dir.path());
    let warren = start(&config, &queues.work);
    publish_confirmed(&queues.work, &[("reject-1", b"malformed")], WAIT);

    let line = warren.wait_for_log(" rejected reject-1 ", WAIT);
    assert!(
        line.ends_with(&format!(
            ": exit status 65; dead-lettered to {}",
            queues.dead
        )),
        "{line}"
    );
    queues.wait_settled(1);
    assert_eq!(first_words(&broker, "runs"), ["1"], "it ran once");
    assert!(warren.lines_with(" failed reject-1 ").is_empty());

    assert_dead_lettered(
        &queues,
        "reject-1",
        b"malformed",
        "rejected by the handler",
        "exit status 65",
        1,
    );
    warren.stop(WAIT);
}

#[test]
fn a_task_past_its_timeout_gets_sigterm_with_its_whole_process_group_and_is_retried() {
    let broker = BrokerLock::shared();
    let queues = Queues::new(&broker, "timeout");
    // The grandchild shares the task's process group; only a signal to the group reaches it.
    let script = broker.script_in_dir(
        "slow",
        "cat > /dev/null\n\
         echo \"$WARREN_ATTEMPT\" >> \"$DIR/runs\"\n\
         sleep 60 &\n\
         echo $! >> \"$DIR/grandchildren\"\n\
         wait",
    );
    // A kill_grace longer than the wait below: the tasks must end by SIGTERM, not SIGKILL.
    let config = config(&queues.work)
        .command(&script)
        .set("handler.timeout", "1s")
        .set("handler.kill_grace", "30s")
        .write_in(broker.dir.path());
    let warren = start(&config, &queues.work);
    publish_confirmed(&queues.work, &[("slow-1", b"takes a minute")], WAIT);

    warren.wait_for_log(" failed slow-1 (attempt 3 of 3)", WAIT);
    queues.wait_settled(1);
    assert_eq!(first_words(&broker, "runs"), ["1", "2", "3"]);
    let failed = warren.lines_with(" failed slow-1 ");
    assert_eq!(failed.len(), 3, "{failed:#?}");
    for line in &failed {
        assert!(line.contains(": timed out after 1s; "), "{line}");
        let took = took(line);
        assert!(
            took >= Duration::from_millis(950) && took < Duration::from_secs(10),
            "SIGTERM ended the task soon after the 1s timeout, not after {took:?}: {line}"
        );
    }
    assert_eq!(
        warren
            .lines_with("ran past handler.timeout (1s); sending SIGTERM to its process group")
            .len(),
        3
    );
    assert!(
        warren.lines_with("sending SIGKILL").is_empty(),
        "SIGTERM sufficed"
    );
    let grandchildren = util::recorded(&broker.dir.path().join("grandchildren"));
    assert_eq!(grandchildren.len(), 3);
    for pid in &grandchildren {
        wait_gone(pid, Duration::from_secs(5));
    }

    let dead = take_only(&queues.dead);
    assert_eq!(dead.message_id.as_deref(), Some("slow-1"));
    assert_dead_letter_headers(
        &dead,
        &queues.work,
        "failed all 3 attempts",
        "timed out after 1s",
        3,
    );
    warren.stop(WAIT);
}

#[test]
fn a_task_that_ignores_sigterm_is_killed_with_its_group_after_the_kill_grace() {
    let broker = BrokerLock::shared();
    let queues = Queues::new(&broker, "stubborn");
    // The first attempt ignores SIGTERM, and so does its grandchild, which inherits that.
    let script = broker.script_in_dir(
        "stubborn",
        "cat > /dev/null\n\
         echo \"$WARREN_ATTEMPT\" >> \"$DIR/runs\"\n\
         [ \"$WARREN_ATTEMPT\" -ge 2 ] && exit 0\n\
         trap '' TERM\n\
         sleep 60 &\n\
         echo $! > \"$DIR/grandchild\"\n\
         wait\n\
         sleep 60",
    );
    let config = config(&queues.work)
        .command(&script)
        .set("handler.timeout", "1s")
        .set("handler.kill_grace", "1s")
        .write_in(broker.dir.path());
    let warren = start(&config, &queues.work);
    publish_confirmed(&queues.work, &[("stubborn-1", b"ignores TERM")], WAIT);

    let failed = warren.wait_for_log(" failed stubborn-1 ", WAIT);
    assert!(
        failed.contains("(attempt 1 of 3)")
            && failed.ends_with(": timed out after 1s; retrying in 100ms"),
        "{failed}"
    );
    let took = took(&failed);
    assert!(
        took >= Duration::from_millis(1900) && took < Duration::from_secs(10),
        "the task ended by SIGKILL after timeout + kill_grace (2s), not after {took:?}"
    );
    warren.wait_for_log("ran past handler.timeout (1s); sending SIGTERM", WAIT);
    warren.wait_for_log("outlived handler.kill_grace; sending SIGKILL", WAIT);
    let grandchild = util::recorded(&broker.dir.path().join("grandchild"));
    assert_eq!(grandchild.len(), 1);
    wait_gone(&grandchild[0], Duration::from_secs(5));

    warren.wait_for_log(" done stubborn-1 ", WAIT);
    assert_eq!(first_words(&broker, "runs"), ["1", "2"]);
    queues.wait_settled(0);
    warren.stop(WAIT);
}

#[test]
fn a_dots_task_longer_than_the_timeout_fails_after_the_timeout_not_after_its_work() {
    let broker = BrokerLock::shared();
    let queues = Queues::new(&broker, "dots-timeout");
    let config = config(&queues.work)
        .dots()
        .set("handler.timeout", "1s")
        .write_in(broker.dir.path());
    let warren = start(&config, &queues.work);
    publish_confirmed(
        &queues.work,
        &[(
            "dots-1",
            b"a minute of work...........................................................",
        )],
        WAIT,
    );

    warren.wait_for_log(" failed dots-1 (attempt 3 of 3)", WAIT);
    queues.wait_settled(1);
    let failed = warren.lines_with(" failed dots-1 ");
    assert_eq!(failed.len(), 3, "{failed:#?}");
    for line in &failed {
        assert!(line.contains(": timed out after 1s; "), "{line}");
        let took = took(line);
        assert!(
            took >= Duration::from_millis(950) && took < Duration::from_secs(3),
            "the dots task stopped at its 1s timeout, not after {took:?}"
        );
    }
    assert!(warren.lines_with(" done dots-1 ").is_empty());
    let dead = take_only(&queues.dead);
    assert_dead_letter_headers(
        &dead,
        &queues.work,
        "failed all 3 attempts",
        "timed out after 1s",
        3,
    );
    warren.stop(WAIT);
}

#[test]
fn on_a_quorum_queue_a_failing_message_is_dead_lettered_by_warren_after_max_attempts() {
    let broker = BrokerLock::shared();
    let queues = Queues::new(&broker, "quorum-fail");
    let script = broker.script_in_dir(
        "fail",
        "cat > /dev/null\necho \"$WARREN_ATTEMPT\" >> \"$DIR/runs\"\nexit 3",
    );
    let config = config(&queues.work)
        .quorum()
        .command(&script)
        .write_in(broker.dir.path());
    let warren = start(&config, &queues.work);
    for queue in [
        &queues.work,
        &queues.retries[0],
        &queues.retries[1],
        &queues.dead,
    ] {
        assert_eq!(queue_type(queue), "quorum", "{queue} is replicated");
    }
    publish_confirmed(
        &queues.work,
        &[("quorum-fail-1", b"fails on a quorum queue")],
        WAIT,
    );

    warren.wait_for_log(" failed quorum-fail-1 (attempt 3 of 3)", WAIT);
    queues.wait_settled(1);
    assert_eq!(first_words(&broker, "runs"), ["1", "2", "3"]);
    assert_dead_lettered(
        &queues,
        "quorum-fail-1",
        b"fails on a quorum queue",
        "failed all 3 attempts",
        "exit status 3",
        3,
    );
    warren.stop(WAIT);
}

#[test]
fn on_a_quorum_queue_a_message_that_kills_warren_every_time_is_dead_lettered_by_the_broker() {
    let broker = BrokerLock::shared();
    let queues = Queues::new(&broker, "quorum-crash");
    // The program is spawned directly by warren, so its parent is warren itself.
    let script = broker.script_in_dir(
        "crash",
        "cat > /dev/null\n\
         echo \"$WARREN_ATTEMPT $WARREN_REDELIVERED $PPID\" >> \"$DIR/runs\"\n\
         kill -9 $PPID",
    );
    let config = config(&queues.work)
        .quorum()
        .command(&script)
        .write_in(broker.dir.path());
    let runs_file = broker.dir.path().join("runs");

    let mut started = 0;
    let mut pids = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(45);
    while started == 0 || queue_counts(&queues.dead).0 == 0 {
        assert!(
            started < 3,
            "the message was delivered {started} times (max_attempts is 3) and is still not \
             dead-lettered"
        );
        assert!(Instant::now() < deadline, "the restarts took too long");
        let mut warren = Warren::run(&config, &[]);
        if started == 0 {
            warren.wait_consuming(&queues.work, 1);
            publish_confirmed(&queues.work, &[("crash-1", b"kills warren")], WAIT);
        }
        started += 1;
        let status = warren.wait_exit(WAIT);
        assert_eq!(
            status.signal(),
            Some(9),
            "warren run {started} was killed by its task: {status}"
        );
        pids.push(warren.pid().to_string());
        assert_eq!(
            util::recorded(&runs_file).len(),
            started,
            "the task ran once per start of warren"
        );
        // The broker returns the message to the queue, or dead-letters it on the last delivery.
        wait_until(
            WAIT,
            "the broker to requeue or dead-letter the message",
            || queue_counts(&queues.work).0 == 1 || queue_counts(&queues.dead).0 == 1,
        );
    }

    let runs: Vec<Vec<String>> = util::recorded(&runs_file)
        .iter()
        .map(|l| l.split_whitespace().map(str::to_string).collect())
        .collect();
    assert_eq!(runs.len(), 3, "max_attempts deliveries: {runs:?}");
    for (i, run) in runs.iter().enumerate() {
        assert_eq!(
            run[0],
            (i + 1).to_string(),
            "WARREN_ATTEMPT counts the broker's deliveries: {runs:?}"
        );
        assert_eq!(run[1], if i == 0 { "0" } else { "1" }, "WARREN_REDELIVERED");
        assert_eq!(run[2], pids[i], "the task's parent ($PPID) was warren");
    }
    queues.wait_settled(1);
    let dead = take_only(&queues.dead);
    assert_eq!(dead.body, b"kills warren");
    assert_eq!(dead.message_id.as_deref(), Some("crash-1"));
    assert!(
        matches!(dead.header("x-death"), Some(Header::Other(_))),
        "the broker dead-lettered it, with its x-death header: {:?}",
        dead.headers
    );
    assert!(
        dead.header("x-warren-reason").is_none(),
        "warren never got to dead-letter it: {:?}",
        dead.headers
    );
}

/// Runs the quorum-queue message `id` once under a warren that is SIGKILLed while the task runs,
/// then under a second warren until it is done; the program exits with `second` on attempt 2
/// and 0 after that. Returns the attempts the program saw.
fn attempts_after_a_crash(
    broker: &BrokerLock,
    queues: &Queues,
    id: &str,
    second: u8,
) -> Vec<String> {
    let script = broker.script_in_dir(
        "crash-once",
        &format!(
            "cat > /dev/null\n\
             echo \"$WARREN_ATTEMPT\" >> \"$DIR/runs\"\n\
             case \"$WARREN_ATTEMPT\" in\n\
             1) echo $$ > \"$DIR/task\"; exec sleep 60 ;;\n\
             2) exit {second} ;;\n\
             esac\n\
             exit 0"
        ),
    );
    let config = config(&queues.work)
        .quorum()
        .command(&script)
        .write_in(broker.dir.path());
    let mut first = start(&config, &queues.work);
    publish_confirmed(&queues.work, &[(id, b"interrupted")], WAIT);
    let task = broker.dir.path().join("task");
    wait_until(WAIT, "the first attempt to start", || {
        util::recorded(&task).len() == 1
    });
    first.signal(Signal::SIGKILL);
    first.wait_exit(WAIT);
    // The task outlives warren in its own process group; it is of no further use.
    let pgid: i32 = util::recorded(&task)[0].parse().expect("a pid");
    let _ = killpg(Pid::from_raw(pgid), Signal::SIGKILL);

    let second = start(&config, &queues.work);
    second.wait_for_log(&format!(" done {id} "), WAIT);
    queues.wait_settled(0);
    second.stop(WAIT);
    first_words(broker, "runs")
}

#[test]
fn on_a_quorum_queue_a_delivery_lost_with_warren_counts_as_an_attempt() {
    let broker = BrokerLock::shared();
    let queues = Queues::new(&broker, "quorum-count");
    assert_eq!(
        attempts_after_a_crash(&broker, &queues, "count-1", 0),
        ["1", "2"],
        "the redelivery after warren's SIGKILL is attempt 2"
    );
}

#[test]
fn on_a_quorum_queue_a_retry_after_a_lost_delivery_is_the_next_attempt_not_counted_twice() {
    let broker = BrokerLock::shared();
    let queues = Queues::new(&broker, "quorum-recount");
    assert_eq!(
        attempts_after_a_crash(&broker, &queues, "recount-1", 75),
        ["1", "2", "3"],
        "attempt 1 was lost with warren, attempt 2 exited 75, so the copy from the retry queue \
         is attempt 3"
    );
}
