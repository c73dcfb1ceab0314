//! Write batches: one SQL transaction per [`Backend::write`](crate::backend::Backend::write).
//!
//! A batch first locks its namespace's counters (`bevy_storage_namespaces`, see
//! `schema.rs`), so batches of one namespace commit one after another and every size read
//! inside one is exact. Each operation is then one statement, in order, so a later operation
//! sees an earlier one's effect: puts are `INSERT … ON CONFLICT DO UPDATE` returning the row
//! they replaced (a live record keeps its `created_at`); a create-only put returns no row
//! when a live record exists, which rolls the whole batch back with `AlreadyExists`; deletes
//! return what they removed. The counters are updated last, after the quota check, in the
//! same transaction.

use futures_util::future::{try_join, try_join_all, try_join3};
use tokio_postgres::types::ToSql;
use tokio_postgres::{Statement, Transaction};

use super::connection::Session;
use super::{PostgresBackend, is_retryable, schema};
use crate::backend::{CustomMetadata, PutMode, RecordVersion, WriteOp, WriteOutcome};
use crate::clock::Timestamp;
use crate::error::{Result, StorageError};

/// Attempts of a batch that deadlocked or failed to serialize against another server's.
const ATTEMPTS: usize = 3;

/// How one attempt ended when the server did not fail it.
enum BatchEnd {
    Committed(Vec<WriteOutcome>),
    /// A conditional put found the key in another state (`AlreadyExists`,
    /// `VersionConflict`): rolled back.
    Refused(StorageError),
    /// The live records would outgrow the quota: rolled back.
    OverQuota {
        used: u64,
        after: u64,
        max: u64,
    },
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
    version: i64,
    mode: PutMode,
    /// The version an [`PutMode::IfVersion`] put requires, as stored.
    expected: i64,
}

