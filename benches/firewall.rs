//! Firewall benchmark (not a test): full applies and one-rule and one-address patches through
//! the agent (command to ack) beside `nft -f` of the same rule set applied directly, at two
//! sizes, the agent's peak RSS and nft's, each against its target (issue 14). Run with
//! `cargo bench --bench firewall`. Raw `nft -f` is only fair while nothing on the host
//! listens to nftables events (the kernel then builds an event per rule and element, in
//! every namespace): the agent does not, other tools (`nft monitor`) may.

#[path = "../tests/e2e/support/mod.rs"]
#[allow(dead_code)]
mod support;

use std::time::{Duration, Instant};

use rampart::firewall::layout::Layout;
use rampart::firewall::render::{RenderCtx, render_full};
use serde_json::{Value, json};
use support::netns::{Netns, relay, veth};
use support::timing::{median, ms, timed};
use support::{AgentProc, HostOptions, env};

fn rule_set(generation: u64, rules: usize, elements: usize) -> Value {
    let sets = (elements / 1000).max(1);
    let per_set = elements / sets;
    let mut address_sets = serde_json::Map::new();
    for s in 0..sets {
        let els: Vec<String> = (0..per_set)
            .map(|i| {
                let v = (10u32 << 24) | ((s as u32) << 14) | ((i as u32) << 2);
                std::net::Ipv4Addr::from(v).to_string()
            })
            .collect();
        address_sets.insert(format!("set{s}"), json!(els));
    }
    let rules: Vec<Value> = (0..rules)
        .map(|i| {
            json!({"id": format!("r{i}"), "priority": i, "action": if i % 2 == 0 { "allow" } else { "drop" },
                "direction": "in", "protocol": "tcp", "ports": [format!("{}", 1000 + i % 50000)],
                "sources": [format!("$set{}", i % sets)]})
        })
        .collect();
    json!({"generation": generation, "defaults": {"in": "allow"}, "address_sets": address_sets, "rules": rules})
}

/// `nft -f` of the text the agent would render for `rs`, in a scratch namespace.
fn raw_nft(ns: &Netns, data: &Value) -> Duration {
    let rs = {
        let body = rampart::manager::command_body("x", "firewall.apply", "m", "h", data);
        let v: Value = serde_json::from_slice(&body).unwrap();
        // Round-trip through the agent's own decoder so the text is exactly what it applies.
        rampart::protocol::decode_stored_rule_set(v["data"].to_string().as_bytes()).unwrap()
    };
    let ctx = RenderCtx::bare("rampart");
    let text = render_full(&rs, &Layout::build(rs.rules.values()), &ctx);
    let path = std::env::temp_dir().join("rampart-bench.nft");
    std::fs::write(&path, text).unwrap();
    let t = Instant::now();
    let o = ns.exec(&["nft", "-f", path.to_str().unwrap()]);
    let d = t.elapsed();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    d
}

/// The table: each case with the agent's time, raw nft's where there is one, the
/// ratio, the target and whether it is met.
#[derive(Default)]
struct Report(Vec<(String, f64, Option<f64>, &'static str, bool)>);

impl Report {
    fn row(&mut self, case: String, agent: f64, raw: Option<f64>, target: &'static str, met: bool) {
        self.0.push((case, agent, raw, target, met));
    }
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "{:<44} {:>9} {:>9} {:>6}  {:<24} result",
            "case", "agent ms", "nft ms", "ratio", "target"
        )?;
        for (case, agent, raw, target, met) in &self.0 {
            let (raw, ratio) = match raw {
                Some(r) => (format!("{r:.1}"), format!("{:.2}", agent / r)),
                None => (String::new(), String::new()),
            };
            let result = if *met { "met" } else { "MISSED" };
            writeln!(
                f,
                "{case:<44} {agent:>9.1} {raw:>9} {ratio:>6}  {target:<24} {result}"
            )?;
        }
        Ok(())
    }
}

fn peak_rss_kib(pid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0)
}

