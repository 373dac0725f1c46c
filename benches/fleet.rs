//! The fleet (issue 11), a benchmark and not a test: N real agent processes (each its own
//! state directory, control socket, certificate, broker user and nftables table) against
//! one broker node and against a 3-node cluster. Each agent has a network namespace of its
//! own, as each would have its own host: its table sees only its kernel's packets and
//! events, its nft only its own table. A veth per namespace joins a bridge where the
//! brokers listen. For each N it prints:
//! - the time until all N are connected (their `state` events are in);
//! - a `firewall.apply`, a `firewall.patch` of addresses (netlink) and one of a rule (nft),
//!   each published to all N at once: per-host command-to-ack p50 / p99 and the time until
//!   every ack is in (N nft processes share this machine's cores, as N hosts would not);
//! - one broker node: a broker restart, the time until all N are back (their new `state`
//!   events), the peak rate of new sessions, then a push acked by all;
//!   the cluster: the node with the most sessions killed during a push, the time until all
//!   N acked, then a push acked by all;
//! - agent RSS and PSS (median, max) when idle, and the broker's RSS.
//!
//! Run it with `scripts/fleet.sh` (raises the open-file limit first). Settings:
//! `RAMPART_FLEET_SIZES` (default "100,500,1000"), `RAMPART_FLEET_TOPOLOGIES` (default
//! "node,cluster"). It stops growing N when the machine runs short (the reason is printed).

#[path = "../tests/e2e/support/mod.rs"]
#[allow(dead_code)]
mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Result, bail, ensure};
use futures_util::StreamExt;
use lapin::options::{
    BasicConsumeOptions, QueueBindOptions, QueueDeclareOptions, QueuePurgeOptions,
};
use lapin::types::FieldTable;
use rampart::broker::{ACKS_EXCHANGE, EVENTS_EXCHANGE};
use rampart::config::Config;
use rampart::ids::now_ms;
use rampart::manager::Manager;
use serde_json::{Value, json};
use support::broker::{Broker, Cluster};
use support::{AgentProc, HostOptions, env};

