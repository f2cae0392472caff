//! One client's election: the [`Session`] that holds its state and hands its
//! events to every consumer, the campaign that drives it ([`campaign`]), and
//! the [`Leadership`] stream ([`stream`]).
//!
//! A client is one contender with one identity, so it has exactly one
//! election state. Every consumer (each [`Leadership`] stream, the callbacks
//! adapter, `is_leader()`, the terms) is a view of that state.
//!
//! The flow is one way: a call's answer (or the step-down timer's tick) is an
//! observation; [`Session::observe`] applies it to the pure state machine,
//! publishes the lease (the one deadline `is_leader()` and the terms read)
//! and returns the events, numbered, as an [`Applied`]; the task that
//! observed them then hands them to the session's [`Hub`], which fans them
//! out to every subscriber in the order they were applied. That task is the
//! connection's driver for everything the campaign and the step-down timer
//! observe, and the caller's for the API calls the application makes itself
//! (`try_acquire_lock()`, a release), whose events are so handed out before
//! the call returns or its request leaves. Subscriber queues are bounded:
//! transitions are kept, `Renewed` and `RpcFailed` coalesce
//! ([`crate::fanout`]).
//!
//! Where each rule lives: what an answer means, the deadline and every fence
//! in [`crate::state`]; retry timing and error classes in [`crate::backoff`];
//! what the campaign does next in [`campaign`]; the one task per connection
//! that runs every campaign and keeps every step-down timer in [`driver`];
//! callback ordering in [`crate::callbacks`].

mod backstop;
mod campaign;
mod driver;
mod set;
mod stream;

use std::marker::PhantomData;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::Poll;
use std::time::Duration;

use tokio::time::Instant;

use crate::admission::{Priority, Wait};
use crate::backoff::Backoff;
use crate::config::Timing;
use crate::error::{Error, Result};
use crate::event::{LeaderTerm, LeadershipEvent, LeaseOwner};
use crate::fanout::{EventReceiver, Hub};
use crate::observe::Observer;
use crate::rpc::{Answer, LeaseAnswer, Rpc};
use crate::state::{ElectionState, Observation};
use crate::sync::lock;

use backstop::Backstop;
pub(crate) use driver::Handle as DriverHandle;

pub use set::LeadershipSet;
pub use stream::Leadership;

/// How long stopping a campaign waits for the driver to let go of it.
const STOP_GRACE: Duration = Duration::from_secs(1);

/// One client's election: state, subscribers and its campaign (run by the
/// connection's driver).
#[derive(Debug)]
pub(crate) struct Session {
    /// This session, weakly: what the driver's timers and queue hold (they
    /// must not keep it alive).
    me: std::sync::Weak<Session>,
    pub(crate) rpc: Rpc,
    pub(crate) timing: Timing,
    shared: Mutex<Shared>,
    /// The subscribers, and the order events reach them.
    hub: Hub,
    control: Mutex<Control>,
    /// The published lease: the one deadline terms and readers see.
    lease: LeaseOwner,
    /// Retry timing, with its own RNG (not under the state lock).
    backoff: Mutex<Backoff>,
    /// The driver's part of this election (see [`driver::Slot`]).
    slot: Mutex<driver::Slot>,
    /// The driver that runs this election's campaign (none once it is
    /// stopped): it takes the reports of lease changes made outside it (see
    /// [`Session::poke`]).
    /// A leaf lock (taken under the state lock, never the other way).
    home: Mutex<Option<driver::Handle>>,
    /// The driver on the runtime of the callbacks adapter, if any: it keeps
    /// the step-down timer while no campaign runs (the loss at the deadline
    /// must reach the callbacks even if the runtime an imperative call was
    /// made on, or the campaign's, has shut down since).
    adapter: std::sync::OnceLock<driver::Handle>,
    /// The driver (its id; 0: none) that was told of a lease change made
    /// outside it and has not taken the report yet: no second report is
    /// sent to it meanwhile. A driver that died with the report unread (its
    /// runtime shut down) leaves its id here, which a new driver does not
    /// match: it is told.
    poke_pending: AtomicU64,
    /// Counts campaign stops: a call the campaign asked for before the
    /// latest stop is not sent.
    generation: AtomicU64,
    /// Logs, metrics and health counters (see [`crate::observe`]).
    pub(crate) observer: Observer,
    /// Test hook: the campaign panics at its next step.
    #[cfg(test)]
    pub(crate) inject_panic: std::sync::atomic::AtomicBool,
    /// Test hook: runs once, after an observation was applied and before
    /// its lease is published.
    #[cfg(test)]
    pub(crate) before_publish: Mutex<Option<TestHook>>,
}

/// A test's code, run by a [`Session`] test hook.
#[cfg(test)]
pub(crate) struct TestHook(pub(crate) Box<dyn FnOnce() + Send>);

#[cfg(test)]
impl std::fmt::Debug for TestHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TestHook")
    }
}

#[derive(Debug)]
struct Shared {
    election: ElectionState,
    /// The number of the last batch of events applied (see [`Applied`]).
    seq: u64,
}

