//! The commands that change nothing: `ping` and `state.sync` (the routers reconciled, then
//! the state summary, with every rule's counters on request).

use serde_json::{Value, json};

use super::{Dispatcher, Domain, Executed, Recorded, reconcile_routers};
use crate::state::{Change, StateError};

/// A read-only command, checked.
pub(super) enum Read {
    Ping,
    /// `counters`: the answer also carries every rule's packet and byte counts.
    StateSync {
        counters: bool,
    },
}

/// What a read-only command leaves: only its record.
pub(super) struct Nothing;

impl Recorded for Nothing {
    fn record(&mut self) -> Change {
        Change::None
    }
}

/// The read-only commands read every domain's state: they are the dispatcher's own.
impl Domain for Dispatcher {
    type Request = Read;
    /// Each read takes the locks it reads under, one at a time.
    type Held<'a> = ();
    type Effect = Nothing;

    async fn hold(&self) {}

    async fn execute(
        &self,
        _held: &mut Self::Held<'_>,
        _id: &str,
        request: Read,
    ) -> Result<(Executed, Nothing), StateError> {
        let executed = match request {
            Read::Ping => Executed::applied(json!({})),
            Read::StateSync { counters } => self.state_sync(counters).await?,
        };
        Ok((executed, Nothing))
    }

    async fn roll_back(&self, _held: &mut Self::Held<'_>, _effect: &Nothing) {}

    async fn commit(&self, _held: Self::Held<'_>, _effect: Nothing) {}
}

impl Dispatcher {
    /// `state.sync`: routers reconciled with the kernel, then the summary (with every
    /// rule's counters on request).
    async fn state_sync(&self, counters: bool) -> Result<Executed, StateError> {
        {
            let mut routers = self.routers.routers.lock().await;
            reconcile_routers(&mut routers, &self.store, &self.routers.drift).await?;
        }
        let mut summary = self.summary().await?;
        if counters {
            summary["firewall"]["counters"] = self.rule_counters().await;
        }
        Ok(Executed::applied(summary))
    }

    /// The state summary of PROTOCOL.md section 6.
    pub async fn summary(&self) -> Result<Value, StateError> {
        let store = self.store.clone();
        let processed = tokio::task::spawn_blocking(move || store.processed_count())
            .await
            .expect("state store task panicked")?;
        let firewall = self.firewall.lock().await.current().summary();
        let mut summary = json!({
            "host": self.host_id(),
            "version": env!("CARGO_PKG_VERSION"),
            "firewall": firewall,
            "routers": self.routers.routers.lock().await.summary(),
            "certificate": self.certs.ctx.identity.read().expect("identity lock").summary(),
            "commands": { "processed": processed },
        });
        let lost = self.firewall.state_lost.lock().expect("state_lost lock");
        if let Some(lost) = lost.clone() {
            summary["state_lost"] = lost;
        }
        Ok(summary)
    }

    /// Every rule's counts, sorted by id (`state.sync` with `counters`); `null` when the
    /// kernel's counters cannot be read.
    async fn rule_counters(&self) -> Value {
        let fw = self.firewall.lock().await;
        let (table, chains) = (fw.table().to_string(), fw.bucket_chains());
        let counts =
            tokio::task::spawn_blocking(move || crate::firewall::counters::by_id(&table, &chains))
                .await
                .expect("netlink task panicked");
        match counts {
            Ok(counts) => Value::Array(
                fw.current()
                    .rules
                    .keys()
                    .map(|id| {
                        let c = counts.get(id).copied().unwrap_or_default();
                        json!({"id": id, "packets": c.packets, "bytes": c.bytes})
                    })
                    .collect(),
            ),
            Err(error) => {
                tracing::warn!(%error, "rule counters not read for state.sync");
                Value::Null
            }
        }
    }
}
