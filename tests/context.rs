//! The message's context reaches handler programs as docs/handlers.md says: for a `command`, its
//! routing and properties as `WARREN_*` variables and each header as `WARREN_HEADER_*` in the
//! documented text form, with `TRACEPARENT` and `TRACESTATE` for valid W3C trace context and
//! oversized headers named in `WARREN_HEADERS_OMITTED`; for a `pipe` program, the same in its
//! JSON header line, with every header whole. Messages are published with every AMQP field type
//! through a real broker; the programs write down what they saw.

mod util;

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;
use std::time::Duration;

use amiquip::{AmqpProperties, AmqpValue, Confirm, Connection, FieldTable, Publish};
use serde_json::{json, Value as Json};

use util::nodes::Cluster;
use util::{wait_until, BrokerLock, ConfigFile, Warren};

const WAIT: Duration = Duration::from_secs(30);
const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
const TRACESTATE: &str = "congo=t61rcWkgMzE,rojo=00f067aa0ba902b7";

/// A `command` that writes the variables it got (warren's and the trace context, and PATH) as
/// JSON to DIR/ID.json; it asks for a retry of the first attempt of a message whose id begins
/// with `retry`.
const COMMAND: &str = r#"
import json, os, sys
env = {k: v for k, v in os.environ.items()
       if k.startswith("WARREN_") or k.startswith("TRACE") or k == "PATH"}
sys.stdin.buffer.read()
mid = env["WARREN_MESSAGE_ID"]
if mid.startswith("retry") and env["WARREN_ATTEMPT"] == "1":
    sys.exit(75)
path = os.path.join(sys.argv[1], mid + ".json")
with open(path + ".tmp", "w") as f:
    json.dump(env, f)
os.rename(path + ".tmp", path)
"#;

/// A `pipe` program that writes each JSON header line it reads to DIR/ID.json and acks.
const PIPE: &str = r#"
import json, os, sys
stdin, stdout = sys.stdin.buffer, sys.stdout
while True:
    line = stdin.readline()
    if not line:
        break
    header = json.loads(line)
    stdin.read(header["size"])
    path = os.path.join(sys.argv[1], header["id"] + ".json")
    with open(path + ".tmp", "wb") as f:
        f.write(line)
    os.rename(path + ".tmp", path)
    stdout.write("%d ack\n" % header["tag"])
    stdout.flush()
"#;

/// One header of each AMQP field type, and names that test the naming rule.
fn every_shape() -> FieldTable {
    let mut nested = FieldTable::new();
    nested.insert("deep".into(), AmqpValue::Boolean(false));
    let mut table = FieldTable::new();
    table.insert("a".into(), AmqpValue::LongLongInt(1));
    table.insert("b".into(), AmqpValue::LongString("x".into()));
    table.insert("nested".into(), AmqpValue::FieldTable(nested));
    let shapes = [
        ("string", AmqpValue::LongString("héllo wörld".into())),
        ("signed-byte", AmqpValue::ShortShortInt(-5)),
        ("short", AmqpValue::ShortInt(-300)),
        ("int", AmqpValue::LongInt(-70_000)),
        ("long", AmqpValue::LongLongInt(-5_000_000_000)),
        ("unsigned-byte", AmqpValue::ShortShortUInt(200)),
        ("unsigned-short", AmqpValue::ShortUInt(60_000)),
        ("unsigned-int", AmqpValue::LongUInt(4_000_000_000)),
        ("float", AmqpValue::Float(1.5)),
        ("double", AmqpValue::Double(-0.25)),
        ("bool", AmqpValue::Boolean(true)),
        ("timestamp", AmqpValue::Timestamp(1_700_000_000)),
        ("table", AmqpValue::FieldTable(table)),
        (
            "array",
            AmqpValue::FieldArray(vec![
                AmqpValue::LongLongInt(1),
                AmqpValue::LongString("two".into()),
                AmqpValue::Boolean(true),
            ]),
        ),
        ("bytes", AmqpValue::ByteArray(vec![0, 1, 2, 255])),
        ("X-Request-id", AmqpValue::LongString("r-1".into())),
        ("", AmqpValue::LongString("empty name".into())),
        ("void", AmqpValue::Void),
        ("PATH", AmqpValue::LongString("/evil".into())),
        ("traceparent", AmqpValue::LongString(TRACEPARENT.into())),
        ("tracestate", AmqpValue::LongString(TRACESTATE.into())),
    ];
    shapes
        .into_iter()
        .map(|(name, value)| (name.to_string(), value))
        .collect()
}

