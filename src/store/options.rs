//! What a save or a load is asked to do: [`SaveOptions`], [`LoadOptions`], [`Expiry`], the
//! operations of a transaction, and what [`Store::get_metadata`](super::Store::get_metadata)
//! tells.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::backend::{CustomMetadata, RecordMeta, RecordVersion};
use crate::clock::Timestamp;
use crate::codec::{self, Compression, Format};
use crate::error::{Result, StorageError};

/// When a saved record expires.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Expiry {
    /// Use the store's `default_ttl` (no expiry if it has none). The default.
    #[default]
    StoreDefault,
    /// Never expires, whatever the store's default.
    Never,
    /// Expires this long after the save.
    After(Duration),
}

/// Options of [`Store::save`](super::Store::save). Every field has a builder method.
///
/// ```
/// use bevy_storage::{Compression, SaveOptions};
/// use std::time::Duration;
/// let opts = SaveOptions::new()
///     .ttl(Duration::from_secs(30 * 86_400))
///     .compression(Compression::Lz4)
///     .metadata("level", "Crypt of Bones")
///     .metadata("play_time_s", 4521)
///     .overwrite(false);
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct SaveOptions {
    /// When the record expires.
    pub expiry: Expiry,
    /// Compress or not (see [`Compression`]). `None`: the store's
    /// [`StorageConfig::compression`](crate::StorageConfig::compression).
    pub compression: Option<Compression>,
    /// Encrypt with the store's key. `None`: the store's `enable_encryption`.
    pub encrypt: Option<bool>,
    /// The game's own fields, stored beside the value (not encrypted).
    pub metadata: CustomMetadata,
    /// `false`: fail with [`StorageError::AlreadyExists`] when a live record exists. Default `true`.
    pub overwrite: bool,
    /// Write only over the live record of this version, else fail with
    /// [`StorageError::VersionConflict`] (see [`if_version`](Self::if_version)). Default `None`.
    pub if_version: Option<RecordVersion>,
    /// Serde format. `None`: the store's format.
    pub format: Option<Format>,
}

impl Default for SaveOptions {
    fn default() -> Self {
        Self {
            expiry: Expiry::StoreDefault,
            compression: None,
            encrypt: None,
            metadata: CustomMetadata::new(),
            overwrite: true,
            if_version: None,
            format: None,
        }
    }
}

impl SaveOptions {
    /// The defaults: store defaults for TTL, compression, encryption and format; overwrite on.
    pub fn new() -> Self {
        Self::default()
    }
    /// Expire `ttl` after the save.
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.expiry = Expiry::After(ttl);
        self
    }
    /// Never expire, even if the store has a default TTL.
    pub fn no_expiry(mut self) -> Self {
        self.expiry = Expiry::Never;
        self
    }
    /// Compresses (or not) regardless of the store default.
    pub fn compression(mut self, compression: Compression) -> Self {
        self.compression = Some(compression);
        self
    }
    /// Encrypt (or not) regardless of the store default.
    pub fn encrypt(mut self, on: bool) -> Self {
        self.encrypt = Some(on);
        self
    }
    /// Adds one custom metadata field.
    pub fn metadata(
        mut self,
        field: impl Into<String>,
        value: impl Into<serde_json::Value>,
    ) -> Self {
        self.metadata.insert(field.into(), value.into());
        self
    }
    /// Replaces all custom metadata.
    pub fn metadata_map(mut self, metadata: CustomMetadata) -> Self {
        self.metadata = metadata;
        self
    }
    /// Whether an existing live record may be replaced.
    pub fn overwrite(mut self, allowed: bool) -> Self {
        self.overwrite = allowed;
        self
    }
    /// Optimistic concurrency: write only if the key still holds the live record of
    /// `version` (as [`Store::load_versioned`](super::Store::load_versioned) or
    /// [`Store::get_metadata`](super::Store::get_metadata) returned it, or an earlier
    /// [`Store::save`](super::Store::save)). If anyone wrote, deleted or let the record
    /// expire since, the save fails with [`StorageError::VersionConflict`] carrying the
    /// version found, and nothing is written: load again, redo the change, retry. Checked
    /// atomically with the write on every backend, also against other processes and servers
    /// sharing the store. Takes precedence over [`overwrite`](Self::overwrite).
    ///
    /// ```
    /// use bevy_storage::prelude::*;
    /// let store = Store::open(StorageConfig::memory())?;
    /// store.set("gold", &10u32)?;
    /// let (gold, version) = store.load_versioned::<u32>("gold", &LoadOptions::default())?.unwrap();
    /// store.save("gold", &(gold + 5), &SaveOptions::new().if_version(version))?;
    /// // The version changed with that write: a second write from the same read is refused.
    /// let stale = store.save("gold", &(gold + 1), &SaveOptions::new().if_version(version));
    /// assert!(matches!(stale, Err(StorageError::VersionConflict { .. })));
    /// assert_eq!(store.get::<u32>("gold")?, Some(15));
    /// # Ok::<(), StorageError>(())
    /// ```
    pub fn if_version(mut self, version: RecordVersion) -> Self {
        self.if_version = Some(version);
        self
    }
    /// Serde format for this value.
    pub fn format(mut self, format: Format) -> Self {
        self.format = Some(format);
        self
    }
}

