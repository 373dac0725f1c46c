//! Leaf: host id validation and the clock every envelope and record is stamped with.

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
