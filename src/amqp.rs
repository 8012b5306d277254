//! Everything warren says to RabbitMQ. This is the only module that imports amiquip; the rest of
//! warren sees [`Session`], [`Subscription`], [`Delivery`] and [`Publisher`], and errors as an
//! [`AmqpError`] whose variants tell a caller whether to retry or give up.
//!
//! warren opens each TCP connection itself, with the configured connect timeout and with
//! `TCP_NODELAY` set, and hands the stream to amiquip: amiquip's own URL connect has no timeout
//! and leaves Nagle's algorithm on, which delays small ack frames. For an `amqps://` node amiquip
//! runs the TLS handshake on that stream with the connector of `[broker.tls]` (see `tls.rs`).
//! Every error text that leaves this module has the broker password masked, because amiquip's
//! errors print whole URLs.

use std::net::{TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use amiquip::{
    AmqpProperties, AmqpValue, Auth, Channel, Confirm, Connection, ConnectionBlockedNotification,
    ConnectionOptions, ConnectionTuning, ConsumerMessage, ConsumerOptions, ExchangeDeclareOptions,
    ExchangeType, FieldTable, Publish, QueueDeclareOptions, QueueDeleteOptions,
};
use crossbeam_channel::{select_biased, Receiver, TryRecvError};

use crate::config::{self, Broker, BrokerUrl};
use crate::context::{self, Context, Value};
use crate::tls::{self, Tls};

/// How one connection attempt failed.
enum Failed {
    /// The broker closed the connection after warren sent its login and before it accepted
    /// it. That is how RabbitMQ refuses a login, and also how a dying node ends one.
    Login,
    Other(AmqpError),
}

impl From<AmqpError> for Failed {
    fn from(e: AmqpError) -> Failed {
        Failed::Other(e)
    }
}

/// RabbitMQ closes a refused login this long after it, without a word.
const LOGIN_REFUSAL_DELAY: Duration = Duration::from_secs(3);

/// Why a login that ran out of time is only retried: a broker that is starting, stopping or
/// overloaded. With a timeout under RabbitMQ's delay for refusing wrong credentials, those look
/// the same, so the line says so.
fn login_timeout(timeout: Duration) -> String {
    let mut reason = format!("no answer to the login within {timeout:?}");
    if timeout <= LOGIN_REFUSAL_DELAY + Duration::from_secs(1) {
        reason.push_str(&format!(
            " (RabbitMQ takes {LOGIN_REFUSAL_DELAY:?} to refuse wrong credentials, so with a broker.connect_timeout this short they look the same: check them too)"
        ));
    }
    reason
}

/// Why opening a connection failed, once the TCP (and TLS) connection was made.
fn open_error(url: &BrokerUrl, e: amiquip::Error) -> AmqpError {
    match e {
        amiquip::Error::ServerClosedConnection {
            code: NOT_ALLOWED,
            message,
        } => AmqpError::LoginRefused {
            address: url.address(),
            reason: format!(
                "user {:?} may not use vhost {:?} ({})",
                url.username(),
                url.vhost(),
                url.redact(&message)
            ),
        },
        other => AmqpError::Unreachable {
            address: url.address(),
            reason: url.redact(&other.to_string()),
        },
    }
}

/// As [`open_error`], for a TLS connection: a failed handshake, or the broker's refusal of the
/// client certificate, in words.
fn tls_open_error(url: &BrokerUrl, tls: &Tls, name: &str, e: amiquip::Error) -> AmqpError {
    let text = e.to_string();
    let reason = if let Some(refusal) = tls::describe_alert(&text) {
        refusal
    } else if matches!(e, amiquip::Error::TlsHandshake { .. }) {
        tls::describe_handshake_error(&text, name)
    } else {
        // A socket that failed during the AMQP handshake: maybe the broker's refusal of the
        // client certificate, whose alert was lost with the connection.
        let socket = text.contains("socket");
        return match open_error(url, e) {
            AmqpError::Unreachable { address, reason } if socket => AmqpError::Unreachable {
                address,
                reason: reason + tls.refusal_hint(),
            },
            other => other,
        };
    };
    AmqpError::Unreachable {
        address: url.address(),
        reason: url.redact(&reason),
    }
}

/// Whether a 404 says that the queue exists but lives on a node that is down (a classic queue
/// in a cluster), rather than that there is no such queue.
fn home_node_down(message: &str) -> bool {
    message.contains("home node") && message.contains("down or inaccessible")
}

/// The AMQP reply codes that warren branches on.
const CONNECTION_FORCED: u16 = 320;
/// Also the reply of a passive declare (or a get, or a purge) that names a missing queue.
const NOT_FOUND: u16 = 404;
const PRECONDITION_FAILED: u16 = 406;
const NOT_ALLOWED: u16 = 530;

/// Why a broker operation failed, sorted by what the caller should do about it.
#[derive(Debug, thiserror::Error)]
pub enum AmqpError {
    /// The broker could not be reached or dropped the TCP connection while it was being set up.
    /// Retry later.
    #[error("cannot reach the broker at {address}: {reason}")]
    Unreachable { address: String, reason: String },
    /// The broker answered but refused us: wrong credentials or a vhost we may not use. Retrying
    /// will not help; the configuration must change.
    #[error("the broker at {address} refused the connection: {reason}")]
    LoginRefused { address: String, reason: String },
    /// The broker refused an operation on an open channel, such as a queue declare whose
    /// arguments differ from the existing queue's. Retrying will not help.
    #[error("the broker rejected {what}: {reason}")]
    Rejected { what: String, reason: String },
    /// An open connection or channel was lost (closed by the broker or an operator, or a dead
    /// network caught by heartbeats). Reconnect; unacked messages have been requeued.
    #[error("lost the connection to {address}: {reason}")]
    Lost { address: String, reason: String },
    /// The broker closed the channel because a delivery stayed unacked longer than the
    /// `consumer_timeout` it enforces, which it names. Reconnect; the message has been requeued.
    #[error(
        "the broker at {address} closed the channel: a task outlived its consumer_timeout ({})",
        humantime::format_duration(*timeout)
    )]
    AckTimeout { address: String, timeout: Duration },
    /// Queues or exchanges that warren may not declare (`queue.declare = false`) are missing;
    /// the text names each and what it needs. The operator must make them.
    #[error("{0}")]
    Missing(String),
}

impl AmqpError {
    /// True when retrying cannot help and the operator must change something.
    pub fn is_fatal(&self) -> bool {
        matches!(
            self,
            AmqpError::LoginRefused { .. } | AmqpError::Rejected { .. } | AmqpError::Missing(_)
        )
    }
}

