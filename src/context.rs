//! The message's context as handler programs see it: its routing, its properties and its AMQP
//! headers, given to a `command` as environment variables ([`Context::environment`]) and to a
//! `pipe` program in its JSON header line (the [`serde::Serialize`] of [`Context`]).
//!
//! One rule names every header's variable: `WARREN_HEADER_` and the header's name, with ASCII
//! letters upper-cased and every other character but a digit written `_`. So no header can set
//! or overwrite any other variable: each one lands under that prefix, which no other variable
//! uses. `TRACEPARENT` and `TRACESTATE` are the one exception, by design: they are set from the
//! `traceparent` and `tracestate` headers only when the first is valid W3C trace context.
//!
//! Values keep their AMQP type in JSON and take one text form in the environment (see
//! [`Value`]). The environment holds little (Linux refuses a variable over 128 KiB and a program
//! whose environment and arguments pass about 2 MiB), so a header's variable is left out past
//! [`MAX_VALUE`] bytes or once the headers' variables reach [`MAX_TOTAL`] together; the names of
//! the headers left out are in `WARREN_HEADERS_OMITTED`. The JSON header line has no such cap.

use std::borrow::Cow;
use std::collections::HashSet;

use base64::Engine;
use serde::ser::{SerializeMap, SerializeSeq};
use serde::{Serialize, Serializer};

/// The prefix of every header's variable.
pub const HEADER_PREFIX: &str = "WARREN_HEADER_";
/// Set, to a JSON array of header names, when headers were left out of the environment.
pub const OMITTED: &str = "WARREN_HEADERS_OMITTED";
/// The W3C trace context variables, which OpenTelemetry's environment propagators read.
pub const TRACEPARENT: &str = "TRACEPARENT";
pub const TRACESTATE: &str = "TRACESTATE";
/// The longest header value, in bytes of its text form, given as a variable.
pub const MAX_VALUE: usize = 64 * 1024;
/// The most bytes (names, values and their `=` and NUL) that the headers' variables take together.
pub const MAX_TOTAL: usize = 256 * 1024;
/// The headers in which warren keeps where a message was first published, when it republishes it
/// to a retry queue or the dead-letter queue: the copies are published to the default exchange,
/// and the handler of a later attempt should still see the producer's exchange and routing key.
pub const EXCHANGE_HEADER: &str = "x-warren-exchange";
pub const ROUTING_KEY_HEADER: &str = "x-warren-routing-key";

/// What a message carries besides its body and the fields every handler gets.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Context<'a> {
    /// The exchange the producer published to; empty for the default exchange.
    pub exchange: &'a str,
    pub routing_key: &'a str,
    pub correlation_id: Option<&'a str>,
    pub reply_to: Option<&'a str>,
    /// Seconds since the Unix epoch, as AMQP's `timestamp` property holds it.
    pub timestamp: Option<u64>,
    pub content_type: Option<&'a str>,
    pub content_encoding: Option<&'a str>,
    /// The `type` property.
    pub kind: Option<&'a str>,
    pub app_id: Option<&'a str>,
    /// In the order the message holds them (RabbitMQ's clients sort them by name).
    pub headers: Vec<(&'a str, Value<'a>)>,
}

/// The context of a message that has none: no property, no header, the default exchange.
pub static NONE: Context<'static> = Context {
    exchange: "",
    routing_key: "",
    correlation_id: None,
    reply_to: None,
    timestamp: None,
    content_type: None,
    content_encoding: None,
    kind: None,
    app_id: None,
    headers: Vec::new(),
};

