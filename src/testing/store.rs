//! The in-memory lock table behind [`TestServer`](super::TestServer), with the
//! full ownership history ([`Tenure`]s).
//!
//! It reproduces what the real server's stores do (SPEC §2): one lock per
//! `(service, domain)`, valued with the owner's `client_id`, expiring `ttl`
//! after the last grant or renewal. Expiry is checked lazily, on access,
//! against the instant the caller passes in (always
//! [`tokio::time::Instant::now()`] from the server, so tests under
//! [`tokio::time::pause()`] see exact, deterministic expiry).

use std::collections::HashMap;
use std::time::Duration;

use tokio::time::Instant;

/// The current owner of a lock and the time it has left, as returned by
/// [`TestServer::lock`](super::TestServer::lock).
///
/// ```
/// use std::time::Duration;
/// use quorum_quest_client::testing::LockInfo;
///
/// let info = LockInfo { owner: "node-1".into(), remaining: Duration::from_secs(3) };
/// assert_eq!(info.owner, "node-1");
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LockInfo {
    /// The `client_id` that owns the lock.
    pub owner: String,
    /// Time left until the lock expires (always greater than zero: an expired
    /// lock is reported as free).
    pub remaining: Duration,
}

/// How a [`Tenure`] ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum TenureEnd {
    /// The owner still holds the lock; [`Tenure::end`] is the current expiry.
    Running,
    /// The lease ran out. Expiry is observed lazily (on the next access to the
    /// lock, or when [`TestServer::tenures`](super::TestServer::tenures) /
    /// [`TestServer::lock`](super::TestServer::lock) look at it), but
    /// [`Tenure::end`] is always the expiry instant itself.
    Expired,
    /// The owner released the lock with `ReleaseLock`.
    Released,
    /// [`TestServer::set_owner`](super::TestServer::set_owner) handed the live
    /// lock to another owner (as if another node had won).
    Stolen,
    /// [`TestServer::restart`](super::TestServer::restart) with
    /// `keep_locks = false` dropped the lock table.
    Dropped,
    /// [`TestServer::force_expire`](super::TestServer::force_expire) removed the
    /// lock.
    ForceExpired,
}

/// One continuous tenure of one owner over one lock: the server's truth, for
/// checking that a client never believed itself leader when it was not.
///
/// Re-entrant `TryAcquireLock` and `KeepAlive` by the owner extend the same
/// tenure (they bump [`Tenure::renewals`] and move [`Tenure::expiry`]); a new
/// tenure starts only when the lock passes from free (or expired) to an owner,
/// or from one owner to another.
///
/// `end` is the instant ownership actually ended: for an expired tenure that is
/// the expiry instant; for a released, stolen, dropped or force-expired one it
/// is the instant of that event (never later than the expiry then in force,
/// which is kept in `expiry`); for a running tenure it is the current expiry.
/// So `[start, end)` is exactly the interval in which the server considered
/// `owner` the owner.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> std::io::Result<()> {
/// use std::time::Duration;
/// use quorum_quest_client::testing::{TenureEnd, TestServer};
///
/// let server = TestServer::start().await?;
/// server.set_owner("svc", "dom", "node-1", Duration::from_secs(10));
/// server.set_owner("svc", "dom", "node-2", Duration::from_secs(10));
/// let history = server.tenures();
/// assert_eq!(history.len(), 2);
/// assert_eq!(history[0].owner, "node-1");
/// assert_eq!(history[0].ended_by, TenureEnd::Stolen);
/// assert_eq!(history[1].ended_by, TenureEnd::Running);
/// assert!(history[0].end <= history[1].start);
/// # server.shutdown().await;
/// # Ok(())
/// # }
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tenure {
    /// The lock's service.
    pub service: String,
    /// The lock's domain.
    pub domain: String,
    /// The `client_id` that held the lock.
    pub owner: String,
    /// When the owner got the lock.
    pub start: Instant,
    /// When ownership ended (see the type's documentation); the current expiry
    /// while [`TenureEnd::Running`].
    pub end: Instant,
    /// The expiry in force when the tenure ended (or the current expiry while
    /// running). Equal to `end` for [`TenureEnd::Expired`] and
    /// [`TenureEnd::Running`].
    pub expiry: Instant,
    /// How many times the owner extended the lease (re-entrant acquire,
    /// keep-alive, or `set_owner` to the same owner).
    pub renewals: u64,
    /// How the tenure ended, or [`TenureEnd::Running`].
    pub ended_by: TenureEnd,
}

#[derive(Debug)]
struct Entry {
    owner: String,
    expiry: Instant,
    /// Index of the running tenure in `Store::tenures`.
    tenure: usize,
}

type Key = (String, String);

