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

fn main() {
    let cli = rampart::cli::Cli::parse();
    if !matches!(cli.command, rampart::cli::Command::Run) {
        default_sigpipe();
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
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
