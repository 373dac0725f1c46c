//! The backbone (issue 2): session, pipeline, at-most-once, acks, events, reconnects.

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use futures_util::StreamExt;
use libtest_mimic::Trial;
use nix::sys::signal::Signal;
use rampart::broker::{self, DEAD_EXCHANGE, EVENTS_EXCHANGE};
use rampart::manager::{Manager, Outgoing, command_body};
use rampart::protocol::{Ack, ErrorCode, Status};
use serde_json::{Value, json};

use crate::support::{ACK_WAIT, AgentProc, HostOptions, env, runtime};
use crate::trial;

pub fn tests() -> Vec<Trial> {
    vec![
        trial(
            "backbone::ping_and_state_sync_round_trip",
            ping_and_state_sync_round_trip,
        ),
        trial(
            "backbone::command_sent_while_agent_down_is_applied_at_start",
            sent_while_down,
        ),
        trial(
            "backbone::kill9_after_persist_gives_one_effect_and_a_duplicate_ack",
            kill9_after_persist,
        ),
        trial(
            "backbone::bad_input_is_rejected_dead_lettered_and_agent_serves_on",
            bad_input,
        ),
        trial(
            "backbone::signed_commands_are_enforced_when_keys_are_configured",
            signatures,
        ),
        trial("backbone::state_event_after_connect_and_heartbeats", events),
        trial(
            "backbone::least_privilege_blocks_other_hosts_queue_and_acks",
            least_privilege,
        ),
        trial("backbone::sigterm_stops_cleanly_with_exit_0", sigterm),
        trial(
            "backbone::wrong_ca_gives_no_session_and_retries_with_backoff",
            wrong_ca,
        ),
        trial(
            "backbone::wrong_server_name_gives_no_session",
            wrong_server_name,
        ),
        trial(
            "backbone::broker_restart_under_the_agent_reconnects",
            broker_restart,
        ),
    ]
}

async fn ack_for(m: &mut Manager, host: &str, kind: &str, id: &str) -> Result<Ack> {
    crate::support::send(m, host, kind, id, json!({})).await
}

fn ping_and_state_sync_round_trip() -> Result<()> {
    let host = env().host("bb-ping", HostOptions::default());
    let agent = AgentProc::start(&host);
    agent.wait_serving();
    runtime().block_on(async {
        let mut m = env().manager().await;
        m.watch_host(&host.id).await?;
        let ack = ack_for(&mut m, &host.id, "ping", "ping-1").await?;
        ensure!(ack.status == Status::Applied, "{ack:?}");
        ensure!(!ack.duplicate);
        ensure!(ack.host == host.id && ack.source == host.id && ack.kind == "ack");
        ensure!(ack.correlation_id.as_deref() == Some("ping-1"));
        ensure!(ack.command_type.as_deref() == Some("ping"));
        ensure!(ack.data["duration_us"].is_u64(), "{}", ack.data);

        let ack = ack_for(&mut m, &host.id, "state.sync", "sync-1").await?;
        ensure!(ack.status == Status::Applied, "{ack:?}");
        let d = &ack.data;
        ensure!(d["host"] == host.id.as_str(), "{d}");
        ensure!(d["version"] == env!("CARGO_PKG_VERSION"));
        ensure!(d["firewall"]["generation"] == 0);
        ensure!(
            d["firewall"]["digest"]
                .as_str()
                .is_some_and(|s| s.len() == 64)
        );
        ensure!(d["routers"] == json!([]));
        ensure!(
            d["certificate"]["subject"] == format!("CN={}", host.id),
            "{d}"
        );
        ensure!(
            d["certificate"]["sha256"]
                .as_str()
                .is_some_and(|s| s.len() == 64)
        );
        // The ping before it was recorded; the state.sync itself is recorded after.
        ensure!(d["commands"]["processed"] == 1, "{d}");
        m.close().await;
        Ok(())
    })
}

