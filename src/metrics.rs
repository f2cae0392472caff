//! Metrics (feature `metrics`), through the [`metrics`](https://docs.rs/metrics)
//! crate facade: the application installs the recorder it wants
//! (Prometheus, StatsD, OpenTelemetry...), the client only reports.
//!
//! | name | type | labels | what |
//! |---|---|---|---|
//! | `quorum_quest_leader` | gauge | `service`, `domain` | 1 while a client of this process leads the lock, else 0 (registered at 0 when the client is built) |
//! | `quorum_quest_transitions_total` | counter | `service`, `domain`, `kind`, `reason` | leadership changes: `kind` is `elected`, `lost` or `follower`; `reason` is `expired`, `rejected`, `released` or `failed` for `lost`, `none` otherwise |
//! | `quorum_quest_rpc_duration_seconds` | histogram | `rpc`, `code` | latency of each RPC attempt: `rpc` is `TryAcquireLock`, `KeepAlive` or `ReleaseLock`; `code` the gRPC status (`OK`, `UNAVAILABLE`, `DEADLINE_EXCEEDED`, ...) |
//! | `quorum_quest_renewal_failures_total` | counter | `service`, `domain` | `KeepAlive` calls that failed (after the transport's own retries) or were answered with a malformed lease |
//! | `quorum_quest_lease_remaining_seconds` | histogram | `service`, `domain` | the lease left (after the safety margin) at each election and renewal: a leader renewing with little left is in trouble |
//!
//! Label cardinality is bounded by what the application chooses: one series
//! set per lock (service, domain) it campaigns for, and 3 × 17 for the RPC
//! histogram, which has no lock labels because a process leading hundreds of
//! shards over one connection would multiply it by each shard. There is no
//! `client_id` label: the default id is a random UUID, so every restart
//! would start new series that never end (and the lock labels already say
//! which election; one process has one client per lock).
//!
//! Useful queries: `sum by (service, domain) (quorum_quest_leader)` is 1 in a
//! healthy cluster (0: nobody leads; over 1 only briefly across a restart
//! that lost the server's lock table, see the crate docs);
//! `rate(quorum_quest_transitions_total{kind="lost",reason!="released"}[5m])`
//! counts involuntary losses; `quorum_quest_renewal_failures_total` rising
//! while leading is the warning before an `expired` loss.
//!
//! Install the recorder before building clients: the leader gauge is
//! registered when a client is built, and a recorder installed later sees it
//! only from the next change. With
//! [`metrics-exporter-prometheus`](https://docs.rs/metrics-exporter-prometheus),
//! give the histograms buckets so that they render as Prometheus histograms
//! (without, they render as summaries):
//!
//! ```ignore
//! use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
//! use quorum_quest_client::metrics::{LEASE_REMAINING, RPC_DURATION};
//!
//! let handle = PrometheusBuilder::new()
//!     .set_buckets_for_metric(Matcher::Full(RPC_DURATION.into()), &[0.001, 0.005, 0.025, 0.1, 0.5, 2.5])?
//!     .set_buckets_for_metric(Matcher::Full(LEASE_REMAINING.into()), &[0.5, 1.0, 2.0, 5.0, 10.0, 15.0])?
//!     .install_recorder()?;
//! // serve handle.render() as text/plain on /metrics
//! ```
//!
//! `cargo run --features testing,metrics --example metrics` runs an election
//! against an in-process server and prints the scrape.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use ::metrics::{Label, Unit};

use crate::event::{LeadershipEvent, RpcKind};
use crate::observe::reason_name;
use crate::sync::lock;

/// `quorum_quest_leader`: gauge, 1 while a client of this process leads the
/// lock (`service`, `domain`).
pub const LEADER: &str = "quorum_quest_leader";
/// `quorum_quest_transitions_total`: counter of leadership changes
/// (`service`, `domain`, `kind`, `reason`).
pub const TRANSITIONS: &str = "quorum_quest_transitions_total";
/// `quorum_quest_rpc_duration_seconds`: histogram of RPC attempt latency
/// (`rpc`, `code`).
pub const RPC_DURATION: &str = "quorum_quest_rpc_duration_seconds";
/// `quorum_quest_renewal_failures_total`: counter of failed `KeepAlive`
/// calls (`service`, `domain`).
pub const RENEWAL_FAILURES: &str = "quorum_quest_renewal_failures_total";
/// `quorum_quest_lease_remaining_seconds`: histogram of the lease left at
/// each election and renewal (`service`, `domain`).
pub const LEASE_REMAINING: &str = "quorum_quest_lease_remaining_seconds";

