//! [`LeadershipStreamExt`]: combinators for the pipelines users build on a
//! leadership stream.

use std::future::Future;
use std::sync::Arc;

use futures::stream::BoxStream;
use futures::{Stream, StreamExt};

use crate::callbacks::{drive_callbacks, Callbacks};
use crate::event::LeadershipEvent;

/// Combinators for any `Stream<Item = LeadershipEvent>`.
///
/// ```no_run
/// use futures::StreamExt;
/// use quorum_quest_client::{LeadershipStreamExt, QuorumQuestClient};
///
/// # async fn demo(client: QuorumQuestClient) {
/// // A stream of "am I leader now?" answers, one per change.
/// let mut changes = client.leadership().leader_changes();
/// while let Some(is_leader) = changes.next().await {
///     println!("leader: {is_leader}");
/// }
/// # }
/// ```
pub trait LeadershipStreamExt: Stream<Item = LeadershipEvent> + Sized {
    /// Only the state changes: `Elected`, `Lost` and `Follower` (drops
    /// `Renewed` and `RpcFailed`).
    fn transitions(self) -> BoxStream<'static, LeadershipEvent>
    where
        Self: Send + 'static,
    {
        self.filter(|ev| {
            std::future::ready(matches!(
                ev,
                LeadershipEvent::Elected { .. }
                    | LeadershipEvent::Lost { .. }
                    | LeadershipEvent::Follower
            ))
        })
        .boxed()
    }

    /// `true` when this client becomes leader, `false` when it stops being
    /// leader or first learns it is a follower; never the same value twice in
    /// a row.
    fn leader_changes(self) -> BoxStream<'static, bool>
    where
        Self: Send + 'static,
    {
        async_stream::stream! {
            let mut last: Option<bool> = None;
            let events = self;
            futures::pin_mut!(events);
            while let Some(ev) = events.next().await {
                let now = match ev {
                    LeadershipEvent::Elected { .. } => true,
                    LeadershipEvent::Lost { .. } | LeadershipEvent::Follower => false,
                    _ => continue,
                };
                if last != Some(now) {
                    last = Some(now);
                    yield now;
                }
            }
        }
        .boxed()
    }

    /// Ends after the first `Lost` (which is yielded): one term's worth of
    /// events, for code that should not re-contend by itself.
    fn until_lost(self) -> BoxStream<'static, LeadershipEvent>
    where
        Self: Send + 'static,
    {
        async_stream::stream! {
            let events = self;
            futures::pin_mut!(events);
            while let Some(ev) = events.next().await {
                let lost = ev.is_lost();
                yield ev;
                if lost {
                    break;
                }
            }
        }
        .boxed()
    }

    /// Runs [`Callbacks`] for this stream (see [`drive_callbacks`]).
    fn drive_callbacks(self, callbacks: Arc<dyn Callbacks>) -> impl Future<Output = ()> {
        drive_callbacks(self, callbacks)
    }
}

impl<S: Stream<Item = LeadershipEvent>> LeadershipStreamExt for S {}
