//! The host's TCP connections and listeners, from /proc/net/tcp{,6}, each mapped to its
//! process through the socket inodes in /proc/PID/fd. Works without root (what cannot be
//! seen shows `-`) and without the daemon.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::Path;

use serde::Serialize;

/// One TCP socket of the host, as `rampart connection list` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Connection {
    /// `tcp` or `tcp6`.
    pub proto: &'static str,
    /// Bytes received and not yet read by the program.
    pub recv_q: u64,
    /// Bytes sent and not yet acknowledged by the peer.
    pub send_q: u64,
    /// The local address and port.
    pub local: SocketAddr,
    /// The peer's address and port (unspecified for a listener).
    pub foreign: SocketAddr,
    /// The TCP state, as netstat names it (`ESTABLISHED`, `LISTEN`, ...).
    pub state: &'static str,
    /// The socket's inode, which ties it to the process holding it.
    pub inode: u64,
    /// The process holding it, when one was found.
    pub pid: Option<u32>,
    /// That process's command name.
    pub program: Option<String>,
}

/// The netstat name of kernel TCP state `code` (as in `/proc/net/tcp`).
pub fn state_name(code: u8) -> &'static str {
    match code {
        0x01 => "ESTABLISHED",
        0x02 => "SYN_SENT",
        0x03 => "SYN_RECV",
        0x04 => "FIN_WAIT1",
        0x05 => "FIN_WAIT2",
        0x06 => "TIME_WAIT",
        0x07 => "CLOSE",
        0x08 => "CLOSE_WAIT",
        0x09 => "LAST_ACK",
        0x0A => "LISTEN",
        0x0B => "CLOSING",
        0x0C => "NEW_SYN_RECV",
        _ => "UNKNOWN",
    }
}

/// `0100007F:1F90` (IPv4) or 32 hex digits (IPv6), each 32-bit word in host byte order.
fn parse_addr(s: &str) -> Option<SocketAddr> {
    let (ip, port) = s.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let ip = match ip.len() {
        8 => IpAddr::V4(Ipv4Addr::from(
            u32::from_str_radix(ip, 16).ok()?.to_le_bytes(),
        )),
        32 => {
            let mut bytes = [0u8; 16];
            for i in 0..4 {
                let word = u32::from_str_radix(&ip[i * 8..i * 8 + 8], 16).ok()?;
                bytes[i * 4..i * 4 + 4].copy_from_slice(&word.to_le_bytes());
            }
            IpAddr::V6(Ipv6Addr::from(bytes))
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

/// Parses the text of /proc/net/tcp or tcp6.
pub fn parse_proc_net_tcp(text: &str, proto: &'static str) -> Vec<Connection> {
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 10 {
                return None;
            }
            let (tx, rx) = f[4].split_once(':')?;
            Some(Connection {
                proto,
                local: parse_addr(f[1])?,
                foreign: parse_addr(f[2])?,
                state: state_name(u8::from_str_radix(f[3], 16).ok()?),
                send_q: u64::from_str_radix(tx, 16).ok()?,
                recv_q: u64::from_str_radix(rx, 16).ok()?,
                inode: f[9].parse().ok()?,
                pid: None,
                program: None,
            })
        })
        .collect()
}

/// socket inode -> (pid, program), for every process whose fds we may read.
fn socket_owners(proc_root: &Path) -> HashMap<u64, (u32, String)> {
    let mut owners = HashMap::new();
    let Ok(entries) = std::fs::read_dir(proc_root) else {
        return owners;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(entry.path().join("fd")) else {
            continue;
        };
        let comm = std::fs::read_to_string(entry.path().join("comm"))
            .map(|s| s.trim_end().to_string())
            .unwrap_or_else(|_| "-".into());
        for fd in fds.flatten() {
            let Ok(target) = std::fs::read_link(fd.path()) else {
                continue;
            };
            let t = target.to_string_lossy();
            if let Some(inode) = t.strip_prefix("socket:[").and_then(|r| r.strip_suffix(']'))
                && let Ok(inode) = inode.parse::<u64>()
            {
                owners.entry(inode).or_insert((pid, comm.clone()));
            }
        }
    }
    owners
}

/// Every TCP connection and listener of this network namespace, IPv4 and IPv6.
pub fn list() -> Vec<Connection> {
    let mut out = vec![];
    for (file, proto) in [("/proc/net/tcp", "tcp"), ("/proc/net/tcp6", "tcp6")] {
        if let Ok(text) = std::fs::read_to_string(file) {
            out.extend(parse_proc_net_tcp(&text, proto));
        }
    }
    let owners = socket_owners(Path::new("/proc"));
    for c in &mut out {
        if let Some((pid, prog)) = owners.get(&c.inode) {
            c.pid = Some(*pid);
            c.program = Some(prog.clone());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const TCP: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:1F90 00000000:0000 0A 00000000:00000003 00:00000000 00000000     0        0 12345 1 0000000000000000 100 0 0 10 0
   1: 0100007F:E5D2 0100007F:1627 01 0000000A:00000000 00:00000000 00000000     0        0 23456 1 0000000000000000 20 4 30 10 -1
";
    const TCP6: &str = "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000000000000000000001000000:0050 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 34567 1 0000000000000000 100 0 0 10 0
";

    #[test]
    fn ipv4_rows() {
        let rows = parse_proc_net_tcp(TCP, "tcp");
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].local, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(rows[0].state, "LISTEN");
        assert_eq!(rows[0].recv_q, 3);
        assert_eq!(rows[0].inode, 12345);
        assert_eq!(rows[1].foreign, "127.0.0.1:5671".parse().unwrap());
        assert_eq!(rows[1].state, "ESTABLISHED");
        assert_eq!(rows[1].send_q, 10);
    }

    #[test]
    fn ipv6_rows() {
        let rows = parse_proc_net_tcp(TCP6, "tcp6");
        assert_eq!(rows[0].local, "[::1]:80".parse().unwrap());
        assert_eq!(rows[0].state, "LISTEN");
    }
}
