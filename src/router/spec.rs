//! Checked router specs: what `router.create` asks for, after validation. Everything here
//! is safe to hand to netlink (names are kernel-legal, addresses parse, routes resolve).

use std::net::IpAddr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// At most this many interfaces per router.
pub const MAX_INTERFACES: usize = 32;
/// At most this many addresses per interface.
pub const MAX_ADDRESSES: usize = 64;
/// At most this many routes per router.
pub const MAX_ROUTES: usize = 256;
/// The prefix of every router namespace (`ip netns list` shows `lr-<id>`).
pub const NETNS_PREFIX: &str = "lr-";
/// The alias the agent puts on every host-side veth end: `rampart <router>/<interface>`.
pub const ALIAS_PREFIX: &str = "rampart ";

/// A logical router as `router.create` describes it (and the store records it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouterSpec {
    /// Its id (the namespace is `rampart-<id>`).
    pub id: String,
    /// Its interfaces, each a veth pair.
    pub interfaces: Vec<Interface>,
    /// Its static routes.
    #[serde(default)]
    pub routes: Vec<Route>,
}

/// One interface of a router: a veth pair, the inner end in the router's namespace.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Interface {
    /// The inner end's name, inside the router namespace.
    pub name: String,
    /// Interface addresses (host bits set), e.g. `192.168.10.1/24`.
    pub addresses: Vec<IpNet>,
    /// Both ends' MTU.
    pub mtu: u32,
    /// The host bridge the host end joins, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bridge: Option<String>,
}

/// A static route of a router.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Route {
    /// The destination prefix.
    pub destination: IpNet,
    /// The next hop (on one of the router's interfaces).
    pub via: IpAddr,
}

impl RouterSpec {
    /// Its network namespace's name.
    pub fn netns(&self) -> String {
        netns_name(&self.id)
    }

    /// The canonical JSON the state store keeps.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("router spec serialises")
    }

    /// A spec from the store's canonical JSON.
    pub fn from_json(bytes: &[u8]) -> Result<RouterSpec, serde_json::Error> {
        serde_json::from_slice(bytes)
    }
}

impl Interface {
    /// The host end's name for this interface of router `router`.
    pub fn host_name(&self, router: &str) -> String {
        host_name(router, &self.name)
    }
}

/// The network namespace of router `id`.
pub fn netns_name(id: &str) -> String {
    format!("{NETNS_PREFIX}{id}")
}

/// `rp` and 10 hex digits of SHA-256(`<router>/<interface>`): 12 characters, deterministic,
/// within the kernel's 15, and the same on every host. The alias names the pair in full.
pub fn host_name(router: &str, interface: &str) -> String {
    let digest = Sha256::digest(format!("{router}/{interface}").as_bytes());
    format!("rp{}", hex::encode(&digest[..5]))
}

/// The inner end's MAC address: locally administered, unicast, from SHA-256 of
/// `mac/<host>/<router>/<interface>`. A router made again (after a reboot, or a namespace
/// deleted by hand) answers with the same MAC, so its neighbours' ARP and ND caches stay
/// right; the same router on two hosts (a fleet with one spec everywhere, bridged onto one
/// segment) gets two MACs.
pub fn inner_mac(host: &str, router: &str, interface: &str) -> [u8; 6] {
    let digest = Sha256::digest(format!("mac/{host}/{router}/{interface}").as_bytes());
    let mut mac = [0u8; 6];
    mac.copy_from_slice(&digest[..6]);
    mac[0] = (mac[0] & 0xfe) | 0x02;
    mac
}

/// Interface names a router may not use: names the kernel reserves in every namespace
/// (`lo`, and `all`/`default` of /proc/sys/net/*/conf), the fallback devices tunnel modules
/// create in every new namespace, and the bonding driver's sysfs entry.
pub const RESERVED_IFNAMES: [&str; 15] = [
    "lo",
    "all",
    "default",
    "tunl0",
    "gre0",
    "gretap0",
    "erspan0",
    "ip_vti0",
    "ip6_vti0",
    "sit0",
    "ip6tnl0",
    "ip6gre0",
    "ip6gretap0",
    "ip6erspan0",
    "bonding_masters",
];

/// The alias of a router's host-side end: `rampart <router>/<interface>`.
pub fn host_alias(router: &str, interface: &str) -> String {
    format!("{ALIAS_PREFIX}{router}/{interface}")
}

/// The router id named by a host-side alias, if the agent made that interface.
pub fn router_of_alias(alias: &str) -> Option<&str> {
    alias.strip_prefix(ALIAS_PREFIX)?.split('/').next()
}

/// `^[a-z0-9][a-z0-9-]{0,11}$`
pub fn is_valid_router_id(id: &str) -> bool {
    let b = id.as_bytes();
    !b.is_empty()
        && b.len() <= 12
        && (b[0].is_ascii_lowercase() || b[0].is_ascii_digit())
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
}

/// A kernel-legal interface name the agent accepts: `^[A-Za-z0-9][A-Za-z0-9_.-]{0,14}$`.
pub fn is_valid_ifname(name: &str) -> bool {
    let b = name.as_bytes();
    !b.is_empty()
        && b.len() <= 15
        && b[0].is_ascii_alphanumeric()
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_names_are_short_stable_and_distinct() {
        let a = host_name("lr1", "lif0");
        assert_eq!(a.len(), 12);
        assert_eq!(a, host_name("lr1", "lif0"));
        assert_ne!(a, host_name("lr1", "lif1"));
        assert_ne!(a, host_name("lr2", "lif0"));
        assert!(is_valid_ifname(&a));
        assert_eq!(router_of_alias(&host_alias("lr1", "lif0")), Some("lr1"));
        assert_eq!(router_of_alias("something else"), None);
        let mac = inner_mac("h1", "lr1", "lif0");
        assert_eq!(mac, inner_mac("h1", "lr1", "lif0"));
        assert_ne!(mac, inner_mac("h1", "lr1", "lif1"));
        assert_ne!(mac, inner_mac("h2", "lr1", "lif0"), "differs between hosts");
        assert_eq!(mac[0] & 0x03, 0x02, "locally administered unicast");
    }

    #[test]
    fn ids_and_names() {
        for ok in ["a", "lr1", "0-x", "abcdefghijkl"] {
            assert!(is_valid_router_id(ok), "{ok}");
        }
        for bad in ["", "-a", "A", "abcdefghijklm", "a_b", "a/b", "a.b"] {
            assert!(!is_valid_router_id(bad), "{bad}");
        }
        for ok in ["lif0", "eth0.10", "a_b-c", "x23456789012345"] {
            assert!(is_valid_ifname(ok), "{ok}");
        }
        for bad in ["", ".", "..", "a/b", "a b", "x234567890123456", "-a", "é"] {
            assert!(!is_valid_ifname(bad), "{bad}");
        }
    }
}