fn sent_while_down() -> Result<()> {
    let host = env().host("bb-down", HostOptions::default());
    runtime().block_on(async {
        let mut m = env().manager().await;
        m.watch_host(&host.id).await?;
        m.send(&host.id, "ping", "while-down", &json!({})).await?;
        // Nobody is there to answer yet.
        ensure!(
            m.wait_ack("while-down", Duration::from_secs(1))
                .await
                .is_err()
        );
        let agent = AgentProc::start(&host);
        let ack = m.wait_ack("while-down", ACK_WAIT).await?;
        ensure!(ack.status == Status::Applied && !ack.duplicate, "{ack:?}");
        drop(agent);
        m.close().await;
        Ok(())
    })
}

fn kill9_after_persist() -> Result<()> {
    let host = env().host("bb-crash", HostOptions::default());
    runtime().block_on(async {
        let mut m = env().manager().await;
        m.watch_host(&host.id).await?;
        let mut agent =
            AgentProc::start_with_env(&host, &[("RAMPART_FAULT", "crash_after_persist")]);
        agent.wait_serving();
        m.send(&host.id, "ping", "crash-1", &json!({})).await?;
        let status = agent
            .wait_exit(Duration::from_secs(20))
            .context("the agent did not crash at the fault point")?;
        use std::os::unix::process::ExitStatusExt;
        ensure!(status.signal() == Some(9), "{status:?}");
        ensure!(
            m.wait_ack("crash-1", Duration::from_millis(500))
                .await
                .is_err(),
            "an ack went out before the crash"
        );

        let agent = AgentProc::start(&host);
        let ack = m.wait_ack("crash-1", ACK_WAIT).await?;
        ensure!(ack.status == Status::Applied, "{ack:?}");
        ensure!(
            ack.duplicate,
            "the redelivery must be answered as a duplicate: {ack:?}"
        );
        let sync = ack_for(&mut m, &host.id, "state.sync", "crash-sync").await?;
        ensure!(
            sync.data["commands"]["processed"] == 1,
            "exactly one effect expected: {}",
            sync.data
        );
        // The same id again: still the stored original, still one effect.
        let again = ack_for(&mut m, &host.id, "ping", "crash-1").await?;
        ensure!(
            again.duplicate && again.id == ack.id,
            "{again:?} vs {ack:?}"
        );
        drop(agent);
        m.close().await;
        Ok(())
    })
}

async fn expect_rejection(
    m: &mut Manager,
    id: &str,
    code: ErrorCode,
    field: Option<&str>,
) -> Result<Ack> {
    let ack = m
        .wait_ack(id, ACK_WAIT)
        .await
        .with_context(|| format!("ack for {id}"))?;
    ensure!(ack.status == Status::Rejected, "{id}: {ack:?}");
    let err = ack.error.clone().context("a rejection carries an error")?;
    ensure!(err.code == code, "{id}: expected {code:?}, got {err:?}");
    ensure!(err.field.as_deref() == field, "{id}: field {:?}", err.field);
    ensure!(!err.message.is_empty());
    Ok(ack)
}

