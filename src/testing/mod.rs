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
//!   [`restart`](TestServer::restart). [`TestServer::tenures`] is the server's
//!   truth about who owned what when, to check a client never claimed a lease
//!   it did not have.
//! - [`FaultProxy`] sits between a client and a server and can black-hole
//!   or reset the connections.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use quorum_quest_client::proto::leader_election_service_client::LeaderElectionServiceClient;
//! use quorum_quest_client::proto::TryAcquireLockRequest;
//! use quorum_quest_client::testing::{FaultProxy, TestServer};
//!
//! let server = TestServer::start().await?;
//! let proxy = FaultProxy::start(server.addr()).await?;
//! let mut client = LeaderElectionServiceClient::connect(proxy.url()).await?;
//! let request = TryAcquireLockRequest {
//!     service: "billing".into(),
//!     domain: "eu".into(),
//!     client_id: "node-1".into(),
//!     ttl: 10,
//! };
//! assert!(client.try_acquire_lock(request).await?.into_inner().is_leader);
//! assert_eq!(server.tenures().len(), 1);
//! # proxy.shutdown().await;
//! # server.shutdown().await;
//! # Ok(())
//! # }
//! ```

mod accept;
pub mod chaos;
mod cut_io;
mod proxy;
mod relay;
mod server;
mod store;

pub use proxy::{FaultProxy, ProxyMode};
pub use relay::GoawayRelay;
pub use server::{LeasePolicy, Rpc, TestServer, TestServerBuilder, DEFAULT_TTL};
pub use store::{LockInfo, Tenure, TenureEnd};
