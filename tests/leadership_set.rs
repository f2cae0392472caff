//! `LeadershipSet`: many leadership streams read as one, each keeping its
//! own guarantees, against a real TestServer.
#![cfg(feature = "testing")]

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::*;
use futures::StreamExt;
use quorum_quest_client::testing::TestServer;
use quorum_quest_client::{LeadershipEvent, LeadershipSet, LossReason, QuorumQuestClient};

/// A client for lock `domain` on `server` over in-memory pipes.
async fn client_for(server: &TestServer, domain: &str, id: &str) -> QuorumQuestClient {
    QuorumQuestClient::builder(SERVICE, domain)
        .channel(server.in_memory_channel())
        .client_id(id)
        .ttl(Duration::from_secs(3))
        .jitter_seed(1)
        .build()
        .await
        .unwrap()
}

/// The set's next item within `within`, or a panic naming what was awaited.
async fn next_of<K>(
    set: &mut LeadershipSet<K>,
    within: Duration,
    what: &str,
) -> (K, LeadershipEvent)
where
    K: std::hash::Hash + Eq + Clone,
{
    match tokio::time::timeout(within, set.next()).await {
        Ok(Some(item)) => item,
        Ok(None) => panic!("the set ended while waiting for {what}"),
        Err(_) => panic!("nothing within {within:?} while waiting for {what}"),
    }
}

#[tokio::test(start_paused = true)]
async fn each_lock_in_a_set_is_elected_and_renewed_under_its_own_key() {
    let server = server().await;
    let root = client_for(&server, "root", "node-a").await;
    let mut set = LeadershipSet::new();
    let mut clients = HashMap::new();
    for shard in 0..20u32 {
        let client = root.for_scope(SERVICE, format!("shard-{shard}")).unwrap();
        assert!(set.insert(shard, client.leadership()).is_none());
        clients.insert(shard, client);
    }
    assert_eq!(set.len(), 20);
    // Every shard: Elected once, then Renewed, each under its own key and
    // term; every event of a key is about that key's lock.
    let mut elected: HashMap<u32, u64> = HashMap::new();
    let mut renewed: HashMap<u32, usize> = HashMap::new();
    while renewed.len() < 20 || renewed.values().any(|n| *n < 2) {
        let (shard, ev) = next_of(&mut set, 5 * SEC, "every shard renewed twice").await;
        match ev {
            LeadershipEvent::Elected { term, .. } => {
                assert!(
                    elected.insert(shard, term.id()).is_none(),
                    "shard {shard} elected twice without a loss"
                );
                assert!(clients[&shard].is_leader());
                let lock = server
                    .lock(SERVICE, &format!("shard-{shard}"))
                    .expect("an elected shard's lock is held");
                assert_eq!(lock.owner, "node-a");
            }
            LeadershipEvent::Renewed { term_id, .. } => {
                assert_eq!(
                    Some(&term_id),
                    elected.get(&shard),
                    "shard {shard} renewed before its Elected, or another term"
                );
                *renewed.entry(shard).or_default() += 1;
            }
            other => panic!("shard {shard}: unexpected {other:?}"),
        }
    }
}

