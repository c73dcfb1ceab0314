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
CREATE OR REPLACE FUNCTION bevy_storage_write_v2(
    ns text, now_ms bigint, max_size bigint, kinds "char"[], keys text[],
    created bigint[], modified bigint[], accessed bigint[], expires bigint[], sizes bigint[],
    compressed boolean[], encrypted boolean[], customs text[], vals bytea[],
    versions bigint[], expected bigint[]
) RETURNS bigint[] LANGUAGE plpgsql AS $fn$
#variable_conflict use_variable
DECLARE
    n_count bigint;
    n_total bigint;
    old record;
    found_old boolean;
    live boolean;
    previous bigint[] := '{}';
    added bigint := 0;
    has_put boolean := false;
    expired_size bigint;
BEGIN
    SELECT item_count, total_size INTO n_count, n_total
        FROM bevy_storage_namespaces WHERE namespace = ns FOR UPDATE;
    IF NOT FOUND THEN
        PERFORM pg_advisory_xact_lock(hashtextextended(ns, 7));
        INSERT INTO bevy_storage_namespaces (namespace, item_count, total_size)
            SELECT ns, count(*), coalesce(sum(size), 0)::bigint
            FROM bevy_storage_records WHERE namespace = ns
            ON CONFLICT (namespace) DO NOTHING;
        SELECT item_count, total_size INTO n_count, n_total
            FROM bevy_storage_namespaces WHERE namespace = ns FOR UPDATE;
    END IF;
    FOR i IN 1 .. coalesce(array_length(keys, 1), 0) LOOP
        SELECT size, expires_at, version, created_at INTO old
            FROM bevy_storage_records WHERE namespace = ns AND key = keys[i];
        found_old := FOUND;
        live := found_old AND (old.expires_at IS NULL OR old.expires_at > now_ms);
        IF kinds[i] = 'D' THEN
            IF found_old THEN
                DELETE FROM bevy_storage_records WHERE namespace = ns AND key = keys[i];
                n_count := n_count - 1;
                n_total := n_total - old.size;
            END IF;
        ELSE
            IF kinds[i] = 'C' AND live THEN
                RAISE EXCEPTION USING ERRCODE = 'BS001', MESSAGE = keys[i];
            END IF;
            IF kinds[i] = 'V' AND (NOT live OR old.version <> expected[i]) THEN
                RAISE EXCEPTION USING ERRCODE = 'BS002', MESSAGE = keys[i],
                    DETAIL = CASE WHEN live THEN old.version::text ELSE '' END;
            END IF;
            IF found_old THEN
                UPDATE bevy_storage_records SET
                    created_at = CASE WHEN live THEN old.created_at ELSE created[i] END,
                    modified_at = modified[i], accessed_at = accessed[i],
                    expires_at = expires[i], size = sizes[i], compressed = compressed[i],
                    encrypted = encrypted[i], custom = customs[i], value = vals[i],
                    version = versions[i]
                    WHERE namespace = ns AND key = keys[i];
                n_total := n_total - old.size + sizes[i];
            ELSE
                INSERT INTO bevy_storage_records (namespace, key, created_at, modified_at,
                    accessed_at, expires_at, size, compressed, encrypted, custom, value,
                    version)
                    VALUES (ns, keys[i], created[i], modified[i], accessed[i], expires[i],
                        sizes[i], compressed[i], encrypted[i], customs[i], vals[i],
                        versions[i]);
                n_count := n_count + 1;
                n_total := n_total + sizes[i];
            END IF;
            has_put := true;
            added := added + sizes[i];
        END IF;
        previous := previous || CASE WHEN live THEN old.size END;
    END LOOP;
    IF max_size IS NOT NULL AND has_put AND n_total > max_size THEN
        SELECT coalesce(sum(size), 0)::bigint INTO expired_size FROM bevy_storage_records
            WHERE namespace = ns AND expires_at <= now_ms;
        IF n_total - expired_size > max_size THEN
            RAISE EXCEPTION USING ERRCODE = 'BS003',
                MESSAGE = format('%s %s', n_total - expired_size, added);
        END IF;
    END IF;
    UPDATE bevy_storage_namespaces SET item_count = n_count, total_size = n_total
        WHERE namespace = ns;
    RETURN previous;
