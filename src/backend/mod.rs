//! Where records live: the [`Backend`] trait and the built-in backends.
//!
//! A backend stores opaque record bytes (already serialized, compressed and encrypted by the
//! [`codec`](crate::codec)) together with their [`RecordMeta`]. It never sees user values and
//! never knows about Bevy. The [`Store`](crate::Store) above it checks keys, hides expired
//! records, enforces the quota and counts statistics, once for every backend.
//!
//! A game can bring its own backend with one `impl Backend` and
//! [`StorageConfig::custom`](crate::StorageConfig::custom). What an implementation must
//! guarantee is written on each method; the crate's conformance suite (`tests/conformance.rs`)
//! shows how to check it.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::clock::Timestamp;
use crate::error::Result;

pub mod file;
pub mod memory;
#[cfg(feature = "postgres")]
pub mod postgres;
#[cfg(feature = "redis")]
pub mod redis;
#[cfg(feature = "sqlite")]
pub mod sqlite;

pub use file::FileBackend;
pub use memory::MemoryBackend;
#[cfg(feature = "postgres")]
pub use postgres::{PostgresBackend, PostgresOptions};
#[cfg(feature = "redis")]
pub use redis::{RedisBackend, RedisOptions};
#[cfg(feature = "sqlite")]
pub use sqlite::SqliteBackend;

/// Connections to a server backend (Redis, PostgreSQL): the pool and the time bounds. Every
/// operation fails within `connect_timeout + response_timeout` when the server is gone or
/// hangs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerOptions {
    /// Most connections open at once (at least 1). Default 10.
    pub pool_size: u32,
    /// How long opening a connection, or waiting for a free one, may take. Default 1 s.
    pub connect_timeout: std::time::Duration,
    /// How long a command, statement or transaction may wait for the server's answer.
    /// Default 2 s.
    pub response_timeout: std::time::Duration,
}

impl Default for ServerOptions {
    fn default() -> Self {
        Self {
            pool_size: 10,
            connect_timeout: std::time::Duration::from_secs(1),
            response_timeout: std::time::Duration::from_secs(2),
        }
    }
}

/// The game's own fields stored beside a record, readable without decoding the value
/// (for example a save slot's level name or play time). Not encrypted.
pub type CustomMetadata = BTreeMap<String, serde_json::Value>;

/// The version of a stored record: it changes on every write of the record, so a write
/// conditional on it ([`SaveOptions::if_version`](crate::SaveOptions::if_version), optimistic
/// concurrency) fails when anyone else wrote the record since it was read.
///
/// The store draws a fresh version for every put (a bijective mix of a per-process random
/// seed and a counter, never 0), so a record deleted and written again, or written again
/// with the same bytes, gets a new version: no ABA. Records written before versions existed
/// read as version 0. Compare versions for equality only; their order means nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(transparent)]
pub struct RecordVersion(pub u64);

impl RecordVersion {
    /// A version no other write of this process has used, and another process only with a
    /// chance of about 2^-64 per pair of writes. Never 0.
    pub fn fresh() -> Self {
        use std::sync::LazyLock;
        use std::sync::atomic::{AtomicU64, Ordering};
        static SEED: LazyLock<u64> = LazyLock::new(|| {
            getrandom::u64().unwrap_or_else(|_| {
                // No OS randomness: the time and the process id still differ between
                // processes.
                let t = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_nanos() as u64);
                t ^ (u64::from(std::process::id()) << 32)
            })
        });
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        loop {
            // splitmix64's finalizer: a bijection, so distinct counters give distinct versions.
            let mut z = SEED.wrapping_add(
                COUNTER
                    .fetch_add(1, Ordering::Relaxed)
                    .wrapping_mul(0x9E37_79B9_7F4A_7C15),
            );
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            if z != 0 {
                return Self(z);
            }
        }
    }
}

impl std::fmt::Display for RecordVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

/// Everything a backend keeps about a record besides its bytes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RecordMeta {
    /// When the key was first written. Kept across overwrites of a live record.
    pub created_at: Timestamp,
    /// When the record was last written.
    pub modified_at: Timestamp,
    /// When the record was last read with access-time update on (else its write time).
    pub accessed_at: Timestamp,
    /// When the record expires; `None` lives forever.
    pub expires_at: Option<Timestamp>,
    /// Length of the stored value bytes.
    pub size: u64,
    /// The value bytes are LZ4-compressed.
    pub compressed: bool,
    /// The value bytes are AES-256-GCM encrypted.
    pub encrypted: bool,
    /// The game's own metadata.
    pub custom: CustomMetadata,
    /// The version this write gave the record (see [`RecordVersion`]); a backend stores it
    /// as given and returns it unchanged. 0 for records written before versions existed.
    #[serde(default)]
    pub version: RecordVersion,
}

