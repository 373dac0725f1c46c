//! Certificates (issue 4) against the real broker: `cert.install` rotates the agent's own
//! identity make-before-break; the broker's view of the connection proves which certificate
//! the agent presents.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use futures_util::StreamExt;
use libtest_mimic::Trial;
use nix::sys::signal::Signal;
use rampart::broker::EVENTS_EXCHANGE;
use rampart::protocol::{ErrorCode, Status};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use serde_json::{Value, json};

use crate::support::pki::{Ca, Issued, Role};
use crate::support::{
    AgentProc, Host, HostOptions, applied, env, manager, runtime, send, wait_until,
};
use crate::trial;

pub fn tests() -> Vec<Trial> {
    vec![
        trial(
            "certs::rotation_same_ca_moves_the_session_keeps_commands_flowing_and_survives_restart",
            rotation_same_ca,
        ),
        trial(
            "certs::rotation_onto_a_new_ca_during_a_transition",
            rotation_new_ca,
        ),
        trial(
            "certs::bad_bundles_are_rejected_and_change_nothing",
            bad_bundles,
        ),
        trial(
            "certs::broker_refusing_the_new_certificate_fails_and_the_old_session_serves_on",
            broker_refuses,
        ),
        trial(
            "certs::kill9_mid_rotation_restart_gives_one_whole_identity",
            kill9_mid_rotation,
        ),
        trial(
            "certs::expiry_is_reported_and_warned_about_once",
            expiry_warning,
        ),
        trial(
            "certs::request_then_install_keeps_the_private_key_on_the_host",
            request_then_install,
        ),
    ]
}

const WAIT: Duration = Duration::from_secs(20);

/// Upper-case hex SHA-256 of the first certificate of a PEM text (the broker's notation).
fn sha(pem: &str) -> String {
    let der = CertificateDer::from_pem_slice(pem.as_bytes()).unwrap();
    rampart::certs::tls::cert_info(&der)
        .unwrap()
        .sha256
        .to_uppercase()
}

fn install(issued: &Issued, ca_pem: Option<String>) -> Value {
    let mut data = json!({"purpose": "broker-client", "certificate_pem": issued.cert_pem,
        "private_key_pem": issued.key_pem});
    if let Some(ca) = ca_pem {
        data["ca_pem"] = json!(ca);
    }
    data
}

/// The certificates the broker holds for `host`'s connections.
fn broker_sees(host: &str) -> Vec<String> {
    env().broker.peer_cert_hashes(host)
}

/// Waits until the broker holds exactly one connection of `host`, with certificate `want`.
fn broker_holds_only(host: &str, want: &str) -> Result<()> {
    let ok = wait_until(WAIT, || broker_sees(host) == vec![want.to_string()]);
    ensure!(ok, "broker holds {:?}, want only {want}", broker_sees(host));
    Ok(())
}

fn cert_cli(host: &Host) -> Result<Value> {
    let out = Command::new(env!("CARGO_BIN_EXE_rampart"))
        .args([
            "--config",
            &host.config.display().to_string(),
            "cert",
            "--json",
        ])
        .output()?;
    ensure!(out.status.success(), "rampart cert: {out:?}");
    Ok(serde_json::from_slice(&out.stdout)?)
}

fn installed_dir(host: &Host) -> std::path::PathBuf {
    host.dir.join("state").join("identity")
}

fn start(host: &Host, envs: &[(&str, &str)]) -> AgentProc {
    let a = AgentProc::start_with_env(host, envs);
    a.wait_serving();
    a
}

