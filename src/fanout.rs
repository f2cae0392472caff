//! A bounded, coalescing event queue: one per leadership subscriber.
//!
//! Why not an unbounded channel: a leader renews every few seconds for the
//! life of the process, and a subscriber that is created but never polled (or
//! a callback that never returns) would buffer every `Renewed` forever, a
//! memory leak proportional to uptime. Why not a bounded channel that drops
//! or blocks: dropping could lose an `Elected` or `Lost`, and the rule of the
//! crate is that no leadership change is ever lost silently; blocking would
//! let one stuck subscriber stall the campaign for everyone.
//!
//! So the queue knows which events matter:
//!
//! - Transitions (`Elected`, `Lost`, `Follower`) are never dropped and keep
//!   their order: they are what `Elected`/`Lost` alternation is made of.
//! - Status events (`Renewed`, `RpcFailed`) only describe the latest state of
//!   the current segment, so an older one is stale once a newer one of the
//!   same kind exists. Among the events queued after the last queued
//!   transition (the tail segment), at most one `Renewed` and one `RpcFailed`
//!   are kept: a newer one replaces the older one and moves to the end, so
//!   what remains is in the order of the latest events.
//!
//! The queue therefore holds at most (queued transitions) + 2 events per
//! segment, and an idle subscriber's memory stays constant while leadership
//! is steady. Transitions themselves are rare (each costs at least one RPC
//! round trip and usually a retry period).

use std::collections::VecDeque;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};

use futures::task::AtomicWaker;

use crate::event::LeadershipEvent;

/// How the queue treats an event. Matched exhaustively on purpose: a new
/// `LeadershipEvent` variant must decide whether it may be coalesced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Never dropped, never reordered; ends the tail segment.
    Transition,
    /// At most one per tail segment, the latest.
    Renewed,
    /// At most one per tail segment, the latest.
    RpcFailed,
}

fn kind(ev: &LeadershipEvent) -> Kind {
    match ev {
        LeadershipEvent::Elected { .. }
        | LeadershipEvent::Lost { .. }
        | LeadershipEvent::Follower => Kind::Transition,
        LeadershipEvent::Renewed { .. } => Kind::Renewed,
        LeadershipEvent::RpcFailed { .. } => Kind::RpcFailed,
    }
}

/// The events of one subscriber's queue. One event (nearly always all
/// there is: the consumer takes each before the next comes) is held inline:
/// an event passed from the publishing thread to the consuming one costs no
/// allocation, and so no memory freed on another thread than the one that
/// allocated it (which glibc's malloc serves only on its slow path). More
/// than one go to a buffer, freed again once the consumer has emptied it.
#[derive(Debug, Default)]
enum Queue {
    #[default]
    Empty,
    One(LeadershipEvent),
    Many(VecDeque<LeadershipEvent>),
}

impl Queue {
    #[cfg(test)]
    fn len(&self) -> usize {
        match self {
            Queue::Empty => 0,
            Queue::One(_) => 1,
            Queue::Many(q) => q.len(),
        }
    }

    fn push_back(&mut self, ev: LeadershipEvent) {
        match std::mem::take(self) {
            Queue::Empty => *self = Queue::One(ev),
            Queue::One(first) => *self = Queue::Many(VecDeque::from([first, ev])),
            Queue::Many(mut q) => {
                q.push_back(ev);
                *self = Queue::Many(q);
            }
        }
    }

    fn pop_front(&mut self) -> Option<LeadershipEvent> {
        match self {
            Queue::Empty => None,
            Queue::One(_) => match std::mem::take(self) {
                Queue::One(ev) => Some(ev),
                _ => None,
            },
            Queue::Many(q) => {
                let ev = q.pop_front();
                if q.is_empty() {
                    // An idle subscriber (nearly all of them, nearly all
                    // the time) holds no buffer.
                    *self = Queue::Empty;
                }
                ev
            }
        }
    }

    /// Removes the status event of kind `k` queued after the last queued
    /// transition (the tail segment), if any.
    fn remove_in_tail(&mut self, k: Kind) -> Option<LeadershipEvent> {
        match self {
            Queue::Empty => None,
            Queue::One(ev) if kind(ev) == k => self.pop_front(),
            Queue::One(_) => None,
            Queue::Many(q) => {
                // The tail segment is at most two events long, so this scan
                // is constant time.
                let i = q
                    .iter()
                    .rev()
                    .take_while(|queued| kind(queued) != Kind::Transition)
                    .position(|queued| kind(queued) == k)
                    .map(|from_back| q.len() - 1 - from_back)?;
                let removed = q.remove(i);
                if q.is_empty() {
                    *self = Queue::Empty;
                }
                removed
            }
        }
    }
}

#[derive(Debug, Default)]
struct State {
    queue: Queue,
    /// The sender closed (or was dropped): the receiver drains, then ends.
    closed: bool,
    /// The receiver was dropped: sending is pointless.
    receiver_gone: bool,
}

#[derive(Debug, Default)]
struct Shared {
    state: Mutex<State>,
    /// The receiver's waker. A single consumer (`&mut` receiver), which is
    /// what `AtomicWaker` supports.
    waker: AtomicWaker,
    /// Status events replaced by a newer one of the same kind.
    coalesced: AtomicU64,
    /// The receiver left `Renewed` out ([`EventReceiver::skip_renewals`]):
    /// none is queued, and none wakes it.
    skip_renewed: AtomicBool,
}

impl Shared {
    /// Poisoning is ignored: no critical section leaves the queue in a state
    /// that breaks its invariants if it panics midway (each is a single
    /// push, pop or remove), and a leadership stream must keep working.
    fn state(&self) -> MutexGuard<'_, State> {
        crate::sync::lock(&self.state)
    }
}

/// The publishing side of one subscriber's queue. Dropping it closes the
/// queue (the receiver drains what is left, then yields `None`).
#[derive(Debug)]
pub(crate) struct EventSender {
    shared: Arc<Shared>,
}

/// The consuming side of one subscriber's queue.
#[derive(Debug)]
pub(crate) struct EventReceiver {
    shared: Arc<Shared>,
}

/// What [`EventSender::queue`] did with an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Queued {
    /// Queued: the receiver is to be woken.
    Yes,
    /// Left out (a `Renewed` the receiver does not want): nothing to wake.
    Skipped,
    /// The receiver is gone, or the queue closed: forget this subscriber.
    Gone,
}

/// A new, empty queue.
pub(crate) fn channel() -> (EventSender, EventReceiver) {
    let shared = Arc::new(Shared::default());
    (
        EventSender {
            shared: shared.clone(),
        },
        EventReceiver { shared },
    )
}

impl EventSender {
    /// Queues `ev`, coalescing it with an older status event of the same kind
    /// in the tail segment. Never blocks and never grows the queue for a
    /// status event beyond one per kind and segment.
    ///
    /// Returns `false` (and drops `ev`) once the receiver is gone or this
    /// side was closed, so the publisher can forget this subscriber.
    pub(crate) fn send(&self, ev: LeadershipEvent) -> bool {
        match self.queue(ev) {
            Queued::Gone => false,
            Queued::Skipped => true,
            Queued::Yes => {
                // Woken after the lock is released, so the receiver does
                // not wake up only to wait for it.
                self.shared.waker.wake();
                true
            }
        }
    }

