//! The election state machine: the one place that decides what an RPC result
//! means for leadership.
//!
//! Pure: no I/O and no clock reads; the caller passes the current instant. Each
//! [`Observation`] yields zero or more [`LeadershipEvent`]s. Before looking at
//! an observation the machine checks the lease deadline, so a late answer can
//! never extend a lease that has already run out: the term is reported lost
//! first.

use std::time::Duration;

use tokio::time::Instant;

use crate::event::{LeaderTerm, LeadershipEvent, LossReason, RpcKind};

/// What the I/O layer saw.
#[derive(Debug, Clone)]
pub(crate) enum Observation {
    /// `TryAcquireLock` answered `is_leader = true` for a request sent at `sent_at`.
    Acquired { sent_at: Instant, lease: Duration },
    /// `TryAcquireLock` answered `is_leader = false`.
    AcquireRefused,
    /// `KeepAlive` granted `lease` for a request sent at `sent_at`.
    Renewed { sent_at: Instant, lease: Duration },
    /// `KeepAlive` answered a negative or missing lease.
    RenewRefused,
    /// A call failed without an answer from the lock store.
    RpcFailed {
        rpc: RpcKind,
        code: tonic::Code,
        message: String,
    },
    /// This client decided to give the lock up; a release request follows.
    Released,
    /// The release request that followed [`Observation::Released`] is over
    /// (answered, failed or abandoned) at `at`.
    ReleaseDone { at: Instant },
    /// Time passed (a timer fired).
    Tick,
}

#[derive(Debug, Clone)]
enum Phase {
    /// Not leader, and no refused acquire seen since the last term (or start).
    Unknown,
    /// Not leader; another node held the lock at the last attempt.
    Follower,
    /// Leader until `deadline`.
    Leader { term: LeaderTerm, deadline: Instant },
}

/// The election state of one client.
#[derive(Debug)]
pub(crate) struct ElectionState {
    phase: Phase,
    margin: Duration,
    last_term: u64,
    /// Release requests in flight.
    releasing: u32,
    /// When the last release request was over. A grant for a request sent
    /// before it may have been processed before the release and deleted by it.
    fence: Option<Instant>,
}

impl ElectionState {
    pub(crate) fn new(safety_margin: Duration) -> Self {
        ElectionState {
            phase: Phase::Unknown,
            margin: safety_margin,
            last_term: 0,
            releasing: 0,
            fence: None,
        }
    }

    /// The safe deadline of the current term, if leader (it may already have
    /// passed if no [`Observation::Tick`] was applied since).
    pub(crate) fn deadline(&self) -> Option<Instant> {
        match &self.phase {
            Phase::Leader { deadline, .. } => Some(*deadline),
            _ => None,
        }
    }

    /// `true` if leader and the deadline has not passed at `now`.
    pub(crate) fn is_leader(&self, now: Instant) -> bool {
        self.deadline().is_some_and(|d| now < d)
    }

    /// Time left on the lease at `now`, if leader and not past the deadline.
    pub(crate) fn remaining(&self, now: Instant) -> Option<Duration> {
        self.deadline()
            .filter(|d| now < *d)
            .map(|d| d.duration_since(now))
    }

    /// The events a new subscriber needs to see first so that its view starts
    /// consistent: `Elected` for a running term, `Follower` if known.
    pub(crate) fn snapshot(&self, now: Instant) -> Option<LeadershipEvent> {
        match &self.phase {
            Phase::Leader { term, deadline } if now < *deadline => Some(LeadershipEvent::Elected {
                term: term.clone(),
                lease_remaining: deadline.duration_since(now),
            }),
            Phase::Follower => Some(LeadershipEvent::Follower),
            _ => None,
        }
    }

