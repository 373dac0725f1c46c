//! `router.create` and `router.delete` data: JSON -> checked [`RouterSpec`], each violation
//! with its code and JSON path. Bridges are checked later, against the kernel, before any
//! change is made.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use ipnet::IpNet;
use serde_json::Value;

use super::ErrorCode;
use super::command::{
    Reject, as_array, as_object, as_str, child_path, deny_unknown, echo, invalid, missing, reject,
    u64_field,
};
use crate::router::spec::{
    Interface, MAX_ADDRESSES, MAX_INTERFACES, MAX_ROUTES, RESERVED_IFNAMES, Route, RouterSpec,
    is_valid_ifname, is_valid_router_id,
};

const DEFAULT_MTU: u32 = 1500;

fn router_id(obj: &serde_json::Map<String, Value>, parent: &str) -> Result<String, Reject> {
    let path = child_path(parent, "id");
    let id = as_str(obj.get("id").ok_or_else(|| missing(parent, "id"))?, &path)?;
    if !is_valid_router_id(id) {
        return Err(invalid(
            &path,
            format!(
                "router id {} does not match ^[a-z0-9][a-z0-9-]{{0,11}}$",
                echo(id)
            ),
        ));
    }
    Ok(id.to_string())
}

/// `router.delete` data: `{"id": "..."}`.
pub(super) fn decode_router_delete(data: &Value) -> Result<String, Reject> {
    let obj = as_object(data, "$.data")?;
    deny_unknown(obj, &["id"], "$.data")?;
    router_id(obj, "$.data")
}

/// `router.create` data (PROTOCOL.md section 5).
pub(super) fn decode_router(data: &Value) -> Result<RouterSpec, Reject> {
    let path = "$.data";
    let obj = as_object(data, path)?;
    deny_unknown(obj, &["id", "interfaces", "routes"], path)?;
    let id = router_id(obj, path)?;

    let ifaces_path = child_path(path, "interfaces");
    let raw = as_array(
        obj.get("interfaces")
            .ok_or_else(|| missing(path, "interfaces"))?,
        &ifaces_path,
    )?;
    if raw.len() > MAX_INTERFACES {
        return Err(reject(
            ErrorCode::TooMany,
            format!("at most {MAX_INTERFACES} interfaces per router"),
            Some(ifaces_path),
        ));
    }
    let mut interfaces = Vec::with_capacity(raw.len());
    let mut names = BTreeSet::new();
    // Every address of the router, to refuse the same address twice anywhere.
    let mut seen: BTreeMap<IpAddr, String> = BTreeMap::new();
    for (i, v) in raw.iter().enumerate() {
        let p = format!("{ifaces_path}[{i}]");
        let iface = decode_interface(v, &p, &mut seen)?;
        if !names.insert(iface.name.clone()) {
            return Err(reject(
                ErrorCode::DuplicateName,
                format!("interface {} is named twice", iface.name),
                Some(child_path(&p, "name")),
            ));
        }
        interfaces.push(iface);
    }
    check_subnets_disjoint(&interfaces, &ifaces_path)?;

    let routes_path = child_path(path, "routes");
    let mut routes = Vec::new();
    if let Some(v) = obj.get("routes") {
        let raw = as_array(v, &routes_path)?;
        if raw.len() > MAX_ROUTES {
            return Err(reject(
                ErrorCode::TooMany,
                format!("at most {MAX_ROUTES} routes per router"),
                Some(routes_path),
            ));
        }
        let mut destinations = BTreeSet::new();
        for (i, v) in raw.iter().enumerate() {
            let p = format!("{routes_path}[{i}]");
            let route = decode_route(v, &p, &interfaces, &seen)?;
            if !destinations.insert(route.destination) {
                return Err(reject(
                    ErrorCode::DuplicateRoute,
                    format!("a route to {} is given twice", route.destination),
                    Some(child_path(&p, "destination")),
                ));
            }
            routes.push(route);
        }
    }
    Ok(RouterSpec {
        id,
        interfaces,
        routes,
    })
}

