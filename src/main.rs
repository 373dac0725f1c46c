use clap::Parser;

/// Inspection commands die quietly when their reader goes away (`rampart ... | head`), like
/// other Unix tools. The daemon keeps Rust's default (SIGPIPE ignored): a closed pipe to a
/// child must be an error there, not death.
#[allow(unsafe_code)]
fn default_sigpipe() {
    use nix::sys::signal::{SigHandler, Signal, signal};
    // SAFETY: called first thing in main, before any other thread exists; SIG_DFL is not a
    // Rust handler, so no handler code can run concurrently with anything.
    let _ = unsafe { signal(Signal::SIGPIPE, SigHandler::SigDfl) };
}

/// At most two malloc arenas. glibc gives each thread that allocates an arena of its own (up
/// to eight per core), and their freed pages stay resident: on a hypervisor with many cores
/// that multiplies the idle agent's memory for no gain, its work being one command at a
/// time. And a fixed mmap threshold: glibc raises it (up to 32 MiB) each time a large block
/// is freed, after which a large rule set's buffers (body, rendered text, snapshot) come
/// from the heap and leave it fragmented instead of going back to the kernel when freed.
/// `MALLOC_ARENA_MAX` / `MALLOC_MMAP_THRESHOLD_` in the environment still win (glibc reads
/// them at start; each setting here runs only when its variable is unset).
#[allow(unsafe_code)]
fn tune_malloc() {
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        // SAFETY: mallopt only sets an allocator parameter; called first thing in main,
        // before any other thread exists.
        let _ = unsafe { nix::libc::mallopt(nix::libc::M_ARENA_MAX, 2) };
    }
    if std::env::var_os("MALLOC_MMAP_THRESHOLD_").is_none() {
        // SAFETY: as above.
        let _ = unsafe { nix::libc::mallopt(nix::libc::M_MMAP_THRESHOLD, 256 * 1024) };
    }
}

/// Worker threads of the runtime: the agent handles one command at a time and waits on the
/// broker and the kernel, so two are plenty whatever the host's core count (each idle
/// worker costs its stack and its arena). Blocking work (netlink batches, file syncs) has
/// tokio's separate, on-demand pool.
const WORKER_THREADS: usize = 2;

fn main() {
    tune_malloc();
    let cli = rampart::cli::Cli::parse();
    if !matches!(cli.command, rampart::cli::Command::Run) {
        default_sigpipe();
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(WORKER_THREADS)
        .enable_all()
        .build()
        .expect("building the tokio runtime");
    let code = match runtime.block_on(rampart::cli::main(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("rampart: {e:#}");
            1
        }
    };
    // Do not wait for detached tasks (AMQP I/O threads) once the work is done.
    runtime.shutdown_timeout(std::time::Duration::from_secs(2));
    std::process::exit(code);
}
