//! The Quorum Quest example program: acquire leadership, keep it alive, do
//! leader-only work from callbacks, and release on the way out.
//!
//! Against a running server:
//!
//! ```text
//! cargo run --features testing --example quorum-quest-example -- \
//!     --server http://localhost:5050 --service my-service
//! ```
//!
//! Self-contained, with an in-process server and a second contender that
//! takes over when this one releases:
//!
//! ```text
//! cargo run --features testing --example quorum-quest-example -- --embedded --duration 10
//! ```
//!
//! Stop it with Ctrl+C or SIGTERM (what systemd, Docker and Kubernetes send),
//! or let `--duration` run out: it releases the lock before exiting, so the
//! next leader does not have to wait for the TTL. Its leader work is bound to
//! the term (`LeaderTerm::spawn`): it stops the instant leadership ends, even
//! before the `on_leader_lost` callback runs. Logs go to stderr
//! (`RUST_LOG=debug` for more); the lines meant for you go to stdout.

#[path = "common/signal.rs"]
mod signal;

use std::error::Error;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use futures::StreamExt;
use quorum_quest_client::testing::TestServer;
use quorum_quest_client::{async_trait, Callbacks, LeadershipEvent, QuorumQuestClient};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::{interval_at, sleep_until, timeout, Instant, MissedTickBehavior};

type BoxError = Box<dyn Error + Send + Sync>;

/// Logging when `RUST_LOG` is not set: info, but not every call the embedded
/// server answers (`RUST_LOG=info` shows those too).
const DEFAULT_LOG_FILTER: &str = "info,quorum_quest_client::testing=warn";
/// How often the status line is printed: not a divisor of the default renew
/// interval (ttl / 3 = 5 s), so the remaining lease is seen counting down.
const STATUS_EVERY: Duration = Duration::from_secs(2);
/// When the standby joins without --duration.
const STANDBY_AFTER: Duration = Duration::from_secs(5);
/// How often the demo leader work reports.
const WORK_EVERY: Duration = Duration::from_secs(1);
/// How long to wait for the standby to take over after our release.
const HANDOVER_WAIT: Duration = Duration::from_secs(5);

/// Quorum Quest leader election example.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// The server address (http://host:port, https://host:port or host:port).
    #[arg(long, default_value = "http://localhost:5050")]
    server: String,

    /// The service name.
    #[arg(long, default_value = "example-service")]
    service: String,

    /// The domain name.
    #[arg(long, default_value = "production")]
    domain: String,

    /// The lock TTL in seconds.
    #[arg(long, default_value_t = 15)]
    ttl: u64,

    /// This node's identity (a random UUID if not given).
    #[arg(long)]
    client_id: Option<String>,

    /// Start an in-process Quorum Quest server and use it (--server is
    /// ignored), with a second contender that takes over after our release.
    #[arg(long)]
    embedded: bool,

    /// Exit by itself after this many seconds (releasing the lock first).
    #[arg(long, value_name = "SECS")]
    duration: Option<u64>,
}

/// The callbacks: they report each change, and tell `main` when this node
/// became leader so that it starts the leader work bound to the new term.
struct LeaderWork {
    /// `true` while this node leads, as the callbacks saw it.
    leading: watch::Sender<bool>,
}

impl LeaderWork {
    fn new() -> Self {
        LeaderWork {
            leading: watch::Sender::new(false),
        }
    }
}

#[async_trait]
impl Callbacks for LeaderWork {
    async fn on_leader_elected(&self, is_leader: bool) {
        if !is_leader {
            println!("Another node is leader. Running as follower.");
            return;
        }
        println!("Became leader! Starting leader tasks...");
        self.leading.send_replace(true);
    }

    async fn on_leader_lost(&self) {
        // The term's work has already stopped: it ended with the term.
        println!("Lost leadership! Stopping leader tasks...");
        self.leading.send_replace(false);
    }
}

/// The demo leader work: one line a second, for as long as the term lasts.
async fn leader_work(term: u64) {
    let mut ticks = tokio::time::interval(WORK_EVERY);
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    for n in 1u64.. {
        ticks.tick().await;
        println!("  doing leader work (term {term}, tick {n})");
    }
}

/// A second contender in this process (embedded mode only): it waits as a
/// follower and takes over once we release the lock.
struct Standby {
    stop: oneshot::Sender<()>,
    elected: watch::Receiver<bool>,
    task: JoinHandle<Result<(), quorum_quest_client::Error>>,
}

impl Standby {
    async fn start(args: &Args, address: &str) -> Result<Standby, BoxError> {
        let client = QuorumQuestClient::builder(args.service.clone(), args.domain.clone())
            .address(address)
            .ttl(Duration::from_secs(args.ttl))
            .client_id(format!("standby-{}", std::process::id()))
            // Retry often, so that the handover is quick.
            .retry_period(Duration::from_millis(250))
            .build()
            .await?;
        println!("[standby] contender {} joins the race", client.client_id());
        let (stop_tx, mut stop_rx) = oneshot::channel::<()>();
        let (elected_tx, elected_rx) = watch::channel(false);
        let task = tokio::spawn(async move {
            let mut leadership = client.leadership();
            loop {
                tokio::select! {
                    _ = &mut stop_rx => break,
                    event = leadership.next() => match event {
                        Some(LeadershipEvent::Follower) => {
                            println!("[standby] another node is leader; standing by");
                        }
                        Some(LeadershipEvent::Elected { term, .. }) => {
                            println!("[standby] became leader (term {}): handover complete", term.id());
                            elected_tx.send_replace(true);
                        }
                        Some(LeadershipEvent::Lost { reason, .. }) => {
                            println!("[standby] lost leadership: {reason}");
                        }
                        Some(_) => {}
                        None => break,
                    },
                }
            }
            // Step down and release, so nothing is left behind.
            leadership.resign().await
        });
        Ok(Standby {
            stop: stop_tx,
            elected: elected_rx,
            task,
        })
    }

