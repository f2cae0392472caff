//! Retry timing as a pure type ([`Backoff`]), and what a gRPC status code
//! says about retrying ([`classify`]).
//!
//! Pure so that the rules can be tested exhaustively without a server or a
//! clock: the campaign asks how long to wait, this module answers, and a
//! seeded [`Backoff`] answers the same way every time.
//!
//! # Classification
//!
//! | Code | Class | Why |
//! |------|-------|-----|
//! | `Unavailable` | Transient | The canonical "try again": server restarting, connection reset, GOAWAY. |
//! | `DeadlineExceeded` | Transient | Slow answer or lost packet; the next attempt may be fast. |
//! | `Cancelled` | Transient | Usually a connection torn down under the call, not a decision of the service. |
//! | `Aborted` | Transient | A concurrency conflict in the server's store; retrying is the documented answer. |
//! | `Internal` | Transient | Often raised by the transport (h2 protocol errors) rather than the service. |
//! | `Unknown` | Transient | Raised for errors without a status (proxies, transport); no evidence it is lasting. |
//! | `Ok` | Transient | Cannot be a failure; if a caller passes it anyway, the mildest class is the safe reading. |
//! | `ResourceExhausted` | Overloaded | The server or a proxy sheds load: retrying at the usual pace would add to it, so back off harder. |
//! | `Unimplemented` | Permanent | Wrong server or wrong service version; no retry fixes that soon. |
//! | `Unauthenticated` | Permanent | Credentials are missing or rejected; they do not fix themselves within a retry. |
//! | `PermissionDenied` | Permanent | Same, for authorisation. |
//! | `InvalidArgument` | Permanent | The request itself is wrong; the same request stays wrong. |
//! | `FailedPrecondition` | Permanent | The server's state forbids the call; retrying at once cannot change it. |
//! | `NotFound` | Permanent | The service or lock path does not exist on this server. |
//! | `AlreadyExists` | Permanent | A state conflict the same request will hit again. |
//! | `OutOfRange` | Permanent | A parameter (the TTL) the server rejects; the same request stays wrong. |
//! | `DataLoss` | Permanent | The server's store is damaged; hammering it does not help. |
//!
//! "Permanent" does not mean "give up": an election client must keep
//! campaigning (an operator may fix the server), so permanent failures are
//! retried at the slowest pace and callers log them at `warn`.
//!
//! # Timing
//!
//! | Situation | Wait |
//! |-----------|------|
//! | Follower, attempt refused (someone else leads) | uniform in [0.8 × retry period, retry period] |
//! | Follower, Transient failure number *n* | equal jitter of min(100 ms × 2ⁿ⁻¹, retry period) |
//! | Follower, Overloaded failure number *n* | equal jitter of min(400 ms × 2ⁿ⁻¹, retry period) |
//! | Follower, Permanent failure | the retry period |
//! | Leader, Transient or Permanent failure *n*, `left` before the deadline | min(equal jitter of min(100 ms × 2ⁿ⁻¹, renew interval), left / 2) |
//! | Leader, Overloaded failure *n* | the same from 400 ms |
//! | Leader, less than 2 × 50 ms left | no retry: step down at the deadline |
//! | Leader, next renewal | the renew interval minus uniform [0, renew interval / 10 − slot], then moved back to the start of its slot (slot: renew interval / 100, at most 50 ms) |
//!
//! "Equal jitter" is uniform in [step / 2, step]: at least half the step, so
//! a failing server sees a real backoff, and randomised, so that many
//! clients failed by one outage do not retry in lockstep. Every wait is at
//! least [`MIN_SPACING`] (50 ms).
//!
//! A leader's renewal is only ever moved *earlier*: the state machine's
//! `renew_due` rule (at most the renew interval, at most half the lease)
//! is applied to the shortened interval, so a renewal is never later than
//! without jitter. Elections elected together (a cold start of many shards)
//! would otherwise renew in lockstep for ever, one burst per interval.
//!
//! The jittered renewal is then moved to the start of its slot on a grid
//! shared by the whole process, a hundredth of the renew interval wide, at
//! most 50 ms (and at most a hundredth of what is left of the lease after
//! it): renewals due within one slot wake the driver once and go out
//! together, in a few writes, instead of one wake-up each. With 100,000
//! elections renewing every 20 s, that is one wake-up for about 250
//! renewals every 50 ms instead of one for about 5 every millisecond: a
//! quarter less CPU per renewal, measured. The driver sends the renewals
//! that come due together earliest deadline first. Jitter and slot together
//! move a renewal at most a tenth of the interval earlier.
//!
//! A follower's jitter never exceeds the retry period, because users read
//! "retry period 1 s" as "a standby notices a free lock within 1 s".
//!
//! The leader waits at most half the time left, so that a retry always has
//! time for another one after it; the minimum spacing bounds how many
//! retries that halving allows. A lease with 1.7 s left (TTL 3 s, renew
//! interval 1 s) against a server that always fails gets at most 8 retries;
//! the previous rule (jitter under a cap of left / 2, a 10 ms floor, retries
//! until the deadline) made 11 to 20, typically 14.

