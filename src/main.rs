//! The `edgecache` binary: glue only. Parses the command line, sets up
//! logging and the current-thread runtime, and maps errors to exit codes.

use clap::Parser;
use std::process::ExitCode;

fn main() -> ExitCode {
    let cli = edgecache::cli::Cli::parse();
    edgecache::cli::init_logging();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("edgecache: cannot start the runtime: {e}");
            return ExitCode::from(edgecache::cli::EXIT_SOFTWARE);
        }
    };
    let code = runtime.block_on(edgecache::cli::execute(cli));
    // A metadata request to an unreachable broker may still be running on
    // the blocking pool; dropping the runtime would wait for it (up to its
    // 10 s timeout), while systemd expects a prompt exit.
    runtime.shutdown_timeout(std::time::Duration::from_millis(500));
    code
}
