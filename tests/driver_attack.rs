//! Attacks on the per-connection campaign driver (`src/election/driver.rs`):
//! stop/start races, runtimes created and dropped around a shared client,
//! pokes that must not be lost. Each test reproduces a path that broke a
//! guarantee (README "Guarantees") before it was fixed.

mod common;

use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use common::*;
use quorum_quest_client::{Callbacks, LeadershipEvent, LossReason};

/// Records the callbacks in order.
#[derive(Default)]
struct Log(Mutex<Vec<&'static str>>);

impl Log {
    fn get(&self) -> Vec<&'static str> {
        self.0.lock().unwrap().clone()
    }
}

#[async_trait]
impl Callbacks for Log {
    async fn on_leader_elected(&self, is_leader: bool) {
        self.0
            .lock()
            .unwrap()
            .push(if is_leader { "elected" } else { "follower" });
    }
    async fn on_leader_lost(&self) {
        self.0.lock().unwrap().push("lost");
    }
}

/// A long-lived runtime, a server on it, and a client (ttl 3 s) built there
/// with its callbacks recorded.
fn with_callbacks() -> (
    tokio::runtime::Runtime,
    quorum_quest_client::testing::TestServer,
    Arc<Log>,
    quorum_quest_client::QuorumQuestClient,
) {
    let home = home_runtime();
    let server = home.block_on(server());
    let log = Arc::new(Log::default());
    let client = home
        .block_on(over_tcp(&server.url(), 3).callbacks(log.clone()).build())
        .unwrap();
    (home, server, log, client)
}

/// Waits until the term ends at its deadline and `on_leader_lost` follows.
async fn loss_reported(client: &quorum_quest_client::QuorumQuestClient, log: &Log) {
    eventually(10 * SEC, "the term ends at its deadline", || {
        !client.is_leader()
    })
    .await;
    eventually(5 * SEC, "on_leader_lost after the deadline", || {
        log.get().last() == Some(&"lost")
    })
    .await;
}

/// A stream dropped on a current-thread runtime stops its campaign from a
/// spawned task; a stream created right after starts the campaign at once.
/// The late stop must not stop the new stream's campaign: the new stream
/// must keep campaigning (and so be elected again after the dropped
/// stream's release).
#[tokio::test(start_paused = true)]
async fn a_stream_recreated_right_after_a_drop_keeps_campaigning() {
    let server = server().await;
    let client = in_memory(&server, 3).build().await.unwrap();
    let mut first = client.leadership();
    until_elected(&mut first, 10 * SEC, "Elected").await;
    // Dropped while leading on a current-thread runtime: its stop and
    // release run in a spawned task, after this task yields.
    drop(first);
    let mut second = client.leadership();
    // The snapshot of the running term, then its end by the late release.
    until_elected(&mut second, 10 * SEC, "Elected").await;
    let lost = until(&mut second, 10 * SEC, "Lost", LeadershipEvent::is_lost).await;
    assert!(is_lost_with(&lost, LossReason::Released), "{lost:?}");
    // The second stream still campaigns: it wins the free lock again.
    until_elected(
        &mut second,
        30 * SEC,
        "Elected after the release (the campaign must still run)",
    )
    .await;
    assert!(client.health().campaign_running);
}

/// `#[tokio::test]`-style runtimes created and dropped in sequence around a
/// client built (with callbacks) on a long-lived runtime: a runtime that
/// dies with a poke still in its driver's queue must not leave the client
/// unable to poke the next driver, or the loss at the deadline is never
/// reported to the callbacks.
#[test]
fn runtimes_in_sequence_around_one_client_still_report_the_loss() {
    let (home, server, log, client) = with_callbacks();
    let fresh = current_thread;
    // First "test": acquires (its driver starts here, and dies with it).
    let first = fresh();
    assert!(first.block_on(client.try_acquire_lock()).unwrap());
    drop(first);
    // Second "test": renews imperatively, then waits for the loss at the
    // deadline (nothing renews any more).
    let second = fresh();
    second.block_on(async {
        assert!(client.try_acquire_lock().await.unwrap());
        loss_reported(&client, &log).await;
    });
    assert_eq!(log.get(), ["elected", "lost"]);
    drop(second);
    home.block_on(server.shutdown());
}

