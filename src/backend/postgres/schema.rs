//! The PostgreSQL schema: one table of records for every store, keyed by namespace and key.
//!
//! One table with a `namespace` column (rather than a table per store) means the schema is
//! created and migrated once per database, no SQL identifier is ever built from a user's
//! namespace, and a game server can open any namespace without DDL rights after the first.
//! The primary key `(namespace, key)` serves point reads and prefix listings: a prefix is the
//! key range `[prefix, next(prefix))` under the `"C"` collation (byte order, which is code
//! point order for UTF-8), so no `LIKE` pattern is ever built from a key. A partial index on
//! `(namespace, expires_at)` serves the expiry purge.
//!
//! `bevy_storage_namespaces` keeps, per namespace, the count and total size of its stored
//! records (expired ones included until they are purged). Every change to a namespace's
//! records locks its row first and updates it in the same transaction, so the counts are
//! exact across every server, the quota is decided atomically with the write, and usage is
//! read without scanning the records (only the expired ones, on the expiry index, are
//! subtracted). The price: writes to one namespace commit one after another, as they do in
//! SQLite and Redis; games that need parallel write throughput across servers use several
//! namespaces.

use tokio_postgres::Row;

use crate::backend::{CustomMetadata, RecordMeta, RecordVersion};
use crate::clock::Timestamp;
use crate::error::{Result, StorageError};

/// The schema version this code writes; a database with a newer one is refused.
///
/// Version 2 added the records' `version` column ([`RecordVersion`](crate::backend::RecordVersion),
/// its 64 bits stored as a `bigint`); [`SQL_CREATE`] adds it to a version-1 table (constant
/// time: existing rows read as version 0).
pub(super) const SCHEMA_VERSION: i32 = 2;

/// Creates the tables if missing, under a transaction-scoped advisory lock so that servers
/// starting together do not race on `CREATE TABLE`.
pub(super) const SQL_CREATE: &str = r#"
SELECT pg_advisory_xact_lock(7216427616339785001);
CREATE TABLE IF NOT EXISTS bevy_storage_schema (
    id integer PRIMARY KEY CHECK (id = 1),
    version integer NOT NULL
);
INSERT INTO bevy_storage_schema (id, version) VALUES (1, 2) ON CONFLICT (id) DO NOTHING;
CREATE TABLE IF NOT EXISTS bevy_storage_records (
    namespace text COLLATE "C" NOT NULL,
    key text COLLATE "C" NOT NULL,
    created_at bigint NOT NULL,
    modified_at bigint NOT NULL,
    accessed_at bigint NOT NULL,
    expires_at bigint,
    size bigint NOT NULL,
    compressed boolean NOT NULL,
    encrypted boolean NOT NULL,
    custom text,
    version bigint NOT NULL DEFAULT 0,
    value bytea NOT NULL,
    PRIMARY KEY (namespace, key)
);
ALTER TABLE bevy_storage_records ADD COLUMN IF NOT EXISTS version bigint NOT NULL DEFAULT 0;
UPDATE bevy_storage_schema SET version = 2 WHERE version < 2;
CREATE INDEX IF NOT EXISTS bevy_storage_records_expiry
    ON bevy_storage_records (namespace, expires_at) WHERE expires_at IS NOT NULL;
CREATE TABLE IF NOT EXISTS bevy_storage_namespaces (
    namespace text COLLATE "C" PRIMARY KEY,
    item_count bigint NOT NULL,
    total_size bigint NOT NULL
);
"#;

/// Creates the namespace's counters from its records if it has none yet (a namespace's
/// first open, or one whose counters were removed by hand). The advisory lock keeps a
/// concurrent first write from being counted twice: writers lock the row, which does not
/// exist yet, so they wait on this lock instead (see [`SQL_LOCK_NAMESPACE`]).
pub(super) const SQL_INIT_NAMESPACE: &str = "INSERT INTO bevy_storage_namespaces \
     (namespace, item_count, total_size) \
     SELECT $1, count(*), coalesce(sum(size), 0)::bigint FROM bevy_storage_records \
     WHERE namespace = $1 \
     ON CONFLICT (namespace) DO NOTHING";

/// Takes the namespace's advisory lock for the rest of the transaction.
pub(super) const SQL_ADVISORY_LOCK: &str = "SELECT pg_advisory_xact_lock(hashtextextended($1, 7))";

/// Locks the namespace's counters for the rest of the transaction and reads them. Every
/// transaction that changes a namespace's records starts with it.
pub(super) const SQL_LOCK_NAMESPACE: &str = "SELECT item_count, total_size \
     FROM bevy_storage_namespaces WHERE namespace = $1 FOR UPDATE";

