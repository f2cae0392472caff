//! The leadership stream's guarantees (SPEC §3), each against a real
//! TestServer: under paused time over in-memory pipes where timing must be
//! exact, and over loopback TCP (with a FaultProxy for partitions) end to end.
#![cfg(feature = "testing")]

mod common;

use common::*;
use futures::StreamExt;
use quorum_quest_client::testing::{FaultProxy, ProxyMode, TestServer};
use quorum_quest_client::{LeadershipEvent, LossReason, QuorumQuestClient, RpcKind};
use tokio::time::Instant;

#[tokio::test(start_paused = true)]
async fn leader_is_elected_then_renews_every_renew_interval() {
    let server = server().await;
    let client = in_memory(&server, 3).build().await.unwrap();
    let mut stream = client.leadership();
    let LeadershipEvent::Elected {
        term,
        lease_remaining,
    } = next(&mut stream, 5 * SEC, "Elected").await
    else {
        panic!("first event must be Elected");
    };
    // ttl 3 s minus the default margin (300 ms), timed from the send instant.
    assert!(
        lease_remaining <= ms(2700) && lease_remaining > ms(2650),
        "{lease_remaining:?}"
    );
    assert_eq!(term.id(), 1);
    let mut last = Instant::now();
    for _ in 0..6 {
        let ev = next(&mut stream, 2 * SEC, "Renewed").await;
        assert!(
            matches!(ev, LeadershipEvent::Renewed { term_id: 1, .. }),
            "{ev:?}"
        );
        let gap = last.elapsed();
        // The renew interval (1 s), up to a tenth earlier (renewal jitter,
        // only ever earlier), never later.
        assert!(gap >= ms(890) && gap <= ms(1050), "renewal gap {gap:?}");
        last = Instant::now();
        assert!(term.is_active());
    }
    let lock = server.lock(SERVICE, DOMAIN).expect("lock held");
    assert_eq!(lock.owner, client.client_id());
}

#[tokio::test(start_paused = true)]
async fn hung_server_makes_the_leader_step_down_at_the_safe_deadline() {
    let server = server().await;
    let client = in_memory(&server, 3).build().await.unwrap();
    let mut stream = client.leadership();
    let LeadershipEvent::Elected { term, .. } = next(&mut stream, 5 * SEC, "Elected").await else {
        panic!("expected Elected");
    };
    until(&mut stream, 3 * SEC, "Renewed", |e| {
        matches!(e, LeadershipEvent::Renewed { .. })
    })
    .await;
    let deadline = term.deadline().expect("leading");
    server.pause();
    let lost = until(&mut stream, 10 * SEC, "Lost", LeadershipEvent::is_lost).await;
    let at = Instant::now();
    assert!(is_lost_with(&lost, LossReason::Expired), "{lost:?}");
    assert!(at >= deadline, "stepped down {:?} early", deadline - at);
    assert!(
        at - deadline <= ms(20),
        "stepped down {:?} late",
        at - deadline
    );
    assert!(term.is_ended());
    // The server still counts us as owner: our lease ended first.
    let lock = server
        .lock(SERVICE, DOMAIN)
        .expect("server lock still live");
    assert_eq!(lock.owner, client.client_id());
    assert!(
        lock.remaining >= ms(250),
        "server expiry only {:?} after our step-down",
        lock.remaining
    );
    server.resume();
}

