//! Trust boundaries and hostile input (issue 10): replays, ambiguous bodies, dedup across
//! configuration changes, bounded delivery memory, limits that never block a restore, a lost
//! state store, big element patches and rule expansion, all against the real broker and
//! kernel.

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use libtest_mimic::Trial;
use rampart::manager::Outgoing;
use rampart::protocol::{Ack, ErrorCode, Status};
use serde_json::{Value, json};

use crate::firewall::{Topo, rule};
use crate::support::netns::{Servers, Tcp};
use crate::support::{AgentProc, Host, HostOptions, applied, env, manager, runtime, send};
use crate::trial;

pub fn tests() -> Vec<Trial> {
    vec![
        trial(
            "trust::replayed_and_ambiguous_bodies_are_rejected_with_their_field",
            replay_and_duplicate_keys,
        ),
        trial(
            "trust::redelivery_keeps_its_ack_after_senders_and_keys_changed",
            dedup_before_config,
        ),
        trial(
            "trust::queued_maximum_bodies_stay_within_the_byte_budget",
            delivery_memory,
        ),
        trial(
            "trust::lowered_limits_never_block_restoring_the_rules",
            lowered_limits,
        ),
        trial(
            "trust::unreadable_store_isolates_until_a_full_rule_set",
            unreadable_store,
        ),
        trial(
            "trust::patches_of_6000_and_100000_addresses_apply_and_take_effect",
            big_element_patches,
        ),
        trial(
            "trust::hostile_rule_sets_are_rejected_before_the_kernel",
            hostile_rule_sets,
        ),
        trial(
            "trust::a_set_flushed_by_hand_is_noticed_and_refilled",
            element_drift,
        ),
        trial(
            "trust::broker_by_name_survives_drop_all_through_broker_and_agent_restarts",
            dns_lockout,
        ),
    ]
}

fn rejected_with(ack: &Ack, code: ErrorCode, field: Option<&str>) -> Result<()> {
    ensure!(ack.status == Status::Rejected, "{ack:?}");
    let e = ack.error.as_ref().context("a rejection carries an error")?;
    ensure!(e.code == code, "{ack:?}");
    ensure!(e.field.as_deref() == field, "{ack:?}");
    Ok(())
}

/// A raw command as a trusted manager publishes it.
fn raw(id: &str, body: String) -> Outgoing {
    Outgoing {
        body: body.into_bytes(),
        message_id: Some(id.into()),
        kind: Some("ping".into()),
        with_user_id: true,
        signature: None,
    }
}

fn ping_at(id: &str, host: &str, timestamp: u64) -> String {
    format!(
        r#"{{"specversion":"1.0","id":"{id}","type":"ping","source":"m","host":"{host}","timestamp":{timestamp},"data":{{}}}}"#
    )
}

