//! Attacks on `LeadershipSet` (`src/election/set.rs`) across runtimes: a
//! set read on one runtime and then another, a campaign whose runtime goes
//! idle or shuts down under a set. Each test reproduces a path that broke
//! a guarantee (README "Guarantees") before it was fixed.
#![cfg(feature = "testing")]

mod common;

use common::*;
use futures::StreamExt;
use quorum_quest_client::{LeadershipEvent, LeadershipSet, LossReason, QuorumQuestClient, RpcKind};

/// The set's events (keys dropped), as a stream the common helpers read.
fn events(
    set: &mut LeadershipSet<u32>,
) -> impl futures::Stream<Item = LeadershipEvent> + Unpin + '_ {
    set.map(|(_, ev)| ev)
}

/// Two clients of lock `SERVICE/DOMAIN` on servers `a` and `b` (their RPC
/// timeouts given), both leading, in one set (keys 1 and 2).
async fn two_leading(
    a: &quorum_quest_client::testing::TestServer,
    b: &quorum_quest_client::testing::TestServer,
    (timeout_one, timeout_two): (std::time::Duration, std::time::Duration),
) -> (QuorumQuestClient, QuorumQuestClient, LeadershipSet<u32>) {
    let one = over_tcp(&a.url(), 30)
        .rpc_timeout(timeout_one)
        .build()
        .await
        .unwrap();
    let two = over_tcp(&b.url(), 30)
        .rpc_timeout(timeout_two)
        .build()
        .await
        .unwrap();
    let mut set: LeadershipSet<u32> = [(1, one.leadership()), (2, two.leadership())]
        .into_iter()
        .collect();
    let mut elected = 0;
    while elected < 2 {
        if next(&mut events(&mut set), 10 * SEC, "both elected")
            .await
            .is_elected()
        {
            elected += 1;
        }
    }
    (one, two, set)
}

/// A set first read on a current-thread runtime (its campaign starts on
/// that runtime's driver), which is then left idle (not dropped: a sync
/// wrapper's runtime between two `block_on`s), then read on a healthy
/// runtime. A stream read there directly arms its own backstop and reports
/// the loss at the deadline; the set polls only the members that woke, and
/// nothing wakes them on the new runtime: the term ran out with the set
/// silent (no `Lost`, a consumer keeping leader work running past the
/// deadline while another contender may lead).
#[test]
fn a_set_read_on_a_healthy_runtime_gets_the_loss_while_its_first_runtime_is_idle() {
    let home = home_runtime();
    let server = home.block_on(server());
    let client = home.block_on(over_tcp(&server.url(), 3).build()).unwrap();
    let mut set = LeadershipSet::new();
    set.insert(1u32, client.leadership());
    let idle = current_thread();
    idle.block_on(async {
        until_elected(&mut events(&mut set), 10 * SEC, "Elected").await;
        // Read on until the set waits: no member is left queued from the
        // last event (a queued one would be polled on the next runtime).
        while tokio::time::timeout(ms(100), set.next()).await.is_ok() {}
    });
    // `idle` is kept, but nothing runs it any more: no renewal goes out.
    home.block_on(async {
        let lost = until(
            &mut events(&mut set),
            10 * SEC,
            "Lost",
            LeadershipEvent::is_lost,
        )
        .await;
        assert!(is_lost_with(&lost, LossReason::Expired), "{lost:?}");
        assert!(!client.is_leader());
    });
    drop(set);
    drop(idle);
    home.block_on(server.shutdown());
}