/// Options of [`Store::load`](super::Store::load).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LoadOptions {
    /// Record this read as the record's last access (one extra small write). Default off,
    /// so that reads stay reads.
    pub update_access_time: bool,
    /// In a store that encrypts by default, also return records that are not encrypted.
    /// Default off: such a store refuses them with [`StorageError::NotEncrypted`], because
    /// anyone who can edit the save file can write a plaintext record (see
    /// [`StorageConfig::enable_encryption`](crate::StorageConfig::enable_encryption)). Turn it on to migrate saves written before
    /// encryption was enabled, or to read records the game saved with `encrypt(false)`.
    pub accept_plaintext: bool,
}

impl LoadOptions {
    /// The defaults (no access-time update).
    pub fn new() -> Self {
        Self::default()
    }
    /// Update the record's last-access time on this load.
    pub fn update_access_time(mut self, on: bool) -> Self {
        self.update_access_time = on;
        self
    }
    /// Accept a record that is not encrypted in a store that encrypts by default (see
    /// [`accept_plaintext`](Self::accept_plaintext)).
    pub fn accept_plaintext(mut self, on: bool) -> Self {
        self.accept_plaintext = on;
        self
    }
}

/// What [`Store::get_metadata`](super::Store::get_metadata) tells about a record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StorageMetadata {
    /// The key.
    pub key: String,
    /// Size in bytes as stored (after compression and encryption).
    pub size: u64,
    /// First written (kept across overwrites).
    pub created_at: SystemTime,
    /// Last written.
    pub modified_at: SystemTime,
    /// Last read with access-time update (else the last write).
    pub last_accessed_at: SystemTime,
    /// When it expires, if ever.
    pub expires_at: Option<SystemTime>,
    /// Stored compressed.
    pub compressed: bool,
    /// Stored encrypted.
    pub encrypted: bool,
    /// The game's own fields.
    pub custom: CustomMetadata,
    /// The record's version, for a save conditional on it
    /// ([`SaveOptions::if_version`]).
    pub version: RecordVersion,
}

impl StorageMetadata {
    pub(super) fn from_record(key: &str, meta: RecordMeta) -> Self {
        Self {
            key: key.to_owned(),
            size: meta.size,
            created_at: meta.created_at.to_system_time(),
            modified_at: meta.modified_at.to_system_time(),
            last_accessed_at: meta.accessed_at.to_system_time(),
            expires_at: meta.expires_at.map(Timestamp::to_system_time),
            compressed: meta.compressed,
            encrypted: meta.encrypted,
            custom: meta.custom,
            version: meta.version,
        }
    }

    /// One custom field decoded as `T`: `None` if absent, `Some(Err)` if it has another shape.
    pub fn custom_field<T: DeserializeOwned>(&self, field: &str) -> Option<Result<T>> {
        self.custom.get(field).map(|v| {
            T::deserialize(v).map_err(|e| StorageError::Deserialize {
                key: format!("{} (metadata field {field:?})", self.key),
                message: e.to_string(),
            })
        })
    }
}

/// A value of any serializable type, kept until the store serializes it with its format.
/// Used by [`StorageOperation`] and by the plugin's requests, which carry values of many types.
#[derive(Clone)]
pub struct ErasedValue(Arc<SerializeFn>);

/// Serializes a captured value for a key (named in errors) in a format, appending to a buffer.
type SerializeFn = dyn Fn(&str, Format, &mut Vec<u8>) -> Result<()> + Send + Sync;

impl ErasedValue {
    /// Wraps a value.
    pub fn new<T: Serialize + Send + Sync + 'static>(value: T) -> Self {
        Self(Arc::new(move |key, format, out| {
            codec::format::serialize_into(key, &value, format, out)
        }))
    }

    /// Serializes the value in `format`; `key` only names it in errors.
    pub fn serialize(&self, key: &str, format: Format) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        self.serialize_into(key, format, &mut out)?;
        Ok(out)
    }

    /// Serializes the value in `format`, appending to `out`; `key` only names it in errors.
    pub fn serialize_into(&self, key: &str, format: Format, out: &mut Vec<u8>) -> Result<()> {
        (self.0)(key, format, out)
    }
}

impl fmt::Debug for ErasedValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ErasedValue(..)")
    }
}

/// One change inside a [`Store::transaction`](super::Store::transaction).
#[derive(Debug, Clone)]
pub enum StorageOperation {
    /// Save a value.
    Save {
        /// The key.
        key: String,
        /// The value.
        value: ErasedValue,
        /// Save options, as for [`Store::save`](super::Store::save).
        options: SaveOptions,
    },
    /// Delete a key (a missing key is not an error).
    Delete {
        /// The key.
        key: String,
    },
}

impl StorageOperation {
    /// A save with default options.
    pub fn save<T: Serialize + Send + Sync + 'static>(key: impl Into<String>, value: T) -> Self {
        Self::save_with(key, value, SaveOptions::default())
    }

    /// A save with options.
    pub fn save_with<T: Serialize + Send + Sync + 'static>(
        key: impl Into<String>,
        value: T,
        options: SaveOptions,
    ) -> Self {
        Self::Save {
            key: key.into(),
            value: ErasedValue::new(value),
            options,
        }
    }

    /// A delete.
    pub fn delete(key: impl Into<String>) -> Self {
        Self::Delete { key: key.into() }
    }

    /// The key this operation touches.
    pub fn key(&self) -> &str {
        match self {
            Self::Save { key, .. } | Self::Delete { key } => key,
        }
    }
}