/// A header's value, by AMQP field type.
///
/// | type | environment | JSON |
/// |---|---|---|
/// | string | as is | string |
/// | integer, signed or not, any width | decimal | number |
/// | float, double | shortest decimal that reads back the same (`1.5`, `1e+300`); `NaN`, `Infinity`, `-Infinity` | number; those three as strings |
/// | boolean | `true`, `false` | boolean |
/// | timestamp | seconds since the Unix epoch | number |
/// | decimal | its digits with the point (`12.34`) | that text as a string |
/// | byte array | base64 (RFC 4648, padded) | that text as a string |
/// | table, array | its JSON | object, array |
/// | void | empty | null |
#[derive(Debug, Clone, PartialEq)]
pub enum Value<'a> {
    Str(&'a str),
    Int(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    Timestamp(u64),
    Decimal { scale: u8, value: u32 },
    Bytes(&'a [u8]),
    Table(Vec<(&'a str, Value<'a>)>),
    Array(Vec<Value<'a>>),
    Void,
}

impl Value<'_> {
    /// The value's text in the environment; `None` for a string with a NUL byte, which no
    /// variable can hold.
    pub fn text(&self) -> Option<Cow<'_, str>> {
        Some(match self {
            Value::Str(s) if s.contains('\0') => return None,
            Value::Str(s) => Cow::Borrowed(s),
            Value::Int(i) => Cow::Owned(i.to_string()),
            Value::Timestamp(t) => Cow::Owned(t.to_string()),
            Value::F32(f) => float_text(*f as f64, || json(f)),
            Value::F64(f) => float_text(*f, || json(f)),
            Value::Bool(b) => Cow::Borrowed(if *b { "true" } else { "false" }),
            Value::Decimal { scale, value } => Cow::Owned(decimal(*scale, *value)),
            Value::Bytes(bytes) => {
                Cow::Owned(base64::engine::general_purpose::STANDARD.encode(bytes))
            }
            Value::Table(_) | Value::Array(_) => Cow::Owned(json(self)),
            Value::Void => Cow::Borrowed(""),
        })
    }
}

fn json(value: &impl Serialize) -> String {
    serde_json::to_string(value).expect("invariant: a header value serialises")
}

/// A float's text: `finite` for a finite one, the names JavaScript and Python give the others.
fn float_text(f: f64, finite: impl FnOnce() -> String) -> Cow<'static, str> {
    match f {
        f if f.is_nan() => Cow::Borrowed("NaN"),
        f if f == f64::INFINITY => Cow::Borrowed("Infinity"),
        f if f == f64::NEG_INFINITY => Cow::Borrowed("-Infinity"),
        _ => Cow::Owned(finite()),
    }
}

/// An AMQP decimal, `value` × 10^-`scale`, written out exactly.
fn decimal(scale: u8, value: u32) -> String {
    let digits = value.to_string();
    let scale = usize::from(scale);
    if scale == 0 {
        return digits;
    }
    let digits = format!("{digits:0>width$}", width = scale + 1);
    let (whole, fraction) = digits.split_at(digits.len() - scale);
    format!("{whole}.{fraction}")
}

impl Serialize for Value<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            Value::Str(s) => serializer.serialize_str(s),
            Value::Int(i) => serializer.serialize_i64(*i),
            Value::Timestamp(t) => serializer.serialize_u64(*t),
            Value::F32(f) if f.is_finite() => serializer.serialize_f32(*f),
            Value::F64(f) if f.is_finite() => serializer.serialize_f64(*f),
            Value::F32(_) | Value::F64(_) | Value::Decimal { .. } | Value::Bytes(_) => {
                serializer.serialize_str(&self.text().expect("invariant: not a string"))
            }
            Value::Bool(b) => serializer.serialize_bool(*b),
            Value::Table(fields) => serialize_fields(fields, serializer),
            Value::Array(items) => {
                let mut seq = serializer.serialize_seq(Some(items.len()))?;
                for item in items {
                    seq.serialize_element(item)?;
                }
                seq.end()
            }
            Value::Void => serializer.serialize_unit(),
        }
    }
}

