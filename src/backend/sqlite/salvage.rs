//! Salvage: copying every readable record of a damaged database into a new one.
//!
//! [`salvage`] opens the damaged file read-only (it is never changed) and walks the `records`
//! table in rowid order, reading row ids first (the table's leaf pages) and then each row by
//! itself (its overflow pages), so that one unreadable row costs only that row. When the walk
//! meets a damaged page it probes forward from the last row it read (exponentially, then by
//! bisection back) for the first row id it can reach again, and records the row ids it had
//! to skip. Each readable row is copied byte for byte, metadata and all (encrypted records
//! too: no key is needed), into a new SQLite database, in atomic batches.
//!
//! Afterwards the key index (`sqlite_autoindex_records_1`, which holds every key apart from
//! the table) is read as far as it can be: the keys it names that were not copied are the
//! losses the [`SalvageReport`] lists, as runs of consecutive keys.

use std::collections::HashSet;
use std::path::Path;

use rusqlite::{Connection, OptionalExtension};

use super::connection::open_read_only;
use super::schema::RawMeta;
use super::{SqliteBackend, SqliteOptions};
use crate::backend::{Backend, PutMode, Record, WriteOp};
use crate::clock::Timestamp;
use crate::error::{Result, StorageError};

/// Records per batch written to the new database.
const BATCH: usize = 500;

/// A run of consecutive keys (in key order) that the key index names but that could not be
/// read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LostKeys {
    /// The first key of the run.
    pub first: String,
    /// The last key of the run.
    pub last: String,
    /// How many keys the run holds.
    pub count: u64,
}

/// What [`salvage`] copied and what it could not read.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SalvageReport {
    /// Records copied into the new database.
    pub recovered: u64,
    /// Rows whose row id was reachable but whose record could not be read (or made no sense).
    pub unreadable_rows: u64,
    /// Row-id ranges (inclusive) the walk had to skip over damaged pages; they may hold
    /// any number of records, or none.
    pub skipped_rowids: Vec<(i64, i64)>,
    /// Keys the key index names that were not recovered, in runs of consecutive keys.
    pub lost_keys: Vec<LostKeys>,
    /// Total of `lost_keys` counts.
    pub lost_key_count: u64,
    /// The key index could not be read to its end: `lost_keys` may miss some.
    pub key_index_incomplete: bool,
}

impl SalvageReport {
    /// True when every record was copied: nothing unreadable, skipped or lost.
    pub fn is_complete(&self) -> bool {
        self.unreadable_rows == 0
            && self.skipped_rowids.is_empty()
            && self.lost_keys.is_empty()
            && !self.key_index_incomplete
    }
}

/// Progress of a [`salvage`], passed to its callback about every 1,000 rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SalvageProgress {
    /// Records copied so far.
    pub recovered: u64,
    /// Rows (and row-id ranges) given up so far.
    pub unreadable: u64,
    /// The row id reached, and the largest known (0 when unknown).
    pub rowid: i64,
    /// The largest row id, if it could be read.
    pub max_rowid: Option<i64>,
}

const SQL_ROWIDS: &str = "SELECT rowid FROM records WHERE rowid > ?1 ORDER BY rowid";
const SQL_FIRST_FROM: &str = "SELECT rowid FROM records WHERE rowid >= ?1 ORDER BY rowid LIMIT 1";
const SQL_ROW: &str = "SELECT created_at, modified_at, accessed_at, expires_at, size, compressed, \
     encrypted, custom, version, value, key FROM records WHERE rowid = ?1";
/// [`SQL_ROW`] for a schema-1 database, whose records have no version (they read as 0).
const SQL_ROW_WITHOUT_VERSION: &str = "SELECT created_at, modified_at, accessed_at, expires_at, \
     size, compressed, encrypted, custom, 0, value, key FROM records WHERE rowid = ?1";
const SQL_INDEX_KEYS: &str = "SELECT key FROM records INDEXED BY sqlite_autoindex_records_1 \
     WHERE key >= ?1 ORDER BY key";

