//! The host's connection tracking table over ctnetlink: one dump of every entry, and the
//! removal of chosen entries in as few `sendmsg` calls as the socket buffer allows. Messages
//! are built and parsed with rust-netlink's `netlink-packet-netfilter`; the socket is the
//! same blocking netfilter socket as the nftables paths ([`super::nfnl`]). Blocking: call
//! from a blocking thread.

use std::net::IpAddr;
use std::os::fd::{AsRawFd, OwnedFd};

use netlink_packet_core::{
    DefaultNla, NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage,
    NetlinkPayload, Nla,
};
use netlink_packet_netfilter::conntrack::{
    ConntrackAttribute, ConntrackMessage, IPTuple, ProtoInfo, ProtoInfoTCP, ProtoTuple, Protocol,
    Tuple,
};
use netlink_packet_netfilter::{NetfilterHeader, NetfilterMessage, NetfilterProtoFamily};
use nix::sys::socket::{MsgFlags, recv, send};

use super::nfnl::{self, NfnlError};

const CTA_ID: u16 = 12;
const CTA_ZONE: u16 = 18;
/// Messages per `sendmsg` when removing or making entries; each is under 200 bytes.
const CHUNK: usize = 512;

/// Why a conntrack dump or change failed.
#[derive(Debug, thiserror::Error)]
pub enum CtError {
    /// The netlink socket failed.
    #[error(transparent)]
    Netlink(#[from] NfnlError),
    /// The dump held a message that does not decode.
    #[error("the conntrack dump could not be read: {0}")]
    Decode(String),
    /// The kernel answered a request with an error.
    #[error("the kernel refused a conntrack request: {0}")]
    Refused(std::io::Error),
}

/// One conntrack entry: its original direction (as the first packet went) and where the
/// reply comes from, which after destination NAT is the address the filter hooks saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Flow {
    /// The IP protocol number (6: TCP, 17: UDP, ...).
    pub proto: u8,
    /// The original direction's source address.
    pub src: IpAddr,
    /// Its destination address.
    pub dst: IpAddr,
    /// Its source port (0 without ports).
    pub sport: u16,
    /// Its destination port (0 without ports).
    pub dport: u16,
    /// Where replies come from (the real destination after DNAT).
    pub reply_src: IpAddr,
    /// The port replies come from.
    pub reply_sport: u16,
    /// What names the entry for its removal: the original tuple, its zone and its id (so a
    /// new entry that took the same tuple meanwhile is not removed).
    orig: Vec<Tuple>,
    id: Option<DefaultNla>,
    zone: Option<DefaultNla>,
}

#[derive(Default)]
struct TupleParts {
    src: Option<IpAddr>,
    dst: Option<IpAddr>,
    proto: u8,
    sport: u16,
    dport: u16,
}

