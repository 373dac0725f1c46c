//! Kernel rules ([`KRule`]) compiled to nftables expressions, exactly as nft 1.0 compiles
//! the text of the same rule (`nft --debug=netlink` shows it): a checked firewall test lists
//! the kernel's table after both and compares.

use ipnet::IpNet;

use std::net::IpAddr;

use super::counters::Seeds;
use super::layout::{Hook, Layout};
use super::render::{
    self, AddrMatch, BaseRule, FailsafeProto, Family, IfMatch, KRule, L4Match, Range, RenderCtx,
    Tail,
};
use super::spec::{Action, Policy, PortRange, Protocol, RuleSet};
use crate::sys::nfnl::Element;
use crate::sys::nfrule::{
    AnonSet, CmpOp, Counts, Expr, FilterHook, MetaKey, NamedSet, NewRule, PayloadBase, SetRef,
    TableBatch,
};

const NFPROTO_IPV4: u8 = 2;
const NFPROTO_IPV6: u8 = 10;
const NF_DROP: u32 = 0;
const NF_ACCEPT: u32 = 1;
const NFT_REJECT_ICMP_UNREACH: u32 = 0;
const NFT_REJECT_TCP_RST: u32 = 1;
const NFT_REJECT_ICMPX_UNREACH: u32 = 2;
const NFT_REJECT_ICMPX_PORT_UNREACH: u8 = 1;
const ICMP_PORT_UNREACH: u8 = 3;
const ICMPV6_PORT_UNREACH: u8 = 4;
const TYPE_IPV4_ADDR: u32 = 7;
const TYPE_IPV6_ADDR: u32 = 8;
const TYPE_INET_PROTOCOL: u32 = 12;
const TYPE_INET_SERVICE: u32 = 13;
const TYPE_ICMPV6_TYPE: u32 = 29;
/// The loopback interface's index, the same in every network namespace.
const LOOPBACK_IFINDEX: u32 = 1;
/// `ct state` bits.
const CT_INVALID: u32 = 1;
const CT_ESTABLISHED_RELATED: u32 = 2 | 4;
/// Neighbour and router solicitations and advertisements.
const ND_TYPES: [u8; 4] = [133, 134, 135, 136];
const IFNAMSIZ: usize = 16;
/// `log level info`.
const LOG_LEVEL_INFO: u32 = 6;

fn l4_number(p: Protocol) -> u8 {
    match p {
        Protocol::Tcp => 6,
        Protocol::Udp => 17,
        Protocol::Icmp => 1,
        Protocol::Icmpv6 => 58,
        Protocol::Any => 0,
    }
}

/// Allocates set ids unique within one batch.
#[derive(Debug, Default)]
pub struct SetIds(u32);

impl SetIds {
    fn next(&mut self) -> u32 {
        self.0 += 1;
        self.0
    }
}

/// Closed intervals `[lo, hi]` over keys of `width` bytes, sorted, with overlapping and
/// adjacent ones joined (nft merges an anonymous interval set's elements so), as the
/// kernel's interval elements: a zero end element when the first does not start at zero,
/// then each start and one-past-its-end, the last one open when it runs to the top.
fn interval_set(mut ranges: Vec<(u128, u128)>, width: usize) -> Vec<Element> {
    ranges.sort_unstable();
    let mut merged: Vec<(u128, u128)> = vec![];
    for (lo, hi) in ranges {
        match merged.last_mut() {
            Some(last) if lo <= last.1.saturating_add(1) => last.1 = last.1.max(hi),
            _ => merged.push((lo, hi)),
        }
    }
    interval_elements(&merged, width)
}

/// Sorted, disjoint intervals as interval-set elements (see [`interval_set`]).
fn interval_elements(merged: &[(u128, u128)], width: usize) -> Vec<Element> {
    let key = |v: u128| v.to_be_bytes()[16 - width..].to_vec();
    let max = if width == 16 {
        u128::MAX
    } else {
        (1u128 << (8 * width)) - 1
    };
    let mut out = vec![];
    if merged.first().is_some_and(|(lo, _)| *lo > 0) {
        out.push(Element {
            key: key(0),
            end: true,
            open: false,
        });
    }
    for &(lo, hi) in merged {
        out.push(Element {
            key: key(lo),
            end: false,
            open: hi == max,
        });
        if hi < max {
            out.push(Element {
                key: key(hi + 1),
                end: true,
                open: false,
            });
        }
    }
    out
}

