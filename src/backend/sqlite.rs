//! SQLite backend (being written).
use std::path::{Path, PathBuf};

use super::{Backend, KeyEntry, Record, WriteOp, WriteOutcome};
use crate::clock::Timestamp;
use crate::error::{Result, StorageError};

/// Records in one SQLite table.
#[derive(Debug)]
pub struct SqliteBackend {
    path: PathBuf,
}

impl SqliteBackend {
    /// Opens (creating if needed) the SQLite database at `path`.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        Ok(Self { path: path.as_ref().to_path_buf() })
    }
}

impl Backend for SqliteBackend {
    fn backend_type(&self) -> &str {
        "sqlite"
    }
    fn get(&self, _key: &str) -> Result<Option<Record>> {
        Err(StorageError::backend("sqlite", format!("not written yet: {}", self.path.display())))
    }
    fn write(&self, _ops: Vec<WriteOp>, _now: Timestamp) -> Result<Vec<WriteOutcome>> {
        Err(StorageError::backend("sqlite", "not written yet"))
    }
    fn touch(&self, _key: &str, _at: Timestamp) -> Result<()> {
        Err(StorageError::backend("sqlite", "not written yet"))
    }
    fn scan(&self, _prefix: &str) -> Result<Vec<KeyEntry>> {
        Err(StorageError::backend("sqlite", "not written yet"))
    }
    fn purge_expired(&self, _now: Timestamp) -> Result<usize> {
        Err(StorageError::backend("sqlite", "not written yet"))
    }
    fn clear(&self) -> Result<()> {
        Err(StorageError::backend("sqlite", "not written yet"))
    }
}
