//! Figures for the client's cost, each with a baseline measured in the same
//! run (nothing here asserts a time: the machines are small and noisy).
//!
//! ```text
//! cargo bench --features testing --bench client
//! ```
//!
//! 1. Call latency: `QuorumQuestClient::try_acquire_lock` against the raw
//!    generated tonic stub, over loopback to an in-process server,
//!    interleaved in rounds so that both see the same machine load.
//! 2. Many shards: memory (RSS) and CPU time per leading shard for N shards
//!    on one connection, each kept by a `leadership()` stream, against a
//!    hand-written minimal keep-alive loop per shard (one task, one stub).

#[path = "../examples/common/proc_stats.rs"]
mod proc_stats;

use proc_stats::{cpu_time, rss_bytes};

use std::time::{Duration, Instant};

use futures::StreamExt;
use quorum_quest_client::proto::leader_election_service_client::LeaderElectionServiceClient;
use quorum_quest_client::proto::{KeepAliveRequest, TryAcquireLockRequest};
use quorum_quest_client::testing::TestServer;
use quorum_quest_client::{LeadershipEvent, QuorumQuestClient};

const ROUNDS: usize = 10;
const CALLS_PER_ROUND: usize = 300;
const SHARDS: usize = 500;
const SHARD_TTL: Duration = Duration::from_secs(3);
const SHARD_WINDOW: Duration = Duration::from_secs(6);

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

async fn call_latency(server: &TestServer) {
    let client = QuorumQuestClient::builder("bench", "latency")
        .address(server.url())
        .ttl(Duration::from_secs(30))
        .client_id("bench-client")
        .build()
        .await
        .expect("client");
    let mut raw = LeaderElectionServiceClient::connect(server.url())
        .await
        .expect("raw stub");
    let request = TryAcquireLockRequest {
        service: "bench".into(),
        domain: "latency".into(),
        client_id: "bench-client".into(),
        ttl: 30,
    };
    let (mut ours, mut base) = (Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        let t = Instant::now();
        for _ in 0..CALLS_PER_ROUND {
            raw.try_acquire_lock(request.clone())
                .await
                .expect("raw call");
        }
        base.push(t.elapsed().as_secs_f64() * 1e6 / CALLS_PER_ROUND as f64);
        let t = Instant::now();
        for _ in 0..CALLS_PER_ROUND {
            client.try_acquire_lock().await.expect("client call");
        }
        ours.push(t.elapsed().as_secs_f64() * 1e6 / CALLS_PER_ROUND as f64);
    }
    let (o, b) = (median(ours), median(base));
    println!(
        "try_acquire_lock round trip (median of {ROUNDS} rounds x {CALLS_PER_ROUND} calls): client {o:.1} us, raw tonic stub {b:.1} us, ratio {:.2}x",
        o / b
    );
}

/// Our client: one `leadership()` stream per shard, all on one connection.
async fn shards_ours(server: &TestServer) -> (u64, Duration, u64) {
    let rss0 = rss_bytes();
    let base = QuorumQuestClient::builder("bench-ours", "base")
        .address(server.url())
        .ttl(SHARD_TTL)
        .build()
        .await
        .expect("client");
    let shards: Vec<_> = (0..SHARDS)
        .map(|i| {
            base.for_scope("bench-ours", format!("shard-{i}"))
                .expect("scope")
        })
        .collect();
    let mut streams: Vec<_> = shards.iter().map(QuorumQuestClient::leadership).collect();
    for s in &mut streams {
        match s.next().await {
            Some(LeadershipEvent::Elected { .. }) => {}
            other => panic!("shard not elected: {other:?}"),
        }
    }
    let rss = rss_bytes().saturating_sub(rss0);
    // Consume events in the background while measuring CPU.
    let drains: Vec<_> = streams
        .into_iter()
        .map(|mut s| tokio::spawn(async move { while s.next().await.is_some() {} }))
        .collect();
    let ka0 = server.calls(quorum_quest_client::RpcKind::KeepAlive);
    let cpu0 = cpu_time();
    tokio::time::sleep(SHARD_WINDOW).await;
    let cpu = cpu_time().saturating_sub(cpu0);
    let renewals = server.calls(quorum_quest_client::RpcKind::KeepAlive) - ka0;
    for d in drains {
        d.abort();
    }
    drop(shards);
    (rss, cpu, renewals)
}

/// Baseline: a minimal hand-written loop per shard (acquire once, then
/// keep-alive every ttl/3), no safety accounting at all.
async fn shards_baseline(server: &TestServer) -> (u64, Duration, u64) {
    let rss0 = rss_bytes();
    let channel = tonic::transport::Endpoint::from_shared(server.url())
        .expect("url")
        .connect()
        .await
        .expect("connect");
    let mut tasks = Vec::new();
    for i in 0..SHARDS {
        let mut stub = LeaderElectionServiceClient::new(channel.clone());
        let (tx, rx) = tokio::sync::oneshot::channel();
        tasks.push(tokio::spawn(async move {
            let domain = format!("shard-{i}");
            let won = stub
                .try_acquire_lock(TryAcquireLockRequest {
                    service: "bench-base".into(),
                    domain: domain.clone(),
                    client_id: "base".into(),
                    ttl: SHARD_TTL.as_secs() as i32,
                })
                .await
                .map(|r| r.into_inner().is_leader)
                .unwrap_or(false);
            let _ = tx.send(won);
            loop {
                tokio::time::sleep(SHARD_TTL / 3).await;
                let _ = stub
                    .keep_alive(KeepAliveRequest {
                        service: "bench-base".into(),
                        domain: domain.clone(),
                        client_id: "base".into(),
                        ttl: SHARD_TTL.as_secs() as i32,
                    })
                    .await;
            }
        }));
        assert!(rx.await.unwrap_or(false), "baseline shard not elected");
    }
    let rss = rss_bytes().saturating_sub(rss0);
    let ka0 = server.calls(quorum_quest_client::RpcKind::KeepAlive);
    let cpu0 = cpu_time();
    tokio::time::sleep(SHARD_WINDOW).await;
    let cpu = cpu_time().saturating_sub(cpu0);
    let renewals = server.calls(quorum_quest_client::RpcKind::KeepAlive) - ka0;
    for t in tasks {
        t.abort();
    }
    (rss, cpu, renewals)
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let server = TestServer::start().await.expect("server");
        call_latency(&server).await;

        // Baseline first: RSS only grows, so the figure measured second is
        // the pessimistic one for our client.
        let (b_rss, b_cpu, b_ka) = shards_baseline(&server).await;
        let (o_rss, o_cpu, o_ka) = shards_ours(&server).await;
        let per = |bytes: u64| bytes as f64 / SHARDS as f64 / 1024.0;
        println!(
            "{SHARDS} leading shards on one connection, memory: client {:.1} KiB/shard, hand-written loop {:.1} KiB/shard, ratio {:.2}x",
            per(o_rss),
            per(b_rss),
            per(o_rss) / per(b_rss).max(0.001)
        );
        // CPU here includes the in-process server's share of each call.
        let per_call = |cpu: Duration, calls: u64| cpu.as_secs_f64() * 1e6 / calls.max(1) as f64;
        println!(
            "{SHARDS} leading shards over {SHARD_WINDOW:?}: client {o_ka} renewals at {:.0} us CPU each, hand-written loop {b_ka} renewals at {:.0} us CPU each (server side included), ratio {:.2}x",
            per_call(o_cpu, o_ka),
            per_call(b_cpu, b_ka),
            per_call(o_cpu, o_ka) / per_call(b_cpu, b_ka).max(0.001)
        );
        server.shutdown().await;
    });
}
