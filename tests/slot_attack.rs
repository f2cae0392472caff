//! Attacks on renewal slots and the driver's batched timers: more timers
//! than one batch expiring at once (a runtime that did not run the driver
//! for a while) are each handled once, none lost, none duplicated, and
//! re-armed for the next renewal, and hundreds of them go out earliest
//! deadline first (not only the hundred or so that one turn of the task's
//! cooperative budget used to take); a lease barely over the margin does
//! not renew faster than the minimum spacing.
#![cfg(feature = "testing")]

mod common;

use common::*;
use futures::StreamExt;
use quorum_quest_client::testing::{LeasePolicy, TestServer};
use quorum_quest_client::{LeadershipEvent, RpcKind};

/// More renewals than the driver takes out of its timer queue in one go
/// (1,024) come due at once, as after a stall of the driver's runtime: each
/// lock sends exactly one renewal (none lost in a batch, none sent twice),
/// no lock is lost, and every timer is armed again: the next interval
/// renews each once more.
#[tokio::test(start_paused = true)]
async fn renewals_due_at_once_beyond_a_batch_go_out_once_each_and_are_rearmed() {
    const N: usize = 2_600;
    let server = server().await;
    // TTL 3 s: renew interval 1 s.
    let root = in_memory(&server, 3).build().await.unwrap();
    let shards = shards(&root, "indexer", N);
    let mut all = all_elected(&shards, 10 * SEC).await;
    let confirmed = server.calls(RpcKind::KeepAlive);
    assert_eq!(confirmed, N as u64, "one confirming KeepAlive each");
    // Every renewal comes due in one step.
    tokio::time::advance(ms(1_100)).await;
    one_renewal_each(&mut all, N, "after the stall").await;
    assert_eq!(server.calls(RpcKind::KeepAlive), 2 * N as u64);
    // And again one interval later: every timer was re-armed, once.
    tokio::time::advance(ms(1_000)).await;
    one_renewal_each(&mut all, N, "one interval later").await;
    assert_eq!(server.calls(RpcKind::KeepAlive), 3 * N as u64);
    for (i, shard) in shards.iter().enumerate().step_by(97) {
        assert!(shard.is_leader(), "shard {i}");
    }
}

/// The shortest lease a client leads on (100 ms after the margin), and a
/// renew interval barely over the minimum spacing: renewals never go out
/// faster than one per 50 ms (the slot must not move a renewal clamped to
/// the spacing below it). Counted over 5 s of paused time.
#[tokio::test(start_paused = true)]
async fn a_lease_barely_over_the_margin_renews_no_faster_than_the_minimum_spacing() {
    let server = TestServer::start().await.unwrap();
    // TTL 3 s, margin 1 s by default: a clamp to 1.1 s leaves 100 ms.
    server.set_lease_policy(LeasePolicy::ClampRenewals(ms(1_100)));
    let client = in_memory(&server, 3)
        .safety_margin(SEC)
        .build()
        .await
        .unwrap();
    let mut stream = client.leadership().boxed();
    until_elected(&mut stream, 5 * SEC, "elected").await;
    let before = server.calls(RpcKind::KeepAlive);
    let started = tokio::time::Instant::now();
    let events = tokio::spawn(async move {
        let mut lost = 0;
        while let Some(ev) = stream.next().await {
            if matches!(ev, LeadershipEvent::Lost { .. }) {
                lost += 1;
            }
        }
        lost
    });
    tokio::time::sleep(5 * SEC).await;
    let sent = server.calls(RpcKind::KeepAlive) - before;
    let took = started.elapsed();
    let most = took.as_millis() / 50 + 1;
    assert!(
        u128::from(sent) <= most,
        "{sent} renewals in {took:?}: faster than one per 50 ms"
    );
    assert!(
        sent >= 50,
        "{sent} renewals in {took:?}: it stopped renewing"
    );
    assert!(client.is_leader());
    events.abort();
}

