//! Replies (`handler.reply`): a handler's answer to a message that has `reply_to` is published
//! there, with the message's correlation id, and the message is acked only once the broker has
//! confirmed the answer; one the broker refuses sends the message back to be done again, and one
//! that no queue takes (the requester is gone) is dropped and the message acked.

mod util;

use std::time::Duration;

use amiquip::{AmqpProperties, Confirm, Connection, Publish, QueueDeclareOptions};

use util::{ready_and_unacked, wait_until, BrokerLock, ConfigFile, Warren};

const WAIT: Duration = Duration::from_secs(30);

/// A pipe program that answers each message with its body upper-cased, as a reply.
const SHOUTER: &str = r#"
import json, sys
stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
while True:
    line = stdin.readline()
    if not line:
        break
    header = json.loads(line)
    answer = stdin.read(header["size"]).upper()
    stdout.write(b"%d reply %d\n" % (header["tag"], len(answer)) + answer)
    stdout.flush()
"#;

/// Publishes `body` to `queue` with `reply_to` and, if given, `correlation_id`, and waits for the
/// broker's confirm.
fn request(queue: &str, body: &[u8], reply_to: Option<&str>, correlation_id: Option<&str>) {
    let mut connection = Connection::insecure_open(&util::amqp_url()).expect("connect");
    let channel = connection.open_channel(None).expect("open a channel");
    let confirms = channel.listen_for_publisher_confirms().expect("listen");
    channel.enable_publisher_confirms().expect("confirms");
    let mut properties = AmqpProperties::default()
        .with_delivery_mode(2)
        .with_message_id(format!("request-{}", String::from_utf8_lossy(body)));
    if let Some(reply_to) = reply_to {
        properties = properties.with_reply_to(reply_to.into());
    }
    if let Some(id) = correlation_id {
        properties = properties.with_correlation_id(id.into());
    }
    channel
        .basic_publish("", Publish::with_properties(body, queue, properties))
        .expect("publish");
    match confirms.recv_timeout(WAIT) {
        Ok(Confirm::Ack(_)) => {}
        other => panic!("the broker did not confirm the request: {other:?}"),
    }
    let _ = connection.close();
}

/// Declares the requester's reply queue, with `arguments`.
fn reply_queue(name: &str, arguments: &[(&str, amiquip::AmqpValue)]) {
    let mut connection = Connection::insecure_open(&util::amqp_url()).expect("connect");
    let channel = connection.open_channel(None).expect("open a channel");
    let options = QueueDeclareOptions {
        durable: true,
        arguments: arguments
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect(),
        ..QueueDeclareOptions::default()
    };
    channel
        .queue_declare(name, options)
        .expect("declare the reply queue");
    let _ = connection.close();
}

/// The replies in `queue`, taken off it: (body, correlation id).
fn replies(queue: &str) -> Vec<(Vec<u8>, Option<String>)> {
    let mut connection = Connection::insecure_open(&util::amqp_url()).expect("connect");
    let channel = connection.open_channel(None).expect("open a channel");
    let mut replies = Vec::new();
    while let Some(got) = channel.basic_get(queue, true).expect("basic.get") {
        let delivery = got.delivery;
        replies.push((delivery.body, delivery.properties.correlation_id().clone()));
    }
    let _ = connection.close();
    replies
}

/// `warren run` with one worker and the [`SHOUTER`] pipe program on `queue`, consuming.
fn shouter(broker: &BrokerLock, queue: &str) -> Warren {
    let program = broker.dir.path().join("shouter.py");
    std::fs::write(&program, SHOUTER).expect("write the program");
    let config = ConfigFile::new(queue)
        .workers(1)
        .pipe(&["python3", &program.display().to_string()])
        .write_in(broker.dir.path());
    let warren = Warren::run(&config, &[]);
    warren.wait_consuming(queue, 1);
    warren
}

