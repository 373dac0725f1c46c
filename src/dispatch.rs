//! From a delivery to an outcome: decode, deduplicate, apply, persist, and only then hand
//! back the ack to publish. The order apply -> persist -> ack is what makes effects
//! at-most-once across crashes and redeliveries.

use std::sync::Arc;
use std::time::Instant;

use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::broker::tls::CertInfo;
use crate::protocol::{
    Ack, AckError, DecodeContext, ErrorCode, Incoming, Request, RequestKind, Status, decode,
};
use crate::state::Store;

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
}

/// Test-only crash points, read once from `RAMPART_FAULT` (see docs/operations.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    None,
    /// SIGKILL itself right after a command's outcome is committed, before the ack is sent.
    CrashAfterPersist,
}

impl Fault {
    pub fn from_env() -> Fault {
        match std::env::var("RAMPART_FAULT").as_deref() {
            Ok("crash_after_persist") => Fault::CrashAfterPersist,
            _ => Fault::None,
        }
    }
}

pub struct Dispatcher {
    store: Arc<Store>,
    decode: DecodeContext,
    certificate: CertInfo,
    fault: Fault,
}

impl Dispatcher {
    pub fn new(store: Arc<Store>, decode: DecodeContext, certificate: CertInfo) -> Dispatcher {
        Dispatcher {
            store,
            decode,
            certificate,
            fault: Fault::from_env(),
        }
    }

    pub fn host_id(&self) -> &str {
        &self.decode.host_id
    }

    pub async fn handle(&self, incoming: Incoming) -> Outcome {
        let started = Instant::now();
        let request = match decode(&self.decode, &incoming) {
            Ok(r) => r,
            Err(rejection) => {
                tracing::warn!(
                    command_id = rejection.correlation_id.as_deref().unwrap_or("-"),
                    command_type = rejection.command_type.as_deref().unwrap_or("-"),
                    code = ?rejection.error.code,
                    field = rejection.error.field.as_deref().unwrap_or("-"),
                    error = %rejection.error.message,
                    "command rejected"
                );
                // Rejections are not recorded: they changed nothing, re-checking a redelivery
                // gives the same answer, and recording them would let an untrusted sender
                // reserve a command id before the manager uses it.
                let ack = Ack::new(
                    self.host_id(),
                    rejection.correlation_id,
                    rejection.command_type,
                    Status::Rejected,
                    Some(rejection.error),
                    json!({}),
                );
                return Outcome {
                    ack,
                    disposition: Disposition::Reject,
                };
            }
        };

        match self.lookup(&request.id).await {
            Ok(Some(original)) => {
                tracing::info!(command_id = %request.id, status = original.status.as_str(), "duplicate command: answering with the stored ack");
                return Outcome {
                    ack: original.as_duplicate(),
                    disposition: Disposition::Ack,
                };
            }
            Ok(None) => {}
            Err(e) => return self.store_failure(&request, e),
        }

        let (status, error, mut data) = self.execute(&request).await;
        if let Value::Object(map) = &mut data {
            map.insert(
                "duration_us".into(),
                json!(started.elapsed().as_micros() as u64),
            );
        }
        let ack = Ack::new(
            self.host_id(),
            Some(request.id.clone()),
            Some(request.kind.type_name().to_string()),
            status,
            error,
            data,
        );
        if let Err(e) = self.record(&request.id, &ack).await {
            return self.store_failure(&request, e);
        }
        if self.fault == Fault::CrashAfterPersist {
            tracing::error!(command_id = %request.id, "RAMPART_FAULT=crash_after_persist: killing myself");
            let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
        }
        tracing::info!(
            command_id = %request.id,
            command_type = request.kind.type_name(),
            status = ack.status.as_str(),
            duration_us = started.elapsed().as_micros() as u64,
            "command processed"
        );
        Outcome {
            ack,
            disposition: Disposition::Ack,
        }
    }

    async fn execute(&self, request: &Request) -> (Status, Option<AckError>, Value) {
        match request.kind {
            RequestKind::Ping => (Status::Applied, None, json!({})),
            RequestKind::StateSync => match self.summary().await {
                Ok(summary) => (Status::Applied, None, summary),
                Err(e) => (
                    Status::Failed,
                    Some(AckError {
                        code: ErrorCode::StoreFailed,
                        message: e.to_string(),
                        field: None,
                    }),
                    json!({}),
                ),
            },
        }
    }

    /// The state summary of PROTOCOL.md section 6.
    pub async fn summary(&self) -> Result<Value, crate::state::StateError> {
        let store = self.store.clone();
        let processed = tokio::task::spawn_blocking(move || store.processed_count())
            .await
            .expect("state store task panicked")?;
        Ok(json!({
            "host": self.host_id(),
            "version": env!("CARGO_PKG_VERSION"),
            "firewall": empty_firewall_summary(),
            "routers": [],
            "certificate": {
                "subject": self.certificate.subject,
                "not_after": self.certificate.not_after,
                "sha256": self.certificate.sha256,
            },
            "commands": { "processed": processed },
        }))
    }

    async fn lookup(&self, id: &str) -> Result<Option<Ack>, crate::state::StateError> {
        let store = self.store.clone();
        let id = id.to_string();
        tokio::task::spawn_blocking(move || store.lookup(&id))
            .await
            .expect("state store task panicked")
    }

    async fn record(&self, id: &str, ack: &Ack) -> Result<(), crate::state::StateError> {
        let store = self.store.clone();
        let id = id.to_string();
        let ack = ack.clone();
        tokio::task::spawn_blocking(move || store.record(&id, &ack))
            .await
            .expect("state store task panicked")
    }

    fn store_failure(&self, request: &Request, e: crate::state::StateError) -> Outcome {
        tracing::error!(command_id = %request.id, error = %e, "state store failed; command not applied");
        let ack = Ack::new(
            self.host_id(),
            Some(request.id.clone()),
            Some(request.kind.type_name().to_string()),
            Status::Failed,
            Some(AckError {
                code: ErrorCode::StoreFailed,
                message: e.to_string(),
                field: None,
            }),
            json!({}),
        );
        Outcome {
            ack,
            disposition: Disposition::Ack,
        }
    }
}

/// No rule set has been applied by this build: generation 0, nothing in it. The digest is
/// that of the empty rule set in canonical form, as docs/protocol.md defines.
fn empty_firewall_summary() -> Value {
    let canonical = r#"{"address_sets":{},"defaults":{"forward":"allow","in":"allow","out":"allow"},"generation":0,"rules":[]}"#;
    json!({
        "generation": 0,
        "rules": 0,
        "address_sets": 0,
        "elements": 0,
        "digest": hex::encode(Sha256::digest(canonical.as_bytes())),
    })
}
