//! The TOML configuration: parsed and validated once, at start, into a [`Config`] that is then
//! passed explicitly to whoever needs it (never a global).
//!
//! Every error this module returns is one line that names the file, the line and the key, so that
//! an operator can fix it without reading the source. This module never touches the broker; it
//! only checks that the broker URL is well formed.

use std::collections::BTreeMap;
use std::fmt;
use std::fs;
use std::ops::Range;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::{self, Deserializer};
use serde::ser::{SerializeMap, Serializer};
use serde::{Deserialize, Serialize};
use toml::Spanned;

use crate::tls::{Tls, TlsSection};

/// Where the configuration is read from when neither `--config` nor `WARREN_CONFIG` names it.
pub const DEFAULT_PATH: &str = "/etc/warren/warren.toml";

/// The environment variable that overrides `broker.url`, so that the password can live outside
/// the file (for example in a systemd `EnvironmentFile`).
pub const BROKER_URL_ENV: &str = "WARREN_BROKER_URL";

/// A configuration error: one line naming the file, the line and the key.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(String);

impl ConfigError {
    /// An error about something other than the file, such as an environment variable.
    pub fn new(message: String) -> ConfigError {
        ConfigError(message)
    }

    fn at(path: &Path, source: &str, span: Option<Range<usize>>, message: &str) -> ConfigError {
        let location = match span {
            Some(span) => {
                let line = line_number(source, span.start);
                match key_at(source, span.start) {
                    Some(key) => format!("{}:{line}: {key}", path.display()),
                    None => format!("{}:{line}", path.display()),
                }
            }
            None => path.display().to_string(),
        };
        ConfigError(format!("{location}: {}", one_line(message)))
    }

    /// An error about `key` of `[table]`: at its line when the file has it as `key = ...` in
    /// that table, else (an inline table, say) naming `table.key` after the file.
    fn at_key(path: &Path, source: &str, table: &str, key: &str, message: &str) -> ConfigError {
        match find_key(source, table, key) {
            Some(span) => ConfigError::at(path, source, Some(span), message),
            None => ConfigError(format!(
                "{}: {table}.{key}: {}",
                path.display(),
                one_line(message)
            )),
        }
    }
}

/// The validated configuration of one warren process. It serializes as TOML with the file's keys
/// and every default filled in, for `warren check-config`. The broker URLs serialize masked
/// ([`BrokerUrl`]); a password in the handler's command does not: `ops::effective` masks it.
#[derive(Debug, Clone, Serialize)]
pub struct Config {
    /// The file this configuration was read from, for messages.
    #[serde(skip)]
    pub path: PathBuf,
    pub broker: Broker,
    pub queue: Queue,
    pub workers: Workers,
    /// Required by `warren run` (see [`Config::handler`]), not by `warren publish`, so that a
    /// producer's file needs only `[broker]` and `[queue]`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub handler: Option<HandlerConfig>,
    pub retry: Retry,
    pub shutdown: Shutdown,
    pub breaker: BreakerConfig,
    pub control: Control,
    pub metrics: MetricsConfig,
    pub log: LogConfig,
}

/// The HTTP endpoint for `/metrics` and `/healthz`; off unless `listen` is set.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listen: Option<std::net::SocketAddr>,
    /// How often the depth of the work queue, its retry queues and its dead-letter queue is read
    /// from the broker for `/metrics`; zero turns it off. Only with `listen`.
    #[serde(
        default = "default_queue_depth_interval",
        deserialize_with = "duration",
        serialize_with = "human"
    )]
    pub queue_depth_interval: Duration,
}

/// The circuit breaker: stop taking messages while the handler's dependency is down.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct BreakerConfig {
    #[serde(default = "yes")]
    pub enabled: bool,
    /// How many of the latest outcomes (acks and failed attempts) it judges…
    #[serde(
        default = "default_breaker_outcomes",
        deserialize_with = "positive_u32"
    )]
    pub outcomes: u32,
    /// …forgetting those older than this.
    #[serde(
        default = "default_breaker_window",
        deserialize_with = "duration",
        serialize_with = "human"
    )]
    pub window: Duration,
    /// It trips when failures are at least this share of them…
    #[serde(default = "default_breaker_ratio")]
    pub failure_ratio: f64,
    /// …at least this many…
    #[serde(
        default = "default_breaker_failures",
        deserialize_with = "positive_u32"
    )]
    pub min_failures: u32,
    /// …of at least this many different messages.
    #[serde(
        default = "default_breaker_messages",
        deserialize_with = "positive_u32"
    )]
    pub min_messages: u32,
    /// How long it stays open before the first probe; each failed probe doubles it.
    #[serde(
        default = "default_breaker_cooldown",
        deserialize_with = "duration",
        serialize_with = "human"
    )]
    pub cooldown: Duration,
    #[serde(
        default = "default_breaker_max_cooldown",
        deserialize_with = "duration",
        serialize_with = "human"
    )]
    pub max_cooldown: Duration,
}

/// The control socket that `warren pause`, `resume` and `reload` talk to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Control {
    pub socket: PathBuf,
    /// The socket was set in the file, not derived from the file's name: failing to listen on it
    /// is an error, not a warning.
    pub explicit: bool,
}

/// Only a socket the file set is written: the default follows the file's name.
impl Serialize for Control {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(None)?;
        if self.explicit {
            map.serialize_entry("socket", &self.socket.display().to_string())?;
        }
        map.end()
    }
}

/// Where the control socket of the configuration at `path` is, unless the file sets one: in
/// systemd's RuntimeDirectory for warren, named after the file (`orders.toml` listens on
/// `/run/warren/orders.sock`).
pub fn default_control_socket(path: &Path) -> PathBuf {
    let stem = path
        .file_stem()
        .map(|stem| stem.to_string_lossy().into_owned())
        .unwrap_or_else(|| "warren".into());
    Path::new(RUNTIME_DIR).join(format!("{stem}.sock"))
}

/// The directory of the default control sockets; the units make it (RuntimeDirectory=warren).
pub const RUNTIME_DIR: &str = "/run/warren";

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    #[serde(default)]
    pub format: LogFormat,
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// One line of text per event.
    #[default]
    Text,
    /// One JSON object per line, for log shippers.
    Json,
}

#[derive(Debug, Clone, Serialize)]
pub struct Broker {
    /// The nodes of the broker (one, or the nodes of a cluster). Never empty. Serialized as
    /// `url` for one node, `urls` for several.
    #[serde(flatten, serialize_with = "url_or_urls")]
    pub urls: Vec<BrokerUrl>,
    /// Where `urls` came from.
    #[serde(skip)]
    pub url_source: UrlSource,
    /// Heartbeat interval in whole seconds; 0 disables heartbeats.
    #[serde(serialize_with = "heartbeat_text")]
    pub heartbeat: u16,
    #[serde(serialize_with = "human")]
    pub connect_timeout: Duration,
    /// The broker's `consumer_timeout`: it closes a channel whose delivery stays unacked longer.
    /// warren does not set it; it refuses a handler timeout that could outlast it.
    #[serde(serialize_with = "human")]
    pub consumer_timeout: Duration,
    /// How to make `amqps://` connections: set when any URL is one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls: Option<Tls>,
}

/// Where the broker URLs came from: the file, or an override that keeps the password out of it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum UrlSource {
    /// `broker.url` or `broker.urls`, or the default URL when the file sets neither.
    #[default]
    File,
    /// The environment variable [`BROKER_URL_ENV`].
    Environment,
    /// The systemd credential at this path (`$CREDENTIALS_DIRECTORY/broker-url`).
    Credential(PathBuf),
}

impl fmt::Display for UrlSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UrlSource::File => f.write_str("the configuration file"),
            UrlSource::Environment => f.write_str(BROKER_URL_ENV),
            UrlSource::Credential(path) => write!(f, "the systemd credential {}", path.display()),
        }
    }
}

/// Broker URLs that replace the file's, one or several separated by commas, and where they came
/// from.
#[derive(Debug, Clone)]
pub struct UrlOverride {
    pub urls: String,
    pub source: UrlSource,
}

impl Broker {
    /// The URLs, masked, for messages.
    pub fn describe(&self) -> String {
        let urls: Vec<String> = self.urls.iter().map(ToString::to_string).collect();
        urls.join(", ")
    }
}

/// The work queue and the queues warren declares around it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Queue {
    pub name: String,
    pub durable: bool,
    #[serde(rename = "type")]
    pub kind: QueueType,
    /// Where messages go after their last attempt, or when the handler rejects them.
    pub dead_letter: String,
    /// Whether warren declares its queues and exchanges at start. With false the operator owns
    /// them: warren looks them up (passive declares) and stops with exit 78 if any is missing.
    pub declare: bool,
    /// `x-priority` of every worker's consumer: the broker delivers to the consumers of the
    /// highest priority that can take a message.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub consumer_priority: Option<i32>,
    /// Extra `x-` arguments of the work queue's declare, for what a policy does not set; never
    /// one that warren sets itself (see [`owned_argument`]).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub arguments: BTreeMap<String, ArgValue>,
    /// The exchanges that route to the work queue, declared and bound at start.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub bindings: Vec<Binding>,
}

/// `[[queue.bindings]]`: an exchange, and the routing keys (or, for a headers exchange, the
/// arguments) by which it routes to the work queue.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Binding {
    pub exchange: String,
    #[serde(rename = "type", default)]
    pub kind: ExchangeType,
    #[serde(default = "yes")]
    pub durable: bool,
    /// One binding per key; none for a fanout or headers exchange.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routing_keys: Vec<String>,
    /// The binding's arguments: a headers exchange's `x-match` and the headers to match.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub arguments: BTreeMap<String, ArgValue>,
}

impl Binding {
    /// The routing keys to bind with: the configured ones, or the one empty key that a fanout
    /// or headers exchange ignores.
    pub fn keys(&self) -> Vec<&str> {
        match self.routing_keys.as_slice() {
            [] => vec![""],
            keys => keys.iter().map(String::as_str).collect(),
        }
    }