/// The lock table. Every operation takes `now` explicitly.
#[derive(Debug, Default)]
pub(crate) struct Store {
    locks: HashMap<Key, Entry>,
    tenures: Vec<Tenure>,
}

/// `now + ttl`, saturating at a far-future instant instead of overflowing.
fn deadline(now: Instant, ttl: Duration) -> Instant {
    const FAR: Duration = Duration::from_secs(100 * 365 * 24 * 3600);
    now.checked_add(ttl.min(FAR))
        .or_else(|| now.checked_add(Duration::from_secs(365 * 24 * 3600)))
        .unwrap_or(now)
}

fn key(service: &str, domain: &str) -> Key {
    (service.to_owned(), domain.to_owned())
}

impl Store {
    /// Ends the running tenure of `entry` at `end` with `how`.
    fn close(&mut self, entry: &Entry, end: Instant, how: TenureEnd) {
        if let Some(t) = self.tenures.get_mut(entry.tenure) {
            t.end = end.min(entry.expiry);
            t.expiry = entry.expiry;
            t.ended_by = how;
        }
    }

    /// Removes the lock at `k` if it has expired by `now`, recording the
    /// expiry; afterwards `self.locks.get(k)` is the live lock, if any.
    fn observe(&mut self, k: &Key, now: Instant) {
        let expired = self.locks.get(k).is_some_and(|e| e.expiry <= now);
        if expired {
            if let Some(entry) = self.locks.remove(k) {
                let at = entry.expiry;
                self.close(&entry, at, TenureEnd::Expired);
            }
        }
    }

    /// Observes every expired lock.
    pub(crate) fn sweep(&mut self, now: Instant) {
        let keys: Vec<Key> = self
            .locks
            .iter()
            .filter(|(_, e)| e.expiry <= now)
            .map(|(k, _)| k.clone())
            .collect();
        for k in keys {
            self.observe(&k, now);
        }
    }

    fn grant(&mut self, k: Key, owner: &str, ttl: Duration, now: Instant) {
        let expiry = deadline(now, ttl);
        self.tenures.push(Tenure {
            service: k.0.clone(),
            domain: k.1.clone(),
            owner: owner.to_owned(),
            start: now,
            end: expiry,
            expiry,
            renewals: 0,
            ended_by: TenureEnd::Running,
        });
        let tenure = self.tenures.len() - 1;
        self.locks.insert(
            k,
            Entry {
                owner: owner.to_owned(),
                expiry,
                tenure,
            },
        );
    }

    fn renew(&mut self, k: &Key, ttl: Duration, now: Instant) {
        if let Some(entry) = self.locks.get_mut(k) {
            entry.expiry = deadline(now, ttl);
            if let Some(t) = self.tenures.get_mut(entry.tenure) {
                t.end = entry.expiry;
                t.expiry = entry.expiry;
                t.renewals += 1;
            }
        }
    }

    fn owner_of(&self, k: &Key) -> Option<&str> {
        self.locks.get(k).map(|e| e.owner.as_str())
    }

    /// `TryAcquireLock`: true if `client` owns the lock afterwards.
    pub(crate) fn try_acquire(
        &mut self,
        service: &str,
        domain: &str,
        client: &str,
        ttl: Duration,
        now: Instant,
    ) -> bool {
        let k = key(service, domain);
        self.observe(&k, now);
        match self.owner_of(&k) {
            None => {
                self.grant(k, client, ttl, now);
                true
            }
            Some(owner) if owner == client => {
                self.renew(&k, ttl, now);
                true
            }
            Some(_) => false,
        }
    }

    /// `KeepAlive`: `Some(ttl)` if `client` owns the live lock (and it is
    /// extended), `None` otherwise.
    pub(crate) fn keep_alive(
        &mut self,
        service: &str,
        domain: &str,
        client: &str,
        ttl: Duration,
        now: Instant,
    ) -> Option<Duration> {
        let k = key(service, domain);
        self.observe(&k, now);
        if self.owner_of(&k) == Some(client) {
            self.renew(&k, ttl, now);
            Some(ttl)
        } else {
            None
        }
    }

    /// `ReleaseLock`: true if `client` owned the live lock and it was deleted.
    pub(crate) fn release(
        &mut self,
        service: &str,
        domain: &str,
        client: &str,
        now: Instant,
    ) -> bool {
        let k = key(service, domain);
        self.observe(&k, now);
        if self.owner_of(&k) != Some(client) {
            return false;
        }
        match self.locks.remove(&k) {
            Some(entry) => {
                self.close(&entry, now, TenureEnd::Released);
                true
            }
            None => false,
        }
    }

    /// Removes a live lock at once; false if it was free.
    pub(crate) fn force_expire(&mut self, service: &str, domain: &str, now: Instant) -> bool {
        let k = key(service, domain);
        self.observe(&k, now);
        match self.locks.remove(&k) {
            Some(entry) => {
                self.close(&entry, now, TenureEnd::ForceExpired);
                true
            }
            None => false,
        }
    }

