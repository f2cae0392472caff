//! The example programs, run as processes: they must end by themselves, exit
//! with the right status, and print what they promise.
//!
//! The examples are built once (`cargo build --features testing,metrics --example ..`)
//! and their paths are taken from cargo's JSON messages, so a custom target
//! directory works too. Every run has a generous time limit; a run that
//! overstays it is killed and the test fails with its output.

#![cfg(feature = "testing")]

use std::collections::HashMap;
use std::io::Read;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::thread;
use std::time::{Duration, Instant};

/// More than any example needs, even on a loaded machine.
const LIMIT: Duration = Duration::from_secs(60);

/// Builds the examples under test (only those: another example that does not
/// build must not fail these tests) once per test binary; returns name ->
/// executable.
fn executables() -> &'static HashMap<String, PathBuf> {
    static EXECUTABLES: OnceLock<HashMap<String, PathBuf>> = OnceLock::new();
    EXECUTABLES.get_or_init(|| {
        let output = Command::new(env!("CARGO"))
            .args([
                "build",
                "--features",
                "testing,metrics",
                "--example",
                "quorum-quest-example",
                "--example",
                "stream",
                "--example",
                "pipeline",
                "--example",
                "exit",
                "--example",
                "metrics",
                "--message-format=json",
                "--quiet",
            ])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .stderr(Stdio::inherit())
            .output()
            .expect("cannot run cargo to build the examples");
        assert!(
            output.status.success(),
            "building the examples failed: {}",
            output.status
        );
        // One JSON object per line; the artifacts of binaries carry an
        // "executable" field. Paths here contain no escaped characters.
        let stdout = String::from_utf8_lossy(&output.stdout);
        let mut found = HashMap::new();
        for line in stdout.lines() {
            if !line.contains("\"reason\":\"compiler-artifact\"") {
                continue;
            }
            let Some(start) = line.find("\"executable\":\"") else {
                continue;
            };
            let rest = &line[start + "\"executable\":\"".len()..];
            let Some(end) = rest.find('"') else { continue };
            let path = PathBuf::from(&rest[..end]);
            if let Some(stem) = path.file_stem().and_then(|s| s.to_str()) {
                found.insert(stem.to_string(), path.clone());
            }
        }
        found
    })
}

fn executable(name: &str) -> &'static PathBuf {
    executables().get(name).unwrap_or_else(|| {
        panic!(
            "example {name} was not built; built: {:?}",
            executables().keys()
        )
    })
}

/// What one run of an example did.
struct Run {
    status: ExitStatus,
    stdout: String,
    stderr: String,
    elapsed: Duration,
}

impl Run {
    fn transcript(&self) -> String {
        format!(
            "status: {}, after {:?}\n--- stdout ---\n{}--- stderr ---\n{}",
            self.status, self.elapsed, self.stdout, self.stderr
        )
    }

    fn assert_success(&self) {
        assert!(
            self.status.success(),
            "expected success\n{}",
            self.transcript()
        );
    }

    fn assert_stdout_has(&self, needles: &[&str]) {
        for needle in needles {
            assert!(
                self.stdout.contains(needle),
                "stdout lacks {needle:?}\n{}",
                self.transcript()
            );
        }
    }

    /// `needles` appear in stdout in this order.
    fn assert_stdout_in_order(&self, needles: &[&str]) {
        let mut from = 0;
        for needle in needles {
            match self.stdout[from..].find(needle) {
                Some(at) => from += at + needle.len(),
                None => panic!(
                    "stdout lacks {needle:?} after the previous lines {needles:?}\n{}",
                    self.transcript()
                ),
            }
        }
    }
}

fn drain(mut pipe: impl Read + Send + 'static) -> thread::JoinHandle<String> {
    thread::spawn(move || {
        let mut bytes = Vec::new();
        let _ = pipe.read_to_end(&mut bytes);
        String::from_utf8_lossy(&bytes).into_owned()
    })
}

/// Waits for `child` up to `limit`, killing it if it overstays.
fn wait_bounded(child: &mut Child, limit: Duration) -> Option<ExitStatus> {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().expect("cannot poll the example") {
            return Some(status);
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        thread::sleep(Duration::from_millis(20));
    }
}

