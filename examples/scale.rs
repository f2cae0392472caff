//! Many elections in one process, created at once: the client against a
//! hand-written loop over the raw generated stub, measured in the same run
//! against the same server (running in a separate process).
//!
//! ```text
//! cargo run --release --features testing --example scale                      # N = 1,000 / 10,000 / 100,000
//! cargo run --release --features testing --example scale -- --n 1000,5000 --ttl 15 --window 8
//! cargo run --release --features testing --example scale -- --n 100000 --window 60 --repeat 3
//! ```
//!
//! CPU figures on a shared machine move by ±20 % from run to run; with
//! `--repeat K` each N runs K rounds of the four variants in turn (each
//! round starting with the next variant), the table shows the medians and
//! every round's CPU ratio is printed.
//!
//! For each N, four child processes run one after the other (so that each
//! measures its own memory):
//!
//! - `stub`: the raw-stub baseline, one task per lock: acquire until granted,
//!   confirm with a `KeepAlive`, then keep alive every renew interval, timed
//!   from the previous send; its calls are bounded by a plain 100-permit
//!   semaphore (without it, a cold start of 100,000 floods the connection
//!   and it never elects them all). Its renewals stay in lockstep.
//! - `spread`: the same loop with a renewal jitter like the client's (each
//!   renewal up to a tenth of the interval early, at random): renewals
//!   spread out instead of coming in one burst per interval, which costs
//!   more CPU per renewal (fewer calls share a wake-up and a write), so CPU
//!   is compared like with like. Each task sleeps until its own instant,
//!   as a hand-written loop does; the client moves its renewals to the
//!   start of 50 ms slots shared by every lock, so that those due together
//!   go out together (a hand-written loop could do the same; the lockstep
//!   `stub`, all of whose renewals come in bursts, shows where that ends).
//! - `client`: one `for_scope` client per lock on one connection, each
//!   followed by its `leadership()` stream, all read as one `LeadershipSet`
//!   by one task.
//! - `quiet`: the same, with each stream's renewals left out
//!   (`Leadership::without_renewals`): what a process that only needs to
//!   know when it gains or loses a lock reads. Its reader is woken for
//!   transitions only; its renewals are counted by the server, and its
//!   lateness is not measured (there is no event to read it from).
//!
//! Each creates all N elections at once and then keeps them through a
//! steady-state window. Printed, beside each other with the client/stub
//! ratios:
//!
//! - time until all N were elected;
//! - failed calls (`RpcFailed` events / stub errors) and losses;
//! - redials: connections the server accepted beyond the first;
//! - bytes per election: RSS at the end of the window minus RSS before the
//!   first election, divided by N;
//! - CPU per renewal: user + system CPU time of the process during the window,
//!   divided by the renewals it made (for `quiet`, the `KeepAlive` calls the
//!   server received during the window: the child reports when its window
//!   starts and ends, and the server is asked for its count then);
//! - renewal lateness p50 / p99: how long after its nominal due instant (the
//!   previous renewal's send instant plus the renew interval) a renewal was
//!   sent; a renewal sent early (the client jitters its renewals earlier) counts
//!   as 0. For the client the send instant is derived from the lease its
//!   `Renewed` event carries (deadline minus ttl minus safety margin), read
//!   when the event arrives (so a late read can only make it look late).

#[path = "common/proc_stats.rs"]
mod proc_stats;

use proc_stats::{cpu_time, rss_bytes};

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clap::Parser;
use futures::StreamExt;
use quorum_quest_client::proto::leader_election_service_client::LeaderElectionServiceClient;
use quorum_quest_client::proto::{KeepAliveRequest, TryAcquireLockRequest};
use quorum_quest_client::testing::TestServer;
use quorum_quest_client::{LeadershipEvent, LeadershipSet, QuorumQuestClient, RpcKind, Timing};
use tokio::time::Instant;

