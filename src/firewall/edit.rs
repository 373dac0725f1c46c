//! Rule patches addressed by rule handle: for each bucket chain a patch changes, which of
//! its kernel rules go and where the new ones go, so that no chain is flushed (the rules a
//! patch keeps keep their counters) and no nft process runs. Applied over netlink after
//! one read of each changed chain; when a chain is not as we last wrote it, the caller
//! falls back to the same change as nft text.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ops::Range;

use super::bytecode::{self, SetIds};
use super::counters::Seeds;
use super::layout::{Changes, Layout};
use super::render::{Family, kernel_rules};
use super::spec::Rule;
use crate::sys::nfnl::{self, Element, NfnlError, SetChange};
use crate::sys::nfrule::{self, NamedSet, NewRule, TableBatch};

/// A kernel rule a patch adds to a bucket chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AddedRule {
    /// Goes before the kept rule at this index of [`BucketEdit::expect`]; at the end when
    /// `None`.
    pub before: Option<usize>,
    /// The same rule as nft text (for logs and checks).
    pub text: String,
    /// The rule, for the netlink batch.
    pub rule: NewRule,
}

/// The change of one bucket chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BucketEdit {
    /// The bucket chain.
    pub chain: String,
    /// The comment of each kernel rule of the chain as we last wrote it, in order: what the
    /// kernel's listing must show for the indices below to mean the right rules.
    pub expect: Vec<Option<String>>,
    /// Indices (into `expect`) of the kernel rules that go, ascending.
    pub delete: Vec<usize>,
    /// The kernel rules that come, in order.
    pub add: Vec<AddedRule>,
}

/// A named set a patch makes (one family's half), with its elements.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewSet {
    /// The address set's name (the kernel set is its family's half).
    pub name: String,
    /// Which half.
    pub family: Family,
    /// Its elements.
    pub elements: Vec<Element>,
}

/// What a patch does to the named sets: made first, elements changed, rules edited, then
/// sets deleted (once no rule uses them).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SetEdits {
    /// Sets made.
    pub create: Vec<NewSet>,
    /// Element changes of existing sets.
    pub elements: Vec<SetChange>,
    /// Kernel sets deleted, by name.
    pub delete: Vec<String>,
}

/// Ids of the named sets a batch makes; anonymous sets count up from 1.
const NAMED_SET_IDS: u32 = 1 << 30;

/// Why a netlink rule patch was not applied (nothing of it was).
#[derive(Debug, thiserror::Error)]
pub enum EditError {
    /// The chain in the kernel is not as the agent last wrote it (someone changed it).
    #[error(
        "chain {chain} is not as last written ({found} rules in the kernel, {expected} recorded, or other comments)"
    )]
    Differs {
        /// The chain.
        chain: String,
        /// Rules the kernel lists in it.
        found: usize,
        /// Rules we last wrote there.
        expected: usize,
    },
    /// The kernel refused the batch.
    #[error(transparent)]
    Kernel(#[from] NfnlError),
}

/// The edits of every bucket chain `ch` marks dirty, or `None` when the patch needs more
/// than rule changes in existing chains (new or removed chains, a base chain rewritten):
/// those go as nft text. `old` is the layout before the patch, `new` after; `rule_of`
/// gives a rule's content after the patch.
pub fn plan<'a>(
    current: &'a BTreeMap<String, Rule>,
    rule_of: impl Fn(&str) -> Option<&'a Rule>,
    old: &Layout,
    new: &Layout,
    ch: &Changes,
) -> Option<Vec<BucketEdit>> {
    if !ch.bases.is_empty() || !ch.removed.is_empty() {
        return None;
    }
    let mut ids = SetIds::default();
    let mut out = vec![];
    for &(hook, chain) in &ch.dirty {
        if !ch.existing.contains(&(hook, chain)) {
            return None;
        }
        let (Some(before), Some(after)) = (old.bucket(hook, chain), new.bucket(hook, chain)) else {
            return None;
        };
        let mut expect = vec![];
        let mut spans: HashMap<&str, Range<usize>> = HashMap::new();
        for (_, id) in &before.keys {
            let rule = current.get(id)?;
            let start = expect.len();
            expect.extend(
                kernel_rules(rule, hook)
                    .iter()
                    .map(|k| k.comment().map(str::to_string)),
            );
            spans.insert(id, start..expect.len());
        }
        // A rule is kept when it is in the chain before and after, unchanged.
        let stays: HashSet<&str> = after.keys.iter().map(|(_, id)| id.as_str()).collect();
        let kept = |id: &str| {
            spans.contains_key(id)
                && stays.contains(id)
                && matches!((rule_of(id), current.get(id)), (Some(a), Some(b)) if a == b)
        };
        let mut delete: Vec<usize> = spans
            .iter()
            .filter(|(id, _)| !kept(id))
            .flat_map(|(_, r)| r.clone())
            .collect();
        delete.sort_unstable();
        let mut add = vec![];
        let mut pending: Vec<AddedRule> = vec![];
        for (_, id) in &after.keys {
            if kept(id) {
                let span = &spans[id.as_str()];
                if !span.is_empty() {
                    add.extend(pending.drain(..).map(|a| AddedRule {
                        before: Some(span.start),
                        ..a
                    }));
                }
                continue;
            }
            let rule = rule_of(id)?;
            for k in kernel_rules(rule, hook) {
                pending.push(AddedRule {
                    before: None,
                    text: k.text(),
                    rule: bytecode::compile(&k, &mut ids, None),
                });
            }
        }
        add.append(&mut pending);
        out.push(BucketEdit {
            chain: after.chain_name(hook),
            expect,
            delete,
            add,
        });
    }
    Some(out)
}

