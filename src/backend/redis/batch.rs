//! Batches: how a [`write`](crate::backend::Backend::write) reaches Redis in one round trip,
//! packed straight into the Redis protocol.
//!
//! # Atomicity: one transaction or one script per batch, never `WATCH`
//!
//! A batch ([`write`](crate::backend::Backend::write)) is **one round trip**, and Redis runs
//! it with nothing else in between, in one of two ways.
//!
//! **New records, each key once** (the common case of saving new things, with or without an
//! expiry) are sent as native commands: `MULTI`, one `MSETNX` of every record plus the batch
//! token `{NS}:batch` set to a value of this batch's own, a short script that acts only if the
//! token holds that value (and removes it), `EXEC`. `MSETNX` sets every key or, when any of
//! them exists (of any type), none, so the token holds the batch's value exactly when the
//! records were written; the script then counts the records without expiry and, for those with
//! one, sets Redis's expiry (`PEXPIREAT`) and the expiry index (`ZADD`; a record whose expiry
//! is already past by the server's clock is removed by its `PEXPIREAT` at once and not
//! indexed, so it is not stored, as the write script does). The script is given only the keys
//! of the records with an expiry, their expiries and index members, never the records. The
//! token never outlives the transaction (one left behind by hand only makes the next such
//! batch take the write script, and is removed). Redis runs this about twice as
//! fast as the same records passed through a script (`INFO commandstats` on the project's
//! 2-core test machine: 0.75 ms for the `EXEC` of 1,000 records of 242 bytes, against
//! 1.1-1.8 ms for the script's `EVALSHA`, most of it turning 2,000 arguments into Lua
//! strings and back). With a 1 h expiry (`bench redis_tx_ttl --rounds 3` on a private
//! `redis-server`, load average 5.2-5.4, the write script and this path alternating, two runs
//! each): 150,000-198,000 records/s against 143,000-156,000 through the script; the `EXEC` of a
//! 1,000-record batch took 3.3-3.5 ms, of which `MSETNX` 0.55-0.6 ms and the script 2.7-2.8
//! ms, most of it the `ZADD` into an index of up to 60,000 members and the `PEXPIREAT`s. A
//! server out of
//! memory refuses the `MSETNX` as it is queued, and `EXEC` then refuses the whole transaction.
//! When a key is taken nothing was written, and the batch goes to the script below; the next
//! 15 such batches go straight to the script, so a store that saves over existing keys pays
//! for the refused `MSETNX` once in 16 batches.
//!
//! **Every other batch** is one Lua script (`EVALSHA`, loaded again by itself after a server
//! restart). It first reads every record the batch replaces (one `EXISTS` over all the keys,
//! which also tells keys of another type apart, and only when some exist one `MGET`), applies
//! the operations in order to that copy, checking each create-only put against the state it
//! will see (a live record, judged at `now`, refuses the whole batch), and only then writes
//! the final state of each key: one `MSET` of every record, one `PEXPIREAT` per record with an
//! expiry, one `SETRANGE` of `created_at` per live record replaced, one `DEL` for the rest,
//! the expiry index in one `ZADD` and one `ZREM`, and the counters once with the sum of the
//! changes. So a refused batch changes nothing, and other clients never see half a batch.
//!
//! What a script's time goes to (`INFO commandstats` and `TIME` marks inside the script, 1,000
//! records of 250 bytes, fastest of 20 batches on the project's loaded 2-core machine): Redis
//! turning the 2,000 arguments into Lua strings, about 0.5 ms; over existing keys the `MGET`
//! of the records replaced (0.45-0.65 ms: each becomes a Lua string), the loop (0.5 ms),
//! `MSET` (0.22 ms) and the `SETRANGE`s of `created_at` (0.42 ms, against 0.65 ms for copying
//! every record in Lua); for new keys with an expiry the loop (0.43 ms), `MSET` (0.3 ms),
//! `PEXPIREAT`s (0.36 ms) and `ZADD` (0.43 ms), where a `SET ... PXAT` per record with the
//! expiry as a Lua number (which Redis formats with `%.17g` each time) took 1.5 ms and the
//! `ZADD` of numbers 0.9 ms.
//!
//! **Overwrites stay in the script** (measured, not assumed): a transaction that keeps the
//! records out of Lua for a batch of upserts of existing keys (`MULTI`; a script given only
//! the keys that reads and checks the records replaced, stashes their `created_at`, applies
//! the counters and `DEL`s them; `MSETNX` of the new records; a script that writes each kept
//! `created_at` back with `SETRANGE`; `EXEC`) ran no faster than the write script: 2.28 ms per
//! 1,000-record batch against 2.27 ms (`bench redis_tx_overwrite --rounds 3`, private server,
//! load 3.4-3.6, alternating runs; commit "Experiment (reverted next)" in the history). Its
//! first script alone took 1.7-2.0 ms (the `MGET` of the records replaced, each becoming a Lua
//! string, the checks, the `DEL`), the second 0.8-1.1 ms (a `SETRANGE` per record from Lua):
//! what taking the records out of Lua saves, the per-key calls cost again. Any design that
//! reads what it replaces in a script pays that `MGET` and a call per record for `created_at`.
//!
//! Keeping a live record's `created_at`, reporting the previous size and the create-only
//! check are read-modify-writes. With native commands they would need `WATCH` on every key
//! of the batch, a retry loop and a dedicated connection, and Redis 7.0's `WATCH` costs time
//! quadratic in the number of keys (4.3 ms for 1,000 keys here, more than the whole script);
//! inside the script there is no window between the read and the write, so no conflict to
//! detect and no retry to bound. The scripts carry a `#!lua` shebang, so Redis refuses them
//! *before* they start when it is out of memory (`maxmemory`), rather than half-way.

