//! Routers in the kernel, through rtnetlink: observe one router, carry out planned steps,
//! delete one. Every function here runs on the namespace thread ([`crate::sys::netns::Ctx`]).

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use futures_util::TryStreamExt;
use ipnet::IpNet;
use netlink_packet_route::AddressFamily;
use netlink_packet_route::address::{AddressAttribute, AddressMessage};
use netlink_packet_route::link::{
    InfoData, InfoKind, InfoVeth, LinkAttribute, LinkFlags, LinkInfo, LinkMessage,
};
use netlink_packet_route::route::{RouteAddress, RouteAttribute, RouteHeader, RouteProtocol};
use rtnetlink::{Handle, LinkMessageBuilder, LinkUnspec, LinkVeth, RouteMessageBuilder};

use super::plan::{Observed, ObservedHost, ObservedInterface, Step};
use super::spec::{Interface, Route, RouterSpec, host_alias, router_of_alias};
use crate::sys::netns::{self, Ctx};

/// A kernel operation that failed: which one, and the kernel's reason.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{step}: {cause}")]
pub struct KernelError {
    /// What was being done (`create netns rampart-lr1`, ...).
    pub step: String,
    /// The kernel's reason.
    pub cause: String,
}

fn fail(step: impl ToString) -> impl FnOnce(rtnetlink::Error) -> KernelError {
    move |e| KernelError {
        step: step.to_string(),
        cause: netlink_cause(&e),
    }
}

fn io_fail(step: impl ToString) -> impl FnOnce(std::io::Error) -> KernelError {
    move |e| KernelError {
        step: step.to_string(),
        cause: e.to_string(),
    }
}

fn netlink_cause(e: &rtnetlink::Error) -> String {
    match e {
        rtnetlink::Error::NetlinkError(m) => m.to_io().to_string(),
        other => other.to_string(),
    }
}

fn is_no_device(e: &rtnetlink::Error) -> bool {
    matches!(e, rtnetlink::Error::NetlinkError(m) if m.raw_code().abs() == nix::libc::ENODEV)
}

/// One link as netlink describes it.
#[derive(Debug, Clone)]
struct Link {
    index: u32,
    name: String,
    up: bool,
    mtu: u32,
    kind: Option<InfoKind>,
    controller: Option<u32>,
    alias: Option<String>,
}

impl Link {
    fn from_message(m: &LinkMessage) -> Link {
        let mut link = Link {
            index: m.header.index,
            name: String::new(),
            up: m.header.flags.contains(LinkFlags::Up),
            mtu: 0,
            kind: None,
            controller: None,
            alias: None,
        };
        for a in &m.attributes {
            match a {
                LinkAttribute::IfName(n) => link.name = n.clone(),
                LinkAttribute::Mtu(v) => link.mtu = *v,
                LinkAttribute::Controller(c) => link.controller = Some(*c),
                LinkAttribute::IfAlias(s) => link.alias = Some(s.clone()),
                LinkAttribute::LinkInfo(infos) => {
                    for i in infos {
                        if let LinkInfo::Kind(k) = i {
                            link.kind = Some(k.clone());
                        }
                    }
                }
                _ => {}
            }
        }
        link
    }
}

async fn link_by_name(h: &Handle, name: &str) -> Result<Option<Link>, rtnetlink::Error> {
    let mut links = h.link().get().match_name(name.to_string()).execute();
    match links.try_next().await {
        Ok(m) => Ok(m.as_ref().map(Link::from_message)),
        Err(e) if is_no_device(&e) => Ok(None),
        Err(e) => Err(e),
    }
}

async fn link_by_index(h: &Handle, index: u32) -> Result<Option<Link>, rtnetlink::Error> {
    let mut links = h.link().get().match_index(index).execute();
    match links.try_next().await {
        Ok(m) => Ok(m.as_ref().map(Link::from_message)),
        Err(e) if is_no_device(&e) => Ok(None),
        Err(e) => Err(e),
    }
}

