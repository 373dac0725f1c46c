//! Leaf: the test-only crash points, all in one place. `RAMPART_FAULT` names at most one,
//! read once (see docs/operations.md); a point reached while it is armed kills the process
//! with SIGKILL, as a crash or a power cut would, so tests can check what survives.

/// A place where a test may have the agent die.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Right after a command's outcome is recorded, before its ack is published.
    CrashAfterPersist,
    /// Half way through creating a new router (namespace and one interface made).
    CrashMidRouterCreate,
    /// During a rotation: new session up, new identity written, not switched to.
    CrashMidCertRotation,
}

/// The fault `RAMPART_FAULT` arms, if any.
fn armed() -> Option<Fault> {
    static ARMED: std::sync::OnceLock<Option<Fault>> = std::sync::OnceLock::new();
    *ARMED.get_or_init(|| match std::env::var("RAMPART_FAULT").as_deref() {
        Ok("crash_after_persist") => Some(Fault::CrashAfterPersist),
        Ok("crash_mid_router_create") => Some(Fault::CrashMidRouterCreate),
        Ok("crash_mid_cert_rotation") => Some(Fault::CrashMidCertRotation),
        _ => None,
    })
}

/// Whether `point` is the armed fault (for points that need to prepare the crash).
pub fn is_armed(point: Fault) -> bool {
    armed() == Some(point)
}

/// Kills the process here if `point` is the armed fault.
pub fn crash_if(point: Fault, context: &str) {
    if is_armed(point) {
        tracing::error!(point = ?point, context, "RAMPART_FAULT: killing myself");
        let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
    }
}