/// The variables docs/handlers.md promises for [`every_shape`].
fn every_shape_variables() -> BTreeMap<String, String> {
    [
        ("WARREN_HEADER_STRING", "héllo wörld"),
        ("WARREN_HEADER_SIGNED_BYTE", "-5"),
        ("WARREN_HEADER_SHORT", "-300"),
        ("WARREN_HEADER_INT", "-70000"),
        ("WARREN_HEADER_LONG", "-5000000000"),
        ("WARREN_HEADER_UNSIGNED_BYTE", "200"),
        ("WARREN_HEADER_UNSIGNED_SHORT", "60000"),
        ("WARREN_HEADER_UNSIGNED_INT", "4000000000"),
        ("WARREN_HEADER_FLOAT", "1.5"),
        ("WARREN_HEADER_DOUBLE", "-0.25"),
        ("WARREN_HEADER_BOOL", "true"),
        ("WARREN_HEADER_TIMESTAMP", "1700000000"),
        (
            "WARREN_HEADER_TABLE",
            r#"{"a":1,"b":"x","nested":{"deep":false}}"#,
        ),
        ("WARREN_HEADER_ARRAY", r#"[1,"two",true]"#),
        ("WARREN_HEADER_BYTES", "AAEC/w=="),
        ("WARREN_HEADER_X_REQUEST_ID", "r-1"),
        ("WARREN_HEADER_", "empty name"),
        ("WARREN_HEADER_VOID", ""),
        ("WARREN_HEADER_PATH", "/evil"),
        ("WARREN_HEADER_TRACEPARENT", TRACEPARENT),
        ("WARREN_HEADER_TRACESTATE", TRACESTATE),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

/// The `headers` object of the JSON header line docs/handlers.md promises for [`every_shape`].
fn every_shape_json() -> Json {
    json!({
        "string": "héllo wörld",
        "signed-byte": -5,
        "short": -300,
        "int": -70000,
        "long": -5000000000i64,
        "unsigned-byte": 200,
        "unsigned-short": 60000,
        "unsigned-int": 4000000000u64,
        "float": 1.5,
        "double": -0.25,
        "bool": true,
        "timestamp": 1700000000,
        "table": {"a": 1, "b": "x", "nested": {"deep": false}},
        "array": [1, "two", true],
        "bytes": "AAEC/w==",
        "X-Request-id": "r-1",
        "": "empty name",
        "void": null,
        "PATH": "/evil",
        "traceparent": TRACEPARENT,
        "tracestate": TRACESTATE,
    })
}

/// Publishes `id` to `exchange` with `routing_key`, `headers` and a value in every property a
/// handler sees, on a connection to `url`, and waits for the broker's confirm.
fn publish(url: &str, exchange: &str, routing_key: &str, id: &str, headers: FieldTable) {
    let mut connection = Connection::insecure_open(url).expect("connect to publish");
    let channel = connection.open_channel(None).expect("open a channel");
    let confirms = channel.listen_for_publisher_confirms().expect("listen");
    channel.enable_publisher_confirms().expect("confirms");
    let properties = AmqpProperties::default()
        .with_delivery_mode(2)
        .with_message_id(id.into())
        .with_correlation_id(format!("corr-{id}"))
        .with_reply_to("replies".into())
        .with_timestamp(1_764_000_000)
        .with_content_type("application/json".into())
        .with_content_encoding("gzip".into())
        .with_type_("invoice.created".into())
        .with_app_id("billing".into())
        .with_headers(headers);
    channel
        .basic_publish(
            exchange,
            Publish::with_properties(b"{}", routing_key, properties),
        )
        .expect("publish");
    match confirms.recv_timeout(WAIT) {
        Ok(Confirm::Ack(_)) => {}
        other => panic!("the broker did not confirm {id}: {other:?}"),
    }
    let _ = connection.close();
}

/// The properties' variables and JSON fields for a message published by [`publish`] to
/// `exchange` with `routing_key`.
fn property_variables(exchange: &str, routing_key: &str, id: &str) -> BTreeMap<String, String> {
    [
        ("WARREN_EXCHANGE", exchange.to_string()),
        ("WARREN_ROUTING_KEY", routing_key.to_string()),
        ("WARREN_CORRELATION_ID", format!("corr-{id}")),
        ("WARREN_REPLY_TO", "replies".into()),
        ("WARREN_TIMESTAMP", "1764000000".into()),
        ("WARREN_CONTENT_TYPE", "application/json".into()),
        ("WARREN_CONTENT_ENCODING", "gzip".into()),
        ("WARREN_TYPE", "invoice.created".into()),
        ("WARREN_APP_ID", "billing".into()),
        ("TRACEPARENT", TRACEPARENT.into()),
        ("TRACESTATE", TRACESTATE.into()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

/// What the program wrote for message `id`, once it has.
fn written(dir: &Path, id: &str) -> Json {
    let path = dir.join(format!("{id}.json"));
    wait_until(
        WAIT,
        &format!("the handler to write {}", path.display()),
        || path.exists(),
    );
    let text = fs::read(&path).expect("read what the handler wrote");
    serde_json::from_slice(&text).expect("the handler wrote JSON")
}

/// The variables `env` holds, as strings.
fn variables(env: &Json) -> BTreeMap<String, String> {
    env.as_object()
        .expect("an object")
        .iter()
        .map(|(k, v)| (k.clone(), v.as_str().expect("a string").to_string()))
        .collect()
}

/// Waits until `queue` on the node at `url` has a consumer.
fn wait_consuming_at(url: &str, queue: &str) {
    let consumers = || {
        let session = util::session_at(url).ok()?;
        session
            .queue_counts(queue)
            .ok()
            .map(|(_, consumers)| consumers)
    };
    wait_until(WAIT, &format!("a consumer on {queue}"), || {
        consumers() == Some(1)
    });
}

fn python_script(dir: &Path, name: &str, code: &str) -> String {
    let path = dir.join(name);
    fs::write(&path, code).expect("write the program");
    path.display().to_string()
}

#[test]
fn every_header_shape_reaches_a_command_as_documented_and_a_retry_keeps_the_routing() {
    let broker = BrokerLock::shared();
    let queue = broker.queue("context-command");
    // A routing key other than the queue's name, which is the key of a retried copy's way back.
    let key = format!("{queue}.created");
    let dir = broker.dir.path();
    let script = python_script(dir, "command.py", COMMAND);
    let out = dir.display().to_string();
    let config = ConfigFile::new(&queue)
        .workers(1)
        .binding("amq.topic", "topic", &[&key])
        .fast_retries()
        .command_argv(&["python3", &script, &out])
        .write_in(dir);
    let warren = Warren::run(&config, &[]);
    warren.wait_consuming(&queue, 1);
    let url = util::amqp_url();
    publish(&url, "amq.topic", &key, "shapes", every_shape());
    // Headers that claim another origin count only on a copy warren made itself.
    let mut stale = every_shape();
    for (name, value) in [
        ("x-warren-exchange", "stale"),
        ("x-warren-routing-key", "stale"),
    ] {
        stale.insert(name.into(), AmqpValue::LongString(value.into()));
    }
    publish(&url, "amq.topic", &key, "retry-me", stale);

    let env = variables(&written(dir, "shapes"));
    let headers: BTreeMap<String, String> = (env.iter())
        .filter(|(k, _)| k.starts_with("WARREN_HEADER_"))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    assert_eq!(headers, every_shape_variables());
    for (name, value) in property_variables("amq.topic", &key, "shapes") {
        assert_eq!(env.get(&name), Some(&value), "{name}");
    }
    assert_eq!(
        env.get("WARREN_QUEUE"),
        Some(&queue),
        "a header cannot change it"
    );
    let path = env.get("PATH").map(String::as_str);
    assert!(
        path.is_some_and(|path| path != "/evil" && path.contains("/usr/bin")),
        "a header cannot change PATH: {path:?}"
    );
    assert_eq!(env.get("WARREN_HEADERS_OMITTED"), None);

    // The retry was republished to a retry queue through the default exchange, and came back
    // to the work queue from there with the queue's name as its key: the handler still sees
    // where the producer published it.
    let retried = variables(&written(dir, "retry-me"));
    let get = |name: &str| retried.get(name).map(String::as_str);
    assert_eq!(get("WARREN_ATTEMPT"), Some("2"));
    assert_eq!(get("WARREN_EXCHANGE"), Some("amq.topic"));
    assert_eq!(get("WARREN_ROUTING_KEY"), Some(key.as_str()));
    assert_eq!(get("WARREN_HEADER_X_WARREN_EXCHANGE"), Some("amq.topic"));
    assert_eq!(
        get("WARREN_HEADER_X_WARREN_ROUTING_KEY"),
        Some(key.as_str())
    );
    warren.stop(WAIT);
}

#[test]
fn every_header_shape_reaches_a_pipe_program_as_documented() {
    let broker = BrokerLock::shared();
    let queue = broker.queue("context-pipe");
    let dir = broker.dir.path();
    let script = python_script(dir, "pipe.py", PIPE);
    let out = dir.display().to_string();
    let config = ConfigFile::new(&queue)
        .workers(1)
        .binding("amq.direct", "direct", &[&queue])
        .pipe(&["python3", &script, &out])
        .write_in(dir);
    let warren = Warren::run(&config, &[]);
    warren.wait_consuming(&queue, 1);
    publish(
        &util::amqp_url(),
        "amq.direct",
        &queue,
        "shapes",
        every_shape(),
    );

    let header = written(dir, "shapes");
    assert_eq!(header["headers"], every_shape_json());
    let line = fs::read_to_string(dir.join("shapes.json")).expect("read the header line");
    assert!(
        line.starts_with(r#"{"tag":"#) && line.ends_with(",\"size\":2}\n"),
        "tag first and size last: {line}"
    );
    let expected = json!({
        "exchange": "amq.direct",
        "routing_key": queue,
        "correlation_id": "corr-shapes",
        "reply_to": "replies",
        "timestamp": 1764000000,
        "content_type": "application/json",
        "content_encoding": "gzip",
        "type": "invoice.created",
        "app_id": "billing",
        "traceparent": TRACEPARENT,
        "tracestate": TRACESTATE,
        "id": "shapes",
        "queue": queue,
        "attempt": 1,
        "redelivered": false,
        "size": 2,
    });
    for (name, value) in expected.as_object().unwrap() {
        assert_eq!(&header[name], value, "{name}");
    }
    warren.stop(WAIT);
}

/// RabbitMQ keeps a message's properties in one frame, so a 1 MiB header needs a node whose
/// `frame_max` is larger than the default 128 KiB.
#[test]
fn a_header_of_one_mebibyte_reaches_a_pipe_whole_and_a_command_as_left_out() {
    let cluster = Cluster::start_with(1, "frame_max = 4194304");
    let url = cluster.node(0).amqp_url();
    let dir = tempfile::tempdir().expect("a scratch directory");
    let big = "m".repeat(1 << 20);
    let headers = || -> FieldTable {
        [
            ("big".to_string(), AmqpValue::LongString(big.clone())),
            ("small".to_string(), AmqpValue::LongString("kept".into())),
        ]
        .into_iter()
        .collect()
    };
    let out = dir.path().display().to_string();

    let command = python_script(dir.path(), "command.py", COMMAND);
    let config = ConfigFile::at(&url, "context-big-command")
        .workers(1)
        .command_argv(&["python3", &command, &out])
        .write_in(dir.path());
    let warren = Warren::run(&config, &[]);
    wait_consuming_at(&url, "context-big-command");
    publish(&url, "", "context-big-command", "big-command", headers());
    let env = variables(&written(dir.path(), "big-command"));
    assert_eq!(env.get("WARREN_HEADER_BIG"), None);
    assert_eq!(
        env.get("WARREN_HEADER_SMALL").map(String::as_str),
        Some("kept")
    );
    assert_eq!(
        env.get("WARREN_HEADERS_OMITTED").map(String::as_str),
        Some(r#"["big"]"#)
    );
    warren.stop(WAIT);

    let pipe = python_script(dir.path(), "pipe.py", PIPE);
    let config = ConfigFile::at(&url, "context-big-pipe")
        .workers(1)
        .pipe(&["python3", &pipe, &out])
        .write_in(dir.path());
    let warren = Warren::run(&config, &[]);
    wait_consuming_at(&url, "context-big-pipe");
    publish(&url, "", "context-big-pipe", "big-pipe", headers());
    let header = written(dir.path(), "big-pipe");
    assert_eq!(header["headers"]["big"].as_str(), Some(big.as_str()));
    assert_eq!(header["headers"]["small"], "kept");
    warren.stop(WAIT);
}
