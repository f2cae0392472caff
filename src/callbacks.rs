//! The [`Callbacks`] trait and the adapter that turns a leadership stream into
//! callback calls.
//!
//! The adapter is a loop over the event stream: each callback is awaited before
//! the next event is looked at, so callbacks of one client run one at a time,
//! in event order, never concurrently. A panicking callback is caught and
//! logged; the loop (and the campaign behind it) goes on.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use async_trait::async_trait;
use futures::{FutureExt, Stream, StreamExt};

use crate::event::LeadershipEvent;

/// Reactions to leadership changes.
///
/// Called in order, one at a time: `on_leader_elected(true)` when this client
/// becomes leader, `on_leader_lost()` exactly once when that term ends (release,
/// expiry or rejection), `on_leader_elected(false)` when the client learns that
/// another node holds the lock (the first refused attempt, and the first one
/// after a loss).
///
/// ```
/// use async_trait::async_trait;
/// use quorum_quest_client::Callbacks;
///
/// struct Log;
///
/// #[async_trait]
/// impl Callbacks for Log {
///     async fn on_leader_elected(&self, is_leader: bool) {
///         tracing::info!(is_leader, "election result");
///     }
///     async fn on_leader_lost(&self) {
///         tracing::warn!("leadership lost");
///     }
/// }
/// ```
#[async_trait]
pub trait Callbacks: Send + Sync {
    /// Called when leadership status changes: `is_leader` is `true` if this
    /// node is the new leader, `false` if another node is.
    async fn on_leader_elected(&self, is_leader: bool);

    /// Called when this node was the leader but lost leadership.
    async fn on_leader_lost(&self);
}

/// Callbacks that do nothing (the default).
///
/// ```
/// use std::sync::Arc;
/// use quorum_quest_client::{Callbacks, NoOpCallbacks};
///
/// let callbacks: Arc<dyn Callbacks> = Arc::new(NoOpCallbacks);
/// # let _ = callbacks;
/// ```
#[derive(Debug, Clone, Copy, Default)]
pub struct NoOpCallbacks;

#[async_trait]
impl Callbacks for NoOpCallbacks {
    async fn on_leader_elected(&self, _is_leader: bool) {}
    async fn on_leader_lost(&self) {}
}

/// Calls `callbacks` for every event of `events`, in order, one at a time,
/// until the stream ends. This is the adapter behind the client's `callbacks`
/// parameter; use it to attach callbacks to any leadership stream.
///
/// ```no_run
/// use std::sync::Arc;
/// use quorum_quest_client::{drive_callbacks, NoOpCallbacks, QuorumQuestClient};
///
/// # async fn demo(client: QuorumQuestClient) {
/// tokio::spawn(drive_callbacks(client.leadership(), Arc::new(NoOpCallbacks)));
/// # }
/// ```
pub async fn drive_callbacks<S>(events: S, callbacks: Arc<dyn Callbacks>)
where
    S: Stream<Item = LeadershipEvent>,
{
    futures::pin_mut!(events);
    while let Some(event) = events.next().await {
        let (name, call) = match event {
            LeadershipEvent::Elected { .. } => {
                ("on_leader_elected", callbacks.on_leader_elected(true))
            }
            LeadershipEvent::Follower => ("on_leader_elected", callbacks.on_leader_elected(false)),
            LeadershipEvent::Lost { .. } => ("on_leader_lost", callbacks.on_leader_lost()),
            _ => continue,
        };
        if let Err(panic) = AssertUnwindSafe(call).catch_unwind().await {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| (*s).to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "non-string panic payload".into());
            tracing::error!(callback = name, panic = %what, "callback panicked; continuing with the next event");
        }
    }
}
