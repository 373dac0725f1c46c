//! Which open connections a rule set denies (`"established": "cut"`, contract section 4).
//!
//! The kernel accepts established traffic ahead of every rule, so a new deny rule would
//! leave open connections running. After a change, the agent reads the conntrack table
//! once and judges each entry as its first packet would be judged now: the same base
//! rules, the same kernel rules (built by [`render::kernel_rules`], as the kernel's are),
//! in the same order. Entries the rule set denies are removed.
//!
//! Cost: the judge is compiled once per sweep (linear in the rules); each entry is then
//! judged by its key (hook, interfaces, protocol, addresses, destination port; the source
//! port plays no part in any rule), once per distinct key, and a key is checked only
//! against the rules that can match its protocol and port (an index by port), in order,
//! until the first match. A host with many connections to few services pays for few keys.

use std::collections::{BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::Arc;

use ipnet::IpNet;

use super::layout::{Hook, Layout};
use super::render::{
    self, AddrMatch, BaseRule, Family, IfMatch, KRule, L4Match, Range, RenderCtx, Tail,
};
use super::spec::{Action, Policy, PortRange, Protocol, RuleSet};
use crate::sys::conntrack::Flow;
use crate::sys::hostview::HostView;

const TCP: u8 = 6;
const UDP: u8 = 17;
const ICMP: u8 = 1;
const ICMPV6: u8 = 58;
/// Port ranges up to this wide are indexed port by port; wider ones are checked for every
/// key of their protocol.
const INDEX_RANGE: u16 = 256;

/// A packet as a hook sees it: what rules can match.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Packet {
    /// The hook that sees it.
    pub hook: Hook,
    /// Interface indexes (0: none or unknown).
    pub iif: u32,
    /// The output interface's index (0: none or unknown).
    pub oif: u32,
    /// The IP protocol number.
    pub proto: u8,
    /// The source address.
    pub saddr: IpAddr,
    /// The destination address.
    pub daddr: IpAddr,
    /// Destination port (tcp and udp; 0 for other protocols).
    pub dport: u16,
}

#[derive(Debug)]
enum IfTest {
    /// `iifname` / `oifname`: exact, or the stem of a wildcard.
    In {
        name: String,
        prefix: bool,
    },
    Out {
        name: String,
        prefix: bool,
    },
}

#[derive(Debug)]
enum L4Test {
    Any,
    Proto(u8),
    Ports(u8, Vec<PortRange>),
    /// The resolver failsafe: tcp or udp to one port.
    TcpOrUdp(u16),
}

#[derive(Debug)]
struct Matcher {
    iface: Option<IfTest>,
    family: Option<Family>,
    saddr: Option<Arc<[Range]>>,
    daddr: Option<Arc<[Range]>>,
    l4: L4Test,
    accept: bool,
}

fn family_of(a: &IpAddr) -> Family {
    if a.is_ipv4() { Family::V4 } else { Family::V6 }
}

fn value(a: &IpAddr) -> u128 {
    match a {
        IpAddr::V4(v4) => u32::from(*v4) as u128,
        IpAddr::V6(v6) => u128::from(*v6),
    }
}

fn in_ranges(ranges: &[Range], a: &IpAddr) -> bool {
    let v = value(a);
    let i = ranges.partition_point(|r| r.end < v);
    ranges.get(i).is_some_and(|r| r.start <= v)
}

fn name_matches(name: &str, pattern: &str, prefix: bool) -> bool {
    if prefix {
        name.starts_with(pattern)
    } else {
        name == pattern
    }
}

impl Matcher {
    fn matches(&self, p: &Packet, view: &HostView) -> bool {
        if let Some(f) = self.family
            && f != family_of(&p.saddr)
        {
            return false;
        }
        let ok_l4 = match &self.l4 {
            L4Test::Any => true,
            L4Test::Proto(x) => p.proto == *x,
            L4Test::Ports(x, ports) => {
                p.proto == *x && ports.iter().any(|r| r.lo <= p.dport && p.dport <= r.hi)
            }
            L4Test::TcpOrUdp(port) => matches!(p.proto, TCP | UDP) && p.dport == *port,
        };
        if !ok_l4 {
            return false;
        }
        let addr_ok = |test: &Option<Arc<[Range]>>, a: &IpAddr| match test {
            None => true,
            Some(r) => in_ranges(r, a),
        };
        if !addr_ok(&self.saddr, &p.saddr) || !addr_ok(&self.daddr, &p.daddr) {
            return false;
        }
        match &self.iface {
            None => true,
            Some(IfTest::In { name, prefix }) => view
                .name(p.iif)
                .is_some_and(|n| name_matches(n, name, *prefix)),
            Some(IfTest::Out { name, prefix }) => view
                .name(p.oif)
                .is_some_and(|n| name_matches(n, name, *prefix)),
        }
    }

