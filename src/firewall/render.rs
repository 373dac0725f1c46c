//! Pure rendering: rule set and layout in, nft input text out. Every interpolated value
//! comes from a checked type (validated names, parsed addresses, integers); free text
//! (comments) never appears. One output text is applied as one kernel transaction.

use std::collections::BTreeSet;
use std::fmt::Write;
use std::net::IpAddr;

use ipnet::IpNet;

use super::layout::{Bucket, Hook, Layout};
use super::spec::{Action, Addr, Direction, Iface, Policy, PortRange, Protocol, Rule, RuleSet};

/// What the rendering needs besides the rule set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RenderCtx {
    /// The agent's table (`inet <table>`).
    pub table: String,
    /// The agent's brokers, always reachable: (address, TCP port).
    pub brokers: Vec<(IpAddr, u16)>,
    /// DNS servers always reachable (port 53, UDP and TCP) when a broker is named by a DNS
    /// name, so that no rule set can keep the agent from resolving it again.
    pub resolvers: Vec<IpAddr>,
    /// `firewall.failsafe_in` / `failsafe_out` as (protocol, port).
    pub failsafe_in: Vec<(FailsafeProto, u16)>,
    /// The same, outbound.
    pub failsafe_out: Vec<(FailsafeProto, u16)>,
}

impl RenderCtx {
    /// A table with no failsafe: tests and benchmarks that render without an agent.
    pub fn bare(table: &str) -> RenderCtx {
        RenderCtx {
            table: table.to_string(),
            brokers: vec![],
            resolvers: vec![],
            failsafe_in: vec![],
            failsafe_out: vec![],
        }
    }
}

/// The protocol of a failsafe port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailsafeProto {
    /// `tcp/N`.
    Tcp,
    /// `udp/N`.
    Udp,
}

impl FailsafeProto {
    fn as_str(self) -> &'static str {
        match self {
            FailsafeProto::Tcp => "tcp",
            FailsafeProto::Udp => "udp",
        }
    }
}

/// An address family: each address set is two kernel sets, one per family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Family {
    /// IPv4.
    V4,
    /// IPv6.
    V6,
}

impl Family {
    pub(super) fn of(net: &IpNet) -> Family {
        match net {
            IpNet::V4(_) => Family::V4,
            IpNet::V6(_) => Family::V6,
        }
    }
    fn match_kw(self) -> &'static str {
        match self {
            Family::V4 => "ip",
            Family::V6 => "ip6",
        }
    }
    /// The kernel set holding this family's half of address set `name`.
    pub fn set_name(self, name: &str) -> String {
        match self {
            Family::V4 => format!("as4_{name}"),
            Family::V6 => format!("as6_{name}"),
        }
    }
    fn addr_type(self) -> &'static str {
        match self {
            Family::V4 => "ipv4_addr",
            Family::V6 => "ipv6_addr",
        }
    }
}

/// An inclusive address range, as the kernel's interval sets hold them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Range {
    /// The first address.
    pub start: u128,
    /// The last address.
    pub end: u128,
}

pub(super) fn bounds(net: &IpNet) -> Range {
    match net {
        IpNet::V4(n) => Range {
            start: u32::from(n.network()) as u128,
            end: u32::from(n.broadcast()) as u128,
        },
        IpNet::V6(n) => Range {
            start: u128::from(n.network()),
            end: u128::from(n.broadcast()),
        },
    }
}

/// The disjoint ranges of one family of a set: what the kernel must hold. Overlapping
/// elements are merged; adjacent ones stay apart (the kernel holds them side by side), so
/// adding a neighbour never deletes anything (a deletion costs a kernel grace period).
pub fn merged(elements: &BTreeSet<IpNet>, family: Family) -> Vec<Range> {
    let mut out: Vec<Range> = vec![];
    // BTreeSet<IpNet> orders by address then prefix, so starts ascend within a family.
    for r in elements
        .iter()
        .filter(|n| Family::of(n) == family)
        .map(bounds)
    {
        match out.last_mut() {
            Some(last) if r.start <= last.end => last.end = last.end.max(r.end),
            _ => out.push(r),
        }
    }
    out
}

