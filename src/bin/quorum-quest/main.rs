//! `quorum-quest`: run a command only while this process leads a Quorum Quest
//! election, and kill it before anyone else can be elected; or run an
//! in-memory server to try it locally.
//!
//! Built with the `cli` feature:
//! `cargo run --features cli --bin quorum-quest -- run --service S --domain D -- CMD`.
//! Unix only (process groups and signals).
//!
//! Layout: `args` (flags, defaults, exit codes), `auth` (TLS and token
//! flags onto the client builder), `run` (the main loop over
//! the leadership stream), `supervise` (the command, and the runtime-free
//! kill path), `server` (`quorum-quest server`), `report` (stderr lines).

#[cfg(unix)]
mod args;
#[cfg(unix)]
mod auth;
#[cfg(unix)]
mod report;
#[cfg(unix)]
mod run;
#[cfg(unix)]
mod server;
#[cfg(unix)]
mod supervise;

#[cfg(not(unix))]
fn main() {
    eprintln!(
        "quorum-quest: unsupported platform: the tool needs Unix process groups and signals \
         (Linux, macOS, the BSDs). The quorum-quest-client library itself works here."
    );
    std::process::exit(125);
}

#[cfg(unix)]
fn main() {
    use std::time::Duration;

    use clap::Parser;
    use tracing_subscriber::EnvFilter;

    let cli = args::Cli::parse();
    let (quiet, default_filter) = match &cli.command {
        args::Command::Run(a) => (a.quiet, "error"),
        args::Command::Server(_) => (false, "info"),
    };
    report::init(quiet);
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter)),
        )
        .init();

    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            report::fatal(format!("cannot start the async runtime: {e}"));
            report::flush(Duration::from_secs(1));
            std::process::exit(args::EXIT_TOOL);
        }
    };
    let code = runtime.block_on(async move {
        match cli.command {
            args::Command::Run(a) => run::run(*a).await,
            args::Command::Server(a) => server::serve(a).await,
        }
    });
    report::flush(Duration::from_secs(1));
    // Background tasks (a release still waiting on a partitioned network) do
    // not hold the exit up.
    runtime.shutdown_timeout(Duration::from_millis(100));
    std::process::exit(code);
}
