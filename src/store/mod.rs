//! [`Store`]: the key-value API every backend shares, with its semantics implemented once.
//!
//! The store validates keys, turns values into sealed records with the [`codec`],
//! hides expired records, enforces the quota, keeps `created_at` across overwrites, and counts
//! statistics. Backends below it only keep bytes.

mod cache;
mod listing;
mod open;
mod options;
mod quota;
mod stats;
pub mod take;

use cache::{CachedRead, Lookup, ReadCache};
pub use listing::{KeyPage, MAX_PAGE};
pub use options::{
    ErasedValue, Expiry, LoadOptions, SaveOptions, StorageMetadata, StorageOperation,
};
use quota::Quota;
pub use stats::{CacheStats, PerformanceStats, StorageStats};
use stats::{Counters, OpKind};

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime};

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::backend::{
    Backend, CustomMetadata, PutMode, Record, RecordMeta, RecordVersion, WriteOp, WriteOutcome,
};
use crate::clock::{Clock, Timestamp};
use crate::codec::crypto::KdfParams;
use crate::codec::{self, Cipher, Compression, EnvelopeInfo, Format, SealOptions};
use crate::config::StorageConfig;
use crate::error::{Result, StorageError};
use crate::key::{self, KEYCHECK_KEY};

struct Inner {
    cache: Option<ReadCache>,
    backend: Arc<dyn Backend>,
    cipher: Option<Cipher>,
    clock: Arc<dyn Clock>,
    format: Format,
    default_ttl: Option<Duration>,
    default_compression: Compression,
    default_encrypt: bool,
    quota: Option<Quota>,
    counters: Counters,
}

/// A key-value store over one backend. Cheap to clone (`Arc` inside), `Send + Sync`: share it
/// between threads and tasks freely.
///
/// ```
/// use bevy_storage::{LoadOptions, SaveOptions, StorageConfig, Store};
/// use serde::{Deserialize, Serialize};
/// #[derive(Serialize, Deserialize, PartialEq, Debug)]
/// struct Player { name: String, level: u32 }
///
/// let store = Store::open(StorageConfig::memory())?;
/// let hero = Player { name: "Ada".into(), level: 7 };
/// store.save("player:1", &hero, &SaveOptions::default())?;
/// assert_eq!(store.load::<Player>("player:1", &LoadOptions::default())?, Some(hero));
/// assert_eq!(store.list_keys("player:")?, vec!["player:1".to_string()]);
/// # Ok::<(), bevy_storage::StorageError>(())
/// ```
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

impl fmt::Debug for Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Store")
            .field("backend", &self.inner.backend.backend_type())
            .field("format", &self.inner.format)
            .field("encryption", &self.inner.cipher.is_some())
            .finish_non_exhaustive()
    }
}

impl Store {
    /// The backend under this store.
    pub fn backend(&self) -> &Arc<dyn Backend> {
        &self.inner.backend
    }

    /// The current time by the store's clock.
    pub fn now(&self) -> SystemTime {
        self.inner.clock.now().to_system_time()
    }