fn rotation_same_ca() -> Result<()> {
    let host = env().host("cert-rot", HostOptions::default());
    let id = host.id.clone();
    let original = std::fs::read_to_string(host.dir.join("cert.pem"))?;
    let mut agent = start(&host, &[]);
    broker_holds_only(&id, &sha(&original))?;
    let first = env()
        .ca
        .issue_with(&id, &[&id], Role::Client, Some("rotation-1"), (-1, 90));
    let second = env()
        .ca
        .issue_with(&id, &[&id], Role::Client, Some("rotation-2"), (-1, 90));
    runtime().block_on(async {
        let mut m = manager(&id).await?;
        let ack = applied(&mut m, &id, "cert.install", "r1", install(&first, None)).await?;
        ensure!(
            ack.data["certificate"]["sha256"]
                .as_str()
                .map(str::to_uppercase)
                == Some(sha(&first.cert_pem)),
            "{ack:?}"
        );
        broker_holds_only(&id, &sha(&first.cert_pem))?;
        applied(&mut m, &id, "ping", "p1", json!({})).await?;
        let sync = applied(&mut m, &id, "state.sync", "s1", json!({})).await?;
        ensure!(
            sync.data["certificate"]["subject"]
                .as_str()
                .is_some_and(|s| s.contains("rotation-1")),
            "{:?}",
            sync.data["certificate"]
        );
        // Files: key 0600, configured files untouched, the CLI shows the installed identity.
        let dir = installed_dir(&host);
        let mode = std::fs::metadata(dir.join("key.pem"))?.permissions().mode() & 0o777;
        ensure!(mode == 0o600, "key mode {mode:o}");
        ensure!(std::fs::read_to_string(dir.join("cert.pem"))? == first.cert_pem);
        ensure!(
            std::fs::read_to_string(host.dir.join("cert.pem"))? == original,
            "configured files kept"
        );
        let cli = cert_cli(&host)?;
        ensure!(
            cli["source"] == "installed" && cli["files"]["key_mode"] == "0600",
            "{cli}"
        );
        ensure!(
            cli["sha256"].as_str().map(str::to_uppercase) == Some(sha(&first.cert_pem)),
            "{cli}"
        );
        ensure!(cli["installed"]["command_id"] == "r1", "{cli}");
        // The same bundle again changes nothing.
        let again = applied(&mut m, &id, "cert.install", "r1b", install(&first, None)).await?;
        ensure!(again.data["noop"] == true, "{again:?}");
        // A second rotation keeps the first as the previous identity.
        applied(&mut m, &id, "cert.install", "r2", install(&second, None)).await?;
        broker_holds_only(&id, &sha(&second.cert_pem))?;
        let prev = std::fs::read_to_string(host.dir.join("state/identity.prev/cert.pem"))?;
        ensure!(prev == first.cert_pem, "previous identity kept");
        Ok::<_, anyhow::Error>(())
    })?;
    // The broker lets go of the old connection a moment before the agent
    // logs the finished hand-over, so wait for the second line.
    ensure!(
        agent.wait_log("old session closed; serving on the new identity", 2, WAIT),
        "each rotation handed over to the new session"
    );
    ensure!(
        !agent.log_text().contains("broker session lost"),
        "no session was lost on the way"
    );
    agent.signal(Signal::SIGTERM);
    ensure!(agent.wait_exit(WAIT).is_some(), "agent stops");
    drop(agent);
    let _agent = start(&host, &[]);
    broker_holds_only(&id, &sha(&second.cert_pem))?;
    runtime().block_on(async {
        let mut m = manager(&id).await?;
        applied(&mut m, &id, "ping", "p2", json!({})).await?;
        Ok(())
    })
}

fn rotation_new_ca() -> Result<()> {
    let host = env().host("cert-newca", HostOptions::default());
    let id = host.id.clone();
    let _agent = start(&host, &[]);
    let moved = env()
        .ca2
        .issue_with(&id, &[&id], Role::Client, Some("new-ca"), (-1, 90));
    // The agent trusts both CAs from now on: the broker's own certificate is still the old CA's.
    let bundle = env().ca2.pem() + &env().ca.pem();
    runtime().block_on(async {
        let mut m = manager(&id).await?;
        let ack = applied(
            &mut m,
            &id,
            "cert.install",
            "n1",
            install(&moved, Some(bundle.clone())),
        )
        .await?;
        ensure!(
            ack.data["certificate"]["issuer"]
                .as_str()
                .is_some_and(|i| i.contains("rampart-test-ca-2")),
            "{ack:?}"
        );
        broker_holds_only(&id, &sha(&moved.cert_pem))?;
        // The old session was closed in order (CI 2026-12-02: it was left errored and open).
        let log = std::fs::read_to_string(host.dir.join("agent.log"))?;
        ensure!(
            !log.contains("connection.close failed"),
            "the old session was not closed in order:\n{log}"
        );
        ensure!(std::fs::read_to_string(installed_dir(&host).join("ca.pem"))? == bundle);
        applied(&mut m, &id, "ping", "n2", json!({})).await?;
        Ok(())
    })
}

