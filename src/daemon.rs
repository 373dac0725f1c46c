//! Wires the stages together: identity and state at start, then the broker session loop
//! (connect with backoff, declare, consume, dispatch, ack, heartbeat) until a signal.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use futures_util::StreamExt;
use lapin::Event;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions, BasicRejectOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use serde_json::{Value, json};
use tokio::sync::watch;

use crate::broker::{self, BrokerError, Connector, Dialer, Session, amqp};
use crate::certs::Current;
use crate::config::{AuthMechanism, Config, UrlOrder, parse_failsafe};
use crate::control::SessionState;
use crate::dispatch::{CertContext, Dispatcher, Disposition, Rotation, Settings};
use crate::events::Outbox;
use crate::firewall::render::RenderCtx;
use crate::firewall::spec::{Limits, RuleSet};
use crate::firewall::{Drift, Firewall};
use crate::ids::{is_valid_host_id, now_ms};
use crate::metrics::Metrics;
use crate::protocol::{DecodeContext, Incoming};
use crate::router::Routers;
use crate::router::spec::RouterSpec;
use crate::state::Store;
use crate::sys::netns::NetnsWorker;
use crate::sys::nft::Nft;

/// Longest time from SIGTERM to exit.
const SHUTDOWN_BOUND: Duration = Duration::from_secs(15);

/// Why a session ended.
enum SessionEnd {
    Shutdown,
    /// `cert.install` opened a session with the new identity: continue on that one.
    Rotate(Box<Rotation>),
    /// The broker settings changed (SIGHUP): open a session with the new ones.
    Reload,
    Lost(String),
}

struct Agent {
    /// The settings in force, replaced whole on SIGHUP; the dispatcher reads the same ones.
    settings: watch::Sender<Arc<Settings>>,
    host_id: String,
    broker_user: String,
    dispatcher: Arc<Dispatcher>,
    firewall: Arc<tokio::sync::Mutex<Firewall>>,
    /// `drift`, `stats` and `cert` events until a session publishes them.
    outbox: Arc<Outbox>,
    shared: Arc<crate::control::Shared>,
    started: Instant,
    /// The metrics endpoint's values, and when the main loop last went round
    /// (`metrics.alive_ms`): the watchdog feeds systemd only while that moves.
    metrics: Arc<Metrics>,
    /// How often the main loop reports that it is alive.
    pulse: Duration,
    /// When the last `cert.<host>` expiry warning went out (ms since the epoch; 0: never).
    cert_warned_ms: std::sync::atomic::AtomicU64,
    /// Whether `rampart.events` exists on the broker of the current session.
    events_ok: std::sync::atomic::AtomicBool,
}

/// Runs the agent in the foreground until SIGTERM or SIGINT.
pub async fn run(config: Config, config_path: std::path::PathBuf) -> anyhow::Result<()> {
    let who = Who::load(&config)?;
    let limits = limits_of(&config);
    let signing_keys = load_signing_keys(&config)?;
    let connector = Connector::new(
        &config.broker,
        who.tls.clone(),
        format!("rampart/{}", who.host_id),
    )?;
    // The recorded rule set goes back into the kernel before any broker is contacted, so a
    // restart or a reboot never leaves the host open.
    let (store, firewall, state_lost) = restore_state(&config, &connector, limits).await?;
    let metrics = Arc::new(Metrics::new());
    let counts = firewall.current().counts();
    metrics.firewall(counts.generation, counts.rules, counts.elements);
    let mut firewall = firewall;
    firewall.set_metrics(metrics.clone());
    let firewall = Arc::new(tokio::sync::Mutex::new(firewall));
    let (drift_tx, drift_rx) = tokio::sync::mpsc::channel(16);
    let routers = load_routers(&store, &who.host_id, &drift_tx).await?;
    let shared = shared_status(&firewall, &routers, &store, &who, state_lost);
    crate::control::serve(&config.control.socket, shared.clone())
        .context("opening the control socket")?;
    let outbox = Arc::new(Outbox::new(
        store.clone(),
        who.host_id.clone(),
        &config.events,
        metrics.clone(),
    ));
    start_background(
        &config,
        &firewall,
        &routers,
        &store,
        &outbox,
        &metrics,
        (drift_tx.clone(), drift_rx),
    )
    .await?;
    let (settings, settings_rx) =
        watch::channel(Arc::new(settings_of(config, &who.host_id, signing_keys)));
    let dispatcher = Dispatcher::new(
        store,
        settings_rx,
        CertContext {
            identity: who.identity.clone(),
            state_dir: settings.borrow().state_dir.clone(),
        },
        firewall.clone(),
        routers,
        drift_tx,
    )
    .with_state_lost(shared.state_lost.clone());
    let agent = Arc::new(Agent::new(
        Arc::new(dispatcher),
        firewall,
        outbox,
        shared,
        who,
        settings,
        metrics,
    ));
    notify(&[
        sd_notify::NotifyState::Ready,
        sd_notify::NotifyState::Status("state restored; connecting to the broker"),
    ]);
    spawn_watchdog(&agent);
    let reload_rx = spawn_reload(&agent, config_path);
    let stop_rx = spawn_stop(&agent);
    agent.session_loop(connector, stop_rx, reload_rx).await;
    notify(&[sd_notify::NotifyState::Stopping]);
    let _ = std::fs::remove_file(&agent.config().control.socket);
    tracing::info!("agent stopped");
    Ok(())
}

/// What the control socket reads: the state, and the session's status as it changes.
fn shared_status(
    firewall: &Arc<tokio::sync::Mutex<Firewall>>,
    routers: &Arc<tokio::sync::Mutex<Routers>>,
    store: &Arc<Store>,
    who: &Who,
    state_lost: Option<Value>,
) -> Arc<crate::control::Shared> {
    Arc::new(crate::control::Shared {
        firewall: firewall.clone(),
        routers: routers.clone(),
        store: store.clone(),
        host_id: who.host_id.clone(),
        started_ms: now_ms(),
        identity: who.identity.clone(),
        session: Default::default(),
        commands: Default::default(),
        pending_restart: Default::default(),
        state_lost: Arc::new(std::sync::Mutex::new(state_lost)),
    })
}

/// Who the agent is: its TLS identity, host id and broker user.
struct Who {
    identity: Arc<std::sync::RwLock<Current>>,
    tls: Arc<rustls::ClientConfig>,
    host_id: String,
    broker_user: String,
}

impl Who {
    /// The newest identity installed by cert.install, else the configured files; the host
    /// id configured or taken from the certificate's CN.
    fn load(config: &Config) -> anyhow::Result<Who> {
        let b = &config.broker;
        let (current, identity, tls) =
            Current::load(&config.state_dir, b).context("loading the TLS identity")?;
        tracing::info!(
            source = current.files.source,
            cert = %current.files.cert.display(),
            subject = %current.info.subject,
            not_after = %current.info.not_after,
            "TLS identity loaded"
        );
        let cn = identity.info.common_name.clone();
        let host_id = match (&config.host_id, &cn) {
            (Some(id), _) => id.clone(),
            (None, Some(cn)) if is_valid_host_id(cn) => cn.clone(),
            (None, Some(cn)) => anyhow::bail!(
                "host_id is not set and the certificate CN {cn:?} is not a valid host id; set host_id"
            ),
            (None, None) => anyhow::bail!("host_id is not set and the certificate has no CN"),
        };
        let broker_user = match b.auth {
            AuthMechanism::External => {
                cn.context("EXTERNAL login needs a certificate with a CN")?
            }
            AuthMechanism::Plain => b.username.clone().unwrap_or_default(),
        };
        Ok(Who {
            identity: Arc::new(std::sync::RwLock::new(current)),
            tls,
            host_id,
            broker_user,
        })
    }
}

