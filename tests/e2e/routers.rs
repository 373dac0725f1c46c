//! Logical routers (issue 5) with real namespaces and real packets. The agent runs in its own
//! namespace (its "host"), where the test makes two bridges; two workload namespaces hang off
//! them and talk to each other only through the router the agent makes.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use futures_util::StreamExt;
use libtest_mimic::Trial;
use rampart::broker::EVENTS_EXCHANGE;
use rampart::protocol::{ErrorCode, Status};
use rampart::router::spec::host_name;
use serde_json::{Value, json};

use crate::support::netns::{Netns, Servers, Tcp, tcp_probe};
use crate::support::site::Site;
use crate::support::{HostOptions, applied, env, manager, rampart, runtime, send, wait_until};
use crate::trial;

pub fn tests() -> Vec<Trial> {
    vec![
        trial(
            "routers::create_forwards_packets_and_delete_stops_them",
            create_and_delete,
        ),
        trial(
            "routers::converge_moves_an_address_and_adds_a_route",
            converge,
        ),
        trial(
            "routers::fifty_routers_created_and_deleted_leave_nothing",
            fifty,
        ),
        trial(
            "routers::kill9_mid_create_ends_fully_created_matching_the_ack",
            kill9_mid_create,
        ),
        trial(
            "routers::namespace_deleted_by_hand_is_recreated_at_start_and_foreign_ones_kept",
            recreated_at_start,
        ),
        trial(
            "routers::invalid_specs_and_half_way_failures_change_nothing",
            invalid,
        ),
    ]
}

const WAIT: Duration = Duration::from_secs(20);

/// The agent's site plus two workloads, `wa` on 10.205.n.0/24 behind bridge `bra` and `wb`
/// on 10.206.n.0/24 behind `brb`, each with the router's address (.1) as gateway.
struct Lab {
    n: u8,
    site: Site,
    wa: Netns,
    wb: Netns,
    /// Router ids this test used: their namespaces go when the test ends, pass or fail.
    ids: std::cell::RefCell<Vec<String>>,
}

impl Drop for Lab {
    fn drop(&mut self) {
        for id in self.ids.borrow().iter() {
            if ns_exists(id) {
                let _ = Command::new("ip")
                    .args(["netns", "del", &format!("lr-{id}")])
                    .output();
            }
        }
    }
}

fn ip(args: &[&str]) -> Result<()> {
    let o = Command::new("ip").args(args).output()?;
    ensure!(
        o.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&o.stderr)
    );
    Ok(())
}

impl Lab {
    fn new(n: u8, id: &str) -> Result<Lab> {
        let site = Site::new(
            &format!("rpr{n}"),
            &format!("10.204.{n}"),
            id,
            HostOptions {
                firewall: "drift_check_secs = 3600".into(),
                ..Default::default()
            },
        );
        let ag = site.ag.name.clone();
        let wa = Netns::new(&format!("rpr{n}-wa"));
        let wb = Netns::new(&format!("rpr{n}-wb"));
        for (w, br, tap, net) in [(&wa, "bra", "tapa", 205), (&wb, "brb", "tapb", 206)] {
            ip(&["-n", &ag, "link", "add", br, "type", "bridge"])?;
            ip(&["-n", &ag, "link", "set", br, "up"])?;
            ip(&[
                "-n", &ag, "link", "add", tap, "type", "veth", "peer", "name", "w0", "netns",
                &w.name,
            ])?;
            ip(&["-n", &ag, "link", "set", tap, "master", br, "up"])?;
            let addr = format!("10.{net}.{n}.2/24");
            ip(&["-n", &w.name, "addr", "add", &addr, "dev", "w0"])?;
            let addr6 = format!("fd00:{net}:{n}::2/64");
            ip(&["-n", &w.name, "addr", "add", &addr6, "dev", "w0", "nodad"])?;
            ip(&["-n", &w.name, "link", "set", "w0", "up"])?;
            w.route("default", &format!("10.{net}.{n}.1"));
            let gw6 = format!("fd00:{net}:{n}::1");
            ip(&["-6", "-n", &w.name, "route", "add", "default", "via", &gw6])?;
        }
        Ok(Lab {
            n,
            site,
            wa,
            wb,
            ids: Default::default(),
        })
    }

    fn wb_ip(&self) -> String {
        format!("10.206.{}.2", self.n)
    }