    /// Applies one observation at `now` and returns what it means.
    pub(crate) fn apply(&mut self, obs: Observation, now: Instant) -> Vec<LeadershipEvent> {
        let mut events = Vec::new();
        if self.deadline().is_some_and(|d| now >= d) {
            events.extend(self.lose(LossReason::Expired, Phase::Unknown));
        }
        match obs {
            Observation::Tick => {}
            Observation::Acquired { sent_at, .. } | Observation::Renewed { sent_at, .. }
                if self.may_predate_a_release(sent_at) =>
            {
                // The server may have granted this before our release deleted
                // the lock: not a grant we can count on. The next attempt,
                // sent after the release, will tell.
            }
            Observation::Acquired { sent_at, lease } => {
                let deadline = self.deadline_for(sent_at, lease);
                match &mut self.phase {
                    Phase::Leader {
                        term,
                        deadline: current,
                    } => {
                        if deadline > *current {
                            *current = deadline;
                            term.set_deadline(deadline);
                        }
                        events.push(LeadershipEvent::Renewed {
                            term_id: term.id(),
                            lease_remaining: current.saturating_duration_since(now),
                        });
                    }
                    _ if deadline <= now => {
                        // Granted, but the answer came too late to lead safely:
                        // the lease may already be gone. The next attempt is
                        // re-entrant and will tell.
                    }
                    _ => {
                        self.last_term += 1;
                        let term = LeaderTerm::new(self.last_term, deadline);
                        events.push(LeadershipEvent::Elected {
                            term: term.clone(),
                            lease_remaining: deadline.duration_since(now),
                        });
                        self.phase = Phase::Leader { term, deadline };
                    }
                }
            }
            Observation::AcquireRefused => match self.phase {
                Phase::Leader { .. } => {
                    events.extend(self.lose(LossReason::Rejected, Phase::Follower));
                    events.push(LeadershipEvent::Follower);
                }
                Phase::Unknown => {
                    self.phase = Phase::Follower;
                    events.push(LeadershipEvent::Follower);
                }
                Phase::Follower => {}
            },
            Observation::Renewed { sent_at, lease } => {
                let deadline = self.deadline_for(sent_at, lease);
                if let Phase::Leader {
                    term,
                    deadline: current,
                } = &mut self.phase
                {
                    if deadline > *current {
                        *current = deadline;
                        term.set_deadline(deadline);
                    }
                    events.push(LeadershipEvent::Renewed {
                        term_id: term.id(),
                        lease_remaining: current.saturating_duration_since(now),
                    });
                }
                // Not leader: a stale answer to a keep-alive sent in an earlier
                // term. A keep-alive never makes a client leader.
            }
            Observation::RenewRefused => {
                events.extend(self.lose(LossReason::Rejected, Phase::Unknown));
            }
            Observation::Released => {
                events.extend(self.lose(LossReason::Released, Phase::Unknown));
                self.releasing += 1;
            }
            Observation::ReleaseDone { at } => {
                self.releasing = self.releasing.saturating_sub(1);
                self.fence = Some(self.fence.map_or(at, |f| f.max(at)));
            }
            Observation::RpcFailed { rpc, code, message } => {
                events.push(LeadershipEvent::RpcFailed {
                    rpc,
                    code,
                    message,
                    lease_remaining: self.remaining(now),
                });
            }
        }
        events
    }

    /// `true` if a request sent at `sent_at` may have been processed before a
    /// release of ours (one in flight, or one that was over after it was sent).
    fn may_predate_a_release(&self, sent_at: Instant) -> bool {
        self.releasing > 0 || self.fence.is_some_and(|f| sent_at < f)
    }

    /// The safe deadline for a lease granted to a request sent at `sent_at`.
    fn deadline_for(&self, sent_at: Instant, lease: Duration) -> Instant {
        sent_at + lease.saturating_sub(self.margin)
    }