    /// (protocol, ports) this matcher is confined to, for the index.
    fn port_keys(&self) -> Option<Vec<(u8, u16)>> {
        let (proto, ranges): (u8, &[PortRange]) = match &self.l4 {
            L4Test::Ports(p, r) => (*p, r),
            L4Test::TcpOrUdp(port) => return Some(vec![(TCP, *port), (UDP, *port)]),
            _ => return None,
        };
        if ranges.iter().any(|r| r.hi - r.lo >= INDEX_RANGE) {
            return None;
        }
        Some(
            ranges
                .iter()
                .flat_map(|r| (r.lo..=r.hi).map(move |port| (proto, port)))
                .collect(),
        )
    }
}

fn proto_number(p: Protocol) -> u8 {
    match p {
        Protocol::Tcp => TCP,
        Protocol::Udp => UDP,
        Protocol::Icmp => ICMP,
        Protocol::Icmpv6 => ICMPV6,
        Protocol::Any => 0,
    }
}

fn exact_range(ip: IpAddr) -> Arc<[Range]> {
    let v = value(&ip);
    Arc::from(vec![Range { start: v, end: v }])
}

/// One hook's rules, in order, with the port index.
#[derive(Debug, Default)]
struct HookJudge {
    matchers: Vec<Matcher>,
    /// Matchers confined to one (protocol, port), by it.
    by_port: HashMap<(u8, u16), Vec<u32>>,
    /// All other matchers.
    wide: Vec<u32>,
    default_accept: bool,
}

impl HookJudge {
    fn push(&mut self, m: Matcher) {
        let i = self.matchers.len() as u32;
        match m.port_keys() {
            Some(keys) => {
                for k in keys {
                    let list = self.by_port.entry(k).or_default();
                    if list.last() != Some(&i) {
                        list.push(i);
                    }
                }
            }
            None => self.wide.push(i),
        }
        self.matchers.push(m);
    }

    fn judge(&self, p: &Packet, view: &HostView) -> bool {
        let narrow: &[u32] = self
            .by_port
            .get(&(p.proto, p.dport))
            .map_or(&[], Vec::as_slice);
        // The two lists are ascending: walk them merged, in rule order.
        let (mut a, mut b) = (0, 0);
        loop {
            let next = match (self.wide.get(a), narrow.get(b)) {
                (None, None) => return self.default_accept,
                (Some(x), Some(y)) if x < y => {
                    a += 1;
                    *x
                }
                (Some(x), None) => {
                    a += 1;
                    *x
                }
                (_, Some(y)) => {
                    b += 1;
                    *y
                }
            };
            let m = &self.matchers[next as usize];
            if m.matches(p, view) {
                return m.accept;
            }
        }
    }
}

/// The rule set compiled for judging packets.
pub struct Judge {
    hooks: [HookJudge; 3],
}

fn hook_index(h: Hook) -> usize {
    match h {
        Hook::Input => 0,
        Hook::Output => 1,
        Hook::Forward => 2,
    }
}

/// Ranges of named sets and literal lists, made once per (set, family).
struct Ranges<'a> {
    rs: &'a RuleSet,
    sets: HashMap<(&'a str, Family), Arc<[Range]>>,
}

impl<'a> Ranges<'a> {
    fn of(&mut self, m: &AddrMatch<'a>, family: Family) -> Arc<[Range]> {
        match m {
            AddrMatch::Net(n) => {
                let one: BTreeSet<IpNet> = [*n].into();
                Arc::from(render::merged(&one, family))
            }
            AddrMatch::Nets(ns) => {
                let all: BTreeSet<IpNet> = ns.iter().copied().collect();
                Arc::from(render::merged(&all, family))
            }
            AddrMatch::Set(name) => {
                let rs = self.rs;
                self.sets
                    .entry((name, family))
                    .or_insert_with(|| {
                        let empty = BTreeSet::new();
                        let elements = rs.sets.get(*name).unwrap_or(&empty);
                        Arc::from(render::merged(elements, family))
                    })
                    .clone()
            }
        }
    }
}

