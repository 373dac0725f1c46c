//! The command ids the database holds, kept in memory as hashes: a lookup of an id that is
//! not among them (every new command) needs no read of the database, so the pipeline
//! answers it without a trip to the blocking pool. Two ids may share a hash, so each hash
//! is counted; a shared hash only costs the read it would have cost anyway. The set changes
//! only after a transaction commits, so it never misses an id the database holds.

use std::collections::HashMap;
use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};

/// What one write transaction changed of the ids, applied once it commits.
#[derive(Debug, Default)]
pub(super) struct Written {
    added: Vec<u64>,
    removed: Vec<u64>,
}

impl Written {
    pub(super) fn added(&mut self, id: &str) {
        self.added.push(hash(id));
    }

    pub(super) fn removed(&mut self, id: &str) {
        self.removed.push(hash(id));
    }
}

#[derive(Debug, Default)]
pub(super) struct Known {
    counts: HashMap<u64, u32>,
}

/// A fixed hash (the same in every process), so that nothing depends on a random seed.
fn hash(id: &str) -> u64 {
    BuildHasherDefault::<DefaultHasher>::default().hash_one(id)
}

impl Known {
    pub(super) fn insert(&mut self, id: &str) {
        *self.counts.entry(hash(id)).or_default() += 1;
    }

    /// False only when the database does not hold `id`.
    pub(super) fn may_hold(&self, id: &str) -> bool {
        self.counts.contains_key(&hash(id))
    }

    pub(super) fn apply(&mut self, written: Written) {
        for h in written.added {
            *self.counts.entry(h).or_default() += 1;
        }
        for h in written.removed {
            if let Some(n) = self.counts.get_mut(&h) {
                *n -= 1;
                if *n == 0 {
                    self.counts.remove(&h);
                }
            }
        }
    }

    pub(super) fn len(&self) -> usize {
        self.counts.values().map(|&n| n as usize).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_shared_hash_stays_known_until_both_ids_are_gone() {
        let mut k = Known::default();
        k.insert("a");
        let mut w = Written::default();
        w.added("a"); // the same hash twice, as two ids that collide would give
        k.apply(w);
        assert!(k.may_hold("a") && !k.may_hold("b"));
        let mut w = Written::default();
        w.removed("a");
        k.apply(w);
        assert!(k.may_hold("a"), "one of the two is still held");
        let mut w = Written::default();
        w.removed("a");
        k.apply(w);
        assert!(!k.may_hold("a") && k.len() == 0);
    }
}
