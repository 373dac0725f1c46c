//! From a delivery to an outcome: decode, deduplicate, apply, persist, and only then hand
//! back the ack to publish. The order apply -> persist -> ack is what makes effects
//! at-most-once across crashes and redeliveries.

use std::sync::Arc;
use std::time::Instant;

use serde_json::{Value, json};
use tokio::sync::Mutex;

use crate::certs::{CertError, Current};
use crate::faults::{self, Fault};
use crate::firewall::spec::{Patch, RuleSet};
use crate::firewall::{ApplyPlan, Firewall, FirewallError};
use crate::protocol::{
    Ack, AckError, DecodeContext, ErrorCode, Incoming, Request, RequestKind, Status, claimed_id,
    decode,
};
use crate::router::spec::RouterSpec;
use crate::router::{RouterError, Routers};
use crate::state::{Change, StateError, Store};

/// Journal entries after which the firewall snapshot is rewritten.
const COMPACT_AFTER: u64 = 256;

/// What to do with the AMQP delivery once the ack is confirmed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disposition {
    /// Processed (whatever the status): remove it from the queue.
    Ack,
    /// Refused: reject without requeue, so the broker dead-letters it.
    Reject,
}

#[derive(Debug)]
pub struct Outcome {
    pub ack: Ack,
    pub disposition: Disposition,
    /// A `cert.install` that succeeded: the session on the new identity, to take over once
    /// the ack is out and the delivery acked.
    pub rotation: Option<Box<Rotation>>,
    /// The record was committed but not yet synced (a firewall patch), in this store
    /// epoch: [`Dispatcher::sync`] must succeed before the ack is published.
    pub unsynced: Option<u64>,
}

impl Outcome {
    /// An answer that switches no identity.
    fn answered(ack: Ack, disposition: Disposition) -> Outcome {
        Outcome {
            ack,
            disposition,
            rotation: None,
            unsynced: None,
        }
    }
}

/// The domain locks one command holds from plan to commit.
struct Locks<'a> {
    firewall: Option<tokio::sync::MutexGuard<'a, Firewall>>,
    routers: Option<tokio::sync::MutexGuard<'a, Routers>>,
}

/// The broker session opened with a newly installed identity, and how to open more.
pub struct Rotation {
    pub connector: crate::broker::Connector,
    pub session: crate::broker::Session,
}

impl std::fmt::Debug for Rotation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rotation")
            .field("url", &self.session.url)
            .finish()
    }
}

/// What `cert.install` needs besides the request.
pub struct CertContext {
    /// The identity in use, shared with the daemon (heartbeats, expiry) and the CLI.
    pub identity: Arc<std::sync::RwLock<Current>>,
    pub state_dir: std::path::PathBuf,
}

/// The configuration in force with what is derived from it (the decode context, with the
/// signing keys read from their files): one value, replaced whole on a reload, so every
/// reader sees either the old settings or the new ones, never a mix.
#[derive(Debug)]
pub struct Settings {
    pub config: crate::config::Config,
    pub decode: DecodeContext,
}

impl std::ops::Deref for Settings {
    type Target = crate::config::Config;

    fn deref(&self) -> &crate::config::Config {
        &self.config
    }
}

/// Where the settings in force are read; the daemon holds the sending side.
pub type SettingsWatch = tokio::sync::watch::Receiver<Arc<Settings>>;

/// Bodies up to this size are decoded on the async worker; larger ones on the blocking pool.
const INLINE_DECODE_BYTES: usize = 64 * 1024;

/// The answer to one executed request, before it is stored.
struct Executed {
    status: Status,
    error: Option<AckError>,
    data: Value,
}

impl Executed {
    fn applied(data: Value) -> Executed {
        Executed {
            status: Status::Applied,
            error: None,
            data,
        }
    }
}

