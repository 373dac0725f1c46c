//! The manager's side of the bus, as `rampart send` and the tests use it: declare the
//! topology, publish a command, wait for its ack.

use std::collections::HashMap;
use std::time::Duration;

use base64::Engine;
use ed25519_dalek::Signer;
use futures_util::StreamExt;
use lapin::options::{BasicConsumeOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, Consumer};
use serde_json::{Value, json};

use crate::broker::{self, BrokerError, Connector, Session, amqp};
use crate::config::{AuthMechanism, Config};
use crate::ids::now_ms;
use crate::protocol::Ack;

/// Every way the manager's side fails.
#[derive(Debug, thiserror::Error)]
pub enum ManagerError {
    /// A broker operation failed.
    #[error(transparent)]
    Broker(#[from] BrokerError),
    /// The manager's TLS identity is unusable.
    #[error(transparent)]
    Tls(#[from] crate::certs::tls::TlsError),
    /// The signing key could not be read.
    #[error("signing key {path}: {message}")]
    SigningKey {
        /// The key file.
        path: String,
        /// Why it is unusable.
        message: String,
    },
    /// No configured broker accepted a session.
    #[error("no broker could be reached: {0}")]
    Unreachable(String),
    /// No ack came in time.
    #[error("no ack for command {id} within {secs} s (is the agent running and connected?)")]
    Timeout {
        /// The command waited for.
        id: String,
        /// How long it was waited for.
        secs: u64,
    },
    /// The acks' consumer ended.
    #[error("the ack stream closed before the ack for {0} arrived")]
    AckStreamClosed(String),
    /// An ack did not parse.
    #[error("an ack that is not valid JSON arrived: {0}")]
    BadAck(serde_json::Error),
}

/// One command as it goes on the wire; every field can be set freely so that tests can
/// send malformed input too.
#[derive(Debug, Clone, Default)]
pub struct Outgoing {
    /// The body, as sent (it need not be JSON).
    pub body: Vec<u8>,
    /// The AMQP `message_id` (the command id).
    pub message_id: Option<String>,
    /// The AMQP `type` (the command type).
    pub kind: Option<String>,
    /// Sets the AMQP `user_id` to the manager's own user (the broker checks it).
    pub with_user_id: bool,
    /// Overrides the signature header; `None` signs with the configured key, if any.
    pub signature: Option<String>,
}

/// The standard envelope of PROTOCOL.md section 3.
pub fn command_body(id: &str, kind: &str, source: &str, host: &str, data: &Value) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "specversion": "1.0",
        "id": id,
        "type": kind,
        "source": source,
        "host": host,
        "timestamp": now_ms(),
        "data": data,
    }))
    .expect("a JSON value serialises")
}