/// A range as nft spells an element (`10.0.0.0-10.0.0.255`, or one address).
pub fn range_text(r: &Range, family: Family) -> String {
    let show = |v: u128| match family {
        Family::V4 => std::net::Ipv4Addr::from(v as u32).to_string(),
        Family::V6 => std::net::Ipv6Addr::from(v).to_string(),
    };
    if r.start == r.end {
        show(r.start)
    } else {
        format!("{}-{}", show(r.start), show(r.end))
    }
}

fn element_list(ranges: &[Range], family: Family) -> String {
    ranges
        .iter()
        .map(|r| range_text(r, family))
        .collect::<Vec<_>>()
        .join(", ")
}

/// One side's address match of one kernel rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AddrMatch<'a> {
    /// One literal.
    Net(IpNet),
    /// Several literals: an anonymous set.
    Nets(Vec<IpNet>),
    /// A named address set (its family's half).
    Set(&'a str),
}

/// The address alternatives of one side of a rule, for one family. `None`: the side is
/// unconstrained. `Some(empty)`: nothing of this family can match.
fn alternatives(list: &[Addr], family: Family) -> Option<Vec<AddrMatch<'_>>> {
    if list.is_empty() {
        return None;
    }
    // A repeated reference adds nothing but statements: each one is kept once.
    let mut seen = std::collections::HashSet::new();
    let mut alts = vec![];
    let literals: Vec<IpNet> = list
        .iter()
        .filter_map(|a| match a {
            Addr::Net(n) if Family::of(n) == family && seen.insert(a) => Some(*n),
            _ => None,
        })
        .collect();
    match literals.len() {
        0 => {}
        1 => alts.push(AddrMatch::Net(literals[0])),
        _ => alts.push(AddrMatch::Nets(literals)),
    }
    for a in list {
        if let Addr::Set(name) = a
            && seen.insert(a)
        {
            alts.push(AddrMatch::Set(name));
        }
    }
    Some(alts)
}

/// How many kernel rules (one per match alternative) `rule` renders to across all hooks:
/// sources x destinations x interfaces x families after repeated references are removed.
/// Computed without rendering, so a hostile rule is refused before it costs memory.
pub fn expansion(rule: &Rule) -> usize {
    let side = |list: &[Addr], family: Family| -> usize {
        if list.is_empty() {
            return 1;
        }
        let mut seen = std::collections::HashSet::new();
        let mut literals = false;
        let mut sets = 0usize;
        for a in list {
            match a {
                Addr::Net(n) if Family::of(n) == family => literals = true,
                Addr::Set(_) if seen.insert(a) => sets += 1,
                _ => {}
            }
        }
        sets + usize::from(literals)
    };
    let families: &[Family] = match rule.protocol {
        Protocol::Icmp => &[Family::V4],
        Protocol::Icmpv6 => &[Family::V6],
        _ if rule.sources.is_empty() && rule.destinations.is_empty() => &[Family::V4],
        _ => &[Family::V4, Family::V6],
    };
    let per_iface = if matches!(rule.direction, Direction::Both) {
        2
    } else {
        1
    };
    let unique_ifaces: std::collections::HashSet<&Iface> = rule.applied_to.iter().collect();
    let ifaces = unique_ifaces.len().saturating_mul(per_iface).max(1);
    families
        .iter()
        .map(|f| {
            side(&rule.sources, *f)
                .saturating_mul(side(&rule.destinations, *f))
                .saturating_mul(ifaces)
        })
        .fold(0usize, usize::saturating_add)
}

fn verdict(action: Action, tcp: bool) -> &'static str {
    match action {
        Action::Allow => "accept",
        Action::Drop => "drop",
        Action::Reject if tcp => "reject with tcp reset",
        Action::Reject => "reject",
    }
}

/// An interface match of a forward-hook rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IfMatch<'a> {
    /// `iifname`: traffic from the workload.
    In(&'a str),
    /// `oifname`: traffic towards the workload.
    Out(&'a str),
}

/// The layer-4 match of one kernel rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum L4Match<'a> {
    /// No layer-4 match.
    Any,
    /// `meta l4proto P` (tcp or udp without ports, icmp, ipv6-icmp).
    Proto(Protocol),
    /// `tcp dport ...` / `udp dport ...`: one port or range, or an anonymous set.
    Ports {
        /// TCP (else UDP).
        tcp: bool,
        /// The ports and ranges.
        ports: &'a [PortRange],
    },
}