use std::cell::Cell;
use std::collections::HashSet;
use std::hash::BuildHasherDefault;
use std::sync::atomic::{AtomicU64, Ordering};

use super::connection::{Retry, recv_reply};
use super::hasher::KeyHasher;
use super::record::{HEADER_LEN, encode_header, stored_expiry};
use super::scripts::{COUNT_NEW_RECORDS_SCRIPT, EXPIRE_NEW_RECORDS_SCRIPT};
use super::{BACKEND, RedisBackend, resp};
use crate::backend::{PutMode, Record, RecordVersion, WriteOp, WriteOutcome};
use crate::clock::Timestamp;
use crate::error::{Result, StorageError};

/// The kinds of operation in the write script's `kinds` argument, one byte per operation.
pub(super) mod kind {
    /// Delete.
    pub const DELETE: u8 = b'D';
    /// Upsert of a record without expiry.
    pub const UPSERT: u8 = b'U';
    /// Upsert of a record with an expiry.
    pub const UPSERT_EXPIRING: u8 = b'X';
    /// Create-only put of a record without expiry.
    pub const CREATE: u8 = b'C';
    /// Create-only put of a record with an expiry.
    pub const CREATE_EXPIRING: u8 = b'Y';
    /// Put of a record without expiry, only over the live record of a given version.
    pub const IF_VERSION: u8 = b'V';
    /// Put of a record with an expiry, only over the live record of a given version.
    pub const IF_VERSION_EXPIRING: u8 = b'W';
}

/// Batches of new records that take the write script after an `MSETNX` found a key taken,
/// before `MSETNX` is tried again: a store that keeps saving over existing keys pays for the
/// refused `MSETNX` once every this many batches.
const NEW_RECORDS_BACKOFF: u32 = 16;

/// Most operations in one batch. Larger batches are refused with
/// [`StorageError::InvalidTransaction`] (never split: a batch is all or nothing): on the
/// project's 2-core machine one write script of 10,000 records with a TTL (overwrites) blocked
/// the server for every other client for 47-59 ms, a native transaction of 10,000 new records
/// with a TTL for 16-20 ms (see the README's "Durability" section for the measurement).
pub const MAX_BATCH_OPERATIONS: usize = 10_000;

/// Most bytes (records and keys, about as sent) in one batch; larger ones are refused as
/// [`MAX_BATCH_OPERATIONS`] says.
pub const MAX_BATCH_BYTES: usize = 64 << 20;

