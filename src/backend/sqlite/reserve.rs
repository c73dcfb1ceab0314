//! The disk reserve: space kept beside the database so that a full disk can always be
//! checkpointed, and the space freed by deletes used again.
//!
//! In WAL mode the records last written live in the `-wal` file until a checkpoint copies
//! them into the database, and that copy needs the database file to grow while the WAL
//! still holds them. On a disk filled up to the last byte the checkpoint then fails too,
//! and with it every later write, even deletes (they only add to the WAL). So the backend
//! keeps *headroom* of [`SqliteOptions::disk_reserve`] bytes (at most an eighth of the
//! disk): pages on the database's free list (left by deletes; a checkpoint reuses them
//! without growing the file) plus a file `<db>-reserve` allocated on disk
//! (`posix_fallocate`) for the rest, and checkpoints the WAL every headroom's worth of pages
//! (`wal_autocheckpoint`), so that the headroom always suffices to write the WAL back.
//!
//! On `SQLITE_FULL` the backend removes the reserve file, checkpoints with `TRUNCATE`
//! (which writes the WAL back and empties the WAL file) and sizes the reserve again. When
//! the headroom is whole again the batch is retried once; otherwise only a batch of deletes
//! is retried, and batches that save are refused with `StorageFull` before they reach
//! SQLite until deletes have freed enough pages. So deletes always go through, and once
//! they have freed the headroom, saves work again.
//!
//! [`SqliteOptions::disk_reserve`]: super::SqliteOptions::disk_reserve

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};

use fs4::fs_std::FileExt;

/// The headroom for the database at `db`: `wanted`, but at most an eighth of the size of the
/// disk it is on (a small disk cannot spare 4 MiB; its WAL is kept as small).
pub(super) fn headroom(db: &Path, wanted: u64) -> u64 {
    let dir = match db.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    match fs4::total_space(dir) {
        Ok(total) => wanted.min(total / 8),
        Err(_) => wanted,
    }
}

/// The reserve file of the database at `db`.
pub(super) fn reserve_path(db: &Path) -> PathBuf {
    let mut name = db.file_name().unwrap_or_default().to_os_string();
    name.push("-reserve");
    db.with_file_name(name)
}

/// Makes the reserve file exactly `bytes` long and allocated on disk (removed for 0). False
/// when the disk has no room for it, in which case the file is removed.
pub(super) fn resize(path: &Path, bytes: u64) -> bool {
    if bytes == 0 {
        release(path);
        return true;
    }
    let file = match OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
    {
        Ok(file) => file,
        Err(_) => return false,
    };
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let done = if len > bytes {
        file.set_len(bytes)
    } else {
        FileExt::allocate(&file, bytes)
    };
    match done.and_then(|()| file.sync_all()) {
        Ok(()) => true,
        Err(_) => {
            drop(file);
            release(path);
            false
        }
    }
}

/// Gives the reserve's space back to the disk.
pub(super) fn release(path: &Path) {
    let _ = std::fs::remove_file(path);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reserve_is_sized_exactly_and_removed_at_zero() {
        let dir = tempfile::TempDir::new().unwrap();
        let db = dir.path().join("s.db");
        let path = reserve_path(&db);
        assert_eq!(path, dir.path().join("s.db-reserve"));
        assert!(resize(&path, 64 * 1024));
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 64 * 1024);
        assert!(resize(&path, 16 * 1024));
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 16 * 1024);
        assert!(resize(&path, 0));
        assert!(!path.exists());
        // Never more than an eighth of the disk.
        let total = fs4::total_space(dir.path()).unwrap();
        assert_eq!(headroom(&db, u64::MAX), total / 8);
        assert_eq!(headroom(&db, 10), 10);
    }
}
