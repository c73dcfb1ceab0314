//! The quota: the bytes a store may hold, kept exact without recounting on every write.
//!
//! A write reserves its bytes under a shared gate and settles the reservation with the sizes
//! the backend reports it replaced; a write that may break the quota waits for the others
//! and recounts. A backend shared by several processes ([`Backend::enforces_quota`]) decides
//! the quota itself, in the write's own transaction.
//!
//! [`Backend::enforces_quota`]: crate::backend::Backend::enforces_quota

use std::collections::BTreeMap;

use std::sync::atomic::{AtomicBool, Ordering};

use parking_lot::{Mutex, RwLock};

use super::{SaveOptions, Store};
use crate::backend::{PutMode, WriteOp, WriteOutcome};
use crate::clock::Timestamp;
use crate::codec::Format;
use crate::error::{Result, StorageError};

/// Quota bookkeeping: bytes in use plus reservations of writes in flight.
pub(super) struct Quota {
    pub(super) max: u64,
    /// An upper bound of the live bytes stored (plus reservations in flight).
    pub(super) used: Mutex<u64>,
    /// Whether `used` is exact but for records that expired since they were counted: false
    /// once an upsert replaced a record of unknown size. Read and written under `used`'s lock.
    pub(super) exact: AtomicBool,
    /// Writers hold it shared; a write that may break the quota takes it exclusively to
    /// settle with nothing in flight.
    pub(super) gate: RwLock<()>,
}

impl Quota {
    pub(super) fn new(max: u64, used: u64) -> Self {
        Self {
            max,
            used: Mutex::new(used),
            exact: AtomicBool::new(true),
            gate: RwLock::new(()),
        }
    }

    /// Sets the count from a recount of the backend.
    pub(super) fn recounted(&self, used: u64) {
        let mut guard = self.used.lock();
        *guard = used;
        self.exact.store(true, Ordering::Relaxed);
    }

    /// Whether a write of `adding` bytes comes within an eighth of the quota, where every
    /// replaced size is looked up so that the count stays exact.
    fn near(&self, used: u64, adding: u64) -> bool {
        used + adding > self.max - self.max / 8
    }
}

/// Bytes the puts of `ops` add.
fn adding(ops: &[WriteOp]) -> u64 {
    ops.iter()
        .map(|op| match op {
            WriteOp::Put { record, .. } => record.meta.size,
            WriteOp::Delete { .. } => 0,
        })
        .sum()
}

