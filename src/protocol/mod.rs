//! The wire contract (PROTOCOL.md sections 3 and 6): raw deliveries become checked
//! [`Request`]s, outcomes become [`Ack`]s. Wire structs never leave this module.

mod ack;
mod cert;
mod command;
mod firewall;
mod router;
mod strict_json;

pub use ack::{Ack, AckError, ErrorCode, Status};
pub use command::{
    DecodeContext, Incoming, MAX_FUTURE_MS, Rejection, Request, RequestKind, claimed_id, decode,
};

/// A rule set as the state store keeps it (canonical JSON), without limits: what was
/// accepted once is restored even if the limits were lowered since.
pub fn decode_stored_rule_set(bytes: &[u8]) -> Result<crate::firewall::spec::RuleSet, String> {
    let v: serde_json::Value = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
    firewall::decode_rule_set(&v, &crate::firewall::spec::Limits::NONE)
        .map_err(|r| format!("{}: {:?}", r.message, r.field))
}

/// Checks a rule set (`firewall.apply` data) as the agent would, for `rampart rules check`.
pub fn check_rule_set(
    data: &serde_json::Value,
    limits: &crate::firewall::spec::Limits,
) -> Result<crate::firewall::spec::RuleSet, AckError> {
    firewall::decode_rule_set(data, limits).map_err(|r| AckError {
        code: r.code,
        message: r.message,
        field: r.field,
    })
}

/// A journal entry (a patch's `data` JSON) from the state store.
pub fn decode_stored_patch(bytes: &[u8]) -> Result<crate::firewall::spec::Patch, String> {
    let v: serde_json::Value = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
    firewall::decode_patch(&v, &crate::firewall::spec::Limits::NONE)
        .map_err(|r| format!("{}: {:?}", r.message, r.field))
}
