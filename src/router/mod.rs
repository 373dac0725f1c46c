//! Logical routers: the wanted routers (as recorded), converging the kernel to them, and
//! reconciling at start and on `state.sync`. Kernel work goes to the namespace thread.

pub mod kernel;
pub mod plan;
pub mod spec;

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

use crate::faults::{self, Fault};
use crate::sys::netns::{self, NetnsWorker};
use kernel::KernelError;
use plan::{Observed, Step};
use spec::{NETNS_PREFIX, RouterSpec};

/// Why a router command failed.
#[derive(Debug, thiserror::Error)]
pub enum RouterError {
    /// An interface names a bridge the host does not have.
    #[error("bridge {bridge} does not exist on this host (or is not a bridge)")]
    UnknownBridge {
        /// The bridge.
        bridge: String,
        /// The interface field that names it, as a JSON path.
        field: String,
    },
    /// A kernel operation failed (what was done before it is rolled back).
    #[error("{0}")]
    Kernel(#[from] KernelError),
}

/// How a router stands against the kernel, as last seen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RouterState {
    /// The kernel matched the record when last converged.
    Applied,
    /// The last repair failed; the next reconcile retries.
    Degraded,
}

/// One router as the state summary and `rampart status` list it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Summary {
    /// The router's id.
    pub id: String,
    /// Its interfaces' names (inside its namespace).
    pub interfaces: Vec<String>,
    /// How it stood against the kernel when last seen.
    pub state: RouterState,
}

/// What a reconcile changed: for the `drift.<host>` event and the log.
#[derive(Debug, Default, Serialize)]
pub struct Reconciled {
    /// Wanted routers that had to be repaired, with the steps taken.
    pub repaired: BTreeMap<String, Vec<String>>,
    /// Owned routers that are no longer wanted and were removed.
    pub removed: Vec<String>,
    /// Routers that could not be repaired, with the reason.
    pub failed: BTreeMap<String, String>,
}

impl Reconciled {
    /// Nothing was found to change.
    pub fn is_empty(&self) -> bool {
        self.repaired.is_empty() && self.removed.is_empty() && self.failed.is_empty()
    }
}

/// The logical routers: the ones wanted (as recorded), the ids the agent owns, and how
/// each stood against the kernel; the kernel side goes through the netns worker thread.
pub struct Routers {
    worker: NetnsWorker,
    wanted: BTreeMap<String, RouterSpec>,
    /// Ids the agent may have made a namespace for (recorded before the first kernel change).
    owned: BTreeSet<String>,
    state: BTreeMap<String, RouterState>,
}

impl Routers {
    /// The routers as recorded, made through `worker`.
    pub fn new(worker: NetnsWorker, wanted: Vec<RouterSpec>, owned: BTreeSet<String>) -> Routers {
        Routers {
            worker,
            wanted: wanted.into_iter().map(|s| (s.id.clone(), s)).collect(),
            owned,
            state: BTreeMap::new(),
        }
    }

    /// The recorded spec of router `id`.
    pub fn get(&self, id: &str) -> Option<&RouterSpec> {
        self.wanted.get(id)
    }

    /// Whether the agent may have made router `id`'s namespace (so may remove it).
    pub fn is_owned(&self, id: &str) -> bool {
        self.owned.contains(id)
    }

    /// Every bridge the spec names must exist before anything is made.
    pub async fn check_bridges(&self, spec: &RouterSpec) -> Result<(), RouterError> {
        for (i, iface) in spec.interfaces.iter().enumerate() {
            let Some(bridge) = iface.bridge.clone() else {
                continue;
            };
            let b = bridge.clone();
            let exists = self
                .worker
                .run(move |ctx| async move { kernel::is_bridge(&ctx, &b).await })
                .await?;
            if !exists {
                return Err(RouterError::UnknownBridge {
                    bridge,
                    field: format!("$.data.interfaces[{i}].bridge"),
                });
            }
        }
        Ok(())
    }

    /// Brings the kernel to `spec`; returns the steps that were needed (none: equal).
    pub async fn converge(&self, spec: &RouterSpec) -> Result<Vec<Step>, KernelError> {
        let spec = spec.clone();
        let crash = faults::is_armed(Fault::CrashMidRouterCreate);
        self.worker
            .run(move |ctx| async move {
                let observed = kernel::observe(&ctx, &spec).await?;
                let steps = plan::plan(&spec, &observed);
                if crash && !observed.namespace && steps.len() > 2 {
                    kernel::apply(&ctx, &spec, &steps[..2]).await?;
                    faults::crash_if(Fault::CrashMidRouterCreate, &spec.id);
                }
                kernel::apply(&ctx, &spec, &steps).await?;
                Ok(steps)
            })
            .await
    }

