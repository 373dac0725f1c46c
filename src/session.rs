//! The session actor: one task owns the broker connection and its channels. It dials (with
//! failover and backoff), subscribes (topology, prefetch, consumer, confirm channel), hands
//! the deliveries to the pipeline in batches (each read into an [`Incoming`], signature
//! header included), publishes acks and events with confirms, settles the deliveries, and
//! keeps the session's state on a watch channel that the control socket and the heartbeats
//! read. The pipeline holds a [`Link`]: what it asks of the session (answer a batch, publish
//! an event, hand over to a rotated identity, reconnect, close) are messages, so only this
//! module drives AMQP.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions, BasicRejectOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Connection, Event};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot, watch};

use crate::broker::{self, BrokerError, Connector, Dialer, Session, amqp};
use crate::config::UrlOrder;
use crate::dispatch::{Disposition, Rotation, SettingsWatch};
use crate::ids::now_ms;
use crate::metrics::Metrics;
use crate::protocol::{Ack, Incoming};

/// Where the broker session is (shown as `connecting`, `connected`, `disconnected`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SessionState {
    /// No session yet since the agent started.
    #[default]
    Connecting,
    /// A session is open (it may still be subscribing).
    Connected,
    /// Had one; lost or closed it, and is dialling again.
    Disconnected,
}

impl SessionState {
    /// As the socket's JSON and `rampart status` spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            SessionState::Connecting => "connecting",
            SessionState::Connected => "connected",
            SessionState::Disconnected => "disconnected",
        }
    }
}

/// The broker session as the actor last saw it: what `rampart status` shows.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionStatus {
    /// Where the session is.
    pub state: SessionState,
    /// The broker URL of the current (or last) session, without credentials.
    pub url: Option<String>,
    /// Its port.
    pub broker_port: Option<u16>,
    /// The TLS version the handshake agreed.
    pub tls_version: Option<String>,
    /// The cipher suite the handshake agreed.
    pub cipher: Option<String>,
    /// The broker certificate's subject.
    pub broker_certificate: Option<String>,
    /// The broker certificate's expiry.
    pub broker_certificate_not_after: Option<String>,
    /// When the current session opened (ms since the epoch); `None` while there is none.
    pub connected_since_ms: Option<u64>,
    /// When the last heartbeat event was confirmed (ms since the epoch).
    pub last_heartbeat_ms: Option<u64>,
    /// Sessions opened since the agent started.
    pub sessions: u64,
    /// Of those, the ones after a lost session (an identity hand-over is not one).
    pub reconnects: u64,
    /// Why the last session ended or the last dial failed.
    pub last_error: Option<String>,
    /// Since when the broker blocks this connection's publishes (a resource alarm).
    pub blocked_since_ms: Option<u64>,
    /// The last blocked spell: (from, to).
    pub last_blocked: Option<(u64, u64)>,
    /// Shared objects missing on the broker that the agent serves without (events,
    /// dead-lettering).
    pub broker_missing: Vec<String>,
}

/// A delivery as the pipeline takes it: the tag it is settled by, and the request.
#[derive(Debug)]
pub struct Received {
    /// The delivery tag the session settles it by.
    pub tag: u64,
    /// The delivery's properties and body, as the dispatcher reads them.
    pub incoming: Incoming,
}

/// What the session tells the pipeline, in the order it happened.
#[derive(Debug)]
pub enum Inbound {
    /// Session `session` is subscribed; `missing`: shared objects its broker lacks.
    Up {
        /// The session's id (counted from 1 since the agent started).
        session: u64,
        /// Shared objects (exchanges, queues) its broker lacks.
        missing: Vec<&'static str>,
    },
    /// Deliveries of session `session`, in queue order (the ones waiting together).
    Batch {
        /// The session they came on.
        session: u64,
        /// The deliveries, in queue order.
        deliveries: Vec<Received>,
    },
    /// Session `session` ended; its unsettled deliveries go back to the queue.
    Down {
        /// The session that ended.
        session: u64,
    },
}

/// One command's answer: the ack to publish, then what to do with its delivery.
#[derive(Debug)]
pub struct Reply {
    /// The ack, published with a confirm.
    pub ack: Ack,
    /// Then the delivery is acked or rejected.
    pub disposition: Disposition,
}

/// The replies of a batch once their records are written (resolved by the answering task).
type Ready = Pin<Box<dyn Future<Output = Vec<Reply>> + Send>>;

