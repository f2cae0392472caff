//! What a leadership stream says: [`LeadershipEvent`], [`LossReason`] and the
//! [`LeaderTerm`] handed to the leader's work.

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

/// One thing that happened to this client's leadership.
///
/// On every stream, `Elected` and `Lost` strictly alternate, starting with
/// `Elected`: every term that begins is reported as ended exactly once, in order.
///
/// ```
/// use quorum_quest_client::{LeadershipEvent, LossReason};
///
/// fn describe(ev: &LeadershipEvent) -> String {
///     match ev {
///         LeadershipEvent::Elected { term, .. } => format!("leader (term {})", term.id()),
///         LeadershipEvent::Lost { reason: LossReason::Released, .. } => "stepped down".into(),
///         LeadershipEvent::Lost { reason, .. } => format!("lost: {reason}"),
///         LeadershipEvent::Follower => "follower".into(),
///         _ => String::new(),
///     }
/// }
/// assert_eq!(describe(&LeadershipEvent::Follower), "follower");
/// ```
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum LeadershipEvent {
    /// This client became leader. The term ends (its `cancelled()` future
    /// fires) no later than the matching `Lost` is emitted.
    Elected {
        /// The term that starts now.
        term: LeaderTerm,
        /// How long the lease is certainly valid, from now (already less the
        /// safety margin).
        lease_remaining: Duration,
    },
    /// The lease was extended.
    Renewed {
        /// The current term's id.
        term_id: u64,
        /// How long the lease is certainly valid, from now.
        lease_remaining: Duration,
    },
    /// Another node holds the lock. Emitted on entering that state (the first
    /// refused attempt, and the first one after a loss), not on every retry.
    Follower,
    /// This client stopped being leader.
    Lost {
        /// The term that ended (already cancelled).
        term: LeaderTerm,
        /// Why it ended.
        reason: LossReason,
    },
    /// An RPC failed but has not (yet) cost the lease: a warning that trouble
    /// may be coming. The client retries with backoff.
    RpcFailed {
        /// Which call failed.
        rpc: RpcKind,
        /// The gRPC status code.
        code: tonic::Code,
        /// The status message.
        message: String,
        /// Time left on the lease if this client is leader, `None` otherwise.
        lease_remaining: Option<Duration>,
    },
}

impl LeadershipEvent {
    /// `true` for `Elected`.
    #[must_use]
    pub fn is_elected(&self) -> bool {
        matches!(self, LeadershipEvent::Elected { .. })
    }

    /// `true` for `Lost`.
    #[must_use]
    pub fn is_lost(&self) -> bool {
        matches!(self, LeadershipEvent::Lost { .. })
    }
}

/// Why a term ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum LossReason {
    /// No renewal succeeded before the safe deadline (send instant + lease −
    /// safety margin). Reported by a timer, even while an RPC still hangs.
    Expired,
    /// The server said this client is not the owner (a negative or missing
    /// lease, or a refused acquire while leader).
    Rejected,
    /// This client gave the lock up (release, resign, or shutdown).
    Released,
}

impl std::fmt::Display for LossReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            LossReason::Expired => "lease expired before it could be renewed",
            LossReason::Rejected => "server says another node owns the lock",
            LossReason::Released => "released",
        })
    }
}

/// The three calls of the service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum RpcKind {
    /// `TryAcquireLock`.
    TryAcquireLock,
    /// `KeepAlive`.
    KeepAlive,
    /// `ReleaseLock`.
    ReleaseLock,
}

/// One continuous period of leadership.
///
/// Leader-only work should be bound to its term: [`LeaderTerm::cancelled`]
/// fires when the term ends, no later than the moment `Lost` is emitted, and
/// [`LeaderTerm::run`] runs a future only while the term lasts. Cheap to clone.
///
/// ```
/// use quorum_quest_client::LeaderTerm;
///
/// async fn leader_work(term: LeaderTerm) {
///     // Returns None if the term ended before the work finished.
///     let done = term.run(async { /* ... */ 42 }).await;
///     if done.is_none() {
///         // stop touching shared resources: someone else may be leader now
///     }
/// }
/// ```
#[derive(Debug, Clone)]
pub struct LeaderTerm {
    inner: Arc<TermInner>,
}

#[derive(Debug)]
struct TermInner {
    id: u64,
    token: CancellationToken,
    deadline: Mutex<Instant>,
}

impl LeaderTerm {
    pub(crate) fn new(id: u64, deadline: Instant) -> Self {
        LeaderTerm {
            inner: Arc::new(TermInner {
                id,
                token: CancellationToken::new(),
                deadline: Mutex::new(deadline),
            }),
        }
    }

    pub(crate) fn set_deadline(&self, deadline: Instant) {
        *self
            .inner
            .deadline
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = deadline;
    }

    pub(crate) fn end(&self) {
        self.inner.token.cancel();
    }

    /// A number that identifies this term among the terms of one client
    /// (increasing, starting at 1).
    #[must_use]
    pub fn id(&self) -> u64 {
        self.inner.id
    }

    /// The instant after which this client no longer considers the lease valid
    /// (moves forward with every renewal).
    #[must_use]
    pub fn deadline(&self) -> Instant {
        *self
            .inner
            .deadline
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// Time left before the safe deadline, or zero.
    #[must_use]
    pub fn remaining(&self) -> Duration {
        self.deadline().saturating_duration_since(Instant::now())
    }

    /// `true` while the term has not ended and its deadline has not passed.
    /// Checks the clock, so it turns false at the deadline even if nobody
    /// polls the leadership stream.
    #[must_use]
    pub fn is_active(&self) -> bool {
        !self.inner.token.is_cancelled() && Instant::now() < self.deadline()
    }

    /// `true` once the term has ended.
    #[must_use]
    pub fn is_ended(&self) -> bool {
        self.inner.token.is_cancelled()
    }

    /// Completes when the term ends.
    pub fn cancelled(&self) -> WaitForCancellationFutureOwned {
        self.inner.token.clone().cancelled_owned()
    }

    /// A token that is cancelled when the term ends, for APIs that take a
    /// tokio-util `CancellationToken`. It is a child token: cancelling it does
    /// not end the term.
    #[must_use]
    pub fn token(&self) -> CancellationToken {
        self.inner.token.child_token()
    }

    /// Runs `work` while the term lasts: `Some(output)` if it finished first,
    /// `None` if the term ended first (the work is dropped at that point).
    pub async fn run<F: Future>(&self, work: F) -> Option<F::Output> {
        tokio::select! {
            biased;
            _ = self.inner.token.cancelled() => None,
            out = work => Some(out),
        }
    }

    /// Spawns `work` on the current Tokio runtime, bound to this term as
    /// [`LeaderTerm::run`] does.
    ///
    /// # Panics
    ///
    /// Like `tokio::spawn`, when called outside a Tokio runtime.
    pub fn spawn<F>(&self, work: F) -> tokio::task::JoinHandle<Option<F::Output>>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        let term = self.clone();
        tokio::spawn(async move { term.run(work).await })
    }
}

impl PartialEq for LeaderTerm {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }
}

impl Eq for LeaderTerm {}
