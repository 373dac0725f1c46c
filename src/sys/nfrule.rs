//! nftables rules over nfnetlink: the few expressions a firewall needs, rule additions at a
//! position and deletions by handle, anonymous sets, one chain's rules read back, all in
//! one batch (one kernel transaction). What each expression means is nftables' business;
//! what rule to build from them is the caller's.

use super::nfnl::{
    self, Batch, Element, NfnlError, SetChange, attrs, begin_nested, cstr, end_nested, put_attr,
};

const NFT_MSG_NEWRULE: u16 = 6;
const NFT_MSG_GETRULE: u16 = 7;
const NFT_MSG_DELRULE: u16 = 8;
const NFT_MSG_NEWSET: u16 = 9;
const NFT_MSG_DELSET: u16 = 11;
const NFT_MSG_NEWGEN: u16 = 15;
const NFT_MSG_GETGEN: u16 = 16;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_APPEND: u16 = 0x800;
const NLM_F_CREATE: u16 = 0x400;
const NLM_F_DUMP: u16 = 0x300;

const NFTA_RULE_TABLE: u16 = 1;
const NFTA_RULE_CHAIN: u16 = 2;
const NFTA_RULE_HANDLE: u16 = 3;
const NFTA_RULE_EXPRESSIONS: u16 = 4;
const NFTA_RULE_POSITION: u16 = 6;
const NFTA_RULE_USERDATA: u16 = 7;
const NFTA_LIST_ELEM: u16 = 1;
const NFTA_EXPR_NAME: u16 = 1;
const NFTA_EXPR_DATA: u16 = 2;
const NFTA_COUNTER_BYTES: u16 = 1;
const NFTA_COUNTER_PACKETS: u16 = 2;
const NFTA_DATA_VALUE: u16 = 1;
const NFTA_DATA_VERDICT: u16 = 2;
const NFTA_VERDICT_CODE: u16 = 1;
const NFTA_VERDICT_CHAIN: u16 = 2;
const NFT_JUMP: i32 = -3;
const NFTA_GEN_ID: u16 = 1;
const NFTNL_UDATA_RULE_COMMENT: u8 = 0;

const NFTA_SET_TABLE: u16 = 1;
const NFTA_SET_NAME: u16 = 2;
const NFTA_SET_FLAGS: u16 = 3;
const NFTA_SET_KEY_TYPE: u16 = 4;
const NFTA_SET_KEY_LEN: u16 = 5;
const NFTA_SET_DESC: u16 = 9;
const NFTA_SET_ID: u16 = 10;
const NFTA_SET_USERDATA: u16 = 13;
const NFTA_SET_DESC_SIZE: u16 = 1;
const NFT_SET_ANONYMOUS: u32 = 0x1;
const NFT_SET_CONSTANT: u32 = 0x2;
const NFT_SET_INTERVAL: u32 = 0x4;
const NFTNL_UDATA_SET_KEYBYTEORDER: u8 = 0;
const NFTNL_UDATA_SET_MERGE_ELEMENTS: u8 = 2;
/// nft's `enum byteorder`: keys of the sets made here are in network order.
const BYTEORDER_BIG_ENDIAN: u32 = 2;
/// The one data register the expressions here use (16 bytes wide).
const REG_1: u32 = 1;
const REG_VERDICT: u32 = 0;

/// Meta keys (`meta load KEY`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetaKey {
    /// The input interface's index.
    Iif = 4,
    /// The output interface's index.
    Oif = 5,
    /// The input interface's name.
    IifName = 6,
    /// The output interface's name.
    OifName = 7,
    /// The family (IPv4 or IPv6, in an `inet` table).
    NfProto = 15,
    /// The transport protocol number.
    L4Proto = 16,
}

/// Comparison operators of `cmp`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CmpOp {
    /// Equal.
    Eq = 0,
    /// Not equal.
    Neq = 1,
    /// At most (network byte order).
    Lte = 3,
    /// At least (network byte order).
    Gte = 5,
}

/// Payload bases of `payload load`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PayloadBase {
    /// The IP header.
    Network = 1,
    /// The TCP or UDP header.
    Transport = 2,
}

/// A set a `lookup` reads: a named one, or an anonymous one made in the same batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SetRef {
    /// A named set of the table.
    Named(String),
    /// An anonymous set of the same batch, by its id.
    Anonymous(u32),
}

