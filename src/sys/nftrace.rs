//! nftables trace events (`nft monitor trace`): a netfilter socket in the trace multicast
//! group, and the events parsed. Only packets that a rule marked with `meta nftrace set 1`
//! are traced, so listening costs nothing for other traffic. Blocking.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsRawFd, OwnedFd};
use std::time::Duration;

use nix::sys::socket::{MsgFlags, recv, setsockopt, sockopt};
use nix::sys::time::TimeVal;

use super::nfnl::{NfnlError, attrs};

const NFNLGRP_NFTRACE: u32 = 9;
const NFT_MSG_TRACE: u16 = 17;
const NFTA_TRACE_TABLE: u16 = 1;
const NFTA_TRACE_CHAIN: u16 = 2;
const NFTA_TRACE_RULE_HANDLE: u16 = 3;
const NFTA_TRACE_TYPE: u16 = 4;
const NFTA_TRACE_VERDICT: u16 = 5;
const NFTA_TRACE_ID: u16 = 6;
const NFTA_TRACE_NETWORK_HEADER: u16 = 8;
const NFTA_TRACE_TRANSPORT_HEADER: u16 = 9;
const NFTA_TRACE_IIF: u16 = 10;
const NFTA_TRACE_OIF: u16 = 12;
const NFTA_TRACE_POLICY: u16 = 16;
const NFTA_VERDICT_CODE: u16 = 1;

/// What a trace event reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TraceKind {
    /// A rule matched (with its verdict, which may be "continue").
    Rule,
    /// The end of a chain was reached (back to the calling chain).
    Return,
    /// A base chain's policy decided.
    Policy,
    /// A trace type this agent does not read.
    Other(u32),
}

/// A packet's header fields, as far as the trace carried them.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Headers {
    /// The source address.
    pub src: Option<IpAddr>,
    /// The destination address.
    pub dst: Option<IpAddr>,
    /// The IP protocol number.
    pub proto: Option<u8>,
    /// The source port (TCP, UDP).
    pub sport: Option<u16>,
    /// The destination port (TCP, UDP).
    pub dport: Option<u16>,
}

/// One step of a traced packet's walk through the ruleset, as the kernel reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceEvent {
    /// The same for every event of one packet's walk.
    pub id: u32,
    /// The table it is in.
    pub table: String,
    /// The chain.
    pub chain: String,
    /// The rule's handle (none for a chain's policy).
    pub handle: Option<u64>,
    /// What happened there.
    pub kind: TraceKind,
    /// `NF_DROP` 0, `NF_ACCEPT` 1, and nftables' own negative codes (continue -1, jump -3,
    /// goto -4, return -5).
    pub verdict: Option<i32>,
    /// The input interface's index.
    pub iif: Option<u32>,
    /// The output interface's index.
    pub oif: Option<u32>,
    /// The packet's headers (first event of a walk).
    pub headers: Headers,
}

fn be_u32(v: &[u8]) -> Option<u32> {
    Some(u32::from_be_bytes(v.try_into().ok()?))
}

fn text(v: &[u8]) -> String {
    String::from_utf8_lossy(v.split(|b| *b == 0).next().unwrap_or_default()).into_owned()
}

/// The addresses and protocol of an IPv4 or IPv6 header.
fn network(h: &[u8], out: &mut Headers) {
    match h.first().map(|b| b >> 4) {
        Some(4) if h.len() >= 20 => {
            out.proto = Some(h[9]);
            out.src = Some(IpAddr::V4(Ipv4Addr::new(h[12], h[13], h[14], h[15])));
            out.dst = Some(IpAddr::V4(Ipv4Addr::new(h[16], h[17], h[18], h[19])));
        }
        Some(6) if h.len() >= 40 => {
            out.proto = Some(h[6]);
            let a = |r: std::ops::Range<usize>| {
                let b: [u8; 16] = h[r].try_into().expect("16 bytes");
                IpAddr::V6(Ipv6Addr::from(b))
            };
            out.src = Some(a(8..24));
            out.dst = Some(a(24..40));
        }
        _ => {}
    }
}

/// Parses one `NFT_MSG_TRACE` message's attributes.
pub fn parse(body: &[u8]) -> Option<TraceEvent> {
    let mut e = TraceEvent {
        id: 0,
        table: String::new(),
        chain: String::new(),
        handle: None,
        kind: TraceKind::Other(0),
        verdict: None,
        iif: None,
        oif: None,
        headers: Headers::default(),
    };
    let mut transport = None;
    let mut policy = None;
    for (k, v) in attrs(body) {
        match k {
            NFTA_TRACE_ID => e.id = be_u32(v)?,
            NFTA_TRACE_TABLE => e.table = text(v),
            NFTA_TRACE_CHAIN => e.chain = text(v),
            NFTA_TRACE_RULE_HANDLE => e.handle = v.try_into().ok().map(u64::from_be_bytes),
            NFTA_TRACE_TYPE => {
                e.kind = match be_u32(v)? {
                    1 => TraceKind::Policy,
                    2 => TraceKind::Return,
                    3 => TraceKind::Rule,
                    n => TraceKind::Other(n),
                }
            }
            NFTA_TRACE_VERDICT => {
                e.verdict = attrs(v)
                    .find(|(k, _)| *k == NFTA_VERDICT_CODE)
                    .and_then(|(_, c)| be_u32(c))
                    .map(|c| c as i32);
            }
            NFTA_TRACE_POLICY => policy = be_u32(v),
            NFTA_TRACE_IIF => e.iif = be_u32(v),
            NFTA_TRACE_OIF => e.oif = be_u32(v),
            NFTA_TRACE_NETWORK_HEADER => network(v, &mut e.headers),
            NFTA_TRACE_TRANSPORT_HEADER => transport = Some(v),
            _ => {}
        }
    }
    if e.kind == TraceKind::Policy {
        e.verdict = e.verdict.or(policy.map(|p| p as i32));
    }
    if let (Some(t), Some(6 | 17)) = (transport, e.headers.proto)
        && t.len() >= 4
    {
        e.headers.sport = Some(u16::from_be_bytes([t[0], t[1]]));
        e.headers.dport = Some(u16::from_be_bytes([t[2], t[3]]));
    }
    Some(e)
}

