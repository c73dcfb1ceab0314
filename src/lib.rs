//! bevy_storage (being written)
#![warn(missing_docs)]

pub mod backend;
pub mod clock;
pub mod error;
pub mod key;

pub use error::{Result, StorageError};
