//! `warren publish` against the real broker: each message is persistent `text/plain` with a
//! message id of its own, its body is the arguments joined by spaces (or "hello"); `--stdin`
//! publishes one message per line, bytes as they are, skipping empty lines and saying how many
//! it skipped; `--no-declare` publishes to an existing queue, and a message nothing can route is
//! reported as unroutable with exit 75 (every one of a batch); an unreachable broker exits 69
//! without printing the password; and with several nodes, a node lost or gone silent mid-publish
//! is left for another, and what was unconfirmed is published again, while a login the next
//! node refuses ends the run with exit 78. Messages are read back with amiquip directly, to see
//! what the broker stored.

mod util;

use std::collections::HashSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::thread;
use std::time::{Duration, Instant};

use amiquip::{Channel, Connection, ConsumerMessage, ConsumerOptions, Delivery};
use util::{publish, queue_counts, BrokerLock, ConfigFile};

/// A connection and channel of the test's own, straight through amiquip.
fn open_channel() -> (Connection, Channel) {
    let mut connection =
        Connection::insecure_open(&util::amqp_url()).expect("connect to the test broker");
    let channel = connection.open_channel(None).expect("open a channel");
    (connection, channel)
}

/// Takes the next message of `queue` off the broker (auto-ack), or panics if there is none.
fn get(channel: &Channel, queue: &str) -> Delivery {
    channel
        .basic_get(queue, true)
        .expect("basic.get")
        .unwrap_or_else(|| panic!("{queue} holds no message"))
        .delivery
}

/// Consumes exactly `count` messages from `queue` (auto-ack), in queue order.
fn consume(channel: &Channel, queue: &str, count: usize) -> Vec<Delivery> {
    let consumer = channel
        .basic_consume(
            queue,
            ConsumerOptions {
                no_ack: true,
                ..ConsumerOptions::default()
            },
        )
        .expect("basic.consume");
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut deliveries = Vec::with_capacity(count);
    while deliveries.len() < count {
        let left = deadline.saturating_duration_since(Instant::now());
        match consumer.receiver().recv_timeout(left) {
            Ok(ConsumerMessage::Delivery(delivery)) => deliveries.push(delivery),
            Ok(other) => panic!("the consumer ended: {other:?}"),
            Err(_) => panic!(
                "received {} of {count} messages from {queue} in time",
                deliveries.len()
            ),
        }
    }
    // amiquip's I/O thread tells the consumer that its cancel is confirmed after it has told
    // the channel; a consumer dropped in between makes that second send fail, and the I/O
    // thread ends the whole connection. So wait for the consumer's own notice before dropping it.
    consumer.cancel().expect("basic.cancel");
    match consumer.receiver().recv_timeout(Duration::from_secs(20)) {
        Ok(ConsumerMessage::ClientCancelled) => {}
        Ok(ConsumerMessage::Delivery(_)) => panic!("{queue} held more than {count} messages"),
        other => panic!("the consumer's cancel was not confirmed: {other:?}"),
    }
    deliveries
}

