//! The `command` handler through the real `warren run` binary: the message body reaches the
//! program's stdin byte for byte and never passes through a shell; the program sees the message
//! id, queue, redelivery flag and worker number in its environment; exit status 0 acks the
//! message while a non-zero exit or a death by signal retries it as the next attempt; and the
//! program's stdout and stderr end up in warren's log, prefixed with the worker.

mod util;

use std::fs;
use std::time::Duration;

use util::{ready_and_unacked, wait_until, BrokerLock, ConfigFile, Warren};

const WAIT: Duration = Duration::from_secs(20);
/// How long warren may take to stop after SIGTERM.
const STOP: Duration = Duration::from_secs(15);

/// Declares `queue` as warren does and publishes each `(message id, body)` with the library's
/// publisher, returning once the broker has confirmed every one.
fn publish_bodies(queue: &str, messages: &[(&str, &[u8])]) {
    util::declare_durable(queue);
    util::publish_confirmed(queue, messages, Duration::from_secs(10));
}

/// Waits until the broker holds nothing of `queue`: no ready and no unacked message.
fn wait_until_settled(queue: &str) {
    wait_until(
        WAIT,
        &format!("{queue} to hold 0 ready and 0 unacked"),
        || ready_and_unacked(queue) == (0, 0),
    );
}

#[test]
fn the_body_arrives_on_stdin_byte_for_byte_and_is_never_run_by_a_shell() {
    let broker = BrokerLock::shared();
    let queue = broker.queue("stdin");
    let marker = broker.dir.path().join("pwned");
    let m = marker.display();
    let binary: Vec<u8> = (0..1 << 20).map(|i| i as u8).collect();
    // A shell that ran this body would create the marker (on the first line already); the
    // unbalanced quotes come last so that a shell's syntax error cannot hide the lines before.
    let meta = format!(
        "$(touch {m}) ; touch {m} && `touch {m}` | touch {m} > {m} < /dev/null\n\
         ;touch {m}\n\
         * ? \\ $HOME ${{IFS}} !! # ~ & %s %n {{a,b}} [x] | touch {m}\n\
         it's \"unbalanced; touch {m}"
    );
    let messages: [(&str, &[u8]); 3] = [
        ("binary", &binary),
        ("meta", meta.as_bytes()),
        ("empty", b""),
    ];

    let script = broker.script_in_dir("record", "cat > \"$DIR/$WARREN_MESSAGE_ID.body\"");
    let config = ConfigFile::new(&queue)
        .workers(2)
        .command(&script)
        .write_in(broker.dir.path());
    publish_bodies(&queue, &messages);
    let warren = Warren::run(&config, &[]);
    for (id, _) in &messages {
        warren.wait_for_log(&format!(" done {id} "), WAIT);
    }

    for (id, body) in &messages {
        let path = broker.dir.path().join(format!("{id}.body"));
        let got = fs::read(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
        assert!(
            got == *body,
            "message {id}: the program read {} bytes, not the {} bytes published (first \
             difference at byte {:?})",
            got.len(),
            body.len(),
            got.iter().zip(body.iter()).position(|(a, b)| a != b)
        );
    }
    assert!(
        !marker.exists(),
        "the body's shell metacharacters were executed: {} exists",
        marker.display()
    );
    assert!(
        warren.lines_with(" failed ").is_empty(),
        "no task failed: {:#?}",
        warren.lines_with(" failed ")
    );
    wait_until_settled(&queue);
    warren.stop(STOP);
}

#[test]
fn the_program_sees_the_message_id_queue_redelivered_flag_and_worker_in_its_environment() {
    let broker = BrokerLock::shared();
    let queue = broker.queue("env");
    let workers = 3;
    let script = broker.script_in_dir(
        "env",
        "cat > /dev/null\n\
         printf 'id=%s\\nqueue=%s\\nredelivered=%s\\nworker=%s\\n' \"$WARREN_MESSAGE_ID\" \
         \"$WARREN_QUEUE\" \"$WARREN_REDELIVERED\" \"$WARREN_WORKER\" > \"$DIR/$WARREN_MESSAGE_ID.env\"",
    );
    let config = ConfigFile::new(&queue)
        .workers(workers)
        .command(&script)
        .write_in(broker.dir.path());
    let warren = Warren::run(&config, &[]);
    warren.wait_consuming(&queue, workers as u32);

    let ids: Vec<String> = (1..=6)
        .map(|i| format!("env-{i}-{}", fastrand::u32(..)))
        .collect();
    let messages: Vec<(&str, &[u8])> = ids.iter().map(|id| (id.as_str(), &b"x"[..])).collect();
    publish_bodies(&queue, &messages);

    for id in &ids {
        let done = warren.wait_for_log(&format!(" done {id} "), WAIT);
        let path = broker.dir.path().join(format!("{id}.env"));
        let text =
            fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
        let value = |key: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(&format!("{key}=")))
                .unwrap_or_else(|| panic!("no {key}= in {text:?}"))
                .to_string()
        };
        assert_eq!(value("id"), *id, "WARREN_MESSAGE_ID");
        assert_eq!(value("queue"), queue, "WARREN_QUEUE");
        assert_eq!(
            value("redelivered"),
            "0",
            "WARREN_REDELIVERED on a first delivery"
        );
        let worker: usize = value("worker")
            .parse()
            .unwrap_or_else(|e| panic!("WARREN_WORKER {:?}: {e}", value("worker")));
        assert!(
            (1..=workers).contains(&worker),
            "WARREN_WORKER {worker} is not in 1..={workers}"
        );
        assert!(
            done.contains(&format!("worker-{worker} done {id} ")),
            "WARREN_WORKER={worker} names the worker that logged the task: {done}"
        );
    }
    wait_until_settled(&queue);
    warren.stop(STOP);
}