#[derive(Debug, Clone, Parser)]
struct Args {
    /// Comma-separated election counts.
    #[arg(long, default_value = "1000,10000,100000", value_delimiter = ',')]
    n: Vec<usize>,
    /// Lock TTL in seconds (renewals every ttl / 3).
    #[arg(long, default_value_t = 60)]
    ttl: u64,
    /// Steady-state window after all are elected, in seconds (at least one
    /// renew interval, so that every lock renews in it).
    #[arg(long, default_value_t = 25)]
    window: u64,
    /// Give up electing after this many seconds.
    #[arg(long, default_value_t = 120)]
    give_up: u64,
    /// Rounds per N (each runs the four variants in turn): the table then
    /// shows the median of each figure (the worst for failed calls, losses,
    /// redials and elected), and the CPU ratio of every round is printed.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
    repeat: u64,
    /// Internal: run the server and answer `stats` on stdin.
    #[arg(long, hide = true)]
    serve: bool,
    /// Internal: run one variant (one of `VARIANTS`) against --url.
    #[arg(long, hide = true)]
    run: Option<String>,
    #[arg(long, hide = true)]
    url: Option<String>,
    #[arg(long, hide = true)]
    service: Option<String>,
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    if args.serve {
        return serve();
    }
    if let Some(variant) = args.run.clone() {
        return run_child(&args, &variant);
    }
    orchestrate(&args)
}

// ----- the server process -----

