//! The local control socket: inspection requests from the CLI (`rampart rules`, ...), one
//! JSON request line in, one JSON answer line out. Only root and the agent's own user may
//! talk to it (mode 0660 and a peer-credential check).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

use crate::firewall::Firewall;
use crate::session::SessionStatus;

/// Every way a request to the control socket fails, as the CLI reports it.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The socket could not be bound, reached, read or written.
    #[error("control socket {path}: {cause}")]
    Io {
        /// The socket.
        path: PathBuf,
        /// Why.
        cause: std::io::Error,
    },
    /// The answer did not parse.
    #[error("the daemon answered something that is not JSON: {0}")]
    BadAnswer(String),
    /// The daemon answered with an error.
    #[error("the daemon refused the request: {0}")]
    Refused(String),
}

/// One request line: `{"request": "rules"}` and so on.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "request", rename_all = "snake_case")]
pub enum Request {
    /// The rule set in force with its counters ([`RulesAnswer`]).
    Rules,
    /// The daemon's status ([`Status`]).
    Status,
    /// The routers as the kernel has them ([`RoutersAnswer`]).
    Routers,
}

/// The answer to `{"request": "status"}`: what `rampart status` prints (and, with
/// `--json`, what scripts read), made by the daemon and read by the CLI as this one type.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    /// The host id.
    pub host: String,
    /// The agent's version.
    pub version: String,
    /// The daemon's process id.
    pub pid: u32,
    /// Seconds since the daemon started.
    pub uptime_secs: u64,
    /// The broker session.
    pub session: SessionStatus,
    /// The rule set in force: generation and sizes.
    pub firewall: crate::firewall::spec::Counts,
    /// Each router and its state.
    pub routers: Vec<crate::router::Summary>,
    /// The TLS identity in use.
    pub certificate: crate::certs::Summary,
    /// Commands answered, by ack status (duplicates counted apart).
    pub commands: std::collections::BTreeMap<String, u64>,
    /// Command ids in the deduplication store (`None`: it could not be read).
    pub dedup_records: Option<u64>,
    /// Settings a reload changed that take effect at the next restart.
    pub pending_restart: Vec<String>,
    /// Set when the stored state could not be read at start, until a full rule set.
    pub state_lost: Option<Value>,
}

/// What the daemon shares with the control socket.
pub struct Shared {
    /// The firewall (its lock is the firewall commands' lock).
    pub firewall: Arc<tokio::sync::Mutex<Firewall>>,
    /// The routers (their lock is the router commands' lock).
    pub routers: Arc<tokio::sync::Mutex<crate::router::Routers>>,
    /// The store, for the number of records.
    pub store: Arc<crate::state::Store>,
    /// The host id.
    pub host_id: String,
    /// When the daemon started (ms since the epoch).
    pub started_ms: u64,
    /// The TLS identity in use (replaced by a rotation).
    pub identity: Arc<std::sync::RwLock<crate::certs::Current>>,
    /// The session actor's state as it changes.
    pub session: tokio::sync::watch::Receiver<SessionStatus>,
    /// Commands answered, by ack status (duplicates counted apart).
    pub commands: std::sync::Mutex<std::collections::BTreeMap<String, u64>>,
    /// Settings changed by a reload that take effect only at the next restart.
    pub pending_restart: std::sync::Mutex<Vec<&'static str>>,
    /// Set when the stored state could not be read at start, until a full rule set.
    pub state_lost: Arc<std::sync::Mutex<Option<Value>>>,
}

/// Binds the socket (replacing a stale one) and serves it until the process ends.
pub fn serve(path: &Path, shared: Arc<Shared>) -> Result<(), ControlError> {
    let io = |cause| ControlError::Io {
        path: path.to_path_buf(),
        cause,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path).map_err(io)?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660)).map_err(io)?;
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let shared = shared.clone();
            tokio::spawn(async move {
                if let Err(e) = answer(stream, &shared).await {
                    tracing::debug!(error = %e, "control connection ended");
                }
            });
        }
    });
    Ok(())
}