    fn instrument<R>(&self, kind: OpKind, f: impl FnOnce() -> Result<R>) -> Result<R> {
        let start = Instant::now();
        let result = f();
        let nanos = u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX);
        let c = &self.inner.counters;
        let (count, total) = match kind {
            OpKind::Read => (&c.reads, &c.read_nanos),
            OpKind::Write => (&c.writes, &c.write_nanos),
        };
        count.fetch_add(1, Ordering::Relaxed);
        total.fetch_add(nanos, Ordering::Relaxed);
        match &result {
            Ok(_) => self.note_success(kind),
            Err(e) => {
                c.errors.fetch_add(1, Ordering::Relaxed);
                self.note_error(kind, e);
            }
        }
        result
    }

    fn note_error(&self, kind: OpKind, e: &StorageError) {
        if e.is_backend_failure() {
            let c = &self.inner.counters;
            c.failing(kind).store(true, Ordering::Relaxed);
            let at = self.inner.clock.now().to_system_time();
            *c.last_error.lock() = Some((e.to_string(), at));
        }
        if matches!(e, StorageError::Corrupt { .. }) && self.inner.backend.damage().is_some() {
            self.note_damage();
        }
    }

    /// When the backend's damage was first seen: now, the first time this is called.
    fn note_damage(&self) -> SystemTime {
        *self
            .inner
            .counters
            .damage_seen_at
            .lock()
            .get_or_insert_with(|| self.inner.clock.now().to_system_time())
    }

    /// An operation of `kind` succeeded: once no kind is failing any more, the last error is
    /// history and no longer reported.
    fn note_success(&self, kind: OpKind) {
        let c = &self.inner.counters;
        if c.failing(kind).swap(false, Ordering::Relaxed)
            && !c.reads_failing.load(Ordering::Relaxed)
            && !c.writes_failing.load(Ordering::Relaxed)
        {
            *c.last_error.lock() = None;
        }
    }

    /// How a value saved with `options` in `format` is sealed: the store's defaults where
    /// the options say nothing.
    fn seal_options(&self, format: Format, options: &SaveOptions) -> SealOptions {
        SealOptions {
            format,
            compression: options
                .compression
                .unwrap_or(self.inner.default_compression),
            encrypt: options.encrypt.unwrap_or(self.inner.default_encrypt),
        }
    }

    /// Serializes `value` in `format` and seals it into a record for `key` as `options`
    /// say, writing the payload straight into the record's buffer.
    fn build_record(
        &self,
        key: &str,
        format: Format,
        options: &SaveOptions,
        now: Timestamp,
        serialize: impl FnOnce(&mut Vec<u8>) -> Result<()>,
    ) -> Result<Record> {
        let seal = self.seal_options(format, options);
        let mut buf = codec::envelope::payload_buffer(&seal, 0);
        serialize(&mut buf)?;
        let (value, info): (Vec<u8>, EnvelopeInfo) =
            codec::envelope::seal_vec(key, buf, &seal, self.inner.cipher.as_ref())?;
        let expires_at = match options.expiry {
            Expiry::StoreDefault => self.inner.default_ttl.map(|t| now.saturating_add(t)),
            Expiry::Never => None,
            Expiry::After(ttl) => Some(now.saturating_add(ttl)),
        };
        Ok(Record {
            meta: RecordMeta {
                created_at: now,
                modified_at: now,
                accessed_at: now,
                expires_at,
                size: value.len() as u64,
                compressed: info.compressed,
                encrypted: info.encrypted,
                custom: options.metadata.clone(),
                version: RecordVersion::fresh(),
            },
            value,
        })
    }

    fn put_op(key: &str, record: Record, options: &SaveOptions) -> WriteOp {
        WriteOp::Put {
            key: key.to_owned(),
            record,
            mode: match (options.if_version, options.overwrite) {
                (Some(version), _) => PutMode::IfVersion(version),
                (None, true) => PutMode::Upsert,
                (None, false) => PutMode::CreateOnly,
            },
        }
    }

    /// Saves `value` under `key`; returns the version the record now has (for a later save
    /// conditional on it, [`SaveOptions::if_version`]).
    ///
    /// Fails with `InvalidKey`, `AlreadyExists` (`overwrite(false)` and a live record exists,
    /// checked atomically), `VersionConflict` (`if_version` and the record changed, checked
    /// atomically), `QuotaExceeded`, `EncryptionNotConfigured`, `FeatureDisabled`
    /// (`Compression::Lz4` without the `compression` feature) or a backend error. On any error the previous value is untouched.
    pub fn save<T: Serialize + ?Sized>(
        &self,
        key: &str,
        value: &T,
        options: &SaveOptions,
    ) -> Result<RecordVersion> {
        self.instrument(OpKind::Write, || {
            key::validate_key(key)?;
            let format = options.format.unwrap_or(self.inner.format);
            let now = self.inner.clock.now();
            let record = self.build_record(key, format, options, now, |out| {
                codec::format::serialize_into(key, value, format, out)
            })?;
            self.put(key, record, options, now)
        })
    }

    /// Writes one record built by [`build_record`](Self::build_record); returns its version.
    fn put(
        &self,
        key: &str,
        record: Record,
        options: &SaveOptions,
        now: Timestamp,
    ) -> Result<RecordVersion> {
        let version = record.meta.version;
        self.write(vec![Self::put_op(key, record, options)], now)?;
        Ok(version)
    }

    /// Saves bytes the caller already encoded (snapshots, imports); read them back with
    /// [`load_bytes`](Self::load_bytes). Compression, encryption, TTL and metadata apply.
    /// Returns the record's new version, as [`save`](Self::save) does.
    pub fn save_bytes(
        &self,
        key: &str,
        bytes: &[u8],
        options: &SaveOptions,
    ) -> Result<RecordVersion> {
        self.instrument(OpKind::Write, || {
            key::validate_key(key)?;
            self.refuse_what_never_fits(bytes.len(), Format::Raw, options)?;
            let now = self.inner.clock.now();
            let record = self.build_record(key, Format::Raw, options, now, |out| {
                out.extend_from_slice(bytes);
                Ok(())
            })?;
            self.put(key, record, options, now)
        })
    }

    /// Loads the value under `key`; `Ok(None)` when it is missing or expired.
    ///
    /// Fails with `Corrupt`, `DecryptionFailed`, `EncryptionKeyMissing`, `Deserialize`
    /// (stored as another type) or a backend error; never returns garbage.
    pub fn load<T: DeserializeOwned>(&self, key: &str, options: &LoadOptions) -> Result<Option<T>> {
        self.instrument(OpKind::Read, || {
            let Some((payload, info)) = self.load_payload(key, options)? else {
                return Ok(None);
            };
            codec::format::deserialize(key, &payload, info.format).map(Some)
        })
    }

    /// Loads the value with its version: `Ok(None)` when it is missing or expired. Pass the
    /// version to [`SaveOptions::if_version`] to write the changed value back only if no one
    /// else wrote the record in between (read-modify-write across threads, processes and
    /// servers); the example there shows the loop. Errors as [`load`](Self::load). Reads the
    /// backend directly (the read cache does not keep versions).
    pub fn load_versioned<T: DeserializeOwned>(
        &self,
        key: &str,
        options: &LoadOptions,
    ) -> Result<Option<(T, RecordVersion)>> {
        let Some((payload, info, version)) = self.load_bytes_versioned(key, options)? else {
            return Ok(None);
        };
        let value = codec::format::deserialize(key, &payload, info.format)?;
        Ok(Some((value, version)))
    }

    /// [`load_bytes`](Self::load_bytes) with the record's version, as
    /// [`load_versioned`](Self::load_versioned) reads it.
    pub fn load_bytes_versioned(
        &self,
        key: &str,
        options: &LoadOptions,
    ) -> Result<Option<(Vec<u8>, EnvelopeInfo, RecordVersion)>> {
        self.instrument(OpKind::Read, || {
            key::validate_key(key)?;
            let now = self.inner.clock.now();
            let Some(record) = self.inner.backend.get(key)? else {
                return Ok(None);
            };
            if !record.meta.is_live(now) {
                return Ok(None);
            }
            let version = record.meta.version;
            let (payload, info) = self.open_value(key, record.value, now, options)?;
            Ok(Some((payload, info, version)))
        })
    }

    /// Loads the value, or returns `default` when it is missing or expired. Errors
    /// (corruption, a wrong key) are still errors: a default never hides damage.
    pub fn load_or<T: DeserializeOwned>(
        &self,
        key: &str,
        default: T,
        options: &LoadOptions,
    ) -> Result<T> {
        Ok(self.load(key, options)?.unwrap_or(default))
    }

    /// Loads the value, or `T::default()` when it is missing or expired.
    pub fn load_or_default<T: DeserializeOwned + Default>(
        &self,
        key: &str,
        options: &LoadOptions,
    ) -> Result<T> {
        Ok(self.load(key, options)?.unwrap_or_default())
    }

    /// Loads the decoded payload bytes and what the envelope says about them (format,
    /// compression, encryption), without deserializing: for tools and raw-byte records.
    pub fn load_bytes(
        &self,
        key: &str,
        options: &LoadOptions,
    ) -> Result<Option<(Vec<u8>, EnvelopeInfo)>> {
        self.instrument(OpKind::Read, || {
            Ok(self
                .load_payload(key, options)?
                .map(|(payload, info)| (payload.into_vec(), info)))
        })
    }

    /// The decoded payload of `key`, from the read cache when it holds it (shared with the
    /// cache, not copied).
    fn load_payload(
        &self,
        key: &str,
        options: &LoadOptions,
    ) -> Result<Option<(Payload, EnvelopeInfo)>> {
        key::validate_key(key)?;
        let now = self.inner.clock.now();
        let mut ticket = None;
        if let Some(cache) = &self.inner.cache {
            // The token before anything else: what this load reads is never older than it.
            let token = if cache.by_token() {
                self.inner.backend.change_token()
            } else {
                None
            };
            match cache.lookup(key, now, token) {
                Lookup::Hit(hit) => {
                    if self.inner.default_encrypt
                        && !options.accept_plaintext
                        && !hit.info.encrypted
                    {
                        return Err(StorageError::NotEncrypted {
                            key: key.to_owned(),
                        });
                    }
                    if options.update_access_time {
                        self.inner.backend.touch(key, now)?;
                    }
                    return Ok(Some((Payload::Shared(hit.payload), hit.info)));
                }
                Lookup::Miss(t) => ticket = t,
            }
        }
        let Some((value, expires_at)) = self.inner.backend.get_value(key)? else {
            return Ok(None);
        };
        if now.is_past(expires_at) {
            return Ok(None);
        }
        let (payload, info) = self.open_value(key, value, now, options)?;
        if let (Some(cache), Some(ticket)) = (&self.inner.cache, ticket) {
            let payload = Arc::new(payload);
            let entry = CachedRead {
                loaded_at: Instant::now(),
                expires_at,
                payload: payload.clone(),
                info,
            };
            cache.insert(key, ticket, entry);
            return Ok(Some((Payload::Shared(payload), info)));
        }
        Ok(Some((Payload::Owned(payload), info)))
    }

    /// Checks, decrypts and decompresses the stored bytes of a live record, and records the
    /// access if asked.
    fn open_value(
        &self,
        key: &str,
        value: Vec<u8>,
        now: Timestamp,
        options: &LoadOptions,
    ) -> Result<(Vec<u8>, EnvelopeInfo)> {
        if self.inner.default_encrypt && !options.accept_plaintext {
            // Integrity before anything else: a record this store's key did not seal is
            // refused before it is checked, decompressed or decoded.
            let info = codec::envelope::inspect(key, &value)?;
            if !info.encrypted {
                return Err(StorageError::NotEncrypted {
                    key: key.to_owned(),
                });
            }
        }
        let (payload, info) = codec::envelope::open_vec(key, value, self.inner.cipher.as_ref())?;
        if options.update_access_time {
            self.inner.backend.touch(key, now)?;
        }
        Ok((payload, info))
    }

    /// Deletes `key`; `true` if a live record was there.
    pub fn delete(&self, key: &str) -> Result<bool> {
        self.instrument(OpKind::Write, || {
            key::validate_key(key)?;
            let now = self.inner.clock.now();
            let outcomes = self.write(
                vec![WriteOp::Delete {
                    key: key.to_owned(),
                }],
                now,
            )?;
            Ok(outcomes.first().is_some_and(|o| o.previous_size.is_some()))
        })
    }

    /// True when a live record exists under `key`.
    pub fn exists(&self, key: &str) -> Result<bool> {
        self.instrument(OpKind::Read, || {
            key::validate_key(key)?;
            let now = self.inner.clock.now();
            Ok(self
                .inner
                .backend
                .get_meta(key)?
                .is_some_and(|m| m.is_live(now)))
        })
    }

    /// The live keys that start with `prefix`, byte for byte (no wildcards: `%`, `*`, `_`
    /// are ordinary characters), sorted. The empty prefix lists every key.
    pub fn list_keys(&self, prefix: &str) -> Result<Vec<String>> {
        self.instrument(OpKind::Read, || {
            key::validate_prefix(prefix)?;
            let now = self.inner.clock.now();
            let mut keys: Vec<String> = self
                .inner
                .backend
                .scan(prefix)?
                .into_iter()
                .filter(|e| !now.is_past(e.expires_at) && !key::is_internal(&e.key))
                .map(|e| e.key)
                .collect();
            keys.sort_unstable();
            Ok(keys)
        })
    }

    /// The metadata of the live record under `key`.
    pub fn get_metadata(&self, key: &str) -> Result<Option<StorageMetadata>> {
        self.instrument(OpKind::Read, || {
            key::validate_key(key)?;
            let now = self.inner.clock.now();
            Ok(self
                .inner
                .backend
                .get_meta(key)?
                .filter(|m| m.is_live(now))
                .map(|m| StorageMetadata::from_record(key, m)))
        })
    }

    /// Removes every record of this store. The store's own bookkeeping (its encryption key
    /// check) is kept, so the same key keeps working.
    pub fn clear(&self) -> Result<()> {
        self.instrument(OpKind::Write, || {
            let _gate = self.inner.quota.as_ref().map(|q| q.gate.write());
            let internal = self.inner.backend.get(KEYCHECK_KEY)?;
            if let Some(cache) = &self.inner.cache {
                cache.invalidate_all();
            }
            let cleared = self.inner.backend.clear();
            if let Some(cache) = &self.inner.cache {
                cache.invalidate_all();
            }
            cleared?;
            if let Some(record) = internal {
                let now = self.inner.clock.now();
                let op = WriteOp::Put {
                    key: KEYCHECK_KEY.to_owned(),
                    record,
                    mode: PutMode::Upsert,
                };
                self.inner.backend.write(vec![op], now)?;
            }
            if let Some(q) = &self.inner.quota {
                q.recounted(self.inner.backend.usage(self.inner.clock.now())?.total_size);
            }
            Ok(())
        })
    }

    /// Applies saves and deletes all or nothing, in order. If any part fails (a bad key, a
    /// serialization error, `overwrite(false)` on an existing key, the quota, the backend),
    /// nothing is changed.
    pub fn transaction(&self, operations: Vec<StorageOperation>) -> Result<()> {
        self.transaction_outcomes(operations).map(drop)
    }

    /// [`transaction`](Self::transaction), with what each operation did (see [`Committed`]);
    /// empty when there were no operations.
    pub(crate) fn transaction_outcomes(
        &self,
        operations: Vec<StorageOperation>,
    ) -> Result<Vec<Committed>> {
        self.instrument(OpKind::Write, || {
            let now = self.inner.clock.now();
            let mut ops = Vec::with_capacity(operations.len());
            let mut versions = Vec::with_capacity(operations.len());
            for op in operations {
                key::validate_key(op.key())?;
                ops.push(match op {
                    StorageOperation::Save {
                        key,
                        value,
                        options,
                    } => {
                        let format = options.format.unwrap_or(self.inner.format);
                        let record = self.build_record(&key, format, &options, now, |out| {
                            value.serialize_into(&key, format, out)
                        })?;
                        versions.push(Some(record.meta.version));
                        Self::put_op(&key, record, &options)
                    }
                    StorageOperation::Delete { key } => {
                        versions.push(None);
                        WriteOp::Delete { key }
                    }
                });
            }
            if ops.is_empty() {
                return Ok(Vec::new());
            }
            let outcomes = self.write(ops, now)?;
            Ok(outcomes
                .into_iter()
                .zip(versions)
                .map(|(outcome, version)| Committed {
                    removed: version.is_none() && outcome.previous_size.is_some(),
                    version,
                })
                .collect())
        })
    }

    /// Removes expired records; returns how many. The plugin's TTL cleanup calls this on
    /// its interval. Expired records are invisible before it runs.
    pub fn purge_expired(&self) -> Result<usize> {
        self.instrument(OpKind::Write, || {
            self.inner.backend.purge_expired(self.inner.clock.now())
        })
    }

    /// Sends a batch to the backend under the quota, and drops the cached reads it touches
    /// (before and after the write, so no reader keeps a value older than the write).
    fn write(&self, ops: Vec<WriteOp>, now: Timestamp) -> Result<Vec<WriteOutcome>> {
        let count = ops.len();
        let result = match &self.inner.cache {
            None => self.write_under_quota(ops, now),
            Some(cache) => {
                let keys: Vec<String> = ops.iter().map(|op| op.key().to_owned()).collect();
                let puts = ops.iter().any(|op| matches!(op, WriteOp::Put { .. }));
                let token = || {
                    cache
                        .by_token()
                        .then(|| self.inner.backend.change_token())
                        .flatten()
                };
                let before = token();
                cache.invalidate(keys.iter().map(String::as_str));
                let result = self.write_under_quota(ops, now);
                let after = token();
                // Whether this write made a commit of its own (a put, or a delete that
                // removed a live record), so that the token moved by exactly one if no one
                // else committed.
                let changed = result.as_ref().is_ok_and(|outcomes| {
                    puts || outcomes.iter().any(|o| o.previous_size.is_some())
                });
                cache.after_write(keys.iter().map(String::as_str), before, after, changed);
                result
            }
        };
        // Callers pair outcomes with operations: a (custom) backend that breaks the contract
        // gets an error here rather than requests left without an answer.
        match result {
            Ok(outcomes) if outcomes.len() != count => Err(StorageError::backend(
                self.inner.backend.backend_type(),
                format!(
                    "the backend answered a batch of {count} operation(s) with {} outcome(s); \
                     Backend::write must return one per operation (the batch may have been \
                     applied)",
                    outcomes.len()
                ),
            )),
            other => other,
        }
    }
}

