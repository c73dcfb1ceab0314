//! The SQLite backend: every record is one row of one table in an embedded SQLite database.
//!
//! This is the plugin's default store. It is durable (a write that returned `Ok` survives the
//! process being killed, and with [`SqliteSynchronous::Full`] a power loss too), reads run in
//! parallel with writes, and the file can be opened with any SQLite tool for inspection.
//!
//! Every record is one row of the table `records`: `key`, `created_at`, `modified_at`,
//! `accessed_at`, `expires_at` (timestamps in ms since the Unix epoch, `NULL` for never),
//! `size`, `compressed`, `encrypted`, `custom` (the game's metadata as a JSON object) and
//! `value` (the encoded record); the exact schema and its statements are in
//! `sqlite/schema.rs`. A database written by a newer version of this crate is refused at
//! [`open`](SqliteBackend::open) rather than misread; a file that is not a SQLite database
//! (or whose first page is damaged: SQLite cannot tell the two apart) is refused with
//! [`StorageError::Corrupt`], which says so.
//!
//! # Connections
//!
//! - One **writer** connection behind a mutex runs every change (`write`,
//!   `delete_if_unchanged`, `touch`, `purge_expired`, `clear`) and the health check. A batch is one `BEGIN IMMEDIATE`
//!   transaction, so it is all or nothing and never fails half-way with `SQLITE_BUSY`.
//! - A pool of [`SqliteOptions::pool_size`] read-only **reader** connections (`r2d2`) serves
//!   `get`, `get_meta`, `scan` and `usage`. In WAL mode readers never block the writer nor wait
//!   for it, and each read sees the latest committed write.
//!
//! Every connection uses `journal_mode=WAL`, the configured `synchronous` level and busy
//! timeout, `temp_store=MEMORY`, and prepared-statement caching; each reader also keeps the
//! statement of the point read behind every load prepared for its whole life. Readers also set
//! `query_only`. Other processes may open the same file; they wait for each other up to the
//! busy timeout, after which the operation fails with [`StorageError::Unavailable`].
//!
//! # Where the code is
//!
//! | file | holds |
//! |---|---|
//! | `sqlite/mod.rs` | [`SqliteBackend`], [`SqliteOptions`], reads and the [`Backend`] impl |
//! | `sqlite/schema.rs` | the `records` table, its statements, rows to metadata |
//! | `sqlite/connection.rs` | the writer and the reader pool, pragmas, error mapping |
//! | `sqlite/batch.rs` | write batches, one transaction each |
//! | `sqlite/purge.rs` | purging expired records in bounded chunks, giving the space back, `compact` |
//! | `sqlite/salvage.rs` | copying the readable records of a damaged database |
//! | `sqlite/token.rs` | the change token: the wal-index header in `<db>-shm`, read from SQLite's mapping |
//!
//! # Damage, full disks, read-only files
//!
//! A statement that meets a damaged page (`SQLITE_CORRUPT`, `SQLITE_NOTADB`) fails with
//! [`StorageError::Corrupt`] carrying SQLite's message, and the backend remembers it: from
//! then on every write is refused with that error (the file is not written into further),
//! [`Backend::damage`] reports it and the store is unhealthy. A store still opens over a
//! damaged file whose first page is readable, so that what can be read can be;
//! [`salvage::salvage`] (`bevy-storage salvage SRC DEST`) copies every readable record into a
//! new file.
//!
//! A full disk (`SQLITE_FULL`) is [`StorageError::StorageFull`]; the batch is retried once
//! after `PRAGMA wal_checkpoint(TRUNCATE)`, which writes the WAL back and frees its space, so
//! that the pages freed by deletes can be used again.
//!
//! [`SqliteOptions::read_only`] opens the file read-only (as `immutable` on a read-only
//! medium, where SQLite cannot create the WAL's shared memory); a file that cannot be opened
//! for writing (`EROFS`, `EACCES`) is opened that way by itself. Writes then fail with
//! [`StorageError::ReadOnly`].

mod batch;
mod connection;
mod purge;
mod reserve;
pub mod salvage;
mod schema;
#[cfg(test)]
mod testing;
mod token;

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use parking_lot::Mutex;
use r2d2::Pool;
use rusqlite::{Connection, OptionalExtension, Row};