/// The events of one observation, applied and numbered, on their way to
/// the subscribers: [`deliver`](Applied::deliver) hands them to the hub.
///
/// Dropping it delivers them too, so that no panic between applying and
/// delivering can leave a gap the later batches would wait behind for
/// ever. It is not `Send`: it cannot be held across an `await` in the
/// crate's (`Send`) futures, so events are always handed out before the
/// observing task waits for anything (a release's `Lost` before its request
/// leaves).
#[must_use = "the events reach the subscribers when it is delivered"]
pub(crate) struct Applied<'a> {
    session: &'a Session,
    batch: Option<(u64, Vec<LeadershipEvent>)>,
    /// The wake-ups of the lease's publish, run as this drops (outside the
    /// state lock: a waker may run the woken task at once, and that task
    /// may read the client).
    wake: Option<crate::event::LeaseWake<'a>>,
    _not_send: PhantomData<*const ()>,
}

impl Applied<'_> {
    /// The events.
    pub(crate) fn events(&self) -> &[LeadershipEvent] {
        self.batch.as_ref().map_or(&[], |(_, events)| events)
    }

    /// Hands the events to every subscriber, after those of every earlier
    /// observation (the work is done by `Drop`).
    pub(crate) fn deliver(self) {}
}

impl Drop for Applied<'_> {
    fn drop(&mut self) {
        // The term that ended is cancelled (and the lease's waiters woken)
        // before its `Lost` is handed out, and outside the state lock. A
        // wake-up that panics (the application's executor) must not keep
        // the batch from the hub: every later batch would wait for it.
        let wake = self.wake.take();
        let closer = wake.as_ref().is_some_and(|w| w.came_closer());
        let woken = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| drop(wake)));
        if let Some((seq, events)) = self.batch.take() {
            let observer = &self.session.observer;
            self.session
                .hub
                .deliver(seq, events, |events| observer.published(events));
        }
        if closer {
            // The running term ends sooner (a shorter lease was answered):
            // a subscriber that leaves `Renewed` out is not woken by the
            // renewal, yet its backstop may sleep to the old deadline.
            // Rare: a wake-up of every subscriber, without an event.
            self.session.hub.wake_all();
        }
        crate::sync::resume_panic(woken.err());
    }
}

#[derive(Debug, Default)]
struct Control {
    streams: usize,
    keep_alive: bool,
    campaign: Option<Campaign>,
}

/// A running campaign: the driver that runs it.
#[derive(Debug)]
struct Campaign {
    driver: driver::Handle,
    session: std::sync::Weak<Session>,
}

impl Campaign {
    /// Whether the driver running it is alive.
    fn is_running(&self) -> bool {
        self.driver.is_alive()
    }

    /// Sends the driver the stop of this campaign, now. Called under the
    /// control lock by [`Session::take_campaign`]: so a campaign started
    /// later (a stream re-created right after the last one was dropped) is
    /// started after this stop on the driver's queue, never stopped by it.
    fn stop(self) -> Stopping {
        Stopping {
            ack: self.driver.stop(self.session),
        }
    }
}

/// A campaign whose stop was sent to its driver: [`wait`](Self::wait) waits
/// until it can no longer touch the state.
#[derive(Debug)]
struct Stopping {
    ack: Option<tokio::sync::oneshot::Receiver<()>>,
}

impl Stopping {
    /// Waits (within [`STOP_GRACE`] for the driver and again for the call in
    /// flight) until the campaign can no longer touch the state. Campaign
    /// calls not sent yet are not sent after this returns (the session's
    /// generation moved on before the stop was sent).
    async fn wait(self) {
        let Some(ack) = self.ack else {
            return;
        };
        if tokio::runtime::Handle::try_current().is_err() || !crate::sync::has_timers() {
            return;
        }
        // Acknowledged once the call in flight, if any, is dropped (or the
        // driver is gone).
        if tokio::time::timeout(STOP_GRACE, ack).await.is_err() {
            tracing::warn!(
                "the campaign driver did not answer a stop within {STOP_GRACE:?}; \
                 its calls not yet sent will not be sent"
            );
        }
    }
}

impl Session {
    pub(crate) fn new(rpc: Rpc, timing: Timing, seed: Option<u64>) -> Arc<Self> {
        let lease = LeaseOwner::default();
        let lease_rx = lease.cell();
        let ttl = rpc.scope().ttl();
        let start = rpc.claim().start();
        let observer = Observer::new(rpc.scope(), rpc.span().clone());
        Arc::new_cyclic(|me| Session {
            me: me.clone(),
            rpc,
            timing,
            shared: Mutex::new(Shared {
                election: ElectionState::starting_at(ttl, timing.safety_margin, lease_rx, start),
                seq: 0,
            }),
            hub: Hub::default(),
            control: Mutex::new(Control::default()),
            lease,
            backoff: Mutex::new(Backoff::new(
                timing.retry_period,
                timing.renew_interval,
                seed,
            )),
            slot: Mutex::default(),
            home: Mutex::new(None),
            adapter: std::sync::OnceLock::new(),
            poke_pending: AtomicU64::new(0),
            generation: AtomicU64::new(0),
            observer,
            #[cfg(test)]
            inject_panic: std::sync::atomic::AtomicBool::new(false),
            #[cfg(test)]
            before_publish: Mutex::new(None),
        })
    }