#[test]
fn a_pipe_programs_reply_goes_to_reply_to_with_the_correlation_id_before_the_ack() {
    let broker = BrokerLock::shared();
    let queue = broker.queue("rpc-pipe");
    let answers = broker.queue("rpc-pipe-replies");
    reply_queue(&answers, &[]);
    let warren = shouter(&broker, &queue);

    request(&queue, b"hello", Some(&answers), Some("c-1"));
    // Without a correlation id, the reply carries the request's message id.
    request(&queue, b"bare", Some(&answers), None);
    // Without reply_to, the answer has nowhere to go: the message is acked all the same.
    request(&queue, b"nobody", None, None);
    wait_until(WAIT, "the requests to be acked", || {
        ready_and_unacked(&queue) == (0, 0)
    });
    let mut got = replies(&answers);
    got.sort();
    assert_eq!(
        got,
        [
            (b"BARE".to_vec(), Some("request-bare".to_string())),
            (b"HELLO".to_vec(), Some("c-1".to_string())),
        ]
    );
    warren.stop(WAIT);
}

#[test]
fn a_reply_the_broker_refuses_sends_the_request_back_and_one_no_queue_takes_is_dropped() {
    let broker = BrokerLock::shared();
    let queue = broker.queue("rpc-refused");
    let full = broker.queue("rpc-refused-full");
    // A reply queue that takes nothing: every reply is nacked.
    reply_queue(
        &full,
        &[
            ("x-max-length", amiquip::AmqpValue::LongLongInt(0)),
            (
                "x-overflow",
                amiquip::AmqpValue::LongString("reject-publish".into()),
            ),
        ],
    );
    let warren = shouter(&broker, &queue);

    request(&queue, b"refused", Some(&full), Some("c-2"));
    warren.wait_for_count("could not reply to request-refused", 2, WAIT);
    let (ready, unacked) = ready_and_unacked(&queue);
    assert_eq!(
        ready + unacked,
        1,
        "the request is not acked while its reply is refused"
    );

    // The requester goes away: the reply is unroutable, dropped, and the request acked.
    let session = util::session();
    session.delete_queue(&full).expect("delete the reply queue");
    wait_until(WAIT, "the request to be acked", || {
        ready_and_unacked(&queue) == (0, 0)
    });
    warren.wait_for_log("dropped the reply to request-refused", WAIT);
    warren.stop(WAIT);
}

#[test]
fn a_replying_commands_stdout_goes_to_reply_to_and_without_reply_to_to_the_log() {
    let broker = BrokerLock::shared();
    let queue = broker.queue("rpc-command");
    let answers = broker.queue("rpc-command-replies");
    let config = ConfigFile::new(&queue)
        .workers(1)
        .command_argv(&["tr", "a-z", "A-Z"])
        .set("handler.reply", true)
        .write_in(broker.dir.path());
    reply_queue(&answers, &[]);
    let warren = Warren::run(&config, &[]);
    warren.wait_consuming(&queue, 1);

    request(&queue, b"hello", Some(&answers), Some("c-3"));
    request(&queue, b"logged", None, None);
    wait_until(WAIT, "the requests to be acked", || {
        ready_and_unacked(&queue) == (0, 0)
    });
    assert_eq!(
        replies(&answers),
        [(b"HELLO".to_vec(), Some("c-3".to_string()))]
    );
    warren.wait_for_log("worker-1 stdout: LOGGED", WAIT);
    assert!(
        warren.lines_with("stdout: HELLO").is_empty(),
        "an answer is not logged"
    );
    warren.stop(WAIT);
}

#[test]
fn reply_is_refused_on_a_pipe_handler_naming_the_key() {
    let broker = BrokerLock::shared();
    let config = ConfigFile::new(&broker.queue("rpc-bad"))
        .pipe(&["cat"])
        .set("handler.reply", true)
        .write_in(broker.dir.path());
    let (status, log) = util::publish(&config, &["x"]);
    assert_eq!(status.code(), Some(78), "{log}");
    assert!(
        log.contains("handler.reply: only kind = \"command\" takes reply"),
        "{log}"
    );
}