/// A stream that campaigned on a runtime that then shut down (its driver
/// died with it), polled on another runtime: its term must still end with
/// `Lost` (rule 2), and the stream must go on campaigning there.
#[test]
fn a_stream_whose_driver_died_with_its_runtime_still_reports_the_loss() {
    let home = home_runtime();
    let server = home.block_on(server());
    let client = home.block_on(over_tcp(&server.url(), 3).build()).unwrap();
    let fresh = current_thread;
    let mut stream = client.leadership();
    let first = fresh();
    first.block_on(async {
        until_elected(&mut stream, 10 * SEC, "Elected").await;
    });
    drop(first);
    // Nothing renews meanwhile: the lease (3 s from its send) runs out.
    std::thread::sleep(3 * SEC + ms(500));
    assert!(!client.is_leader());
    let second = fresh();
    second.block_on(async {
        let lost = until(&mut stream, 10 * SEC, "Lost", LeadershipEvent::is_lost).await;
        assert!(is_lost_with(&lost, LossReason::Expired), "{lost:?}");
        // Campaigning again: the lock expired on the server, so it wins.
        until_elected(&mut stream, 10 * SEC, "Elected again").await;
        assert!(client.health().campaign_running);
    });
    drop(stream);
    drop(second);
    home.block_on(server.shutdown());
}

/// A TTL is valid up to `i32::MAX` seconds, but the driver's timer queue
/// takes instants at most about 2.2 years ahead (it panics beyond). A leader
/// on a 3-year lease must lead steadily, not lose its term to a caught
/// panic (`Lost { Failed }`) and flap every second.
#[tokio::test(start_paused = true)]
async fn a_lease_longer_than_the_timer_queue_reaches_is_held_steadily() {
    let server = server().await;
    let three_years = 3 * 365 * 24 * 3600;
    let client = in_memory(&server, three_years).build().await.unwrap();
    let mut stream = client.leadership();
    until_elected(&mut stream, 10 * SEC, "Elected").await;
    // 800 days: past the timer horizon (365 days), renewing about yearly.
    let quiet = tokio::time::timeout(800 * 24 * 3600 * SEC, async {
        loop {
            let ev = next(&mut stream, 1000 * 24 * 3600 * SEC, "any event").await;
            if !matches!(ev, LeadershipEvent::Renewed { .. }) {
                return ev;
            }
        }
    })
    .await;
    assert!(quiet.is_err(), "the term ended: {quiet:?}");
    assert!(client.is_leader());
}

/// A keep-alive started as a follower with a long retry period (valid: it
/// is not bounded by the TTL) sleeps in its follower wait. An imperative
/// `try_acquire_lock()` then makes the client leader: the keep-alive must
/// renew that lease, not sleep through its deadline.
#[tokio::test(start_paused = true)]
async fn a_keep_alive_waiting_as_follower_renews_a_lease_won_imperatively() {
    let server = server().await;
    server.set_owner(SERVICE, DOMAIN, "someone-else", 2 * SEC);
    let client = in_memory(&server, 3)
        .retry_period(20 * SEC)
        .build()
        .await
        .unwrap();
    client.start_keep_alive().await.unwrap();
    // Its first attempt is refused: it waits (16 to 20 s) as a follower.
    eventually(SEC, "the first attempt", || {
        server.calls(quorum_quest_client::RpcKind::TryAcquireLock) > 0
    })
    .await;
    tokio::time::sleep(3 * SEC).await;
    assert!(client.try_acquire_lock().await.unwrap());
    // The lease (3 s) must be renewed by the running keep-alive.
    for _ in 0..10 {
        tokio::time::sleep(SEC).await;
        assert!(client.is_leader(), "the keep-alive let the lease run out");
    }
}

/// The same with the keep-alive's own attempt still in flight when the
/// imperative grant comes: its refusal (decided before, delivered late) is
/// fenced by the state, and must not send the campaign into a follower wait
/// while the client leads.
#[tokio::test(start_paused = true)]
async fn a_late_refusal_of_the_keep_alive_does_not_stop_it_renewing_an_imperative_lease() {
    let server = server().await;
    server.set_owner(SERVICE, DOMAIN, "someone-else", SEC);
    server.set_refusal_delay(ms(1500));
    let client = in_memory(&server, 6)
        .retry_period(20 * SEC)
        .rpc_timeout(2 * SEC)
        .build()
        .await
        .unwrap();
    client.start_keep_alive().await.unwrap();
    // The keep-alive's attempt is refused now, its answer arrives at 1.5 s;
    // the lock is free from 1 s.
    tokio::time::sleep(ms(1100)).await;
    server.set_refusal_delay(std::time::Duration::ZERO);
    assert!(client.try_acquire_lock().await.unwrap());
    for _ in 0..15 {
        tokio::time::sleep(SEC).await;
        assert!(client.is_leader(), "the keep-alive let the lease run out");
    }
}

/// A client used from two live runtimes: its connection's driver starts on
/// the first runtime that needs one (here a current-thread runtime that is
/// then left idle, as a sync wrapper's runtime between two `block_on`s
/// is). A stream polled on another, healthy runtime must campaign there.
#[test]
fn a_stream_on_a_healthy_runtime_campaigns_while_the_drivers_runtime_is_idle() {
    let home = home_runtime();
    let server = home.block_on(server());
    let client = home.block_on(over_tcp(&server.url(), 3).build()).unwrap();
    // A sync wrapper's runtime: used once, then idle (kept alive).
    let idle = current_thread();
    assert!(idle.block_on(client.try_acquire_lock()).unwrap());
    assert!(idle.block_on(client.release_lock()).is_ok());
    home.block_on(async {
        let mut stream = client.leadership();
        until_elected(&mut stream, 10 * SEC, "Elected").await;
    });
    drop(idle);
    home.block_on(server.shutdown());
}