fn allowed(stream: &UnixStream) -> bool {
    match stream.peer_cred() {
        Ok(cred) => cred.uid() == 0 || cred.uid() == nix::unistd::geteuid().as_raw(),
        Err(_) => false,
    }
}

async fn answer(stream: UnixStream, shared: &Shared) -> std::io::Result<()> {
    let ok = allowed(&stream);
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    BufReader::new(read.take(64 * 1024))
        .read_line(&mut line)
        .await?;
    let reply = if !ok {
        json!({"error": "permission denied: only root or the agent's user may ask"})
    } else {
        match serde_json::from_str::<Request>(&line) {
            Err(e) => json!({"error": format!("bad request: {e}")}),
            Ok(Request::Rules) => rules(shared).await,
            Ok(Request::Status) => {
                serde_json::to_value(status(shared).await).expect("the status serialises")
            }
            Ok(Request::Routers) => {
                let routers = shared.routers.lock().await.inspect().await;
                serde_json::to_value(RoutersAnswer { routers }).expect("the routers serialise")
            }
        }
    };
    let mut bytes = serde_json::to_vec(&reply).expect("JSON serialises");
    bytes.push(b'\n');
    write.write_all(&bytes).await
}

use tokio::io::AsyncReadExt;

/// Packets and bytes per rule id, summed over the rule's nft lines.
fn counters(live: &Value) -> std::collections::HashMap<String, (u64, u64)> {
    let mut out = std::collections::HashMap::new();
    let Some(items) = live["nftables"].as_array() else {
        return out;
    };
    for item in items {
        let rule = &item["rule"];
        let Some(id) = rule["comment"].as_str() else {
            continue;
        };
        let Some(exprs) = rule["expr"].as_array() else {
            continue;
        };
        for e in exprs {
            if let Some(c) = e.get("counter") {
                let entry = out.entry(id.to_string()).or_insert((0, 0));
                entry.0 += c["packets"].as_u64().unwrap_or(0);
                entry.1 += c["bytes"].as_u64().unwrap_or(0);
            }
        }
    }
    out
}

async fn rules(shared: &Shared) -> Value {
    let fw = shared.firewall.lock().await;
    let live = match fw.live().await {
        Ok(v) => v,
        Err(e) => return json!({"error": e.to_string()}),
    };
    let counts = live.as_ref().map(counters).unwrap_or_default();
    let answer = RulesAnswer::of(
        fw.table(),
        live.is_some(),
        fw.applied_at_ms,
        fw.current(),
        &counts,
    );
    serde_json::to_value(answer).expect("the rules serialise")
}

/// The `routers` answer.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RoutersAnswer {
    /// Each router as recorded and as the kernel has it.
    pub routers: Vec<crate::router::View>,
}

/// The `rules` answer: the rule set in force, rules in evaluation order with their counts.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RulesAnswer {
    /// The agent's nftables table (`inet <table>`).
    pub table: String,
    /// Whether the table is in the kernel.
    pub in_kernel: bool,
    /// The rule set's generation.
    pub generation: u64,
    /// When the rule set was applied (`None`: restored at start).
    pub applied_at_ms: Option<u64>,
    /// The default policies.
    pub defaults: DefaultsShown,
    /// Elements per address set.
    pub address_sets: std::collections::BTreeMap<String, usize>,
    /// The rules, in evaluation order.
    pub rules: Vec<RuleShown>,
}

/// The default policies, as the contract spells them.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DefaultsShown {
    /// For traffic to the host (`in`).
    #[serde(rename = "in")]
    pub input: String,
    /// For traffic from the host.
    pub out: String,
    /// For traffic through the host (to and from workloads).
    pub forward: String,
}

/// One rule as the contract spells it, with its counters.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RuleShown {
    /// The rule, as sent.
    #[serde(flatten)]
    pub rule: crate::firewall::spec::WireRule,
    /// Packets it matched since it was applied.
    pub packets: u64,
    /// Bytes it matched since it was applied.
    pub bytes: u64,
}