/// A set first read on a current-thread runtime that then shuts down (its
/// driver dies with it), then read on another: the campaign goes on there
/// (the term renewed, or lost and won again), never silent.
#[test]
fn a_set_whose_campaigns_runtime_shut_down_campaigns_on_on_the_next() {
    let home = home_runtime();
    let server = home.block_on(server());
    let client = home.block_on(over_tcp(&server.url(), 3).build()).unwrap();
    let mut set = LeadershipSet::new();
    set.insert(1u32, client.leadership());
    let first = current_thread();
    first.block_on(async {
        until_elected(&mut events(&mut set), 10 * SEC, "Elected").await;
        while tokio::time::timeout(ms(100), set.next()).await.is_ok() {}
    });
    drop(first);
    home.block_on(async {
        // Past the deadline of the term won on `first` (TTL 3 s).
        let mut leading = true;
        let end = tokio::time::Instant::now() + 6 * SEC;
        while let Ok(item) = tokio::time::timeout_at(end, set.next()).await {
            match item.expect("the set ended").1 {
                LeadershipEvent::Elected { .. } => leading = true,
                LeadershipEvent::Lost { .. } => leading = false,
                _ => {}
            }
            assert_eq!(leading, client.is_leader() || !leading);
        }
        assert!(leading && client.is_leader(), "not leading again");
        assert!(client.health().campaign_running);
    });
    drop(set);
    home.block_on(server.shutdown());
}

/// A follower's campaign (the keep-alive's) runs on a current-thread
/// runtime that shuts down while an attempt is in flight (no step-down
/// timer kept, none handed over), while `wait` (made before, run on a
/// healthy runtime) reads leadership until `Elected`. The reader still
/// wants the campaign: it must campaign on, and win the lock once it is
/// free. What `wait` returns is dropped after the check.
fn a_waiting_follower_campaigns_on_when_the_campaigns_runtime_dies_mid_attempt<T, F>(
    wait: impl FnOnce(&QuorumQuestClient) -> F,
) where
    F: std::future::Future<Output = T> + Send + 'static,
    T: Send + 'static,
{
    let home = home_runtime();
    let server = home.block_on(server());
    let client = home.block_on(over_tcp(&server.url(), 3).build()).unwrap();
    server.set_owner(SERVICE, DOMAIN, "someone-else", 2 * SEC);
    server.set_refusal_delay(20 * SEC);
    let first = current_thread();
    first.block_on(async {
        client.start_keep_alive().await.unwrap();
        eventually(10 * SEC, "the first attempt in flight", || {
            server.calls(RpcKind::TryAcquireLock) > 0
        })
        .await;
    });
    let waiting = home.spawn(wait(&client));
    // Let the spawned task poll (and wait) first.
    std::thread::sleep(ms(300));
    drop(first);
    server.set_refusal_delay(std::time::Duration::ZERO);
    home.block_on(async {
        let held = waiting.await.unwrap();
        assert!(client.is_leader());
        drop(held);
    });
    home.block_on(server.shutdown());
}

/// ... read through a set.
#[test]
fn a_waiting_followers_set_campaigns_on_when_the_campaigns_runtime_dies_mid_attempt() {
    a_waiting_follower_campaigns_on_when_the_campaigns_runtime_dies_mid_attempt(|client| {
        let mut set = LeadershipSet::new();
        set.insert(1u32, client.leadership());
        async move {
            until_elected(&mut events(&mut set), 30 * SEC, "Elected").await;
            set
        }
    });
}

/// The same with a plain stream instead of a set (is it the set's?).
#[test]
fn a_waiting_followers_stream_campaigns_on_when_the_campaigns_runtime_dies_mid_attempt() {
    a_waiting_follower_campaigns_on_when_the_campaigns_runtime_dies_mid_attempt(|client| {
        let mut stream = client.leadership();
        async move {
            until_elected(&mut stream, 30 * SEC, "Elected").await;
            stream
        }
    });
}