async fn all_links(h: &Handle) -> Result<Vec<Link>, rtnetlink::Error> {
    h.link()
        .get()
        .execute()
        .map_ok(|m| Link::from_message(&m))
        .try_collect()
        .await
}

fn address_of(m: &AddressMessage) -> Option<IpNet> {
    let mut addr = None;
    for a in &m.attributes {
        match a {
            AddressAttribute::Local(ip) => addr = Some(*ip),
            AddressAttribute::Address(ip) if addr.is_none() => addr = Some(*ip),
            _ => {}
        }
    }
    IpNet::new(addr?, m.header.prefix_len).ok()
}

fn route_of(m: &netlink_packet_route::route::RouteMessage) -> Option<Route> {
    if m.header.table != RouteHeader::RT_TABLE_MAIN || m.header.protocol != RouteProtocol::Static {
        return None;
    }
    let ip = |a: &RouteAddress| match a {
        RouteAddress::Inet(v4) => Some(IpAddr::V4(*v4)),
        RouteAddress::Inet6(v6) => Some(IpAddr::V6(*v6)),
        _ => None,
    };
    let mut dest = None;
    let mut via = None;
    for a in &m.attributes {
        match a {
            RouteAttribute::Destination(d) => dest = ip(d),
            RouteAttribute::Gateway(g) => via = ip(g),
            _ => {}
        }
    }
    let via = via?;
    let dest = dest.unwrap_or(match m.header.address_family {
        AddressFamily::Inet6 => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        _ => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
    });
    let destination = IpNet::new(dest, m.header.destination_prefix_length).ok()?;
    Some(Route { destination, via })
}

fn route_message(r: &Route) -> Result<netlink_packet_route::route::RouteMessage, KernelError> {
    RouteMessageBuilder::<IpAddr>::new()
        .destination_prefix(r.destination.addr(), r.destination.prefix_len())
        .and_then(|b| b.gateway(r.via))
        .map(|b| b.build())
        .map_err(|e| KernelError {
            step: format!("route {} via {}", r.destination, r.via),
            cause: e.to_string(),
        })
}

fn address_message(index: u32, a: &IpNet) -> AddressMessage {
    match a.addr() {
        IpAddr::V4(v4) => rtnetlink::AddressMessageBuilder::<Ipv4Addr>::new()
            .index(index)
            .address(v4, a.prefix_len())
            .build(),
        IpAddr::V6(v6) => rtnetlink::AddressMessageBuilder::<Ipv6Addr>::new()
            .index(index)
            .address(v6, a.prefix_len())
            .build(),
    }
}

fn forwarding_on() -> std::io::Result<bool> {
    Ok(netns::read_sysctl("net.ipv4.ip_forward")? == "1"
        && netns::read_sysctl("net.ipv6.conf.all.forwarding")? == "1")
}

fn enable_forwarding() -> std::io::Result<()> {
    netns::write_sysctl("net.ipv4.ip_forward", "1")?;
    netns::write_sysctl("net.ipv6.conf.all.forwarding", "1")
}

/// The host end of a router interface: up, MTU, the bridge it is on (`None`: missing).
async fn observe_host_end(ctx: &Ctx, name: &str) -> Result<Option<ObservedHost>, KernelError> {
    let Some(h) = link_by_name(&ctx.host, name)
        .await
        .map_err(fail("look up host end"))?
    else {
        return Ok(None);
    };
    let bridge = match h.controller {
        None => None,
        Some(i) => link_by_index(&ctx.host, i)
            .await
            .map_err(fail("look up bridge"))?
            .map(|b| b.name),
    };
    Ok(Some(ObservedHost {
        up: h.up,
        mtu: h.mtu,
        bridge,
    }))
}

/// The routes of a router's namespace, both families.
async fn observe_routes(inner: &Handle) -> Result<std::collections::BTreeSet<Route>, KernelError> {
    let mut routes = std::collections::BTreeSet::new();
    for family in [
        RouteMessageBuilder::<Ipv4Addr>::new().build(),
        RouteMessageBuilder::<Ipv6Addr>::new().build(),
    ] {
        let msgs: Vec<_> = inner
            .route()
            .get(family)
            .execute()
            .try_collect()
            .await
            .map_err(fail("list routes"))?;
        routes.extend(msgs.iter().filter_map(route_of));
    }
    Ok(routes)
}

