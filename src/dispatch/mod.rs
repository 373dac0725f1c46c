//! From a delivery to an outcome: decode, deduplicate, apply, persist, and only then hand
//! back the ack to publish. The order apply -> persist -> ack is what makes effects
//! at-most-once across crashes and redeliveries.

use std::sync::Arc;
use std::time::Instant;

use serde_json::{Value, json};
use tokio::sync::Mutex;

use crate::certs::{CertError, Current};
use crate::faults::{self, Fault};
use crate::firewall::{Firewall, FirewallError};
use crate::protocol::{
    Ack, AckError, DecodeContext, ErrorCode, Incoming, Request, RequestKind, Status, claimed_id,
    decode,
};
use crate::router::{RouterError, Routers};
use crate::state::{Change, StateError, Store};

mod batch;
mod cert;
mod firewall;
mod read;
mod router;

pub use batch::{Batch, Done};
pub use firewall::replay_firewall;
pub use router::reconcile_routers;

use cert::{CertCommand, Certs};
use firewall::{FirewallRequest, Firewalls};
use read::Read;
use router::{RouterDomain, RouterRequest};

/// What to do with the AMQP delivery once the ack is confirmed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disposition {
    /// Processed (whatever the status): remove it from the queue.
    Ack,
    /// Refused: reject without requeue, so the broker dead-letters it.
    Reject,
}