/// A stream elected on a runtime that then shut down, put into a set on
/// another: the campaign goes on there (it never goes silent).
#[test]
fn a_stream_moved_into_a_set_from_a_runtime_that_shut_down_campaigns_on() {
    let home = home_runtime();
    let server = home.block_on(server());
    let client = home.block_on(over_tcp(&server.url(), 3).build()).unwrap();
    let mut stream = client.leadership();
    let first = current_thread();
    first.block_on(async {
        until_elected(&mut stream, 10 * SEC, "Elected").await;
    });
    drop(first);
    let mut set = LeadershipSet::new();
    set.insert(7u32, stream);
    home.block_on(async {
        let mut leading = true;
        let end = tokio::time::Instant::now() + 6 * SEC;
        while let Ok(item) = tokio::time::timeout_at(end, set.next()).await {
            let (key, ev) = item.expect("the set ended");
            assert_eq!(key, 7);
            match ev {
                LeadershipEvent::Elected { .. } => {
                    assert!(!leading, "Elected twice");
                    leading = true;
                }
                LeadershipEvent::Lost { .. } => {
                    assert!(leading, "Lost twice");
                    leading = false;
                }
                _ => {}
            }
        }
        assert!(leading && client.is_leader(), "not leading again");
        assert!(client.health().campaign_running);
    });
    drop(set);
    home.block_on(server.shutdown());
}

// ----- the stub pool (`Transport::stub` / `give_back`) -----

/// Every call of `n` made at once.
async fn acquire_at_once(client: &QuorumQuestClient, n: usize) -> Vec<bool> {
    let calls = (0..n).map(|_| client.try_acquire_lock());
    futures::future::join_all(calls)
        .await
        .into_iter()
        .map(|r| r.is_ok())
        .collect()
}

/// Stubs kept from calls on a connection that then goes silently dead (held
/// by the proxy, new connections pass): once a call timed out and the
/// client redialed, no later call goes out on the dead connection (one that
/// did would never be answered, and fail at its timeout), alone or many at
/// once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kept_stubs_of_a_silently_dead_connection_are_not_reused_after_the_redial() {
    use quorum_quest_client::testing::FaultProxy;
    let server = server().await;
    let proxy = FaultProxy::start(server.addr()).await.unwrap();
    // A user's endpoint: no HTTP/2 keep-alive of ours, so nothing but the
    // redial replaces the dead connection.
    let endpoint = tonic::transport::Endpoint::from_shared(proxy.url()).unwrap();
    let client = QuorumQuestClient::builder(SERVICE, DOMAIN)
        .endpoint(endpoint)
        .ttl(30 * SEC)
        .rpc_timeout(2 * SEC)
        .max_concurrent_calls(4)
        .build()
        .await
        .unwrap();
    // Stubs of the first connection kept (up to the cap).
    assert!(acquire_at_once(&client, 8).await.iter().all(|ok| *ok));
    let accepted = proxy.connections_accepted();
    // Past the shortest spacing of redials (one call timeout).
    tokio::time::sleep(ms(2100)).await;
    proxy.hold_live();
    // One call times out on the dead connection, and redials.
    let first = client.try_acquire_lock().await;
    assert!(
        first.is_err(),
        "answered through a held connection: {first:?}"
    );
    // (A call timeout of 2 s, not 1: a loaded 2-core machine can take
    // over a second to answer a call of a debug build, and a slow answer
    // is not what this looks for.)
    for round in 0..5 {
        let oks = acquire_at_once(&client, 8).await;
        assert!(
            oks.iter().all(|ok| *ok),
            "round {round}: a call failed (timed out on the dead connection?) after the redial: {oks:?}"
        );
    }
    assert!(proxy.connections_accepted() > accepted);
    proxy.deliver_held();
    proxy.shutdown().await;
    server.shutdown().await;
}

/// The same across GOAWAY: the server's connection goes away with stubs
/// kept; every later call is answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kept_stubs_go_on_working_after_goaway() {
    use quorum_quest_client::testing::GoawayRelay;
    let server = server().await;
    let relay = GoawayRelay::start(server.addr()).await.unwrap();
    let client = over_tcp(&relay.url(), 30)
        .rpc_timeout(2 * SEC)
        .max_concurrent_calls(4)
        .build()
        .await
        .unwrap();
    assert!(acquire_at_once(&client, 8).await.iter().all(|ok| *ok));
    for round in 0..3 {
        relay.goaway();
        eventually(5 * SEC, "the GOAWAY sent", || relay.goaways_sent() > round).await;
        tokio::time::sleep(ms(1200)).await;
        let oks = acquire_at_once(&client, 8).await;
        assert!(oks.iter().all(|ok| *ok), "round {round}: {oks:?}");
    }
    relay.shutdown().await;
    server.shutdown().await;
}