    fn wb_ip6(&self) -> String {
        format!("fd00:206:{}::2", self.n)
    }

    /// Router `id` joining both workload subnets, IPv4 and IPv6.
    fn two_legs(&self, id: &str) -> Value {
        let n = self.n;
        json!({"id": id, "interfaces": [
            {"name": "lif0", "addresses": [format!("10.205.{n}.1/24"), format!("fd00:205:{n}::1/64")], "bridge": "bra"},
            {"name": "lif1", "addresses": [format!("10.206.{n}.1/24"), format!("fd00:206:{n}::1/64")], "mtu": 1400, "bridge": "brb"},
        ], "routes": []})
    }

    fn routers_json(&self) -> Result<Vec<Value>> {
        let sock = self.site.host.dir.join("rampart.sock");
        let out = rampart(&["routers", "--json", "--socket", &sock.display().to_string()]);
        ensure!(out.status.success(), "rampart routers: {out:?}");
        let v: Value = serde_json::from_slice(&out.stdout)?;
        Ok(v["routers"].as_array().cloned().unwrap_or_default())
    }

    fn in_sync(&self, id: &str) -> Result<bool> {
        Ok(self
            .routers_json()?
            .iter()
            .any(|r| r["id"] == id && r["in_sync"] == true))
    }

    /// Names of the links in the agent's namespace.
    fn host_links(&self) -> Result<Vec<String>> {
        let o = Command::new("ip")
            .args(["-n", &self.site.ag.name, "-o", "link", "show"])
            .output()?;
        Ok(String::from_utf8_lossy(&o.stdout)
            .lines()
            .filter_map(|l| l.split(':').nth(1))
            .map(|s| s.trim().split('@').next().unwrap_or("").to_string())
            .collect())
    }
}

/// Router ids carry the test run's pid, so concurrent runs never share a namespace name.
fn rid(tag: &str) -> String {
    format!("{tag}-{}", std::process::id() % 100_000)
}

impl Lab {
    /// A router id for this test, cleaned up with the lab.
    fn rid(&self, tag: &str) -> String {
        let id = rid(tag);
        self.ids.borrow_mut().push(id.clone());
        id
    }
}

fn ns_exists(id: &str) -> bool {
    Path::new("/run/netns").join(format!("lr-{id}")).exists()
}

fn mounted(id: &str) -> bool {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .contains(&format!("/run/netns/lr-{id} "))
}