END
$fn$;
CREATE OR REPLACE FUNCTION bevy_storage_put_v2(
    ns text, now_ms bigint, max_size bigint, kind "char", k text,
    p_created bigint, p_modified bigint, p_accessed bigint, p_expires bigint, p_size bigint,
    p_compressed boolean, p_encrypted boolean, p_custom text, p_val bytea,
    p_version bigint, p_expected bigint
) RETURNS bigint LANGUAGE plpgsql AS $fn$
#variable_conflict use_variable
DECLARE
    n_count bigint;
    n_total bigint;
    old record;
    found_old boolean;
    live boolean;
    expired_size bigint;
BEGIN
    SELECT item_count, total_size INTO n_count, n_total
        FROM bevy_storage_namespaces WHERE namespace = ns FOR UPDATE;
    IF NOT FOUND THEN
        PERFORM pg_advisory_xact_lock(hashtextextended(ns, 7));
        INSERT INTO bevy_storage_namespaces (namespace, item_count, total_size)
            SELECT ns, count(*), coalesce(sum(size), 0)::bigint
            FROM bevy_storage_records WHERE namespace = ns
            ON CONFLICT (namespace) DO NOTHING;
        SELECT item_count, total_size INTO n_count, n_total
            FROM bevy_storage_namespaces WHERE namespace = ns FOR UPDATE;
    END IF;
    SELECT size, expires_at, version, created_at INTO old
        FROM bevy_storage_records WHERE namespace = ns AND key = k;
    found_old := FOUND;
    live := found_old AND (old.expires_at IS NULL OR old.expires_at > now_ms);
    IF kind = 'C' AND live THEN
        RAISE EXCEPTION USING ERRCODE = 'BS001', MESSAGE = k;
    END IF;
    IF kind = 'V' AND (NOT live OR old.version <> p_expected) THEN
        RAISE EXCEPTION USING ERRCODE = 'BS002', MESSAGE = k,
            DETAIL = CASE WHEN live THEN old.version::text ELSE '' END;
    END IF;
    IF found_old THEN
        UPDATE bevy_storage_records SET
            created_at = CASE WHEN live THEN old.created_at ELSE p_created END,
            modified_at = p_modified, accessed_at = p_accessed, expires_at = p_expires,
            size = p_size, compressed = p_compressed, encrypted = p_encrypted,
            custom = p_custom, value = p_val, version = p_version
            WHERE namespace = ns AND key = k;
        n_total := n_total - old.size + p_size;
    ELSE
        INSERT INTO bevy_storage_records (namespace, key, created_at, modified_at,
            accessed_at, expires_at, size, compressed, encrypted, custom, value, version)
            VALUES (ns, k, p_created, p_modified, p_accessed, p_expires, p_size,
                p_compressed, p_encrypted, p_custom, p_val, p_version);
        n_count := n_count + 1;
        n_total := n_total + p_size;
    END IF;
    IF max_size IS NOT NULL AND n_total > max_size THEN
        SELECT coalesce(sum(size), 0)::bigint INTO expired_size FROM bevy_storage_records
            WHERE namespace = ns AND expires_at <= now_ms;
        IF n_total - expired_size > max_size THEN
            RAISE EXCEPTION USING ERRCODE = 'BS003',
                MESSAGE = format('%s %s', n_total - expired_size, p_size);
        END IF;
    END IF;
    UPDATE bevy_storage_namespaces SET item_count = n_count, total_size = n_total
        WHERE namespace = ns;
    RETURN CASE WHEN live THEN old.size END;
