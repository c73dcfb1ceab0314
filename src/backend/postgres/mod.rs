//! The PostgreSQL backend: one durable store shared by several game servers.
//!
//! Records live in one table, `bevy_storage_records`, with a `namespace` column: stores with
//! the same namespace share their records, stores with different ones never see each other's.
//! The schema and why it is one table are in `postgres/schema.rs`; the tables are created on
//! first open (under an advisory lock, so servers starting together do not race).
//!
//! # Guarantees
//!
//! - A batch ([`Backend::write`]) is one SQL transaction: all or nothing, durable once it
//!   returns `Ok` (PostgreSQL's own durability: WAL with `fsync`, per the server's settings).
//!   Transactions that deadlock or fail to serialize against another server's are retried
//!   (up to three times) within the time bound.
//! - Prefix listings are key ranges on the primary key, never `LIKE` patterns: a `%` or `_`
//!   in a key is an ordinary character.
//! - Expired records are hidden by the store on read and removed by
//!   [`purge_expired`](Backend::purge_expired), one `DELETE` on the expiry index.
//! - The quota is shared: every server of a namespace counts against the same
//!   `StorageConfig::max_size`, decided in the write's own transaction on the namespace's
//!   counters ([`Backend::enforces_quota`]). Usage is read from those counters, never by
//!   scanning the records.
//!
//! # Connections and time bounds
//!
//! Connections come from an `r2d2` pool of [`PostgresOptions::pool_size`] `tokio-postgres`
//! clients, each driven on the calling thread by a small runtime of its own (see
//! `postgres/connection.rs`; the game never needs Tokio). Every operation, including waiting
//! for a connection, is bounded by
//! [`PostgresOptions::connect_timeout`] + [`PostgresOptions::response_timeout`] (3 s by
//! default): past it the operation fails with [`StorageError::Unavailable`] and its
//! connection is closed rather than reused, so a hung server cannot hold a game thread. A
//! write that fails that way after it was sent is [`StorageError::OutcomeUnknown`]: it may
//! or may not have been applied, all of it or none. Call the backend from ordinary threads (Bevy's task pools, `std::thread`), not
//! from inside a Tokio runtime, where it refuses with a [`StorageError::Config`] error.
//!
//! Why `tokio-postgres` rather than the synchronous `postgres` crate: the synchronous client
//! has no client-side timeout, so a hung server would hold a game thread for as long as the
//! kernel keeps the connection. Driving `tokio-postgres` on the calling thread keeps the
//! synchronous crate's speed (no hand-off between threads per round trip) and adds the
//! deadline.
//!
//! Passwords never appear in messages or `Debug` output (the URL is redacted).
//!
//! # TLS
//!
//! With the `postgres-tls` feature, connections are encrypted as libpq's URL parameters say:
//! `sslmode=disable|prefer|require|verify-ca|verify-full` (default `prefer`) and
//! `sslrootcert=PATH` (a PEM file of CA certificates) or `sslrootcert=system`; `require`
//! encrypts without checking the certificate unless `sslrootcert` is given, `verify-full`
//! checks the chain and the host name. The table of modes is in `postgres/tls.rs`. Without
//! the feature, a URL asking for TLS is refused with [`StorageError::FeatureDisabled`],
//! never connected in plaintext.
//!
//! # Where the code is
//!
//! | file | holds |
//! |---|---|
//! | `postgres/mod.rs` | [`PostgresBackend`], [`PostgresOptions`], the pool, reads and the [`Backend`] impl |
//! | `postgres/schema.rs` | the tables, the statements, rows to metadata |
//! | `postgres/batch.rs` | write batches: one call of the write function each |
//! | `postgres/connection.rs` | the pool's connections, each on a runtime of its own |
//! | `postgres/tls.rs` | `sslmode` and `sslrootcert`, the rustls client they make |

mod batch;
mod connection;
mod schema;
mod tls;

use std::fmt;
use std::time::Duration;

use std::time::Instant;

use r2d2::Pool;
use tokio_postgres::error::SqlState;

use connection::Session;

use super::{Backend, KeyEntry, Record, RecordMeta, Usage, WriteOp, WriteOutcome};
use crate::clock::Timestamp;
use crate::config::redact_url;
use crate::error::{Result, StorageError};
use crate::key::prefix_upper_bound;

const BACKEND: &str = "postgres";

/// The namespace of a `postgres://` URL without `?namespace=`.
pub const DEFAULT_NAMESPACE: &str = "bevy_storage";

