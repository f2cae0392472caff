//! The election state machine: the one place that decides what an RPC result
//! means for leadership.
//!
//! Pure: no I/O and no clock reads; the caller passes the current instant. Each
//! [`Observation`] yields zero or more [`LeadershipEvent`]s. Every rule about
//! the lease lives here:
//!
//! - **The deadline.** A lease counts from the instant its request was *sent*,
//!   for no more than the TTL we asked for, less the safety margin. The
//!   latest answer (by send instant) is authoritative: a shorter lease
//!   shortens the deadline, and one that does not outlast the margin is a
//!   loss. Before looking at an observation the machine checks the deadline,
//!   so a late answer can never extend a lease that has already run out.
//! - **Grants are confirmed.** `TryAcquireLock` says nothing about how long
//!   the server will keep the lock (a server may grant less than asked), so a
//!   grant only makes the client a candidate ([`Phase::Granted`]); the
//!   `KeepAlive` sent right after it tells the real lease, and only that
//!   answer elects.
//! - **Fences.** An answer counts only if nothing of ours could have undone
//!   it on the server: it was sent under the current incarnation of our
//!   identity, no release of ours was in flight, and it was sent after the
//!   last release we know the server applied. A release whose outcome is
//!   unknown (it failed, timed out, was abandoned, or was retried) may still
//!   reach the server at any later time, so it retires the incarnation: the
//!   client goes on under a fresh wire identity (`client_id#N.tag`) that no
//!   earlier request names. Refusals are fenced by send instant too: a
//!   refusal sent before the answer in force is older news and is ignored.
//!
//! The term's deadline is published by the session after every change as a
//! [`LeaseView`]; terms, `is_leader()` and `get_remaining_lease()` read it.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::backoff::MIN_SPACING;

/// The least a lease must leave after the safety margin for this client to
/// lead on it: room for a renewal and its answer at the minimum spacing.
pub(crate) const MIN_USABLE_LEASE: Duration = Duration::from_millis(100);
use crate::event::{LeaderTerm, LeadershipEvent, LeaseCell, LeaseView, LossReason, RpcKind};

/// What the I/O layer saw.
#[derive(Debug, Clone)]
pub(crate) enum Observation {
    /// `TryAcquireLock` answered `is_leader = true` for a request sent at
    /// `sent_at` under `incarnation`.
    Granted { sent_at: Instant, incarnation: u32 },
    /// `TryAcquireLock` answered `is_leader = false`.
    AcquireRefused { sent_at: Instant, incarnation: u32 },
    /// `KeepAlive` answered a positive `lease` (as the server sent it; the
    /// machine caps it at the TTL asked for).
    Renewed {
        sent_at: Instant,
        incarnation: u32,
        lease: Duration,
    },
    /// `KeepAlive` answered a negative or missing lease: not the owner.
    RenewRefused { sent_at: Instant, incarnation: u32 },
    /// `KeepAlive` answered a lease out of the protobuf range (or with mixed
    /// signs): the server is broken, so the answer is a rejection.
    RenewMalformed {
        sent_at: Instant,
        incarnation: u32,
        message: String,
    },
    /// A call failed without an answer from the lock store.
    RpcFailed {
        rpc: RpcKind,
        code: tonic::Code,
        message: String,
    },
    /// This client decided to give the lock up; a release request follows.
    ReleaseStarted,
    /// The release request that followed [`Observation::ReleaseStarted`] is
    /// over at `at`. `settled`: it was answered on its only attempt, so the
    /// server applied it before `at` and no copy of it is still on its way.
    /// `acquires_before`: [`ElectionState::acquires_sent`] when it started.
    ReleaseDone {
        at: Instant,
        incarnation: u32,
        settled: bool,
        acquires_before: u64,
    },
    /// Time passed (a timer fired).
    Tick,
    /// The campaign failed unexpectedly (a panic).
    CampaignFailed,
}

#[derive(Debug, Clone)]
enum Phase {
    /// Not leader, and no refused acquire seen since the last term (or start).
    Unknown,
    /// Not leader; another node held the lock at the last attempt.
    Follower,
    /// `TryAcquireLock` granted a request sent at `sent_at`; a `KeepAlive`
    /// must tell how long the lease really is before this client leads.
    Granted { sent_at: Instant },
    /// Leader until `deadline`, by the answer to a request sent at `basis`.
    Leader {
        term: LeaderTerm,
        deadline: Instant,
        basis: Instant,
    },
}

