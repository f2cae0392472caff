//! Quorum Quest client (placeholder crate docs, rewritten below).

pub mod error;
pub mod proto;

#[cfg(feature = "testing")]
pub mod testing;

pub use error::{Error, Result};
