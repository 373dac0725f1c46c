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

/// `^[a-z0-9][a-z0-9._-]{0,62}$`
pub fn is_valid_host_id(id: &str) -> bool {
    let bytes = id.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= 63
        && (bytes[0].is_ascii_lowercase() || bytes[0].is_ascii_digit())
        && bytes.iter().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_' | b'-')
        })
}

/// Milliseconds since the epoch, as every envelope carries it.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_ids() {
        for ok in ["h", "host-1", "a.b_c-d", "0", &"a".repeat(63)] {
            assert!(is_valid_host_id(ok), "{ok}");
        }
        for bad in ["", "-h", ".h", "Host", "h/1", "h 1", &"a".repeat(64), "hé"] {
            assert!(!is_valid_host_id(bad), "{bad}");
        }
    }
}