/// Callbacks on a long-lived runtime, leadership won on a runtime that then
/// shuts down (its driver, and the step-down timer, die with it), nothing
/// touching the client afterwards: `on_leader_lost` must still come at the
/// deadline (rule 2), as `is_leader()` turns false then.
#[test]
fn callbacks_get_the_loss_when_the_drivers_runtime_shut_down_and_nothing_else_happens() {
    let (home, server, log, client) = with_callbacks();
    let first = current_thread();
    assert!(first.block_on(client.try_acquire_lock()).unwrap());
    drop(first);
    home.block_on(async {
        loss_reported(&client, &log).await;
    });
    assert_eq!(log.get(), ["elected", "lost"]);
    home.block_on(server.shutdown());
}

/// The keep-alive started on a runtime that then shuts down (its campaign
/// and its driver die with it) while the callbacks run on the client's
/// runtime: the step-down timer must move to a live driver, so that
/// `on_leader_lost` still comes at the deadline with nothing else touching
/// the client (rule 2: no leadership change is lost silently).
#[test]
fn callbacks_get_the_loss_when_the_keep_alives_runtime_shut_down_mid_term() {
    let (home, server, log, client) = with_callbacks();
    let first = current_thread();
    first.block_on(async {
        client.start_keep_alive().await.unwrap();
        eventually(10 * SEC, "elected", || client.is_leader()).await;
    });
    // Its campaign and driver die here, mid-term.
    drop(first);
    home.block_on(async {
        loss_reported(&client, &log).await;
    });
    assert_eq!(log.get(), ["elected", "lost"]);
    home.block_on(server.shutdown());
}

/// A keep-alive whose follower attempt waits in the driver's queue (behind
/// many elections' attempts on a busy connection) when the client becomes
/// leader imperatively: its lease must be renewed (renewals never wait in
/// that queue), not left to run out until the attempt's turn comes.
#[tokio::test(start_paused = true)]
async fn a_keep_alive_queued_behind_followers_renews_a_lease_won_imperatively() {
    let server = server().await;
    let root = in_memory(&server, 3)
        .max_concurrent_calls(1)
        .build()
        .await
        .unwrap();
    // Each call takes 50 ms and one runs at a time: 100 elections need
    // about 10 s to be elected.
    server.set_latency(ms(50));
    let shards: Vec<_> = (0..100)
        .map(|i| root.for_scope("svc", format!("shard-{i}")).unwrap())
        .collect();
    let mut streams: Vec<_> = shards.iter().map(|s| s.leadership()).collect();
    for s in &mut streams {
        let _ = futures::poll!(futures::StreamExt::next(s));
    }
    // `root` campaigns too: its attempt waits at the back of the queue.
    root.start_keep_alive().await.unwrap();
    tokio::time::sleep(ms(10)).await;
    assert!(root.try_acquire_lock().await.unwrap());
    for _ in 0..8 {
        tokio::time::sleep(SEC).await;
        assert!(
            root.is_leader(),
            "the queued keep-alive let the lease run out"
        );
    }
}

/// Shutting down thousands of elections at once while their driver is busy
/// (most attempts queued, a few in flight on a one-slot connection to a
/// server that does not answer): every `shutdown()` returns within its
/// bound (one second to stop the campaign plus the RPC timeout), none hangs.
#[tokio::test(start_paused = true)]
async fn shutting_down_thousands_of_busy_elections_is_bounded() {
    let server = server().await;
    let root = in_memory(&server, 3)
        .max_concurrent_calls(1)
        .build()
        .await
        .unwrap();
    server.pause();
    let shards: Vec<_> = (0..2_000)
        .map(|i| root.for_scope("svc", format!("shard-{i}")).unwrap())
        .collect();
    let mut streams: Vec<_> = shards.iter().map(|s| s.leadership()).collect();
    for s in &mut streams {
        let _ = futures::poll!(futures::StreamExt::next(s));
    }
    tokio::time::sleep(ms(100)).await;
    let bound = SEC + root.timing().rpc_timeout + ms(100);
    let started = tokio::time::Instant::now();
    let all = futures::future::join_all(shards.iter().map(|s| s.shutdown()));
    tokio::time::timeout(bound, all)
        .await
        .expect("every shutdown returns within its bound");
    eprintln!("2000 shutdowns took {:?} (paused clock)", started.elapsed());
    for s in &mut streams {
        // Every stream ends after its shutdown.
        while let Some(ev) = tokio::time::timeout(SEC, futures::StreamExt::next(s))
            .await
            .expect("the stream ends")
        {
            assert!(!ev.is_elected(), "{ev:?}");
        }
    }
    server.resume();
}

