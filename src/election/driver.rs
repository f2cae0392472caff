//! The driver: one task per connection that runs the campaign of every
//! election on it and keeps their step-down timers, with one timer queue.
//!
//! An election costs the driver a map entry, at most two timer entries (its
//! next campaign step and its deadline) and, while a call of its is in
//! flight, that call's task; no task or timer of its own while it waits. A
//! process with 100,000 elections on one connection runs one driver, not
//! 200,000 tasks.
//!
//! The calls the campaign asks for are futures the driver polls (no task of
//! their own); each applies its answer to the election state as it arrives
//! (so a late answer is fenced by the state machine, as every answer is) and
//! then hands the outcome to the campaign. Stopping a campaign aborts its
//! call, and the stop is acknowledged once that call is dropped: once a stop
//! returns, the campaign can no longer touch the state.
//!
//! The step-down timer fires at the published deadline (read from the state,
//! never kept as a copy beyond the timer entry) and applies a tick, so
//! `Lost { Expired }` reaches every consumer even when no call returns and
//! nothing campaigns. A lease changed from outside the driver (an imperative
//! call, a release) pokes the driver, which re-arms the timer and wakes a
//! campaign waiting to renew.
//!
//! Buffers: the command channel holds at most one start or stop per
//! campaign, one outcome per call in flight and one poke per election (a
//! poke is sent only when none is pending), so it is bounded by the number
//! of elections.

use std::cell::Cell;
use std::collections::{HashMap, VecDeque};
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::future::{AbortHandle, Abortable, Aborted, BoxFuture};
use futures::stream::FuturesUnordered;
use futures::{FutureExt, StreamExt};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::time::{delay_queue, DelayQueue};
use tracing::Instrument;

use super::campaign::{Action, Call, Plan};
use super::Session;
use crate::admission::Wait;
use crate::rpc::{Answer, LeaseAnswer};
use crate::state::Observation;

/// The pause before a campaign that failed unexpectedly (a panic) restarts.
const RESTART_PAUSE: Duration = Duration::from_secs(1);

/// How many commands the driver takes in one go before it looks at its
/// timers again (so a flood of starts cannot delay a step-down).
const BATCH: usize = 256;

/// Identifies an election (a session) among all of this process.
pub(crate) type SessionId = u64;

static NEXT_SESSION: AtomicU64 = AtomicU64::new(1);
static NEXT_DRIVER: AtomicU64 = AtomicU64::new(1);

thread_local! {
    /// The driver whose task this thread is polling right now (0: none).
    static CURRENT: Cell<u64> = const { Cell::new(0) };
}

/// A fresh session id.
pub(crate) fn session_id() -> SessionId {
    NEXT_SESSION.fetch_add(1, Ordering::Relaxed)
}

/// A way to reach a connection's driver.
#[derive(Debug, Clone)]
pub(crate) struct Handle {
    id: u64,
    tx: mpsc::UnboundedSender<Command>,
}

impl Handle {
    /// Spawns a driver on `runtime` that lets at most `acquires` follower
    /// attempts be in flight at once (see [`Driver::queued`]).
    pub(crate) fn spawn(runtime: &tokio::runtime::Handle, acquires: usize) -> Handle {
        let (tx, rx) = mpsc::unbounded_channel();
        let id = NEXT_DRIVER.fetch_add(1, Ordering::Relaxed);
        let driver = Driver {
            rx,
            calls: FuturesUnordered::new(),
            stopping: HashMap::new(),
            entries: HashMap::new(),
            timers: DelayQueue::new(),
            acquires: acquires.max(1),
            acquiring: 0,
            queued: VecDeque::new(),
        };
        runtime.spawn(OnDriver {
            id,
            inner: Box::pin(driver.run()),
        });
        Handle { id, tx }
    }

    /// `false` once the driver's task is gone (its runtime shut down).
    pub(crate) fn is_alive(&self) -> bool {
        !self.tx.is_closed()
    }

    /// `true` when called from this driver's own task.
    pub(crate) fn is_current(&self) -> bool {
        CURRENT.with(|c| c.get() == self.id)
    }

