//! Every ack of one host, kept in a durable queue of the test's own: nothing is lost while
//! the test's manager reconnects, a broker restarts or a cluster node dies. The storm tests
//! read it at the end and check the contract's promises for each command id.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{Result, ensure};
use lapin::options::{BasicGetOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use rampart::config::Config;
use rampart::manager::Manager;

pub struct AckLog {
    queue: String,
    cfg: Config,
}

/// What a storm's commands got, one entry per command id: (status, duplicate) per ack.
pub type Outcomes = BTreeMap<String, Vec<(String, bool)>>;

/// The counts a storm prints.
#[derive(Debug, Default)]
pub struct Tally {
    pub sent: usize,
    pub applied: usize,
    pub stale: usize,
    /// Ids answered more than once (the extra answers are duplicates).
    pub duplicates: usize,
}

impl AckLog {
    /// Declares the queue (`quorum`: replicated over a cluster) and binds it to `host`'s
    /// acks before any command is sent.
    pub async fn declare(cfg: &Config, host: &str, quorum: bool) -> Result<AckLog> {
        let queue = format!("rampart.test-acks-{host}-{}", std::process::id());
        let m = Manager::connect(cfg).await?;
        let ch = m.channel().await?;
        let mut args = FieldTable::default();
        if quorum {
            args.insert(
                "x-queue-type".into(),
                AMQPValue::LongString("quorum".into()),
            );
        }
        let durable = QueueDeclareOptions {
            durable: true,
            ..Default::default()
        };
        ch.queue_declare(queue.as_str().into(), durable, args)
            .await?;
        ch.queue_bind(
            queue.as_str().into(),
            rampart::broker::ACKS_EXCHANGE.into(),
            host.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
        m.close().await;
        Ok(AckLog {
            queue,
            cfg: cfg.clone(),
        })
    }

    /// Reads acks until every id in `sent` has one, or `timeout`.
    pub async fn collect(&self, sent: &[String], timeout: Duration) -> Result<Outcomes> {
        let m = Manager::connect(&self.cfg).await?;
        let ch = m.channel().await?;
        let mut got = Outcomes::new();
        let deadline = Instant::now() + timeout;
        loop {
            let answered = sent.iter().all(|c| got.contains_key(c));
            if answered || Instant::now() > deadline {
                break;
            }
            match ch
                .basic_get(self.queue.as_str().into(), BasicGetOptions { no_ack: true })
                .await?
            {
                Some(msg) => {
                    let ack: rampart::protocol::Ack = serde_json::from_slice(&msg.delivery.data)?;
                    let cid = ack.correlation_id.clone().unwrap_or_default();
                    got.entry(cid)
                        .or_default()
                        .push((ack.status.as_str().into(), ack.duplicate));
                }
                None => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
        m.close().await;
        Ok(got)
    }
}

/// The contract's promises for a stream of commands that should all apply: every command
/// answered, one outcome per id (a duplicate repeats it), applied at most once, and no
/// `stale` (the stream is in order, so a stale answer would be a lost or repeated effect).
pub fn check(sent: &[String], outcomes: &Outcomes) -> Result<Tally> {
    let missing: Vec<&String> = sent.iter().filter(|c| !outcomes.contains_key(*c)).collect();
    ensure!(missing.is_empty(), "unanswered: {missing:?}");
    let mut t = Tally {
        sent: sent.len(),
        ..Default::default()
    };
    for cid in sent {
        let answers = &outcomes[cid];
        let first = &answers[0].0;
        ensure!(
            answers.iter().all(|(st, _)| st == first),
            "{cid}: more than one outcome: {answers:?}"
        );
        ensure!(
            answers.iter().filter(|(_, dup)| !dup).count() <= 1,
            "{cid}: applied twice: {answers:?}"
        );
        match first.as_str() {
            "applied" => t.applied += 1,
            "stale" => t.stale += 1,
            _ => {}
        }
        t.duplicates += usize::from(answers.len() > 1);
    }
    ensure!(t.stale == 0, "stale answers in an ordered stream: {t:?}");
    ensure!(t.applied == t.sent, "not every command applied: {t:?}");
    Ok(t)
}
