//! Fault storms (issue 11): many faults in a row under a stream of firewall patches, each
//! built on the one before. Afterwards every command has one answer (duplicates repeat
//! it), none applied twice, none stale, and the kernel's table holds exactly what the
//! stream's model says. CI runs a few faults; `scripts/chaos.sh` sets the long counts
//! (`RAMPART_CHAOS_AGENT_KILLS`, `RAMPART_CHAOS_BROKER_RESTARTS`) and prints the tables.
//! `RAMPART_CHAOS_SEED` repeats a run's kill moments.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use libtest_mimic::Trial;
use rampart::config::Config;
use rampart::manager::Manager;
use serde_json::{Value, json};

use crate::support::acklog::{self, AckLog, Tally};
use crate::support::broker::Broker;
use crate::support::site::Site;
use crate::support::timing::{median, ms};
use crate::support::{AgentProc, HostOptions, applied, env, runtime};
use crate::trial;

pub fn tests() -> Vec<Trial> {
    vec![
        trial(
            "storms::agent_kill9_at_random_moments_of_a_patch_stream",
            agent_kills,
        ),
        trial(
            "storms::broker_restarts_under_a_patch_stream",
            broker_restarts,
        ),
    ]
}

fn count_from_env(var: &str, default: usize) -> usize {
    std::env::var(var)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// xorshift64*: enough to place kills at random moments, repeatable from its seed.
struct Rng(u64);

impl Rng {
    fn from_env() -> Rng {
        let seed = std::env::var("RAMPART_CHAOS_SEED")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| rampart::ids::now_ms() | 1);
        eprintln!("storm seed: RAMPART_CHAOS_SEED={seed}");
        Rng(seed)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % n
    }
}

/// What the stream has built so far: the rule ids and set addresses the table must hold.
#[derive(Debug, Default, Clone)]
struct Model {
    generation: u64,
    rules: BTreeSet<String>,
    addresses: BTreeSet<String>,
}

/// Never adjacent, so the kernel keeps them as single elements.
fn address(g: u64) -> String {
    format!("198.18.{}.{}", g / 100 % 250, 2 * (g % 100) + 1)
}

impl Model {
    /// The next patch on top of the model, and the model after it. Most patches change
    /// rules and elements (nft text); every fifth changes only elements (netlink).
    fn next_patch(&mut self) -> Value {
        let g = self.generation + 1;
        let mut p = json!({"base_generation": self.generation, "generation": g,
            "add_addresses": {"s": [address(g)]}});
        self.addresses.insert(address(g));
        if g.is_multiple_of(4) && self.addresses.remove(&address(g - 3)) {
            p["remove_addresses"] = json!({"s": [address(g - 3)]});
        }
        if !g.is_multiple_of(5) {
            let id = format!("p{g}");
            p["upsert_rules"] = json!([{"id": id, "priority": 100, "action": "allow",
                "direction": "in", "protocol": "tcp", "ports": [(1000 + g).to_string()],
                "sources": ["$s"]}]);
            self.rules.insert(id);
            let old = format!("p{}", g - 2);
            if g.is_multiple_of(3) && self.rules.remove(&old) {
                p["delete_rules"] = json!([old]);
            }
        }
        self.generation = g;
        p
    }

    /// Differences between the model and `nft list table` of the agent's table: each rule
    /// once per family (its `$s` source has an IPv4 and an IPv6 half), the set's addresses.
    fn mismatches(&self, listing: &str) -> Vec<String> {
        let mut out = vec![];
        for family in ["ip saddr", "ip6 saddr"] {
            let mut rules = BTreeSet::new();
            for line in listing.lines().map(str::trim) {
                if !line.starts_with(family) {
                    continue;
                }
                if let Some(id) = line.split("comment \"").nth(1) {
                    let id = id.trim_end_matches('"').to_string();
                    if !rules.insert(id.clone()) {
                        out.push(format!("{family} rule {id} twice"));
                    }
                }
            }
            for id in self.rules.symmetric_difference(&rules) {
                out.push(format!("{family} rule {id}"));
            }
        }
        let set = listing
            .split("set as4_s {")
            .nth(1)
            .and_then(|s| s.split("\n\t}").next())
            .unwrap_or_default();
        let addresses: BTreeSet<String> = set
            .split(|c: char| !(c.is_ascii_digit() || c == '.'))
            .filter(|t| t.starts_with("198.18."))
            .map(str::to_string)
            .collect();
        for a in self.addresses.symmetric_difference(&addresses) {
            out.push(format!("address {a}"));
        }
        out
    }
}

