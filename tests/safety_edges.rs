//! Safety at the edges: each test is named after the rule it protects, and
//! each reproduces a way a delayed, hostile or starved path broke that rule
//! (two leaders, a panic, a hang, an unbounded buffer) before it was fixed.
//! Timing-exact tests run under paused time over in-memory pipes; the ones
//! that need real sockets or real threads use loopback TCP with generous
//! bounds.
#![cfg(feature = "testing")]

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use futures::{FutureExt, StreamExt};
use quorum_quest_client::testing::{FaultProxy, LeasePolicy, TestServer};
use quorum_quest_client::{
    Callbacks, Error, LeadershipEvent, LossReason, NoOpCallbacks, QuorumQuestClient, RpcKind,
};
use tokio::time::Instant;

// ----- 1. a release whose outcome is unknown -----

/// A server; a proxy in front of it; A (client id `id`, 1 s call timeout)
/// leading through the proxy; B (`node-b`) connected to the server directly.
async fn leader_behind_a_proxy(
    id: &str,
) -> (TestServer, FaultProxy, QuorumQuestClient, QuorumQuestClient) {
    let server = server().await;
    let proxy = FaultProxy::start(server.addr()).await.unwrap();
    let a = over_tcp(&proxy.url(), 10)
        .client_id(id)
        .rpc_timeout(SEC)
        .build()
        .await
        .unwrap();
    let b = over_tcp(&server.url(), 10)
        .client_id("node-b")
        .build()
        .await
        .unwrap();
    assert!(a.try_acquire_lock().await.unwrap());
    (server, proxy, a, b)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_whose_outcome_is_unknown_cannot_end_a_later_term() {
    let (server, proxy, a, b) = leader_behind_a_proxy("node-release").await;

    // A's connection stalls: the release is held, not lost, and times out.
    proxy.hold_live();
    assert!(a.release_lock().await.is_err(), "the release must time out");
    assert!(!a.is_leader());
    // A's old lease runs out on the server (its release never arrived), and
    // A leads again, on a new connection.
    server.force_expire(SERVICE, DOMAIN);
    assert!(a.try_acquire_lock().await.unwrap(), "A re-acquires");
    assert!(a.is_leader());
    // The old release reaches the server now.
    proxy.deliver_held();
    eventually(10 * SEC, "the held release reaches the server", || {
        server.calls(RpcKind::ReleaseLock) >= 1
    })
    .await;
    tokio::time::sleep(ms(300)).await;

    // It could not end A's new term: B is refused while A leads.
    let lock = server.lock(SERVICE, DOMAIN).expect("A's lock survives");
    assert!(
        lock.owner.starts_with("node-release"),
        "owner {:?}: the stale release deleted A's new lock",
        lock.owner
    );
    assert_ne!(
        lock.owner, "node-release",
        "A went on under a fresh incarnation"
    );
    assert_eq!(a.client_id(), "node-release", "client_id() is unchanged");
    assert!(!b.try_acquire_lock().await.unwrap(), "two leaders");
    assert!(a.is_leader());
    proxy.shutdown().await;
}

// ----- 2. the server's lease answer is bounded by what was asked -----

#[tokio::test(start_paused = true)]
async fn a_lease_longer_than_asked_counts_only_for_the_ttl_asked() {
    let server = server().await;
    server.set_lease_policy(LeasePolicy::Answer {
        seconds: 3600,
        nanos: 0,
    });
    let client = in_memory(&server, 3).build().await.unwrap();
    let margin = client.timing().safety_margin;
    let mut stream = client.leadership();
    let LeadershipEvent::Elected {
        lease_remaining, ..
    } = next(&mut stream, 5 * SEC, "Elected").await
    else {
        panic!("expected Elected");
    };
    assert!(lease_remaining <= 3 * SEC - margin, "{lease_remaining:?}");
    match until(&mut stream, 5 * SEC, "Renewed", |e| {
        matches!(e, LeadershipEvent::Renewed { .. })
    })
    .await
    {
        LeadershipEvent::Renewed {
            lease_remaining, ..
        } => assert!(lease_remaining <= 3 * SEC - margin, "{lease_remaining:?}"),
        _ => unreachable!(),
    }
    // Partitioned now: the leader must step down within the TTL asked for,
    // not an hour later.
    server.pause();
    let start = Instant::now();
    let lost = until(&mut stream, 10 * SEC, "Lost", LeadershipEvent::is_lost).await;
    assert!(is_lost_with(&lost, LossReason::Expired), "{lost:?}");
    assert!(start.elapsed() <= 3 * SEC, "{:?}", start.elapsed());
    server.resume();
}

/// The longest TTL the client accepts (i32::MAX seconds, 68 years) puts
/// deadlines and renewals decades away, beyond what a timer queue can hold:
/// the campaign keeps running (no panic in the task that drives it), the
/// leader stays leader, and resigning releases.
#[tokio::test(start_paused = true)]
async fn the_longest_ttl_leads_and_resigns_without_a_panic() {
    let server = server().await;
    let client = in_memory(&server, i32::MAX as u64).build().await.unwrap();
    let mut stream = client.leadership();
    next(&mut stream, 5 * SEC, "Elected").await;
    tokio::time::sleep(3600 * SEC).await;
    assert!(client.is_leader());
    assert!(
        client.health().check().is_ok(),
        "{:?}",
        client.health().check()
    );
    // Another election on the same connection (the same driver) still runs.
    let sibling = client.for_scope(SERVICE, "sibling").unwrap();
    let mut theirs = sibling.leadership();
    next(&mut theirs, 5 * SEC, "Elected").await;
    stream.resign().await.unwrap();
    assert!(!client.is_leader());
    assert!(server.lock(SERVICE, DOMAIN).is_none());
    assert!(sibling.is_leader());
}

#[tokio::test(start_paused = true)]
async fn a_shorter_lease_shortens_the_deadline_and_one_under_the_margin_is_a_loss() {
    let server = server().await;
    let client = in_memory(&server, 10).build().await.unwrap();
    let mut stream = client.leadership();
    let LeadershipEvent::Elected { term, .. } = next(&mut stream, 5 * SEC, "Elected").await else {
        panic!("expected Elected");
    };
    // The server now answers 5 s leases: the deadline moves back.
    server.set_lease_policy(LeasePolicy::Answer {
        seconds: 5,
        nanos: 0,
    });
    until(&mut stream, 10 * SEC, "Renewed", |e| {
        matches!(e, LeadershipEvent::Renewed { .. })
    })
    .await;
    let left = term.remaining();
    assert!(left <= 5 * SEC - SEC, "the 5 s answer counts: {left:?}");
    // Then 1 ns: less than the margin, so a loss.
    server.set_lease_policy(LeasePolicy::Answer {
        seconds: 0,
        nanos: 1,
    });
    let lost = until(&mut stream, 10 * SEC, "Lost", LeadershipEvent::is_lost).await;
    assert!(is_lost_with(&lost, LossReason::Expired), "{lost:?}");
    assert!(term.is_ended());
}

#[tokio::test(start_paused = true)]
async fn a_server_that_clamps_leases_never_leaves_the_client_leading_past_its_expiry() {
    let server = server().await;
    server.set_lease_policy(LeasePolicy::Clamp(2 * SEC));
    let client = in_memory(&server, 10)
        .renew_interval(ms(500))
        .build()
        .await
        .unwrap();
    let mut stream = client.leadership();
    next(&mut stream, 5 * SEC, "Elected").await;
    // Sample the whole run: whenever the client says it leads, the server's
    // lock is its own and outlives the client's belief.
    let end = Instant::now() + 20 * SEC;
    let mut samples = 0;
    while Instant::now() < end {
        if let Some(left) = client.get_remaining_lease() {
            let lock = server
                .lock(SERVICE, DOMAIN)
                .expect("leading with no lock on the server");
            assert_eq!(lock.owner, client.client_id());
            assert!(
                left < lock.remaining,
                "client believes {left:?}, server expires in {:?}",
                lock.remaining
            );
            samples += 1;
        }
        tokio::select! {
            _ = stream.next() => {}
            _ = tokio::time::sleep(ms(37)) => {}
        }
    }
    assert!(
        samples > 100,
        "the client led for most of the run: {samples}"
    );
}

// ----- 3. leader work ends by the deadline even if the campaign is starved -----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_work_stops_by_the_deadline_when_the_campaign_runtime_is_blocked() {
    let server = server().await;
    let url = server.url();
    let (term_tx, term_rx) = tokio::sync::oneshot::channel();
    // The contender runs on its own current-thread runtime, which then
    // blocks (a consumer doing blocking work): nothing on it can run.
    let contender = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let client = over_tcp(&url, 3).build().await.unwrap();
            let mut stream = client.leadership();
            let ev = next(&mut stream, 10 * SEC, "Elected").await;
            let LeadershipEvent::Elected { term, .. } = ev else {
                panic!("expected Elected, got {ev:?}");
            };
            term_tx.send((term, client.clone())).ok();
            std::thread::sleep(Duration::from_secs(8));
            drop(stream);
        });
    });
    let (term, client) = term_rx.await.unwrap();
    // Work bound to the term, on this (healthy) runtime.
    let work = term.spawn(std::future::pending::<()>());
    let token = term.token();
    let deadline = term.deadline().expect("leading");
    assert!(deadline <= Instant::now() + 3 * SEC);
    tokio::time::timeout(6 * SEC, term.cancelled())
        .await
        .expect("the term must end by its deadline, not when the campaign wakes up");
    let ended_at = Instant::now();
    assert!(ended_at >= deadline);
    assert!(
        ended_at - deadline < ms(500),
        "ended {:?} after the deadline",
        ended_at - deadline
    );
    assert_eq!(
        tokio::time::timeout(SEC, work).await.unwrap().unwrap(),
        None
    );
    tokio::time::timeout(SEC, token.cancelled()).await.unwrap();
    assert!(!term.is_active());
    assert!(!client.is_leader());
    assert_eq!(client.get_remaining_lease(), None);
    // The server's lease (3 s from the same send) outlived the term.
    tokio::task::spawn_blocking(move || contender.join().unwrap())
        .await
        .unwrap();
}