fn base_matcher(b: &BaseRule, input: bool) -> Option<Matcher> {
    let plain = |l4: L4Test| Matcher {
        iface: None,
        family: None,
        saddr: None,
        daddr: None,
        l4,
        accept: true,
    };
    Some(match b {
        // The sweep judges a connection by its first packet: state rules do not apply,
        // and neighbour discovery is never tracked.
        BaseRule::Established
        | BaseRule::Invalid
        | BaseRule::NeighbourDiscovery
        | BaseRule::Jump(_)
        | BaseRule::Default(_) => return None,
        BaseRule::Loopback { .. } => {
            let name = "lo".to_string();
            Matcher {
                iface: Some(if input {
                    IfTest::In {
                        name,
                        prefix: false,
                    }
                } else {
                    IfTest::Out {
                        name,
                        prefix: false,
                    }
                }),
                ..plain(L4Test::Any)
            }
        }
        BaseRule::Failsafe { proto, port } => {
            let p = match proto {
                render::FailsafeProto::Tcp => TCP,
                render::FailsafeProto::Udp => UDP,
            };
            plain(L4Test::Ports(
                p,
                vec![PortRange {
                    lo: *port,
                    hi: *port,
                }],
            ))
        }
        BaseRule::Broker { ip, port } => Matcher {
            daddr: Some(exact_range(*ip)),
            family: Some(family_of(ip)),
            ..plain(L4Test::Ports(
                TCP,
                vec![PortRange {
                    lo: *port,
                    hi: *port,
                }],
            ))
        },
        BaseRule::Resolver { ip } => Matcher {
            daddr: Some(exact_range(*ip)),
            family: Some(family_of(ip)),
            ..plain(L4Test::TcpOrUdp(53))
        },
    })
}

fn rule_matcher<'a>(k: &KRule<'a>, ranges: &mut Ranges<'a>) -> Option<Matcher> {
    let Tail::Verdict {
        action, tcp_only, ..
    } = k.tail
    else {
        return None; // log rules decide nothing
    };
    let iface = k.iface.map(|i| {
        let (name, prefix) = match i {
            IfMatch::In(n) | IfMatch::Out(n) => match n.strip_suffix('*') {
                Some(stem) => (stem.to_string(), true),
                None => (n.to_string(), false),
            },
        };
        match i {
            IfMatch::In(_) => IfTest::In { name, prefix },
            IfMatch::Out(_) => IfTest::Out { name, prefix },
        }
    });
    let l4 = if tcp_only {
        L4Test::Proto(TCP)
    } else {
        match k.l4 {
            L4Match::Any => L4Test::Any,
            L4Match::Proto(p) => L4Test::Proto(proto_number(p)),
            L4Match::Ports { tcp, ports } => {
                L4Test::Ports(if tcp { TCP } else { UDP }, ports.to_vec())
            }
        }
    };
    let side = |m: &Option<AddrMatch<'a>>, ranges: &mut Ranges<'a>| match (m, k.family) {
        (Some(m), Some(f)) => Some(ranges.of(m, f)),
        _ => None,
    };
    Some(Matcher {
        iface,
        family: k.family,
        saddr: side(&k.saddr, ranges),
        daddr: side(&k.daddr, ranges),
        l4,
        accept: action == Action::Allow,
    })
}

impl Judge {
    /// Compiles `rs` as laid out in the kernel (`layout`), with the agent's base rules.
    pub fn new(rs: &RuleSet, layout: &Layout, ctx: &RenderCtx) -> Judge {
        let mut ranges = Ranges {
            rs,
            sets: HashMap::new(),
        };
        let mut hooks: [HookJudge; 3] = Default::default();
        for hook in Hook::ALL {
            let h = &mut hooks[hook_index(hook)];
            let default = render::default_of(&rs.defaults, hook);
            for b in render::base_rules(hook, layout, default, ctx) {
                match &b {
                    BaseRule::Jump(_) => {}
                    _ => {
                        if let Some(m) = base_matcher(&b, hook == Hook::Input) {
                            h.push(m);
                        }
                    }
                }
            }
            for bucket in layout.buckets(hook) {
                for (_, id) in &bucket.keys {
                    let Some(rule) = rs.rules.get(id) else {
                        continue;
                    };
                    for k in render::kernel_rules(rule, hook) {
                        if let Some(m) = rule_matcher(&k, &mut ranges) {
                            h.push(m);
                        }
                    }
                }
            }
            h.default_accept = default == Policy::Allow;
        }
        Judge { hooks }
    }

