//! rampart: the host agent. The modules below are listed from the leaves up, in the order a
//! command meets them (docs/architecture.md has the map and the generated module graph).

// Production functions stay short enough to read at once (clippy.toml: 80 lines).
#![cfg_attr(not(test), warn(clippy::too_many_lines))]
// Every public item says what it is for (CI denies warnings).
#![warn(missing_docs)]

/// Leaf: host id validation and the clock.
pub mod ids;
/// Leaf: the version string and log control.
pub mod logs;
/// Leaf: the test-only crash points (`RAMPART_FAULT`).
pub mod faults;
/// Generic kernel plumbing: nftables, nfnetlink, conntrack, namespaces, the host's view.
pub mod sys;
/// The opt-in Prometheus metrics and health endpoint.
pub mod metrics;
/// Typed configuration file, broker URLs.
pub mod config;
/// Host firewall: checked rule sets, layout, rendering, apply, drift.
pub mod firewall;
/// Logical routers: network namespaces with veth interfaces, converged via netlink.
pub mod router;
/// The agent's own TLS identity: validation, installed identities, rotation.
pub mod certs;
/// Transport: AMQP session, topology, confirmed publishing, backoff.
pub mod broker;
/// Wire contract: deliveries -> checked requests; acks.
pub mod protocol;
/// Crash-safe store of processed commands and applied state.
pub mod state;
/// Events kept through lost sessions (the outbox) and firewall statistics.
pub mod events;
/// Request -> effect -> persisted outcome -> ack, at most once.
pub mod dispatch;
/// The session actor: owns the broker connection and channels; the pipeline's handle.
pub mod session;
/// Local control socket for inspection (rules, ...).
pub mod control;
/// Wires the stages into the running daemon.
pub mod daemon;
/// The manager's side of the bus (`rampart send`, tests).
pub mod manager;
/// TCP connections of the host, mapped to processes (`rampart connection list`).
pub mod netstat;
/// `rampart trace`: which rule decided each packet, live.
pub mod trace;
/// Command-line interface.
pub mod cli;
