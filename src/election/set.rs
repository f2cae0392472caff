//! [`LeadershipSet`]: many [`Leadership`] streams read as one, at a cost per
//! event that does not grow with the number of streams.

use std::collections::{HashMap, VecDeque};
use std::hash::Hash;
use std::pin::Pin;
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll, Wake, Waker};

use futures::task::AtomicWaker;
use futures::Stream;

use super::Leadership;
use crate::error::Result;
use crate::event::LeadershipEvent;

/// How many members a poll looks at without finding an event before it
/// yields to the executor (it wakes itself to go on): a set whose members
/// are woken without news cannot hog its thread.
const POLLS_PER_TURN: usize = 128;

/// Many [`Leadership`] streams read as one stream of `(key, event)`.
///
/// A process that leads many locks (one per shard, tenant or job) keeps
/// one [`for_scope`](crate::QuorumQuestClient::for_scope) client per lock,
/// all on one connection and one campaign task, and reads all their
/// streams here. Reading costs the same per event whether the set holds
/// ten streams or a hundred thousand: a stream is polled only after it
/// woke, and only it (where [`futures::stream::select_all()`] allocates for
/// every event and a `StreamMap` polls every stream on every poll).
///
/// Each stream keeps every guarantee of its own: its events arrive in
/// order, `Elected` and `Lost` alternate, and its campaign runs from the
/// set's first poll until the stream leaves the set
/// ([`remove`](Self::remove)) or the set is dropped. Streams of different
/// keys are served in turn, so a busy one cannot starve the others.
///
/// A stream that ends (its client was shut down) leaves the set after its
/// last event. Like `FuturesUnordered`, the set yields `None` while it is
/// empty; streams inserted later are read by the next poll.
///
/// The key is cloned for every event: use a cheap one (an index, an
/// `Arc<str>`).
///
/// ```no_run
/// use futures::StreamExt;
/// use quorum_quest_client::{LeadershipEvent, LeadershipSet, QuorumQuestClient};
///
/// # async fn demo() -> quorum_quest_client::Result<()> {
/// let root = QuorumQuestClient::builder("billing", "shards")
///     .address("http://localhost:5050")
///     .build()
///     .await?;
/// let mut shards = LeadershipSet::new();
/// for shard in 0..1_000u32 {
///     let client = root.for_scope("billing", format!("shard-{shard}"))?;
///     shards.insert(shard, client.leadership());
/// }
/// while let Some((shard, event)) = shards.next().await {
///     match event {
///         LeadershipEvent::Elected { .. } => println!("leading shard {shard}"),
///         LeadershipEvent::Lost { reason, .. } => println!("lost shard {shard}: {reason}"),
///         _ => {}
///     }
/// }
/// # Ok(()) }
/// ```
#[must_use = "the streams of a set start campaigning when the set is first polled"]
pub struct LeadershipSet<K> {
    members: Members<K, Leadership>,
}

/// The set's workings, for any stream (tests use their own).
struct Members<K, S> {
    /// The members, by slot; a free slot is `None` (and listed in `free`).
    slots: Vec<Option<Member<K, S>>>,
    free: Vec<usize>,
    /// Each key's slot.
    index: HashMap<K, usize>,
    /// Counts the members ever inserted: a member's wake-up names it by
    /// slot and this number, so that one of a member gone does not count
    /// for the next one in its slot.
    inserted: u64,
    shared: Arc<Shared>,
    /// The runtime the set was last polled on (`None`: none). Polled on
    /// another, it looks at every member once: a stream arms its backstop
    /// of the step-down timer on the runtime that polls it (see
    /// `Backstop`), and a member not woken since would keep the one of a
    /// runtime that may no longer run (or none), its loss at the deadline
    /// never reported.
    runtime: Option<tokio::runtime::Id>,
}

struct Member<K, S> {
    key: K,
    stream: S,
    waker: Arc<MemberWaker>,
    /// `waker` as a [`Waker`], made once.
    as_waker: Waker,
}