    /// Waits (bounded) for the takeover, then resigns.
    async fn finish(mut self) -> Result<(), BoxError> {
        if timeout(HANDOVER_WAIT, self.elected.wait_for(|e| *e))
            .await
            .is_err()
        {
            println!("[standby] did not take over within {HANDOVER_WAIT:?}");
        }
        // The task may already have ended; then there is nobody to tell.
        let _ = self.stop.send(());
        self.task.await??;
        println!("[standby] resigned");
        Ok(())
    }
}

fn format_lease(client: &QuorumQuestClient) -> String {
    match client.get_remaining_lease() {
        Some(left) => format!("leader=yes, remaining lease {:.1}s", left.as_secs_f64()),
        None => "leader=no".to_string(),
    }
}

async fn run(args: Args) -> Result<(), BoxError> {
    // With --embedded, an in-process server stands in for the real one.
    let embedded = if args.embedded {
        let server = TestServer::start().await?;
        println!(
            "Embedded mode: started an in-process Quorum Quest server at {} (--server is ignored)",
            server.url()
        );
        Some(server)
    } else {
        None
    };
    let address = embedded
        .as_ref()
        .map_or_else(|| args.server.clone(), TestServer::url);

    let callbacks = Arc::new(LeaderWork::new());
    let mut leading = callbacks.leading.subscribe();
    let client = QuorumQuestClient::new(
        args.service.clone(),
        args.domain.clone(),
        Duration::from_secs(args.ttl),
        &address,
        args.client_id.clone(),
        Some(callbacks.clone()),
    )
    .await?;
    println!(
        "Client {} contending for service '{}' in domain '{}' at {} (ttl {}s)",
        client.client_id(),
        args.service,
        args.domain,
        address,
        args.ttl
    );

    // One attempt up front, then the keep-alive task: it renews while we lead
    // and keeps campaigning while we do not.
    if client.try_acquire_lock().await? {
        println!("This node is now the leader!");
    } else {
        println!("Another node holds the lock; the keep-alive task will keep trying.");
    }
    client.start_keep_alive().await?;
    println!("Status: {}", format_lease(&client));

    let started = Instant::now();
    let deadline = args
        .duration
        .map(|secs| started + Duration::from_secs(secs));
    // The standby joins after a third of the run (or after 5 s without --duration).
    let standby_at = started
        + args
            .duration
            .map_or(STANDBY_AFTER, |secs| Duration::from_secs(secs) / 3);
    let mut standby: Option<Standby> = None;

    let mut status = interval_at(started + STATUS_EVERY, STATUS_EVERY);
    status.set_missed_tick_behavior(MissedTickBehavior::Delay);
    // Leader work runs inside the term: `LeaderTerm::spawn` stops it when
    // the term ends (loss, release or the lease running out).
    let mut work: Option<JoinHandle<Option<()>>> = None;
    if let Some(term) = client.current_term() {
        work = Some(term.spawn(leader_work(term.id())));
    }
    let stop = signal::shutdown_signal();
    tokio::pin!(stop);
    let why = loop {
        tokio::select! {
            which = &mut stop => break which?,
            _ = sleep_until(deadline.unwrap_or(started)), if deadline.is_some() => {
                break "duration elapsed";
            }
            _ = sleep_until(standby_at), if embedded.is_some() && standby.is_none() => {
                standby = Some(Standby::start(&args, &address).await?);
            }
            changed = leading.changed() => {
                changed?;
                let elected = *leading.borrow_and_update();
                let idle = work.as_ref().is_none_or(JoinHandle::is_finished);
                if elected && idle {
                    if let Some(term) = client.current_term() {
                        work = Some(term.spawn(leader_work(term.id())));
                    }
                }
            }
            _ = status.tick() => {
                println!("Status: {}", format_lease(&client));
            }
        }
    };

    println!("Shutting down ({why}): releasing the lock");
    // Stops the keep-alive task, ends the term (the leader work stops with
    // it), releases the lock and waits for the callbacks to finish.
    client.shutdown().await?;
    let _ = timeout(Duration::from_secs(2), leading.wait_for(|l| !*l)).await;
    if let Some(work) = work {
        // Ended with the term; this only collects it.
        let _ = work.await;
    }
    println!("Released the lock and stopped keep-alive.");
    drop(client);

    if let Some(standby) = standby {
        standby.finish().await?;
    }
    if let Some(server) = embedded {
        // Every client released already, so dropping them sent nothing more.
        server.shutdown().await;
    }
    println!("Goodbye.");
    Ok(())
}

/// Prints an error and its causes (skipping causes already in the message).
fn report(err: &(dyn Error + 'static)) {
    let mut shown = err.to_string();
    eprintln!("error: {shown}");
    let mut source = err.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !shown.contains(&text) {
            eprintln!("  caused by: {text}");
            shown.push_str(&text);
        }
        source = cause.source();
    }
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

    match run(Args::parse()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            report(err.as_ref());
            ExitCode::FAILURE
        }
    }
}
