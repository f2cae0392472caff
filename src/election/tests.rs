//! Session tests that need crate internals: a campaign that panics.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::timeout;

use super::Session;
use crate::config::{Scope, TimingOverrides};
use crate::event::{LeadershipEvent, LossReason};
use crate::rpc::Rpc;
use crate::testing::TestServer;
use crate::transport::Transport;

async fn next(events: &mut crate::fanout::EventReceiver) -> Option<LeadershipEvent> {
    timeout(Duration::from_secs(30), events.recv())
        .await
        .ok()
        .flatten()
}

async fn session(server: &TestServer) -> Arc<Session> {
    let ttl = Duration::from_secs(3);
    let scope = Scope::new("svc".into(), "dom".into(), None, ttl).unwrap();
    let timing = TimingOverrides::default().resolve(ttl).unwrap();
    let transport = Arc::new(Transport::from_channel(server.in_memory_channel()));
    Session::new(
        Rpc::new(transport, Arc::new(scope)).unwrap(),
        timing,
        Some(1),
    )
}

/// A two-worker runtime of the test's own (for tests that drive it from
/// plain threads), a TestServer on it, and a session on that server.
fn session_on_own_runtime() -> (tokio::runtime::Runtime, TestServer, Arc<Session>) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let server = rt.block_on(TestServer::start()).unwrap();
    let session = rt.block_on(session(&server));
    (rt, server, session)
}

#[tokio::test(start_paused = true)]
async fn a_campaign_that_panics_ends_the_term_and_campaigns_again() {
    let server = TestServer::start().await.unwrap();
    let session = session(&server).await;
    let mut events = session.subscribe();
    session.start_keep_alive().unwrap();
    let Some(LeadershipEvent::Elected { term, .. }) = next(&mut events).await else {
        panic!("expected Elected");
    };
    session.inject_panic.store(true, Ordering::SeqCst);
    // The panic happens at the campaign's next step (its next renewal).
    loop {
        match next(&mut events).await {
            Some(LeadershipEvent::Lost { reason, .. }) => {
                assert_eq!(reason, LossReason::Failed);
                break;
            }
            Some(LeadershipEvent::Renewed { .. } | LeadershipEvent::RpcFailed { .. }) => {}
            other => panic!("expected Lost {{ Failed }}, got {other:?}"),
        }
    }
    assert!(term.is_ended());
    assert!(session.keep_alive_running());
    // The campaign restarted by itself and leads again (the lock is still ours).
    loop {
        match next(&mut events).await {
            Some(LeadershipEvent::Elected { .. }) => break,
            Some(LeadershipEvent::Follower | LeadershipEvent::RpcFailed { .. }) => {}
            other => panic!("expected a new term, got {other:?}"),
        }
    }
    assert!(session.is_leader());
    session.stop_keep_alive().await;
}