/// The members woken since the set last looked, in the order they woke,
/// and the set's own waker.
#[derive(Default)]
struct Shared {
    ready: Mutex<VecDeque<(usize, u64)>>,
    waker: AtomicWaker,
}

/// What a member's stream is polled with: waking it queues the member
/// (once until the set looks at it) and wakes the set.
struct MemberWaker {
    slot: usize,
    id: u64,
    queued: std::sync::atomic::AtomicBool,
    /// Weak: a member's waker kept by its stream's queue must not keep the
    /// set's queue alive.
    shared: Weak<Shared>,
}

impl MemberWaker {
    /// Queues the member unless it is queued already; `false` if the set
    /// is gone or it was queued.
    fn queue(&self) -> Option<Arc<Shared>> {
        if self.queued.swap(true, std::sync::atomic::Ordering::AcqRel) {
            return None;
        }
        let shared = self.shared.upgrade()?;
        crate::sync::lock(&shared.ready).push_back((self.slot, self.id));
        Some(shared)
    }
}

impl Wake for MemberWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        if let Some(shared) = self.queue() {
            // Outside the lock: the set's task may run at once.
            shared.waker.wake();
        }
    }
}

// Nothing in a set is pinned: its streams are `Unpin`, its keys are never
// polled.
impl<K, S> Unpin for Members<K, S> {}

impl<K> Default for LeadershipSet<K> {
    fn default() -> Self {
        LeadershipSet {
            members: Members::default(),
        }
    }
}

impl<K, S> Default for Members<K, S> {
    fn default() -> Self {
        Members {
            slots: Vec::new(),
            free: Vec::new(),
            index: HashMap::new(),
            inserted: 0,
            shared: Arc::default(),
            runtime: None,
        }
    }
}

impl<K> std::fmt::Debug for LeadershipSet<K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeadershipSet")
            .field("len", &self.members.index.len())
            .finish_non_exhaustive()
    }
}

impl<K: Hash + Eq + Clone> LeadershipSet<K> {
    /// An empty set.
    ///
    /// ```
    /// use quorum_quest_client::LeadershipSet;
    ///
    /// let set: LeadershipSet<u32> = LeadershipSet::new();
    /// assert!(set.is_empty());
    /// ```
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `stream` under `key`. A stream already under `key` is taken out
    /// and returned (still campaigning: drop it to stop, or
    /// [`resign`](Leadership::resign) it).
    ///
    /// The stream is read from the set's next poll on (its first poll
    /// starts its campaign, if it had not started).
    ///
    /// ```no_run
    /// # use quorum_quest_client::{LeadershipSet, QuorumQuestClient};
    /// # fn demo(a: QuorumQuestClient, b: QuorumQuestClient) {
    /// let mut set = LeadershipSet::new();
    /// assert!(set.insert("a", a.leadership()).is_none());
    /// let replaced = set.insert("a", b.leadership());
    /// assert!(replaced.is_some());
    /// # }
    /// ```
    pub fn insert(&mut self, key: K, stream: Leadership) -> Option<Leadership> {
        self.members.insert(key, stream)
    }

    /// Takes the stream under `key` out of the set, still campaigning:
    /// drop it to stop, or [`resign`](Leadership::resign) it.
    ///
    /// ```no_run
    /// # use quorum_quest_client::{LeadershipSet, QuorumQuestClient};
    /// # async fn demo(client: QuorumQuestClient) -> quorum_quest_client::Result<()> {
    /// let mut set = LeadershipSet::new();
    /// set.insert(7u32, client.leadership());
    /// if let Some(stream) = set.remove(&7) {
    ///     stream.resign().await?;
    /// }
    /// # Ok(()) }
    /// ```
    pub fn remove(&mut self, key: &K) -> Option<Leadership> {
        self.members.remove(key)
    }

    /// Whether a stream is under `key`.
    pub fn contains_key(&self, key: &K) -> bool {
        self.members.index.contains_key(key)
    }

