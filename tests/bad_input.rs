//! Messages and programs that a handler does not expect, through the real `warren run` binary:
//! an empty body, a 64 MiB body, a body that is not UTF-8, headers of the wrong type, a program
//! that dies by a signal, closes its stdin unread, floods its stdout, or has been deleted. Each
//! gets a clear log line, and nothing is lost: every message ends acked or in the dead-letter
//! queue, and no queue is left with an unacked message.

mod util;

use std::fs;
use std::path::Path;
use std::time::Duration;

use util::{BrokerLock, ConfigFile, Queues, Warren};
use warren::amqp::Header;

const WAIT: Duration = Duration::from_secs(20);

/// Starts a one-worker warren running `script` for the work queue of `queues`, and waits until
/// it consumes (by then it has declared every queue around it).
fn start(broker: &BrokerLock, queues: &Queues, script: &Path) -> Warren {
    let config = ConfigFile::new(&queues.work)
        .workers(1)
        .command(script)
        .fast_retries()
        .write_in(broker.dir.path());
    let warren = Warren::run(&config, &[]);
    warren.wait_consuming(&queues.work, 1);
    warren
}

/// Publishes `body` as message `id` to the existing `queue` with the library's publisher and
/// returns once the broker has confirmed it, allowing a minute for a 64 MiB body.
fn publish(queue: &str, id: &str, body: &[u8]) {
    util::publish_confirmed(queue, &[(id, body)], Duration::from_secs(60));
}

/// The handler's records in the file `name` of the test's directory.
fn records(broker: &BrokerLock, name: &str) -> Vec<String> {
    util::recorded(&broker.dir.path().join(name))
}

/// Asserts that no log line failed to show as text: previews escape what is not printable.
fn assert_log_is_clean_text(warren: &Warren) {
    let garbled: Vec<String> = warren
        .log()
        .into_iter()
        .filter(|l| l.contains('\u{fffd}'))
        .collect();
    assert!(garbled.is_empty(), "garbled log lines: {garbled:#?}");
}

#[test]
fn an_empty_body_reaches_the_program_as_zero_bytes_and_is_done() {
    let broker = BrokerLock::shared();
    let queues = Queues::new(&broker, "empty");
    let script = broker.script_in_dir(
        "count",
        "echo \"$WARREN_MESSAGE_ID $(wc -c)\" >> \"$DIR/sizes\"",
    );
    let warren = start(&broker, &queues, &script);
    publish(&queues.work, "empty-1", b"");

    warren.wait_for_log(" done empty-1 ", WAIT);
    let received = warren.wait_for_log(" received empty-1", WAIT);
    assert!(
        received.ends_with(" received empty-1 (attempt 1) \"\""),
        "the preview is an empty string: {received}"
    );
    assert_eq!(records(&broker, "sizes"), ["empty-1 0"]);
    queues.wait_settled(0);
    warren.stop(WAIT);
}

#[test]
fn a_64_mib_body_arrives_whole_and_its_log_preview_is_64_bytes() {
    let broker = BrokerLock::shared();
    let queues = Queues::new(&broker, "huge");
    let script = broker.script_in_dir(
        "keep",
        "cat > \"$DIR/$WARREN_MESSAGE_ID.body\"\n\
         wc -c < \"$DIR/$WARREN_MESSAGE_ID.body\" > \"$DIR/$WARREN_MESSAGE_ID.size\"",
    );
    let warren = start(&broker, &queues, &script);
    let mut body = vec![0u8; 64 << 20];
    fastrand::fill(&mut body);
    publish(&queues.work, "huge-1", &body);

    warren.wait_for_log(" done huge-1 ", Duration::from_secs(60));
    assert_eq!(records(&broker, "huge-1.size"), ["67108864"]);
    let got = fs::read(broker.dir.path().join("huge-1.body")).expect("the program's copy");
    assert!(
        got == body,
        "the program read {} bytes that differ from the body published (first difference at \
         byte {:?})",
        got.len(),
        got.iter().zip(&body).position(|(a, b)| a != b)
    );

    let received = warren.wait_for_log(" received huge-1 ", WAIT);
    let preview = format!("\"{}\"… (67108864 bytes)", body[..64].escape_ascii());
    assert!(
        received.ends_with(&format!(" received huge-1 (attempt 1) {preview}")),
        "the preview shows the first 64 bytes and the size: {received}"
    );
    assert!(
        received.len() < 400,
        "the log line is short: {} bytes",
        received.len()
    );
    assert!(warren.lines_with(" failed huge-1 ").is_empty());
    queues.wait_settled(0);
    warren.stop(WAIT);
}