fn bad_bundles() -> Result<()> {
    let host = env().host("cert-bad", HostOptions::default());
    let id = host.id.clone();
    let original = std::fs::read_to_string(host.dir.join("cert.pem"))?;
    let agent = start(&host, &[]);
    let good = env()
        .ca
        .issue_with(&id, &[&id], Role::Client, None, (-1, 90));
    let other = env()
        .ca
        .issue_with(&id, &[&id], Role::Client, None, (-1, 90));
    let expired = env()
        .ca
        .issue_with(&id, &[&id], Role::Client, None, (-30, -1));
    let future = env()
        .ca
        .issue_with(&id, &[&id], Role::Client, None, (3, 90));
    let elsewhere =
        env()
            .ca
            .issue_with("cert-other", &["cert-other"], Role::Client, None, (-1, 90));
    let stranger = Ca::new("stranger-ca").issue_with(&id, &[&id], Role::Client, None, (-1, 90));
    let mismatched = Issued {
        cert_pem: good.cert_pem.clone(),
        key_pem: other.key_pem.clone(),
    };
    let garbage = Issued {
        cert_pem: "-----BEGIN CERTIFICATE-----\nnot base64 at all }{\n-----END CERTIFICATE-----\n"
            .into(),
        key_pem: good.key_pem.clone(),
    };
    let cases: Vec<(&str, Value, ErrorCode, &str)> = vec![
        (
            "b1",
            install(&garbage, None),
            ErrorCode::BadPem,
            "$.data.certificate_pem",
        ),
        (
            "b2",
            install(&mismatched, None),
            ErrorCode::KeyMismatch,
            "$.data.private_key_pem",
        ),
        (
            "b3",
            install(&expired, None),
            ErrorCode::Expired,
            "$.data.certificate_pem",
        ),
        (
            "b4",
            install(&future, None),
            ErrorCode::NotYetValid,
            "$.data.certificate_pem",
        ),
        (
            "b5",
            install(&elsewhere, None),
            ErrorCode::WrongHost,
            "$.data.certificate_pem",
        ),
        (
            "b6",
            install(&stranger, None),
            ErrorCode::UntrustedChain,
            "$.data.certificate_pem",
        ),
        (
            "b7",
            install(&good, Some("junk".into())),
            ErrorCode::BadPem,
            "$.data.ca_pem",
        ),
        (
            "b8",
            json!({"purpose": "web", "certificate_pem": good.cert_pem, "private_key_pem": good.key_pem}),
            ErrorCode::InvalidField,
            "$.data.purpose",
        ),
    ];
    let key_lines: Vec<String> = [&good.key_pem, &other.key_pem]
        .iter()
        .map(|k| k.lines().nth(1).unwrap().to_string())
        .collect();
    runtime().block_on(async {
        let mut m = manager(&id).await?;
        for (cid, data, code, field) in cases {
            let ack = send(&mut m, &id, "cert.install", cid, data).await?;
            ensure!(ack.status == Status::Rejected, "{cid}: {ack:?}");
            let e = ack.error.clone().context("error")?;
            ensure!(
                e.code == code && e.field.as_deref() == Some(field),
                "{cid}: {e:?}"
            );
            let text = ack.to_json();
            let text = String::from_utf8_lossy(&text);
            ensure!(
                key_lines.iter().all(|k| !text.contains(k.as_str())),
                "{cid}: key material in the ack"
            );
        }
        applied(&mut m, &id, "ping", "b9", json!({})).await?;
        Ok::<_, anyhow::Error>(())
    })?;
    ensure!(!installed_dir(&host).exists(), "nothing installed");
    ensure!(std::fs::read_to_string(host.dir.join("cert.pem"))? == original);
    broker_holds_only(&id, &sha(&original))?;
    let log = agent.log_text();
    ensure!(log.contains("code=KeyMismatch"), "rejections are logged");
    ensure!(
        key_lines.iter().all(|k| !log.contains(k.as_str())),
        "key material in the log"
    );
    Ok(())
}

fn broker_refuses() -> Result<()> {
    let host = env().host("cert-refused", HostOptions::default());
    let id = host.id.clone();
    let original = std::fs::read_to_string(host.dir.join("cert.pem"))?;
    let _agent = start(&host, &[]);
    // Valid by the CA the command brings, unknown to the broker.
    let unknown = Ca::new("unknown-to-broker");
    let issued = unknown.issue_with(&id, &[&id], Role::Client, None, (-1, 90));
    let bundle = unknown.pem() + &env().ca.pem();
    runtime().block_on(async {
        let mut m = manager(&id).await?;
        let ack = send(
            &mut m,
            &id,
            "cert.install",
            "f1",
            install(&issued, Some(bundle)),
        )
        .await?;
        ensure!(ack.status == Status::Failed, "{ack:?}");
        let e = ack.error.clone().context("error")?;
        ensure!(e.code == ErrorCode::RotationFailed, "{e:?}");
        ensure!(e.message.contains("did not accept"), "{e:?}");
        applied(&mut m, &id, "ping", "f2", json!({})).await?;
        // The outcome is recorded: a redelivery gets the same answer without a new attempt.
        Ok(())
    })?;
    ensure!(!installed_dir(&host).exists(), "files unchanged");
    ensure!(std::fs::read_to_string(host.dir.join("cert.pem"))? == original);
    broker_holds_only(&id, &sha(&original))?;
    Ok(())
}