/// The same with more followers than may have attempts in flight at once
/// (twice the call cap): some wait for their turn in the dead driver's
/// queue, with neither a call nor a timer. Every one campaigns on.
#[test]
fn followers_queued_for_their_turn_campaign_on_when_the_campaigns_runtime_dies() {
    let home = home_runtime();
    let server = home.block_on(server());
    let root = home
        .block_on(over_tcp(&server.url(), 3).max_concurrent_calls(1).build())
        .unwrap();
    let clients: Vec<_> = (0..5)
        .map(|i| root.for_scope(SERVICE, format!("q-{i}")).unwrap())
        .collect();
    for i in 0..5 {
        server.set_owner(SERVICE, &format!("q-{i}"), "someone-else", 2 * SEC);
    }
    server.set_refusal_delay(20 * SEC);
    let first = current_thread();
    first.block_on(async {
        for c in &clients {
            c.start_keep_alive().await.unwrap();
        }
        eventually(10 * SEC, "two attempts in flight", || {
            server.calls(RpcKind::TryAcquireLock) >= 2
        })
        .await;
        // The others wait for their turn.
        tokio::time::sleep(ms(200)).await;
    });
    assert!(server.calls(RpcKind::TryAcquireLock) < 5, "none queued");
    let mut set: LeadershipSet<u32> = clients
        .iter()
        .enumerate()
        .map(|(i, c)| (i as u32, c.leadership()))
        .collect();
    let waiting = home.spawn(async move {
        let mut elected = std::collections::HashSet::new();
        let mut seen = Vec::new();
        let end = tokio::time::Instant::now() + 30 * SEC;
        while elected.len() < 5 {
            let item = tokio::time::timeout_at(end, set.next()).await;
            let Ok(Some((key, ev))) = item else {
                panic!("stuck with {elected:?} elected; events: {seen:?}");
            };
            seen.push((
                key,
                format!("{ev:?}")
                    .chars()
                    .take(if seen.is_empty() { 400 } else { 30 })
                    .collect::<String>(),
            ));
            if ev.is_elected() {
                elected.insert(key);
            }
        }
        set
    });
    std::thread::sleep(ms(300));
    drop(first);
    server.set_refusal_delay(std::time::Duration::ZERO);
    home.block_on(async {
        let set = waiting.await.unwrap();
        assert!(clients.iter().all(|c| c.is_leader()));
        drop(set);
    });
    home.block_on(server.shutdown());
}

/// A call times out on a runtime that then shuts down (a sync wrapper's
/// `block_on`), and the client redials there: the fresh connection's
/// worker task is spawned on that runtime and dies with it. Every later
/// call, on any runtime, failed at once ("Service was not ready") and
/// never redialed again: the client was cut off from the server for good.
#[test]
fn a_redial_made_on_a_runtime_that_then_shut_down_does_not_cut_the_client_off() {
    use quorum_quest_client::testing::FaultProxy;
    let home = home_runtime();
    let server = home.block_on(server());
    let proxy = home.block_on(FaultProxy::start(server.addr())).unwrap();
    let client = home
        .block_on(over_tcp(&proxy.url(), 30).rpc_timeout(SEC).build())
        .unwrap();
    assert!(home.block_on(client.try_acquire_lock()).unwrap());
    let first = current_thread();
    first.block_on(async {
        // Past the shortest spacing of redials (one call timeout).
        tokio::time::sleep(ms(1100)).await;
        proxy.hold_live();
        let timed_out = client.try_acquire_lock().await;
        assert!(timed_out.is_err(), "{timed_out:?}");
    });
    drop(first);
    home.block_on(async {
        let end = tokio::time::Instant::now() + 10 * SEC;
        let mut last = None;
        while tokio::time::Instant::now() < end {
            match client.try_acquire_lock().await {
                Ok(true) => return,
                other => last = Some(other),
            }
            tokio::time::sleep(ms(100)).await;
        }
        panic!("cut off from the server: {last:?}");
    });
    home.block_on(async {
        proxy.deliver_held();
        proxy.shutdown().await;
        server.shutdown().await;
    });
}

