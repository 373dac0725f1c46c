//! The host firewall: rule sets and patches applied to the agent's own nftables table in one
//! transaction each, drift detected and repaired. `spec` says what is valid, `layout` where
//! rules live, `render` what text the kernel gets; this module decides and applies.

pub mod bytecode;
pub mod counters;
pub mod delta;
pub mod edit;
pub mod flows;
pub mod layout;
pub mod render;
pub mod spec;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use ipnet::IpNet;
use sha2::{Digest, Sha256};

use crate::sys::nfnl::{self, Element, NfnlError, SetChange};
use crate::sys::nft::{Nft, NftError};
use delta::SetPatch;
use layout::{Changes, Hook, Layout, hooks_of};
use render::{Family, Range, RenderCtx};
use spec::{Defaults, Limits, Patch, Rule, RuleSet};

/// Why a firewall command is not applied.
#[derive(Debug, thiserror::Error)]
pub enum FirewallError {
    /// The command builds on another generation than the one in force.
    #[error(
        "generation conflict: the host is at generation {current}, the command needs {expected}"
    )]
    Stale {
        /// The generation in force.
        current: u64,
        /// What the command needs, in words.
        expected: String,
    },
    /// A rule or a patch names a set that does not exist.
    #[error("address set {name:?} is not defined")]
    UnknownSet {
        /// The set.
        name: String,
        /// Where it is named, as a JSON path.
        field: String,
    },
    /// A patch deletes a set a rule still uses.
    #[error("address set {name:?} is still used by rule {rule:?}")]
    SetInUse {
        /// The set.
        name: String,
        /// A rule using it.
        rule: String,
        /// The deletion, as a JSON path.
        field: String,
    },
    /// The result would be over a limit.
    #[error("the result would have more than {limit} {what}")]
    TooMany {
        /// What is counted (`rules`, `address set elements`, ...).
        what: &'static str,
        /// The limit.
        limit: usize,
        /// What went over it, as a JSON path.
        field: String,
    },
    /// nft refused the transaction.
    #[error(transparent)]
    Nft(#[from] NftError),
    /// The kernel refused the netlink batch.
    #[error(transparent)]
    Netlink(#[from] NfnlError),
}

/// How a plan reaches the kernel: nft text, or one nfnetlink batch for element changes and
/// rule changes within existing bucket chains. Either way one transaction.
pub enum KernelChange {
    /// nft input, for `nft -f -` (what netlink does not cover here).
    Text(String),
    /// Element changes of named sets, one netlink batch.
    Elements(Vec<SetChange>),
    /// Rules added and deleted by handle in existing bucket chains, with the named sets
    /// made, changed and deleted.
    /// `text` is the same change as nft text (flushing the chains), applied instead when a
    /// chain in the kernel is not as we last wrote it.
    Rules {
        /// The named sets' changes.
        sets: edit::SetEdits,
        /// Rules added and deleted, by bucket chain.
        buckets: Vec<edit::BucketEdit>,
        /// The same change as nft text.
        text: String,
    },
}

/// The result of checking a whole rule set against the current one.
pub enum ApplyPlan {
    /// Same generation, same content: nothing to do.
    NoOp,
    /// The table replaced whole, in one batch.
    Replace {
        /// The new table, encoded.
        batch: TableBatch,
        /// Where its rules go (chains and buckets).
        layout: Layout,
    },
}

/// A whole table encoded as one nfnetlink batch ([`bytecode::full_table`]).
pub struct TableBatch {
    bytes: Vec<u8>,
    acked: Vec<u32>,
}

impl TableBatch {
    /// Its size in bytes.
    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    /// Whether it holds nothing.
    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }
}

/// A checked patch, rendered, ready to be applied and then committed.
pub struct PatchPlan {
    /// What to do in the kernel, in one transaction.
    pub kernel: KernelChange,
    generation: u64,
    defaults: Defaults,
    established: spec::Established,
    sets: BTreeMap<String, SetPatch>,
    delete_rules: Vec<String>,
    upsert_rules: Vec<Rule>,
    /// Chains whose rules the patch changes, made or removes (for a dry run's diff).
    chains: usize,
    /// `None`: the patch changes no rule, so layout and references stay as they are.
    layout: Option<Layout>,
    refs: RefChanges,
    /// Whether the patched rule set may deny a connection that the current one allows (if
    /// not, no open connection needs checking).
    pub may_deny_more: bool,
}

/// What takes back an element-only patch committed before its kernel change was made
/// ([`Firewall::commit_elements`]).
#[derive(Debug)]
pub struct Undo {
    generation: u64,
    defaults: Defaults,
    established: spec::Established,
    applied_at_ms: Option<u64>,
    /// Each set's inverse edit.
    sets: Vec<(String, SetPatch)>,
}

impl PatchPlan {
    /// For a patch that changes set elements only (no rule, set made or deleted, default
    /// or layout): its kernel change, which may join other such patches' in one netlink
    /// transaction.
    pub fn elements(&self) -> Option<&[SetChange]> {
        let only_edits = (self.sets.values()).all(|s| matches!(s, SetPatch::Edit { .. }));
        match &self.kernel {
            KernelChange::Elements(changes)
                if only_edits
                    && self.layout.is_none()
                    && self.upsert_rules.is_empty()
                    && self.delete_rules.is_empty() =>
            {
                Some(changes)
            }
            _ => None,
        }
    }
}

/// What a drift check found.
#[derive(Debug, PartialEq, Eq)]
pub enum Drift {
    /// The table is as the agent made it.
    None,
    /// The table was missing or changed; it was restored.
    Repaired(String),
}

/// The host firewall: the rule set in force, where its rules are in the agent's table, and
/// how to change and repair that table.
pub struct Firewall {
    nft: Nft,
    ctx: RenderCtx,
    limits: Limits,
    current: RuleSet,
    layout: Layout,
    /// Rules referencing each set, for refusing to delete a set in use.
    refs: HashMap<String, BTreeSet<String>>,
    /// Fingerprint of our table as last seen after our own change.
    baseline: Option<String>,
    /// When the rule set in force was applied (`None`: restored at start).
    pub applied_at_ms: Option<u64>,
    /// The kernel's handle of our table as we last made it, 0 while unknown (see
    /// [`Firewall::made_handle`]).
    made: Arc<AtomicU64>,
    metrics: Option<Arc<crate::metrics::Metrics>>,
}

/// A dry run's account of a firewall command.
#[derive(Debug, Default)]
struct Diff {
    added: Vec<String>,
    removed: Vec<String>,
    changed: Vec<String>,
    elements_added: usize,
    elements_removed: usize,
    chains: usize,
    /// Open connections the result would cut (`None`: the sweep could not be made).
    connections_cut: Option<usize>,
}

impl Diff {
    /// Addresses of one set that the change adds and removes.
    fn count_elements(&mut self, old: Option<&BTreeSet<IpNet>>, new: Option<&BTreeSet<IpNet>>) {
        let empty = BTreeSet::new();
        let (old, new) = (old.unwrap_or(&empty), new.unwrap_or(&empty));
        self.elements_added += new.difference(old).count();
        self.elements_removed += old.difference(new).count();
    }

