//! Crash-safe local state: every processed command id with its ack, committed in the same
//! redb transaction as the state change the command caused, so a redelivery can never apply
//! twice. redb is copy-on-write with checksummed pages and fsyncs on commit.

use std::path::{Path, PathBuf};

use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};

use crate::protocol::Ack;

mod known;
pub mod ledger;

/// Records kept in the log before they are folded into the database.
const FOLD_AFTER: usize = 1024;

/// Bumped whenever the tables below change meaning; an agent refuses a newer store.
const SCHEMA_VERSION: u64 = 1;

/// command id -> (sequence number, stored ack JSON)
const PROCESSED: TableDefinition<&str, (u64, &[u8])> = TableDefinition::new("processed");
/// sequence number -> command id, oldest first, for pruning
const PROCESSED_ORDER: TableDefinition<u64, &str> = TableDefinition::new("processed_order");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
/// "snapshot" -> the applied rule set: the `firewall.apply` data as received, or canonical
/// JSON after a compaction (both decode to the same rule set).
const FIREWALL: TableDefinition<&str, &[u8]> = TableDefinition::new("firewall");
/// sequence -> `firewall.patch` data applied on top of the snapshot, in order.
const FIREWALL_JOURNAL: TableDefinition<u64, &[u8]> = TableDefinition::new("firewall_journal");
/// router id -> the applied router spec (canonical JSON).
const ROUTERS: TableDefinition<&str, &[u8]> = TableDefinition::new("routers");
/// router id -> when the agent first made kernel objects for it (ms). Written before the
/// first kernel change, so a crash half way leaves a namespace the agent knows it owns.
const ROUTERS_OWNED: TableDefinition<&str, u64> = TableDefinition::new("routers_owned");
/// sequence -> (when the event happened, ms; its type; its JSON): events made while no
/// session could take them (contract section 6), oldest first. Added 2026-12-02 (a store
/// without it gets it; an older agent ignores it).
const OUTBOX: TableDefinition<u64, (u64, &str, &[u8])> = TableDefinition::new("outbox");
/// META key: events the outbox dropped (too old, or over its bound) not yet reported.
const OUTBOX_DROPPED: &str = "outbox_dropped";

/// The state change a command made, committed together with its dedup record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// Nothing but the answer is kept (pings, reads, failures, no-ops).
    None,
    /// A whole rule set (canonical JSON) replaces the firewall state.
    FirewallReplace(String),
    /// A patch (its `data` JSON) goes on top of the current firewall state.
    FirewallPatch(String),
    /// Router `id` is now as `spec` (canonical JSON) says.
    RouterPut {
        /// The router's id.
        id: String,
        /// Its spec, canonical JSON.
        spec: String,
    },
    /// Router `id` is gone: neither wanted nor owned any more.
    RouterDelete(String),
}

/// A commit made without a write of its own ([`Store::commit_deferred`]): seen by lookups
/// at once, written by the next write transaction (in order, before that transaction's
/// own change), durable with it.
#[derive(Debug, Clone)]
struct Deferred {
    /// The store's epoch when it was made: a reopen since means it is gone.
    epoch: u64,
    id: String,
    ack: Ack,
    change: Change,
}

/// What the store knows of a command id without reading its database.
enum Remembered {
    /// A record not (yet) in the database: a light one, or a deferred commit.
    Ack(Box<Ack>),
    /// The database may hold it (a hash match).
    MaybeStored,
    /// Never processed (or pruned).
    Unknown,
}

/// An event kept in the outbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeptEvent {
    /// Its place in the outbox (published in this order).
    pub seq: u64,
    /// When it happened (ms since the epoch).
    pub at_ms: u64,
    /// The event type (`drift`, `stats`, `cert`).
    pub kind: String,
    /// The whole event (envelope and data), as it will be published.
    pub body: Vec<u8>,
}

/// The firewall as stored: a snapshot and the patches since, to be replayed in order.
#[derive(Debug, Default)]
pub struct StoredFirewall {
    /// The last full rule set (canonical JSON), if any.
    pub snapshot: Option<Vec<u8>>,
    /// The patches since (their `data` JSON), oldest first.
    pub journal: Vec<Vec<u8>>,
}

/// Every way the store fails; each is answered `failed` with `store_failed`.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// The state directory could not be made.
    #[error("cannot create state directory {path}: {cause}")]
    Dir {
        /// The directory.
        path: PathBuf,
        /// Why.
        cause: std::io::Error,
    },
    /// The database could not be opened.
    #[error("state store {path}: {cause}")]
    Open {
        /// The database file.
        path: PathBuf,
        /// Why.
        cause: redb::DatabaseError,
    },
    /// The database was written by a newer agent.
    #[error("state store schema {found} is newer than this agent understands ({SCHEMA_VERSION})")]
    Schema {
        /// The schema version it holds.
        found: u64,
    },
    /// A read or a write of the database failed.
    #[error("state store: {0}")]
    Db(redb::Error),
    /// A stored ack does not parse.
    #[error("state store holds an ack that does not parse: {0}")]
    Corrupt(serde_json::Error),
    /// Records made before a reopen were lost with it.
    #[error("state store was reopened after an I/O error before its last commits were synced")]
    Unsynced,
    /// The record log could not be read or written.
    #[error("state store record log {path}: {cause}")]
    Ledger {
        /// The log file.
        path: PathBuf,
        /// Why.
        cause: std::io::Error,
    },
}

macro_rules! db_err {
    ($($t:ty),*) => {$(
        impl From<$t> for StateError {
            fn from(e: $t) -> Self { StateError::Db(e.into()) }
        }
    )*};
}
db_err!(
    redb::Error,
    redb::SetDurabilityError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);

#[cfg(test)]
mod firewall_tests {
    use super::*;
    use crate::protocol::Status;

