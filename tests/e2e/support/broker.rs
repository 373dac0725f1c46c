//! A real RabbitMQ node of the tests' own: TLS only, certificate (EXTERNAL) login, its own
//! node name, ports and directories, least-privilege users as docs/operations.md gives them.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use super::pki::{Ca, Role};

pub struct Broker {
    pub dir: PathBuf,
    pub node: String,
    pub port: u16,
    dist_port: u16,
    epmd_port: u16,
    child: std::sync::Mutex<Option<Child>>,
}

/// A port that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn write(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
}

impl Broker {
    /// Starts a node under `dir`, with a server certificate from `ca`.
    pub fn start(dir: &Path, ca: &Ca, tag: &str) -> Broker {
        Broker::start_trusting(dir, ca, &[], tag)
    }

    /// Same, and the node also accepts client certificates from the CAs in `also`.
    pub fn start_trusting(dir: &Path, ca: &Ca, also: &[&Ca], tag: &str) -> Broker {
        let broker = Broker::prepare(dir, ca, also, tag, free_port(), "127.0.0.1");
        broker.spawn();
        broker.setup_users();
        broker
    }

    /// A broker listening on `ip` (`0.0.0.0`: also on the addresses of veths to namespaces
    /// of agents), not only on the loopback.
    #[allow(dead_code)] // the fleet benchmark's
    pub fn start_listening(dir: &Path, ca: &Ca, tag: &str, ip: &str) -> Broker {
        let broker = Broker::prepare(dir, ca, &[], tag, free_port(), ip);
        broker.spawn();
        broker.setup_users();
        broker
    }

    /// A node's files and ports, not started; `epmd_port` is shared by the nodes of a
    /// cluster (they find each other through it).
    fn prepare(
        dir: &Path,
        ca: &Ca,
        also: &[&Ca],
        tag: &str,
        epmd_port: u16,
        listen: &str,
    ) -> Broker {
        std::fs::create_dir_all(dir).unwrap();
        let server = ca.issue("localhost", &["localhost", "127.0.0.1"], Role::Server);
        let bundle: String = std::iter::once(ca.pem())
            .chain(also.iter().map(|c| c.pem()))
            .collect();
        write(&dir.join("ca.pem"), &bundle);
        write(&dir.join("server.pem"), &server.cert_pem);
        write(&dir.join("server.key"), &server.key_pem);
        let port = free_port();
        let conf = format!(
            "listeners.tcp = none\n\
             listeners.ssl.default = {listen}:{port}\n\
             ssl_options.cacertfile = {d}/ca.pem\n\
             ssl_options.certfile = {d}/server.pem\n\
             ssl_options.keyfile = {d}/server.key\n\
             ssl_options.verify = verify_peer\n\
             ssl_options.fail_if_no_peer_cert = true\n\
             ssl_options.versions.1 = tlsv1.3\n\
             ssl_options.versions.2 = tlsv1.2\n\
             auth_mechanisms.1 = EXTERNAL\n\
             ssl_cert_login_from = common_name\n\
             loopback_users = none\n\
             log.console = false\n\
             log.file.level = info\n",
            d = dir.display()
        );
        write(&dir.join("rabbitmq.conf"), &conf);
        write(
            &dir.join("enabled_plugins"),
            "[rabbitmq_auth_mechanism_ssl].\n",
        );
        let status = Command::new("chown")
            .args(["-R", "rabbitmq:rabbitmq"])
            .arg(dir)
            .status()
            .unwrap();
        assert!(status.success(), "chown of the broker directory failed");
        Broker {
            dir: dir.to_path_buf(),
            node: format!("rampart-{tag}-{}@localhost", std::process::id()),
            port,
            dist_port: free_port(),
            epmd_port,
            child: std::sync::Mutex::new(None),
        }
    }

    /// The pid of the node's Erlang VM (its command line does not name the node).
    pub fn vm_pid(&self) -> Option<i32> {
        let out = self.ctl(&["eval", "os:getpid()."]);
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .trim_matches('"')
            .parse()
            .ok()
    }

