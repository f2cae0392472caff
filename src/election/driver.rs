//! The driver: one task per connection (and per runtime using it: a
//! campaign runs on the runtime that started it) that runs the campaign of
//! every election on it and keeps their step-down timers, with one timer
//! queue.
//!
//! An election costs the driver one timer entry (the earlier of its next
//! campaign step and its deadline) and a small [`Slot`] inside its session;
//! while a call of its is in flight, that call's future. No task, no timer
//! and no map entry of its own: a process with 100,000 elections on one
//! connection runs one driver, not 200,000 tasks.
//!
//! The calls the campaign asks for are futures the driver polls; each
//! applies its answer to the election state as it arrives (so a late answer
//! is fenced by the state machine, as every answer is) and then hands the
//! outcome to the campaign's [`Plan`]. Stopping a campaign aborts its call,
//! and the stop is acknowledged once that call is dropped: once a stop
//! returns, the campaign can no longer touch the state.
//!
//! The step-down timer fires at the published deadline (read from the state
//! each time it is armed, never kept as a copy beyond the timer) and applies
//! a tick, so `Lost { Expired }` reaches every consumer even when no call
//! returns and nothing campaigns. A lease changed from outside the driver (an
//! imperative call, a release) pokes the driver, which re-arms the timer and
//! wakes a campaign waiting to renew. That is the campaign's driver, or, while
//! no campaign runs, the one on the callbacks' runtime (else the caller's).
//! A driver whose runtime shuts down hands the timers it kept to a live
//! driver of the connection ([`TimerRef`]): the loss at the deadline still
//! reaches the consumers on other runtimes.
//!
//! The events of what the driver observes (answers, ticks) are handed to
//! the session's subscribers by the driver itself, right after they are
//! applied ([`super::Applied`]).
//!
//! Follower attempts are admitted in order, at most twice the connection's
//! cap on calls in flight at once ([`Driver::queued`]); renewals and
//! releases never wait there.
//!
//! Buffers: the command channel holds at most one poke per election (a
//! poke is sent only when none is pending to that driver) and the starts
//! and stops the application makes; the driver drains it in batches, so it
//! grows only while the driver's runtime does not run it.

use std::cell::Cell;
use std::collections::VecDeque;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, MutexGuard, Weak};
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;

use futures::future::{AbortHandle, AbortRegistration, Abortable, Aborted};
use futures::stream::FuturesUnordered;
use futures::task::AtomicWaker;
use futures::{FutureExt, StreamExt};
use std::future::Future;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::time::{delay_queue, DelayQueue};
use tracing::Instrument;

use super::campaign::{Action, Call, Plan};
use super::Session;
use crate::admission::Wait;
use crate::state::Observation;

/// The pause before a campaign that failed unexpectedly (a panic) restarts.
const RESTART_PAUSE: Duration = Duration::from_secs(1);

/// The furthest a timer is armed ahead (`DelayQueue` panics beyond about
/// two years).
const TIMER_HORIZON: Duration = Duration::from_secs(365 * 24 * 3600);

/// The driver's queue of follower attempts is compacted once it holds at
/// least this many entries and twice as many as after the last compaction.
const COMPACT_MIN: usize = 1024;

/// How many spare call cells ([`Driver::spare`]) the driver keeps for
/// reuse: enough for the calls a steady state has in flight at once, few
/// enough that a burst (a cold start, renewals in lockstep) does not leave
/// memory behind (a cell is a few kilobytes).
const SPARE_CELLS: usize = 64;

/// How many commands the driver takes in one go before it looks at its
/// timers and calls again (so a flood of starts cannot delay a step-down).
const BATCH: usize = 256;

/// How many expired timers the driver takes out of its queue, and orders
/// by deadline, in one go: four slots' renewals at 100,000 elections
/// renewing every 20 s (about 250 each), with a bound on the driver's
/// uninterrupted work after a stall (a few milliseconds: after a full
/// batch the driver yields to its runtime, since taking timers out of the
/// queue spends none of the task's cooperative budget, see the run loop).
const EXPIRED_BATCH: usize = 1024;

static NEXT_DRIVER: AtomicU64 = AtomicU64::new(1);

thread_local! {
    /// The driver whose task this thread is polling right now (0: none).
    static CURRENT: Cell<u64> = const { Cell::new(0) };
}

/// A way to reach a connection's driver.
#[derive(Debug, Clone)]
pub(crate) struct Handle {
    id: u64,
    tx: mpsc::UnboundedSender<Command>,
    /// The runtime its task runs on.
    runtime: tokio::runtime::Id,
}

impl Handle {
    /// Spawns a driver on `runtime` that lets at most `acquires` follower
    /// attempts be in flight at once.
    pub(crate) fn spawn(runtime: &tokio::runtime::Handle, acquires: usize) -> Handle {
        let (tx, rx) = mpsc::unbounded_channel();
        let id = NEXT_DRIVER.fetch_add(1, Ordering::Relaxed);
        let driver = Driver {
            id,
            me: tx.downgrade(),
            rx,
            make: call_future,
            calls: FuturesUnordered::new(),
            spare: Vec::new(),
            timers: DelayQueue::new(),
            expired: Vec::new(),
            acquires: acquires.max(1),
            acquiring: 0,
            queued: VecDeque::new(),
            compact_at: COMPACT_MIN,
            sources: Arc::default(),
        };
        runtime.spawn(OnDriver {
            id,
            inner: Box::pin(driver.run()),
        });
        Handle {
            id,
            tx,
            runtime: runtime.id(),
        }
    }

