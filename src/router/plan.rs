//! The pure part of convergence: what the kernel holds for one router ([`Observed`]) against
//! what is wanted ([`RouterSpec`]) gives the ordered [`Step`]s that turn one into the other.
//! Linear in the size of the router; no kernel access here.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use ipnet::IpNet;

use super::spec::{Interface, Route, RouterSpec};

/// One router as the kernel holds it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Observed {
    /// The namespace exists.
    pub namespace: bool,
    /// Its loopback is up.
    pub lo_up: bool,
    /// IPv4 and IPv6 forwarding both on.
    pub forwarding: bool,
    /// Interfaces inside the namespace, by name (loopback left out).
    pub interfaces: BTreeMap<String, ObservedInterface>,
    /// Static routes with a gateway, main table.
    pub routes: BTreeSet<Route>,
}

/// One interface inside a router's namespace, as the kernel holds it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ObservedInterface {
    /// It is a veth (the agent only makes veths).
    pub veth: bool,
    /// It is up.
    pub up: bool,
    /// Its MTU.
    pub mtu: u32,
    /// Its addresses (link-local IPv6 left out).
    pub addresses: BTreeSet<IpNet>,
    /// The host end, when one with the expected name exists.
    pub host: Option<ObservedHost>,
}

/// The host end of a router's interface, as the kernel holds it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ObservedHost {
    /// It is up.
    pub up: bool,
    /// Its MTU.
    pub mtu: u32,
    /// The bridge it is attached to.
    pub bridge: Option<String>,
}

/// One kernel change. Each names its object so a failure can say which step failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Make the namespace, with loopback up and forwarding on.
    CreateNamespace,
    /// Loopback up and forwarding on in an existing namespace.
    EnableNamespace,
    /// Remove a static route.
    RemoveRoute(Route),
    /// Delete the inner end (the kernel deletes the pair).
    RemoveInterface(String),
    /// A veth pair with MTU, both ends up, the host end on its bridge, and the addresses.
    AddInterface(Interface),
    /// Set both ends' MTU.
    SetMtu {
        /// The interface (inner name).
        name: String,
        /// The MTU.
        mtu: u32,
    },
    /// Bring both ends of the interface up.
    SetUp(String),
    /// Put the host end on a bridge, or take it off.
    SetBridge {
        /// The interface (inner name).
        name: String,
        /// The bridge; `None`: none.
        bridge: Option<String>,
    },
    /// Remove an address from the inner end.
    RemoveAddress {
        /// The interface (inner name).
        name: String,
        /// The address.
        address: IpNet,
    },
    /// Add an address to the inner end.
    AddAddress {
        /// The interface (inner name).
        name: String,
        /// The address.
        address: IpNet,
    },
    /// Add a static route.
    AddRoute(Route),
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Step::CreateNamespace => write!(f, "create namespace"),
            Step::EnableNamespace => write!(f, "enable loopback and forwarding"),
            Step::RemoveRoute(r) => write!(f, "remove route {} via {}", r.destination, r.via),
            Step::RemoveInterface(n) => write!(f, "remove interface {n}"),
            Step::AddInterface(i) => write!(f, "add interface {}", i.name),
            Step::SetMtu { name, mtu } => write!(f, "set mtu {mtu} on {name}"),
            Step::SetUp(n) => write!(f, "set {n} up"),
            Step::SetBridge {
                name,
                bridge: Some(b),
            } => write!(f, "attach {name} to {b}"),
            Step::SetBridge { name, bridge: None } => write!(f, "detach {name} from its bridge"),
            Step::RemoveAddress { name, address } => write!(f, "remove {address} from {name}"),
            Step::AddAddress { name, address } => write!(f, "add {address} to {name}"),
            Step::AddRoute(r) => write!(f, "add route {} via {}", r.destination, r.via),
        }
    }
}

