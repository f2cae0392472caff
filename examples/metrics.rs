//! Metrics in Prometheus text format: an election with a handover and a few
//! failed renewals, then one scrape.
//!
//! Installs `metrics-exporter-prometheus` as the recorder (before building
//! any client), runs two contenders for one lock against an in-process
//! server (or `--server URL`), makes the leader's next renewals fail, hands
//! the lock over, and prints what a Prometheus scrape of `/metrics` would
//! get, followed by each client's health line. Ends by itself in a few
//! seconds.
//!
//! ```text
//! cargo run --features testing,metrics --example metrics
//! ```
//!
//! To serve it, put `handle.render()` behind any HTTP route (axum, hyper,
//! warp...) with `Content-Type: text/plain; version=0.0.4`.

use std::error::Error;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use futures::StreamExt;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
use quorum_quest_client::metrics::{LEASE_REMAINING, RPC_DURATION};
use quorum_quest_client::testing::TestServer;
use quorum_quest_client::{LeadershipEvent, QuorumQuestClient, RpcKind};
use tokio::time::timeout;

type BoxError = Box<dyn Error + Send + Sync>;

/// Every wait of the demo is bounded by this.
const STEP_LIMIT: Duration = Duration::from_secs(20);

/// One election, scraped in Prometheus text format.
#[derive(Parser, Debug)]
#[command(about)]
struct Args {
    /// A Quorum Quest server to use instead of the in-process one (the
    /// failed renewals are then not injected).
    #[arg(long)]
    server: Option<String>,

    /// The service name.
    #[arg(long, default_value = "metrics-example")]
    service: String,

    /// The domain name.
    #[arg(long, default_value = "demo")]
    domain: String,
}

#[tokio::main]
async fn main() -> ExitCode {
    match run(Args::parse()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The next event matching `pred`, within [`STEP_LIMIT`].
async fn wait_for(
    stream: &mut quorum_quest_client::Leadership,
    what: &str,
    pred: impl Fn(&LeadershipEvent) -> bool,
) -> Result<LeadershipEvent, BoxError> {
    let found = timeout(STEP_LIMIT, async {
        while let Some(ev) = stream.next().await {
            if pred(&ev) {
                return Some(ev);
            }
        }
        None
    })
    .await;
    match found {
        Ok(Some(ev)) => Ok(ev),
        Ok(None) => Err(format!("the stream ended before {what}").into()),
        Err(_) => Err(format!("no {what} within {STEP_LIMIT:?}").into()),
    }
}

async fn run(args: Args) -> Result<(), BoxError> {
    // The recorder first: clients register their series when built.
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Full(RPC_DURATION.into()),
            &[0.0005, 0.001, 0.005, 0.025, 0.1, 0.5, 2.5],
        )?
        .set_buckets_for_metric(
            Matcher::Full(LEASE_REMAINING.into()),
            &[0.25, 0.5, 1.0, 2.0, 5.0, 10.0],
        )?
        .install_recorder()?;

    let server = match &args.server {
        Some(_) => None,
        None => Some(TestServer::start().await?),
    };
    let url = match (&args.server, &server) {
        (Some(url), _) => url.clone(),
        (None, Some(server)) => server.url(),
        (None, None) => return Err("no server".into()),
    };
    let contender = |id: &str| {
        QuorumQuestClient::builder(args.service.clone(), args.domain.clone())
            .address(url.clone())
            .client_id(format!("{id}-{}", std::process::id()))
            .ttl(Duration::from_secs(3))
            .build()
    };
    let alpha = contender("alpha").await?;
    let bravo = contender("bravo").await?;

    let mut alpha_events = alpha.leadership();
    wait_for(&mut alpha_events, "alpha's election", |ev| ev.is_elected()).await?;
    let mut bravo_events = bravo.leadership();
    wait_for(&mut bravo_events, "bravo following", |ev| {
        matches!(ev, LeadershipEvent::Follower)
    })
    .await?;

    if let Some(server) = &server {
        // Two renewals fail; the third gets through while the lease lasts.
        server.fail_next(
            2,
            Some(RpcKind::KeepAlive),
            tonic::Status::resource_exhausted("injected by the example"),
        );
        for _ in 0..2 {
            wait_for(&mut alpha_events, "a failed renewal", |ev| {
                matches!(ev, LeadershipEvent::RpcFailed { .. })
            })
            .await?;
        }
    }
    wait_for(&mut alpha_events, "a renewal", |ev| {
        matches!(ev, LeadershipEvent::Renewed { .. })
    })
    .await?;

    alpha_events.resign().await?;
    wait_for(&mut bravo_events, "bravo's election", |ev| ev.is_elected()).await?;

    handle.run_upkeep();
    println!("{}", handle.render());
    println!("# alpha: {}", alpha.health());
    println!("# bravo: {}", bravo.health());

    bravo_events.resign().await?;
    Ok(())
}