    /// This driver's id (never 0).
    pub(crate) fn id(&self) -> u64 {
        self.id
    }

    /// `false` once the driver's task is gone (its runtime shut down).
    pub(crate) fn is_alive(&self) -> bool {
        !self.tx.is_closed()
    }

    /// The runtime this driver's task runs on.
    pub(crate) fn runtime(&self) -> tokio::runtime::Id {
        self.runtime
    }

    /// `true` when called from this driver's own task.
    pub(crate) fn is_current(&self) -> bool {
        CURRENT.with(|c| c.get() == self.id)
    }

    /// Starts `session`'s campaign, the one of its current generation
    /// (called under the control lock, as the generation moves on only
    /// there): a start read after a later stop is stale and ignored.
    pub(crate) fn start(&self, session: Arc<Session>) -> bool {
        let generation = session.campaign_generation();
        self.tx
            .send(Command::Start {
                session,
                generation,
            })
            .is_ok()
    }

    /// Stops `session`'s campaign: the returned receiver completes once the
    /// driver has let go of it and dropped its call in flight, if any.
    pub(crate) fn stop(&self, session: Weak<Session>) -> Option<oneshot::Receiver<()>> {
        let (ack, rx) = oneshot::channel();
        self.tx.send(Command::Stop { session, ack }).ok()?;
        Some(rx)
    }

    /// The lease of `session` changed outside the driver. `false` if the
    /// driver is gone (the report was not sent).
    pub(crate) fn poke(&self, session: Weak<Session>) -> bool {
        self.tx.send(Command::Poke(session)).is_ok()
    }
}

enum Command {
    /// Start the campaign of `generation` (see [`Session::take_campaign`]).
    Start {
        session: Arc<Session>,
        generation: u64,
    },
    Stop {
        session: Weak<Session>,
        ack: oneshot::Sender<()>,
    },
    Poke(Weak<Session>),
}

/// What a campaign call ends with.
enum Outcome {
    Acquired(crate::rpc::Answer<bool>),
    Renewed(crate::rpc::Answer<crate::rpc::LeaseAnswer>, Instant),
    Settled(crate::backoff::Class),
    /// The campaign was stopped before the call went out.
    Stopped,
    Panicked(String),
}

/// What a campaign call in flight ends with: its session, its `seq`,
/// whether it is a follower attempt (counted in [`Driver::acquiring`] until
/// the future ends, however it ends), and its outcome (or `Aborted` if its
/// campaign stopped).
type CallEnd = (Arc<Session>, u64, bool, Result<Outcome, Aborted>);

/// A campaign call in flight, as the driver polls it (not boxed: it lives
/// in a [`CallCell`] the driver reuses).
fn call_future(
    session: Arc<Session>,
    seq: u64,
    call: Call,
    generation: u64,
    registration: AbortRegistration,
) -> impl Future<Output = CallEnd> + Send + 'static {
    let span = session.observer.span().clone();
    let owner = session.clone();
    let acquire = matches!(call, Call::Acquire);
    let work = async move {
        let outcome = AssertUnwindSafe(make_call(&session, call, generation))
            .catch_unwind()
            .await
            .unwrap_or_else(|panic| Outcome::Panicked(describe(panic.as_ref())));
        (session, outcome)
    }
    .instrument(span);
    Abortable::new(work, registration).map(move |ended| match ended {
        Ok((session, outcome)) => (session, seq, acquire, Ok(outcome)),
        Err(aborted) => (owner, seq, acquire, Err(aborted)),
    })
}

/// What a timer entry holds: its session, weakly. The driver never keeps a
/// session alive: its handles do (a campaign runs only while a stream, the
/// keep-alive or a stop in progress holds one), and a session dropped with
/// a timer armed is let go when it fires.
///
/// An entry dropped unfired (the timer queue is dropped: the driver's task
/// is gone, its runtime shut down) hands its session's step-down timer to a
/// live driver ([`Session::timer_lost`]), so that the loss at the deadline
/// still reaches the consumers on other runtimes. An entry the driver takes
/// out itself (fired, or re-armed) is defused with [`TimerRef::take`].
#[derive(Debug)]
struct TimerRef(Weak<Session>);

impl TimerRef {
    /// The session, without the hand-over on drop.
    fn take(mut self) -> Weak<Session> {
        std::mem::take(&mut self.0)
    }
}

impl Drop for TimerRef {
    fn drop(&mut self) {
        if let Some(session) = self.0.upgrade() {
            session.timer_lost();
        }
    }
}

/// The driver's part of one election, kept in its session (drivers change
/// it; a consumer's backstop only reads which driver keeps it).
#[derive(Debug, Default)]
pub(crate) struct Slot {
    /// The armed timer: when, and its entry. Its instant is derived each
    /// time from the published deadline (read, never copied) and the
    /// campaign's wake-up.
    timer: Option<(Instant, delay_queue::Key)>,
    campaign: Option<Running>,
    /// Stops waiting for the aborted call of their `seq` to be dropped
    /// (usually none; more than one only if a campaign is stopped, started
    /// and stopped again before its first call is dropped).
    stopping: Vec<(u64, oneshot::Sender<()>)>,
    /// The driver (its id; 0: none yet) whose timer and campaign this slot
    /// records. A driver whose runtime shut down leaves its records here;
    /// the driver that takes the session over next starts afresh
    /// ([`Driver::take_over`]), and the old one's leftovers are ignored.
    driver: u64,
    /// That driver's command queue, to tell whether it is alive (a weak
    /// reference: a slot does not keep a driver running).
    owner: Option<mpsc::WeakUnboundedSender<Command>>,
    /// Where the next campaign's `seq` starts: after every `seq` of the
    /// earlier ones, so that nothing of a stopped campaign (a call's end, a
    /// queue entry) is taken for the next one's.
    next_seq: u64,
}

