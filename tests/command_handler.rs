//! The `command` handler through the real `warren run` binary: the message body reaches the
//! program's stdin byte for byte and never passes through a shell; the program sees the message
//! id, queue, redelivery flag and worker number in its environment; exit status 0 acks the
//! message while a non-zero exit or a death by signal retries it as the next attempt; and the
//! program's stdout and stderr end up in warren's log, prefixed with the worker.

mod util;

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use util::{ready_and_unacked, wait_until, Broker, Warren};
use warren::amqp::{PublishEvent, Session};

const WAIT: Duration = Duration::from_secs(20);

/// Declares `queue` as warren does and publishes each `(message id, body)` with the library's
/// publisher, returning once the broker has confirmed every one.
fn publish_bodies(queue: &str, messages: &[(&str, &[u8])]) {
    let session = Session::open(
        &util::broker_config().broker,
        0,
        "warren command_handler test",
    )
    .expect("connect to the test broker");
    session
        .declare(&util::durable_queue(queue.to_string()))
        .expect("declare the queue");
    let mut publisher = session.publisher().expect("enable publisher confirms");
    let mut pending = BTreeSet::new();
    for (id, body) in messages {
        pending.insert(publisher.publish(queue, body, id).expect("publish"));
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while !pending.is_empty() {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(
            !left.is_zero(),
            "the broker did not confirm messages {pending:?} in time"
        );
        match publisher.next_event(left).expect("wait for confirms") {
            Some(PublishEvent::Ack {
                tag,
                multiple: true,
            }) => pending.retain(|&t| t > tag),
            Some(PublishEvent::Ack { tag, .. }) => {
                pending.remove(&tag);
            }
            Some(other) => panic!("the broker did not store a message: {other:?}"),
            None => {}
        }
    }
}

/// A config for `queue` with `workers` workers running `script` as a command handler.
fn command_config(broker: &Broker, queue: &str, workers: usize, script: &Path) -> PathBuf {
    broker.config(
        queue,
        &format!(
            "[workers]\ncount = {workers}\n\n[handler]\nkind = \"command\"\ncommand = [\"{}\"]\n",
            script.display()
        ),
    )
}

/// A script that runs `body` with `$DIR` set to the test's directory.
fn script_in_dir(broker: &Broker, name: &str, body: &str) -> PathBuf {
    let dir = broker.dir.path().display().to_string();
    assert!(
        !dir.contains('\''),
        "the temporary directory needs no quoting"
    );
    broker.script(name, &format!("DIR='{dir}'\n{body}"))
}

/// Waits until the broker holds nothing of `queue`: no ready and no unacked message.
fn wait_until_settled(queue: &str) {
    wait_until(
        WAIT,
        &format!("{queue} to hold 0 ready and 0 unacked"),
        || ready_and_unacked(queue) == (0, 0),
    );
}

/// Sends SIGTERM and checks that warren stops cleanly.
fn stop(mut warren: Warren) {
    warren.signal(Signal::SIGTERM);
    let status = warren.wait_exit(Duration::from_secs(15));
    assert!(status.success(), "warren stopped with {status}");
}

#[test]
fn the_body_arrives_on_stdin_byte_for_byte_and_is_never_run_by_a_shell() {
    let broker = Broker::shared();
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

    let script = script_in_dir(&broker, "record", "cat > \"$DIR/$WARREN_MESSAGE_ID.body\"");
    let config = command_config(&broker, &queue, 2, &script);
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
    stop(warren);
}

#[test]
fn the_program_sees_the_message_id_queue_redelivered_flag_and_worker_in_its_environment() {
    let broker = Broker::shared();
    let queue = broker.queue("env");
    let workers = 3;
    let script = script_in_dir(
        &broker,
        "env",
        "cat > /dev/null\n\
         printf 'id=%s\\nqueue=%s\\nredelivered=%s\\nworker=%s\\n' \"$WARREN_MESSAGE_ID\" \
         \"$WARREN_QUEUE\" \"$WARREN_REDELIVERED\" \"$WARREN_WORKER\" > \"$DIR/$WARREN_MESSAGE_ID.env\"",
    );
    let config = command_config(&broker, &queue, workers, &script);
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
    stop(warren);
}

#[test]
fn a_program_that_exits_zero_has_its_message_acked() {
    let broker = Broker::shared();
    let queue = broker.queue("exit0");
    let script = script_in_dir(
        &broker,
        "ok",
        "cat > /dev/null\necho run >> \"$DIR/$WARREN_MESSAGE_ID.runs\"\nexit 0",
    );
    let config = command_config(&broker, &queue, 1, &script);
    publish_bodies(&queue, &[("ok-1", b"work")]);
    let warren = Warren::run(&config, &[]);

    warren.wait_for_log(" done ok-1 ", WAIT);
    wait_until_settled(&queue);
    stop(warren);
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
fn fails_once_then_succeeds(broker: &Broker, what: &str, fail: &str) -> String {
    let queue = broker.queue(what);
    let script = script_in_dir(
        broker,
        what,
        &format!(
            "cat > /dev/null\n\
             echo \"$WARREN_ATTEMPT\" >> \"$DIR/$WARREN_MESSAGE_ID.runs\"\n\
             if [ \"$WARREN_ATTEMPT\" = 1 ]; then {fail}; fi\n\
             exit 0"
        ),
    );
    let config = command_config(broker, &queue, 1, &script);
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
    stop(warren);
    assert_eq!(ready_and_unacked(&queue), (0, 0), "the retry was acked");
    assert_eq!(ready_and_unacked(&format!("{queue}.retry.1s")), (0, 0));
    failed
}

#[test]
fn a_program_that_exits_non_zero_has_its_message_retried() {
    let broker = Broker::shared();
    let failed = fails_once_then_succeeds(&broker, "exit3", "exit 3");
    assert!(
        failed.contains(": exit status 3; retrying"),
        "the log gives the exit status: {failed}"
    );
}

#[test]
fn a_program_killed_by_a_signal_has_its_message_retried() {
    let broker = Broker::shared();
    let failed = fails_once_then_succeeds(&broker, "kill9", "kill -9 $$");
    assert!(
        failed.contains(": killed by signal 9 (SIGKILL); retrying"),
        "the log names the signal: {failed}"
    );
}

#[test]
fn the_programs_stdout_and_stderr_appear_in_the_log_prefixed_with_the_worker() {
    let broker = Broker::shared();
    let queue = broker.queue("output");
    let script = broker.script(
        "talk",
        "cat > /dev/null\n\
         echo \"hello from $WARREN_MESSAGE_ID\"\n\
         echo \"second line\"\n\
         echo \"oops from $WARREN_MESSAGE_ID\" >&2",
    );
    let config = command_config(&broker, &queue, 1, &script);
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
    stop(warren);
}

#[test]
fn the_broker_url_from_the_environment_is_used_but_never_shown_to_the_program() {
    let broker = Broker::shared();
    let queue = broker.queue("env-url");
    let script = script_in_dir(
        &broker,
        "env-dump",
        "cat > /dev/null\nenv > \"$DIR/$WARREN_MESSAGE_ID.env\"",
    );
    let config = command_config(&broker, &queue, 1, &script);
    // The file's URL leads nowhere; WARREN_BROKER_URL, which overrides it, is the real broker.
    let text = fs::read_to_string(&config).unwrap();
    fs::write(
        &config,
        text.replace(&util::amqp_url(), "amqp://guest:guest@127.0.0.1:1/%2f"),
    )
    .unwrap();
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
    stop(warren);
}
