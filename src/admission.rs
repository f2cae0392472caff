//! Admission control for the calls on one connection.
//!
//! Every client that shares a connection (`for_scope`, `share_connection`)
//! issues its calls through the connection's [`Admission`]: at most `cap`
//! calls are in flight at once, and the rest wait here, in a local queue,
//! until one ends. Without it, a cold start of many elections (a process that
//! creates 100,000 shard locks after a restart) opens tens of thousands of
//! HTTP/2 streams at once: the calls queue inside the HTTP/2 stack where
//! their timeouts already run, time out, are counted as a dead connection
//! and redialed, and a start that the server could serve in seconds falls
//! over. Here instead:
//!
//! - **Bounded in flight.** The cap defaults to [`DEFAULT_MAX_CONCURRENT_CALLS`]
//!   (100), the smallest `SETTINGS_MAX_CONCURRENT_STREAMS` RFC 9113 advises a
//!   server to allow, so every admitted call can really be on the wire. (tonic
//!   does not expose the value the server advertised.)
//! - **Urgent first.** A leader's renewal and a release ([`Priority::Urgent`])
//!   leave the queue before any follower's attempt ([`Priority::Normal`]): a
//!   lease at stake never waits behind a cold start of other locks. Within a
//!   priority the queue is first come, first served.
//! - **Timed from the send.** Waiting here is not part of a call's timeout:
//!   the caller takes the send instant, and starts its timeout, only once it
//!   holds a [`Permit`]. The send instant is therefore never earlier than the
//!   queue wait (the lease is not shortened by it for nothing) and still
//!   never later than the real transmission, which happens after it.
//! - **No redial for local waiting.** A call that gives up while still queued
//!   ([`Admission::admit`] returns `None`) never reached the connection and
//!   says nothing about it.
//!
//! A leader's step-down does not depend on any of this: the step-down timer
//! (in the connection's driver, `crate::election::driver`) fires at the
//! deadline while a renewal waits here.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;
use tokio::time::Instant;

/// The default cap on calls in flight on one connection
/// ([`ClientBuilder::max_concurrent_calls`](crate::ClientBuilder::max_concurrent_calls)):
/// the smallest `SETTINGS_MAX_CONCURRENT_STREAMS` RFC 9113 advises an HTTP/2
/// server to allow.
pub const DEFAULT_MAX_CONCURRENT_CALLS: usize = 100;

/// Which queue a call waits in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Priority {
    /// A leader's renewal (a `KeepAlive`, or a re-entrant `TryAcquireLock`
    /// of a leader), a grant's confirmation, a release: a lease or a lock is
    /// at stake.
    Urgent,
    /// A follower's attempt to acquire.
    Normal,
}

/// How long a call may wait for admission.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Wait {
    /// As long as it takes: an attempt of the background campaign, which
    /// costs nothing while it waits and would only go to the back of the
    /// queue if it gave up.
    Unbounded,
    /// At most this long (a call a user awaits).
    AtMost(std::time::Duration),
    /// The call is worth nothing after this instant (a leader's renewal: the
    /// lease's safe deadline; a release: one RPC timeout after it started,
    /// the bound `shutdown()` promises). It must leave the queue before it,
    /// and its answer is awaited no longer than it either.
    Until(Instant),
}

impl Wait {
    /// The instant after which the call stops waiting for admission.
    pub(crate) fn queue_deadline(self, now: Instant) -> Option<Instant> {
        match self {
            Wait::Unbounded => None,
            Wait::AtMost(d) => Some(crate::time::after(now, d)),
            Wait::Until(at) => Some(at),
        }
    }

    /// The instant by which the call must be over, if the wait says so.
    pub(crate) fn hard_end(self) -> Option<Instant> {
        match self {
            Wait::Until(at) => Some(at),
            _ => None,
        }
    }
}

/// The admission queue of one connection. Cheap to share (`Arc`).
#[derive(Debug)]
pub(crate) struct Admission {
    cap: usize,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    in_flight: usize,
    urgent: VecDeque<oneshot::Sender<Permit>>,
    normal: VecDeque<oneshot::Sender<Permit>>,
}

