//! Many elections on one connection: a cold start of thousands of locks
//! created at once goes through the connection's admission control with no
//! failed call and no redial; calls are timed from their send, not from their
//! wait in the local queue; and a leader whose renewal waits in that queue
//! still steps down at its deadline.
#![cfg(feature = "testing")]

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::*;
use futures::stream::BoxStream;
use futures::StreamExt;
use quorum_quest_client::testing::TestServer;
use quorum_quest_client::{Error, LeadershipEvent, LossReason, QuorumQuestClient, RpcKind};
use tokio::time::Instant;

/// What a set of leadership streams reported.
#[derive(Debug, Default)]
struct Tally {
    elected: HashSet<usize>,
    failed: Vec<(usize, RpcKind, quorum_quest_client::tonic::Code, String)>,
    lost: usize,
}

type Streams = futures::stream::SelectAll<BoxStream<'static, (usize, LeadershipEvent)>>;

/// Follows the leadership streams of `shards` until every one was elected
/// (or `within` ran out), counting failed calls and losses. The streams are
/// returned: dropping them resigns the locks.
async fn elect_all(shards: &[QuorumQuestClient], within: Duration) -> (Tally, Streams) {
    let mut all = futures::stream::select_all(
        shards
            .iter()
            .enumerate()
            .map(|(i, s)| s.leadership().map(move |ev| (i, ev)).boxed()),
    );
    let mut tally = Tally::default();
    let deadline = Instant::now() + within;
    while tally.elected.len() < shards.len() {
        let Ok(Some((i, ev))) = tokio::time::timeout_at(deadline, all.next()).await else {
            break;
        };
        match ev {
            LeadershipEvent::Elected { .. } => {
                tally.elected.insert(i);
            }
            LeadershipEvent::RpcFailed {
                rpc, code, message, ..
            } => tally.failed.push((i, rpc, code, message)),
            LeadershipEvent::Lost { .. } => tally.lost += 1,
            _ => {}
        }
    }
    (tally, all)
}

/// N locks created at once on one connection to a `TestServer` over loopback
/// TCP (debug build on a busy 2-core machine: about 3 s for the whole test,
/// see the printed figure; the 60 s bound is generous).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_thousand_elections_created_at_once_are_all_elected_with_no_failed_call_and_no_redial()
{
    const N: usize = 5_000;
    let server = server().await;
    let root = over_tcp(&server.url(), 30).build().await.unwrap();
    let shards: Vec<_> = (0..N)
        .map(|i| root.for_scope("indexer", format!("shard-{i}")).unwrap())
        .collect();
    let started = std::time::Instant::now();
    let (tally, streams) = elect_all(&shards, 60 * SEC).await;
    let took = started.elapsed();
    eprintln!(
        "{N} elections created at once: all elected in {took:?}; {} failed calls; {} connections",
        tally.failed.len(),
        server.connections_accepted()
    );
    assert!(
        tally.failed.is_empty(),
        "{} failed calls, e.g. {:?}",
        tally.failed.len(),
        tally.failed.first()
    );
    assert_eq!(tally.elected.len(), N, "every lock is elected");
    assert_eq!(tally.lost, 0);
    // Each lock was granted on its first attempt and confirmed once (a
    // renewal is due only after 10 s), on the one connection `build()` opened.
    assert_eq!(server.calls(RpcKind::TryAcquireLock), N as u64);
    assert!(server.calls(RpcKind::KeepAlive) >= N as u64);
    assert_eq!(server.connections_accepted(), 1, "no redial");
    for (i, shard) in shards.iter().enumerate().step_by(499) {
        assert!(shard.is_leader(), "shard {i}");
        let lock = server.lock("indexer", &format!("shard-{i}")).unwrap();
        assert_eq!(lock.owner, root.client_id());
    }
    // Dropping a leading stream releases before the drop returns (on this
    // multi-thread runtime): one round trip each, in sequence.
    let dropping = std::time::Instant::now();
    drop(streams);
    eprintln!(
        "{N} leading streams dropped (each released) in {:?}",
        dropping.elapsed()
    );
    assert!(server.lock("indexer", "shard-0").is_none());
    assert!(server
        .lock("indexer", &format!("shard-{}", N - 1))
        .is_none());
}

