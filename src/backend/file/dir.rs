//! File-system operations on the root directory: temp files, atomic replacement of a file,
//! `fsync` of the directory, and the hashed chains of long keys (see [`naming`](super::naming)).
//!
//! Every record is written to a fresh `.tmp-*` file in the root, `fsync`ed, renamed over its
//! final name (an atomic replacement: a reader sees the old file or the new one, never a mix),
//! and then the directory is `fsync`ed so the rename itself is durable. A delete is a remove
//! followed by a directory `fsync`. (On non-Unix systems directories cannot be `fsync`ed
//! through `std`; there the rename's durability is left to the file system's own journal.)
//!
//! A multi-key batch adds the journal around these steps (see [`journal`](super::journal)),
//! and syncs its new files together, with one barrier before the first rename
//! ([`Dir::apply_batch`]: `syncfs` on Linux) instead of one `fsync` per file.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use parking_lot::RwLock;

use super::BACKEND;
use super::journal::Change;
use super::naming::{MAX_SLOTS, Place, place_of, slot_name};
use super::record::{Damage, Loaded, load_header};
use crate::error::{Result, StorageError};

/// Prefix of temporary files.
pub(super) const TEMP_PREFIX: &str = ".tmp-";

/// A failed [`Dir::apply`]: the error, and whether any rename or remove had happened.
pub(super) struct ApplyError {
    pub(super) error: StorageError,
    pub(super) started: bool,
}

/// A hashed chain, as found by [`Dir::probe`].
pub(super) struct Chain {
    /// The slot holding the key.
    pub(super) found: Option<u32>,
    /// The number of slots (the first missing one); only exact for a full probe.
    pub(super) len: u32,
    /// The first damaged file met.
    pub(super) damaged: Option<(PathBuf, Damage)>,
}

/// File-system operations on the root directory.
pub(super) struct Dir {
    pub(super) root: PathBuf,
}

impl Dir {
    pub(super) fn path(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }

    /// `fsync`s the directory so that renames and removes in it are durable.
    pub(super) fn sync(&self) -> Result<()> {
        #[cfg(unix)]
        {
            File::open(&self.root)
                .and_then(|dir| dir.sync_all())
                .map_err(|e| {
                    StorageError::io(format!("syncing the directory {}", self.root.display()), e)
                })
        }
        #[cfg(not(unix))]
        {
            Ok(())
        }
    }

    /// Makes the data of every file in `files` (all in the root) durable with one barrier:
    /// `syncfs(2)` of the root's file system on Linux (which reports the write-back errors of
    /// that file system since Linux 5.8), an `fsync` of each file elsewhere.
    fn sync_files(&self, files: &[&Path]) -> Result<()> {
        if files.is_empty() {
            return Ok(());
        }
        #[cfg(target_os = "linux")]
        {
            use std::os::fd::AsRawFd;
            let _ = files;
            let context = || format!("syncing the file system of {}", self.root.display());
            let root = File::open(&self.root).map_err(|e| StorageError::io(context(), e))?;
            // SAFETY: `root` is an open descriptor for the whole call.
            if unsafe { libc::syncfs(root.as_raw_fd()) } != 0 {
                return Err(StorageError::io(context(), io::Error::last_os_error()));
            }
            Ok(())
        }
        #[cfg(not(target_os = "linux"))]
        {
            for path in files {
                File::open(path)
                    .and_then(|f| f.sync_all())
                    .map_err(|e| StorageError::io(format!("syncing {}", path.display()), e))?;
            }
            Ok(())
        }
    }

    /// The UTF-8 names of the entries of the root.
    pub(super) fn entry_names(&self) -> Result<Vec<String>> {
        let mut names = Vec::new();
        self.for_each_entry_name(|name| names.push(name))?;
        Ok(names)
    }

    /// Hands the name of every file in the storage directory to `visit` as the directory is
    /// read, keeping none of them.
    pub(super) fn for_each_entry_name(&self, mut visit: impl FnMut(String)) -> Result<()> {
        let context = || format!("listing the storage directory {}", self.root.display());
        for entry in fs::read_dir(&self.root).map_err(|e| StorageError::io(context(), e))? {
            let entry = entry.map_err(|e| StorageError::io(context(), e))?;
            // Sub-directories are never ours (the backend creates none).
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            if let Ok(name) = entry.file_name().into_string() {
                visit(name);
            }
        }
        Ok(())
    }

