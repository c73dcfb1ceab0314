//! The one error type of the crate.
//!
//! Every failure a game can meet is a [`StorageError`] variant that names what went wrong and,
//! where it helps, what to do about it. Secrets (encryption keys, passphrases) never appear in
//! these messages.

use std::io;

/// Shorthand for `Result<T, StorageError>`.
pub type Result<T, E = StorageError> = std::result::Result<T, E>;

/// Everything that can go wrong in `bevy_storage`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StorageError {
    /// The key breaks the key rules (see [`crate::key`]).
    #[error("invalid key {key:?}: {reason}")]
    InvalidKey {
        /// The offending key (shortened if very long).
        key: String,
        /// Which rule it breaks.
        reason: &'static str,
    },

    /// An application identifier for
    /// [`StorageConfig::for_app`](crate::StorageConfig::for_app) breaks the rule of
    /// [`app_dir`](crate::app_dir) (a reverse domain name such as `com.studio.game`).
    #[error(
        "invalid application identifier {id:?}: {reason} (use a reverse domain name such as com.studio.game)"
    )]
    InvalidAppId {
        /// The identifier (shortened if very long).
        id: String,
        /// Which rule it breaks.
        reason: String,
    },

    /// `overwrite: false` was asked and a live record already exists under this key.
    #[error("key {key:?} already exists and overwrite is disabled")]
    AlreadyExists {
        /// The key that exists.
        key: String,
    },

    /// A write conditional on a version ([`SaveOptions::if_version`](crate::SaveOptions::if_version))
    /// found another version, or no live record: someone else wrote (or deleted) the record
    /// since it was read. Nothing was changed; read it again, redo the change, and retry.
    #[error(
        "version conflict on {key:?}: the write expected version {expected} but found {}; nothing was changed (load the record again and retry)",
        match found { Some(v) => format!("version {v}"), None => "no record".to_owned() }
    )]
    VersionConflict {
        /// The key.
        key: String,
        /// The version the write required.
        expected: crate::backend::RecordVersion,
        /// The version of the live record found instead; `None` when the key is missing or
        /// expired.
        found: Option<crate::backend::RecordVersion>,
    },

    /// The write would make the store larger than `max_size`; nothing was changed.
    #[error(
        "storage quota exceeded: the write needs {needed} bytes but only {available} of {max_size} are free; nothing was changed (raise StorageConfig::max_size or delete records)"
    )]
    QuotaExceeded {
        /// Bytes the write would add.
        needed: u64,
        /// Bytes still free under the quota.
        available: u64,
        /// The configured quota.
        max_size: u64,
    },

    /// The value could not be turned into bytes.
    #[error("could not serialize the value for {key:?}: {message}")]
    Serialize {
        /// Key being written.
        key: String,
        /// What the serializer said.
        message: String,
    },

    /// The stored bytes decoded but do not fit the requested type.
    #[error("record {key:?} does not decode as the requested type: {message}")]
    Deserialize {
        /// Key being read.
        key: String,
        /// What the deserializer said.
        message: String,
    },

    /// The stored value nests deeper than the decoders allow
    /// ([`MAX_DEPTH`](crate::codec::depth::MAX_DEPTH) levels): a crafted or edited save, refused
    /// before it can exhaust the stack. On a save, the value itself nests that deep and was not
    /// written (no load would accept it).
    #[error(
        "record {key:?} nests deeper than {limit} levels: refused (a crafted or damaged save, or a value too deeply nested to store)"
    )]
    NestingTooDeep {
        /// Key being read or written.
        key: String,
        /// The nesting limit.
        limit: usize,
    },
    /// The store encrypts every record, and this one is not encrypted: it was not written with
    /// the store's key (an edited or forged save, or a plaintext record from before encryption
    /// was turned on). Load it with
    /// [`LoadOptions::accept_plaintext`](crate::LoadOptions::accept_plaintext) to migrate such
    /// records deliberately.
    #[error(
        "record {key:?} is not encrypted, but this store encrypts every record: it was not written with the store's key (edited, forged, or saved before encryption was on); refused (LoadOptions::accept_plaintext(true) reads it, for migrating old saves)"
    )]
    NotEncrypted {
        /// Key being read.
        key: String,
    },
    /// The stored record is damaged: truncated, bit-flipped, or not a record at all.
    #[error("record {key:?} is corrupt: {reason}")]
    Corrupt {
        /// Key being read.
        key: String,
        /// What check failed.
        reason: String,
    },

    /// The record was written by a newer version of this crate.
    #[error(
        "record {key:?} uses envelope format version {found}, newer than the {supported} this build reads; upgrade bevy_storage"
    )]
    UnsupportedVersion {
        /// Key being read.
        key: String,
        /// Version found in the record.
        found: u8,
        /// Highest version this build reads.
        supported: u8,
    },

    /// The record is encrypted and the store has no encryption key.
    #[error(
        "record {key:?} is encrypted but the store was opened without an encryption key (set StorageConfig::encryption_key)"
    )]
    EncryptionKeyMissing {
        /// Key being read.
        key: String,
    },

    /// Encryption was asked for a write but the store has no encryption key.
    #[error(
        "cannot encrypt {key:?}: the store has no encryption key (set StorageConfig::encryption_key)"
    )]
    EncryptionNotConfigured {
        /// Key being written.
        key: String,
    },

    /// Decryption failed: the key is wrong or the ciphertext was altered (AES-GCM cannot tell which).
    #[error(
        "record {key:?} failed to decrypt: wrong encryption key, or the record was tampered with or copied from another key"
    )]
    DecryptionFailed {
        /// Key being read.
        key: String,
    },

    /// The store's encryption key does not match the one the store was created with.
    #[error(
        "the encryption key does not match the one this store was created with (wrong key or passphrase)"
    )]
    WrongEncryptionKey,

    /// An encryption key could not be built (bad length, bad passphrase parameters).
    #[error("invalid encryption key: {0}")]
    InvalidEncryptionKey(String),

    /// A cargo feature this operation needs is not compiled in.
    #[error("{what} needs the `{feature}` cargo feature of bevy_storage")]
    FeatureDisabled {
        /// The feature name.
        feature: &'static str,
        /// What needed it.
        what: String,
    },

    /// The configuration is inconsistent or incomplete.
    #[error("invalid storage configuration: {0}")]
    Config(String),

    /// The backend cannot be reached (a server is down, a connection timed out).
    #[error("{backend} backend unavailable: {message}")]
    Unavailable {
        /// Backend type.
        backend: String,
        /// What failed.
        message: String,
    },

    /// The medium is full: the disk under a file or SQLite store (`ENOSPC`, `SQLITE_FULL`,
    /// a disk quota) or the memory of a Redis server (`OOM command not allowed`). Nothing of
    /// the failed write was applied and every record written before is intact; the store
    /// reports itself unhealthy until a write succeeds again. Free space (delete records, or
    /// on the server raise `maxmemory`) and retry.
    #[error("{backend} store is full: {message}; nothing was written (free space and retry)")]
    StorageFull {
        /// Backend type.
        backend: String,
        /// What was being done, and what the system said.
        message: String,
    },

    /// The store is read-only: opened with
    /// [`StorageConfig::read_only`](crate::StorageConfig::read_only), or opened read-only by
    /// itself because its medium refused writes (a read-only mount, a file without write
    /// permission; [`StorageStats::read_only`](crate::StorageStats::read_only) says so).
    /// Loads, lists, `exists` and metadata work; every write gets this error and changes
    /// nothing.
    #[error("{backend} store is read-only ({reason}): {operation} refused")]
    ReadOnly {
        /// Backend type.
        backend: String,
        /// The write that was refused.
        operation: String,
        /// Why the store is read-only.
        reason: String,
    },

    /// A write batch was sent but its outcome is unknown: the connection broke or the
    /// server stopped answering after the batch left, so it may or may not have been
    /// applied, and may still be applied after this error (a hung server runs it when it
    /// wakes up). It is atomic either way: all of it or none, so one of its keys tells for
    /// the whole batch. To find out, once the server answers again, read the metadata of a
    /// key the batch saved: the batch was applied exactly when that record's `modified_at`
    /// is the time of the save (every put of a batch carries it). The built-in backends
    /// leave `batch_token` `None`; a custom backend that can name its batches puts the name
    /// there.
    #[error(
        "{backend} write outcome unknown: {message}; the batch was sent and may or may not have been applied (all or none)"
    )]
    OutcomeUnknown {
        /// Backend type.
        backend: String,
        /// What failed after the batch was sent.
        message: String,
        /// The batch's token, to ask later whether it was applied (`None` when the backend
        /// cannot tell).
        batch_token: Option<String>,
    },

    /// A backend failed for another reason.
    #[error("{backend} backend error: {message}")]
    Backend {
        /// Backend type.
        backend: String,
        /// What failed.
        message: String,
    },

    /// An I/O error from the file system.
    #[error("I/O error while {context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },

    /// A world snapshot could not be captured, decoded or applied; the message says why.
    #[error("world snapshot: {0}")]
    Snapshot(String),

    /// There is no snapshot to load under this key (or no autosave under this prefix).
    #[error("there is no world snapshot under {key:?}")]
    NoSnapshot {
        /// The slot key or autosave prefix.
        key: String,
    },

    /// A snapshot names a type this app does not register for reflection.
    #[error(
        "the snapshot holds a {type_path} but this app does not register that type for reflection (derive Reflect with #[reflect(Component)] or #[reflect(Resource)], or register a migration for it); the world was not changed"
    )]
    UnregisteredType {
        /// The type path found in the snapshot.
        type_path: String,
    },

    /// The snapshot was written by a newer version of this crate.
    #[error(
        "the snapshot uses format version {found}, newer than the {supported} this build reads; upgrade bevy_storage"
    )]
    SnapshotFormatTooNew {
        /// Format version found.
        found: u16,
        /// Newest this build reads.
        supported: u16,
    },

    /// The snapshot was written by a newer version of the game.
    #[error(
        "the snapshot was saved by game version {found}, newer than this game's {current}; it cannot be loaded by an older build"
    )]
    SnapshotGameVersionTooNew {
        /// Game version found.
        found: u32,
        /// This game's version.
        current: u32,
    },

    /// A transaction the backend cannot apply as given, refused whole before anything was
    /// written: on Redis, a batch larger than
    /// [`MAX_BATCH_OPERATIONS`](crate::backend::redis::MAX_BATCH_OPERATIONS) operations or
    /// [`MAX_BATCH_BYTES`](crate::backend::redis::MAX_BATCH_BYTES) (an empty transaction is
    /// `Ok` and changes nothing; a key named twice applies its operations in order).
    #[error("invalid transaction: {0}")]
    InvalidTransaction(String),
}

