//! The campaign: an `async-stream` generator that loops try-acquire /
//! keep-alive / wait around the pure state machine, and the [`Session`] that
//! holds one client's election state and hands its events to every consumer.
//!
//! A client is one contender with one identity, so it has exactly one
//! election state. Every consumer (each [`Leadership`] stream, the callbacks
//! adapter, `is_leader()`) is a view of that state. The campaign runs while
//! someone wants it (a live stream or `start_keep_alive`), one at a time.
//! Events are published to subscribers under the state lock, so all of them
//! see the same sequence in the same order, whichever task caused it.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::{Stream, StreamExt};
use tokio::sync::{mpsc, Notify};
use tokio::task::JoinHandle;
use tokio::time::{sleep, sleep_until, Instant};
use tokio_util::sync::CancellationToken;

use crate::config::Timing;
use crate::error::{Error, Result};
use crate::event::LeadershipEvent;
use crate::rpc::{Answer, Rpc};
use crate::state::{ElectionState, Observation};

/// First retry delay after a failed call; doubles per consecutive failure.
const BACKOFF_BASE: Duration = Duration::from_millis(100);
/// Never retry faster than this, even with little lease left.
const MIN_RETRY: Duration = Duration::from_millis(10);
/// How long stopping waits for the campaign task before aborting it.
const STOP_GRACE: Duration = Duration::from_secs(1);

/// One client's election: state, subscribers and the campaign task.
#[derive(Debug)]
pub(crate) struct Session {
    pub(crate) rpc: Rpc,
    pub(crate) timing: Timing,
    shared: Mutex<Shared>,
    control: Mutex<Control>,
    /// Woken on every state change (for the expiry watchdog).
    changed: Arc<Notify>,
    /// `TryAcquireLock` calls sent so far.
    acquires_sent: AtomicU64,
    /// The value of `acquires_sent` when the last successful release started.
    released_after: AtomicU64,
}

#[derive(Debug)]
struct Shared {
    election: ElectionState,
    subscribers: Vec<mpsc::UnboundedSender<LeadershipEvent>>,
    rng: fastrand::Rng,
}

#[derive(Debug, Default)]
struct Control {
    streams: usize,
    keep_alive: bool,
    campaign: Option<Campaign>,
}

#[derive(Debug)]
struct Campaign {
    stop: CancellationToken,
    task: JoinHandle<()>,
}

impl Campaign {
    /// Stops the task and waits until it can no longer touch the state.
    async fn stop(mut self) {
        self.stop.cancel();
        if tokio::time::timeout(STOP_GRACE, &mut self.task)
            .await
            .is_err()
        {
            tracing::warn!("campaign task did not stop within {STOP_GRACE:?}; aborting it");
            self.task.abort();
            let _ = (&mut self.task).await;
        }
    }
}

impl Session {
    pub(crate) fn new(rpc: Rpc, timing: Timing, seed: Option<u64>) -> Arc<Self> {
        Arc::new(Session {
            rpc,
            timing,
            shared: Mutex::new(Shared {
                election: ElectionState::new(timing.safety_margin),
                subscribers: Vec::new(),
                rng: seed.map_or_else(fastrand::Rng::new, fastrand::Rng::with_seed),
            }),
            control: Mutex::new(Control::default()),
            changed: Arc::new(Notify::new()),
            acquires_sent: AtomicU64::new(0),
            released_after: AtomicU64::new(0),
        })
    }

    fn shared(&self) -> MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn control(&self) -> MutexGuard<'_, Control> {
        self.control.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Applies an observation and publishes the resulting events to every
    /// subscriber before anyone else can apply the next one.
    pub(crate) fn observe(&self, obs: Observation) -> Vec<LeadershipEvent> {
        let mut shared = self.shared();
        let events = shared.election.apply(obs, Instant::now());
        if !events.is_empty() {
            shared
                .subscribers
                .retain(|tx| events.iter().all(|ev| tx.send(ev.clone()).is_ok()));
            self.changed.notify_waiters();
        }
        events
    }