    /// RabbitMQ's own exchanges (`amq.direct`, `amq.topic`, ...) cannot be declared, only
    /// looked up.
    pub fn is_predeclared(&self) -> bool {
        self.exchange.starts_with("amq.")
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ExchangeType {
    #[default]
    Direct,
    Topic,
    Fanout,
    Headers,
}

impl ExchangeType {
    pub fn name(self) -> &'static str {
        match self {
            ExchangeType::Direct => "direct",
            ExchangeType::Topic => "topic",
            ExchangeType::Fanout => "fanout",
            ExchangeType::Headers => "headers",
        }
    }
}

/// The value of a queue or binding argument, as TOML writes it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(untagged)]
pub enum ArgValue {
    Bool(bool),
    Int(i64),
    Str(String),
}

impl Queue {
    /// A durable classic queue named `name`, with the default dead-letter queue.
    pub fn classic(name: &str) -> Queue {
        Queue {
            name: name.to_string(),
            durable: true,
            kind: QueueType::Classic,
            dead_letter: format!("{name}.dead"),
            declare: true,
            consumer_priority: None,
            arguments: BTreeMap::new(),
            bindings: Vec::new(),
        }
    }
}

/// Why `queue.arguments` may not set the work queue argument `name`, if it may not: warren sets
/// it itself (`retry.rs` does; its tests check that every one it sets on a work queue is named
/// here), or it would lose messages.
pub fn owned_argument(name: &str, kind: QueueType) -> Option<&'static str> {
    match name {
        "x-queue-type" => Some("queue.type sets it: use queue.type = \"quorum\" or \"classic\""),
        "x-delivery-limit" => Some(
            "warren sets it on a quorum queue from retry.max_attempts (the limit is max_attempts - 1): set retry.max_attempts",
        ),
        "x-dead-letter-exchange" | "x-dead-letter-routing-key" | "x-dead-letter-strategy" => Some(
            "warren owns dead-lettering: failed messages go to its retry queues and then to queue.dead_letter; set queue.dead_letter and [retry]",
        ),
        "x-overflow" if kind == QueueType::Quorum => Some(
            "warren sets it to \"reject-publish\" on a quorum queue, which at-least-once dead-lettering needs",
        ),
        // Not warren's, but they would lose messages, which warren promises never to do.
        "x-expires" => Some(
            "RabbitMQ would delete the work queue, and every message in it, once unused that long",
        ),
        "x-message-ttl" | "x-max-length" | "x-max-length-bytes" if kind == QueueType::Classic => {
            Some("a classic queue drops the messages this removes, and the retried copies coming back to it when full, where no dead-letter queue sees them: use queue.type = \"quorum\", which dead-letters them")
        }
        _ => None,
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum QueueType {
    Classic,
    /// Replicated over a cluster's nodes; the broker counts deliveries (`x-delivery-count`) and
    /// dead-letters a message delivered too often, even one that crashes warren each time.
    Quorum,
}

/// Bounded retries: a failed message is held back in a retry queue, then tried again, until
/// `max_attempts`; then it goes to the dead-letter queue.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Retry {
    #[serde(default = "default_max_attempts", deserialize_with = "attempts")]
    pub max_attempts: u32,
    #[serde(
        default = "default_retry_delay",
        deserialize_with = "duration",
        serialize_with = "human"
    )]
    pub delay: Duration,
    #[serde(
        default = "default_retry_max_delay",
        deserialize_with = "duration",
        serialize_with = "human"
    )]
    pub max_delay: Duration,
}

impl Retry {
    /// How long a message waits after failing its `attempt`-th attempt: `delay` doubled per
    /// attempt after the first, at most `max_delay`, in whole milliseconds (the broker's unit).
    pub fn delay_after(&self, attempt: u32) -> Duration {
        let delay = self
            .delay
            .saturating_mul(1 << attempt.saturating_sub(1).min(30))
            .min(self.max_delay);
        Duration::from_millis(delay.as_millis() as u64)
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Workers {
    #[serde(default = "default_count", deserialize_with = "positive")]
    pub count: usize,
    #[serde(default = "default_prefetch", deserialize_with = "prefetch")]
    pub prefetch: u16,
}

/// What runs for each message, and for how long at most.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HandlerConfig {
    #[serde(flatten)]
    pub kind: HandlerKind,
    /// A task that runs longer fails (and is retried). A command gets SIGTERM, then SIGKILL
    /// after `kill_grace`.
    #[serde(serialize_with = "human")]
    pub timeout: Duration,
    #[serde(serialize_with = "human")]
    pub kill_grace: Duration,
}

/// Serialized as the file writes it: `kind = "command"` and `command = [...]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum HandlerKind {
    /// The tutorial's handler: sleep one second per `.` in the body.
    Dots,
    /// Run a program per message, body on stdin. `argv[0]` is the program.
    Command {
        #[serde(rename = "command")]
        argv: Vec<String>,
        /// Its standard output is the answer to a message that has `reply_to`.
        #[serde(skip_serializing_if = "is_false")]
        reply: bool,
    },
    /// Run one long-lived program per worker and stream messages to it (see `pipe.rs`).
    Pipe {
        #[serde(rename = "command")]
        argv: Vec<String>,
        #[serde(flatten)]
        recycle: Recycle,
    },
}

/// When a `pipe` program is replaced by a fresh one, between two messages, so that a program that
/// leaks does not grow without end. Each limit is off when `None`, as by default.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Recycle {
    /// After this many messages (at least 1).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_tasks: Option<u64>,
    /// Once the program's resident memory (its VmRSS) reaches this many bytes.
    #[serde(
        skip_serializing_if = "Option::is_none",
        serialize_with = "size_or_none"
    )]
    pub max_memory: Option<u64>,
    /// Once the program has run this long.
    #[serde(
        skip_serializing_if = "Option::is_none",
        serialize_with = "human_or_none"
    )]
    pub max_age: Option<Duration>,
}

impl Recycle {
    /// The first limit set, by its key, for a configuration error about it.
    fn first_set(&self) -> Option<&'static str> {
        [
            (self.max_tasks.is_some(), "max_tasks"),
            (self.max_memory.is_some(), "max_memory"),
            (self.max_age.is_some(), "max_age"),
        ]
        .into_iter()
        .find_map(|(set, key)| set.then_some(key))
    }
}

impl HandlerKind {
    /// The name `kind` takes in the file.
    pub fn name(&self) -> &'static str {
        match self {
            HandlerKind::Dots => "dots",
            HandlerKind::Command { .. } => "command",
            HandlerKind::Pipe { .. } => "pipe",
        }
    }

    /// The program and its arguments, for the kinds that run one.
    pub fn argv(&self) -> Option<&[String]> {
        match self {
            HandlerKind::Dots => None,
            HandlerKind::Command { argv, .. } | HandlerKind::Pipe { argv, .. } => Some(argv),
        }
    }

    /// When a `pipe` program is recycled; never, for the other kinds.
    pub fn recycle(&self) -> Recycle {
        match self {
            HandlerKind::Pipe { recycle, .. } => *recycle,
            _ => Recycle::default(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Shutdown {
    #[serde(
        default = "default_grace",
        deserialize_with = "duration",
        serialize_with = "human"
    )]
    pub grace: Duration,
}

/// A parsed `amqp://` URL. Its `Display` masks the password, so it is safe to log.
#[derive(Clone, PartialEq, Eq)]
pub struct BrokerUrl {
    url: url::Url,
}

impl BrokerUrl {
    pub fn parse(text: &str) -> Result<BrokerUrl, String> {
        let url = url::Url::parse(text).map_err(|e| format!("invalid URL: {e}"))?;
        match url.scheme() {
            "amqp" | "amqps" => {}
            other => {
                return Err(format!(
                    "unsupported scheme {other:?}; use amqp:// or amqps://"
                ))
            }
        }
        if url.host_str().unwrap_or("").is_empty() {
            return Err("the URL has no host".into());
        }
        if url.path_segments().is_some_and(|mut s| s.nth(1).is_some()) {
            return Err("the URL path must be a single vhost, such as /%2f".into());
        }
        if url.query().is_some() {
            return Err("URL query parameters are not supported; use the [broker] keys".into());
        }
        Ok(BrokerUrl { url })
    }

    /// The host name or address, as a resolver and a TLS name check take it: an IPv6 address
    /// without the brackets of its URL.
    pub fn host(&self) -> &str {
        let host = self.url.host_str().unwrap_or("localhost");
        host.strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host)
    }

    pub fn port(&self) -> u16 {
        self.url
            .port()
            .unwrap_or(if self.is_tls() { 5671 } else { 5672 })
    }

    /// An `amqps://` URL: the connection is made over TLS.
    pub fn is_tls(&self) -> bool {
        self.url.scheme() == "amqps"
    }

    /// `host:port` (`[address]:port` for IPv6), for messages.
    pub fn address(&self) -> String {
        format!(
            "{}:{}",
            self.url.host_str().unwrap_or("localhost"),
            self.port()
        )
    }

    pub fn username(&self) -> String {
        match decode(self.url.username()) {
            user if user.is_empty() => "guest".to_string(),
            user => user,
        }
    }

    pub fn password(&self) -> String {
        self.url
            .password()
            .map(decode)
            .unwrap_or_else(|| "guest".into())
    }

    /// The virtual host; an empty path means the default vhost `/`.
    pub fn vhost(&self) -> String {
        match self.url.path().trim_start_matches('/') {
            "" => "/".to_string(),
            vhost => decode(vhost),
        }
    }

    /// Replaces every occurrence of this URL's password in `text` with `***`. Used on error texts
    /// that come from libraries, which may print the whole URL.
    pub fn redact(&self, text: &str) -> String {
        let mut text = text.to_string();
        if let Some(raw) = self.url.password() {
            for secret in [raw.to_string(), decode(raw)] {
                if !secret.is_empty() {
                    text = text.replace(&secret, "***");
                }
            }
        }
        text
    }
}

impl fmt::Display for BrokerUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut shown = self.url.clone();
        if shown.password().is_some() {
            // Setting a password only fails for URLs that cannot have one, and this one has one.
            let _ = shown.set_password(Some("***"));
        }
        f.write_str(shown.as_str())
    }
}

/// Serialized as displayed: with the password masked.
impl Serialize for BrokerUrl {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl fmt::Debug for BrokerUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BrokerUrl({self})")
    }
}

fn decode(text: &str) -> String {
    percent_encoding::percent_decode_str(text)
        .decode_utf8_lossy()
        .into_owned()
}

impl Config {
    /// Reads and validates the file at `path`. `url_override`, if any, replaces `broker.url`
    /// (see `secrets::broker_url_override`).
    ///
    /// This does not require a handler, nor check that a `command` handler's program exists: a
    /// host that only runs `warren publish` need not have it. [`Config::handler`] does both.
    pub fn load(path: &Path, url_override: Option<UrlOverride>) -> Result<Config, ConfigError> {
        let source = fs::read_to_string(path)
            .map_err(|e| ConfigError(format!("{}: cannot read: {e}", path.display())))?;
        Config::parse(path, &source, url_override)
    }

    /// Like [`Config::load`], from text already read. Each section is checked by its own
    /// function below; the broker's goes first, as the handler's limits depend on it.
    pub fn parse(
        path: &Path,
        source: &str,
        url_override: Option<UrlOverride>,
    ) -> Result<Config, ConfigError> {
        let text = FileText { path, source };
        let file: File = toml::from_str(source).map_err(|e| text.error(e.span(), e.message()))?;
        let broker = file.broker.unwrap_or_default().check(&text, url_override)?;
        let Some(queue) = file.queue else {
            return Err(ConfigError(format!(
                "{}: queue.name: missing; add a [queue] section with name = \"...\"",
                path.display()
            )));
        };
        let queue = QueueSection::check(queue, &text)?;
        let handler = file
            .handler
            .map(|section| HandlerSection::check(section, &text, broker.consumer_timeout))
            .transpose()?;
        let retry = file.retry.unwrap_or_default();
        retry.check(&text)?;
        let breaker = file.breaker.unwrap_or_default();
        breaker.check(&text)?;
        let control = match file.control.and_then(|section| section.socket) {
            Some(socket) => {
                let span = socket.span();
                let socket = socket.into_inner();
                if socket.is_relative() {
                    return Err(text.error(Some(span), "must be an absolute path"));
                }
                Control {
                    socket,
                    explicit: true,
                }
            }
            None => Control {
                socket: default_control_socket(path),
                explicit: false,
            },
        };

        Ok(Config {
            path: path.to_path_buf(),
            broker,
            queue,
            workers: file.workers.unwrap_or_default(),
            handler,
            retry,
            shutdown: file.shutdown.unwrap_or_default(),
            breaker,
            control,
            metrics: file.metrics.unwrap_or_default(),
            log: file.log.unwrap_or_default(),
        })
    }

