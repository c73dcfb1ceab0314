//! Purging expired records in bounded chunks, and giving their pages back to the file system.
//!
//! One `DELETE` of every expired record held the writer for as long as it ran (520 ms for
//! 100,000 of 1,000,000 records), and every save waited behind it. [`SqliteBackend::purge`]
//! deletes at most [`PURGE_CHUNK`] records per transaction (each found through the
//! `records_expires_at` index) and hands the writer to any waiting save between two chunks
//! (`parking_lot`'s fair unlock), so a save waits for one chunk at most.
//!
//! Databases created by this version use `auto_vacuum=INCREMENTAL` (set before the first
//! table: SQLite cannot switch an existing database without a `VACUUM`). After a purge that
//! removed anything, the free pages are returned in steps of [`VACUUM_STEP_PAGES`] pages
//! (`PRAGMA incremental_vacuum`), again handing the writer over between steps, and the WAL is
//! written back and truncated, so the file shrinks. An older database (`auto_vacuum=NONE`)
//! keeps its free pages for later writes; [`SqliteBackend::compact`] converts it with one
//! `VACUUM`, which holds the writer for as long as it rewrites the file.

use parking_lot::MutexGuard;

use super::SqliteBackend;
use crate::clock::Timestamp;
use crate::error::Result;

/// Records deleted per transaction. At about 5 µs per deleted record (index and table
/// b-trees, 200-byte values) a chunk holds the writer for a few milliseconds.
pub(super) const PURGE_CHUNK: i64 = 500;

/// Pages freed per `incremental_vacuum` step (512 KiB of 4 KiB pages).
pub(super) const VACUUM_STEP_PAGES: i64 = 128;

/// One chunk of a purge: the oldest-expiring records first, through the partial index.
pub(super) const SQL_PURGE_CHUNK: &str = "DELETE FROM records WHERE rowid IN \
     (SELECT rowid FROM records WHERE expires_at IS NOT NULL AND expires_at <= ?1 \
     ORDER BY expires_at LIMIT ?2)";

/// `PRAGMA auto_vacuum` value of incremental vacuuming.
const AUTO_VACUUM_INCREMENTAL: i64 = 2;

impl SqliteBackend {
    /// [`Backend::purge_expired`](crate::backend::Backend::purge_expired) in chunks of
    /// [`PURGE_CHUNK`] records, each its own transaction, then the freed pages given back
    /// (see the module docs). Records that expire while it runs may be removed too.
    pub(super) fn purge(&self, now: Timestamp) -> Result<usize> {
        self.guard_write("removing expired records")?;
        let mut removed = 0;
        loop {
            let conn = self.writer();
            let n = conn
                .prepare_cached(SQL_PURGE_CHUNK)
                .and_then(|mut stmt| stmt.execute(rusqlite::params![now.0, PURGE_CHUNK]))
                .map_err(|e| self.fail(e, format_args!("removing expired records")))?;
            // A save waiting for the writer gets it before the next chunk.
            MutexGuard::unlock_fair(conn);
            removed += n;
            if (n as i64) < PURGE_CHUNK {
                break;
            }
        }
        if removed > 0 {
            self.give_back_free_pages();
        }
        Ok(removed)
    }

    /// Returns the free pages of an incrementally vacuumed database to the file system, a
    /// step at a time, then truncates the WAL. Best effort: a step that fails (a busy or
    /// full disk) leaves the pages free for later writes.
    fn give_back_free_pages(&self) {
        loop {
            let conn = self.writer();
            let incremental = conn
                .query_row("PRAGMA auto_vacuum", [], |r| r.get::<_, i64>(0))
                .is_ok_and(|mode| mode == AUTO_VACUUM_INCREMENTAL);
            let free: i64 = conn
                .query_row("PRAGMA freelist_count", [], |r| r.get(0))
                .unwrap_or(0);
            if !incremental || free == 0 {
                break;
            }
            // The pragma frees one page per row it returns.
            let stepped = conn
                .prepare(&format!("PRAGMA incremental_vacuum({VACUUM_STEP_PAGES})"))
                .and_then(|mut stmt| {
                    let mut rows = stmt.query([])?;
                    while rows.next()?.is_some() {}
                    Ok(())
                });
            MutexGuard::unlock_fair(conn);
            if stepped.is_err() {
                return;
            }
        }
        let conn = self.writer();
        let _ = conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()));
    }

    /// Rewrites the database file without its free pages (`VACUUM`), switching an older
    /// database to incremental vacuuming, so that later purges give their space back by
    /// themselves. Holds the writer (every save waits) for as long as the rewrite takes, about
    /// as long as copying the file; needs free disk space of about the file's size. Returns
    /// the file's size before and after, in bytes.
    pub fn compact(&self) -> Result<(u64, u64)> {
        self.guard_write("compacting the database")?;
        let size = || std::fs::metadata(&self.path).map_or(0, |m| m.len());
        let before = size();
        let conn = self.writer();
        conn.execute_batch("PRAGMA auto_vacuum = INCREMENTAL; VACUUM;")
            .and_then(|()| conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(())))
            .map_err(|e| self.fail(e, format_args!("compacting the database")))?;
        drop(conn);
        Ok((before, size()))
    }
}

