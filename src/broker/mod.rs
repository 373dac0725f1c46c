//! Transport only: TLS, the AMQP session, topology, confirmed publishing and reconnect
//! backoff. Nothing here knows what a command means.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::protocol::BasicProperties;
use lapin::tcp::{AsyncTcpStream, RustlsConnector};
use lapin::types::{AMQPValue, FieldTable};
use lapin::uri::AMQPUri;
use lapin::{Channel, Confirmation, Connection, ConnectionProperties, ExchangeKind};
use serde::Serialize;

use crate::config::{AuthMechanism, BrokerConfig, BrokerUrl, parse_url};

/// Where managers publish commands (direct, routing key: the host id).
pub const COMMANDS_EXCHANGE: &str = "rampart.commands";
/// Where agents publish acks (direct, routing key: the host id).
pub const ACKS_EXCHANGE: &str = "rampart.acks";
/// Where agents publish events (topic, routing key: `<event>.<host>`).
pub const EVENTS_EXCHANGE: &str = "rampart.events";
/// Where rejected commands are dead-lettered.
pub const DEAD_EXCHANGE: &str = "rampart.dead";
/// The queue that keeps dead-lettered commands.
pub const DEAD_QUEUE: &str = "rampart.dead";

/// The durable queue holding host `host_id`'s commands.
pub fn host_queue(host_id: &str) -> String {
    format!("rampart.host.{host_id}")
}

/// Every way a broker operation fails; each ends the session it happened on.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// A broker URL does not parse.
    #[error(transparent)]
    Url(#[from] crate::config::UrlError),
    /// The password file (PLAIN login) could not be read.
    #[error("cannot read the broker password file: {0}")]
    Password(std::io::Error),
    /// The TCP, TLS or AMQP handshake took too long.
    #[error("connecting to {url} timed out after {secs} s")]
    Timeout {
        /// The broker, without credentials.
        url: String,
        /// The bound.
        secs: u64,
    },
    /// The broker refused the connection, the handshake or the login.
    #[error("{url}: {cause}")]
    Connect {
        /// The broker, without credentials.
        url: String,
        /// lapin's reason.
        cause: lapin::Error,
    },
    /// An AMQP operation failed.
    #[error("{context}: {cause}")]
    Amqp {
        /// What was being done.
        context: &'static str,
        /// lapin's reason.
        cause: lapin::Error,
    },
    /// A publish was not confirmed in time (time under a resource alarm not counted).
    #[error(
        "no publisher confirm for a message to {exchange} within {secs} s (is the broker blocking publishers?)"
    )]
    ConfirmTimeout {
        /// Where it was published.
        exchange: String,
        /// The bound.
        secs: u64,
    },
    /// The connection ended while a confirm was awaited.
    #[error("the connection ended while a publish to {exchange} waited for its confirm")]
    ConnectionLost {
        /// Where it was published.
        exchange: String,
    },
    /// The connection ended while a frame was owed (an ack, a settlement).
    #[error("the connection ended while {context}")]
    Ended {
        /// What was being done.
        context: &'static str,
    },
    /// Shared topology the agent needs is missing on the broker.
    #[error("{0}")]
    Missing(String),
    /// The broker kept nacking a publish.
    #[error("the broker refused (nacked) a message published to {exchange}")]
    Nacked {
        /// Where it was published.
        exchange: String,
    },
    /// A mandatory publish matched no queue.
    #[error("the broker returned an unroutable message published to {exchange} with key {key}")]
    Unroutable {
        /// Where it was published.
        exchange: String,
        /// With which routing key.
        key: String,
    },
}

/// Wraps a lapin error with what we were doing.
pub(crate) fn amqp(context: &'static str) -> impl FnOnce(lapin::Error) -> BrokerError {
    move |cause| BrokerError::Amqp { context, cause }
}

/// Awaits `op` (a frame lapin sends for us, such as a delivery's ack) unless the connection
/// ends first: a dead connection does not always fail what it owes (a publish's confirm
/// once waited 30 s for it), and a session stuck here would keep feeding the watchdog.
pub(crate) async fn unless_ended<T>(
    conn: &lapin::ConnectionStatus,
    context: &'static str,
    op: impl std::future::Future<Output = lapin::Result<T>>,
) -> Result<T, BrokerError> {
    const SLICE: Duration = Duration::from_millis(250);
    tokio::pin!(op);
    loop {
        if let Ok(out) = tokio::time::timeout(SLICE, &mut op).await {
            return out.map_err(amqp(context));
        }
        if conn.errored() || conn.closed() {
            return Err(BrokerError::Ended { context });
        }
    }
}