    /// The handler, as `warren run` needs it: configured, and if it is a command, with a program
    /// that exists and is executable.
    pub fn handler(&self) -> Result<&HandlerConfig, ConfigError> {
        let handler = self.handler.as_ref().ok_or_else(|| {
            ConfigError(format!(
                "{}: handler.kind: missing; add a [handler] section with kind = \"dots\", \"command\" or \"pipe\"",
                self.path.display()
            ))
        })?;
        let Some(argv) = handler.kind.argv() else {
            return Ok(handler);
        };
        match resolve_program(&argv[0]) {
            Ok(_) => Ok(handler),
            Err(problem) => {
                let source = fs::read_to_string(&self.path).unwrap_or_default();
                let span = find_key(&source, "handler", "command");
                Err(ConfigError::at(&self.path, &source, span, &problem))
            }
        }
    }
}

/// A configuration read again while warren runs, merged into the running one: what can change
/// without a restart is taken from the new file, the rest is kept and named.
#[derive(Debug)]
pub struct Reloaded {
    pub config: Config,
    /// The changes applied, such as "workers.count 4 → 6".
    pub applied: Vec<String>,
    /// The keys that changed but take effect only after a restart.
    pub restart: Vec<String>,
    /// The handler's kind, command, timeout or kill grace changed: workers need a new handler.
    pub handler_changed: bool,
}

impl Config {
    /// Fits the handler's limits inside `limit`, the consumer_timeout the broker enforces (it
    /// named it when it closed a channel over a task that outlived it), when they do not fit
    /// already: `handler.kill_grace` becomes at most a quarter of it and `handler.timeout` at
    /// most half, so that a task is killed and its attempt failed well before the broker gives up
    /// on it. `broker.consumer_timeout` becomes `limit`, so that a reload must fit it too.
    /// Returns the handler's new limits, or None if they already fitted.
    pub fn fit_consumer_timeout(&mut self, limit: Duration) -> Option<(Duration, Duration)> {
        self.broker.consumer_timeout = self.broker.consumer_timeout.min(limit);
        let handler = self.handler.as_mut()?;
        if (handler.timeout + handler.kill_grace) * 4 <= limit * 3 {
            return None;
        }
        handler.kill_grace = handler.kill_grace.min(limit / 4);
        handler.timeout = handler.timeout.min(limit / 2);
        Some((handler.timeout, handler.kill_grace))
    }

    /// Merges `new`, read from the same file while warren runs, into this configuration. The
    /// worker count, the handler, the circuit breaker and the shutdown grace are taken from it;
    /// the broker, the queues, the retries, the prefetch, metrics, control and log keep their
    /// running values, which only a restart changes. Passwords and command lines are never
    /// shown: a changed broker or command is named, not printed.
    pub fn reloaded(&self, new: Config) -> Result<Reloaded, String> {
        let Some(handler) = new.handler.clone() else {
            return Err(format!(
                "{}: handler.kind: missing; add a [handler] section",
                new.path.display()
            ));
        };
        let d = |duration: Duration| humantime::format_duration(duration).to_string();
        let mut applied = Vec::new();
        let mut change = |key: &str, old: String, new: String| {
            if old != new {
                // A command line may carry a password: it is named, not shown.
                applied.push(match key {
                    "handler.command" => "handler.command changed".to_string(),
                    _ => format!("{key} {old} → {new}"),
                });
            }
        };
        change(
            "workers.count",
            self.workers.count.to_string(),
            new.workers.count.to_string(),
        );
        let old_handler = self.handler.as_ref();
        change(
            "handler.kind",
            old_handler.map_or("-", |h| h.kind.name()).to_string(),
            handler.kind.name().to_string(),
        );
        if old_handler.is_some_and(|h| h.kind.name() == handler.kind.name()) {
            let argv = |kind: &HandlerKind| format!("{:?}", kind.argv());
            change(
                "handler.command",
                old_handler.map_or_else(String::new, |h| argv(&h.kind)),
                argv(&handler.kind),
            );
        }
        change(
            "handler.timeout",
            old_handler.map_or_else(String::new, |h| d(h.timeout)),
            d(handler.timeout),
        );
        change(
            "handler.kill_grace",
            old_handler.map_or_else(String::new, |h| d(h.kill_grace)),
            d(handler.kill_grace),
        );
        let (old_limits, limits) = (
            old_handler.map(|h| h.kind.recycle()).unwrap_or_default(),
            handler.kind.recycle(),
        );
        let shown = |limit: Option<String>| limit.unwrap_or_else(|| "off".to_string());
        change(
            "handler.max_tasks",
            shown(old_limits.max_tasks.map(|n| n.to_string())),
            shown(limits.max_tasks.map(|n| n.to_string())),
        );
        change(
            "handler.max_memory",
            shown(old_limits.max_memory.map(size_text)),
            shown(limits.max_memory.map(size_text)),
        );
        change(
            "handler.max_age",
            shown(old_limits.max_age.map(d)),
            shown(limits.max_age.map(d)),
        );
        let handler_changed = old_handler != Some(&handler);
        let (old, fresh) = (&self.breaker, &new.breaker);
        change(
            "breaker.enabled",
            old.enabled.to_string(),
            fresh.enabled.to_string(),
        );
        change(
            "breaker.outcomes",
            old.outcomes.to_string(),
            fresh.outcomes.to_string(),
        );
        change("breaker.window", d(old.window), d(fresh.window));
        change(
            "breaker.min_failures",
            old.min_failures.to_string(),
            fresh.min_failures.to_string(),
        );
        change(
            "breaker.min_messages",
            old.min_messages.to_string(),
            fresh.min_messages.to_string(),
        );
        change(
            "breaker.failure_ratio",
            old.failure_ratio.to_string(),
            fresh.failure_ratio.to_string(),
        );
        change("breaker.cooldown", d(old.cooldown), d(fresh.cooldown));
        change(
            "breaker.max_cooldown",
            d(old.max_cooldown),
            d(fresh.max_cooldown),
        );
        change(
            "shutdown.grace",
            d(self.shutdown.grace),
            d(new.shutdown.grace),
        );

        let mut restart = Vec::new();
        let mut needs = |key: &str, changed: bool| {
            if changed {
                restart.push(key.to_string());
            }
        };
        let (a, b) = (&self.broker, &new.broker);
        needs(
            "broker",
            a.urls != b.urls
                || a.heartbeat != b.heartbeat
                || a.connect_timeout != b.connect_timeout
                || format!("{:?}", a.tls) != format!("{:?}", b.tls),
        );
        // consumer_timeout only bounds the handler: a lower one applies now. The running one
        // may be lower than any file said, learned from the broker (`fit_consumer_timeout`);
        // that stays until a restart.
        let consumer_timeout = a.consumer_timeout.min(b.consumer_timeout);
        needs(
            "broker.consumer_timeout",
            b.consumer_timeout > a.consumer_timeout,
        );
        needs("queue", self.queue != new.queue);
        needs(
            "retry",
            format!("{:?}", self.retry) != format!("{:?}", new.retry),
        );
        needs(
            "workers.prefetch",
            self.workers.prefetch != new.workers.prefetch,
        );
        needs(
            "metrics",
            self.metrics.listen != new.metrics.listen
                || self.metrics.queue_depth_interval != new.metrics.queue_depth_interval,
        );
        needs("control.socket", self.control != new.control);
        needs("log.format", self.log.format != new.log.format);

        if handler.timeout + handler.kill_grace >= consumer_timeout {
            return Err(format!(
                "{}: handler.timeout ({}) plus handler.kill_grace ({}) must be shorter than the running broker.consumer_timeout ({})",
                new.path.display(),
                d(handler.timeout),
                d(handler.kill_grace),
                d(consumer_timeout)
            ));
        }
        if consumer_timeout < a.consumer_timeout {
            applied.push(format!(
                "broker.consumer_timeout {} → {}",
                d(a.consumer_timeout),
                d(consumer_timeout)
            ));
        }
        let config = Config {
            broker: Broker {
                consumer_timeout,
                ..self.broker.clone()
            },
            workers: Workers {
                count: new.workers.count,
                prefetch: self.workers.prefetch,
            },
            handler: Some(handler),
            breaker: new.breaker,
            shutdown: new.shutdown,
            ..self.clone()
        };
        Ok(Reloaded {
            config,
            applied,
            restart,
            handler_changed,
        })
    }
}

/// Finds `program` the way `execvp` would and checks that it can be executed.
pub fn resolve_program(program: &str) -> Result<PathBuf, String> {
    let candidates: Vec<PathBuf> = if program.contains('/') {
        vec![PathBuf::from(program)]
    } else {
        std::env::var_os("PATH")
            .map(|path| {
                std::env::split_paths(&path)
                    .map(|dir| dir.join(program))
                    .collect()
            })
            .unwrap_or_default()
    };
    for candidate in &candidates {
        if let Ok(meta) = fs::metadata(candidate) {
            if meta.is_file() && meta.permissions().mode() & 0o111 != 0 {
                return Ok(candidate.clone());
            }
            if program.contains('/') {
                return Err(format!("program {program} is not an executable file"));
            }
        }
    }
    if program.contains('/') {
        Err(format!("program {program} does not exist"))
    } else {
        Err(format!("program {program} was not found in PATH"))
    }
}

/// The file's path and text, for errors that name its line and key.
struct FileText<'a> {
    path: &'a Path,
    source: &'a str,
}

impl FileText<'_> {
    fn error(&self, span: Option<Range<usize>>, message: &str) -> ConfigError {
        ConfigError::at(self.path, self.source, span, message)
    }

    fn key_error(&self, table: &str, key: &str, message: &str) -> ConfigError {
        ConfigError::at_key(self.path, self.source, table, key, message)
    }

    /// An error about `queue.arguments.<name>`, at its line: its own in `[queue.arguments]`,
    /// else that of `arguments = { ... }`.
    fn argument_error(&self, name: &str, message: &str) -> ConfigError {
        let table = "queue.arguments";
        let span = find_key(self.source, table, name)
            .or_else(|| find_key(self.source, table, &format!("{name:?}")))
            .or_else(|| find_key(self.source, "queue", "arguments"))
            .or_else(|| find_table(self.source, table));
        let location = match span {
            Some(span) => format!(
                "{}:{}",
                self.path.display(),
                line_number(self.source, span.start)
            ),
            None => self.path.display().to_string(),
        };
        ConfigError(format!(
            "{location}: {table}.{name:?}: {}",
            one_line(message)
        ))
    }

    /// At `key` of `[table]` if the file has it, else at `span`.
    fn key_or(&self, table: &str, key: &str, span: Range<usize>, message: &str) -> ConfigError {
        self.error(find_key(self.source, table, key).or(Some(span)), message)
    }
}