    /// A new event receiver, starting with the current state (`Elected` for a
    /// running term, `Follower` if known) so that its view is consistent.
    pub(crate) fn subscribe(&self) -> mpsc::UnboundedReceiver<LeadershipEvent> {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut shared = self.shared();
        if let Some(ev) = shared.election.snapshot(Instant::now()) {
            let _ = tx.send(ev);
        }
        shared.subscribers.push(tx);
        rx
    }

    pub(crate) fn deadline(&self) -> Option<Instant> {
        self.shared().election.deadline()
    }

    pub(crate) fn is_leader(&self) -> bool {
        self.shared().election.is_leader(Instant::now())
    }

    pub(crate) fn remaining(&self) -> Option<Duration> {
        self.shared().election.remaining(Instant::now())
    }

    /// A follower's wait: the retry period ±20 %.
    fn jittered(&self, period: Duration) -> Duration {
        period.mul_f64(0.8 + 0.4 * self.shared().rng.f64())
    }

    /// Exponential backoff with jitter ("equal jitter": between half and all
    /// of the step), capped at `cap`.
    fn backoff(&self, failures: u32, cap: Duration) -> Duration {
        let step = BACKOFF_BASE
            .saturating_mul(1u32 << failures.saturating_sub(1).min(16))
            .min(cap);
        let half = step / 2;
        (half + half.mul_f64(self.shared().rng.f64())).max(MIN_RETRY)
    }

    // ----- who wants the campaign to run -----

