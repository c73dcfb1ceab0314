//! The SQLite backend: every record is one row of one table in an embedded SQLite database.
//!
//! This is the plugin's default store. It is durable (a write that returned `Ok` survives the
//! process being killed, and with [`SqliteSynchronous::Full`] a power loss too), reads run in
//! parallel with writes, and the file can be opened with any SQLite tool for inspection.
//!
//! # Schema
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
//! The schema version is kept in `PRAGMA user_version` (currently 1). A database written by a
//! newer version of this crate is refused at [`open`](SqliteBackend::open) rather than
//! misread; a file that is not a SQLite database is refused with an error that says so.
//!
//! # Connections
//!
//! - One **writer** connection behind a mutex runs every change (`write`, `touch`,
//!   `purge_expired`, `clear`) and the health check. A batch is one `BEGIN IMMEDIATE`
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

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use parking_lot::Mutex;
use r2d2::Pool;
use rusqlite::ffi::ErrorCode;
use rusqlite::{
    CachedStatement, Connection, OpenFlags, OptionalExtension, Row, Transaction,
    TransactionBehavior,
};

use super::{
    Backend, CustomMetadata, KeyEntry, PutMode, Record, RecordMeta, Usage, WriteOp, WriteOutcome,
};
use crate::clock::Timestamp;
use crate::error::{Result, StorageError};

const BACKEND: &str = "sqlite";

/// The schema version this build writes and reads (`PRAGMA user_version`).
const SCHEMA_VERSION: i64 = 1;

/// Idempotent: run at every open so a database with the right version but a missing table (a
/// game's own database that happens to use `user_version`) gets one.
const SCHEMA: &str = "
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
    value       BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS records_expires_at ON records (expires_at)
    WHERE expires_at IS NOT NULL;
";

// Statements. All but the readers' `SQL_GET_VALUE` (see `ReaderStatements`) run through
// `prepare_cached`.
const SQL_GET: &str = "SELECT created_at, modified_at, accessed_at, expires_at, size, compressed, \
     encrypted, custom, value FROM records WHERE key = ?1";
const SQL_GET_VALUE: &str = "SELECT expires_at, value FROM records WHERE key = ?1";
const SQL_GET_META: &str = "SELECT created_at, modified_at, accessed_at, expires_at, size, \
     compressed, encrypted, custom FROM records WHERE key = ?1";
const SQL_PREVIOUS: &str = "SELECT size, expires_at, created_at FROM records WHERE key = ?1";
const SQL_UPSERT: &str = "INSERT INTO records (key, created_at, modified_at, accessed_at, \
     expires_at, size, compressed, encrypted, custom, value) \
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10) \
     ON CONFLICT (key) DO UPDATE SET created_at = excluded.created_at, \
     modified_at = excluded.modified_at, accessed_at = excluded.accessed_at, \
     expires_at = excluded.expires_at, size = excluded.size, compressed = excluded.compressed, \
     encrypted = excluded.encrypted, custom = excluded.custom, value = excluded.value";
/// The upsert of a plain put: no lookup of the previous record. It keeps the stored
/// `created_at` of a live record (?11 is `now`) and reports no previous size (see
/// [`WriteOutcome::previous_size`]).
const SQL_UPSERT_KEEP_CREATED: &str = "INSERT INTO records (key, created_at, modified_at, accessed_at, \
     expires_at, size, compressed, encrypted, custom, value) \
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10) \
     ON CONFLICT (key) DO UPDATE SET created_at = CASE WHEN records.expires_at IS NOT NULL \
     AND records.expires_at <= ?11 THEN excluded.created_at ELSE records.created_at END, \
     modified_at = excluded.modified_at, accessed_at = excluded.accessed_at, \
     expires_at = excluded.expires_at, size = excluded.size, compressed = excluded.compressed, \
     encrypted = excluded.encrypted, custom = excluded.custom, value = excluded.value";