    pub(super) fn remove_file_if_exists(&self, name: &str) -> Result<()> {
        let path = self.path(name);
        match fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(StorageError::io(format!("removing {}", path.display()), e)),
        }
    }

    /// Removes the `.tmp-*` files a crash left behind.
    pub(super) fn remove_temp_files(&self) -> Result<()> {
        for name in self.entry_names()? {
            if name.starts_with(TEMP_PREFIX) {
                // Best effort: a leftover temp file is never read, so failing to remove one
                // (say, a directory someone named `.tmp-x`) must not prevent opening.
                let _ = fs::remove_file(self.path(&name));
            }
        }
        Ok(())
    }

    /// Writes `bytes` to a new temp file in the root, `fsync`ed.
    pub(super) fn write_temp(&self, bytes: &[u8]) -> Result<PathBuf> {
        self.write_temp_with(bytes, true)
    }

    /// A new temp file holding `bytes`, `fsync`ed when `sync` (else the caller syncs it, with
    /// the other files of its batch, through [`sync_files`](Self::sync_files)).
    fn write_temp_with(&self, bytes: &[u8], sync: bool) -> Result<PathBuf> {
        let mut attempts = 0;
        loop {
            let path = self.path(&format!("{TEMP_PREFIX}{:016x}", random_u64()));
            let context = || format!("writing the temporary file {}", path.display());
            match OpenOptions::new().write(true).create_new(true).open(&path) {
                Ok(mut file) => {
                    let written = file
                        .write_all(bytes)
                        .and_then(|()| if sync { file.sync_all() } else { Ok(()) });
                    return match written {
                        Ok(()) => Ok(path),
                        Err(e) => {
                            drop(file);
                            let _ = fs::remove_file(&path);
                            Err(StorageError::io(context(), e))
                        }
                    };
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists && attempts < 16 => {
                    attempts += 1;
                }
                Err(e) => return Err(StorageError::io(context(), e)),
            }
        }
    }

    pub(super) fn rename(&self, from: &Path, to: &Path) -> Result<()> {
        fs::rename(from, to).map_err(|e| {
            StorageError::io(
                format!("renaming {} to {}", from.display(), to.display()),
                e,
            )
        })
    }

    /// Walks the hashed chain `base` looking for `key`. With `full`, goes on to its end.
    pub(super) fn probe(&self, base: &str, key: &str, full: bool) -> Result<Chain> {
        let mut chain = Chain {
            found: None,
            len: 0,
            damaged: None,
        };
        for slot in 0..MAX_SLOTS {
            let path = self.path(&slot_name(base, slot));
            match load_header(&path)? {
                Loaded::Missing => {
                    chain.len = slot;
                    return Ok(chain);
                }
                Loaded::Found(found_key, _) if found_key == key => {
                    chain.found = Some(slot);
                    if !full {
                        chain.len = slot + 1;
                        return Ok(chain);
                    }
                }
                Loaded::Found(..) => {}
                Loaded::Damaged(damage) => {
                    chain.damaged.get_or_insert((path, damage));
                }
            }
        }
        Err(StorageError::backend(
            BACKEND,
            format!(
                "{} files share the hashed name {base}*; refusing to add more",
                MAX_SLOTS
            ),
        ))
    }

    /// Moves the temp file `tmp` into place as `key`'s record.
    fn install(&self, key: &str, tmp: &Path) -> Result<()> {
        let target = match place_of(key) {
            Place::Direct(name) => self.path(&name),
            Place::Chain(base) => {
                let chain = self.probe(&base, key, true)?;
                self.path(&slot_name(&base, chain.found.unwrap_or(chain.len)))
            }
        };
        self.rename(tmp, &target)
    }

    /// Removes `key`'s record, if any (without syncing the directory).
    fn remove_key(&self, key: &str) -> Result<()> {
        match place_of(key) {
            Place::Direct(name) => self.remove_file_if_exists(&name),
            Place::Chain(base) => {
                let chain = self.probe(&base, key, true)?;
                match chain.found {
                    None => Ok(()),
                    Some(slot) if slot + 1 == chain.len => {
                        self.remove_file_if_exists(&slot_name(&base, slot))
                    }
                    // Keep the chain without holes: the last file takes the freed slot.
                    Some(slot) => self.rename(
                        &self.path(&slot_name(&base, chain.len - 1)),
                        &self.path(&slot_name(&base, slot)),
                    ),
                }
            }
        }
    }

    /// Applies changes: writes every new file, then does every rename and remove under the
    /// exclusive gate, then syncs the directory. `limit` (a test hook) stops after that many
    /// renames and removes, as a crash would.
    pub(super) fn apply(
        &self,
        changes: &[Change],
        gate: &RwLock<()>,
        limit: usize,
    ) -> std::result::Result<(), ApplyError> {
        self.apply_with(changes, gate, limit, false)
    }

    /// [`apply`](Self::apply) for a batch of several files: the new files are written
    /// without an `fsync` each and made durable together by one barrier
    /// ([`sync_files`](Self::sync_files)) before the first rename, so a renamed file is as
    /// intact as with `apply`, for one barrier per batch instead of one per record.
    pub(super) fn apply_batch(
        &self,
        changes: &[Change],
        gate: &RwLock<()>,
        limit: usize,
    ) -> std::result::Result<(), ApplyError> {
        self.apply_with(changes, gate, limit, true)
    }

    fn apply_with(
        &self,
        changes: &[Change],
        gate: &RwLock<()>,
        limit: usize,
        one_barrier: bool,
    ) -> std::result::Result<(), ApplyError> {
        let mut temps: Vec<Option<PathBuf>> = Vec::with_capacity(changes.len());
        let not_started = |error| ApplyError {
            error,
            started: false,
        };
        for change in changes {
            match &change.bytes {
                Some(bytes) => match self.write_temp_with(bytes, !one_barrier) {
                    Ok(path) => temps.push(Some(path)),
                    Err(error) => {
                        remove_temps(&temps);
                        return Err(not_started(error));
                    }
                },
                None => temps.push(None),
            }
        }
        if one_barrier {
            let written: Vec<&Path> = temps.iter().flatten().map(PathBuf::as_path).collect();
            if let Err(error) = self.sync_files(&written) {
                remove_temps(&temps);
                return Err(not_started(error));
            }
        }
        let mut done = 0;
        let mut failure = None;
        {
            let _gate = gate.write();
            for (change, temp) in changes.iter().zip(temps.iter_mut()) {
                if done == limit {
                    // Simulated crash: leave everything as it is.
                    return Err(ApplyError {
                        error: StorageError::backend(BACKEND, "simulated crash (test hook)"),
                        started: done > 0,
                    });
                }
                let result = match temp {
                    Some(path) => self.install(&change.key, path).map(|()| *temp = None),
                    None => self.remove_key(&change.key),
                };
                if let Err(error) = result {
                    failure = Some(error);
                    break;
                }
                done += 1;
            }
        }
        if let Some(error) = failure {
            remove_temps(&temps);
            return Err(ApplyError {
                error,
                started: done > 0,
            });
        }
        // The power-loss harness's self-check builds without this fsync (see DEVELOPERS.md).
        #[cfg(not(bevy_storage_sabotage_fsync))]
        self.sync().map_err(|error| ApplyError {
            error,
            started: true,
        })?;
        Ok(())
    }
}

