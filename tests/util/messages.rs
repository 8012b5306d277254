//! Messages in and out of the test broker: publishing with `warren publish` (one-shot, or fed on
//! its standard input) or with the library's publisher, waiting for the broker's confirms; and
//! taking messages back off a queue to check their body and warren's dead-letter headers.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant, SystemTime};

use warren::amqp::{Fetched, Header, PublishEvent, Stamp};

use super::{session, warren_bin, Queues};

/// Runs `warren publish` to completion and returns its exit status and log.
pub fn publish(config: &Path, args: &[&str]) -> (ExitStatus, String) {
    let out = Command::new(warren_bin())
        .arg("publish")
        .arg("--config")
        .arg(config)
        .args(args)
        .env_remove("WARREN_BROKER_URL")
        .output()
        .expect("run warren publish");
    (
        out.status,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Starts `warren publish --stdin --config CONFIG` with `args` appended, its standard input and
/// error piped, at log level info.
pub fn spawn_publish_stdin(config: &Path, args: &[&str]) -> Child {
    Command::new(warren_bin())
        .args(["publish", "--stdin", "--config"])
        .arg(config)
        .args(args)
        .env_remove("WARREN_BROKER_URL")
        .env("RUST_LOG", "info")
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start warren publish")
}

/// Publishes each message with `warren publish` and asserts that it succeeded.
pub fn publish_ok(config: &Path, messages: &[&str]) {
    for message in messages {
        let (status, log) = publish(config, &[message]);
        assert!(
            status.success(),
            "warren publish {message:?} failed: {status}\n{log}"
        );
    }
}

/// Publishes `count` messages, `PREFIX-0` to `PREFIX-<count-1>`, with `warren publish`, and
/// returns them.
pub fn publish_numbered(config: &Path, prefix: &str, count: usize) -> Vec<String> {
    let messages: Vec<String> = (0..count).map(|i| format!("{prefix}-{i}")).collect();
    publish_ok(
        config,
        &messages.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    messages
}

/// Publishes each `(message id, body)` to the existing `queue` with the library's publisher and
/// returns once the broker has confirmed them all; panics if it has not within `timeout`.
pub fn publish_confirmed(queue: &str, messages: &[(&str, &[u8])], timeout: Duration) {
    let session = session();
    let mut publisher = session.publisher().expect("enable publisher confirms");
    let mut pending = BTreeMap::new();
    for (id, body) in messages {
        pending.insert(
            publisher
                .publish("", queue, body, id, &Stamp::default())
                .expect("publish"),
            *id,
        );
    }
    let deadline = Instant::now() + timeout;
    while !pending.is_empty() {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(
            !left.is_zero(),
            "the broker did not confirm messages {:?} in time",
            pending.values()
        );
        match publisher.next_event(left).expect("wait for confirms") {
            Some(PublishEvent::Ack {
                tag,
                multiple: true,
            }) => pending.retain(|&t, _| t > tag),
            Some(PublishEvent::Ack { tag, .. }) => {
                pending.remove(&tag);
            }
            Some(other) => panic!(
                "the broker did not store messages {:?}: {other:?}",
                pending.values()
            ),
            None => {}
        }
    }
}

/// Takes the one message of `queue` and checks that there is no second one.
pub fn take_only(queue: &str) -> Fetched {
    let session = session();
    let message = session
        .get(queue)
        .expect("basic.get")
        .unwrap_or_else(|| panic!("{queue} holds no message"));
    assert!(
        session.get(queue).expect("basic.get").is_none(),
        "{queue} holds a second copy"
    );
    message
}

pub fn str_header<'a>(message: &'a Fetched, name: &str) -> &'a str {
    match message.header(name) {
        Some(Header::Str(s)) => s,
        other => panic!(
            "header {name} is {other:?}, not a string; headers: {:?}",
            message.headers
        ),
    }
}

pub fn int_header(message: &Fetched, name: &str) -> i64 {
    match message.header(name) {
        Some(Header::Int(i)) => *i,
        other => panic!(
            "header {name} is {other:?}, not an integer; headers: {:?}",
            message.headers
        ),
    }
}

/// Checks warren's five dead-letter headers: the reason contains `reason`, the exit status
/// starts with `status`, and the attempts, the time and the work queue are right.
pub fn assert_dead_letter_headers(
    message: &Fetched,
    queue: &str,
    reason: &str,
    status: &str,
    attempts: i64,
) {
    let said = str_header(message, "x-warren-reason");
    assert!(
        said.contains(reason),
        "x-warren-reason {said:?} says {reason:?}"
    );
    let exit = str_header(message, "x-warren-exit-status");
    assert!(
        exit.starts_with(status),
        "x-warren-exit-status {exit:?} starts with {status:?}"
    );
    assert_eq!(int_header(message, "x-warren-attempts"), attempts);
    assert_eq!(str_header(message, "x-warren-queue"), queue);
    let at = str_header(message, "x-warren-dead-lettered-at");
    let at = humantime::parse_rfc3339(at)
        .unwrap_or_else(|e| panic!("x-warren-dead-lettered-at {at:?} is not RFC 3339: {e}"));
    let now = SystemTime::now();
    assert!(
        at <= now + Duration::from_secs(5) && at + Duration::from_secs(300) >= now,
        "x-warren-dead-lettered-at {at:?} is about now ({now:?})"
    );
}

/// Takes the one message of the dead-letter queue of `queues` and checks that it is `id` with
/// its original `body` and the dead-letter headers of [`assert_dead_letter_headers`].
pub fn assert_dead_lettered(
    queues: &Queues,
    id: &str,
    body: &[u8],
    reason: &str,
    status: &str,
    attempts: i64,
) {
    let dead = take_only(&queues.dead);
    assert_eq!(dead.body, body);
    assert_eq!(dead.message_id.as_deref(), Some(id));
    assert_dead_letter_headers(&dead, &queues.work, reason, status, attempts);
}