const SQL_DELETE: &str = "DELETE FROM records WHERE key = ?1 RETURNING size, expires_at";
const SQL_TOUCH: &str = "UPDATE records SET accessed_at = ?2 WHERE key = ?1";
const SQL_SCAN_ALL: &str = "SELECT key, size, expires_at FROM records";
const SQL_SCAN_FROM: &str = "SELECT key, size, expires_at FROM records WHERE key >= ?1";
const SQL_SCAN_RANGE: &str =
    "SELECT key, size, expires_at FROM records WHERE key >= ?1 AND key < ?2";
const SQL_PURGE: &str = "DELETE FROM records WHERE expires_at IS NOT NULL AND expires_at <= ?1";
const SQL_CLEAR: &str = "DELETE FROM records";
const SQL_USAGE: &str = "SELECT count(*), coalesce(sum(size), 0) FROM records \
     WHERE expires_at IS NULL OR expires_at > ?1";
const SQL_HEALTH: &str = "SELECT 1 FROM records LIMIT 1";

/// Statements prepared on the writer at open, so a database whose `records` table does not
/// have the expected shape is refused at open rather than at the first write.
const WRITER_STATEMENTS: [&str; 7] = [
    SQL_PREVIOUS,
    SQL_UPSERT,
    SQL_DELETE,
    SQL_TOUCH,
    SQL_PURGE,
    SQL_CLEAR,
    SQL_HEALTH,
];

/// Statements the readers run, checked the same way at open.
const READER_STATEMENTS: [&str; 7] = [
    SQL_GET,
    SQL_GET_VALUE,
    SQL_GET_META,
    SQL_SCAN_ALL,
    SQL_SCAN_FROM,
    SQL_SCAN_RANGE,
    SQL_USAGE,
];

/// Enough for every statement above on one connection.
const STATEMENT_CACHE_CAPACITY: usize = 32;

/// Keep the WAL file from staying large after a burst of writes (bytes; SQLite truncates it to
/// this size after a checkpoint).
const JOURNAL_SIZE_LIMIT: i64 = 64 * 1024 * 1024;

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
            SqliteSynchronous::Full => "FULL",
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
}

impl Default for SqliteOptions {
    fn default() -> Self {
        Self {
            synchronous: SqliteSynchronous::Normal,
            pool_size: 10,
            busy_timeout: Duration::from_secs(5),
        }
    }
}

/// Records in one table of a SQLite database file. See the [module docs](self) for the schema
/// and connection layout.
pub struct SqliteBackend {
    path: PathBuf,
    // Declared before `writer` so the readers close first and the writer, as the last
    // connection, checkpoints the WAL and removes the `-wal`/`-shm` files.
    readers: Pool<ReaderManager>,
    writer: Mutex<Connection>,
    options: SqliteOptions,
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
    /// [`StorageError::Backend`] if the file is not a SQLite database, was written by a newer
    /// version of this crate, or has a `records` table of another shape, and with
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

        let writer = open_writer(&path, options)?;

        let manager = ReaderManager {
            path: path.clone(),
            options: options.clone(),
        };
        // Open one reader here so that a failure is reported now, clearly, instead of the
        // pool retrying in the background until its timeout.
        let probe = open_reader(&path, options)
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

        Ok(Self {
            path,
            readers,
            writer: Mutex::new(writer),
            options: options.clone(),
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

    /// Maps a failure of `doing` (lazily formatted) on this database.
    fn fail(&self, e: rusqlite::Error, doing: fmt::Arguments<'_>) -> StorageError {
        sql_error(e, &format!("{doing} in {}", self.path.display()))
    }
}

/// Applies the per-connection pragmas.
fn configure(conn: &Connection, options: &SqliteOptions, reader: bool) -> rusqlite::Result<()> {
    conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE_CAPACITY);
    conn.busy_timeout(options.busy_timeout)?;
    conn.pragma_update(None, "synchronous", options.synchronous.pragma_value())?;
    conn.pragma_update(None, "temp_store", "MEMORY")?;
    if reader {
        conn.pragma_update(None, "query_only", true)?;
    }
    Ok(())
}

/// Opens a read-only reader connection with its pragmas.
fn open_reader(path: &Path, options: &SqliteOptions) -> rusqlite::Result<Connection> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    configure(&conn, options, true)?;
    Ok(conn)
}

