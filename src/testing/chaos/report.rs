//! The report of a chaos run: the broken rules ([`Violation`]), the
//! restarts that dropped the lock table ([`DropSample`]), and the figures
//! ([`ChaosReport`], whose `Display` is the one-line summary).

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use super::analysis::percentile;
use super::{ChaosConfig, FaultKind};
use crate::testing::TenureEnd;
use crate::Timing;

/// A broken safety rule, found by the run.
///
/// Instants are offsets from the start of the run.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Violation {
    /// Two contenders both considered themselves leader.
    TwoLeaders {
        /// The contender whose interval started first.
        first: String,
        /// Its term id.
        first_term: u64,
        /// The other contender.
        second: String,
        /// Its term id.
        second_term: u64,
        /// When the overlap began.
        at: Duration,
        /// How long it lasted.
        overlap: Duration,
    },
    /// A contender considered itself leader after the server had stopped
    /// counting it as the owner (expired, released or handed on).
    PastExpiry {
        /// The contender.
        contender: String,
        /// Its term id.
        term: u64,
        /// When the server's tenure ended.
        at: Duration,
        /// How long the contender went on believing it led.
        excess: Duration,
        /// How the server's tenure ended.
        ended_by: TenureEnd,
    },
    /// A contender considered itself leader while the server had no tenure of
    /// it at all.
    NoTenure {
        /// The contender.
        contender: String,
        /// Its term id.
        term: u64,
        /// When its interval started.
        at: Duration,
    },
    /// A consumer saw `Elected` and `Lost` out of alternation, or a term that
    /// never ended.
    Unpaired {
        /// The contender.
        contender: String,
        /// `"stream"` or `"callbacks"`.
        consumer: &'static str,
        /// What went wrong.
        detail: String,
        /// When it was seen.
        at: Duration,
    },
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Violation::TwoLeaders {
                first,
                first_term,
                second,
                second_term,
                at,
                overlap,
            } => write!(
                f,
                "two leaders at {:.3}s for {:.3}s: {first} (term {first_term}) and {second} (term {second_term})",
                at.as_secs_f64(),
                overlap.as_secs_f64()
            ),
            Violation::PastExpiry {
                contender,
                term,
                at,
                excess,
                ended_by,
            } => write!(
                f,
                "{contender} (term {term}) still leader {:.3}s after the server's tenure ended ({ended_by:?}) at {:.3}s",
                excess.as_secs_f64(),
                at.as_secs_f64()
            ),
            Violation::NoTenure {
                contender,
                term,
                at,
            } => write!(
                f,
                "{contender} (term {term}) leader at {:.3}s without owning the lock on the server",
                at.as_secs_f64()
            ),
            Violation::Unpaired {
                contender,
                consumer,
                detail,
                at,
            } => write!(
                f,
                "{contender} ({consumer}) at {:.3}s: {detail}",
                at.as_secs_f64()
            ),
        }
    }
}

/// One restart that dropped the lock table while a contender led: how long
/// the old leader went on believing it led, and how long that overlapped with
/// a new leader.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct DropSample {
    /// When the table was dropped (offset from the start of the run).
    pub at: Duration,
    /// The contender that owned the dropped lock.
    pub owner: String,
    /// How long after the drop the owner still considered itself leader
    /// (zero if it no longer did).
    pub stale: Duration,
    /// How long that overlapped with another contender's leadership.
    pub overlap: Duration,
}

