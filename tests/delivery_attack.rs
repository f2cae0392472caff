//! Attacks on how events reach their consumers (`src/fanout.rs`, the hub
//! of `src/election/mod.rs`): consumers whose executor, or whose own code,
//! runs while an event is being handed out; streams created, polled and
//! dropped on other threads while the lease is renewed and lost.

mod common;

use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use common::*;
use futures::{Future, Stream};
use quorum_quest_client::{LeadershipEvent, QuorumQuestClient};

/// A waker whose executor runs the woken task's code at once, on the
/// waking thread: here that code creates another stream of the same client
/// (and drops it unpolled), then tells the test thread.
struct CreatesAStream {
    client: QuorumQuestClient,
    woken: Mutex<mpsc::Sender<()>>,
    wake_ups: AtomicUsize,
}

impl futures::task::ArcWake for CreatesAStream {
    fn wake_by_ref(me: &Arc<Self>) {
        drop(me.client.leadership());
        me.wake_ups.fetch_add(1, Ordering::SeqCst);
        let _ = me.woken.lock().unwrap().send(());
    }
}

/// A stream's wake-up runs on the thread that hands the event out (the
/// connection's driver). If that wake-up creates a stream of the same
/// client (an executor that polls the woken task inline, a task that
/// subscribes again), it must not find the event hand-out's lock held by
/// its own thread: that hung the driver for good (no renewal, for any
/// election on the connection, and no `Lost` on the stream).
#[test]
fn a_wake_up_that_creates_a_stream_does_not_hang_the_driver() {
    let rt = multi_thread(2);
    let server = rt.block_on(server());
    let client = rt
        .block_on(over_tcp(&server.url(), 3).build())
        .expect("client builds");
    let (woken_tx, woken) = mpsc::channel();
    let reenters = Arc::new(CreatesAStream {
        client: client.clone(),
        woken: Mutex::new(woken_tx),
        wake_ups: AtomicUsize::new(0),
    });
    let waker = futures::task::waker(reenters.clone());
    let mut cx = Context::from_waker(&waker);
    let mut stream = client.leadership();
    let mut seen = Vec::new();
    let mut renewals = 0;
    let hung = {
        let _in_runtime = rt.enter();
        loop {
            while let Poll::Ready(ev) = Pin::new(&mut stream).poll_next(&mut cx) {
                match ev {
                    Some(LeadershipEvent::Renewed { .. }) => renewals += 1,
                    Some(ev) => seen.push(format!("{ev:?}").chars().take(8).collect::<String>()),
                    None => panic!("the stream ended"),
                }
            }
            if renewals >= 2 {
                break false;
            }
            // Renewals come every second (ttl 3 s): five seconds without
            // a wake-up means the driver is stuck.
            if woken.recv_timeout(5 * SEC).is_err() {
                break true;
            }
        }
    };
    if hung {
        // The driver's thread is blocked for good: dropping the runtime
        // would wait for it.
        let wake_ups = reenters.wake_ups.load(Ordering::SeqCst);
        std::mem::forget(stream);
        std::mem::forget(reenters);
        std::mem::forget(client);
        std::mem::forget(server);
        std::mem::forget(rt);
        panic!("no wake-up for 5 s after {wake_ups} (events {seen:?}): the driver hung");
    }
    assert!(
        seen.first().is_some_and(|e| e.starts_with("Elected")),
        "{seen:?}"
    );
    assert!(client.is_leader());
    drop(stream);
    rt.block_on(async {
        let _ = client.shutdown().await;
        server.shutdown().await;
    });
}

/// What one stream has seen so far, checked event by event: it starts from
/// its snapshot (`Elected` of the running term, or `Follower`), `Elected`
/// and `Lost` alternate with matching terms, terms follow each other
/// without a gap (a missed `Lost`/`Elected` pair would show as one), and a
/// `Renewed` names the running term.
#[derive(Default)]
struct Seen {
    /// The running term, as this stream sees it.
    term: Option<u64>,
    /// The last term it saw begin.
    last: Option<u64>,
    events: usize,
    transitions: usize,
    trail: Vec<String>,
}