/// One connection with one channel. Each worker owns two (one consumes, one publishes copies);
/// `warren publish` uses one.
pub struct Session {
    url: BrokerUrl,
    /// The connection's TCP socket, shared with amiquip's I/O thread, to cut a connection that
    /// has gone silent: amiquip's own close waits for the broker's answer.
    socket: TcpStream,
    blocked: Receiver<ConnectionBlockedNotification>,
    // Field order matters: the channel must close before its connection.
    channel: Channel,
    connection: Connection,
}

/// A queue argument value, as warren uses them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Arg {
    Str(String),
    Int(i64),
    Bool(bool),
}

impl Arg {
    fn value(&self) -> AmqpValue {
        match self {
            Arg::Str(s) => AmqpValue::LongString(s.clone()),
            Arg::Int(i) => AmqpValue::LongLongInt(*i),
            Arg::Bool(b) => AmqpValue::Boolean(*b),
        }
    }
}

/// As the broker's messages and warren's configuration write an argument: `"quorum"`, `30000`.
impl std::fmt::Display for Arg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Arg::Str(s) => write!(f, "{s:?}"),
            Arg::Int(i) => write!(f, "{i}"),
            Arg::Bool(b) => write!(f, "{b}"),
        }
    }
}

/// A queue or an exchange, looked up by a passive declare.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lookup<'a> {
    Queue(&'a str),
    Exchange(&'a str),
}

impl std::fmt::Display for Lookup<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Lookup::Queue(name) => write!(f, "queue {name:?}"),
            Lookup::Exchange(name) => write!(f, "exchange {name:?}"),
        }
    }
}

/// A binding of a queue to an exchange, and the exchange to declare for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BindingSpec {
    pub exchange: String,
    pub kind: config::ExchangeType,
    pub durable: bool,
    /// Look the exchange up instead of declaring it (RabbitMQ's own `amq.*` exchanges).
    pub passive: bool,
    pub queue: String,
    pub routing_key: String,
    pub arguments: Vec<(String, Arg)>,
}

/// A queue to declare: its name, durability and `x-` arguments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueSpec {
    pub name: String,
    pub durable: bool,
    pub arguments: Vec<(String, Arg)>,
}

/// What [`Publisher::publish`] puts on every message beside its body, id and timestamp.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stamp {
    pub correlation_id: Option<String>,
    /// String headers, by name.
    pub headers: Vec<(String, String)>,
}

/// A message header as warren reads it.
#[derive(Debug, Clone, PartialEq)]
pub enum Header {
    Int(i64),
    Str(String),
    /// Any other AMQP type, described for a log line.
    Other(String),
}

impl Session {
    /// Connects to node `node` (modulo their number) of the broker and opens a channel. `name`
    /// is sent as the client property `information`, shown by `rabbitmqctl list_connections
    /// client_properties` and the management UI.
    ///
    /// A login that the broker ends without a word is tried once more before it counts as
    /// refused: RabbitMQ refuses wrong credentials that way (3 s after the login), but a node
    /// that dies or stops during the login ends it the same way, and retrying that one is right.
    pub fn open(broker: &Broker, node: usize, name: &str) -> Result<Session, AmqpError> {
        let url = &broker.urls[node % broker.urls.len()];
        let mut opened = Session::attempt(broker, url, name);
        if matches!(opened, Err(Failed::Login)) {
            log::debug!(
                "the broker at {} closed the connection during the login; trying once more",
                url.address()
            );
            opened = Session::attempt(broker, url, name);
        }
        opened.map_err(|failed| match failed {
            Failed::Login => AmqpError::LoginRefused {
                address: url.address(),
                reason: format!("invalid credentials for user {:?}", url.username()),
            },
            Failed::Other(e) => e,
        })
    }

    /// One connection attempt to `url`.
    fn attempt(broker: &Broker, url: &BrokerUrl, name: &str) -> Result<Session, Failed> {
        let unreachable = |reason: String| AmqpError::Unreachable {
            address: url.address(),
            reason: url.redact(&reason),
        };
        let stream = connect_tcp(url, broker.connect_timeout).map_err(unreachable)?;
        let socket = stream.try_clone().map_err(|e| unreachable(e.to_string()))?;
        let stream =
            mio::net::TcpStream::from_stream(stream).map_err(|e| unreachable(e.to_string()))?;
        let options = ConnectionOptions::default()
            .auth(Auth::Plain {
                username: url.username(),
                password: url.password(),
            })
            .virtual_host(url.vhost())
            .heartbeat(broker.heartbeat)
            .connection_timeout(Some(broker.connect_timeout))
            .information(Some(name.to_string()));
        let tuning = ConnectionTuning::default();
        let started = Instant::now();
        let tls = url.is_tls().then(|| {
            let tls = (broker.tls.as_ref())
                .expect("invariant: the config sets broker.tls when a URL is amqps://");
            (tls, tls.server_name(url.host()))
        });
        let opened = match tls {
            Some((tls, name)) => {
                Connection::open_tls_stream(tls.connector(), name, stream, options, tuning)
            }
            None => Connection::insecure_open_stream(stream, options, tuning),
        };
        let mut connection = match opened {
            Ok(connection) => connection,
            // amiquip says "invalid credentials" for whatever ends a connection after the
            // login was sent and before the broker accepted it, its own timeout included.
            Err(amiquip::Error::InvalidCredentials)
                if started.elapsed() >= broker.connect_timeout =>
            {
                return Err(unreachable(login_timeout(broker.connect_timeout)).into())
            }
            Err(amiquip::Error::InvalidCredentials) => return Err(Failed::Login),
            Err(e) => {
                return Err(match tls {
                    Some((tls, name)) => tls_open_error(url, tls, name, e),
                    None => open_error(url, e),
                }
                .into())
            }
        };
        let blocked = connection
            .listen_for_connection_blocked()
            .map_err(|e| lost(url, e))?;
        let channel = connection.open_channel(None).map_err(|e| lost(url, e))?;
        Ok(Session {
            url: url.clone(),
            socket,
            blocked,
            channel,
            connection,
        })
    }

    /// Connects to the first of the broker's nodes that answers, trying them in turn from a
    /// random one (so that many clients spread over a cluster), and says which (its number).
    /// A fatal error (refused credentials or vhost) ends the search at once; otherwise the last
    /// node's error is returned.
    pub fn open_any(broker: &Broker, name: &str) -> Result<(Session, usize), AmqpError> {
        Session::open_from(broker, fastrand::usize(..broker.urls.len()), name)
    }

    /// Like [`Session::open_any`], trying node `first` first.
    pub fn open_from(
        broker: &Broker,
        first: usize,
        name: &str,
    ) -> Result<(Session, usize), AmqpError> {
        let nodes = broker.urls.len();
        let mut last = None;
        for node in (first..first + nodes).map(|node| node % nodes) {
            match Session::open(broker, node, name) {
                Ok(session) => return Ok((session, node)),
                Err(e) if e.is_fatal() => return Err(e),
                Err(e) => {
                    log::debug!("{e}");
                    last = Some(e);
                }
            }
        }
        Err(last.expect("invariant: a config names at least one node"))
    }

