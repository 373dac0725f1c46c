//! A batch's deliveries through the pipeline, one after the other in queue order: each
//! deduplicated and checked ([`Dispatcher::admit`]), then run in its domain
//! ([`Dispatcher::run`]). Consecutive `firewall.patch` commands that change set elements
//! only share one kernel transaction. Each is planned on the one
//! before and committed in memory; none is recorded until their one netlink batch went in
//! (a kernel transaction costs about the same for one element or a hundred, and on a large
//! set it is most of a patch's cost); if it does not go in, memory is taken back and they
//! run one by one, each with its own answer. Anything else (another command, a patch that
//! changes rules, a redelivery of a waiting patch) first makes the waiting patches'
//! transaction, so every command still sees the ones before it done.

use std::time::{Duration, Instant};

use serde_json::json;
use tokio::sync::MutexGuard;

use super::firewall::FirewallRequest;
use super::{Command, Dispatcher, Disposition, Domain, Executed, Outcome, Routed};
use crate::firewall::spec::Patch;
use crate::firewall::{Firewall, KernelChange, Undo};
use crate::protocol::{Incoming, Request, claimed_id};
use crate::state::Change;
use crate::sys::nfnl::SetChange;

/// A delivery's outcome, and how long it took from its turn to its answer.
#[derive(Debug)]
pub struct Done {
    /// The delivery's tag.
    pub tag: u64,
    /// Its outcome.
    pub outcome: Outcome,
    /// From the start of its turn to its outcome.
    pub took: Duration,
}

/// One batch's run through the pipeline ([`Dispatcher::batch`]).
pub struct Batch<'a> {
    d: &'a Dispatcher,
    group: Option<Group<'a>>,
}

/// Element-only patches committed in memory, waiting for their one kernel transaction,
/// under the firewall's lock (held until then).
struct Group<'a> {
    fw: MutexGuard<'a, Firewall>,
    /// The store epoch the firewall matched when the group began.
    epoch: u64,
    waiting: Vec<Waiting>,
}

/// A patch of a group.
struct Waiting {
    tag: u64,
    id: String,
    patch: Box<Patch>,
    raw: String,
    started: Instant,
    changes: Vec<SetChange>,
    undo: Undo,
    may_deny_more: bool,
}

impl Dispatcher {
    /// A run through the pipeline for one batch of deliveries; see [`Batch`].
    pub fn batch(&self) -> Batch<'_> {
        Batch {
            d: self,
            group: None,
        }
    }
}

