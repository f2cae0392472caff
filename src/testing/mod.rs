//! Test support (feature `testing`): an in-process Quorum Quest server and a
//! fault-injecting TCP proxy, for this crate's tests and for yours.
//!
//! - [`TestServer`] behaves like the real server (SPEC §2: one lock per
//!   `(service, domain)`, lazy expiry, re-entrant acquire, `-1 s` keep-alive
//!   for non-owners, owner-only release) over loopback TCP, and over in-memory
//!   pipes for tests under `tokio::time::pause()`. Its controls inject the
//!   faults a client must survive: [`force_expire`](TestServer::force_expire),
//!   [`set_owner`](TestServer::set_owner), [`pause`](TestServer::pause),
//!   [`fail_next`](TestServer::fail_next), [`set_latency`](TestServer::set_latency),
//!   short, hostile or missing leases ([`set_lease_policy`](TestServer::set_lease_policy)),
//!   late refusals ([`set_refusal_delay`](TestServer::set_refusal_delay)),
//!   connection ageing, [`shutdown`](TestServer::shutdown) and
//!   [`restart`](TestServer::restart). It can also play the TLS and auth
//!   proxy of a production deployment: TLS and mutual TLS
//!   (`TestServerBuilder::tls`, `client_ca`; feature `tls`) and a required
//!   token or header ([`set_required_token`](TestServer::set_required_token),
//!   [`set_required_metadata`](TestServer::set_required_metadata)). [`TestServer::tenures`] is the server's
//!   truth about who owned what when, to check a client never claimed a lease
//!   it did not have.
//! - [`FaultProxy`] sits between a client and a server and can black-hole
//!   or reset the connections.
//!
//! A test of your own code drives a real [`QuorumQuestClient`](crate::QuorumQuestClient)
//! against a `TestServer`, and plays the other nodes and the faults through
//! the server's controls:
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use std::time::Duration;
//! use quorum_quest_client::testing::TestServer;
//! use quorum_quest_client::QuorumQuestClient;
//!
//! let server = TestServer::start().await?;
//! let client = QuorumQuestClient::builder("billing", "eu")
//!     .address(server.url())
//!     .ttl(Duration::from_secs(5))
//!     .build()
//!     .await?;
//! assert!(client.try_acquire_lock().await?);
//! let owner = server.lock("billing", "eu").map(|l| l.owner);
//! assert_eq!(owner.as_deref(), Some(client.client_id()));
//!
//! // Another node takes the lock; the client learns it on its next call.
//! server.set_owner("billing", "eu", "node-2", Duration::from_secs(30));
//! assert!(!client.try_acquire_lock().await?);
//! assert!(!client.is_leader());
//! # server.shutdown().await;
//! # Ok(())
//! # }
//! ```

/// How long a `shutdown()` of a test server, proxy or relay waits for each
/// of its tasks before aborting it.
const SHUTDOWN_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

mod accept;
mod background;
pub mod chaos;
mod cut_io;
mod proxy;
mod relay;
mod server;
mod store;

pub use proxy::{FaultProxy, ProxyMode};
pub use relay::GoawayRelay;
pub use server::{LeasePolicy, TestServer, TestServerBuilder, SERVER_DEFAULT_TTL};
pub use store::{LockInfo, Tenure, TenureEnd};
