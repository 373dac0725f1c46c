//! Faults of the bus (issue 11): a broker that dies or freezes under the agent, a missing
//! dead-letter queue, nacked publishes. Each fault is real: relays reset like a dead node,
//! the broker's Erlang VM is stopped with SIGSTOP, queues are deleted with rabbitmqctl.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use libtest_mimic::Trial;
use nix::sys::signal::Signal;
use serde_json::{Value, json};

use crate::support::acklog::{self, AckLog};
use crate::support::broker::Broker;
use crate::support::netns::{KillableRelay, Netns, veth};
use crate::support::{AgentProc, HostOptions, applied, env, manager, rampart, runtime, send};
use crate::trial;

pub fn tests() -> Vec<Trial> {
    vec![
        trial(
            "faults::a_dead_broker_node_is_followed_by_the_next_one_at_once",
            failover,
        ),
        trial(
            "faults::nacked_acks_are_retried_on_the_same_session",
            nacked_acks,
        ),
        trial(
            "faults::acks_nacked_past_the_bound_give_up_the_session",
            nacked_forever,
        ),
        trial(
            "faults::missing_dead_letter_queue_is_reported_and_commands_flow",
            missing_dead_letter_queue,
        ),
        trial(
            "faults::frozen_broker_bounded_close_and_sigterm",
            frozen_broker,
        ),
        trial(
            "faults::sigstop_longer_than_the_heartbeat_then_sigcont_recovers",
            sigstop_agent,
        ),
        trial(
            "faults::partition_is_noticed_within_two_heartbeats_and_healed",
            partition,
        ),
        trial(
            "faults::full_state_disk_fails_commands_cleanly_and_recovers",
            full_disk,
        ),
        trial(
            "faults::patches_whose_records_cannot_be_synced_are_undone_and_failed",
            unsynced_patches,
        ),
        trial(
            "faults::a_record_log_write_cut_short_by_a_full_disk_leaves_only_whole_records",
            cut_record_log,
        ),
        trial(
            "faults::patches_of_a_batch_share_one_transaction_and_fall_back_one_by_one",
            grouped_patches,
        ),
        trial(
            "faults::cluster_node_of_the_session_killed_under_a_command_stream",
            cluster_node_kills,
        ),
    ]
}

fn failover() -> Result<()> {
    let net = "10.206.1";
    let brk = Netns::new("rpfo-brk");
    let ag = Netns::new("rpfo-ag");
    veth(
        &brk,
        "b0",
        &format!("{net}.1/24"),
        &ag,
        "e0",
        &format!("{net}.2/24"),
    );
    let o = brk.exec(&["ip", "addr", "add", &format!("{net}.5/24"), "dev", "b0"]);
    ensure!(o.status.success(), "second address: {o:?}");
    let target = format!("127.0.0.1:{}", env().broker.port).parse()?;
    let nodes = [format!("{net}.1:5671"), format!("{net}.5:5671")];
    let host = env().host(
        "fl-failover",
        HostOptions {
            urls: Some(nodes.iter().map(|n| format!("amqps://{n}/%2f")).collect()),
            server_name: Some("localhost".into()),
            ..Default::default()
        },
    );
    // The default backoff cap (30 s): a node dying must not make the agent wait for it. The
    // listed order: the agent starts on the first node.
    let text = std::fs::read_to_string(&host.config)?.replace(
        "backoff_max_ms = 2000",
        "backoff_max_ms = 30000\nurl_order = \"listed\"",
    );
    std::fs::write(&host.config, text)?;
    let mut relays = [
        Some(KillableRelay::start(&brk.name, &nodes[0], target)),
        Some(KillableRelay::start(&brk.name, &nodes[1], target)),
    ];
    let agent = AgentProc::start_in(&host, Some(&ag.name), &[]);
    agent.wait_serving();
    runtime().block_on(async {
        let h = &host.id;
        let mut m = manager(h).await?;
        let mut gaps = vec![];
        // The agent starts on the first node; then the node it is on dies, five times.
        let mut on = 0usize;
        for kill in 0..5 {
            let sessions = agent.current_log().matches("serving commands").count();
            relays[on].take().context("relay")?.kill();
            let killed = Instant::now();
            ensure!(
                agent.wait_log("serving commands", sessions + 1, Duration::from_secs(20)),
                "no new session after kill {kill}:\n{}",
                agent.current_log()
            );
            gaps.push(killed.elapsed());
            let id = format!("fo-{kill}");
            applied(&mut m, h, "ping", &id, json!({})).await?;
            // The dead node comes back (it will be the next to die but one).
            tokio::time::sleep(Duration::from_millis(50)).await;
            relays[on] = Some(KillableRelay::start(&brk.name, &nodes[on], target));
            on = 1 - on;
        }
        eprintln!("failover: node kill to the next session: {gaps:?}");
        let worst = gaps.iter().max().copied().unwrap_or_default();
        ensure!(
            worst < Duration::from_secs(3),
            "every failover is immediate, not a backoff: {gaps:?}"
        );
        m.close().await;
        Ok(())
    })
}

