//! Helpers shared by the unit tests of the SQLite backend.

use std::collections::BTreeSet;
use std::path::PathBuf;

use tempfile::TempDir;

use super::{SqliteBackend, SqliteOptions};
use crate::backend::{Backend, CustomMetadata, KeyEntry, PutMode, Record, RecordMeta, WriteOp};
use crate::clock::Timestamp;

pub(super) const T0: Timestamp = Timestamp(1_700_000_000_000);

pub(super) fn at(offset_ms: i64) -> Timestamp {
    Timestamp(T0.0 + offset_ms)
}

pub(super) fn db(dir: &TempDir) -> PathBuf {
    dir.path().join("storage.db")
}

pub(super) fn open(dir: &TempDir) -> SqliteBackend {
    SqliteBackend::open(db(dir), &SqliteOptions::default()).expect("open")
}

pub(super) fn record(value: &[u8], now: Timestamp, expires_at: Option<Timestamp>) -> Record {
    Record {
        value: value.to_vec(),
        meta: RecordMeta {
            created_at: now,
            modified_at: now,
            accessed_at: now,
            expires_at,
            size: value.len() as u64,
            compressed: false,
            encrypted: false,
            custom: CustomMetadata::new(),
            version: crate::backend::RecordVersion::fresh(),
        },
    }
}

pub(super) fn put(key: &str, record: Record) -> WriteOp {
    WriteOp::Put {
        key: key.into(),
        record,
        mode: PutMode::Upsert,
    }
}

pub(super) fn create(key: &str, record: Record) -> WriteOp {
    WriteOp::Put {
        key: key.into(),
        record,
        mode: PutMode::CreateOnly,
    }
}

pub(super) fn delete(key: &str) -> WriteOp {
    WriteOp::Delete { key: key.into() }
}

pub(super) fn put1(
    b: &dyn Backend,
    key: &str,
    value: &[u8],
    now: Timestamp,
    exp: Option<Timestamp>,
) {
    b.write(vec![put(key, record(value, now, exp))], now)
        .expect("put");
}

pub(super) fn keys(entries: Vec<KeyEntry>) -> BTreeSet<String> {
    entries.into_iter().map(|e| e.key).collect()
}