/// The same for the first connection: a client built on a runtime that then
/// shut down (a connection dialed lazily there) reaches the server from
/// another.
#[test]
fn a_client_built_on_a_runtime_that_then_shut_down_still_reaches_the_server() {
    let home = home_runtime();
    let server = home.block_on(server());
    let built = current_thread();
    let client = built
        .block_on(over_tcp(&server.url(), 30).rpc_timeout(SEC).build())
        .unwrap();
    drop(built);
    home.block_on(async {
        let acquired = tokio::time::timeout(10 * SEC, client.try_acquire_lock()).await;
        assert!(
            matches!(acquired, Ok(Ok(true))),
            "cut off from the server: {acquired:?}"
        );
    });
    home.block_on(server.shutdown());
}

/// A set read on two current-thread runtimes in turn (half a second each,
/// its campaign's runtime idle while the other reads): per key, `Elected`
/// and `Lost` alternate, starting with `Elected`, and the set ends the run
/// agreeing with the client.
#[test]
fn a_set_read_on_two_runtimes_in_turn_keeps_each_keys_events_alternating() {
    let home = home_runtime();
    let server = home.block_on(server());
    let root = home.block_on(over_tcp(&server.url(), 3).build()).unwrap();
    let clients: Vec<_> = (0..3)
        .map(|i| root.for_scope(SERVICE, format!("turn-{i}")).unwrap())
        .collect();
    let mut set: LeadershipSet<u32> = clients
        .iter()
        .enumerate()
        .map(|(i, c)| (i as u32, c.leadership()))
        .collect();
    let (a, b) = (current_thread(), current_thread());
    let mut leading = [false; 3];
    for turn in 0..16 {
        let rt = if turn % 2 == 0 { &a } else { &b };
        rt.block_on(async {
            let end = tokio::time::Instant::now() + ms(500);
            while let Ok(item) = tokio::time::timeout_at(end, set.next()).await {
                let (key, ev) = item.expect("the set ended");
                let was = &mut leading[key as usize];
                match ev {
                    LeadershipEvent::Elected { .. } => {
                        assert!(!*was, "key {key}: Elected twice");
                        *was = true;
                    }
                    LeadershipEvent::Lost { .. } => {
                        assert!(*was, "key {key}: Lost without Elected");
                        *was = false;
                    }
                    _ => {}
                }
            }
        });
    }
    for (i, c) in clients.iter().enumerate() {
        // A term the set reports as running is one the client holds.
        if leading[i] {
            assert!(
                c.is_leader(),
                "key {i}: the set says leading, the client not"
            );
        }
    }
    assert!(leading.iter().any(|l| *l), "nothing elected at all");
    drop(set);
    drop((a, b));
    home.block_on(server.shutdown());
}

/// A server (or a gRPC proxy built on tonic whose own upstream channel is
/// down) that answers `Unknown: Service was not ready: ...` is reachable:
/// the connection to it is fine. Each such answer redialed at once (taken
/// for our own channel closed for good), whatever the spacing of redials:
/// a fresh TCP connection per failed attempt, for as long as the proxy
/// answers so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_answering_service_was_not_ready_is_not_redialed_per_call() {
    let server = server().await;
    let client = over_tcp(&server.url(), 30)
        .rpc_timeout(SEC)
        .build()
        .await
        .unwrap();
    assert!(client.try_acquire_lock().await.unwrap());
    let before = server.connections_accepted();
    server.fail_next(
        6,
        None,
        tonic::Status::unknown("Service was not ready: transport error"),
    );
    let mut calls = 0;
    while !matches!(client.try_acquire_lock().await, Ok(true)) {
        calls += 1;
        assert!(calls < 10, "the injected failures never ran out");
    }
    let dialed = server.connections_accepted() - before;
    assert!(
        dialed == 0,
        "{dialed} fresh connections to a server that answered every call"
    );
    client.shutdown().await.unwrap();
    server.shutdown().await;
}

