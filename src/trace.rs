//! `rampart trace`: live, which rule of the agent's table decided each packet of a flow, by
//! rule id and generation. A table of its own (`inet rampart_trace_<pid>`, so the agent's
//! drift check never sees it) marks the matching packets with `meta nftrace set 1` ahead of
//! every other chain; the kernel then reports each marked packet's walk through the rules,
//! and the verdict given in the agent's table is printed with the rule id the kernel rule
//! carries as its comment. The marking table is removed when the trace ends (and, if a
//! trace was killed, by the next one).

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::sys::hostview::HostView;
use crate::sys::nfrule;
use crate::sys::nft::Nft;
use crate::sys::nftrace::{TraceEvent, TraceKind, TraceSocket};

/// Which packets to trace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Filter {
    /// Packets from this address (either direction of its flows is traced).
    pub from: IpAddr,
    /// And to this one, if set.
    pub to: Option<IpAddr>,
    /// Destination port (TCP or UDP).
    pub port: Option<u16>,
}

const TABLE_PREFIX: &str = "rampart_trace_";

/// The marking table: every value is a parsed address or a number, so nothing in it comes
/// from free text.
pub fn marking_table(name: &str, f: &Filter) -> String {
    let kw = |a: &IpAddr| if a.is_ipv4() { "ip" } else { "ip6" };
    let mut m = format!("{} saddr {} ", kw(&f.from), f.from);
    if let Some(to) = &f.to {
        m += &format!("{} daddr {} ", kw(to), to);
    }
    if let Some(p) = f.port {
        m += &format!("meta l4proto {{ tcp, udp }} th dport {p} ");
    }
    let chain = |n: &str, hook: &str| {
        format!(
            "\tchain {n} {{\n\t\ttype filter hook {hook} priority -350; policy accept;\n\t\t{m}meta nftrace set 1\n\t}}\n"
        )
    };
    format!(
        "table inet {name} {{\n{}{}}}\n",
        chain("pre", "prerouting"),
        chain("out", "output")
    )
}

/// `30s`, `2m`, `500ms`, `1h`, or plain seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (n, unit) = s.split_at(split);
    let n: u64 = n
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 30s, 2m or 500ms"))?;
    Ok(match unit {
        "" | "s" => Duration::from_secs(n),
        "ms" => Duration::from_millis(n),
        "m" => Duration::from_secs(n * 60),
        "h" => Duration::from_secs(n * 3600),
        _ => return Err(format!("{s:?}: the unit must be ms, s, m or h")),
    })
}

/// What decided a packet in the agent's table, by (chain, rule handle).
#[derive(Default)]
struct Labels {
    by_handle: HashMap<(String, u64), String>,
}

/// The unnamed rules at the head of a base chain, in order (see `render::base_rules`).
const BASE_HEAD: [&str; 4] = [
    "established connection",
    "invalid packet",
    "loopback",
    "neighbour discovery",
];

impl Labels {
    fn read(table: &str) -> Labels {
        let mut l = Labels::default();
        let rules = match nfrule::list_rules(table, None) {
            Ok(r) => r,
            Err(error) => {
                eprintln!("rampart trace: the agent's table cannot be read: {error}");
                return l;
            }
        };
        let mut index: HashMap<String, usize> = HashMap::new();
        for r in rules {
            let i = index.entry(r.chain.clone()).or_default();
            let base = matches!(r.chain.as_str(), "input" | "output" | "forward");
            let label = match (&r.comment, base) {
                (Some(c), _) => c.clone(),
                (None, true) => BASE_HEAD.get(*i).unwrap_or(&"base rule").to_string(),
                (None, false) => "rule".to_string(),
            };
            *i += 1;
            l.by_handle.insert((r.chain, r.handle), label);
        }
        l
    }
}

/// The answer of the daemon's `rules` request: the table, the generation, each rule's
/// action.
struct Agent {
    table: String,
    generation: Option<u64>,
    actions: HashMap<String, String>,
}

impl Agent {
    fn from_rules(v: &Value) -> Agent {
        Agent {
            table: v["table"].as_str().unwrap_or("rampart").to_string(),
            generation: v["generation"].as_u64(),
            actions: v["rules"]
                .as_array()
                .map(|rs| {
                    rs.iter()
                        .filter_map(|r| {
                            Some((
                                r["id"].as_str()?.to_string(),
                                r["action"].as_str()?.to_string(),
                            ))
                        })
                        .collect()
                })
                .unwrap_or_default(),
        }
    }
}

