//! Generated inputs (proptest): the config loader on arbitrary and near-valid TOML, broker URLs
//! with odd user info, IPv6 hosts and percent-encoding, the `pipe` handler against an adversarial
//! program, and `x-warren-attempt` and `x-delivery-count` headers of every AMQP type through the
//! real broker. A failing case is shrunk and printed by proptest; `PROPTEST_CASES` raises the
//! number of cases.

mod util;

use std::collections::{BTreeSet, HashMap};
use std::fs;
use std::path::Path;
use std::time::Duration;

use amiquip::{AmqpProperties, AmqpValue, Connection, FieldTable, Publish};
use proptest::prelude::*;
use proptest::test_runner::Config as Cases;
use warren::abort::Abort;
use warren::config::{BrokerUrl, Config};
use warren::context::Context;
use warren::handler::{Handler, Outcome, Task};
use warren::pipe::PipeHandler;

// ---------------------------------------------------------------------------------------------
// The config loader.

/// Every key the configuration knows, as `section`, `key`.
const KEYS: &[(&str, &str)] = &[
    ("broker", "url"),
    ("broker", "urls"),
    ("broker", "heartbeat"),
    ("broker", "connect_timeout"),
    ("broker", "consumer_timeout"),
    ("broker.tls", "ca_file"),
    ("broker.tls", "cert_file"),
    ("broker.tls", "key_file"),
    ("broker.tls", "server_name"),
    ("queue", "name"),
    ("queue", "durable"),
    ("queue", "type"),
    ("queue", "dead_letter"),
    ("workers", "count"),
    ("workers", "prefetch"),
    ("handler", "kind"),
    ("handler", "command"),
    ("handler", "timeout"),
    ("handler", "kill_grace"),
    ("retry", "max_attempts"),
    ("retry", "delay"),
    ("retry", "max_delay"),
    ("shutdown", "grace"),
    ("breaker", "enabled"),
    ("breaker", "outcomes"),
    ("breaker", "window"),
    ("breaker", "failure_ratio"),
    ("breaker", "min_failures"),
    ("breaker", "min_messages"),
    ("breaker", "cooldown"),
    ("breaker", "max_cooldown"),
    ("control", "socket"),
    ("metrics", "listen"),
    ("metrics", "queue_depth_interval"),
    ("log", "format"),
    ("queue", "no_such_key"),
];

/// A TOML value of any kind, plausible or not for the key it lands on.
fn toml_value() -> impl Strategy<Value = String> {
    let scalar = prop_oneof![
        any::<i64>().prop_map(|n| n.to_string()),
        prop_oneof![Just(0i64), Just(1), Just(-1), Just(65535), Just(65536)]
            .prop_map(|n| n.to_string()),
        any::<f64>()
            .prop_filter("TOML floats are finite here", |f| f.is_finite())
            .prop_map(|f| format!("{f:?}")),
        any::<bool>().prop_map(|b| b.to_string()),
        "[a-z0-9 .:/%@_-]{0,16}".prop_map(|s| format!("{s:?}")),
        "[0-9]{1,6}(ns|us|ms|s|m|h|d|w|x| s|)".prop_map(|s| format!("{s:?}")),
        prop_oneof![
            Just("\"amqp://guest:guest@127.0.0.1:5672/%2f\""),
            Just("\"amqps://u:p@[::1]:5671/v\""),
            Just("\"amqp://h/a/b\""),
            Just("\"http://h\""),
            Just("\"dots\""),
            Just("\"command\""),
            Just("\"pipe\""),
            Just("\"quorum\""),
            Just("\"classic\""),
            Just("\"json\""),
            Just("\"127.0.0.1:9090\""),
            Just("\"/no/such/program\""),
        ]
        .prop_map(str::to_string),
    ];
    scalar.prop_recursive(2, 8, 4, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..4)
                .prop_map(|v| format!("[{}]", v.join(", "))),
            proptest::collection::vec(("[a-z_]{1,8}", inner), 0..3).prop_map(|kv| {
                let pairs: Vec<String> = kv.iter().map(|(k, v)| format!("{k} = {v}")).collect();
                format!("{{ {} }}", pairs.join(", "))
            }),
        ]
    })
}

