//! The only code that touches the host: nftables (and, later, netlink and namespaces).

pub mod nfnl;
pub mod nft;
