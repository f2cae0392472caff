//! The imperative API used concurrently from many tasks, while the server
//! misbehaves and a second client contends: never two leaders, and a client
//! that says it leads owns the server's lock with a later expiry.
#![cfg(feature = "testing")]

mod common;

use std::time::Duration;

use common::*;
use quorum_quest_client::LeadershipEvent;
use quorum_quest_client::RpcKind;
use tokio::time::Instant;

/// Many tasks hammer one client's imperative API (try_acquire_lock,
/// release_lock, start/stop_keep_alive, streams created and dropped) while
/// the server injects latency, failures and late refusals, and a second
/// client contends. Checked every few ms: never two leaders, and a client
/// that says it leads is the server's owner with a longer expiry.
#[tokio::test(start_paused = true)]
async fn concurrent_imperative_use_never_gives_two_leaders() {
    use futures::StreamExt;
    for seed in 0..20u64 {
        let server = server().await;
        let a = in_memory(&server, 3)
            .client_id("node-a")
            .build()
            .await
            .unwrap();
        let b = in_memory(&server, 3)
            .client_id("node-b")
            .build()
            .await
            .unwrap();
        let mut b_stream = b.leadership();
        let b_drain = tokio::spawn(async move { while b_stream.next().await.is_some() {} });
        let stop = tokio_util::sync::CancellationToken::new();
        let mut workers = Vec::new();
        for w in 0..4u64 {
            let a = a.clone();
            let server = server.clone();
            let stop = stop.clone();
            workers.push(tokio::spawn(async move {
                let mut rng = fastrand::Rng::with_seed(seed * 100 + w);
                let mut streams = Vec::new();
                while !stop.is_cancelled() {
                    match rng.u8(0..10) {
                        0..=2 => {
                            let _ = a.try_acquire_lock().await;
                        }
                        3 => {
                            let _ = a.release_lock().await;
                        }
                        4 => {
                            let _ = a.start_keep_alive().await;
                        }
                        5 => a.stop_keep_alive().await,
                        6 => {
                            let mut s = (a.leadership(), None::<u64>);
                            check_alternation(&mut s, seed);
                            streams.push(s);
                        }
                        7 => {
                            if let Some(mut s) = streams.pop() {
                                check_alternation(&mut s, seed);
                            }
                        }
                        8 => server.set_latency(ms(rng.u64(0..1500))),
                        _ => match rng.u8(0..3) {
                            0 => server.fail_next(1, None, tonic::Status::unavailable("injected")),
                            1 => server.set_refusal_delay(ms(rng.u64(0..2000))),
                            _ => server.set_latency(Duration::ZERO),
                        },
                    }
                    for s in streams.iter_mut() {
                        check_alternation(s, seed);
                    }
                    tokio::time::sleep(ms(rng.u64(0..400))).await;
                }
            }));
        }
        let end = Instant::now() + 60 * SEC;
        let (mut led_a, mut led_b) = (0u32, 0u32);
        while Instant::now() < end {
            tokio::time::sleep(ms(7)).await;
            led_a += u32::from(a.is_leader());
            led_b += u32::from(b.is_leader());
            let lock = server.lock(SERVICE, DOMAIN);
            for (name, c) in [("a", &a), ("b", &b)] {
                if let Some(left) = c.get_remaining_lease() {
                    let lock = lock.as_ref().unwrap_or_else(|| {
                        panic!(
                            "seed {seed}: {name} leads ({left:?} left) but the server has no lock"
                        )
                    });
                    assert!(
                        lock.owner.starts_with(c.client_id()),
                        "seed {seed}: {name} leads ({left:?} left) but {} owns the lock",
                        lock.owner
                    );
                    assert!(
                        left < lock.remaining,
                        "seed {seed}: {name} believes {left:?}, server expires in {:?}",
                        lock.remaining
                    );
                }
            }
            assert!(
                !(a.is_leader() && b.is_leader()),
                "seed {seed}: two leaders"
            );
        }
        eprintln!(
            "seed {seed}: a led {led_a} samples, b led {led_b}, releases {}",
            server.calls(RpcKind::ReleaseLock)
        );
        stop.cancel();
        for w in workers {
            w.await.unwrap();
        }
        b_drain.abort();
    }
}

/// Drains what a stream has ready and checks strict Elected/Lost alternation.
fn check_alternation(s: &mut (quorum_quest_client::Leadership, Option<u64>), seed: u64) {
    use futures::{FutureExt, StreamExt};
    while let Some(Some(ev)) = s.0.next().now_or_never() {
        match ev {
            LeadershipEvent::Elected { term, .. } => {
                assert!(
                    s.1.is_none(),
                    "seed {seed}: Elected {} while in term {:?}",
                    term.id(),
                    s.1
                );
                s.1 = Some(term.id());
            }
            LeadershipEvent::Lost { term, .. } => {
                assert_eq!(
                    s.1,
                    Some(term.id()),
                    "seed {seed}: Lost of term {}",
                    term.id()
                );
                s.1 = None;
            }
            _ => {}
        }
    }
}