impl RecordMeta {
    /// True when the record is still visible at `now`.
    pub fn is_live(&self, now: Timestamp) -> bool {
        !now.is_past(self.expires_at)
    }
}

/// One stored record: the encoded value and its metadata.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    /// The encoded value, as produced by the codec.
    pub value: Vec<u8>,
    /// Its metadata; `meta.size == value.len()`.
    pub meta: RecordMeta,
}

/// How a put treats an existing record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PutMode {
    /// Replace whatever is there.
    Upsert,
    /// Fail the whole batch with [`StorageError::AlreadyExists`](crate::StorageError::AlreadyExists)
    /// if a *live* record exists (an expired one counts as absent). Checked atomically with the write.
    CreateOnly,
    /// Replace only a live record whose version is this one; otherwise fail the whole batch
    /// with [`StorageError::VersionConflict`](crate::StorageError::VersionConflict) carrying
    /// the version found (none when the key is missing or expired). Checked atomically with
    /// the write.
    IfVersion(RecordVersion),
}

impl PutMode {
    /// Checks a put in this mode against the version of the live record it would replace
    /// (`None`: the key is missing or its record expired): the rule every backend applies,
    /// for backends that read the record before they write it.
    pub fn check(self, key: &str, live: Option<RecordVersion>) -> Result<()> {
        match (self, live) {
            (PutMode::CreateOnly, Some(_)) => Err(crate::StorageError::AlreadyExists {
                key: key.to_owned(),
            }),
            (PutMode::IfVersion(expected), found) if found != Some(expected) => {
                Err(crate::StorageError::VersionConflict {
                    key: key.to_owned(),
                    expected,
                    found,
                })
            }
            _ => Ok(()),
        }
    }
}

/// One change in an atomic batch.
#[derive(Debug, Clone, PartialEq)]
pub enum WriteOp {
    /// Store a record.
    Put {
        /// The key.
        key: String,
        /// The record.
        record: Record,
        /// Upsert or create-only.
        mode: PutMode,
    },
    /// Remove a record if present.
    Delete {
        /// The key.
        key: String,
    },
}

impl WriteOp {
    /// The key this operation touches.
    pub fn key(&self) -> &str {
        match self {
            WriteOp::Put { key, .. } | WriteOp::Delete { key } => key,
        }
    }
}

/// What a [`WriteOp`] found before it ran.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct WriteOutcome {
    /// Size of the live record that was replaced or deleted; `None` if there was none
    /// (or it had expired). For a [`PutMode::Upsert`] or [`PutMode::IfVersion`] put a backend
    /// may leave it `None` when finding the old size would cost a lookup per save (the SQLite
    /// backend does): the store then counts its quota conservatively and recounts exactly when
    /// a write nears the limit. Deletes and create-only puts always report it.
    pub previous_size: Option<u64>,
}

/// A key with what listing and statistics need to know about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyEntry {
    /// The key.
    pub key: String,
    /// Stored size in bytes.
    pub size: u64,
    /// Expiry, if any.
    pub expires_at: Option<Timestamp>,
}

/// Count and size of the live records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Usage {
    /// Number of live records.
    pub item_count: u64,
    /// Sum of their stored sizes.
    pub total_size: u64,
}

/// A fingerprint of everything committed to a backend, cheap enough to read before every
/// load: see [`Backend::change_token`].
///
/// Two tokens are equal only if nothing was committed between the two reads; `commits`
/// counts commits (wrapping), so a store that sees it advance by exactly one across its own
/// write knows that no one else committed in between.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ChangeToken {
    commits: u32,
    state: u128,
}

impl ChangeToken {
    /// A token from a commit counter (advanced by at least one by every commit that changes
    /// anything, wrapping) and whatever else identifies the committed state.
    pub const fn new(commits: u32, state: u128) -> Self {
        Self { commits, state }
    }

    /// The commit counter.
    pub const fn commits(self) -> u32 {
        self.commits
    }
}