    /// Whether the rule set lets `p` through (as a new connection's first packet).
    pub fn allows(&self, p: &Packet, view: &HostView) -> bool {
        self.hooks[hook_index(p.hook)].judge(p, view)
    }
}

/// The packet that opened `flow`, as the hook that judged it saw it; `None` for traffic
/// between the host's own addresses (loopback, always allowed).
pub fn first_packet(flow: &Flow, view: &HostView) -> Option<Packet> {
    let (daddr, dport) = flow.seen_destination();
    let saddr = flow.src;
    let (src_local, dst_local) = (view.is_local(&saddr), view.is_local(&daddr));
    let route = |a: &IpAddr| view.route(a).unwrap_or(0);
    let (hook, iif, oif) = match (src_local, dst_local) {
        (true, true) => return None,
        (false, true) => (Hook::Input, route(&saddr), 0),
        (true, false) => (Hook::Output, 0, route(&daddr)),
        (false, false) => (Hook::Forward, route(&saddr), route(&daddr)),
    };
    let dport = if matches!(flow.proto, TCP | UDP) {
        dport
    } else {
        0
    };
    Some(Packet {
        hook,
        iif,
        oif,
        proto: flow.proto,
        saddr,
        daddr,
        dport,
    })
}

/// Judges flows with a memo per packet key.
pub struct Sweep<'a> {
    judge: &'a Judge,
    view: &'a HostView,
    memo: HashMap<Packet, bool>,
}

impl<'a> Sweep<'a> {
    /// A sweep judging with `judge` over the host's interfaces and addresses in `view`.
    pub fn new(judge: &'a Judge, view: &'a HostView) -> Sweep<'a> {
        Sweep {
            judge,
            view,
            memo: HashMap::new(),
        }
    }

    /// Whether the rule set denies `flow`.
    pub fn denies(&mut self, flow: &Flow) -> bool {
        let Some(p) = first_packet(flow, self.view) else {
            return false;
        };
        let (judge, view) = (self.judge, self.view);
        !*self.memo.entry(p).or_insert_with(|| judge.allows(&p, view))
    }

    /// Distinct packet keys judged.
    pub fn keys(&self) -> usize {
        self.memo.len()
    }
}

/// Connections the kernel tracks in this namespace (`None`: unknown). Zero, or no conntrack
/// at all, means nothing to sweep.
pub fn tracked_connections() -> Option<u64> {
    match std::fs::read_to_string("/proc/sys/net/netfilter/nf_conntrack_count") {
        Ok(s) => s.trim().parse().ok(),
        // Conntrack is not loaded: nothing is tracked.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Some(0),
        Err(_) => None,
    }
}

