//! The only code that touches the host: nftables, rtnetlink and network namespaces.

pub mod netns;
pub mod nfnl;
pub mod nft;
pub mod rtnl;