/// The statements a reader keeps prepared for the whole life of its connection: the point
/// read behind every load runs without a statement-cache lookup (which hashes the SQL and
/// allocates its key on every call).
struct ReaderStatements<'conn> {
    get_value: rusqlite::Statement<'conn>,
}

self_cell::self_cell!(
    /// A reader connection together with its prepared [`ReaderStatements`].
    struct ReaderCell {
        owner: Connection,
        #[covariant]
        dependent: ReaderStatements,
    }
);

/// A pooled reader: a connection and the statements prepared on it, which always move
/// together. Derefs to the connection for the statements run through its cache.
pub(crate) struct ReaderConnection(ReaderCell);

// SAFETY: rusqlite's `Connection` is `Send`; its `Statement`s are not only because they
// borrow the connection, which is not `Sync`. A `ReaderConnection` owns the connection and
// its statements together and is only ever used by one thread at a time (`&mut` through the
// pool), so moving it to another thread moves the connection with every statement prepared
// on it, which SQLite allows (the bundled SQLite is built thread-safe, and the connection is
// opened without a mutex only because it is never shared).
unsafe impl Send for ReaderConnection {}

impl std::ops::Deref for ReaderConnection {
    type Target = Connection;

    fn deref(&self) -> &Connection {
        self.0.borrow_owner()
    }
}

/// Opens [`ReaderConnection`]s for the pool.
struct ReaderManager {
    path: PathBuf,
    options: SqliteOptions,
}

impl r2d2::ManageConnection for ReaderManager {
    type Connection = ReaderConnection;
    type Error = rusqlite::Error;

    fn connect(&self) -> rusqlite::Result<ReaderConnection> {
        let conn = open_reader(&self.path, &self.options)?;
        ReaderCell::try_new(conn, |conn| {
            Ok(ReaderStatements {
                get_value: conn.prepare(SQL_GET_VALUE)?,
            })
        })
        .map(ReaderConnection)
    }

    fn is_valid(&self, conn: &mut ReaderConnection) -> rusqlite::Result<()> {
        conn.execute_batch("")
    }

    fn has_broken(&self, _conn: &mut ReaderConnection) -> bool {
        false
    }
}

/// Opens the writer connection: pragmas, WAL mode, schema check and migration.
fn open_writer(path: &Path, options: &SqliteOptions) -> Result<Connection> {
    let flags = OpenFlags::SQLITE_OPEN_READ_WRITE
        | OpenFlags::SQLITE_OPEN_CREATE
        | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let mut conn = Connection::open_with_flags(path, flags)
        .map_err(|e| open_error(path, "opening the database", e))?;
    configure(&conn, options, false)
        .map_err(|e| open_error(path, "configuring the database", e))?;
    // The first statement that reads the file: a file that is not a database fails here.
    let mode: String = conn
        .pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get(0))
        .map_err(|e| open_error(path, "switching to WAL mode", e))?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(StorageError::backend(
            BACKEND,
            format!(
                "{} could not be switched to WAL journal mode (it stays in {mode:?} mode); \
                 WAL needs a local file system with shared memory support",
                path.display()
            ),
        ));
    }
    conn.pragma_update(None, "journal_size_limit", JOURNAL_SIZE_LIMIT)
        .map_err(|e| open_error(path, "configuring the database", e))?;

    migrate(&mut conn, path)?;

    for sql in WRITER_STATEMENTS {
        conn.prepare_cached(sql)
            .map_err(|e| schema_mismatch(path, e))?;
    }
    Ok(conn)
}