/// What the pipeline asks of the session.
enum Order {
    /// Answer deliveries `tags` of `session` with what `ready` resolves to, in that order.
    Answer {
        session: u64,
        tags: Vec<u64>,
        ready: Ready,
    },
    /// Return deliveries `tags` of `session` to the queue (after the answers before them).
    Requeue { session: u64, tags: Vec<u64> },
    /// Publish an event (type `event`, routing key `<event>.<host>`) and confirm it.
    Publish {
        event: String,
        body: Vec<u8>,
        done: oneshot::Sender<Result<(), BrokerError>>,
    },
    /// Settle what is answered, close this session, continue on the rotated identity's.
    HandOver(Box<Rotation>),
    /// Settle what is answered, close this session, dial with new settings.
    Reconnect(Connector),
    /// Settle what is answered, close the session, end.
    Close,
}

/// What the session needs of the agent around dialing.
pub trait Host: Send + Sync + 'static {
    /// Before a broker of `connector` is dialed, and once a session to it is up: the
    /// firewall's failsafe follows the brokers' addresses (when they are DNS names).
    fn follow(&self, connector: &Connector) -> impl Future<Output = ()> + Send;
    /// The installed identity's SHA-256: when it changes, the connector is rebuilt.
    fn identity(&self) -> String;
    /// A connector for the installed identity and the settings in force.
    fn connector(&self) -> anyhow::Result<Connector>;
}

/// What the actor is started with.
pub struct Start {
    /// The brokers to dial and the identity to present.
    pub connector: Connector,
    /// The host whose queue is consumed and whose name acks and events carry.
    pub host_id: String,
    /// The broker user the messages are published as (their `user_id`).
    pub broker_user: String,
    /// The settings in force (backoff, URL order, prefetch, queue arguments).
    pub settings: SettingsWatch,
    /// Where sessions are counted.
    pub metrics: Arc<Metrics>,
    /// Where the session's state is kept for the control socket and heartbeats.
    pub status: watch::Sender<SessionStatus>,
    /// How often the actor reports that it turns (`metrics.link_alive_ms`).
    pub pulse: Duration,
}

/// The pipeline's handle on the session actor.
pub struct Link {
    orders: mpsc::UnboundedSender<Order>,
    inbound: mpsc::UnboundedReceiver<Inbound>,
    /// A message taken while merging batches that belongs to the next `recv`.
    peeked: Option<Inbound>,
    task: tokio::task::JoinHandle<()>,
}

/// Starts the actor on `start.connector`'s brokers.
pub fn start<H: Host>(host: Arc<H>, start: Start) -> Link {
    let (orders_tx, orders) = mpsc::unbounded_channel();
    let (inbound_tx, inbound) = mpsc::unbounded_channel();
    let Start {
        connector,
        host_id,
        broker_user,
        settings,
        metrics,
        status,
        pulse,
    } = start;
    let actor = Actor {
        host,
        who: Arc::new(Who {
            host_id,
            broker_user,
        }),
        settings,
        metrics,
        status: Arc::new(status),
        pulse,
        inbound: inbound_tx,
        sessions: std::sync::atomic::AtomicU64::new(0),
    };
    let task = tokio::spawn(actor.run(connector, orders));
    Link {
        orders: orders_tx,
        inbound,
        peeked: None,
        task,
    }
}

impl Link {
    /// The next thing the session reports; consecutive batches of one session come merged
    /// into one (what waited while the pipeline was busy is one group commit). `None`: the
    /// actor ended.
    pub async fn recv(&mut self) -> Option<Inbound> {
        let first = match self.peeked.take() {
            Some(m) => m,
            None => self.inbound.recv().await?,
        };
        let Inbound::Batch {
            session,
            mut deliveries,
        } = first
        else {
            return Some(first);
        };
        while let Ok(next) = self.inbound.try_recv() {
            match next {
                Inbound::Batch {
                    session: s,
                    deliveries: more,
                } if s == session => deliveries.extend(more),
                other => {
                    self.peeked = Some(other);
                    break;
                }
            }
        }
        Some(Inbound::Batch {
            session,
            deliveries,
        })
    }

    /// Answers deliveries `tags` of `session`: once `ready` resolves (the records written),
    /// and the batches before are answered, their acks are published, their confirms
    /// awaited together, and only then the deliveries settled.
    pub fn answer(
        &self,
        session: u64,
        tags: Vec<u64>,
        ready: impl Future<Output = Vec<Reply>> + Send + 'static,
    ) {
        self.send(Order::Answer {
            session,
            tags,
            ready: Box::pin(ready),
        });
    }

    /// Returns deliveries `tags` of `session` to the queue, after the answers before them.
    pub fn requeue(&self, session: u64, tags: Vec<u64>) {
        if !tags.is_empty() {
            self.send(Order::Requeue { session, tags });
        }
    }