use super::{Backend, ChangeToken, KeyEntry, Record, RecordMeta, Usage, WriteOp, WriteOutcome};
use crate::clock::Timestamp;
use crate::error::{Result, StorageError};
use connection::{
    ReaderManager, check_read_only, is_damage, open_error, open_read_only, open_reader,
    open_writer, read_only_medium, sql_error,
};
use schema::{
    READER_STATEMENTS, RawMeta, SQL_CLEAR, SQL_GET, SQL_GET_META, SQL_HEALTH, SQL_SCAN_ALL,
    SQL_SCAN_FROM, SQL_SCAN_RANGE, SQL_TOUCH, SQL_USAGE, prefix_upper_bound, schema_mismatch,
};

const BACKEND: &str = "sqlite";

/// How hard SQLite syncs to disk (`PRAGMA synchronous`, with the journal in WAL mode).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SqliteSynchronous {
    /// `synchronous=NORMAL`: a committed write survives a crash of the process; the last
    /// writes before a power loss or OS crash may be rolled back (never corrupted). Fast: no
    /// `fsync` per commit. The default.
    #[default]
    Normal,
    /// `synchronous=FULL`: every commit is `fsync`ed, so it also survives a power loss. Slower.
    Full,
}

impl SqliteSynchronous {
    fn pragma_value(self) -> &'static str {
        match self {
            SqliteSynchronous::Normal => "NORMAL",
            #[cfg(not(bevy_storage_sabotage_fsync))]
            SqliteSynchronous::Full => "FULL",
            // The power-loss harness's self-check: `Full` that does not sync (DEVELOPERS.md).
            #[cfg(bevy_storage_sabotage_fsync)]
            SqliteSynchronous::Full => "OFF",
        }
    }
}

/// Tuning of the SQLite backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SqliteOptions {
    /// How hard to sync to disk. Default [`SqliteSynchronous::Normal`].
    pub synchronous: SqliteSynchronous,
    /// Number of reader connections (at least 1). Default 10.
    pub pool_size: u32,
    /// How long an operation waits for a lock held by another connection or process (and a
    /// read for a free reader connection) before failing with
    /// [`StorageError::Unavailable`]. Default 5 s.
    pub busy_timeout: Duration,
    /// Open the database for reading only: every write fails with
    /// [`StorageError::ReadOnly`] and the file is never changed. A store also opens
    /// read-only by itself when the file cannot be written (a read-only mount, no write
    /// permission). Default false.
    pub read_only: bool,
    /// Headroom kept for a full disk: free pages of the database plus a file
    /// `<db>-reserve` allocated beside it, released on `SQLITE_FULL` so that the WAL can
    /// still be written back and the space freed by deletes used again (see
    /// [`StorageError::StorageFull`] and the module docs). Default 4 MiB (about what a WAL
    /// holds between two automatic checkpoints by default); 0 keeps none. On a small disk it
    /// is at most an eighth of the disk's size, and the WAL is checkpointed every headroom's
    /// worth of pages. Not kept when read-only.
    pub disk_reserve: u64,
}

impl Default for SqliteOptions {
    fn default() -> Self {
        Self {
            synchronous: SqliteSynchronous::Normal,
            pool_size: 10,
            busy_timeout: Duration::from_secs(5),
            read_only: false,
            disk_reserve: 4 * 1024 * 1024,
        }
    }
}

/// Records in one table of a SQLite database file. See the [module docs](self) for the
/// connection layout.
pub struct SqliteBackend {
    path: PathBuf,
    // Declared before `writer` so the readers close first and the writer, as the last
    // connection, checkpoints the WAL and removes the `-wal`/`-shm` files.
    readers: Pool<ReaderManager>,
    writer: Mutex<Connection>,
    options: SqliteOptions,
    /// Why the store only reads (the option, or a medium that refused writes).
    read_only: Option<String>,
    /// The damage found in the file, once a statement met it: writes are refused from then on.
    damage: Mutex<Option<String>>,
    /// The disk reserve is not in place (see `sqlite/reserve.rs`).
    reserve_missing: std::sync::atomic::AtomicBool,
    /// The headroom kept for a full disk, in bytes (see `sqlite/reserve.rs`).
    headroom: u64,
    /// The wal-index header in the writer's mapping of `<db>-shm`, the change token
    /// (`sqlite/token.rs`); `None` for a read-only store or without shared memory.
    shm: Option<token::ShmHeader>,
}

impl fmt::Debug for SqliteBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqliteBackend")
            .field("path", &self.path)
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

