//! How rules are spread over nft chains so that a patch touches little: each hook's base
//! chain jumps, in order, to bucket chains of at most a few dozen rules. Changing one rule
//! rewrites its bucket (and the short base chain only when buckets split or vanish).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use super::spec::{Direction, Rule, RuleKey};

/// Rules per bucket after a full apply; a bucket is split when it grows past twice that.
pub const BUCKET: usize = 64;

/// A netfilter hook the table has a base chain on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Hook {
    /// Packets to the host.
    Input,
    /// Packets from the host.
    Output,
    /// Packets through the host (workloads).
    Forward,
}

impl Hook {
    /// Every hook, in the order the table is written.
    pub const ALL: [Hook; 3] = [Hook::Input, Hook::Output, Hook::Forward];

    /// The base chain's name.
    pub fn base_chain(self) -> &'static str {
        match self {
            Hook::Input => "input",
            Hook::Output => "output",
            Hook::Forward => "forward",
        }
    }

    /// The prefix of its bucket chains' names (`in_3`).
    pub fn bucket_prefix(self) -> &'static str {
        match self {
            Hook::Input => "in",
            Hook::Output => "out",
            Hook::Forward => "fwd",
        }
    }
}

/// The hooks a rule is rendered into (none when disabled).
pub fn hooks_of(rule: &Rule) -> Vec<Hook> {
    if rule.disabled {
        return vec![];
    }
    if !rule.applied_to.is_empty() {
        return vec![Hook::Forward];
    }
    match rule.direction {
        Direction::In => vec![Hook::Input],
        Direction::Out => vec![Hook::Output],
        Direction::Both => vec![Hook::Input, Hook::Output],
    }
}

/// A run of consecutive rules (in evaluation order) in a chain of its own, so that a
/// patch rewrites a bucket, not the hook.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bucket {
    /// Its chain's number (unique within the table).
    pub chain: u32,
    /// Its rules, in evaluation order.
    pub keys: BTreeSet<RuleKey>,
}

impl Bucket {
    /// Its chain's name under `hook`.
    pub fn chain_name(&self, hook: Hook) -> String {
        format!("{}_{}", hook.bucket_prefix(), self.chain)
    }
}

/// Buckets are shared between a layout and its copies until one of them changes a bucket
/// (`Arc::make_mut`): a patch's copy of the layout costs the buckets it touches, not the
/// table.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Layout {
    /// Each hook's buckets, in evaluation order.
    pub hooks: BTreeMap<Hook, Vec<Arc<Bucket>>>,
    next_chain: u32,
}

/// What a sequence of changes did to the layout, for rendering the patch.
#[derive(Debug, Default)]
pub struct Changes {
    /// Buckets whose rules must be rewritten (new ones included).
    pub dirty: BTreeSet<(Hook, u32)>,
    /// Buckets that exist in the kernel and must be flushed first (not new).
    pub existing: BTreeSet<(Hook, u32)>,
    /// Buckets that disappeared.
    pub removed: BTreeSet<(Hook, u32)>,
    /// Hooks whose base chain (jump list) changed.
    pub bases: BTreeSet<Hook>,
}