/// A file of known sections and keys with arbitrary values, in any order, some repeated.
fn near_valid_toml() -> impl Strategy<Value = String> {
    proptest::collection::vec((0..KEYS.len(), toml_value()), 0..14).prop_map(|entries| {
        let mut text = String::new();
        for (key, value) in entries {
            let (section, name) = KEYS[key];
            text.push_str(&format!("[{section}]\n{name} = {value}\n"));
        }
        text
    })
}

/// The one-line error must name the file and then a line (`w.toml:3: ...`) or a key
/// (`w.toml: queue.name: ...`), and be one line.
fn assert_names_a_line_or_key(message: &str) -> Result<(), TestCaseError> {
    prop_assert!(!message.contains('\n'), "one line: {message:?}");
    let rest = message.strip_prefix("w.toml");
    prop_assert!(rest.is_some(), "names the file first: {message:?}");
    let rest = rest.unwrap();
    let at_line = rest
        .strip_prefix(':')
        .and_then(|r| r.split_once(':'))
        .is_some_and(|(line, _)| !line.is_empty() && line.bytes().all(|b| b.is_ascii_digit()));
    let at_key = rest.strip_prefix(": ").is_some_and(|r| {
        r.split_once(": ").is_some_and(|(key, _)| {
            key.contains('.')
                && key
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b == b'_' || b == b'.' || b.is_ascii_digit())
        })
    });
    prop_assert!(at_line || at_key, "names a line or a key: {message:?}");
    Ok(())
}