impl SqliteBackend {
    /// Opens the SQLite database at `path`, creating its parent directories, the file and the
    /// schema if needed.
    ///
    /// Fails with [`StorageError::Config`] for a `pool_size` of 0, with
    /// [`StorageError::Corrupt`] if the file is not a SQLite database or its first page is
    /// damaged, with [`StorageError::Backend`] if it was written by a newer version of this
    /// crate or has a `records` table of another shape, and with
    /// [`StorageError::Unavailable`] if the file cannot be opened or is locked.
    pub fn open(path: impl AsRef<Path>, options: &SqliteOptions) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        if options.pool_size == 0 {
            return Err(StorageError::Config(
                "SqliteOptions::pool_size must be at least 1".into(),
            ));
        }
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| {
                StorageError::io(
                    format!(
                        "creating the directory of the SQLite database {}",
                        path.display()
                    ),
                    e,
                )
            })?;
        }

        let read_only = if options.read_only {
            Some("opened read-only".to_owned())
        } else {
            read_only_medium(&path)
        };
        if let Some(reason) = read_only.as_ref().filter(|_| !options.read_only) {
            tracing::warn!(
                "{}: {reason}; the store is opened read-only",
                path.display()
            );
        }
        let writer = match &read_only {
            None => open_writer(&path, options)?,
            Some(_) => {
                if !path.exists() {
                    return Err(StorageError::read_only(
                        BACKEND,
                        format!("creating {}", path.display()),
                        "the store is opened read-only and the database does not exist",
                    ));
                }
                let conn = open_read_only(&path, options)
                    .map_err(|e| open_error(&path, "opening the database read-only", e))?;
                check_read_only(&conn, &path)?;
                conn
            }
        };

        let manager = ReaderManager {
            path: path.clone(),
            options: options.clone(),
            read_only: read_only.is_some(),
        };
        // Open one reader here so that a failure is reported now, clearly, instead of the
        // pool retrying in the background until its timeout.
        let probe = if read_only.is_some() {
            open_read_only(&path, options)
        } else {
            open_reader(&path, options)
        }
        .map_err(|e| open_error(&path, "opening a reader connection", e))?;
        for sql in READER_STATEMENTS {
            probe.prepare(sql).map_err(|e| schema_mismatch(&path, e))?;
        }
        drop(probe);
        let readers = Pool::builder()
            .max_size(options.pool_size)
            .test_on_check_out(false)
            .idle_timeout(None)
            .max_lifetime(None)
            .connection_timeout(options.busy_timeout.max(Duration::from_secs(1)))
            .build(manager)
            .map_err(|e| {
                StorageError::unavailable(
                    BACKEND,
                    format!("opening the reader connections to {}: {e}", path.display()),
                )
            })?;

        let headroom = if read_only.is_some() {
            0
        } else {
            reserve::headroom(&path, options.disk_reserve)
        };
        if headroom > 0 {
            // The WAL never holds more than the headroom between two checkpoints, so that
            // the headroom always suffices to write it back.
            let pages = i64::try_from(headroom / 4096).unwrap_or(i64::MAX).max(16);
            let _ = writer.pragma_update(None, "wal_autocheckpoint", pages);
        }
        let reserve_missing = !reserve::resize(&reserve::reserve_path(&path), headroom);
        if reserve_missing {
            tracing::warn!(
                "{}: no room for the {headroom} byte disk reserve; saves are refused until \
                 there is",
                path.display()
            );
        }
        let shm = match read_only {
            None => token::ShmHeader::map(&writer),
            Some(_) => None,
        };
        Ok(Self {
            path,
            readers,
            shm,
            writer: Mutex::new(writer),
            options: options.clone(),
            read_only,
            damage: Mutex::new(None),
            reserve_missing: reserve_missing.into(),
            headroom,
        })
    }

    /// The database file's path, as given to [`open`](Self::open).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The writer connection, rolled back first if an earlier failure left a transaction
    /// open on it.
    fn writer(&self) -> parking_lot::MutexGuard<'_, Connection> {
        let conn = self.writer.lock();
        if !conn.is_autocommit() {
            // Best effort: if this fails too, the next statement reports the real problem.
            let _ = conn.execute_batch("ROLLBACK");
        }
        conn
    }

    /// A reader connection from the pool.
    fn reader(&self) -> Result<r2d2::PooledConnection<ReaderManager>> {
        self.readers.get().map_err(|e| {
            StorageError::unavailable(
                BACKEND,
                format!(
                    "no reader connection to {} became free or could be opened: {e}",
                    self.path.display()
                ),
            )
        })
    }

    /// Maps a failure of `doing` (lazily formatted) on this database. Damage is
    /// [`StorageError::Corrupt`] with SQLite's message, and is remembered: from then on
    /// every write is refused (see [`guard_write`](Self::guard_write)).
    fn fail(&self, e: rusqlite::Error, doing: fmt::Arguments<'_>) -> StorageError {
        if is_damage(&e) {
            let reason = format!(
                "the SQLite database is damaged ({doing}: {e}); writes are refused so as not to \
                 damage it further; copy its readable records to a new store with \
                 `bevy-storage salvage`"
            );
            let mut damage = self.damage.lock();
            if damage.is_none() {
                tracing::error!("{}: {reason}", self.path.display());
                *damage = Some(reason.clone());
            }
            return StorageError::Corrupt {
                key: self.path.display().to_string(),
                reason,
            };
        }
        sql_error(e, &format!("{doing} in {}", self.path.display()))
    }

    /// Refuses `operation` on a read-only or damaged database, before it touches the file.
    fn guard_write(&self, operation: &str) -> Result<()> {
        if let Some(reason) = &self.read_only {
            return Err(StorageError::read_only(BACKEND, operation, reason.clone()));
        }
        if let Some(reason) = &*self.damage.lock() {
            return Err(StorageError::Corrupt {
                key: self.path.display().to_string(),
                reason: reason.clone(),
            });
        }
        Ok(())
    }
}