/// What the TLS handshake established, for status and `connection list`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct TlsDetails {
    /// The TLS version agreed.
    pub version: String,
    /// The cipher suite agreed.
    pub cipher: String,
    /// The broker certificate's subject.
    pub peer_subject: String,
    /// The broker certificate's end of validity.
    pub peer_not_after: String,
    /// Our end of the TCP connection.
    pub local_addr: String,
    /// The broker's end.
    pub peer_addr: String,
}

/// One established AMQP session.
pub struct Session {
    /// The AMQP connection.
    pub connection: Connection,
    /// The broker's URL, without credentials.
    pub url: String,
    /// Its port.
    pub port: u16,
    /// What the TLS handshake established.
    pub tls: TlsDetails,
    /// When it was opened.
    pub connected_at: SystemTime,
}

/// Everything needed to open sessions to the configured brokers.
#[derive(Clone)]
pub struct Connector {
    /// The brokers, in the configured order.
    pub urls: Vec<BrokerUrl>,
    /// The name to verify the brokers' certificates against, when not each URL's host.
    pub server_name: Option<String>,
    /// The TLS client configuration: the agent's identity and the CA it trusts.
    pub tls: Arc<rustls::ClientConfig>,
    /// The connection name the broker shows (`rampart/<host>`).
    pub connection_name: String,
    /// The bound on TCP, TLS and AMQP handshakes together.
    pub connect_timeout: Duration,
    /// User and password, with PLAIN login; `None` with certificate login (EXTERNAL).
    pub plain_credentials: Option<(String, String)>,
}

/// The addresses each broker name last resolved to, process-wide (every connector, the
/// reloaded and the rotated ones too): used when resolving fails (a rule set dropping DNS,
/// a resolver down), so a session never depends on DNS answering.
static PINNED: std::sync::LazyLock<Mutex<Pins>> = std::sync::LazyLock::new(Mutex::default);

/// (broker name, port) -> its last resolved addresses.
type Pins = HashMap<(String, u16), Vec<SocketAddr>>;

/// How long one broker name may take to resolve before the pinned addresses are used.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(3);

impl Connector {
    /// A connector for `cfg`'s brokers with the TLS identity in `tls`; the connection name
    /// is what the broker's management UI shows.
    pub fn new(
        cfg: &BrokerConfig,
        tls: Arc<rustls::ClientConfig>,
        connection_name: String,
    ) -> Result<Connector, BrokerError> {
        let urls = cfg
            .urls
            .iter()
            .map(|u| parse_url(u, cfg))
            .collect::<Result<Vec<_>, _>>()?;
        let plain_credentials = match (cfg.auth, &cfg.username, &cfg.password_file) {
            (AuthMechanism::Plain, Some(user), Some(file)) => {
                let pw = std::fs::read_to_string(file).map_err(BrokerError::Password)?;
                Some((user.clone(), pw.trim_end_matches(['\r', '\n']).to_string()))
            }
            _ => None,
        };
        Ok(Connector {
            urls,
            server_name: cfg.server_name.clone(),
            tls,
            connection_name,
            connect_timeout: Duration::from_secs(cfg.connect_timeout_secs),
            plain_credentials,
        })
    }

    /// True when some broker is named by a DNS name rather than an address.
    pub fn uses_dns(&self) -> bool {
        self.urls
            .iter()
            .any(|u| u.uri.authority.host.parse::<IpAddr>().is_err())
    }