    /// `host:port` of the node this session is connected to.
    pub fn address(&self) -> String {
        self.url.address()
    }

    /// Declares a queue. A queue that exists with other arguments is a fatal
    /// [`AmqpError::Rejected`] whose text names the queue, the argument, what exists and what
    /// was asked for.
    pub fn declare(&self, spec: &QueueSpec) -> Result<(), AmqpError> {
        let arguments = field_table(&spec.arguments);
        let options = QueueDeclareOptions {
            durable: spec.durable,
            arguments,
            ..QueueDeclareOptions::default()
        };
        self.channel
            .queue_declare(spec.name.as_str(), options)
            .map(drop)
            .map_err(|e| match e {
                amiquip::Error::ServerClosedChannel {
                    code: PRECONDITION_FAILED,
                    ref message,
                    ..
                } if message.contains("inequivalent arg") => AmqpError::Rejected {
                    what: format!("the declare of queue {:?}", spec.name),
                    reason: describe_inequivalent(message),
                },
                other => self.channel_error(other, format!("the declare of queue {:?}", spec.name)),
            })
    }

    /// Declares the exchange of `spec` (or looks it up, if it is passive) and binds the queue to
    /// it. An exchange that exists with another type or durability is a fatal
    /// [`AmqpError::Rejected`], as a queue with other arguments is.
    pub fn bind(&self, spec: &BindingSpec) -> Result<(), AmqpError> {
        let what = format!("the declare of exchange {:?}", spec.exchange);
        let declared = if spec.passive {
            self.channel
                .exchange_declare_passive(spec.exchange.as_str())
        } else {
            let kind = match spec.kind {
                config::ExchangeType::Direct => ExchangeType::Direct,
                config::ExchangeType::Topic => ExchangeType::Topic,
                config::ExchangeType::Fanout => ExchangeType::Fanout,
                config::ExchangeType::Headers => ExchangeType::Headers,
            };
            let options = ExchangeDeclareOptions {
                durable: spec.durable,
                ..ExchangeDeclareOptions::default()
            };
            self.channel
                .exchange_declare(kind, spec.exchange.as_str(), options)
        };
        declared.map_err(|e| self.channel_error(e, what))?;
        self.channel
            .queue_bind(
                spec.queue.as_str(),
                spec.exchange.as_str(),
                spec.routing_key.as_str(),
                field_table(&spec.arguments),
            )
            .map_err(|e| {
                let what = format!(
                    "the binding of queue {:?} to exchange {:?} with routing key {:?}",
                    spec.queue, spec.exchange, spec.routing_key
                );
                self.channel_error(e, what)
            })
    }

    /// Whether a queue or exchange exists, by a passive declare, which creates nothing and needs
    /// no permission. It goes on a channel of its own, as in [`Session::inspect`]: the broker
    /// closes the channel of a passive declare that names something missing.
    pub fn exists(&mut self, lookup: Lookup<'_>) -> Result<bool, AmqpError> {
        let found = self.passive(
            &format!("a passive declare of {lookup}"),
            |channel| match lookup {
                Lookup::Queue(name) => channel.queue_declare_passive(name).map(drop),
                Lookup::Exchange(name) => channel.exchange_declare_passive(name).map(drop),
            },
        )?;
        Ok(found.is_some())
    }

    /// Runs the passive declare `declare` on a channel of its own, which the broker closes when
    /// it names something missing (`None` then); the session's own channel, and anything held
    /// on it, stays open. `what` names the declare in an error.
    fn passive<T>(
        &mut self,
        what: &str,
        declare: impl FnOnce(&Channel) -> amiquip::Result<T>,
    ) -> Result<Option<T>, AmqpError> {
        let channel = self
            .connection
            .open_channel(None)
            .map_err(|e| lost(&self.url, e))?;
        match declare(&channel) {
            Ok(found) => {
                channel.close().map_err(|e| lost(&self.url, e))?;
                Ok(Some(found))
            }
            // The broker has closed the channel already; dropping it only frees its id.
            Err(amiquip::Error::ServerClosedChannel {
                code: NOT_FOUND,
                ref message,
                ..
            }) if !home_node_down(message) => Ok(None),
            Err(e) => Err(self.channel_error(e, what.to_string())),
        }
    }

    /// Deletes an exchange; for tests.
    pub fn delete_exchange(&self, exchange: &str) -> Result<(), AmqpError> {
        self.channel
            .exchange_delete(exchange, false)
            .map_err(|e| self.channel_error(e, format!("deleting exchange {exchange:?}")))
    }