/// The kernel's view of router `spec.id`, with host ends looked up by their names.
pub async fn observe(ctx: &Ctx, spec: &RouterSpec) -> Result<Observed, KernelError> {
    let name = spec.netns();
    let Some(ns) = netns::open_ns(&name).map_err(io_fail(format!("open namespace {name}")))? else {
        return Ok(Observed::default());
    };
    let inner = ctx
        .handle_in(&ns)
        .map_err(io_fail(format!("netlink in {name}")))?;
    let forwarding = ctx
        .with_ns(&ns, forwarding_on)
        .map_err(io_fail("read forwarding sysctls"))?;
    let links = all_links(&inner).await.map_err(fail("list interfaces"))?;
    let mut by_index: HashMap<u32, String> = HashMap::new();
    let mut lo_up = false;
    let mut interfaces = BTreeMap::new();
    for l in links {
        if l.name == "lo" {
            lo_up = l.up;
            continue;
        }
        // Every new namespace gets the fallback devices of loaded tunnel modules (sit0,
        // gre0, tunl0, ...); they cannot be deleted and are not the router's business.
        let named = spec.interfaces.iter().any(|i| i.name == l.name);
        if l.kind != Some(InfoKind::Veth) && !named {
            continue;
        }
        by_index.insert(l.index, l.name.clone());
        let host = observe_host_end(ctx, &super::spec::host_name(&spec.id, &l.name)).await?;
        interfaces.insert(
            l.name.clone(),
            ObservedInterface {
                veth: l.kind == Some(InfoKind::Veth),
                up: l.up,
                mtu: l.mtu,
                addresses: Default::default(),
                host,
            },
        );
    }
    let wanted: std::collections::HashSet<IpNet> = spec
        .interfaces
        .iter()
        .flat_map(|i| i.addresses.iter().copied())
        .collect();
    let addresses: Vec<AddressMessage> = inner
        .address()
        .get()
        .execute()
        .try_collect()
        .await
        .map_err(fail("list addresses"))?;
    for m in &addresses {
        let (Some(a), Some(ifname)) = (address_of(m), by_index.get(&m.header.index)) else {
            continue;
        };
        // The kernel's own IPv6 link-local addresses are not the router's business.
        let kernel_link_local = matches!(a.addr(), IpAddr::V6(v6) if v6.is_unicast_link_local());
        if kernel_link_local && !wanted.contains(&a) {
            continue;
        }
        if let Some(i) = interfaces.get_mut(ifname) {
            i.addresses.insert(a);
        }
    }
    let routes = observe_routes(&inner).await?;
    Ok(Observed {
        namespace: true,
        lo_up,
        forwarding,
        interfaces,
        routes,
    })
}

/// Whether `name` is an existing bridge of the host.
pub async fn is_bridge(ctx: &Ctx, name: &str) -> Result<bool, KernelError> {
    let link = link_by_name(&ctx.host, name)
        .await
        .map_err(fail(format!("look up bridge {name}")))?;
    Ok(matches!(link, Some(l) if l.kind == Some(InfoKind::Bridge)))
}

/// Carries out `steps` for router `spec`, in order, stopping at the first failure.
pub async fn apply(ctx: &Ctx, spec: &RouterSpec, steps: &[Step]) -> Result<(), KernelError> {
    let name = spec.netns();
    let mut ns: Option<(File, Handle)> =
        match netns::open_ns(&name).map_err(io_fail(format!("open namespace {name}")))? {
            Some(f) => {
                let h = ctx
                    .handle_in(&f)
                    .map_err(io_fail(format!("netlink in {name}")))?;
                Some((f, h))
            }
            None => None,
        };
    for step in steps {
        if let Step::CreateNamespace = step {
            let (file, ()) = ctx
                .create_ns(&name, enable_forwarding)
                .map_err(io_fail(step))?;
            let h = ctx.handle_in(&file).map_err(io_fail(step))?;
            set_up(&h, "lo").await.map_err(|e| KernelError {
                step: step.to_string(),
                cause: e,
            })?;
            ns = Some((file, h));
            continue;
        }
        let Some((file, inner)) = &ns else {
            return Err(KernelError {
                step: step.to_string(),
                cause: format!("namespace {name} does not exist"),
            });
        };
        apply_step(ctx, spec, file, inner, step)
            .await
            .map_err(|cause| KernelError {
                step: step.to_string(),
                cause,
            })?;
    }
    Ok(())
}