    /// Starts `session`'s campaign.
    pub(crate) fn start(&self, session: Arc<Session>) -> bool {
        self.tx.send(Command::Start(session)).is_ok()
    }

    /// Stops campaign `id`: the returned receiver completes once the driver
    /// has let go of the campaign and dropped its call in flight, if any.
    pub(crate) fn stop(&self, id: SessionId) -> Option<oneshot::Receiver<()>> {
        let (ack, rx) = oneshot::channel();
        self.tx.send(Command::Stop { id, ack }).ok()?;
        Some(rx)
    }

    /// The lease of `session` changed outside the driver.
    pub(crate) fn poke(&self, id: SessionId, session: Weak<Session>) {
        let _ = self.tx.send(Command::Poke { id, session });
    }

    /// Session `id` is gone.
    pub(crate) fn forget(&self, id: SessionId) {
        let _ = self.tx.send(Command::Forget(id));
    }
}

enum Command {
    Start(Arc<Session>),
    Stop {
        id: SessionId,
        ack: oneshot::Sender<()>,
    },
    Poke {
        id: SessionId,
        session: Weak<Session>,
    },
    Forget(SessionId),
}

/// A campaign call in flight: its campaign, its `seq`, and its outcome (or
/// `Aborted` if its campaign stopped).
type CallFuture = BoxFuture<'static, (SessionId, u64, Result<Outcome, Aborted>)>;

/// What a call task reports.
enum Outcome {
    Acquired(Answer<bool>),
    Renewed(Answer<LeaseAnswer>, Instant),
    Settled(crate::backoff::Class),
    /// The campaign was stopped before the call went out.
    Stopped,
    Panicked(String),
}

/// What a timer entry wakes.
#[derive(Debug, Clone, Copy)]
enum Timer {
    /// The campaign's next step (`seq` tells a stale entry apart).
    Campaign(u64),
    /// The published deadline.
    Deadline,
}

struct Entry {
    session: Weak<Session>,
    /// The armed step-down timer: the deadline and its timer entry.
    deadline: Option<(Instant, delay_queue::Key)>,
    campaign: Option<Running>,
}

/// A running campaign.
struct Running {
    session: Arc<Session>,
    plan: Plan,
    /// Counts the campaign's waits and calls, so that a late report or an
    /// expired timer of an earlier one is told apart.
    seq: u64,
    mode: Mode,
}

enum Mode {
    /// About to decide its next step.
    Ready,
    /// Waiting for its timer.
    Sleep {
        key: delay_queue::Key,
        renew_wait: bool,
    },
    /// A call of it is in flight (`acquire`: a follower attempt, counted in
    /// [`Driver::acquiring`]).
    Call { abort: AbortHandle, acquire: bool },
    /// Its follower attempt waits for its turn (see [`Driver::queued`]).
    Queued,
}

struct Driver {
    rx: mpsc::UnboundedReceiver<Command>,
    /// The campaigns' calls in flight.
    calls: FuturesUnordered<CallFuture>,
    /// Stops waiting for an aborted call to be dropped, by campaign and seq.
    stopping: HashMap<(SessionId, u64), oneshot::Sender<()>>,
    entries: HashMap<SessionId, Entry>,
    timers: DelayQueue<(SessionId, Timer)>,
    /// At most this many follower attempts are in flight at once (twice
    /// the connection's cap on calls, so that the connection stays busy).
    acquires: usize,
    /// Follower attempts in flight.
    acquiring: usize,
    /// Follower attempts waiting for their turn, first come first served,
    /// by campaign and `seq`. A cold start of 100,000 elections thus holds
    /// 100,000 ids here, not 100,000 calls waiting for a slot on the
    /// connection (each a task and a call's state). Renewals never wait here.
    queued: VecDeque<(SessionId, u64)>,
}

