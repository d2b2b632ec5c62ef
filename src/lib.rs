//! ckpt: process-level checkpoint/restore supervisor and its client library.
//!
//! Jobs use [`Checkpointer`] (build with `default-features = false` to leave out the
//! supervisor's dependencies). The on-disk format lives in [`store`], the job/supervisor
//! contract in [`protocol`]; both are specified in `docs/protocol.md`.

pub mod client;
pub mod error;
pub mod multi_rank;
pub mod pod;
pub mod protocol;
pub mod snapshot;
pub mod store;

#[cfg(feature = "supervisor")]
pub mod cli;
#[cfg(feature = "supervisor")]
pub mod demo;
#[cfg(feature = "supervisor")]
pub mod exit;
#[cfg(feature = "supervisor")]
pub mod fmt;
#[cfg(feature = "supervisor")]
pub mod integrations;
#[cfg(feature = "supervisor")]
pub mod remote;
#[cfg(feature = "supervisor")]
pub mod supervisor;

pub use client::{Checkpointer, RestorePoint, Saved, Start};
pub use error::{Error, Result};
pub use multi_rank::World;
pub use pod::Pod;
pub use snapshot::Snapshot;