/// One decided packet, as printed.
fn describe(e: &TraceEvent, label: &str, agent: &Agent, view: &HostView) -> Value {
    let verdict = match (e.kind, e.verdict) {
        (_, Some(1)) => "accept",
        (_, Some(0)) => "drop",
        _ => "other",
    };
    // A reject rule drops the packet after answering it.
    let verdict = match agent.actions.get(label).map(String::as_str) {
        Some("reject") if verdict == "drop" => "reject",
        _ => verdict,
    };
    let name = |i: Option<u32>| i.and_then(|i| view.name(i)).map(str::to_string);
    let proto = match e.headers.proto {
        Some(6) => "tcp".to_string(),
        Some(17) => "udp".to_string(),
        Some(1) => "icmp".to_string(),
        Some(58) => "icmpv6".to_string(),
        Some(p) => p.to_string(),
        None => "?".to_string(),
    };
    let rule = if e.kind == TraceKind::Policy {
        "policy".to_string()
    } else {
        label.to_string()
    };
    json!({
        "time_ms": crate::ids::now_ms(),
        "proto": proto,
        "src": e.headers.src.map(|a| a.to_string()),
        "sport": e.headers.sport,
        "dst": e.headers.dst.map(|a| a.to_string()),
        "dport": e.headers.dport,
        "iif": name(e.iif),
        "oif": name(e.oif),
        "chain": e.chain,
        "verdict": verdict,
        "rule": rule,
        "generation": agent.generation,
    })
}

/// One decided packet as a line of text (what `rampart trace` prints without `--json`).
pub fn line(v: &Value) -> String {
    let end = |a: &Value, p: &Value| match p.as_u64() {
        Some(p) => format!("{}:{p}", a.as_str().unwrap_or("?")),
        None => a.as_str().unwrap_or("?").to_string(),
    };
    let ifs = match (v["iif"].as_str(), v["oif"].as_str()) {
        (Some(i), Some(o)) => format!("in {i} out {o}"),
        (Some(i), None) => format!("in {i}"),
        (None, Some(o)) => format!("out {o}"),
        (None, None) => String::new(),
    };
    let generation = v["generation"]
        .as_u64()
        .map_or("generation unknown".to_string(), |g| {
            format!("generation {g}")
        });
    let ms = v["time_ms"].as_u64().unwrap_or(0);
    let t = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .map(|t| {
            format!(
                "{:02}:{:02}:{:02}.{:03}",
                t.hour(),
                t.minute(),
                t.second(),
                t.millisecond()
            )
        })
        .unwrap_or_default();
    format!(
        "{t}  {:<6} {} -> {}  {ifs}  {}: {} by {} ({generation})",
        v["proto"].as_str().unwrap_or("?"),
        end(&v["src"], &v["sport"]),
        end(&v["dst"], &v["dport"]),
        v["chain"].as_str().unwrap_or("?"),
        v["verdict"].as_str().unwrap_or("?"),
        match v["rule"].as_str() {
            Some("default") => "the default".to_string(),
            Some("policy") => "the chain's policy".to_string(),
            Some(r) if BASE_HEAD.contains(&r) || r.starts_with("failsafe") => r.to_string(),
            Some(r) => format!("rule {r}"),
            None => "?".to_string(),
        },
    )
}

/// Removes marking tables left by traces that were killed.
async fn remove_stale(nft: &Nft) {
    let Ok(out) = tokio::process::Command::new(&nft.path)
        .args(["list", "tables", "inet"])
        .output()
        .await
    else {
        return;
    };
    for l in String::from_utf8_lossy(&out.stdout).lines() {
        let Some(name) = l.trim().strip_prefix("table inet ") else {
            continue;
        };
        let Some(pid) = name.strip_prefix(TABLE_PREFIX) else {
            continue;
        };
        let alive = pid
            .parse::<u32>()
            .is_ok_and(|p| std::path::Path::new(&format!("/proc/{p}")).exists());
        if !alive {
            let _ = nft.apply(&format!("delete table inet {name}\n")).await;
        }
    }
}