    fn shared(&self) -> MutexGuard<'_, Shared> {
        lock(&self.shared)
    }

    fn control(&self) -> MutexGuard<'_, Control> {
        lock(&self.control)
    }

    pub(crate) fn backoff(&self) -> MutexGuard<'_, Backoff> {
        lock(&self.backoff)
    }

    /// Applies an observation to the state machine and publishes the lease
    /// (ending at once a term that left it: `is_leader()` and the terms
    /// never wait for the events). Returns the events, numbered, for the
    /// caller to [deliver](Applied::deliver).
    pub(crate) fn observe(&self, obs: Observation) -> Applied<'_> {
        self.observe_with(obs, |_| ()).0
    }

    /// [`observe`](Self::observe), also reading the state right after the
    /// observation, under the same lock.
    fn observe_with<R>(
        &self,
        obs: Observation,
        read: impl FnOnce(&mut ElectionState) -> R,
    ) -> (Applied<'_>, R) {
        let (applied, out) = {
            let mut shared = self.shared();
            self.observer.observed(&obs, Instant::now());
            // The lease's readers wait from before the instant the
            // observation is judged at until its outcome is published: a
            // renewal judged in time cannot extend a deadline a reader
            // already saw pass (the term would look ended, then go on).
            let held = self.lease.hold();
            let now = Instant::now();
            let events = shared.election.apply(obs, now);
            #[cfg(test)]
            if let Some(hook) = lock(&self.before_publish).take() {
                (hook.0)();
            }
            // Published and numbered before `read` runs: should it panic, the
            // lease still follows the state, and the events are delivered as
            // the `Applied` drops.
            let applied = self.applied_held(held, &mut shared, events);
            let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                read(&mut shared.election)
            }));
            (applied, out)
        };
        // The state lock is released: a panic's `Applied` drops (its
        // wake-ups and hand-out run) outside it, as it does otherwise.
        match out {
            Ok(out) => (applied, out),
            Err(panic) => {
                drop(applied);
                std::panic::resume_unwind(panic)
            }
        }
    }

    /// Publishes the lease the state now holds and numbers `events`. A
    /// deadline moved outside the driver is reported to it (it keeps the
    /// step-down timer and wakes a campaign waiting to renew).
    fn applied(&self, shared: &mut Shared, events: Vec<LeadershipEvent>) -> Applied<'_> {
        self.applied_held(self.lease.hold(), shared, events)
    }

    /// [`applied`](Self::applied), publishing through the cell `held`.
    fn applied_held<'a>(
        &'a self,
        held: crate::event::LeaseHold<'a>,
        shared: &mut Shared,
        events: Vec<LeadershipEvent>,
    ) -> Applied<'a> {
        let (moved, wake) = held.publish_then_wake(shared.election.view());
        if moved {
            self.poke();
        }
        let batch = (!events.is_empty()).then(|| {
            shared.seq += 1;
            (shared.seq, events)
        });
        Applied {
            session: self,
            batch,
            wake: Some(wake),
            _not_send: PhantomData,
        }
    }

    /// A new event receiver. Expiry is settled first (an expired term is
    /// reported lost to the existing subscribers, not snapshotted), then the
    /// receiver starts with the current state (`Elected` for a running term,
    /// `Follower` if known) and gets every batch applied after it, so that
    /// its view is consistent.
    pub(crate) fn subscribe(&self) -> EventReceiver {
        let (settled, rx) = {
            let mut shared = self.shared();
            let now = Instant::now();
            let events = shared.election.apply(Observation::Tick, now);
            let settled = self.applied(&mut shared, events);
            let first = shared.election.snapshot(now);
            // Under the state lock: no later batch can be handed out yet.
            let rx = self.hub.subscribe(shared.seq + 1, first);
            (settled, rx)
        };
        settled.deliver();
        rx
    }

    /// The events of the callbacks adapter, which runs on the current
    /// runtime: a subscriber's. The step-down timer is kept on this
    /// runtime's driver while no campaign runs (see [`Session::timer_driver`]).
    ///
    /// The adapter also keeps a [`Backstop`] on its own runtime.
    pub(crate) fn callback_events(
        self: &Arc<Self>,
    ) -> impl futures::Stream<Item = LeadershipEvent> + Send + 'static {
        if let Some(driver) = self.rpc.transport().driver() {
            let _ = self.adapter.set(driver);
        }
        let mut events = self.subscribe();
        // The callbacks have no renewal hook: a renewal need not wake them.
        events.skip_renewals();
        let session = Arc::downgrade(self);
        let mut backstop = Backstop::default();
        futures::stream::poll_fn(move |cx| loop {
            if let Poll::Ready(ev) = events.poll_recv(cx) {
                return Poll::Ready(ev);
            }
            let Some(session) = session.upgrade() else {
                return Poll::Pending;
            };
            if backstop.poll(&session, cx).is_pending() {
                return Poll::Pending;
            }
        })
    }

    pub(crate) fn is_leader(&self) -> bool {
        self.remaining().is_some()
    }

    /// The running term, if leader and not past its deadline.
    pub(crate) fn current_term(&self) -> Option<LeaderTerm> {
        match self.shared().election.snapshot(Instant::now()) {
            Some(LeadershipEvent::Elected { term, .. }) => Some(term),
            _ => None,
        }
    }

    /// Time left before the published deadline, if leader and not past it.
    pub(crate) fn remaining(&self) -> Option<Duration> {
        let now = Instant::now();
        self.lease
            .deadline()
            .filter(|d| now < *d)
            .map(|d| d.duration_since(now))
    }

    /// The published deadline, if leader (passed or not).
    pub(crate) fn published_deadline(&self) -> Option<Instant> {
        self.lease.deadline()
    }

    /// Reads the driver that keeps the step-down timer (and the campaign,
    /// if one runs), without copying its handle: the campaign's, while its
    /// runtime runs; else the one on the callbacks adapter's runtime (where
    /// the loss must be reported). `None` if neither is alive.
    fn with_timer_driver<T>(&self, read: impl FnOnce(&driver::Handle) -> T) -> Option<T> {
        let home = lock(&self.home);
        match home.as_ref().filter(|d| d.is_alive()) {
            Some(driver) => Some(read(driver)),
            None => self.adapter.get().filter(|d| d.is_alive()).map(read),
        }
    }

    /// The driver that keeps the step-down timer (see
    /// [`with_timer_driver`](Self::with_timer_driver)), else `fallback`.
    fn timer_driver(
        &self,
        fallback: impl FnOnce() -> Option<driver::Handle>,
    ) -> Option<driver::Handle> {
        self.with_timer_driver(driver::Handle::clone)
            .or_else(fallback)
    }

    /// Whether the driver that keeps the step-down timer (none is started
    /// here) runs on `runtime` (the caller's).
    ///
    /// `true` only if that driver also keeps the timer now (records the
    /// slot): a driver is chosen for the next report, but the timer moves
    /// only when it reads one, and a stopped campaign's driver keeps it
    /// until then (perhaps on a runtime left idle). A wrong `true` would
    /// leave the consumer without the loss; a wrong `false` costs one
    /// spurious backstop tick.
    fn timer_driver_runs_on(&self, runtime: tokio::runtime::Id) -> bool {
        // Once per event a consumer reads: no handle is copied.
        let chosen = self
            .with_timer_driver(|d| (d.runtime() == runtime).then(|| d.id()))
            .flatten();
        chosen.is_some_and(|id| self.slot_driver() == id)
    }

    /// Tells the driver that the lease changed, unless the driver (or a call
    /// it runs) made the change, or a report is already pending.
    fn poke(&self) {
        // A change the timer's driver made itself (every renewal) returns
        // here, without copying a handle.
        if self.with_timer_driver(driver::Handle::is_current) == Some(true) {
            return;
        }
        // A driver that dies between the choice and the send is passed
        // over the next time round (it no longer counts as live).
        for _ in 0..3 {
            let Some(driver) = self.timer_driver(|| self.rpc.transport().driver()) else {
                return;
            };
            if driver.is_current() || self.poke_to(&driver) {
                return;
            }
        }
    }

    /// Sends `driver` a report of a lease change, unless one is pending.
    /// `false` if the driver is gone.
    fn poke_to(&self, driver: &driver::Handle) -> bool {
        if self.poke_pending.swap(driver.id(), Ordering::SeqCst) == driver.id()
            || driver.poke(self.me.clone())
        {
            return true;
        }
        self.poke_taken(driver.id());
        false
    }

    /// The driver that kept this session's step-down timer is gone (its
    /// runtime shut down): a live one takes it over, so that the loss at
    /// the deadline is still reported (it re-reads the published lease).
    /// Called while the dead driver is dropped, perhaps outside any
    /// runtime: it starts no driver. Every subscriber is woken too: a
    /// stream waiting for its next event is polled again, which revives
    /// its campaign on its own runtime (when no live driver takes the
    /// timer over, nothing else would).
    fn timer_lost(&self) {
        for _ in 0..3 {
            match self.timer_driver(|| self.rpc.transport().live_driver()) {
                Some(driver) if !self.poke_to(&driver) => continue,
                _ => break,
            }
        }
        self.hub.wake_all();
    }

    /// Driver `driver` took this session's pending report.
    fn poke_taken(&self, driver: u64) {
        let _ = self
            .poke_pending
            .compare_exchange(driver, 0, Ordering::SeqCst, Ordering::SeqCst);
    }

    /// The generation campaign calls are made under (see `generation`).
    fn campaign_generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }

    // ----- the three calls, observed -----

    /// One `TryAcquireLock` call under the current identity, observed;
    /// `wait` bounds its wait for a free call slot on the connection.
    /// A leader's (or a granted candidate's) acquire renews a lease at
    /// stake: it waits ahead of followers' attempts.
    pub(crate) async fn try_acquire(&self, wait: Wait) -> Answer<bool> {
        let (incarnation, priority) = {
            let mut shared = self.shared();
            let state = &mut shared.election;
            let leading = state.deadline().is_some() || state.is_granted();
            let priority = if leading {
                Priority::Urgent
            } else {
                Priority::Normal
            };
            (state.acquire_sent(), priority)
        };
        let answer = self
            .rpc
            .try_acquire(incarnation, self.timing.rpc_timeout, wait, priority)
            .await;
        self.observe(answer.observation()).deliver();
        answer
    }

    /// One `KeepAlive` call under the current identity, observed;
    /// `wait` bounds its wait for a free call slot on the connection.
    pub(crate) async fn keep_alive(&self, timeout: Duration, wait: Wait) -> Answer<LeaseAnswer> {
        let incarnation = self.shared().election.incarnation();
        let answer = self.rpc.keep_alive(incarnation, timeout, wait).await;
        self.observe(answer.observation()).deliver();
        answer
    }

    /// Steps down locally (the term ends and `Lost { Released }` is published
    /// before the request leaves), then asks the server to delete the lock.
    /// Safe and idempotent when not leader. If the release's outcome is
    /// unknown (it fails, times out, is retried or this future is dropped),
    /// the state machine retires the identity it was sent under.
    pub(crate) async fn release(&self) -> Result<()> {
        let (lost, (incarnation, acquires_before)) = self
            .observe_with(Observation::ReleaseStarted, |s| {
                (s.incarnation(), s.acquires_sent())
            });
        // Made first: however this ends, the release is over (or no grant
        // would ever count again).
        let mut done = ReleaseDone {
            session: self,
            incarnation,
            acquires_before,
            settled: false,
        };
        // Before the request leaves. A hand-out that panics (a wake-up or
        // the hook run the application's code) still hands the `Lost` out,
        // and must not keep the lock held until its TTL: the panic is
        // resumed once the release is answered.
        let delivered = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| lost.deliver()));
        // One RPC timeout for the whole release, its wait for a call slot
        // included: `shutdown()` and a drop promise about one second (to
        // stop the campaign) plus the RPC timeout, and a release queued
        // behind slow calls must not take twice that.
        let end = crate::time::after(Instant::now(), self.timing.rpc_timeout);
        let answer = self
            .rpc
            .release(incarnation, self.timing.rpc_timeout, Wait::Until(end))
            .await;
        done.settled = answer.result.is_ok() && answer.attempts == 1;
        if !done.settled {
            tracing::debug!(
                incarnation,
                attempts = answer.attempts,
                "release outcome unknown: the next requests go out under a fresh identity"
            );
        }
        crate::sync::resume_panic(delivered.err());
        answer.result.map_err(Error::Rpc)
    }

    /// After an acquire whose outcome is unknown, while not leading: the
    /// server may hold the lock for us without our knowing; release it so
    /// that nobody waits a whole TTL for a lock held for no one.
    pub(crate) async fn settle_unknown_acquire(&self) {
        if self.holds_lock() {
            return;
        }
        if let Err(e) = self.release().await {
            tracing::debug!(error = %e, "releasing a possibly granted lock failed");
        }
    }

    // ----- who wants the campaign to run -----

    /// Starts the campaign on the connection's driver if it is not running.
    /// Needs a Tokio runtime. `Ok(true)` if it started one: the caller then
    /// calls [`campaign_moved`](Self::campaign_moved) once it holds no lock.
    fn ensure_campaign(self: &Arc<Self>, control: &mut Control) -> Result<bool> {
        if self.rpc.acquiring_stopped() {
            return Err(Error::Shutdown);
        }
        if control.campaign.as_ref().is_some_and(Campaign::is_running) {
            return Ok(false);
        }
        crate::sync::runtime()?;
        let driver = self.rpc.transport().driver().ok_or(Error::NoRuntime)?;
        if !driver.start(self.clone()) {
            return Err(Error::NoRuntime);
        }
        self.observer.campaign_started(Instant::now());
        *lock(&self.home) = Some(driver.clone());
        control.campaign = Some(Campaign {
            driver,
            session: self.me.clone(),
        });
        Ok(true)
    }

    /// A campaign was started (perhaps on another runtime than the one that
    /// kept the step-down timer, with no transition to tell of it): every
    /// subscriber is woken, without an event, so that one that leaves
    /// `Renewed` out (the callbacks, a quiet stream) looks again at which
    /// runtime keeps the timer and arms its backstop if it is not its own.
    /// Its renewals would not wake it, and that runtime may be left idle.
    /// Called outside the control lock (a wake-up runs the application's
    /// executor code).
    fn campaign_moved(&self) {
        self.hub.wake_all();
    }

    /// Takes the running campaign out of `control`, so that none of its calls
    /// not yet sent goes out any more, and sends its stop (under the control
    /// lock: ordered before any later start); the caller waits for it.
    fn take_campaign(&self, control: &mut Control) -> Option<Stopping> {
        let campaign = control.campaign.take()?;
        self.generation.fetch_add(1, Ordering::SeqCst);
        // Lease changes from now on go to the callbacks' runtime's driver
        // (else the caller's), not to one that may sit idle.
        *lock(&self.home) = None;
        Some(campaign.stop())
    }

    /// If nobody wants the campaign any more: stopping it and releasing.
    fn shutdown_if_idle(self: &Arc<Self>, control: &mut Control) -> Option<Shutdown> {
        if control.streams > 0 || control.keep_alive {
            return None;
        }
        Some(Shutdown {
            session: self.clone(),
            campaign: self.take_campaign(control),
            close: false,
        })
    }

    pub(crate) fn add_stream(self: &Arc<Self>) -> Result<()> {
        let started = {
            let mut control = self.control();
            control.streams += 1;
            let started = self.ensure_campaign(&mut control);
            if started.is_err() {
                control.streams -= 1;
            }
            started
        };
        if started? {
            self.campaign_moved();
        }
        Ok(())
    }

    /// A stream went away. If it was the last one wanting the campaign, the
    /// returned [`Shutdown`] stops the campaign and releases the lock.
    pub(crate) fn remove_stream(self: &Arc<Self>) -> Option<Shutdown> {
        let mut control = self.control();
        control.streams = control.streams.saturating_sub(1);
        self.shutdown_if_idle(&mut control)
    }

    pub(crate) fn start_keep_alive(self: &Arc<Self>) -> Result<()> {
        let started = {
            let mut control = self.control();
            // A keep-alive whose driver died with its runtime is not running:
            // it starts again here.
            if control.keep_alive && control.campaign.as_ref().is_some_and(Campaign::is_running) {
                return Err(Error::KeepAliveAlreadyRunning);
            }
            let started = self.ensure_campaign(&mut control)?;
            control.keep_alive = true;
            started
        };
        if started {
            self.campaign_moved();
        }
        Ok(())
    }

    /// A campaign still wanted whose driver is gone (its runtime shut down
    /// while a stream or the keep-alive still wanted it) starts again on
    /// this runtime's driver, which settles the expired term (`Lost`) and
    /// campaigns on. Nothing to do if it runs, nobody wants it, or outside
    /// a runtime.
    pub(crate) fn revive_campaign(self: &Arc<Self>) {
        let started = {
            let mut control = self.control();
            let dead = control.campaign.as_ref().is_some_and(|c| !c.is_running());
            if !dead || (control.streams == 0 && !control.keep_alive) {
                return;
            }
            self.ensure_campaign(&mut control)
        };
        match started {
            Ok(started) => {
                tracing::debug!("the campaign's driver was gone; campaigning on this runtime");
                if started {
                    self.campaign_moved();
                }
            }
            Err(e) => tracing::debug!(error = %e, "cannot restart the campaign"),
        }
    }

    /// Stops the keep-alive task (unless streams still want the campaign).
    /// Does not release: the lease runs out by itself.
    pub(crate) async fn stop_keep_alive(&self) {
        let campaign = {
            let mut control = self.control();
            control.keep_alive = false;
            if control.streams == 0 {
                self.take_campaign(&mut control)
            } else {
                None
            }
        };
        if let Some(c) = campaign {
            c.wait().await;
        }
    }

    pub(crate) fn keep_alive_running(&self) -> bool {
        self.control().keep_alive
    }

    /// `Err(Error::Shutdown)` once [`close`](Self::close) was called.
    pub(crate) fn check_open(&self) -> Result<()> {
        // The call layer's flag is the one record of a shutdown: set under
        // the control lock, so a campaign started under it sees it too.
        if self.rpc.acquiring_stopped() {
            return Err(Error::Shutdown);
        }
        Ok(())
    }

    /// Shuts the contender down for good: no stream, keep-alive task or call
    /// campaigns again. The returned [`Shutdown`] stops the campaign,
    /// releases the lock and then ends every stream and the callbacks.
    pub(crate) fn close(self: &Arc<Self>) -> Shutdown {
        let mut control = self.control();
        // From now on nothing campaigns, and an acquire still waiting for a
        // call slot must not go out after the release that follows.
        self.rpc.stop_acquiring();
        control.keep_alive = false;
        Shutdown {
            session: self.clone(),
            campaign: self.take_campaign(&mut control),
            close: true,
        }
    }

    /// Ends every subscriber (streams end after the events they hold, the
    /// callbacks adapter after its last callback).
    fn close_subscribers(&self) {
        let applied = self.shared().seq;
        self.hub.close(applied);
    }

    /// Leader or granted: the server holds (or was just asked for) the lock
    /// for us. A drop waits for the release only then: a follower's drop
    /// releases in the background, as the lock it may hold is at most one
    /// unanswered acquire.
    fn holds_lock(&self) -> bool {
        let shared = self.shared();
        shared.election.deadline().is_some() || shared.election.is_granted()
    }

    /// A health snapshot (see [`crate::health`]).
    pub(crate) fn health(&self) -> crate::health::Health {
        let (campaign_wanted, campaign_running) = {
            let control = self.control();
            let running = control.campaign.as_ref().is_some_and(Campaign::is_running);
            (control.streams > 0 || control.keep_alive, running)
        };
        let inputs = crate::health::Inputs {
            lease_remaining: self.remaining(),
            campaign_wanted,
            campaign_running,
            timing: self.timing,
        };
        crate::health::snapshot(&self.observer.stats(), inputs, Instant::now())
    }

    /// The last client handle is gone: the keep-alive task stops, and if no
    /// stream still campaigns the returned [`Shutdown`] stops the campaign and
    /// releases the lock.
    pub(crate) fn client_dropped(self: &Arc<Self>) -> Option<Shutdown> {
        let mut control = self.control();
        control.keep_alive = false;
        self.shutdown_if_idle(&mut control)
    }

    /// `false` when the server cannot hold a lock for our identity.
    fn may_own_lock(&self) -> bool {
        self.shared().election.may_own_lock()
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        // The claim on this lock and identity is given back right after:
        // tell it whether a later client may reuse the bare client id.
        if self.shared().election.leaves_bare_id_unsafe() {
            self.rpc.claim().retire_bare_id();
        }
    }
}