/// Opens the store (an unreadable one set aside) and puts the recorded rule set back into
/// the kernel, cutting connections it denies. The third value describes a lost state.
async fn restore_state(
    config: &Config,
    connector: &Connector,
    limits: Limits,
) -> anyhow::Result<(Arc<Store>, Firewall, Option<Value>)> {
    let mut lost = None;
    let store = match open_store(config).await {
        Ok(store) => store,
        Err(e) => {
            let fresh = set_store_aside(config, &e).await?;
            lost = Some(e);
            fresh
        }
    };
    tracing::info!(path = %store.path().display(), "state store open");
    let mut store = Arc::new(store);
    let ctx = render_ctx(config, connector).await;
    let mut firewall = match load_firewall(&store, config, ctx.clone(), limits).await {
        Ok(fw) => fw,
        Err(e) if lost.is_none() => {
            drop(store);
            store = Arc::new(set_store_aside(config, &e).await?);
            lost = Some(e);
            let nft = Nft::new(&config.firewall.nft);
            Firewall::new(nft, ctx, limits, RuleSet::default())
        }
        Err(e) => return Err(e.context("the fresh state store does not load")),
    };
    let state_lost = match &lost {
        None => None,
        Some(e) => Some(after_state_lost(&mut firewall, &store, config, e).await),
    };
    if firewall.is_managed() {
        match firewall.restore().await {
            Ok(()) => tracing::info!(
                generation = firewall.current().generation,
                rules = firewall.current().rules.len(),
                table = firewall.table(),
                "firewall restored from the state store"
            ),
            Err(e) => {
                tracing::error!(error = %e, "could not restore the firewall; the drift check will retry")
            }
        }
        // Connections opened while the rules were not in force (the agent down, a reboot),
        // or whose cut a crash interrupted.
        firewall.cut_denied().await;
    }
    Ok((store, firewall, state_lost))
}

/// The loops beside the session: the nftables watch, drift repair, the events kept for
/// the manager, statistics and the metrics endpoint.
async fn start_background(
    config: &Config,
    firewall: &Arc<tokio::sync::Mutex<Firewall>>,
    routers: &Arc<tokio::sync::Mutex<Routers>>,
    store: &Arc<Store>,
    outbox: &Arc<Outbox>,
    metrics: &Arc<Metrics>,
    (drift_tx, drift_rx): (
        tokio::sync::mpsc::Sender<Value>,
        tokio::sync::mpsc::Receiver<Value>,
    ),
) -> anyhow::Result<()> {
    // A deleted or replaced table (another tool's `nft flush ruleset`, a saved ruleset
    // restored) is noticed within a watch period; other edits by the periodic check.
    let (wake_tx, wake_rx) = tokio::sync::mpsc::channel(1);
    let made = firewall.lock().await.made_handle();
    let table = config.firewall.table.clone();
    std::thread::Builder::new()
        .name("nft-watch".into())
        .spawn(move || {
            watch_table(&table, &made, || {
                let _ = wake_tx.try_send(());
            })
        })
        .context("starting the nftables watch thread")?;
    tokio::spawn(drift_loop(
        firewall.clone(),
        routers.clone(),
        store.clone(),
        Duration::from_secs(config.firewall.drift_check_secs),
        wake_rx,
        drift_tx,
    ));
    tokio::spawn(keep_drift_events(drift_rx, outbox.clone(), metrics.clone()));
    if let Some(listen) = config.metrics.listen {
        crate::metrics::serve(listen, metrics.clone())
            .await
            .with_context(|| format!("opening the metrics endpoint on {listen}"))?;
    }
    metrics
        .restored
        .store(true, std::sync::atomic::Ordering::Relaxed);
    if config.firewall.stats_interval_s > 0 {
        tokio::spawn(stats_loop(
            firewall.clone(),
            outbox.clone(),
            Duration::from_secs(config.firewall.stats_interval_s),
        ));
    }
    Ok(())
}

/// Feeds systemd's watchdog while the main loop turns.
fn spawn_watchdog(agent: &Arc<Agent>) {
    let Some(period) = sd_notify::watchdog_enabled() else {
        return;
    };
    let agent = agent.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(period / 2);
        loop {
            tick.tick().await;
            let alive = agent
                .metrics
                .alive_ms
                .load(std::sync::atomic::Ordering::Relaxed);
            if now_ms().saturating_sub(alive) < period.as_millis() as u64 {
                notify(&[sd_notify::NotifyState::Watchdog]);
            } else {
                tracing::error!("the main loop is stuck; not feeding the systemd watchdog");
            }
        }
    });
}

/// Reloads the configuration on SIGHUP; the session loop hears of it on the returned
/// channel.
fn spawn_reload(agent: &Arc<Agent>, config_path: std::path::PathBuf) -> watch::Receiver<u64> {
    let (reload_tx, reload_rx) = watch::channel(0u64);
    let agent = agent.clone();
    tokio::spawn(async move {
        use tokio::signal::unix::{SignalKind, signal};
        let mut hup = signal(SignalKind::hangup()).expect("installing the SIGHUP handler");
        while hup.recv().await.is_some() {
            agent.reload(&config_path, &reload_tx).await;
        }
    });
    reload_rx
}

/// SIGTERM or SIGINT: the session loop finishes the command in hand; past
/// [`SHUTDOWN_BOUND`] the process exits anyway.
fn spawn_stop(agent: &Arc<Agent>) -> watch::Receiver<bool> {
    let (stop_tx, stop_rx) = watch::channel(false);
    let socket = agent.config().control.socket.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("stop requested: finishing the command in hand");
        let _ = stop_tx.send(true);
        // Whatever the broker does, a stop takes at most this long: a command still in hand
        // is as after a crash (at most once: a redelivery gets its recorded answer).
        tokio::time::sleep(SHUTDOWN_BOUND).await;
        tracing::warn!(
            bound_secs = SHUTDOWN_BOUND.as_secs(),
            "not stopped within the bound (the broker does not answer); exiting now"
        );
        notify(&[sd_notify::NotifyState::Stopping]);
        let _ = std::fs::remove_file(&socket);
        std::process::exit(0);
    });
    stop_rx
}

/// The failsafe: the brokers' addresses (resolved now, else the last known ones), the
/// host's DNS servers when a broker is named by a DNS name, and the configured ports.
async fn render_ctx(config: &Config, connector: &Connector) -> RenderCtx {
    let brokers = connector.broker_addresses().await;
    let resolvers = if connector.uses_dns() {
        host_resolvers()
    } else {
        vec![]
    };
    let fw = &config.firewall;
    RenderCtx {
        table: fw.table.clone(),
        brokers,
        resolvers,
        failsafe_in: fw
            .failsafe_in
            .iter()
            .filter_map(|s| parse_failsafe(s))
            .collect(),
        failsafe_out: fw
            .failsafe_out
            .iter()
            .filter_map(|s| parse_failsafe(s))
            .collect(),
    }
}

/// The DNS servers this host asks: `/etc/resolv.conf`, and systemd-resolved's upstream
/// servers when it is the local stub (loopback itself is always allowed).
fn host_resolvers() -> Vec<std::net::IpAddr> {
    let mut out = vec![];
    for file in ["/etc/resolv.conf", "/run/systemd/resolve/resolv.conf"] {
        let Ok(text) = std::fs::read_to_string(file) else {
            continue;
        };
        out.extend(parse_nameservers(&text));
    }
    out.retain(|ip: &std::net::IpAddr| !ip.is_loopback());
    out.sort();
    out.dedup();
    out
}

/// `nameserver` lines of a resolv.conf (IPv6 zone suffixes dropped).
pub fn parse_nameservers(text: &str) -> Vec<std::net::IpAddr> {
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .filter_map(|rest| rest.split_whitespace().next())
        .filter_map(|addr| addr.split('%').next()?.parse().ok())
        .collect()
}

/// Rebuilds the applied rule set from the store (snapshot plus journal) and restores it.
async fn load_firewall(
    store: &Arc<Store>,
    config: &Config,
    ctx: RenderCtx,
    limits: Limits,
) -> anyhow::Result<Firewall> {
    let s = store.clone();
    let stored = tokio::task::spawn_blocking(move || s.load_firewall())
        .await
        .expect("state store task panicked")
        .context("reading the stored rule set")?;
    let nft = Nft::new(&config.firewall.nft);
    let mut fw = crate::dispatch::replay_firewall(nft, ctx, &stored).map_err(anyhow::Error::msg)?;
    fw.set_limits(limits);
    Ok(fw)
}

async fn open_store(config: &Config) -> anyhow::Result<Store> {
    let state_dir = config.state_dir.clone();
    let keep = config.commands.dedup_keep;
    tokio::task::spawn_blocking(move || Store::open(&state_dir, keep))
        .await
        .expect("state store task panicked")
        .context("opening the state store")
}

