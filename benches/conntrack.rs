//! Conntrack sweep benchmark (not a test): the cost of judging every open connection
//! against a rule set and removing the denied ones (`"established": "cut"`), at 10 000 and
//! 100 000 conntrack entries and 1 000 and 10 000 rules, in a namespace of its own. The
//! entries are made through ctnetlink (as `conntrack -I` would), established TCP from many
//! clients to the host's services. Run with `cargo bench --bench conntrack` (root).

#[path = "../tests/e2e/support/mod.rs"]
#[allow(dead_code)]
mod support;

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr};
use std::time::Instant;

use ipnet::IpNet;
use rampart::firewall::flows;
use rampart::firewall::layout::Layout;
use rampart::firewall::render::RenderCtx;
use rampart::firewall::spec::{
    Action, Addr, Defaults, Direction, Policy, PortRange, Protocol, Rule, RuleSet,
};
use rampart::sys::conntrack::{self, NewFlow};
use support::netns::{Netns, in_ns};

const HOST: Ipv4Addr = Ipv4Addr::new(10, 250, 0, 1);

/// `rules` rules, rule i allowing TCP port 10 000 + i from set `s<i % 100>`, defaults
/// drop. Each set holds 16 /24s of the 10.0.0.0/8 clients.
fn rule_set(rules: usize) -> RuleSet {
    let mut rs = RuleSet {
        generation: 1,
        defaults: Defaults {
            input: Policy::Drop,
            output: Policy::Allow,
            forward: Policy::Drop,
        },
        ..RuleSet::default()
    };
    for s in 0..100u32 {
        let nets: BTreeSet<IpNet> = (0..16u32)
            .map(|j| {
                let n = s * 16 + j;
                IpNet::new(
                    IpAddr::V4(Ipv4Addr::new(10, (n >> 8) as u8, n as u8, 0)),
                    24,
                )
                .unwrap()
            })
            .collect();
        rs.sets.insert(format!("s{s}"), nets);
    }
    for i in 0..rules {
        let id = format!("r{i}");
        let port = 10_000 + i as u16;
        rs.rules.insert(
            id.clone(),
            Rule {
                id,
                priority: i as u32,
                action: Action::Allow,
                direction: Direction::In,
                protocol: Protocol::Tcp,
                sources: vec![Addr::Set(format!("s{}", i % 100))],
                destinations: vec![],
                ports: vec![PortRange { lo: port, hi: port }],
                applied_to: vec![],
                log: false,
                disabled: false,
                comment: String::new(),
            },
        );
    }
    rs
}

/// `n` established connections to the host: client k from 10.x.y.z to port 10 000 +
/// (k % 1 000). The rule set denies those whose client /24 is not in their rule's set:
/// most of them (a sweep that cuts much is the expensive case).
fn flows(n: usize) -> Vec<NewFlow> {
    (0..n)
        .map(|k| {
            let c = k as u32 + 1;
            NewFlow {
                proto: 6,
                src: IpAddr::V4(Ipv4Addr::new(10, (c >> 16) as u8, (c >> 8) as u8, c as u8)),
                dst: IpAddr::V4(HOST),
                sport: 40_000 + (k % 20_000) as u16,
                dport: 10_000 + (k % 1_000) as u16,
                timeout_s: 600,
            }
        })
        .collect()
}

fn case(ns: &str, entries: usize, rules: usize) {
    let ns = ns.to_string();
    in_ns(&ns, move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let rs = rule_set(rules);
        let layout = Layout::build(rs.rules.values());
        let ctx = RenderCtx::bare("rampart");
        let t = Instant::now();
        conntrack::create(&flows(entries)).expect("making conntrack entries");
        let made = t.elapsed();
        let count = rt
            .block_on(flows::sweep(&rs, &layout, &ctx, true))
            .expect("sweep");
        let cut = rt
            .block_on(flows::sweep(&rs, &layout, &ctx, false))
            .expect("sweep");
        let after = rt
            .block_on(flows::sweep(&rs, &layout, &ctx, true))
            .expect("sweep");
        assert_eq!(after.denied, 0, "the sweep left denied entries");
        assert_eq!(after.entries, entries - cut.cut, "entries left");
        println!(
            "{entries:>7} entries, {rules:>6} rules: judge only {:>7.1} ms ({} keys, {} denied); \
             judge and cut {:>7.1} ms ({} cut); sweep with nothing to cut {:>6.1} ms; \
             (making the entries: {:.0} ms)",
            count.elapsed_us as f64 / 1000.0,
            count.keys,
            count.denied,
            cut.elapsed_us as f64 / 1000.0,
            cut.cut,
            after.elapsed_us as f64 / 1000.0,
            made.as_secs_f64() * 1000.0,
        );
        // Leave the table empty for the next case.
        let rest = rs_allow_nothing();
        rt.block_on(flows::sweep(&rest, &Layout::default(), &ctx, false))
            .expect("emptying");
    });
}

/// Drop everything: the sweep that empties the table between cases.
fn rs_allow_nothing() -> RuleSet {
    RuleSet {
        defaults: Defaults {
            input: Policy::Drop,
            output: Policy::Drop,
            forward: Policy::Drop,
        },
        ..RuleSet::default()
    }
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(std::env::var("RUST_LOG").unwrap_or_else(|_| "off".into()))
        .init();
    if !nix::unistd::Uid::effective().is_root() {
        eprintln!("the conntrack benchmark needs root (a namespace and its conntrack table)");
        std::process::exit(1);
    }
    let ns = Netns::new("rpbench-ct");
    let ip = |args: &[&str]| {
        let o = std::process::Command::new("ip")
            .args(["-n", &ns.name])
            .args(args)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    };
    ip(&["link", "add", "d0", "type", "veth", "peer", "name", "d1"]);
    ip(&["addr", "add", &format!("{HOST}/16"), "dev", "d0"]);
    ip(&["link", "set", "d0", "up"]);
    println!(
        "conntrack sweep, one namespace, 1 worker thread (release build when run by cargo bench)"
    );
    for (entries, rules) in [
        (10_000, 1_000),
        (100_000, 1_000),
        (10_000, 10_000),
        (100_000, 10_000),
    ] {
        case(&ns.name, entries, rules);
    }
}