/// Tells the state machine that a release request is over, however the
/// release future ends (answered, failed, or dropped mid-flight).
struct ReleaseDone<'a> {
    session: &'a Session,
    incarnation: u32,
    acquires_before: u64,
    settled: bool,
}

impl Drop for ReleaseDone<'_> {
    fn drop(&mut self) {
        self.session
            .observe(Observation::ReleaseDone {
                at: Instant::now(),
                incarnation: self.incarnation,
                settled: self.settled,
                acquires_before: self.acquires_before,
            })
            .deliver();
    }
}

/// Stopping the campaign and releasing the lock, in that order (the campaign
/// must be unable to re-acquire before the release is sent).
#[derive(Debug)]
#[must_use]
pub(crate) struct Shutdown {
    session: Arc<Session>,
    campaign: Option<Stopping>,
    /// `shutdown()`: also end every stream and the callbacks afterwards.
    close: bool,
}

impl Shutdown {
    /// Stops the campaign (within [`STOP_GRACE`]), then releases if the
    /// server may hold the lock for us (within the RPC timeout).
    pub(crate) async fn run(self) -> Result<()> {
        let Shutdown {
            session,
            campaign,
            close,
        } = self;
        if let Some(c) = campaign {
            c.wait().await;
        }
        let released = if session.may_own_lock() {
            session.release().await
        } else {
            Ok(())
        };
        if close {
            session.close_subscribers();
        }
        released
    }