    /// Makes `owner` the owner for `ttl` from `now`, whoever held the lock.
    pub(crate) fn set_owner(
        &mut self,
        service: &str,
        domain: &str,
        owner: &str,
        ttl: Duration,
        now: Instant,
    ) {
        let k = key(service, domain);
        self.observe(&k, now);
        match self.owner_of(&k) {
            Some(current) if current == owner => self.renew(&k, ttl, now),
            Some(_) => {
                if let Some(entry) = self.locks.remove(&k) {
                    self.close(&entry, now, TenureEnd::Stolen);
                }
                self.grant(k, owner, ttl, now);
            }
            None => self.grant(k, owner, ttl, now),
        }
        // A zero ttl grants a lock that is already expired: record that now.
        self.observe(&key(service, domain), now);
    }

    /// The live owner of a lock and its remaining time.
    pub(crate) fn lock(&mut self, service: &str, domain: &str, now: Instant) -> Option<LockInfo> {
        let k = key(service, domain);
        self.observe(&k, now);
        self.locks.get(&k).map(|e| LockInfo {
            owner: e.owner.clone(),
            remaining: e.expiry.saturating_duration_since(now),
        })
    }

    /// Drops every lock (tenures end with [`TenureEnd::Dropped`], after the
    /// expired ones are recorded as [`TenureEnd::Expired`]).
    pub(crate) fn drop_all(&mut self, now: Instant) {
        self.sweep(now);
        let entries: Vec<Entry> = self.locks.drain().map(|(_, e)| e).collect();
        for entry in &entries {
            self.close(entry, now, TenureEnd::Dropped);
        }
    }

    /// The ownership history, expired locks observed first.
    pub(crate) fn tenures(&mut self, now: Instant) -> Vec<Tenure> {
        self.sweep(now);
        self.tenures.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn acquire_renew_expire_history() {
        let t0 = Instant::now();
        let mut st = Store::default();
        assert!(st.try_acquire("s", "d", "a", 10 * S, t0));
        assert!(!st.try_acquire("s", "d", "b", 10 * S, t0 + S));
        assert!(st.try_acquire("s", "d", "a", 10 * S, t0 + 2 * S));
        assert_eq!(st.keep_alive("s", "d", "a", 5 * S, t0 + 3 * S), Some(5 * S));
        assert_eq!(st.keep_alive("s", "d", "b", 5 * S, t0 + 3 * S), None);
        // expires at t0 + 8 s exactly
        assert!(st
            .lock("s", "d", t0 + 8 * S - Duration::from_nanos(1))
            .is_some());
        assert!(st.try_acquire("s", "d", "b", 10 * S, t0 + 8 * S));
        let h = st.tenures(t0 + 8 * S);
        assert_eq!(h.len(), 2);
        assert_eq!(h[0].ended_by, TenureEnd::Expired);
        assert_eq!(h[0].end, t0 + 8 * S);
        assert_eq!(h[0].renewals, 2);
        assert_eq!(h[1].owner, "b");
        assert_eq!(h[1].ended_by, TenureEnd::Running);
    }

    #[test]
    fn release_only_by_owner() {
        let t0 = Instant::now();
        let mut st = Store::default();
        assert!(st.try_acquire("s", "d", "a", 10 * S, t0));
        assert!(!st.release("s", "d", "b", t0 + S));
        assert!(st.release("s", "d", "a", t0 + 2 * S));
        assert!(!st.release("s", "d", "a", t0 + 2 * S));
        let h = st.tenures(t0 + 3 * S);
        assert_eq!(h[0].ended_by, TenureEnd::Released);
        assert_eq!(h[0].end, t0 + 2 * S);
        assert_eq!(h[0].expiry, t0 + 10 * S);
    }

    #[test]
    fn set_owner_zero_ttl_and_drop_all() {
        let t0 = Instant::now();
        let mut st = Store::default();
        st.set_owner("s", "d", "x", Duration::ZERO, t0);
        assert_eq!(st.lock("s", "d", t0), None);
        st.set_owner("s", "d", "y", 10 * S, t0);
        st.drop_all(t0 + S);
        let h = st.tenures(t0 + S);
        assert_eq!(h[0].ended_by, TenureEnd::Expired);
        assert_eq!(h[1].ended_by, TenureEnd::Dropped);
        assert_eq!(h[1].end, t0 + S);
    }

    #[test]
    fn huge_ttl_does_not_overflow() {
        let t0 = Instant::now();
        let mut st = Store::default();
        assert!(st.try_acquire("s", "d", "a", Duration::MAX, t0));
        assert!(st.lock("s", "d", t0).is_some());
    }
}