/// Connection settings of a [`PostgresBackend`]: the pool and time bounds every server
/// backend shares (a "response" here is a statement's or a transaction's).
pub type PostgresOptions = super::ServerOptions;

/// Records in a PostgreSQL database, under one namespace. See the [module docs](self).
pub struct PostgresBackend {
    pool: Pool<connection::Manager>,
    /// Why the pool's last connection attempt failed, for messages.
    last_connect_error: std::sync::Arc<parking_lot::Mutex<Option<String>>>,
    namespace: String,
    /// The connection string without its password, for messages.
    address: String,
    options: PostgresOptions,
}

impl fmt::Debug for PostgresBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresBackend")
            .field("address", &self.address)
            .field("namespace", &self.namespace)
            .field("options", &self.options)
            .finish()
    }
}

impl PostgresBackend {
    /// Connects to the database at `url` (`postgres://user[:password]@host[:port]/dbname`,
    /// or `postgresql://`), creates the tables if missing, and serves the store `namespace`.
    ///
    /// TLS follows the URL's `sslmode` and `sslrootcert` (see [TLS](self#tls)). Fails with
    /// [`StorageError::Config`] for a malformed URL, an unknown `sslmode`, or a `sslrootcert`
    /// file that cannot be read or holds no certificate; [`StorageError::FeatureDisabled`]
    /// for a URL that asks for TLS without the `postgres-tls` feature;
    /// [`StorageError::Unavailable`] when no connection is made within the time bound (a
    /// server certificate that is not trusted is one such failure, and its message says so).
    pub fn open(url: &str, namespace: &str, options: &PostgresOptions) -> Result<Self> {
        let address = redact_url(url);
        if options.pool_size == 0 {
            return Err(StorageError::Config("pool_size must be at least 1".into()));
        }
        if namespace.is_empty() {
            return Err(StorageError::Config(
                "the PostgreSQL namespace must not be empty".into(),
            ));
        }
        // tokio-postgres knows neither `verify-*` nor `sslrootcert`: they are taken out first.
        let (rest, taken_mode, root_cert) = tls::split_url(url, &address)?;
        let mut pg_config: tokio_postgres::Config = rest.parse().map_err(|e| {
            StorageError::Config(format!("{address:?} is not a PostgreSQL URL: {e}"))
        })?;
        let tls_params = tls::params(taken_mode, pg_config.get_ssl_mode(), root_cert, &address)?;
        let connector = tls::Connector::new(&tls_params, &address)?;
        pg_config.ssl_mode(tls_params.wire_mode());
        pg_config.connect_timeout(options.connect_timeout);
        // The URL's `application_name` if it has one (servers tell theirs apart in
        // `pg_stat_activity`), else ours.
        if pg_config.get_application_name().is_none() {
            pg_config.application_name("bevy_storage");
        }
        let last_connect_error = std::sync::Arc::default();
        let manager = connection::Manager {
            config: pg_config,
            connect_timeout: options.connect_timeout,
            tls: connector,
            tls_params,
            last_error: std::sync::Arc::clone(&last_connect_error),
        };
        let pool = Pool::builder()
            .max_size(options.pool_size)
            .min_idle(Some(0))
            .connection_timeout(options.connect_timeout)
            .test_on_check_out(false)
            .build_unchecked(manager);
        let backend = Self {
            pool,
            last_connect_error,
            namespace: namespace.to_owned(),
            address,
            options: options.clone(),
        };
        backend.create_schema()?;
        Ok(backend)
    }