    /// Sets the prefetch limit and starts consuming `queue` with manual acks, with the consumer
    /// priority `priority` (`x-priority`) if there is one.
    pub fn subscribe(
        &self,
        queue: &str,
        prefetch: u16,
        priority: Option<i32>,
    ) -> Result<Subscription<'_>, AmqpError> {
        self.channel
            .qos(0, prefetch, false)
            .map_err(|e| self.channel_error(e, "basic.qos".into()))?;
        let mut arguments = FieldTable::new();
        if let Some(priority) = priority {
            arguments.insert("x-priority".into(), AmqpValue::LongInt(priority));
        }
        let options = ConsumerOptions {
            arguments,
            ..ConsumerOptions::default()
        };
        let consumer = self
            .channel
            .basic_consume(queue, options)
            .map_err(|e| self.channel_error(e, format!("consuming queue {queue:?}")))?;
        Ok(Subscription {
            session: self,
            consumer,
        })
    }

    /// Enables publisher confirms and returns of unroutable messages. Publish on a session of its
    /// own, not on a consumer's: the broker blocks a connection that publishes during a memory or
    /// disk alarm, and acks must not wait for that.
    pub fn publisher(&self) -> Result<Publisher<'_>, AmqpError> {
        let returns = self
            .channel
            .listen_for_returns()
            .map_err(|e| lost(&self.url, e))?;
        let confirms = self
            .channel
            .listen_for_publisher_confirms()
            .map_err(|e| lost(&self.url, e))?;
        self.channel
            .enable_publisher_confirms()
            .map_err(|e| self.channel_error(e, "publisher confirms".into()))?;
        Ok(Publisher {
            session: self,
            confirms,
            returns,
            next_tag: 1,
        })
    }

    /// Publishes `body` to `queue` through the default exchange without confirms; for tests and
    /// tools that need a message with particular headers.
    pub fn publish_raw(
        &self,
        queue: &str,
        body: &[u8],
        headers: Vec<(String, Header)>,
    ) -> Result<(), AmqpError> {
        let table = add_headers(FieldTable::new(), headers);
        let properties = AmqpProperties::default()
            .with_delivery_mode(2)
            .with_headers(table);
        self.channel
            .basic_publish("", Publish::with_properties(body, queue, properties))
            .map_err(|e| lost(&self.url, e))
    }

    /// Takes one message from `queue` and acks it, for tests and tools: its body, message id and
    /// headers, or `None` if the queue is empty.
    pub fn get(&self, queue: &str) -> Result<Option<Fetched>, AmqpError> {
        let Some(got) = self
            .channel
            .basic_get(queue, true)
            .map_err(|e| self.channel_error(e, format!("basic.get from queue {queue:?}")))?
        else {
            return Ok(None);
        };
        let delivery = Delivery(got.delivery);
        let headers = delivery
            .0
            .properties
            .headers()
            .iter()
            .flat_map(|table| table.iter())
            .map(|(k, v)| (k.clone(), header(v)))
            .collect();
        Ok(Some(Fetched {
            body: delivery.0.body.clone(),
            message_id: delivery.message_id().map(str::to_string),
            headers,
        }))
    }

    /// The number of ready messages and of consumers of `queue`, by a passive declare.
    pub fn queue_counts(&self, queue: &str) -> Result<(u32, u32), AmqpError> {
        let q = self
            .channel
            .queue_declare_passive(queue)
            .map_err(|e| self.channel_error(e, format!("a passive declare of queue {queue:?}")))?;
        Ok((
            q.declared_message_count().unwrap_or(0),
            q.declared_consumer_count().unwrap_or(0),
        ))
    }

    /// Deletes `queue`, whatever it holds. Used by tests and tools, never by `warren run`.
    pub fn delete_queue(&self, queue: &str) -> Result<u32, AmqpError> {
        self.channel
            .queue_delete(queue, QueueDeleteOptions::default())
            .map_err(|e| self.channel_error(e, format!("deleting queue {queue:?}")))
    }

    /// Closes the channel and the connection cleanly. Dropping a session also closes both, but
    /// ignores errors.
    pub fn close(self) -> Result<(), AmqpError> {
        let Session {
            url,
            channel,
            connection,
            ..
        } = self;
        let channel_result = channel.close();
        connection.close().map_err(|e| lost(&url, e))?;
        channel_result.map_err(|e| lost(&url, e))
    }

    /// Cuts the connection without waiting for the broker: for a connection that has gone
    /// silent, whose clean close would wait for an answer until heartbeats give up on it. The
    /// broker requeues what was unacked when it sees the connection go, as for any lost one.
    pub fn cut(self) {
        let _ = self.socket.shutdown(std::net::Shutdown::Both);
        drop(self);
    }

    /// Closes a session whose consumer ended with `ended`, and returns the better reason if the
    /// connection has one. When amiquip's I/O thread dies (missed heartbeats, a reset socket),
    /// the consumer only sees its channel disconnect; the cause comes out of the close.
    pub fn close_after(self, ended: AmqpError) -> AmqpError {
        match self.close_after_channel(ended) {
            Ok(ended) | Err(ended) => ended,
        }
    }

    /// Closes a session whose channel ended with `ended`, and says whether the connection was
    /// lost too (`Err`, with the connection's own reason when it has one) or was still up
    /// (`Ok(ended)`): then the broker closed only the channel, as it does for an error of the
    /// channel's own (access refused, a message over the size limit), and another connection
    /// would meet the same.
    pub fn close_after_channel(self, ended: AmqpError) -> Result<AmqpError, AmqpError> {
        let Session {
            url,
            channel,
            connection,
            ..
        } = self;
        drop(channel);
        match connection.close() {
            Ok(()) => Ok(ended),
            Err(amiquip::Error::ClientClosedConnection) => Err(ended),
            // The channel's own reason says more than the connection's ("received message for
            // nonexistent channel", after an ack on the closed channel).
            Err(_) if matches!(ended, AmqpError::AckTimeout { .. }) => Err(ended),
            Err(e) => Err(lost(&url, e)),
        }
    }

    /// Positively acknowledges a delivery of this session's channel: the broker forgets the
    /// message.
    pub fn ack(&self, delivery: Delivery) -> Result<(), AmqpError> {
        delivery
            .0
            .ack(&self.channel)
            .map_err(|e| lost(&self.url, e))
    }

    /// Returns a delivery of this session's channel to its queue, to be delivered again.
    pub fn requeue(&self, delivery: Delivery) -> Result<(), AmqpError> {
        delivery
            .0
            .nack(&self.channel, true)
            .map_err(|e| lost(&self.url, e))
    }

    /// Takes the next message of `queue` without acking it (`basic.get` with `no_ack = false`),
    /// or `None` if the queue has no ready message. It stays the broker's, unacked, until it is
    /// settled on this session's channel or the channel closes (which requeues it).
    pub fn take(&self, queue: &str) -> Result<Option<Delivery>, AmqpError> {
        let got = self
            .channel
            .basic_get(queue, false)
            .map_err(|e| self.channel_error(e, format!("basic.get from queue {queue:?}")))?;
        Ok(got.map(|got| Delivery(got.delivery)))
    }

    fn channel_error(&self, err: amiquip::Error, what: String) -> AmqpError {
        match err {
            // A classic queue's node is down (in a cluster): it comes back when the node does.
            amiquip::Error::ServerClosedChannel {
                code: NOT_FOUND,
                ref message,
                ..
            } if home_node_down(message) => AmqpError::Lost {
                address: self.url.address(),
                reason: format!("{what}: {}", self.url.redact(message)),
            },
            amiquip::Error::ServerClosedChannel { code, message, .. } => AmqpError::Rejected {
                what,
                reason: format!("{} (code {code})", self.url.redact(&message)),
            },
            other => lost(&self.url, other),
        }
    }
}

fn field_table(arguments: &[(String, Arg)]) -> FieldTable {
    let mut table = FieldTable::new();
    for (key, value) in arguments {
        table.insert(key.clone(), value.value());
    }
    table
}

/// A message taken with [`Session::get`].
#[derive(Debug, Clone)]
pub struct Fetched {
    pub body: Vec<u8>,
    pub message_id: Option<String>,
    pub headers: Vec<(String, Header)>,
}

impl Fetched {
    pub fn header(&self, name: &str) -> Option<&Header> {
        self.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v)
    }
}

fn header(value: &AmqpValue) -> Header {
    match context_value(value) {
        Value::Int(i) => Header::Int(i),
        Value::Str(s) => Header::Str(s.to_string()),
        other => Header::Other(format!("{other:?}")),
    }
}

