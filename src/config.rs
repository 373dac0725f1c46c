//! Typed TOML configuration: one struct per section, unknown keys rejected, `validate()` for
//! every rule serde cannot express.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use lapin::uri::{AMQPScheme, AMQPUri, SASLMechanism};

use crate::ids::is_valid_host_id;

/// Where every subcommand looks for its configuration unless `--config` says otherwise.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/rampart/rampart.toml";

/// Why a configuration file is refused (the agent does not start, a reload changes nothing).
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {cause}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        cause: std::io::Error,
    },
    /// It is not valid TOML, or has unknown or mistyped keys.
    #[error("{path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message, on one line.
        message: String,
    },
    /// A setting has a value the agent cannot use.
    #[error("invalid setting {key}: {message}")]
    Invalid {
        /// The setting, `section.key`.
        key: &'static str,
        /// What is wrong with its value.
        message: String,
    },
}

fn invalid(key: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key,
        message: message.into(),
    }
}

/// The configuration file (`/etc/rampart/rampart.toml`); docs/operations.md lists every
/// key with its default.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// This host's id; defaults to the client certificate's CN.
    pub host_id: Option<String>,
    /// Where the crash-safe state lives (made mode 0700).
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    /// `[broker]`: the session.
    pub broker: BrokerConfig,
    /// `[commands]`: what commands are accepted.
    #[serde(default)]
    pub commands: CommandsConfig,
    /// `[control]`: the local control socket.
    #[serde(default)]
    pub control: ControlConfig,
    /// `[log]`.
    #[serde(default)]
    pub log: LogConfig,
    /// `[firewall]`: the agent's table and its limits.
    #[serde(default)]
    pub firewall: FirewallConfig,
    /// `[events]`: the outbox's bounds.
    #[serde(default)]
    pub events: EventsConfig,
    /// `[metrics]`: the opt-in endpoint.
    #[serde(default)]
    pub metrics: MetricsConfig,
    /// Only read by `rampart send` (the manager side).
    #[serde(default)]
    pub manager: ManagerConfig,
}

/// The opt-in metrics and health endpoint.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// `"127.0.0.1:9477"`: serve `/metrics`, `/healthz` and `/readyz` there. Unset: off.
    pub listen: Option<std::net::SocketAddr>,
}

/// The outbox of events made while no session could take them (contract section 6).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventsConfig {
    /// Bytes of kept events (their JSON) beyond which the oldest are dropped.
    #[serde(default = "default_outbox_max_bytes")]
    pub outbox_max_bytes: u64,
    /// Kept events beyond which the oldest are dropped.
    #[serde(default = "default_outbox_max_events")]
    pub outbox_max_events: u64,
}

impl Default for EventsConfig {
    fn default() -> Self {
        EventsConfig {
            outbox_max_bytes: default_outbox_max_bytes(),
            outbox_max_events: default_outbox_max_events(),
        }
    }
}

fn default_outbox_max_bytes() -> u64 {
    16 << 20
}
fn default_outbox_max_events() -> u64 {
    10_000
}

/// `[firewall]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FirewallConfig {
    /// The agent's own table in the `inet` family; no other table is ever touched.
    #[serde(default = "default_table")]
    pub table: String,
    /// Always allowed in, ahead of every rule: `"tcp/22"`, `"udp/53"`.
    #[serde(default)]
    pub failsafe_in: Vec<String>,
    /// Always allowed out, ahead of every rule (the brokers are always allowed).
    #[serde(default)]
    pub failsafe_out: Vec<String>,
    /// How often the table and the routers are compared with the record and repaired.
    #[serde(default = "default_drift_check_secs")]
    pub drift_check_secs: u64,
    /// Most rules a rule set may have (commands only: the stored one always comes back).
    #[serde(default = "default_max_rules")]
    pub max_rules: usize,
    /// Most address set elements a rule set may have, all sets together.
    #[serde(default = "default_max_elements")]
    pub max_elements: usize,
    /// Kernel statements one rule may expand into (sources x destinations x interfaces x
    /// address families, after repeated references are removed).
    #[serde(default = "default_max_rule_expansion")]
    pub max_rule_expansion: usize,
    /// What the firewall does when the stored state cannot be read at start.
    #[serde(default)]
    pub when_state_lost: WhenStateLost,
    /// The nft binary.
    #[serde(default = "default_nft")]
    pub nft: PathBuf,
    /// Seconds between `stats` events (rules whose counters moved); 0: none.
    #[serde(default = "default_stats_interval_s")]
    pub stats_interval_s: u64,
}