/// A task holding a leading set (streams of clients on two connections,
/// with different RPC timeouts) is dropped while its multi-thread runtime
/// shuts down: nothing drives the connections any more, so the set's drop
/// must neither wait for its releases nor panic.
#[test]
fn a_leading_set_dropped_at_runtime_shutdown_neither_waits_nor_panics() {
    let home = home_runtime();
    let a = home.block_on(server());
    let b = home.block_on(server());
    let client_rt = multi_thread(2);
    client_rt.block_on(async {
        let (one, two, set) = two_leading(&a, &b, (SEC, 5 * SEC)).await;
        tokio::spawn(async move {
            let _held = (set, one, two);
            std::future::pending::<()>().await;
        });
    });
    let start = std::time::Instant::now();
    drop(client_rt);
    assert!(
        start.elapsed() < 3 * SEC,
        "the runtime took {:?} to shut down",
        start.elapsed()
    );
    home.block_on(async {
        a.shutdown().await;
        b.shutdown().await;
    });
}

/// A task holding a leading set panics: the set is dropped while the task
/// unwinds, on a multi-thread runtime, and releases every lock before the
/// task's panic is reported (the drop blocks as it does otherwise).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leading_set_dropped_while_its_task_unwinds_releases_before_the_panic_is_reported() {
    let a = server().await;
    let b = server().await;
    let (one, two, set) = two_leading(&a, &b, (SEC, SEC)).await;
    a.set_latency(ms(200));
    b.set_latency(ms(200));
    let task = tokio::spawn(async move {
        // Dropped by the unwinding itself, on a worker thread.
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
            let _held = set;
            assert!(!std::thread::panicking());
            panic!("the application's bug");
        }))
    });
    assert!(task.await.unwrap().is_err());
    assert!(
        a.lock(SERVICE, DOMAIN).is_none(),
        "released before the panic is reported"
    );
    assert!(
        b.lock(SERVICE, DOMAIN).is_none(),
        "released before the panic is reported"
    );
    assert!(!one.is_leader() && !two.is_leader());
}

/// An executor's waker that panics (a bug of the application's executor).
struct PanicsOnWake;

impl futures::task::ArcWake for PanicsOnWake {
    fn wake_by_ref(_: &std::sync::Arc<Self>) {
        panic!("an executor's bug");
    }
}

/// A leading set dropped outside any runtime, where the end of each
/// member's term panics (tasks awaiting `cancelled()` with wakers that
/// panic): every member steps down (the first panic reaches the drop after
/// all did), and each client can lead again (no release left in flight).
#[test]
fn a_leading_set_dropped_outside_a_runtime_with_panicking_term_ends_steps_every_member_down() {
    let rt = home_runtime();
    let server = rt.block_on(server());
    let clients: Vec<_> = (0..3)
        .map(|i| {
            rt.block_on(
                over_tcp(&server.url(), 30)
                    .client_id(format!("node-{i}"))
                    .build(),
            )
            .unwrap()
            .for_scope(SERVICE, format!("lock-{i}"))
            .unwrap()
        })
        .collect();
    let mut set: LeadershipSet<u32> = clients
        .iter()
        .enumerate()
        .map(|(i, c)| (i as u32, c.leadership()))
        .collect();
    let terms: Vec<_> = rt.block_on(async {
        let mut terms = Vec::new();
        while terms.len() < 3 {
            if let LeadershipEvent::Elected { term, .. } =
                next(&mut events(&mut set), 10 * SEC, "all elected").await
            {
                terms.push(term);
            }
        }
        terms
    });
    let mut ends: Vec<_> = terms.iter().map(|t| t.cancelled()).collect();
    {
        let _in_runtime = rt.enter();
        let waker = futures::task::waker(std::sync::Arc::new(PanicsOnWake));
        for end in &mut ends {
            let polled = std::future::Future::poll(
                std::pin::Pin::new(end),
                &mut std::task::Context::from_waker(&waker),
            );
            assert!(polled.is_pending());
        }
    }
    let dropped = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| drop(set)));
    assert!(dropped.is_err(), "the wake-up's panic is not hidden");
    for (c, t) in clients.iter().zip(&terms) {
        assert!(!c.is_leader());
        assert!(t.is_ended());
        let again = rt.block_on(c.try_acquire_lock());
        assert_eq!(again.ok(), Some(true), "a grant no longer counts");
    }
    drop(ends);
    rt.block_on(async {
        for c in &clients {
            let _ = c.shutdown().await;
        }
        server.shutdown().await;
    });
}