impl Backend for SqliteBackend {
    fn backend_type(&self) -> &str {
        BACKEND
    }

    fn get(&self, key: &str) -> Result<Option<Record>> {
        let conn = self.reader()?;
        let row = conn
            .prepare_cached(SQL_GET)
            .and_then(|mut stmt| {
                stmt.query_row([key], |row| {
                    Ok((RawMeta::from_row(row)?, row.get::<_, Vec<u8>>(9)?))
                })
                .optional()
            })
            .map_err(|e| self.fail(e, format_args!("reading a record")))?;
        drop(conn);
        row.map(|(meta, value)| {
            Ok(Record {
                value,
                meta: meta.into_meta(key)?,
            })
        })
        .transpose()
    }

    fn get_value(&self, key: &str) -> Result<Option<(Vec<u8>, Option<Timestamp>)>> {
        let mut conn = self.reader()?;
        let row = conn
            .0
            .with_dependent_mut(|_, statements| {
                statements
                    .get_value
                    .query_row([key], |row| {
                        Ok((row.get::<_, Vec<u8>>(1)?, row.get::<_, Option<i64>>(0)?))
                    })
                    .optional()
            })
            .map_err(|e| self.fail(e, format_args!("reading a record")))?;
        Ok(row.map(|(value, expires_at)| (value, expires_at.map(Timestamp))))
    }

    fn get_meta(&self, key: &str) -> Result<Option<RecordMeta>> {
        let conn = self.reader()?;
        let row = conn
            .prepare_cached(SQL_GET_META)
            .and_then(|mut stmt| stmt.query_row([key], RawMeta::from_row).optional())
            .map_err(|e| self.fail(e, format_args!("reading record metadata")))?;
        drop(conn);
        row.map(|meta| meta.into_meta(key)).transpose()
    }

    fn write(&self, ops: Vec<WriteOp>, now: Timestamp) -> Result<Vec<WriteOutcome>> {
        self.write_batch(ops, now)
    }

    fn write_reporting_sizes(
        &self,
        ops: Vec<WriteOp>,
        now: Timestamp,
    ) -> Result<Vec<WriteOutcome>> {
        self.write_batch_reporting_sizes(ops, now)
    }

    fn reports_replaced_sizes(&self) -> bool {
        true
    }

    fn delete_if_unchanged(
        &self,
        key: &str,
        value: &[u8],
        expires_at: Option<Timestamp>,
    ) -> Result<bool> {
        self.delete_row_if_unchanged(key, value, expires_at)
    }

    fn change_token(&self) -> Option<ChangeToken> {
        self.shm.as_ref()?.read()
    }

    fn touch(&self, key: &str, at: Timestamp) -> Result<()> {
        self.guard_write("updating an access time")?;
        let conn = self.writer();
        conn.prepare_cached(SQL_TOUCH)
            .and_then(|mut stmt| stmt.execute(rusqlite::params![key, at.0]))
            .map_err(|e| self.fail(e, format_args!("updating an access time")))?;
        Ok(())
    }

