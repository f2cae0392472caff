//! [`Health`]: a snapshot of one client for a liveness probe, from
//! [`QuorumQuestClient::health`](crate::QuorumQuestClient::health).
//!
//! A liveness probe should restart a process whose election is *wedged*,
//! never one whose server is down (restarting every replica does not bring
//! the server back). So the verdict looks at whether the client's campaign
//! is doing its job, not at whether calls succeed, the way client-go's
//! `HealthzAdaptor` flags a leader that has stopped renewing:
//!
//! | verdict | when |
//! |---|---|
//! | [`Unhealthy::LeaderNotRenewing`] | leading, and no call has completed for longer than renew interval + RPC timeout + safety margin: nothing renews the lease (the keep-alive was stopped, or the campaign is stuck) |
//! | [`Unhealthy::CampaignStopped`] | a leadership stream or the keep-alive wants the campaign, but the driver running it has ended (its runtime shut down) |
//! | [`Unhealthy::CampaignStalled`] | campaigning but not leading, and no call has completed for longer than max(retry period, renew interval) + 2 × RPC timeout + safety margin + 1 s |
//! | healthy | otherwise: a follower, an idle client, or a leader whose calls fail but are being retried |
//!
//! A healthy campaign completes a call at least every retry period (not
//! leading) or renew interval (leading), each within the RPC timeout, so
//! these limits are never reached by a client that works, however its
//! server behaves. [`Health::consecutive_failures`] and
//! [`Health::since_last_renewal`] tell how the server is doing, for a
//! readiness probe or an alert.

use std::fmt;
use std::time::Duration;

use tokio::time::Instant;

use crate::config::Timing;
use crate::state::Observation;

/// The pause before a campaign that ended unexpectedly restarts.
const RESTART_PAUSE: Duration = Duration::from_secs(1);

/// The health counters of one session, updated wherever an observation is
/// applied.
#[derive(Debug, Default)]
pub(crate) struct Stats {
    /// When the last grant or positive `KeepAlive` answer was observed.
    last_renewal: Option<Instant>,
    /// When the last call completed (answered or failed).
    last_call: Option<Instant>,
    /// Calls that failed in a row (an answer resets it).
    consecutive_failures: u32,
    /// When the campaign was last started.
    campaign_started: Option<Instant>,
}

impl Stats {
    /// `obs` is about to be applied at `now`.
    pub(crate) fn observed(&mut self, obs: &Observation, now: Instant) {
        match obs {
            Observation::Granted { .. } | Observation::Renewed { .. } => {
                self.last_renewal = Some(now);
                self.last_call = Some(now);
                self.consecutive_failures = 0;
            }
            Observation::AcquireRefused { .. } | Observation::RenewRefused { .. } => {
                self.last_call = Some(now);
                self.consecutive_failures = 0;
            }
            Observation::RpcFailed { .. } | Observation::RenewMalformed { .. } => {
                self.last_call = Some(now);
                self.consecutive_failures = self.consecutive_failures.saturating_add(1);
            }
            Observation::ReleaseDone { .. } => self.last_call = Some(now),
            Observation::ReleaseStarted | Observation::Tick | Observation::CampaignFailed => {}
        }
    }

    pub(crate) fn campaign_started(&mut self, now: Instant) {
        self.campaign_started = Some(now);
    }

    pub(crate) fn consecutive_failures(&self) -> u32 {
        self.consecutive_failures
    }
}

/// The longest a working leader goes without a completed call: a renew
/// interval, a call that takes its whole timeout, and the safety margin.
fn leader_limit(t: &Timing) -> Duration {
    t.renew_interval
        .saturating_add(t.rpc_timeout)
        .saturating_add(t.safety_margin)
}

/// The longest a working campaign goes without a completed call: the longest
/// wait (a follower waits at most the retry period, a leader at most the
/// renew interval), two calls (an acquire whose outcome is unknown is
/// followed by a release), the safety margin, and a restart's pause.
fn campaign_limit(t: &Timing) -> Duration {
    t.retry_period
        .max(t.renew_interval)
        .saturating_add(t.rpc_timeout.saturating_mul(2))
        .saturating_add(t.safety_margin)
        .saturating_add(RESTART_PAUSE)
}

/// What a session tells [`snapshot`] besides its counters.
pub(crate) struct Inputs {
    pub(crate) lease_remaining: Option<Duration>,
    pub(crate) campaign_wanted: bool,
    pub(crate) campaign_running: bool,
    pub(crate) timing: Timing,
}