/// Turns the broker's "inequivalent arg 'durable' for queue 'q' in vhost '/': received 'false'
/// but current is 'true'" (or "received the value 'quorum' of type 'longstr' but current is
/// none") into a sentence that says what exists, what the config wants, and what to do.
fn describe_inequivalent(message: &str) -> String {
    fn value(text: &str) -> String {
        let text = text.trim();
        if text == "none" {
            return "(not set)".into();
        }
        match text.split('\'').nth(1) {
            Some("") => "\"\"".into(),
            Some(value) => value.to_string(),
            None => text.to_string(),
        }
    }
    let parsed = message
        .split_once(": received ")
        .and_then(|(head, values)| {
            let arg = head.split('\'').nth(1)?;
            let (wanted, existing) = values.split_once(" but current is ")?;
            Some((arg, value(wanted), value(existing)))
        });
    match parsed {
        Some((arg, wanted, existing)) => format!(
            "it exists with {arg} = {existing}, but the config wants {arg} = {wanted}; \
             RabbitMQ does not allow redefining an existing queue with different parameters: \
             change the config back, or delete the queue (and its messages) first"
        ),
        None => message.to_string(),
    }
}

/// Opens a TCP connection to the first address of `url` that answers within `timeout`.
fn connect_tcp(url: &BrokerUrl, timeout: Duration) -> Result<TcpStream, String> {
    let addrs = (url.host(), url.port())
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve {}: {e}", url.host()))?;
    let mut failures = Vec::new();
    for addr in addrs {
        match TcpStream::connect_timeout(&addr, timeout) {
            Ok(stream) => {
                stream.set_nodelay(true).map_err(|e| e.to_string())?;
                return Ok(stream);
            }
            Err(e) => failures.push((addr, e)),
        }
    }
    Err(match failures.as_slice() {
        [] => format!("{} resolved to no address", url.host()),
        [(_, e)] => e.to_string(),
        many => many
            .iter()
            .map(|(addr, e)| format!("{addr}: {e}"))
            .collect::<Vec<_>>()
            .join("; "),
    })
}

/// The consumer_timeout named by the broker's reason for closing a channel, if that is why:
/// "PRECONDITION_FAILED - delivery acknowledgement on channel 1 timed out. Timeout value used:
/// 3000 ms. …".
fn ack_timeout(message: &str) -> Option<Duration> {
    if !message.contains("delivery acknowledgement on channel") {
        return None;
    }
    let (_, used) = message.split_once("Timeout value used: ")?;
    let (ms, _) = used.split_once(" ms")?;
    ms.trim().parse().ok().map(Duration::from_millis)
}

fn lost(url: &BrokerUrl, err: amiquip::Error) -> AmqpError {
    if let amiquip::Error::ServerClosedChannel {
        code: PRECONDITION_FAILED,
        ref message,
        ..
    } = err
    {
        if let Some(timeout) = ack_timeout(message) {
            return AmqpError::AckTimeout {
                address: url.address(),
                timeout,
            };
        }
    }
    let reason = match err {
        amiquip::Error::ServerClosedConnection {
            code: CONNECTION_FORCED,
            message,
        } => format!(
            "closed by the broker or an operator ({})",
            url.redact(&message)
        ),
        amiquip::Error::MissedServerHeartbeats => "missed heartbeats from the broker".into(),
        amiquip::Error::ServerClosedConnection { ref message, .. }
            if message.contains("feature flag is disabled") =>
        {
            format!(
                "{}; a cluster enables a feature flag only while all its nodes run: once they \
                 do, `rabbitmqctl enable_feature_flag all` enables it",
                url.redact(&err.to_string())
            )
        }
        other => url.redact(&other.to_string()),
    };
    AmqpError::Lost {
        address: url.address(),
        reason,
    }
}

/// A message delivered to a [`Subscription`], or taken with [`Session::take`]. It must be settled on
/// the channel of the session it came from.
pub struct Delivery(amiquip::Delivery);

impl Delivery {
    pub fn body(&self) -> &[u8] {
        &self.0.body
    }

    /// The `message_id` property, if the publisher set one.
    pub fn message_id(&self) -> Option<&str> {
        self.0.properties.message_id().as_deref()
    }

    /// True when the broker has delivered this message before (to any consumer).
    pub fn redelivered(&self) -> bool {
        self.0.redelivered
    }

    /// The header `name`, if the message has it.
    pub fn header(&self, name: &str) -> Option<Header> {
        self.0.properties.headers().as_ref()?.get(name).map(header)
    }

    /// The `reply_to` property: where the producer waits for an answer.
    pub fn reply_to(&self) -> Option<&str> {
        self.0.properties.reply_to().as_deref()
    }

    /// The `correlation_id` property.
    pub fn correlation_id(&self) -> Option<&str> {
        self.0.properties.correlation_id().as_deref()
    }

    /// What a handler program sees of the message beside its body. A copy that warren
    /// republished (a retry) shows where the producer published it, from the headers
    /// [`context::EXCHANGE_HEADER`] and [`context::ROUTING_KEY_HEADER`]; they count only on a
    /// message that came through the default exchange, as warren's copies do, and only as long
    /// as AMQP allows an exchange name or routing key (255 bytes).
    pub fn context(&self) -> Context<'_> {
        let properties = &self.0.properties;
        let headers = properties.headers().as_ref();
        let kept = |name: &str| match headers.and_then(|h| h.get(name)) {
            Some(AmqpValue::LongString(s)) if self.0.exchange.is_empty() && s.len() <= 255 => {
                Some(s.as_str())
            }
            _ => None,
        };
        Context {
            exchange: kept(context::EXCHANGE_HEADER).unwrap_or(&self.0.exchange),
            routing_key: kept(context::ROUTING_KEY_HEADER).unwrap_or(&self.0.routing_key),
            correlation_id: properties.correlation_id().as_deref(),
            reply_to: properties.reply_to().as_deref(),
            timestamp: *properties.timestamp(),
            content_type: properties.content_type().as_deref(),
            content_encoding: properties.content_encoding().as_deref(),
            kind: properties.type_().as_deref(),
            app_id: properties.app_id().as_deref(),
            headers: headers.map(fields).unwrap_or_default(),
        }
    }
}

fn fields(table: &FieldTable) -> Vec<(&str, Value<'_>)> {
    table
        .iter()
        .map(|(name, value)| (name.as_str(), context_value(value)))
        .collect()
}

fn context_value(value: &AmqpValue) -> Value<'_> {
    match value {
        AmqpValue::Boolean(b) => Value::Bool(*b),
        AmqpValue::ShortShortInt(i) => Value::Int((*i).into()),
        AmqpValue::ShortShortUInt(i) => Value::Int((*i).into()),
        AmqpValue::ShortInt(i) => Value::Int((*i).into()),
        AmqpValue::ShortUInt(i) => Value::Int((*i).into()),
        AmqpValue::LongInt(i) => Value::Int((*i).into()),
        AmqpValue::LongUInt(i) => Value::Int((*i).into()),
        AmqpValue::LongLongInt(i) => Value::Int(*i),
        AmqpValue::Float(f) => Value::F32(*f),
        AmqpValue::Double(f) => Value::F64(*f),
        AmqpValue::DecimalValue(d) => Value::Decimal {
            scale: d.scale,
            value: d.value,
        },
        AmqpValue::LongString(s) => Value::Str(s),
        AmqpValue::FieldArray(items) => Value::Array(items.iter().map(context_value).collect()),
        AmqpValue::Timestamp(t) => Value::Timestamp(*t),
        AmqpValue::FieldTable(table) => Value::Table(fields(table)),
        AmqpValue::ByteArray(bytes) => Value::Bytes(bytes),
        AmqpValue::Void => Value::Void,
    }
}