impl BrokerSection {
    /// The broker's nodes (from `url_override` if there is one, else the file), TLS and
    /// timeouts.
    fn check(
        self,
        text: &FileText<'_>,
        url_override: Option<UrlOverride>,
    ) -> Result<Broker, ConfigError> {
        let path = text.path;
        let (urls, url_source) = match url_override {
            Some(UrlOverride { urls, source }) => {
                let urls = urls
                    .split(',')
                    .map(|url| BrokerUrl::parse(url.trim()))
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| {
                        ConfigError(format!(
                            "{source} (overriding broker.url in {}): {e}",
                            path.display()
                        ))
                    })?;
                (urls, source)
            }
            None => (self.file_urls(text)?, UrlSource::File),
        };
        if urls.iter().any(BrokerUrl::is_tls) && !urls.iter().all(BrokerUrl::is_tls) {
            let message = "the broker URLs mix amqp:// and amqps://: the password would travel unencrypted to some nodes; use amqps:// for every node";
            return Err(match &url_source {
                UrlSource::File => text.key_error("broker", "urls", message),
                source => ConfigError(format!(
                    "{source} (overriding broker.url in {}): {message}",
                    path.display()
                )),
            });
        }
        let tls = if urls.iter().any(BrokerUrl::is_tls) {
            let base = path.parent().unwrap_or(Path::new("."));
            let tls = Tls::load(self.tls.as_ref(), base)
                .map_err(|e| text.key_error("broker.tls", e.key, &e.message))?;
            Some(tls)
        } else if self.tls.is_some() {
            let span = find_table(text.source, "broker.tls");
            let message = match &url_source {
                UrlSource::File => "[broker.tls] is set but no broker URL uses amqps://; use amqps:// URLs or remove it".to_string(),
                source => format!("[broker.tls] is set but none of the URLs of {source} uses amqps://"),
            };
            return Err(text.error(span, &message));
        } else {
            None
        };
        if self.connect_timeout.is_zero() {
            let span = find_key(text.source, "broker", "connect_timeout");
            return Err(text.error(span, "must be longer than 0s"));
        }
        Ok(Broker {
            urls,
            url_source,
            heartbeat: self.heartbeat,
            connect_timeout: self.connect_timeout,
            consumer_timeout: self.consumer_timeout,
            tls,
        })
    }

    /// `broker.url` or `broker.urls`, else the default URL.
    fn file_urls(&self, text: &FileText<'_>) -> Result<Vec<BrokerUrl>, ConfigError> {
        match (&self.url, &self.urls) {
            (Some(_), Some(urls)) => {
                Err(text.error(Some(urls.span()), "set broker.url or broker.urls, not both"))
            }
            (Some(url), None) => {
                Ok(vec![BrokerUrl::parse(url.get_ref())
                    .map_err(|e| text.error(Some(url.span()), &e))?])
            }
            (None, Some(urls)) => {
                let span = urls.span();
                if urls.get_ref().is_empty() {
                    return Err(text.error(Some(span), "name at least one node"));
                }
                urls.get_ref()
                    .iter()
                    .map(|url| BrokerUrl::parse(url))
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| text.error(Some(span), &e))
            }
            (None, None) => Ok(vec![
                BrokerUrl::parse(DEFAULT_URL).expect("invariant: the default URL parses")
            ]),
        }
    }
}

impl QueueSection {
    fn check(section: Spanned<QueueSection>, text: &FileText<'_>) -> Result<Queue, ConfigError> {
        let span = section.span();
        let section = section.into_inner();
        let err = |message: &str| text.error(Some(span.clone()), message);
        if section.name.is_empty() {
            return Err(err("queue.name must not be empty"));
        }
        if section.kind == QueueType::Quorum && !section.durable {
            return Err(err(
                "a quorum queue is always durable; remove durable = false",
            ));
        }
        let dead_letter = section
            .dead_letter
            .unwrap_or_else(|| format!("{}.dead", section.name));
        if dead_letter == section.name || dead_letter.is_empty() {
            return Err(err("queue.dead_letter must name another queue"));
        }
        for binding in &section.bindings {
            check_binding(binding).map_err(|e| err(&format!("queue.bindings: {e}")))?;
        }
        for name in section.arguments.keys() {
            let problem = if !name.starts_with("x-") {
                Some("is not a queue argument: their names start with \"x-\", such as \"x-max-length\"")
            } else {
                owned_argument(name, section.kind)
            };
            if let Some(problem) = problem {
                return Err(text.argument_error(name, problem));
            }
        }
        if !section.declare && !section.arguments.is_empty() {
            let span = find_key(text.source, "queue", "arguments")
                .or_else(|| find_table(text.source, "queue.arguments"))
                .unwrap_or(span);
            return Err(text.error(
                Some(span),
                "queue.declare = false: warren declares nothing, so it would never apply queue.arguments; set them in the operator's definitions or a policy, and remove queue.arguments",
            ));
        }
        Ok(Queue {
            name: section.name,
            durable: section.durable,
            kind: section.kind,
            dead_letter,
            declare: section.declare,
            consumer_priority: section.consumer_priority,
            arguments: section.arguments,
            bindings: section.bindings,
        })
    }
}

/// What is wrong with one `[[queue.bindings]]`, if anything.
fn check_binding(binding: &Binding) -> Result<(), String> {
    let exchange = &binding.exchange;
    let kind = binding.kind.name();
    if exchange.is_empty() {
        return Err("exchange must name an exchange: the default exchange already routes to the queue by its name".into());
    }
    match binding.kind {
        ExchangeType::Direct | ExchangeType::Topic if binding.routing_keys.is_empty() => Err(
            format!("exchange {exchange:?} is a {kind} exchange: give it routing_keys = [...]"),
        ),
        ExchangeType::Fanout | ExchangeType::Headers if !binding.routing_keys.is_empty() => Err(
            format!("exchange {exchange:?} is a {kind} exchange, which ignores routing keys: remove routing_keys"),
        ),
        ExchangeType::Headers if binding.arguments.is_empty() => Err(format!(
            "exchange {exchange:?} is a headers exchange: give it arguments = {{ \"x-match\" = \"all\", header = \"value\" }}"
        )),
        ExchangeType::Direct | ExchangeType::Topic | ExchangeType::Fanout
            if !binding.arguments.is_empty() =>
        {
            Err(format!(
                "exchange {exchange:?} is a {kind} exchange: only a headers exchange takes arguments"
            ))
        }
        _ => Ok(()),
    }
}

impl HandlerSection {
    /// The handler, whose task must end (and be killed) well before the broker's
    /// `consumer_timeout`, or the broker closes the channel first.
    fn check(
        section: Spanned<HandlerSection>,
        text: &FileText<'_>,
        consumer_timeout: Duration,
    ) -> Result<HandlerConfig, ConfigError> {
        let span = section.span();
        let section = section.into_inner();
        let recycle = Recycle {
            max_tasks: section.max_tasks,
            max_memory: section.max_memory,
            max_age: section.max_age,
        };
        let kind = match (section.kind, section.command) {
            (Kind::Dots, None) => HandlerKind::Dots,
            (Kind::Dots, Some(command)) => {
                return Err(text.error(
                    Some(command.span()),
                    "only kind = \"command\" or \"pipe\" takes a command",
                ))
            }
            (kind, None) => {
                let kind = if matches!(kind, Kind::Pipe) {
                    "pipe"
                } else {
                    "command"
                };
                return Err(ConfigError(format!(
                    "{}: handler.command: missing; kind = \"{kind}\" needs command = [\"/path/to/program\", ...]",
                    text.path.display()
                )));
            }
            (kind, Some(command)) => {
                let span = command.span();
                let argv = command.into_inner();
                if argv.is_empty() || argv[0].is_empty() {
                    return Err(text.error(Some(span), "the command must name a program"));
                }
                if argv.iter().any(|arg| arg.contains('\0')) {
                    return Err(text.error(
                        Some(span),
                        "an argument of the command holds a NUL byte, which no program can be given",
                    ));
                }
                match kind {
                    Kind::Pipe => HandlerKind::Pipe { argv, recycle },
                    _ => HandlerKind::Command {
                        argv,
                        reply: section.reply,
                    },
                }
            }
        };
        if section.reply && !matches!(kind, HandlerKind::Command { .. }) {
            return Err(text.key_or(
                "handler",
                "reply",
                span,
                "only kind = \"command\" takes reply (a pipe program answers with \"TAG reply SIZE\")",
            ));
        }
        if !matches!(kind, HandlerKind::Pipe { .. }) {
            if let Some(key) = recycle.first_set() {
                return Err(text.key_or(
                    "handler",
                    key,
                    span,
                    &format!(
                        "only kind = \"pipe\" takes {key} (it limits the program a pipe handler keeps running)"
                    ),
                ));
            }
        }
        if section.timeout.is_zero() {
            return Err(text.key_or("handler", "timeout", span, "must be longer than 0s"));
        }
        if section.timeout + section.kill_grace >= consumer_timeout {
            return Err(text.key_or(
                "handler",
                "timeout",
                span,
                &format!(
                    "handler.timeout ({}) plus handler.kill_grace ({}) must be shorter than broker.consumer_timeout ({}), or the broker closes the channel first",
                    humantime::format_duration(section.timeout),
                    humantime::format_duration(section.kill_grace),
                    humantime::format_duration(consumer_timeout)
                ),
            ));
        }
        Ok(HandlerConfig {
            kind,
            timeout: section.timeout,
            kill_grace: section.kill_grace,
        })
    }
}

impl Retry {
    fn check(&self, text: &FileText<'_>) -> Result<(), ConfigError> {
        if self.delay.is_zero() || self.max_delay < self.delay {
            let span = find_key(text.source, "retry", "max_delay")
                .or_else(|| find_key(text.source, "retry", "delay"));
            return Err(text.error(
                span,
                "retry.delay must be longer than 0s and retry.max_delay at least as long",
            ));
        }
        Ok(())
    }
}

impl BreakerConfig {
    fn check(&self, text: &FileText<'_>) -> Result<(), ConfigError> {
        let err = |key: &str, message: &str| Err(text.key_error("breaker", key, message));
        if self.window.is_zero() {
            return err("window", "must be longer than 0s");
        }
        if self.min_messages < 2 {
            return err(
                "min_messages",
                "must be at least 2: one message that fails again and again must not trip the breaker",
            );
        }
        if self.min_failures < self.min_messages {
            return err(
                "min_failures",
                "must be at least breaker.min_messages: each of those messages fails once at least",
            );
        }
        if self.outcomes < self.min_failures {
            return err(
                "outcomes",
                "must be at least breaker.min_failures: they are among the outcomes it keeps",
            );
        }
        if !(self.failure_ratio > 0.0 && self.failure_ratio <= 1.0) {
            return err(
                "failure_ratio",
                &format!(
                    "must be more than 0 and at most 1, not {}",
                    self.failure_ratio
                ),
            );
        }
        if self.cooldown.is_zero() || self.max_cooldown < self.cooldown {
            return err(
                "max_cooldown",
                "breaker.cooldown must be longer than 0s and breaker.max_cooldown at least as long",
            );
        }
        Ok(())
    }
}