    #[test]
    fn snapshot_and_journal_commit_with_the_ack() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path(), 10_000).unwrap();
        let ack = Ack::new(
            "h",
            Some("a".into()),
            None,
            Status::Applied,
            None,
            serde_json::json!({}),
        );
        s.commit(
            "a",
            &ack,
            &Change::FirewallReplace("{\"generation\":1}".into()),
        )
        .unwrap();
        s.commit("b", &ack, &Change::FirewallPatch("{\"p\":1}".into()))
            .unwrap();
        s.commit("c", &ack, &Change::FirewallPatch("{\"p\":2}".into()))
            .unwrap();
        let fw = s.load_firewall().unwrap();
        assert_eq!(fw.snapshot.as_deref(), Some(&b"{\"generation\":1}"[..]));
        assert_eq!(
            fw.journal,
            vec![b"{\"p\":1}".to_vec(), b"{\"p\":2}".to_vec()]
        );
        s.compact_firewall("{\"generation\":3}", s.epoch()).unwrap();
        s.own_router("lr1").unwrap();
        s.own_router("lr2").unwrap();
        s.commit(
            "d",
            &ack,
            &Change::RouterPut {
                id: "lr1".into(),
                spec: "{}".into(),
            },
        )
        .unwrap();
        s.disown_router("lr1").unwrap();
        s.disown_router("lr2").unwrap();
        assert_eq!(s.owned_routers().unwrap(), vec!["lr1".to_string()]);
        assert_eq!(s.load_routers().unwrap().len(), 1);
        s.commit("e", &ack, &Change::RouterDelete("lr1".into()))
            .unwrap();
        assert!(s.owned_routers().unwrap().is_empty());
        assert!(s.load_routers().unwrap().is_empty());
        let fw = s.load_firewall().unwrap();
        assert!(fw.journal.is_empty());
        assert!(s.lookup("c").unwrap().is_some());
    }
}

/// The crash-safe store (redb, one file): the record of every processed command id, the
/// firewall snapshot and journal, the owned routers, the outbox; beside it, the record log
/// of commands that changed nothing.
pub struct Store {
    /// `None` only while it is being reopened.
    db: std::sync::RwLock<Option<Database>>,
    keep: usize,
    path: PathBuf,
    /// Records of commands that changed nothing, not yet folded into the database.
    ledger: std::sync::Mutex<ledger::Ledger>,
    /// Counts reopens: commits not yet synced before a reopen are gone.
    epoch: std::sync::atomic::AtomicU64,
    /// Commits waiting for the next write transaction, oldest first.
    deferred: std::sync::Mutex<Vec<Deferred>>,
    /// Records of commands that changed nothing, waiting for the next sync to go into the
    /// record log (one `write` for a batch), oldest first.
    light: std::sync::Mutex<Vec<Deferred>>,
    /// Held by whoever writes the waiting records (a sync, a durable commit, a
    /// compaction), for the whole write: the lists themselves are locked only to copy what
    /// waits and, once it is written, to take it out, so that commands and lookups never
    /// wait for an fsync, while each record is written once and stays visible until then.
    writer: std::sync::Mutex<()>,
    /// The ids in the database (see `known`).
    known: std::sync::Mutex<known::Known>,
    /// Patches in the database's journal.
    journal: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("path", &self.path).finish()
    }
}

/// redb's page cache; its default (1 GiB) let a 3 MB firewall snapshot and the records read
/// for deduplication stay in the agent's memory. The store is written far more than read.
const CACHE_BYTES: usize = 4 << 20;

fn open_db(path: &Path) -> Result<Database, StateError> {
    redb::Builder::new()
        .set_cache_size(CACHE_BYTES)
        .create(path)
        .map_err(|cause| StateError::Open {
            path: path.to_path_buf(),
            cause,
        })
}

impl Store {
    /// Opens (or creates) `state_dir/state.redb`, keeping at least `keep` command ids.
    pub fn open(state_dir: &Path, keep: usize) -> Result<Store, StateError> {
        std::fs::create_dir_all(state_dir).map_err(|cause| StateError::Dir {
            path: state_dir.to_path_buf(),
            cause,
        })?;
        restrict_dir(state_dir);
        let path = state_dir.join("state.redb");
        let db = open_db(&path)?;
        let ledger = ledger::Ledger::open(state_dir).map_err(|cause| StateError::Ledger {
            path: state_dir.join("records.log"),
            cause,
        })?;
        let store = Store {
            db: std::sync::RwLock::new(Some(db)),
            keep,
            path,
            ledger: std::sync::Mutex::new(ledger),
            epoch: Default::default(),
            deferred: Default::default(),
            light: Default::default(),
            writer: Default::default(),
            known: Default::default(),
            journal: Default::default(),
        };
        store.init_schema()?;
        store.load_known()?;
        // What the log kept across a stop or crash goes into the database now.
        store.fold()?;
        Ok(store)
    }

    fn init_schema(&self) -> Result<(), StateError> {
        let tx = self.write_tx()?;
        {
            let mut meta = tx.open_table(META)?;
            let found = meta.get("schema_version")?.map(|g| g.value());
            match found {
                Some(v) if v > SCHEMA_VERSION => return Err(StateError::Schema { found: v }),
                Some(_) => {}
                None => {
                    meta.insert("schema_version", SCHEMA_VERSION)?;
                }
            }
            tx.open_table(PROCESSED)?;
            tx.open_table(PROCESSED_ORDER)?;
            tx.open_table(FIREWALL)?;
            tx.open_table(FIREWALL_JOURNAL)?;
            tx.open_table(ROUTERS)?;
            tx.open_table(ROUTERS_OWNED)?;
            tx.open_table(OUTBOX)?;
        }
        tx.commit()?;
        Ok(())
    }

    /// The ids and the journal length the database holds, into memory.
    fn load_known(&self) -> Result<(), StateError> {
        let tx = self.read_tx()?;
        let mut known = self.known.lock().expect("known lock");
        for entry in tx.open_table(PROCESSED)?.iter()? {
            known.insert(entry?.0.value());
        }
        let journal = tx.open_table(FIREWALL_JOURNAL)?.len()?;
        self.journal
            .store(journal, std::sync::atomic::Ordering::SeqCst);
        Ok(())
    }

    /// A write transaction. After a failed write (a full disk) redb refuses every further
    /// one until the database is opened again: the store reopens it once and retries, so
    /// the agent recovers by itself when the space comes back.
    fn write_tx(&self) -> Result<redb::WriteTransaction, StateError> {
        match self.with_db(|db| db.begin_write()) {
            Err(StateError::Db(redb::Error::PreviousIo)) => {
                self.reopen()?;
                self.with_db(|db| db.begin_write())
            }
            other => other,
        }
    }