pub(super) const SQL_SET_NAMESPACE: &str = "UPDATE bevy_storage_namespaces \
     SET item_count = $2, total_size = $3 WHERE namespace = $1";

/// Count and size of the namespace's records that are stored but expired at `$2`.
pub(super) const SQL_EXPIRED: &str = "SELECT count(*), coalesce(sum(size), 0)::bigint \
     FROM bevy_storage_records WHERE namespace = $1 AND expires_at <= $2";

/// True when every table and index of [`SQL_CREATE`] exists.
pub(super) const SQL_SCHEMA_PRESENT: &str = "SELECT to_regclass('bevy_storage_schema') IS NOT NULL \
     AND to_regclass('bevy_storage_records') IS NOT NULL \
     AND to_regclass('bevy_storage_records_expiry') IS NOT NULL \
     AND to_regclass('bevy_storage_namespaces') IS NOT NULL";

pub(super) const SQL_VERSION: &str = "SELECT version FROM bevy_storage_schema WHERE id = 1";

pub(super) const SQL_GET: &str = "SELECT created_at, modified_at, accessed_at, expires_at, size, \
     compressed, encrypted, custom, version, value FROM bevy_storage_records \
     WHERE namespace = $1 AND key = $2";

pub(super) const SQL_GET_META: &str = "SELECT created_at, modified_at, accessed_at, expires_at, \
     size, compressed, encrypted, custom, version FROM bevy_storage_records \
     WHERE namespace = $1 AND key = $2";

pub(super) const SQL_GET_VALUE: &str =
    "SELECT value, expires_at FROM bevy_storage_records WHERE namespace = $1 AND key = $2";

pub(super) const SQL_TOUCH: &str =
    "UPDATE bevy_storage_records SET accessed_at = $3 WHERE namespace = $1 AND key = $2";

pub(super) const SQL_SCAN_ALL: &str =
    "SELECT key, size, expires_at FROM bevy_storage_records WHERE namespace = $1";

pub(super) const SQL_SCAN_FROM: &str =
    "SELECT key, size, expires_at FROM bevy_storage_records WHERE namespace = $1 AND key >= $2";

pub(super) const SQL_SCAN_RANGE: &str = "SELECT key, size, expires_at FROM bevy_storage_records \
     WHERE namespace = $1 AND key >= $2 AND key < $3";

/// One page of a listing: the prefix's key range (`$3` NULL for no upper bound) after `$4`,
/// in key order.
pub(super) const SQL_SCAN_PAGE: &str = "SELECT key, size, expires_at FROM bevy_storage_records \
     WHERE namespace = $1 AND key >= $2 AND ($3::text IS NULL OR key < $3) AND key > $4 \
     ORDER BY key LIMIT $5";

/// Removes the expired records and returns how many and how many bytes.
pub(super) const SQL_PURGE: &str = "WITH gone AS (DELETE FROM bevy_storage_records \
     WHERE namespace = $1 AND expires_at <= $2 RETURNING size) \
     SELECT count(*), coalesce(sum(size), 0)::bigint FROM gone";

pub(super) const SQL_CLEAR: &str = "DELETE FROM bevy_storage_records WHERE namespace = $1";

/// The live records' count and size: the counters less the expired records, in one snapshot.
pub(super) const SQL_USAGE: &str = "SELECT n.item_count - e.count, n.total_size - e.size \
     FROM bevy_storage_namespaces n, LATERAL (SELECT count(*) AS count, \
       coalesce(sum(size), 0)::bigint AS size FROM bevy_storage_records \
       WHERE namespace = $1 AND expires_at <= $2) e \
     WHERE n.namespace = $1";

/// An upsert. A live record keeps its `created_at`; an expired one counts as absent.
/// `$12` is the batch's `now`, `$13` the record's version. Returns whether a row was replaced, with its size and expiry
/// (exact: the namespace's counters are locked, so no other writer changes the row between
/// the read and the write).
pub(super) const SQL_UPSERT: &str = "WITH old AS (SELECT size, expires_at FROM bevy_storage_records \
       WHERE namespace = $1 AND key = $2) \
     INSERT INTO bevy_storage_records AS r \
     (namespace, key, created_at, modified_at, accessed_at, expires_at, size, compressed, \
      encrypted, custom, value, version) \
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $13) \
     ON CONFLICT (namespace, key) DO UPDATE SET \
       created_at = CASE WHEN r.expires_at IS NULL OR r.expires_at > $12 \
                         THEN r.created_at ELSE EXCLUDED.created_at END, \
       modified_at = EXCLUDED.modified_at, accessed_at = EXCLUDED.accessed_at, \
       expires_at = EXCLUDED.expires_at, size = EXCLUDED.size, \
       compressed = EXCLUDED.compressed, encrypted = EXCLUDED.encrypted, \
       custom = EXCLUDED.custom, value = EXCLUDED.value, version = EXCLUDED.version \
     RETURNING EXISTS (SELECT 1 FROM old), (SELECT size FROM old), \
       (SELECT expires_at FROM old)";