    fn scan(&self, prefix: &str) -> Result<Vec<KeyEntry>> {
        let conn = self.reader()?;
        let upper = prefix_upper_bound(prefix);
        let run = || -> rusqlite::Result<Vec<(String, i64, Option<i64>)>> {
            let read = |row: &Row<'_>| Ok((row.get(0)?, row.get(1)?, row.get(2)?));
            match (prefix.is_empty(), &upper) {
                (true, _) => conn
                    .prepare_cached(SQL_SCAN_ALL)?
                    .query_map([], read)?
                    .collect(),
                (false, None) => conn
                    .prepare_cached(SQL_SCAN_FROM)?
                    .query_map([prefix], read)?
                    .collect(),
                (false, Some(upper)) => conn
                    .prepare_cached(SQL_SCAN_RANGE)?
                    .query_map([prefix, upper.as_str()], read)?
                    .collect(),
            }
        };
        let rows = run().map_err(|e| self.fail(e, format_args!("listing keys")))?;
        drop(conn);
        key_entries(rows)
    }

    fn scan_page(&self, prefix: &str, after: Option<&str>, limit: usize) -> Result<Vec<KeyEntry>> {
        let conn = self.reader()?;
        let upper = prefix_upper_bound(prefix);
        // `after` below the prefix's range is the same as no `after`.
        let after = after.unwrap_or("");
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = conn
            .prepare_cached(schema::SQL_SCAN_PAGE)
            .and_then(|mut statement| {
                statement
                    .query_map(rusqlite::params![prefix, upper, after, limit], |row| {
                        Ok((row.get(0)?, row.get(1)?, row.get(2)?))
                    })?
                    .collect::<rusqlite::Result<Vec<(String, i64, Option<i64>)>>>()
            })
            .map_err(|e| self.fail(e, format_args!("listing a page of keys")))?;
        drop(conn);
        key_entries(rows)
    }

    fn purge_expired(&self, now: Timestamp) -> Result<usize> {
        self.purge(now)
    }

    fn clear(&self) -> Result<()> {
        self.guard_write("removing every record")?;
        let conn = self.writer();
        conn.prepare_cached(SQL_CLEAR)
            .and_then(|mut stmt| stmt.execute([]))
            .map_err(|e| self.fail(e, format_args!("removing every record")))?;
        Ok(())
    }

    fn usage(&self, now: Timestamp) -> Result<Usage> {
        let conn = self.reader()?;
        let (count, total): (i64, i64) = conn
            .prepare_cached(SQL_USAGE)
            .and_then(|mut stmt| stmt.query_row([now.0], |row| Ok((row.get(0)?, row.get(1)?))))
            .map_err(|e| self.fail(e, format_args!("computing usage")))?;
        Ok(Usage {
            item_count: u64::try_from(count).unwrap_or(0),
            total_size: u64::try_from(total).unwrap_or(0),
        })
    }

    fn available_space(&self) -> Option<u64> {
        let dir = match self.path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        fs4::available_space(dir).ok()
    }

    fn read_only(&self) -> Option<String> {
        self.read_only.clone()
    }

    fn damage(&self) -> Option<String> {
        self.damage.lock().clone()
    }

    fn health_check(&self) -> Result<()> {
        let conn = self.writer();
        conn.prepare_cached(SQL_HEALTH)
            .and_then(|mut stmt| stmt.query([])?.next().map(|_| ()))
            .map_err(|e| self.fail(e, format_args!("checking the database")))
    }
}