/// A follower's campaign that panics (at its next attempt) restarts after
/// its pause and keeps asking: no `Lost` (it never led), a stop during the
/// pause returns at once, and a start after it wins the lock once it is
/// free.
#[tokio::test(start_paused = true)]
async fn a_follower_campaign_that_panics_keeps_asking_and_stops_at_once() {
    let server = TestServer::start().await.unwrap();
    server.set_owner("svc", "dom", "someone-else", Duration::from_secs(3600));
    let session = session(&server).await;
    let mut events = session.subscribe();
    session.start_keep_alive().unwrap();
    assert!(matches!(
        next(&mut events).await,
        Some(LeadershipEvent::Follower)
    ));
    session.inject_panic.store(true, Ordering::SeqCst);
    // The hook is taken at the campaign's next step: it is then in its
    // restart pause.
    let until = tokio::time::Instant::now() + Duration::from_secs(30);
    while session.inject_panic.load(Ordering::SeqCst) {
        assert!(tokio::time::Instant::now() < until, "no next step");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(session.keep_alive_running());
    let stopping = std::time::Instant::now();
    let paused = tokio::time::Instant::now();
    session.stop_keep_alive().await;
    assert!(
        paused.elapsed() < Duration::from_millis(100),
        "the stop waited {:?} (paused time), {:?} real",
        paused.elapsed(),
        stopping.elapsed()
    );
    session.start_keep_alive().unwrap();
    server.force_expire("svc", "dom");
    loop {
        match next(&mut events).await {
            Some(LeadershipEvent::Elected { .. }) => break,
            Some(LeadershipEvent::Follower | LeadershipEvent::RpcFailed { .. }) => {}
            other => panic!("expected Elected, got {other:?}"),
        }
    }
    session.stop_keep_alive().await;
}

/// Observations applied on several threads at once (the driver's calls and
/// timer, the application's own calls) reach every subscriber in the order
/// they were applied: each sees terms begin and end in alternation, two
/// subscribers see the same sequence, and one that joins midway starts from
/// its snapshot and sees the same sequence from there on.
#[test]
fn events_applied_on_many_threads_reach_every_subscriber_in_one_order() {
    use crate::state::Observation;

    let (rt, server, session) = session_on_own_runtime();
    let mut first = session.subscribe();
    let mut second = session.subscribe();
    let lease = Duration::from_secs(3);
    // How many terms each part of the run needs: a grant counts only if no
    // other thread's release fenced it meanwhile, so how many rounds that
    // takes depends on the scheduling (fewer terms on a busy machine): the
    // threads run until the terms are there, within a generous cap.
    const TERMS: usize = 200;
    const MAX_ROUNDS: usize = 250_000;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let session = session.clone();
            let handle = rt.handle().clone();
            let stop = stop.clone();
            std::thread::spawn(move || {
                let _runtime = handle.enter();
                for _ in 0..MAX_ROUNDS {
                    if stop.load(Ordering::Relaxed) {
                        return;
                    }
                    let incarnation = session.shared().election.incarnation();
                    let sent_at = tokio::time::Instant::now();
                    for obs in [
                        Observation::Granted {
                            sent_at,
                            incarnation,
                        },
                        Observation::Renewed {
                            sent_at,
                            incarnation,
                            lease,
                        },
                        Observation::ReleaseStarted,
                        Observation::ReleaseDone {
                            at: tokio::time::Instant::now(),
                            incarnation,
                            settled: true,
                            acquires_before: 0,
                        },
                    ] {
                        let applied = session.observe(obs);
                        // Preempted between applying and delivering.
                        std::thread::yield_now();
                        applied.deliver();
                    }
                }
            })
        })
        .collect();
    let transitions = |rx: &mut crate::fanout::EventReceiver, out: &mut Vec<(char, u64)>| {
        let mut cx = std::task::Context::from_waker(futures::task::noop_waker_ref());
        while let std::task::Poll::Ready(Some(ev)) = rx.poll_recv(&mut cx) {
            match ev {
                LeadershipEvent::Elected { term, .. } => out.push(('E', term.id())),
                LeadershipEvent::Lost { term, .. } => out.push(('L', term.id())),
                _ => {}
            }
        }
    };
    let elected = |seen: &[(char, u64)]| seen.iter().filter(|(k, _)| *k == 'E').count();
    // Read while the threads run, until `need` terms began; `false` if the
    // threads ran out of rounds first.
    let read_until = |rx: &mut crate::fanout::EventReceiver,
                      seen: &mut Vec<(char, u64)>,
                      need: usize,
                      threads: &[std::thread::JoinHandle<()>]| {
        loop {
            transitions(rx, seen);
            if elected(seen) >= need {
                return true;
            }
            if threads.iter().all(std::thread::JoinHandle::is_finished) {
                transitions(rx, seen);
                return elected(seen) >= need;
            }
            std::thread::yield_now();
        }
    };
    let mut first_seen = Vec::new();
    assert!(
        read_until(&mut first, &mut first_seen, TERMS, &threads),
        "only {} terms in {MAX_ROUNDS} rounds per thread",
        elected(&first_seen)
    );
    // Joins while the threads run, and they go on for as many terms again.
    let mut late = session.subscribe();
    assert!(
        read_until(&mut first, &mut first_seen, 2 * TERMS, &threads),
        "only {} terms in {MAX_ROUNDS} rounds per thread",
        elected(&first_seen)
    );
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        t.join().unwrap();
    }
    transitions(&mut first, &mut first_seen);
    let (mut second_seen, mut late_seen) = (Vec::new(), Vec::new());
    transitions(&mut second, &mut second_seen);
    transitions(&mut late, &mut late_seen);
    let (first, second, late) = (first_seen, second_seen, late_seen);
    // Alternation: Elected(n), Lost(n), Elected(m > n), ...
    let mut leading: Option<u64> = None;
    let mut last = 0;
    for &(kind, id) in &first {
        match (kind, leading) {
            ('E', None) if id > last => leading = Some(id),
            ('L', Some(current)) if current == id => {
                leading = None;
                last = id;
            }
            _ => panic!("{kind}{id} after {leading:?} (last term {last}): out of order"),
        }
    }
    assert_eq!(first, second, "two subscribers saw different sequences");
    // The late one starts with its snapshot (an `Elected` for a running
    // term, or nothing), then sees exactly what the others saw after it.
    let start = first
        .iter()
        .position(|e| Some(e) == late.first())
        .unwrap_or_else(|| panic!("{:?} never seen by the others", late.first()));
    assert_eq!(late, first[start..], "the late subscriber diverged");
    rt.block_on(server.shutdown());
}