/// One nftables expression, all reading and writing register 1.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expr {
    /// `meta load <key>`.
    Meta(MetaKey),
    /// `ct load state`: the connection's state bits, host byte order.
    CtState,
    /// Compares the register with a value; the rule stops here when it fails.
    Cmp(CmpOp, Vec<u8>),
    /// `payload load`: `len` bytes at `offset` of a header.
    Payload {
        /// Which header.
        base: PayloadBase,
        /// Where in it.
        offset: u32,
        /// How many bytes.
        len: u32,
    },
    /// `reg = (reg & mask) ^ 0`, over the mask's length.
    Mask(Vec<u8>),
    /// Whether the register is in a set; the rule stops here when it is not.
    Lookup(SetRef),
    /// A counter, starting from the given values (a rule made anew that carries on the
    /// count of the rule it replaces).
    Counter(Counts),
    /// Packets per `unit_s` seconds, with `burst` packets.
    Limit {
        /// Packets per unit.
        rate: u64,
        /// The unit, in seconds.
        unit_s: u64,
        /// Packets allowed above the rate at once.
        burst: u32,
    },
    /// `log prefix <prefix> level <level>`.
    Log {
        /// The prefix of the log line (the rule id, for `rampart trace` and operators).
        prefix: String,
        /// The syslog level.
        level: u32,
    },
    /// `reject` of kind `NFT_REJECT_*` with an ICMP(x) code.
    Reject {
        /// `NFT_REJECT_*`: ICMP, TCP reset, ICMPx.
        kind: u32,
        /// The ICMP(x) code.
        code: u8,
    },
    /// An immediate verdict: `NF_DROP` 0, `NF_ACCEPT` 1.
    Verdict(u32),
    /// `jump <chain>`.
    Jump(String),
}

fn be32(v: u32) -> [u8; 4] {
    v.to_be_bytes()
}

fn data(buf: &mut Vec<u8>, kind: u16, value: &[u8]) {
    let at = begin_nested(buf, kind);
    put_attr(buf, NFTA_DATA_VALUE, value);
    end_nested(buf, at);
}