impl State {
    /// The next live waiter, urgent ones first.
    fn next_waiter(&mut self) -> Option<oneshot::Sender<Permit>> {
        loop {
            let tx = self
                .urgent
                .pop_front()
                .or_else(|| self.normal.pop_front())?;
            if !tx.is_closed() {
                return Some(tx);
            }
        }
    }
}

/// The right to have one call in flight; handed to the next waiter when
/// dropped.
#[derive(Debug)]
#[must_use = "the call is admitted only while the permit is held"]
pub(crate) struct Permit {
    admission: Option<Arc<Admission>>,
}

impl Admission {
    /// An admission queue letting at most `cap` calls (at least 1) in flight.
    pub(crate) fn new(cap: usize) -> Arc<Self> {
        Arc::new(Admission {
            cap: cap.max(1),
            state: Mutex::new(State::default()),
        })
    }

    /// The cap on calls in flight.
    pub(crate) fn cap(&self) -> usize {
        self.cap
    }

    /// Calls in flight and calls waiting, for diagnostics and tests.
    #[cfg(test)]
    fn load(&self) -> (usize, usize) {
        let s = crate::sync::lock(&self.state);
        (s.in_flight, s.urgent.len() + s.normal.len())
    }

    /// Waits for a free slot, at most until `deadline` (`None`: for ever).
    /// `None` if the deadline came first: the call never left this process.
    /// Cancel-safe: a waiter dropped while queued takes no slot, and a slot
    /// handed to it as it is dropped goes on to the next waiter.
    pub(crate) async fn admit(
        self: &Arc<Self>,
        priority: Priority,
        deadline: Option<Instant>,
    ) -> Option<Permit> {
        let rx = {
            let mut s = crate::sync::lock(&self.state);
            // Invariant: while anyone waits, every slot is taken (a freed
            // slot goes straight to the next waiter), so a free slot means
            // nobody is ahead of this call.
            if s.in_flight < self.cap {
                s.in_flight += 1;
                return Some(Permit {
                    admission: Some(self.clone()),
                });
            }
            let (tx, rx) = oneshot::channel();
            match priority {
                Priority::Urgent => s.urgent.push_back(tx),
                Priority::Normal => s.normal.push_back(tx),
            }
            rx
        };
        let permit = match deadline {
            None => rx.await.ok(),
            Some(at) => tokio::time::timeout_at(at, rx).await.ok()?.ok(),
        };
        if permit.is_none() {
            tracing::debug!(
                ?priority,
                "gave up waiting for a free call slot on the connection"
            );
        }
        permit
    }