    /// [`run`](Self::run), logging a failure instead of returning it.
    async fn run_logged(self) {
        if let Err(e) = self.run().await {
            tracing::warn!(error = %e, "release on shutdown failed; the lock expires after its TTL");
        }
    }

    /// For `Drop` impls, which cannot await. While this client holds the
    /// lock, on a multi-thread runtime, the release completes before the drop
    /// returns (the dropping task blocks, through `block_in_place`, for one
    /// release round trip, at most the RPC timeout): so dropping the client
    /// at the end of `main` releases before the runtime shuts down. Otherwise
    /// (a follower, or a current-thread runtime, which cannot block without
    /// stalling the connection it needs) the release runs in a spawned task,
    /// which completes only if the runtime keeps running. Outside a runtime
    /// the term ends locally and the lock expires after its TTL.
    pub(crate) fn run_on_drop(self) {
        Self::run_all_on_drop(vec![self]);
    }

    /// [`run_on_drop`](Self::run_on_drop) for many clients' shutdowns at
    /// once (a [`LeadershipSet`] dropped): their releases go out together,
    /// through the connection's admission queue, and the drop waits (if it
    /// waits) for all of those holding a lock within one bound, not one
    /// bound each; the others release in the background.
    pub(crate) fn run_all_on_drop(shutdowns: Vec<Shutdown>) {
        if shutdowns.is_empty() {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            // Each one steps down; a hand-out that panics does not keep the
            // others from it.
            let mut panic = None;
            for shutdown in shutdowns {
                let stepped =
                    std::panic::catch_unwind(AssertUnwindSafe(|| shutdown.without_runtime()));
                if let Err(p) = stepped {
                    panic.get_or_insert(p);
                }
            }
            crate::sync::resume_panic(panic);
            return;
        };
        let (shutdowns, followers): (Vec<_>, Vec<_>) =
            shutdowns.into_iter().partition(|s| s.session.holds_lock());
        if !followers.is_empty() {
            // As a follower's own drop does: released in the background
            // (a lock it may hold is at most one unanswered acquire), not
            // holding up the leaders' drop for a server that hangs.
            runtime.spawn(run_all_logged(followers));
        }
        if shutdowns.is_empty() {
            return;
        }
        if runtime.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread {
            let rpc_timeout = shutdowns
                .iter()
                .map(|s| s.session.timing.rpc_timeout)
                .max()
                .unwrap_or_default();
            let bound = STOP_GRACE.saturating_add(rpc_timeout);
            if cfg!(panic = "unwind") {
                block_in_place(shutdowns, &runtime, bound);
            } else if runtime.metrics().num_workers() < 2 {
                // Without `block_in_place`, blocking the one worker would
                // stall the very tasks the release needs.
                runtime.spawn(run_all_logged(shutdowns));
            } else {
                // `block_in_place` panics inside a `LocalSet`, and a panic
                // here would abort the process: wait for another thread.
                let (done, finished) = std::sync::mpsc::channel::<()>();
                let helper = runtime.clone();
                // Kept here too, so that a thread that cannot start does
                // not take the shutdowns (and the campaigns they must stop)
                // away.
                let slot = Arc::new(Mutex::new(Some(shutdowns)));
                let theirs = slot.clone();
                let spawned = std::thread::Builder::new()
                    .name("quorum-quest-exit".into())
                    .spawn(move || {
                        let taken = lock(&theirs).take();
                        if let Some(shutdowns) = taken {
                            block_on_bounded(&helper, shutdowns, bound);
                        }
                        let _ = done.send(());
                    });
                match spawned {
                    Ok(_) => {
                        let _ = finished.recv_timeout(bound.saturating_add(STOP_GRACE));
                    }
                    Err(_) => {
                        let taken = lock(&slot).take();
                        if let Some(shutdowns) = taken {
                            runtime.spawn(run_all_logged(shutdowns));
                        }
                    }
                }
            }
            return;
        }
        runtime.spawn(run_all_logged(shutdowns));
    }

