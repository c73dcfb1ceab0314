//! File backend (being written).
use std::path::{Path, PathBuf};

use super::{Backend, KeyEntry, Record, WriteOp, WriteOutcome};
use crate::clock::Timestamp;
use crate::error::{Result, StorageError};

/// One file per key under a root directory.
#[derive(Debug)]
pub struct FileBackend {
    root: PathBuf,
}

impl FileBackend {
    /// Opens (creating if needed) a file backend rooted at `root`.
    pub fn open(root: impl AsRef<Path>) -> Result<Self> {
        Ok(Self { root: root.as_ref().to_path_buf() })
    }
}

impl Backend for FileBackend {
    fn backend_type(&self) -> &str {
        "file"
    }
    fn get(&self, _key: &str) -> Result<Option<Record>> {
        Err(StorageError::backend("file", format!("not written yet: {}", self.root.display())))
    }
    fn write(&self, _ops: Vec<WriteOp>, _now: Timestamp) -> Result<Vec<WriteOutcome>> {
        Err(StorageError::backend("file", "not written yet"))
    }
    fn touch(&self, _key: &str, _at: Timestamp) -> Result<()> {
        Err(StorageError::backend("file", "not written yet"))
    }
    fn scan(&self, _prefix: &str) -> Result<Vec<KeyEntry>> {
        Err(StorageError::backend("file", "not written yet"))
    }
    fn purge_expired(&self, _now: Timestamp) -> Result<usize> {
        Err(StorageError::backend("file", "not written yet"))
    }
    fn clear(&self) -> Result<()> {
        Err(StorageError::backend("file", "not written yet"))
    }
}
