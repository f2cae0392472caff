#![cfg(feature = "testing")]
//! The `TestServer` behaves like the real server (SPEC §2, one test per row),
//! and each of its controls does what it says.

use std::time::Duration;

use quorum_quest_client::proto::leader_election_service_client::LeaderElectionServiceClient;
use quorum_quest_client::proto::{KeepAliveRequest, ReleaseLockRequest, TryAcquireLockRequest};
use quorum_quest_client::testing::{LeasePolicy, TenureEnd, TestServer};
use quorum_quest_client::RpcKind;
use tokio::time::{timeout, Instant};
use tonic::transport::Channel;
use tonic::Code;

type Client = LeaderElectionServiceClient<Channel>;

const SVC: &str = "billing";
const DOM: &str = "eu";
/// Bound for anything that should happen "soon" on a busy CI machine.
const SOON: Duration = Duration::from_secs(10);

async fn connect(server: &TestServer) -> Client {
    LeaderElectionServiceClient::connect(server.url())
        .await
        .expect("connect to test server")
}

fn acquire_req(client_id: &str, ttl: i32) -> TryAcquireLockRequest {
    TryAcquireLockRequest {
        service: SVC.into(),
        domain: DOM.into(),
        client_id: client_id.into(),
        ttl,
    }
}

fn keep_alive_req(client_id: &str, ttl: i32) -> KeepAliveRequest {
    KeepAliveRequest {
        service: SVC.into(),
        domain: DOM.into(),
        client_id: client_id.into(),
        ttl,
    }
}

fn release_req(client_id: &str) -> ReleaseLockRequest {
    ReleaseLockRequest {
        service: SVC.into(),
        domain: DOM.into(),
        client_id: client_id.into(),
    }
}

async fn acquire(client: &mut Client, id: &str, ttl: i32) -> bool {
    client
        .try_acquire_lock(acquire_req(id, ttl))
        .await
        .expect("TryAcquireLock")
        .into_inner()
        .is_leader
}

/// The lease_length answered, as (seconds, nanos).
async fn keep_alive(client: &mut Client, id: &str, ttl: i32) -> (i64, i32) {
    let lease = client
        .keep_alive(keep_alive_req(id, ttl))
        .await
        .expect("KeepAlive")
        .into_inner()
        .lease_length
        .expect("lease_length is always set");
    (lease.seconds, lease.nanos)
}

async fn release(client: &mut Client, id: &str) {
    client
        .release_lock(release_req(id))
        .await
        .expect("ReleaseLock");
}

fn owner(server: &TestServer) -> Option<String> {
    server.lock(SVC, DOM).map(|l| l.owner)
}

/// Polls `cond` every 10 ms until it holds, failing after `SOON`.
async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + SOON;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

// ---------------------------------------------------------------- SPEC §2 rows

#[tokio::test]
async fn acquire_on_free_lock_makes_caller_owner() {
    let server = TestServer::start().await.unwrap();
    let mut c = connect(&server).await;
    assert!(acquire(&mut c, "a", 10).await);
    let info = server.lock(SVC, DOM).expect("held");
    assert_eq!(info.owner, "a");
    assert!(info.remaining <= Duration::from_secs(10));
    assert!(info.remaining > Duration::from_secs(5));
    server.shutdown().await;
}

#[tokio::test]
async fn reentrant_acquire_answers_true_and_pushes_expiry() {
    let server = TestServer::start().await.unwrap();
    let mut c = connect(&server).await;
    assert!(acquire(&mut c, "a", 5).await);
    assert!(server.lock(SVC, DOM).unwrap().remaining <= Duration::from_secs(5));
    assert!(acquire(&mut c, "a", 60).await);
    let info = server.lock(SVC, DOM).unwrap();
    assert_eq!(info.owner, "a");
    assert!(info.remaining > Duration::from_secs(50), "{info:?}");
    server.shutdown().await;
}

#[tokio::test]
async fn acquire_held_by_another_answers_false() {
    let server = TestServer::start().await.unwrap();
    let mut c = connect(&server).await;
    assert!(acquire(&mut c, "a", 30).await);
    assert!(!acquire(&mut c, "b", 30).await);
    assert_eq!(owner(&server).as_deref(), Some("a"));
    // Refusal does not touch the owner's expiry.
    assert!(server.lock(SVC, DOM).unwrap().remaining <= Duration::from_secs(30));
    server.shutdown().await;
}

#[tokio::test]
async fn acquire_after_expiry_succeeds() {
    let server = TestServer::start().await.unwrap();
    let mut c = connect(&server).await;
    assert!(acquire(&mut c, "a", 1).await);
    wait_until("the 1 s lease to expire", || {
        server.lock(SVC, DOM).is_none()
    })
    .await;
    assert!(acquire(&mut c, "b", 30).await);
    assert_eq!(owner(&server).as_deref(), Some("b"));
    server.shutdown().await;
}