fn kill9_mid_rotation() -> Result<()> {
    let host = env().host("cert-crash", HostOptions::default());
    let id = host.id.clone();
    let original = std::fs::read_to_string(host.dir.join("cert.pem"))?;
    let mut agent = start(&host, &[("RAMPART_FAULT", "crash_mid_cert_rotation")]);
    let next = env()
        .ca
        .issue_with(&id, &[&id], Role::Client, Some("after-crash"), (-1, 90));
    runtime().block_on(async {
        let mut m = manager(&id).await?;
        m.send(&id, "cert.install", "k1", &install(&next, None))
            .await?;
        ensure!(
            agent.wait_exit(WAIT).is_some(),
            "the fault killed the agent"
        );
        // Staged but not switched: the old identity is still the one in use.
        ensure!(!installed_dir(&host).exists(), "not switched");
        let staged = std::fs::read_dir(host.dir.join("state/identities"))?.count();
        ensure!(staged == 1, "one staged identity");
        let cli = cert_cli(&host)?;
        ensure!(cli["source"] == "configured", "{cli}");
        let _agent = start(&host, &[]);
        let ack = m.wait_ack("k1", WAIT).await?;
        ensure!(ack.status == Status::Applied && !ack.duplicate, "{ack:?}");
        broker_holds_only(&id, &sha(&next.cert_pem))?;
        ensure!(std::fs::read_to_string(installed_dir(&host).join("cert.pem"))? == next.cert_pem);
        let dirs = std::fs::read_dir(host.dir.join("state/identities"))?.count();
        ensure!(dirs == 1, "the abandoned staging was pruned ({dirs} left)");
        ensure!(std::fs::read_to_string(host.dir.join("cert.pem"))? == original);
        ensure!(Path::new(&host.dir.join("state/identity/key.pem")).exists());
        applied(&mut m, &id, "ping", "k2", json!({})).await?;
        Ok(())
    })
}

fn expiry_warning() -> Result<()> {
    let host = env().host(
        "cert-expiring",
        HostOptions {
            heartbeat_secs: Some(1),
            ..Default::default()
        },
    );
    let id = host.id.clone();
    let soon = env()
        .ca
        .issue_with(&id, &[&id], Role::Client, None, (-1, 5));
    std::fs::write(host.dir.join("cert.pem"), &soon.cert_pem)?;
    std::fs::write(host.dir.join("key.pem"), &soon.key_pem)?;
    runtime().block_on(async {
        let m = env().manager().await;
        let mut events = m.subscribe(EVENTS_EXCHANGE, &format!("*.{id}")).await?;
        let _agent = start(&host, &[]);
        let (mut warnings, mut heartbeats) = (vec![], vec![]);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(4);
        while let Ok(Some(d)) = tokio::time::timeout_at(deadline, events.next()).await {
            let v: Value = serde_json::from_slice(&d?.data)?;
            match v["type"].as_str() {
                Some("cert") => warnings.push(v["data"].clone()),
                Some("heartbeat") => heartbeats.push(v["data"].clone()),
                _ => {}
            }
        }
        ensure!(
            warnings.len() == 1,
            "one warning, not one per heartbeat: {warnings:?}"
        );
        let days = warnings[0]["days_left"].as_i64().context("days_left")?;
        ensure!((3..=5).contains(&days), "{warnings:?}");
        ensure!(warnings[0]["warn_days"] == 14, "{warnings:?}");
        ensure!(heartbeats.len() >= 2, "heartbeats: {heartbeats:?}");
        ensure!(
            heartbeats[0]["certificate"]["sha256"]
                .as_str()
                .map(str::to_uppercase)
                == Some(sha(&soon.cert_pem)),
            "heartbeat carries the certificate: {:?}",
            heartbeats[0]
        );
        let cli = cert_cli(&host)?;
        // Seconds later, whole days left can only have dropped, by one at most.
        let cli_days = cli["days_left"].as_i64().context("days_left")?;
        ensure!(
            cli_days == days || cli_days == days - 1,
            "cli {cli_days} vs event {days}"
        );
        Ok(())
    })
}