/// Largest packing buffer kept for the next batch.
const KEPT_BUFFER: usize = 4 << 20;

thread_local! {
    /// The buffer the last batch of this thread was packed into, reused by the next one (a
    /// fresh one of a few hundred kilobytes would be faulted in page by page each time).
    static PACK_BUFFER: Cell<Vec<u8>> = const { Cell::new(Vec::new()) };
}

/// A value for the batch token that no other batch uses: this process's random number (std's
/// per-process hash seed) and a counter. It only has to differ from a token left behind by
/// something else, such as a hand-made `SET`.
fn batch_token_value() -> [u8; 16] {
    use std::hash::BuildHasher;
    static PROCESS: std::sync::LazyLock<u64> =
        std::sync::LazyLock::new(|| std::collections::hash_map::RandomState::new().hash_one(0u8));
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut value = [0u8; 16];
    value[..8].copy_from_slice(&PROCESS.to_le_bytes());
    value[8..].copy_from_slice(&COUNTER.fetch_add(1, Ordering::Relaxed).to_le_bytes());
    value
}

/// An empty buffer of at least `capacity` bytes to pack a batch into: the one the thread's
/// last batch was packed into, if it kept one.
fn packing_buffer(capacity: usize) -> Vec<u8> {
    let mut buf = PACK_BUFFER.take();
    buf.clear();
    buf.reserve(capacity);
    buf
}

/// Keeps a packed batch's buffer for the thread's next batch, unless it is large.
fn recycle(buf: Vec<u8>) {
    if buf.capacity() <= KEPT_BUFFER {
        PACK_BUFFER.set(buf);
    }
}

/// One operation of a batch as the write script takes it.
struct BatchEntry<'a> {
    /// The key, without the record-key prefix.
    key: &'a [u8],
    /// See [`kind`].
    kind: u8,
    /// A put's record and its custom metadata as JSON (empty when there is none).
    put: Option<(&'a Record, Vec<u8>)>,
    /// The version a conditional put requires, sent before its record.
    expected: Option<RecordVersion>,
}

impl<'a> BatchEntry<'a> {
    fn new(op: &'a WriteOp) -> Result<Self> {
        let (key, record, mode) = match op {
            WriteOp::Delete { key } => {
                return Ok(Self {
                    key: key.as_bytes(),
                    kind: kind::DELETE,
                    put: None,
                    expected: None,
                });
            }
            WriteOp::Put { key, record, mode } => (key, record, mode),
        };
        let meta = &record.meta;
        let custom = if meta.custom.is_empty() {
            Vec::new()
        } else {
            serde_json::to_vec(&meta.custom).map_err(|e| {
                StorageError::backend(BACKEND, format!("encoding custom metadata: {e}"))
            })?
        };
        for (what, len) in [
            ("value", record.value.len()),
            ("custom metadata", custom.len()),
        ] {
            if u32::try_from(len).is_err() {
                return Err(StorageError::backend(
                    BACKEND,
                    format!(
                        "{key:?}: the {what} is {len} bytes long; a Redis record holds at most \
                         4 GiB - 1"
                    ),
                ));
            }
        }
        let expiring = meta.expires_at.is_some();
        Ok(Self {
            key: key.as_bytes(),
            kind: match (mode, expiring) {
                (PutMode::Upsert, false) => kind::UPSERT,
                (PutMode::Upsert, true) => kind::UPSERT_EXPIRING,
                (PutMode::CreateOnly, false) => kind::CREATE,
                (PutMode::CreateOnly, true) => kind::CREATE_EXPIRING,
                (PutMode::IfVersion(_), false) => kind::IF_VERSION,
                (PutMode::IfVersion(_), true) => kind::IF_VERSION_EXPIRING,
            },
            put: Some((record, custom)),
            expected: match mode {
                PutMode::IfVersion(version) => Some(*version),
                _ => None,
            },
        })
    }

    /// The length of the encoded record (0 for a delete).
    fn record_len(&self) -> usize {
        match &self.put {
            None => 0,
            Some((record, custom)) => {
                HEADER_LEN
                    + custom.len()
                    + record.value.len()
                    + if self.expected.is_some() { 8 } else { 0 }
            }
        }
    }