impl Seen {
    fn check(&mut self, ev: &LeadershipEvent, who: &str) {
        self.events += 1;
        let t = match ev {
            LeadershipEvent::Elected { term, .. } => format!("E{}", term.id()),
            LeadershipEvent::Lost { term, .. } => format!("L{}", term.id()),
            LeadershipEvent::Follower => "F".into(),
            LeadershipEvent::Renewed { term_id, .. } => format!("R{term_id}"),
            LeadershipEvent::RpcFailed { .. } => "X".into(),
            _ => "?".into(),
        };
        self.trail.push(t);
        if self.trail.len() > 12 {
            self.trail.remove(0);
        }
        let trail = &self.trail;
        match ev {
            LeadershipEvent::Elected { term, .. } => {
                self.transitions += 1;
                assert!(self.term.is_none(), "{who}: Elected twice: {trail:?}");
                if let Some(last) = self.last {
                    assert_eq!(term.id(), last + 1, "{who}: a term skipped: {trail:?}");
                }
                self.term = Some(term.id());
                self.last = Some(term.id());
            }
            LeadershipEvent::Lost { term, .. } => {
                self.transitions += 1;
                assert_eq!(
                    self.term,
                    Some(term.id()),
                    "{who}: Lost out of turn: {trail:?}"
                );
                self.term = None;
            }
            LeadershipEvent::Renewed { term_id, .. } => {
                assert_eq!(
                    self.term,
                    Some(*term_id),
                    "{who}: Renewed out of term: {trail:?}"
                );
            }
            LeadershipEvent::Follower => {
                self.transitions += 1;
                assert!(
                    self.term.is_none(),
                    "{who}: Follower while leading: {trail:?}"
                );
            }
            _ => {}
        }
    }
}

/// Streams created, polled and dropped in a tight loop on a plain thread
/// (not a runtime worker), while the leader renews every ~330 ms and the
/// server takes the lock away every 150-900 ms (so `Lost` and `Elected` are
/// handed out all the time by the driver, on another thread): every such
/// stream starts from its snapshot and sees each transition after it once,
/// in order, with no gap; so does the long-lived stream.
#[test]
fn streams_created_on_another_thread_during_hand_outs_see_each_transition_once() {
    let rt = multi_thread(2);
    let server = rt.block_on(server());
    let client = rt
        .block_on(over_tcp(&server.url(), 1).build())
        .expect("client builds");
    // The long-lived stream keeps the campaign running.
    let main = {
        let client = client.clone();
        rt.spawn(async move {
            use futures::StreamExt;
            let mut stream = client.leadership();
            let mut seen = Seen::default();
            while let Some(ev) = stream.next().await {
                seen.check(&ev, "the long-lived stream");
            }
            seen
        })
    };
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let churn = {
        let client = client.clone();
        let stop = stop.clone();
        let handle = rt.handle().clone();
        std::thread::spawn(move || {
            let _in_runtime = handle.enter();
            let mut cx = Context::from_waker(futures::task::noop_waker_ref());
            let (mut streams, mut events, mut transitions) = (0usize, 0usize, 0usize);
            let mut rng = fastrand::Rng::with_seed(5);
            // A rolling set of streams: each made at a random instant,
            // polled (spinning: the events are handed out on another thread
            // meanwhile) and dropped at another.
            type Live = (quorum_quest_client::Leadership, Seen, std::time::Instant);
            let mut live: Vec<Live> = Vec::new();
            let mut retire = |seen: Seen| {
                streams += 1;
                events += seen.events;
                transitions += seen.transitions;
            };
            while !stop.load(Ordering::SeqCst) {
                if live.len() < 16 && rng.u8(..4) == 0 {
                    // Most live a few ms (many subscriptions), some across
                    // several transitions.
                    let life = if rng.u8(..8) == 0 { 1500 } else { 5 };
                    let until = std::time::Instant::now() + ms(rng.u64(..life));
                    live.push((client.leadership(), Seen::default(), until));
                }
                let now = std::time::Instant::now();
                if let Some(i) = live.iter().position(|(_, _, until)| *until <= now) {
                    let (stream, seen, _) = live.swap_remove(i);
                    drop(stream);
                    retire(seen);
                }
                for (stream, seen, _) in live.iter_mut() {
                    match Pin::new(stream).poll_next(&mut cx) {
                        Poll::Ready(Some(ev)) => seen.check(&ev, "a short-lived stream"),
                        Poll::Ready(None) => panic!("a short-lived stream ended"),
                        Poll::Pending => {}
                    }
                }
                std::thread::yield_now();
            }
            for (_, seen, _) in live {
                retire(seen);
            }
            (streams, events, transitions)
        })
    };
    rt.block_on(async {
        let mut rng = fastrand::Rng::with_seed(9);
        let end = tokio::time::Instant::now() + 8 * SEC;
        while tokio::time::Instant::now() < end {
            // Now before a renewal, now after one or two.
            tokio::time::sleep(ms(rng.u64(150..900))).await;
            server.force_expire(SERVICE, DOMAIN);
        }
    });
    stop.store(true, Ordering::SeqCst);
    let (streams, events, transitions) = churn.join().expect("no check failed");
    rt.block_on(async {
        let _ = client.shutdown().await;
        let seen = tokio::time::timeout(10 * SEC, main)
            .await
            .expect("the long-lived stream ends after shutdown")
            .expect("no check failed");
        eprintln!(
            "{streams} short-lived streams saw {events} events ({transitions} transitions); \
             the long-lived one {} ({} transitions, last term {:?})",
            seen.events, seen.transitions, seen.last
        );
        assert!(
            seen.last.unwrap_or(0) >= 5,
            "too few terms to attack anything"
        );
        assert!(streams >= 100, "too few streams to attack anything");
        server.shutdown().await;
    });
}