    /// The addresses of `host:port`: resolved now (bounded), else the pinned ones.
    pub async fn resolve(&self, host: &str, port: u16) -> std::io::Result<Vec<SocketAddr>> {
        if let Ok(ip) = host.parse::<IpAddr>() {
            return Ok(vec![SocketAddr::new(ip, port)]);
        }
        let key = (host.to_string(), port);
        let fresh = tokio::time::timeout(RESOLVE_TIMEOUT, tokio::net::lookup_host((host, port)))
            .await
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "resolving timed out"))
            .and_then(|r| r)
            .map(|addrs| addrs.collect::<Vec<_>>());
        let mut pinned = PINNED.lock().expect("pinned lock");
        match fresh {
            Ok(addrs) if !addrs.is_empty() => {
                pinned.insert(key, addrs.clone());
                Ok(addrs)
            }
            other => match pinned.get(&key) {
                Some(addrs) => {
                    tracing::warn!(host, error = ?other.err(), "cannot resolve the broker; using its last known addresses");
                    Ok(addrs.clone())
                }
                None => other.and_then(|_| {
                    Err(std::io::Error::new(
                        std::io::ErrorKind::NotFound,
                        "no address",
                    ))
                }),
            },
        }
    }

    /// Every broker's addresses (resolved or pinned), for the firewall failsafe.
    pub async fn broker_addresses(&self) -> Vec<(IpAddr, u16)> {
        let mut out = vec![];
        for url in &self.urls {
            let a = &url.uri.authority;
            match self.resolve(&a.host, a.port).await {
                Ok(addrs) => out.extend(addrs.iter().map(|sa| (sa.ip(), sa.port()))),
                Err(e) => {
                    tracing::warn!(url = %url.display, error = %e, "cannot resolve broker for the firewall failsafe")
                }
            }
        }
        out.sort();
        out.dedup();
        out
    }

    /// One attempt per URL, in order, until one works; else every URL's error, joined.
    pub async fn connect_first(&self) -> Result<Session, String> {
        let mut errors = vec![];
        for url in &self.urls {
            match self.connect(url).await {
                Ok(s) => return Ok(s),
                Err(e) => errors.push(format!("{}: {e}", url.display)),
            }
        }
        Err(errors.join("; "))
    }

    /// One attempt against one URL: TCP, TLS (broker verified), AMQP handshake and login.
    pub async fn connect(&self, url: &BrokerUrl) -> Result<Session, BrokerError> {
        let mut uri = url.uri.clone();
        if let Some((user, pw)) = &self.plain_credentials {
            uri.authority.userinfo.username = user.clone();
            uri.authority.userinfo.password = pw.clone();
        }
        let server_name = self
            .server_name
            .clone()
            .unwrap_or_else(|| uri.authority.host.clone());
        let details = Arc::new(Mutex::new(TlsDetails::default()));
        let seen = details.clone();
        let tls = RustlsConnector::from(self.tls.clone());
        let resolver = self.clone();
        let open = async move |uri: AMQPUri, rt| {
            let addrs = resolver
                .resolve(&uri.authority.host, uri.authority.port)
                .await?;
            let stream = AsyncTcpStream::connect(&rt, addrs).await?;
            let stream = stream.into_rustls(&tls, &server_name).await?;
            if let AsyncTcpStream::Rustls(s) = &stream {
                let (_, conn) = s.get_ref();
                let mut d = seen.lock().expect("tls details lock");
                d.version = conn
                    .protocol_version()
                    .map(|v| format!("{v:?}"))
                    .unwrap_or_default();
                d.cipher = conn
                    .negotiated_cipher_suite()
                    .map(|c| format!("{:?}", c.suite()))
                    .unwrap_or_default();
                if let Some(peer) = conn.peer_certificates().and_then(|c| c.first())
                    && let Ok(info) = crate::certs::tls::cert_info(peer)
                {
                    d.peer_subject = info.subject;
                    d.peer_not_after = info.not_after;
                }
            }
            Ok(stream)
        };
        let props = ConnectionProperties::default()
            .with_connection_name(self.connection_name.clone().into());
        let runtime = lapin::runtime::default_runtime().map_err(|cause| BrokerError::Connect {
            url: url.display.clone(),
            cause,
        })?;
        let attempt = Connection::connector(uri, runtime, open, props);
        let connection = tokio::time::timeout(self.connect_timeout, attempt)
            .await
            .map_err(|_| BrokerError::Timeout {
                url: url.display.clone(),
                secs: self.connect_timeout.as_secs(),
            })?
            .map_err(|cause| BrokerError::Connect {
                url: url.display.clone(),
                cause,
            })?;
        let tls = details.lock().expect("tls details lock").clone();
        Ok(Session {
            connection,
            url: url.display.clone(),
            port: url.uri.authority.port,
            tls,
            connected_at: SystemTime::now(),
        })
    }
}

/// Exponential backoff with full jitter: each delay is uniform in [0, min(cap, initial*2^n)].
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    cap: Duration,
    attempt: u32,
}

impl Backoff {
    /// Delays from `initial` (the first ceiling), doubling up to `cap`.
    pub fn new(initial: Duration, cap: Duration) -> Backoff {
        Backoff {
            initial,
            cap,
            attempt: 0,
        }
    }