/// A place to keep records. See the [module docs](self).
///
/// All methods take `&self` and may be called from many threads at once. Keys arrive already
/// validated (non-empty, bounded, no control characters, except for the store's own
/// bookkeeping keys which start with `\u{1}`); a backend must store any such key faithfully.
pub trait Backend: Send + Sync + 'static {
    /// A short name for logs and statistics (`"memory"`, `"sqlite"`, ...).
    fn backend_type(&self) -> &str;

    /// The record stored under `key`, expired or not (the store filters expiry).
    fn get(&self, key: &str) -> Result<Option<Record>>;

    /// The stored bytes of `key` and their expiry, expired or not: what a load needs.
    /// Override when it is cheaper than [`get`](Self::get).
    fn get_value(&self, key: &str) -> Result<Option<(Vec<u8>, Option<Timestamp>)>> {
        Ok(self.get(key)?.map(|r| (r.value, r.meta.expires_at)))
    }

    /// The metadata of `key`, expired or not. Override when it is cheaper than [`get`](Self::get).
    fn get_meta(&self, key: &str) -> Result<Option<RecordMeta>> {
        Ok(self.get(key)?.map(|r| r.meta))
    }

    /// Applies every operation or none (atomically, and durably once it returns `Ok`).
    ///
    /// - Operations apply in order; a later one sees the effect of an earlier one on the same key.
    /// - A `Put` over a live record keeps that record's `created_at` (the store sets
    ///   `created_at == modified_at` on every put it sends).
    /// - A `Put` with [`PutMode::CreateOnly`] over a live record fails the whole batch with
    ///   `StorageError::AlreadyExists`, leaving everything as it was.
    /// - A `Put` with [`PutMode::IfVersion`] fails the whole batch with
    ///   `StorageError::VersionConflict` unless a live record with that version is there
    ///   ([`PutMode::check`] states the rule).
    /// - Each put's [`RecordMeta::version`] is stored as given and read back unchanged.
    /// - Liveness is judged at `now`: a record with `expires_at <= now` counts as absent.
    ///
    /// Returns one outcome per operation, in order.
    fn write(&self, ops: Vec<WriteOp>, now: Timestamp) -> Result<Vec<WriteOutcome>>;

    /// [`write`](Self::write), with [`WriteOutcome::previous_size`] reported for every put,
    /// upserts included, when [`reports_replaced_sizes`](Self::reports_replaced_sizes) is true.
    /// The store calls it for writes near its quota (within an eighth of it), so that the
    /// quota stays exact there without recounting every record. Default: `write`.
    fn write_reporting_sizes(
        &self,
        ops: Vec<WriteOp>,
        now: Timestamp,
    ) -> Result<Vec<WriteOutcome>> {
        self.write(ops, now)
    }

    /// Whether [`write_reporting_sizes`](Self::write_reporting_sizes) reports the size of
    /// every replaced live record, so that a `None` means there was none. Default `false`:
    /// the store then counts an upsert's replaced record as still there and recounts when the
    /// quota is reached.
    fn reports_replaced_sizes(&self) -> bool {
        false
    }

    /// Removes `key` only if it still holds the record a read just returned: the same value
    /// bytes and the same `expires_at`, checked and removed atomically (no other change to
    /// `key` may come between the check and the removal, from this process or another one
    /// sharing the backend). Returns `true` when it removed the record, `false` when `key` is
    /// missing or holds anything else. Durable once it returns `Ok(true)`, like a
    /// [`write`](Self::write).
    ///
    /// This is how [`Store::take`](crate::Store::take) loads and deletes atomically: it reads
    /// the record, decrypts and decodes it, and only then removes it with this method,
    /// retrying from the read if another writer changed the key in between. So a record that
    /// fails to decode (a wrong type, a wrong encryption key) is never removed, and of several
    /// callers taking the same key exactly one gets it.
    ///
    /// It is a required method, not a default built on [`get`](Self::get) and
    /// [`write`](Self::write), because those two cannot make it atomic: only the backend knows
    /// how to compare and remove in one step (under its lock, in one SQL statement, in one
    /// Lua script). A backend that keeps its records in a map can use
    /// [`memory::remove_if_unchanged`].
    fn delete_if_unchanged(
        &self,
        key: &str,
        value: &[u8],
        expires_at: Option<Timestamp>,
    ) -> Result<bool>;

    /// Sets the last-access time of `key` if it exists. Need not be durable.
    fn touch(&self, key: &str, at: Timestamp) -> Result<()>;

    /// Every key that starts with `prefix` byte for byte (no wildcards), expired or not, in any
    /// order.
    fn scan(&self, prefix: &str) -> Result<Vec<KeyEntry>>;

    /// Up to `limit` entries whose keys start with `prefix` and sort strictly after `after`
    /// (when given), in byte order of the keys, expired or not: one page of a listing that
    /// continues from its last key, so a page never repeats or skips a key that exists for
    /// the whole listing, whatever is written meanwhile. The default sorts a full
    /// [`scan`](Self::scan); override it where the backend can seek to `after` (the memory,
    /// SQLite and PostgreSQL backends do).
    fn scan_page(&self, prefix: &str, after: Option<&str>, limit: usize) -> Result<Vec<KeyEntry>> {
        let mut entries = self.scan(prefix)?;
        if let Some(after) = after {
            entries.retain(|e| e.key.as_str() > after);
        }
        if entries.len() > limit && limit > 0 {
            entries.select_nth_unstable_by(limit - 1, |a, b| a.key.cmp(&b.key));
        }
        entries.truncate(limit);
        entries.sort_unstable_by(|a, b| a.key.cmp(&b.key));
        Ok(entries)
    }

    /// Removes every record with `expires_at <= now`; returns how many were removed.
    fn purge_expired(&self, now: Timestamp) -> Result<usize>;

    /// Removes every record.
    fn clear(&self) -> Result<()>;

    /// Count and total size of the records live at `now`. Override when the backend can
    /// compute it without listing every key.
    fn usage(&self, now: Timestamp) -> Result<Usage> {
        let mut usage = Usage::default();
        for entry in self.scan("")? {
            if !now.is_past(entry.expires_at) {
                usage.item_count += 1;
                usage.total_size += entry.size;
            }
        }
        Ok(usage)
    }

    /// Whether this backend enforces a store's quota itself, atomically with each write and
    /// for every process that shares the store (a database several game servers use). When
    /// true, a store with a quota sends its writes through
    /// [`write_within_quota`](Self::write_within_quota) instead of keeping its own count, so
    /// the quota holds across servers. Default `false`: the store counts in its own process.
    fn enforces_quota(&self) -> bool {
        false
    }

    /// Like [`write`](Self::write), but when the batch holds a put and the records live at
    /// `now` would total more than `max_size` bytes after it, fails with
    /// [`StorageError::QuotaExceeded`](crate::StorageError::QuotaExceeded) and changes
    /// nothing, decided atomically with the write. Only called when
    /// [`enforces_quota`](Self::enforces_quota) is true.
    fn write_within_quota(
        &self,
        ops: Vec<WriteOp>,
        now: Timestamp,
        max_size: u64,
    ) -> Result<Vec<WriteOutcome>> {
        let _ = max_size;
        self.write(ops, now)
    }

    /// Free space of the medium (disk, server memory), if known.
    fn available_space(&self) -> Option<u64> {
        None
    }

    /// Why the backend only reads (`None` when it writes): opened read-only, or fallen back
    /// to reading because its medium refused writes. Reported in
    /// [`StorageStats::read_only`](crate::StorageStats::read_only); its writes fail with
    /// [`StorageError::ReadOnly`](crate::StorageError::ReadOnly).
    fn read_only(&self) -> Option<String> {
        None
    }

    /// The damage the backend found in its own files (`None` when it found none), after which
    /// it refuses writes: the store then reports itself unhealthy with this as its last error,
    /// and opens even though its usage cannot be counted.
    fn damage(&self) -> Option<String> {
        None
    }

    /// Checks that the backend can be reached; an error marks the store unhealthy.
    fn health_check(&self) -> Result<()> {
        Ok(())
    }

    /// A token that changes whenever anything is committed to the backend, by this process or
    /// any other, read without I/O or locks (a few atomic loads): it lets the store keep
    /// recent loads in memory and trust them exactly as long as the token stays the same
    /// ([`StorageConfig::read_cache_validated`](field@crate::StorageConfig::read_cache_validated)).
    ///
    /// An implementation must guarantee:
    /// - equal tokens read at two moments mean nothing was committed in between (any change
    ///   to any record, by any writer, changes the token before a read can see the change);
    /// - every commit that changes a record advances [`ChangeToken::commits`] by exactly one
    ///   (wrapping), so that a store whose own write moved it by one knows no one else wrote;
    /// - `None` when it cannot tell right now (then nothing cached is trusted).
    ///
    /// Default `None`: the store then keeps only the time-bounded cache of
    /// [`StorageConfig::read_cache`](crate::StorageConfig::read_cache), if configured. The
    /// SQLite backend reads SQLite's wal-index header from shared memory
    /// (`backend/sqlite/token.rs`).
    fn change_token(&self) -> Option<ChangeToken> {
        None
    }
}