    /// Appends the encoded record as one RESP argument (empty for a delete).
    fn pack_record(&self, buf: &mut Vec<u8>) {
        match &self.put {
            None => resp::bulk(buf, &[]),
            Some((record, custom)) => {
                let header = encode_header(&record.meta, record.value.len(), custom.len());
                let expected = self.expected.map(|v| v.0.to_le_bytes());
                let expected: &[u8] = expected.as_ref().map_or(&[], |v| v);
                resp::bulk(buf, &[expected, &header, custom, &record.value]);
            }
        }
    }
}

/// What the packing of a batch needs to know about it as a whole.
struct BatchSummary {
    /// Each key appears once, which spares the write script following a key through the
    /// batch.
    distinct: bool,
    /// Every operation is an upsert or a create-only put, with or without expiry: the batch
    /// may be one of new records.
    plain_puts: bool,
    /// The puts with an expiry.
    expiring: usize,
    /// Count and value bytes of the puts without expiry, for the usage counters.
    added_count: u64,
    added_bytes: u64,
    /// About the size of the packed batch: its keys and records with their RESP framing.
    packed_size: usize,
}

impl BatchSummary {
    fn of(entries: &[BatchEntry<'_>], record_prefix: &str) -> Self {
        let mut seen: HashSet<&[u8], BuildHasherDefault<KeyHasher>> =
            HashSet::with_capacity_and_hasher(entries.len(), Default::default());
        let mut summary = Self {
            distinct: entries.iter().all(|e| seen.insert(e.key)),
            plain_puts: true,
            expiring: 0,
            added_count: 0,
            added_bytes: 0,
            packed_size: 0,
        };
        for e in entries {
            // The records that will have no expiry count in the usage counters from the start
            // (the script subtracts what they replace).
            if let (Some((record, _)), kind::UPSERT | kind::CREATE | kind::IF_VERSION) =
                (&e.put, e.kind)
            {
                summary.added_count += 1;
                summary.added_bytes += record.value.len() as u64;
            }
            match e.kind {
                kind::UPSERT | kind::CREATE => {}
                kind::UPSERT_EXPIRING | kind::CREATE_EXPIRING => summary.expiring += 1,
                _ => summary.plain_puts = false,
            }
            summary.packed_size += 2 * 16 + record_prefix.len() + e.key.len() + e.record_len();
        }
        summary
    }
}

impl RedisBackend {
    /// Applies a batch: see [`write`](crate::backend::Backend::write) and the module docs.
    pub(super) fn write_batch(
        &self,
        ops: Vec<WriteOp>,
        now: Timestamp,
    ) -> Result<Vec<WriteOutcome>> {
        if ops.is_empty() {
            return Ok(Vec::new());
        }
        let entries = ops
            .iter()
            .map(BatchEntry::new)
            .collect::<Result<Vec<_>>>()?;
        let summary = BatchSummary::of(&entries, &self.keys.record_prefix);
        if ops.len() > MAX_BATCH_OPERATIONS || summary.packed_size > MAX_BATCH_BYTES {
            return Err(StorageError::InvalidTransaction(format!(
                "a Redis batch holds at most {MAX_BATCH_OPERATIONS} operations and {} MiB \
                 ({} operations, about {} bytes given): Redis runs a batch as one script that \
                 blocks the server for every other client while it runs, so larger ones are \
                 refused rather than split (splitting would break all-or-nothing); nothing \
                 was written. Send it as several transactions",
                MAX_BATCH_BYTES >> 20,
                ops.len(),
                summary.packed_size
            )));
        }
        let doing = format!("writing a batch of {} operation(s)", ops.len());
        // New records, each key once (saving new things): native commands, which Redis runs
        // about twice as fast as the script; see the module docs.
        if summary.distinct && summary.plain_puts && self.try_new_records() {
            let packed = self.pack_new_records(&entries, &summary);
            let answer = self.run(&doing, Retry::Never, |con| {
                self.exec_new_records(con, &packed)
            });
            recycle(packed);
            match answer?.as_slice() {
                [1, 1] => return Ok(vec![WriteOutcome::default(); ops.len()]),
                // A key is taken and nothing was written: the script sorts the batch out.
                [0, 0] => self
                    .new_records_backoff
                    .store(NEW_RECORDS_BACKOFF - 1, Ordering::Relaxed),
                other => {
                    return Err(StorageError::backend(
                        BACKEND,
                        format!("{doing}: unexpected answer {other:?} to a batch of new records"),
                    ));
                }
            }
        }
        let packed = self.pack_batch(&entries, &summary, now);
        drop(entries);
        let mut ops = ops;
        let reply = {
            // The values are in `packed` now: free them while Redis runs the batch.
            let mut values = Some(&mut ops);
            let mut free_values = || {
                for op in values.take().into_iter().flatten() {
                    if let WriteOp::Put { record, .. } = op {
                        record.value = Vec::new();
                    }
                }
            };
            self.run(&doing, Retry::Never, |con| {
                self.eval_batch(con, &packed, &mut free_values)
            })
        };
        recycle(packed);
        let reply = reply?;
        let key_at = |index: i64| {
            usize::try_from(index)
                .ok()
                .and_then(|i| ops.get(i.wrapping_sub(1)))
                .map(|op| op.key().to_owned())
                .unwrap_or_default()
        };
        let unexpected = || {
            StorageError::backend(
                BACKEND,
                format!("{doing}: unexpected answer {reply:?} from the write script"),
            )
        };
        match reply.as_slice() {
            [1, pairs @ ..] if pairs.len() % 2 == 0 => {
                let mut outcomes = vec![WriteOutcome::default(); ops.len()];
                for pair in pairs.chunks_exact(2) {
                    let slot = usize::try_from(pair[0])
                        .ok()
                        .and_then(|i| i.checked_sub(1))
                        .and_then(|i| outcomes.get_mut(i));
                    match (slot, u64::try_from(pair[1])) {
                        (Some(slot), Ok(size)) => slot.previous_size = Some(size),
                        _ => return Err(unexpected()),
                    }
                }
                Ok(outcomes)
            }
            [0, index] => Err(StorageError::AlreadyExists {
                key: key_at(*index),
            }),
            [2, index, problem] => Err(self.layout_error(&key_at(*index), *problem)),
            [3, index, found @ ..] => {
                let op = usize::try_from(*index)
                    .ok()
                    .and_then(|i| ops.get(i.wrapping_sub(1)));
                let Some(WriteOp::Put {
                    key,
                    mode: PutMode::IfVersion(expected),
                    ..
                }) = op
                else {
                    return Err(unexpected());
                };
                let found = match found {
                    [0] => None,
                    [1, lo, hi] => Some(RecordVersion(
                        (u64::try_from(*hi).map_err(|_| unexpected())? << 32)
                            | u64::try_from(*lo).map_err(|_| unexpected())?,
                    )),
                    _ => return Err(unexpected()),
                };
                Err(StorageError::VersionConflict {
                    key: key.clone(),
                    expected: *expected,
                    found,
                })
            }
            _ => Err(unexpected()),
        }
    }