fn replay_and_duplicate_keys() -> Result<()> {
    let host = env().host("tr-replay", HostOptions::default());
    let agent = AgentProc::start(&host);
    agent.wait_serving();
    runtime().block_on(async {
        let h = &host.id;
        let mut m = manager(h).await?;
        let now = rampart::ids::now_ms();
        let cases = [
            ("old", now - 7_600_000),
            ("future", now + 6 * 60_000),
            ("epoch", 1),
        ];
        for (id, ts) in cases {
            m.publish(h, raw(id, ping_at(id, h, ts))).await?;
            let ack = m.wait_ack(id, crate::support::ACK_WAIT).await?;
            rejected_with(&ack, ErrorCode::BadTimestamp, Some("$.timestamp"))?;
        }
        // Inside the window: served.
        m.publish(h, raw("recent", ping_at("recent", h, now - 7_000_000)))
            .await?;
        let ack = m.wait_ack("recent", crate::support::ACK_WAIT).await?;
        ensure!(ack.status == Status::Applied, "{ack:?}");

        // One body, two readings: the second "host" would win in serde_json, the first in
        // other parsers.
        let twice = ping_at("twice", h, now).replace(
            &format!(r#""host":"{h}""#),
            &format!(r#""host":"{h}","host":"someone-else""#),
        );
        m.publish(h, raw("twice", twice)).await?;
        let ack = m.wait_ack("twice", crate::support::ACK_WAIT).await?;
        rejected_with(&ack, ErrorCode::DuplicateKey, Some("$.host"))?;
        let deep = format!(
            r#"{{"specversion":"1.0","id":"deep","type":"firewall.apply","source":"m","host":"{h}","timestamp":{now},"data":{{"generation":1,"rules":[{{"id":"r","priority":1,"action":"drop","action":"allow","direction":"in"}}]}}}}"#
        );
        let mut out = raw("deep", deep);
        out.kind = Some("firewall.apply".into());
        m.publish(h, out).await?;
        let ack = m.wait_ack("deep", crate::support::ACK_WAIT).await?;
        rejected_with(&ack, ErrorCode::DuplicateKey, Some("$.data.rules[0].action"))?;
        ensure!(
            agent.current_log().contains("code=DuplicateKey"),
            "the rejection is logged:\n{}",
            agent.current_log()
        );
        m.close().await;
        Ok(())
    })
}

/// Appends `line` under `[section]` of a host's configuration.
fn add_setting(host: &Host, section: &str, line: &str) -> Result<()> {
    let text = std::fs::read_to_string(&host.config)?;
    let header = format!("[{section}]\n");
    ensure!(text.contains(&header), "no [{section}] in the config");
    std::fs::write(
        &host.config,
        text.replacen(&header, &format!("{header}{line}\n"), 1),
    )?;
    Ok(())
}

fn dedup_before_config() -> Result<()> {
    let host = env().host("tr-dedup", HostOptions::default());
    let mut agent = AgentProc::start(&host);
    agent.wait_serving();
    runtime().block_on(async {
        let h = &host.id;
        let mut m = manager(h).await?;
        let first = applied(&mut m, h, "ping", "dd-1", json!({})).await?;
        ensure!(!first.duplicate);

        // The operator now trusts another manager only and requires signatures.
        agent.kill9();
        let key = ed25519_dalek::SigningKey::from_bytes(&rand::random::<[u8; 32]>());
        let pubkey = host.dir.join("other.pub.pem");
        use ed25519_dalek::pkcs8::EncodePublicKey;
        std::fs::write(
            &pubkey,
            key.verifying_key().to_public_key_pem(Default::default())?,
        )?;
        add_setting(&host, "broker", r#"trusted_senders = ["other-manager"]"#)?;
        let text = std::fs::read_to_string(&host.config)?.replace(
            "signing_keys = []",
            &format!("signing_keys = [\"{}\"]", pubkey.display()),
        );
        std::fs::write(&host.config, text)?;
        let agent = AgentProc::start(&host);
        agent.wait_serving();

        // The same command again (a manager's retry, a redelivery): its original answer.
        let again = send(&mut m, h, "ping", "dd-1", json!({})).await?;
        ensure!(again.duplicate, "{again:?}");
        ensure!(again.status == Status::Applied, "{again:?}");
        ensure!(again.correlation_id.as_deref() == Some("dd-1"));
        // A new one from the same, now untrusted, unsigned sender is refused.
        let fresh = send(&mut m, h, "ping", "dd-2", json!({})).await?;
        ensure!(fresh.status == Status::Rejected, "{fresh:?}");
        m.close().await;
        Ok(())
    })
}

/// Peak resident memory of a process, in KiB.
fn vm_hwm_kib(pid: i32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .context("no VmHWM")
}

/// The prefetch the broker holds for `host`'s consumer.
fn consumer_prefetch(host: &str) -> Result<u32> {
    let queue = rampart::broker::host_queue(host);
    let out = env()
        .broker
        .ctl_ok(&["list_consumers", "-q", "queue_name", "prefetch_count"]);
    out.lines()
        .find_map(|l| {
            let mut cols = l.split_whitespace();
            (cols.next()? == queue).then(|| cols.next()?.parse().ok())?
        })
        .with_context(|| format!("no consumer on {queue}:\n{out}"))
}

fn delivery_memory() -> Result<()> {
    const BODY: usize = 4 * 1024 * 1024;
    const QUEUED: usize = 32;
    // The same agent twice: with a byte budget of two bodies, and with one that lets the
    // whole prefetch (32) be in flight, as before the budget existed.
    let mut peaks = vec![];
    let mut prefetches = vec![];
    for (name, budget) in [("tr-mem-bounded", 2 * BODY), ("tr-mem-wide", 32 * BODY)] {
        let host = env().host(
            name,
            HostOptions {
                max_body_bytes: Some(BODY),
                commands: format!("max_buffered_bytes = {budget}"),
                ..Default::default()
            },
        );
        // Declare the queue (and bind it) with a first run, then queue while it is down.
        let mut agent = AgentProc::start(&host);
        agent.wait_serving();
        agent.kill9();
        runtime().block_on(async {
            let m = env().manager().await;
            for i in 0..QUEUED {
                // Valid UTF-8, not JSON: within the size limit, rejected after parsing.
                let id = format!("big-{i}");
                let mut out = raw(&id, " ".repeat(BODY - 1) + "x");
                out.kind = Some("ping".into());
                m.publish(name, out).await?;
            }
            m.close().await;
            anyhow::Ok(())
        })?;
        let agent = AgentProc::start(&host);
        agent.wait_serving();
        ensure!(
            agent.wait_log("command rejected", QUEUED, Duration::from_secs(120)),
            "all {QUEUED} bodies answered:\n{}",
            agent.current_log()
        );
        let hwm = vm_hwm_kib(agent.pid())?;
        prefetches.push(consumer_prefetch(name)?);
        eprintln!(
            "{name}: budget {} MiB, peak RSS {:.1} MiB with {QUEUED} queued bodies of {} MiB",
            budget >> 20,
            hwm as f64 / 1024.0,
            BODY >> 20
        );
        peaks.push(hwm);
    }
    let bounded = peaks[0];
    // Two bodies in flight plus the one being decoded, on top of the agent's own ~30 MiB.
    ensure!(
        bounded < 64 * 1024,
        "peak RSS {bounded} KiB with a budget of two 4 MiB bodies"
    );
    // What the budget does: the broker may push two bodies ahead, not the whole prefetch.
    // (How much more the wide agent holds at its peak depends on how far the broker gets
    // ahead of it, a race: 44 to 100 MiB over the runs of 2026-12-03; not asserted.)
    ensure!(
        prefetches == [2, 32],
        "the consumers' prefetch (bounded, wide): {prefetches:?}"
    );
    Ok(())
}

fn lowered_limits() -> Result<()> {
    let t = Topo::new(21, "tr-limits");
    let _srv = Servers::start(&t.site.ag.name, "0.0.0.0", &[80, 81, 82], &[]);
    let mut agent = t.start();
    runtime().block_on(async {
        let h = &t.site.host.id;
        let mut m = manager(h).await?;
        let rs = json!({"generation": 1, "defaults": {"in": "drop"}, "rules": [
            rule("r80", 10, "allow", "in", "tcp", &["80"]),
            rule("r81", 11, "allow", "in", "tcp", &["81"])]});
        applied(&mut m, h, "firewall.apply", "lim-1", rs).await?;
        let patch = json!({"base_generation": 1, "generation": 2,
            "upsert_rules": [rule("r82", 12, "allow", "in", "tcp", &["82"])]});
        applied(&mut m, h, "firewall.patch", "lim-2", patch).await?;

        // A careless operator lowers the limit below what is in force, and the host reboots.
        agent.kill9();
        t.site
            .ag
            .exec(&["nft", "delete", "table", "inet", "rampart"]);
        add_setting(&t.site.host, "firewall", "max_rules = 1")?;
        agent = t.start();
        for port in [80, 81, 82] {
            ensure!(t.probe(port) == Tcp::Open, "rule for {port} restored");
        }
        ensure!(t.probe(83) == Tcp::Silent, "default drop restored");
        // The limit holds for new commands.
        let rs = json!({"generation": 3, "rules": [
            rule("a", 1, "allow", "in", "any", &[]), rule("b", 2, "allow", "in", "any", &[])]});
        let ack = send(&mut m, h, "firewall.apply", "lim-3", rs).await?;
        rejected_with(&ack, ErrorCode::TooMany, Some("$.data.rules"))?;
        m.close().await;
        Ok(())
    })
}

async fn state_sync(m: &mut rampart::manager::Manager, h: &str, id: &str) -> Result<Value> {
    Ok(applied(m, h, "state.sync", id, json!({})).await?.data)
}

fn unreadable_store() -> Result<()> {
    let t = Topo::new(22, "tr-lost");
    let _srv = Servers::start(&t.site.ag.name, "0.0.0.0", &[80], &[]);
    let mut agent = t.start();
    runtime().block_on(async {
        let h = &t.site.host.id;
        let mut m = manager(h).await?;
        let rs =
            json!({"generation": 7, "rules": [rule("web", 10, "allow", "in", "tcp", &["80"])]});
        applied(&mut m, h, "firewall.apply", "lost-1", rs).await?;
        ensure!(t.probe(80) == Tcp::Open);

        // The disk lets the agent down: its store is garbage at the next start.
        agent.kill9();
        let state = t.site.host.dir.join("state");
        std::fs::write(state.join("state.redb"), vec![0x5a; 64 * 1024])?;
        agent = t.start();
        ensure!(
            t.probe(80) == Tcp::Silent,
            "new inbound traffic is dropped while the state is lost"
        );
        let aside: Vec<_> = std::fs::read_dir(&state)?
            .filter_map(|e| e.ok())
            .filter(|e| {
                e.file_name()
                    .to_string_lossy()
                    .starts_with("state.redb.unreadable-")
            })
            .collect();
        ensure!(aside.len() == 1, "the unreadable store is kept aside");
        let d = state_sync(&mut m, h, "lost-2").await?;
        ensure!(d["state_lost"]["firewall"] == "isolate", "{d}");
        ensure!(d["firewall"]["generation"] == 0, "{d}");

        // Isolation is recorded: a restart keeps it.
        agent.kill9();
        agent = t.start();
        ensure!(t.probe(80) == Tcp::Silent, "still isolated after a restart");

        // The manager's full rule set ends it.
        let rs =
            json!({"generation": 1, "rules": [rule("web", 10, "allow", "in", "tcp", &["80"])]});
        applied(&mut m, h, "firewall.apply", "lost-3", rs).await?;
        ensure!(t.probe(80) == Tcp::Open);
        let d = state_sync(&mut m, h, "lost-4").await?;
        ensure!(d.get("state_lost").is_none(), "{d}");
        drop(agent);
        m.close().await;
        Ok(())
    })
}

/// `count` distinct /32s (every other address, so no two merge into one interval).
fn addresses(count: u32, base: [u8; 2]) -> Vec<String> {
    (0..count)
        .map(|i| {
            let n = i * 2;
            format!(
                "{}.{}.{}.{}",
                base[0],
                base[1] + (n >> 16) as u8,
                (n >> 8) as u8,
                n as u8
            )
        })
        .collect()
}

fn big_element_patches() -> Result<()> {
    let t = Topo::new(20, "tr-elements");
    let _srv = Servers::start(&t.site.ag.name, "0.0.0.0", &[85], &[]);
    let _agent = t.start();
    runtime().block_on(async {
        let h = &t.site.host.id;
        let mut m = manager(h).await?;
        let mut members = rule("members", 100, "allow", "in", "tcp", &["85"]);
        members["sources"] = json!(["$clients"]);
        let rs = json!({"generation": 1, "defaults": {"in": "drop"},
            "address_sets": {"clients": []}, "rules": [members]});
        applied(&mut m, h, "firewall.apply", "el-1", rs).await?;
        ensure!(t.probe(85) == Tcp::Silent);

        let mut six = addresses(5_999, [10, 64]);
        six.push(t.client_ip());
        let patch = json!({"base_generation": 1, "generation": 2,
            "add_addresses": {"clients": six}});
        applied(&mut m, h, "firewall.patch", "el-2", patch).await?;
        ensure!(
            t.probe(85) == Tcp::Open,
            "the 6 000-address patch is in force"
        );

        let patch = json!({"base_generation": 2, "generation": 3,
            "remove_addresses": {"clients": six}});
        applied(&mut m, h, "firewall.patch", "el-3", patch).await?;
        ensure!(t.probe(85) == Tcp::Silent, "and removed again");

        let mut many = addresses(99_999, [10, 96]);
        many.push(t.client_ip());
        let patch = json!({"base_generation": 3, "generation": 4,
            "add_addresses": {"clients": many}});
        applied(&mut m, h, "firewall.patch", "el-4", patch).await?;
        ensure!(
            t.probe(85) == Tcp::Open,
            "the 100 000-address patch is in force"
        );
        let d = state_sync(&mut m, h, "el-5").await?;
        ensure!(d["firewall"]["elements"] == 100_000, "{d}");
        let listing = t
            .site
            .ag
            .exec(&["nft", "list", "set", "inet", "rampart", "as4_clients"]);
        let text = String::from_utf8_lossy(&listing.stdout);
        ensure!(
            text.contains("10.97.134.158"),
            "a late element is in the kernel"
        );
        m.close().await;
        Ok(())
    })
}

fn hostile_rule_sets() -> Result<()> {
    let t = Topo::new(23, "tr-hostile");
    let _agent = t.start();
    runtime().block_on(async {
        let h = &t.site.host.id;
        let mut m = manager(h).await?;
        let before = t.site.ag.nft_table("rampart");

        let mapped = json!({"generation": 1, "rules": [{"id": "m", "priority": 1,
            "action": "drop", "direction": "in", "sources": ["10.0.0.0/8", "::ffff:10.0.0.1"]}]});
        let ack = send(&mut m, h, "firewall.apply", "ho-1", mapped).await?;
        rejected_with(
            &ack,
            ErrorCode::InvalidField,
            Some("$.data.rules[0].sources[1]"),
        )?;

        let wide_pattern = json!({"generation": 1, "rules": [{"id": "w", "priority": 1,
            "action": "drop", "direction": "in", "applied_to": ["abcdefghijklmno*"]}]});
        let ack = send(&mut m, h, "firewall.apply", "ho-2", wide_pattern).await?;
        rejected_with(
            &ack,
            ErrorCode::InvalidField,
            Some("$.data.rules[0].applied_to[0]"),
        )?;

        let sets: serde_json::Map<String, Value> = (0..40)
            .map(|i| (format!("s{i}"), json!([format!("10.{i}.0.0/16")])))
            .collect();
        let refs: Vec<String> = (0..40).map(|i| format!("$s{i}")).collect();
        let blow_up = json!({"generation": 1, "address_sets": sets, "rules": [{"id": "b",
            "priority": 1, "action": "drop", "direction": "in",
            "sources": refs, "destinations": refs}]});
        let ack = send(&mut m, h, "firewall.apply", "ho-3", blow_up).await?;
        rejected_with(&ack, ErrorCode::TooMany, Some("$.data.rules[0]"))?;
        ensure!(
            t.site.ag.nft_table("rampart") == before,
            "nothing reached the kernel"
        );

        // 2 000 x 2 000 references to one set are one set on each side: applied, small.
        let same = json!({"generation": 1, "address_sets": {"a": ["10.9.0.0/16"]},
            "rules": [{"id": "same", "priority": 1, "action": "drop", "direction": "in",
            "sources": vec!["$a"; 2000], "destinations": vec!["$a"; 2000]}]});
        applied(&mut m, h, "firewall.apply", "ho-4", same).await?;
        let table = t.site.ag.nft_table("rampart").context("table")?;
        let lines = table.matches("comment \"same\"").count();
        ensure!(
            lines == 2,
            "one kernel rule per family for the deduplicated rule:\n{table}"
        );
        m.close().await;
        Ok(())
    })
}

fn element_drift() -> Result<()> {
    let t = Topo::new(24, "tr-elem-drift");
    let _srv = Servers::start(&t.site.ag.name, "0.0.0.0", &[85], &[]);
    let _agent = t.start();
    runtime().block_on(async {
        use futures_util::StreamExt;
        let h = &t.site.host.id;
        let mut m = manager(h).await?;
        let mut events = m
            .subscribe(rampart::broker::EVENTS_EXCHANGE, &format!("drift.{h}"))
            .await?;
        let mut members = rule("members", 100, "allow", "in", "tcp", &["85"]);
        members["sources"] = json!(["$clients"]);
        let rs = json!({"generation": 1, "defaults": {"in": "drop"},
            "address_sets": {"clients": [t.client_ip(), "192.0.2.0/24", "2001:db8::/64"]},
            "rules": [members]});
        applied(&mut m, h, "firewall.apply", "ed-1", rs).await?;
        // A patch goes the netlink way; the check must agree with it too.
        let patch = json!({"base_generation": 1, "generation": 2,
            "add_addresses": {"clients": ["198.51.100.7"]}});
        applied(&mut m, h, "firewall.patch", "ed-2", patch).await?;
        ensure!(t.probe(85) == Tcp::Open);
        // Two drift periods without any event: our own state is not drift.
        let quiet = tokio::time::timeout(Duration::from_millis(2500), events.next()).await;
        ensure!(
            quiet.is_err(),
            "no drift reported for our own sets: {quiet:?}"
        );

        t.site.ag.nft("flush set inet rampart as4_clients");
        let d = tokio::time::timeout(Duration::from_secs(20), events.next())
            .await
            .context("no drift event")?
            .context("stream ended")??;
        let v: Value = serde_json::from_slice(&d.data)?;
        ensure!(
            v["data"]["what"]
                .as_str()
                .is_some_and(|w| w.contains("set clients elements changed")),
            "{v}"
        );
        ensure!(t.probe(85) == Tcp::Open, "the set was refilled");
        let listing = t.site.ag.nft_table("rampart").context("table")?;
        ensure!(listing.contains("198.51.100.7"), "{listing}");
        m.close().await;
        Ok(())
    })
}

/// dnsmasq answering one name inside a namespace; stopped on drop.
struct Dns(std::process::Child);

impl Dns {
    fn start(ns: &str, listen: &str, name: &str, answer: &str, dir: &std::path::Path) -> Dns {
        let _ = std::fs::remove_file(dir.join("dnsmasq.pid"));
        let child = std::process::Command::new("ip")
            .args([
                "netns",
                "exec",
                ns,
                "dnsmasq",
                "--keep-in-foreground",
                "--no-resolv",
            ])
            .args([
                "--no-hosts",
                "--conf-file=/dev/null",
                "--bind-interfaces",
                "--user=root",
            ])
            .arg(format!("--listen-address={listen}"))
            .arg(format!("--address=/{name}/{answer}"))
            .arg(format!("--pid-file={}", dir.join("dnsmasq.pid").display()))
            .arg(format!(
                "--log-facility={}",
                dir.join("dnsmasq.log").display()
            ))
            .arg("--log-queries")
            .spawn()
            .expect("starting dnsmasq (Debian's dnsmasq-base)");
        // Listening once it wrote its pid file (after binding): an agent started before
        // that would find no resolver at first.
        let pid_file = dir.join("dnsmasq.pid");
        assert!(
            crate::support::wait_until(std::time::Duration::from_secs(10), || pid_file.exists()),
            "dnsmasq did not start"
        );
        Dns(child)
    }

    fn queries(dir: &std::path::Path) -> usize {
        std::fs::read_to_string(dir.join("dnsmasq.log"))
            .unwrap_or_default()
            .matches("query[A]")
            .count()
    }
}

impl Drop for Dns {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn dns_lockout() -> Result<()> {
    use crate::support::site::Site;
    const NAME: &str = "broker.rampart.test";
    let net = "10.205.1";
    let site = Site::new(
        "rpdns",
        net,
        "tr-dns",
        HostOptions {
            urls: Some(vec![format!("amqps://{NAME}:5671/%2f")]),
            firewall: "drift_check_secs = 1".into(),
            ..Default::default()
        },
    );
    let (brk, ag, host) = (&site.brk, &site.ag, &site.host);
    // `ip netns exec` gives the agent this resolv.conf, as a host's own would be.
    let etc = std::path::PathBuf::from("/etc/netns").join(&ag.name);
    std::fs::create_dir_all(&etc)?;
    std::fs::write(
        etc.join("resolv.conf"),
        format!("nameserver {net}.1\noptions timeout:1 attempts:1\n"),
    )?;
    let mut dns = Some(Dns::start(
        &brk.name,
        &format!("{net}.1"),
        NAME,
        &format!("{net}.1"),
        &host.dir,
    ));
    let start = || {
        let a = AgentProc::start_via(host, &["ip", "netns", "exec", &ag.name], &[]);
        a.wait_serving();
        a
    };
    let result = (|| {
        let mut agent = start();
        ensure!(Dns::queries(&host.dir) > 0, "the broker was found by name");
        runtime().block_on(async {
            let h = &host.id;
            let mut m = manager(h).await?;
            let rs = json!({"generation": 1,
                "defaults": {"in": "drop", "out": "drop", "forward": "drop"}, "rules": []});
            applied(&mut m, h, "firewall.apply", "dns-1", rs).await?;
            let table = ag.nft_table("rampart").context("table")?;
            ensure!(
                table.contains(&format!(
                    "ip daddr {net}.1 meta l4proto {{ tcp, udp }} th dport 53 accept"
                )),
                "the resolver is in the failsafe:\n{table}"
            );

            // The broker goes away under the agent: it resolves again, through the failsafe.
            let before = Dns::queries(&host.dir);
            ensure!(
                env().broker.close_connections_of(h) >= 1,
                "the agent had a session"
            );
            ensure!(
                agent.wait_log("serving commands", 2, Duration::from_secs(30)),
                "{}",
                agent.current_log()
            );
            ensure!(
                Dns::queries(&host.dir) > before,
                "it asked the resolver again"
            );
            applied(&mut m, h, "ping", "dns-2", json!({})).await?;

            // The agent restarts under drop-all.
            agent.kill9();
            agent = start();
            applied(&mut m, h, "ping", "dns-3", json!({})).await?;

            // The resolver is gone too: the last known address still leads to the broker.
            dns = None;
            ensure!(env().broker.close_connections_of(h) >= 1);
            ensure!(
                agent.wait_log("serving commands", 2, Duration::from_secs(40)),
                "{}",
                agent.current_log()
            );
            ensure!(
                agent
                    .current_log()
                    .contains("using its last known addresses"),
                "{}",
                agent.current_log()
            );
            applied(&mut m, h, "ping", "dns-4", json!({})).await?;
            m.close().await;
            Ok(())
        })
    })();
    drop(dns);
    let _ = std::fs::remove_dir_all(&etc);
    result
}
