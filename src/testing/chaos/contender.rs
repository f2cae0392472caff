//! A contender: its own thread and current-thread runtime, its client, its
//! leadership stream and the recording of its terms (on the stream, and on a
//! [`Callbacks`] observer for the client's whole life).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use tokio::sync::{mpsc, oneshot};
use tokio::time::{sleep, timeout, Instant};
use tokio_util::sync::CancellationToken;

use super::record::{Exit, Shared, TermRec};
use super::{lock, DOMAIN, SERVICE, SETTLE_WAIT};
use crate::testing::{FaultProxy, GoawayRelay};
use crate::{async_trait, Callbacks, LeaderTerm, Leadership, LeadershipEvent, QuorumQuestClient};

/// One contender's plumbing. Its client and its stream consumer run on a
/// current-thread runtime of their own, in a dedicated OS thread (so that
/// [`FaultKind::StarvedRuntime`](super::FaultKind::StarvedRuntime) can block that runtime alone); `client` is
/// a handle to the same client, for the harness to look at.
pub(super) struct Contender {
    pub(super) id: String,
    pub(super) client: QuorumQuestClient,
    pub(super) proxy: FaultProxy,
    pub(super) relay: GoawayRelay,
    pub(super) observer: Arc<PairingObserver>,
    pub(super) commands: mpsc::UnboundedSender<Command>,
    pub(super) thread: ContenderThread,
}

/// The signals between the harness and a contender's thread.
pub(super) struct ContenderThread {
    /// Starts the contender task.
    pub(super) go: Option<oneshot::Sender<Go>>,
    /// The contender task ended (`Some`: it panicked, with what).
    pub(super) finished: Option<oneshot::Receiver<Option<String>>>,
    /// Drop the client (it releases in the background).
    pub(super) teardown: Option<oneshot::Sender<()>>,
    /// Stop the runtime.
    pub(super) exit: Option<oneshot::Sender<()>>,
    /// The runtime has stopped.
    pub(super) exited: Option<oneshot::Receiver<()>>,
}

/// What a contender task needs from the harness.
pub(super) struct Go {
    pub(super) commands: mpsc::UnboundedReceiver<Command>,
    pub(super) record: Shared,
    pub(super) quit: CancellationToken,
    pub(super) ttl: Duration,
    /// The harness's runtime, where term ends are observed.
    pub(super) harness: tokio::runtime::Handle,
}

/// How a contender builds its client.
pub(super) struct ClientPlan {
    pub(super) idx: usize,
    pub(super) id: String,
    pub(super) url: String,
    pub(super) ttl: Duration,
    pub(super) jitter_seed: u64,
    pub(super) observer: Arc<PairingObserver>,
}

impl ClientPlan {
    async fn build(self) -> Result<QuorumQuestClient, String> {
        QuorumQuestClient::builder(SERVICE, DOMAIN)
            .address(self.url)
            .ttl(self.ttl)
            .client_id(self.id.clone())
            .jitter_seed(self.jitter_seed)
            .callbacks(self.observer)
            .build()
            .await
            .map_err(|e| format!("{}: build the client: {e}", self.id))
    }
}

/// Starts a contender's thread: builds its runtime and client, hands the
/// client back, then runs the contender task when told to.
pub(super) async fn spawn_contender(
    plan: ClientPlan,
) -> Result<(QuorumQuestClient, ContenderThread), String> {
    let id = plan.id.clone();
    let idx = plan.idx;
    let (ready_tx, ready_rx) = oneshot::channel::<Result<QuorumQuestClient, String>>();
    let (go_tx, go_rx) = oneshot::channel::<Go>();
    let (finished_tx, finished_rx) = oneshot::channel::<Option<String>>();
    let (teardown_tx, teardown_rx) = oneshot::channel::<()>();
    let (exit_tx, exit_rx) = oneshot::channel::<()>();
    let (exited_tx, exited_rx) = oneshot::channel::<()>();
    let spawned = std::thread::Builder::new()
        .name(format!("chaos-{id}"))
        .spawn(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = ready_tx.send(Err(format!("contender-{idx}: runtime: {e}")));
                    return;
                }
            };
            runtime.block_on(async move {
                let client = match plan.build().await {
                    Ok(c) => c,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                let _ = ready_tx.send(Ok(client.clone()));
                if let Ok(go) = go_rx.await {
                    // A panic in the task (the harness's own code, or a
                    // library panic reaching the consumer) is reported.
                    let task = tokio::spawn(contender_task(idx, client.clone(), go));
                    let panicked = task.await.err().map(|e| e.to_string());
                    let _ = finished_tx.send(panicked);
                }
                let _ = teardown_rx.await;
                drop(client);
                let _ = timeout(SETTLE_WAIT, exit_rx).await;
            });
            runtime.shutdown_timeout(Duration::from_secs(1));
            let _ = exited_tx.send(());
        });
    if let Err(e) = spawned {
        return Err(format!("{id}: spawn its thread: {e}"));
    }
    let client = match timeout(SETTLE_WAIT, ready_rx).await {
        Ok(Ok(r)) => r?,
        Ok(Err(_)) => {
            return Err(format!(
                "{id}: its thread ended before the client was built"
            ))
        }
        Err(_) => {
            return Err(format!(
                "{id}: the client was not built within {SETTLE_WAIT:?}"
            ))
        }
    };
    Ok((
        client,
        ContenderThread {
            go: Some(go_tx),
            finished: Some(finished_rx),
            teardown: Some(teardown_tx),
            exit: Some(exit_tx),
            exited: Some(exited_rx),
        },
    ))
}

