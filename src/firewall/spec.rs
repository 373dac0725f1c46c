//! Checked firewall types: what a valid rule set is. Every value here was validated to a
//! strict charset or parsed into a typed value, so rendering may interpolate it safely.

use std::collections::{BTreeMap, BTreeSet};

use ipnet::IpNet;
use serde::Serialize;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

/// What a rule does with the packets it matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// Accept them.
    Allow,
    /// Drop them silently.
    Drop,
    /// Refuse them: a TCP reset, or an ICMP(v6) "administratively prohibited".
    Reject,
}

/// Which traffic a rule applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    /// To the host, or to a workload through it (with `applied_to`).
    In,
    /// From the host, or from a workload through it.
    Out,
    /// Both.
    Both,
}

/// The transport protocol a rule matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// Any (no `ports` then).
    Any,
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
    /// ICMP (IPv4 only).
    Icmp,
    /// ICMPv6 (IPv6 only).
    Icmpv6,
}

/// A default policy: what happens to traffic no rule decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Policy {
    /// Accepted.
    Allow,
    /// Dropped.
    Drop,
}

/// What a firewall change does to open connections that the new rule set denies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Established {
    /// Their conntrack entries are removed before the ack: a deny takes effect on them too.
    #[default]
    Cut,
    /// They carry on (established traffic is accepted ahead of every rule).
    Keep,
}

/// The default policies of the three directions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Defaults {
    /// To the host (`in` on the wire).
    pub input: Policy,
    /// From the host (`out`).
    pub output: Policy,
    /// Through the host (`forward`).
    pub forward: Policy,
}

impl Default for Defaults {
    fn default() -> Self {
        Defaults {
            input: Policy::Allow,
            output: Policy::Allow,
            forward: Policy::Allow,
        }
    }
}

/// A destination port or range (`"22"`, `"8000-8080"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct PortRange {
    /// The first port.
    pub lo: u16,
    /// The last port (`lo` for a single port).
    pub hi: u16,
}

/// One entry of `sources` / `destinations`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Addr {
    /// An address or prefix.
    Net(IpNet),
    /// An address set, by name (`$name` on the wire).
    Set(String),
}

/// An interface pattern of `applied_to`: a name, or a prefix ending in `*`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Iface(pub String);

impl Iface {
    /// `*`: every interface.
    pub fn is_all(&self) -> bool {
        self.0 == "*"
    }
}

/// One checked rule (PROTOCOL.md section 4).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// Its id, unique in the rule set; counters belong to it.
    pub id: String,
    /// Evaluation order: lower first (ties by id).
    pub priority: u32,
    /// What it does.
    pub action: Action,
    /// Which traffic it applies to.
    pub direction: Direction,
    /// The transport protocol.
    pub protocol: Protocol,
    /// Source addresses and sets (empty: any).
    pub sources: Vec<Addr>,
    /// Destination addresses and sets (empty: any).
    pub destinations: Vec<Addr>,
    /// Destination ports (TCP, UDP; empty: any).
    pub ports: Vec<PortRange>,
    /// The workload interfaces it applies to (empty: the host itself).
    pub applied_to: Vec<Iface>,
    /// Matches are logged (rate-limited), prefixed with the rule id.
    pub log: bool,
    /// Kept in the rule set, not in the kernel.
    pub disabled: bool,
    /// Free text; kept in state and shown by the CLI, never rendered into nft input.
    pub comment: String,
}

impl Rule {
    /// Evaluation order: ascending priority, ties by id.
    pub fn key(&self) -> RuleKey {
        (self.priority, self.id.clone())
    }

    /// The address sets it names, sources first.
    pub fn set_refs(&self) -> impl Iterator<Item = &str> {
        self.sources
            .iter()
            .chain(self.destinations.iter())
            .filter_map(|a| match a {
                Addr::Set(s) => Some(s.as_str()),
                Addr::Net(_) => None,
            })
    }
}

impl Rule {
    /// The first set this rule names that does not exist: (name, path below the rule).
    pub fn first_missing_set(&self, exists: impl Fn(&str) -> bool) -> Option<(String, String)> {
        for (list, key) in [
            (&self.sources, "sources"),
            (&self.destinations, "destinations"),
        ] {
            for (i, a) in list.iter().enumerate() {
                if let Addr::Set(name) = a
                    && !exists(name)
                {
                    return Some((name.clone(), format!("{key}[{i}]")));
                }
            }
        }
        None
    }
}