fn bad_input() -> Result<()> {
    let host = env().host("bb-bad", HostOptions::default());
    let agent = AgentProc::start(&host);
    agent.wait_serving();
    let h = host.id.as_str();
    runtime().block_on(async {
        let mut m = env().manager().await;
        m.watch_host(h).await?;
        let mut dead = m.subscribe(DEAD_EXCHANGE, "").await?;
        let raw = |id: Option<&str>, body: Vec<u8>| Outgoing {
            body,
            message_id: id.map(str::to_string),
            kind: Some("ping".into()),
            with_user_id: true,
            signature: None,
        };
        let good = |id: &str| command_body(id, "ping", "manager", h, &json!({}));

        // Wrong host.
        m.publish(
            h,
            raw(
                Some("bad-host"),
                command_body("bad-host", "ping", "manager", "elsewhere", &json!({})),
            ),
        )
        .await?;
        expect_rejection(&mut m, "bad-host", ErrorCode::WrongHost, Some("$.host")).await?;
        // No user_id: the broker cannot vouch for the sender.
        m.publish(
            h,
            Outgoing {
                with_user_id: false,
                ..raw(Some("no-user"), good("no-user"))
            },
        )
        .await?;
        expect_rejection(&mut m, "no-user", ErrorCode::UntrustedSender, None).await?;
        // A real broker user that is not a trusted sender.
        let intruder = env().intruder().await;
        intruder
            .publish(h, raw(Some("intruder-1"), good("intruder-1")))
            .await?;
        expect_rejection(&mut m, "intruder-1", ErrorCode::UntrustedSender, None).await?;
        intruder.close().await;
        // Not JSON, correlated by message_id.
        m.publish(h, raw(Some("not-json"), b"{\"id\": ".to_vec()))
            .await?;
        expect_rejection(&mut m, "not-json", ErrorCode::InvalidJson, None).await?;
        // Not JSON and no message_id: still an ack, with no correlation.
        m.publish(h, raw(None, b"garbage".to_vec())).await?;
        let ack = expect_rejection(&mut m, "", ErrorCode::InvalidJson, None).await?;
        ensure!(ack.correlation_id.is_none());
        // Invalid UTF-8.
        m.publish(h, raw(Some("bad-utf8"), vec![b'{', 0xc3, 0x28, b'}']))
            .await?;
        expect_rejection(&mut m, "bad-utf8", ErrorCode::InvalidUtf8, None).await?;
        // Unknown field, correlated by the body's id even without message_id.
        let mut v: Value = serde_json::from_slice(&good("unknown-field"))?;
        v["extra"] = json!(1);
        m.publish(h, raw(None, serde_json::to_vec(&v)?)).await?;
        expect_rejection(
            &mut m,
            "unknown-field",
            ErrorCode::UnknownField,
            Some("$.extra"),
        )
        .await?;
        // A type this build does not know.
        m.publish(
            h,
            Outgoing {
                kind: Some("teleport".into()),
                ..raw(
                    Some("bad-type"),
                    command_body("bad-type", "teleport", "manager", h, &json!({})),
                )
            },
        )
        .await?;
        expect_rejection(&mut m, "bad-type", ErrorCode::UnknownType, Some("$.type")).await?;
        // Over the default 16 MiB limit.
        let mut big = good("too-big");
        big.resize(16 * 1024 * 1024 + 1, b' ');
        m.publish(h, raw(Some("too-big"), big)).await?;
        expect_rejection(&mut m, "too-big", ErrorCode::TooLarge, None).await?;

        // Every rejected delivery went to the dead-letter exchange.
        let mut want: std::collections::BTreeSet<&str> = [
            "bad-host",
            "no-user",
            "intruder-1",
            "not-json",
            "bad-utf8",
            "bad-type",
            "too-big",
        ]
        .into();
        let deadline = tokio::time::Instant::now() + ACK_WAIT;
        while !want.is_empty() {
            let d = tokio::time::timeout_at(deadline, dead.next())
                .await
                .with_context(|| format!("not dead-lettered: {want:?}"))?
                .context("dead-letter stream ended")??;
            if let Some(id) = d.properties.message_id() {
                want.remove(id.as_str());
            }
        }
        // And the agent still serves.
        let ack = ack_for(&mut m, h, "ping", "after-bad").await?;
        ensure!(ack.status == Status::Applied, "{ack:?}");
        let sync = ack_for(&mut m, h, "state.sync", "after-bad-sync").await?;
        ensure!(
            sync.data["commands"]["processed"] == 1,
            "rejections change nothing: {}",
            sync.data
        );
        m.close().await;
        Ok(())
    })
}