async fn index_of(h: &Handle, name: &str) -> Result<u32, String> {
    match link_by_name(h, name).await {
        Ok(Some(l)) => Ok(l.index),
        Ok(None) => Err(format!("no interface {name}")),
        Err(e) => Err(netlink_cause(&e)),
    }
}

async fn set_up(h: &Handle, name: &str) -> Result<(), String> {
    let index = index_of(h, name).await?;
    h.link()
        .set(LinkUnspec::new_with_index(index).up().build())
        .execute()
        .await
        .map_err(|e| netlink_cause(&e))
}

async fn set_bridge(ctx: &Ctx, host: &str, bridge: Option<&str>) -> Result<(), String> {
    let index = index_of(&ctx.host, host).await?;
    let msg = LinkUnspec::new_with_index(index);
    let msg = match bridge {
        Some(b) => msg.controller(index_of(&ctx.host, b).await?),
        None => msg.nocontroller(),
    };
    ctx.host
        .link()
        .set(msg.build())
        .execute()
        .await
        .map_err(|e| netlink_cause(&e))
}

async fn add_interface(
    ctx: &Ctx,
    router: &str,
    ns: &File,
    inner: &Handle,
    iface: &Interface,
) -> Result<(), String> {
    use std::os::fd::AsRawFd;
    let host = iface.host_name(router);
    let peer = LinkMessageBuilder::<LinkUnspec>::new()
        .name(iface.name.clone())
        .mtu(iface.mtu)
        .address(super::spec::inner_mac(&ctx.host_id, router, &iface.name).to_vec())
        .setns_by_fd(ns.as_raw_fd())
        .build();
    let msg = LinkVeth::new(&host, &iface.name)
        .set_info_data(InfoData::Veth(InfoVeth::Peer(peer)))
        .mtu(iface.mtu)
        .build();
    ctx.host
        .link()
        .add(msg)
        .execute()
        .await
        .map_err(|e| format!("create veth {host}/{}: {}", iface.name, netlink_cause(&e)))?;
    // The kernel ignores an alias in a create message, and bringing up an end that lives in
    // another namespace in the create message fails with ENOTCONN on some kernels: alias,
    // bridge and up go in one second message.
    let index = index_of(&ctx.host, &host).await?;
    let mut set = LinkUnspec::new_with_index(index)
        .alias(host_alias(router, &iface.name))
        .up();
    if let Some(b) = &iface.bridge {
        set = set.controller(index_of(&ctx.host, b).await?);
    }
    ctx.host
        .link()
        .set(set.build())
        .execute()
        .await
        .map_err(|e| format!("set up {host}: {}", netlink_cause(&e)))?;
    set_up(inner, &iface.name).await?;
    let index = index_of(inner, &iface.name).await?;
    for a in &iface.addresses {
        inner
            .address()
            .add(index, a.addr(), a.prefix_len())
            .execute()
            .await
            .map_err(|e| format!("add {a}: {}", netlink_cause(&e)))?;
    }
    Ok(())
}