    /// The ceiling of the next delay (before jitter).
    pub fn ceiling(&self) -> Duration {
        let factor = 1u32.checked_shl(self.attempt.min(31)).unwrap_or(u32::MAX);
        self.initial.saturating_mul(factor).min(self.cap)
    }

    /// The next delay, drawn under the ceiling, which then doubles.
    pub fn next_delay(&mut self) -> Duration {
        let ceiling = self.ceiling();
        self.attempt = self.attempt.saturating_add(1);
        let ms = rand::random_range(0..=ceiling.as_millis() as u64);
        Duration::from_millis(ms)
    }

    /// Back to the first ceiling (after a session that lasted).
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

/// A session at least this long proves its broker healthy: the backoff starts over.
pub const STABLE_SESSION: Duration = Duration::from_secs(30);

/// Which configured broker to dial next, and how long to wait first. A broker that fails
/// (refuses, times out, or drops a session early) is no reason to wait: the others are tried
/// at once, in turn, with a small jitter only; the exponential backoff applies after a whole
/// round of them failed. After a session is lost the round starts with the next broker, so a
/// dead node is tried last.
#[derive(Debug, Clone)]
pub struct Dialer {
    count: usize,
    /// Where a round starts after a reset (see `starting_at`).
    first: usize,
    next: usize,
    /// Failed attempts in the current round.
    failed: usize,
    backoff: Backoff,
    initial: Duration,
}

impl Dialer {
    /// A dialer over `count` brokers, with a backoff from `initial` to `cap`.
    pub fn new(count: usize, initial: Duration, cap: Duration) -> Dialer {
        Dialer {
            count: count.max(1),
            first: 0,
            next: 0,
            failed: 0,
            backoff: Backoff::new(initial, cap),
            initial,
        }
    }

    /// Starts at the broker picked by `key` (the host id) instead of the first: hosts that
    /// share one list of URLs spread over the nodes evenly, and each host keeps its place.
    pub fn starting_at(mut self, key: &str) -> Dialer {
        use sha2::Digest;
        let digest = sha2::Sha256::digest(key.as_bytes());
        let n = u64::from_be_bytes(digest[..8].try_into().expect("8 bytes"));
        self.first = (n % self.count as u64) as usize;
        self.next = self.first;
        self
    }

    /// The index of the broker to dial now.
    pub fn pick(&mut self) -> usize {
        let i = self.next % self.count;
        self.next = (self.next + 1) % self.count;
        i
    }

    /// An attempt failed: the wait before the next one.
    pub fn failed(&mut self) -> Duration {
        self.failed += 1;
        if self.failed < self.count {
            self.small_jitter()
        } else {
            self.failed = 0;
            self.backoff.next_delay()
        }
    }

    /// A session ended after `lasted` (lost, not stopped): the wait before the next attempt.
    pub fn session_ended(&mut self, lasted: Duration) -> Duration {
        if lasted >= STABLE_SESSION {
            self.backoff.reset();
            self.failed = 0;
            self.small_jitter()
        } else {
            // A session that died young counts as a failure of its round, so a broker that
            // accepts and drops at once cannot make the agent spin.
            self.failed()
        }
    }

    /// Settings changed (reload): the round's first broker, no backoff.
    pub fn reset(&mut self) {
        self.next = self.first;
        self.failed = 0;
        self.backoff.reset();
    }

    /// Up to the initial backoff: enough to spread a fleet that lost one node together.
    fn small_jitter(&self) -> Duration {
        Duration::from_millis(rand::random_range(0..=self.initial.as_millis() as u64))
    }
}

fn queue_args(cfg: &BrokerConfig) -> FieldTable {
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString(cfg.queue_type.as_str().into()),
    );
    args.insert(
        "x-dead-letter-exchange".into(),
        AMQPValue::LongString(DEAD_EXCHANGE.into()),
    );
    // Must be an integer: RabbitMQ closes the channel on a string TTL.
    args.insert(
        "x-message-ttl".into(),
        AMQPValue::LongLongInt(i64::from(cfg.message_ttl_ms)),
    );
    args
}

const EXCHANGES: [(&str, ExchangeKind); 4] = [
    // Topic, not direct: RabbitMQ checks topic permissions on queue.bind only for topic
    // exchanges, and that check is what keeps a host from binding another host's commands.
    (COMMANDS_EXCHANGE, ExchangeKind::Topic),
    (ACKS_EXCHANGE, ExchangeKind::Topic),
    (EVENTS_EXCHANGE, ExchangeKind::Topic),
    (DEAD_EXCHANGE, ExchangeKind::Fanout),
];