/// The election state of one client.
#[derive(Debug)]
pub(crate) struct ElectionState {
    phase: Phase,
    margin: Duration,
    /// The TTL every request asks for: no grant counts for more.
    ttl: Duration,
    last_term: u64,
    /// Which incarnation of our identity requests are sent under.
    incarnation: u32,
    /// Release requests in flight (of any incarnation).
    releasing: u32,
    /// When the last settled release of this incarnation was answered.
    fence: Option<Instant>,
    /// `TryAcquireLock` requests sent so far.
    acquires_sent: u64,
    /// `acquires_sent` when the last settled release started.
    released_after: u64,
    /// Handed to new terms so they read the published deadline.
    lease: Arc<LeaseCell>,
}

impl ElectionState {
    /// A leader whose lease in force (`lease`, as the server answered) was
    /// asked for at `sent_at`: granted, then confirmed, both sent then.
    #[cfg(test)]
    pub(crate) fn leading_since(
        ttl: Duration,
        safety_margin: Duration,
        sent_at: Instant,
        lease: Duration,
    ) -> Self {
        let mut state = Self::new(ttl, safety_margin, Arc::default());
        let incarnation = 0;
        state.apply(
            Observation::Granted {
                sent_at,
                incarnation,
            },
            sent_at,
        );
        state.apply(
            Observation::Renewed {
                sent_at,
                incarnation,
                lease,
            },
            sent_at,
        );
        state
    }

    #[cfg(test)]
    pub(crate) fn new(ttl: Duration, safety_margin: Duration, lease: Arc<LeaseCell>) -> Self {
        Self::starting_at(ttl, safety_margin, lease, 0)
    }

    /// A state whose first requests go out under `incarnation` (1 when an
    /// earlier client of this identity may have left a stale release of the
    /// bare id behind).
    pub(crate) fn starting_at(
        ttl: Duration,
        safety_margin: Duration,
        lease: Arc<LeaseCell>,
        incarnation: u32,
    ) -> Self {
        ElectionState {
            phase: Phase::Unknown,
            margin: safety_margin,
            ttl,
            last_term: 0,
            incarnation,
            releasing: 0,
            fence: None,
            acquires_sent: 0,
            released_after: 0,
            lease,
        }
    }

    /// What the session publishes after every change.
    pub(crate) fn view(&self) -> LeaseView {
        match &self.phase {
            Phase::Leader { term, deadline, .. } => LeaseView {
                current: Some(term.published(*deadline)),
            },
            _ => LeaseView::default(),
        }
    }

    /// The safe deadline of the current term, if leader (it may already have
    /// passed if no observation was applied since).
    pub(crate) fn deadline(&self) -> Option<Instant> {
        match &self.phase {
            Phase::Leader { deadline, .. } => Some(*deadline),
            _ => None,
        }
    }

    /// When the next renewal is due: `renew_interval` after the request that
    /// set the deadline in force was sent. `None` unless leader.
    pub(crate) fn renew_due(&self, renew_interval: Duration) -> Option<Instant> {
        match &self.phase {
            Phase::Leader {
                basis, deadline, ..
            } => {
                // Never later than halfway through the lease in force, and
                // never sooner than the minimum spacing between two calls
                // (a lease barely over the margin must not renew in a loop).
                let half = deadline.saturating_duration_since(*basis) / 2;
                let wait = renew_interval.min(half).max(MIN_SPACING);
                Some(basis.checked_add(wait).unwrap_or(*deadline))
            }
            _ => None,
        }
    }

    /// Until when a pending grant could still be confirmed, if one is.
    pub(crate) fn grant_expiry(&self) -> Option<Instant> {
        match self.phase {
            Phase::Granted { sent_at } => self.candidate_until(sent_at),
            _ => None,
        }
    }

    /// `true` between a grant and the answer that confirms it.
    pub(crate) fn is_granted(&self) -> bool {
        matches!(self.phase, Phase::Granted { .. })
    }

    /// `true` if a request naming the bare client id may still change the
    /// server's lock after this state is gone: it moved past incarnation 0
    /// (a release of it was unsettled) or a release is still in flight.
    pub(crate) fn leaves_bare_id_unsafe(&self) -> bool {
        self.incarnation > 0 || self.releasing > 0
    }

    /// The incarnation requests are sent under now.
    pub(crate) fn incarnation(&self) -> u32 {
        self.incarnation
    }

    /// Counts a `TryAcquireLock` about to be sent; returns the incarnation to
    /// send it under.
    pub(crate) fn acquire_sent(&mut self) -> u32 {
        self.acquires_sent += 1;
        self.incarnation
    }

    /// `TryAcquireLock` requests sent so far.
    pub(crate) fn acquires_sent(&self) -> u64 {
        self.acquires_sent
    }