/// A leader whose runtime (current-thread: the driver and everything else
/// on one thread) is blocked past its deadline: `is_leader()`, read from
/// another thread, turns false by the deadline, and once the runtime runs
/// again the stream's next transition is `Lost { Expired }` (never a silent
/// continuation of the term).
#[test]
fn a_leader_whose_runtime_is_blocked_past_its_deadline_steps_down_and_reports_it() {
    let home = home_runtime();
    let server = home.block_on(server());
    let url = server.url();
    let (tx, rx) = std::sync::mpsc::channel();
    let contender = std::thread::spawn(move || {
        let rt = current_thread();
        rt.block_on(async {
            let client = over_tcp(&url, 3).build().await.unwrap();
            let mut stream = client.leadership();
            let elected = until_elected(&mut stream, 10 * SEC, "Elected").await;
            let LeadershipEvent::Elected { term, .. } = elected else {
                unreachable!()
            };
            let deadline = term.deadline().unwrap();
            tx.send((client.clone(), deadline)).unwrap();
            // Block the only thread well past the deadline.
            std::thread::sleep(4 * SEC);
            let ev = until(&mut stream, 10 * SEC, "a transition", |ev| {
                ev.is_elected() || ev.is_lost()
            })
            .await;
            assert!(is_lost_with(&ev, LossReason::Expired), "{ev:?}");
            client.shutdown().await.ok();
        });
    });
    let (client, deadline) = rx.recv().unwrap();
    while tokio::time::Instant::now() < deadline {
        std::thread::sleep(ms(20));
    }
    assert!(!client.is_leader(), "still leader past the deadline");
    assert!(client.get_remaining_lease().is_none());
    contender.join().unwrap();
    drop(client);
    home.block_on(server.shutdown());
}

// ----- second attack (the slot-based driver) -----

/// A runtime that is kept alive but idle (a sync wrapper's runtime between
/// two `block_on`s).
fn idle_runtime() -> tokio::runtime::Runtime {
    current_thread()
}

/// Asserts that `client` leads at every check for `span` (every 100 ms).
async fn leads_throughout(
    client: &quorum_quest_client::QuorumQuestClient,
    span: std::time::Duration,
) {
    let end = tokio::time::Instant::now() + span;
    while tokio::time::Instant::now() < end {
        assert!(
            client.is_leader(),
            "the keep-alive stopped renewing (keep-alive running: {}, health: {:?})",
            client.is_keep_alive_running(),
            client.health()
        );
        tokio::time::sleep(ms(100)).await;
    }
}

/// The keep-alive runs on an idle runtime's driver, is stopped (the stop
/// waits in that driver's queue) and started again on a healthy runtime,
/// whose driver takes the election's slot over. When the idle runtime runs
/// again, its driver handles the old stop: it must not take the slot back
/// (wiping the new campaign), or the keep-alive silently stops renewing
/// while `is_keep_alive_running()` and the health say it runs.
#[test]
fn a_late_stop_on_the_old_drivers_runtime_does_not_kill_the_restarted_keep_alive() {
    let home = home_runtime();
    let server = home.block_on(server());
    let client = home.block_on(over_tcp(&server.url(), 3).build()).unwrap();
    let idle = idle_runtime();
    idle.block_on(async {
        client.start_keep_alive().await.unwrap();
        eventually(10 * SEC, "elected on the first runtime", || {
            client.is_leader()
        })
        .await;
    });
    home.block_on(async {
        // The stop waits in the idle driver's queue (the wait gives up
        // after its grace period); the restart goes to this runtime's driver.
        client.stop_keep_alive().await;
        client.start_keep_alive().await.unwrap();
    });
    // The idle runtime runs again: its driver reads the old stop.
    idle.block_on(async { tokio::time::sleep(ms(50)).await });
    home.block_on(async {
        assert!(client.is_keep_alive_running());
        leads_throughout(&client, 7 * SEC).await;
        client.stop_keep_alive().await;
    });
    drop(idle);
    home.block_on(server.shutdown());
}