/// Everything a chaos run measured. [`Display`](fmt::Display) gives the
/// one-line summary.
///
/// ```no_run
/// use quorum_quest_client::testing::chaos::{self, ChaosConfig};
///
/// # async fn demo() {
/// let report = chaos::run(ChaosConfig::default()).await;
/// println!("{report}");
/// assert!(report.violations().is_empty(), "{:#?}", report.violations());
/// # }
/// ```
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct ChaosReport {
    /// The seed (replay a run with it).
    pub seed: u64,
    /// How many contenders campaigned.
    pub contenders: usize,
    /// The lock TTL.
    pub ttl: Duration,
    /// The clients' timing.
    pub timing: Timing,
    /// From the start of the campaigns to the end of the fault schedule.
    pub duration: Duration,
    /// The whole run, set-up and wind-down included.
    pub wall_time: Duration,
    /// Faults injected, by kind.
    pub faults: BTreeMap<FaultKind, u32>,
    /// Faults planned but not injected (a mid-term drop with no leader to
    /// drop within two TTLs), by kind.
    pub skipped: BTreeMap<FaultKind, u32>,
    /// HTTP/2 GOAWAY frames sent on client connections (by the GOAWAY churn).
    pub goaway_frames: u64,
    /// Leader terms (intervals) observed.
    pub terms: usize,
    /// Terms whose stream received their `Lost`.
    pub closed_by_lost: usize,
    /// Terms ended because their stream was resigned or dropped.
    pub closed_by_exit: usize,
    /// `Lost { Expired }` received by streams.
    pub expired: usize,
    /// `Lost { Rejected }` received by streams.
    pub rejected: usize,
    /// Expired or rejected terms that no blocking fault explains (the leader
    /// lost its lease while only transient faults, or none, were active).
    pub unexplained_losses: usize,
    /// `RpcFailed` events received by streams.
    pub rpc_failures: u64,
    /// `on_leader_elected(true)` calls on the callbacks observers.
    pub callback_elected: u64,
    /// `on_leader_lost` calls on the callbacks observers.
    pub callback_lost: u64,
    /// The smallest gap between one contender's leadership ending and another
    /// contender's starting.
    pub min_gap: Option<Duration>,
    /// The smallest margin between a leader interval's end and the end of
    /// that contender's tenure on the server, over tenures that were not
    /// released (so: how close a leader came to outliving its lease).
    pub min_lease_slack: Option<Duration>,
    /// Fraction of the fault-free time in which some contender led.
    pub availability: Option<f64>,
    /// How much of the run no fault blocked (the base of `availability`).
    pub fault_free: Duration,
    /// Fraction of the whole run in which some contender led.
    pub leader_fraction: f64,
    /// Leaderless gaps between one term's end and the next term's start.
    pub handovers: usize,
    /// Median leaderless gap.
    pub handover_p50: Option<Duration>,
    /// 99th percentile leaderless gap.
    pub handover_p99: Option<Duration>,
    /// Restarts that dropped the lock table while someone led.
    pub drop_samples: Vec<DropSample>,
    /// Broken rules; must be empty.
    pub violations: Vec<Violation>,
    /// For each of [`violations`](Self::violations), in the same order: the
    /// kinds of the faults in force when it happened (from a fault's start
    /// to the end of its effects: its heal plus about a TTL and a retry),
    /// the likely culprits.
    pub suspects: Vec<Vec<FaultKind>>,
    /// Trouble in the harness itself (a server that would not restart, a
    /// resign that never finished...); should be empty.
    pub problems: Vec<String>,
}

impl ChaosReport {
    /// The broken rules (none in a good run).
    #[must_use]
    pub fn violations(&self) -> &[Violation] {
        &self.violations
    }

    /// No violation and no harness problem.
    #[must_use]
    pub fn is_clean(&self) -> bool {
        self.violations.is_empty() && self.problems.is_empty()
    }

    /// How many times `kind` was injected.
    #[must_use]
    pub fn count(&self, kind: FaultKind) -> u32 {
        self.faults.get(&kind).copied().unwrap_or(0)
    }

    /// The total number of faults injected.
    #[must_use]
    pub fn total_faults(&self) -> u32 {
        self.faults.values().sum()
    }

