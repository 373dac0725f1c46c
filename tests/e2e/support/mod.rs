//! Shared test environment: one broker for the whole run, hosts and agents made per test.

pub mod acklog;
pub mod broker;
pub mod netns;
pub mod pki;
pub mod site;
/// Used by the benchmarks (benches/), which include this support module.
#[allow(dead_code)]
pub mod timing;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use broker::Broker;
use pki::{Ca, Role};
use rampart::config::Config;
use rampart::manager::Manager;

pub struct Env {
    pub root: PathBuf,
    pub ca: Ca,
    /// Also trusted by the broker (for rotations onto a new CA).
    pub ca2: Ca,
    pub broker: Broker,
    pub manager_config: PathBuf,
    pub intruder_config: PathBuf,
}

static ENV: OnceLock<Env> = OnceLock::new();

pub fn env() -> &'static Env {
    ENV.get().expect("the test environment is set up in main")
}

/// Starts the shared broker; `main` calls this once before any test runs.
pub fn init(root: &Path) {
    // The broker runs as the rabbitmq user and must reach its files below the root.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o755)).unwrap();
    let ca = Ca::new("rampart-test-ca");
    // A second CA the broker trusts too: certificate rotation moves hosts onto it.
    let ca2 = Ca::new("rampart-test-ca-2");
    let broker = Broker::start_trusting(&root.join("broker"), &ca, &[&ca2], "test");
    let manager_config = write_client(root, &ca, &broker, "manager", "manager", "");
    let intruder_config = write_client(root, &ca, &broker, "intruder", "intruder", "");
    // The operator's set-up step: the manager declares the shared topology.
    declare_topology(&manager_config);
    let _ = ENV.set(Env {
        root: root.to_path_buf(),
        ca,
        ca2,
        broker,
        manager_config,
        intruder_config,
    });
}

pub fn teardown() {
    if let Some(env) = ENV.get() {
        env.broker.shutdown();
    }
}

/// Connects once as the manager given by `config`, which declares the shared topology.
pub fn declare_topology(config: &Path) {
    let config = Config::load(config).unwrap();
    runtime().block_on(async {
        Manager::connect(&config)
            .await
            .expect("manager connects")
            .close()
            .await
    });
}

/// Writes cert, key, CA and a config for client `cn` in `root/name`; returns the config path.
fn write_client(
    root: &Path,
    ca: &Ca,
    broker: &Broker,
    name: &str,
    cn: &str,
    extra: &str,
) -> PathBuf {
    let dir = root.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    let issued = ca.issue(cn, &[cn], Role::Client);
    std::fs::write(dir.join("cert.pem"), &issued.cert_pem).unwrap();
    std::fs::write(dir.join("key.pem"), &issued.key_pem).unwrap();
    std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
    let config = format!(
        "state_dir = \"{d}/state\"\n{extra}\n\
         [broker]\n\
         urls = [\"{url}\"]\n\
         ca_file = \"{d}/ca.pem\"\n\
         cert_file = \"{d}/cert.pem\"\n\
         key_file = \"{d}/key.pem\"\n\
         backoff_initial_ms = 100\n\
         backoff_max_ms = 2000\n",
        d = dir.display(),
        url = broker.url()
    );
    let path = dir.join("rampart.toml");
    std::fs::write(&path, config).unwrap();
    path
}

/// Settings a test may change in a host's configuration.
#[derive(Clone, Default)]
pub struct HostOptions {
    pub heartbeat_secs: Option<u16>,
    pub ca_file: Option<PathBuf>,
    pub server_name: Option<String>,
    pub urls: Option<Vec<String>>,
    pub signing_keys: Vec<PathBuf>,
    pub max_body_bytes: Option<usize>,
    /// More lines for the `[commands]` section.
    pub commands: String,
    /// Lines for the `[firewall]` section.
    pub firewall: String,
    /// Whole sections, appended last (`"[events]\noutbox_max_events = 3"`).
    pub extra: String,
}

pub struct Host {
    pub id: String,
    pub dir: PathBuf,
    pub config: PathBuf,
}

impl Env {
    /// A fresh host: certificate, broker user with least privilege, state dir, config.
    pub fn host(&self, id: &str, opts: HostOptions) -> Host {
        self.broker.add_host_user(id);
        self.host_on(&self.broker, id, opts)
    }

    /// Same, against another broker than the shared one.
    pub fn host_on(&self, broker: &Broker, id: &str, opts: HostOptions) -> Host {
        let dir = self.root.join("hosts").join(id);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let issued = self.ca.issue(id, &[id], Role::Client);
        std::fs::write(dir.join("cert.pem"), &issued.cert_pem).unwrap();
        std::fs::write(dir.join("key.pem"), &issued.key_pem).unwrap();
        std::fs::write(dir.join("ca.pem"), self.ca.pem()).unwrap();
        let d = dir.display();
        let urls = opts.urls.unwrap_or_else(|| vec![broker.url()]);
        let mut text = format!("state_dir = \"{d}/state\"\n\n[broker]\n");
        text += &format!("urls = {}\n", toml_list(&urls));
        let ca = opts
            .ca_file
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| format!("{d}/ca.pem"));
        text += &format!(
            "ca_file = \"{ca}\"\ncert_file = \"{d}/cert.pem\"\nkey_file = \"{d}/key.pem\"\n"
        );
        text += &format!("heartbeat_secs = {}\n", opts.heartbeat_secs.unwrap_or(30));
        text += "backoff_initial_ms = 100\nbackoff_max_ms = 2000\n";
        if let Some(name) = opts.server_name {
            text += &format!("server_name = \"{name}\"\n");
        }
        text += "\n[commands]\n";
        if let Some(max) = opts.max_body_bytes {
            text += &format!("max_body_bytes = {max}\n");
        }
        let keys: Vec<String> = opts
            .signing_keys
            .iter()
            .map(|p| p.display().to_string())
            .collect();
        text += &format!("signing_keys = {}\n{}\n", toml_list(&keys), opts.commands);
        text += &format!("\n[control]\nsocket = \"{d}/rampart.sock\"\n");
        text += &format!("\n[firewall]\n{}\n{}\n", opts.firewall, opts.extra);
        let config = dir.join("rampart.toml");
        std::fs::write(&config, text).unwrap();
        Host {
            id: id.to_string(),
            dir,
            config,
        }
    }

    pub async fn manager(&self) -> Manager {
        let config = Config::load(&self.manager_config).unwrap();
        Manager::connect(&config).await.expect("manager connects")
    }

    pub async fn intruder(&self) -> Manager {
        let config = Config::load(&self.intruder_config).unwrap();
        Manager::connect(&config).await.expect("intruder connects")
    }
}

