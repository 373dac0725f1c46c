//! The opt-in metrics and health endpoint (`[metrics] listen = "127.0.0.1:9477"`):
//! `/metrics` in the Prometheus text format (prometheus-client), `/healthz` (the process
//! answers and its main loop turns) and `/readyz` (state restored and a broker session up).
//! The agent updates the values where they change; a scrape only encodes them, so it never
//! waits for a command in progress.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Request, Response, StatusCode};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::ids::now_ms;

/// The labels of `rampart_commands`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CommandLabels {
    /// The command type (`firewall.patch`, ...).
    pub r#type: String,
    /// The ack status, or `duplicate`.
    pub status: String,
}

/// The label of `rampart_command_duration_seconds`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TypeLabel {
    /// The command type.
    pub r#type: String,
}

fn duration_histogram() -> Histogram {
    // 100 µs to about 13 s.
    Histogram::new(exponential_buckets(0.0001, 2.0, 18))
}

/// Everything the endpoint shows; cheap to update from anywhere (atomics).
pub struct Metrics {
    registry: Registry,
    commands: Family<CommandLabels, Counter>,
    durations: Family<TypeLabel, Histogram, fn() -> Histogram>,
    /// `rampart_firewall_generation`: the applied rule set's generation.
    pub firewall_generation: Gauge,
    /// `rampart_firewall_rules`: its rules.
    pub firewall_rules: Gauge,
    /// `rampart_firewall_elements`: its address set elements.
    pub firewall_elements: Gauge,
    /// `rampart_drift_repairs`: tables and routers restored after a change behind our back.
    pub drift_repairs: Counter,
    /// `rampart_session_up`: 1 while a broker session serves commands.
    pub session_up: Gauge,
    /// `rampart_sessions`: broker sessions opened.
    pub sessions: Counter,
    /// `rampart_certificate_not_after_seconds`: the certificate's expiry.
    pub certificate_not_after: Gauge,
    /// `rampart_outbox_events`: events kept for the next session.
    pub outbox_events: Gauge,
    /// `rampart_events_dropped`: kept events dropped unsent.
    pub events_dropped: Counter,
    /// `rampart_conntrack_entries_cut`: open connections cut because the rules deny them.
    pub connections_cut: Counter,
    /// For `/healthz`: when the pipeline's loop last turned (ms since the epoch).
    pub alive_ms: AtomicU64,
    /// When the session actor last went round (ms since the epoch).
    pub link_alive_ms: AtomicU64,
    /// For `/readyz`.
    pub restored: AtomicBool,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    /// Every metric at zero, registered under the `rampart_` prefix.
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("rampart");
        let m = Metrics {
            commands: Family::default(),
            durations: Family::new_with_constructor(duration_histogram),
            firewall_generation: Gauge::default(),
            firewall_rules: Gauge::default(),
            firewall_elements: Gauge::default(),
            drift_repairs: Counter::default(),
            session_up: Gauge::default(),
            sessions: Counter::default(),
            certificate_not_after: Gauge::default(),
            outbox_events: Gauge::default(),
            events_dropped: Counter::default(),
            connections_cut: Counter::default(),
            alive_ms: AtomicU64::new(now_ms()),
            link_alive_ms: AtomicU64::new(now_ms()),
            restored: AtomicBool::new(false),
            registry: Registry::default(),
        };
        registry.register(
            "commands",
            "Commands answered, by type and ack status (duplicates: status duplicate)",
            m.commands.clone(),
        );
        registry.register(
            "command_duration_seconds",
            "From delivery to ack, by command type",
            m.durations.clone(),
        );
        registry.register(
            "firewall_generation",
            "Generation of the applied rule set",
            m.firewall_generation.clone(),
        );
        registry.register(
            "firewall_rules",
            "Rules of the applied rule set",
            m.firewall_rules.clone(),
        );
        registry.register(
            "firewall_elements",
            "Address set elements of the applied rule set",
            m.firewall_elements.clone(),
        );
        registry.register(
            "drift_repairs",
            "Firewall tables and routers found changed behind the agent's back and restored",
            m.drift_repairs.clone(),
        );
        registry.register(
            "session_up",
            "1 while a broker session serves commands",
            m.session_up.clone(),
        );
        registry.register(
            "sessions",
            "Broker sessions opened (the first, and each reconnect)",
            m.sessions.clone(),
        );
        registry.register(
            "certificate_not_after_seconds",
            "Expiry of the agent's certificate (seconds since the epoch)",
            m.certificate_not_after.clone(),
        );
        registry.register(
            "outbox_events",
            "Events kept for the next session",
            m.outbox_events.clone(),
        );
        registry.register(
            "events_dropped",
            "Kept events dropped unsent (too old, or over the outbox's bounds)",
            m.events_dropped.clone(),
        );
        registry.register(
            "conntrack_entries_cut",
            "Open connections cut because the rule set denies them",
            m.connections_cut.clone(),
        );
        Metrics { registry, ..m }
    }

    /// One answered command.
    pub fn command(&self, kind: &str, status: &str, seconds: f64) {
        self.commands
            .get_or_create(&CommandLabels {
                r#type: kind.to_string(),
                status: status.to_string(),
            })
            .inc();
        self.durations
            .get_or_create(&TypeLabel {
                r#type: kind.to_string(),
            })
            .observe(seconds);
    }

    /// The applied rule set's generation and size.
    /// The rule set in force: its generation, rules and set elements (plain numbers: the
    /// firewall reports to this module, not the other way round).
    /// The applied rule set's generation, rules and elements.
    pub fn firewall(&self, generation: u64, rules: usize, elements: usize) {
        let gauge = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
        self.firewall_generation.set(gauge(generation));
        self.firewall_rules.set(gauge(rules as u64));
        self.firewall_elements.set(gauge(elements as u64));
    }

    /// The OpenMetrics text of every metric (what `/metrics` serves).
    pub fn text(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("encoding into a String cannot fail");
        out
    }

    fn healthy(&self, now: u64) -> bool {
        // The main loop reports at least every 5 s.
        now.saturating_sub(self.alive_since()) < 30_000
    }

    /// When the later-reporting of the pipeline and the session actor last went round: the
    /// agent is alive only while both are.
    pub fn alive_since(&self) -> u64 {
        let pipeline = self.alive_ms.load(Ordering::Relaxed);
        pipeline.min(self.link_alive_ms.load(Ordering::Relaxed))
    }

    fn ready(&self) -> bool {
        self.restored.load(Ordering::Relaxed) && self.session_up.get() == 1
    }
}

