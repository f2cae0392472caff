//! Checked time arithmetic. `Instant + Duration` panics on overflow, and
//! durations here can come from the server or from the builder, so every sum
//! of that kind goes through [`after`].

use std::time::Duration;

use tokio::time::Instant;

/// About 30 years: "never" for a timer, and far from any overflow.
const FAR: Duration = Duration::from_secs(86_400 * 365 * 30);

/// `at + d`, saturating at about 30 years after `at` (and at `at` itself if
/// even that is out of range), never panicking.
pub(crate) fn after(at: Instant, d: Duration) -> Instant {
    at.checked_add(d)
        .or_else(|| at.checked_add(FAR))
        .unwrap_or(at)
}

/// `true` when a call that failed with `status` failed because its budget
/// ran out (ours, or tonic's own deadline from the request's grpc-timeout,
/// which reports `Cancelled`): the connection under it may be dead.
pub(crate) fn is_timeout(status: &tonic::Status, budget_end: Instant, now: Instant) -> bool {
    matches!(
        status.code(),
        tonic::Code::DeadlineExceeded | tonic::Code::Cancelled
    ) && now >= budget_end
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_never_panic() {
        let now = Instant::now();
        assert_eq!(after(now, Duration::from_secs(1)), now + Duration::from_secs(1));
        assert!(after(now, Duration::MAX) > now + Duration::from_secs(86_400 * 365));
    }

    #[test]
    fn a_cancelled_call_at_its_budget_is_a_timeout() {
        let now = Instant::now();
        let cancelled = tonic::Status::cancelled("Timeout expired");
        assert!(is_timeout(&cancelled, now, now));
        assert!(!is_timeout(&cancelled, now + Duration::from_secs(1), now));
        assert!(!is_timeout(&tonic::Status::unavailable("x"), now, now));
    }
}
