//! Wires the stages together: identity and state at start, then the broker session loop
//! (connect with backoff, declare, consume, dispatch, ack, heartbeat) until a signal.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::{Value, json};
use tokio::sync::watch;

use crate::broker::{self, BrokerError, Connector};
use crate::certs::Current;
use crate::config::{AuthMechanism, Config, parse_failsafe};
use crate::dispatch::{CertContext, Dispatcher, Rotation, Settings};
use crate::events::Outbox;
use crate::firewall::render::RenderCtx;
use crate::firewall::spec::{Limits, RuleSet};
use crate::firewall::{Drift, Firewall};
use crate::ids::{is_valid_host_id, now_ms};
use crate::metrics::Metrics;
use crate::protocol::DecodeContext;
use crate::router::Routers;
use crate::router::spec::RouterSpec;
use crate::session::{Inbound, Link, Received, Reply, SessionStatus};
use crate::state::Store;
use crate::sys::netns::NetnsWorker;
use crate::sys::nft::Nft;

/// Longest time from SIGTERM to exit.
const SHUTDOWN_BOUND: Duration = Duration::from_secs(15);

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
    let (status_tx, status_rx) = watch::channel(SessionStatus::default());
    let shared = shared_status(&firewall, &routers, &store, &who, state_lost, status_rx);
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
    crate::logs::notify(&[
        sd_notify::NotifyState::Ready,
        sd_notify::NotifyState::Status("state restored; connecting to the broker"),
    ]);
    spawn_watchdog(&agent);
    let reload_rx = spawn_reload(&agent, config_path);
    let stop_rx = spawn_stop(&agent);
    let link = start_session(&agent, connector, status_tx);
    agent.serve(link, stop_rx, reload_rx).await?;
    crate::logs::notify(&[sd_notify::NotifyState::Stopping]);
    let _ = std::fs::remove_file(&agent.config().control.socket);
    tracing::info!("agent stopped");
    Ok(())
}

/// Starts the session actor on `connector`'s brokers, reporting its state on `status`.
fn start_session(
    agent: &Arc<Agent>,
    connector: Connector,
    status: watch::Sender<SessionStatus>,
) -> Link {
    crate::session::start(
        agent.clone(),
        crate::session::Start {
            connector,
            host_id: agent.host_id.clone(),
            broker_user: agent.broker_user.clone(),
            settings: agent.settings.subscribe(),
            metrics: agent.metrics.clone(),
            status,
            pulse: agent.pulse,
        },
    )
}