/// A follower attempt launched by an idle runtime's driver, whose election
/// is then stopped and restarted on a healthy runtime (that driver takes the
/// slot over): the attempt's answer, read later by the old driver, finds the
/// slot gone. The old driver must still count the attempt as over, or after
/// twice the connection's cap of such attempts every later campaign on that
/// runtime waits in its queue for ever (no event, no call).
#[test]
fn attempts_left_behind_by_a_slot_takeover_do_not_block_the_old_drivers_queue() {
    let home = home_runtime();
    // Slow answers: the attempt is still in flight when the idle runtime
    // stops running.
    let server = home
        .block_on(
            quorum_quest_client::testing::TestServer::builder()
                .latency(SEC)
                .start(),
        )
        .unwrap();
    // A cap of one call: the driver lets two follower attempts fly at once.
    let root = home
        .block_on(over_tcp(&server.url(), 3).max_concurrent_calls(1).build())
        .unwrap();
    let idle = idle_runtime();
    let moved: Vec<_> = (0..2)
        .map(|i| root.for_scope("svc", format!("moved-{i}")).unwrap())
        .collect();
    for client in &moved {
        idle.block_on(async {
            client.start_keep_alive().await.unwrap();
            // The idle runtime's driver launches the attempt (answered
            // a second later).
            tokio::time::sleep(ms(100)).await;
        });
        home.block_on(async {
            client.stop_keep_alive().await;
            client.start_keep_alive().await.unwrap();
        });
    }
    // A new election campaigns on the idle runtime's driver (answered at
    // once from now on).
    server.set_latency(std::time::Duration::ZERO);
    idle.block_on(async {
        let fresh = root.for_scope("svc", "fresh").unwrap();
        let mut stream = fresh.leadership();
        until_elected(
            &mut stream,
            10 * SEC,
            "Elected (the campaign must not wait in the queue for ever)",
        )
        .await;
    });
    home.block_on(async {
        for client in &moved {
            client.stop_keep_alive().await;
        }
    });
    drop(idle);
    home.block_on(server.shutdown());
}

/// Live heap bytes allocated by this thread (a paused-time test runs on one
/// thread: its count is not disturbed by the tests running beside it), to
/// see whether the memory of dropped clients comes back.
struct Counting;
thread_local! {
    static LIVE: std::cell::Cell<isize> = const { std::cell::Cell::new(0) };
}
fn count(delta: isize) {
    let _ = LIVE.try_with(|live| live.set(live.get() + delta));
}
unsafe impl std::alloc::GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: std::alloc::Layout) -> *mut u8 {
        count(l.size() as isize);
        unsafe { std::alloc::System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: std::alloc::Layout) {
        count(-(l.size() as isize));
        unsafe { std::alloc::System.dealloc(p, l) }
    }
}
#[global_allocator]
static GLOBAL: Counting = Counting;

fn live() -> isize {
    LIVE.with(std::cell::Cell::get)
}

/// Thousands of `for_scope` clients with a long TTL, each made leader
/// (imperatively, or by its keep-alive: its driver arms the step-down
/// timer, and runs a campaign) and dropped (the release runs in the
/// background): their memory must come back, not be
/// held by the driver's timers until the deadline (up to the one-year
/// horizon). Each round has its own server (which keeps every tenure) and
/// root client; only the process-wide leftovers may remain.
#[tokio::test(start_paused = true)]
async fn dropped_leaders_with_long_leases_give_their_memory_back() {
    async fn round(n: usize) {
        let server = server().await;
        let root = in_memory(&server, 3600 * 24 * 365 * 10)
            .build()
            .await
            .unwrap();
        for i in 0..n {
            let client = root.for_scope("svc", format!("lock-{i}")).unwrap();
            if i % 2 == 0 {
                assert!(client.try_acquire_lock().await.unwrap());
            } else {
                // Campaigning: a slot with a campaign and a timer.
                client.start_keep_alive().await.unwrap();
                eventually(10 * SEC, "elected", || client.is_leader()).await;
            }
            drop(client);
        }
        // The releases run in the background.
        tokio::time::sleep(10 * SEC).await;
        drop(root);
        server.shutdown().await;
        drop(server);
        tokio::time::sleep(10 * SEC).await;
    }
    round(2_000).await;
    let before = live();
    for _ in 0..3 {
        round(2_000).await;
    }
    let held = live() - before;
    eprintln!("6 000 dropped leaders: {held} bytes still held");
    // A session is well over a kilobyte: 6 000 of them held would be
    // several megabytes.
    assert!(
        held < 1_000_000,
        "6 000 dropped leaders still hold {held} bytes"
    );
}

/// The keep-alive is started on a current-thread runtime whose driver does
/// not get to read its queue before the runtime is dropped (a sync
/// wrapper's `block_on(start_keep_alive())` returns at once). Meanwhile the
/// client becomes leader with `try_acquire_lock()` on its own runtime: that
/// lease change is reported to the campaign's driver, which dies with its
/// runtime before it reads the report and never held a timer entry for the
/// election (so no entry is dropped to hand the timer over). The loss at
/// the deadline must still reach the callbacks (rule 2).
#[test]
fn callbacks_get_the_loss_when_a_driver_dies_with_a_lease_change_unread() {
    let (home, server, log, client) = with_callbacks();
    let first = current_thread();
    first.block_on(client.start_keep_alive()).unwrap();
    home.block_on(async {
        assert!(client.try_acquire_lock().await.unwrap());
        eventually(5 * SEC, "on_leader_elected", || log.get() == ["elected"]).await;
    });
    // The campaign's driver dies with the lease change unread.
    drop(first);
    home.block_on(async {
        loss_reported(&client, &log).await;
    });
    assert_eq!(log.get(), ["elected", "lost"]);
    home.block_on(server.shutdown());
}