impl Default for FirewallConfig {
    fn default() -> Self {
        FirewallConfig {
            table: default_table(),
            failsafe_in: vec![],
            failsafe_out: vec![],
            drift_check_secs: default_drift_check_secs(),
            max_rules: default_max_rules(),
            max_elements: default_max_elements(),
            max_rule_expansion: default_max_rule_expansion(),
            when_state_lost: WhenStateLost::default(),
            nft: default_nft(),
            stats_interval_s: default_stats_interval_s(),
        }
    }
}

fn default_table() -> String {
    "rampart".to_string()
}
fn default_drift_check_secs() -> u64 {
    30
}
fn default_max_rules() -> usize {
    100_000
}
fn default_max_elements() -> usize {
    1_000_000
}
fn default_max_rule_expansion() -> usize {
    1_000
}
fn default_stats_interval_s() -> u64 {
    60
}
fn default_nft() -> PathBuf {
    PathBuf::from("/usr/sbin/nft")
}

/// The firewall's answer to a state store that cannot be read at start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WhenStateLost {
    /// Failsafe and established traffic only; new inbound and forwarded traffic dropped.
    #[default]
    Isolate,
    /// No rules until the manager sends a rule set.
    Open,
}

/// `"tcp/22"` -> (protocol, port).
pub fn parse_failsafe(s: &str) -> Option<(crate::firewall::render::FailsafeProto, u16)> {
    use crate::firewall::render::FailsafeProto;
    let (proto, port) = s.split_once('/')?;
    let proto = match proto {
        "tcp" => FailsafeProto::Tcp,
        "udp" => FailsafeProto::Udp,
        _ => return None,
    };
    let port: u16 = port.parse().ok().filter(|p| *p > 0)?;
    Some((proto, port))
}

/// The type of the host queue (`x-queue-type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QueueType {
    /// Replicated over a cluster's nodes (Raft): survives a node.
    Quorum,
    /// On one node.
    Classic,
}

/// Where each round of connection attempts starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum UrlOrder {
    /// A place in the list chosen by the host id: a fleet with one list spreads over a
    /// cluster's nodes.
    #[default]
    Spread,
    /// Always the first URL: a preferred node.
    Listed,
}

impl QueueType {
    /// As the broker spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            QueueType::Quorum => "quorum",
            QueueType::Classic => "classic",
        }
    }
}

/// How the agent logs in to the broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AuthMechanism {
    /// SASL EXTERNAL: the broker takes the user name from the client certificate.
    External,
    /// SASL PLAIN with `username` and `password_file`, for brokers without the plugin.
    Plain,
}