fn reply(status: StatusCode, content_type: &str, body: String) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", content_type)
        .body(Full::new(Bytes::from(body)))
        .expect("a valid response")
}

fn answer(m: &Metrics, path: &str) -> Response<Full<Bytes>> {
    let text = "text/plain; charset=utf-8";
    let yes_no = |ok: bool, what: &str| {
        if ok {
            reply(StatusCode::OK, text, "ok\n".into())
        } else {
            reply(StatusCode::SERVICE_UNAVAILABLE, text, format!("{what}\n"))
        }
    };
    match path {
        "/metrics" => reply(
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            m.text(),
        ),
        "/healthz" => yes_no(m.healthy(now_ms()), "the main loop has not turned for 30 s"),
        "/readyz" => yes_no(
            m.ready(),
            if m.restored.load(Ordering::Relaxed) {
                "no broker session"
            } else {
                "state not restored yet"
            },
        ),
        _ => reply(StatusCode::NOT_FOUND, text, "not found\n".into()),
    }
}

/// Serves the endpoint at `listen` until the process ends.
pub async fn serve(listen: SocketAddr, metrics: Arc<Metrics>) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(listen).await?;
    tracing::info!(%listen, "metrics endpoint listening");
    tokio::spawn(async move {
        loop {
            let (stream, _) = match listener.accept().await {
                Ok(s) => s,
                Err(error) => {
                    tracing::warn!(%error, "metrics endpoint: accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            };
            let m = metrics.clone();
            tokio::spawn(async move {
                let service =
                    hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                        let r = answer(&m, req.uri().path());
                        async move { Ok::<_, std::convert::Infallible>(r) }
                    });
                let io = hyper_util::rt::TokioIo::new(stream);
                let conn = hyper::server::conn::http1::Builder::new()
                    .timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(std::time::Duration::from_secs(10))
                    .serve_connection(io, service);
                if let Err(error) = conn.await {
                    tracing::debug!(%error, "metrics endpoint: connection ended");
                }
            });
        }
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_exposition_names_what_it_counts() {
        let m = Metrics::new();
        m.command("firewall.patch", "applied", 0.003);
        m.command("firewall.patch", "applied", 0.004);
        m.firewall(7, 3, 12);
        let t = m.text();
        assert!(
            t.contains("rampart_commands_total{type=\"firewall.patch\",status=\"applied\"} 2"),
            "{t}"
        );
        assert!(
            t.contains("rampart_command_duration_seconds_count{type=\"firewall.patch\"} 2"),
            "{t}"
        );
        assert!(t.contains("rampart_firewall_generation 7"), "{t}");
        assert!(t.ends_with("# EOF\n"), "{t}");
    }

    #[test]
    fn ready_needs_the_state_and_a_session() {
        let m = Metrics::new();
        assert!(!m.ready());
        m.restored.store(true, Ordering::Relaxed);
        assert!(!m.ready());
        m.session_up.set(1);
        assert!(m.ready());
        assert!(m.healthy(now_ms()));
        assert!(!m.healthy(now_ms() + 60_000));
    }
}
