//! Acks: the one message an agent sends about each command.

use serde::{Deserialize, Serialize};

/// PROTOCOL.md section 6 statuses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Done (or already so): in force now.
    Applied,
    /// Refused before it changed anything; the delivery is dead-lettered.
    Rejected,
    /// Tried and failed; nothing of it is in force.
    Failed,
    /// A generation conflict: the manager must resend on the current generation.
    Stale,
}

impl Status {
    /// As the wire spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Applied => "applied",
            Status::Rejected => "rejected",
            Status::Failed => "failed",
            Status::Stale => "stale",
        }
    }
}

/// Every error code an ack can carry; docs/protocol.md lists them with their meaning.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The body is over `commands.max_body_bytes`.
    TooLarge,
    /// The body is not UTF-8.
    InvalidUtf8,
    /// The body is not JSON.
    InvalidJson,
    /// The top level is not a JSON object.
    NotAnObject,
    /// A key the contract does not define.
    UnknownField,
    /// A required key is absent.
    MissingField,
    /// A value of the wrong type or out of range.
    InvalidField,
    /// `specversion` is not `"1.0"`.
    UnsupportedVersion,
    /// The body's `id` differs from the AMQP `message_id`.
    IdMismatch,
    /// The body's `type` differs from the AMQP `type`.
    TypeMismatch,
    /// The command, or a certificate, is for another host.
    WrongHost,
    /// No `user_id`, or one not in `broker.trusted_senders`.
    UntrustedSender,
    /// Signing keys are configured and the command is not signed.
    MissingSignature,
    /// The signature does not verify under any configured key.
    BadSignature,
    /// A command type this agent does not handle.
    UnknownType,
    /// A rule id appears twice.
    DuplicateId,
    /// A JSON object repeats a key.
    DuplicateKey,
    /// The `timestamp` is outside the replay window.
    BadTimestamp,
    /// A rule or patch names an address set that does not exist.
    UnknownSet,
    /// A patch deletes a set that a rule still uses.
    SetInUse,
    /// Over a limit (rules, elements, a rule's expansion, DNS names).
    TooMany,
    /// The generation does not follow the one in force.
    StaleGeneration,
    /// The kernel refused the nftables transaction.
    NftFailed,
    /// The state store could not be read or written.
    StoreFailed,
    /// A router interface name appears twice.
    DuplicateName,
    /// An address appears twice in a router.
    DuplicateAddress,
    /// Two routes to one destination.
    DuplicateRoute,
    /// A route's `via` is on none of the router's subnets, or is its own.
    UnreachableGateway,
    /// An interface names a bridge the host does not have.
    UnknownBridge,
    /// The kernel refused a router step (rolled back).
    RouterFailed,
    /// `router.create` for a namespace the agent did not make.
    ForeignNamespace,
    /// A PEM field does not parse.
    BadPem,
    /// The private key is not the certificate's.
    KeyMismatch,
    /// The certificate's validity is past.
    Expired,
    /// The certificate is not valid yet.
    NotYetValid,
    /// The certificate does not chain to the CA.
    UntrustedChain,
    /// The broker did not take the new identity, or it could not be written.
    RotationFailed,
    /// `cert.install` without a key, and no pending key.
    NoPendingKey,
    /// `cert.request` could not make or keep the key pair.
    RequestFailed,
}

/// The `error` of an ack that is not `applied`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AckError {
    /// What went wrong, for programs.
    pub code: ErrorCode,
    /// What went wrong, for people (hostile input is echoed truncated).
    pub message: String,
    /// The JSON path of the offending field (`$.data.rules[3].ports[0]`), when one is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
}

/// An ack (PROTOCOL.md section 6): the one message an agent sends about each command.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Ack {
    /// Always `"1.0"`.
    pub specversion: String,
    /// The ack's own id (a UUID).
    pub id: String,
    /// Always `"ack"`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The host id.
    pub source: String,
    /// The host id.
    pub host: String,
    /// When it was made (ms since the epoch).
    pub timestamp: u64,
    /// The command's id (`None` when the command had none that could be read).
    pub correlation_id: Option<String>,
    /// The command's type, when it could be read.
    pub command_type: Option<String>,
    /// The outcome.
    pub status: Status,
    /// An answer to a redelivery, from the record of the first delivery.
    pub duplicate: bool,
    /// Why, when the status is not `applied`.
    pub error: Option<AckError>,
    /// What the command type answers with.
    pub data: serde_json::Value,
}

impl Ack {
    /// A new ack from `host` about command `correlation_id`, made now.
    pub fn new(
        host: &str,
        correlation_id: Option<String>,
        command_type: Option<String>,
        status: Status,
        error: Option<AckError>,
        data: serde_json::Value,
    ) -> Ack {
        Ack {
            specversion: "1.0".to_string(),
            id: uuid::Uuid::new_v4().to_string(),
            kind: "ack".to_string(),
            source: host.to_string(),
            host: host.to_string(),
            timestamp: crate::ids::now_ms(),
            correlation_id,
            command_type,
            status,
            duplicate: false,
            error,
            data,
        }
    }

    /// The stored original, marked as a redelivery's answer: same id, status, error and data.
    pub fn as_duplicate(mut self) -> Ack {
        self.duplicate = true;
        self.timestamp = crate::ids::now_ms();
        self
    }

    /// The ack's JSON body, as published.
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("an ack always serialises")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ack_serialises_to_the_contract_shape() {
        let ack = Ack::new(
            "host-1",
            Some("c1".into()),
            Some("ping".into()),
            Status::Rejected,
            Some(AckError {
                code: ErrorCode::UnknownField,
                message: "unknown field".into(),
                field: Some("$.data.x".into()),
            }),
            serde_json::json!({}),
        );
        let v: serde_json::Value = serde_json::from_slice(&ack.to_json()).unwrap();
        assert_eq!(v["type"], "ack");
        assert_eq!(v["status"], "rejected");
        assert_eq!(v["error"]["code"], "unknown_field");
        assert_eq!(v["error"]["field"], "$.data.x");
        assert_eq!(v["correlation_id"], "c1");
        assert_eq!(v["duplicate"], false);
        let dup = ack.clone().as_duplicate();
        assert!(dup.duplicate);
        assert_eq!(dup.id, ack.id);
    }
}