/// Keeps an unreadable store aside (for a person to look at) and opens a fresh one.
async fn set_store_aside(config: &Config, why: &anyhow::Error) -> anyhow::Result<Store> {
    let path = config.state_dir.join("state.redb");
    let aside = config
        .state_dir
        .join(format!("state.redb.unreadable-{}", now_ms()));
    tracing::error!(error = %format!("{why:#}"), path = %path.display(), kept_as = %aside.display(), "the state store cannot be read: keeping it aside and starting from a fresh one");
    std::fs::rename(&path, &aside)
        .with_context(|| format!("keeping {} aside as {}", path.display(), aside.display()))?;
    open_store(config)
        .await
        .context("opening a fresh state store")
}

/// The rule set to enforce when the stored one is lost: the failsafe (brokers and ports)
/// and established traffic pass, new inbound and forwarded traffic is dropped. Generation 0,
/// so the manager's next full rule set replaces it.
pub fn isolation_rule_set() -> RuleSet {
    use crate::firewall::spec::{Defaults, Policy};
    RuleSet {
        defaults: Defaults {
            input: Policy::Drop,
            output: Policy::Allow,
            forward: Policy::Drop,
        },
        ..RuleSet::default()
    }
}

/// Installs (and records, so a restart keeps it) the isolation rule set when configured,
/// and returns what the `state` event says about the loss.
async fn after_state_lost(
    fw: &mut Firewall,
    store: &Arc<Store>,
    config: &Config,
    why: &anyhow::Error,
) -> Value {
    let mode = config.firewall.when_state_lost;
    if mode == crate::config::WhenStateLost::Isolate {
        let rs = isolation_rule_set();
        let snapshot = rs.canonical_json();
        let s = store.clone();
        let recorded =
            tokio::task::spawn_blocking(move || s.compact_firewall(&snapshot, s.epoch()))
                .await
                .expect("state store task panicked");
        if let Err(e) = recorded {
            tracing::error!(error = %e, "could not record the isolation rule set");
        }
        fw.replace_unchecked(rs);
        tracing::warn!(
            "firewall isolated until the manager sends a full rule set: failsafe and established traffic only"
        );
    } else {
        tracing::warn!(
            "firewall.when_state_lost = \"open\": no rules until the manager sends a full rule set"
        );
    }
    json!({
        "at": now_ms(),
        "firewall": if mode == crate::config::WhenStateLost::Isolate { "isolate" } else { "open" },
        "error": format!("{why:#}"),
    })
}

/// Starts the namespace thread and converges the kernel's routers to the record, before
/// any broker is contacted.
async fn load_routers(
    store: &Arc<Store>,
    host_id: &str,
    drift: &tokio::sync::mpsc::Sender<Value>,
) -> anyhow::Result<Arc<tokio::sync::Mutex<Routers>>> {
    let s = store.clone();
    let (recorded, owned) = tokio::task::spawn_blocking(move || {
        Ok::<_, crate::state::StateError>((s.load_routers()?, s.owned_routers()?))
    })
    .await
    .expect("state store task panicked")
    .context("reading the recorded routers")?;
    let mut specs = Vec::with_capacity(recorded.len());
    for (id, bytes) in recorded {
        specs.push(
            RouterSpec::from_json(&bytes)
                .with_context(|| format!("recorded router {id} does not decode"))?,
        );
    }
    let worker = NetnsWorker::start(host_id).context("starting the namespace thread")?;
    let mut routers = Routers::new(worker, specs, owned.into_iter().collect());
    reconcile_routers(&mut routers, store, drift).await;
    tracing::info!(
        routers = routers.summary().len(),
        "routers converged to the record"
    );
    Ok(Arc::new(tokio::sync::Mutex::new(routers)))
}

/// One reconcile of the routers; a store failure is logged and retried next time.
async fn reconcile_routers(
    routers: &mut Routers,
    store: &Arc<Store>,
    drift: &tokio::sync::mpsc::Sender<Value>,
) {
    if let Err(e) = crate::dispatch::reconcile_routers(routers, store, drift).await {
        tracing::warn!(error = %e, "could not record the routers' reconcile (will retry)");
    }
}

/// A command body above this size (a large rule set) is followed by [`crate::sys::trim_heap`].
const LARGE_BODY: usize = 1 << 20;

/// A batch answers what it executed so far once it has run this long.
const BATCH_WINDOW: Duration = Duration::from_millis(20);

/// A session's acks, batch by batch, in queue order. Each batch is answered by a task of
/// its own while the next batch runs: its records are written (one fsync for all, while
/// the batch before may still wait for its confirms), then, once the batch before is
/// answered, its acks are published (their confirms awaited together), then its
/// deliveries settled. So the order record, ack, delivery ack holds for each command, and
/// acks and settlements stay in queue order.
struct Answers {
    dispatcher: Arc<Dispatcher>,
    publisher: broker::Publisher,
    host_id: String,
    broker_user: String,
    /// The last batch's task (it waits for the one before).
    in_flight: Option<Answering>,
}

/// The task answering one batch; dropping it aborts it, and so the tasks before it: a
/// session given up leaves those batches unsettled, and their deliveries come again and
/// are answered from their records, as duplicates.
struct Answering(tokio::task::JoinHandle<Result<(), BrokerError>>);

impl Answering {
    async fn done(&mut self) -> Result<(), BrokerError> {
        (&mut self.0).await.expect("the answering task panicked")
    }
}

impl Drop for Answering {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl Answers {
    fn new(
        dispatcher: &Arc<Dispatcher>,
        publisher: &broker::Publisher,
        host_id: &str,
        broker_user: &str,
    ) -> Answers {
        Answers {
            dispatcher: dispatcher.clone(),
            publisher: publisher.clone(),
            host_id: host_id.to_string(),
            broker_user: broker_user.to_string(),
            in_flight: None,
        }
    }

    /// Starts answering a batch: its outcomes in queue order, and its deliveries' ackers.
    fn send(&mut self, mut outcomes: Vec<crate::dispatch::Outcome>, ackers: Vec<lapin::Acker>) {
        use tracing::Instrument;
        let before = self.in_flight.take();
        let (dispatcher, publisher) = (self.dispatcher.clone(), self.publisher.clone());
        let (host_id, user) = (self.host_id.clone(), self.broker_user.clone());
        let task = async move {
            dispatcher.sync(&mut outcomes).await;
            if let Some(mut before) = before {
                before.done().await?;
            }
            let started = Instant::now();
            // Published in order (each future sends its frames when first polled, in turn).
            futures_util::future::try_join_all(
                outcomes
                    .iter()
                    .map(|o| publish_ack(&publisher, &host_id, &user, &o.ack)),
            )
            .await?;
            tracing::debug!(
                acks = outcomes.len(),
                confirm_us = started.elapsed().as_micros() as u64,
                "acks confirmed by the broker"
            );
            // Only now, with the acks safely at the broker, do the commands leave the queue.
            let dispositions: Vec<Disposition> = outcomes.iter().map(|o| o.disposition).collect();
            let settled = settle(publisher.connection(), ackers, &dispositions).await;
            tracing::debug!(
                answer_us = started.elapsed().as_micros() as u64,
                "deliveries settled"
            );
            settled
        };
        self.in_flight = Some(Answering(tokio::spawn(task.in_current_span())));
    }

    /// Resolves once every batch handed over is answered, with the error if that failed (a
    /// session whose acks cannot go out is given up); pending while none is.
    async fn settled(&mut self) -> Result<(), BrokerError> {
        match self.in_flight.as_mut() {
            Some(task) => {
                let done = task.done().await;
                self.in_flight = None;
                done
            }
            None => std::future::pending().await,
        }
    }