impl Expr {
    fn name(&self) -> &'static str {
        match self {
            Expr::Meta(_) => "meta",
            Expr::CtState => "ct",
            Expr::Cmp(..) => "cmp",
            Expr::Payload { .. } => "payload",
            Expr::Mask(_) => "bitwise",
            Expr::Lookup(_) => "lookup",
            Expr::Counter(_) => "counter",
            Expr::Limit { .. } => "limit",
            Expr::Log { .. } => "log",
            Expr::Reject { .. } => "reject",
            Expr::Verdict(_) | Expr::Jump(_) => "immediate",
        }
    }

    /// The expression's attributes (NFTA_EXPR_DATA's content).
    fn encode(&self, b: &mut Vec<u8>) {
        match self {
            Expr::Meta(key) => {
                put_attr(b, 1, &be32(REG_1)); // NFTA_META_DREG
                put_attr(b, 2, &be32(*key as u32)); // NFTA_META_KEY
            }
            Expr::CtState => {
                put_attr(b, 1, &be32(REG_1)); // NFTA_CT_DREG
                put_attr(b, 2, &be32(0)); // NFTA_CT_KEY: NFT_CT_STATE
            }
            Expr::Cmp(op, value) => {
                put_attr(b, 1, &be32(REG_1)); // NFTA_CMP_SREG
                put_attr(b, 2, &be32(*op as u32)); // NFTA_CMP_OP
                data(b, 3, value); // NFTA_CMP_DATA
            }
            Expr::Payload { base, offset, len } => {
                put_attr(b, 1, &be32(REG_1)); // NFTA_PAYLOAD_DREG
                put_attr(b, 2, &be32(*base as u32)); // NFTA_PAYLOAD_BASE
                put_attr(b, 3, &be32(*offset)); // NFTA_PAYLOAD_OFFSET
                put_attr(b, 4, &be32(*len)); // NFTA_PAYLOAD_LEN
            }
            Expr::Mask(mask) => {
                put_attr(b, 1, &be32(REG_1)); // NFTA_BITWISE_SREG
                put_attr(b, 2, &be32(REG_1)); // NFTA_BITWISE_DREG
                put_attr(b, 3, &be32(mask.len() as u32)); // NFTA_BITWISE_LEN
                data(b, 4, mask); // NFTA_BITWISE_MASK
                data(b, 5, &vec![0; mask.len()]); // NFTA_BITWISE_XOR
            }
            Expr::Lookup(set) => {
                put_attr(b, 2, &be32(REG_1)); // NFTA_LOOKUP_SREG
                match set {
                    SetRef::Named(name) => put_attr(b, 1, &cstr(name)), // NFTA_LOOKUP_SET
                    SetRef::Anonymous(id) => {
                        put_attr(b, 1, &cstr(ANON_SET_NAME));
                        put_attr(b, 4, &be32(*id)); // NFTA_LOOKUP_SET_ID
                    }
                }
            }
            Expr::Counter(c) => {
                put_attr(b, NFTA_COUNTER_BYTES, &c.bytes.to_be_bytes());
                put_attr(b, NFTA_COUNTER_PACKETS, &c.packets.to_be_bytes());
            }
            Expr::Limit {
                rate,
                unit_s,
                burst,
            } => {
                put_attr(b, 1, &rate.to_be_bytes()); // NFTA_LIMIT_RATE
                put_attr(b, 2, &unit_s.to_be_bytes()); // NFTA_LIMIT_UNIT
                put_attr(b, 3, &be32(*burst)); // NFTA_LIMIT_BURST
                put_attr(b, 4, &be32(0)); // NFTA_LIMIT_TYPE: packets
                put_attr(b, 5, &be32(0)); // NFTA_LIMIT_FLAGS
            }
            Expr::Log { prefix, level } => {
                put_attr(b, 2, &cstr(prefix)); // NFTA_LOG_PREFIX
                put_attr(b, 5, &be32(*level)); // NFTA_LOG_LEVEL
            }
            Expr::Reject { kind, code } => {
                put_attr(b, 1, &be32(*kind)); // NFTA_REJECT_TYPE
                put_attr(b, 2, &[*code]); // NFTA_REJECT_ICMP_CODE
            }
            Expr::Verdict(code) => {
                put_attr(b, 1, &be32(REG_VERDICT)); // NFTA_IMMEDIATE_DREG
                let d = begin_nested(b, 2); // NFTA_IMMEDIATE_DATA
                let v = begin_nested(b, NFTA_DATA_VERDICT);
                put_attr(b, NFTA_VERDICT_CODE, &be32(*code));
                end_nested(b, v);
                end_nested(b, d);
            }
            Expr::Jump(chain) => {
                put_attr(b, 1, &be32(REG_VERDICT));
                let d = begin_nested(b, 2);
                let v = begin_nested(b, NFTA_DATA_VERDICT);
                put_attr(b, NFTA_VERDICT_CODE, &NFT_JUMP.to_be_bytes());
                put_attr(b, NFTA_VERDICT_CHAIN, &cstr(chain));
                end_nested(b, v);
                end_nested(b, d);
            }
        }
    }
}

/// The name the kernel turns into `__set<N>` for an anonymous set.
const ANON_SET_NAME: &str = "__set%d";

/// An anonymous, constant set made for one rule (`tcp dport { 22, 80 }`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AnonSet {
    /// Unique within the batch; the rule's lookup names it.
    pub id: u32,
    /// nft's datatype number of the key (7 ipv4_addr, 8 ipv6_addr, 13 inet_service).
    pub key_type: u32,
    /// The key's length in bytes.
    pub key_len: u32,
    /// Its elements are intervals (addresses with prefixes, port ranges).
    pub interval: bool,
    /// Its elements.
    pub elements: Vec<Element>,
}

/// A rule to add to `chain`: before the rule with handle `before`, or at the end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewRule {
    /// Its expressions, in order.
    pub exprs: Vec<Expr>,
    /// The anonymous sets its lookups read, made in the same batch.
    pub sets: Vec<AnonSet>,
    /// Its comment (the rule id), in the rule's user data.
    pub comment: Option<String>,
    /// The handle of the rule to insert it before; `None`: at the end.
    pub before: Option<u64>,
}