    /// The namespace this backend serves.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    fn create_schema(&self) -> Result<()> {
        let ns = self.namespace.as_str();
        let version = self.run("creating the tables", false, async |s: &mut Session| {
            // DDL only when something is missing: `CREATE INDEX IF NOT EXISTS` would wait for
            // every open write transaction on the table (another server's, or one a hung
            // connection left open), so opening a store must not run it needlessly.
            let present: bool = s
                .client
                .query_one(schema::SQL_SCHEMA_PRESENT, &[])
                .await?
                .get(0);
            let mut version = if present {
                let row = s.client.query_one(schema::SQL_VERSION, &[]).await?;
                Some(row.get::<_, i32>(0))
            } else {
                None
            };
            // Missing tables, or an older schema: create or migrate (idempotent).
            if version.is_none_or(|v| v < schema::SCHEMA_VERSION) {
                s.client
                    .batch_execute(&format!("BEGIN;{}COMMIT;", schema::SQL_CREATE))
                    .await?;
                let row = s.client.query_one(schema::SQL_VERSION, &[]).await?;
                version = Some(row.get::<_, i32>(0));
            }
            let version = version.unwrap_or(schema::SCHEMA_VERSION);
            if version <= schema::SCHEMA_VERSION {
                // This namespace's counters, created from its records on its first open.
                let lock = s.prepare(schema::SQL_LOCK_NAMESPACE).await?;
                let tx = s.client.transaction().await?;
                batch::lock_namespace(&tx, &lock, ns).await?;
                tx.commit().await?;
            }
            Ok(version)
        })?;
        if version > schema::SCHEMA_VERSION {
            return Err(StorageError::Config(format!(
                "the PostgreSQL database at {} has bevy_storage schema version {version}, newer \
                 than the {} this build knows; upgrade bevy_storage",
                self.address,
                schema::SCHEMA_VERSION
            )));
        }
        Ok(())
    }

    /// The whole time an operation may take.
    fn bound(&self) -> Duration {
        self.options.connect_timeout + self.options.response_timeout
    }

    /// Runs `op` with a pooled connection within [`bound`](Self::bound). A connection whose
    /// operation timed out or broke is marked broken, and the pool closes it. `writes` says
    /// whether a failure after sending leaves the outcome unknown.
    fn run<T>(
        &self,
        doing: &str,
        writes: bool,
        op: impl AsyncFnOnce(&mut Session) -> std::result::Result<T, tokio_postgres::Error>,
    ) -> Result<T> {
        if tokio::runtime::Handle::try_current().is_ok() {
            return Err(StorageError::Config(format!(
                "{doing}: the PostgreSQL backend was called from inside a Tokio runtime; call \
                 it from a plain thread (for example with tokio::task::spawn_blocking)"
            )));
        }
        let started = Instant::now();
        let mut conn = self.pool.get_timeout(self.bound()).map_err(|e| {
            // r2d2's own message may quote the cause already.
            let shown = e.to_string();
            let why = match self.last_connect_error.lock().take() {
                Some(cause) if !shown.contains(&cause) => format!("{shown}: {cause}"),
                _ => shown,
            };
            StorageError::unavailable(
                BACKEND,
                format!("{doing}: no connection to {}: {why}", self.address),
            )
        })?;
        let left = self.bound().saturating_sub(started.elapsed());
        let conn = &mut *conn;
        let session = &mut conn.session;
        // The timer is made inside the runtime: a `Sleep` needs the runtime's clock.
        let outcome = conn
            .runtime
            .block_on(async { tokio::time::timeout(left, op(session)).await });
        match outcome {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) => {
                if e.is_closed() || e.code().is_none() {
                    conn.broken = true;
                }
                Err(self.pg_error(e, doing, writes))
            }
            Err(_) => {
                conn.broken = true;
                let message = format!(
                    "{doing}: {} did not answer within {:?}",
                    self.address,
                    self.bound()
                );
                Err(lost(message, writes))
            }
        }
    }

    /// Maps a client error. A lost connection is [`StorageError::Unavailable`], or for a write
    /// already sent [`StorageError::OutcomeUnknown`]. Of the errors the server reports, a full
    /// disk is [`StorageError::StorageFull`], a read-only server (a hot standby)
    /// [`StorageError::ReadOnly`], damaged data [`StorageError::Corrupt`], and the rest
    /// [`StorageError::Backend`] with their SQLSTATE.
    fn pg_error(&self, e: tokio_postgres::Error, doing: &str, writes: bool) -> StorageError {
        let Some(db) = e.as_db_error() else {
            return lost(format!("{doing}: {}: {e}", self.address), writes);
        };
        let message = format!("{doing}: {} (SQLSTATE {})", db.message(), db.code().code());
        match db.code() {
            c if *c == SqlState::DISK_FULL => StorageError::StorageFull {
                backend: BACKEND.into(),
                message,
            },
            c if *c == SqlState::READ_ONLY_SQL_TRANSACTION => {
                StorageError::read_only(BACKEND, doing, message)
            }
            c if *c == SqlState::DATA_CORRUPTED || *c == SqlState::INDEX_CORRUPTED => {
                StorageError::corrupt(
                    &format!("<PostgreSQL database at {}>", self.address),
                    message,
                )
            }
            _ => StorageError::backend(BACKEND, message),
        }
    }
}