const DEFAULT_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// The file as written, before cross-key validation.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    broker: Option<BrokerSection>,
    queue: Option<Spanned<QueueSection>>,
    workers: Option<Workers>,
    handler: Option<Spanned<HandlerSection>>,
    retry: Option<Retry>,
    shutdown: Option<Shutdown>,
    breaker: Option<BreakerConfig>,
    control: Option<ControlSection>,
    metrics: Option<MetricsConfig>,
    log: Option<LogConfig>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ControlSection {
    socket: Option<Spanned<PathBuf>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BrokerSection {
    url: Option<Spanned<String>>,
    urls: Option<Spanned<Vec<String>>>,
    #[serde(default = "default_heartbeat", deserialize_with = "heartbeat")]
    heartbeat: u16,
    #[serde(default = "default_connect_timeout", deserialize_with = "duration")]
    connect_timeout: Duration,
    #[serde(default = "default_consumer_timeout", deserialize_with = "duration")]
    consumer_timeout: Duration,
    tls: Option<TlsSection>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct QueueSection {
    name: String,
    #[serde(default = "yes")]
    durable: bool,
    #[serde(rename = "type", default = "default_queue_type")]
    kind: QueueType,
    dead_letter: Option<String>,
    #[serde(default = "yes")]
    declare: bool,
    consumer_priority: Option<i32>,
    #[serde(default)]
    arguments: BTreeMap<String, ArgValue>,
    #[serde(default)]
    bindings: Vec<Binding>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HandlerSection {
    kind: Kind,
    command: Option<Spanned<Vec<String>>>,
    #[serde(default = "default_handler_timeout", deserialize_with = "duration")]
    timeout: Duration,
    #[serde(default = "default_kill_grace", deserialize_with = "duration")]
    kill_grace: Duration,
    #[serde(default)]
    reply: bool,
    #[serde(default, deserialize_with = "some_positive")]
    max_tasks: Option<u64>,
    #[serde(default, deserialize_with = "some_size")]
    max_memory: Option<u64>,
    #[serde(default, deserialize_with = "some_duration")]
    max_age: Option<Duration>,
}

#[derive(Deserialize, Clone, Copy)]
#[serde(rename_all = "lowercase")]
enum Kind {
    Dots,
    Command,
    Pipe,
}

impl Default for BrokerSection {
    fn default() -> Self {
        BrokerSection {
            url: None,
            urls: None,
            heartbeat: default_heartbeat(),
            connect_timeout: default_connect_timeout(),
            consumer_timeout: default_consumer_timeout(),
            tls: None,
        }
    }
}

impl Default for Workers {
    fn default() -> Self {
        Workers {
            count: default_count(),
            prefetch: default_prefetch(),
        }
    }
}

impl Default for Retry {
    fn default() -> Self {
        Retry {
            max_attempts: default_max_attempts(),
            delay: default_retry_delay(),
            max_delay: default_retry_max_delay(),
        }
    }
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            listen: None,
            queue_depth_interval: default_queue_depth_interval(),
        }
    }
}

impl Default for BreakerConfig {
    fn default() -> Self {
        BreakerConfig {
            enabled: true,
            outcomes: default_breaker_outcomes(),
            window: default_breaker_window(),
            failure_ratio: default_breaker_ratio(),
            min_failures: default_breaker_failures(),
            min_messages: default_breaker_messages(),
            cooldown: default_breaker_cooldown(),
            max_cooldown: default_breaker_max_cooldown(),
        }
    }
}

impl Default for Shutdown {
    fn default() -> Self {
        Shutdown {
            grace: default_grace(),
        }
    }
}

fn yes() -> bool {
    true
}
fn is_false(value: &bool) -> bool {
    !value
}
fn default_count() -> usize {
    4
}
fn default_prefetch() -> u16 {
    1
}
fn default_heartbeat() -> u16 {
    30
}
fn default_connect_timeout() -> Duration {
    Duration::from_secs(5)
}
fn default_grace() -> Duration {
    Duration::from_secs(30)
}
fn default_consumer_timeout() -> Duration {
    Duration::from_secs(30 * 60)
}
fn default_queue_type() -> QueueType {
    QueueType::Classic
}
fn default_handler_timeout() -> Duration {
    Duration::from_secs(10 * 60)
}
fn default_kill_grace() -> Duration {
    Duration::from_secs(10)
}
fn default_queue_depth_interval() -> Duration {
    Duration::from_secs(15)
}
fn default_breaker_outcomes() -> u32 {
    20
}
fn default_breaker_window() -> Duration {
    Duration::from_secs(60)
}
fn default_breaker_failures() -> u32 {
    5
}
fn default_breaker_messages() -> u32 {
    3
}
fn default_breaker_ratio() -> f64 {
    0.8
}
fn default_breaker_cooldown() -> Duration {
    Duration::from_secs(5)
}
fn default_breaker_max_cooldown() -> Duration {
    Duration::from_secs(60)
}
fn default_max_attempts() -> u32 {
    5
}
fn default_retry_delay() -> Duration {
    Duration::from_secs(1)
}
fn default_retry_max_delay() -> Duration {
    Duration::from_secs(5 * 60)
}

/// A duration as the file writes it, such as "1m 30s".
fn human<S: Serializer>(duration: &Duration, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(&humantime::format_duration(*duration).to_string())
}

/// `broker.heartbeat` as the file writes it: "30s", or "0" for none.
fn heartbeat_text<S: Serializer>(secs: &u16, serializer: S) -> Result<S::Ok, S::Error> {
    match secs {
        0 => serializer.serialize_str("0"),
        secs => serializer.serialize_str(&format!("{secs}s")),
    }
}

/// The broker's nodes as the file writes them: `url` for one, `urls` for several.
fn url_or_urls<S: Serializer>(urls: &[BrokerUrl], serializer: S) -> Result<S::Ok, S::Error> {
    let mut map = serializer.serialize_map(Some(1))?;
    match urls {
        [url] => map.serialize_entry("url", url)?,
        urls => map.serialize_entry("urls", urls)?,
    }
    map.end()
}

fn attempts<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    match i64::deserialize(d)? {
        n @ 1..=1000 => Ok(n as u32),
        n => Err(de::Error::custom(format!(
            "must be between 1 and 1000, not {n}"
        ))),
    }
}

fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let text = String::deserialize(d)?;
    humantime::parse_duration(&text).map_err(|e| {
        de::Error::custom(format!(
            "invalid duration {text:?} ({e}); write it like \"250ms\", \"30s\" or \"10m\""
        ))
    })
}

fn heartbeat<'de, D: Deserializer<'de>>(d: D) -> Result<u16, D::Error> {
    let text = String::deserialize(d)?;
    let invalid = |why: &str| {
        de::Error::custom(format!(
            "invalid heartbeat {text:?}: {why}; write whole seconds like \"30s\", or \"0\" to disable"
        ))
    };
    if text.trim() == "0" {
        return Ok(0);
    }
    let duration = humantime::parse_duration(&text).map_err(|e| invalid(&e.to_string()))?;
    if duration.subsec_nanos() != 0 {
        return Err(invalid("the broker counts heartbeats in whole seconds"));
    }
    u16::try_from(duration.as_secs()).map_err(|_| invalid("at most 65535s"))
}

/// `handler.max_tasks`: at least 1.
fn some_positive<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    match i64::deserialize(d)? {
        n if n >= 1 => Ok(Some(n as u64)),
        n => Err(de::Error::custom(format!("must be at least 1, not {n}"))),
    }
}

/// A duration longer than zero, such as `handler.max_age`.
fn some_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    match duration(d)? {
        zero if zero.is_zero() => Err(de::Error::custom("must be longer than 0s")),
        duration => Ok(Some(duration)),
    }
}

/// A size in bytes, such as `handler.max_memory`: a string with a unit (`"512MiB"`, `"1GiB"`,
/// `"200MB"`; KiB, MiB, GiB are powers of 1024, KB, MB, GB of 1000) or an integer of bytes.
fn some_size<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    struct Size;
    impl de::Visitor<'_> for Size {
        type Value = u64;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a size such as \"512MiB\", or a number of bytes")
        }

        fn visit_i64<E: de::Error>(self, n: i64) -> Result<u64, E> {
            match u64::try_from(n) {
                Ok(bytes) if bytes > 0 => Ok(bytes),
                _ => Err(E::custom(format!("must be more than 0 bytes, not {n}"))),
            }
        }

        fn visit_u64<E: de::Error>(self, n: u64) -> Result<u64, E> {
            match n {
                0 => Err(E::custom("must be more than 0 bytes, not 0")),
                bytes => Ok(bytes),
            }
        }

        fn visit_str<E: de::Error>(self, text: &str) -> Result<u64, E> {
            parse_size(text).map_err(E::custom)
        }
    }
    d.deserialize_any(Size).map(Some)
}

/// A size as the file writes it, in bytes.
fn parse_size(text: &str) -> Result<u64, String> {
    match text.trim().parse::<bytesize::ByteSize>() {
        Ok(size) if size.0 == 0 => Err(format!("must be more than 0 bytes, not {text:?}")),
        // The parser saturates rather than overflow.
        Ok(size) if size.0 == u64::MAX => Err(format!("{text:?} is too large")),
        Ok(size) => Ok(size.0),
        Err(_) => Err(format!(
            "invalid size {text:?}; write it like \"512MiB\", \"1GiB\", \"200MB\" or a number of bytes"
        )),
    }
}

/// A number of bytes as the file would write it, exactly: with the largest unit that divides it
/// (`"512 MiB"`, `"200 MB"`), else in bytes (`"1234 B"`).
pub fn size_text(bytes: u64) -> String {
    const UNITS: [(u64, &str); 10] = [
        (1 << 50, "PiB"),
        (1 << 40, "TiB"),
        (1 << 30, "GiB"),
        (1 << 20, "MiB"),
        (1 << 10, "KiB"),
        (1_000_000_000_000_000, "PB"),
        (1_000_000_000_000, "TB"),
        (1_000_000_000, "GB"),
        (1_000_000, "MB"),
        (1_000, "KB"),
    ];
    match UNITS
        .iter()
        .find(|(unit, _)| bytes != 0 && bytes % unit == 0)
    {
        Some((unit, name)) => format!("{} {name}", bytes / unit),
        None => format!("{bytes} B"),
    }
}

/// `handler.max_memory` as the file writes it.
fn size_or_none<S: Serializer>(bytes: &Option<u64>, serializer: S) -> Result<S::Ok, S::Error> {
    match bytes {
        Some(bytes) => serializer.serialize_str(&size_text(*bytes)),
        None => serializer.serialize_none(),
    }
}

/// An optional duration as the file writes it.
fn human_or_none<S: Serializer>(
    duration: &Option<Duration>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    match duration {
        Some(duration) => human(duration, serializer),
        None => serializer.serialize_none(),
    }
}

fn positive<'de, D: Deserializer<'de>>(d: D) -> Result<usize, D::Error> {
    match i64::deserialize(d)? {
        n if n >= 1 => usize::try_from(n).map_err(de::Error::custom),
        n => Err(de::Error::custom(format!("must be at least 1, not {n}"))),
    }
}

fn positive_u32<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    match i64::deserialize(d)? {
        n @ 1..=1_000_000 => Ok(n as u32),
        n => Err(de::Error::custom(format!(
            "must be between 1 and 1000000, not {n}"
        ))),
    }
}

fn prefetch<'de, D: Deserializer<'de>>(d: D) -> Result<u16, D::Error> {
    match i64::deserialize(d)? {
        n @ 1..=65535 => Ok(n as u16),
        n => Err(de::Error::custom(format!(
            "must be between 1 and 65535, not {n} (0 would let the broker send without limit)"
        ))),
    }
}

/// The dotted key whose line holds byte `offset`: the nearest `[table]` header above it, joined
/// with the key on that line. `None` when the offset is not on a `key = value` line.
fn key_at(source: &str, offset: usize) -> Option<String> {
    let before = &source[..offset.min(source.len())];
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let line = source[line_start..].lines().next().unwrap_or("");
    let table = before[..line_start].lines().rev().find_map(table_header);
    let key = match line.split_once('=') {
        Some((key, _)) if table_header(line).is_none() => key.trim().trim_matches('"'),
        _ => return table,
    };
    Some(match table {
        Some(table) => format!("{table}.{key}"),
        None => key.to_string(),
    })
}

