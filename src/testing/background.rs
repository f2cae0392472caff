//! [`Background`]: the accept-loop task behind a [`FaultProxy`](super::FaultProxy)
//! or a [`GoawayRelay`](super::GoawayRelay) handle, stopped when the last
//! handle goes or by an explicit, bounded shutdown.

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::SHUTDOWN_WAIT;
use crate::sync::cancel_and_join;

/// One background task and the token that stops it.
#[derive(Debug)]
pub(super) struct Background {
    stop: CancellationToken,
    task: tokio::sync::Mutex<Option<JoinHandle<()>>>,
}

impl Background {
    pub(super) fn new(stop: CancellationToken, task: JoinHandle<()>) -> Self {
        Background {
            stop,
            task: tokio::sync::Mutex::new(Some(task)),
        }
    }

    /// Stops the task and waits for it (bounded; then aborted). `what`
    /// names it in the warning.
    pub(super) async fn shutdown(&self, what: &str) {
        let task = self.task.lock().await.take();
        cancel_and_join(&self.stop, task, SHUTDOWN_WAIT, what).await;
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        // The last handle is gone: stop, so no task outlives it.
        self.stop.cancel();
    }
}