#[test]
fn a_program_that_exits_zero_has_its_message_acked() {
    let broker = BrokerLock::shared();
    let queue = broker.queue("exit0");
    let script = broker.script_in_dir(
        "ok",
        "cat > /dev/null\necho run >> \"$DIR/$WARREN_MESSAGE_ID.runs\"\nexit 0",
    );
    let config = ConfigFile::new(&queue)
        .workers(1)
        .command(&script)
        .write_in(broker.dir.path());
    publish_bodies(&queue, &[("ok-1", b"work")]);
    let warren = Warren::run(&config, &[]);

    warren.wait_for_log(" done ok-1 ", WAIT);
    wait_until_settled(&queue);
    warren.stop(STOP);
    // Acked, so not requeued when warren's connections close: the queue stays empty.
    assert_eq!(ready_and_unacked(&queue), (0, 0), "the message was acked");
    assert_eq!(
        util::recorded(&broker.dir.path().join("ok-1.runs")),
        ["run"],
        "the program ran exactly once"
    );
}

/// Runs a one-worker warren whose program fails its first attempt at the message with `fail`
/// (shell code) and succeeds on the second; returns the log line of the failure.
fn fails_once_then_succeeds(broker: &BrokerLock, what: &str, fail: &str) -> String {
    let queue = broker.queue(what);
    let script = broker.script_in_dir(
        what,
        &format!(
            "cat > /dev/null\n\
             echo \"$WARREN_ATTEMPT\" >> \"$DIR/$WARREN_MESSAGE_ID.runs\"\n\
             if [ \"$WARREN_ATTEMPT\" = 1 ]; then {fail}; fi\n\
             exit 0"
        ),
    );
    let config = ConfigFile::new(&queue)
        .workers(1)
        .command(&script)
        .write_in(broker.dir.path());
    let id = format!("{what}-1");
    publish_bodies(&queue, &[(&id, b"try me")]);
    let warren = Warren::run(&config, &[]);

    let failed = warren.wait_for_log(&format!(" failed {id} "), WAIT);
    assert!(
        failed.contains("(attempt 1 of 5)") && failed.ends_with("; retrying in 1s"),
        "the failure says the message will be retried: {failed}"
    );
    warren.wait_for_log(&format!(" received {id} (attempt 2) "), WAIT);
    warren.wait_for_log(&format!(" done {id} "), WAIT);
    assert_eq!(
        util::recorded(&broker.dir.path().join(format!("{id}.runs"))),
        ["1", "2"],
        "the program ran twice: first with WARREN_ATTEMPT=1, then with 2"
    );
    assert_eq!(
        warren.lines_with(&format!(" received {id}")).len(),
        2,
        "received once, then once more from the retry queue"
    );
    wait_until_settled(&queue);
    warren.stop(STOP);
    assert_eq!(ready_and_unacked(&queue), (0, 0), "the retry was acked");
    assert_eq!(ready_and_unacked(&format!("{queue}.retry.1s")), (0, 0));
    failed
}

