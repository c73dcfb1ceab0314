//! The file backend: one file per key in a directory, crash safe, with atomic batches.
//!
//! Good for games that want saves a player can see, copy and back up as plain files, and for
//! platforms without SQLite. Every write that returned `Ok` survives a crash of the process and,
//! on file systems that honour `fsync`, of the machine; a batch of several keys is all or
//! nothing, through a journal.
//!
//! # Layout on disk
//!
//! ```text
//! <root>/
//!   .lock                     advisory lock held while a process has the directory open
//!   .journal                  exists only while a multi-key batch is being applied
//!   .tmp-<16 hex digits>      a file being written; renamed into place, or removed at open
//!   k-<encoded key>           one record, under its "direct" name
//!   l-<hint>-<hash>-<slot>    one record whose key is too long for a direct name
//! ```
//!
//! Only names that start with `k-` or `l-` and are well formed (see below) are data files.
//! Every other entry of the root (a `README.txt`, a `.DS_Store`, a sub-directory, ...) is
//! ignored: never read, listed, or removed, not even by [`clear`](Backend::clear). The
//! backend creates nothing but the entries above and never creates sub-directories, so no
//! key can make it write outside the root.
//!
//! # File names
//!
//! A key is turned into a name byte by byte (over its UTF-8): `a`-`z`, `0`-`9`, `_` and `-`
//! stay as they are, every other byte, **uppercase letters included**, becomes `%` and two
//! lowercase hex digits. So `Player:1` is stored as `k-%50layer%3a1`, `../x` as
//! `k-%2e%2e%2fx` and `CON` as `k-%43%4f%4e`. This makes names
//!
//! - reversible, and canonical (a `%xx` escape of a byte that could stand for itself, or an
//!   uppercase hex digit, is not a data-file name), so each key has exactly one name;
//! - free of `/`, `\`, `:`, `.`, NUL and every character some file system reserves: a name
//!   can never be `.`, `..`, a path, a Windows device (`CON`, `NUL`, `COM1`, ...), end in a
//!   dot or a space, or differ from another name only in letter case (so keys `Player` and
//!   `player` stay apart on case-insensitive file systems such as NTFS and APFS);
//! - pure ASCII, so no Unicode normalization by the file system can merge two keys.
//!
//! When `k-` plus the encoded key would be longer than 200 bytes (the key can be 512 bytes of
//! UTF-8, which may encode to 1.5 KB), the record goes under a **hashed name** instead,
//! well within the 255-byte limit of common file systems:
//!
//! ```text
//! l-<hint>-<hash>-<slot>
//!   hint  the first (at most) 96 characters of the encoded key, for people browsing the folder
//!   hash  24 hex digits: FNV-1a 64 of the key's bytes, then CRC-32 of the key's bytes
//!   slot  0, 1, 2, ... (decimal) among keys whose hint and hash are the same
//! ```
//!
//! Both hashes are computed by this crate's own code from fixed constants, so names are stable
//! across Rust versions and platforms (unlike `std`'s `DefaultHasher`). A 96-bit collision
//! between two keys is practically impossible, but it is handled anyway: keys with the same
//! `l-<hint>-<hash>-` form a **chain** of slots `0..n` with no holes. A lookup reads the
//! header of each slot until it finds one holding the key (the record file stores its full
//! key, so a file of another key is never returned for this one) or reaches a missing slot.
//! A new key takes the first missing slot; deleting the key in slot `i` moves the chain's last
//! file into slot `i` with one atomic rename, so the chain never gets a hole.
//!
//! # Record files
//!
//! ```text
//! offset size
//!  0      4   magic "BSTR"
//!  4      1   format version (1)
//!  5      3   zero
//!  8      4   header length H (u32, little endian)
//! 12      4   CRC-32 of the value
//! 16      8   value length V (u64, LE)
//! 24      4   CRC-32 of bytes 0..24 followed by the header
//! 28      4   zero
//! 32      8   last access time (i64 ms, LE), rewritten in place by `touch`
//! 40      4   CRC-32 of bytes 32..40
//! 44      4   zero
//! 48      H   header: JSON object {"key": <the key>, "meta": <RecordMeta>}
//! 48+H    V   value: the record bytes as the codec produced them
//! ```
//!
//! The file length must be exactly `48 + H + V`. A file that is too short or too long, has the
//! wrong magic, or fails a checksum is **corrupt**: [`get`](Backend::get) and
//! [`get_meta`](Backend::get_meta) of its key return [`StorageError::Corrupt`], while
//! [`scan`](Backend::scan) (and so `usage` and `purge_expired`) skip it without failing, and
//! every other record is unaffected. A record of a newer format version gives
//! [`StorageError::UnsupportedVersion`]. Writing the key again replaces a damaged file.
//!
//! The access time lives in its own checksummed slot so that `touch` is one 12-byte write in
//! place instead of a rewrite of a possibly large file. If that slot is ever torn (a crash
//! during `touch`), the access time from the header (the time of the last write) is used; the
//! record itself is never lost to a `touch`.
//!
//! # Crash safety and the journal
//!
//! Every record is written to a fresh `.tmp-*` file in the root, `fsync`ed, renamed over its
//! final name (an atomic replacement: a reader sees the old file or the new one, never a mix),
//! and then the directory is `fsync`ed so the rename itself is durable. A delete is a remove
//! followed by a directory `fsync`. (On non-Unix systems directories cannot be `fsync`ed
//! through `std`; there the rename's durability is left to the file system's own journal.)
//!
//! A batch that changes more than one key is made atomic with `<root>/.journal`:
//!
//! 1. The final content of every changed key (the complete new record file, or "deleted") is
//!    written to a temp file with a checksum, `fsync`ed, renamed to `.journal`, and the
//!    directory `fsync`ed. This is the commit point.
//! 2. Each change is applied as above (new files written and `fsync`ed first, then all
//!    renames and removes, then one directory `fsync`).
//! 3. `.journal` is removed and the directory `fsync`ed.
//!
//! At [`open`](FileBackend::open), leftover `.tmp-*` files are removed, then a `.journal` that
//! is complete and valid is rolled forward (its changes are applied again: each one sets a key
//! to a fixed content or removes it, so replaying is idempotent), while one that is truncated
//! or fails its checksum is discarded: step 2 starts only after step 1 is durable, so nothing
//! of that batch was applied. A batch whose journal is durable but whose step 2 failed with an
//! I/O error is reported as an error and completed before the next change in this process or
//! at the next open; if step 2 failed before anything was renamed, the journal is removed and
//! nothing changed. A batch touching a single key skips the journal (its rename is atomic).
//!
//! # Concurrency
//!
//! All methods may be called from many threads. Changes (`write`, `touch`, `purge_expired`,
//! `clear`) take turns behind a mutex. Readers (`get`, `get_meta`, `scan`) never wait for
//! a batch's files to be written and `fsync`ed; they only wait while a batch's renames
//! run, so a reader in this process sees a batch entirely or not at all.
//!
//! Only one process at a time may use a directory: [`open`](FileBackend::open) takes an
//! exclusive advisory lock on `<root>/.lock` and fails with [`StorageError::Unavailable`] if
//! another process holds it. Within one process, opening the same directory again (by any
//! path that resolves to it) returns a handle to the same backend, sharing its lock and
//! mutex. The lock is released when the last handle is dropped.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, LazyLock, Weak};

use fs4::fs_std::FileExt;
use parking_lot::{Mutex, MutexGuard, RwLock};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::{Backend, KeyEntry, PutMode, Record, RecordMeta, WriteOp, WriteOutcome};
use crate::clock::Timestamp;
use crate::error::{Result, StorageError};

/// Prefix of a data file under its direct name.
const DIRECT_PREFIX: &str = "k-";
/// Prefix of a data file under a hashed name.
const HASHED_PREFIX: &str = "l-";
/// Longest direct name; longer keys get a hashed name.
const MAX_DIRECT_NAME: usize = 200;
/// Longest readable hint (encoded characters) in a hashed name.
const HINT_LEN: usize = 96;
/// Length of the hash part of a hashed name.
const HASH_HEX_LEN: usize = 24;
/// Most files one hashed chain may hold (a bound on lookups, never reached in practice).
const MAX_SLOTS: u32 = 1024;
/// The advisory lock file.
const LOCK_FILE: &str = ".lock";
/// The batch journal.
const JOURNAL_FILE: &str = ".journal";
/// Prefix of temporary files.
const TEMP_PREFIX: &str = ".tmp-";

const RECORD_MAGIC: [u8; 4] = *b"BSTR";
const RECORD_VERSION: u8 = 1;
/// Size of the fixed part of a record file, before the JSON header.
const FIXED_LEN: usize = 48;
/// Offset of the access-time slot that `touch` rewrites in place.
const TOUCH_OFFSET: u64 = 32;

const JOURNAL_MAGIC: [u8; 4] = *b"BSTJ";
const JOURNAL_VERSION: u8 = 1;
const JOURNAL_FIXED_LEN: usize = 24;

const BACKEND: &str = "file";

/// Directories open in this process, so that opening one twice shares one backend.
static OPEN_ROOTS: LazyLock<Mutex<HashMap<PathBuf, Weak<Inner>>>> =
    LazyLock::new(|| Mutex::new(HashMap::new()));

/// One file per key under a root directory. See the [module docs](self) for the layout on disk,
/// the name encoding, the journal and the locking rules.
///
/// Cloning is cheap and gives another handle to the same backend.
#[derive(Debug, Clone)]
pub struct FileBackend {
    inner: Arc<Inner>,
}