    /// [`send`](Self::send) without the wake-up: the caller wakes the
    /// receiver ([`take_waker`](Self::take_waker)) once it holds no lock
    /// (a wake-up runs the application's executor code). Runs no code of
    /// the application.
    fn queue(&self, ev: LeadershipEvent) -> Queued {
        let replaced = {
            let mut state = self.shared.state();
            if state.receiver_gone || state.closed {
                return Queued::Gone;
            }
            let replaced = match kind(&ev) {
                Kind::Transition => None,
                // Read under the lock that `skip_renewals` empties the
                // queue under: no renewal is queued after that.
                Kind::Renewed if self.shared.skip_renewed.load(Ordering::Relaxed) => {
                    return Queued::Skipped;
                }
                k => state.queue.remove_in_tail(k),
            };
            state.queue.push_back(ev);
            replaced
        };
        if replaced.is_some() {
            self.shared.coalesced.fetch_add(1, Ordering::Relaxed);
        }
        // The replaced event (a status event: no term) drops here, outside
        // the lock.
        Queued::Yes
    }

    /// The receiver's waker, taken to be woken later, outside any lock. The
    /// events queued before this call are seen by the receiver's next poll,
    /// whether it comes from this wake-up or from one registered since.
    fn take_waker(&self) -> Option<std::task::Waker> {
        self.shared.waker.take()
    }

    /// Closes the queue: later sends fail, and the receiver yields what is
    /// queued, then `None`. Idempotent; dropping the sender does the same.
    pub(crate) fn close(&self) {
        let receiver_gone = {
            let mut state = self.shared.state();
            state.closed = true;
            state.receiver_gone
        };
        // Nobody to wake once the receiver is gone (a gone subscriber is
        // dropped by `Hub::subscribe` under the election's state lock: its
        // stale waker must not run there).
        if !receiver_gone {
            self.shared.waker.wake();
        }
    }

    /// `true` once the receiver was dropped: the subscriber went away and
    /// this sender can be forgotten without waiting for the next event.
    pub(crate) fn receiver_gone(&self) -> bool {
        self.shared.state().receiver_gone
    }

    /// How many status events were replaced by a newer one so far.
    #[cfg(test)]
    pub(crate) fn coalesced(&self) -> u64 {
        self.shared.coalesced.load(Ordering::Relaxed)
    }

    /// How many events are queued now.
    #[cfg(test)]
    pub(crate) fn queued(&self) -> usize {
        self.shared.state().queue.len()
    }
}

impl Drop for EventSender {
    fn drop(&mut self) {
        self.close();
    }
}

impl EventReceiver {
    /// Leaves `Renewed` out from now on: none is queued (those queued are
    /// dropped) and none wakes the receiver. Every other event still comes.
    pub(crate) fn skip_renewals(&self) {
        let dropped = {
            let mut state = self.shared.state();
            self.shared.skip_renewed.store(true, Ordering::Relaxed);
            let mut kept = Queue::Empty;
            let mut dropped = Vec::new();
            while let Some(ev) = state.queue.pop_front() {
                match kind(&ev) {
                    Kind::Renewed => dropped.push(ev),
                    _ => kept.push_back(ev),
                }
            }
            state.queue = kept;
            dropped
        };
        // Dropped outside the lock (a renewal holds no term; still cheap).
        drop(dropped);
    }

    /// The next event; `Ready(None)` once the sender closed and the queue
    /// is drained.
    pub(crate) fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Option<LeadershipEvent>> {
        // Registered before looking at the queue: a send that lands after
        // the look wakes this registration, so no wake-up is lost.
        self.shared.waker.register(cx.waker());
        let mut state = self.shared.state();
        match state.queue.pop_front() {
            Some(ev) => Poll::Ready(Some(ev)),
            None if state.closed => Poll::Ready(None),
            None => Poll::Pending,
        }
    }

    /// Waits for the next event; `None` once the sender closed and the
    /// queue is drained. Cancel-safe: no event is taken unless returned.
    #[cfg(test)]
    pub(crate) async fn recv(&mut self) -> Option<LeadershipEvent> {
        std::future::poll_fn(|cx| self.poll_recv(cx)).await
    }

    /// How many status events were replaced by a newer one so far.
    #[cfg(test)]
    pub(crate) fn coalesced(&self) -> u64 {
        self.shared.coalesced.load(Ordering::Relaxed)
    }

    /// How many events are queued now.
    #[cfg(test)]
    pub(crate) fn queued(&self) -> usize {
        self.shared.state().queue.len()
    }
}

impl Drop for EventReceiver {
    fn drop(&mut self) {
        let dropped = {
            let mut state = self.shared.state();
            state.receiver_gone = true;
            std::mem::take(&mut state.queue)
        };
        // The undelivered events (and the terms they hold) are freed now,
        // outside the lock, not when the publisher next notices.
        drop(dropped);
    }
}

/// Every subscriber of one election, and the order its events reach them.
///
/// Observations are numbered when they are applied (under the election's
/// state lock) and handed here afterwards, outside that lock, by whichever
/// task applied them (see `election::Applied`). Two tasks may hand theirs
/// over in the other order: a batch that arrives ahead of an earlier one
/// waits for it, so every subscriber sees the events in the order the
/// observations were applied. A subscriber records the number of the first
/// batch it gets: the batches before it are already reflected in the state
/// it started from (its snapshot), so they are skipped for it.
#[derive(Debug)]
pub(crate) struct Hub {
    inner: Mutex<HubState>,
}

#[derive(Debug)]
struct HubState {
    /// The number of the next batch to hand out (batches count from 1).
    next: u64,
    /// Batches that arrived ahead of an earlier one (and, for an instant,
    /// the one being handed over). At most one per task that is between
    /// applying an observation and handing it over (a few statements, with
    /// no `await`): a handful at the very most.
    early: Vec<(u64, Vec<LeadershipEvent>)>,
    subscribers: Vec<Subscriber>,
    /// A close waiting for the batches numbered before it (see
    /// [`Hub::close`]): the subscribers end once this one is handed out.
    close_after: Option<u64>,
}

#[derive(Debug)]
struct Subscriber {
    /// The first batch this subscriber gets.
    from: u64,
    tx: EventSender,
}

impl Default for Hub {
    fn default() -> Self {
        Hub {
            inner: Mutex::new(HubState {
                next: 1,
                early: Vec::new(),
                subscribers: Vec::new(),
                close_after: None,
            }),
        }
    }
}

