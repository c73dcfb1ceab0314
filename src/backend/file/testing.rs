//! Helpers shared by the unit tests of the file backend.

use std::collections::BTreeSet;
use std::fs;
use std::path::Path;

use super::FileBackend;
use crate::backend::{Backend, PutMode, Record, RecordMeta, WriteOp};
use crate::clock::Timestamp;

pub(super) const NOW: Timestamp = Timestamp(1_000_000);

pub(super) fn record(value: &[u8], at: i64, expires_at: Option<i64>) -> Record {
    Record {
        value: value.to_vec(),
        meta: RecordMeta {
            created_at: Timestamp(at),
            modified_at: Timestamp(at),
            accessed_at: Timestamp(at),
            expires_at: expires_at.map(Timestamp),
            size: value.len() as u64,
            compressed: false,
            encrypted: false,
            custom: Default::default(),
            version: crate::backend::RecordVersion::fresh(),
        },
    }
}

pub(super) fn put(key: &str, value: &[u8], at: i64) -> WriteOp {
    WriteOp::Put {
        key: key.to_owned(),
        record: record(value, at, None),
        mode: PutMode::Upsert,
    }
}

pub(super) fn put_expiring(key: &str, value: &[u8], at: i64, expires_at: i64) -> WriteOp {
    WriteOp::Put {
        key: key.to_owned(),
        record: record(value, at, Some(expires_at)),
        mode: PutMode::Upsert,
    }
}

pub(super) fn create(key: &str, value: &[u8], at: i64) -> WriteOp {
    WriteOp::Put {
        key: key.to_owned(),
        record: record(value, at, None),
        mode: PutMode::CreateOnly,
    }
}

pub(super) fn del(key: &str) -> WriteOp {
    WriteOp::Delete {
        key: key.to_owned(),
    }
}

/// A backend in `<tempdir>/store`, so tests can check that nothing appears beside it.
pub(super) fn setup() -> (tempfile::TempDir, FileBackend) {
    let tmp = tempfile::tempdir().unwrap();
    let backend = FileBackend::open(tmp.path().join("store")).unwrap();
    (tmp, backend)
}

pub(super) fn value_of(b: &FileBackend, key: &str) -> Option<Vec<u8>> {
    b.get(key).unwrap().map(|r| r.value)
}

pub(super) fn listed_keys(b: &FileBackend, prefix: &str) -> Vec<String> {
    b.scan(prefix).unwrap().into_iter().map(|e| e.key).collect()
}

pub(super) fn names_in(dir: &Path) -> BTreeSet<String> {
    fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect()
}

/// Deterministic garbage.
pub(super) fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}
