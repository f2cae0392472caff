//! What a leadership stream says: [`LeadershipEvent`], [`LossReason`] and the
//! [`LeaderTerm`] handed to the leader's work.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

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
    /// safety margin), or the server granted a lease too short to outlast the
    /// safety margin. Reported by a timer, even while an RPC still hangs.
    Expired,
    /// The server said this client is not the owner (a negative or missing
    /// lease, or a refused acquire while leader).
    Rejected,
    /// This client gave the lock up (release, resign, or shutdown).
    Released,
    /// The client's campaign stopped unexpectedly (an internal failure,
    /// logged at `error`): leadership is given up at once rather than
    /// trusted without renewals. The campaign restarts by itself.
    Failed,
}

impl std::fmt::Display for LossReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            LossReason::Expired => "lease expired before it could be renewed",
            LossReason::Rejected => "server says another node owns the lock",
            LossReason::Released => "released",
            LossReason::Failed => "the campaign stopped unexpectedly",
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
/// completes when the term ends, and [`LeaderTerm::run`] runs a future only
/// while the term lasts. A term ends when the client reports it lost **or**
/// when its safe deadline passes, whichever comes first: the deadline is
/// watched by a timer of the runtime that awaits `cancelled()` (or that called
/// [`run`](LeaderTerm::run), [`spawn`](LeaderTerm::spawn) or
/// [`token`](LeaderTerm::token)), so work bound to a term stops by the
/// deadline even if the task or runtime that campaigns is blocked. Cheap to
/// clone.
///
/// The term does not keep a copy of the deadline: it reads the one the
/// client's election state publishes, so a renewal moves it and a shorter
/// lease from the server shortens it.
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
#[derive(Clone)]
pub struct LeaderTerm {
    inner: Arc<TermInner>,
}

struct TermInner {
    id: u64,
    /// Cancelled by the client when the term is reported lost.
    ended: CancellationToken,
    /// The client's published lease: the one deadline of the current term.
    lease: watch::Receiver<LeaseView>,
    /// A child of `ended` that one watcher task also cancels at the
    /// deadline; [`LeaderTerm::token`] hands out children of it.
    by_deadline: OnceLock<CancellationToken>,
}

/// What the election state publishes after every change: the current term
/// and its safe deadline, if leader. Terms, `is_leader()` and
/// `get_remaining_lease()` read it; nothing else holds a deadline.
#[derive(Debug, Clone, Default)]
pub(crate) struct LeaseView {
    pub(crate) current: Option<CurrentTerm>,
}

/// The running term in a [`LeaseView`].
#[derive(Debug, Clone)]
pub(crate) struct CurrentTerm {
    pub(crate) id: u64,
    pub(crate) deadline: Instant,
    /// The term's `ended` token, cancelled when the view moves past it.
    pub(crate) ended: CancellationToken,
}

impl LeaseView {
    /// Publishes `self` on `tx` if it differs from what is there (a new term
    /// or a moved deadline), and ends the term that left the view.
    pub(crate) fn publish(self, tx: &watch::Sender<LeaseView>) {
        let key = |v: &LeaseView| v.current.as_ref().map(|c| (c.id, c.deadline));
        if key(&self) == key(&tx.borrow()) {
            return;
        }
        let new_id = self.current.as_ref().map(|c| c.id);
        let old = tx.send_replace(self);
        if let Some(old) = old.current {
            if new_id != Some(old.id) {
                old.ended.cancel();
            }
        }
    }

    /// The deadline of term `id` if it is the current one.
    fn deadline_of(&self, id: u64) -> Option<Instant> {
        self.current
            .as_ref()
            .filter(|c| c.id == id)
            .map(|c| c.deadline)
    }
}

impl LeaderTerm {
    pub(crate) fn new(
        id: u64,
        ended: CancellationToken,
        lease: watch::Receiver<LeaseView>,
    ) -> Self {
        LeaderTerm {
            inner: Arc::new(TermInner {
                id,
                ended,
                lease,
                by_deadline: OnceLock::new(),
            }),
        }
    }

    /// The token the client cancels when it reports this term lost.
    pub(crate) fn ended_token(&self) -> CancellationToken {
        self.inner.ended.clone()
    }