    /// Dropped outside a Tokio runtime: stop the campaign and step down
    /// locally without a release call (the lock then expires after its TTL).
    fn without_runtime(self) {
        // The campaign's stop was sent when the shutdown was made.
        drop(self.campaign);
        let (lost, incarnation) = self
            .session
            .observe_with(Observation::ReleaseStarted, |s| s.incarnation());
        let leading = !lost.events().is_empty();
        // A hand-out that panics (a wake-up or the hook run the application's
        // code) must not leave the release in flight for ever: no grant
        // would ever count again.
        let delivered = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| lost.deliver()));
        // No request is sent, so this "release" is over at once, and no copy
        // of it can reach the server later; it released nothing, so it says
        // nothing about what the server holds.
        self.session
            .observe(Observation::ReleaseDone {
                at: Instant::now(),
                incarnation,
                settled: true,
                acquires_before: 0,
            })
            .deliver();
        if leading {
            tracing::warn!("dropped outside a Tokio runtime while leader: cannot release; the lock expires after its TTL");
        }
        crate::sync::resume_panic(delivered.err());
    }
}

/// [`Shutdown::run_logged`] for each of `shutdowns`, at once.
async fn run_all_logged(shutdowns: Vec<Shutdown>) {
    join_unwinding(shutdowns.into_iter().map(Shutdown::run_logged)).await;
}