    fn into_json(mut self) -> serde_json::Value {
        for ids in [&mut self.added, &mut self.removed, &mut self.changed] {
            ids.sort();
        }
        serde_json::json!({
            "rules_added": self.added,
            "rules_removed": self.removed,
            "rules_changed": self.changed,
            "elements_added": self.elements_added,
            "elements_removed": self.elements_removed,
            "chains_rewritten": self.chains,
            "connections_cut": self.connections_cut,
        })
    }
}

/// How a patch changes the index of rules using each set: (set, rule) -> uses it after.
#[derive(Debug, Default)]
struct RefChanges(HashMap<String, HashMap<String, bool>>);

impl RefChanges {
    fn set(&mut self, set: &str, rule: &str, uses: bool) {
        self.0
            .entry(set.to_string())
            .or_default()
            .insert(rule.to_string(), uses);
    }

    /// A rule that uses `set` once the changes are made to `index`.
    fn a_user(&self, index: &HashMap<String, BTreeSet<String>>, set: &str) -> Option<String> {
        let changed = self.0.get(set);
        if let Some((rule, _)) = changed.and_then(|c| c.iter().find(|(_, uses)| **uses)) {
            return Some(rule.clone());
        }
        index
            .get(set)?
            .iter()
            .find(|r| changed.and_then(|c| c.get(*r)) != Some(&false))
            .cloned()
    }

    fn apply(self, index: &mut HashMap<String, BTreeSet<String>>) {
        for (set, rules) in self.0 {
            let users = index.entry(set.clone()).or_default();
            for (rule, uses) in rules {
                if uses {
                    users.insert(rule);
                } else {
                    users.remove(&rule);
                }
            }
            if users.is_empty() {
                index.remove(&set);
            }
        }
    }
}

fn refs_of(rs: &RuleSet) -> HashMap<String, BTreeSet<String>> {
    let mut refs: HashMap<String, BTreeSet<String>> = HashMap::new();
    for r in rs.rules.values() {
        for s in r.set_refs() {
            refs.entry(s.to_string()).or_default().insert(r.id.clone());
        }
    }
    refs
}

/// Rules per chain in a terse listing.
fn chain_rule_counts(listing: &str) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    let mut chain: Option<String> = None;
    for line in listing.lines().map(str::trim) {
        if let Some(rest) = line.strip_prefix("chain ") {
            let name = rest.trim_end_matches('{').trim().to_string();
            counts.insert(name.clone(), 0);
            chain = Some(name);
        } else if line == "}" {
            chain = None;
        } else if let Some(c) = &chain
            && !line.is_empty()
            && !line.starts_with("type ")
            && !line.starts_with("policy ")
            && let Some(n) = counts.get_mut(c)
        {
            *n += 1;
        }
    }
    counts
}

/// The terse listing with counter values removed: what must not change behind our back.
fn fingerprint(listing: &str) -> String {
    let mut out = String::with_capacity(listing.len());
    let mut skip_next = false;
    for tok in listing.split_whitespace() {
        if skip_next {
            skip_next = false;
            continue;
        }
        if tok == "packets" || tok == "bytes" {
            skip_next = true;
            continue;
        }
        out.push_str(tok);
        out.push(' ');
    }
    hex::encode(Sha256::digest(out.as_bytes()))
}

impl Firewall {
    /// A firewall holding `restored` (not yet in the kernel: see [`Firewall::restore`]).
    pub fn new(nft: Nft, ctx: RenderCtx, limits: Limits, restored: RuleSet) -> Firewall {
        Firewall {
            nft,
            ctx,
            limits,
            layout: Layout::build(restored.rules.values()),
            refs: refs_of(&restored),
            current: restored,
            baseline: None,
            applied_at_ms: None,
            made: Arc::new(AtomicU64::new(0)),
            metrics: None,
        }
    }

    /// Where cut connections are counted for the metrics endpoint.
    pub fn set_metrics(&mut self, m: Arc<crate::metrics::Metrics>) {
        self.metrics = Some(m);
    }

    /// Removes the open connections that the current rule set denies, when it says
    /// `"established": "cut"` (contract section 4). A failure is logged, not returned: the
    /// rule set is in force whatever happens to the sweep.
    pub async fn cut_denied(&mut self) -> Option<flows::SweepReport> {
        if self.current.established == spec::Established::Keep || !self.is_managed() {
            return None;
        }
        if flows::tracked_connections() == Some(0) {
            return None;
        }
        match flows::sweep(&self.current, &self.layout, &self.ctx, false).await {
            Ok(r) => {
                if let Some(m) = &self.metrics {
                    m.connections_cut.inc_by(r.cut as u64);
                }
                let level_info = r.cut > 0;
                if level_info {
                    tracing::info!(
                        generation = self.current.generation,
                        entries = r.entries,
                        keys = r.keys,
                        cut = r.cut,
                        sweep_us = r.elapsed_us,
                        "open connections that the rule set denies were cut"
                    );
                } else {
                    tracing::debug!(
                        generation = self.current.generation,
                        entries = r.entries,
                        keys = r.keys,
                        sweep_us = r.elapsed_us,
                        "no open connection is denied by the rule set"
                    );
                }
                Some(r)
            }
            Err(error) => {
                tracing::warn!(%error, generation = self.current.generation, "open connections were not checked against the rule set");
                None
            }
        }
    }

    /// The bucket chains of the applied rule set, as the kernel should hold them.
    pub fn bucket_chains(&self) -> Vec<String> {
        Hook::ALL
            .iter()
            .flat_map(|h| self.layout.buckets(*h).iter().map(|b| b.chain_name(*h)))
            .collect()
    }

    /// How many open connections `rs` (laid out as `layout`) would cut: a dry run's count.
    async fn would_cut(&self, rs: &RuleSet, layout: &Layout) -> Option<usize> {
        if rs.established == spec::Established::Keep || flows::tracked_connections() == Some(0) {
            return Some(0);
        }
        match flows::sweep(rs, layout, &self.ctx, true).await {
            Ok(r) => Some(r.denied),
            Err(error) => {
                tracing::warn!(%error, "a dry run could not count the connections it would cut");
                None
            }
        }
    }

    /// The kernel's handle of our table as this firewall last made it (0 while unknown or
    /// being remade). A watcher that finds the table missing, or under another handle (a
    /// tool that flushed the ruleset and restored an old copy), knows someone else did it,
    /// without listening to nftables events: while any socket on the host listens, the
    /// kernel builds an event for every rule and element of every transaction in every
    /// namespace (measured: a 10 000-rule, 100 000-element `nft -f` took 1.8-2.3 s instead
    /// of 1.1-1.2 s).
    pub fn made_handle(&self) -> Arc<AtomicU64> {
        self.made.clone()
    }

