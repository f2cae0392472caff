//! The long-running chaos test: N contenders campaign for one lock through
//! faulty networks while a seeded schedule injects every kind of fault, and
//! the run checks against the server's own record that there were never two
//! leaders. Prints the seed first (replay a run with `--seed`), progress every
//! 30 s, then the summary line and the faults by kind. Exits with 1 on any
//! violation (or if the harness itself failed).
//!
//! ```text
//! # the long form: 10 minutes, 5 contenders, every standard fault kind
//! cargo run --release --features testing --example chaos -- --duration 600 --contenders 5
//!
//! # replay a run
//! cargo run --release --features testing --example chaos -- --seed 12648430 --duration 600
//!
//! # measure the overlap a lock-table-dropping restart causes, with the
//! # default 15 s TTL (renew interval 5 s)
//! cargo run --release --features testing --example chaos -- \
//!     --duration 300 --ttl 15 --faults restart-drop --fault-gap 30
//! ```

use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use quorum_quest_client::testing::chaos::{self, ChaosConfig, FaultKind};

#[derive(Parser, Debug)]
#[command(about = "Randomized multi-node fault test: never two leaders")]
struct Args {
    /// Seed of the fault schedule and the clients' jitter (default: random).
    #[arg(long)]
    seed: Option<u64>,
    /// How many contenders campaign.
    #[arg(long, default_value_t = 5)]
    contenders: usize,
    /// How long to inject faults, in seconds.
    #[arg(long, default_value_t = 600)]
    duration: u64,
    /// The lock TTL in seconds (the clients use the default timing for it).
    #[arg(long, default_value_t = 3)]
    ttl: u64,
    /// Which faults to inject, comma-separated (default: every standard kind:
    /// blackhole, reset, pause, goaway, latency, unavailable, restart, resign,
    /// drop, delayed-delivery, hostile-lease, clamp-lease, delayed-refusal,
    /// starved-runtime; add restart-drop for lock-table-dropping restarts,
    /// which are measured, not counted as violations).
    #[arg(long, value_delimiter = ',')]
    faults: Vec<FaultKind>,
    /// The longest healthy gap between two faults of a lane, in seconds
    /// (default: one TTL).
    #[arg(long)]
    fault_gap: Option<f64>,
    /// Faults come in storms of 9 TTLs separated by calm periods of this many
    /// seconds (default: 3 TTLs; 0: no calm periods).
    #[arg(long)]
    calm: Option<f64>,
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
                tracing_subscriber::EnvFilter::new("warn,quorum_quest_client::testing::chaos=info")
            }),
        )
        .with_writer(std::io::stderr)
        .init();

    let args = Args::parse();
    let seed = args.seed.unwrap_or_else(|| fastrand::u64(..));
    let faults = if args.faults.is_empty() {
        FaultKind::STANDARD.to_vec()
    } else {
        args.faults
    };
    let mut config = ChaosConfig::default();
    config.seed = seed;
    config.contenders = args.contenders;
    config.duration = Duration::from_secs(args.duration);
    config.ttl = Duration::from_secs(args.ttl);
    config.faults = faults;
    config.fault_gap = args.fault_gap.map(Duration::from_secs_f64);
    config.calm = args.calm.map(Duration::from_secs_f64);
    config.progress_every = Some(Duration::from_secs(30));
    println!(
        "chaos: seed {seed} (replay with --seed {seed}), {} contenders, {} s of faults, ttl {} s",
        config.contenders, args.duration, args.ttl
    );

    let report = chaos::run(config).await;

    println!("{report}");
    println!("faults injected by kind:");
    for (kind, n) in &report.faults {
        println!("  {:<16} {n}", kind.name());
    }
    for (kind, n) in &report.skipped {
        println!("  {:<16} {n} skipped (no leader to hit)", kind.name());
    }
    println!("  GOAWAY frames sent: {}", report.goaway_frames);
    println!(
        "terms: {} (closed by Lost {}, by resign/drop {}); callbacks saw {} elected / {} lost",
        report.terms,
        report.closed_by_lost,
        report.closed_by_exit,
        report.callback_elected,
        report.callback_lost
    );
    println!(
        "rpc failures seen by streams: {}; leases lost with no blocking fault active: {}",
        report.rpc_failures, report.unexplained_losses
    );
    for s in &report.drop_samples {
        println!(
            "table dropped at {:.3}s while {} led: it went on for {:.3}s, overlapping a new leader for {:.3}s",
            s.at.as_secs_f64(),
            s.owner,
            s.stale.as_secs_f64(),
            s.overlap.as_secs_f64()
        );
    }
    for p in &report.problems {
        println!("harness problem: {p}");
    }
    for (v, suspects) in report.violations().iter().zip(&report.suspects) {
        let names: Vec<&str> = suspects.iter().map(|k| k.name()).collect();
        println!("VIOLATION: {v} [faults in force: {}]", names.join(", "));
    }
    if !report.violations().is_empty() {
        println!("violations by fault kind in force:");
        for (kind, n) in report.violations_by_kind() {
            println!("  {:<16} {n}", kind.map_or("(none)", |k| k.name()));
        }
    }
    println!(
        "wall time {:.1}s, seed {seed}",
        report.wall_time.as_secs_f64()
    );
    if report.is_clean() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}