/// A running campaign.
#[derive(Debug)]
struct Running {
    plan: Plan,
    /// Counts the campaign's waits and calls, so that the end of an earlier
    /// one is told apart.
    seq: u64,
    /// The session's campaign generation it was started in: its calls are
    /// made under it, so that none is sent once it was stopped, even if
    /// this driver (its runtime not run) launches one before it reads the
    /// stop.
    generation: u64,
    mode: Mode,
}

#[derive(Debug)]
enum Mode {
    /// About to decide its next step.
    Ready,
    /// Waiting until `at`. `renew_wait`: for a renewal to come due (a lease
    /// change made elsewhere wakes it early).
    Sleep { at: Instant, renew_wait: bool },
    /// A call of it is in flight.
    Call { abort: AbortHandle },
    /// Its follower attempt waits for its turn ([`Driver::queued`]).
    Queued,
}

impl Session {
    fn slot(&self) -> MutexGuard<'_, Slot> {
        crate::sync::lock(&self.slot)
    }

    /// The id of the driver that keeps this session's slot (its step-down
    /// timer and campaign; 0: none yet).
    pub(super) fn slot_driver(&self) -> u64 {
        self.slot().driver
    }
}

struct Driver<F> {
    /// This driver's id (see [`Handle::id`]).
    id: u64,
    /// This driver's own command queue (weak: it must not keep itself
    /// running), recorded in the slots it keeps.
    me: mpsc::WeakUnboundedSender<Command>,
    rx: mpsc::UnboundedReceiver<Command>,
    /// Makes a call's future ([`call_future`]; a parameter only so that its
    /// type, which has no name, can be the queue's).
    make: fn(Arc<Session>, u64, Call, u64, AbortRegistration) -> F,
    /// The campaigns' calls in flight, each in a cell of its own.
    calls: FuturesUnordered<InCell<F>>,
    /// Cells of calls that ended, for the next calls (at most
    /// [`SPARE_CELLS`]): a call's future is a few kilobytes, and
    /// allocating (and freeing) that much for every renewal costs more
    /// than the rest of the driver's work on it.
    spare: Vec<CallCell<F>>,
    timers: DelayQueue<TimerRef>,
    /// Timers taken out of the queue as expired and not handled yet (at
    /// most [`EXPIRED_BATCH`]; empty between two turns of the loop), each
    /// with its election's lease deadline once read ([`Driver::fire_expired`]).
    expired: Vec<(Option<Instant>, Weak<Session>)>,
    /// At most this many follower attempts are in flight at once (twice
    /// the connection's cap on calls, so that the connection stays busy).
    acquires: usize,
    /// Follower attempt futures not yet ended (answered, or dropped after
    /// an abort): counted down only when the future ends, so that an attempt
    /// whose campaign stopped, failed or moved to another driver meanwhile
    /// still gives its turn back.
    acquiring: usize,
    /// Follower attempts waiting for their turn, first come first served,
    /// by session and `seq`. A cold start of 100,000 elections thus holds
    /// 100,000 references here, not 100,000 calls waiting for a slot on
    /// the connection (each a call's state). Entries of campaigns that
    /// stopped or moved on stay until their turn, or until the queue has
    /// doubled since it was last compacted ([`Driver::compact`]).
    queued: VecDeque<(Weak<Session>, u64)>,
    /// The queue's length that triggers the next compaction.
    compact_at: usize,
    /// The waker the command queue, the timers and the calls are polled
    /// with (see [`Sources`]).
    sources: Arc<Sources>,
}

/// The waker the driver polls its sources with (its command queue, its
/// timers, its calls). While the driver's task runs, a wake-up from a
/// source only marks that one may have become ready: the driver looks at
/// every source again before it waits. Waking the task itself then, as a
/// plain waker would, makes tokio schedule it again the moment it returns
/// (a poll that finds nothing new) and, to do that, wake the runtime's other
/// worker (a syscall, a context switch on each side). A driver that carries
/// thousands of elections is often running when the next answer comes in
/// on another worker. Once the driver is about to wait, a wake-up wakes the
/// task as usual.
#[derive(Debug, Default)]
struct Sources {
    /// The driver's task is running (it looks at every source again
    /// before it waits).
    running: AtomicBool,
    /// A source woke since the driver last began looking at them.
    woken: AtomicBool,
    /// The driver's task, woken when a source wakes while it waits.
    task: AtomicWaker,
}

impl Sources {
    /// The driver's task is polled with `cx`: from now on a wake-up only
    /// marks.
    fn enter(&self, cx: &Context<'_>) {
        self.task.register(cx.waker());
        self.running.store(true, Ordering::SeqCst);
    }

    /// Before the driver looks at every source: the marks made before are
    /// seen by the look.
    fn look(&self) {
        self.woken.store(false, Ordering::SeqCst);
    }

    /// The driver found nothing ready and is about to wait: from now on a
    /// wake-up wakes the task. `true` if a source woke since the driver
    /// began to look (it may have missed that source's news: it looks
    /// again, after [`Sources::enter`]).
    ///
    /// Either a waker sees `running` false (stored first here) and wakes
    /// the task, or this sees its mark (stored first there): a wake-up is
    /// never lost.
    fn leave(&self) -> bool {
        self.running.store(false, Ordering::SeqCst);
        self.woken.load(Ordering::SeqCst)
    }
}

