//! Code generated from `proto/quorum_quest_api.proto` (package
//! `quorum.quest.api.v1`): messages and the tonic client, plus the server
//! trait with the `testing` feature.
//!
//! **Not covered by semver**: this module follows the wire contract and the
//! code generator (tonic, prost), and may change in any release. It is public
//! for this crate's tests and for the `testing` feature.
//!
//! ```
//! use quorum_quest_client::proto::TryAcquireLockRequest;
//!
//! let req = TryAcquireLockRequest {
//!     service: "billing".into(),
//!     domain: "eu".into(),
//!     client_id: "node-1".into(),
//!     ttl: 15,
//! };
//! assert_eq!(req.ttl, 15);
//! ```
#![allow(missing_docs, clippy::all, clippy::pedantic)]

tonic::include_proto!("quorum.quest.api.v1");