    /// Publishes event `event` with a confirm (an error: the session it was tried on, if
    /// any, is given up).
    pub async fn publish(&self, event: &str, body: Vec<u8>) -> Result<(), BrokerError> {
        let (done, answer) = oneshot::channel();
        self.send(Order::Publish {
            event: event.to_string(),
            body,
            done,
        });
        answer.await.unwrap_or(Err(BrokerError::Ended {
            context: "publishing an event",
        }))
    }

    /// Hands over to the rotated identity's session once what is answered is settled.
    pub fn hand_over(&self, rotation: Box<Rotation>) {
        self.send(Order::HandOver(rotation));
    }

    /// Closes the session (what is answered settled first) and dials with `connector`.
    pub fn reconnect(&self, connector: Connector) {
        self.send(Order::Reconnect(connector));
    }

    /// Settles what is answered, closes the session and waits for the actor to end.
    pub async fn close(self) {
        self.send(Order::Close);
        let _ = self.task.await;
    }

    fn send(&self, order: Order) {
        // The actor ends only on `close` (or a panic, which ends the process).
        let _ = self.orders.send(order);
    }
}

/// Who the session publishes as.
struct Who {
    host_id: String,
    broker_user: String,
}

struct Actor<H> {
    host: Arc<H>,
    who: Arc<Who>,
    settings: SettingsWatch,
    metrics: Arc<Metrics>,
    status: Arc<watch::Sender<SessionStatus>>,
    pulse: Duration,
    inbound: mpsc::UnboundedSender<Inbound>,
    /// Sessions opened so far (the id of the last one).
    sessions: std::sync::atomic::AtomicU64,
}

/// Why a session ended.
enum End {
    Closed,
    HandOver(Box<Rotation>),
    Reconnect(Connector),
    Lost(String),
}

impl End {
    /// What the channels and the connection are closed with.
    fn reason(&self) -> &'static str {
        match self {
            End::Closed => "agent stopping",
            End::HandOver(_) => "identity rotated",
            End::Reconnect(_) => "configuration reloaded",
            End::Lost(_) => "reconnecting",
        }
    }
}

/// How a wait between sessions ended.
enum Wait {
    Elapsed,
    Closed,
    HandOver(Box<Rotation>),
    Reconnect(Connector),
}

/// The channels of a subscribed session.
struct Subscribed {
    consume_ch: lapin::Channel,
    publisher: broker::Publisher,
    consumer: lapin::Consumer,
    missing: Vec<&'static str>,
}

type Orders = mpsc::UnboundedReceiver<Order>;

impl<H: Host> Actor<H> {
    async fn run(self, mut connector: Connector, mut orders: Orders) {
        let mut dialer = self.dialer_for(&connector);
        // A session already open on a newly installed identity (make-before-break).
        let mut rotated: Option<Session> = None;
        // The identity `connector` presents; when a rotation switched the files but its
        // session was lost before taking over, the next connector is built from them.
        let mut identity = self.host.identity();
        loop {
            self.beat();
            let handover = rotated.is_some();
            if !handover && connector.uses_dns() {
                // A broker name may have moved: the failsafe follows before we dial it.
                self.host.follow(&connector).await;
            }
            let attempt = match rotated.take() {
                Some(session) => Ok(session),
                None => self.dial(&mut connector, &mut identity, &mut dialer).await,
            };
            let delay = match attempt {
                Ok(session) => {
                    if !handover && connector.uses_dns() {
                        // The name may have resolved for the dial but not a moment before,
                        // for the failsafe (a resolver starting at boot): found in CI, where a
                        // drop-all rule set then cut the session off. The addresses the dial
                        // used are pinned now, so this finds them even if DNS fails again.
                        self.host.follow(&connector).await;
                    }
                    let began = Instant::now();
                    match self.session(session, handover, &mut orders).await {
                        End::Closed => return,
                        End::HandOver(rotation) => {
                            (connector, rotated) = self.adopt(rotation, &mut identity);
                            continue;
                        }
                        End::Reconnect(c) => {
                            dialer = self.dialer_for(&c);
                            connector = c;
                            continue;
                        }
                        End::Lost(_) => dialer.session_ended(began.elapsed()),
                    }
                }
                Err((url, e)) => {
                    tracing::warn!(url = %url, error = %e, "cannot connect to broker");
                    self.note_error(e.to_string());
                    dialer.failed()
                }
            };
            tracing::info!(delay_ms = delay.as_millis() as u64, "retrying the broker");
            match self.wait_to_retry(delay, &mut orders).await {
                Wait::Elapsed => {}
                Wait::Closed => return,
                Wait::HandOver(rotation) => {
                    (connector, rotated) = self.adopt(rotation, &mut identity)
                }
                Wait::Reconnect(c) => {
                    dialer = self.dialer_for(&c);
                    connector = c;
                }
            }
        }
    }