/// [`Shutdown::run`] for each of `shutdowns`, at once; the first failure.
/// One that panics (a hand-out's panic, resumed once its release was
/// answered) does not drop the others' releases in flight: the panic is
/// resumed once all of them are over.
pub(crate) async fn run_all(shutdowns: Vec<Shutdown>) -> Result<()> {
    join_unwinding(shutdowns.into_iter().map(Shutdown::run))
        .await
        .into_iter()
        .collect()
}

/// Awaits every one of `futures` to its end, even if some panic; then
/// resumes the first panic, if any, or returns their outputs in order.
async fn join_unwinding<F: std::future::Future>(
    futures: impl IntoIterator<Item = F>,
) -> Vec<F::Output> {
    let ran = futures::future::join_all(
        futures
            .into_iter()
            .map(|f| futures::FutureExt::catch_unwind(AssertUnwindSafe(f))),
    )
    .await;
    let mut panic = None;
    let mut outputs = Vec::with_capacity(ran.len());
    for r in ran {
        match r {
            Ok(output) => outputs.push(output),
            Err(p) => {
                panic.get_or_insert(p);
            }
        }
    }
    crate::sync::resume_panic(panic);
    outputs
}

/// Waits for `shutdowns` to [`run`](Shutdown::run) with `block_in_place`;
/// where that is not allowed (inside a `LocalSet`), stops the campaigns and
/// releases in the background instead.
fn block_in_place(shutdowns: Vec<Shutdown>, runtime: &tokio::runtime::Handle, bound: Duration) {
    let again: Vec<(Arc<Session>, bool)> = shutdowns
        .iter()
        .map(|s| (s.session.clone(), s.close))
        .collect();
    // The campaigns' stops were sent when the shutdowns were made.
    let block = std::panic::catch_unwind(AssertUnwindSafe(|| {
        tokio::task::block_in_place(|| block_on_bounded(runtime, shutdowns, bound))
    }));
    if block.is_ok() {
        return;
    }
    tracing::debug!("cannot block to release on drop; releasing in the background");
    let retry = again
        .into_iter()
        .map(|(session, close)| Shutdown {
            session,
            campaign: None,
            close,
        })
        .collect();
    runtime.spawn(run_all_logged(retry));
}