/// A queue that refuses every message routed to it, bound to `host`'s acks: the broker nacks
/// every ack the agent publishes. Returns its name.
async fn jam_acks(ch: &lapin::Channel, host: &str) -> Result<String> {
    use lapin::options::{QueueBindOptions, QueueDeclareOptions};
    use lapin::types::{AMQPValue, FieldTable};
    let jam = format!("rampart.jam-{host}-{}", std::process::id());
    let mut args = FieldTable::default();
    args.insert("x-max-length".into(), AMQPValue::LongLongInt(0));
    args.insert(
        "x-overflow".into(),
        AMQPValue::LongString("reject-publish".into()),
    );
    ch.queue_declare(jam.as_str().into(), QueueDeclareOptions::default(), args)
        .await?;
    ch.queue_bind(
        jam.as_str().into(),
        rampart::broker::ACKS_EXCHANGE.into(),
        host.into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await?;
    Ok(jam)
}

/// Host `name`'s agent is sent ping `id` while every ack it publishes is nacked; `jammed`
/// checks the agent meanwhile, then the jam is lifted. Returns the agent and the ping's ack.
fn ping_through_jammed_acks(
    name: &str,
    id: &str,
    jammed: impl FnOnce(&AgentProc) -> Result<()>,
) -> Result<(AgentProc, rampart::protocol::Ack)> {
    use lapin::options::QueueDeleteOptions;
    let host = env().host(name, HostOptions::default());
    let agent = AgentProc::start(&host);
    agent.wait_serving();
    let ack = runtime().block_on(async {
        let h = &host.id;
        let mut m = manager(h).await?;
        let admin = env().manager().await;
        let ch = admin.channel().await?;
        let jam = jam_acks(&ch, h).await?;
        m.send(h, "ping", id, &json!({})).await?;
        jammed(&agent)?;
        ch.queue_delete(jam.as_str().into(), QueueDeleteOptions::default())
            .await?;
        // (The manager's own queue got a copy of every refused publish: the broker nacks
        // when any queue it routes to refuses.)
        let ack = m.wait_ack(id, Duration::from_secs(60)).await?;
        admin.close().await;
        m.close().await;
        anyhow::Ok(ack)
    })?;
    ensure!(ack.status == rampart::protocol::Status::Applied, "{ack:?}");
    Ok((agent, ack))
}

fn nacked_acks() -> Result<()> {
    let (agent, ack) = ping_through_jammed_acks("fl-nack", "nack-1", |agent| {
        ensure!(
            agent.wait_log(
                "the broker nacked a publish; retrying",
                3,
                Duration::from_secs(20)
            ),
            "{}",
            agent.current_log()
        );
        Ok(())
    })?;
    ensure!(
        !ack.duplicate,
        "answered on the same session, not redelivered: {ack:?}"
    );
    ensure!(
        agent.current_log().matches("connected to broker").count() == 1,
        "no reconnect:\n{}",
        agent.current_log()
    );
    Ok(())
}

/// Found by the fleet benchmark: after a cluster node died, some agents' `state` event was
/// nacked on their new session for minutes and they never served again. Retrying a nack is
/// bounded like every wait on the broker: past it the session is given up and made again
/// (here the cause outlives it, so the agent keeps trying), and once the cause is gone the
/// redelivered command is answered from its record.
fn nacked_forever() -> Result<()> {
    let (agent, _) = ping_through_jammed_acks("fl-nack-forever", "nack-forever", |agent| {
        ensure!(
            agent.wait_log("serving commands", 2, Duration::from_secs(60)),
            "the session was not given up while every ack was nacked:\n{}",
            agent.current_log()
        );
        ensure!(
            agent.current_log().contains("nacked"),
            "{}",
            agent.current_log()
        );
        Ok(())
    })?;
    // The redelivery is answered from the record, and then the session holds.
    ensure!(
        agent.wait_log(
            "duplicate command: answering with the stored ack",
            1,
            Duration::from_secs(60)
        ),
        "{}",
        agent.current_log()
    );
    let sessions = agent.current_log().matches("serving commands").count();
    std::thread::sleep(Duration::from_secs(2));
    ensure!(
        agent.current_log().matches("serving commands").count() == sessions,
        "{}",
        agent.current_log()
    );
    Ok(())
}

/// A broker of the test's own, with host `id`'s user, the topology declared, and a manager
/// configuration for it.
fn own_broker(tag: &str, id: &str) -> Result<(Broker, std::path::PathBuf)> {
    let e = env();
    let b = Broker::start(&e.root.join(format!("broker-{tag}")), &e.ca, tag);
    b.add_host_user(id);
    let manager_cfg = e.root.join(format!("manager-{tag}.toml"));
    let text = std::fs::read_to_string(&e.manager_config)?.replace(&e.broker.url(), &b.url());
    std::fs::write(&manager_cfg, text)?;
    crate::support::declare_topology(&manager_cfg);
    Ok((b, manager_cfg))
}

fn missing_dead_letter_queue() -> Result<()> {
    let (b, manager_cfg) = own_broker("nodead", "fl-nodead")?;
    let host = env().host_on(&b, "fl-nodead", HostOptions::default());
    let agent = AgentProc::start(&host);
    agent.wait_serving();
    let result = (|| {
        b.ctl_ok(&["delete_queue", "rampart.dead"]);
        b.ctl_ok(&["close_all_connections", "test: dead-letter queue gone"]);
        ensure!(
            agent.wait_log("serving commands", 2, Duration::from_secs(30)),
            "the agent serves without rampart.dead:\n{}",
            agent.current_log()
        );
        let cfg = rampart::config::Config::load(&manager_cfg)?;
        runtime().block_on(async {
            // (A manager would declare it again: this one only sends.)
            let mut m = rampart::manager::Manager::connect_without_topology(&cfg).await?;
            m.watch_host(&host.id).await?;
            let ack = send(&mut m, &host.id, "ping", "nd-1", json!({})).await?;
            ensure!(ack.status == rampart::protocol::Status::Applied, "{ack:?}");
            m.close().await;
            Ok::<_, anyhow::Error>(())
        })?;
        let socket = host.dir.join("rampart.sock");
        let out = rampart(&["status", "--json", "--socket", socket.to_str().unwrap()]);
        let v: Value = serde_json::from_slice(&out.stdout)?;
        ensure!(
            v["session"]["broker_missing"] == json!(["rampart.dead (queue)"]),
            "status reports what is missing: {v}"
        );
        Ok(())
    })();
    drop(agent);
    b.shutdown();
    result
}

/// The pid of the Erlang VM of `broker`'s node (its command line does not name the node).
fn beam_pid(b: &Broker) -> Result<i32> {
    let out = b.ctl_ok(&["eval", "os:getpid()."]);
    out.trim()
        .trim_matches('"')
        .parse()
        .with_context(|| format!("os:getpid() said {out:?}"))
}

fn frozen_broker() -> Result<()> {
    let (b, _) = own_broker("frozen", "fl-frozen")?;
    let host = env().host_on(
        &b,
        "fl-frozen",
        HostOptions {
            heartbeat_secs: Some(1),
            ..Default::default()
        },
    );
    let mut agent = AgentProc::start(&host);
    agent.wait_serving();
    let beam = nix::unistd::Pid::from_raw(beam_pid(&b)?);
    let result = (|| {
        // The broker freezes: the agent notices by its heartbeats, gives up the session
        // without waiting for the frozen broker to answer close, and keeps trying.
        nix::sys::signal::kill(beam, Signal::SIGSTOP)?;
        ensure!(
            agent.wait_log("broker session lost", 1, Duration::from_secs(15)),
            "{}",
            agent.current_log()
        );
        ensure!(
            agent.wait_log("cannot connect to broker", 1, Duration::from_secs(30)),
            "reconnect attempts go on while the broker is frozen:\n{}",
            agent.current_log()
        );
        nix::sys::signal::kill(beam, Signal::SIGCONT)?;
        ensure!(
            agent.wait_log("serving commands", 2, Duration::from_secs(60)),
            "back once the broker thaws:\n{}",
            agent.current_log()
        );
        // Frozen again, and the agent is told to stop: it exits within its bound.
        nix::sys::signal::kill(beam, Signal::SIGSTOP)?;
        std::thread::sleep(Duration::from_millis(300));
        agent.signal(Signal::SIGTERM);
        let asked = Instant::now();
        let status = agent.wait_exit(Duration::from_secs(25));
        nix::sys::signal::kill(beam, Signal::SIGCONT)?;
        let status = status
            .with_context(|| format!("no exit 25 s after SIGTERM:\n{}", agent.current_log()))?;
        ensure!(status.success(), "{status:?}");
        eprintln!("frozen broker: SIGTERM to exit {:?}", asked.elapsed());
        Ok(())
    })();
    let _ = nix::sys::signal::kill(beam, Signal::SIGCONT);
    drop(agent);
    b.shutdown();
    result
}

fn sigstop_agent() -> Result<()> {
    let host = env().host(
        "fl-sigstop",
        HostOptions {
            heartbeat_secs: Some(1),
            ..Default::default()
        },
    );
    let agent = AgentProc::start(&host);
    agent.wait_serving();
    runtime().block_on(async {
        let h = &host.id;
        let mut m = manager(h).await?;
        agent.signal(Signal::SIGSTOP);
        // The broker gives up on the silent connection after two missed heartbeats.
        tokio::time::sleep(Duration::from_secs(5)).await;
        m.send(h, "ping", "stop-1", &json!({})).await?;
        agent.signal(Signal::SIGCONT);
        let ack = m.wait_ack("stop-1", Duration::from_secs(30)).await?;
        ensure!(ack.status == rampart::protocol::Status::Applied, "{ack:?}");
        ensure!(
            agent.current_log().matches("serving commands").count() >= 2,
            "it noticed the lost session and made a new one:\n{}",
            agent.current_log()
        );
        m.close().await;
        Ok(())
    })
}

fn partition() -> Result<()> {
    use crate::support::site::Site;
    let site = Site::new(
        "rpfp",
        "10.207.1",
        "fl-partition",
        HostOptions {
            heartbeat_secs: Some(1),
            ..Default::default()
        },
    );
    let agent = site.start(&[]);
    runtime().block_on(async {
        let h = &site.host.id;
        let mut m = manager(h).await?;
        applied(&mut m, h, "ping", "part-0", json!({})).await?;
        // Packets from the agent's side vanish at the broker's side (no reset, no ICMP).
        site.brk.nft("add table inet partition");
        site.brk.nft(
            "add chain inet partition in { type filter hook input priority -300; policy drop; }",
        );
        let cut = Instant::now();
        ensure!(
            agent.wait_log("broker session lost", 1, Duration::from_secs(10)),
            "{}",
            agent.current_log()
        );
        let noticed = cut.elapsed();
        eprintln!("partition noticed after {noticed:?} (heartbeat 1 s)");
        // Two heartbeats and the reader's tick: lapin declares the peer dead then.
        ensure!(
            noticed < Duration::from_secs(4),
            "noticed after {noticed:?}"
        );
        for i in 0..5 {
            m.send(h, "ping", &format!("part-{}", i + 1), &json!({}))
                .await?;
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
        site.brk.nft("delete table inet partition");
        for i in 0..5 {
            let ack = m
                .wait_ack(&format!("part-{}", i + 1), Duration::from_secs(40))
                .await?;
            ensure!(ack.status == rampart::protocol::Status::Applied, "{ack:?}");
        }
        m.close().await;
        Ok(())
    })
}

fn full_disk() -> Result<()> {
    use crate::firewall::{Topo, rule};
    use crate::support::netns::{Servers, Tcp};
    let t = Topo::new(25, "fl-fulldisk");
    let disk = SmallDisk::mount(&t.site.host.dir.join("state"))?;
    let _srv = Servers::start(&t.site.ag.name, "0.0.0.0", &[80, 81], &[]);
    let mut agent = t.start();
    runtime().block_on(async {
        let h = &t.site.host.id;
        let mut m = manager(h).await?;
        let rs = json!({"generation": 1, "defaults": {"in": "drop"},
                "rules": [rule("web", 10, "allow", "in", "tcp", &["80"])]});
        applied(&mut m, h, "firewall.apply", "fd-1", rs).await?;
        // The disk fills up.
        disk.fill()?;
        let big: Vec<Value> = (0..2000)
            .map(|i| rule(&format!("r{i}"), 100 + i, "allow", "in", "tcp", &["81"]))
            .collect();
        let rs = json!({"generation": 2, "defaults": {"in": "drop"}, "rules": big});
        let ack = send(&mut m, h, "firewall.apply", "fd-2", rs.clone()).await?;
        ensure!(ack.status == rampart::protocol::Status::Failed, "{ack:?}");
        ensure!(
            ack.error.as_ref().map(|e| e.code) == Some(rampart::protocol::ErrorCode::StoreFailed),
            "{ack:?}"
        );
        // The kernel matches the record: generation 1.
        ensure!(
            t.probe(80) == Tcp::Open && t.probe(81) == Tcp::Silent,
            "rolled back"
        );
        // Space comes back: the agent carries on by itself.
        disk.free()?;
        applied(&mut m, h, "firewall.apply", "fd-3", rs).await?;
        ensure!(t.probe(81) == Tcp::Open);
        m.close().await;
        Ok::<_, anyhow::Error>(())
    })?;
    // Nothing was corrupted: a restart brings generation 2 back.
    let _agent = as_after_a_reboot(&t, &mut agent);
    ensure!(
        t.probe(81) == Tcp::Open && t.probe(80) == Tcp::Silent,
        "generation 2 restored after restart"
    );
    Ok(())
}

/// Generation 1: port 81 open to the addresses of set `clients` (192.0.2.1 to begin with).
fn clients_on_81() -> Value {
    json!({"generation": 1, "defaults": {"in": "drop"},
        "address_sets": {"clients": ["192.0.2.1"]},
        "rules": [{"id": "r81", "priority": 1, "action": "allow", "direction": "in",
                   "protocol": "tcp", "ports": ["81"], "sources": ["$clients"]}]})
}

/// Firewall patches share one fsync per batch (their records are committed first, synced
/// before the acks go out). When that sync fails (the disk filled up under the agent), the
/// patches are undone in memory and in the kernel and answered `failed`/`store_failed`;
/// once space is back the same change applies, and a restart brings back only what was
/// synced.
fn unsynced_patches() -> Result<()> {
    use crate::firewall::Topo;
    use crate::support::netns::{Servers, Tcp};
    let t = Topo::new(17, "fl-syncfail");
    let disk = SmallDisk::mount(&t.site.host.dir.join("state"))?;
    let _srv = Servers::start(&t.site.ag.name, "0.0.0.0", &[81], &[]);
    let client = format!("10.202.{}.2", t.n);
    let mut agent = t.start();
    runtime().block_on(async {
        let h = &t.site.host.id;
        let mut m = manager(h).await?;
        let rs = clients_on_81();
        applied(&mut m, h, "firewall.apply", "us-1", rs).await?;
        ensure!(t.probe(81) == Tcp::Silent, "the client is not allowed yet");
        disk.fill()?;
        let patch = json!({"base_generation": 1, "generation": 2,
                "add_addresses": {"clients": [client]}});
        let ack = send(&mut m, h, "firewall.patch", "us-2", patch.clone()).await?;
        ensure!(
            ack.status == rampart::protocol::Status::Failed
                && ack.error.as_ref().map(|e| e.code)
                    == Some(rampart::protocol::ErrorCode::StoreFailed),
            "{ack:?}"
        );
        ensure!(
            t.probe(81) == Tcp::Silent,
            "a patch that could not be recorded is not in force"
        );
        // A patch and its redelivery in one batch: the second must not be answered from
        // the first's record, which never reached the disk.
        let mut acks = m.subscribe(rampart::broker::ACKS_EXCHANGE, h).await?;
        agent.signal(nix::sys::signal::Signal::SIGSTOP);
        m.send(h, "firewall.patch", "us-2b", &patch).await?;
        m.send(h, "firewall.patch", "us-2b", &patch).await?;
        agent.signal(nix::sys::signal::Signal::SIGCONT);
        let mut answers = vec![];
        while answers.len() < 2 {
            let next = tokio::time::timeout(
                Duration::from_secs(20),
                futures_util::StreamExt::next(&mut acks),
            )
            .await
            .context("acks for us-2b")?
            .context("the ack stream ended")??;
            let ack: rampart::protocol::Ack = serde_json::from_slice(&next.data)?;
            if ack.correlation_id.as_deref() == Some("us-2b") {
                answers.push(ack);
            }
        }
        ensure!(
            answers
                .iter()
                .all(|a| a.status == rampart::protocol::Status::Failed),
            "neither the patch nor its redelivery may be answered applied: {answers:?}"
        );
        ensure!(t.probe(81) == Tcp::Silent, "still not in force");
        // Two patches in a row, the second on the first's generation: whichever batches
        // they fall in (the second may run while the first's records are being written),
        // neither may be answered applied, and the firewall stays at generation 1.
        agent.signal(nix::sys::signal::Signal::SIGSTOP);
        let next = json!({"base_generation": 2, "generation": 3,
                "add_addresses": {"clients": ["192.0.2.9"]}});
        m.send(h, "firewall.patch", "us-2c", &patch).await?;
        m.send(h, "firewall.patch", "us-2d", &next).await?;
        agent.signal(nix::sys::signal::Signal::SIGCONT);
        for id in ["us-2c", "us-2d"] {
            let ack = m.wait_ack(id, Duration::from_secs(20)).await?;
            ensure!(
                ack.status != rampart::protocol::Status::Applied,
                "{id} cannot have been recorded: {ack:?}"
            );
        }
        ensure!(t.probe(81) == Tcp::Silent, "still not in force");
        disk.free()?;
        let sync = send(&mut m, h, "state.sync", "us-sync", json!({})).await?;
        ensure!(
            sync.data["firewall"]["generation"] == 1,
            "the firewall is what the store holds: {}",
            sync.data["firewall"]
        );
        // The same change, now that it can be recorded, on the same base generation.
        applied(&mut m, h, "firewall.patch", "us-3", patch).await?;
        ensure!(t.probe(81) == Tcp::Open, "the patch is in force");
        m.close().await;
        Ok::<_, anyhow::Error>(())
    })?;
    let _agent = as_after_a_reboot(&t, &mut agent);
    ensure!(
        t.probe(81) == Tcp::Open,
        "generation 2 restored after restart"
    );
    Ok(())
}

/// The records of commands that changed nothing go to the record log (`records.log`) with
/// one write per batch. On a full disk that write can be cut short: the commands are
/// answered `failed`/`store_failed`, and the log must be left ending on a whole record, or
/// the next record written is glued to the cut one and lost at the next start (and the
/// whole records of the failed write would come back as records of commands answered
/// `failed`).
fn cut_record_log() -> Result<()> {
    let host = env().host("fl-cutlog", HostOptions::default());
    let state = host.dir.join("state");
    let disk = SmallDisk::mount(&state)?;
    let log = state.join("records.log");
    let mut agent = AgentProc::start(&host);
    agent.wait_serving();
    let failed = runtime().block_on(async {
        let mut m = manager(&host.id).await?;
        // A first record, so that the log has a page with room left when the disk fills.
        applied(&mut m, &host.id, "ping", "cl-first", json!({})).await?;
        disk.fill()?;
        // Each ping's record fills the log's last page further; the first one that does
        // not fit is written in part, then fails.
        let mut failed = None;
        for i in 0..100 {
            let id = format!("cl-{i}");
            let ack = send(&mut m, &host.id, "ping", &id, json!({})).await?;
            if ack.status == rampart::protocol::Status::Failed {
                ensure!(
                    ack.error.as_ref().map(|e| e.code)
                        == Some(rampart::protocol::ErrorCode::StoreFailed),
                    "{ack:?}"
                );
                failed = Some(id);
                break;
            }
        }
        let failed = failed.context("no record write failed on a full disk")?;
        eprintln!(
            "{failed} failed; the log holds {} bytes",
            std::fs::metadata(&log)?.len()
        );
        let text = std::fs::read(&log)?;
        ensure!(
            text.is_empty() || text.ends_with(b"\n"),
            "the record log ends in a cut record: ...{:?}",
            String::from_utf8_lossy(&text[text.len().saturating_sub(80)..])
        );
        disk.free()?;
        applied(&mut m, &host.id, "ping", "cl-after", json!({})).await?;
        m.close().await;
        anyhow::Ok(failed)
    })?;
    agent.kill9();
    let agent = AgentProc::start(&host);
    agent.wait_serving();
    runtime().block_on(async {
        let mut m = manager(&host.id).await?;
        let again = send(&mut m, &host.id, "ping", "cl-after", json!({})).await?;
        ensure!(
            again.duplicate && again.status == rampart::protocol::Status::Applied,
            "the record written after the cut one survives a restart: {again:?}"
        );
        let retried = send(&mut m, &host.id, "ping", &failed, json!({})).await?;
        ensure!(
            !retried.duplicate,
            "a command answered failed has no record: {retried:?}"
        );
        m.close().await;
        anyhow::Ok(())
    })?;
    drop(agent);
    Ok(())
}

/// Sends `patches` (id, data) while the agent is stopped, so that they come as one batch.
async fn queued(
    m: &mut rampart::manager::Manager,
    agent: &AgentProc,
    host: &str,
    patches: &[(&str, Value)],
) -> Result<()> {
    agent.signal(Signal::SIGSTOP);
    let sent = async {
        for (id, data) in patches {
            m.send(host, "firewall.patch", id, data).await?;
        }
        anyhow::Ok(())
    }
    .await;
    agent.signal(Signal::SIGCONT);
    sent
}

/// The firewall patches of one batch that change set elements only go to the kernel in one
/// transaction; the answers, the kernel and the record are as if each had run alone: a
/// redelivery among them is a duplicate, a patch changing rules runs after the ones before
/// it. When that one transaction fails, each patch runs alone and gets its own answer.
fn grouped_patches() -> Result<()> {
    use crate::firewall::Topo;
    use crate::support::netns::{Servers, Tcp};
    use rampart::protocol::{ErrorCode, Status};
    let t = Topo::with_options(
        18,
        "fl-grouped",
        HostOptions {
            // The whole prefetch (32) in flight, so that a batch holds every patch.
            commands: format!("max_buffered_bytes = {}", 32 * 16 * 1024 * 1024),
            ..Default::default()
        },
    );
    let _srv = Servers::start(&t.site.ag.name, "0.0.0.0", &[81], &[]);
    let client = format!("10.202.{}.2", t.n);
    let mut agent = t.site.start(&[(
        "RAMPART_LOG",
        "info,lapin=off,rampart::dispatch::batch=debug",
    )]);
    let set = |id: &str| -> Result<String> {
        let out = t
            .site
            .ag
            .exec(&["nft", "list", "set", "inet", "rampart", id]);
        ensure!(out.status.success(), "nft list set {id}");
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    runtime().block_on(async {
        let h = &t.site.host.id;
        let mut m = manager(h).await?;
        let rs = clients_on_81();
        applied(&mut m, h, "firewall.apply", "gp-1", rs).await?;
        let add = |base: u64, addrs: &[&str]| {
            json!({"base_generation": base, "generation": base + 1,
                   "add_addresses": {"clients": addrs}})
        };
        let mut acks = m.subscribe(rampart::broker::ACKS_EXCHANGE, h).await?;
        let p2 = add(1, &[&client]);
        let patches = [
            ("gp-2", p2.clone()),
            ("gp-2", p2),
            ("gp-3", add(2, &["192.0.2.9"])),
            (
                "gp-4",
                json!({"base_generation": 3, "generation": 4,
                "remove_addresses": {"clients": ["192.0.2.9"]},
                "add_addresses": {"clients": ["192.0.2.10"]}}),
            ),
            // Refused while the two before wait for their transaction: answered after them.
            (
                "gp-bad",
                json!({"base_generation": 4, "generation": 5, "bogus": 1}),
            ),
            ("gp-5", add(4, &["192.0.2.11"])),
            (
                "gp-6",
                json!({"base_generation": 5, "generation": 6, "upsert_rules": [
                {"id": "r82", "priority": 2, "action": "allow", "direction": "in",
                 "protocol": "tcp", "ports": ["82"], "sources": ["$clients"]}]}),
            ),
            (
                "gp-7",
                json!({"base_generation": 6, "generation": 7,
                "remove_addresses": {"clients": ["192.0.2.10"]}}),
            ),
            ("gp-8", add(6, &["192.0.2.12"])),
        ];
        queued(&mut m, &agent, h, &patches).await?;
        let mut answers: Vec<rampart::protocol::Ack> = vec![];
        while answers.len() < patches.len() {
            let next = tokio::time::timeout(
                Duration::from_secs(20),
                futures_util::StreamExt::next(&mut acks),
            )
            .await
            .context("the patches' acks")?
            .context("the ack stream ended")??;
            answers.push(serde_json::from_slice(&next.data)?);
        }
        let of = |id: &str| -> Vec<(Status, bool)> {
            (answers.iter())
                .filter(|a| a.correlation_id.as_deref() == Some(id))
                .map(|a| (a.status, a.duplicate))
                .collect()
        };
        for id in ["gp-3", "gp-4", "gp-5", "gp-6", "gp-7"] {
            ensure!(of(id) == [(Status::Applied, false)], "{id}: {answers:?}");
        }
        ensure!(
            of("gp-2") == [(Status::Applied, false), (Status::Applied, true)],
            "a redelivery among grouped patches is a duplicate: {answers:?}"
        );
        ensure!(of("gp-8") == [(Status::Stale, false)], "{answers:?}");
        ensure!(of("gp-bad") == [(Status::Rejected, false)], "{answers:?}");
        // Acks go out in queue order.
        let order: Vec<&str> = (answers.iter())
            .filter_map(|a| a.correlation_id.as_deref())
            .collect();
        let sent: Vec<&str> = patches.iter().map(|(id, _)| *id).collect();
        ensure!(order == sent, "acks in {order:?}, commands in {sent:?}");
        ensure!(t.probe(81) == Tcp::Open, "the client was added");
        let listed = set("as4_clients")?;
        ensure!(
            listed.contains("192.0.2.11")
                && !listed.contains("192.0.2.9")
                && !listed.contains("192.0.2.10"),
            "{listed}"
        );
        ensure!(
            agent
                .current_log()
                .lines()
                .any(|l| l.contains("in one transaction")
                    && l.split_whitespace().any(|w| w
                        .strip_prefix("patches=")
                        .and_then(|n| n.parse::<u32>().ok())
                        >= Some(2))),
            "no two patches went to the kernel together:\n{}",
            agent.current_log()
        );
        // Now the kernel refuses one of them (an overlapping interval put in behind the
        // agent's back): the three run one by one instead.
        let injected = t.site.ag.exec(&[
            "nft",
            "add",
            "element",
            "inet",
            "rampart",
            "as4_clients",
            "{ 192.0.2.48/29 }",
        ]);
        ensure!(injected.status.success(), "{injected:?}");
        let patches = [
            ("gp-9", add(7, &["192.0.2.40"])),
            ("gp-10", add(8, &["192.0.2.50"])),
            ("gp-11", add(9, &["192.0.2.60"])),
        ];
        queued(&mut m, &agent, h, &patches).await?;
        let wait = Duration::from_secs(20);
        let a9 = m.wait_ack("gp-9", wait).await?;
        let a10 = m.wait_ack("gp-10", wait).await?;
        let a11 = m.wait_ack("gp-11", wait).await?;
        ensure!(a9.status == Status::Applied, "{a9:?}");
        ensure!(
            a10.status == Status::Failed
                && a10.error.as_ref().map(|e| e.code) == Some(ErrorCode::NftFailed),
            "{a10:?}"
        );
        ensure!(a11.status == Status::Stale, "{a11:?}");
        ensure!(
            agent.current_log().contains("running them one by one"),
            "{}",
            agent.current_log()
        );
        let sync = send(&mut m, h, "state.sync", "gp-sync", json!({})).await?;
        ensure!(
            sync.data["firewall"]["generation"] == 8,
            "{}",
            sync.data["firewall"]
        );
        let listed = set("as4_clients")?;
        ensure!(
            listed.contains("192.0.2.40") && !listed.contains("192.0.2.60"),
            "{listed}"
        );
        m.close().await;
        Ok::<_, anyhow::Error>(())
    })?;
    // What was recorded comes back as it was.
    let _agent = as_after_a_reboot(&t, &mut agent);
    ensure!(t.probe(81) == Tcp::Open, "restored after restart");
    let listed = set("as4_clients")?;
    ensure!(
        listed.contains("192.0.2.11") && listed.contains("192.0.2.40"),
        "{listed}"
    );
    Ok(())
}

/// The agent killed and its table gone, as a reboot leaves them; then started again.
fn as_after_a_reboot(t: &crate::firewall::Topo, agent: &mut AgentProc) -> AgentProc {
    agent.kill9();
    t.site
        .ag
        .exec(&["nft", "delete", "table", "inet", "rampart"]);
    t.start()
}

/// An 8 MiB tmpfs on a host's state directory, to fill up under the agent; unmounted when
/// dropped.
struct SmallDisk {
    dir: std::path::PathBuf,
}

impl SmallDisk {
    fn mount(dir: &std::path::Path) -> Result<SmallDisk> {
        std::fs::create_dir_all(dir)?;
        let mounted = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=8m", "tmpfs"])
            .arg(dir)
            .status()?;
        ensure!(mounted.success(), "mounting a tmpfs on the state directory");
        Ok(SmallDisk {
            dir: dir.to_path_buf(),
        })
    }

    /// Fills what is left of it.
    fn fill(&self) -> Result<()> {
        let _ = std::process::Command::new("dd")
            .args(["if=/dev/zero", "bs=64k"])
            .arg(format!("of={}", self.dir.join("filler").display()))
            .output()?;
        Ok(())
    }

    fn free(&self) -> Result<()> {
        Ok(std::fs::remove_file(self.dir.join("filler"))?)
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.dir)
            .status();
    }
}

/// Node kills in the cluster test: 2 (CI), or `RAMPART_CHAOS_KILLS`.
fn cluster_kills() -> usize {
    std::env::var("RAMPART_CHAOS_KILLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2)
}

fn cluster_node_kills() -> Result<()> {
    let e = env();
    let cluster = crate::support::broker::Cluster::start(&e.root.join("cluster"), &e.ca, "cl");
    let id = "fl-cluster";
    cluster.nodes[0].add_host_user(id);
    let urls = cluster.urls();
    let host = e.host_on(
        &cluster.nodes[0],
        id,
        HostOptions {
            urls: Some(urls.clone()),
            heartbeat_secs: Some(2),
            ..Default::default()
        },
    );
    let manager_cfg = e.root.join("manager-cluster.toml");
    let listed: Vec<String> = urls.iter().map(|u| format!("\"{u}\"")).collect();
    let text = std::fs::read_to_string(&e.manager_config)?
        .replace(&format!("\"{}\"", e.broker.url()), &listed.join(", "));
    std::fs::write(&manager_cfg, text)?;
    crate::support::declare_topology(&manager_cfg);
    let cfg = rampart::config::Config::load(&manager_cfg)?;
    let rt = runtime();
    // The acks go to a quorum queue of the test's own as well, so none is lost with a node.
    let acks = rt.block_on(AckLog::declare(&cfg, id, true))?;
    let agent = AgentProc::start(&host);
    agent.wait_serving();
    let socket = host.dir.join("rampart.sock");
    let session_port = || -> Option<u64> {
        let out = rampart(&["status", "--json", "--socket", socket.to_str()?]);
        let v: Value = serde_json::from_slice(&out.stdout).ok()?;
        v["session"]["broker_port"].as_u64()
    };

    // A stream of commands, re-sent by id when the manager's own node dies (a manager's
    // retry: at most once by the agent's dedup).
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sent = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let streamer = {
        let (stop, sent, cfg) = (stop.clone(), sent.clone(), cfg.clone());
        std::thread::spawn(move || {
            runtime().block_on(async move {
                let mut m = None;
                let mut n = 0u32;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let cmd = format!("cl-{n}");
                    if m.is_none() {
                        m = rampart::manager::Manager::connect(&cfg).await.ok();
                    }
                    let ok = match &m {
                        Some(mgr) => mgr.send(id, "ping", &cmd, &json!({})).await.is_ok(),
                        None => false,
                    };
                    if ok {
                        sent.lock().unwrap().push(cmd);
                        n += 1;
                    } else {
                        m = None;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            });
        })
    };
    let mut gaps = vec![];
    let result = (|| {
        for kill in 0..cluster_kills() {
            std::thread::sleep(Duration::from_secs(2));
            let port = session_port().context("agent connected")?;
            let node = cluster
                .nodes
                .iter()
                .find(|n| u64::from(n.port) == port)
                .context("the session's node")?;
            let sessions = agent.current_log().matches("serving commands").count();
            let processed = agent.current_log().matches("command processed").count();
            node.kill9();
            let killed = Instant::now();
            ensure!(
                agent.wait_log("serving commands", sessions + 1, Duration::from_secs(30)),
                "kill {kill}: no new session:\n{}",
                agent.current_log()
            );
            ensure!(
                agent.wait_log("command processed", processed + 1, Duration::from_secs(30)),
                "kill {kill}: no command after the kill:\n{}",
                agent.current_log()
            );
            gaps.push(killed.elapsed());
            node.start_again();
        }
        Ok(())
    })();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = streamer.join();
    result?;
    eprintln!("cluster: node kill to the next processed command: {gaps:?}");
    let sent = sent.lock().unwrap().clone();
    ensure!(sent.len() > 20, "the stream ran ({} commands)", sent.len());
    // Every command answered, each id with one outcome.
    let outcomes = rt.block_on(acks.collect(&sent, Duration::from_secs(60)))?;
    let tally = acklog::check(&sent, &outcomes)?;
    eprintln!(
        "cluster: {} commands, {} answered more than once (duplicates), {} kills",
        tally.sent,
        tally.duplicates,
        gaps.len()
    );
    drop(agent);
    Ok(())
}