/// A cold start costs a bounded number of tasks, not one or two per
/// election: the connection's driver runs every campaign and every step-down
/// timer, and at most twice the cap on calls of follower attempts are in
/// flight; the other elections wait as ids in the driver's queue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cold_start_holds_a_bounded_number_of_tasks_not_one_per_election() {
    const N: usize = 3_000;
    const CAP: usize = 10;
    let server = server().await;
    let root = over_tcp(&server.url(), 30)
        .max_concurrent_calls(CAP)
        .build()
        .await
        .unwrap();
    let metrics = tokio::runtime::Handle::current().metrics();
    let before = metrics.num_alive_tasks();
    // Nothing is answered: every election stays at its first attempt.
    server.pause();
    let shards: Vec<_> = (0..N)
        .map(|i| root.for_scope("indexer", format!("shard-{i}")).unwrap())
        .collect();
    let mut all = futures::stream::select_all(
        shards
            .iter()
            .enumerate()
            .map(|(i, s)| s.leadership().map(move |ev| (i, ev)).boxed()),
    );
    // Streams campaign once polled: read them in a task of their own.
    let (events, mut received) = tokio::sync::mpsc::unbounded_channel();
    let reader = tokio::spawn(async move {
        while let Some(ev) = all.next().await {
            if events.send(ev).is_err() {
                break;
            }
        }
    });
    let waiting = Instant::now() + 20 * SEC;
    while server.calls(RpcKind::TryAcquireLock) < CAP as u64 {
        assert!(
            Instant::now() < waiting,
            "the first attempts reach the server"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Every election has had time to ask its driver for its first call.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let tasks = metrics.num_alive_tasks().saturating_sub(before);
    eprintln!("{N} elections waiting for their first answer: {tasks} tasks");
    // Client: 2 x CAP call tasks, the driver and the reader; server: a few
    // per connection and one per call it holds (CAP). Two per election
    // would be 6,000.
    assert!(tasks <= 4 * CAP + 50, "{tasks} tasks for {N} elections");
    assert_eq!(
        server.calls(RpcKind::TryAcquireLock),
        CAP as u64,
        "the cap holds"
    );
    server.resume();
    let mut elected = HashSet::new();
    let deadline = Instant::now() + 60 * SEC;
    while elected.len() < N {
        let Ok(Some((i, ev))) = tokio::time::timeout_at(deadline, received.recv()).await else {
            panic!("{} of {N} elected", elected.len());
        };
        match ev {
            LeadershipEvent::Elected { .. } => {
                elected.insert(i);
            }
            LeadershipEvent::RpcFailed { rpc, code, .. } => panic!("{rpc:?} failed: {code:?}"),
            LeadershipEvent::Lost { reason, .. } => panic!("lost: {reason:?}"),
            _ => {}
        }
    }
    assert_eq!(server.calls(RpcKind::TryAcquireLock), N as u64);
    // The streams resign (each releases) before the runtime shuts down.
    reader.abort();
    let _ = reader.await;
}

/// Two calls in flight at a time, each answered after 50 ms: forty
/// elections need two seconds of queueing, four times the 500 ms call
/// timeout. Timed from the send, no call fails.
#[tokio::test(start_paused = true)]
async fn a_call_is_timed_from_its_send_not_from_its_wait_in_the_queue() {
    let server = quorum_quest_client::testing::TestServer::builder()
        .latency(ms(50))
        .start()
        .await
        .unwrap();
    let root = in_memory(&server, 5)
        .rpc_timeout(ms(500))
        .max_concurrent_calls(2)
        .build()
        .await
        .unwrap();
    let shards: Vec<_> = (0..40)
        .map(|i| root.for_scope("indexer", format!("shard-{i}")).unwrap())
        .collect();
    let started = Instant::now();
    let (tally, _streams) = elect_all(&shards, 30 * SEC).await;
    assert!(tally.failed.is_empty(), "{:?}", tally.failed);
    assert_eq!(tally.elected.len(), 40);
    // The queue really was long: 80 calls, two at a time, 50 ms each.
    assert!(started.elapsed() >= ms(1900), "{:?}", started.elapsed());
    assert_eq!(server.connections_accepted(), 1, "no redial");
}

/// The only call slot is taken by a call that hangs; the leader's renewal
/// waits for it in the queue, never reaches the server, and the leader
/// steps down at its safe deadline all the same (the step-down timer does
/// not wait for the queue).
#[tokio::test(start_paused = true)]
async fn a_leader_whose_renewal_waits_in_the_queue_steps_down_at_its_deadline() {
    let server = server().await;
    let leader = on_one_slot(&server, 3).await;
    let mut stream = leader.leadership();
    let LeadershipEvent::Elected {
        lease_remaining, ..
    } = next(&mut stream, 5 * SEC, "Elected").await
    else {
        panic!("first event must be Elected");
    };
    let deadline = Instant::now() + lease_remaining;
    let renewals_before = server.calls(RpcKind::KeepAlive);
    // Another lock on the same connection takes the only slot with a call
    // the server answers after a minute.
    server.set_latency(60 * SEC);
    let other = QuorumQuestClient::builder("other", "lock")
        .share_connection(&leader)
        .ttl(100 * SEC)
        .rpc_timeout(30 * SEC)
        .build()
        .await
        .unwrap();
    let hog = tokio::spawn(async move { other.try_acquire_lock().await });
    tokio::task::yield_now().await;
    let lost = until(&mut stream, 5 * SEC, "Lost", |ev| {
        matches!(ev, LeadershipEvent::Lost { .. })
    })
    .await;
    assert!(is_lost_with(&lost, LossReason::Expired), "{lost:?}");
    let at = Instant::now();
    assert!(
        at >= deadline && at <= deadline + ms(5),
        "lost {:?} after the deadline",
        at.saturating_duration_since(deadline)
    );
    assert!(!leader.is_leader());
    // The renewal never left the queue.
    assert_eq!(server.calls(RpcKind::KeepAlive), renewals_before);
    hog.abort();
}

#[tokio::test]
async fn max_concurrent_calls_must_be_positive_and_belongs_to_the_connection() {
    let server = server().await;
    let zero = over_tcp(&server.url(), 15)
        .max_concurrent_calls(0)
        .build()
        .await;
    match zero {
        Err(Error::InvalidParameter(m)) => assert!(m.starts_with("max_concurrent_calls"), "{m}"),
        other => panic!("{other:?}"),
    }
    let first = over_tcp(&server.url(), 15)
        .max_concurrent_calls(8)
        .build()
        .await
        .unwrap();
    let shared = QuorumQuestClient::builder("svc", "other")
        .share_connection(&first)
        .max_concurrent_calls(4)
        .build()
        .await;
    match shared {
        Err(Error::InvalidParameter(m)) => assert!(m.starts_with("max_concurrent_calls"), "{m}"),
        other => panic!("{other:?}"),
    }
}

/// `shutdown()` is bounded by about one second plus the RPC timeout, its
/// release's wait for a call slot included (found by attack: the release
/// waited up to the RPC timeout for a slot and then had a whole RPC timeout
/// of its own, so a release queued behind a slow call took 8 s here). The
/// release still goes out, with what is left of the budget.
#[tokio::test(start_paused = true)]
async fn shutdown_stays_within_one_second_plus_the_rpc_timeout_when_its_release_waits_for_a_slot() {
    let server = server().await;
    let leader = on_one_slot(&server, 15).await;
    assert!(leader.try_acquire_lock().await.unwrap());
    let rpc_timeout = leader.timing().rpc_timeout;
    assert_eq!(rpc_timeout, 5 * SEC);
    // Another lock on the same connection, held by someone else: its
    // attempt is refused, after the server's 4 s latency.
    server.set_owner("other", "lock", "someone-else", 100 * SEC);
    let other = QuorumQuestClient::builder("other", "lock")
        .share_connection(&leader)
        .ttl(15 * SEC)
        .build()
        .await
        .unwrap();
    server.set_latency(4 * SEC);
    let hog = tokio::spawn(async move { other.try_acquire_lock().await });
    eventually(SEC, "the other attempt is on the wire", || {
        server.calls(RpcKind::TryAcquireLock) == 2
    })
    .await;
    let started = Instant::now();
    // The release waits 4 s for the slot, goes out with 1 s left, and the
    // server acts on it (its answer comes too late).
    let _ = leader.shutdown().await;
    let took = started.elapsed();
    assert!(!leader.is_leader());
    assert_eq!(
        server.calls(RpcKind::ReleaseLock),
        1,
        "the release was sent"
    );
    assert!(server.lock(SERVICE, DOMAIN).is_none());
    assert!(
        took <= SEC + rpc_timeout,
        "shutdown took {took:?}, over 1 s + the RPC timeout ({rpc_timeout:?})"
    );
    assert!(matches!(hog.await.unwrap(), Ok(false)));
}

/// Many elections on one connection that the server ages out every 300 ms
/// (GOAWAY, then cut after a 200 ms grace) while calls wait in the
/// admission queue: every lock is elected, and no leader loses its lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn elections_queued_across_goaways_are_all_elected_and_keep_their_leases() {
    const N: usize = 100;
    let server = quorum_quest_client::testing::TestServer::builder()
        .max_connection_age(ms(300))
        .max_connection_age_grace(ms(200))
        .latency(ms(20))
        .start()
        .await
        .unwrap();
    let root = over_tcp(&server.url(), 6)
        .max_concurrent_calls(8)
        .build()
        .await
        .unwrap();
    let shards: Vec<_> = (0..N)
        .map(|i| root.for_scope("indexer", format!("shard-{i}")).unwrap())
        .collect();
    let (tally, mut streams) = elect_all(&shards, 60 * SEC).await;
    assert_eq!(tally.elected.len(), N, "{:?}", tally.failed.first());
    // Four more seconds: each lease (6 s TTL, renewed every 2 s) is renewed
    // twice across some ten GOAWAYs.
    let mut failed = tally.failed.len();
    let mut lost = tally.lost;
    let end = Instant::now() + 4 * SEC;
    while let Ok(Some((_, ev))) = tokio::time::timeout_at(end, streams.next()).await {
        match ev {
            LeadershipEvent::RpcFailed { .. } => failed += 1,
            LeadershipEvent::Lost { .. } => lost += 1,
            _ => {}
        }
    }
    eprintln!(
        "{N} elections across {} connections: {failed} failed calls, {lost} losses",
        server.connections_accepted()
    );
    assert_eq!(lost, 0, "{failed} failed calls");
    for (i, shard) in shards.iter().enumerate() {
        assert!(shard.is_leader(), "shard {i}");
    }
}

