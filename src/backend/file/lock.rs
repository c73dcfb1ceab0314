//! Who may use a directory, and when: one process at a time (an exclusive advisory lock on
//! `<root>/.lock`), one backend per directory within a process (a registry of the open roots,
//! so that opening a directory again shares its lock and mutex), changes taking turns behind
//! a mutex, and readers waiting only while a batch's renames run (a gate). See the
//! "Concurrency" section of the [module docs](super).

use std::collections::HashMap;
use std::fmt;
use std::fs::{File, OpenOptions};
use std::path::PathBuf;
use std::sync::{Arc, LazyLock, Weak};

use fs4::fs_std::FileExt;
use parking_lot::{Mutex, RwLock};

use super::BACKEND;
use super::dir::Dir;
use crate::error::{Result, StorageError};

/// The advisory lock file.
pub(super) const LOCK_FILE: &str = ".lock";

/// The open directories: (canonical root, read-only) to the backend.
type Registry = HashMap<(PathBuf, bool), Weak<Inner>>;

/// Directories open in this process (and whether read-only), so that opening one twice
/// shares one backend.
static OPEN_ROOTS: LazyLock<Mutex<Registry>> = LazyLock::new(|| Mutex::new(HashMap::new()));

/// What the handles of one open directory share.
pub(super) struct Inner {
    pub(super) dir: Dir,
    /// Holds the exclusive advisory lock for as long as the backend lives (`None` when
    /// read-only: a reader takes no lock and creates nothing).
    lock_file: Option<File>,
    /// Why the backend only reads, when it does.
    pub(super) read_only: Option<String>,
    /// Serializes every change; remembers a journal that still has to be rolled forward.
    pub(super) writer: Mutex<WriterState>,
    /// Readers hold it shared; the renames of a batch hold it exclusively.
    pub(super) gate: RwLock<()>,
    /// Registered among the read-only backends (asked for, or fallen back to).
    registered_read_only: bool,
    #[cfg(test)]
    pub(super) crash: std::sync::atomic::AtomicU8,
}

#[derive(Debug, Default)]
pub(super) struct WriterState {
    /// A durable journal whose batch may be partly applied: finish it before any other change.
    pub(super) journal_pending: bool,
}

impl fmt::Debug for Inner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FileBackend")
            .field("root", &self.dir.root)
            .finish_non_exhaustive()
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Under the registry lock, so that a concurrent `open` of the same root either got a
        // handle to this backend before it died or finds the lock released.
        let mut registry = OPEN_ROOTS.lock();
        if let Some(lock_file) = &self.lock_file {
            let _ = FileExt::unlock(lock_file);
        }
        let key = (self.dir.root.clone(), self.registered_read_only);
        if registry
            .get(&key)
            .is_some_and(|weak| std::ptr::eq(weak.as_ptr(), self))
        {
            registry.remove(&key);
        }
    }
}

impl Inner {
    /// The backend of the canonical directory `root`: the one this process already has open
    /// (in the same mode), or a newly opened one.
    pub(super) fn shared(root: PathBuf, read_only: bool) -> Result<Arc<Self>> {
        loop {
            let mut registry = OPEN_ROOTS.lock();
            let key = (root.clone(), read_only);
            match registry.get(&key).map(Weak::upgrade) {
                Some(Some(inner)) => return Ok(inner),
                Some(None) => {
                    // The last handle is being dropped on another thread; its `Drop` removes
                    // the entry and releases the lock in a moment.
                    drop(registry);
                    std::thread::sleep(std::time::Duration::from_millis(1));
                }
                None => {
                    let inner = Arc::new(Inner::open(root.clone(), read_only)?);
                    let key = (root, inner.registered_read_only);
                    if let Some(Some(existing)) = registry.get(&key).map(Weak::upgrade) {
                        return Ok(existing);
                    }
                    registry.insert(key, Arc::downgrade(&inner));
                    return Ok(inner);
                }
            }
        }
    }