/// A rule's place in evaluation order: (priority, id).
pub type RuleKey = (u32, String);

#[cfg(test)]
impl Rule {
    /// An allow-anything rule for unit tests; tests change the fields they care about.
    pub fn for_test(id: &str, priority: u32, direction: Direction) -> Rule {
        Rule {
            id: id.into(),
            priority,
            action: Action::Allow,
            direction,
            protocol: Protocol::Any,
            sources: vec![],
            destinations: vec![],
            ports: vec![],
            applied_to: vec![],
            log: false,
            disabled: false,
            comment: String::new(),
        }
    }
}

/// A whole, valid rule set.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RuleSet {
    /// Its generation; each change names the one it builds on.
    pub generation: u64,
    /// The default policies.
    pub defaults: Defaults,
    /// What a change does to open connections it denies.
    pub established: Established,
    /// The address sets, by name.
    pub sets: BTreeMap<String, BTreeSet<IpNet>>,
    /// The rules, by id.
    pub rules: BTreeMap<String, Rule>,
}

/// Limits of section 4, configurable.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Most rules.
    pub max_rules: usize,
    /// Most address set elements, all sets together.
    pub max_elements: usize,
    /// Kernel rules one rule may render to (see `render::expansion`).
    pub max_rule_expansion: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_rules: 100_000,
            max_elements: 1_000_000,
            max_rule_expansion: 1_000,
        }
    }
}

impl Limits {
    /// No limits: what restoring the stored state uses, since what was accepted once must
    /// come back even if the limits were lowered since.
    pub const NONE: Limits = Limits {
        max_rules: usize::MAX,
        max_elements: usize::MAX,
        max_rule_expansion: usize::MAX,
    };
}

/// A delta (`firewall.patch`), checked field by field; whether it fits the current rule set
/// is decided when it is applied.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Patch {
    /// The generation it applies to.
    pub base_generation: u64,
    /// The generation it makes.
    pub generation: u64,
    /// Rules added, or replaced by id.
    pub upsert_rules: Vec<Rule>,
    /// Rules removed, by id.
    pub delete_rules: Vec<String>,
    /// Sets made, or replaced whole.
    pub set_address_sets: BTreeMap<String, BTreeSet<IpNet>>,
    /// Addresses added to existing sets.
    pub add_addresses: BTreeMap<String, BTreeSet<IpNet>>,
    /// Addresses removed from existing sets.
    pub remove_addresses: BTreeMap<String, BTreeSet<IpNet>>,
    /// Sets removed (none may still be in use).
    pub delete_address_sets: Vec<String>,
    /// Default policies changed.
    pub defaults: PartialDefaults,
    /// A new `established` behaviour, if any.
    pub established: Option<Established>,
}

/// The default policies a patch changes (`None`: unchanged).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PartialDefaults {
    /// To the host.
    pub input: Option<Policy>,
    /// From the host.
    pub output: Option<Policy>,
    /// Through the host.
    pub forward: Option<Policy>,
}

/// A rule id: 1-64 of `[A-Za-z0-9._:-]`, starting alphanumeric.
pub fn is_valid_rule_id(id: &str) -> bool {
    let b = id.as_bytes();
    !b.is_empty()
        && b.len() <= 64
        && b[0].is_ascii_alphanumeric()
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b':' | b'-'))
}

/// A set name: 1-31 of `[A-Za-z0-9_-]`, starting with a letter (it becomes an nft name).
pub fn is_valid_set_name(name: &str) -> bool {
    let b = name.as_bytes();
    !b.is_empty()
        && b.len() <= 31
        && b[0].is_ascii_alphabetic()
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'-'))
}

/// 1-15 of `[A-Za-z0-9_.-]`, optionally ending in the `*` wildcard; `*` alone is all.
pub fn is_valid_iface(name: &str) -> bool {
    if name == "*" {
        return true;
    }
    // The kernel compares at most IFNAMSIZ-1 = 15 bytes; a wildcard's stem must leave room
    // for at least one more character, or nft refuses the pattern.
    let (stem, max) = match name.strip_suffix('*') {
        Some(stem) => (stem, 14),
        None => (name, 15),
    };
    !stem.is_empty()
        && stem.len() <= max
        && stem
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-'))
}