impl Wake for Sources {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::SeqCst);
        if !self.running.load(Ordering::SeqCst) {
            self.task.wake();
        }
    }
}

impl<F> Drop for Driver<F> {
    fn drop(&mut self) {
        // Closed before the timer queue is dropped: its entries hand their
        // sessions to a live driver (see [`TimerRef`]), and this one must
        // no longer count as one.
        self.rx.close();
        // A lease change reported here and not read yet (a poke, or a
        // start that would have read the lease) may concern an election
        // this driver holds no timer entry for (a follower until that
        // change): its step-down timer is handed over too, or the loss at
        // its deadline would never be reported.
        while let Ok(cmd) = self.rx.try_recv() {
            match cmd {
                Command::Start { session, .. } => session.timer_lost(),
                Command::Poke(session) => {
                    if let Some(session) = session.upgrade() {
                        session.timer_lost();
                    }
                }
                Command::Stop { .. } => {}
            }
        }
        // A campaign with a call in flight or an attempt waiting for its
        // turn may have no timer entry here (a follower): nothing else would
        // tell its consumers that it died with this driver, and a stream
        // waiting for its next event would never revive it.
        // So may an expired timer taken out of the queue and not handled
        // (only if handling the ones before it unwound).
        let calls = self.calls.iter().map(|call| &call.session);
        let expired = self.expired.iter().map(|(_, session)| session);
        let queued = self.queued.iter().map(|(session, _)| session);
        for session in calls.chain(expired).chain(queued) {
            if let Some(session) = session.upgrade() {
                session.timer_lost();
            }
        }
    }
}

