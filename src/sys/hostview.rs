//! What the conntrack sweep needs to know of the host to judge a connection as the filter
//! hooks did: its own addresses (input and output hooks against forwarding), and its main
//! routing table (the interfaces a forwarded connection enters and leaves by). Read with
//! one rtnetlink dump each, in the namespace of the calling thread.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use futures_util::TryStreamExt;
use netlink_packet_route::address::AddressAttribute;
use netlink_packet_route::link::LinkAttribute;
use netlink_packet_route::route::{RouteAddress, RouteAttribute, RouteHeader, RouteType};
use rtnetlink::RouteMessageBuilder;

/// Longest-prefix match over one family's routes: one hash map per prefix length in use,
/// longest first, so a lookup costs the number of distinct prefix lengths.
#[derive(Debug, Default)]
struct Lpm {
    by_len: Vec<(u8, HashMap<u128, u32>)>,
}

fn bits(a: IpAddr) -> (u128, u8) {
    match a {
        IpAddr::V4(v4) => (u32::from(v4) as u128, 32),
        IpAddr::V6(v6) => (u128::from(v6), 128),
    }
}

fn masked(v: u128, width: u8, len: u8) -> u128 {
    if len == 0 {
        0
    } else {
        let keep = u128::MAX << (width - len);
        let keep = if width == 32 {
            keep & 0xffff_ffff
        } else {
            keep
        };
        v & keep
    }
}

impl Lpm {
    fn insert(&mut self, dest: IpAddr, len: u8, oif: u32) {
        let (v, width) = bits(dest);
        let len = len.min(width);
        let key = masked(v, width, len);
        match self.by_len.iter_mut().find(|(l, _)| *l == len) {
            Some((_, m)) => {
                m.entry(key).or_insert(oif);
            }
            None => {
                self.by_len.push((len, HashMap::from([(key, oif)])));
                self.by_len.sort_by_key(|e| std::cmp::Reverse(e.0));
            }
        }
    }

    fn lookup(&self, a: IpAddr) -> Option<u32> {
        let (v, width) = bits(a);
        self.by_len
            .iter()
            .find_map(|(len, m)| m.get(&masked(v, width, *len)).copied())
    }
}

/// The host as the sweep sees it.
#[derive(Debug, Default)]
pub struct HostView {
    local: HashSet<IpAddr>,
    names: HashMap<u32, String>,
    v4: Lpm,
    v6: Lpm,
}

impl HostView {
    /// Whether packets to `a` are delivered to the host (its addresses, broadcast and
    /// multicast): the input hook rather than forwarding.
    pub fn is_local(&self, a: &IpAddr) -> bool {
        a.is_multicast()
            || a.is_loopback()
            || *a == IpAddr::V4(Ipv4Addr::BROADCAST)
            || self.local.contains(a)
    }

    /// The interface the main table routes `a` by (`None`: no route).
    pub fn route(&self, a: &IpAddr) -> Option<u32> {
        match a {
            IpAddr::V4(_) => self.v4.lookup(*a),
            IpAddr::V6(_) => self.v6.lookup(*a),
        }
    }

    /// The name of interface `index`.
    pub fn name(&self, index: u32) -> Option<&str> {
        self.names.get(&index).map(String::as_str)
    }

    /// A view made by hand, for tests of the judge: local addresses, interfaces, and
    /// routes (destination, prefix length, interface index).
    pub fn from_parts(
        local: impl IntoIterator<Item = IpAddr>,
        names: impl IntoIterator<Item = (u32, String)>,
        routes: impl IntoIterator<Item = (IpAddr, u8, u32)>,
    ) -> HostView {
        let mut v = HostView {
            local: local.into_iter().collect(),
            names: names.into_iter().collect(),
            ..HostView::default()
        };
        for (dest, len, oif) in routes {
            v.add_route(dest, len, oif);
        }
        v
    }

    fn add_route(&mut self, dest: IpAddr, len: u8, oif: u32) {
        match dest {
            IpAddr::V4(_) => self.v4.insert(dest, len, oif),
            IpAddr::V6(_) => self.v6.insert(dest, len, oif),
        }
    }
}