/// Describes the metrics to the recorder installed now (units and help).
fn describe() {
    ::metrics::describe_gauge!(
        LEADER,
        "1 while a client of this process leads the lock, else 0"
    );
    ::metrics::describe_counter!(
        TRANSITIONS,
        "Leadership changes by kind (elected, lost, follower) and loss reason"
    );
    ::metrics::describe_histogram!(
        RPC_DURATION,
        Unit::Seconds,
        "Latency of each RPC attempt by RPC and gRPC status code"
    );
    ::metrics::describe_counter!(
        RENEWAL_FAILURES,
        "KeepAlive calls that failed or were answered with a malformed lease"
    );
    ::metrics::describe_histogram!(
        LEASE_REMAINING,
        Unit::Seconds,
        "Lease left (after the safety margin) at each election and renewal"
    );
}

/// How many clients of this process lead each lock: the gauge is set from
/// it, so two clients of one lock in one process (tests, migrations) add up,
/// and a recorder installed late never sees a negative value.
fn leaders() -> &'static Mutex<HashMap<LockKey, u32>> {
    static LEADERS: OnceLock<Mutex<HashMap<LockKey, u32>>> = OnceLock::new();
    LEADERS.get_or_init(Mutex::default)
}

/// One RPC attempt took `latency` and ended with `code`.
pub(crate) fn rpc_attempt(rpc: RpcKind, code: &'static str, latency: Duration) {
    ::metrics::histogram!(RPC_DURATION, "rpc" => crate::observe::rpc_name(rpc), "code" => code)
        .record(latency.as_secs_f64());
}

/// Service, domain.
type LockKey = (Arc<str>, Arc<str>);

/// The labels of one lock, and its share of the metrics. The names are the
/// client's own (shared with its scope), and so are the label values handed
/// to the recorder: no copy per client or per event.
#[derive(Debug)]
pub(crate) struct LockLabels {
    service: Arc<str>,
    domain: Arc<str>,
}

impl LockLabels {
    pub(crate) fn new(service: &Arc<str>, domain: &Arc<str>) -> Self {
        LockLabels {
            service: service.clone(),
            domain: domain.clone(),
        }
    }

    fn key(&self) -> LockKey {
        (self.service.clone(), self.domain.clone())
    }

    fn labels(&self) -> Vec<Label> {
        vec![
            Label::new("service", self.service.clone()),
            Label::new("domain", self.domain.clone()),
        ]
    }

    /// A client for this lock was built: make its series visible.
    pub(crate) fn register(&self) {
        describe();
        let count = lock(leaders()).get(&self.key()).copied().unwrap_or(0);
        ::metrics::gauge!(LEADER, self.labels()).set(f64::from(count));
    }

    /// This client started (`true`) or stopped leading.
    pub(crate) fn leading(&self, leading: bool) {
        let mut leaders = lock(leaders());
        let key = self.key();
        let count = leaders.entry(key.clone()).or_insert(0);
        *count = if leading {
            count.saturating_add(1)
        } else {
            count.saturating_sub(1)
        };
        let now = *count;
        if now == 0 {
            leaders.remove(&key);
        }
        // Set under the map's lock, so concurrent changes land in order.
        ::metrics::gauge!(LEADER, self.labels()).set(f64::from(now));
    }

    /// A leadership event was published.
    pub(crate) fn event(&self, ev: &LeadershipEvent) {
        let transition = |kind: &'static str, reason: &'static str| {
            let mut labels = self.labels();
            labels.push(Label::from_static_parts("kind", kind));
            labels.push(Label::from_static_parts("reason", reason));
            ::metrics::counter!(TRANSITIONS, labels).increment(1);
        };
        match ev {
            LeadershipEvent::Elected {
                lease_remaining, ..
            } => {
                transition("elected", "none");
                self.lease(*lease_remaining);
            }
            LeadershipEvent::Renewed {
                lease_remaining, ..
            } => self.lease(*lease_remaining),
            LeadershipEvent::Follower => transition("follower", "none"),
            LeadershipEvent::Lost { reason, .. } => transition("lost", reason_name(*reason)),
            LeadershipEvent::RpcFailed {
                rpc: RpcKind::KeepAlive,
                ..
            } => ::metrics::counter!(RENEWAL_FAILURES, self.labels()).increment(1),
            LeadershipEvent::RpcFailed { .. } => {}
        }
    }

    fn lease(&self, left: Duration) {
        ::metrics::histogram!(LEASE_REMAINING, self.labels()).record(left.as_secs_f64());
    }
}
