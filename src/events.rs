//! Events that must outlive a lost session (contract section 6): `drift`, `stats` and
//! `cert` events go through a bounded outbox in the state store, and the session publishes
//! them in order, oldest first, after each connect (before its `state` event) and whenever
//! new ones arrive. An event keeps the time it happened; one older than two hours when its
//! turn comes, or pushed out by the outbox's bounds, is dropped and counted, and the count
//! goes out in the next `state` event as `events_dropped`. Heartbeats are not kept.

use std::collections::HashMap;
use std::sync::Arc;

use serde_json::{Value, json};

use crate::ids::now_ms;
use crate::state::{KeptEvent, Store};
use crate::sys::nfrule::Counts;

/// Events older than this when their turn comes are dropped (contract section 6).
pub const MAX_AGE_MS: u64 = 2 * 3600 * 1000;
/// A `stats` event's JSON stays under this (contract: at most 2 MiB per message).
pub const MAX_EVENT_BYTES: usize = 2 << 20;

/// An event as published: the command envelope with the time the event happened.
pub fn envelope(host: &str, kind: &str, data: Value, at_ms: u64) -> Value {
    json!({
        "specversion": "1.0",
        "id": uuid::Uuid::new_v4().to_string(),
        "type": kind,
        "source": host,
        "host": host,
        "timestamp": at_ms,
        "data": data,
    })
}

/// Events (`drift`, `stats`, `cert`) kept in the store until a session publishes them,
/// bounded in bytes and count (the oldest dropped, and counted, past the bounds).
pub struct Outbox {
    store: Arc<Store>,
    host: String,
    max_bytes: u64,
    max_events: u64,
    wake: tokio::sync::Notify,
    metrics: Arc<crate::metrics::Metrics>,
}

impl Outbox {
    /// An outbox over `store` for `host`, bounded as `config` says.
    pub fn new(
        store: Arc<Store>,
        host: String,
        config: &crate::config::EventsConfig,
        metrics: Arc<crate::metrics::Metrics>,
    ) -> Outbox {
        Outbox {
            store,
            host,
            max_bytes: config.outbox_max_bytes,
            max_events: config.outbox_max_events,
            wake: tokio::sync::Notify::new(),
            metrics,
        }
    }

    async fn update_depth(&self) {
        let (kept, _) = self.counts().await;
        self.metrics.outbox_events.set(kept as i64);
    }

    /// Keeps an event that happened now until a session publishes it.
    pub async fn push(&self, kind: &str, data: Value) {
        let at = now_ms();
        let body = serde_json::to_vec(&envelope(&self.host, kind, data, at)).expect("JSON");
        let (store, k) = (self.store.clone(), kind.to_string());
        let (max_bytes, max_events) = (self.max_bytes, self.max_events);
        let pushed = tokio::task::spawn_blocking(move || {
            store.outbox_push(at, &k, &body, max_bytes, max_events)
        })
        .await
        .expect("state store task panicked");
        match pushed {
            Ok(0) => {}
            Ok(n) => tracing::warn!(dropped = n, "event outbox full: oldest events dropped"),
            Err(error) => {
                tracing::error!(%error, event = kind, "event not kept: the state store failed")
            }
        }
        self.wake.notify_one();
    }

    /// Resolves when an event was pushed since the last call.
    pub async fn pushed(&self) {
        self.wake.notified().await
    }

    /// The oldest kept events (at most `limit`), and how many were dropped unreported.
    pub async fn pending(&self, limit: usize) -> Vec<KeptEvent> {
        let store = self.store.clone();
        match tokio::task::spawn_blocking(move || store.outbox_peek(limit))
            .await
            .expect("state store task panicked")
        {
            Ok(v) => v,
            Err(error) => {
                tracing::error!(%error, "event outbox not readable");
                vec![]
            }
        }
    }

    /// Forgets published events, and counts `expired` ones dropped unsent.
    pub async fn done(&self, seqs: Vec<u64>, expired: u64) {
        let store = self.store.clone();
        let r = tokio::task::spawn_blocking(move || store.outbox_remove(&seqs, expired))
            .await
            .expect("state store task panicked");
        if let Err(error) = r {
            tracing::error!(%error, "published events not removed from the outbox (they will go again)");
        }
        self.metrics.events_dropped.inc_by(expired);
        self.update_depth().await;
    }