/// `[broker]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BrokerConfig {
    /// `amqps://host:port/vhost`, tried in turn.
    pub urls: Vec<String>,
    /// The CA bundle the brokers' certificates must chain to.
    pub ca_file: PathBuf,
    /// The agent's certificate (chain), PEM.
    pub cert_file: PathBuf,
    /// Its private key, PEM.
    pub key_file: PathBuf,
    /// Name the broker's certificate must carry; defaults to each URL's host.
    pub server_name: Option<String>,
    /// The AMQP heartbeat and the heartbeat events' period.
    #[serde(default = "default_heartbeat_secs")]
    pub heartbeat_secs: u16,
    /// The host queue's type.
    #[serde(default = "default_queue_type")]
    pub queue_type: QueueType,
    /// The host queue's `x-message-ttl`.
    #[serde(default = "default_message_ttl_ms")]
    pub message_ttl_ms: u32,
    /// Broker users whose commands are accepted (the AMQP `user_id` the broker checked).
    #[serde(default = "default_trusted_senders")]
    pub trusted_senders: Vec<String>,
    /// Unacknowledged deliveries the broker may push ahead of the one in hand.
    #[serde(default = "default_prefetch")]
    pub prefetch: u16,
    /// Where each round of connection attempts starts: `spread` (a place in `urls` chosen
    /// by the host id, so a fleet with one list spreads over a cluster's nodes) or
    /// `listed` (always the first URL: a preferred node).
    #[serde(default)]
    pub url_order: UrlOrder,
    /// The first reconnect backoff's ceiling.
    #[serde(default = "default_backoff_initial_ms")]
    pub backoff_initial_ms: u64,
    /// The largest.
    #[serde(default = "default_backoff_max_ms")]
    pub backoff_max_ms: u64,
    /// One connection attempt, TCP to AMQP open.
    #[serde(default = "default_connect_timeout_secs")]
    pub connect_timeout_secs: u64,
    /// Certificate login (`external`) or user and password (`plain`).
    #[serde(default = "default_auth")]
    pub auth: AuthMechanism,
    /// The user, for `plain` only.
    pub username: Option<String>,
    /// The file holding the password, for `plain` only.
    pub password_file: Option<PathBuf>,
    /// A `cert.<host>` event warns once a day when the agent's certificate expires within
    /// this many days.
    #[serde(default = "default_cert_warn_days")]
    pub cert_warn_days: u32,
}

/// `[commands]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CommandsConfig {
    /// Larger bodies are rejected (`too_large`).
    #[serde(default = "default_max_body_bytes")]
    pub max_body_bytes: usize,
    /// Ed25519 public keys (PEM, SubjectPublicKeyInfo); when any is set, commands must be signed.
    #[serde(default)]
    pub signing_keys: Vec<PathBuf>,
    /// How many processed command ids (with their acks) are kept for deduplication.
    #[serde(default = "default_dedup_keep")]
    pub dedup_keep: usize,
    /// Commands whose `timestamp` is older than this are rejected (`bad_timestamp`); at least
    /// the queue's message TTL, so that nothing the broker still holds is refused for age.
    #[serde(default = "default_max_age_ms")]
    pub max_age_ms: u64,
    /// Bytes of command bodies the broker may push ahead of the one in hand (prefetch is
    /// derived from it and `max_body_bytes`: RabbitMQ has no byte-based prefetch).
    #[serde(default = "default_max_buffered_bytes")]
    pub max_buffered_bytes: usize,
}

impl Default for CommandsConfig {
    fn default() -> Self {
        CommandsConfig {
            max_body_bytes: default_max_body_bytes(),
            signing_keys: Vec::new(),
            dedup_keep: default_dedup_keep(),
            max_age_ms: default_max_age_ms(),
            max_buffered_bytes: default_max_buffered_bytes(),
        }
    }
}

/// `[control]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControlConfig {
    /// The control socket's path.
    #[serde(default = "default_socket")]
    pub socket: PathBuf,
}

impl Default for ControlConfig {
    fn default() -> Self {
        ControlConfig {
            socket: default_socket(),
        }
    }
}

pub use crate::logs::LogFormat;

/// `[log]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// A tracing filter: `info`, `info,rampart::dispatch=debug`.
    #[serde(default = "default_log_level")]
    pub level: String,
    /// `text` or `json`.
    #[serde(default = "default_log_format")]
    pub format: LogFormat,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            level: default_log_level(),
            format: default_log_format(),
        }
    }
}

/// `[manager]`: read by `rampart send` only.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct ManagerConfig {
    /// `source` of the commands this manager sends; defaults to the certificate's CN.
    pub name: Option<String>,
    /// Ed25519 private key (PKCS#8 PEM) used to sign command bodies.
    pub signing_key: Option<PathBuf>,
}

fn default_state_dir() -> PathBuf {
    PathBuf::from("/var/lib/rampart")
}
fn default_heartbeat_secs() -> u16 {
    30
}
fn default_queue_type() -> QueueType {
    QueueType::Quorum
}
fn default_message_ttl_ms() -> u32 {
    7_200_000
}
fn default_trusted_senders() -> Vec<String> {
    vec!["manager".to_string()]
}
fn default_prefetch() -> u16 {
    32
}
fn default_backoff_initial_ms() -> u64 {
    100
}
fn default_cert_warn_days() -> u32 {
    14
}

