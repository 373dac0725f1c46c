//! Leaf: the agent's version string, its logging (set up once, level changed on reload) and
//! what it tells systemd. Every layer may use it; it uses none of them.

/// The version and the git revision it was built from, as `rampart --version` prints it.
pub const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (",
    env!("RAMPART_GIT_REV"),
    ")"
);

/// `log.format` in the configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line (for journald or a log shipper).
    Json,
}

type LogReload = Box<dyn Fn(&str) -> Result<(), String> + Send + Sync>;

/// Swaps the log filter of the running process (SIGHUP reload).
static LOG_RELOAD: std::sync::OnceLock<LogReload> = std::sync::OnceLock::new();

fn log_filter(level: &str) -> tracing_subscriber::EnvFilter {
    // lapin logs every channel close at ERROR; the agent reports what matters itself.
    tracing_subscriber::EnvFilter::new(format!("{level},lapin=off"))
}

/// Sets up logging to stderr at `level` (`RAMPART_LOG` overrides it), in `format`; the
/// level can be changed later with [`set_log_level`].
pub fn init_logging(level: &str, format: LogFormat) {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let filter = tracing_subscriber::EnvFilter::try_from_env("RAMPART_LOG")
        .unwrap_or_else(|_| log_filter(level));
    let (filter, handle) = tracing_subscriber::reload::Layer::new(filter);
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let registry = tracing_subscriber::registry().with(filter);
    match format {
        LogFormat::Text => registry.with(fmt).init(),
        LogFormat::Json => registry.with(fmt.json()).init(),
    }
    let _ = LOG_RELOAD.set(Box::new(move |level| {
        handle.reload(log_filter(level)).map_err(|e| e.to_string())
    }));
}

/// Applies a new log level (the configuration's `log.level`) to the running process.
pub fn set_log_level(level: &str) -> Result<(), String> {
    match LOG_RELOAD.get() {
        Some(reload) => reload(level),
        None => Err("logging is not initialised".into()),
    }
}

/// Tells systemd (when it started us with a notify socket); a no-op otherwise.
pub fn notify(states: &[sd_notify::NotifyState]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::debug!(error = %e, "sd_notify failed");
    }
}