/// The same with a stream on the client's runtime instead of callbacks
/// (and no driver there: the campaign runs on the other runtime's), already
/// waiting for its next event when the campaign's runtime is dropped. The
/// stream still wants the campaign, and `revive_campaign` restarts it on
/// the runtime that polls the stream, but only if something polls it: with
/// no live driver to hand the timer to, nothing did, and the term ran out
/// with the stream waiting for ever (no `Lost`, no campaign).
#[test]
fn a_waiting_stream_is_not_left_silent_when_a_driver_dies_with_a_lease_change_unread() {
    let home = home_runtime();
    let server = home.block_on(server());
    let client = home.block_on(over_tcp(&server.url(), 3).build()).unwrap();
    let first = current_thread();
    first.block_on(client.start_keep_alive()).unwrap();
    let mut stream = client.leadership();
    let lost = Arc::new(Mutex::new(None));
    home.block_on(async {
        assert!(client.try_acquire_lock().await.unwrap());
        until_elected(&mut stream, 5 * SEC, "Elected").await;
    });
    let seen = lost.clone();
    let waiting = home.spawn(async move {
        let ev = until(&mut stream, 60 * SEC, "Lost", LeadershipEvent::is_lost).await;
        *seen.lock().unwrap() = Some(ev);
        stream
    });
    // Let the spawned task poll the stream (and wait) first.
    std::thread::sleep(std::time::Duration::from_millis(200));
    drop(first);
    home.block_on(async {
        // Past the deadline of the term won before the drop (TTL 3 s).
        tokio::time::sleep(5 * SEC).await;
        assert!(
            client.is_leader() || lost.lock().unwrap().is_some(),
            "the term ran out and the waiting stream was not told"
        );
        assert!(
            client.health().campaign_running,
            "a stream still wants the campaign, and nothing runs it"
        );
    });
    waiting.abort();
    drop(home.block_on(waiting));
    home.block_on(server.shutdown());
}

/// The keep-alive runs on a current-thread runtime that is then left idle
/// (not dropped: a sync wrapper's runtime between two `block_on`s), so its
/// renewals stop and the term runs out. The callbacks run on the client's
/// healthy runtime: `on_leader_lost` must come at the deadline, as it did
/// with the callbacks' own backstop timer (HEAD~2, `callback_events`).
#[test]
fn callbacks_get_the_loss_when_the_keep_alives_runtime_is_left_idle() {
    let (home, server, log, client) = with_callbacks();
    let idle = current_thread();
    keep_alive_elected_on(&idle, &client);
    // `idle` is kept, but nothing runs it any more.
    home.block_on(async {
        loss_reported(&client, &log).await;
    });
    assert_eq!(log.get(), ["elected", "lost"]);
    drop(idle);
    home.block_on(server.shutdown());
}

/// `stop_keep_alive()` promises that a leader stays leader until its lease
/// runs out "and `on_leader_lost` fires then". Stopped on a current-thread
/// runtime that is then left idle, with the callbacks on the client's
/// healthy runtime, and no campaign running (so, by the design, the
/// callbacks' driver should keep the step-down timer): the loss must come.
#[test]
fn callbacks_get_the_loss_after_stop_keep_alive_on_a_runtime_left_idle() {
    let (home, server, log, client) = with_callbacks();
    let idle = current_thread();
    keep_alive_elected_on(&idle, &client);
    idle.block_on(client.stop_keep_alive());
    home.block_on(async {
        // A lease change made on the healthy runtime, with no campaign.
        assert!(client.try_acquire_lock().await.unwrap());
        loss_reported(&client, &log).await;
    });
    assert_eq!(log.get(), ["elected", "lost"]);
    drop(idle);
    home.block_on(server.shutdown());
}

/// The keep-alive runs on a current-thread runtime that is then left idle
/// (not dropped); a stream on the client's healthy runtime joins that
/// campaign (it runs, as far as anyone can tell: its driver is alive). The
/// renewals stop with the idle runtime and the term runs out: the stream
/// must be told (`Elected` and `Lost` alternate; a consumer that keeps
/// leader work running until `Lost` must not run it past the deadline).
#[test]
fn a_stream_on_a_healthy_runtime_gets_the_loss_while_the_keep_alives_runtime_is_idle() {
    let home = home_runtime();
    let server = home.block_on(server());
    let client = home.block_on(over_tcp(&server.url(), 3).build()).unwrap();
    let idle = current_thread();
    keep_alive_elected_on(&idle, &client);
    // `idle` is kept, but nothing runs it any more.
    home.block_on(async {
        let mut stream = client.leadership();
        until_elected(&mut stream, 5 * SEC, "Elected (the running term)").await;
        let lost = until(&mut stream, 10 * SEC, "Lost", LeadershipEvent::is_lost).await;
        assert!(is_lost_with(&lost, LossReason::Expired), "{lost:?}");
        assert!(!client.is_leader());
    });
    drop(idle);
    home.block_on(server.shutdown());
}