    /// The rotated identity's connector and session, to continue on.
    fn adopt(
        &self,
        rotation: Box<Rotation>,
        identity: &mut String,
    ) -> (Connector, Option<Session>) {
        let Rotation { connector, session } = *rotation;
        tracing::info!(url = %session.url, "old session closed; serving on the new identity");
        *identity = self.host.identity();
        (connector, Some(session))
    }

    /// One attempt at the broker `dialer` picks, with a connector rebuilt first when the
    /// identity files changed since `identity` (a rotation whose session was lost before
    /// taking over).
    async fn dial(
        &self,
        connector: &mut Connector,
        identity: &mut String,
        dialer: &mut Dialer,
    ) -> Result<Session, (String, BrokerError)> {
        if *identity != self.host.identity() {
            match self.host.connector() {
                Ok(c) => *connector = c,
                Err(e) => tracing::error!(error = %e, "the installed identity is unusable"),
            }
            *identity = self.host.identity();
        }
        let url = &connector.urls[dialer.pick() % connector.urls.len()];
        connector
            .connect(url)
            .await
            .map_err(|e| (url.display.clone(), e))
    }

    /// Waits out the backoff `delay`, beating; orders meanwhile find no session (a
    /// rotation's session is taken over at once, new settings dialed at once).
    async fn wait_to_retry(&self, delay: Duration, orders: &mut Orders) -> Wait {
        let wake = tokio::time::Instant::now() + delay;
        let mut pulse = tokio::time::interval(self.pulse);
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(wake) => return Wait::Elapsed,
                _ = pulse.tick() => self.beat(),
                order = orders.recv() => match order {
                    None | Some(Order::Close) => return Wait::Closed,
                    Some(Order::HandOver(rotation)) => return Wait::HandOver(rotation),
                    Some(Order::Reconnect(c)) => return Wait::Reconnect(c),
                    Some(Order::Publish { done, .. }) => {
                        let _ = done.send(Err(BrokerError::Ended { context: "publishing an event" }));
                    }
                    // Deliveries of a session gone: they come again.
                    Some(Order::Answer { .. } | Order::Requeue { .. }) => {}
                },
            }
        }
    }

    /// Serves one session until it ends, then closes it.
    #[tracing::instrument(name = "session", skip_all, fields(url = %session.url, id))]
    async fn session(&self, session: Session, handover: bool, orders: &mut Orders) -> End {
        use std::sync::atomic::Ordering::Relaxed;
        let id = self.sessions.fetch_add(1, Relaxed) + 1;
        tracing::Span::current().record("id", id);
        self.up(&session, handover);
        let conn = &session.connection;
        let prefetch = self.settings.borrow().effective_prefetch();
        let end = match self.with_pulse(conn, self.subscribe(conn, prefetch)).await {
            Ok(subscribed) => self.serve(id, conn, subscribed, prefetch, orders).await,
            Err(e) => End::Lost(e.to_string()),
        };
        if let End::Lost(why) = &end {
            tracing::warn!(url = %session.url, error = %why, "broker session lost");
            crate::logs::notify(&[sd_notify::NotifyState::Status(&format!(
                "broker session lost ({why}); retrying"
            ))]);
            self.note_error(why.clone());
        }
        self.with_pulse(conn, broker::close_bounded(conn, end.reason()))
            .await;
        let _ = self.inbound.send(Inbound::Down { session: id });
        end
    }

    /// The channels of a session: topology declared (what is missing noted), the prefetch
    /// set, the confirm channel open, the host queue consumed.
    async fn subscribe(&self, conn: &Connection, prefetch: u16) -> Result<Subscribed, BrokerError> {
        let host_id = &self.who.host_id;
        let consume_ch = conn
            .create_channel()
            .await
            .map_err(amqp("opening a channel"))?;
        consume_ch
            .basic_qos(prefetch, BasicQosOptions::default())
            .await
            .map_err(amqp("setting the prefetch"))?;
        let broker_cfg = self.settings.borrow().broker.clone();
        let missing =
            broker::declare_agent_topology(conn, &consume_ch, host_id, &broker_cfg).await?;
        if !missing.is_empty() {
            tracing::warn!(missing = ?missing, "serving without them: no events or no dead-lettering until they are declared");
        }
        self.status.send_modify(|st| {
            st.broker_missing = missing.iter().map(|m| m.to_string()).collect();
        });
        let publisher = broker::Publisher::open(conn).await?;
        let consumer = consume_ch
            .basic_consume(
                broker::host_queue(host_id).as_str().into(),
                format!("rampart-{host_id}").as_str().into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(amqp("consuming the host queue"))?;
        Ok(Subscribed {
            consume_ch,
            publisher,
            consumer,
            missing,
        })
    }

    /// The session's loop: deliveries to the pipeline, orders from it, the connection's
    /// events. An orderly end settles what is answered, then closes the channels in order.
    async fn serve(
        &self,
        id: u64,
        conn: &Connection,
        subscribed: Subscribed,
        prefetch: u16,
        orders: &mut Orders,
    ) -> End {
        let Subscribed {
            consume_ch,
            publisher,
            mut consumer,
            missing,
        } = subscribed;
        // Subscribed only now: failed declarations above close their channel with an error
        // event, which must not count as losing the session.
        let mut events = conn.events_listener();
        if self
            .inbound
            .send(Inbound::Up {
                session: id,
                missing,
            })
            .is_err()
        {
            return End::Closed;
        }
        tracing::info!(queue = %broker::host_queue(&self.who.host_id), "serving commands");
        self.metrics.session_up.set(1);
        let _down = SessionDown(&self.metrics);
        let mut live = Live::new(&publisher, &self.who, &self.status);
        let mut pulse = tokio::time::interval(self.pulse);
        let end = loop {
            tokio::select! {
                biased;
                order = orders.recv() => if let Some(end) = live.order(id, order) {
                    break end;
                },
                why = live.failed() => return End::Lost(why),
                _ = pulse.tick() => self.beat_with(conn),
                event = events.next() => match event {
                    Some(Event::Error(e)) if !conn.status().connected() => return End::Lost(e.to_string()),
                    Some(Event::Error(e)) => tracing::warn!(error = %e, "AMQP error on a channel"),
                    Some(Event::ConnectionBlocked(reason)) => {
                        tracing::warn!(%reason, "broker blocked this connection (resource alarm)");
                        self.note_blocked(true);
                    }
                    Some(Event::ConnectionUnblocked) => {
                        tracing::info!("broker unblocked this connection");
                        self.note_blocked(false);
                    }
                    Some(_) => {}
                    None => return End::Lost("connection events ended".into()),
                },
                delivery = consumer.next() => match delivery {
                    Some(Ok(first)) => {
                        let (batch, ended) = waiting(first, &mut consumer, prefetch);
                        let deliveries = live.received(batch);
                        let _ = self.inbound.send(Inbound::Batch { session: id, deliveries });
                        if let Some(why) = ended {
                            return End::Lost(why);
                        }
                    }
                    Some(Err(e)) => return End::Lost(e.to_string()),
                    None => return End::Lost("the broker cancelled the consumer".into()),
                },
            }
        };
        // An orderly end: the last acks go out, then the channels, so that the connection
        // closes in order.
        if let Err(error) = self.with_pulse(conn, live.finish()).await {
            tracing::warn!(%error, "the last batch's acks did not all go out; its commands will come again");
        }
        broker::close_channels(&[&consume_ch, publisher.channel()], end.reason()).await;
        end
    }

    /// A session is up: counted, shown by the control socket and systemd, logged.
    fn up(&self, session: &Session, handover: bool) {
        self.metrics.sessions.inc();
        self.status.send_modify(|st| {
            st.state = SessionState::Connected;
            st.url = Some(session.url.clone());
            st.broker_port = Some(session.port);
            st.tls_version = Some(session.tls.version.clone());
            st.cipher = Some(session.tls.cipher.clone());
            st.broker_certificate = Some(session.tls.peer_subject.clone());
            st.broker_certificate_not_after = Some(session.tls.peer_not_after.clone());
            st.connected_since_ms = Some(now_ms());
            st.blocked_since_ms = None;
            st.sessions += 1;
            // A hand-over to a rotated identity is not a reconnect.
            if st.sessions > 1 && !handover {
                st.reconnects += 1;
            }
        });
        tracing::info!(
            url = %session.url,
            tls_version = %session.tls.version,
            cipher = %session.tls.cipher,
            broker_certificate = %session.tls.peer_subject,
            "connected to broker"
        );
        crate::logs::notify(&[sd_notify::NotifyState::Status(&format!(
            "serving commands from {}",
            session.url
        ))]);
    }

    fn note_error(&self, e: String) {
        self.metrics.session_up.set(0);
        self.status.send_modify(|st| {
            if st.state == SessionState::Connected {
                st.state = SessionState::Disconnected;
            }
            st.connected_since_ms = None;
            st.last_error = Some(e);
        });
    }

    fn beat(&self) {
        self.metrics
            .link_alive_ms
            .store(now_ms(), std::sync::atomic::Ordering::Relaxed);
    }

    /// A beat, and whether the broker blocks this connection (a resource alarm), for
    /// `rampart status` and the heartbeats.
    fn beat_with(&self, conn: &Connection) {
        self.beat();
        self.note_blocked(conn.status().blocked());
    }

    /// Whether the broker blocks this connection now, for `rampart status` and the
    /// heartbeats: from its events as they come, and checked at every beat.
    fn note_blocked(&self, blocked: bool) {
        self.status.send_if_modified(|st| {
            match (blocked, st.blocked_since_ms) {
                // (The connection's events log the transitions, with the broker's reason.)
                (true, None) => st.blocked_since_ms = Some(now_ms()),
                (false, Some(since)) => {
                    st.blocked_since_ms = None;
                    st.last_blocked = Some((since, now_ms()));
                }
                _ => return false,
            }
            true
        });
    }

    /// Awaits `f` while the actor keeps beating: the watchdog's view is that the agent runs,
    /// not that the broker answers (every broker wait has its own bound).
    async fn with_pulse<F: Future>(&self, conn: &Connection, f: F) -> F::Output {
        tokio::pin!(f);
        let mut pulse = tokio::time::interval(self.pulse);
        loop {
            tokio::select! {
                out = &mut f => return out,
                _ = pulse.tick() => self.beat_with(conn),
            }
        }
    }

    /// Failover and backoff over `connector`'s brokers, with the configured backoff.
    fn dialer_for(&self, connector: &Connector) -> Dialer {
        let b = self.settings.borrow().broker.clone();
        let dialer = Dialer::new(
            connector.urls.len(),
            Duration::from_millis(b.backoff_initial_ms),
            Duration::from_millis(b.backoff_max_ms),
        );
        match b.url_order {
            UrlOrder::Spread => dialer.starting_at(&self.who.host_id),
            UrlOrder::Listed => dialer,
        }
    }
}

