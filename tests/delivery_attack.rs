//! Attacks on how events reach their consumers (`src/fanout.rs`, the hub
//! of `src/election/mod.rs`): consumers whose executor, or whose own code,
//! runs while an event is being handed out; streams created, polled and
//! dropped on other threads while the lease is renewed and lost.

mod common;

use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::task::{Context, Poll};

use common::*;
use futures::Stream;
use quorum_quest_client::{LeadershipEvent, QuorumQuestClient};

fn multi_thread(workers: usize) -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()
        .unwrap()
}

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
