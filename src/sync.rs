//! Small synchronisation helpers shared across the crate.

use std::sync::{Mutex, MutexGuard};

/// Locks a std mutex, ignoring poisoning: every critical section guarded
/// this way is a few statements that leave the data consistent even if a
/// panic interrupts them, so a poisoned lock still holds usable data.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Resumes a panic caught earlier (after the work that had to go on
/// despite it), unless this thread is already unwinding: a second panic
/// would abort the process.
pub(crate) fn resume_panic(panic: Option<Box<dyn std::any::Any + Send>>) {
    if let Some(panic) = panic {
        if !std::thread::panicking() {
            std::panic::resume_unwind(panic);
        }
    }
}

/// The Tokio runtime this thread runs in, or [`Error::NoRuntime`]: the
/// check every call that needs one makes first, instead of panicking inside
/// tokio.
///
/// [`Error::NoRuntime`]: crate::Error::NoRuntime
///
/// A runtime built without timers (`enable_io()` alone) is refused with
/// [`Error::InvalidParameter`]: every call's timeout needs them, and tokio
/// panics without them.
///
/// [`Error::InvalidParameter`]: crate::Error::InvalidParameter
pub(crate) fn runtime() -> crate::error::Result<tokio::runtime::Handle> {
    let runtime =
        tokio::runtime::Handle::try_current().map_err(|_| crate::error::Error::NoRuntime)?;
    if !has_timers() {
        return Err(crate::error::Error::InvalidParameter(
            "the Tokio runtime has no timers: build it with `enable_all()` or `enable_time()`"
                .into(),
        ));
    }
    Ok(runtime)
}

/// Whether the current runtime has timers (tokio panics on a timer made on
/// one without: the probe catches it; it registers nothing).
pub(crate) fn has_timers() -> bool {
    std::panic::catch_unwind(|| drop(tokio::time::sleep(std::time::Duration::ZERO))).is_ok()
}

/// Cancels `stop`, then waits up to `grace` for each task to end; a task
/// still running after that is aborted and awaited (so its sockets and its
/// hold on shared state are gone when this returns). `what` names the
/// tasks in the warning.
pub(crate) async fn cancel_and_join(
    stop: &tokio_util::sync::CancellationToken,
    tasks: impl IntoIterator<Item = tokio::task::JoinHandle<()>>,
    grace: std::time::Duration,
    what: &str,
) {
    stop.cancel();
    for mut task in tasks {
        if tokio::time::timeout(grace, &mut task).await.is_err() {
            tracing::warn!("{what} did not stop within {grace:?}; aborting it");
            task.abort();
            // Resolves at once; after it the task is gone.
            let _ = task.await;
        }
    }
}

/// A waker that counts its wake-ups (for tests that check who is woken,
/// and how often).
#[cfg(test)]
#[derive(Debug, Default)]
pub(crate) struct WakeCount(std::sync::atomic::AtomicUsize);

#[cfg(test)]
impl WakeCount {
    /// The wake-ups so far.
    pub(crate) fn count(&self) -> usize {
        self.0.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// The wake-ups so far, and counts from zero again.
    pub(crate) fn take(&self) -> usize {
        self.0.swap(0, std::sync::atomic::Ordering::SeqCst)
    }
}

#[cfg(test)]
impl std::task::Wake for WakeCount {
    fn wake(self: std::sync::Arc<Self>) {
        self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }
}
