//! Command decoding (AMQP properties and body): never panics, and every rejection is one
//! short line.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rampart::protocol::{DecodeContext, Incoming, claimed_id, decode};

fuzz_target!(|input: &[u8]| {
    // The first byte says which properties are set; the rest is the body.
    let Some((&flags, body)) = input.split_first() else {
        return;
    };
    let prop = |bit: u8, value: &str| (flags & bit != 0).then(|| value.to_string());
    let incoming = Incoming {
        body: body.to_vec(),
        message_id: prop(1, "c1"),
        kind: prop(
            2,
            if flags & 8 != 0 {
                "firewall.apply"
            } else {
                "ping"
            },
        ),
        user_id: prop(4, "manager").or_else(|| prop(16, "intruder")),
        signature: prop(32, "AAAA"),
    };
    let ctx = DecodeContext {
        host_id: "host-1".into(),
        trusted_senders: vec!["manager".into()],
        max_body_bytes: 1 << 20,
        signing_keys: vec![],
        limits: Default::default(),
        max_age_ms: u64::MAX,
    };
    let _ = claimed_id(&incoming);
    if let Err(r) = decode(&ctx, &incoming) {
        assert!(!r.error.message.contains('\n'), "{:?}", r.error.message);
        assert!(r.error.message.len() < 600, "{:?}", r.error.message);
    }
});