fn serve() -> Result<(), Box<dyn std::error::Error>> {
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        let server = TestServer::builder().port(0).start().await?;
        println!("URL {}", server.url());
        std::io::stdout().flush()?;
        let mut lines = BufReader::new(std::io::stdin()).lines();
        // Blocking stdin reads on a thread of their own.
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        std::thread::spawn(move || {
            while let Some(Ok(line)) = lines.next() {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        while let Some(line) = rx.recv().await {
            if line.trim() == "stats" {
                println!(
                    "STATS {} {} {}",
                    server.connections_accepted(),
                    server.calls(RpcKind::TryAcquireLock),
                    server.calls(RpcKind::KeepAlive)
                );
                std::io::stdout().flush()?;
            }
        }
        Ok(())
    })
}

struct ServerProcess {
    child: Child,
    out: std::io::Lines<BufReader<std::process::ChildStdout>>,
    url: String,
}

impl ServerProcess {
    fn start() -> Result<Self, Box<dyn std::error::Error>> {
        let mut child = Command::new(std::env::current_exe()?)
            .arg("--serve")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()?;
        let stdout = child.stdout.take().ok_or("no stdout")?;
        let mut out = BufReader::new(stdout).lines();
        let line = out.next().ok_or("server said nothing")??;
        let url = line.strip_prefix("URL ").ok_or("unexpected server line")?;
        Ok(ServerProcess {
            url: url.to_string(),
            child,
            out,
        })
    }

    /// Connections accepted so far.
    fn connections(&mut self) -> Result<u64, Box<dyn std::error::Error>> {
        self.stat(1)
    }

    /// `KeepAlive` calls received so far.
    fn keep_alives(&mut self) -> Result<u64, Box<dyn std::error::Error>> {
        self.stat(3)
    }

    /// Field `i` of the server's `STATS` line.
    fn stat(&mut self, i: usize) -> Result<u64, Box<dyn std::error::Error>> {
        let stdin = self.child.stdin.as_mut().ok_or("no stdin")?;
        writeln!(stdin, "stats")?;
        stdin.flush()?;
        let line = self.out.next().ok_or("server gone")??;
        let n = line
            .split_whitespace()
            .nth(i)
            .and_then(|s| s.parse().ok())
            .ok_or("bad stats line")?;
        Ok(n)
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ----- the orchestrator -----

/// One variant's figures, as a child prints them.
#[derive(Debug, Default, Clone)]
struct Figures {
    elected: usize,
    elect_secs: f64,
    failed: u64,
    lost: u64,
    bytes_per_election: f64,
    cpu_us_per_renewal: f64,
    renewals: u64,
    late_p50_ms: f64,
    late_p99_ms: f64,
    redials: u64,
    /// CPU time of the process during the window, in seconds.
    window_cpu_secs: f64,
}

impl Figures {
    fn to_line(&self) -> String {
        format!(
            "RESULT {} {} {} {} {} {} {} {} {} {}",
            self.elected,
            self.elect_secs,
            self.failed,
            self.lost,
            self.bytes_per_election,
            self.cpu_us_per_renewal,
            self.renewals,
            self.late_p50_ms,
            self.late_p99_ms,
            self.window_cpu_secs
        )
    }

    /// One variant's figures over several rounds: the median of each,
    /// except the worst round for what must hold in every round (all
    /// elected; no failed call, loss or redial).
    fn summary(rounds: &[Figures]) -> Figures {
        let median = |f: fn(&Figures) -> f64| {
            let mut v: Vec<f64> = rounds.iter().map(f).collect();
            v.sort_by(f64::total_cmp);
            v.get(v.len() / 2).copied().unwrap_or(0.0)
        };
        Figures {
            elected: rounds.iter().map(|r| r.elected).min().unwrap_or(0),
            elect_secs: median(|r| r.elect_secs),
            failed: rounds.iter().map(|r| r.failed).max().unwrap_or(0),
            lost: rounds.iter().map(|r| r.lost).max().unwrap_or(0),
            bytes_per_election: median(|r| r.bytes_per_election),
            cpu_us_per_renewal: median(|r| r.cpu_us_per_renewal),
            renewals: median(|r| r.renewals as f64) as u64,
            late_p50_ms: median(|r| r.late_p50_ms),
            late_p99_ms: median(|r| r.late_p99_ms),
            redials: rounds.iter().map(|r| r.redials).max().unwrap_or(0),
            window_cpu_secs: median(|r| r.window_cpu_secs),
        }
    }

    fn parse(line: &str) -> Option<Self> {
        let v: Vec<&str> = line.strip_prefix("RESULT ")?.split_whitespace().collect();
        let f = |i: usize| v.get(i).and_then(|s| s.parse::<f64>().ok());
        Some(Figures {
            elected: f(0)? as usize,
            elect_secs: f(1)?,
            failed: f(2)? as u64,
            lost: f(3)? as u64,
            bytes_per_election: f(4)?,
            cpu_us_per_renewal: f(5)?,
            renewals: f(6)? as u64,
            late_p50_ms: f(7)?,
            late_p99_ms: f(8)?,
            redials: 0,
            window_cpu_secs: f(9)?,
        })
    }
}

/// The variants, in the order each round runs them.
const VARIANTS: [&str; 4] = ["stub", "spread", "client", "quiet"];

fn orchestrate(args: &Args) -> Result<(), Box<dyn std::error::Error>> {
    let mut server = ServerProcess::start()?;
    println!(
        "server: TestServer in a separate process at {}; ttl {} s (renew every {} s), window {} s; {} cores",
        server.url,
        args.ttl,
        args.ttl / 3,
        args.window,
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    for (round, &n) in args.n.iter().enumerate() {
        // rounds[r][v]: round r, variant v (in the order of VARIANTS).
        let mut rounds: Vec<Vec<Figures>> = Vec::new();
        for rep in 0..args.repeat {
            // Each round starts with the next variant (so that none always
            // runs right after the same one, on a server still holding the
            // previous variant's locks until they expire).
            let mut results = vec![Figures::default(); VARIANTS.len()];
            for k in 0..VARIANTS.len() {
                let v = (k + rep as usize) % VARIANTS.len();
                let variant = VARIANTS[v];
                let service = format!("scale-{round}-{rep}-{variant}");
                results[v] = run_variant(args, &mut server, variant, n, &service)?;
            }
            rounds.push(results);
        }
        let summary: Vec<Figures> = (0..VARIANTS.len())
            .map(|v| Figures::summary(&rounds.iter().map(|r| r[v].clone()).collect::<Vec<_>>()))
            .collect();
        let (stub, spread, client, quiet) = (&summary[0], &summary[1], &summary[2], &summary[3]);
        if args.repeat > 1 {
            let ratios = |v: usize| {
                rounds
                    .iter()
                    .map(|r| {
                        format!(
                            "{:.2}x",
                            r[v].cpu_us_per_renewal
                                / r[1].cpu_us_per_renewal.max(f64::MIN_POSITIVE)
                        )
                    })
                    .collect::<Vec<_>>()
                    .join(" ")
            };
            println!(
                "\nN = {n}: CPU per renewal against stub+jitter, in each of {} rounds:\n  client: {}\n  quiet:  {}",
                args.repeat,
                ratios(2),
                ratios(3)
            );
            println!("(the table shows the median of each figure; failed calls, losses and redials the worst round)");
        }
        println!(
            "\nN = {n:<7} created at once    client       quiet    raw stub  stub+jitter  client/stub+jitter  quiet/stub+jitter"
        );
        let row = |what: &str, f: fn(&Figures) -> f64, digits: usize| {
            let ratio = |x: f64, base: f64| {
                if base > 0.0 && x > 0.0 {
                    format!("{:.2}x", x / base)
                } else {
                    "-".into()
                }
            };
            let (c, q, s, j) = (f(client), f(quiet), f(stub), f(spread));
            println!(
                "  {what:<26} {c:>10.digits$}  {q:>10.digits$}  {s:>10.digits$}  {j:>11.digits$}  {:>18}  {:>17}",
                ratio(c, j),
                ratio(q, j)
            );
        };
        row("elected (of N)", |f| f.elected as f64, 0);
        row("time to elect all (s)", |f| f.elect_secs, 2);
        row("failed calls", |f| f.failed as f64, 0);
        row("losses", |f| f.lost as f64, 0);
        row("redials", |f| f.redials as f64, 0);
        row("bytes per election", |f| f.bytes_per_election, 0);
        row("renewals in the window", |f| f.renewals as f64, 0);
        row("CPU per renewal (us)", |f| f.cpu_us_per_renewal, 1);
        row("renewal lateness p50 (ms)", |f| f.late_p50_ms, 1);
        row("renewal lateness p99 (ms)", |f| f.late_p99_ms, 1);
        println!("  (quiet: renewals counted by the server; its lateness is not measured)");
    }
    Ok(())
}

/// CPU time per renewal in µs (0 without renewals).
fn cpu_us_per_renewal(cpu_secs: f64, renewals: u64) -> f64 {
    if renewals == 0 {
        0.0
    } else {
        cpu_secs * 1e6 / renewals as f64
    }
}

/// Runs one variant in a child process of its own against `server`.
fn run_variant(
    args: &Args,
    server: &mut ServerProcess,
    variant: &str,
    n: usize,
    service: &str,
) -> Result<Figures, Box<dyn std::error::Error>> {
    let before = server.connections()?;
    let mut child = Command::new(std::env::current_exe()?)
        .args(["--run", variant, "--url", &server.url, "--service", service])
        .args(["--n", &n.to_string()])
        .args(["--ttl", &args.ttl.to_string()])
        .args(["--window", &args.window.to_string()])
        .args(["--give-up", &args.give_up.to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()?;
    let stdout = child.stdout.take().ok_or("no stdout")?;
    // The server's count of `KeepAlive` calls when the child's window
    // starts, and how many came in it.
    let (mut window_start, mut in_window) = (None, None);
    let mut figures = None;
    let mut text = String::new();
    for line in BufReader::new(stdout).lines() {
        let line = line?;
        match line.as_str() {
            WINDOW_START => window_start = Some(server.keep_alives()?),
            WINDOW_END => {
                let end = server.keep_alives()?;
                in_window = window_start.map(|start| end.saturating_sub(start));
            }
            _ => figures = figures.or_else(|| Figures::parse(&line)),
        }
        text.push_str(&line);
        text.push('\n');
    }
    child.wait()?;
    let mut figures =
        figures.ok_or_else(|| format!("{variant} at N = {n} printed no result: {text}"))?;
    figures.redials = server.connections()?.saturating_sub(before + 1);
    if variant == "quiet" {
        // No `Renewed` to count: the server's count during the window.
        figures.renewals = in_window.unwrap_or(0);
        figures.cpu_us_per_renewal = cpu_us_per_renewal(figures.window_cpu_secs, figures.renewals);
    }
    Ok(figures)
}

// ----- one variant, in its own process -----

/// Printed by a child when its steady-state window starts, and when it ends.
const WINDOW_START: &str = "WINDOW START";
const WINDOW_END: &str = "WINDOW END";

/// Tells the orchestrator (reading stdout) that the window starts or ends.
fn mark(what: &str) {
    println!("{what}");
    let _ = std::io::stdout().flush();
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i].as_secs_f64() * 1000.0
}

/// What a run measured before the figures are derived.
struct Run {
    elected: usize,
    elect: Duration,
    failed: u64,
    lost: u64,
    renewals: u64,
    window_cpu: Duration,
    lateness: Vec<Duration>,
    rss_delta: u64,
}

fn run_child(args: &Args, variant: &str) -> Result<(), Box<dyn std::error::Error>> {
    let n = *args.n.first().ok_or("--n")?;
    let url = args.url.clone().ok_or("--url")?;
    let service = args.service.clone().ok_or("--service")?;
    let rt = tokio::runtime::Runtime::new()?;
    // Each variant runs in a task on the runtime's workers (the client's
    // event consumer included), not on the thread that called `block_on`:
    // waking that thread for every event costs a futex round trip a
    // consumer on a worker does not pay.
    let (args, variant) = (args.clone(), variant.to_string());
    let run = rt
        .block_on(async move {
            tokio::spawn(async move {
                match variant.as_str() {
                    "stub" => run_stub(&args, n, &url, &service, false).await,
                    "spread" => run_stub(&args, n, &url, &service, true).await,
                    "quiet" => run_client(&args, n, &url, &service, true).await,
                    _ => run_client(&args, n, &url, &service, false).await,
                }
                .map_err(|e| e.to_string())
            })
            .await
        })
        .map_err(|e| e.to_string())??;
    let mut late = run.lateness;
    late.sort();
    let figures = Figures {
        elected: run.elected,
        elect_secs: run.elect.as_secs_f64(),
        failed: run.failed,
        lost: run.lost,
        bytes_per_election: run.rss_delta as f64 / n as f64,
        cpu_us_per_renewal: cpu_us_per_renewal(run.window_cpu.as_secs_f64(), run.renewals),
        renewals: run.renewals,
        late_p50_ms: percentile(&late, 0.5),
        late_p99_ms: percentile(&late, 0.99),
        redials: 0,
        window_cpu_secs: run.window_cpu.as_secs_f64(),
    };
    println!("{}", figures.to_line());
    // Do not wait for the runtime's tasks: the locks just expire.
    rt.shutdown_background();
    Ok(())
}

async fn run_client(
    args: &Args,
    n: usize,
    url: &str,
    service: &str,
    quiet: bool,
) -> Result<Run, Box<dyn std::error::Error>> {
    let ttl = Duration::from_secs(args.ttl);
    let timing = Timing::for_ttl(ttl);
    // The send instant of a renewal is the deadline minus this.
    let lead = ttl.saturating_sub(timing.safety_margin);
    let rss0 = rss_bytes();
    let started = Instant::now();
    let root = QuorumQuestClient::builder(service, "root")
        .address(url)
        .ttl(ttl)
        .build()
        .await?;
    let shards: Vec<_> = (0..n)
        .map(|i| root.for_scope(service, format!("shard-{i}")))
        .collect::<Result<_, _>>()?;
    let mut all: LeadershipSet<u32> = shards
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let stream = s.leadership();
            (
                i as u32,
                if quiet {
                    stream.without_renewals()
                } else {
                    stream
                },
            )
        })
        .collect();
    let (mut elected, mut failed, mut lost, mut renewals) = (0usize, 0u64, 0u64, 0u64);
    let mut last_sent: Vec<Option<Instant>> = vec![None; n];
    let mut lateness = Vec::new();
    let give_up = started + Duration::from_secs(args.give_up);
    let mut window: Option<(Instant, Duration)> = None;
    let mut cpu0 = Duration::ZERO;
    loop {
        let until = match window {
            Some((start, _)) => start + Duration::from_secs(args.window),
            None => give_up,
        };
        let Ok(Some((i, ev))) = tokio::time::timeout_at(until, all.next()).await else {
            break;
        };
        let i = i as usize;
        // The lease the event carries is counted from when it was made, so
        // a send instant derived from it now is, if anything, late.
        let sent = match &ev {
            LeadershipEvent::Elected {
                lease_remaining, ..
            }
            | LeadershipEvent::Renewed {
                lease_remaining, ..
            } => (Instant::now() + *lease_remaining).checked_sub(lead),
            _ => None,
        };
        match ev {
            LeadershipEvent::Elected { .. } => {
                elected += 1;
                last_sent[i] = sent;
                if elected == n {
                    let elect = started.elapsed();
                    eprintln!("client: {n} elected in {elect:?}");
                    window = Some((Instant::now(), elect));
                    // Renewals and CPU time are counted from here.
                    renewals = 0;
                    lateness.clear();
                    mark(WINDOW_START);
                    cpu0 = cpu_time();
                }
            }
            LeadershipEvent::Renewed { .. } => {
                renewals += 1;
                if let (Some(prev), Some(now)) = (last_sent[i], sent) {
                    let due = prev + timing.renew_interval;
                    lateness.push(now.saturating_duration_since(due));
                }
                last_sent[i] = sent;
            }
            LeadershipEvent::RpcFailed { .. } => failed += 1,
            LeadershipEvent::Lost { .. } => lost += 1,
            _ => {}
        }
    }
    let cpu_end = cpu_time();
    if window.is_some() {
        mark(WINDOW_END);
    }
    let rss_delta = rss_bytes().saturating_sub(rss0);
    let (elect, window_cpu) = match window {
        Some((_, elect)) => (elect, cpu_end.saturating_sub(cpu0)),
        None => (started.elapsed(), Duration::ZERO),
    };
    Ok(Run {
        elected,
        elect,
        failed,
        lost,
        renewals,
        window_cpu,
        lateness,
        rss_delta,
    })
}

async fn run_stub(
    args: &Args,
    n: usize,
    url: &str,
    service: &str,
    jitter: bool,
) -> Result<Run, Box<dyn std::error::Error>> {
    let ttl = Duration::from_secs(args.ttl);
    let interval = ttl / 3;
    // What a careful hand-written loop does: bound the calls in flight.
    let permits = Arc::new(tokio::sync::Semaphore::new(100));
    let rss0 = rss_bytes();
    let started = Instant::now();
    let channel = tonic::transport::Endpoint::from_shared(url.to_string())?
        .tcp_nodelay(true)
        .connect()
        .await?;
    let stub = LeaderElectionServiceClient::new(channel);
    let elected = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let renewals = Arc::new(AtomicU64::new(0));
    let lateness = Arc::new(Mutex::new(Vec::new()));
    let all_elected = Arc::new(tokio::sync::Notify::new());
    let counting = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let client_id: Arc<str> = format!("stub-{}", std::process::id()).into();
    for i in 0..n {
        let mut stub = stub.clone();
        let permits = permits.clone();
        let (elected, failed, renewals, lateness, all_elected, counting) = (
            elected.clone(),
            failed.clone(),
            renewals.clone(),
            lateness.clone(),
            all_elected.clone(),
            counting.clone(),
        );
        let (service, client_id) = (service.to_string(), client_id.clone());
        let ttl_secs = args.ttl as i32;
        tokio::spawn(async move {
            let domain = format!("shard-{i}");
            let acquire = TryAcquireLockRequest {
                service: service.clone(),
                domain: domain.clone(),
                client_id: client_id.to_string(),
                ttl: ttl_secs,
            };
            let keep = KeepAliveRequest {
                service,
                domain,
                client_id: client_id.to_string(),
                ttl: ttl_secs,
            };
            loop {
                let permit = permits.acquire().await;
                let answer = stub.try_acquire_lock(acquire.clone()).await;
                drop(permit);
                match answer {
                    Ok(r) if r.get_ref().is_leader => break,
                    Ok(_) => tokio::time::sleep(Duration::from_secs(2)).await,
                    Err(_) => {
                        failed.fetch_add(1, Ordering::Relaxed);
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
            // The nominal due instant of the next renewal (the previous
            // send plus the interval), after a successful one.
            let mut due: Option<Instant> = None;
            let mut confirmed = false;
            loop {
                let permit = permits.acquire().await;
                // Timed like the client's: the send, after the local queue.
                let sent = Instant::now();
                if let Some(due) = due.filter(|_| counting.load(Ordering::Relaxed)) {
                    if let Ok(mut l) = lateness.lock() {
                        l.push(sent.saturating_duration_since(due));
                    }
                }
                let ok = stub.keep_alive(keep.clone()).await.is_ok();
                drop(permit);
                if !ok {
                    failed.fetch_add(1, Ordering::Relaxed);
                }
                if ok && !confirmed {
                    confirmed = true;
                    if elected.fetch_add(1, Ordering::Relaxed) + 1 == n as u64 {
                        all_elected.notify_one();
                    }
                } else if ok && counting.load(Ordering::Relaxed) {
                    renewals.fetch_add(1, Ordering::Relaxed);
                }
                let next = sent
                    + if ok {
                        interval
                    } else {
                        Duration::from_millis(100)
                    };
                due = ok.then_some(next);
                let early = if jitter && ok {
                    (interval / 10).mul_f64(fastrand::f64())
                } else {
                    Duration::ZERO
                };
                tokio::time::sleep_until(next - early).await;
            }
        });
    }
    let give_up = Duration::from_secs(args.give_up);
    let all = tokio::time::timeout(give_up, all_elected.notified())
        .await
        .is_ok();
    let elect = started.elapsed();
    let mut window_cpu = Duration::ZERO;
    if all {
        eprintln!("stub: {n} elected in {elect:?}");
        counting.store(true, Ordering::Relaxed);
        mark(WINDOW_START);
        let cpu0 = cpu_time();
        tokio::time::sleep(Duration::from_secs(args.window)).await;
        window_cpu = cpu_time().saturating_sub(cpu0);
        mark(WINDOW_END);
    }
    counting.store(false, Ordering::Relaxed);
    let rss_delta = rss_bytes().saturating_sub(rss0);
    let lateness = lateness.lock().map(|l| l.clone()).unwrap_or_default();
    Ok(Run {
        elected: elected.load(Ordering::Relaxed) as usize,
        elect,
        failed: failed.load(Ordering::Relaxed),
        lost: 0,
        renewals: renewals.load(Ordering::Relaxed),
        window_cpu,
        lateness,
        rss_delta,
    })
}