/// What a kernel rule does once it matched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tail<'a> {
    /// Rate-limited logging; a separate rule, as a limit would skip the verdict.
    Log {
        /// The rule id, the log line's prefix.
        id: &'a str,
    },
    /// Counter and verdict, commented with the rule id. `tcp_only` adds `meta l4proto tcp`
    /// (the TCP half of a reject of any protocol); `tcp_reset` rejects with a TCP reset.
    Verdict {
        /// The rule id, the comment (and the counters' owner).
        id: &'a str,
        /// What it does.
        action: Action,
        /// Matches TCP only.
        tcp_only: bool,
        /// Rejects with a TCP reset.
        tcp_reset: bool,
    },
}

/// One kernel rule, in structured form. Both the nft text and the netlink bytecode are
/// made from it, so the two cannot disagree on what a rule matches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KRule<'a> {
    /// The workload interface (forward hook).
    pub iface: Option<IfMatch<'a>>,
    /// The family that the address matches fix (`None`: no address match).
    pub family: Option<Family>,
    /// The source match.
    pub saddr: Option<AddrMatch<'a>>,
    /// The destination match.
    pub daddr: Option<AddrMatch<'a>>,
    /// The protocol and ports.
    pub l4: L4Match<'a>,
    /// What it does.
    pub tail: Tail<'a>,
}

impl KRule<'_> {
    /// The rule as nft text, without the `add rule` prefix.
    pub fn text(&self) -> String {
        let mut t = String::new();
        match self.iface {
            Some(IfMatch::In(name)) => {
                let _ = write!(t, "iifname \"{name}\" ");
            }
            Some(IfMatch::Out(name)) => {
                let _ = write!(t, "oifname \"{name}\" ");
            }
            None => {}
        }
        for (dir, side) in [("saddr", &self.saddr), ("daddr", &self.daddr)] {
            let (Some(m), Some(f)) = (side, self.family) else {
                continue;
            };
            let _ = write!(t, "{} {dir} ", f.match_kw());
            match m {
                AddrMatch::Net(n) => {
                    let _ = write!(t, "{n} ");
                }
                AddrMatch::Nets(ns) => {
                    let list: Vec<String> = ns.iter().map(IpNet::to_string).collect();
                    let _ = write!(t, "{{ {} }} ", list.join(", "));
                }
                AddrMatch::Set(name) => {
                    let _ = write!(t, "@{} ", f.set_name(name));
                }
            }
        }
        match self.l4 {
            L4Match::Any => {}
            L4Match::Proto(p) => {
                let _ = write!(t, "meta l4proto {} ", l4_name(p));
            }
            L4Match::Ports { tcp, ports } => {
                let kw = if tcp { "tcp" } else { "udp" };
                if let [one] = ports {
                    let _ = write!(t, "{kw} dport {} ", one.text());
                } else {
                    let list: Vec<String> = ports.iter().map(PortRange::text).collect();
                    let _ = write!(t, "{kw} dport {{ {} }} ", list.join(", "));
                }
            }
        }
        match self.tail {
            Tail::Log { id } => {
                let _ = write!(
                    t,
                    "limit rate 10/second burst 20 packets log prefix \"rampart:{id} \" level info"
                );
            }
            Tail::Verdict {
                id,
                action,
                tcp_only,
                tcp_reset,
            } => {
                if tcp_only {
                    t.push_str("meta l4proto tcp ");
                }
                let _ = write!(t, "counter {} comment \"{id}\"", verdict(action, tcp_reset));
            }
        }
        t
    }

    /// The rule id this kernel rule carries as its comment (log rules carry none).
    pub fn comment(&self) -> Option<&str> {
        match self.tail {
            Tail::Log { .. } => None,
            Tail::Verdict { id, .. } => Some(id),
        }
    }
}

fn l4_name(p: Protocol) -> &'static str {
    match p {
        Protocol::Tcp => "tcp",
        Protocol::Udp => "udp",
        Protocol::Icmp => "icmp",
        Protocol::Icmpv6 => "ipv6-icmp",
        Protocol::Any => "",
    }
}

/// The nft lines (without chain prefix) of one rule in one hook.
pub fn rule_lines(rule: &Rule, hook: Hook) -> Vec<String> {
    kernel_rules(rule, hook).iter().map(KRule::text).collect()
}