/// Checks `user_version` and creates the schema, in one immediate transaction so that two
/// processes opening a new file at once do not race.
fn migrate(conn: &mut Connection, path: &Path) -> Result<()> {
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
    if version < SCHEMA_VERSION {
        tx.pragma_update(None, "user_version", SCHEMA_VERSION)
            .map_err(fail)?;
    }
    tx.commit().map_err(fail)
}

/// SQLite's primary result code behind a rusqlite error, including errors that carry the
/// offending SQL (whose code [`rusqlite::Error::sqlite_error_code`] does not report).
fn error_code(e: &rusqlite::Error) -> Option<ErrorCode> {
    e.sqlite_error_code().or_else(|| {
        std::error::Error::source(e)?
            .downcast_ref::<rusqlite::ffi::Error>()
            .map(|inner| inner.code)
    })
}

/// The database has a `records` table this build cannot use.
fn schema_mismatch(path: &Path, e: rusqlite::Error) -> StorageError {
    StorageError::backend(
        BACKEND,
        format!(
            "{} has a `records` table that does not match this version of bevy_storage ({e}); \
             it was not created by bevy_storage, or it is damaged",
            path.display()
        ),
    )
}

/// An error while opening: says which file and, for the common causes, what is wrong.
fn open_error(path: &Path, doing: &str, e: rusqlite::Error) -> StorageError {
    match error_code(&e) {
        Some(ErrorCode::NotADatabase) => StorageError::backend(
            BACKEND,
            format!(
                "{} is not a SQLite database (or it is encrypted or damaged): {e}",
                path.display()
            ),
        ),
        Some(ErrorCode::DatabaseCorrupt) => StorageError::backend(
            BACKEND,
            format!("{} is a damaged SQLite database: {e}", path.display()),
        ),
        _ => sql_error(e, &format!("{doing} at {}", path.display())),
    }
}

/// Maps a rusqlite error: lock timeouts and unopenable files are [`StorageError::Unavailable`],
/// everything else [`StorageError::Backend`].
fn sql_error(e: rusqlite::Error, doing: &str) -> StorageError {
    match error_code(&e) {
        Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked) => StorageError::unavailable(
            BACKEND,
            format!("{doing}: the database stayed locked by another connection or process ({e})"),
        ),
        Some(ErrorCode::CannotOpen) => StorageError::unavailable(BACKEND, format!("{doing}: {e}")),
        _ => StorageError::backend(BACKEND, format!("{doing}: {e}")),
    }
}

/// The smallest string greater than every string that starts with `prefix`, or `None` when
/// there is none (the prefix is empty or all `char::MAX`). UTF-8 byte order is code point
/// order and UTF-8 is prefix-free, so replacing the last character that can be incremented by
/// its successor (and dropping the `char::MAX`es after it) gives that bound.
fn prefix_upper_bound(prefix: &str) -> Option<String> {
    let (i, c) = prefix.char_indices().rev().find(|&(_, c)| c != char::MAX)?;
    let next = match c {
        '\u{D7FF}' => '\u{E000}', // skip the surrogates
        c => char::from_u32(u32::from(c) + 1)?,
    };
    let mut upper = String::with_capacity(i + next.len_utf8());
    upper.push_str(&prefix[..i]);
    upper.push(next);
    Some(upper)
}

/// The metadata columns as stored, before checks.
struct RawMeta {
    created_at: i64,
    modified_at: i64,
    accessed_at: i64,
    expires_at: Option<i64>,
    size: i64,
    compressed: bool,
    encrypted: bool,
    custom: Option<String>,
}

impl RawMeta {
    /// Reads the first eight columns of [`SQL_GET`] / [`SQL_GET_META`].
    fn from_row(row: &Row<'_>) -> rusqlite::Result<Self> {
        Ok(Self {
            created_at: row.get(0)?,
            modified_at: row.get(1)?,
            accessed_at: row.get(2)?,
            expires_at: row.get(3)?,
            size: row.get(4)?,
            compressed: row.get(5)?,
            encrypted: row.get(6)?,
            custom: row.get(7)?,
        })
    }

    fn into_meta(self, key: &str) -> Result<RecordMeta> {
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
        })
    }
}

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

