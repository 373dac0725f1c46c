//! What a patch does to the named sets, kept as a delta so that its cost grows with the
//! addresses it names, not with the sizes of the sets (a stream of one-address patches to
//! one set would otherwise be quadratic).
//!
//! Set elements are CIDR prefixes with no host bits, so any two are nested or disjoint, and
//! the kernel's intervals of a set are exactly its outermost elements. A change therefore
//! moves only the intervals under the outermost element above it, and none at all when an
//! element above it stays in the set.

use std::collections::{BTreeMap, BTreeSet};

use ipnet::IpNet;

use super::FirewallError;
use super::render::{Family, Range, bounds};
use super::spec::Patch;

/// What a patch does to one named set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SetPatch {
    /// A set there before and after: the elements it gains (none of them there before) and
    /// loses (all of them there before).
    Edit {
        /// Elements the set gains.
        added: BTreeSet<IpNet>,
        /// Elements the set loses.
        removed: BTreeSet<IpNet>,
    },
    /// A set the patch makes, with its elements.
    Create(BTreeSet<IpNet>),
    /// A set the patch deletes.
    Delete,
}

impl SetPatch {
    /// The edit that turns `old` into `new` (a set replaced whole: costs both sizes, which
    /// the patch carried).
    fn between(old: &BTreeSet<IpNet>, new: &BTreeSet<IpNet>) -> SetPatch {
        SetPatch::Edit {
            added: new.difference(old).copied().collect(),
            removed: old.difference(new).copied().collect(),
        }
    }

    /// Whether the set exists after the patch.
    pub fn survives(&self) -> bool {
        !matches!(self, SetPatch::Delete)
    }

    /// The elements the set gains and loses (a deleted set loses all of `old`'s).
    pub fn counts(&self, old: Option<&BTreeSet<IpNet>>) -> (usize, usize) {
        match self {
            SetPatch::Edit { added, removed } => (added.len(), removed.len()),
            SetPatch::Create(els) => (els.len(), 0),
            SetPatch::Delete => (0, old.map_or(0, BTreeSet::len)),
        }
    }

    /// The edit that takes this one back, for an edit of a set there before and after
    /// (`None` for a set made or deleted).
    pub fn inverse(&self) -> Option<SetPatch> {
        match self {
            SetPatch::Edit { added, removed } => Some(SetPatch::Edit {
                added: removed.clone(),
                removed: added.clone(),
            }),
            SetPatch::Create(_) | SetPatch::Delete => None,
        }
    }

    /// Makes the change in `sets`, in place.
    pub fn apply(&self, name: &str, sets: &mut BTreeMap<String, BTreeSet<IpNet>>) {
        match self {
            SetPatch::Edit { added, removed } => {
                let set = sets.entry(name.to_string()).or_default();
                for e in removed {
                    set.remove(e);
                }
                set.extend(added.iter().copied());
            }
            SetPatch::Create(els) => {
                sets.insert(name.to_string(), els.clone());
            }
            SetPatch::Delete => {
                sets.remove(name);
            }
        }
    }
}

/// What `p` does to each set it names, checked against `cur` (the sets in force). Fields
/// apply in the contract's order: whole sets, then additions, then removals, then deletions.
pub fn plan(
    cur: &BTreeMap<String, BTreeSet<IpNet>>,
    p: &Patch,
) -> Result<BTreeMap<String, SetPatch>, FirewallError> {
    // Sets the patch gives whole, and edits of the others (added: not in the set before).
    let mut whole = p.set_address_sets.clone();
    let mut edits: BTreeMap<&str, (BTreeSet<IpNet>, BTreeSet<IpNet>)> = BTreeMap::new();
    for (key, map, add) in [
        ("add_addresses", &p.add_addresses, true),
        ("remove_addresses", &p.remove_addresses, false),
    ] {
        for (name, els) in map {
            if let Some(set) = whole.get_mut(name) {
                if add {
                    set.extend(els.iter().copied());
                } else {
                    set.retain(|e| !els.contains(e));
                }
                continue;
            }
            let Some(old) = cur.get(name) else {
                return Err(FirewallError::UnknownSet {
                    name: name.clone(),
                    field: format!("$.data.{key}.{name}"),
                });
            };
            let (added, removed) = edits.entry(name).or_default();
            for e in els {
                if add && !old.contains(e) {
                    added.insert(*e);
                } else if !add {
                    added.remove(e);
                    if old.contains(e) {
                        removed.insert(*e);
                    }
                }
            }
        }
    }
    let mut out: BTreeMap<String, SetPatch> = edits
        .into_iter()
        .map(|(name, (added, removed))| (name.to_string(), SetPatch::Edit { added, removed }))
        .collect();
    for (name, els) in whole {
        let change = match cur.get(&name) {
            Some(old) => SetPatch::between(old, &els),
            None => SetPatch::Create(els),
        };
        out.insert(name, change);
    }
    for name in &p.delete_address_sets {
        if cur.contains_key(name) {
            out.insert(name.clone(), SetPatch::Delete);
        } else {
            // Made and deleted by the same patch: nothing happens to it.
            out.remove(name);
        }
    }
    Ok(out)
}