    /// A number that identifies this term among the terms of one client
    /// (increasing, starting at 1).
    #[must_use]
    pub fn id(&self) -> u64 {
        self.inner.id
    }

    /// The instant after which this client no longer considers the lease
    /// valid (moved by every renewal), or `None` once the term has ended.
    #[must_use]
    pub fn deadline(&self) -> Option<Instant> {
        if self.inner.ended.is_cancelled() {
            return None;
        }
        self.inner.lease.borrow().deadline_of(self.inner.id)
    }

    /// Time left before the safe deadline, or zero once the term has ended.
    #[must_use]
    pub fn remaining(&self) -> Duration {
        self.deadline().map_or(Duration::ZERO, |d| {
            d.saturating_duration_since(Instant::now())
        })
    }

    /// `true` while the term has not ended and its deadline has not passed.
    /// Checks the clock, so it turns false at the deadline even if nobody
    /// polls the leadership stream and the campaign cannot run.
    #[must_use]
    pub fn is_active(&self) -> bool {
        self.deadline().is_some_and(|d| Instant::now() < d)
    }

    /// `true` once the term has ended: reported lost, or past its deadline.
    #[must_use]
    pub fn is_ended(&self) -> bool {
        !self.is_active()
    }

    /// Completes when the term ends: when it is reported lost, or at its
    /// deadline by this future's own timer (whichever comes first), even if
    /// the campaign is blocked.
    pub fn cancelled(&self) -> TermEnded {
        let inner = self.inner.clone();
        TermEnded {
            fut: Box::pin(async move { inner.ended().await }),
        }
    }

    /// A token that is cancelled when the term ends, for APIs that take a
    /// tokio-util [`CancellationToken`]. Cancelling it does not end the term.
    ///
    /// The deadline is watched by one small task per term, spawned on the
    /// runtime of the first call made inside a Tokio runtime; until such a
    /// call, the tokens are cancelled only when the client reports the term
    /// lost. Dropped tokens cost nothing.
    #[must_use]
    pub fn token(&self) -> CancellationToken {
        if let Some(by_deadline) = self.inner.by_deadline.get() {
            return by_deadline.child_token();
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return self.inner.ended.child_token();
        };
        let by_deadline = self.inner.by_deadline.get_or_init(|| {
            let token = self.inner.ended.child_token();
            let inner = self.inner.clone();
            let watched = token.clone();
            runtime.spawn(async move {
                inner.ended().await;
                watched.cancel();
            });
            token
        });
        by_deadline.child_token()
    }

    /// Runs `work` while the term lasts: `Some(output)` if it finished first,
    /// `None` if the term ended first (the work is dropped at that point).
    pub async fn run<F: Future>(&self, work: F) -> Option<F::Output> {
        tokio::select! {
            biased;
            () = self.inner.ended() => None,
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

impl TermInner {
    /// Completes when the term is reported lost, leaves the published view,
    /// or its deadline passes on this task's clock.
    async fn ended(&self) {
        let mut lease = self.lease.clone();
        loop {
            if self.ended.is_cancelled() {
                return;
            }
            let Some(deadline) = lease.borrow_and_update().deadline_of(self.id) else {
                return;
            };
            if Instant::now() >= deadline {
                return;
            }
            tokio::select! {
                () = self.ended.cancelled() => return,
                changed = lease.changed() => {
                    if changed.is_err() {
                        // The client is gone: nobody renews this term.
                        return;
                    }
                }
                () = tokio::time::sleep_until(deadline) => {}
            }
        }
    }
}

/// The future returned by [`LeaderTerm::cancelled`]: completes when the term
/// ends (reported lost, or its deadline passed).
#[must_use = "futures do nothing unless awaited"]
pub struct TermEnded {
    fut: Pin<Box<dyn Future<Output = ()> + Send>>,
}

impl Future for TermEnded {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        self.fut.as_mut().poll(cx)
    }
}

impl std::fmt::Debug for TermEnded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TermEnded").finish_non_exhaustive()
    }
}

impl std::fmt::Debug for LeaderTerm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeaderTerm")
            .field("id", &self.id())
            .field("active", &self.is_active())
            .field("remaining", &self.remaining())
            .finish()
    }
}

impl PartialEq for LeaderTerm {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }
}

impl Eq for LeaderTerm {}