// ----- 4. a stale refusal -----

#[tokio::test(start_paused = true)]
async fn a_refusal_decided_before_a_newer_grant_does_not_end_that_term() {
    let server = server().await;
    let client = in_memory(&server, 10)
        .client_id("node-refusal")
        .build()
        .await
        .unwrap();
    server.set_owner(SERVICE, DOMAIN, "node-b", 10 * SEC);
    server.set_refusal_delay(2 * SEC);
    // Decided now (refused: B owns the lock), answered in 2 s.
    let stale = tokio::spawn({
        let client = client.clone();
        async move { client.try_acquire_lock().await }
    });
    tokio::time::sleep(ms(100)).await;
    server.force_expire(SERVICE, DOMAIN);
    assert!(
        client.try_acquire_lock().await.unwrap(),
        "granted after B left"
    );
    let mut stream = client.leadership();
    assert!(next(&mut stream, SEC, "Elected").await.is_elected());
    // The stale refusal arrives after the grant; the call reports that the
    // client leads.
    assert!(stale.await.unwrap().unwrap());
    assert!(client.is_leader(), "a stale refusal ended a newer term");
    assert!(
        stream.next().now_or_never().is_none(),
        "no Lost for a stale refusal"
    );
    assert_eq!(server.lock(SERVICE, DOMAIN).unwrap().owner, "node-refusal");
}

