//! The logical routers' commands: `router.create` (converge to the spec) and
//! `router.delete`; the id owned durably before the first kernel change, the kernel put
//! back to the record when a command fails or its record cannot be kept.

use std::sync::Arc;

use serde_json::{Value, json};
use tokio::sync::{Mutex, MutexGuard};

use super::{DispatchError, Domain, Executed, Recorded};
use crate::router::spec::RouterSpec;
use crate::router::{RouterError, Routers};
use crate::state::{Change, StateError, Store};

/// A router command, checked.
pub(super) enum RouterRequest {
    Create(Box<RouterSpec>),
    Delete(String),
}

/// What a router command did in the kernel, to record and then make current.
pub(super) enum RouterEffect {
    None,
    /// Router `spec` is in the kernel; `previous` is what the record held before.
    Put {
        spec: Box<RouterSpec>,
        previous: Option<Box<RouterSpec>>,
    },
    /// Router `id` is gone from the kernel; `previous` is what the record held.
    Delete {
        id: String,
        previous: Option<Box<RouterSpec>>,
    },
}

impl Recorded for RouterEffect {
    fn record(&mut self) -> Change {
        match self {
            RouterEffect::None => Change::None,
            RouterEffect::Put { spec, .. } => Change::RouterPut {
                id: spec.id.clone(),
                spec: spec.to_json(),
            },
            RouterEffect::Delete { id, .. } => Change::RouterDelete(id.clone()),
        }
    }
}

/// The router domain: the routers in force (behind the lock every router command and the
/// reconcile hold), the store that owns their ids, where reconcile results go.
pub(super) struct RouterDomain {
    pub(super) routers: Arc<Mutex<Routers>>,
    store: Arc<Store>,
    /// Where reconcile results go (as `drift.<host>` events).
    pub(super) drift: tokio::sync::mpsc::Sender<Value>,
}

impl Domain for RouterDomain {
    type Request = RouterRequest;
    type Held<'a> = MutexGuard<'a, Routers>;
    type Effect = RouterEffect;

    async fn hold(&self) -> Self::Held<'_> {
        self.routers.lock().await
    }

    async fn execute(
        &self,
        routers: &mut Self::Held<'_>,
        _id: &str,
        request: RouterRequest,
    ) -> Result<(Executed, RouterEffect), StateError> {
        Ok(match request {
            RouterRequest::Create(spec) => self.create(routers, *spec).await,
            RouterRequest::Delete(id) => delete(routers, id).await,
        })
    }

    async fn roll_back(&self, routers: &mut Self::Held<'_>, effect: &RouterEffect) {
        undo(routers, effect).await;
    }

    async fn commit(&self, mut routers: Self::Held<'_>, effect: RouterEffect) {
        match effect {
            RouterEffect::Put { spec, .. } => routers.commit_put(*spec),
            RouterEffect::Delete { id, .. } => routers.commit_delete(&id),
            RouterEffect::None => {}
        }
    }
}

impl RouterDomain {
    pub(super) fn new(
        routers: Arc<Mutex<Routers>>,
        store: Arc<Store>,
        drift: tokio::sync::mpsc::Sender<Value>,
    ) -> RouterDomain {
        RouterDomain {
            routers,
            store,
            drift,
        }
    }

    /// Records `spec`'s id as the agent's own, durably, before its first kernel change;
    /// a namespace someone else made is never adopted (rolling back would delete it).
    /// `Some`: the answer instead.
    async fn own(&self, routers: &mut Routers, spec: &RouterSpec) -> Option<Executed> {
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
    async fn disown(&self, routers: &mut Routers, id: &str) {
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
    async fn create(&self, routers: &mut Routers, spec: RouterSpec) -> (Executed, RouterEffect) {
        let failed = |e: RouterError| {
            let executed = Executed::failed(e, json!({ "router": spec.id }));
            (executed, RouterEffect::None)
        };
        if let Err(e) = routers.check_bridges(&spec).await {
            return failed(e);
        }
        if !routers.is_owned(&spec.id)
            && let Some(refused) = self.own(routers, &spec).await
        {
            return (refused, RouterEffect::None);
        }
        let previous = routers.get(&spec.id).cloned().map(Box::new);
        match routers.converge(&spec).await {
            Ok(steps) => {
                tracing::debug!(router = %spec.id, steps = steps.len(), "router converged");
                let executed = Executed::applied(
                    json!({ "router": spec.id, "changes": steps.len(), "noop": steps.is_empty() }),
                );
                let effect = RouterEffect::Put {
                    spec: Box::new(spec),
                    previous,
                };
                (executed, effect)
            }
            Err(e) => {
                tracing::warn!(router = %spec.id, error = %e, "router create failed; rolling back");
                let was_new = previous.is_none();
                let undone = RouterEffect::Put {
                    spec: Box::new(spec.clone()),
                    previous,
                };
                // A new router rolled back entirely is no longer the agent's to watch.
                if undo(routers, &undone).await && was_new {
                    self.disown(routers, &spec.id).await;
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
async fn delete(routers: &mut Routers, id: String) -> (Executed, RouterEffect) {
    let previous = routers.get(&id).cloned().map(Box::new);
    if previous.is_none() && !routers.is_owned(&id) {
        let executed = Executed::applied(json!({ "router": id, "absent": true }));
        return (executed, RouterEffect::None);
    }
    match routers.remove(&id, previous.as_deref()).await {
        Ok(()) => (
            Executed::applied(json!({ "router": id, "absent": previous.is_none() })),
            RouterEffect::Delete { id, previous },
        ),
        Err(e) => {
            tracing::warn!(router = %id, error = %e, "router delete failed; restoring it");
            let undone = RouterEffect::Delete {
                id: id.clone(),
                previous,
            };
            undo(routers, &undone).await;
            let executed = Executed::failed(RouterError::Kernel(e), json!({ "router": id }));
            (executed, RouterEffect::None)
        }
    }
}

/// Puts the kernel back to the record as it was before a router command.
/// True when the kernel is back as it was.
async fn undo(routers: &Routers, effect: &RouterEffect) -> bool {
    let (id, previous) = match effect {
        RouterEffect::Put { spec, previous } => (spec.id.as_str(), previous),
        RouterEffect::Delete { id, previous } => (id.as_str(), previous),
        RouterEffect::None => return true,
    };
    let result = match (previous, effect) {
        (Some(p), _) => routers.converge(p).await.map(|_| ()),
        (None, RouterEffect::Put { spec, .. }) => routers.remove(id, Some(spec)).await,
        (None, _) => Ok(()),
    };
    match result {
        Ok(()) => true,
        Err(e) => {
            tracing::error!(router = %id, error = %e, "could not roll the router back; the next reconcile retries");
            false
        }
    }
}