    /// Waits until every batch handed over is answered.
    async fn finish(&mut self) -> Result<(), BrokerError> {
        match self.in_flight.take() {
            Some(mut task) => task.done().await,
            None => Ok(()),
        }
    }
}

async fn publish_ack(
    publisher: &broker::Publisher,
    host_id: &str,
    broker_user: &str,
    ack: &crate::protocol::Ack,
) -> Result<(), BrokerError> {
    let mut props = broker::json_properties()
        .with_message_id(ack.id.as_str().into())
        .with_type("ack".into())
        .with_user_id(broker_user.into())
        .with_timestamp(ack.timestamp / 1000);
    if let Some(cid) = &ack.correlation_id {
        props = props.with_correlation_id(cid.as_str().into());
    }
    publisher
        .publish(broker::ACKS_EXCHANGE, host_id, &ack.to_json(), props)
        .await
}

/// Settles a batch's deliveries in queue order, with one frame per run: a run of acks is
/// one `basic.ack` with `multiple` on its last delivery (every delivery before it on the
/// channel is settled already, since batches settle in order), a rejection its own
/// `basic.reject`. One frame instead of one per command is most of what a large batch
/// spends between its confirms and the broker's next deliveries.
async fn settle(
    conn: &lapin::ConnectionStatus,
    ackers: Vec<lapin::Acker>,
    dispositions: &[Disposition],
) -> Result<(), BrokerError> {
    for (acker, frame) in ackers.into_iter().zip(settle_frames(dispositions)) {
        match frame {
            None => {}
            Some(Disposition::Ack) => {
                let ack = acker.ack(BasicAckOptions { multiple: true });
                broker::unless_ended(conn, "acknowledging the deliveries", ack).await?;
            }
            Some(Disposition::Reject) => {
                let reject = acker.reject(BasicRejectOptions { requeue: false });
                broker::unless_ended(conn, "rejecting the delivery", reject).await?;
            }
        }
    }
    Ok(())
}

/// The frame each delivery of a batch sends: `None` when the next delivery's multiple ack
/// covers it.
fn settle_frames(dispositions: &[Disposition]) -> Vec<Option<Disposition>> {
    let mut frames: Vec<Option<Disposition>> = dispositions.iter().copied().map(Some).collect();
    for i in 1..frames.len() {
        if dispositions[i - 1] == Disposition::Ack && dispositions[i] == Disposition::Ack {
            frames[i - 1] = None;
        }
    }
    frames
}

/// `first` and the deliveries already waiting behind it, at most `limit` in all; and why
/// the stream ended, if it did while they were taken.
fn waiting(
    first: lapin::message::Delivery,
    consumer: &mut lapin::Consumer,
    limit: u16,
) -> (Vec<lapin::message::Delivery>, Option<String>) {
    use futures_util::FutureExt;
    let mut batch = vec![first];
    while batch.len() < usize::from(limit.max(1)) {
        match consumer.next().now_or_never() {
            Some(Some(Ok(d))) => batch.push(d),
            Some(Some(Err(e))) => return (batch, Some(e.to_string())),
            Some(None) => return (batch, Some("the broker cancelled the consumer".into())),
            None => break,
        }
    }
    (batch, None)
}

/// How often the watch looks our table up: one netlink request, answered at once.
const TABLE_WATCH_PERIOD: Duration = Duration::from_millis(250);

/// Wakes the drift check when table `inet <table>` is missing or has another handle than the
/// one the agent last made (`made`, 0 while unknown), once per such finding. Polling one
/// request four times a second costs nothing; listening to nftables events instead would
/// make the kernel build an event for every rule and element of every transaction on the
/// host (see [`Firewall::made_handle`]). Runs forever on its own thread.
fn watch_table(table: &str, made: &std::sync::atomic::AtomicU64, wake: impl Fn()) {
    let mut reported: Option<Option<u64>> = None;
    loop {
        std::thread::sleep(TABLE_WATCH_PERIOD);
        let live = match crate::sys::nfnl::table_handle(table) {
            Ok(live) => live,
            Err(e) => {
                tracing::debug!(error = %e, "cannot look the table up");
                continue;
            }
        };
        let ours = made.load(std::sync::atomic::Ordering::Relaxed);
        let foreign = ours != 0 && live != Some(ours);
        if !foreign {
            reported = None;
        } else if reported != Some(live) {
            reported = Some(live);
            wake();
        }
    }
}

/// Every `period`, compares the kernel's table and routers with the record and repairs them.
async fn drift_loop(
    firewall: Arc<tokio::sync::Mutex<Firewall>>,
    routers: Arc<tokio::sync::Mutex<Routers>>,
    store: Arc<Store>,
    period: Duration,
    mut wake: tokio::sync::mpsc::Receiver<()>,
    events: tokio::sync::mpsc::Sender<Value>,
) {
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            Some(()) = wake.recv() => {}
        }
        reconcile_routers(&mut *routers.lock().await, &store, &events).await;
        let mut fw = firewall.lock().await;
        match fw.check_drift().await {
            Ok(Drift::None) => {}
            Ok(Drift::Repaired(what)) => {
                let generation = fw.current().generation;
                tracing::warn!(%what, generation, table = fw.table(), "firewall drift found and repaired");
                // What was opened while the rules were not in force.
                fw.cut_denied().await;
                let event = json!({"kind": "firewall", "what": what, "generation": generation, "repaired": true});
                if events.try_send(event).is_err() {
                    tracing::warn!("drift event dropped: too many pending");
                }
            }
            Err(e) => tracing::error!(error = %e, "firewall drift check failed"),
        }
    }
}

/// Moves drift events (from the drift check and the router reconcile) into the outbox.
async fn keep_drift_events(
    mut rx: tokio::sync::mpsc::Receiver<Value>,
    outbox: Arc<Outbox>,
    metrics: Arc<Metrics>,
) {
    while let Some(event) = rx.recv().await {
        metrics.drift_repairs.inc();
        outbox.push("drift", event).await;
    }
}

/// Sets `session_up` to 0 when a session's serving ends, however it ends.
struct SessionDown<'a>(&'a Metrics);

impl Drop for SessionDown<'_> {
    fn drop(&mut self) {
        self.0.session_up.set(0);
    }
}

/// Every `period`: the rules whose counters moved, as `stats` events (contract section 6).
async fn stats_loop(
    firewall: Arc<tokio::sync::Mutex<Firewall>>,
    outbox: Arc<Outbox>,
    period: Duration,
) {
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    let mut tracker = crate::events::StatsTracker::default();
    loop {
        tick.tick().await;
        let (generation, table, chains) = {
            let fw = firewall.lock().await;
            if !fw.is_managed() {
                continue;
            }
            (
                fw.current().generation,
                fw.table().to_string(),
                fw.bucket_chains(),
            )
        };
        let started = Instant::now();
        let counts =
            tokio::task::spawn_blocking(move || crate::firewall::counters::by_id(&table, &chains))
                .await
                .expect("netlink task panicked");
        let counts = match counts {
            Ok(c) => c,
            Err(error) => {
                tracing::warn!(%error, "rule counters not read: no stats this time");
                continue;
            }
        };
        let moved = tracker.moved(counts);
        tracing::debug!(
            rules = moved.len(),
            collect_us = started.elapsed().as_micros() as u64,
            "rule counters collected"
        );
        if moved.is_empty() {
            continue;
        }
        for part in crate::events::stats_parts(generation, &moved) {
            outbox.push("stats", part).await;
        }
    }
}

/// Tells systemd (when it started us with a notify socket); a no-op otherwise.
fn notify(states: &[sd_notify::NotifyState]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::debug!(error = %e, "sd_notify failed");
    }
}