    /// `false` when the server cannot hold a lock for our current identity:
    /// not leader or granted, and no acquire was sent under it since the last
    /// settled release (or ever).
    pub(crate) fn may_own_lock(&self) -> bool {
        matches!(self.phase, Phase::Leader { .. } | Phase::Granted { .. })
            || self.acquires_sent > self.released_after
    }

    /// `true` if leader and the deadline has not passed at `now`.
    #[cfg(test)]
    pub(crate) fn is_leader(&self, now: Instant) -> bool {
        self.deadline().is_some_and(|d| now < d)
    }

    /// Time left on the lease at `now`, if leader and not past the deadline.
    pub(crate) fn remaining(&self, now: Instant) -> Option<Duration> {
        self.deadline()
            .filter(|d| now < *d)
            .map(|d| d.duration_since(now))
    }

    /// The event a new subscriber needs to see first so that its view starts
    /// consistent: `Elected` for a running term, `Follower` if known. Apply a
    /// [`Observation::Tick`] at `now` first, so that an expired term is
    /// reported lost (to the existing subscribers) rather than snapshotted.
    pub(crate) fn snapshot(&self, now: Instant) -> Option<LeadershipEvent> {
        match &self.phase {
            Phase::Leader { term, deadline, .. } if now < *deadline => {
                Some(LeadershipEvent::Elected {
                    term: term.clone(),
                    lease_remaining: deadline.duration_since(now),
                })
            }
            Phase::Follower => Some(LeadershipEvent::Follower),
            _ => None,
        }
    }

    /// Applies one observation at `now` and returns what it means.
    pub(crate) fn apply(&mut self, obs: Observation, now: Instant) -> Vec<LeadershipEvent> {
        let mut events = Vec::new();
        self.settle_expiry(now, &mut events);
        match obs {
            Observation::Tick => {}
            Observation::Granted {
                sent_at,
                incarnation,
            } => {
                if !self.counts(sent_at, incarnation) {
                    return events;
                }
                match self.phase {
                    // A grant carries no lease length: only a KeepAlive
                    // answer moves a leader's deadline.
                    Phase::Leader { .. } => {}
                    Phase::Granted { sent_at: s } if s >= sent_at => {}
                    _ if self.candidate_until(sent_at).is_some_and(|end| end > now) => {
                        self.phase = Phase::Granted { sent_at };
                    }
                    // Granted, but too late to be of use: the next attempt
                    // (re-entrant) will tell.
                    _ => {}
                }
            }
            Observation::AcquireRefused {
                sent_at,
                incarnation,
            } => {
                if !self.refusal_counts(sent_at, incarnation) {
                    return events;
                }
                match self.phase {
                    Phase::Leader { .. } => {
                        events.extend(self.lose(LossReason::Rejected, Phase::Follower));
                        events.push(LeadershipEvent::Follower);
                    }
                    Phase::Unknown | Phase::Granted { .. } => {
                        self.phase = Phase::Follower;
                        events.push(LeadershipEvent::Follower);
                    }
                    Phase::Follower => {}
                }
            }
            Observation::Renewed {
                sent_at,
                incarnation,
                lease,
            } => {
                if !self.counts(sent_at, incarnation) {
                    return events;
                }
                let deadline = self.deadline_for(sent_at, lease).filter(|d| *d > now);
                match (&mut self.phase, deadline) {
                    (Phase::Leader { basis, .. }, _) if sent_at < *basis => {
                        // Older than the answer in force: out of order.
                    }
                    (
                        Phase::Leader {
                            term,
                            deadline: current,
                            basis,
                        },
                        Some(deadline),
                    ) => {
                        *current = deadline;
                        *basis = sent_at;
                        events.push(LeadershipEvent::Renewed {
                            term_id: term.id(),
                            lease_remaining: deadline.duration_since(now),
                        });
                    }
                    (Phase::Leader { .. }, None) => {
                        // The server's lease does not outlast the margin.
                        events.extend(self.lose(LossReason::Expired, Phase::Unknown));
                    }
                    (Phase::Granted { sent_at: s }, _) if sent_at < *s => {}
                    (Phase::Granted { .. }, Some(deadline)) => {
                        events.push(self.elect(deadline, sent_at, now));
                    }
                    (Phase::Granted { .. }, None) => self.phase = Phase::Unknown,
                    // Not a candidate: a stale answer to a keep-alive of an
                    // earlier term. A keep-alive never elects without a grant.
                    (Phase::Unknown | Phase::Follower, _) => {}
                }
            }
            Observation::RenewRefused {
                sent_at,
                incarnation,
            } => {
                if self.refusal_counts(sent_at, incarnation) {
                    events.extend(self.lose(LossReason::Rejected, Phase::Unknown));
                    if self.is_granted() {
                        self.phase = Phase::Unknown;
                    }
                }
            }
            Observation::RenewMalformed {
                sent_at,
                incarnation,
                message,
            } => {
                events.push(LeadershipEvent::RpcFailed {
                    rpc: RpcKind::KeepAlive,
                    code: tonic::Code::Internal,
                    message,
                    lease_remaining: self.remaining(now),
                });
                if self.refusal_counts(sent_at, incarnation) {
                    events.extend(self.lose(LossReason::Rejected, Phase::Unknown));
                    if self.is_granted() {
                        self.phase = Phase::Unknown;
                    }
                }
            }
            Observation::ReleaseStarted => {
                events.extend(self.lose(LossReason::Released, Phase::Unknown));
                if self.is_granted() {
                    self.phase = Phase::Unknown;
                }
                self.releasing += 1;
            }
            Observation::ReleaseDone {
                at,
                incarnation,
                settled,
                acquires_before,
            } => {
                self.releasing = self.releasing.saturating_sub(1);
                if incarnation == self.incarnation {
                    if settled {
                        self.fence = Some(self.fence.map_or(at, |f| f.max(at)));
                        self.released_after = self.released_after.max(acquires_before);
                    } else {
                        // It may reach the server at any later time: retire
                        // this identity so it can only ever end its own lock.
                        self.incarnation = self.incarnation.wrapping_add(1);
                        self.fence = None;
                        self.released_after = self.acquires_sent;
                    }
                }
            }
            Observation::RpcFailed { rpc, code, message } => {
                events.push(LeadershipEvent::RpcFailed {
                    rpc,
                    code,
                    message,
                    lease_remaining: self.remaining(now),
                });
            }
            Observation::CampaignFailed => {
                events.extend(self.lose(LossReason::Failed, Phase::Unknown));
                if self.is_granted() {
                    self.phase = Phase::Unknown;
                }
            }
        }
        events
    }