enum Prepared<'a> {
    Put(PutRow<'a>),
    Delete(&'a str),
}

pub(super) fn write_batch(
    backend: &PostgresBackend,
    ops: Vec<WriteOp>,
    now: Timestamp,
    max_size: Option<u64>,
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
                    version: meta.version.0 as i64,
                    mode: *mode,
                    expected: match mode {
                        PutMode::IfVersion(v) => v.0 as i64,
                        _ => 0,
                    },
                })
            }
            WriteOp::Delete { key } => Prepared::Delete(key),
        });
    }
    let ns = backend.namespace.as_str();
    let doing = format!("writing a batch of {} operation(s)", ops.len());
    let end = backend.run(&doing, true, async |session: &mut Session| {
        let mut attempt = 1;
        loop {
            match attempt_batch(session, ns, &prepared, now, max_size).await {
                Err(e) if attempt < ATTEMPTS && is_retryable(&e) => attempt += 1,
                other => return other,
            }
        }
    })?;
    match end {
        BatchEnd::Committed(outcomes) => Ok(outcomes),
        BatchEnd::Refused(refused) => Err(refused),
        BatchEnd::OverQuota { used, after, max } => Err(StorageError::QuotaExceeded {
            needed: after.saturating_sub(used),
            available: max.saturating_sub(used),
            max_size: max,
        }),
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

async fn attempt_batch(
    session: &mut Session,
    ns: &str,
    ops: &[Prepared<'_>],
    now: Timestamp,
    max_size: Option<u64>,
) -> std::result::Result<BatchEnd, tokio_postgres::Error> {
    let lock = session.prepare(schema::SQL_LOCK_NAMESPACE).await?;
    let upsert = session.prepare(schema::SQL_UPSERT).await?;
    let create_only = session.prepare(schema::SQL_CREATE_ONLY).await?;
    let if_version = session.prepare(schema::SQL_IF_VERSION).await?;
    let delete = session.prepare(schema::SQL_DELETE).await?;
    let set = session.prepare(schema::SQL_SET_NAMESPACE).await?;
    let now_ms = now.0;
    let params: Vec<Vec<&(dyn ToSql + Sync)>> = ops
        .iter()
        .map(|op| match op {
            Prepared::Put(row) if matches!(row.mode, PutMode::IfVersion(_)) => vec![
                &ns as &(dyn ToSql + Sync),
                &row.key,
                &row.modified_at,
                &row.accessed_at,
                &row.expires_at,
                &row.size,
                &row.compressed,
                &row.encrypted,
                &row.custom,
                &row.value,
                &now_ms,
                &row.version,
                &row.expected,
            ],
            Prepared::Put(row) => vec![
                &ns as &(dyn ToSql + Sync),
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
                &now_ms,
                &row.version,
            ],
            Prepared::Delete(key) => vec![&ns as &(dyn ToSql + Sync), key],
        })
        .collect();
    let client = &session.client;
    // BEGIN, the namespace lock and every statement are sent at once (tokio-postgres
    // pipelines queries polled together) and the server runs them in that order: one round
    // trip. A call cut off by its deadline closes the connection, which rolls back.
    let sent = try_join3(
        client.batch_execute("BEGIN"),
        client.query_opt(&lock, &[&ns]),
        try_join_all(ops.iter().zip(&params).map(|(op, params)| {
            let statement = match op {
                Prepared::Put(row) => match row.mode {
                    PutMode::Upsert => &upsert,
                    PutMode::CreateOnly => &create_only,
                    PutMode::IfVersion(_) => &if_version,
                },
                Prepared::Delete(_) => &delete,
            };
            client.query_opt(statement, params)
        })),
    )
    .await;
    let (locked, rows) = match sent {
        Ok(((), locked, rows)) => (locked, rows),
        Err(e) => {
            rollback(client).await;
            return Err(e);
        }
    };
    let Some(locked) = locked else {
        // The namespace has no counters (removed by hand): create them, then start over.
        client.batch_execute("ROLLBACK").await?;
        let tx = session.client.transaction().await?;
        lock_namespace(&tx, &lock, ns).await?;
        tx.commit().await?;
        return Box::pin(attempt_batch(session, ns, ops, now, max_size)).await;
    };
    let (mut count, mut total): (i64, i64) = (locked.get(0), locked.get(1));
    let mut outcomes = Vec::with_capacity(ops.len());
    let mut has_put = false;
    for (op, row) in ops.iter().zip(rows) {
        match op {
            Prepared::Put(put) => {
                has_put = true;
                let Some(written) = row else {
                    // Only a create-only put over a live record writes nothing.
                    client.batch_execute("ROLLBACK").await?;
                    return Ok(BatchEnd::Refused(StorageError::AlreadyExists {
                        key: put.key.to_owned(),
                    }));
                };
                let replaced = Replaced::from_row(&written, 0);
                if let PutMode::IfVersion(expected) = put.mode
                    && !written.get::<_, bool>(3)
                {
                    let found = replaced
                        .live_size(now)
                        .and(written.get::<_, Option<i64>>(4))
                        .map(|v| RecordVersion(v as u64));
                    client.batch_execute("ROLLBACK").await?;
                    return Ok(BatchEnd::Refused(StorageError::VersionConflict {
                        key: put.key.to_owned(),
                        expected,
                        found,
                    }));
                }
                count += i64::from(!replaced.existed);
                total += put.size - replaced.size;
                outcomes.push(WriteOutcome {
                    previous_size: replaced.live_size(now),
                });
            }
            Prepared::Delete(_) => {
                let previous_size = row.and_then(|removed| {
                    let replaced = Replaced {
                        existed: true,
                        size: removed.get(0),
                        expires_at: removed.get(1),
                    };
                    count -= 1;
                    total -= replaced.size;
                    replaced.live_size(now)
                });
                outcomes.push(WriteOutcome { previous_size });
            }
        }
    }
    // The counters include expired records not purged yet, so only a total over the quota
    // needs the exact live size (one more round trip, near the quota only).
    if let Some(max) = max_size
        && has_put
        && u64::try_from(total).unwrap_or(0) > max
    {
        let expired = match client.query_one(schema::SQL_EXPIRED, &[&ns, &now_ms]).await {
            Ok(row) => row,
            Err(e) => {
                rollback(client).await;
                return Err(e);
            }
        };
        let expired_size: i64 = expired.get(1);
        let after = u64::try_from(total - expired_size).unwrap_or(0);
        if after > max {
            let added: i64 = ops
                .iter()
                .map(|op| match op {
                    Prepared::Put(row) => row.size,
                    Prepared::Delete(_) => 0,
                })
                .sum();
            client.batch_execute("ROLLBACK").await?;
            return Ok(BatchEnd::OverQuota {
                used: after.saturating_sub(u64::try_from(added).unwrap_or(0)),
                after,
                max,
            });
        }
    }
    // The counters and the commit, pipelined: the second round trip.
    let committed = try_join(
        client.execute(&set, &[&ns, &count, &total]),
        client.batch_execute("COMMIT"),
    )
    .await;
    if let Err(e) = committed {
        rollback(client).await;
        return Err(e);
    }
    Ok(BatchEnd::Committed(outcomes))
}

/// Ends a failed transaction (best effort: a broken connection is closed anyway, which rolls
/// back too).
async fn rollback(client: &tokio_postgres::Client) {
    if !client.is_closed() {
        let _ = client.batch_execute("ROLLBACK").await;
    }
}

/// The row a put or delete replaced, as the statement returned it.
struct Replaced {
    existed: bool,
    size: i64,
    expires_at: Option<i64>,
}

impl Replaced {
    /// Reads `EXISTS, size, expires_at` starting at column `first`.
    fn from_row(row: &tokio_postgres::Row, first: usize) -> Self {
        Self {
            existed: row.get(first),
            size: row.get::<_, Option<i64>>(first + 1).unwrap_or(0),
            expires_at: row.get(first + 2),
        }
    }

    /// The size to report as replaced: only a record live at `now` counts.
    fn live_size(&self, now: Timestamp) -> Option<u64> {
        (self.existed && !now.is_past(self.expires_at.map(Timestamp)))
            .then(|| u64::try_from(self.size).unwrap_or(0))
    }
}
