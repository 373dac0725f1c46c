//! Firewall validation and rendering: a rule set that passes the checks renders without a
//! panic, the rendered text stays within a fixed function of the input's size, and the
//! netlink batch of the same table is well framed and holds one rule message per rule line
//! of the text.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rampart::firewall::layout::Layout;
use rampart::firewall::render::{RenderCtx, render_full};
use rampart::firewall::spec::Limits;

/// Kernel rules one rule may become here; the size bound below follows from it.
const EXPANSION: usize = 64;

fuzz_target!(|input: &[u8]| {
    let Ok(text) = std::str::from_utf8(input) else {
        return;
    };
    let Ok(value) = serde_json::from_str::<serde_json::Value>(text) else {
        return;
    };
    let limits = Limits {
        max_rules: 1_000,
        max_elements: 10_000,
        max_rule_expansion: EXPANSION,
    };
    let Ok(rs) = rampart::protocol::check_rule_set(&value, &limits) else {
        return;
    };
    let layout = Layout::build(rs.rules.values());
    let ctx = RenderCtx {
        table: "rampart".into(),
        brokers: vec![("192.0.2.10".parse().unwrap(), 5671)],
        resolvers: vec!["192.0.2.53".parse().unwrap()],
        failsafe_in: vec![],
        failsafe_out: vec![],
    };
    let out = render_full(&rs, &layout, &ctx);
    // Per rule: at most EXPANSION matches x 3 lines (log, tcp reject, verdict) x 3 hooks, each
    // line a fixed part plus text that appears in the input; plus the fixed skeleton.
    let bound =
        8_192 + input.len() * 3 * 3 * EXPANSION * 2 + rs.rules.len() * 3 * 3 * EXPANSION * 256;
    assert!(
        out.len() <= bound,
        "{} bytes rendered from {} bytes",
        out.len(),
        input.len()
    );
    assert!(!out.contains('\0'));

    let (bytes, acked) =
        rampart::firewall::bytecode::full_table(&rs, &layout, &ctx, 1, &mut Default::default());
    let mut off = 0;
    let mut kinds = vec![];
    while off < bytes.len() {
        let len = u32::from_ne_bytes(bytes[off..off + 4].try_into().unwrap()) as usize;
        assert!(
            len >= 20 && len % 4 == 0 && off + len <= bytes.len(),
            "message at {off}"
        );
        kinds.push(u16::from_ne_bytes(
            bytes[off + 4..off + 6].try_into().unwrap(),
        ));
        off += len;
    }
    assert_eq!(kinds.first(), Some(&0x10), "batch begin");
    assert_eq!(kinds.last(), Some(&0x11), "batch end");
    assert_eq!(acked.len(), kinds.len() - 2, "every message is acked");
    let mut in_chain = false;
    let mut text_rules = 0;
    for line in out.lines() {
        if line.starts_with("\tchain ") {
            in_chain = true;
        } else if line == "\t}" {
            in_chain = false;
        } else if in_chain && line.starts_with("\t\t") && !line.starts_with("\t\ttype ") {
            text_rules += 1;
        }
    }
    let new_rules = kinds.iter().filter(|k| **k == (10 << 8) | 6).count();
    assert_eq!(new_rules, text_rules, "one rule message per rule line");
});