/// A server-named queue that lives as long as this connection.
async fn private_queue(ch: &Channel, context: &'static str) -> Result<lapin::Queue, BrokerError> {
    ch.queue_declare(
        "".into(),
        QueueDeclareOptions {
            exclusive: true,
            auto_delete: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .map_err(amqp(context))
}

/// Consumes `queue` with automatic acks (what the manager reads is informational).
async fn consume_no_ack(
    ch: &Channel,
    queue: &str,
    context: &'static str,
) -> Result<Consumer, BrokerError> {
    ch.basic_consume(
        queue.into(),
        "".into(),
        BasicConsumeOptions {
            no_ack: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .map_err(amqp(context))
}

/// A manager's session on the bus: sends commands to hosts, waits for their acks.
pub struct Manager {
    session: Session,
    channel: Channel,
    acks: Option<Consumer>,
    ack_queue: String,
    seen: HashMap<String, Ack>,
    user: String,
    name: String,
    signing_key: Option<ed25519_dalek::SigningKey>,
    config: Config,
}

impl Manager {
    /// Connects once to the first broker that answers.
    /// Connects and makes sure the shared topology exists (declaring what is missing).
    pub async fn connect(config: &Config) -> Result<Manager, ManagerError> {
        Manager::connect_with(config, true).await
    }

    /// Connects without checking or declaring the shared topology.
    pub async fn connect_without_topology(config: &Config) -> Result<Manager, ManagerError> {
        Manager::connect_with(config, false).await
    }

    async fn connect_with(config: &Config, declare: bool) -> Result<Manager, ManagerError> {
        let b = &config.broker;
        let (identity, tls) = crate::certs::tls::from_config(b)?;
        let user = match b.auth {
            AuthMechanism::External => identity.info.common_name.clone().unwrap_or_default(),
            AuthMechanism::Plain => b.username.clone().unwrap_or_default(),
        };
        let name = config.manager.name.clone().unwrap_or_else(|| user.clone());
        let signing_key = match &config.manager.signing_key {
            None => None,
            Some(path) => {
                use ed25519_dalek::pkcs8::DecodePrivateKey;
                let err = |message: String| ManagerError::SigningKey {
                    path: path.display().to_string(),
                    message,
                };
                let pem = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
                Some(
                    ed25519_dalek::SigningKey::from_pkcs8_pem(&pem)
                        .map_err(|e| err(e.to_string()))?,
                )
            }
        };
        let connector = Connector::new(b, tls, format!("rampart-manager/{name}"))?;
        let session = connector
            .connect_first()
            .await
            .map_err(ManagerError::Unreachable)?;
        if declare {
            broker::ensure_shared_topology(&session.connection).await?;
        }
        let channel = broker::confirm_channel(&session.connection).await?;
        let q = private_queue(&channel, "declaring the ack queue").await?;
        Ok(Manager {
            session,
            channel,
            acks: None,
            ack_queue: q.name().as_str().to_string(),
            seen: HashMap::new(),
            user,
            name,
            signing_key,
            config: config.clone(),
        })
    }

    /// The broker user this manager sends as.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Makes sure `host`'s queue exists (so commands wait for an agent that is down) and
    /// that its acks reach us.
    pub async fn watch_host(&mut self, host: &str) -> Result<(), ManagerError> {
        broker::declare_host_queue(&self.channel, host, &self.config.broker).await?;
        self.channel
            .queue_bind(
                self.ack_queue.as_str().into(),
                broker::ACKS_EXCHANGE.into(),
                host.into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(amqp("binding the ack queue"))?;
        if self.acks.is_none() {
            let consumer = consume_no_ack(&self.channel, &self.ack_queue, "consuming acks").await?;
            self.acks = Some(consumer);
        }
        Ok(())
    }

    /// Publishes a standard command and returns its id.
    pub async fn send(
        &self,
        host: &str,
        kind: &str,
        id: &str,
        data: &Value,
    ) -> Result<(), ManagerError> {
        let body = command_body(id, kind, &self.name, host, data);
        self.publish(
            host,
            Outgoing {
                body,
                message_id: Some(id.to_string()),
                kind: Some(kind.to_string()),
                with_user_id: true,
                signature: None,
            },
        )
        .await
    }

    /// Publishes raw bytes with the given properties to `host`'s routing key.
    pub async fn publish(&self, host: &str, out: Outgoing) -> Result<(), ManagerError> {
        let mut props = broker::json_properties();
        if let Some(id) = &out.message_id {
            props = props
                .with_message_id(id.as_str().into())
                .with_correlation_id(id.as_str().into());
        }
        if let Some(kind) = &out.kind {
            props = props.with_type(kind.as_str().into());
        }
        if out.with_user_id {
            props = props.with_user_id(self.user.as_str().into());
        }
        let signature = out.signature.clone().or_else(|| {
            self.signing_key.as_ref().map(|k| {
                base64::engine::general_purpose::STANDARD.encode(k.sign(&out.body).to_bytes())
            })
        });
        if let Some(sig) = signature {
            let mut headers = FieldTable::default();
            headers.insert(
                "x-rampart-signature".into(),
                AMQPValue::LongString(sig.as_str().into()),
            );
            props = props.with_headers(headers);
        }
        broker::publish_confirmed(
            &self.channel,
            broker::COMMANDS_EXCHANGE,
            host,
            &out.body,
            props,
            true,
        )
        .await?;
        Ok(())
    }

    /// Waits for the next ack correlated with `id` (acks for other ids are kept for later);
    /// `""` waits for an ack without correlation id (a body that was not even JSON).
    pub async fn wait_ack(&mut self, id: &str, timeout: Duration) -> Result<Ack, ManagerError> {
        if let Some(ack) = self.seen.remove(id) {
            return Ok(ack);
        }
        let consumer = self
            .acks
            .as_mut()
            .expect("watch_host must be called before wait_ack");
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let next = tokio::time::timeout_at(deadline, consumer.next())
                .await
                .map_err(|_| ManagerError::Timeout {
                    id: id.to_string(),
                    secs: timeout.as_secs(),
                })?;
            let delivery = match next {
                Some(Ok(d)) => d,
                _ => return Err(ManagerError::AckStreamClosed(id.to_string())),
            };
            let ack: Ack = serde_json::from_slice(&delivery.data).map_err(ManagerError::BadAck)?;
            let correlation = ack.correlation_id.clone().unwrap_or_default();
            if correlation == id {
                return Ok(ack);
            }
            self.seen.insert(correlation, ack);
        }
    }

    /// A queue of our own bound to `exchange` with `routing_key`, consumed without acks:
    /// for watching events or dead letters.
    pub async fn subscribe(
        &self,
        exchange: &str,
        routing_key: &str,
    ) -> Result<Consumer, ManagerError> {
        let ch = self
            .session
            .connection
            .create_channel()
            .await
            .map_err(amqp("opening a channel"))?;
        let q = private_queue(&ch, "declaring a subscription queue").await?;
        ch.queue_bind(
            q.name().clone(),
            exchange.into(),
            routing_key.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(amqp("binding a subscription queue"))?;
        Ok(consume_no_ack(&ch, q.name().as_str(), "consuming a subscription queue").await?)
    }

    /// A new channel on the manager's connection (tests declare their own objects on it).
    pub async fn channel(&self) -> Result<Channel, ManagerError> {
        Ok(self
            .session
            .connection
            .create_channel()
            .await
            .map_err(amqp("opening a channel"))?)
    }

    /// Closes the session in order.
    pub async fn close(self) {
        broker::close_bounded(&self.session.connection, "OK").await;
    }
}
