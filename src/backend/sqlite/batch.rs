//! Write batches: one `BEGIN IMMEDIATE` transaction per batch on the writer connection, so a
//! batch is all or nothing and never fails half-way with `SQLITE_BUSY`; a plain put is one
//! upsert statement, without a lookup of the record it replaces.

use rusqlite::{CachedStatement, OptionalExtension, Transaction, TransactionBehavior};

use std::sync::atomic::Ordering;

use super::schema::{
    SQL_DELETE, SQL_DELETE_IF_UNCHANGED, SQL_PREVIOUS, SQL_UPDATE_IF_VERSION, SQL_UPSERT,
    SQL_UPSERT_KEEP_CREATED,
};
use super::{SqliteBackend, reserve};
use crate::backend::{CustomMetadata, PutMode, RecordVersion, WriteOp, WriteOutcome};
use crate::clock::Timestamp;
use crate::error::{Result, StorageError};

/// What [`SQL_PREVIOUS`] / [`SQL_DELETE`] find about the row a write replaces.
struct Previous {
    size: i64,
    expires_at: Option<i64>,
}

impl Previous {
    /// The size to report if the row was live at `now`.
    fn live_size(&self, now: Timestamp) -> Option<u64> {
        let live = !now.is_past(self.expires_at.map(Timestamp));
        // A negative size cannot be written by this backend; report it as 0 rather than fail.
        live.then(|| u64::try_from(self.size).unwrap_or(0))
    }
}

/// Custom metadata as stored: JSON text, or NULL when there is none.
fn custom_json(custom: &CustomMetadata) -> rusqlite::Result<Option<String>> {
    if custom.is_empty() {
        return Ok(None);
    }
    serde_json::to_string(custom)
        .map(Some)
        .map_err(|e| rusqlite::Error::ToSqlConversionFailure(Box::new(e)))
}

/// The statements of one write batch, prepared on first use and kept for the whole batch.
struct BatchStatements<'t> {
    tx: &'t Transaction<'t>,
    previous: Option<CachedStatement<'t>>,
    upsert: Option<CachedStatement<'t>>,
    upsert_keep_created: Option<CachedStatement<'t>>,
    update_if_version: Option<CachedStatement<'t>>,
    delete: Option<CachedStatement<'t>>,
    /// Look up the record every upsert replaces, to report its size (near the quota).
    report_sizes: bool,
}

impl<'t> BatchStatements<'t> {
    fn new(tx: &'t Transaction<'t>, report_sizes: bool) -> Self {
        Self {
            tx,
            report_sizes,
            previous: None,
            upsert: None,
            upsert_keep_created: None,
            update_if_version: None,
            delete: None,
        }
    }