fn serialize_fields<S: Serializer>(
    fields: &[(&str, Value<'_>)],
    serializer: S,
) -> Result<S::Ok, S::Error> {
    let mut map = serializer.serialize_map(Some(fields.len()))?;
    for (name, value) in fields {
        map.serialize_entry(name, value)?;
    }
    map.end()
}

/// The variables a `command` gets for a message, beside those every program gets.
#[derive(Debug, Default, PartialEq)]
pub struct Environment {
    pub vars: Vec<(String, String)>,
    /// The names of the headers left out: too large, too many, holding a NUL byte, or named so
    /// that an earlier header took their variable.
    pub omitted: Vec<String>,
}

impl Context<'_> {
    /// The variables for the message's routing and properties (set, empty when the message has
    /// none), the trace context when valid, and one per header as far as the caps allow.
    pub fn environment(&self) -> Environment {
        let mut vars: Vec<(String, String)> = [
            ("WARREN_EXCHANGE", Some(self.exchange)),
            ("WARREN_ROUTING_KEY", Some(self.routing_key)),
            ("WARREN_CORRELATION_ID", self.correlation_id),
            ("WARREN_REPLY_TO", self.reply_to),
            ("WARREN_CONTENT_TYPE", self.content_type),
            ("WARREN_CONTENT_ENCODING", self.content_encoding),
            ("WARREN_TYPE", self.kind),
            ("WARREN_APP_ID", self.app_id),
        ]
        .into_iter()
        .map(|(name, value)| (name.to_string(), clean(value.unwrap_or(""))))
        .collect();
        vars.push((
            "WARREN_TIMESTAMP".into(),
            self.timestamp.map(|t| t.to_string()).unwrap_or_default(),
        ));
        if let Some((parent, state)) = self.trace() {
            vars.push((TRACEPARENT.into(), parent.into()));
            if let Some(state) = state {
                vars.push((TRACESTATE.into(), state.into()));
            }
        }
        let mut omitted = Vec::new();
        let mut total = 0;
        // The header variables set so far: a message may carry thousands of headers.
        let mut taken = HashSet::new();
        for (name, value) in &self.headers {
            let var = variable(name);
            let fits = value.text().filter(|text| {
                text.len() <= MAX_VALUE && total + var.len() + text.len() + 2 <= MAX_TOTAL
            });
            match fits {
                Some(text) if taken.insert(var.clone()) => {
                    total += var.len() + text.len() + 2;
                    vars.push((var, text.into_owned()));
                }
                _ => omitted.push(name.to_string()),
            }
        }
        if !omitted.is_empty() {
            vars.push((OMITTED.into(), omitted_list(&omitted)));
        }
        Environment { vars, omitted }
    }

    /// The `traceparent` header and, beside it, the `tracestate` one, when the first is a
    /// valid W3C `traceparent`.
    pub fn trace(&self) -> Option<(&str, Option<&str>)> {
        let header = |wanted: &str| {
            self.headers.iter().find_map(|(name, value)| match value {
                Value::Str(s) if *name == wanted => Some(*s),
                _ => None,
            })
        };
        let parent = header("traceparent").filter(|p| valid_traceparent(p))?;
        let state = header("tracestate").filter(|s| !s.contains('\0') && s.len() <= MAX_VALUE);
        Some((parent, state))
    }
}

/// A property's text as a variable can hold it: a NUL byte ends it. Properties are AMQP short
/// strings, at most 255 bytes.
fn clean(value: &str) -> String {
    value.split('\0').next().unwrap_or("").to_string()
}

/// The JSON array of the `omitted` header names, cut to [`MAX_VALUE`] bytes: names past that are
/// left out of it, and its last element is then `"..."`.
fn omitted_list(omitted: &[String]) -> String {
    let mut list = json(&omitted);
    let mut kept = omitted.len();
    while list.len() > MAX_VALUE && kept > 0 {
        kept = kept * 3 / 4;
        let mut shorter: Vec<&str> = omitted[..kept].iter().map(String::as_str).collect();
        shorter.push("...");
        list = json(&shorter);
    }
    list
}

/// The variable of the header `name`.
pub fn variable(name: &str) -> String {
    let mut var = String::with_capacity(HEADER_PREFIX.len() + name.len());
    var.push_str(HEADER_PREFIX);
    var.extend(name.chars().map(|c| match c {
        'a'..='z' | 'A'..='Z' | '0'..='9' => c.to_ascii_uppercase(),
        _ => '_',
    }));
    var
}

/// True for a `traceparent` as W3C Trace Context level 1 defines it: `version-traceid-parentid-
/// flags` in lower-case hex, a version other than `ff`, ids not all zero; a later version may
/// append fields after a `-`.
fn valid_traceparent(value: &str) -> bool {
    let hex = |s: &str, len: usize| {
        s.len() == len && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    };
    let nonzero = |s: &str| s.bytes().any(|b| b != b'0');
    let mut fields = value.splitn(5, '-');
    let (Some(version), Some(trace), Some(parent), Some(flags)) =
        (fields.next(), fields.next(), fields.next(), fields.next())
    else {
        return false;
    };
    let rest = fields.next();
    hex(version, 2)
        && version != "ff"
        && hex(trace, 32)
        && nonzero(trace)
        && hex(parent, 16)
        && nonzero(parent)
        && hex(flags, 2)
        && (rest.is_none() || version != "00")
}

/// The JSON header line's fields: each property the message has, the trace context when valid,
/// and every header, whatever its size.
impl Serialize for Context<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(None)?;
        map.serialize_entry("exchange", self.exchange)?;
        map.serialize_entry("routing_key", self.routing_key)?;
        let properties = [
            ("correlation_id", self.correlation_id),
            ("reply_to", self.reply_to),
            ("content_type", self.content_type),
            ("content_encoding", self.content_encoding),
            ("type", self.kind),
            ("app_id", self.app_id),
        ];
        for (name, value) in properties {
            if let Some(value) = value {
                map.serialize_entry(name, value)?;
            }
        }
        if let Some(timestamp) = self.timestamp {
            map.serialize_entry("timestamp", &timestamp)?;
        }
        if let Some((parent, state)) = self.trace() {
            map.serialize_entry("traceparent", parent)?;
            if let Some(state) = state {
                map.serialize_entry("tracestate", state)?;
            }
        }
        map.serialize_entry("headers", &Fields(&self.headers))?;
        map.end()
    }
}

