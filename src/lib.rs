//! rampart: the host agent. The modules below follow one command through the agent.

/// Transport: TLS, AMQP session, topology, confirmed publishing, backoff.
pub mod broker;
/// The agent's own TLS identity: validation, installed identities, rotation.
pub mod certs;
/// Command-line interface.
pub mod cli;
/// Typed configuration file.
pub mod config;
/// Local control socket for inspection (rules, ...).
pub mod control;
/// Wires the stages into the running daemon.
pub mod daemon;
/// Request -> effect -> persisted outcome -> ack, at most once.
pub mod dispatch;
/// Events kept through lost sessions (the outbox) and firewall statistics.
pub mod events;
/// Host firewall: checked rule sets, layout, rendering, apply, drift.
pub mod firewall;
/// The manager's side of the bus (`rampart send`, tests).
pub mod manager;
/// The opt-in Prometheus metrics and health endpoint.
pub mod metrics;
/// TCP connections of the host, mapped to processes (`rampart connection list`).
pub mod netstat;
/// Wire contract: deliveries -> checked requests; acks.
pub mod protocol;
/// Logical routers: network namespaces with veth interfaces, converged via netlink.
pub mod router;
/// Crash-safe store of processed commands and applied state.
pub mod state;
/// The only code that touches the host: nft (later netlink, namespaces).
pub mod sys;
/// `rampart trace`: which rule decided each packet, live.
pub mod trace;