/// What an agent cannot serve without (PROTOCOL.md section 2): the exchange its queue is
/// bound to and the one its acks go to. Events and dead-lettering are reported when missing.
const REQUIRED: [&str; 2] = [COMMANDS_EXCHANGE, ACKS_EXCHANGE];

/// Declares the shared exchanges and the dead-letter queue (quorum, so that it survives a
/// node). Needs configure permission on them (a manager has it; a least-privilege host does
/// not).
pub async fn declare_shared_topology(conn: &Connection) -> Result<(), BrokerError> {
    let ch = conn
        .create_channel()
        .await
        .map_err(amqp("opening a channel"))?;
    let durable = ExchangeDeclareOptions {
        durable: true,
        ..Default::default()
    };
    for (name, kind) in EXCHANGES {
        ch.exchange_declare(name.into(), kind, durable, FieldTable::default())
            .await
            .map_err(amqp("declaring an exchange"))?;
    }
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    ch.queue_declare(
        DEAD_QUEUE.into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        args,
    )
    .await
    .map_err(amqp("declaring the dead-letter queue"))?;
    ch.queue_bind(
        DEAD_QUEUE.into(),
        DEAD_EXCHANGE.into(),
        "".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .map_err(amqp("binding the dead-letter queue"))?;
    let _ = ch.close(200, "OK".into()).await;
    Ok(())
}

/// The dead-letter queue as it is named in reports (the exchange has the same name).
const DEAD_QUEUE_REPORTED: &str = "rampart.dead (queue)";

/// Every shared object by its reported name: the exchanges, then the dead-letter queue.
fn shared_objects() -> impl Iterator<Item = &'static str> {
    EXCHANGES
        .iter()
        .map(|(name, _)| *name)
        .chain([DEAD_QUEUE_REPORTED])
}

/// A passive declaration of one shared object (needs no permission; a failure closes `ch`).
async fn check_passive(ch: &Channel, object: &'static str) -> Result<(), lapin::Error> {
    if object == DEAD_QUEUE_REPORTED {
        let passive = QueueDeclareOptions {
            passive: true,
            ..Default::default()
        };
        return ch
            .queue_declare(DEAD_QUEUE.into(), passive, FieldTable::default())
            .await
            .map(drop);
    }
    let kind = EXCHANGES
        .iter()
        .find(|(name, _)| *name == object)
        .map(|(_, kind)| kind.clone())
        .expect("a shared exchange");
    let passive = ExchangeDeclareOptions {
        passive: true,
        ..Default::default()
    };
    ch.exchange_declare(object.into(), kind, passive, FieldTable::default())
        .await
}

/// The shared objects that are missing or unavailable (a classic `rampart.dead` whose node
/// is down, too). All are checked on one channel first, the usual case; only when one fails
/// is each checked on a channel of its own, since a failed check closes its channel.
async fn missing_shared_topology(conn: &Connection) -> Result<Vec<&'static str>, BrokerError> {
    let open = || async {
        conn.create_channel()
            .await
            .map_err(amqp("opening a channel"))
    };
    let ch = open().await?;
    let mut all = true;
    for object in shared_objects() {
        if check_passive(&ch, object).await.is_err() {
            all = false;
            break;
        }
    }
    if all {
        let _ = ch.close(200, "OK".into()).await;
        return Ok(vec![]);
    }
    let mut missing = vec![];
    for object in shared_objects() {
        let ch = open().await?;
        match check_passive(&ch, object).await {
            Ok(()) => {
                let _ = ch.close(200, "OK".into()).await;
            }
            Err(_) => missing.push(object),
        }
    }
    Ok(missing)
}

/// Makes sure the shared topology exists: checked passively first (so a least-privilege
/// user causes no access errors), declared when something is missing and this user may.
/// Returns what is still missing but not needed to serve (events, dead-lettering); a
/// missing required exchange is an error.
pub async fn ensure_shared_topology(conn: &Connection) -> Result<Vec<&'static str>, BrokerError> {
    let mut missing = missing_shared_topology(conn).await?;
    if !missing.is_empty() {
        tracing::info!(missing = ?missing, "shared topology incomplete; trying to declare it");
        if let Err(e) = declare_shared_topology(conn).await {
            tracing::debug!(error = %e, "declaring the shared topology failed");
        }
        missing = missing_shared_topology(conn).await?;
    }
    if let Some(required) = missing.iter().find(|m| REQUIRED.contains(m)) {
        return Err(BrokerError::Missing(format!(
            "{required} is missing (the manager or the operator declares the topology, see docs/operations.md)"
        )));
    }
    Ok(missing)
}