    /// Runs a transaction that may make the table anew (a full rule set), then records the
    /// handle it has.
    async fn remake(&self, batch: &str) -> Result<(), NftError> {
        let before = self.made.swap(0, Ordering::Relaxed);
        let result = self.nft.apply(batch).await;
        let now = match result {
            // (A netlink request: answered while it is sent.)
            Ok(()) => nfnl::table_handle(&self.ctx.table)
                .ok()
                .flatten()
                .unwrap_or(0),
            // Refused as a whole: the table is what it was.
            Err(_) => before,
        };
        self.made.store(now, Ordering::Relaxed);
        result
    }

    /// Replaces the failsafe context (brokers, ports); true when it changed, so the caller
    /// re-applies the table.
    pub fn set_ctx(&mut self, ctx: RenderCtx) -> bool {
        let changed = self.ctx != ctx;
        self.ctx = ctx;
        changed
    }

    /// The rule set in force.
    pub fn current(&self) -> &RuleSet {
        &self.current
    }

    /// The agent's table (`inet <table>`).
    pub fn table(&self) -> &str {
        &self.ctx.table
    }

    /// The limits commands are checked against.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Limits for the next commands (after restoring, and on reload).
    pub fn set_limits(&mut self, limits: Limits) {
        self.limits = limits;
    }

    /// True once a rule set has been applied, or the isolation rule set installed after a
    /// lost state (an empty generation 0 means the host was never given one and its firewall
    /// is left alone).
    pub fn is_managed(&self) -> bool {
        self.current.generation > 0 || self.current != RuleSet::default()
    }

    /// Takes `rs` as the current rule set without checks (the isolation rule set); the next
    /// `restore` puts it into the kernel.
    pub fn replace_unchecked(&mut self, rs: RuleSet) {
        self.layout = Layout::build(rs.rules.values());
        self.refs = refs_of(&rs);
        self.current = rs;
        self.baseline = None;
    }

    /// Puts the recorded rule set into the kernel (at start, and to repair drift).
    pub async fn restore(&mut self) -> Result<(), FirewallError> {
        if !self.is_managed() {
            return Ok(());
        }
        self.layout = Layout::build(self.current.rules.values());
        let batch = self.encode_full(&self.current, &self.layout);
        self.apply_replace(batch, &self.current, &self.layout)
            .await?;
        self.baseline = None;
        Ok(())
    }

