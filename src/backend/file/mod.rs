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
//! # Records and names
//!
//! A key's file name is its UTF-8 bytes with every byte other than `a`-`z`, `0`-`9`, `_` and
//! `-` (uppercase letters included) written as `%` and two lowercase hex digits: `Player:1` is
//! stored as `k-%50layer%3a1`. So a name is never a path, a reserved name or a variant of
//! another in letter case, and each key has exactly one name. A key too long for such a name
//! (over 200 bytes with its prefix) is stored under a hashed `l-` name instead. Each record
//! file holds its key, its metadata and its value, with checksums: a damaged file makes
//! [`get`](Backend::get) of its key fail with [`StorageError::Corrupt`] and is passed over by
//! [`scan`](Backend::scan), and writing the key again replaces it.
//!
//! # Crash safety
//!
//! Every file is written beside its final name, `fsync`ed and renamed into place, so a reader
//! sees the old record or the new one, never a mix; a batch of several keys is made all or
//! nothing by a journal that is rolled forward or discarded at the next
//! [`open`](FileBackend::open). Temporary files left by a crash are removed at open.
//!
//! # Concurrency
//!
//! All methods may be called from many threads. Changes (`write`, `delete_if_unchanged`,
//! `touch`, `purge_expired`, `clear`) take turns behind a mutex. Readers (`get`, `get_meta`, `scan`) never wait for
//! a batch's files to be written and `fsync`ed; they only wait while a batch's renames
//! run, so a reader in this process sees a batch entirely or not at all.
//!
//! Only one process at a time may use a directory: [`open`](FileBackend::open) takes an
//! exclusive advisory lock on `<root>/.lock` and fails with [`StorageError::Unavailable`] if
//! another process holds it. Within one process, opening the same directory again (by any
//! path that resolves to it) returns a handle to the same backend, sharing its lock and
//! mutex. The lock is released when the last handle is dropped.
//!
//! A backend opened read-only ([`FileOptions::read_only`], or by itself when the lock file
//! cannot be written: a read-only mount, no permission) takes no lock and creates, removes
//! and recovers nothing; every change fails with [`StorageError::ReadOnly`]. It may share the
//! directory with a writer, whose changes it sees file by file (an unfinished batch left by a
//! crash stays unfinished until a writer opens the directory).
//!
//! # Where the code is
//!
//! Each file holds one idea and documents its own format:
//!
//! | file | holds |
//! |---|---|
//! | `file/mod.rs` | [`FileBackend`] and its [`Backend`] implementation: lookups, listing, batches |
//! | `file/naming.rs` | key ⇄ file name: the encoding, hashed names and their limits |
//! | `file/record.rs` | the record file format (its byte table), reading and checking records |
//! | `file/journal.rs` | batches: the journal file format, commit and recovery |
//! | `file/dir.rs` | the root directory: temp files, atomic renames, `fsync`, hashed chains |
//! | `file/lock.rs` | one process per directory, one backend per directory in a process |

mod dir;
mod journal;
mod lock;
mod naming;
mod record;
#[cfg(test)]
mod testing;

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::{Backend, KeyEntry, Record, RecordMeta, WriteOp, WriteOutcome};
use crate::clock::Timestamp;
use crate::error::{Result, StorageError};
use journal::{Change, JOURNAL_FILE};
use lock::Inner;
use naming::{ParsedName, Place, parse_name, place_of, slot_name};
use record::{Loaded, encode_record, load_header, load_record, load_value, touch_in_place};

const BACKEND: &str = "file";

/// How a [`FileBackend`] opens.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct FileOptions {
    /// Read only: no lock, nothing created, every write fails with
    /// [`StorageError::ReadOnly`]. Default false.
    pub read_only: bool,
}

impl FileOptions {
    /// Options for a read-only (`true`) or a writing backend.
    pub fn read_only(read_only: bool) -> Self {
        Self { read_only }
    }
}

