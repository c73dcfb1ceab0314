//! An in-memory backend: fast, not persistent. Good for tests, tools and temporary data.

use std::collections::BTreeMap;
use std::ops::Bound;

use parking_lot::RwLock;

use super::{Backend, KeyEntry, Record, RecordVersion, WriteOp, WriteOutcome};
use crate::clock::Timestamp;
use crate::error::Result;

/// Records in a sorted map behind a lock. Nothing survives the process.
#[derive(Debug, Default)]
pub struct MemoryBackend {
    records: RwLock<BTreeMap<String, Record>>,
}

impl MemoryBackend {
    /// An empty memory backend.
    pub fn new() -> Self {
        Self::default()
    }
}

/// Applies a batch to a sorted map with the [`Backend::write`] rules; on error the map is
/// unchanged. Public so that a custom backend that keeps its records in memory (and writes
/// them out as a whole) gets the batch rules right without rewriting them.
pub fn apply_batch(
    map: &mut BTreeMap<String, Record>,
    ops: Vec<WriteOp>,
    now: Timestamp,
) -> Result<Vec<WriteOutcome>> {
    // Check every create-only put against the state it will see, before changing anything.
    // key -> version of the live record after earlier ops (None: absent)
    let mut shadow: BTreeMap<&str, Option<RecordVersion>> = BTreeMap::new();
    for op in &ops {
        let key = op.key();
        let live = *shadow.entry(key).or_insert_with(|| {
            map.get(key)
                .filter(|r| r.meta.is_live(now))
                .map(|r| r.meta.version)
        });
        match op {
            WriteOp::Put { mode, record, .. } => {
                mode.check(key, live)?;
                shadow.insert(key, Some(record.meta.version));
            }
            WriteOp::Delete { .. } => {
                shadow.insert(key, None);
            }
        }
    }
    let mut outcomes = Vec::with_capacity(ops.len());
    for op in ops {
        match op {
            WriteOp::Put {
                key, mut record, ..
            } => {
                let previous = map.get(&key).filter(|r| r.meta.is_live(now));
                if let Some(prev) = previous {
                    record.meta.created_at = prev.meta.created_at;
                }
                let previous_size = previous.map(|r| r.meta.size);
                map.insert(key, record);
                outcomes.push(WriteOutcome { previous_size });
            }
            WriteOp::Delete { key } => {
                let previous_size = map
                    .remove(&key)
                    .filter(|r| r.meta.is_live(now))
                    .map(|r| r.meta.size);
                outcomes.push(WriteOutcome { previous_size });
            }
        }
    }
    Ok(outcomes)
}

/// The [`Backend::delete_if_unchanged`] rule on a sorted map: removes `key` if its record
/// still has exactly this value and expiry. Public for custom backends that keep their records
/// in memory, like [`apply_batch`].
pub fn remove_if_unchanged(
    map: &mut BTreeMap<String, Record>,
    key: &str,
    value: &[u8],
    expires_at: Option<Timestamp>,
) -> bool {
    let same = map
        .get(key)
        .is_some_and(|r| r.value == value && r.meta.expires_at == expires_at);
    if same {
        map.remove(key);
    }
    same
}

impl Backend for MemoryBackend {
    fn backend_type(&self) -> &str {
        "memory"
    }

    fn get(&self, key: &str) -> Result<Option<Record>> {
        Ok(self.records.read().get(key).cloned())
    }

    fn get_meta(&self, key: &str) -> Result<Option<super::RecordMeta>> {
        Ok(self.records.read().get(key).map(|r| r.meta.clone()))
    }

    fn write(&self, ops: Vec<WriteOp>, now: Timestamp) -> Result<Vec<WriteOutcome>> {
        apply_batch(&mut self.records.write(), ops, now)
    }

    fn delete_if_unchanged(
        &self,
        key: &str,
        value: &[u8],
        expires_at: Option<Timestamp>,
    ) -> Result<bool> {
        Ok(remove_if_unchanged(
            &mut self.records.write(),
            key,
            value,
            expires_at,
        ))
    }

    fn touch(&self, key: &str, at: Timestamp) -> Result<()> {
        if let Some(r) = self.records.write().get_mut(key) {
            r.meta.accessed_at = at;
        }
        Ok(())
    }

    fn scan(&self, prefix: &str) -> Result<Vec<KeyEntry>> {
        let records = self.records.read();
        Ok(records
            .range::<str, _>((Bound::Included(prefix), Bound::Unbounded))
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, r)| KeyEntry {
                key: k.clone(),
                size: r.meta.size,
                expires_at: r.meta.expires_at,
            })
            .collect())
    }

    fn scan_page(&self, prefix: &str, after: Option<&str>, limit: usize) -> Result<Vec<KeyEntry>> {
        let records = self.records.read();
        let start = match after {
            Some(after) if after >= prefix => Bound::Excluded(after),
            _ => Bound::Included(prefix),
        };
        Ok(records
            .range::<str, _>((start, Bound::Unbounded))
            .take_while(|(k, _)| k.starts_with(prefix))
            .take(limit)
            .map(|(k, r)| KeyEntry {
                key: k.clone(),
                size: r.meta.size,
                expires_at: r.meta.expires_at,
            })
            .collect())
    }

    fn purge_expired(&self, now: Timestamp) -> Result<usize> {
        let mut records = self.records.write();
        let before = records.len();
        records.retain(|_, r| r.meta.is_live(now));
        Ok(before - records.len())
    }

    fn clear(&self) -> Result<()> {
        self.records.write().clear();
        Ok(())
    }
}
