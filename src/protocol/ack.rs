//! Acks: the one message an agent sends about each command.

use serde::{Deserialize, Serialize};

/// PROTOCOL.md section 6 statuses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Applied,
    Rejected,
    Failed,
    Stale,
}

impl Status {
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
    TooLarge,
    InvalidUtf8,
    InvalidJson,
    NotAnObject,
    UnknownField,
    MissingField,
    InvalidField,
    UnsupportedVersion,
    IdMismatch,
    TypeMismatch,
    WrongHost,
    UntrustedSender,
    MissingSignature,
    BadSignature,
    UnknownType,
    DuplicateId,
    DuplicateKey,
    BadTimestamp,
    UnknownSet,
    SetInUse,
    UnknownRule,
    TooMany,
    StaleGeneration,
    NftFailed,
    StoreFailed,
    DuplicateName,
    DuplicateAddress,
    DuplicateRoute,
    UnreachableGateway,
    UnknownBridge,
    RouterFailed,
    ForeignNamespace,
    BadPem,
    KeyMismatch,
    Expired,
    NotYetValid,
    UntrustedChain,
    RotationFailed,
    NoPendingKey,
    RequestFailed,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AckError {
    pub code: ErrorCode,
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Ack {
    pub specversion: String,
    pub id: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub source: String,
    pub host: String,
    pub timestamp: u64,
    pub correlation_id: Option<String>,
    pub command_type: Option<String>,
    pub status: Status,
    pub duplicate: bool,
    pub error: Option<AckError>,
    pub data: serde_json::Value,
}

impl Ack {
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
