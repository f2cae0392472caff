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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_never_panic() {
        let now = Instant::now();
        assert_eq!(
            after(now, Duration::from_secs(1)),
            now + Duration::from_secs(1)
        );
        assert!(after(now, Duration::MAX) > now + Duration::from_secs(86_400 * 365));
    }
}