#[cfg(test)]
mod tests {
    use tempfile::TempDir;

    use super::*;
    use crate::backend::Backend;
    use crate::backend::sqlite::testing::*;

    fn checkpoint(b: &SqliteBackend) {
        b.writer()
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
            .unwrap();
    }

    #[test]
    fn a_chunk_finds_expired_records_through_the_index() {
        let dir = TempDir::new().unwrap();
        let b = open(&dir);
        let plan: Vec<String> = b
            .writer()
            .prepare(&format!("EXPLAIN QUERY PLAN {SQL_PURGE_CHUNK}"))
            .unwrap()
            .query_map(rusqlite::params![0, 1], |row| row.get(3))
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap();
        let plan = plan.join("\n");
        assert!(plan.contains("INDEX records_expires_at"), "{plan}");
        assert!(!plan.contains("TEMP B-TREE"), "{plan}");
    }

    #[test]
    fn a_purge_in_chunks_removes_every_expired_record_and_nothing_live() {
        let dir = TempDir::new().unwrap();
        let b = open(&dir);
        let chunk = PURGE_CHUNK as usize;
        // Several chunks' worth, interleaved with live records (never, later, at the edge).
        let mut ops = Vec::new();
        for i in 0..(3 * chunk + 17) {
            ops.push(put(
                &format!("gone{i:05}"),
                record(b"x", at(0), Some(at(i as i64 % 50))),
            ));
            ops.push(put(&format!("live{i:05}"), record(b"y", at(0), None)));
            if i % 3 == 0 {
                ops.push(put(
                    &format!("later{i:05}"),
                    record(b"z", at(0), Some(at(51))),
                ));
            }
        }
        let later = ops.len() - 2 * (3 * chunk + 17);
        b.write(ops, at(0)).unwrap();
        assert_eq!(b.purge_expired(at(50)).unwrap(), 3 * chunk + 17);
        let left = keys(b.scan("").unwrap());
        assert_eq!(left.len(), 3 * chunk + 17 + later);
        assert!(left.iter().all(|k| !k.starts_with("gone")));
        assert_eq!(b.purge_expired(at(50)).unwrap(), 0);
        assert_eq!(b.purge_expired(at(51)).unwrap(), later);
        assert!(
            keys(b.scan("").unwrap())
                .iter()
                .all(|k| k.starts_with("live"))
        );
    }

    #[test]
    fn a_purge_gives_the_space_back_and_compact_converts_old_files() {
        let dir = TempDir::new().unwrap();
        let b = open(&dir);
        let big = vec![7u8; 4000];
        let ops = (0..2000)
            .map(|i| put(&format!("k{i}"), record(&big, at(0), Some(at(10)))))
            .collect();
        b.write(ops, at(0)).unwrap();
        put1(&b, "keep", b"1", at(0), None);
        checkpoint(&b);
        let full = std::fs::metadata(db(&dir)).unwrap().len();
        assert!(full > 8_000_000, "{full}");
        assert_eq!(b.purge_expired(at(10)).unwrap(), 2000);
        let after = std::fs::metadata(db(&dir)).unwrap().len();
        assert!(after < full / 10, "{full} -> {after}");
        assert!(b.get("keep").unwrap().is_some());

        // A database made without incremental vacuuming keeps its pages until compacted.
        let old = dir.path().join("old.db");
        {
            let conn = rusqlite::Connection::open(&old).unwrap();
            conn.execute_batch("PRAGMA auto_vacuum = NONE; CREATE TABLE x (a);")
                .unwrap();
        }
        std::fs::remove_file(&old).unwrap();
        let conn = rusqlite::Connection::open(&old).unwrap();
        conn.execute_batch("PRAGMA auto_vacuum = NONE; PRAGMA journal_mode = WAL;")
            .unwrap();
        drop(conn);
        let b = SqliteBackend::open(&old, &Default::default()).unwrap();
        let ops = (0..2000)
            .map(|i| put(&format!("k{i}"), record(&big, at(0), Some(at(10)))))
            .collect();
        b.write(ops, at(0)).unwrap();
        put1(&b, "keep", b"1", at(0), None);
        assert_eq!(b.purge_expired(at(10)).unwrap(), 2000);
        checkpoint(&b);
        let kept = std::fs::metadata(&old).unwrap().len();
        assert!(kept > 8_000_000, "{kept}");
        let (before, after) = b.compact().unwrap();
        assert_eq!(before, kept);
        assert!(after < kept / 10, "{kept} -> {after}");
        assert!(b.get("keep").unwrap().is_some());
        let ops = (0..2000)
            .map(|i| put(&format!("k{i}"), record(&big, at(20), Some(at(30)))))
            .collect();
        b.write(ops, at(20)).unwrap();
        assert_eq!(b.purge_expired(at(30)).unwrap(), 2000);
        assert!(std::fs::metadata(&old).unwrap().len() < kept / 10);
    }
}
