//! nftables set-element changes over nfnetlink, in one batch (one kernel transaction).
//! The nft CLI fetches every element of every set before it adds or deletes one (seconds at
//! 100 000 elements); this path costs the same at any set size. The framing here (batches,
//! attributes, requests) is shared with rule changes ([`super::nfrule`]).

use std::os::fd::{AsRawFd, OwnedFd};
use std::time::Duration;

use nix::libc;
use nix::sys::socket::{
    AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType, bind, recv, send,
    setsockopt, socket, sockopt,
};
use nix::sys::time::TimeVal;

const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFNL_MSG_BATCH_BEGIN: u16 = 0x10;
const NFNL_MSG_BATCH_END: u16 = 0x11;
const NFT_MSG_NEWSETELEM: u16 = 12;
const NFT_MSG_DELSETELEM: u16 = 14;
const NLMSG_ERROR: u16 = 2;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_CREATE: u16 = 0x400;
const NLA_F_NESTED: u16 = 0x8000;
const NFPROTO_INET: u8 = 1;
const NFTA_SET_ELEM_LIST_TABLE: u16 = 1;
const NFTA_SET_ELEM_LIST_SET: u16 = 2;
const NFTA_SET_ELEM_LIST_ELEMENTS: u16 = 3;
const NFTA_LIST_ELEM: u16 = 1;
const NFTA_SET_ELEM_KEY: u16 = 1;
const NFTA_SET_ELEM_FLAGS: u16 = 3;
const NFTA_DATA_VALUE: u16 = 1;
const NFT_SET_ELEM_INTERVAL_END: u32 = 1;
const NFTA_SET_ELEM_LIST_SET_ID: u16 = 4;
const NFTA_SET_ELEM_USERDATA: u16 = 6;
const NFTNL_UDATA_SET_ELEM_FLAGS: u8 = 1;
const NFTNL_SET_ELEM_F_INTERVAL_OPEN: u32 = 1;

/// Why a netfilter netlink request failed.
#[derive(Debug, thiserror::Error)]
pub enum NfnlError {
    /// The socket could not be opened, written or read.
    #[error("netlink socket: {0}")]
    Socket(nix::Error),
    /// The kernel answered with an error (the whole batch is undone).
    #[error("the kernel refused the set element batch: {0}")]
    Refused(std::io::Error),
    /// The kernel did not answer.
    #[error("no answer from the kernel for the set element batch")]
    NoAnswer,
}

/// One interval-set element: its key (network byte order) and whether it closes a range.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Element {
    /// The key: an address, network byte order.
    pub key: Vec<u8>,
    /// It ends an interval (the first address after it).
    pub end: bool,
    /// Starts the last interval, which runs to the top of the key's range (no end
    /// element follows); nft marks it so for its listing.
    pub open: bool,
}

/// Element changes of one set, applied in the order given (deletions before additions).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetChange {
    /// The set's name in the agent's table.
    pub set: String,
    /// Elements to remove.
    pub delete: Vec<Element>,
    /// Elements to add.
    pub add: Vec<Element>,
}

pub(super) fn put_attr(buf: &mut Vec<u8>, kind: u16, payload: &[u8]) {
    let len = 4 + payload.len();
    buf.extend_from_slice(&(len as u16).to_ne_bytes());
    buf.extend_from_slice(&kind.to_ne_bytes());
    buf.extend_from_slice(payload);
    while !buf.len().is_multiple_of(4) {
        buf.push(0);
    }
}

/// Starts a nested attribute; returns where its length must be patched.
pub(super) fn begin_nested(buf: &mut Vec<u8>, kind: u16) -> usize {
    let at = buf.len();
    buf.extend_from_slice(&[0, 0]);
    buf.extend_from_slice(&(kind | NLA_F_NESTED).to_ne_bytes());
    at
}

pub(super) fn end_nested(buf: &mut [u8], at: usize) {
    let len = (buf.len() - at) as u16;
    buf[at..at + 2].copy_from_slice(&len.to_ne_bytes());
}

