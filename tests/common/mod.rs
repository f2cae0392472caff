//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::time::Duration;

use futures::{Stream, StreamExt};
use quorum_quest_client::testing::TestServer;
use quorum_quest_client::{ClientBuilder, LeadershipEvent, LossReason, QuorumQuestClient};

pub const SERVICE: &str = "svc";
pub const DOMAIN: &str = "dom";

pub const SEC: Duration = Duration::from_secs(1);

pub fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// A TestServer on a free loopback port.
pub async fn server() -> TestServer {
    TestServer::start().await.expect("test server starts")
}

/// A builder for a client on `server` over in-memory pipes (for paused time).
pub fn in_memory(server: &TestServer, ttl_secs: u64) -> ClientBuilder {
    QuorumQuestClient::builder(SERVICE, DOMAIN)
        .channel(server.in_memory_channel())
        .ttl(Duration::from_secs(ttl_secs))
        .jitter_seed(1)
}

/// A builder for a client on `url` over loopback TCP.
pub fn over_tcp(url: &str, ttl_secs: u64) -> ClientBuilder {
    QuorumQuestClient::builder(SERVICE, DOMAIN)
        .address(url)
        .ttl(Duration::from_secs(ttl_secs))
}

/// The next event, or a panic naming what was awaited after `within`.
pub async fn next<S>(stream: &mut S, within: Duration, what: &str) -> LeadershipEvent
where
    S: Stream<Item = LeadershipEvent> + Unpin,
{
    match tokio::time::timeout(within, stream.next()).await {
        Ok(Some(ev)) => ev,
        Ok(None) => panic!("stream ended while waiting for {what}"),
        Err(_) => panic!("no event within {within:?} while waiting for {what}"),
    }
}

/// The next `Elected` within `within` (other events skipped), or a panic
/// saying what was awaited.
pub async fn until_elected<S>(stream: &mut S, within: Duration, what: &str) -> LeadershipEvent
where
    S: Stream<Item = LeadershipEvent> + Unpin,
{
    until(stream, within, what, LeadershipEvent::is_elected).await
}

/// Skips events until one matches `pred`; panics after `within`.
pub async fn until<S, P>(
    stream: &mut S,
    within: Duration,
    what: &str,
    mut pred: P,
) -> LeadershipEvent
where
    S: Stream<Item = LeadershipEvent> + Unpin,
    P: FnMut(&LeadershipEvent) -> bool,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let ev = next(stream, left, what).await;
        if pred(&ev) {
            return ev;
        }
    }
}

pub fn is_lost_with(ev: &LeadershipEvent, reason: LossReason) -> bool {
    matches!(ev, LeadershipEvent::Lost { reason: r, .. } if *r == reason)
}

/// Polls `cond` every 10 ms until it holds; panics after `within`.
pub async fn eventually<F: FnMut() -> bool>(within: Duration, what: &str, mut cond: F) {
    let deadline = tokio::time::Instant::now() + within;
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "not true within {within:?}: {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A multi-thread runtime with `workers` workers.
pub fn multi_thread(workers: usize) -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()
        .unwrap()
}

/// A long-lived runtime with one worker (the test's "home").
pub fn home_runtime() -> tokio::runtime::Runtime {
    multi_thread(1)
}

/// A current-thread runtime, run only inside its `block_on`s (a sync
/// wrapper's, or one that comes and goes): idle, but alive, in between.
pub fn current_thread() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}