impl Hub {
    fn state(&self) -> MutexGuard<'_, HubState> {
        crate::sync::lock(&self.inner)
    }

    /// A new subscriber that gets the batches from `from` on, after `first`
    /// (its snapshot of the state the batches before `from` left). Called
    /// under the election's state lock, so that no batch numbered `from` or
    /// later can have been handed out yet.
    pub(crate) fn subscribe(&self, from: u64, first: Option<LeadershipEvent>) -> EventReceiver {
        let (tx, rx) = channel();
        if let Some(ev) = first {
            tx.send(ev);
        }
        let gone: Vec<Subscriber> = {
            let mut state = self.state();
            let gone = state
                .subscribers
                .extract_if(.., |s| s.tx.receiver_gone())
                .collect();
            state.subscribers.push(Subscriber { from, tx });
            gone
        };
        // Dropped (which wakes their last waker) outside the lock.
        drop(gone);
        rx
    }

    /// Hands batch `seq` to every subscriber, after every batch before it
    /// (`seq` counts from 1, each number once). `each` runs once per batch,
    /// in order, before the batch is handed out (logs, metrics).
    ///
    /// `each` and a subscriber's wake-up run the application's code (its
    /// tracing layers, metrics recorder, executor), so neither runs under
    /// the hub's lock: `each` before its batch is handed out (the later
    /// batches wait for it), the wake-ups (and the drops of the subscribers
    /// that end, which wake them) after the hand-out. A tracing layer, or an
    /// executor that polls the woken task at once, whose code then creates
    /// a stream or drops one must not find the lock held by its own thread.
    ///
    /// If one panics, the batch still reaches every subscriber and the
    /// batches parked behind it still go out (a batch left undelivered would
    /// park every later one for ever), and every other subscriber is still
    /// woken; the first panic is then resumed (unless this thread is already
    /// unwinding: a second panic would abort). A subscriber whose wake-up
    /// panicked keeps its place (the events were queued before the wake-up).
    pub(crate) fn deliver(
        &self,
        seq: u64,
        events: Vec<LeadershipEvent>,
        mut each: impl FnMut(&[LeadershipEvent]),
    ) {
        let mut panic = None;
        // Woken, and dropped, once the lock is released.
        let mut wakes = Wakes::default();
        let mut ended: Vec<Subscriber> = Vec::new();
        {
            let mut state = self.state();
            if seq != state.next {
                // An earlier batch is still on its way: it hands this one out.
                state.early.push((seq, events));
                return;
            }
            let mut batch = events;
            loop {
                let seq = state.next;
                // The hook runs outside the lock too. Nothing overtakes this
                // batch meanwhile: `next` stays `seq` until it is handed out
                // below, so a later batch (from another thread, or from the
                // hook itself) parks in `early`, and a subscriber made now
                // starts after it (its snapshot reflects it).
                drop(state);
                // The previous batch's wake-ups first: a slow hook delays
                // only the batches after it.
                std::mem::take(&mut wakes).wake_all(&mut panic);
                end_all(std::mem::take(&mut ended), &mut panic);
                if let Err(p) = catch_unwind(AssertUnwindSafe(|| each(&batch))) {
                    panic.get_or_insert(p);
                }
                state = self.state();
                let gone = state.subscribers.extract_if(.., |s| {
                    if seq < s.from {
                        return false;
                    }
                    let mut queued = false;
                    for ev in &batch {
                        match s.tx.queue(ev.clone()) {
                            // The receiver is gone: forget the subscriber.
                            Queued::Gone => return true,
                            Queued::Yes => queued = true,
                            Queued::Skipped => {}
                        }
                    }
                    // Nothing queued (only renewals it leaves out): not woken.
                    if queued {
                        wakes.push(s.tx.take_waker());
                    }
                    false
                });
                ended.extend(gone);
                state.next = seq.wrapping_add(1);
                if state.close_after == Some(seq) {
                    state.close_after = None;
                    ended.append(&mut state.subscribers);
                }
                let next = state.next;
                match state.early.iter().position(|(s, _)| *s == next) {
                    Some(i) => batch = state.early.swap_remove(i).1,
                    None => break,
                }
            }
        }
        wakes.wake_all(&mut panic);
        end_all(ended, &mut panic);
        crate::sync::resume_panic(panic);
    }

    /// Wakes every subscriber without an event: each is polled again (a
    /// stream then revives a campaign whose driver is gone). The wake-ups
    /// run outside the lock.
    pub(crate) fn wake_all(&self) {
        let mut wakes = Wakes::default();
        for s in &self.state().subscribers {
            wakes.push(s.tx.take_waker());
        }
        let mut panic = None;
        wakes.wake_all(&mut panic);
        crate::sync::resume_panic(panic);
    }

    /// Ends every subscriber (each yields what it holds, then ends) once
    /// every batch up to `after` (the last one numbered: its events were
    /// applied before the close) is handed out: one still on its way (a
    /// tick's `Lost`, applied on another thread) is not lost.
    pub(crate) fn close(&self, after: u64) {
        let ended = {
            let mut state = self.state();
            // A close already waiting for a later batch (two closes may
            // arrive in the other order than they read their numbers) keeps
            // waiting for it: this one cannot cut it short.
            let after = state
                .close_after
                .map_or(after, |pending| pending.max(after));
            if state.next > after {
                state.close_after = None;
                std::mem::take(&mut state.subscribers)
            } else {
                state.close_after = Some(after);
                Vec::new()
            }
        };
        // Their wake-ups run outside the lock; one that panics does not
        // keep the others from ending (nor aborts by panicking again).
        let mut panic = None;
        end_all(ended, &mut panic);
        crate::sync::resume_panic(panic);
    }
}

/// The wake-ups of one hand-out, run once the hub's lock is released. Two
/// are held inline (a stream and the callbacks adapter: no allocation per
/// batch), more in a buffer.
#[derive(Default)]
struct Wakes {
    inline: [Option<std::task::Waker>; 2],
    more: Vec<std::task::Waker>,
}

impl Wakes {
    fn push(&mut self, waker: Option<std::task::Waker>) {
        let Some(waker) = waker else {
            return;
        };
        match self.inline.iter_mut().find(|w| w.is_none()) {
            Some(free) => *free = Some(waker),
            None => self.more.push(waker),
        }
    }

    /// Wakes every receiver; a wake-up that panics does not stop the
    /// others (the first panic is kept in `panic`).
    fn wake_all(self, panic: &mut Option<Box<dyn std::any::Any + Send>>) {
        let Wakes { inline, more } = self;
        for waker in inline.into_iter().flatten().chain(more) {
            if let Err(p) = catch_unwind(AssertUnwindSafe(|| waker.wake())) {
                panic.get_or_insert(p);
            }
        }
    }
}