impl<F: Future<Output = CallEnd> + Send + 'static> Driver<F> {
    /// `session`'s slot, if this driver (`id`) keeps it.
    fn owned(id: u64, session: &Session) -> Option<MutexGuard<'_, Slot>> {
        let slot = session.slot();
        (slot.driver == id).then_some(slot)
    }

    /// `session`'s slot, taken over from the driver that kept it before (if
    /// any: it died with its runtime, or the session is new here). Its timer
    /// lived in the old driver's queue and its call in the old driver's
    /// task: both are gone, so the slot starts afresh.
    ///
    /// A slot kept by another driver that is alive is taken over only by a
    /// start (`start`: the campaign moves here, see
    /// [`Session::ensure_campaign`]; the one it records there was stopped,
    /// and its call in flight, if any, is aborted so that it can no longer
    /// touch the state) or when it records no campaign (a lease change
    /// reported here: the timer moves). Otherwise (a late stop, a poke sent
    /// before the campaign moved) `Err` with that driver's queue: the slot
    /// is not this driver's to touch, and a poke goes on to its owner.
    fn take_over<'a>(
        &self,
        session: &'a Session,
        start: bool,
    ) -> Result<MutexGuard<'a, Slot>, mpsc::UnboundedSender<Command>> {
        let mut slot = session.slot();
        if slot.driver != self.id {
            let owner = slot
                .owner
                .as_ref()
                .and_then(mpsc::WeakUnboundedSender::upgrade)
                .filter(|tx| !tx.is_closed());
            if let Some(owner) = owner {
                if !start && slot.campaign.is_some() {
                    return Err(owner);
                }
            }
            if let Some(Running {
                mode: Mode::Call { abort },
                ..
            }) = &slot.campaign
            {
                abort.abort();
            }
            let next_seq = slot
                .campaign
                .as_ref()
                .map_or(slot.next_seq, |running| running.seq.wrapping_add(1))
                .max(slot.next_seq);
            *slot = Slot {
                driver: self.id,
                owner: Some(self.me.clone()),
                next_seq,
                ..Slot::default()
            };
        }
        Ok(slot)
    }

    /// Runs until every handle (the connection's, and so every session's)
    /// is gone.
    async fn run(mut self) {
        let waker = Waker::from(self.sources.clone());
        loop {
            let (cmd, timer, call) = futures::future::poll_fn(|task| {
                self.sources.enter(task);
                // Looked at once more after a wake-up during the look; a
                // second one in a row comes from a source that wakes without
                // news (tokio's budget for this poll is spent, or the calls
                // yield their turn): the runtime runs its other tasks first.
                let mut looked_again = false;
                loop {
                    self.sources.look();
                    let cx = &mut Context::from_waker(&waker);
                    let cmd = self.rx.poll_recv(cx);
                    // Unconstrained: the timer queue polls a fresh `Sleep`
                    // for each expired entry, which spends a unit of the
                    // task's budget (128 a turn), so a batch would end
                    // after about a hundred and be ordered apart from the
                    // rest. The loop yields after a full batch instead.
                    let expired = &mut self.expired;
                    let timers = &mut self.timers;
                    let mut drain =
                        tokio::task::coop::unconstrained(futures::future::poll_fn(|cx| {
                            while expired.len() < EXPIRED_BATCH {
                                match timers.poll_expired(cx) {
                                    Poll::Ready(Some(timer)) => {
                                        expired.push((None, timer.into_inner().take()));
                                    }
                                    _ => break,
                                }
                            }
                            Poll::Ready(())
                        }));
                    let _ = Pin::new(&mut drain).poll(cx);
                    let timer = !self.expired.is_empty();
                    let call = match self.calls.poll_next_unpin(cx) {
                        Poll::Ready(Some((done, cell))) => {
                            if self.spare.len() < SPARE_CELLS {
                                self.spare.push(cell);
                            }
                            Some(done)
                        }
                        _ => None,
                    };
                    if cmd.is_ready() || timer || call.is_some() {
                        return Poll::Ready((cmd, timer, call));
                    }
                    if !self.sources.leave() {
                        return Poll::Pending;
                    }
                    if looked_again {
                        task.waker().wake_by_ref();
                        return Poll::Pending;
                    }
                    looked_again = true;
                    self.sources.enter(task);
                }
            })
            .await;
            // The expired timers first: their entries have left the queue
            // (their keys may be reused), and a call's outcome handled before
            // them could re-arm one of their elections' timers, which `fired`
            // would then forget. The call's answer is already applied to the
            // state, so the tick sees it.
            // A full batch: others may wait in the queue (a stall), and
            // draining them spends none of the task's budget: the runtime
            // runs its other tasks before the next batch.
            let full = self.expired.len() >= EXPIRED_BATCH;
            if timer {
                self.fire_expired();
            }
            if let Some((session, seq, acquire, outcome)) = call {
                self.call_ended(&session, seq, acquire, outcome);
            }
            match cmd {
                Poll::Ready(Some(cmd)) => {
                    self.command(cmd);
                    for _ in 1..BATCH {
                        match self.rx.try_recv() {
                            Ok(cmd) => self.command(cmd),
                            Err(_) => break,
                        }
                    }
                }
                Poll::Ready(None) => return,
                Poll::Pending => {}
            }
            if self.queued.len() >= self.compact_at {
                self.compact();
            }
            if full {
                tokio::task::yield_now().await;
            }
        }
    }

    /// Drops the queue entries that no longer wait for their turn (their
    /// campaign stopped, failed, or leads now and renews instead): a client
    /// that starts and stops campaigns while the connection is saturated
    /// cannot grow the queue without bound. Amortized constant time per
    /// entry: it runs when the queue has doubled since the last time.
    fn compact(&mut self) {
        let id = self.id;
        self.queued.retain(|(session, seq)| {
            session.upgrade().is_some_and(|session| {
                Self::owned(id, &session).is_some_and(|slot| {
                    slot.campaign.as_ref().is_some_and(|running| {
                        running.seq == *seq && matches!(running.mode, Mode::Queued)
                    })
                })
            })
        });
        self.compact_at = self.queued.len().saturating_mul(2).max(COMPACT_MIN);
    }

    fn command(&mut self, cmd: Command) {
        match cmd {
            Command::Start {
                session,
                generation,
            } => self.guarded(&session, |driver, session| {
                {
                    // Stopped since it was sent (its driver's runtime was
                    // not run meanwhile): the slot may now hold the live
                    // campaign of a later start, on another driver, which
                    // this one must not take over (its stale stop, next in
                    // this queue, would then wipe it).
                    if session.campaign_generation() != generation {
                        return;
                    }
                    let Ok(mut slot) = driver.take_over(session, true) else {
                        return;
                    };
                    if slot.campaign.is_some() {
                        return;
                    }
                    let seq = slot.next_seq;
                    slot.campaign = Some(Running {
                        plan: Plan::new(session),
                        seq,
                        generation,
                        mode: Mode::Ready,
                    });
                }
                driver.advance(session);
            }),
            Command::Stop { session, ack } => {
                let Some(session) = session.upgrade() else {
                    let _ = ack.send(());
                    return;
                };
                // A slot another driver keeps (it took the session over
                // since, alive or not): nothing of this campaign is left
                // here but its aborted call, if any. A stop takes nothing
                // over: that would reset the other driver's timer.
                let Some(mut slot) = Self::owned(self.id, &session) else {
                    let _ = ack.send(());
                    return;
                };
                let Some(running) = slot.campaign.take() else {
                    drop(slot);
                    let _ = ack.send(());
                    return;
                };
                slot.next_seq = running.seq.wrapping_add(1);
                match running.mode {
                    Mode::Call { abort } => {
                        // Acknowledged once the call is dropped (at the
                        // driver's next poll: aborting wakes it).
                        abort.abort();
                        slot.stopping.push((running.seq, ack));
                    }
                    Mode::Ready | Mode::Sleep { .. } | Mode::Queued => {
                        let _ = ack.send(());
                    }
                }
                self.arm(&session, &mut slot);
            }
            Command::Poke(session) => {
                let Some(session) = session.upgrade() else {
                    return;
                };
                session.poke_taken(self.id);
                match self.take_over(&session, false) {
                    Ok(slot) => drop(slot),
                    Err(owner) => {
                        // Sent here before the campaign moved: its driver
                        // is told (it reads the state afresh).
                        let _ = owner.send(Command::Poke(Arc::downgrade(&session)));
                        return;
                    }
                }
                self.guarded(&session, Self::lease_changed);
            }
        }
    }

    /// Runs `f` for `session` in its client span; if it panics (a bug), the
    /// term ends at once (`Lost { Failed }` on every consumer) and the
    /// campaign restarts after a pause: a client never sits with a
    /// keep-alive "running" and nothing campaigning.
    fn guarded(&mut self, session: &Arc<Session>, f: impl FnOnce(&mut Self, &Arc<Session>)) {
        let _entered = session.observer.span().enter();
        let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| f(self, session)));
        if let Err(panic) = outcome {
            self.failed(session, &describe(panic.as_ref()));
        }
    }

    /// The campaign of `session` failed unexpectedly: step down, restart
    /// later.
    fn failed(&mut self, session: &Arc<Session>, what: &str) {
        tracing::error!(panic = %what, "the campaign panicked; stepping down and restarting it");
        let _ = std::panic::catch_unwind(AssertUnwindSafe(|| {
            session.observe(Observation::CampaignFailed).deliver();
        }));
        let Some(mut slot) = Self::owned(self.id, session) else {
            return;
        };
        let Some(running) = slot.campaign.as_mut() else {
            self.arm(session, &mut slot);
            return;
        };
        if let Mode::Call { abort } = &running.mode {
            abort.abort();
        }
        running.plan = Plan::new(session);
        running.seq += 1;
        running.mode = Mode::Sleep {
            at: crate::time::after(Instant::now(), RESTART_PAUSE),
            renew_wait: false,
        };
        self.arm(session, &mut slot);
    }

    /// Arms the one timer of `session` at the earlier of its published
    /// deadline and its campaign's wake-up.
    fn arm(&mut self, session: &Arc<Session>, slot: &mut Slot) {
        let wake = match &slot.campaign {
            Some(Running {
                mode: Mode::Sleep { at, .. },
                ..
            }) => Some(*at),
            _ => None,
        };
        let at = match (session.published_deadline(), wake) {
            (Some(d), Some(w)) => Some(d.min(w)),
            (d, w) => d.or(w),
        };
        if slot.timer.map(|(armed, _)| armed) == at {
            return;
        }
        if let Some((_, key)) = slot.timer.take() {
            if let Some(removed) = self.timers.try_remove(&key) {
                removed.into_inner().take();
            }
        }
        if let Some(at) = at {
            // A timer queue holds nothing further out than about two years,
            // and a TTL may be 68: a far instant is armed at the horizon,
            // and re-armed from there when it fires.
            let when = at.min(crate::time::after(Instant::now(), TIMER_HORIZON));
            let key = self
                .timers
                .insert_at(TimerRef(Arc::downgrade(session)), when);
            slot.timer = Some((at, key));
        }
    }

    /// Handles the timers that expired together (renewals moved to the
    /// start of one slot, see [`crate::backoff::renew_slot`], or everything
    /// due while the driver's runtime did not run it), earliest lease
    /// deadline first: when a burst of renewals takes a while to send, the
    /// leases closest to their end go out first, and then those of
    /// followers' attempts.
    fn fire_expired(&mut self) {
        let mut expired = std::mem::take(&mut self.expired);
        if expired.len() > 1 {
            for (deadline, session) in &mut expired {
                *deadline = session.upgrade().and_then(|s| s.published_deadline());
            }
            expired.sort_unstable_by_key(|(deadline, _)| (deadline.is_none(), *deadline));
        }
        for (_, session) in expired.drain(..) {
            self.fired(session);
        }
        self.expired = expired;
    }

    /// The timer of a session fired: the deadline passed (a tick reports
    /// the loss) and/or its campaign's wake-up came.
    fn fired(&mut self, timer: Weak<Session>) {
        let Some(session) = timer.upgrade() else {
            return;
        };
        self.guarded(&session, |driver, session| {
            let now = Instant::now();
            let (expired, woken) = {
                // A timer of a slot another driver took over is stale.
                let Some(mut slot) = Self::owned(driver.id, session) else {
                    return;
                };
                slot.timer = None;
                let expired = session.published_deadline().is_some_and(|d| d <= now);
                let woken = match &mut slot.campaign {
                    Some(running) => match running.mode {
                        Mode::Sleep { at, .. } if at <= now => {
                            running.mode = Mode::Ready;
                            true
                        }
                        _ => false,
                    },
                    None => false,
                };
                (expired, woken)
            };
            if expired {
                session.observe(Observation::Tick).deliver();
            }
            if woken {
                driver.advance(session);
            } else {
                driver.lease_changed(session);
            }
        });
    }

    /// The published lease may have moved: re-arms the timer. A campaign
    /// waiting for a renewal to come due plans again (a loss, a release, an
    /// imperative renewal), and so does one waiting as a follower (asleep,
    /// or queued for its turn) once the client leads (an imperative grant):
    /// its lease must be renewed before that wait would end (the retry
    /// period is not bounded by the TTL, the queue by anything; a queued
    /// entry left behind goes stale).
    fn lease_changed(&mut self, session: &Arc<Session>) {
        let Some(mut slot) = Self::owned(self.id, session) else {
            return;
        };
        let replan = match &slot.campaign {
            Some(Running {
                mode: Mode::Sleep { renew_wait, .. },
                ..
            }) => *renew_wait || session.is_leader(),
            Some(Running {
                mode: Mode::Queued, ..
            }) => session.is_leader(),
            _ => false,
        };
        if replan {
            if let Some(running) = slot.campaign.as_mut() {
                running.mode = Mode::Ready;
            }
            drop(slot);
            self.advance(session);
            return;
        }
        self.arm(session, &mut slot);
    }

    /// The campaign of `session` is free to act: asks its plan what next,
    /// and carries it out.
    fn advance(&mut self, session: &Arc<Session>) {
        #[cfg(test)]
        if session
            .inject_panic
            .swap(false, std::sync::atomic::Ordering::SeqCst)
        {
            panic!("injected campaign panic");
        }
        loop {
            // The plan reads the state (and may apply a tick) outside the
            // slot.
            let mut plan = {
                let Some(mut slot) = Self::owned(self.id, session) else {
                    return;
                };
                match slot.campaign.as_mut() {
                    Some(running) if matches!(running.mode, Mode::Ready) => {
                        std::mem::replace(&mut running.plan, Plan::idle())
                    }
                    _ => return,
                }
            };
            let action = plan.next(session);
            self.restore(session, plan);
            if self.carry_out(session, action) {
                return;
            }
        }
    }

    /// Starts `call` for `session`'s campaign. The driver polls it (so the
    /// lease it publishes is the driver's own change: no poke).
    fn launch(&mut self, session: &Arc<Session>, running: &mut Running, call: Call) {
        let seq = running.seq;
        let generation = running.generation;
        let (abort, registration) = AbortHandle::new_pair();
        let mut cell = self.spare.pop().unwrap_or_else(|| Box::pin(None));
        cell.as_mut().set(Some((self.make)(
            session.clone(),
            seq,
            call,
            generation,
            registration,
        )));
        self.calls.push(InCell {
            cell: Some(cell),
            session: Arc::downgrade(session),
        });
        let acquire = matches!(call, Call::Acquire);
        running.mode = Mode::Call { abort };
        if acquire {
            self.acquiring += 1;
        }
    }

    /// A follower attempt's future ended: the next queued ones may go.
    fn acquire_ended(&mut self) {
        self.acquiring = self.acquiring.saturating_sub(1);
        while self.acquiring < self.acquires {
            let Some((session, seq)) = self.queued.pop_front() else {
                return;
            };
            let Some(session) = session.upgrade() else {
                continue;
            };
            self.guarded(&session, |driver, session| {
                let Some(mut slot) = Self::owned(driver.id, session) else {
                    return;
                };
                let Some(running) = slot.campaign.as_mut() else {
                    return;
                };
                if running.seq == seq && matches!(running.mode, Mode::Queued) {
                    driver.launch(session, running, Call::Acquire);
                }
            });
        }
    }

    /// A call future ended: answered (its outcome goes to its campaign) or
    /// dropped after an abort (its stop is acknowledged).
    fn call_ended(
        &mut self,
        session: &Arc<Session>,
        seq: u64,
        acquire: bool,
        outcome: Result<Outcome, Aborted>,
    ) {
        if acquire {
            // Before this campaign acts again: it may queue at the back.
            self.acquire_ended();
        }
        if let Some(mut slot) = Self::owned(self.id, session) {
            if let Some(i) = slot.stopping.iter().position(|(s, _)| *s == seq) {
                let (_, ack) = slot.stopping.swap_remove(i);
                let _ = ack.send(());
            }
        }
        if let Ok(outcome) = outcome {
            self.guarded(session, |driver, session| {
                driver.done(session, seq, outcome)
            });
        }
    }

    /// A call of `session`'s campaign was answered (and its answer applied).
    fn done(&mut self, session: &Arc<Session>, seq: u64, outcome: Outcome) {
        let mut plan = {
            let Some(mut slot) = Self::owned(self.id, session) else {
                return;
            };
            let current = slot
                .campaign
                .as_mut()
                .and_then(|running| match running.mode {
                    Mode::Call { .. } if running.seq == seq => {
                        running.mode = Mode::Ready;
                        Some(std::mem::replace(&mut running.plan, Plan::idle()))
                    }
                    _ => None,
                });
            match current {
                Some(current) => current,
                None => {
                    // A stopped campaign's call: only the timer may need
                    // to follow the lease it published.
                    self.arm(session, &mut slot);
                    return;
                }
            }
        };
        let next = match outcome {
            Outcome::Acquired(answer) => plan.acquired(session, &answer),
            Outcome::Renewed(answer, until) => plan.renewed(session, &answer, until),
            Outcome::Settled(class) => plan.settled(session, class),
            Outcome::Stopped => None,
            Outcome::Panicked(what) => {
                self.restore(session, plan);
                self.failed(session, &what);
                return;
            }
        };
        self.restore(session, plan);
        match next {
            Some(action) if self.carry_out(session, action) => {}
            _ => self.advance(session),
        }
    }

    /// Puts `plan` back into `session`'s running campaign.
    fn restore(&mut self, session: &Arc<Session>, plan: Plan) {
        if let Some(mut slot) = Self::owned(self.id, session) {
            if let Some(running) = slot.campaign.as_mut() {
                running.plan = plan;
            }
        }
    }

    /// Carries out an action of `session`'s plan (its campaign free to act):
    /// sleeps, queues or launches a call, and arms the timer. `false` if
    /// there is nothing to wait for (a follower wait already over): the
    /// plan decides again.
    fn carry_out(&mut self, session: &Arc<Session>, action: Action) -> bool {
        let Some(mut slot) = Self::owned(self.id, session) else {
            return true;
        };
        let Some(running) = slot.campaign.as_mut() else {
            return true;
        };
        if !matches!(running.mode, Mode::Ready) {
            return true;
        }
        running.seq += 1;
        match action {
            Action::Sleep { at, renew_wait } => {
                if at <= Instant::now() && !renew_wait {
                    return false;
                }
                running.mode = Mode::Sleep { at, renew_wait };
            }
            Action::Call(Call::Acquire) if self.acquiring >= self.acquires => {
                running.mode = Mode::Queued;
                self.queued
                    .push_back((Arc::downgrade(session), running.seq));
            }
            Action::Call(call) => self.launch(session, running, call),
        }
        self.arm(session, &mut slot);
        true
    }
}