/// Plain (non-interval) elements: each key once.
fn plain_set(mut keys: Vec<Vec<u8>>) -> Vec<Element> {
    keys.sort_unstable();
    keys.dedup();
    keys.into_iter()
        .map(|key| Element {
            key,
            ..Element::default()
        })
        .collect()
}

fn net_bounds(n: &IpNet) -> (u128, u128) {
    match n {
        IpNet::V4(n) => (
            u32::from(n.network()).into(),
            u32::from(n.broadcast()).into(),
        ),
        IpNet::V6(n) => (n.network().into(), n.broadcast().into()),
    }
}

fn net_bytes(n: &IpNet) -> Vec<u8> {
    match n {
        IpNet::V4(n) => n.network().octets().to_vec(),
        IpNet::V6(n) => n.network().octets().to_vec(),
    }
}

/// Compiles one kernel rule, with the anonymous sets it needs, to go `before` a handle.
pub fn compile(k: &KRule, ids: &mut SetIds, before: Option<u64>) -> NewRule {
    let mut e = vec![];
    let mut sets = vec![];
    match k.iface {
        Some(IfMatch::In(name)) => iface(&mut e, MetaKey::IifName, name),
        Some(IfMatch::Out(name)) => iface(&mut e, MetaKey::OifName, name),
        None => {}
    }
    if let Some(f) = k.family.filter(|_| k.saddr.is_some() || k.daddr.is_some()) {
        let (proto, len, saddr, daddr) = match f {
            Family::V4 => (NFPROTO_IPV4, 4, 12, 16),
            Family::V6 => (NFPROTO_IPV6, 16, 8, 24),
        };
        e.push(Expr::Meta(MetaKey::NfProto));
        e.push(Expr::Cmp(CmpOp::Eq, vec![proto]));
        for (offset, side) in [(saddr, &k.saddr), (daddr, &k.daddr)] {
            if let Some(m) = side {
                address(&mut e, &mut sets, ids, f, offset, len, m);
            }
        }
    }
    match k.l4 {
        L4Match::Any => {}
        L4Match::Proto(p) => l4proto(&mut e, p),
        L4Match::Ports { tcp, ports } => {
            l4proto(&mut e, if tcp { Protocol::Tcp } else { Protocol::Udp });
            e.push(Expr::Payload {
                base: PayloadBase::Transport,
                offset: 2,
                len: 2,
            });
            port_match(&mut e, &mut sets, ids, ports);
        }
    }
    let comment = k.comment().map(str::to_string);
    match k.tail {
        Tail::Log { id } => {
            e.push(Expr::Limit {
                rate: 10,
                unit_s: 1,
                burst: 20,
            });
            e.push(Expr::Log {
                prefix: format!("rampart:{id} "),
                level: LOG_LEVEL_INFO,
            });
        }
        Tail::Verdict {
            action,
            tcp_only,
            tcp_reset,
            ..
        } => {
            if tcp_only {
                l4proto(&mut e, Protocol::Tcp);
            }
            e.push(Expr::Counter(Counts::default()));
            e.push(match action {
                Action::Allow => Expr::Verdict(NF_ACCEPT),
                Action::Drop => Expr::Verdict(NF_DROP),
                Action::Reject => reject(tcp_reset, k.family),
            });
        }
    }
    NewRule {
        exprs: e,
        sets,
        comment,
        before,
    }
}

fn iface(e: &mut Vec<Expr>, key: MetaKey, name: &str) {
    e.push(Expr::Meta(key));
    // A wildcard compares its stem's bytes; a name compares all IFNAMSIZ bytes, padded.
    let value = match name.strip_suffix('*') {
        Some(stem) => stem.as_bytes().to_vec(),
        None => {
            let mut v = name.as_bytes().to_vec();
            v.resize(IFNAMSIZ, 0);
            v
        }
    };
    e.push(Expr::Cmp(CmpOp::Eq, value));
}

fn l4proto(e: &mut Vec<Expr>, p: Protocol) {
    e.push(Expr::Meta(MetaKey::L4Proto));
    e.push(Expr::Cmp(CmpOp::Eq, vec![l4_number(p)]));
}

fn reject(tcp_reset: bool, family: Option<Family>) -> Expr {
    // With the family known from an address match, nft picks that family's ICMP; without
    // it, ICMPX (the kernel answers in the packet's family).
    let (kind, code) = match (tcp_reset, family) {
        (true, _) => (NFT_REJECT_TCP_RST, 0),
        (false, Some(Family::V4)) => (NFT_REJECT_ICMP_UNREACH, ICMP_PORT_UNREACH),
        (false, Some(Family::V6)) => (NFT_REJECT_ICMP_UNREACH, ICMPV6_PORT_UNREACH),
        (false, None) => (NFT_REJECT_ICMPX_UNREACH, NFT_REJECT_ICMPX_PORT_UNREACH),
    };
    Expr::Reject { kind, code }
}

