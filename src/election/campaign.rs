//! The campaign: an `async-stream` generator that loops try-acquire /
//! confirm / keep-alive / wait around the pure state machine and yields the
//! events each step causes; the task that drives it (and restarts it if it
//! ever ends unexpectedly); and the step-down timer.
//!
//! Not leader: try to acquire every retry period (jittered, never longer than
//! the period; backoff after errors, see [`crate::backoff`]). After an acquire
//! whose outcome is unknown, release the possibly granted lock before waiting,
//! so that it is not held for nobody. Granted: confirm at once with a
//! `KeepAlive`, whose answer tells the real lease. Leader: keep alive every
//! renew interval (counted from the send instant of the answer in force, and
//! up to a tenth of it earlier, at random, so that elections elected together
//! drift apart),
//! retrying failures with backoff while the lease lasts; each call's timeout
//! is capped by the time left. The step-down timer reports `Lost { Expired }`
//! at the deadline even while a call hangs.

use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Weak};
use std::time::Duration;

use futures::{FutureExt, Stream, StreamExt};
use tokio::time::{sleep, sleep_until, Instant};
use tokio_util::sync::CancellationToken;

use super::Session;
use crate::admission::Wait;
use crate::backoff::classify;
use crate::event::{LeadershipEvent, LeaseWatch};
use crate::state::Observation;

/// The pause before a campaign that ended unexpectedly is restarted.
const RESTART_PAUSE: Duration = Duration::from_secs(1);

/// What the campaign does next.
enum Step {
    /// Not a candidate: ask for the lock.
    Acquire,
    /// Leader or granted: send a `KeepAlive` at `due`, while the lease (or
    /// the grant) lasts until `until`.
    Renew { due: Instant, until: Instant },
}

impl Session {
    /// The next step, given a pending retry instant after a failed renewal
    /// and how much `early` the next renewal goes out (jitter, see
    /// [`crate::backoff::Backoff::renew_early`]: only ever earlier).
    fn next_step(&self, retry_at: Option<Instant>, early: Duration) -> Step {
        let shared = self.shared();
        let state = &shared.election;
        if let Some(deadline) = state.deadline() {
            let interval = self.timing.renew_interval.saturating_sub(early);
            let due = retry_at
                .or_else(|| state.renew_due(interval))
                .unwrap_or(deadline);
            return Step::Renew {
                due,
                until: deadline,
            };
        }
        if let Some(until) = state.grant_expiry() {
            return Step::Renew {
                due: retry_at.unwrap_or_else(Instant::now),
                until,
            };
        }
        Step::Acquire
    }
}