#[test]
fn a_body_that_is_not_utf8_arrives_byte_for_byte_and_its_preview_is_escaped() {
    let broker = BrokerLock::shared();
    let queues = Queues::new(&broker, "binary");
    let script = broker.script_in_dir("keep", "cat > \"$DIR/$WARREN_MESSAGE_ID.body\"");
    let warren = start(&broker, &queues, &script);
    let body: Vec<u8> = (0x80..=0xff).collect();
    publish(&queues.work, "binary-1", &body);

    warren.wait_for_log(" done binary-1 ", WAIT);
    let got = fs::read(broker.dir.path().join("binary-1.body")).expect("the program's copy");
    assert_eq!(got, body, "the program read the bytes published");
    let escaped: String = (0x80..0xc0).map(|b| format!("\\x{b:02x}")).collect();
    let received = warren.wait_for_log(" received binary-1 ", WAIT);
    assert!(
        received.ends_with(&format!(
            " received binary-1 (attempt 1) \"{escaped}\"… (128 bytes)"
        )),
        "the preview escapes each byte: {received}"
    );
    assert_log_is_clean_text(&warren);
    queues.wait_settled(0);
    warren.stop(WAIT);
}

#[test]
fn headers_of_unexpected_types_are_warned_about_and_counted_as_attempt_1() {
    let broker = BrokerLock::shared();
    let queues = Queues::new(&broker, "headers");
    let script = broker.script_in_dir(
        "attempt",
        "echo \"$WARREN_ATTEMPT $(cat)\" >> \"$DIR/attempts\"",
    );
    let warren = start(&broker, &queues, &script);
    let attempt = |value: Header| vec![("x-warren-attempt".to_string(), value)];
    let messages = [
        ("text", attempt(Header::Str("abc".into())), "Str(\"abc\")"),
        ("zero", attempt(Header::Int(0)), "Int(0)"),
        ("negative", attempt(Header::Int(-2)), "Int(-2)"),
        (
            "fraction",
            attempt(Header::Str("1.5".into())),
            "Str(\"1.5\")",
        ),
        (
            "count",
            vec![("x-delivery-count".to_string(), Header::Str("many".into()))],
            "Str(\"many\")",
        ),
    ];
    let session = util::session();
    for (body, headers, _) in &messages {
        session
            .publish_raw(&queues.work, body.as_bytes(), headers.clone())
            .expect("publish");
    }

    warren.wait_for_count(" done - ", messages.len(), WAIT);
    for (body, headers, shown) in &messages {
        let name = &headers[0].0;
        let warning = warren.wait_for_log(&format!("header {name} is {shown}, "), WAIT);
        assert!(
            warning.contains(" WARN ") && warning.contains("worker-1 -: "),
            "a warning names the worker, the message and the header of {body:?}: {warning}"
        );
    }
    assert_eq!(
        warren.lines_with(": header x-").len(),
        messages.len(),
        "one warning per message"
    );
    let mut got = records(&broker, "attempts");
    got.sort();
    let mut want: Vec<String> = messages.iter().map(|(b, _, _)| format!("1 {b}")).collect();
    want.sort();
    assert_eq!(got, want, "each ran once, as attempt 1");
    let attempts = warren.lines_with(" (attempt ");
    assert!(
        attempts
            .iter()
            .all(|l| l.contains(" (attempt 1)") || l.contains(" (attempt 1,")),
        "no message was taken for a later attempt: {attempts:#?}"
    );
    queues.wait_settled(0);
    warren.stop(WAIT);
}

#[test]
fn a_program_killed_by_a_signal_is_retried_and_then_done() {
    let broker = BrokerLock::shared();
    let queues = Queues::new(&broker, "signal");
    let script = broker.script_in_dir(
        "signal",
        "cat > /dev/null\n\
         echo \"$WARREN_ATTEMPT\" >> \"$DIR/runs\"\n\
         [ \"$WARREN_ATTEMPT\" = 1 ] && kill -s USR1 $$\n\
         exit 0",
    );
    let warren = start(&broker, &queues, &script);
    publish(&queues.work, "signal-1", b"once more");

    let failed = warren.wait_for_log(" failed signal-1 ", WAIT);
    assert!(
        failed.ends_with(": killed by signal 10 (SIGUSR1); retrying in 100ms"),
        "the log names the signal: {failed}"
    );
    warren.wait_for_log(" done signal-1 ", WAIT);
    assert_eq!(records(&broker, "runs"), ["1", "2"]);
    queues.wait_settled(0);
    warren.stop(WAIT);
}