/// Marks the session down in the metrics however its loop ends.
struct SessionDown<'a>(&'a Metrics);

impl Drop for SessionDown<'_> {
    fn drop(&mut self) {
        self.0.session_up.set(0);
    }
}

/// A serving session's side of the answers: the ackers of the deliveries handed to the
/// pipeline, the task answering the last batch, and what the publishing tasks report.
struct Live {
    publisher: broker::Publisher,
    who: Arc<Who>,
    status: Arc<watch::Sender<SessionStatus>>,
    ackers: HashMap<u64, lapin::Acker>,
    /// The last batch's task (it waits for the one before).
    answering: Option<Answering>,
    failures_tx: mpsc::UnboundedSender<String>,
    failures: mpsc::UnboundedReceiver<String>,
}

/// The task answering one batch; dropping it aborts it, and so the tasks before it: a
/// session given up leaves those batches unsettled, and their deliveries come again and
/// are answered from their records, as duplicates.
struct Answering(tokio::task::JoinHandle<Result<(), BrokerError>>);

impl Answering {
    async fn done(&mut self) -> Result<(), BrokerError> {
        (&mut self.0).await.expect("the answering task panicked")
    }
}

impl Drop for Answering {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl Live {
    fn new(
        publisher: &broker::Publisher,
        who: &Arc<Who>,
        status: &Arc<watch::Sender<SessionStatus>>,
    ) -> Live {
        let (failures_tx, failures) = mpsc::unbounded_channel();
        Live {
            publisher: publisher.clone(),
            who: who.clone(),
            status: status.clone(),
            ackers: HashMap::new(),
            answering: None,
            failures_tx,
            failures,
        }
    }

