//! Connections: one writer behind a mutex and a pool of read-only readers, their pragmas,
//! and how SQLite's errors are reported (see "Connections" in the [module docs](super)).

use std::path::{Path, PathBuf};

use rusqlite::ffi::ErrorCode;
use rusqlite::{Connection, OpenFlags};

use super::schema::{
    READER_STATEMENTS, SCHEMA_VERSION, SQL_GET_VALUE, WRITER_STATEMENTS, migrate, schema_mismatch,
};
use super::{BACKEND, SqliteOptions};
use crate::error::{Result, StorageError};

/// Enough for every statement of the schema on one connection.
const STATEMENT_CACHE_CAPACITY: usize = 32;

/// Keep the WAL file from staying large after a burst of writes (bytes; SQLite truncates it to
/// this size after a checkpoint).
const JOURNAL_SIZE_LIMIT: i64 = 64 * 1024 * 1024;

/// Applies the per-connection pragmas.
pub(super) fn configure(
    conn: &Connection,
    options: &SqliteOptions,
    reader: bool,
) -> rusqlite::Result<()> {
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
pub(super) fn open_reader(path: &Path, options: &SqliteOptions) -> rusqlite::Result<Connection> {
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
pub(super) struct ReaderStatements<'conn> {
    pub(super) get_value: rusqlite::Statement<'conn>,
}

self_cell::self_cell!(
    /// A reader connection together with its prepared [`ReaderStatements`].
    pub(super) struct ReaderCell {
        owner: Connection,
        #[covariant]
        dependent: ReaderStatements,
    }
);

/// A pooled reader: a connection and the statements prepared on it, which always move
/// together. Derefs to the connection for the statements run through its cache.
pub(crate) struct ReaderConnection(pub(super) ReaderCell);

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
pub(super) struct ReaderManager {
    pub(super) path: PathBuf,
    pub(super) options: SqliteOptions,
    /// The store is read-only: readers open the way [`open_read_only`] does.
    pub(super) read_only: bool,
}

impl r2d2::ManageConnection for ReaderManager {
    type Connection = ReaderConnection;
    type Error = rusqlite::Error;

    fn connect(&self) -> rusqlite::Result<ReaderConnection> {
        let conn = if self.read_only {
            open_read_only(&self.path, &self.options)?
        } else {
            open_reader(&self.path, &self.options)?
        };
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
pub(super) fn open_writer(path: &Path, options: &SqliteOptions) -> Result<Connection> {
    let flags = OpenFlags::SQLITE_OPEN_READ_WRITE
        | OpenFlags::SQLITE_OPEN_CREATE
        | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let mut conn = Connection::open_with_flags(path, flags)
        .map_err(|e| open_error(path, "opening the database", e))?;
    configure(&conn, options, false)
        .map_err(|e| open_error(path, "configuring the database", e))?;
    // The first statement that reads the file: a file that is not a database fails here.
    let pages: i64 = conn
        .query_row("PRAGMA page_count", [], |row| row.get(0))
        .map_err(|e| open_error(path, "switching to WAL mode", e))?;
    if pages == 0 {
        // A new database gives the pages of purged records back (`purge.rs`). SQLite takes
        // the setting only before the first table and before WAL mode; on an existing
        // database setting it would write its header, so it is left alone there.
        conn.pragma_update(None, "auto_vacuum", "INCREMENTAL")
            .map_err(|e| open_error(path, "creating the database", e))?;
    }
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

/// SQLite's primary result code behind a rusqlite error, including errors that carry the
/// offending SQL (whose code [`rusqlite::Error::sqlite_error_code`] does not report).
pub(super) fn error_code(e: &rusqlite::Error) -> Option<ErrorCode> {
    e.sqlite_error_code().or_else(|| {
        std::error::Error::source(e)?
            .downcast_ref::<rusqlite::ffi::Error>()
            .map(|inner| inner.code)
    })
}

/// An error while opening: says which file and, for the common causes, what is wrong.
pub(super) fn open_error(path: &Path, doing: &str, e: rusqlite::Error) -> StorageError {
    match error_code(&e) {
        // SQLite cannot tell a file that never was a database from one whose first page is
        // damaged; at a store's own path the second is the likely one, and either way the
        // game's answer is the same (salvage what can be read, or start a new store).
        Some(ErrorCode::NotADatabase) => StorageError::Corrupt {
            key: path.display().to_string(),
            reason: format!(
                "not a SQLite database, or its first page is damaged ({doing}: {e}); copy \
                 any readable records to a new store with `bevy-storage salvage`"
            ),
        },
        Some(ErrorCode::DatabaseCorrupt) => StorageError::Corrupt {
            key: path.display().to_string(),
            reason: format!(
                "the SQLite database is damaged ({doing}: {e}); copy its readable records to \
                 a new store with `bevy-storage salvage`"
            ),
        },
        _ => sql_error(e, &format!("{doing} at {}", path.display())),
    }
}

/// Maps a rusqlite error: lock timeouts and unopenable files are
/// [`StorageError::Unavailable`], a full disk [`StorageError::StorageFull`], a database that
/// cannot be written [`StorageError::ReadOnly`], everything else [`StorageError::Backend`].
/// Damage (`SQLITE_CORRUPT`, `SQLITE_NOTADB`) is mapped by [`SqliteBackend::fail`], which
/// also remembers it.
pub(super) fn sql_error(e: rusqlite::Error, doing: &str) -> StorageError {
    match error_code(&e) {
        Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked) => StorageError::unavailable(
            BACKEND,
            format!("{doing}: the database stayed locked by another connection or process ({e})"),
        ),
        Some(ErrorCode::CannotOpen) => StorageError::unavailable(BACKEND, format!("{doing}: {e}")),
        Some(ErrorCode::DiskFull) => StorageError::StorageFull {
            backend: BACKEND.into(),
            message: format!("{doing}: {e}"),
        },
        Some(ErrorCode::ReadOnly) => {
            StorageError::read_only(BACKEND, doing, format!("SQLite refused the write: {e}"))
        }
        _ => StorageError::backend(BACKEND, format!("{doing}: {e}")),
    }
}

/// True for the result codes that mean the file is damaged.
pub(super) fn is_damage(e: &rusqlite::Error) -> bool {
    matches!(
        error_code(e),
        Some(ErrorCode::DatabaseCorrupt | ErrorCode::NotADatabase)
    )
}

/// Why a database at `path` can only be read, found before SQLite opens it: the file (or,
/// for a new file, its directory) is on a read-only file system or not writable by this
/// process. `None` when it can be written.
pub(super) fn read_only_medium(path: &Path) -> Option<String> {
    let probe = if path.exists() {
        std::fs::OpenOptions::new().write(true).open(path).map(drop)
    } else {
        return None;
    };
    match probe {
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::ReadOnlyFilesystem | std::io::ErrorKind::PermissionDenied
            ) =>
        {
            Some(format!("{} cannot be written: {e}", path.display()))
        }
        _ => None,
    }
}

/// Opens a connection that only reads, for a store opened read-only. On a read-only medium
/// SQLite cannot create the WAL's shared-memory file, so the file is then opened as
/// `immutable` (nothing else can change it there either).
pub(super) fn open_read_only(path: &Path, options: &SqliteOptions) -> rusqlite::Result<Connection> {
    let flags = OpenFlags::SQLITE_OPEN_READ_ONLY
        | OpenFlags::SQLITE_OPEN_NO_MUTEX
        | OpenFlags::SQLITE_OPEN_URI;
    let uri = |extra: &str| {
        let mut uri = String::from("file:");
        for c in path.to_string_lossy().chars() {
            match c {
                '?' | '#' | '%' => uri.push_str(&format!("%{:02X}", c as u32)),
                c => uri.push(c),
            }
        }
        uri.push_str("?mode=ro");
        uri.push_str(extra);
        uri
    };
    let first = Connection::open_with_flags(uri(""), flags).and_then(|conn| {
        configure(&conn, options, true)?;
        conn.query_row("SELECT count(*) FROM sqlite_master", [], |_| Ok(()))?;
        Ok(conn)
    });
    match first {
        Ok(conn) => Ok(conn),
        Err(e)
            if matches!(
                error_code(&e),
                Some(ErrorCode::CannotOpen | ErrorCode::ReadOnly)
            ) =>
        {
            let conn = Connection::open_with_flags(uri("&immutable=1"), flags)?;
            configure(&conn, options, true)?;
            Ok(conn)
        }
        Err(e) => Err(e),
    }
}

/// Checks, without writing, that a database opened read-only is one this build reads.
pub(super) fn check_read_only(conn: &Connection, path: &Path) -> Result<()> {
    let version: i64 = conn
        .pragma_query_value(None, "user_version", |row| row.get(0))
        .map_err(|e| open_error(path, "reading the schema version", e))?;
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
    for sql in READER_STATEMENTS {
        conn.prepare(sql).map_err(|e| schema_mismatch(path, e))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use rusqlite::TransactionBehavior;
    use tempfile::TempDir;

    use super::*;
    use crate::backend::Backend;
    use crate::backend::sqlite::schema::SCHEMA_VERSION;
    use crate::backend::sqlite::testing::*;
    use crate::backend::sqlite::{SqliteBackend, SqliteSynchronous};

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
            ..SqliteOptions::default()
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
    fn garbage_file_is_refused_clearly() {
        let dir = TempDir::new().unwrap();
        let path = db(&dir);
        let garbage: Vec<u8> = (0..8192u32).map(|i| (i * 7 + 13) as u8).collect();
        std::fs::write(&path, &garbage).unwrap();
        let err = SqliteBackend::open(&path, &SqliteOptions::default()).unwrap_err();
        let message = err.to_string();
        assert!(matches!(err, StorageError::Corrupt { .. }), "{err:?}");
        assert!(message.contains("not a SQLite database"), "{message}");
        assert!(message.contains("storage.db"), "{message}");
        // The file was left alone.
        assert_eq!(std::fs::read(&path).unwrap(), garbage);

        std::fs::write(&path, b"short text file").unwrap();
        let err = SqliteBackend::open(&path, &SqliteOptions::default()).unwrap_err();
        assert!(err.to_string().contains("not a SQLite database"), "{err}");
    }

    #[test]
    fn full_disk_damage_and_read_only_codes_are_typed() {
        let sqlite = |code: i32| {
            rusqlite::Error::SqliteFailure(rusqlite::ffi::Error::new(code), Some("m".into()))
        };
        let full = sql_error(sqlite(rusqlite::ffi::SQLITE_FULL), "writing");
        assert!(matches!(full, StorageError::StorageFull { .. }), "{full:?}");
        assert!(full.is_backend_failure());
        let ro = sql_error(sqlite(rusqlite::ffi::SQLITE_READONLY), "writing");
        assert!(matches!(ro, StorageError::ReadOnly { .. }), "{ro:?}");
        assert!(is_damage(&sqlite(rusqlite::ffi::SQLITE_CORRUPT)));
        assert!(is_damage(&sqlite(rusqlite::ffi::SQLITE_NOTADB)));
        assert!(!is_damage(&sqlite(rusqlite::ffi::SQLITE_FULL)));
        let opened = open_error(
            Path::new("x.db"),
            "opening",
            sqlite(rusqlite::ffi::SQLITE_CORRUPT),
        );
        assert!(matches!(opened, StorageError::Corrupt { .. }), "{opened:?}");
    }

    #[test]
    fn read_only_option_refuses_writes_and_leaves_the_file_alone() {
        let dir = TempDir::new().unwrap();
        put1(&open(&dir), "k", b"v", at(0), None);
        let before = std::fs::read(db(&dir)).unwrap();
        let options = SqliteOptions {
            read_only: true,
            ..SqliteOptions::default()
        };
        let b = SqliteBackend::open(db(&dir), &options).unwrap();
        assert_eq!(b.get("k").unwrap().unwrap().value, b"v");
        let err = b
            .write(vec![put("k", record(b"w", at(1), None))], at(1))
            .unwrap_err();
        assert!(matches!(err, StorageError::ReadOnly { .. }), "{err:?}");
        assert!(matches!(
            b.touch("k", at(2)),
            Err(StorageError::ReadOnly { .. })
        ));
        assert!(matches!(b.clear(), Err(StorageError::ReadOnly { .. })));
        assert!(b.read_only().is_some());
        drop(b);
        assert!(std::fs::read(db(&dir)).unwrap() == before);
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
}