fn create_and_delete() -> Result<()> {
    let lab = Lab::new(1, "rt-basic")?;
    let id = lab.rid("a");
    let _agent = lab.site.start(&[]);
    let _srv = Servers::start(&lab.wb.name, &lab.wb_ip(), &[8080], &[]);
    ensure!(
        !lab.wa.ping(&lab.wb_ip()),
        "no path before the router exists"
    );
    runtime().block_on(async {
        let h = &lab.site.host.id;
        let mut m = manager(h).await?;
        let ack = applied(&mut m, h, "router.create", "c1", lab.two_legs(&id)).await?;
        ensure!(ack.data["changes"].as_u64() > Some(0), "{ack:?}");
        ensure!(ns_exists(&id), "lr-{id} is in /run/netns");
        let ip_list = Command::new("ip").args(["netns", "list"]).output()?;
        ensure!(
            String::from_utf8_lossy(&ip_list.stdout).contains(&format!("lr-{id}")),
            "ip netns list shows it"
        );
        // Within a few seconds, not the first packet: the probe before the router existed
        // left wa's neighbour entry for the gateway FAILED, and once (in CI, both cores
        // busy) the first ping after the ack went unanswered within its 1 s.
        ensure!(
            wait_until(Duration::from_secs(5), || lab.wa.ping(&lab.wb_ip())),
            "ping across the router"
        );
        // IPv6 forwarding too (the router's addresses finish duplicate detection first).
        ensure!(
            wait_until(WAIT, || lab.wa.ping(&lab.wb_ip6())),
            "IPv6 ping across the router"
        );
        ensure!(
            tcp_probe(&lab.wa.name, &lab.wb_ip(), 8080) == Tcp::Open,
            "TCP across the router"
        );
        // Inside the namespace: forwarding on, loopback up, MTU as asked.
        let inner = Command::new("ip")
            .args(["-n", &format!("lr-{id}"), "-o", "link", "show"])
            .output()?;
        let inner = String::from_utf8_lossy(&inner.stdout);
        ensure!(inner.contains("lo: <LOOPBACK,UP"), "{inner}");
        ensure!(
            inner.contains("lif1@") && inner.contains("mtu 1400"),
            "{inner}"
        );
        let fwd = Command::new("ip")
            .args([
                "netns",
                "exec",
                &format!("lr-{id}"),
                "sysctl",
                "-n",
                "net.ipv4.ip_forward",
                "net.ipv6.conf.all.forwarding",
            ])
            .output()?;
        ensure!(
            String::from_utf8_lossy(&fwd.stdout)
                .split_whitespace()
                .eq(["1", "1"]),
            "forwarding: {fwd:?}"
        );
        // The host end is on its bridge, with its documented name.
        let host = host_name(&id, "lif0");
        let port = Command::new("ip")
            .args(["-n", &lab.site.ag.name, "-o", "link", "show", &host])
            .output()?;
        ensure!(
            String::from_utf8_lossy(&port.stdout).contains("master bra"),
            "{port:?}"
        );

        let sock = lab.site.host.dir.join("rampart.sock");
        let status = rampart(&["status", "--json", "--socket", &sock.display().to_string()]);
        let status: Value = serde_json::from_slice(&status.stdout)?;
        ensure!(
            status["routers"][0]["id"] == id.as_str() && status["routers"][0]["state"] == "applied",
            "rampart status shows the router: {status}"
        );
        let routers = lab.routers_json()?;
        ensure!(
            routers.len() == 1 && routers[0]["in_sync"] == true,
            "{routers:?}"
        );
        let again = applied(&mut m, h, "router.create", "c2", lab.two_legs(&id)).await?;
        ensure!(
            again.data["noop"] == true,
            "equal spec changes nothing: {again:?}"
        );
        let sync = applied(&mut m, h, "state.sync", "s1", json!({})).await?;
        ensure!(
            sync.data["routers"][0]["id"] == id.as_str()
                && sync.data["routers"][0]["state"] == "applied",
            "{:?}",
            sync.data
        );

        applied(&mut m, h, "router.delete", "d1", json!({"id": id})).await?;
        ensure!(!lab.wa.ping(&lab.wb_ip()), "no path after delete");
        ensure!(!lab.wa.ping(&lab.wb_ip6()), "no IPv6 path after delete");
        ensure!(!ns_exists(&id) && !mounted(&id), "namespace and mount gone");
        let links = lab.host_links()?;
        ensure!(
            !links.contains(&host) && !links.contains(&host_name(&id, "lif1")),
            "host ends gone: {links:?}"
        );
        let absent = applied(&mut m, h, "router.delete", "d2", json!({"id": id})).await?;
        ensure!(absent.data["absent"] == true, "{absent:?}");
        Ok(())
    })
}

fn converge() -> Result<()> {
    let lab = Lab::new(2, "rt-converge")?;
    let n = lab.n;
    let id = lab.rid("c");
    let _agent = lab.site.start(&[]);
    // wb also owns 10.208.n.1, reachable from wa only through a route on the router.
    ip(&[
        "-n",
        &lab.wb.name,
        "addr",
        "add",
        &format!("10.208.{n}.1/32"),
        "dev",
        "lo",
    ])?;
    let far = format!("10.208.{n}.1");
    runtime().block_on(async {
        let h = &lab.site.host.id;
        let mut m = manager(h).await?;
        applied(&mut m, h, "router.create", "v1", lab.two_legs(&id)).await?;
        ensure!(lab.wa.ping(&lab.wb_ip()), "ping across");
        ensure!(!lab.wa.ping(&far), "no route to 10.208 yet");

        let mut moved = lab.two_legs(&id);
        moved["interfaces"][1]["addresses"] = json!([format!("10.207.{n}.1/24")]);
        applied(&mut m, h, "router.create", "v2", moved).await?;
        ensure!(!lab.wa.ping(&lab.wb_ip()), "the router left wb's subnet");

        let mut routed = lab.two_legs(&id);
        routed["routes"] = json!([{"destination": format!("10.208.{n}.0/24"), "via": lab.wb_ip()}]);
        let ack = applied(&mut m, h, "router.create", "v3", routed).await?;
        ensure!(ack.data["noop"] == false, "{ack:?}");
        // (After a failed probe, as above.)
        ensure!(
            wait_until(Duration::from_secs(5), || lab.wa.ping(&lab.wb_ip())),
            "address moved back"
        );
        ensure!(lab.wa.ping(&far), "route added");
        ensure!(lab.in_sync(&id)?, "kernel matches the record");
        // A device that is not a veth (like the tunnel fallback devices the kernel puts in
        // every namespace) is left alone; a stray veth is removed.
        let ns = format!("lr-{id}");
        ip(&["-n", &ns, "link", "add", "fb0", "type", "bridge"])?;
        ip(&[
            "-n", &ns, "link", "add", "stray0", "type", "veth", "peer", "name", "stray1",
        ])?;
        let sync = applied(&mut m, h, "state.sync", "v3s", json!({})).await?;
        ensure!(
            sync.data["routers"][0]["state"] == "applied",
            "the repair succeeded: {:?}",
            sync.data["routers"]
        );
        let links = Command::new("ip")
            .args(["-n", &ns, "-o", "link", "show"])
            .output()?;
        let links = String::from_utf8_lossy(&links.stdout);
        ensure!(links.contains("fb0:"), "non-veth device kept: {links}");
        ensure!(!links.contains("stray0@"), "stray veth removed: {links}");
        ensure!(lab.in_sync(&id)?, "still in sync");
        applied(&mut m, h, "router.delete", "v4", json!({"id": id})).await?;
        Ok(())
    })
}