    /// Carries out an order of the pipeline; the end of the session, for the ones that end it.
    fn order(&mut self, id: u64, order: Option<Order>) -> Option<End> {
        // The pipeline dropped its handle: nothing will answer, so end as on a close.
        let Some(order) = order else {
            return Some(End::Closed);
        };
        match order {
            Order::Answer {
                session,
                tags,
                ready,
            } if session == id => self.answer(tags, ready),
            Order::Requeue { session, tags } if session == id => self.requeue(tags),
            // An earlier session's deliveries: they come again on this one.
            Order::Answer { .. } | Order::Requeue { .. } => {}
            Order::Publish { event, body, done } => self.publish(event, body, done),
            Order::HandOver(rotation) => return Some(End::HandOver(rotation)),
            Order::Reconnect(c) => return Some(End::Reconnect(c)),
            Order::Close => return Some(End::Closed),
        }
        None
    }

    /// Keeps the deliveries' ackers and reads each into a request.
    fn received(&mut self, batch: Vec<lapin::message::Delivery>) -> Vec<Received> {
        batch
            .into_iter()
            .map(|d| {
                let tag = d.delivery_tag;
                let incoming = incoming(d.properties, d.data);
                self.ackers.insert(tag, d.acker);
                Received { tag, incoming }
            })
            .collect()
    }