pub(super) fn cstr(s: &str) -> Vec<u8> {
    let mut v = s.as_bytes().to_vec();
    v.push(0);
    v
}

/// Appends one netlink message: header, nfgenmsg, then `body`.
fn put_msg(
    out: &mut Vec<u8>,
    kind: u16,
    flags: u16,
    seq: u32,
    family: u8,
    res_id: u16,
    body: &[u8],
) {
    let len = 16 + 4 + body.len();
    out.extend_from_slice(&(len as u32).to_ne_bytes());
    out.extend_from_slice(&kind.to_ne_bytes());
    out.extend_from_slice(&flags.to_ne_bytes());
    out.extend_from_slice(&seq.to_ne_bytes());
    out.extend_from_slice(&0u32.to_ne_bytes());
    out.push(family);
    out.push(0); // NFNETLINK_V0
    out.extend_from_slice(&res_id.to_be_bytes());
    out.extend_from_slice(body);
}

fn elements_body(table: &str, set: &str, set_id: Option<u32>, elements: &[Element]) -> Vec<u8> {
    let mut b = vec![];
    put_attr(&mut b, NFTA_SET_ELEM_LIST_TABLE, &cstr(table));
    put_attr(&mut b, NFTA_SET_ELEM_LIST_SET, &cstr(set));
    if let Some(id) = set_id {
        put_attr(&mut b, NFTA_SET_ELEM_LIST_SET_ID, &id.to_be_bytes());
    }
    let list = begin_nested(&mut b, NFTA_SET_ELEM_LIST_ELEMENTS);
    for e in elements {
        let item = begin_nested(&mut b, NFTA_LIST_ELEM);
        let key = begin_nested(&mut b, NFTA_SET_ELEM_KEY);
        put_attr(&mut b, NFTA_DATA_VALUE, &e.key);
        end_nested(&mut b, key);
        if e.end {
            put_attr(
                &mut b,
                NFTA_SET_ELEM_FLAGS,
                &NFT_SET_ELEM_INTERVAL_END.to_be_bytes(),
            );
        }
        if e.open {
            // As nft marks the last interval of a set that runs to the top of its range.
            let mut udata = vec![NFTNL_UDATA_SET_ELEM_FLAGS, 4];
            udata.extend_from_slice(&NFTNL_SET_ELEM_F_INTERVAL_OPEN.to_ne_bytes());
            put_attr(&mut b, NFTA_SET_ELEM_USERDATA, &udata);
        }
        end_nested(&mut b, item);
    }
    end_nested(&mut b, list);
    b
}

/// One nfnetlink batch under construction: a begin message, nftables messages, an end
/// message. The kernel applies it as one transaction, while it is sent (nfnetlink runs a
/// batch in the sender's `sendmsg`), and reports every message that fails; so, as nft
/// does, only the last message asks for an ack. A whole table is tens of thousands of
/// messages: an ack for each cost the kernel as many replies and this side as many reads.
pub(super) struct Batch {
    bytes: Vec<u8>,
    seq: u32,
    /// Where the last message starts, to mark it for the ack.
    last: Option<usize>,
}

const NFNLA_BATCH_GENID: u16 = 1;

impl Batch {
    /// With `genid`, the kernel refuses the whole batch (ERESTART) if the rule set changed
    /// since that generation: handles read from it may no longer mean the same rules.
    pub(super) fn begin(first_seq: u32, genid: Option<u32>) -> Batch {
        let mut body = vec![];
        if let Some(g) = genid {
            put_attr(&mut body, NFNLA_BATCH_GENID, &g.to_be_bytes());
        }
        let mut bytes = vec![];
        put_msg(
            &mut bytes,
            NFNL_MSG_BATCH_BEGIN,
            NLM_F_REQUEST,
            first_seq,
            0,
            NFNL_SUBSYS_NFTABLES,
            &body,
        );
        Batch {
            bytes,
            seq: first_seq,
            last: None,
        }
    }