    /// Encodes a whole table, its rules' counters carried on from the table it replaces
    /// (read first: one dump). That is tens of milliseconds of CPU at 10 000 rules: on a
    /// multi-threaded runtime the worker says so, and its other tasks move elsewhere.
    fn encode_full(&self, rs: &RuleSet, layout: &Layout) -> TableBatch {
        let encode = || {
            let mut seeds = counters::Seeds::read(&self.ctx.table, &self.bucket_chains());
            bytecode::full_table(rs, layout, &self.ctx, nfnl::first_seq(), &mut seeds)
        };
        let (bytes, acked) = match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor())
        {
            Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(encode),
            _ => encode(),
        };
        TableBatch { bytes, acked }
    }

    /// Generation rule of section 4 for a whole rule set.
    pub fn plan_apply(&self, rs: &RuleSet) -> Result<ApplyPlan, FirewallError> {
        Ok(match self.layout_for(rs)? {
            None => ApplyPlan::NoOp,
            Some(layout) => {
                let batch = self.encode_full(rs, &layout);
                ApplyPlan::Replace { batch, layout }
            }
        })
    }

    /// The generation rule for `rs`, and its layout unless it is a no-op: a plan without the
    /// encoding (a dry run needs no batch).
    pub fn layout_for(&self, rs: &RuleSet) -> Result<Option<Layout>, FirewallError> {
        let current = self.current.generation;
        if rs.generation == current && self.is_managed() && *rs == self.current {
            return Ok(None);
        }
        if rs.generation <= current {
            return Err(FirewallError::Stale {
                current,
                expected: format!("a generation above {current}"),
            });
        }
        Ok(Some(Layout::build(rs.rules.values())))
    }

    /// Makes the table anew with `rs` (laid out as `layout`) from its encoded `batch`, one
    /// netlink transaction. Should the kernel refuse it, the same transaction goes as nft
    /// text ([`render::render_full`]), whose refusal is the one reported.
    pub async fn apply_replace(
        &self,
        batch: TableBatch,
        rs: &RuleSet,
        layout: &Layout,
    ) -> Result<(), FirewallError> {
        let before = self.made.swap(0, Ordering::Relaxed);
        let table = self.ctx.table.clone();
        let sent = tokio::task::spawn_blocking(move || {
            let TableBatch { bytes, acked } = batch;
            nfnl::send_batch(&bytes, acked)?;
            nfnl::table_handle(&table)
        })
        .await
        .expect("netlink task panicked");
        match sent {
            Ok(handle) => {
                self.made.store(handle.unwrap_or(0), Ordering::Relaxed);
                Ok(())
            }
            Err(error) => {
                self.made.store(before, Ordering::Relaxed);
                tracing::warn!(%error, "rule set not applied over netlink; applying it as nft text");
                let text = self
                    .seeded(&render::render_full(rs, layout, &self.ctx))
                    .await;
                self.remake(&text).await.map_err(FirewallError::from)
            }
        }
    }

    /// nft text whose rules carry on the counts of the rules they replace: a chain that
    /// the text flushes and fills again keeps its rules' counts (see [`counters`]).
    async fn seeded(&self, text: &str) -> String {
        let (table, chains) = (self.ctx.table.clone(), self.bucket_chains());
        let mut seeds = tokio::task::spawn_blocking(move || counters::Seeds::read(&table, &chains))
            .await
            .expect("netlink task panicked");
        seeds.seed_text(text)
    }

    /// Makes a planned change in the kernel, in one transaction.
    pub async fn apply_kernel(&self, change: &KernelChange) -> Result<(), FirewallError> {
        match change {
            // A patch changes chains and sets of the table, never the table itself.
            KernelChange::Text(batch) => {
                let batch = self.seeded(batch).await;
                self.nft.apply(&batch).await.map_err(FirewallError::from)
            }
            KernelChange::Elements(changes) => {
                let table = self.ctx.table.clone();
                let changes = changes.clone();
                tokio::task::spawn_blocking(move || {
                    let t = std::time::Instant::now();
                    let r = nfnl::apply(&table, &changes);
                    tracing::debug!(
                        netlink_us = t.elapsed().as_micros() as u64,
                        "netlink batch done"
                    );
                    r
                })
                .await
                .expect("netlink task panicked")
                .map_err(FirewallError::from)
            }
            KernelChange::Rules {
                sets,
                buckets,
                text,
            } => {
                let table = self.ctx.table.clone();
                let (sets, buckets) = (sets.clone(), buckets.clone());
                let done = tokio::task::spawn_blocking(move || {
                    let t = std::time::Instant::now();
                    let r = edit::apply(&table, &sets, &buckets);
                    tracing::debug!(
                        netlink_us = t.elapsed().as_micros() as u64,
                        "netlink rule batch done"
                    );
                    r
                })
                .await
                .expect("netlink task panicked");
                if let Err(error) = done {
                    // Nothing of the batch was applied: the text does the same change from
                    // what the kernel holds, flushing the chains it touches.
                    tracing::warn!(%error, "rule patch not applied over netlink; applying it as nft text");
                    let text = self.seeded(text).await;
                    self.nft.apply(&text).await?;
                }
                Ok(())
            }
        }
    }

    /// What a scratch firewall needs to replay the stored rule set (`nft`, the context).
    pub fn parts(&self) -> (Nft, RenderCtx) {
        (self.nft.clone(), self.ctx.clone())
    }

    /// Takes `replayed`'s rule set as the current one (in memory only: `restore` puts it
    /// into the kernel), keeping this firewall's limits, metrics and watch handle.
    pub fn take_rules_of(&mut self, replayed: Firewall) {
        self.current = replayed.current;
        self.layout = replayed.layout;
        self.refs = replayed.refs;
        self.baseline = None;
        self.show_counts();
    }

    /// `rs`, in the kernel and recorded, becomes the rule set in force.
    pub fn commit_replace(&mut self, rs: RuleSet, layout: Layout) {
        self.refs = refs_of(&rs);
        self.current = rs;
        self.layout = layout;
        self.baseline = None;
        self.applied_at_ms = Some(crate::ids::now_ms());
        self.show_counts();
    }

    /// The rule set's generation and size on the metrics endpoint.
    fn show_counts(&self) {
        if let Some(m) = &self.metrics {
            let c = self.current.counts();
            m.firewall(c.generation, c.rules, c.elements);
        }
    }

    /// Checks a patch against the current rule set and renders the one transaction that
    /// realises it. Costs grow with the patch and the sets it touches, not with the table.
    pub fn plan_patch(&self, p: &Patch) -> Result<PatchPlan, FirewallError> {
        let cur = &self.current;
        if p.base_generation != cur.generation || !self.is_managed() {
            return Err(FirewallError::Stale {
                current: cur.generation,
                expected: format!("base generation {}", p.base_generation),
            });
        }
        let sets = delta::plan(&cur.sets, p)?;
        let rules_change = !p.upsert_rules.is_empty()
            || !p.delete_rules.is_empty()
            || !p.delete_address_sets.is_empty();
        let (refs, layout, mut ch) = self.plan_rules(p, &sets, rules_change)?;
        let deleted = self.check_limits(p, &sets)?;
        let mut defaults = cur.defaults;
        for (hook, new, slot) in [
            (Hook::Input, p.defaults.input, &mut defaults.input),
            (Hook::Output, p.defaults.output, &mut defaults.output),
            (Hook::Forward, p.defaults.forward, &mut defaults.forward),
        ] {
            if let Some(new) = new
                && new != *slot
            {
                *slot = new;
                ch.bases.insert(hook);
            }
        }

        let kernel = self.kernel_change(
            p,
            &sets,
            rules_change.then_some(&layout),
            &ch,
            &defaults,
            deleted.is_empty(),
        );
        let may_deny_more = self.may_deny_more(p, &sets, &defaults);
        Ok(PatchPlan {
            may_deny_more,
            kernel,
            generation: p.generation,
            defaults,
            established: p.established.unwrap_or(cur.established),
            sets,
            delete_rules: deleted.into_iter().collect(),
            upsert_rules: p.upsert_rules.clone(),
            chains: ch.dirty.len() + ch.bases.len() + ch.removed.len(),
            layout: rules_change.then_some(layout),
            refs,
        })
    }

    /// Which rules go and which come, with set references kept exact. The plan records how
    /// the reference index changes rather than copying it, and its copy of the layout
    /// shares every bucket it does not touch: a patch costs what it changes, not the table.
    fn plan_rules(
        &self,
        p: &Patch,
        sets: &BTreeMap<String, SetPatch>,
        rules_change: bool,
    ) -> Result<(RefChanges, Layout, Changes), FirewallError> {
        let cur = &self.current;
        let exists = |name: &str| match sets.get(name) {
            Some(s) => s.survives(),
            None => cur.sets.contains_key(name),
        };

        let mut refs = RefChanges::default();
        let mut layout = if rules_change {
            self.layout.clone()
        } else {
            Layout::default()
        };
        let mut ch = Changes::default();
        let upsert_ids: BTreeSet<&str> = p.upsert_rules.iter().map(|r| r.id.as_str()).collect();
        let mut gone: Vec<&Rule> = vec![];
        for id in p
            .delete_rules
            .iter()
            .map(String::as_str)
            .chain(upsert_ids.iter().copied())
        {
            if let Some(old) = cur.rules.get(id) {
                gone.push(old);
            }
        }
        for old in &gone {
            for s in old.set_refs() {
                refs.set(s, &old.id, false);
            }
            for h in hooks_of(old) {
                layout.remove(h, &old.key(), &mut ch);
            }
        }
        for (i, r) in p.upsert_rules.iter().enumerate() {
            let path = format!("$.data.upsert_rules[{i}]");
            if let Some((name, at)) = r.first_missing_set(exists) {
                return Err(FirewallError::UnknownSet {
                    name,
                    field: format!("{path}.{at}"),
                });
            }
            for s in r.set_refs() {
                refs.set(s, &r.id, true);
            }
            for h in hooks_of(r) {
                layout.insert(h, r.key(), &mut ch);
            }
        }
        for (i, name) in p.delete_address_sets.iter().enumerate() {
            if let Some(rule) = refs.a_user(&self.refs, name) {
                return Err(FirewallError::SetInUse {
                    name: name.clone(),
                    rule,
                    field: format!("$.data.delete_address_sets[{i}]"),
                });
            }
        }

        Ok((refs, layout, ch))
    }

    /// The limits on the patched rule set; the ids of the rules it deletes (not upserted).
    fn check_limits(
        &self,
        p: &Patch,
        sets: &BTreeMap<String, SetPatch>,
    ) -> Result<BTreeSet<String>, FirewallError> {
        let cur = &self.current;
        let upsert_ids: BTreeSet<&str> = p.upsert_rules.iter().map(|r| r.id.as_str()).collect();
        let deleted: BTreeSet<&str> = p
            .delete_rules
            .iter()
            .map(String::as_str)
            .filter(|id| cur.rules.contains_key(*id) && !upsert_ids.contains(id))
            .collect();
        let added = upsert_ids
            .iter()
            .filter(|id| !cur.rules.contains_key(**id))
            .count();
        if cur.rules.len() - deleted.len() + added > self.limits.max_rules {
            return Err(FirewallError::TooMany {
                what: "rules",
                limit: self.limits.max_rules,
                field: "$.data.upsert_rules".into(),
            });
        }
        let mut elements = cur.element_count();
        for (name, change) in sets {
            let (added, removed) = change.counts(cur.sets.get(name));
            elements = elements + added - removed;
        }
        if elements > self.limits.max_elements {
            return Err(FirewallError::TooMany {
                what: "set elements",
                limit: self.limits.max_elements,
                field: "$.data".into(),
            });
        }

        Ok(deleted.into_iter().map(str::to_string).collect())
    }

    /// How the kernel gets there: set elements only, rule edits by handle, or nft text.
    /// `layout` is the patched layout when rules change.
    fn kernel_change(
        &self,
        p: &Patch,
        sets: &BTreeMap<String, SetPatch>,
        layout: Option<&Layout>,
        ch: &Changes,
        defaults: &Defaults,
        none_deleted: bool,
    ) -> KernelChange {
        let cur = &self.current;
        let elements_only = p.upsert_rules.is_empty()
            && none_deleted
            && ch.dirty.is_empty()
            && ch.bases.is_empty()
            && ch.removed.is_empty()
            && sets
                .values()
                .all(|change| matches!(change, SetPatch::Edit { .. }));
        if elements_only {
            KernelChange::Elements(self.element_changes(sets))
        } else {
            let current_layout = layout.unwrap_or(&self.layout);
            let text = self.render_patch(sets, p, current_layout, ch, defaults);
            let upserts: HashMap<&str, &Rule> =
                p.upsert_rules.iter().map(|r| (r.id.as_str(), r)).collect();
            let rule_of = |id: &str| upserts.get(id).copied().or_else(|| cur.rules.get(id));
            match edit::plan(&cur.rules, rule_of, &self.layout, current_layout, ch) {
                Some(buckets) => KernelChange::Rules {
                    sets: self.set_edits(sets),
                    buckets,
                    text,
                },
                None => KernelChange::Text(text),
            }
        }
    }

    /// Whether a patch can make the rule set deny anything it allows now. Rules are first
    /// match, so a patch that only widens allow rules (a new allow rule, addresses added to
    /// sets that only allow rules use) or narrows deny rules cannot: the common address
    /// patches then cost no conntrack sweep (a dump walks the kernel's whole conntrack hash,
    /// about 10 ms here however few connections there are). Anything else counts as may.
    fn may_deny_more(
        &self,
        p: &Patch,
        sets: &BTreeMap<String, SetPatch>,
        defaults: &Defaults,
    ) -> bool {
        let cur = &self.current;
        if p.established == Some(spec::Established::Cut)
            && cur.established != spec::Established::Cut
        {
            return true;
        }
        let stricter = |old: spec::Policy, new: spec::Policy| {
            old == spec::Policy::Allow && new == spec::Policy::Drop
        };
        if stricter(cur.defaults.input, defaults.input)
            || stricter(cur.defaults.output, defaults.output)
            || stricter(cur.defaults.forward, defaults.forward)
        {
            return true;
        }
        let allows = |r: &Rule| r.action == spec::Action::Allow && !r.disabled;
        let upserts: HashMap<&str, &Rule> =
            p.upsert_rules.iter().map(|r| (r.id.as_str(), r)).collect();
        for id in &p.delete_rules {
            if !upserts.contains_key(id.as_str()) && cur.rules.get(id).is_some_and(allows) {
                return true;
            }
        }
        for r in &p.upsert_rules {
            match cur.rules.get(&r.id) {
                None if !allows(r) && !r.disabled => return true,
                Some(old) if old != r => return true,
                _ => {}
            }
        }
        for (name, change) in sets {
            if !change.survives() {
                continue; // deleted: no rule uses it any more
            }
            let (added, removed) = change.counts(cur.sets.get(name));
            let (added, removed) = (added > 0, removed > 0);
            if !added && !removed {
                continue;
            }
            let users = self
                .refs
                .get(name)
                .into_iter()
                .flatten()
                .filter_map(|id| {
                    upserts
                        .get(id.as_str())
                        .copied()
                        .or_else(|| cur.rules.get(id))
                })
                .chain(
                    p.upsert_rules
                        .iter()
                        .filter(|r| r.set_refs().any(|s| s == name)),
                );
            for r in users {
                if r.disabled {
                    continue;
                }
                if (removed && allows(r)) || (added && !allows(r)) {
                    return true;
                }
            }
        }
        false
    }

    /// The named sets a patch makes, changes and deletes, each family's half.
    fn set_edits(&self, sets: &BTreeMap<String, SetPatch>) -> edit::SetEdits {
        let mut out = edit::SetEdits {
            elements: self.element_changes(sets),
            ..Default::default()
        };
        for (name, change) in sets {
            for family in [Family::V4, Family::V6] {
                match change {
                    SetPatch::Create(els) => out.create.push(edit::NewSet {
                        name: family.set_name(name),
                        family,
                        elements: bytecode::set_elements(els, family),
                    }),
                    SetPatch::Delete => out.delete.push(family.set_name(name)),
                    SetPatch::Edit { .. } => {}
                }
            }
        }
        out
    }

    /// Element additions and deletions for sets that exist before and after.
    fn element_changes(&self, sets: &BTreeMap<String, SetPatch>) -> Vec<SetChange> {
        let mut out = vec![];
        for (name, change) in sets {
            let (SetPatch::Edit { added, removed }, Some(old)) =
                (change, self.current.sets.get(name))
            else {
                continue;
            };
            for fam in [Family::V4, Family::V6] {
                let (gone, come) = delta::interval_delta(old, added, removed, fam);
                let to_elements = |ranges: &[Range]| -> Vec<Element> {
                    ranges
                        .iter()
                        .flat_map(|r| interval_elements(r, fam))
                        .collect()
                };
                let change = SetChange {
                    set: fam.set_name(name),
                    delete: to_elements(&gone),
                    add: to_elements(&come),
                };
                if !change.delete.is_empty() || !change.add.is_empty() {
                    out.push(change);
                }
            }
        }
        out
    }

    fn render_patch(
        &self,
        sets: &BTreeMap<String, SetPatch>,
        p: &Patch,
        layout: &Layout,
        ch: &Changes,
        defaults: &Defaults,
    ) -> String {
        let t = &self.ctx.table;
        let cur = &self.current;
        let mut out = String::new();
        // 1. New sets first, then element changes, so rules below can refer to them.
        let empty = BTreeSet::new();
        for (name, change) in sets {
            for fam in [Family::V4, Family::V6] {
                let (gone, come) = match change {
                    SetPatch::Delete => continue,
                    SetPatch::Create(els) => {
                        render::add_set_text(&mut out, t, name, fam);
                        (vec![], render::merged(els, fam))
                    }
                    SetPatch::Edit { added, removed } => {
                        let old = cur.sets.get(name).unwrap_or(&empty);
                        delta::interval_delta(old, added, removed, fam)
                    }
                };
                render::element_delta_text(&mut out, t, name, fam, &gone, &come);
            }
        }
        // 2. Bucket chains whose rules changed.
        let upserts: HashMap<&str, &Rule> =
            p.upsert_rules.iter().map(|r| (r.id.as_str(), r)).collect();
        let lookup =
            |id: &str| -> Option<&Rule> { upserts.get(id).copied().or_else(|| cur.rules.get(id)) };
        for (hook, chain) in &ch.dirty {
            let Some(bucket) = layout.bucket(*hook, *chain) else {
                continue;
            };
            let lines = render::render_bucket(lookup, *hook, bucket);
            let exists = ch.existing.contains(&(*hook, *chain));
            render::rewrite_chain(&mut out, t, &bucket.chain_name(*hook), &lines, exists);
        }
        // 3. Base chains whose jumps or default changed.
        for hook in &ch.bases {
            let lines = render::render_base(
                *hook,
                layout,
                render::default_of(defaults, *hook),
                &self.ctx,
            );
            render::rewrite_chain(&mut out, t, hook.base_chain(), &lines, true);
        }
        // 4. Then what nothing refers to any more.
        for (hook, chain) in &ch.removed {
            out.push_str(&format!(
                "delete chain inet {t} {}_{chain}\n",
                hook.bucket_prefix()
            ));
        }
        for (name, change) in sets {
            if !change.survives() {
                for fam in [Family::V4, Family::V6] {
                    render::delete_set_text(&mut out, t, name, fam);
                }
            }
        }
        out
    }

    /// What applying `rs` laid out as `layout` would change (`None`: a no-op): a dry run's
    /// `diff` (PROTOCOL.md section 4). A whole rule set rewrites every chain of the table.
    pub async fn apply_diff(&self, rs: &RuleSet, layout: Option<&Layout>) -> serde_json::Value {
        let cur = &self.current;
        let Some(layout) = layout else {
            return Diff {
                connections_cut: Some(0),
                ..Diff::default()
            }
            .into_json();
        };
        let mut d = Diff::default();
        for (id, r) in &rs.rules {
            match cur.rules.get(id) {
                None => d.added.push(id.clone()),
                Some(old) if old != r => d.changed.push(id.clone()),
                Some(_) => {}
            }
        }
        d.removed = cur
            .rules
            .keys()
            .filter(|id| !rs.rules.contains_key(*id))
            .cloned()
            .collect();
        let names: BTreeSet<&String> = rs.sets.keys().chain(cur.sets.keys()).collect();
        for name in names {
            d.count_elements(cur.sets.get(name), rs.sets.get(name));
        }
        d.chains = Hook::ALL.iter().map(|h| layout.buckets(*h).len() + 1).sum();
        d.connections_cut = self.would_cut(rs, layout).await;
        d.into_json()
    }

    /// What `plan` would change: a dry run's `diff`.
    pub async fn patch_diff(&self, plan: &PatchPlan) -> serde_json::Value {
        let cur = &self.current;
        let mut d = Diff::default();
        for r in &plan.upsert_rules {
            match cur.rules.get(&r.id) {
                None => d.added.push(r.id.clone()),
                Some(old) if old != r => d.changed.push(r.id.clone()),
                Some(_) => {}
            }
        }
        d.removed = plan.delete_rules.clone();
        for (name, change) in &plan.sets {
            let (added, removed) = change.counts(cur.sets.get(name));
            d.elements_added += added;
            d.elements_removed += removed;
        }
        d.chains = plan.chains;
        d.connections_cut = if plan.may_deny_more {
            let (rs, layout) = self.patched(plan);
            self.would_cut(&rs, &layout).await
        } else {
            Some(0)
        };
        d.into_json()
    }

    /// The rule set and layout that `plan` would leave (a copy: for dry runs only).
    fn patched(&self, plan: &PatchPlan) -> (RuleSet, Layout) {
        let mut rs = self.current.clone();
        for (name, change) in &plan.sets {
            change.apply(name, &mut rs.sets);
        }
        for id in &plan.delete_rules {
            rs.rules.remove(id);
        }
        for r in &plan.upsert_rules {
            rs.rules.insert(r.id.clone(), r.clone());
        }
        rs.defaults = plan.defaults;
        rs.established = plan.established;
        rs.generation = plan.generation;
        let layout = plan.layout.clone().unwrap_or_else(|| self.layout.clone());
        (rs, layout)
    }

    /// A patch, in the kernel and recorded, becomes part of the rule set in force.
    pub fn commit_patch(&mut self, plan: PatchPlan) {
        let cur = &mut self.current;
        for (name, change) in &plan.sets {
            change.apply(name, &mut cur.sets);
        }
        for id in &plan.delete_rules {
            cur.rules.remove(id);
        }
        for r in plan.upsert_rules {
            cur.rules.insert(r.id.clone(), r);
        }
        cur.defaults = plan.defaults;
        cur.established = plan.established;
        cur.generation = plan.generation;
        plan.refs.apply(&mut self.refs);
        if let Some(layout) = plan.layout {
            self.layout = layout;
        }
        self.baseline = None;
        self.applied_at_ms = Some(crate::ids::now_ms());
        self.show_counts();
    }

    /// Commits a plan that changes set elements only ([`PatchPlan::elements`]) before its
    /// kernel change is made, so that the next patch plans on top of it; the kernel change
    /// of several such patches then goes in one transaction. The returned [`Undo`] takes it
    /// back when that transaction fails.
    pub fn commit_elements(&mut self, plan: PatchPlan) -> Undo {
        let cur = &self.current;
        let undo = Undo {
            generation: cur.generation,
            defaults: cur.defaults,
            established: cur.established,
            applied_at_ms: self.applied_at_ms,
            sets: (plan.sets.iter())
                .map(|(name, change)| {
                    let back = change.inverse().expect("an element-only plan edits sets");
                    (name.clone(), back)
                })
                .collect(),
        };
        self.commit_patch(plan);
        undo
    }

    /// Takes back a commit of [`Firewall::commit_elements`] (the last one not yet taken back).
    pub fn undo(&mut self, undo: Undo) {
        for (name, back) in &undo.sets {
            back.apply(name, &mut self.current.sets);
        }
        self.current.generation = undo.generation;
        self.current.defaults = undo.defaults;
        self.current.established = undo.established;
        self.applied_at_ms = undo.applied_at_ms;
        self.baseline = None;
        self.show_counts();
    }

    /// Compares our table with what we last applied; restores it when it differs or is gone.
    pub async fn check_drift(&mut self) -> Result<Drift, FirewallError> {
        if !self.is_managed() {
            return Ok(Drift::None);
        }
        let listing = self.nft.list_table_terse(&self.ctx.table).await?;
        let found = match listing {
            None => Some("table missing".to_string()),
            // Rules added to or removed from our chains are seen without any baseline.
            Some(text) if chain_rule_counts(&text) != self.expected_counts() => {
                Some("table changed".to_string())
            }
            Some(text) => {
                let fp = fingerprint(&text);
                match &self.baseline {
                    None => {
                        self.baseline = Some(fp);
                        None
                    }
                    Some(b) if *b == fp => None,
                    Some(_) => Some("table changed".to_string()),
                }
            }
        };
        let found = match found {
            Some(what) => Some(what),
            None => self.element_drift().await?,
        };
        let Some(what) = found else {
            return Ok(Drift::None);
        };
        self.restore().await?;
        if let Some(text) = self.nft.list_table_terse(&self.ctx.table).await? {
            self.baseline = Some(fingerprint(&text));
        }
        Ok(Drift::Repaired(what))
    }

    /// The first set whose elements in the kernel differ from the record (an `nft flush set`
    /// by hand, an element added behind our back). One dump per set, off the async threads.
    async fn element_drift(&self) -> Result<Option<String>, FirewallError> {
        if self.current.sets.is_empty() {
            return Ok(None);
        }
        let table = self.ctx.table.clone();
        let sets = self.current.sets.clone();
        let found = tokio::task::spawn_blocking(move || {
            for (name, elements) in &sets {
                for fam in [Family::V4, Family::V6] {
                    let mut want: Vec<Element> = render::merged(elements, fam)
                        .iter()
                        .flat_map(|r| interval_elements(r, fam))
                        .collect();
                    let kernel_name = fam.set_name(name);
                    let mut have = nfnl::dump_elements(&table, &kernel_name)?;
                    // Whether nft marked a top interval open is no difference in content.
                    have.iter_mut().for_each(|e| e.open = false);
                    // nft opens every interval set with an all-zero end element.
                    have.retain(|e| !(e.end && e.key.iter().all(|b| *b == 0)));
                    want.sort_by(|a, b| (&a.key, a.end).cmp(&(&b.key, b.end)));
                    have.sort_by(|a, b| (&a.key, a.end).cmp(&(&b.key, b.end)));
                    if want != have {
                        return Ok(Some(format!(
                            "set {name} elements changed ({} in the kernel, {} recorded)",
                            have.len(),
                            want.len()
                        )));
                    }
                }
            }
            Ok::<_, NfnlError>(None)
        })
        .await
        .expect("element dump task panicked");
        match found {
            Ok(found) => Ok(found),
            // A set missing altogether is drift too.
            Err(NfnlError::Refused(e)) if e.kind() == std::io::ErrorKind::NotFound => {
                Ok(Some("a set is missing".to_string()))
            }
            Err(e) => Err(FirewallError::Netlink(e)),
        }
    }

    /// Rules per chain that our own rendering puts in the kernel.
    fn expected_counts(&self) -> BTreeMap<String, usize> {
        let mut counts = BTreeMap::new();
        let rules = &self.current.rules;
        for hook in Hook::ALL {
            let default = render::default_of(&self.current.defaults, hook);
            let base = render::render_base(hook, &self.layout, default, &self.ctx);
            counts.insert(hook.base_chain().to_string(), base.len());
            for b in self.layout.buckets(hook) {
                let lines = render::render_bucket(|id| rules.get(id), hook, b);
                counts.insert(b.chain_name(hook), lines.len());
            }
        }
        counts
    }

    /// The live table as JSON (rules with counters), for inspection.
    pub async fn live(&self) -> Result<Option<serde_json::Value>, FirewallError> {
        Ok(self.nft.list_table_json(&self.ctx.table).await?)
    }
}