fn run_example(name: &str, args: &[&str], limit: Duration) -> Run {
    let mut child = Command::new(executable(name))
        .args(args)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start example {name}: {e}"));
    let start = Instant::now();
    let stdout = drain(child.stdout.take().expect("piped stdout"));
    let stderr = drain(child.stderr.take().expect("piped stderr"));
    let status = wait_bounded(&mut child, limit);
    let elapsed = start.elapsed();
    let run = Run {
        status: status.unwrap_or_default(),
        stdout: stdout.join().expect("stdout reader"),
        stderr: stderr.join().expect("stderr reader"),
        elapsed,
    };
    assert!(
        status.is_some(),
        "example {name} {args:?} did not exit within {limit:?}; killed\n{}",
        run.transcript()
    );
    run
}

#[test]
fn main_example_embedded_is_elected_hands_over_and_exits_by_itself() {
    let run = run_example(
        "quorum-quest-example",
        &["--embedded", "--duration", "3"],
        LIMIT,
    );
    run.assert_success();
    run.assert_stdout_has(&["Embedded mode", "(--server is ignored)"]);
    run.assert_stdout_in_order(&[
        "Client ",
        "Became leader! Starting leader tasks...",
        "doing leader work",
        "[standby] another node is leader; standing by",
        "Shutting down (duration elapsed)",
        "Lost leadership! Stopping leader tasks...",
        "Released the lock and stopped keep-alive.",
        "[standby] became leader",
        "[standby] resigned",
        "Goodbye.",
    ]);
    // The leader work is bound to the term: not one tick after the loss.
    let after_loss = &run.stdout[run.stdout.find("Lost leadership!").expect("lost")..];
    assert!(
        !after_loss.contains("doing leader work"),
        "leader work after the loss\n{}",
        run.transcript()
    );
    // The status line shows the lease counting down between renewals.
    let leases: Vec<&str> = run
        .stdout
        .lines()
        .filter_map(|l| l.strip_prefix("Status: leader=yes, remaining lease "))
        .collect();
    assert!(
        leases.len() >= 2 && leases[0] != leases[1],
        "the lease should count down between status lines\n{}",
        run.transcript()
    );
    // --duration is honoured: not before, and not much after.
    assert!(
        run.elapsed >= Duration::from_millis(2900),
        "exited too early\n{}",
        run.transcript()
    );
}

#[test]
fn main_example_rejects_a_zero_ttl_before_connecting() {
    // Nothing listens on port 1: the ttl must be refused before any connect.
    let run = run_example(
        "quorum-quest-example",
        &["--ttl", "0", "--server", "http://127.0.0.1:1"],
        LIMIT,
    );
    assert!(
        !run.status.success(),
        "expected failure\n{}",
        run.transcript()
    );
    assert!(
        run.stderr.contains("invalid parameter: ttl"),
        "the error must name the ttl\n{}",
        run.transcript()
    );
    assert!(
        !run.stderr.contains("connect"),
        "validation must come before connecting\n{}",
        run.transcript()
    );
}

#[test]
fn main_example_reports_an_unreachable_server_promptly() {
    let run = run_example(
        "quorum-quest-example",
        &["--server", "http://127.0.0.1:1"],
        LIMIT,
    );
    assert!(
        !run.status.success(),
        "expected failure\n{}",
        run.transcript()
    );
    assert!(
        run.stderr
            .contains("could not connect to the Quorum Quest server"),
        "expected the connection error\n{}",
        run.transcript()
    );
    // A refused connection fails at once; the connect timeout is 5 s.
    assert!(
        run.elapsed < Duration::from_secs(20),
        "took too long to give up\n{}",
        run.transcript()
    );
}

#[test]
fn stream_example_shows_election_handover_and_release() {
    let run = run_example("stream", &[], LIMIT);
    run.assert_success();
    run.assert_stdout_in_order(&[
        "alpha  Elected   term 1",
        "bravo  Follower",
        "alpha  Renewed   term 1",
        "alpha  steps down",
        "alpha  Lost      term 1 (released)",
        "alpha  resigned",
        "bravo  Elected   term 1",
        "bravo  Renewed   term 1",
        "bravo  Lost      term 1 (released)",
        "bravo  resigned",
        "done",
    ]);
}