struct Fields<'a, 'b>(&'a [(&'b str, Value<'b>)]);

impl Serialize for Fields<'_, '_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serialize_fields(self.0, serializer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn var<'e>(env: &'e Environment, name: &str) -> Option<&'e str> {
        env.vars
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    #[test]
    fn a_header_variable_is_the_prefix_and_the_name_upper_cased_with_underscores() {
        assert_eq!(variable("tenant"), "WARREN_HEADER_TENANT");
        assert_eq!(variable("x-Request-id"), "WARREN_HEADER_X_REQUEST_ID");
        assert_eq!(variable(""), "WARREN_HEADER_");
        assert_eq!(variable("a.b c=d"), "WARREN_HEADER_A_B_C_D");
        assert_eq!(variable("é9"), "WARREN_HEADER__9");
        assert_eq!(variable("../PATH"), "WARREN_HEADER____PATH");
    }

    #[test]
    fn each_type_has_one_text_form_and_one_json_form() {
        let table = Value::Table(vec![
            ("n", Value::Int(-1)),
            ("list", Value::Array(vec![Value::Bool(true), Value::Void])),
        ]);
        let cases = [
            (Value::Str("héllo"), "héllo", r#""héllo""#),
            (Value::Int(-42), "-42", "-42"),
            (Value::Int(4_294_967_295), "4294967295", "4294967295"),
            (Value::F32(1.1), "1.1", "1.1"),
            (Value::F64(2.0), "2.0", "2.0"),
            (Value::F64(1e300), "1e+300", "1e+300"),
            (Value::F64(f64::NAN), "NaN", r#""NaN""#),
            (Value::F64(f64::NEG_INFINITY), "-Infinity", r#""-Infinity""#),
            (Value::Bool(false), "false", "false"),
            (Value::Timestamp(1_700_000_000), "1700000000", "1700000000"),
            (
                Value::Decimal {
                    scale: 2,
                    value: 1234,
                },
                "12.34",
                r#""12.34""#,
            ),
            (Value::Decimal { scale: 3, value: 5 }, "0.005", r#""0.005""#),
            (Value::Decimal { scale: 0, value: 7 }, "7", r#""7""#),
            (Value::Bytes(&[0, 1, 254, 255]), "AAH+/w==", r#""AAH+/w==""#),
            (
                table,
                r#"{"n":-1,"list":[true,null]}"#,
                r#"{"n":-1,"list":[true,null]}"#,
            ),
            (Value::Void, "", "null"),
        ];
        for (value, text, json) in cases {
            assert_eq!(value.text().as_deref(), Some(text), "{value:?}");
            assert_eq!(serde_json::to_string(&value).unwrap(), json, "{value:?}");
        }
        assert_eq!(Value::Str("a\0b").text(), None);
    }

    #[test]
    fn properties_are_always_set_and_headers_cannot_reach_other_variables() {
        let context = Context {
            exchange: "orders",
            routing_key: "eu.new",
            correlation_id: Some("c-1"),
            headers: vec![
                ("PATH", Value::Str("/evil")),
                ("WARREN_QUEUE", Value::Str("other")),
                ("../TRACEPARENT", Value::Str("x")),
            ],
            ..Context::default()
        };
        let env = context.environment();
        assert_eq!(var(&env, "WARREN_EXCHANGE"), Some("orders"));
        assert_eq!(var(&env, "WARREN_ROUTING_KEY"), Some("eu.new"));
        assert_eq!(var(&env, "WARREN_CORRELATION_ID"), Some("c-1"));
        assert_eq!(var(&env, "WARREN_REPLY_TO"), Some(""));
        assert_eq!(var(&env, "WARREN_TIMESTAMP"), Some(""));
        assert_eq!(var(&env, "WARREN_HEADER_PATH"), Some("/evil"));
        assert_eq!(var(&env, "WARREN_HEADER_WARREN_QUEUE"), Some("other"));
        assert_eq!(var(&env, "WARREN_HEADER____TRACEPARENT"), Some("x"));
        for (name, _) in &env.vars {
            assert!(
                name.starts_with("WARREN_")
                    && !matches!(
                        name.as_str(),
                        "WARREN_QUEUE"
                            | "WARREN_WORKER"
                            | "WARREN_MESSAGE_ID"
                            | "WARREN_ATTEMPT"
                            | "WARREN_REDELIVERED"
                            | "WARREN_PIPE_PROTOCOL"
                    ),
                "{name}"
            );
        }
        assert_eq!(var(&env, OMITTED), None);
    }

    #[test]
    fn headers_past_the_caps_or_sharing_a_variable_are_left_out_and_named() {
        let big = "x".repeat(MAX_VALUE + 1);
        let fits = "y".repeat(MAX_VALUE);
        let mut headers = vec![
            ("a-b", Value::Str("first")),
            ("a_b", Value::Str("second")),
            ("big", Value::Str(&big)),
            ("nul", Value::Str("a\0b")),
        ];
        let names: Vec<String> = (0..5).map(|i| format!("fits{i}")).collect();
        headers.extend(names.iter().map(|n| (n.as_str(), Value::Str(&fits))));
        let env = Context {
            headers,
            ..Context::default()
        }
        .environment();
        assert_eq!(var(&env, "WARREN_HEADER_A_B"), Some("first"));
        assert!(var(&env, "WARREN_HEADER_FITS2").is_some());
        assert_eq!(var(&env, "WARREN_HEADER_FITS3"), None, "past MAX_TOTAL");
        assert_eq!(env.omitted, ["a_b", "big", "nul", "fits3", "fits4"]);
        assert_eq!(
            var(&env, OMITTED),
            Some(r#"["a_b","big","nul","fits3","fits4"]"#)
        );
        let total: usize = (env.vars.iter())
            .filter(|(n, _)| n.starts_with(HEADER_PREFIX))
            .map(|(n, v)| n.len() + v.len() + 2)
            .sum();
        assert!(total <= MAX_TOTAL);
    }

    #[test]
    fn the_list_of_headers_left_out_is_itself_capped() {
        // Names that JSON escapes grow six-fold: a broker's frame of them would pass the cap.
        let names: Vec<String> = (0..20_000).map(|i| format!("\u{1}{i}")).collect();
        let big = "x".repeat(MAX_VALUE + 1);
        let env = Context {
            headers: names
                .iter()
                .map(|n| (n.as_str(), Value::Str(&big)))
                .collect(),
            ..Context::default()
        }
        .environment();
        let list = var(&env, OMITTED).expect("some were left out");
        assert!(list.len() <= MAX_VALUE, "{}", list.len());
        let parsed: Vec<String> = serde_json::from_str(list).expect("a JSON array");
        assert_eq!(parsed.last().map(String::as_str), Some("..."));
        assert_eq!(env.omitted.len(), names.len());
    }

    #[test]
    fn only_a_valid_traceparent_sets_the_trace_context() {
        let valid = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let with = |parent: &'static str| Context {
            headers: vec![
                ("traceparent", Value::Str(parent)),
                ("tracestate", Value::Str("congo=t61rcWkgMzE")),
            ],
            ..Context::default()
        };
        let env = with(valid).environment();
        assert_eq!(var(&env, TRACEPARENT), Some(valid));
        assert_eq!(var(&env, TRACESTATE), Some("congo=t61rcWkgMzE"));
        assert_eq!(var(&env, "WARREN_HEADER_TRACEPARENT"), Some(valid));
        let json = serde_json::to_value(with(valid)).unwrap();
        assert_eq!(json["traceparent"], valid);
        assert_eq!(json["tracestate"], "congo=t61rcWkgMzE");
        for invalid in [
            "",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
        ] {
            let env = with(invalid).environment();
            assert_eq!(var(&env, TRACEPARENT), None, "{invalid}");
            assert_eq!(var(&env, TRACESTATE), None, "{invalid}");
            let json = serde_json::to_value(with(invalid)).unwrap();
            assert!(json.get("traceparent").is_none(), "{invalid}");
        }
        assert!(valid_traceparent(
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-later"
        ));
    }

    #[test]
    fn the_json_fields_are_the_properties_the_message_has_and_its_headers() {
        let context = Context {
            exchange: "",
            routing_key: "jobs",
            reply_to: Some("amq.rabbitmq.reply-to"),
            timestamp: Some(1_700_000_000),
            kind: Some("invoice"),
            headers: vec![("", Value::Str("empty name")), ("n", Value::Int(7))],
            ..Context::default()
        };
        assert_eq!(
            serde_json::to_string(&context).unwrap(),
            r#"{"exchange":"","routing_key":"jobs","reply_to":"amq.rabbitmq.reply-to","type":"invoice","timestamp":1700000000,"headers":{"":"empty name","n":7}}"#
        );
    }
}
