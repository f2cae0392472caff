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