/// The steps, in a safe order: namespace, removals (routes, interfaces, addresses) before
/// additions (interfaces, addresses, routes), so a route always finds its subnet.
pub fn plan(want: &RouterSpec, have: &Observed) -> Vec<Step> {
    let mut steps = Vec::new();
    if !have.namespace {
        steps.push(Step::CreateNamespace);
        steps.extend(want.interfaces.iter().cloned().map(Step::AddInterface));
        steps.extend(want.routes.iter().copied().map(Step::AddRoute));
        return steps;
    }
    if !have.lo_up || !have.forwarding {
        steps.push(Step::EnableNamespace);
    }
    let wanted_routes: BTreeSet<Route> = want.routes.iter().copied().collect();
    steps.extend(
        have.routes
            .difference(&wanted_routes)
            .copied()
            .map(Step::RemoveRoute),
    );
    let wanted: BTreeMap<&str, &Interface> = want
        .interfaces
        .iter()
        .map(|i| (i.name.as_str(), i))
        .collect();
    // An inner end that is not a veth, or has lost its host end, is made again.
    let usable = |o: &ObservedInterface| o.veth && o.host.is_some();
    for (name, o) in &have.interfaces {
        if !wanted.contains_key(name.as_str()) || !usable(o) {
            steps.push(Step::RemoveInterface(name.clone()));
        }
    }
    let mut additions = Vec::new();
    for iface in &want.interfaces {
        let Some(o) = have.interfaces.get(&iface.name).filter(|o| usable(o)) else {
            additions.push(Step::AddInterface(iface.clone()));
            continue;
        };
        let host = o.host.as_ref().expect("usable");
        let name = &iface.name;
        if o.mtu != iface.mtu || host.mtu != iface.mtu {
            steps.push(Step::SetMtu {
                name: name.clone(),
                mtu: iface.mtu,
            });
        }
        if !o.up || !host.up {
            steps.push(Step::SetUp(name.clone()));
        }
        if host.bridge != iface.bridge {
            steps.push(Step::SetBridge {
                name: name.clone(),
                bridge: iface.bridge.clone(),
            });
        }
        let wanted_addrs: BTreeSet<IpNet> = iface.addresses.iter().copied().collect();
        for a in o.addresses.difference(&wanted_addrs) {
            steps.push(Step::RemoveAddress {
                name: name.clone(),
                address: *a,
            });
        }
        for a in wanted_addrs.difference(&o.addresses) {
            additions.push(Step::AddAddress {
                name: name.clone(),
                address: *a,
            });
        }
    }
    steps.extend(additions);
    // A route is (re)added when missing, or when a change above may have dropped it: the
    // kernel removes routes whose gateway's subnet went away with an address or interface.
    let touched_subnets = steps.iter().any(|s| {
        matches!(
            s,
            Step::RemoveAddress { .. } | Step::RemoveInterface(_) | Step::AddInterface(_)
        )
    });
    for r in &want.routes {
        if !have.routes.contains(r) || touched_subnets {
            steps.push(Step::AddRoute(*r));
        }
    }
    steps
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> RouterSpec {
        RouterSpec {
            id: "lr1".into(),
            interfaces: vec![Interface {
                name: "lif0".into(),
                addresses: vec!["10.0.0.1/24".parse().unwrap()],
                mtu: 1500,
                bridge: Some("br0".into()),
            }],
            routes: vec![Route {
                destination: "0.0.0.0/0".parse().unwrap(),
                via: "10.0.0.254".parse().unwrap(),
            }],
        }
    }

    fn matching(spec: &RouterSpec) -> Observed {
        Observed {
            namespace: true,
            lo_up: true,
            forwarding: true,
            interfaces: spec
                .interfaces
                .iter()
                .map(|i| {
                    (
                        i.name.clone(),
                        ObservedInterface {
                            veth: true,
                            up: true,
                            mtu: i.mtu,
                            addresses: i.addresses.iter().copied().collect(),
                            host: Some(ObservedHost {
                                up: true,
                                mtu: i.mtu,
                                bridge: i.bridge.clone(),
                            }),
                        },
                    )
                })
                .collect(),
            routes: spec.routes.iter().copied().collect(),
        }
    }

    #[test]
    fn absent_router_is_created_whole() {
        let s = spec();
        let steps = plan(&s, &Observed::default());
        assert_eq!(
            steps,
            vec![
                Step::CreateNamespace,
                Step::AddInterface(s.interfaces[0].clone()),
                Step::AddRoute(s.routes[0])
            ]
        );
    }

    #[test]
    fn equal_router_needs_nothing() {
        let s = spec();
        assert!(plan(&s, &matching(&s)).is_empty());
    }

    #[test]
    fn a_moved_address_is_removed_then_added_and_routes_follow() {
        let s = spec();
        let mut have = matching(&s);
        let iface = have.interfaces.get_mut("lif0").unwrap();
        iface.addresses = ["10.0.0.2/24".parse().unwrap()].into();
        let steps = plan(&s, &have);
        assert_eq!(
            steps,
            vec![
                Step::RemoveAddress {
                    name: "lif0".into(),
                    address: "10.0.0.2/24".parse().unwrap()
                },
                Step::AddAddress {
                    name: "lif0".into(),
                    address: "10.0.0.1/24".parse().unwrap()
                },
                Step::AddRoute(s.routes[0]),
            ]
        );
    }

    #[test]
    fn unwanted_and_broken_interfaces_go_and_come_back() {
        let s = spec();
        let mut have = matching(&s);
        have.interfaces.get_mut("lif0").unwrap().host = None;
        have.interfaces
            .insert("old".into(), ObservedInterface::default());
        have.routes.insert(Route {
            destination: "10.9.0.0/16".parse().unwrap(),
            via: "10.0.0.9".parse().unwrap(),
        });
        have.lo_up = false;
        let steps = plan(&s, &have);
        assert_eq!(steps[0], Step::EnableNamespace);
        assert!(matches!(steps[1], Step::RemoveRoute(_)));
        assert!(steps.contains(&Step::RemoveInterface("old".into())));
        assert!(steps.contains(&Step::RemoveInterface("lif0".into())));
        assert!(steps.contains(&Step::AddInterface(s.interfaces[0].clone())));
        assert_eq!(steps.last(), Some(&Step::AddRoute(s.routes[0])));
    }

    #[test]
    fn mtu_and_bridge_changes_are_in_place() {
        let mut s = spec();
        let have = matching(&s);
        s.interfaces[0].mtu = 9000;
        s.interfaces[0].bridge = None;
        assert_eq!(
            plan(&s, &have),
            vec![
                Step::SetMtu {
                    name: "lif0".into(),
                    mtu: 9000
                },
                Step::SetBridge {
                    name: "lif0".into(),
                    bridge: None
                }
            ]
        );
    }
}