fn address(
    e: &mut Vec<Expr>,
    sets: &mut Vec<AnonSet>,
    ids: &mut SetIds,
    f: Family,
    offset: u32,
    len: u32,
    m: &AddrMatch,
) {
    let load = |e: &mut Vec<Expr>, len: u32| {
        e.push(Expr::Payload {
            base: PayloadBase::Network,
            offset,
            len,
        });
    };
    match m {
        AddrMatch::Net(n) => {
            let bits = u32::from(n.prefix_len());
            let bytes = net_bytes(n);
            if bits > 0 && bits % 8 == 0 {
                // A whole-byte prefix loads only its bytes.
                load(e, bits / 8);
                e.push(Expr::Cmp(CmpOp::Eq, bytes[..(bits / 8) as usize].to_vec()));
            } else {
                load(e, len);
                let mask: Vec<u8> = match n {
                    IpNet::V4(n) => n.netmask().octets().to_vec(),
                    IpNet::V6(n) => n.netmask().octets().to_vec(),
                };
                e.push(Expr::Mask(mask));
                e.push(Expr::Cmp(CmpOp::Eq, bytes));
            }
        }
        AddrMatch::Nets(nets) => {
            load(e, len);
            let (key_type, width) = match f {
                Family::V4 => (TYPE_IPV4_ADDR, 4),
                Family::V6 => (TYPE_IPV6_ADDR, 16),
            };
            let interval = nets.iter().any(|n| n.prefix_len() != n.max_prefix_len());
            let elements = if interval {
                interval_set(nets.iter().map(net_bounds).collect(), width)
            } else {
                plain_set(nets.iter().map(net_bytes).collect())
            };
            let id = ids.next();
            sets.push(AnonSet {
                id,
                key_type,
                key_len: width as u32,
                interval,
                elements,
            });
            e.push(Expr::Lookup(SetRef::Anonymous(id)));
        }
        AddrMatch::Set(name) => {
            load(e, len);
            e.push(Expr::Lookup(SetRef::Named(f.set_name(name))));
        }
    }
}

fn port_match(e: &mut Vec<Expr>, sets: &mut Vec<AnonSet>, ids: &mut SetIds, ports: &[PortRange]) {
    match ports {
        [one] if one.lo == one.hi => e.push(Expr::Cmp(CmpOp::Eq, one.lo.to_be_bytes().to_vec())),
        [one] => {
            e.push(Expr::Cmp(CmpOp::Gte, one.lo.to_be_bytes().to_vec()));
            e.push(Expr::Cmp(CmpOp::Lte, one.hi.to_be_bytes().to_vec()));
        }
        _ => {
            let interval = ports.iter().any(|p| p.lo != p.hi);
            let elements = if interval {
                interval_set(
                    ports.iter().map(|p| (p.lo.into(), p.hi.into())).collect(),
                    2,
                )
            } else {
                plain_set(ports.iter().map(|p| p.lo.to_be_bytes().to_vec()).collect())
            };
            let id = ids.next();
            sets.push(AnonSet {
                id,
                key_type: TYPE_INET_SERVICE,
                key_len: 2,
                interval,
                elements,
            });
            e.push(Expr::Lookup(SetRef::Anonymous(id)));
        }
    }
}

fn anon_plain(sets: &mut Vec<AnonSet>, ids: &mut SetIds, key_type: u32, keys: &[u8]) -> Expr {
    let id = ids.next();
    sets.push(AnonSet {
        id,
        key_type,
        key_len: 1,
        interval: false,
        elements: plain_set(keys.iter().map(|k| vec![*k]).collect()),
    });
    Expr::Lookup(SetRef::Anonymous(id))
}

fn daddr_is(e: &mut Vec<Expr>, ip: &IpAddr) {
    let (proto, offset, bytes) = match ip {
        IpAddr::V4(a) => (NFPROTO_IPV4, 16, a.octets().to_vec()),
        IpAddr::V6(a) => (NFPROTO_IPV6, 24, a.octets().to_vec()),
    };
    e.push(Expr::Meta(MetaKey::NfProto));
    e.push(Expr::Cmp(CmpOp::Eq, vec![proto]));
    e.push(Expr::Payload {
        base: PayloadBase::Network,
        offset,
        len: bytes.len() as u32,
    });
    e.push(Expr::Cmp(CmpOp::Eq, bytes));
}