/// Attack on "renewals due together go out earliest deadline first" past
/// a few dozen locks: `N` locks elected one after the other (2 ms apart,
/// so their deadlines come in that order; their jittered renewals, up to
/// 950 ms early, in another), and then every renewal comes due at once (a
/// runtime that did not run the driver for a while). One call at a time,
/// each answered after 1 ms: the server sees them in the order they left.
#[tokio::test(start_paused = true)]
async fn hundreds_of_renewals_due_together_go_out_earliest_deadline_first() {
    const N: usize = 400;
    let server = TestServer::builder().latency(ms(1)).start().await.unwrap();
    // TTL 30 s: renew interval 10 s, slots 50 ms, jitter up to 950 ms.
    let root = on_one_slot(&server, 30).await;
    let shards = shards(&root, "indexer", N);
    let mut all = elected_one_by_one(&shards, ms(2)).await;
    tokio::time::advance(ms(11_000)).await;
    one_renewal_each(&mut all, N, "after the stall").await;
    let order: Vec<usize> = by_last_keep_alive(&server, "indexer")
        .into_iter()
        .map(|(_, shard)| shard)
        .collect();
    let out_of_order = order.windows(2).filter(|w| w[0] > w[1]).count();
    assert_eq!(
        out_of_order, 0,
        "{out_of_order} renewals went out after a later deadline's; order: {order:?}"
    );
}

/// Attack on the driver's `Sources` waker (wake-ups from other workers
/// only mark while the driver runs): 300 leaders on one connection over
/// loopback TCP on two workers, renewing every second in shared slots,
/// while other elections on the same connection start and stop without
/// pause (commands) and their attempts end (calls). A lost wake-up stalls
/// the driver: renewals stop and leases run out. For 4 s, no leader is
/// lost and every one renews at least twice (it is due three times).
#[test]
fn leaders_keep_renewing_while_elections_on_their_connection_churn() {
    const N: usize = 300;
    let rt = multi_thread(2);
    rt.block_on(async {
        let server = server().await;
        // TTL 3 s: renew interval 1 s, deadline 2.7 s after each send.
        let root = over_tcp(&server.url(), 3).build().await.unwrap();
        let shards = shards(&root, "indexer", N);
        let mut all = all_elected(&shards, 30 * SEC).await;
        // Churn: elections of another scope on the same connection start
        // and stop (a start and a stop command each, and their attempts).
        let churned = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let churn = {
            let root = root.clone();
            let churned = churned.clone();
            tokio::spawn(async move {
                let mut k = 0u64;
                loop {
                    let scope = root.for_scope("churn", format!("c-{}", k % 50)).unwrap();
                    let stream = scope.leadership();
                    tokio::task::yield_now().await;
                    drop(stream);
                    k += 1;
                    churned.store(k, std::sync::atomic::Ordering::Relaxed);
                    if k.is_multiple_of(16) {
                        tokio::time::sleep(ms(1)).await;
                    }
                }
            })
        };
        let mut renewals = vec![0u32; N];
        let until = tokio::time::Instant::now() + 4 * SEC;
        loop {
            match tokio::time::timeout_at(until, all.next()).await {
                Err(_) => break,
                Ok(Some((i, LeadershipEvent::Renewed { .. }))) => renewals[i] += 1,
                Ok(Some((i, LeadershipEvent::RpcFailed { .. }))) => {
                    panic!("shard {i}: a renewal failed")
                }
                Ok(Some((i, ev @ LeadershipEvent::Lost { .. }))) => {
                    panic!("shard {i} lost its lease: {ev:?}")
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        churn.abort();
        let fewest = renewals.iter().min().copied().unwrap_or(0);
        let churned = churned.load(std::sync::atomic::Ordering::Relaxed);
        eprintln!(
            "{N} leaders over 4 s of churn ({churned} elections started and stopped): {} renewals, fewest per leader {fewest}",
            renewals.iter().sum::<u32>()
        );
        assert!(churned >= 100, "only {churned} elections churned");
        assert!(fewest >= 2, "a leader renewed only {fewest} times in 4 s");
        drop(all);
    });
}