    fn ackers_of(&mut self, tags: &[u64]) -> Vec<lapin::Acker> {
        tags.iter()
            .map(|t| self.ackers.remove(t).expect("a delivery handed out once"))
            .collect()
    }

    /// Starts answering a batch in a task of its own: its records are written (`ready`),
    /// then, once the batch before is answered, its acks are published (confirms awaited
    /// together), then its deliveries settled. So the order record, ack, delivery ack holds
    /// for each command, and acks and settlements stay in queue order.
    fn answer(&mut self, tags: Vec<u64>, ready: Ready) {
        use tracing::Instrument;
        let ackers = self.ackers_of(&tags);
        let before = self.answering.take();
        let (publisher, who) = (self.publisher.clone(), self.who.clone());
        let task = async move {
            let replies = ready.await;
            if let Some(mut before) = before {
                before.done().await?;
            }
            let started = Instant::now();
            // Published in order (each future sends its frames when first polled, in turn).
            futures_util::future::try_join_all(
                replies
                    .iter()
                    .map(|r| publish_ack(&publisher, &who, &r.ack)),
            )
            .await?;
            tracing::debug!(
                acks = replies.len(),
                confirm_us = started.elapsed().as_micros() as u64,
                "acks confirmed by the broker"
            );
            // Only now, with the acks safely at the broker, do the commands leave the queue.
            let dispositions: Vec<Disposition> = replies.iter().map(|r| r.disposition).collect();
            let settled = settle(publisher.connection(), ackers, &dispositions).await;
            tracing::debug!(
                answer_us = started.elapsed().as_micros() as u64,
                "deliveries settled"
            );
            settled
        };
        self.chain(task.in_current_span());
    }

    /// Returns deliveries to the queue once the batches before are answered.
    fn requeue(&mut self, tags: Vec<u64>) {
        let ackers = self.ackers_of(&tags);
        let before = self.answering.take();
        let conn = self.publisher.connection().clone();
        self.chain(async move {
            if let Some(mut before) = before {
                before.done().await?;
            }
            for acker in ackers {
                let nack = acker.nack(BasicNackOptions {
                    requeue: true,
                    ..Default::default()
                });
                broker::unless_ended(&conn, "returning a delivery to the queue", nack).await?;
            }
            Ok(())
        });
    }

    /// Runs `task` as the last answering task; a failure gives the session up.
    fn chain(&mut self, task: impl Future<Output = Result<(), BrokerError>> + Send + 'static) {
        let failures = self.failures_tx.clone();
        self.answering = Some(Answering(tokio::spawn(async move {
            let out = task.await;
            if let Err(e) = &out {
                let _ = failures.send(e.to_string());
            }
            out
        })));
    }

    /// Publishes an event in a task of its own; a failure gives the session up.
    fn publish(
        &self,
        event: String,
        body: Vec<u8>,
        done: oneshot::Sender<Result<(), BrokerError>>,
    ) {
        let (publisher, who) = (self.publisher.clone(), self.who.clone());
        let (status, failures) = (self.status.clone(), self.failures_tx.clone());
        tokio::spawn(async move {
            let props = broker::json_properties()
                .with_type(event.as_str().into())
                .with_user_id(who.broker_user.as_str().into());
            let key = format!("{event}.{}", who.host_id);
            let out = publisher
                .publish(broker::EVENTS_EXCHANGE, &key, &body, props)
                .await;
            match &out {
                Ok(()) if event == "heartbeat" => {
                    status.send_modify(|st| st.last_heartbeat_ms = Some(now_ms()));
                }
                Ok(()) => {}
                Err(e) => {
                    let _ = failures.send(e.to_string());
                }
            }
            let _ = done.send(out);
        });
    }

    /// Why the session must be given up: an ack, a settlement or an event that failed.
    async fn failed(&mut self) -> String {
        match self.failures.recv().await {
            Some(why) => why,
            None => std::future::pending().await,
        }
    }