/// What the schedule tells a contender task.
pub(super) enum Command {
    /// Resign the stream, sit out, rejoin; `done` when back in.
    Resign {
        out: Duration,
        done: oneshot::Sender<()>,
    },
    /// Drop the stream (no resign), sit out, rejoin; `done` when back in.
    Drop {
        out: Duration,
        done: oneshot::Sender<()>,
    },
    /// Block the contender's runtime thread for this long (while it leads);
    /// `done` afterwards.
    Starve {
        block: Duration,
        done: oneshot::Sender<()>,
    },
    /// Resign and end.
    Stop,
}

enum Step {
    Command(Option<Command>),
    Event(Option<LeadershipEvent>),
}

/// One contender: follows its leadership stream, records its terms, and obeys
/// the schedule's commands.
async fn contender_task(idx: usize, client: QuorumQuestClient, go: Go) {
    let Go {
        mut commands,
        record,
        quit,
        ttl,
        harness,
    } = go;
    let mut stream: Option<Leadership> = Some(client.leadership());
    // The open term: (term, index in `record.terms`).
    let mut open: Option<(LeaderTerm, usize)> = None;
    loop {
        let step = match stream.as_mut() {
            Some(s) => tokio::select! {
                biased;
                c = commands.recv() => Step::Command(c),
                e = s.next() => Step::Event(e),
            },
            None => Step::Command(commands.recv().await),
        };
        match step {
            Step::Event(Some(event)) => on_event(idx, event, &record, &mut open, &quit, &harness),
            Step::Event(None) => {
                let what = format!("contender-{idx}: leadership stream ended by itself");
                tracing::warn!(%what);
                lock(&record).problems.push(what);
                close_exit(idx, &record, &mut open, Exit::Dropped);
                drop(stream.take());
                sleep(Duration::from_millis(100)).await;
                stream = Some(client.leadership());
            }
            Step::Command(Some(Command::Starve { block, done })) => {
                // Starve this runtime: nothing on it runs meanwhile (the
                // client's tasks, this consumer, the callbacks).
                tracing::info!(contender = idx, ?block, "blocking the contender's runtime");
                std::thread::sleep(block);
                let _ = done.send(());
            }
            Step::Command(command) => {
                let command = command.unwrap_or(Command::Stop);
                let leaving = stream.take();
                let (exit, out, done) = match command {
                    Command::Stop | Command::Starve { .. } => (Exit::Resigned, None, None),
                    Command::Resign { out, done } => (Exit::Resigned, Some(out), Some(done)),
                    Command::Drop { out, done } => (Exit::Dropped, Some(out), Some(done)),
                };
                close_exit(idx, &record, &mut open, exit);
                if let Some(s) = leaving {
                    match exit {
                        Exit::Dropped => drop(s),
                        Exit::Resigned => {
                            let bound = ttl * 2 + SETTLE_WAIT;
                            match timeout(bound, s.resign()).await {
                                Ok(Ok(())) => {}
                                // A release that fails (server paused, network
                                // cut) is allowed: the lease then expires.
                                Ok(Err(e)) => {
                                    tracing::debug!(contender = idx, error = %e, "resign: release failed")
                                }
                                Err(_) => {
                                    let what = format!(
                                        "contender-{idx}: resign did not finish within {bound:?}"
                                    );
                                    lock(&record).problems.push(what);
                                }
                            }
                        }
                    }
                }
                let Some(out) = out else { break };
                // Sit out; a Stop meanwhile ends the task.
                let stopped = tokio::select! {
                    _ = sleep(out) => false,
                    c = commands.recv() => !matches!(
                        c,
                        Some(Command::Resign { .. } | Command::Drop { .. } | Command::Starve { .. })
                    ),
                };
                if let Some(done) = done {
                    let _ = done.send(());
                }
                if stopped {
                    break;
                }
                stream = Some(client.leadership());
            }
        }
    }
}