    /// Ends the current term (cancelling it before the event exists) and moves
    /// to `next`; nothing happens when not leader.
    fn lose(&mut self, reason: LossReason, next: Phase) -> Option<LeadershipEvent> {
        if !matches!(self.phase, Phase::Leader { .. }) {
            return None;
        }
        match std::mem::replace(&mut self.phase, next) {
            Phase::Leader { term, .. } => {
                term.end();
                Some(LeadershipEvent::Lost { term, reason })
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TTL: Duration = Duration::from_secs(10);
    const MARGIN: Duration = Duration::from_secs(1);

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    fn kinds(evs: &[LeadershipEvent]) -> Vec<&'static str> {
        evs.iter()
            .map(|e| match e {
                LeadershipEvent::Elected { .. } => "elected",
                LeadershipEvent::Renewed { .. } => "renewed",
                LeadershipEvent::Follower => "follower",
                LeadershipEvent::Lost {
                    reason: LossReason::Expired,
                    ..
                } => "lost:expired",
                LeadershipEvent::Lost {
                    reason: LossReason::Rejected,
                    ..
                } => "lost:rejected",
                LeadershipEvent::Lost {
                    reason: LossReason::Released,
                    ..
                } => "lost:released",
                LeadershipEvent::RpcFailed { .. } => "rpc-failed",
            })
            .collect()
    }

    fn acquired(at: Instant) -> Observation {
        Observation::Acquired {
            sent_at: at,
            lease: TTL,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn lease_is_timed_from_the_send_instant_minus_the_margin() {
        let t0 = Instant::now();
        let mut s = ElectionState::new(MARGIN);
        // Answer arrives 2 s after the request was sent.
        let evs = s.apply(acquired(t0), t0 + secs(2));
        assert_eq!(kinds(&evs), ["elected"]);
        assert_eq!(s.deadline(), Some(t0 + secs(9)));
        match &evs[0] {
            LeadershipEvent::Elected {
                lease_remaining,
                term,
            } => {
                assert_eq!(*lease_remaining, secs(7));
                assert_eq!(term.deadline(), t0 + secs(9));
            }
            _ => unreachable!(),
        }
        assert!(s.is_leader(t0 + secs(8)));
        assert!(!s.is_leader(t0 + secs(9)));
        assert_eq!(s.remaining(t0 + secs(9)), None);
    }

    #[tokio::test(start_paused = true)]
    async fn tick_at_the_deadline_reports_expiry_once_and_ends_the_term() {
        let t0 = Instant::now();
        let mut s = ElectionState::new(MARGIN);
        let evs = s.apply(acquired(t0), t0);
        let LeadershipEvent::Elected { term, .. } = &evs[0] else {
            panic!("not elected")
        };
        assert!(kinds(&s.apply(Observation::Tick, t0 + secs(8))).is_empty());
        assert!(!term.is_ended());
        let evs = s.apply(Observation::Tick, t0 + secs(9));
        assert_eq!(kinds(&evs), ["lost:expired"]);
        assert!(term.is_ended());
        assert!(kinds(&s.apply(Observation::Tick, t0 + secs(10))).is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_late_renewal_cannot_revive_an_expired_lease() {
        let t0 = Instant::now();
        let mut s = ElectionState::new(MARGIN);
        s.apply(acquired(t0), t0);
        // A keep-alive sent at 5 s whose answer arrives after the deadline.
        let evs = s.apply(
            Observation::Renewed {
                sent_at: t0 + secs(5),
                lease: TTL,
            },
            t0 + secs(9),
        );
        assert_eq!(kinds(&evs), ["lost:expired"]);
        assert_eq!(s.deadline(), None);
    }

    #[tokio::test(start_paused = true)]
    async fn renewal_moves_the_deadline_forward_never_back() {
        let t0 = Instant::now();
        let mut s = ElectionState::new(MARGIN);
        s.apply(acquired(t0 + secs(1)), t0 + secs(1));
        let evs = s.apply(
            Observation::Renewed {
                sent_at: t0 + secs(4),
                lease: TTL,
            },
            t0 + secs(5),
        );
        assert_eq!(kinds(&evs), ["renewed"]);
        assert_eq!(s.deadline(), Some(t0 + secs(13)));
        // An older answer arriving late does not shorten it.
        s.apply(
            Observation::Renewed {
                sent_at: t0 + secs(2),
                lease: TTL,
            },
            t0 + secs(6),
        );
        assert_eq!(s.deadline(), Some(t0 + secs(13)));
    }

    #[tokio::test(start_paused = true)]
    async fn refused_renewal_is_an_immediate_rejection() {
        let t0 = Instant::now();
        let mut s = ElectionState::new(MARGIN);
        s.apply(acquired(t0), t0);
        assert_eq!(
            kinds(&s.apply(Observation::RenewRefused, t0 + secs(1))),
            ["lost:rejected"]
        );
        assert!(!s.is_leader(t0 + secs(1)));
        // Not leader any more: a second refusal says nothing.
        assert!(s.apply(Observation::RenewRefused, t0 + secs(1)).is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn follower_is_reported_on_entry_only() {
        let t0 = Instant::now();
        let mut s = ElectionState::new(MARGIN);
        assert_eq!(
            kinds(&s.apply(Observation::AcquireRefused, t0)),
            ["follower"]
        );
        assert!(s.apply(Observation::AcquireRefused, t0).is_empty());
        s.apply(acquired(t0), t0);
        s.apply(Observation::Released, t0 + secs(1));
        assert_eq!(
            kinds(&s.apply(Observation::AcquireRefused, t0 + secs(2))),
            ["follower"]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn refused_acquire_while_leader_is_a_loss_then_follower() {
        let t0 = Instant::now();
        let mut s = ElectionState::new(MARGIN);
        s.apply(acquired(t0), t0);
        assert_eq!(
            kinds(&s.apply(Observation::AcquireRefused, t0 + secs(1))),
            ["lost:rejected", "follower"]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn reentrant_acquire_renews_and_release_ends_the_term() {
        let t0 = Instant::now();
        let mut s = ElectionState::new(MARGIN);
        s.apply(acquired(t0), t0);
        assert_eq!(
            kinds(&s.apply(acquired(t0 + secs(3)), t0 + secs(3))),
            ["renewed"]
        );
        assert_eq!(s.deadline(), Some(t0 + secs(12)));
        assert_eq!(
            kinds(&s.apply(Observation::Released, t0 + secs(4))),
            ["lost:released"]
        );
        assert!(s.apply(Observation::Released, t0 + secs(4)).is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_grant_that_may_predate_our_release_is_not_counted() {
        let t0 = Instant::now();
        let mut s = ElectionState::new(MARGIN);
        s.apply(acquired(t0), t0);
        assert_eq!(
            kinds(&s.apply(Observation::Released, t0 + secs(1))),
            ["lost:released"]
        );
        // An acquire answered while the release is in flight: not a grant.
        assert!(s.apply(acquired(t0 + secs(1)), t0 + secs(2)).is_empty());
        s.apply(Observation::ReleaseDone { at: t0 + secs(3) }, t0 + secs(3));
        // Sent before the release was over, answered after: not a grant either.
        assert!(s.apply(acquired(t0 + secs(2)), t0 + secs(4)).is_empty());
        assert!(s
            .apply(
                Observation::Renewed {
                    sent_at: t0 + secs(2),
                    lease: TTL
                },
                t0 + secs(4)
            )
            .is_empty());
        assert_eq!(s.deadline(), None);
        // Sent after: a real term.
        assert_eq!(
            kinds(&s.apply(acquired(t0 + secs(3)), t0 + secs(4))),
            ["elected"]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_answer_too_late_to_be_safe_does_not_elect() {
        let t0 = Instant::now();
        let mut s = ElectionState::new(MARGIN);
        assert!(s.apply(acquired(t0), t0 + secs(9)).is_empty());
        assert_eq!(s.deadline(), None);
    }

    #[tokio::test(start_paused = true)]
    async fn rpc_failures_carry_the_time_left() {
        let t0 = Instant::now();
        let mut s = ElectionState::new(MARGIN);
        let fail = || Observation::RpcFailed {
            rpc: RpcKind::KeepAlive,
            code: tonic::Code::Unavailable,
            message: "down".into(),
        };
        match &s.apply(fail(), t0)[..] {
            [LeadershipEvent::RpcFailed {
                lease_remaining: None,
                ..
            }] => {}
            other => panic!("{other:?}"),
        }
        s.apply(acquired(t0), t0);
        match &s.apply(fail(), t0 + secs(4))[..] {
            [LeadershipEvent::RpcFailed {
                lease_remaining: Some(left),
                ..
            }] => assert_eq!(*left, secs(5)),
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn elected_and_lost_alternate_under_any_observation_sequence() {
        // A deterministic pseudo-random walk over observations and times.
        let mut rng = fastrand::Rng::with_seed(7);
        let t0 = Instant::now();
        let mut s = ElectionState::new(MARGIN);
        let mut now = t0;
        let mut leader = false;
        let mut terms = 0;
        let mut pending_releases = 0u32;
        for _ in 0..20_000 {
            now += Duration::from_millis(rng.u64(0..1500));
            let sent_at =
                now - Duration::from_millis(rng.u64(0..3000).min((now - t0).as_millis() as u64));
            // A release request ends (soon) after it started, as in the client.
            let obs = if pending_releases > 0 && rng.bool() {
                pending_releases -= 1;
                Observation::ReleaseDone { at: now }
            } else {
                match rng.u8(0..7) {
                    0 => Observation::Acquired {
                        sent_at,
                        lease: TTL,
                    },
                    1 => Observation::AcquireRefused,
                    2 => Observation::Renewed {
                        sent_at,
                        lease: TTL,
                    },
                    3 => Observation::RenewRefused,
                    4 => {
                        pending_releases += 1;
                        Observation::Released
                    }
                    5 => Observation::RpcFailed {
                        rpc: RpcKind::KeepAlive,
                        code: tonic::Code::Unavailable,
                        message: String::new(),
                    },
                    _ => Observation::Tick,
                }
            };
            for ev in s.apply(obs, now) {
                match ev {
                    LeadershipEvent::Elected { term, .. } => {
                        assert!(!leader, "Elected twice in a row");
                        leader = true;
                        terms += 1;
                        assert_eq!(term.id(), terms);
                        assert!(term.deadline() > now);
                    }
                    LeadershipEvent::Lost { term, .. } => {
                        assert!(leader, "Lost without Elected");
                        assert!(term.is_ended());
                        leader = false;
                    }
                    LeadershipEvent::Renewed { .. } => assert!(leader),
                    _ => {}
                }
            }
            assert_eq!(leader, s.deadline().is_some());
            // Never leader past the deadline once a tick ran.
            if let Some(d) = s.deadline() {
                assert!(d > now);
            }
        }
        assert!(
            terms > 100,
            "the walk should exercise many terms, got {terms}"
        );
    }
}