    fn get<'s>(
        tx: &'t Transaction<'t>,
        slot: &'s mut Option<CachedStatement<'t>>,
        sql: &str,
    ) -> rusqlite::Result<&'s mut CachedStatement<'t>> {
        if slot.is_none() {
            *slot = Some(tx.prepare_cached(sql)?);
        }
        Ok(slot.as_mut().expect("just prepared"))
    }

    /// Runs one operation of a batch inside its transaction.
    fn apply(&mut self, op: &WriteOp, now: Timestamp) -> rusqlite::Result<OpResult> {
        match op {
            WriteOp::Put {
                key,
                record,
                mode: PutMode::Upsert,
            } if !self.report_sizes => {
                // One statement: this is the hot path of every save.
                let meta = &record.meta;
                let custom = custom_json(&meta.custom)?;
                Self::get(
                    self.tx,
                    &mut self.upsert_keep_created,
                    SQL_UPSERT_KEEP_CREATED,
                )?
                .execute(rusqlite::params![
                    key,
                    meta.created_at.0,
                    meta.modified_at.0,
                    meta.accessed_at.0,
                    meta.expires_at.map(|t| t.0),
                    meta.size,
                    meta.compressed,
                    meta.encrypted,
                    custom,
                    record.value,
                    now.0,
                    meta.version.0 as i64,
                ])?;
                Ok(OpResult::Done(WriteOutcome {
                    previous_size: None,
                }))
            }
            WriteOp::Put {
                key,
                record,
                mode: PutMode::IfVersion(expected),
            } if !self.report_sizes => {
                // One statement when the version matches (the usual case of a
                // read-modify-write): the check is the UPDATE's condition.
                let meta = &record.meta;
                let custom = custom_json(&meta.custom)?;
                let updated =
                    Self::get(self.tx, &mut self.update_if_version, SQL_UPDATE_IF_VERSION)?
                        .execute(rusqlite::params![
                            key,
                            meta.modified_at.0,
                            meta.accessed_at.0,
                            meta.expires_at.map(|t| t.0),
                            meta.size,
                            meta.compressed,
                            meta.encrypted,
                            custom,
                            record.value,
                            meta.version.0 as i64,
                            expected.0 as i64,
                            now.0,
                        ])?;
                if updated == 1 {
                    return Ok(OpResult::Done(WriteOutcome {
                        previous_size: None,
                    }));
                }
                // Refused: read what is there, for the error that says what was found.
                self.put_reading_previous(key, record, PutMode::IfVersion(*expected), now)
            }
            WriteOp::Put { key, record, mode } => {
                self.put_reading_previous(key, record, *mode, now)
            }
            WriteOp::Delete { key } => {
                let previous = Self::get(self.tx, &mut self.delete, SQL_DELETE)?
                    .query_row([key], |row| {
                        Ok(Previous {
                            size: row.get(0)?,
                            expires_at: row.get(1)?,
                        })
                    })
                    .optional()?;
                Ok(OpResult::Done(WriteOutcome {
                    previous_size: previous.and_then(|p| p.live_size(now)),
                }))
            }
        }
    }

    /// A put that reads the record it replaces first: for its previous size (near the
    /// quota), its `created_at`, and the create-only and version checks.
    fn put_reading_previous(
        &mut self,
        key: &str,
        record: &crate::backend::Record,
        mode: PutMode,
        now: Timestamp,
    ) -> rusqlite::Result<OpResult> {
        let previous = Self::get(self.tx, &mut self.previous, SQL_PREVIOUS)?
            .query_row([key], |row| {
                Ok((
                    Previous {
                        size: row.get(0)?,
                        expires_at: row.get(1)?,
                    },
                    row.get::<_, i64>(2)?,
                    RecordVersion(row.get::<_, i64>(3)? as u64),
                ))
            })
            .optional()?;
        let live = previous
            .and_then(|(p, created_at, version)| Some((p.live_size(now)?, created_at, version)));
        if let Err(refused) = mode.check(key, live.map(|(.., version)| version)) {
            return Ok(OpResult::Refused(refused));
        }
        let meta = &record.meta;
        let created_at = live.map_or(meta.created_at.0, |(_, created_at, _)| created_at);
        let custom = custom_json(&meta.custom)?;
        Self::get(self.tx, &mut self.upsert, SQL_UPSERT)?.execute(rusqlite::params![
            key,
            created_at,
            meta.modified_at.0,
            meta.accessed_at.0,
            meta.expires_at.map(|t| t.0),
            meta.size,
            meta.compressed,
            meta.encrypted,
            custom,
            record.value,
            meta.version.0 as i64,
        ])?;
        Ok(OpResult::Done(WriteOutcome {
            previous_size: live.map(|(size, ..)| size),
        }))
    }
}

enum OpResult {
    Done(WriteOutcome),
    /// A conditional put found the key in another state (`AlreadyExists`,
    /// `VersionConflict`): the batch is rolled back with this error.
    Refused(StorageError),
}

impl SqliteBackend {
    /// Applies a batch in one `BEGIN IMMEDIATE` transaction: see
    /// [`write`](crate::backend::Backend::write). Refused on a read-only or damaged database.
    ///
    /// On a full disk (`SQLITE_FULL`) the disk reserve is released, the WAL written back
    /// and emptied and the batch tried once more, as `sqlite/reserve.rs` describes. If it
    /// still fails the error is [`StorageError::StorageFull`], nothing was written, and the
    /// WAL is emptied again so that the failed attempt keeps no space.
    pub(super) fn write_batch(
        &self,
        ops: Vec<WriteOp>,
        now: Timestamp,
    ) -> Result<Vec<WriteOutcome>> {
        self.write_batch_with(ops, now, false)
    }