#[test]
fn pipeline_example_stops_leader_work_when_the_term_ends() {
    let run = run_example("pipeline", &[], LIMIT);
    run.assert_success();
    run.assert_stdout_in_order(&[
        "transition Elected term 1",
        "work       tick 1 (term 1)",
        "set_owner",
        "transition Lost term 1 (server says another node owns the lock)",
        "none after the term ended (term active: false)",
        "transition Elected term 2",
        "batch of 3 done within term 2",
        "released; done",
    ]);
    run.assert_stdout_has(&[
        "changes    leader = true",
        "changes    leader = false",
        "until_lost ended after the first Lost: Elected term 1",
    ]);
}

#[test]
fn metrics_example_prints_a_prometheus_scrape_and_health() {
    let run = run_example("metrics", &[], LIMIT);
    run.assert_success();
    run.assert_stdout_has(&[
        "# TYPE quorum_quest_leader gauge",
        "quorum_quest_transitions_total{",
        "quorum_quest_rpc_duration_seconds",
        "quorum_quest_renewal_failures_total{",
        "# alpha: ",
        "# bravo: ",
    ]);
}

// ----- exits: real processes that lead, then exit; the server tells how
// their tenure ended -----

mod exits {
    use std::process::Stdio;
    use std::time::Duration;

    use futures::StreamExt;
    use quorum_quest_client::testing::{TenureEnd, TestServer};
    use quorum_quest_client::{LeadershipEvent, QuorumQuestClient};
    use tokio::io::{AsyncBufReadExt, BufReader, Lines};
    use tokio::process::{Child, ChildStdout, Command};
    use tokio::time::{timeout, Instant};

    use super::{executable, LIMIT};

    /// The lock's TTL: far longer than any handover these tests allow, so
    /// a lock left to expire cannot pass for a released one.
    const TTL_SECS: u64 = 30;
    /// The standby's retry period: "elected within one retry period".
    const RETRY: Duration = Duration::from_millis(500);

    struct Leader {
        child: Child,
        lines: Lines<BufReader<ChildStdout>>,
        client_id: String,
    }

    /// Starts `examples/exit.rs` on `server` and waits until it leads.
    async fn lead(server: &TestServer, service: &str, extra: &[&str]) -> Leader {
        let mut child = Command::new(executable("exit"))
            .args(["--server", &server.url(), "--service", service])
            .args(["--ttl", &TTL_SECS.to_string()])
            .args(extra)
            .env_remove("RUST_LOG")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .expect("the exit example starts");
        let mut lines = BufReader::new(child.stdout.take().expect("piped stdout")).lines();
        let line = timeout(LIMIT, lines.next_line())
            .await
            .expect("the example leads in time")
            .expect("stdout readable")
            .expect("the example prints before exiting");
        let client_id = line
            .strip_prefix("leading ")
            .unwrap_or_else(|| panic!("expected `leading <id>`, got {line:?}"))
            .to_string();
        Leader {
            child,
            lines,
            client_id,
        }
    }

    /// A contender in this process that stands by as a follower.
    async fn standby(
        server: &TestServer,
        service: &str,
    ) -> (QuorumQuestClient, quorum_quest_client::Leadership) {
        let client = QuorumQuestClient::builder(service, "production")
            .address(server.url())
            .ttl(Duration::from_secs(TTL_SECS))
            .retry_period(RETRY)
            .build()
            .await
            .expect("standby connects");
        let mut stream = client.leadership();
        match timeout(LIMIT, stream.next()).await {
            Ok(Some(LeadershipEvent::Follower)) => {}
            other => panic!("the standby should stand by first, got {other:?}"),
        }
        (client, stream)
    }