impl NewRule {
    /// Starts the rule's counter from `c`.
    pub fn seed_counter(&mut self, c: Counts) {
        for e in &mut self.exprs {
            if let Expr::Counter(slot) = e {
                *slot = c;
                return;
            }
        }
    }
}

/// A counter's values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Counts {
    /// Packets counted.
    pub packets: u64,
    /// Bytes counted.
    pub bytes: u64,
}

impl std::ops::AddAssign for Counts {
    fn add_assign(&mut self, o: Counts) {
        self.packets = self.packets.saturating_add(o.packets);
        self.bytes = self.bytes.saturating_add(o.bytes);
    }
}

/// A rule as the kernel lists it: its handle, its comment and its counters' sum.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListedRule {
    /// Its chain.
    pub chain: String,
    /// Its handle.
    pub handle: u64,
    /// Its comment.
    pub comment: Option<String>,
    /// The sum of its counters.
    pub counts: Counts,
}

/// The sum of the counter expressions in a rule's `NFTA_RULE_EXPRESSIONS`.
fn counts_of(exprs: &[u8]) -> Counts {
    let mut total = Counts::default();
    for (k, elem) in attrs(exprs) {
        if k != NFTA_LIST_ELEM {
            continue;
        }
        let mut name = None;
        let mut data = None;
        for (k, v) in attrs(elem) {
            match k {
                NFTA_EXPR_NAME => name = Some(v),
                NFTA_EXPR_DATA => data = Some(v),
                _ => {}
            }
        }
        if name.map(|n| n.split(|b| *b == 0).next() == Some(b"counter")) != Some(true) {
            continue;
        }
        for (k, v) in attrs(data.unwrap_or(&[])) {
            let Ok(bytes) = <[u8; 8]>::try_from(v) else {
                continue;
            };
            match k {
                NFTA_COUNTER_BYTES => total.bytes += u64::from_be_bytes(bytes),
                NFTA_COUNTER_PACKETS => total.packets += u64::from_be_bytes(bytes),
                _ => {}
            }
        }
    }
    total
}

fn rule_head(b: &mut Vec<u8>, table: &str, chain: &str) {
    put_attr(b, NFTA_RULE_TABLE, &cstr(table));
    put_attr(b, NFTA_RULE_CHAIN, &cstr(chain));
}

fn set_body(table: &str, s: &AnonSet) -> Vec<u8> {
    let mut b = vec![];
    put_attr(&mut b, NFTA_SET_TABLE, &cstr(table));
    put_attr(&mut b, NFTA_SET_NAME, &cstr(ANON_SET_NAME));
    let mut flags = NFT_SET_ANONYMOUS | NFT_SET_CONSTANT;
    if s.interval {
        flags |= NFT_SET_INTERVAL;
    }
    put_attr(&mut b, NFTA_SET_FLAGS, &be32(flags));
    put_attr(&mut b, NFTA_SET_KEY_TYPE, &be32(s.key_type));
    put_attr(&mut b, NFTA_SET_KEY_LEN, &be32(s.key_len));
    put_attr(&mut b, NFTA_SET_ID, &be32(s.id));
    let desc = begin_nested(&mut b, NFTA_SET_DESC);
    put_attr(&mut b, NFTA_SET_DESC_SIZE, &be32(s.elements.len() as u32));
    end_nested(&mut b, desc);
    let mut udata = vec![NFTNL_UDATA_SET_KEYBYTEORDER, 4];
    udata.extend_from_slice(&BYTEORDER_BIG_ENDIAN.to_ne_bytes());
    if s.interval {
        udata.extend_from_slice(&[NFTNL_UDATA_SET_MERGE_ELEMENTS, 4]);
        udata.extend_from_slice(&1u32.to_ne_bytes());
    }
    put_attr(&mut b, NFTA_SET_USERDATA, &udata);
    b
}

fn new_rule_body(table: &str, chain: &str, r: &NewRule) -> Vec<u8> {
    let mut b = vec![];
    rule_head(&mut b, table, chain);
    if let Some(h) = r.before {
        put_attr(&mut b, NFTA_RULE_POSITION, &h.to_be_bytes());
    }
    let list = begin_nested(&mut b, NFTA_RULE_EXPRESSIONS);
    for e in &r.exprs {
        let item = begin_nested(&mut b, NFTA_LIST_ELEM);
        put_attr(&mut b, NFTA_EXPR_NAME, &cstr(e.name()));
        let d = begin_nested(&mut b, NFTA_EXPR_DATA);
        e.encode(&mut b);
        end_nested(&mut b, d);
        end_nested(&mut b, item);
    }
    end_nested(&mut b, list);
    if let Some(c) = &r.comment {
        let text = cstr(c);
        let mut udata = vec![NFTNL_UDATA_RULE_COMMENT, text.len() as u8];
        udata.extend_from_slice(&text);
        put_attr(&mut b, NFTA_RULE_USERDATA, &udata);
    }
    b
}