    /// Reports a term whose deadline has passed as lost, and forgets a grant
    /// that can no longer be confirmed in time.
    fn settle_expiry(&mut self, now: Instant, events: &mut Vec<LeadershipEvent>) {
        match self.phase {
            Phase::Leader { deadline, .. } if now >= deadline => {
                events.extend(self.lose(LossReason::Expired, Phase::Unknown));
            }
            Phase::Granted { sent_at }
                if self.candidate_until(sent_at).is_none_or(|end| now >= end) =>
            {
                self.phase = Phase::Unknown;
            }
            _ => {}
        }
    }

    /// `true` if a grant or lease for a request sent at `sent_at` under
    /// `incarnation` can be counted: nothing of ours may have undone it.
    fn counts(&self, sent_at: Instant, incarnation: u32) -> bool {
        incarnation == self.incarnation
            && self.releasing == 0
            && self.fence.is_none_or(|f| sent_at >= f)
    }

    /// `true` if a refusal for a request sent at `sent_at` is news: it was
    /// sent under the current identity, and not before the answer in force.
    fn refusal_counts(&self, sent_at: Instant, incarnation: u32) -> bool {
        incarnation == self.incarnation
            && match self.phase {
                Phase::Leader { basis, .. } => sent_at >= basis,
                Phase::Granted { sent_at: s } => sent_at >= s,
                Phase::Unknown | Phase::Follower => true,
            }
    }

    /// The safe deadline for a lease answered to a request sent at `sent_at`:
    /// never more than the TTL asked for, less the margin. `None` if less
    /// than [`MIN_USABLE_LEASE`] is left after the margin (or the instant is
    /// out of range).
    fn deadline_for(&self, sent_at: Instant, lease: Duration) -> Option<Instant> {
        let usable = lease.min(self.ttl).checked_sub(self.margin)?;
        if usable < MIN_USABLE_LEASE {
            // Too short to renew in time (two calls at the minimum spacing):
            // leading on it would only flap.
            return None;
        }
        sent_at.checked_add(usable)
    }

    /// How long a grant for a request sent at `sent_at` could be confirmed:
    /// as long as the lease we asked for could last.
    fn candidate_until(&self, sent_at: Instant) -> Option<Instant> {
        self.deadline_for(sent_at, self.ttl)
    }

    /// Starts a new term.
    fn elect(&mut self, deadline: Instant, basis: Instant, now: Instant) -> LeadershipEvent {
        self.last_term += 1;
        let term = LeaderTerm::new(self.last_term, self.lease.clone());
        self.phase = Phase::Leader {
            term: term.clone(),
            deadline,
            basis,
        };
        LeadershipEvent::Elected {
            term,
            lease_remaining: deadline.duration_since(now),
        }
    }