impl Driver {
    /// Runs until every handle (the connection's, and so every session's)
    /// is gone.
    async fn run(mut self) {
        loop {
            let (cmd, timer, call) = futures::future::poll_fn(|cx| {
                let cmd = self.rx.poll_recv(cx);
                let timer = match self.timers.poll_expired(cx) {
                    Poll::Ready(Some(expired)) => Some(expired.into_inner()),
                    _ => None,
                };
                let call = match self.calls.poll_next_unpin(cx) {
                    Poll::Ready(Some(done)) => Some(done),
                    _ => None,
                };
                if cmd.is_pending() && timer.is_none() && call.is_none() {
                    return Poll::Pending;
                }
                Poll::Ready((cmd, timer, call))
            })
            .await;
            if let Some((id, seq, outcome)) = call {
                self.call_ended(id, seq, outcome);
            }
            if let Some((id, timer)) = timer {
                self.fired(id, timer);
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
        }
    }

    /// A call future ended: answered (its outcome goes to its campaign) or
    /// dropped after an abort (its stop is acknowledged).
    fn call_ended(&mut self, id: SessionId, seq: u64, outcome: Result<Outcome, Aborted>) {
        if let Some(ack) = self.stopping.remove(&(id, seq)) {
            let _ = ack.send(());
        }
        if let Ok(outcome) = outcome {
            self.guarded(id, |driver, id| driver.done(id, seq, outcome));
        }
    }

    fn command(&mut self, cmd: Command) {
        match cmd {
            Command::Start(session) => {
                let id = session.id;
                let entry = self.entry(id, Arc::downgrade(&session));
                if entry.campaign.is_none() {
                    let plan = Plan::new(&session);
                    entry.campaign = Some(Running {
                        session,
                        plan,
                        seq: 0,
                        mode: Mode::Ready,
                    });
                    self.guarded(id, Self::advance);
                }
            }
            Command::Stop { id, ack } => {
                let running = self.entries.get_mut(&id).and_then(|e| e.campaign.take());
                let Some(running) = running else {
                    let _ = ack.send(());
                    return;
                };
                match running.mode {
                    Mode::Call { abort, acquire } => {
                        // Acknowledged once the call is dropped (at the
                        // driver's next poll: aborting wakes it).
                        abort.abort();
                        self.stopping.insert((id, running.seq), ack);
                        if acquire {
                            self.acquire_ended();
                        }
                    }
                    Mode::Sleep { key, .. } => {
                        self.timers.try_remove(&key);
                        let _ = ack.send(());
                    }
                    Mode::Ready | Mode::Queued => {
                        let _ = ack.send(());
                    }
                }
            }
            Command::Poke { id, session } => {
                if let Some(s) = session.upgrade() {
                    s.poke_taken();
                }
                self.entry(id, session);
                self.guarded(id, |driver, id| {
                    driver.sync_deadline(id);
                    driver.wake_renew_wait(id);
                });
            }
            Command::Forget(id) => {
                if let Some(entry) = self.entries.remove(&id) {
                    self.drop_entry(entry);
                }
            }
        }
    }

    /// The entry of `id`, created if new.
    fn entry(&mut self, id: SessionId, session: Weak<Session>) -> &mut Entry {
        self.entries.entry(id).or_insert_with(|| Entry {
            session,
            deadline: None,
            campaign: None,
        })
    }

    fn drop_entry(&mut self, entry: Entry) {
        if let Some((_, key)) = entry.deadline {
            self.timers.try_remove(&key);
        }
        if let Some(running) = entry.campaign {
            match running.mode {
                Mode::Call { abort, acquire } => {
                    abort.abort();
                    if acquire {
                        self.acquire_ended();
                    }
                }
                Mode::Sleep { key, .. } => {
                    self.timers.try_remove(&key);
                }
                Mode::Ready | Mode::Queued => {}
            }
        }
    }

    /// Runs `f` for election `id`; if it panics (a bug), the term ends at
    /// once (`Lost { Failed }` on every consumer) and the campaign restarts
    /// after a pause: a client never sits with a keep-alive "running" and
    /// nothing campaigning.
    /// It runs in the election's client span, as its calls do.
    fn guarded(&mut self, id: SessionId, f: impl FnOnce(&mut Self, SessionId)) {
        let span = self.entries.get(&id).and_then(|e| match &e.campaign {
            Some(running) => Some(running.session.observer.span().clone()),
            None => e.session.upgrade().map(|s| s.observer.span().clone()),
        });
        let _entered = span.as_ref().map(tracing::Span::enter);
        let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| f(self, id)));
        if let Err(panic) = outcome {
            self.failed(id, &describe(panic.as_ref()));
        }
    }

    /// The campaign of `id` failed unexpectedly: step down, restart later.
    fn failed(&mut self, id: SessionId, what: &str) {
        tracing::error!(panic = %what, "the campaign panicked; stepping down and restarting it");
        let Some(entry) = self.entries.get_mut(&id) else {
            return;
        };
        let Some(running) = entry.campaign.as_mut() else {
            return;
        };
        let session = running.session.clone();
        let _ = std::panic::catch_unwind(AssertUnwindSafe(|| {
            session.observe(Observation::CampaignFailed);
            running.plan = Plan::new(&session);
        }));
        let mut ended_acquire = false;
        match &running.mode {
            Mode::Sleep { key, .. } => {
                self.timers.try_remove(key);
            }
            Mode::Call { abort, acquire } => {
                abort.abort();
                ended_acquire = *acquire;
            }
            Mode::Ready | Mode::Queued => {}
        }
        running.seq += 1;
        let key = self.timers.insert_at(
            (id, Timer::Campaign(running.seq)),
            crate::time::after(Instant::now(), RESTART_PAUSE),
        );
        running.mode = Mode::Sleep {
            key,
            renew_wait: false,
        };
        if ended_acquire {
            self.acquire_ended();
        }
        self.sync_deadline(id);
    }

    /// A follower attempt in flight ended: the next queued one may go.
    fn acquire_ended(&mut self) {
        self.acquiring = self.acquiring.saturating_sub(1);
        while self.acquiring < self.acquires {
            let Some((id, seq)) = self.queued.pop_front() else {
                return;
            };
            let waiting = self
                .entries
                .get(&id)
                .and_then(|e| e.campaign.as_ref())
                .is_some_and(|r| r.seq == seq && matches!(r.mode, Mode::Queued));
            if waiting {
                self.guarded(id, |driver, id| driver.launch(id, Call::Acquire));
            }
        }
    }

    fn fired(&mut self, id: SessionId, timer: Timer) {
        match timer {
            Timer::Deadline => {
                let Some(entry) = self.entries.get_mut(&id) else {
                    return;
                };
                entry.deadline = None;
                let Some(session) = entry.session.upgrade() else {
                    if let Some(entry) = self.entries.remove(&id) {
                        self.drop_entry(entry);
                    }
                    return;
                };
                self.guarded(id, |driver, id| {
                    session.observe(Observation::Tick);
                    driver.sync_deadline(id);
                    driver.wake_renew_wait(id);
                });
            }
            Timer::Campaign(seq) => {
                let Some(running) = self.entries.get_mut(&id).and_then(|e| e.campaign.as_mut())
                else {
                    return;
                };
                if running.seq != seq || !matches!(running.mode, Mode::Sleep { .. }) {
                    return;
                }
                running.mode = Mode::Ready;
                self.guarded(id, Self::advance);
            }
        }
    }

    /// A campaign waiting for a renewal to come due re-plans (the lease
    /// changed: a loss, a release, an imperative renewal).
    fn wake_renew_wait(&mut self, id: SessionId) {
        let Some(running) = self.entries.get_mut(&id).and_then(|e| e.campaign.as_mut()) else {
            return;
        };
        if let Mode::Sleep {
            key,
            renew_wait: true,
        } = &running.mode
        {
            self.timers.try_remove(key);
            running.mode = Mode::Ready;
            self.advance(id);
        }
    }

    /// Arms the step-down timer at the published deadline of `id`.
    fn sync_deadline(&mut self, id: SessionId) {
        let Some(entry) = self.entries.get_mut(&id) else {
            return;
        };
        let deadline = entry.session.upgrade().and_then(|s| s.published_deadline());
        if entry.deadline.map(|(at, _)| at) == deadline {
            return;
        }
        if let Some((_, key)) = entry.deadline.take() {
            self.timers.try_remove(&key);
        }
        if let Some(at) = deadline {
            let key = self.timers.insert_at((id, Timer::Deadline), at);
            entry.deadline = Some((at, key));
        }
    }

    /// The campaign of `id` is free to act: asks its plan what next.
    fn advance(&mut self, id: SessionId) {
        loop {
            let Some(running) = self.entries.get_mut(&id).and_then(|e| e.campaign.as_mut()) else {
                return;
            };
            #[cfg(test)]
            if running
                .session
                .inject_panic
                .swap(false, std::sync::atomic::Ordering::SeqCst)
            {
                panic!("injected campaign panic");
            }
            let action = running.plan.next(&running.session);
            // `next` may have applied a tick.
            self.sync_deadline(id);
            if self.act(id, action) {
                return;
            }
        }
    }

    /// Carries out `action` for `id`; `false` if the campaign should decide
    /// again at once.
    fn act(&mut self, id: SessionId, action: Action) -> bool {
        let Some(running) = self.entries.get_mut(&id).and_then(|e| e.campaign.as_mut()) else {
            return true;
        };
        running.seq += 1;
        let seq = running.seq;
        match action {
            Action::Sleep { at, renew_wait } => {
                if at <= Instant::now() && !renew_wait {
                    // Nothing to wait for.
                    running.mode = Mode::Ready;
                    return false;
                }
                let key = self.timers.insert_at((id, Timer::Campaign(seq)), at);
                running.mode = Mode::Sleep { key, renew_wait };
                true
            }
            Action::Call(Call::Acquire) if self.acquiring >= self.acquires => {
                running.mode = Mode::Queued;
                self.queued.push_back((id, seq));
                true
            }
            Action::Call(call) => {
                self.launch(id, call);
                true
            }
        }
    }

    /// Starts `call` for campaign `id`. The driver polls it (so the lease
    /// it publishes is the driver's own change: no poke).
    fn launch(&mut self, id: SessionId, call: Call) {
        let Some(running) = self.entries.get_mut(&id).and_then(|e| e.campaign.as_mut()) else {
            return;
        };
        let seq = running.seq;
        let session = running.session.clone();
        let span = session.observer.span().clone();
        let generation = session.campaign_generation();
        let (abort, registration) = AbortHandle::new_pair();
        let work = async move {
            AssertUnwindSafe(make_call(&session, call, generation))
                .catch_unwind()
                .await
                .unwrap_or_else(|panic| Outcome::Panicked(describe(panic.as_ref())))
        }
        .instrument(span);
        self.calls.push(Box::pin(
            Abortable::new(work, registration).map(move |outcome| (id, seq, outcome)),
        ));
        let acquire = matches!(call, Call::Acquire);
        running.mode = Mode::Call { abort, acquire };
        if acquire {
            self.acquiring += 1;
        }
    }

    /// A call of campaign `id` reported.
    fn done(&mut self, id: SessionId, seq: u64, outcome: Outcome) {
        self.sync_deadline(id);
        let Some(running) = self.entries.get_mut(&id).and_then(|e| e.campaign.as_mut()) else {
            return;
        };
        let Mode::Call { acquire, .. } = running.mode else {
            return;
        };
        if running.seq != seq {
            return;
        }
        running.mode = Mode::Ready;
        let session = running.session.clone();
        if acquire {
            // Before this campaign acts again: it may queue at the back.
            self.acquire_ended();
        }
        let Some(running) = self.entries.get_mut(&id).and_then(|e| e.campaign.as_mut()) else {
            return;
        };
        let next = match outcome {
            Outcome::Acquired(answer) => running.plan.acquired(&session, &answer),
            Outcome::Renewed(answer, until) => running.plan.renewed(&session, &answer, until),
            Outcome::Settled(class) => Some(running.plan.settled(&session, class)),
            Outcome::Stopped => return,
            Outcome::Panicked(what) => {
                self.failed(id, &what);
                return;
            }
        };
        match next {
            Some(action) => {
                if !self.act(id, action) {
                    self.advance(id);
                }
            }
            None => self.advance(id),
        }
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
            let (answer, _) = session.try_acquire(Wait::Unbounded).await;
            Outcome::Acquired(answer)
        }
        Call::Renew { until } => {
            let (answer, _) = session
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