/// Runs `shutdowns` on `runtime` from a thread allowed to block, for at most
/// `bound`. The bound is kept by a plain thread, not by the runtime's timer:
/// when the drop happens while the runtime shuts down, its timer and tasks
/// are no longer driven, and only a wake-up from outside ends the wait. That
/// thread ends as soon as the work does (many drops in a row must not leave
/// one sleeping thread each). If it cannot be started, the shutdown runs in
/// the background instead (never dropped unrun: its campaign must stop).
fn block_on_bounded(runtime: &tokio::runtime::Handle, shutdowns: Vec<Shutdown>, bound: Duration) {
    let (expired, deadline) = futures::channel::oneshot::channel::<()>();
    let (finished, wait) = std::sync::mpsc::channel::<()>();
    let timer = std::thread::Builder::new()
        .name("quorum-quest-exit".into())
        .spawn(move || {
            // Woken early (disconnected) when the work is over.
            if let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = wait.recv_timeout(bound) {
                let _ = expired.send(());
            }
        });
    if timer.is_err() {
        tracing::warn!(
            "cannot start a thread to bound the release on drop; releasing in the background"
        );
        runtime.spawn(run_all_logged(shutdowns));
        return;
    }
    runtime.block_on(async {
        let work = async {
            // A runtime that shuts down cancels new tasks at once: then
            // nothing drives the connection, and waiting would only delay
            // the exit. (If the shutdown begins just after this probe was
            // queued, the probe may never run nor be cancelled: the bound
            // below covers it too.)
            if runtime.spawn(async {}).await.is_err() {
                tracing::warn!("dropped while the runtime shuts down: cannot release; the lock expires after its TTL");
                return;
            }
            run_all_logged(shutdowns).await;
        };
        futures::pin_mut!(work);
        if let futures::future::Either::Right(_) = futures::future::select(work, deadline).await {
            tracing::warn!(?bound, "the release on drop did not finish in time; the lock expires after its TTL");
        }
    });
    drop(finished);
}

#[cfg(all(test, feature = "testing"))]
mod tests;