END
$fn$;
CREATE OR REPLACE FUNCTION bevy_storage_put_v3(
    ns text, now_ms bigint, max_size bigint, kind "char", k text,
    p_created bigint, p_modified bigint, p_accessed bigint, p_expires bigint, p_size bigint,
    p_compressed boolean, p_encrypted boolean, p_custom text, p_val bytea,
    p_version bigint, p_expected bigint
) RETURNS bigint LANGUAGE plpgsql AS $fn$
#variable_conflict use_variable
DECLARE
    n_total bigint;
    old_size bigint;
    old_version bigint;
    old_created bigint;
    live boolean := false;
    expired_size bigint;
BEGIN
    UPDATE bevy_storage_namespaces SET item_count = item_count + 1,
        total_size = total_size + p_size
        WHERE namespace = ns RETURNING total_size INTO n_total;
    IF NOT FOUND THEN
        PERFORM pg_advisory_xact_lock(hashtextextended(ns, 7));
        INSERT INTO bevy_storage_namespaces (namespace, item_count, total_size)
            SELECT ns, count(*), coalesce(sum(size), 0)::bigint
            FROM bevy_storage_records WHERE namespace = ns
            ON CONFLICT (namespace) DO NOTHING;
        UPDATE bevy_storage_namespaces SET item_count = item_count + 1,
            total_size = total_size + p_size
            WHERE namespace = ns RETURNING total_size INTO n_total;
    END IF;
    SELECT size, created_at, version, expires_at IS NULL OR expires_at > now_ms
        INTO old_size, old_created, old_version, live
        FROM bevy_storage_records WHERE namespace = ns AND key = k;
    IF FOUND THEN
        IF kind = 'C' AND live THEN
            RAISE EXCEPTION USING ERRCODE = 'BS001', MESSAGE = k;
        END IF;
        IF kind = 'V' AND (NOT live OR old_version <> p_expected) THEN
            RAISE EXCEPTION USING ERRCODE = 'BS002', MESSAGE = k,
                DETAIL = CASE WHEN live THEN old_version::text ELSE '' END;
        END IF;
        UPDATE bevy_storage_records SET
            created_at = CASE WHEN live THEN old_created ELSE p_created END,
            modified_at = p_modified, accessed_at = p_accessed, expires_at = p_expires,
            size = p_size, compressed = p_compressed, encrypted = p_encrypted,
            custom = p_custom, value = p_val, version = p_version
            WHERE namespace = ns AND key = k;
        UPDATE bevy_storage_namespaces SET item_count = item_count - 1,
            total_size = total_size - old_size
            WHERE namespace = ns RETURNING total_size INTO n_total;
    ELSE
        IF kind = 'V' THEN
            RAISE EXCEPTION USING ERRCODE = 'BS002', MESSAGE = k, DETAIL = '';
        END IF;
        INSERT INTO bevy_storage_records (namespace, key, created_at, modified_at,
            accessed_at, expires_at, size, compressed, encrypted, custom, value, version)
            VALUES (ns, k, p_created, p_modified, p_accessed, p_expires, p_size,
                p_compressed, p_encrypted, p_custom, p_val, p_version);
        live := false;
    END IF;
    IF max_size IS NOT NULL AND n_total > max_size THEN
        SELECT coalesce(sum(size), 0)::bigint INTO expired_size FROM bevy_storage_records
            WHERE namespace = ns AND expires_at <= now_ms;
        IF n_total - expired_size > max_size THEN
            RAISE EXCEPTION USING ERRCODE = 'BS003',
                MESSAGE = format('%s %s', n_total - expired_size, p_size);
        END IF;
    END IF;
    RETURN CASE WHEN live THEN old_size END;
END
$fn$;
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