// ----- 5. hostile values never panic -----

#[tokio::test(start_paused = true)]
async fn out_of_range_leases_from_the_server_are_a_rejection_never_a_panic() {
    let server = server().await;
    let client = in_memory(&server, 3).build().await.unwrap();
    let mut stream = client.leadership();
    for policy in [
        LeasePolicy::Answer {
            seconds: i64::MAX,
            nanos: 0,
        },
        LeasePolicy::Answer {
            seconds: i64::MIN,
            nanos: 0,
        },
        LeasePolicy::Answer {
            seconds: 0,
            nanos: 2_000_000_000,
        },
        LeasePolicy::Answer {
            seconds: 5,
            nanos: -1,
        },
        LeasePolicy::Missing,
    ] {
        server.set_lease_policy(LeasePolicy::AsAsked);
        until(
            &mut stream,
            10 * SEC,
            "Elected",
            LeadershipEvent::is_elected,
        )
        .await;
        server.set_lease_policy(policy);
        let mut failure = None;
        let lost = until(&mut stream, 10 * SEC, "Lost", |e| {
            if let LeadershipEvent::RpcFailed { code, message, .. } = e {
                failure = Some((*code, message.clone()));
            }
            e.is_lost()
        })
        .await;
        assert!(
            is_lost_with(&lost, LossReason::Rejected),
            "{policy:?}: {lost:?}"
        );
        if policy != LeasePolicy::Missing {
            let (code, message) = failure.expect("a clear RpcFailed first");
            assert_eq!(code, tonic::Code::Internal, "{policy:?}");
            assert!(message.contains("lease_length"), "{message}");
        }
    }
    // The campaign is alive and leads again.
    server.set_lease_policy(LeasePolicy::AsAsked);
    until(
        &mut stream,
        10 * SEC,
        "Elected",
        LeadershipEvent::is_elected,
    )
    .await;
}