/// `fs::create_dir_all`, then an `fsync` of the parent of every directory it created, so a
/// power cut after the store acknowledged writes cannot lose the whole directory with them
/// (a new directory's entry is durable only once its parent is synced; the power-loss
/// harness, `examples/power_loss.rs --fresh`, found this).
pub(super) fn create_dir_all_durably(path: &Path) -> io::Result<()> {
    let mut missing = Vec::new();
    let mut at = Some(path);
    while let Some(dir) = at {
        if dir.as_os_str().is_empty() || dir.is_dir() {
            break;
        }
        missing.push(dir.to_path_buf());
        at = dir.parent();
    }
    fs::create_dir_all(path)?;
    for dir in missing {
        let parent = match dir.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        File::open(&parent)?.sync_all()?;
    }
    Ok(())
}

fn remove_temps(temps: &[Option<PathBuf>]) {
    for path in temps.iter().flatten() {
        let _ = fs::remove_file(path);
    }
}

/// A random number for temp-file names; falls back to the time and a counter.
fn random_u64() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    getrandom::u64().unwrap_or_else(|_| {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        nanos
            ^ COUNTER.fetch_add(1, Ordering::Relaxed).rotate_left(32)
            ^ u64::from(std::process::id())
    })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::fs;

    use super::*;
    use crate::backend::Backend;
    use crate::backend::file::FileBackend;
    use crate::backend::file::lock::LOCK_FILE;
    use crate::backend::file::record::encode_record;
    use crate::backend::file::testing::*;
    use crate::clock::Timestamp;

    #[test]
    fn hashed_name_collisions_are_detected_and_chained() {
        let (_tmp, b) = setup();
        let key = "x".repeat(300);
        let Place::Chain(base) = place_of(&key) else {
            panic!("expected a hashed name")
        };
        // Another key's record sitting in this key's slot 0, as after a hash collision.
        let intruder = encode_record("someone else", &record(b"secret", 1, None)).unwrap();
        fs::write(b.root().join(slot_name(&base, 0)), &intruder).unwrap();
        assert_eq!(
            b.get(&key).unwrap(),
            None,
            "another key's record is never returned"
        );
        assert_eq!(b.get_meta(&key).unwrap(), None);
        assert_eq!(
            listed_keys(&b, ""),
            Vec::<String>::new(),
            "a misplaced file is not listed"
        );

        // The key goes to the next free slot.
        b.write(vec![put(&key, b"mine", 1)], NOW).unwrap();
        assert_eq!(
            b.path_of(&key).unwrap().unwrap(),
            b.root().join(slot_name(&base, 1))
        );
        assert_eq!(value_of(&b, &key).unwrap(), b"mine");
        b.touch(&key, Timestamp(77)).unwrap();
        assert_eq!(
            b.get_meta(&key).unwrap().unwrap().accessed_at,
            Timestamp(77)
        );

        // Deleting a key that is not last in its chain moves the last file into its slot, so
        // the chain never has a hole. Set up: the key in slot 0, the intruder in slot 1.
        b.write(vec![del(&key)], NOW).unwrap();
        assert!(!b.root().join(slot_name(&base, 1)).exists());
        fs::remove_file(b.root().join(slot_name(&base, 0))).unwrap();
        b.write(vec![put(&key, b"mine", 1)], NOW).unwrap();
        fs::write(b.root().join(slot_name(&base, 1)), &intruder).unwrap();
        b.write(vec![del(&key)], NOW).unwrap();
        assert!(!b.root().join(slot_name(&base, 1)).exists());
        assert_eq!(
            fs::read(b.root().join(slot_name(&base, 0))).unwrap(),
            intruder,
            "the last file of the chain took the freed slot"
        );
        assert_eq!(b.get(&key).unwrap(), None);

        // A damaged file in the key's chain is reported as this key's corruption.
        fs::write(b.root().join(slot_name(&base, 1)), b"garbage").unwrap();
        assert!(matches!(b.get(&key), Err(StorageError::Corrupt { .. })));
    }

    #[test]
    fn leftover_temp_files_are_removed_at_open() {
        let (_tmp, b) = setup();
        let root = b.root().to_owned();
        b.write(vec![put("k", b"v", 1)], NOW).unwrap();
        drop(b);
        fs::write(root.join(".tmp-0123456789abcdef"), b"half a record").unwrap();
        fs::write(root.join("readme.txt"), b"hello").unwrap();
        let b = FileBackend::open(&root).unwrap();
        assert_eq!(
            names_in(&root),
            BTreeSet::from([
                LOCK_FILE.to_owned(),
                "k-k".to_owned(),
                "readme.txt".to_owned()
            ])
        );
        assert_eq!(value_of(&b, "k").unwrap(), b"v");
    }
}