/// What the pipeline hands back for one delivery: the ack and how to settle the delivery.
#[derive(Debug)]
pub struct Outcome {
    /// The ack to publish (once the record is written).
    pub ack: Ack,
    /// How to settle the delivery once the ack is confirmed.
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

/// The broker session opened with a newly installed identity, and how to open more.
pub struct Rotation {
    /// Opens sessions on the new identity (the next reconnects).
    pub connector: crate::broker::Connector,
    /// The session the new identity opened, already accepted by the broker.
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
    /// Where installed identities and the pending key live.
    pub state_dir: std::path::PathBuf,
}

/// The configuration in force with what is derived from it (the decode context, with the
/// signing keys read from their files): one value, replaced whole on a reload, so every
/// reader sees either the old settings or the new ones, never a mix.
#[derive(Debug)]
pub struct Settings {
    /// The configuration file as read.
    pub config: crate::config::Config,
    /// What decoding checks commands against (host id, senders, keys, limits).
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
    /// A firewall command was stale, refused, or failed in the kernel.
    #[error(transparent)]
    Firewall(#[from] FirewallError),
    /// A router command was refused or failed in the kernel.
    #[error(transparent)]
    Router(#[from] RouterError),
    /// `cert.install` refused the bundle.
    #[error(transparent)]
    Cert(#[from] CertError),
    /// The state store failed.
    #[error(transparent)]
    Store(#[from] StateError),
    /// `router.create` found a namespace the agent did not make.
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

/// One domain's commands behind the pipeline's one interface: the lock a command holds
/// from plan to commit, then check against the current state and apply to the kernel
/// (`execute`, returning one effect), then either make the effect current once its record
/// is kept (`commit`) or undo it in the kernel when the record cannot be kept (`roll_back`).
trait Domain {
    /// A checked request of this domain.
    type Request;
    /// What a command holds from plan to commit (the domain's lock), so drift repair and
    /// reconciles never interleave with it.
    type Held<'a>
    where
        Self: 'a;
    /// What an executed command did.
    type Effect: Recorded;

    /// Takes the domain's lock.
    async fn hold(&self) -> Self::Held<'_>;

    /// The store epoch the state under the lock matches, when the domain keeps one.
    async fn fence(&self, _held: &mut Self::Held<'_>) -> Option<u64> {
        None
    }

    /// Whether `request` only asks what it would do (nothing kept, not even its id).
    fn dry_run(_request: &Self::Request) -> bool {
        false
    }

    /// Checks `request` against the current state and applies it to the kernel. `Err`:
    /// the store could not be read.
    async fn execute(
        &self,
        held: &mut Self::Held<'_>,
        id: &str,
        request: Self::Request,
    ) -> Result<(Executed, Self::Effect), StateError>;

    /// Undoes in the kernel what `effect` did, when its record could not be kept.
    async fn roll_back(&self, held: &mut Self::Held<'_>, effect: &Self::Effect);

    /// Makes `effect` current in memory once its record is kept (and what follows).
    async fn commit(&self, held: Self::Held<'_>, effect: Self::Effect);
}

/// An effect as the pipeline sees it: what the store records of it, and the session on a
/// new identity it may carry.
trait Recorded {
    /// What the store records with the command's ack (raw JSON moves into it).
    fn record(&mut self) -> Change;

    /// The session on a newly installed identity, to hand over once the ack is out.
    fn rotation(&mut self) -> Option<Box<Rotation>> {
        None
    }
}

/// A checked request, routed to its domain.
enum Routed {
    Firewall(FirewallRequest),
    Router(RouterRequest),
    Cert(CertCommand),
    Read(Read),
}

impl Routed {
    fn of(kind: RequestKind) -> Routed {
        match kind {
            RequestKind::Ping => Routed::Read(Read::Ping),
            RequestKind::StateSync { counters } => Routed::Read(Read::StateSync { counters }),
            RequestKind::FirewallApply {
                rules,
                raw,
                dry_run,
            } => Routed::Firewall(FirewallRequest::Apply {
                rules,
                raw,
                dry_run,
            }),
            RequestKind::FirewallPatch {
                patch,
                raw,
                dry_run,
            } => Routed::Firewall(FirewallRequest::Patch {
                patch,
                raw,
                dry_run,
            }),
            RequestKind::RouterCreate(spec) => Routed::Router(RouterRequest::Create(spec)),
            RequestKind::RouterDelete { id } => Routed::Router(RouterRequest::Delete(id)),
            RequestKind::CertRequest(req) => Routed::Cert(CertCommand::Request(req)),
            RequestKind::CertInstall(bundle) => Routed::Cert(CertCommand::Install(bundle)),
        }
    }
}

/// Who a command is, for its ack and logs.
struct Command<'a> {
    id: &'a str,
    type_name: &'static str,
    started: Instant,
}

/// The command pipeline: decode, deduplicate, run in the command's domain, record; the
/// batch's records written by [`Dispatcher::sync`] before the acks go out.
pub struct Dispatcher {
    store: Arc<Store>,
    settings: SettingsWatch,
    host_id: String,
    firewall: Firewalls,
    routers: RouterDomain,
    certs: Certs,
}

impl Dispatcher {
    /// A pipeline over the store, the settings in force and each domain's state.
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
            firewall: Firewalls::new(firewall, store.clone()),
            routers: RouterDomain::new(routers, store.clone(), drift),
            certs: Certs::new(certs, settings.clone(), host_id.clone()),
            store,
            host_id,
            settings,
        }
    }

    /// Shares the record of a state lost at start (see `daemon::after_state_lost`) with the
    /// control socket; a full rule set clears it.
    pub fn with_state_lost(mut self, lost: Arc<std::sync::Mutex<Option<Value>>>) -> Dispatcher {
        self.firewall.state_lost = lost;
        self
    }

    /// The host id commands must name.
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

    /// Runs a checked request in its domain.
    async fn route(&self, command: Command<'_>, routed: Routed) -> Outcome {
        match routed {
            Routed::Firewall(r) => self.run(&self.firewall, command, r).await,
            Routed::Router(r) => self.run(&self.routers, command, r).await,
            Routed::Cert(r) => self.run(&self.certs, command, r).await,
            Routed::Read(r) => self.run(self, command, r).await,
        }
    }

    /// The pipeline every domain's commands go through: under the domain's lock, execute
    /// against the current state and the kernel, then record the outcome before handing
    /// back the ack, and only then make it current (or roll back what it did when the
    /// record cannot be kept). Rejections and dry runs are not recorded.
    async fn run<D: Domain>(
        &self,
        domain: &D,
        command: Command<'_>,
        request: D::Request,
    ) -> Outcome {
        let Command {
            id,
            type_name,
            started,
        } = command;
        let dry_run = D::dry_run(&request);
        let mut held = domain.hold().await;
        let epoch = match domain.fence(&mut held).await {
            Some(epoch) => epoch,
            None => self.store.epoch(),
        };
        let (executed, mut effect) = match domain.execute(&mut held, id, request).await {
            Ok(done) => done,
            Err(e) => return self.store_failure(id, type_name, e),
        };
        // An identity switched stays switched, whatever becomes of the record.
        let rotation = effect.rotation();
        let ack = self.ack_of(id, type_name, executed, started);
        if ack.status == Status::Rejected {
            // Not recorded: a rejection changed nothing.
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
        let persisted = self.persist(id, &ack, effect.record(), epoch).await;
        tracing::debug!(command_id = %id, persist_us = persist_started.elapsed().as_micros() as u64, "outcome stored");
        let unsynced = match persisted {
            Ok(unsynced) => unsynced,
            Err(e) => {
                domain.roll_back(&mut held, &effect).await;
                let mut outcome = self.store_failure(id, type_name, e);
                outcome.rotation = rotation;
                return outcome;
            }
        };
        domain.commit(held, effect).await;
        if unsynced.is_none() {
            faults::crash_if(Fault::CrashAfterPersist, id);
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
            self.firewall.recover().await;
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