/// Declares the host's queue and binds it; the same arguments on every side, so
/// re-declaring is idempotent.
pub async fn declare_host_queue(
    ch: &Channel,
    host_id: &str,
    cfg: &BrokerConfig,
) -> Result<(), BrokerError> {
    let queue = host_queue(host_id);
    ch.queue_declare(
        queue.as_str().into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        queue_args(cfg),
    )
    .await
    .map_err(amqp("declaring the host queue"))?;
    ch.queue_bind(
        queue.as_str().into(),
        COMMANDS_EXCHANGE.into(),
        host_id.into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .map_err(amqp("binding the host queue to rampart.commands"))?;
    Ok(())
}

/// The agent's side of the topology: the shared part ensured, then its own queue and
/// binding on the consuming channel.
pub async fn declare_agent_topology(
    conn: &Connection,
    ch: &Channel,
    host_id: &str,
    cfg: &BrokerConfig,
) -> Result<Vec<&'static str>, BrokerError> {
    let missing = ensure_shared_topology(conn).await?;
    declare_host_queue(ch, host_id, cfg).await?;
    Ok(missing)
}

/// A channel in publisher-confirm mode.
pub async fn confirm_channel(conn: &Connection) -> Result<Channel, BrokerError> {
    let ch = conn
        .create_channel()
        .await
        .map_err(amqp("opening a channel"))?;
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .map_err(amqp("enabling publisher confirms"))?;
    Ok(ch)
}

/// How long a publish may wait for its confirm while the broker has not said it blocks the
/// connection; past this the session is given up and made again. Time under a resource
/// alarm (connection.blocked) does not count: a new session would be blocked as well, and
/// a fleet reconnecting every 30 s costs a broker short of memory more.
pub const CONFIRM_TIMEOUT: Duration = Duration::from_secs(30);

/// How long closing a connection may take before it is simply dropped (a blocked or dying
/// broker may never answer connection.close).
pub const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// Closes `conn` politely, or drops it after [`CLOSE_TIMEOUT`]. A close refused because
/// one of its channels is still closing (the consumer's, at an identity hand-over) is tried
/// again once that is done: dropping the connection instead left it open at the broker,
/// with the old identity, for longer than a test's 20 s (a CI run of 2026-12-02).
pub async fn close_bounded(conn: &Connection, reason: &str) {
    let attempts = async {
        let mut tries = 0;
        loop {
            match conn.close(200, reason.into()).await {
                Err(e)
                    if matches!(e.kind(), lapin::ErrorKind::InvalidChannelState(..))
                        && tries < 20 =>
                {
                    tries += 1;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                other => return other,
            }
        }
    };
    match tokio::time::timeout(CLOSE_TIMEOUT, attempts).await {
        Ok(Ok(())) => {}
        // Dropping the connection after this still closes its socket; the log says why
        // the broker may list it a while longer.
        Ok(Err(error)) => tracing::warn!(
            reason,
            %error,
            "connection.close failed; dropping the connection"
        ),
        Err(_) => tracing::warn!(
            reason,
            "the broker did not answer connection.close in time; dropping the connection"
        ),
    }
}

/// Closes `channels` (and with them their consumers) before their session is closed in
/// order. Merely dropping them has lapin close them from tasks of its own, which race
/// `connection.close`: the connection ended errored instead of closed, its socket sometimes
/// open, and the broker listed the old identity's session for more than 20 s after a
/// rotation (a CI run of 2026-12-02).
pub async fn close_channels(channels: &[&Channel], reason: &str) {
    for ch in channels {
        if !ch.status().connected() {
            continue;
        }
        match tokio::time::timeout(CLOSE_TIMEOUT, ch.close(200, reason.into())).await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => tracing::debug!(%error, "channel.close failed"),
            Err(_) => tracing::debug!("the broker did not answer channel.close in time"),
        }
    }
}

