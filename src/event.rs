//! What a leadership stream says: [`LeadershipEvent`], [`LossReason`] and the
//! [`LeaderTerm`] handed to the leader's work.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::sync::lock;

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
    /// The client's published lease: the one deadline of the current term.
    /// The term has ended (been reported lost) once it is no longer there.
    lease: Arc<LeaseCell>,
    /// Made on the first [`LeaderTerm::token`] call (most terms never need
    /// one): cancelled when the term leaves the published lease, and at the
    /// deadline by one watcher task; `token()` hands out children of it.
    token: OnceLock<CancellationToken>,
    /// Whether the deadline watcher of `token` was started.
    watched: AtomicBool,
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
    /// The term, so that its token (if one was made) is cancelled when the
    /// view moves past it.
    term: Weak<TermInner>,
}

impl LeaseView {
    /// The deadline of term `id` if it is the current one.
    fn deadline_of(&self, id: u64) -> Option<Instant> {
        self.current
            .as_ref()
            .filter(|c| c.id == id)
            .map(|c| c.deadline)
    }

    /// The current term's id and deadline: what a publish compares.
    fn key(&self) -> Option<(u64, Instant)> {
        self.current.as_ref().map(|c| (c.id, c.deadline))
    }
}

/// The one published [`LeaseView`] of a client, shared (as
/// `Arc<LeaseCell>`) by its session, its election state and its terms.
///
/// A std mutex around the view (never held across an `.await`) and one
/// [`Notify`] for the tasks waiting on it, woken only when a deadline can
/// have come closer: the term changed or ended, or its deadline moved
/// earlier. A later deadline wakes nobody: a waiter sleeping to the old
/// deadline re-reads the cell when it wakes up.
#[derive(Debug, Default)]
pub(crate) struct LeaseCell {
    state: Mutex<CellState>,
    moved: Notify,
}

#[derive(Debug, Default)]
struct CellState {
    view: LeaseView,
}

impl LeaseCell {
    /// Publishes `view` if it differs from what is there (a new term or a
    /// moved deadline), and ends the term that left the view. Returns
    /// whether the published deadline moved.
    #[cfg(test)]
    pub(crate) fn publish(&self, view: LeaseView) -> bool {
        let (moved, wake) = self.hold().publish_then_wake(view);
        // Both wake other tasks.
        drop(wake);
        moved
    }

    /// Holds the cell: readers of the lease wait until the returned guard
    /// publishes. An observation is applied while it is held (the instant it
    /// is judged at included), so that no reader sees a deadline pass that
    /// the observation then extends: a term never looks ended, then goes on.
    pub(crate) fn hold(&self) -> LeaseHold<'_> {
        LeaseHold {
            cell: self,
            state: lock(&self.state),
        }
    }
}

/// The [`LeaseCell`] held for a publish (see [`LeaseCell::hold`]).
pub(crate) struct LeaseHold<'a> {
    cell: &'a LeaseCell,
    state: std::sync::MutexGuard<'a, CellState>,
}

impl<'a> LeaseHold<'a> {
    /// Publishes `view` if it differs from what is there (a new term or a
    /// moved deadline), and ends the term that left the view; returns
    /// whether the published deadline moved. Leaves its wake-ups (the end of
    /// the term that left the view, the lease's waiters) to the caller, to run once
    /// it holds no lock of its own: a waker may run the woken task at once,
    /// on this thread, and that task may read the client. The cell is
    /// released before it returns.
    pub(crate) fn publish_then_wake(self, view: LeaseView) -> (bool, LeaseWake<'a>) {
        let LeaseHold { cell, state } = self;
        let (left, wake, moved, closer) = {
            let mut state = state;
            let (old_key, new_key) = (state.view.key(), view.key());
            if old_key == new_key {
                return (
                    false,
                    LeaseWake {
                        cell,
                        left: None,
                        wake: false,
                        closer: false,
                    },
                );
            }
            let moved = old_key.map(|(_, d)| d) != new_key.map(|(_, d)| d);
            // A later deadline of the same term wakes nobody.
            let wake = match (old_key, new_key) {
                (Some((old_id, old_deadline)), Some((new_id, new_deadline))) => {
                    old_id != new_id || new_deadline < old_deadline
                }
                _ => true,
            };
            // The same term, ending sooner: no transition tells of it.
            let closer = matches!(
                (old_key, new_key),
                (Some((old_id, old_deadline)), Some((new_id, new_deadline)))
                    if old_id == new_id && new_deadline < old_deadline
            );
            let new_id = new_key.map(|(id, _)| id);
            let old = std::mem::replace(&mut state.view, view);
            let left = old.current.filter(|c| Some(c.id) != new_id);
            (left, wake, moved, closer)
        };
        (
            moved,
            LeaseWake {
                cell,
                left,
                wake,
                closer,
            },
        )
    }
}