proptest! {
    #![proptest_config(Cases::with_cases(256))]

    #[test]
    fn the_config_loader_never_panics_on_arbitrary_text_and_names_a_line_or_key(text in "\\PC{0,200}") {
        if let Err(e) = Config::parse(Path::new("w.toml"), &text, None) {
            assert_names_a_line_or_key(&e.to_string())?;
        }
    }

    #[test]
    fn the_config_loader_names_a_line_or_key_for_any_value_of_any_known_key(text in near_valid_toml()) {
        match Config::parse(Path::new("w.toml"), &text, None) {
            Err(e) => assert_names_a_line_or_key(&e.to_string())?,
            // `warren run` also needs a handler whose program exists; that error must name a
            // key or line too.
            Ok(config) => {
                if let Err(e) = config.handler() {
                    assert_names_a_line_or_key(&e.to_string())?;
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Broker URLs.

/// A host as a URL writes it and as `BrokerUrl::host` returns it.
fn host() -> impl Strategy<Value = (String, String)> {
    prop_oneof![
        "[a-z][a-z0-9-]{0,10}(\\.[a-z]{2,5})?".prop_map(|h| (h.clone(), h)),
        any::<[u8; 4]>().prop_map(|o| {
            let ip = std::net::Ipv4Addr::from(o).to_string();
            (ip.clone(), ip)
        }),
        any::<[u16; 8]>().prop_map(|s| {
            let ip = std::net::Ipv6Addr::from(s).to_string();
            (format!("[{ip}]"), ip)
        }),
    ]
}

/// Everything but the unreserved characters is percent-encoded in the user info and the vhost.
const ENCODE: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

fn encode(text: &str) -> String {
    percent_encoding::utf8_percent_encode(text, ENCODE).to_string()
}

proptest! {
    #![proptest_config(Cases::with_cases(256))]

    #[test]
    fn broker_urls_round_trip_and_never_show_the_password(
        user in "\\PC{1,12}",
        password in "\\PC{1,16}".prop_filter("not only the mask's stars", |p| p.chars().any(|c| c != '*')),
        (host_text, host) in host(),
        port in proptest::option::of(1u16..),
        // A URL path segment of "." or ".." (even percent-encoded) is a dot segment that URL
        // parsing removes, so vhosts of those names cannot be written in a URL.
        vhost in "\\PC{1,10}".prop_filter("not a dot segment", |v| v != "." && v != ".."),
        tls in any::<bool>(),
    ) {
        let scheme = if tls { "amqps" } else { "amqp" };
        let port_text = port.map(|p| format!(":{p}")).unwrap_or_default();
        let text = format!(
            "{scheme}://{}:{}@{host_text}{port_text}/{}",
            encode(&user),
            encode(&password),
            encode(&vhost)
        );
        let url = BrokerUrl::parse(&text).map_err(|e| TestCaseError::fail(format!("{text}: {e}")))?;
        prop_assert_eq!(url.username(), user.clone());
        prop_assert_eq!(url.password(), password.clone());
        prop_assert_eq!(url.host(), host.as_str());
        prop_assert_eq!(url.port(), port.unwrap_or(if tls { 5671 } else { 5672 }));
        prop_assert_eq!(url.vhost(), vhost.clone());

        // What warren prints parses back to the same broker, with the password masked.
        let shown = url.to_string();
        let back = BrokerUrl::parse(&shown).map_err(|e| TestCaseError::fail(format!("{shown}: {e}")))?;
        prop_assert_eq!(back.password(), "***");
        prop_assert_eq!(
            (back.username(), back.host().to_string(), back.port(), back.vhost()),
            (user, host, url.port(), vhost)
        );
        // A library's error that quotes the URL, raw or decoded, loses the password.
        let said = url.redact(&format!("cannot connect to {text}: bad password {password}"));
        prop_assert!(!said.contains(&password), "{said:?} shows {password:?}");
        prop_assert!(!said.contains(&encode(&password)), "{said:?} shows the encoded password");
    }
}

// ---------------------------------------------------------------------------------------------
// The pipe handler against an adversarial program.

/// What the adversarial program does after reading a frame, in order.
#[derive(Debug, Clone)]
enum Act {
    /// `TAG VERB`: a real answer.
    Answer(&'static str),
    /// An answer that names another tag (a stale, repeated or guessed one).
    OtherTag(i64, &'static str),
    /// An answer without a tag (protocol 1).
    Untagged(&'static str),
    /// `TAG VERB` without its newline, for a later write to complete or spoil.
    Partial(&'static str),
    Newline,
    Bytes(Vec<u8>),
    /// A line longer than an answer may be.
    Long,
    SleepMs(u8),
    Exit(u8),
    CloseStdout,
}

fn verb() -> impl Strategy<Value = &'static str> {
    prop_oneof![
        Just("ack"),
        Just("retry"),
        Just("dead"),
        Just("dead why"),
        Just("ok")
    ]
}

fn act() -> impl Strategy<Value = Act> {
    prop_oneof![
        4 => verb().prop_map(Act::Answer),
        2 => (prop_oneof![Just(-1i64), Just(1), Just(-7), Just(1000)], verb())
            .prop_map(|(d, v)| Act::OtherTag(d, v)),
        1 => verb().prop_map(Act::Untagged),
        1 => verb().prop_map(Act::Partial),
        1 => Just(Act::Newline),
        2 => proptest::collection::vec(any::<u8>(), 0..40).prop_map(Act::Bytes),
        1 => Just(Act::Long),
        1 => (0u8..30).prop_map(Act::SleepMs),
        1 => prop_oneof![Just(0u8), Just(3)].prop_map(Act::Exit),
        1 => Just(Act::CloseStdout),
    ]
}

impl Act {
    fn to_json(&self) -> String {
        match self {
            Act::Answer(v) => format!("[\"answer\", {v:?}]"),
            Act::OtherTag(d, v) => format!("[\"other\", {d}, {v:?}]"),
            Act::Untagged(v) => format!("[\"untagged\", {v:?}]"),
            Act::Partial(v) => format!("[\"partial\", {v:?}]"),
            Act::Newline => "[\"newline\"]".into(),
            Act::Bytes(b) => format!("[\"bytes\", {b:?}]"),
            Act::Long => "[\"long\"]".into(),
            Act::SleepMs(ms) => format!("[\"sleep\", {ms}]"),
            Act::Exit(code) => format!("[\"exit\", {code}]"),
            Act::CloseStdout => "[\"close\"]".into(),
        }
    }
}

/// The adversarial program: for each frame it reads, it records `TAG ID` in `frames`, then does
/// what the script (`argv[1]`, JSON: id → acts) says for that id, and records every byte it
/// writes to stdout in `out.PID`.
const ADVERSARY: &str = r#"import json, os, sys, time
script, d = json.load(open(sys.argv[1])), sys.argv[2]
out = open(os.path.join(d, "out.%d" % os.getpid()), "ab", buffering=0)
frames = open(os.path.join(d, "frames"), "ab", buffering=0)
stdin = sys.stdin.buffer
def write(data):
    out.write(data)
    try:
        os.write(1, data)
    except OSError:
        pass
while True:
    line = stdin.readline()
    if not line:
        break
    header = json.loads(line)
    ident = stdin.read(header["size"]).decode()
    tag = header["tag"]
    frames.write(b"%d %s\n" % (tag, ident.encode()))
    for act in script.get(ident, []):
        kind = act[0]
        if kind == "answer":
            write(b"%d %s\n" % (tag, act[1].encode()))
        elif kind == "other":
            write(b"%d %s\n" % (tag + act[1], act[2].encode()))
        elif kind == "untagged":
            write(act[1].encode() + b"\n")
        elif kind == "partial":
            write(b"%d %s" % (tag, act[1].encode()))
        elif kind == "newline":
            write(b"\n")
        elif kind == "bytes":
            write(bytes(act[1]))
        elif kind == "long":
            write(b"%d ack " % tag + b"x" * 5000 + b"\n")
        elif kind == "sleep":
            time.sleep(act[1] / 1000)
        elif kind == "exit":
            os._exit(act[1])
        elif kind == "close":
            os.close(1)
"#;

/// Every complete line the programs wrote, per program (a line never spans two programs).
fn written_lines(dir: &Path) -> BTreeSet<Vec<u8>> {
    let mut lines = BTreeSet::new();
    for entry in fs::read_dir(dir)
        .expect("read the scratch directory")
        .flatten()
    {
        if entry.file_name().to_string_lossy().starts_with("out.") {
            let bytes = fs::read(entry.path()).expect("read a program's output");
            let mut parts: Vec<&[u8]> = bytes.split(|&b| b == b'\n').collect();
            parts.pop(); // what follows the last newline is not a line
            for line in parts {
                lines.insert(line.strip_suffix(b"\r").unwrap_or(line).to_vec());
            }
        }
    }
    lines
}

proptest! {
    #![proptest_config(Cases::with_cases(24))]

    /// Whatever the program writes, and whenever, an outcome is only ever that of an answer the
    /// program wrote naming the message's tag: `Done` needs `TAG ack`, an answered retry needs
    /// `TAG retry`, `answered dead` needs `TAG dead`.
    #[test]
    fn a_pipe_program_never_gets_a_message_settled_that_it_did_not_answer(
        script in proptest::collection::vec(proptest::collection::vec(act(), 0..5), 1..6)
    ) {
        let dir = tempfile::tempdir().expect("a scratch directory");
        let program = dir.path().join("adversary.py");
        fs::write(&program, ADVERSARY).expect("write the program");
        let entries: Vec<String> = script
            .iter()
            .enumerate()
            .map(|(i, acts)| {
                let acts: Vec<String> = acts.iter().map(Act::to_json).collect();
                format!("\"m{i}\": [{}]", acts.join(", "))
            })
            .collect();
        let script_file = dir.path().join("script.json");
        fs::write(&script_file, format!("{{{}}}", entries.join(", "))).expect("write the script");

        let argv = vec![
            "python3".to_string(),
            program.display().to_string(),
            script_file.display().to_string(),
            dir.path().display().to_string(),
        ];
        let mut handler = PipeHandler::new(
            argv,
            "q",
            1,
            Duration::from_millis(400),
            Duration::from_millis(100),
        );
        let abort = Abort::never();
        let mut outcomes = Vec::new();
        for i in 0..script.len() {
            let id = format!("m{i}");
            let task = Task {
                body: id.as_bytes(),
                message_id: Some(&id),
                redelivered: false,
                queue: "q",
                worker: 1,
                attempt: 1,
                context: &Context::default(),
            };
            outcomes.push((id.clone(), handler.handle(&task, &abort)));
        }
        drop(handler);

        // Message i is the (i+1)th frame the handler wrote: its tag is i + 1 (tags grow by one
        // per message, from 1), whether or not the program lived to read it. A program may
        // answer a tag before it has read its frame (it guessed the next tag); that answer
        // still names the message.
        let mut tags: HashMap<String, Vec<String>> = (0..script.len())
            .map(|i| (format!("m{i}"), vec![(i + 1).to_string()]))
            .collect();
        for line in fs::read_to_string(dir.path().join("frames")).unwrap_or_default().lines() {
            if let Some((tag, id)) = line.split_once(' ') {
                tags.entry(id.to_string()).or_default().push(tag.to_string());
            }
        }
        let lines = written_lines(dir.path());
        let answered = |id: &str, verb: &str| {
            tags.get(id).is_some_and(|tags| {
                tags.iter().any(|tag| {
                    lines.iter().any(|line| {
                        let prefix = format!("{tag} {verb}");
                        line.starts_with(prefix.as_bytes())
                            && (line.len() == prefix.len() || line[prefix.len()] == b' ')
                    })
                })
            })
        };
        for (id, outcome) in &outcomes {
            match outcome {
                Outcome::Done => prop_assert!(answered(id, "ack"), "{id} acked unanswered: {outcomes:?}"),
                Outcome::Retry(why) if why.starts_with("answered retry") => {
                    prop_assert!(answered(id, "retry"), "{id}: {why}")
                }
                Outcome::DeadLetter { .. } => prop_assert!(answered(id, "dead"), "{id}: {outcome:?}"),
                Outcome::Reply(_) => prop_assert!(answered(id, "reply"), "{id}: {outcome:?}"),
                Outcome::Retry(_) | Outcome::Aborted => {}
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Headers of every AMQP type, through the broker.

/// A header value of any AMQP type amiquip can send.
fn amqp_value() -> impl Strategy<Value = AmqpValue> {
    prop_oneof![
        any::<bool>().prop_map(AmqpValue::Boolean),
        any::<i8>().prop_map(AmqpValue::ShortShortInt),
        any::<i16>().prop_map(AmqpValue::ShortInt),
        any::<i32>().prop_map(AmqpValue::LongInt),
        any::<i64>().prop_map(AmqpValue::LongLongInt),
        (-3i64..10).prop_map(AmqpValue::LongLongInt),
        any::<f32>().prop_map(AmqpValue::Float),
        any::<f64>().prop_map(AmqpValue::Double),
        prop_oneof!["[0-9]{1,3}", " ?[0-9]{1,2} ?", "-?[0-9]{1,20}", "\\PC{0,8}"]
            .prop_map(AmqpValue::LongString),
        any::<u64>().prop_map(AmqpValue::Timestamp),
        proptest::collection::vec(any::<u8>(), 0..8).prop_map(AmqpValue::ByteArray),
        Just(AmqpValue::Void),
        proptest::collection::vec(any::<i32>().prop_map(AmqpValue::LongInt), 0..3)
            .prop_map(AmqpValue::FieldArray),
        any::<i32>().prop_map(|n| {
            let mut table = FieldTable::new();
            table.insert("n".to_string(), AmqpValue::LongInt(n));
            AmqpValue::FieldTable(table)
        }),
    ]
}

/// The integer the broker hands back for an integer-typed value, if it is one.
fn integer(value: &AmqpValue) -> Option<i64> {
    match value {
        AmqpValue::ShortShortInt(n) => Some((*n).into()),
        AmqpValue::ShortInt(n) => Some((*n).into()),
        AmqpValue::LongInt(n) => Some((*n).into()),
        AmqpValue::LongLongInt(n) => Some(*n),
        _ => None,
    }
}

/// The attempt a handler gets for these headers, as the retry docs say: `x-warren-attempt` is
/// an integer of any width, or a decimal string, of at least 1 (else attempt 1, with a
/// warning); the broker's `x-delivery-count`, an integer of at least 0, is added (else ignored,
/// with a warning); at least 1, at most u32::MAX.
fn documented_attempt(attempt: Option<&AmqpValue>, count: Option<&AmqpValue>) -> (u32, bool) {
    let mut warned = false;
    let copies = match attempt {
        None => 1,
        Some(value) => match integer(value) {
            Some(n) if n >= 1 => n,
            None => match value {
                AmqpValue::LongString(s) => match s.trim().parse::<i64>() {
                    Ok(n) if n >= 1 => n,
                    _ => {
                        warned = true;
                        1
                    }
                },
                _ => {
                    warned = true;
                    1
                }
            },
            Some(_) => {
                warned = true;
                1
            }
        },
    };
    let returned = match count {
        None => 0,
        Some(value) => match integer(value) {
            Some(n) if n >= 0 => n,
            _ => {
                warned = true;
                0
            }
        },
    };
    let attempt = copies
        .saturating_add(returned)
        .clamp(1, i64::from(u32::MAX));
    (attempt as u32, warned)
}

proptest! {
    #![proptest_config(Cases::with_cases(64))]

    #[test]
    fn attempt_headers_of_every_amqp_type_reach_handlers_as_documented(
        attempt in proptest::option::of(amqp_value()),
        count in proptest::option::of(amqp_value()),
    ) {
        let broker = util::BrokerLock::shared();
        let queue = broker.queue("generated-headers");
        util::declare_durable(&queue);
        let connection = Connection::insecure_open(&util::amqp_url());
        let mut connection = connection.map_err(|e| TestCaseError::fail(format!(
            "cannot reach the test broker: {e}. Start RabbitMQ or set WARREN_TEST_AMQP_URL"
        )))?;
        let channel = connection.open_channel(None).expect("open a channel");
        let mut headers = FieldTable::new();
        if let Some(value) = &attempt {
            headers.insert("x-warren-attempt".to_string(), value.clone());
        }
        if let Some(value) = &count {
            headers.insert("x-delivery-count".to_string(), value.clone());
        }
        channel
            .basic_publish(
                "",
                Publish::with_properties(b"x", &queue, AmqpProperties::default().with_headers(headers)),
            )
            .expect("publish");
        let session = util::session();
        let mut delivery = None;
        util::wait_until(Duration::from_secs(10), "the message to arrive", || {
            delivery = session.take(&queue).expect("basic.get");
            delivery.is_some()
        });
        let delivery = delivery.expect("taken");
        let (got, warning) = warren::retry::attempt(&delivery);
        let (expected, warned) = documented_attempt(attempt.as_ref(), count.as_ref());
        prop_assert_eq!(got, expected, "x-warren-attempt {:?}, x-delivery-count {:?}", attempt, count);
        prop_assert_eq!(warning.is_some(), warned, "warning: {:?}", warning);
        session.ack(delivery).expect("ack");
        let _ = connection.close();
    }
}