#[tokio::test]
async fn impossible_builder_values_are_invalid_parameters() {
    let b = || QuorumQuestClient::builder(SERVICE, DOMAIN).lazy_connect();
    let cases: Vec<(&str, quorum_quest_client::ClientBuilder)> = vec![
        ("rpc_timeout", b().rpc_timeout(Duration::MAX)),
        ("retry_period", b().retry_period(Duration::MAX)),
        ("renew_interval", b().renew_interval(Duration::MAX)),
        ("safety_margin", b().safety_margin(Duration::MAX)),
        ("connect_timeout", b().connect_timeout(Duration::MAX)),
    ];
    for (param, builder) in cases {
        match builder.build().await {
            Err(Error::InvalidParameter(m)) => assert!(m.starts_with(param), "{param}: {m}"),
            other => panic!("{param}: expected InvalidParameter, got {other:?}"),
        }
    }
}

// ----- 8. no runtime -----

#[test]
fn building_outside_a_tokio_runtime_is_an_error_not_a_panic() {
    let builders = [
        QuorumQuestClient::builder(SERVICE, DOMAIN).address("localhost:5050"),
        QuorumQuestClient::builder(SERVICE, DOMAIN)
            .address("localhost:5050")
            .lazy_connect(),
        QuorumQuestClient::builder(SERVICE, DOMAIN)
            .address("localhost:5050")
            .lazy_connect()
            .callbacks(Arc::new(NoOpCallbacks) as Arc<dyn Callbacks>),
    ];
    for builder in builders {
        match futures::executor::block_on(builder.build()) {
            Err(Error::NoRuntime) => {}
            other => panic!("expected Error::NoRuntime, got {other:?}"),
        }
    }
}

// ----- 10. error classes -----

#[tokio::test(start_paused = true)]
async fn a_permanent_error_is_surfaced_and_retried_only_at_the_retry_period() {
    let server = server().await;
    server.fail_next(
        1000,
        Some(RpcKind::TryAcquireLock),
        tonic::Status::permission_denied("no"),
    );
    let client = in_memory(&server, 3).build().await.unwrap();
    let period = client.timing().retry_period;
    let mut stream = client.leadership();
    match next(&mut stream, 5 * SEC, "RpcFailed").await {
        LeadershipEvent::RpcFailed { code, .. } => {
            assert_eq!(code, tonic::Code::PermissionDenied)
        }
        other => panic!("expected RpcFailed, got {other:?}"),
    }
    let before = server.calls(RpcKind::TryAcquireLock);
    tokio::time::sleep(period * 10).await;
    let calls = server.calls(RpcKind::TryAcquireLock) - before;
    assert!(
        (9..=11).contains(&calls),
        "{calls} attempts in 10 retry periods: a permanent error waits the period"
    );
}

#[tokio::test(start_paused = true)]
async fn a_leader_retries_with_a_minimum_spacing_as_its_lease_runs_out() {
    let server = server().await;
    let client = in_memory(&server, 3).build().await.unwrap();
    let mut stream = client.leadership();
    next(&mut stream, 5 * SEC, "Elected").await;
    server.fail_next(
        1000,
        Some(RpcKind::KeepAlive),
        tonic::Status::resource_exhausted("busy"),
    );
    let before = server.calls(RpcKind::KeepAlive);
    let lost = until(&mut stream, 10 * SEC, "Lost", LeadershipEvent::is_lost).await;
    assert!(is_lost_with(&lost, LossReason::Expired), "{lost:?}");
    let calls = server.calls(RpcKind::KeepAlive) - before;
    // About 2 s of lease left at the first failure: a handful of retries,
    // at least 50 ms apart, not a burst as the deadline nears.
    assert!(
        calls <= 10,
        "{calls} KeepAlive calls while the lease ran out"
    );
    assert!(calls >= 2, "it did retry: {calls}");
}

// ----- 11. a new stream never starts with Lost -----

