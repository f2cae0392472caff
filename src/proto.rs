//! Code generated from `proto/quorum_quest_api.proto` (package
//! `quorum.quest.api.v1`): messages, the tonic client and the server trait.
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