/// The span of `key = ...` inside `[table]`, for errors found after parsing.
fn find_key(source: &str, table: &str, key: &str) -> Option<Range<usize>> {
    let mut offset = 0;
    let mut current = String::new();
    for line in source.split_inclusive('\n') {
        let trimmed = line.trim();
        if let Some(header) = table_header(line) {
            current = header;
        } else if current == table {
            if let Some((k, _)) = trimmed.split_once('=') {
                if k.trim() == key {
                    return Some(offset..offset + line.len());
                }
            }
        }
        offset += line.len();
    }
    None
}

/// The span of the `[table]` header line.
fn find_table(source: &str, table: &str) -> Option<Range<usize>> {
    let mut offset = 0;
    for line in source.split_inclusive('\n') {
        if table_header(line).as_deref() == Some(table) {
            return Some(offset..offset + line.len());
        }
        offset += line.len();
    }
    None
}

/// The table a `[table]` header line opens (a trailing comment allowed), or `None`.
fn table_header(line: &str) -> Option<String> {
    let line = line.split('#').next().unwrap_or("").trim();
    let name = line.strip_prefix('[')?.strip_suffix(']')?;
    Some(
        name.trim_matches(|c| c == '[' || c == ']')
            .trim()
            .to_string(),
    )
}

/// The number of the line of `source` that `offset` is on, from 1.
fn line_number(source: &str, offset: usize) -> usize {
    source[..offset.min(source.len())].matches('\n').count() + 1
}