/// A leading set one of whose members' client was shut down (its stream
/// still in the set, its `Lost` unread): the drop releases the other's lock
/// before it returns, and does not wait on the shut-down one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leading_sets_drop_with_a_member_whose_client_was_shut_down_releases_the_others() {
    let a = server().await;
    let b = server().await;
    let (one, two, set) = two_leading(&a, &b, (SEC, SEC)).await;
    one.shutdown().await.unwrap();
    // The shut-down one's server would now hold any call.
    a.pause();
    b.set_latency(ms(200));
    let started = std::time::Instant::now();
    drop(set);
    let took = started.elapsed();
    assert!(
        b.lock(SERVICE, DOMAIN).is_none(),
        "released when the drop returned"
    );
    assert!(!two.is_leader());
    assert!(took < 2 * SEC, "the drop took {took:?}");
    a.resume();
}

/// On a current-thread runtime a leading set's drop cannot block (it would
/// stall the connection its releases need): it returns at once, and the
/// releases complete in the background.
#[tokio::test]
async fn a_leading_set_dropped_on_a_current_thread_runtime_releases_in_the_background() {
    let a = server().await;
    let b = server().await;
    let (one, two, set) = two_leading(&a, &b, (SEC, SEC)).await;
    let started = std::time::Instant::now();
    drop(set);
    assert!(started.elapsed() < SEC, "{:?}", started.elapsed());
    eventually(5 * SEC, "both released in the background", || {
        a.lock(SERVICE, DOMAIN).is_none() && b.lock(SERVICE, DOMAIN).is_none()
    })
    .await;
    assert!(!one.is_leader() && !two.is_leader());
}

/// A leading set built and read on a current-thread runtime that is then
/// left idle (a sync wrapper's, between two `block_on`s), dropped on a
/// multi-thread runtime: its connection's worker lives on the idle runtime.
#[test]
#[ignore = "finding, not fixed: the release waits on a connection whose worker is on an idle runtime"]
fn a_leading_set_dropped_on_another_runtime_while_its_connections_runtime_is_idle_releases() {
    let home = home_runtime();
    let server = home.block_on(server());
    let first = current_thread();
    let (client, set) = first.block_on(async {
        let client = over_tcp(&server.url(), 30)
            .rpc_timeout(SEC)
            .build()
            .await
            .unwrap();
        let mut set: LeadershipSet<u32> = [(1, client.leadership())].into_iter().collect();
        let ev = next(&mut events(&mut set), 10 * SEC, "elected").await;
        assert!(ev.is_elected());
        (client, set)
    });
    let other = multi_thread(2);
    let took = other.block_on(async move {
        let started = std::time::Instant::now();
        drop(set);
        started.elapsed()
    });
    assert!(
        server.lock(SERVICE, DOMAIN).is_none(),
        "the lock is still held when the drop returned after {took:?}"
    );
    drop(client);
    drop(first);
    home.block_on(server.shutdown());
}