/// `observe_with`'s reading closure runs after the observation was applied
/// to the state machine. If it panicked before the lease was published and
/// the events numbered, the term would have ended in the state machine
/// while `is_leader()` still read the old deadline, and its `Lost` would be
/// gone for good (a subscriber would see `Elected` and never its `Lost`).
#[tokio::test(start_paused = true)]
async fn a_panic_reading_the_state_after_an_observation_loses_nothing() {
    let server = TestServer::start().await.unwrap();
    let session = session(&server).await;
    let wait = crate::admission::Wait::Unbounded;
    let answer = session.try_acquire(wait).await;
    assert!(matches!(answer.result, Ok(true)), "{:?}", answer.result);
    // The keep-alive that confirms the grant makes the client leader.
    let confirm = session.keep_alive(session.timing.rpc_timeout, wait).await;
    assert!(confirm.result.is_ok(), "{:?}", confirm.result);
    assert!(session.is_leader());
    let mut events = session.subscribe();
    assert!(matches!(
        next(&mut events).await,
        Some(LeadershipEvent::Elected { .. })
    ));
    let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let (applied, ()) = session.observe_with(crate::state::Observation::ReleaseStarted, |_| {
            panic!("a bug while reading the state")
        });
        applied.deliver();
    }));
    assert!(panicked.is_err());
    assert!(
        !session.is_leader(),
        "the state machine released, the published lease did not"
    );
    assert!(matches!(
        next(&mut events).await,
        Some(LeadershipEvent::Lost {
            reason: LossReason::Released,
            ..
        })
    ));
}

/// A session of `server` that leads (its grant confirmed by a keep-alive),
/// with a subscriber that has read its `Elected`, and the term.
async fn leading(
    server: &TestServer,
) -> (
    Arc<Session>,
    crate::fanout::EventReceiver,
    crate::event::LeaderTerm,
) {
    let session = session(server).await;
    let wait = crate::admission::Wait::Unbounded;
    let answer = session.try_acquire(wait).await;
    assert!(matches!(answer.result, Ok(true)), "{:?}", answer.result);
    let confirm = session.keep_alive(session.timing.rpc_timeout, wait).await;
    assert!(confirm.result.is_ok(), "{:?}", confirm.result);
    let mut events = session.subscribe();
    let Some(LeadershipEvent::Elected { term, .. }) = next(&mut events).await else {
        panic!("expected Elected");
    };
    (session, events, term)
}

/// An executor's waker that panics (a bug of the application's executor).
struct PanicsOnWake;

impl futures::task::ArcWake for PanicsOnWake {
    fn wake_by_ref(_: &Arc<Self>) {
        panic!("an executor's bug");
    }
}