    fn read_tx(&self) -> Result<redb::ReadTransaction, StateError> {
        match self.with_db(|db| db.begin_read()) {
            Err(StateError::Db(redb::Error::PreviousIo)) => {
                self.reopen()?;
                self.with_db(|db| db.begin_read())
            }
            other => other,
        }
    }

    fn with_db<T>(
        &self,
        f: impl FnOnce(&Database) -> Result<T, redb::TransactionError>,
    ) -> Result<T, StateError> {
        let guard = self.db.read().expect("store lock");
        match guard.as_ref() {
            Some(db) => Ok(f(db)?),
            None => Err(StateError::Db(redb::Error::PreviousIo)),
        }
    }

    /// Closes and opens the database file again (redb's recovery after an I/O error).
    fn reopen(&self) -> Result<(), StateError> {
        let mut guard = self.db.write().expect("store lock");
        // Dropped first: redb holds a lock on the file while it is open.
        *guard = None;
        tracing::warn!(path = %self.path.display(), "reopening the state store after an I/O error");
        let db = open_db(&self.path)?;
        *guard = Some(db);
        self.epoch.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Ok(())
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The ack stored for a command id, if that id was processed.
    pub fn lookup(&self, id: &str) -> Result<Option<Ack>, StateError> {
        match self.remembered(id) {
            Remembered::Ack(ack) => return Ok(Some(*ack)),
            Remembered::Unknown => return Ok(None),
            Remembered::MaybeStored => {}
        }
        let tx = self.read_tx()?;
        let table = tx.open_table(PROCESSED)?;
        let Some(guard) = table.get(id)? else {
            return Ok(None);
        };
        let (_, bytes) = guard.value();
        serde_json::from_slice(bytes)
            .map(Some)
            .map_err(StateError::Corrupt)
    }

    /// Records `ack` as the outcome of command `id`, durably, in one transaction. The oldest
    /// records beyond the retention are pruned in the same commit.
    pub fn record(&self, id: &str, ack: &Ack) -> Result<(), StateError> {
        self.commit(id, ack, &Change::None)
    }

    /// False only when `id` was certainly not processed: answered from memory, without
    /// reading the database (which [`Store::lookup`] may need).
    pub fn may_have(&self, id: &str) -> bool {
        !matches!(self.remembered(id), Remembered::Unknown)
    }

    /// What memory alone says of `id`: the records waiting to be written, the log, then the
    /// ids the database holds. A waiting record is checked before the log or database it
    /// moves to, and leaves the waiting lists only once it is there.
    fn remembered(&self, id: &str) -> Remembered {
        if let Some((_, ack)) = self.waiting(id) {
            return Remembered::Ack(Box::new(ack));
        }
        if let Some(ack) = self.ledger.lock().expect("ledger lock").get(id) {
            return Remembered::Ack(Box::new(ack.clone()));
        }
        if self.known.lock().expect("known lock").may_hold(id) {
            Remembered::MaybeStored
        } else {
            Remembered::Unknown
        }
    }

    /// The record of `id` waiting to be written (light or deferred) in the current epoch,
    /// with that epoch.
    fn waiting(&self, id: &str) -> Option<(u64, Ack)> {
        let epoch = self.epoch();
        [&self.light, &self.deferred].into_iter().find_map(|list| {
            let list = list.lock().expect("deferred lock");
            list.iter()
                .find(|d| d.epoch == epoch && d.id == id)
                .map(|d| (epoch, d.ack.clone()))
        })
    }

    /// The epoch to hand to [`Store::sync`] while `id`'s record waits to be written (it is
    /// light or deferred), `None` once it is written or when there is none. A duplicate
    /// answered from a waiting record must wait for the same sync as the original's.
    pub fn unsynced(&self, id: &str) -> Option<u64> {
        self.waiting(id).map(|(epoch, _)| epoch)
    }

    /// Counts the reopens of the database (after I/O errors): what was made in memory
    /// against an earlier epoch may be missing from the store.
    pub fn epoch(&self) -> u64 {
        self.epoch.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Writes the light records of this epoch to the record log with one `write` and no
    /// fsync (see [`ledger`]), folding the log into the database once it is full. The
    /// caller holds `writer`.
    fn write_light(&self) -> Result<(), StateError> {
        let batch = waiting_in(&self.light, self.epoch());
        if batch.is_empty() {
            return Ok(());
        }
        let mut ledger = self.ledger.lock().expect("ledger lock");
        let records = batch.iter().map(|d| (d.id.as_str(), &d.ack));
        ledger.append(records).map_err(|cause| StateError::Ledger {
            path: ledger.path().to_path_buf(),
            cause,
        })?;
        // In the log now (looked up after this list): out of the list.
        written_from(&self.light, batch.len());
        if ledger.len() >= FOLD_AFTER {
            drop(ledger);
            self.fold()?;
        }
        Ok(())
    }

    /// Moves the log's records into the database, in one durable transaction, then empties
    /// the log. The log is not held while the database is written: lookups (every
    /// command's dedup, on an async worker) read it meanwhile, and find each record there
    /// until it is in the database. Nothing is appended meanwhile: appends and folds are
    /// made under `writer` (or at open, alone).
    fn fold(&self) -> Result<(), StateError> {
        let records: Vec<(String, Vec<u8>)> = {
            let ledger = self.ledger.lock().expect("ledger lock");
            (ledger.records())
                .map(|(id, ack)| (id.clone(), ack.to_json()))
                .collect()
        };
        if records.is_empty() {
            return Ok(());
        }
        let tx = self.write_tx()?;
        let mut written = known::Written::default();
        for (id, ack) in &records {
            self.insert_record(&tx, id, ack, &mut written)?;
        }
        tx.commit()?;
        // Out of the log and into the database's ids at once (for `processed_count`).
        let mut ledger = self.ledger.lock().expect("ledger lock");
        self.known.lock().expect("known lock").apply(written);
        ledger.clear().map_err(|cause| StateError::Ledger {
            path: ledger.path().to_path_buf(),
            cause,
        })
    }

    /// Records `ack` for command `id` and the state change it made, atomically and durably
    /// (with every deferred commit before it).
    pub fn commit(&self, id: &str, ack: &Ack, change: &Change) -> Result<(), StateError> {
        self.write_after_deferred(|tx, written| {
            Self::apply(tx, change)?;
            self.insert_record(tx, id, &ack.to_json(), written)
        })
    }

    /// As [`Store::commit`], but neither written nor synced yet: later lookups see it at
    /// once, and it is written by the next [`Store::sync`] (a change also by any write
    /// transaction, ahead of that transaction's own change). For the commands of one
    /// batch, whose acks wait for one sync together: N records cost one transaction and
    /// one fsync, not N; those of commands that changed nothing (`Change::None`) go to the
    /// record log with one `write` and no fsync. A crash before the sync loses them, as it
    /// would a commit without an fsync (their acks were not published yet).
    ///
    /// `epoch` is the store's epoch that the change was made against (see
    /// [`Store::epoch`]): if the store was reopened since, the record is dropped and the
    /// sync says so. Returns the epoch to compare with what `sync` returns.
    pub fn commit_deferred(&self, epoch: u64, id: &str, ack: &Ack, change: Change) -> u64 {
        let list = match change {
            Change::None => &self.light,
            _ => &self.deferred,
        };
        list.lock().expect("deferred lock").push(Deferred {
            epoch,
            id: id.to_string(),
            ack: ack.clone(),
            change,
        });
        epoch
    }

    /// Writes every record deferred in the current epoch: the light ones to the record log,
    /// the commits in one transaction with one fsync (none when there are none). Returns
    /// that epoch: records deferred in another one are gone (the database was reopened
    /// after an I/O error), as is everything when this fails. After a failure the store
    /// holds only what reached the disk.
    pub fn sync(&self) -> Result<u64, StateError> {
        let writer = self.writer.lock().expect("writer lock");
        let epoch = self.epoch();
        let pending = self
            .deferred
            .lock()
            .expect("deferred lock")
            .iter()
            .any(|d| d.epoch == epoch);
        let written = self.write_light().and_then(|()| {
            // A write transaction is durable unless told otherwise.
            match pending {
                true => self.write_deferred(|_, _| Ok(())),
                false => Ok(()),
            }
        });
        drop(writer);
        if let Err(e) = written {
            // Reads would still see what never reached the disk: from now on the store is
            // what the files hold, and what waited is gone with the reopen.
            if let Err(reopen) = self.reopen() {
                tracing::error!(error = %reopen, "could not reopen the state store");
            }
            return Err(e);
        }
        if self.epoch() != epoch {
            return Err(StateError::Unsynced);
        }
        Ok(epoch)
    }

    /// One durable write transaction: the deferred commits of this epoch first, in order,
    /// then `f`'s own change. Deferred commits of an earlier epoch (before a reopen) are
    /// dropped; the current ones stay deferred if the transaction fails.
    fn write_after_deferred(
        &self,
        f: impl FnOnce(&redb::WriteTransaction, &mut known::Written) -> Result<(), StateError>,
    ) -> Result<(), StateError> {
        let _writer = self.writer.lock().expect("writer lock");
        self.write_deferred(f)
    }

    /// [`Store::write_after_deferred`] for a caller that holds `writer`.
    fn write_deferred(
        &self,
        f: impl FnOnce(&redb::WriteTransaction, &mut known::Written) -> Result<(), StateError>,
    ) -> Result<(), StateError> {
        let batch = waiting_in(&self.deferred, self.epoch());
        let tx = self.write_tx()?;
        let mut written = known::Written::default();
        for d in &batch {
            Self::apply(&tx, &d.change)?;
            self.insert_record(&tx, &d.id, &d.ack.to_json(), &mut written)?;
        }
        f(&tx, &mut written)?;
        let journal = tx.open_table(FIREWALL_JOURNAL)?.len()?;
        tx.commit()?;
        // In the database and its ids now (looked up after this list): out of the list.
        self.known.lock().expect("known lock").apply(written);
        written_from(&self.deferred, batch.len());
        self.journal
            .store(journal, std::sync::atomic::Ordering::SeqCst);
        Ok(())
    }

    /// The state part of a commit.
    fn apply(tx: &redb::WriteTransaction, change: &Change) -> Result<(), StateError> {
        match change {
            Change::None => {}
            Change::FirewallReplace(snapshot) => {
                tx.open_table(FIREWALL)?
                    .insert("snapshot", snapshot.as_bytes())?;
                tx.delete_table(FIREWALL_JOURNAL)?;
                tx.open_table(FIREWALL_JOURNAL)?;
            }
            Change::FirewallPatch(data) => {
                let mut journal = tx.open_table(FIREWALL_JOURNAL)?;
                let next = journal.last()?.map(|(k, _)| k.value() + 1).unwrap_or(0);
                journal.insert(next, data.as_bytes())?;
            }
            Change::RouterPut { id, spec } => {
                tx.open_table(ROUTERS)?
                    .insert(id.as_str(), spec.as_bytes())?;
                let mut owned = tx.open_table(ROUTERS_OWNED)?;
                if owned.get(id.as_str())?.is_none() {
                    owned.insert(id.as_str(), crate::ids::now_ms())?;
                }
            }
            Change::RouterDelete(id) => {
                tx.open_table(ROUTERS)?.remove(id.as_str())?;
                tx.open_table(ROUTERS_OWNED)?.remove(id.as_str())?;
            }
        }
        Ok(())
    }

    /// Adds one command record in `tx`, pruning the oldest beyond the retention.
    fn insert_record(
        &self,
        tx: &redb::WriteTransaction,
        id: &str,
        bytes: &[u8],
        written: &mut known::Written,
    ) -> Result<(), StateError> {
        let mut meta = tx.open_table(META)?;
        let seq = meta.get("next_seq")?.map(|g| g.value()).unwrap_or(0);
        meta.insert("next_seq", seq + 1)?;
        let mut processed = tx.open_table(PROCESSED)?;
        let mut order = tx.open_table(PROCESSED_ORDER)?;
        if let Some(old) = processed.insert(id, (seq, bytes))? {
            let (old_seq, _) = old.value();
            order.remove(old_seq)?;
        } else {
            written.added(id);
        }
        order.insert(seq, id)?;
        // Prune in batches so that the common commit touches only its own record.
        let len = processed.len()? as usize;
        if len > self.keep + self.keep / 10 {
            for _ in 0..(len - self.keep) {
                let Some((_, old_id)) = order.pop_first()? else {
                    break;
                };
                processed.remove(old_id.value())?;
                written.removed(old_id.value());
            }
        }
        Ok(())
    }

    /// The stored firewall: snapshot and journal.
    pub fn load_firewall(&self) -> Result<StoredFirewall, StateError> {
        let tx = self.read_tx()?;
        let snapshot = tx
            .open_table(FIREWALL)?
            .get("snapshot")?
            .map(|g| g.value().to_vec());
        let journal = tx
            .open_table(FIREWALL_JOURNAL)?
            .iter()?
            .map(|e| e.map(|(_, v)| v.value().to_vec()))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(StoredFirewall { snapshot, journal })
    }

    /// Patches in the journal, deferred ones included (from memory).
    pub fn journal_len(&self) -> u64 {
        let deferred = self.deferred.lock().expect("deferred lock");
        let epoch = self.epoch();
        let mut len = self.journal.load(std::sync::atomic::Ordering::SeqCst);
        for d in deferred.iter().filter(|d| d.epoch == epoch) {
            match d.change {
                Change::FirewallReplace(_) => len = 0,
                Change::FirewallPatch(_) => len += 1,
                _ => {}
            }
        }
        len
    }

    /// Folds the journal into a new snapshot of the same state (no command attached); the
    /// deferred commits, which the snapshot includes, are written first. `epoch` is the
    /// one the snapshot was taken in: after a reopen since, it may hold patches whose
    /// records are gone, and nothing is written.
    pub fn compact_firewall(&self, snapshot: &str, epoch: u64) -> Result<(), StateError> {
        self.write_after_deferred(|tx, _| {
            if self.epoch() != epoch {
                return Err(StateError::Unsynced);
            }
            Self::apply(tx, &Change::FirewallReplace(snapshot.to_string()))
        })
    }

    /// The recorded routers: id and spec JSON.
    pub fn load_routers(&self) -> Result<Vec<(String, Vec<u8>)>, StateError> {
        let tx = self.read_tx()?;
        tx.open_table(ROUTERS)?
            .iter()?
            .map(|e| {
                e.map(|(k, v)| (k.value().to_string(), v.value().to_vec()))
                    .map_err(StateError::from)
            })
            .collect()
    }

    /// Router ids the agent owns (recorded, or being created).
    pub fn owned_routers(&self) -> Result<Vec<String>, StateError> {
        let tx = self.read_tx()?;
        tx.open_table(ROUTERS_OWNED)?
            .iter()?
            .map(|e| {
                e.map(|(k, _)| k.value().to_string())
                    .map_err(StateError::from)
            })
            .collect()
    }

    /// Records, durably, that the agent is about to make kernel objects for router `id`.
    pub fn own_router(&self, id: &str) -> Result<(), StateError> {
        let tx = self.write_tx()?;
        tx.open_table(ROUTERS_OWNED)?
            .insert(id, crate::ids::now_ms())?;
        tx.commit()?;
        Ok(())
    }

    /// Forgets an owned router that is not wanted (its kernel objects are gone).
    pub fn disown_router(&self, id: &str) -> Result<(), StateError> {
        let tx = self.write_tx()?;
        if tx.open_table(ROUTERS)?.get(id)?.is_none() {
            tx.open_table(ROUTERS_OWNED)?.remove(id)?;
        }
        tx.commit()?;
        Ok(())
    }

    /// Keeps an event until it is published: appended last, then the oldest are dropped
    /// (and counted) while the outbox holds more than `max_bytes` or more than
    /// `max_events`. Returns how many this push dropped.
    pub fn outbox_push(
        &self,
        at_ms: u64,
        kind: &str,
        event: &[u8],
        max_bytes: u64,
        max_events: u64,
    ) -> Result<u64, StateError> {
        let tx = self.write_tx()?;
        let dropped;
        {
            let mut t = tx.open_table(OUTBOX)?;
            let next = t.last()?.map_or(0, |(k, _)| k.value() + 1);
            t.insert(next, (at_ms, kind, event))?;
            let mut sizes = vec![];
            for e in t.iter()? {
                let (k, v) = e?;
                sizes.push((k.value(), v.value().2.len() as u64));
            }
            let mut total: u64 = sizes.iter().map(|(_, n)| n).sum();
            let mut count = sizes.len() as u64;
            let mut gone = 0;
            for (k, n) in sizes {
                if total <= max_bytes && count <= max_events {
                    break;
                }
                t.remove(k)?;
                total -= n;
                count -= 1;
                gone += 1;
            }
            dropped = gone;
            if gone > 0 {
                let mut meta = tx.open_table(META)?;
                let before = meta.get(OUTBOX_DROPPED)?.map_or(0, |g| g.value());
                meta.insert(OUTBOX_DROPPED, before + gone)?;
            }
        }
        tx.commit()?;
        Ok(dropped)
    }

    /// The oldest `limit` kept events.
    pub fn outbox_peek(&self, limit: usize) -> Result<Vec<KeptEvent>, StateError> {
        let tx = self.read_tx()?;
        let t = tx.open_table(OUTBOX)?;
        let mut out = vec![];
        for e in t.iter()?.take(limit) {
            let (k, v) = e?;
            let (at_ms, kind, body) = v.value();
            out.push(KeptEvent {
                seq: k.value(),
                at_ms,
                kind: kind.to_string(),
                body: body.to_vec(),
            });
        }
        Ok(out)
    }

    /// Removes published events (and, with `dropped` > 0, counts events dropped unsent).
    pub fn outbox_remove(&self, seqs: &[u64], dropped: u64) -> Result<(), StateError> {
        let tx = self.write_tx()?;
        {
            let mut t = tx.open_table(OUTBOX)?;
            for s in seqs {
                t.remove(*s)?;
            }
            if dropped > 0 {
                let mut meta = tx.open_table(META)?;
                let before = meta.get(OUTBOX_DROPPED)?.map_or(0, |g| g.value());
                meta.insert(OUTBOX_DROPPED, before + dropped)?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// Events kept, and dropped but not yet reported.
    pub fn outbox_counts(&self) -> Result<(u64, u64), StateError> {
        let tx = self.read_tx()?;
        let kept = tx.open_table(OUTBOX)?.len()?;
        let dropped = tx
            .open_table(META)?
            .get(OUTBOX_DROPPED)?
            .map_or(0, |g| g.value());
        Ok((kept, dropped))
    }

    /// Takes back `n` from the dropped count once a `state` event reported them.
    pub fn outbox_reported(&self, n: u64) -> Result<(), StateError> {
        let tx = self.write_tx()?;
        {
            let mut meta = tx.open_table(META)?;
            let before = meta.get(OUTBOX_DROPPED)?.map_or(0, |g| g.value());
            meta.insert(OUTBOX_DROPPED, before.saturating_sub(n))?;
        }
        tx.commit()?;
        Ok(())
    }

    /// How many processed command ids are held.
    pub fn processed_count(&self) -> Result<u64, StateError> {
        // The log's lock is held while the database's ids are counted: a fold moves its
        // records from one to the other under it.
        let ledger = self.ledger.lock().expect("ledger lock");
        let logged = ledger.len() as u64;
        let stored = self.known.lock().expect("known lock").len() as u64;
        drop(ledger);
        let epoch = self.epoch();
        let waiting = |list: &std::sync::Mutex<Vec<Deferred>>| {
            let list = list.lock().expect("deferred lock");
            list.iter().filter(|d| d.epoch == epoch).count() as u64
        };
        let light = logged + waiting(&self.light);
        let deferred = waiting(&self.deferred);
        Ok(stored + light + deferred)
    }
}

/// The records of `epoch` waiting in `list` (those of an earlier one are dropped: a reopen
/// lost them), copied out so that the write runs without the list's lock.
fn waiting_in(list: &std::sync::Mutex<Vec<Deferred>>, epoch: u64) -> Vec<Deferred> {
    let mut list = list.lock().expect("deferred lock");
    list.retain(|d| d.epoch == epoch);
    list.clone()
}

/// Takes the first `n` records, now written, out of `list`. Only the holder of the store's
/// `writer` lock removes records and others only append, so they are the ones it copied.
fn written_from(list: &std::sync::Mutex<Vec<Deferred>>, n: usize) {
    let mut list = list.lock().expect("deferred lock");
    let n = n.min(list.len());
    list.drain(..n);
}

/// The state directory holds private material later on (keys): owner only.
fn restrict_dir(dir: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Err(e) = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)) {
        tracing::warn!(dir = %dir.display(), error = %e, "cannot restrict state directory to 0700");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::Status;

    fn ack(id: &str) -> Ack {
        Ack::new(
            "h",
            Some(id.into()),
            Some("ping".into()),
            Status::Applied,
            None,
            serde_json::json!({}),
        )
    }

    /// A record of a command that changed nothing, as a batch of one writes it.
    fn light(s: &Store, id: &str) {
        let epoch = s.commit_deferred(s.epoch(), id, &ack(id), Change::None);
        assert_eq!(s.sync().unwrap(), epoch);
    }

    #[test]
    fn light_records_are_seen_at_once_kept_across_a_restart_and_folded() {
        let dir = tempfile::tempdir().unwrap();
        let log_len = || {
            std::fs::metadata(dir.path().join("records.log"))
                .unwrap()
                .len()
        };
        {
            let s = Store::open(dir.path(), 100).unwrap();
            let epoch = s.commit_deferred(s.epoch(), "p1", &ack("p1"), Change::None);
            s.commit_deferred(s.epoch(), "p2", &ack("p2"), Change::None);
            assert!(s.lookup("p2").unwrap().is_some(), "seen before the sync");
            assert_eq!(log_len(), 0, "written only by the batch's sync");
            assert_eq!(s.sync().unwrap(), epoch);
            assert_eq!(
                s.lookup("p1").unwrap().unwrap().correlation_id.as_deref(),
                Some("p1")
            );
            assert_eq!(s.processed_count().unwrap(), 2);
            // Dropped without any fold or durable commit, as a crash would leave it.
        }
        assert!(log_len() > 0);
        let s = Store::open(dir.path(), 100).unwrap();
        assert!(s.lookup("p1").unwrap().is_some() && s.lookup("p2").unwrap().is_some());
        assert_eq!(s.processed_count().unwrap(), 2);
        // Folded into the database at open: the log is empty again.
        assert_eq!(log_len(), 0);
        for i in 0..FOLD_AFTER + 5 {
            light(&s, &format!("q{i}"));
        }
        assert_eq!(s.ledger.lock().unwrap().len(), 5, "folded once full");
        // Retention holds across the fold: at most keep + keep / 10 records.
        assert!(s.processed_count().unwrap() <= 110 + 5);
    }

    #[test]
    fn lookups_do_not_wait_for_a_fold_writing_the_database() {
        // Every command's dedup looks in the record log, on an async worker: a fold must
        // not hold the log while it writes (and fsyncs) the database. Here the database
        // is held by another write transaction, so the fold waits inside its write.
        let dir = tempfile::tempdir().unwrap();
        let s = std::sync::Arc::new(Store::open(dir.path(), 100_000).unwrap());
        for i in 0..FOLD_AFTER - 1 {
            s.commit_deferred(s.epoch(), &format!("f{i}"), &ack("f"), Change::None);
        }
        s.sync().unwrap();
        s.commit_deferred(s.epoch(), "last", &ack("last"), Change::None);
        let held = s.write_tx().unwrap();
        let folding = {
            let s = s.clone();
            std::thread::spawn(move || s.sync().map(|_| ()))
        };
        // The last record is in the log, and the fold begins.
        while s.waiting("last").is_some() {
            std::thread::yield_now();
        }
        // Give a fold that keeps the log locked the chance to take it.
        for _ in 0..1000 {
            if matches!(
                s.ledger.try_lock(),
                Err(std::sync::TryLockError::WouldBlock)
            ) {
                break;
            }
            std::thread::sleep(std::time::Duration::from_micros(100));
        }
        let (tx, rx) = std::sync::mpsc::channel();
        let looking = {
            let s = s.clone();
            std::thread::spawn(move || tx.send(s.may_have("f1")).unwrap())
        };
        // Not a timer on speed: a bound on waiting for ever.
        let found = rx.recv_timeout(std::time::Duration::from_secs(10));
        let fold_still_waiting = !folding.is_finished();
        drop(held);
        folding.join().unwrap().unwrap();
        looking.join().unwrap();
        assert_eq!(found, Ok(true), "a lookup waited for the fold's write");
        assert!(fold_still_waiting, "the lookup ran while the fold waited");
        assert_eq!(s.ledger.lock().unwrap().len(), 0, "folded");
        assert!(s.lookup("f1").unwrap().is_some() && s.lookup("last").unwrap().is_some());
    }

    #[test]
    fn deferred_commits_are_seen_at_once_and_kept_after_a_sync() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = Store::open(dir.path(), 100).unwrap();
            let epoch = s.commit_deferred(
                s.epoch(),
                "a",
                &ack("a"),
                Change::FirewallPatch("{\"p\":1}".into()),
            );
            s.commit_deferred(
                s.epoch(),
                "b",
                &ack("b"),
                Change::FirewallPatch("{\"p\":2}".into()),
            );
            assert!(s.lookup("a").unwrap().is_some(), "seen before the sync");
            assert_eq!(s.journal_len(), 2);
            assert_eq!(s.sync().unwrap(), epoch);
        }
        let s = Store::open(dir.path(), 100).unwrap();
        assert!(s.lookup("a").unwrap().is_some() && s.lookup("b").unwrap().is_some());
        assert_eq!(s.journal_len(), 2);
    }

    #[test]
    fn deferred_commits_go_first_in_the_next_write_and_are_lost_without_one() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = Store::open(dir.path(), 100).unwrap();
            s.commit_deferred(
                s.epoch(),
                "p1",
                &ack("p1"),
                Change::FirewallPatch("{\"p\":1}".into()),
            );
            assert_eq!(s.processed_count().unwrap(), 1);
            // A durable commit writes the deferred one first: the journal keeps their order.
            s.commit("p2", &ack("p2"), &Change::FirewallPatch("{\"p\":2}".into()))
                .unwrap();
            let journal = s.load_firewall().unwrap().journal;
            assert_eq!(journal, vec![b"{\"p\":1}".to_vec(), b"{\"p\":2}".to_vec()]);
            // A compaction's snapshot includes the deferred patches: they are written (their
            // records kept) and folded with the rest.
            s.commit_deferred(
                s.epoch(),
                "p3",
                &ack("p3"),
                Change::FirewallPatch("{\"p\":3}".into()),
            );
            assert_eq!(s.journal_len(), 3);
            s.compact_firewall("{\"generation\":4}", s.epoch()).unwrap();
            assert_eq!(s.journal_len(), 0);
            assert!(s.lookup("p3").unwrap().is_some());
            // Left deferred when the agent dies: gone, like its unpublished ack.
            s.commit_deferred(
                s.epoch(),
                "p4",
                &ack("p4"),
                Change::FirewallPatch("{\"p\":4}".into()),
            );
            assert!(s.lookup("p4").unwrap().is_some());
        }
        let s = Store::open(dir.path(), 100).unwrap();
        assert!(s.lookup("p3").unwrap().is_some());
        assert!(s.lookup("p4").unwrap().is_none());
        let fw = s.load_firewall().unwrap();
        assert_eq!(fw.snapshot.as_deref(), Some(&b"{\"generation\":4}"[..]));
        assert!(fw.journal.is_empty());
        assert_eq!(s.processed_count().unwrap(), 3);
    }

