//! Checked time arithmetic. `Instant + Duration` panics on overflow, and
//! durations here can come from the server or from the builder, so every sum
//! of that kind goes through [`after`].
//!
//! Also the process-wide grid that timers which may fire a little early are
//! moved onto ([`slot_start`]), so that those due at about the same time
//! fire together.

use std::sync::OnceLock;
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

/// The start of the slot of width `width` that `at` falls in, on a grid
/// shared by the whole process (every runtime, connection and election):
/// instants in one slot all map to the same start. Never later than `at`,
/// and less than `width` earlier; `at` itself for a zero width, and for an
/// instant before the grid's origin (taken the first time this is called).
pub(crate) fn slot_start(at: Instant, width: Duration) -> Instant {
    static ORIGIN: OnceLock<std::time::Instant> = OnceLock::new();
    let width = width.as_nanos();
    if width == 0 {
        return at;
    }
    let origin = Instant::from_std(*ORIGIN.get_or_init(std::time::Instant::now));
    let Some(since) = at.checked_duration_since(origin) else {
        return at;
    };
    // Less than `width`, itself a `Duration`'s nanoseconds: it fits.
    let into = u64::try_from(since.as_nanos() % width).unwrap_or(0);
    at.checked_sub(Duration::from_nanos(into)).unwrap_or(at)
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

    #[test]
    fn instants_in_one_slot_share_its_start_which_is_never_later_nor_a_width_earlier() {
        let width = Duration::from_millis(10);
        let base = slot_start(Instant::now() + Duration::from_secs(1), width);
        // `base` starts a slot: it maps to itself, and so does every instant
        // up to the next slot's start, exclusive.
        assert_eq!(slot_start(base, width), base);
        for offset_us in [1, 999, 5_000, 9_999] {
            let at = base + Duration::from_micros(offset_us);
            assert_eq!(slot_start(at, width), base, "{offset_us} us into the slot");
        }
        let next = base + width;
        assert_eq!(slot_start(next, width), next);
        assert_eq!(slot_start(next + Duration::from_nanos(1), width), next);
        // Any instant: at most itself, less than one width earlier, and on
        // the same grid as `base` (a whole number of widths from it).
        let mut at = base;
        for step_ns in [1u64, 3, 7_777_777, 123_456_789, 999_999_999] {
            at += Duration::from_nanos(step_ns);
            let start = slot_start(at, width);
            assert!(start <= at && at - start < width, "{at:?} -> {start:?}");
            assert_eq!((start - base).as_nanos() % width.as_nanos(), 0);
        }
    }

    #[test]
    fn a_zero_width_an_instant_before_the_grid_and_extreme_widths_change_nothing_or_stay_in_range()
    {
        let now = Instant::now();
        assert_eq!(slot_start(now, Duration::ZERO), now);
        // The grid's origin is at or before its first use: an instant well
        // before it is left as it is.
        let _ = slot_start(now, Duration::from_millis(1));
        if let Some(before) = now.checked_sub(Duration::from_secs(3600)) {
            assert_eq!(slot_start(before, Duration::from_millis(1)), before);
        }
        for width in [
            Duration::from_nanos(1),
            Duration::MAX,
            Duration::from_secs(u64::MAX / 2),
        ] {
            let start = slot_start(now, width);
            assert!(start <= now, "{width:?}");
        }
    }
}