struct Inner {
    dir: Dir,
    /// Holds the exclusive advisory lock for as long as the backend lives.
    lock_file: File,
    /// Serializes every change; remembers a journal that still has to be rolled forward.
    writer: Mutex<WriterState>,
    /// Readers hold it shared; the renames of a batch hold it exclusively.
    gate: RwLock<()>,
    #[cfg(test)]
    crash: std::sync::atomic::AtomicU8,
}

#[derive(Debug, Default)]
struct WriterState {
    /// A durable journal whose batch may be partly applied: finish it before any other change.
    journal_pending: bool,
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
        let _ = FileExt::unlock(&self.lock_file);
        if registry
            .get(&self.dir.root)
            .is_some_and(|weak| std::ptr::eq(weak.as_ptr(), self))
        {
            registry.remove(&self.dir.root);
        }
    }
}

impl FileBackend {
    /// Opens (creating it and its parents if needed) a file backend rooted at `root`.
    ///
    /// Removes temporary files left by a crash and finishes or discards an interrupted batch
    /// (see the [module docs](self)). Opening a directory that this process already has open
    /// returns a handle to the same backend.
    ///
    /// # Errors
    ///
    /// - [`StorageError::Unavailable`] if another process has the directory open.
    /// - [`StorageError::Io`] if the directory cannot be created or read, or the lock file
    ///   cannot be created.
    /// - [`StorageError::Backend`] if an interrupted batch was journaled by a newer version
    ///   of this crate.
    pub fn open(root: impl AsRef<Path>) -> Result<Self> {
        let given = root.as_ref();
        fs::create_dir_all(given).map_err(|e| {
            StorageError::io(
                format!("creating the storage directory {}", given.display()),
                e,
            )
        })?;
        let root = fs::canonicalize(given).map_err(|e| {
            StorageError::io(
                format!("resolving the storage directory {}", given.display()),
                e,
            )
        })?;
        loop {
            let mut registry = OPEN_ROOTS.lock();
            match registry.get(&root).map(Weak::upgrade) {
                Some(Some(inner)) => return Ok(Self { inner }),
                Some(None) => {
                    // The last handle is being dropped on another thread; its `Drop` removes
                    // the entry and releases the lock in a moment.
                    drop(registry);
                    std::thread::sleep(std::time::Duration::from_millis(1));
                }
                None => {
                    let inner = Arc::new(Inner::open(root.clone())?);
                    registry.insert(root, Arc::downgrade(&inner));
                    return Ok(Self { inner });
                }
            }
        }
    }

    /// The root directory (canonicalized: absolute, symbolic links resolved).
    pub fn root(&self) -> &Path {
        &self.inner.dir.root
    }

    /// The file that currently holds `key`, if there is one.
    ///
    /// For tools and tests: the path may change with the next write of another key (a hashed
    /// chain is compacted when one of its keys is deleted).
    pub fn path_of(&self, key: &str) -> Result<Option<PathBuf>> {
        let _gate = self.inner.gate.read();
        let dir = &self.inner.dir;
        Ok(match place_of(key) {
            Place::Direct(name) => Some(dir.path(&name)).filter(|p| p.exists()),
            Place::Chain(base) => dir
                .probe(&base, key, false)?
                .found
                .map(|slot| dir.path(&slot_name(&base, slot))),
        })
    }

    /// Locks the writer mutex, first finishing a batch whose journal is still pending.
    fn lock_writer(&self) -> Result<MutexGuard<'_, WriterState>> {
        let mut state = self.inner.writer.lock();
        if state.journal_pending {
            self.inner.dir.recover_journal(&self.inner.gate)?;
            state.journal_pending = false;
        }
        Ok(state)
    }

    /// Commits a batch of several changes through the journal.
    fn commit_journaled(&self, state: &mut WriterState, changes: &[Change]) -> Result<()> {
        let dir = &self.inner.dir;
        if let Err(error) = dir.write_journal(&encode_journal(changes)?) {
            // The journal may have been renamed into place before the failure: it must not be
            // rolled forward later for a batch reported as failed.
            return match dir.remove_journal() {
                Ok(()) => Err(error),
                Err(_) => {
                    state.journal_pending = true;
                    Err(journal_note(error))
                }
            };
        }
        state.journal_pending = true;
        #[cfg(test)]
        if self.inner.crash.load(std::sync::atomic::Ordering::SeqCst) == CRASH_AFTER_JOURNAL {
            return Err(StorageError::backend(
                BACKEND,
                "simulated crash (test hook)",
            ));
        }
        match dir.apply(changes, &self.inner.gate, self.crash_limit()) {
            Ok(()) => {}
            // Nothing was renamed yet: roll back by forgetting the journal.
            Err(ApplyError {
                error,
                started: false,
            }) if dir.remove_journal().is_ok() => {
                state.journal_pending = false;
                return Err(error);
            }
            Err(ApplyError { error, .. }) => return Err(journal_note(error)),
        }
        if dir.remove_journal().is_ok() {
            state.journal_pending = false;
        }
        // If removing the journal failed, the batch is applied and durable all the same; the
        // journal is replayed (idempotently) and removed before the next change.
        Ok(())
    }

    /// How many renames a batch may do before the test hook simulates a crash.
    fn crash_limit(&self) -> usize {
        #[cfg(test)]
        if self.inner.crash.load(std::sync::atomic::Ordering::SeqCst) == CRASH_AFTER_FIRST_RENAME {
            return 1;
        }
        usize::MAX
    }

    /// Looks a key up; damaged files are reported, not turned into errors.
    fn lookup<T>(&self, key: &str, load: fn(&Path) -> Result<Loaded<T>>) -> Result<Lookup<T>> {
        let dir = &self.inner.dir;
        let (path, loaded) = match place_of(key) {
            Place::Direct(name) => {
                let path = dir.path(&name);
                let loaded = load(&path)?;
                (path, loaded)
            }
            Place::Chain(base) => {
                let chain = dir.probe(&base, key, false)?;
                match chain.found {
                    Some(slot) => {
                        let path = dir.path(&slot_name(&base, slot));
                        let loaded = load(&path)?;
                        (path, loaded)
                    }
                    None => {
                        return Ok(match chain.damaged {
                            // A damaged file in this key's chain most likely was this key.
                            Some((path, damage)) => Lookup::Damaged(damage.into_error(key, &path)),
                            None => Lookup::Absent,
                        });
                    }
                }
            }
        };
        Ok(match loaded {
            Loaded::Missing => Lookup::Absent,
            Loaded::Damaged(damage) => Lookup::Damaged(damage.into_error(key, &path)),
            Loaded::Found(found_key, value) if found_key == key => Lookup::Found(value),
            Loaded::Found(found_key, _) => Lookup::Damaged(StorageError::corrupt(
                key,
                format!(
                    "the file {} holds the record of another key ({found_key:?})",
                    path.display()
                ),
            )),
        })
    }

    /// Every valid record whose key starts with `prefix`, with its metadata.
    fn list(&self, prefix: &str) -> Result<Vec<(String, RecordMeta)>> {
        let dir = &self.inner.dir;
        let mut found = Vec::new();
        for name in dir.entry_names()? {
            let Some(parsed) = parse_name(&name) else {
                continue;
            };
            match &parsed {
                ParsedName::Direct(key) if !key.starts_with(prefix) => continue,
                ParsedName::Hashed { hint, .. } => {
                    let n = hint.len().min(prefix.len());
                    if hint[..n] != prefix.as_bytes()[..n] {
                        continue;
                    }
                }
                ParsedName::Direct(_) => {}
            }
            // One unreadable or damaged file never fails the listing.
            let Ok(Loaded::Found(key, meta)) = load_header(&dir.path(&name)) else {
                continue;
            };
            let in_place = match &parsed {
                ParsedName::Direct(expected) => *expected == key,
                ParsedName::Hashed { base, .. } => place_of(&key) == Place::Chain(base.clone()),
            };
            if in_place && key.starts_with(prefix) {
                found.push((key, meta));
            }
        }
        found.sort_by(|a, b| a.0.cmp(&b.0));
        found.dedup_by(|a, b| a.0 == b.0);
        Ok(found)
    }
}

impl Inner {
    /// Locks the directory and recovers from a crash. `root` is canonical.
    fn open(root: PathBuf) -> Result<Self> {
        let dir = Dir { root };
        let lock_path = dir.path(LOCK_FILE);
        let lock_file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&lock_path)
            .map_err(|e| {
                StorageError::io(format!("opening the lock file {}", lock_path.display()), e)
            })?;
        let locked = FileExt::try_lock_exclusive(&lock_file)
            .map_err(|e| StorageError::io(format!("locking {}", lock_path.display()), e))?;
        if !locked {
            return Err(StorageError::unavailable(
                BACKEND,
                format!(
                    "the storage directory {} is in use by another process (it holds the lock \
                     on {}); close that program or open another directory",
                    dir.root.display(),
                    lock_path.display()
                ),
            ));
        }
        dir.remove_temp_files()?;
        let gate = RwLock::new(());
        dir.recover_journal(&gate)?;
        Ok(Self {
            dir,
            lock_file,
            writer: Mutex::new(WriterState::default()),
            gate,
            #[cfg(test)]
            crash: std::sync::atomic::AtomicU8::new(0),
        })
    }
}

#[cfg(test)]
const CRASH_AFTER_JOURNAL: u8 = 1;
#[cfg(test)]
const CRASH_AFTER_FIRST_RENAME: u8 = 2;

impl Backend for FileBackend {
    fn backend_type(&self) -> &str {
        BACKEND
    }