/// Reads each edited chain, checks it is as recorded, and applies the edits with `elements`
/// in one batch that the kernel refuses if anything changed the rule set meanwhile.
/// Blocking: call it from a blocking thread.
pub fn apply(table: &str, sets: &SetEdits, edits: &[BucketEdit]) -> Result<(), EditError> {
    let genid = nfrule::generation()?;
    let mut batch = TableBatch::new(table, Some(genid), nfnl::first_seq());
    for (i, s) in sets.create.iter().enumerate() {
        let (key_type, key_len) = bytecode::set_key(s.family);
        let set = NamedSet {
            name: &s.name,
            id: NAMED_SET_IDS + i as u32,
            key_type,
            key_len,
        };
        batch.add_named_set(set, &s.elements);
    }
    for c in &sets.elements {
        batch.elements(&c.set, None, &c.add, &c.delete);
    }
    let mut listings = Vec::with_capacity(edits.len());
    for e in edits {
        let listed = nfrule::list_chain(table, &e.chain)?;
        if listed.len() != e.expect.len()
            || listed.iter().zip(&e.expect).any(|(l, c)| l.comment != *c)
        {
            return Err(EditError::Differs {
                chain: e.chain.clone(),
                found: listed.len(),
                expected: e.expect.len(),
            });
        }
        listings.push(listed);
    }
    // A changed rule's new kernel rules carry on the counts of the ones they replace, even
    // when its priority moved it to another chain.
    let mut seeds = Seeds::from_listed(
        edits
            .iter()
            .zip(&listings)
            .flat_map(|(e, listed)| e.delete.iter().map(move |i| &listed[*i])),
    );
    for (e, listed) in edits.iter().zip(&listings) {
        for i in &e.delete {
            batch.delete_rule(&e.chain, listed[*i].handle);
        }
        for a in &e.add {
            let mut rule = NewRule {
                before: a.before.map(|i| listed[i].handle),
                ..a.rule.clone()
            };
            if let Some(c) = rule.comment.as_deref().and_then(|id| seeds.take(id)) {
                rule.seed_counter(c);
            }
            batch.add_rule(&e.chain, &rule);
        }
    }
    for name in &sets.delete {
        batch.delete_set(name);
    }
    batch.send()?;
    Ok(())
}

/// The chain's text lines after `edit`, given its lines before: what the kernel holds
/// after the batch, for checks.
pub fn replay(before: &[String], edit: &BucketEdit) -> Vec<String> {
    let mut slots: Vec<Vec<String>> = before.iter().map(|l| vec![l.clone()]).collect();
    let mut tail = vec![];
    for i in &edit.delete {
        slots[*i].clear();
    }
    // Insertions before a kept rule go, in order, ahead of it.
    let mut ahead: Vec<Vec<String>> = vec![vec![]; before.len()];
    for a in &edit.add {
        match a.before {
            Some(i) => ahead[i].push(a.text.clone()),
            None => tail.push(a.text.clone()),
        }
    }
    let mut out = vec![];
    for (i, slot) in slots.into_iter().enumerate() {
        out.append(&mut ahead[i]);
        out.extend(slot);
    }
    out.extend(tail);
    out
}