fn fifty() -> Result<()> {
    let lab = Lab::new(3, "rt-fifty")?;
    let _agent = lab.site.start(&[]);
    let ids: Vec<String> = (0..50).map(|i| lab.rid(&format!("m{i}"))).collect();
    runtime().block_on(async {
        let h = &lab.site.host.id;
        let mut m = manager(h).await?;
        for (i, id) in ids.iter().enumerate() {
            let spec = json!({"id": id, "interfaces": [
                {"name": "up0", "addresses": [format!("10.230.{i}.1/24")]},
                {"name": "dn0", "addresses": [format!("10.231.{i}.1/24")], "bridge": if i % 2 == 0 { "bra" } else { "brb" }},
            ], "routes": [{"destination": "0.0.0.0/0", "via": format!("10.230.{i}.254")}]});
            m.send(h, "router.create", &format!("mk{i}"), &spec).await?;
        }
        for i in 0..ids.len() {
            let ack = m.wait_ack(&format!("mk{i}"), WAIT).await?;
            ensure!(ack.status == Status::Applied, "{ack:?}");
        }
        ensure!(ids.iter().all(|id| ns_exists(id)), "50 namespaces");
        ensure!(lab.routers_json()?.len() == 50, "50 listed");
        for (i, id) in ids.iter().enumerate() {
            m.send(h, "router.delete", &format!("rm{i}"), &json!({"id": id})).await?;
        }
        for i in 0..ids.len() {
            let ack = m.wait_ack(&format!("rm{i}"), WAIT).await?;
            ensure!(ack.status == Status::Applied, "{ack:?}");
        }
        Ok(())
    })?;
    ensure!(
        ids.iter().all(|id| !ns_exists(id) && !mounted(id)),
        "no namespace or mount left"
    );
    let links = lab.host_links()?;
    let leaked: Vec<&String> = links.iter().filter(|l| l.starts_with("rp")).collect();
    ensure!(leaked.is_empty(), "no veth left: {leaked:?}");
    ensure!(lab.routers_json()?.is_empty(), "none listed");
    Ok(())
}

fn kill9_mid_create() -> Result<()> {
    let lab = Lab::new(4, "rt-crash")?;
    let id = lab.rid("k");
    let mut agent = lab
        .site
        .start(&[("RAMPART_FAULT", "crash_mid_router_create")]);
    runtime().block_on(async {
        let h = &lab.site.host.id;
        let mut m = manager(h).await?;
        m.send(h, "router.create", "k1", &lab.two_legs(&id)).await?;
        ensure!(
            agent.wait_exit(WAIT).is_some(),
            "the fault killed the agent"
        );
        ensure!(ns_exists(&id), "half a router is left by the crash");
        let links = lab.host_links()?;
        ensure!(
            links.contains(&host_name(&id, "lif0")) && !links.contains(&host_name(&id, "lif1")),
            "one interface of two: {links:?}"
        );
        drop(agent);
        let _agent = lab.site.start(&[]);
        let ack = m.wait_ack("k1", WAIT).await?;
        ensure!(ack.status == Status::Applied && !ack.duplicate, "{ack:?}");
        ensure!(lab.in_sync(&id)?, "fully created after the restart");
        ensure!(lab.wa.ping(&lab.wb_ip()), "and it forwards");
        applied(&mut m, h, "router.delete", "k2", json!({"id": id})).await?;
        Ok(())
    })
}