/// A health snapshot at `now`.
pub(crate) fn snapshot(stats: &Stats, inputs: Inputs, now: Instant) -> Health {
    let since = |t: Option<Instant>| t.map(|t| now.saturating_duration_since(t));
    let since_last_call = since(stats.last_call);
    // The campaign's last sign of life: its last call, or its start.
    let campaign_idle = match (stats.last_call, stats.campaign_started) {
        (Some(a), Some(b)) => since(Some(a.max(b))),
        (a, b) => since(a.or(b)),
    };
    let mut health = Health {
        leading: inputs.lease_remaining.is_some(),
        lease_remaining: inputs.lease_remaining,
        since_last_renewal: since(stats.last_renewal),
        since_last_call,
        consecutive_failures: stats.consecutive_failures,
        campaign_running: inputs.campaign_running,
        campaign_wanted: inputs.campaign_wanted,
        verdict: Ok(()),
    };
    health.verdict = verdict(&health, campaign_idle, &inputs.timing);
    health
}

fn verdict(h: &Health, campaign_idle: Option<Duration>, timing: &Timing) -> Result<(), Unhealthy> {
    if h.campaign_wanted && !h.campaign_running {
        return Err(Unhealthy::CampaignStopped);
    }
    if h.leading {
        let limit = leader_limit(timing);
        // A leader has completed a call (the one that elected it).
        let idle = h.since_last_call.unwrap_or(Duration::ZERO);
        if idle > limit {
            return Err(Unhealthy::LeaderNotRenewing { idle, limit });
        }
    } else if h.campaign_wanted {
        let limit = campaign_limit(timing);
        let idle = campaign_idle.unwrap_or(Duration::ZERO);
        if idle > limit {
            return Err(Unhealthy::CampaignStalled { idle, limit });
        }
    }
    Ok(())
}

/// A snapshot of one client's election, with a verdict for a liveness probe.
///
/// Taken by [`QuorumQuestClient::health`](crate::QuorumQuestClient::health);
/// cheap (a few locks, no I/O). [`check`](Health::check) is healthy unless the
/// client's campaign has stopped doing its job: a leader that nothing renews,
/// or a campaign that is wanted but dead or silent. Failing calls alone
/// (a server that is down) never make a client unhealthy: restarting would
/// not help; watch [`consecutive_failures`](Health::consecutive_failures)
/// for that.
///
/// In a `/healthz` handler of your HTTP server:
///
/// ```no_run
/// # fn demo(client: quorum_quest_client::QuorumQuestClient) -> (u16, String) {
/// let health = client.health();
/// match health.check() {
///     Ok(()) => (200, health.to_string()),
///     Err(why) => (503, why.to_string()),
/// }
/// # }
/// ```
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Health {
    /// Whether this client is leader now.
    pub leading: bool,
    /// Time left on the lease, if leader.
    pub lease_remaining: Option<Duration>,
    /// Time since the last successful renewal or grant, if any.
    pub since_last_renewal: Option<Duration>,
    /// Time since the last call completed (answered or failed), if any.
    pub since_last_call: Option<Duration>,
    /// `TryAcquireLock` and `KeepAlive` calls that failed in a row (after
    /// the transport's own quick retries); any answer resets it.
    pub consecutive_failures: u32,
    /// Whether the campaign (for the keep-alive or leadership streams) runs:
    /// the connection's driver that runs it is alive.
    pub campaign_running: bool,
    /// Whether a leadership stream or the keep-alive wants the campaign.
    pub campaign_wanted: bool,
    verdict: Result<(), Unhealthy>,
}

impl Health {
    /// The verdict for a liveness probe: `Ok` unless the election is wedged.
    ///
    /// # Errors
    ///
    /// The [`Unhealthy`] reason.
    pub fn check(&self) -> Result<(), Unhealthy> {
        self.verdict.clone()
    }

    /// `true` unless [`check`](Self::check) gives a reason.
    #[must_use]
    pub fn is_healthy(&self) -> bool {
        self.verdict.is_ok()
    }
}

impl fmt::Display for Health {
    /// One line for a probe's body, e.g. `healthy: leader, lease 4.2s left,
    /// last renewal 1.1s ago, 0 failed calls in a row, campaign running`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.verdict {
            Ok(()) => f.write_str("healthy: ")?,
            Err(why) => write!(f, "unhealthy ({why}): ")?,
        }
        match self.lease_remaining {
            Some(left) => write!(f, "leader, lease {left:.1?} left")?,
            None => f.write_str("not leader")?,
        }
        if let Some(since) = self.since_last_renewal {
            write!(f, ", last renewal {since:.1?} ago")?;
        }
        write!(
            f,
            ", {} failed calls in a row, campaign {}",
            self.consecutive_failures,
            match (self.campaign_wanted, self.campaign_running) {
                (_, true) => "running",
                (true, false) => "stopped",
                (false, false) => "idle",
            }
        )
    }
}