fn dport_is(e: &mut Vec<Expr>, port: u16) {
    e.push(Expr::Payload {
        base: PayloadBase::Transport,
        offset: 2,
        len: 2,
    });
    e.push(Expr::Cmp(CmpOp::Eq, port.to_be_bytes().to_vec()));
}

/// Compiles one base-chain rule, as nft compiles its text.
pub fn compile_base(b: &BaseRule, ids: &mut SetIds) -> NewRule {
    let mut e = vec![];
    let mut sets = vec![];
    let mut comment = None;
    let accept = Expr::Verdict(NF_ACCEPT);
    match b {
        BaseRule::Established | BaseRule::Invalid => {
            let (bits, verdict) = match b {
                BaseRule::Established => (CT_ESTABLISHED_RELATED, NF_ACCEPT),
                _ => (CT_INVALID, NF_DROP),
            };
            e.push(Expr::CtState);
            e.push(Expr::Mask(bits.to_ne_bytes().to_vec()));
            e.push(Expr::Cmp(CmpOp::Neq, vec![0; 4]));
            e.push(Expr::Verdict(verdict));
        }
        BaseRule::Loopback { input } => {
            e.push(Expr::Meta(if *input { MetaKey::Iif } else { MetaKey::Oif }));
            e.push(Expr::Cmp(
                CmpOp::Eq,
                LOOPBACK_IFINDEX.to_ne_bytes().to_vec(),
            ));
            e.push(accept);
        }
        BaseRule::NeighbourDiscovery => {
            e.push(Expr::Meta(MetaKey::NfProto));
            e.push(Expr::Cmp(CmpOp::Eq, vec![NFPROTO_IPV6]));
            l4proto(&mut e, Protocol::Icmpv6);
            e.push(Expr::Payload {
                base: PayloadBase::Transport,
                offset: 0,
                len: 1,
            });
            e.push(anon_plain(&mut sets, ids, TYPE_ICMPV6_TYPE, &ND_TYPES));
            e.push(accept);
        }
        BaseRule::Failsafe { proto, port } => {
            l4proto(
                &mut e,
                match proto {
                    FailsafeProto::Tcp => Protocol::Tcp,
                    FailsafeProto::Udp => Protocol::Udp,
                },
            );
            dport_is(&mut e, *port);
            e.push(accept);
            comment = Some("failsafe");
        }
        BaseRule::Broker { ip, port } => {
            daddr_is(&mut e, ip);
            l4proto(&mut e, Protocol::Tcp);
            dport_is(&mut e, *port);
            e.push(accept);
            comment = Some("failsafe: broker");
        }
        BaseRule::Resolver { ip } => {
            daddr_is(&mut e, ip);
            e.push(Expr::Meta(MetaKey::L4Proto));
            let tcp_udp = [l4_number(Protocol::Tcp), l4_number(Protocol::Udp)];
            e.push(anon_plain(&mut sets, ids, TYPE_INET_PROTOCOL, &tcp_udp));
            dport_is(&mut e, 53);
            e.push(accept);
            comment = Some("failsafe: resolver");
        }
        BaseRule::Jump(chain) => e.push(Expr::Jump(chain.clone())),
        BaseRule::Default(p) => {
            e.push(Expr::Counter(Counts::default()));
            e.push(Expr::Verdict(match p {
                Policy::Allow => NF_ACCEPT,
                Policy::Drop => NF_DROP,
            }));
            comment = Some("default");
        }
    }
    NewRule {
        exprs: e,
        sets,
        comment: comment.map(str::to_string),
        before: None,
    }
}

fn filter_hook(hook: Hook) -> FilterHook {
    match hook {
        Hook::Input => FilterHook::Input,
        Hook::Output => FilterHook::Output,
        Hook::Forward => FilterHook::Forward,
    }
}

/// The key type and length of a named address set of `family`.
pub fn set_key(family: Family) -> (u32, u32) {
    match family {
        Family::V4 => (TYPE_IPV4_ADDR, 4),
        Family::V6 => (TYPE_IPV6_ADDR, 16),
    }
}

/// The kernel elements of one family of a named set holding `elements`, as nft writes them.
pub fn set_elements(
    elements: &std::collections::BTreeSet<ipnet::IpNet>,
    family: Family,
) -> Vec<Element> {
    named_set_elements(&render::merged(elements, family), family)
}