use std::time::Duration;

use tokio::time::Instant;

/// Base of the exponential backoff: the first retry waits 50–100 ms.
pub(crate) const BACKOFF_BASE: Duration = Duration::from_millis(100);

/// How much higher an Overloaded failure starts than a Transient one.
pub(crate) const OVERLOAD_FACTOR: u32 = 4;

/// The shortest wait between two attempts of a call that reached the
/// server. Protects the server from a client that computes tiny waits (a
/// nearly expired lease, a tiny configured period), and leaves a leader's
/// last retry time for its answer before the deadline.
pub(crate) const MIN_SPACING: Duration = Duration::from_millis(50);

/// Attempts of one call when the transport refuses it before sending (a
/// race with a GOAWAY that closes the connection the call was put on). Such
/// a call never reached the server, so it is retried at once, outside the
/// backoff: the retry goes out on a fresh connection and usually succeeds.
/// Three attempts, because a single immediate retry was seen to land on the
/// connection that was still going away.
pub(crate) const TRANSPORT_ATTEMPTS: u32 = 3;

/// The pause before the n-th transport retry is n times this: long enough
/// for the channel to take in the GOAWAY and reconnect, short against any
/// lease.
pub(crate) const TRANSPORT_RETRY_PAUSE: Duration = Duration::from_millis(10);

/// A renewal goes out up to renew interval / this much early: jitter
/// ([`Backoff::renew_early`]) and slot ([`RENEW_SLOT_DIVISOR`]) together.
pub(crate) const RENEW_JITTER_DIVISOR: u32 = 10;

/// Renewals are moved to the start of a slot renew interval / this wide
/// (at most [`RENEW_SLOT_MAX`]), on a grid shared by the process (see the
/// module doc).
pub(crate) const RENEW_SLOT_DIVISOR: u32 = 100;

/// The widest slot: wide enough that a process renewing thousands of locks
/// per second sends them in batches of a few hundred; narrow enough that a
/// batch is sent within milliseconds and the calls it holds at once stay
/// few (measured at 100,000 locks renewing every 20 s: 200 ms slots saved
/// no more CPU than 50 ms ones, and cost about 200 bytes more memory per
/// election).
pub(crate) const RENEW_SLOT_MAX: Duration = Duration::from_millis(50);

/// The lower bound of a follower's jittered wait, in fifths of the period
/// (so 4 → 0.8 × period).
const FOLLOWER_FLOOR_FIFTHS: u32 = 4;

/// The width of the slots a renewal due at `due` (under a lease until
/// `deadline`) is moved to the start of ([`crate::time::slot_start`]), so
/// that renewals due within one slot, whichever election they belong to,
/// wake the driver once and go out together: a hundredth of the configured
/// renew interval, at most [`RENEW_SLOT_MAX`] (the same for every election
/// with that interval, so that their slots line up), and at most a
/// hundredth of the time from `due` to the deadline (a short lease keeps
/// its spacing). A renewal thus goes out at most that much earlier, never
/// later.
pub(crate) fn renew_slot(renew_interval: Duration, deadline: Instant, due: Instant) -> Duration {
    let left = deadline.saturating_duration_since(due);
    (renew_interval.min(left) / RENEW_SLOT_DIVISOR).min(RENEW_SLOT_MAX)
}