/// Why a client is unhealthy; see [`Health::check`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Unhealthy {
    /// Leading, but no call has completed for `idle` (longer than `limit`:
    /// renew interval + RPC timeout + safety margin): nothing renews the
    /// lease. The term still ends at its deadline; a process that keeps
    /// working without renewing is the one to restart.
    #[error("leading, but no call has completed for {idle:?} (limit {limit:?}): nothing renews the lease")]
    LeaderNotRenewing {
        /// Time since the last completed call.
        idle: Duration,
        /// The limit it passed.
        limit: Duration,
    },
    /// A leadership stream or the keep-alive wants the campaign, but the
    /// connection's driver that runs it has ended (its runtime shut down).
    #[error("the campaign has stopped although a leadership stream or the keep-alive wants it")]
    CampaignStopped,
    /// Campaigning, not leading, and no call has completed for `idle`
    /// (longer than `limit`: max(retry period, renew interval) + 2 × RPC
    /// timeout + safety margin + 1 s).
    #[error("campaigning, but no call has completed for {idle:?} (limit {limit:?})")]
    CampaignStalled {
        /// Time since the last completed call (or the campaign's start).
        idle: Duration,
        /// The limit it passed.
        limit: Duration,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    fn timing() -> Timing {
        Timing::for_ttl(Duration::from_secs(15))
    }

    fn inputs(lease: Option<u64>, wanted: bool, running: bool) -> Inputs {
        Inputs {
            lease_remaining: lease.map(Duration::from_secs),
            campaign_wanted: wanted,
            campaign_running: running,
            timing: timing(),
        }
    }

    #[test]
    fn the_limits_leave_a_working_client_room_and_catch_a_leader_before_its_deadline() {
        let t = timing();
        // ttl 15 s: renew 5 s, rpc timeout 5 s, margin 1.5 s.
        assert_eq!(leader_limit(&t), Duration::from_millis(11_500));
        assert!(leader_limit(&t) < Duration::from_secs(15) - t.safety_margin);
        assert_eq!(campaign_limit(&t), Duration::from_millis(17_500));
        let huge = Timing {
            renew_interval: Duration::MAX,
            ..t
        };
        assert_eq!(leader_limit(&huge), Duration::MAX);
    }

    #[test]
    fn each_verdict_and_its_reason() {
        let t0 = Instant::now();
        let secs = |n| t0 + Duration::from_secs(n);
        let mut stats = Stats::default();
        // Nothing wanted, nothing done: healthy.
        assert!(snapshot(&stats, inputs(None, false, false), secs(100)).is_healthy());

        // Wanted but dead.
        let h = snapshot(&stats, inputs(None, true, false), t0);
        assert_eq!(h.check(), Err(Unhealthy::CampaignStopped));

        // Campaigning: measured from the start until the first call.
        stats.campaign_started(t0);
        assert!(snapshot(&stats, inputs(None, true, true), secs(17)).is_healthy());
        let h = snapshot(&stats, inputs(None, true, true), secs(18));
        assert!(
            matches!(h.check(), Err(Unhealthy::CampaignStalled { idle, .. }) if idle == Duration::from_secs(18))
        );

        // Failing calls keep a campaign healthy, and are counted.
        for n in 1..=3 {
            stats.observed(
                &Observation::RpcFailed {
                    rpc: crate::RpcKind::TryAcquireLock,
                    code: tonic::Code::Unavailable,
                    message: String::new(),
                },
                secs(18 + n),
            );
        }
        let h = snapshot(&stats, inputs(None, true, true), secs(22));
        assert!(h.is_healthy());
        assert_eq!(h.consecutive_failures, 3);
        assert_eq!(h.since_last_renewal, None);

        // A grant resets the count; a leader is judged by the leader limit.
        stats.observed(
            &Observation::Granted {
                sent_at: secs(30),
                incarnation: 0,
            },
            secs(30),
        );
        let h = snapshot(&stats, inputs(Some(13), true, true), secs(41));
        assert!(h.is_healthy(), "{h}");
        assert_eq!(h.consecutive_failures, 0);
        assert_eq!(h.since_last_renewal, Some(Duration::from_secs(11)));
        let h = snapshot(&stats, inputs(Some(1), false, false), secs(42));
        assert!(
            matches!(h.check(), Err(Unhealthy::LeaderNotRenewing { idle, limit })
                if idle == Duration::from_secs(12) && limit == leader_limit(&timing())),
            "{h}"
        );
        assert!(
            h.to_string().starts_with("unhealthy (leading, but no call"),
            "{h}"
        );
    }
}