/// The stream went away mid-term: the term ends at its cancellation.
fn close_exit(idx: usize, record: &Shared, open: &mut Option<(LeaderTerm, usize)>, exit: Exit) {
    if let Some((_, i)) = open.take() {
        let mut r = lock(record);
        if let Some(t) = r.terms.get_mut(i) {
            t.exit = Some(exit);
        }
        r.open[idx] = None;
    }
}

fn on_event(
    idx: usize,
    event: LeadershipEvent,
    record: &Shared,
    open: &mut Option<(LeaderTerm, usize)>,
    quit: &CancellationToken,
    harness: &tokio::runtime::Handle,
) {
    let now = Instant::now();
    match event {
        LeadershipEvent::Elected { term, .. } => {
            let mut r = lock(record);
            if let Some((prev, _)) = open.as_ref() {
                r.stream_violations.push((
                    idx,
                    now,
                    format!(
                        "Elected (term {}) while term {} was open",
                        term.id(),
                        prev.id()
                    ),
                ));
            }
            // Online check: another contender's term that has not ended.
            if !term.is_ended() {
                let mut live = 0;
                for (j, other) in r.open.iter().enumerate() {
                    if let Some(other) = other {
                        if j != idx && !other.is_ended() {
                            tracing::error!(
                                elected = idx,
                                term = term.id(),
                                other = j,
                                other_term = other.id(),
                                "two live leader terms at once"
                            );
                            live += 1;
                        }
                    }
                }
                r.online_overlaps += live;
            }
            let index = r.terms.len();
            r.terms.push(TermRec {
                contender: idx,
                term: term.id(),
                start: now,
                cancelled: None,
                lost: None,
                exit: None,
            });
            r.open[idx] = Some(term.clone());
            drop(r);
            *open = Some((term.clone(), index));
            let record = record.clone();
            let quit = quit.clone();
            // Observed on the harness's runtime, which no fault blocks: the
            // instant leader work bound to the term is told to stop. That is
            // the wake-up that ends `cancelled()`, stamped as it happens
            // (the client's own thread, before a release request leaves),
            // not when this task next runs: on a loaded machine that can be
            // after the server acted on the release.
            harness.spawn(async move {
                let ended = Stamped::new(term.cancelled(), term.clone());
                let woken = ended.ended_at.clone();
                tokio::select! {
                    _ = ended => {
                        let at = lock(&woken).unwrap_or_else(Instant::now);
                        if let Some(t) = lock(&record).terms.get_mut(index) {
                            t.cancelled = Some(at);
                        }
                    }
                    _ = quit.cancelled() => {}
                }
            });
        }
        LeadershipEvent::Lost { term, reason } => {
            let mut r = lock(record);
            match open.take() {
                Some((t, i)) if t.id() == term.id() => {
                    if let Some(rec) = r.terms.get_mut(i) {
                        rec.lost = Some((now, reason));
                    }
                }
                Some((t, i)) => {
                    r.stream_violations.push((
                        idx,
                        now,
                        format!("Lost for term {} while term {} was open", term.id(), t.id()),
                    ));
                    if let Some(rec) = r.terms.get_mut(i) {
                        rec.lost = Some((now, reason));
                    }
                }
                None => r.stream_violations.push((
                    idx,
                    now,
                    format!("Lost (term {}) without an open term", term.id()),
                )),
            }
            r.open[idx] = None;
        }
        LeadershipEvent::RpcFailed { .. } => lock(record).rpc_failures += 1,
        _ => {}
    }
}

/// A callbacks consumer that checks `on_leader_elected(true)` and
/// `on_leader_lost` alternate, for the whole life of a client.
#[derive(Debug, Default)]
pub(super) struct PairingObserver {
    pub(super) state: Mutex<ObserverState>,
}

#[derive(Debug, Default)]
pub(super) struct ObserverState {
    pub(super) leader: bool,
    pub(super) elected: u64,
    pub(super) lost: u64,
    pub(super) problems: Vec<(Instant, String)>,
}

#[async_trait]
impl Callbacks for PairingObserver {
    async fn on_leader_elected(&self, is_leader: bool) {
        let mut s = lock(&self.state);
        if !is_leader {
            return;
        }
        if s.leader {
            s.problems.push((
                Instant::now(),
                "on_leader_elected(true) twice without on_leader_lost".into(),
            ));
        }
        s.leader = true;
        s.elected += 1;
    }