    /// A report of nothing yet, for `config`.
    pub(super) fn empty(config: &ChaosConfig) -> Self {
        ChaosReport {
            seed: config.seed,
            contenders: config.contenders,
            ttl: config.ttl,
            timing: Timing::for_ttl(config.ttl),
            duration: Duration::ZERO,
            wall_time: Duration::ZERO,
            faults: BTreeMap::new(),
            skipped: BTreeMap::new(),
            goaway_frames: 0,
            terms: 0,
            closed_by_lost: 0,
            closed_by_exit: 0,
            expired: 0,
            rejected: 0,
            unexplained_losses: 0,
            rpc_failures: 0,
            callback_elected: 0,
            callback_lost: 0,
            min_gap: None,
            min_lease_slack: None,
            availability: None,
            fault_free: Duration::ZERO,
            leader_fraction: 0.0,
            handovers: 0,
            handover_p50: None,
            handover_p99: None,
            drop_samples: Vec::new(),
            violations: Vec::new(),
            suspects: Vec::new(),
            problems: Vec::new(),
        }
    }

    /// How many violations each fault kind was in force for (a violation
    /// with several suspects counts for each; `None`: no fault was).
    #[must_use]
    pub fn violations_by_kind(&self) -> BTreeMap<Option<FaultKind>, usize> {
        let mut out = BTreeMap::new();
        for suspects in &self.suspects {
            if suspects.is_empty() {
                *out.entry(None).or_default() += 1;
            }
            for k in suspects {
                *out.entry(Some(*k)).or_default() += 1;
            }
        }
        out
    }
}

impl Violation {
    /// When it happened (offset from the start of the run).
    #[must_use]
    pub fn at(&self) -> Duration {
        match self {
            Violation::TwoLeaders { at, .. }
            | Violation::PastExpiry { at, .. }
            | Violation::NoTenure { at, .. }
            | Violation::Unpaired { at, .. } => *at,
        }
    }
}

fn secs(d: Option<Duration>) -> String {
    d.map_or_else(|| "-".to_string(), |d| format!("{:.3}s", d.as_secs_f64()))
}

impl fmt::Display for ChaosReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "chaos seed={} contenders={} ttl={}s duration={:.1}s | faults={}",
            self.seed,
            self.contenders,
            self.ttl.as_secs(),
            self.duration.as_secs_f64(),
            self.total_faults()
        )?;
        let kinds: Vec<String> = self
            .faults
            .iter()
            .map(|(k, n)| format!("{k}={n}"))
            .collect();
        if !kinds.is_empty() {
            write!(f, " ({})", kinds.join(" "))?;
        }
        write!(
            f,
            " | terms={} (lost {}: expired {} rejected {}, unexplained {}; exits {})",
            self.terms,
            self.closed_by_lost,
            self.expired,
            self.rejected,
            self.unexplained_losses,
            self.closed_by_exit
        )?;
        write!(
            f,
            " | min gap {} | min slack to expiry {} | violations={}",
            secs(self.min_gap),
            secs(self.min_lease_slack),
            self.violations.len()
        )?;
        match self.availability {
            Some(a) => write!(
                f,
                " | availability {:.1}% of {:.1}s fault-free (led {:.1}% of the run)",
                a * 100.0,
                self.fault_free.as_secs_f64(),
                self.leader_fraction * 100.0
            )?,
            None => write!(
                f,
                " | availability - (no fault-free time; led {:.1}% of the run)",
                self.leader_fraction * 100.0
            )?,
        }
        write!(
            f,
            " | handover p50 {} p99 {} (n={})",
            secs(self.handover_p50),
            secs(self.handover_p99),
            self.handovers
        )?;
        if !self.drop_samples.is_empty() {
            let mut stale: Vec<Duration> = self.drop_samples.iter().map(|s| s.stale).collect();
            stale.sort();
            let overlapped = self
                .drop_samples
                .iter()
                .filter(|s| !s.overlap.is_zero())
                .count();
            let max_overlap = self.drop_samples.iter().map(|s| s.overlap).max();
            write!(
                f,
                " | table-dropping restarts={}: old leader stale p50 {} max {}, overlapped {} max {}",
                self.drop_samples.len(),
                secs(percentile(&stale, 0.5)),
                secs(stale.last().copied()),
                overlapped,
                secs(max_overlap)
            )?;
        }
        if !self.problems.is_empty() {
            write!(f, " | harness problems={}", self.problems.len())?;
        }
        Ok(())
    }
}
