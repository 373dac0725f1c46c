//! Round-trip benchmark (not a test): a `ping` through the agent (decode, dedup lookup,
//! durable record, confirmed ack) beside a bare AMQP echo consumer on the same broker, in the
//! same run; then pipelined throughput for both. Run with `cargo bench --bench roundtrip`.

#[path = "../tests/e2e/support/mod.rs"]
#[allow(dead_code)]
mod support;

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use rampart::broker;
use rampart::manager::Manager;
use serde_json::json;
use support::{AgentProc, HostOptions, env};

const SEQUENTIAL: usize = 500;
const PIPELINED: usize = 2000;
/// One-address `firewall.patch` commands in the stream (issue 12's yardstick).
const PATCHES: usize = 1000;
/// The size of the set the second patch stream adds to.
const BIG_SET: u32 = 50_000;
const ECHO_HOST: &str = "bench-echo";
const CLASSIC_ECHO_HOST: &str = "bench-echo-classic";
/// The agent-like echo with the default agent's prefetch (4): what the transport allows
/// with that many deliveries in flight.
const ECHO4_HOST: &str = "bench-echo-prefetch4";

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// A responder doing only the transport work the agent must do: consume with manual ack,
/// publish a reply with a confirm to rampart.acks, then ack the delivery. `like_agent`
/// declares its queue exactly as an agent's (a quorum queue, whose publishes and acks the
/// broker syncs to disk); otherwise it is a classic durable queue (what this bench compared
/// with before 2026-12-02, which left the broker's quorum work on the agent's side).
/// `prefetch`: deliveries the broker may push ahead of the acks.
async fn echo_responder(host: &'static str, like_agent: bool, prefetch: u16) -> anyhow::Result<()> {
    let config = rampart::config::Config::load(&env().manager_config)?;
    let b = config.broker.clone();
    let (_, tls) = rampart::certs::tls::from_config(&b)?;
    let connector = broker::Connector::new(&b, tls, host.to_string())?;
    let session = connector.connect(&connector.urls[0]).await?;
    tokio::spawn(async move {
        let conn = session.connection;
        let ch = conn.create_channel().await.unwrap();
        // The classic one answers on the other's routing key: the manager watches that one
        // (watching declares a host's queue, which would take the commands too).
        let (q, reply_key) = if like_agent {
            (broker::host_queue(host), host)
        } else {
            (format!("rampart.bench.{host}"), ECHO_HOST)
        };
        if like_agent {
            broker::declare_host_queue(&ch, host, &b).await.unwrap();
        } else {
            ch.queue_declare(
                q.as_str().into(),
                QueueDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap();
            ch.queue_bind(
                q.as_str().into(),
                broker::COMMANDS_EXCHANGE.into(),
                host.into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
        }
        ch.basic_qos(prefetch, Default::default()).await.unwrap();
        let publish = broker::confirm_channel(&conn).await.unwrap();
        let mut consumer = ch
            .basic_consume(
                q.as_str().into(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
        while let Some(Ok(d)) = consumer.next().await {
            let id = d.properties.message_id().clone().unwrap_or_default();
            let reply = serde_json::to_vec(&json!({
                "specversion": "1.0", "id": "echo", "type": "ack", "source": host, "host": host,
                "timestamp": 0, "correlation_id": id.as_str(), "command_type": "ping", "status": "applied",
                "duplicate": false, "error": null, "data": {}
            })).unwrap();
            broker::publish_confirmed(
                &publish,
                broker::ACKS_EXCHANGE,
                reply_key,
                &reply,
                broker::json_properties().with_correlation_id(id),
                false,
            )
            .await
            .unwrap();
            d.acker.ack(BasicAckOptions::default()).await.unwrap();
        }
    });
    Ok(())
}

async fn sequential(m: &mut Manager, host: &str, tag: &str) -> anyhow::Result<Vec<Duration>> {
    let mut times = Vec::with_capacity(SEQUENTIAL);
    for i in 0..SEQUENTIAL + 20 {
        let id = format!("{tag}-seq-{i}");
        let t = Instant::now();
        m.send(host, "ping", &id, &json!({})).await?;
        let ack = m.wait_ack(&id, Duration::from_secs(30)).await?;
        anyhow::ensure!(ack.status == rampart::protocol::Status::Applied);
        if i >= 20 {
            times.push(t.elapsed()); // the first 20 warm up
        }
    }
    times.sort();
    Ok(times)
}

async fn pipelined(m: &mut Manager, host: &str, tag: &str) -> anyhow::Result<f64> {
    let t = Instant::now();
    let ids: Vec<String> = (0..PIPELINED).map(|i| format!("{tag}-pipe-{i}")).collect();
    let data = json!({});
    // All publishes in flight at once; their confirms are awaited together.
    futures_util::future::try_join_all(ids.iter().map(|id| m.send(host, "ping", id, &data)))
        .await?;
    for i in 0..PIPELINED {
        m.wait_ack(&format!("{tag}-pipe-{i}"), Duration::from_secs(60))
            .await?;
    }
    Ok(PIPELINED as f64 / t.elapsed().as_secs_f64())
}

/// A base rule set whose set holds `elements` addresses (at generation `first`), then
/// PATCHES one-address patches to that set, each on the generation before, all published at
/// once; commands per second from the first publish to the last ack. A patch's cost should
/// not depend on `elements`.
async fn patch_stream(
    m: &mut Manager,
    host: &str,
    first: u64,
    elements: u32,
) -> anyhow::Result<f64> {
    // The base set lives in 198.18.0.0/15, the patches add addresses in 10.0.0.0/8.
    let base_set: Vec<String> = (0..elements.max(1))
        .map(|i| std::net::Ipv4Addr::from((198u32 << 24) | (18 << 16) | i).to_string())
        .collect();
    let base = json!({"generation": first, "address_sets": {"s": base_set}, "rules": [
        {"id": "r", "priority": 1, "action": "allow", "direction": "in", "sources": ["$s"]}]});
    let base_id = format!("stream-base-{first}");
    m.send(host, "firewall.apply", &base_id, &base).await?;
    let ack = m.wait_ack(&base_id, Duration::from_secs(60)).await?;
    anyhow::ensure!(ack.status == rampart::protocol::Status::Applied, "{ack:?}");
    let t = Instant::now();
    let patches: Vec<(String, serde_json::Value)> = (0..PATCHES)
        .map(|i| {
            let g = first + i as u64;
            let addr = std::net::Ipv4Addr::from((10u32 << 24) | ((i as u32) << 2));
            let data = json!({"base_generation": g, "generation": g + 1,
                "add_addresses": {"s": [addr.to_string()]}});
            (format!("stream-{first}-{i}"), data)
        })
        .collect();
    futures_util::future::try_join_all(
        patches
            .iter()
            .map(|(id, data)| m.send(host, "firewall.patch", id, data)),
    )
    .await?;
    for (id, _) in &patches {
        let ack = m.wait_ack(id, Duration::from_secs(120)).await?;
        anyhow::ensure!(ack.status == rampart::protocol::Status::Applied, "{ack:?}");
    }
    Ok(PATCHES as f64 / t.elapsed().as_secs_f64())
}

fn main() -> anyhow::Result<()> {
    // `cargo test --all-targets` runs bench binaries without --bench: build-check only.
    if !std::env::args().any(|a| a == "--bench") {
        println!("roundtrip: benchmark skipped (run it with cargo bench --bench roundtrip)");
        return Ok(());
    }
    let root = tempfile::Builder::new()
        .prefix("rampart-bench-")
        .tempdir_in("/tmp")?;
    support::init(root.path());
    // The agents run in this host's namespace: tables of their own, deleted at the end.
    let host = env().host(
        "bench-agent",
        HostOptions {
            firewall: "table = \"rampart_bench\"".into(),
            ..Default::default()
        },
    );
    let agent = AgentProc::start(&host);
    agent.wait_serving();
    // The same agent with a byte budget that lets the whole prefetch (32) be in flight: the
    // default budget (64 MiB of 16 MiB bodies) holds it to 4 deliveries, which bounds what
    // any pipelining can do (a table of its own, beside the first agent's).
    let wide = env().host(
        "bench-agent-wide",
        HostOptions {
            commands: format!("max_buffered_bytes = {}", 32 * 16 * 1024 * 1024),
            firewall: "table = \"rampart_bench_wide\"".into(),
            ..Default::default()
        },
    );
    let wide_agent = AgentProc::start(&wide);
    wide_agent.wait_serving();
    let result = support::runtime().block_on(async {
        let mut m = env().manager().await;
        m.watch_host(&host.id).await?;
        m.watch_host(&wide.id).await?;
        m.watch_host(ECHO_HOST).await?;
        m.watch_host(ECHO4_HOST).await?;
        echo_responder(ECHO_HOST, true, 32).await?;
        echo_responder(CLASSIC_ECHO_HOST, false, 32).await?;
        echo_responder(ECHO4_HOST, true, 4).await?;
        let agent_seq = sequential(&mut m, &host.id, "agent").await?;
        let echo_seq = sequential(&mut m, ECHO_HOST, "echo").await?;
        let classic_seq = sequential(&mut m, CLASSIC_ECHO_HOST, "classic").await?;
        let agent_rate = pipelined(&mut m, &host.id, "agent").await?;
        let echo_rate = pipelined(&mut m, ECHO_HOST, "echo").await?;
        let classic_rate = pipelined(&mut m, CLASSIC_ECHO_HOST, "classic").await?;
        let echo4_rate = pipelined(&mut m, ECHO4_HOST, "echo4").await?;
        let wide_rate = pipelined(&mut m, &wide.id, "wide").await?;
        let patch_rate = patch_stream(&mut m, &host.id, 1, 1).await?;
        let wide_patch_rate = patch_stream(&mut m, &wide.id, 1, 1).await?;
        let big_patch_rate = patch_stream(&mut m, &host.id, 10_000, BIG_SET).await?;
        println!("ping round trip, {SEQUENTIAL} sequential commands (ms):");
        println!("  {:<36} {:>8} {:>8}", "", "p50", "p99");
        for (name, t) in [
            ("agent (rampart run)", &agent_seq),
            ("bare echo, queue like the agent's", &echo_seq),
            ("bare echo, classic queue", &classic_seq),
        ] {
            println!(
                "  {:<36} {:>8.2} {:>8.2}",
                name,
                ms(percentile(t, 0.5)),
                ms(percentile(t, 0.99))
            );
        }
        for (name, echo) in [("echo", &echo_seq), ("classic echo", &classic_seq)] {
            println!(
                "  {:<36} {:>8.2} {:>8.2}",
                format!("ratio agent/{name}"),
                ms(percentile(&agent_seq, 0.5)) / ms(percentile(echo, 0.5)),
                ms(percentile(&agent_seq, 0.99)) / ms(percentile(echo, 0.99))
            );
        }
        println!("pipelined, {PIPELINED} commands in flight at once (commands/s):");
        println!("  {:<36} {agent_rate:>8.0}", "agent (rampart run)");
        println!(
            "  {:<36} {wide_rate:>8.0}",
            "agent, prefetch 32 (wide budget)"
        );
        println!(
            "  {:<36} {echo_rate:>8.0}",
            "bare echo, queue like the agent's"
        );
        println!("  {:<36} {classic_rate:>8.0}", "bare echo, classic queue");
        println!(
            "  {:<36} {echo4_rate:>8.0}",
            "bare echo, agent's queue, prefetch 4"
        );
        println!(
            "  {:<36} {:>8.2}",
            "ratio agent/echo",
            agent_rate / echo_rate
        );
        println!(
            "  {:<36} {:>8.2}",
            "ratio agent/classic echo",
            agent_rate / classic_rate
        );
        println!(
            "  {:<36} {:>8.2}",
            "ratio wide agent/echo",
            wide_rate / echo_rate
        );
        println!(
            "  {:<36} {:>8.2}",
            "ratio agent/echo, both prefetch 4",
            agent_rate / echo4_rate
        );
        println!("{PATCHES} one-address firewall.patch commands, pipelined (commands/s):");
        println!("  {:<36} {patch_rate:>8.0}", "agent (rampart run)");
        println!(
            "  {:<36} {wide_patch_rate:>8.0}",
            "agent, prefetch 32 (wide budget)"
        );
        println!(
            "  {:<36} {big_patch_rate:>8.0}",
            format!("agent, set of {BIG_SET} addresses")
        );
        m.close().await;
        anyhow::Ok(())
    });
    drop(agent);
    drop(wide_agent);
    for table in ["rampart_bench", "rampart_bench_wide"] {
        let _ = std::process::Command::new("nft")
            .args(["delete", "table", "inet", table])
            .status();
    }
    support::timing::finish(root, "bench-agent");
    result
}