/// Copies every readable record of the SQLite store at `source` into a new SQLite store at
/// `dest` (which must not exist), and reports what could not be read. `source` is opened
/// read-only and never changed. `progress` is called about every 1,000 rows.
///
/// Fails with [`StorageError::Config`] if `dest` exists, and with the error of opening
/// `source` when nothing of it can be read (its first page, which holds the schema, is
/// damaged: [`StorageError::Corrupt`]).
pub fn salvage(
    source: &Path,
    dest: &Path,
    mut progress: impl FnMut(SalvageProgress),
) -> Result<SalvageReport> {
    if dest.exists() {
        return Err(StorageError::Config(format!(
            "{} already exists: salvage writes a new store",
            dest.display()
        )));
    }
    if !source.is_file() {
        return Err(StorageError::Config(format!(
            "{} is not a file",
            source.display()
        )));
    }
    let options = SqliteOptions {
        read_only: true,
        pool_size: 1,
        ..SqliteOptions::default()
    };
    let src = open_read_only(source, &options)
        .map_err(|e| super::connection::open_error(source, "opening the damaged database", e))?;
    // Fails early and clearly when the schema page is unreadable; records keep their
    // versions (a schema-1 file has none).
    let row_sql = if src.prepare(SQL_ROW).is_ok() {
        SQL_ROW
    } else {
        src.prepare(SQL_ROW_WITHOUT_VERSION)
            .map_err(|e| super::connection::open_error(source, "reading the schema", e))?;
        SQL_ROW_WITHOUT_VERSION
    };
    let out = SqliteBackend::open(
        dest,
        &SqliteOptions {
            pool_size: 1,
            ..SqliteOptions::default()
        },
    )?;

    let mut report = SalvageReport::default();
    let mut copied: HashSet<String> = HashSet::new();
    let mut batch: Vec<WriteOp> = Vec::with_capacity(BATCH);
    let max_rowid: Option<i64> = src
        .query_row("SELECT max(rowid) FROM records", [], |r| r.get(0))
        .ok()
        .flatten();
    let now = Timestamp(i64::MIN);
    let mut last = 0i64;
    let mut since_progress = 0u32;
    loop {
        // Walk row ids from `last` until the end or a damaged page.
        let walked = walk_rowids(&src, last, |rowid| {
            last = rowid;
            match read_row(&src, row_sql, rowid) {
                Some((key, record)) => {
                    copied.insert(key.clone());
                    batch.push(WriteOp::Put {
                        key,
                        record,
                        mode: PutMode::Upsert,
                    });
                    report.recovered += 1;
                }
                None => report.unreadable_rows += 1,
            }
            if batch.len() >= BATCH {
                out.write(std::mem::take(&mut batch), now)?;
            }
            since_progress += 1;
            if since_progress >= 1000 {
                since_progress = 0;
                progress(SalvageProgress {
                    recovered: report.recovered,
                    unreadable: report.unreadable_rows + report.skipped_rowids.len() as u64,
                    rowid: last,
                    max_rowid,
                });
            }
            Ok(())
        })?;
        if walked {
            break;
        }
        // A damaged page after `last`: find the next row id that can be reached.
        match next_reachable(&src, last, max_rowid) {
            Some(next) => {
                report.skipped_rowids.push((last + 1, next - 1));
                last = next - 1;
            }
            None => {
                report
                    .skipped_rowids
                    .push((last + 1, max_rowid.unwrap_or(i64::MAX).max(last + 1)));
                break;
            }
        }
    }
    if !batch.is_empty() {
        out.write(batch, now)?;
    }
    progress(SalvageProgress {
        recovered: report.recovered,
        unreadable: report.unreadable_rows + report.skipped_rowids.len() as u64,
        rowid: last,
        max_rowid,
    });
    lost_keys(&src, &copied, &mut report);
    drop(out);
    Ok(report)
}