    /// Waits until every batch handed over is answered.
    async fn finish(&mut self) -> Result<(), BrokerError> {
        match self.answering.take() {
            Some(mut task) => task.done().await,
            None => Ok(()),
        }
    }
}

/// A delivery's properties and body as the dispatcher reads them.
fn incoming(props: lapin::BasicProperties, body: Vec<u8>) -> Incoming {
    let signature =
        props
            .headers()
            .as_ref()
            .and_then(|h| match h.inner().get("x-rampart-signature") {
                Some(AMQPValue::LongString(s)) => {
                    Some(String::from_utf8_lossy(s.as_bytes()).into_owned())
                }
                Some(AMQPValue::ShortString(s)) => Some(s.as_str().to_string()),
                _ => None,
            });
    Incoming {
        message_id: props.message_id().as_ref().map(|s| s.as_str().to_string()),
        kind: props.kind().as_ref().map(|s| s.as_str().to_string()),
        user_id: props.user_id().as_ref().map(|s| s.as_str().to_string()),
        signature,
        body,
    }
}

async fn publish_ack(
    publisher: &broker::Publisher,
    who: &Who,
    ack: &Ack,
) -> Result<(), BrokerError> {
    let mut props = broker::json_properties()
        .with_message_id(ack.id.as_str().into())
        .with_type("ack".into())
        .with_user_id(who.broker_user.as_str().into())
        .with_timestamp(ack.timestamp / 1000);
    if let Some(cid) = &ack.correlation_id {
        props = props.with_correlation_id(cid.as_str().into());
    }
    publisher
        .publish(broker::ACKS_EXCHANGE, &who.host_id, &ack.to_json(), props)
        .await
}

/// Settles a batch's deliveries in queue order, with one frame per run: a run of acks is
/// one `basic.ack` with `multiple` on its last delivery (every delivery before it on the
/// channel is settled already, since batches settle in order), a rejection its own
/// `basic.reject`. One frame instead of one per command is most of what a large batch
/// spends between its confirms and the broker's next deliveries.
async fn settle(
    conn: &lapin::ConnectionStatus,
    ackers: Vec<lapin::Acker>,
    dispositions: &[Disposition],
) -> Result<(), BrokerError> {
    for (acker, frame) in ackers.into_iter().zip(settle_frames(dispositions)) {
        match frame {
            None => {}
            Some(Disposition::Ack) => {
                let ack = acker.ack(BasicAckOptions { multiple: true });
                broker::unless_ended(conn, "acknowledging the deliveries", ack).await?;
            }
            Some(Disposition::Reject) => {
                let reject = acker.reject(BasicRejectOptions { requeue: false });
                broker::unless_ended(conn, "rejecting the delivery", reject).await?;
            }
        }
    }
    Ok(())
}

/// The frame each delivery of a batch sends: `None` when the next delivery's multiple ack
/// covers it.
fn settle_frames(dispositions: &[Disposition]) -> Vec<Option<Disposition>> {
    let mut frames: Vec<Option<Disposition>> = dispositions.iter().copied().map(Some).collect();
    for i in 1..frames.len() {
        if dispositions[i - 1] == Disposition::Ack && dispositions[i] == Disposition::Ack {
            frames[i - 1] = None;
        }
    }
    frames
}

/// `first` and the deliveries already waiting behind it, at most `limit` in all; and why
/// the stream ended, if it did while they were taken.
fn waiting(
    first: lapin::message::Delivery,
    consumer: &mut lapin::Consumer,
    limit: u16,
) -> (Vec<lapin::message::Delivery>, Option<String>) {
    use futures_util::FutureExt;
    let mut batch = vec![first];
    while batch.len() < usize::from(limit.max(1)) {
        match consumer.next().now_or_never() {
            Some(Some(Ok(d))) => batch.push(d),
            Some(Some(Err(e))) => return (batch, Some(e.to_string())),
            Some(None) => return (batch, Some("the broker cancelled the consumer".into())),
            None => break,
        }
    }
    (batch, None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_of_acks_is_one_frame_and_each_rejection_its_own() {
        use Disposition::{Ack, Reject};
        assert_eq!(settle_frames(&[]), vec![]);
        assert_eq!(settle_frames(&[Ack]), vec![Some(Ack)]);
        assert_eq!(
            settle_frames(&[Ack, Ack, Reject, Reject, Ack, Ack, Ack]),
            vec![
                None,
                Some(Ack),
                Some(Reject),
                Some(Reject),
                None,
                None,
                Some(Ack)
            ]
        );
        assert_eq!(settle_frames(&[Reject, Ack]), vec![Some(Reject), Some(Ack)]);
    }
}
