//! Stream combinators and leader-only work bound to a [`LeaderTerm`].
//!
//! One worker campaigns for a lock (3 s TTL). Three views of its leadership
//! run side by side:
//!
//! - `transitions()` drives the work: on `Elected` it starts leader-only work
//!   with `term.spawn(..)`; when the term ends, the work is stopped, and the
//!   program checks that not one more tick ran;
//! - `leader_changes()` prints a plain `true` / `false` per change;
//! - `until_lost()` follows the first term only, then ends.
//!
//! Term 1 ends because the server hands the lock to someone else
//! (`TestServer::set_owner`: the next renewal is refused, `Lost { Rejected }`).
//! With `--server`, there is no such control: the worker releases instead
//! (`Lost { Released }`). Term 2 runs a bounded batch with `term.run(..)`.
//! Every wait is bounded; the program ends by itself (in about 5 s).
//!
//! ```text
//! cargo run --features testing --example pipeline                       # in-process server
//! cargo run --features testing --example pipeline -- --server localhost:5050
//! ```

#[path = "common/signal.rs"]
mod signal;

use std::error::Error;
use std::fmt::Display;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use futures::{Stream, StreamExt};
use quorum_quest_client::testing::TestServer;
use quorum_quest_client::{LeaderTerm, LeadershipEvent, LeadershipStreamExt, QuorumQuestClient};
use tokio::time::{sleep, timeout, Instant};

type BoxError = Box<dyn Error + Send + Sync>;

/// Logging when `RUST_LOG` is not set.
const DEFAULT_LOG_FILTER: &str = "info,quorum_quest_client::testing=warn";
/// The whole demo must be over by then, whatever happens.
const DEMO_LIMIT: Duration = Duration::from_secs(30);
/// How long term 1 lasts before the lock is taken away.
const FIRST_TERM: Duration = Duration::from_millis(1200);
/// How long the server gives the lock to the intruder.
const INTRUDER_LEASE: Duration = Duration::from_secs(2);
/// The leader work's pace.
const TICK: Duration = Duration::from_millis(250);

/// Combinators and term-bound leader work.
#[derive(Parser, Debug)]
#[command(about)]
struct Args {
    /// A Quorum Quest server to use instead of the in-process one.
    #[arg(long)]
    server: Option<String>,

    /// The service name.
    #[arg(long, default_value = "pipeline-example")]
    service: String,

    /// The domain name.
    #[arg(long, default_value = "demo")]
    domain: String,

    /// The lock TTL in seconds (short, so that the demo is quick).
    #[arg(long, default_value_t = 3)]
    ttl: u64,
}

/// Prints lines stamped with the time since the demo started.
#[derive(Clone, Copy)]
struct Clock(Instant);

impl Clock {
    fn say(&self, who: &str, what: impl Display) {
        println!(
            "[+{:6.3}s] {who:<10} {what}",
            self.0.elapsed().as_secs_f64()
        );
    }
}

fn describe(event: &LeadershipEvent) -> String {
    match event {
        LeadershipEvent::Elected { term, .. } => format!("Elected term {}", term.id()),
        LeadershipEvent::Renewed { term_id, .. } => format!("Renewed term {term_id}"),
        LeadershipEvent::Follower => "Follower".to_string(),
        LeadershipEvent::Lost { term, reason } => format!("Lost term {} ({reason})", term.id()),
        LeadershipEvent::RpcFailed { rpc, code, .. } => format!("RpcFailed {rpc:?} {code:?}"),
        other => format!("{other:?}"),
    }
}

/// Prints transitions until one matches `wanted`; each must come within `patience`.
async fn until(
    events: &mut (impl Stream<Item = LeadershipEvent> + Unpin),
    clock: Clock,
    patience: Duration,
    wanted: impl Fn(&LeadershipEvent) -> bool,
) -> Result<LeadershipEvent, BoxError> {
    loop {
        let event = match timeout(patience, events.next()).await {
            Ok(Some(event)) => event,
            Ok(None) => return Err("the leadership stream ended".into()),
            Err(_) => {
                return Err(format!(
                    "no awaited transition within {patience:?} (is another node holding the lock?)"
                )
                .into())
            }
        };
        clock.say("transition", describe(&event));
        if wanted(&event) {
            return Ok(event);
        }
    }
}

async fn elected(
    events: &mut (impl Stream<Item = LeadershipEvent> + Unpin),
    clock: Clock,
    patience: Duration,
) -> Result<LeaderTerm, BoxError> {
    match until(events, clock, patience, LeadershipEvent::is_elected).await? {
        LeadershipEvent::Elected { term, .. } => Ok(term),
        _ => unreachable!("until() returns the awaited event"),
    }
}

/// Leader-only work that never finishes by itself: it only ever stops
/// because its term ends.
async fn endless_work(term_id: u64, ticks: Arc<AtomicU64>, clock: Clock) {
    loop {
        sleep(TICK).await;
        let n = ticks.fetch_add(1, Ordering::SeqCst) + 1;
        clock.say("work", format!("tick {n} (term {term_id})"));
    }
}

/// Leader-only work that finishes: a few items.
async fn batch(term_id: u64, items: u32, clock: Clock) -> u32 {
    for item in 1..=items {
        sleep(TICK).await;
        clock.say(
            "work",
            format!("batch item {item}/{items} (term {term_id})"),
        );
    }
    items
}