/// The interface matches of a rule in `hook`: only in the forward hook (rules applied to
/// workloads); `None` matches any interface.
fn interface_matches(rule: &Rule, hook: Hook) -> Vec<Option<IfMatch<'_>>> {
    let mut ifmatches: Vec<Option<IfMatch>> = vec![];
    if hook == Hook::Forward {
        for iface in &rule.applied_to {
            if iface.is_all() {
                ifmatches.push(None);
                continue;
            }
            // "in" = towards the workload (leaves by its interface), "out" = from it.
            if matches!(rule.direction, Direction::In | Direction::Both) {
                ifmatches.push(Some(IfMatch::Out(&iface.0)));
            }
            if matches!(rule.direction, Direction::Out | Direction::Both) {
                ifmatches.push(Some(IfMatch::In(&iface.0)));
            }
        }
        let mut seen = std::collections::HashSet::new();
        ifmatches.retain(|m| seen.insert(*m));
    } else {
        ifmatches.push(None);
    }

    ifmatches
}

/// The kernel rules of one rule in one hook: one per match alternative (interface, family,
/// source, destination), each preceded by its log rule when the rule logs.
pub fn kernel_rules(rule: &Rule, hook: Hook) -> Vec<KRule<'_>> {
    let ifmatches = interface_matches(rule, hook);
    let l4 = match rule.protocol {
        Protocol::Any => L4Match::Any,
        Protocol::Tcp | Protocol::Udp if !rule.ports.is_empty() => L4Match::Ports {
            tcp: rule.protocol == Protocol::Tcp,
            ports: &rule.ports,
        },
        p => L4Match::Proto(p),
    };
    let families: Vec<Option<Family>> = match rule.protocol {
        Protocol::Icmp => vec![Some(Family::V4)],
        Protocol::Icmpv6 => vec![Some(Family::V6)],
        _ if rule.sources.is_empty() && rule.destinations.is_empty() => vec![None],
        _ => vec![Some(Family::V4), Some(Family::V6)],
    };

    let id = rule.id.as_str();
    let mut out = vec![];
    for fam in families {
        let (srcs, dsts) = match fam {
            None => (None, None),
            Some(f) => (
                alternatives(&rule.sources, f),
                alternatives(&rule.destinations, f),
            ),
        };
        if srcs.as_ref().is_some_and(Vec::is_empty) || dsts.as_ref().is_some_and(Vec::is_empty) {
            continue; // nothing of this family can match
        }
        // With no address match, the family is not fixed by the rule.
        let family = fam.filter(|_| srcs.is_some() || dsts.is_some());
        let srcs: Vec<Option<AddrMatch>> =
            srcs.map_or(vec![None], |v| v.into_iter().map(Some).collect());
        let dsts: Vec<Option<AddrMatch>> =
            dsts.map_or(vec![None], |v| v.into_iter().map(Some).collect());
        for s in &srcs {
            for d in &dsts {
                for i in &ifmatches {
                    let base = KRule {
                        iface: *i,
                        family,
                        saddr: s.clone(),
                        daddr: d.clone(),
                        l4,
                        tail: Tail::Log { id },
                    };
                    if rule.log {
                        out.push(base.clone());
                    }
                    if rule.action == Action::Reject && rule.protocol == Protocol::Any {
                        out.push(KRule {
                            tail: Tail::Verdict {
                                id,
                                action: rule.action,
                                tcp_only: true,
                                tcp_reset: true,
                            },
                            ..base.clone()
                        });
                    }
                    out.push(KRule {
                        tail: Tail::Verdict {
                            id,
                            action: rule.action,
                            tcp_only: false,
                            tcp_reset: rule.protocol == Protocol::Tcp,
                        },
                        ..base
                    });
                }
            }
        }
    }
    out
}

fn policy_verdict(p: Policy) -> &'static str {
    match p {
        Policy::Allow => "accept",
        Policy::Drop => "drop",
    }
}

/// One rule of a base chain, in structured form (text and bytecode are made from it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BaseRule {
    /// `ct state established,related accept`
    Established,
    /// `ct state invalid drop`
    Invalid,
    /// `iif "lo" accept` (input) or `oif "lo" accept` (output).
    Loopback {
        /// The input hook (else output).
        input: bool,
    },
    /// IPv6 neighbour and router discovery, always let through.
    NeighbourDiscovery,
    /// `tcp dport N accept comment "failsafe"`
    Failsafe {
        /// TCP or UDP.
        proto: FailsafeProto,
        /// The port.
        port: u16,
    },
    /// The way to a broker: `ip daddr A tcp dport P accept comment "failsafe: broker"`.
    Broker {
        /// The broker's address.
        ip: IpAddr,
        /// Its port.
        port: u16,
    },
    /// DNS to a resolver, TCP and UDP port 53.
    Resolver {
        /// The resolver's address.
        ip: IpAddr,
    },
    /// `jump <bucket chain>`
    Jump(String),
    /// The hook's default: `counter accept|drop comment "default"`.
    Default(Policy),
}