/// The connection was lost or the server stopped answering: for a write that was sent, its
/// outcome is unknown (a batch is one transaction: all of it or none).
fn lost(message: String, writes: bool) -> StorageError {
    if writes {
        StorageError::OutcomeUnknown {
            backend: BACKEND.into(),
            message,
            batch_token: None,
        }
    } else {
        StorageError::unavailable(BACKEND, message)
    }
}

/// True for the errors after which a transaction is retried as a whole.
fn is_retryable(e: &tokio_postgres::Error) -> bool {
    matches!(
        e.code(),
        Some(c) if *c == SqlState::T_R_DEADLOCK_DETECTED || *c == SqlState::T_R_SERIALIZATION_FAILURE
    )
}

impl Backend for PostgresBackend {
    fn backend_type(&self) -> &str {
        BACKEND
    }

    fn get(&self, key: &str) -> Result<Option<Record>> {
        let ns = self.namespace.as_str();
        let row = self.run("reading a record", false, async |s: &mut Session| {
            let statement = s.prepare(schema::SQL_GET).await?;
            s.client.query_opt(&statement, &[&ns, &key]).await
        })?;
        row.map(|row| {
            let meta = schema::meta_from_row(&row, key)?;
            let value: Vec<u8> = row.get(9);
            check_size(key, &meta, value.len())?;
            Ok(Record { value, meta })
        })
        .transpose()
    }

    fn get_value(&self, key: &str) -> Result<Option<(Vec<u8>, Option<Timestamp>)>> {
        let ns = self.namespace.as_str();
        let row = self.run("reading a record", false, async |s: &mut Session| {
            let statement = s.prepare(schema::SQL_GET_VALUE).await?;
            s.client.query_opt(&statement, &[&ns, &key]).await
        })?;
        Ok(row.map(|row| {
            (
                row.get::<_, Vec<u8>>(0),
                row.get::<_, Option<i64>>(1).map(Timestamp),
            )
        }))
    }

    fn get_meta(&self, key: &str) -> Result<Option<RecordMeta>> {
        let ns = self.namespace.as_str();
        let row = self.run("reading metadata", false, async |s: &mut Session| {
            let statement = s.prepare(schema::SQL_GET_META).await?;
            s.client.query_opt(&statement, &[&ns, &key]).await
        })?;
        row.map(|row| schema::meta_from_row(&row, key)).transpose()
    }

    fn write(&self, ops: Vec<WriteOp>, now: Timestamp) -> Result<Vec<WriteOutcome>> {
        batch::write_batch(self, ops, now, None)
    }

    /// The quota is decided in the database, so it holds for every server of a namespace.
    fn enforces_quota(&self) -> bool {
        true
    }

    fn write_within_quota(
        &self,
        ops: Vec<WriteOp>,
        now: Timestamp,
        max_size: u64,
    ) -> Result<Vec<WriteOutcome>> {
        batch::write_batch(self, ops, now, Some(max_size))
    }

    /// One `DELETE … WHERE value = $3 AND expires_at IS NOT DISTINCT FROM $4` in a transaction
    /// that holds the namespace's counters, which it updates.
    fn delete_if_unchanged(
        &self,
        key: &str,
        value: &[u8],
        expires_at: Option<Timestamp>,
    ) -> Result<bool> {
        let ns = self.namespace.as_str();
        let expires_at = expires_at.map(|t| t.0);
        self.run("taking a record", true, async |s: &mut Session| {
            let lock = s.prepare(schema::SQL_LOCK_NAMESPACE).await?;
            let statement = s.prepare(schema::SQL_DELETE_IF_UNCHANGED).await?;
            let tx = s.client.transaction().await?;
            let (count, total) = batch::lock_namespace(&tx, &lock, ns).await?;
            let Some(row) = tx
                .query_opt(&statement, &[&ns, &key, &value, &expires_at])
                .await?
            else {
                tx.rollback().await?;
                return Ok(false);
            };
            let size: i64 = row.get(0);
            tx.execute(
                schema::SQL_SET_NAMESPACE,
                &[&ns, &(count - 1), &(total - size)],
            )
            .await?;
            tx.commit().await?;
            Ok(true)
        })
    }

    fn touch(&self, key: &str, at: Timestamp) -> Result<()> {
        let ns = self.namespace.as_str();
        self.run("updating the access time", true, async |s: &mut Session| {
            let statement = s.prepare(schema::SQL_TOUCH).await?;
            s.client.execute(&statement, &[&ns, &key, &at.0]).await
        })?;
        Ok(())
    }