#[tokio::test]
async fn keep_alive_by_owner_answers_ttl_and_extends() {
    let server = TestServer::start().await.unwrap();
    let mut c = connect(&server).await;
    assert!(acquire(&mut c, "a", 5).await);
    assert_eq!(keep_alive(&mut c, "a", 60).await, (60, 0));
    let info = server.lock(SVC, DOM).unwrap();
    assert_eq!(info.owner, "a");
    assert!(info.remaining > Duration::from_secs(50), "{info:?}");
    server.shutdown().await;
}

#[tokio::test]
async fn keep_alive_by_non_owner_answers_minus_one_second() {
    let server = TestServer::start().await.unwrap();
    let mut c = connect(&server).await;
    assert!(acquire(&mut c, "a", 5).await);
    assert_eq!(keep_alive(&mut c, "b", 60).await, (-1, 0));
    let info = server.lock(SVC, DOM).unwrap();
    assert_eq!(info.owner, "a");
    assert!(info.remaining <= Duration::from_secs(5));
    server.shutdown().await;
}

#[tokio::test]
async fn keep_alive_on_free_lock_answers_minus_one_second() {
    let server = TestServer::start().await.unwrap();
    let mut c = connect(&server).await;
    assert_eq!(keep_alive(&mut c, "a", 60).await, (-1, 0));
    assert_eq!(
        server.lock(SVC, DOM),
        None,
        "keep-alive must not create a lock"
    );
    server.shutdown().await;
}

#[tokio::test]
async fn release_by_owner_frees_the_lock() {
    let server = TestServer::start().await.unwrap();
    let mut c = connect(&server).await;
    assert!(acquire(&mut c, "a", 30).await);
    release(&mut c, "a").await;
    assert_eq!(server.lock(SVC, DOM), None);
    assert!(acquire(&mut c, "b", 30).await);
    server.shutdown().await;
}

#[tokio::test]
async fn release_by_non_owner_is_harmless_and_answers_empty() {
    let server = TestServer::start().await.unwrap();
    let mut c = connect(&server).await;
    assert!(acquire(&mut c, "a", 30).await);
    let answer = c.release_lock(release_req("b")).await.unwrap().into_inner();
    assert_eq!(answer, Default::default());
    assert_eq!(owner(&server).as_deref(), Some("a"));
    // Releasing a free lock is harmless too.
    release(&mut c, "a").await;
    release(&mut c, "a").await;
    assert_eq!(server.lock(SVC, DOM), None);
    server.shutdown().await;
}

#[tokio::test]
async fn ttl_zero_or_negative_means_default_fifteen_seconds() {
    let server = TestServer::start().await.unwrap();
    let mut c = connect(&server).await;
    assert!(acquire(&mut c, "a", 0).await);
    let remaining = server.lock(SVC, DOM).unwrap().remaining;
    assert!(remaining > Duration::from_secs(10) && remaining <= Duration::from_secs(15));
    assert_eq!(keep_alive(&mut c, "a", -5).await, (15, 0));
    assert_eq!(keep_alive(&mut c, "a", 0).await, (15, 0));
    server.shutdown().await;
}

#[tokio::test]
async fn default_ttl_is_configurable() {
    let server = TestServer::builder()
        .default_ttl(Duration::from_secs(7))
        .start()
        .await
        .unwrap();
    let mut c = connect(&server).await;
    assert!(acquire(&mut c, "a", 0).await);
    assert!(server.lock(SVC, DOM).unwrap().remaining <= Duration::from_secs(7));
    assert_eq!(keep_alive(&mut c, "a", 0).await, (7, 0));
    server.shutdown().await;
}

#[tokio::test]
async fn empty_keys_are_just_keys() {
    let server = TestServer::start().await.unwrap();
    let mut c = connect(&server).await;
    let req = TryAcquireLockRequest::default();
    assert!(
        c.try_acquire_lock(req.clone())
            .await
            .unwrap()
            .into_inner()
            .is_leader
    );
    assert!(server.lock("", "").is_some());
    server.shutdown().await;
}

#[tokio::test]
async fn lock_expires_after_ttl_on_the_wall_clock() {
    let server = TestServer::start().await.unwrap();
    let mut c = connect(&server).await;
    let sent = Instant::now();
    assert!(acquire(&mut c, "a", 1).await);
    let answered = Instant::now();

    tokio::time::sleep_until(sent + Duration::from_millis(500)).await;
    let checked = Instant::now();
    let held = owner(&server);
    // The lock was granted after `sent`, so it is certainly live before sent + 1 s.
    if checked < sent + Duration::from_secs(1) {
        assert_eq!(held.as_deref(), Some("a"), "still owner at 0.5 s");
    }

    // ... and certainly expired 1 s after the answer (checked at 1.3 s).
    tokio::time::sleep_until(answered + Duration::from_millis(1300)).await;
    assert_eq!(server.lock(SVC, DOM), None, "free at 1.3 s");
    assert!(acquire(&mut c, "b", 1).await);
    server.shutdown().await;
}

// --------------------------------------------- exact timing under paused time