fn main() -> anyhow::Result<()> {
    if !std::env::args().any(|a| a == "--bench") {
        println!("firewall: benchmark skipped (run it with cargo bench --bench firewall)");
        return Ok(());
    }
    let root = tempfile::Builder::new()
        .prefix("rampart-fwbench-")
        .tempdir_in("/tmp")?;
    support::init(root.path());
    let brk = Netns::new("rpb-brk");
    let ag = Netns::new("rpb-ag");
    let scratch = Netns::new("rpb-raw");
    veth(&brk, "b0", "10.209.0.1/30", &ag, "e0", "10.209.0.2/30");
    let _relay = relay(
        &brk.name,
        "10.209.0.1:5671",
        format!("127.0.0.1:{}", env().broker.port).parse()?,
    );
    let host = env().host(
        "bench-fw",
        HostOptions {
            urls: Some(vec!["amqps://10.209.0.1:5671/%2f".into()]),
            server_name: Some("localhost".into()),
            firewall: "drift_check_secs = 3600".into(),
            ..Default::default()
        },
    );
    let agent = AgentProc::start_in(&host, Some(&ag.name), &[]);
    agent.wait_serving();
    let h = host.id.clone();
    let result = support::runtime().block_on(async {
        let mut m = env().manager().await;
        m.watch_host(&h).await?;
        let mut generation = 0u64;
        let mut report = Report::default();
        for (rules, elements) in [(1_000usize, 10_000usize), (10_000, 100_000)] {
            let mut agent_t = vec![];
            let mut raw_t = vec![];
            for _ in 0..3 {
                generation += 1;
                let data = rule_set(generation, rules, elements);
                agent_t.push(timed(&mut m, &h, "firewall.apply", &format!("full-{generation}"), &data).await?);
                raw_t.push(raw_nft(&scratch, &data));
            }
            let (a, r) = (ms(median(agent_t)), ms(median(raw_t)));
            report.row(
                format!("full apply, {rules} rules / {elements} el."),
                a,
                Some(r),
                "at most 1.1x nft -f",
                a / r <= 1.1,
            );
        }
        let mut small_rule = 0.0;
        for (rules, elements) in [(100usize, 1_000usize), (10_000, 100_000)] {
            generation += 1;
            timed(&mut m, &h, "firewall.apply", &format!("base-{generation}"), &rule_set(generation, rules, elements)).await?;
            let mut rule_t = vec![];
            let mut addr_t = vec![];
            // Each kind in its own run: the kernel frees what a commit replaced after an RCU
            // grace period, which the next commit may wait for.
            for i in 0..10 {
                let g = generation;
                generation += 1;
                let p = json!({"base_generation": g, "generation": generation, "upsert_rules": [
                    {"id": format!("extra{i}"), "priority": 5 + i, "action": "allow", "direction": "in", "protocol": "tcp", "ports": ["9"]}]});
                rule_t.push(timed(&mut m, &h, "firewall.patch", &format!("pr-{generation}"), &p).await?);
            }
            for i in 0..10 {
                let g = generation;
                generation += 1;
                let p = json!({"base_generation": g, "generation": generation, "add_addresses": {"set0": [format!("192.0.2.{i}")]}});
                addr_t.push(timed(&mut m, &h, "firewall.patch", &format!("pa-{generation}"), &p).await?);
            }
            let (rule_ms, addr_ms) = (ms(median(rule_t)), ms(median(addr_t)));
            if rules < 1_000 {
                small_rule = rule_ms;
                report.row(format!("one-rule patch, {rules} rules / {elements} el."), rule_ms, None, "under 20 ms", rule_ms < 20.0);
            } else {
                report.row(
                    format!("one-rule patch, {rules} rules / {elements} el."),
                    rule_ms,
                    None,
                    "under 20 ms, 1.5x small",
                    rule_ms < 20.0 && rule_ms <= 1.5 * small_rule,
                );
            }
            report.row(format!("one-address patch, {rules} rules / {elements} el."), addr_ms, None, "under 20 ms", addr_ms < 20.0);
        }
        let agent_mib = peak_rss_kib(agent.pid()) as f64 / 1024.0;
        let nft_mib = nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_CHILDREN)
            .map(|u| u.max_rss() as f64 / 1024.0)
            .unwrap_or(0.0);
        println!("{report}");
        println!(
            "peak RSS: agent {agent_mib:.0} MiB (target at most 64: {}); nft -f of the large rule set {nft_mib:.0} MiB",
            if agent_mib <= 64.0 { "met" } else { "MISSED" }
        );
        m.close().await;
        anyhow::Ok(())
    });
    drop(agent);
    support::timing::finish(root, "bench-fw");
    result
}