/// One file per key under a root directory. See the [module docs](self) for the layout on disk,
/// the names, crash safety and the locking rules.
///
/// Cloning is cheap and gives another handle to the same backend.
#[derive(Debug, Clone)]
pub struct FileBackend {
    inner: Arc<Inner>,
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
        Self::open_with(root, FileOptions::default())
    }

    /// [`open`](Self::open) with options: [`FileOptions::read_only`] opens an existing
    /// directory for reading only, taking no lock and creating nothing (no lock file, no
    /// recovery of an interrupted batch). A directory whose lock file cannot be written (a
    /// read-only mount, no permission) is opened that way by itself.
    pub fn open_with(root: impl AsRef<Path>, options: FileOptions) -> Result<Self> {
        let given = root.as_ref();
        if options.read_only && !given.is_dir() {
            return Err(StorageError::read_only(
                BACKEND,
                format!("creating the storage directory {}", given.display()),
                "the store is opened read-only and the directory does not exist",
            ));
        }
        dir::create_dir_all_durably(given).map_err(|e| {
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
        Ok(Self {
            inner: Inner::shared(root, options.read_only)?,
        })
    }

    /// Refuses `operation` on a read-only backend, before anything is touched.
    fn guard_write(&self, operation: &str) -> Result<()> {
        match &self.inner.read_only {
            Some(reason) => Err(StorageError::read_only(BACKEND, operation, reason.clone())),
            None => Ok(()),
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
        dir.for_each_entry_name(|name| {
            if let Some(record) = self.record_named(&name, prefix) {
                found.push(record);
            }
        })?;
        found.sort_by(|a, b| a.0.cmp(&b.0));
        found.dedup_by(|a, b| a.0 == b.0);
        Ok(found)
    }

    /// The key and metadata of the valid record in the file `name`, if its key starts with
    /// `prefix`: `None` for files that are not records, records out of place, and unreadable
    /// or damaged files (one of those never fails a listing).
    fn record_named(&self, name: &str, prefix: &str) -> Option<(String, RecordMeta)> {
        let parsed = parse_name(name)?;
        if !parsed.may_hold_prefix(prefix) {
            return None;
        }
        let Ok(Loaded::Found(key, meta)) = load_header(&self.inner.dir.path(name)) else {
            return None;
        };
        let in_place = match &parsed {
            ParsedName::Direct(expected) => *expected == key,
            ParsedName::Hashed { base, .. } => place_of(&key) == Place::Chain(base.clone()),
        };
        (in_place && key.starts_with(prefix)).then_some((key, meta))
    }

    /// The `limit` smallest keys after `after` that start with `prefix`, from one pass over
    /// the directory that keeps at most `limit` candidates (a direct name spells its key, so
    /// only hashed names and the chosen files have their headers read).
    fn list_page(
        &self,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(String, RecordMeta)>> {
        let mut page = Vec::with_capacity(limit.min(1024));
        let mut cursor = after.map(str::to_owned);
        while page.len() < limit {
            let want = limit - page.len();
            // Key -> file name (and the header, when reading it was needed to learn the key).
            let mut smallest: BTreeMap<String, (String, Option<RecordMeta>)> = BTreeMap::new();
            self.inner.dir.for_each_entry_name(|name| {
                let (key, meta) = match parse_name(&name) {
                    Some(ParsedName::Direct(key)) if key.starts_with(prefix) => (key, None),
                    Some(ParsedName::Hashed { .. }) => match self.record_named(&name, prefix) {
                        Some((key, meta)) => (key, Some(meta)),
                        None => return,
                    },
                    _ => return,
                };
                if cursor.as_deref().is_some_and(|c| key.as_str() <= c) {
                    return;
                }
                if smallest.len() == want {
                    match smallest.last_key_value() {
                        Some((largest, _)) if key < *largest => {}
                        _ => return,
                    }
                    smallest.pop_last();
                }
                smallest.insert(key, (name, meta));
            })?;
            let exhausted = smallest.len() < want;
            cursor = smallest.keys().next_back().cloned();
            for (key, (name, meta)) in smallest {
                let meta = match meta {
                    Some(meta) => Some(meta),
                    None => self.record_named(&name, prefix).map(|(_, meta)| meta),
                };
                // A file removed or damaged since the pass is left out.
                if let Some(meta) = meta {
                    page.push((key, meta));
                }
            }
            if exhausted {
                break;
            }
        }
        Ok(page)
    }
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
        self.guard_write("writing a batch")?;
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
                .map(|m| (m.created_at, m.size, m.version));
            let previous_size = live.map(|(_, size, _)| size);
            match op {
                WriteOp::Put {
                    mut record, mode, ..
                } => {
                    mode.check(&key, live.map(|(.., version)| version))?;
                    if let Some((created_at, ..)) = live {
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

    fn delete_if_unchanged(
        &self,
        key: &str,
        value: &[u8],
        expires_at: Option<Timestamp>,
    ) -> Result<bool> {
        self.guard_write("taking a record")?;
        // Under the writer's mutex no other change can come between the check and the
        // removal (one process per directory, see the module docs).
        let _state = self.lock_writer()?;
        let same = matches!(
            self.lookup(key, load_value)?,
            Lookup::Found((stored, expiry)) if stored == value && expiry == expires_at
        );
        if same {
            let change = [Change {
                key: key.to_owned(),
                bytes: None,
            }];
            self.inner
                .dir
                .apply(&change, &self.inner.gate, self.crash_limit())
                .map_err(|e| e.error)?;
        }
        Ok(same)
    }

    fn touch(&self, key: &str, at: Timestamp) -> Result<()> {
        self.guard_write("updating an access time")?;
        let _state = self.lock_writer()?;
        let dir = &self.inner.dir;
        let path = match place_of(key) {
            Place::Direct(name) => dir.path(&name),
            Place::Chain(base) => match dir.probe(&base, key, false)?.found {
                Some(slot) => dir.path(&slot_name(&base, slot)),
                None => return Ok(()),
            },
        };
        touch_in_place(key, &path, at)
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

    /// A directory has no order, so each page is one pass over the directory that keeps
    /// only the `limit` smallest keys after `after`: memory stays bounded by `limit`, and
    /// the time of a page grows with the number of files.
    fn scan_page(&self, prefix: &str, after: Option<&str>, limit: usize) -> Result<Vec<KeyEntry>> {
        let _gate = self.inner.gate.read();
        Ok(self
            .list_page(prefix, after, limit)?
            .into_iter()
            .map(|(key, meta)| KeyEntry {
                key,
                size: meta.size,
                expires_at: meta.expires_at,
            })
            .collect())
    }

    fn purge_expired(&self, now: Timestamp) -> Result<usize> {
        self.guard_write("removing expired records")?;
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
        self.guard_write("removing every record")?;
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

    fn read_only(&self) -> Option<String> {
        self.inner.read_only.clone()
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

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;
    use crate::backend::MemoryBackend;
    use lock::LOCK_FILE;
    use testing::*;

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
                    mode: crate::backend::PutMode::Upsert,
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
