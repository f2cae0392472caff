//! Attacks on the exit paths: dropping leading clients in bulk and in places
//! where a drop cannot block.
#![cfg(feature = "testing")]

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;

/// Threads of this process (Linux), or `None` where `/proc` is missing.
fn threads() -> Option<usize> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .and_then(|n| n.trim().parse().ok())
}

/// Dropping leading shard clients one after the other (the end of a `main`
/// that owns many shards) must not leave a sleeping thread behind per drop:
/// each release is over in one round trip, so the thread that bounds it
/// must go with it. Before the fix every drop left a thread asleep for the
/// whole bound (one second plus the RPC timeout), so 200 drops meant 200
/// extra threads (and a process under a pids limit could fail to spawn them).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_many_leading_clients_does_not_leave_a_thread_per_drop() {
    const SHARDS: usize = 200;
    let server = server().await;
    let base = over_tcp(&server.url(), 60)
        .rpc_timeout(Duration::from_secs(20))
        .build()
        .await
        .unwrap();
    let mut shards = Vec::with_capacity(SHARDS);
    for i in 0..SHARDS {
        let shard = base.for_scope("shards", format!("shard-{i}")).unwrap();
        assert!(shard.try_acquire_lock().await.unwrap());
        shards.push(shard);
    }
    let Some(before) = threads() else { return };
    let start = Instant::now();
    for shard in shards {
        drop(shard);
    }
    let took = start.elapsed();
    println!("{SHARDS} leading clients dropped in {took:?}");
    for i in 0..SHARDS {
        assert!(
            server.lock("shards", &format!("shard-{i}")).is_none(),
            "shard {i} released before its drop returned"
        );
    }
    // Each release has returned; its bounding thread must be gone (or
    // going): allow a few that have not been scheduled to exit yet.
    let mut after = threads().unwrap_or(0);
    let deadline = Instant::now() + Duration::from_secs(5);
    while after > before + SHARDS / 4 && Instant::now() < deadline {
        tokio::time::sleep(ms(20)).await;
        after = threads().unwrap_or(0);
    }
    assert!(
        after <= before + SHARDS / 4,
        "{before} threads before the drops, {after} after: a thread left behind per drop"
    );
}

/// A drop that cannot block (inside a `LocalSet` on a multi-thread runtime)
/// must not go through a panic: the process's panic hook (which may report
/// to a crash collector, or abort) sees every panic, caught or not.
#[test]
#[ignore = "finding: block_in_place panics inside a LocalSet; the panic is caught, but the process's panic hook runs first (prints a panic message, or aborts/exits with a strict hook). tokio offers no way to ask whether block_in_place is allowed"]
fn a_leading_client_dropped_in_a_local_set_does_not_trigger_the_panic_hook() {
    static BLOCKING_PANICS: AtomicUsize = AtomicUsize::new(0);
    let previous = Arc::new(std::panic::take_hook());
    let chained = previous.clone();
    std::panic::set_hook(Box::new(move |info| {
        let text = info.to_string();
        if text.contains("blocking") {
            BLOCKING_PANICS.fetch_add(1, Ordering::SeqCst);
        }
        chained(info);
    }));
    let server_rt = tokio::runtime::Runtime::new().unwrap();
    let server = server_rt.block_on(server());
    let url = server.url();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(tokio::task::LocalSet::new().run_until(async {
        let client = over_tcp(&url, 30).build().await.unwrap();
        assert!(client.try_acquire_lock().await.unwrap());
        drop(client);
        eventually(5 * SEC, "released", || {
            server.lock(SERVICE, DOMAIN).is_none()
        })
        .await;
    }));
    assert_eq!(
        BLOCKING_PANICS.load(Ordering::SeqCst),
        0,
        "the drop panicked (caught, but the panic hook ran and printed it)"
    );
}
