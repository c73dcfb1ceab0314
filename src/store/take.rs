//! [`Store::take`]: load and delete in one atomic step (bevy_pkv's `remove_and_get`).
//!
//! # How it is atomic, and why nothing is lost
//!
//! A take reads the record, checks and opens it (integrity, decryption, decompression) and
//! decodes it, and only then removes it with
//! [`Backend::delete_if_unchanged`](crate::backend::Backend::delete_if_unchanged), which
//! removes the record only if it still holds the bytes and expiry that were read, in one
//! atomic step of the backend (under its lock, one SQL statement, one Lua script). If another
//! writer changed or removed the key in between, the take starts again from the read. So:
//!
//! - of several callers taking the same key at once (threads, or stores over the same
//!   file, database or Redis namespace), exactly one gets the value; the others get `Ok(None)`
//!   (or the newer value, if one was saved meanwhile);
//! - a record that cannot be decoded as asked (another type, a wrong or missing encryption
//!   key, damage) is **not removed**: the take fails with the same error a load gives and the
//!   record stays for a load with the right type or key;
//! - an expired record is never returned; a take that finds one removes it (as the TTL
//!   cleanup would) and answers `Ok(None)`.
//!
//! The quota's usage and the read cache are kept exact as for a delete.

use serde::de::DeserializeOwned;

use super::Store;
use super::options::LoadOptions;
use super::stats::OpKind;
use crate::codec::{self, EnvelopeInfo};
use crate::error::{Result, StorageError};
use crate::key;

/// How many times a take starts again because the key kept changing under it before it gives
/// up with [`StorageError::Unavailable`]. Each retry means another writer changed the key in
/// the few microseconds between the read and the removal.
const MAX_TAKE_ATTEMPTS: usize = 64;

impl Store {
    /// Loads the value under `key` and deletes it, atomically: `Ok(None)` when it is missing
    /// or expired. Of several takes of one key at once, exactly one gets the value.
    ///
    /// Fails like [`load`](Self::load) (`Corrupt`, `DecryptionFailed`, `Deserialize`, ...),
    /// and then **does not delete** the record: a value that does not decode as `T` is
    /// never thrown away. See the [module docs](crate::store::take) for how it works.
    /// `options.update_access_time` has no effect (the record is gone afterwards);
    /// `accept_plaintext` works as for a load.
    ///
    /// ```
    /// # use bevy_storage::prelude::*;
    /// let store = Store::open(StorageConfig::memory())?;
    /// store.set("gift:42", &"a sword")?;
    /// assert_eq!(store.take::<String>("gift:42", &LoadOptions::default())?, Some("a sword".into()));
    /// assert_eq!(store.take::<String>("gift:42", &LoadOptions::default())?, None);
    /// assert!(!store.exists("gift:42")?);
    /// # Ok::<(), StorageError>(())
    /// ```
    pub fn take<T: DeserializeOwned>(&self, key: &str, options: &LoadOptions) -> Result<Option<T>> {
        self.take_with(key, options, |payload, info| {
            codec::format::deserialize(key, payload, info.format)
        })
        .map(|taken| taken.map(|(value, _, _)| value))
    }

    /// [`take`](Self::take) of the decoded payload bytes, as [`load_bytes`](Self::load_bytes)
    /// returns them, without deserializing. The record is removed once its envelope opened
    /// (integrity checked, decrypted, decompressed); a payload that is then not the type the
    /// caller expects is the caller's to keep.
    pub fn take_bytes(
        &self,
        key: &str,
        options: &LoadOptions,
    ) -> Result<Option<(Vec<u8>, EnvelopeInfo)>> {
        self.take_with(key, options, |_, _| Ok(()))
            .map(|taken| taken.map(|((), payload, info)| (payload, info)))
    }

    /// A take, counted in the statistics as a write: `check` runs on the opened payload
    /// before the removal; its error leaves the record in place. Returns what `check`
    /// returned with the payload.
    pub(crate) fn take_with<R>(
        &self,
        key: &str,
        options: &LoadOptions,
        check: impl FnMut(&[u8], EnvelopeInfo) -> Result<R>,
    ) -> Result<Option<(R, Vec<u8>, EnvelopeInfo)>> {
        self.instrument(OpKind::Write, || self.take_loop(key, options, check))
    }

    /// The take loop; see the [module docs](self).
    fn take_loop<R>(
        &self,
        key: &str,
        options: &LoadOptions,
        mut check: impl FnMut(&[u8], EnvelopeInfo) -> Result<R>,
    ) -> Result<Option<(R, Vec<u8>, EnvelopeInfo)>> {
        key::validate_key(key)?;
        let backend = &self.inner.backend;
        // Shared, as for any write: a recount of the quota never runs in the middle of it.
        let _gate = self.inner.quota.as_ref().map(|q| q.gate.read());
        for _ in 0..MAX_TAKE_ATTEMPTS {
            let now = self.inner.clock.now();
            let Some((value, expires_at)) = backend.get_value(key)? else {
                return Ok(None);
            };
            if now.is_past(expires_at) {
                // Not counted under the quota (which counts live records): nothing to free.
                self.without_cached(key, || backend.delete_if_unchanged(key, &value, expires_at))?;
                return Ok(None);
            }
            if self.inner.default_encrypt && !options.accept_plaintext {
                let info = codec::envelope::inspect(key, &value)?;
                if !info.encrypted {
                    return Err(StorageError::NotEncrypted {
                        key: key.to_owned(),
                    });
                }
            }
            let (payload, info) =
                codec::envelope::open_vec(key, value.clone(), self.inner.cipher.as_ref())?;
            let checked = check(&payload, info)?;
            let removed =
                self.without_cached(key, || backend.delete_if_unchanged(key, &value, expires_at))?;
            if removed {
                if let Some(quota) = &self.inner.quota {
                    let mut used = quota.used.lock();
                    *used = used.saturating_sub(value.len() as u64);
                }
                return Ok(Some((checked, payload, info)));
            }
            // Changed or removed since the read: read again.
        }
        Err(StorageError::unavailable(
            backend.backend_type(),
            format!(
                "the key {key:?} kept changing while it was being taken ({MAX_TAKE_ATTEMPTS} \
                 attempts); nothing was taken, try again"
            ),
        ))
    }

    /// Runs a removal of `key` with its cached read dropped before and after, as
    /// [`write`](Self::write) does.
    fn without_cached<T>(&self, key: &str, remove: impl FnOnce() -> Result<T>) -> Result<T> {
        let Some(cache) = &self.inner.cache else {
            return remove();
        };
        cache.invalidate([key]);
        let result = remove();
        cache.invalidate([key]);
        result
    }
}