/// A batch of nftables object changes in table `inet <table>`, built message by message
/// (a whole rule set is encoded straight into it, never held as objects).
pub struct TableBatch<'a> {
    table: &'a str,
    batch: Batch,
}

const NFT_MSG_NEWTABLE: u16 = 0;
const NFT_MSG_DELTABLE: u16 = 2;
const NFT_MSG_NEWCHAIN: u16 = 3;
const NFTA_TABLE_NAME: u16 = 1;
const NFTA_CHAIN_TABLE: u16 = 1;
const NFTA_CHAIN_NAME: u16 = 3;
const NFTA_CHAIN_HOOK: u16 = 4;
const NFTA_CHAIN_POLICY: u16 = 5;
const NFTA_CHAIN_TYPE: u16 = 7;
const NFTA_HOOK_HOOKNUM: u16 = 1;
const NFTA_HOOK_PRIORITY: u16 = 2;

/// A base chain's hook: `type filter hook <hook> priority filter; policy accept;`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FilterHook {
    /// Packets to the host.
    Input = 1,
    /// Packets through the host.
    Forward = 2,
    /// Packets from the host.
    Output = 3,
}

/// A named interval set of addresses (`type ipv4_addr; flags interval;`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NamedSet<'n> {
    /// Its name in the table.
    pub name: &'n str,
    /// Unique within the batch: the rules made in the same batch name it by this.
    pub id: u32,
    /// nft's datatype number of the key (7 ipv4_addr, 8 ipv6_addr).
    pub key_type: u32,
    /// The key's length in bytes.
    pub key_len: u32,
}

