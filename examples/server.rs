//! The crate's `TestServer` as a standalone Quorum Quest server, to run the
//! other examples (or the Go and Python clients) against.
//!
//! ```text
//! cargo run --features testing --example server -- --port 5050 --default-ttl 15
//! RUST_LOG=debug cargo run --features testing --example server -- --max-connection-age 30
//! ```
//!
//! Every call is logged (rpc, service, domain, client_id, ttl, answer). Stop it
//! with Ctrl+C.

#[path = "common/signal.rs"]
mod signal;

use std::time::Duration;

use clap::Parser;
use quorum_quest_client::testing::TestServer;
use tracing_subscriber::EnvFilter;

/// An in-memory Quorum Quest leader election server (for development and tests).
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// TCP port to listen on, on 127.0.0.1.
    #[arg(long, default_value_t = 5050)]
    port: u16,

    /// Lease in seconds granted when a request carries ttl <= 0.
    #[arg(long, default_value_t = 15)]
    default_ttl: u64,

    /// Close every connection (HTTP/2 GOAWAY) after this many seconds, like the
    /// real server's MaxConnectionAge.
    #[arg(long)]
    max_connection_age: Option<u64>,
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .init();

    let args = Args::parse();
    let mut builder = TestServer::builder()
        .port(args.port)
        .default_ttl(Duration::from_secs(args.default_ttl));
    if let Some(age) = args.max_connection_age {
        builder = builder.max_connection_age(Duration::from_secs(age));
    }
    let server = builder.start().await?;
    println!("Quorum Quest test server listening on {}", server.url());

    let which = signal::shutdown_signal().await?;
    println!("{which}: shutting down");
    server.shutdown().await;
    Ok(())
}