fn one_line(message: &str) -> String {
    message.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, String> {
        Config::parse(Path::new("w.toml"), text, None).map_err(|e| e.to_string())
    }

    const MINIMAL: &str = "[queue]\nname = \"jobs\"\n[handler]\nkind = \"dots\"\n";

    #[test]
    fn a_minimal_file_takes_every_default() {
        let config = parse(MINIMAL).unwrap();
        assert_eq!(config.queue.name, "jobs");
        assert!(config.queue.durable);
        assert_eq!(config.workers.count, 4);
        assert_eq!(config.workers.prefetch, 1);
        assert_eq!(config.broker.heartbeat, 30);
        assert_eq!(config.broker.connect_timeout, Duration::from_secs(5));
        assert_eq!(config.shutdown.grace, Duration::from_secs(30));
        assert_eq!(config.broker.urls[0].vhost(), "/");
        assert_eq!(config.handler.unwrap().kind, HandlerKind::Dots);
        assert_eq!(config.queue.kind, QueueType::Classic);
        assert_eq!(config.queue.dead_letter, "jobs.dead");
        assert_eq!(config.retry.max_attempts, 5);
        assert_eq!(config.broker.consumer_timeout, Duration::from_secs(1800));
    }

    #[test]
    fn errors_name_the_file_line_and_key() {
        let text = format!("{MINIMAL}[workers]\ncount = 0\n");
        assert_eq!(
            parse(&text).unwrap_err(),
            "w.toml:6: workers.count: must be at least 1, not 0"
        );
        let text = format!("{MINIMAL}[workers]\nprefetch = 0\n");
        assert!(parse(&text)
            .unwrap_err()
            .starts_with("w.toml:6: workers.prefetch: must be between 1 and 65535"));
        let text = format!("{MINIMAL}[workers]\ncolour = 3\n");
        assert!(parse(&text)
            .unwrap_err()
            .starts_with("w.toml:6: workers.colour: unknown field `colour`"));
        let text = format!("{MINIMAL}[shutdown]\ngrace = \"soon\"\n");
        assert!(parse(&text)
            .unwrap_err()
            .starts_with("w.toml:6: shutdown.grace: invalid duration \"soon\""));
        let text = format!("{MINIMAL}[workers]\ncount = \"four\"\n");
        assert!(parse(&text)
            .unwrap_err()
            .starts_with("w.toml:6: workers.count: invalid type"));
    }

    #[test]
    fn amqps_urls_use_tls_on_5671_and_broker_tls_needs_one() {
        let config = parse(&format!(
            "[broker]\nurl = \"amqps://u:p@rabbit\"\n{MINIMAL}"
        ))
        .unwrap();
        assert!(config.broker.urls[0].is_tls());
        assert_eq!(config.broker.urls[0].address(), "rabbit:5671");
        assert!(
            config.broker.tls.is_some(),
            "the system's CAs are trusted by default"
        );
        let plain = parse(&format!("[broker]\nurl = \"amqp://u:p@rabbit\"\n{MINIMAL}")).unwrap();
        assert!(plain.broker.tls.is_none());
        let text = format!(
            "[broker]\nurl = \"amqp://rabbit\"\n[broker.tls]\nca_file = \"ca.pem\"\n{MINIMAL}"
        );
        assert_eq!(
            parse(&text).unwrap_err(),
            "w.toml:3: broker: [broker.tls] is set but no broker URL uses amqps://; use amqps:// URLs or remove it"
        );
    }

    #[test]
    fn a_cluster_is_all_tls_or_not_at_all() {
        let text = format!("[broker]\nurls = [\"amqps://u:p@n1\", \"amqp://u:p@n2\"]\n{MINIMAL}");
        assert!(parse(&text)
            .unwrap_err()
            .starts_with("w.toml:2: broker.urls: the broker URLs mix amqp:// and amqps://"));
        let urls = "amqps://u:p@n1,amqp://u:p@n2";
        let err = Config::parse(Path::new("w.toml"), MINIMAL, env(urls)).unwrap_err();
        assert!(err.to_string().starts_with(
            "WARREN_BROKER_URL (overriding broker.url in w.toml): the broker URLs mix"
        ));
        let credential = Some(UrlOverride {
            urls: urls.to_string(),
            source: UrlSource::Credential("/run/credentials/warren.service/broker-url".into()),
        });
        let err = Config::parse(Path::new("w.toml"), MINIMAL, credential).unwrap_err();
        assert!(
            err.to_string().starts_with(
                "the systemd credential /run/credentials/warren.service/broker-url (overriding \
                 broker.url in w.toml): the broker URLs mix"
            ),
            "{err}"
        );
    }

    #[test]
    fn an_unreadable_tls_file_is_a_config_error_at_its_key() {
        let text = format!(
            "[broker]\nurl = \"amqps://rabbit\"\n[broker.tls]\nserver_name = \"r\"\nca_file = \"/nonexistent/ca.pem\"\n{MINIMAL}"
        );
        let err = parse(&text).unwrap_err();
        assert!(
            err.starts_with("w.toml:5: broker.tls.ca_file: cannot read /nonexistent/ca.pem: "),
            "{err}"
        );
        let text = format!(
            "[broker]\nurl = \"amqps://rabbit\"\ntls = {{ key_file = \"k.pem\" }}\n{MINIMAL}"
        );
        assert_eq!(
            parse(&text).unwrap_err(),
            "w.toml: broker.tls.key_file: needs cert_file, the client certificate"
        );
    }

    #[test]
    fn a_comment_after_a_table_header_does_not_hide_the_table() {
        let text = format!("{MINIMAL}[workers] # how many at once\ncount = 0\n");
        assert_eq!(
            parse(&text).unwrap_err(),
            "w.toml:6: workers.count: must be at least 1, not 0"
        );
        let source = "[handler] # what runs\nkind = \"command\"\ncommand = [\"x\"]\n";
        assert_eq!(find_key(source, "handler", "command"), Some(39..55));
    }

    #[test]
    fn a_cluster_is_a_list_of_urls() {
        let text =
            format!("[broker]\nurls = [\"amqp://u:p@n1\", \"amqp://u:p@n2:5673/v\"]\n{MINIMAL}");
        let config = parse(&text).unwrap();
        assert_eq!(
            config.broker.describe(),
            "amqp://u:***@n1, amqp://u:***@n2:5673/v"
        );
        let both = format!("[broker]\nurl = \"amqp://x\"\nurls = [\"amqp://y\"]\n{MINIMAL}");
        assert!(parse(&both)
            .unwrap_err()
            .starts_with("w.toml:3: broker.urls: set broker.url or broker.urls, not both"));
        let none = format!("[broker]\nurls = []\n{MINIMAL}");
        assert!(parse(&none)
            .unwrap_err()
            .ends_with("name at least one node"));
    }

    #[test]
    fn a_consumer_timeout_the_broker_enforces_shrinks_the_handler_limits_to_fit() {
        let text = "[queue]\nname = \"q\"\n[handler]\nkind = \"dots\"\ntimeout = \"5m\"\nkill_grace = \"10s\"\n";
        let mut config = parse(text).unwrap();
        assert_eq!(
            config.fit_consumer_timeout(Duration::from_secs(8)),
            Some((Duration::from_secs(4), Duration::from_secs(2)))
        );
        assert_eq!(config.broker.consumer_timeout, Duration::from_secs(8));
        assert_eq!(
            config.fit_consumer_timeout(Duration::from_secs(8)),
            None,
            "fitted already"
        );
        let mut roomy = parse(text).unwrap();
        assert_eq!(roomy.fit_consumer_timeout(Duration::from_secs(3600)), None);
        assert_eq!(roomy.handler.unwrap().timeout, Duration::from_secs(300));
    }

    #[test]
    fn a_handler_timeout_must_end_before_the_consumer_timeout() {
        let text = "[broker]\nconsumer_timeout = \"15m\"\n[queue]\nname = \"q\"\n[handler]\nkind = \"dots\"\ntimeout = \"20m\"\n";
        let err = parse(text).unwrap_err();
        assert!(err.starts_with("w.toml:7: handler.timeout: handler.timeout (20m) plus handler.kill_grace (10s) must be shorter than broker.consumer_timeout (15m)"), "{err}");
        let fine = text.replace("20m", "14m");
        let handler = parse(&fine).unwrap().handler.unwrap();
        assert_eq!(handler.timeout, Duration::from_secs(14 * 60));
        assert_eq!(handler.kill_grace, Duration::from_secs(10));
    }

    #[test]
    fn quorum_queues_and_retries_are_configured_and_checked() {
        let text = "[queue]\nname = \"q\"\ntype = \"quorum\"\ndead_letter = \"q.failed\"\n[retry]\nmax_attempts = 3\ndelay = \"2s\"\nmax_delay = \"5s\"\n";
        let config = parse(text).unwrap();
        assert_eq!(config.queue.kind, QueueType::Quorum);
        assert_eq!(config.queue.dead_letter, "q.failed");
        let delays: Vec<_> = (1..=4).map(|a| config.retry.delay_after(a)).collect();
        assert_eq!(delays, [2, 4, 5, 5].map(Duration::from_secs));
        assert!(
            parse("[queue]\nname = \"q\"\ntype = \"quorum\"\ndurable = false\n")
                .unwrap_err()
                .contains("always durable")
        );
        assert!(parse("[queue]\nname = \"q\"\ntype = \"stream\"\n")
            .unwrap_err()
            .starts_with("w.toml:3: queue.type: unknown variant `stream`"));
        assert!(parse("[queue]\nname = \"q\"\n[retry]\nmax_attempts = 0\n")
            .unwrap_err()
            .starts_with("w.toml:4: retry.max_attempts: must be between 1 and 1000"));
        assert!(
            parse("[queue]\nname = \"q\"\n[retry]\ndelay = \"1m\"\nmax_delay = \"1s\"\n")
                .unwrap_err()
                .contains("retry.max_delay")
        );
        assert!(parse("[queue]\nname = \"q\"\ndead_letter = \"q\"\n")
            .unwrap_err()
            .contains("another queue"));
    }

    #[test]
    fn metrics_and_log_format_are_optional_sections() {
        let config = parse(MINIMAL).unwrap();
        assert_eq!(config.metrics.listen, None);
        assert_eq!(config.log.format, LogFormat::Text);
        let text =
            format!("{MINIMAL}[metrics]\nlisten = \"127.0.0.1:9187\"\n[log]\nformat = \"json\"\n");
        let config = parse(&text).unwrap();
        assert_eq!(
            config.metrics.listen,
            Some("127.0.0.1:9187".parse().unwrap())
        );
        assert_eq!(config.log.format, LogFormat::Json);
        let bad = format!("{MINIMAL}[metrics]\nlisten = \"localhost\"\n");
        assert!(parse(&bad)
            .unwrap_err()
            .starts_with("w.toml:6: metrics.listen: invalid socket address"));
    }

    #[test]
    fn a_zero_connect_timeout_is_refused() {
        let text = format!("[broker]\nconnect_timeout = \"0s\"\n{MINIMAL}");
        assert_eq!(
            parse(&text).unwrap_err(),
            "w.toml:2: broker.connect_timeout: must be longer than 0s"
        );
    }

    #[test]
    fn heartbeat_is_whole_seconds_or_zero() {
        let with = |hb: &str| parse(&format!("[broker]\nheartbeat = \"{hb}\"\n{MINIMAL}"));
        assert_eq!(with("10s").unwrap().broker.heartbeat, 10);
        assert_eq!(with("0").unwrap().broker.heartbeat, 0);
        assert_eq!(with("1m").unwrap().broker.heartbeat, 60);
        assert!(with("1500ms")
            .unwrap_err()
            .contains("broker.heartbeat: invalid heartbeat"));
        assert!(with("forever").is_err());
    }

    #[test]
    fn queue_and_handler_are_required() {
        assert!(parse("[handler]\nkind = \"dots\"\n")
            .unwrap_err()
            .contains("queue.name: missing"));
        let producer = parse("[queue]\nname = \"q\"\n").unwrap();
        let err = producer.handler().unwrap_err().to_string();
        assert!(err.contains("handler.kind: missing"), "{err}");
        let err = parse("[queue]\nname = \"q\"\n[handler]\nkind = \"command\"\n").unwrap_err();
        assert!(err.contains("handler.command: missing"), "{err}");
        let err = parse("[queue]\nname = \"q\"\n[handler]\nkind = \"command\"\ncommand = []\n")
            .unwrap_err();
        assert_eq!(
            err,
            "w.toml:5: handler.command: the command must name a program"
        );
        let err = parse(
            "[queue]\nname = \"q\"\n[handler]\nkind = \"command\"\ncommand = [\"/bin/echo\", \"a\\u0000b\"]\n",
        )
        .unwrap_err();
        assert_eq!(
            err,
            "w.toml:5: handler.command: an argument of the command holds a NUL byte, which no program can be given"
        );
    }

    #[test]
    fn a_pipe_handler_takes_a_command_and_dots_takes_none() {
        let pipe = parse(
            "[queue]\nname = \"q\"\n[handler]\nkind = \"pipe\"\ncommand = [\"python3\", \"h.py\"]\n",
        )
        .unwrap();
        let kind = &pipe.handler.unwrap().kind;
        assert_eq!(
            kind,
            &HandlerKind::Pipe {
                argv: vec!["python3".into(), "h.py".into()],
                recycle: Recycle::default(),
            }
        );
        assert_eq!(
            (kind.name(), kind.argv().map(|a| a.len())),
            ("pipe", Some(2))
        );
        let err = parse("[queue]\nname = \"q\"\n[handler]\nkind = \"pipe\"\n").unwrap_err();
        assert!(
            err.contains("handler.command: missing; kind = \"pipe\" needs command"),
            "{err}"
        );
        let err = parse("[queue]\nname = \"q\"\n[handler]\nkind = \"dots\"\ncommand = [\"x\"]\n")
            .unwrap_err();
        assert!(
            err.contains("only kind = \"command\" or \"pipe\" takes a command"),
            "{err}"
        );
    }

    #[test]
    fn a_pipe_handler_takes_recycle_limits_which_are_off_by_default() {
        let pipe = "[queue]\nname = \"q\"\n[handler]\nkind = \"pipe\"\ncommand = [\"h\"]\n";
        let handler = parse(pipe).unwrap().handler.unwrap();
        assert_eq!(handler.kind.recycle(), Recycle::default());
        for (limits, want) in [
            (
                "max_tasks = 1000\nmax_memory = \"512MiB\"\nmax_age = \"1h\"\n",
                Recycle {
                    max_tasks: Some(1000),
                    max_memory: Some(512 << 20),
                    max_age: Some(Duration::from_secs(3600)),
                },
            ),
            (
                "max_memory = \"1GiB\"\n",
                Recycle {
                    max_memory: Some(1 << 30),
                    ..Recycle::default()
                },
            ),
            (
                "max_memory = \"200MB\"\n",
                Recycle {
                    max_memory: Some(200_000_000),
                    ..Recycle::default()
                },
            ),
            (
                "max_memory = 1048576\n",
                Recycle {
                    max_memory: Some(1 << 20),
                    ..Recycle::default()
                },
            ),
            (
                "max_memory = \"1.5 GiB\"\n",
                Recycle {
                    max_memory: Some(3 << 29),
                    ..Recycle::default()
                },
            ),
        ] {
            let handler = parse(&format!("{pipe}{limits}")).unwrap().handler.unwrap();
            assert_eq!(handler.kind.recycle(), want, "{limits}");
        }
    }

    #[test]
    fn recycle_limits_are_refused_on_other_handlers_and_when_malformed_naming_the_key() {
        for kind in ["kind = \"command\"\ncommand = [\"h\"]", "kind = \"dots\""] {
            for (line, key) in [
                ("max_tasks = 3", "max_tasks"),
                ("max_memory = \"40MiB\"", "max_memory"),
                ("max_age = \"1h\"", "max_age"),
            ] {
                let text = format!("[queue]\nname = \"q\"\n[handler]\n{kind}\n{line}\n");
                let err = parse(&text).unwrap_err();
                let at = text.lines().position(|l| l == line).unwrap() + 1;
                assert_eq!(
                    err,
                    format!("w.toml:{at}: handler.{key}: only kind = \"pipe\" takes {key} (it limits the program a pipe handler keeps running)"),
                );
            }
        }
        let pipe = "[queue]\nname = \"q\"\n[handler]\nkind = \"pipe\"\ncommand = [\"h\"]\n";
        for (line, error) in [
            ("max_tasks = 0", "handler.max_tasks: must be at least 1, not 0"),
            ("max_tasks = -3", "handler.max_tasks: must be at least 1, not -3"),
            ("max_tasks = \"3\"", "handler.max_tasks: invalid type: string \"3\", expected i64"),
            ("max_memory = \"12 parsecs\"", "handler.max_memory: invalid size \"12 parsecs\"; write it like \"512MiB\", \"1GiB\", \"200MB\" or a number of bytes"),
            ("max_memory = \"MiB\"", "handler.max_memory: invalid size \"MiB\""),
            ("max_memory = \"-5MiB\"", "handler.max_memory: invalid size \"-5MiB\""),
            ("max_memory = \"\"", "handler.max_memory: invalid size \"\""),
            ("max_memory = \"0MiB\"", "handler.max_memory: must be more than 0 bytes, not \"0MiB\""),
            ("max_memory = 0", "handler.max_memory: must be more than 0 bytes, not 0"),
            ("max_memory = -1", "handler.max_memory: must be more than 0 bytes, not -1"),
            ("max_memory = \"99999EiB\"", "handler.max_memory: \"99999EiB\" is too large"),
            ("max_memory = true", "handler.max_memory: invalid type: boolean `true`, expected a size such as \"512MiB\", or a number of bytes"),
            ("max_age = \"0s\"", "handler.max_age: must be longer than 0s"),
            ("max_age = \"soon\"", "handler.max_age: invalid duration \"soon\""),
        ] {
            let err = parse(&format!("{pipe}{line}\n")).unwrap_err();
            assert!(err.starts_with(&format!("w.toml:6: {error}")), "{line}: {err}");
        }
    }

    #[test]
    fn a_reload_applies_and_names_changed_recycle_limits() {
        let pipe = "[queue]\nname = \"q\"\n[handler]\nkind = \"pipe\"\ncommand = [\"h\"]\n";
        let running = parse(pipe).unwrap();
        let limited = parse(&format!("{pipe}max_tasks = 1000\nmax_memory = \"1GiB\"\n")).unwrap();
        let reloaded = running.reloaded(limited).unwrap();
        assert!(reloaded.handler_changed);
        assert_eq!(
            reloaded.applied,
            [
                "handler.max_tasks off → 1000",
                "handler.max_memory off → 1 GiB"
            ]
        );
        assert_eq!(
            reloaded.config.handler.unwrap().kind.recycle().max_tasks,
            Some(1000)
        );
    }

    #[test]
    fn sizes_are_shown_exactly_in_the_largest_unit_that_divides_them() {
        for (bytes, text) in [
            (512 << 20, "512 MiB"),
            (1 << 30, "1 GiB"),
            (3 << 29, "1536 MiB"),
            (200_000_000, "200 MB"),
            (1024, "1 KiB"),
            (1000, "1 KB"),
            (1234, "1234 B"),
        ] {
            assert_eq!(size_text(bytes), text);
            assert_eq!(parse_size(text), Ok(bytes), "{text} reads back");
        }
    }

    #[test]
    fn the_url_is_validated_and_its_password_never_shown() {
        let text =
            format!("[broker]\nurl = \"amqp://app:s%40cret@rabbit.example:5673/prod\"\n{MINIMAL}");
        let url = parse(&text).unwrap().broker.urls[0].clone();
        assert_eq!(url.to_string(), "amqp://app:***@rabbit.example:5673/prod");
        assert_eq!(
            format!("{url:?}"),
            "BrokerUrl(amqp://app:***@rabbit.example:5673/prod)"
        );
        assert_eq!(url.password(), "s@cret");
        assert_eq!(url.username(), "app");
        assert_eq!(url.vhost(), "prod");
        assert_eq!(url.address(), "rabbit.example:5673");
        assert_eq!(
            url.redact("failed: amqp://app:s%40cret@x and s@cret"),
            "failed: amqp://app:***@x and ***"
        );

        let text = format!("[broker]\nurl = \"amqp://app:pw@[::1]:5673/prod\"\n{MINIMAL}");
        let url = parse(&text).unwrap().broker.urls[0].clone();
        assert_eq!(url.host(), "::1", "an address to resolve, without brackets");
        assert_eq!(url.address(), "[::1]:5673");

        let text = format!("[broker]\nurl = \"http://x\"\n{MINIMAL}");
        assert!(parse(&text)
            .unwrap_err()
            .starts_with("w.toml:2: broker.url: unsupported scheme"));
    }

    #[test]
    fn bindings_name_an_exchange_and_keys_that_fit_its_type() {
        let with = |binding: &str| {
            parse(&format!(
                "[queue]\nname = \"q\"\n[[queue.bindings]]\n{binding}\n[handler]\nkind = \"dots\"\n"
            ))
        };
        let config =
            with("exchange = \"orders\"\ntype = \"topic\"\nrouting_keys = [\"a.*\", \"b.#\"]")
                .unwrap();
        let binding = &config.queue.bindings[0];
        assert_eq!((binding.kind, binding.durable), (ExchangeType::Topic, true));
        assert_eq!(binding.keys(), ["a.*", "b.#"]);
        let fanout = with("exchange = \"all\"\ntype = \"fanout\"").unwrap();
        assert_eq!(fanout.queue.bindings[0].keys(), [""]);
        with("exchange = \"h\"\ntype = \"headers\"\narguments = { \"x-match\" = \"all\", n = 1, b = true }")
            .unwrap();
        for (binding, error) in [
            (
                "exchange = \"\"\nrouting_keys = [\"k\"]",
                "exchange must name an exchange",
            ),
            ("exchange = \"d\"", "give it routing_keys"),
            (
                "exchange = \"f\"\ntype = \"fanout\"\nrouting_keys = [\"k\"]",
                "ignores routing keys",
            ),
            ("exchange = \"h\"\ntype = \"headers\"", "give it arguments"),
            (
                "exchange = \"t\"\ntype = \"topic\"\nrouting_keys = [\"k\"]\narguments = { a = 1 }",
                "only a headers exchange",
            ),
        ] {
            let err = with(binding).unwrap_err();
            assert!(
                err.starts_with("w.toml:1: queue.bindings: ") && err.contains(error),
                "{err}"
            );
        }
    }

    #[test]
    fn queue_declare_consumer_priority_and_arguments_are_read_with_their_defaults() {
        let config = parse(MINIMAL).unwrap();
        assert!(config.queue.declare);
        assert_eq!(config.queue.consumer_priority, None);
        assert!(config.queue.arguments.is_empty());
        let text = "[queue]\nname = \"q\"\ntype = \"quorum\"\nconsumer_priority = -3\narguments = { \"x-max-length\" = 2, \"x-queue-leader-locator\" = \"balanced\", x-single-active-consumer = true }\n";
        let config = parse(text).unwrap();
        assert_eq!(config.queue.consumer_priority, Some(-3));
        assert_eq!(
            config.queue.arguments.into_iter().collect::<Vec<_>>(),
            [
                ("x-max-length".to_string(), ArgValue::Int(2)),
                (
                    "x-queue-leader-locator".to_string(),
                    ArgValue::Str("balanced".into())
                ),
                ("x-single-active-consumer".to_string(), ArgValue::Bool(true)),
            ]
        );
        let config = parse("[queue]\nname = \"q\"\ndeclare = false\n").unwrap();
        assert!(!config.queue.declare);
    }

    #[test]
    fn queue_arguments_that_warren_sets_itself_are_refused_naming_the_key_and_its_owner() {
        for (kind, name, owner) in [
            ("classic", "x-queue-type", "queue.type"),
            ("quorum", "x-delivery-limit", "retry.max_attempts"),
            ("classic", "x-delivery-limit", "retry.max_attempts"),
            ("classic", "x-dead-letter-exchange", "queue.dead_letter"),
            ("quorum", "x-dead-letter-routing-key", "queue.dead_letter"),
            ("classic", "x-dead-letter-strategy", "queue.dead_letter"),
            ("quorum", "x-overflow", "at-least-once dead-lettering"),
            // And those that would lose messages.
            ("quorum", "x-expires", "delete the work queue"),
            ("classic", "x-message-ttl", "use queue.type = \"quorum\""),
            ("classic", "x-max-length", "use queue.type = \"quorum\""),
            (
                "classic",
                "x-max-length-bytes",
                "use queue.type = \"quorum\"",
            ),
        ] {
            // Inline, and as a table of its own with a bare key.
            let inline = format!(
                "[queue]\nname = \"q\"\ntype = \"{kind}\"\narguments = {{ \"x-max-priority\" = 5, \"{name}\" = \"1\" }}\n"
            );
            let err = parse(&inline).unwrap_err();
            let expected = format!("w.toml:4: queue.arguments.\"{name}\": ");
            assert!(err.starts_with(&expected) && err.contains(owner), "{err}");
            let table = format!(
                "[queue]\nname = \"q\"\ntype = \"{kind}\"\n[queue.arguments]\nx-max-priority = 5\n{name} = \"1\"\n"
            );
            let err = parse(&table).unwrap_err();
            let expected = format!("w.toml:6: queue.arguments.\"{name}\": ");
            assert!(err.starts_with(&expected) && err.contains(owner), "{err}");
        }
        // A classic queue's overflow is the operator's to choose.
        parse("[queue]\nname = \"q\"\narguments = { \"x-overflow\" = \"drop-head\" }\n").unwrap();
    }

    #[test]
    fn queue_arguments_are_x_names_and_not_given_with_declare_false() {
        let err =
            parse("[queue]\nname = \"q\"\n\narguments = { \"max-length\" = 5 }\n").unwrap_err();
        assert!(
            err.starts_with("w.toml:4: queue.arguments.\"max-length\": ")
                && err.contains("start with \"x-\""),
            "{err}"
        );
        let err = parse(
            "[queue]\nname = \"q\"\ndeclare = false\narguments = { \"x-max-priority\" = 5 }\n",
        )
        .unwrap_err();
        assert!(
            err.starts_with("w.toml:4: queue.arguments: queue.declare = false")
                && err.contains("policy"),
            "{err}"
        );
        assert!(
            parse("[queue]\nname = \"q\"\narguments = { \"x-max-length\" = 2.5 }\n")
                .unwrap_err()
                .starts_with("w.toml:3: queue.arguments"),
        );
    }

    /// `WARREN_BROKER_URL` set to `urls`.
    fn env(urls: &str) -> Option<UrlOverride> {
        Some(UrlOverride {
            urls: urls.to_string(),
            source: UrlSource::Environment,
        })
    }

    #[test]
    fn the_environment_overrides_the_broker_url() {
        let config = Config::parse(Path::new("w.toml"), MINIMAL, env("amqp://u:p@h:1/v")).unwrap();
        assert_eq!(config.broker.urls[0].address(), "h:1");
        assert_eq!(config.broker.url_source, UrlSource::Environment);
        assert_eq!(parse(MINIMAL).unwrap().broker.url_source, UrlSource::File);
        let config = Config::parse(
            Path::new("w.toml"),
            MINIMAL,
            env("amqp://a:5672, amqp://b:5672"),
        )
        .unwrap();
        assert_eq!(config.broker.describe(), "amqp://a:5672, amqp://b:5672");
        let err = Config::parse(Path::new("w.toml"), MINIMAL, env("nope")).unwrap_err();
        assert!(err.to_string().starts_with("WARREN_BROKER_URL"), "{err}");
    }

    #[test]
    fn a_reload_applies_workers_handler_breaker_and_grace_and_names_the_rest() {
        let old = parse(MINIMAL).unwrap();
        let text = "[broker]\nurl = \"amqp://u:secret@other\"\n[queue]\nname = \"jobs\"\n\
                    [workers]\ncount = 6\nprefetch = 10\n\
                    [handler]\nkind = \"command\"\ncommand = [\"true\"]\ntimeout = \"5m\"\n\
                    [breaker]\ncooldown = \"2s\"\n[shutdown]\ngrace = \"1m\"\n";
        let reloaded = old.reloaded(parse(text).unwrap()).unwrap();
        assert_eq!(
            reloaded.applied,
            [
                "workers.count 4 → 6",
                "handler.kind dots → command",
                "handler.timeout 10m → 5m",
                "breaker.cooldown 5s → 2s",
                "shutdown.grace 30s → 1m"
            ]
        );
        assert_eq!(reloaded.restart, ["broker", "workers.prefetch"]);
        assert!(reloaded.handler_changed);
        let config = reloaded.config;
        assert_eq!((config.workers.count, config.workers.prefetch), (6, 1));
        assert_eq!(
            config.broker.urls, old.broker.urls,
            "the running broker stays"
        );
        assert_eq!(config.breaker.cooldown, Duration::from_secs(2));
        assert!(!format!("{:?}", reloaded.applied).contains("secret"));

        let same = old.reloaded(parse(MINIMAL).unwrap()).unwrap();
        assert!(same.applied.is_empty() && same.restart.is_empty() && !same.handler_changed);

        let strict = parse("[broker]\nconsumer_timeout = \"15m\"\n[queue]\nname = \"jobs\"\n[handler]\nkind = \"dots\"\ntimeout = \"1m\"\n").unwrap();
        let long =
            parse("[queue]\nname = \"jobs\"\n[handler]\nkind = \"dots\"\ntimeout = \"20m\"\n")
                .unwrap();
        let err = strict.reloaded(long).unwrap_err();
        assert!(
            err.contains("must be shorter than the running broker.consumer_timeout (15m)"),
            "{err}"
        );
    }

    #[test]
    fn the_breaker_and_the_control_socket_are_configured_and_checked() {
        let config = parse(MINIMAL).unwrap();
        assert_eq!(config.breaker, BreakerConfig::default());
        assert!(config.breaker.enabled);
        assert_eq!(
            config.control,
            Control {
                socket: PathBuf::from("/run/warren/w.sock"),
                explicit: false
            }
        );
        assert_eq!(config.metrics.queue_depth_interval, Duration::from_secs(15));
        let with = |extra: &str| parse(&format!("{MINIMAL}{extra}"));
        assert_eq!(
            with("[breaker]\nmin_messages = 1\n").unwrap_err(),
            "w.toml:6: breaker.min_messages: must be at least 2: one message that fails again and again must not trip the breaker"
        );
        assert!(with("[breaker]\nmin_failures = 2\n")
            .unwrap_err()
            .starts_with("w.toml:6: breaker.min_failures: must be at least breaker.min_messages"));
        assert!(with("[breaker]\noutcomes = 4\n")
            .unwrap_err()
            .starts_with("w.toml:6: breaker.outcomes: must be at least breaker.min_failures"));
        assert!(with("[breaker]\nfailure_ratio = 1.5\n")
            .unwrap_err()
            .starts_with("w.toml:6: breaker.failure_ratio: must be more than 0 and at most 1"));
        assert!(
            with("[breaker]\ncooldown = \"1m\"\nmax_cooldown = \"10s\"\n")
                .unwrap_err()
                .starts_with("w.toml:7: breaker.max_cooldown:")
        );
        assert!(
            !with("[breaker]\nenabled = false\n")
                .unwrap()
                .breaker
                .enabled
        );
        assert_eq!(
            with("[control]\nsocket = \"x.sock\"\n").unwrap_err(),
            "w.toml:6: control.socket: must be an absolute path"
        );
        let explicit = with("[control]\nsocket = \"/tmp/w.sock\"\n").unwrap();
        assert_eq!(explicit.control.socket, PathBuf::from("/tmp/w.sock"));
        assert!(explicit.control.explicit);
    }

    #[test]
    fn a_missing_program_names_the_command_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.toml");
        fs::write(&path, "[queue]\nname = \"q\"\n[handler]\nkind = \"command\"\ncommand = [\"/nonexistent/job\"]\n").unwrap();
        let config = Config::load(&path, None).unwrap();
        let err = config.handler().unwrap_err().to_string();
        assert!(
            err.ends_with(":5: handler.command: program /nonexistent/job does not exist"),
            "{err}"
        );
        assert!(resolve_program("sh").is_ok());
        let plain = dir.path().join("plain");
        fs::write(&plain, "not a program").unwrap();
        let err = resolve_program(plain.to_str().unwrap()).unwrap_err();
        assert!(err.ends_with("is not an executable file"), "{err}");
    }
}
