//! Write batches: one statement, one round trip, one transaction per
//! [`Backend::write`](crate::backend::Backend::write).
//!
//! A batch is sent as arrays (one element per operation) to the function
//! `bevy_storage_write_v2` that `schema.rs` installs ([`schema::SQL_WRITE`]), or, for a batch
//! of one put (a single save), as scalars to `bevy_storage_put_v3` ([`schema::SQL_PUT`]),
//! which does the same for that one operation in fewer statements. Either is called in
//! autocommit, so the statement is its own transaction: the server locks the namespace's
//! counters (`bevy_storage_namespaces`), so batches of one namespace commit one after
//! another and every size read inside one is exact; applies the operations in order (a later
//! one sees an earlier one's effect; a live record keeps its `created_at`); checks
//! create-only puts, puts conditional on a version and the quota, raising an error of its
//! own (`BS001`, `BS002`, `BS003`) that rolls everything back; updates the counters; and
//! returns what each operation replaced. The same work as a client-side transaction took two
//! round trips (the counters and the quota depend on what the statements found), which
//! halved the save rate of a server a millisecond away from its database.
//!
//! Both calls go through [`run_write`], the one place that retries a call that deadlocked
//! or failed to serialize and turns the functions' errors into typed ones ([`refusal`]).

use tokio_postgres::error::DbError;
use tokio_postgres::types::ToSql;
use tokio_postgres::{Row, Statement, Transaction};

use super::connection::Session;
use super::{PostgresBackend, is_retryable, schema};
use crate::backend::{CustomMetadata, PutMode, RecordVersion, WriteOp, WriteOutcome};
use crate::clock::Timestamp;
use crate::error::{Result, StorageError};

/// Attempts of a batch that deadlocked or failed to serialize against another server's.
const ATTEMPTS: usize = 3;

/// The SQLSTATEs the write function raises.
const CREATE_ONLY_REFUSED: &str = "BS001";
const VERSION_CONFLICT: &str = "BS002";
const OVER_QUOTA: &str = "BS003";

/// Custom metadata as stored: JSON text, or NULL when there is none.
fn custom_json(custom: &CustomMetadata) -> Result<Option<String>> {
    if custom.is_empty() {
        return Ok(None);
    }
    serde_json::to_string(custom)
        .map(Some)
        .map_err(|e| StorageError::backend("postgres", format!("custom metadata is not JSON: {e}")))
}

/// A batch as the write function takes it: one array per column, one element per
/// operation (a delete fills the put columns with placeholders).
#[derive(Default)]
struct Columns<'a> {
    kinds: Vec<i8>,
    keys: Vec<&'a str>,
    created: Vec<i64>,
    modified: Vec<i64>,
    accessed: Vec<i64>,
    expires: Vec<Option<i64>>,
    sizes: Vec<i64>,
    compressed: Vec<bool>,
    encrypted: Vec<bool>,
    customs: Vec<Option<String>>,
    values: Vec<&'a [u8]>,
    versions: Vec<i64>,
    expected: Vec<i64>,
}

impl<'a> Columns<'a> {
    fn of(ops: &'a [WriteOp]) -> Result<Self> {
        let mut c = Columns::default();
        for op in ops {
            match op {
                WriteOp::Put { key, record, mode } => {
                    let meta = &record.meta;
                    let (kind, expected) = kind_of(mode);
                    c.kinds.push(kind);
                    c.keys.push(key);
                    c.created.push(meta.created_at.0);
                    c.modified.push(meta.modified_at.0);
                    c.accessed.push(meta.accessed_at.0);
                    c.expires.push(meta.expires_at.map(|t| t.0));
                    c.sizes
                        .push(i64::try_from(record.value.len()).unwrap_or(i64::MAX));
                    c.compressed.push(meta.compressed);
                    c.encrypted.push(meta.encrypted);
                    c.customs.push(custom_json(&meta.custom)?);
                    c.values.push(&record.value);
                    c.versions.push(meta.version.0 as i64);
                    c.expected.push(expected);
                }
                WriteOp::Delete { key } => {
                    c.kinds.push(b'D' as i8);
                    c.keys.push(key);
                    c.created.push(0);
                    c.modified.push(0);
                    c.accessed.push(0);
                    c.expires.push(None);
                    c.sizes.push(0);
                    c.compressed.push(false);
                    c.encrypted.push(false);
                    c.customs.push(None);
                    c.values.push(&[]);
                    c.versions.push(0);
                    c.expected.push(0);
                }
            }
        }
        Ok(c)
    }
}

