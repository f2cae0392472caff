//! [`Leadership`]: the stream users hold. A view of the session's events
//! through a bounded subscriber queue; its first poll starts the campaign.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures::Stream;

use super::{Backstop, Session};
use crate::error::Result;
use crate::event::LeadershipEvent;
use crate::fanout::EventReceiver;

/// Leadership as a stream of [`LeadershipEvent`]s.
///
/// Returned by [`QuorumQuestClient::leadership`](crate::QuorumQuestClient::leadership).
/// The first poll starts the campaign (in the background, on the
/// connection's driver task, so renewals go on even while the consumer is
/// busy with the previous event); it runs until the
/// stream is dropped or [resigned](Leadership::resign). `Elected` and `Lost`
/// strictly alternate, starting with `Elected`; after a loss the campaign goes
/// on, so one `while let` loop follows leadership for the life of the process.
///
/// Every stream of one client is a view of the same contender (one identity,
/// one lock): a stream created while the client leads starts with `Elected`
/// for the running term. Dropping the last stream (with no keep-alive task
/// running) stops the campaign and releases the lock in the background.
///
/// A stream that is not polled holds every `Elected`, `Lost` and `Follower`
/// it has not seen yet, but only the latest `Renewed` and the latest
/// `RpcFailed` since the last of those: an idle stream's memory stays
/// constant while leadership is steady.
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
    rx: EventReceiver,
    phase: StreamPhase,
    /// The loss at the deadline, should the driver keeping the step-down
    /// timer not run (see [`Backstop`]).
    backstop: Backstop,
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
            backstop: Backstop::default(),
        }
    }

    /// Leaves `Renewed` out of this stream: from now on none is yielded, and
    /// none wakes the task reading it (one still queued is dropped). Every
    /// other event comes as before: `Elected`, `Lost` and `Follower`, in
    /// order, and `RpcFailed`. Renewals go on in the background all the
    /// same, and the running term (the [`LeaderTerm`](crate::LeaderTerm)
    /// of its `Elected`, or
    /// [`get_remaining_lease`](crate::QuorumQuestClient::get_remaining_lease))
    /// still tells how long the lease has left.
    ///
    /// For a process that holds many locks and only needs to know when it
    /// gains or loses one: with a renewal per lock every few seconds, a
    /// consumer of [`LeadershipSet`](crate::LeadershipSet) would otherwise
    /// wake for every renewal of every lock.
    /// ([`LeadershipStreamExt::transitions`](crate::LeadershipStreamExt::transitions)
    /// filters after the wake-up, and drops `RpcFailed` too.)
    ///
    /// ```no_run
    /// use futures::StreamExt;
    /// use quorum_quest_client::{LeadershipEvent, LeadershipSet, QuorumQuestClient};
    ///
    /// # async fn demo(root: QuorumQuestClient) -> quorum_quest_client::Result<()> {
    /// let mut shards = LeadershipSet::new();
    /// for shard in ["shard-0", "shard-1", "shard-2"] {
    ///     let client = root.for_scope("billing", shard)?;
    ///     shards.insert(shard, client.leadership().without_renewals());
    /// }
    /// while let Some((shard, event)) = shards.next().await {
    ///     match event {
    ///         LeadershipEvent::Elected { .. } => println!("now own {shard}"),
    ///         LeadershipEvent::Lost { .. } => println!("no longer own {shard}"),
    ///         _ => {}
    ///     }
    /// }
    /// # Ok(()) }
    /// ```
    pub fn without_renewals(self) -> Self {
        self.rx.skip_renewals();
        self
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
                    if matches!(e, crate::Error::Shutdown) {
                        tracing::debug!("the client was shut down: the leadership stream ends");
                    } else {
                        tracing::error!(error = %e, "cannot start the leadership campaign");
                    }
                    self.phase = StreamPhase::Done;
                    return Poll::Ready(None);
                }
                self.phase = StreamPhase::Running;
            }
            StreamPhase::Running => {}
        }
        let this = &mut *self;
        loop {
            if let Poll::Ready(ev) = this.rx.poll_recv(cx) {
                return Poll::Ready(ev);
            }
            // Before it waits: its campaign's runtime may have shut down
            // since (looked at once per wait, not once per event read).
            this.session.revive_campaign();
            if this.backstop.poll(&this.session, cx).is_pending() {
                return Poll::Pending;
            }
        }
    }
}

impl Leadership {
    /// Ends this stream's want of the campaign as its drop would, and
    /// returns the shutdown to run if it was the last one wanting it (for
    /// [`LeadershipSet`](super::LeadershipSet), which runs many at once).
    /// The stream ends.
    pub(super) fn take_shutdown(&mut self) -> Option<super::Shutdown> {
        let was_running = self.phase == StreamPhase::Running;
        self.phase = StreamPhase::Done;
        if !was_running {
            return None;
        }
        self.session.remove_stream()
    }
}

impl Drop for Leadership {
    fn drop(&mut self) {
        if let Some(shutdown) = self.take_shutdown() {
            shutdown.run_on_drop();
        }
    }
}
