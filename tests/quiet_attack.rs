//! Attacks on the consumers that leave `Renewed` out
//! (`Leadership::without_renewals()` and the callbacks adapter): they are
//! no longer woken by a renewal, so whatever a renewal used to make them
//! look at again (the backstop of the step-down timer, a campaign to
//! revive) must be kicked some other way.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use common::*;
use quorum_quest_client::testing::LeasePolicy;
use quorum_quest_client::{Callbacks, LossReason};
use tokio::time::Instant;

/// The TTL of these tests: a renewal is due 4 s after the request that set
/// the lease was sent, and an unclamped lease lasts 10.5 s (1.5 s margin).
const TTL_SECS: u64 = 12;

/// What a renewal is clamped to: 2.5 s usable after the margin, so the
/// clamped renewal (at about 4 s) brings the deadline 4 s closer.
const CLAMP: Duration = Duration::from_secs(4);

/// How late a loss may come after the deadline on a busy 2-core machine
/// (the bug makes it about 4 s late: the backstop sleeps to the old one).
const LATE: Duration = Duration::from_millis(1500);

/// The deadline of `client`'s running term, as it stands now.
fn lease_deadline(client: &quorum_quest_client::QuorumQuestClient) -> Instant {
    Instant::now() + client.get_remaining_lease().expect("leading")
}

/// Runs `idle` until the keep-alive's clamped renewal is applied (the lease
/// left is under the clamp), then leaves it idle; returns the deadline
/// that renewal set.
fn until_a_clamped_renewal(
    idle: &tokio::runtime::Runtime,
    client: &quorum_quest_client::QuorumQuestClient,
) -> Instant {
    idle.block_on(async {
        eventually(10 * SEC, "a clamped renewal", || {
            client
                .get_remaining_lease()
                .is_some_and(|left| left < CLAMP)
        })
        .await;
        // Read before this `block_on` returns: the next renewal (1.25 s
        // later) is not made any more.
        lease_deadline(client)
    })
}

/// A renewal that brings the deadline closer (the server clamps the lease:
/// the latest answer is authoritative) is not handed to a stream that left
/// renewals out, nor does it wake it. The keep-alive runs on a
/// current-thread runtime that is left idle right after that renewal, so
/// only the stream's own backstop timer can report the loss: it must come
/// at the new deadline, not at the one the backstop was armed for when the
/// stream last waited (4 s later).
#[test]
fn a_quiet_stream_gets_the_loss_at_a_deadline_a_renewal_brought_closer() {
    let home = home_runtime();
    let server = home.block_on(server());
    let client = home
        .block_on(over_tcp(&server.url(), TTL_SECS).build())
        .unwrap();
    let idle = current_thread();
    keep_alive_elected_on(&idle, &client);
    // The stream reads on the healthy runtime, waiting (its backstop armed
    // at the first deadline) before the clamped renewal is made.
    let mut stream = client.leadership().without_renewals();
    let (waiting_tx, waiting_rx) = std::sync::mpsc::channel();
    let reader = home.spawn(async move {
        let elected = next(&mut stream, 5 * SEC, "Elected (the running term)").await;
        assert!(elected.is_elected(), "{elected:?}");
        waiting_tx.send(()).unwrap();
        let lost = next(&mut stream, 30 * SEC, "Lost").await;
        (lost, Instant::now())
    });
    waiting_rx.recv_timeout(5 * SEC).unwrap();
    server.set_lease_policy(LeasePolicy::ClampRenewals(CLAMP));
    let deadline = until_a_clamped_renewal(&idle, &client);
    let (lost, at) = home.block_on(reader).unwrap();
    assert!(is_lost_with(&lost, LossReason::Expired), "{lost:?}");
    eprintln!(
        "reported {:?} after the deadline (bound {LATE:?})",
        at.saturating_duration_since(deadline)
    );
    assert!(
        at <= deadline + LATE,
        "Lost came {:?} after the deadline",
        at - deadline
    );
    drop(idle);
    drop(client);
    home.block_on(server.shutdown());
}

