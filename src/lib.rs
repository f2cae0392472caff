//! Client for the [Quorum Quest] leader election service.
//!
//! Services embed it to decide which one of their replicas is the leader. One
//! rule beats all others: it never tells two processes they are both leader,
//! and it never loses a leadership change silently.
//!
//! - **Leadership is a stream.** [`QuorumQuestClient::leadership`] returns a
//!   [`Leadership`] stream of [`LeadershipEvent`]s: `Elected` (with a
//!   [`LeaderTerm`] to bind leader-only work to), `Renewed`, `Follower`,
//!   `Lost { reason }`, and `RpcFailed` warnings. `Elected` and `Lost` strictly
//!   alternate on every stream. [`LeadershipStreamExt`] has the usual pipelines.
//! - **The documented imperative API** (`try_acquire_lock`, `release_lock`,
//!   `start_keep_alive`, `stop_keep_alive`, `get_remaining_lease`,
//!   `is_leader`) and the [`Callbacks`] trait are thin adapters over the same
//!   core: one pure state machine decides what every RPC result means.
//! - **Safe lease accounting.** A lease is timed from the instant its request
//!   was *sent*, on a monotonic clock, minus a safety margin. If renewals fail,
//!   the client steps down at that deadline by a timer, even while a call still
//!   hangs. Transient faults (GOAWAY, resets, `UNAVAILABLE`, slow answers) are
//!   retried with backoff and jitter while the lease is valid.
//! - **Visible trouble.** Leadership changes are logged at `info` and a
//!   failing renewal while leading at `warn` (through `tracing`, in one span
//!   per client with one child span per RPC attempt); metrics with the
//!   `metrics` feature; [`QuorumQuestClient::health`] for a liveness probe.
//!
//! # Example
//!
//! Campaign, lead, hand over, using the in-process [`testing::TestServer`]
//! (feature `testing`) in place of a real server:
//!
//! ```
//! # #[cfg(feature = "testing")]
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use std::time::Duration;
//! use futures::StreamExt;
//! use quorum_quest_client::{LeadershipEvent, QuorumQuestClient};
//! use quorum_quest_client::testing::TestServer;
//!
//! let server = TestServer::start().await?;
//! let first = QuorumQuestClient::builder("billing", "eu-west")
//!     .address(server.url())
//!     .ttl(Duration::from_secs(2))
//!     .build()
//!     .await?;
//! let second = QuorumQuestClient::builder("billing", "eu-west")
//!     .address(server.url())
//!     .ttl(Duration::from_secs(2))
//!     .build()
//!     .await?;
//!
//! let mut leading = first.leadership();
//! let Some(LeadershipEvent::Elected { term, .. }) = leading.next().await else {
//!     panic!("the first contender wins a free lock");
//! };
//! let work = term.spawn(std::future::pending::<()>()); // stops when the term ends
//!
//! let mut waiting = second.leadership();
//! assert!(matches!(waiting.next().await, Some(LeadershipEvent::Follower)));
//!
//! leading.resign().await?; // steps down, then releases the lock
//! assert_eq!(work.await?, None);
//! loop {
//!     if let Some(LeadershipEvent::Elected { .. }) = waiting.next().await {
//!         break; // the second contender took over
//!     }
//! }
//! assert!(second.is_leader() && !first.is_leader());
//! # Ok(())
//! # }
//! # #[cfg(not(feature = "testing"))]
//! # fn main() {}
//! ```
//!
//! The imperative API, for code that polls rather than streams:
//!
//! ```no_run
//! use std::time::Duration;
//! use quorum_quest_client::QuorumQuestClient;
//!
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let client = QuorumQuestClient::new(
//!     "my-service",
//!     "production",
//!     Duration::from_secs(15),
//!     "http://localhost:5050",
//!     None, // client id: a random UUID
//!     None, // callbacks: none
//! )
//! .await?;
//! if client.try_acquire_lock().await? {
//!     client.start_keep_alive().await?;
//!     // ... leader work, checking client.is_leader() ...
//!     client.release_lock().await?;
//! }
//! client.stop_keep_alive().await;
//! # Ok(())
//! # }
//! ```
//!
//! # Exits
//!
//! What each way out guarantees about the lock (a leader that exits without
//! releasing makes every standby wait a whole TTL):
//!
//! - [`QuorumQuestClient::shutdown`]`.await`: on every runtime flavour, the
//!   campaign stops, the term ends, the lock is released and the streams and
//!   callbacks end before it returns (bounded: about one second plus the RPC
//!   timeout). Use it on SIGTERM and at the end of `main`.
//! - Dropping the last client handle, or the last [`Leadership`] stream
//!   while no keep-alive task runs, at any point (the end of `main`
//!   included): on a multi-thread runtime a leader's drop releases the lock
//!   before it returns (it blocks that task through `block_in_place`, for one
//!   release round trip, bounded the same way). On a current-thread runtime,
//!   inside a `LocalSet`, or for a follower, the release runs in a spawned
//!   task and completes only if the runtime goes on running. (Inside a
//!   `LocalSet` on a multi-thread runtime, `block_in_place` refuses with a
//!   panic that the client catches, but your panic hook sees it. Built with
//!   `panic = "abort"`, the client never calls `block_in_place`: it waits on
//!   a helper thread instead, except on a runtime with a single worker, where
//!   it releases in the background.) Many leading clients dropped one after
//!   the other during a server outage wait up to the RPC timeout each (about
//!   one TTL in all): call `shutdown()` on them concurrently instead. Dropped while
//!   the runtime itself shuts down, or outside any runtime, the client only
//!   steps down locally: the lock expires after its TTL.
//! - [`QuorumQuestClient::release_lock`]: releases, stops the keep-alive
//!   task; streams go on campaigning.
//! - A process killed with SIGKILL (or a crash) releases nothing: the lock
//!   expires after its TTL.
//!
//! # What the protocol cannot guarantee
//!
//! The service has no fencing token: a leader's writes elsewhere are not
//! tagged with its term. The client keeps its side (it stops considering
//! itself leader before the server could give the lock to anyone else), but
//! a server that loses its lock table (a restart of an in-memory store, a
//! store fail-over that loses writes) can hand the lock to a second node while
//! the first still holds a valid-looking lease. The README's "Guarantees and how
//! we test them" section measures that window.
//!
//! # Re-exports
//!
//! Types of other crates that appear in this API are re-exported, so that a
//! user needs no direct dependency on a matching version:
//!
//! - [`tonic`]: [`tonic::Code`] and [`tonic::Status`] appear in
//!   [`LeadershipEvent::RpcFailed`] and [`Error::Rpc`];
//!   [`tonic::transport::Endpoint`] and [`tonic::transport::Channel`] in
//!   [`ClientBuilder::endpoint`] and [`ClientBuilder::channel`].
//! - [`CancellationToken`] (from `tokio-util`), returned by
//!   [`LeaderTerm::token`].
//! - [`async_trait`](macro@async_trait), to implement [`Callbacks`].
//!
//! # Features
//!
//! - `tls` (default): TLS for `https://` addresses, with the public web PKI
//!   roots, a private CA (`ClientBuilder::ca_certificate`) or a whole tonic
//!   `ClientTlsConfig` (`ClientBuilder::tls`), and client certificates for
//!   mutual TLS (`ClientBuilder::identity`); rustls with ring. Without it
//!   the crate is plaintext-only and does not depend on ring.
//! - `testing`: the [`testing`] module, an in-process server and a
//!   fault-injecting proxy for tests of leader-dependent code.
//! - `metrics`: the [`metrics`] module, leadership and RPC
//!   metrics through the `metrics` crate facade.
//! - `cli`: the `quorum-quest` command-line tool (`run -- CMD`, `server`;
//!   Unix), a binary only: it adds nothing to the library's API.
//!
//! [Quorum Quest]: https://github.com/quorum-quest
#![warn(missing_docs)]
#![cfg_attr(docsrs, feature(doc_cfg))]
// The crate docs link to the `testing` and `metrics` modules, which exist
// only with their features (docs.rs builds with all features).
#![cfg_attr(
    not(all(feature = "testing", feature = "metrics")),
    allow(rustdoc::broken_intra_doc_links)
)]