impl Store {
    pub(super) fn write_under_quota(
        &self,
        ops: Vec<WriteOp>,
        now: Timestamp,
    ) -> Result<Vec<WriteOutcome>> {
        let Some(quota) = &self.inner.quota else {
            return self.inner.backend.write(ops, now);
        };
        let backend = &self.inner.backend;
        if backend.enforces_quota() {
            // Shared by several processes: only the backend can count for all of them.
            return backend.write_within_quota(ops, now, quota.max);
        }
        let adding = adding(&ops);
        // Puts that may replace a record without reporting its size: upserts, and puts
        // conditional on a version (one statement on SQLite, which reads nothing back).
        let upserts = ops
            .iter()
            .filter(|op| {
                matches!(
                    op,
                    WriteOp::Put {
                        mode: PutMode::Upsert | PutMode::IfVersion(_),
                        ..
                    }
                )
            })
            .count();
        {
            // Fast path: the reservation fits whatever the old sizes were.
            let _shared = quota.gate.read();
            let reserved = {
                let mut used = quota.used.lock();
                if *used + adding <= quota.max {
                    let near = quota.near(*used, adding);
                    *used += adding;
                    Some(near)
                } else {
                    None
                }
            };
            if let Some(near) = reserved {
                // Near the quota, every replaced size is looked up, so that `used` stays
                // exact and the slow path below never needs to recount.
                let looked = near && backend.reports_replaced_sizes();
                let result = if looked {
                    backend.write_reporting_sizes(ops, now)
                } else {
                    backend.write(ops, now)
                };
                let mut used = quota.used.lock();
                match &result {
                    Ok(outcomes) => {
                        // Sizes the backend did not report stay counted: `used` is then an
                        // upper bound, and the slow path below recounts exactly.
                        let freed: u64 = outcomes.iter().filter_map(|o| o.previous_size).sum();
                        *used = used.saturating_sub(freed);
                        // Deletes and create-only puts always report; upserts and
                        // conditional puts only when the backend looked.
                        if upserts > 0 && !looked {
                            quota.exact.store(false, Ordering::Relaxed);
                        }
                    }
                    Err(_) => *used = used.saturating_sub(adding),
                }
                return result;
            }
        }
        // Slow path: nothing else in flight. The count is recounted only when it is not
        // exact, or to confirm a refusal (records may have expired since they were counted).
        let _exclusive = quota.gate.write();
        let mut recounted = false;
        let mut used = *quota.used.lock();
        if !quota.exact.load(Ordering::Relaxed) {
            used = backend.usage(now)?.total_size;
            quota.recounted(used);
            recounted = true;
        }
        let mut final_sizes: BTreeMap<&str, u64> = BTreeMap::new();
        for op in &ops {
            let size = match op {
                WriteOp::Put { record, .. } => record.meta.size,
                WriteOp::Delete { .. } => 0,
            };
            final_sizes.insert(op.key(), size);
        }
        let mut freed = 0;
        for key in final_sizes.keys() {
            if let Some(meta) = backend.get_meta(key)?
                && meta.is_live(now)
            {
                freed += meta.size;
            }
        }
        let total: u64 = final_sizes.values().sum();
        let mut after = used.saturating_sub(freed) + total;
        if after > quota.max && !recounted {
            used = backend.usage(now)?.total_size;
            quota.recounted(used);
            after = used.saturating_sub(freed) + total;
        }
        if after > quota.max {
            return Err(StorageError::QuotaExceeded {
                needed: after.saturating_sub(used),
                available: quota.max.saturating_sub(used),
                max_size: quota.max,
            });
        }
        let result = backend.write(ops, now);
        quota.recounted(if result.is_ok() { after } else { used });
        result
    }

    /// A payload of `len` bytes whose record could not fit under the quota even in an empty
    /// store is refused before it is compressed, encrypted or sent: uncompressed, the record
    /// holds at least the payload; LZ4 cannot shrink anything below 1/256 of its size.
    pub(super) fn refuse_what_never_fits(
        &self,
        len: usize,
        format: Format,
        options: &SaveOptions,
    ) -> Result<()> {
        let Some(quota) = &self.inner.quota else {
            return Ok(());
        };
        let len = len as u64;
        let smallest = if self.seal_options(format, options).compression.is_on() {
            len / 256
        } else {
            len
        };
        if smallest > quota.max {
            let used = *quota.used.lock();
            return Err(StorageError::QuotaExceeded {
                needed: smallest,
                available: quota.max.saturating_sub(used),
                max_size: quota.max,
            });
        }
        Ok(())
    }
}