/// Runs `warren publish --config CONFIG --stdin ARGS` with `input` on its standard input and
/// returns its exit status and log.
fn publish_stdin(config: &Path, args: &[&str], input: Vec<u8>) -> (ExitStatus, String) {
    let mut child = util::spawn_publish_stdin(config, args);
    let mut stdin = child.stdin.take().expect("stdin is piped");
    let writer = thread::spawn(move || stdin.write_all(&input));
    let out = child.wait_with_output().expect("wait for warren publish");
    writer
        .join()
        .expect("the stdin writer")
        .expect("write warren's stdin");
    (
        out.status,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Whether the broker has a queue named `queue`, by a passive declare.
fn queue_exists(queue: &str) -> bool {
    util::session().queue_counts(queue).is_ok()
}

fn body(delivery: &Delivery) -> String {
    String::from_utf8_lossy(&delivery.body).into_owned()
}

#[test]
fn a_message_is_persistent_plain_text_with_an_id_and_its_body_is_the_arguments_or_hello() {
    let broker = BrokerLock::shared();
    let queue = broker.queue("one");
    let config = ConfigFile::new(&queue).dots().write_in(broker.dir.path());
    let (status, log) = publish(&config, &["Hello", "big  world", "..."]);
    assert!(status.success(), "warren publish failed: {status}\n{log}");
    let (status, log) = publish(&config, &[]);
    assert!(status.success(), "warren publish failed: {status}\n{log}");
    assert_eq!(queue_counts(&queue).0, 2, "two messages wait in the queue");

    let (connection, channel) = open_channel();
    let first = get(&channel, &queue);
    let second = get(&channel, &queue);
    assert_eq!(
        body(&first),
        "Hello big  world ...",
        "the body is the arguments joined by single spaces"
    );
    assert_eq!(
        body(&second),
        "hello",
        "with no arguments the body is hello"
    );
    let mut ids = HashSet::new();
    for message in [&first, &second] {
        let properties = &message.properties;
        assert_eq!(
            *properties.delivery_mode(),
            Some(2),
            "the message is persistent"
        );
        assert_eq!(properties.content_type().as_deref(), Some("text/plain"));
        let id = properties
            .message_id()
            .clone()
            .expect("the message has a message_id");
        assert!(!id.trim().is_empty(), "the message_id is not blank");
        ids.insert(id);
    }
    assert_eq!(ids.len(), 2, "each message has an id of its own: {ids:?}");
    connection.close().expect("close the connection");

    let durable =
        util::rabbitmqctl(&["list_queues", "-q", "--no-table-headers", "name", "durable"]);
    assert!(
        durable
            .lines()
            .any(|l| l.split_whitespace().collect::<Vec<_>>() == [queue.as_str(), "true"]),
        "publish declared {queue} durable:\n{durable}"
    );
}

#[test]
fn stdin_publishes_each_line_byte_for_byte_and_skips_empty_lines() {
    let broker = BrokerLock::shared();
    let queue = broker.queue("stdin");
    let config = ConfigFile::new(&queue).dots().write_in(broker.dir.path());
    let binary: &[u8] = b"caf\xe9 \xff\xfe\x00 not UTF-8 \x80";
    let mut lines: Vec<Vec<u8>> = (0..10_000)
        .map(|i| format!("task {i} of 10000.{}", ".".repeat(i % 4)).into_bytes())
        .collect();
    lines.insert(5_000, binary.to_vec());
    let mut input = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        input.extend_from_slice(line);
        input.push(b'\n');
        if i == 0 || i == 7_777 {
            input.push(b'\n');
        }
    }
    input.push(b'\n');

    let (status, log) = publish_stdin(&config, &[], input);
    assert!(
        status.success(),
        "warren publish --stdin failed: {status}\n{log}"
    );
    let summary = log
        .lines()
        .find(|l| l.contains(" [x] published "))
        .unwrap_or_else(|| panic!("no summary line in the log:\n{log}"));
    assert!(
        summary.ends_with(&format!(
            "published 10001 messages to queue {queue}, all confirmed (3 empty lines skipped)"
        )),
        "the summary counts the messages and the skipped empty lines: {summary}"
    );
    assert_eq!(
        queue_counts(&queue).0,
        10_001,
        "one message per non-empty line"
    );

    let (connection, channel) = open_channel();
    let deliveries = consume(&channel, &queue, lines.len());
    let mut ids = HashSet::new();
    for (i, (delivery, line)) in deliveries.iter().zip(&lines).enumerate() {
        assert!(
            delivery.body == *line,
            "message {i} is {:?}, not the line {:?}",
            delivery.body.escape_ascii().to_string(),
            line.escape_ascii().to_string()
        );
        assert_eq!(*delivery.properties.delivery_mode(), Some(2));
        let id = delivery
            .properties
            .message_id()
            .clone()
            .unwrap_or_else(|| panic!("message {i} has no message_id"));
        assert!(ids.insert(id.clone()), "message {i} repeats the id {id}");
    }
    assert!(
        channel
            .basic_get(&queue, true)
            .expect("basic.get")
            .is_none(),
        "no message beyond the 10001 lines"
    );
    connection.close().expect("close the connection");
}

#[test]
fn an_unroutable_message_exits_75_and_says_so() {
    let broker = BrokerLock::shared();
    let configured = broker.queue("configured");
    let absent = broker.queue("absent");
    let config = ConfigFile::new(&configured)
        .dots()
        .write_in(broker.dir.path());
    let (status, log) = publish(
        &config,
        &["--no-declare", "--queue", &absent, "lost", "message"],
    );
    assert_eq!(
        status.code(),
        Some(75),
        "an unroutable message exits 75 (EX_TEMPFAIL): {status}\n{log}"
    );
    let error = log
        .lines()
        .find(|l| l.contains("ERROR"))
        .unwrap_or_else(|| panic!("no error line:\n{log}"));
    assert!(
        error.contains("unroutable") && error.contains(&absent),
        "the error names the problem and the queue: {error}"
    );
    assert!(
        !log.contains("all confirmed"),
        "no success summary is logged:\n{log}"
    );
    assert!(!queue_exists(&absent), "--no-declare declared no queue");
    assert!(
        !queue_exists(&configured),
        "--queue overrides queue.name, which was not declared either"
    );
}

#[test]
fn every_unroutable_message_of_a_batch_is_reported_as_not_stored() {
    const LINES: usize = 3_000;
    let broker = BrokerLock::shared();
    let configured = broker.queue("configured");
    let absent = broker.queue("absent");
    let config = ConfigFile::new(&configured)
        .dots()
        .write_in(broker.dir.path());
    // Thousands of returns, each followed by its ack, arrive while warren is still publishing:
    // each return must be seen before its ack, or that message would be counted as stored.
    let input: String = (0..LINES).map(|i| format!("unroutable {i}\n")).collect();
    let (status, log) = publish_stdin(
        &config,
        &["--no-declare", "--queue", &absent],
        input.into_bytes(),
    );
    assert_eq!(status.code(), Some(75), "{status}\n{log}");
    assert!(
        log.contains(&format!(
            "{LINES} of {LINES} messages to queue {absent:?} were not stored"
        )),
        "every message is counted as not stored:\n{log}"
    );
    assert!(!queue_exists(&absent), "--no-declare declared no queue");
}

#[test]
fn an_unreachable_broker_exits_69_without_showing_the_password() {
    let broker = BrokerLock::shared();
    let queue = broker.queue("unreachable");
    let config = ConfigFile::at("amqp://warren:s3cr3t-pw@127.0.0.1:1/%2f", &queue)
        .set("broker.connect_timeout", "2s")
        .dots()
        .write_to(&broker.dir.path().join("unreachable.toml"));
    let started = Instant::now();
    let (status, log) = publish(&config, &["nobody", "hears", "this"]);
    assert_eq!(
        status.code(),
        Some(69),
        "an unreachable broker exits 69 (EX_UNAVAILABLE): {status}\n{log}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "gave up within the connect timeout, not after {:?}",
        started.elapsed()
    );
    assert!(
        !log.contains("s3cr3t-pw"),
        "the log shows the password:\n{log}"
    );
    let error = log
        .lines()
        .find(|l| l.contains("ERROR"))
        .unwrap_or_else(|| panic!("no error line:\n{log}"));
    assert!(
        error.contains("127.0.0.1:1"),
        "the error names the broker's address: {error}"
    );
}

#[test]
fn no_declare_publishes_to_an_existing_queue() {
    let broker = BrokerLock::shared();
    let queue = broker.queue("existing");
    let config = ConfigFile::new(&queue).dots().write_in(broker.dir.path());
    util::declare_durable(&queue);

    let (status, log) = publish(&config, &["--no-declare", "declared", "elsewhere"]);
    assert!(
        status.success(),
        "warren publish --no-declare failed: {status}\n{log}"
    );
    let (connection, channel) = open_channel();
    assert_eq!(body(&get(&channel, &queue)), "declared elsewhere");
    connection.close().expect("close the connection");
}

#[test]
fn the_published_count_can_be_written_for_the_textfile_collector() {
    let broker = BrokerLock::shared();
    let queue = broker.queue("textfile");
    let config = ConfigFile::new(&queue).write_in(broker.dir.path());
    let file = broker.dir.path().join("warren_publish.prom");
    let file_arg = file.to_str().unwrap();
    let (status, log) = util::publish(&config, &["--metrics-file", file_arg, "one"]);
    assert!(status.success(), "{log}");
    let text = std::fs::read_to_string(&file).expect("the metrics file was written");
    assert!(
        text.contains(&format!(
            "warren_published_messages_total{{queue=\"{queue}\"}} 1"
        )),
        "{text}"
    );
    assert!(
        !text.contains("warren_tasks_total"),
        "only the publisher's own count: {text}"
    );
    assert!(!broker.dir.path().join("warren_publish.prom.tmp").exists());
}

/// A config whose `broker.urls` are `proxies`, standing in for the nodes of a cluster.
fn config_through(broker: &BrokerLock, queue: &str, proxies: &[util::Proxy]) -> PathBuf {
    let urls: Vec<String> = proxies.iter().map(util::Proxy::url).collect();
    ConfigFile::at_nodes(&urls, queue).write_to(&broker.dir.path().join("nodes.toml"))
}

/// Waits until `queue` exists and holds `count` ready messages.
fn wait_for_stored(queue: &str, count: usize) {
    util::wait_until(
        Duration::from_secs(20),
        &format!("{count} messages in {queue}"),
        || {
            util::try_session()
                .ok()
                .and_then(|session| session.queue_counts(queue).ok())
                .is_some_and(|(ready, _)| ready as usize == count)
        },
    );
}

/// Line `i` of the failover tests: 100 bytes.
fn line(i: usize) -> String {
    format!("task {i:<6} {}", "x".repeat(88))
}

/// Takes the `stored` messages of `queue` off the broker and returns which of lines
/// `0..lines` (by [`line`]) none of them holds.
fn missing_lines(queue: &str, stored: usize, lines: usize) -> Vec<usize> {
    let (connection, channel) = open_channel();
    let bodies: HashSet<String> = consume(&channel, queue, stored).iter().map(body).collect();
    connection.close().expect("close the connection");
    (0..lines).filter(|&i| !bodies.contains(&line(i))).collect()
}

/// Lines `range` of the failover tests, each with its newline.
fn lines(range: std::ops::Range<usize>) -> String {
    range.map(|i| format!("{}\n", line(i))).collect()
}

#[test]
fn a_connection_lost_mid_publish_fails_over_and_publishes_the_unconfirmed_again() {
    const FIRST: usize = 2_000;
    // More than warren keeps unconfirmed at once (4096): it is waiting for confirms, a message
    // in hand, when the connection dies.
    const AFTER_FREEZE: usize = 6_000;
    let broker = BrokerLock::shared();
    let queue = broker.queue("failover");
    // Two "nodes", each a proxy to the test broker.
    let proxies = [
        util::Proxy::start(util::Proxy::free_port()),
        util::Proxy::start(util::Proxy::free_port()),
    ];
    let config = config_through(&broker, &queue, &proxies);
    let mut child = util::spawn_publish_stdin(&config, &["--confirm-timeout", "60s"]);
    let mut stdin = child.stdin.take().expect("stdin is piped");
    stdin.write_all(lines(0..FIRST).as_bytes()).unwrap();
    stdin.flush().unwrap();
    wait_for_stored(&queue, FIRST);

    // The network dies: what is published now is neither stored nor confirmed. Lines are
    // written from a thread, since warren stops reading its input while it waits for confirms.
    let sent: Vec<u64> = proxies.iter().map(util::Proxy::received).collect();
    proxies.iter().for_each(util::Proxy::freeze);
    let written = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let writer = {
        let written = std::sync::Arc::clone(&written);
        thread::spawn(move || {
            for i in FIRST..FIRST + AFTER_FREEZE {
                stdin.write_all(lines(i..i + 1).as_bytes())?;
                written.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
            Ok::<(), std::io::Error>(())
        })
    };
    // Lines are 100 bytes and a pipe holds 64 KiB: once 1,000 lines more than warren keeps
    // unconfirmed are written, it has read 4,096 it cannot get confirmed, and waits.
    util::wait_until(
        Duration::from_secs(20),
        "warren to read more lines than it may keep unconfirmed",
        || written.load(std::sync::atomic::Ordering::SeqCst) >= 4096 + 500,
    );
    let mut active = None;
    util::wait_until(
        Duration::from_secs(20),
        "the publisher to send into the dead network",
        || {
            active = (0..2).find(|&i| proxies[i].received() > sent[i]);
            active.is_some()
        },
    );
    // Its node goes away for good; the other node is fine.
    let [first, second] = proxies;
    let (dead, alive) = if active == Some(0) {
        (first, second)
    } else {
        (second, first)
    };
    alive.thaw();
    drop(dead);
    writer
        .join()
        .expect("the writer thread")
        .expect("write warren's input");

    let out = child.wait_with_output().expect("wait for warren publish");
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "publish failed over: {}\n{log}",
        out.status
    );
    let failover = log
        .lines()
        .find(|l| l.contains("publishing again through another node"))
        .unwrap_or_else(|| panic!("no failover line:\n{log}"));
    let republished: usize = failover
        .split(", ")
        .last()
        .and_then(|rest| rest.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("the failover line counts the unconfirmed: {failover}"));
    assert!(republished > 0, "{failover}");
    assert!(
        log.contains(&format!(
            "published {} messages to queue {queue}, all confirmed ({republished} published again after a lost connection",
            FIRST + AFTER_FREEZE
        )),
        "the summary counts every message once and says how many went twice:\n{log}"
    );

    // Every line is in the queue; a line appears twice only if it was published again.
    let stored = queue_counts(&queue).0 as usize;
    assert!(
        (FIRST + AFTER_FREEZE..=FIRST + AFTER_FREEZE + republished).contains(&stored),
        "{stored} messages stored for {} lines, {republished} published again",
        FIRST + AFTER_FREEZE
    );
    let missing = missing_lines(&queue, stored, FIRST + AFTER_FREEZE);
    assert!(missing.is_empty(), "lost: {missing:?}");
}

/// Runs `warren publish --stdin --confirm-timeout 2s` through `proxies` (the nodes of its
/// config): 500 lines, then the proxy in use goes silent for good (nothing is closed, nothing
/// gets through), then 500 more lines. Returns warren's exit status and log; fails if warren
/// takes 30 s, when missed heartbeats (30 s apart by default) would give up on the connection
/// only after a minute.
fn publish_into_silence(
    broker: &BrokerLock,
    queue: &str,
    proxies: &[util::Proxy],
) -> (ExitStatus, String) {
    let config = config_through(broker, queue, proxies);
    let mut child = util::spawn_publish_stdin(&config, &["--confirm-timeout", "2s"]);
    let mut stdin = child.stdin.take().expect("stdin is piped");
    stdin.write_all(lines(0..SILENCE_AT).as_bytes()).unwrap();
    stdin.flush().unwrap();
    wait_for_stored(queue, SILENCE_AT);
    let active = proxies
        .iter()
        .find(|p| p.received() > 0)
        .expect("warren publish connected through one of the proxies");
    active.freeze();
    stdin
        .write_all(lines(SILENCE_AT..2 * SILENCE_AT).as_bytes())
        .unwrap();
    drop(stdin);
    let mut stderr = child.stderr.take().expect("stderr is piped");
    let reader = thread::spawn(move || {
        let mut log = String::new();
        std::io::Read::read_to_string(&mut stderr, &mut log).map(|_| log)
    });
    let status = util::wait_or_kill(&mut child, Duration::from_secs(30))
        .expect("warren publish ends long before heartbeats give up on the silent node");
    let log = reader
        .join()
        .expect("the log reader")
        .expect("read warren's log");
    (status, log)
}

/// Lines published before [`publish_into_silence`] silences the node, and after.
const SILENCE_AT: usize = 500;

#[test]
fn a_node_that_goes_silent_mid_publish_is_left_for_another_after_the_confirm_timeout() {
    let broker = BrokerLock::shared();
    let queue = broker.queue("silent");
    let proxies = [
        util::Proxy::start(util::Proxy::free_port()),
        util::Proxy::start(util::Proxy::free_port()),
    ];
    let (status, log) = publish_into_silence(&broker, &queue, &proxies);
    assert!(status.success(), "{status}\n{log}");
    assert!(
        log.lines().any(|l| l.contains("were not confirmed within 2s: the node has gone silent; publishing again through another node")),
        "the confirm timeout moves publishing to the other node:\n{log}"
    );
    assert!(
        log.contains(&format!(
            "published {} messages to queue {queue}, all confirmed",
            2 * SILENCE_AT
        )),
        "{log}"
    );
    let stored = queue_counts(&queue).0 as usize;
    let missing = missing_lines(&queue, stored, 2 * SILENCE_AT);
    assert!(missing.is_empty(), "lost: {missing:?}");
}

#[test]
fn a_single_node_that_goes_silent_fails_the_publish_at_the_confirm_timeout() {
    let broker = BrokerLock::shared();
    let queue = broker.queue("silentone");
    let proxy = util::Proxy::start(util::Proxy::free_port());
    let (status, log) = publish_into_silence(&broker, &queue, std::slice::from_ref(&proxy));
    assert_eq!(status.code(), Some(75), "{status}\n{log}");
    assert!(
        log.lines()
            .any(|l| l.contains("ERROR") && l.contains("messages were not confirmed within 2s")),
        "{log}"
    );
    assert!(!log.contains("publishing again"), "{log}");
}

#[test]
fn a_login_refused_on_failover_stops_the_publish_as_a_config_error_naming_the_unconfirmed() {
    const FIRST: usize = 200;
    let broker = BrokerLock::shared();
    let queue = broker.queue("refusedfailover");
    let user = util::User::create("refused");
    let proxies = [
        util::Proxy::start(util::Proxy::free_port()),
        util::Proxy::start(util::Proxy::free_port()),
    ];
    let urls: Vec<String> = proxies.iter().map(|p| user.url_at(p.port)).collect();
    let config =
        ConfigFile::at_nodes(&urls, &queue).write_to(&broker.dir.path().join("nodes.toml"));
    let mut child = util::spawn_publish_stdin(&config, &[]);
    let mut stdin = child.stdin.take().expect("stdin is piped");
    stdin.write_all(lines(0..FIRST).as_bytes()).unwrap();
    stdin.flush().unwrap();
    wait_for_stored(&queue, FIRST);

    // The password changes (an operator rotated it), then the node in use goes away: the other
    // node refuses the login, as every node of the cluster would.
    user.change_password();
    let [first, second] = proxies;
    let (dead, _other) = if first.received() > 0 {
        (first, second)
    } else {
        (second, first)
    };
    drop(dead);
    stdin.write_all(lines(FIRST..2 * FIRST).as_bytes()).unwrap();
    drop(stdin);
    let out = child.wait_with_output().expect("wait for warren publish");
    let log = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(78),
        "a refused login is for the operator to fix, not to retry: {}\n{log}",
        out.status
    );
    let error: Vec<&str> = log.lines().filter(|l| l.contains("ERROR")).collect();
    assert_eq!(error.len(), 1, "one error line:\n{log}");
    assert!(
        error[0].contains("refused the connection")
            && error[0].contains("messages not confirmed since warren lost the connection"),
        "the line says the login was refused, and what was left unconfirmed: {}",
        error[0]
    );
    assert!(
        !log.contains(user.password()),
        "no password in the log: {log}"
    );
}
