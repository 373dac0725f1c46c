//! The generic kernel plumbing: nftables, nfnetlink, conntrack, the host's view through
//! rtnetlink, network namespaces. Domain types stay out (the routers' kernel side is
//! `router::kernel`).

pub mod conntrack;
pub mod hostview;
pub mod netns;
pub mod nfnl;
pub mod nfrule;
pub mod nft;
pub mod nftrace;

/// Gives the pages of freed heap memory back to the kernel. After a large rule set the
/// heap is left with holes where the decoded JSON was (many small blocks between the ones
/// the rule set keeps), which glibc would otherwise hold as resident memory until the next
/// large command reused them, on top of what that one needs. A few milliseconds of work:
/// call it from a blocking thread.
#[allow(unsafe_code)]
pub fn trim_heap() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only releases free memory of the allocator's own arenas; it takes
    // the arena locks itself and is safe to call at any time from any thread.
    unsafe {
        nix::libc::malloc_trim(0);
    }
}
