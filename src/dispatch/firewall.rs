//! The firewall's commands: `firewall.apply` (a whole rule set) and `firewall.patch`,
//! planned against the rule set in force, applied to the kernel in one transaction, made
//! current once recorded, put back when the record cannot be kept.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::time::Instant;

use serde_json::{Value, json};
use tokio::sync::{Mutex, MutexGuard};

use super::{Domain, Executed, Recorded};
use crate::firewall::spec::{Patch, RuleSet};
use crate::firewall::{ApplyPlan, Firewall, FirewallError};
use crate::state::{Change, StateError, Store};

/// Journal entries after which the firewall snapshot is rewritten.
const COMPACT_AFTER: u64 = 256;

/// A firewall command, checked.
pub(super) enum FirewallRequest {
    Apply {
        rules: Box<RuleSet>,
        /// The `data` JSON as received, compact: what the snapshot stores.
        raw: String,
        dry_run: bool,
    },
    Patch {
        patch: Box<Patch>,
        /// The `data` JSON as received, compact: what the journal stores.
        raw: String,
        dry_run: bool,
    },
}

/// What a firewall command did in the kernel, to record and then make current.
pub(super) enum FirewallEffect {
    None,
    /// A whole rule set is in the kernel; `raw` is its canonical JSON, for the record.
    Replace {
        rules: Box<RuleSet>,
        layout: crate::firewall::layout::Layout,
        raw: String,
    },
    /// A patch is in the kernel; `raw` is its `data`, for the record's journal.
    Patch {
        plan: Box<crate::firewall::PatchPlan>,
        raw: String,
    },
}

impl Recorded for FirewallEffect {
    fn record(&mut self) -> Change {
        match self {
            FirewallEffect::None => Change::None,
            FirewallEffect::Replace { raw, .. } => Change::FirewallReplace(std::mem::take(raw)),
            FirewallEffect::Patch { raw, .. } => Change::FirewallPatch(std::mem::take(raw)),
        }
    }
}

/// The firewall domain: the rule set in force (behind the lock every firewall command and
/// the drift repair hold), and the store epoch it matches.
pub(super) struct Firewalls {
    fw: Arc<Mutex<Firewall>>,
    store: Arc<Store>,
    /// The store epoch that the firewall in memory matches (read and written under the
    /// firewall lock). After the store was reopened (an I/O error), the firewall may hold
    /// patches whose records are gone: the next firewall command puts it back first.
    epoch: AtomicU64,
    /// Set when the stored state could not be read at start; a full rule set clears it.
    pub(super) state_lost: Arc<std::sync::Mutex<Option<Value>>>,
}

impl Domain for Firewalls {
    type Request = FirewallRequest;
    type Held<'a> = MutexGuard<'a, Firewall>;
    type Effect = FirewallEffect;