/// What a failure's status code says about retrying it. See the module doc
/// for the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Class {
    /// Likely to go away by itself: retry with the usual backoff.
    Transient,
    /// The server sheds load (`RESOURCE_EXHAUSTED`): back off harder.
    Overloaded,
    /// Will not go away by retrying soon: retry at the slowest pace, warn.
    Permanent,
}

/// The class of a failed call's status code. Exhaustive on purpose: a new
/// code in tonic must be classified here, not fall into a default.
pub(crate) fn classify(code: tonic::Code) -> Class {
    use tonic::Code;
    match code {
        Code::Ok
        | Code::Unavailable
        | Code::DeadlineExceeded
        | Code::Cancelled
        | Code::Aborted
        | Code::Internal
        | Code::Unknown => Class::Transient,
        Code::ResourceExhausted => Class::Overloaded,
        Code::Unimplemented
        | Code::Unauthenticated
        | Code::PermissionDenied
        | Code::InvalidArgument
        | Code::FailedPrecondition
        | Code::NotFound
        | Code::AlreadyExists
        | Code::OutOfRange
        | Code::DataLoss => Class::Permanent,
    }
}

/// The retry timing of one contender. Owns its random generator so that a
/// seeded client (tests, simulations) is deterministic and no lock is
/// shared with anything else to draw a number.
///
/// All arithmetic saturates: any `Duration`, zero or `Duration::MAX`
/// included, gives an answer, never a panic.
#[derive(Debug, Clone)]
pub(crate) struct Backoff {
    retry_period: Duration,
    renew_interval: Duration,
    rng: fastrand::Rng,
}

impl Backoff {
    /// Timing for a contender with these settings; `seed` makes the jitter
    /// reproducible.
    pub(crate) fn new(retry_period: Duration, renew_interval: Duration, seed: Option<u64>) -> Self {
        Backoff {
            retry_period,
            renew_interval,
            rng: seed.map_or_else(fastrand::Rng::new, fastrand::Rng::with_seed),
        }
    }

    /// The wait after an attempt the server refused because another node
    /// holds the lock: uniform in [0.8 × retry period, retry period], never
    /// more than the period (it is a promise about how fast a standby
    /// notices a free lock), and at least [`MIN_SPACING`] (a period below it
    /// is raised to it).
    pub(crate) fn follower_wait(&mut self) -> Duration {
        let period = self.retry_period;
        let floor = period / 5 * FOLLOWER_FLOOR_FIFTHS;
        let spread = period.saturating_sub(floor);
        floor
            .saturating_add(self.random_share(spread))
            .max(MIN_SPACING)
    }

    /// The wait of a follower after its `failures`-th consecutive failed
    /// attempt (counting this one; 0 is read as 1), capped at the retry
    /// period. Permanent failures wait the cap outright: backing off to it
    /// gradually would only hammer a server that cannot answer.
    pub(crate) fn after_failure_as_follower(&mut self, failures: u32, class: Class) -> Duration {
        let cap = self.retry_period;
        let wait = match class {
            Class::Permanent => cap,
            Class::Transient => self.equal_jitter(self.step(BACKOFF_BASE, failures, cap)),
            Class::Overloaded => self.equal_jitter(self.step(self.overload_base(), failures, cap)),
        };
        wait.max(MIN_SPACING)
    }