/// Makes one call of the campaign and applies its answer (inside the
/// session's call methods). Not sent if the campaign was stopped meanwhile.
async fn make_call(session: &Session, call: Call, generation: u64) -> Outcome {
    if session.campaign_generation() != generation {
        return Outcome::Stopped;
    }
    match call {
        Call::Acquire => {
            // A queued attempt costs nothing: it waits for a free call slot
            // as long as it takes.
            let answer = session.try_acquire(Wait::Unbounded).await;
            Outcome::Acquired(answer)
        }
        Call::Renew { until } => {
            let answer = session
                .keep_alive(session.timing.rpc_timeout, Wait::Until(until))
                .await;
            Outcome::Renewed(answer, until)
        }
        Call::Settle { class } => {
            session.settle_unknown_acquire().await;
            Outcome::Settled(class)
        }
    }
}

/// A reusable allocation for one call's future (empty between calls).
type CallCell<F> = Pin<Box<Option<F>>>;

/// A call's future in its [`CallCell`]. It ends with the call's output and the
/// cell, emptied: the future is dropped before its end is reported (so a
/// stop acknowledged then finds nothing of the campaign left to run).
struct InCell<F> {
    cell: Option<CallCell<F>>,
    /// Whose call it is: told if the driver is dropped with it in flight.
    session: Weak<Session>,
}