impl RulesAnswer {
    fn of(
        table: &str,
        in_kernel: bool,
        applied_at_ms: Option<u64>,
        rs: &crate::firewall::spec::RuleSet,
        counts: &std::collections::HashMap<String, (u64, u64)>,
    ) -> RulesAnswer {
        let mut rules: Vec<&crate::firewall::spec::Rule> = rs.rules.values().collect();
        rules.sort_by_key(|r| r.key());
        let rules = rules
            .into_iter()
            .map(|r| {
                let (packets, bytes) = counts.get(&r.id).copied().unwrap_or((0, 0));
                RuleShown {
                    rule: r.wire(),
                    packets,
                    bytes,
                }
            })
            .collect();
        RulesAnswer {
            table: table.to_string(),
            in_kernel,
            generation: rs.generation,
            applied_at_ms,
            defaults: DefaultsShown {
                input: rs.defaults.input.as_str().to_string(),
                out: rs.defaults.output.as_str().to_string(),
                forward: rs.defaults.forward.as_str().to_string(),
            },
            address_sets: rs.sets.iter().map(|(k, v)| (k.clone(), v.len())).collect(),
            rules,
        }
    }
}

async fn status(shared: &Shared) -> Status {
    let store = shared.store.clone();
    let dedup_records = tokio::task::spawn_blocking(move || store.processed_count())
        .await
        .ok()
        .and_then(Result::ok);
    let firewall = shared.firewall.lock().await.current().counts();
    let routers = shared.routers.lock().await.summary();
    let now = crate::ids::now_ms();
    // No await below: the std locks are held only while the answer is put together.
    Status {
        host: shared.host_id.clone(),
        version: crate::logs::VERSION.to_string(),
        pid: std::process::id(),
        uptime_secs: now.saturating_sub(shared.started_ms) / 1000,
        session: shared.session.borrow().clone(),
        firewall,
        routers,
        certificate: shared.identity.read().expect("identity lock").summary(),
        commands: shared.commands.lock().expect("commands lock").clone(),
        dedup_records,
        pending_restart: (shared.pending_restart.lock().expect("pending lock"))
            .iter()
            .map(|s| s.to_string())
            .collect(),
        state_lost: shared.state_lost.lock().expect("state_lost lock").clone(),
    }
}

/// Client side: one request, one answer.
pub async fn ask(path: &Path, request: &Request) -> Result<Value, ControlError> {
    let io = |cause| ControlError::Io {
        path: path.to_path_buf(),
        cause,
    };
    let stream = UnixStream::connect(path).await.map_err(io)?;
    let (read, mut write) = stream.into_split();
    let mut line = serde_json::to_vec(request).expect("JSON serialises");
    line.push(b'\n');
    write.write_all(&line).await.map_err(io)?;
    let mut answer = String::new();
    BufReader::new(read)
        .read_line(&mut answer)
        .await
        .map_err(io)?;
    let v: Value =
        serde_json::from_str(&answer).map_err(|_| ControlError::BadAnswer(answer.clone()))?;
    if let Some(e) = v.get("error").and_then(Value::as_str) {
        return Err(ControlError::Refused(e.to_string()));
    }
    Ok(v)
}

#[cfg(test)]
mod session_tests {
    use super::*;
    use crate::session::SessionState;

