//! The `pipe` handler through the real `warren run` binary: one long-lived program per worker
//! gets each message as a JSON header line (with the message's tag) and exactly `size` body
//! bytes on its stdin, and answers `TAG ack`, `TAG retry` or `TAG dead` (with an optional reason)
//! on its stdout. A program that dies mid-message, answers anything else (another message's tag,
//! no tag), speaks out of turn or overruns `handler.timeout` fails the attempt and is started
//! again, so no answer can settle a message it was not meant for; stopping warren closes its
//! stdin. The shipped examples
//! (`examples/pipe_handler.py`, `examples/pipe_handler.sh`) work against the broker.

mod util;

use std::fs;
use std::path::Path;
use std::time::Duration;

use util::{
    assert_dead_letter_headers, assert_dead_lettered, publish_confirmed, take_only, wait_gone,
    BrokerLock, ConfigFile, Queues, Warren,
};

const WAIT: Duration = Duration::from_secs(20);
const STOP: Duration = Duration::from_secs(15);

/// A pipe program that does what each body's first word says, and records every message it
/// gets: one line `id attempt redelivered size pid` in `$DIR/seen`, and the body in
/// `$DIR/<id>.body`. It exits when its stdin closes.
const BEHAVE: &str = r#"
import json, os, signal, sys, time

stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
with open(os.path.join(DIR, "protocol"), "w") as protocol:
    protocol.write(os.environ.get("WARREN_PIPE_PROTOCOL", "unset"))
stale = None

def answer(line, tag=None):
    stdout.write(b"%d " % (header["tag"] if tag is None else tag) + line.encode() + b"\n")
    stdout.flush()

while True:
    line = stdin.readline()
    if not line:
        sys.exit(0)
    header = json.loads(line)
    body = stdin.read(header["size"])
    assert len(body) == header["size"], "short body"
    if stale is not None:
        answer("ack", tag=stale)
        stale = None
    with open(os.path.join(DIR, "seen"), "a") as seen:
        seen.write("%s %d %s %d %d\n" % (header["id"], header["attempt"],
                   str(header["redelivered"]).lower(), header["size"], os.getpid()))
    with open(os.path.join(DIR, header["id"] + ".body"), "wb") as saved:
        saved.write(body)
    word = body.split(b" ", 1)[0]
    if word == b"crash":
        sys.exit(3)
    elif word == b"garbage":
        answer("hello")
    elif word == b"chatter":
        answer("ack")
        answer("ack")
    elif word == b"twice":
        # Acks now, and again once the next message has been written to it.
        answer("ack")
        stale = header["tag"]
        continue
    elif word == b"untagged":
        stdout.write(b"ack\n")
        stdout.flush()
    elif word == b"sleep":
        time.sleep(60)
    elif word == b"stubborn":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        time.sleep(60)
    elif word in (b"retry", b"dead"):
        answer(body.decode())
    elif word == b"once":
        answer("ack")
        sys.exit(0)
    else:
        answer("ack")
"#;

/// What the program recorded of one message.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Seen {
    id: String,
    attempt: u32,
    redelivered: bool,
    size: usize,
    pid: String,
}

fn seen(broker: &BrokerLock) -> Vec<Seen> {
    util::recorded(&broker.dir.path().join("seen"))
        .iter()
        .map(|line| match line.split(' ').collect::<Vec<_>>()[..] {
            [id, attempt, redelivered, size, pid] => Seen {
                id: id.to_string(),
                attempt: attempt.parse().expect("attempt"),
                redelivered: redelivered == "true",
                size: size.parse().expect("size"),
                pid: pid.to_string(),
            },
            _ => panic!("bad record {line:?}"),
        })
        .collect()
}

/// The records of message `id`, in order.
fn seen_of(broker: &BrokerLock, id: &str) -> Vec<Seen> {
    seen(broker).into_iter().filter(|s| s.id == id).collect()
}

/// A config running `argv` as a pipe handler with `workers` workers.
fn pipe_config(queue: &str, workers: usize, argv: &[&str]) -> ConfigFile {
    ConfigFile::new(queue).workers(workers).pipe(argv)
}

/// Starts warren with the [`BEHAVE`] program and a config that `configure` completes (with
/// [`ConfigFile::fast_retries`], for most tests), and waits until it consumes.
fn start_behave(
    broker: &BrokerLock,
    queue: &str,
    workers: usize,
    configure: impl FnOnce(ConfigFile) -> ConfigFile,
) -> Warren {
    let program = broker.script_in_dir_for("/usr/bin/env python3", "behave.py", BEHAVE);
    let config = configure(pipe_config(
        queue,
        workers,
        &[&program.display().to_string()],
    ))
    .write_in(broker.dir.path());
    let warren = Warren::run(&config, &[]);
    warren.wait_consuming(queue, workers as u32);
    warren
}