/// Parses an address or prefix; host bits must be clear so that what the manager sent is
/// exactly what is enforced.
pub fn parse_net(s: &str) -> Result<IpNet, String> {
    // The longest valid text is an IPv6 address with a prefix (under 64 bytes): a longer
    // one is not quoted back, so a hostile value cannot blow up the ack and the log.
    if s.len() > 64 {
        return Err(format!(
            "a value of {} bytes is not an IPv4/IPv6 address or prefix",
            s.len()
        ));
    }
    let net = match s.parse::<std::net::IpAddr>() {
        Ok(ip) => IpNet::from(ip),
        Err(_) => s
            .parse()
            .map_err(|_| format!("{s:?} is not an IPv4/IPv6 address or prefix"))?,
    };
    if let IpNet::V6(v6) = net
        && v6.addr().to_ipv4_mapped().is_some()
    {
        return Err(format!(
            "{s:?} is an IPv4-mapped IPv6 address, which never matches IPv4 traffic: write the IPv4 address"
        ));
    }
    if net.trunc() != net {
        return Err(format!(
            "{s:?} has host bits set (did you mean {}?)",
            net.trunc()
        ));
    }
    Ok(net)
}

/// An address the way the canonical form and the CLI show it: hosts without a prefix.
pub fn net_text(net: &IpNet) -> String {
    if net.prefix_len() == net.max_prefix_len() {
        net.addr().to_string()
    } else {
        net.to_string()
    }
}

impl Policy {
    /// As the wire spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            Policy::Allow => "allow",
            Policy::Drop => "drop",
        }
    }
}

impl Addr {
    /// As the wire spells it (`10.0.0.0/8`, `$web`).
    pub fn text(&self) -> String {
        match self {
            Addr::Net(n) => net_text(n),
            Addr::Set(s) => format!("${s}"),
        }
    }
}

impl PortRange {
    /// As the wire spells it (`22`, `8000-8080`).
    pub fn text(&self) -> String {
        if self.lo == self.hi {
            self.lo.to_string()
        } else {
            format!("{}-{}", self.lo, self.hi)
        }
    }
}

/// A rule in wire form, as the contract spells it (what the manager sent, normalised): in
/// the stored rule set and in `rampart rules`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct WireRule {
    /// See [`Rule::id`].
    pub id: String,
    /// See [`Rule::priority`].
    pub priority: u32,
    /// `allow`, `drop` or `reject`.
    pub action: String,
    /// `in`, `out` or `both`.
    pub direction: String,
    /// `any`, `tcp`, `udp`, `icmp` or `icmpv6`.
    pub protocol: String,
    /// Addresses, prefixes and `$set` names.
    pub sources: Vec<String>,
    /// Addresses, prefixes and `$set` names.
    pub destinations: Vec<String>,
    /// Ports and ranges.
    pub ports: Vec<String>,
    /// Interface names and `prefix*` patterns.
    pub applied_to: Vec<String>,
    /// See [`Rule::log`].
    pub log: bool,
    /// See [`Rule::disabled`].
    pub disabled: bool,
    /// See [`Rule::comment`].
    pub comment: String,
}

impl Rule {
    /// The rule in wire form.
    pub fn wire(&self) -> WireRule {
        // The contract's words for the enums are their serialised names.
        let word = |v: Value| v.as_str().unwrap_or_default().to_string();
        WireRule {
            id: self.id.clone(),
            priority: self.priority,
            action: word(json!(self.action)),
            direction: word(json!(self.direction)),
            protocol: word(json!(self.protocol)),
            sources: self.sources.iter().map(Addr::text).collect(),
            destinations: self.destinations.iter().map(Addr::text).collect(),
            ports: self.ports.iter().map(PortRange::text).collect(),
            applied_to: self.applied_to.iter().map(|i| i.0.clone()).collect(),
            log: self.log,
            disabled: self.disabled,
            comment: self.comment.clone(),
        }
    }

    /// The rule in wire form, as JSON.
    pub fn to_json(&self) -> Value {
        serde_json::to_value(self.wire()).expect("a rule serialises")
    }
}

/// A rule set's generation and size: in heartbeats, metrics and `rampart status`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Counts {
    /// The generation.
    pub generation: u64,
    /// Rules.
    pub rules: usize,
    /// Address sets.
    pub address_sets: usize,
    /// Their elements, all sets together.
    pub elements: usize,
}

impl RuleSet {
    /// Address set elements, all sets together.
    pub fn element_count(&self) -> usize {
        self.sets.values().map(BTreeSet::len).sum()
    }