/// Every way a call can be abandoned (a `try_acquire_lock` future dropped
/// while its call is on the wire, a stream dropped and `stop_keep_alive` /
/// `shutdown()` called while their campaign's call waits for the only slot)
/// gives the slot back: afterwards the one-slot connection still serves a
/// call at once.
#[tokio::test(start_paused = true)]
async fn no_abandoned_call_keeps_a_slot() {
    let server = server().await;
    let root = on_one_slot(&server, 15).await;
    let shard = |i: usize| root.for_scope("indexer", format!("shard-{i}")).unwrap();
    server.set_latency(SEC);
    // On the wire, then dropped.
    let a = shard(0);
    let on_wire = tokio::spawn(async move { a.try_acquire_lock().await });
    eventually(SEC, "on the wire", || {
        server.calls(RpcKind::TryAcquireLock) == 1
    })
    .await;
    // Queued behind it: a stream's campaign, a keep-alive, a shutdown.
    let b = shard(1);
    let mut stream = b.leadership();
    let _ = tokio::time::timeout(ms(1), stream.next()).await;
    let c = shard(2);
    c.start_keep_alive().await.unwrap();
    let d = shard(3);
    d.start_keep_alive().await.unwrap();
    tokio::time::sleep(ms(100)).await;
    on_wire.abort();
    drop(stream);
    c.stop_keep_alive().await;
    d.shutdown().await.ok();
    server.set_latency(Duration::ZERO);
    tokio::time::sleep(10 * SEC).await;
    let e = shard(4);
    let started = Instant::now();
    assert!(e.try_acquire_lock().await.unwrap());
    assert!(started.elapsed() <= ms(10), "{:?}", started.elapsed());
}

