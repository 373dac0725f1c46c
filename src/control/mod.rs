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

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("control socket {path}: {cause}")]
    Io {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("the daemon answered something that is not JSON: {0}")]
    BadAnswer(String),
    #[error("the daemon refused the request: {0}")]
    Refused(String),
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "request", rename_all = "snake_case")]
pub enum Request {
    Rules,
    Status,
    Routers,
}

/// Where the broker session is (shown as `connecting`, `connected`, `disconnected`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SessionState {
    /// No session yet since the agent started.
    #[default]
    Connecting,
    Connected,
    /// Had one; lost or closed it, and is dialling again.
    Disconnected,
}

/// The broker session as the daemon last saw it.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SessionStatus {
    pub state: SessionState,
    pub url: Option<String>,
    pub broker_port: Option<u16>,
    pub tls_version: Option<String>,
    pub cipher: Option<String>,
    pub broker_certificate: Option<String>,
    pub broker_certificate_not_after: Option<String>,
    pub connected_since_ms: Option<u64>,
    pub last_heartbeat_ms: Option<u64>,
    pub sessions: u64,
    pub reconnects: u64,
    pub last_error: Option<String>,
    /// Since when the broker blocks this connection's publishes (a resource alarm).
    pub blocked_since_ms: Option<u64>,
    /// The last blocked spell: (from, to).
    pub last_blocked: Option<(u64, u64)>,
    /// Shared objects missing on the broker that the agent serves without (events,
    /// dead-lettering).
    pub broker_missing: Vec<String>,
}

/// What the daemon shares with the control socket.
pub struct Shared {
    pub firewall: Arc<tokio::sync::Mutex<Firewall>>,
    pub routers: Arc<tokio::sync::Mutex<crate::router::Routers>>,
    pub store: Arc<crate::state::Store>,
    pub host_id: String,
    pub started_ms: u64,
    pub identity: Arc<std::sync::RwLock<crate::certs::Current>>,
    pub session: std::sync::Mutex<SessionStatus>,
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
            Ok(Request::Status) => status(shared).await,
            Ok(Request::Routers) => json!({"routers": shared.routers.lock().await.inspect().await}),
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
    let rs = fw.current();
    let mut rules: Vec<&crate::firewall::spec::Rule> = rs.rules.values().collect();
    rules.sort_by_key(|r| r.key());
    let rules: Vec<Value> = rules
        .into_iter()
        .map(|r| {
            let mut v = r.to_json();
            let (p, b) = counts.get(&r.id).copied().unwrap_or((0, 0));
            v["packets"] = json!(p);
            v["bytes"] = json!(b);
            v
        })
        .collect();
    json!({
        "table": fw.table(),
        "in_kernel": live.is_some(),
        "generation": rs.generation,
        "applied_at_ms": fw.applied_at_ms,
        "defaults": {"in": rs.defaults.input.as_str(), "out": rs.defaults.output.as_str(), "forward": rs.defaults.forward.as_str()},
        "address_sets": rs.sets.iter().map(|(k, v)| (k.clone(), json!(v.len()))).collect::<serde_json::Map<_, _>>(),
        "rules": rules,
    })
}

async fn status(shared: &Shared) -> Value {
    let store = shared.store.clone();
    let dedup = tokio::task::spawn_blocking(move || store.processed_count())
        .await
        .ok()
        .and_then(Result::ok);
    let firewall = shared.firewall.lock().await.current().counts();
    let now = crate::ids::now_ms();
    json!({
        "host": shared.host_id,
        "version": crate::logs::VERSION,
        "pid": std::process::id(),
        "uptime_secs": now.saturating_sub(shared.started_ms) / 1000,
        "session": *shared.session.lock().expect("session lock"),
        "firewall": firewall,
        "routers": shared.routers.lock().await.summary(),
        "certificate": shared.identity.read().expect("identity lock").summary(),
        "commands": *shared.commands.lock().expect("commands lock"),
        "dedup_records": dedup,
        "pending_restart": *shared.pending_restart.lock().expect("pending lock"),
        "state_lost": *shared.state_lost.lock().expect("state_lost lock"),
    })
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
    }
}