#[tokio::test(start_paused = true)]
async fn paused_time_expiry_is_exact() {
    let server = TestServer::start().await.unwrap();
    let mut c = LeaderElectionServiceClient::new(server.in_memory_channel());
    let t0 = Instant::now();
    assert!(acquire(&mut c, "a", 10).await);
    assert_eq!(
        Instant::now(),
        t0,
        "no time passes during an in-memory call"
    );
    assert_eq!(
        server.lock(SVC, DOM).unwrap().remaining,
        Duration::from_secs(10)
    );

    tokio::time::advance(Duration::from_secs(10) - Duration::from_millis(1)).await;
    assert!(
        !acquire(&mut c, "b", 10).await,
        "a still owns it 1 ms before expiry"
    );
    assert_eq!(
        server.lock(SVC, DOM).unwrap().remaining,
        Duration::from_millis(1)
    );

    tokio::time::advance(Duration::from_millis(1)).await;
    assert_eq!(server.lock(SVC, DOM), None, "expired exactly at ttl");
    assert_eq!(keep_alive(&mut c, "a", 10).await, (-1, 0));
    assert!(acquire(&mut c, "b", 10).await);

    let history = server.tenures();
    assert_eq!(history.len(), 2);
    assert_eq!(history[0].ended_by, TenureEnd::Expired);
    assert_eq!(history[0].start, t0);
    assert_eq!(history[0].end, t0 + Duration::from_secs(10));
    assert_eq!(history[1].start, t0 + Duration::from_secs(10));
    server.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn paused_time_keep_alive_extends_from_now() {
    let server = TestServer::start().await.unwrap();
    let mut c = LeaderElectionServiceClient::new(server.in_memory_channel());
    assert!(acquire(&mut c, "a", 10).await);
    tokio::time::advance(Duration::from_secs(9)).await;
    assert_eq!(keep_alive(&mut c, "a", 10).await, (10, 0));
    assert_eq!(
        server.lock(SVC, DOM).unwrap().remaining,
        Duration::from_secs(10)
    );
    tokio::time::advance(Duration::from_secs(9)).await;
    assert!(acquire(&mut c, "a", 3).await, "re-entrant");
    assert_eq!(
        server.lock(SVC, DOM).unwrap().remaining,
        Duration::from_secs(3)
    );
    tokio::time::advance(Duration::from_secs(3)).await;
    assert_eq!(server.lock(SVC, DOM), None);
    server.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn paused_time_latency_is_exact_and_store_acts_first() {
    let server = TestServer::builder()
        .latency(Duration::from_secs(2))
        .start()
        .await
        .unwrap();
    let mut c = LeaderElectionServiceClient::new(server.in_memory_channel());
    let t0 = Instant::now();
    assert!(acquire(&mut c, "a", 10).await);
    assert_eq!(Instant::now() - t0, Duration::from_secs(2));
    // The store acted before the latency: the lease started at t0.
    assert_eq!(
        server.lock(SVC, DOM).unwrap().remaining,
        Duration::from_secs(8)
    );
    server.set_latency(Duration::ZERO);
    let t1 = Instant::now();
    assert_eq!(keep_alive(&mut c, "a", 10).await, (10, 0));
    assert_eq!(Instant::now(), t1);
    server.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn in_memory_channel_survives_restart() {
    let server = TestServer::start().await.unwrap();
    let mut c = LeaderElectionServiceClient::new(server.in_memory_channel());
    assert!(acquire(&mut c, "a", 30).await);
    server.shutdown().await;
    assert!(c.try_acquire_lock(acquire_req("a", 30)).await.is_err());
    server.restart(true).await.unwrap();
    let mut ok = false;
    for _ in 0..5 {
        if let Ok(r) = c.try_acquire_lock(acquire_req("a", 30)).await {
            ok = r.into_inner().is_leader;
            break;
        }
    }
    assert!(
        ok,
        "the channel reconnects after restart and a still owns the lock"
    );
    server.shutdown().await;
}

// ------------------------------------------------------------------- controls

#[tokio::test]
async fn force_expire_frees_the_lock_now() {
    let server = TestServer::start().await.unwrap();
    let mut c = connect(&server).await;
    assert!(acquire(&mut c, "a", 60).await);
    server.force_expire(SVC, DOM);
    assert_eq!(server.lock(SVC, DOM), None);
    assert_eq!(
        keep_alive(&mut c, "a", 60).await,
        (-1, 0),
        "owner learns on next call"
    );
    assert!(acquire(&mut c, "b", 60).await);
    // Force-expiring a free lock is a no-op.
    server.force_expire("other", "lock");
    let history = server.tenures();
    assert_eq!(history.len(), 2);
    assert_eq!(history[0].ended_by, TenureEnd::ForceExpired);
    server.shutdown().await;
}

#[tokio::test]
async fn set_owner_hands_the_lock_to_another_node() {
    let server = TestServer::start().await.unwrap();
    let mut c = connect(&server).await;
    assert!(acquire(&mut c, "a", 60).await);
    server.set_owner(SVC, DOM, "intruder", Duration::from_secs(30));
    let info = server.lock(SVC, DOM).unwrap();
    assert_eq!(info.owner, "intruder");
    assert!(info.remaining <= Duration::from_secs(30));
    assert_eq!(keep_alive(&mut c, "a", 60).await, (-1, 0));
    assert!(!acquire(&mut c, "a", 60).await);
    assert_eq!(keep_alive(&mut c, "intruder", 20).await, (20, 0));
    // On a free lock it simply grants it.
    server.set_owner("s2", "d2", "x", Duration::from_secs(5));
    assert_eq!(server.lock("s2", "d2").unwrap().owner, "x");
    server.shutdown().await;
}

#[tokio::test]
async fn lock_reports_owner_and_remaining_time() {
    let server = TestServer::start().await.unwrap();
    let mut c = connect(&server).await;
    assert_eq!(server.lock(SVC, DOM), None);
    assert!(acquire(&mut c, "a", 10).await);
    let info = server.lock(SVC, DOM).unwrap();
    assert_eq!(info.owner, "a");
    assert!(info.remaining > Duration::ZERO && info.remaining <= Duration::from_secs(10));
    release(&mut c, "a").await;
    assert_eq!(server.lock(SVC, DOM), None);
    server.shutdown().await;
}

#[tokio::test]
async fn pause_makes_calls_hang_until_resume() {
    let server = TestServer::start().await.unwrap();
    let mut c = connect(&server).await;
    server.pause();
    let mut c2 = c.clone();
    let mut call = tokio::spawn(async move { acquire(&mut c2, "a", 30).await });
    wait_until("the call to reach the server", || {
        server.calls(RpcKind::TryAcquireLock) == 1
    })
    .await;
    assert!(
        timeout(Duration::from_millis(500), &mut call)
            .await
            .is_err(),
        "the call must hang while paused"
    );
    assert_eq!(
        server.lock(SVC, DOM),
        None,
        "a hanging call does not touch the store"
    );
    server.resume();
    let is_leader = timeout(SOON, call)
        .await
        .expect("completes after resume")
        .unwrap();
    assert!(is_leader);
    assert_eq!(owner(&server).as_deref(), Some("a"));
    // Back to normal.
    assert_eq!(keep_alive(&mut c, "a", 30).await, (30, 0));
    server.shutdown().await;
}

#[tokio::test]
async fn fail_next_fails_n_calls_then_answers_normally() {
    let server = TestServer::start().await.unwrap();
    let mut c = connect(&server).await;
    server.fail_next(2, None, tonic::Status::unavailable("injected"));
    for _ in 0..2 {
        let err = c.try_acquire_lock(acquire_req("a", 30)).await.unwrap_err();
        assert_eq!(err.code(), Code::Unavailable);
        assert_eq!(err.message(), "injected");
    }
    assert_eq!(
        server.lock(SVC, DOM),
        None,
        "failed calls do not touch the store"
    );
    assert!(acquire(&mut c, "a", 30).await);
    assert_eq!(server.calls(RpcKind::TryAcquireLock), 3);
    server.shutdown().await;
}

#[tokio::test]
async fn fail_next_can_target_one_rpc() {
    let server = TestServer::start().await.unwrap();
    let mut c = connect(&server).await;
    server.fail_next(1, Some(RpcKind::KeepAlive), tonic::Status::internal("boom"));
    assert!(
        acquire(&mut c, "a", 30).await,
        "other RPCs are not affected"
    );
    release(&mut c, "nobody").await;
    let err = c.keep_alive(keep_alive_req("a", 30)).await.unwrap_err();
    assert_eq!(err.code(), Code::Internal);
    assert_eq!(keep_alive(&mut c, "a", 30).await, (30, 0));
    server.shutdown().await;
}

#[tokio::test]
async fn set_latency_delays_every_answer() {
    let server = TestServer::start().await.unwrap();
    let mut c = connect(&server).await;
    assert!(acquire(&mut c, "a", 30).await); // warm the connection up
    let latency = Duration::from_millis(300);
    server.set_latency(latency);
    for _ in 0..3 {
        let started = Instant::now();
        assert_eq!(keep_alive(&mut c, "a", 30).await, (30, 0));
        assert!(started.elapsed() >= latency, "{:?}", started.elapsed());
    }
    // Injected failures are delayed too.
    server.fail_next(1, None, tonic::Status::unavailable("slow failure"));
    let started = Instant::now();
    assert!(c.keep_alive(keep_alive_req("a", 30)).await.is_err());
    assert!(started.elapsed() >= latency);
    server.set_latency(Duration::ZERO);
    let started = Instant::now();
    assert_eq!(keep_alive(&mut c, "a", 30).await, (30, 0));
    assert!(started.elapsed() < Duration::from_secs(5));
    server.shutdown().await;
}

/// The server sends GOAWAY at `max_connection_age`; the channel moves to a new
/// connection and every call is answered.
///
/// One client-stack race is tolerated, and shown to be harmless: hyper's HTTP/2
/// client can fail a request with `Cancelled` ("connection closed") when it was
/// queued on a connection just as that connection's GOAWAY arrived. Such a
/// request never reached the server (checked via the server's call counter),
/// so retrying it is safe; at most one per recycled connection is allowed.
/// A client library must treat this error as transient (SPEC §3 rule 3).
#[tokio::test]
async fn max_connection_age_recycles_connections_and_loses_no_call() {
    let server = TestServer::builder()
        .max_connection_age(Duration::from_secs(1))
        .start()
        .await
        .unwrap();
    let mut c = connect(&server).await;
    assert!(acquire(&mut c, "a", 30).await);
    let started = Instant::now();
    let (mut answered, mut retried) = (0u64, 0u64);
    while started.elapsed() < Duration::from_millis(3500) {
        let mut attempts = 0;
        let lease = loop {
            match c.keep_alive(keep_alive_req("a", 30)).await {
                Ok(lease) => break lease,
                Err(e) if attempts == 0 && e.code() == Code::Cancelled => {
                    attempts += 1;
                    retried += 1;
                }
                Err(e) => panic!("call {answered} failed at {:?}: {e}", started.elapsed()),
            }
        };
        assert_eq!(lease.into_inner().lease_length.unwrap().seconds, 30);
        answered += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let connections = server.connections_accepted();
    assert!(answered > 10);
    assert!(
        connections >= 3,
        "the server closed connections, the channel reconnected: {connections} connections"
    );
    assert!(
        retried < connections,
        "{retried} retries for {connections} connections"
    );
    assert_eq!(
        server.calls(RpcKind::KeepAlive),
        answered,
        "no failed attempt reached the server"
    );
    server.shutdown().await;
}

#[tokio::test]
async fn shutdown_stops_serving_and_is_idempotent() {
    let server = TestServer::start().await.unwrap();
    let mut c = connect(&server).await;
    assert!(acquire(&mut c, "a", 30).await);
    server.shutdown().await;
    assert!(!server.is_serving().await);
    assert!(c.try_acquire_lock(acquire_req("a", 30)).await.is_err());
    assert!(c.try_acquire_lock(acquire_req("a", 30)).await.is_err());
    assert!(LeaderElectionServiceClient::connect(server.url())
        .await
        .is_err());
    server.shutdown().await;
    // The lock table survives a shutdown.
    assert_eq!(owner(&server).as_deref(), Some("a"));
}

#[tokio::test]
async fn shutdown_cuts_calls_hanging_in_pause() {
    let server = TestServer::start().await.unwrap();
    let c = connect(&server).await;
    server.pause();
    let mut c2 = c.clone();
    let call = tokio::spawn(async move { c2.try_acquire_lock(acquire_req("a", 30)).await });
    wait_until("the call to reach the server", || {
        server.calls(RpcKind::TryAcquireLock) == 1
    })
    .await;
    timeout(SOON, server.shutdown())
        .await
        .expect("shutdown does not wait for hanging calls");
    let result = timeout(SOON, call).await.expect("call ends").unwrap();
    assert!(result.is_err());
    assert_eq!(server.lock(SVC, DOM), None);
}

/// Retries a call until the restarted server answers it (the first call
/// on a channel whose connection was cut may fail).
async fn acquire_after_restart(c: &mut Client, id: &str, ttl: i32) -> bool {
    let deadline = Instant::now() + SOON;
    loop {
        match c.try_acquire_lock(acquire_req(id, ttl)).await {
            Ok(r) => return r.into_inner().is_leader,
            Err(e) => {
                assert!(Instant::now() < deadline, "server never came back: {e}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

#[tokio::test]
async fn restart_keeping_locks_serves_same_port_with_lock() {
    let server = TestServer::start().await.unwrap();
    let addr = server.addr();
    let mut c = connect(&server).await;
    assert!(acquire(&mut c, "a", 60).await);
    server.restart(true).await.unwrap();
    assert_eq!(server.addr(), addr);
    assert!(server.is_serving().await);
    assert!(
        !acquire_after_restart(&mut c, "b", 60).await,
        "a's lock survived"
    );
    assert_eq!(owner(&server).as_deref(), Some("a"));
    assert_eq!(keep_alive(&mut c, "a", 60).await, (60, 0));
    // A fresh client on the same URL works too.
    let mut fresh = connect(&server).await;
    assert_eq!(keep_alive(&mut fresh, "a", 60).await, (60, 0));
    server.shutdown().await;
}

#[tokio::test]
async fn restart_dropping_locks_clears_the_table() {
    let server = TestServer::start().await.unwrap();
    let addr = server.addr();
    let mut c = connect(&server).await;
    assert!(acquire(&mut c, "a", 60).await);
    server.shutdown().await;
    server.restart(false).await.unwrap();
    assert_eq!(server.addr(), addr);
    assert_eq!(server.lock(SVC, DOM), None);
    assert!(
        acquire_after_restart(&mut c, "b", 60).await,
        "the lock was dropped"
    );
    let history = server.tenures();
    assert_eq!(history.len(), 2);
    assert_eq!(history[0].owner, "a");
    assert_eq!(history[0].ended_by, TenureEnd::Dropped);
    assert_eq!(history[1].owner, "b");
    server.shutdown().await;
}

#[tokio::test]
async fn calls_counts_every_call_per_rpc() {
    let server = TestServer::start().await.unwrap();
    let mut c = connect(&server).await;
    for rpc in [
        RpcKind::TryAcquireLock,
        RpcKind::KeepAlive,
        RpcKind::ReleaseLock,
    ] {
        assert_eq!(server.calls(rpc), 0);
    }
    assert!(acquire(&mut c, "a", 30).await);
    assert!(!acquire(&mut c, "b", 30).await);
    server.fail_next(1, Some(RpcKind::KeepAlive), tonic::Status::unavailable("x"));
    assert!(c.keep_alive(keep_alive_req("a", 30)).await.is_err());
    keep_alive(&mut c, "a", 30).await;
    keep_alive(&mut c, "b", 30).await;
    release(&mut c, "a").await;
    assert_eq!(server.calls(RpcKind::TryAcquireLock), 2);
    assert_eq!(server.calls(RpcKind::KeepAlive), 3);
    assert_eq!(server.calls(RpcKind::ReleaseLock), 1);
    server.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn tenures_record_acquire_renew_release_steal_and_expiry() {
    let server = TestServer::start().await.unwrap();
    let mut c = LeaderElectionServiceClient::new(server.in_memory_channel());
    let s = Duration::from_secs(1);
    let t0 = Instant::now();

    assert!(acquire(&mut c, "a", 10).await); // tenure 0 starts at t0
    tokio::time::advance(s).await;
    assert!(acquire(&mut c, "a", 10).await); // renewal
    tokio::time::advance(s).await;
    assert_eq!(keep_alive(&mut c, "a", 10).await, (10, 0)); // renewal
    let running = server.tenures();
    assert_eq!(running.len(), 1);
    assert_eq!(running[0].ended_by, TenureEnd::Running);
    assert_eq!(running[0].end, t0 + 12 * s);
    tokio::time::advance(s).await;
    release(&mut c, "a").await; // tenure 0 released at t0 + 3 s

    assert!(acquire(&mut c, "b", 10).await); // tenure 1 at t0 + 3 s
    tokio::time::advance(s).await;
    server.set_owner(SVC, DOM, "c", 5 * s); // tenure 1 stolen at t0 + 4 s, tenure 2
    tokio::time::advance(6 * s).await; // tenure 2 expired at t0 + 9 s
    assert!(acquire(&mut c, "d", 10).await); // tenure 3 at t0 + 10 s
    server.force_expire(SVC, DOM); // tenure 3 force-expired at once

    let h = server.tenures();
    let summary: Vec<(&str, TenureEnd, Duration, Duration, u64)> = h
        .iter()
        .map(|t| {
            (
                t.owner.as_str(),
                t.ended_by,
                t.start - t0,
                t.end - t0,
                t.renewals,
            )
        })
        .collect();
    assert_eq!(
        summary,
        vec![
            ("a", TenureEnd::Released, Duration::ZERO, 3 * s, 2),
            ("b", TenureEnd::Stolen, 3 * s, 4 * s, 0),
            ("c", TenureEnd::Expired, 4 * s, 9 * s, 0),
            ("d", TenureEnd::ForceExpired, 10 * s, 10 * s, 0),
        ]
    );
    assert_eq!(
        h[0].expiry,
        t0 + 12 * s,
        "the expiry in force when released"
    );
    assert!(h.iter().all(|t| t.service == SVC && t.domain == DOM));
    // Tenures never overlap.
    for pair in h.windows(2) {
        assert!(pair[0].end <= pair[1].start);
    }
    server.shutdown().await;
}

#[tokio::test]
async fn max_connection_age_grace_cuts_calls_still_hanging() {
    let server = TestServer::builder()
        .max_connection_age(Duration::from_millis(500))
        .max_connection_age_grace(Duration::from_millis(500))
        .start()
        .await
        .unwrap();
    let c = connect(&server).await;
    server.pause();
    let mut c2 = c.clone();
    let started = Instant::now();
    let call = tokio::spawn(async move { c2.try_acquire_lock(acquire_req("a", 30)).await });
    let result = timeout(SOON, call)
        .await
        .expect("cut after age + grace")
        .unwrap();
    assert!(result.is_err(), "{result:?}");
    assert!(started.elapsed() >= Duration::from_millis(900));
    server.resume();
    server.shutdown().await;
}

/// Waits until only the test's own task is alive on this runtime.
async fn wait_for_no_tasks() {
    let metrics = tokio::runtime::Handle::current().metrics();
    let deadline = Instant::now() + SOON;
    while metrics.num_alive_tasks() > 0 {
        assert!(
            Instant::now() < deadline,
            "{} tasks still alive",
            metrics.num_alive_tasks()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn no_task_outlives_shutdown() {
    let server = TestServer::builder()
        .max_connection_age(Duration::from_secs(60))
        .start()
        .await
        .unwrap();
    let mut c = connect(&server).await;
    let mut m = LeaderElectionServiceClient::new(server.in_memory_channel());
    assert!(acquire(&mut c, "a", 30).await);
    assert!(acquire(&mut m, "a", 30).await);
    server.pause();
    let mut c2 = c.clone();
    let hanging = tokio::spawn(async move { c2.try_acquire_lock(acquire_req("b", 30)).await });
    wait_until("the call to hang", || {
        server.calls(RpcKind::TryAcquireLock) == 3
    })
    .await;
    server.shutdown().await;
    assert!(hanging.await.unwrap().is_err());
    drop((c, m));
    wait_for_no_tasks().await;
}

#[tokio::test]
async fn dropping_the_last_handle_stops_the_server() {
    let server = TestServer::start().await.unwrap();
    let addr = server.addr();
    let mut c = connect(&server).await;
    let mut m = LeaderElectionServiceClient::new(server.in_memory_channel());
    assert!(acquire(&mut c, "a", 30).await);
    assert!(acquire(&mut m, "a", 30).await);
    let clone = server.clone();
    drop(server);
    assert!(acquire(&mut c, "a", 30).await, "a clone keeps it alive");
    drop(clone);
    assert!(m.try_acquire_lock(acquire_req("a", 30)).await.is_err());
    drop((c, m));
    wait_for_no_tasks().await;
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
}

// ------------------------------------------------ lease policies and refusals

/// The raw `lease_length` of a KeepAlive answer (`None`: missing).
async fn raw_lease(client: &mut Client, id: &str, ttl: i32) -> Option<(i64, i32)> {
    client
        .keep_alive(keep_alive_req(id, ttl))
        .await
        .expect("KeepAlive")
        .into_inner()
        .lease_length
        .map(|d| (d.seconds, d.nanos))
}

#[tokio::test(start_paused = true)]
async fn lease_policy_as_asked_is_the_default() {
    let server = TestServer::start().await.unwrap();
    assert_eq!(server.lease_policy(), LeasePolicy::AsAsked);
    let mut c = LeaderElectionServiceClient::new(server.in_memory_channel());
    assert!(acquire(&mut c, "a", 10).await);
    assert_eq!(raw_lease(&mut c, "a", 7).await, Some((7, 0)));
    assert_eq!(
        server.lock(SVC, DOM).unwrap().remaining,
        Duration::from_secs(7)
    );
    server.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn lease_policy_clamp_shortens_the_real_expiry_and_the_answer() {
    let clamp = Duration::from_millis(1_800);
    let server = TestServer::builder()
        .lease_policy(LeasePolicy::Clamp(clamp))
        .start()
        .await
        .unwrap();
    let mut c = LeaderElectionServiceClient::new(server.in_memory_channel());
    let t0 = Instant::now();
    assert!(acquire(&mut c, "a", 3).await);
    assert_eq!(server.lock(SVC, DOM).unwrap().remaining, clamp, "acquire");
    tokio::time::advance(Duration::from_secs(1)).await;
    // KeepAlive: the store's expiry and the answer are both the clamp.
    assert_eq!(raw_lease(&mut c, "a", 3).await, Some((1, 800_000_000)));
    assert_eq!(server.lock(SVC, DOM).unwrap().remaining, clamp, "renew");
    // A ttl below the clamp is granted as asked.
    assert_eq!(raw_lease(&mut c, "a", 1).await, Some((1, 0)));
    assert_eq!(
        server.lock(SVC, DOM).unwrap().remaining,
        Duration::from_secs(1)
    );
    assert!(acquire(&mut c, "a", 3).await, "re-entrant, clamped");
    // The real expiry is the clamped one: another node gets it then.
    tokio::time::advance(clamp - Duration::from_millis(1)).await;
    assert!(!acquire(&mut c, "b", 3).await);
    tokio::time::advance(Duration::from_millis(1)).await;
    assert!(acquire(&mut c, "b", 3).await);
    // Non-owners still get -1 s.
    assert_eq!(raw_lease(&mut c, "a", 3).await, Some((-1, 0)));
    // The tenures are the store's truth: the shorter expiry.
    let history = server.tenures();
    assert_eq!(history.len(), 2);
    assert_eq!(history[0].owner, "a");
    assert_eq!(history[0].ended_by, TenureEnd::Expired);
    assert_eq!(
        history[0].end,
        t0 + Duration::from_secs(1) + clamp,
        "expired at the clamped lease, not the asked ttl"
    );
    assert_eq!(history[1].expiry, history[1].start + clamp);
    // Back to AsAsked: the next renewal grants the ttl asked for.
    server.set_lease_policy(LeasePolicy::AsAsked);
    assert_eq!(raw_lease(&mut c, "b", 3).await, Some((3, 0)));
    server.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn lease_policy_answer_sends_a_raw_lease_length_to_the_owner_only() {
    let server = TestServer::start().await.unwrap();
    let mut c = LeaderElectionServiceClient::new(server.in_memory_channel());
    let t0 = Instant::now();
    assert!(acquire(&mut c, "a", 3).await);
    for (seconds, nanos) in [
        (3600, 0),
        (0, 1),
        (i64::MAX, 999_999_999),
        (i64::MIN, 0),
        (1, 1_000_000_000),
        (0, -1),
        (2, -500_000_000),
        (-2, 500_000_000),
    ] {
        server.set_lease_policy(LeasePolicy::Answer { seconds, nanos });
        assert_eq!(
            raw_lease(&mut c, "a", 3).await,
            Some((seconds, nanos)),
            "answered as set"
        );
        // The store behaves as asked: the ttl requested, from now.
        assert_eq!(
            server.lock(SVC, DOM).unwrap().remaining,
            Duration::from_secs(3)
        );
        assert_eq!(raw_lease(&mut c, "b", 3).await, Some((-1, 0)), "non-owner");
    }
    let history = server.tenures();
    assert_eq!(history.len(), 1);
    assert_eq!(history[0].expiry, t0 + Duration::from_secs(3));
    server.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn lease_policy_missing_omits_the_owners_lease_length() {
    let server = TestServer::start().await.unwrap();
    server.set_lease_policy(LeasePolicy::Missing);
    let mut c = LeaderElectionServiceClient::new(server.in_memory_channel());
    assert!(acquire(&mut c, "a", 3).await);
    tokio::time::advance(Duration::from_secs(2)).await;
    assert_eq!(raw_lease(&mut c, "a", 3).await, None);
    assert_eq!(
        server.lock(SVC, DOM).unwrap().remaining,
        Duration::from_secs(3),
        "the store renewed as asked"
    );
    assert_eq!(raw_lease(&mut c, "b", 3).await, Some((-1, 0)), "non-owner");
    server.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn refusal_delay_holds_back_refusals_decided_on_arrival() {
    let delay = Duration::from_secs(2);
    let server = TestServer::start().await.unwrap();
    server.set_refusal_delay(delay);
    assert_eq!(server.refusal_delay(), delay);
    let channel = server.in_memory_channel();
    let mut a = LeaderElectionServiceClient::new(channel.clone());
    let mut b = LeaderElectionServiceClient::new(channel);

    // Grants are not delayed.
    let t0 = Instant::now();
    assert!(acquire(&mut a, "a", 3).await);
    assert_eq!(raw_lease(&mut a, "a", 3).await, Some((3, 0)));
    assert_eq!(Instant::now(), t0);

    // b's TryAcquireLock is refused at once (a owns the lock) but answered
    // 2 s later; its KeepAlive likewise.
    let refused_acquire = {
        let mut b = b.clone();
        tokio::spawn(async move {
            let answer = b.try_acquire_lock(acquire_req("b", 3)).await;
            (Instant::now(), answer.map(|r| r.into_inner().is_leader))
        })
    };
    let refused_keep_alive = {
        let mut b = b.clone();
        tokio::spawn(async move {
            let answer = raw_lease(&mut b, "b", 3).await;
            (Instant::now(), answer)
        })
    };
    // Under paused time: yield (no clock advance) until both arrived.
    for _ in 0..10_000 {
        if server.calls(RpcKind::TryAcquireLock) == 2 && server.calls(RpcKind::KeepAlive) == 2 {
            break;
        }
        tokio::task::yield_now().await;
    }
    assert_eq!(server.calls(RpcKind::TryAcquireLock), 2);
    assert_eq!(server.calls(RpcKind::KeepAlive), 2);
    assert_eq!(Instant::now(), t0, "no time passed yet");

    // Meanwhile, the lock changes hands: a releases and b acquires, on the
    // same connection as its pending refusals, without waiting for them.
    release(&mut a, "a").await;
    assert!(acquire(&mut b, "b", 3).await);
    assert_eq!(Instant::now(), t0);
    assert_eq!(owner(&server), Some("b".to_string()));

    // The refusals decided before that grant arrive afterwards.
    let (at, answer) = refused_acquire.await.unwrap();
    assert!(!answer.unwrap(), "refused");
    assert_eq!(at, t0 + delay);
    let (at, answer) = refused_keep_alive.await.unwrap();
    assert_eq!(answer, Some((-1, 0)));
    assert_eq!(at, t0 + delay);
    assert_eq!(
        owner(&server),
        Some("b".to_string()),
        "the store is untouched"
    );

    // Zero turns it off.
    server.set_refusal_delay(Duration::ZERO);
    let t1 = Instant::now();
    assert!(!acquire(&mut a, "a", 3).await);
    assert_eq!(Instant::now(), t1);
    server.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn lease_policy_clamp_renewals_leaves_acquire_as_asked() {
    let clamp = Duration::from_millis(700);
    let server = TestServer::start().await.unwrap();
    server.set_lease_policy(LeasePolicy::ClampRenewals(clamp));
    let mut c = LeaderElectionServiceClient::new(server.in_memory_channel());
    assert!(acquire(&mut c, "a", 3).await);
    assert_eq!(
        server.lock(SVC, DOM).unwrap().remaining,
        Duration::from_secs(3),
        "acquire: as asked"
    );
    assert_eq!(raw_lease(&mut c, "a", 3).await, Some((0, 700_000_000)));
    assert_eq!(server.lock(SVC, DOM).unwrap().remaining, clamp, "renewal");
    tokio::time::advance(clamp).await;
    assert_eq!(server.lock(SVC, DOM), None, "expired at the clamp");
    assert_eq!(server.tenures()[0].ended_by, TenureEnd::Expired);
    server.shutdown().await;
}