impl<'a> TableBatch<'a> {
    /// With `genid`, the kernel refuses the batch if the rule set is no longer at that
    /// generation.
    pub fn new(table: &'a str, genid: Option<u32>, first_seq: u32) -> TableBatch<'a> {
        TableBatch {
            table,
            batch: Batch::begin(first_seq, genid),
        }
    }

    fn table_msg(&mut self, kind: u16, flags: u16) {
        let mut b = vec![];
        put_attr(&mut b, NFTA_TABLE_NAME, &cstr(self.table));
        self.batch.push(kind, flags, &b);
    }

    /// `add table`: made if missing, left as it is if not.
    pub fn add_table(&mut self) {
        self.table_msg(NFT_MSG_NEWTABLE, NLM_F_CREATE);
    }

    /// `delete table`, with everything in it.
    pub fn delete_table(&mut self) {
        self.table_msg(NFT_MSG_DELTABLE, 0);
    }

    /// A chain; a base chain with `hook` (filter type, priority 0, policy accept).
    pub fn add_chain(&mut self, name: &str, hook: Option<FilterHook>) {
        let mut b = vec![];
        put_attr(&mut b, NFTA_CHAIN_TABLE, &cstr(self.table));
        put_attr(&mut b, NFTA_CHAIN_NAME, &cstr(name));
        if let Some(h) = hook {
            let at = begin_nested(&mut b, NFTA_CHAIN_HOOK);
            put_attr(&mut b, NFTA_HOOK_HOOKNUM, &be32(h as u32));
            put_attr(&mut b, NFTA_HOOK_PRIORITY, &be32(0));
            end_nested(&mut b, at);
            put_attr(&mut b, NFTA_CHAIN_POLICY, &be32(1)); // NF_ACCEPT
            put_attr(&mut b, NFTA_CHAIN_TYPE, &cstr("filter"));
        }
        self.batch.push(NFT_MSG_NEWCHAIN, NLM_F_CREATE, &b);
    }

    /// A named interval set with its elements.
    pub fn add_named_set(&mut self, set: NamedSet, elements: &[Element]) {
        let mut b = vec![];
        put_attr(&mut b, NFTA_SET_TABLE, &cstr(self.table));
        put_attr(&mut b, NFTA_SET_NAME, &cstr(set.name));
        put_attr(&mut b, NFTA_SET_FLAGS, &be32(NFT_SET_INTERVAL));
        put_attr(&mut b, NFTA_SET_KEY_TYPE, &be32(set.key_type));
        put_attr(&mut b, NFTA_SET_KEY_LEN, &be32(set.key_len));
        put_attr(&mut b, NFTA_SET_ID, &be32(set.id));
        let mut udata = vec![NFTNL_UDATA_SET_KEYBYTEORDER, 4];
        udata.extend_from_slice(&BYTEORDER_BIG_ENDIAN.to_ne_bytes());
        put_attr(&mut b, NFTA_SET_USERDATA, &udata);
        self.batch.push(NFT_MSG_NEWSET, NLM_F_CREATE, &b);
        self.elements(set.name, Some(set.id), elements, &[]);
    }

    /// `delete set`: the set and its elements (no rule may still use it).
    pub fn delete_set(&mut self, name: &str) {
        let mut b = vec![];
        put_attr(&mut b, NFTA_SET_TABLE, &cstr(self.table));
        put_attr(&mut b, NFTA_SET_NAME, &cstr(name));
        self.batch.push(NFT_MSG_DELSET, 0, &b);
    }

    /// Element changes of a set (`set_id`: one made earlier in this batch).
    pub fn elements(
        &mut self,
        set: &str,
        set_id: Option<u32>,
        add: &[Element],
        delete: &[Element],
    ) {
        if add.is_empty() && delete.is_empty() {
            return;
        }
        let change = SetChange {
            set: set.to_string(),
            delete: delete.to_vec(),
            add: add.to_vec(),
        };
        self.batch.push_elements(self.table, &change, set_id);
    }

    /// A rule with its anonymous sets, before `r.before` or at the end of `chain`.
    pub fn add_rule(&mut self, chain: &str, r: &NewRule) {
        for s in &r.sets {
            self.batch
                .push(NFT_MSG_NEWSET, NLM_F_CREATE, &set_body(self.table, s));
            let change = SetChange {
                set: ANON_SET_NAME.to_string(),
                delete: vec![],
                add: s.elements.clone(),
            };
            self.batch.push_elements(self.table, &change, Some(s.id));
        }
        // Without a position, NLM_F_APPEND adds at the end; with one and without the flag,
        // the kernel inserts before that rule.
        let flags = NLM_F_CREATE | if r.before.is_none() { NLM_F_APPEND } else { 0 };
        self.batch
            .push(NFT_MSG_NEWRULE, flags, &new_rule_body(self.table, chain, r));
    }

    /// Deletes the rule with handle `handle` from `chain`.
    pub fn delete_rule(&mut self, chain: &str, handle: u64) {
        let mut b = vec![];
        rule_head(&mut b, self.table, chain);
        put_attr(&mut b, NFTA_RULE_HANDLE, &handle.to_be_bytes());
        self.batch.push(NFT_MSG_DELRULE, 0, &b);
    }

    /// The bytes to send and the sequence numbers that expect an ack.
    pub fn finish(self) -> (Vec<u8>, Vec<u32>) {
        self.batch.finish()
    }

    /// Sends the batch and waits for the kernel's answer. Blocking.
    pub fn send(self) -> Result<(), NfnlError> {
        let (bytes, pending) = self.finish();
        nfnl::send_batch(&bytes, pending)
    }
}

/// The rule set's generation: it changes with every committed transaction.
pub fn generation() -> Result<u32, NfnlError> {
    let mut genid = None;
    nfnl::request(
        NFT_MSG_GETGEN,
        NLM_F_REQUEST | NLM_F_ACK,
        &[],
        8192,
        |kind, body| {
            if kind & 0xff == NFT_MSG_NEWGEN {
                genid = attrs(body)
                    .find(|(k, v)| *k == NFTA_GEN_ID && v.len() == 4)
                    .map(|(_, v)| u32::from_be_bytes(v.try_into().expect("4 bytes")));
            }
        },
    )?;
    genid.ok_or(NfnlError::NoAnswer)
}

/// The comment of a rule's user data, if it has one.
fn comment_of(udata: &[u8]) -> Option<String> {
    let mut off = 0;
    while off + 2 <= udata.len() {
        let (kind, len) = (udata[off], udata[off + 1] as usize);
        let value = udata.get(off + 2..off + 2 + len)?;
        if kind == NFTNL_UDATA_RULE_COMMENT {
            let text = value.split(|b| *b == 0).next()?;
            return std::str::from_utf8(text).ok().map(str::to_string);
        }
        off += 2 + len;
    }
    None
}

/// The rules of chain `inet <table> <chain>` in order (one dump of that chain alone), or
/// of the whole table when `chain` is `None`, with their handles, comments and counters.
/// Blocking.
pub fn list_rules(table: &str, chain: Option<&str>) -> Result<Vec<ListedRule>, NfnlError> {
    let mut body = vec![];
    put_attr(&mut body, NFTA_RULE_TABLE, &cstr(table));
    if let Some(chain) = chain {
        put_attr(&mut body, NFTA_RULE_CHAIN, &cstr(chain));
    }
    let mut out = vec![];
    nfnl::request(
        NFT_MSG_GETRULE,
        NLM_F_REQUEST | NLM_F_DUMP,
        &body,
        1 << 20,
        |kind, attrs_buf| {
            if kind & 0xff != NFT_MSG_NEWRULE {
                return;
            }
            let mut handle = None;
            let mut comment = None;
            let mut chain = String::new();
            let mut counts = Counts::default();
            for (k, v) in attrs(attrs_buf) {
                match k {
                    NFTA_RULE_HANDLE if v.len() == 8 => {
                        handle = Some(u64::from_be_bytes(v.try_into().expect("8 bytes")));
                    }
                    NFTA_RULE_CHAIN => {
                        let name = v.split(|b| *b == 0).next().unwrap_or_default();
                        chain = String::from_utf8_lossy(name).into_owned();
                    }
                    NFTA_RULE_EXPRESSIONS => counts = counts_of(v),
                    NFTA_RULE_USERDATA => comment = comment_of(v),
                    _ => {}
                }
            }
            if let Some(handle) = handle {
                out.push(ListedRule {
                    chain,
                    handle,
                    comment,
                    counts,
                });
            }
        },
    )?;
    Ok(out)
}

/// The rules of one chain (see [`list_rules`]).
pub fn list_chain(table: &str, chain: &str) -> Result<Vec<ListedRule>, NfnlError> {
    list_rules(table, Some(chain))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn comments_are_read_back_from_user_data() {
        let mut udata = vec![1, 2, 9, 9, NFTNL_UDATA_RULE_COMMENT, 4];
        udata.extend_from_slice(b"r-1\0");
        assert_eq!(comment_of(&udata).as_deref(), Some("r-1"));
        assert_eq!(comment_of(&[NFTNL_UDATA_RULE_COMMENT, 9, b'x']), None);
        assert_eq!(comment_of(&[]), None);
    }

    #[test]
    fn a_positioned_rule_is_inserted_and_an_unpositioned_one_appended() {
        let rule = |before| NewRule {
            exprs: vec![Expr::Counter(Counts::default()), Expr::Verdict(1)],
            sets: vec![],
            comment: Some("r".into()),
            before,
        };
        let mut batch = TableBatch::new("rampart", Some(3), 10);
        batch.delete_rule("in_0", 7);
        batch.add_rule("in_0", &rule(Some(9)));
        batch.add_rule("in_0", &rule(None));
        let (bytes, acked) = batch.finish();
        assert_eq!(acked, vec![13], "the last message asks for the ack");
        let flags_of = |at: usize| u16::from_ne_bytes(bytes[at + 6..at + 8].try_into().unwrap());
        let len_of = |at: usize| u32::from_ne_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
        let begin = len_of(0);
        assert_eq!(begin, 28, "the begin message carries the generation");
        let del = begin;
        let first = del + len_of(del);
        let second = first + len_of(first);
        assert_eq!(flags_of(first) & NLM_F_APPEND, 0);
        assert_eq!(flags_of(second) & NLM_F_APPEND, NLM_F_APPEND);
        assert_eq!(flags_of(del) & NLM_F_ACK, 0);
        assert_eq!(flags_of(second) & NLM_F_ACK, NLM_F_ACK);
    }
}