    /// Adds nftables message `kind` (inet family) with `flags` besides request.
    pub(super) fn push(&mut self, kind: u16, flags: u16, body: &[u8]) {
        self.seq += 1;
        self.last = Some(self.bytes.len());
        put_msg(
            &mut self.bytes,
            (NFNL_SUBSYS_NFTABLES << 8) | kind,
            NLM_F_REQUEST | flags,
            self.seq,
            NFPROTO_INET,
            0,
            body,
        );
    }

    /// Adds the element changes of `c` (deletions first), in messages of bounded size.
    /// `set_id` names a set created earlier in the same batch.
    pub(super) fn push_elements(&mut self, table: &str, c: &SetChange, set_id: Option<u32>) {
        for (kind, elems) in [
            (NFT_MSG_DELSETELEM, &c.delete),
            (NFT_MSG_NEWSETELEM, &c.add),
        ] {
            for chunk in elems.chunks(512) {
                let flags = if kind == NFT_MSG_NEWSETELEM {
                    NLM_F_CREATE
                } else {
                    0
                };
                self.push(kind, flags, &elements_body(table, &c.set, set_id, chunk));
            }
        }
    }

    /// The bytes to send and the sequence numbers that expect an ack (the last message's).
    pub(super) fn finish(mut self) -> (Vec<u8>, Vec<u32>) {
        let mut acked = vec![];
        if let Some(at) = self.last {
            let flags = u16::from_ne_bytes([self.bytes[at + 6], self.bytes[at + 7]]) | NLM_F_ACK;
            self.bytes[at + 6..at + 8].copy_from_slice(&flags.to_ne_bytes());
            acked.push(self.seq);
        }
        put_msg(
            &mut self.bytes,
            NFNL_MSG_BATCH_END,
            NLM_F_REQUEST,
            self.seq + 1,
            0,
            NFNL_SUBSYS_NFTABLES,
            &[],
        );
        (self.bytes, acked)
    }
}

/// The whole batch: begin, one message per (set, deletions/additions), end. Returns the
/// bytes and the sequence numbers that expect an ack.
pub fn encode_batch(table: &str, changes: &[SetChange], first_seq: u32) -> (Vec<u8>, Vec<u32>) {
    let mut batch = Batch::begin(first_seq, None);
    for c in changes {
        batch.push_elements(table, c, None);
    }
    batch.finish()
}

/// Why bytes are not a batch [`encode_batch`] could have written.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BatchDecodeError {
    /// A message's length runs past the batch.
    #[error("message at byte {0} is cut short or has a bad length")]
    BadLength(usize),
    /// No batch-begin message first.
    #[error("the batch does not begin with a batch-begin message")]
    NoBegin,
    /// No batch-end message last.
    #[error("the batch does not end with a batch-end message")]
    NoEnd,
    /// A message that is not a set element change.
    #[error("message at byte {0} is not a set element change")]
    Unexpected(usize),
    /// A message for another table than the agent's.
    #[error("message at byte {0} names another table")]
    OtherTable(usize),
    /// A message without a table or set name.
    #[error("message at byte {0} has no table or set name")]
    NoName(usize),
}