    /// (events kept, events dropped and not yet reported).
    pub async fn counts(&self) -> (u64, u64) {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || store.outbox_counts())
            .await
            .expect("state store task panicked")
            .unwrap_or((0, 0))
    }

    /// The dropped count went out in a `state` event.
    pub async fn reported(&self, n: u64) {
        let store = self.store.clone();
        let r = tokio::task::spawn_blocking(move || store.outbox_reported(n))
            .await
            .expect("state store task panicked");
        if let Err(error) = r {
            tracing::warn!(%error, "the dropped-event count was not reset");
        }
    }
}

/// Which rules' counters moved since the last `stats` event.
#[derive(Debug, Default)]
pub struct StatsTracker {
    last: HashMap<String, Counts>,
}

impl StatsTracker {
    /// The rules (sorted by id) whose counts differ from the last call's, with their counts
    /// now; rules that are gone are forgotten.
    pub fn moved(&mut self, now: HashMap<String, Counts>) -> Vec<(String, Counts)> {
        let mut out: Vec<(String, Counts)> = now
            .iter()
            .filter(|(id, c)| self.last.get(*id).copied().unwrap_or_default() != **c)
            .map(|(id, c)| (id.clone(), *c))
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        self.last = now;
        out
    }
}

/// `stats` event data for `moved`, split so that no event's JSON exceeds
/// [`MAX_EVENT_BYTES`]: `{generation, rules: [{id, packets, bytes}], part, parts}`, parts
/// numbered from 1.
pub fn stats_parts(generation: u64, moved: &[(String, Counts)]) -> Vec<Value> {
    // Room for the envelope and the other fields.
    const BUDGET: usize = MAX_EVENT_BYTES - 1024;
    let mut parts: Vec<Vec<Value>> = vec![vec![]];
    let mut size = 0;
    for (id, c) in moved {
        let r = json!({"id": id, "packets": c.packets, "bytes": c.bytes});
        let n = r.to_string().len() + 1;
        if size + n > BUDGET && !parts.last().expect("one part").is_empty() {
            parts.push(vec![]);
            size = 0;
        }
        size += n;
        parts.last_mut().expect("one part").push(r);
    }
    let total = parts.len();
    parts
        .into_iter()
        .enumerate()
        .map(|(i, rules)| json!({"generation": generation, "rules": rules, "part": i + 1, "parts": total}))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(packets: u64) -> Counts {
        Counts {
            packets,
            bytes: packets.saturating_mul(100),
        }
    }

    #[test]
    fn only_moved_counters_are_reported() {
        let mut t = StatsTracker::default();
        let m = t.moved(HashMap::from([("a".into(), c(1)), ("b".into(), c(0))]));
        assert_eq!(
            m,
            vec![("a".into(), c(1))],
            "zero is where a counter starts"
        );
        let m = t.moved(HashMap::from([("a".into(), c(1)), ("b".into(), c(2))]));
        assert_eq!(m, vec![("b".into(), c(2))]);
        assert!(
            t.moved(HashMap::from([("a".into(), c(1)), ("b".into(), c(2))]))
                .is_empty()
        );
    }

    #[test]
    fn large_reports_are_split_under_two_mebibytes_and_nothing_is_lost() {
        let moved: Vec<(String, Counts)> = (0..60_000)
            .map(|i| (format!("rule-{i:058}"), c(u64::MAX / 2)))
            .collect();
        let parts = stats_parts(7, &moved);
        assert!(parts.len() >= 3, "{} parts", parts.len());
        let mut ids = vec![];
        for (i, p) in parts.iter().enumerate() {
            let event = envelope("h", "stats", p.clone(), 1);
            assert!(event.to_string().len() <= MAX_EVENT_BYTES, "part {i}");
            assert_eq!(p["part"], i + 1);
            assert_eq!(p["parts"], parts.len());
            assert_eq!(p["generation"], 7);
            for r in p["rules"].as_array().unwrap() {
                ids.push(r["id"].as_str().unwrap().to_string());
            }
        }
        let want: Vec<String> = moved.into_iter().map(|(id, _)| id).collect();
        assert_eq!(ids, want);
    }
}