#[tokio::test(start_paused = true)]
async fn a_stream_created_after_a_lease_expired_starts_as_documented() {
    let server = server().await;
    let client = in_memory(&server, 3).build().await.unwrap();
    assert!(client.try_acquire_lock().await.unwrap());
    tokio::time::sleep(4 * SEC).await;
    assert!(!client.is_leader());
    let mut stream = client.leadership();
    let first = next(&mut stream, 5 * SEC, "first event").await;
    assert!(
        !first.is_lost(),
        "a stream must not start with Lost: {first:?}"
    );
}

// ----- 12. bounded buffers -----

#[tokio::test(start_paused = true)]
async fn an_idle_stream_keeps_only_the_latest_renewal() {
    let server = server().await;
    let client = in_memory(&server, 3).build().await.unwrap();
    let mut driving = client.leadership();
    let mut idle = client.leadership();
    next(&mut driving, 5 * SEC, "Elected").await;
    // 200 renewals while `idle` is never polled.
    let mut renewals = 0;
    while renewals < 200 {
        if let LeadershipEvent::Renewed { .. } = next(&mut driving, 5 * SEC, "Renewed").await {
            renewals += 1;
        }
    }
    let mut queued = Vec::new();
    while let Some(Some(ev)) = idle.next().now_or_never() {
        queued.push(ev);
    }
    assert!(
        queued.first().is_some_and(LeadershipEvent::is_elected),
        "{queued:?}"
    );
    let renewed = queued
        .iter()
        .filter(|e| matches!(e, LeadershipEvent::Renewed { .. }))
        .count();
    assert!(
        renewed <= 1,
        "{renewed} renewals buffered for an idle stream"
    );
    assert!(queued.len() <= 3, "{queued:?}");
}

// ----- 13. a lock held for nobody -----

#[tokio::test(start_paused = true)]
async fn an_acquire_answered_too_late_does_not_leave_the_lock_held_for_nobody() {
    let server = server().await;
    // Every answer comes 2 s late: A (1 s timeout) never learns of a grant.
    server.set_latency(2 * SEC);
    let a = in_memory(&server, 10)
        .client_id("node-slow")
        .rpc_timeout(SEC)
        .build()
        .await
        .unwrap();
    let b = in_memory(&server, 10)
        .client_id("node-b")
        .rpc_timeout(5 * SEC)
        .build()
        .await
        .unwrap();
    a.start_keep_alive().await.unwrap();
    // A's (unanswered in time) acquire reaches the store first.
    eventually(10 * SEC, "A holds the lock on the server", || {
        server
            .lock(SERVICE, DOMAIN)
            .is_some_and(|l| l.owner.starts_with("node-slow"))
    })
    .await;
    let start = Instant::now();
    let mut b_leads = false;
    while start.elapsed() < 60 * SEC {
        if b.try_acquire_lock().await.unwrap_or(false) {
            b_leads = true;
            break;
        }
        tokio::time::sleep(SEC).await;
    }
    assert!(
        b_leads,
        "the lock stayed with a client that could never lead: {:?}",
        server.lock(SERVICE, DOMAIN)
    );
    assert!(!a.is_leader());
    a.stop_keep_alive().await;
}

#[tokio::test(start_paused = true)]
async fn a_server_granting_less_than_the_margin_is_asked_again_only_at_the_retry_period() {
    let server = server().await;
    // Every lease is shorter than the client's margin: it can never lead.
    server.set_lease_policy(LeasePolicy::Clamp(ms(200)));
    let client = in_memory(&server, 3).build().await.unwrap();
    let period = client.timing().retry_period;
    let mut stream = client.leadership();
    tokio::select! {
        ev = stream.next() => panic!("nothing to report while it cannot lead: {ev:?}"),
        _ = tokio::time::sleep(period * 10) => {}
    }
    assert!(!client.is_leader());
    let calls = server.calls(RpcKind::TryAcquireLock);
    assert!(
        (8..=12).contains(&calls),
        "{calls} acquires in 10 retry periods: no tight loop"
    );
}

// ----- found by the adversarial review -----

