//! The campaign of one election: what to do next, and what to do after each
//! answer. No I/O and no timers of its own: the [driver](super::driver)
//! makes the calls it asks for and wakes it when the instant it asks for
//! comes (one task and one timer queue for every election on a connection).
//!
//! Not leader: try to acquire every retry period (jittered, never longer than
//! the period; backoff after errors, see [`crate::backoff`]). After an acquire
//! whose outcome is unknown, release the possibly granted lock before waiting,
//! so that it is not held for nobody. Granted: confirm at once with a
//! `KeepAlive`, whose answer tells the real lease. Leader: keep alive every
//! renew interval (counted from the send instant of the answer in force, and
//! up to a tenth of it earlier: at random, so that elections elected together
//! drift apart, and then to the start of a shared slot a hundredth of the
//! interval wide, at most 50 ms, so that renewals due within one slot go
//! out together),
//! retrying failures with backoff while the lease lasts; each
//! call's timeout is capped by the time left. The step-down timer (in the
//! driver) reports `Lost { Expired }` at the deadline even while a call hangs.

use std::time::Duration;

use tokio::time::Instant;

use super::Session;
use crate::backoff::{classify, Class};
use crate::rpc::{Answer, LeaseAnswer};
use crate::state::Observation;

/// What the campaign asks the driver for next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Action {
    /// Make this call, then report its answer.
    Call(Call),
    /// Wake the campaign at `at`. `renew_wait`: waiting for a renewal to
    /// come due, so a lease change made elsewhere (a loss by the timer, a
    /// release, an imperative renewal) wakes it early.
    Sleep { at: Instant, renew_wait: bool },
}

/// A call the campaign asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Call {
    /// `TryAcquireLock`, waiting for a call slot as long as it takes.
    Acquire,
    /// `KeepAlive`, waiting for a call slot (ahead of followers) and for its
    /// answer no later than `until` (the deadline, or the grant's expiry).
    Renew { until: Instant },
    /// After an acquire whose outcome is unknown: release the lock the
    /// server may hold for us, then back off by `class`.
    Settle { class: Class },
}

/// What the campaign does next, read from the state.
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
                .or_else(|| slotted_renew_due(state, self.timing.renew_interval, interval))
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

/// A leader's next normal renewal: `renew_due(interval)` (the jittered
/// interval) moved to the start of its slot ([`crate::time::slot_start`],
/// [`crate::backoff::renew_slot`] of the configured `renew_interval`), but
/// never sooner than the minimum spacing after the request that set the
/// lease in force: a lease barely over the margin (or an interval barely
/// over the spacing) has its renewal clamped to exactly that spacing, and
/// the slot must not move it below. `None` unless leader.
fn slotted_renew_due(
    state: &crate::state::ElectionState,
    renew_interval: Duration,
    interval: Duration,
) -> Option<Instant> {
    let deadline = state.deadline()?;
    let due = state.renew_due(interval)?;
    let slotted = crate::time::slot_start(
        due,
        crate::backoff::renew_slot(renew_interval, deadline, due),
    );
    // `renew_due(0)`: the basis plus the minimum spacing (at most `due`).
    let floor = state.renew_due(Duration::ZERO).unwrap_or(slotted);
    Some(slotted.max(floor).min(due))
}

/// One election's campaign state: consecutive failures, a pending retry
/// after a failed renewal, and the current renewal jitter.
#[derive(Debug)]
pub(super) struct Plan {
    failures: u32,
    /// When the next renewal attempt is due after a failed one.
    retry_at: Option<Instant>,
    /// The next renewal goes out this much before the renew interval is up
    /// (redrawn after each renewal), so that elections elected together do
    /// not renew in lockstep for ever.
    early: Duration,
}

impl Plan {
    pub(super) fn new(session: &Session) -> Self {
        Plan {
            failures: 0,
            retry_at: None,
            early: session.backoff().renew_early(),
        }
    }

    /// A placeholder while the driver holds the real plan out of its slot.
    pub(super) fn idle() -> Self {
        Plan {
            failures: 0,
            retry_at: None,
            early: Duration::ZERO,
        }
    }

    fn sleep(at: Instant) -> Action {
        Action::Sleep {
            at,
            renew_wait: false,
        }
    }

    fn sleep_for(wait: Duration) -> Action {
        Self::sleep(crate::time::after(Instant::now(), wait))
    }

    /// A follower's wait of `wait`, unless the client leads now (a grant
    /// from outside the campaign, e.g. `try_acquire_lock`, while its own
    /// attempt was in flight): then `None`, to go on renewing at once. The
    /// retry period is not bounded by the TTL, so such a wait could
    /// outlast the lease.
    fn follower_sleep(&self, session: &Session, wait: Duration) -> Option<Action> {
        if matches!(session.next_step(None, self.early), Step::Acquire) {
            Some(Self::sleep_for(wait))
        } else {
            None
        }
    }

    /// What to do now that the campaign is free to act.
    pub(super) fn next(&mut self, session: &Session) -> Action {
        // A deadline that passed is settled by a tick, after which the state
        // no longer asks for a renewal; the bound only guards against a bug
        // turning this into a spin.
        for _ in 0..4 {
            match session.next_step(self.retry_at, self.early) {
                Step::Acquire => {
                    self.retry_at = None;
                    return Action::Call(Call::Acquire);
                }
                Step::Renew { due, until } => {
                    let now = Instant::now();
                    if now < due {
                        return Action::Sleep {
                            at: due,
                            renew_wait: true,
                        };
                    }
                    if until > now {
                        return Action::Call(Call::Renew { until });
                    }
                    // The timer reports the loss; nothing to renew.
                    self.retry_at = None;
                    session.observe(Observation::Tick).deliver();
                }
            }
        }
        Self::sleep_for(session.timing.retry_period)
    }