impl Layout {
    /// A fresh layout: every hook's enabled rules in order, cut into full buckets.
    pub fn build<'a>(rules: impl IntoIterator<Item = &'a Rule>) -> Layout {
        let mut per_hook: BTreeMap<Hook, Vec<RuleKey>> = BTreeMap::new();
        for r in rules {
            for h in hooks_of(r) {
                per_hook.entry(h).or_default().push(r.key());
            }
        }
        let mut layout = Layout::default();
        for h in Hook::ALL {
            let mut keys = per_hook.remove(&h).unwrap_or_default();
            keys.sort();
            let mut buckets = vec![];
            for chunk in keys.chunks(BUCKET) {
                buckets.push(Arc::new(Bucket {
                    chain: layout.next_chain,
                    keys: chunk.iter().cloned().collect(),
                }));
                layout.next_chain += 1;
            }
            layout.hooks.insert(h, buckets);
        }
        layout
    }

    /// `hook`'s buckets, in evaluation order.
    pub fn buckets(&self, hook: Hook) -> &[Arc<Bucket>] {
        self.hooks.get(&hook).map(Vec::as_slice).unwrap_or(&[])
    }

    /// `hook`'s bucket with chain number `chain`.
    pub fn bucket(&self, hook: Hook, chain: u32) -> Option<&Bucket> {
        self.buckets(hook)
            .iter()
            .find(|b| b.chain == chain)
            .map(Arc::as_ref)
    }

    /// Takes rule `key` out of its bucket under `hook` (the bucket goes when emptied),
    /// noting the change in `ch`.
    pub fn remove(&mut self, hook: Hook, key: &RuleKey, ch: &mut Changes) {
        let buckets = self.hooks.entry(hook).or_default();
        let Some(i) = buckets.iter().position(|b| b.keys.contains(key)) else {
            return;
        };
        Arc::make_mut(&mut buckets[i]).keys.remove(key);
        let chain = buckets[i].chain;
        if buckets[i].keys.is_empty() {
            buckets.remove(i);
            let id = (hook, chain);
            let made_in_this_change = ch.dirty.contains(&id) && !ch.existing.contains(&id);
            ch.dirty.remove(&id);
            ch.existing.remove(&id);
            if !made_in_this_change {
                ch.removed.insert(id);
            }
            ch.bases.insert(hook);
        } else {
            mark(ch, hook, chain);
        }
    }

    /// Puts rule `key` in the bucket its place falls in under `hook` (a bucket grown past
    /// twice [`BUCKET`] is split), noting the change in `ch`.
    pub fn insert(&mut self, hook: Hook, key: RuleKey, ch: &mut Changes) {
        let next = &mut self.next_chain;
        let buckets = self.hooks.entry(hook).or_default();
        if buckets.is_empty() {
            buckets.push(Arc::new(Bucket {
                chain: *next,
                keys: BTreeSet::new(),
            }));
            ch.dirty.insert((hook, *next));
            ch.bases.insert(hook);
            *next += 1;
        }
        // The first bucket whose last key is not below the new key, else the last one.
        let i = buckets
            .iter()
            .position(|b| b.keys.last().is_some_and(|last| &key <= last))
            .unwrap_or(buckets.len() - 1);
        let bucket = Arc::make_mut(&mut buckets[i]);
        bucket.keys.insert(key);
        let chain = bucket.chain;
        mark(ch, hook, chain);
        if bucket.keys.len() > 2 * BUCKET {
            let upper: BTreeSet<RuleKey> = bucket.keys.iter().skip(BUCKET).cloned().collect();
            bucket.keys.retain(|k| !upper.contains(k));
            buckets.insert(
                i + 1,
                Arc::new(Bucket {
                    chain: *next,
                    keys: upper,
                }),
            );
            ch.dirty.insert((hook, *next));
            ch.bases.insert(hook);
            *next += 1;
        }
    }
}

fn mark(ch: &mut Changes, hook: Hook, chain: u32) {
    if ch.dirty.insert((hook, chain)) {
        ch.existing.insert((hook, chain));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(id: &str, prio: u32, dir: Direction) -> Rule {
        Rule::for_test(id, prio, dir)
    }

    #[test]
    fn build_cuts_ordered_buckets_per_hook() {
        let rules: Vec<Rule> = (0..150)
            .map(|i| rule(&format!("r{i:03}"), 10, Direction::Both))
            .collect();
        let l = Layout::build(&rules);
        let ins = l.buckets(Hook::Input);
        assert_eq!(
            ins.iter().map(|b| b.keys.len()).collect::<Vec<_>>(),
            vec![64, 64, 22]
        );
        assert_eq!(l.buckets(Hook::Output).len(), 3);
        assert!(l.buckets(Hook::Forward).is_empty());
        assert!(ins[0].keys.last().unwrap() < ins[1].keys.first().unwrap());
    }

    #[test]
    fn one_insert_dirties_one_bucket() {
        let rules: Vec<Rule> = (0..640)
            .map(|i| rule(&format!("r{i:04}"), 10, Direction::In))
            .collect();
        let mut l = Layout::build(&rules);
        let mut ch = Changes::default();
        l.insert(Hook::Input, (10, "r0100x".into()), &mut ch);
        assert_eq!(ch.dirty.len(), 1);
        assert_eq!(ch.existing.len(), 1);
        assert!(ch.bases.is_empty());
    }

    #[test]
    fn buckets_split_and_vanish() {
        let rules: Vec<Rule> = (0..64)
            .map(|i| rule(&format!("r{i:04}"), 10, Direction::In))
            .collect();
        let mut l = Layout::build(&rules);
        let mut ch = Changes::default();
        for i in 0..70 {
            l.insert(Hook::Input, (5, format!("a{i:03}")), &mut ch);
        }
        assert_eq!(l.buckets(Hook::Input).len(), 2);
        assert!(ch.bases.contains(&Hook::Input));
        let mut ch = Changes::default();
        let keys: Vec<RuleKey> = l.buckets(Hook::Input)[1].keys.iter().cloned().collect();
        for k in &keys {
            l.remove(Hook::Input, k, &mut ch);
        }
        assert_eq!(l.buckets(Hook::Input).len(), 1);
        assert_eq!(ch.removed.len(), 1);
        // Still in order overall.
        let all: Vec<&RuleKey> = l
            .buckets(Hook::Input)
            .iter()
            .flat_map(|b| b.keys.iter())
            .collect();
        assert!(all.windows(2).all(|w| w[0] < w[1]));
    }
}