/// The keep-alive's runtime (multi-thread) is shut down with
/// `shutdown_background()` mid-term: its tasks (the driver and the timer
/// entries it held) are dropped on its worker threads, not on the caller's.
/// No panic there, and the callbacks on the client's runtime still get the
/// loss at the deadline.
#[test]
fn callbacks_get_the_loss_when_the_keep_alives_runtime_shuts_down_in_the_background() {
    let (home, server, log, client) = with_callbacks();
    let first = home_runtime();
    first.block_on(async {
        client.start_keep_alive().await.unwrap();
        eventually(10 * SEC, "elected", || client.is_leader()).await;
    });
    first.shutdown_background();
    home.block_on(async {
        loss_reported(&client, &log).await;
    });
    assert_eq!(log.get(), ["elected", "lost"]);
    home.block_on(server.shutdown());
}

/// The stream's backstop through renewals: the keep-alive on a
/// current-thread runtime renews for two TTLs (each renewal moves the
/// deadline later: the backstop must not report a loss at a deadline that
/// was renewed), then that runtime is left idle: the stream on the
/// client's runtime gets `Lost` at the last deadline.
#[test]
fn a_streams_backstop_sleeps_through_renewals_and_reports_the_last_deadline() {
    let home = home_runtime();
    let server = home.block_on(server());
    let client = home.block_on(over_tcp(&server.url(), 3).build()).unwrap();
    let idle = current_thread();
    keep_alive_elected_on(&idle, &client);
    let mut stream = client.leadership();
    let waiting = home.spawn(async move {
        until_elected(&mut stream, 5 * SEC, "Elected (the running term)").await;
        let lost = until(&mut stream, 30 * SEC, "Lost", LeadershipEvent::is_lost).await;
        (stream, lost, std::time::Instant::now())
    });
    // Renewing for two TTLs (the campaign runs while this runtime runs).
    idle.block_on(async {
        tokio::time::sleep(6 * SEC).await;
        assert!(client.is_leader(), "renewed all along");
    });
    let stopped = std::time::Instant::now();
    let (stream, lost, at) = home.block_on(waiting).unwrap();
    assert!(is_lost_with(&lost, LossReason::Expired), "{lost:?}");
    assert!(at >= stopped, "Lost came while the term was being renewed");
    assert!(
        at.duration_since(stopped) < 5 * SEC,
        "Lost came {:?} after the renewals stopped (TTL 3 s)",
        at.duration_since(stopped)
    );
    drop(stream);
    drop(idle);
    home.block_on(server.shutdown());
}

/// A stream polled on a runtime built without timers (`enable_io` only),
/// while its campaign runs on the client's runtime: reading it must not
/// panic (its backstop timer cannot be armed there; the step-down timer of
/// the campaign's driver still reports the loss).
#[test]
fn a_stream_polled_on_a_runtime_without_timers_does_not_panic() {
    let no_timers = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .unwrap();
    stream_read_elsewhere_gets_its_events(no_timers.handle());
}

/// Campaigns (keep-alive) on a healthy runtime, reads a stream's first two
/// events (`Elected`, then the next, a renewal) through `elsewhere`, where
/// the stream's backstop cannot arm a working timer: no panic, and the
/// campaign's driver still delivers them.
fn stream_read_elsewhere_gets_its_events(elsewhere: &tokio::runtime::Handle) {
    use futures::StreamExt;
    let home = home_runtime();
    let server = home.block_on(server());
    let client = home.block_on(over_tcp(&server.url(), 3).build()).unwrap();
    home.block_on(async {
        client.start_keep_alive().await.unwrap();
        eventually(10 * SEC, "elected", || client.is_leader()).await;
    });
    let mut stream = client.leadership();
    let first = elsewhere.block_on(async { stream.next().await });
    assert!(
        matches!(first, Some(LeadershipEvent::Elected { .. })),
        "{first:?}"
    );
    // Waits for the next event (a renewal) there.
    let next = elsewhere.block_on(async { stream.next().await });
    assert!(next.is_some());
    home.block_on(client.stop_keep_alive());
    drop(stream);
    home.block_on(server.shutdown());
}

// ----- fourth attack (home cleared on stop, backstop choice) -----

/// `stop_keep_alive()` on a current-thread runtime that is then left idle,
/// with the callbacks on the client's healthy runtime, and NO lease change
/// after the stop: the step-down timer stays in the stopped campaign's
/// driver (a stop takes nothing over, and nothing pokes the callbacks'
/// driver), while the callbacks' backstop believes the callbacks' own
/// driver keeps it (no home, adapter alive on this runtime) and arms
/// nothing. `on_leader_lost` must still come at the deadline.
#[test]
fn callbacks_get_the_loss_after_stop_keep_alive_left_idle_without_a_later_lease_change() {
    let (home, server, log, client) = with_callbacks();
    let idle = current_thread();
    keep_alive_elected_on(&idle, &client);
    idle.block_on(client.stop_keep_alive());
    // `idle` is kept, but nothing runs it any more.
    home.block_on(async {
        loss_reported(&client, &log).await;
    });
    assert_eq!(log.get(), ["elected", "lost"]);
    drop(idle);
    home.block_on(server.shutdown());
}