    /// Deletes a page of records, given as raw Redis keys, through the write script, so that
    /// the bookkeeping stays exact even while another store writes to the same namespace. A
    /// key that is not a record makes the script refuse the page: it is left alone and the
    /// rest deleted again.
    pub(super) fn delete_records(
        &self,
        con: &mut redis::Connection,
        mut raw_keys: Vec<Vec<u8>>,
    ) -> redis::RedisResult<()> {
        let skip = self.keys.record_prefix.len();
        while !raw_keys.is_empty() {
            let entries: Vec<BatchEntry<'_>> = raw_keys
                .iter()
                .map(|raw| BatchEntry {
                    key: &raw[skip.min(raw.len())..],
                    kind: kind::DELETE,
                    put: None,
                    expected: None,
                })
                .collect();
            let summary = BatchSummary::of(&entries, &self.keys.record_prefix);
            let packed = self.pack_batch(&entries, &summary, Timestamp::now());
            drop(entries);
            let reply = self.eval_batch(con, &packed, &mut || {});
            recycle(packed);
            let reply = reply?;
            match reply[..] {
                [2, index, _] if index >= 1 && index as usize <= raw_keys.len() => {
                    raw_keys.remove(index as usize - 1);
                }
                _ => break,
            }
        }
        Ok(())
    }

