//! The quota: the bytes a store may hold, kept exact without recounting on every write.
//!
//! A write reserves its bytes under a shared gate and settles the reservation with the sizes
//! the backend reports it replaced; a write that may break the quota waits for the others
//! and recounts. A backend shared by several processes ([`Backend::enforces_quota`]) decides
//! the quota itself, in the write's own transaction.
//!
//! [`Backend::enforces_quota`]: crate::backend::Backend::enforces_quota

use std::collections::BTreeMap;

use parking_lot::{Mutex, RwLock};

use super::{SaveOptions, Store};
use crate::backend::{WriteOp, WriteOutcome};
use crate::clock::Timestamp;
use crate::codec::Format;
use crate::error::{Result, StorageError};

/// Quota bookkeeping: bytes in use plus reservations of writes in flight.
pub(super) struct Quota {
    pub(super) max: u64,
    pub(super) used: Mutex<u64>,
    /// Writers hold it shared; a write that may break the quota takes it exclusively to
    /// recount with nothing in flight.
    pub(super) gate: RwLock<()>,
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
        if self.inner.backend.enforces_quota() {
            // Shared by several processes: only the backend can count for all of them.
            return self.inner.backend.write_within_quota(ops, now, quota.max);
        }
        let adding: u64 = ops
            .iter()
            .map(|op| match op {
                WriteOp::Put { record, .. } => record.meta.size,
                WriteOp::Delete { .. } => 0,
            })
            .sum();
        {
            // Fast path: the reservation fits whatever the old sizes were.
            let _shared = quota.gate.read();
            let reserved = {
                let mut used = quota.used.lock();
                if *used + adding <= quota.max {
                    *used += adding;
                    true
                } else {
                    false
                }
            };
            if reserved {
                let result = self.inner.backend.write(ops, now);
                let mut used = quota.used.lock();
                match &result {
                    Ok(outcomes) => {
                        // Sizes the backend did not report stay counted: `used` is then an
                        // upper bound, and the slow path below recounts exactly.
                        let freed: u64 = outcomes.iter().filter_map(|o| o.previous_size).sum();
                        *used = used.saturating_sub(freed);
                    }
                    Err(_) => *used = used.saturating_sub(adding),
                }
                return result;
            }
        }
        // Slow path: nothing else in flight; recount and account for what gets replaced.
        let _exclusive = quota.gate.write();
        let used = self.inner.backend.usage(now)?.total_size;
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
            if let Some(meta) = self.inner.backend.get_meta(key)?
                && meta.is_live(now)
            {
                freed += meta.size;
            }
        }
        let after = used.saturating_sub(freed) + final_sizes.values().sum::<u64>();
        if after > quota.max {
            *quota.used.lock() = used;
            return Err(StorageError::QuotaExceeded {
                needed: after.saturating_sub(used),
                available: quota.max.saturating_sub(used),
                max_size: quota.max,
            });
        }
        let result = self.inner.backend.write(ops, now);
        *quota.used.lock() = if result.is_ok() { after } else { used };
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