impl StorageError {
    /// A backend failure with a message; for custom [`Backend`](crate::backend::Backend)s.
    pub fn backend(backend: impl Into<String>, message: impl ToString) -> Self {
        Self::Backend {
            backend: backend.into(),
            message: message.to_string(),
        }
    }

    /// The backend is unreachable; for custom [`Backend`](crate::backend::Backend)s.
    pub fn unavailable(backend: impl Into<String>, message: impl ToString) -> Self {
        Self::Unavailable {
            backend: backend.into(),
            message: message.to_string(),
        }
    }

    /// An I/O error with a description of what was being done. A full disk or disk quota
    /// (`ENOSPC`, `EDQUOT`) becomes [`StorageFull`](Self::StorageFull) (backend `file`), so
    /// that a full medium has one error whatever the backend.
    pub fn io(context: impl Into<String>, source: io::Error) -> Self {
        if matches!(
            source.kind(),
            io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded
        ) {
            return Self::StorageFull {
                backend: "file".into(),
                message: format!("{}: {source}", context.into()),
            };
        }
        Self::Io {
            context: context.into(),
            source,
        }
    }

    /// The store refuses `operation` because it is read-only for `reason`.
    pub(crate) fn read_only(
        backend: impl Into<String>,
        operation: impl Into<String>,
        reason: impl Into<String>,
    ) -> Self {
        Self::ReadOnly {
            backend: backend.into(),
            operation: operation.into(),
            reason: reason.into(),
        }
    }

    pub(crate) fn corrupt(key: &str, reason: impl Into<String>) -> Self {
        Self::Corrupt {
            key: key.to_owned(),
            reason: reason.into(),
        }
    }

    /// True when the error means the backend itself is unhealthy (as opposed to bad input).
    pub fn is_backend_failure(&self) -> bool {
        matches!(
            self,
            Self::Unavailable { .. }
                | Self::Backend { .. }
                | Self::Io { .. }
                | Self::StorageFull { .. }
                | Self::OutcomeUnknown { .. }
        )
    }
}