/// A start left unread in an idle runtime's driver, then a stop (also
/// unread there) and a restart on the healthy runtime's driver, which had
/// run the campaign before. When the idle runtime runs again, its driver
/// reads the stale start first: it must not take the slot over from the
/// live campaign (aborting its renewal), or the stop that follows wipes it,
/// and the keep-alive silently stops renewing while
/// `is_keep_alive_running()` and the health say it runs.
#[test]
fn a_stale_start_on_an_idle_runtime_does_not_steal_the_restarted_keep_alive() {
    let home = home_runtime();
    let server = home.block_on(server());
    let client = home.block_on(over_tcp(&server.url(), 3).build()).unwrap();
    home.block_on(async {
        client.start_keep_alive().await.unwrap();
        eventually(10 * SEC, "elected", || client.is_leader()).await;
        client.stop_keep_alive().await;
    });
    let idle = idle_runtime();
    // Returns before the idle runtime's driver reads the start.
    idle.block_on(async { client.start_keep_alive().await.unwrap() });
    home.block_on(async {
        // The stop waits in the idle driver's queue (the wait gives up
        // after its grace period); the restart goes to this runtime's
        // driver, which kept the slot.
        client.stop_keep_alive().await;
        client.start_keep_alive().await.unwrap();
        leads_throughout(&client, SEC).await;
    });
    // The idle runtime runs again: its driver reads the stale start and stop.
    idle.block_on(async { tokio::time::sleep(ms(50)).await });
    home.block_on(async {
        assert!(client.is_keep_alive_running());
        assert!(client.health().campaign_running);
        leads_throughout(&client, 7 * SEC).await;
        client.stop_keep_alive().await;
    });
    drop(idle);
    home.block_on(server.shutdown());
}

/// A stream read through `Handle::block_on` of a runtime that has shut down
/// (a sync wrapper that kept the handle), while the campaign runs on the
/// client's runtime: its backstop timer belongs to the dead runtime, whose
/// timer panics when polled ("being shutdown"). Reading must not panic; the
/// campaign's driver still reports the events.
#[test]
fn a_stream_read_on_a_shut_down_runtimes_handle_does_not_panic() {
    let gone = home_runtime();
    let handle = gone.handle().clone();
    drop(gone);
    stream_read_elsewhere_gets_its_events(&handle);
}

/// The keep-alive runs on a current-thread runtime left idle; it is
/// stopped from the client's healthy runtime (the stop waits, unread, in
/// the idle driver's queue), and the lock is then won imperatively there:
/// the report of that lease change is forwarded to the idle driver (its
/// slot still records the campaign), which keeps the step-down timer. The
/// callbacks on the healthy runtime must still get the loss at the
/// deadline (their backstop must not believe their own driver keeps it).
#[test]
fn callbacks_get_the_loss_of_an_imperative_lease_whose_timer_sits_in_an_idle_driver() {
    let (home, server, log, client) = with_callbacks();
    let idle = idle_runtime();
    keep_alive_elected_on(&idle, &client);
    home.block_on(async {
        // Gives up waiting after its grace period.
        client.stop_keep_alive().await;
        assert!(client.try_acquire_lock().await.unwrap());
        loss_reported(&client, &log).await;
    });
    assert_eq!(log.get(), ["elected", "lost"]);
    drop(idle);
    home.block_on(server.shutdown());
}

/// The imperative API and the keep-alive's stop used on a runtime built
/// without timers (`enable_io` only): an error or a result, never a panic
/// inside tokio ("timers are disabled").
#[test]
fn the_api_on_a_runtime_without_timers_does_not_panic() {
    let home = home_runtime();
    let server = home.block_on(server());
    let client = home.block_on(over_tcp(&server.url(), 3).build()).unwrap();
    let no_timers = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .unwrap();
    let acquired = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        no_timers.block_on(client.try_acquire_lock())
    }));
    let acquired = acquired.expect("try_acquire_lock panicked");
    assert!(
        matches!(
            acquired,
            Err(quorum_quest_client::Error::InvalidParameter(ref m)) if m.contains("enable_time")
        ),
        "{acquired:?}"
    );
    home.block_on(client.start_keep_alive()).unwrap();
    let stopped = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        no_timers.block_on(client.stop_keep_alive())
    }));
    assert!(stopped.is_ok(), "stop_keep_alive panicked");
    drop(no_timers);
    home.block_on(server.shutdown());
}