    /// The database itself, past every in-memory shortcut.
    fn db_has(s: &Store, id: &str) -> bool {
        let tx = s.read_tx().unwrap();
        tx.open_table(PROCESSED).unwrap().get(id).unwrap().is_some()
    }

    #[test]
    fn the_ids_in_memory_never_miss_one_the_database_holds() {
        let dir = tempfile::tempdir().unwrap();
        let ids: Vec<String> = (0..400).map(|i| format!("c{i}")).collect();
        let check = |s: &Store| {
            for id in &ids {
                if db_has(s, id) {
                    assert!(s.may_have(id), "{id} is stored but unknown");
                    assert!(s.lookup(id).unwrap().is_some(), "{id}");
                }
            }
        };
        {
            // Light records folded, durable commits, deferred ones synced, all pruned
            // beyond a retention of 50.
            let s = Store::open(dir.path(), 50).unwrap();
            for (i, id) in ids.iter().enumerate() {
                match i % 3 {
                    0 => light(&s, id),
                    1 => s.commit(id, &ack(id), &Change::None).unwrap(),
                    _ => {
                        let patch = Change::FirewallPatch("{}".into());
                        let epoch = s.commit_deferred(s.epoch(), id, &ack(id), patch);
                        assert_eq!(s.sync().unwrap(), epoch);
                    }
                }
            }
            s.fold().unwrap();
            check(&s);
            assert!(!s.may_have("never-sent"));
            assert!(
                !db_has(&s, &ids[1]) && !s.may_have(&ids[1]),
                "pruned long ago"
            );
            assert_eq!(s.processed_count().unwrap() as usize, {
                let tx = s.read_tx().unwrap();
                tx.open_table(PROCESSED).unwrap().len().unwrap() as usize
            });
            s.reopen().unwrap();
            check(&s);
        }
        let s = Store::open(dir.path(), 50).unwrap();
        check(&s);
        assert!(s.may_have(ids.last().unwrap()));
    }