    /// The keys of the streams in the set, in no particular order.
    pub fn keys(&self) -> impl Iterator<Item = &K> + '_ {
        self.members.index.keys()
    }

    /// How many streams the set holds.
    pub fn len(&self) -> usize {
        self.members.index.len()
    }

    /// Whether the set holds no stream.
    pub fn is_empty(&self) -> bool {
        self.members.index.is_empty()
    }

    /// Resigns every stream in the set at once and waits until the server
    /// released each lock held (as [`Leadership::resign`] does for one):
    /// the releases go out together, through the connection's admission
    /// queue, so this takes about one round trip per `max_concurrent_calls`
    /// locks, not one per lock. Every term ends before its release is sent.
    ///
    /// Fails with the first release that failed (the others still ran; a
    /// lock whose release failed expires after its TTL).
    ///
    /// ```no_run
    /// # use quorum_quest_client::LeadershipSet;
    /// # async fn demo(set: LeadershipSet<u32>) -> quorum_quest_client::Result<()> {
    /// // On shutdown:
    /// set.resign().await?;
    /// # Ok(()) }
    /// ```
    pub async fn resign(mut self) -> Result<()> {
        super::run_all(self.members.take_shutdowns()).await
    }
}

impl<K> Drop for LeadershipSet<K> {
    /// Ends every stream's campaign and releases the locks they held,
    /// together: while any is held, on a multi-thread runtime, the drop
    /// waits (for one RPC timeout at most, not one per lock) until the
    /// releases are answered, as dropping one leading stream does.
    fn drop(&mut self) {
        super::Shutdown::run_all_on_drop(self.members.take_shutdowns());
    }
}

impl<K> Members<K, Leadership> {
    /// Ends every member stream's want of its campaign, and returns the
    /// shutdowns to run (see [`Leadership::take_shutdown`]).
    fn take_shutdowns(&mut self) -> Vec<super::Shutdown> {
        self.slots
            .iter_mut()
            .flatten()
            .filter_map(|member| member.stream.take_shutdown())
            .collect()
    }
}

impl<K: Hash + Eq + Clone, S: Stream + Unpin> Members<K, S> {
    fn insert(&mut self, key: K, stream: S) -> Option<S> {
        let replaced = self.remove(&key);
        let slot = self.free.pop().unwrap_or(self.slots.len());
        self.inserted += 1;
        self.compact_ready();
        let waker = Arc::new(MemberWaker {
            slot,
            id: self.inserted,
            queued: std::sync::atomic::AtomicBool::new(false),
            shared: Arc::downgrade(&self.shared),
        });
        let member = Member {
            key: key.clone(),
            stream,
            waker: waker.clone(),
            as_waker: Waker::from(waker.clone()),
        };
        if slot == self.slots.len() {
            self.slots.push(Some(member));
        } else if let Some(free) = self.slots.get_mut(slot) {
            *free = Some(member);
        }
        self.index.insert(key, slot);
        // Polled on the next turn: a stream reports its present state (and
        // starts its campaign) when first polled.
        waker.wake_by_ref();
        replaced
    }

    fn remove(&mut self, key: &K) -> Option<S> {
        let slot = self.index.remove(key)?;
        let member = self.slots.get_mut(slot)?.take()?;
        self.free.push(slot);
        Some(member.stream)
    }

    /// Drops the queued wake-ups of members gone, once they outnumber the
    /// slots: keys inserted and removed (or replaced) between two polls
    /// leave one each, and a set not polled meanwhile would keep them all.
    /// The members present are queued at most once each, so this runs
    /// after at least as many inserts as there are slots (amortized: no
    /// cost per insert that grows with the set).
    fn compact_ready(&self) {
        let mut ready = crate::sync::lock(&self.shared.ready);
        if ready.len() <= 2 * self.slots.len() + 64 {
            return;
        }
        let slots = &self.slots;
        ready.retain(
            |&(slot, id)| matches!(slots.get(slot), Some(Some(member)) if member.waker.id == id),
        );
    }

    fn next_ready(&self) -> Option<(usize, u64)> {
        crate::sync::lock(&self.shared.ready).pop_front()
    }
}

impl<K: Hash + Eq + Clone> Stream for LeadershipSet<K> {
    type Item = (K, LeadershipEvent);

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.members.poll_next(cx)
    }
}