/// What is traced, on stderr (the trace itself goes to stdout).
fn announce(filter: &Filter, table: &str, duration: Duration) {
    eprintln!(
        "tracing packets from {}{}{} through table inet {table} for {duration:?} (Ctrl-C stops)",
        filter.from,
        filter.to.map(|t| format!(" to {t}")).unwrap_or_default(),
        filter
            .port
            .map(|p| format!(" port {p}"))
            .unwrap_or_default(),
    );
}

/// Traces for `duration` (until Ctrl-C); prints one line (or JSON object) per decided
/// packet. `rules` is the daemon's answer to a `rules` request (`None`: no daemon).
pub async fn run(
    nft: &Nft,
    filter: &Filter,
    duration: Duration,
    json_lines: bool,
    rules: Option<Value>,
) -> anyhow::Result<i32> {
    let mut agent = rules
        .as_ref()
        .map(Agent::from_rules)
        .unwrap_or_else(|| Agent::from_rules(&json!({})));
    let view = crate::sys::hostview::read().await.unwrap_or_default();
    remove_stale(nft).await;
    let socket = Arc::new(TraceSocket::open()?);
    let name = format!("{TABLE_PREFIX}{}", std::process::id());
    nft.apply(&marking_table(&name, filter)).await?;
    let table = agent.table.clone();
    let mut labels = tokio::task::spawn_blocking(move || Labels::read(&table)).await?;
    announce(filter, &agent.table, duration);
    let deadline = Instant::now() + duration;
    let mut seen: HashSet<u32> = HashSet::new();
    let mut packets: HashMap<u32, (crate::sys::nftrace::Headers, Option<u32>, Option<u32>)> =
        HashMap::new();
    let result: anyhow::Result<()> = async {
        while Instant::now() < deadline {
            let s = socket.clone();
            let events = tokio::select! {
                r = tokio::task::spawn_blocking(move || s.next(Duration::from_millis(200))) => r??,
                _ = tokio::signal::ctrl_c() => break,
            };
            for mut e in events {
                // The kernel dumps the packet's headers and interfaces once per packet, in
                // its first event (often in the marking table): kept for the decision.
                if e.headers.src.is_some() {
                    if packets.len() > 100_000 {
                        packets.clear();
                    }
                    packets.insert(e.id, (e.headers.clone(), e.iif, e.oif));
                } else if let Some((h, iif, oif)) = packets.get(&e.id) {
                    (e.headers, e.iif, e.oif) = (h.clone(), *iif, *oif);
                }
                if e.table != agent.table || seen.contains(&e.id) {
                    continue;
                }
                let decided = matches!(
                    (e.kind, e.verdict),
                    (TraceKind::Rule, Some(0 | 1)) | (TraceKind::Policy, _)
                );
                if !decided {
                    continue;
                }
                let key = (e.chain.clone(), e.handle.unwrap_or(0));
                if e.kind == TraceKind::Rule && !labels.by_handle.contains_key(&key) {
                    // The rule set changed since the trace started.
                    let table = agent.table.clone();
                    labels = tokio::task::spawn_blocking(move || Labels::read(&table)).await?;
                    agent.generation = None;
                }
                let label = labels.by_handle.get(&key).map_or("rule", String::as_str);
                let v = describe(&e, label, &agent, &view);
                if json_lines {
                    println!("{v}");
                } else {
                    println!("{}", line(&v));
                }
                if seen.len() > 100_000 {
                    seen.clear();
                }
                seen.insert(e.id);
                packets.remove(&e.id);
            }
        }
        Ok(())
    }
    .await;
    let removed = nft.apply(&format!("delete table inet {name}\n")).await;
    result?;
    removed?;
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_marking_table_matches_only_what_was_asked() {
        let f = Filter {
            from: "10.0.0.2".parse().unwrap(),
            to: Some("10.0.0.1".parse().unwrap()),
            port: Some(22),
        };
        let t = marking_table("rampart_trace_1", &f);
        assert!(t.contains("ip saddr 10.0.0.2 ip daddr 10.0.0.1 meta l4proto { tcp, udp } th dport 22 meta nftrace set 1"), "{t}");
        assert!(
            t.contains("hook prerouting priority -350") && t.contains("hook output priority -350")
        );
        let v6 = Filter {
            from: "fd00::2".parse().unwrap(),
            to: None,
            port: None,
        };
        assert!(marking_table("x", &v6).contains("\t\tip6 saddr fd00::2 meta nftrace set 1"));
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("7"), Ok(Duration::from_secs(7)));
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("5d").is_err());
    }
}