/// Runs one operation of a batch inside its transaction.
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
    delete: Option<CachedStatement<'t>>,
}

impl<'t> BatchStatements<'t> {
    fn new(tx: &'t Transaction<'t>) -> Self {
        Self {
            tx,
            previous: None,
            upsert: None,
            upsert_keep_created: None,
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

    fn apply(&mut self, op: WriteOp, now: Timestamp) -> rusqlite::Result<OpResult> {
        match op {
            WriteOp::Put {
                key,
                record,
                mode: PutMode::Upsert,
            } => {
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
                ])?;
                Ok(OpResult::Done(WriteOutcome {
                    previous_size: None,
                }))
            }
            WriteOp::Put { key, record, mode } => {
                let previous = Self::get(self.tx, &mut self.previous, SQL_PREVIOUS)?
                    .query_row([&key], |row| {
                        Ok((
                            Previous {
                                size: row.get(0)?,
                                expires_at: row.get(1)?,
                            },
                            row.get::<_, i64>(2)?,
                        ))
                    })
                    .optional()?;
                let live =
                    previous.and_then(|(p, created_at)| Some((p.live_size(now)?, created_at)));
                if mode == PutMode::CreateOnly && live.is_some() {
                    return Ok(OpResult::Exists(key));
                }
                let meta = &record.meta;
                let created_at = live.map_or(meta.created_at.0, |(_, created_at)| created_at);
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
                ])?;
                Ok(OpResult::Done(WriteOutcome {
                    previous_size: live.map(|(size, _)| size),
                }))
            }
            WriteOp::Delete { key } => {
                let previous = Self::get(self.tx, &mut self.delete, SQL_DELETE)?
                    .query_row([&key], |row| {
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
}

enum OpResult {
    Done(WriteOutcome),
    /// A create-only put found a live record under this key.
    Exists(String),
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
                    Ok((RawMeta::from_row(row)?, row.get::<_, Vec<u8>>(8)?))
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
        if ops.is_empty() {
            return Ok(Vec::new());
        }
        let count = ops.len();
        let mut conn = self.writer();
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(|e| self.fail(e, format_args!("writing a batch of {count} operation(s)")))?;
        let mut outcomes = Vec::with_capacity(count);
        {
            // Prepared once per batch: a cache lookup per operation costs more than the seek.
            let mut statements = BatchStatements::new(&tx);
            for op in ops {
                match statements.apply(op, now).map_err(|e| {
                    self.fail(e, format_args!("writing a batch of {count} operation(s)"))
                })? {
                    OpResult::Done(outcome) => outcomes.push(outcome),
                    // Dropping `tx` rolls back everything done so far.
                    OpResult::Exists(key) => return Err(StorageError::AlreadyExists { key }),
                }
            }
        }
        tx.commit()
            .map_err(|e| self.fail(e, format_args!("writing a batch of {count} operation(s)")))?;
        Ok(outcomes)
    }

    fn touch(&self, key: &str, at: Timestamp) -> Result<()> {
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

    fn purge_expired(&self, now: Timestamp) -> Result<usize> {
        let conn = self.writer();
        conn.prepare_cached(SQL_PURGE)
            .and_then(|mut stmt| stmt.execute([now.0]))
            .map_err(|e| self.fail(e, format_args!("removing expired records")))
    }

    fn clear(&self) -> Result<()> {
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

    fn health_check(&self) -> Result<()> {
        let conn = self.writer();
        conn.prepare_cached(SQL_HEALTH)
            .and_then(|mut stmt| stmt.query([])?.next().map(|_| ()))
            .map_err(|e| self.fail(e, format_args!("checking the database")))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::sync::Arc;

    use serde_json::json;
    use tempfile::TempDir;

    use super::*;
    use crate::backend::MemoryBackend;

    const T0: Timestamp = Timestamp(1_700_000_000_000);

    fn at(offset_ms: i64) -> Timestamp {
        Timestamp(T0.0 + offset_ms)
    }

    fn db(dir: &TempDir) -> PathBuf {
        dir.path().join("storage.db")
    }

    fn open(dir: &TempDir) -> SqliteBackend {
        SqliteBackend::open(db(dir), &SqliteOptions::default()).expect("open")
    }

    fn record(value: &[u8], now: Timestamp, expires_at: Option<Timestamp>) -> Record {
        Record {
            value: value.to_vec(),
            meta: RecordMeta {
                created_at: now,
                modified_at: now,
                accessed_at: now,
                expires_at,
                size: value.len() as u64,
                compressed: false,
                encrypted: false,
                custom: CustomMetadata::new(),
            },
        }
    }

    fn put(key: &str, record: Record) -> WriteOp {
        WriteOp::Put {
            key: key.into(),
            record,
            mode: PutMode::Upsert,
        }
    }

    fn create(key: &str, record: Record) -> WriteOp {
        WriteOp::Put {
            key: key.into(),
            record,
            mode: PutMode::CreateOnly,
        }
    }

    fn delete(key: &str) -> WriteOp {
        WriteOp::Delete { key: key.into() }
    }

    fn put1(b: &dyn Backend, key: &str, value: &[u8], now: Timestamp, exp: Option<Timestamp>) {
        b.write(vec![put(key, record(value, now, exp))], now)
            .expect("put");
    }

    fn keys(entries: Vec<KeyEntry>) -> BTreeSet<String> {
        entries.into_iter().map(|e| e.key).collect()
    }

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
    fn committed_write_is_visible_to_a_new_connection() {
        let dir = TempDir::new().unwrap();
        let b = open(&dir);
        put1(&b, "k", b"value", at(0), None);
        let raw = Connection::open(db(&dir)).unwrap();
        let value: Vec<u8> = raw
            .query_row("SELECT value FROM records WHERE key = 'k'", [], |r| {
                r.get(0)
            })
            .unwrap();
        assert_eq!(value, b"value");
    }

    #[test]
    fn pragmas_follow_the_options() {
        let dir = TempDir::new().unwrap();
        let options = SqliteOptions {
            synchronous: SqliteSynchronous::Full,
            pool_size: 2,
            busy_timeout: Duration::from_millis(1500),
        };
        let b = SqliteBackend::open(db(&dir), &options).unwrap();
        let w = b.writer.lock();
        let mode: String = w
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))
            .unwrap();
        assert_eq!(mode, "wal");
        let sync: i64 = w.query_row("PRAGMA synchronous", [], |r| r.get(0)).unwrap();
        assert_eq!(sync, 2); // FULL
        let busy: i64 = w
            .query_row("PRAGMA busy_timeout", [], |r| r.get(0))
            .unwrap();
        assert_eq!(busy, 1500);
        let version: i64 = w
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(version, SCHEMA_VERSION);
        drop(w);
        let r = b.reader().unwrap();
        let query_only: bool = r.query_row("PRAGMA query_only", [], |r| r.get(0)).unwrap();
        assert!(query_only);
        let sync: i64 = r.query_row("PRAGMA synchronous", [], |r| r.get(0)).unwrap();
        assert_eq!(sync, 2);
        assert!(r.execute("DELETE FROM records", []).is_err());
        assert_eq!(b.readers.max_size(), 2);

        let normal = TempDir::new().unwrap();
        let b = open(&normal);
        let sync: i64 = b
            .writer
            .lock()
            .query_row("PRAGMA synchronous", [], |r| r.get(0))
            .unwrap();
        assert_eq!(sync, 1); // NORMAL
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
        assert!(message.contains("schema version 2"), "{message}");
        assert!(message.contains("upgrade bevy_storage"), "{message}");
    }

    #[test]
    fn garbage_file_is_refused_clearly() {
        let dir = TempDir::new().unwrap();
        let path = db(&dir);
        let garbage: Vec<u8> = (0..8192u32).map(|i| (i * 7 + 13) as u8).collect();
        std::fs::write(&path, &garbage).unwrap();
        let err = SqliteBackend::open(&path, &SqliteOptions::default()).unwrap_err();
        let message = err.to_string();
        assert!(matches!(err, StorageError::Backend { .. }), "{err:?}");
        assert!(message.contains("is not a SQLite database"), "{message}");
        assert!(message.contains("storage.db"), "{message}");
        // The file was left alone.
        assert_eq!(std::fs::read(&path).unwrap(), garbage);

        std::fs::write(&path, b"short text file").unwrap();
        let err = SqliteBackend::open(&path, &SqliteOptions::default()).unwrap_err();
        assert!(
            err.to_string().contains("is not a SQLite database"),
            "{err}"
        );
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

    #[test]
    fn directory_path_is_unavailable() {
        let dir = TempDir::new().unwrap();
        let err = SqliteBackend::open(dir.path(), &SqliteOptions::default()).unwrap_err();
        assert!(matches!(err, StorageError::Unavailable { .. }), "{err:?}");
    }

    #[test]
    fn concurrent_writers_and_readers() {
        const THREADS: usize = 8;
        const PER_THREAD: usize = 150;
        let dir = TempDir::new().unwrap();
        let b = Arc::new(open(&dir));
        // A second handle on the same file stands in for another process: its writer
        // competes for SQLite's write lock and must wait, not fail with SQLITE_BUSY.
        let other = Arc::new(open(&dir));
        let handles: Vec<_> = (0..THREADS)
            .map(|t| {
                let b = if t % 2 == 0 { b.clone() } else { other.clone() };
                std::thread::spawn(move || {
                    for i in 0..PER_THREAD {
                        let key = format!("t{t}/k{i}");
                        let value = format!("{t}:{i}").into_bytes();
                        let now = at(i as i64);
                        if i % 10 == 0 {
                            b.write(
                                vec![
                                    put(&key, record(&value, now, None)),
                                    put("shared", record(&value, now, None)),
                                ],
                                now,
                            )
                            .expect("batch");
                        } else {
                            b.write(vec![put(&key, record(&value, now, None))], now)
                                .expect("put");
                        }
                        assert_eq!(b.get(&key).expect("get").expect("present").value, value);
                        b.touch(&key, now).expect("touch");
                        if i % 25 == 0 {
                            let seen = b.scan(&format!("t{t}/")).expect("scan").len();
                            assert_eq!(seen, i + 1);
                            b.usage(now).expect("usage");
                        }
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().expect("thread panicked");
        }
        assert_eq!(b.scan("").unwrap().len(), THREADS * PER_THREAD + 1);
        drop(b);
        drop(other);
        let b = open(&dir);
        assert_eq!(
            b.usage(at(0)).unwrap().item_count,
            (THREADS * PER_THREAD + 1) as u64
        );
        for t in 0..THREADS {
            for i in 0..PER_THREAD {
                let got = b.get(&format!("t{t}/k{i}")).unwrap().unwrap();
                assert_eq!(got.value, format!("{t}:{i}").into_bytes());
            }
        }
    }

    #[test]
    fn busy_database_is_unavailable_not_a_panic() {
        let dir = TempDir::new().unwrap();
        let options = SqliteOptions {
            busy_timeout: Duration::from_millis(50),
            ..SqliteOptions::default()
        };
        let b = SqliteBackend::open(db(&dir), &options).unwrap();
        let mut blocker = Connection::open(db(&dir)).unwrap();
        let tx = blocker
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .unwrap();
        let err = b
            .write(vec![put("k", record(b"v", at(0), None))], at(0))
            .unwrap_err();
        assert!(matches!(err, StorageError::Unavailable { .. }), "{err:?}");
        // Reads go on while another connection holds the write lock.
        assert_eq!(b.get("k").unwrap(), None);
        tx.rollback().unwrap();
        put1(&b, "k", b"v", at(0), None);
        assert_eq!(b.get("k").unwrap().unwrap().value, b"v");
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