fn ip_kw(ip: &IpAddr) -> &'static str {
    if ip.is_ipv4() { "ip" } else { "ip6" }
}

impl BaseRule {
    /// The rule as nft text, without the `add rule` prefix.
    pub fn text(&self) -> String {
        match self {
            BaseRule::Established => "ct state established,related accept".into(),
            BaseRule::Invalid => "ct state invalid drop".into(),
            BaseRule::Loopback { input: true } => "iif \"lo\" accept".into(),
            BaseRule::Loopback { input: false } => "oif \"lo\" accept".into(),
            BaseRule::NeighbourDiscovery => "icmpv6 type { nd-neighbor-solicit, nd-neighbor-advert, nd-router-solicit, nd-router-advert } accept".into(),
            BaseRule::Failsafe { proto, port } => {
                format!("{} dport {port} accept comment \"failsafe\"", proto.as_str())
            }
            BaseRule::Broker { ip, port } => format!(
                "{} daddr {ip} tcp dport {port} accept comment \"failsafe: broker\"",
                ip_kw(ip)
            ),
            BaseRule::Resolver { ip } => format!(
                "{} daddr {ip} meta l4proto {{ tcp, udp }} th dport 53 accept comment \"failsafe: resolver\"",
                ip_kw(ip)
            ),
            BaseRule::Jump(chain) => format!("jump {chain}"),
            BaseRule::Default(p) => format!("counter {} comment \"default\"", policy_verdict(*p)),
        }
    }
}

fn failsafe(ports: &[(FailsafeProto, u16)]) -> impl Iterator<Item = BaseRule> + '_ {
    ports
        .iter()
        .map(|&(proto, port)| BaseRule::Failsafe { proto, port })
}

/// The fixed head of a base chain: stateful handling and the failsafe.
fn base_head(hook: Hook, ctx: &RenderCtx) -> Vec<BaseRule> {
    let mut l = vec![BaseRule::Established, BaseRule::Invalid];
    match hook {
        Hook::Input => {
            l.push(BaseRule::Loopback { input: true });
            l.push(BaseRule::NeighbourDiscovery);
            l.extend(failsafe(&ctx.failsafe_in));
        }
        Hook::Output => {
            l.push(BaseRule::Loopback { input: false });
            l.push(BaseRule::NeighbourDiscovery);
            for (ip, port) in &ctx.brokers {
                l.push(BaseRule::Broker {
                    ip: *ip,
                    port: *port,
                });
            }
            for ip in &ctx.resolvers {
                l.push(BaseRule::Resolver { ip: *ip });
            }
            l.extend(failsafe(&ctx.failsafe_out));
        }
        Hook::Forward => {}
    }
    l
}

/// A base chain's rules: the head, a jump to each bucket chain in order, the default.
pub fn base_rules(hook: Hook, layout: &Layout, default: Policy, ctx: &RenderCtx) -> Vec<BaseRule> {
    let mut l = base_head(hook, ctx);
    for b in layout.buckets(hook) {
        l.push(BaseRule::Jump(b.chain_name(hook)));
    }
    l.push(BaseRule::Default(default));
    l
}

fn base_lines(hook: Hook, layout: &Layout, default: Policy, ctx: &RenderCtx) -> Vec<String> {
    base_rules(hook, layout, default, ctx)
        .iter()
        .map(BaseRule::text)
        .collect()
}

/// The default policy of `hook`'s direction.
pub fn default_of(defaults: &super::spec::Defaults, hook: Hook) -> Policy {
    match hook {
        Hook::Input => defaults.input,
        Hook::Output => defaults.output,
        Hook::Forward => defaults.forward,
    }
}

fn bucket_lines<'a>(
    lookup: impl Fn(&str) -> Option<&'a Rule>,
    hook: Hook,
    bucket: &Bucket,
) -> Vec<String> {
    bucket
        .keys
        .iter()
        .filter_map(|(_, id)| lookup(id))
        .flat_map(|r| rule_lines(r, hook))
        .collect()
}