/// An interval as the kernel's interval sets hold it: a start element and, unless the range
/// runs to the top of the address space, an end element one past its last address.
fn interval_elements(r: &Range, fam: Family) -> Vec<Element> {
    let key = |v: u128| match fam {
        Family::V4 => (v as u32).to_be_bytes().to_vec(),
        Family::V6 => v.to_be_bytes().to_vec(),
    };
    let max = match fam {
        Family::V4 => u32::MAX as u128,
        Family::V6 => u128::MAX,
    };
    let mut out = vec![Element {
        key: key(r.start),
        ..Element::default()
    }];
    if r.end < max {
        out.push(Element {
            key: key(r.end + 1),
            end: true,
            open: false,
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use spec::{Addr, Direction, PartialDefaults, Policy};

    fn firewall() -> Firewall {
        let mut rs = RuleSet {
            generation: 1,
            ..Default::default()
        };
        rs.sets.insert(
            "web".into(),
            [spec::parse_net("10.0.0.1").unwrap()].into_iter().collect(),
        );
        let mut rule = Rule::for_test("r", 1, Direction::In);
        rule.sources = vec![Addr::Set("web".into())];
        rs.rules.insert("r".into(), rule);
        let ctx = RenderCtx::bare("rampart");
        Firewall::new(
            Nft::new(std::path::Path::new("/nonexistent")),
            ctx,
            Limits::default(),
            rs,
        )
    }

    #[test]
    fn chain_counts_match_our_own_rendering() {
        let fw = firewall();
        let text = render::render_full(&fw.current, &fw.layout, &fw.ctx);
        // The rendered input text has the same shape as nft's terse listing.
        let listing = text.lines().skip(2).collect::<Vec<_>>().join("\n");
        assert_eq!(chain_rule_counts(&listing), fw.expected_counts());
        let tampered = listing.replacen("jump in_0", "jump in_0\n\t\ttcp dport 83 accept", 1);
        assert_ne!(chain_rule_counts(&tampered), fw.expected_counts());
    }

    #[test]
    fn element_patches_committed_ahead_of_the_kernel_are_taken_back_exactly() {
        // A group of element-only patches is committed in memory one after the other (each
        // planned on the one before), then their one kernel transaction fails: undoing them
        // in reverse must give back the rule set as it was, element for element.
        let mut fw = firewall();
        let before = fw.current().clone();
        let net = |s: &str| -> BTreeSet<IpNet> { [spec::parse_net(s).unwrap()].into() };
        let patches = [
            Patch {
                add_addresses: [("web".into(), net("10.0.0.2"))].into(),
                ..Default::default()
            },
            Patch {
                remove_addresses: [("web".into(), net("10.0.0.1"))].into(),
                established: Some(spec::Established::Keep),
                ..Default::default()
            },
            // Takes back the first one's address: the group's sets edit the same element.
            Patch {
                remove_addresses: [("web".into(), net("10.0.0.2"))].into(),
                add_addresses: [("web".into(), net("10.0.0.0/30"))].into(),
                ..Default::default()
            },
        ];
        let mut undos = vec![];
        for (i, p) in patches.into_iter().enumerate() {
            let g = 1 + i as u64;
            let plan = fw
                .plan_patch(&Patch {
                    base_generation: g,
                    generation: g + 1,
                    ..p
                })
                .unwrap();
            assert!(plan.elements().is_some(), "patch {i} changes elements only");
            undos.push(fw.commit_elements(plan));
        }
        assert_eq!(fw.current().generation, 4);
        assert_eq!(fw.current().sets["web"], net("10.0.0.0/30"));
        for undo in undos.into_iter().rev() {
            fw.undo(undo);
        }
        assert_eq!(fw.current(), &before);
        // A patch that changes a rule is not one of them.
        let rule = Patch {
            base_generation: 1,
            generation: 2,
            upsert_rules: vec![Rule::for_test("s", 2, Direction::Out)],
            ..Default::default()
        };
        assert!(fw.plan_patch(&rule).unwrap().elements().is_none());
    }

    #[test]
    fn only_patches_that_may_deny_more_need_a_conntrack_sweep() {
        // Rule "r" allows sources in set "web".
        let fw = firewall();
        let net = |s: &str| -> BTreeSet<IpNet> { [spec::parse_net(s).unwrap()].into() };
        let may = |p: Patch| {
            fw.plan_patch(&Patch {
                base_generation: 1,
                generation: 2,
                ..p
            })
            .unwrap()
            .may_deny_more
        };
        let add = Patch {
            add_addresses: [("web".into(), net("10.0.0.2"))].into(),
            ..Default::default()
        };
        assert!(!may(add), "more addresses for an allow rule");
        let remove = Patch {
            remove_addresses: [("web".into(), net("10.0.0.1"))].into(),
            ..Default::default()
        };
        assert!(may(remove), "fewer addresses for an allow rule");
        let mut deny = Rule::for_test("d", 0, Direction::In);
        deny.action = spec::Action::Drop;
        assert!(may(Patch {
            upsert_rules: vec![deny.clone()],
            ..Default::default()
        }));
        let allow = Rule::for_test("a", 0, Direction::In);
        assert!(
            !may(Patch {
                upsert_rules: vec![allow],
                ..Default::default()
            }),
            "a new allow rule"
        );
        assert!(
            may(Patch {
                delete_rules: vec!["r".into()],
                ..Default::default()
            }),
            "an allow rule removed"
        );
        assert!(may(Patch {
            defaults: PartialDefaults {
                forward: Some(Policy::Drop),
                ..Default::default()
            },
            ..Default::default()
        }));
        let mut changed = fw.current.rules["r"].clone();
        changed.priority = 9;
        assert!(
            may(Patch {
                upsert_rules: vec![changed],
                ..Default::default()
            }),
            "a changed rule"
        );
        assert!(
            !may(Patch {
                upsert_rules: vec![fw.current.rules["r"].clone()],
                ..Default::default()
            }),
            "the same rule again"
        );
        // A deny rule on a new set, made in the same patch: addresses for it deny more.
        let mut on_set = deny;
        on_set.sources = vec![Addr::Set("bad".into())];
        assert!(may(Patch {
            set_address_sets: [("bad".into(), net("10.9.0.0/16"))].into(),
            upsert_rules: vec![on_set],
            ..Default::default()
        }));
    }

    #[test]
    fn a_defaults_patch_keeps_the_jumps() {
        let fw = firewall();
        let p = Patch {
            base_generation: 1,
            generation: 2,
            defaults: PartialDefaults {
                input: Some(Policy::Drop),
                ..Default::default()
            },
            ..Default::default()
        };
        let plan = fw.plan_patch(&p).unwrap();
        let KernelChange::Text(text) = &plan.kernel else {
            panic!("a defaults change is nft text");
        };
        assert!(text.contains("flush chain inet rampart input"), "{text}");
        assert!(text.contains("jump in_0"), "{text}");
        assert!(text.contains("counter drop comment \"default\""), "{text}");
    }

    #[test]
    fn an_element_patch_is_one_netlink_batch() {
        let fw = firewall();
        let p = Patch {
            base_generation: 1,
            generation: 2,
            add_addresses: [(
                "web".to_string(),
                [spec::parse_net("10.0.0.2").unwrap()].into_iter().collect(),
            )]
            .into_iter()
            .collect(),
            ..Default::default()
        };
        let plan = fw.plan_patch(&p).unwrap();
        let KernelChange::Elements(changes) = &plan.kernel else {
            panic!("an element-only patch goes over netlink");
        };
        assert_eq!(changes.len(), 1);
        assert!(changes[0].delete.is_empty(), "a neighbour is add-only");
        assert_eq!(changes[0].add.len(), 2);
    }

    #[test]
    fn a_rule_patch_edits_its_bucket_by_position_and_keeps_the_rest() {
        let mut rs = firewall().current.clone();
        rs.rules
            .insert("s".into(), Rule::for_test("s", 1, Direction::In));
        let fw = Firewall::new(
            Nft::new(std::path::Path::new("/nonexistent")),
            firewall().ctx.clone(),
            Limits::default(),
            rs,
        );
        let mut first = Rule::for_test("r0", 0, Direction::In);
        first.protocol = spec::Protocol::Tcp;
        let last = Rule::for_test("r2", 2, Direction::In);
        let p = Patch {
            base_generation: 1,
            generation: 2,
            upsert_rules: vec![first, last, fw.current.rules["r"].clone()],
            ..Default::default()
        };
        let plan = fw.plan_patch(&p).unwrap();
        let KernelChange::Rules { buckets, text, .. } = &plan.kernel else {
            panic!("rule changes in an existing chain go over netlink");
        };
        assert!(text.contains("flush chain inet rampart in_0"), "{text}");
        assert_eq!(buckets.len(), 1);
        let b = &buckets[0];
        assert!(b.delete.is_empty(), "r is sent again unchanged: kept");
        let before: Vec<Option<usize>> = b.add.iter().map(|a| a.before).collect();
        assert_eq!(
            before,
            vec![Some(0), None],
            "r0 before r, r2 after s, at the end"
        );
        let old = render::render_bucket(
            |id| fw.current.rules.get(id),
            Hook::Input,
            fw.layout.bucket(Hook::Input, 0).unwrap(),
        );
        let mut fw = fw;
        fw.commit_patch(plan_for(&fw, &p));
        let new = render::render_bucket(
            |id| fw.current.rules.get(id),
            Hook::Input,
            fw.layout.bucket(Hook::Input, 0).unwrap(),
        );
        assert_eq!(edit::replay(&old, b), new);
    }

    #[test]
    fn set_users_are_tracked_across_patches() {
        let mut fw = firewall();
        let patch = |fw: &mut Firewall, p: Patch| -> Result<(), FirewallError> {
            let plan = fw.plan_patch(&Patch {
                base_generation: fw.current.generation,
                generation: fw.current.generation + 1,
                ..p
            })?;
            fw.commit_patch(plan);
            Ok(())
        };
        let mut user = Rule::for_test("u", 5, Direction::Out);
        user.destinations = vec![Addr::Set("web".into())];
        let delete_web = || Patch {
            delete_address_sets: vec!["web".into()],
            ..Default::default()
        };
        // r (the set's user) goes as u comes: the set is still in use, by u.
        patch(
            &mut fw,
            Patch {
                upsert_rules: vec![user],
                delete_rules: vec!["r".into()],
                ..Default::default()
            },
        )
        .unwrap();
        match patch(&mut fw, delete_web()) {
            Err(FirewallError::SetInUse { rule, .. }) => assert_eq!(rule, "u"),
            other => panic!("{other:?}"),
        }
        // Deleting u and the set in one patch is fine.
        patch(
            &mut fw,
            Patch {
                delete_rules: vec!["u".into()],
                ..delete_web()
            },
        )
        .unwrap();
        assert!(fw.refs.is_empty(), "{:?}", fw.refs);
        assert!(!fw.current.sets.contains_key("web"));
    }

    fn plan_for(fw: &Firewall, p: &Patch) -> PatchPlan {
        fw.plan_patch(p).unwrap()
    }
}
