//! Resources stay bounded: no task or queue is left behind per call.
#![cfg(feature = "testing")]

mod common;

use common::*;
use quorum_quest_client::LeadershipEvent;

/// Live heap bytes, to measure leaks without depending on RSS.
struct Counting;
static LIVE: std::sync::atomic::AtomicIsize = std::sync::atomic::AtomicIsize::new(0);
unsafe impl std::alloc::GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: std::alloc::Layout) -> *mut u8 {
        LIVE.fetch_add(l.size() as isize, std::sync::atomic::Ordering::Relaxed);
        std::alloc::System.alloc(l)
    }
    unsafe fn dealloc(&self, p: *mut u8, l: std::alloc::Layout) {
        LIVE.fetch_sub(l.size() as isize, std::sync::atomic::Ordering::Relaxed);
        std::alloc::System.dealloc(p, l)
    }
}
#[global_allocator]
static GLOBAL: Counting = Counting;

/// Each `token()` spawns a watcher task that lives until the *term* ends,
/// not until the token is dropped. Leader work that takes a token per request
/// during a long, steady term accumulates one live task per call.
#[tokio::test(start_paused = true)]
async fn term_tokens_that_were_dropped_leave_no_tasks_behind() {
    let server = server().await;
    let client = in_memory(&server, 10).build().await.unwrap();
    let mut stream = client.leadership();
    let LeadershipEvent::Elected { term, .. } = next(&mut stream, 5 * SEC, "Elected").await else {
        panic!("expected Elected");
    };
    let metrics = tokio::runtime::Handle::current().metrics();
    tokio::time::sleep(ms(10)).await;
    let before = metrics.num_alive_tasks();
    for _ in 0..10_000 {
        drop(term.token());
    }
    tokio::time::sleep(ms(100)).await;
    let after = metrics.num_alive_tasks();
    assert!(term.is_active());
    assert!(
        after < before + 100,
        "10 000 dropped tokens left {} live tasks ({before} -> {after})",
        after.saturating_sub(before)
    );
}

/// A steady follower emits no events (refusals after the first are silent),
/// so a subscriber whose stream was dropped is never pruned from the
/// session's subscriber list: each `leadership()` created and dropped (say,
/// to peek at the current state) leaks its queue for as long as the
/// follower stays a follower.
#[tokio::test(start_paused = true)]
async fn streams_created_and_dropped_by_a_steady_follower_are_freed() {
    use futures::FutureExt;
    let server = server().await;
    server.set_owner(SERVICE, DOMAIN, "someone-else", 3600 * SEC);
    let client = in_memory(&server, 10).build().await.unwrap();
    client.start_keep_alive().await.unwrap();
    let mut first = client.leadership();
    until(&mut first, 5 * SEC, "Follower", |e| {
        matches!(e, LeadershipEvent::Follower)
    })
    .await;
    tokio::time::sleep(5 * SEC).await;
    let before = LIVE.load(std::sync::atomic::Ordering::Relaxed);
    for _ in 0..100_000 {
        let mut peek = client.leadership();
        let _ = futures::StreamExt::next(&mut peek).now_or_never();
    }
    tokio::time::sleep(10 * SEC).await; // many refused attempts later
    let after = LIVE.load(std::sync::atomic::Ordering::Relaxed);
    assert!(
        after - before < 1_000_000,
        "100 000 dropped streams still hold {} bytes",
        after - before
    );
}