/// Records each callback with the instant it ran.
#[derive(Default)]
struct Timed(Mutex<Vec<(&'static str, Instant)>>);

impl Timed {
    fn get(&self) -> Vec<(&'static str, Instant)> {
        self.0.lock().unwrap().clone()
    }

    /// Waits (on `home`, up to `within`) for `on_leader_lost` after
    /// `on_leader_elected`, and asserts it came at most [`LATE`] after
    /// `deadline`.
    fn lost_in_time(&self, home: &tokio::runtime::Runtime, deadline: Instant, within: Duration) {
        home.block_on(eventually(within, "on_leader_lost", || {
            self.get().len() >= 2
        }));
        let log = self.get();
        let names: Vec<&str> = log.iter().map(|(what, _)| *what).collect();
        assert_eq!(names, ["elected", "lost"]);
        let at = log[1].1;
        eprintln!(
            "reported {:?} after the deadline (bound {LATE:?})",
            at.saturating_duration_since(deadline)
        );
        assert!(
            at <= deadline + LATE,
            "on_leader_lost came {:?} after the deadline",
            at - deadline
        );
    }
}

/// A client on `home` with its callbacks recorded in the returned log
/// (TTL 6 s) that led through a keep-alive on `home`, stopped mid-term: it
/// still leads, until the term's deadline.
fn led_through_a_stopped_keep_alive(
    home: &tokio::runtime::Runtime,
    server: &quorum_quest_client::testing::TestServer,
) -> (quorum_quest_client::QuorumQuestClient, Arc<Timed>) {
    let log = Arc::new(Timed::default());
    let client = home
        .block_on(over_tcp(&server.url(), 6).callbacks(log.clone()).build())
        .unwrap();
    home.block_on(async {
        client.start_keep_alive().await.unwrap();
        eventually(10 * SEC, "on_leader_elected", || !log.get().is_empty()).await;
        client.stop_keep_alive().await;
    });
    (client, log)
}

#[async_trait]
impl Callbacks for Timed {
    async fn on_leader_elected(&self, is_leader: bool) {
        let what = if is_leader { "elected" } else { "follower" };
        self.0.lock().unwrap().push((what, Instant::now()));
    }
    async fn on_leader_lost(&self) {
        self.0.lock().unwrap().push(("lost", Instant::now()));
    }
}

/// The callbacks leave renewals out too: the same renewal that brings the
/// deadline closer, with the keep-alive's runtime left idle right after,
/// must not delay `on_leader_lost` to the deadline the callbacks'
/// backstop was armed for before.
#[test]
fn callbacks_get_the_loss_at_a_deadline_a_renewal_brought_closer() {
    let home = home_runtime();
    let server = home.block_on(server());
    let log = Arc::new(Timed::default());
    let client = home
        .block_on(
            over_tcp(&server.url(), TTL_SECS)
                .callbacks(log.clone())
                .build(),
        )
        .unwrap();
    let idle = current_thread();
    idle.block_on(async {
        client.start_keep_alive().await.unwrap();
        eventually(10 * SEC, "on_leader_elected", || {
            log.get().first().map(|(what, _)| *what) == Some("elected")
        })
        .await;
    });
    server.set_lease_policy(LeasePolicy::ClampRenewals(CLAMP));
    let deadline = until_a_clamped_renewal(&idle, &client);
    log.lost_in_time(&home, deadline, 30 * SEC);
    drop(idle);
    drop(client);
    home.block_on(server.shutdown());
}

/// The callbacks wait on the client's runtime while the campaign (the
/// keep-alive) runs there too: they arm no backstop (the driver keeping
/// the step-down timer runs on their own runtime). The keep-alive is then
/// stopped and started again on a current-thread runtime, whose driver
/// takes the election over with no transition; its renewals no longer
/// wake the callbacks, which keep believing the timer runs beside them.
/// That runtime is left idle after a renewal: `on_leader_lost` must still
/// come at the deadline.
#[test]
fn callbacks_get_the_loss_after_the_keep_alive_moved_to_a_runtime_left_idle() {
    let home = home_runtime();
    let server = home.block_on(server());
    let (client, log) = led_through_a_stopped_keep_alive(&home, &server);
    let idle = current_thread();
    let deadline = idle.block_on(async {
        // Renewed on the new runtime: the deadline moves on by 2 s at least
        // (the renewal is due 2 s after the last one was sent).
        let before = lease_deadline(&client);
        client.start_keep_alive().await.unwrap();
        eventually(
            10 * SEC,
            "a renewal on the keep-alive's new runtime",
            || lease_deadline(&client) > before + SEC,
        )
        .await;
        lease_deadline(&client)
    });
    // `idle` is kept, but nothing runs it any more: no renewal goes out.
    log.lost_in_time(&home, deadline, 20 * SEC);
    drop(idle);
    drop(client);
    home.block_on(server.shutdown());
}

/// A quiet stream's backstop through renewals it is not woken for: the
/// keep-alive on a current-thread runtime renews for two TTLs (the
/// backstop, armed at the first deadline, must not report a loss there),
/// then that runtime is left idle: the stream gets `Lost` at the last
/// deadline, and no later.
#[test]
fn a_quiet_streams_backstop_sleeps_through_renewals_and_reports_the_last_deadline() {
    let home = home_runtime();
    let server = home.block_on(server());
    let client = home.block_on(over_tcp(&server.url(), 3).build()).unwrap();
    let idle = current_thread();
    keep_alive_elected_on(&idle, &client);
    let mut stream = client.leadership().without_renewals();
    let waiting = home.spawn(async move {
        let elected = next(&mut stream, 5 * SEC, "Elected (the running term)").await;
        assert!(elected.is_elected(), "{elected:?}");
        let lost = next(&mut stream, 30 * SEC, "Lost").await;
        (stream, lost, Instant::now())
    });
    // Renewing for two TTLs (the campaign runs while this runtime runs).
    let deadline = idle.block_on(async {
        tokio::time::sleep(6 * SEC).await;
        let left = client.get_remaining_lease();
        Instant::now() + left.expect("renewed all along")
    });
    let (stream, lost, at) = home.block_on(waiting).unwrap();
    assert!(is_lost_with(&lost, LossReason::Expired), "{lost:?}");
    assert!(
        at + LATE >= deadline,
        "Lost came {:?} before the last deadline",
        deadline - at
    );
    eprintln!(
        "reported {:?} after the deadline (bound {LATE:?})",
        at.saturating_duration_since(deadline)
    );
    assert!(
        at <= deadline + LATE,
        "Lost came {:?} after the last deadline",
        at - deadline
    );
    drop(stream);
    drop(idle);
    home.block_on(server.shutdown());
}

/// A set of quiet streams first read on a current-thread runtime (its
/// campaigns start on that runtime's driver), which then shuts down, then
/// read on another: no renewal wakes the set, yet each campaign goes on
/// there (the term renewed, or lost and won again, `Elected` and `Lost`
/// alternating per key), never silent: still leading two TTLs later.
#[test]
fn a_quiet_set_whose_campaigns_runtime_shut_down_campaigns_on_on_the_next() {
    use futures::StreamExt;
    use quorum_quest_client::{LeadershipEvent, LeadershipSet};

    let home = home_runtime();
    let server = home.block_on(server());
    let root = home.block_on(over_tcp(&server.url(), 3).build()).unwrap();
    let clients: Vec<_> = (0..3)
        .map(|i| root.for_scope(SERVICE, format!("shard-{i}")).unwrap())
        .collect();
    let mut set: LeadershipSet<usize> = clients
        .iter()
        .enumerate()
        .map(|(i, c)| (i, c.leadership().without_renewals()))
        .collect();
    let first = current_thread();
    first.block_on(async {
        let mut elected = 0;
        while elected < 3 {
            let (_, ev) = tokio::time::timeout(10 * SEC, set.next())
                .await
                .expect("every shard elected")
                .unwrap();
            assert!(ev.is_elected(), "{ev:?}");
            elected += 1;
        }
        while tokio::time::timeout(ms(100), set.next()).await.is_ok() {}
    });
    drop(first);
    home.block_on(async {
        // Past the deadline of the terms won on `first` (TTL 3 s).
        let mut leading = [true; 3];
        let end = Instant::now() + 8 * SEC;
        while let Ok(item) = tokio::time::timeout_at(end, set.next()).await {
            let (key, ev) = item.expect("the set ended");
            match ev {
                LeadershipEvent::Elected { .. } => {
                    assert!(!leading[key], "shard {key}: Elected twice");
                    leading[key] = true;
                }
                LeadershipEvent::Lost { .. } => {
                    assert!(leading[key], "shard {key}: Lost twice");
                    leading[key] = false;
                }
                LeadershipEvent::Renewed { .. } => panic!("shard {key}: a renewal"),
                _ => {}
            }
        }
        for (i, client) in clients.iter().enumerate() {
            assert!(
                leading[i] && client.is_leader(),
                "shard {i}: not leading again"
            );
            assert!(client.health().campaign_running, "shard {i}");
        }
    });
    drop(set);
    home.block_on(server.shutdown());
}

/// The same move made by a stream: the keep-alive (on the callbacks'
/// runtime) is stopped mid-term, then a stream read on a current-thread
/// runtime starts the campaign there and renews the running term; that
/// runtime (and the stream) is left idle. `on_leader_lost` must still come
/// at the deadline.
#[test]
fn callbacks_get_the_loss_after_a_stream_moved_the_campaign_to_a_runtime_left_idle() {
    use futures::StreamExt;

    let home = home_runtime();
    let server = home.block_on(server());
    let (client, log) = led_through_a_stopped_keep_alive(&home, &server);
    let idle = current_thread();
    let mut stream = client.leadership();
    let deadline = idle.block_on(async {
        let before = lease_deadline(&client);
        let elected = next(&mut stream, 5 * SEC, "Elected (the running term)").await;
        assert!(elected.is_elected(), "{elected:?}");
        // Renewed by the campaign the stream started on this runtime.
        loop {
            let ev = tokio::time::timeout(5 * SEC, stream.next())
                .await
                .expect("a renewal")
                .expect("the stream goes on");
            assert!(
                matches!(ev, quorum_quest_client::LeadershipEvent::Renewed { .. }),
                "{ev:?}"
            );
            if lease_deadline(&client) > before + SEC {
                break lease_deadline(&client);
            }
        }
    });
    // `idle` and the stream are kept, but nothing runs them any more.
    log.lost_in_time(&home, deadline, 20 * SEC);
    drop(stream);
    drop(idle);
    drop(client);
    home.block_on(server.shutdown());
}