    #[test]
    fn records_written_by_racing_syncs_are_seen_throughout_and_written_once_in_order() {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
        let dir = tempfile::tempdir().unwrap();
        let s = Arc::new(Store::open(dir.path(), 10_000).unwrap());
        let made = Arc::new(AtomicUsize::new(0));
        const N: usize = 300;
        let syncer = |s: Arc<Store>, made: Arc<AtomicUsize>| {
            std::thread::spawn(move || {
                while made.load(SeqCst) < N {
                    s.sync().unwrap();
                }
            })
        };
        let syncers = [
            syncer(s.clone(), made.clone()),
            syncer(s.clone(), made.clone()),
        ];
        let reader = {
            let (s, made) = (s.clone(), made.clone());
            std::thread::spawn(move || {
                while made.load(SeqCst) < N {
                    let upto = made.load(SeqCst);
                    for i in (0..upto).rev().take(20) {
                        assert!(s.lookup(&format!("p{i}")).unwrap().is_some(), "p{i} unseen");
                    }
                }
            })
        };
        for i in 0..N {
            let id = format!("p{i}");
            let change = if i % 3 == 0 {
                Change::None
            } else {
                Change::FirewallPatch(format!("{{\"p\":{i}}}"))
            };
            s.commit_deferred(s.epoch(), &id, &ack(&id), change);
            made.store(i + 1, SeqCst);
        }
        for t in syncers {
            t.join().unwrap();
        }
        reader.join().unwrap();
        s.sync().unwrap();
        let journal = s.load_firewall().unwrap().journal;
        let expected: Vec<Vec<u8>> = (0..N)
            .filter(|i| i % 3 != 0)
            .map(|i| format!("{{\"p\":{i}}}").into_bytes())
            .collect();
        assert_eq!(journal, expected, "each patch once, in order");
        assert_eq!(s.processed_count().unwrap() as usize, N);
    }