    /// Starts the campaign task if it is not running. Needs a Tokio runtime.
    fn ensure_campaign(self: &Arc<Self>, control: &mut Control) -> Result<()> {
        if control
            .campaign
            .as_ref()
            .is_some_and(|c| !c.task.is_finished())
        {
            return Ok(());
        }
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| {
            Error::InvalidParameter(
                "runtime: the campaign must be started inside a Tokio runtime".into(),
            )
        })?;
        let stop = CancellationToken::new();
        let events = campaign(self.clone(), stop.clone());
        let task = runtime.spawn(async move {
            futures::pin_mut!(events);
            while let Some(ev) = events.next().await {
                tracing::debug!(event = ?ev, "leadership event");
            }
        });
        control.campaign = Some(Campaign { stop, task });
        Ok(())
    }

    /// If nobody wants the campaign any more: stopping it and releasing.
    fn shutdown_if_idle(self: &Arc<Self>, control: &mut Control) -> Option<Shutdown> {
        if control.streams > 0 || control.keep_alive {
            return None;
        }
        Some(Shutdown {
            session: self.clone(),
            campaign: control.campaign.take(),
        })
    }

    /// The campaign, if nobody wants it any more.
    fn idle_campaign(control: &mut Control) -> Option<Campaign> {
        if control.streams == 0 && !control.keep_alive {
            control.campaign.take()
        } else {
            None
        }
    }

    pub(crate) fn add_stream(self: &Arc<Self>) -> Result<()> {
        let mut control = self.control();
        control.streams += 1;
        let started = self.ensure_campaign(&mut control);
        if started.is_err() {
            control.streams -= 1;
        }
        started
    }

    /// A stream went away. If it was the last one wanting the campaign, the
    /// returned [`Shutdown`] stops the campaign and releases the lock.
    pub(crate) fn remove_stream(self: &Arc<Self>) -> Option<Shutdown> {
        let mut control = self.control();
        control.streams = control.streams.saturating_sub(1);
        self.shutdown_if_idle(&mut control)
    }

    pub(crate) fn start_keep_alive(self: &Arc<Self>) -> Result<()> {
        let mut control = self.control();
        if control.keep_alive {
            return Err(Error::KeepAliveAlreadyRunning);
        }
        self.ensure_campaign(&mut control)?;
        control.keep_alive = true;
        Ok(())
    }

    /// Stops the keep-alive task (unless streams still want the campaign).
    /// Does not release: the lease runs out by itself.
    pub(crate) async fn stop_keep_alive(&self) {
        let campaign = {
            let mut control = self.control();
            control.keep_alive = false;
            Self::idle_campaign(&mut control)
        };
        if let Some(c) = campaign {
            c.stop().await;
        }
    }

    pub(crate) fn keep_alive_running(&self) -> bool {
        self.control().keep_alive
    }

    /// Steps down locally (the term ends and `Lost { Released }` is published
    /// before the request leaves), then asks the server to delete the lock.
    /// Safe and idempotent when not leader.
    pub(crate) async fn release(&self) -> Result<()> {
        self.observe(Observation::Released);
        // Marks the release as over however this future ends (even dropped).
        let _done = ReleaseDone(self);
        let acquires_before = self.acquires_sent.load(Ordering::SeqCst);
        let result = self
            .rpc
            .release(self.timing.rpc_timeout)
            .await
            .map_err(Error::Rpc);
        if result.is_ok() {
            self.released_after
                .fetch_max(acquires_before, Ordering::SeqCst);
        }
        result
    }

    /// One `TryAcquireLock` call, counted so that a shutdown knows whether
    /// the server may hold a lock for us.
    pub(crate) async fn try_acquire(&self, timeout: Duration) -> Answer<bool> {
        self.acquires_sent.fetch_add(1, Ordering::SeqCst);
        self.rpc.try_acquire(timeout).await
    }

    /// `false` when the server cannot hold a lock for us: not leader, and no
    /// acquire was sent since the last successful release (or ever).
    fn may_own_lock(&self) -> bool {
        self.deadline().is_some()
            || self.acquires_sent.load(Ordering::SeqCst)
                > self.released_after.load(Ordering::SeqCst)
    }

    /// The last client handle is gone: the keep-alive task stops, and if no
    /// stream still campaigns the returned [`Shutdown`] stops the campaign and
    /// releases the lock.
    pub(crate) fn client_dropped(self: &Arc<Self>) -> Option<Shutdown> {
        let mut control = self.control();
        control.keep_alive = false;
        self.shutdown_if_idle(&mut control)
    }

    /// Spawns a task that reports expiry at the deadline even when no campaign
    /// runs (a leader by `try_acquire_lock` alone). Ends with the session.
    pub(crate) fn spawn_watchdog(self: &Arc<Self>) {
        let weak: Weak<Session> = Arc::downgrade(self);
        let changed = self.changed.clone();
        tokio::spawn(async move {
            loop {
                let notified = changed.notified();
                futures::pin_mut!(notified);
                notified.as_mut().enable();
                let deadline = match weak.upgrade() {
                    Some(session) => session.deadline(),
                    None => return,
                };
                match deadline {
                    Some(deadline) => {
                        tokio::select! {
                            _ = notified => {}
                            _ = sleep_until(deadline) => {
                                match weak.upgrade() {
                                    Some(session) => { session.observe(Observation::Tick); }
                                    None => return,
                                }
                            }
                        }
                    }
                    None => notified.await,
                }
            }
        });
    }
}

/// Tells the state machine that a release request is over.
struct ReleaseDone<'a>(&'a Session);

impl Drop for ReleaseDone<'_> {
    fn drop(&mut self) {
        self.0
            .observe(Observation::ReleaseDone { at: Instant::now() });
    }
}

/// Stopping the campaign and releasing the lock, in that order (the campaign
/// must be unable to re-acquire before the release is sent).
#[derive(Debug)]
#[must_use]
pub(crate) struct Shutdown {
    session: Arc<Session>,
    campaign: Option<Campaign>,
}

impl Shutdown {
    pub(crate) async fn run(self) -> Result<()> {
        if let Some(c) = self.campaign {
            c.stop().await;
        }
        if !self.session.may_own_lock() {
            return Ok(());
        }
        self.session.release().await
    }