impl<K: Hash + Eq + Clone, S: Stream + Unpin> Members<K, S> {
    /// The next event of a woken member (see [`LeadershipSet`]).
    fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Option<(K, S::Item)>> {
        // Registered before the queue is read: a member woken after the
        // read wakes this registration.
        self.shared.waker.register(cx.waker());
        let here = tokio::runtime::Handle::try_current()
            .ok()
            .map(|runtime| runtime.id());
        if here != self.runtime {
            self.runtime = here;
            for member in self.slots.iter().flatten() {
                // Queued (if not already), no wake-up: looked at below.
                drop(member.waker.queue());
            }
        }
        for _ in 0..POLLS_PER_TURN {
            let Some((slot, id)) = self.next_ready() else {
                if self.index.is_empty() {
                    return Poll::Ready(None);
                }
                return Poll::Pending;
            };
            let Some(Some(member)) = self.slots.get_mut(slot) else {
                continue;
            };
            if member.waker.id != id {
                // Woken for a member that left this slot since.
                continue;
            }
            // Cleared before the poll: a wake-up during or after it queues
            // the member again.
            member
                .waker
                .queued
                .store(false, std::sync::atomic::Ordering::Release);
            let mut member_cx = Context::from_waker(&member.as_waker);
            match Pin::new(&mut member.stream).poll_next(&mut member_cx) {
                Poll::Pending => {}
                Poll::Ready(Some(event)) => {
                    let key = member.key.clone();
                    // It may hold more: it is looked at again after the
                    // others woken before it, on the next poll (which the
                    // caller makes, having got an item: no wake-up).
                    drop(member.waker.queue());
                    return Poll::Ready(Some((key, event)));
                }
                Poll::Ready(None) => {
                    // Ended (its client was shut down): it leaves the set.
                    let key = member.key.clone();
                    self.remove(&key);
                }
            }
        }
        // Many members woke without news: let other tasks run, then go on
        // (if any is left to look at).
        if !crate::sync::lock(&self.shared.ready).is_empty() {
            cx.waker().wake_by_ref();
        }
        Poll::Pending
    }
}

impl<K: Hash + Eq + Clone> FromIterator<(K, Leadership)> for LeadershipSet<K> {
    fn from_iter<I: IntoIterator<Item = (K, Leadership)>>(iter: I) -> Self {
        let mut set = LeadershipSet::new();
        set.extend(iter);
        set
    }
}

