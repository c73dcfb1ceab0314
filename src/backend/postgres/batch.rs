//! Write batches: one SQL transaction per [`Backend::write`](crate::backend::Backend::write).
//!
//! Each operation is one statement in order, so a later operation sees an earlier one's
//! effect. Upserts are `INSERT … ON CONFLICT DO UPDATE` (atomic per row under concurrent
//! servers, and they keep a live record's `created_at`); they report no previous size, like
//! the SQLite backend, so the store recounts its quota exactly when a write nears it. A
//! create-only put returns no row when a live record exists, which rolls the whole batch back
//! with `AlreadyExists`. Deletes report the size they removed.

use deadpool_postgres::Object;
use tokio_postgres::types::ToSql;

use super::{PostgresBackend, is_retryable, schema};
use crate::backend::{CustomMetadata, PutMode, WriteOp, WriteOutcome};
use crate::clock::Timestamp;
use crate::error::{Result, StorageError};

/// Attempts of a batch that deadlocked or failed to serialize against another server's.
const ATTEMPTS: usize = 3;

/// How one attempt ended when the server did not fail it.
enum BatchEnd {
    Committed(Vec<WriteOutcome>),
    /// A create-only put found a live record: rolled back.
    Exists(String),
}

/// Custom metadata as stored: JSON text, or NULL when there is none.
fn custom_json(custom: &CustomMetadata) -> Result<Option<String>> {
    if custom.is_empty() {
        return Ok(None);
    }
    serde_json::to_string(custom)
        .map(Some)
        .map_err(|e| StorageError::backend("postgres", format!("custom metadata is not JSON: {e}")))
}

/// A put's columns, converted once before the transaction.
struct PutRow<'a> {
    key: &'a str,
    created_at: i64,
    modified_at: i64,
    accessed_at: i64,
    expires_at: Option<i64>,
    size: i64,
    compressed: bool,
    encrypted: bool,
    custom: Option<String>,
    value: &'a [u8],
    create_only: bool,
}

enum Prepared<'a> {
    Put(PutRow<'a>),
    Delete(&'a str),
}

pub(super) fn write_batch(
    backend: &PostgresBackend,
    ops: Vec<WriteOp>,
    now: Timestamp,
) -> Result<Vec<WriteOutcome>> {
    if ops.is_empty() {
        return Ok(Vec::new());
    }
    let mut prepared = Vec::with_capacity(ops.len());
    for op in &ops {
        prepared.push(match op {
            WriteOp::Put { key, record, mode } => {
                let meta = &record.meta;
                Prepared::Put(PutRow {
                    key,
                    created_at: meta.created_at.0,
                    modified_at: meta.modified_at.0,
                    accessed_at: meta.accessed_at.0,
                    expires_at: meta.expires_at.map(|t| t.0),
                    size: i64::try_from(record.value.len()).unwrap_or(i64::MAX),
                    compressed: meta.compressed,
                    encrypted: meta.encrypted,
                    custom: custom_json(&meta.custom)?,
                    value: &record.value,
                    create_only: *mode == PutMode::CreateOnly,
                })
            }
            WriteOp::Delete { key } => Prepared::Delete(key),
        });
    }
    let ns = backend.namespace.as_str();
    let doing = format!("writing a batch of {} operation(s)", ops.len());
    let end = backend.run(&doing, true, async |client: &mut Object| {
        let mut attempt = 1;
        loop {
            match attempt_batch(client, ns, &prepared, now).await {
                Err(e) if attempt < ATTEMPTS && is_retryable(&e) => attempt += 1,
                other => return other,
            }
        }
    })?;
    match end {
        BatchEnd::Committed(outcomes) => Ok(outcomes),
        BatchEnd::Exists(key) => Err(StorageError::AlreadyExists { key }),
    }
}

async fn attempt_batch(
    client: &mut Object,
    ns: &str,
    ops: &[Prepared<'_>],
    now: Timestamp,
) -> std::result::Result<BatchEnd, tokio_postgres::Error> {
    let tx = client.transaction().await?;
    let mut outcomes = Vec::with_capacity(ops.len());
    for op in ops {
        match op {
            Prepared::Put(row) => {
                let sql = if row.create_only {
                    schema::SQL_CREATE_ONLY
                } else {
                    schema::SQL_UPSERT
                };
                let statement = tx.prepare_cached(sql).await?;
                let params: [&(dyn ToSql + Sync); 12] = [
                    &ns,
                    &row.key,
                    &row.created_at,
                    &row.modified_at,
                    &row.accessed_at,
                    &row.expires_at,
                    &row.size,
                    &row.compressed,
                    &row.encrypted,
                    &row.custom,
                    &row.value,
                    &now.0,
                ];
                let affected = tx.execute(&statement, &params).await?;
                if row.create_only && affected == 0 {
                    // Dropping `tx` rolls back everything done so far.
                    tx.rollback().await?;
                    return Ok(BatchEnd::Exists(row.key.to_owned()));
                }
                outcomes.push(WriteOutcome {
                    previous_size: None,
                });
            }
            Prepared::Delete(key) => {
                let statement = tx.prepare_cached(schema::SQL_DELETE).await?;
                let removed = tx.query_opt(&statement, &[&ns, key]).await?;
                let previous_size = removed.and_then(|row| {
                    let size: i64 = row.get(0);
                    let expires_at = row.get::<_, Option<i64>>(1).map(Timestamp);
                    (!now.is_past(expires_at)).then(|| u64::try_from(size).unwrap_or(0))
                });
                outcomes.push(WriteOutcome { previous_size });
            }
        }
    }
    tx.commit().await?;
    Ok(BatchEnd::Committed(outcomes))
}
