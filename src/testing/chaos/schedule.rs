//! The fault schedule: two lanes (server, contenders) that, during storms
//! only, wait a random healthy gap, deal the next kind from a shuffled deck,
//! draw its parameters and inject it. Everything drawn comes from the lane's
//! seeded generator, so the schedule is a function of the seed alone.

use std::collections::BTreeMap;
use std::time::Duration;

use tokio::time::{sleep, sleep_until, Instant};

use super::harness::Harness;
use super::{lock, FaultKind};

/// Random numbers drawn for one fault, whatever its kind uses.
pub(super) struct Draw {
    /// Scales the fault's main duration or size.
    pub(super) a: f64,
    /// A second draw (a second duration, or a choice between variants).
    pub(super) b: f64,
    /// A contender, for faults that hit one.
    pub(super) target: usize,
    /// Whether to hit the leader (if any) rather than `target`.
    pub(super) prefer_leader: bool,
    /// Seeds a sub-generator, for faults that draw a variable number of
    /// values (so that the main schedule does not shift).
    pub(super) sub: u64,
}

impl Harness {
    /// One lane of the schedule: gap, fault, heal, until `end` has passed and
    /// every kind was injected once (or `hard_end`).
    pub(super) async fn lane(
        &self,
        kinds: Vec<FaultKind>,
        mut rng: fastrand::Rng,
        end: Instant,
        hard_end: Instant,
    ) {
        if kinds.is_empty() {
            return;
        }
        let max_gap = self.config.fault_gap.unwrap_or(self.config.ttl);
        let mut deck: Vec<FaultKind> = Vec::new();
        let mut done: BTreeMap<FaultKind, u32> = BTreeMap::new();
        loop {
            let now = Instant::now();
            let all_once = kinds.iter().all(|k| done.get(k).copied().unwrap_or(0) > 0);
            if now >= hard_end || (now >= end && all_once) {
                break;
            }
            let gap = max_gap.mul_f64(0.2 + 0.8 * rng.f64());
            sleep(gap).await;
            if let Some(storm) = self.next_storm(Instant::now()) {
                sleep_until(storm).await;
            }
            if deck.is_empty() {
                deck.clone_from(&kinds);
                rng.shuffle(&mut deck);
            }
            let Some(kind) = deck.pop() else { break };
            // Draw every parameter up front, whatever the kind needs, so the
            // schedule depends on the seed alone.
            let draw = Draw {
                a: rng.f64(),
                b: rng.f64(),
                target: rng.usize(..self.contenders.len()),
                prefer_leader: rng.f64() < 0.75,
                sub: rng.u64(..),
            };
            if self.inject(kind, draw).await {
                *done.entry(kind).or_default() += 1;
            } else {
                *lock(&self.record).skipped.entry(kind).or_default() += 1;
            }
        }
    }

    /// During a calm period: when the next storm begins.
    fn next_storm(&self, now: Instant) -> Option<Instant> {
        let ttl = self.config.ttl;
        let storm = self.config.storm.unwrap_or(ttl * 9);
        let calm = self.config.calm.unwrap_or(ttl * 3);
        let period = (storm + calm).as_nanos();
        if calm.is_zero() || period == 0 {
            return None;
        }
        let phase = (now - self.t0).as_nanos() % period;
        let storm_nanos = storm.as_nanos();
        (phase >= storm_nanos)
            .then(|| now + Duration::from_nanos(u64::try_from(period - phase).unwrap_or(u64::MAX)))
    }

    /// The fault's target: the leader if the draw prefers it and there is
    /// one, else the drawn contender.
    pub(super) fn target(&self, draw: &Draw) -> usize {
        if draw.prefer_leader {
            self.leader().unwrap_or(draw.target)
        } else {
            draw.target
        }
    }
}