    /// [`write_batch`](Self::write_batch), looking up the record each upsert replaces so that
    /// every outcome reports its size: a lookup more per save, which the store pays only near
    /// its quota ([`Backend::write_reporting_sizes`](crate::backend::Backend::write_reporting_sizes)).
    pub(super) fn write_batch_reporting_sizes(
        &self,
        ops: Vec<WriteOp>,
        now: Timestamp,
    ) -> Result<Vec<WriteOutcome>> {
        self.write_batch_with(ops, now, true)
    }

    fn write_batch_with(
        &self,
        ops: Vec<WriteOp>,
        now: Timestamp,
        report_sizes: bool,
    ) -> Result<Vec<WriteOutcome>> {
        if ops.is_empty() {
            return Ok(Vec::new());
        }
        self.guard_write("writing a batch")?;
        let only_deletes = ops.iter().all(|op| matches!(op, WriteOp::Delete { .. }));
        if self.reserve_missing.load(Ordering::Relaxed) && !only_deletes && !self.restore_reserve()
        {
            return Err(self.full_without_headroom());
        }
        let result = match self.write_once(&ops, now, report_sizes) {
            Err(StorageError::StorageFull { .. }) => {
                reserve::release(&reserve::reserve_path(&self.path));
                self.reserve_missing.store(true, Ordering::Relaxed);
                // Deletes may use the reserve's space (they free pages); saves only what is
                // left once the reserve is whole again.
                let room = if only_deletes {
                    self.checkpoint_truncate();
                    true
                } else {
                    self.restore_reserve()
                };
                if room {
                    let again = self.write_once(&ops, now, report_sizes);
                    if again.is_err() {
                        self.checkpoint_truncate();
                    }
                    again
                } else {
                    Err(self.full_without_headroom())
                }
            }
            other => other,
        };
        if result.is_ok() && self.reserve_missing.load(Ordering::Relaxed) {
            self.restore_reserve();
        }
        result
    }

    /// Empties the WAL and sizes the reserve file to what the free pages of the database
    /// leave of the headroom; true (and the reserve no longer missing) when it is whole.
    fn restore_reserve(&self) -> bool {
        let free_bytes = {
            let conn = self.writer();
            let _ = conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()));
            let pages: i64 = conn
                .query_row("PRAGMA freelist_count", [], |r| r.get(0))
                .unwrap_or(0);
            let size: i64 = conn
                .query_row("PRAGMA page_size", [], |r| r.get(0))
                .unwrap_or(0);
            u64::try_from(pages.saturating_mul(size)).unwrap_or(0)
        };
        let needed = self.headroom.saturating_sub(free_bytes);
        let whole = reserve::resize(&reserve::reserve_path(&self.path), needed);
        self.reserve_missing.store(!whole, Ordering::Relaxed);
        whole
    }

    /// The error of a save refused because the disk has no headroom left.
    fn full_without_headroom(&self) -> StorageError {
        StorageError::StorageFull {
            backend: super::BACKEND.into(),
            message: format!(
                "the disk under {} is full (saves are refused until deletes or free disk space \
                 leave the {} byte headroom a checkpoint needs)",
                self.path.display(),
                self.headroom
            ),
        }
    }

    /// Writes the WAL back and truncates it to nothing. Best effort: a checkpoint that cannot
    /// run leaves the next write to fail.
    fn checkpoint_truncate(&self) {
        let conn = self.writer();
        let _ = conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()));
    }

    /// One attempt at a batch, in one transaction.
    fn write_once(
        &self,
        ops: &[WriteOp],
        now: Timestamp,
        report_sizes: bool,
    ) -> Result<Vec<WriteOutcome>> {
        let count = ops.len();
        let mut conn = self.writer();
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(|e| self.fail(e, format_args!("writing a batch of {count} operation(s)")))?;
        let mut outcomes = Vec::with_capacity(count);
        {
            // Prepared once per batch: a cache lookup per operation costs more than the seek.
            let mut statements = BatchStatements::new(&tx, report_sizes);
            for op in ops {
                match statements.apply(op, now).map_err(|e| {
                    self.fail(e, format_args!("writing a batch of {count} operation(s)"))
                })? {
                    OpResult::Done(outcome) => outcomes.push(outcome),
                    // Dropping `tx` rolls back everything done so far.
                    OpResult::Refused(refused) => return Err(refused),
                }
            }
        }
        tx.commit()
            .map_err(|e| self.fail(e, format_args!("writing a batch of {count} operation(s)")))?;
        Ok(outcomes)
    }
}