    fn get(&self, key: &str) -> Result<Option<Record>> {
        let _gate = self.inner.gate.read();
        self.lookup(key, load_record)?.into_result()
    }

    fn get_value(&self, key: &str) -> Result<Option<(Vec<u8>, Option<Timestamp>)>> {
        let _gate = self.inner.gate.read();
        self.lookup(key, load_value)?.into_result()
    }

    fn get_meta(&self, key: &str) -> Result<Option<RecordMeta>> {
        let _gate = self.inner.gate.read();
        self.lookup(key, load_header)?.into_result()
    }

    fn write(&self, ops: Vec<WriteOp>, now: Timestamp) -> Result<Vec<WriteOutcome>> {
        if ops.is_empty() {
            return Ok(Vec::new());
        }
        let mut state = self.lock_writer()?;
        // The metadata each key has after the ops so far (`None` = absent); a damaged file
        // counts as absent and is replaced.
        let mut current: HashMap<String, Option<RecordMeta>> = HashMap::new();
        let mut finals: BTreeMap<String, Option<Record>> = BTreeMap::new();
        let mut outcomes = Vec::with_capacity(ops.len());
        for op in ops {
            let key = op.key().to_owned();
            let meta = match current.entry(key.clone()) {
                std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                std::collections::hash_map::Entry::Vacant(e) => {
                    e.insert(self.lookup(&key, load_header)?.found())
                }
            };
            let live = meta
                .as_ref()
                .filter(|m| m.is_live(now))
                .map(|m| (m.created_at, m.size));
            let previous_size = live.map(|(_, size)| size);
            match op {
                WriteOp::Put {
                    mut record, mode, ..
                } => {
                    if mode == PutMode::CreateOnly && live.is_some() {
                        return Err(StorageError::AlreadyExists { key });
                    }
                    if let Some((created_at, _)) = live {
                        record.meta.created_at = created_at;
                    }
                    *meta = Some(record.meta.clone());
                    finals.insert(key, Some(record));
                }
                WriteOp::Delete { .. } => {
                    *meta = None;
                    finals.insert(key, None);
                }
            }
            outcomes.push(WriteOutcome { previous_size });
        }
        let changes = finals
            .into_iter()
            .map(|(key, record)| {
                let bytes = record.map(|r| encode_record(&key, &r)).transpose()?;
                Ok(Change { key, bytes })
            })
            .collect::<Result<Vec<_>>>()?;
        if changes.len() == 1 {
            self.inner
                .dir
                .apply(&changes, &self.inner.gate, self.crash_limit())
                .map_err(|e| e.error)?;
        } else {
            self.commit_journaled(&mut state, &changes)?;
        }
        Ok(outcomes)
    }

    fn touch(&self, key: &str, at: Timestamp) -> Result<()> {
        let _state = self.lock_writer()?;
        let dir = &self.inner.dir;
        let path = match place_of(key) {
            Place::Direct(name) => dir.path(&name),
            Place::Chain(base) => match dir.probe(&base, key, false)?.found {
                Some(slot) => dir.path(&slot_name(&base, slot)),
                None => return Ok(()),
            },
        };
        let context = || format!("updating the access time in {}", path.display());
        let mut file = match OpenOptions::new().read(true).write(true).open(&path) {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(StorageError::io(context(), e)),
        };
        match read_header_from(&mut file, &path)? {
            Loaded::Missing => return Ok(()),
            Loaded::Damaged(damage) => return Err(damage.into_error(key, &path)),
            Loaded::Found(found_key, _) if found_key != key => {
                return Err(StorageError::corrupt(
                    key,
                    format!(
                        "the file {} holds the record of another key ({found_key:?})",
                        path.display()
                    ),
                ));
            }
            Loaded::Found(..) => {}
        }
        file.seek(SeekFrom::Start(TOUCH_OFFSET))
            .and_then(|_| file.write_all(&touch_slot(at)))
            .map_err(|e| StorageError::io(context(), e))
    }

    fn scan(&self, prefix: &str) -> Result<Vec<KeyEntry>> {
        let _gate = self.inner.gate.read();
        Ok(self
            .list(prefix)?
            .into_iter()
            .map(|(key, meta)| KeyEntry {
                key,
                size: meta.size,
                expires_at: meta.expires_at,
            })
            .collect())
    }

    fn purge_expired(&self, now: Timestamp) -> Result<usize> {
        let _state = self.lock_writer()?;
        let expired: Vec<Change> = {
            let _gate = self.inner.gate.read();
            self.list("")?
                .into_iter()
                .filter(|(_, meta)| !meta.is_live(now))
                .map(|(key, _)| Change { key, bytes: None })
                .collect()
        };
        if !expired.is_empty() {
            // Each removal is atomic on its own; a purge need not be all or nothing.
            self.inner
                .dir
                .apply(&expired, &self.inner.gate, usize::MAX)
                .map_err(|e| e.error)?;
        }
        Ok(expired.len())
    }

    fn clear(&self) -> Result<()> {
        let mut state = self.inner.writer.lock();
        let dir = &self.inner.dir;
        {
            let _gate = self.inner.gate.write();
            // A pending batch must not come back after the clear.
            dir.remove_file_if_exists(JOURNAL_FILE)?;
            state.journal_pending = false;
            for name in dir.entry_names()? {
                if parse_name(&name).is_some() {
                    dir.remove_file_if_exists(&name)?;
                }
            }
        }
        dir.sync()
    }

    fn available_space(&self) -> Option<u64> {
        fs4::available_space(&self.inner.dir.root).ok()
    }

    fn health_check(&self) -> Result<()> {
        let root = &self.inner.dir.root;
        let meta = fs::metadata(root).map_err(|e| {
            StorageError::io(
                format!("checking the storage directory {}", root.display()),
                e,
            )
        })?;
        if meta.is_dir() {
            Ok(())
        } else {
            Err(StorageError::unavailable(
                BACKEND,
                format!("{} is no longer a directory", root.display()),
            ))
        }
    }
}

/// Adds to an I/O error that the journaled batch will still be completed.
fn journal_note(error: StorageError) -> StorageError {
    match error {
        StorageError::Io { context, source } => StorageError::Io {
            context: format!(
                "{context}; the batch is in the journal and will be completed before the next \
                 change or when the directory is opened again"
            ),
            source,
        },
        other => other,
    }
}

// ---------------------------------------------------------------------------------------------
// Names
// ---------------------------------------------------------------------------------------------

/// Where a key's record lives.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Place {
    /// Under this direct name.
    Direct(String),
    /// In the hashed chain whose slot names are this base followed by the slot number.
    Chain(String),
}

/// A data-file name, decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
enum ParsedName {
    /// A direct name and the key it encodes.
    Direct(String),
    /// A hashed name: the decoded bytes of its hint and its chain base.
    Hashed { hint: Vec<u8>, base: String },
}

/// Bytes that stand for themselves in a file name.
fn is_plain(b: u8) -> bool {
    b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-'
}

fn push_encoded(out: &mut String, b: u8) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    if is_plain(b) {
        out.push(char::from(b));
    } else {
        out.push('%');
        out.push(char::from(HEX[usize::from(b >> 4)]));
        out.push(char::from(HEX[usize::from(b & 0xf)]));
    }
}

fn hex_value(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    }
}

/// Decodes an encoded key (or hint); `None` unless it is in the one canonical encoding.
fn decode(s: &str) -> Option<Vec<u8>> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let byte = hex_value(*b.get(i + 1)?)? << 4 | hex_value(*b.get(i + 2)?)?;
            if is_plain(byte) {
                return None;
            }
            out.push(byte);
            i += 3;
        } else if is_plain(b[i]) {
            out.push(b[i]);
            i += 1;
        } else {
            return None;
        }
    }
    Some(out)
}

/// FNV-1a, 64 bits: fixed constants, so the same on every platform and Rust version.
fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}

/// Where `key`'s record lives (see the module docs).
fn place_of(key: &str) -> Place {
    let mut name = String::with_capacity(DIRECT_PREFIX.len() + key.len());
    name.push_str(DIRECT_PREFIX);
    for &b in key.as_bytes() {
        push_encoded(&mut name, b);
        if name.len() > MAX_DIRECT_NAME {
            return Place::Chain(chain_base(key));
        }
    }
    Place::Direct(name)
}

/// `l-<hint>-<hash>-` for a key too long for a direct name.
fn chain_base(key: &str) -> String {
    let mut name = String::from(HASHED_PREFIX);
    for &b in key.as_bytes() {
        let width = if is_plain(b) { 1 } else { 3 };
        if name.len() - HASHED_PREFIX.len() + width > HINT_LEN {
            break;
        }
        push_encoded(&mut name, b);
    }
    let bytes = key.as_bytes();
    name.push_str(&format!(
        "-{:016x}{:08x}-",
        fnv1a64(bytes),
        crc32fast::hash(bytes)
    ));
    name
}

fn slot_name(base: &str, slot: u32) -> String {
    format!("{base}{slot}")
}

/// Decodes a file name of the root; `None` for anything that is not a data-file name.
fn parse_name(name: &str) -> Option<ParsedName> {
    if let Some(encoded) = name.strip_prefix(DIRECT_PREFIX) {
        if name.len() > MAX_DIRECT_NAME {
            return None;
        }
        let key = String::from_utf8(decode(encoded)?).ok()?;
        return Some(ParsedName::Direct(key));
    }
    let rest = name.strip_prefix(HASHED_PREFIX)?;
    let (front, slot) = rest.rsplit_once('-')?;
    let canonical_slot = !slot.is_empty()
        && slot.bytes().all(|b| b.is_ascii_digit())
        && (slot == "0" || !slot.starts_with('0'));
    if !canonical_slot || slot.parse::<u32>().ok()? >= MAX_SLOTS {
        return None;
    }
    let (hint, hash) = front.rsplit_once('-')?;
    if hash.len() != HASH_HEX_LEN || !hash.bytes().all(|b| hex_value(b).is_some()) {
        return None;
    }
    if hint.len() > HINT_LEN {
        return None;
    }
    let hint = decode(hint)?;
    Some(ParsedName::Hashed {
        hint,
        base: name[..name.len() - slot.len()].to_owned(),
    })
}