/// Listing rows (`key, size, expires_at`) as entries; a negative size is damage.
fn key_entries(rows: Vec<(String, i64, Option<i64>)>) -> Result<Vec<KeyEntry>> {
    rows.into_iter()
        .map(|(key, size, expires_at)| {
            let size = u64::try_from(size)
                .map_err(|_| StorageError::corrupt(&key, format!("negative size {size}")))?;
            Ok(KeyEntry {
                key,
                size,
                expires_at: expires_at.map(Timestamp),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use serde_json::json;
    use tempfile::TempDir;

    use super::connection::configure;
    use super::schema::{SCHEMA, SQL_UPSERT};
    use super::testing::*;
    use super::*;
    use crate::backend::MemoryBackend;

    #[test]
    fn round_trip_through_reopen() {
        let dir = TempDir::new().unwrap();
        let mut full = record(b"\x00\x01binary\xff", at(0), Some(at(1_000_000)));
        full.meta.compressed = true;
        full.meta.encrypted = true;
        full.meta.accessed_at = at(5);
        full.meta.custom.insert("level".into(), json!("Forest"));
        full.meta
            .custom
            .insert("stats".into(), json!({"hp": 10, "items": [1, 2.5, null]}));
        let plain = record(b"plain", at(1), None);
        let empty = record(b"", at(2), None);
        let internal_key = "\u{1}bevy_storage/meta";
        {
            let b = open(&dir);
            assert_eq!(b.path(), db(&dir));
            b.write(
                vec![
                    put("full", full.clone()),
                    put("plain", plain.clone()),
                    put("empty", empty.clone()),
                    put(internal_key, plain.clone()),
                ],
                at(3),
            )
            .unwrap();
        }
        let b = open(&dir);
        assert_eq!(b.get("full").unwrap(), Some(full.clone()));
        assert_eq!(b.get("plain").unwrap(), Some(plain.clone()));
        assert_eq!(b.get("empty").unwrap(), Some(empty.clone()));
        assert_eq!(b.get(internal_key).unwrap(), Some(plain.clone()));
        assert_eq!(b.get("missing").unwrap(), None);
        assert_eq!(b.get_meta("full").unwrap(), Some(full.meta.clone()));
        assert_eq!(b.get_meta("missing").unwrap(), None);
        let mut entries = b.scan("").unwrap();
        entries.sort_by(|a, b| a.key.cmp(&b.key));
        assert_eq!(
            entries,
            vec![
                KeyEntry {
                    key: internal_key.into(),
                    size: 5,
                    expires_at: None
                },
                KeyEntry {
                    key: "empty".into(),
                    size: 0,
                    expires_at: None
                },
                KeyEntry {
                    key: "full".into(),
                    size: full.meta.size,
                    expires_at: Some(at(1_000_000))
                },
                KeyEntry {
                    key: "plain".into(),
                    size: 5,
                    expires_at: None
                },
            ]
        );
        // Empty custom metadata is stored as NULL.
        let custom: Option<String> = b
            .writer
            .lock()
            .query_row("SELECT custom FROM records WHERE key = 'plain'", [], |r| {
                r.get(0)
            })
            .unwrap();
        assert_eq!(custom, None);
    }

    #[test]
    fn creates_parent_directories() {
        let dir = TempDir::new().unwrap();
        let path = dir.path().join("a/b/c/game.db");
        let b = SqliteBackend::open(&path, &SqliteOptions::default()).unwrap();
        put1(&b, "k", b"v", at(0), None);
        assert!(path.is_file());
        assert!(b.available_space().is_some_and(|n| n > 0));
        b.health_check().unwrap();
    }

    #[test]
    fn zero_pool_size_is_a_config_error() {
        let dir = TempDir::new().unwrap();
        let options = SqliteOptions {
            pool_size: 0,
            ..SqliteOptions::default()
        };
        let err = SqliteBackend::open(db(&dir), &options).unwrap_err();
        assert!(matches!(err, StorageError::Config(_)), "{err:?}");
    }

    #[test]
    fn scan_is_a_literal_prefix_match() {
        let dir = TempDir::new().unwrap();
        let b = open(&dir);
        let mem = MemoryBackend::new();
        let all_keys = [
            "user_1",
            "user_2",
            "userX",
            "user",
            "user%",
            "user%x",
            "us",
            "usez",
            "a%b",
            "aXb",
            "a_b",
            "a",
            "b",
            "é",
            "éa",
            "ê",
            "e",
            "f",
            "日本",
            "日本語",
            "日",
            "旦",
            "\u{7F}",
            "\u{80}",
            "\u{7FF}z",
            "\u{800}",
            "\u{D7FF}",
            "\u{D7FF}a",
            "\u{E000}",
            "\u{FFFF}",
            "\u{10000}",
            "\u{10FFFF}",
            "\u{10FFFF}a",
            "\u{10FFFF}\u{10FFFF}",
            "a\u{10FFFF}",
            "a\u{10FFFF}b",
            "a\u{10FFFF}\u{10FFFF}",
            "b\u{10FFFF}",
            "\u{1}bevy_storage/x",
            "\u{1}",
            "~",
            "zz",
        ];
        let ops: Vec<_> = all_keys
            .iter()
            .map(|k| put(k, record(k.as_bytes(), at(0), None)))
            .collect();
        b.write(ops.clone(), at(0)).unwrap();
        mem.write(ops, at(0)).unwrap();

        assert_eq!(
            keys(b.scan("user_").unwrap()),
            BTreeSet::from(["user_1".into(), "user_2".into()])
        );
        assert_eq!(
            keys(b.scan("user%").unwrap()),
            BTreeSet::from(["user%".into(), "user%x".into()])
        );
        assert_eq!(keys(b.scan("a_").unwrap()), BTreeSet::from(["a_b".into()]));
        assert_eq!(keys(b.scan("%").unwrap()), BTreeSet::new());
        assert_eq!(keys(b.scan("_").unwrap()), BTreeSet::new());
        assert_eq!(
            keys(b.scan("日本").unwrap()),
            BTreeSet::from(["日本".into(), "日本語".into()])
        );
        assert_eq!(
            keys(b.scan("a\u{10FFFF}").unwrap()),
            BTreeSet::from([
                "a\u{10FFFF}".into(),
                "a\u{10FFFF}b".into(),
                "a\u{10FFFF}\u{10FFFF}".into()
            ])
        );
        assert_eq!(
            keys(b.scan("\u{10FFFF}").unwrap()),
            BTreeSet::from([
                "\u{10FFFF}".into(),
                "\u{10FFFF}a".into(),
                "\u{10FFFF}\u{10FFFF}".into()
            ])
        );
        assert_eq!(b.scan("").unwrap().len(), all_keys.len());

        // Every prefix of every key, plus a few that match nothing, agrees with the memory
        // backend's byte-for-byte `starts_with`.
        let mut prefixes: BTreeSet<String> = ["%", "_", "user_%", "é%", "\u{D7FF}", "zzz"]
            .into_iter()
            .map(String::from)
            .collect();
        for k in all_keys {
            for (i, _) in k.char_indices().skip(1) {
                prefixes.insert(k[..i].to_owned());
            }
            prefixes.insert(k.to_owned());
        }
        for p in &prefixes {
            let mut got = b.scan(p).unwrap();
            got.sort_by(|a, b| a.key.cmp(&b.key));
            let want = mem.scan(p).unwrap();
            assert_eq!(got, want, "prefix {p:?}");
        }
    }

    #[test]
    fn touch_sets_the_access_time_only() {
        let dir = TempDir::new().unwrap();
        let b = open(&dir);
        put1(&b, "k", b"v", at(0), None);
        b.touch("k", at(42)).unwrap();
        b.touch("missing", at(42)).unwrap();
        let meta = b.get_meta("k").unwrap().unwrap();
        assert_eq!(meta.accessed_at, at(42));
        assert_eq!(meta.modified_at, at(0));
        assert_eq!(b.get("missing").unwrap(), None);
    }

    #[test]
    fn purge_expired_removes_and_counts_expired_records() {
        let dir = TempDir::new().unwrap();
        let b = open(&dir);
        put1(&b, "forever", b"1", at(0), None);
        put1(&b, "early", b"1", at(0), Some(at(10)));
        put1(&b, "deadline", b"1", at(0), Some(at(20)));
        put1(&b, "late", b"1", at(0), Some(at(21)));
        assert_eq!(b.purge_expired(at(5)).unwrap(), 0);
        assert_eq!(b.purge_expired(at(20)).unwrap(), 2);
        assert_eq!(
            keys(b.scan("").unwrap()),
            BTreeSet::from(["forever".into(), "late".into()])
        );
        assert_eq!(b.purge_expired(at(20)).unwrap(), 0);
        assert_eq!(b.purge_expired(Timestamp(i64::MAX)).unwrap(), 1);
    }

    #[test]
    fn usage_counts_live_records_only() {
        let dir = TempDir::new().unwrap();
        let b = open(&dir);
        assert_eq!(b.usage(at(0)).unwrap(), Usage::default());
        put1(&b, "a", b"12345", at(0), None);
        put1(&b, "b", b"123", at(0), Some(at(10)));
        put1(&b, "c", b"1", at(0), Some(at(20)));
        let usage = |t| b.usage(t).unwrap();
        assert_eq!(
            usage(at(0)),
            Usage {
                item_count: 3,
                total_size: 9
            }
        );
        assert_eq!(
            usage(at(10)),
            Usage {
                item_count: 2,
                total_size: 6
            }
        );
        assert_eq!(
            usage(at(20)),
            Usage {
                item_count: 1,
                total_size: 5
            }
        );
        b.clear().unwrap();
        assert_eq!(usage(at(0)), Usage::default());
        assert!(b.scan("").unwrap().is_empty());
    }

    /// Environment variable that turns [`abort_after_writing`] into the child process of
    /// [`survives_the_process_being_killed`].
    const CHILD_DB: &str = "BEVY_STORAGE_SQLITE_CRASH_CHILD_DB";

    #[test]
    #[ignore = "helper run as a child process by survives_the_process_being_killed"]
    fn abort_after_writing() {
        let Some(path) = std::env::var_os(CHILD_DB) else {
            return;
        };
        let b = SqliteBackend::open(PathBuf::from(path), &SqliteOptions::default()).unwrap();
        for i in 0..100 {
            put1(
                &b,
                &format!("k{i}"),
                format!("v{i}").as_bytes(),
                at(i),
                None,
            );
        }
        // No destructor runs: no checkpoint, no clean close.
        std::process::abort();
    }

    #[test]
    fn survives_the_process_being_killed() {
        let dir = TempDir::new().unwrap();
        let status = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "backend::sqlite::tests::abort_after_writing",
                "--ignored",
                "--test-threads=1",
            ])
            .env(CHILD_DB, db(&dir))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .unwrap();
        assert!(!status.success(), "the child should have aborted");
        let b = open(&dir);
        assert_eq!(b.scan("").unwrap().len(), 100);
        for i in 0..100 {
            let got = b.get(&format!("k{i}")).unwrap().unwrap();
            assert_eq!(got.value, format!("v{i}").into_bytes());
        }
    }

    /// Single-put throughput against a raw rusqlite upsert with the same pragmas and schema
    /// (the target is ≥ 0.8 of raw). Run with
    /// `cargo test --release --lib backend::sqlite::tests::single_put_speed -- --ignored --nocapture`.
    #[test]
    #[ignore = "timing; run in release by hand"]
    fn single_put_speed() {
        use std::time::{Duration, Instant};
        const N: usize = 2_000;
        const KEYS: usize = 1_000;
        const ROUNDS: usize = 15;
        let without_rowid_schema = SCHEMA.replace("NOT NULL\n);", "NOT NULL\n) WITHOUT ROWID;");
        assert_ne!(without_rowid_schema, SCHEMA);
        for size in [64usize, 1024, 16 * 1024] {
            let value = vec![7u8; size];
            let keys: Vec<String> = (0..KEYS).map(|i| format!("player:{i:05}")).collect();
            let raw_open = |dir: &TempDir, schema: &str| {
                let raw = Connection::open(db(dir)).unwrap();
                configure(&raw, &SqliteOptions::default(), false).unwrap();
                let _: String = raw
                    .pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0))
                    .unwrap();
                raw.execute_batch(schema).unwrap();
                raw
            };
            let upsert = |raw: &Connection, i: usize| {
                let now = at(i as i64).0;
                raw.prepare_cached(SQL_UPSERT)
                    .unwrap()
                    .execute(rusqlite::params![
                        keys[i % KEYS],
                        now,
                        now,
                        now,
                        None::<i64>,
                        size as i64,
                        false,
                        false,
                        None::<String>,
                        value
                    ])
                    .unwrap();
            };
            let dirs: Vec<TempDir> = (0..3).map(|_| TempDir::new().unwrap()).collect();
            let b = open(&dirs[0]);
            let raw = raw_open(&dirs[1], SCHEMA);
            let raw_without_rowid = raw_open(&dirs[2], &without_rowid_schema);
            let mut best = [Duration::MAX; 3];
            let mut i = 0;
            for _ in 0..ROUNDS {
                let start = Instant::now();
                for _ in 0..N {
                    let now = at(i as i64);
                    b.write(vec![put(&keys[i % KEYS], record(&value, now, None))], now)
                        .unwrap();
                    i += 1;
                }
                best[0] = best[0].min(start.elapsed());
                let start = Instant::now();
                for j in 0..N {
                    upsert(&raw, i + j);
                }
                best[1] = best[1].min(start.elapsed());
                let start = Instant::now();
                for j in 0..N {
                    upsert(&raw_without_rowid, i + j);
                }
                best[2] = best[2].min(start.elapsed());
            }
            let us = |d: Duration| d.as_secs_f64() * 1e6 / N as f64;
            println!(
                "value {size:>6} B: backend {:>6.2} µs, raw upsert {:>6.2} µs (WITHOUT ROWID table {:>6.2} µs), \
                 raw/backend = {:.2}",
                us(best[0]),
                us(best[1]),
                us(best[2]),
                best[1].as_secs_f64() / best[0].as_secs_f64(),
            );
        }
    }
}