/// A waker that records that it ran, and whether the session's state lock
/// was held (by anyone, this thread included) when it did: an executor that
/// runs the woken task at once, and the task reads the client, would then
/// deadlock.
struct Probe {
    session: std::sync::Weak<Session>,
    woken: std::sync::atomic::AtomicBool,
    under_state_lock: std::sync::atomic::AtomicBool,
}

impl Probe {
    fn new(session: &Arc<Session>) -> Arc<Self> {
        Arc::new(Probe {
            session: Arc::downgrade(session),
            woken: Default::default(),
            under_state_lock: Default::default(),
        })
    }
}

impl futures::task::ArcWake for Probe {
    fn wake_by_ref(me: &Arc<Self>) {
        me.woken.store(true, Ordering::SeqCst);
        if let Some(session) = me.session.upgrade() {
            // Poisoned (a panic while it was held) is not held.
            if matches!(
                session.shared.try_lock(),
                Err(std::sync::TryLockError::WouldBlock)
            ) {
                me.under_state_lock.store(true, Ordering::SeqCst);
            }
        }
    }
}

/// Polls `fut` once with `waker`; it must wait.
fn poll_pending<F: std::future::Future + Unpin>(fut: &mut F, waker: &std::task::Waker) {
    let polled = std::pin::Pin::new(fut).poll(&mut std::task::Context::from_waker(waker));
    assert!(polled.is_pending(), "already complete");
}

/// The end of a term wakes the tasks waiting on its tokens and on
/// `cancelled()` (the `LeaseWake` the `Applied` runs as it drops). One
/// waker that panics there must neither cost the subscribers the batch
/// (the `Lost`) and every later one (a batch never handed out parks every
/// later one for ever), nor the other waiters of the term their wake-up
/// (a `cancelled()` that then fires only at the old deadline, long after
/// the `Lost`).
#[tokio::test(start_paused = true)]
async fn a_panicking_term_end_wake_up_loses_no_event_and_wakes_the_other_waiters() {
    let server = TestServer::start().await.unwrap();
    let (session, mut events, term) = leading(&server).await;
    let token = term.token();
    let mut token_ended = Box::pin(token.cancelled());
    poll_pending(
        &mut token_ended,
        &futures::task::waker(Arc::new(PanicsOnWake)),
    );
    let probe = Probe::new(&session);
    let mut ended = term.cancelled();
    poll_pending(&mut ended, &futures::task::waker(probe.clone()));
    // `release_lock()`: the term ends (its wake-ups run) and its `Lost` is
    // handed out before the request leaves.
    let released =
        futures::FutureExt::catch_unwind(std::panic::AssertUnwindSafe(session.release())).await;
    assert!(released.is_err(), "the wake-up's panic is not hidden");
    assert!(
        probe.woken.load(Ordering::SeqCst),
        "the term's cancelled() was not woken when it ended"
    );
    assert!(matches!(
        next(&mut events).await,
        Some(LeadershipEvent::Lost {
            reason: LossReason::Released,
            ..
        })
    ));
    // The release still went out (the lock is free at once), and is over:
    // the state is not left "releasing" for ever (no grant would ever
    // count again). The client leads again, and the subscriber sees that
    // term too.
    assert!(
        server.lock("svc", "dom").is_none(),
        "the lock was not released"
    );
    let wait = crate::admission::Wait::Unbounded;
    assert!(matches!(session.try_acquire(wait).await.result, Ok(true)));
    let confirm = session.keep_alive(session.timing.rpc_timeout, wait).await;
    assert!(confirm.result.is_ok(), "{:?}", confirm.result);
    assert!(session.is_leader(), "a grant no longer counts");
    loop {
        match next(&mut events).await {
            Some(LeadershipEvent::Elected { term: again, .. }) => {
                assert!(again.id() > term.id());
                break;
            }
            Some(LeadershipEvent::Follower | LeadershipEvent::RpcFailed { .. }) => {}
            other => panic!("expected the next term, got {other:?}"),
        }
    }
}

