//! Command-line interface: the subcommands and what each one runs.

use std::io::Read;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};

use crate::config::{Config, DEFAULT_CONFIG_PATH, LogFormat};
use crate::logs::{VERSION, init_logging};
use crate::manager::Manager;
use crate::protocol::Status;

/// The command line, as parsed.
#[derive(Debug, Parser)]
#[command(name = "rampart", version = VERSION, about = "Host agent for firewall rules, certificates and logical routers pushed over a mutual-TLS AMQP bus")]
pub struct Cli {
    /// Configuration file.
    #[arg(long, global = true, default_value = DEFAULT_CONFIG_PATH, env = "RAMPART_CONFIG")]
    pub config: PathBuf,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// `rampart rules ...`: work on rule sets without the daemon.
#[derive(Debug, Subcommand)]
pub enum RulesAction {
    /// Validate a rule set (the `data` of firewall.apply, as JSON) and print the nft input it
    /// renders to. Touches nothing; needs neither root nor the daemon.
    Check {
        /// The rule set file, or - for standard input.
        file: String,
    },
}

/// `rampart connection ...`.
#[derive(Debug, Subcommand)]
pub enum ConnectionAction {
    /// Every TCP connection and listener of the host, with the owning process; the agent's
    /// broker session is marked (like `esxcli network ip connection list`).
    List {
        /// Only rows whose local or foreign port is this.
        #[arg(long)]
        port: Option<u16>,
        /// Only rows in this TCP state (LISTEN, ESTABLISHED, ...; any case).
        #[arg(long)]
        state: Option<String>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// The daemon's control socket, to mark the broker session (default: control.socket
        /// of the configuration).
        #[arg(long)]
        socket: Option<PathBuf>,
    },
}

/// `rampart <command>`.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// The running daemon: session, firewall, commands. Exit 1 when the daemon does not
    /// answer, 2 when it is not connected to a broker.
    Status {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
        /// The daemon's control socket (default: control.socket of the configuration).
        #[arg(long)]
        socket: Option<PathBuf>,
    },
    /// TCP connections of the host.
    Connection {
        /// What to show.
        #[command(subcommand)]
        action: ConnectionAction,
    },
    /// The applied rule set with live per-rule counters (from the running daemon).
    Rules {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// The daemon's control socket (default: control.socket of the configuration).
        #[arg(long)]
        socket: Option<PathBuf>,
        /// Without one: show the applied rule set.
        #[command(subcommand)]
        action: Option<RulesAction>,
    },
    /// Logical routers: each with its interfaces (inner and host names, addresses, state),
    /// routes, and whether the kernel matches the record (from the running daemon).
    Routers {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// The daemon's control socket (default: control.socket of the configuration).
        #[arg(long)]
        socket: Option<PathBuf>,
    },
    /// The agent's own TLS identity in use: subject, issuer, serial, names, validity,
    /// fingerprint, files and when it was installed (read from the files; no daemon needed).
    Cert {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Live: which rule of the agent's table decided each packet from ADDR (verdict, rule
    /// id, generation), from nftables tracing. Root, in the agent's network namespace.
    Trace {
        /// Source address of the packets to trace.
        #[arg(long)]
        from: std::net::IpAddr,
        /// Destination address.
        #[arg(long)]
        to: Option<std::net::IpAddr>,
        /// Destination port (TCP or UDP).
        #[arg(long)]
        port: Option<u16>,
        /// How long: 30s, 2m, 500ms.
        #[arg(long = "for", default_value = "30s", value_parser = crate::trace::parse_duration)]
        duration: std::time::Duration,
        /// One JSON object per line instead of text.
        #[arg(long)]
        json: bool,
        /// The daemon's control socket (for the table name and the generation).
        #[arg(long)]
        socket: Option<PathBuf>,
    },
    /// Run the agent in the foreground (as systemd does).
    Run,
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    #[command(hide = true)]
    Completions {
        /// The shell to complete for.
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff).
    #[command(hide = true)]
    Man,
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

/// The exit code of `rampart send` when no ack came in time.
pub const EXIT_TIMEOUT: i32 = 5;

/// Runs one parsed command line; returns the process exit code.
pub async fn main(cli: Cli) -> anyhow::Result<i32> {
    match cli.command {
        Command::CheckConfig => {
            Config::load(&cli.config)?;
            println!("{}: ok", cli.config.display());
            Ok(0)
        }
        Command::Rules {
            json,
            socket,
            action: Some(RulesAction::Check { file }),
        } => {
            let _ = (json, socket);
            rules_check(&cli.config, &file).await
        }
        Command::Rules {
            json,
            socket,
            action: None,
        } => {
            let answer = ask_daemon(&cli.config, socket, &crate::control::Request::Rules).await?;
            show_as(&answer, json, print_rules)
        }
        Command::Cert { json } => {
            let config = Config::load(&cli.config)?;
            show(&cert_description(&config)?, json, print_cert)
        }
        Command::Routers { json, socket } => {
            let answer = ask_daemon(&cli.config, socket, &crate::control::Request::Routers).await?;
            show_as(&answer, json, print_routers)
        }
        Command::Status { json, socket } => status(&cli.config, json, socket).await,
        Command::Connection {
            action:
                ConnectionAction::List {
                    port,
                    state,
                    json,
                    socket,
                },
        } => connection(&cli.config, port, state.as_deref(), json, socket).await,
        Command::Completions { shell } => {
            use clap::CommandFactory;
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "rampart",
                &mut std::io::stdout(),
            );
            Ok(0)
        }
        Command::Man => {
            use clap::CommandFactory;
            clap_mangen::Man::new(Cli::command()).render(&mut std::io::stdout())?;
            Ok(0)
        }
        Command::Trace {
            from,
            to,
            port,
            duration,
            json,
            socket,
        } => {
            let filter = crate::trace::Filter { from, to, port };
            trace(&cli.config, socket, &filter, duration, json).await
        }
        Command::Run => run(cli.config).await,
        Command::Send {
            host,
            kind,
            data,
            id,
            timeout,
        } => send(&cli.config, &host, &kind, data.as_deref(), id, timeout).await,
    }
}

/// `rampart run`: the daemon, until a signal stops it.
async fn run(config_path: PathBuf) -> anyhow::Result<i32> {
    let config = Config::load(&config_path)?;
    init_logging(&config.log.level, config.log.format);
    tracing::info!(version = VERSION, config = %config_path.display(), "rampart starting");
    crate::daemon::run(config, config_path).await?;
    Ok(0)
}

/// `rampart connection list`: the host's TCP connections, the broker session marked when
/// the daemon answers (without it the rows are still listed).
async fn connection(
    config: &std::path::Path,
    port: Option<u16>,
    state: Option<&str>,
    json: bool,
    socket: Option<PathBuf>,
) -> anyhow::Result<i32> {
    let status = ask_daemon_if_there(
        config,
        socket,
        &crate::control::Request::Status,
        "rampart connection list: could not ask the daemon",
        "the broker session is not marked",
    )
    .await;
    let status = match status.as_ref().map(read_status).transpose() {
        Ok(status) => status,
        Err(e) => {
            eprintln!("rampart connection list: {e:#}; the broker session is not marked");
            None
        }
    };
    connection_list(port, state, json, status.as_ref())?;
    Ok(0)
}

/// The daemon's answer for a command that also works without it: when it does not
/// answer, says so (`what failed (error); what follows`) and goes on.
async fn ask_daemon_if_there(
    config: &std::path::Path,
    socket: Option<PathBuf>,
    request: &crate::control::Request,
    failed: &str,
    follows: &str,
) -> Option<serde_json::Value> {
    ask_daemon(config, socket, request)
        .await
        .inspect_err(|e| eprintln!("{failed} ({e}); {follows}"))
        .ok()
}

/// `rampart status`: exit 0 when the session is up, 2 when it is not, 1 without a daemon.
async fn status(
    config: &std::path::Path,
    json: bool,
    socket: Option<PathBuf>,
) -> anyhow::Result<i32> {
    let answer = match ask_daemon(config, socket, &crate::control::Request::Status).await {
        Ok(a) => a,
        Err(e) => {
            eprintln!("rampart status: the daemon does not answer: {e}");
            return Ok(1);
        }
    };
    let connected = if json {
        // What the daemon said, as it said it (a newer daemon may say more).
        println!("{}", serde_json::to_string_pretty(&answer)?);
        answer["session"]["state"] == crate::session::SessionState::Connected.as_str()
    } else {
        let status = read_status(&answer)?;
        print_status(&status);
        status.session.state == crate::session::SessionState::Connected
    };
    Ok(if connected { 0 } else { 2 })
}

/// The daemon's status answer as its type.
fn read_status(answer: &serde_json::Value) -> anyhow::Result<crate::control::Status> {
    read_answer(answer)
}

/// A daemon's answer as the type this rampart reads it into.
fn read_answer<T: serde::de::DeserializeOwned>(answer: &serde_json::Value) -> anyhow::Result<T> {
    serde_json::from_value(answer.clone())
        .context("the daemon's answer is not what this rampart reads (another version?)")
}

/// Prints a daemon's answer as it said it (`--json`: a newer daemon may say more), or
/// read as its type through its text printer.
fn show_as<T: serde::de::DeserializeOwned>(
    answer: &serde_json::Value,
    json: bool,
    text: fn(&T),
) -> anyhow::Result<i32> {
    if json {
        println!("{}", serde_json::to_string_pretty(answer)?);
    } else {
        text(&read_answer(answer)?);
    }
    Ok(0)
}

/// `rampart trace`: the daemon names the rules' generation when it answers.
async fn trace(
    config: &std::path::Path,
    socket: Option<PathBuf>,
    filter: &crate::trace::Filter,
    duration: Duration,
    json: bool,
) -> anyhow::Result<i32> {
    let rules = ask_daemon_if_there(
        config,
        socket,
        &crate::control::Request::Rules,
        "rampart trace: the daemon does not answer",
        "tracing table inet rampart without generations",
    )
    .await;
    let nft = match Config::load(config) {
        Ok(c) => crate::sys::nft::Nft::new(&c.firewall.nft),
        Err(_) => crate::sys::nft::Nft::new(std::path::Path::new("/usr/sbin/nft")),
    };
    crate::trace::run(&nft, filter, duration, json, rules).await
}

/// `rampart send`: one command, its ack printed; the exit code says its status.
async fn send(
    config_path: &std::path::Path,
    host: &str,
    kind: &str,
    data: Option<&str>,
    id: Option<String>,
    timeout: u64,
) -> anyhow::Result<i32> {
    let config = Config::load(config_path)?;
    init_logging("warn", LogFormat::Text);
    let data: serde_json::Value = match data {
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
    manager.watch_host(host).await?;
    manager.send(host, kind, &id, &data).await?;
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

/// `rampart rules check FILE`: decode with the configured limits, render with the configured
/// table and failsafe (defaults when there is no configuration), print.
async fn rules_check(config_path: &std::path::Path, file: &str) -> anyhow::Result<i32> {
    let text = if file == "-" {
        let mut s = String::new();
        std::io::stdin().read_to_string(&mut s)?;
        s
    } else {
        std::fs::read_to_string(file).with_context(|| format!("reading {file}"))?
    };
    let fw = match Config::load(config_path) {
        Ok(c) => c.firewall,
        Err(e) => {
            eprintln!("note: {e}; using the default firewall settings");
            crate::config::FirewallConfig::default()
        }
    };
    let limits = crate::firewall::spec::Limits {
        max_rules: fw.max_rules,
        max_elements: fw.max_elements,
        max_rule_expansion: fw.max_rule_expansion,
    };
    let data: serde_json::Value = match serde_json::from_str(&text) {
        Ok(v) => v,
        Err(e) => {
            eprintln!("invalid_json: {e}");
            return Ok(2);
        }
    };
    match crate::protocol::check_rule_set(&data, &limits) {
        Err(e) => {
            eprintln!(
                "{}: {} (at {})",
                serde_json::to_value(e.code)?.as_str().unwrap_or("invalid"),
                e.message,
                e.field.as_deref().unwrap_or("-")
            );
            Ok(2)
        }
        Ok(rs) => {
            let ctx = crate::firewall::render::RenderCtx {
                table: fw.table.clone(),
                brokers: vec![],
                resolvers: vec![],
                failsafe_in: fw
                    .failsafe_in
                    .iter()
                    .filter_map(|s| crate::config::parse_failsafe(s))
                    .collect(),
                failsafe_out: fw
                    .failsafe_out
                    .iter()
                    .filter_map(|s| crate::config::parse_failsafe(s))
                    .collect(),
            };
            let layout = crate::firewall::layout::Layout::build(rs.rules.values());
            print!(
                "{}",
                crate::firewall::render::render_full(&rs, &layout, &ctx)
            );
            eprintln!(
                "ok: generation {}, {} rules, {} sets, {} elements (broker failsafe rules are added by the daemon)",
                rs.generation,
                rs.rules.len(),
                rs.sets.len(),
                rs.element_count()
            );
            Ok(0)
        }
    }
}

/// Free text for a terminal: control characters shown as `?`.
fn printable(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

fn list(items: &[String]) -> String {
    if items.is_empty() {
        "-".to_string()
    } else {
        items.join(",")
    }
}

/// The identity the agent uses (or would use at start), as `rampart cert` shows it.
fn cert_description(config: &Config) -> anyhow::Result<serde_json::Value> {
    use std::os::unix::fs::PermissionsExt;
    let files = crate::certs::store::in_use(&config.state_dir, &config.broker);
    let chain = crate::certs::tls::load_certs(&files.cert)?;
    let info = crate::certs::tls::cert_info(&chain[0]).map_err(anyhow::Error::msg)?;
    let key_mode = std::fs::metadata(&files.key)
        .map(|m| format!("{:04o}", m.permissions().mode() & 0o7777))
        .unwrap_or_else(|e| format!("unreadable: {e}"));
    let days_left = crate::certs::days_left(&info, crate::ids::now_ms() as i64 / 1000);
    Ok(serde_json::json!({
        "subject": info.subject,
        "issuer": info.issuer,
        "serial": info.serial,
        "sans": info.sans,
        "not_before": info.not_before,
        "not_after": info.not_after,
        "days_left": days_left,
        "warn_days": config.broker.cert_warn_days,
        "sha256": info.sha256,
        "chain_length": chain.len(),
        "files": {"cert": files.cert, "key": files.key, "key_mode": key_mode, "ca": files.ca},
        "source": files.source,
        "installed": files.installed,
    }))
}

fn print_cert(v: &serde_json::Value) {
    let text = |v: &serde_json::Value| {
        v.as_str()
            .map(str::to_string)
            .unwrap_or_else(|| v.to_string())
    };
    let sans: Vec<String> = v["sans"]
        .as_array()
        .into_iter()
        .flatten()
        .map(text)
        .collect();
    println!("subject:     {}", text(&v["subject"]));
    println!("issuer:      {}", text(&v["issuer"]));
    println!("serial:      {}", text(&v["serial"]));
    println!(
        "names:       {}",
        if sans.is_empty() {
            "-".into()
        } else {
            sans.join(", ")
        }
    );
    println!("not before:  {}", text(&v["not_before"]));
    let soon = v["days_left"].as_i64().unwrap_or(0) < v["warn_days"].as_i64().unwrap_or(0);
    println!(
        "not after:   {} ({} days left{})",
        text(&v["not_after"]),
        v["days_left"],
        if soon { ", EXPIRES SOON" } else { "" }
    );
    println!("sha256:      {}", text(&v["sha256"]));
    println!("certificate: {}", text(&v["files"]["cert"]));
    println!(
        "key:         {} (mode {})",
        text(&v["files"]["key"]),
        text(&v["files"]["key_mode"])
    );
    println!("ca:          {}", text(&v["files"]["ca"]));
    match v["installed"].as_object() {
        Some(i) => {
            let at = when(&i["installed_ms"]);
            println!(
                "installed:   {at} by cert.install {}",
                text(&i["command_id"])
            );
        }
        None => println!(
            "installed:   from the configuration ({})",
            text(&v["source"])
        ),
    }
}

/// Prints an answer as pretty JSON or through its text printer.
fn show(v: &serde_json::Value, json: bool, text: fn(&serde_json::Value)) -> anyhow::Result<i32> {
    if json {
        println!("{}", serde_json::to_string_pretty(v)?);
    } else {
        text(v);
    }
    Ok(0)
}

fn print_routers(a: &crate::control::RoutersAnswer) {
    if a.routers.is_empty() {
        println!("no routers");
        return;
    }
    let header = [
        "ROUTER",
        "NAMESPACE",
        "INTERFACE",
        "HOST END",
        "BRIDGE",
        "MTU",
        "STATE",
        "ADDRESSES",
    ];
    let mut rows: Vec<Vec<String>> = vec![header.iter().map(|s| s.to_string()).collect()];
    for r in &a.routers {
        for (n, i) in r.interfaces.iter().enumerate() {
            let first = |s: &str| if n == 0 { s.to_string() } else { String::new() };
            rows.push(vec![
                first(&r.id),
                first(&r.namespace),
                i.name.clone(),
                i.host.clone(),
                i.bridge.clone().unwrap_or_else(|| "-".into()),
                i.mtu.to_string(),
                i.state.as_str().to_string(),
                i.addresses.join(","),
            ]);
        }
        if r.interfaces.is_empty() {
            let mut row = vec![r.id.clone(), r.namespace.clone()];
            row.resize(header.len(), "-".into());
            rows.push(row);
        }
    }
    print_table(&rows);
    for r in &a.routers {
        print_router_state(r);
    }
}

/// A router's routes, and whether the kernel matches its record.
fn print_router_state(r: &crate::router::View) {
    let id = &r.id;
    for route in &r.routes {
        println!("{id}: route {} via {}", route.destination, route.via);
    }
    if r.in_sync {
        println!("{id}: kernel matches the record");
        return;
    }
    println!(
        "{id}: DRIFT: kernel differs from the record (needs: {}){}",
        r.pending.join("; "),
        r.error
            .as_deref()
            .map(|e| format!(" error: {e}"))
            .unwrap_or_default()
    );
}

fn print_rules(a: &crate::control::RulesAnswer) {
    let applied = match a.applied_at_ms {
        Some(ms) => when_ms(Some(ms)),
        None => "at start (restored)".to_string(),
    };
    println!(
        "table inet {}  generation {}  applied {}  {}",
        a.table,
        a.generation,
        applied,
        if a.in_kernel {
            "(in kernel)"
        } else {
            "(NOT in kernel)"
        }
    );
    println!(
        "defaults: in={} out={} forward={}",
        a.defaults.input, a.defaults.out, a.defaults.forward
    );
    let header = [
        "PRIO",
        "ID",
        "ACTION",
        "DIR",
        "PROTO",
        "SOURCES",
        "DESTINATIONS",
        "PORTS",
        "APPLIED_TO",
        "PACKETS",
        "BYTES",
        "COMMENT",
    ];
    let mut rows: Vec<Vec<String>> = vec![header.iter().map(|s| s.to_string()).collect()];
    for shown in &a.rules {
        let r = &shown.rule;
        let mut id = r.id.clone();
        if r.disabled {
            id.push_str(" (disabled)");
        }
        rows.push(vec![
            r.priority.to_string(),
            id,
            r.action.clone(),
            r.direction.clone(),
            r.protocol.clone(),
            list(&r.sources),
            list(&r.destinations),
            list(&r.ports),
            list(&r.applied_to),
            shown.packets.to_string(),
            shown.bytes.to_string(),
            printable(&r.comment),
        ]);
    }
    print_table(&rows);
}

/// Left-aligned columns, two spaces apart.
pub fn print_table(rows: &[Vec<String>]) {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..cols)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(|s| s.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    for r in rows {
        let mut line = String::new();
        for (c, cell) in r.iter().enumerate() {
            if c + 1 == r.len() {
                line.push_str(cell);
            } else {
                line.push_str(&format!("{cell:<w$}  ", w = widths[c]));
            }
        }
        println!("{}", line.trim_end());
    }
}

/// Asks the daemon: at `--socket` if given, else at the configuration's `control.socket`
/// and then at the default socket, so that an inspection works even where the
/// configuration file is elsewhere or unreadable (an operator's shell, a support script).
async fn ask_daemon(
    config: &std::path::Path,
    socket: Option<PathBuf>,
    request: &crate::control::Request,
) -> anyhow::Result<serde_json::Value> {
    let candidates = match socket {
        Some(s) => vec![s],
        None => {
            let mut c = vec![];
            if let Ok(cfg) = Config::load(config) {
                c.push(cfg.control.socket);
            }
            let default = PathBuf::from(crate::config::DEFAULT_SOCKET);
            if !c.contains(&default) {
                c.push(default);
            }
            c
        }
    };
    let mut errors = vec![];
    for path in candidates {
        match crate::control::ask(&path, request).await {
            Ok(answer) => return Ok(answer),
            Err(e) => errors.push(e.to_string()),
        }
    }
    anyhow::bail!("{}", errors.join("; "))
}

/// `{"applied": 3, "rejected": 1}` -> `3 applied, 1 rejected`.
fn counts_in_words(counts: &std::collections::BTreeMap<String, u64>) -> String {
    let words: Vec<String> = counts.iter().map(|(k, n)| format!("{n} {k}")).collect();
    if words.is_empty() {
        "none yet".to_string()
    } else {
        words.join(", ")
    }
}

fn when(ms: &serde_json::Value) -> String {
    when_ms(ms.as_u64())
}

/// A time in ms since the epoch as RFC 3339 (`-` when there is none).
fn when_ms(ms: Option<u64>) -> String {
    ms.and_then(|ms| i64::try_from(ms / 1000).ok())
        .and_then(|secs| time::OffsetDateTime::from_unix_timestamp(secs).ok())
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| "-".to_string())
}

fn print_status(a: &crate::control::Status) {
    let s = &a.session;
    let text = |v: &Option<String>| v.as_deref().unwrap_or("-").to_string();
    println!(
        "host:        {} (rampart {}, pid {}, up {} s)",
        a.host, a.version, a.pid, a.uptime_secs
    );
    println!("broker:      {} {}", s.state.as_str(), text(&s.url));
    println!(
        "tls:         {} {}, broker certificate {} (until {})",
        text(&s.tls_version),
        text(&s.cipher),
        text(&s.broker_certificate),
        text(&s.broker_certificate_not_after)
    );
    println!(
        "session:     since {}, last heartbeat {}, reconnects {}",
        when_ms(s.connected_since_ms),
        when_ms(s.last_heartbeat_ms),
        s.reconnects
    );
    println!("last error:  {}", text(&s.last_error));
    if !s.broker_missing.is_empty() {
        println!(
            "MISSING:     {} on the broker (serving without them)",
            s.broker_missing.join(", ")
        );
    }
    if let Some(since) = s.blocked_since_ms {
        println!(
            "BLOCKED:     the broker blocks our publishes since {} (resource alarm on the broker)",
            when_ms(Some(since))
        );
    }
    let f = &a.firewall;
    println!(
        "firewall:    generation {}, {} rules, {} sets, {} elements",
        f.generation, f.rules, f.address_sets, f.elements
    );
    let degraded = a
        .routers
        .iter()
        .filter(|r| r.state != crate::router::RouterState::Applied)
        .count();
    println!(
        "routers:     {}{}",
        a.routers.len(),
        if degraded > 0 {
            format!(" ({degraded} DEGRADED: see rampart routers)")
        } else {
            String::new()
        }
    );
    let c = &a.certificate;
    println!(
        "certificate: {} (until {}, {} days left)",
        c.subject, c.not_after, c.days_left
    );
    println!(
        "commands:    {} (dedup store: {} ids)",
        counts_in_words(&a.commands),
        a.dedup_records.map_or("-".to_string(), |n| n.to_string())
    );
    if !a.pending_restart.is_empty() {
        println!("restart to apply: {}", a.pending_restart.join(", "));
    }
    if let Some(lost) = &a.state_lost {
        let text = |v: &serde_json::Value| v.as_str().unwrap_or("-").to_string();
        println!(
            "STATE LOST:  at {}, firewall {} until the manager sends a full rule set ({})",
            when(&lost["at"]),
            text(&lost["firewall"]),
            text(&lost["error"])
        );
    }
}

fn connection_list(
    port: Option<u16>,
    state: Option<&str>,
    json: bool,
    status: Option<&crate::control::Status>,
) -> anyhow::Result<()> {
    let mut rows = crate::netstat::list();
    rows.retain(|c| port.is_none_or(|p| c.local.port() == p || c.foreign.port() == p));
    if let Some(st) = state {
        rows.retain(|c| c.state.eq_ignore_ascii_case(st));
    }
    // The agent's own broker session: its pid, established, to the broker's port.
    let session = status.and_then(|s| {
        (s.session.state == crate::session::SessionState::Connected).then_some((
            s.pid,
            s.session.broker_port,
            &s.session,
        ))
    });
    let is_broker = |c: &crate::netstat::Connection| match session {
        Some((pid, Some(bport), _)) => {
            c.pid == Some(pid) && c.state == "ESTABLISHED" && c.foreign.port() == bport
        }
        _ => false,
    };
    if json {
        let out: Vec<serde_json::Value> = rows
            .iter()
            .map(|c| {
                let mut v = serde_json::to_value(c).expect("row serialises");
                if is_broker(c)
                    && let Some((_, _, sess)) = session
                {
                    v["rampart_broker_session"] =
                        serde_json::to_value(sess).expect("a session serialises");
                }
                v
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    let mut table = vec![
        [
            "Proto",
            "Recv-Q",
            "Send-Q",
            "Local Address",
            "Foreign Address",
            "State",
            "PID/Program",
            "Info",
        ]
        .map(String::from)
        .to_vec(),
    ];
    for c in &rows {
        let owner = match (&c.pid, &c.program) {
            (Some(pid), Some(p)) => format!("{pid}/{p}"),
            _ => "-".to_string(),
        };
        let info = match session {
            Some((_, _, sess)) if is_broker(c) => format!(
                "rampart broker session {} {} {}, broker cert {} until {}, since {}, last heartbeat {}",
                sess.url.as_deref().unwrap_or("-"),
                sess.tls_version.as_deref().unwrap_or("-"),
                sess.cipher.as_deref().unwrap_or("-"),
                sess.broker_certificate.as_deref().unwrap_or("-"),
                sess.broker_certificate_not_after.as_deref().unwrap_or("-"),
                when_ms(sess.connected_since_ms),
                when_ms(sess.last_heartbeat_ms),
            ),
            _ => String::new(),
        };
        table.push(vec![
            c.proto.to_string(),
            c.recv_q.to_string(),
            c.send_q.to_string(),
            c.local.to_string(),
            c.foreign.to_string(),
            c.state.to_string(),
            owner,
            info,
        ]);
    }
    print_table(&table);
    Ok(())
}