    /// For `Drop` impls: runs in a spawned task when a runtime is at hand;
    /// otherwise stops the campaign and steps down locally without a release
    /// call (the lock then expires after its TTL).
    pub(crate) fn run_in_background(self) {
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn(async move {
                    if let Err(e) = self.run().await {
                        tracing::warn!(error = %e, "release on shutdown failed; the lock expires after its TTL");
                    }
                });
            }
            Err(_) => {
                if let Some(c) = self.campaign {
                    c.stop.cancel();
                    c.task.abort();
                }
                let stepped_down = !self.session.observe(Observation::Released).is_empty();
                // No request is sent, so this "release" is over at once.
                self.session
                    .observe(Observation::ReleaseDone { at: Instant::now() });
                if stepped_down {
                    tracing::warn!("dropped outside a Tokio runtime while leader: cannot release; the lock expires after its TTL");
                }
            }
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.changed.notify_waiters();
    }
}

/// The campaign loop as a stream of the events it causes.
///
/// Not leader: try to acquire every retry period (jittered; backoff after
/// errors). Leader: keep alive every renew interval, retrying failures with
/// backoff while the lease lasts; at the safe deadline a timer reports
/// `Lost { Expired }`, even while a call is still in flight. After a loss the
/// loop campaigns again. Ends when `stop` is cancelled (without releasing:
/// whoever stops it decides that).
pub(crate) fn campaign(
    session: Arc<Session>,
    stop: CancellationToken,
) -> impl Stream<Item = LeadershipEvent> + Send + 'static {
    async_stream::stream! {
        let timing = session.timing;
        let ttl = session.rpc.scope().ttl();
        let mut failures: u32 = 0;
        // When the next keep-alive is due, while leader.
        let mut renew_at: Option<Instant> = None;
        loop {
            match session.deadline() {
                None => {
                    renew_at = None;
                    let answer = tokio::select! {
                        biased;
                        _ = stop.cancelled() => break,
                        answer = session.try_acquire(timing.rpc_timeout) => answer,
                    };
                    let failed = answer.result.is_err();
                    for ev in session.observe(answer.observation(ttl)) {
                        yield ev;
                    }
                    if session.deadline().is_some() {
                        failures = 0;
                        renew_at = Some(answer.sent_at + timing.renew_interval);
                        continue;
                    }
                    let wait = if failed {
                        failures += 1;
                        session.backoff(failures, timing.retry_period)
                    } else {
                        failures = 0;
                        session.jittered(timing.retry_period)
                    };
                    tokio::select! {
                        biased;
                        _ = stop.cancelled() => break,
                        _ = sleep(wait) => {}
                    }
                }
                Some(deadline) => {
                    // Leader (possibly by an imperative try_acquire_lock, in
                    // which case the first renewal is due now).
                    let due = *renew_at.get_or_insert_with(Instant::now);
                    let expired = tokio::select! {
                        biased;
                        _ = stop.cancelled() => break,
                        _ = sleep_until(deadline) => true,
                        _ = sleep_until(due) => false,
                    };
                    if expired {
                        for ev in session.observe(Observation::Tick) {
                            yield ev;
                        }
                        continue;
                    }
                    let left = deadline.saturating_duration_since(Instant::now());
                    let timeout = timing.rpc_timeout.min(left).max(MIN_RETRY);
                    let answer = tokio::select! {
                        biased;
                        _ = stop.cancelled() => break,
                        _ = sleep_until(deadline) => None,
                        answer = session.rpc.keep_alive(timeout) => Some(answer),
                    };
                    let Some(answer) = answer else {
                        // The lease ran out while the call hung: step down now.
                        for ev in session.observe(Observation::Tick) {
                            yield ev;
                        }
                        continue;
                    };
                    let failed = answer.result.is_err();
                    for ev in session.observe(answer.observation()) {
                        yield ev;
                    }
                    if failed {
                        failures += 1;
                        let left = deadline.saturating_duration_since(Instant::now());
                        let wait = session.backoff(failures, timing.renew_interval.min(left / 2));
                        renew_at = Some(Instant::now() + wait);
                    } else {
                        failures = 0;
                        renew_at = Some(answer.sent_at + timing.renew_interval);
                    }
                }
            }
        }
    }
}

