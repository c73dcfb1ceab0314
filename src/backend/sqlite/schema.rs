//! The schema: the `records` table, the statements run on it, and how a row becomes a
//! record's metadata.
//!
//! ```sql
//! CREATE TABLE records (
//!     key         TEXT PRIMARY KEY NOT NULL,
//!     created_at  INTEGER NOT NULL,  -- ms since the Unix epoch
//!     modified_at INTEGER NOT NULL,
//!     accessed_at INTEGER NOT NULL,
//!     expires_at  INTEGER,           -- NULL = never expires
//!     size        INTEGER NOT NULL,  -- length of `value`
//!     compressed  INTEGER NOT NULL,  -- 0 / 1
//!     encrypted   INTEGER NOT NULL,  -- 0 / 1
//!     custom      TEXT,              -- the game's metadata as a JSON object, NULL when empty
//!     version     INTEGER NOT NULL DEFAULT 0, -- the record's version (u64 bits as i64)
//!     value       BLOB NOT NULL      -- the encoded record, as the codec produced it
//! );
//! CREATE INDEX records_expires_at ON records (expires_at) WHERE expires_at IS NOT NULL;
//! ```
//!
//! The value is the last column so that reading metadata (`get_meta`, `scan`, `usage`) never
//! walks the overflow pages of a large value. The table keeps its rowid (the key is a unique
//! index beside it): records are often kilobytes, and a `WITHOUT ROWID` table, which stores
//! whole rows in its key b-tree, measured about 2× slower per put at 1 KiB values and 3× at
//! 16 KiB (equal at 64 bytes). The partial index on `expires_at` serves `purge_expired`.
//!
//! Keys compare with SQLite's `BINARY` collation (`memcmp` of UTF-8), which is Rust's `str`
//! order, so a prefix scan is a range scan of the key index:
//! `key >= prefix AND key < successor(prefix)`; `%` and `_` have no special meaning.
//!
//! The schema version is kept in `PRAGMA user_version` (currently 2). A database written by a
//! newer version of this crate is refused at [`open`](super::SqliteBackend::open) rather than
//! misread; a file that is not a SQLite database is refused with `Corrupt`, which says so.
//!
//! Version 2 added the `version` column ([`RecordVersion`](crate::backend::RecordVersion)).
//! A version-1 database gets it at open with `ALTER TABLE ... ADD COLUMN` (constant time: the
//! rows are not rewritten, and read as version 0 until they are written again). There the
//! column comes after `value`, so reading one record's version may walk its overflow pages;
//! listings, usage and purges never read it.

use std::path::Path;

use rusqlite::ffi::ErrorCode;
use rusqlite::{Connection, Row, TransactionBehavior};

use super::BACKEND;
use super::connection::{error_code, open_error};
use crate::backend::{CustomMetadata, RecordMeta, RecordVersion};
use crate::clock::Timestamp;
use crate::error::{Result, StorageError};

/// The schema version this build writes and reads (`PRAGMA user_version`).
pub(super) const SCHEMA_VERSION: i64 = 2;