impl SqliteBackend {
    /// [`Backend::delete_if_unchanged`](crate::backend::Backend::delete_if_unchanged): one
    /// `DELETE` whose `WHERE` compares the value and the expiry, so the check and the removal
    /// are one transaction, atomic against other connections and other processes too.
    pub(super) fn delete_row_if_unchanged(
        &self,
        key: &str,
        value: &[u8],
        expires_at: Option<Timestamp>,
    ) -> Result<bool> {
        self.guard_write("taking a record")?;
        let conn = self.writer();
        let removed = conn
            .prepare_cached(SQL_DELETE_IF_UNCHANGED)
            .and_then(|mut stmt| {
                stmt.execute(rusqlite::params![key, value, expires_at.map(|t| t.0)])
            })
            .map_err(|e| self.fail(e, format_args!("taking a record")))?;
        Ok(removed > 0)
    }
}

#[cfg(test)]
mod tests {
    use tempfile::TempDir;

    use crate::backend::sqlite::testing::*;
    use crate::backend::{Backend, PutMode, Record, WriteOp};
    use crate::error::StorageError;

    #[test]
    fn create_only_failure_rolls_back_the_whole_batch() {
        let dir = TempDir::new().unwrap();
        let b = open(&dir);
        put1(&b, "a", b"old-a", at(0), None);
        put1(&b, "c", b"old-c", at(0), None);
        let err = b
            .write(
                vec![
                    put("b", record(b"new-b", at(1), None)),
                    delete("c"),
                    put("a", record(b"upserted", at(1), None)),
                    create("a", record(b"new-a", at(1), None)),
                ],
                at(1),
            )
            .unwrap_err();
        assert!(
            matches!(&err, StorageError::AlreadyExists { key } if key == "a"),
            "{err:?}"
        );
        assert_eq!(b.get("a").unwrap().unwrap().value, b"old-a");
        assert_eq!(b.get("b").unwrap(), None);
        assert_eq!(b.get("c").unwrap().unwrap().value, b"old-c");

        // A create-only put inside one batch sees earlier operations of that batch.
        let err = b
            .write(
                vec![
                    create("n", record(b"1", at(1), None)),
                    create("n", record(b"2", at(1), None)),
                ],
                at(1),
            )
            .unwrap_err();
        assert!(matches!(&err, StorageError::AlreadyExists { key } if key == "n"));
        assert_eq!(b.get("n").unwrap(), None);
        let out = b
            .write(
                vec![delete("a"), create("a", record(b"re-created", at(2), None))],
                at(2),
            )
            .unwrap();
        assert_eq!(out[0].previous_size, Some(5));
        assert_eq!(out[1].previous_size, None);
        assert_eq!(b.get("a").unwrap().unwrap().value, b"re-created");

        // An expired record counts as absent; expiry is judged at `now`.
        put1(&b, "e", b"short", at(0), Some(at(10)));
        let err = b
            .write(vec![create("e", record(b"x", at(9), None))], at(9))
            .unwrap_err();
        assert!(matches!(err, StorageError::AlreadyExists { .. }));
        let out = b
            .write(vec![create("e", record(b"x", at(10), None))], at(10))
            .unwrap();
        assert_eq!(out[0].previous_size, None);
        assert_eq!(b.get("e").unwrap().unwrap().value, b"x");

        // The writer is still usable after a failed batch.
        put1(&b, "after", b"ok", at(11), None);
        assert!(b.writer.lock().is_autocommit());
    }