    /// Locks the directory and recovers from a crash. `root` is canonical. Read-only (asked
    /// for, or because the lock file cannot be written): no lock, no recovery, nothing
    /// created.
    fn open(root: PathBuf, read_only: bool) -> Result<Self> {
        let dir = Dir { root };
        let lock_path = dir.path(LOCK_FILE);
        let reason = if read_only {
            Some("opened read-only".to_owned())
        } else {
            None
        };
        let (lock_file, reason) = match reason {
            Some(reason) => (None, Some(reason)),
            None => match OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&lock_path)
            {
                Ok(file) => (Some(file), None),
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::ReadOnlyFilesystem
                            | std::io::ErrorKind::PermissionDenied
                    ) =>
                {
                    let reason = format!(
                        "the lock file {} cannot be written: {e}",
                        lock_path.display()
                    );
                    tracing::warn!(
                        "{}: {reason}; the store is opened read-only",
                        dir.root.display()
                    );
                    (None, Some(reason))
                }
                Err(e) => {
                    return Err(StorageError::io(
                        format!("opening the lock file {}", lock_path.display()),
                        e,
                    ));
                }
            },
        };
        if let Some(lock_file) = &lock_file {
            let locked = FileExt::try_lock_exclusive(lock_file)
                .map_err(|e| StorageError::io(format!("locking {}", lock_path.display()), e))?;
            if !locked {
                return Err(StorageError::unavailable(
                    BACKEND,
                    format!(
                        "the storage directory {} is in use by another process (it holds the \
                         lock on {}); close that program or open another directory",
                        dir.root.display(),
                        lock_path.display()
                    ),
                ));
            }
        }
        let gate = RwLock::new(());
        if lock_file.is_some() {
            dir.remove_temp_files()?;
            dir.recover_journal(&gate)?;
        } else if dir.path(super::journal::JOURNAL_FILE).exists() {
            tracing::warn!(
                "{} holds an unfinished batch that a read-only store cannot finish: until the \
                 directory is opened for writing, the keys of that batch may show it half applied",
                dir.root.display()
            );
        }
        Ok(Self {
            dir,
            registered_read_only: lock_file.is_none(),
            lock_file,
            read_only: reason,
            writer: Mutex::new(WriterState::default()),
            gate,
            #[cfg(test)]
            crash: std::sync::atomic::AtomicU8::new(0),
        })
    }
}

#[cfg(test)]
mod tests {
    use std::fs::File;

    use super::*;
    use crate::backend::Backend;
    use crate::backend::file::FileBackend;
    use crate::backend::file::testing::*;
    use crate::clock::Timestamp;

    #[test]
    fn concurrent_writers_and_readers() {
        let (_tmp, b) = setup();
        let threads = 8;
        let rounds = 25;
        std::thread::scope(|s| {
            for t in 0..threads {
                let b = b.clone();
                s.spawn(move || {
                    for i in 0..rounds {
                        let key = format!("t{t}:{i}");
                        let value = format!("{t}/{i}");
                        b.write(
                            vec![
                                put(&key, value.as_bytes(), i),
                                put("shared", value.as_bytes(), i),
                            ],
                            NOW,
                        )
                        .unwrap();
                        assert_eq!(value_of(&b, &key).unwrap(), value.as_bytes());
                        let shared = value_of(&b, "shared").unwrap();
                        assert!(std::str::from_utf8(&shared).unwrap().contains('/'));
                        b.touch(&key, Timestamp(i64::from(t))).unwrap();
                        if i % 5 == 0 {
                            b.write(vec![del(&format!("t{t}:{}", i / 2))], NOW).unwrap();
                            b.write(vec![put(&format!("t{t}:{}", i / 2), b"re", i)], NOW)
                                .unwrap();
                        }
                        assert!(b.scan(&format!("t{t}:")).unwrap().len() >= i as usize);
                    }
                });
            }
            for _ in 0..2 {
                let b = b.clone();
                s.spawn(move || {
                    for _ in 0..50 {
                        for entry in b.scan("").unwrap() {
                            // Every listed record reads back whole, never half-written.
                            b.get(&entry.key).unwrap();
                        }
                    }
                });
            }
        });
        assert_eq!(
            listed_keys(&b, "t").len(),
            threads as usize * rounds as usize
        );
        assert!(value_of(&b, "shared").is_some());
        assert!(
            !names_in(b.root())
                .iter()
                .any(|n| n.starts_with('.') && n != LOCK_FILE)
        );
    }

    #[test]
    fn same_directory_twice_in_one_process_shares_the_backend() {
        let (tmp, a) = setup();
        let b = FileBackend::open(tmp.path().join("other/../store")).unwrap();
        assert!(Arc::ptr_eq(&a.inner, &b.inner));
        a.write(vec![put("k", b"v", 1)], NOW).unwrap();
        assert_eq!(value_of(&b, "k").unwrap(), b"v");
        drop(a);
        drop(b);
        let c = FileBackend::open(tmp.path().join("store")).unwrap();
        assert_eq!(value_of(&c, "k").unwrap(), b"v");
    }

    #[test]
    fn a_directory_locked_elsewhere_is_refused() {
        let (_tmp, b) = setup();
        let root = b.root().to_owned();
        drop(b);
        // Another open file description holding the lock, as another process would.
        let other = File::options()
            .read(true)
            .write(true)
            .open(root.join(LOCK_FILE))
            .unwrap();
        assert!(FileExt::try_lock_exclusive(&other).unwrap());
        let err = FileBackend::open(&root).unwrap_err();
        assert!(matches!(err, StorageError::Unavailable { .. }), "{err:?}");
        assert!(err.to_string().contains("another process"), "{err}");
        FileExt::unlock(&other).unwrap();
        FileBackend::open(&root).unwrap();
    }
}