/// Idempotent: run at every open so a database with the right version but a missing table (a
/// game's own database that happens to use `user_version`) gets one.
pub(super) const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS records (
    key         TEXT PRIMARY KEY NOT NULL,
    created_at  INTEGER NOT NULL,
    modified_at INTEGER NOT NULL,
    accessed_at INTEGER NOT NULL,
    expires_at  INTEGER,
    size        INTEGER NOT NULL,
    compressed  INTEGER NOT NULL,
    encrypted   INTEGER NOT NULL,
    custom      TEXT,
    version     INTEGER NOT NULL DEFAULT 0,
    value       BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS records_expires_at ON records (expires_at)
    WHERE expires_at IS NOT NULL;
";

// Statements. All but the readers' `SQL_GET_VALUE` (see `connection::ReaderStatements`) run
// through `prepare_cached`.
pub(super) const SQL_GET: &str = "SELECT created_at, modified_at, accessed_at, expires_at, size, compressed, \
     encrypted, custom, version, value FROM records WHERE key = ?1";
pub(super) const SQL_GET_VALUE: &str = "SELECT expires_at, value FROM records WHERE key = ?1";
pub(super) const SQL_GET_META: &str = "SELECT created_at, modified_at, accessed_at, expires_at, size, \
     compressed, encrypted, custom, version FROM records WHERE key = ?1";
pub(super) const SQL_PREVIOUS: &str =
    "SELECT size, expires_at, created_at, version FROM records WHERE key = ?1";
/// The upsert of a put that read the previous record first (`?11` is the version).
pub(super) const SQL_UPSERT: &str = "INSERT INTO records (key, created_at, modified_at, accessed_at, \
     expires_at, size, compressed, encrypted, custom, value, version) \
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11) \
     ON CONFLICT (key) DO UPDATE SET created_at = excluded.created_at, \
     modified_at = excluded.modified_at, accessed_at = excluded.accessed_at, \
     expires_at = excluded.expires_at, size = excluded.size, compressed = excluded.compressed, \
     encrypted = excluded.encrypted, custom = excluded.custom, value = excluded.value, \
     version = excluded.version";
/// A put conditional on a version, in one statement: it replaces the record only if it is
/// live at `?12` (`now`) and of version `?11`, keeping its `created_at` (`?10` is the new
/// version). No row changed means refused; the caller then reads the record for the error.
pub(super) const SQL_UPDATE_IF_VERSION: &str = "UPDATE records SET modified_at = ?2, \
     accessed_at = ?3, expires_at = ?4, size = ?5, compressed = ?6, encrypted = ?7, \
     custom = ?8, value = ?9, version = ?10 \
     WHERE key = ?1 AND version = ?11 AND (expires_at IS NULL OR expires_at > ?12)";
/// The upsert of a plain put: no lookup of the previous record. It keeps the stored
/// `created_at` of a live record (?11 is `now`, ?12 the version) and reports no previous
/// size (see [`WriteOutcome::previous_size`](crate::backend::WriteOutcome::previous_size)).
pub(super) const SQL_UPSERT_KEEP_CREATED: &str = "INSERT INTO records (key, created_at, modified_at, accessed_at, \
     expires_at, size, compressed, encrypted, custom, value, version) \
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?12) \
     ON CONFLICT (key) DO UPDATE SET created_at = CASE WHEN records.expires_at IS NOT NULL \
     AND records.expires_at <= ?11 THEN excluded.created_at ELSE records.created_at END, \
     modified_at = excluded.modified_at, accessed_at = excluded.accessed_at, \
     expires_at = excluded.expires_at, size = excluded.size, compressed = excluded.compressed, \
     encrypted = excluded.encrypted, custom = excluded.custom, value = excluded.value, \
     version = excluded.version";
pub(super) const SQL_DELETE: &str = "DELETE FROM records WHERE key = ?1 RETURNING size, expires_at";
/// [`Backend::delete_if_unchanged`](crate::backend::Backend::delete_if_unchanged): one
/// statement, so the comparison and the removal are one transaction.
pub(super) const SQL_DELETE_IF_UNCHANGED: &str =
    "DELETE FROM records WHERE key = ?1 AND value = ?2 AND expires_at IS ?3";
pub(super) const SQL_TOUCH: &str = "UPDATE records SET accessed_at = ?2 WHERE key = ?1";
pub(super) const SQL_SCAN_ALL: &str = "SELECT key, size, expires_at FROM records";
pub(super) const SQL_SCAN_FROM: &str = "SELECT key, size, expires_at FROM records WHERE key >= ?1";
pub(super) const SQL_SCAN_RANGE: &str =
    "SELECT key, size, expires_at FROM records WHERE key >= ?1 AND key < ?2";
/// One page of a listing: keys in `[?1, ?2)` (the prefix's range; `?2` NULL for no upper
/// bound) after `?3`, in key order.
pub(super) const SQL_SCAN_PAGE: &str = "SELECT key, size, expires_at FROM records \
     WHERE key >= ?1 AND (?2 IS NULL OR key < ?2) AND key > ?3 ORDER BY key LIMIT ?4";
pub(super) const SQL_PURGE: &str =
    "DELETE FROM records WHERE expires_at IS NOT NULL AND expires_at <= ?1";
pub(super) const SQL_CLEAR: &str = "DELETE FROM records";
pub(super) const SQL_USAGE: &str = "SELECT count(*), coalesce(sum(size), 0) FROM records \
     WHERE expires_at IS NULL OR expires_at > ?1";
pub(super) const SQL_HEALTH: &str = "SELECT 1 FROM records LIMIT 1";

/// Statements prepared on the writer at open, so a database whose `records` table does not
/// have the expected shape is refused at open rather than at the first write.
pub(super) const WRITER_STATEMENTS: [&str; 8] = [
    SQL_PREVIOUS,
    SQL_UPSERT,
    SQL_DELETE,
    SQL_DELETE_IF_UNCHANGED,
    SQL_TOUCH,
    SQL_PURGE,
    SQL_CLEAR,
    SQL_HEALTH,
];

/// Statements the readers run, checked the same way at open.
pub(super) const READER_STATEMENTS: [&str; 7] = [
    SQL_GET,
    SQL_GET_VALUE,
    SQL_GET_META,
    SQL_SCAN_ALL,
    SQL_SCAN_FROM,
    SQL_SCAN_RANGE,
    SQL_USAGE,
];

/// Checks `user_version` and creates the schema, in one immediate transaction so that two
/// processes opening a new file at once do not race.
pub(super) fn migrate(conn: &mut Connection, path: &Path) -> Result<()> {
    let fail = |e| open_error(path, "creating the schema", e);
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(fail)?;
    let version: i64 = tx
        .pragma_query_value(None, "user_version", |row| row.get(0))
        .map_err(fail)?;
    if version > SCHEMA_VERSION {
        return Err(StorageError::backend(
            BACKEND,
            format!(
                "{} has schema version {version}, newer than the version {SCHEMA_VERSION} this \
                 build of bevy_storage understands; upgrade bevy_storage to open it",
                path.display()
            ),
        ));
    }
    tx.execute_batch(SCHEMA).map_err(|e| match error_code(&e) {
        // A plain SQL error here means a table or index of that name with other columns.
        Some(ErrorCode::Unknown) => schema_mismatch(path, e),
        _ => fail(e),
    })?;
    // Version 1 had no `version` column: add it (constant time, see the module docs).
    let has_version: bool = tx
        .query_row(
            "SELECT count(*) > 0 FROM pragma_table_info('records') WHERE name = 'version'",
            [],
            |row| row.get(0),
        )
        .map_err(fail)?;
    if !has_version {
        tx.execute_batch("ALTER TABLE records ADD COLUMN version INTEGER NOT NULL DEFAULT 0")
            .map_err(|e| match error_code(&e) {
                Some(ErrorCode::Unknown) => schema_mismatch(path, e),
                _ => fail(e),
            })?;
    }
    if version < SCHEMA_VERSION {
        tx.pragma_update(None, "user_version", SCHEMA_VERSION)
            .map_err(fail)?;
    }
    tx.commit().map_err(fail)
}

/// The database has a `records` table this build cannot use.
pub(super) fn schema_mismatch(path: &Path, e: rusqlite::Error) -> StorageError {
    StorageError::backend(
        BACKEND,
        format!(
            "{} has a `records` table that does not match this version of bevy_storage ({e}); \
             it was not created by bevy_storage, or it is damaged",
            path.display()
        ),
    )
}

pub(super) use crate::key::prefix_upper_bound;

/// The metadata columns as stored, before checks.
pub(super) struct RawMeta {
    created_at: i64,
    modified_at: i64,
    accessed_at: i64,
    expires_at: Option<i64>,
    size: i64,
    compressed: bool,
    encrypted: bool,
    custom: Option<String>,
    version: i64,
}

impl RawMeta {
    /// Reads the first nine columns of [`SQL_GET`] / [`SQL_GET_META`].
    pub(super) fn from_row(row: &Row<'_>) -> rusqlite::Result<Self> {
        Ok(Self {
            created_at: row.get(0)?,
            modified_at: row.get(1)?,
            accessed_at: row.get(2)?,
            expires_at: row.get(3)?,
            size: row.get(4)?,
            compressed: row.get(5)?,
            encrypted: row.get(6)?,
            custom: row.get(7)?,
            version: row.get(8)?,
        })
    }

    pub(super) fn into_meta(self, key: &str) -> Result<RecordMeta> {
        let size = u64::try_from(self.size)
            .map_err(|_| StorageError::corrupt(key, format!("negative size {}", self.size)))?;
        let custom = match self.custom {
            None => CustomMetadata::new(),
            Some(json) => serde_json::from_str(&json).map_err(|e| {
                StorageError::corrupt(key, format!("custom metadata is not a JSON object: {e}"))
            })?,
        };
        Ok(RecordMeta {
            created_at: Timestamp(self.created_at),
            modified_at: Timestamp(self.modified_at),
            accessed_at: Timestamp(self.accessed_at),
            expires_at: self.expires_at.map(Timestamp),
            size,
            compressed: self.compressed,
            encrypted: self.encrypted,
            custom,
            version: RecordVersion(self.version as u64),
        })
    }
}

#[cfg(test)]
mod tests {
    use rusqlite::Connection;
    use tempfile::TempDir;

    use super::*;
    use crate::backend::sqlite::testing::*;
    use crate::backend::sqlite::{SqliteBackend, SqliteOptions};

    #[test]
    fn prefix_upper_bounds() {
        assert_eq!(prefix_upper_bound(""), None);
        assert_eq!(prefix_upper_bound("user_").as_deref(), Some("user`"));
        assert_eq!(prefix_upper_bound("a").as_deref(), Some("b"));
        assert_eq!(prefix_upper_bound("é").as_deref(), Some("ê"));
        assert_eq!(prefix_upper_bound("\u{7F}").as_deref(), Some("\u{80}"));
        assert_eq!(prefix_upper_bound("\u{7FF}").as_deref(), Some("\u{800}"));
        assert_eq!(
            prefix_upper_bound("x\u{D7FF}").as_deref(),
            Some("x\u{E000}")
        );
        assert_eq!(prefix_upper_bound("\u{FFFF}").as_deref(), Some("\u{10000}"));
        assert_eq!(prefix_upper_bound("a\u{10FFFF}").as_deref(), Some("b"));
        assert_eq!(
            prefix_upper_bound("ab\u{10FFFF}\u{10FFFF}").as_deref(),
            Some("ac")
        );
        assert_eq!(prefix_upper_bound("\u{10FFFF}"), None);
        assert_eq!(prefix_upper_bound("\u{10FFFF}\u{10FFFF}"), None);
    }

    /// SQLite's query plan for `sql` run with `params`, one line per step.
    fn query_plan(conn: &Connection, sql: &str, params: impl rusqlite::Params) -> String {
        conn.prepare(&format!("EXPLAIN QUERY PLAN {sql}"))
            .unwrap()
            .query_map(params, |row| row.get::<_, String>(3))
            .unwrap()
            .collect::<rusqlite::Result<Vec<_>>>()
            .unwrap()
            .join("\n")
    }

    #[test]
    fn every_statement_uses_an_index() {
        let dir = TempDir::new().unwrap();
        let b = open(&dir);
        let w = b.writer.lock();
        let by_key = "SEARCH records USING INDEX sqlite_autoindex_records_1 (key=?)";
        for sql in [SQL_GET, SQL_GET_META, SQL_PREVIOUS, SQL_DELETE] {
            let plan = query_plan(&w, sql, ["k"]);
            assert!(plan.contains(by_key), "{sql}: {plan}");
        }
        let plan = query_plan(&w, SQL_TOUCH, rusqlite::params!["k", 1]);
        assert!(plan.contains(by_key), "{plan}");
        let plan = query_plan(&w, SQL_DELETE_IF_UNCHANGED, rusqlite::params!["k", b"v", 1]);
        assert!(plan.contains(by_key), "{plan}");
        let plan = query_plan(&w, SQL_SCAN_RANGE, ["a", "b"]);
        let range = "SEARCH records USING INDEX sqlite_autoindex_records_1 (key>? AND key<?)";
        assert!(plan.contains(range), "{plan}");
        let plan = query_plan(&w, SQL_SCAN_FROM, ["a"]);
        let from = "SEARCH records USING INDEX sqlite_autoindex_records_1 (key>?)";
        assert!(plan.contains(from), "{plan}");
        let plan = query_plan(&w, SQL_PURGE, [0]);
        assert!(
            plan.contains("SEARCH records USING INDEX records_expires_at"),
            "{plan}"
        );
    }

    #[test]
    fn newer_schema_version_is_refused() {
        let dir = TempDir::new().unwrap();
        drop(open(&dir));
        Connection::open(db(&dir))
            .unwrap()
            .pragma_update(None, "user_version", SCHEMA_VERSION + 1)
            .unwrap();
        let err = SqliteBackend::open(db(&dir), &SqliteOptions::default()).unwrap_err();
        let message = err.to_string();
        assert!(matches!(err, StorageError::Backend { .. }), "{err:?}");
        assert!(message.contains("schema version 3"), "{message}");
        assert!(message.contains("upgrade bevy_storage"), "{message}");
    }

    /// A database of schema version 1 (before records had versions) opens: the column is
    /// added, its records read as version 0, and a save conditional on version 0 replaces
    /// them with a record of a version of its own.
    #[test]
    fn version_1_databases_gain_versions_at_open() {
        use crate::backend::{Backend, PutMode, RecordVersion, WriteOp};
        use crate::error::StorageError;
        let dir = TempDir::new().unwrap();
        let conn = Connection::open(db(&dir)).unwrap();
        conn.execute_batch(
            "CREATE TABLE records (key TEXT PRIMARY KEY NOT NULL, created_at INTEGER NOT NULL, \
             modified_at INTEGER NOT NULL, accessed_at INTEGER NOT NULL, expires_at INTEGER, \
             size INTEGER NOT NULL, compressed INTEGER NOT NULL, encrypted INTEGER NOT NULL, \
             custom TEXT, value BLOB NOT NULL);
             INSERT INTO records VALUES ('old', 5, 5, 5, NULL, 3, 0, 0, NULL, x'010203');
             PRAGMA user_version = 1;",
        )
        .unwrap();
        drop(conn);
        let b = open(&dir);
        let meta = b.get_meta("old").unwrap().unwrap();
        assert_eq!(meta.version, RecordVersion(0));
        assert_eq!(b.get("old").unwrap().unwrap().value, [1, 2, 3]);
        let conditional = |expected, value: &[u8]| WriteOp::Put {
            key: "old".into(),
            record: record(value, at(10), None),
            mode: PutMode::IfVersion(expected),
        };
        let err = b
            .write(vec![conditional(RecordVersion(7), b"no")], at(10))
            .unwrap_err();
        assert!(
            matches!(
                err,
                StorageError::VersionConflict {
                    found: Some(RecordVersion(0)),
                    ..
                }
            ),
            "{err:?}"
        );
        let next = conditional(RecordVersion(0), b"new");
        let WriteOp::Put {
            record: written, ..
        } = &next
        else {
            unreachable!()
        };
        let version = written.meta.version;
        b.write(vec![next], at(10)).unwrap();
        let meta = b.get_meta("old").unwrap().unwrap();
        assert_eq!(
            meta.version, version,
            "the put's version is stored as given"
        );
        assert_eq!(
            meta.created_at,
            Timestamp(5),
            "an overwrite keeps the creation time"
        );
        drop(b);
        let version: i64 = Connection::open(db(&dir))
            .unwrap()
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .unwrap();
        assert_eq!(version, SCHEMA_VERSION);
    }

    #[test]
    fn foreign_records_table_is_refused() {
        let dir = TempDir::new().unwrap();
        Connection::open(db(&dir))
            .unwrap()
            .execute_batch("CREATE TABLE records (id INTEGER PRIMARY KEY, name TEXT)")
            .unwrap();
        let err = SqliteBackend::open(db(&dir), &SqliteOptions::default()).unwrap_err();
        assert!(err.to_string().contains("does not match"), "{err}");
    }
}
