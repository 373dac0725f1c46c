//! Operations (issue 6, in part): `rampart connection list` and `rampart status`.

use std::net::{TcpListener, TcpStream};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use libtest_mimic::Trial;
use nix::sys::signal::Signal;
use serde_json::{Value, json};

use crate::support::rampart;
use crate::support::{AgentProc, HostOptions, env};
use crate::trial;

pub fn tests() -> Vec<Trial> {
    vec![
        trial(
            "ops::connection_list_shows_rows_states_and_owners",
            connection_list,
        ),
        trial(
            "ops::broker_session_is_marked_and_status_reports_it",
            broker_session,
        ),
        trial(
            "ops::systemd_ready_before_broker_and_watchdog_keeps_coming",
            sd_notify,
        ),
        trial(
            "ops::sighup_reloads_senders_keys_limits_and_names_restart_only_settings",
            sighup,
        ),
        trial(
            "ops::inspection_finds_the_daemon_at_the_default_socket_without_a_config",
            default_socket,
        ),
        trial(
            "ops::broker_memory_alarm_blocks_publishes_but_the_watchdog_stays_fed",
            memory_alarm,
        ),
    ]
}

fn default_socket() -> Result<()> {
    let default = std::path::Path::new(rampart::config::DEFAULT_SOCKET);
    ensure!(
        !default.exists(),
        "{} exists: is a rampart daemon running on this machine?",
        default.display()
    );
    let host = env().host("ops-default-sock", HostOptions::default());
    let text = std::fs::read_to_string(&host.config)?;
    let socket_line = format!("socket = \"{}\"\n", host.dir.join("rampart.sock").display());
    ensure!(text.contains(&socket_line));
    std::fs::write(&host.config, text.replace(&socket_line, ""))?;
    let agent = AgentProc::start(&host);
    agent.wait_serving();
    // The CLI is run with --config /nonexistent: the default socket answers.
    let out = rampart(&["status"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.code() == Some(0) && stdout.contains("ops-default-sock"),
        "status found the daemon: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = rampart(&["connection", "list", "--json"]);
    let rows: Vec<Value> = serde_json::from_slice(&out.stdout)?;
    ensure!(
        rows.iter()
            .any(|r| r.get("rampart_broker_session").is_some()),
        "the broker session is marked through the default socket"
    );
    drop(agent);
    // Nobody answers: connection list still lists, and says why nothing is marked.
    let _ = std::fs::remove_file(default);
    let out = rampart(&["connection", "list"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(out.status.success(), "{stderr}");
    ensure!(
        stderr.contains("could not ask the daemon"),
        "stderr says the session is not marked: {stderr}"
    );
    Ok(())
}

fn rows(args: &[&str]) -> Result<Vec<Value>> {
    let mut all = vec![
        "connection",
        "list",
        "--json",
        "--socket",
        "/nonexistent.sock",
    ];
    all.extend_from_slice(args);
    let out = rampart(&all);
    ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(serde_json::from_slice::<Vec<Value>>(&out.stdout)?)
}

fn connection_list() -> Result<()> {
    let v4 = TcpListener::bind("127.0.0.1:0")?;
    let port4 = v4.local_addr()?.port();
    let client = TcpStream::connect(("127.0.0.1", port4))?;
    let (_server_side, _) = v4.accept()?;
    let v6 = TcpListener::bind("[::1]:0")?;
    let port6 = v6.local_addr()?.port();
    let me = std::process::id();
    let comm = std::fs::read_to_string("/proc/self/comm")?
        .trim_end()
        .to_string();

    let r = rows(&["--port", &port4.to_string()])?;
    let listen: Vec<&Value> = r.iter().filter(|c| c["state"] == "LISTEN").collect();
    ensure!(listen.len() == 1, "{r:?}");
    ensure!(listen[0]["local"] == format!("127.0.0.1:{port4}") && listen[0]["proto"] == "tcp");
    ensure!(
        listen[0]["pid"] == me && listen[0]["program"] == comm.as_str(),
        "{:?}",
        listen[0]
    );
    let est: Vec<&Value> = r.iter().filter(|c| c["state"] == "ESTABLISHED").collect();
    ensure!(est.len() == 2, "both ends of the connection: {r:?}");
    let client_port = client.local_addr()?.port();
    ensure!(
        est.iter()
            .any(|c| c["local"] == format!("127.0.0.1:{client_port}")
                && c["foreign"] == format!("127.0.0.1:{port4}"))
    );
    ensure!(
        r.iter().all(
            |c| c["local"].as_str().unwrap().ends_with(&format!(":{port4}"))
                || c["foreign"]
                    .as_str()
                    .unwrap()
                    .ends_with(&format!(":{port4}"))
        ),
        "--port filters"
    );

    let r = rows(&["--port", &port6.to_string(), "--state", "listen"])?;
    ensure!(
        r.len() == 1 && r[0]["proto"] == "tcp6" && r[0]["local"] == format!("[::1]:{port6}"),
        "{r:?}"
    );
    let r = rows(&["--port", &port4.to_string(), "--state", "EStablished"])?;
    ensure!(
        r.len() == 2 && r.iter().all(|c| c["state"] == "ESTABLISHED"),
        "--state is case-insensitive: {r:?}"
    );

    // Text: aligned columns with a header.
    let out = rampart(&[
        "connection",
        "list",
        "--socket",
        "/nonexistent.sock",
        "--port",
        &port4.to_string(),
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = text.lines().collect();
    ensure!(
        lines[0].starts_with("Proto")
            && lines[0].contains("Foreign Address")
            && lines[0].contains("PID/Program"),
        "{text}"
    );
    let col = lines[0].find("State").unwrap();
    ensure!(
        lines[1..]
            .iter()
            .all(|l| l[col..].starts_with("LISTEN") || l[col..].starts_with("ESTABLISHED")),
        "{text}"
    );
    ensure!(text.contains(&format!("{me}/{comm}")), "{text}");

    // Without root: the rows are all there, the owners it may not see are "-".
    let copy = env().root.join("rampart-nobody");
    std::fs::copy(env!("CARGO_BIN_EXE_rampart"), &copy)?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o755))?;
    let out = std::process::Command::new("runuser")
        .args(["-u", "nobody", "--"])
        .arg(&copy)
        .args([
            "--config",
            "/nonexistent",
            "connection",
            "list",
            "--json",
            "--socket",
            "/nonexistent.sock",
            "--port",
            &port4.to_string(),
        ])
        .output()?;
    ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: Vec<Value> = serde_json::from_slice(&out.stdout)?;
    ensure!(r.len() == 3, "all rows without root: {r:?}");
    ensure!(
        r.iter().all(|c| c["pid"].is_null()),
        "root's sockets are not attributed: {r:?}"
    );
    let out = std::process::Command::new("runuser")
        .args(["-u", "nobody", "--"])
        .arg(&copy)
        .args([
            "--config",
            "/nonexistent",
            "connection",
            "list",
            "--socket",
            "/nonexistent.sock",
            "--port",
            &port4.to_string(),
        ])
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    ensure!(
        text.lines()
            .skip(1)
            .all(|l| l.split_whitespace().nth(6) == Some("-")),
        "{text}"
    );
    drop(client);
    Ok(())
}

fn broker_session() -> Result<()> {
    let host = env().host(
        "ops-session",
        HostOptions {
            heartbeat_secs: Some(1),
            ..Default::default()
        },
    );
    let mut agent = AgentProc::start(&host);
    agent.wait_serving();
    let sock = host.dir.join("rampart.sock");
    let sock = sock.to_str().unwrap();
    std::thread::sleep(Duration::from_millis(1500)); // one heartbeat
    let port = env().broker.port.to_string();
    let out = rampart(&["connection", "list", "--socket", sock, "--port", &port]);
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find(|l| l.contains("rampart broker session"))
        .with_context(|| format!("no marked row:\n{text}"))?;
    ensure!(line.contains(&format!("{}/rampart", agent.pid())), "{line}");
    ensure!(
        line.contains("TLSv1_3") && line.contains("CN=localhost"),
        "{line}"
    );
    ensure!(line.contains(&format!("127.0.0.1:{port}")), "{line}");
    let j = rows(&["--port", &port])?;
    ensure!(
        j.iter().all(|r| r.get("rampart_broker_session").is_none()),
        "no daemon asked, no mark"
    );

    let out = rampart(&["status", "--json", "--socket", sock]);
    ensure!(
        out.status.code() == Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let s: Value = serde_json::from_slice(&out.stdout)?;
    ensure!(
        s["host"] == "ops-session" && s["session"]["state"] == "connected",
        "{s}"
    );
    ensure!(s["session"]["last_heartbeat_ms"].is_u64(), "{s}");
    ensure!(s["pid"] == agent.pid(), "{s}");
    // The answer's shape, as scripts read it (pinned 2026-12-02, before it became a
    // typed struct shared with the CLI's printer).
    let keys = |v: &Value| -> Vec<String> {
        let mut k: Vec<String> = v
            .as_object()
            .map(|o| o.keys().cloned().collect())
            .unwrap_or_default();
        k.sort();
        k
    };
    ensure!(
        keys(&s)
            == [
                "certificate",
                "commands",
                "dedup_records",
                "firewall",
                "host",
                "pending_restart",
                "pid",
                "routers",
                "session",
                "state_lost",
                "uptime_secs",
                "version"
            ],
        "{s}"
    );
    ensure!(
        keys(&s["session"])
            == [
                "blocked_since_ms",
                "broker_certificate",
                "broker_certificate_not_after",
                "broker_missing",
                "broker_port",
                "cipher",
                "connected_since_ms",
                "last_blocked",
                "last_error",
                "last_heartbeat_ms",
                "reconnects",
                "sessions",
                "state",
                "tls_version",
                "url"
            ],
        "{s}"
    );
    ensure!(
        keys(&s["firewall"]) == ["address_sets", "elements", "generation", "rules"],
        "{s}"
    );
    ensure!(
        keys(&s["certificate"]) == ["days_left", "not_after", "serial", "sha256", "subject"],
        "{s}"
    );
    ensure!(
        s["certificate"]["days_left"].is_i64() && s["certificate"]["subject"].is_string(),
        "{s}"
    );
    ensure!(
        s["routers"] == json!([]) && s["pending_restart"] == json!([]),
        "{s}"
    );
    ensure!(
        s["state_lost"].is_null() && s["dedup_records"].is_u64(),
        "{s}"
    );
    ensure!(
        s["commands"].is_object() && s["uptime_secs"].is_u64(),
        "{s}"
    );
    ensure!(
        s["firewall"]["generation"].is_u64() && s["session"]["sessions"] == 1,
        "{s}"
    );
    agent.signal(Signal::SIGTERM);
    agent
        .wait_exit(Duration::from_secs(10))
        .context("agent stops")?;
    let out = rampart(&["status", "--socket", sock]);
    ensure!(
        out.status.code() == Some(1),
        "status fails when the daemon is gone: {out:?}"
    );
    Ok(())
}

fn sd_notify() -> Result<()> {
    use std::os::unix::net::UnixDatagram;
    // The broker is unreachable: READY must not wait for it.
    let host = env().host(
        "ops-notify",
        HostOptions {
            urls: Some(vec!["amqps://127.0.0.1:1/%2f".into()]),
            ..Default::default()
        },
    );
    let path = host.dir.join("notify.sock");
    let sock = UnixDatagram::bind(&path)?;
    sock.set_read_timeout(Some(Duration::from_secs(10)))?;
    let p = path.to_str().unwrap().to_string();
    let agent =
        AgentProc::start_with_env(&host, &[("NOTIFY_SOCKET", &p), ("WATCHDOG_USEC", "300000")]);
    let mut got: Vec<String> = vec![];
    let mut buf = [0u8; 4096];
    while got.iter().filter(|m| m.contains("WATCHDOG=1")).count() < 3 {
        let n = sock
            .recv(&mut buf)
            .with_context(|| format!("notifications so far: {got:?}\n{}", agent.current_log()))?;
        got.push(String::from_utf8_lossy(&buf[..n]).into_owned());
    }
    let ready = got
        .iter()
        .position(|m| m.lines().any(|l| l == "READY=1"))
        .context("READY=1")?;
    let first_watchdog = got.iter().position(|m| m.contains("WATCHDOG=1")).unwrap();
    ensure!(ready < first_watchdog, "{got:?}");
    ensure!(
        got[ready].contains("STATUS="),
        "a status line says what it is doing: {got:?}"
    );
    ensure!(
        !agent.current_log().contains("serving commands"),
        "no broker was reached"
    );
    Ok(())
}

fn sighup() -> Result<()> {
    use rampart::protocol::{ErrorCode, Status};
    let host = env().host("ops-hup", HostOptions::default());
    let agent = AgentProc::start(&host);
    agent.wait_serving();
    crate::support::runtime().block_on(async {
        let mut m = env().manager().await;
        m.watch_host(&host.id).await?;
        m.send(&host.id, "ping", "hup-1", &serde_json::json!({}))
            .await?;
        m.wait_ack("hup-1", Duration::from_secs(20)).await?;
        ensure!(
            !agent.current_log().contains("outcome stored"),
            "no debug lines yet"
        );

        // 1: a new log level.
        let original = std::fs::read_to_string(&host.config)?;
        let reload = |text: String, nth: usize| -> Result<()> {
            std::fs::write(&host.config, text)?;
            agent.signal(Signal::SIGHUP);
            ensure!(
                agent.wait_log("configuration reloaded", nth, Duration::from_secs(10)),
                "{}",
                agent.current_log()
            );
            Ok(())
        };
        reload(format!("{original}\n[log]\nlevel = \"debug\"\n"), 1)?;
        m.send(&host.id, "ping", "hup-2", &serde_json::json!({}))
            .await?;
        let ack = m.wait_ack("hup-2", Duration::from_secs(20)).await?;
        ensure!(ack.status == Status::Applied);
        ensure!(
            agent.wait_log("outcome stored", 1, Duration::from_secs(5)),
            "debug lines after the reload:\n{}",
            agent.current_log()
        );

        // 2: other trusted senders, from the next command on.
        reload(
            original.replace("[broker]\n", "[broker]\ntrusted_senders = [\"nobody\"]\n"),
            2,
        )?;
        m.send(&host.id, "ping", "hup-3", &serde_json::json!({}))
            .await?;
        let ack = m.wait_ack("hup-3", Duration::from_secs(20)).await?;
        ensure!(
            ack.status == Status::Rejected
                && ack.error.map(|e| e.code) == Some(ErrorCode::UntrustedSender),
            "the new trusted senders apply"
        );

        // 3: signing keys and limits apply on reload too, from the next command on.
        let key = ed25519_dalek::SigningKey::from_bytes(&rand::random::<[u8; 32]>());
        let pubkey = host.dir.join("hup.pub.pem");
        use ed25519_dalek::pkcs8::EncodePublicKey;
        std::fs::write(
            &pubkey,
            key.verifying_key().to_public_key_pem(Default::default())?,
        )?;
        let signed = original.replace(
            "signing_keys = []",
            &format!("signing_keys = [\"{}\"]", pubkey.display()),
        );
        reload(signed.clone(), 3)?;
        m.send(&host.id, "ping", "hup-4", &serde_json::json!({}))
            .await?;
        let ack = m.wait_ack("hup-4", Duration::from_secs(20)).await?;
        ensure!(
            ack.error.as_ref().map(|e| e.code) == Some(ErrorCode::MissingSignature),
            "unsigned commands are refused once keys are configured: {ack:?}"
        );
        reload(format!("{original}max_rules = 1\n"), 4)?;
        let two = serde_json::json!({"generation": 1, "rules": [
            {"id": "a", "priority": 1, "action": "allow", "direction": "in"},
            {"id": "b", "priority": 2, "action": "allow", "direction": "in"}]});
        m.send(&host.id, "firewall.apply", "hup-5", &two).await?;
        let ack = m.wait_ack("hup-5", Duration::from_secs(20)).await?;
        ensure!(
            ack.error.as_ref().map(|e| e.code) == Some(ErrorCode::TooMany),
            "the lowered limit applies: {ack:?}"
        );

        // 4: what cannot change while running is named, in the log and in status.
        reload(format!("{original}table = \"other\"\n"), 5)?;
        ensure!(
            agent.wait_log("take effect at the next restart", 1, Duration::from_secs(5)),
            "{}",
            agent.current_log()
        );
        let socket = host.dir.join("rampart.sock");
        let out = rampart(&["status", "--socket", socket.to_str().unwrap()]);
        let text = String::from_utf8_lossy(&out.stdout);
        ensure!(
            text.contains("restart to apply: firewall.table"),
            "status names the setting:\n{text}"
        );
        ensure!(
            text.contains(" applied") && !text.contains('{'),
            "counters in words:\n{text}"
        );
        m.close().await;
        Ok(())
    })?;
    let log = agent.current_log();
    ensure!(
        log.matches("connected to broker").count() == 1,
        "no reconnect for these settings:\n{log}"
    );
    Ok(())
}

fn memory_alarm() -> Result<()> {
    use std::os::unix::net::UnixDatagram;
    // A broker of its own: an alarm on the shared one would block every other test.
    let e = env();
    let b = crate::support::broker::Broker::start(&e.root.join("broker-alarm"), &e.ca, "alarm");
    b.add_host_user("ops-alarm");
    let host = e.host_on(
        &b,
        "ops-alarm",
        HostOptions {
            heartbeat_secs: Some(1),
            ..Default::default()
        },
    );
    let manager_cfg = e.root.join("manager-alarm.toml");
    let text = std::fs::read_to_string(&e.manager_config)?.replace(&e.broker.url(), &b.url());
    std::fs::write(&manager_cfg, text)?;
    crate::support::declare_topology(&manager_cfg);
    let path = host.dir.join("notify.sock");
    let sock = UnixDatagram::bind(&path)?;
    sock.set_read_timeout(Some(Duration::from_millis(200)))?;
    let p = path.to_str().unwrap().to_string();
    // A 2 s watchdog: systemd would kill an agent that misses it.
    let agent = AgentProc::start_with_env(
        &host,
        &[("NOTIFY_SOCKET", &p), ("WATCHDOG_USEC", "2000000")],
    );
    agent.wait_serving();
    let result = (|| {
        let mut buf = [0u8; 4096];
        let mut feeds_during = |secs: u64| -> usize {
            let end = std::time::Instant::now() + Duration::from_secs(secs);
            let mut n = 0;
            while std::time::Instant::now() < end {
                if let Ok(len) = sock.recv(&mut buf) {
                    n += usize::from(String::from_utf8_lossy(&buf[..len]).contains("WATCHDOG=1"));
                }
            }
            n
        };
        feeds_during(1);
        b.ctl_ok(&["set_vm_memory_high_watermark", "0.00001"]);
        // Heartbeats every second now wait for confirms that do not come. Held past the
        // 30 s confirm bound, which must not count time the broker said it blocks us; the
        // long chaos mode holds it for a minute (RAMPART_CHAOS_ALARM_SECS=60).
        let secs: u64 = std::env::var("RAMPART_CHAOS_ALARM_SECS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(rampart::broker::CONFIRM_TIMEOUT.as_secs() + 8);
        let fed = feeds_during(secs);
        ensure!(
            fed as u64 >= secs.saturating_sub(2),
            "the watchdog was fed {fed} times in {secs} s while the broker blocked us:\n{}",
            agent.current_log()
        );
        // A new session would be blocked too, and a fleet reconnecting every 30 s costs a
        // broker short of memory more: the blocked session is kept.
        ensure!(
            agent.current_log().matches("connected to broker").count() == 1,
            "the session was remade during the alarm:\n{}",
            agent.current_log()
        );
        let socket = host.dir.join("rampart.sock");
        let out = rampart(&["status", "--json", "--socket", socket.to_str().unwrap()]);
        let v: Value = serde_json::from_slice(&out.stdout)?;
        ensure!(
            v["session"]["blocked_since_ms"].is_u64(),
            "status reports the blocked broker: {v}\n{}",
            agent.current_log()
        );
        let out = rampart(&["status", "--socket", socket.to_str().unwrap()]);
        let text = String::from_utf8_lossy(&out.stdout);
        ensure!(text.contains("BLOCKED"), "{text}");

        b.ctl_ok(&["set_vm_memory_high_watermark", "0.4"]);
        let cfg = rampart::config::Config::load(&manager_cfg)?;
        crate::support::runtime().block_on(async {
            let mut m = rampart::manager::Manager::connect(&cfg).await?;
            m.watch_host(&host.id).await?;
            m.send(&host.id, "ping", "after-alarm", &serde_json::json!({}))
                .await?;
            let ack = m.wait_ack("after-alarm", Duration::from_secs(40)).await?;
            ensure!(ack.status == rampart::protocol::Status::Applied, "{ack:?}");
            m.close().await;
            Ok::<_, anyhow::Error>(())
        })?;
        let out = rampart(&["status", "--json", "--socket", socket.to_str().unwrap()]);
        let v: Value = serde_json::from_slice(&out.stdout)?;
        ensure!(v["session"]["blocked_since_ms"].is_null(), "{v}");
        ensure!(v["session"]["last_blocked"].is_array(), "{v}");
        Ok(())
    })();
    drop(agent);
    b.shutdown();
    result
}