/// What [`Subscription::next`] returns.
// Almost every value is a delivery, so boxing it to shrink the rare variants would cost more.
#[allow(clippy::large_enum_variant)]
pub enum Next<C> {
    Delivery(Delivery),
    /// The stop signal fired before a delivery arrived.
    Stop,
    /// A command arrived before a delivery.
    Command(C),
    /// The consumer ended: its channel or connection was closed, or the broker cancelled it.
    Ended(AmqpError),
}

/// A consumer on a [`Session`]'s channel. Deliveries are settled on that same channel, with
/// [`Session::ack`] and [`Session::requeue`], as AMQP requires.
pub struct Subscription<'a> {
    session: &'a Session,
    consumer: amiquip::Consumer<'a>,
}

impl Subscription<'_> {
    /// Waits for the next delivery, for a command, or for `stop` to become ready or
    /// disconnected; a `commands` channel that disconnects counts as a stop. A stop that has
    /// already fired wins over a command, and a command over a delivery ready at the same moment.
    pub fn next<T, C>(&self, stop: &Receiver<T>, commands: &Receiver<C>) -> Next<C> {
        select_biased! {
            recv(stop) -> _ => Next::Stop,
            recv(commands) -> command => match command {
                Ok(command) => Next::Command(command),
                Err(_) => Next::Stop,
            },
            recv(self.consumer.receiver()) -> message => self.classify(message.ok()),
        }
    }

    /// Cancels the consumer and returns every delivery that arrived before the cancel took
    /// effect, so that the caller can return them unprocessed.
    pub fn cancel(&self) -> Result<Vec<Delivery>, AmqpError> {
        self.consumer
            .cancel()
            .map_err(|e| lost(&self.session.url, e))?;
        let mut stragglers = Vec::new();
        for message in self.consumer.receiver().iter() {
            match message {
                ConsumerMessage::Delivery(delivery) => stragglers.push(Delivery(delivery)),
                ConsumerMessage::ClientCancelled => break,
                other => match self.classify(Some(other)) {
                    Next::<()>::Ended(err) => return Err(err),
                    _ => break,
                },
            }
        }
        Ok(stragglers)
    }

    fn classify<C>(&self, message: Option<ConsumerMessage>) -> Next<C> {
        let url = &self.session.url;
        let ended = |reason: &str| {
            Next::Ended(AmqpError::Lost {
                address: url.address(),
                reason: reason.to_string(),
            })
        };
        match message {
            Some(ConsumerMessage::Delivery(delivery)) => Next::Delivery(Delivery(delivery)),
            Some(ConsumerMessage::ServerClosedChannel(e))
            | Some(ConsumerMessage::ServerClosedConnection(e)) => Next::Ended(lost(url, e)),
            Some(ConsumerMessage::ServerCancelled) => {
                ended("the broker cancelled the consumer (was the queue deleted?)")
            }
            Some(ConsumerMessage::ClientCancelled) => ended("the consumer was cancelled"),
            Some(ConsumerMessage::ClientClosedChannel)
            | Some(ConsumerMessage::ClientClosedConnection)
            | None => ended("the connection was closed"),
        }
    }
}

/// What the broker said about published messages.
#[derive(Debug, PartialEq, Eq)]
pub enum PublishEvent {
    /// The broker took responsibility for the messages with tags up to `tag` (if `multiple`), or
    /// for `tag` alone.
    Ack {
        tag: u64,
        multiple: bool,
    },
    /// The broker could not take the messages; they were not stored.
    Nack {
        tag: u64,
        multiple: bool,
    },
    /// A `mandatory` message could not be routed to any queue. The broker still acks it.
    Returned {
        message_id: Option<String>,
        reason: String,
    },
    /// The broker stopped reading from the connection (a memory or disk alarm): confirms will
    /// wait until it is unblocked.
    Blocked {
        reason: String,
    },
    Unblocked,
}

/// What became of one message published with [`Publisher::republish_and_wait`].
#[derive(Debug, PartialEq, Eq)]
pub enum Confirmed {
    Stored,
    /// Nacked by the broker.
    NotStored(String),
    /// Returned as unroutable: no queue took it.
    Returned(String),
    /// No answer within the timeout (time spent blocked by an alarm does not count), or the
    /// caller gave up waiting.
    TimedOut,
}

/// A channel in confirm mode. Tags count from 1 in publish order, as the broker counts them.
pub struct Publisher<'a> {
    session: &'a Session,
    confirms: Receiver<Confirm>,
    returns: Receiver<amiquip::Return>,
    next_tag: u64,
}