    /// Ends the current term and moves to `next`; nothing happens when not
    /// leader. (The session cancels the term when it publishes the new view.)
    fn lose(&mut self, reason: LossReason, next: Phase) -> Option<LeadershipEvent> {
        if !matches!(self.phase, Phase::Leader { .. }) {
            return None;
        }
        match std::mem::replace(&mut self.phase, next) {
            Phase::Leader { term, .. } => Some(LeadershipEvent::Lost { term, reason }),
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

    /// The state machine with the session's publishing, so that terms read a
    /// live deadline as they do in the client.
    struct Harness {
        s: ElectionState,
        lease: Arc<LeaseCell>,
    }

    impl Harness {
        fn new() -> Self {
            let lease = Arc::new(LeaseCell::default());
            Harness {
                s: ElectionState::new(TTL, MARGIN, lease.clone()),
                lease,
            }
        }

        fn apply(&mut self, obs: Observation, now: Instant) -> Vec<LeadershipEvent> {
            let evs = self.s.apply(obs, now);
            self.lease.publish(self.s.view());
            evs
        }

        fn inc(&self) -> u32 {
            self.s.incarnation()
        }

        /// A grant and its confirming keep-alive, both sent at `at`.
        fn elect(&mut self, at: Instant, answered: Instant) -> Vec<LeadershipEvent> {
            let inc = self.inc();
            let mut evs = self.apply(
                Observation::Granted {
                    sent_at: at,
                    incarnation: inc,
                },
                answered,
            );
            evs.extend(self.apply(renewed(at, inc, TTL), answered));
            evs
        }
    }

    fn renewed(sent_at: Instant, incarnation: u32, lease: Duration) -> Observation {
        Observation::Renewed {
            sent_at,
            incarnation,
            lease,
        }
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
                LeadershipEvent::Lost { .. } => "lost:other",
                LeadershipEvent::RpcFailed { .. } => "rpc-failed",
            })
            .collect()
    }

    fn term_of(evs: &[LeadershipEvent]) -> LeaderTerm {
        evs.iter()
            .find_map(|e| match e {
                LeadershipEvent::Elected { term, .. } => Some(term.clone()),
                _ => None,
            })
            .expect("an Elected event")
    }

    #[tokio::test(start_paused = true)]
    async fn lease_is_timed_from_the_send_instant_minus_the_margin() {
        let t0 = Instant::now();
        let mut h = Harness::new();
        // Answers arrive 2 s after the requests were sent.
        let evs = h.elect(t0, t0 + secs(2));
        assert_eq!(kinds(&evs), ["elected"]);
        assert_eq!(h.s.deadline(), Some(t0 + secs(9)));
        match &evs[0] {
            LeadershipEvent::Elected {
                lease_remaining, ..
            } => assert_eq!(*lease_remaining, secs(7)),
            _ => unreachable!(),
        }
        assert_eq!(term_of(&evs).deadline(), Some(t0 + secs(9)));
        assert!(h.s.is_leader(t0 + secs(8)));
        assert!(!h.s.is_leader(t0 + secs(9)));
        assert_eq!(h.s.remaining(t0 + secs(9)), None);
    }

    #[tokio::test(start_paused = true)]
    async fn a_grant_alone_does_not_elect_until_a_keep_alive_tells_the_lease() {
        let t0 = Instant::now();
        let mut h = Harness::new();
        let inc = h.inc();
        let evs = h.apply(
            Observation::Granted {
                sent_at: t0,
                incarnation: inc,
            },
            t0,
        );
        assert!(evs.is_empty());
        assert!(h.s.is_granted());
        assert_eq!(h.s.deadline(), None);
        // The server clamps every lease to 2 s: that is what counts.
        let evs = h.apply(renewed(t0 + secs(1), inc, secs(2)), t0 + secs(1));
        assert_eq!(kinds(&evs), ["elected"]);
        assert_eq!(h.s.deadline(), Some(t0 + secs(2)));
    }