async fn run(args: Args) -> Result<(), BoxError> {
    let clock = Clock(Instant::now());
    // Without --server, an in-process server plays the real one.
    let embedded = match &args.server {
        Some(_) => None,
        None => Some(TestServer::start().await?),
    };
    let address = match (&embedded, &args.server) {
        (Some(server), _) => server.url(),
        (None, Some(address)) => address.clone(),
        (None, None) => unreachable!("either embedded or given"),
    };
    clock.say(
        "",
        format!(
            "server {address}, lock {}/{}, ttl {}s",
            args.service, args.domain, args.ttl
        ),
    );
    let patience = Duration::from_secs(args.ttl.max(1) * 2);

    let worker = QuorumQuestClient::builder(args.service.clone(), args.domain.clone())
        .address(address)
        .ttl(Duration::from_secs(args.ttl))
        .client_id(format!("worker-{}", std::process::id()))
        .build()
        .await?;
    // The keep-alive task owns the campaign, so the views below can come and
    // go without stopping it; release_lock() at the end stops it and releases.
    worker.start_keep_alive().await?;

    // View: leader_changes(), one bool per change.
    let mut changes = worker.leadership().leader_changes();
    let changes_view = tokio::spawn(async move {
        while let Some(is_leader) = changes.next().await {
            clock.say("changes", format!("leader = {is_leader}"));
        }
    });

    // View: until_lost(), the first term only; it ends after its Lost.
    let mut first_term = worker.leadership().until_lost();
    let first_term_view = tokio::spawn(async move {
        let mut seen = Vec::new();
        while let Some(event) = first_term.next().await {
            seen.push(describe(&event));
        }
        clock.say(
            "until_lost",
            format!("ended after the first Lost: {}", seen.join(", ")),
        );
    });

    // The driving view: transitions() (no Renewed or RpcFailed noise).
    let mut events = worker.leadership().transitions();

    // Term 1: endless work, bound to the term by term.spawn().
    let term = elected(&mut events, clock, patience).await?;
    let ticks = Arc::new(AtomicU64::new(0));
    let work = term.spawn(endless_work(term.id(), ticks.clone(), clock));
    sleep(FIRST_TERM).await;

    match &embedded {
        Some(server) => {
            clock.say(
                "server",
                "set_owner: the lock now belongs to 'intruder' for 2 s",
            );
            server.set_owner(&args.service, &args.domain, "intruder", INTRUDER_LEASE);
        }
        None => {
            clock.say("worker", "release_lock(): stepping down");
            worker.release_lock().await?;
            // release_lock() also stopped the keep-alive task; the views'
            // campaign goes on and wins the lock back. Restart the task so
            // that it, not the views, owns the campaign again.
            worker.start_keep_alive().await?;
        }
    }
    until(&mut events, clock, patience, LeadershipEvent::is_lost).await?;

    // The term has ended, so the work has been stopped: spawn() yields None.
    let outcome = timeout(Duration::from_secs(1), work)
        .await
        .map_err(|_| "the leader work did not stop when its term ended")??;
    if outcome.is_some() {
        return Err("the endless work cannot finish by itself".into());
    }
    let at_stop = ticks.load(Ordering::SeqCst);
    sleep(TICK * 3).await;
    let later = ticks.load(Ordering::SeqCst);
    if later != at_stop {
        return Err(
            format!("leader work ran after its term ended ({at_stop} -> {later} ticks)").into(),
        );
    }
    clock.say(
        "work",
        format!(
            "stopped with term {}: {at_stop} ticks, none after the term ended (term active: {})",
            term.id(),
            term.is_active()
        ),
    );

    // Term 2 (once the intruder's lease has run out): a bounded batch run
    // with term.run(), which gives Some(result) only if the term outlasts it.
    let term = elected(&mut events, clock, patience).await?;
    match term.run(batch(term.id(), 3, clock)).await {
        Some(done) => clock.say(
            "work",
            format!("batch of {done} done within term {}", term.id()),
        ),
        None => clock.say("work", format!("batch cut short: term {} ended", term.id())),
    }

    // Shut down: drop the views, then release (which stops the campaign first).
    drop(events);
    changes_view.abort();
    let _ = changes_view.await;
    timeout(Duration::from_secs(1), first_term_view)
        .await
        .map_err(|_| "the until_lost() view did not end after the first loss")??;
    worker.release_lock().await?;
    clock.say("worker", "released; done");
    drop(worker);
    if let Some(server) = embedded {
        stop_embedded(server).await;
    }
    Ok(())
}

/// Stops the in-process server. Every client released already, so dropping
/// them sends nothing more.
async fn stop_embedded(server: TestServer) {
    server.shutdown().await;
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(DEFAULT_LOG_FILTER)),
        )
        .with_writer(std::io::stderr)
        .init();

    // On SIGINT or SIGTERM the demo is cut short: its clients and streams
    // are dropped, and a leader's drop releases the lock before `main`
    // returns (multi-thread runtime).
    let outcome = tokio::select! {
        outcome = timeout(DEMO_LIMIT, run(Args::parse())) => match outcome {
            Ok(outcome) => outcome,
            Err(_) => Err(format!("the demo did not finish within {DEMO_LIMIT:?}").into()),
        },
        which = signal::shutdown_signal() => match which {
            Ok(which) => {
                println!("{which}: stopping (leaders release on the way out)");
                Ok(())
            }
            Err(e) => Err(e.into()),
        },
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err}");
            ExitCode::FAILURE
        }
    }
}