#[tokio::test(start_paused = true)]
async fn a_second_client_for_the_same_lock_and_identity_on_one_connection_is_refused() {
    // Two sessions with one identity for one lock would both be granted it
    // (the server cannot tell them apart): two leaders in one process.
    let server = server().await;
    let a = in_memory(&server, 10).build().await.unwrap();
    match a.for_scope(SERVICE, DOMAIN) {
        Err(Error::InvalidParameter(m)) => assert!(m.contains("already campaigns"), "{m}"),
        other => panic!("expected InvalidParameter, got {other:?}"),
    }
    let x = a.for_scope("indexer", "shard-7").unwrap();
    assert!(matches!(
        a.for_scope("indexer", "shard-7"),
        Err(Error::InvalidParameter(_))
    ));
    match QuorumQuestClient::builder("indexer", "shard-7")
        .share_connection(&a)
        .client_id(a.client_id())
        .build()
        .await
    {
        Err(Error::InvalidParameter(_)) => {}
        other => panic!("expected InvalidParameter, got {other:?}"),
    }
    assert!(x.try_acquire_lock().await.unwrap());
    // Once the first is gone (its release in the background included: a
    // release of that identity must not reach the server after a new
    // client's grant), the scope is free for a new client.
    drop(x);
    let start = Instant::now();
    let y = loop {
        match a.for_scope("indexer", "shard-7") {
            Ok(y) => break y,
            Err(_) if start.elapsed() < 5 * SEC => tokio::time::sleep(ms(10)).await,
            Err(e) => panic!("the scope stayed claimed: {e}"),
        }
    };
    assert!(y.try_acquire_lock().await.unwrap());
}

/// After a release whose outcome is unknown, node "node" goes on under a
/// fresh identity, which must never be exactly the id another contender may
/// legitimately use ("node#1", which it was at first). The
/// server then sees one owner for two clients.
#[tokio::test(start_paused = true)]
async fn a_retired_identity_never_equals_another_contenders_id() {
    let server = server().await;
    let a = in_memory(&server, 10)
        .client_id("node")
        .build()
        .await
        .unwrap();
    let b = in_memory(&server, 10)
        .client_id("node#1")
        .build()
        .await
        .unwrap();
    assert!(a.try_acquire_lock().await.unwrap());
    // A release that needs a transport retry: its outcome counts as unknown,
    // so `a` retires "node" and goes on as "node#1.<tag>".
    server.fail_next(
        1,
        Some(RpcKind::ReleaseLock),
        tonic::Status::unavailable("reset"),
    );
    a.release_lock().await.unwrap();
    assert!(server.lock(SERVICE, DOMAIN).is_none());
    assert!(b.try_acquire_lock().await.unwrap(), "b wins the free lock");
    let a_says = a.try_acquire_lock().await.unwrap();
    assert!(
        !(a.is_leader() && b.is_leader()),
        "a (client_id \"node\") and b (client_id \"node#1\") both lead; a.try_acquire_lock() = {a_says}, \
         server owner = {:?}",
        server.lock(SERVICE, DOMAIN).map(|l| l.owner)
    );
}

/// `build()` outside a runtime is `Error::NoRuntime`, but the methods of a
/// built client panic inside tokio when their future is polled by another
/// executor (a plain thread with `futures::executor::block_on`, e.g. in a
/// `Drop` impl or a signal-handling thread).
#[test]
fn imperative_calls_polled_outside_a_runtime_are_errors_not_panics() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let server = rt.block_on(TestServer::start()).unwrap();
    let client = rt.block_on(over_tcp(&server.url(), 10).build()).unwrap();
    let outcomes: Vec<(&str, bool)> = ["try_acquire_lock", "release_lock", "stop_keep_alive"]
        .into_iter()
        .map(|what| {
            let c = client.clone();
            let panicked = std::thread::spawn(move || {
                futures::executor::block_on(async move {
                    match what {
                        "try_acquire_lock" => {
                            let _ = c.try_acquire_lock().await;
                        }
                        "release_lock" => {
                            let _ = c.release_lock().await;
                        }
                        _ => c.stop_keep_alive().await,
                    }
                })
            })
            .join()
            .is_err();
            (what, panicked)
        })
        .collect();
    drop(client);
    rt.block_on(server.shutdown());
    let panicked: Vec<_> = outcomes
        .iter()
        .filter(|(_, p)| *p)
        .map(|(w, _)| *w)
        .collect();
    assert!(
        panicked.is_empty(),
        "panicked outside a runtime: {panicked:?}"
    );
}

/// The same for `stop_keep_alive()` while the keep-alive task runs: stopping
/// it waits with `tokio::time::timeout`, which panics off-runtime.
#[test]
fn stop_keep_alive_polled_outside_a_runtime_does_not_panic() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let server = rt.block_on(TestServer::start()).unwrap();
    let client = rt.block_on(over_tcp(&server.url(), 10).build()).unwrap();
    rt.block_on(client.start_keep_alive()).unwrap();
    let c = client.clone();
    let panicked = std::thread::spawn(move || futures::executor::block_on(c.stop_keep_alive()))
        .join()
        .is_err();
    drop(client);
    rt.block_on(server.shutdown());
    assert!(!panicked, "stop_keep_alive panicked outside a runtime");
}