/// Applies `ops` as one transaction (see the [module docs](self)): a single put through the
/// put function, anything else through the write function, both by [`run_write`]. Returns
/// one outcome per operation; `max_size` is the quota the server checks (`None`: none).
pub(super) fn write_batch(
    backend: &PostgresBackend,
    ops: Vec<WriteOp>,
    now: Timestamp,
    max_size: Option<u64>,
) -> Result<Vec<WriteOutcome>> {
    if ops.is_empty() {
        return Ok(Vec::new());
    }
    let ns = backend.namespace.as_str();
    let now_ms = now.0;
    let max = max_size.map(|m| i64::try_from(m).unwrap_or(i64::MAX));
    let previous = if let [WriteOp::Put { key, record, mode }] = ops.as_slice() {
        // A single save: scalars to the put function.
        let meta = &record.meta;
        let (kind, expected) = kind_of(mode);
        let size = i64::try_from(record.value.len()).unwrap_or(i64::MAX);
        let custom = custom_json(&meta.custom)?;
        let row = run_write(
            backend,
            "writing a record",
            schema::SQL_PUT,
            &[
                &ns,
                &now_ms,
                &max,
                &kind,
                &key.as_str(),
                &meta.created_at.0,
                &meta.modified_at.0,
                &meta.accessed_at.0,
                &meta.expires_at.map(|t| t.0),
                &size,
                &meta.compressed,
                &meta.encrypted,
                &custom,
                &record.value.as_slice(),
                &(meta.version.0 as i64),
                &expected,
            ],
            &ops,
            max_size,
        )?;
        vec![row.try_get::<_, Option<i64>>(0).map_err(unexpected)?]
    } else {
        let c = Columns::of(&ops)?;
        let row = run_write(
            backend,
            &format!("writing a batch of {} operation(s)", ops.len()),
            schema::SQL_WRITE,
            &[
                &ns,
                &now_ms,
                &max,
                &c.kinds,
                &c.keys,
                &c.created,
                &c.modified,
                &c.accessed,
                &c.expires,
                &c.sizes,
                &c.compressed,
                &c.encrypted,
                &c.customs,
                &c.values,
                &c.versions,
                &c.expected,
            ],
            &ops,
            max_size,
        )?;
        row.try_get::<_, Vec<Option<i64>>>(0).map_err(unexpected)?
    };
    if previous.len() != ops.len() {
        return Err(StorageError::backend(
            "postgres",
            format!(
                "the write function answered {} operation(s) with {} result(s)",
                ops.len(),
                previous.len()
            ),
        ));
    }
    Ok(previous
        .into_iter()
        .map(|size| WriteOutcome {
            previous_size: size.map(|s| u64::try_from(s).unwrap_or(0)),
        })
        .collect())
}

/// The write function's answer was not of the type this build expects.
fn unexpected(e: tokio_postgres::Error) -> StorageError {
    StorageError::backend(
        "postgres",
        format!("unexpected answer of the write function: {e}"),
    )
}

/// The put kind the functions take (`U`psert, `C`reate-only, if `V`ersion) and the version
/// a `V` put expects (0 otherwise).
fn kind_of(mode: &PutMode) -> (i8, i64) {
    let (kind, expected) = match mode {
        PutMode::Upsert => (b'U', 0),
        PutMode::CreateOnly => (b'C', 0),
        PutMode::IfVersion(v) => (b'V', v.0 as i64),
    };
    (kind as i8, expected)
}

/// Runs one call of a write function (`sql` with `params`, autocommit, so its own
/// transaction) and returns its row. A call that deadlocked or failed to serialize against
/// another server's is sent again, up to [`ATTEMPTS`] in all; one the function refused
/// (`BS001`-`BS003`, nothing written) is the typed error of [`refusal`]; any other error is
/// the backend's.
fn run_write(
    backend: &PostgresBackend,
    doing: &str,
    sql: &'static str,
    params: &[&(dyn ToSql + Sync)],
    ops: &[WriteOp],
    max_size: Option<u64>,
) -> Result<Row> {
    backend.run(doing, true, async |session: &mut Session| {
        let statement = session.prepare(sql).await?;
        let mut attempt = 1;
        loop {
            match session.client.query_one(&statement, params).await {
                Ok(row) => return Ok(Ok(row)),
                Err(e) if attempt < ATTEMPTS && is_retryable(&e) => attempt += 1,
                Err(e) => match e.as_db_error().and_then(|db| refusal(db, ops, max_size)) {
                    Some(refused) => return Ok(Err(refused)),
                    None => return Err(e),
                },
            }
        }
    })?
}

/// The typed error of a batch the write function refused, from the error it raised.
fn refusal(db: &DbError, ops: &[WriteOp], max_size: Option<u64>) -> Option<StorageError> {
    match db.code().code() {
        CREATE_ONLY_REFUSED => Some(StorageError::AlreadyExists {
            key: db.message().to_owned(),
        }),
        VERSION_CONFLICT => {
            let key = db.message();
            let expected = ops.iter().find_map(|op| match op {
                WriteOp::Put {
                    key: k,
                    mode: PutMode::IfVersion(v),
                    ..
                } if k == key => Some(*v),
                _ => None,
            })?;
            let found = match db.detail().unwrap_or_default() {
                "" => None,
                v => Some(RecordVersion(v.parse::<i64>().ok()? as u64)),
            };
            Some(StorageError::VersionConflict {
                key: key.to_owned(),
                expected,
                found,
            })
        }
        OVER_QUOTA => {
            let max = max_size?;
            let mut numbers = db.message().split(' ').map(|n| n.parse::<i64>().ok());
            let after = u64::try_from(numbers.next()??).unwrap_or(0);
            let added = u64::try_from(numbers.next()??).unwrap_or(0);
            Some(StorageError::QuotaExceeded {
                needed: added,
                available: max.saturating_sub(after.saturating_sub(added)),
                max_size: max,
            })
        }
        _ => None,
    }
}

/// Locks the namespace's counters for the rest of `tx` and returns them, creating them from
/// the records first when they are missing.
pub(super) async fn lock_namespace(
    tx: &Transaction<'_>,
    lock: &Statement,
    ns: &str,
) -> std::result::Result<(i64, i64), tokio_postgres::Error> {
    if let Some(row) = tx.query_opt(lock, &[&ns]).await? {
        return Ok((row.get(0), row.get(1)));
    }
    tx.execute(schema::SQL_ADVISORY_LOCK, &[&ns]).await?;
    tx.execute(schema::SQL_INIT_NAMESPACE, &[&ns]).await?;
    let row = tx.query_one(lock, &[&ns]).await?;
    Ok((row.get(0), row.get(1)))
}