/// The kernel intervals of family `fam` that go and that come when `old` gains `added` and
/// loses `removed` (as in [`SetPatch::Edit`]), each list ascending. Costs the changed
/// elements and the elements under them, never the whole set.
pub fn interval_delta(
    old: &BTreeSet<IpNet>,
    added: &BTreeSet<IpNet>,
    removed: &BTreeSet<IpNet>,
    fam: Family,
) -> (Vec<Range>, Vec<Range>) {
    let mut regions: Vec<IpNet> = added
        .iter()
        .chain(removed)
        .filter(|c| Family::of(c) == fam)
        .filter(|c| !covered(old, removed, c))
        .copied()
        .collect();
    regions.sort_unstable();
    regions.dedup();
    let (mut gone, mut come) = (vec![], vec![]);
    let mut last: Option<IpNet> = None;
    for g in regions {
        // Regions are prefixes too: one inside the last is covered by it.
        if last.is_some_and(|l| l.contains(&g)) {
            continue;
        }
        last = Some(g);
        let before = outermost(within(old, &g).copied().collect());
        let after = outermost(
            within(old, &g)
                .filter(|e| !removed.contains(e))
                .chain(within(added, &g))
                .copied()
                .collect(),
        );
        gone.extend(before.iter().filter(|r| after.binary_search(r).is_err()));
        come.extend(after.iter().filter(|r| before.binary_search(r).is_err()));
    }
    (gone, come)
}

/// Whether an element above the changed element `c` is in the set both before and after:
/// then no interval changes because of `c`. (A changed element above `c` is a region of its
/// own, which covers `c`'s.)
fn covered(old: &BTreeSet<IpNet>, removed: &BTreeSet<IpNet>, c: &IpNet) -> bool {
    std::iter::successors(c.supernet(), IpNet::supernet)
        .any(|a| old.contains(&a) && !removed.contains(&a))
}

/// The elements of `set` inside the prefix `g` (`g` included), ascending.
fn within<'a>(set: &'a BTreeSet<IpNet>, g: &IpNet) -> impl Iterator<Item = &'a IpNet> {
    let last = IpNet::new(g.broadcast(), g.max_prefix_len()).expect("a full-length prefix");
    set.range(*g..=last)
}

