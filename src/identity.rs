//! One client per lock and identity, and identities retired for good.
//!
//! The server tells owners apart only by `client_id`. Two live clients of
//! this process with one id for one lock on one server would both be granted
//! it, so a second one is refused (`InvalidParameter`) while the first lives.
//!
//! A client that ends with a release of its bare id whose outcome is unknown
//! (or still in flight) leaves a request behind that may delete that id's
//! lock at any later time. The registry remembers that the bare id is
//! retired, and a later client for the same lock and id starts under a fresh
//! identity (`client_id#1.tag`, see [`crate::state`]) instead of re-entering
//! a lock that the stale release could delete.
//!
//! The registry is process-wide, keyed by the connection's name (the
//! server's URI, or a number for a channel handed in by the user), service,
//! domain and client id. It cannot see other processes: give every process
//! its own client id.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use crate::error::{Error, Result};
use crate::sync::lock;

/// Connection name, service, domain, client id: one live client's claim.
///
/// The strings are the client's own (`Arc<str>` shared with its scope and
/// connection), so a claim costs the registry one pointer, not four copies.
#[derive(Debug, PartialEq, Eq, Hash)]
struct LiveKey {
    connection: Arc<str>,
    service: Arc<str>,
    domain: Arc<str>,
    client_id: Arc<str>,
}

/// Service, domain, client id.
type IdKey = (Arc<str>, Arc<str>, Arc<str>);

impl LiveKey {
    fn id_key(&self) -> IdKey {
        (
            self.service.clone(),
            self.domain.clone(),
            self.client_id.clone(),
        )
    }
}

#[derive(Debug, Default)]
struct Registry {
    /// Claims of live clients, per connection (the same allocation as the
    /// claim's own key).
    live: HashSet<Arc<LiveKey>>,
    /// Lock identities whose bare id an earlier client may have left a
    /// stale release for (on any connection: the same server can be reached
    /// by several addresses).
    retired: HashSet<IdKey>,
}

fn registry() -> &'static Mutex<Registry> {
    static REGISTRY: OnceLock<Mutex<Registry>> = OnceLock::new();
    REGISTRY.get_or_init(Default::default)
}

/// A live client's claim on its lock and identity; given back when dropped.
#[derive(Debug)]
pub(crate) struct Claim {
    key: Arc<LiveKey>,
    /// The incarnation the client must start at (1 if the bare id is retired).
    start: u32,
    /// Set by the client when it ends leaving the bare id unsafe to reuse.
    retire: AtomicBool,
}

impl Claim {
    /// Claims (connection, service, domain, client id) for one client.
    ///
    /// # Errors
    ///
    /// `InvalidParameter` if a live client of this process already campaigns
    /// for that lock under that identity on that connection's server.
    pub(crate) fn new(
        connection: &Arc<str>,
        service: &Arc<str>,
        domain: &Arc<str>,
        client_id: &Arc<str>,
    ) -> Result<Claim> {
        let key = LiveKey {
            connection: connection.clone(),
            service: service.clone(),
            domain: domain.clone(),
            client_id: client_id.clone(),
        };
        let mut registry = lock(registry());
        if registry.live.contains(&key) {
            return Err(Error::invalid(
                "client_id",
                format!(
                    "a client of this process already campaigns for {service}/{domain} as {client_id:?} on {connection}; \
                     two clients with one identity would both be granted the lock: clone that client instead"
                ),
            ));
        }
        let retired = registry.retired.contains(&key.id_key());
        let key = Arc::new(key);
        registry.live.insert(key.clone());
        Ok(Claim {
            start: u32::from(retired),
            key,
            retire: AtomicBool::new(false),
        })
    }

    /// The incarnation the client starts at.
    pub(crate) fn start(&self) -> u32 {
        self.start
    }

    /// The client ends with a release of its bare id possibly still on its
    /// way: later clients for this lock and id must not use the bare id.
    pub(crate) fn retire_bare_id(&self) {
        self.retire.store(true, Ordering::SeqCst);
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        let mut registry = lock(registry());
        registry.live.remove(&*self.key);
        if self.retire.load(Ordering::SeqCst) {
            registry.retired.insert(self.key.id_key());
        }
        // A registry that shrank a lot gives its memory back (a process that
        // ran 100,000 elections and now runs a few).
        let live = &mut registry.live;
        if live.capacity() > 64 && live.len() < live.capacity() / 4 {
            live.shrink_to(live.len() * 2);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claim(connection: &str, service: &str, domain: &str, id: &str) -> Result<Claim> {
        Claim::new(
            &connection.into(),
            &service.into(),
            &domain.into(),
            &id.into(),
        )
    }

    #[test]
    fn one_live_claim_per_connection_and_a_retired_bare_id_stays_retired_everywhere() {
        let a = claim("conn-test-1", "s-id-test", "d", "id").unwrap();
        assert_eq!(a.start(), 0);
        assert!(claim("conn-test-1", "s-id-test", "d", "id").is_err());
        let other = claim("conn-test-2", "s-id-test", "d", "id").unwrap();
        assert_eq!(other.start(), 0);
        a.retire_bare_id();
        drop(a);
        let b = claim("conn-test-1", "s-id-test", "d", "id").unwrap();
        assert_eq!(
            b.start(),
            1,
            "the bare id may still be hit by a stale release"
        );
        drop(b);
        drop(other);
        let c = claim("conn-test-3", "s-id-test", "d", "id").unwrap();
        assert_eq!(
            c.start(),
            1,
            "the same server may be reached by another address"
        );
    }
}
