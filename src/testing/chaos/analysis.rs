//! The checks: leader intervals (from the contenders' records) against each
//! other and against the server's tenures, and the figures of the report.
//! The rules are in the [module documentation](super#what-is-checked).

use std::collections::BTreeMap;
use std::time::Duration;

use tokio::time::Instant;

use super::faults::Blocking;
use super::record::{FaultRec, Record, TermRec};
use super::{dedup, ChaosConfig, ChaosReport, DropSample, FaultKind, Violation, SLACK};
use crate::testing::{Tenure, TenureEnd};
use crate::{LossReason, Timing};

/// A span of time as offsets from the start of the run.
type Span = (Duration, Duration);

/// Sorts and merges overlapping spans (empty ones dropped).
fn merge(mut spans: Vec<Span>) -> Vec<Span> {
    spans.retain(|s| s.1 > s.0);
    spans.sort();
    let mut out: Vec<Span> = Vec::with_capacity(spans.len());
    for s in spans {
        match out.last_mut() {
            Some(last) if s.0 <= last.1 => last.1 = last.1.max(s.1),
            _ => out.push(s),
        }
    }
    out
}

fn total(spans: &[Span]) -> Duration {
    spans.iter().map(|s| s.1 - s.0).sum()
}

/// The intersection of two merged span lists.
fn intersect(a: &[Span], b: &[Span]) -> Vec<Span> {
    let (mut i, mut j) = (0, 0);
    let mut out = Vec::new();
    while i < a.len() && j < b.len() {
        let lo = a[i].0.max(b[j].0);
        let hi = a[i].1.min(b[j].1);
        if lo < hi {
            out.push((lo, hi));
        }
        if a[i].1 < b[j].1 {
            i += 1;
        } else {
            j += 1;
        }
    }
    out
}

/// `within` minus the merged spans `blocked`.
fn complement(within: Span, blocked: &[Span]) -> Vec<Span> {
    let mut out = Vec::new();
    let mut from = within.0;
    for b in blocked {
        if b.1 <= from {
            continue;
        }
        if b.0 >= within.1 {
            break;
        }
        if b.0 > from {
            out.push((from, b.0));
        }
        from = from.max(b.1);
    }
    if from < within.1 {
        out.push((from, within.1));
    }
    out
}