/// Calls `each` for every row id after `after`, in order. `Ok(true)` when the walk reached
/// the end, `Ok(false)` when it stopped at a damaged page; errors are `each`'s own.
fn walk_rowids(
    src: &Connection,
    after: i64,
    mut each: impl FnMut(i64) -> Result<()>,
) -> Result<bool> {
    let Ok(mut stmt) = src.prepare_cached(SQL_ROWIDS) else {
        return Ok(false);
    };
    let Ok(mut rows) = stmt.query([after]) else {
        return Ok(false);
    };
    loop {
        match rows.next() {
            Ok(Some(row)) => match row.get::<_, i64>(0) {
                Ok(rowid) => each(rowid)?,
                Err(_) => return Ok(false),
            },
            Ok(None) => return Ok(true),
            Err(_) => return Ok(false),
        }
    }
}

/// The first row id after `after` that a seek reaches, probing forward by doubling steps
/// and then bisecting back to the smallest probe that works.
fn next_reachable(src: &Connection, after: i64, max_rowid: Option<i64>) -> Option<i64> {
    let seek = |from: i64| -> Option<i64> {
        src.query_row(SQL_FIRST_FROM, [from], |r| r.get(0))
            .optional()
            .ok()
            .flatten()
    };
    let limit = max_rowid.unwrap_or(i64::MAX / 2);
    let mut failed = after + 1;
    let mut step = 1i64;
    // The first probe that reaches a row.
    let (mut ok, mut found) = loop {
        let probe = after.saturating_add(step);
        if probe > limit {
            return None;
        }
        if let Some(rowid) = seek(probe)
            && rowid > after
            && row_reachable(src, rowid)
        {
            break (probe, rowid);
        }
        failed = probe;
        step = step.saturating_mul(2);
    };
    // Bisect between the last failing probe and the first working one.
    while ok - failed > 1 {
        let mid = failed + (ok - failed) / 2;
        match seek(mid) {
            Some(rowid) if rowid > after && row_reachable(src, rowid) => {
                ok = mid;
                found = rowid;
            }
            _ => failed = mid,
        }
    }
    Some(found)
}

/// The walk can go on from `rowid`: the next rows after it can be stepped to.
fn row_reachable(src: &Connection, rowid: i64) -> bool {
    src.prepare_cached(SQL_ROWIDS)
        .and_then(|mut stmt| {
            let mut rows = stmt.query([rowid - 1])?;
            rows.next().map(|_| ())
        })
        .is_ok()
}

/// One row, whole and consistent, or `None`.
fn read_row(src: &Connection, row_sql: &str, rowid: i64) -> Option<(String, Record)> {
    let (meta, value, key) = src
        .prepare_cached(row_sql)
        .and_then(|mut stmt| {
            stmt.query_row([rowid], |row| {
                Ok((
                    RawMeta::from_row(row)?,
                    row.get::<_, Vec<u8>>(9)?,
                    row.get::<_, String>(10)?,
                ))
            })
        })
        .ok()?;
    let meta = meta.into_meta(&key).ok()?;
    if meta.size != value.len() as u64 {
        // A size that does not match its value is damage too.
        return None;
    }
    Some((key, Record { value, meta }))
}

/// Reads the key index and lists, in runs, the keys it names that were not copied.
fn lost_keys(src: &Connection, copied: &HashSet<String>, report: &mut SalvageReport) {
    let mut run: Option<LostKeys> = None;
    let mut complete = false;
    if let Ok(mut stmt) = src.prepare(SQL_INDEX_KEYS)
        && let Ok(mut rows) = stmt.query([""])
    {
        loop {
            match rows.next() {
                Ok(Some(row)) => {
                    let Ok(key) = row.get::<_, String>(0) else {
                        break;
                    };
                    if copied.contains(&key) {
                        if let Some(done) = run.take() {
                            report.lost_key_count += done.count;
                            report.lost_keys.push(done);
                        }
                    } else {
                        match &mut run {
                            Some(run) => {
                                run.last.clone_from(&key);
                                run.count += 1;
                            }
                            None => {
                                run = Some(LostKeys {
                                    first: key.clone(),
                                    last: key.clone(),
                                    count: 1,
                                });
                            }
                        }
                    }
                }
                Ok(None) => {
                    complete = true;
                    break;
                }
                Err(_) => break,
            }
        }
    }
    if let Some(done) = run.take() {
        report.lost_key_count += done.count;
        report.lost_keys.push(done);
    }
    report.key_index_incomplete = !complete;
}