/// The intervals of a family's elements: the outermost ones.
fn outermost(mut nets: Vec<IpNet>) -> Vec<Range> {
    nets.sort_unstable();
    let mut out: Vec<Range> = vec![];
    for r in nets.iter().map(bounds) {
        match out.last() {
            Some(l) if r.start <= l.end => {}
            _ => out.push(r),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::firewall::render::merged;
    use proptest::prelude::*;

    /// Prefixes in a small space, so that random ones nest and collide often.
    fn net() -> impl Strategy<Value = IpNet> {
        prop_oneof![
            (0u32..64, 26u8..=32).prop_map(|(a, len)| {
                let ip = std::net::Ipv4Addr::from(0x0a00_0000 | a);
                IpNet::V4(ipnet::Ipv4Net::new(ip, len).unwrap().trunc())
            }),
            (0u128..16, 124u8..=128).prop_map(|(a, len)| {
                let ip = std::net::Ipv6Addr::from((0x2001_0db8u128 << 96) | a);
                IpNet::V6(ipnet::Ipv6Net::new(ip, len).unwrap().trunc())
            }),
        ]
    }

    fn nets() -> impl Strategy<Value = BTreeSet<IpNet>> {
        proptest::collection::btree_set(net(), 0..24)
    }

    fn full_delta(
        old: &BTreeSet<IpNet>,
        new: &BTreeSet<IpNet>,
        fam: Family,
    ) -> (Vec<Range>, Vec<Range>) {
        let before: BTreeSet<Range> = merged(old, fam).into_iter().collect();
        let after: BTreeSet<Range> = merged(new, fam).into_iter().collect();
        (
            before.difference(&after).copied().collect(),
            after.difference(&before).copied().collect(),
        )
    }

    fn patch(add: BTreeSet<IpNet>, remove: BTreeSet<IpNet>) -> Patch {
        Patch {
            base_generation: 1,
            generation: 2,
            upsert_rules: vec![],
            delete_rules: vec![],
            set_address_sets: BTreeMap::new(),
            add_addresses: BTreeMap::from([("s".to_string(), add)]),
            remove_addresses: BTreeMap::from([("s".to_string(), remove)]),
            delete_address_sets: vec![],
            defaults: Default::default(),
            established: None,
        }
    }

    proptest! {
        /// The delta's intervals are those of recomputing both sets whole, and applying
        /// the edit gives the set the patch describes.
        #[test]
        fn a_delta_moves_the_intervals_a_full_recompute_moves(
            old in nets(), add in nets(), remove in nets()
        ) {
            let cur = BTreeMap::from([("s".to_string(), old.clone())]);
            let sets = plan(&cur, &patch(add.clone(), remove.clone())).unwrap();
            let expected: BTreeSet<IpNet> =
                old.union(&add).filter(|e| !remove.contains(e)).copied().collect();
            let mut applied = cur.clone();
            sets["s"].apply("s", &mut applied);
            prop_assert_eq!(&applied["s"], &expected);
            let SetPatch::Edit { added, removed } = &sets["s"] else {
                panic!("an existing set is edited: {:?}", sets["s"]);
            };
            for fam in [Family::V4, Family::V6] {
                prop_assert_eq!(
                    interval_delta(&old, added, removed, fam),
                    full_delta(&old, &expected, fam)
                );
            }
        }

        /// A set given whole is diffed against the old one, with the same intervals.
        #[test]
        fn a_whole_set_is_an_edit_of_the_old_one(old in nets(), new in nets()) {
            let cur = BTreeMap::from([("s".to_string(), old.clone())]);
            let mut p = patch(BTreeSet::new(), BTreeSet::new());
            p.add_addresses.clear();
            p.remove_addresses.clear();
            p.set_address_sets.insert("s".into(), new.clone());
            let sets = plan(&cur, &p).unwrap();
            let SetPatch::Edit { added, removed } = &sets["s"] else {
                panic!("an existing set is edited: {:?}", sets["s"]);
            };
            for fam in [Family::V4, Family::V6] {
                prop_assert_eq!(
                    interval_delta(&old, added, removed, fam),
                    full_delta(&old, &new, fam)
                );
            }
        }
    }

    #[test]
    fn an_address_under_a_kept_prefix_moves_no_interval() {
        let n = |s: &str| s.parse::<IpNet>().unwrap();
        let old = BTreeSet::from([n("10.0.0.0/8"), n("10.1.0.0/16")]);
        let added = BTreeSet::from([n("10.2.3.4/32")]);
        let removed = BTreeSet::from([n("10.1.0.0/16")]);
        assert_eq!(
            interval_delta(&old, &added, &removed, Family::V4),
            (vec![], vec![])
        );
    }

    #[test]
    fn unknown_sets_and_deletions() {
        let n = |s: &str| s.parse::<IpNet>().unwrap();
        let cur = BTreeMap::from([("s".to_string(), BTreeSet::from([n("10.0.0.1/32")]))]);
        let mut p = patch(BTreeSet::new(), BTreeSet::new());
        p.add_addresses = BTreeMap::from([("t".to_string(), BTreeSet::from([n("10.0.0.2/32")]))]);
        match plan(&cur, &p) {
            Err(FirewallError::UnknownSet { name, field }) => {
                assert_eq!(
                    (name.as_str(), field.as_str()),
                    ("t", "$.data.add_addresses.t")
                );
            }
            other => panic!("{other:?}"),
        }
        let mut p = patch(BTreeSet::from([n("10.0.0.2/32")]), BTreeSet::new());
        p.set_address_sets
            .insert("new".into(), BTreeSet::from([n("10.0.0.3/32")]));
        p.delete_address_sets = vec!["s".into(), "new".into()];
        let sets = plan(&cur, &p).unwrap();
        assert_eq!(sets, BTreeMap::from([("s".to_string(), SetPatch::Delete)]));
    }
}