/// `shutdown()` at a random instant while renewals go out every 100 ms and
/// the server answers each 0-80 ms late (so a renewal is often in flight,
/// or answered, while the release goes out): when it returns the client no
/// longer leads, its stream ended right after the `Lost` of its last term,
/// and the lock is free (another client gets it at once).
#[test]
fn shutdown_racing_renewal_answers_leaves_no_leader_and_a_free_lock() {
    let rt = multi_thread(2);
    rt.block_on(async {
        use futures::StreamExt;
        let server = server().await;
        let other = over_tcp(&server.url(), 2)
            .client_id("other")
            .build()
            .await
            .expect("client builds");
        let mut rng = fastrand::Rng::with_seed(11);
        for trial in 0..25 {
            server.set_latency(Duration::ZERO);
            let client = over_tcp(&server.url(), 2)
                .client_id(format!("racer-{trial}"))
                .renew_interval(ms(100))
                .build()
                .await
                .expect("client builds");
            let mut stream = client.leadership();
            let consumer = tokio::spawn(async move {
                let mut seen = Seen::default();
                let mut last = None;
                while let Some(ev) = stream.next().await {
                    seen.check(&ev, "the racer's stream");
                    if !matches!(ev, LeadershipEvent::Renewed { .. }) {
                        last = Some(ev);
                    }
                }
                (seen, last)
            });
            eventually(10 * SEC, "the racer leads", || client.is_leader()).await;
            server.set_latency(ms(rng.u64(..80)));
            tokio::time::sleep(ms(rng.u64(..300))).await;
            let shut = client.shutdown().await;
            assert!(shut.is_ok(), "trial {trial}: {shut:?}");
            assert!(!client.is_leader(), "trial {trial}: leads after shutdown");
            assert!(client.current_term().is_none(), "trial {trial}");
            let lock = server.lock(SERVICE, DOMAIN);
            assert!(
                lock.is_none(),
                "trial {trial}: the lock is still held: {lock:?}"
            );
            let (seen, last) = tokio::time::timeout(5 * SEC, consumer)
                .await
                .expect("the stream ends after shutdown")
                .expect("no check failed");
            assert!(
                matches!(last, Some(LeadershipEvent::Lost { .. })),
                "trial {trial}: the stream ended after {:?}",
                seen.trail
            );
            server.set_latency(Duration::ZERO);
            assert_eq!(
                other.try_acquire_lock().await.ok(),
                Some(true),
                "trial {trial}"
            );
            assert!(other.release_lock().await.is_ok());
            assert!(
                !client.is_leader(),
                "trial {trial}: leads again after shutdown"
            );
        }
        server.shutdown().await;
    });
}