/// Publishes the model's patches every `every` until `stop`, re-sending a command by its
/// id when the broker was lost before it confirmed (a manager's retry; the agent answers a
/// repeat as a duplicate). Returns the ids sent and the model they build.
fn stream(
    cfg: Config,
    host: String,
    mut model: Model,
    stop: Arc<AtomicBool>,
    every: Duration,
) -> std::thread::JoinHandle<(Vec<String>, Model)> {
    std::thread::spawn(move || {
        runtime().block_on(async move {
            let mut m: Option<Manager> = None;
            let mut sent = vec![];
            while !stop.load(Ordering::Relaxed) {
                let data = model.next_patch();
                let id = format!("{host}-{}", model.generation);
                loop {
                    if m.is_none() {
                        m = Manager::connect(&cfg).await.ok();
                    }
                    if let Some(mgr) = &m
                        && mgr.send(&host, "firewall.patch", &id, &data).await.is_ok()
                    {
                        break;
                    }
                    m = None;
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                sent.push(id);
                tokio::time::sleep(every).await;
            }
            if let Some(m) = m {
                m.close().await;
            }
            (sent, model)
        })
    })
}

/// Generation 1 (an empty set `s`), through a manager on `cfg`'s broker.
fn first_generation(cfg: &Config, host: &str) -> Result<Model> {
    runtime().block_on(async {
        let mut m = Manager::connect(cfg).await?;
        m.watch_host(host).await?;
        let rs = json!({"generation": 1, "address_sets": {"s": []}, "rules": []});
        applied(&mut m, host, "firewall.apply", &format!("{host}-1"), rs).await?;
        m.close().await;
        Ok::<_, anyhow::Error>(())
    })?;
    Ok(Model {
        generation: 1,
        ..Default::default()
    })
}

/// After the storm: all answers in and checked, the kernel equal to the model, the
/// recorded generation the model's.
fn settle(site: &Site, acks: &AckLog, sent: &[String], model: &Model) -> Result<(Tally, usize)> {
    let outcomes = runtime().block_on(acks.collect(sent, Duration::from_secs(180)))?;
    let tally = acklog::check(sent, &outcomes)?;
    let listing = site.ag.nft_table("rampart").context("the agent's table")?;
    let mismatches = model.mismatches(&listing);
    ensure!(
        mismatches.is_empty(),
        "kernel differs from the model (generation {}): {mismatches:?}\n{listing}",
        model.generation
    );
    let socket = site.host.dir.join("rampart.sock");
    let out = crate::support::rampart(&["status", "--json", "--socket", socket.to_str().unwrap()]);
    let v: Value = serde_json::from_slice(&out.stdout)?;
    ensure!(
        v["firewall"]["generation"] == model.generation,
        "recorded generation {} against the model's {}",
        v["firewall"]["generation"],
        model.generation
    );
    Ok((tally, mismatches.len()))
}

/// A patch stream under way against a site's agent, its acks logged.
struct Storm {
    acks: AckLog,
    stop: Arc<AtomicBool>,
    streamer: std::thread::JoinHandle<(Vec<String>, Model)>,
}

impl Storm {
    /// Starts `site`'s agent, applies generation 1 through a manager on `cfg`'s broker and
    /// streams patches every `every`.
    fn begin(site: &Site, cfg: Config, every: Duration) -> Result<(Storm, AgentProc)> {
        let h = site.host.id.clone();
        let acks = runtime().block_on(AckLog::declare(&cfg, &h, false))?;
        let agent = site.start(&[]);
        let model = first_generation(&cfg, &h)?;
        let stop = Arc::new(AtomicBool::new(false));
        let streamer = stream(cfg, h, model, stop.clone(), every);
        let storm = Storm {
            acks,
            stop,
            streamer,
        };
        Ok((storm, agent))
    }

    /// Stops the stream: the ids it sent, the model they build, and the ack log.
    fn end(self) -> (Vec<String>, Model, AckLog) {
        self.stop.store(true, Ordering::Relaxed);
        let (sent, model) = self.streamer.join().expect("the stream ran");
        (sent, model, self.acks)
    }
}

fn agent_kills() -> Result<()> {
    let kills = count_from_env("RAMPART_CHAOS_AGENT_KILLS", 3);
    let mut rng = Rng::from_env();
    let site = Site::new("rpks", "10.209.1", "st-kill9", HostOptions::default());
    let cfg = Config::load(&env().manager_config)?;
    let (storm, mut agent) = Storm::begin(&site, cfg, Duration::from_millis(10))?;
    let mut to_serving = vec![];
    let mut started = Instant::now();
    let result = (|| {
        for k in 0..kills {
            if rng.below(10) < 3 {
                // While it starts: opening the store, restoring the table, connecting.
                std::thread::sleep(Duration::from_millis(rng.below(100)));
            } else {
                ensure!(
                    agent.wait_log("serving commands", 1, Duration::from_secs(30)),
                    "kill {k}: not serving after a restart:\n{}",
                    agent.current_log()
                );
                to_serving.push(started.elapsed());
                std::thread::sleep(Duration::from_millis(rng.below(400)));
            }
            agent.kill9();
            agent = AgentProc::start_in(&site.host, Some(&site.ag.name), &[]);
            started = Instant::now();
        }
        Ok(())
    })();
    let (sent, model, acks) = storm.end();
    result?;
    agent.wait_serving();
    let (tally, mismatches) = settle(&site, &acks, &sent, &model)?;
    eprintln!(
        "storm-agent: sent {} applied {} stale {} duplicates {} kills {kills} mismatches {mismatches}",
        tally.sent, tally.applied, tally.stale, tally.duplicates
    );
    if !to_serving.is_empty() {
        to_serving.sort();
        eprintln!(
            "storm-agent: restart to serving p50 {:.0} ms, max {:.0} ms ({} restarts)",
            ms(median(to_serving.clone())),
            ms(*to_serving.last().unwrap()),
            to_serving.len()
        );
    }
    drop(agent);
    Ok(())
}

fn broker_restarts() -> Result<()> {
    let restarts = count_from_env("RAMPART_CHAOS_BROKER_RESTARTS", 2);
    let e = env();
    // A broker of its own: restarting the shared one would disturb the other tests.
    let b = Broker::start(&e.root.join("broker-storm"), &e.ca, "storm");
    let site = Site::on(
        &b,
        "rpbs",
        "10.209.2",
        "st-restart",
        HostOptions {
            heartbeat_secs: Some(2),
            ..Default::default()
        },
    );
    let manager_cfg = e.root.join("manager-storm.toml");
    let text = std::fs::read_to_string(&e.manager_config)?.replace(&e.broker.url(), &b.url());
    std::fs::write(&manager_cfg, text)?;
    crate::support::declare_topology(&manager_cfg);
    let cfg = Config::load(&manager_cfg)?;
    let (storm, agent) = Storm::begin(&site, cfg, Duration::from_millis(20))?;
    let mut back = vec![];
    let result = (|| {
        for r in 0..restarts {
            std::thread::sleep(Duration::from_millis(1500));
            let sessions = agent.current_log().matches("serving commands").count();
            b.restart();
            let up = Instant::now();
            ensure!(
                agent.wait_log("serving commands", sessions + 1, Duration::from_secs(60)),
                "restart {r}: the agent did not come back:\n{}",
                agent.current_log()
            );
            back.push(up.elapsed());
        }
        std::thread::sleep(Duration::from_millis(1000));
        Ok(())
    })();
    let (sent, model, acks) = storm.end();
    result?;
    let (tally, mismatches) = settle(&site, &acks, &sent, &model)?;
    back.sort();
    eprintln!(
        "storm-broker: sent {} applied {} stale {} duplicates {} restarts {restarts} mismatches {mismatches}",
        tally.sent, tally.applied, tally.stale, tally.duplicates
    );
    eprintln!(
        "storm-broker: broker up to agent serving p50 {:.0} ms, max {:.0} ms",
        ms(median(back.clone())),
        ms(*back.last().unwrap())
    );
    drop(agent);
    b.shutdown();
    Ok(())
}
