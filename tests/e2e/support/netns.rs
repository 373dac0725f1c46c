//! Network namespaces made by the tests, real veth links between them, real traffic, and a
//! relay that makes the shared broker reachable from inside a namespace over a veth.

use std::fs::File;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("running ip");
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs `f` on a fresh thread inside namespace `ns` (a thread's namespace is its own).
pub fn in_ns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = format!("/run/netns/{ns}");
    std::thread::spawn(move || {
        let file = File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        f()
    })
    .join()
    .expect("namespace thread panicked")
}

pub struct Netns {
    pub name: String,
}

impl Netns {
    /// A fresh namespace; the process id in its name keeps concurrent test runs apart.
    pub fn new(base: &str) -> Netns {
        let name = &format!("{base}-{}", std::process::id());
        let _ = Command::new("ip").args(["netns", "del", name]).output();
        ip(&["netns", "add", name]);
        ip(&["-n", name, "link", "set", "lo", "up"]);
        Netns {
            name: name.to_string(),
        }
    }

    pub fn exec(&self, args: &[&str]) -> std::process::Output {
        Command::new("ip")
            .args(["netns", "exec", &self.name])
            .args(args)
            .output()
            .expect("ip netns exec")
    }

    pub fn sysctl(&self, key: &str, value: &str) {
        let o = self.exec(&["sysctl", "-qw", &format!("{key}={value}")]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }

    pub fn route(&self, dest: &str, via: &str) {
        ip(&["-n", &self.name, "route", "add", dest, "via", via]);
    }

    /// `nft list table inet TABLE` inside this namespace, or None when absent.
    pub fn nft_table(&self, table: &str) -> Option<String> {
        let o = self.exec(&["nft", "list", "table", "inet", table]);
        o.status
            .success()
            .then(|| String::from_utf8_lossy(&o.stdout).into_owned())
    }

    pub fn nft(&self, script: &str) {
        let o = self.exec(&["nft", script]);
        assert!(
            o.status.success(),
            "nft {script}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }

    pub fn ping(&self, addr: &str) -> bool {
        self.exec(&["ping", "-c1", "-W1", addr]).status.success()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// A veth pair `a_if` (in `a`, address `a_addr`) <-> `b_if` (in `b`, `b_addr`), both up.
pub fn veth(a: &Netns, a_if: &str, a_addr: &str, b: &Netns, b_if: &str, b_addr: &str) {
    ip(&[
        "link", "add", a_if, "netns", &a.name, "type", "veth", "peer", "name", b_if, "netns",
        &b.name,
    ]);
    ip(&["-n", &a.name, "addr", "add", a_addr, "dev", a_if]);
    ip(&["-n", &b.name, "addr", "add", b_addr, "dev", b_if]);
    ip(&["-n", &a.name, "link", "set", a_if, "up"]);
    ip(&["-n", &b.name, "link", "set", b_if, "up"]);
}

/// What a TCP connection attempt saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tcp {
    /// Connected and read the server's greeting.
    Open,
    /// Actively refused: a TCP reset (or an ICMP unreachable) came back.
    Refused,
    /// No answer at all: dropped.
    Silent,
}

pub fn tcp_probe(ns: &str, addr: &str, port: u16) -> Tcp {
    let sa: SocketAddr = format!("{addr}:{port}").parse().unwrap();
    in_ns(ns, move || {
        match TcpStream::connect_timeout(&sa, Duration::from_millis(800)) {
            Ok(mut s) => {
                s.set_read_timeout(Some(Duration::from_millis(800)))
                    .unwrap();
                let mut buf = [0u8; 2];
                match s.read_exact(&mut buf) {
                    Ok(()) if &buf == b"hi" => Tcp::Open,
                    _ => Tcp::Silent,
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => Tcp::Refused,
            Err(_) => Tcp::Silent,
        }
    })
}

/// A UDP round trip: true when the echo came back.
pub fn udp_probe(ns: &str, addr: &str, port: u16) -> bool {
    let sa: SocketAddr = format!("{addr}:{port}").parse().unwrap();
    in_ns(ns, move || {
        let s = UdpSocket::bind("0.0.0.0:0").unwrap();
        s.set_read_timeout(Some(Duration::from_millis(800)))
            .unwrap();
        s.send_to(b"ping", sa).unwrap();
        let mut buf = [0u8; 8];
        matches!(s.recv_from(&mut buf), Ok((4, _)))
    })
}

/// Servers inside a namespace: TCP ports greet with "hi", UDP ports echo. Stop on drop.
pub struct Servers {
    stop: Arc<AtomicBool>,
}

impl Servers {
    pub fn start(ns: &str, addr: &str, tcp: &[u16], udp: &[u16]) -> Servers {
        let stop = Arc::new(AtomicBool::new(false));
        tcp_servers(ns, addr, tcp, &stop, |mut s, _| {
            let _ = s.write_all(b"hi");
        });
        udp_echo(ns, addr, udp, &stop);
        Servers { stop }
    }
}

/// TCP listeners in `ns` at `addr`, each accepted connection handed to `serve` (on the
/// accepting thread: `serve` spawns if it keeps the connection), until `stop`.
fn tcp_servers(
    ns: &str,
    addr: &str,
    ports: &[u16],
    stop: &Arc<AtomicBool>,
    serve: impl Fn(TcpStream, Arc<AtomicBool>) + Clone + Send + 'static,
) {
    for &port in ports {
        let sa: SocketAddr = format!("{addr}:{port}").parse().unwrap();
        let listener = in_ns(ns, move || TcpListener::bind(sa).expect("bind tcp"));
        listener.set_nonblocking(true).unwrap();
        let (stop, serve) = (stop.clone(), serve.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((s, _)) => serve(s, stop.clone()),
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        });
    }
}

/// UDP servers that send each datagram back, until `stop`.
fn udp_echo(ns: &str, addr: &str, ports: &[u16], stop: &Arc<AtomicBool>) {
    for &port in ports {
        let sa: SocketAddr = format!("{addr}:{port}").parse().unwrap();
        let sock = in_ns(ns, move || UdpSocket::bind(sa).expect("bind udp"));
        sock.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 64];
            while !stop.load(Ordering::Relaxed) {
                if let Ok((n, from)) = sock.recv_from(&mut buf) {
                    let _ = sock.send_to(&buf[..n], from);
                }
            }
        });
    }
}

impl Drop for Servers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Listens at `listen` inside `ns` and relays each connection to `target` (reached from
/// the root namespace): the broker, seen from a namespace through a real veth.
pub fn relay(ns: &str, listen: &str, target: SocketAddr) -> KillableRelay {
    KillableRelay::start(ns, listen, target)
}

/// A relay that can be killed like a broker node: it stops listening (new connections are
/// refused) and resets every connection it carries. Killed on drop.
pub struct KillableRelay {
    stop: Arc<AtomicBool>,
    streams: Arc<std::sync::Mutex<Vec<TcpStream>>>,
}

impl KillableRelay {
    pub fn start(ns: &str, listen: &str, target: SocketAddr) -> KillableRelay {
        let sa: SocketAddr = listen.parse().unwrap();
        // A relay killed a moment ago may still hold the port (its thread closes the
        // listener within a few milliseconds).
        let listener = in_ns(ns, move || {
            let deadline = std::time::Instant::now() + Duration::from_secs(2);
            loop {
                match TcpListener::bind(sa) {
                    Err(e)
                        if e.kind() == std::io::ErrorKind::AddrInUse
                            && std::time::Instant::now() < deadline =>
                    {
                        std::thread::sleep(Duration::from_millis(10));
                    }
                    other => return other.expect("bind relay"),
                }
            }
        });
        listener.set_nonblocking(true).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let streams: Arc<std::sync::Mutex<Vec<TcpStream>>> = Arc::default();
        let (stop2, streams2) = (stop.clone(), streams.clone());
        std::thread::spawn(move || {
            while !stop2.load(Ordering::Relaxed) {
                let Ok((inbound, _)) = listener.accept() else {
                    std::thread::sleep(Duration::from_millis(5));
                    continue;
                };
                inbound.set_nonblocking(false).unwrap();
                let Ok(outbound) = TcpStream::connect(target) else {
                    continue;
                };
                // Without this, Nagle on one hop meets delayed ACKs on the other and a small
                // frame waits 40 ms whenever the broker has nothing else to send.
                let _ = inbound.set_nodelay(true);
                let _ = outbound.set_nodelay(true);
                {
                    let mut all = streams2.lock().unwrap();
                    all.push(inbound.try_clone().unwrap());
                    all.push(outbound.try_clone().unwrap());
                }
                for (mut from, mut to) in [
                    (inbound.try_clone().unwrap(), outbound.try_clone().unwrap()),
                    (outbound, inbound),
                ] {
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut from, &mut to);
                        let _ = to.shutdown(std::net::Shutdown::Both);
                    });
                }
            }
            // The listener closes here: the port refuses connections from now on.
        });
        KillableRelay { stop, streams }
    }