mod admission;
mod backoff;
mod callbacks;
mod client;
mod config;
mod election;
mod error;
mod event;
mod ext;
mod fanout;
mod health;
mod identity;
#[cfg(feature = "metrics")]
#[cfg_attr(docsrs, doc(cfg(feature = "metrics")))]
pub mod metrics;
mod observe;
mod rpc;
mod state;
mod sync;
mod time;
mod transport;

// The generated protobuf and gRPC code. Not covered by semver: it follows the
// wire contract and the code generator. Public only for this crate's tests and
// for the `testing` feature (whose server implements the generated trait).
#[doc(hidden)]
pub mod proto;

#[cfg(feature = "testing")]
#[cfg_attr(docsrs, doc(cfg(feature = "testing")))]
pub mod testing;

pub use admission::DEFAULT_MAX_CONCURRENT_CALLS;
pub use async_trait::async_trait;
pub use tokio_util::sync::CancellationToken;
pub use tonic;

pub use callbacks::{drive_callbacks, Callbacks, NoOpCallbacks};
pub use client::{ClientBuilder, QuorumQuestClient, DEFAULT_ADDRESS, DEFAULT_TTL};
pub use config::Timing;
pub use election::{Leadership, LeadershipSet};
pub use error::{Error, Result};
pub use event::{LeaderTerm, LeadershipEvent, LossReason, RpcKind, TermEnded};
pub use ext::{LeaderChanges, LeadershipStreamExt, Transitions, UntilLost};
pub use health::{Health, Unhealthy};

/// The README's Rust examples, compiled as doc tests so they cannot rot.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
