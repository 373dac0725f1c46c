//! Router benchmark (not a test): command-to-ack time to create and to delete one router
//! with two interfaces and a route, beside the same objects made by `ip` run directly (one
//! process per step, and `ip -batch`), and 100 routers sent at once. Run with
//! `cargo bench --bench routers`.

#[path = "../tests/e2e/support/mod.rs"]
#[allow(dead_code)]
mod support;

use std::process::Command;
use std::time::{Duration, Instant};

use rampart::router::spec::host_name;
use serde_json::{Value, json};
use support::site::Site;
use support::timing::{median, ms, timed};
use support::{HostOptions, env};

const RUNS: usize = 15;

fn spec(id: &str) -> Value {
    json!({"id": id, "interfaces": [
        {"name": "lif0", "addresses": ["10.240.0.1/24"], "bridge": "bra"},
        {"name": "lif1", "addresses": ["10.240.1.1/24"], "bridge": "brb"},
    ], "routes": [{"destination": "0.0.0.0/0", "via": "10.240.0.254"}]})
}

fn run(args: &[&str]) {
    let o = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(
        o.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// The router made the way a script would: one `ip` (or sysctl) process per step.
fn ip_steps(ag: &str, ns: &str, host: [&str; 2]) -> Vec<Vec<String>> {
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    let mut steps = vec![
        s(&["ip", "netns", "add", ns]),
        s(&["ip", "-n", ns, "link", "set", "lo", "up"]),
        s(&[
            "ip",
            "netns",
            "exec",
            ns,
            "sysctl",
            "-qw",
            "net.ipv4.ip_forward=1",
            "net.ipv6.conf.all.forwarding=1",
        ]),
    ];
    for (i, (h, br)) in host.iter().zip(["bra", "brb"]).enumerate() {
        let inner = format!("lif{i}");
        let addr = format!("10.240.{i}.1/24");
        steps.push(s(&[
            "ip", "-n", ag, "link", "add", h, "type", "veth", "peer", "name", &inner, "netns", ns,
        ]));
        steps.push(s(&["ip", "-n", ag, "link", "set", h, "master", br, "up"]));
        steps.push(s(&["ip", "-n", ns, "link", "set", &inner, "up"]));
        steps.push(s(&["ip", "-n", ns, "addr", "add", &addr, "dev", &inner]));
    }
    steps.push(s(&[
        "ip",
        "-n",
        ns,
        "route",
        "add",
        "default",
        "via",
        "10.240.0.254",
    ]));
    steps
}

fn ip_delete(ag: &str, ns: &str, host: [&str; 2]) -> Vec<Vec<String>> {
    let mut steps: Vec<Vec<String>> = host
        .iter()
        .map(|h| {
            ["ip", "-n", ag, "link", "del", h]
                .iter()
                .map(|x| x.to_string())
                .collect()
        })
        .collect();
    steps.push(
        ["ip", "netns", "del", ns]
            .iter()
            .map(|x| x.to_string())
            .collect(),
    );
    steps
}

fn time_steps(steps: &[Vec<String>]) -> Duration {
    let t = Instant::now();
    for step in steps {
        let args: Vec<&str> = step.iter().map(String::as_str).collect();
        run(&args);
    }
    t.elapsed()
}

/// The same steps through `ip -batch`: one batch per namespace (host side first), with
/// `netns add`/`del` and sysctl as processes of their own.
fn time_batch(steps: &[Vec<String>]) -> Duration {
    let mut processes = vec![];
    let mut batches: Vec<(String, String)> = vec![];
    for step in steps {
        if step[1] == "-n" {
            let ns = step[2].clone();
            let line = step[3..].join(" ") + "\n";
            match batches.iter_mut().find(|(n, _)| *n == ns) {
                Some((_, text)) => text.push_str(&line),
                None => batches.push((ns, line)),
            }
        } else {
            processes.push(step.clone());
        }
    }
    // The host side makes the veths the router's side then configures.
    batches.sort_by_key(|(ns, _)| ns.starts_with("lr-"));
    let t = Instant::now();
    let (first, last): (Vec<_>, Vec<_>) = processes.iter().partition(|p| p[2] != "del");
    for step in first {
        let args: Vec<&str> = step.iter().map(String::as_str).collect();
        run(&args);
    }
    for (i, (ns, text)) in batches.iter().enumerate() {
        let path = std::env::temp_dir().join(format!("rampart-bench-ip-{i}.batch"));
        std::fs::write(&path, text).unwrap();
        run(&["ip", "-n", ns, "-batch", path.to_str().unwrap()]);
    }
    for step in last {
        let args: Vec<&str> = step.iter().map(String::as_str).collect();
        run(&args);
    }
    t.elapsed()
}

fn main() -> anyhow::Result<()> {
    if !std::env::args().any(|a| a == "--bench") {
        println!("routers: benchmark skipped (run it with cargo bench --bench routers)");
        return Ok(());
    }
    let root = tempfile::Builder::new()
        .prefix("rampart-rtbench-")
        .tempdir_in("/tmp")?;
    support::init(root.path());
    let site = Site::new(
        "rpb2",
        "10.209.1",
        "bench-rt",
        HostOptions {
            firewall: "drift_check_secs = 3600".into(),
            ..Default::default()
        },
    );
    let ag = site.ag.name.clone();
    for br in ["bra", "brb"] {
        run(&["ip", "-n", &ag, "link", "add", br, "type", "bridge"]);
        run(&["ip", "-n", &ag, "link", "set", br, "up"]);
    }
    let agent = site.start(&[]);
    let h = site.host.id.clone();
    let pid = std::process::id() % 100_000;
    let result = support::runtime().block_on(async {
        let mut m = env().manager().await;
        m.watch_host(&h).await?;
        let id = format!("b-{pid}");
        let (mut create, mut delete) = (vec![], vec![]);
        for i in 0..RUNS {
            create.push(timed(&mut m, &h, "router.create", &format!("c{i}"), &spec(&id)).await?);
            delete.push(
                timed(
                    &mut m,
                    &h,
                    "router.delete",
                    &format!("d{i}"),
                    &json!({"id": id}),
                )
                .await?,
            );
            // `ip netns del` style teardown finishes in the kernel a little later.
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
        let ns = format!("lr-ip-{pid}");
        let hosts = [host_name("ip", "lif0"), host_name("ip", "lif1")];
        let hosts = [hosts[0].as_str(), hosts[1].as_str()];
        let (mut ip_c, mut ip_d, mut batch_c, mut batch_d) = (vec![], vec![], vec![], vec![]);
        for _ in 0..RUNS {
            ip_c.push(time_steps(&ip_steps(&ag, &ns, hosts)));
            ip_d.push(time_steps(&ip_delete(&ag, &ns, hosts)));
            tokio::time::sleep(Duration::from_millis(30)).await;
            batch_c.push(time_batch(&ip_steps(&ag, &ns, hosts)));
            batch_d.push(time_batch(&ip_delete(&ag, &ns, hosts)));
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
        println!("one router, two interfaces on bridges, one route (median of {RUNS}):");
        println!(
            "{:<12} {:>14} {:>14} {:>14}",
            "", "agent ms", "ip (process)", "ip -batch"
        );
        println!(
            "{:<12} {:>14.1} {:>14.1} {:>14.1}",
            "create",
            ms(median(create)),
            ms(median(ip_c)),
            ms(median(batch_c))
        );
        println!(
            "{:<12} {:>14.1} {:>14.1} {:>14.1}",
            "delete",
            ms(median(delete)),
            ms(median(ip_d)),
            ms(median(batch_d))
        );

        let ids: Vec<String> = (0..100).map(|i| format!("h{i}-{pid}")).collect();
        let t = Instant::now();
        for (i, id) in ids.iter().enumerate() {
            m.send(&h, "router.create", &format!("hc{i}"), &spec(id))
                .await?;
        }
        for i in 0..ids.len() {
            let ack = m
                .wait_ack(&format!("hc{i}"), Duration::from_secs(120))
                .await?;
            anyhow::ensure!(ack.status == rampart::protocol::Status::Applied, "{ack:?}");
        }
        let made = t.elapsed();
        let t = Instant::now();
        for (i, id) in ids.iter().enumerate() {
            m.send(&h, "router.delete", &format!("hd{i}"), &json!({"id": id}))
                .await?;
        }
        for i in 0..ids.len() {
            m.wait_ack(&format!("hd{i}"), Duration::from_secs(120))
                .await?;
        }
        let gone = t.elapsed();
        println!(
            "100 routers sent at once: created in {:.0} ms ({:.1} ms each), deleted in {:.0} ms",
            ms(made),
            ms(made) / 100.0,
            ms(gone)
        );
        m.close().await;
        anyhow::Ok(())
    });
    drop(agent);
    support::timing::finish(root, "bench-rt");
    result
}