/// The `q` quantile of sorted values (nearest rank).
pub(super) fn percentile(sorted: &[Duration], q: f64) -> Option<Duration> {
    if sorted.is_empty() {
        return None;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted.get(rank.clamp(1, sorted.len()) - 1).copied()
}

/// A leader interval, ready for checking.
#[derive(Debug, Clone)]
struct Interval {
    contender: usize,
    term: u64,
    start: Duration,
    end: Duration,
    /// Set when the interval outlived a tenure that a restart dropped: the
    /// drop instant.
    dropped_at: Option<Duration>,
}

/// Everything the analysis needs, collected when the run is over.
pub(super) struct Analysis {
    pub(super) seed: u64,
    pub(super) contenders: usize,
    pub(super) ttl: Duration,
    pub(super) timing: Timing,
    pub(super) t0: Instant,
    pub(super) schedule_end: Instant,
    pub(super) stop: Instant,
    pub(super) ids: Vec<String>,
    pub(super) record: Record,
    pub(super) tenures: Vec<Tenure>,
    pub(super) callback_violations: Vec<(usize, Instant, String)>,
    pub(super) callback_elected: u64,
    pub(super) callback_lost: u64,
    pub(super) goaway_frames: u64,
}

impl Analysis {
    fn off(&self, t: Instant) -> Duration {
        t.saturating_duration_since(self.t0)
    }

    fn id(&self, i: usize) -> String {
        self.ids.get(i).cloned().unwrap_or_else(|| format!("#{i}"))
    }

    /// When a fault may keep everyone from leading: from its start until the
    /// protocol can have elected someone again. The old lock expires at most
    /// a TTL after the fault began (its last renewal was before), and a
    /// follower's next attempt comes at most 1.2 retry periods after the
    /// heal or the expiry; answers delayed by a latency fault arrive up to
    /// one RPC timeout later.
    fn blocked_span(&self, f: &FaultRec) -> Span {
        let mut until =
            f.heal.max(f.start + self.ttl) + self.timing.retry_period.mul_f64(1.2) + SLACK;
        if f.kind == FaultKind::Latency {
            until += self.timing.rpc_timeout;
        }
        (self.off(f.start), self.off(until))
    }

    /// Whether `t`'s contender had its runtime starved between the term's
    /// start and `until` (the consumer then sees its events late).
    fn starved(&self, t: &TermRec, until: Instant) -> bool {
        self.record.faults.iter().any(|f| {
            f.kind == FaultKind::StarvedRuntime
                && f.target == Some(t.contender)
                && f.start <= until
                && t.start <= f.heal + SLACK
        })
    }

    /// Checks the rules and computes the figures.
    pub(super) fn analyze(self) -> ChaosReport {
        let mut report = ChaosReport {
            seed: self.seed,
            contenders: self.contenders,
            ttl: self.ttl,
            timing: self.timing,
            duration: self.off(self.schedule_end),
            goaway_frames: self.goaway_frames,
            rpc_failures: self.record.rpc_failures,
            callback_elected: self.callback_elected,
            callback_lost: self.callback_lost,
            problems: self.record.problems.clone(),
            skipped: self.record.skipped.clone(),
            ..ChaosReport::empty(&ChaosConfig {
                seed: self.seed,
                contenders: self.contenders,
                ttl: self.ttl,
                ..ChaosConfig::default()
            })
        };
        for f in &self.record.faults {
            *report.faults.entry(f.kind).or_default() += 1;
        }
        for (i, at, detail) in &self.record.stream_violations {
            report.violations.push(Violation::Unpaired {
                contender: self.id(*i),
                consumer: "stream",
                detail: detail.clone(),
                at: self.off(*at),
            });
        }
        for (i, at, detail) in &self.callback_violations {
            report.violations.push(Violation::Unpaired {
                contender: self.id(*i),
                consumer: "callbacks",
                detail: detail.clone(),
                at: self.off(*at),
            });
        }

        // Intervals: from Elected received to the later of cancelled() and
        // Lost received.
        let mut intervals = Vec::with_capacity(self.record.terms.len());
        for t in &self.record.terms {
            report.terms += 1;
            match (t.lost, t.exit) {
                (Some((_, reason)), _) => {
                    report.closed_by_lost += 1;
                    match reason {
                        LossReason::Expired => report.expired += 1,
                        LossReason::Rejected => report.rejected += 1,
                        _ => {}
                    }
                }
                (None, Some(_)) => report.closed_by_exit += 1,
                (None, None) => {}
            }
            let end = match (t.cancelled, t.lost) {
                // The consumer was starved with the rest of its runtime: its
                // `Lost` comes late through no fault of the client; the
                // term's end as the (unblocked) harness saw it counts.
                (Some(c), Some((l, _))) if self.starved(t, l) => c,
                (Some(c), Some((l, _))) => c.max(l),
                (Some(c), None) if t.exit.is_some() => c,
                (Some(c), None) => {
                    report.violations.push(Violation::Unpaired {
                        contender: self.id(t.contender),
                        consumer: "stream",
                        detail: format!("term {} ended but its Lost never arrived", t.term),
                        at: self.off(c),
                    });
                    c
                }
                (None, lost) => {
                    report.violations.push(Violation::Unpaired {
                        contender: self.id(t.contender),
                        consumer: "stream",
                        detail: format!(
                            "term {} never ended (its cancelled() never fired)",
                            t.term
                        ),
                        at: self.off(t.start),
                    });
                    lost.map_or(self.stop, |(l, _)| l)
                }
            };
            intervals.push(Interval {
                contender: t.contender,
                term: t.term,
                start: self.off(t.start),
                end: self.off(end.max(t.start)),
                dropped_at: None,
            });
        }

        // Invariant 2: inside one tenure of the same contender.
        let mut min_slack: Option<Duration> = None;
        for iv in &mut intervals {
            if iv.end <= iv.start {
                // The term had ended before its consumer saw it (a starved
                // consumer): no leader work ran in it.
                continue;
            }
            let owner = self.ids.get(iv.contender);
            let tenure = self.tenures.iter().find(|t| {
                owner.is_some_and(|id| wire_id_of(&t.owner, id))
                    && self.off(t.start) <= iv.start
                    && iv.start < self.off(t.end)
            });
            let Some(tenure) = tenure else {
                report.violations.push(Violation::NoTenure {
                    contender: self.id(iv.contender),
                    term: iv.term,
                    at: iv.start,
                });
                continue;
            };
            let tenure_end = self.off(tenure.end);
            if iv.end <= tenure_end {
                // A release ends the tenure right after the client stepped
                // down; the interesting margin is the one to an expiry.
                if tenure.ended_by != TenureEnd::Released {
                    let slack = tenure_end - iv.end;
                    min_slack = Some(min_slack.map_or(slack, |m| m.min(slack)));
                }
            } else if tenure.ended_by == TenureEnd::Dropped {
                iv.dropped_at = Some(tenure_end);
            } else {
                report.violations.push(Violation::PastExpiry {
                    contender: self.id(iv.contender),
                    term: iv.term,
                    at: tenure_end,
                    excess: iv.end - tenure_end,
                    ended_by: tenure.ended_by,
                });
            }
        }
        report.min_lease_slack = min_slack;

        // Invariant 1: no two contenders' intervals overlap (except after a
        // dropped lock table, measured separately).
        intervals.sort_by_key(|iv| (iv.start, iv.end));
        let mut drop_overlap: BTreeMap<Duration, Duration> = BTreeMap::new();
        for i in 0..intervals.len() {
            for j in i + 1..intervals.len() {
                let (a, b) = (&intervals[i], &intervals[j]);
                if b.start >= a.end {
                    break;
                }
                if a.contender == b.contender {
                    continue;
                }
                let from = b.start;
                let to = a.end.min(b.end);
                if to <= from {
                    continue;
                }
                let explained = [a, b]
                    .iter()
                    .find_map(|iv| iv.dropped_at.filter(|d| from >= *d));
                match explained {
                    Some(d) => {
                        let o = drop_overlap.entry(d).or_default();
                        *o = (*o).max(to - from);
                    }
                    None => report.violations.push(Violation::TwoLeaders {
                        first: self.id(a.contender),
                        first_term: a.term,
                        second: self.id(b.contender),
                        second_term: b.term,
                        at: from,
                        overlap: to - from,
                    }),
                }
            }
        }

        // Dropped tables: how long the old owner went on, and the overlap.
        for t in self
            .tenures
            .iter()
            .filter(|t| t.ended_by == TenureEnd::Dropped)
        {
            let at = self.off(t.end);
            let owner = self
                .ids
                .iter()
                .position(|id| wire_id_of(&t.owner, id))
                .unwrap_or(usize::MAX);
            let stale = intervals
                .iter()
                .filter(|iv| iv.contender == owner && iv.start <= at && at < iv.end)
                .map(|iv| iv.end - at)
                .max()
                .unwrap_or_default();
            report.drop_samples.push(DropSample {
                at,
                owner: t.owner.clone(),
                stale,
                overlap: drop_overlap.get(&at).copied().unwrap_or_default(),
            });
        }

        // Gaps between consecutive terms (intervals are sorted by start).
        let mut gaps = Vec::new();
        let mut min_gap: Option<Duration> = None;
        let mut prev: Option<(Duration, usize)> = None; // (latest end, its contender)
        for iv in &intervals {
            if let Some((end, who)) = prev {
                let gap = iv.start.saturating_sub(end);
                if iv.start >= end {
                    gaps.push(gap);
                }
                if who != iv.contender {
                    min_gap = Some(min_gap.map_or(gap, |m| m.min(gap)));
                }
            }
            prev = match prev {
                Some((end, who)) if end >= iv.end => Some((end, who)),
                _ => Some((iv.end, iv.contender)),
            };
        }
        gaps.sort();
        report.min_gap = min_gap;
        report.handovers = gaps.len();
        report.handover_p50 = percentile(&gaps, 0.5);
        report.handover_p99 = percentile(&gaps, 0.99);

        // Availability: leadership within the time no fault blocked.
        let led = merge(intervals.iter().map(|iv| (iv.start, iv.end)).collect());
        let window: Span = (Duration::ZERO, self.off(self.stop));
        let mut blocked: Vec<Span> = vec![(
            Duration::ZERO,
            self.timing.retry_period.mul_f64(1.2) + self.timing.rpc_timeout + SLACK,
        )];
        for f in &self.record.faults {
            let counts = match f.kind.blocks() {
                Blocking::Always => true,
                Blocking::Never => false,
                Blocking::IfSlowerThanTimeout => f.latency >= self.timing.rpc_timeout.mul_f64(0.8),
                Blocking::IfTargetLed => f.target.is_some_and(|t| {
                    let (s, h) = (self.off(f.start), self.off(f.heal));
                    intervals
                        .iter()
                        .any(|iv| iv.contender == t && iv.start <= h && s <= iv.end)
                }),
            };
            if counts {
                blocked.push(self.blocked_span(f));
            }
        }
        let blocked = merge(blocked);
        let healthy = complement(window, &blocked);
        let healthy_total = total(&healthy);
        report.fault_free = healthy_total;
        if !healthy_total.is_zero() {
            let led_healthy = total(&intersect(&led, &healthy));
            report.availability = Some(led_healthy.as_secs_f64() / healthy_total.as_secs_f64());
        }
        let window_led = total(&intersect(&led, &[window]));
        if !window.1.is_zero() {
            report.leader_fraction = window_led.as_secs_f64() / window.1.as_secs_f64();
        }

        // Losses no blocking fault explains.
        for t in &self.record.terms {
            if let Some((at, LossReason::Expired | LossReason::Rejected)) = t.lost {
                let at = self.off(at);
                if !blocked.iter().any(|b| b.0 <= at && at <= b.1) {
                    report.unexplained_losses += 1;
                    tracing::info!(
                        contender = %self.id(t.contender),
                        term = t.term,
                        at = format!("{:.3}s", at.as_secs_f64()),
                        "lease lost while no blocking fault was active"
                    );
                }
            }
        }
        for v in &report.violations {
            let at = v.at();
            let suspects: Vec<FaultKind> = dedup(
                &self
                    .record
                    .faults
                    .iter()
                    .filter(|f| {
                        let (from, to) = self.blocked_span(f);
                        from.saturating_sub(SLACK) <= at && at <= to
                    })
                    .map(|f| f.kind)
                    .collect::<Vec<_>>(),
            );
            let names: Vec<&str> = suspects.iter().map(|k| k.name()).collect();
            tracing::error!(seed = self.seed, violation = %v, suspects = names.join(","), "chaos violation");
            report.suspects.push(suspects);
        }
        report
    }
}

/// `true` if `owner` (a lock owner on the server) is client `id` under one of
/// its incarnations: `id` itself, or `id#N.tag` after a release whose outcome
/// was unknown.
fn wire_id_of(owner: &str, id: &str) -> bool {
    owner == id
        || owner
            .strip_prefix(id)
            .is_some_and(|rest| rest.starts_with('#'))
}

#[cfg(test)]
mod tests {
    use super::super::{DOMAIN, SERVICE};
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn tenure(owner: &str, t0: Instant, start: u64, end: u64, how: TenureEnd) -> Tenure {
        Tenure {
            service: SERVICE.into(),
            domain: DOMAIN.into(),
            owner: owner.into(),
            start: t0 + ms(start),
            end: t0 + ms(end),
            expiry: t0 + ms(end),
            renewals: 0,
            ended_by: how,
        }
    }

    fn term(contender: usize, id: u64, t0: Instant, start: u64, end: u64) -> TermRec {
        TermRec {
            contender,
            term: id,
            start: t0 + ms(start),
            cancelled: Some(t0 + ms(end)),
            lost: Some((t0 + ms(end), LossReason::Expired)),
            exit: None,
        }
    }

    fn analysis(t0: Instant, terms: Vec<TermRec>, tenures: Vec<Tenure>) -> Analysis {
        Analysis {
            seed: 1,
            contenders: 2,
            ttl: Duration::from_secs(3),
            timing: Timing::for_ttl(Duration::from_secs(3)),
            t0,
            schedule_end: t0 + ms(20_000),
            stop: t0 + ms(20_000),
            ids: vec!["a".into(), "b".into()],
            record: Record {
                terms,
                ..Record::default()
            },
            tenures,
            callback_violations: Vec::new(),
            callback_elected: 0,
            callback_lost: 0,
            goaway_frames: 0,
        }
    }

    #[test]
    fn clean_handover_has_no_violation_and_measures_the_gap() {
        let t0 = Instant::now();
        let r = analysis(
            t0,
            vec![term(0, 1, t0, 100, 2_000), term(1, 1, t0, 2_500, 6_000)],
            vec![
                tenure("a", t0, 90, 2_300, TenureEnd::Expired),
                tenure("b", t0, 2_490, 6_500, TenureEnd::Expired),
            ],
        )
        .analyze();
        assert!(r.violations.is_empty(), "{:?}", r.violations);
        assert_eq!(r.terms, 2);
        assert_eq!(r.min_gap, Some(ms(500)));
        assert_eq!(r.min_lease_slack, Some(ms(300)));
        assert_eq!(r.handover_p50, Some(ms(500)));
    }

    #[test]
    fn overlapping_leaders_are_a_violation() {
        let t0 = Instant::now();
        let r = analysis(
            t0,
            vec![term(0, 1, t0, 100, 2_000), term(1, 1, t0, 1_900, 6_000)],
            vec![
                tenure("a", t0, 90, 2_300, TenureEnd::Expired),
                tenure("b", t0, 1_800, 6_500, TenureEnd::Expired),
            ],
        )
        .analyze();
        assert!(
            r.violations.iter().any(|v| matches!(
                v,
                Violation::TwoLeaders { overlap, .. } if *overlap == ms(100)
            )),
            "{:?}",
            r.violations
        );
    }

    #[test]
    fn leading_past_the_servers_expiry_is_a_violation() {
        let t0 = Instant::now();
        let r = analysis(
            t0,
            vec![term(0, 1, t0, 100, 2_400)],
            vec![tenure("a", t0, 90, 2_300, TenureEnd::Expired)],
        )
        .analyze();
        assert!(matches!(
            r.violations.as_slice(),
            [Violation::PastExpiry { excess, .. }] if *excess == ms(100)
        ));
        let r = analysis(t0, vec![term(0, 1, t0, 100, 400)], vec![]).analyze();
        assert!(matches!(
            r.violations.as_slice(),
            [Violation::NoTenure { .. }]
        ));
    }

    #[test]
    fn a_dropped_table_is_measured_not_counted() {
        let t0 = Instant::now();
        let r = analysis(
            t0,
            vec![term(0, 1, t0, 100, 1_800), term(1, 1, t0, 1_200, 6_000)],
            vec![
                tenure("a", t0, 90, 1_000, TenureEnd::Dropped),
                tenure("b", t0, 1_100, 6_500, TenureEnd::Expired),
            ],
        )
        .analyze();
        assert!(r.violations.is_empty(), "{:?}", r.violations);
        assert_eq!(
            r.drop_samples,
            vec![DropSample {
                at: ms(1_000),
                owner: "a".into(),
                stale: ms(800),
                overlap: ms(600),
            }]
        );
    }

    #[test]
    fn a_term_that_never_ends_is_unpaired() {
        let t0 = Instant::now();
        let mut t = term(0, 1, t0, 100, 1_000);
        t.cancelled = None;
        t.lost = None;
        let r = analysis(
            t0,
            vec![t],
            vec![tenure("a", t0, 90, 30_000, TenureEnd::Running)],
        )
        .analyze();
        assert!(matches!(
            r.violations.as_slice(),
            [Violation::Unpaired { .. }]
        ));
    }

    #[test]
    fn span_arithmetic() {
        let m = merge(vec![(ms(5), ms(7)), (ms(0), ms(2)), (ms(1), ms(3))]);
        assert_eq!(m, vec![(ms(0), ms(3)), (ms(5), ms(7))]);
        assert_eq!(total(&m), ms(5));
        assert_eq!(
            complement((ms(0), ms(10)), &m),
            vec![(ms(3), ms(5)), (ms(7), ms(10))]
        );
        assert_eq!(
            intersect(&m, &[(ms(2), ms(6))]),
            vec![(ms(2), ms(3)), (ms(5), ms(6))]
        );
        let v = [ms(1), ms(2), ms(3), ms(4)];
        assert_eq!(percentile(&v, 0.5), Some(ms(2)));
        assert_eq!(percentile(&v, 0.99), Some(ms(4)));
    }
}