fn default_backoff_max_ms() -> u64 {
    30_000
}
fn default_connect_timeout_secs() -> u64 {
    10
}
fn default_auth() -> AuthMechanism {
    AuthMechanism::External
}
fn default_max_body_bytes() -> usize {
    16 * 1024 * 1024
}
fn default_max_age_ms() -> u64 {
    7_500_000
}
fn default_max_buffered_bytes() -> usize {
    64 * 1024 * 1024
}
fn default_dedup_keep() -> usize {
    10_000
}
/// Where the daemon listens unless `control.socket` says otherwise.
pub const DEFAULT_SOCKET: &str = "/run/rampart/rampart.sock";

fn default_socket() -> PathBuf {
    PathBuf::from(DEFAULT_SOCKET)
}
fn default_log_level() -> String {
    "info".to_string()
}
fn default_log_format() -> LogFormat {
    LogFormat::Text
}

impl Config {
    /// The prefetch the session asks for: the configured count, lowered so that the bodies
    /// the broker may push ahead fit in `commands.max_buffered_bytes`.
    pub fn effective_prefetch(&self) -> u16 {
        let by_bytes = self.commands.max_buffered_bytes / self.commands.max_body_bytes.max(1);
        let by_bytes = u16::try_from(by_bytes).unwrap_or(u16::MAX).max(1);
        self.broker.prefetch.min(by_bytes)
    }
}

impl BrokerConfig {
    /// The `[broker]` section's own rules.
    fn validate(&self) -> Result<(), ConfigError> {
        let b = self;
        if b.urls.is_empty() {
            return Err(invalid(
                "broker.urls",
                "at least one broker URL is required",
            ));
        }
        for url in &b.urls {
            parse_url(url, b).map_err(|e| invalid("broker.urls", e.to_string()))?;
        }
        if b.heartbeat_secs == 0 {
            return Err(invalid("broker.heartbeat_secs", "must be at least 1"));
        }
        if b.prefetch == 0 {
            return Err(invalid("broker.prefetch", "must be at least 1"));
        }
        if b.trusted_senders.is_empty() {
            return Err(invalid(
                "broker.trusted_senders",
                "at least one trusted sender is required",
            ));
        }
        if b.backoff_initial_ms == 0 || b.backoff_max_ms < b.backoff_initial_ms {
            return Err(invalid(
                "broker.backoff_max_ms",
                "backoff_initial_ms must be > 0 and <= backoff_max_ms",
            ));
        }
        if b.auth == AuthMechanism::Plain && (b.username.is_none() || b.password_file.is_none()) {
            return Err(invalid(
                "broker.auth",
                "auth = \"plain\" needs broker.username and broker.password_file",
            ));
        }
        Ok(())
    }
}

impl BrokerConfig {
    /// Whether a reload from `self` to `new` needs a new session (anything but the trusted
    /// senders, which apply to the next command).
    pub fn needs_reconnect(&self, new: &BrokerConfig) -> bool {
        let mut a = self.clone();
        a.trusted_senders = new.trusted_senders.clone();
        a != *new
    }
}