    #[tokio::test(start_paused = true)]
    async fn an_unconfirmed_grant_lapses_when_its_lease_could_have_run_out() {
        let t0 = Instant::now();
        let mut h = Harness::new();
        let inc = h.inc();
        h.apply(
            Observation::Granted {
                sent_at: t0,
                incarnation: inc,
            },
            t0,
        );
        assert!(h.apply(Observation::Tick, t0 + secs(9)).is_empty());
        assert!(!h.s.is_granted());
        // A confirmation sent before the grant is no confirmation.
        h.apply(
            Observation::Granted {
                sent_at: t0 + secs(10),
                incarnation: inc,
            },
            t0 + secs(10),
        );
        assert!(h
            .apply(renewed(t0 + secs(9), inc, TTL), t0 + secs(10))
            .is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_grant_never_counts_for_more_than_the_ttl_asked() {
        let t0 = Instant::now();
        let mut h = Harness::new();
        h.elect(t0, t0);
        let inc = h.inc();
        for lease in [secs(3600), Duration::MAX, TTL + Duration::from_nanos(1)] {
            let evs = h.apply(renewed(t0 + secs(1), inc, lease), t0 + secs(1));
            assert_eq!(kinds(&evs), ["renewed"]);
            assert_eq!(h.s.deadline(), Some(t0 + secs(10)), "{lease:?}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_latest_answer_is_authoritative_so_a_shorter_lease_shortens_the_deadline() {
        let t0 = Instant::now();
        let mut h = Harness::new();
        let term = term_of(&h.elect(t0, t0));
        let inc = h.inc();
        let evs = h.apply(renewed(t0 + secs(2), inc, secs(4)), t0 + secs(2));
        assert_eq!(kinds(&evs), ["renewed"]);
        assert_eq!(h.s.deadline(), Some(t0 + secs(5)));
        assert_eq!(term.deadline(), Some(t0 + secs(5)), "the term reads it");
        // An older answer arriving late changes nothing.
        assert!(h
            .apply(renewed(t0 + secs(1), inc, TTL), t0 + secs(3))
            .is_empty());
        assert_eq!(h.s.deadline(), Some(t0 + secs(5)));
    }

    #[tokio::test(start_paused = true)]
    async fn a_lease_that_does_not_outlast_the_margin_is_a_loss() {
        let t0 = Instant::now();
        let mut h = Harness::new();
        let term = term_of(&h.elect(t0, t0));
        let inc = h.inc();
        let evs = h.apply(
            renewed(t0 + secs(1), inc, Duration::from_nanos(1)),
            t0 + secs(1),
        );
        assert_eq!(kinds(&evs), ["lost:expired"]);
        assert!(term.is_ended());
        assert_eq!(h.s.deadline(), None);
    }

    #[tokio::test(start_paused = true)]
    async fn tick_at_the_deadline_reports_expiry_once_and_ends_the_term() {
        let t0 = Instant::now();
        let mut h = Harness::new();
        let term = term_of(&h.elect(t0, t0));
        assert!(h.apply(Observation::Tick, t0 + secs(8)).is_empty());
        assert!(term.is_active());
        let evs = h.apply(Observation::Tick, t0 + secs(9));
        assert_eq!(kinds(&evs), ["lost:expired"]);
        assert!(term.is_ended());
        assert!(h.apply(Observation::Tick, t0 + secs(10)).is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_late_renewal_cannot_revive_an_expired_lease() {
        let t0 = Instant::now();
        let mut h = Harness::new();
        h.elect(t0, t0);
        let inc = h.inc();
        // A keep-alive sent at 5 s whose answer arrives after the deadline.
        let evs = h.apply(renewed(t0 + secs(5), inc, TTL), t0 + secs(9));
        assert_eq!(kinds(&evs), ["lost:expired"]);
        assert_eq!(h.s.deadline(), None);
    }

    #[tokio::test(start_paused = true)]
    async fn refused_renewal_is_an_immediate_rejection() {
        let t0 = Instant::now();
        let mut h = Harness::new();
        h.elect(t0, t0);
        let inc = h.inc();
        let refused = |at| Observation::RenewRefused {
            sent_at: at,
            incarnation: inc,
        };
        assert_eq!(
            kinds(&h.apply(refused(t0 + secs(1)), t0 + secs(1))),
            ["lost:rejected"]
        );
        assert!(!h.s.is_leader(t0 + secs(1)));
        assert!(h.apply(refused(t0 + secs(1)), t0 + secs(1)).is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_stale_refusal_does_not_end_a_newer_term() {
        let t0 = Instant::now();
        let mut h = Harness::new();
        // Refusals decided before the grant was even sent arrive after it.
        h.elect(t0 + secs(2), t0 + secs(3));
        let inc = h.inc();
        for stale in [
            Observation::AcquireRefused {
                sent_at: t0 + secs(1),
                incarnation: inc,
            },
            Observation::RenewRefused {
                sent_at: t0 + secs(1),
                incarnation: inc,
            },
        ] {
            assert!(h.apply(stale, t0 + secs(4)).is_empty());
            assert!(h.s.is_leader(t0 + secs(4)));
        }
        // A refusal sent after the answer in force is news.
        let evs = h.apply(
            Observation::AcquireRefused {
                sent_at: t0 + secs(3),
                incarnation: inc,
            },
            t0 + secs(4),
        );
        assert_eq!(kinds(&evs), ["lost:rejected", "follower"]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_malformed_lease_is_reported_and_treated_as_a_rejection() {
        let t0 = Instant::now();
        let mut h = Harness::new();
        h.elect(t0, t0);
        let inc = h.inc();
        let evs = h.apply(
            Observation::RenewMalformed {
                sent_at: t0 + secs(1),
                incarnation: inc,
                message: "seconds out of range".into(),
            },
            t0 + secs(1),
        );
        assert_eq!(kinds(&evs), ["rpc-failed", "lost:rejected"]);
    }

    #[tokio::test(start_paused = true)]
    async fn follower_is_reported_on_entry_only() {
        let t0 = Instant::now();
        let mut h = Harness::new();
        let refused = |inc| Observation::AcquireRefused {
            sent_at: t0,
            incarnation: inc,
        };
        assert_eq!(kinds(&h.apply(refused(0), t0)), ["follower"]);
        assert!(h.apply(refused(0), t0).is_empty());
        h.elect(t0, t0);
        h.apply(Observation::ReleaseStarted, t0 + secs(1));
        assert_eq!(
            kinds(&h.apply(
                Observation::AcquireRefused {
                    sent_at: t0 + secs(2),
                    incarnation: 0
                },
                t0 + secs(2)
            )),
            ["follower"]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn reentrant_grant_while_leader_does_not_move_the_deadline_and_release_ends_the_term() {
        let t0 = Instant::now();
        let mut h = Harness::new();
        let term = term_of(&h.elect(t0, t0));
        let inc = h.inc();
        let evs = h.apply(
            Observation::Granted {
                sent_at: t0 + secs(3),
                incarnation: inc,
            },
            t0 + secs(3),
        );
        assert!(evs.is_empty());
        assert_eq!(h.s.deadline(), Some(t0 + secs(9)));
        assert_eq!(
            kinds(&h.apply(Observation::ReleaseStarted, t0 + secs(4))),
            ["lost:released"]
        );
        assert!(term.is_ended());
        assert!(h
            .apply(Observation::ReleaseStarted, t0 + secs(4))
            .is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_grant_that_may_predate_our_release_is_not_counted() {
        let t0 = Instant::now();
        let mut h = Harness::new();
        h.elect(t0, t0);
        let inc = h.inc();
        let acquires = h.s.acquires_sent();
        h.apply(Observation::ReleaseStarted, t0 + secs(1));
        // Answered while the release is in flight: not a grant.
        h.apply(
            Observation::Granted {
                sent_at: t0 + secs(1),
                incarnation: inc,
            },
            t0 + secs(2),
        );
        assert!(!h.s.is_granted());
        h.apply(
            Observation::ReleaseDone {
                at: t0 + secs(3),
                incarnation: inc,
                settled: true,
                acquires_before: acquires,
            },
            t0 + secs(3),
        );
        assert_eq!(h.inc(), inc, "a settled release keeps the identity");
        // Sent before the release was over, answered after: not counted.
        h.apply(
            Observation::Granted {
                sent_at: t0 + secs(2),
                incarnation: inc,
            },
            t0 + secs(4),
        );
        assert!(!h.s.is_granted());
        // Sent after: a real term.
        assert_eq!(kinds(&h.elect(t0 + secs(3), t0 + secs(4))), ["elected"]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_release_whose_outcome_is_unknown_retires_the_identity() {
        let t0 = Instant::now();
        let mut h = Harness::new();
        h.elect(t0, t0);
        let old = h.inc();
        h.apply(Observation::ReleaseStarted, t0 + secs(1));
        h.apply(
            Observation::ReleaseDone {
                at: t0 + secs(2),
                incarnation: old,
                settled: false,
                acquires_before: 0,
            },
            t0 + secs(2),
        );
        let new = h.inc();
        assert_ne!(new, old);
        assert!(
            !h.s.may_own_lock(),
            "nothing was asked under the new identity"
        );
        // Anything answered to the old identity is history, however late.
        h.apply(
            Observation::Granted {
                sent_at: t0 + secs(5),
                incarnation: old,
            },
            t0 + secs(5),
        );
        assert!(!h.s.is_granted());
        let term = term_of(&h.elect(t0 + secs(5), t0 + secs(5)));
        assert_eq!(term.id(), 2);
        for stale in [
            Observation::RenewRefused {
                sent_at: t0 + secs(6),
                incarnation: old,
            },
            Observation::AcquireRefused {
                sent_at: t0 + secs(6),
                incarnation: old,
            },
        ] {
            assert!(h.apply(stale, t0 + secs(6)).is_empty());
        }
        assert!(term.is_active());
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_campaign_ends_the_term() {
        let t0 = Instant::now();
        let mut h = Harness::new();
        let term = term_of(&h.elect(t0, t0));
        let evs = h.apply(Observation::CampaignFailed, t0 + secs(1));
        assert!(matches!(
            &evs[..],
            [LeadershipEvent::Lost {
                reason: LossReason::Failed,
                ..
            }]
        ));
        assert!(term.is_ended());
    }

    #[tokio::test(start_paused = true)]
    async fn rpc_failures_carry_the_time_left() {
        let t0 = Instant::now();
        let mut h = Harness::new();
        let fail = || Observation::RpcFailed {
            rpc: RpcKind::KeepAlive,
            code: tonic::Code::Unavailable,
            message: "down".into(),
        };
        match &h.apply(fail(), t0)[..] {
            [LeadershipEvent::RpcFailed {
                lease_remaining: None,
                ..
            }] => {}
            other => panic!("{other:?}"),
        }
        h.elect(t0, t0);
        match &h.apply(fail(), t0 + secs(4))[..] {
            [LeadershipEvent::RpcFailed {
                lease_remaining: Some(left),
                ..
            }] => assert_eq!(*left, secs(5)),
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn elected_and_lost_alternate_and_no_lease_outlives_its_answer_under_any_sequence() {
        // A deterministic pseudo-random walk over observations and times.
        let mut rng = fastrand::Rng::with_seed(7);
        let t0 = Instant::now();
        let mut h = Harness::new();
        let mut now = t0;
        let mut leader: Option<LeaderTerm> = None;
        let mut terms = 0;
        let mut pending_releases: Vec<(u32, u64)> = Vec::new();
        for _ in 0..20_000 {
            now += Duration::from_millis(rng.u64(0..1500));
            let sent_at =
                now - Duration::from_millis(rng.u64(0..3000).min((now - t0).as_millis() as u64));
            let inc = if rng.u8(0..8) == 0 {
                h.inc().saturating_sub(1)
            } else {
                h.inc()
            };
            let lease = match rng.u8(0..4) {
                0 => Duration::from_millis(rng.u64(0..20_000)),
                1 => Duration::MAX,
                _ => TTL,
            };
            let obs = if !pending_releases.is_empty() && rng.bool() {
                let (incarnation, acquires_before) = pending_releases.remove(0);
                Observation::ReleaseDone {
                    at: now,
                    incarnation,
                    settled: rng.bool(),
                    acquires_before,
                }
            } else {
                match rng.u8(0..9) {
                    0 | 7 => Observation::Granted {
                        sent_at,
                        incarnation: inc,
                    },
                    1 => Observation::AcquireRefused {
                        sent_at,
                        incarnation: inc,
                    },
                    2 | 8 => renewed(sent_at, inc, lease),
                    3 => Observation::RenewRefused {
                        sent_at,
                        incarnation: inc,
                    },
                    4 => {
                        pending_releases.push((h.inc(), h.s.acquires_sent()));
                        Observation::ReleaseStarted
                    }
                    5 => Observation::RpcFailed {
                        rpc: RpcKind::KeepAlive,
                        code: tonic::Code::Unavailable,
                        message: String::new(),
                    },
                    _ => Observation::Tick,
                }
            };
            let counted_renewal = match &obs {
                Observation::Renewed {
                    sent_at,
                    incarnation,
                    ..
                } if *incarnation == h.inc() => Some(*sent_at),
                _ => None,
            };
            let evs = h.apply(obs, now);
            let extended = evs.iter().any(|e| {
                matches!(
                    e,
                    LeadershipEvent::Elected { .. } | LeadershipEvent::Renewed { .. }
                )
            });
            for ev in evs {
                match ev {
                    LeadershipEvent::Elected { term, .. } => {
                        assert!(leader.is_none(), "Elected twice in a row");
                        terms += 1;
                        assert_eq!(term.id(), terms);
                        assert!(term.is_active());
                        leader = Some(term);
                    }
                    LeadershipEvent::Lost { term, .. } => {
                        let current = leader.take().expect("Lost without Elected");
                        assert_eq!(current, term);
                        assert!(term.is_ended());
                    }
                    LeadershipEvent::Renewed { .. } => assert!(leader.is_some()),
                    _ => {}
                }
            }
            assert_eq!(leader.is_some(), h.s.deadline().is_some());
            if let Some(d) = h.s.deadline() {
                assert!(d > now, "never leader past the deadline once applied");
                if let Some(sent) = counted_renewal.filter(|_| extended) {
                    assert!(
                        d <= sent + (TTL - MARGIN),
                        "no grant counts for more than asked"
                    );
                }
            }
        }
        assert!(
            terms > 100,
            "the walk should exercise many terms, got {terms}"
        );
    }
}