/// Why the host's interfaces, addresses and routes could not be read.
#[derive(Debug, thiserror::Error)]
pub enum HostViewError {
    /// The rtnetlink socket could not be opened.
    #[error("rtnetlink socket: {0}")]
    Socket(#[from] std::io::Error),
    /// A dump failed.
    #[error("reading interfaces, addresses and routes: {0}")]
    Netlink(#[from] rtnetlink::Error),
}

/// Reads the view of the calling thread's namespace.
pub async fn read() -> Result<HostView, HostViewError> {
    let (conn, h, _) = rtnetlink::new_connection()?;
    let task = tokio::spawn(conn);
    let result = read_with(&h).await;
    task.abort();
    Ok(result?)
}

async fn read_with(h: &rtnetlink::Handle) -> Result<HostView, rtnetlink::Error> {
    let mut view = HostView::default();
    let mut links = h.link().get().execute();
    while let Some(m) = links.try_next().await? {
        for a in &m.attributes {
            if let LinkAttribute::IfName(n) = a {
                view.names.insert(m.header.index, n.clone());
            }
        }
    }
    let mut addrs = h.address().get().execute();
    while let Some(m) = addrs.try_next().await? {
        // On a point-to-point link `Address` is the peer's; `Local` is ours when present.
        let (mut local, mut address) = (None, None);
        for a in &m.attributes {
            match a {
                AddressAttribute::Local(ip) => local = Some(*ip),
                AddressAttribute::Address(ip) => address = Some(*ip),
                AddressAttribute::Broadcast(ip) => {
                    view.local.insert(IpAddr::V4(*ip));
                }
                _ => {}
            }
        }
        view.local.extend(local.or(address));
    }
    for family in [
        RouteMessageBuilder::<Ipv4Addr>::new().build(),
        RouteMessageBuilder::<Ipv6Addr>::new().build(),
    ] {
        let mut routes = h.route().get(family).execute();
        while let Some(m) = routes.try_next().await? {
            if m.header.table != RouteHeader::RT_TABLE_MAIN || m.header.kind != RouteType::Unicast {
                continue;
            }
            let mut dest = None;
            let mut oif = None;
            for a in &m.attributes {
                match a {
                    RouteAttribute::Destination(RouteAddress::Inet(v4)) => {
                        dest = Some(IpAddr::V4(*v4));
                    }
                    RouteAttribute::Destination(RouteAddress::Inet6(v6)) => {
                        dest = Some(IpAddr::V6(*v6));
                    }
                    RouteAttribute::Oif(i) => oif = Some(*i),
                    RouteAttribute::MultiPath(hops) => {
                        oif = oif.or(hops.first().map(|h| h.interface_index));
                    }
                    _ => {}
                }
            }
            let dest = dest.unwrap_or(match m.header.address_family {
                netlink_packet_route::AddressFamily::Inet6 => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
                _ => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            });
            if let Some(oif) = oif {
                view.add_route(dest, m.header.destination_prefix_length, oif);
            }
        }
    }
    Ok(view)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn longest_prefix_wins() {
        let v = HostView::from_parts(
            [],
            [],
            [
                ("0.0.0.0".parse().unwrap(), 0, 1),
                ("10.0.0.0".parse().unwrap(), 8, 2),
                ("10.1.2.0".parse().unwrap(), 24, 3),
                ("10.1.2.7".parse().unwrap(), 32, 4),
                ("::".parse().unwrap(), 0, 5),
                ("fd00::".parse().unwrap(), 8, 6),
            ],
        );
        let at = |s: &str| v.route(&s.parse().unwrap());
        assert_eq!(at("10.1.2.7"), Some(4));
        assert_eq!(at("10.1.2.8"), Some(3));
        assert_eq!(at("10.9.9.9"), Some(2));
        assert_eq!(at("192.0.2.1"), Some(1));
        assert_eq!(at("fd12::1"), Some(6));
        assert_eq!(at("2001:db8::1"), Some(5));
    }
}