    /// Canonical JSON: sorted keys, no white space, rules sorted by id, elements sorted.
    pub fn canonical_json(&self) -> String {
        let sets: serde_json::Map<String, Value> = self
            .sets
            .iter()
            .map(|(k, v)| (k.clone(), json!(v.iter().map(net_text).collect::<Vec<_>>())))
            .collect();
        let v = json!({
            "generation": self.generation,
            "defaults": {
                "in": self.defaults.input,
                "out": self.defaults.output,
                "forward": self.defaults.forward,
            },
            "established": self.established,
            "address_sets": sets,
            "rules": self.rules.values().map(Rule::to_json).collect::<Vec<_>>(),
        });
        serde_json::to_string(&v).expect("a JSON value serialises")
    }

    /// SHA-256 of the canonical JSON, hex: equal digests, equal rule sets.
    pub fn digest(&self) -> String {
        hex::encode(Sha256::digest(self.canonical_json().as_bytes()))
    }

    /// Generation and counts, cheap enough for every heartbeat.
    pub fn counts(&self) -> Counts {
        Counts {
            generation: self.generation,
            rules: self.rules.len(),
            address_sets: self.sets.len(),
            elements: self.element_count(),
        }
    }

    /// The counts and digest of the state summary.
    pub fn summary(&self) -> Value {
        json!({
            "generation": self.generation,
            "rules": self.rules.len(),
            "address_sets": self.sets.len(),
            "elements": self.element_count(),
            "digest": self.digest(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Found by the decode fuzz target: a 700-byte "address" was quoted whole in the ack.
    #[test]
    fn a_long_bad_address_is_not_echoed_whole() {
        let junk = format!("{}$web", " 0 , [ [".repeat(100));
        let message = parse_net(&junk).unwrap_err();
        assert!(message.len() < 200, "{message}");
        assert!(message.contains("804 bytes"), "{message}");
    }

    #[test]
    fn names() {
        assert!(is_valid_rule_id("ssh-in"));
        assert!(is_valid_rule_id("a:b.c_d-1"));
        assert!(!is_valid_rule_id("-x"));
        assert!(!is_valid_rule_id("a\"; flush ruleset"));
        assert!(!is_valid_rule_id(&"a".repeat(65)));
        assert!(is_valid_set_name("web-1"));
        assert!(!is_valid_set_name("1web"));
        assert!(!is_valid_set_name("web}"));
        assert!(is_valid_iface("tap*"));
        assert!(is_valid_iface("*"));
        assert!(is_valid_iface("eth0.100"));
        assert!(!is_valid_iface("eth0\""));
        assert!(!is_valid_iface("averyveryverylongname"));
        assert!(!is_valid_iface("**"));
        // The kernel takes 15 characters; a wildcard needs room for one more.
        assert!(is_valid_iface("abcdefghijklmno"));
        assert!(is_valid_iface("abcdefghijklmn*"));
        assert!(!is_valid_iface("abcdefghijklmno*"));
    }

    #[test]
    fn nets() {
        assert_eq!(net_text(&parse_net("10.0.2.5").unwrap()), "10.0.2.5");
        assert_eq!(net_text(&parse_net("10.0.1.0/24").unwrap()), "10.0.1.0/24");
        assert_eq!(
            net_text(&parse_net("2001:db8::/64").unwrap()),
            "2001:db8::/64"
        );
        assert!(
            parse_net("10.0.1.5/24")
                .unwrap_err()
                .contains("10.0.1.0/24")
        );
        assert!(parse_net("10.0.0.0/33").is_err());
        assert!(parse_net("10.0.0.0/8; flush").is_err());
        for mapped in ["::ffff:10.0.0.1", "::ffff:0:0/96", "::ffff:10.0.0.0/120"] {
            let e = parse_net(mapped).unwrap_err();
            assert!(e.contains("IPv4-mapped"), "{mapped}: {e}");
        }
        assert!(parse_net("::/0").is_ok());
        assert!(parse_net("64:ff9b::10.0.0.1").is_ok());
    }

    #[test]
    fn empty_rule_set_digest_is_the_documented_one() {
        let canonical = r#"{"address_sets":{},"defaults":{"forward":"allow","in":"allow","out":"allow"},"established":"cut","generation":0,"rules":[]}"#;
        assert_eq!(RuleSet::default().canonical_json(), canonical);
    }
}