    async fn on_leader_lost(&self) {
        let mut s = lock(&self.state);
        if !s.leader {
            s.problems.push((
                Instant::now(),
                "on_leader_lost without on_leader_elected(true)".into(),
            ));
        }
        s.leader = false;
        s.lost += 1;
    }
}

/// A term's `cancelled()` that records the first instant it was woken with
/// the term over: an upper bound of when the term ended (it had ended by
/// then) that does not wait for the observing task to be run.
struct Stamped<F> {
    inner: std::pin::Pin<Box<F>>,
    term: LeaderTerm,
    ended_at: Arc<Mutex<Option<Instant>>>,
}

impl<F> Stamped<F> {
    fn new(inner: F, term: LeaderTerm) -> Self {
        Stamped {
            inner: Box::pin(inner),
            term,
            ended_at: Arc::default(),
        }
    }
}

/// Stamps the instant if the term is over (not for a wake-up without news),
/// then wakes the task that polled. A poll that finds the term going on
/// again drops the stamp. (A term that looked ended and went on, with no
/// poll in between, keeps its early stamp: that needs the client to publish
/// a renewal after its old deadline passed, a gap of a few instructions.)
struct StampWaker {
    term: LeaderTerm,
    ended_at: Arc<Mutex<Option<Instant>>>,
    task: std::task::Waker,
}

impl std::task::Wake for StampWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        {
            // Looked at under the stamp's lock, as the poll that clears a
            // stale stamp does: a stamp made after that look is kept.
            let mut stamp = lock(&self.ended_at);
            if self.term.is_ended() {
                stamp.get_or_insert_with(Instant::now);
            }
        }
        self.task.wake_by_ref();
    }
}

impl<F: std::future::Future> std::future::Future for Stamped<F> {
    type Output = F::Output;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<F::Output> {
        let waker = std::task::Waker::from(Arc::new(StampWaker {
            term: self.term.clone(),
            ended_at: self.ended_at.clone(),
            task: cx.waker().clone(),
        }));
        let polled = self
            .inner
            .as_mut()
            .poll(&mut std::task::Context::from_waker(&waker));
        if polled.is_pending() {
            // Still running: a stamp taken while the term looked ended (its
            // deadline passed while a renewal applied just before it was
            // not published yet) is not its end.
            let mut stamp = lock(&self.ended_at);
            if !self.term.is_ended() {
                *stamp = None;
            }
        }
        polled
    }
}

#[cfg(test)]
mod tests {
    use std::future::Future;
    use std::task::Context;

    use super::*;
    use crate::event::{LeaseCell, LeaseView};

    fn view(term: &LeaderTerm, deadline: Option<Instant>) -> LeaseView {
        LeaseView {
            current: deadline.map(|d| term.published(d)),
        }
    }

    /// A renewal applied just before the deadline is published just after
    /// it (the client's state lock is held in between): a wake-up in that
    /// gap finds the term ended by the clock, yet the term then goes on
    /// (`is_active()` again). The stamp of that wake-up is not the term's
    /// end: kept, it would date the end before the client really stopped
    /// leading, and hide an overlap with the next leader.
    #[tokio::test(start_paused = true)]
    async fn a_stamp_from_a_wake_up_before_the_term_went_on_is_not_its_end() {
        let ms = Duration::from_millis;
        let cell = Arc::new(LeaseCell::default());
        let term = LeaderTerm::new(1, cell.clone());
        let t0 = Instant::now();
        cell.publish(view(&term, Some(t0 + ms(100))));
        let mut stamped = Box::pin(Stamped::new(term.cancelled(), term.clone()));
        let woken = stamped.ended_at.clone();
        let noop = futures::task::noop_waker();
        let mut cx = Context::from_waker(&noop);
        assert!(stamped.as_mut().poll(&mut cx).is_pending());
        // The deadline timer fires while the renewal is not published yet.
        tokio::time::advance(ms(150)).await;
        tokio::task::yield_now().await;
        // The renewal is published: the same term goes on.
        cell.publish(view(&term, Some(t0 + ms(1000))));
        assert!(term.is_active(), "the client leads on in the same term");
        assert!(stamped.as_mut().poll(&mut cx).is_pending());
        // The term really ends (reported lost) later.
        tokio::time::advance(ms(300)).await;
        let ended = Instant::now();
        cell.publish(view(&term, None));
        assert!(stamped.as_mut().poll(&mut cx).is_ready());
        let at = lock(&woken).unwrap_or_else(Instant::now);
        assert!(
            at >= ended,
            "the term's end is stamped {:?} before the client stopped leading",
            ended - at
        );
    }
}
