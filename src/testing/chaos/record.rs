//! What the contenders and the schedule record while the run goes on, for
//! the analysis.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use super::FaultKind;
use crate::{LeaderTerm, LossReason};

/// How a term ended other than by `Lost`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Exit {
    /// The stream was resigned.
    Resigned,
    /// The stream was dropped mid-term (or ended by itself).
    Dropped,
}

/// One leader term as one contender's stream saw it.
#[derive(Debug)]
pub(super) struct TermRec {
    pub(super) contender: usize,
    pub(super) term: u64,
    /// The consumer received `Elected`.
    pub(super) start: Instant,
    /// The term's `cancelled()` fired.
    pub(super) cancelled: Option<Instant>,
    /// The consumer received `Lost`.
    pub(super) lost: Option<(Instant, LossReason)>,
    /// The stream went away mid-term.
    pub(super) exit: Option<Exit>,
}

/// One injected fault.
#[derive(Debug, Clone)]
pub(super) struct FaultRec {
    pub(super) kind: FaultKind,
    pub(super) target: Option<usize>,
    pub(super) start: Instant,
    pub(super) heal: Instant,
    /// The added latency, for [`FaultKind::Latency`].
    pub(super) latency: Duration,
}

/// Everything the contenders and the schedule record while the run goes on.
#[derive(Debug, Default)]
pub(super) struct Record {
    pub(super) terms: Vec<TermRec>,
    pub(super) faults: Vec<FaultRec>,
    pub(super) skipped: BTreeMap<FaultKind, u32>,
    /// The currently open term of each contender (for the online check).
    pub(super) open: Vec<Option<LeaderTerm>>,
    pub(super) stream_violations: Vec<(usize, Instant, String)>,
    pub(super) online_overlaps: u64,
    pub(super) rpc_failures: u64,
    pub(super) problems: Vec<String>,
}

/// The record, shared by the contenders, the schedule and the term watchers.
pub(super) type Shared = Arc<Mutex<Record>>;