/// A decoded payload: the load's own, or shared with the read cache.
enum Payload {
    Owned(Vec<u8>),
    Shared(Arc<Vec<u8>>),
}

impl Payload {
    fn into_vec(self) -> Vec<u8> {
        match self {
            Payload::Owned(v) => v,
            Payload::Shared(v) => Arc::unwrap_or_clone(v),
        }
    }
}

impl std::ops::Deref for Payload {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        match self {
            Payload::Owned(v) => v,
            Payload::Shared(v) => v,
        }
    }
}

/// What one operation of a committed transaction did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Committed {
    /// A delete removed a live record (every backend reports it for deletes).
    pub(crate) removed: bool,
    /// The version a save gave its record; `None` for a delete.
    pub(crate) version: Option<RecordVersion>,
}

/// Shorthands with default options, named after the inspector's `get` and `set` (and
/// bevy_pkv's): `store.set(key, &value)` is `store.save(key, &value, &SaveOptions::default())`,
/// `store.get::<T>(key)` is `store.load(key, &LoadOptions::default())`.
///
/// By reference or by value: calls that finish their work before they return ([`Store::save`],
/// [`Store::set`]) borrow the value; what carries a value to later work owns it
/// ([`StorageOperation::save`] until [`Store::transaction`] runs it, the plugin's
/// `SaveRequest` until the task pool does).
impl Store {
    /// [`save`](Self::save) with the store's default options (its default TTL, compression
    /// and encryption; overwriting allowed).
    ///
    /// ```
    /// # use bevy_storage::prelude::*;
    /// let store = Store::open(StorageConfig::memory())?;
    /// store.set("volume", &0.8f32)?;
    /// assert_eq!(store.get::<f32>("volume")?, Some(0.8));
    /// # Ok::<(), StorageError>(())
    /// ```
    pub fn set<T: Serialize + ?Sized>(&self, key: &str, value: &T) -> Result<()> {
        self.save(key, value, &SaveOptions::default()).map(drop)
    }

    /// [`load`](Self::load) with default options: `Ok(None)` when missing or expired,
    /// errors (corrupt, wrong type, wrong key) as errors.
    pub fn get<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>> {
        self.load(key, &LoadOptions::default())
    }

    /// Saves a payload already serialized in `format` (RON text, postcard bytes), as
    /// [`load_bytes`](Self::load_bytes) returns it: the counterpart for tools such as the
    /// inspector's `set`, which writes RON a game then loads as its own type. The payload is
    /// not checked against the format: a wrong one fails when it is loaded.
    pub fn save_encoded(
        &self,
        key: &str,
        payload: &[u8],
        format: Format,
        options: &SaveOptions,
    ) -> Result<RecordVersion> {
        self.instrument(OpKind::Write, || {
            key::validate_key(key)?;
            self.refuse_what_never_fits(payload.len(), format, options)?;
            let now = self.inner.clock.now();
            let record = self.build_record(key, format, options, now, |out| {
                out.extend_from_slice(payload);
                Ok(())
            })?;
            self.put(key, record, options, now)
        })
    }
}