#[test]
fn a_program_that_closes_stdin_without_reading_a_large_body_is_done() {
    let broker = BrokerLock::shared();
    let queues = Queues::new(&broker, "unread");
    // The program lives on after closing stdin, so that warren's write meets a closed pipe.
    let script = broker.script_in_dir(
        "unread",
        "exec 0<&-\necho \"$WARREN_ATTEMPT\" >> \"$DIR/runs\"\nsleep 0.2\nexit 0",
    );
    let warren = start(&broker, &queues, &script);
    publish(&queues.work, "unread-1", &vec![b'u'; 8 << 20]);

    warren.wait_for_log(" done unread-1 ", WAIT);
    assert_eq!(records(&broker, "runs"), ["1"], "it ran once and succeeded");
    assert!(warren.lines_with(" failed unread-1 ").is_empty());
    assert!(
        warren.lines_with("cannot write").is_empty(),
        "a closed stdin is the program's choice, not an error: {:#?}",
        warren.lines_with("cannot write")
    );
    queues.wait_settled(0);
    warren.stop(WAIT);
}

#[test]
fn a_program_that_writes_megabytes_to_stdout_is_done_and_only_64_kib_are_logged() {
    let broker = BrokerLock::shared();
    let queues = Queues::new(&broker, "chatty");
    // 50,000 lines of 100 bytes each.
    let line = "x".repeat(99);
    let script = broker.script_in_dir(
        "chatty",
        &format!(
            "cat > /dev/null\n\
             echo \"$WARREN_ATTEMPT\" >> \"$DIR/runs\"\n\
             yes {line} | head -c 5000000\n\
             exit 0"
        ),
    );
    let warren = start(&broker, &queues, &script);
    publish(&queues.work, "chatty-1", b"talk");

    warren.wait_for_log(" done chatty-1 ", WAIT);
    assert_eq!(records(&broker, "runs"), ["1"]);
    let log = warren.log();
    let output: Vec<&str> = log
        .iter()
        .filter_map(|l| {
            l.split_once(" INFO ] worker-1 stdout: ")
                .map(|(_, text)| text)
        })
        .collect();
    assert!(
        output.iter().all(|text| *text == line),
        "the logged lines are the program's: {:?}",
        output.iter().find(|text| **text != line)
    );
    let logged: usize = output.iter().map(|text| text.len() + 1).sum();
    assert!(
        (60 * 1024..=64 * 1024 + 4096).contains(&logged),
        "about 64 KiB of output was logged, not {logged} bytes ({} lines)",
        output.len()
    );
    let rest = warren.lines_with("the rest is not logged");
    assert_eq!(
        rest.len(),
        1,
        "one line says the rest is dropped: {rest:#?}"
    );
    assert!(
        rest[0].contains("worker-1 stdout: more than 65536 bytes of output"),
        "{}",
        rest[0]
    );
    let done = log
        .iter()
        .position(|l| l.contains(" done chatty-1 "))
        .expect("the done line");
    let last_output = log
        .iter()
        .rposition(|l| l.contains(" INFO ] worker-1 stdout: "))
        .expect("output lines");
    assert!(last_output < done, "the output comes before the done line");
    queues.wait_settled(0);
    warren.stop(WAIT);
}

#[test]
fn a_program_deleted_while_warren_runs_cannot_start_and_its_message_is_dead_lettered() {
    let broker = BrokerLock::shared();
    let queues = Queues::new(&broker, "deleted");
    let script = broker.script_in_dir("vanishing", "cat > /dev/null\nexit 0");
    let warren = start(&broker, &queues, &script);
    fs::remove_file(&script).expect("delete the program");
    publish(&queues.work, "orphan-1", b"nobody to run me");

    warren.wait_for_log(" failed orphan-1 (attempt 3 of 3)", WAIT);
    queues.wait_settled(1);
    let cannot_start = format!(": cannot start {}: ", script.display());
    let failed = warren.lines_with(" failed orphan-1 ");
    assert_eq!(failed.len(), 3, "{failed:#?}");
    for line in &failed {
        assert!(
            line.contains(&cannot_start),
            "the log says the program cannot start: {line}"
        );
    }
    assert!(failed[2].ends_with(&format!(
        "; failed all 3 attempts: dead-lettered to {}",
        queues.dead
    )));

    let session = util::session();
    let dead = session
        .get(&queues.dead)
        .expect("basic.get")
        .expect("the dead-lettered message");
    assert_eq!(dead.body, b"nobody to run me");
    assert_eq!(dead.message_id.as_deref(), Some("orphan-1"));
    match dead.header("x-warren-exit-status") {
        Some(Header::Str(status)) => assert!(
            status.starts_with(&format!("cannot start {}", script.display())),
            "x-warren-exit-status {status:?}"
        ),
        other => panic!("x-warren-exit-status is {other:?}"),
    }
    assert_eq!(dead.header("x-warren-attempts"), Some(&Header::Int(3)));
    assert!(session.get(&queues.dead).expect("basic.get").is_none());
    warren.stop(WAIT);
}