    pub fn kill(&self) {
        self.stop.store(true, Ordering::Relaxed);
        for s in self.streams.lock().unwrap().drain(..) {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }
}

impl Drop for KillableRelay {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Echo servers in `ns` at `addr`: each TCP connection and each UDP datagram gets back what
/// it sent. Stopped on drop.
pub fn echo_servers(ns: &str, addr: &str, tcp: &[u16], udp: &[u16]) -> Servers {
    let stop = Arc::new(AtomicBool::new(false));
    tcp_servers(ns, addr, tcp, &stop, |mut s, stop| {
        let _ = s.set_nonblocking(false);
        let _ = s.set_read_timeout(Some(Duration::from_millis(200)));
        std::thread::spawn(move || {
            let mut buf = [0u8; 256];
            while !stop.load(Ordering::Relaxed) {
                match s.read(&mut buf) {
                    Ok(0) => return,
                    Ok(n) => {
                        if s.write_all(&buf[..n]).is_err() {
                            return;
                        }
                    }
                    Err(e)
                        if e.kind() == std::io::ErrorKind::WouldBlock
                            || e.kind() == std::io::ErrorKind::TimedOut => {}
                    Err(_) => return,
                }
            }
        });
    });
    udp_echo(ns, addr, udp, &stop);
    Servers { stop }
}

/// A long-lived connection from a namespace, to see whether it still carries data.
pub enum Session {
    Tcp(TcpStream),
    Udp(UdpSocket),
}

impl Session {
    pub fn tcp(ns: &str, addr: &str, port: u16) -> Session {
        let sa: SocketAddr = format!("{addr}:{port}").parse().unwrap();
        let s = in_ns(ns, move || {
            TcpStream::connect_timeout(&sa, Duration::from_secs(2))
        })
        .unwrap_or_else(|e| panic!("connecting to {sa}: {e}"));
        Session::Tcp(s)
    }

