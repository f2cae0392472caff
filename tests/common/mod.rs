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

/// Leadership events of many locks, each tagged with its lock's index.
pub type Indexed =
    futures::stream::SelectAll<futures::stream::BoxStream<'static, (usize, LeadershipEvent)>>;

/// `n` locks of `service` on `root`'s connection: `shard-0`, `shard-1`, …
pub fn shards(root: &QuorumQuestClient, service: &str, n: usize) -> Vec<QuorumQuestClient> {
    (0..n)
        .map(|i| root.for_scope(service, format!("shard-{i}")).unwrap())
        .collect()
}

/// Every lock's stream, read together until each was elected (each within
/// `within` of the one before).
pub async fn all_elected(shards: &[QuorumQuestClient], within: Duration) -> Indexed {
    let mut all = futures::stream::select_all(
        shards
            .iter()
            .enumerate()
            .map(|(i, s)| s.leadership().map(move |ev| (i, ev)).boxed()),
    );
    let mut elected = 0;
    while elected < shards.len() {
        match tokio::time::timeout(within, all.next()).await {
            Ok(Some((_, LeadershipEvent::Elected { .. }))) => elected += 1,
            other => panic!("{elected} of {} elected, then {other:?}", shards.len()),
        }
    }
    all
}

/// Every lock's stream, each read until it is elected, one lock after the
/// other and `gap` of (paused) time apart: their deadlines come in the
/// order of the locks.
pub async fn elected_one_by_one(shards: &[QuorumQuestClient], gap: Duration) -> Indexed {
    let mut streams = Vec::new();
    for (i, shard) in shards.iter().enumerate() {
        let mut stream = shard.leadership().map(move |ev| (i, ev)).boxed();
        match tokio::time::timeout(5 * SEC, stream.next()).await {
            Ok(Some((_, LeadershipEvent::Elected { .. }))) => {}
            other => panic!("shard {i}: expected Elected, got {other:?}"),
        }
        streams.push(stream);
        tokio::time::advance(gap).await;
    }
    futures::stream::select_all(streams)
}

/// Reads `all` until each of `n` locks reported `Renewed` once more; panics
/// on any other event, or on a second renewal of one lock before the
/// others' first.
pub async fn one_renewal_each(all: &mut Indexed, n: usize, what: &str) {
    let mut renewed = std::collections::HashSet::new();
    while renewed.len() < n {
        match tokio::time::timeout(10 * SEC, all.next()).await {
            Ok(Some((i, LeadershipEvent::Renewed { .. }))) => {
                assert!(renewed.insert(i), "{what}: shard {i} renewed twice");
            }
            other => panic!("{what}: {} of {n} renewed, then {other:?}", renewed.len()),
        }
    }
}

/// The locks of `service` held on `server` (named as by [`shards`]), in the
/// order their last `KeepAlive` arrived, with its arrival plus the TTL
/// (each lock's expiry; the same TTL for all, so differences of expiries
/// are differences of arrivals).
pub fn by_last_keep_alive(
    server: &TestServer,
    service: &str,
) -> Vec<(tokio::time::Instant, usize)> {
    let mut arrivals: Vec<_> = server
        .tenures()
        .into_iter()
        .filter(|t| t.service == service)
        .map(|t| (t.expiry, t.domain["shard-".len()..].parse().unwrap()))
        .collect();
    arrivals.sort();
    arrivals
}

/// A client over in-memory pipes whose connection carries one call at a
/// time, so that every other call on it queues.
pub async fn on_one_slot(server: &TestServer, ttl_secs: u64) -> QuorumQuestClient {
    in_memory(server, ttl_secs)
        .max_concurrent_calls(1)
        .build()
        .await
        .unwrap()
}

/// Starts `client`'s keep-alive on `runtime` (one the test then usually
/// leaves idle) and runs it until the client leads.
pub fn keep_alive_elected_on(runtime: &tokio::runtime::Runtime, client: &QuorumQuestClient) {
    runtime.block_on(async {
        client.start_keep_alive().await.unwrap();
        eventually(10 * SEC, "elected", || client.is_leader()).await;
    });
}
