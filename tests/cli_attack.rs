#![cfg(all(unix, feature = "cli"))]
//! Attacks on `quorum-quest run`: what survives when the tool itself is
//! killed (SIGKILL, the OOM killer).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use quorum_quest_client::testing::TestServer;
use tokio::time::Instant;

const BIN: &str = env!("CARGO_BIN_EXE_quorum-quest");
const WITHIN: Duration = Duration::from_secs(30);

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "qq-cli-attack-{}-{name}-{}",
        std::process::id(),
        fastrand::u32(..)
    ));
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

fn tool(url: &str, id: &str, script: &str, env: &[(&str, &Path)], dir: &Path) -> Child {
    let mut cmd = Command::new(BIN);
    cmd.args(["run", "--service", "jobs", "--domain", "killed-tool"])
        .args(["--server", url, "--client-id", id])
        .args(["--ttl", "3", "--kill-grace", "500ms"])
        .args(["--", "sh", "-c", script])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join(format!("{id}.err"))).expect("stderr file"));
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.spawn().expect("the quorum-quest binary starts")
}

fn beats(path: &Path) -> Vec<u128> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let until = Instant::now() + WITHIN;
    while !cond() {
        assert!(Instant::now() < until, "not within {WITHIN:?}: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The tool is SIGKILLed while its command runs a worker in the background
/// (`sh -c 'worker & wait'`, the usual shape). The kernel kills the command
/// (`PR_SET_PDEATHSIG`); before the guard process, nothing killed the rest
/// of its process group, and the worker went on with leader work after the
/// lock expired and another node was elected. The next leader's first
/// heartbeat must come after the old worker's last one.
#[tokio::test]
async fn a_killed_tools_descendants_die_before_the_next_leader_starts() {
    let server = TestServer::start().await.expect("server");
    let dir = scratch("killed-tool");
    let (a_hb, b_hb, gc_pid) = (dir.join("a.hb"), dir.join("b.hb"), dir.join("gc.pid"));
    let worker = r#"(while :; do date +%s%N >> "$HB"; sleep 0.01; done) &
        echo $! > "$GCPID"
        wait"#;
    let mut a = tool(
        &server.url(),
        "A",
        worker,
        &[("HB", &a_hb), ("GCPID", &gc_pid)],
        &dir,
    );
    eventually("A's worker beats", || !beats(&a_hb).is_empty()).await;
    let read_pid = || {
        std::fs::read_to_string(&gc_pid)
            .ok()
            .and_then(|s| s.trim().parse::<i32>().ok())
    };
    eventually("the worker's pid is written", || read_pid().is_some()).await;
    let worker_pid = read_pid().expect("pid");

    a.kill().expect("SIGKILL the tool");
    let _ = a.wait();
    let b_gc = dir.join("b.pid");
    let mut b = tool(
        &server.url(),
        "B",
        worker,
        &[("HB", &b_hb), ("GCPID", &b_gc)],
        &dir,
    );
    eventually("B's worker beats", || !beats(&b_hb).is_empty()).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let a_last = beats(&a_hb).last().copied().unwrap_or(0);
    let b_first = beats(&b_hb).first().copied().unwrap_or(0);
    // SAFETY: kill(pid, 0) only checks existence.
    let a_worker_alive = unsafe { libc::kill(worker_pid, 0) } == 0;
    // Clean up before asserting.
    // SAFETY: signals to processes this test started.
    unsafe {
        libc::kill(worker_pid, libc::SIGKILL);
        libc::kill(i32::try_from(b.id()).expect("pid"), libc::SIGTERM);
    }
    let _ = b.wait();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        a_last < b_first && !a_worker_alive,
        "A's worker (pid {worker_pid}, alive: {a_worker_alive}) beat {:.1} ms after B's first beat: two leaders",
        (a_last as f64 - b_first as f64) / 1e6
    );
}