fn signatures() -> Result<()> {
    use base64::Engine;
    use ed25519_dalek::Signer;
    use ed25519_dalek::pkcs8::EncodePublicKey;
    let key = ed25519_dalek::SigningKey::from_bytes(&rand::random::<[u8; 32]>());
    let dir = env().root.join("signing");
    std::fs::create_dir_all(&dir)?;
    let pubkey = dir.join("manager.pub.pem");
    std::fs::write(
        &pubkey,
        key.verifying_key().to_public_key_pem(Default::default())?,
    )?;
    let host = env().host(
        "bb-signed",
        HostOptions {
            signing_keys: vec![pubkey],
            ..Default::default()
        },
    );
    let agent = AgentProc::start(&host);
    agent.wait_serving();
    let h = host.id.as_str();
    runtime().block_on(async {
        let mut m = env().manager().await;
        m.watch_host(h).await?;
        let out = |id: &str, sig: Option<String>| {
            let body = command_body(id, "ping", "manager", h, &json!({}));
            Outgoing {
                body,
                message_id: Some(id.into()),
                kind: Some("ping".into()),
                with_user_id: true,
                signature: sig,
            }
        };
        m.publish(h, out("unsigned", None)).await?;
        expect_rejection(&mut m, "unsigned", ErrorCode::MissingSignature, None).await?;
        let mut forged = out("forged", None);
        let other = ed25519_dalek::SigningKey::from_bytes(&[9u8; 32]);
        forged.signature = Some(
            base64::engine::general_purpose::STANDARD.encode(other.sign(&forged.body).to_bytes()),
        );
        m.publish(h, forged).await?;
        expect_rejection(&mut m, "forged", ErrorCode::BadSignature, None).await?;
        let mut signed = out("signed", None);
        signed.signature = Some(
            base64::engine::general_purpose::STANDARD.encode(key.sign(&signed.body).to_bytes()),
        );
        m.publish(h, signed).await?;
        let ack = m.wait_ack("signed", ACK_WAIT).await?;
        ensure!(ack.status == Status::Applied, "{ack:?}");
        m.close().await;
        Ok(())
    })?;
    drop(agent);
    Ok(())
}

fn events() -> Result<()> {
    let host = env().host(
        "bb-events",
        HostOptions {
            heartbeat_secs: Some(1),
            ..Default::default()
        },
    );
    runtime().block_on(async {
        let m = env().manager().await;
        let mut events = m
            .subscribe(EVENTS_EXCHANGE, &format!("*.{}", host.id))
            .await?;
        let agent = AgentProc::start(&host);
        let mut kinds = vec![];
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while kinds
            .iter()
            .filter(|k: &&String| k.as_str() == "heartbeat")
            .count()
            < 2
        {
            let d = tokio::time::timeout_at(deadline, events.next())
                .await
                .with_context(|| format!("events so far: {kinds:?}"))?
                .context("event stream ended")??;
            let v: Value = serde_json::from_slice(&d.data)?;
            let kind = v["type"].as_str().unwrap_or_default().to_string();
            ensure!(d.routing_key.as_str() == format!("{kind}.{}", host.id));
            ensure!(v["host"] == host.id.as_str());
            if kind == "heartbeat" {
                ensure!(v["data"]["uptime_secs"].is_u64(), "{v}");
                ensure!(
                    v["data"]["broker"]
                        .as_str()
                        .is_some_and(|b| b.starts_with("amqps://")),
                    "{v}"
                );
                ensure!(v["data"]["firewall"]["generation"] == 0, "{v}");
            } else {
                ensure!(kind == "state", "{v}");
                ensure!(
                    v["data"]["certificate"]["subject"] == format!("CN={}", host.id),
                    "{v}"
                );
            }
            kinds.push(kind);
        }
        ensure!(
            kinds[0] == "state",
            "the state event comes first after connect: {kinds:?}"
        );
        drop(agent);
        m.close().await;
        Ok(())
    })
}

