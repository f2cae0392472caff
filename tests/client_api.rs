//! The documented imperative API and the callbacks, against a real TestServer.
#![cfg(feature = "testing")]

mod common;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use common::*;
use quorum_quest_client::testing::{FaultProxy, ProxyMode};
use quorum_quest_client::{Callbacks, Error, QuorumQuestClient, RpcKind};
use tokio::time::Instant;

/// Records callbacks in order and checks they never overlap.
#[derive(Default)]
struct Recorder {
    log: Mutex<Vec<&'static str>>,
    inside: AtomicBool,
    overlaps: AtomicUsize,
    delay: Duration,
    panic_on_elected: bool,
}

impl Recorder {
    fn with_delay(delay: Duration) -> Arc<Self> {
        Arc::new(Recorder {
            delay,
            ..Default::default()
        })
    }

    fn log(&self) -> Vec<&'static str> {
        self.log.lock().unwrap().clone()
    }

    async fn enter(&self, what: &'static str) {
        if self.inside.swap(true, Ordering::SeqCst) {
            self.overlaps.fetch_add(1, Ordering::SeqCst);
        }
        self.log.lock().unwrap().push(what);
        if !self.delay.is_zero() {
            tokio::time::sleep(self.delay).await;
        }
        self.inside.store(false, Ordering::SeqCst);
    }
}

#[async_trait]
impl Callbacks for Recorder {
    async fn on_leader_elected(&self, is_leader: bool) {
        self.enter(if is_leader { "elected" } else { "follower" })
            .await;
        if is_leader && self.panic_on_elected {
            panic!("callback bug");
        }
    }
    async fn on_leader_lost(&self) {
        self.enter("lost").await;
    }
}

fn assert_send_sync_clone<T: Send + Sync + Clone + 'static>() {}

#[test]
fn the_client_is_clone_send_sync() {
    assert_send_sync_clone::<QuorumQuestClient>();
}

#[tokio::test]
async fn try_acquire_and_release_follow_the_lock() {
    let server = server().await;
    let a = QuorumQuestClient::new(
        "svc",
        "dom",
        10 * SEC,
        server.url(),
        Some("node-a".into()),
        None,
    )
    .await
    .unwrap();
    let b = QuorumQuestClient::new("svc", "dom", 10 * SEC, server.url(), None, None)
        .await
        .unwrap();
    assert_eq!(a.client_id(), "node-a");
    assert_eq!(b.client_id().len(), 36, "a generated UUID");
    assert!(a.try_acquire_lock().await.unwrap());
    assert!(a.is_leader());
    assert!(!b.try_acquire_lock().await.unwrap());
    assert!(!b.is_leader());
    assert_eq!(b.get_remaining_lease(), None);
    // Re-entrant for the owner.
    assert!(a.try_acquire_lock().await.unwrap());
    a.release_lock().await.unwrap();
    assert!(!a.is_leader());
    assert!(server.lock("svc", "dom").is_none());
    // Idempotent and harmless when not leader (b's release must not free a's lock).
    a.release_lock().await.unwrap();
    assert!(a.try_acquire_lock().await.unwrap());
    b.release_lock().await.unwrap();
    assert_eq!(server.lock("svc", "dom").unwrap().owner, "node-a");
}

#[tokio::test(start_paused = true)]
async fn remaining_lease_counts_down_and_leadership_ends_at_the_deadline_without_any_call() {
    let server = server().await;
    let callbacks = Recorder::with_delay(Duration::ZERO);
    let client = in_memory(&server, 10)
        .callbacks(callbacks.clone())
        .build()
        .await
        .unwrap();
    assert!(client.try_acquire_lock().await.unwrap());
    let first = client.get_remaining_lease().unwrap();
    assert!(first <= 9 * SEC && first > ms(8990), "{first:?}");
    tokio::time::sleep(3 * SEC).await;
    let later = client.get_remaining_lease().unwrap();
    assert_eq!(first - later, 3 * SEC, "counts down on the monotonic clock");
    // No keep-alive and a hung server: nothing returns, yet leadership ends on time.
    server.pause();
    tokio::time::sleep(later - ms(1)).await;
    assert!(client.is_leader());
    tokio::time::sleep(ms(2)).await;
    assert!(!client.is_leader());
    assert_eq!(client.get_remaining_lease(), None);
    eventually(SEC, "on_leader_lost at the deadline", || {
        callbacks.log() == ["elected", "lost"]
    })
    .await;
    server.resume();
}