    /// Sends a batch packed by [`pack_batch`](Self::pack_batch) and reads the script's answer
    /// (see [`WRITE_SCRIPT`](super::scripts::WRITE_SCRIPT)), loading the script first if the
    /// server does not know it (yet, or after a restart). `while_waiting` runs once the batch
    /// is sent, while Redis runs it.
    fn eval_batch(
        &self,
        con: &mut redis::Connection,
        packed: &[u8],
        while_waiting: &mut dyn FnMut(),
    ) -> redis::RedisResult<Vec<i64>> {
        let mut eval = |con: &mut redis::Connection| -> redis::RedisResult<Vec<i64>> {
            con.send_packed_command(packed)?;
            while_waiting();
            Ok(redis::from_redis_value(recv_reply(con)?.extract_error()?)?)
        };
        match eval(con) {
            // Not run: the server does not know the script.
            Err(e) if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) => {
                self.scripts.write.load(con)?;
                eval(con)
            }
            other => other,
        }
    }

    /// Sends a batch of new records packed by [`pack_new_records`](Self::pack_new_records)
    /// and returns what `EXEC` answered: `[1, 1]` when the records were written, `[0, 0]` when
    /// a key was taken and nothing was written.
    fn exec_new_records(
        &self,
        con: &mut redis::Connection,
        packed: &[u8],
    ) -> redis::RedisResult<Vec<i64>> {
        con.send_packed_command(packed)?;
        // MULTI, MSETNX and EVAL answer OK or QUEUED, or an error (say, out of memory) after
        // which EXEC refuses the whole transaction. Every answer is read, so that the
        // connection stays in step, and the first error wins.
        let mut refused = None;
        for _ in 0..3 {
            if let Err(e) = recv_reply(con)?.extract_error() {
                refused.get_or_insert(e);
            }
        }
        let exec = recv_reply(con)?.extract_error();
        if let Some(e) = refused {
            return Err(e);
        }
        redis::from_redis_value(exec?).map_err(Into::into)
    }