impl Config {
    /// Reads, parses and validates the file at `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|cause| ConfigError::Read {
            path: path.to_path_buf(),
            cause,
        })?;
        let config = Config::parse(&text).map_err(|e| match e {
            ConfigError::Parse { message, .. } => ConfigError::Parse {
                path: path.to_path_buf(),
                message,
            },
            other => other,
        })?;
        Ok(config)
    }

    /// A configuration from TOML text, validated.
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: PathBuf::new(),
            message: e.to_string().trim().replace('\n', " "),
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Every check a file must pass beyond its syntax.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if let Some(id) = &self.host_id
            && !is_valid_host_id(id)
        {
            return Err(invalid(
                "host_id",
                format!("{id:?} does not match ^[a-z0-9][a-z0-9._-]{{0,62}}$"),
            ));
        }
        self.broker.validate()?;
        if self.commands.dedup_keep < 10_000 {
            return Err(invalid(
                "commands.dedup_keep",
                "the contract requires keeping at least 10000 command ids",
            ));
        }
        if self.commands.max_body_bytes == 0 {
            return Err(invalid("commands.max_body_bytes", "must be at least 1"));
        }
        if self.commands.max_age_ms < u64::from(self.broker.message_ttl_ms) {
            return Err(invalid(
                "commands.max_age_ms",
                "must be at least broker.message_ttl_ms, or queued commands expire as bad_timestamp",
            ));
        }
        if self.commands.max_buffered_bytes < self.commands.max_body_bytes {
            return Err(invalid(
                "commands.max_buffered_bytes",
                "must be at least commands.max_body_bytes (one body must fit)",
            ));
        }
        if self.firewall.max_rule_expansion == 0 {
            return Err(invalid("firewall.max_rule_expansion", "must be at least 1"));
        }
        let f = &self.firewall;
        let t = f.table.as_bytes();
        if t.is_empty()
            || t.len() > 32
            || !t[0].is_ascii_lowercase()
            || !t
                .iter()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'_')
        {
            return Err(invalid(
                "firewall.table",
                "must match ^[a-z][a-z0-9_]{0,31}$",
            ));
        }
        for (key, list) in [
            ("firewall.failsafe_in", &f.failsafe_in),
            ("firewall.failsafe_out", &f.failsafe_out),
        ] {
            if let Some(bad) = list.iter().find(|s| parse_failsafe(s).is_none()) {
                return Err(invalid(key, format!("{bad:?} is not tcp/PORT or udp/PORT")));
            }
        }
        if f.drift_check_secs == 0 {
            return Err(invalid("firewall.drift_check_secs", "must be at least 1"));
        }
        tracing_subscriber::EnvFilter::try_new(&self.log.level)
            .map_err(|e| invalid("log.level", e.to_string()))?;
        Ok(())
    }
}

/// A broker URL that cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("broker URL {url}: {message}")]
pub struct UrlError {
    /// The URL, its password hidden.
    pub url: String,
    /// What is wrong with it.
    pub message: String,
}

/// A broker URL as configured, parsed, with the password (if any) hidden when displayed.
#[derive(Debug, Clone)]
pub struct BrokerUrl {
    /// The parsed URL.
    pub uri: AMQPUri,
    /// The URL to show (logs, status), its password hidden.
    pub display: String,
}

/// Parses one `amqps://` URL; plaintext AMQP is refused: credentials and commands never
/// travel in the clear.
pub fn parse_url(url: &str, cfg: &BrokerConfig) -> Result<BrokerUrl, UrlError> {
    let err = |message: &str| UrlError {
        url: url.to_string(),
        message: message.to_string(),
    };
    let mut uri: AMQPUri = url.parse().map_err(|e: String| err(&e))?;
    if uri.scheme != AMQPScheme::AMQPS {
        return Err(err("only amqps:// (TLS) URLs are allowed"));
    }
    if uri.authority.host.is_empty() {
        return Err(err("no host"));
    }
    uri.query.heartbeat = Some(cfg.heartbeat_secs);
    // Unless the URL asks otherwise: see FRAME_MAX.
    uri.query.frame_max = uri.query.frame_max.or(Some(FRAME_MAX));
    uri.query.auth_mechanism = Some(match cfg.auth {
        AuthMechanism::External => SASLMechanism::External,
        AuthMechanism::Plain => SASLMechanism::Plain,
    });
    let display = format!(
        "amqps://{}:{}/{}",
        uri.authority.host,
        uri.authority.port,
        urlencode_vhost(&uri.vhost)
    );
    Ok(BrokerUrl { uri, display })
}

fn urlencode_vhost(vhost: &str) -> String {
    vhost.replace('%', "%25").replace('/', "%2f")
}