/// Two clients whose streams are dropped and made again in a tight loop
/// (one on a plain thread, one in a runtime task) while the lease is
/// renewed: every drop of a leading stream releases, every new one
/// campaigns again. Sampled all along from a third thread: a client whose
/// same term runs before and after a look at the server is its owner at
/// that look, with a later expiry (so never two leaders); and every stream
/// sees its transitions in order.
#[test]
fn streams_dropped_and_made_again_in_a_tight_loop_never_give_two_leaders() {
    let rt = multi_thread(2);
    let server = rt.block_on(server());
    let build = |id: &str| {
        rt.block_on(over_tcp(&server.url(), 1).client_id(id).build())
            .expect("client builds")
    };
    let (a, b) = (build("alpha"), build("beta"));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    // Alpha's streams, on a plain thread: each polled (spinning) for up to
    // 60 ms, then dropped.
    let churn_a = {
        let (a, stop, handle) = (a.clone(), stop.clone(), rt.handle().clone());
        std::thread::spawn(move || {
            let _in_runtime = handle.enter();
            let mut cx = Context::from_waker(futures::task::noop_waker_ref());
            let mut rng = fastrand::Rng::with_seed(21);
            let mut made = 0u32;
            while !stop.load(Ordering::SeqCst) {
                let mut stream = a.leadership();
                let mut seen = Seen::default();
                let until = std::time::Instant::now() + ms(rng.u64(..60));
                while std::time::Instant::now() < until {
                    match Pin::new(&mut stream).poll_next(&mut cx) {
                        Poll::Ready(Some(ev)) => seen.check(&ev, "alpha"),
                        Poll::Ready(None) => panic!("alpha's stream ended"),
                        Poll::Pending => std::thread::yield_now(),
                    }
                }
                made += 1;
            }
            made
        })
    };
    // Beta's streams, in a task: each read for up to 120 ms, then dropped.
    let churn_b = {
        let (b, stop) = (b.clone(), stop.clone());
        rt.spawn(async move {
            use futures::StreamExt;
            let mut rng = fastrand::Rng::with_seed(22);
            let mut made = 0u32;
            while !stop.load(Ordering::SeqCst) {
                let mut stream = b.leadership();
                let mut seen = Seen::default();
                let read = async {
                    while let Some(ev) = stream.next().await {
                        seen.check(&ev, "beta");
                    }
                };
                let _ = tokio::time::timeout(ms(rng.u64(..120)), read).await;
                drop(stream);
                made += 1;
            }
            made
        })
    };
    // At least 8 s, and until each has led (alpha's spinning thread can
    // keep beta's runtime from running for a while on a loaded machine),
    // within a minute.
    let started = std::time::Instant::now();
    let (mut led_a, mut led_b, mut samples) = (0u32, 0u32, 0u32);
    while started.elapsed() < 8 * SEC
        || ((led_a == 0 || led_b == 0) && started.elapsed() < 60 * SEC)
    {
        for (name, c, led) in [("alpha", &a, &mut led_a), ("beta", &b, &mut led_b)] {
            let before = c.current_term().map(|t| t.id());
            let left = c.get_remaining_lease();
            let looked = std::time::Instant::now();
            let lock = server.lock(SERVICE, DOMAIN);
            let after = c.current_term().map(|t| t.id());
            let (Some(term), Some(left)) = (before, left) else {
                continue;
            };
            if after != Some(term) {
                continue;
            }
            *led += 1;
            let lock = lock.unwrap_or_else(|| {
                panic!("{name} leads (term {term}, {left:?} left) but the server has no lock")
            });
            assert!(
                lock.owner.starts_with(c.client_id()),
                "{name} leads (term {term}) but {} owns the lock",
                lock.owner
            );
            // Its deadline (read before the look) is before the server's
            // expiry (seen at the look, a little later).
            assert!(
                left < lock.remaining + looked.elapsed() + ms(5),
                "{name} believes {left:?}, the server expires in {:?}",
                lock.remaining
            );
        }
        samples += 1;
        std::thread::sleep(ms(1));
    }
    stop.store(true, Ordering::SeqCst);
    let made_a = churn_a.join().expect("alpha's checks held");
    let made_b = rt.block_on(churn_b).expect("beta's checks held");
    eprintln!(
        "{samples} samples: alpha led in {led_a}, beta in {led_b}; \
         streams made: alpha {made_a}, beta {made_b}; releases {}",
        server.calls(quorum_quest_client::RpcKind::ReleaseLock)
    );
    assert!(
        led_a > 0 && led_b > 0,
        "both must have led for this to attack anything"
    );
    rt.block_on(async {
        let _ = a.shutdown().await;
        let _ = b.shutdown().await;
        server.shutdown().await;
    });
}

