//! Command-line interface: the subcommands and what each one runs.

use std::io::Read;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};

use crate::config::{Config, DEFAULT_CONFIG_PATH, LogFormat};
use crate::manager::Manager;
use crate::protocol::Status;

pub const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (",
    env!("RAMPART_GIT_REV"),
    ")"
);

#[derive(Debug, Parser)]
#[command(name = "rampart", version = VERSION, about = "Host agent for firewall rules, certificates and logical routers pushed over a mutual-TLS AMQP bus")]
pub struct Cli {
    /// Configuration file.
    #[arg(long, global = true, default_value = DEFAULT_CONFIG_PATH, env = "RAMPART_CONFIG")]
    pub config: PathBuf,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the agent in the foreground (as systemd does).
    Run,
    /// Validate the configuration file and exit.
    CheckConfig,
    /// Manager side: publish one command to a host and print its ack as JSON.
    ///
    /// Exit status: 0 applied, 2 rejected, 3 failed, 4 stale, 5 no ack in time, 1 other errors.
    Send {
        /// Target host id.
        #[arg(long)]
        host: String,
        /// Command type (ping, state.sync, ...).
        #[arg(long = "type")]
        kind: String,
        /// JSON file with the command's data, or - for standard input; default {}.
        #[arg(long)]
        data: Option<String>,
        /// Command id; default a fresh UUID.
        #[arg(long)]
        id: Option<String>,
        /// Seconds to wait for the ack.
        #[arg(long, default_value_t = 30)]
        timeout: u64,
    },
}

/// Exit codes of `rampart send`, so scripts can tell outcomes apart.
pub fn send_exit_code(status: Status) -> i32 {
    match status {
        Status::Applied => 0,
        Status::Rejected => 2,
        Status::Failed => 3,
        Status::Stale => 4,
    }
}

pub const EXIT_TIMEOUT: i32 = 5;

pub fn init_logging(level: &str, format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("RAMPART_LOG")
        // lapin logs every channel close at ERROR; the agent reports what matters itself.
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(format!("{level},lapin=off")));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// Runs one parsed command line; returns the process exit code.
pub async fn main(cli: Cli) -> anyhow::Result<i32> {
    match cli.command {
        Command::CheckConfig => {
            Config::load(&cli.config)?;
            println!("{}: ok", cli.config.display());
            Ok(0)
        }
        Command::Run => {
            let config = Config::load(&cli.config)?;
            init_logging(&config.log.level, config.log.format);
            tracing::info!(version = VERSION, config = %cli.config.display(), "rampart starting");
            crate::daemon::run(config).await?;
            Ok(0)
        }
        Command::Send {
            host,
            kind,
            data,
            id,
            timeout,
        } => {
            let config = Config::load(&cli.config)?;
            init_logging("warn", LogFormat::Text);
            let data: serde_json::Value = match data.as_deref() {
                None => serde_json::json!({}),
                Some("-") => {
                    let mut s = String::new();
                    std::io::stdin().read_to_string(&mut s)?;
                    serde_json::from_str(&s).context("command data from stdin")?
                }
                Some(path) => serde_json::from_str(
                    &std::fs::read_to_string(path).with_context(|| format!("reading {path}"))?,
                )
                .with_context(|| format!("command data in {path}"))?,
            };
            let id = id.unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
            let mut manager = Manager::connect(&config).await?;
            manager.watch_host(&host).await?;
            manager.send(&host, &kind, &id, &data).await?;
            let result = manager.wait_ack(&id, Duration::from_secs(timeout)).await;
            manager.close().await;
            match result {
                Ok(ack) => {
                    println!("{}", serde_json::to_string_pretty(&ack)?);
                    Ok(send_exit_code(ack.status))
                }
                Err(e @ crate::manager::ManagerError::Timeout { .. }) => {
                    eprintln!("rampart send: {e}");
                    Ok(EXIT_TIMEOUT)
                }
                Err(e) => Err(e.into()),
            }
        }
    }
}