/// Every way an admitted command can fail. [`DispatchError::answer`] is the one place
/// where failures become ack statuses, codes and fields.
#[derive(Debug, thiserror::Error)]
pub enum DispatchError {
    #[error(transparent)]
    Firewall(#[from] FirewallError),
    #[error(transparent)]
    Router(#[from] RouterError),
    #[error(transparent)]
    Cert(#[from] CertError),
    #[error(transparent)]
    Store(#[from] StateError),
    #[error("namespace {0} exists and was not made by this agent; it is left alone")]
    ForeignNamespace(String),
    /// `cert.install` could not switch to the new identity (the old one stays).
    #[error("{0}")]
    Rotation(String),
    /// `cert.request` could not make or keep a key pair.
    #[error("{0}")]
    Request(String),
    /// The record was committed but could not be made durable; the change is undone.
    #[error("the record could not be made durable ({0}); the change is undone")]
    Unsynced(String),
}

impl DispatchError {
    /// The ack's status, and its error: code, message, field.
    pub fn answer(&self) -> (Status, AckError) {
        use ErrorCode as C;
        use Status::{Failed, Rejected};
        let owned = |f: &String| Some(f.clone());
        let (status, code, field) = match self {
            DispatchError::Firewall(e) => match e {
                FirewallError::Stale { .. } => (Status::Stale, C::StaleGeneration, None),
                FirewallError::UnknownSet { field, .. } => (Rejected, C::UnknownSet, owned(field)),
                FirewallError::SetInUse { field, .. } => (Rejected, C::SetInUse, owned(field)),
                FirewallError::TooMany { field, .. } => (Rejected, C::TooMany, owned(field)),
                FirewallError::Nft(_) | FirewallError::Netlink(_) => (Failed, C::NftFailed, None),
            },
            DispatchError::Router(e) => match e {
                RouterError::UnknownBridge { field, .. } => {
                    (Rejected, C::UnknownBridge, owned(field))
                }
                RouterError::Kernel(_) => (Failed, C::RouterFailed, None),
            },
            DispatchError::Cert(e) => {
                let (code, field) = cert_code(e);
                (Rejected, code, Some(field.to_string()))
            }
            DispatchError::Store(_) | DispatchError::Unsynced(_) => (Failed, C::StoreFailed, None),
            DispatchError::ForeignNamespace(_) => {
                (Rejected, C::ForeignNamespace, Some("$.data.id".into()))
            }
            DispatchError::Rotation(_) => (Failed, C::RotationFailed, None),
            DispatchError::Request(_) => (Failed, C::RequestFailed, None),
        };
        let error = AckError {
            code,
            message: self.to_string(),
            field,
        };
        (status, error)
    }
}

/// The code and field of a certificate that `cert.install` refuses.
fn cert_code(e: &CertError) -> (ErrorCode, &'static str) {
    match e {
        CertError::BadPem { field, .. } => (ErrorCode::BadPem, *field),
        CertError::KeyMismatch => (ErrorCode::KeyMismatch, "$.data.private_key_pem"),
        CertError::NoPendingKey => (ErrorCode::NoPendingKey, "$.data.private_key_pem"),
        CertError::Expired { .. } => (ErrorCode::Expired, "$.data.certificate_pem"),
        CertError::NotYetValid { .. } => (ErrorCode::NotYetValid, "$.data.certificate_pem"),
        CertError::WrongHost { .. } | CertError::LoginName { .. } => {
            (ErrorCode::WrongHost, "$.data.certificate_pem")
        }
        CertError::UntrustedChain { .. } => (ErrorCode::UntrustedChain, "$.data.certificate_pem"),
    }
}

impl Executed {
    /// A failure answered with `data`; nothing to record but the answer.
    fn failed(e: impl Into<DispatchError>, data: Value) -> Executed {
        let (status, error) = e.into().answer();
        Executed {
            status,
            error: Some(error),
            data,
        }
    }
}

pub struct Dispatcher {
    store: Arc<Store>,
    settings: SettingsWatch,
    host_id: String,
    certs: CertContext,
    firewall: Arc<Mutex<Firewall>>,
    routers: Arc<Mutex<Routers>>,
    /// Where reconcile results go (as `drift.<host>` events).
    drift: tokio::sync::mpsc::Sender<Value>,
    /// Set when the stored state could not be read at start; reported in every summary
    /// until the manager sent a full rule set.
    state_lost: Arc<std::sync::Mutex<Option<Value>>>,
    /// The store epoch that the firewall in memory matches (read and written under the
    /// firewall lock). After the store was reopened (an I/O error), the firewall may hold
    /// patches whose records are gone: the next firewall command puts it back first.
    firewall_epoch: std::sync::atomic::AtomicU64,
}

impl Dispatcher {
    pub fn new(
        store: Arc<Store>,
        settings: SettingsWatch,
        certs: CertContext,
        firewall: Arc<Mutex<Firewall>>,
        routers: Arc<Mutex<Routers>>,
        drift: tokio::sync::mpsc::Sender<Value>,
    ) -> Dispatcher {
        let host_id = settings.borrow().decode.host_id.clone();
        Dispatcher {
            firewall_epoch: store.epoch().into(),
            store,
            host_id,
            settings,
            certs,
            firewall,
            routers,
            drift,
            state_lost: Default::default(),
        }
    }

    /// Shares the record of a state lost at start (see `daemon::after_state_lost`) with the
    /// control socket; a full rule set clears it.
    pub fn with_state_lost(mut self, lost: Arc<std::sync::Mutex<Option<Value>>>) -> Dispatcher {
        self.state_lost = lost;
        self
    }

    fn set_state_lost(&self, what: Option<Value>) {
        *self.state_lost.lock().expect("state_lost lock") = what;
    }

    pub fn host_id(&self) -> &str {
        &self.host_id
    }

    /// The settings in force now (a reload replaces them for the next command).
    fn settings(&self) -> Arc<Settings> {
        self.settings.borrow().clone()
    }

    /// Decodes `incoming`, a large body on the blocking pool (parsing megabytes of JSON
    /// would hold an async worker for tens of milliseconds). The body is freed here, not
    /// kept for as long as the command runs.
    async fn decode(&self, incoming: Incoming) -> Result<Request, crate::protocol::Rejection> {
        let settings = self.settings();
        if incoming.body.len() <= INLINE_DECODE_BYTES {
            return decode(&settings.decode, &incoming);
        }
        let ctx = settings.decode.clone();
        let (t, bytes) = (Instant::now(), incoming.body.len());
        let decoded = tokio::task::spawn_blocking(move || {
            let decoded = decode(&ctx, &incoming);
            drop(incoming);
            // The parse tree was freed in this thread's malloc arena, where nothing else
            // would reuse it: give it back before the command's own work (a whole table's
            // netlink batch, megabytes) comes on top.
            crate::sys::trim_heap();
            decoded
        })
        .await
        .expect("decoding panicked");
        tracing::debug!(
            bytes,
            decode_us = t.elapsed().as_micros() as u64,
            "large body decoded"
        );
        decoded
    }

    /// One command, as the contract reads: deduplicate and check it, execute it against
    /// the current state and the kernel, then record its outcome before handing back the
    /// ack (or roll back what it did when the record cannot be kept).
    #[tracing::instrument(name = "command", skip_all, fields(id, kind))]
    pub async fn handle(&self, incoming: Incoming) -> Outcome {
        let started = Instant::now();
        let request = match self.admit(incoming).await {
            Ok(request) => request,
            Err(answered) => return answered,
        };
        let type_name = request.kind.type_name();
        let span = tracing::Span::current();
        span.record("id", request.id.as_str());
        span.record("kind", type_name);
        let dry_run = matches!(
            request.kind,
            RequestKind::FirewallApply { dry_run: true, .. }
                | RequestKind::FirewallPatch { dry_run: true, .. }
        );
        // The domain's lock is held from plan to commit, so drift repair never interleaves.
        let mut locks = self.locks_for(&request.kind).await;
        let epoch = self.fence(&mut locks).await;
        let Request { id, kind, .. } = request;
        let (executed, mut effect, rotation) = match self.execute(&id, kind, &mut locks).await {
            Ok(done) => done,
            Err(e) => return self.store_failure(&id, type_name, e),
        };
        let ack = self.ack_of(&id, type_name, executed, started);
        if ack.status == Status::Rejected {
            // Not recorded (see above): a rejection changed nothing.
            if let Some(e) = &ack.error {
                tracing::warn!(command_id = %id, command_type = type_name, code = ?e.code, field = e.field.as_deref().unwrap_or("-"), error = %e.message, "command rejected");
            }
            return Outcome::answered(ack, Disposition::Reject);
        }
        if dry_run {
            // Nothing changed and nothing recorded, not even the id: the same command may
            // come again for real.
            tracing::info!(command_id = %id, command_type = type_name, status = ack.status.as_str(), "dry run answered");
            return Outcome::answered(ack, Disposition::Ack);
        }
        let persist_started = Instant::now();
        let persisted = self.persist(&id, &ack, effect.record(), epoch).await;
        tracing::debug!(command_id = %id, persist_us = persist_started.elapsed().as_micros() as u64, "outcome stored");
        let unsynced = match persisted {
            Ok(unsynced) => unsynced,
            Err(e) => {
                self.roll_back(&mut locks, &effect).await;
                // An identity already switched stays switched: the new session carries on.
                let mut outcome = self.store_failure(&id, type_name, e);
                outcome.rotation = rotation;
                return outcome;
            }
        };
        self.commit(locks, effect).await;
        if unsynced.is_none() {
            faults::crash_if(Fault::CrashAfterPersist, &id);
        }
        tracing::info!(
            command_id = %id,
            command_type = type_name,
            status = ack.status.as_str(),
            duration_us = started.elapsed().as_micros() as u64,
            "command processed"
        );
        Outcome {
            ack,
            disposition: Disposition::Ack,
            rotation,
            unsynced,
        }
    }

    /// Deduplication, then every check of the contract. Dedup comes before every check
    /// that depends on configuration (PROTOCOL.md section 3): a redelivery keeps its
    /// original answer whatever changed since. `Err` is the answer already.
    async fn admit(&self, incoming: Incoming) -> Result<Request, Outcome> {
        let claimed = claimed_id(&incoming);
        if let Some(id) = &claimed
            && let Some(outcome) = self
                .duplicate_of(id, incoming.kind.as_deref().unwrap_or("unknown"))
                .await
        {
            return Err(outcome);
        }
        let request = self.decode(incoming).await.map_err(|rejection| {
            tracing::warn!(
                command_id = rejection.correlation_id.as_deref().unwrap_or("-"),
                command_type = rejection.command_type.as_deref().unwrap_or("-"),
                code = ?rejection.error.code,
                field = rejection.error.field.as_deref().unwrap_or("-"),
                error = %rejection.error.message,
                "command rejected"
            );
            let ack = Ack::new(
                self.host_id(),
                rejection.correlation_id,
                rejection.command_type,
                Status::Rejected,
                Some(rejection.error),
                json!({}),
            );
            Outcome::answered(ack, Disposition::Reject)
        })?;
        if claimed.as_deref() != Some(request.id.as_str())
            && let Some(outcome) = self
                .duplicate_of(&request.id, request.kind.type_name())
                .await
        {
            return Err(outcome);
        }
        Ok(request)
    }

    /// The locks a request of `kind` holds from plan to commit.
    async fn locks_for(&self, kind: &RequestKind) -> Locks<'_> {
        match kind {
            RequestKind::FirewallApply { .. } | RequestKind::FirewallPatch { .. } => Locks {
                firewall: Some(self.firewall.lock().await),
                routers: None,
            },
            RequestKind::RouterCreate(_) | RequestKind::RouterDelete { .. } => Locks {
                firewall: None,
                routers: Some(self.routers.lock().await),
            },
            _ => Locks {
                firewall: None,
                routers: None,
            },
        }
    }

    /// The store epoch that the state the command runs against matches. A firewall that
    /// may hold patches a reopened store lost is put back to what the store holds first,
    /// under the lock the command holds, so no command plans against it.
    async fn fence(&self, locks: &mut Locks<'_>) -> u64 {
        use std::sync::atomic::Ordering::SeqCst;
        let epoch = self.store.epoch();
        match locks.firewall.as_mut() {
            Some(fw) if self.firewall_epoch.load(SeqCst) != epoch => {
                self.recover_locked(fw).await;
                self.firewall_epoch.load(SeqCst)
            }
            _ => epoch,
        }
    }

    /// Runs the request in its domain: the answer, its [`Effect`] (what to record, then
    /// make current in memory), and the new session if the identity changed. `Err`: the
    /// store could not be read (a `state.sync`).
    async fn execute(
        &self,
        id: &str,
        kind: RequestKind,
        locks: &mut Locks<'_>,
    ) -> Result<(Executed, Effect, Option<Box<Rotation>>), StateError> {
        let none = |executed| Ok((executed, Effect::None, None));
        match kind {
            RequestKind::Ping => none(Executed::applied(json!({}))),
            RequestKind::StateSync { counters } => none(self.state_sync(counters).await?),
            RequestKind::FirewallApply {
                rules,
                raw,
                dry_run,
            } => {
                let fw = locks.firewall.as_mut().expect("locked for firewall");
                if dry_run {
                    return none(firewall_apply_dry(fw, &rules).await);
                }
                let (executed, effect) = firewall_apply(fw, rules, raw).await;
                Ok((executed, effect, None))
            }
            RequestKind::FirewallPatch {
                patch,
                raw,
                dry_run,
            } => {
                let fw = locks.firewall.as_mut().expect("locked for firewall");
                if dry_run {
                    return none(firewall_patch_dry(fw, &patch).await);
                }
                let (executed, effect) = firewall_patch(fw, &patch, raw).await;
                Ok((executed, effect, None))
            }
            RequestKind::CertRequest(req) => none(self.cert_request(*req).await),
            RequestKind::CertInstall(bundle) => {
                let (executed, rotation) = self.cert_install(&bundle, id).await;
                Ok((executed, Effect::None, rotation))
            }
            RequestKind::RouterCreate(spec) => {
                let routers = locks.routers.as_mut().expect("locked for routers");
                let (executed, effect) = self.router_create(routers, *spec).await;
                Ok((executed, effect, None))
            }
            RequestKind::RouterDelete { id: router } => {
                let routers = locks.routers.as_mut().expect("locked for routers");
                let (executed, effect) = router_delete(routers, router).await;
                Ok((executed, effect, None))
            }
        }
    }

    /// `state.sync`: routers reconciled with the kernel, then the summary (with every
    /// rule's counters on request).
    async fn state_sync(&self, counters: bool) -> Result<Executed, StateError> {
        {
            let mut routers = self.routers.lock().await;
            reconcile_routers(&mut routers, &self.store, &self.drift).await?;
        }
        let mut summary = self.summary().await?;
        if counters {
            summary["firewall"]["counters"] = self.rule_counters().await;
        }
        Ok(Executed::applied(summary))
    }

    /// The ack for what `executed` says (with the time it took).
    fn ack_of(&self, id: &str, type_name: &str, executed: Executed, started: Instant) -> Ack {
        let Executed {
            status,
            error,
            mut data,
        } = executed;
        if let Value::Object(map) = &mut data {
            map.insert(
                "duration_us".into(),
                json!(started.elapsed().as_micros() as u64),
            );
        }
        Ack::new(
            self.host_id(),
            Some(id.to_string()),
            Some(type_name.to_string()),
            status,
            error,
            data,
        )
    }

    /// Undoes in the kernel what a command did whose record could not be kept.
    async fn roll_back(&self, locks: &mut Locks<'_>, effect: &Effect) {
        if let Some(fw) = locks.firewall.as_mut()
            && !matches!(effect, Effect::None)
            && let Err(re) = fw.restore().await
        {
            tracing::error!(error = %re, "could not roll the kernel back to the recorded rule set");
        }
        if let Some(routers) = locks.routers.as_mut() {
            undo_router(routers, effect).await;
        }
    }

    /// Makes the recorded change the current state in memory, then what follows from it:
    /// connections the new rules deny are cut, the journal compacted now and then.
    async fn commit(&self, locks: Locks<'_>, effect: Effect) {
        let Locks {
            firewall,
            mut routers,
        } = locks;
        if let Some(routers) = routers.as_mut() {
            match &effect {
                Effect::RouterPut { spec, .. } => routers.commit_put((**spec).clone()),
                Effect::RouterDelete { id, .. } => routers.commit_delete(id),
                _ => {}
            }
        }
        drop(routers);
        let Some(mut fw) = firewall else {
            return;
        };
        match effect {
            Effect::Replace { rules, layout, .. } => {
                fw.commit_replace(*rules, layout);
                // A full rule set is what a lost state was waiting for.
                self.set_state_lost(None);
                fw.cut_denied().await;
            }
            Effect::Patch { plan, .. } => {
                let may_deny_more = plan.may_deny_more;
                fw.commit_patch(*plan);
                if may_deny_more {
                    fw.cut_denied().await;
                }
                self.maybe_compact(&fw).await;
            }
            _ => {}
        }
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
            "routers": self.routers.lock().await.summary(),
            "certificate": self.certs.identity.read().expect("identity lock").summary(),
            "commands": { "processed": processed },
        });
        if let Some(lost) = self.state_lost.lock().expect("state_lost lock").clone() {
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

    /// The stored outcome of an already processed command id, answered again as a duplicate
    /// (or a store failure, which must not let the command run a second time).
    async fn duplicate_of(&self, id: &str, type_name: &str) -> Option<Outcome> {
        match self.lookup(id).await {
            Ok(Some(original)) => {
                tracing::info!(command_id = %id, status = original.status.as_str(), "duplicate command: answering with the stored ack");
                let disposition = disposition_of(original.status);
                Some(Outcome {
                    ack: original.as_duplicate(),
                    disposition,
                    rotation: None,
                    // The original's record may not be written yet (its batch ended
                    // before its sync): this answer waits for it as well.
                    unsynced: self.store.unsynced(id),
                })
            }
            Ok(None) => None,
            Err(e) => Some(self.store_failure(id, type_name, e)),
        }
    }

    async fn lookup(&self, id: &str) -> Result<Option<Ack>, StateError> {
        // A new id (the common case) is answered from memory, without the blocking pool.
        if !self.store.may_have(id) {
            return Ok(None);
        }
        let store = self.store.clone();
        let id = id.to_string();
        tokio::task::spawn_blocking(move || store.lookup(&id))
            .await
            .expect("state store task panicked")
    }

    /// Keeps the record of a command with the change it made (against the store's
    /// `epoch`). `Some(epoch)`: committed but not written yet (a firewall patch, or a
    /// command that changed nothing: a batch's records share one write, see `sync`).
    async fn persist(
        &self,
        id: &str,
        ack: &Ack,
        change: Change,
        epoch: u64,
    ) -> Result<Option<u64>, StateError> {
        match change {
            Change::FirewallPatch(_) | Change::None => {
                Ok(Some(self.store.commit_deferred(epoch, id, ack, change)))
            }
            change => {
                let store = self.store.clone();
                let id = id.to_string();
                let ack = ack.clone();
                tokio::task::spawn_blocking(move || store.commit(&id, &ack, &change).map(|()| None))
                    .await
                    .expect("state store task panicked")
            }
        }
    }

    /// Writes the records of `outcomes` (durably, with one fsync, when any changed
    /// something) before their acks are published (record first, then ack: at most once).
    /// Each outcome whose record was lost (the write failed, or a reopen dropped it)
    /// becomes a store failure, as does a redelivery answered from such a record; when
    /// patches were among them, the firewall goes back to what the store holds, in memory
    /// and in the kernel (none of those patches is in force).
    pub async fn sync(&self, outcomes: &mut [Outcome]) {
        if outcomes.iter().all(|o| o.unsynced.is_none()) {
            return;
        }
        let store = self.store.clone();
        let started = Instant::now();
        let synced = tokio::task::spawn_blocking(move || store.sync())
            .await
            .expect("state store task panicked");
        tracing::debug!(
            sync_us = started.elapsed().as_micros() as u64,
            "the batch's records written"
        );
        // Records made against an earlier epoch were dropped by a reopen.
        let (epoch, error) = match synced {
            Ok(epoch)
                if outcomes
                    .iter()
                    .all(|o| o.unsynced.is_none_or(|e| e == epoch)) =>
            {
                faults::crash_if(Fault::CrashAfterPersist, "a batch's sync");
                return;
            }
            Ok(epoch) => (Some(epoch), StateError::Unsynced),
            Err(e) => (None, e),
        };
        tracing::error!(%error, "records of the batch could not be written; their commands failed");
        let undone = |o: &Outcome| o.unsynced.is_some_and(|e| Some(e) != epoch);
        // A redelivery in the same batch was answered from a record that is gone now.
        let lost: std::collections::HashSet<Option<String>> = outcomes
            .iter()
            .filter(|o| undone(o))
            .map(|o| o.ack.correlation_id.clone())
            .collect();
        let patched = outcomes
            .iter()
            .any(|o| undone(o) && o.ack.command_type.as_deref() == Some("firewall.patch"));
        for outcome in outcomes
            .iter_mut()
            .filter(|o| undone(o) || (o.ack.duplicate && lost.contains(&o.ack.correlation_id)))
        {
            let id = outcome.ack.correlation_id.clone().unwrap_or_default();
            let kind = outcome.ack.command_type.clone().unwrap_or_default();
            let failed = DispatchError::Unsynced(error.to_string());
            *outcome = self.failure(&id, &kind, failed);
        }
        if patched {
            tracing::warn!("going back to the firewall the store holds");
            let mut fw = self.firewall.lock().await;
            self.recover_locked(&mut fw).await;
        }
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
                self.firewall_epoch
                    .store(epoch, std::sync::atomic::Ordering::SeqCst);
            }
            Err(e) => tracing::error!(error = %e, "could not read the stored firewall back"),
        }
    }

    /// Folds the patch journal into a snapshot now and then, so restarts stay fast.
    async fn maybe_compact(&self, fw: &Firewall) {
        if self.store.journal_len() < COMPACT_AFTER {
            return;
        }
        let snapshot = fw.current().canonical_json();
        let store = self.store.clone();
        let epoch = self
            .firewall_epoch
            .load(std::sync::atomic::Ordering::SeqCst);
        let result = tokio::task::spawn_blocking(move || store.compact_firewall(&snapshot, epoch))
            .await
            .expect("state store task panicked");
        if let Err(e) = result {
            tracing::warn!(error = %e, "could not compact the firewall journal (will retry)");
        }
    }

    fn store_failure(&self, id: &str, type_name: &str, e: StateError) -> Outcome {
        tracing::error!(command_id = %id, error = %e, "state store failed; command not applied");
        self.failure(id, type_name, DispatchError::Store(e))
    }

    /// The answer to command `id` that failed with `e`.
    fn failure(&self, id: &str, type_name: &str, e: DispatchError) -> Outcome {
        let (status, error) = e.answer();
        let ack = Ack::new(
            self.host_id(),
            Some(id.to_string()),
            Some(type_name.to_string()),
            status,
            Some(error),
            json!({}),
        );
        Outcome::answered(ack, Disposition::Ack)
    }
}

fn disposition_of(status: Status) -> Disposition {
    if status == Status::Rejected {
        Disposition::Reject
    } else {
        Disposition::Ack
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

/// What a command did: what the store records of it, what becomes current in memory once
/// that record is kept, and what is undone in the kernel when it cannot be.
enum Effect {
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
    /// Router `spec` is in the kernel; `previous` is what the record held before.
    RouterPut {
        spec: Box<RouterSpec>,
        previous: Option<Box<RouterSpec>>,
    },
    /// Router `id` is gone from the kernel; `previous` is what the record held.
    RouterDelete {
        id: String,
        previous: Option<Box<RouterSpec>>,
    },
}

impl Effect {
    /// What the store records with the command's ack (the raw JSON moves into it).
    fn record(&mut self) -> Change {
        match self {
            Effect::None => Change::None,
            Effect::Replace { raw, .. } => Change::FirewallReplace(std::mem::take(raw)),
            Effect::Patch { raw, .. } => Change::FirewallPatch(std::mem::take(raw)),
            Effect::RouterPut { spec, .. } => Change::RouterPut {
                id: spec.id.clone(),
                spec: spec.to_json(),
            },
            Effect::RouterDelete { id, .. } => Change::RouterDelete(id.clone()),
        }
    }
}

fn failed_with(fw: &Firewall, e: FirewallError) -> (Executed, Effect) {
    let data = json!({ "generation": fw.current().generation });
    (Executed::failed(e, data), Effect::None)
}

/// A dry `firewall.apply`: checked and planned, answered with what it would change.
async fn firewall_apply_dry(fw: &Firewall, rs: &RuleSet) -> Executed {
    match fw.layout_for(rs) {
        Err(e) => failed_with(fw, e).0,
        Ok(layout) => Executed::applied(
            json!({ "generation": rs.generation, "dry_run": true, "diff": fw.apply_diff(rs, layout.as_ref()).await }),
        ),
    }
}

/// A dry `firewall.patch`.
async fn firewall_patch_dry(fw: &Firewall, patch: &Patch) -> Executed {
    match fw.plan_patch(patch) {
        Err(e) => failed_with(fw, e).0,
        Ok(plan) => Executed::applied(
            json!({ "generation": patch.generation, "dry_run": true, "diff": fw.patch_diff(&plan).await }),
        ),
    }
}

async fn firewall_apply(fw: &mut Firewall, rs: Box<RuleSet>, raw: String) -> (Executed, Effect) {
    let t = Instant::now();
    let plan = fw.plan_apply(&rs);
    tracing::debug!(plan_us = t.elapsed().as_micros() as u64, "rule set planned");
    match plan {
        Err(e) => failed_with(fw, e),
        Ok(ApplyPlan::NoOp) => (
            Executed::applied(json!({ "generation": rs.generation, "noop": true })),
            Effect::None,
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
            (
                executed,
                Effect::Replace {
                    rules: rs,
                    layout,
                    raw,
                },
            )
        }
    }
}

async fn firewall_patch(fw: &mut Firewall, patch: &Patch, raw: String) -> (Executed, Effect) {
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
    (executed, Effect::Patch { plan, raw })
}

impl Dispatcher {
    /// Records `spec`'s id as the agent's own, durably, before its first kernel change;
    /// a namespace someone else made is never adopted (rolling back would delete it).
    /// `Some`: the answer instead.
    async fn own_router(&self, routers: &mut Routers, spec: &RouterSpec) -> Option<Executed> {
        let data = || json!({ "router": spec.id });
        let ns = crate::sys::netns::ns_path(&spec.netns());
        if tokio::fs::try_exists(&ns).await.unwrap_or(true) {
            let foreign = DispatchError::ForeignNamespace(spec.netns());
            return Some(Executed::failed(foreign, data()));
        }
        let store = self.store.clone();
        let id = spec.id.clone();
        let owned = tokio::task::spawn_blocking(move || store.own_router(&id))
            .await
            .expect("state store task panicked");
        if let Err(e) = owned {
            return Some(Executed::failed(e, data()));
        }
        routers.note_owned(&spec.id);
        None
    }

    /// A new router rolled back entirely is no longer the agent's to watch.
    async fn disown_router(&self, routers: &mut Routers, id: &str) {
        let store = self.store.clone();
        let owned_id = id.to_string();
        let disowned = tokio::task::spawn_blocking(move || store.disown_router(&owned_id))
            .await
            .expect("state store task panicked");
        match disowned {
            Ok(()) => routers.forget(id),
            Err(e) => tracing::warn!(error = %e, "could not disown a rolled-back router"),
        }
    }

    /// `router.create`: bridges checked, the id owned durably before the first kernel
    /// change, then converged; a failure rolls back to what was there before.
    async fn router_create(&self, routers: &mut Routers, spec: RouterSpec) -> (Executed, Effect) {
        let failed = |e: RouterError| {
            let executed = Executed::failed(e, json!({ "router": spec.id }));
            (executed, Effect::None)
        };
        if let Err(e) = routers.check_bridges(&spec).await {
            return failed(e);
        }
        if !routers.is_owned(&spec.id)
            && let Some(refused) = self.own_router(routers, &spec).await
        {
            return (refused, Effect::None);
        }
        let previous = routers.get(&spec.id).cloned().map(Box::new);
        match routers.converge(&spec).await {
            Ok(steps) => {
                tracing::debug!(router = %spec.id, steps = steps.len(), "router converged");
                let executed = Executed::applied(
                    json!({ "router": spec.id, "changes": steps.len(), "noop": steps.is_empty() }),
                );
                let effect = Effect::RouterPut {
                    spec: Box::new(spec),
                    previous,
                };
                (executed, effect)
            }
            Err(e) => {
                tracing::warn!(router = %spec.id, error = %e, "router create failed; rolling back");
                let was_new = previous.is_none();
                let undo = Effect::RouterPut {
                    spec: Box::new(spec.clone()),
                    previous,
                };
                // A new router rolled back entirely is no longer the agent's to watch.
                if undo_router(routers, &undo).await && was_new {
                    self.disown_router(routers, &spec.id).await;
                }
                failed(RouterError::Kernel(e))
            }
        }
    }
}

/// Converges the routers to the record (start, `state.sync`, the periodic check), disowns
/// what it removed and reports what it fixed as a drift event.
pub async fn reconcile_routers(
    routers: &mut Routers,
    store: &Arc<Store>,
    drift: &tokio::sync::mpsc::Sender<Value>,
) -> Result<(), StateError> {
    let done = routers.reconcile().await;
    report_reconciled(&done, drift);
    for id in done.removed {
        let store = store.clone();
        tokio::task::spawn_blocking(move || store.disown_router(&id))
            .await
            .expect("state store task panicked")?;
    }
    Ok(())
}

/// Logs a reconcile's result and sends it as a drift event when it changed anything.
fn report_reconciled(done: &crate::router::Reconciled, drift: &tokio::sync::mpsc::Sender<Value>) {
    if done.is_empty() {
        return;
    }
    for (id, steps) in &done.repaired {
        tracing::warn!(router = %id, steps = ?steps, "router drift found and repaired");
    }
    for id in &done.removed {
        tracing::warn!(router = %id, "owned router no longer wanted: removed");
    }
    for (id, error) in &done.failed {
        tracing::error!(router = %id, %error, "router could not be repaired");
    }
    let event = json!({ "what": "routers", "routers": done });
    if drift.try_send(event).is_err() {
        tracing::warn!("drift event dropped: too many pending");
    }
}

/// `router.delete`: removes the router (absent is fine).
async fn router_delete(routers: &mut Routers, id: String) -> (Executed, Effect) {
    let previous = routers.get(&id).cloned().map(Box::new);
    if previous.is_none() && !routers.is_owned(&id) {
        let executed = Executed::applied(json!({ "router": id, "absent": true }));
        return (executed, Effect::None);
    }
    match routers.remove(&id, previous.as_deref()).await {
        Ok(()) => (
            Executed::applied(json!({ "router": id, "absent": previous.is_none() })),
            Effect::RouterDelete { id, previous },
        ),
        Err(e) => {
            tracing::warn!(router = %id, error = %e, "router delete failed; restoring it");
            undo_router(
                routers,
                &Effect::RouterDelete {
                    id: id.clone(),
                    previous,
                },
            )
            .await;
            let executed = Executed::failed(RouterError::Kernel(e), json!({ "router": id }));
            (executed, Effect::None)
        }
    }
}

/// Puts the kernel back to the record as it was before a router command.
/// True when the kernel is back as it was.
async fn undo_router(routers: &Routers, effect: &Effect) -> bool {
    let (id, previous) = match effect {
        Effect::RouterPut { spec, previous } => (spec.id.as_str(), previous),
        Effect::RouterDelete { id, previous } => (id.as_str(), previous),
        _ => return true,
    };
    let result = match previous {
        Some(p) => routers.converge(p).await.map(|_| ()),
        None => match effect {
            Effect::RouterPut { spec, .. } => routers.remove(id, Some(spec)).await,
            _ => Ok(()),
        },
    };
    match result {
        Ok(()) => true,
        Err(e) => {
            tracing::error!(router = %id, error = %e, "could not roll the router back; the next reconcile retries");
            false
        }
    }
}

impl Dispatcher {
    /// `cert.request`: a new key pair kept as the pending key, the CSR in the ack.
    async fn cert_request(&self, req: crate::certs::request::CertRequest) -> Executed {
        let dir = self.certs.state_dir.clone();
        let made = tokio::task::spawn_blocking(move || {
            crate::certs::request::generate(&dir, &req).map(|csr| (csr, req))
        })
        .await
        .expect("key generation panicked");
        match made {
            Ok((csr_pem, req)) => {
                tracing::info!(subject_cn = %req.subject_cn, dns_names = ?req.dns_names, "new key pair made; CSR in the ack");
                Executed::applied(json!({ "csr_pem": csr_pem, "key_type": "ecdsa-p256",
                            "subject_cn": req.subject_cn, "dns_names": req.dns_names }))
            }
            Err(e) => Executed::failed(DispatchError::Request(e.to_string()), json!({})),
        }
    }

    /// `cert.install`, make-before-break: validate; open a session with the new identity;
    /// only once the broker took it, write the files and switch to them. Any failure
    /// before the switch changes nothing and the old session carries on.
    /// The bundle, with the pending key of the last cert.request when the command carries
    /// no key (then true).
    async fn with_pending_key(
        &self,
        bundle: &crate::certs::Bundle,
    ) -> (crate::certs::Bundle, bool) {
        let mut bundle = bundle.clone();
        if bundle.private_key_pem.is_some() {
            return (bundle, false);
        }
        let dir = self.certs.state_dir.clone();
        match tokio::task::spawn_blocking(move || crate::certs::request::read_pending(&dir))
            .await
            .expect("pending key reader panicked")
        {
            Ok(key) => bundle.private_key_pem = key,
            Err(e) => tracing::error!(error = %e, "cannot read the pending key"),
        }
        (bundle, true)
    }

    /// A session with the new identity (make-before-break); `Err` says why there is none.
    async fn trial_session(
        &self,
        validated: &crate::certs::Validated,
        broker: &crate::config::BrokerConfig,
    ) -> Result<(crate::broker::Connector, crate::broker::Session), String> {
        let connector =
            crate::certs::tls::client_config(validated.roots.clone(), &validated.identity)
                .map_err(|e| e.to_string())
                .and_then(|tls| {
                    crate::broker::Connector::new(broker, tls, format!("rampart/{}", self.host_id))
                        .map_err(|e| e.to_string())
                })
                .map_err(|e| format!("cannot use the new identity: {e}"))?;
        match connector.connect_first().await {
            Ok(session) => Ok((connector, session)),
            Err(why) => {
                tracing::warn!(error = %why, "trial session with the new identity failed");
                Err(format!(
                    "the broker did not accept a session with the new identity ({why}); the old identity stays"
                ))
            }
        }
    }

    /// Writes the new identity under the state directory and switches to it in one rename;
    /// the CA bundle and the files now in use.
    async fn write_identity(
        &self,
        validated: crate::certs::Validated,
        id: &str,
        from_request: bool,
        broker: crate::config::BrokerConfig,
    ) -> std::io::Result<(String, crate::certs::store::InUse)> {
        let state_dir = self.certs.state_dir.clone();
        let command_id = id.to_string();
        tokio::task::spawn_blocking(move || {
            let staged = crate::certs::store::stage(&state_dir, &validated, &command_id)?;
            faults::crash_if(Fault::CrashMidCertRotation, &command_id);
            crate::certs::store::switch(&state_dir, &staged).inspect_err(|_| {
                let _ = std::fs::remove_dir_all(&staged);
            })?;
            if from_request {
                // Installed with its certificate; a pending key is good for one install.
                crate::certs::request::clear_pending(&state_dir);
            }
            let files = crate::certs::store::in_use(&state_dir, &broker);
            Ok((validated.ca_pem, files))
        })
        .await
        .expect("identity writer panicked")
    }

    async fn cert_install(
        &self,
        bundle: &crate::certs::Bundle,
        id: &str,
    ) -> (Executed, Option<Box<Rotation>>) {
        let (bundle, from_request) = self.with_pending_key(bundle).await;
        let bundle = &bundle;
        let current = self.certs.identity.read().expect("identity lock").clone();
        let external = self.settings().broker.auth == crate::config::AuthMechanism::External;
        let login_cn = current.info.common_name.as_deref().filter(|_| external);
        let validated = match crate::certs::validate(
            bundle,
            &self.host_id,
            login_cn,
            &current.ca_pem,
            rustls::pki_types::UnixTime::now(),
        ) {
            Ok(v) => v,
            Err(e) => return (Executed::failed(e, json!({})), None),
        };
        let info = validated.identity.info.clone();
        let described = json!({
            "subject": info.subject,
            "issuer": info.issuer,
            "serial": info.serial,
            "not_after": info.not_after,
            "sha256": info.sha256,
        });
        if info.sha256 == current.info.sha256 && validated.ca_pem == current.ca_pem {
            let executed = Executed::applied(json!({ "certificate": described, "noop": true }));
            return (executed, None);
        }
        let failed = |message: String| {
            Executed::failed(
                DispatchError::Rotation(message),
                json!({ "certificate": described }),
            )
        };
        // Make: a session with the new identity, against the configured brokers in turn.
        let broker = self.settings().broker.clone();
        let (connector, session) = match self.trial_session(&validated, &broker).await {
            Ok(made) => made,
            Err(why) => return (failed(why), None),
        };
        // Break: write the new identity, then switch to it in one rename.
        let (ca_pem, files) = match self
            .write_identity(validated, id, from_request, broker)
            .await
        {
            Ok(written) => written,
            Err(e) => {
                crate::broker::close_bounded(&session.connection, "identity not installed").await;
                return (failed(format!("cannot write the new identity: {e}")), None);
            }
        };
        tracing::info!(
            subject = %info.subject,
            serial = %info.serial,
            not_after = %info.not_after,
            cert = %files.cert.display(),
            "new identity installed; switching the broker session over"
        );
        *self.certs.identity.write().expect("identity lock") = Current {
            info,
            files,
            ca_pem,
        };
        let executed = Executed::applied(json!({ "certificate": described }));
        (executed, Some(Box::new(Rotation { connector, session })))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(e: impl Into<DispatchError>) -> (Status, ErrorCode, Option<String>, String) {
        let (status, error) = e.into().answer();
        (status, error.code, error.field, error.message)
    }

    #[test]
    fn each_failure_has_one_status_code_and_field() {
        let stale = FirewallError::Stale {
            current: 3,
            expected: "base generation 2".into(),
        };
        let (status, code, field, message) = answer(stale);
        assert_eq!(
            (status, code, field),
            (Status::Stale, ErrorCode::StaleGeneration, None)
        );
        assert!(message.contains("generation 3"), "{message}");
        let (status, code, field, _) = answer(FirewallError::UnknownSet {
            name: "web".into(),
            field: "$.data.rules[0].sources".into(),
        });
        assert_eq!(
            (status, code, field.as_deref()),
            (
                Status::Rejected,
                ErrorCode::UnknownSet,
                Some("$.data.rules[0].sources")
            )
        );
        let (status, code, field, _) = answer(CertError::KeyMismatch);
        assert_eq!(
            (status, code, field.as_deref()),
            (
                Status::Rejected,
                ErrorCode::KeyMismatch,
                Some("$.data.private_key_pem")
            )
        );
        let (status, code, field, message) =
            answer(DispatchError::ForeignNamespace("rampart-lr1".into()));
        assert_eq!(
            (status, code, field.as_deref()),
            (
                Status::Rejected,
                ErrorCode::ForeignNamespace,
                Some("$.data.id")
            )
        );
        assert!(message.contains("rampart-lr1"));
        let (status, code, field, message) = answer(DispatchError::Rotation("no session".into()));
        assert_eq!(
            (status, code, field),
            (Status::Failed, ErrorCode::RotationFailed, None)
        );
        assert_eq!(message, "no session");
        let (status, code, ..) = answer(StateError::Corrupt(
            serde_json::from_str::<Value>("{").unwrap_err(),
        ));
        assert_eq!((status, code), (Status::Failed, ErrorCode::StoreFailed));
    }
}