impl LeaseCell {
    /// The current term's deadline, if leader (it may have passed).
    pub(crate) fn deadline(&self) -> Option<Instant> {
        lock(&self.state).view.key().map(|(_, deadline)| deadline)
    }

    /// The deadline of term `id` if it is the current one.
    fn deadline_of(&self, id: u64) -> Option<Instant> {
        lock(&self.state).view.deadline_of(id)
    }

    /// The client is gone: its term ends now (nobody renews it), and every
    /// waiter wakes up.
    fn close(&self) {
        let old = {
            let mut state = lock(&self.state);
            std::mem::take(&mut state.view)
        };
        // The wake-ups of a publish, with the same care for a panicking one.
        drop(LeaseWake {
            cell: self,
            left: old.current,
            wake: true,
            closer: false,
        });
    }
}

/// The wake-ups a publish owes (see [`LeaseHold::publish_then_wake`]):
/// they run when it is dropped.
#[must_use = "the waiters wake when it is dropped"]
pub(crate) struct LeaseWake<'a> {
    cell: &'a LeaseCell,
    /// The term that left the view: its token is cancelled.
    left: Option<CurrentTerm>,
    /// Whether the lease's waiters wake (a deadline may have come closer).
    wake: bool,
    /// The running term's deadline came closer (a renewal answered a
    /// shorter lease): see [`came_closer`](Self::came_closer).
    closer: bool,
}

impl LeaseWake<'_> {
    /// Whether the running term's deadline came closer: no transition tells
    /// of it, and a consumer that leaves `Renewed` out must still be woken
    /// to re-arm its backstop of the step-down timer.
    pub(crate) fn came_closer(&self) -> bool {
        self.closer
    }
}

impl Drop for LeaseWake<'_> {
    fn drop(&mut self) {
        // Cancelling the token runs its waiters' wakers (the application's
        // executor): one that panics must not keep the lease's waiters (the
        // term's `cancelled()`) asleep until the old deadline.
        let ended = self
            .left
            .take()
            .map(|left| std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| left.end())));
        if self.wake {
            self.cell.moved.notify_waiters();
        }
        crate::sync::resume_panic(ended.and_then(Result::err));
    }
}

/// The session's handle on its [`LeaseCell`]: the one publisher. Dropping
/// it (the client is gone) ends the published term and wakes every waiter,
/// as dropping a channel's sender would.
#[derive(Debug, Default)]
pub(crate) struct LeaseOwner {
    cell: Arc<LeaseCell>,
}

impl LeaseOwner {
    /// The shared cell, for the election state and readers.
    pub(crate) fn cell(&self) -> Arc<LeaseCell> {
        self.cell.clone()
    }
}

impl std::ops::Deref for LeaseOwner {
    type Target = LeaseCell;

    fn deref(&self) -> &LeaseCell {
        &self.cell
    }
}

impl Drop for LeaseOwner {
    fn drop(&mut self) {
        self.cell.close();
    }
}

impl CurrentTerm {
    /// The view moved past this term: its token, if any, is cancelled.
    fn end(&self) {
        if let Some(token) = self.term.upgrade().and_then(|t| t.token.get().cloned()) {
            token.cancel();
        }
    }
}

impl LeaderTerm {
    pub(crate) fn new(id: u64, lease: Arc<LeaseCell>) -> Self {
        LeaderTerm {
            inner: Arc::new(TermInner {
                id,
                lease,
                token: OnceLock::new(),
                watched: AtomicBool::new(false),
            }),
        }
    }