fn set_decl(out: &mut String, name: &str, family: Family, ranges: &[Range]) {
    let _ = write!(
        out,
        "\tset {} {{\n\t\ttype {}\n\t\tflags interval\n",
        family.set_name(name),
        family.addr_type()
    );
    if !ranges.is_empty() {
        let _ = writeln!(out, "\t\telements = {{ {} }}", element_list(ranges, family));
    }
    out.push_str("\t}\n");
}

fn chain_block(out: &mut String, name: &str, hook_decl: Option<&str>, lines: &[String]) {
    let _ = writeln!(out, "\tchain {name} {{");
    if let Some(h) = hook_decl {
        let _ = writeln!(out, "\t\t{h}");
    }
    for l in lines {
        let _ = writeln!(out, "\t\t{l}");
    }
    out.push_str("\t}\n");
}

/// The whole table, replacing whatever table of that name exists, in one transaction.
pub fn render_full(rs: &RuleSet, layout: &Layout, ctx: &RenderCtx) -> String {
    let t = &ctx.table;
    let mut out = format!("add table inet {t}\ndelete table inet {t}\ntable inet {t} {{\n");
    for (name, elements) in &rs.sets {
        for fam in [Family::V4, Family::V6] {
            set_decl(&mut out, name, fam, &merged(elements, fam));
        }
    }
    for hook in Hook::ALL {
        for b in layout.buckets(hook) {
            let lines = bucket_lines(|id| rs.rules.get(id), hook, b);
            chain_block(&mut out, &b.chain_name(hook), None, &lines);
        }
    }
    for hook in Hook::ALL {
        let decl = format!(
            "type filter hook {} priority filter; policy accept;",
            hook.base_chain()
        );
        let lines = base_lines(hook, layout, default_of(&rs.defaults, hook), ctx);
        chain_block(&mut out, hook.base_chain(), Some(&decl), &lines);
    }
    out.push_str("}\n");
    out
}

/// Text that rewrites one existing chain.
pub fn rewrite_chain(out: &mut String, table: &str, chain: &str, lines: &[String], exists: bool) {
    if exists {
        let _ = writeln!(out, "flush chain inet {table} {chain}");
    } else {
        let _ = writeln!(out, "add chain inet {table} {chain}");
    }
    for l in lines {
        let _ = writeln!(out, "add rule inet {table} {chain} {l}");
    }
}

/// The nft rule lines of `bucket` of `hook`, in evaluation order.
pub fn render_bucket<'a>(
    lookup: impl Fn(&str) -> Option<&'a Rule>,
    hook: Hook,
    bucket: &Bucket,
) -> Vec<String> {
    bucket_lines(lookup, hook, bucket)
}

/// The nft rule lines of `hook`'s base chain: failsafe, jumps to the buckets, default.
pub fn render_base(hook: Hook, layout: &Layout, default: Policy, ctx: &RenderCtx) -> Vec<String> {
    base_lines(hook, layout, default, ctx)
}

/// Set element changes of one family, as nft text (used when netlink is not available).
pub fn element_delta_text(
    out: &mut String,
    table: &str,
    name: &str,
    family: Family,
    removed: &[Range],
    added: &[Range],
) {
    let set = family.set_name(name);
    if !removed.is_empty() {
        let _ = writeln!(
            out,
            "delete element inet {table} {set} {{ {} }}",
            element_list(removed, family)
        );
    }
    if !added.is_empty() {
        let _ = writeln!(
            out,
            "add element inet {table} {set} {{ {} }}",
            element_list(added, family)
        );
    }
}

/// Appends the nft line that makes `family`'s half of address set `name`.
pub fn add_set_text(out: &mut String, table: &str, name: &str, family: Family) {
    let _ = writeln!(
        out,
        "add set inet {table} {} {{ type {}; flags interval; }}",
        family.set_name(name),
        family.addr_type()
    );
}