impl Publisher<'_> {
    /// Publishes one persistent, `mandatory` message to `exchange` ("" for the default exchange,
    /// where the routing key is a queue's name) and returns its confirm tag.
    pub fn publish(
        &mut self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        message_id: &str,
        stamp: &Stamp,
    ) -> Result<u64, AmqpError> {
        let mut properties = AmqpProperties::default()
            .with_delivery_mode(2)
            .with_content_type("text/plain".to_string())
            .with_message_id(message_id.to_string())
            .with_timestamp(
                (std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH))
                    .map_or(0, |since| since.as_secs()),
            );
        if let Some(id) = &stamp.correlation_id {
            properties = properties.with_correlation_id(id.clone());
        }
        if !stamp.headers.is_empty() {
            let mut table = FieldTable::new();
            for (name, value) in &stamp.headers {
                table.insert(name.clone(), AmqpValue::LongString(value.clone()));
            }
            properties = properties.with_headers(table);
        }
        self.send(exchange, routing_key, body, properties)
    }

    /// Publishes a copy of `delivery` to `queue`: the same body and properties (persistent even
    /// if the original was not), with `headers` added or replaced, and waits for the broker's
    /// confirm.
    /// If `give_up` fires (ready or disconnected) first, it stops waiting and returns
    /// [`Confirmed::TimedOut`].
    ///
    /// `drop_headers` are left out of the copy (such as the broker's count of deliveries of the
    /// original). So are the `expiration` property, which could make the copy vanish from a
    /// queue without a dead-letter exchange, and `user_id`, which the broker refuses unless it
    /// names warren's own user.
    pub fn republish_and_wait<T>(
        &mut self,
        delivery: &Delivery,
        queue: &str,
        headers: Vec<(String, Header)>,
        drop_headers: &[&str],
        timeout: Duration,
        give_up: &Receiver<T>,
    ) -> Result<Confirmed, AmqpError> {
        let original = &delivery.0.properties;
        let mut table = original.headers().clone().unwrap_or_default();
        for name in drop_headers {
            table.remove(*name);
        }
        let properties = copy_properties(original).with_headers(add_headers(table, headers));
        let tag = self.send("", queue, &delivery.0.body, properties)?;
        self.wait_for(tag, timeout, give_up)
    }

    /// Publishes `body` as the reply to a request: through the default exchange to `reply_to`
    /// (a queue, or RabbitMQ's direct reply-to), persistent, with `correlation_id`, and waits
    /// for the broker's confirm as [`Publisher::republish_and_wait`] does.
    pub fn reply_and_wait<T>(
        &mut self,
        reply_to: &str,
        correlation_id: Option<&str>,
        body: &[u8],
        timeout: Duration,
        give_up: &Receiver<T>,
    ) -> Result<Confirmed, AmqpError> {
        let mut properties = AmqpProperties::default().with_delivery_mode(2);
        if let Some(id) = correlation_id {
            properties = properties.with_correlation_id(id.to_string());
        }
        let tag = self.send("", reply_to, body, properties)?;
        self.wait_for(tag, timeout, give_up)
    }

    /// Waits for the confirm of `tag`, the only message outstanding.
    fn wait_for<T>(
        &self,
        tag: u64,
        timeout: Duration,
        give_up: &Receiver<T>,
    ) -> Result<Confirmed, AmqpError> {
        let mut deadline = std::time::Instant::now() + timeout;
        let mut returned = None;
        let mut blocked = false;
        loop {
            if !matches!(give_up.try_recv(), Err(TryRecvError::Empty)) {
                return Ok(Confirmed::TimedOut);
            }
            // Wake up now and then to look at `give_up`; a confirm ends the wait at once.
            let left = deadline
                .saturating_duration_since(std::time::Instant::now())
                .min(Duration::from_millis(250));
            match self.next_event(left)? {
                Some(PublishEvent::Ack { tag: t, multiple })
                    if t == tag || (multiple && t > tag) =>
                {
                    return Ok(match returned {
                        Some(reason) => Confirmed::Returned(reason),
                        None => Confirmed::Stored,
                    })
                }
                Some(PublishEvent::Nack { tag: t, multiple })
                    if t == tag || (multiple && t > tag) =>
                {
                    return Ok(Confirmed::NotStored("nacked by the broker".into()))
                }
                Some(PublishEvent::Returned { reason, .. }) => {
                    returned = Some(format!("returned as unroutable: {reason}"))
                }
                Some(PublishEvent::Blocked { .. }) => blocked = true,
                Some(PublishEvent::Unblocked) => {
                    blocked = false;
                    deadline = std::time::Instant::now() + timeout;
                }
                Some(_) => {}
                None if blocked => deadline = std::time::Instant::now() + timeout,
                None if std::time::Instant::now() >= deadline => return Ok(Confirmed::TimedOut),
                None => {}
            }
        }
    }

    fn send(
        &mut self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: AmqpProperties,
    ) -> Result<u64, AmqpError> {
        let mut publish = Publish::with_properties(body, routing_key, properties);
        publish.mandatory = true;
        self.session
            .channel
            .basic_publish(exchange, publish)
            .map_err(|e| lost(&self.session.url, e))?;
        let tag = self.next_tag;
        self.next_tag += 1;
        Ok(tag)
    }

    /// Waits up to `timeout` for the next confirm, return or alarm. Returns come first: the
    /// broker sends a message's return before its ack, and amiquip passes them on in that order
    /// but on two channels, so a plain `select!`, which picks at random among ready channels,
    /// could hand out the ack first and report an unroutable message as stored.
    pub fn next_event(&self, timeout: Duration) -> Result<Option<PublishEvent>, AmqpError> {
        select_biased! {
            recv(self.returns) -> returned => match returned {
                Ok(returned) => Ok(Some(returned_event(returned))),
                Err(_) => Err(self.closed()),
            },
            recv(self.confirms) -> confirm => match confirm {
                Ok(Confirm::Ack(p)) => Ok(Some(PublishEvent::Ack { tag: p.delivery_tag, multiple: p.multiple })),
                Ok(Confirm::Nack(p)) => Ok(Some(PublishEvent::Nack { tag: p.delivery_tag, multiple: p.multiple })),
                Err(_) => Err(self.closed()),
            },
            recv(self.session.blocked) -> notification => match notification {
                Ok(notification) => Ok(Some(self.blocked_event(notification))),
                Err(_) => Err(self.closed()),
            },
            default(timeout) => Ok(None),
        }
    }

    /// The event for a connection.blocked or .unblocked notification, logged here once for every
    /// kind of publisher.
    fn blocked_event(&self, notification: ConnectionBlockedNotification) -> PublishEvent {
        let address = self.session.address();
        match notification {
            ConnectionBlockedNotification::Blocked(reason) => {
                log::warn!("the broker at {address} blocked publishing ({reason}): waiting until it lifts the alarm");
                PublishEvent::Blocked { reason }
            }
            ConnectionBlockedNotification::Unblocked => {
                log::info!("the broker at {address} unblocked publishing");
                PublishEvent::Unblocked
            }
        }
    }

    fn closed(&self) -> AmqpError {
        AmqpError::Lost {
            address: self.session.url.address(),
            reason: "the channel closed while confirms were outstanding".into(),
        }
    }
}

/// The properties of a copy of a message: those of the original, persistent, without
/// `expiration`, `user_id` and `headers` (which the caller sets).
fn copy_properties(original: &AmqpProperties) -> AmqpProperties {
    let mut copy = AmqpProperties::default().with_delivery_mode(2);
    if let Some(v) = original.content_type() {
        copy = copy.with_content_type(v.clone());
    }
    if let Some(v) = original.content_encoding() {
        copy = copy.with_content_encoding(v.clone());
    }
    if let Some(v) = original.priority() {
        copy = copy.with_priority(*v);
    }
    if let Some(v) = original.correlation_id() {
        copy = copy.with_correlation_id(v.clone());
    }
    if let Some(v) = original.reply_to() {
        copy = copy.with_reply_to(v.clone());
    }
    if let Some(v) = original.message_id() {
        copy = copy.with_message_id(v.clone());
    }
    if let Some(v) = original.timestamp() {
        copy = copy.with_timestamp(*v);
    }
    if let Some(v) = original.type_() {
        copy = copy.with_type_(v.clone());
    }
    if let Some(v) = original.app_id() {
        copy = copy.with_app_id(v.clone());
    }
    if let Some(v) = original.cluster_id() {
        copy = copy.with_cluster_id(v.clone());
    }
    copy
}