    pub fn udp(ns: &str, addr: &str, port: u16) -> Session {
        let sa: SocketAddr = format!("{addr}:{port}").parse().unwrap();
        let s = in_ns(ns, move || {
            let s = UdpSocket::bind("0.0.0.0:0").expect("bind udp");
            s.connect(sa).expect("connect udp");
            s
        });
        Session::Udp(s)
    }

    /// Sends a few bytes and waits up to a second for their echo.
    pub fn carries(&mut self) -> bool {
        let timeout = Some(Duration::from_secs(1));
        let mut buf = [0u8; 16];
        match self {
            Session::Tcp(s) => {
                let _ = s.set_read_timeout(timeout);
                s.write_all(b"ping").is_ok()
                    && s.read_exact(&mut buf[..4]).is_ok()
                    && &buf[..4] == b"ping"
            }
            Session::Udp(s) => {
                let _ = s.set_read_timeout(timeout);
                s.send(b"ping").is_ok() && matches!(s.recv(&mut buf), Ok(4)) && &buf[..4] == b"ping"
            }
        }
    }

    /// The local port (to find the connection in conntrack).
    pub fn port(&self) -> u16 {
        match self {
            Session::Tcp(s) => s.local_addr().unwrap().port(),
            Session::Udp(s) => s.local_addr().unwrap().port(),
        }
    }
}