    async fn hold(&self) -> Self::Held<'_> {
        self.fw.lock().await
    }

    /// A firewall that may hold patches a reopened store lost is put back to what the
    /// store holds first, under the lock the command holds, so no command plans against it.
    async fn fence(&self, fw: &mut Self::Held<'_>) -> Option<u64> {
        if self.epoch.load(SeqCst) != self.store.epoch() {
            self.recover_locked(fw).await;
        }
        Some(self.epoch.load(SeqCst))
    }

    fn dry_run(request: &FirewallRequest) -> bool {
        match request {
            FirewallRequest::Apply { dry_run, .. } | FirewallRequest::Patch { dry_run, .. } => {
                *dry_run
            }
        }
    }

    async fn execute(
        &self,
        fw: &mut Self::Held<'_>,
        _id: &str,
        request: FirewallRequest,
    ) -> Result<(Executed, FirewallEffect), StateError> {
        Ok(match request {
            FirewallRequest::Apply {
                rules,
                dry_run: true,
                ..
            } => (apply_dry(fw, &rules).await, FirewallEffect::None),
            FirewallRequest::Apply { rules, raw, .. } => apply(fw, rules, raw).await,
            FirewallRequest::Patch {
                patch,
                dry_run: true,
                ..
            } => (patch_dry(fw, &patch).await, FirewallEffect::None),
            FirewallRequest::Patch { patch, raw, .. } => self::patch(fw, &patch, raw).await,
        })
    }

    /// Puts the kernel back to the rule set in force.
    async fn roll_back(&self, fw: &mut Self::Held<'_>, effect: &FirewallEffect) {
        if !matches!(effect, FirewallEffect::None)
            && let Err(re) = fw.restore().await
        {
            tracing::error!(error = %re, "could not roll the kernel back to the recorded rule set");
        }
    }

    /// The recorded change becomes the rule set in force, then what follows from it:
    /// connections the new rules deny are cut, the journal compacted now and then.
    async fn commit(&self, mut fw: Self::Held<'_>, effect: FirewallEffect) {
        match effect {
            FirewallEffect::None => {}
            FirewallEffect::Replace { rules, layout, .. } => {
                fw.commit_replace(*rules, layout);
                // A full rule set is what a lost state was waiting for.
                *self.state_lost.lock().expect("state_lost lock") = None;
                fw.cut_denied().await;
            }
            FirewallEffect::Patch { plan, .. } => {
                let may_deny_more = plan.may_deny_more;
                fw.commit_patch(*plan);
                if may_deny_more {
                    fw.cut_denied().await;
                }
                self.maybe_compact(&fw).await;
            }
        }
    }
}

impl Firewalls {
    pub(super) fn new(fw: Arc<Mutex<Firewall>>, store: Arc<Store>) -> Firewalls {
        Firewalls {
            epoch: store.epoch().into(),
            fw,
            store,
            state_lost: Default::default(),
        }
    }

    /// The rule set in force (for summaries and counters).
    pub(super) async fn lock(&self) -> MutexGuard<'_, Firewall> {
        self.fw.lock().await
    }

    /// Goes back to the firewall the store holds (patches whose records were lost).
    pub(super) async fn recover(&self) {
        let mut fw = self.fw.lock().await;
        self.recover_locked(&mut fw).await;
    }

    /// The firewall as the store holds it, in memory and in the kernel (after patches
    /// whose records were lost), marked as matching the store's epoch.
    async fn recover_locked(&self, fw: &mut Firewall) {
        let epoch = self.store.epoch();
        let store = self.store.clone();
        let stored = tokio::task::spawn_blocking(move || store.load_firewall())
            .await
            .expect("state store task panicked");
        let (nft, ctx) = fw.parts();
        let replayed = stored
            .map_err(|e| e.to_string())
            .and_then(|stored| replay_firewall(nft, ctx, &stored));
        match replayed {
            Ok(replayed) => {
                fw.take_rules_of(replayed);
                if let Err(e) = fw.restore().await {
                    tracing::error!(error = %e, "could not put the stored rule set back into the kernel; the drift check will retry");
                }
                fw.cut_denied().await;
                self.epoch.store(epoch, SeqCst);
            }
            Err(e) => tracing::error!(error = %e, "could not read the stored firewall back"),
        }
    }

    /// Folds the patch journal into a snapshot now and then, so restarts stay fast.
    pub(super) async fn maybe_compact(&self, fw: &Firewall) {
        if self.store.journal_len() < COMPACT_AFTER {
            return;
        }
        let snapshot = fw.current().canonical_json();
        let store = self.store.clone();
        let epoch = self.epoch.load(SeqCst);
        let result = tokio::task::spawn_blocking(move || store.compact_firewall(&snapshot, epoch))
            .await
            .expect("state store task panicked");
        if let Err(e) = result {
            tracing::warn!(error = %e, "could not compact the firewall journal (will retry)");
        }
    }
}

