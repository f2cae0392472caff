//! Leadership as a stream: `while let Some(event) = leadership.next().await`.
//!
//! Two contenders, `alpha` and `bravo`, campaign for one lock with a 3 s TTL:
//! alpha is elected and renews, bravo waits as a follower, alpha steps down
//! and leaves the race, bravo takes over, renews, and releases. Every event is
//! printed with the time since start, and every wait is bounded, so the
//! program always ends by itself (in about 5 s).
//!
//! ```text
//! cargo run --features testing --example stream                       # in-process server
//! cargo run --features testing --example stream -- --server localhost:5050
//! ```

#[path = "common/signal.rs"]
mod signal;

use std::error::Error;
use std::fmt::Display;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use futures::StreamExt;
use quorum_quest_client::testing::TestServer;
use quorum_quest_client::{Leadership, LeadershipEvent, QuorumQuestClient};
use tokio::time::{timeout, Instant};

type BoxError = Box<dyn Error + Send + Sync>;

/// Logging when `RUST_LOG` is not set.
const DEFAULT_LOG_FILTER: &str = "info,quorum_quest_client::testing=warn";
/// The whole demo must be over by then, whatever happens.
const DEMO_LIMIT: Duration = Duration::from_secs(30);

/// Leadership events of two contenders, as a stream.
#[derive(Parser, Debug)]
#[command(about)]
struct Args {
    /// A Quorum Quest server to use instead of the in-process one.
    #[arg(long)]
    server: Option<String>,

    /// The service name.
    #[arg(long, default_value = "stream-example")]
    service: String,

    /// The domain name.
    #[arg(long, default_value = "demo")]
    domain: String,

    /// The lock TTL in seconds (short, so that the demo is quick).
    #[arg(long, default_value_t = 3)]
    ttl: u64,
}

/// Prints lines stamped with the time since the demo started.
struct Clock(Instant);

impl Clock {
    fn say(&self, who: &str, what: impl Display) {
        println!("[+{:6.3}s] {who:<6} {what}", self.0.elapsed().as_secs_f64());
    }
}

fn describe(event: &LeadershipEvent) -> String {
    match event {
        LeadershipEvent::Elected {
            term,
            lease_remaining,
        } => format!(
            "Elected   term {} (lease {:.2}s)",
            term.id(),
            lease_remaining.as_secs_f64()
        ),
        LeadershipEvent::Renewed {
            term_id,
            lease_remaining,
        } => format!(
            "Renewed   term {term_id} (lease {:.2}s)",
            lease_remaining.as_secs_f64()
        ),
        LeadershipEvent::Follower => "Follower  (another node holds the lock)".to_string(),
        LeadershipEvent::Lost { term, reason } => {
            format!("Lost      term {} ({reason})", term.id())
        }
        LeadershipEvent::RpcFailed {
            rpc, code, message, ..
        } => format!("RpcFailed {rpc:?}: {code:?} {message}"),
        other => format!("{other:?}"),
    }
}

/// One contender: its client and its leadership stream.
struct Contender {
    name: &'static str,
    client: QuorumQuestClient,
    leadership: Leadership,
}

impl Contender {
    async fn join(name: &'static str, args: &Args, address: &str) -> Result<Contender, BoxError> {
        let client = QuorumQuestClient::builder(args.service.clone(), args.domain.clone())
            .address(address)
            .ttl(Duration::from_secs(args.ttl))
            .client_id(format!("{name}-{}", std::process::id()))
            .build()
            .await?;
        let leadership = client.leadership();
        Ok(Contender {
            name,
            client,
            leadership,
        })
    }

    /// Prints this contender's events until one matches `wanted` (described
    /// by `what`), and returns it. Each event must come within `patience`.
    async fn until(
        &mut self,
        clock: &Clock,
        patience: Duration,
        what: &str,
        wanted: impl Fn(&LeadershipEvent) -> bool,
    ) -> Result<LeadershipEvent, BoxError> {
        loop {
            let event = match timeout(patience, self.leadership.next()).await {
                Ok(Some(event)) => event,
                Ok(None) => return Err(format!("{}: the stream ended", self.name).into()),
                Err(_) => {
                    return Err(format!(
                    "{}: no {what} event within {patience:?} (is another node holding the lock?)",
                    self.name
                )
                    .into())
                }
            };
            clock.say(self.name, describe(&event));
            if wanted(&event) {
                return Ok(event);
            }
        }
    }

    /// Steps down (the stream reports `Lost`), then leaves the race.
    async fn step_down(mut self, clock: &Clock, patience: Duration) -> Result<(), BoxError> {
        clock.say(self.name, "steps down: release_lock()");
        // Ends the term at once: the stream yields Lost { Released } ...
        self.client.release_lock().await?;
        self.until(clock, patience, "Lost", LeadershipEvent::is_lost)
            .await?;
        // ... and resign() stops this stream's campaign, so that this node
        // does not contend again (it also releases, which is idempotent).
        self.leadership.resign().await?;
        clock.say(self.name, "resigned: no longer campaigning");
        Ok(())
    }
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
    let which = if embedded.is_some() {
        "in-process server"
    } else {
        "server"
    };
    clock.say(
        "",
        format!(
            "{which} {address}, lock {}/{}, ttl {}s",
            args.service, args.domain, args.ttl
        ),
    );
    // Long enough for any expected event (a renewal or a follower's retry).
    let patience = Duration::from_secs(args.ttl.max(1) * 2);

    // 1. alpha campaigns alone and is elected.
    let mut alpha = Contender::join("alpha", &args, &address).await?;
    let elected = alpha
        .until(&clock, patience, "Elected", LeadershipEvent::is_elected)
        .await?;
    let LeadershipEvent::Elected {
        term: alpha_term, ..
    } = elected
    else {
        unreachable!("until() returned the awaited event")
    };

    // 2. bravo joins while alpha leads: it learns it is a follower.
    let mut bravo = Contender::join("bravo", &args, &address).await?;
    bravo
        .until(&clock, patience, "Follower", |e| {
            matches!(e, LeadershipEvent::Follower)
        })
        .await?;

    // 3. alpha keeps its lease for two renewals.
    for _ in 0..2 {
        alpha
            .until(&clock, patience, "Renewed", |e| {
                matches!(e, LeadershipEvent::Renewed { .. })
            })
            .await?;
    }

    // 4. Handover: alpha steps down; bravo wins at its next attempt.
    alpha.step_down(&clock, patience).await?;
    clock.say(
        "alpha",
        format!(
            "term {} still active: {}",
            alpha_term.id(),
            alpha_term.is_active()
        ),
    );
    bravo
        .until(&clock, patience, "Elected", LeadershipEvent::is_elected)
        .await?;
    bravo
        .until(&clock, patience, "Renewed", |e| {
            matches!(e, LeadershipEvent::Renewed { .. })
        })
        .await?;

    // 5. A clean release: the lock is free at once for whoever comes next.
    bravo.step_down(&clock, patience).await?;
    if let Some(server) = embedded {
        stop_embedded(server).await;
    }
    clock.say("", "done");
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