    /// Waits for the leader process to exit; then the server must show its
    /// tenure ended by a release (not left to expire), and the standby must
    /// be elected within about one retry period of the exit.
    async fn assert_released_on_exit(
        server: &TestServer,
        service: &str,
        mut leader: Leader,
        mut standby: quorum_quest_client::Leadership,
    ) {
        // The standby stands by: let the leader go on to its exit.
        drop(leader.child.stdin.take());
        let status = timeout(LIMIT, leader.child.wait())
            .await
            .expect("the example exits in time")
            .expect("wait for the example");
        let exited = Instant::now();
        assert!(status.success(), "the example failed: {status}");
        let mut rest = Vec::new();
        while let Ok(Some(line)) = leader.lines.next_line().await {
            rest.push(line);
        }
        assert_eq!(rest.last().map(String::as_str), Some("exiting"), "{rest:?}");

        let tenure = server
            .tenures()
            .into_iter()
            .find(|t| t.service == service && t.owner.starts_with(&leader.client_id))
            .expect("the leader's tenure is on record");
        assert_eq!(
            tenure.ended_by,
            TenureEnd::Released,
            "the lock must be released before the process exits, not left to expire: {tenure:?}"
        );
        assert!(tenure.end <= exited, "released after the exit? {tenure:?}");

        let elected = loop {
            match timeout(LIMIT, standby.next()).await {
                Ok(Some(LeadershipEvent::Elected { .. })) => break Instant::now(),
                Ok(Some(_)) => continue,
                other => panic!("the standby was not elected: {other:?}"),
            }
        };
        let gap = elected.saturating_duration_since(exited);
        eprintln!("standby elected {gap:?} after the leader's exit (retry period {RETRY:?}, ttl {TTL_SECS} s)");
        // One retry period plus a generous allowance for a busy machine; a
        // lock left to expire would take the whole TTL (30 s).
        assert!(
            gap < RETRY + Duration::from_secs(5),
            "the standby waited {gap:?}: the lock was not released"
        );
        standby.resign().await.expect("standby resigns");
    }

    /// Sends SIGTERM to `pid`, as systemd, Docker and Kubernetes do.
    #[cfg(unix)]
    fn sigterm(pid: u32) {
        let pid = libc::pid_t::try_from(pid).expect("a pid fits");
        // SAFETY: kill(2) on a child process this test started.
        let sent = unsafe { libc::kill(pid, libc::SIGTERM) };
        assert_eq!(sent, 0, "SIGTERM could not be sent");
    }

    async fn exit_releases(how: &str, extra: &[&str]) {
        let server = TestServer::start().await.expect("test server starts");
        let service = format!("exit-{how}{}", extra.concat());
        let leader = lead(&server, &service, &[&["--how", how][..], extra].concat()).await;
        let (_standby_client, standby) = standby(&server, &service).await;
        assert_released_on_exit(&server, &service, leader, standby).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_leader_that_returns_from_main_with_its_client_releases_before_it_exits() {
        exit_releases("return", &[]).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_leader_that_drops_its_client_and_returns_releases_before_it_exits() {
        exit_releases("drop", &[]).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_leader_that_returns_holding_a_leadership_stream_releases_before_it_exits() {
        exit_releases("stream", &[]).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn shutdown_releases_before_exit_on_a_current_thread_runtime_too() {
        exit_releases("shutdown", &["--current-thread"]).await;
    }

    #[cfg(unix)]
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sigterm_makes_a_leader_release_and_exit() {
        let server = TestServer::start().await.expect("test server starts");
        let service = "exit-sigterm";
        let leader = lead(&server, service, &["--how", "signal"]).await;
        let (_standby_client, standby) = standby(&server, service).await;
        sigterm(leader.child.id().expect("the child runs"));
        assert_released_on_exit(&server, service, leader, standby).await;
    }

    #[cfg(unix)]
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_main_example_releases_on_sigterm() {
        let server = TestServer::start().await.expect("test server starts");
        let mut child = Command::new(executable("quorum-quest-example"))
            .args(["--server", &server.url(), "--service", "sigterm-example"])
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .expect("the example starts");
        let mut lines = BufReader::new(child.stdout.take().expect("piped stdout")).lines();
        let mut seen = Vec::new();
        while !seen
            .iter()
            .any(|l: &String| l.contains("doing leader work"))
        {
            match timeout(LIMIT, lines.next_line()).await {
                Ok(Ok(Some(line))) => seen.push(line),
                other => panic!("the example did not lead and work: {other:?}; {seen:?}"),
            }
        }
        sigterm(child.id().expect("the child runs"));
        let status = timeout(LIMIT, child.wait())
            .await
            .expect("the example exits in time")
            .expect("wait for the example");
        while let Ok(Some(line)) = lines.next_line().await {
            seen.push(line);
        }
        assert!(status.success(), "{status}; {seen:?}");
        assert!(
            seen.iter()
                .any(|l| l == "Shutting down (SIGTERM): releasing the lock"),
            "{seen:?}"
        );
        let tenure = server
            .tenures()
            .into_iter()
            .find(|t| t.service == "sigterm-example")
            .expect("the example's tenure is on record");
        assert_eq!(tenure.ended_by, TenureEnd::Released, "{seen:?}");
    }
}