/// Drops the subscribers that ended (each wakes its receiver, which then
/// sees the end); a wake-up that panics does not stop the others.
fn end_all(ended: Vec<Subscriber>, panic: &mut Option<Box<dyn std::any::Any + Send>>) {
    for s in ended {
        if let Err(p) = catch_unwind(AssertUnwindSafe(|| drop(s))) {
            panic.get_or_insert(p);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use futures::task::noop_waker_ref;

    use super::*;
    use crate::event::{LeaderTerm, LossReason, RpcKind};

    /// The one place that builds a term, so a change of `LeaderTerm::new`
    /// touches only this line.
    fn term(id: u64) -> LeaderTerm {
        let lease = std::sync::Arc::default();
        LeaderTerm::new(id, lease)
    }

    fn elected(id: u64) -> LeadershipEvent {
        LeadershipEvent::Elected {
            term: term(id),
            lease_remaining: Duration::from_secs(10),
        }
    }

    fn lost(id: u64) -> LeadershipEvent {
        LeadershipEvent::Lost {
            term: term(id),
            reason: LossReason::Expired,
        }
    }

    fn renewed(n: u64) -> LeadershipEvent {
        LeadershipEvent::Renewed {
            term_id: 1,
            lease_remaining: Duration::from_millis(n),
        }
    }

    fn failed(n: u64) -> LeadershipEvent {
        LeadershipEvent::RpcFailed {
            rpc: RpcKind::KeepAlive,
            code: tonic::Code::Unavailable,
            message: format!("failure {n}"),
            lease_remaining: Some(Duration::from_millis(n)),
        }
    }

    /// A compact, comparable description of an event.
    fn tag(ev: &LeadershipEvent) -> String {
        match ev {
            LeadershipEvent::Elected { term, .. } => format!("E{}", term.id()),
            LeadershipEvent::Lost { term, .. } => format!("L{}", term.id()),
            LeadershipEvent::Follower => "F".into(),
            LeadershipEvent::Renewed {
                lease_remaining, ..
            } => format!("R{}", lease_remaining.as_millis()),
            LeadershipEvent::RpcFailed { message, .. } => {
                format!("X{}", message.trim_start_matches("failure "))
            }
        }
    }

    /// Everything queued, without waiting.
    fn drain(rx: &mut EventReceiver) -> Vec<String> {
        let mut cx = Context::from_waker(noop_waker_ref());
        let mut out = Vec::new();
        while let Poll::Ready(Some(ev)) = rx.poll_recv(&mut cx) {
            out.push(tag(&ev));
        }
        out
    }

    #[tokio::test]
    async fn one_waiting_event_is_held_inline_and_a_drained_queue_holds_no_buffer() {
        let (tx, mut rx) = channel();
        let inline = |rx: &EventReceiver| matches!(rx.shared.state().queue, Queue::One(_));
        let empty = |rx: &EventReceiver| matches!(rx.shared.state().queue, Queue::Empty);
        tx.send(renewed(1));
        assert!(inline(&rx), "one event needs no buffer");
        tx.send(renewed(2));
        assert!(
            inline(&rx),
            "a renewal replacing the one queued needs none either"
        );
        assert_eq!(drain(&mut rx), ["R2"]);
        assert!(empty(&rx));
        tx.send(renewed(3));
        tx.send(lost(1));
        tx.send(failed(4));
        tx.send(renewed(5));
        assert_eq!(rx.queued(), 4);
        assert_eq!(drain(&mut rx), ["R3", "L1", "X4", "R5"]);
        assert!(empty(&rx), "an emptied queue gives its buffer back");
    }

    #[tokio::test]
    async fn renewals_into_an_unpolled_queue_keep_only_the_latest() {
        let (tx, mut rx) = channel();
        for n in 0..10_000 {
            assert!(tx.send(renewed(n)));
        }
        assert_eq!(rx.queued(), 1);
        assert_eq!(tx.coalesced(), 9_999);
        assert_eq!(drain(&mut rx), ["R9999"]);
    }

    #[tokio::test]
    async fn transitions_are_never_dropped_and_keep_their_order() {
        let (tx, mut rx) = channel();
        let mut expected = Vec::new();
        for id in 1..=1_000 {
            tx.send(LeadershipEvent::Follower);
            tx.send(renewed(id));
            tx.send(elected(id));
            for n in 0..5 {
                tx.send(renewed(id * 10 + n));
            }
            tx.send(lost(id));
            expected.extend([
                "F".to_string(),
                format!("R{id}"),
                format!("E{id}"),
                format!("R{}", id * 10 + 4),
                format!("L{id}"),
            ]);
        }
        assert_eq!(drain(&mut rx), expected);
    }

    #[tokio::test]
    async fn alternating_renewals_and_failures_keep_one_of_each() {
        let (tx, mut rx) = channel();
        for n in 0..10_000 {
            if n % 2 == 0 {
                tx.send(renewed(n));
            } else {
                tx.send(failed(n));
            }
        }
        assert_eq!(rx.queued(), 2);
        assert_eq!(rx.coalesced(), 9_998);
        // The last two sent, in the order they were sent.
        assert_eq!(drain(&mut rx), ["R9998", "X9999"]);
    }

    #[tokio::test]
    async fn a_newer_status_event_moves_to_the_end_of_its_segment() {
        let (tx, mut rx) = channel();
        tx.send(renewed(1));
        tx.send(failed(2));
        tx.send(renewed(3));
        assert_eq!(drain(&mut rx), ["X2", "R3"]);
    }

    #[tokio::test]
    async fn coalescing_stops_at_the_last_transition() {
        let (tx, mut rx) = channel();
        tx.send(elected(1));
        tx.send(renewed(1));
        tx.send(failed(2));
        tx.send(lost(1));
        tx.send(renewed(3));
        tx.send(failed(4));
        tx.send(failed(5));
        assert_eq!(tx.coalesced(), 1);
        assert_eq!(drain(&mut rx), ["E1", "R1", "X2", "L1", "R3", "X5"]);
    }

    #[tokio::test]
    async fn coalescing_continues_after_the_receiver_took_the_transition() {
        let (tx, mut rx) = channel();
        tx.send(elected(1));
        tx.send(renewed(1));
        assert_eq!(drain(&mut rx), ["E1", "R1"]);
        tx.send(renewed(2));
        tx.send(renewed(3));
        assert_eq!(drain(&mut rx), ["R3"]);
    }

    #[tokio::test]
    async fn the_receiver_drains_then_gets_none_after_close() {
        let (tx, mut rx) = channel();
        tx.send(elected(1));
        tx.send(renewed(1));
        tx.close();
        assert!(!tx.send(renewed(2)), "a closed queue takes no more events");
        assert_eq!(rx.recv().await.as_ref().map(tag), Some("E1".into()));
        assert_eq!(rx.recv().await.as_ref().map(tag), Some("R1".into()));
        assert!(rx.recv().await.is_none());
        assert!(rx.recv().await.is_none());
    }

    #[tokio::test]
    async fn dropping_the_sender_closes_the_queue() {
        let (tx, mut rx) = channel();
        tx.send(LeadershipEvent::Follower);
        drop(tx);
        assert_eq!(rx.recv().await.as_ref().map(tag), Some("F".into()));
        assert!(rx.recv().await.is_none());
    }

    #[tokio::test]
    async fn the_sender_sees_the_receiver_gone() {
        let (tx, rx) = channel();
        assert!(!tx.receiver_gone());
        assert!(tx.send(elected(1)));
        drop(rx);
        assert!(tx.receiver_gone());
        assert!(!tx.send(renewed(1)));
        assert_eq!(tx.queued(), 0, "undelivered events are freed at once");
    }

    #[tokio::test]
    async fn a_waiting_recv_wakes_on_send() {
        let (tx, mut rx) = channel();
        let waiter = tokio::spawn(async move { rx.recv().await.as_ref().map(tag) });
        tokio::task::yield_now().await;
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert!(!waiter.is_finished(), "nothing was sent yet");
        tx.send(LeadershipEvent::Follower);
        let got = tokio::time::timeout(Duration::from_secs(5), waiter).await;
        assert!(
            matches!(got, Ok(Ok(Some(ref t))) if t == "F"),
            "got {got:?}"
        );
    }

    #[tokio::test]
    async fn a_waiting_recv_wakes_on_close() {
        let (tx, mut rx) = channel();
        let waiter = tokio::spawn(async move { rx.recv().await.is_none() });
        tokio::time::sleep(Duration::from_millis(10)).await;
        tx.close();
        let got = tokio::time::timeout(Duration::from_secs(5), waiter).await;
        assert!(matches!(got, Ok(Ok(true))), "got {got:?}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_sends_lose_no_transition_and_no_wake_up() {
        let (tx, mut rx) = channel();
        let producer = tokio::spawn(async move {
            for id in 1..=2_000 {
                tx.send(elected(id));
                tx.send(renewed(id));
                tx.send(failed(id));
                tx.send(lost(id));
                if id % 100 == 0 {
                    tokio::task::yield_now().await;
                }
            }
        });
        let mut transitions = Vec::new();
        let consumed = tokio::time::timeout(Duration::from_secs(30), async {
            while let Some(ev) = rx.recv().await {
                if kind(&ev) == Kind::Transition {
                    transitions.push(tag(&ev));
                }
            }
        })
        .await;
        assert!(consumed.is_ok(), "the receiver missed a wake-up");
        assert!(producer.await.is_ok());
        let expected: Vec<String> = (1..=2_000)
            .flat_map(|id| [format!("E{id}"), format!("L{id}")])
            .collect();
        assert_eq!(transitions, expected);
    }

    #[tokio::test]
    async fn the_hub_hands_batches_out_in_the_order_they_were_numbered() {
        let hub = Hub::default();
        let mut rx = hub.subscribe(1, None);
        let mut logged = Vec::new();
        // Batch 2 arrives first: it waits for batch 1.
        hub.deliver(2, vec![lost(1)], |evs| logged.extend(evs.iter().map(tag)));
        assert!(drain(&mut rx).is_empty(), "batch 2 went out before batch 1");
        assert!(logged.is_empty());
        hub.deliver(1, vec![elected(1), renewed(5)], |evs| {
            logged.extend(evs.iter().map(tag))
        });
        assert_eq!(drain(&mut rx), ["E1", "R5", "L1"]);
        assert_eq!(logged, ["E1", "R5", "L1"]);
        hub.deliver(3, vec![elected(2)], |_| {});
        assert_eq!(drain(&mut rx), ["E2"]);
    }

    #[tokio::test]
    async fn a_subscriber_gets_its_snapshot_then_only_the_batches_after_it() {
        let hub = Hub::default();
        let mut early = hub.subscribe(1, None);
        // Batches 1 and 2 were applied before the late subscriber's snapshot
        // (which reflects them) but are handed out after it subscribed.
        let mut late = hub.subscribe(3, Some(elected(2)));
        hub.deliver(2, vec![elected(2)], |_| {});
        hub.deliver(1, vec![elected(1), lost(1)], |_| {});
        hub.deliver(3, vec![renewed(7)], |_| {});
        assert_eq!(drain(&mut early), ["E1", "L1", "E2", "R7"]);
        assert_eq!(drain(&mut late), ["E2", "R7"]);
    }

    /// The `each` hook runs the application's code (its tracing layers,
    /// its metrics recorder). If it panics on one batch, that batch and
    /// every later one must still reach every subscriber: a batch left
    /// undelivered would park every later one in `early` for ever (no
    /// event again, on any stream, and `early` growing with each renewal).
    #[tokio::test]
    async fn a_panic_in_the_hook_neither_loses_the_batch_nor_stalls_the_next() {
        let hub = Hub::default();
        let mut rx = hub.subscribe(1, None);
        let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            hub.deliver(1, vec![elected(1)], |_| panic!("a recorder's bug"))
        }));
        assert!(panicked.is_err(), "the hook's panic is not hidden");
        hub.deliver(2, vec![lost(1)], |_| {});
        hub.deliver(3, vec![elected(2)], |_| {});
        assert_eq!(drain(&mut rx), ["E1", "L1", "E2"]);
        assert!(hub.state().early.is_empty(), "batches parked for ever");
    }

    /// The same for a batch handed out from `early` (its hook panics while
    /// the task that delivered the batch before it hands it out).
    #[tokio::test]
    async fn a_panic_in_the_hook_for_a_parked_batch_does_not_stall_the_next() {
        let hub = Hub::default();
        let mut rx = hub.subscribe(1, None);
        hub.deliver(2, vec![lost(1)], |_| {});
        let mut calls = 0;
        let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            hub.deliver(1, vec![elected(1)], |_| {
                calls += 1;
                if calls == 2 {
                    panic!("a recorder's bug");
                }
            })
        }));
        assert!(panicked.is_err(), "the hook's panic is not hidden");
        hub.deliver(3, vec![elected(2)], |_| {});
        assert_eq!(drain(&mut rx), ["E1", "L1", "E2"]);
        assert!(hub.state().early.is_empty(), "batches parked for ever");
    }

    /// A subscriber's wake-up runs its executor's code: one that panics
    /// costs neither that subscriber the rest of the batch, nor the other
    /// subscribers the batch, nor anyone the later batches.
    #[tokio::test]
    async fn a_panicking_wake_up_loses_no_event_for_anyone() {
        struct Panics;
        impl futures::task::ArcWake for Panics {
            fn wake_by_ref(_: &Arc<Self>) {
                panic!("an executor's bug");
            }
        }
        let hub = Hub::default();
        let mut broken = hub.subscribe(1, None);
        let mut fine = hub.subscribe(1, None);
        let waker = futures::task::waker(Arc::new(Panics));
        assert!(broken
            .poll_recv(&mut Context::from_waker(&waker))
            .is_pending());
        let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            hub.deliver(1, vec![elected(1), renewed(5)], |_| {})
        }));
        assert!(panicked.is_err(), "the wake-up's panic is not hidden");
        hub.deliver(2, vec![lost(1)], |_| {});
        assert_eq!(drain(&mut fine), ["E1", "R5", "L1"]);
        assert_eq!(drain(&mut broken), ["E1", "R5", "L1"]);
    }

    /// `shutdown()` closes the hub after its release's `Lost`; a batch
    /// numbered before the close but still on its way (a tick's `Lost` at
    /// the deadline, applied by the driver on another thread) must still
    /// reach the subscribers: "streams and callbacks end after the loss",
    /// never after an `Elected` alone.
    #[tokio::test]
    async fn closing_the_hub_waits_for_the_batches_numbered_before_it() {
        let hub = Hub::default();
        let mut rx = hub.subscribe(1, None);
        // Batch 1 (the term) is on its way; batch 2 (its loss) arrived.
        hub.deliver(2, vec![lost(1)], |_| {});
        hub.close(2);
        hub.deliver(1, vec![elected(1)], |_| {});
        assert_eq!(drain(&mut rx), ["E1", "L1"]);
        assert_eq!(rx.recv().await.map(|ev| tag(&ev)), None);
    }

    /// Two closes (two `shutdown()` calls, each reading the last number
    /// under the state lock, then closing the hub after letting go of it)
    /// may reach the hub in the other order. The one numbered earlier must
    /// not cut the other short: a batch numbered before a close reaches
    /// every subscriber before it ends.
    #[tokio::test]
    async fn a_close_numbered_earlier_does_not_cut_a_later_close_short() {
        let hub = Hub::default();
        let mut rx = hub.subscribe(1, None);
        // Batch 1 is on its way; batch 2 arrived.
        hub.deliver(2, vec![lost(1)], |_| {});
        hub.close(2);
        hub.close(1);
        hub.deliver(1, vec![elected(1)], |_| {});
        assert_eq!(drain(&mut rx), ["E1", "L1"]);
        assert_eq!(rx.recv().await.map(|ev| tag(&ev)), None);
        // The same while batch 2 is being handed out (its hook runs): the
        // earlier close does not end the subscribers meanwhile.
        let hub = Hub::default();
        let mut rx = hub.subscribe(1, None);
        hub.deliver(1, vec![elected(1)], |_| {});
        hub.deliver(2, vec![lost(1)], |_| {
            hub.close(2);
            hub.close(1);
        });
        assert_eq!(drain(&mut rx), ["E1", "L1"]);
        assert_eq!(rx.recv().await.map(|ev| tag(&ev)), None);
    }

    /// A hook (the application's tracing layer or recorder) that blocks
    /// while other threads hand out the later batches, a subscriber joins,
    /// every subscriber is woken (`wake_all`) and the hub is closed: once it
    /// returns, every subscriber has exactly its events, in order, then its
    /// end, and nothing is left parked.
    #[test]
    fn a_blocked_hook_with_later_batches_a_new_subscriber_and_a_close_loses_nothing() {
        let hub = Arc::new(Hub::default());
        let mut early_rx = hub.subscribe(1, None);
        let (entered_tx, entered) = std::sync::mpsc::channel();
        let (go_tx, go) = std::sync::mpsc::channel::<()>();
        let blocked = std::thread::spawn({
            let hub = hub.clone();
            move || {
                let mut first = true;
                hub.deliver(1, vec![elected(1)], |_| {
                    if std::mem::take(&mut first) {
                        let _ = entered_tx.send(());
                        let _ = go.recv_timeout(Duration::from_secs(30));
                    }
                });
            }
        });
        entered
            .recv_timeout(Duration::from_secs(30))
            .expect("the hook runs");
        // Batches 2 and 3, applied meanwhile on other threads, park.
        for (seq, batch) in [(2, vec![lost(1)]), (3, vec![elected(2), renewed(4)])] {
            let hub = hub.clone();
            std::thread::spawn(move || hub.deliver(seq, batch, |_| {}))
                .join()
                .expect("a later batch does not wait for the hook");
        }
        // A subscriber made now reflects batches 1 to 3 in its snapshot.
        let mut late = hub.subscribe(4, Some(elected(2)));
        hub.wake_all();
        hub.close(3);
        assert_eq!(
            drain(&mut early_rx),
            Vec::<String>::new(),
            "overtook batch 1"
        );
        let _ = go_tx.send(());
        blocked.join().expect("the delivery finishes");
        assert_eq!(drain(&mut early_rx), ["E1", "L1", "E2", "R4"]);
        assert_eq!(drain(&mut late), ["E2"]);
        let mut cx = Context::from_waker(noop_waker_ref());
        assert!(matches!(early_rx.poll_recv(&mut cx), Poll::Ready(None)));
        assert!(matches!(late.poll_recv(&mut cx), Poll::Ready(None)));
        let state = hub.state();
        assert!(state.early.is_empty() && state.close_after.is_none());
        assert_eq!(state.next, 4);
    }

    /// `wake_all` (a driver gone: every stream is polled again) racing the
    /// hand-outs on other threads, with a consumer on a runtime waiting for
    /// each event: a waker taken by one and not the other never leaves an
    /// event queued with the consumer asleep, and nothing is lost or
    /// reordered.
    #[test]
    fn wake_all_racing_hand_outs_leaves_no_event_unseen() {
        const TERMS: u64 = 5_000;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let hub = Arc::new(Hub::default());
        let mut rx = hub.subscribe(1, None);
        let consumer = rt.spawn(async move {
            let mut got = 0u64;
            while got < 2 * TERMS {
                // The timer first: a consumer left asleep with an event
                // queued is not rescued by the timer's own poll.
                let ev = tokio::select! {
                    biased;
                    () = tokio::time::sleep(Duration::from_secs(10)) => None,
                    ev = rx.recv() => ev,
                };
                let Some(ev) = ev else {
                    return Err(format!("stuck after {got} events, {} queued", rx.queued()));
                };
                let id = got / 2 + 1;
                let want = if got.is_multiple_of(2) {
                    elected(id)
                } else {
                    lost(id)
                };
                if tag(&ev) != tag(&want) {
                    return Err(format!("{} where {} was due", tag(&ev), tag(&want)));
                }
                got += 1;
            }
            Ok(got)
        });
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let waking = std::thread::spawn({
            let (hub, stop) = (hub.clone(), stop.clone());
            move || {
                while !stop.load(Ordering::Relaxed) {
                    hub.wake_all();
                }
            }
        });
        // Two threads hand out alternate batches (each its own numbers),
        // so batches also park for each other.
        let handing: Vec<_> = (0..2u64)
            .map(|half| {
                let hub = hub.clone();
                std::thread::spawn(move || {
                    for id in 1..=TERMS {
                        let seq = 2 * id - 1 + half;
                        let ev = if half == 0 { elected(id) } else { lost(id) };
                        hub.deliver(seq, vec![ev], |_| {});
                    }
                })
            })
            .collect();
        for h in handing {
            h.join().expect("hand-outs finish");
        }
        let outcome = rt.block_on(consumer).expect("consumer runs");
        stop.store(true, Ordering::Relaxed);
        waking.join().expect("waking stops");
        assert_eq!(outcome, Ok(2 * TERMS));
    }

    #[tokio::test]
    async fn closing_the_hub_ends_every_subscriber_after_what_it_holds() {
        let hub = Hub::default();
        let mut rx = hub.subscribe(1, Some(LeadershipEvent::Follower));
        hub.deliver(1, vec![elected(1)], |_| {});
        hub.close(1);
        assert_eq!(drain(&mut rx), ["F", "E1"]);
        assert_eq!(rx.recv().await.map(|ev| tag(&ev)), None);
    }

    /// The queue against the plain `VecDeque` it replaced (same coalescing
    /// rule), over random sends, partial drains and closes: the same events
    /// come out in the same order, with the same count of coalesced ones.
    #[test]
    fn the_inline_queue_behaves_like_a_plain_deque_over_random_traffic() {
        fn model_send(model: &mut VecDeque<LeadershipEvent>, ev: LeadershipEvent) -> bool {
            let replaced = match kind(&ev) {
                Kind::Transition => None,
                k => model
                    .iter()
                    .rev()
                    .take_while(|queued| kind(queued) != Kind::Transition)
                    .position(|queued| kind(queued) == k)
                    .map(|from_back| model.len() - 1 - from_back)
                    .and_then(|i| model.remove(i)),
            };
            model.push_back(ev);
            replaced.is_some()
        }
        let mut cx = Context::from_waker(noop_waker_ref());
        for seed in 0..300 {
            let mut rng = fastrand::Rng::with_seed(seed);
            let (tx, mut rx) = channel();
            let mut model = VecDeque::new();
            let mut coalesced = 0;
            for n in 0..200 {
                match rng.u8(..10) {
                    0 => {
                        tx.send(elected(n));
                        model_send(&mut model, elected(n));
                    }
                    1 => {
                        tx.send(lost(n));
                        model_send(&mut model, lost(n));
                    }
                    2 => {
                        tx.send(LeadershipEvent::Follower);
                        model_send(&mut model, LeadershipEvent::Follower);
                    }
                    3 | 4 => {
                        tx.send(renewed(n));
                        coalesced += u64::from(model_send(&mut model, renewed(n)));
                    }
                    5 | 6 => {
                        tx.send(failed(n));
                        coalesced += u64::from(model_send(&mut model, failed(n)));
                    }
                    _ => {
                        for _ in 0..rng.usize(..4) {
                            let got = match rx.poll_recv(&mut cx) {
                                Poll::Ready(Some(ev)) => Some(tag(&ev)),
                                Poll::Ready(None) => panic!("ended before the close"),
                                Poll::Pending => None,
                            };
                            assert_eq!(got, model.pop_front().as_ref().map(tag), "seed {seed}");
                        }
                    }
                }
                assert_eq!(rx.queued(), model.len(), "seed {seed}");
                assert_eq!(rx.coalesced(), coalesced, "seed {seed}");
            }
            tx.close();
            let rest: Vec<String> = model.iter().map(tag).collect();
            assert_eq!(drain(&mut rx), rest, "seed {seed}");
            assert!(matches!(rx.poll_recv(&mut cx), Poll::Ready(None)));
        }
    }

    /// A wake-up that re-enters the same queue (an executor that polls the
    /// woken task inline, and the task sends on to itself or reads) finds it
    /// unlocked.
    #[test]
    fn a_wake_up_that_reads_and_sends_again_does_not_deadlock() {
        struct Reenters {
            tx: Mutex<Option<EventSender>>,
            rx: Mutex<Option<EventReceiver>>,
            got: Mutex<Vec<String>>,
        }
        impl futures::task::ArcWake for Reenters {
            fn wake_by_ref(me: &Arc<Self>) {
                let waker = futures::task::waker_ref(me);
                let mut cx = Context::from_waker(&waker);
                // Busy: this is the wake-up of a send made below, and the
                // reading loop that made it picks the event up.
                let Ok(mut rx) = me.rx.try_lock() else { return };
                let Some(rx) = rx.as_mut() else { return };
                while let Poll::Ready(Some(ev)) = rx.poll_recv(&mut cx) {
                    let t = tag(&ev);
                    crate::sync::lock(&me.got).push(t.clone());
                    if t == "E1" {
                        if let Some(tx) = crate::sync::lock(&me.tx).as_ref() {
                            tx.send(lost(1));
                        }
                    }
                }
            }
        }
        let (tx, mut rx) = channel();
        let me = Arc::new(Reenters {
            tx: Mutex::new(None),
            rx: Mutex::new(None),
            got: Mutex::new(Vec::new()),
        });
        let waker = futures::task::waker(me.clone());
        assert!(rx.poll_recv(&mut Context::from_waker(&waker)).is_pending());
        *crate::sync::lock(&me.rx) = Some(rx);
        let (done_tx, done) = std::sync::mpsc::channel();
        let sender = Arc::new(tx);
        *crate::sync::lock(&me.tx) = Some(EventSender {
            shared: sender.shared.clone(),
        });
        let thread = std::thread::spawn({
            let sender = sender.clone();
            move || {
                sender.send(elected(1));
                let _ = done_tx.send(());
            }
        });
        let finished = done.recv_timeout(Duration::from_secs(10)).is_ok();
        assert!(finished, "a wake-up re-entering its own queue deadlocked");
        assert!(thread.join().is_ok());
        // `Lost` was sent from inside the wake-up that read `Elected`, and
        // read by it.
        let mut got = crate::sync::lock(&me.got).clone();
        if let Some(rx) = crate::sync::lock(&me.rx).as_mut() {
            got.extend(drain(rx));
        }
        assert_eq!(got, ["E1", "L1"]);
        drop(crate::sync::lock(&me.tx).take());
    }

    /// A subscriber's wake-up that creates another subscriber of the same
    /// hub (an executor that polls the woken task inline, and the task
    /// calls `client.leadership()`, or drops its stream) must not deadlock
    /// the task handing the batch out.
    #[test]
    fn a_wake_up_that_subscribes_to_the_hub_does_not_deadlock() {
        struct Subscribes {
            hub: Arc<Hub>,
            subscribed: Mutex<Vec<EventReceiver>>,
        }
        impl futures::task::ArcWake for Subscribes {
            fn wake_by_ref(me: &Arc<Self>) {
                let rx = me.hub.subscribe(2, Some(elected(1)));
                crate::sync::lock(&me.subscribed).push(rx);
            }
        }
        let hub = Arc::new(Hub::default());
        let mut rx = hub.subscribe(1, None);
        let me = Arc::new(Subscribes {
            hub: hub.clone(),
            subscribed: Mutex::new(Vec::new()),
        });
        let waker = futures::task::waker(me.clone());
        assert!(rx.poll_recv(&mut Context::from_waker(&waker)).is_pending());
        let (done_tx, done) = std::sync::mpsc::channel();
        let delivering = hub.clone();
        let thread = std::thread::spawn(move || {
            delivering.deliver(1, vec![elected(1)], |_| {});
            let _ = done_tx.send(());
        });
        let finished = done.recv_timeout(Duration::from_secs(10)).is_ok();
        if !finished {
            // The thread is stuck for good: leave it (and what it holds).
            std::mem::forget(thread);
            std::mem::forget(me);
            panic!("a wake-up that subscribed to the hub deadlocked the delivery");
        }
        assert!(thread.join().is_ok());
        assert_eq!(drain(&mut rx), ["E1"]);
        hub.deliver(2, vec![lost(1)], |_| {});
        let mut late = crate::sync::lock(&me.subscribed)
            .pop()
            .expect("the wake-up subscribed");
        assert_eq!(drain(&mut late), ["E1", "L1"]);
    }

    /// The `each` hook runs the application's tracing layers and metrics
    /// recorder: one that creates a stream (subscribes to the hub) or whose
    /// code ends up handing out a later batch must not deadlock.
    #[test]
    fn a_hook_that_subscribes_or_hands_out_a_later_batch_does_not_deadlock() {
        let hub = Arc::new(Hub::default());
        let mut rx = hub.subscribe(1, None);
        let (done_tx, done) = std::sync::mpsc::channel();
        let delivering = hub.clone();
        let thread = std::thread::spawn(move || {
            let mut late = None;
            delivering.deliver(1, vec![elected(1)], |_| {
                if late.is_none() {
                    late = Some(delivering.subscribe(2, Some(elected(1))));
                    // Batch 2, applied meanwhile, handed out from inside.
                    delivering.deliver(2, vec![lost(1)], |_| {});
                }
            });
            let _ = done_tx.send(());
            late
        });
        if done.recv_timeout(Duration::from_secs(10)).is_err() {
            std::mem::forget(thread);
            panic!("a hook that re-entered the hub deadlocked the delivery");
        }
        let late = thread.join().ok().flatten();
        assert_eq!(drain(&mut rx), ["E1", "L1"]);
        let mut late = late.expect("the hook subscribed");
        assert_eq!(drain(&mut late), ["E1", "L1"]);
        assert!(hub.state().early.is_empty());
    }

    /// A subscriber whose receiver was dropped is forgotten by the next
    /// `subscribe`, which runs under the election's state lock: its last
    /// waker (a task that no longer reads it) is not woken there.
    #[test]
    fn forgetting_a_gone_subscriber_wakes_nobody() {
        struct Counts(AtomicU64);
        impl futures::task::ArcWake for Counts {
            fn wake_by_ref(me: &Arc<Self>) {
                me.0.fetch_add(1, Ordering::SeqCst);
            }
        }
        let hub = Hub::default();
        let mut rx = hub.subscribe(1, None);
        let counts = Arc::new(Counts(AtomicU64::new(0)));
        let waker = futures::task::waker(counts.clone());
        assert!(rx.poll_recv(&mut Context::from_waker(&waker)).is_pending());
        drop(rx);
        let _other = hub.subscribe(1, None);
        assert_eq!(
            hub.state().subscribers.len(),
            1,
            "the gone one is forgotten"
        );
        assert_eq!(
            counts.0.load(Ordering::SeqCst),
            0,
            "a gone receiver was woken"
        );
    }

    use crate::sync::WakeCount;

    /// A receiver polled once with `wakes`'s waker: `Pending`, registered.
    fn wait_with(rx: &mut EventReceiver, wakes: &Arc<WakeCount>) {
        let waker = std::task::Waker::from(wakes.clone());
        assert!(rx.poll_recv(&mut Context::from_waker(&waker)).is_pending());
    }

    /// A subscriber that left renewals out is neither handed a `Renewed`
    /// nor woken for one (a process holding thousands of locks would
    /// otherwise wake its consumer for every renewal of every lock), while
    /// every other event still reaches it, in order, with a wake-up; a
    /// subscriber beside it that did not still gets everything.
    #[tokio::test]
    async fn a_subscriber_without_renewals_is_neither_handed_nor_woken_by_one() {
        let hub = Hub::default();
        let mut quiet = hub.subscribe(1, None);
        quiet.skip_renewals();
        let mut all = hub.subscribe(1, None);
        let wakes = Arc::new(WakeCount::default());
        hub.deliver(1, vec![elected(1)], |_| {});
        assert_eq!(drain(&mut quiet), ["E1"]);
        wait_with(&mut quiet, &wakes);
        for n in 2..50 {
            hub.deliver(n, vec![renewed(n)], |_| {});
        }
        assert_eq!(wakes.count(), 0, "woken for a renewal it left out");
        wait_with(&mut quiet, &wakes);
        hub.deliver(50, vec![renewed(50), failed(51), lost(1)], |_| {});
        assert_eq!(wakes.count(), 1, "not woken for the events it keeps");
        assert_eq!(drain(&mut quiet), ["X51", "L1"]);
        assert_eq!(drain(&mut all), ["E1", "R50", "X51", "L1"]);
    }

    /// Renewals already queued when a receiver leaves them out are dropped
    /// with it (in every segment); the transitions between them stay.
    #[tokio::test]
    async fn leaving_renewals_out_drops_those_already_queued() {
        let (tx, mut rx) = channel();
        tx.send(elected(1));
        tx.send(renewed(2));
        tx.send(lost(1));
        tx.send(renewed(3));
        tx.send(failed(4));
        rx.skip_renewals();
        assert_eq!(rx.queued(), 3);
        assert!(tx.send(renewed(5)), "the subscriber is not gone");
        assert_eq!(drain(&mut rx), ["E1", "L1", "X4"]);
    }

    /// A subscriber that left renewals out and whose batches held only
    /// renewals (it was not woken for them) is still woken by a close that
    /// waited for those batches, and ends; so is one whose last batch was
    /// only renewals when the hub closes at once.
    #[tokio::test]
    async fn a_quiet_subscriber_passed_over_by_renewals_still_sees_the_close() {
        let hub = Hub::default();
        let mut quiet = hub.subscribe(1, None);
        quiet.skip_renewals();
        hub.deliver(1, vec![elected(1)], |_| {});
        assert_eq!(drain(&mut quiet), ["E1"]);
        let wakes = Arc::new(WakeCount::default());
        wait_with(&mut quiet, &wakes);
        // The close waits for batch 3, which arrives ahead of batch 2.
        hub.close(3);
        hub.deliver(3, vec![renewed(3)], |_| {});
        assert_eq!(wakes.count(), 0, "woken before the batches it waits for");
        hub.deliver(2, vec![renewed(2)], |_| {});
        assert_eq!(wakes.count(), 1, "the close did not wake it");
        let waker = std::task::Waker::from(wakes.clone());
        let mut cx = Context::from_waker(&waker);
        assert!(matches!(quiet.poll_recv(&mut cx), Poll::Ready(None)));

        let hub = Hub::default();
        let mut quiet = hub.subscribe(1, None);
        quiet.skip_renewals();
        let wakes = Arc::new(WakeCount::default());
        wait_with(&mut quiet, &wakes);
        hub.deliver(1, vec![renewed(1)], |_| {});
        assert_eq!(wakes.count(), 0);
        hub.close(1);
        assert_eq!(wakes.count(), 1, "the close did not wake it");
        assert!(matches!(quiet.poll_recv(&mut cx), Poll::Ready(None)));
    }

    /// Renewals left out while another thread hands batches out: once
    /// `skip_renewals` has returned, no `Renewed` is read, and every
    /// transition is, once and in order.
    #[test]
    fn leaving_renewals_out_while_batches_are_handed_out_loses_no_transition() {
        for round in 0..100u64 {
            let hub = Arc::new(Hub::default());
            let mut rx = hub.subscribe(1, None);
            let publisher = {
                let hub = hub.clone();
                std::thread::spawn(move || {
                    for seq in 1..=300u64 {
                        let ev = if seq % 7 == 0 {
                            elected(seq)
                        } else {
                            renewed(seq)
                        };
                        hub.deliver(seq, vec![ev], |_| {});
                    }
                })
            };
            let mut before = Vec::new();
            for _ in 0..round {
                before.extend(drain(&mut rx));
                std::thread::yield_now();
            }
            rx.skip_renewals();
            let mut after = Vec::new();
            while !publisher.is_finished() {
                after.extend(drain(&mut rx));
            }
            publisher.join().unwrap();
            after.extend(drain(&mut rx));
            assert!(
                after.iter().all(|tag| !tag.starts_with('R')),
                "round {round}: a renewal read after they were left out: {after:?}"
            );
            let transitions: Vec<String> = before
                .iter()
                .chain(&after)
                .filter(|tag| tag.starts_with('E'))
                .cloned()
                .collect();
            let expected: Vec<String> = (1..=300u64)
                .filter(|seq| seq % 7 == 0)
                .map(|seq| format!("E{seq}"))
                .collect();
            assert_eq!(transitions, expected, "round {round}");
        }
    }
}
