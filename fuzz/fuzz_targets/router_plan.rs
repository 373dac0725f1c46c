//! Router planning: never panics; a router planned against its own image in the kernel
//! needs no step, and against nothing starts by making its namespace.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rampart::protocol::{DecodeContext, Incoming, RequestKind, decode};
use rampart::router::plan::{Observed, ObservedHost, ObservedInterface, Step, plan};
use rampart::router::spec::RouterSpec;

fn spec_of(data: &str) -> Option<RouterSpec> {
    let body = format!(
        r#"{{"specversion":"1.0","id":"c1","type":"router.create","source":"m","host":"h","timestamp":1,"data":{data}}}"#
    );
    let incoming = Incoming {
        body: body.into_bytes(),
        user_id: Some("manager".into()),
        ..Default::default()
    };
    let ctx = DecodeContext {
        host_id: "h".into(),
        trusted_senders: vec!["manager".into()],
        max_body_bytes: 1 << 20,
        signing_keys: vec![],
        limits: Default::default(),
        max_age_ms: u64::MAX,
    };
    match decode(&ctx, &incoming).ok()?.kind {
        RequestKind::RouterCreate(spec) => Some(*spec),
        _ => None,
    }
}

/// What the kernel holds once `spec` is fully made.
fn image(spec: &RouterSpec) -> Observed {
    Observed {
        namespace: true,
        lo_up: true,
        forwarding: true,
        interfaces: spec
            .interfaces
            .iter()
            .map(|i| {
                let o = ObservedInterface {
                    veth: true,
                    up: true,
                    mtu: i.mtu,
                    addresses: i.addresses.iter().copied().collect(),
                    host: Some(ObservedHost {
                        up: true,
                        mtu: i.mtu,
                        bridge: i.bridge.clone(),
                    }),
                };
                (i.name.clone(), o)
            })
            .collect(),
        routes: spec.routes.iter().copied().collect(),
    }
}

fuzz_target!(|input: &[u8]| {
    let Ok(text) = std::str::from_utf8(input) else {
        return;
    };
    // Two specs separated by a NUL: the wanted one and the one the kernel holds.
    let mut parts = text.splitn(2, '\0');
    let Some(want) = parts.next().and_then(spec_of) else {
        return;
    };
    assert!(
        plan(&want, &image(&want)).is_empty(),
        "a made router needs nothing"
    );
    let fresh = plan(&want, &Observed::default());
    assert_eq!(fresh.first(), Some(&Step::CreateNamespace));
    if let Some(have) = parts.next().and_then(spec_of) {
        let _ = plan(&want, &image(&have));
    }
});
