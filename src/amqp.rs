//! Everything warren says to RabbitMQ. This is the only module that imports amiquip; the rest of
//! warren sees [`Session`], [`Subscription`], [`Delivery`] and [`Publisher`], and errors as an
//! [`AmqpError`] whose variants tell a caller whether to retry or give up.
//!
//! warren opens each TCP connection itself, with the configured connect timeout and with
//! `TCP_NODELAY` set, and hands the stream to amiquip: amiquip's own URL connect has no timeout
//! and leaves Nagle's algorithm on, which delays small ack frames. Every error text that leaves
//! this module has the broker password masked, because amiquip's errors print whole URLs.

use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

use amiquip::{
    AmqpProperties, Auth, Channel, Confirm, Connection, ConnectionOptions, ConnectionTuning,
    ConsumerMessage, ConsumerOptions, Publish, QueueDeclareOptions, QueueDeleteOptions,
};
use crossbeam_channel::{select, Receiver, TryRecvError};

use crate::config::{Broker, BrokerUrl};

/// The AMQP reply codes that warren branches on.
const CONNECTION_FORCED: u16 = 320;
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
    Refused { address: String, reason: String },
    /// The broker refused an operation on an open channel, such as a queue declare whose
    /// arguments differ from the existing queue's. Retrying will not help.
    #[error("the broker rejected {what}: {reason}")]
    Rejected { what: String, reason: String },
    /// An open connection or channel was lost (closed by the broker or an operator, or a dead
    /// network caught by heartbeats). Reconnect; unacked messages have been requeued.
    #[error("lost the connection to {address}: {reason}")]
    Lost { address: String, reason: String },
}

impl AmqpError {
    /// True when retrying cannot help and the operator must change something.
    pub fn is_fatal(&self) -> bool {
        matches!(self, AmqpError::Refused { .. } | AmqpError::Rejected { .. })
    }
}

/// One connection with one channel: what each worker owns, and what `warren publish` uses.
pub struct Session {
    url: BrokerUrl,
    // Field order matters: the channel must close before its connection.
    channel: Channel,
    connection: Connection,
}

impl Session {
    /// Connects to the broker and opens a channel. `name` is sent as the client property
    /// `information`, shown by `rabbitmqctl list_connections client_properties` and the
    /// management UI.
    pub fn open(broker: &Broker, name: &str) -> Result<Session, AmqpError> {
        let url = &broker.url;
        let unreachable = |reason: String| AmqpError::Unreachable {
            address: url.address(),
            reason: url.redact(&reason),
        };
        let stream = connect_tcp(url, broker.connect_timeout).map_err(unreachable)?;
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
        let mut connection =
            Connection::insecure_open_stream(stream, options, ConnectionTuning::default())
                .map_err(|e| match e {
                    amiquip::Error::InvalidCredentials => AmqpError::Refused {
                        address: url.address(),
                        reason: format!("invalid credentials for user {:?}", url.username()),
                    },
                    amiquip::Error::ServerClosedConnection {
                        code: NOT_ALLOWED,
                        message,
                    } => AmqpError::Refused {
                        address: url.address(),
                        reason: format!(
                            "user {:?} may not use vhost {:?} ({})",
                            url.username(),
                            url.vhost(),
                            url.redact(&message)
                        ),
                    },
                    other => unreachable(other.to_string()),
                })?;
        let channel = connection.open_channel(None).map_err(|e| lost(url, e))?;
        Ok(Session {
            url: url.clone(),
            channel,
            connection,
        })
    }

    /// Declares `queue` as warren declares it everywhere (durable unless configured otherwise).
    pub fn declare(&self, queue: &crate::config::Queue) -> Result<(), AmqpError> {
        let options = QueueDeclareOptions {
            durable: queue.durable,
            ..QueueDeclareOptions::default()
        };
        self.channel
            .queue_declare(queue.name.as_str(), options)
            .map(drop)
            .map_err(|e| self.channel_error(e, format!("the declare of queue {:?}", queue.name)))
    }

    /// Sets the prefetch limit and starts consuming `queue` with manual acks.
    pub fn subscribe(&self, queue: &str, prefetch: u16) -> Result<Subscription<'_>, AmqpError> {
        self.channel
            .qos(0, prefetch, false)
            .map_err(|e| self.channel_error(e, "basic.qos".into()))?;
        let consumer = self
            .channel
            .basic_consume(queue, ConsumerOptions::default())
            .map_err(|e| self.channel_error(e, format!("consuming queue {queue:?}")))?;
        Ok(Subscription {
            session: self,
            consumer,
        })
    }

    /// Enables publisher confirms and returns of unroutable messages.
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
        } = self;
        let channel_result = channel.close();
        connection.close().map_err(|e| lost(&url, e))?;
        channel_result.map_err(|e| lost(&url, e))
    }

    fn channel_error(&self, err: amiquip::Error, what: String) -> AmqpError {
        match err {
            amiquip::Error::ServerClosedChannel { code, message, .. } => AmqpError::Rejected {
                what,
                reason: format!("{} (code {code})", self.url.redact(&message)),
            },
            other => lost(&self.url, other),
        }
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

fn lost(url: &BrokerUrl, err: amiquip::Error) -> AmqpError {
    let reason = match err {
        amiquip::Error::ServerClosedConnection {
            code: CONNECTION_FORCED,
            message,
        } => format!(
            "closed by the broker or an operator ({})",
            url.redact(&message)
        ),
        amiquip::Error::MissedServerHeartbeats => "missed heartbeats from the broker".into(),
        other => url.redact(&other.to_string()),
    };
    AmqpError::Lost {
        address: url.address(),
        reason,
    }
}

/// A message delivered to a [`Subscription`]. It must be acked or nacked on that subscription.
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
}