/// A create-only put: replaces only an expired record, and returns no row when a live one
/// exists (the batch then fails with `AlreadyExists`).
pub(super) const SQL_CREATE_ONLY: &str = "WITH old AS (SELECT size, expires_at \
       FROM bevy_storage_records WHERE namespace = $1 AND key = $2) \
     INSERT INTO bevy_storage_records AS r \
     (namespace, key, created_at, modified_at, accessed_at, expires_at, size, compressed, \
      encrypted, custom, value, version) \
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $13) \
     ON CONFLICT (namespace, key) DO UPDATE SET \
       created_at = EXCLUDED.created_at, modified_at = EXCLUDED.modified_at, \
       accessed_at = EXCLUDED.accessed_at, expires_at = EXCLUDED.expires_at, \
       size = EXCLUDED.size, compressed = EXCLUDED.compressed, encrypted = EXCLUDED.encrypted, \
       custom = EXCLUDED.custom, value = EXCLUDED.value, version = EXCLUDED.version \
     WHERE r.expires_at IS NOT NULL AND r.expires_at <= $12 \
     RETURNING EXISTS (SELECT 1 FROM old), (SELECT size FROM old), \
       (SELECT expires_at FROM old)";

/// A put conditional on a version: replaces the row only if it is live at `$11` and has
/// version `$13` (`$12` is the new version). Always returns one row: the row found before
/// (exists, size, expiry), whether it wrote, and the version found, from which the batch
/// reports a conflict. Nothing can change the row between the check and the update: the
/// batch holds the namespace's lock, which every writer takes first.
pub(super) const SQL_IF_VERSION: &str = "WITH old AS (SELECT size, expires_at, version \
       FROM bevy_storage_records WHERE namespace = $1 AND key = $2), \
     updated AS (UPDATE bevy_storage_records SET \
       modified_at = $3, accessed_at = $4, expires_at = $5, size = $6, compressed = $7, \
       encrypted = $8, custom = $9, value = $10, version = $12 \
       WHERE namespace = $1 AND key = $2 AND version = $13 \
         AND (expires_at IS NULL OR expires_at > $11) \
       RETURNING 1) \
     SELECT EXISTS (SELECT 1 FROM old), (SELECT size FROM old), (SELECT expires_at FROM old), \
       EXISTS (SELECT 1 FROM updated), (SELECT version FROM old)";

/// Removes the record only if it still holds the value and expiry a read returned
/// (`Store::take`), and reports its size.
pub(super) const SQL_DELETE_IF_UNCHANGED: &str = "DELETE FROM bevy_storage_records \
     WHERE namespace = $1 AND key = $2 AND value = $3 AND expires_at IS NOT DISTINCT FROM $4 \
     RETURNING size";

/// A delete that reports what it removed.
pub(super) const SQL_DELETE: &str = "DELETE FROM bevy_storage_records \
     WHERE namespace = $1 AND key = $2 RETURNING size, expires_at";

/// Reads the first nine columns of [`SQL_GET`] / [`SQL_GET_META`] into checked metadata.
pub(super) fn meta_from_row(row: &Row, key: &str) -> Result<RecordMeta> {
    let size: i64 = row.get(4);
    let size = u64::try_from(size)
        .map_err(|_| StorageError::corrupt(key, format!("negative size {size}")))?;
    let custom = match row.get::<_, Option<&str>>(7) {
        None => CustomMetadata::new(),
        Some(json) => serde_json::from_str(json).map_err(|e| {
            StorageError::corrupt(key, format!("custom metadata is not a JSON object: {e}"))
        })?,
    };
    Ok(RecordMeta {
        created_at: Timestamp(row.get(0)),
        modified_at: Timestamp(row.get(1)),
        accessed_at: Timestamp(row.get(2)),
        expires_at: row.get::<_, Option<i64>>(3).map(Timestamp),
        size,
        compressed: row.get(5),
        encrypted: row.get(6),
        custom,
        version: RecordVersion(row.get::<_, i64>(8) as u64),
    })
}