/// A whole write batch in one statement (one round trip, its own transaction): the function
/// [`SQL_CREATE`] installs. It locks the namespace's counters (creating them from the records
/// first when missing), applies the operations in order (a create-only put over a live
/// record raises `BS001` with the key, a put conditional on a version that does not match
/// raises `BS002` with the key and the version found, `''` for none), checks the quota when
/// `$3` is not NULL (raising `BS003` with the live size after the batch and the bytes it
/// added), updates the counters, and returns each operation's previous live size (NULL for
/// none). An error rolls the whole statement back. A function's body is never changed in
/// place (opening a store runs [`SQL_CREATE`] only when something is missing, and servers of
/// an older release may be calling it): a new body is a new name, `_v2`, `_v3`, ..., each
/// installed beside the ones before.
pub(super) const SQL_WRITE: &str = "SELECT bevy_storage_write_v2($1, $2, $3, $4, $5, $6, $7, \
     $8, $9, $10, $11, $12, $13, $14, $15, $16)";

/// A batch of one put: the write function's work for that one operation, with scalar
/// parameters instead of one-element arrays (the same checks, errors and counters; it
/// returns the previous live size, NULL for none), in fewer statements. It takes the
/// namespace's counters with the `UPDATE` that counts the put as a new record
/// (`item_count + 1`, `total_size + size`) instead of a `SELECT ... FOR UPDATE` followed by
/// an `UPDATE`, then reads the old record: a new key is then one `INSERT` (three statements
/// where `bevy_storage_put_v2` ran four); an existing one is checked (create-only, version:
/// `BS001`/`BS002`), replaced by an `UPDATE` and the counters corrected (four, as before).
/// The lock order is the write function's (counters, then records), so servers still on
/// `_put_v2` run beside this one without deadlocks (tested in `tests/postgres.rs`).
///
/// Chosen by measurement among variants, each swapped in under this name and alternated in
/// one bench binary (README, `postgres_save` and `postgres_overwrite`): new keys 0.79-0.82
/// of the raw upsert's rate (median 0.81) against 0.74-0.82 for `_put_v2`'s body (median
/// 0.78), existing keys 0.77-0.79 for both. A variant that inserted with `ON CONFLICT DO NOTHING` first and read the old
/// record only on a conflict (`UPDATE ... FROM (SELECT ...) RETURNING`) ran a new key in two
/// statements, about as fast (0.80-0.83), but existing keys at 0.73-0.75 (pgbench: 3-37 µs
/// per call more than `_put_v2` in six runs); its self-join also needed a `LIMIT 1` to keep
/// a generic plan's estimate below `jit_above_cost` (15 ms of JIT compilation per call in a
/// trial).
/// Both single-put functions exist at schema version 2 beside [`SQL_WRITE`]'s function;
/// opening a store installs any that is missing ([`SQL_SCHEMA_PRESENT`]).
pub(super) const SQL_PUT: &str = "SELECT bevy_storage_put_v3($1, $2, $3, $4, $5, $6, $7, $8, \
     $9, $10, $11, $12, $13, $14, $15, $16)";

/// True when every table, index and function of [`SQL_CREATE`] exists.
pub(super) const SQL_SCHEMA_PRESENT: &str = "SELECT to_regclass('bevy_storage_schema') IS NOT NULL \
     AND to_regprocedure('bevy_storage_write_v2(text, bigint, bigint, \"char\"[], text[], \
       bigint[], bigint[], bigint[], bigint[], bigint[], boolean[], boolean[], text[], bytea[], \
       bigint[], bigint[])') IS NOT NULL \
     AND to_regprocedure('bevy_storage_put_v2(text, bigint, bigint, \"char\", text, bigint, \
       bigint, bigint, bigint, bigint, boolean, boolean, text, bytea, bigint, bigint)') IS NOT NULL \
     AND to_regprocedure('bevy_storage_put_v3(text, bigint, bigint, \"char\", text, bigint, \
       bigint, bigint, bigint, bigint, boolean, boolean, text, bytea, bigint, bigint)') IS NOT NULL \
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

/// Removes the record only if it still holds the value and expiry a read returned
/// (`Store::take`), and reports its size.
pub(super) const SQL_DELETE_IF_UNCHANGED: &str = "DELETE FROM bevy_storage_records \
     WHERE namespace = $1 AND key = $2 AND value = $3 AND expires_at IS NOT DISTINCT FROM $4 \
     RETURNING size";

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
