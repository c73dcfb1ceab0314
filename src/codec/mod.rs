//! Value ⇄ bytes: a serde format, optional LZ4, optional AES-256-GCM, inside a versioned,
//! checksummed envelope.
//!
//! Pure functions with no I/O, so they are easy to test and fuzz. The [`Store`](crate::Store)
//! calls them; the snapshot layer seals its own bytes with the same [`envelope`].
//!
//! Pipeline on save: `value --serde--> payload --lz4?--> --AES-GCM?--> envelope`;
//! load runs it backwards and checks everything on the way.

pub mod compress;
pub mod crypto;
pub mod depth;
pub mod envelope;
pub mod format;

pub use compress::Compression;
pub use crypto::{Cipher, EncryptionKey};
pub use envelope::{EnvelopeInfo, SealOptions};
pub use format::Format;

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::Result;

/// Serializes `value` with `format` and seals it for `key`.
pub fn encode<T: Serialize + ?Sized>(
    key: &str,
    value: &T,
    options: &SealOptions,
    cipher: Option<&Cipher>,
) -> Result<(Vec<u8>, EnvelopeInfo)> {
    let mut buf = envelope::payload_buffer(options, 0);
    format::serialize_into(key, value, options.format, &mut buf)?;
    envelope::seal_vec(key, buf, options, cipher)
}

/// Opens the envelope of `key` and deserializes the value.
pub fn decode<T: DeserializeOwned>(key: &str, bytes: &[u8], cipher: Option<&Cipher>) -> Result<T> {
    let (payload, info) = envelope::open(key, bytes, cipher)?;
    format::deserialize(key, &payload, info.format)
}
