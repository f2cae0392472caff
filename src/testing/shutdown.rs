//! Stopping the background tasks of a [`TestServer`](super::TestServer) or a
//! [`FaultProxy`](super::FaultProxy): cancel, wait a bounded time, then abort.

use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// How long a shutdown waits for each task to end before aborting it.
const SHUTDOWN_WAIT: Duration = Duration::from_secs(5);

/// Cancels `stop`, then waits up to 5 s for each task to end; a task still
/// running after that is aborted and awaited, so that its sockets are closed
/// when this returns. `what` names the tasks in the warning.
pub(super) async fn cancel_and_join(
    stop: &CancellationToken,
    tasks: impl IntoIterator<Item = JoinHandle<()>>,
    what: &str,
) {
    stop.cancel();
    for mut task in tasks {
        if tokio::time::timeout(SHUTDOWN_WAIT, &mut task)
            .await
            .is_err()
        {
            tracing::warn!("{what} did not stop in time; aborting it");
            task.abort();
            // Resolves at once; after it the task's sockets are closed.
            let _ = task.await;
        }
    }
}