#[tokio::test(start_paused = true)]
async fn a_burst_of_unavailable_while_the_lease_is_valid_costs_nothing() {
    let server = server().await;
    let client = in_memory(&server, 3).build().await.unwrap();
    let mut stream = client.leadership();
    assert!(next(&mut stream, 5 * SEC, "Elected").await.is_elected());
    // Nine refusals: three calls, each tried three times by the client.
    server.fail_next(
        9,
        Some(RpcKind::KeepAlive),
        tonic::Status::unavailable("injected"),
    );
    let mut failures = 0;
    let mut renewed_after = 0;
    let end = Instant::now() + 10 * SEC;
    while Instant::now() < end {
        match next(&mut stream, 3 * SEC, "any event").await {
            LeadershipEvent::RpcFailed {
                code,
                lease_remaining,
                ..
            } => {
                // Retries back off but stay well inside the lease.
                assert!(renewed_after == 0, "a failure after the burst");
                assert_eq!(code, tonic::Code::Unavailable);
                assert!(lease_remaining.is_some(), "still leader while retrying");
                failures += 1;
            }
            LeadershipEvent::Renewed { .. } if failures == 3 => renewed_after += 1,
            LeadershipEvent::Renewed { .. } => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(failures, 3);
    assert!(
        renewed_after >= 5,
        "renewals after the burst: {renewed_after}"
    );
    assert!(client.is_leader());
}

#[tokio::test(start_paused = true)]
async fn a_negative_lease_is_a_loss_at_once_and_ends_the_term_first() {
    let server = server().await;
    let client = in_memory(&server, 3).build().await.unwrap();
    let mut stream = client.leadership();
    let LeadershipEvent::Elected { term, .. } = next(&mut stream, 5 * SEC, "Elected").await else {
        panic!("expected Elected");
    };
    let work = term.spawn(futures::future::pending::<()>());
    server.set_owner(SERVICE, DOMAIN, "someone-else", 30 * SEC);
    let stolen_at = Instant::now();
    let lost = until(&mut stream, 5 * SEC, "Lost", LeadershipEvent::is_lost).await;
    assert!(is_lost_with(&lost, LossReason::Rejected), "{lost:?}");
    // Noticed at the very next renewal, not at lease expiry.
    assert!(
        stolen_at.elapsed() <= ms(1010),
        "noticed after {:?}",
        stolen_at.elapsed()
    );
    assert!(term.is_ended());
    assert_eq!(
        work.await.unwrap(),
        None,
        "leader work was stopped with the term"
    );
    assert!(!client.is_leader());
    let ev = next(&mut stream, 5 * SEC, "Follower").await;
    assert!(matches!(ev, LeadershipEvent::Follower), "{ev:?}");
}

#[tokio::test(start_paused = true)]
async fn after_a_loss_the_stream_contends_again_with_strict_alternation() {
    let server = server().await;
    let client = in_memory(&server, 3).build().await.unwrap();
    let mut stream = client.leadership();
    let mut log = Vec::new();
    for round in 0..4 {
        let ev = until(&mut stream, 10 * SEC, "Elected", |e| {
            e.is_elected() || e.is_lost()
        })
        .await;
        let LeadershipEvent::Elected { term, .. } = &ev else {
            panic!("round {round}: expected Elected, got {ev:?}");
        };
        assert_eq!(term.id(), round + 1);
        log.push("elected");
        // Another node wins for 2 s, then its lock expires.
        server.set_owner(SERVICE, DOMAIN, "other", 2 * SEC);
        let ev = until(&mut stream, 10 * SEC, "Lost", |e| {
            e.is_elected() || e.is_lost()
        })
        .await;
        assert!(is_lost_with(&ev, LossReason::Rejected), "{ev:?}");
        log.push("lost");
    }
    assert_eq!(log.len(), 8);
}

#[tokio::test(start_paused = true)]
async fn follower_is_reported_once_not_on_every_retry() {
    let server = server().await;
    server.set_owner(SERVICE, DOMAIN, "other", 3600 * SEC);
    let client = in_memory(&server, 3).build().await.unwrap();
    let mut stream = client.leadership();
    assert!(matches!(
        next(&mut stream, 5 * SEC, "Follower").await,
        LeadershipEvent::Follower
    ));
    let quiet = tokio::time::timeout(10 * SEC, stream.next()).await;
    assert!(
        quiet.is_err(),
        "no further event while nothing changes: {quiet:?}"
    );
    // It kept trying all along (retry period 1 s, jittered by ±20 %).
    let tries = server.calls(RpcKind::TryAcquireLock);
    assert!((8..=14).contains(&tries), "tries in 10 s: {tries}");
}

#[tokio::test(start_paused = true)]
async fn dropping_the_stream_while_leader_releases_the_lock() {
    let server = server().await;
    let client = in_memory(&server, 10).build().await.unwrap();
    let mut stream = client.leadership();
    let LeadershipEvent::Elected { term, .. } = next(&mut stream, 5 * SEC, "Elected").await else {
        panic!("expected Elected");
    };
    drop(stream);
    eventually(SEC, "lock released after drop", || {
        server.lock(SERVICE, DOMAIN).is_none()
    })
    .await;
    assert!(term.is_ended());
    assert!(!client.is_leader());
    assert_eq!(server.calls(RpcKind::ReleaseLock), 1);
}

#[tokio::test(start_paused = true)]
async fn resign_returns_after_the_server_released_the_lock() {
    let server = server().await;
    let client = in_memory(&server, 10).build().await.unwrap();
    let mut stream = client.leadership();
    let LeadershipEvent::Elected { term, .. } = next(&mut stream, 5 * SEC, "Elected").await else {
        panic!("expected Elected");
    };
    stream.resign().await.unwrap();
    assert!(server.lock(SERVICE, DOMAIN).is_none());
    assert!(term.is_ended());
    // The campaign is over: nothing renews or re-acquires afterwards.
    let calls = server.calls(RpcKind::TryAcquireLock) + server.calls(RpcKind::KeepAlive);
    tokio::time::sleep(30 * SEC).await;
    assert_eq!(
        server.calls(RpcKind::TryAcquireLock) + server.calls(RpcKind::KeepAlive),
        calls
    );
    // Already released: dropping the client sends no second release.
    drop(client);
    tokio::time::sleep(SEC).await;
    assert_eq!(server.calls(RpcKind::ReleaseLock), 1);
}

#[tokio::test(start_paused = true)]
async fn every_stream_of_a_client_is_a_view_of_one_contender() {
    let server = server().await;
    let client = in_memory(&server, 3).build().await.unwrap();
    let mut first = client.leadership();
    let LeadershipEvent::Elected { term, .. } = next(&mut first, 5 * SEC, "Elected").await else {
        panic!("expected Elected");
    };
    // A second stream joins mid-term and starts with the running term.
    let mut second = client.leadership();
    match next(&mut second, SEC, "snapshot").await {
        LeadershipEvent::Elected { term: t, .. } => assert_eq!(t, term),
        other => panic!("expected the running term, got {other:?}"),
    }
    drop(second);
    // The first stream still campaigns: the lock is kept.
    let end = Instant::now() + 5 * SEC;
    while Instant::now() < end {
        let ev = next(&mut first, 2 * SEC, "Renewed").await;
        assert!(matches!(ev, LeadershipEvent::Renewed { .. }), "{ev:?}");
    }
    assert_eq!(
        server.lock(SERVICE, DOMAIN).map(|l| l.owner).as_deref(),
        Some(client.client_id())
    );
    // release_lock on the client is seen by the stream, which then contends again.
    client.release_lock().await.unwrap();
    let ev = until(&mut first, SEC, "Lost", |e| e.is_lost()).await;
    assert!(is_lost_with(&ev, LossReason::Released));
    let ev = until(&mut first, 5 * SEC, "Elected", |e| e.is_elected()).await;
    assert!(matches!(ev, LeadershipEvent::Elected { term, .. } if term.id() == 2));
}

#[tokio::test(start_paused = true)]
async fn many_scopes_share_one_connection() {
    let server = server().await;
    let base = in_memory(&server, 5).build().await.unwrap();
    let shards: Vec<QuorumQuestClient> = (0..32)
        .map(|i| base.for_scope("indexer", format!("shard-{i}")).unwrap())
        .collect();
    let mut streams: Vec<_> = shards.iter().map(QuorumQuestClient::leadership).collect();
    for s in &mut streams {
        assert!(next(s, 5 * SEC, "Elected").await.is_elected());
    }
    for (i, shard) in shards.iter().enumerate() {
        assert!(shard.is_leader());
        let lock = server.lock("indexer", &format!("shard-{i}")).unwrap();
        assert_eq!(lock.owner, base.client_id());
    }
    assert_eq!(
        server.connections_accepted(),
        1,
        "all shards on one HTTP/2 connection"
    );
}

// ---------- end to end over loopback TCP ----------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_leader_steps_down_before_anyone_else_is_elected() {
    let server = server().await;
    let mut gaps = Vec::new();
    for trial in 0..3 {
        let domain = format!("partition-{trial}");
        let proxy = FaultProxy::start(server.addr()).await.unwrap();
        let a = QuorumQuestClient::builder(SERVICE, domain.clone())
            .address(proxy.url())
            .ttl(2 * SEC)
            .build()
            .await
            .unwrap();
        let b = QuorumQuestClient::builder(SERVICE, domain.clone())
            .address(server.url())
            .ttl(2 * SEC)
            .build()
            .await
            .unwrap();
        let mut sa = a.leadership();
        assert!(next(&mut sa, 10 * SEC, "A elected").await.is_elected());
        let mut sb = b.leadership();
        assert!(matches!(
            next(&mut sb, 10 * SEC, "B follower").await,
            LeadershipEvent::Follower
        ));

        proxy.set_mode(ProxyMode::Blackhole);
        let (a_lost, b_elected) = tokio::join!(
            async {
                until(&mut sa, 10 * SEC, "A lost", LeadershipEvent::is_lost).await;
                Instant::now()
            },
            async {
                until(&mut sb, 15 * SEC, "B elected", LeadershipEvent::is_elected).await;
                Instant::now()
            }
        );
        assert!(
            b_elected > a_lost,
            "trial {trial}: B elected before A stepped down"
        );
        gaps.push(b_elected - a_lost);
        proxy.set_mode(ProxyMode::Pass);
        drop((sa, sb));
        proxy.shutdown().await;
    }
    eprintln!("partition handover gaps (A lost -> B elected): {gaps:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn goaway_every_second_for_30_seconds_costs_no_leadership() {
    let server = TestServer::builder()
        .max_connection_age(SEC)
        .start()
        .await
        .unwrap();
    let client = over_tcp(&server.url(), 3).build().await.unwrap();
    let mut stream = client.leadership();
    assert!(next(&mut stream, 10 * SEC, "Elected").await.is_elected());
    let connections_before = server.connections_accepted();
    let end = Instant::now() + 30 * SEC;
    let (mut renewed, mut failed) = (0, 0);
    while Instant::now() < end {
        let left = end.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, stream.next()).await {
            Err(_) => break,
            Ok(Some(LeadershipEvent::Renewed { .. })) => renewed += 1,
            Ok(Some(LeadershipEvent::RpcFailed { code, message, .. })) => {
                eprintln!("failed call: {code:?} {message}");
                failed += 1
            }
            Ok(other) => panic!("leadership must survive connection churn, got {other:?}"),
        }
    }
    let connections = server.connections_accepted() - connections_before;
    eprintln!("30 s of GOAWAY churn: {renewed} renewals, {failed} failed calls, {connections} new connections");
    assert!(renewed >= 25, "renewals: {renewed}");
    assert_eq!(
        failed, 0,
        "SPEC §2: ride through GOAWAY without a single failed call"
    );
    assert!(
        connections >= 10,
        "the server really churned connections: {connections}"
    );
    assert!(client.is_leader());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_paused_longer_than_the_lease_means_expired_on_time() {
    let server = server().await;
    let client = over_tcp(&server.url(), 2).build().await.unwrap();
    let mut stream = client.leadership();
    let LeadershipEvent::Elected { term, .. } = next(&mut stream, 10 * SEC, "Elected").await else {
        panic!("expected Elected");
    };
    until(&mut stream, 5 * SEC, "Renewed", |e| {
        matches!(e, LeadershipEvent::Renewed { .. })
    })
    .await;
    server.pause();
    // Every call hangs from here: the deadline in force is the last one.
    let deadline = term.deadline().expect("leading");
    let lost = until(&mut stream, 10 * SEC, "Lost", LeadershipEvent::is_lost).await;
    let at = Instant::now();
    assert!(is_lost_with(&lost, LossReason::Expired), "{lost:?}");
    assert!(at >= deadline);
    // Generous for a busy 2-core machine; typically a few ms.
    assert!(
        at - deadline < ms(500),
        "stepped down {:?} after the deadline",
        at - deadline
    );
    let lock = server
        .lock(SERVICE, DOMAIN)
        .expect("server still holds our lock");
    assert_eq!(lock.owner, client.client_id());
    server.resume();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_dropped_outside_the_runtime_steps_down_and_the_client_can_lead_again() {
    let server = server().await;
    let client = over_tcp(&server.url(), 10).build().await.unwrap();
    let mut stream = client.leadership();
    let LeadershipEvent::Elected { term, .. } = next(&mut stream, 10 * SEC, "Elected").await else {
        panic!("expected Elected");
    };
    // A plain thread has no Tokio runtime: no release can be sent from there.
    std::thread::spawn(move || drop(stream)).join().unwrap();
    assert!(term.is_ended(), "stepped down locally");
    assert!(!client.is_leader());
    // The lock is still ours on the server (re-entrant), and the client can lead again.
    assert!(client.try_acquire_lock().await.unwrap());
    assert!(client.is_leader());
}