/// A socket that receives the trace events of the calling thread's namespace.
pub struct TraceSocket(OwnedFd);

impl TraceSocket {
    /// Joins the trace multicast group (needs CAP_NET_ADMIN).
    pub fn open() -> Result<TraceSocket, NfnlError> {
        let fd = super::nfnl::netlink_socket(1 << (NFNLGRP_NFTRACE - 1))?;
        let _ = setsockopt(&fd, sockopt::RcvBuf, &(4 << 20));
        Ok(TraceSocket(fd))
    }

    /// The events that arrive within `wait` (none when nothing was traced meanwhile).
    pub fn next(&self, wait: Duration) -> Result<Vec<TraceEvent>, NfnlError> {
        let tv = TimeVal::new(wait.as_secs() as i64, wait.subsec_micros() as i64);
        setsockopt(&self.0, sockopt::ReceiveTimeout, &tv).map_err(NfnlError::Socket)?;
        let mut buf = vec![0u8; 1 << 16];
        let n = match recv(self.0.as_raw_fd(), &mut buf, MsgFlags::empty()) {
            Ok(n) => n,
            Err(nix::Error::EAGAIN | nix::Error::EINTR) => return Ok(vec![]),
            // The kernel had more events than the buffer: some are lost, go on.
            Err(nix::Error::ENOBUFS) => return Ok(vec![]),
            Err(e) => return Err(NfnlError::Socket(e)),
        };
        let mut out = vec![];
        let mut off = 0;
        while off + 20 <= n {
            let len = u32::from_ne_bytes(buf[off..off + 4].try_into().expect("4 bytes")) as usize;
            let kind = u16::from_ne_bytes(buf[off + 4..off + 6].try_into().expect("2 bytes"));
            if len < 20 || off + len > n {
                break;
            }
            if kind & 0xff == NFT_MSG_TRACE
                && let Some(e) = parse(&buf[off + 20..off + len])
            {
                out.push(e);
            }
            off += (len + 3) & !3;
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attr(buf: &mut Vec<u8>, kind: u16, v: &[u8]) {
        super::super::nfnl::put_attr(buf, kind, v);
    }

    #[test]
    fn a_rule_verdict_event_is_read() {
        let mut b = vec![];
        attr(&mut b, NFTA_TRACE_TABLE, b"rampart\0");
        attr(&mut b, NFTA_TRACE_CHAIN, b"in_0\0");
        attr(&mut b, NFTA_TRACE_ID, &7u32.to_be_bytes());
        attr(&mut b, NFTA_TRACE_TYPE, &3u32.to_be_bytes()); // NFT_TRACETYPE_RULE
        attr(&mut b, NFTA_TRACE_RULE_HANDLE, &42u64.to_be_bytes());
        let mut verdict = vec![];
        attr(&mut verdict, NFTA_VERDICT_CODE, &0u32.to_be_bytes());
        attr(&mut b, NFTA_TRACE_VERDICT | 0x8000, &verdict);
        let mut ip = vec![0x45, 0, 0, 40, 0, 0, 0, 0, 64, 6, 0, 0];
        ip.extend_from_slice(&[10, 0, 0, 2, 10, 0, 0, 1]);
        attr(&mut b, NFTA_TRACE_NETWORK_HEADER, &ip);
        attr(
            &mut b,
            NFTA_TRACE_TRANSPORT_HEADER,
            &[0x9c, 0x40, 0, 9, 0, 0, 0, 0],
        );
        let e = parse(&b).unwrap();
        assert_eq!(e.id, 7);
        assert_eq!((e.table.as_str(), e.chain.as_str()), ("rampart", "in_0"));
        assert_eq!(e.kind, TraceKind::Rule);
        assert_eq!(e.handle, Some(42));
        assert_eq!(e.verdict, Some(0));
        assert_eq!(e.headers.src, Some("10.0.0.2".parse().unwrap()));
        assert_eq!(e.headers.dst, Some("10.0.0.1".parse().unwrap()));
        assert_eq!((e.headers.sport, e.headers.dport), (Some(40000), Some(9)));
    }
}