#[cfg(all(test, feature = "sqlite"))]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::AtomicUsize;

    use super::*;
    use crate::backend::sqlite::{SqliteBackend, SqliteOptions};
    use crate::backend::{Backend, KeyEntry, Record, RecordMeta, Usage};
    use crate::codec::Compression;
    use crate::config::StorageConfig;

    /// SQLite, counting the full recounts (`usage`) the store asks for.
    struct CountingUsage {
        inner: SqliteBackend,
        usage_calls: Arc<AtomicUsize>,
    }

    impl Backend for CountingUsage {
        fn backend_type(&self) -> &str {
            self.inner.backend_type()
        }
        fn get(&self, key: &str) -> Result<Option<Record>> {
            self.inner.get(key)
        }
        fn get_meta(&self, key: &str) -> Result<Option<RecordMeta>> {
            self.inner.get_meta(key)
        }
        fn write(&self, ops: Vec<WriteOp>, now: Timestamp) -> Result<Vec<WriteOutcome>> {
            self.inner.write(ops, now)
        }
        fn write_reporting_sizes(
            &self,
            ops: Vec<WriteOp>,
            now: Timestamp,
        ) -> Result<Vec<WriteOutcome>> {
            self.inner.write_reporting_sizes(ops, now)
        }
        fn reports_replaced_sizes(&self) -> bool {
            self.inner.reports_replaced_sizes()
        }
        fn delete_if_unchanged(
            &self,
            key: &str,
            value: &[u8],
            expires_at: Option<Timestamp>,
        ) -> Result<bool> {
            self.inner.delete_if_unchanged(key, value, expires_at)
        }
        fn touch(&self, key: &str, at: Timestamp) -> Result<()> {
            self.inner.touch(key, at)
        }
        fn scan(&self, prefix: &str) -> Result<Vec<KeyEntry>> {
            self.inner.scan(prefix)
        }
        fn purge_expired(&self, now: Timestamp) -> Result<usize> {
            self.inner.purge_expired(now)
        }
        fn clear(&self) -> Result<()> {
            self.inner.clear()
        }
        fn usage(&self, now: Timestamp) -> Result<Usage> {
            self.usage_calls.fetch_add(1, Ordering::SeqCst);
            self.inner.usage(now)
        }
    }

    #[test]
    fn near_the_quota_overwrites_stay_exact_without_recounting() {
        let dir = tempfile::tempdir().unwrap();
        let usage_calls = Arc::new(AtomicUsize::new(0));
        let backend = CountingUsage {
            inner: SqliteBackend::open(dir.path().join("q.db"), &SqliteOptions::default()).unwrap(),
            usage_calls: usage_calls.clone(),
        };
        let max = 100_000;
        let config = StorageConfig::memory()
            .compression(Compression::Off)
            .max_size(Some(max));
        let store = Store::with_backend(Arc::new(backend), config).unwrap();
        assert_eq!(
            usage_calls.load(Ordering::SeqCst),
            1,
            "counted once at open"
        );
        let value = vec![7u8; 1000];
        let opts = SaveOptions::default();
        let used = || *store.inner.quota.as_ref().unwrap().used.lock();
        let real = || {
            store
                .inner
                .backend
                .usage(store.inner.clock.now())
                .unwrap()
                .total_size
        };
        // Fill to about 95%.
        let mut keys = 0;
        while used() < max * 95 / 100 {
            store
                .save_bytes(&format!("k{keys}"), &value, &opts)
                .unwrap();
            keys += 1;
        }
        let before = used();
        // Far more overwrites than the headroom holds: a count that only grew would have
        // reached the quota many times over.
        for i in 0..500 {
            store
                .save_bytes(&format!("k{}", i % keys), &value, &opts)
                .unwrap();
        }
        assert_eq!(
            usage_calls.load(Ordering::SeqCst),
            1,
            "the writes recounted"
        );
        assert_eq!(used(), before);
        assert_eq!(real(), before);
        // A write that does not fit is refused (after one recount to confirm it) and keeps
        // the old value; one that fits once a delete made room is accepted.
        let record = before / keys;
        let big = vec![1u8; (max - before + record + record / 2) as usize];
        assert!(matches!(
            store.save_bytes("k0", &big, &opts),
            Err(StorageError::QuotaExceeded { .. })
        ));
        assert_eq!(
            store
                .load_bytes("k0", &Default::default())
                .unwrap()
                .unwrap()
                .0,
            value
        );
        store.delete("k1").unwrap();
        store.save_bytes("k0", &big, &opts).unwrap();
        assert_eq!(used(), real());
        assert!(used() <= max);
    }
}