/// What [`Subscription::next`] returns.
// Almost every value is a delivery, so boxing it to shrink the rare variants would cost more.
#[allow(clippy::large_enum_variant)]
pub enum Next {
    Delivery(Delivery),
    /// The stop signal fired before a delivery arrived.
    Stop,
    /// The consumer ended: its channel or connection was closed, or the broker cancelled it.
    Ended(AmqpError),
}

/// A consumer on a [`Session`]'s channel. Acks and nacks go to that same channel, as AMQP
/// requires.
pub struct Subscription<'a> {
    session: &'a Session,
    consumer: amiquip::Consumer<'a>,
}

impl Subscription<'_> {
    /// Waits for the next delivery, or for `stop` to become ready or disconnected.
    /// A stop that has already fired wins over a delivery that is ready at the same moment.
    pub fn next<T>(&self, stop: &Receiver<T>) -> Next {
        if !matches!(stop.try_recv(), Err(TryRecvError::Empty)) {
            return Next::Stop;
        }
        select! {
            recv(stop) -> _ => Next::Stop,
            recv(self.consumer.receiver()) -> message => self.classify(message.ok()),
        }
    }

    /// Positively acknowledges a delivery: the broker forgets the message.
    pub fn ack(&self, delivery: Delivery) -> Result<(), AmqpError> {
        delivery
            .0
            .ack(&self.session.channel)
            .map_err(|e| lost(&self.session.url, e))
    }

    /// Returns a delivery to the queue, to be delivered again.
    pub fn requeue(&self, delivery: Delivery) -> Result<(), AmqpError> {
        delivery
            .0
            .nack(&self.session.channel, true)
            .map_err(|e| lost(&self.session.url, e))
    }

    /// Cancels the consumer and returns every delivery that arrived before the cancel took
    /// effect, so that the caller can requeue them unprocessed.
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
                    Next::Ended(err) => return Err(err),
                    _ => break,
                },
            }
        }
        Ok(stragglers)
    }

    fn classify(&self, message: Option<ConsumerMessage>) -> Next {
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
    Ack { tag: u64, multiple: bool },
    /// The broker could not take the messages; they were not stored.
    Nack { tag: u64, multiple: bool },
    /// A `mandatory` message could not be routed to any queue. The broker still acks it.
    Returned {
        message_id: Option<String>,
        reason: String,
    },
}

/// A channel in confirm mode. Tags count from 1 in publish order, as the broker counts them.
pub struct Publisher<'a> {
    session: &'a Session,
    confirms: Receiver<Confirm>,
    returns: Receiver<amiquip::Return>,
    next_tag: u64,
}

impl Publisher<'_> {
    /// Publishes one persistent, `mandatory` message to `queue` through the default exchange and
    /// returns its confirm tag.
    pub fn publish(
        &mut self,
        queue: &str,
        body: &[u8],
        message_id: &str,
    ) -> Result<u64, AmqpError> {
        let properties = AmqpProperties::default()
            .with_delivery_mode(2)
            .with_content_type("text/plain".to_string())
            .with_message_id(message_id.to_string());
        let mut publish = Publish::with_properties(body, queue, properties);
        publish.mandatory = true;
        self.session
            .channel
            .basic_publish("", publish)
            .map_err(|e| lost(&self.session.url, e))?;
        let tag = self.next_tag;
        self.next_tag += 1;
        Ok(tag)
    }

    /// Waits up to `timeout` for the next confirm or return. Returns come first: the broker sends
    /// a message's return before its ack.
    pub fn next_event(&self, timeout: Duration) -> Result<Option<PublishEvent>, AmqpError> {
        if let Ok(returned) = self.returns.try_recv() {
            return Ok(Some(returned_event(returned)));
        }
        select! {
            recv(self.returns) -> returned => match returned {
                Ok(returned) => Ok(Some(returned_event(returned))),
                Err(_) => Err(self.closed()),
            },
            recv(self.confirms) -> confirm => match confirm {
                Ok(Confirm::Ack(p)) => Ok(Some(PublishEvent::Ack { tag: p.delivery_tag, multiple: p.multiple })),
                Ok(Confirm::Nack(p)) => Ok(Some(PublishEvent::Nack { tag: p.delivery_tag, multiple: p.multiple })),
                Err(_) => Err(self.closed()),
            },
            default(timeout) => Ok(None),
        }
    }

    fn closed(&self) -> AmqpError {
        AmqpError::Lost {
            address: self.session.url.address(),
            reason: "the channel closed while confirms were outstanding".into(),
        }
    }
}

fn returned_event(returned: amiquip::Return) -> PublishEvent {
    PublishEvent::Returned {
        message_id: returned.properties.message_id().clone(),
        reason: format!("{} (code {})", returned.reply_text, returned.reply_code),
    }
}