    /// This term in the published lease, until `deadline`.
    pub(crate) fn published(&self, deadline: Instant) -> CurrentTerm {
        CurrentTerm {
            id: self.inner.id,
            deadline,
            term: Arc::downgrade(&self.inner),
        }
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
        self.inner.lease.deadline_of(self.inner.id)
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
        let inner = &self.inner;
        let token = inner.token.get_or_init(CancellationToken::new);
        // Made after the term left the published lease: cancelled here, as
        // the publish that ended the term found no token to cancel.
        if inner.lease.deadline_of(inner.id).is_none() {
            token.cancel();
        }
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            if !inner.watched.swap(true, Ordering::SeqCst) {
                let watcher = inner.clone();
                let watched = token.clone();
                runtime.spawn(async move {
                    watcher.ended().await;
                    watched.cancel();
                });
            }
        }
        token.child_token()
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
    /// Completes when the term is reported lost, leaves the published view
    /// (the client gone included), or its deadline passes on this task's
    /// clock. The deadline is re-read at every wake-up: a renewal moves it
    /// later without waking anyone, an earlier one wakes this future.
    async fn ended(&self) {
        // Ended once it left the published lease, or at its deadline.
        loop {
            // Created before reading: a wake-up after the read is not lost.
            let moved = self.lease.moved.notified();
            let Some(deadline) = self.lease.deadline_of(self.id) else {
                return;
            };
            if Instant::now() >= deadline {
                return;
            }
            tokio::select! {
                () = moved => {}
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

#[cfg(test)]
mod tests {
    use super::*;

    fn view(term: &LeaderTerm, deadline: Instant) -> LeaseView {
        LeaseView {
            current: Some(term.published(deadline)),
        }
    }

    /// A term of `cell` whose deadline is `deadline`, and a task that
    /// returns the instant its `cancelled()` completed.
    fn waiting_term(
        cell: &Arc<LeaseCell>,
        deadline: Instant,
    ) -> (LeaderTerm, tokio::task::JoinHandle<Instant>) {
        let term = LeaderTerm::new(1, cell.clone());
        cell.publish(view(&term, deadline));
        let waiter = term.clone();
        let done = tokio::spawn(async move {
            waiter.cancelled().await;
            Instant::now()
        });
        (term, done)
    }

    const SEC: Duration = Duration::from_secs(1);

    /// The client is gone (its `LeaseOwner` drops): its term ends at once.
    /// A task waiting on the term's token whose waker panics (an executor's
    /// bug) must not keep the term's `cancelled()` asleep until its deadline.
    #[tokio::test(start_paused = true)]
    async fn a_panicking_token_waiter_does_not_keep_cancelled_asleep_when_the_client_goes() {
        struct PanicsOnWake;
        impl futures::task::ArcWake for PanicsOnWake {
            fn wake_by_ref(_: &Arc<Self>) {
                panic!("an executor's bug");
            }
        }
        let t0 = Instant::now();
        let owner = LeaseOwner::default();
        let (term, done) = waiting_term(&owner.cell(), t0 + SEC * 10);
        let token = term.token();
        let mut token_ended = Box::pin(token.cancelled());
        let waker = futures::task::waker(Arc::new(PanicsOnWake));
        assert!(token_ended
            .as_mut()
            .poll(&mut std::task::Context::from_waker(&waker))
            .is_pending());
        // The waiter now sleeps towards the deadline.
        tokio::time::sleep(SEC).await;
        let dropped = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| drop(owner)));
        assert!(dropped.is_err(), "the wake-up's panic is not hidden");
        let ended_at = done.await.expect("the waiter completes");
        assert_eq!(ended_at, t0 + SEC, "cancelled() waited for the deadline");
    }

    #[tokio::test(start_paused = true)]
    async fn an_earlier_deadline_ends_a_waiting_term_by_the_new_deadline() {
        let t0 = Instant::now();
        let cell = Arc::new(LeaseCell::default());
        let (term, done) = waiting_term(&cell, t0 + SEC * 10);
        let token = term.token();
        // The waiter now sleeps towards the old deadline.
        tokio::time::sleep(SEC).await;
        cell.publish(view(&term, t0 + SEC * 2));
        assert_eq!(term.deadline(), Some(t0 + SEC * 2));
        let ended_at = done.await.unwrap();
        assert!(ended_at >= t0 + SEC * 2, "{:?}", ended_at - t0);
        assert!(ended_at < t0 + SEC * 3, "{:?}", ended_at - t0);
        assert!(!term.is_active());
        token.cancelled().await;
        assert!(Instant::now() < t0 + SEC * 3);
    }

    #[tokio::test(start_paused = true)]
    async fn a_later_deadline_keeps_a_waiting_term_until_then() {
        let t0 = Instant::now();
        let cell = Arc::new(LeaseCell::default());
        let (term, done) = waiting_term(&cell, t0 + SEC * 2);
        tokio::time::sleep(SEC).await;
        // A renewal: nobody is woken, the waiter re-reads at the old deadline.
        cell.publish(view(&term, t0 + SEC * 5));
        tokio::time::sleep(SEC * 2).await;
        assert!(term.is_active());
        assert!(!done.is_finished());
        let ended_at = done.await.unwrap();
        assert!(ended_at >= t0 + SEC * 5, "{:?}", ended_at - t0);
        assert!(ended_at < t0 + SEC * 6, "{:?}", ended_at - t0);
        // Ended by its deadline only: the client did not report it lost.
        assert_eq!(cell.deadline(), Some(t0 + SEC * 5));
    }

    #[tokio::test(start_paused = true)]
    async fn a_term_of_a_dropped_client_ends_by_its_deadline() {
        let t0 = Instant::now();
        let owner = LeaseOwner::default();
        let cell = owner.cell();
        let (term, done) = waiting_term(&cell, t0 + SEC * 10);
        let token = term.token();
        tokio::time::sleep(SEC).await;
        assert_eq!(cell.deadline(), Some(t0 + SEC * 10));
        drop(owner);
        let ended_at = done.await.unwrap();
        assert!(ended_at <= t0 + SEC * 10, "{:?}", ended_at - t0);
        // Nobody keeps its deadline any more: it reports none.
        assert_eq!(term.deadline(), None);
        assert!(!term.is_active());
        token.cancelled().await;
        assert!(Instant::now() <= t0 + SEC * 10);
    }

    #[tokio::test(start_paused = true)]
    async fn publish_ends_the_term_that_leaves_the_view_and_nothing_else() {
        let t0 = Instant::now();
        let cell = Arc::new(LeaseCell::default());
        // Whether a publish wakes the cell's waiters, and whether it reports
        // the deadline moved.
        let wakes = |publish: &dyn Fn() -> bool| {
            let notified = cell.moved.notified();
            futures::pin_mut!(notified);
            notified.as_mut().enable();
            let moved = publish();
            (futures::FutureExt::now_or_never(notified).is_some(), moved)
        };
        let term1 = LeaderTerm::new(1, cell.clone());
        assert_eq!(
            wakes(&|| cell.publish(view(&term1, t0 + SEC * 5))),
            (true, true)
        );
        let first = term1.token();
        // Renewed later: same term, no wake-up.
        assert_eq!(
            wakes(&|| cell.publish(view(&term1, t0 + SEC * 8))),
            (false, true),
            "a later deadline wakes nobody"
        );
        assert!(!first.is_cancelled());
        assert_eq!(cell.deadline(), Some(t0 + SEC * 8));
        // The same (id, deadline) again: nothing happens.
        assert_eq!(
            wakes(&|| cell.publish(view(&term1, t0 + SEC * 8))),
            (false, false)
        );
        assert!(!first.is_cancelled());
        // Shortened: a wake-up, the term goes on.
        assert_eq!(
            wakes(&|| cell.publish(view(&term1, t0 + SEC * 6))),
            (true, true)
        );
        assert!(!first.is_cancelled());
        // The next term replaces it: the first one ends, at once.
        let term2 = LeaderTerm::new(2, cell.clone());
        assert_eq!(
            wakes(&|| cell.publish(view(&term2, t0 + SEC * 9))),
            (true, true)
        );
        assert!(first.is_cancelled());
        assert!(term1.is_ended());
        assert!(
            term1.token().is_cancelled(),
            "a token made after the term ended is cancelled"
        );
        let second = term2.token();
        assert_eq!(wakes(&|| cell.publish(LeaseView::default())), (true, true));
        assert!(second.is_cancelled());
        assert_eq!(cell.deadline(), None);
    }

    /// Issue 12's budget: 100,000 elections in one process. The cell is the
    /// one allocation a client's lease costs (a tokio watch channel of the
    /// same view took 368 bytes).
    #[test]
    fn the_lease_cell_stays_small() {
        // The Arc's allocation: two counters and the cell.
        let heap = std::mem::size_of::<usize>() * 2 + std::mem::size_of::<LeaseCell>();
        assert!(heap <= 150, "LeaseCell takes {heap} B on the heap");
    }
}