    #[test]
    fn a_record_waits_for_its_sync_and_says_so() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path(), 100).unwrap();
        let epoch = s.commit_deferred(s.epoch(), "a", &ack("a"), Change::None);
        s.commit_deferred(
            s.epoch(),
            "b",
            &ack("b"),
            Change::FirewallPatch("{}".into()),
        );
        assert_eq!(
            (s.unsynced("a"), s.unsynced("b")),
            (Some(epoch), Some(epoch))
        );
        assert_eq!(s.unsynced("c"), None);
        assert_eq!(s.sync().unwrap(), epoch);
        assert_eq!((s.unsynced("a"), s.unsynced("b")), (None, None));
        assert!(s.lookup("a").unwrap().is_some() && s.lookup("b").unwrap().is_some());
    }

    #[test]
    fn a_reopen_before_the_sync_fails_it() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path(), 100).unwrap();
        let epoch = s.commit_deferred(s.epoch(), "a", &ack("a"), Change::None);
        s.reopen().unwrap();
        assert!(s.lookup("a").unwrap().is_none(), "gone with the reopen");
        assert_ne!(s.sync().unwrap(), epoch, "the sync is of another epoch");
        assert!(
            s.lookup("a").unwrap().is_none(),
            "and not written by the sync"
        );
        let epoch = s.commit_deferred(s.epoch(), "b", &ack("b"), Change::None);
        assert_eq!(s.sync().unwrap(), epoch);
        // A change planned against the store before a reopen is never written after it.
        let before = s.epoch();
        s.reopen().unwrap();
        let patch = Change::FirewallPatch("{\"p\":1}".into());
        assert_eq!(s.commit_deferred(before, "c", &ack("c"), patch), before);
        assert_ne!(s.sync().unwrap(), before);
        assert!(s.lookup("c").unwrap().is_none());
        assert!(s.load_firewall().unwrap().journal.is_empty());
    }

    #[test]
    fn a_record_cut_short_is_skipped() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = Store::open(dir.path(), 100).unwrap();
            light(&s, "p1");
        }
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(dir.path().join("records.log"))
            .unwrap();
        f.write_all(b"{\"id\":\"p2\",\"ack\":{\"spec").unwrap();
        let s = Store::open(dir.path(), 100).unwrap();
        assert!(s.lookup("p1").unwrap().is_some());
        assert!(s.lookup("p2").unwrap().is_none());
    }

    #[test]
    fn records_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let a = ack("c1");
        {
            let s = Store::open(dir.path(), 10_000).unwrap();
            assert!(s.lookup("c1").unwrap().is_none());
            s.record("c1", &a).unwrap();
        }
        let s = Store::open(dir.path(), 10_000).unwrap();
        assert_eq!(s.lookup("c1").unwrap(), Some(a));
        assert_eq!(s.processed_count().unwrap(), 1);
    }

    #[test]
    fn the_outbox_keeps_events_in_order_and_drops_the_oldest_over_its_bound() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = Store::open(dir.path(), 10).unwrap();
            for i in 0..5u64 {
                let dropped = s.outbox_push(i, "drift", &[b'x'; 100], 350, 100).unwrap();
                assert_eq!(dropped, u64::from(i >= 3), "push {i}");
            }
        }
        let s = Store::open(dir.path(), 10).unwrap();
        let kept = s.outbox_peek(10).unwrap();
        let at: Vec<u64> = kept.iter().map(|e| e.at_ms).collect();
        assert_eq!(at, vec![2, 3, 4], "the oldest went first, across a reopen");
        assert_eq!(s.outbox_counts().unwrap(), (3, 2));
        s.outbox_remove(&[kept[0].seq], 1).unwrap();
        assert_eq!(s.outbox_counts().unwrap(), (2, 3));
        s.outbox_reported(3).unwrap();
        assert_eq!(s.outbox_counts().unwrap(), (2, 0));
        assert_eq!(
            s.outbox_push(9, "stats", b"y", 350, 2).unwrap(),
            1,
            "bound by count too"
        );
        let kinds: Vec<String> = s
            .outbox_peek(10)
            .unwrap()
            .into_iter()
            .map(|e| e.kind)
            .collect();
        assert_eq!(kinds, vec!["drift", "stats"]);
    }

    #[test]
    fn retention_keeps_at_least_the_newest_ids() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path(), 20).unwrap();
        for i in 0..100 {
            s.record(&format!("c{i}"), &ack(&format!("c{i}"))).unwrap();
        }
        let n = s.processed_count().unwrap();
        assert!((20..=22).contains(&n), "{n}");
        for i in 80..100 {
            assert!(s.lookup(&format!("c{i}")).unwrap().is_some(), "c{i}");
        }
        assert!(s.lookup("c0").unwrap().is_none());
    }

    #[test]
    fn newer_schema_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = Store::open(dir.path(), 10).unwrap();
            let tx = s.write_tx().unwrap();
            tx.open_table(META)
                .unwrap()
                .insert("schema_version", SCHEMA_VERSION + 1)
                .unwrap();
            tx.commit().unwrap();
        }
        assert!(matches!(
            Store::open(dir.path(), 10),
            Err(StateError::Schema { .. })
        ));
    }
}
