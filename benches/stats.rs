//! Statistics benchmark (not a test): the cost of one collection of per-rule counters (one
//! netlink dump of the table, summed per rule id) and of turning it into `stats` events, at
//! 1 000 and 10 000 rules, in a namespace of its own. Run with `cargo bench --bench stats`
//! (root).

#[path = "../tests/e2e/support/mod.rs"]
#[allow(dead_code)]
mod support;

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use ipnet::IpNet;
use rampart::events::{StatsTracker, stats_parts};
use rampart::firewall::bytecode::full_table;
use rampart::firewall::counters;
use rampart::firewall::layout::Layout;
use rampart::firewall::render::RenderCtx;
use rampart::firewall::spec::{Action, Addr, Direction, PortRange, Protocol, Rule, RuleSet};
use rampart::sys::nfnl;
use support::netns::{Netns, in_ns};
use support::timing::{median, ms};

const RUNS: usize = 15;

/// `n` rules on ports and address sets, each rendering to one kernel rule per family.
fn rule_set(n: usize) -> RuleSet {
    let mut rs = RuleSet {
        generation: 1,
        ..RuleSet::default()
    };
    let set: BTreeSet<IpNet> = (0..10u8)
        .map(|i| IpNet::new(IpAddr::V4(Ipv4Addr::new(10, i, 0, 0)), 16).unwrap())
        .collect();
    rs.sets.insert("s".into(), set);
    for i in 0..n {
        let id = format!("rule-{i}");
        rs.rules.insert(
            id.clone(),
            Rule {
                id,
                priority: i as u32,
                action: Action::Allow,
                direction: Direction::In,
                protocol: Protocol::Tcp,
                sources: vec![Addr::Set("s".into())],
                destinations: vec![],
                ports: vec![PortRange {
                    lo: (1000 + i % 60_000) as u16,
                    hi: (1000 + i % 60_000) as u16,
                }],
                applied_to: vec![],
                log: false,
                disabled: false,
                comment: String::new(),
            },
        );
    }
    rs
}

fn case(ns: &str, n: usize) {
    in_ns(ns, move || {
        let rs = rule_set(n);
        let layout = Layout::build(rs.rules.values());
        let ctx = RenderCtx::bare("rampart");
        let (bytes, acked) = full_table(
            &rs,
            &layout,
            &ctx,
            nfnl::first_seq(),
            &mut Default::default(),
        );
        nfnl::send_batch(&bytes, acked).expect("table made");
        let chains: Vec<String> = rampart::firewall::layout::Hook::ALL
            .iter()
            .flat_map(|h| layout.buckets(*h).iter().map(|b| b.chain_name(*h)))
            .collect();
        let mut dumps: Vec<Duration> = vec![];
        let mut events: Vec<Duration> = vec![];
        let mut parts = 0;
        for _ in 0..RUNS {
            let t = Instant::now();
            let counts = counters::by_id("rampart", &chains).expect("counters read");
            dumps.push(t.elapsed());
            // Every rule moved: the largest report (counts forced non-zero).
            let all = rs
                .rules
                .keys()
                .map(|id| {
                    let c = counts
                        .get(id)
                        .copied()
                        .unwrap_or(rampart::sys::nfrule::Counts {
                            packets: 1_000_000,
                            bytes: 1_000_000_000,
                        });
                    (id.clone(), c)
                })
                .collect();
            let t = Instant::now();
            let moved = StatsTracker::default().moved(all);
            let p = stats_parts(1, &moved);
            let bodies: usize = p.iter().map(|v| v.to_string().len()).sum();
            events.push(t.elapsed());
            parts = p.len();
            assert!(bodies > 0);
        }
        println!(
            "{n:>6} rules ({} kernel rules): collect (dump and sum) {:>6.1} ms; every rule moved: {:>6.1} ms to make {parts} stats event(s)",
            n * 2,
            ms(median(dumps)),
            ms(median(events)),
        );
    });
}

fn main() {
    if !nix::unistd::Uid::effective().is_root() {
        eprintln!("the stats benchmark needs root (a namespace and nftables)");
        std::process::exit(1);
    }
    let ns = Netns::new("rpbench-stats");
    println!("stats collection, median of {RUNS} (release build when run by cargo bench)");
    for n in [1_000, 10_000] {
        case(&ns.name, n);
    }
}
