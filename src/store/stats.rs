//! A store's statistics ([`StorageStats`]) and the counters behind them.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use crate::key::INTERNAL_KEYS;

/// Timings and counts of the operations a store ran.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PerformanceStats {
    /// Reads (load, exists, get_metadata, list_keys).
    pub reads: u64,
    /// Writes (save, delete, transaction, clear, purge).
    pub writes: u64,
    /// `reads + writes`.
    pub operation_count: u64,
    /// Operations that returned an error.
    pub errors: u64,
    /// Mean time of a read.
    pub avg_read_time: Duration,
    /// Mean time of a write.
    pub avg_write_time: Duration,
}

/// Read-cache effectiveness (all zero when the cache is off).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheStats {
    /// Loads served from memory.
    pub hits: u64,
    /// Loads that went to the backend.
    pub misses: u64,
    /// Entries held now.
    pub entries: u64,
}

/// A store's size, health and performance, from [`Store::get_stats`](super::Store::get_stats).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "bevy", derive(bevy::prelude::Resource))]
pub struct StorageStats {
    /// Live (unexpired) records.
    pub item_count: u64,
    /// Their total stored size in bytes.
    pub total_size: u64,
    /// Bytes that can still be written: the smaller of what the quota and the medium allow
    /// (`None` when neither is known).
    pub available_space: Option<u64>,
    /// The quota, if any.
    pub max_size: Option<u64>,
    /// `"memory"`, `"file"`, `"sqlite"`, or the custom backend's name.
    pub backend_type: String,
    /// False while the backend is failing: when the last read or the last write failed in the
    /// backend (an outage, an I/O error, a full disk). Reads and writes are judged apart, so
    /// reads that still succeed while writes fail (a full disk) do not make it true again;
    /// the next successful operation of the failing kind does. Also false while the backend
    /// reports damage in its files (a damaged SQLite database: it then refuses writes).
    pub is_healthy: bool,
    /// The backend failure that makes the store unhealthy now: the most recent one while
    /// `is_healthy` is false, `None` once an operation of every failing kind succeeded again
    /// (a stale error is never shown after recovery).
    pub last_error: Option<String>,
    /// When [`last_error`](Self::last_error) happened, by the store's clock.
    pub last_error_at: Option<SystemTime>,
    /// Why the store only reads, when it does: opened with
    /// [`StorageConfig::read_only`](crate::StorageConfig::read_only), or fallen back to
    /// reading because its medium refused writes (a read-only mount, no write permission).
    /// Writes then fail with [`StorageError::ReadOnly`](crate::StorageError::ReadOnly).
    /// `None` for a store that writes.
    #[serde(default)]
    pub read_only: Option<String>,
    /// Operation counts and mean timings.
    pub performance: PerformanceStats,
    /// Read-cache hits and misses.
    pub cache: CacheStats,
}

#[derive(Default)]
pub(super) struct Counters {
    pub(super) reads: AtomicU64,
    pub(super) read_nanos: AtomicU64,
    pub(super) writes: AtomicU64,
    pub(super) write_nanos: AtomicU64,
    pub(super) errors: AtomicU64,
    /// The last read failed in the backend.
    pub(super) reads_failing: AtomicBool,
    /// The last write failed in the backend.
    pub(super) writes_failing: AtomicBool,
    /// The failure behind the failing flags, and when it happened.
    pub(super) last_error: Mutex<Option<(String, SystemTime)>>,
    /// When the store first saw its backend report damage (see [`Backend::damage`]).
    pub(super) damage_seen_at: Mutex<Option<SystemTime>>,
}

impl Counters {
    /// The failure flag of one kind of operation.
    pub(super) fn failing(&self, kind: OpKind) -> &AtomicBool {
        match kind {
            OpKind::Read => &self.reads_failing,
            OpKind::Write => &self.writes_failing,
        }
    }
}

#[derive(Clone, Copy)]
pub(super) enum OpKind {
    Read,
    Write,
}

impl super::Store {
    /// Size, health and performance. Counts live records through the backend (one query for
    /// SQLite, a scan for files), so call it off the main thread in a game.
    pub fn get_stats(&self) -> StorageStats {
        let now = self.inner.clock.now();
        let backend = &self.inner.backend;
        let usage = backend
            .usage(now)
            .and_then(|u| {
                // The store's own records, by point reads: never a scan of the backend.
                let mut internal = (0u64, 0u64);
                for key in INTERNAL_KEYS {
                    if let Some(meta) = backend.get_meta(key)? {
                        internal.0 += 1;
                        internal.1 += meta.size;
                    }
                }
                Ok((
                    u.item_count.saturating_sub(internal.0),
                    u.total_size.saturating_sub(internal.1),
                ))
            })
            .and_then(|u| backend.health_check().map(|()| u));
        let c = &self.inner.counters;
        let (item_count, total_size) = match usage {
            Ok(u) => {
                self.note_success(OpKind::Read);
                u
            }
            Err(e) => {
                self.note_error(OpKind::Read, &e);
                (0, 0)
            }
        };
        let max_size = self.inner.quota.as_ref().map(|q| q.max);
        let quota_free = max_size.map(|m| m.saturating_sub(total_size));
        let available_space = match (quota_free, backend.available_space()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let reads = c.reads.load(Ordering::Relaxed);
        let writes = c.writes.load(Ordering::Relaxed);
        let avg = |nanos: &AtomicU64, n: u64| {
            Duration::from_nanos(nanos.load(Ordering::Relaxed).checked_div(n).unwrap_or(0))
        };
        // One lock: a guard in a field of the literal below would live to its end.
        let (mut last_error, mut last_error_at) = match &*c.last_error.lock() {
            Some((error, at)) => (Some(error.clone()), Some(*at)),
            None => (None, None),
        };
        let damage = backend.damage();
        if let Some(damage) = &damage
            && last_error.is_none()
        {
            last_error = Some(damage.clone());
            last_error_at = Some(self.note_damage());
        }
        StorageStats {
            item_count,
            total_size,
            available_space,
            max_size,
            backend_type: backend.backend_type().to_owned(),
            is_healthy: !c.reads_failing.load(Ordering::Relaxed)
                && !c.writes_failing.load(Ordering::Relaxed)
                && damage.is_none(),
            read_only: backend.read_only(),
            last_error,
            last_error_at,
            cache: self
                .inner
                .cache
                .as_ref()
                .map(|cache| CacheStats {
                    hits: cache.hits.load(Ordering::Relaxed),
                    misses: cache.misses.load(Ordering::Relaxed),
                    entries: cache.len() as u64,
                })
                .unwrap_or_default(),
            performance: PerformanceStats {
                reads,
                writes,
                operation_count: reads + writes,
                errors: c.errors.load(Ordering::Relaxed),
                avg_read_time: avg(&c.read_nanos, reads),
                avg_write_time: avg(&c.write_nanos, writes),
            },
        }
    }
}