/// A leader that renews by calling `try_acquire_lock()` (re-entrant: "a
/// leader's call renews") has its lease at stake like a keep-alive: its
/// call must not wait behind other locks' attempts in the queue (found by
/// attack: a `TryAcquireLock` always queued as a follower's attempt, so
/// with eight followers ahead on a one-slot connection and a server
/// answering in 1 s, the leader's renewal gave up unsent).
#[tokio::test(start_paused = true)]
async fn a_leader_renewing_with_try_acquire_lock_goes_ahead_of_followers() {
    let server = server().await;
    let leader = on_one_slot(&server, 15).await;
    assert!(leader.try_acquire_lock().await.unwrap());
    server.set_latency(SEC);
    let followers: Vec<_> = (0..8)
        .map(|i| {
            let domain = format!("taken-{i}");
            server.set_owner("indexer", &domain, "someone-else", 1_000 * SEC);
            leader.for_scope("indexer", domain).unwrap()
        })
        .collect();
    let mut streams = futures::stream::select_all(followers.iter().map(|f| f.leadership()));
    let _ = tokio::time::timeout(ms(10), streams.next()).await;
    // Eight attempts now wait for the one slot, one per second.
    let started = Instant::now();
    let renewed = leader.try_acquire_lock().await;
    assert!(matches!(renewed, Ok(true)), "{renewed:?}");
    assert!(
        started.elapsed() <= 4 * SEC,
        "the renewal waited {:?} behind followers",
        started.elapsed()
    );
}