fn tuple_parts(t: &[Tuple]) -> TupleParts {
    let mut p = TupleParts::default();
    for part in t {
        match part {
            Tuple::Ip(ips) => {
                for ip in ips {
                    match ip {
                        IPTuple::SourceAddress(a) => p.src = Some(*a),
                        IPTuple::DestinationAddress(a) => p.dst = Some(*a),
                        _ => {}
                    }
                }
            }
            Tuple::Proto(ps) => {
                for x in ps {
                    match x {
                        ProtoTuple::Protocol(proto) => p.proto = u8::from(*proto),
                        ProtoTuple::SourcePort(port) => p.sport = *port,
                        ProtoTuple::DestinationPort(port) => p.dport = *port,
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    p
}

impl Flow {
    fn from_attributes(attrs: Vec<ConntrackAttribute>) -> Option<Flow> {
        let mut orig = None;
        let mut reply = None;
        let (mut id, mut zone) = (None, None);
        for a in attrs {
            match a {
                ConntrackAttribute::CtaTupleOrig(t) => orig = Some(t),
                ConntrackAttribute::CtaTupleReply(t) => reply = Some(tuple_parts(&t)),
                ConntrackAttribute::Other(nla) if nla.kind() == CTA_ID => id = Some(nla),
                ConntrackAttribute::Other(nla) if nla.kind() == CTA_ZONE => zone = Some(nla),
                _ => {}
            }
        }
        let orig = orig?;
        let o = tuple_parts(&orig);
        let reply = reply?;
        Some(Flow {
            proto: o.proto,
            src: o.src?,
            dst: o.dst?,
            sport: o.sport,
            dport: o.dport,
            reply_src: reply.src?,
            reply_sport: reply.sport,
            orig,
            id,
            zone,
        })
    }

    /// The kernel's id of the entry: a connection cut and picked up again gets a new one.
    pub fn id(&self) -> Option<u32> {
        let nla = self.id.as_ref().filter(|n| n.value_len() == 4)?;
        let mut v = [0u8; 4];
        nla.emit_value(&mut v);
        Some(u32::from_be_bytes(v))
    }

    /// The destination address and port that the filter hooks saw (after DNAT).
    pub fn seen_destination(&self) -> (IpAddr, u16) {
        (self.reply_src, self.reply_sport)
    }
}

fn family_of(a: &IpAddr) -> NetfilterProtoFamily {
    if a.is_ipv4() {
        NetfilterProtoFamily::IPv4
    } else {
        NetfilterProtoFamily::IPv6
    }
}

fn encode(
    out: &mut Vec<u8>,
    family: NetfilterProtoFamily,
    flags: u16,
    seq: u32,
    m: ConntrackMessage,
) {
    let mut header = NetlinkHeader::default();
    header.flags = flags;
    header.sequence_number = seq;
    let mut msg = NetlinkMessage::new(
        header,
        NetlinkPayload::from(NetfilterMessage::new(NetfilterHeader::new(family, 0, 0), m)),
    );
    msg.finalize();
    let at = out.len();
    out.resize(at + msg.buffer_len(), 0);
    msg.serialize(&mut out[at..]);
}

/// Reads answers until `each` has seen the dump's end or the ack of `last_seq`; errors the
/// kernel answers for other messages are handed to `on_error` (the errno, positive).
fn read_answers(
    fd: &OwnedFd,
    last_seq: u32,
    mut each: impl FnMut(NetfilterMessage) -> Result<(), CtError>,
    mut on_error: impl FnMut(i32) -> Result<(), CtError>,
) -> Result<(), CtError> {
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = match recv(fd.as_raw_fd(), &mut buf, MsgFlags::empty()) {
            Ok(n) => n,
            Err(nix::Error::EINTR) => continue,
            Err(nix::Error::EAGAIN) => return Err(NfnlError::NoAnswer.into()),
            Err(e) => return Err(NfnlError::Socket(e).into()),
        };
        let mut off = 0;
        while off < n {
            let msg = NetlinkMessage::<NetfilterMessage>::deserialize(&buf[off..n])
                .map_err(|e| CtError::Decode(e.to_string()))?;
            let len = msg.header.length as usize;
            let seq = msg.header.sequence_number;
            match msg.payload {
                NetlinkPayload::Done(_) => return Ok(()),
                NetlinkPayload::Error(e) => {
                    let code = e.raw_code().abs();
                    if code != 0 {
                        on_error(code)?;
                    }
                    if seq == last_seq {
                        return Ok(());
                    }
                }
                NetlinkPayload::InnerMessage(m) => each(m)?,
                _ => {}
            }
            if len == 0 {
                break;
            }
            off += (len + 3) & !3;
        }
    }
}

/// Every entry of the table (both families), each handed to `each` as it is read, so a
/// caller that keeps few of them holds few. Returns how many were read.
pub fn dump(mut each: impl FnMut(Flow)) -> Result<usize, CtError> {
    let fd = nfnl::open()?;
    nfnl::size_buffers(&fd, 4096, 1024);
    let seq = nfnl::first_seq();
    let mut msg = vec![];
    encode(
        &mut msg,
        NetfilterProtoFamily::Unspec,
        NLM_F_REQUEST | NLM_F_DUMP,
        seq,
        ConntrackMessage::Get(vec![]),
    );
    send(fd.as_raw_fd(), &msg, MsgFlags::empty()).map_err(NfnlError::Socket)?;
    let mut read = 0;
    read_answers(
        &fd,
        seq,
        |m| {
            if let netlink_packet_netfilter::NetfilterMessageInner::Conntrack(
                ConntrackMessage::New(attrs),
            ) = m.inner
            {
                read += 1;
                if let Some(f) = Flow::from_attributes(attrs) {
                    each(f);
                }
            }
            Ok(())
        },
        |code| Err(CtError::Refused(std::io::Error::from_raw_os_error(code))),
    )?;
    Ok(read)
}

/// Sends `messages` (built by `build` with the given sequence number), `CHUNK` per
/// `sendmsg`; only each chunk's last asks for an ack, so the kernel answers successes
/// silently. Returns how many failed with `ENOENT` (entries already gone).
fn send_all<T>(
    items: &[T],
    flags: u16,
    build: impl Fn(&mut Vec<u8>, u16, u32, &T),
) -> Result<usize, CtError> {
    let fd = nfnl::open()?;
    nfnl::size_buffers(&fd, CHUNK * 256, CHUNK);
    let mut gone = 0;
    let mut seq = nfnl::first_seq();
    for chunk in items.chunks(CHUNK) {
        let mut buf = Vec::with_capacity(chunk.len() * 160);
        for (i, item) in chunk.iter().enumerate() {
            seq = seq.wrapping_add(1);
            let ack = if i + 1 == chunk.len() { NLM_F_ACK } else { 0 };
            build(&mut buf, NLM_F_REQUEST | flags | ack, seq, item);
        }
        send(fd.as_raw_fd(), &buf, MsgFlags::empty()).map_err(NfnlError::Socket)?;
        read_answers(
            &fd,
            seq,
            |_| Ok(()),
            |code| {
                if code == nix::libc::ENOENT {
                    gone += 1;
                    Ok(())
                } else {
                    Err(CtError::Refused(std::io::Error::from_raw_os_error(code)))
                }
            },
        )?;
    }
    Ok(gone)
}

/// Removes the entries; returns how many were removed (an entry that ended meanwhile is
/// not counted).
pub fn delete(flows: &[Flow]) -> Result<usize, CtError> {
    let gone = send_all(flows, 0, |buf, flags, seq, f| {
        let mut attrs = vec![ConntrackAttribute::CtaTupleOrig(f.orig.clone())];
        attrs.extend(f.zone.clone().map(ConntrackAttribute::Other));
        attrs.extend(f.id.clone().map(ConntrackAttribute::Other));
        encode(
            buf,
            family_of(&f.src),
            flags,
            seq,
            ConntrackMessage::Delete(attrs),
        );
    })?;
    Ok(flows.len() - gone)
}

/// An entry to make: what `conntrack -I` makes, for tests and benchmarks that need many
/// entries without as many sockets. TCP entries are made established.
#[derive(Debug, Clone, Copy)]
pub struct NewFlow {
    /// The IP protocol number (6: TCP, 17: UDP).
    pub proto: u8,
    /// The source address.
    pub src: IpAddr,
    /// The destination address.
    pub dst: IpAddr,
    /// The source port.
    pub sport: u16,
    /// The destination port.
    pub dport: u16,
    /// How long the kernel keeps it without traffic.
    pub timeout_s: u32,
}

fn tuple(src: IpAddr, dst: IpAddr, proto: u8, sport: u16, dport: u16) -> Vec<Tuple> {
    vec![
        Tuple::Ip(vec![
            IPTuple::SourceAddress(src),
            IPTuple::DestinationAddress(dst),
        ]),
        Tuple::Proto(vec![
            ProtoTuple::Protocol(Protocol::from(proto)),
            ProtoTuple::SourcePort(sport),
            ProtoTuple::DestinationPort(dport),
        ]),
    ]
}

/// Makes the entries (without NAT: the reply is the original tuple turned around).
pub fn create(flows: &[NewFlow]) -> Result<(), CtError> {
    const TCP_ESTABLISHED: u8 = 3;
    let existing = send_all(flows, NLM_F_CREATE, |buf, flags, seq, f| {
        let mut attrs = vec![
            ConntrackAttribute::CtaTupleOrig(tuple(f.src, f.dst, f.proto, f.sport, f.dport)),
            ConntrackAttribute::CtaTupleReply(tuple(f.dst, f.src, f.proto, f.dport, f.sport)),
            ConntrackAttribute::CtaTimeout(f.timeout_s),
        ];
        if f.proto == 6 {
            attrs.push(ConntrackAttribute::CtaProtoInfo(vec![ProtoInfo::TCP(
                vec![ProtoInfoTCP::State(TCP_ESTABLISHED)],
            )]));
        }
        encode(
            buf,
            family_of(&f.src),
            flags,
            seq,
            ConntrackMessage::New(attrs),
        );
    })?;
    if existing > 0 {
        return Err(CtError::Refused(std::io::Error::from_raw_os_error(
            nix::libc::ENOENT,
        )));
    }
    Ok(())
}

#[cfg(test)]
impl Flow {
    /// An entry without NAT, for tests of the judge.
    pub fn for_test(proto: u8, src: &str, dst: &str, sport: u16, dport: u16) -> Flow {
        let (src, dst): (IpAddr, IpAddr) = (src.parse().unwrap(), dst.parse().unwrap());
        Flow {
            proto,
            src,
            dst,
            sport,
            dport,
            reply_src: dst,
            reply_sport: dport,
            orig: tuple(src, dst, proto, sport, dport),
            id: None,
            zone: None,
        }
    }

    /// The same entry with its destination rewritten (DNAT) to `to`.
    pub fn dnat(mut self, to: &str, port: u16) -> Flow {
        self.reply_src = to.parse().unwrap();
        self.reply_sport = port;
        self
    }
}