/// A waker whose executor runs the woken task at once, and the task asks
/// the client for its current term.
struct ReadsTheTerm {
    client: QuorumQuestClient,
    woken: Mutex<mpsc::Sender<()>>,
}

impl futures::task::ArcWake for ReadsTheTerm {
    fn wake_by_ref(me: &Arc<Self>) {
        let _ = me.client.current_term();
        let _ = me.woken.lock().unwrap().send(());
    }
}

/// The end of a term wakes the tasks waiting on `LeaderTerm::cancelled()`
/// (and its tokens). A wake-up that runs the task at once, which then reads
/// `client.current_term()`, must not find the client's state locked by its
/// own thread. Here the term ends by `release_lock()`.
#[test]
fn a_term_end_wake_up_that_reads_the_client_does_not_deadlock() {
    let rt = multi_thread(2);
    let server = rt.block_on(server());
    let client = rt
        .block_on(over_tcp(&server.url(), 5).build())
        .expect("client builds");
    assert_eq!(rt.block_on(client.try_acquire_lock()).ok(), Some(true));
    let term = client.current_term().expect("leads");
    let (woken_tx, woken) = mpsc::channel();
    let waker = futures::task::waker(Arc::new(ReadsTheTerm {
        client: client.clone(),
        woken: Mutex::new(woken_tx),
    }));
    let mut ended = term.cancelled();
    {
        let _in_runtime = rt.enter();
        let polled = Pin::new(&mut ended).poll(&mut Context::from_waker(&waker));
        assert!(polled.is_pending());
    }
    let releasing = client.clone();
    let (released_tx, released) = mpsc::channel();
    rt.spawn(async move {
        let _ = releasing.release_lock().await;
        let _ = released_tx.send(());
    });
    let woke = woken.recv_timeout(10 * SEC).is_ok();
    let done = woke && released.recv_timeout(10 * SEC).is_ok();
    if !done {
        std::mem::forget((ended, waker, term, client, server, rt));
        panic!("the release never finished (woken: {woke}): the wake-up deadlocked it");
    }
    assert!(!client.is_leader());
    rt.block_on(async {
        let _ = client.shutdown().await;
        server.shutdown().await;
    });
}