/// Every message published on the shared exchanges while it lives.
async fn spy(m: &rampart::manager::Manager) -> Result<Vec<lapin::Consumer>> {
    let mut all = vec![];
    for exchange in [
        rampart::broker::COMMANDS_EXCHANGE,
        rampart::broker::ACKS_EXCHANGE,
        EVENTS_EXCHANGE,
        rampart::broker::DEAD_EXCHANGE,
    ] {
        all.push(m.subscribe(exchange, "#").await?);
    }
    Ok(all)
}

fn request_then_install() -> Result<()> {
    let host = env().host("cert-csr", HostOptions::default());
    let id = host.id.clone();
    let _agent = start(&host, &[]);
    let pending = host.dir.join("state").join("pending-key.pem");
    runtime().block_on(async {
        let mut m = manager(&id).await?;
        let watcher = env().manager().await;
        let mut streams = spy(&watcher).await?;

        // Nothing pending yet: an install without a key says so.
        let cert_only = |pem: &str| json!({"purpose": "broker-client", "certificate_pem": pem});
        let ack = send(
            &mut m,
            &id,
            "cert.install",
            "csr-0",
            cert_only(&env().ca.pem()),
        )
        .await?;
        ensure!(
            ack.status == Status::Rejected
                && ack.error.as_ref().map(|e| e.code) == Some(ErrorCode::NoPendingKey),
            "{ack:?}"
        );

        let ack = applied(
            &mut m,
            &id,
            "cert.request",
            "csr-1",
            json!({"purpose": "broker-client", "dns_names": [format!("{id}.example")]}),
        )
        .await?;
        let csr_pem = ack.data["csr_pem"].as_str().context("csr_pem")?.to_string();
        ensure!(csr_pem.contains("BEGIN CERTIFICATE REQUEST"), "{ack:?}");
        let mode = std::fs::metadata(&pending)?.permissions().mode() & 0o777;
        ensure!(mode == 0o600, "pending key mode {mode:o}");
        let key_pem = std::fs::read_to_string(&pending)?;
        // The key's base64 lines: none of them may appear in any message.
        let key_lines: Vec<String> = key_pem
            .lines()
            .filter(|l| !l.starts_with("-----") && l.len() > 16)
            .map(str::to_string)
            .collect();
        ensure!(!key_lines.is_empty());

        // The manager's CA signs it; the install carries no key.
        let cert_pem = env().ca.sign_csr(&csr_pem, 30);
        let ack = applied(&mut m, &id, "cert.install", "csr-2", cert_only(&cert_pem)).await?;
        ensure!(
            ack.data["certificate"]["subject"] == format!("CN={id}"),
            "{ack:?}"
        );
        broker_holds_only(&id, &sha(&cert_pem))?;
        applied(&mut m, &id, "ping", "csr-3", json!({})).await?;
        let dir = installed_dir(&host);
        ensure!(
            std::fs::read_to_string(dir.join("key.pem"))? == key_pem,
            "the pending key is installed"
        );
        ensure!(!pending.exists(), "a pending key is used once");
        // A redelivered request answers with the same CSR and makes no new key.
        let again = send(
            &mut m,
            &id,
            "cert.request",
            "csr-1",
            json!({"purpose": "broker-client",
            "dns_names": [format!("{id}.example")]}),
        )
        .await?;
        ensure!(
            again.duplicate && again.data["csr_pem"] == csr_pem.as_str(),
            "{again:?}"
        );
        ensure!(!pending.exists(), "no key made by a duplicate");

        // Everything that crossed the bus meanwhile: never the key.
        let mut seen = 0;
        for stream in streams.iter_mut() {
            while let Ok(Some(d)) =
                tokio::time::timeout(Duration::from_millis(300), stream.next()).await
            {
                let d = d?;
                let body = String::from_utf8_lossy(&d.data);
                ensure!(
                    !body.contains("PRIVATE KEY"),
                    "a message carries a private key: {body}"
                );
                for line in &key_lines {
                    ensure!(!body.contains(line.as_str()), "a message carries the key");
                }
                seen += 1;
            }
        }
        ensure!(seen >= 8, "the spy saw the traffic ({seen} messages)");
        watcher.close().await;
        m.close().await;
        Ok(())
    })
}