/// An acquire that waits for a slot when `shutdown()` is called is not sent
/// (it fails with `Error::Shutdown`). Found by attack: the shutdown's
/// release, urgent, passed it in the queue, and the acquire went out after
/// it: the client was granted the lock again, led after `shutdown()`
/// returned, and left the lock held for nobody until its TTL.
#[tokio::test(start_paused = true)]
async fn an_acquire_queued_before_shutdown_is_not_sent_after_its_release() {
    let server = server().await;
    let client = on_one_slot(&server, 15).await;
    server.set_owner("other", "lock", "someone-else", 1_000 * SEC);
    let other = QuorumQuestClient::builder("other", "lock")
        .share_connection(&client)
        .ttl(15 * SEC)
        .build()
        .await
        .unwrap();
    server.set_latency(SEC);
    let hog = tokio::spawn(async move { other.try_acquire_lock().await });
    eventually(SEC, "the other attempt is on the wire", || {
        server.calls(RpcKind::TryAcquireLock) == 1
    })
    .await;
    let acquiring = client.clone();
    let queued = tokio::spawn(async move { acquiring.try_acquire_lock().await });
    tokio::time::sleep(ms(100)).await;
    let _ = client.shutdown().await;
    let acquired = queued.await.unwrap();
    let _ = hog.await;
    tokio::time::sleep(SEC).await;
    assert!(matches!(acquired, Err(Error::Shutdown)), "{acquired:?}");
    assert!(
        !client.is_leader(),
        "leads after shutdown() (the queued attempt said {acquired:?})"
    );
    assert_eq!(
        server.lock(SERVICE, DOMAIN).map(|l| l.owner),
        None,
        "the lock is held after shutdown() (the queued attempt said {acquired:?})"
    );
}

/// Renewals due within one slot (a hundredth of the renew interval, on a
/// grid shared by the process) go out together: whatever their jitter, the
/// renewals of locks elected at different instants reach the server a whole
/// number of slots apart. A process holding many locks thus wakes and
/// writes once per slot, not once per renewal.
#[tokio::test(start_paused = true)]
async fn renewals_go_out_at_the_starts_of_slots_shared_by_every_lock() {
    let server = server().await;
    // TTL 3 s: renew interval 1 s, slots 10 ms.
    let root = in_memory(&server, 3).build().await.unwrap();
    let slot = ms(10);
    let shards = shards(&root, "indexer", 12);
    // Elected one after the other, 3 ms apart: without the grid their
    // renewals would be 3 ms apart too, plus their jitter (whole
    // milliseconds under paused time).
    let mut all = elected_one_by_one(&shards, ms(3)).await;
    one_renewal_each(&mut all, shards.len(), "first renewals").await;
    // Each lock's expiry is its last KeepAlive's arrival plus the TTL, the
    // same for all: their differences are the renewals' differences.
    let expiries: Vec<Instant> = by_last_keep_alive(&server, "indexer")
        .into_iter()
        .map(|(expiry, _)| expiry)
        .collect();
    assert_eq!(expiries.len(), shards.len());
    let first = expiries[0];
    for expiry in &expiries {
        let apart = expiry.duration_since(first);
        assert_eq!(
            apart.as_nanos() % slot.as_nanos(),
            0,
            "a renewal {apart:?} after the first is not a whole number of slots after it"
        );
    }
    // They really were spread: elected 33 ms apart in all, jittered over 90 ms.
    let distinct: HashSet<_> = expiries.iter().collect();
    assert!(distinct.len() >= 2, "{expiries:?}");
}

/// Renewals that come due together (a slot's, or all of them after the
/// driver's runtime could not run it) go out earliest lease deadline first,
/// whatever their jitter: when a burst takes a while to send, the leases
/// closest to their end are renewed first. One call at a time, each
/// answered after 1 ms, so the server sees them in the order they left.
#[tokio::test(start_paused = true)]
async fn renewals_due_together_go_out_earliest_deadline_first() {
    let server = TestServer::builder().latency(ms(1)).start().await.unwrap();
    let root = on_one_slot(&server, 3).await;
    let shards = shards(&root, "indexer", 20);
    // Elected one after the other, 3 ms apart: their deadlines come in
    // this order, their jittered renewals (up to 90 ms early) in another.
    let mut all = elected_one_by_one(&shards, ms(3)).await;
    // Every renewal comes due at once (a renew interval of 1 s passes in
    // one step, as for a driver whose runtime did not run meanwhile).
    tokio::time::advance(ms(1100)).await;
    one_renewal_each(&mut all, shards.len(), "after the stall").await;
    // The order the renewals reached the server in: the order of election.
    let order: Vec<usize> = by_last_keep_alive(&server, "indexer")
        .into_iter()
        .map(|(_, shard)| shard)
        .collect();
    assert_eq!(order, (0..shards.len()).collect::<Vec<_>>());
}