/// Appends the nft line that deletes `family`'s half of address set `name`.
pub fn delete_set_text(out: &mut String, table: &str, name: &str, family: Family) {
    let _ = writeln!(out, "delete set inet {table} {}", family.set_name(name));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::firewall::spec::{Iface, PortRange};

    fn rule() -> Rule {
        Rule {
            protocol: Protocol::Tcp,
            sources: vec![
                Addr::Set("web".into()),
                Addr::Net("192.0.2.0/24".parse().unwrap()),
            ],
            ports: vec![
                PortRange { lo: 22, hi: 22 },
                PortRange { lo: 8000, hi: 8080 },
            ],
            comment: "never rendered \"; flush ruleset".into(),
            ..Rule::for_test("ssh-in", 100, Direction::In)
        }
    }

    #[test]
    fn a_rule_becomes_one_line_per_alternative_and_family() {
        let lines = rule_lines(&rule(), Hook::Input);
        assert_eq!(
            lines,
            vec![
                "ip saddr 192.0.2.0/24 tcp dport { 22, 8000-8080 } counter accept comment \"ssh-in\"",
                "ip saddr @as4_web tcp dport { 22, 8000-8080 } counter accept comment \"ssh-in\"",
                "ip6 saddr @as6_web tcp dport { 22, 8000-8080 } counter accept comment \"ssh-in\"",
            ]
        );
    }

    #[test]
    fn reject_logs_and_interfaces() {
        let mut r = rule();
        r.action = Action::Reject;
        r.sources = vec![];
        r.ports = vec![];
        r.protocol = Protocol::Any;
        r.log = true;
        r.applied_to = vec![Iface("tap*".into())];
        r.direction = Direction::Both;
        let lines = rule_lines(&r, Hook::Forward);
        assert_eq!(
            lines,
            vec![
                "oifname \"tap*\" limit rate 10/second burst 20 packets log prefix \"rampart:ssh-in \" level info",
                "oifname \"tap*\" meta l4proto tcp counter reject with tcp reset comment \"ssh-in\"",
                "oifname \"tap*\" counter reject comment \"ssh-in\"",
                "iifname \"tap*\" limit rate 10/second burst 20 packets log prefix \"rampart:ssh-in \" level info",
                "iifname \"tap*\" meta l4proto tcp counter reject with tcp reset comment \"ssh-in\"",
                "iifname \"tap*\" counter reject comment \"ssh-in\"",
            ]
        );
    }

    #[test]
    fn merging_joins_overlaps_but_keeps_neighbours_apart() {
        let set: BTreeSet<IpNet> = [
            "10.0.0.0/24",
            "10.0.1.0/24",
            "10.0.0.5/32",
            "10.0.0.0/23",
            "10.0.3.1/32",
            "10.0.4.0/24",
            "10.0.5.0/24",
            "2001:db8::/64",
        ]
        .iter()
        .map(|s| s.parse().unwrap())
        .collect();
        let v4: Vec<String> = merged(&set, Family::V4)
            .iter()
            .map(|r| range_text(r, Family::V4))
            .collect();
        assert_eq!(
            v4,
            vec![
                "10.0.0.0-10.0.1.255",
                "10.0.3.1",
                "10.0.4.0-10.0.4.255",
                "10.0.5.0-10.0.5.255"
            ]
        );
        assert_eq!(merged(&set, Family::V6).len(), 1);
    }

    #[test]
    fn full_render_matches_the_golden_file() {
        let mut rs = RuleSet {
            generation: 1,
            ..Default::default()
        };
        rs.defaults.input = Policy::Drop;
        rs.sets.insert(
            "web".into(),
            ["10.0.1.0/24", "10.0.2.5", "2001:db8::/64"]
                .iter()
                .map(|s| crate::firewall::spec::parse_net(s).unwrap())
                .collect(),
        );
        let r = rule();
        rs.rules.insert(r.id.clone(), r);
        let mut out = rule();
        out.id = "dns-out".into();
        out.direction = Direction::Out;
        out.protocol = Protocol::Udp;
        out.sources = vec![];
        out.destinations = vec![Addr::Net("2001:db8::53/128".parse().unwrap())];
        out.ports = vec![PortRange { lo: 53, hi: 53 }];
        out.action = Action::Drop;
        rs.rules.insert(out.id.clone(), out);
        let ctx = RenderCtx {
            table: "rampart".into(),
            brokers: vec![("192.0.2.10".parse().unwrap(), 5671)],
            resolvers: vec![],
            failsafe_in: vec![(FailsafeProto::Tcp, 22)],
            failsafe_out: vec![],
        };
        let text = render_full(&rs, &Layout::build(rs.rules.values()), &ctx);
        let golden = include_str!("../../tests/golden/full.nft");
        assert_eq!(text, golden, "\n{text}");
        assert!(!text.contains("never rendered"));
    }
}
