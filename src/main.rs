use clap::Parser;

fn main() {
    let cli = rampart::cli::Cli::parse();
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