    #[test]
    fn created_at_is_kept_across_overwrites_and_reset_after_expiry() {
        let dir = TempDir::new().unwrap();
        let b = open(&dir);
        put1(&b, "k", b"v1", at(0), Some(at(100)));
        put1(&b, "k", b"v2", at(50), Some(at(100)));
        let meta = b.get_meta("k").unwrap().unwrap();
        assert_eq!(meta.created_at, at(0));
        assert_eq!(meta.modified_at, at(50));
        // At the exact deadline the record is expired: a put starts a new record.
        put1(&b, "k", b"v3", at(100), None);
        let meta = b.get_meta("k").unwrap().unwrap();
        assert_eq!(meta.created_at, at(100));
        assert_eq!(meta.expires_at, None);
        // Kept across a put inside a batch, too.
        b.write(
            vec![
                put("k", record(b"v4", at(200), None)),
                put("k", record(b"v5", at(200), None)),
            ],
            at(200),
        )
        .unwrap();
        assert_eq!(b.get_meta("k").unwrap().unwrap().created_at, at(100));
        // A delete then a put in the same batch starts a new record.
        b.write(
            vec![delete("k"), put("k", record(b"v6", at(300), None))],
            at(300),
        )
        .unwrap();
        assert_eq!(b.get_meta("k").unwrap().unwrap().created_at, at(300));
    }

    #[test]
    fn outcomes_report_the_previous_live_size() {
        // Upserts skip the lookup (previous size None); create-only puts and deletes report.
        let dir = TempDir::new().unwrap();
        let b = open(&dir);
        let create = |key: &str, r: Record| WriteOp::Put {
            key: key.into(),
            record: r,
            mode: PutMode::CreateOnly,
        };
        let sizes = |ops, now| -> Vec<Option<u64>> {
            b.write(ops, now)
                .unwrap()
                .into_iter()
                .map(|o| o.previous_size)
                .collect()
        };
        assert_eq!(
            sizes(vec![put("a", record(b"123", at(0), None))], at(0)),
            [None]
        );
        assert_eq!(
            sizes(vec![put("a", record(b"12345", at(1), None))], at(1)),
            [None]
        );
        assert_eq!(
            sizes(
                vec![
                    create("b", record(b"1", at(2), Some(at(10)))),
                    put("b", record(b"12", at(2), Some(at(10)))),
                    delete("b"),
                    delete("b"),
                    delete("never"),
                ],
                at(2)
            ),
            [None, None, Some(2), None, None]
        );
        put1(&b, "c", b"123", at(2), Some(at(4)));
        assert_eq!(
            sizes(vec![create("c", record(b"1", at(4), None))], at(4)),
            [None],
            "an expired record does not count"
        );
        put1(&b, "x", b"1234", at(0), Some(at(5)));
        assert_eq!(
            sizes(vec![delete("a"), delete("x")], at(5)),
            [Some(5), None]
        );
        put1(&b, "y", b"1234", at(0), Some(at(5)));
        assert_eq!(
            sizes(vec![put("y", record(b"1", at(6), None))], at(6)),
            [None]
        );
        assert_eq!(b.write(Vec::new(), at(7)).unwrap(), []);
    }

    #[test]
    fn writes_reporting_sizes_report_every_replaced_live_record() {
        let dir = TempDir::new().unwrap();
        let b = open(&dir);
        assert!(b.reports_replaced_sizes());
        let sizes = |ops, now| -> Vec<Option<u64>> {
            b.write_reporting_sizes(ops, now)
                .unwrap()
                .into_iter()
                .map(|o| o.previous_size)
                .collect()
        };
        assert_eq!(
            sizes(vec![put("a", record(b"123", at(0), None))], at(0)),
            [None]
        );
        assert_eq!(
            sizes(
                vec![
                    put("a", record(b"12345", at(1), None)),
                    put("a", record(b"1", at(1), Some(at(3)))),
                    put("b", record(b"12", at(1), Some(at(3)))),
                ],
                at(1)
            ),
            [Some(3), Some(5), None]
        );
        // Expired records count as absent; created_at is still kept for live ones.
        assert_eq!(
            sizes(
                vec![
                    put("a", record(b"1234", at(3), None)),
                    put("b", record(b"1", at(3), None))
                ],
                at(3)
            ),
            [None, None]
        );
        assert_eq!(b.get_meta("a").unwrap().unwrap().created_at, at(3));
        put1(&b, "c", b"xy", at(4), None);
        assert_eq!(
            sizes(vec![put("c", record(b"xyz", at(5), None))], at(5)),
            [Some(2)]
        );
        assert_eq!(b.get_meta("c").unwrap().unwrap().created_at, at(4));
    }
}