#[tokio::test(start_paused = true)]
async fn keep_alive_keeps_the_lock_and_cannot_run_twice() {
    let server = server().await;
    let client = in_memory(&server, 3).build().await.unwrap();
    assert!(client.try_acquire_lock().await.unwrap());
    client.start_keep_alive().await.unwrap();
    assert!(client.is_keep_alive_running());
    assert!(matches!(
        client.start_keep_alive().await,
        Err(Error::KeepAliveAlreadyRunning)
    ));
    tokio::time::sleep(60 * SEC).await;
    assert!(client.is_leader());
    assert!(server.calls(RpcKind::KeepAlive) >= 55);
    client.stop_keep_alive().await;
    assert!(!client.is_keep_alive_running());
    // Stopped: the lease runs out by itself (ttl 3 s less the 300 ms margin).
    let calls = server.calls(RpcKind::KeepAlive);
    tokio::time::sleep(3 * SEC).await;
    assert!(!client.is_leader());
    assert_eq!(server.calls(RpcKind::KeepAlive), calls);
    // And it can be started again.
    client.start_keep_alive().await.unwrap();
    eventually(5 * SEC, "leader again", || client.is_leader()).await;
}

#[tokio::test(start_paused = true)]
async fn keep_alive_on_a_follower_campaigns_and_callbacks_report_each_change_once() {
    let server = server().await;
    server.set_owner(SERVICE, DOMAIN, "other", 5 * SEC);
    let callbacks = Recorder::with_delay(ms(5));
    let client = in_memory(&server, 3)
        .callbacks(callbacks.clone())
        .build()
        .await
        .unwrap();
    assert!(!client.try_acquire_lock().await.unwrap());
    client.start_keep_alive().await.unwrap();
    eventually(10 * SEC, "won once the other lock expired", || {
        client.is_leader()
    })
    .await;
    // Another node takes over: loss, then follower, then leader again.
    server.set_owner(SERVICE, DOMAIN, "other", 5 * SEC);
    eventually(5 * SEC, "lost", || !client.is_leader()).await;
    eventually(10 * SEC, "leader again", || client.is_leader()).await;
    client.release_lock().await.unwrap();
    eventually(SEC, "callbacks delivered", || callbacks.log().len() == 6).await;
    assert_eq!(
        callbacks.log(),
        ["follower", "elected", "lost", "follower", "elected", "lost"]
    );
    assert_eq!(callbacks.overlaps.load(Ordering::SeqCst), 0);
}