    /// After an acquire's answer: `None` to go on at once (granted: confirm).
    pub(super) fn acquired(&mut self, session: &Session, answer: &Answer<bool>) -> Option<Action> {
        match &answer.result {
            Ok(true) => {
                self.failures = 0;
                // Granted: confirm at once. A grant that came too late to
                // use: ask again after the period.
                if !matches!(session.next_step(None, self.early), Step::Acquire) {
                    return None;
                }
                Some(Self::sleep_for(session.backoff().follower_wait()))
            }
            Ok(false) => {
                self.failures = 0;
                let wait = session.backoff().follower_wait();
                self.follower_sleep(session, wait)
            }
            Err(status) => {
                self.failures = self.failures.saturating_add(1);
                // Logged (at `warn` if permanent) where the failure is
                // observed: `crate::observe`.
                let class = classify(status.code());
                if answer.outcome_unknown() {
                    return Some(Action::Call(Call::Settle { class }));
                }
                let wait = session
                    .backoff()
                    .after_failure_as_follower(self.failures, class);
                self.follower_sleep(session, wait)
            }
        }
    }

    /// After the release that settles an unknown acquire (not sent if the
    /// client leads meanwhile: then `None`, to go on renewing).
    pub(super) fn settled(&mut self, session: &Session, class: Class) -> Option<Action> {
        let wait = session
            .backoff()
            .after_failure_as_follower(self.failures, class);
        self.follower_sleep(session, wait)
    }

    /// After a keep-alive's answer (sent while the lease lasted until
    /// `until`): `None` to go on at once.
    pub(super) fn renewed(
        &mut self,
        session: &Session,
        answer: &Answer<LeaseAnswer>,
        until: Instant,
    ) -> Option<Action> {
        match &answer.result {
            Ok(_) if matches!(session.next_step(None, self.early), Step::Acquire) => {
                // Refused, or a lease too short to lead on: the lock is not
                // (safely) ours. Ask again after the retry period, not in a
                // tight loop.
                self.failures = 0;
                self.retry_at = None;
                Some(Self::sleep_for(session.backoff().follower_wait()))
            }
            Ok(_) => {
                self.failures = 0;
                self.retry_at = None;
                self.early = session.backoff().renew_early();
                None
            }
            Err(status) => {
                self.failures = self.failures.saturating_add(1);
                let class = classify(status.code());
                let left = until.saturating_duration_since(Instant::now());
                let wait = session
                    .backoff()
                    .after_failure_as_leader(self.failures, class, left);
                // Logged at `warn` (lease left, code) where the failure is
                // observed: `crate::observe`.
                tracing::debug!(
                    code = ?status.code(),
                    failures = self.failures,
                    retry_in = ?wait.unwrap_or(left),
                    "next KeepAlive attempt"
                );
                // No retry fits before the deadline: wait for it.
                self.retry_at = Some(wait.map_or(until, |w| crate::time::after(Instant::now(), w)));
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backoff::MIN_SPACING;
    use crate::state::ElectionState;

    const MS: Duration = Duration::from_millis(1);

    /// A leader whose lease in force was asked for at `t0` and leaves
    /// `usable` after the margin.
    fn leader(t0: Instant, usable: Duration) -> ElectionState {
        let margin = MS * 500;
        ElectionState::leading_since(usable + margin, margin, t0, usable + margin)
    }

    /// Attack: the shortest lease a client leads on (100 ms after the
    /// margin) has its renewal clamped to the minimum spacing (half of it);
    /// the slot (a hundredth of the 50 ms left after it) then moved it up
    /// to half a millisecond earlier, below the spacing. So did an interval
    /// barely over the spacing once jittered down to it. Many basis
    /// instants, so that some fall inside a slot of the process's grid.
    #[test]
    fn the_slot_never_moves_a_renewal_below_the_minimum_spacing() {
        let start = Instant::now() + Duration::from_secs(1);
        let cases = [
            // (configured interval, jittered interval, usable lease)
            (MS * 60, MS * 60, MS * 100),
            (MS * 52, MS * 48, MS * 1_000),
            (MS * 52, MS * 50, Duration::from_secs(60)),
        ];
        for (renew_interval, interval, usable) in cases {
            for k in 0..200u32 {
                let t0 = start + Duration::from_nanos(u64::from(k) * 37_003);
                let state = leader(t0, usable);
                let plain = state.renew_due(interval).expect("leader");
                let due = slotted_renew_due(&state, renew_interval, interval).expect("leader");
                assert!(
                    due >= t0 + MIN_SPACING,
                    "{renew_interval:?}/{interval:?}/{usable:?}: due {:?} after the basis",
                    due - t0
                );
                assert!(due <= plain);
            }
        }
        // Regression guard: the slots still apply where they have room.
        let state = leader(start, Duration::from_secs(60));
        let mut slotted = 0;
        for k in 0..200u32 {
            let interval = MS * 5_000 - Duration::from_nanos(u64::from(k) * 1_234_567);
            let due = slotted_renew_due(&state, MS * 5_000, interval).expect("leader");
            let plain = state.renew_due(interval).expect("leader");
            assert!(due <= plain && plain - due < MS * 50);
            if due < plain {
                slotted += 1;
            }
        }
        assert!(slotted > 150, "only {slotted} of 200 moved onto a slot");
    }
}