#[tokio::test(start_paused = true)]
async fn contenders_in_one_set_never_both_lead_and_a_removed_leader_hands_over() {
    let server = server().await;
    let a = client_for(&server, DOMAIN, "node-a").await;
    let b = client_for(&server, DOMAIN, "node-b").await;
    let mut set: LeadershipSet<&str> = [("a", a.leadership()), ("b", b.leadership())]
        .into_iter()
        .collect();
    let (first, ev) = next_of(&mut set, 5 * SEC, "one Elected").await;
    // The other is told it follows; nobody else is elected meanwhile.
    let mut leader = None;
    let mut follower_seen = false;
    let (mut key, mut event) = (first, ev);
    for _ in 0..10 {
        match &event {
            LeadershipEvent::Elected { .. } => {
                assert!(leader.is_none(), "{key} elected while {leader:?} leads");
                leader = Some(key);
            }
            LeadershipEvent::Follower => follower_seen = true,
            LeadershipEvent::Renewed { .. } => assert_eq!(Some(key), leader),
            other => panic!("{key}: unexpected {other:?}"),
        }
        assert!(!(a.is_leader() && b.is_leader()), "two leaders");
        if leader.is_some() && follower_seen {
            break;
        }
        (key, event) = next_of(&mut set, 5 * SEC, "the follower's news").await;
    }
    let leader = leader.expect("one leads");
    assert!(follower_seen, "the other contender reports Follower");
    // The leader's stream leaves the set: still campaigning until dropped;
    // dropped, it releases, and the other is elected through the set.
    let removed = set.remove(&leader).expect("the leader's stream");
    assert!(!set.contains_key(&leader));
    assert_eq!(set.len(), 1);
    drop(removed);
    let (key, ev) = until_set(&mut set, 10 * SEC, "the other elected", |_, e| {
        e.is_elected()
    })
    .await;
    assert_ne!(key, leader);
    assert!(matches!(ev, LeadershipEvent::Elected { .. }));
    let (now_leads, old) = if leader == "a" { (&b, &a) } else { (&a, &b) };
    assert!(now_leads.is_leader());
    assert!(!old.is_leader());
}

/// Skips the set's items until one matches; panics after `within`.
async fn until_set<K, P>(
    set: &mut LeadershipSet<K>,
    within: Duration,
    what: &str,
    mut pred: P,
) -> (K, LeadershipEvent)
where
    K: std::hash::Hash + Eq + Clone,
    P: FnMut(&K, &LeadershipEvent) -> bool,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let (key, ev) = next_of(set, left, what).await;
        if pred(&key, &ev) {
            return (key, ev);
        }
    }
}