/// An interface's `name`: a valid interface name no namespace reserves.
fn interface_name<'a>(
    obj: &'a serde_json::Map<String, Value>,
    path: &str,
) -> Result<&'a str, Reject> {
    let name_path = child_path(path, "name");
    let name = as_str(
        obj.get("name").ok_or_else(|| missing(path, "name"))?,
        &name_path,
    )?;
    if !is_valid_ifname(name) {
        return Err(invalid(
            &name_path,
            format!(
                "interface name {} is not 1-15 of [A-Za-z0-9_.-] starting with a letter or digit",
                echo(name)
            ),
        ));
    }
    if RESERVED_IFNAMES.contains(&name) {
        return Err(invalid(
            &name_path,
            format!(
                "interface name {} is reserved by the kernel or a tunnel module in every namespace",
                echo(name)
            ),
        ));
    }
    Ok(name)
}

/// An interface's `bridge` on the host, if any.
fn bridge(obj: &serde_json::Map<String, Value>, path: &str) -> Result<Option<String>, Reject> {
    Ok(match obj.get("bridge") {
        None | Some(Value::Null) => None,
        Some(v) => {
            let p = child_path(path, "bridge");
            let b = as_str(v, &p)?;
            if !is_valid_ifname(b) {
                return Err(invalid(
                    &p,
                    format!("bridge name {} is not a valid interface name", echo(b)),
                ));
            }
            Some(b.to_string())
        }
    })
}

fn decode_interface(
    v: &Value,
    path: &str,
    seen: &mut BTreeMap<IpAddr, String>,
) -> Result<Interface, Reject> {
    let obj = as_object(v, path)?;
    deny_unknown(obj, &["name", "addresses", "mtu", "bridge"], path)?;
    let name = interface_name(obj, path)?;
    let mtu = match obj.get("mtu") {
        None => DEFAULT_MTU,
        Some(_) => {
            let mtu = u64_field(obj, "mtu", path)?;
            if !(68..=65_535).contains(&mtu) {
                return Err(invalid(
                    &child_path(path, "mtu"),
                    format!("mtu {mtu} is outside 68-65535"),
                ));
            }
            mtu as u32
        }
    };
    let addrs_path = child_path(path, "addresses");
    let mut addresses = Vec::new();
    if let Some(v) = obj.get("addresses") {
        let raw = as_array(v, &addrs_path)?;
        if raw.len() > MAX_ADDRESSES {
            return Err(reject(
                ErrorCode::TooMany,
                format!("at most {MAX_ADDRESSES} addresses per interface"),
                Some(addrs_path),
            ));
        }
        for (i, v) in raw.iter().enumerate() {
            let p = format!("{addrs_path}[{i}]");
            let net = interface_address(as_str(v, &p)?, &p)?;
            if net.addr().is_ipv6() && mtu < 1280 {
                return Err(invalid(
                    &child_path(path, "mtu"),
                    format!("mtu {mtu} is below IPv6's minimum of 1280 and {net} is IPv6"),
                ));
            }
            if let Some(first) = seen.insert(net.addr(), p.clone()) {
                return Err(reject(
                    ErrorCode::DuplicateAddress,
                    format!("address {} is already given at {first}", net.addr()),
                    Some(p),
                ));
            }
            addresses.push(net);
        }
    }
    let bridge = bridge(obj, path)?;
    Ok(Interface {
        name: name.to_string(),
        addresses,
        mtu,
        bridge,
    })
}

/// An interface address: `addr/prefix` with an address a router may own.
fn interface_address(s: &str, path: &str) -> Result<IpNet, Reject> {
    let net: IpNet = s.parse().map_err(|_| {
        invalid(
            path,
            format!(
                "{} is not an address with a prefix length (like 192.168.10.1/24)",
                echo(s)
            ),
        )
    })?;
    let a = net.addr();
    let unusable = a.is_unspecified()
        || a.is_loopback()
        || a.is_multicast()
        || matches!(a, IpAddr::V4(v4) if v4.is_broadcast());
    if unusable {
        return Err(invalid(
            path,
            format!("{a} cannot be a router interface address"),
        ));
    }
    if net.prefix_len() == 0 {
        return Err(invalid(path, format!("{s} has prefix length 0")));
    }
    if let IpNet::V4(v4) = net
        && v4.prefix_len() < 31
        && (v4.addr() == v4.network() || v4.addr() == v4.broadcast())
    {
        return Err(invalid(
            path,
            format!("{s} is the network or broadcast address of its subnet"),
        ));
    }
    Ok(net)
}

