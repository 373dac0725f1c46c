//! End-to-end tests against a real RabbitMQ, real nftables and real namespaces. One broker
//! is started for the whole run (libtest-mimic gives us the set-up and tear-down that the
//! built-in harness lacks); each test makes its own hosts and agents.

mod backbone;
mod certs;
mod faults;
mod firewall;
mod nlrules;
mod ops;
mod routers;
mod storms;
mod support;
mod trust;

use libtest_mimic::{Arguments, Failed, Trial};

/// Wraps a test body so that a returned error fails the test with its whole chain.
fn trial(name: &'static str, f: fn() -> anyhow::Result<()>) -> Trial {
    Trial::test(name, move || {
        f().map_err(|e| Failed::from(format!("{e:#}")))
    })
}

fn main() {
    let args = Arguments::from_args();
    let mut tests = Vec::new();
    tests.extend(backbone::tests());
    tests.extend(certs::tests());
    tests.extend(faults::tests());
    tests.extend(firewall::tests());
    tests.extend(nlrules::tests());
    tests.extend(ops::tests());
    tests.extend(routers::tests());
    tests.extend(storms::tests());
    tests.extend(trust::tests());

    let needs_env = !args.list
        && tests
            .iter()
            .any(|t| args.skip.iter().all(|s| !t.name().contains(s.as_str())));
    let root = tempfile::Builder::new()
        .prefix("rampart-e2e-")
        .tempdir_in("/tmp")
        .expect("temp dir");
    if needs_env {
        support::init(root.path());
    }
    let conclusion = libtest_mimic::run(&args, tests);
    support::teardown();
    if conclusion.has_failed() {
        eprintln!("test files kept in {}", root.keep().display());
    }
    conclusion.exit();
}