#[tokio::test(start_paused = true)]
async fn a_stream_that_ends_leaves_the_set_after_its_loss_and_an_empty_set_ends() {
    let server = server().await;
    let a = client_for(&server, "lock-a", "node-a").await;
    let b = client_for(&server, "lock-b", "node-a").await;
    let mut set = LeadershipSet::new();
    set.insert(1u8, a.leadership());
    set.insert(2u8, b.leadership());
    let mut elected = Vec::new();
    while elected.len() < 2 {
        let (key, ev) = next_of(&mut set, 5 * SEC, "both elected").await;
        if ev.is_elected() {
            elected.push(key);
        }
    }
    a.shutdown().await.unwrap();
    let (key, ev) = until_set(&mut set, 5 * SEC, "a's loss", |k, _| *k == 1).await;
    assert_eq!(key, 1);
    assert!(is_lost_with(&ev, LossReason::Released), "{ev:?}");
    // Its stream ended: it leaves the set; b goes on.
    until_set(&mut set, 5 * SEC, "b renewed", |k, e| {
        *k == 2 && matches!(e, LeadershipEvent::Renewed { .. })
    })
    .await;
    assert!(!set.contains_key(&1));
    assert_eq!(set.keys().copied().collect::<Vec<_>>(), vec![2]);
    b.shutdown().await.unwrap();
    let (_, ev) = until_set(&mut set, 5 * SEC, "b's loss", |k, _| *k == 2).await;
    assert!(is_lost_with(&ev, LossReason::Released), "{ev:?}");
    assert!(
        tokio::time::timeout(5 * SEC, set.next())
            .await
            .unwrap()
            .is_none(),
        "a set whose every stream ended ends"
    );
    assert!(set.is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_stream_replaced_under_its_key_is_returned_still_campaigning() {
    let server = server().await;
    let a = client_for(&server, "lock-a", "node-a").await;
    let b = client_for(&server, "lock-b", "node-a").await;
    let mut set = LeadershipSet::new();
    set.insert("k", a.leadership());
    let (_, ev) = next_of(&mut set, 5 * SEC, "a elected").await;
    assert!(ev.is_elected());
    let mut old = set.insert("k", b.leadership()).expect("the stream of a");
    // The set now reads b's stream under the key; a's old stream, taken
    // out, goes on renewing a's lock.
    let (key, ev) = until_set(&mut set, 5 * SEC, "b elected", |_, e| e.is_elected()).await;
    assert_eq!(key, "k");
    assert!(b.is_leader(), "{ev:?}");
    let ev = until(&mut old, 5 * SEC, "a renewed", |e| {
        matches!(e, LeadershipEvent::Renewed { .. })
    })
    .await;
    assert!(a.is_leader(), "{ev:?}");
    // Dropped, it stops and releases a's lock.
    drop(old);
    eventually(5 * SEC, "a's lock released", || {
        server.lock(SERVICE, "lock-a").is_none()
    })
    .await;
    assert!(!a.is_leader());
}

#[tokio::test(start_paused = true)]
async fn dropping_the_set_stops_every_campaign_and_releases_every_lock() {
    let server = server().await;
    let root = client_for(&server, "root", "node-a").await;
    let clients: Vec<_> = (0..5)
        .map(|i| root.for_scope(SERVICE, format!("lock-{i}")).unwrap())
        .collect();
    let mut set: LeadershipSet<usize> = clients
        .iter()
        .enumerate()
        .map(|(i, c)| (i, c.leadership()))
        .collect();
    let mut elected = 0;
    while elected < 5 {
        if next_of(&mut set, 5 * SEC, "all elected")
            .await
            .1
            .is_elected()
        {
            elected += 1;
        }
    }
    drop(set);
    eventually(5 * SEC, "every lock released", || {
        (0..5).all(|i| server.lock(SERVICE, &format!("lock-{i}")).is_none())
    })
    .await;
    assert!(clients.iter().all(|c| !c.is_leader()));
}

/// `n` leading streams of one client's scopes in a set, the server then
/// answering every call after `latency`.
async fn leading_set(
    server: &TestServer,
    n: usize,
    latency: Duration,
) -> (Vec<QuorumQuestClient>, LeadershipSet<usize>) {
    let root = client_for(server, "root", "node-a").await;
    let clients: Vec<_> = (0..n)
        .map(|i| root.for_scope(SERVICE, format!("lock-{i}")).unwrap())
        .collect();
    let mut set: LeadershipSet<usize> = clients
        .iter()
        .enumerate()
        .map(|(i, c)| (i, c.leadership()))
        .collect();
    let mut elected = 0;
    while elected < n {
        if next_of(&mut set, 10 * SEC, "all elected")
            .await
            .1
            .is_elected()
        {
            elected += 1;
        }
    }
    server.set_latency(latency);
    (clients, set)
}

// Real time on a multi-thread runtime (a leading stream's drop blocks there
// until its release is answered). One release at a time would take at least
// 24 x 250 ms = 6 s; together they take about one round trip.
const MANY: usize = 24;
const SLOW: Duration = Duration::from_millis(250);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_a_set_releases_its_locks_together_before_the_drop_returns() {
    let server = server().await;
    let (clients, set) = leading_set(&server, MANY, SLOW).await;
    let started = std::time::Instant::now();
    drop(set);
    let took = started.elapsed();
    assert!(
        (0..MANY).all(|i| server.lock(SERVICE, &format!("lock-{i}")).is_none()),
        "every lock is released when the drop returns"
    );
    assert!(clients.iter().all(|c| !c.is_leader()));
    assert!(
        took < 3 * SEC,
        "the releases went out one after the other: the drop took {took:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resigning_a_set_releases_every_lock_together() {
    let server = server().await;
    let (clients, set) = leading_set(&server, MANY, SLOW).await;
    let started = std::time::Instant::now();
    set.resign().await.unwrap();
    let took = started.elapsed();
    assert!(
        (0..MANY).all(|i| server.lock(SERVICE, &format!("lock-{i}")).is_none()),
        "every lock is released when resign returns"
    );
    assert!(clients.iter().all(|c| !c.is_leader()));
    assert!(
        took < 3 * SEC,
        "the releases went out one after the other: resign took {took:?}"
    );
}

/// An executor's waker that panics (a bug of the application's executor).
struct PanicsOnWake;

impl futures::task::ArcWake for PanicsOnWake {
    fn wake_by_ref(_: &std::sync::Arc<Self>) {
        panic!("an executor's bug");
    }
}

/// A leading set with one more leading member, on a server of its own
/// that answers at once, whose term's end panics (a task waiting on its
/// `cancelled()` has a waker that panics). Its release is answered first and
/// the panic is resumed then; the other members' releases, still in flight
/// (their server holds every call for 300 ms), must not be dropped with it:
/// every lock is released when the drop returns.
/// A leading set of 4 on a server that then holds every call for 300 ms,
/// plus one leading member on a server of its own answering at once, whose
/// term's end panics; its server, the others' clients and the end of that
/// term (kept polled: its waker panics when the term ends).
async fn set_with_a_panicking_member() -> (
    std::sync::Arc<TestServer>,
    TestServer,
    Vec<QuorumQuestClient>,
    LeadershipSet<usize>,
    quorum_quest_client::TermEnded,
) {
    let slow = std::sync::Arc::new(server().await);
    let fast = server().await;
    let (clients, mut set) = leading_set(&slow, 4, Duration::ZERO).await;
    let odd = client_for(&fast, "odd", "node-a").await;
    set.insert(100, odd.leadership());
    let term = loop {
        if let (100, LeadershipEvent::Elected { term, .. }) =
            next_of(&mut set, 10 * SEC, "the odd one elected").await
        {
            break term;
        }
    };
    let mut ended = term.cancelled();
    let waker = futures::task::waker(std::sync::Arc::new(PanicsOnWake));
    let polled = std::future::Future::poll(
        std::pin::Pin::new(&mut ended),
        &mut std::task::Context::from_waker(&waker),
    );
    assert!(polled.is_pending());
    // The slow server holds every call (the lock untouched) for 300 ms.
    slow.pause();
    let resumer = slow.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        resumer.resume();
    });
    (slow, fast, clients, set, ended)
}

/// Every lock of [`set_with_a_panicking_member`] released (on both
/// servers) and no client leading, once `what` returned after `took`.
fn all_released(
    slow: &TestServer,
    fast: &TestServer,
    clients: &[QuorumQuestClient],
    what: &str,
    took: Duration,
) {
    let held: Vec<usize> = (0..4)
        .filter(|i| slow.lock(SERVICE, &format!("lock-{i}")).is_some())
        .collect();
    assert!(
        held.is_empty(),
        "locks {held:?} still held when {what} returned (after {took:?})"
    );
    assert!(fast.lock(SERVICE, "odd").is_none());
    assert!(clients.iter().all(|c| !c.is_leader()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_members_panicking_term_end_does_not_leave_the_others_locks_held_after_the_drop() {
    let (slow, fast, clients, set, ended) = set_with_a_panicking_member().await;
    let started = std::time::Instant::now();
    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| drop(set)));
    all_released(&slow, &fast, &clients, "the set's drop", started.elapsed());
    drop(ended);
}

/// The same for `resign()`: the panic reaches the caller, but only once
/// every release is over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_members_panicking_term_end_does_not_leave_the_others_locks_held_after_resign() {
    let (slow, fast, clients, set, ended) = set_with_a_panicking_member().await;
    let started = std::time::Instant::now();
    let resigned =
        futures::FutureExt::catch_unwind(std::panic::AssertUnwindSafe(set.resign())).await;
    let took = started.elapsed();
    assert!(resigned.is_err(), "the hand-out's panic is not hidden");
    all_released(&slow, &fast, &clients, "resign()", took);
    drop(ended);
}

/// A leading set with one more member, a follower whose attempt to
/// acquire hangs on a server of its own. Dropped alone, that follower's
/// stream releases in the background (it holds no lock); in the set, its
/// shutdown must not hold up the drop, which waits for the leader's release
/// (answered at once) only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_follower_does_not_hold_up_a_leading_sets_drop() {
    let fast = server().await;
    let hung = server().await;
    let (_clients, mut set) = leading_set(&fast, 1, Duration::ZERO).await;
    hung.pause();
    let follower = client_for(&hung, "hung", "node-b").await;
    set.insert(100, follower.leadership());
    // The follower's campaign starts (its first attempt hangs).
    let _ = tokio::time::timeout(Duration::from_millis(300), set.next()).await;
    assert!(!follower.is_leader());
    let started = std::time::Instant::now();
    drop(set);
    let took = started.elapsed();
    assert!(
        fast.lock(SERVICE, "lock-0").is_none(),
        "released when the drop returned"
    );
    assert!(
        took < Duration::from_millis(500),
        "the drop waited {took:?} for a follower holding no lock"
    );
    hung.resume();
}