/// Two interfaces of one router on overlapping subnets would make its routing ambiguous.
fn check_subnets_disjoint(interfaces: &[Interface], path: &str) -> Result<(), Reject> {
    let mut subnets: Vec<(IpNet, usize, usize)> = interfaces
        .iter()
        .enumerate()
        .flat_map(|(i, iface)| {
            iface
                .addresses
                .iter()
                .enumerate()
                .map(move |(j, a)| (a.trunc(), i, j))
        })
        .collect();
    // Sorted by network, a subnet overlapping another is adjacent to one that contains it.
    subnets.sort();
    let mut open: Vec<(IpNet, usize)> = Vec::new();
    for (net, i, j) in subnets {
        while let Some((top, _)) = open.last() {
            if top.contains(&net.network()) {
                break;
            }
            open.pop();
        }
        if let Some((top, owner)) = open.last()
            && *owner != i
        {
            return Err(invalid(
                &format!("{path}[{i}].addresses[{j}]"),
                format!(
                    "{net} overlaps {top} of interface {}",
                    interfaces[*owner].name
                ),
            ));
        }
        open.push((net, i));
    }
    Ok(())
}

fn decode_route(
    v: &Value,
    path: &str,
    interfaces: &[Interface],
    own: &BTreeMap<IpAddr, String>,
) -> Result<Route, Reject> {
    let obj = as_object(v, path)?;
    deny_unknown(obj, &["destination", "via"], path)?;
    let dpath = child_path(path, "destination");
    let dest = as_str(
        obj.get("destination")
            .ok_or_else(|| missing(path, "destination"))?,
        &dpath,
    )?;
    let destination = crate::firewall::spec::parse_net(dest).map_err(|m| invalid(&dpath, m))?;
    let vpath = child_path(path, "via");
    let via_s = as_str(obj.get("via").ok_or_else(|| missing(path, "via"))?, &vpath)?;
    let via: IpAddr = via_s
        .parse()
        .map_err(|_| invalid(&vpath, format!("{} is not an IP address", echo(via_s))))?;
    if via.is_ipv4() != destination.addr().is_ipv4() {
        return Err(invalid(
            &vpath,
            format!("gateway {via} is not of the same family as {destination}"),
        ));
    }
    if own.contains_key(&via) {
        return Err(reject(
            ErrorCode::UnreachableGateway,
            format!("gateway {via} is one of the router's own addresses"),
            Some(vpath),
        ));
    }
    let reachable = interfaces
        .iter()
        .flat_map(|i| i.addresses.iter())
        .any(|a| a.contains(&via));
    if !reachable {
        return Err(reject(
            ErrorCode::UnreachableGateway,
            format!("gateway {via} is in none of the router's subnets"),
            Some(vpath),
        ));
    }
    Ok(Route { destination, via })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn err(v: Value) -> (ErrorCode, String) {
        let r = decode_router(&v).unwrap_err();
        (r.code, r.field.unwrap_or_default())
    }

    #[test]
    fn the_protocol_example_decodes() {
        let spec = decode_router(&json!({"id":"lr1","interfaces":[{"name":"lif0",
            "addresses":["192.168.10.1/24"],"mtu":1500,"bridge":"br-tenant"}],
            "routes":[{"destination":"0.0.0.0/0","via":"192.168.10.254"}]}))
        .unwrap();
        assert_eq!(spec.id, "lr1");
        assert_eq!(spec.interfaces[0].bridge.as_deref(), Some("br-tenant"));
        assert_eq!(spec.routes.len(), 1);
        assert_eq!(
            RouterSpec::from_json(spec.to_json().as_bytes()).unwrap(),
            spec
        );
    }

    #[test]
    fn each_violation_has_its_code_and_field() {
        let base =
            |ifaces: Value, routes: Value| json!({"id":"lr1","interfaces":ifaces,"routes":routes});
        let cases = [
            (
                json!({"id":"LR","interfaces":[]}),
                ErrorCode::InvalidField,
                "$.data.id",
            ),
            (
                json!({"id":"lr1"}),
                ErrorCode::MissingField,
                "$.data.interfaces",
            ),
            (
                json!({"id":"lr1","interfaces":[],"x":1}),
                ErrorCode::UnknownField,
                "$.data.x",
            ),
            (
                base(json!([{"name":"a;b"}]), json!([])),
                ErrorCode::InvalidField,
                "$.data.interfaces[0].name",
            ),
            (
                base(json!([{"name":"lo"}]), json!([])),
                ErrorCode::InvalidField,
                "$.data.interfaces[0].name",
            ),
            (
                base(json!([{"name":"a"},{"name":"a"}]), json!([])),
                ErrorCode::DuplicateName,
                "$.data.interfaces[1].name",
            ),
            (
                base(json!([{"name":"a","addresses":["10.0.0.1/33"]}]), json!([])),
                ErrorCode::InvalidField,
                "$.data.interfaces[0].addresses[0]",
            ),
            (
                base(json!([{"name":"a","addresses":["10.0.0.0/24"]}]), json!([])),
                ErrorCode::InvalidField,
                "$.data.interfaces[0].addresses[0]",
            ),
            (
                base(
                    json!([{"name":"a","addresses":["10.0.0.1/24"]},{"name":"b","addresses":["10.0.0.1/24"]}]),
                    json!([]),
                ),
                ErrorCode::DuplicateAddress,
                "$.data.interfaces[1].addresses[0]",
            ),
            (
                base(
                    json!([{"name":"a","addresses":["10.0.0.1/24"]},{"name":"b","addresses":["10.0.0.129/25"]}]),
                    json!([]),
                ),
                ErrorCode::InvalidField,
                "$.data.interfaces[1].addresses[0]",
            ),
            (
                base(json!([{"name":"a","mtu":10}]), json!([])),
                ErrorCode::InvalidField,
                "$.data.interfaces[0].mtu",
            ),
            (
                base(
                    json!([{"name":"a","addresses":["fd00::1/64"],"mtu":1000}]),
                    json!([]),
                ),
                ErrorCode::InvalidField,
                "$.data.interfaces[0].mtu",
            ),
            (
                base(json!([{"name":"a","bridge":"br 0"}]), json!([])),
                ErrorCode::InvalidField,
                "$.data.interfaces[0].bridge",
            ),
            (
                base(
                    json!([{"name":"a","addresses":["10.0.0.1/24"]}]),
                    json!([{"destination":"0.0.0.0/0","via":"10.9.0.1"}]),
                ),
                ErrorCode::UnreachableGateway,
                "$.data.routes[0].via",
            ),
            (
                base(
                    json!([{"name":"a","addresses":["10.0.0.1/24"]}]),
                    json!([{"destination":"0.0.0.0/0","via":"10.0.0.1"}]),
                ),
                ErrorCode::UnreachableGateway,
                "$.data.routes[0].via",
            ),
            (
                base(
                    json!([{"name":"a","addresses":["10.0.0.1/24"]}]),
                    json!([{"destination":"::/0","via":"10.0.0.2"}]),
                ),
                ErrorCode::InvalidField,
                "$.data.routes[0].via",
            ),
            (
                base(
                    json!([{"name":"a","addresses":["10.0.0.1/24"]}]),
                    json!([{"destination":"10.8.0.1/16","via":"10.0.0.2"}]),
                ),
                ErrorCode::InvalidField,
                "$.data.routes[0].destination",
            ),
            (
                base(
                    json!([{"name":"a","addresses":["10.0.0.1/24"]}]),
                    json!([{"destination":"10.8.0.0/16","via":"10.0.0.2"},{"destination":"10.8.0.0/16","via":"10.0.0.3"}]),
                ),
                ErrorCode::DuplicateRoute,
                "$.data.routes[1].destination",
            ),
        ];
        for (v, code, field) in cases {
            assert_eq!(err(v.clone()), (code, field.to_string()), "{v}");
        }
    }

    #[test]
    fn delete_takes_only_an_id() {
        assert_eq!(decode_router_delete(&json!({"id":"lr1"})).unwrap(), "lr1");
        assert!(decode_router_delete(&json!({"id":"lr1","x":1})).is_err());
        assert!(decode_router_delete(&json!({"id":"../etc"})).is_err());
    }
}