/// Leadership as a stream of [`LeadershipEvent`]s.
///
/// Returned by [`QuorumQuestClient::leadership`](crate::QuorumQuestClient::leadership).
/// The first poll starts the campaign (in a background task, so renewals go on
/// even while the consumer is busy with the previous event); it runs until the
/// stream is dropped or [resigned](Leadership::resign). `Elected` and `Lost`
/// strictly alternate, starting with `Elected`; after a loss the campaign goes
/// on, so one `while let` loop follows leadership for the life of the process.
///
/// Every stream of one client is a view of the same contender (one identity,
/// one lock): a stream created while the client leads starts with `Elected`
/// for the running term. Dropping the last stream (with no keep-alive task
/// running) stops the campaign and releases the lock in the background.
///
/// ```no_run
/// use futures::StreamExt;
/// use quorum_quest_client::{LeadershipEvent, QuorumQuestClient};
///
/// # async fn demo() -> quorum_quest_client::Result<()> {
/// let client = QuorumQuestClient::builder("billing", "eu-west")
///     .address("http://localhost:5050")
///     .build()
///     .await?;
/// let mut leadership = client.leadership();
/// while let Some(event) = leadership.next().await {
///     match event {
///         LeadershipEvent::Elected { term, .. } => {
///             term.spawn(async { /* leader-only work, stopped when the term ends */ });
///         }
///         LeadershipEvent::Lost { reason, .. } => eprintln!("lost leadership: {reason}"),
///         _ => {}
///     }
/// }
/// # Ok(()) }
/// ```
#[derive(Debug)]
#[must_use = "a leadership stream starts campaigning when it is first polled"]
pub struct Leadership {
    session: Arc<Session>,
    rx: mpsc::UnboundedReceiver<LeadershipEvent>,
    phase: StreamPhase,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StreamPhase {
    NotStarted,
    Running,
    Done,
}

impl Leadership {
    pub(crate) fn new(session: Arc<Session>) -> Self {
        let rx = session.subscribe();
        Leadership {
            session,
            rx,
            phase: StreamPhase::NotStarted,
        }
    }

    /// Stops campaigning through this stream and, if it was the last one
    /// wanting the campaign, steps down and waits until the server has
    /// released the lock. The term ends before the release request is sent.
    ///
    /// ```no_run
    /// # async fn demo(client: quorum_quest_client::QuorumQuestClient) -> quorum_quest_client::Result<()> {
    /// let leadership = client.leadership();
    /// // ... later, on shutdown:
    /// leadership.resign().await?;
    /// # Ok(()) }
    /// ```
    pub async fn resign(mut self) -> Result<()> {
        let was_running = self.phase == StreamPhase::Running;
        self.phase = StreamPhase::Done;
        if !was_running {
            return Ok(());
        }
        match self.session.remove_stream() {
            Some(shutdown) => shutdown.run().await,
            None => Ok(()),
        }
    }
}

impl Stream for Leadership {
    type Item = LeadershipEvent;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        match self.phase {
            StreamPhase::Done => return Poll::Ready(None),
            StreamPhase::NotStarted => {
                if let Err(e) = self.session.add_stream() {
                    tracing::error!(error = %e, "cannot start the leadership campaign");
                    self.phase = StreamPhase::Done;
                    return Poll::Ready(None);
                }
                self.phase = StreamPhase::Running;
            }
            StreamPhase::Running => {}
        }
        self.rx.poll_recv(cx)
    }
}

impl Drop for Leadership {
    fn drop(&mut self) {
        if self.phase != StreamPhase::Running {
            return;
        }
        if let Some(shutdown) = self.session.remove_stream() {
            shutdown.run_in_background();
        }
    }
}
