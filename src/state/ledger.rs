//! The records of commands that changed nothing (ping, state.sync, cert.request, failures
//! that changed nothing): appended to `records.log` with one `write` per batch of commands
//! and no fsync, and folded into the store now and then. A record in the page cache
//! survives the agent's crash (kill -9), which is what deduplication needs across
//! redeliveries; a power loss may take the newest of them, and then a redelivered ping is
//! answered anew instead of as a duplicate, which changes nothing either. A durable commit costs an fsync (about 0.5 ms
//! here), more than the rest of a ping's work.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};

use crate::protocol::Ack;

/// One line of the log.
#[derive(serde::Serialize, serde::Deserialize)]
struct Line {
    id: String,
    ack: Ack,
}

/// The log file and the records it holds since the last fold.
pub(super) struct Ledger {
    path: PathBuf,
    file: File,
    /// The bytes of whole records in the file: a write cut short (a full disk) is cut back
    /// to this, so that no record is left in part for the next one to be glued to (and
    /// lost at the next start), and none of a write whose commands were answered `failed`
    /// comes back.
    whole: u64,
    /// The file may hold more than `whole` (cutting it back failed): cut before writing.
    ragged: bool,
    recent: HashMap<String, Ack>,
    /// The ids in the order they were recorded (the store prunes oldest first).
    order: Vec<String>,
}

impl Ledger {
    /// Opens `dir/records.log` and reads the records it holds (a line cut short by a
    /// power loss is skipped).
    pub(super) fn open(dir: &Path) -> std::io::Result<Ledger> {
        use std::os::unix::fs::OpenOptionsExt;
        let path = dir.join("records.log");
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .read(true)
            .mode(0o600)
            .open(&path)?;
        let mut recent = HashMap::new();
        let mut order = Vec::new();
        let len = file.metadata()?.len();
        // The end of the last line read, had it ended in a newline.
        let (mut end, mut last) = (0, 0);
        for line in std::io::BufReader::new(&file).split(b'\n') {
            let line = line?;
            last = line.len() as u64;
            end += last + 1;
            match serde_json::from_slice::<Line>(&line) {
                Ok(l) => {
                    if recent.insert(l.id.clone(), l.ack).is_none() {
                        order.push(l.id);
                    }
                }
                Err(error) => {
                    tracing::warn!(path = %path.display(), %error, "skipping a record cut short");
                }
            }
        }
        // A last line without its newline was cut short: it is cut off before the next write.
        let ragged = end > len;
        Ok(Ledger {
            path,
            file,
            whole: if ragged { end - last - 1 } else { end },
            ragged,
            recent,
            order,
        })
    }

    /// Appends the records with one `write` (page cache, no fsync).
    pub(super) fn append<'a>(
        &mut self,
        records: impl Iterator<Item = (&'a str, &'a Ack)>,
    ) -> std::io::Result<()> {
        let mut lines = vec![];
        let mut added = vec![];
        for (id, ack) in records {
            let line = Line {
                id: id.to_string(),
                ack: ack.clone(),
            };
            serde_json::to_writer(&mut lines, &line).map_err(std::io::Error::other)?;
            lines.push(b'\n');
            added.push(line);
        }
        if self.ragged {
            self.file.set_len(self.whole)?;
            self.ragged = false;
        }
        if let Err(e) = self.file.write_all(&lines) {
            // None of these records is kept: their commands are answered `failed`.
            self.ragged = self.file.set_len(self.whole).is_err();
            return Err(e);
        }
        self.whole += lines.len() as u64;
        for Line { id, ack } in added {
            if self.recent.insert(id.clone(), ack).is_none() {
                self.order.push(id);
            }
        }
        Ok(())
    }

    pub(super) fn get(&self, id: &str) -> Option<&Ack> {
        self.recent.get(id)
    }

    pub(super) fn len(&self) -> usize {
        self.recent.len()
    }

    /// The records, oldest first.
    pub(super) fn records(&self) -> impl Iterator<Item = (&String, &Ack)> {
        self.order.iter().map(|id| (id, &self.recent[id]))
    }

    /// Empties the log once its records are durably in the store. A crash before this
    /// folds them again at the next start, which writes the same records once more.
    pub(super) fn clear(&mut self) -> std::io::Result<()> {
        self.file.set_len(0)?;
        self.file.sync_all()?;
        (self.whole, self.ragged) = (0, false);
        self.recent.clear();
        self.order.clear();
        Ok(())
    }

    pub(super) fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ack(id: &str) -> Ack {
        Ack::new(
            "h",
            Some(id.into()),
            None,
            crate::protocol::Status::Applied,
            None,
            serde_json::json!({}),
        )
    }

    #[test]
    fn records_fold_in_the_order_they_were_made() {
        // The store prunes the oldest records first: a fold must hand them over oldest
        // first, or a record newer than the ones kept could be pruned.
        let dir = tempfile::tempdir().unwrap();
        let ids: Vec<String> = (0..40).map(|i| format!("r{i}")).collect();
        {
            let mut l = Ledger::open(dir.path()).unwrap();
            let acks: Vec<Ack> = ids.iter().map(|id| ack(id)).collect();
            // In two writes: the order holds within and across them.
            let records: Vec<(&str, &Ack)> = ids.iter().map(String::as_str).zip(&acks).collect();
            l.append(records[..25].iter().copied()).unwrap();
            l.append(records[25..].iter().copied()).unwrap();
            let order: Vec<&String> = l.records().map(|(id, _)| id).collect();
            assert_eq!(order, ids.iter().collect::<Vec<_>>());
        }
        // And as read back after a restart.
        let l = Ledger::open(dir.path()).unwrap();
        let order: Vec<&String> = l.records().map(|(id, _)| id).collect();
        assert_eq!(order, ids.iter().collect::<Vec<_>>());
    }

    #[test]
    fn a_record_cut_short_is_cut_off_before_the_next_one_is_written() {
        // A power loss (or a write cut short whose cutting back failed) leaves part of a
        // record at the end: the next record must not be glued to it.
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (ack("a"), ack("b"));
        Ledger::open(dir.path())
            .unwrap()
            .append([("a", &a)].into_iter())
            .unwrap();
        let path = dir.path().join("records.log");
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        file.write_all(br#"{"id":"cut","ack":{"spec"#).unwrap();
        let mut l = Ledger::open(dir.path()).unwrap();
        assert_eq!(l.len(), 1);
        l.append([("b", &b)].into_iter()).unwrap();
        let l = Ledger::open(dir.path()).unwrap();
        let ids: Vec<&String> = l.records().map(|(id, _)| id).collect();
        assert_eq!(ids, ["a", "b"]);
    }
}