fn recreated_at_start() -> Result<()> {
    let lab = Lab::new(5, "rt-restart")?;
    let id = lab.rid("r");
    let foreign = format!("lr-{}", rid("f"));
    let mut agent = lab.site.start(&[]);
    runtime().block_on(async {
        let h = &lab.site.host.id;
        let mut m = manager(h).await?;
        applied(&mut m, h, "router.create", "r1", lab.two_legs(&id)).await?;
        Ok::<_, anyhow::Error>(())
    })?;
    let mac = || -> Result<String> {
        let o = Command::new("ip")
            .args(["-n", &format!("lr-{id}"), "-o", "link", "show", "lif0"])
            .output()?;
        let text = String::from_utf8_lossy(&o.stdout).into_owned();
        Ok(text
            .split("link/ether ")
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
            .unwrap_or_default()
            .to_string())
    };
    let mac_before = mac()?;
    ensure!(!mac_before.is_empty(), "lif0 has a MAC");
    agent.signal(nix::sys::signal::Signal::SIGTERM);
    ensure!(agent.wait_exit(WAIT).is_some(), "agent stops");
    drop(agent);
    ip(&["netns", "del", &format!("lr-{id}")])?;
    ip(&["netns", "add", &foreign])?;
    let result = (|| {
        // `ip netns del` returns before the kernel has torn the namespace down.
        ensure!(
            wait_until(WAIT, || !lab.wa.ping(&lab.wb_ip())),
            "router gone while the agent is down"
        );
        let h = lab.site.host.id.clone();
        // One runtime for the subscription's whole life: its connection lives on it.
        let rt = runtime();
        let (m, mut events) = rt.block_on(async {
            let m = env().manager().await;
            let events = m.subscribe(EVENTS_EXCHANGE, &format!("drift.{h}")).await?;
            Ok::<_, anyhow::Error>((m, events))
        })?;
        let agent = lab.site.start(&[]);
        ensure!(ns_exists(&id), "recreated before serving");
        // The same MAC as before: the workloads' ARP caches still point at the router.
        ensure!(mac()? == mac_before, "lif0 keeps its MAC {mac_before}");
        ensure!(
            agent.wait_log("router drift found and repaired", 1, WAIT),
            "drift logged"
        );
        // The drift found at start is published once a session is up.
        let event: Value = rt.block_on(async {
            let d = tokio::time::timeout(WAIT, events.next())
                .await
                .context("no drift event")?
                .context("subscription ended")??;
            m.close().await;
            Ok::<_, anyhow::Error>(serde_json::from_slice(&d.data)?)
        })?;
        ensure!(
            event["data"]["routers"]["repaired"][id.as_str()]
                .as_array()
                .is_some_and(|steps| steps.iter().any(|s| s == "create namespace")),
            "drift event names the repair: {event}"
        );
        ensure!(
            wait_until(WAIT, || lab.wa.ping(&lab.wb_ip())),
            "forwards again"
        );
        ensure!(lab.in_sync(&id)?, "in sync");
        ensure!(
            Path::new("/run/netns").join(&foreign).exists(),
            "a namespace the agent does not own is left alone"
        );
        runtime().block_on(async {
            let h = &lab.site.host.id;
            let mut m = manager(h).await?;
            // Asked to make a router whose namespace someone else made: refused, not adopted
            // (a failure would then have deleted it on rollback).
            let foreign_id = foreign.trim_start_matches("lr-").to_string();
            let ack = send(
                &mut m,
                h,
                "router.create",
                "r-foreign",
                lab.two_legs(&foreign_id),
            )
            .await?;
            ensure!(ack.status == Status::Rejected, "{ack:?}");
            let e = ack.error.context("error")?;
            ensure!(
                e.code == ErrorCode::ForeignNamespace && e.field.as_deref() == Some("$.data.id"),
                "{e:?}"
            );
            ensure!(
                Path::new("/run/netns").join(&foreign).exists(),
                "the foreign namespace is still there"
            );
            applied(&mut m, h, "router.delete", "r2", json!({"id": id})).await?;
            Ok(())
        })
    })();
    let _ = ip(&["netns", "del", &foreign]);
    result
}