    /// Removes router `id` from the kernel: its namespace and every host end it has (those
    /// of `spec` when known, and any the agent's alias names).
    pub async fn remove(&self, id: &str, spec: Option<&RouterSpec>) -> Result<(), KernelError> {
        let id = id.to_string();
        let mut ends: Vec<String> = spec
            .map(|s| s.interfaces.iter().map(|i| i.host_name(&s.id)).collect())
            .unwrap_or_default();
        let by_alias = spec.is_none();
        self.worker
            .run(move |ctx| async move {
                if by_alias {
                    ends = kernel::agent_host_links(&ctx)
                        .await?
                        .remove(&id)
                        .unwrap_or_default();
                }
                kernel::delete(&ctx, &id, &ends).await
            })
            .await
    }

    /// The id is about to get kernel objects: the caller has recorded it as owned.
    pub fn note_owned(&mut self, id: &str) {
        self.owned.insert(id.to_string());
    }

    /// A new router was rolled back entirely and disowned in the store.
    pub fn forget(&mut self, id: &str) {
        if !self.wanted.contains_key(id) {
            self.owned.remove(id);
        }
    }

    /// The record now holds `spec` (after the store commit).
    pub fn commit_put(&mut self, spec: RouterSpec) {
        self.state.insert(spec.id.clone(), RouterState::Applied);
        self.owned.insert(spec.id.clone());
        self.wanted.insert(spec.id.clone(), spec);
    }

    /// The record no longer holds `id` (after the store commit).
    pub fn commit_delete(&mut self, id: &str) {
        self.wanted.remove(id);
        self.owned.remove(id);
        self.state.remove(id);
    }

    /// Converges the kernel to the record: repairs wanted routers, removes owned ones that
    /// are no longer wanted, leaves every other namespace alone. Returns what it did; the
    /// ids it removed are to be disowned in the store by the caller.
    pub async fn reconcile(&mut self) -> Reconciled {
        let mut done = Reconciled::default();
        let listed = self
            .worker
            .run(|_| async { netns::list_ns(NETNS_PREFIX) })
            .await;
        let present: BTreeSet<String> = match listed {
            Ok(names) => names
                .into_iter()
                .filter_map(|n| n.strip_prefix(NETNS_PREFIX).map(str::to_string))
                .collect(),
            Err(e) => {
                tracing::warn!(error = %e, "cannot list router namespaces");
                BTreeSet::new()
            }
        };
        let stray_links = self
            .worker
            .run(|ctx| async move { kernel::agent_host_links(&ctx).await })
            .await
            .unwrap_or_else(|e| {
                tracing::warn!(error = %e, "cannot list the agent's host interfaces");
                BTreeMap::new()
            });
        let unwanted: BTreeSet<String> = present
            .iter()
            .chain(stray_links.keys())
            .filter(|id| self.owned.contains(*id) && !self.wanted.contains_key(*id))
            .cloned()
            .collect();
        for id in unwanted {
            match self.remove(&id, None).await {
                Ok(()) => done.removed.push(id),
                Err(e) => {
                    done.failed.insert(id, e.to_string());
                }
            }
        }
        let wanted: Vec<RouterSpec> = self.wanted.values().cloned().collect();
        for spec in wanted {
            match self.converge(&spec).await {
                Ok(steps) => {
                    self.state.insert(spec.id.clone(), RouterState::Applied);
                    if !steps.is_empty() {
                        done.repaired.insert(
                            spec.id.clone(),
                            steps.iter().map(|s| s.to_string()).collect(),
                        );
                    }
                }
                Err(e) => {
                    self.state.insert(spec.id.clone(), RouterState::Degraded);
                    done.failed.insert(spec.id.clone(), e.to_string());
                }
            }
        }
        for id in &done.removed {
            self.owned.remove(id);
        }
        done
    }

    /// The `routers` part of the state summary.
    pub fn summary(&self) -> Vec<Summary> {
        self.wanted
            .values()
            .map(|s| Summary {
                id: s.id.clone(),
                interfaces: s.interfaces.iter().map(|i| i.name.clone()).collect(),
                state: self
                    .state
                    .get(&s.id)
                    .copied()
                    .unwrap_or(RouterState::Applied),
            })
            .collect()
    }

    /// Each router with the kernel's view beside the record, for `rampart routers`.
    pub async fn inspect(&self) -> Vec<View> {
        let mut out = Vec::new();
        for spec in self.wanted.values() {
            let s = spec.clone();
            let observed = self
                .worker
                .run(move |ctx| async move { kernel::observe(&ctx, &s).await })
                .await;
            out.push(view(spec, observed));
        }
        out
    }
}