/// A server that renews for less than asked (here 5 s of a 15 s TTL): the
/// deadline moves to send + 5 s - 1.5 s = 3.5 s, but the next renewal is
/// still scheduled renew_interval = 5 s after the send, i.e. after the
/// deadline. Every term ends `Lost { Expired }` although every renewal would
/// have been granted; the client flaps Elected/Lost every ~4 s for ever.
#[tokio::test(start_paused = true)]
async fn a_shorter_lease_is_renewed_before_it_runs_out() {
    let server = server().await;
    server.set_lease_policy(LeasePolicy::ClampRenewals(5 * SEC));
    let client = in_memory(&server, 15).build().await.unwrap();
    let mut stream = client.leadership();
    until(&mut stream, 5 * SEC, "Elected", LeadershipEvent::is_elected).await;
    let start = Instant::now();
    let lost = tokio::time::timeout(
        30 * SEC,
        until(&mut stream, 600 * SEC, "Lost", LeadershipEvent::is_lost),
    )
    .await;
    assert!(
        lost.is_err(),
        "lost after {:?} with a server that answers every renewal: {:?}",
        start.elapsed(),
        lost.ok()
    );
}

// ----- found by the second adversarial review -----

/// A client dropped while leader releases in the background; the release is
/// held on the network and times out, so the client's session ends while
/// the request is still on its way. A new client of this process with the
/// same id (here by another address of the same server) must not re-enter
/// the old lock, which the stale release would then delete under it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_client_with_the_same_id_cannot_be_ended_by_its_predecessors_stale_release() {
    let (server, proxy, a, b) = leader_behind_a_proxy("node-stale").await;
    proxy.hold_live();
    drop(a); // its background release is held and times out after 1 s
    tokio::time::sleep(3 * SEC).await;
    assert_eq!(server.calls(RpcKind::ReleaseLock), 0, "the release is held");

    let a2 = over_tcp(&server.url(), 10)
        .client_id("node-stale")
        .build()
        .await
        .unwrap();
    assert!(
        !a2.try_acquire_lock().await.unwrap(),
        "a2 must not re-enter a lock that a stale release can delete"
    );
    proxy.deliver_held();
    eventually(10 * SEC, "the held release reaches the server", || {
        server.calls(RpcKind::ReleaseLock) >= 1
    })
    .await;
    tokio::time::sleep(ms(300)).await;
    // The lock is free now: whoever takes it is the only leader.
    let a2_leads = a2.try_acquire_lock().await.unwrap();
    let b_leads = b.try_acquire_lock().await.unwrap();
    assert!(
        a2_leads != b_leads,
        "exactly one leads: a2 {a2_leads}, b {b_leads}"
    );
    assert!(!(a2.is_leader() && b.is_leader()), "two leaders");
    assert_eq!(a2.client_id(), "node-stale");
    proxy.shutdown().await;
}

/// A server answering a lease just over the safety margin: the renewal must
/// keep a minimum spacing (under paused time a zero wait never lets the
/// clock advance).
#[test]
fn a_lease_just_over_the_margin_does_not_renew_in_a_loop() {
    let (tx, rx) = std::sync::mpsc::channel();
    let watched = Arc::new(std::sync::Mutex::new(None::<TestServer>));
    let watched2 = watched.clone();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()
            .unwrap();
        rt.block_on(async move {
            let server = server().await;
            server.set_lease_policy(LeasePolicy::Answer {
                seconds: 1,
                nanos: 1,
            });
            *watched2.lock().unwrap() = Some(server.clone());
            let client = in_memory(&server, 10).build().await.unwrap();
            let mut l = client.leadership();
            let t0 = Instant::now();
            while t0.elapsed() < 3 * SEC {
                let _ = tokio::time::timeout(SEC, l.next()).await;
            }
            tx.send(server.calls(RpcKind::KeepAlive)).unwrap();
        });
    });
    match rx.recv_timeout(Duration::from_secs(60)) {
        Ok(n) => assert!(n < 100, "{n} KeepAlives in 3 virtual seconds"),
        Err(_) => {
            let n = watched
                .lock()
                .unwrap()
                .as_ref()
                .map(|s| s.calls(RpcKind::KeepAlive));
            panic!("hang: 3 virtual seconds did not pass in 60 s; KeepAlives so far: {n:?}");
        }
    }
}