// ---------------------------------------------------------------------------------------------
// Record files
// ---------------------------------------------------------------------------------------------

#[derive(Serialize)]
struct HeaderRef<'a> {
    key: &'a str,
    meta: &'a RecordMeta,
}

#[derive(Deserialize)]
struct HeaderOwned {
    key: String,
    meta: RecordMeta,
}

/// The part of a header a load needs: the key, to check the file is this key's, and the
/// expiry. The other fields are passed over without being built (no custom metadata map).
#[derive(Deserialize)]
struct HeaderForLoad {
    key: String,
    meta: ExpiryOnly,
}

#[derive(Deserialize)]
struct ExpiryOnly {
    expires_at: Option<Timestamp>,
}

/// The key of a header alone.
#[derive(Deserialize)]
struct HeaderKey {
    key: String,
}

/// What is wrong with a file that has a data-file name.
#[derive(Debug)]
enum Damage {
    Corrupt(String),
    NewerVersion(u8),
}

impl Damage {
    fn into_error(self, key: &str, path: &Path) -> StorageError {
        match self {
            Damage::Corrupt(reason) => {
                StorageError::corrupt(key, format!("{reason} (file {})", path.display()))
            }
            Damage::NewerVersion(found) => StorageError::UnsupportedVersion {
                key: key.to_owned(),
                found,
                supported: RECORD_VERSION,
            },
        }
    }
}

/// The result of reading one data file.
enum Loaded<T> {
    Missing,
    Damaged(Damage),
    /// The key stored in the file, and what was read.
    Found(String, T),
}

/// The result of looking a key up.
enum Lookup<T> {
    Absent,
    Damaged(StorageError),
    Found(T),
}

impl<T> Lookup<T> {
    fn into_result(self) -> Result<Option<T>> {
        match self {
            Lookup::Absent => Ok(None),
            Lookup::Damaged(error) => Err(error),
            Lookup::Found(value) => Ok(Some(value)),
        }
    }

    /// The value, treating a damaged file as absent (for writes, which replace it).
    fn found(self) -> Option<T> {
        match self {
            Lookup::Found(value) => Some(value),
            Lookup::Absent | Lookup::Damaged(_) => None,
        }
    }
}

/// The fixed first 48 bytes of a record file, decoded.
struct Fixed {
    header_len: usize,
    value_len: u64,
    value_crc: u32,
    header_crc: u32,
    accessed_at: Option<Timestamp>,
}

impl Fixed {
    fn total_len(&self) -> u64 {
        // Saturating: a damaged length field near u64::MAX must read as damage, not overflow.
        ((FIXED_LEN + self.header_len) as u64).saturating_add(self.value_len)
    }
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// The 12 bytes of the access-time slot.
fn touch_slot(at: Timestamp) -> [u8; 12] {
    let mut slot = [0; 12];
    slot[..8].copy_from_slice(&at.0.to_le_bytes());
    let crc = crc32fast::hash(&slot[..8]);
    slot[8..].copy_from_slice(&crc.to_le_bytes());
    slot
}

/// The complete bytes of a record file.
fn encode_record(key: &str, record: &Record) -> Result<Vec<u8>> {
    let header = serde_json::to_vec(&HeaderRef {
        key,
        meta: &record.meta,
    })
    .map_err(|e| StorageError::Serialize {
        key: key.to_owned(),
        message: format!("record metadata: {e}"),
    })?;
    let header_len = u32::try_from(header.len()).map_err(|_| StorageError::Serialize {
        key: key.to_owned(),
        message: "record metadata is larger than 4 GiB".to_owned(),
    })?;
    let mut buf = Vec::with_capacity(FIXED_LEN + header.len() + record.value.len());
    buf.extend_from_slice(&RECORD_MAGIC);
    buf.push(RECORD_VERSION);
    buf.extend_from_slice(&[0; 3]);
    buf.extend_from_slice(&header_len.to_le_bytes());
    buf.extend_from_slice(&crc32fast::hash(&record.value).to_le_bytes());
    buf.extend_from_slice(&(record.value.len() as u64).to_le_bytes());
    let mut crc = crc32fast::Hasher::new();
    crc.update(&buf[..24]);
    crc.update(&header);
    buf.extend_from_slice(&crc.finalize().to_le_bytes());
    buf.extend_from_slice(&[0; 4]);
    buf.extend_from_slice(&touch_slot(record.meta.accessed_at));
    buf.extend_from_slice(&[0; 4]);
    debug_assert_eq!(buf.len(), FIXED_LEN);
    buf.extend_from_slice(&header);
    buf.extend_from_slice(&record.value);
    Ok(buf)
}

fn parse_fixed(b: &[u8; FIXED_LEN]) -> std::result::Result<Fixed, Damage> {
    if b[..4] != RECORD_MAGIC {
        return Err(Damage::Corrupt(
            "not a bevy_storage record file (wrong magic bytes)".to_owned(),
        ));
    }
    match b[4] {
        RECORD_VERSION => {}
        0 => return Err(Damage::Corrupt("format version 0 is invalid".to_owned())),
        v => return Err(Damage::NewerVersion(v)),
    }
    let stamp = &b[32..40];
    let accessed_at = (u32_at(b, 40) == crc32fast::hash(stamp))
        .then(|| Timestamp(i64::from_le_bytes(stamp.try_into().expect("8 bytes"))));
    Ok(Fixed {
        header_len: u32_at(b, 8) as usize,
        value_crc: u32_at(b, 12),
        value_len: u64_at(b, 16),
        header_crc: u32_at(b, 24),
        accessed_at,
    })
}

fn length_damage(fixed: &Fixed, actual: u64) -> Option<Damage> {
    let expected = fixed.total_len();
    (expected != actual).then(|| {
        Damage::Corrupt(format!(
            "truncated or overlong: the header announces {expected} bytes but the file has {actual}"
        ))
    })
}

/// Checks the header's checksum and reads it as `H` (all of it, or the part a reader needs).
fn parse_header<H: DeserializeOwned>(
    fixed_bytes: &[u8; FIXED_LEN],
    fixed: &Fixed,
    header: &[u8],
) -> std::result::Result<H, Damage> {
    let mut crc = crc32fast::Hasher::new();
    crc.update(&fixed_bytes[..24]);
    crc.update(header);
    if crc.finalize() != fixed.header_crc {
        return Err(Damage::Corrupt("header checksum mismatch".to_owned()));
    }
    serde_json::from_slice(header).map_err(|e| Damage::Corrupt(format!("unreadable header: {e}")))
}

/// The key and metadata of a whole header, with the access time the fixed part holds when it
/// is newer (see `touch`).
fn full_header(fixed: &Fixed, header: HeaderOwned) -> (String, RecordMeta) {
    let HeaderOwned { key, mut meta } = header;
    if let Some(at) = fixed.accessed_at {
        meta.accessed_at = at;
    }
    (key, meta)
}

fn too_short(len: u64) -> Damage {
    Damage::Corrupt(format!(
        "truncated: {len} bytes, shorter than the {FIXED_LEN}-byte file header"
    ))
}

/// Checks a whole record file (its lengths and both checksums) and reads its header as `H`;
/// returns the header, the fixed part and where the value starts.
fn parse_record<H: DeserializeOwned>(
    bytes: &[u8],
) -> std::result::Result<(H, Fixed, usize), Damage> {
    let fixed_bytes: &[u8; FIXED_LEN] = bytes
        .get(..FIXED_LEN)
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| too_short(bytes.len() as u64))?;
    let fixed = parse_fixed(fixed_bytes)?;
    if let Some(damage) = length_damage(&fixed, bytes.len() as u64) {
        return Err(damage);
    }
    let value_start = FIXED_LEN + fixed.header_len;
    let header = parse_header(fixed_bytes, &fixed, &bytes[FIXED_LEN..value_start])?;
    if crc32fast::hash(&bytes[value_start..]) != fixed.value_crc {
        return Err(Damage::Corrupt("value checksum mismatch".to_owned()));
    }
    Ok((header, fixed, value_start))
}

fn read_error(path: &Path, e: io::Error) -> StorageError {
    StorageError::io(format!("reading the record file {}", path.display()), e)
}

/// Reads and checks a whole record file, reading its header as `H`; `found` makes the key and
/// the result from the header, the fixed part and the value (the file's own buffer, without
/// what precedes the value).
fn load_whole<H: DeserializeOwned, T>(
    path: &Path,
    found: impl FnOnce(H, &Fixed, Vec<u8>) -> (String, T),
) -> Result<Loaded<T>> {
    match fs::read(path) {
        Ok(mut bytes) => Ok(match parse_record::<H>(&bytes) {
            Ok((header, fixed, value_start)) => {
                bytes.drain(..value_start);
                let (key, result) = found(header, &fixed, bytes);
                Loaded::Found(key, result)
            }
            Err(damage) => Loaded::Damaged(damage),
        }),
        Err(e) => unreadable(path, e),
    }
}