/// A router as `rampart routers` shows it: its record, and how the kernel differs.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct View {
    /// The router's id.
    pub id: String,
    /// Its network namespace.
    pub namespace: String,
    /// Whether the namespace exists.
    pub present: bool,
    /// Its interfaces.
    pub interfaces: Vec<InterfaceView>,
    /// Its static routes.
    pub routes: Vec<RouteView>,
    /// The kernel matches the record.
    pub in_sync: bool,
    /// What converging would do, one step per line.
    pub pending: Vec<String>,
    /// Why the kernel could not be read.
    pub error: Option<String>,
}

/// One interface of a [`View`].
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct InterfaceView {
    /// The name inside the router's namespace.
    pub name: String,
    /// The host end's name.
    pub host: String,
    /// Its addresses (CIDR), as recorded.
    pub addresses: Vec<String>,
    /// Its MTU.
    pub mtu: u32,
    /// The host bridge the host end is enslaved to, if any.
    pub bridge: Option<String>,
    /// Whether both ends are up.
    pub state: LinkState,
}

/// Whether both ends of an interface are up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LinkState {
    /// Both ends exist and are up.
    Up,
    /// Both exist; one is down.
    Down,
    /// An end is missing.
    Missing,
}

impl LinkState {
    /// As `rampart routers` and the JSON spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            LinkState::Up => "up",
            LinkState::Down => "down",
            LinkState::Missing => "missing",
        }
    }
}

/// One static route of a [`View`].
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RouteView {
    /// The destination prefix.
    pub destination: String,
    /// The next hop.
    pub via: String,
}

fn view(spec: &RouterSpec, observed: Result<Observed, KernelError>) -> View {
    let (observed, error) = match observed {
        Ok(o) => (o, None),
        Err(e) => (Observed::default(), Some(e.to_string())),
    };
    let pending: Vec<String> = plan::plan(spec, &observed)
        .iter()
        .map(|s| s.to_string())
        .collect();
    let interfaces = spec
        .interfaces
        .iter()
        .map(|i| {
            let state = match observed.interfaces.get(&i.name) {
                None => LinkState::Missing,
                Some(o) if o.up && o.host.as_ref().is_some_and(|h| h.up) => LinkState::Up,
                Some(_) => LinkState::Down,
            };
            InterfaceView {
                name: i.name.clone(),
                host: i.host_name(&spec.id),
                addresses: i.addresses.iter().map(|a| a.to_string()).collect(),
                mtu: i.mtu,
                bridge: i.bridge.clone(),
                state,
            }
        })
        .collect();
    let routes = spec
        .routes
        .iter()
        .map(|r| RouteView {
            destination: r.destination.to_string(),
            via: r.via.to_string(),
        })
        .collect();
    View {
        id: spec.id.clone(),
        namespace: spec.netns(),
        present: observed.namespace,
        interfaces,
        routes,
        in_sync: pending.is_empty() && error.is_none(),
        pending,
        error,
    }
}

#[cfg(test)]
mod view_tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_routers_answer_keeps_its_json() {
        let spec: RouterSpec = serde_json::from_value(json!({"id": "r1", "interfaces": [
            {"name": "eth0", "addresses": ["192.168.10.1/24"], "mtu": 1500, "bridge": "br0"},
            {"name": "eth1", "addresses": [], "mtu": 9000}],
            "routes": [{"destination": "10.9.0.0/16", "via": "192.168.10.254"}]}))
        .unwrap();
        let expected = json!({"error": null, "id": "r1", "in_sync": false, "interfaces": [
            {"addresses": ["192.168.10.1/24"], "bridge": "br0", "host": "rp15b4d48a8c",
             "mtu": 1500, "name": "eth0", "state": "missing"},
            {"addresses": [], "bridge": null, "host": "rpc461fb91d4", "mtu": 9000,
             "name": "eth1", "state": "missing"}],
            "namespace": "lr-r1",
            "pending": ["create namespace", "add interface eth0", "add interface eth1",
                        "add route 10.9.0.0/16 via 192.168.10.254"],
            "present": false,
            "routes": [{"destination": "10.9.0.0/16", "via": "192.168.10.254"}]});
        let answer = |observed| serde_json::to_value(view(&spec, observed)).unwrap();
        assert_eq!(answer(Ok(Observed::default())), expected);
        let error = KernelError {
            step: "reading links".into(),
            cause: "gone".into(),
        };
        let mut failed = expected.clone();
        failed["error"] = json!("reading links: gone");
        assert_eq!(answer(Err(error)), failed);
    }
}