    fn scan(&self, prefix: &str) -> Result<Vec<KeyEntry>> {
        let ns = self.namespace.as_str();
        let upper = prefix_upper_bound(prefix);
        let rows = self.run("listing keys", false, async |s: &mut Session| {
            match (prefix.is_empty(), &upper) {
                (true, _) => s.client.query(schema::SQL_SCAN_ALL, &[&ns]).await,
                (false, None) => s.client.query(schema::SQL_SCAN_FROM, &[&ns, &prefix]).await,
                (false, Some(upper)) => {
                    s.client
                        .query(schema::SQL_SCAN_RANGE, &[&ns, &prefix, upper])
                        .await
                }
            }
        })?;
        rows.iter().map(key_entry).collect()
    }

    fn scan_page(&self, prefix: &str, after: Option<&str>, limit: usize) -> Result<Vec<KeyEntry>> {
        let ns = self.namespace.as_str();
        let upper = prefix_upper_bound(prefix);
        let after = after.unwrap_or("");
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = self.run("listing a page of keys", false, async |s: &mut Session| {
            let statement = s.prepare(schema::SQL_SCAN_PAGE).await?;
            s.client
                .query(&statement, &[&ns, &prefix, &upper, &after, &limit])
                .await
        })?;
        rows.iter().map(key_entry).collect()
    }

    fn purge_expired(&self, now: Timestamp) -> Result<usize> {
        let ns = self.namespace.as_str();
        let removed = self.run("purging expired records", true, async |s: &mut Session| {
            let lock = s.prepare(schema::SQL_LOCK_NAMESPACE).await?;
            let tx = s.client.transaction().await?;
            let (count, total) = batch::lock_namespace(&tx, &lock, ns).await?;
            let gone = tx.query_one(schema::SQL_PURGE, &[&ns, &now.0]).await?;
            let (gone_count, gone_size): (i64, i64) = (gone.get(0), gone.get(1));
            tx.execute(
                schema::SQL_SET_NAMESPACE,
                &[&ns, &(count - gone_count), &(total - gone_size)],
            )
            .await?;
            tx.commit().await?;
            Ok(gone_count)
        })?;
        Ok(usize::try_from(removed).unwrap_or(0))
    }

    fn clear(&self) -> Result<()> {
        let ns = self.namespace.as_str();
        self.run("clearing the store", true, async |s: &mut Session| {
            let lock = s.prepare(schema::SQL_LOCK_NAMESPACE).await?;
            let tx = s.client.transaction().await?;
            batch::lock_namespace(&tx, &lock, ns).await?;
            tx.execute(schema::SQL_CLEAR, &[&ns]).await?;
            tx.execute(schema::SQL_SET_NAMESPACE, &[&ns, &0i64, &0i64])
                .await?;
            tx.commit().await
        })?;
        Ok(())
    }

    fn usage(&self, now: Timestamp) -> Result<Usage> {
        let ns = self.namespace.as_str();
        let row = self.run("counting records", false, async |s: &mut Session| {
            let statement = s.prepare(schema::SQL_USAGE).await?;
            s.client.query_opt(&statement, &[&ns, &now.0]).await
        })?;
        let (count, size): (i64, i64) = row.map_or((0, 0), |row| (row.get(0), row.get(1)));
        Ok(Usage {
            item_count: u64::try_from(count).unwrap_or(0),
            total_size: u64::try_from(size).unwrap_or(0),
        })
    }

    fn health_check(&self) -> Result<()> {
        self.run("checking the connection", false, async |s: &mut Session| {
            s.client.simple_query("SELECT 1").await
        })?;
        Ok(())
    }
}

/// A listing row: `key, size, expires_at`.
fn key_entry(row: &tokio_postgres::Row) -> Result<KeyEntry> {
    let key: String = row.get(0);
    let size: i64 = row.get(1);
    let size = u64::try_from(size)
        .map_err(|_| StorageError::corrupt(&key, format!("negative size {size}")))?;
    Ok(KeyEntry {
        size,
        expires_at: row.get::<_, Option<i64>>(2).map(Timestamp),
        key,
    })
}

/// A record whose stored length differs from its metadata is damaged.
fn check_size(key: &str, meta: &RecordMeta, len: usize) -> Result<()> {
    if meta.size != len as u64 {
        return Err(StorageError::corrupt(
            key,
            format!("the metadata says {} bytes but {len} are stored", meta.size),
        ));
    }
    Ok(())
}