/// `table` with `headers` added or replaced.
fn add_headers(mut table: FieldTable, headers: Vec<(String, Header)>) -> FieldTable {
    for (key, value) in headers {
        let value = match value {
            Header::Int(i) => AmqpValue::LongLongInt(i),
            Header::Str(s) | Header::Other(s) => AmqpValue::LongString(s),
        };
        table.insert(key, value);
    }
    table
}

fn returned_event(returned: amiquip::Return) -> PublishEvent {
    PublishEvent::Returned {
        message_id: returned.properties.message_id().clone(),
        reason: format!("{} (code {})", returned.reply_text, returned.reply_code),
    }
}

/// What a passive declare says about a queue that exists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueState {
    /// Messages ready for delivery; messages delivered and not yet acked are not counted.
    pub ready: u32,
    pub consumers: u32,
}

/// For the operator's commands (`warren check-config --connect`, `warren stats`,
/// `warren dead-letters`): looking at queues without creating them, and taking messages that stay
/// in their queue until they are acked.
impl Session {
    /// The state of `queue` by a passive declare, or `None` if there is no such queue; the queue
    /// is never created. The declare goes on a channel of its own, because the broker closes the
    /// channel of a passive declare that names a missing queue: the session's own channel, and
    /// anything held on it, stays open.
    pub fn inspect(&mut self, queue: &str) -> Result<Option<QueueState>, AmqpError> {
        self.passive(
            &format!("a passive declare of queue {queue:?}"),
            |channel| {
                let declared = channel.queue_declare_passive(queue)?;
                Ok(QueueState {
                    ready: declared.declared_message_count().unwrap_or(0),
                    consumers: declared.declared_consumer_count().unwrap_or(0),
                })
            },
        )
    }

    /// Takes the next message of `queue` without acking it (`basic.get` with `no_ack = false`),
    /// or `None` if the queue has no ready message. The broker keeps the message, unacked, for
    /// this session's channel until the [`Held`] is acked or requeued, or the channel closes
    /// (which requeues it): nothing taken this way is lost if the caller dies.
    pub fn hold(&self, queue: &str) -> Result<Option<Held<'_>>, AmqpError> {
        Ok(self.take(queue)?.map(|delivery| Held {
            session: self,
            delivery,
        }))
    }

    /// Deletes every ready message of `queue` and returns how many it deleted. Messages that a
    /// consumer or a [`Held`] has not acked yet are not deleted.
    pub fn purge(&self, queue: &str) -> Result<u32, AmqpError> {
        self.channel
            .queue_purge(queue)
            .map_err(|e| self.channel_error(e, format!("purging queue {queue:?}")))
    }
}

/// A message taken with [`Session::hold`]: unacked until [`Held::ack`] removes it from its queue
/// or [`Held::requeue`] puts it back, on the channel that delivered it. Dropped without either,
/// it stays unacked until the session closes, and the broker then requeues it.
pub struct Held<'a> {
    session: &'a Session,
    delivery: Delivery,
}

impl Held<'_> {
    pub fn delivery(&self) -> &Delivery {
        &self.delivery
    }

    /// Removes the message from its queue for good.
    pub fn ack(self) -> Result<(), AmqpError> {
        self.session.ack(self.delivery)
    }

    /// Puts the message back in its queue.
    pub fn requeue(self) -> Result<(), AmqpError> {
        self.session.requeue(self.delivery)
    }
}

#[cfg(test)]
mod tests {
    use super::{describe_inequivalent, lost, AmqpError};
    use crate::config::BrokerUrl;
    use std::time::Duration;

    #[test]
    fn a_channel_closed_for_an_ack_timeout_names_the_broker_consumer_timeout() {
        let url = BrokerUrl::parse("amqp://guest:pw@127.0.0.1:5681/%2f").unwrap();
        let closed = |message: &str| {
            lost(
                &url,
                amiquip::Error::ServerClosedChannel {
                    channel_id: 1,
                    code: 406,
                    message: message.into(),
                },
            )
        };
        let err = closed("PRECONDITION_FAILED - delivery acknowledgement on channel 1 timed out. Timeout value used: 3000 ms. This timeout value can be configured, see consumers doc guide to learn more");
        assert!(
            matches!(err, AmqpError::AckTimeout { timeout, .. } if timeout == Duration::from_secs(3)),
            "{err:?}"
        );
        assert_eq!(
            err.to_string(),
            "the broker at 127.0.0.1:5681 closed the channel: a task outlived its consumer_timeout (3s)"
        );
        let other = closed("PRECONDITION_FAILED - unknown delivery tag 7");
        assert!(matches!(other, AmqpError::Lost { .. }), "{other:?}");
    }

    #[test]
    fn a_disabled_feature_flag_says_how_to_enable_it() {
        let url = BrokerUrl::parse("amqp://guest:pw@127.0.0.1:5681/%2f").unwrap();
        let err = lost(
            &url,
            amiquip::Error::ServerClosedConnection {
                code: 541,
                message: "INTERNAL_ERROR - Cannot declare a queue 'queue 'q' in vhost '/'' of \
                          type 'rabbit_quorum_queue' on node 'n@h': the corresponding feature \
                          flag is disabled"
                    .into(),
            },
        );
        let AmqpError::Lost { address, reason } = err else {
            panic!("a server-closed connection is a lost one: {err:?}");
        };
        assert_eq!(address, "127.0.0.1:5681");
        assert!(
            reason.contains("the corresponding feature flag is disabled"),
            "{reason}"
        );
        assert!(
            reason.contains("rabbitmqctl enable_feature_flag all"),
            "{reason}"
        );
    }

    #[test]
    fn a_declare_mismatch_names_the_argument_what_exists_and_what_is_wanted() {
        let said = |m: &str| {
            describe_inequivalent(m)
                .split(';')
                .next()
                .unwrap()
                .to_string()
        };
        assert_eq!(
            said("PRECONDITION_FAILED - inequivalent arg 'durable' for queue 'q' in vhost '/': received 'false' but current is 'true'"),
            "it exists with durable = true, but the config wants durable = false"
        );
        assert_eq!(
            said("PRECONDITION_FAILED - inequivalent arg 'x-queue-type' for queue 'q' in vhost '/': received the value 'quorum' of type 'longstr' but current is none"),
            "it exists with x-queue-type = (not set), but the config wants x-queue-type = quorum"
        );
        assert_eq!(
            said("PRECONDITION_FAILED - inequivalent arg 'x-dead-letter-exchange' for queue 'q' in vhost '/': received the value '' of type 'longstr' but current is none"),
            "it exists with x-dead-letter-exchange = (not set), but the config wants x-dead-letter-exchange = \"\""
        );
        assert_eq!(describe_inequivalent("something else"), "something else");
    }
}