/// Publishes and waits for the broker's confirm, at most [`CONFIRM_TIMEOUT`]. With
/// `mandatory`, an unroutable message is an error rather than silently dropped.
pub async fn publish_confirmed(
    ch: &Channel,
    exchange: &str,
    key: &str,
    body: &[u8],
    props: BasicProperties,
    mandatory: bool,
) -> Result<(), BrokerError> {
    tokio::time::timeout(
        CONFIRM_TIMEOUT,
        publish_confirmed_unbounded(ch, exchange, key, body, props, mandatory),
    )
    .await
    .map_err(|_| BrokerError::ConfirmTimeout {
        exchange: exchange.to_string(),
        secs: CONFIRM_TIMEOUT.as_secs(),
    })?
}

/// How long nacks of one publish are retried on the same session. Past it the nack is
/// returned and the session given up: a new session (on another node, if there is one)
/// starts clean where a channel can stay refused for minutes after a node died (seen in
/// the fleet benchmark).
pub const NACK_PATIENCE: Duration = CONFIRM_TIMEOUT;

/// The agent's confirm-mode channel, with the status of its connection so that waiting for
/// a confirm can tell a blocked broker from a silent one.
#[derive(Clone)]
pub struct Publisher {
    ch: Channel,
    conn: lapin::ConnectionStatus,
}

impl Publisher {
    /// A confirm-mode channel on `conn`.
    pub async fn open(conn: &Connection) -> Result<Publisher, BrokerError> {
        Ok(Publisher {
            ch: confirm_channel(conn).await?,
            conn: conn.status().clone(),
        })
    }

    /// The confirm-mode channel itself (to close it in order).
    pub fn channel(&self) -> &Channel {
        &self.ch
    }

    /// The state of the connection it publishes on.
    pub fn connection(&self) -> &lapin::ConnectionStatus {
        &self.conn
    }

    /// Publishes until the broker confirms it: a nack (a quorum queue electing its leader, a
    /// queue refusing publishes while full) is retried after a short, growing pause instead
    /// of giving up the session at once (PROTOCOL.md section 6), for at most
    /// [`NACK_PATIENCE`]. A confirm may take [`CONFIRM_TIMEOUT`] of unblocked time. Every
    /// other error returns.
    pub async fn publish(
        &self,
        exchange: &str,
        key: &str,
        body: &[u8],
        props: BasicProperties,
    ) -> Result<(), BrokerError> {
        let mut pause = Duration::from_millis(50);
        let started = tokio::time::Instant::now();
        loop {
            let confirm =
                publish_confirmed_unbounded(&self.ch, exchange, key, body, props.clone(), false);
            match self.confirmed_unless_blocked(exchange, confirm).await {
                Err(e @ BrokerError::Nacked { .. })
                    if started.elapsed() + pause > NACK_PATIENCE =>
                {
                    tracing::warn!(
                        exchange,
                        key,
                        secs = NACK_PATIENCE.as_secs(),
                        "the broker kept nacking a publish; giving up this session"
                    );
                    return Err(e);
                }
                Err(BrokerError::Nacked { .. }) => {
                    tracing::warn!(
                        exchange,
                        key,
                        retry_in_ms = pause.as_millis() as u64,
                        "the broker nacked a publish; retrying"
                    );
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(2));
                }
                other => return other,
            }
        }
    }

    /// Awaits `confirm` for at most [`CONFIRM_TIMEOUT`] of the time the connection is not
    /// blocked.
    async fn confirmed_unless_blocked(
        &self,
        exchange: &str,
        confirm: impl std::future::Future<Output = Result<(), BrokerError>>,
    ) -> Result<(), BrokerError> {
        const SLICE: Duration = Duration::from_millis(250);
        tokio::pin!(confirm);
        let mut unblocked = Duration::ZERO;
        loop {
            if let Ok(out) = tokio::time::timeout(SLICE, &mut confirm).await {
                return out;
            }
            // A dead connection does not always fail the confirms it owes (found when events
            // were published just after a broker went away: the session waited 30 s).
            if self.conn.errored() || self.conn.closed() {
                return Err(BrokerError::ConnectionLost {
                    exchange: exchange.to_string(),
                });
            }
            if !self.conn.blocked() {
                unblocked += SLICE;
            }
            if unblocked >= CONFIRM_TIMEOUT {
                return Err(BrokerError::ConfirmTimeout {
                    exchange: exchange.to_string(),
                    secs: CONFIRM_TIMEOUT.as_secs(),
                });
            }
        }
    }
}