/// Reads and checks a whole record file.
fn load_record(path: &Path) -> Result<Loaded<Record>> {
    load_whole(path, |header: HeaderOwned, fixed, value| {
        let (key, meta) = full_header(fixed, header);
        (key, Record { value, meta })
    })
}

/// Reads and checks a whole record file, for its value and expiry.
fn load_value(path: &Path) -> Result<Loaded<(Vec<u8>, Option<Timestamp>)>> {
    load_whole(path, |header: HeaderForLoad, _, value| {
        (header.key, (value, header.meta.expires_at))
    })
}

/// A file that cannot be read: missing, a directory under a data-file name, or an I/O error.
fn unreadable<T>(path: &Path, e: io::Error) -> Result<Loaded<T>> {
    if e.kind() == io::ErrorKind::NotFound {
        Ok(Loaded::Missing)
    } else if path.is_dir() {
        Ok(Loaded::Damaged(Damage::Corrupt(
            "a directory, not a record file".to_owned(),
        )))
    } else {
        Err(read_error(path, e))
    }
}

/// Reads and checks the key and metadata of a record file, without reading its value.
fn load_header(path: &Path) -> Result<Loaded<RecordMeta>> {
    match File::open(path) {
        Ok(mut file) => read_header_from(&mut file, path),
        Err(e) => unreadable(path, e),
    }
}

fn read_header_from(file: &mut File, path: &Path) -> Result<Loaded<RecordMeta>> {
    let meta = file.metadata().map_err(|e| read_error(path, e))?;
    if meta.is_dir() {
        return unreadable(path, io::Error::other("is a directory"));
    }
    let len = meta.len();
    if len < FIXED_LEN as u64 {
        return Ok(Loaded::Damaged(too_short(len)));
    }
    let mut fixed_bytes = [0; FIXED_LEN];
    file.seek(SeekFrom::Start(0))
        .and_then(|_| file.read_exact(&mut fixed_bytes))
        .map_err(|e| read_error(path, e))?;
    let fixed = match parse_fixed(&fixed_bytes) {
        Ok(fixed) => fixed,
        Err(damage) => return Ok(Loaded::Damaged(damage)),
    };
    if let Some(damage) = length_damage(&fixed, len) {
        return Ok(Loaded::Damaged(damage));
    }
    let mut header = vec![0; fixed.header_len];
    file.read_exact(&mut header)
        .map_err(|e| read_error(path, e))?;
    Ok(match parse_header(&fixed_bytes, &fixed, &header) {
        Ok(header) => {
            let (key, meta) = full_header(&fixed, header);
            Loaded::Found(key, meta)
        }
        Err(damage) => Loaded::Damaged(damage),
    })
}

// ---------------------------------------------------------------------------------------------
// Journal
// ---------------------------------------------------------------------------------------------

/// The final state of one key after a batch: the complete record file, or `None` (deleted).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Change {
    key: String,
    bytes: Option<Vec<u8>>,
}

/// `magic, version, 3 zero bytes, payload length (u64 LE), payload CRC-32, 4 zero bytes,
/// payload` where the payload is the postcard encoding of the changes.
fn encode_journal(changes: &[Change]) -> Result<Vec<u8>> {
    let payload = postcard::to_stdvec(changes)
        .map_err(|e| StorageError::backend(BACKEND, format!("encoding the journal: {e}")))?;
    let mut buf = Vec::with_capacity(JOURNAL_FIXED_LEN + payload.len());
    buf.extend_from_slice(&JOURNAL_MAGIC);
    buf.push(JOURNAL_VERSION);
    buf.extend_from_slice(&[0; 3]);
    buf.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    buf.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
    buf.extend_from_slice(&[0; 4]);
    buf.extend_from_slice(&payload);
    Ok(buf)
}

enum JournalDamage {
    Invalid,
    NewerVersion(u8),
}

fn parse_journal(bytes: &[u8]) -> std::result::Result<Vec<Change>, JournalDamage> {
    if bytes.len() < JOURNAL_FIXED_LEN || bytes[..4] != JOURNAL_MAGIC {
        return Err(JournalDamage::Invalid);
    }
    match bytes[4] {
        JOURNAL_VERSION => {}
        0 => return Err(JournalDamage::Invalid),
        v => return Err(JournalDamage::NewerVersion(v)),
    }
    let payload = &bytes[JOURNAL_FIXED_LEN..];
    if u64_at(bytes, 8) != payload.len() as u64 || u32_at(bytes, 16) != crc32fast::hash(payload) {
        return Err(JournalDamage::Invalid);
    }
    let changes: Vec<Change> = postcard::from_bytes(payload).map_err(|_| JournalDamage::Invalid)?;
    // Every record must be intact and belong to its key.
    let valid = changes.iter().all(|change| match &change.bytes {
        Some(bytes) => {
            parse_record::<HeaderKey>(bytes).is_ok_and(|(header, ..)| header.key == change.key)
        }
        None => true,
    });
    if valid {
        Ok(changes)
    } else {
        Err(JournalDamage::Invalid)
    }
}

// ---------------------------------------------------------------------------------------------
// The directory
// ---------------------------------------------------------------------------------------------

/// A failed [`Dir::apply`]: the error, and whether any rename or remove had happened.
struct ApplyError {
    error: StorageError,
    started: bool,
}

/// A hashed chain, as found by [`Dir::probe`].
struct Chain {
    /// The slot holding the key.
    found: Option<u32>,
    /// The number of slots (the first missing one); only exact for a full probe.
    len: u32,
    /// The first damaged file met.
    damaged: Option<(PathBuf, Damage)>,
}

/// File-system operations on the root directory.
struct Dir {
    root: PathBuf,
}

impl Dir {
    fn path(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }

    /// `fsync`s the directory so that renames and removes in it are durable.
    fn sync(&self) -> Result<()> {
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

    /// The UTF-8 names of the entries of the root.
    fn entry_names(&self) -> Result<Vec<String>> {
        let context = || format!("listing the storage directory {}", self.root.display());
        let mut names = Vec::new();
        for entry in fs::read_dir(&self.root).map_err(|e| StorageError::io(context(), e))? {
            let entry = entry.map_err(|e| StorageError::io(context(), e))?;
            // Sub-directories are never ours (the backend creates none).
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            if let Ok(name) = entry.file_name().into_string() {
                names.push(name);
            }
        }
        Ok(names)
    }

    fn remove_file_if_exists(&self, name: &str) -> Result<()> {
        let path = self.path(name);
        match fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(StorageError::io(format!("removing {}", path.display()), e)),
        }
    }

