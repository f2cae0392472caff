//! Small synchronisation helpers shared across the crate.

use std::sync::{Mutex, MutexGuard};

/// Locks a std mutex, ignoring poisoning: every critical section guarded
/// this way is a few statements that leave the data consistent even if a
/// panic interrupts them, so a poisoned lock still holds usable data.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