async fn publish_confirmed_unbounded(
    ch: &Channel,
    exchange: &str,
    key: &str,
    body: &[u8],
    props: BasicProperties,
    mandatory: bool,
) -> Result<(), BrokerError> {
    let confirm = ch
        .basic_publish(
            exchange.into(),
            key.into(),
            BasicPublishOptions {
                mandatory,
                ..Default::default()
            },
            body,
            props,
        )
        .await
        .map_err(amqp("publishing"))?
        .await
        .map_err(amqp("waiting for the publisher confirm"))?;
    match confirm {
        Confirmation::Ack(None) | Confirmation::NotRequested => Ok(()),
        Confirmation::Ack(Some(_)) => Err(BrokerError::Unroutable {
            exchange: exchange.to_string(),
            key: key.to_string(),
        }),
        Confirmation::Nack(_) => Err(BrokerError::Nacked {
            exchange: exchange.to_string(),
        }),
    }
}

/// Properties of every persistent JSON message this project publishes.
pub fn json_properties() -> BasicProperties {
    BasicProperties::default()
        .with_content_type("application/json".into())
        .with_delivery_mode(2)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_to_the_cap_with_jitter_below_the_ceiling() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(30));
        let mut ceilings = vec![];
        for _ in 0..12 {
            let c = b.ceiling();
            let d = b.next_delay();
            assert!(d <= c);
            ceilings.push(c.as_millis());
        }
        assert_eq!(&ceilings[..4], &[100, 200, 400, 800]);
        assert_eq!(*ceilings.last().unwrap(), 30_000);
        b.reset();
        assert_eq!(b.ceiling(), Duration::from_millis(100));
    }

    #[test]
    fn a_failed_broker_is_followed_by_the_others_at_once_and_backoff_only_after_a_round() {
        let initial = Duration::from_millis(100);
        let mut d = Dialer::new(3, initial, Duration::from_secs(30));
        assert_eq!(d.pick(), 0);
        // A session on broker 0 is lost after 2 s: brokers 1 and 2 are tried without backoff.
        assert!(d.session_ended(Duration::from_secs(2)) <= initial);
        assert_eq!(d.pick(), 1);
        assert!(d.failed() <= initial);
        assert_eq!(d.pick(), 2);
        // The round is complete (three failures): now the backoff, growing with each round.
        let first_round_ceiling = d.backoff.ceiling();
        let _ = d.failed();
        assert!(d.backoff.ceiling() > first_round_ceiling);
        let mut ceilings = vec![];
        for _ in 0..4 {
            for i in 0..3 {
                let _ = d.pick();
                let delay = d.failed();
                if i < 2 {
                    assert!(delay <= initial, "within a round: {delay:?}");
                }
            }
            ceilings.push(d.backoff.ceiling());
        }
        assert!(ceilings.windows(2).all(|w| w[0] < w[1]), "{ceilings:?}");
        // A stable session starts over.
        assert!(d.session_ended(STABLE_SESSION) <= initial);
        assert_eq!(d.backoff.ceiling(), initial);
    }

    #[test]
    fn hosts_sharing_one_list_spread_over_its_brokers_and_keep_their_place() {
        let dialer = |host: &str| {
            Dialer::new(3, Duration::from_millis(100), Duration::from_secs(30)).starting_at(host)
        };
        let mut per_broker = [0usize; 3];
        for i in 0..3000 {
            per_broker[dialer(&format!("hv-{i}")).pick()] += 1;
        }
        // Even within a few percent.
        assert!(
            per_broker.iter().all(|n| (900..1100).contains(n)),
            "{per_broker:?}"
        );
        let mut d = dialer("hv-7");
        let first = d.pick();
        assert_eq!(dialer("hv-7").pick(), first, "stable for one host");
        assert_eq!(d.pick(), (first + 1) % 3, "then the others in turn");
        d.reset();
        assert_eq!(
            d.pick(),
            first,
            "a reset returns to the host's own first broker"
        );
        // Without spreading: the listed order.
        assert_eq!(
            Dialer::new(3, Duration::from_millis(100), Duration::from_secs(30)).pick(),
            0
        );
    }

    #[test]
    fn one_broker_backs_off_after_each_failure() {
        let mut d = Dialer::new(1, Duration::from_millis(100), Duration::from_secs(30));
        for _ in 0..5 {
            assert_eq!(d.pick(), 0);
            let _ = d.failed();
        }
        assert_eq!(d.backoff.ceiling(), Duration::from_millis(3200));
    }
}