async fn apply_step(
    ctx: &Ctx,
    spec: &RouterSpec,
    ns: &File,
    inner: &Handle,
    step: &Step,
) -> Result<(), String> {
    let cause = |e: rtnetlink::Error| netlink_cause(&e);
    match step {
        Step::CreateNamespace => unreachable!("handled by apply"),
        Step::EnableNamespace => {
            ctx.with_ns(ns, enable_forwarding)
                .map_err(|e| e.to_string())?;
            set_up(inner, "lo").await
        }
        Step::RemoveRoute(r) => inner
            .route()
            .del(route_message(r).map_err(|e| e.cause)?)
            .execute()
            .await
            .map_err(cause),
        Step::AddRoute(r) => inner
            .route()
            .add(route_message(r).map_err(|e| e.cause)?)
            .replace()
            .execute()
            .await
            .map_err(cause),
        Step::RemoveInterface(name) => {
            // Gone already is fine: deleting one end of a pair takes the other with it.
            match link_by_name(inner, name).await.map_err(cause)? {
                None => Ok(()),
                Some(l) => match inner.link().del(l.index).execute().await {
                    Err(e) if !is_no_device(&e) => Err(cause(e)),
                    _ => Ok(()),
                },
            }
        }
        Step::AddInterface(iface) => add_interface(ctx, &spec.id, ns, inner, iface).await,
        Step::SetMtu { name, mtu } => {
            let host = super::spec::host_name(&spec.id, name);
            for (h, n) in [(inner, name.as_str()), (&ctx.host, host.as_str())] {
                let index = index_of(h, n).await?;
                h.link()
                    .set(LinkUnspec::new_with_index(index).mtu(*mtu).build())
                    .execute()
                    .await
                    .map_err(cause)?;
            }
            Ok(())
        }
        Step::SetUp(name) => {
            set_up(&ctx.host, &super::spec::host_name(&spec.id, name)).await?;
            set_up(inner, name).await
        }
        Step::SetBridge { name, bridge } => {
            let host = super::spec::host_name(&spec.id, name);
            set_bridge(ctx, &host, bridge.as_deref()).await
        }
        Step::RemoveAddress { name, address } => {
            let index = index_of(inner, name).await?;
            inner
                .address()
                .del(address_message(index, address))
                .execute()
                .await
                .map_err(cause)
        }
        Step::AddAddress { name, address } => {
            let index = index_of(inner, name).await?;
            inner
                .address()
                .add(index, address.addr(), address.prefix_len())
                .replace()
                .execute()
                .await
                .map_err(cause)
        }
    }
}

/// Removes router `id`: its namespace, and the named host ends that carry its alias.
/// Unmounting the namespace lets the kernel tear all its interfaces down in one batch (one
/// RCU grace period, where deleting veths one by one costs one each); the host ends go
/// with their peers, and are waited for so that their names are free when this returns.
/// An end still there after that (something else holds the namespace open) is deleted.
pub async fn delete(ctx: &Ctx, id: &str, host_ends: &[String]) -> Result<(), KernelError> {
    let name = super::spec::netns_name(id);
    netns::remove_ns(&name).map_err(io_fail(format!("remove namespace {name}")))?;
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_millis(500);
    for end in host_ends {
        loop {
            let link = link_by_name(&ctx.host, end)
                .await
                .map_err(fail(format!("look up {end}")))?;
            // Only an interface with the agent's alias for this router: a same-named link
            // that someone else made is not ours to delete.
            let Some(l) = link.filter(|l| l.alias.as_deref().and_then(router_of_alias) == Some(id))
            else {
                break;
            };
            if tokio::time::Instant::now() < deadline {
                tokio::time::sleep(std::time::Duration::from_millis(1)).await;
                continue;
            }
            match ctx.host.link().del(l.index).execute().await {
                Ok(()) => break,
                Err(e) if is_no_device(&e) => break,
                Err(e) => return Err(fail(format!("delete {end}"))(e)),
            }
        }
    }
    Ok(())
}

/// Host links the agent made (by their alias), by router id.
pub async fn agent_host_links(ctx: &Ctx) -> Result<BTreeMap<String, Vec<String>>, KernelError> {
    let links = all_links(&ctx.host)
        .await
        .map_err(fail("list host interfaces"))?;
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for l in links {
        if let Some(router) = l.alias.as_deref().and_then(router_of_alias) {
            out.entry(router.to_string()).or_default().push(l.name);
        }
    }
    Ok(out)
}