    /// The wait of a leader before retrying a renewal after its
    /// `failures`-th consecutive failure (counting this one; 0 is read as 1),
    /// with `left` before the lease's safe deadline.
    ///
    /// `Some(wait)`: retry after `wait`, which is the backoff (capped at the
    /// renew interval) but at most `left / 2`, so that there is room for
    /// another retry after this one, and at least [`MIN_SPACING`].
    ///
    /// `None`: no retry fits before the deadline (less than twice the
    /// minimum spacing is left: one spacing before the retry, one for its
    /// answer). The caller stops renewing and steps down at the deadline.
    ///
    /// Permanent failures back off like Transient ones here (the lease is at
    /// stake, so giving up early would be worse); callers log them at `warn`.
    pub(crate) fn after_failure_as_leader(
        &mut self,
        failures: u32,
        class: Class,
        left: Duration,
    ) -> Option<Duration> {
        if left < MIN_SPACING.saturating_mul(2) {
            return None;
        }
        let cap = self.renew_interval;
        let base = match class {
            Class::Transient | Class::Permanent => BACKOFF_BASE,
            Class::Overloaded => self.overload_base(),
        };
        let backoff = self.equal_jitter(self.step(base, failures, cap));
        Some(backoff.min(left / 2).max(MIN_SPACING))
    }

    /// How much earlier than the renew interval the next renewal goes out:
    /// uniform in [0, renew interval / [`RENEW_JITTER_DIVISOR`] − the
    /// widest slot ([`renew_slot`])] (room left for the slot). Only
    /// ever earlier, so the renewal stays inside the safe window; drawn once
    /// per renewal, so elections elected together drift apart.
    pub(crate) fn renew_early(&mut self) -> Duration {
        let slot = (self.renew_interval / RENEW_SLOT_DIVISOR).min(RENEW_SLOT_MAX);
        let jitter = (self.renew_interval / RENEW_JITTER_DIVISOR).saturating_sub(slot);
        self.random_share(jitter)
    }

    fn overload_base(&self) -> Duration {
        BACKOFF_BASE.saturating_mul(OVERLOAD_FACTOR)
    }

    /// `base × 2^(failures − 1)`, capped at `cap`.
    fn step(&self, base: Duration, failures: u32, cap: Duration) -> Duration {
        let doublings = failures.max(1) - 1;
        let factor = 1u32.checked_shl(doublings).unwrap_or(u32::MAX);
        base.saturating_mul(factor).min(cap)
    }

    /// Uniform in [step / 2, step].
    fn equal_jitter(&mut self, step: Duration) -> Duration {
        let half = step / 2;
        half.saturating_add(self.random_share(step.saturating_sub(half)))
    }

    /// Uniform in [0, d], in integer nanoseconds: no float conversion that
    /// could round past `Duration::MAX`.
    fn random_share(&mut self, d: Duration) -> Duration {
        const SCALE: u128 = 1 << 32;
        let numerator = u128::from(self.rng.u64(0..=(1 << 32)));
        let nanos = d.as_nanos().saturating_mul(numerator) / SCALE;
        duration_from_nanos(nanos)
    }
}

