//! Placeholder crate docs.

mod callbacks;
mod client;
mod config;
mod election;
pub mod error;
mod event;
mod ext;
pub mod proto;
mod rpc;
mod state;
mod transport;

#[cfg(feature = "testing")]
pub mod testing;

pub use async_trait::async_trait;
pub use callbacks::{drive_callbacks, Callbacks, NoOpCallbacks};
pub use client::{ClientBuilder, QuorumQuestClient, DEFAULT_ADDRESS, DEFAULT_TTL};
pub use config::Timing;
pub use election::Leadership;
pub use error::{Error, Result};
pub use event::{LeaderTerm, LeadershipEvent, LossReason, RpcKind};
pub use ext::LeadershipStreamExt;