impl<K: Hash + Eq + Clone> Extend<(K, Leadership)> for LeadershipSet<K> {
    fn extend<I: IntoIterator<Item = (K, Leadership)>>(&mut self, iter: I) {
        for (key, stream) in iter {
            // A stream replaced by a later one of the same key is dropped
            // (its campaign stops), as a map's `extend` drops the value.
            drop(self.insert(key, stream));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A stream the test feeds, counting its polls.
    #[derive(Clone, Default)]
    struct Fed(Arc<FedInner>);

    #[derive(Default)]
    struct FedInner {
        items: Mutex<(VecDeque<u32>, bool, Option<Waker>)>,
        polls: AtomicUsize,
    }

    impl Fed {
        fn push(&self, item: u32) {
            let waker = {
                let mut s = self.0.items.lock().unwrap();
                s.0.push_back(item);
                s.2.take()
            };
            if let Some(w) = waker {
                w.wake();
            }
        }

        fn end(&self) {
            let waker = {
                let mut s = self.0.items.lock().unwrap();
                s.1 = true;
                s.2.take()
            };
            if let Some(w) = waker {
                w.wake();
            }
        }

        fn polls(&self) -> usize {
            self.0.polls.load(Ordering::Relaxed)
        }

        /// Wakes whoever polled it last, with no news.
        fn wake_spuriously(&self) {
            let waker = self.0.items.lock().unwrap().2.clone();
            if let Some(w) = waker {
                w.wake();
            }
        }
    }

    impl Stream for Fed {
        type Item = u32;
        fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<u32>> {
            self.0.polls.fetch_add(1, Ordering::Relaxed);
            let mut s = self.0.items.lock().unwrap();
            match s.0.pop_front() {
                Some(item) => Poll::Ready(Some(item)),
                None if s.1 => Poll::Ready(None),
                None => {
                    s.2 = Some(cx.waker().clone());
                    Poll::Pending
                }
            }
        }
    }

    /// Counts the wake-ups of the set's own task.
    type Count = crate::sync::WakeCount;

    fn poll(set: &mut Members<u32, Fed>, count: &Arc<Count>) -> Poll<Option<(u32, u32)>> {
        let waker = Waker::from(count.clone());
        set.poll_next(&mut Context::from_waker(&waker))
    }

    #[test]
    fn only_the_woken_member_is_polled_whatever_the_size_of_the_set() {
        let mut set = Members::default();
        let feeds: Vec<Fed> = (0..1000).map(|_| Fed::default()).collect();
        for (i, f) in feeds.iter().enumerate() {
            set.insert(i as u32, f.clone());
        }
        let count = Arc::new(Count::default());
        // The first polls look at each member once (it may start a
        // campaign), a turn at a time: the set wakes itself between turns.
        assert!(poll(&mut set, &count).is_pending());
        while count.take() > 0 {
            assert!(poll(&mut set, &count).is_pending());
        }
        assert!(feeds.iter().all(|f| f.polls() == 1));
        feeds[417].push(7);
        assert_eq!(count.count(), 1, "the set is woken");
        assert_eq!(poll(&mut set, &count), Poll::Ready(Some((417, 7))));
        assert_eq!(poll(&mut set, &count), Poll::Pending);
        let polled: usize = feeds.iter().map(Fed::polls).sum();
        assert_eq!(polled, 1000 + 2, "only the woken member was polled (twice)");
    }

    #[test]
    fn a_member_with_a_backlog_does_not_starve_the_others() {
        let mut set = Members::default();
        let (busy, quiet) = (Fed::default(), Fed::default());
        set.insert(1, busy.clone());
        set.insert(2, quiet.clone());
        let count = Arc::new(Count::default());
        for i in 0..100 {
            busy.push(i);
        }
        quiet.push(1000);
        let mut order = Vec::new();
        for _ in 0..4 {
            if let Poll::Ready(Some((key, _))) = poll(&mut set, &count) {
                order.push(key);
            }
        }
        assert!(
            order.contains(&2),
            "the quiet member waited behind the busy one: {order:?}"
        );
    }

    #[test]
    fn a_wake_up_of_a_member_gone_does_not_poll_the_one_now_in_its_slot() {
        let mut set = Members::default();
        let (old, new) = (Fed::default(), Fed::default());
        let count = Arc::new(Count::default());
        set.insert(1, old.clone());
        assert_eq!(poll(&mut set, &count), Poll::Pending);
        let old = set.remove(&1).expect("the member");
        set.insert(2, new.clone());
        assert_eq!(set.slots.iter().flatten().count(), 1, "the slot was reused");
        assert_eq!(poll(&mut set, &count), Poll::Pending);
        assert_eq!(new.polls(), 1);
        // The old stream still holds the set's waker for its former slot.
        old.wake_spuriously();
        assert_eq!(poll(&mut set, &count), Poll::Pending);
        assert_eq!(new.polls(), 1, "polled for a wake-up that was not its own");
        assert_eq!(
            old.polls(),
            1,
            "a removed member is never polled by the set"
        );
    }

    #[test]
    fn an_ended_member_leaves_and_an_empty_set_ends() {
        let mut set = Members::default();
        let (a, b) = (Fed::default(), Fed::default());
        let count = Arc::new(Count::default());
        set.insert(1, a.clone());
        set.insert(2, b.clone());
        assert_eq!(poll(&mut set, &count), Poll::Pending);
        a.push(5);
        a.end();
        assert_eq!(poll(&mut set, &count), Poll::Ready(Some((1, 5))));
        assert_eq!(poll(&mut set, &count), Poll::Pending);
        assert!(!set.index.contains_key(&1));
        b.end();
        assert_eq!(poll(&mut set, &count), Poll::Ready(None));
    }

    #[test]
    fn many_wake_ups_without_news_yield_to_the_executor_and_go_on() {
        let mut set = Members::default();
        let feeds: Vec<Fed> = (0..(POLLS_PER_TURN as u32 * 2))
            .map(|_| Fed::default())
            .collect();
        for (i, f) in feeds.iter().enumerate() {
            set.insert(i as u32, f.clone());
        }
        let count = Arc::new(Count::default());
        assert_eq!(poll(&mut set, &count), Poll::Pending);
        assert_eq!(
            count.take(),
            1,
            "a full turn without news wakes the set to go on"
        );
        assert_eq!(poll(&mut set, &count), Poll::Pending);
        assert_eq!(count.count(), 0, "nothing left to look at");
        assert!(feeds.iter().all(|f| f.polls() == 1));
        feeds.last().unwrap().push(9);
        assert_eq!(
            poll(&mut set, &count),
            Poll::Ready(Some((POLLS_PER_TURN as u32 * 2 - 1, 9)))
        );
    }

    /// A stream whose event arrives while it is being polled (after it
    /// looked, before it returned `Pending`): its wake-up comes during the
    /// poll.
    struct ArrivesDuringPoll {
        item: Option<u32>,
        polls: usize,
    }

    impl Stream for ArrivesDuringPoll {
        type Item = u32;
        fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<u32>> {
            self.polls += 1;
            if self.polls == 1 {
                // Looked: nothing. The event lands now, and wakes.
                self.item = Some(11);
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            match self.item.take() {
                Some(item) => Poll::Ready(Some(item)),
                None => Poll::Pending,
            }
        }
    }

    #[test]
    fn a_member_woken_while_it_is_polled_is_polled_again() {
        let mut set = Members::default();
        set.insert(
            1,
            ArrivesDuringPoll {
                item: None,
                polls: 0,
            },
        );
        let count = Arc::new(Count::default());
        let waker = Waker::from(count.clone());
        let mut cx = Context::from_waker(&waker);
        assert_eq!(set.poll_next(&mut cx), Poll::Ready(Some((1, 11))));
    }

    /// A stream that wakes itself on every poll without news (a
    /// cooperative budget spent, a spurious wake-up source).
    struct AlwaysWakes(usize);

    impl Stream for AlwaysWakes {
        type Item = u32;
        fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<u32>> {
            self.0 += 1;
            cx.waker().wake_by_ref();
            Poll::Pending
        }
    }

    #[test]
    fn a_member_that_wakes_itself_on_every_poll_cannot_hold_the_set_for_ever() {
        let mut set = Members::default();
        set.insert(1, AlwaysWakes(0));
        let count = Arc::new(Count::default());
        let waker = Waker::from(count.clone());
        let mut cx = Context::from_waker(&waker);
        assert_eq!(set.poll_next(&mut cx), Poll::Pending);
        let polls = set
            .slots
            .iter()
            .flatten()
            .map(|m| m.stream.0)
            .sum::<usize>();
        assert_eq!(polls, POLLS_PER_TURN, "one turn, then back to the executor");
        assert!(count.count() >= 1, "and it goes on later");
    }

    #[test]
    fn keys_replaced_and_removed_between_polls_leave_no_growing_queue() {
        let mut set = Members::default();
        let count = Arc::new(Count::default());
        let kept = Fed::default();
        set.insert(0, kept.clone());
        let mut gone = Vec::new();
        for round in 0..10_000u32 {
            let f = Fed::default();
            if let Some(old) = set.insert(1 + round % 3, f.clone()) {
                gone.push(old);
            }
            if round % 7 == 0 {
                drop(set.remove(&(1 + (round + 1) % 3)));
            }
        }
        let queued = crate::sync::lock(&set.shared.ready).len();
        assert!(
            queued <= 2 * set.slots.len() + 64,
            "{queued} wake-ups queued for {} members",
            set.index.len()
        );
        // The streams taken out wake their old wakers, many times: each
        // queues at most once, and none is polled by the set.
        for f in &gone {
            f.wake_spuriously();
            f.wake_spuriously();
        }
        while poll(&mut set, &count).is_ready() {}
        while poll(&mut set, &count).is_pending() {
            if count.take() == 0 {
                break;
            }
        }
        assert!(gone.iter().all(|f| f.polls() == 0));
        assert_eq!(kept.polls(), 1);
        kept.push(3);
        assert_eq!(poll(&mut set, &count), Poll::Ready(Some((0, 3))));
    }

    /// The set's task waker drops the set when woken (a task aborted from
    /// within a wake-up): a member's wake-up must neither deadlock nor
    /// touch freed state.
    #[test]
    fn a_set_dropped_inside_a_members_wake_up() {
        struct DropsSet(Mutex<Option<Members<u32, Fed>>>);
        impl Wake for DropsSet {
            fn wake(self: Arc<Self>) {
                self.wake_by_ref();
            }
            fn wake_by_ref(self: &Arc<Self>) {
                let set = self.0.lock().unwrap().take();
                drop(set);
            }
        }
        let feeds: Vec<Fed> = (0..3).map(|_| Fed::default()).collect();
        let mut set = Members::default();
        for (i, f) in feeds.iter().enumerate() {
            set.insert(i as u32, f.clone());
        }
        let holder = Arc::new(DropsSet(Mutex::new(None)));
        let waker = Waker::from(holder.clone());
        assert_eq!(
            set.poll_next(&mut Context::from_waker(&waker)),
            Poll::Pending
        );
        *holder.0.lock().unwrap() = Some(set);
        // Wakes the member's waker, which wakes the set's, which drops it.
        feeds[1].push(1);
        assert!(holder.0.lock().unwrap().is_none(), "the set was dropped");
        // The other members' wakers outlive the set: harmless.
        feeds[0].push(2);
        feeds[2].wake_spuriously();
    }

    #[test]
    fn an_ended_set_reads_the_streams_inserted_later() {
        let mut set = Members::default();
        let count = Arc::new(Count::default());
        assert_eq!(poll(&mut set, &count), Poll::Ready(None));
        let f = Fed::default();
        f.push(4);
        set.insert(9, f.clone());
        assert_eq!(poll(&mut set, &count), Poll::Ready(Some((9, 4))));
    }

    /// Feeders on other threads push while the set is read on a
    /// multi-thread runtime: every item of every member comes out, in its
    /// member's order, with no wake-up lost (a lost one hangs the reader).
    #[test]
    fn items_pushed_from_other_threads_all_come_out_in_order() {
        const MEMBERS: u32 = 16;
        const ITEMS: u32 = 3_000;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let feeds: Vec<Fed> = (0..MEMBERS).map(|_| Fed::default()).collect();
        let mut set = Members::default();
        for (i, f) in feeds.iter().enumerate() {
            set.insert(i as u32, f.clone());
        }
        let reader = rt.spawn(async move {
            let mut next = vec![0u32; MEMBERS as usize];
            let mut got = 0;
            while got < MEMBERS * ITEMS {
                let item = tokio::time::timeout(
                    std::time::Duration::from_secs(10),
                    futures::future::poll_fn(|cx| set.poll_next(cx)),
                )
                .await;
                let Ok(Some((key, item))) = item else {
                    return Err(format!("stuck after {got} items: {item:?}"));
                };
                if item != next[key as usize] {
                    return Err(format!(
                        "member {key}: {item} where {} was due",
                        next[key as usize]
                    ));
                }
                next[key as usize] += 1;
                got += 1;
            }
            Ok(())
        });
        let feeders: Vec<_> = feeds
            .into_iter()
            .map(|f| {
                std::thread::spawn(move || {
                    for i in 0..ITEMS {
                        f.push(i);
                        if i % 64 == 0 {
                            std::thread::yield_now();
                        }
                    }
                })
            })
            .collect();
        for f in feeders {
            f.join().expect("feeder");
        }
        rt.block_on(reader)
            .expect("reader")
            .expect("every item in order");
    }
}