/// The firewall the store holds: its snapshot with the journal's patches replayed, without
/// limits (what was accepted once comes back even if the limits were lowered since; they
/// apply to the next command).
pub fn replay_firewall(
    nft: crate::sys::nft::Nft,
    ctx: crate::firewall::render::RenderCtx,
    stored: &crate::state::StoredFirewall,
) -> Result<Firewall, String> {
    let snapshot = match &stored.snapshot {
        Some(bytes) => crate::protocol::decode_stored_rule_set(bytes)
            .map_err(|e| format!("stored rule set does not decode: {e}"))?,
        None => RuleSet::default(),
    };
    let limits = crate::firewall::spec::Limits::NONE;
    let mut fw = Firewall::new(nft, ctx, limits, snapshot);
    for entry in &stored.journal {
        let patch = crate::protocol::decode_stored_patch(entry)
            .map_err(|e| format!("stored patch does not decode: {e}"))?;
        let plan = fw
            .plan_patch(&patch)
            .map_err(|e| format!("stored patch does not apply: {e}"))?;
        fw.commit_patch(plan);
    }
    Ok(fw)
}

fn failed_with(fw: &Firewall, e: FirewallError) -> (Executed, FirewallEffect) {
    let data = json!({ "generation": fw.current().generation });
    (Executed::failed(e, data), FirewallEffect::None)
}

/// A dry `firewall.apply`: checked and planned, answered with what it would change.
async fn apply_dry(fw: &Firewall, rs: &RuleSet) -> Executed {
    match fw.layout_for(rs) {
        Err(e) => failed_with(fw, e).0,
        Ok(layout) => Executed::applied(
            json!({ "generation": rs.generation, "dry_run": true, "diff": fw.apply_diff(rs, layout.as_ref()).await }),
        ),
    }
}

/// A dry `firewall.patch`.
async fn patch_dry(fw: &Firewall, patch: &Patch) -> Executed {
    match fw.plan_patch(patch) {
        Err(e) => failed_with(fw, e).0,
        Ok(plan) => Executed::applied(
            json!({ "generation": patch.generation, "dry_run": true, "diff": fw.patch_diff(&plan).await }),
        ),
    }
}

async fn apply(fw: &mut Firewall, rs: Box<RuleSet>, raw: String) -> (Executed, FirewallEffect) {
    let t = Instant::now();
    let plan = fw.plan_apply(&rs);
    tracing::debug!(plan_us = t.elapsed().as_micros() as u64, "rule set planned");
    match plan {
        Err(e) => failed_with(fw, e),
        Ok(ApplyPlan::NoOp) => (
            Executed::applied(json!({ "generation": rs.generation, "noop": true })),
            FirewallEffect::None,
        ),
        Ok(ApplyPlan::Replace { batch, layout }) => {
            let t = Instant::now();
            let bytes = batch.len();
            if let Err(e) = fw.apply_replace(batch, &rs, &layout).await {
                return failed_with(fw, e);
            }
            tracing::debug!(
                kernel_us = t.elapsed().as_micros() as u64,
                bytes,
                "firewall rule set applied to the kernel"
            );
            let executed = Executed::applied(json!({ "generation": rs.generation }));
            let effect = FirewallEffect::Replace {
                rules: rs,
                layout,
                raw,
            };
            (executed, effect)
        }
    }
}

async fn patch(fw: &mut Firewall, patch: &Patch, raw: String) -> (Executed, FirewallEffect) {
    let t = Instant::now();
    let plan = match fw.plan_patch(patch) {
        Ok(plan) => plan,
        Err(e) => return failed_with(fw, e),
    };
    let planned = t.elapsed();
    if let Err(e) = fw.apply_kernel(&plan.kernel).await {
        return failed_with(fw, e);
    }
    tracing::debug!(
        plan_us = planned.as_micros() as u64,
        kernel_us = (t.elapsed() - planned).as_micros() as u64,
        netlink = !matches!(plan.kernel, crate::firewall::KernelChange::Text(_)),
        "firewall patch applied to the kernel"
    );
    let executed = Executed::applied(json!({ "generation": patch.generation }));
    let plan = Box::new(plan);
    (executed, FirewallEffect::Patch { plan, raw })
}