// ----- admission control under faults -----

/// Two processes, A and B, each with one connection (through its own
/// proxy) limited to two calls in flight, campaign for the same ten shards
/// against a server that answers after 60 ms, so that renewals and attempts
/// wait in the admission queue. Their connections are partitioned, held
/// and reset in turn, and the server pauses. Sampled every few
/// milliseconds throughout: a client never believes it leads a shard that
/// the server gives to someone else, and never do both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shards_queued_behind_two_call_slots_never_have_two_leaders_through_faults() {
    use quorum_quest_client::testing::ProxyMode;
    const N: usize = 10;
    let server = TestServer::builder().latency(ms(60)).start().await.unwrap();
    let proxies = [
        FaultProxy::start(server.addr()).await.unwrap(),
        FaultProxy::start(server.addr()).await.unwrap(),
    ];
    let ids = ["node-a", "node-b"];
    let mut shards: Vec<Vec<QuorumQuestClient>> = Vec::new();
    let mut drains = Vec::new();
    for (id, proxy) in ids.iter().zip(&proxies) {
        let root = QuorumQuestClient::builder("svc", "root")
            .address(proxy.url())
            .client_id(*id)
            .ttl(3 * SEC)
            .max_concurrent_calls(2)
            .build()
            .await
            .unwrap();
        let mine: Vec<_> = (0..N)
            .map(|i| root.for_scope("shards", format!("s{i}")).unwrap())
            .collect();
        let streams = futures::stream::select_all(mine.iter().map(|s| s.leadership()));
        drains.push(tokio::spawn(async move {
            futures::pin_mut!(streams);
            while streams.next().await.is_some() {}
        }));
        shards.push(mine);
    }
    let owner_is = |owner: &Option<String>, id: &str| {
        owner
            .as_deref()
            .is_some_and(|o| o == id || o.starts_with(&format!("{id}#")))
    };
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let stop = stop.clone();
        let server = server.clone();
        let shards = shards.clone();
        tokio::spawn(async move {
            let mut violations = Vec::new();
            let mut samples = 0u64;
            let mut led = [0u64; 2];
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                for (i, (a, b)) in shards[0].iter().zip(&shards[1]).enumerate() {
                    let domain = format!("s{i}");
                    let before = server.lock("shards", &domain).map(|l| l.owner);
                    let leads = [a.is_leader(), b.is_leader()];
                    let after = server.lock("shards", &domain).map(|l| l.owner);
                    if leads[0] && leads[1] {
                        violations.push(format!("s{i}: both lead"));
                    }
                    for (k, id) in ids.iter().enumerate() {
                        if leads[k] {
                            led[k] += 1;
                            if !owner_is(&before, id) && !owner_is(&after, id) {
                                violations.push(format!(
                                    "s{i}: {id} leads, server owner {before:?} / {after:?}"
                                ));
                            }
                        }
                    }
                }
                samples += 1;
                tokio::time::sleep(ms(3)).await;
            }
            (violations, samples, led)
        })
    };
    let pause = |d: Duration| tokio::time::sleep(d);
    pause(3 * SEC).await;
    proxies[0].set_mode(ProxyMode::Blackhole);
    pause(3 * SEC).await;
    proxies[0].set_mode(ProxyMode::Pass);
    pause(2 * SEC).await;
    proxies[1].hold_live();
    pause(3 * SEC).await;
    proxies[1].deliver_held();
    pause(2 * SEC).await;
    proxies[0].set_mode(ProxyMode::Reset);
    pause(ms(500)).await;
    proxies[0].set_mode(ProxyMode::Pass);
    pause(2 * SEC).await;
    server.pause();
    pause(2 * SEC).await;
    server.resume();
    pause(2 * SEC).await;
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let (violations, samples, led) = sampler.await.unwrap();
    let tenures = server.tenures().len();
    eprintln!(
        "{samples} samples; leader samples A {} / B {}; {tenures} tenures",
        led[0], led[1]
    );
    for d in drains {
        d.abort();
    }
    assert!(
        violations.is_empty(),
        "{} violations, e.g. {:?}",
        violations.len(),
        &violations[..violations.len().min(5)]
    );
    assert!(led[0] > 0 && led[1] > 0, "both led at some point");
    assert!(
        tenures > N,
        "the faults moved some locks ({tenures} tenures)"
    );
}
