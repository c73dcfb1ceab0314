//! Crash safety of batches: the journal that makes a batch of several keys all or nothing.
//!
//! Each file is replaced atomically on its own: written to a temp file, `fsync`ed, renamed
//! into place, then the directory `fsync`ed (see [`dir`](super::dir)). A batch that changes
//! more than one key is made atomic with `<root>/.journal`:
//!
//! 1. The final content of every changed key (the complete new record file, or "deleted") is
//!    written to a temp file with a checksum, `fsync`ed, renamed to `.journal`, and the
//!    directory `fsync`ed. This is the commit point.
//! 2. Each change is applied as a single file would be (new files written first and made
//!    durable together by one barrier, `syncfs` on Linux or an `fsync` of each file elsewhere;
//!    then all renames and removes, then one directory `fsync`).
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
//! # The journal file
//!
//! ```text
//! offset size
//!  0      4   magic "BSTJ"
//!  4      1   format version (1)
//!  5      3   zero
//!  8      8   payload length P (u64, little endian)
//! 16      4   CRC-32 of the payload
//! 20      4   zero
//! 24      P   payload: the postcard encoding of the changes, a list of
//!             (key, complete new record file or none for a delete)
//! ```
//!
//! A journal is complete and valid when its magic, version, length and checksum match and
//! every record file in it is intact and holds its own key; anything else is discarded as
//! torn. A journal of a newer format version is neither applied nor discarded: opening the
//! directory fails until a newer build finishes it.

use std::fs;
use std::io;

use parking_lot::{MutexGuard, RwLock};
use serde::{Deserialize, Serialize};

use super::dir::{ApplyError, Dir};
use super::lock::WriterState;
use super::record::{is_record_of, u32_at, u64_at};
use super::{BACKEND, FileBackend};
use crate::error::{Result, StorageError};

/// The batch journal.
pub(super) const JOURNAL_FILE: &str = ".journal";

const JOURNAL_MAGIC: [u8; 4] = *b"BSTJ";
const JOURNAL_VERSION: u8 = 1;
const JOURNAL_FIXED_LEN: usize = 24;

#[cfg(test)]
pub(super) const CRASH_AFTER_JOURNAL: u8 = 1;
#[cfg(test)]
pub(super) const CRASH_AFTER_FIRST_RENAME: u8 = 2;

/// The final state of one key after a batch: the complete record file, or `None` (deleted).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(super) struct Change {
    pub(super) key: String,
    pub(super) bytes: Option<Vec<u8>>,
}

/// The bytes of a journal file holding `changes` (see the module docs).
pub(super) fn encode_journal(changes: &[Change]) -> Result<Vec<u8>> {
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
        Some(bytes) => is_record_of(bytes, &change.key),
        None => true,
    });
    if valid {
        Ok(changes)
    } else {
        Err(JournalDamage::Invalid)
    }
}

impl FileBackend {
    /// Locks the writer mutex, first finishing a batch whose journal is still pending.
    pub(super) fn lock_writer(&self) -> Result<MutexGuard<'_, WriterState>> {
        let mut state = self.inner.writer.lock();
        if state.journal_pending {
            self.inner.dir.recover_journal(&self.inner.gate)?;
            state.journal_pending = false;
        }
        Ok(state)
    }

    /// Commits a batch of several changes through the journal.
    pub(super) fn commit_journaled(
        &self,
        state: &mut WriterState,
        changes: &[Change],
    ) -> Result<()> {
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
        match dir.apply_batch(changes, &self.inner.gate, self.crash_limit()) {
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
    pub(super) fn crash_limit(&self) -> usize {
        #[cfg(test)]
        if self.inner.crash.load(std::sync::atomic::Ordering::SeqCst) == CRASH_AFTER_FIRST_RENAME {
            return 1;
        }
        usize::MAX
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

impl Dir {
    /// Makes `journal` durable as `<root>/.journal`.
    fn write_journal(&self, journal: &[u8]) -> Result<()> {
        let tmp = self.write_temp(journal)?;
        if let Err(error) = self.rename(&tmp, &self.path(JOURNAL_FILE)) {
            let _ = fs::remove_file(&tmp);
            return Err(error);
        }
        self.sync()
    }

    pub(super) fn remove_journal(&self) -> Result<()> {
        self.remove_file_if_exists(JOURNAL_FILE)?;
        self.sync()
    }

    /// Rolls a valid journal forward, discards an invalid one; nothing if there is none.
    pub(super) fn recover_journal(&self, gate: &RwLock<()>) -> Result<()> {
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
                .apply_batch(&changes, gate, usize::MAX)
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

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use super::*;
    use crate::backend::Backend;
    use crate::backend::file::dir::TEMP_PREFIX;
    use crate::backend::file::record::encode_record;
    use crate::backend::file::testing::*;
    use crate::clock::Timestamp;

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
}