    /// Removes the `.tmp-*` files a crash left behind.
    fn remove_temp_files(&self) -> Result<()> {
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
    fn write_temp(&self, bytes: &[u8]) -> Result<PathBuf> {
        let mut attempts = 0;
        loop {
            let path = self.path(&format!("{TEMP_PREFIX}{:016x}", random_u64()));
            let context = || format!("writing the temporary file {}", path.display());
            match OpenOptions::new().write(true).create_new(true).open(&path) {
                Ok(mut file) => {
                    return match file.write_all(bytes).and_then(|()| file.sync_all()) {
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

    fn rename(&self, from: &Path, to: &Path) -> Result<()> {
        fs::rename(from, to).map_err(|e| {
            StorageError::io(
                format!("renaming {} to {}", from.display(), to.display()),
                e,
            )
        })
    }

    /// Walks the hashed chain `base` looking for `key`. With `full`, goes on to its end.
    fn probe(&self, base: &str, key: &str, full: bool) -> Result<Chain> {
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
    fn apply(
        &self,
        changes: &[Change],
        gate: &RwLock<()>,
        limit: usize,
    ) -> std::result::Result<(), ApplyError> {
        let mut temps: Vec<Option<PathBuf>> = Vec::with_capacity(changes.len());
        for change in changes {
            match &change.bytes {
                Some(bytes) => match self.write_temp(bytes) {
                    Ok(path) => temps.push(Some(path)),
                    Err(error) => {
                        remove_temps(&temps);
                        return Err(ApplyError {
                            error,
                            started: false,
                        });
                    }
                },
                None => temps.push(None),
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
        self.sync().map_err(|error| ApplyError {
            error,
            started: true,
        })
    }

    /// Makes `journal` durable as `<root>/.journal`.
    fn write_journal(&self, journal: &[u8]) -> Result<()> {
        let tmp = self.write_temp(journal)?;
        if let Err(error) = self.rename(&tmp, &self.path(JOURNAL_FILE)) {
            let _ = fs::remove_file(&tmp);
            return Err(error);
        }
        self.sync()
    }

    fn remove_journal(&self) -> Result<()> {
        self.remove_file_if_exists(JOURNAL_FILE)?;
        self.sync()
    }

    /// Rolls a valid journal forward, discards an invalid one; nothing if there is none.
    fn recover_journal(&self, gate: &RwLock<()>) -> Result<()> {
        let path = self.path(JOURNAL_FILE);
        let bytes = match fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => {
                return Err(StorageError::io(
                    format!("reading the journal {}", path.display()),
                    e,
                ));
            }
        };
        match parse_journal(&bytes) {
            Ok(changes) => self
                .apply(&changes, gate, usize::MAX)
                .map_err(|e| e.error)?,
            // Torn or garbage: the batch never reached its commit point, nothing was applied.
            Err(JournalDamage::Invalid) => {}
            Err(JournalDamage::NewerVersion(v)) => {
                return Err(StorageError::backend(
                    BACKEND,
                    format!(
                        "{} holds an unfinished batch in journal format {v}, newer than the \
                         {JOURNAL_VERSION} this build reads; open the directory with a newer \
                         version of bevy_storage to finish it",
                        path.display()
                    ),
                ));
            }
        }
        self.remove_journal()
    }
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
    use std::sync::atomic::Ordering;

    use super::*;
    use crate::backend::MemoryBackend;

    const NOW: Timestamp = Timestamp(1_000_000);

    fn record(value: &[u8], at: i64, expires_at: Option<i64>) -> Record {
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
            },
        }
    }

    fn put(key: &str, value: &[u8], at: i64) -> WriteOp {
        WriteOp::Put {
            key: key.to_owned(),
            record: record(value, at, None),
            mode: PutMode::Upsert,
        }
    }

    fn put_expiring(key: &str, value: &[u8], at: i64, expires_at: i64) -> WriteOp {
        WriteOp::Put {
            key: key.to_owned(),
            record: record(value, at, Some(expires_at)),
            mode: PutMode::Upsert,
        }
    }

    fn create(key: &str, value: &[u8], at: i64) -> WriteOp {
        WriteOp::Put {
            key: key.to_owned(),
            record: record(value, at, None),
            mode: PutMode::CreateOnly,
        }
    }

    fn del(key: &str) -> WriteOp {
        WriteOp::Delete {
            key: key.to_owned(),
        }
    }

    /// A backend in `<tempdir>/store`, so tests can check that nothing appears beside it.
    fn setup() -> (tempfile::TempDir, FileBackend) {
        let tmp = tempfile::tempdir().unwrap();
        let backend = FileBackend::open(tmp.path().join("store")).unwrap();
        (tmp, backend)
    }

    fn value_of(b: &FileBackend, key: &str) -> Option<Vec<u8>> {
        b.get(key).unwrap().map(|r| r.value)
    }

    fn listed_keys(b: &FileBackend, prefix: &str) -> Vec<String> {
        b.scan(prefix).unwrap().into_iter().map(|e| e.key).collect()
    }

    fn names_in(dir: &Path) -> BTreeSet<String> {
        fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect()
    }

    /// Deterministic garbage.
    fn noise(len: usize, seed: u64) -> Vec<u8> {
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

    fn hostile_keys() -> Vec<String> {
        let mut keys: Vec<String> = [
            "../../etc/passwd",
            "a/b",
            "/abs",
            "C:\\x",
            "\\\\server\\share",
            "..",
            ".",
            "...",
            "%",
            "%25",
            "%2e",
            "k-x",
            "l-x-000000000000000000000000-0",
            ".lock",
            ".journal",
            ".tmp-0000000000000000",
            "CON",
            "con",
            "NUL",
            "nul.txt",
            "COM1",
            "LPT9",
            "aux",
            "trailing.",
            "trailing ",
            " leading",
            "a b",
            "*?<>|\":",
            "名前",
            "é",
            "e\u{301}",
            "\u{1}bevy_storage/meta",
            "💾 save",
            "Player",
            "player",
            "PLAYER",
            "/",
            "\\",
            "\u{202e}rtl",
            "",
            "-",
            "_",
            "0",
        ]
        .iter()
        .map(|k| (*k).to_owned())
        .collect();
        keys.push("é".repeat(256));
        keys.push("名".repeat(170) + "ab");
        keys.push("a".repeat(512));
        keys.push("A".repeat(512));
        keys.push("/".repeat(512));
        keys.push("../".repeat(170));
        keys.push("a".repeat(198));
        keys.push("a".repeat(199));
        keys.push("\u{1}bevy_storage/".to_owned() + &"x".repeat(400));
        keys
    }

    fn assert_safe_name(name: &str) {
        assert!(name.len() <= 255, "{name} is too long");
        assert!(name != "." && name != "..");
        assert!(name.starts_with(DIRECT_PREFIX) || name.starts_with(HASHED_PREFIX));
        assert!(
            name.bytes().all(|b| is_plain(b) || b == b'%'),
            "{name:?} has a character outside [a-z0-9_%-]"
        );
    }

    #[test]
    fn round_trip_and_persistence() {
        let (_tmp, b) = setup();
        assert_eq!(b.backend_type(), "file");
        assert_eq!(b.get("player:1").unwrap(), None);
        let mut rec = record(b"hello", 10, Some(99_999_999));
        rec.meta.compressed = true;
        rec.meta
            .custom
            .insert("level".into(), serde_json::json!("forest"));
        let out = b
            .write(
                vec![WriteOp::Put {
                    key: "player:1".into(),
                    record: rec.clone(),
                    mode: PutMode::Upsert,
                }],
                NOW,
            )
            .unwrap();
        assert_eq!(
            out,
            vec![WriteOutcome {
                previous_size: None
            }]
        );
        assert_eq!(b.get("player:1").unwrap(), Some(rec.clone()));
        assert_eq!(b.get_meta("player:1").unwrap(), Some(rec.meta.clone()));
        assert_eq!(
            b.scan("player:").unwrap(),
            vec![KeyEntry {
                key: "player:1".into(),
                size: 5,
                expires_at: Some(Timestamp(99_999_999)),
            }]
        );
        let root = b.root().to_owned();
        drop(b);
        let b = FileBackend::open(&root).unwrap();
        assert_eq!(b.get("player:1").unwrap(), Some(rec));
        assert_eq!(
            b.write(vec![del("player:1")], NOW).unwrap(),
            vec![WriteOutcome {
                previous_size: Some(5)
            }]
        );
        assert_eq!(b.get("player:1").unwrap(), None);
        assert_eq!(b.write(vec![], NOW).unwrap(), vec![]);
        assert!(b.available_space().is_some());
        b.health_check().unwrap();
    }

    #[test]
    fn name_mapping_round_trips_hostile_keys() {
        let mut names = BTreeSet::new();
        for key in hostile_keys() {
            let name = match place_of(&key) {
                Place::Direct(name) => {
                    assert_eq!(parse_name(&name), Some(ParsedName::Direct(key.clone())));
                    name
                }
                Place::Chain(base) => {
                    assert!(key.len() > 60, "{key:?} should have had a direct name");
                    let name = slot_name(&base, 0);
                    match parse_name(&name) {
                        Some(ParsedName::Hashed { hint, base: parsed }) => {
                            assert_eq!(parsed, base);
                            assert!(key.as_bytes().starts_with(&hint));
                        }
                        other => panic!("{name} parsed as {other:?}"),
                    }
                    name
                }
            };
            assert_safe_name(&name);
            assert!(names.insert(name.clone()), "{name} used twice");
        }
        // Names that are not canonical are not data-file names.
        let hash = "0".repeat(HASH_HEX_LEN);
        for foreign in [
            "k-%61",
            "k-A",
            "k-%2E",
            "k-%2",
            "k-a/b",
            "k-a.b",
            "k-%ff",
            "K-abc",
            "kabc",
            "l-abc-0-0",
            &format!("l-abc-{hash}-01"),
            &format!("l-abc-{hash}-"),
            &format!("l-abc-{hash}-9999"),
            &format!("l-A-{hash}-0"),
            ".lock",
            ".journal",
            ".tmp-0123",
        ] {
            assert_eq!(parse_name(foreign), None, "{foreign}");
        }
        assert_eq!(
            parse_name(&format!("l-abc-{hash}-12")),
            Some(ParsedName::Hashed {
                hint: b"abc".to_vec(),
                base: format!("l-abc-{hash}-"),
            })
        );
    }

    #[test]
    fn hostile_keys_stay_inside_the_root() {
        let (tmp, b) = setup();
        let keys = hostile_keys();
        // One batch (through the journal) and one write per key.
        let ops = keys
            .iter()
            .map(|k| put(k, k.as_bytes(), 1))
            .collect::<Vec<_>>();
        b.write(ops, NOW).unwrap();
        for key in &keys {
            b.write(vec![put(key, format!("v2 {key}").as_bytes(), 2)], NOW)
                .unwrap();
        }
        for key in &keys {
            let rec = b
                .get(key)
                .unwrap()
                .unwrap_or_else(|| panic!("{key:?} lost"));
            assert_eq!(rec.value, format!("v2 {key}").as_bytes());
            assert_eq!(rec.meta.created_at, Timestamp(1), "{key:?}");
            let path = b.path_of(key).unwrap().unwrap();
            assert_eq!(path.parent().unwrap(), b.root());
            assert_safe_name(path.file_name().unwrap().to_str().unwrap());
        }
        let expected: BTreeSet<String> = keys.iter().cloned().collect();
        assert_eq!(
            listed_keys(&b, "").into_iter().collect::<BTreeSet<_>>(),
            expected
        );
        let dotted: BTreeSet<String> = keys
            .iter()
            .filter(|k| k.starts_with("../"))
            .cloned()
            .collect();
        assert_eq!(
            listed_keys(&b, "../").into_iter().collect::<BTreeSet<_>>(),
            dotted
        );
        // Nothing appeared next to the root, and nothing but data files and the lock inside it.
        assert_eq!(names_in(tmp.path()), BTreeSet::from(["store".to_owned()]));
        for name in names_in(b.root()) {
            let path = b.root().join(&name);
            assert!(path.is_file(), "{name} is not a plain file");
            assert!(name == LOCK_FILE || parse_name(&name).is_some(), "{name}");
        }
        assert_eq!(names_in(b.root()).len(), keys.len() + 1);
        for key in &keys {
            b.write(vec![del(key)], NOW).unwrap();
        }
        assert_eq!(names_in(b.root()), BTreeSet::from([LOCK_FILE.to_owned()]));
    }

    #[test]
    fn case_distinct_keys_are_distinct_files() {
        let (_tmp, b) = setup();
        let variants = ["Player", "player", "PLAYER", "pLaYeR"];
        b.write(
            variants.iter().map(|k| put(k, k.as_bytes(), 1)).collect(),
            NOW,
        )
        .unwrap();
        let lowered: BTreeSet<String> = variants
            .iter()
            .map(|k| {
                let path = b.path_of(k).unwrap().unwrap();
                path.file_name().unwrap().to_str().unwrap().to_lowercase()
            })
            .collect();
        assert_eq!(lowered.len(), variants.len(), "names collide ignoring case");
        for k in variants {
            assert_eq!(value_of(&b, k).unwrap(), k.as_bytes());
        }
    }

    #[test]
    fn long_multibyte_keys() {
        let (_tmp, b) = setup();
        let base = "é".repeat(255);
        let k1 = base.clone() + "a"; // 511 bytes
        let k2 = base.clone() + "b"; // same hint, other hash
        let k3 = "名".repeat(170) + "ab"; // 512 bytes
        for k in [&k1, &k2, &k3] {
            assert!(matches!(place_of(k), Place::Chain(_)));
        }
        b.write(vec![put(&k1, b"1", 1), put(&k2, b"2", 1)], NOW)
            .unwrap();
        b.write(vec![put(&k3, b"3", 1)], NOW).unwrap();
        assert_eq!(value_of(&b, &k1).unwrap(), b"1");
        assert_eq!(value_of(&b, &k2).unwrap(), b"2");
        assert_eq!(value_of(&b, &k3).unwrap(), b"3");
        let p1 = b.path_of(&k1).unwrap().unwrap();
        let p2 = b.path_of(&k2).unwrap().unwrap();
        assert_ne!(p1, p2);
        for p in [&p1, &p2] {
            assert!(p.file_name().unwrap().len() <= 255);
        }
        let mut listed = listed_keys(&b, &"é".repeat(10));
        listed.sort();
        assert_eq!(listed, vec![k1.clone(), k2.clone()]);
        assert_eq!(listed_keys(&b, &k2), vec![k2.clone()]);
        assert_eq!(listed_keys(&b, "名"), vec![k3.clone()]);
        assert_eq!(listed_keys(&b, "x"), Vec::<String>::new());
        b.write(vec![del(&k1)], NOW).unwrap();
        assert_eq!(b.get(&k1).unwrap(), None);
        assert_eq!(value_of(&b, &k2).unwrap(), b"2");
    }

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
    fn garbage_files_are_ignored_or_reported() {
        let (_tmp, b) = setup();
        b.write(vec![put("good", b"fine", 1), put("other", b"ok", 1)], NOW)
            .unwrap();
        let root = b.root().to_owned();
        fs::write(root.join("k-garbage"), noise(300, 1)).unwrap();
        fs::write(root.join("k-empty"), b"").unwrap();
        fs::write(root.join("notes.txt"), noise(100, 2)).unwrap();
        fs::write(root.join("K-UPPER"), noise(100, 3)).unwrap();
        fs::write(root.join("k-%zz"), noise(100, 4)).unwrap();
        fs::write(
            root.join(format!("l-zz-{}-0", "0".repeat(24))),
            noise(64, 5),
        )
        .unwrap();
        fs::create_dir(root.join("k-subdir")).unwrap();
        fs::create_dir(root.join("saves")).unwrap();
        // A valid record of "good" under another key's name.
        fs::copy(b.path_of("good").unwrap().unwrap(), root.join("k-copied")).unwrap();

        for key in ["garbage", "empty", "subdir", "copied"] {
            match b.get(key) {
                Err(StorageError::Corrupt { key: k, reason }) => {
                    assert_eq!(k, key);
                    assert!(reason.contains(&format!("k-{key}")), "{reason}");
                }
                other => panic!("{key}: {other:?}"),
            }
            assert!(matches!(b.get_meta(key), Err(StorageError::Corrupt { .. })));
            assert!(matches!(
                b.get_value(key),
                Err(StorageError::Corrupt { .. })
            ));
        }
        assert_eq!(
            listed_keys(&b, ""),
            vec!["good".to_owned(), "other".to_owned()]
        );
        assert_eq!(value_of(&b, "good").unwrap(), b"fine");
        assert_eq!(b.usage(NOW).unwrap().item_count, 2);
        assert_eq!(b.purge_expired(NOW).unwrap(), 0);

        // Writing the key again repairs it; deleting removes the damaged file.
        b.write(vec![put("garbage", b"new", 1), del("empty")], NOW)
            .unwrap();
        assert_eq!(value_of(&b, "garbage").unwrap(), b"new");
        assert!(!root.join("k-empty").exists());

        b.clear().unwrap();
        assert_eq!(listed_keys(&b, ""), Vec::<String>::new());
        let left = names_in(&root);
        for name in [
            LOCK_FILE,
            "notes.txt",
            "K-UPPER",
            "k-%zz",
            "k-subdir",
            "saves",
        ] {
            assert!(left.contains(name), "clear removed {name}");
        }
        assert!(!left.contains("k-garbage") && !left.contains("k-copied"));
    }

    #[test]
    fn damaged_record_files_are_corrupt() {
        let (_tmp, b) = setup();
        b.write(vec![put("t", &noise(100, 9), 1), put("u", b"fine", 1)], NOW)
            .unwrap();
        let path = b.path_of("t").unwrap().unwrap();
        let original = fs::read(&path).unwrap();
        let len = original.len();
        let header_end = len - 100;
        let damages: Vec<(&str, Vec<u8>)> = vec![
            ("empty", vec![]),
            ("10 bytes", original[..10].to_vec()),
            ("47 bytes", original[..47].to_vec()),
            ("fixed part only", original[..48].to_vec()),
            ("header cut", original[..header_end - 3].to_vec()),
            ("last byte missing", original[..len - 1].to_vec()),
            ("one byte more", [&original[..], b"x"].concat()),
            ("bad magic", {
                let mut d = original.clone();
                d[0] ^= 0xff;
                d
            }),
            ("header bit flip", {
                let mut d = original.clone();
                d[60] ^= 0x04;
                d
            }),
            ("length field flip", {
                let mut d = original.clone();
                d[16] ^= 0x01;
                d
            }),
            ("value bit flip", {
                let mut d = original.clone();
                d[len - 5] ^= 0x10;
                d
            }),
        ];
        for (what, bytes) in damages {
            fs::write(&path, &bytes).unwrap();
            assert!(
                matches!(b.get("t"), Err(StorageError::Corrupt { .. })),
                "{what}: {:?}",
                b.get("t")
            );
            assert!(
                matches!(b.get_value("t"), Err(StorageError::Corrupt { .. })),
                "{what}: {:?}",
                b.get_value("t")
            );
            if what != "value bit flip" {
                assert!(
                    matches!(b.get_meta("t"), Err(StorageError::Corrupt { .. })),
                    "{what}"
                );
            }
            let listed = listed_keys(&b, "");
            assert!(listed.contains(&"u".to_owned()), "{what}");
            if what != "value bit flip" {
                assert_eq!(listed, vec!["u".to_owned()], "{what}");
            }
            assert_eq!(value_of(&b, "u").unwrap(), b"fine");
        }
        let mut newer = original.clone();
        newer[4] = 9;
        fs::write(&path, &newer).unwrap();
        assert!(matches!(
            b.get("t"),
            Err(StorageError::UnsupportedVersion { found: 9, .. })
        ));
        assert!(matches!(
            b.get_value("t"),
            Err(StorageError::UnsupportedVersion { found: 9, .. })
        ));
        fs::write(&path, &original).unwrap();
        assert_eq!(value_of(&b, "t").unwrap(), noise(100, 9));
        assert_eq!(
            b.get_value("t").unwrap(),
            Some((noise(100, 9), None)),
            "what a load reads matches the record"
        );
    }

    #[test]
    fn journal_rolls_forward_after_a_crash() {
        for crash in [CRASH_AFTER_JOURNAL, CRASH_AFTER_FIRST_RENAME] {
            let (_tmp, b) = setup();
            let long = "ü".repeat(200);
            b.write(vec![put("old", b"1", 1), put("gone", b"2", 1)], NOW)
                .unwrap();
            b.inner.crash.store(crash, Ordering::SeqCst);
            let err = b
                .write(
                    vec![
                        put("a", b"A", 2),
                        put("old", b"new", 2),
                        del("gone"),
                        put(&long, b"L", 2),
                        put("z", b"Z", 2),
                    ],
                    NOW,
                )
                .unwrap_err();
            assert!(err.to_string().contains("simulated crash"), "{err}");
            let root = b.root().to_owned();
            assert!(root.join(JOURNAL_FILE).exists());
            if crash == CRASH_AFTER_JOURNAL {
                assert_eq!(value_of(&b, "old").unwrap(), b"1", "nothing applied yet");
                assert_eq!(value_of(&b, "a"), None);
            } else {
                assert_eq!(value_of(&b, "a").unwrap(), b"A", "first change applied");
                assert_eq!(value_of(&b, "z"), None, "last change not applied");
                assert!(names_in(&root).iter().any(|n| n.starts_with(TEMP_PREFIX)));
            }
            drop(b);
            let b = FileBackend::open(&root).unwrap();
            assert_eq!(value_of(&b, "a").unwrap(), b"A");
            let old = b.get("old").unwrap().unwrap();
            assert_eq!(old.value, b"new");
            assert_eq!(old.meta.created_at, Timestamp(1), "created_at kept");
            assert_eq!(b.get("gone").unwrap(), None);
            assert_eq!(value_of(&b, &long).unwrap(), b"L");
            assert_eq!(value_of(&b, "z").unwrap(), b"Z");
            let names = names_in(&root);
            assert!(!names.contains(JOURNAL_FILE));
            assert!(
                !names.iter().any(|n| n.starts_with(TEMP_PREFIX)),
                "{names:?}"
            );
        }
    }

    #[test]
    fn pending_journal_is_finished_before_the_next_change() {
        let (_tmp, b) = setup();
        b.inner
            .crash
            .store(CRASH_AFTER_FIRST_RENAME, Ordering::SeqCst);
        b.write(vec![put("a", b"A", 1), put("b", b"B", 1)], NOW)
            .unwrap_err();
        assert_eq!(value_of(&b, "b"), None);
        b.inner.crash.store(0, Ordering::SeqCst);
        b.write(vec![put("c", b"C", 1)], NOW).unwrap();
        assert_eq!(value_of(&b, "b").unwrap(), b"B");
        assert_eq!(value_of(&b, "c").unwrap(), b"C");
        assert!(!b.root().join(JOURNAL_FILE).exists());
    }

    #[test]
    fn incomplete_journal_is_rolled_back() {
        let damage: [fn(&mut Vec<u8>); 4] = [
            |j| j.truncate(j.len() - 1),
            |j| j.truncate(j.len() / 2),
            |j| j.truncate(10),
            |j| *j = noise(j.len(), 7),
        ];
        for (i, damage) in damage.into_iter().enumerate() {
            let (_tmp, b) = setup();
            b.write(vec![put("old", b"1", 1)], NOW).unwrap();
            b.inner.crash.store(CRASH_AFTER_JOURNAL, Ordering::SeqCst);
            b.write(vec![put("a", b"A", 2), put("old", b"new", 2)], NOW)
                .unwrap_err();
            let root = b.root().to_owned();
            drop(b);
            let journal = root.join(JOURNAL_FILE);
            let mut bytes = fs::read(&journal).unwrap();
            damage(&mut bytes);
            fs::write(&journal, &bytes).unwrap();
            let b = FileBackend::open(&root).unwrap();
            assert_eq!(value_of(&b, "a"), None, "case {i}");
            assert_eq!(value_of(&b, "old").unwrap(), b"1", "case {i}");
            assert!(!journal.exists(), "case {i}");
        }
    }

    #[test]
    fn journal_with_a_record_of_the_wrong_key_is_discarded() {
        let (_tmp, b) = setup();
        let root = b.root().to_owned();
        drop(b);
        let changes = vec![
            Change {
                key: "a".into(),
                bytes: Some(encode_record("a", &record(b"A", 1, None)).unwrap()),
            },
            Change {
                key: "b".into(),
                bytes: Some(encode_record("not b", &record(b"B", 1, None)).unwrap()),
            },
        ];
        fs::write(root.join(JOURNAL_FILE), encode_journal(&changes).unwrap()).unwrap();
        let b = FileBackend::open(&root).unwrap();
        assert_eq!(listed_keys(&b, ""), Vec::<String>::new());
        assert!(!root.join(JOURNAL_FILE).exists());
    }

    #[test]
    fn create_only_fails_the_whole_batch() {
        let (_tmp, b) = setup();
        b.write(vec![put("a", b"1", 1)], NOW).unwrap();
        let err = b
            .write(vec![put("b", b"2", 2), del("x"), create("a", b"x", 2)], NOW)
            .unwrap_err();
        assert!(
            matches!(&err, StorageError::AlreadyExists { key } if key == "a"),
            "{err}"
        );
        assert_eq!(b.get("b").unwrap(), None);
        assert_eq!(value_of(&b, "a").unwrap(), b"1");
        // Inside one batch, a create-only sees the effect of the earlier ops.
        assert!(matches!(
            b.write(vec![put("n", b"1", 2), create("n", b"2", 2)], NOW),
            Err(StorageError::AlreadyExists { .. })
        ));
        assert_eq!(b.get("n").unwrap(), None);
        let out = b
            .write(vec![del("a"), create("a", b"again", 3)], NOW)
            .unwrap();
        assert_eq!(out[0].previous_size, Some(1));
        assert_eq!(out[1].previous_size, None);
        assert_eq!(b.get("a").unwrap().unwrap().meta.created_at, Timestamp(3));
        // An expired record counts as absent.
        b.write(vec![put_expiring("e", b"old", 1, NOW.0)], NOW)
            .unwrap();
        let out = b.write(vec![create("e", b"fresh", 5)], NOW).unwrap();
        assert_eq!(
            out,
            vec![WriteOutcome {
                previous_size: None
            }]
        );
        assert_eq!(b.get("e").unwrap().unwrap().meta.created_at, Timestamp(5));
        // A put over a live record keeps its created_at and reports its size.
        let out = b.write(vec![put("e", b"newer", 9)], NOW).unwrap();
        assert_eq!(out[0].previous_size, Some(5));
        let meta = b.get_meta("e").unwrap().unwrap();
        assert_eq!(
            (meta.created_at, meta.modified_at),
            (Timestamp(5), Timestamp(9))
        );
    }

    #[test]
    fn batches_match_the_memory_backend() {
        let (_tmp, file) = setup();
        let memory = MemoryBackend::new();
        let long = "ß".repeat(250);
        let batches: Vec<(Vec<WriteOp>, i64)> = vec![
            (vec![put("a", b"1", 1), put("b", b"22", 1)], 10),
            (
                vec![put_expiring("c", b"333", 2, 20), put(&long, b"L", 2)],
                10,
            ),
            (vec![put("a", b"x", 3), del("b"), del("zz")], 15),
            (vec![create("c", b"new", 4)], 19),
            (vec![create("c", b"new", 4)], 20),
            (
                vec![put("d", b"1", 5), del("d"), put("d", b"4444", 5), del("a")],
                25,
            ),
            (vec![put_expiring("e", b"1", 6, 30), put("e", b"55", 6)], 40),
            (
                vec![del(&long), put("a", b"back", 7), create("a", b"no", 7)],
                40,
            ),
            (vec![put(&long, b"again", 8), del("c"), del("e")], 50),
        ];
        for (ops, now) in batches {
            let now = Timestamp(now);
            let expected = memory.write(ops.clone(), now);
            let got = file.write(ops.clone(), now);
            match (&expected, &got) {
                (Ok(e), Ok(g)) => assert_eq!(e, g, "{ops:?}"),
                (Err(e), Err(g)) => assert_eq!(e.to_string(), g.to_string()),
                _ => panic!("{ops:?}: memory {expected:?}, file {got:?}"),
            }
            let mut listed = file.scan("").unwrap();
            listed.sort_by(|a, b| a.key.cmp(&b.key));
            assert_eq!(memory.scan("").unwrap(), listed);
            for entry in &listed {
                assert_eq!(
                    memory.get(&entry.key).unwrap(),
                    file.get(&entry.key).unwrap()
                );
            }
        }
        assert_eq!(
            memory.usage(Timestamp(50)).unwrap(),
            file.usage(Timestamp(50)).unwrap()
        );
    }

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

    #[test]
    fn touch_sets_the_access_time_in_place() {
        let (_tmp, b) = setup();
        b.write(vec![put("k", b"value", 1)], NOW).unwrap();
        let path = b.path_of("k").unwrap().unwrap();
        let len = fs::metadata(&path).unwrap().len();
        b.touch("k", Timestamp(42)).unwrap();
        let rec = b.get("k").unwrap().unwrap();
        assert_eq!(rec.meta.accessed_at, Timestamp(42));
        assert_eq!(rec.meta.modified_at, Timestamp(1));
        assert_eq!(rec.value, b"value");
        assert_eq!(b.get_meta("k").unwrap().unwrap().accessed_at, Timestamp(42));
        assert_eq!(fs::metadata(&path).unwrap().len(), len);
        b.touch("absent", Timestamp(42)).unwrap();
        assert_eq!(b.get("absent").unwrap(), None);
        // A torn access-time slot falls back to the write time; the record survives.
        let mut bytes = fs::read(&path).unwrap();
        bytes[34] ^= 0xff;
        fs::write(&path, &bytes).unwrap();
        assert_eq!(b.get("k").unwrap().unwrap().meta.accessed_at, Timestamp(1));
        // Touching a damaged record reports it.
        fs::write(&path, b"junk").unwrap();
        assert!(matches!(
            b.touch("k", Timestamp(5)),
            Err(StorageError::Corrupt { .. })
        ));
    }

    #[test]
    fn purge_and_clear() {
        let (_tmp, b) = setup();
        let long = "∂".repeat(100);
        b.write(
            vec![
                put_expiring("old", b"1", 1, 100),
                put_expiring(&long, b"2", 1, 50),
                put_expiring("later", b"3", 1, 5_000),
                put("forever", b"4", 1),
            ],
            NOW,
        )
        .unwrap();
        assert_eq!(b.usage(Timestamp(100)).unwrap().item_count, 2);
        assert_eq!(b.purge_expired(Timestamp(100)).unwrap(), 2);
        assert_eq!(
            listed_keys(&b, ""),
            vec!["forever".to_owned(), "later".to_owned()]
        );
        assert_eq!(b.purge_expired(Timestamp(100)).unwrap(), 0);
        b.clear().unwrap();
        assert_eq!(listed_keys(&b, ""), Vec::<String>::new());
        assert_eq!(names_in(b.root()), BTreeSet::from([LOCK_FILE.to_owned()]));
        b.write(vec![put("after", b"x", 1)], NOW).unwrap();
        assert_eq!(listed_keys(&b, ""), vec!["after".to_owned()]);
    }
}
