//! The read cache: decoded payloads of recent loads, kept for a while.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::clock::Timestamp;
use crate::codec::EnvelopeInfo;

/// Decoded payloads of recent loads, kept for `ttl`; see [`StorageConfig::read_cache`](crate::StorageConfig::read_cache).
pub(super) struct ReadCache {
    pub(super) ttl: Duration,
    pub(super) capacity: usize,
    pub(super) entries: Mutex<HashMap<String, CachedRead>>,
    /// Bumped by every invalidation; a load only fills the cache if it did not move while
    /// the load read the backend, so a racing write can never leave a stale entry.
    pub(super) epoch: AtomicU64,
    pub(super) hits: AtomicU64,
    pub(super) misses: AtomicU64,
}

#[derive(Clone)]
pub(super) struct CachedRead {
    pub(super) loaded_at: Instant,
    pub(super) expires_at: Option<Timestamp>,
    pub(super) payload: Arc<Vec<u8>>,
    pub(super) info: EnvelopeInfo,
}

impl ReadCache {
    pub(super) fn get(&self, key: &str, now: Timestamp) -> Option<CachedRead> {
        let mut entries = self.entries.lock();
        match entries.get(key) {
            Some(e) if e.loaded_at.elapsed() < self.ttl && !now.is_past(e.expires_at) => {
                self.hits.fetch_add(1, Ordering::Relaxed);
                Some(e.clone())
            }
            Some(_) => {
                entries.remove(key);
                self.misses.fetch_add(1, Ordering::Relaxed);
                None
            }
            None => {
                self.misses.fetch_add(1, Ordering::Relaxed);
                None
            }
        }
    }

    pub(super) fn insert(&self, key: &str, epoch: u64, entry: CachedRead) {
        let mut entries = self.entries.lock();
        if self.epoch.load(Ordering::SeqCst) != epoch {
            return;
        }
        if entries.len() >= self.capacity && !entries.contains_key(key) {
            let ttl = self.ttl;
            entries.retain(|_, e| e.loaded_at.elapsed() < ttl);
            if entries.len() >= self.capacity {
                // Still full of fresh entries: drop the oldest.
                if let Some(oldest) = entries
                    .iter()
                    .min_by_key(|(_, e)| e.loaded_at)
                    .map(|(k, _)| k.clone())
                {
                    entries.remove(&oldest);
                }
            }
        }
        entries.insert(key.to_owned(), entry);
    }

    pub(super) fn invalidate<'a>(&self, keys: impl IntoIterator<Item = &'a str>) {
        let mut entries = self.entries.lock();
        self.epoch.fetch_add(1, Ordering::SeqCst);
        for key in keys {
            entries.remove(key);
        }
    }

    pub(super) fn invalidate_all(&self) {
        let mut entries = self.entries.lock();
        self.epoch.fetch_add(1, Ordering::SeqCst);
        entries.clear();
    }
}