fn percentile(sorted: &[u64], p: f64) -> u64 {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// A durable queue of the bench's own: acks and state events are kept across broker
/// restarts and read at leisure; the timing comes from the agents' own timestamps.
struct Tap {
    queue: String,
    cfg: Config,
}

impl Tap {
    async fn declare(cfg: &Config, name: &str, exchange: &str, key: &str) -> Result<Tap> {
        let queue = format!("rampart.fleet.{name}");
        let m = Manager::connect(cfg).await?;
        let ch = m.channel().await?;
        let durable = QueueDeclareOptions {
            durable: true,
            ..Default::default()
        };
        // Quorum: on the cluster it outlives the node the bench kills.
        let mut args = FieldTable::default();
        args.insert(
            "x-queue-type".into(),
            lapin::types::AMQPValue::LongString("quorum".into()),
        );
        ch.queue_declare(queue.as_str().into(), durable, args)
            .await?;
        ch.queue_bind(
            queue.as_str().into(),
            exchange.into(),
            key.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
        ch.queue_purge(queue.as_str().into(), QueuePurgeOptions::default())
            .await?;
        m.close().await;
        Ok(Tap {
            queue,
            cfg: cfg.clone(),
        })
    }

    /// Reads messages until `done` says so (given every body so far) or `timeout`.
    async fn read_until(
        &self,
        timeout: Duration,
        mut done: impl FnMut(&Value) -> bool,
    ) -> Result<bool> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let attempt = async {
                let m = Manager::connect(&self.cfg).await?;
                let ch = m.channel().await?;
                ch.basic_qos(1000, Default::default()).await?;
                let mut c = ch
                    .basic_consume(
                        self.queue.as_str().into(),
                        "".into(),
                        BasicConsumeOptions {
                            no_ack: true,
                            ..Default::default()
                        },
                        FieldTable::default(),
                    )
                    .await?;
                loop {
                    let next = tokio::time::timeout_at(deadline, c.next()).await;
                    match next {
                        Err(_) => return Ok::<bool, anyhow::Error>(false),
                        Ok(Some(Ok(d))) => {
                            let v: Value = serde_json::from_slice(&d.data)?;
                            if done(&v) {
                                m.close().await;
                                return Ok(true);
                            }
                        }
                        Ok(_) => bail!("the tap's consumer ended"),
                    }
                }
            };
            match attempt.await {
                Ok(done) => return Ok(done),
                Err(e) if tokio::time::Instant::now() < deadline => {
                    eprintln!("fleet: tap {} lost ({e:#}), reading again", self.queue);
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Err(e) => return Err(e),
            }
        }
    }
}

/// Every host's user in one `import_definitions` (one rabbitmqctl call per host takes
/// about a second each), with the least privilege of PROTOCOL.md section 2.
fn define_users(broker: &Broker, ids: &[String], dir: &Path) {
    let mut users = vec![];
    let mut perms = vec![];
    let mut topics = vec![];
    for id in ids {
        let h = id.replace('.', r"\.");
        users.push(json!({"name": id, "password_hash": "", "tags": []}));
        perms.push(json!({"user": id, "vhost": "/",
            "configure": format!(r"^rampart\.host\.{h}$"),
            "write": format!(r"^(rampart\.host\.{h}|rampart\.acks|rampart\.events|rampart\.dead)$"),
            "read": format!(r"^(rampart\.host\.{h}|rampart\.commands)$")}));
        for (exchange, write, read) in [
            ("rampart.commands", "^$".to_string(), format!("^{h}$")),
            ("rampart.acks", format!("^{h}$"), "^$".to_string()),
            (
                "rampart.events",
                format!(r"^[a-z_]+\.{h}$"),
                "^$".to_string(),
            ),
        ] {
            topics.push(json!({"user": id, "vhost": "/", "exchange": exchange,
                "write": write, "read": read}));
        }
    }
    let defs = json!({"users": users, "permissions": perms, "topic_permissions": topics});
    let path = dir.join(format!("users-{}.json", ids.len()));
    std::fs::write(&path, defs.to_string()).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    broker.ctl_ok(&["import_definitions", path.to_str().unwrap()]);
}

/// VmRSS and Pss of a process, in KiB.
fn memory_kib(pid: i32) -> Option<(u64, u64)> {
    let field = |text: &str, name: &str| -> Option<u64> {
        let line = text.lines().find(|l| l.starts_with(name))?;
        line.split_whitespace().nth(1)?.parse().ok()
    };
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    Some((field(&status, "VmRSS:")?, field(&rollup, "Pss:")?))
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

fn available_mib() -> u64 {
    let text = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    text.lines()
        .find(|l| l.starts_with("MemAvailable:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        .unwrap_or(0)
        / 1024
}

struct Fleet {
    ids: Vec<String>,
    agents: Vec<AgentProc>,
    sockets: Vec<std::path::PathBuf>,
}

impl Fleet {
    /// Sessions per broker, as each agent's `rampart status` reports its broker's port.
    fn sessions_per_broker(&self, brokers: &[&Broker]) -> Vec<usize> {
        let mut counts = vec![0; brokers.len()];
        for socket in &self.sockets {
            let out = support::rampart(&["status", "--json", "--socket", socket.to_str().unwrap()]);
            let port = serde_json::from_slice::<Value>(&out.stdout)
                .ok()
                .and_then(|v| v["session"]["broker_port"].as_u64());
            if let Some(i) = brokers.iter().position(|b| Some(u64::from(b.port)) == port) {
                counts[i] += 1;
            }
        }
        counts
    }
}

/// Publishes one command to every host at once (one publish each, confirmed together) and
/// returns when it started. A publish lost with a node is sent again by its id (the agent
/// answers a repeat as a duplicate), on a new connection.
async fn push(cfg: &Config, ids: &[String], kind: &str, tag: &str, data: &Value) -> Result<u64> {
    let started = now_ms();
    let mut left: Vec<&String> = ids.iter().collect();
    for _ in 0..10 {
        let m = match Manager::connect(cfg).await {
            Ok(m) => m,
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        let sends = left.iter().map(|h| {
            let id = format!("{tag}-{h}");
            let m = &m;
            async move { m.send(h, kind, &id, data).await.is_ok() }
        });
        let ok = futures_util::future::join_all(sends).await;
        left = left
            .into_iter()
            .zip(ok)
            .filter(|(_, ok)| !ok)
            .map(|(h, _)| h)
            .collect();
        m.close().await;
        if left.is_empty() {
            return Ok(started);
        }
    }
    bail!("{} publishes never confirmed", left.len())
}

/// Waits for every host's ack of `tag`; prints p50 / p99 of command-to-ack and the time
/// until all are in, from `started`. Fails on any answer but `applied`.
async fn acked_by_all(
    acks: &Tap,
    ids: &[String],
    tag: &str,
    started: u64,
    what: &str,
) -> Result<()> {
    let want: BTreeSet<String> = ids.iter().map(|h| format!("{tag}-{h}")).collect();
    let mut got: BTreeMap<String, u64> = BTreeMap::new();
    let mut bad = vec![];
    let complete = acks
        .read_until(Duration::from_secs(300), |v| {
            let cid = v["correlation_id"].as_str().unwrap_or_default().to_string();
            if want.contains(&cid) && !got.contains_key(&cid) {
                if v["status"] != "applied" {
                    bad.push(v.to_string());
                }
                got.insert(cid, v["timestamp"].as_u64().unwrap_or(0));
            }
            got.len() == want.len()
        })
        .await?;
    ensure!(
        bad.is_empty(),
        "{what}: answers other than applied: {:?}",
        &bad[..bad.len().min(3)]
    );
    ensure!(
        complete,
        "{what}: {} of {} acks in 300 s",
        got.len(),
        want.len()
    );
    let mut lat: Vec<u64> = got.values().map(|t| t.saturating_sub(started)).collect();
    lat.sort();
    println!(
        "  {what:<34} p50 {:>6} ms  p99 {:>6} ms  all acked {:>6} ms  ({} hosts, nothing lost)",
        percentile(&lat, 0.5),
        percentile(&lat, 0.99),
        lat.last().unwrap(),
        ids.len()
    );
    Ok(())
}

/// Waits for a `state` event from every host with a timestamp at or after `since`; returns
/// the time from `since` until the last one and the peak number per second.
async fn all_states(events: &Tap, ids: &[String], since: u64) -> Result<(u64, usize)> {
    let want: BTreeSet<&str> = ids.iter().map(String::as_str).collect();
    let mut seen: BTreeMap<String, u64> = BTreeMap::new();
    let complete = events
        .read_until(Duration::from_secs(600), |v| {
            let host = v["host"].as_str().unwrap_or_default();
            let ts = v["timestamp"].as_u64().unwrap_or(0);
            if ts >= since && want.contains(host) {
                seen.entry(host.to_string()).or_insert(ts);
            }
            seen.len() == want.len()
        })
        .await?;
    ensure!(
        complete,
        "{} of {} hosts reported their session",
        seen.len(),
        want.len()
    );
    let mut per_second: BTreeMap<u64, usize> = BTreeMap::new();
    for ts in seen.values() {
        *per_second.entry(ts / 1000).or_default() += 1;
    }
    let last = seen.values().max().copied().unwrap_or(since);
    Ok((
        last.saturating_sub(since),
        per_second.values().max().copied().unwrap_or(0),
    ))
}

fn memory_line(fleet: &Fleet, brokers: &[&Broker]) {
    let mut rss = vec![];
    let mut pss = vec![];
    for a in &fleet.agents {
        if let Some((r, p)) = memory_kib(a.pid()) {
            rss.push(r);
            pss.push(p);
        }
    }
    rss.sort();
    pss.sort();
    let broker_rss: Vec<String> = brokers
        .iter()
        .filter_map(|b| b.vm_pid())
        .filter_map(memory_kib)
        .map(|(r, _)| format!("{:.0}", mib(r)))
        .collect();
    println!(
        "  idle agent RSS median {:.1} MiB, max {:.1} MiB; PSS median {:.1} MiB; broker RSS {} MiB",
        mib(percentile(&rss, 0.5)),
        mib(*rss.last().unwrap()),
        mib(percentile(&pss, 0.5)),
        broker_rss.join(" / ")
    );
}

/// Starts N agents and waits until all are connected.
fn start_fleet(
    rt: &tokio::runtime::Runtime,
    ns: &Namespaces,
    brokers: &[&Broker],
    cfg: &Config,
    events: &Tap,
    n: usize,
    tag: &str,
) -> Result<Fleet> {
    let e = env();
    let ids: Vec<String> = (0..n).map(|i| format!("{tag}-{i}")).collect();
    define_users(brokers[0], &ids, &e.root);
    // Over the veth; the brokers' certificates name localhost.
    let urls: Vec<String> = brokers
        .iter()
        .map(|b| format!("amqps://{BROKER_IP}:{}/%2f", b.port))
        .collect();
    let hosts: Vec<_> = ids
        .iter()
        .map(|id| {
            let host = e.host_on(
                brokers[0],
                id,
                HostOptions {
                    urls: Some(urls.clone()),
                    server_name: Some("localhost".into()),
                    firewall: "drift_check_secs = 300".into(),
                    ..Default::default()
                },
            );
            // The shipped backoff (the tests cap it at 2 s to be quick): a fleet retrying
            // every 2 s keeps an overloaded broker overloaded.
            let text = std::fs::read_to_string(&host.config).unwrap();
            std::fs::write(
                &host.config,
                text.replace("backoff_max_ms = 2000", "backoff_max_ms = 30000"),
            )
            .unwrap();
            host
        })
        .collect();
    let since = now_ms();
    let t = Instant::now();
    let agents: Vec<AgentProc> = hosts
        .iter()
        .zip(&ns.names)
        .map(|(h, ns)| AgentProc::start_in(h, Some(ns), &[]))
        .collect();
    let spawned = t.elapsed();
    let sockets = hosts.iter().map(|h| h.dir.join("rampart.sock")).collect();
    let fleet = Fleet {
        ids,
        agents,
        sockets,
    };
    let (took, peak) = rt.block_on(all_states(events, &fleet.ids, since))?;
    println!(
        "  {:<34} {:>6} ms  (spawned in {} ms, peak {} new sessions/s)",
        "all connected",
        took,
        spawned.as_millis(),
        peak
    );
    let _ = cfg;
    Ok(fleet)
}

fn run_size(
    rt: &tokio::runtime::Runtime,
    topology: &str,
    brokers: &[&Broker],
    cfg: &Config,
    n: usize,
) -> Result<()> {
    println!("{topology}, N = {n}:");
    let tag = format!("f{}{n}", &topology[..1]);
    let events = rt.block_on(Tap::declare(
        cfg,
        &format!("events-{tag}"),
        EVENTS_EXCHANGE,
        "state.*",
    ))?;
    let acks = rt.block_on(Tap::declare(
        cfg,
        &format!("acks-{tag}"),
        ACKS_EXCHANGE,
        "#",
    ))?;
    let namespaces = Namespaces::new(&tag, n);
    let fleet = start_fleet(rt, &namespaces, brokers, cfg, &events, n, &tag)?;
    std::thread::sleep(Duration::from_secs(5));
    memory_line(&fleet, brokers);
    if brokers.len() > 1 {
        let counts = fleet.sessions_per_broker(brokers);
        let shown: Vec<String> = counts.iter().map(usize::to_string).collect();
        println!("  sessions per node: {}", shown.join(" / "));
    }

    let rs = json!({"generation": 1, "address_sets": {"web": ["192.0.2.0/28"]},
        "rules": [{"id": "ssh", "priority": 10, "action": "allow", "direction": "in",
                   "protocol": "tcp", "ports": ["22"], "sources": ["$web"]}]});
    let started = rt.block_on(push(cfg, &fleet.ids, "firewall.apply", "apply", &rs))?;
    rt.block_on(acked_by_all(
        &acks,
        &fleet.ids,
        "apply",
        started,
        "push firewall.apply",
    ))?;
    let addresses = json!({"base_generation": 1, "generation": 2,
        "add_addresses": {"web": ["192.0.2.77"]}});
    let started = rt.block_on(push(cfg, &fleet.ids, "firewall.patch", "addr", &addresses))?;
    rt.block_on(acked_by_all(
        &acks,
        &fleet.ids,
        "addr",
        started,
        "push patch (addresses)",
    ))?;
    let rule = json!({"base_generation": 2, "generation": 3,
        "upsert_rules": [{"id": "web", "priority": 20, "action": "allow", "direction": "in",
                          "protocol": "tcp", "ports": ["443"]}]});
    let started = rt.block_on(push(cfg, &fleet.ids, "firewall.patch", "rule", &rule))?;
    rt.block_on(acked_by_all(
        &acks,
        &fleet.ids,
        "rule",
        started,
        "push patch (a rule)",
    ))?;
    let started = rt.block_on(push(cfg, &fleet.ids, "ping", "ping", &json!({})))?;
    rt.block_on(acked_by_all(
        &acks,
        &fleet.ids,
        "ping",
        started,
        "push ping",
    ))?;

    if brokers.len() == 1 {
        let b = brokers[0];
        let down = now_ms();
        b.restart();
        let up = now_ms();
        let (since_down, peak) = rt.block_on(all_states(&events, &fleet.ids, down))?;
        println!(
            "  {:<34} {:>6} ms after the broker was up (it was down {} ms; peak {} new sessions/s)",
            "broker restart: all back",
            (down + since_down).saturating_sub(up),
            up - down,
            peak
        );
    } else {
        // The node holding the most sessions, killed while a push is in flight.
        let counts = fleet.sessions_per_broker(brokers);
        let most = (0..brokers.len()).max_by_key(|i| counts[*i]).unwrap_or(0);
        let node = brokers[most];
        let ping_started = now_ms();
        let pusher = {
            let (cfg, ids) = (cfg.clone(), fleet.ids.clone());
            std::thread::spawn(move || {
                support::runtime().block_on(push(&cfg, &ids, "ping", "during-kill", &json!({})))
            })
        };
        std::thread::sleep(Duration::from_millis(50));
        node.kill9();
        pusher.join().expect("pusher")?;
        rt.block_on(acked_by_all(
            &acks,
            &fleet.ids,
            "during-kill",
            ping_started,
            "push with a node killed",
        ))?;
        node.start_again();
        // The whole cluster at once (a power loss): every node killed, then all started
        // together (a clustered node waits for its peers to boot).
        let down = now_ms();
        for b in brokers {
            b.kill9();
        }
        std::thread::scope(|s| {
            for b in brokers {
                s.spawn(|| b.start_again());
            }
        });
        let up = now_ms();
        let (since_down, peak) = rt.block_on(all_states(&events, &fleet.ids, down))?;
        println!(
            "  {:<34} {:>6} ms after the nodes were up (they were down {} ms; peak {} new sessions/s)",
            "cluster restart: all back",
            (down + since_down).saturating_sub(up),
            up - down,
            peak
        );
    }
    println!("  broker alarms (memory, disk) so far: {}", alarms(brokers));
    let started = rt.block_on(push(cfg, &fleet.ids, "ping", "after", &json!({})))?;
    rt.block_on(acked_by_all(
        &acks,
        &fleet.ids,
        "after",
        started,
        "push afterwards",
    ))?;
    drop(fleet);
    // Their tables go with their namespaces.
    drop(namespaces);
    Ok(())
}

/// Resource alarms the brokers raised (memory or disk), from their logs.
fn alarms(brokers: &[&Broker]) -> usize {
    let count = |b: &&Broker| -> usize {
        std::fs::read_dir(b.dir.join("log"))
            .into_iter()
            .flatten()
            .flatten()
            .map(|f| std::fs::read_to_string(f.path()).unwrap_or_default())
            .map(|t| t.matches("resource limit alarm set").count())
            .sum()
    };
    brokers.iter().map(count).sum()
}

/// The brokers' address on the bridge to the agents' namespaces.
const BROKER_IP: &str = "10.210.0.1";
const BRIDGE: &str = "rflbr";

fn ip_batch(ns: Option<&str>, script: &str) {
    use std::io::Write;
    let mut cmd = std::process::Command::new("ip");
    if let Some(ns) = ns {
        cmd.args(["-n", ns]);
    }
    let mut child = cmd
        .args(["-batch", "-"])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .expect("ip");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(script.as_bytes())
        .unwrap();
    assert!(
        child.wait().unwrap().success(),
        "ip -batch failed:\n{script}"
    );
}

/// One network namespace per agent, each with a veth on the brokers' bridge.
struct Namespaces {
    names: Vec<String>,
}

impl Namespaces {
    fn new(tag: &str, n: usize) -> Namespaces {
        let names: Vec<String> = (0..n).map(|i| format!("{tag}-{i}")).collect();
        // What an interrupted run left behind.
        let stale: String = names
            .iter()
            .enumerate()
            .map(|(i, ns)| format!("netns del {ns}\nlink del rfv{i}\n"))
            .collect();
        let _ = std::process::Command::new("sh")
            .args(["-c", "ip -force -batch - 2>/dev/null"])
            .stdin(std::process::Stdio::piped())
            .spawn()
            .and_then(|mut c| {
                use std::io::Write;
                c.stdin.take().unwrap().write_all(stale.as_bytes())?;
                c.wait()
            });
        let mut root = String::new();
        for (i, ns) in names.iter().enumerate() {
            root += &format!("netns add {ns}\n");
            root += &format!("link add rfv{i} type veth peer name e0 netns {ns}\n");
            root += &format!("link set rfv{i} master {BRIDGE} up\n");
        }
        ip_batch(None, &root);
        for (i, ns) in names.iter().enumerate() {
            let addr = format!("10.210.{}.{}/16", 1 + i / 250, 1 + i % 250);
            ip_batch(
                Some(ns),
                &format!("addr add {addr} dev e0\nlink set e0 up\nlink set lo up\n"),
            );
        }
        Namespaces { names }
    }
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        let script: String = self
            .names
            .iter()
            .map(|ns| format!("netns del {ns}\n"))
            .collect();
        ip_batch(None, &script);
    }
}

fn run(sizes: Vec<usize>, topologies: Vec<String>) -> Result<()> {
    let root = tempfile::Builder::new()
        .prefix("rampart-fleet-")
        .tempdir_in("/tmp")?;
    // Kept for a look at the logs; printed at the end.
    let root = root.keep();
    println!("files: {}", root.display());
    support::init(&root);
    let e = env();
    let rt = support::runtime();
    for topology in &topologies {
        let (node, cluster);
        let (brokers, cfg): (Vec<&Broker>, Config) = match topology.as_str() {
            "node" => {
                node = Broker::start_listening(&e.root.join("node"), &e.ca, "fn", "0.0.0.0");
                let text = std::fs::read_to_string(&e.manager_config)?
                    .replace(&e.broker.url(), &node.url());
                let path = e.root.join("manager-fleet-node.toml");
                std::fs::write(&path, text)?;
                support::declare_topology(&path);
                (vec![&node], Config::load(&path)?)
            }
            "cluster" => {
                cluster = Cluster::start_listening(&e.root.join("cluster"), &e.ca, "fl", "0.0.0.0");
                let listed: Vec<String> =
                    cluster.urls().iter().map(|u| format!("\"{u}\"")).collect();
                let text = std::fs::read_to_string(&e.manager_config)?
                    .replace(&format!("\"{}\"", e.broker.url()), &listed.join(", "));
                let path = e.root.join("manager-fleet-cluster.toml");
                std::fs::write(&path, text)?;
                support::declare_topology(&path);
                (cluster.nodes.iter().collect(), Config::load(&path)?)
            }
            other => bail!("unknown topology {other} (node, cluster)"),
        };
        for &n in &sizes {
            // Measured: about 1.2 MiB proportional per idle agent, a few more with its
            // namespace, its peaks and its broker session; the brokers take a few GiB.
            // Stop before the machine would swap.
            let need = n as u64 * 6 + 4096;
            if available_mib() < need {
                println!(
                    "{topology}, N = {n}: not run: {} MiB available, about {need} MiB needed",
                    available_mib()
                );
                break;
            }
            if let Err(e) = run_size(&rt, topology, &brokers, &cfg, n) {
                println!("{topology}, N = {n}: stopped: {e:#}");
                break;
            }
        }
    }
    support::teardown();
    Ok(())
}

fn main() {
    // `cargo test --all-targets` runs bench binaries without --bench: build-check only.
    if !std::env::args().any(|a| a == "--bench") {
        println!("fleet: benchmark skipped (run it with scripts/fleet.sh)");
        return;
    }
    let sizes: Vec<usize> = std::env::var("RAMPART_FLEET_SIZES")
        .unwrap_or_else(|_| "100,500,1000".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let topologies: Vec<String> = std::env::var("RAMPART_FLEET_TOPOLOGIES")
        .unwrap_or_else(|_| "node,cluster".into())
        .split(',')
        .map(|s| s.trim().to_string())
        .collect();
    // The brokers' side needs a neighbour entry per agent: past gc_thresh3 (1024 by
    // default) the kernel drops new ones and agents see "no route to host" and timeouts.
    let saved: Vec<(String, String)> = ["gc_thresh1", "gc_thresh2", "gc_thresh3"]
        .iter()
        .map(|k| {
            let path = format!("/proc/sys/net/ipv4/neigh/default/{k}");
            let value = std::fs::read_to_string(&path).unwrap_or_default();
            (path, value)
        })
        .collect();
    for ((path, _), value) in saved.iter().zip(["4096", "8192", "16384"]) {
        std::fs::write(path, value).expect("raising the neighbour table limits");
    }
    ip_batch(
        None,
        &format!(
            "link add {BRIDGE} type bridge\naddr add {BROKER_IP}/16 dev {BRIDGE}\nlink set {BRIDGE} up\n"
        ),
    );
    let result = run(sizes, topologies);
    ip_batch(None, &format!("link del {BRIDGE}\n"));
    for (path, value) in &saved {
        let _ = std::fs::write(path, value.trim());
    }
    if let Err(e) = result {
        eprintln!("fleet: {e}");
        std::process::exit(1);
    }
}