    /// A slot was freed: hand it to the next live waiter, or give it back.
    fn release(self: &Arc<Self>) {
        let mut s = crate::sync::lock(&self.state);
        while let Some(tx) = s.next_waiter() {
            let permit = Permit {
                admission: Some(self.clone()),
            };
            match tx.send(permit) {
                Ok(()) => return,
                // The waiter went away between the check and the send: defuse
                // the permit (its slot is still counted) and try the next.
                Err(mut permit) => permit.admission = None,
            }
        }
        s.in_flight = s.in_flight.saturating_sub(1);
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        if let Some(admission) = self.admission.take() {
            admission.release();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn now_or_never<F: std::future::Future>(f: F) -> Option<F::Output> {
        futures::FutureExt::now_or_never(f)
    }

    #[tokio::test]
    async fn at_most_cap_calls_are_in_flight_and_the_rest_wait() {
        let a = Admission::new(2);
        let p1 = a.admit(Priority::Normal, None).await;
        let p2 = a.admit(Priority::Normal, None).await;
        assert!(p1.is_some() && p2.is_some());
        let mut third = Box::pin(a.admit(Priority::Normal, None));
        assert!(now_or_never(third.as_mut()).is_none());
        assert_eq!(a.load(), (2, 1));
        drop(p1);
        // The freed slot went straight to the waiter: still two in flight.
        assert_eq!(a.load(), (2, 0));
        let p3 = third.await;
        assert!(p3.is_some());
        drop((p2, p3));
        assert_eq!(a.load(), (0, 0));
    }

    #[tokio::test]
    async fn urgent_calls_leave_the_queue_before_normal_ones() {
        let a = Admission::new(1);
        let busy = a.admit(Priority::Normal, None).await;
        let mut follower = Box::pin(a.admit(Priority::Normal, None));
        assert!(now_or_never(follower.as_mut()).is_none());
        let mut renewal = Box::pin(a.admit(Priority::Urgent, None));
        assert!(now_or_never(renewal.as_mut()).is_none());
        drop(busy);
        // The renewal queued after the follower but goes first.
        let r = now_or_never(renewal.as_mut()).flatten();
        assert!(r.is_some(), "the renewal was admitted first");
        assert!(now_or_never(follower.as_mut()).is_none());
        drop(r);
        assert!(now_or_never(follower.as_mut()).flatten().is_some());
    }

    #[tokio::test]
    async fn an_urgent_call_passes_waiting_normal_ones_when_a_slot_is_free() {
        let a = Admission::new(2);
        let p1 = a.admit(Priority::Normal, None).await;
        let p2 = a.admit(Priority::Normal, None).await;
        let mut waiting = Box::pin(a.admit(Priority::Normal, None));
        assert!(now_or_never(waiting.as_mut()).is_none());
        drop(p1);
        // The slot went to the waiter; an urgent call now waits, first in line.
        let mut urgent = Box::pin(a.admit(Priority::Urgent, None));
        assert!(now_or_never(urgent.as_mut()).is_none());
        drop(p2);
        assert!(now_or_never(urgent.as_mut()).flatten().is_some());
        assert!(now_or_never(waiting.as_mut()).flatten().is_some());
    }

    #[tokio::test]
    async fn within_a_priority_the_queue_is_first_come_first_served() {
        let a = Admission::new(1);
        let busy = a.admit(Priority::Normal, None).await;
        let mut waiters: Vec<_> = (0..5)
            .map(|_| Box::pin(a.admit(Priority::Normal, None)))
            .collect();
        for w in &mut waiters {
            assert!(now_or_never(w.as_mut()).is_none());
        }
        drop(busy);
        for i in 0..5 {
            let p = now_or_never(waiters[i].as_mut()).flatten();
            assert!(p.is_some(), "waiter {i} is admitted in its turn");
            for later in &mut waiters[i + 1..] {
                assert!(now_or_never(later.as_mut()).is_none());
            }
            drop(p);
        }
        assert_eq!(a.load(), (0, 0));
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiter_gives_up_at_its_deadline_without_taking_a_slot() {
        let a = Admission::new(1);
        let busy = a.admit(Priority::Urgent, None).await;
        let start = Instant::now();
        let gave_up = a
            .admit(Priority::Urgent, Some(start + Duration::from_secs(2)))
            .await;
        assert!(gave_up.is_none());
        assert_eq!(Instant::now() - start, Duration::from_secs(2));
        drop(busy);
        // The abandoned waiter is skipped: the slot is free again.
        assert_eq!(a.load(), (0, 0));
        assert!(a.admit(Priority::Normal, None).await.is_some());
    }

    #[tokio::test]
    async fn a_dropped_waiter_passes_its_slot_on() {
        let a = Admission::new(1);
        let busy = a.admit(Priority::Normal, None).await;
        let mut dropped = Box::pin(a.admit(Priority::Normal, None));
        assert!(now_or_never(dropped.as_mut()).is_none());
        let mut next = Box::pin(a.admit(Priority::Normal, None));
        assert!(now_or_never(next.as_mut()).is_none());
        drop(dropped);
        drop(busy);
        assert!(now_or_never(next.as_mut()).flatten().is_some());
    }

    #[test]
    fn a_cap_of_zero_is_read_as_one() {
        assert_eq!(Admission::new(0).cap(), 1);
    }
}