/// The same on current-thread runtimes (one per client, each on its own
/// thread), where a leading stream's drop releases in a spawned task that
/// runs only after the next stream has started campaigning again.
#[test]
fn streams_dropped_and_made_again_on_current_thread_runtimes_never_give_two_leaders() {
    let home = multi_thread(1);
    let server = home.block_on(server());
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (clients_tx, clients) = mpsc::channel();
    let churn = |id: &'static str, seed: u64| {
        let (url, stop, clients_tx) = (server.url(), stop.clone(), clients_tx.clone());
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                use futures::StreamExt;
                let client = over_tcp(&url, 1)
                    .client_id(id)
                    .build()
                    .await
                    .expect("client builds");
                let _ = clients_tx.send(client.clone());
                let mut rng = fastrand::Rng::with_seed(seed);
                let mut made = 0u32;
                while !stop.load(Ordering::SeqCst) {
                    let mut stream = client.leadership();
                    let mut seen = Seen::default();
                    let read = async {
                        while let Some(ev) = stream.next().await {
                            seen.check(&ev, id);
                        }
                    };
                    let _ = tokio::time::timeout(ms(rng.u64(..150)), read).await;
                    drop(stream);
                    made += 1;
                    if rng.bool() {
                        tokio::task::yield_now().await;
                    }
                }
                let _ = client.shutdown().await;
                made
            })
        })
    };
    let (churn_a, churn_b) = (churn("alpha", 31), churn("beta", 32));
    let a = clients.recv_timeout(10 * SEC).expect("alpha built");
    let b = clients.recv_timeout(10 * SEC).expect("beta built");
    let end = std::time::Instant::now() + 8 * SEC;
    let (mut led_a, mut led_b) = (0u32, 0u32);
    while std::time::Instant::now() < end {
        for c in [&a, &b] {
            let before = c.current_term().map(|t| t.id());
            let lock = server.lock(SERVICE, DOMAIN);
            let after = c.current_term().map(|t| t.id());
            if before.is_none() || after != before {
                continue;
            }
            let owner = lock.map(|l| l.owner);
            assert!(
                owner
                    .as_deref()
                    .is_some_and(|o| o.starts_with(c.client_id())),
                "{} leads (term {before:?}) but the server's owner is {owner:?}",
                c.client_id()
            );
            if c.client_id() == "alpha" {
                led_a += 1;
            } else {
                led_b += 1;
            }
        }
        std::thread::sleep(ms(1));
    }
    stop.store(true, Ordering::SeqCst);
    let made_a = churn_a.join().expect("alpha's checks held");
    let made_b = churn_b.join().expect("beta's checks held");
    eprintln!(
        "alpha led in {led_a} samples, beta in {led_b}; streams made: {made_a}, {made_b}; \
         releases {}",
        server.calls(quorum_quest_client::RpcKind::ReleaseLock)
    );
    assert!(
        led_a > 0 && led_b > 0,
        "both must have led for this to attack anything"
    );
    home.block_on(server.shutdown());
}

/// An executor's waker that panics (a bug of the application's executor).
struct PanicsOnWake;

impl futures::task::ArcWake for PanicsOnWake {
    fn wake_by_ref(_: &Arc<Self>) {
        panic!("an executor's bug");
    }
}

/// The last stream dropped outside a Tokio runtime while leading steps
/// down locally (no release call). If the term's end panics there (a task
/// waiting on `LeaderTerm::cancelled()` whose waker panics), the panic
/// reaches the drop, but the client must still be able to lead again: a
/// release left "in flight" for ever would keep every later grant from
/// counting.
#[test]
fn a_stream_dropped_outside_a_runtime_whose_term_end_panics_can_lead_again() {
    let rt = multi_thread(2);
    let server = rt.block_on(server());
    let client = rt
        .block_on(over_tcp(&server.url(), 3).build())
        .expect("client builds");
    let mut stream = client.leadership();
    let term = rt.block_on(async {
        match next(&mut stream, 10 * SEC, "Elected").await {
            LeadershipEvent::Elected { term, .. } => term,
            other => panic!("expected Elected, got {other:?}"),
        }
    });
    let mut ended = term.cancelled();
    {
        let _in_runtime = rt.enter();
        let waker = futures::task::waker(Arc::new(PanicsOnWake));
        let polled = Pin::new(&mut ended).poll(&mut Context::from_waker(&waker));
        assert!(polled.is_pending());
    }
    // Outside the runtime.
    let dropped = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| drop(stream)));
    assert!(dropped.is_err(), "the wake-up's panic is not hidden");
    assert!(!client.is_leader());
    assert!(term.is_ended());
    // The lock it still holds on the server is ours: a new acquire renews
    // it, and counts.
    let again = rt.block_on(client.try_acquire_lock());
    assert_eq!(again.ok(), Some(true), "a grant no longer counts");
    rt.block_on(async {
        let _ = client.shutdown().await;
        server.shutdown().await;
    });
}