/// The campaign loop as a stream of the events it causes. Ends when `stop`
/// is cancelled (without releasing: whoever stops it decides that).
pub(crate) fn campaign(
    session: Arc<Session>,
    stop: CancellationToken,
) -> impl Stream<Item = LeadershipEvent> + Send + 'static {
    async_stream::stream! {
        let timing = session.timing;
        let mut lease = session.lease();
        let mut failures: u32 = 0;
        // When the next renewal attempt is due after a failed one.
        let mut retry_at: Option<Instant> = None;
        // The next renewal goes out this much before the renew interval is
        // up (redrawn after each renewal), so that elections elected
        // together do not renew in lockstep for ever.
        let mut early = session.backoff().renew_early();
        loop {
            #[cfg(test)]
            if session.inject_panic.swap(false, std::sync::atomic::Ordering::SeqCst) {
                panic!("injected campaign panic");
            }
            match session.next_step(retry_at, early) {
                Step::Acquire => {
                    retry_at = None;
                    let (answer, events) = tokio::select! {
                        biased;
                        _ = stop.cancelled() => break,
                        // A queued attempt costs nothing: it waits for a
                        // free call slot as long as it takes.
                        // Boxed: an idle election (most of them, most of
                        // the time) does not carry a call's state.
                        out = Box::pin(session.try_acquire(Wait::Unbounded)) => out,
                    };
                    for ev in events {
                        yield ev;
                    }
                    let wait = match &answer.result {
                        Ok(true) => {
                            failures = 0;
                            // Granted: confirm at once. A grant that came too
                            // late to use: ask again after the period.
                            if !matches!(session.next_step(None, early), Step::Acquire) {
                                continue;
                            }
                            session.backoff().follower_wait()
                        }
                        Ok(false) => {
                            failures = 0;
                            session.backoff().follower_wait()
                        }
                        Err(status) => {
                            failures = failures.saturating_add(1);
                            // Logged (at `warn` if permanent) where the
                            // failure is observed: `crate::observe`.
                            let class = classify(status.code());
                            if answer.outcome_unknown() {
                                tokio::select! {
                                    biased;
                                    _ = stop.cancelled() => break,
                                    () = Box::pin(session.settle_unknown_acquire()) => {}
                                }
                            }
                            session.backoff().after_failure_as_follower(failures, class)
                        }
                    };
                    tokio::select! {
                        biased;
                        _ = stop.cancelled() => break,
                        _ = sleep(wait) => {}
                    }
                }
                Step::Renew { due, until } => {
                    if Instant::now() < due {
                        // Wake early if the lease changes (a loss by the
                        // timer, a release, an imperative renewal).
                        let changed = tokio::select! {
                            biased;
                            _ = stop.cancelled() => break,
                            changed = lease.changed() => changed.is_ok(),
                            _ = sleep_until(due) => false,
                        };
                        if changed {
                            lease.mark_seen();
                            continue;
                        }
                    }
                    let left = until.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        // The timer reports the loss; nothing to renew.
                        retry_at = None;
                        let events = session.observe(Observation::Tick);
                        for ev in events {
                            yield ev;
                        }
                        continue;
                    }
                    let (answer, events) = tokio::select! {
                        biased;
                        _ = stop.cancelled() => break,
                        // Waits for a call slot (ahead of followers) and
                        // for its answer no later than the deadline.
                        out = Box::pin(session.keep_alive(timing.rpc_timeout, Wait::Until(until))) => out,
                    };
                    // The lease this answer published is taken into account
                    // by the next step (computed from the state, after this
                    // line): no need to wake up again for it. A change after
                    // this line still wakes the wait below.
                    lease.mark_seen();
                    for ev in events {
                        yield ev;
                    }
                    match &answer.result {
                        Ok(_) if matches!(session.next_step(None, early), Step::Acquire) => {
                            // Refused, or a lease too short to lead on: the
                            // lock is not (safely) ours. Ask again after the
                            // retry period, not in a tight loop.
                            failures = 0;
                            retry_at = None;
                            let wait = session.backoff().follower_wait();
                            tokio::select! {
                                biased;
                                _ = stop.cancelled() => break,
                                _ = sleep(wait) => {}
                            }
                        }
                        Ok(_) => {
                            failures = 0;
                            retry_at = None;
                            early = session.backoff().renew_early();
                        }
                        Err(status) => {
                            failures = failures.saturating_add(1);
                            let class = classify(status.code());
                            let left = until.saturating_duration_since(Instant::now());
                            let wait = session.backoff().after_failure_as_leader(failures, class, left);
                            // Logged at `warn` (lease left, code) where the
                            // failure is observed: `crate::observe`.
                            tracing::debug!(
                                code = ?status.code(),
                                failures,
                                retry_in = ?wait.unwrap_or(left),
                                "next KeepAlive attempt"
                            );
                            // No retry fits before the deadline: wait for it.
                            retry_at = Some(wait.map_or(until, |w| crate::time::after(Instant::now(), w)));
                        }
                    }
                }
            }
        }
    }
}

/// Drives the campaign generator until `stop` is cancelled. If it ever ends
/// otherwise (a panic, a bug), the term ends at once (`Lost { Failed }` on
/// every consumer) and the campaign restarts after a pause: a client never
/// sits with a keep-alive "running" and nothing campaigning.
pub(crate) async fn drive(session: Arc<Session>, stop: CancellationToken) {
    loop {
        let events = campaign(session.clone(), stop.clone());
        let outcome = AssertUnwindSafe(async {
            futures::pin_mut!(events);
            // Each event is logged where it is published (`crate::observe`).
            while events.next().await.is_some() {}
        })
        .catch_unwind()
        .await;
        if stop.is_cancelled() {
            return;
        }
        match outcome {
            Err(panic) => {
                let what = panic
                    .downcast_ref::<&str>()
                    .map(|s| (*s).to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "non-string panic payload".into());
                tracing::error!(panic = %what, "the campaign panicked; stepping down and restarting it");
            }
            Ok(()) => {
                tracing::error!("the campaign ended unexpectedly; stepping down and restarting it")
            }
        }
        session.observe(Observation::CampaignFailed);
        tokio::select! {
            biased;
            _ = stop.cancelled() => return,
            _ = sleep(RESTART_PAUSE) => {}
        }
    }
}

/// The one step-down timer of a session: at the published deadline it
/// applies a tick, so `Lost { Expired }` reaches every consumer even when no
/// call returns and nothing campaigns. Ends with the session.
pub(crate) async fn step_down_timer(session: Weak<Session>, mut lease: LeaseWatch) {
    loop {
        let deadline = lease.mark_seen();
        let fired = match deadline {
            Some(deadline) => tokio::select! {
                changed = lease.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    false
                }
                _ = sleep_until(deadline) => true,
            },
            None => {
                if lease.changed().await.is_err() {
                    return;
                }
                false
            }
        };
        if fired {
            match session.upgrade() {
                Some(session) => {
                    session.observe(Observation::Tick);
                }
                None => return,
            }
        }
    }
}