/// The inverse of [`encode_batch`]: the table and the changes, with consecutive messages
/// of one set and kind joined again. Checks and fuzzing use it to prove the encoding.
pub fn decode_batch(bytes: &[u8]) -> Result<(String, Vec<SetChange>), BatchDecodeError> {
    let mut msgs = vec![];
    let mut off = 0;
    while off < bytes.len() {
        let head = bytes
            .get(off..off + 20)
            .ok_or(BatchDecodeError::BadLength(off))?;
        let len = u32::from_ne_bytes(head[0..4].try_into().expect("4 bytes")) as usize;
        if len < 20 || off + len > bytes.len() || !len.is_multiple_of(4) {
            return Err(BatchDecodeError::BadLength(off));
        }
        let kind = u16::from_ne_bytes(head[4..6].try_into().expect("2 bytes"));
        msgs.push((off, kind, &bytes[off + 20..off + len]));
        off += len;
    }
    match msgs.first() {
        Some((_, NFNL_MSG_BATCH_BEGIN, _)) => {}
        _ => return Err(BatchDecodeError::NoBegin),
    }
    match msgs.last() {
        Some((at, NFNL_MSG_BATCH_END, _)) if *at > 0 => {}
        _ => return Err(BatchDecodeError::NoEnd),
    }
    let mut table: Option<String> = None;
    let mut out: Vec<SetChange> = vec![];
    for (at, kind, body) in &msgs[1..msgs.len() - 1] {
        let delete = match *kind {
            k if k == (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_DELSETELEM => true,
            k if k == (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWSETELEM => false,
            _ => return Err(BatchDecodeError::Unexpected(*at)),
        };
        let (Some(t), Some(set)) = (
            attr_str(body, NFTA_SET_ELEM_LIST_TABLE),
            attr_str(body, NFTA_SET_ELEM_LIST_SET),
        ) else {
            return Err(BatchDecodeError::NoName(*at));
        };
        match &table {
            Some(known) if known != t => return Err(BatchDecodeError::OtherTable(*at)),
            Some(_) => {}
            None => table = Some(t.to_string()),
        }
        let mut elements = vec![];
        parse_elements(body, &mut elements);
        // A set's deletions come before its additions; a new entry starts when the set
        // changes or a deletion follows additions.
        let start_new = match out.last() {
            Some(c) => c.set != set || (delete && !c.add.is_empty()),
            None => true,
        };
        if start_new {
            out.push(SetChange {
                set: set.to_string(),
                delete: vec![],
                add: vec![],
            });
        }
        let c = out.last_mut().expect("pushed above");
        if delete {
            c.delete.extend(elements);
        } else {
            c.add.extend(elements);
        }
    }
    Ok((table.unwrap_or_default(), out))
}

/// A netfilter netlink socket, subscribed to the multicast `groups` bitmask.
pub(super) fn netlink_socket(groups: u32) -> Result<OwnedFd, NfnlError> {
    let fd = socket(
        AddressFamily::Netlink,
        SockType::Raw,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::NetlinkNetFilter,
    )
    .map_err(NfnlError::Socket)?;
    bind(fd.as_raw_fd(), &NetlinkAddr::new(0, groups)).map_err(NfnlError::Socket)?;
    Ok(fd)
}

pub(super) fn open() -> Result<OwnedFd, NfnlError> {
    let fd = netlink_socket(0)?;
    setsockopt(
        &fd,
        sockopt::ReceiveTimeout,
        &TimeVal::from(libc_timeval(Duration::from_secs(5))),
    )
    .map_err(NfnlError::Socket)?;
    Ok(fd)
}

/// A batch is one datagram: the send buffer must hold it whole (else EMSGSIZE, from about
/// 208 KB with the default buffer), and the receive buffer every ack it asks for (else
/// ENOBUFS). As nft does: the forced size (root), else the plain one up to the sysctl cap.
pub(super) fn size_buffers(fd: &OwnedFd, batch_bytes: usize, acks: usize) {
    // The kernel doubles what it is given; each ack costs a small skb.
    let send = batch_bytes.saturating_add(4096);
    let recv = acks.saturating_mul(1024).max(256 * 1024);
    if setsockopt(fd, sockopt::SndBufForce, &send).is_err() {
        let _ = setsockopt(fd, sockopt::SndBuf, &send);
    }
    if setsockopt(fd, sockopt::RcvBufForce, &recv).is_err() {
        let _ = setsockopt(fd, sockopt::RcvBuf, &recv);
    }
}

fn libc_timeval(d: Duration) -> nix::libc::timeval {
    nix::libc::timeval {
        tv_sec: d.as_secs() as nix::libc::time_t,
        tv_usec: d.subsec_micros() as nix::libc::suseconds_t,
    }
}

/// Sends the batch and waits for every ack. Blocking: call it from a blocking thread.
pub fn apply(table: &str, changes: &[SetChange]) -> Result<(), NfnlError> {
    if changes
        .iter()
        .all(|c| c.add.is_empty() && c.delete.is_empty())
    {
        return Ok(());
    }
    let (batch, pending) = encode_batch(table, changes, first_seq());
    send_batch(&batch, pending)
}

/// A sequence number unlikely to meet an earlier request's.
pub fn first_seq() -> u32 {
    (std::process::id() << 8) ^ (crate::ids::now_ms() as u32)
}

/// Sends one encoded batch on a fresh socket and waits for the ack of every message in
/// `pending`, then reads whatever else the kernel answered (it has answered everything by
/// the time the batch is sent); the first error it reports (the whole batch is aborted).
pub fn send_batch(batch: &[u8], mut pending: Vec<u32>) -> Result<(), NfnlError> {
    let fd = open()?;
    size_buffers(&fd, batch.len(), pending.len());
    send(fd.as_raw_fd(), batch, MsgFlags::empty()).map_err(NfnlError::Socket)?;
    let mut buf = vec![0u8; 65536];
    let mut first_error = None;
    loop {
        let flags = if pending.is_empty() {
            MsgFlags::MSG_DONTWAIT
        } else {
            MsgFlags::empty()
        };
        let n = match recv(fd.as_raw_fd(), &mut buf, flags) {
            Ok(n) => n,
            Err(nix::Error::EAGAIN) if pending.is_empty() => break,
            Err(nix::Error::EAGAIN) => return Err(NfnlError::NoAnswer),
            Err(nix::Error::EINTR) => continue,
            Err(e) => return Err(NfnlError::Socket(e)),
        };
        let mut off = 0;
        while off + 16 <= n {
            let len = u32::from_ne_bytes(buf[off..off + 4].try_into().expect("4 bytes")) as usize;
            let kind = u16::from_ne_bytes(buf[off + 4..off + 6].try_into().expect("2 bytes"));
            let seq = u32::from_ne_bytes(buf[off + 8..off + 12].try_into().expect("4 bytes"));
            if len < 16 || off + len > n {
                break;
            }
            if kind == NLMSG_ERROR && len >= 20 {
                let code = i32::from_ne_bytes(buf[off + 16..off + 20].try_into().expect("4 bytes"));
                if let Some(i) = pending.iter().position(|s| *s == seq) {
                    pending.swap_remove(i);
                }
                if code != 0 && first_error.is_none() {
                    first_error = Some(std::io::Error::from_raw_os_error(-code));
                    // The kernel aborts the whole batch; what else it says is read above.
                    pending.clear();
                }
            }
            off += (len + 3) & !3;
        }
    }
    match first_error {
        Some(e) => Err(NfnlError::Refused(e)),
        None => Ok(()),
    }
}

const NFTA_TABLE_NAME: u16 = 1;

const NFT_MSG_NEWTABLE: u16 = 0;
const NFT_MSG_GETTABLE: u16 = 1;
const NFTA_TABLE_HANDLE: u16 = 4;

/// The kernel's handle of table `inet <table>`, or `None` when there is no such table (one
/// request, answered while it is sent). A table deleted and made again, by us or by anyone,
/// has a new handle.
pub fn table_handle(table: &str) -> Result<Option<u64>, NfnlError> {
    let mut body = vec![];
    put_attr(&mut body, NFTA_TABLE_NAME, &cstr(table));
    let mut handle = None;
    let answered = request(
        NFT_MSG_GETTABLE,
        NLM_F_REQUEST | NLM_F_ACK,
        &body,
        8192,
        |kind, attrs_buf| {
            if kind == (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWTABLE {
                handle = attrs(attrs_buf)
                    .find(|(k, v)| *k == NFTA_TABLE_HANDLE && v.len() == 8)
                    .map(|(_, v)| u64::from_be_bytes(v.try_into().expect("8 bytes")));
            }
        },
    );
    match answered {
        Ok(()) => Ok(handle),
        Err(NfnlError::Refused(e)) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Sends one nftables request (`msg_type` in the inet family, `body` its attributes) and
/// hands each answer's attributes to `on_msg` with the message's type, until the dump's end
/// or the kernel's ack; an error the kernel answers with is returned. Blocking.
pub(super) fn request(
    msg_type: u16,
    flags: u16,
    body: &[u8],
    buf_size: usize,
    mut on_msg: impl FnMut(u16, &[u8]),
) -> Result<(), NfnlError> {
    let fd = open()?;
    let seq = first_seq();
    let mut msg = vec![];
    put_msg(
        &mut msg,
        (NFNL_SUBSYS_NFTABLES << 8) | msg_type,
        flags,
        seq,
        NFPROTO_INET,
        0,
        body,
    );
    size_buffers(&fd, msg.len(), 1024);
    send(fd.as_raw_fd(), &msg, MsgFlags::empty()).map_err(NfnlError::Socket)?;
    let mut buf = vec![0u8; buf_size];
    loop {
        let n = match recv(fd.as_raw_fd(), &mut buf, MsgFlags::empty()) {
            Ok(n) => n,
            Err(nix::Error::EAGAIN) => return Err(NfnlError::NoAnswer),
            Err(nix::Error::EINTR) => continue,
            Err(e) => return Err(NfnlError::Socket(e)),
        };
        let mut off = 0;
        while off + 16 <= n {
            let len = u32::from_ne_bytes(buf[off..off + 4].try_into().expect("4 bytes")) as usize;
            let kind = u16::from_ne_bytes(buf[off + 4..off + 6].try_into().expect("2 bytes"));
            if len < 16 || off + len > n {
                break;
            }
            match kind {
                NLMSG_DONE => return Ok(()),
                NLMSG_ERROR if len >= 20 => {
                    let code =
                        i32::from_ne_bytes(buf[off + 16..off + 20].try_into().expect("4 bytes"));
                    return match code {
                        0 => Ok(()),
                        _ => Err(NfnlError::Refused(std::io::Error::from_raw_os_error(-code))),
                    };
                }
                _ if len >= 20 => on_msg(kind, &buf[off + 20..off + len]),
                _ => {}
            }
            off += (len + 3) & !3;
        }
    }
}

/// The attributes in `buf`: (kind without the nested flag, payload), stopping at the first
/// malformed one.
pub(crate) fn attrs(buf: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    let mut off = 0;
    std::iter::from_fn(move || {
        if off + 4 > buf.len() {
            return None;
        }
        let len = u16::from_ne_bytes(buf[off..off + 2].try_into().ok()?) as usize;
        let kind = u16::from_ne_bytes(buf[off + 2..off + 4].try_into().ok()?) & !NLA_F_NESTED;
        if len < 4 || off + len > buf.len() {
            return None;
        }
        let payload = &buf[off + 4..off + len];
        off += (len + 3) & !3;
        Some((kind, payload))
    })
}

/// The string value of attribute `kind` among `attrs`.
fn attr_str(buf: &[u8], kind: u16) -> Option<&str> {
    let (_, v) = attrs(buf).find(|(k, _)| *k == kind)?;
    std::str::from_utf8(v.split(|b| *b == 0).next()?).ok()
}

const NFT_MSG_GETSETELEM: u16 = 13;
const NLM_F_DUMP: u16 = 0x300;
const NLMSG_DONE: u16 = 3;

/// The elements of one message's NFTA_SET_ELEM_LIST_ELEMENTS.
fn parse_elements(attrs_buf: &[u8], out: &mut Vec<Element>) {
    for (kind, list) in attrs(attrs_buf) {
        if kind != NFTA_SET_ELEM_LIST_ELEMENTS {
            continue;
        }
        for (_, elem) in attrs(list).filter(|(k, _)| *k == NFTA_LIST_ELEM) {
            let mut key = None;
            let mut end = false;
            let mut open = false;
            for (k, v) in attrs(elem) {
                match k {
                    NFTA_SET_ELEM_KEY => {
                        key = attrs(v)
                            .find(|(k, _)| *k == NFTA_DATA_VALUE)
                            .map(|(_, d)| d.to_vec());
                    }
                    NFTA_SET_ELEM_FLAGS if v.len() >= 4 => {
                        let flags = u32::from_be_bytes(v[..4].try_into().expect("4 bytes"));
                        end = flags & NFT_SET_ELEM_INTERVAL_END != 0;
                    }
                    NFTA_SET_ELEM_USERDATA => {
                        open = v.len() >= 6 && v[0] == NFTNL_UDATA_SET_ELEM_FLAGS && v[2] & 1 == 1
                    }
                    _ => {}
                }
            }
            if let Some(key) = key {
                out.push(Element { key, end, open });
            }
        }
    }
}

/// Every element of set `inet <table> <set>` as the kernel holds it (one dump). Blocking:
/// call it from a blocking thread.
pub fn dump_elements(table: &str, set: &str) -> Result<Vec<Element>, NfnlError> {
    let mut body = vec![];
    put_attr(&mut body, NFTA_SET_ELEM_LIST_TABLE, &cstr(table));
    put_attr(&mut body, NFTA_SET_ELEM_LIST_SET, &cstr(set));
    let mut out = vec![];
    request(
        NFT_MSG_GETSETELEM,
        NLM_F_REQUEST | NLM_F_DUMP,
        &body,
        1 << 20,
        |_, attrs_buf| parse_elements(attrs_buf, &mut out),
    )?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    #[test]
    fn attributes_are_found() {
        let mut b = vec![];
        put_attr(&mut b, 5, b"x");
        put_attr(&mut b, NFTA_TABLE_NAME, &cstr("rampart"));
        assert_eq!(attr_str(&b, NFTA_TABLE_NAME), Some("rampart"));
        assert_eq!(attr_str(&b, 9), None);
    }

    use super::*;

    #[test]
    fn batch_layout() {
        let changes = vec![SetChange {
            set: "as4_web".into(),
            delete: vec![],
            add: vec![
                Element {
                    key: vec![10, 0, 0, 0],
                    ..Element::default()
                },
                Element {
                    key: vec![10, 0, 1, 0],
                    end: true,
                    ..Element::default()
                },
            ],
        }];
        let (bytes, acked) = encode_batch("rampart", &changes, 100);
        assert_eq!(acked, vec![101]);
        // begin (20 bytes), then the element message, then end (20 bytes).
        assert_eq!(u32::from_ne_bytes(bytes[0..4].try_into().unwrap()), 20);
        assert_eq!(
            u16::from_ne_bytes(bytes[4..6].try_into().unwrap()),
            NFNL_MSG_BATCH_BEGIN
        );
        let msg_len = u32::from_ne_bytes(bytes[20..24].try_into().unwrap()) as usize;
        assert_eq!(
            u16::from_ne_bytes(bytes[24..26].try_into().unwrap()),
            (10 << 8) | 12
        );
        assert_eq!(bytes.len(), 20 + msg_len + 20);
        assert!(msg_len.is_multiple_of(4));
    }

    #[test]
    fn batches_decode_to_what_was_encoded() {
        let el = |k: u8, end| Element {
            key: vec![10, 0, 0, k],
            end,
            open: k == 7,
        };
        let changes = vec![
            SetChange {
                set: "as4_a".into(),
                delete: vec![el(1, false), el(2, true)],
                // More than one message's worth: joined again on decoding.
                add: (0..1300).map(|i| el((i % 250) as u8, i % 2 == 1)).collect(),
            },
            SetChange {
                set: "as6_b".into(),
                delete: vec![Element {
                    key: vec![0xfd; 16],
                    ..Element::default()
                }],
                add: vec![],
            },
        ];
        let (bytes, acked) = encode_batch("rampart-x", &changes, 7);
        assert_eq!(
            acked,
            vec![7 + 1 + 3 + 1],
            "only the last message asks for an ack"
        );
        let (table, back) = decode_batch(&bytes).unwrap();
        assert_eq!(table, "rampart-x");
        assert_eq!(back.len(), 2);
        for (a, b) in changes.iter().zip(&back) {
            assert_eq!((&a.set, &a.delete, &a.add), (&b.set, &b.delete, &b.add));
        }
        assert_eq!(
            decode_batch(&bytes[..bytes.len() - 20]),
            Err(BatchDecodeError::NoEnd)
        );
        assert_eq!(
            decode_batch(&bytes[..bytes.len() - 1]),
            Err(BatchDecodeError::BadLength(bytes.len() - 20))
        );
    }
}