fn least_privilege() -> Result<()> {
    use lapin::options::{BasicConsumeOptions, BasicPublishOptions};
    use lapin::types::FieldTable;
    let victim = env().host("bb-victim", HostOptions::default());
    let rogue = env().host("bb-rogue", HostOptions::default());
    runtime().block_on(async {
        let mut m = env().manager().await;
        m.watch_host(&victim.id).await?;
        m.watch_host(&rogue.id).await?;
        let cfg = rampart::config::Config::load(&rogue.config)?;
        let b = &cfg.broker;
        let (_, tls) = rampart::certs::tls::from_config(b)?;
        let connector = broker::Connector::new(b, tls, "rogue".into())?;
        let session = connector.connect(&connector.urls[0]).await?;
        let conn = &session.connection;

        // Reading another host's queue is refused.
        let ch = conn.create_channel().await?;
        let r = ch
            .basic_consume(
                broker::host_queue(&victim.id).as_str().into(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await;
        ensure!(r.is_err(), "a host consumed another host's queue");
        ensure!(format!("{:?}", r.err()).contains("ACCESS_REFUSED"));

        // Copying another host's commands is refused: binding a queue of its own (it may
        // configure only its own queue) to rampart.commands with the victim's key fails the
        // topic read check.
        let ch = conn.create_channel().await?;
        broker::declare_host_queue(&ch, &rogue.id, b).await?;
        let own = broker::host_queue(&rogue.id);
        let r = ch
            .queue_bind(
                own.as_str().into(),
                broker::COMMANDS_EXCHANGE.into(),
                victim.id.as_str().into(),
                lapin::options::QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await;
        ensure!(
            r.is_err(),
            "a host bound its queue to another host's commands"
        );
        ensure!(format!("{:?}", r.err()).contains("ACCESS_REFUSED"));
        // Wildcards are no way around it.
        for key in ["#", "*", "bb-#"] {
            let ch = conn.create_channel().await?;
            let r = ch
                .queue_bind(
                    own.as_str().into(),
                    broker::COMMANDS_EXCHANGE.into(),
                    key.into(),
                    lapin::options::QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await;
            ensure!(r.is_err(), "a host bound its queue with the key {key}");
        }

        // Forging an ack under another host's routing key is refused (topic permission).
        let ch = broker::confirm_channel(conn).await?;
        let forged = broker::publish_confirmed(
            &ch,
            broker::ACKS_EXCHANGE,
            &victim.id,
            b"{}",
            broker::json_properties(),
            false,
        )
        .await;
        ensure!(forged.is_err(), "a host published an ack as another host");
        ensure!(
            m.wait_ack("", Duration::from_millis(500)).await.is_err(),
            "the forged ack reached the manager"
        );

        // Publishing commands is refused too.
        let ch = conn.create_channel().await?;
        let r = async {
            ch.basic_publish(
                broker::COMMANDS_EXCHANGE.into(),
                victim.id.as_str().into(),
                BasicPublishOptions::default(),
                b"{}",
                broker::json_properties(),
            )
            .await?
            .await
        }
        .await;
        let closed = r.is_err() || !ch.status().connected();
        ensure!(
            closed || {
                tokio::time::sleep(Duration::from_millis(300)).await;
                !ch.status().connected()
            },
            "a host published a command"
        );

        // Its own ack key works.
        let ch = broker::confirm_channel(conn).await?;
        broker::publish_confirmed(
            &ch,
            broker::ACKS_EXCHANGE,
            &rogue.id,
            b"{}",
            broker::json_properties(),
            false,
        )
        .await?;
        let _ = conn.close(200, "OK".into()).await;

        // With these permissions the host's own agent serves as before.
        m.close().await;
        // (A fresh manager: the old one's ack queue holds the "{}" the host published above.)
        let mut m = crate::support::manager(&rogue.id).await?;
        let agent = AgentProc::start(&rogue);
        agent.wait_serving();
        let ack = ack_for(&mut m, &rogue.id, "ping", "lp-ping").await?;
        ensure!(ack.status == Status::Applied, "{ack:?}");
        m.close().await;
        Ok(())
    })
}

fn sigterm() -> Result<()> {
    let host = env().host("bb-term", HostOptions::default());
    let mut agent = AgentProc::start(&host);
    agent.wait_serving();
    agent.signal(Signal::SIGTERM);
    let status = agent
        .wait_exit(Duration::from_secs(10))
        .context("agent did not stop on SIGTERM")?;
    ensure!(
        status.code() == Some(0),
        "{status:?}\n{}",
        agent.current_log()
    );
    ensure!(agent.current_log().contains("agent stopped"));
    // An orderly stop closes the session in order: its channels first, then the connection
    // (lapin closing dropped channels behind our back left it errored instead).
    ensure!(
        !agent.current_log().contains("connection.close failed"),
        "the session was not closed in order:\n{}",
        agent.current_log()
    );
    Ok(())
}

fn wrong_ca() -> Result<()> {
    let other = crate::support::pki::Ca::new("some-other-ca");
    let path = env().root.join("other-ca.pem");
    std::fs::write(&path, other.pem())?;
    let host = env().host(
        "bb-wrongca",
        HostOptions {
            ca_file: Some(path),
            ..Default::default()
        },
    );
    let log = no_session_log(&host, 4)?;
    ensure!(
        log.to_lowercase().contains("certificate"),
        "the log names the certificate problem: {log}"
    );
    Ok(())
}

/// Starts an agent that must not get a session: waits for `retries` retries and returns the
/// log, having checked that no session came up and each attempt was logged.
fn no_session_log(host: &crate::support::Host, retries: usize) -> Result<String> {
    let agent = AgentProc::start(host);
    ensure!(
        agent.wait_log("retrying the broker", retries, Duration::from_secs(20)),
        "{}",
        agent.current_log()
    );
    let log = agent.current_log();
    ensure!(!log.contains("connected to broker"), "{log}");
    ensure!(log.contains("cannot connect to broker"), "{log}");
    Ok(log)
}

fn wrong_server_name() -> Result<()> {
    let host = env().host(
        "bb-wrongname",
        HostOptions {
            server_name: Some("not-the-broker.example".into()),
            ..Default::default()
        },
    );
    let log = no_session_log(&host, 2)?;
    ensure!(
        log.contains("NotValidForName") || log.contains("not valid for name"),
        "{log}"
    );
    Ok(())
}

fn broker_restart() -> Result<()> {
    // A broker of its own: restarting the shared one would disturb the other tests.
    let e = env();
    let b = crate::support::broker::Broker::start(&e.root.join("broker-restart"), &e.ca, "restart");
    b.add_host_user("bb-restart");
    let host = e.host_on(&b, "bb-restart", HostOptions::default());
    let manager_cfg = e.root.join("manager-restart.toml");
    let text = std::fs::read_to_string(&e.manager_config)?.replace(&e.broker.url(), &b.url());
    std::fs::write(&manager_cfg, text)?;
    let cfg = rampart::config::Config::load(&manager_cfg)?;
    crate::support::declare_topology(&manager_cfg);
    let agent = AgentProc::start(&host);
    agent.wait_serving();
    let result = runtime().block_on(async {
        let mut m = Manager::connect(&cfg).await?;
        m.watch_host(&host.id).await?;
        let ack = ack_for(&mut m, &host.id, "ping", "before-restart").await?;
        ensure!(ack.status == Status::Applied);
        drop(m);
        b.restart();
        ensure!(
            agent.wait_log("serving commands", 2, Duration::from_secs(60)),
            "no reconnect:\n{}",
            agent.current_log()
        );
        ensure!(agent.current_log().contains("broker session lost"));
        let mut m = Manager::connect(&cfg).await?;
        m.watch_host(&host.id).await?;
        let ack = ack_for(&mut m, &host.id, "ping", "after-restart").await?;
        ensure!(ack.status == Status::Applied, "{ack:?}");
        m.close().await;
        Ok(())
    });
    drop(agent);
    b.shutdown();
    result
}