impl<F: Future> Future for InCell<F> {
    type Output = (F::Output, CallCell<F>);

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        // `InCell` is `Unpin`: the future is pinned inside its box.
        let this = self.get_mut();
        let Some(cell) = this.cell.as_mut() else {
            // Polled after it ended (never done by `FuturesUnordered`).
            return Poll::Pending;
        };
        let Some(future) = cell.as_mut().as_pin_mut() else {
            return Poll::Pending;
        };
        let output = futures::ready!(future.poll(cx));
        cell.as_mut().set(None);
        match this.cell.take() {
            Some(cell) => Poll::Ready((output, cell)),
            None => Poll::Pending,
        }
    }
}

fn describe(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "non-string panic payload".into())
}

pin_project_lite::pin_project! {
    /// Marks the thread as polling driver `id`, so that the sessions it
    /// drives do not poke it about their own changes.
    struct OnDriver<F> {
        id: u64,
        #[pin]
        inner: F,
    }
}

impl<F: std::future::Future> std::future::Future for OnDriver<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        let previous = CURRENT.with(|c| c.replace(*this.id));
        let out = this.inner.poll(cx);
        CURRENT.with(|c| c.set(previous));
        out
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};
    use std::task::{Context, Wake, Waker};
    use std::time::{Duration, Instant};

    use super::Sources;

    /// Counts the wake-ups of the driver's task.
    type Count = crate::sync::WakeCount;

    /// A source that wakes while the driver runs marks, and does not wake
    /// the task (tokio would poll it again for nothing, and wake another
    /// worker to do it); the mark makes the driver look again before it
    /// waits. Once it waits, a wake-up wakes the task.
    #[test]
    fn a_wake_up_while_the_driver_runs_marks_and_one_while_it_waits_wakes_it() {
        let task = Arc::new(Count::default());
        let task_waker = Waker::from(task.clone());
        let sources = Arc::new(Sources::default());
        let waker = Waker::from(sources.clone());
        sources.enter(&Context::from_waker(&task_waker));
        sources.look();
        waker.wake_by_ref();
        assert_eq!(task.count(), 0, "woken while running");
        assert!(sources.leave(), "the wake-up during the look was forgotten");
        sources.enter(&Context::from_waker(&task_waker));
        sources.look();
        assert!(!sources.leave());
        waker.wake_by_ref();
        assert_eq!(task.count(), 1, "not woken while waiting");
    }

    /// No wake-up is lost between the driver's last look and its wait: a
    /// producer thread hands items over one at a time (each waits until the
    /// one before was taken, so every wake-up is the only one that can
    /// bring its item), a consumer thread runs the driver's loop (look,
    /// take, leave, park until woken).
    #[test]
    fn no_wake_up_is_lost_between_the_last_look_and_the_wait() {
        struct Unpark(std::thread::Thread);
        impl Wake for Unpark {
            fn wake(self: Arc<Self>) {
                self.0.unpark();
            }
        }
        const ITEMS: usize = 20_000;
        let queue = Arc::new(Mutex::new(VecDeque::new()));
        let taken = Arc::new(AtomicUsize::new(0));
        let sources = Arc::new(Sources::default());
        let consumer = {
            let (queue, sources, taken) = (queue.clone(), sources.clone(), taken.clone());
            std::thread::spawn(move || {
                let task = Waker::from(Arc::new(Unpark(std::thread::current())));
                while taken.load(Ordering::SeqCst) < ITEMS {
                    sources.enter(&Context::from_waker(&task));
                    loop {
                        sources.look();
                        let n = queue.lock().map(|mut q| q.drain(..).count()).unwrap_or(0);
                        taken.fetch_add(n, Ordering::SeqCst);
                        if n > 0 {
                            continue;
                        }
                        if !sources.leave() {
                            break;
                        }
                        sources.enter(&Context::from_waker(&task));
                    }
                    if taken.load(Ordering::SeqCst) < ITEMS {
                        // Until woken (a spurious return only looks again);
                        // a lost wake-up leaves the item waiting.
                        std::thread::park_timeout(Duration::from_secs(10));
                    }
                }
            })
        };
        let waker = Waker::from(sources.clone());
        for i in 0..ITEMS {
            if let Ok(mut q) = queue.lock() {
                q.push_back(i);
            }
            waker.wake_by_ref();
            let handed = Instant::now();
            while taken.load(Ordering::SeqCst) <= i {
                assert!(
                    handed.elapsed() < Duration::from_secs(5),
                    "item {i} was not taken: its wake-up was lost"
                );
                std::thread::yield_now();
            }
        }
        assert!(consumer.join().is_ok());
    }
}