fn publish(queue: &str, messages: &[(&str, &[u8])]) {
    util::declare_durable(queue);
    publish_confirmed(queue, messages, Duration::from_secs(10));
}

fn example(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("examples")
        .join(name)
        .display()
        .to_string()
}

#[test]
fn one_program_gets_every_message_framed_by_its_size_whatever_the_bytes() {
    let broker = BrokerLock::shared();
    let queues = Queues::new(&broker, "pipe-framing");
    let warren = start_behave(&broker, &queues.work, 1, ConfigFile::fast_retries);

    let binary: Vec<u8> = (0..1 << 20).map(|i| (i % 251) as u8).collect();
    let fake_header = b"{\"id\":\"x\",\"size\":3}\nack\n\r\n\0".to_vec();
    let messages: [(&str, &[u8]); 5] = [
        ("binary-1mib", &binary),
        ("empty", b""),
        ("looks-like-a-header", &fake_header),
        ("every-byte", &(0..=255).collect::<Vec<u8>>()),
        ("text", b"hello world"),
    ];
    publish(&queues.work, &messages);
    queues.wait_settled(0);

    for (id, body) in &messages {
        let path = broker.dir.path().join(format!("{id}.body"));
        let got = fs::read(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
        assert!(
            got == *body,
            "message {id}: the program read {} bytes, not the {} published (first difference at \
             byte {:?})",
            got.len(),
            body.len(),
            got.iter().zip(body.iter()).position(|(a, b)| a != b)
        );
        let records = seen_of(&broker, id);
        assert_eq!(records.len(), 1, "{id} was handled once: {records:?}");
        assert_eq!(
            (records[0].attempt, records[0].redelivered, records[0].size),
            (1, false, body.len()),
            "the header of {id}"
        );
    }
    let pids: Vec<String> = seen(&broker).into_iter().map(|s| s.pid).collect();
    assert!(
        pids.iter().all(|pid| *pid == pids[0]),
        "one program handled every message: {pids:?}"
    );
    assert_eq!(
        warren.lines_with("started pipe program").len(),
        1,
        "the program was started once"
    );
    assert_eq!(
        fs::read_to_string(broker.dir.path().join("protocol")).expect("the protocol file"),
        "2",
        "WARREN_PIPE_PROTOCOL"
    );
    warren.stop(STOP);
    wait_gone(&pids[0], Duration::from_secs(5));
}

#[test]
fn retry_answers_retry_the_message_and_dead_answers_dead_letter_it_with_the_reason() {
    let broker = BrokerLock::shared();
    let queues = Queues::new(&broker, "pipe-answers");
    let warren = start_behave(&broker, &queues.work, 1, ConfigFile::fast_retries);
    publish(
        &queues.work,
        &[("ok", b"fine"), ("dead", b"dead invoice 42 does not exist")],
    );
    queues.wait_settled(1);
    assert_dead_lettered(
        &queues,
        "dead",
        b"dead invoice 42 does not exist",
        "invoice 42 does not exist",
        "answered dead",
        1,
    );
    assert_eq!(seen_of(&broker, "ok").len(), 1);

    publish(&queues.work, &[("retry", b"retry the database is down")]);
    queues.wait_settled(1);
    let attempts: Vec<u32> = seen_of(&broker, "retry")
        .iter()
        .map(|s| s.attempt)
        .collect();
    assert_eq!(attempts, [1, 2, 3], "retried until max_attempts");
    assert_dead_lettered(
        &queues,
        "retry",
        b"retry the database is down",
        "failed all 3 attempts",
        "answered retry: the database is down",
        3,
    );
    let pids: Vec<String> = seen(&broker).into_iter().map(|s| s.pid).collect();
    assert!(
        pids.iter().all(|pid| *pid == pids[0]),
        "valid answers never restart the program: {pids:?}"
    );
    warren.stop(STOP);
}

#[test]
fn a_program_that_dies_mid_message_fails_the_attempt_and_is_started_again() {
    let broker = BrokerLock::shared();
    let queues = Queues::new(&broker, "pipe-crash");
    let warren = start_behave(&broker, &queues.work, 1, ConfigFile::fast_retries);
    publish(&queues.work, &[("crash", b"crash now"), ("after", b"fine")]);
    queues.wait_settled(1);

    let crashes = seen_of(&broker, "crash");
    assert_eq!(
        crashes.iter().map(|s| s.attempt).collect::<Vec<_>>(),
        [1, 2, 3]
    );
    let mut pids: Vec<&str> = crashes.iter().map(|s| s.pid.as_str()).collect();
    pids.dedup();
    assert_eq!(pids.len(), 3, "a new program for each attempt: {crashes:?}");
    let after = seen_of(&broker, "after");
    assert_eq!(after.len(), 1, "the next message was handled once");
    assert_ne!(
        after[0].pid, pids[0],
        "the message after the crash went to a new program"
    );
    assert_dead_lettered(
        &queues,
        "crash",
        b"crash now",
        "failed all 3 attempts",
        "the pipe program exited mid-message (exit status 3)",
        3,
    );
    warren.stop(STOP);
}

#[test]
fn an_answer_that_is_not_ack_retry_or_dead_fails_the_attempt_and_restarts_the_program() {
    let broker = BrokerLock::shared();
    let queues = Queues::new(&broker, "pipe-garbage");
    let warren = start_behave(&broker, &queues.work, 1, ConfigFile::fast_retries);
    publish(&queues.work, &[("garbage", b"garbage please")]);
    queues.wait_settled(1);
    let dead = take_only(&queues.dead);
    assert_dead_letter_headers(
        &dead,
        &queues.work,
        "failed all 3 attempts",
        "the pipe program answered \"3 hello\", which is not \"3 ack|retry|dead|reply SIZE\"",
        3,
    );
    let mut pids: Vec<String> = seen_of(&broker, "garbage")
        .into_iter()
        .map(|s| s.pid)
        .collect();
    pids.dedup();
    assert_eq!(pids.len(), 3, "restarted after each bad answer");

    // A second answer to one message, which arrives while no message is out, is caught before
    // the next message is written.
    publish(&queues.work, &[("chatter", b"chatter")]);
    queues.wait_settled(0);
    publish(&queues.work, &[("next", b"fine")]);
    queues.wait_settled(0);
    warren.wait_for_log(" ack\" between messages", WAIT);
    let (chatter, next) = (seen_of(&broker, "chatter"), seen_of(&broker, "next"));
    assert_eq!((chatter.len(), next.len()), (1, 1));
    assert_ne!(
        chatter[0].pid, next[0].pid,
        "restarted after speaking out of turn"
    );
    warren.stop(STOP);
}

/// The case that pipe protocol 1, whose answers named nothing, got wrong: a program answers A
/// twice, the second time once warren has written B to it. Taken as B's answer, it would ack B
/// unhandled; named by its tag, it is a failed attempt for B, and B is handled on its next one.
#[test]
fn a_late_second_answer_to_one_message_never_settles_the_next() {
    let broker = BrokerLock::shared();
    let queues = Queues::new(&broker, "pipe-misattribute");
    let warren = start_behave(&broker, &queues.work, 1, ConfigFile::fast_retries);
    publish(&queues.work, &[("a", b"twice"), ("b", b"fine")]);
    util::wait_until(WAIT, "b to be handled on a second attempt", || {
        seen_of(&broker, "b").iter().any(|s| s.attempt == 2)
    });
    queues.wait_settled(0);
    warren.wait_for_log(
        "answered \"1 ack\" for tag 1 while tag 2 was in flight",
        WAIT,
    );
    let b = seen_of(&broker, "b");
    assert_eq!(
        b.last().map(|s| s.attempt),
        Some(2),
        "b was acked only on the attempt the program answered: {b:?}"
    );
    assert_eq!(
        util::queue_counts(&queues.dead).0,
        0,
        "nothing dead-lettered"
    );
    warren.stop(STOP);
}

/// A program written for protocol 1 answers without a tag: every attempt fails, saying what
/// to answer instead, and the message ends in the dead-letter queue with that reason.
#[test]
fn an_answer_without_a_tag_fails_the_attempt_and_says_what_protocol_2_wants() {
    let broker = BrokerLock::shared();
    let queues = Queues::new(&broker, "pipe-untagged");
    let warren = start_behave(&broker, &queues.work, 1, ConfigFile::fast_retries);
    publish(&queues.work, &[("old", b"untagged")]);
    queues.wait_settled(1);
    assert_dead_letter_headers(
        &take_only(&queues.dead),
        &queues.work,
        "failed all 3 attempts",
        "the pipe program answered \"ack\" without a tag; pipe protocol 2 answers begin with the \
         message's tag, as in \"3 ack\"",
        3,
    );
    assert_eq!(seen_of(&broker, "old").len(), 3);
    warren.stop(STOP);
}

#[test]
fn a_program_past_the_timeout_gets_sigterm_then_sigkill_and_the_attempt_fails() {
    let broker = BrokerLock::shared();
    let queues = Queues::new(&broker, "pipe-timeout");
    let warren = start_behave(&broker, &queues.work, 1, |config| {
        config
            .set("handler.timeout", "1s")
            .set("handler.kill_grace", "1s")
            .set("retry.max_attempts", 1)
    });
    publish(
        &queues.work,
        &[("sleep", b"sleep"), ("stubborn", b"stubborn")],
    );
    util::wait_until(WAIT, "both to be dead-lettered", || {
        util::queue_counts(&queues.dead).0 == 2
    });
    for id in ["sleep", "stubborn"] {
        let records = seen_of(&broker, id);
        assert_eq!(records.len(), 1, "{id}: one attempt");
        wait_gone(&records[0].pid, Duration::from_secs(5));
    }
    assert_eq!(
        warren
            .lines_with("the pipe program outlived handler.kill_grace; sending SIGKILL")
            .len(),
        1,
        "only the program that ignores SIGTERM needed SIGKILL"
    );
    let session = util::session();
    for _ in 0..2 {
        let dead = session
            .get(&queues.dead)
            .expect("basic.get")
            .expect("a dead letter");
        assert_dead_letter_headers(
            &dead,
            &queues.work,
            "failed its only attempt",
            "the pipe program timed out after 1s",
            1,
        );
    }
    warren.stop(STOP);
}

#[test]
fn a_program_that_exits_between_messages_is_started_again_and_stopping_warren_ends_it() {
    let broker = BrokerLock::shared();
    let queues = Queues::new(&broker, "pipe-restart");
    let mut warren = start_behave(&broker, &queues.work, 2, ConfigFile::fast_retries);
    publish(&queues.work, &[("once", b"once"), ("again", b"again")]);
    queues.wait_settled(0);
    assert_eq!(seen_of(&broker, "once").len(), 1, "acked, not retried");
    assert_eq!(seen_of(&broker, "again").len(), 1);

    let pids: Vec<String> = warren
        .lines_with("started pipe program")
        .iter()
        .map(|line| {
            line.rsplit_once("(pid ")
                .and_then(|(_, pid)| pid.strip_suffix(')'))
                .unwrap_or_else(|| panic!("no pid in {line:?}"))
                .to_string()
        })
        .collect();
    assert!(pids.len() >= 2, "one program per worker: {pids:?}");
    warren.signal(nix::sys::signal::Signal::SIGTERM);
    let status = warren.wait_exit(STOP);
    assert!(status.success(), "warren stopped with {status}");
    for pid in &pids {
        wait_gone(pid, Duration::from_secs(5));
    }
}

#[test]
fn the_python_example_acks_text_and_dead_letters_what_is_not_utf8() {
    let broker = BrokerLock::shared();
    let queues = Queues::new(&broker, "pipe-python");
    let config = pipe_config(&queues.work, 2, &["python3", &example("pipe_handler.py")])
        .fast_retries()
        .write_in(broker.dir.path());
    let warren = Warren::run(&config, &[]);
    publish(&queues.work, &[("text", b"hello"), ("bytes", b"caf\xe9")]);
    queues.wait_settled(1);
    warren.wait_for_log(" done text ", WAIT);
    assert_dead_lettered(
        &queues,
        "bytes",
        b"caf\xe9",
        "the body is not UTF-8 text",
        "answered dead",
        1,
    );
    warren.stop(STOP);
}

#[test]
fn the_shell_example_reads_each_body_exactly() {
    let broker = BrokerLock::shared();
    let queues = Queues::new(&broker, "pipe-shell");
    let config = pipe_config(&queues.work, 1, &[&example("pipe_handler.sh")])
        .fast_retries()
        .write_in(broker.dir.path());
    let warren = Warren::run(&config, &[]);
    publish(
        &queues.work,
        &[
            ("two-lines", b"one two\nthree\n"),
            ("empty", b""),
            ("binary", &[0, 10, 255, 10, 32, 7]),
        ],
    );
    queues.wait_settled(1);
    warren.wait_for_log("stderr: body of 14 bytes: 2 lines, 3 words", WAIT);
    warren.wait_for_log("stderr: body of 6 bytes: 2 lines, ", WAIT);
    assert_dead_lettered(
        &queues,
        "empty",
        b"",
        "the message is empty",
        "answered dead",
        1,
    );
    assert_eq!(warren.lines_with("started pipe program").len(), 1);
    warren.stop(STOP);
}