fn toml_list(items: &[String]) -> String {
    let quoted: Vec<String> = items.iter().map(|s| format!("\"{s}\"")).collect();
    format!("[{}]", quoted.join(", "))
}

/// A running `rampart run` process with its log captured to a file.
pub struct AgentProc {
    child: Child,
    pub log: PathBuf,
}

impl AgentProc {
    pub fn start(host: &Host) -> AgentProc {
        AgentProc::start_with_env(host, &[])
    }

    pub fn start_with_env(host: &Host, envs: &[(&str, &str)]) -> AgentProc {
        AgentProc::start_in(host, None, envs)
    }

    /// Starts the agent inside network namespace `ns` (through `nsenter`, which execs, and
    /// unlike `ip netns exec` keeps the mount namespace, as a systemd host's agent has it).
    pub fn start_in(host: &Host, ns: Option<&str>, envs: &[(&str, &str)]) -> AgentProc {
        match ns {
            Some(ns) => {
                let net = format!("--net=/run/netns/{ns}");
                AgentProc::start_via(host, &["nsenter", &net], envs)
            }
            None => AgentProc::start_via(host, &[], envs),
        }
    }

    /// Starts the agent behind a launcher (`nsenter ...`, `ip netns exec NS`, which also
    /// bind-mounts /etc/netns/NS/resolv.conf over /etc/resolv.conf).
    pub fn start_via(host: &Host, launcher: &[&str], envs: &[(&str, &str)]) -> AgentProc {
        let log = host.dir.join("agent.log");
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        writeln!(f, "===== agent start =====").unwrap();
        let mut cmd = match launcher.split_first() {
            Some((program, args)) => {
                let mut c = Command::new(program);
                c.args(args).arg(env!("CARGO_BIN_EXE_rampart"));
                c
            }
            None => Command::new(env!("CARGO_BIN_EXE_rampart")),
        };
        cmd.arg("--config")
            .arg(&host.config)
            .arg("run")
            .env(
                "RAMPART_LOG",
                std::env::var("RAMPART_TEST_LOG").unwrap_or_else(|_| "info,lapin=off".into()),
            )
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(f.try_clone().unwrap())
            .stderr(f);
        for (k, v) in envs {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("starting rampart");
        AgentProc { child, log }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The part of the log written since the agent's last start.
    pub fn current_log(&self) -> String {
        let text = self.log_text();
        match text.rfind("===== agent start =====") {
            Some(i) => text[i..].to_string(),
            None => text,
        }
    }

    /// Waits until the current log contains `needle` at least `count` times.
    pub fn wait_log(&self, needle: &str, count: usize, timeout: Duration) -> bool {
        wait_until(timeout, || {
            self.current_log().matches(needle).count() >= count
        })
    }

    /// Waits until the agent consumes its queue; panics with the log if it does not.
    pub fn wait_serving(&self) {
        if !self.wait_log("serving commands", 1, Duration::from_secs(30)) {
            panic!("agent never started serving:\n{}", self.current_log());
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid()), sig);
    }

    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for AgentProc {
    fn drop(&mut self) {
        self.kill9();
    }
}

pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// Runs the CLI with no configuration file (inspection commands take `--socket`).
pub fn rampart(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_rampart"))
        .args(["--config", "/nonexistent"])
        .args(args)
        .output()
        .expect("running rampart")
}

/// How long a test waits for an ack.
pub const ACK_WAIT: Duration = Duration::from_secs(20);

/// The shared manager, watching `host`'s acks.
pub async fn manager(host: &str) -> anyhow::Result<Manager> {
    let mut m = env().manager().await;
    m.watch_host(host).await?;
    Ok(m)
}

/// Sends one command and waits for its ack.
pub async fn send(
    m: &mut Manager,
    host: &str,
    kind: &str,
    id: &str,
    data: serde_json::Value,
) -> anyhow::Result<rampart::protocol::Ack> {
    m.send(host, kind, id, &data).await?;
    Ok(m.wait_ack(id, ACK_WAIT).await?)
}

/// Sends one command and insists that it is applied.
pub async fn applied(
    m: &mut Manager,
    host: &str,
    kind: &str,
    id: &str,
    data: serde_json::Value,
) -> anyhow::Result<rampart::protocol::Ack> {
    let ack = send(m, host, kind, id, data).await?;
    anyhow::ensure!(
        ack.status == rampart::protocol::Status::Applied,
        "{id}: {ack:?}"
    );
    Ok(ack)
}