#[tokio::test(start_paused = true)]
async fn a_panicking_callback_is_contained_and_keep_alive_goes_on() {
    let server = server().await;
    let callbacks = Arc::new(Recorder {
        panic_on_elected: true,
        ..Default::default()
    });
    let client = in_memory(&server, 3)
        .callbacks(callbacks.clone())
        .build()
        .await
        .unwrap();
    client.start_keep_alive().await.unwrap();
    eventually(5 * SEC, "leader", || client.is_leader()).await;
    tokio::time::sleep(10 * SEC).await;
    assert!(client.is_leader(), "keep-alive survived the panic");
    client.release_lock().await.unwrap();
    eventually(SEC, "lost delivered after the panic", || {
        callbacks.log() == ["elected", "lost"]
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callbacks_stay_ordered_and_serial_over_1000_cycles() {
    let server = server().await;
    let callbacks = Recorder::with_delay(ms(2));
    let client = over_tcp(&server.url(), 10)
        .callbacks(callbacks.clone())
        .build()
        .await
        .unwrap();
    let started = Instant::now();
    for _ in 0..1000 {
        assert!(client.try_acquire_lock().await.unwrap());
        client.release_lock().await.unwrap();
    }
    let cycles = started.elapsed();
    eventually(60 * SEC, "all 2000 callbacks delivered", || {
        callbacks.log().len() == 2000
    })
    .await;
    let log = callbacks.log();
    for (i, pair) in log.chunks(2).enumerate() {
        assert_eq!(pair, ["elected", "lost"], "cycle {i}");
    }
    assert_eq!(
        callbacks.overlaps.load(Ordering::SeqCst),
        0,
        "callbacks never overlap"
    );
    eprintln!(
        "1000 acquire/release cycles in {cycles:?}; callbacks drained in {:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_keep_alive_returns_promptly_during_a_partition() {
    let server = server().await;
    let proxy = FaultProxy::start(server.addr()).await.unwrap();
    let client = over_tcp(&proxy.url(), 3).build().await.unwrap();
    assert!(client.try_acquire_lock().await.unwrap());
    client.start_keep_alive().await.unwrap();
    proxy.set_mode(ProxyMode::Blackhole);
    // Let a renewal get stuck in the partition (renew interval 1 s).
    let calls = server.calls(RpcKind::KeepAlive);
    tokio::time::sleep(ms(1500)).await;
    assert_eq!(
        server.calls(RpcKind::KeepAlive),
        calls,
        "nothing gets through the partition"
    );
    let started = Instant::now();
    client.stop_keep_alive().await;
    let took = started.elapsed();
    eprintln!("stop_keep_alive during a partition took {took:?}");
    assert!(took < SEC, "took {took:?}");
    assert!(!client.is_keep_alive_running());
    proxy.set_mode(ProxyMode::Pass);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_last_handle_while_leader_releases_the_lock() {
    let server = server().await;
    let client = over_tcp(&server.url(), 30).build().await.unwrap();
    let clone = client.clone();
    assert!(client.try_acquire_lock().await.unwrap());
    client.start_keep_alive().await.unwrap();
    drop(client);
    tokio::time::sleep(ms(200)).await;
    assert!(
        server.lock(SERVICE, DOMAIN).is_some(),
        "a clone still holds it"
    );
    drop(clone);
    // On a multi-thread runtime the drop waits for the release.
    assert!(
        server.lock(SERVICE, DOMAIN).is_none(),
        "released before the drop returned"
    );
}

#[tokio::test]
async fn bad_input_is_rejected_before_any_connection_naming_the_parameter() {
    let server = server().await;
    let url = server.url();
    let cases: Vec<(&str, &str, Duration, String, Option<String>)> = vec![
        ("service", "", 15 * SEC, url.clone(), None),
        ("service", " ", 15 * SEC, url.clone(), None),
        ("domain", "", 15 * SEC, url.clone(), None),
        ("ttl", "d", Duration::ZERO, url.clone(), None),
        ("ttl", "d", ms(500), url.clone(), None),
        ("ttl", "d", ms(1500), url.clone(), None),
        (
            "ttl",
            "d",
            Duration::from_secs(i32::MAX as u64 + 1),
            url.clone(),
            None,
        ),
        ("address", "d", 15 * SEC, String::new(), None),
        ("address", "d", 15 * SEC, "not a url".into(), None),
        (
            "address",
            "d",
            15 * SEC,
            "ftp://localhost:5050".into(),
            None,
        ),
        ("address", "d", 15 * SEC, "localhost".into(), None),
        ("address", "d", 15 * SEC, "localhost:70000".into(), None),
        ("client_id", "d", 15 * SEC, url.clone(), Some(String::new())),
    ];
    for (param, domain, ttl, address, id) in cases {
        let service = if param == "service" { domain } else { "svc" };
        let domain = if param == "service" { "d" } else { domain };
        let err = QuorumQuestClient::new(service, domain, ttl, &address, id, None)
            .await
            .unwrap_err();
        match err {
            Error::InvalidParameter(msg) => {
                assert!(msg.starts_with(&format!("{param}:")), "{param}: {msg}")
            }
            other => panic!("{param}: expected InvalidParameter, got {other:?}"),
        }
    }
    // Builder-only knobs.
    let err = QuorumQuestClient::builder("svc", "dom")
        .address(url.clone())
        .ttl(3 * SEC)
        .renew_interval(3 * SEC)
        .build()
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::InvalidParameter(ref m) if m.starts_with("renew_interval:")),
        "{err}"
    );
    assert_eq!(
        server.connections_accepted(),
        0,
        "no connection was attempted"
    );
    // Bare host:port is accepted.
    let bare = url.trim_start_matches("http://");
    let ok = QuorumQuestClient::new("svc", "dom", 5 * SEC, bare, None, None).await;
    assert!(ok.is_ok(), "{ok:?}");
}

#[tokio::test]
async fn an_unreachable_server_is_a_connection_error_unless_lazy() {
    let started = Instant::now();
    let err = QuorumQuestClient::new("svc", "dom", 5 * SEC, "http://127.0.0.1:1", None, None)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Connection(_)), "{err:?}");
    assert!(err.to_string().contains("connect"), "{err}");
    assert!(started.elapsed() < 10 * SEC);
    let lazy = QuorumQuestClient::builder("svc", "dom")
        .address("http://127.0.0.1:1")
        .lazy_connect()
        .build()
        .await
        .unwrap();
    match lazy.try_acquire_lock().await {
        Err(Error::Rpc(status)) => assert_eq!(status.code(), tonic::Code::Unavailable),
        other => panic!("expected an RPC error, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_a_leader_without_keep_alive_also_releases() {
    let server = server().await;
    let client = over_tcp(&server.url(), 30).build().await.unwrap();
    assert!(client.try_acquire_lock().await.unwrap());
    drop(client);
    assert!(
        server.lock(SERVICE, DOMAIN).is_none(),
        "released before the drop returned"
    );
}

#[tokio::test(start_paused = true)]
async fn shutdown_ends_the_term_releases_and_ends_every_stream_and_the_callbacks() {
    let server = server().await;
    let recorder = Recorder::with_delay(Duration::ZERO);
    let client = in_memory(&server, 30)
        .callbacks(recorder.clone())
        .build()
        .await
        .unwrap();
    let mut stream = client.leadership();
    let term = match next(&mut stream, 5 * SEC, "Elected").await {
        quorum_quest_client::LeadershipEvent::Elected { term, .. } => term,
        other => panic!("expected Elected, got {other:?}"),
    };
    client.start_keep_alive().await.unwrap();

    client.shutdown().await.unwrap();
    assert!(!client.is_leader());
    assert!(!term.is_active());
    assert!(!client.is_keep_alive_running());
    assert!(server.lock(SERVICE, DOMAIN).is_none(), "released");
    // The stream delivers the loss, then ends.
    until(&mut stream, 5 * SEC, "Lost", |ev| ev.is_lost()).await;
    assert!(
        tokio::time::timeout(5 * SEC, futures::StreamExt::next(&mut stream))
            .await
            .expect("the stream ends")
            .is_none()
    );
    eventually(5 * SEC, "the callbacks saw the loss", || {
        recorder.log() == ["elected", "lost"]
    })
    .await;

    // For good: nothing campaigns again, and a second shutdown is harmless.
    assert!(matches!(
        client.try_acquire_lock().await,
        Err(Error::Shutdown)
    ));
    assert!(matches!(
        client.start_keep_alive().await,
        Err(Error::Shutdown)
    ));
    let mut late = client.leadership();
    assert!(futures::StreamExt::next(&mut late).await.is_none());
    client.shutdown().await.unwrap();
    tokio::time::sleep(60 * SEC).await;
    assert!(server.lock(SERVICE, DOMAIN).is_none(), "never re-acquired");
}

#[tokio::test(start_paused = true)]
async fn current_term_is_the_running_term_and_none_after_it() {
    let server = server().await;
    let client = in_memory(&server, 30).build().await.unwrap();
    assert!(client.current_term().is_none());
    assert!(client.try_acquire_lock().await.unwrap());
    let term = client.current_term().expect("leading");
    assert!(term.is_active());
    assert_eq!(term.deadline(), client.current_term().unwrap().deadline());
    client.release_lock().await.unwrap();
    assert!(client.current_term().is_none());
    assert!(!term.is_active());
}

#[test]
fn a_leading_client_dropped_in_a_local_set_or_at_runtime_shutdown_does_not_panic() {
    let server_rt = tokio::runtime::Runtime::new().unwrap();
    let server = server_rt.block_on(server());
    let url = server.url();

    // Inside a LocalSet a drop cannot block (on either runtime flavour): the
    // release goes to the background.
    let current = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    for runtime in [current, tokio::runtime::Runtime::new().unwrap()] {
        runtime.block_on(tokio::task::LocalSet::new().run_until(async {
            let client = over_tcp(&url, 30).build().await.unwrap();
            assert!(client.try_acquire_lock().await.unwrap());
            drop(client);
            eventually(5 * SEC, "released in the background", || {
                server.lock(SERVICE, DOMAIN).is_none()
            })
            .await;
        }));
    }

    // A task that holds a leading client is dropped when its multi-thread
    // runtime shuts down: no panic, no abort.
    let client_rt = tokio::runtime::Runtime::new().unwrap();
    client_rt.block_on(async {
        let client = over_tcp(&url, 30).build().await.unwrap();
        assert!(client.try_acquire_lock().await.unwrap());
        tokio::spawn(async move {
            let _held = client;
            std::future::pending::<()>().await;
        });
    });
    // Nothing drives the connection any more: the drop must not wait for it.
    let start = std::time::Instant::now();
    drop(client_rt);
    assert!(
        start.elapsed() < 3 * SEC,
        "the runtime took {:?} to shut down",
        start.elapsed()
    );
}

#[tokio::test(start_paused = true)]
async fn keep_alive_started_right_after_acquiring_waits_for_the_renew_interval() {
    let server = server().await;
    let client = in_memory(&server, 15).build().await.unwrap();
    assert!(client.try_acquire_lock().await.unwrap());
    // The grant was confirmed by one KeepAlive; starting the keep-alive task
    // must not send another a few milliseconds later.
    assert_eq!(server.calls(RpcKind::KeepAlive), 1);
    client.start_keep_alive().await.unwrap();
    tokio::time::sleep(4 * SEC).await;
    assert_eq!(
        server.calls(RpcKind::KeepAlive),
        1,
        "no renewal before the renew interval (5 s)"
    );
    tokio::time::sleep(2 * SEC).await;
    assert_eq!(server.calls(RpcKind::KeepAlive), 2, "renewed at 5 s");
    client.shutdown().await.unwrap();
}

// ----- secrets: errors end up in logs, so they never quote one -----

/// A bad metadata value (a token with a trailing newline read from a file,
/// the classic mistake) must not be quoted back in the error: the docs say
/// values never appear in `Debug` output or logs, and this error is what
/// gets logged.
#[tokio::test]
async fn a_bad_metadata_value_is_not_quoted_in_the_error() {
    for key in ["authorization", "x-api-key"] {
        let err = QuorumQuestClient::builder(SERVICE, DOMAIN)
            .address("http://127.0.0.1:1")
            .lazy_connect()
            .metadata(key, "Bearer s3cr3t-token\n")
            .build()
            .await
            .expect_err("a newline is not a valid header value");
        for shown in [err.to_string(), format!("{err:?}")] {
            assert!(
                !shown.contains("s3cr3t"),
                "{key}: the value leaked: {shown}"
            );
            assert!(
                shown.contains("metadata"),
                "{key}: the knob is named: {shown}"
            );
        }
    }
}

/// Credentials in the address (`http://user:password@host`) are never sent
/// by gRPC; they must be refused up front without being quoted, not
/// silently ignored and then printed in every connection error.
#[tokio::test]
async fn credentials_in_the_address_are_refused_without_quoting_them() {
    let err = QuorumQuestClient::builder(SERVICE, DOMAIN)
        .address("http://admin:hunter2@127.0.0.1:1")
        .build()
        .await
        .expect_err("nothing listens on port 1, and the address has credentials");
    for shown in [err.to_string(), format!("{err:?}")] {
        assert!(!shown.contains("hunter2"), "the password leaked: {shown}");
    }
    assert!(
        matches!(err, quorum_quest_client::Error::InvalidParameter(_)),
        "{err:?}"
    );
}