/// Everything needed to open sessions with the configured identity and brokers.
fn build_connector(config: &Config, host_id: &str) -> anyhow::Result<Connector> {
    let (_, _, tls) =
        Current::load(&config.state_dir, &config.broker).context("loading the TLS identity")?;
    Ok(Connector::new(
        &config.broker,
        tls,
        format!("rampart/{host_id}"),
    )?)
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("installing the SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("installing the SIGINT handler");
    tokio::select! {
        _ = term.recv() => {},
        _ = int.recv() => {},
    }
}

/// `config` with the decode context it implies for host `host_id`.
fn settings_of(
    config: Config,
    host_id: &str,
    signing_keys: Vec<ed25519_dalek::VerifyingKey>,
) -> Settings {
    let decode = DecodeContext {
        host_id: host_id.to_string(),
        trusted_senders: config.broker.trusted_senders.clone(),
        max_body_bytes: config.commands.max_body_bytes,
        signing_keys,
        limits: limits_of(&config),
        max_age_ms: config.commands.max_age_ms,
    };
    Settings { config, decode }
}

/// The firewall limits a configuration sets.
fn limits_of(config: &Config) -> Limits {
    Limits {
        max_rules: config.firewall.max_rules,
        max_elements: config.firewall.max_elements,
        max_rule_expansion: config.firewall.max_rule_expansion,
    }
}

/// The settings that changed between `old` and `new` that a running agent cannot take
/// over (they shape what was set up at start); named in the log and in `rampart status`.
pub fn restart_only_changes(old: &Config, new: &Config) -> Vec<&'static str> {
    let checks: [(&'static str, bool); 9] = [
        ("host_id", old.host_id != new.host_id),
        ("state_dir", old.state_dir != new.state_dir),
        ("control.socket", old.control.socket != new.control.socket),
        ("log.format", old.log.format != new.log.format),
        (
            "commands.dedup_keep",
            old.commands.dedup_keep != new.commands.dedup_keep,
        ),
        ("firewall.table", old.firewall.table != new.firewall.table),
        ("firewall.nft", old.firewall.nft != new.firewall.nft),
        (
            "firewall.drift_check_secs",
            old.firewall.drift_check_secs != new.firewall.drift_check_secs,
        ),
        (
            "firewall.when_state_lost",
            old.firewall.when_state_lost != new.firewall.when_state_lost,
        ),
    ];
    checks
        .into_iter()
        .filter_map(|(name, changed)| changed.then_some(name))
        .collect()
}

fn load_signing_keys(config: &Config) -> anyhow::Result<Vec<ed25519_dalek::VerifyingKey>> {
    use ed25519_dalek::pkcs8::DecodePublicKey;
    config
        .commands
        .signing_keys
        .iter()
        .map(|path| {
            let pem = std::fs::read_to_string(path)
                .with_context(|| format!("reading signing key {}", path.display()))?;
            ed25519_dalek::VerifyingKey::from_public_key_pem(&pem)
                .map_err(|e| anyhow::anyhow!("signing key {}: {e}", path.display()))
        })
        .collect()
}

impl Agent {
    fn new(
        dispatcher: Arc<Dispatcher>,
        firewall: Arc<tokio::sync::Mutex<Firewall>>,
        outbox: Arc<Outbox>,
        shared: Arc<crate::control::Shared>,
        who: Who,
        settings: watch::Sender<Arc<Settings>>,
        metrics: Arc<Metrics>,
    ) -> Agent {
        Agent {
            dispatcher,
            firewall,
            outbox,
            shared,
            host_id: who.host_id,
            broker_user: who.broker_user,
            settings,
            started: Instant::now(),
            metrics,
            pulse: sd_notify::watchdog_enabled()
                .map(|p| (p / 4).min(Duration::from_secs(5)))
                .unwrap_or(Duration::from_secs(5)),
            cert_warned_ms: std::sync::atomic::AtomicU64::new(0),
            events_ok: std::sync::atomic::AtomicBool::new(true),
        }
    }

    fn beat(&self) {
        self.metrics
            .alive_ms
            .store(now_ms(), std::sync::atomic::Ordering::Relaxed);
    }

    /// The settings in force (the configuration, through `Deref`).
    fn config(&self) -> Arc<Settings> {
        self.settings.borrow().clone()
    }

    /// SIGHUP: re-reads the configuration. Log level and trusted senders apply at once; other
    /// broker settings open a new session; a file that does not validate changes nothing.
    async fn reload(&self, path: &std::path::Path, reconnect: &watch::Sender<u64>) {
        notify(&[sd_notify::NotifyState::Reloading]);
        // Everything is checked before anything changes: a reload applies whole or not at all.
        let loaded = Config::load(path)
            .map_err(anyhow::Error::from)
            .and_then(|new| Ok((load_signing_keys(&new)?, new)));
        match loaded {
            Err(e) => tracing::error!(error = %format!("{e:#}"), "configuration not reloaded"),
            Ok((signing_keys, new)) => {
                let old = self.config();
                if let Err(e) = crate::logs::set_log_level(&new.log.level) {
                    tracing::warn!(error = %e, "log level not changed");
                }
                self.firewall.lock().await.set_limits(limits_of(&new));
                let failsafe_changed = old.firewall.failsafe_in != new.firewall.failsafe_in
                    || old.firewall.failsafe_out != new.firewall.failsafe_out;
                let reconnect_needed = old.broker.needs_reconnect(&new.broker)
                    || old.effective_prefetch() != new.effective_prefetch();
                let restart = restart_only_changes(&old, &new);
                if !restart.is_empty() {
                    tracing::warn!(settings = ?restart, "these settings take effect at the next restart");
                }
                *self.shared.pending_restart.lock().expect("pending lock") = restart;
                // Senders, keys, limits and broker settings change together, for the next
                // command.
                self.settings
                    .send_replace(Arc::new(settings_of(new, &self.host_id, signing_keys)));
                tracing::info!(
                    log_level = %self.config().log.level,
                    reconnect = reconnect_needed,
                    "configuration reloaded"
                );
                if reconnect_needed {
                    // The new session's connector brings the new failsafe along.
                    reconnect.send_modify(|g| *g += 1);
                } else if failsafe_changed {
                    self.refresh_failsafe().await;
                }
            }
        }
        notify(&[sd_notify::NotifyState::Ready]);
    }

    /// Re-renders the table with the configured failsafe ports (same brokers).
    async fn refresh_failsafe(&self) {
        match build_connector(&self.config(), &self.host_id) {
            Ok(c) => self.follow_broker_addresses(&c).await,
            Err(e) => tracing::error!(error = %e, "failsafe not refreshed"),
        }
    }

    /// Puts the failsafe of `connector`'s brokers (as they resolve now, else as they last
    /// did) and the configured ports into the table, when they changed.
    async fn follow_broker_addresses(&self, connector: &Connector) {
        let ctx = render_ctx(&self.config(), connector).await;
        let mut fw = self.firewall.lock().await;
        if fw.set_ctx(ctx) {
            tracing::info!(
                "failsafe changed (broker addresses, resolvers or ports); re-applying the table"
            );
            if let Err(e) = fw.restore().await {
                tracing::error!(error = %e, "could not re-apply the firewall with the new failsafe");
            }
        }
    }

    /// A connector for the reloaded broker settings; the firewall failsafe follows the new
    /// broker addresses before the first attempt, so a drop-all rule set cannot lock us out.
    async fn reconnector(&self) -> Option<Connector> {
        let cfg = self.config();
        match build_connector(&cfg, &self.host_id) {
            Ok(c) => {
                let ctx = render_ctx(&cfg, &c).await;
                let mut fw = self.firewall.lock().await;
                if fw.set_ctx(ctx)
                    && let Err(e) = fw.restore().await
                {
                    tracing::error!(error = %e, "could not re-apply the firewall with the new failsafe");
                }
                Some(c)
            }
            Err(e) => {
                tracing::error!(error = %e, "new broker settings unusable; keeping the old ones");
                None
            }
        }
    }

    async fn session_loop(
        &self,
        mut connector: Connector,
        mut stop: watch::Receiver<bool>,
        mut reload: watch::Receiver<u64>,
    ) {
        let mut dialer = self.dialer_for(&connector);
        // A session already open on a newly installed identity (make-before-break).
        let mut rotated: Option<Session> = None;
        // The identity `connector` presents; when a rotation switched the files but its
        // session was lost before taking over, the next connector is built from them.
        let mut connector_identity = self.identity_sha();
        loop {
            self.beat();
            if *stop.borrow() {
                return;
            }
            let handover = rotated.is_some();
            if !handover && connector.uses_dns() {
                // A broker name may have moved: the failsafe follows before we dial it.
                self.follow_broker_addresses(&connector).await;
            }
            let attempt = match rotated.take() {
                Some(session) => Ok(session),
                None => {
                    self.dial(&mut connector, &mut connector_identity, &mut dialer)
                        .await
                }
            };
            let delay = match attempt {
                Ok(session) => {
                    if !handover && connector.uses_dns() {
                        // The name may have resolved for the dial but not a moment before,
                        // for the failsafe (a resolver starting at boot): found in CI, where a
                        // drop-all rule set then cut the session off. The addresses the dial
                        // used are pinned now, so this finds them even if DNS fails again.
                        self.follow_broker_addresses(&connector).await;
                    }
                    self.session_up(&session, handover);
                    let began = Instant::now();
                    match self.serve(&session, &mut stop, &mut reload).await {
                        SessionEnd::Shutdown => {
                            self.close(&session, "agent stopping").await;
                            return;
                        }
                        SessionEnd::Rotate(rotation) => {
                            let Rotation {
                                connector: c,
                                session: next,
                            } = *rotation;
                            self.close(&session, "identity rotated").await;
                            tracing::info!(url = %next.url, "old session closed; serving on the new identity");
                            connector = c;
                            connector_identity = self.identity_sha();
                            rotated = Some(next);
                            continue;
                        }
                        SessionEnd::Reload => {
                            self.close(&session, "configuration reloaded").await;
                            if let Some(c) = self.reconnector().await {
                                dialer = self.dialer_for(&c);
                                connector = c;
                                continue;
                            }
                        }
                        SessionEnd::Lost(why) => {
                            tracing::warn!(url = %session.url, error = %why, "broker session lost");
                            notify(&[sd_notify::NotifyState::Status(&format!(
                                "broker session lost ({why}); retrying"
                            ))]);
                            self.note_error(why);
                            self.close(&session, "reconnecting").await;
                        }
                    }
                    dialer.session_ended(began.elapsed())
                }
                Err((url, e)) => {
                    tracing::warn!(url = %url, error = %e, "cannot connect to broker");
                    self.note_error(e.to_string());
                    dialer.failed()
                }
            };
            tracing::info!(delay_ms = delay.as_millis() as u64, "retrying the broker");
            if !self
                .wait_to_retry(delay, &mut stop, &mut reload, &mut connector, &mut dialer)
                .await
            {
                return;
            }
        }
    }

    /// One attempt at the broker `dialer` picks, with a connector rebuilt first when the
    /// identity files changed since `identity` (a rotation whose session was lost before
    /// taking over).
    async fn dial(
        &self,
        connector: &mut Connector,
        identity: &mut String,
        dialer: &mut Dialer,
    ) -> Result<Session, (String, BrokerError)> {
        if *identity != self.identity_sha() {
            match build_connector(&self.config(), &self.host_id) {
                Ok(c) => *connector = c,
                Err(e) => tracing::error!(error = %e, "the installed identity is unusable"),
            }
            *identity = self.identity_sha();
        }
        let url = &connector.urls[dialer.pick() % connector.urls.len()];
        connector
            .connect(url)
            .await
            .map_err(|e| (url.display.clone(), e))
    }

    /// Waits out the backoff `delay`, beating; a reload ends the wait early (with the new
    /// broker settings). False: stop.
    async fn wait_to_retry(
        &self,
        delay: Duration,
        stop: &mut watch::Receiver<bool>,
        reload: &mut watch::Receiver<u64>,
        connector: &mut Connector,
        dialer: &mut Dialer,
    ) -> bool {
        let wake = tokio::time::Instant::now() + delay;
        let mut pulse = tokio::time::interval(self.pulse);
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(wake) => return true,
                _ = pulse.tick() => self.beat(),
                _ = stop.changed() => return false,
                _ = reload.changed() => {
                    if let Some(c) = self.reconnector().await {
                        *dialer = self.dialer_for(&c);
                        *connector = c;
                    }
                    return true;
                }
            }
        }
    }

    /// A session is up: counted, shown by the control socket and systemd, logged.
    fn session_up(&self, session: &Session, handover: bool) {
        self.metrics.sessions.inc();
        self.metrics.certificate_not_after.set(
            self.shared
                .identity
                .read()
                .expect("identity lock")
                .info
                .not_after_unix,
        );
        {
            let mut st = self.shared.session.lock().expect("session lock");
            st.state = SessionState::Connected;
            st.url = Some(session.url.clone());
            st.broker_port = Some(session.port);
            st.tls_version = Some(session.tls.version.clone());
            st.cipher = Some(session.tls.cipher.clone());
            st.broker_certificate = Some(session.tls.peer_subject.clone());
            st.broker_certificate_not_after = Some(session.tls.peer_not_after.clone());
            st.connected_since_ms = Some(now_ms());
            st.blocked_since_ms = None;
            st.sessions += 1;
            // A hand-over to a rotated identity is not a reconnect.
            if st.sessions > 1 && !handover {
                st.reconnects += 1;
            }
        }
        tracing::info!(
            url = %session.url,
            tls_version = %session.tls.version,
            cipher = %session.tls.cipher,
            broker_certificate = %session.tls.peer_subject,
            "connected to broker"
        );
        notify(&[sd_notify::NotifyState::Status(&format!(
            "serving commands from {}",
            session.url
        ))]);
    }

    /// Closes `session` within [`broker::CLOSE_TIMEOUT`], beating meanwhile.
    async fn close(&self, session: &Session, reason: &str) {
        let conn = &session.connection;
        self.with_pulse(conn, broker::close_bounded(conn, reason))
            .await;
    }

    /// A beat, and whether the broker blocks this connection (a resource alarm), for
    /// `rampart status` and the heartbeats.
    fn beat_with(&self, conn: &lapin::Connection) {
        self.beat();
        let blocked = conn.status().blocked();
        let mut st = self.shared.session.lock().expect("session lock");
        match (blocked, st.blocked_since_ms) {
            // (The connection's events log the transitions, with the broker's reason.)
            (true, None) => st.blocked_since_ms = Some(now_ms()),
            (false, Some(since)) => {
                st.blocked_since_ms = None;
                st.last_blocked = Some((since, now_ms()));
            }
            _ => {}
        }
    }

    /// Awaits `f` while the loop keeps beating: the watchdog's view is that the agent runs,
    /// not that the broker answers (every broker wait has its own bound).
    async fn with_pulse<F: std::future::Future>(
        &self,
        conn: &lapin::Connection,
        f: F,
    ) -> F::Output {
        tokio::pin!(f);
        let mut pulse = tokio::time::interval(self.pulse);
        loop {
            tokio::select! {
                out = &mut f => return out,
                _ = pulse.tick() => self.beat_with(conn),
            }
        }
    }

    /// Failover and backoff over `connector`'s brokers, with the configured backoff.
    fn dialer_for(&self, connector: &Connector) -> Dialer {
        let b = &self.config().broker;
        let dialer = Dialer::new(
            connector.urls.len(),
            Duration::from_millis(b.backoff_initial_ms),
            Duration::from_millis(b.backoff_max_ms),
        );
        match b.url_order {
            UrlOrder::Spread => dialer.starting_at(&self.host_id),
            UrlOrder::Listed => dialer,
        }
    }

    fn identity_sha(&self) -> String {
        self.shared
            .identity
            .read()
            .expect("identity lock")
            .info
            .sha256
            .clone()
    }

    fn note_error(&self, e: String) {
        self.metrics.session_up.set(0);
        let mut st = self.shared.session.lock().expect("session lock");
        if st.state == SessionState::Connected {
            st.state = SessionState::Disconnected;
        }
        st.connected_since_ms = None;
        st.last_error = Some(e);
    }

    async fn serve(
        &self,
        session: &Session,
        stop: &mut watch::Receiver<bool>,
        reload: &mut watch::Receiver<u64>,
    ) -> SessionEnd {
        // The setup (declarations, the `state` event) waits on the broker too: a broker in a
        // resource alarm holds the event's confirm for up to 30 s, longer than a watchdog
        // period (found by the 60 s alarm of the long chaos mode).
        let serving = self.serve_inner(session, stop, reload);
        match self.with_pulse(&session.connection, serving).await {
            Ok(end) => end,
            Err(e) => SessionEnd::Lost(e.to_string()),
        }
    }

    /// The channels of a session: topology declared (what is missing noted), the prefetch
    /// set, the confirm channel open, the host queue consumed.
    async fn subscribe(
        &self,
        conn: &lapin::Connection,
        cfg: &Config,
        prefetch: u16,
    ) -> Result<
        (
            lapin::Channel,
            broker::Publisher,
            lapin::Consumer,
            Vec<&'static str>,
        ),
        BrokerError,
    > {
        let consume_ch = conn
            .create_channel()
            .await
            .map_err(amqp("opening a channel"))?;
        consume_ch
            .basic_qos(prefetch, BasicQosOptions::default())
            .await
            .map_err(amqp("setting the prefetch"))?;
        let missing =
            broker::declare_agent_topology(conn, &consume_ch, &self.host_id, &cfg.broker).await?;
        if !missing.is_empty() {
            tracing::warn!(missing = ?missing, "serving without them: no events or no dead-lettering until they are declared");
        }
        self.events_ok.store(
            !missing.contains(&broker::EVENTS_EXCHANGE),
            std::sync::atomic::Ordering::Relaxed,
        );
        self.shared
            .session
            .lock()
            .expect("session lock")
            .broker_missing = missing.iter().map(|m| m.to_string()).collect();
        let publish_ch = broker::Publisher::open(conn).await?;
        let consumer = consume_ch
            .basic_consume(
                broker::host_queue(&self.host_id).as_str().into(),
                format!("rampart-{}", self.host_id).as_str().into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(amqp("consuming the host queue"))?;
        Ok((consume_ch, publish_ch, consumer, missing))
    }

    /// What a new session tells the manager first: the events kept while there was none,
    /// in order, then the `state` event (with what could not be kept), then an expiry
    /// warning if one is due.
    async fn announce(
        &self,
        publish_ch: &broker::Publisher,
        missing: &[&'static str],
    ) -> Result<(), BrokerError> {
        let mut summary = self
            .dispatcher
            .summary()
            .await
            .unwrap_or_else(|e| json!({"error": e.to_string()}));
        if !missing.is_empty() {
            summary["broker_missing"] = json!(missing);
        }
        self.drain_outbox(publish_ch).await?;
        let (_, dropped) = self.outbox.counts().await;
        summary["events_dropped"] = json!(dropped);
        self.publish_event(publish_ch, "state", summary).await?;
        if dropped > 0 {
            self.outbox.reported(dropped).await;
        }
        self.warn_expiry(publish_ch).await
    }

    #[tracing::instrument(name = "session", skip_all, fields(url = %session.url))]
    async fn serve_inner(
        &self,
        session: &Session,
        stop: &mut watch::Receiver<bool>,
        reload: &mut watch::Receiver<u64>,
    ) -> Result<SessionEnd, BrokerError> {
        let conn = &session.connection;
        let cfg = self.config();
        let prefetch = cfg.effective_prefetch();
        let (consume_ch, publish_ch, mut consumer, missing) =
            self.subscribe(conn, &cfg, prefetch).await?;
        // Subscribed only now: failed declarations above close their channel with an error
        // event, which must not count as losing the session.
        let mut events = conn.events_listener();
        self.announce(&publish_ch, &missing).await?;
        let mut answers = Answers::new(
            &self.dispatcher,
            &publish_ch,
            &self.host_id,
            &self.broker_user,
        );
        tracing::info!(queue = %broker::host_queue(&self.host_id), "serving commands");
        self.metrics.session_up.set(1);
        // Whatever way this session ends, it no longer serves.
        let _down = SessionDown(&self.metrics);
        let period = Duration::from_secs(u64::from(cfg.broker.heartbeat_secs));
        let mut heartbeat = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        let mut pulse = tokio::time::interval(self.pulse);
        let (end, reason) = loop {
            tokio::select! {
                biased;
                _ = stop.changed() => break (SessionEnd::Shutdown, "agent stopping"),
                _ = reload.changed() => break (SessionEnd::Reload, "configuration reloaded"),
                answered = answers.settled() => answered?,
                _ = pulse.tick() => self.beat_with(conn),
                event = events.next() => match event {
                    Some(Event::Error(e)) if !conn.status().connected() => {
                        return Ok(SessionEnd::Lost(e.to_string()));
                    }
                    Some(Event::Error(e)) => tracing::warn!(error = %e, "AMQP error on a channel"),
                    Some(Event::ConnectionBlocked(reason)) => {
                        tracing::warn!(%reason, "broker blocked this connection (resource alarm)");
                    }
                    Some(Event::ConnectionUnblocked) => tracing::info!("broker unblocked this connection"),
                    Some(_) => {}
                    None => return Ok(SessionEnd::Lost("connection events ended".into())),
                },
                delivery = consumer.next() => match delivery {
                    Some(Ok(first)) => {
                        let (batch, ended) = waiting(first, &mut consumer, prefetch);
                        if let Some(rotation) =
                            self.with_pulse(conn, self.process_batch(&mut answers, batch)).await?
                        {
                            break (SessionEnd::Rotate(rotation), "identity rotated");
                        }
                        if let Some(why) = ended {
                            return Ok(SessionEnd::Lost(why));
                        }
                    }
                    Some(Err(e)) => return Ok(SessionEnd::Lost(e.to_string())),
                    None => return Ok(SessionEnd::Lost("the broker cancelled the consumer".into())),
                },
                _ = heartbeat.tick() => {
                    let data = self.heartbeat_data(session).await;
                    self.with_pulse(conn, self.publish_event(&publish_ch, "heartbeat", data))
                        .await?;
                    self.with_pulse(conn, self.warn_expiry(&publish_ch)).await?;
                    self.shared.session.lock().expect("session lock").last_heartbeat_ms = Some(now_ms());
                }
                _ = self.outbox.pushed() => {
                    self.with_pulse(conn, self.drain_outbox(&publish_ch)).await?;
                }
            }
        };
        // An orderly end: the last acks go out, then the channels, so that the connection
        // closes in order.
        if let Err(error) = self.with_pulse(conn, answers.finish()).await {
            tracing::warn!(%error, "the last batch's acks did not all go out; its commands will come again");
        }
        broker::close_channels(&[&consume_ch, publish_ch.channel()], reason).await;
        Ok(end)
    }

    /// Runs `deliveries` (the ones waiting, in queue order) through the pipeline: each is
    /// executed in turn, its record kept (in memory) before the next one runs; then the
    /// batch goes to `answers`, which writes the records, publishes the acks together,
    /// awaits their confirms together and only then settles the deliveries, while the next
    /// batch runs. So the order record, ack, delivery ack holds for every command. A
    /// rotation ends the batch: the deliveries after it go back to the queue for the
    /// session on the new identity.
    #[tracing::instrument(name = "batch", skip_all, fields(deliveries = deliveries.len()))]
    async fn process_batch(
        &self,
        answers: &mut Answers,
        deliveries: Vec<lapin::message::Delivery>,
    ) -> Result<Option<Box<Rotation>>, BrokerError> {
        let mut executed = Vec::with_capacity(deliveries.len());
        let mut window = Instant::now();
        let mut rest = deliveries.into_iter();
        for delivery in rest.by_ref() {
            let (acker, outcome) = self.execute(delivery).await;
            let rotating = outcome.rotation.is_some();
            executed.push((acker, outcome));
            if rotating {
                break;
            }
            // A batch of slow commands (whole rule sets) answers as it goes.
            if window.elapsed() >= BATCH_WINDOW {
                self.answer(answers, std::mem::take(&mut executed)).await?;
                window = Instant::now();
            }
        }
        // What was executed is answered first: its records are synced there, and an error
        // returning the rest must not leave them unsynced while a redelivery could be
        // answered from them.
        let rotation = self.answer(answers, executed).await?;
        for left in rest {
            let nack = left.acker.nack(BasicNackOptions {
                requeue: true,
                ..Default::default()
            });
            let returned = "returning a delivery to the queue";
            broker::unless_ended(answers.publisher.connection(), returned, nack).await?;
        }
        Ok(rotation)
    }

    /// One delivery through the dispatcher, counted; its acker for later.
    async fn execute(
        &self,
        delivery: lapin::message::Delivery,
    ) -> (lapin::Acker, crate::dispatch::Outcome) {
        let props = &delivery.properties;
        let signature =
            props
                .headers()
                .as_ref()
                .and_then(|h| match h.inner().get("x-rampart-signature") {
                    Some(AMQPValue::LongString(s)) => {
                        Some(String::from_utf8_lossy(s.as_bytes()).into_owned())
                    }
                    Some(AMQPValue::ShortString(s)) => Some(s.as_str().to_string()),
                    _ => None,
                });
        let large = delivery.data.len() > LARGE_BODY;
        let incoming = Incoming {
            message_id: props.message_id().as_ref().map(|s| s.as_str().to_string()),
            kind: props.kind().as_ref().map(|s| s.as_str().to_string()),
            user_id: props.user_id().as_ref().map(|s| s.as_str().to_string()),
            signature,
            body: delivery.data,
        };
        let started = Instant::now();
        let outcome = self.dispatcher.handle(incoming).await;
        self.count(&outcome.ack, started.elapsed()).await;
        if large {
            let _ = tokio::task::spawn_blocking(crate::sys::trim_heap).await;
        }
        (delivery.acker, outcome)
    }

    async fn count(&self, ack: &crate::protocol::Ack, took: Duration) {
        let key = if ack.duplicate {
            "duplicate"
        } else {
            ack.status.as_str()
        };
        let kind = ack.command_type.as_deref().unwrap_or("unknown");
        self.metrics.command(kind, key, took.as_secs_f64());
        if kind.starts_with("firewall.") {
            let counts = self.firewall.lock().await.current().counts();
            (self.metrics).firewall(counts.generation, counts.rules, counts.elements);
        }
        *self
            .shared
            .commands
            .lock()
            .expect("commands lock")
            .entry(key.to_string())
            .or_default() += 1;
    }

    /// Hands `executed` to `answers`, which writes their records, publishes their acks and
    /// settles their deliveries while the next batch runs. Returns the rotation, if one of
    /// them made one: its batch is settled before the session hands over.
    async fn answer(
        &self,
        answers: &mut Answers,
        executed: Vec<(lapin::Acker, crate::dispatch::Outcome)>,
    ) -> Result<Option<Box<Rotation>>, BrokerError> {
        if executed.is_empty() {
            return Ok(None);
        }
        let (ackers, mut outcomes): (Vec<_>, Vec<_>) = executed.into_iter().unzip();
        // An identity switched stays switched, whatever becomes of the record.
        let rotation = outcomes.iter_mut().find_map(|o| o.rotation.take());
        answers.send(outcomes, ackers);
        if rotation.is_some() {
            answers.finish().await?;
        }
        Ok(rotation)
    }

    /// Publishes `cert.<host>` when the certificate expires within `cert_warn_days`, at most
    /// once a day (and once per start).
    async fn warn_expiry(&self, ch: &broker::Publisher) -> Result<(), BrokerError> {
        use std::sync::atomic::Ordering;
        let warn_days = i64::from(self.config().broker.cert_warn_days);
        let (summary, days) = {
            let current = self.shared.identity.read().expect("identity lock");
            let days = crate::certs::days_left(&current.info, now_ms() as i64 / 1000);
            (current.summary(), days)
        };
        let last = self.cert_warned_ms.load(Ordering::Relaxed);
        if days >= warn_days || (last != 0 && now_ms().saturating_sub(last) < 86_400_000) {
            return Ok(());
        }
        tracing::warn!(days_left = days, not_after = %summary.not_after, "the agent's certificate expires soon");
        self.outbox
            .push(
                "cert",
                json!({"certificate": summary, "days_left": days, "warn_days": warn_days}),
            )
            .await;
        self.drain_outbox(ch).await?;
        self.cert_warned_ms.store(now_ms(), Ordering::Relaxed);
        Ok(())
    }

    async fn heartbeat_data(&self, session: &Session) -> Value {
        let firewall = self.firewall.lock().await.current().counts();
        json!({
            "host": self.host_id,
            "version": env!("CARGO_PKG_VERSION"),
            "uptime_secs": self.started.elapsed().as_secs(),
            "broker": session.url,
            "firewall": firewall,
            "routers": self.shared.routers.lock().await.summary().len(),
            "certificate": self.shared.identity.read().expect("identity lock").summary(),
            "last_error": self.shared.session.lock().expect("session lock").last_error.clone(),
            "broker_blocked": self.blocked_summary(),
        })
    }

    /// `{"since": ms}` while the broker blocks us, else the last blocked spell, if any.
    fn blocked_summary(&self) -> Value {
        let st = self.shared.session.lock().expect("session lock");
        match (st.blocked_since_ms, st.last_blocked) {
            (Some(since), _) => json!({ "since": since }),
            (None, Some((from, to))) => json!({ "last": { "from": from, "to": to } }),
            (None, None) => Value::Null,
        }
    }

    /// Publishes an event that happened now and is not kept (heartbeats, `state`).
    async fn publish_event(
        &self,
        ch: &broker::Publisher,
        event: &str,
        data: Value,
    ) -> Result<(), BrokerError> {
        if !self.events_ok.load(std::sync::atomic::Ordering::Relaxed) {
            tracing::debug!(
                event,
                "rampart.events is missing on this broker: event not sent"
            );
            return Ok(());
        }
        let body = crate::events::envelope(&self.host_id, event, data, now_ms());
        self.publish_body(
            ch,
            event,
            &serde_json::to_vec(&body).expect("event serialises"),
        )
        .await
    }

    async fn publish_body(
        &self,
        ch: &broker::Publisher,
        event: &str,
        body: &[u8],
    ) -> Result<(), BrokerError> {
        let props = broker::json_properties()
            .with_type(event.into())
            .with_user_id(self.broker_user.as_str().into());
        ch.publish(
            broker::EVENTS_EXCHANGE,
            &format!("{event}.{}", self.host_id),
            body,
            props,
        )
        .await
    }

    /// Publishes the kept events, oldest first, each removed once the broker confirmed it;
    /// those older than [`crate::events::MAX_AGE_MS`] are dropped and counted instead.
    async fn drain_outbox(&self, ch: &broker::Publisher) -> Result<(), BrokerError> {
        if !self.events_ok.load(std::sync::atomic::Ordering::Relaxed) {
            return Ok(()); // kept (bounded) until a broker has the exchange
        }
        loop {
            let batch = self.outbox.pending(64).await;
            if batch.is_empty() {
                return Ok(());
            }
            let now = now_ms();
            let (mut done, mut expired) = (vec![], 0);
            let mut failed = None;
            for e in batch {
                if now.saturating_sub(e.at_ms) > crate::events::MAX_AGE_MS {
                    tracing::warn!(event = %e.kind, age_ms = now - e.at_ms, "kept event too old: dropped");
                    expired += 1;
                } else if let Err(error) = self.publish_body(ch, &e.kind, &e.body).await {
                    failed = Some(error);
                    break;
                }
                done.push(e.seq);
            }
            self.outbox.done(done, expired).await;
            if let Some(error) = failed {
                return Err(error);
            }
        }
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn a_run_of_acks_is_one_frame_and_each_rejection_its_own() {
        use Disposition::{Ack, Reject};
        assert_eq!(settle_frames(&[]), vec![]);
        assert_eq!(settle_frames(&[Ack]), vec![Some(Ack)]);
        assert_eq!(
            settle_frames(&[Ack, Ack, Reject, Reject, Ack, Ack, Ack]),
            vec![
                None,
                Some(Ack),
                Some(Reject),
                Some(Reject),
                None,
                None,
                Some(Ack)
            ]
        );
        assert_eq!(settle_frames(&[Reject, Ack]), vec![Some(Reject), Some(Ack)]);
    }
    use super::*;

    #[test]
    fn nameservers_are_read_like_the_resolver_does() {
        let text = "# generated\nsearch example\nnameserver 10.0.0.2\nnameserver  fe80::1%eth0\n\
                    nameserver 127.0.0.53\noptions edns0\nnameserver bogus\n";
        let got = parse_nameservers(text);
        let want: Vec<std::net::IpAddr> = vec![
            "10.0.0.2".parse().unwrap(),
            "fe80::1".parse().unwrap(),
            "127.0.0.53".parse().unwrap(),
        ];
        assert_eq!(got, want);
    }

    #[test]
    fn restart_only_settings_are_named() {
        let text = "[broker]\nurls = [\"amqps://b:5671/%2f\"]\nca_file = \"c\"\ncert_file = \"c\"\nkey_file = \"k\"\n";
        let old = Config::parse(text).unwrap();
        let new = Config::parse(&format!(
            "{text}[firewall]\ntable = \"other\"\nmax_rules = 5\n"
        ))
        .unwrap();
        assert_eq!(restart_only_changes(&old, &new), vec!["firewall.table"]);
        assert!(restart_only_changes(&old, &old).is_empty());
    }
}