    #[test]
    fn the_rules_answer_keeps_its_json() {
        let rs = crate::protocol::decode_stored_rule_set(
            br#"{"generation": 7, "defaults": {"in": "drop", "out": "allow", "forward": "drop"},
                "address_sets": {"web": ["10.0.1.0/24", "2001:db8::/64"]},
                "rules": [
                  {"id": "b", "priority": 20, "action": "drop", "direction": "out",
                   "protocol": "udp", "destinations": ["$web"], "ports": ["53"],
                   "log": true, "comment": "dns"},
                  {"id": "a", "priority": 10, "action": "allow", "direction": "in",
                   "protocol": "tcp", "sources": ["192.0.2.0/24"], "ports": ["22", "80-81"],
                   "applied_to": ["tap0"], "disabled": true}]}"#,
        )
        .unwrap();
        let counts = std::collections::HashMap::from([("a".to_string(), (3, 180))]);
        let answer = RulesAnswer::of("rampart", true, Some(1_700), &rs, &counts);
        assert_eq!(
            serde_json::to_value(&answer).unwrap(),
            json!({"table": "rampart", "in_kernel": true, "generation": 7, "applied_at_ms": 1700,
                "defaults": {"in": "drop", "out": "allow", "forward": "drop"},
                "address_sets": {"web": 2},
                "rules": [
                  {"id": "a", "priority": 10, "action": "allow", "direction": "in",
                   "protocol": "tcp", "sources": ["192.0.2.0/24"], "destinations": [],
                   "ports": ["22", "80-81"], "applied_to": ["tap0"], "log": false,
                   "disabled": true, "comment": "", "packets": 3, "bytes": 180},
                  {"id": "b", "priority": 20, "action": "drop", "direction": "out",
                   "protocol": "udp", "sources": [], "destinations": ["$web"],
                   "ports": ["53"], "applied_to": [], "log": true, "disabled": false,
                   "comment": "dns", "packets": 0, "bytes": 0}]})
        );
        let unapplied = RulesAnswer::of("rampart", false, None, &rs, &Default::default());
        assert_eq!(
            serde_json::to_value(&unapplied).unwrap()["applied_at_ms"],
            Value::Null
        );
        // And the CLI reads it back as it was.
        let read: RulesAnswer =
            serde_json::from_value(serde_json::to_value(&answer).unwrap()).unwrap();
        assert_eq!(read, answer);
    }

    #[test]
    fn the_status_answer_reads_back_as_the_cli_reads_it() {
        let status = Status {
            host: "h1".into(),
            version: "1.2.3".into(),
            pid: 42,
            uptime_secs: 7,
            session: SessionStatus {
                state: SessionState::Connected,
                broker_port: Some(5671),
                last_blocked: Some((1, 2)),
                broker_missing: vec!["rampart.events".into()],
                ..Default::default()
            },
            firewall: crate::firewall::spec::Counts {
                generation: 3,
                rules: 2,
                address_sets: 1,
                elements: 5,
            },
            routers: vec![crate::router::Summary {
                id: "r1".into(),
                interfaces: vec!["r1-a".into()],
                state: crate::router::RouterState::Degraded,
            }],
            certificate: crate::certs::Summary {
                subject: "CN=h1".into(),
                serial: "01".into(),
                not_after: "2027-01-01T00:00:00Z".into(),
                sha256: "ab".into(),
                days_left: -1,
            },
            commands: [("applied".to_string(), 4)].into(),
            dedup_records: None,
            pending_restart: vec!["broker.urls".into()],
            state_lost: Some(json!({"at": 1, "firewall": "isolated", "error": "e"})),
        };
        let v = serde_json::to_value(&status).unwrap();
        assert_eq!(v["routers"][0]["state"], "degraded");
        assert_eq!(v["session"]["last_blocked"], json!([1, 2]));
        assert!(v["dedup_records"].is_null());
        assert_eq!(serde_json::from_value::<Status>(v).unwrap(), status);
    }

    #[test]
    fn the_session_state_reads_as_before_on_the_socket() {
        let mut st = SessionStatus::default();
        let v = serde_json::to_value(&st).unwrap();
        assert_eq!(v["state"], "connecting");
        assert!(v["url"].is_null() && v["sessions"] == 0, "{v}");
        st.state = SessionState::Connected;
        assert_eq!(serde_json::to_value(&st).unwrap()["state"], "connected");
        st.state = SessionState::Disconnected;
        assert_eq!(serde_json::to_value(&st).unwrap()["state"], "disconnected");
        for state in [
            SessionState::Connecting,
            SessionState::Connected,
            SessionState::Disconnected,
        ] {
            assert_eq!(serde_json::to_value(state).unwrap(), state.as_str());
        }
    }
}
