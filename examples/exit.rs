//! How a leader exits, and what each way of exiting guarantees.
//!
//! ```text
//! cargo run --example exit -- --server http://localhost:5050 --how shutdown
//! ```
//!
//! The program becomes leader (or waits until it is), then exits in the way
//! `--how` names; all but `signal` first wait for Enter (or the end of
//! standard input):
//!
//! - `signal` (the default): waits for SIGINT or SIGTERM, then calls
//!   `client.shutdown().await`: the lock is released, then the program exits.
//! - `shutdown`: calls `client.shutdown().await` and returns.
//! - `return`: returns from `main` with the client still in scope. Dropping
//!   the last handle of a leading client releases the lock before the drop
//!   returns, on a multi-thread runtime.
//! - `drop`: drops the client explicitly, then returns.
//! - `stream`: leads through a `leadership()` stream and returns with the
//!   stream and the client in scope.
//!
//! `--current-thread` runs on a current-thread runtime instead: there only
//! `shutdown` (and `signal`) release for sure, since a drop cannot block the
//! one thread that drives the connection (the release it starts is cut off
//! when the runtime shuts down, and the lock expires after its TTL).
//!
//! It prints `leading <client id>` once elected and `exiting` just before
//! `main` returns.

#[path = "common/signal.rs"]
mod signal;

use std::error::Error;
use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use futures::StreamExt;
use quorum_quest_client::{LeadershipEvent, LeadershipStreamExt, QuorumQuestClient};

type BoxError = Box<dyn Error + Send + Sync>;

#[derive(Debug, Clone, Copy, ValueEnum)]
enum How {
    Signal,
    Shutdown,
    Return,
    Drop,
    Stream,
}

/// Become leader, then exit in the chosen way.
#[derive(Parser, Debug)]
#[command(about)]
struct Args {
    /// The server address.
    #[arg(long, default_value = "http://localhost:5050")]
    server: String,
    /// The service name.
    #[arg(long, default_value = "exit-example")]
    service: String,
    /// The domain name.
    #[arg(long, default_value = "production")]
    domain: String,
    /// The lock TTL in seconds.
    #[arg(long, default_value_t = 15)]
    ttl: u64,
    /// How to exit once leader.
    #[arg(long, value_enum, default_value = "signal")]
    how: How,
    /// Run on a current-thread runtime.
    #[arg(long)]
    current_thread: bool,
}

/// Waits for Enter or the end of standard input.
async fn enter() -> Result<(), BoxError> {
    tokio::task::spawn_blocking(|| std::io::stdin().read_line(&mut String::new())).await??;
    Ok(())
}

fn say(line: &str) {
    // The test reading this waits for whole lines.
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

async fn run(args: Args) -> Result<(), BoxError> {
    let client = QuorumQuestClient::builder(args.service.clone(), args.domain.clone())
        .address(args.server.as_str())
        .ttl(Duration::from_secs(args.ttl))
        .build()
        .await?;

    if let How::Stream = args.how {
        let mut leadership = client.leadership();
        while let Some(event) = leadership.next().await {
            if let LeadershipEvent::Elected { .. } = event {
                say(&format!("leading {}", client.client_id()));
                break;
            }
        }
        enter().await?;
        say("exiting");
        // `leadership` and `client` are dropped here: the lock is released
        // before `main` returns (multi-thread runtime).
        return Ok(());
    }

    client.start_keep_alive().await?;
    let mut changes = client.leadership().leader_changes();
    while changes.next().await != Some(true) {}
    drop(changes);
    say(&format!("leading {}", client.client_id()));

    match args.how {
        How::Signal => {
            let which = signal::shutdown_signal().await?;
            say(&format!("{which}: releasing"));
            client.shutdown().await?;
        }
        How::Shutdown => {
            enter().await?;
            client.shutdown().await?;
        }
        How::Drop => {
            enter().await?;
            drop(client);
        }
        How::Return | How::Stream => enter().await?,
    }
    say("exiting");
    Ok(())
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let runtime = if args.current_thread {
        tokio::runtime::Builder::new_current_thread()
    } else {
        tokio::runtime::Builder::new_multi_thread()
    }
    .enable_all()
    .build();
    let outcome = match runtime {
        Ok(runtime) => runtime.block_on(run(args)),
        Err(e) => Err(e.into()),
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err}");
            ExitCode::FAILURE
        }
    }
}