impl Batch<'_> {
    /// Runs delivery `tag` after the ones before it. Returns the outcomes that are ready, in
    /// queue order: none while this one waits for its group's transaction, or those of the
    /// group and this one. Every outcome is returned by the time [`Batch::flush`] returns.
    #[tracing::instrument(name = "command", skip_all, fields(id, kind))]
    pub async fn handle(&mut self, tag: u64, incoming: Incoming) -> Vec<Done> {
        let started = Instant::now();
        let mut done = vec![];
        // A redelivery of a waiting patch is answered from its record: it must be made.
        if claimed_id(&incoming).is_some_and(|id| self.waits(&id)) {
            done.extend(self.flush().await);
        }
        let request = match self.d.admit(incoming).await {
            Ok(request) => request,
            Err(answered) => {
                // Answered at once (refused, or a duplicate): after the ones before it.
                done.extend(self.flush().await);
                return with(done, tag, answered, started);
            }
        };
        let type_name = request.kind.type_name();
        let span = tracing::Span::current();
        span.record("id", request.id.as_str());
        span.record("kind", type_name);
        if self.waits(&request.id) {
            done.extend(self.flush().await);
            if let Some(again) = self.d.duplicate_of(&request.id, type_name).await {
                return with(done, tag, again, started);
            }
        }
        let Request { id, kind, .. } = request;
        let command = Command {
            id: &id,
            type_name,
            started,
        };
        let routed = match Routed::of(kind) {
            Routed::Firewall(FirewallRequest::Patch {
                patch,
                raw,
                dry_run: false,
            }) => match self.join(tag, &id, patch, raw, started).await {
                Ok(()) => return done,
                Err((patch, raw)) => Routed::Firewall(FirewallRequest::Patch {
                    patch,
                    raw,
                    dry_run: false,
                }),
            },
            routed => routed,
        };
        done.extend(self.flush().await);
        let outcome = self.d.route(command, routed).await;
        with(done, tag, outcome, started)
    }

    fn waits(&self, id: &str) -> bool {
        (self.group.iter()).any(|g| g.waiting.iter().any(|w| w.id == id))
    }

    /// Plans `patch` on the waiting ones and commits it in memory, when it changes set
    /// elements only; else hands it back, to run on its own.
    async fn join(
        &mut self,
        tag: u64,
        id: &str,
        patch: Box<Patch>,
        raw: String,
        started: Instant,
    ) -> Result<(), (Box<Patch>, String)> {
        let group = match &mut self.group {
            Some(group) => group,
            None => {
                let mut fw = self.d.firewall.hold().await;
                let epoch = match self.d.firewall.fence(&mut fw).await {
                    Some(epoch) => epoch,
                    None => self.d.store.epoch(),
                };
                self.group.insert(Group {
                    fw,
                    epoch,
                    waiting: vec![],
                })
            }
        };
        let plan = match group.fw.plan_patch(&patch) {
            Ok(plan) => plan,
            Err(_) => return Err((patch, raw)),
        };
        let Some(changes) = plan.elements().map(<[SetChange]>::to_vec) else {
            return Err((patch, raw));
        };
        let may_deny_more = plan.may_deny_more;
        let undo = group.fw.commit_elements(plan);
        group.waiting.push(Waiting {
            tag,
            id: id.to_string(),
            patch,
            raw,
            started,
            changes,
            undo,
            may_deny_more,
        });
        Ok(())
    }

    /// Makes the waiting patches' one kernel transaction and records them; if it fails,
    /// takes them back and runs them one by one. Returns their outcomes, in order.
    pub async fn flush(&mut self) -> Vec<Done> {
        let Some(Group { fw, epoch, waiting }) = self.group.take() else {
            return vec![];
        };
        if waiting.is_empty() {
            return vec![];
        }
        let changes = (waiting.iter())
            .flat_map(|w| w.changes.iter().cloned())
            .collect();
        let t = Instant::now();
        match fw.apply_kernel(&KernelChange::Elements(changes)).await {
            Ok(()) => {
                tracing::debug!(
                    patches = waiting.len(),
                    kernel_us = t.elapsed().as_micros() as u64,
                    "firewall patches applied to the kernel in one transaction"
                );
                self.recorded(fw, epoch, waiting).await
            }
            Err(error) => {
                tracing::warn!(%error, patches = waiting.len(), "the patches' one transaction failed; running them one by one");
                self.one_by_one(fw, waiting).await
            }
        }
    }

    /// The group is in the kernel: each patch recorded (written with the batch's records),
    /// then what follows from them, once: connections they deny cut, the journal compacted.
    async fn recorded(
        &self,
        mut fw: MutexGuard<'_, Firewall>,
        epoch: u64,
        waiting: Vec<Waiting>,
    ) -> Vec<Done> {
        let mut done = Vec::with_capacity(waiting.len());
        let mut may_deny_more = false;
        for w in waiting {
            let executed = Executed::applied(json!({ "generation": w.patch.generation }));
            let ack = self.d.ack_of(&w.id, "firewall.patch", executed, w.started);
            let unsynced =
                (self.d.store).commit_deferred(epoch, &w.id, &ack, Change::FirewallPatch(w.raw));
            tracing::info!(command_id = %w.id, command_type = "firewall.patch", status = ack.status.as_str(), duration_us = w.started.elapsed().as_micros() as u64, "command processed");
            may_deny_more |= w.may_deny_more;
            let outcome = Outcome {
                ack,
                disposition: Disposition::Ack,
                rotation: None,
                unsynced: Some(unsynced),
            };
            done.push(Done {
                tag: w.tag,
                outcome,
                took: w.started.elapsed(),
            });
        }
        if may_deny_more {
            fw.cut_denied().await;
        }
        self.d.firewall.maybe_compact(&fw).await;
        done
    }

    /// The group's transaction failed: memory is taken back (newest first), then each patch
    /// runs alone, so that each gets the answer it would have had.
    async fn one_by_one(
        &self,
        mut fw: MutexGuard<'_, Firewall>,
        waiting: Vec<Waiting>,
    ) -> Vec<Done> {
        let mut kept = Vec::with_capacity(waiting.len());
        for w in waiting.into_iter().rev() {
            let Waiting { undo, .. } = w;
            fw.undo(undo);
            kept.push((w.tag, w.id, w.patch, w.raw, w.started));
        }
        drop(fw);
        let mut done = Vec::with_capacity(kept.len());
        for (tag, id, patch, raw, started) in kept.into_iter().rev() {
            let command = Command {
                id: &id,
                type_name: "firewall.patch",
                started,
            };
            let request = FirewallRequest::Patch {
                patch,
                raw,
                dry_run: false,
            };
            let outcome = self.d.run(&self.d.firewall, command, request).await;
            done.push(Done {
                tag,
                outcome,
                took: started.elapsed(),
            });
        }
        done
    }
}

/// `done` and then `outcome` (of delivery `tag`, whose turn began at `started`).
fn with(mut done: Vec<Done>, tag: u64, outcome: Outcome, started: Instant) -> Vec<Done> {
    done.push(Done {
        tag,
        outcome,
        took: started.elapsed(),
    });
    done
}