/// A `Duration` of `nanos` nanoseconds, saturating at `Duration::MAX`.
fn duration_from_nanos(nanos: u128) -> Duration {
    const PER_SEC: u128 = 1_000_000_000;
    match u64::try_from(nanos / PER_SEC) {
        // The remainder is below 10⁹, so it fits in a u32.
        Ok(secs) => Duration::new(secs, u32::try_from(nanos % PER_SEC).unwrap_or(0)),
        Err(_) => Duration::MAX,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn seeded(retry_period: Duration, renew_interval: Duration, seed: u64) -> Backoff {
        Backoff::new(retry_period, renew_interval, Some(seed))
    }

    #[test]
    fn every_code_has_the_documented_class() {
        use tonic::Code;
        let transient = [
            Code::Ok,
            Code::Unavailable,
            Code::DeadlineExceeded,
            Code::Cancelled,
            Code::Aborted,
            Code::Internal,
            Code::Unknown,
        ];
        let permanent = [
            Code::Unimplemented,
            Code::Unauthenticated,
            Code::PermissionDenied,
            Code::InvalidArgument,
            Code::FailedPrecondition,
            Code::NotFound,
            Code::AlreadyExists,
            Code::OutOfRange,
            Code::DataLoss,
        ];
        for code in transient {
            assert_eq!(classify(code), Class::Transient, "{code:?}");
        }
        for code in permanent {
            assert_eq!(classify(code), Class::Permanent, "{code:?}");
        }
        assert_eq!(classify(Code::ResourceExhausted), Class::Overloaded);
    }

    #[test]
    fn renewal_jitter_only_ever_moves_a_renewal_earlier_by_at_most_a_tenth() {
        use crate::state::ElectionState;
        for interval_ms in [0, 1, 50, 999, 1_000, 5_000, 20_000] {
            let interval = MS * interval_ms;
            let mut b = seeded(MS * 2_000, interval, u64::from(interval_ms));
            let (mut lo, mut hi) = (Duration::MAX, Duration::ZERO);
            for _ in 0..2_000 {
                let early = b.renew_early();
                assert!(early <= interval / 10, "{early:?} of {interval:?}");
                lo = lo.min(early);
                hi = hi.max(early);
            }
            // It really spreads (over most of the allowed range).
            if interval_ms >= 50 {
                assert!(
                    lo < interval / 100 && hi > interval * 9 / 100 * 9 / 10,
                    "{lo:?}..{hi:?}"
                );
            }
        }
        // Applied to the state machine's rule, the renewal is never later
        // than without jitter, and never sooner than the minimum spacing.
        let ttl = Duration::from_secs(15);
        for (interval, lease) in [(5, 15), (5, 4), (1, 15), (14, 15)] {
            let interval = Duration::from_secs(interval);
            let t0 = tokio::time::Instant::now();
            let state =
                ElectionState::leading_since(ttl, MS * 1_500, t0, Duration::from_secs(lease));
            let plain = state.renew_due(interval).expect("leader");
            let mut b = seeded(MS * 2_000, interval, 7);
            let deadline = state.deadline().expect("leader");
            let mut slots = std::collections::HashSet::new();
            for _ in 0..500 {
                let due = state
                    .renew_due(interval.saturating_sub(b.renew_early()))
                    .expect("leader");
                let due = crate::time::slot_start(due, renew_slot(interval, deadline, due));
                assert!(due <= plain, "{interval:?}: {due:?} > {plain:?}");
                assert!(due >= t0 + MIN_SPACING);
                assert!(plain.duration_since(due) <= interval / 10);
                slots.insert(due);
            }
            // Moved onto slots: 500 draws over the jitter's range share
            // about 9 of them (the range is 9 slots wide).
            assert!(slots.len() <= 10, "{interval:?}: {} distinct", slots.len());
        }
    }

    #[test]
    fn a_slot_is_a_hundredth_of_the_interval_at_most_50ms_and_a_hundredth_of_the_lease_left() {
        let now = Instant::now();
        let far = now + Duration::from_secs(3600);
        assert_eq!(renew_slot(MS * 1_000, far, now), MS * 10);
        assert_eq!(renew_slot(MS * 5_000, far, now), MS * 50);
        assert_eq!(renew_slot(MS * 20_000, far, now), RENEW_SLOT_MAX);
        assert_eq!(renew_slot(Duration::MAX, far, now), RENEW_SLOT_MAX);
        // A short lease: a hundredth of what is left after the renewal.
        assert_eq!(renew_slot(MS * 20_000, now + MS * 300, now), MS * 3);
        assert_eq!(renew_slot(MS * 20_000, now, now), Duration::ZERO);
        assert_eq!(renew_slot(Duration::ZERO, far, now), Duration::ZERO);
        // Jitter and the widest slot stay within a tenth of the interval.
        for interval_ms in [1, 100, 5_000, 20_000, 3_600_000] {
            let interval = MS * interval_ms;
            let mut b = seeded(MS * 2_000, interval, 3);
            for _ in 0..200 {
                let early = b.renew_early();
                assert!(early + renew_slot(interval, far, now) <= interval / 10);
            }
        }
    }

    #[test]
    fn follower_jitter_never_exceeds_the_period_nor_goes_under_four_fifths() {
        for period_ms in [50, 51, 99, 100, 333, 1_000, 2_000, 60_000] {
            let period = MS * period_ms;
            let mut b = seeded(period, period, u64::from(period_ms));
            let (mut lo, mut hi) = (Duration::MAX, Duration::ZERO);
            for _ in 0..10_000 {
                let w = b.follower_wait();
                assert!(w <= period, "{w:?} > {period:?}");
                assert!(w >= period.mul_f64(0.8), "{w:?} < 0.8 × {period:?}");
                lo = lo.min(w);
                hi = hi.max(w);
            }
            if period_ms >= 100 {
                // Spread over the whole range, not stuck at one end.
                assert!(lo < period.mul_f64(0.81), "{lo:?}");
                assert!(hi > period.mul_f64(0.99), "{hi:?}");
            }
        }
    }

    #[test]
    fn follower_wait_is_at_least_the_min_spacing_for_a_tiny_period() {
        let mut b = seeded(MS * 10, MS * 10, 1);
        for _ in 0..1_000 {
            assert_eq!(b.follower_wait(), MIN_SPACING);
        }
    }

    #[test]
    fn follower_backoff_doubles_from_100ms_within_equal_jitter_and_caps_at_the_period() {
        let period = Duration::from_secs(2);
        let mut b = seeded(period, period, 7);
        for failures in 1..=40u32 {
            let step = (MS * 100)
                .saturating_mul(1 << (failures - 1).min(20))
                .min(period);
            for _ in 0..500 {
                let w = b.after_failure_as_follower(failures, Class::Transient);
                assert!(w <= step && w >= (step / 2).max(MIN_SPACING));
                assert!(w <= period);
            }
        }
    }

    #[test]
    fn follower_backoff_never_goes_under_the_min_spacing() {
        for period in [Duration::ZERO, MS, MS * 20, MS * 60] {
            let mut b = seeded(period, period, 3);
            for class in [Class::Transient, Class::Overloaded, Class::Permanent] {
                for failures in 0..10 {
                    assert!(b.after_failure_as_follower(failures, class) >= MIN_SPACING);
                }
            }
        }
    }

    #[test]
    fn permanent_failure_waits_the_retry_period() {
        let period = MS * 1_500;
        let mut b = seeded(period, period, 5);
        for failures in 0..100 {
            assert_eq!(
                b.after_failure_as_follower(failures, Class::Permanent),
                period
            );
        }
    }

    #[test]
    fn overloaded_waits_at_least_as_long_as_transient_for_the_same_failure_count() {
        let period = Duration::from_secs(3);
        let left = Duration::from_secs(60);
        for seed in 0..200 {
            let mut transient = seeded(period, period, seed);
            let mut overloaded = seeded(period, period, seed);
            for failures in 1..12 {
                let t = transient.after_failure_as_follower(failures, Class::Transient);
                let o = overloaded.after_failure_as_follower(failures, Class::Overloaded);
                assert!(o >= t, "follower, {failures} failures: {o:?} < {t:?}");
                let t = transient.after_failure_as_leader(failures, Class::Transient, left);
                let o = overloaded.after_failure_as_leader(failures, Class::Overloaded, left);
                assert!(o >= t, "leader, {failures} failures: {o:?} < {t:?}");
            }
        }
        // And strictly harder before the cap.
        let mut b = seeded(period, period, 9);
        for _ in 0..1_000 {
            assert!(b.after_failure_as_follower(1, Class::Overloaded) >= MS * 200);
            assert!(b.after_failure_as_follower(1, Class::Transient) <= MS * 100);
        }
    }

    #[test]
    fn leader_retry_waits_at_most_half_the_time_left_and_at_least_the_min_spacing() {
        let mut b = seeded(Duration::from_secs(2), Duration::from_secs(5), 11);
        for left_ms in (100..5_000).step_by(7) {
            let left = MS * left_ms;
            for failures in 1..10 {
                for class in [Class::Transient, Class::Overloaded, Class::Permanent] {
                    let w = b.after_failure_as_leader(failures, class, left);
                    let Some(w) = w else {
                        panic!("{left:?} left must allow a retry");
                    };
                    assert!(w >= MIN_SPACING, "{w:?}");
                    assert!(w <= left / 2, "{w:?} > half of {left:?}");
                    assert!(left - w >= MIN_SPACING, "no room for the answer");
                }
            }
        }
    }

    #[test]
    fn leader_does_not_retry_with_less_than_twice_the_min_spacing_left() {
        let mut b = seeded(Duration::from_secs(2), Duration::from_secs(5), 13);
        for left in [Duration::ZERO, MS, MS * 49, MS * 50, MS * 99] {
            for class in [Class::Transient, Class::Overloaded, Class::Permanent] {
                assert_eq!(b.after_failure_as_leader(1, class, left), None, "{left:?}");
            }
        }
        assert!(b
            .after_failure_as_leader(1, Class::Transient, MS * 100)
            .is_some_and(|w| w == MIN_SPACING));
    }

    #[test]
    fn leader_backoff_caps_at_the_renew_interval() {
        let renew = MS * 700;
        let mut b = seeded(Duration::from_secs(2), renew, 17);
        for failures in 1..64 {
            for _ in 0..100 {
                let w = b.after_failure_as_leader(failures, Class::Overloaded, Duration::MAX);
                assert!(w.is_some_and(|w| w <= renew));
            }
        }
    }

    /// A lease with 1.7 s left (TTL 3 s, renew interval 1 s, margin 300 ms,
    /// at the first failed renewal) against a server that always fails.
    #[test]
    fn a_failing_server_gets_at_most_8_leader_retries_in_a_1_7s_lease() {
        let mut worst = 0;
        for seed in 0..5_000 {
            for class in [Class::Transient, Class::Overloaded, Class::Permanent] {
                let mut b = seeded(Duration::from_secs(1), Duration::from_secs(1), seed);
                let mut left = MS * 1_700;
                let mut retries = 0;
                let mut failures = 0;
                loop {
                    failures += 1;
                    match b.after_failure_as_leader(failures, class, left) {
                        Some(wait) => {
                            assert!(wait < left, "a retry must land before the deadline");
                            left -= wait;
                            retries += 1;
                        }
                        None => break,
                    }
                }
                worst = worst.max(retries);
            }
        }
        assert!(worst <= 8, "{worst} retries");
        assert!(worst >= 4, "{worst} retries: the leader should still try");
    }

    #[test]
    fn extreme_durations_and_counts_never_panic() {
        let extremes = [Duration::ZERO, Duration::from_nanos(1), Duration::MAX];
        for &period in &extremes {
            for &renew in &extremes {
                let mut b = Backoff::new(period, renew, Some(1));
                assert!(b.follower_wait() >= MIN_SPACING);
                for failures in [0, 1, 2, 31, 32, 33, 64, u32::MAX] {
                    for class in [Class::Transient, Class::Overloaded, Class::Permanent] {
                        assert!(b.after_failure_as_follower(failures, class) >= MIN_SPACING);
                        for &left in &extremes {
                            let _ = b.after_failure_as_leader(failures, class, left);
                        }
                    }
                }
            }
        }
        let mut b = Backoff::new(Duration::MAX, Duration::MAX, Some(2));
        assert!(b.follower_wait() >= Duration::MAX / 5 * 4);
    }

    #[test]
    fn a_seeded_backoff_is_deterministic() {
        let draw = |seed| {
            let mut b = seeded(Duration::from_secs(2), Duration::from_secs(5), seed);
            let mut out = Vec::new();
            for failures in 1..20 {
                out.push(Some(b.follower_wait()));
                out.push(Some(
                    b.after_failure_as_follower(failures, Class::Transient),
                ));
                out.push(b.after_failure_as_leader(
                    failures,
                    Class::Transient,
                    Duration::from_secs(10),
                ));
            }
            out
        };
        assert_eq!(draw(42), draw(42));
        assert_ne!(draw(42), draw(43));
    }

    #[test]
    fn random_share_stays_within_zero_and_its_input() {
        let mut b = seeded(MS, MS, 21);
        for d in [Duration::ZERO, MS, Duration::from_secs(1), Duration::MAX] {
            for _ in 0..1_000 {
                assert!(b.random_share(d) <= d);
            }
        }
    }
}