/// Why a sweep of open connections failed (the rule set is in force either way).
#[derive(Debug, thiserror::Error)]
pub enum SweepError {
    /// The host's interfaces and addresses could not be read.
    #[error(transparent)]
    HostView(#[from] crate::sys::hostview::HostViewError),
    /// The conntrack table could not be read or changed.
    #[error(transparent)]
    Conntrack(#[from] crate::sys::conntrack::CtError),
}

/// What one sweep found and did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SweepReport {
    /// Conntrack entries read.
    pub entries: usize,
    /// Distinct first packets judged.
    pub keys: usize,
    /// Entries the rule set denies.
    pub denied: usize,
    /// Entries removed (`denied` less those that ended meanwhile; 0 for a count only).
    pub cut: usize,
    /// How long the sweep took.
    pub elapsed_us: u64,
}

/// Reads the conntrack table and judges every entry by `rs`; removes the denied ones
/// unless `count_only`. Runs the blocking part on this worker thread (`block_in_place`).
pub async fn sweep(
    rs: &RuleSet,
    layout: &Layout,
    ctx: &RenderCtx,
    count_only: bool,
) -> Result<SweepReport, SweepError> {
    let started = std::time::Instant::now();
    let view = crate::sys::hostview::read().await?;
    let viewed = started.elapsed();
    tokio::task::block_in_place(|| {
        let judge = Judge::new(rs, layout, ctx);
        let compiled = started.elapsed();
        let mut sweep = Sweep::new(&judge, &view);
        let mut denied = vec![];
        let entries = crate::sys::conntrack::dump(|flow| {
            if sweep.denies(&flow) {
                denied.push(flow);
            }
        })?;
        tracing::debug!(
            view_us = viewed.as_micros() as u64,
            compile_us = (compiled - viewed).as_micros() as u64,
            dump_us = (started.elapsed() - compiled).as_micros() as u64,
            "conntrack sweep: host read, rules compiled, table judged"
        );
        let cut = if count_only || denied.is_empty() {
            0
        } else {
            crate::sys::conntrack::delete(&denied)?
        };
        Ok(SweepReport {
            entries,
            keys: sweep.keys(),
            denied: denied.len(),
            cut,
            elapsed_us: started.elapsed().as_micros() as u64,
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::firewall::spec::{Addr, Defaults, Direction, Iface, Rule};
    use rand::{Rng, SeedableRng};

    fn ctx() -> RenderCtx {
        RenderCtx {
            table: "t".into(),
            brokers: vec![("192.0.2.10".parse().unwrap(), 5671)],
            resolvers: vec![],
            failsafe_in: vec![(render::FailsafeProto::Tcp, 22)],
            failsafe_out: vec![],
        }
    }

    fn view() -> HostView {
        HostView::from_parts(
            ["10.0.0.1".parse().unwrap(), "fd00::1".parse().unwrap()],
            [
                (1, "lo".into()),
                (2, "eth0".into()),
                (3, "tapa".into()),
                (4, "tapb".into()),
            ],
            [
                ("0.0.0.0".parse().unwrap(), 0, 2),
                ("10.3.0.0".parse().unwrap(), 16, 3),
                ("10.4.0.0".parse().unwrap(), 16, 4),
                ("::".parse().unwrap(), 0, 2),
            ],
        )
    }

    fn rule(id: &str, prio: u32, action: Action, dir: Direction) -> Rule {
        Rule {
            action,
            ..Rule::for_test(id, prio, dir)
        }
    }

    fn tcp(ports: &[u16]) -> (Protocol, Vec<PortRange>) {
        (
            Protocol::Tcp,
            ports.iter().map(|p| PortRange { lo: *p, hi: *p }).collect(),
        )
    }

    fn rule_set(rules: Vec<Rule>, defaults: Defaults) -> RuleSet {
        RuleSet {
            generation: 1,
            defaults,
            rules: rules.into_iter().map(|r| (r.id.clone(), r)).collect(),
            ..RuleSet::default()
        }
    }

    fn denies(rs: &RuleSet, flow: &Flow) -> bool {
        let layout = Layout::build(rs.rules.values());
        let judge = Judge::new(rs, &layout, &ctx());
        let v = view();
        Sweep::new(&judge, &v).denies(flow)
    }

    const DROP_IN: Defaults = Defaults {
        input: Policy::Drop,
        output: Policy::Drop,
        forward: Policy::Drop,
    };

    #[test]
    fn host_rules_by_port_source_and_priority() {
        let mut web = rule("web", 20, Action::Allow, Direction::In);
        (web.protocol, web.ports) = tcp(&[80]);
        web.sources = vec![Addr::Net("10.9.0.0/16".parse().unwrap())];
        let mut deny = rule("deny", 10, Action::Drop, Direction::In);
        (deny.protocol, deny.ports) = tcp(&[80]);
        deny.sources = vec![Addr::Net("10.9.9.9/32".parse().unwrap())];
        let rs = rule_set(vec![web, deny], DROP_IN);
        let f = |src: &str, port| Flow::for_test(TCP, src, "10.0.0.1", 40000, port);
        assert!(!denies(&rs, &f("10.9.1.1", 80)), "allowed by web");
        assert!(
            denies(&rs, &f("10.9.9.9", 80)),
            "the priority 10 drop comes first"
        );
        assert!(
            denies(&rs, &f("10.8.1.1", 80)),
            "other source: default drop"
        );
        assert!(denies(&rs, &f("10.9.1.1", 81)), "other port: default drop");
        assert!(!denies(&rs, &f("10.8.1.1", 22)), "the failsafe port");
        // Out: from the host; the broker is always reachable.
        let out = |dst: &str, port| Flow::for_test(TCP, "10.0.0.1", dst, 40000, port);
        assert!(!denies(&rs, &out("192.0.2.10", 5671)), "broker failsafe");
        assert!(denies(&rs, &out("192.0.2.10", 5672)));
        assert!(
            !denies(&rs, &Flow::for_test(TCP, "10.0.0.1", "10.0.0.1", 1, 2)),
            "the host's own traffic goes by loopback"
        );
    }

    #[test]
    fn dnat_is_judged_by_where_the_packet_went() {
        let mut web = rule("web", 1, Action::Allow, Direction::In);
        (web.protocol, web.ports) = tcp(&[8080]);
        let rs = rule_set(vec![web], DROP_IN);
        let to_80 = Flow::for_test(TCP, "10.9.1.1", "10.0.0.1", 40000, 80);
        assert!(denies(&rs, &to_80));
        assert!(!denies(&rs, &to_80.dnat("10.0.0.1", 8080)));
    }

    #[test]
    fn workload_rules_by_interface_and_direction() {
        let mut a = rule("to-a", 1, Action::Allow, Direction::In);
        a.applied_to = vec![Iface("tapa".into())];
        let mut b = rule("from-tap", 2, Action::Allow, Direction::Out);
        b.applied_to = vec![Iface("tap*".into())];
        let rs = rule_set(vec![a, b], DROP_IN);
        let fwd = |src: &str, dst: &str| Flow::for_test(UDP, src, dst, 5000, 53);
        assert!(!denies(&rs, &fwd("192.0.2.1", "10.3.0.5")), "towards tapa");
        assert!(denies(&rs, &fwd("192.0.2.1", "10.4.0.5")), "towards tapb");
        assert!(!denies(&rs, &fwd("10.4.0.5", "192.0.2.1")), "from tap*");
    }

    #[test]
    fn address_sets_are_looked_up() {
        let mut r = rule("s", 1, Action::Drop, Direction::In);
        r.sources = vec![Addr::Set("bad".into())];
        let mut rs = rule_set(vec![r], Defaults::default());
        rs.sets.insert(
            "bad".into(),
            ["10.9.0.0/24".parse().unwrap(), "fd09::/64".parse().unwrap()].into(),
        );
        let f = |src: &str, dst: &str| Flow::for_test(TCP, src, dst, 1, 443);
        assert!(denies(&rs, &f("10.9.0.200", "10.0.0.1")));
        assert!(!denies(&rs, &f("10.9.1.1", "10.0.0.1")));
        assert!(denies(&rs, &f("fd09::5", "fd00::1")));
        assert!(!denies(&rs, &f("fd0a::5", "fd00::1")));
    }

    /// The contract's reading of a rule, written independently of the kernel rules.
    fn naive_matches(r: &Rule, rs: &RuleSet, p: &Packet, v: &HostView) -> bool {
        let hook_ok = if r.applied_to.is_empty() {
            matches!(
                (r.direction, p.hook),
                (Direction::In | Direction::Both, Hook::Input)
                    | (Direction::Out | Direction::Both, Hook::Output)
            )
        } else {
            let name = |i: u32| v.name(i).unwrap_or("").to_string();
            let fits = |n: &str| {
                r.applied_to.iter().any(|i| match i.0.strip_suffix('*') {
                    Some(stem) => n.starts_with(stem),
                    None => i.0 == n,
                })
            };
            p.hook == Hook::Forward
                && match r.direction {
                    Direction::In => fits(&name(p.oif)),
                    Direction::Out => fits(&name(p.iif)),
                    Direction::Both => fits(&name(p.oif)) || fits(&name(p.iif)),
                }
        };
        let proto_ok = r.protocol == Protocol::Any || proto_number(r.protocol) == p.proto;
        let ports_ok =
            r.ports.is_empty() || r.ports.iter().any(|x| x.lo <= p.dport && p.dport <= x.hi);
        let addr_ok = |list: &[Addr], a: &IpAddr| {
            list.is_empty()
                || list.iter().any(|x| match x {
                    Addr::Net(n) => n.contains(a),
                    Addr::Set(s) => rs.sets[s].iter().any(|n| n.contains(a)),
                })
        };
        !r.disabled
            && hook_ok
            && proto_ok
            && ports_ok
            && addr_ok(&r.sources, &p.saddr)
            && addr_ok(&r.destinations, &p.daddr)
    }

    #[test]
    fn the_judge_agrees_with_the_contract_on_random_rule_sets() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let nets = [
            "10.3.0.0/24",
            "10.3.0.7/32",
            "10.4.0.0/16",
            "192.0.2.0/25",
            "fd00::/8",
            "0.0.0.0/0",
        ];
        let addrs = [
            "10.3.0.7",
            "10.3.0.9",
            "10.4.1.1",
            "192.0.2.5",
            "192.0.2.200",
            "10.0.0.1",
            "fd00::5",
            "fd00::1",
            "2001:db8::1",
        ];
        let ifaces = ["tapa", "tapb", "tap*", "eth0", "*"];
        let v = view();
        for round in 0..300 {
            let mut rules = vec![];
            let mut rs = RuleSet::default();
            rs.sets.insert(
                "s".into(),
                [nets[rng.random_range(0..nets.len())].parse().unwrap()].into(),
            );
            for i in 0..rng.random_range(1..12) {
                let action = [Action::Allow, Action::Drop, Action::Reject][rng.random_range(0..3)];
                let dir = [Direction::In, Direction::Out, Direction::Both][rng.random_range(0..3)];
                let mut r = rule(&format!("r{i}"), rng.random_range(0..5), action, dir);
                r.protocol = [
                    Protocol::Any,
                    Protocol::Tcp,
                    Protocol::Udp,
                    Protocol::Icmp,
                    Protocol::Icmpv6,
                ][rng.random_range(0..5)];
                if matches!(r.protocol, Protocol::Tcp | Protocol::Udp) && rng.random_bool(0.6) {
                    let lo = rng.random_range(20..30);
                    r.ports = vec![PortRange {
                        lo,
                        hi: lo + rng.random_range(0..3),
                    }];
                    if rng.random_bool(0.2) {
                        r.ports.push(PortRange {
                            lo: 1000,
                            hi: 60000,
                        });
                    }
                }
                for list in [&mut r.sources, &mut r.destinations] {
                    for _ in 0..rng.random_range(0..3) {
                        list.push(if rng.random_bool(0.3) {
                            Addr::Set("s".into())
                        } else {
                            Addr::Net(nets[rng.random_range(0..nets.len())].parse().unwrap())
                        });
                    }
                }
                if rng.random_bool(0.4) {
                    r.applied_to = vec![Iface(ifaces[rng.random_range(0..ifaces.len())].into())];
                }
                r.disabled = rng.random_bool(0.1);
                rules.push(r);
            }
            let defaults = Defaults {
                input: [Policy::Allow, Policy::Drop][rng.random_range(0..2)],
                output: [Policy::Allow, Policy::Drop][rng.random_range(0..2)],
                forward: [Policy::Allow, Policy::Drop][rng.random_range(0..2)],
            };
            rs.defaults = defaults;
            rs.rules = rules.into_iter().map(|r| (r.id.clone(), r)).collect();
            let layout = Layout::build(rs.rules.values());
            let judge = Judge::new(
                &rs,
                &layout,
                &RenderCtx {
                    failsafe_in: vec![],
                    brokers: vec![],
                    ..ctx()
                },
            );
            for _ in 0..40 {
                let (s, d) = (
                    addrs[rng.random_range(0..addrs.len())],
                    addrs[rng.random_range(0..addrs.len())],
                );
                let (s, d): (IpAddr, IpAddr) = (s.parse().unwrap(), d.parse().unwrap());
                if s.is_ipv4() != d.is_ipv4() {
                    continue;
                }
                let icmp = if s.is_ipv4() { ICMP } else { ICMPV6 };
                let proto = [TCP, UDP, icmp][rng.random_range(0..3)];
                let dport = if proto == icmp {
                    0
                } else {
                    rng.random_range(19..32)
                };
                let flow = Flow::for_test(proto, &s.to_string(), &d.to_string(), 1, dport);
                let Some(p) = first_packet(&flow, &v) else {
                    continue;
                };
                let mut sorted: Vec<&Rule> = rs.rules.values().collect();
                sorted.sort_by_key(|r| r.key());
                let expected = match sorted.iter().find(|r| naive_matches(r, &rs, &p, &v)) {
                    Some(r) => r.action == Action::Allow,
                    None => render::default_of(&rs.defaults, p.hook) == Policy::Allow,
                };
                assert_eq!(
                    judge.allows(&p, &v),
                    expected,
                    "round {round}: {p:?} in {:#?}",
                    rs.rules
                );
            }
        }
    }
}