/// The largest AMQP frame we propose (the broker may lower it). lapin keeps a send and a
/// receive ring of 32 frames each, zero-filled when the session opens: at RabbitMQ's default
/// 128 KiB that is 8 MiB resident per agent, most of an idle agent's private memory; at
/// 16 KiB it is 1 MiB. Bodies are split into more frames instead (a 16 MiB body: 1 024), a
/// cost the firewall benchmark does not see.
pub const FRAME_MAX: u32 = 16 * 1024;

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
        [broker]
        urls = ["amqps://broker.example:5671/%2f"]
        ca_file = "/etc/rampart/ca.pem"
        cert_file = "/etc/rampart/host.pem"
        key_file = "/etc/rampart/host.key"
    "#;

    #[test]
    fn minimal_config_gets_contract_defaults() {
        let c = Config::parse(MINIMAL).unwrap();
        assert_eq!(c.broker.heartbeat_secs, 30);
        assert_eq!(c.broker.queue_type, QueueType::Quorum);
        assert_eq!(c.broker.message_ttl_ms, 7_200_000);
        assert_eq!(c.broker.trusted_senders, vec!["manager"]);
        assert_eq!(c.commands.max_body_bytes, 16 * 1024 * 1024);
        assert_eq!(c.state_dir, PathBuf::from("/var/lib/rampart"));
        assert_eq!(c.broker.auth, AuthMechanism::External);
    }

    #[test]
    fn unknown_key_is_named_in_the_error() {
        let text = format!("{MINIMAL}\nheartbeat = 5\n");
        let err = Config::parse(&text).unwrap_err().to_string();
        assert!(err.contains("heartbeat"), "{err}");
        let text = MINIMAL.replace("[broker]", "[broker]\nretry_ms = 5");
        let err = Config::parse(&text).unwrap_err().to_string();
        assert!(err.contains("retry_ms"), "{err}");
    }

    #[test]
    fn plaintext_urls_are_refused() {
        let text = MINIMAL.replace("amqps://", "amqp://");
        let err = Config::parse(&text).unwrap_err().to_string();
        assert!(err.contains("amqps"), "{err}");
    }

    #[test]
    fn bad_host_id_is_refused() {
        let text = format!("host_id = \"Host_1\"\n{MINIMAL}");
        assert!(Config::parse(&text).is_err());
    }

    #[test]
    fn the_packaged_example_is_valid() {
        let c = Config::parse(include_str!("../packaging/rampart.toml.example")).unwrap();
        assert_eq!(c.firewall.when_state_lost, WhenStateLost::Isolate);
        assert_eq!(c.commands.max_age_ms, 7_500_000);
    }

    #[test]
    fn prefetch_is_bounded_by_bytes() {
        let c = Config::parse(MINIMAL).unwrap();
        // 64 MiB of 16 MiB bodies: four ahead, not 32 (512 MiB).
        assert_eq!(c.effective_prefetch(), 4);
        let text = format!("{MINIMAL}\n[commands]\nmax_body_bytes = 65536\n");
        assert_eq!(Config::parse(&text).unwrap().effective_prefetch(), 32);
        let text = format!("{MINIMAL}\n[commands]\nmax_buffered_bytes = 1000\n");
        assert!(Config::parse(&text).is_err());
    }

    #[test]
    fn replay_window_covers_the_queue_ttl() {
        let c = Config::parse(MINIMAL).unwrap();
        assert_eq!(c.commands.max_age_ms, 7_500_000);
        let text = format!("{MINIMAL}\n[commands]\nmax_age_ms = 60000\n");
        let err = Config::parse(&text).unwrap_err().to_string();
        assert!(err.contains("max_age_ms"), "{err}");
    }

    #[test]
    fn plain_auth_needs_credentials() {
        let text = MINIMAL.replace("[broker]", "[broker]\nauth = \"plain\"");
        let err = Config::parse(&text).unwrap_err().to_string();
        assert!(err.contains("password_file"), "{err}");
    }

    #[test]
    fn urls_carry_heartbeat_and_external_auth() {
        let u = parse_url(
            "amqps://user:secret@b.example:5671/%2f",
            &Config::parse(MINIMAL).unwrap().broker,
        )
        .unwrap();
        assert_eq!(u.uri.query.heartbeat, Some(30));
        assert_eq!(u.uri.query.frame_max, Some(FRAME_MAX));
        assert_eq!(u.uri.query.auth_mechanism, Some(SASLMechanism::External));
        assert!(!u.display.contains("secret"));
        assert!(
            parse_url(
                "amqp://b.example/%2f",
                &Config::parse(MINIMAL).unwrap().broker
            )
            .is_err()
        );
    }
}