/// Counts the wake-ups of a reader's task.
#[derive(Default)]
struct WakeCount(std::sync::atomic::AtomicUsize);

impl std::task::Wake for WakeCount {
    fn wake(self: std::sync::Arc<Self>) {
        self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }
}

/// A process holding many locks that only needs to know when it gains or
/// loses one leaves renewals out: its reader is not woken by the renewals
/// of its locks (they go on all the same), and still gets every `Elected`
/// and `Lost`, woken for each.
#[tokio::test(start_paused = true)]
async fn a_set_without_renewals_wakes_its_reader_for_transitions_only() {
    use std::task::{Context, Waker};

    let server = server().await;
    let root = client_for(&server, "root", "node-a").await;
    let clients: Vec<QuorumQuestClient> = (0..5)
        .map(|i| root.for_scope(SERVICE, format!("shard-{i}")).unwrap())
        .collect();
    let mut quiet: LeadershipSet<usize> = clients
        .iter()
        .enumerate()
        .map(|(i, c)| (i, c.leadership().without_renewals()))
        .collect();
    // The same locks with renewals: the witness that they do renew.
    let mut watch: LeadershipSet<usize> = clients
        .iter()
        .enumerate()
        .map(|(i, c)| (i, c.leadership()))
        .collect();
    let mut elected = std::collections::HashSet::new();
    while elected.len() < 5 {
        let (shard, ev) = next_of(&mut quiet, 5 * SEC, "every shard elected").await;
        assert!(matches!(ev, LeadershipEvent::Elected { .. }), "{ev:?}");
        assert!(elected.insert(shard), "shard {shard} elected twice");
    }
    let wakes = std::sync::Arc::new(WakeCount::default());
    let waker = Waker::from(wakes.clone());
    let mut cx = Context::from_waker(&waker);
    assert!(quiet.poll_next_unpin(&mut cx).is_pending());
    let mut renewed: HashMap<usize, usize> = HashMap::new();
    while renewed.len() < 5 || renewed.values().any(|n| *n < 3) {
        let (shard, ev) = next_of(&mut watch, 5 * SEC, "three renewals of every shard").await;
        match ev {
            LeadershipEvent::Renewed { .. } => *renewed.entry(shard).or_default() += 1,
            LeadershipEvent::Elected { .. } => {}
            other => panic!("shard {shard}: {other:?} while renewing"),
        }
    }
    assert_eq!(
        wakes.0.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "the reader was woken for renewals it left out"
    );
    assert!(quiet.poll_next_unpin(&mut cx).is_pending());
    // Shard 3's lock is taken over: its loss reaches both readers, and
    // wakes the quiet one.
    server.set_owner(SERVICE, "shard-3", "node-b", 30 * SEC);
    loop {
        let (shard, ev) = next_of(&mut watch, 5 * SEC, "the loss of shard 3").await;
        if matches!(ev, LeadershipEvent::Lost { .. }) {
            assert_eq!(shard, 3);
            break;
        }
    }
    assert!(wakes.0.load(std::sync::atomic::Ordering::SeqCst) >= 1);
    match quiet.poll_next_unpin(&mut cx) {
        std::task::Poll::Ready(Some((3, LeadershipEvent::Lost { .. }))) => {}
        other => panic!("expected shard 3's loss, got {other:?}"),
    }
    assert!(quiet.poll_next_unpin(&mut cx).is_pending());
}