fn invalid() -> Result<()> {
    let lab = Lab::new(6, "rt-invalid")?;
    let id = lab.rid("i");
    let _agent = lab.site.start(&[]);
    runtime().block_on(async {
        let h = &lab.site.host.id;
        let mut m = manager(h).await?;
        let mut no_bridge = lab.two_legs(&id);
        no_bridge["interfaces"][1]["bridge"] = json!("nosuchbr");
        let ack = send(&mut m, h, "router.create", "i1", no_bridge).await?;
        ensure!(ack.status == Status::Rejected, "{ack:?}");
        let e = ack.error.context("error")?;
        ensure!(
            e.code == ErrorCode::UnknownBridge
                && e.field.as_deref() == Some("$.data.interfaces[1].bridge"),
            "{e:?}"
        );

        let mut far_gw = lab.two_legs(&id);
        far_gw["routes"] = json!([{"destination": "0.0.0.0/0", "via": "10.99.0.1"}]);
        let ack = send(&mut m, h, "router.create", "i2", far_gw).await?;
        ensure!(
            ack.error.as_ref().map(|e| e.code) == Some(ErrorCode::UnreachableGateway),
            "{ack:?}"
        );

        // Names the kernel or a tunnel module holds in every namespace: rejected before
        // anything is made, not failed half way.
        for (n, reserved) in ["all", "default", "lo", "gre0", "sit0", "tunl0"]
            .iter()
            .enumerate()
        {
            let mut r = lab.two_legs(&id);
            r["interfaces"][1]["name"] = json!(reserved);
            let cid = format!("i-reserved-{n}");
            let ack = send(&mut m, h, "router.create", &cid, r).await?;
            ensure!(ack.status == Status::Rejected, "{reserved}: {ack:?}");
            let e = ack.error.context("error")?;
            ensure!(
                e.code == ErrorCode::InvalidField
                    && e.field.as_deref() == Some("$.data.interfaces[1].name"),
                "{reserved}: {e:?}"
            );
        }
        ensure!(!ns_exists(&id), "nothing was made");

        let mut hostile = lab.two_legs(&id);
        hostile["interfaces"][0]["name"] = json!("x;reboot");
        let ack = send(&mut m, h, "router.create", "i3", hostile).await?;
        ensure!(ack.status == Status::Rejected, "{ack:?}");
        let ack = send(
            &mut m,
            h,
            "router.create",
            "i4",
            json!({"id": "../../etc", "interfaces": []}),
        )
        .await?;
        ensure!(ack.status == Status::Rejected, "{ack:?}");
        ensure!(!ns_exists(&id), "nothing was made");

        // Half way: the second host end's name is taken, so the create fails after the
        // namespace and the first interface exist; both are rolled back.
        let taken = host_name(&id, "lif1");
        ip(&[
            "-n",
            &lab.site.ag.name,
            "link",
            "add",
            &taken,
            "type",
            "bridge",
        ])?;
        let ack = send(&mut m, h, "router.create", "i5", lab.two_legs(&id)).await?;
        ensure!(ack.status == Status::Failed, "{ack:?}");
        let e = ack.error.context("error")?;
        ensure!(
            e.code == ErrorCode::RouterFailed
                && e.message.contains("add interface lif1")
                && e.message.contains("File exists"),
            "{e:?}"
        );
        ensure!(!ns_exists(&id), "namespace rolled back");
        ensure!(
            !lab.host_links()?.contains(&host_name(&id, "lif0")),
            "first interface rolled back"
        );
        ensure!(lab.routers_json()?.is_empty(), "none listed");
        ip(&["-n", &lab.site.ag.name, "link", "del", &taken])?;
        let ack = applied(&mut m, h, "router.create", "i6", lab.two_legs(&id)).await?;
        ensure!(ack.data["changes"].as_u64() > Some(0), "{ack:?}");
        applied(&mut m, h, "router.delete", "i7", json!({"id": id})).await?;
        Ok(())
    })
}