    /// A batch of new records, each key once, as native commands in the Redis protocol (RESP):
    /// `MULTI`, one `MSETNX` of the batch token and every record, the
    /// [`COUNT_NEW_RECORDS_SCRIPT`] (or, when a record has an expiry, the
    /// [`EXPIRE_NEW_RECORDS_SCRIPT`], given the keys, expiries and index members of those
    /// records), `EXEC`. Hand the buffer back with [`recycle`] once sent.
    fn pack_new_records(&self, entries: &[BatchEntry<'_>], summary: &BatchSummary) -> Vec<u8> {
        let prefix = self.keys.record_prefix.as_bytes();
        let mut buf = packing_buffer(
            summary.packed_size
                + 512
                + EXPIRE_NEW_RECORDS_SCRIPT.len()
                + summary.expiring * (prefix.len() + 64),
        );
        resp::array(&mut buf, 1);
        resp::bulk(&mut buf, &[b"MULTI"]);
        resp::array(&mut buf, 3 + 2 * entries.len());
        let token = batch_token_value();
        resp::bulk(&mut buf, &[b"MSETNX"]);
        resp::bulk(&mut buf, &[self.keys.batch_token.as_bytes()]);
        resp::bulk(&mut buf, &[&token]);
        for e in entries {
            resp::bulk(&mut buf, &[prefix, e.key]);
            e.pack_record(&mut buf);
        }
        if summary.expiring == 0 {
            resp::array(&mut buf, 8);
            resp::bulk(&mut buf, &[b"EVAL"]);
            resp::bulk(&mut buf, &[COUNT_NEW_RECORDS_SCRIPT.as_bytes()]);
            resp::bulk(&mut buf, &[b"2"]);
            resp::bulk(&mut buf, &[self.keys.batch_token.as_bytes()]);
            resp::bulk(&mut buf, &[self.keys.usage.as_bytes()]);
            resp::int(&mut buf, summary.added_count as i64);
            resp::int(&mut buf, summary.added_bytes as i64);
            resp::bulk(&mut buf, &[&token]);
        } else {
            let expiries = || {
                entries.iter().filter_map(|e| {
                    let (record, _) = e.put.as_ref()?;
                    record
                        .meta
                        .expires_at
                        .map(|at| (e.key, stored_expiry(Some(at))))
                })
            };
            let earliest = expiries().map(|(_, at)| at).min().unwrap_or(i64::MIN);
            resp::array(
                &mut buf,
                3 + 3 + summary.expiring + 4 + 2 * summary.expiring,
            );
            resp::bulk(&mut buf, &[b"EVAL"]);
            resp::bulk(&mut buf, &[EXPIRE_NEW_RECORDS_SCRIPT.as_bytes()]);
            resp::int(&mut buf, 3 + summary.expiring as i64);
            resp::bulk(&mut buf, &[self.keys.batch_token.as_bytes()]);
            resp::bulk(&mut buf, &[self.keys.usage.as_bytes()]);
            resp::bulk(&mut buf, &[self.keys.expiry.as_bytes()]);
            for (key, _) in expiries() {
                resp::bulk(&mut buf, &[prefix, key]);
            }
            resp::int(&mut buf, summary.added_count as i64);
            resp::int(&mut buf, summary.added_bytes as i64);
            resp::bulk(&mut buf, &[&token]);
            resp::int(&mut buf, earliest);
            // The expiry of each record in decimal, formatted once per distinct value (a
            // batch's records mostly share one).
            let mut last: Option<(i64, std::ops::Range<usize>)> = None;
            for (key, at) in expiries() {
                match &last {
                    Some((value, range)) if *value == at => {
                        let range = range.clone();
                        buf.extend_from_within(range);
                    }
                    _ => {
                        let start = buf.len();
                        resp::int(&mut buf, at);
                        last = Some((at, start..buf.len()));
                    }
                }
                resp::bulk(&mut buf, &[key]);
            }
        }
        resp::array(&mut buf, 1);
        resp::bulk(&mut buf, &[b"EXEC"]);
        buf
    }

    /// The `EVALSHA` command of the write script for a batch, in the Redis protocol (RESP),
    /// built at once: each record is written straight into it, header and all. Hand the
    /// buffer back with [`recycle`] once sent.
    fn pack_batch(
        &self,
        entries: &[BatchEntry<'_>],
        summary: &BatchSummary,
        now: Timestamp,
    ) -> Vec<u8> {
        let prefix = self.keys.record_prefix.as_bytes();
        let kinds: Vec<u8> = entries.iter().map(|e| e.kind).collect();
        let mut buf = packing_buffer(summary.packed_size + 256 + entries.len() + 2 * prefix.len());
        let args = 3 + 2 + entries.len() + 6 + entries.len();
        resp::array(&mut buf, args);
        resp::bulk(&mut buf, &[b"EVALSHA"]);
        resp::bulk(&mut buf, &[self.scripts.write.get_hash().as_bytes()]);
        resp::int(&mut buf, entries.len() as i64 + 2);
        resp::bulk(&mut buf, &[self.keys.usage.as_bytes()]);
        resp::bulk(&mut buf, &[self.keys.expiry.as_bytes()]);
        for e in entries {
            resp::bulk(&mut buf, &[prefix, e.key]);
        }
        resp::int(&mut buf, now.0);
        resp::bulk(&mut buf, &[&kinds]);
        resp::int(&mut buf, summary.added_count as i64);
        resp::int(&mut buf, summary.added_bytes as i64);
        resp::bulk(&mut buf, &[prefix]);
        resp::bulk(&mut buf, &[if summary.distinct { b"1" } else { b"0" }]);
        for e in entries {
            e.pack_record(&mut buf);
        }
        buf
    }

    /// Whether a batch that may be one of new records should be tried as an `MSETNX` (see
    /// [`write_batch`](Self::write_batch)): yes unless one found a key taken in the last
    /// [`NEW_RECORDS_BACKOFF`] such batches.
    fn try_new_records(&self) -> bool {
        self.new_records_backoff
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
            .is_err()
    }
}