#[test]
fn a_program_that_exits_non_zero_has_its_message_retried() {
    let broker = BrokerLock::shared();
    let failed = fails_once_then_succeeds(&broker, "exit3", "exit 3");
    assert!(
        failed.contains(": exit status 3; retrying"),
        "the log gives the exit status: {failed}"
    );
}

#[test]
fn a_program_killed_by_a_signal_has_its_message_retried() {
    let broker = BrokerLock::shared();
    let failed = fails_once_then_succeeds(&broker, "kill9", "kill -9 $$");
    assert!(
        failed.contains(": killed by signal 9 (SIGKILL); retrying"),
        "the log names the signal: {failed}"
    );
}

#[test]
fn the_programs_stdout_and_stderr_appear_in_the_log_prefixed_with_the_worker() {
    let broker = BrokerLock::shared();
    let queue = broker.queue("output");
    let script = broker.script(
        "talk",
        "cat > /dev/null\n\
         echo \"hello from $WARREN_MESSAGE_ID\"\n\
         echo \"second line\"\n\
         echo \"oops from $WARREN_MESSAGE_ID\" >&2",
    );
    let config = ConfigFile::new(&queue)
        .workers(1)
        .command(&script)
        .write_in(broker.dir.path());
    publish_bodies(&queue, &[("out-1", b"speak")]);
    let warren = Warren::run(&config, &[]);
    warren.wait_for_log(" done out-1 ", WAIT);

    let log = warren.log();
    let position = |suffix: &str| {
        log.iter()
            .position(|l| l.ends_with(suffix))
            .unwrap_or_else(|| panic!("no log line ends with {suffix:?}: {log:#?}"))
    };
    let hello = position("] worker-1 stdout: hello from out-1");
    let second = position("] worker-1 stdout: second line");
    let oops = position("] worker-1 stderr: oops from out-1");
    let done = log
        .iter()
        .position(|l| l.contains(" done out-1 "))
        .expect("the done line");
    assert!(hello < second, "stdout lines keep their order: {log:#?}");
    assert!(
        second < done && oops < done,
        "the task's output is logged before its done line: {log:#?}"
    );
    warren.stop(STOP);
}

#[test]
fn the_broker_url_from_the_environment_is_used_but_never_shown_to_the_program() {
    let broker = BrokerLock::shared();
    let queue = broker.queue("env-url");
    let script = broker.script_in_dir(
        "env-dump",
        "cat > /dev/null\nenv > \"$DIR/$WARREN_MESSAGE_ID.env\"",
    );
    // The file's URL leads nowhere; WARREN_BROKER_URL, which overrides it, is the real broker.
    let config = ConfigFile::new(&queue)
        .url("amqp://guest:guest@127.0.0.1:1/%2f")
        .workers(1)
        .command(&script)
        .write_in(broker.dir.path());
    publish_bodies(&queue, &[("env-url-1", b"x")]);

    let warren = Warren::spawn(
        std::process::Command::new("env")
            .arg(format!("WARREN_BROKER_URL={}", util::amqp_url()))
            .args([util::warren_bin(), "run", "--config"])
            .arg(&config),
    );
    warren.wait_for_log(" done env-url-1 ", WAIT);
    let env = fs::read_to_string(broker.dir.path().join("env-url-1.env")).unwrap();
    assert!(env.contains(&format!("WARREN_QUEUE={queue}")), "{env}");
    assert!(
        !env.contains("WARREN_BROKER_URL"),
        "the task saw the broker URL: {env}"
    );
    warren.stop(STOP);
}