fn named_set_elements(ranges: &[Range], family: Family) -> Vec<Element> {
    let width = match family {
        Family::V4 => 4,
        Family::V6 => 16,
    };
    let pairs: Vec<(u128, u128)> = ranges.iter().map(|r| (r.start, r.end)).collect();
    interval_elements(&pairs, width)
}

/// The whole table as one batch, the same transaction as [`render::render_full`]'s text:
/// the table made if missing, deleted, and made anew with its sets, bucket chains and base
/// chains. Encoded straight into the batch, one rule at a time.
/// The whole table as one batch; each rule id's first kernel rule starts its counter from
/// `seeds` (the counts of the table it replaces).
pub fn full_table(
    rs: &RuleSet,
    layout: &Layout,
    ctx: &RenderCtx,
    first_seq: u32,
    seeds: &mut Seeds,
) -> (Vec<u8>, Vec<u32>) {
    let mut batch = TableBatch::new(&ctx.table, None, first_seq);
    batch.add_table();
    batch.delete_table();
    batch.add_table();
    let mut ids = SetIds::default();
    for (name, elements) in &rs.sets {
        for (family, key_type, key_len) in [
            (Family::V4, TYPE_IPV4_ADDR, 4),
            (Family::V6, TYPE_IPV6_ADDR, 16),
        ] {
            let set_name = family.set_name(name);
            let els = named_set_elements(&render::merged(elements, family), family);
            let id = ids.next();
            batch.add_named_set(
                NamedSet {
                    name: &set_name,
                    id,
                    key_type,
                    key_len,
                },
                &els,
            );
        }
    }
    for hook in Hook::ALL {
        for b in layout.buckets(hook) {
            let chain = b.chain_name(hook);
            batch.add_chain(&chain, None);
            for (_, id) in &b.keys {
                let Some(rule) = rs.rules.get(id) else {
                    continue;
                };
                for k in render::kernel_rules(rule, hook) {
                    let mut r = compile(&k, &mut ids, None);
                    if let Some(c) = k.comment().and_then(|id| seeds.take(id)) {
                        r.seed_counter(c);
                    }
                    batch.add_rule(&chain, &r);
                }
            }
        }
    }
    for hook in Hook::ALL {
        let chain = hook.base_chain();
        batch.add_chain(chain, Some(filter_hook(hook)));
        let default = render::default_of(&rs.defaults, hook);
        for b in render::base_rules(hook, layout, default, ctx) {
            batch.add_rule(chain, &compile_base(&b, &mut ids));
        }
    }
    batch.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intervals_merge_overlaps_and_neighbours_and_mark_the_top_open() {
        let els = interval_set(vec![(60, 70), (53, 53), (54, 59), (65535, 65535)], 2);
        let keys: Vec<(u16, bool, bool)> = els
            .iter()
            .map(|e| (u16::from_be_bytes([e.key[0], e.key[1]]), e.end, e.open))
            .collect();
        assert_eq!(
            keys,
            vec![
                (0, true, false),
                (53, false, false),
                (71, true, false),
                (65535, false, true)
            ]
        );
        // A set starting at zero needs no leading end element.
        assert!(!interval_set(vec![(0, 5)], 2)[0].end);
    }

    #[test]
    fn prefixes_load_whole_bytes_or_mask() {
        let mut ids = SetIds::default();
        let k = |net: &str| KRule {
            iface: None,
            family: Some(Family::V4),
            saddr: Some(AddrMatch::Net(net.parse().unwrap())),
            daddr: None,
            l4: L4Match::Any,
            tail: Tail::Verdict {
                id: "r",
                action: Action::Reject,
                tcp_only: false,
                tcp_reset: false,
            },
        };
        let r = compile(&k("10.1.0.0/16"), &mut ids, None);
        assert_eq!(
            r.exprs[2..4],
            [
                Expr::Payload {
                    base: PayloadBase::Network,
                    offset: 12,
                    len: 2
                },
                Expr::Cmp(CmpOp::Eq, vec![10, 1])
            ]
        );
        let r = compile(&k("10.0.0.0/20"), &mut ids, None);
        assert_eq!(r.exprs[3], Expr::Mask(vec![255, 255, 240, 0]));
        assert_eq!(
            r.exprs.last(),
            Some(&Expr::Reject {
                kind: NFT_REJECT_ICMP_UNREACH,
                code: ICMP_PORT_UNREACH
            })
        );
    }
}
