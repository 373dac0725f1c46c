//! Timing helpers for the benchmark harness (benches/): command-to-ack times and medians.

use std::time::{Duration, Instant};

use rampart::manager::Manager;
use serde_json::Value;

/// Sends one command and returns the time until its `applied` ack.
pub async fn timed(
    m: &mut Manager,
    host: &str,
    kind: &str,
    id: &str,
    data: &Value,
) -> anyhow::Result<Duration> {
    let t = Instant::now();
    m.send(host, kind, id, data).await?;
    let ack = m.wait_ack(id, Duration::from_secs(300)).await?;
    anyhow::ensure!(ack.status == rampart::protocol::Status::Applied, "{ack:?}");
    Ok(t.elapsed())
}

pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

pub fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// Stops the broker; with `RAMPART_BENCH_KEEP` set, keeps the files and says where the
/// agent's log is (for a look at its debug timings).
pub fn finish(root: tempfile::TempDir, host: &str) {
    super::teardown();
    if std::env::var_os("RAMPART_BENCH_KEEP").is_some() {
        let log = root.keep().join("hosts").join(host).join("agent.log");
        println!("agent log: {}", log.display());
    }
}