    /// kill -9 of the node's VM, as a machine dying does to it.
    pub fn kill9(&self) {
        if let Some(pid) = self.vm_pid() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        if let Some(mut child) = self.child.lock().unwrap().take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the node again after [`Broker::kill9`]: it rejoins its cluster from its data.
    pub fn start_again(&self) {
        self.spawn();
    }

    fn envs(&self, cmd: &mut Command) {
        let d = &self.dir;
        cmd.env("RABBITMQ_NODENAME", &self.node)
            .env("RABBITMQ_CONFIG_FILE", d.join("rabbitmq.conf"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", d.join("enabled_plugins"))
            .env("RABBITMQ_MNESIA_BASE", d.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", d.join("log"))
            .env("RABBITMQ_PID_FILE", d.join("pid"))
            .env("RABBITMQ_DIST_PORT", self.dist_port.to_string())
            .env("ERL_EPMD_PORT", self.epmd_port.to_string());
    }

    fn spawn(&self) {
        // The server script as the rabbitmq user, directly: Debian's rabbitmq-server wrapper
        // goes through su, whose PAM limits put the open-file limit back to 1024, about
        // 250 TLS sessions with their quorum queues (the fleet benchmark ran out). This way
        // the node has the limit of the process that starts it.
        use std::os::unix::process::CommandExt;
        let user = nix::unistd::User::from_name("rabbitmq")
            .ok()
            .flatten()
            .expect("the rabbitmq user (is rabbitmq-server installed?)");
        let mut cmd = Command::new("/usr/lib/rabbitmq/bin/rabbitmq-server");
        cmd.uid(user.uid.as_raw())
            .gid(user.gid.as_raw())
            .current_dir(&user.dir)
            .env("HOME", &user.dir)
            .env("USER", "rabbitmq")
            .env("LOGNAME", "rabbitmq");
        self.envs(&mut cmd);
        let out = std::fs::File::create(self.dir.join("server.out")).unwrap();
        cmd.stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out);
        *self.child.lock().unwrap() = Some(
            cmd.spawn()
                .expect("starting rabbitmq-server (is it installed?)"),
        );
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            let o = self.ctl(&["await_startup", "--timeout", "30"]);
            if o.status.success() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "rabbitmq did not start: {}\n{}",
                String::from_utf8_lossy(&o.stderr),
                std::fs::read_to_string(self.dir.join("server.out")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    pub fn ctl(&self, args: &[&str]) -> Output {
        let mut cmd = Command::new("rabbitmqctl");
        self.envs(&mut cmd);
        cmd.arg("-q").arg("-n").arg(&self.node).args(args);
        cmd.output().expect("running rabbitmqctl")
    }

    /// Runs rabbitmqctl and panics with its stderr on failure.
    pub fn ctl_ok(&self, args: &[&str]) -> String {
        let o = self.ctl(args);
        assert!(
            o.status.success(),
            "rabbitmqctl {args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    fn add_user(&self, name: &str) {
        let o = self.ctl(&["add_user", name, &uuid::Uuid::new_v4().to_string()]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            o.status.success() || err.contains("already exists"),
            "add_user {name}: {err}"
        );
    }

    fn setup_users(&self) {
        let _ = self.ctl(&["delete_user", "guest"]);
        self.add_user("manager");
        // Exactly the manager permissions docs/operations.md gives.
        let all = r"^(rampart\..*|amq\.gen-.*)$";
        self.ctl_ok(&["set_permissions", "-p", "/", "manager", all, all, all]);
        // A broker user that exists and may publish commands, but is not a trusted sender.
        self.add_user("intruder");
        self.ctl_ok(&[
            "set_permissions",
            "-p",
            "/",
            "intruder",
            r"^amq\.gen-.*$",
            r"^(rampart\.commands|amq\.gen-.*)$",
            r"^amq\.gen-.*$",
        ]);
    }

    /// Creates host `id`'s user with the least privilege of PROTOCOL.md section 2.
    pub fn add_host_user(&self, id: &str) {
        self.add_user(id);
        let h = id.replace('.', r"\.");
        self.ctl_ok(&[
            "set_permissions",
            "-p",
            "/",
            id,
            &format!(r"^rampart\.host\.{h}$"),
            &format!(r"^(rampart\.host\.{h}|rampart\.acks|rampart\.events|rampart\.dead)$"),
            &format!(r"^(rampart\.host\.{h}|rampart\.commands)$"),
        ]);
        // Topic read on the commands exchange is checked at queue.bind: only its own key.
        self.ctl_ok(&[
            "set_topic_permissions",
            "-p",
            "/",
            id,
            "rampart.commands",
            "^$",
            &format!("^{h}$"),
        ]);
        self.ctl_ok(&[
            "set_topic_permissions",
            "-p",
            "/",
            id,
            "rampart.acks",
            &format!("^{h}$"),
            "^$",
        ]);
        self.ctl_ok(&[
            "set_topic_permissions",
            "-p",
            "/",
            id,
            "rampart.events",
            &format!(r"^[a-z_]+\.{h}$"),
            "^$",
        ]);
    }

    /// Stops the node (its data stays) and starts it again.
    pub fn restart(&self) {
        self.stop_node();
        self.spawn();
    }

    fn stop_node(&self) {
        let vm = self.vm_pid();
        let _ = self.ctl(&["stop"]);
        if let Some(mut child) = self.child.lock().unwrap().take() {
            let deadline = Instant::now() + Duration::from_secs(30);
            while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        // The wrapper can exit before the VM has left epmd: a start in between would find
        // its node name taken (duplicate_node_name). Wait for both.
        if let Some(pid) = vm {
            let deadline = Instant::now() + Duration::from_secs(30);
            while Path::new(&format!("/proc/{pid}")).exists() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        let short = self.node.split('@').next().unwrap_or_default().to_string();
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            let names = Command::new("epmd")
                .args(["-port", &self.epmd_port.to_string(), "-names"])
                .output();
            let listed = names.is_ok_and(|o| {
                String::from_utf8_lossy(&o.stdout).contains(&format!("name {short} at"))
            });
            if !listed {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Stops the node and its epmd, leaving nothing running.
    pub fn shutdown(&self) {
        self.stop_node();
        let _ = Command::new("epmd")
            .env("ERL_EPMD_PORT", self.epmd_port.to_string())
            .args(["-port", &self.epmd_port.to_string(), "-kill"])
            .output();
    }

    /// SHA-256 (upper-case hex) of the client certificate of each open connection of
    /// `user`, as the broker holds it (`list_connections` has no such column in 3.10): the
    /// reader's state (from `sys:get_state`, `{Deb, Buf, #v1{}}`) holds the TLS socket.
    ///
    /// Connections the client has already asked to close are left out: the broker keeps
    /// such a connection listed, in state `closing`, until its channels have ended, up to
    /// 30 s when a channel is slow to (seen in CI after a kill -9 mid-rotation: the
    /// restarted agent's `connection.close` at 08.17, the entry gone at 38.14). The client
    /// does not hold it any more.
    pub fn peer_cert_hashes(&self, user: &str) -> Vec<String> {
        let expr = format!(
            "[binary_to_list(binary:encode_hex(crypto:hash(sha256, D))) || P <- rabbit_networking:connections(), \
             {{user, U}} <- [hd(rabbit_reader:info(P, [user]))], U =:= <<\"{user}\">>, \
             {{state, S}} <- rabbit_reader:info(P, [state]), S =/= closing, S =/= closed, \
             {{ok, D}} <- [rabbit_net:peercert(element(3, element(3, sys:get_state(P))))]]."
        );
        let out = self.ctl_ok(&["eval", &expr]);
        out.split('"')
            .filter(|s| s.len() == 64 && s.chars().all(|c| c.is_ascii_hexdigit()))
            .map(str::to_string)
            .collect()
    }

    /// Closes every connection of broker user `user`, as a node going away does to them.
    pub fn close_connections_of(&self, user: &str) -> usize {
        let out = self.ctl_ok(&["list_connections", "pid", "user"]);
        let pids: Vec<String> = out
            .lines()
            .filter_map(|l| {
                let (pid, u) = l.split_once('\t')?;
                (u.trim() == user).then(|| pid.trim().to_string())
            })
            .collect();
        for pid in &pids {
            let _ = self.ctl(&["close_connection", pid, "test: broker going away"]);
        }
        pids.len()
    }

    pub fn url(&self) -> String {
        format!("amqps://localhost:{}/%2f", self.port)
    }
}

/// Three nodes joined into one RabbitMQ cluster on this machine (one epmd, one cookie: the
/// rabbitmq user's), each with its own TLS port, data and logs.
pub struct Cluster {
    pub nodes: Vec<Broker>,
}

impl Cluster {
    pub fn start(root: &Path, ca: &Ca, tag: &str) -> Cluster {
        Cluster::start_listening(root, ca, tag, "127.0.0.1")
    }

    /// Same, each node listening on `ip` (see [`Broker::start_listening`]).
    pub fn start_listening(root: &Path, ca: &Ca, tag: &str, ip: &str) -> Cluster {
        let epmd = free_port();
        let nodes: Vec<Broker> = (0..3)
            .map(|i| {
                Broker::prepare(
                    &root.join(format!("{tag}-{i}")),
                    ca,
                    &[],
                    &format!("{tag}{i}"),
                    epmd,
                    ip,
                )
            })
            .collect();
        for n in &nodes {
            n.spawn();
        }
        for n in &nodes[1..] {
            n.ctl_ok(&["stop_app"]);
            n.ctl_ok(&["reset"]);
            n.ctl_ok(&["join_cluster", &nodes[0].node]);
            n.ctl_ok(&["start_app"]);
        }
        // Users and permissions are cluster-wide.
        nodes[0].setup_users();
        Cluster { nodes }
    }

    /// Every node's URL, for an agent's or a manager's `urls`.
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(Broker::url).collect()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // All nodes down before any takes the shared epmd with it.
        for n in &self.nodes {
            n.stop_node();
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.shutdown();
    }
}