/// What the control socket reads: the state, and the session's status as it changes.
fn shared_status(
    firewall: &Arc<tokio::sync::Mutex<Firewall>>,
    routers: &Arc<tokio::sync::Mutex<Routers>>,
    store: &Arc<Store>,
    who: &Who,
    state_lost: Option<Value>,
    session: watch::Receiver<SessionStatus>,
) -> Arc<crate::control::Shared> {
    Arc::new(crate::control::Shared {
        firewall: firewall.clone(),
        routers: routers.clone(),
        store: store.clone(),
        host_id: who.host_id.clone(),
        started_ms: now_ms(),
        identity: who.identity.clone(),
        session,
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
            let alive = agent.metrics.alive_since();
            if now_ms().saturating_sub(alive) < period.as_millis() as u64 {
                crate::logs::notify(&[sd_notify::NotifyState::Watchdog]);
            } else {
                tracing::error!(
                    "the pipeline or the session is stuck; not feeding the systemd watchdog"
                );
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
        crate::logs::notify(&[sd_notify::NotifyState::Stopping]);
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
        crate::logs::notify(&[sd_notify::NotifyState::Reloading]);
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
        crate::logs::notify(&[sd_notify::NotifyState::Ready]);
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

    /// The pipeline's loop over the session actor's reports: each session is announced,
    /// then its batches run through the dispatcher and go back to the actor to be answered;
    /// heartbeats and kept events go out while a session serves. Ends on SIGTERM or SIGINT,
    /// once the actor settled what was answered and closed the session.
    async fn serve(
        &self,
        mut link: Link,
        mut stop: watch::Receiver<bool>,
        mut reload: watch::Receiver<u64>,
    ) -> anyhow::Result<()> {
        // The session whose deliveries the pipeline takes (announced, not handed over).
        let mut serving: Option<u64> = None;
        let period = Duration::from_secs(u64::from(self.config().broker.heartbeat_secs));
        let mut heartbeat = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        let mut pulse = tokio::time::interval(self.pulse);
        loop {
            tokio::select! {
                biased;
                _ = stop.changed() => break,
                _ = reload.changed() => {
                    if let Some(c) = self.reconnector().await {
                        serving = None;
                        link.reconnect(c);
                    }
                }
                _ = pulse.tick() => self.beat(),
                inbound = link.recv() => match inbound {
                    // Only a panic ends the actor unasked: exit, for systemd to restart us.
                    None => anyhow::bail!("the session actor ended unexpectedly"),
                    Some(Inbound::Up { session, missing }) => {
                        serving = self.session_up(&link, session, &missing).await;
                        heartbeat.reset();
                    }
                    Some(Inbound::Batch { session, deliveries }) if serving == Some(session) => {
                        let ran = self.process_batch(&link, session, deliveries);
                        if let Some(rotation) = self.with_pulse(ran).await {
                            serving = None;
                            link.hand_over(rotation);
                        }
                    }
                    // A session handed over, or whose announcement failed (it is being given
                    // up): its deliveries go back to the queue.
                    Some(Inbound::Batch { session, deliveries }) => {
                        link.requeue(session, deliveries.iter().map(|d| d.tag).collect());
                    }
                    Some(Inbound::Down { session }) => {
                        if serving == Some(session) {
                            serving = None;
                        }
                    }
                },
                _ = heartbeat.tick(), if serving.is_some() => {
                    let data = self.heartbeat_data().await;
                    let sent = async {
                        self.publish_event(&link, "heartbeat", data).await?;
                        self.warn_expiry(&link).await
                    };
                    if let Err(error) = self.with_pulse(sent).await {
                        tracing::debug!(%error, "heartbeat not sent (the session is given up)");
                    }
                }
                _ = self.outbox.pushed(), if serving.is_some() => {
                    if let Err(error) = self.with_pulse(self.drain_outbox(&link)).await {
                        tracing::debug!(%error, "kept events not sent (the session is given up)");
                    }
                }
            }
        }
        self.with_pulse(link.close()).await;
        Ok(())
    }

    /// A session is up: the identity's expiry shown, the session announced. Its id, when the
    /// announcement went out (else the actor gives the session up).
    async fn session_up(&self, link: &Link, session: u64, missing: &[&'static str]) -> Option<u64> {
        let not_after = (self.shared.identity.read().expect("identity lock"))
            .info
            .not_after_unix;
        self.metrics.certificate_not_after.set(not_after);
        self.events_ok.store(
            !missing.contains(&broker::EVENTS_EXCHANGE),
            std::sync::atomic::Ordering::Relaxed,
        );
        match self.with_pulse(self.announce(link, missing)).await {
            Ok(()) => Some(session),
            Err(error) => {
                tracing::warn!(%error, "the session could not be announced");
                None
            }
        }
    }

    /// Awaits `f` while the loop keeps beating: the watchdog's view is that the agent runs,
    /// not that the broker answers (every broker wait has its own bound).
    async fn with_pulse<F: std::future::Future>(&self, f: F) -> F::Output {
        tokio::pin!(f);
        let mut pulse = tokio::time::interval(self.pulse);
        loop {
            tokio::select! {
                out = &mut f => return out,
                _ = pulse.tick() => self.beat(),
            }
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

    /// What a new session tells the manager first: the events kept while there was none,
    /// in order, then the `state` event (with what could not be kept), then an expiry
    /// warning if one is due.
    async fn announce(&self, link: &Link, missing: &[&'static str]) -> Result<(), BrokerError> {
        let mut summary = self
            .dispatcher
            .summary()
            .await
            .unwrap_or_else(|e| json!({"error": e.to_string()}));
        if !missing.is_empty() {
            summary["broker_missing"] = json!(missing);
        }
        self.drain_outbox(link).await?;
        let (_, dropped) = self.outbox.counts().await;
        summary["events_dropped"] = json!(dropped);
        self.publish_event(link, "state", summary).await?;
        if dropped > 0 {
            self.outbox.reported(dropped).await;
        }
        self.warn_expiry(link).await
    }

    /// Runs `deliveries` (the ones waiting, in queue order) through the pipeline: each is
    /// executed in turn, its record kept (in memory) before the next one runs; then the
    /// batch goes to the session actor, which has the records written, publishes the acks
    /// together, awaits their confirms together and only then settles the deliveries, while
    /// the next batch runs. So the order record, ack, delivery ack holds for every command.
    /// A rotation ends the batch: the deliveries after it go back to the queue for the
    /// session on the new identity.
    #[tracing::instrument(name = "batch", skip_all, fields(deliveries = deliveries.len()))]
    async fn process_batch(
        &self,
        link: &Link,
        session: u64,
        deliveries: Vec<Received>,
    ) -> Option<Box<Rotation>> {
        let mut executed = Vec::with_capacity(deliveries.len());
        let mut window = Instant::now();
        let mut rest = deliveries.into_iter();
        let mut rotation = None;
        let mut run = self.dispatcher.batch();
        for delivery in rest.by_ref() {
            let large = delivery.incoming.body.len() > LARGE_BODY;
            let done = run.handle(delivery.tag, delivery.incoming).await;
            if large {
                let _ = tokio::task::spawn_blocking(crate::sys::trim_heap).await;
            }
            rotation = self.counted(done, &mut executed);
            if rotation.is_some() {
                break;
            }
            // A batch of slow commands (whole rule sets) answers as it goes.
            if window.elapsed() >= BATCH_WINDOW {
                self.counted(run.flush().await, &mut executed);
                self.answer(link, session, std::mem::take(&mut executed));
                window = Instant::now();
            }
        }
        self.counted(run.flush().await, &mut executed);
        self.answer(link, session, executed);
        link.requeue(session, rest.map(|d| d.tag).collect());
        rotation
    }

    /// Counts the outcomes and puts them with the ones to answer; the rotation, if one of
    /// them made one (it is the last: an identity command runs after the ones before it).
    fn counted(
        &self,
        done: Vec<crate::dispatch::Done>,
        executed: &mut Vec<(u64, crate::dispatch::Outcome)>,
    ) -> Option<Box<Rotation>> {
        let mut rotation = None;
        for crate::dispatch::Done {
            tag,
            mut outcome,
            took,
        } in done
        {
            self.count(&outcome.ack, took);
            // An identity switched stays switched, whatever becomes of the record.
            rotation = rotation.or(outcome.rotation.take());
            executed.push((tag, outcome));
        }
        rotation
    }

    fn count(&self, ack: &crate::protocol::Ack, took: Duration) {
        let key = if ack.duplicate {
            "duplicate"
        } else {
            ack.status.as_str()
        };
        let kind = ack.command_type.as_deref().unwrap_or("unknown");
        self.metrics.command(kind, key, took.as_secs_f64());
        *self
            .shared
            .commands
            .lock()
            .expect("commands lock")
            .entry(key.to_string())
            .or_default() += 1;
    }

    /// Hands `executed` to the session actor: once their records are written (here, one
    /// write for the batch, in the actor's answering task), their acks go out and their
    /// deliveries are settled, while the next batch runs.
    fn answer(&self, link: &Link, session: u64, executed: Vec<(u64, crate::dispatch::Outcome)>) {
        if executed.is_empty() {
            return;
        }
        let (tags, mut outcomes): (Vec<_>, Vec<_>) = executed.into_iter().unzip();
        let dispatcher = self.dispatcher.clone();
        link.answer(session, tags, async move {
            dispatcher.sync(&mut outcomes).await;
            outcomes
                .into_iter()
                .map(|o| Reply {
                    ack: o.ack,
                    disposition: o.disposition,
                })
                .collect()
        });
    }

    /// Publishes `cert.<host>` when the certificate expires within `cert_warn_days`, at most
    /// once a day (and once per start).
    async fn warn_expiry(&self, link: &Link) -> Result<(), BrokerError> {
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
        self.drain_outbox(link).await?;
        self.cert_warned_ms.store(now_ms(), Ordering::Relaxed);
        Ok(())
    }

    async fn heartbeat_data(&self) -> Value {
        let firewall = self.firewall.lock().await.current().counts();
        let session = self.shared.session.borrow().clone();
        json!({
            "host": self.host_id,
            "version": env!("CARGO_PKG_VERSION"),
            "uptime_secs": self.started.elapsed().as_secs(),
            "broker": session.url,
            "firewall": firewall,
            "routers": self.shared.routers.lock().await.summary().len(),
            "certificate": self.shared.identity.read().expect("identity lock").summary(),
            "last_error": session.last_error,
            "broker_blocked": blocked_summary(&session),
        })
    }

    /// Publishes an event that happened now and is not kept (heartbeats, `state`).
    async fn publish_event(
        &self,
        link: &Link,
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
        link.publish(event, serde_json::to_vec(&body).expect("event serialises"))
            .await
    }

    /// Publishes the kept events, oldest first, each removed once the broker confirmed it;
    /// those older than [`crate::events::MAX_AGE_MS`] are dropped and counted instead.
    async fn drain_outbox(&self, link: &Link) -> Result<(), BrokerError> {
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
                } else if let Err(error) = link.publish(&e.kind, e.body.clone()).await {
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

/// The session actor's view of the agent: the failsafe follows the brokers it dials, and a
/// rotated identity's files give the next connector.
impl crate::session::Host for Agent {
    async fn follow(&self, connector: &Connector) {
        self.follow_broker_addresses(connector).await;
    }

    fn identity(&self) -> String {
        self.identity_sha()
    }

    fn connector(&self) -> anyhow::Result<Connector> {
        build_connector(&self.config(), &self.host_id)
    }
}

/// `{"since": ms}` while the broker blocks us, else the last blocked spell, if any.
fn blocked_summary(st: &SessionStatus) -> Value {
    match (st.blocked_since_ms, st.last_blocked) {
        (Some(since), _) => json!({ "since": since }),
        (None, Some((from, to))) => json!({ "last": { "from": from, "to": to } }),
        (None, None) => Value::Null,
    }
}

#[cfg(test)]
mod tests {
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