/// `observe_with`'s reading closure panics while the state lock is held.
/// The `Applied` then drops during the unwinding: its wake-ups (the ended
/// term's `cancelled()`, the subscribers' wakers) and the hand-out's hook
/// must still run outside the state lock, as they do without the panic: a
/// woken task run at once that reads the client would deadlock.
#[tokio::test(start_paused = true)]
async fn a_panic_reading_the_state_wakes_nobody_under_the_state_lock() {
    let server = TestServer::start().await.unwrap();
    let (session, mut events, term) = leading(&server).await;
    let term_probe = Probe::new(&session);
    let mut ended = term.cancelled();
    poll_pending(&mut ended, &futures::task::waker(term_probe.clone()));
    let stream_probe = Probe::new(&session);
    let stream_waker = futures::task::waker(stream_probe.clone());
    assert!(events
        .poll_recv(&mut std::task::Context::from_waker(&stream_waker))
        .is_pending());
    let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let (applied, ()) = session.observe_with(crate::state::Observation::ReleaseStarted, |_| {
            panic!("a bug while reading the state")
        });
        applied.deliver();
    }));
    assert!(panicked.is_err());
    for (what, probe) in [("cancelled()", &term_probe), ("the stream", &stream_probe)] {
        assert!(probe.woken.load(Ordering::SeqCst), "{what} was not woken");
        assert!(
            !probe.under_state_lock.load(Ordering::SeqCst),
            "{what} was woken under the state lock"
        );
    }
    assert!(matches!(
        next(&mut events).await,
        Some(LeadershipEvent::Lost { .. })
    ));
}

/// A renewal answered just before the deadline and published just after
/// it: a reader in between must not see the term end and then go on (its
/// `cancelled()` would have fired for a term the client still leads, with
/// no `Lost`).
#[test]
fn a_term_renewed_just_before_its_deadline_never_looks_ended_in_between() {
    use crate::state::Observation;

    let (rt, _server, session) = session_on_own_runtime();
    let _runtime = rt.enter();
    let mut events = session.subscribe();
    let lease = Duration::from_secs(3);
    let margin = session.timing.safety_margin;
    let incarnation = session.shared().election.incarnation();
    // A term whose deadline is 200 ms away.
    let sent_at = tokio::time::Instant::now() - (lease - margin) + Duration::from_millis(200);
    session
        .observe(Observation::Granted {
            sent_at,
            incarnation,
        })
        .deliver();
    session
        .observe(Observation::Renewed {
            sent_at,
            incarnation,
            lease,
        })
        .deliver();
    let cx = &mut std::task::Context::from_waker(futures::task::noop_waker_ref());
    let term = loop {
        match events.poll_recv(cx) {
            std::task::Poll::Ready(Some(LeadershipEvent::Elected { term, .. })) => break term,
            std::task::Poll::Ready(Some(_)) => {}
            other => panic!("expected Elected, got {other:?}"),
        }
    };
    let deadline = term.deadline().expect("a deadline");
    // The renewal is applied before the deadline; the hook then waits until
    // the deadline has passed and asks, from another thread, whether the
    // term is still on, before the renewal is published.
    let (seen_tx, seen) = std::sync::mpsc::channel();
    let reader = term.clone();
    *crate::sync::lock(&session.before_publish) = Some(super::TestHook(Box::new(move || {
        let past = deadline + Duration::from_millis(20);
        while tokio::time::Instant::now() < past {
            std::thread::sleep(Duration::from_millis(5));
        }
        std::thread::spawn(move || {
            let _ = seen_tx.send(reader.is_active());
        });
        // Long enough for an unblocked reader to answer.
        std::thread::sleep(Duration::from_millis(100));
    })));
    session
        .observe(Observation::Renewed {
            sent_at: tokio::time::Instant::now(),
            incarnation,
            lease,
        })
        .deliver();
    let active_then = seen
        .recv_timeout(Duration::from_secs(10))
        .expect("the reader answered");
    assert!(term.is_active(), "the renewal counted: the term goes on");
    assert!(
        active_then,
        "a reader saw the term ended while its renewal was being applied, then saw it go on"
    );
}
