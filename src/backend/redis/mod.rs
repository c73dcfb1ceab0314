//! The Redis backend: one store shared by several game servers through one Redis server.
//!
//! Needs the `redis` cargo feature (and `redis-tls` for `rediss://`) and Redis 7.0 or newer
//! (or a compatible server such as Valkey).
//!
//! # Connection strings
//!
//! `redis://[[user]:password@]host[:port][/db]`, and `rediss://...` for TLS with the
//! `redis-tls` feature (rustls, server certificates checked against the system's roots;
//! `SSL_CERT_FILE` adds a private CA). The password never appears in `Debug` output, logs or
//! errors. Through [`StorageConfig::from_url`](crate::StorageConfig::from_url) a
//! `?namespace=NAME` query parameter picks the namespace (default [`DEFAULT_NAMESPACE`]).
//!
//! # Key layout (version 2)
//!
//! Every key of a store lives under its namespace `NS`, written `{NS}` so that no namespace can
//! be a prefix of another's keys (`game` and `game:eu` stay apart) and so that a Redis Cluster
//! would keep a namespace in one slot:
//!
//! | Redis key | type | holds |
//! |---|---|---|
//! | `{NS}:r:<key>` | string | one record: the 42-byte header below, the custom metadata, the value bytes |
//! | `{NS}:usage` | hash | `n` and `b`: count and bytes of the records *without* expiry |
//! | `{NS}:expiry` | sorted set | the keys of the records *with* an expiry, scored by `expires_at` |
//! | `{NS}:batch` | string | the batch token of a transaction of new records; set and removed inside it, so never seen between commands |
//!
//! A record is one Redis string: a fixed header (integers little-endian, timestamps in ms since
//! the epoch), then `custom_len` bytes of custom metadata (a JSON object; nothing when there is
//! none), then `size` bytes of value. The fields the scripts read come first, so that one
//! `struct.unpack('<i8i8I4', record)` in Lua reads them:
//!
//! | offset | type | field |
//! |---|---|---|
//! | 0 | i64 | `created_at` |
//! | 8 | i64 | `expires_at`, 0 for never (an expiry at or before the epoch is written as -1) |
//! | 16 | u32 | `size`: length of the value |
//! | 20 | u32 | `custom_len`: length of the custom metadata |
//! | 24 | i64 | `modified_at` |
//! | 32 | i64 | `accessed_at` |
//! | 40 | u8 | flags: 1 compressed, 2 encrypted |
//! | 41 | u8 | layout version, 2 |
//!
//! The value and its metadata are written, read and expire together: a record with an expiry
//! is written with `SET ... PXAT expires_at` and Redis removes it by itself at that
//! millisecond, whether or not anyone runs [`purge_expired`](Backend::purge_expired); a touch
//! rewrites the 8 bytes of `accessed_at` in place (`SETRANGE`, which keeps the expiry). A read
//! is one `GET` (or a `GETRANGE` of the header and the custom metadata for the metadata alone),
//! parsed here. An empty store leaves no key at all behind.
//!
//! Layout 1 (one hash per record, plus an `{NS}:expiry-size` hash) was only ever written by
//! unreleased builds, so there is nothing to migrate. A key under `{NS}:r:` that does not hold
//! a layout-2 record (such as a layout-1 hash) is never read as one: reading, writing or
//! deleting it fails with [`StorageError::Corrupt`] naming the key and changes nothing;
//! listing, counting and [`clear`](Backend::clear) pass over such keys and leave them be.
//! Remove such a key by hand (`redis-cli DEL`).
//!
//! The two bookkeeping keys make [`usage`](Backend::usage) cheap: the counters plus one walk
//! over the live records that have an expiry (in pages, reading their sizes from their
//! headers), instead of a `SCAN` of the whole database. Every change goes through the scripts
//! below or the transaction of new records, which keep them exact. A record that Redis
//! expired leaves a stale entry in `{NS}:expiry`, and so may a key later written again
//! without an expiry; such entries are ignored (the usage, purge and trim scripts check the
//! record's header) and trimmed by the next batches the write script runs, `purge_expired`
//! and `clear`.
//!
//! # Atomicity: one transaction or one script per batch, never `WATCH`
//!
//! A batch ([`write`](Backend::write)) is **one round trip**, and Redis runs it with nothing
//! else in between, in one of two ways.
//!
//! **New records without expiry, each key once** (the common case of saving new things) are
//! sent as native commands: `MULTI`, one `MSETNX` of every record plus the batch token
//! `{NS}:batch` set to a value of this batch's own, a short script that counts the records
//! only if the token holds that value (and removes it), `EXEC`. `MSETNX` sets every key or,
//! when any of them exists (of any type), none, so the token holds the batch's value exactly
//! when the records were written; the counters follow in the same transaction, and the token
//! never outlives it (one left behind by hand only makes the next such batch take the script,
//! and is removed). Redis runs this about twice as
//! fast as the same records passed through a script (`INFO commandstats` on the project's
//! 2-core test machine: 0.75 ms for the `EXEC` of 1,000 records of 242 bytes, against
//! 1.1-1.8 ms for the script's `EVALSHA`, most of it turning 2,000 arguments into Lua
//! strings and back). A server out of
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
//! the final state of each key: one `MSET` for the records without expiry, one
//! `SET ... PXAT` per record with an expiry, one `DEL` for the rest, and the counters once
//! with the sum of the changes. So a refused batch changes nothing, and other clients never
//! see half a batch.
//!
//! Keeping a live record's `created_at`, reporting the previous size and the create-only
//! check are read-modify-writes. With native commands they would need `WATCH` on every key
//! of the batch, a retry loop and a dedicated connection, and Redis 7.0's `WATCH` costs time
//! quadratic in the number of keys (4.3 ms for 1,000 keys here, more than the whole script);
//! inside the script there is no window between the read and the write, so no conflict to
//! detect and no retry to bound. The scripts carry a `#!lua` shebang, so Redis refuses them
//! *before* they start when it is out of memory (`maxmemory`), rather than half-way.
//!
//! # Listing
//!
//! [`scan`](Backend::scan) and [`clear`](Backend::clear) walk the keys with
//! `SCAN MATCH {NS}:r:<prefix>* TYPE string` (never `KEYS`, which blocks the server), with the
//! glob characters `* ? [ ] \` of the namespace and prefix escaped so that a prefix matches
//! literally; `SCAN` may repeat a key, so results are de-duplicated. `scan` then reads the
//! headers of each page in one pipeline. `SCAN` walks the whole database whatever the
//! pattern, so a store that lists keys often on a large shared server is better given its own
//! database number (`redis://host/3`).
//!
//! # Connections and failures
//!
//! A pool ([`r2d2`]) of up to [`RedisOptions::pool_size`] connections, each opened within
//! [`RedisOptions::connect_timeout`] and with [`RedisOptions::response_timeout`] on every
//! read and write of its socket. When Redis is down an operation fails with
//! [`StorageError::Unavailable`] within `connect_timeout + response_timeout` (3 s by default),
//! and immediately while the pool's reconnection attempts keep failing. The pool reconnects in
//! the background, so the store recovers by itself within about half a `connect_timeout` of
//! Redis coming back; connections that were open before an outage are checked with `PING`
//! before a write is sent on them, so a restart does not make writes fail once more per
//! pooled connection. Reads are retried on another connection after a connection failure; a
//! write whose connection fails *after* it was sent is not retried (it may or may not have
//! been applied) and the error says so.
//!
//! # Time
//!
//! Liveness is judged by the store's clock (`now`), expiry by Redis's: a record disappears when
//! the *Redis server's* clock reaches its `expires_at`, and a record written with an
//! `expires_at` already past by that clock is not stored at all. Keep the game servers' clocks
//! in sync (NTP) with Redis's. Configure the server with `maxmemory-policy noeviction` (the
//! default): an evicting policy would silently delete records.

use std::cell::Cell;
use std::collections::HashSet;
use std::fmt;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use r2d2::{Pool, PooledConnection};
use redis::{ConnectionLike, RedisError, Script};

use super::{
    Backend, CustomMetadata, KeyEntry, PutMode, Record, RecordMeta, Usage, WriteOp, WriteOutcome,
};
use crate::clock::Timestamp;
use crate::error::{Result, StorageError};

const BACKEND: &str = "redis";

/// The namespace used when a connection string names none.
pub const DEFAULT_NAMESPACE: &str = "bevy_storage";

/// Longest namespace accepted, in bytes.
const MAX_NAMESPACE_LEN: usize = 256;

/// Keys asked for per `SCAN` call.
const SCAN_COUNT: usize = 1000;

/// Expiring records examined per call of the usage, purge and trim scripts, so that no script
/// blocks the server for long.
const SCRIPT_PAGE: usize = 1000;

/// A pooled connection unused for longer than this is checked with `PING` before a write is
/// sent on it (the server may have restarted meanwhile).
const IDLE_CHECK: Duration = Duration::from_secs(1);

/// Attempts an operation makes on different connections after connection failures.
const MAX_ATTEMPTS: u32 = 3;

/// Length of a record's header; see the module docs for its fields.
const HEADER_LEN: usize = 42;

/// The key layout version, the last byte of every record's header.
const LAYOUT_VERSION: u8 = 2;

/// Bytes of custom metadata [`get_meta`](Backend::get_meta) reads along with the header, so
/// that most records need a single `GETRANGE`.
const CUSTOM_READ_AHEAD: usize = 214;

/// The kinds of operation in the write script's `kinds` argument, one byte per operation.
mod kind {
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
}

/// Applies a batch; see the module docs. KEYS: usage, expiry, then one record key per
/// operation. ARGV: now, kinds (one byte per operation, see [`kind`]), the count and bytes of
/// the puts without expiry, the record-key prefix, `1` when no key repeats in the batch (else
/// `0`), then one encoded record per operation (empty for a delete). Returns
/// `{1, index, previous size, ...}` with a pair for each operation (1-based) that replaced or
/// deleted a live record, `{0, index}` when the create-only put at `index` meets a live
/// record, or `{2, index, problem}` when the key of the operation at `index` holds something
/// else than a layout-2 record (`problem` 1: another Redis type; 2: a string that is not a
/// record). Nothing is changed in the last two cases.
///
/// A batch of new keys without expiry, each key once (the common case of saving new things),
/// is one `MSETNX`, which sets every record or, when any of the keys exists, nothing; it is
/// tried when the first and last keys are free. Otherwise everything is read before anything
/// is written: one `EXISTS` over all the keys (it counts keys of any type) and, only when
/// some exist, one `MGET` of the records they hold. The operations are then applied in order
/// in Lua (to a copy of the records when a key repeats), and only the final state of each key
/// is written: one `MSET` for the records without expiry, a `SET ... PXAT` per record with
/// one, one `DEL` for the rest. The counters are updated once, the expiry index only for
/// records with an expiry, old or new. `TIME` (the server's clock, which decides whether a
/// record with an expiry is stored at all) is read once, and only when a record has an expiry.
const WRITE_SCRIPT: &str = r#"#!lua
local usage, expiry = KEYS[1], KEYS[2]
local now = tonumber(ARGV[1])
local kinds = ARGV[2]
local prefix = ARGV[5]
local distinct = ARGV[6] == '1'
local count = #kinds
local byte, sub, find, min = string.byte, string.sub, string.find, math.min
local sunpack = struct.unpack
local rcall = redis.call
local keys, argv = KEYS, ARGV
local D, X, C, Y = 68, 88, 67, 89
if #keys ~= count + 2 or #argv ~= count + 6 then
  return redis.error_reply('bevy_storage: malformed write batch')
end

local result = {1}
local dn, db = tonumber(argv[3]), tonumber(argv[4])
local zset

-- New records without expiry, each key once (saving new things): one MSETNX, which sets them
-- all, or nothing when any of the keys exists (of any type). Tried only when the batch's first
-- and last keys are free, so that a batch over existing keys rarely pays for it.
local done = false
if distinct and count <= 2000 and not find(kinds, '[^UC]')
    and rcall('EXISTS', keys[3], keys[count + 2]) == 0 then
  local sets = {}
  for n = 1, count do
    sets[2 * n - 1], sets[2 * n] = keys[n + 2], argv[n + 6]
  end
  done = rcall('MSETNX', unpack(sets, 1, 2 * count)) == 1
end

if not done then
  -- Read the records the batch replaces, before changing anything. EXISTS counts the keys
  -- that exist, of any type; only when there are some, MGET reads them (false for a missing
  -- key and for one of another type, which the difference of the two counts reveals).
  local present = 0
  for i = 1, count, 1000 do
    present = present + rcall('EXISTS', unpack(keys, i + 2, min(i + 999, count) + 2))
  end
  local olds = {}
  if present > 0 then
    for i = 1, count, 1000 do
      local got = rcall('MGET', unpack(keys, i + 2, min(i + 999, count) + 2))
      for m = 1, #got do olds[i + m - 1] = got[m] end
    end
    local found = 0
    for n = 1, count do
      if olds[n] then found = found + 1 end
    end
    if present ~= found then
      for n = 1, count do
        if not olds[n] and rcall('EXISTS', keys[n + 2]) == 1 then return {2, n, 1} end
      end
    end
  end

  -- The server's clock, only when a record has an expiry: a record already past by it is not
  -- stored at all.
  local tnow
  if find(kinds, '[XY]') then
    local t = rcall('TIME')
    tnow = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  end

  -- Apply the operations in order, judging liveness at now. When a key repeats, each
  -- operation sees the record the previous one left (cur: record key -> record, or false for
  -- none). The final state of each key goes to sets (MSET), pxs (SET PXAT) or dels (DEL).
  local sets, pxs, dels = {}, {}, {}
  local ns, np, nd = 0, 0, 0
  local cur, cexp = {}, {}
  local plen = #prefix
  -- Queues the final state of a key: a record with an expiry, one without, or none.
  local function queue(rkey, rec, exp)
    if exp then
      pxs[np + 1], pxs[np + 2], pxs[np + 3] = rkey, rec, exp
      np = np + 3
    elseif rec then
      sets[ns + 1], sets[ns + 2] = rkey, rec
      ns = ns + 2
    else
      nd = nd + 1
      dels[nd] = rkey
    end
  end
  for n = 1, count do
    local rkey, k = keys[n + 2], byte(kinds, n)
    local old
    if distinct then
      old = olds[n]
    else
      old = cur[rkey]
      if old == nil then old = olds[n] end
    end
    local rec, exp = false, nil
    if k ~= D then
      rec = argv[n + 6]
      if k == X or k == Y then
        exp = sunpack('<i8', rec, 9)
        if exp <= tnow then rec, exp = false, nil end
      end
    end
    if old then
      if #old < 42 or byte(old, 42) ~= 2 then return {2, n, 2} end
      local oexp, osize = sunpack('<i8I4', old, 9)
      if oexp == 0 or oexp > now then
        if k == C or k == Y then return {0, n} end
        result[#result + 1] = n
        result[#result + 1] = osize
        -- A live record's created_at carries over.
        if rec then rec = sub(old, 1, 8) .. sub(rec, 9) end
      end
      if oexp == 0 then
        dn = dn - 1
        db = db - osize
      elseif not exp then
        zset = zset or {}
        zset[sub(rkey, plen + 1)] = false
      end
    end
    if exp then
      zset = zset or {}
      zset[sub(rkey, plen + 1)] = exp
    end
    if not distinct then
      cur[rkey] = rec
      cexp[rkey] = exp
    elseif rec or old then
      queue(rkey, rec, exp)
    end
  end
  if not distinct then
    for rkey, rec in pairs(cur) do queue(rkey, rec, cexp[rkey]) end
  end

  -- Everything is checked: write.
  for i = 1, ns, 1000 do
    rcall('MSET', unpack(sets, i, min(i + 999, ns)))
  end
  for i = 1, np, 3 do
    rcall('SET', pxs[i], pxs[i + 1], 'PXAT', pxs[i + 2])
  end
  for i = 1, nd, 1000 do
    rcall('DEL', unpack(dels, i, min(i + 999, nd)))
  end
end

-- The expiry index: the last change of each key wins.
if zset then
  local adds, rems = {}, {}
  for m, score in pairs(zset) do
    if score then
      adds[#adds + 1] = score
      adds[#adds + 1] = m
    else
      rems[#rems + 1] = m
    end
  end
  for i = 1, #adds, 1000 do
    rcall('ZADD', expiry, unpack(adds, i, min(i + 999, #adds)))
  end
  for i = 1, #rems, 1000 do
    rcall('ZREM', expiry, unpack(rems, i, min(i + 999, #rems)))
  end
end

if dn ~= 0 or db ~= 0 then
  if rcall('HINCRBY', usage, 'n', dn) <= 0 then
    rcall('DEL', usage)
  else
    rcall('HINCRBY', usage, 'b', db)
  end
end

-- Forget a few entries whose record Redis expired by itself (the earliest expiries go first),
-- or which no longer has an expiry.
for _, m in ipairs(rcall('ZRANGE', expiry, 0, 7)) do
  local h = redis.pcall('GETRANGE', prefix .. m, 0, 41)
  if type(h) ~= 'string' or #h ~= 42 or byte(h, 42) ~= 2 or sunpack('<i8', h, 9) == 0 then
    rcall('ZREM', expiry, m)
  end
end
return result
"#;

/// The second half of a batch of new records without expiry written natively (see
/// [`RedisBackend::pack_new_records`]): runs inside the batch's `MULTI`/`EXEC` right after its
/// `MSETNX`, which sets the batch token to this batch's own value along with the records or,
/// when any of the keys exists, nothing at all. The token therefore holds this batch's value
/// exactly when the records were written: the script removes it and only then counts the
/// records. A token holding anything else (even a key of another type) cannot be one of a
/// transaction, which never outlives one, and made the `MSETNX` fail: it is removed so that
/// the next batch goes through. KEYS:
/// the batch token, usage. ARGV: the count and bytes of the records, this batch's token value.
/// Returns 1 when the records were written, else 0.
const COUNT_NEW_RECORDS_SCRIPT: &str = r#"#!lua
local token = redis.pcall('GET', KEYS[1])
if token then redis.call('DEL', KEYS[1]) end
if token ~= ARGV[3] then return 0 end
redis.call('HINCRBY', KEYS[2], 'n', ARGV[1])
redis.call('HINCRBY', KEYS[2], 'b', ARGV[2])
return 1
"#;

/// Sets the access time of an existing record, keeping its expiry. KEYS: the record. ARGV:
/// the time, 8 bytes little-endian. Fails on a key of another type, passes over a string that
/// is not a record.
const TOUCH_SCRIPT: &str = r#"#!lua
if redis.call('GETRANGE', KEYS[1], 41, 41) == '\2' then
  redis.call('SETRANGE', KEYS[1], 32, ARGV[1])
end
return 0
"#;

/// One page of usage. KEYS: usage, expiry. ARGV: now, record-key prefix, offset, page size.
/// Returns `{count, bytes, examined}`: the records without expiry (first page only) plus the
/// live ones with an expiry in this page, their sizes read from their headers.
const USAGE_SCRIPT: &str = r#"#!lua flags=no-writes
local now = tonumber(ARGV[1])
local count, bytes = 0, 0
if tonumber(ARGV[3]) == 0 then
  local u = redis.call('HMGET', KEYS[1], 'n', 'b')
  count, bytes = tonumber(u[1] or 0), tonumber(u[2] or 0)
end
local members = redis.call('ZRANGEBYSCORE', KEYS[2], '(' .. ARGV[1], '+inf',
                           'LIMIT', ARGV[3], ARGV[4])
for _, m in ipairs(members) do
  local h = redis.pcall('GETRANGE', ARGV[2] .. m, 0, 41)
  if type(h) == 'string' and #h == 42 and string.byte(h, 42) == 2 then
    local e, size = struct.unpack('<i8I4', h, 9)
    if e ~= 0 and e > now then
      count = count + 1
      bytes = bytes + size
    end
  end
end
return {count, bytes, #members}
"#;

/// Removes up to a page of records with `expires_at <= now`. KEYS: usage, expiry. ARGV: now,
/// record-key prefix, page size. Returns `{removed, examined}`. Only a record whose own header
/// says it has expired is removed; entries of records gone or without expiry are forgotten.
const PURGE_SCRIPT: &str = r#"#!lua
local now = tonumber(ARGV[1])
local members = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', ARGV[1], 'LIMIT', 0, ARGV[3])
local removed = 0
for _, m in ipairs(members) do
  local rkey = ARGV[2] .. m
  local h = redis.pcall('GETRANGE', rkey, 0, 41)
  local e = 0
  if type(h) == 'string' and #h == 42 and string.byte(h, 42) == 2 then
    e = struct.unpack('<i8', h, 9)
  end
  if e == 0 then
    redis.call('ZREM', KEYS[2], m)
  elseif e <= now then
    removed = removed + redis.call('DEL', rkey)
    redis.call('ZREM', KEYS[2], m)
  else
    redis.call('ZADD', KEYS[2], e, m)
  end
end
return {removed, #members}
"#;

/// Forgets the expiry entries whose record is gone (or has no expiry), a page at a time.
/// KEYS: usage, expiry. ARGV: record-key prefix, offset, page size. Returns
/// `{examined, removed}`.
const TRIM_SCRIPT: &str = r#"#!lua
local offset = tonumber(ARGV[2])
local members = redis.call('ZRANGE', KEYS[2], offset, offset + tonumber(ARGV[3]) - 1)
local removed = 0
for _, m in ipairs(members) do
  local h = redis.pcall('GETRANGE', ARGV[1] .. m, 0, 41)
  if type(h) ~= 'string' or #h ~= 42 or string.byte(h, 42) ~= 2
     or struct.unpack('<i8', h, 9) == 0 then
    redis.call('ZREM', KEYS[2], m)
    removed = removed + 1
  end
end
return {#members, removed}
"#;

/// Tuning of the Redis backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisOptions {
    /// Most connections open at once (at least 1). Default 10.
    pub pool_size: u32,
    /// How long opening a connection, or waiting for a free one, may take. Default 1 s.
    pub connect_timeout: Duration,
    /// How long a command may wait for the server's answer. Default 2 s.
    pub response_timeout: Duration,
}

impl Default for RedisOptions {
    fn default() -> Self {
        Self {
            pool_size: 10,
            connect_timeout: Duration::from_secs(1),
            response_timeout: Duration::from_secs(2),
        }
    }
}

/// Records in a Redis server, under one namespace. See the [module docs](self) for the key
/// layout, atomicity and failure handling.
pub struct RedisBackend {
    pool: Pool<Manager>,
    shared: Arc<Shared>,
    /// The connection string without its password, for messages.
    address: String,
    namespace: String,
    keys: Keys,
    scripts: Scripts,
    options: RedisOptions,
    /// Batches of new records that take the script instead of `MSETNX` before `MSETNX` is
    /// tried again; set when `MSETNX` found a key taken (see [`RedisBackend::write`]).
    new_records_backoff: AtomicU32,
}

impl fmt::Debug for RedisBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisBackend")
            .field("url", &self.address)
            .field("namespace", &self.namespace)
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

/// The Redis keys of one namespace.
struct Keys {
    /// `{NS}:r:`, followed by the record's key.
    record_prefix: String,
    usage: String,
    expiry: String,
    /// `{NS}:batch`: set and removed within one `MULTI`/`EXEC` by a batch of new records (see
    /// [`COUNT_NEW_RECORDS_SCRIPT`]), so it never exists between commands.
    batch_token: String,
}

impl Keys {
    fn new(namespace: &str) -> Self {
        let base = format!("{{{namespace}}}:");
        Self {
            record_prefix: format!("{base}r:"),
            usage: format!("{base}usage"),
            expiry: format!("{base}expiry"),
            batch_token: format!("{base}batch"),
        }
    }

    fn record(&self, key: &str) -> String {
        let mut k = String::with_capacity(self.record_prefix.len() + key.len());
        k.push_str(&self.record_prefix);
        k.push_str(key);
        k
    }
}

struct Scripts {
    write: Script,
    touch: Script,
    usage: Script,
    purge: Script,
    trim: Script,
}

/// State shared between the backend and its connection manager.
struct Shared {
    /// Bumped when a connection fails: older connections are checked before the next write.
    generation: AtomicU64,
    /// The last failure to open a connection, until one opens again.
    connect_failure: Mutex<Option<ConnectFailure>>,
}

#[derive(Clone)]
struct ConnectFailure {
    at: Instant,
    message: String,
    /// The server could not be reached (rather than, say, refusing the password).
    unreachable: bool,
}

/// A pooled connection and what the backend knows about its health.
struct RedisConn {
    con: redis::Connection,
    /// Failed mid-command (I/O error or timeout): the pool drops it.
    broken: bool,
    last_ok: Instant,
    generation: u64,
}

/// Opens connections with the configured timeouts for the pool.
struct Manager {
    client: redis::Client,
    connect_timeout: Duration,
    response_timeout: Duration,
    shared: Arc<Shared>,
}

impl r2d2::ManageConnection for Manager {
    type Connection = RedisConn;
    type Error = RedisError;

    fn connect(&self) -> Result<RedisConn, RedisError> {
        let opened = self
            .client
            .get_connection_with_timeout(self.connect_timeout)
            .and_then(|con| {
                con.set_read_timeout(Some(self.response_timeout))?;
                con.set_write_timeout(Some(self.response_timeout))?;
                Ok(con)
            });
        match opened {
            Ok(con) => {
                *self.shared.connect_failure.lock() = None;
                Ok(RedisConn {
                    con,
                    broken: false,
                    last_ok: Instant::now(),
                    generation: self.shared.generation.load(Ordering::SeqCst),
                })
            }
            Err(e) => {
                *self.shared.connect_failure.lock() = Some(ConnectFailure {
                    at: Instant::now(),
                    message: e.to_string(),
                    unreachable: !is_refusal(&e),
                });
                Err(e)
            }
        }
    }

    fn is_valid(&self, conn: &mut RedisConn) -> Result<(), RedisError> {
        redis::cmd("PING").query::<()>(&mut conn.con)
    }

    fn has_broken(&self, conn: &mut RedisConn) -> bool {
        conn.broken || !conn.con.is_open()
    }
}

/// Whether an operation may be sent again after its connection failed.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Retry {
    /// Reads and idempotent changes: try again on another connection.
    Safe,
    /// A batch write: never resent once sent (it may have been applied).
    Never,
}

/// True when the error means the connection (or the server) is gone, not that a command was
/// refused.
fn is_connection_failure(e: &RedisError) -> bool {
    e.is_io_error() || e.is_timeout() || e.is_connection_dropped() || e.is_connection_refusal()
}

/// True when a new connection was refused for its credentials or database, not for being
/// unable to reach the server (or a full or busy server).
fn is_refusal(e: &RedisError) -> bool {
    let full = e
        .detail()
        .is_some_and(|d| d.contains("max number of clients"));
    !(is_connection_failure(e) || is_server_unavailable(e) || full)
}

/// True for server answers that mean "not now" rather than "never".
fn is_server_unavailable(e: &RedisError) -> bool {
    use redis::{ErrorKind, ServerErrorKind};
    matches!(
        e.kind(),
        ErrorKind::Server(
            ServerErrorKind::BusyLoading
                | ServerErrorKind::TryAgain
                | ServerErrorKind::ClusterDown
                | ServerErrorKind::MasterDown
        )
    ) || matches!(e.code(), Some("BUSY" | "MISCONF"))
}

impl RedisBackend {
    /// Connects to the Redis server at `url` (see the [module docs](self) for the format) and
    /// uses the keys of `namespace`.
    ///
    /// Fails with [`StorageError::Config`] for a malformed URL, an invalid namespace (empty,
    /// longer than 256 bytes, or holding `{`, `}` or a control character) or a `pool_size` of
    /// 0; [`StorageError::FeatureDisabled`] for `rediss://` without the `redis-tls` feature;
    /// [`StorageError::Unavailable`] when the server cannot be reached within the timeouts;
    /// [`StorageError::Backend`] when it refuses the credentials or is older than Redis 7.
    pub fn open(url: &str, namespace: &str, options: &RedisOptions) -> Result<Self> {
        let address = redact_url(url);
        validate_namespace(namespace)?;
        if options.pool_size == 0 {
            return Err(StorageError::Config(
                "RedisOptions::pool_size must be at least 1".into(),
            ));
        }
        if options.connect_timeout.is_zero() || options.response_timeout.is_zero() {
            return Err(StorageError::Config(
                "the Redis connect and response timeouts must not be zero".into(),
            ));
        }
        let scheme = url.split_once("://").map(|(s, _)| s);
        if !matches!(scheme, Some("redis" | "rediss")) {
            return Err(StorageError::Config(format!(
                "{address:?} is not a Redis URL: use redis://[:password@]host[:port][/db] or rediss://..."
            )));
        }
        if scheme == Some("rediss") {
            #[cfg(not(feature = "redis-tls"))]
            return Err(StorageError::FeatureDisabled {
                feature: "redis-tls",
                what: format!("the TLS connection {address:?}"),
            });
            #[cfg(feature = "redis-tls")]
            {
                // redis builds its rustls config from the process-wide provider; an error only
                // means one is installed already.
                let _ = rustls::crypto::ring::default_provider().install_default();
            }
        }
        let client = redis::Client::open(url).map_err(|e| {
            StorageError::Config(format!(
                "invalid Redis URL {address:?}: {}",
                crate::config::redact_text(e.detail().unwrap_or(e.category()), url)
            ))
        })?;
        let shared = Arc::new(Shared {
            generation: AtomicU64::new(0),
            connect_failure: Mutex::new(None),
        });
        let manager = Manager {
            client,
            connect_timeout: options.connect_timeout,
            response_timeout: options.response_timeout,
            shared: Arc::clone(&shared),
        };
        let pool = Pool::builder()
            .max_size(options.pool_size)
            .connection_timeout(options.connect_timeout)
            .test_on_check_out(false)
            // Failures reach the caller as errors; the pool must not log them too.
            .error_handler(Box::new(r2d2::NopErrorHandler))
            .build_unchecked(manager);
        let backend = Self {
            pool,
            shared,
            address,
            namespace: namespace.to_owned(),
            keys: Keys::new(namespace),
            scripts: Scripts {
                write: Script::new(WRITE_SCRIPT),
                touch: Script::new(TOUCH_SCRIPT),
                usage: Script::new(USAGE_SCRIPT),
                purge: Script::new(PURGE_SCRIPT),
                trim: Script::new(TRIM_SCRIPT),
            },
            options: options.clone(),
            new_records_backoff: AtomicU32::new(0),
        };
        backend.check_server()?;
        Ok(backend)
    }

    /// The namespace this backend's keys live under.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// Refuses servers older than Redis 7 (the scripts need shebang flags).
    fn check_server(&self) -> Result<()> {
        let info: String = self.run("checking the server", Retry::Safe, |con| {
            redis::cmd("INFO").arg("server").query(con)
        })?;
        let version = info_field(&info, "redis_version").unwrap_or("unknown");
        let major = version
            .split('.')
            .next()
            .and_then(|m| m.parse::<u32>().ok());
        match major {
            Some(m) if m >= 7 => Ok(()),
            _ => Err(StorageError::backend(
                BACKEND,
                format!(
                    "the server at {} is Redis {version}; the Redis backend needs Redis 7.0 or newer",
                    self.address
                ),
            )),
        }
    }

    /// A connection: an idle one, or a new one within the connect timeout. Fails at once while
    /// connections cannot be opened (the pool keeps trying in the background).
    fn checkout(&self, deadline: Instant) -> Result<PooledConnection<Manager>> {
        if let Some(conn) = self.pool.try_get() {
            return Ok(conn);
        }
        let recent_failure = self
            .shared
            .connect_failure
            .lock()
            .clone()
            .filter(|f| f.at.elapsed() < self.options.connect_timeout * 2);
        if let Some(failure) = recent_failure {
            return Err(self.connect_error(&failure));
        }
        let wait = deadline
            .saturating_duration_since(Instant::now())
            .min(self.options.connect_timeout);
        self.pool.get_timeout(wait).map_err(|e| {
            let recent = self.shared.connect_failure.lock().clone();
            match recent {
                Some(failure) => self.connect_error(&failure),
                None => self.unavailable(format_args!(
                    "no connection became free within {wait:?} ({e}); raise pool_size"
                )),
            }
        })
    }

    fn connect_error(&self, failure: &ConnectFailure) -> StorageError {
        if failure.unreachable {
            self.unavailable(format_args!("cannot connect: {}", failure.message))
        } else {
            StorageError::backend(
                BACKEND,
                format!(
                    "Redis at {} refused the connection: {} (check the user, password and \
                     database in the URL)",
                    self.address, failure.message
                ),
            )
        }
    }

    /// Runs `f` on a pooled connection, mapping failures (see [`Retry`]).
    fn run<T>(
        &self,
        doing: &str,
        retry: Retry,
        mut f: impl FnMut(&mut redis::Connection) -> redis::RedisResult<T>,
    ) -> Result<T> {
        let deadline =
            Instant::now() + self.options.connect_timeout + self.options.response_timeout;
        let mut attempt = 0;
        loop {
            attempt += 1;
            let may_retry = attempt < MAX_ATTEMPTS && Instant::now() < deadline;
            let mut conn = self.checkout(deadline)?;
            let generation = self.shared.generation.load(Ordering::SeqCst);
            if retry == Retry::Never
                && (conn.generation != generation || conn.last_ok.elapsed() > IDLE_CHECK)
            {
                // Nothing is sent yet, so a failure here can always be retried.
                match redis::cmd("PING").query::<()>(&mut conn.con) {
                    Ok(()) => conn.generation = generation,
                    Err(e) if is_connection_failure(&e) => {
                        self.connection_failed(&mut conn);
                        if may_retry {
                            continue;
                        }
                        return Err(self.fail(e, doing));
                    }
                    Err(e) => return Err(self.fail(e, doing)),
                }
            }
            match f(&mut conn.con) {
                Ok(value) => {
                    conn.last_ok = Instant::now();
                    return Ok(value);
                }
                Err(e) if is_connection_failure(&e) => {
                    self.connection_failed(&mut conn);
                    if retry == Retry::Safe && may_retry {
                        continue;
                    }
                    let doing = if retry == Retry::Never {
                        format!("{doing} (the write may or may not have been applied)")
                    } else {
                        doing.to_owned()
                    };
                    return Err(self.fail(e, &doing));
                }
                Err(e) => return Err(self.fail(e, doing)),
            }
        }
    }

    fn connection_failed(&self, conn: &mut RedisConn) {
        conn.broken = true;
        self.shared.generation.fetch_add(1, Ordering::SeqCst);
    }

    fn unavailable(&self, message: fmt::Arguments<'_>) -> StorageError {
        StorageError::unavailable(BACKEND, format!("Redis at {}: {message}", self.address))
    }

    /// Maps a failure of `doing`.
    fn fail(&self, e: RedisError, doing: &str) -> StorageError {
        if is_connection_failure(&e) || is_server_unavailable(&e) {
            self.unavailable(format_args!("{doing}: {e}"))
        } else {
            StorageError::backend(
                BACKEND,
                format!("{doing} on Redis at {}: {e}", self.address),
            )
        }
    }

    /// Walks the record keys that start with `prefix` with `SCAN`, handing each page
    /// (de-duplicated raw Redis keys) to `page`.
    fn scan_records(
        &self,
        con: &mut redis::Connection,
        prefix: &str,
        mut page: impl FnMut(&mut redis::Connection, Vec<Vec<u8>>) -> redis::RedisResult<()>,
    ) -> redis::RedisResult<()> {
        let mut pattern = glob_escape(&self.keys.record_prefix);
        pattern.push_str(&glob_escape(prefix));
        pattern.push('*');
        let mut seen: HashSet<Vec<u8>> = HashSet::new();
        let mut cursor: u64 = 0;
        loop {
            let (next, keys): (u64, Vec<Vec<u8>>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(SCAN_COUNT)
                .arg("TYPE")
                .arg("string")
                .query(con)?;
            let fresh: Vec<Vec<u8>> = keys
                .into_iter()
                .filter(|k| seen.insert(k.clone()))
                .collect();
            if !fresh.is_empty() {
                page(con, fresh)?;
            }
            if next == 0 {
                return Ok(());
            }
            cursor = next;
        }
    }

    /// Sends a batch packed by [`pack_batch`](Self::pack_batch) and reads the script's answer
    /// (see [`WRITE_SCRIPT`]), loading the script first if the server does not know it (yet,
    /// or after a restart). `while_waiting` runs once the batch is sent, while Redis runs it.
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

    /// A batch of new records without expiry, each key once, as native commands in the Redis
    /// protocol (RESP): `MULTI`, one `MSETNX` of the batch token and every record, the
    /// [`COUNT_NEW_RECORDS_SCRIPT`], `EXEC`. Hand the buffer back with [`recycle`] once sent.
    fn pack_new_records(&self, entries: &[BatchEntry<'_>], summary: &BatchSummary) -> Vec<u8> {
        let prefix = self.keys.record_prefix.as_bytes();
        let mut buf = packing_buffer(summary.packed_size + 512);
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
        resp::array(&mut buf, 8);
        resp::bulk(&mut buf, &[b"EVAL"]);
        resp::bulk(&mut buf, &[COUNT_NEW_RECORDS_SCRIPT.as_bytes()]);
        resp::bulk(&mut buf, &[b"2"]);
        resp::bulk(&mut buf, &[self.keys.batch_token.as_bytes()]);
        resp::bulk(&mut buf, &[self.keys.usage.as_bytes()]);
        resp::int(&mut buf, summary.added_count as i64);
        resp::int(&mut buf, summary.added_bytes as i64);
        resp::bulk(&mut buf, &[&token]);
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

    /// Whether a batch of new records without expiry should be tried as an `MSETNX` (see
    /// [`write`](Backend::write)): yes unless one found a key taken in the last
    /// [`NEW_RECORDS_BACKOFF`] such batches.
    fn try_new_records(&self) -> bool {
        self.new_records_backoff
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
            .is_err()
    }

    /// The stored bytes of the record of `key`, if any.
    fn get_record(&self, key: &str) -> Result<Option<Vec<u8>>> {
        let rkey = self.keys.record(key);
        self.run("reading a record", Retry::Safe, |con| {
            let read = redis::cmd("GET").arg(&rkey).query(con);
            self.record_result(key, read)
        })?
    }

    /// The error for a record key that holds something else than a layout-2 record:
    /// `problem` 1 for a key of another Redis type, 2 for a string that is not a record.
    fn layout_error(&self, key: &str, problem: i64) -> StorageError {
        let rkey = self.keys.record(key);
        let what = if problem == 1 {
            "a value of another Redis type (such as the hash of key layout 1, which only \
             unreleased builds of bevy_storage wrote)"
        } else {
            "a string that is not a record of key layout 2"
        };
        StorageError::corrupt(
            key,
            format!(
                "the Redis key `{rkey}` on {} holds {what} instead of a record string of key \
                 layout {LAYOUT_VERSION}; it was neither read nor changed: remove it by hand \
                 (redis-cli DEL) to use this key again",
                self.address
            ),
        )
    }

    /// Maps a failure of a command on the record of `key`: a key of another type is a
    /// [`layout_error`](Self::layout_error).
    fn record_result<T>(
        &self,
        key: &str,
        result: redis::RedisResult<T>,
    ) -> redis::RedisResult<std::result::Result<T, StorageError>> {
        match result {
            Ok(v) => Ok(Ok(v)),
            Err(e) if is_wrong_type(&e) => Ok(Err(self.layout_error(key, 1))),
            Err(e) => Err(e),
        }
    }
}

/// The next answer on `con`, passing over push messages (which a RESP3 server may send at any
/// time).
fn recv_reply(con: &mut redis::Connection) -> redis::RedisResult<redis::Value> {
    loop {
        match con.recv_response()? {
            redis::Value::Push { .. } => continue,
            reply => return Ok(reply),
        }
    }
}

/// True when Redis refused a command for the type of the key it names.
/// For a transaction, when any of its commands was.
fn is_wrong_type(e: &RedisError) -> bool {
    e.code() == Some("WRONGTYPE")
        || e.detail().is_some_and(|d| d.contains("WRONGTYPE"))
        || e.clone()
            .into_server_errors()
            .is_some_and(|errors| errors.iter().any(|(_, error)| error.code() == "WRONGTYPE"))
}

/// The value of `field` in an `INFO` answer.
fn info_field<'a>(info: &'a str, field: &str) -> Option<&'a str> {
    info.lines().find_map(|line| {
        let (name, value) = line.split_once(':')?;
        (name == field).then(|| value.trim())
    })
}

/// Escapes the characters special to Redis's glob patterns so `s` matches literally.
fn glob_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 4);
    for c in s.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

fn validate_namespace(namespace: &str) -> Result<()> {
    let problem = if namespace.is_empty() {
        Some("it is empty")
    } else if namespace.len() > MAX_NAMESPACE_LEN {
        Some("it is longer than 256 bytes")
    } else if namespace.contains(['{', '}']) {
        Some("it contains `{` or `}`")
    } else if namespace.chars().any(char::is_control) {
        Some("it contains a control character")
    } else {
        None
    };
    match problem {
        Some(why) => Err(StorageError::Config(format!(
            "invalid Redis namespace {namespace:?}: {why}"
        ))),
        None => Ok(()),
    }
}

pub(crate) use crate::config::redact_url;

/// Splits a `?namespace=NAME` parameter off a Redis URL: the URL to connect to (other query
/// parameters kept) and the namespace ([`DEFAULT_NAMESPACE`] when absent).
pub(crate) fn split_namespace(url: &str) -> (String, String) {
    let (before_fragment, fragment) = match url.split_once('#') {
        Some((b, f)) => (b, Some(f)),
        None => (url, None),
    };
    let (base, query) = match before_fragment.split_once('?') {
        Some((b, q)) => (b, q),
        None => (before_fragment, ""),
    };
    let mut namespace = None;
    let kept: Vec<&str> = query
        .split('&')
        .filter(|pair| match pair.strip_prefix("namespace=") {
            Some(ns) => {
                namespace = Some(ns.to_owned());
                false
            }
            None => !pair.is_empty(),
        })
        .collect();
    let mut out = base.to_owned();
    if !kept.is_empty() {
        out.push('?');
        out.push_str(&kept.join("&"));
    }
    if let Some(f) = fragment {
        out.push('#');
        out.push_str(f);
    }
    (
        out,
        namespace.unwrap_or_else(|| DEFAULT_NAMESPACE.to_owned()),
    )
}

fn flags(meta: &RecordMeta) -> u8 {
    u8::from(meta.compressed) | (u8::from(meta.encrypted) << 1)
}

/// The little-endian `i64` at `at`; the caller checked the length.
fn le_i64(bytes: &[u8], at: usize) -> i64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&bytes[at..at + 8]);
    i64::from_le_bytes(b)
}

/// The little-endian `u32` at `at`; the caller checked the length.
fn le_u32(bytes: &[u8], at: usize) -> u32 {
    let mut b = [0u8; 4];
    b.copy_from_slice(&bytes[at..at + 4]);
    u32::from_le_bytes(b)
}

/// A record's header; see the module docs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Header {
    created_at: i64,
    /// `None`: never.
    expires_at: Option<i64>,
    size: u32,
    custom_len: u32,
    modified_at: i64,
    accessed_at: i64,
    flags: u8,
}

impl Header {
    /// Where the value starts.
    fn value_start(&self) -> usize {
        HEADER_LEN + self.custom_len as usize
    }

    /// The length of the whole record.
    fn record_len(&self) -> usize {
        self.value_start() + self.size as usize
    }

    /// Checks that a record of `len` bytes is as long as this header announces.
    fn check_len(&self, key: &str, len: usize) -> Result<()> {
        if len == self.record_len() {
            return Ok(());
        }
        Err(StorageError::corrupt(
            key,
            format!(
                "the Redis record is {len} bytes long but its header announces {} ({HEADER_LEN} \
                 of header, {} of custom metadata, {} of value)",
                self.record_len(),
                self.custom_len,
                self.size
            ),
        ))
    }

    /// Reads the header at the start of `bytes` (a record or its beginning).
    fn parse(key: &str, bytes: &[u8]) -> Result<Self> {
        if bytes.len() < HEADER_LEN {
            return Err(StorageError::corrupt(
                key,
                format!(
                    "the Redis record is {} bytes long, shorter than its {HEADER_LEN}-byte header",
                    bytes.len()
                ),
            ));
        }
        let version = bytes[HEADER_LEN - 1];
        if version != LAYOUT_VERSION {
            return Err(StorageError::corrupt(
                key,
                format!(
                    "the Redis record has key layout version {version}; this build reads version \
                     {LAYOUT_VERSION}"
                ),
            ));
        }
        let expires_at = le_i64(bytes, 8);
        Ok(Self {
            created_at: le_i64(bytes, 0),
            expires_at: (expires_at != 0).then_some(expires_at),
            size: le_u32(bytes, 16),
            custom_len: le_u32(bytes, 20),
            modified_at: le_i64(bytes, 24),
            accessed_at: le_i64(bytes, 32),
            flags: bytes[40],
        })
    }

    /// The metadata this header describes, with the custom metadata read from `custom`.
    fn meta(&self, key: &str, custom: &[u8]) -> Result<RecordMeta> {
        let custom = if custom.is_empty() {
            CustomMetadata::new()
        } else {
            serde_json::from_slice(custom).map_err(|e| {
                StorageError::corrupt(key, format!("custom metadata is not a JSON object: {e}"))
            })?
        };
        Ok(RecordMeta {
            created_at: Timestamp(self.created_at),
            modified_at: Timestamp(self.modified_at),
            accessed_at: Timestamp(self.accessed_at),
            expires_at: self.expires_at.map(Timestamp),
            size: u64::from(self.size),
            compressed: self.flags & 1 != 0,
            encrypted: self.flags & 2 != 0,
            custom,
        })
    }
}

/// Checks that `bytes` is a whole record: its header and exactly the lengths it announces.
fn parse_record(key: &str, bytes: &[u8]) -> Result<Header> {
    let header = Header::parse(key, bytes)?;
    header.check_len(key, bytes.len())?;
    Ok(header)
}

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

/// Batches of new records that take the write script after an `MSETNX` found a key taken,
/// before `MSETNX` is tried again: a store that keeps saving over existing keys pays for the
/// refused `MSETNX` once every this many batches.
const NEW_RECORDS_BACKOFF: u32 = 16;

/// Largest packing buffer kept for the next batch.
const KEPT_BUFFER: usize = 4 << 20;

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

/// A fast hasher (FxHash's word mixing, MurmurHash3's finalizer) for the check that no key
/// repeats in a batch: the keys come from this process, there is no flooding to fear.
#[derive(Default)]
struct KeyHasher(u64);

impl KeyHasher {
    fn add(&mut self, word: u64) {
        self.0 = (self.0.rotate_left(5) ^ word).wrapping_mul(0x517c_c1b7_2722_0a95);
    }
}

impl Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        // MurmurHash3's finalizer: every input bit reaches the bits the table uses.
        let mut h = self.0;
        h ^= h >> 33;
        h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
        h ^= h >> 33;
        h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
        h ^ (h >> 33)
    }

    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for chunk in &mut chunks {
            let mut word = [0u8; 8];
            word.copy_from_slice(chunk);
            self.add(u64::from_le_bytes(word));
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut word = [0u8; 8];
            word[..rest.len()].copy_from_slice(rest);
            self.add(u64::from_le_bytes(word));
        }
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
}

impl<'a> BatchEntry<'a> {
    fn new(op: &'a WriteOp) -> Result<Self> {
        let (key, record, mode) = match op {
            WriteOp::Delete { key } => {
                return Ok(Self {
                    key: key.as_bytes(),
                    kind: kind::DELETE,
                    put: None,
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
            },
            put: Some((record, custom)),
        })
    }

    /// The length of the encoded record (0 for a delete).
    fn record_len(&self) -> usize {
        match &self.put {
            None => 0,
            Some((record, custom)) => HEADER_LEN + custom.len() + record.value.len(),
        }
    }

    /// Appends the encoded record as one RESP argument (empty for a delete).
    fn pack_record(&self, buf: &mut Vec<u8>) {
        match &self.put {
            None => resp::bulk(buf, &[]),
            Some((record, custom)) => {
                let header = encode_header(&record.meta, record.value.len(), custom.len());
                resp::bulk(buf, &[&header, custom, &record.value]);
            }
        }
    }
}

/// What the packing of a batch needs to know about it as a whole.
struct BatchSummary {
    /// Each key appears once, which spares the write script following a key through the
    /// batch.
    distinct: bool,
    /// Every operation puts a record without expiry.
    puts_without_expiry: bool,
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
            puts_without_expiry: true,
            added_count: 0,
            added_bytes: 0,
            packed_size: 0,
        };
        for e in entries {
            match (&e.put, e.kind) {
                (Some((record, _)), kind::UPSERT | kind::CREATE) => {
                    summary.added_count += 1;
                    summary.added_bytes += record.value.len() as u64;
                }
                _ => summary.puts_without_expiry = false,
            }
            summary.packed_size += 2 * 16 + record_prefix.len() + e.key.len() + e.record_len();
        }
        summary
    }
}

/// The header of a record (see the module docs); the lengths were checked to fit.
fn encode_header(meta: &RecordMeta, size: usize, custom_len: usize) -> [u8; HEADER_LEN] {
    // 0 means "never": an expiry at the epoch (long past for any real clock) is written as -1.
    let expires_at = match meta.expires_at {
        None => 0,
        Some(Timestamp(0)) => -1,
        Some(Timestamp(t)) => t,
    };
    let mut h = [0u8; HEADER_LEN];
    h[0..8].copy_from_slice(&meta.created_at.0.to_le_bytes());
    h[8..16].copy_from_slice(&expires_at.to_le_bytes());
    h[16..20].copy_from_slice(&(size as u32).to_le_bytes());
    h[20..24].copy_from_slice(&(custom_len as u32).to_le_bytes());
    h[24..32].copy_from_slice(&meta.modified_at.0.to_le_bytes());
    h[32..40].copy_from_slice(&meta.accessed_at.0.to_le_bytes());
    h[40] = flags(meta);
    h[41] = LAYOUT_VERSION;
    h
}

/// Writing commands in the Redis protocol (RESP): an array of bulk strings.
mod resp {
    /// Appends the decimal digits of `n`.
    fn decimal(buf: &mut Vec<u8>, n: u64) {
        let mut digits = [0u8; 20];
        let mut at = digits.len();
        let mut n = n;
        loop {
            at -= 1;
            digits[at] = b'0' + (n % 10) as u8;
            n /= 10;
            if n == 0 {
                break;
            }
        }
        buf.extend_from_slice(&digits[at..]);
    }

    /// The start of a command of `len` arguments.
    pub fn array(buf: &mut Vec<u8>, len: usize) {
        buf.push(b'*');
        decimal(buf, len as u64);
        buf.extend_from_slice(b"\r\n");
    }

    /// One argument, the concatenation of `parts`.
    pub fn bulk(buf: &mut Vec<u8>, parts: &[&[u8]]) {
        buf.push(b'$');
        decimal(buf, parts.iter().map(|p| p.len() as u64).sum());
        buf.extend_from_slice(b"\r\n");
        for p in parts {
            buf.extend_from_slice(p);
        }
        buf.extend_from_slice(b"\r\n");
    }

    /// One argument, an integer in decimal.
    pub fn int(buf: &mut Vec<u8>, n: i64) {
        let mut text = Vec::with_capacity(20);
        if n < 0 {
            text.push(b'-');
        }
        decimal(&mut text, n.unsigned_abs());
        bulk(buf, &[&text]);
    }
}

impl Backend for RedisBackend {
    fn backend_type(&self) -> &str {
        BACKEND
    }

    fn get(&self, key: &str) -> Result<Option<Record>> {
        let Some(mut bytes) = self.get_record(key)? else {
            return Ok(None);
        };
        let header = parse_record(key, &bytes)?;
        let meta = header.meta(key, &bytes[HEADER_LEN..header.value_start()])?;
        bytes.drain(..header.value_start());
        Ok(Some(Record { value: bytes, meta }))
    }

    fn get_value(&self, key: &str) -> Result<Option<(Vec<u8>, Option<Timestamp>)>> {
        let Some(mut bytes) = self.get_record(key)? else {
            return Ok(None);
        };
        let header = parse_record(key, &bytes)?;
        bytes.drain(..header.value_start());
        Ok(Some((bytes, header.expires_at.map(Timestamp))))
    }

    fn get_meta(&self, key: &str) -> Result<Option<RecordMeta>> {
        let rkey = self.keys.record(key);
        // The header and, most of the time, all of the custom metadata in one read, with the
        // record's length and whether it exists at all (an empty string is no record), in one
        // MULTI/EXEC so that all three describe the same version of the record: the length
        // is checked against the value the header announces, as a load would.
        // Should the metadata be longer, read again up to its end; past a few attempts (the
        // record keeps being rewritten longer), read the whole record at once.
        let mut want = HEADER_LEN + CUSTOM_READ_AHEAD;
        for _ in 0..3 {
            let (bytes, len, exists): (Vec<u8>, usize, bool) =
                self.run("reading record metadata", Retry::Safe, |con| {
                    let read = redis::pipe()
                        .atomic()
                        .cmd("GETRANGE")
                        .arg(&rkey)
                        .arg(0)
                        .arg(want - 1)
                        .cmd("STRLEN")
                        .arg(&rkey)
                        .cmd("EXISTS")
                        .arg(&rkey)
                        .query(con);
                    self.record_result(key, read)
                })??;
            if !exists {
                return Ok(None);
            }
            let header = Header::parse(key, &bytes)?;
            header.check_len(key, len)?;
            let end = header.value_start();
            if bytes.len() >= end {
                return header.meta(key, &bytes[HEADER_LEN..end]).map(Some);
            }
            want = end;
        }
        Ok(self.get(key)?.map(|r| r.meta))
    }

    fn write(&self, ops: Vec<WriteOp>, now: Timestamp) -> Result<Vec<WriteOutcome>> {
        if ops.is_empty() {
            return Ok(Vec::new());
        }
        let entries = ops
            .iter()
            .map(BatchEntry::new)
            .collect::<Result<Vec<_>>>()?;
        let summary = BatchSummary::of(&entries, &self.keys.record_prefix);
        let doing = format!("writing a batch of {} operation(s)", ops.len());
        // New records without expiry, each key once (saving new things): native commands,
        // which Redis runs about twice as fast as the script; see the module docs.
        if summary.distinct && summary.puts_without_expiry && self.try_new_records() {
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
            _ => Err(unexpected()),
        }
    }

    fn touch(&self, key: &str, at: Timestamp) -> Result<()> {
        let rkey = self.keys.record(key);
        self.run("updating an access time", Retry::Safe, |con| {
            let touched = self
                .scripts
                .touch
                .key(&rkey)
                .arg(&at.0.to_le_bytes()[..])
                .invoke::<()>(con);
            self.record_result(key, touched)
        })?
    }

    fn scan(&self, prefix: &str) -> Result<Vec<KeyEntry>> {
        let skip = self.keys.record_prefix.len();
        self.run("listing keys", Retry::Safe, |con| {
            let mut entries = Vec::new();
            self.scan_records(con, prefix, |con, raw_keys| {
                let mut pipe = redis::pipe();
                for raw in &raw_keys {
                    pipe.cmd("GETRANGE").arg(raw).arg(0).arg(HEADER_LEN - 1);
                }
                let headers: Vec<Vec<u8>> = pipe.query(con)?;
                for (raw, header) in raw_keys.into_iter().zip(headers) {
                    let Ok(key) = String::from_utf8(raw[skip..].to_vec()) else {
                        continue;
                    };
                    // Gone since SCAN saw it (or not a record): skip.
                    let Ok(header) = Header::parse(&key, &header) else {
                        continue;
                    };
                    entries.push(KeyEntry {
                        key,
                        size: u64::from(header.size),
                        expires_at: header.expires_at.map(Timestamp),
                    });
                }
                Ok(())
            })?;
            Ok(entries)
        })
    }

    fn purge_expired(&self, now: Timestamp) -> Result<usize> {
        self.run("removing expired records", Retry::Safe, |con| {
            let mut removed = 0usize;
            loop {
                let (gone, examined): (usize, usize) = self
                    .scripts
                    .purge
                    .key(&self.keys.usage)
                    .key(&self.keys.expiry)
                    .arg(now.0)
                    .arg(&self.keys.record_prefix)
                    .arg(SCRIPT_PAGE)
                    .invoke(con)?;
                removed += gone;
                if examined < SCRIPT_PAGE {
                    return Ok(removed);
                }
            }
        })
    }

    fn clear(&self) -> Result<()> {
        let skip = self.keys.record_prefix.len();
        self.run("removing every record", Retry::Safe, |con| {
            // Each page is deleted by the write script, so the bookkeeping stays exact even
            // while another store writes to the same namespace. A key that is not a record
            // makes the script refuse its page: it is left alone and the rest deleted again.
            self.scan_records(con, "", |con, mut raw_keys| {
                while !raw_keys.is_empty() {
                    let entries: Vec<BatchEntry<'_>> = raw_keys
                        .iter()
                        .map(|raw| BatchEntry {
                            key: &raw[skip.min(raw.len())..],
                            kind: kind::DELETE,
                            put: None,
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
            })?;
            // Then forget the records Redis expired by itself.
            let mut offset = 0usize;
            loop {
                let (examined, removed): (usize, usize) = self
                    .scripts
                    .trim
                    .key(&self.keys.usage)
                    .key(&self.keys.expiry)
                    .arg(&self.keys.record_prefix)
                    .arg(offset)
                    .arg(SCRIPT_PAGE)
                    .invoke(con)?;
                if examined < SCRIPT_PAGE {
                    return Ok(());
                }
                offset += examined - removed;
            }
        })
    }

    fn usage(&self, now: Timestamp) -> Result<Usage> {
        self.run("computing usage", Retry::Safe, |con| {
            let mut usage = Usage::default();
            let mut offset = 0usize;
            loop {
                let (count, bytes, examined): (u64, u64, usize) = self
                    .scripts
                    .usage
                    .key(&self.keys.usage)
                    .key(&self.keys.expiry)
                    .arg(now.0)
                    .arg(&self.keys.record_prefix)
                    .arg(offset)
                    .arg(SCRIPT_PAGE)
                    .invoke(con)?;
                usage.item_count += count;
                usage.total_size += bytes;
                if examined < SCRIPT_PAGE {
                    return Ok(usage);
                }
                offset += examined;
            }
        })
    }

    fn available_space(&self) -> Option<u64> {
        let info: String = self
            .run("reading memory use", Retry::Safe, |con| {
                redis::cmd("INFO").arg("memory").query(con)
            })
            .ok()?;
        let field = |name| info_field(&info, name)?.parse::<u64>().ok();
        match field("maxmemory")? {
            0 => None,
            max => Some(max.saturating_sub(field("used_memory")?)),
        }
    }

    fn health_check(&self) -> Result<()> {
        self.run("checking the connection", Retry::Safe, |con| {
            redis::cmd("PING").query::<()>(con)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn glob_characters_are_escaped() {
        assert_eq!(glob_escape("a*b?c[d]e\\f"), "a\\*b\\?c\\[d\\]e\\\\f");
        assert_eq!(glob_escape("plain:é:名"), "plain:é:名");
    }

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            redact_url("redis://:hunter2@host:6379/1"),
            "redis://:***@host:6379/1"
        );
        assert_eq!(
            redact_url("rediss://alice:p@ss:w@rd@host/0?protocol=resp3"),
            "rediss://alice:***@host/0?protocol=resp3"
        );
        assert_eq!(redact_url("redis://host:6379"), "redis://host:6379");
        assert_eq!(redact_url("redis://alice@host"), "redis://***@host");
    }

    #[test]
    fn namespace_parameter_is_split_off() {
        assert_eq!(
            split_namespace("redis://h:1/2?namespace=game:eu"),
            ("redis://h:1/2".to_owned(), "game:eu".to_owned())
        );
        assert_eq!(
            split_namespace("redis://h/?protocol=resp3&namespace=g#insecure"),
            (
                "redis://h/?protocol=resp3#insecure".to_owned(),
                "g".to_owned()
            )
        );
        assert_eq!(
            split_namespace("redis://h"),
            ("redis://h".to_owned(), DEFAULT_NAMESPACE.to_owned())
        );
    }

    #[test]
    fn namespaces_are_validated() {
        for bad in ["", "a{b", "a}b", "a\nb", &"x".repeat(257)] {
            assert!(
                matches!(validate_namespace(bad), Err(StorageError::Config(_))),
                "{bad:?}"
            );
        }
        for good in ["game", "game:eu", "test:1234:", "名前", "a*b?[c]"] {
            validate_namespace(good).unwrap();
        }
    }

    #[test]
    fn keys_of_different_namespaces_never_overlap() {
        let a = Keys::new("game");
        let b = Keys::new("game:r");
        assert!(!b.record("x").starts_with(&a.record_prefix));
        assert!(!a.record("r:x").starts_with(&b.record_prefix));
        assert_ne!(a.record("r:x"), b.record("x"));
    }

    fn sample_meta() -> RecordMeta {
        let mut custom = CustomMetadata::new();
        custom.insert("level".into(), "cave".into());
        RecordMeta {
            created_at: Timestamp(1_700_000_000_123),
            modified_at: Timestamp(1_700_000_000_456),
            accessed_at: Timestamp(1_700_000_000_789),
            expires_at: Some(Timestamp(1_800_000_000_000)),
            size: 5,
            compressed: true,
            encrypted: false,
            custom,
        }
    }

    /// A record as the write script stores it.
    fn stored(meta: &RecordMeta, value: &[u8]) -> Vec<u8> {
        let custom = if meta.custom.is_empty() {
            Vec::new()
        } else {
            serde_json::to_vec(&meta.custom).unwrap()
        };
        let mut bytes = encode_header(meta, value.len(), custom.len()).to_vec();
        bytes.extend_from_slice(&custom);
        bytes.extend_from_slice(value);
        bytes
    }

    #[test]
    fn records_round_trip_through_the_layout() {
        let mut meta = sample_meta();
        for expires_at in [Some(Timestamp(1_800_000_000_000)), None] {
            meta.expires_at = expires_at;
            let bytes = stored(&meta, b"value");
            assert_eq!(bytes[HEADER_LEN - 1], LAYOUT_VERSION);
            let header = parse_record("k", &bytes).unwrap();
            let custom = &bytes[HEADER_LEN..header.value_start()];
            assert_eq!(header.meta("k", custom).unwrap(), meta);
            assert_eq!(&bytes[header.value_start()..], b"value");
        }
        // Without custom metadata nothing sits between the header and the value.
        meta.custom.clear();
        meta.encrypted = true;
        let bytes = stored(&meta, b"v");
        assert_eq!(bytes.len(), HEADER_LEN + 1);
        let header = parse_record("k", &bytes).unwrap();
        assert_eq!(
            header.meta("k", &[]).unwrap(),
            RecordMeta {
                size: 1,
                ..meta.clone()
            }
        );
        // An expiry at the epoch stays an expiry (long past), never "never".
        meta.expires_at = Some(Timestamp(0));
        let header = Header::parse("k", &stored(&meta, b"v")).unwrap();
        assert_eq!(header.expires_at, Some(-1));
    }

    #[test]
    fn damaged_records_are_corrupt_errors() {
        let meta = sample_meta();
        let good = stored(&meta, b"value");
        let mut wrong_version = good.clone();
        wrong_version[HEADER_LEN - 1] = 1;
        let mut bad_json = good.clone();
        bad_json[HEADER_LEN] = b'[';
        for (bytes, why) in [
            (&b"short"[..], "shorter than its"),
            (&wrong_version[..], "layout version 1"),
            (&good[..good.len() - 1], "header announces"),
            (&[&good[..], b"x"].concat()[..], "header announces"),
        ] {
            match parse_record("k", bytes) {
                Err(StorageError::Corrupt { key, reason }) => {
                    assert_eq!(key, "k");
                    assert!(reason.contains(why), "{reason}");
                }
                other => panic!("{why}: {other:?}"),
            }
        }
        let header = parse_record("k", &bad_json).unwrap();
        let err = header
            .meta("k", &bad_json[HEADER_LEN..header.value_start()])
            .unwrap_err();
        assert!(matches!(err, StorageError::Corrupt { .. }), "{err}");
    }

    #[test]
    fn commands_are_packed_in_resp() {
        let mut buf = Vec::new();
        resp::array(&mut buf, 3);
        resp::bulk(&mut buf, &[b"SET"]);
        resp::bulk(&mut buf, &[b"ke", b"y", b""]);
        resp::int(&mut buf, -1_700_000_000_123);
        resp::bulk(&mut buf, &[]);
        resp::int(&mut buf, 0);
        assert_eq!(
            buf,
            b"*3\r\n$3\r\nSET\r\n$3\r\nkey\r\n$14\r\n-1700000000123\r\n$0\r\n\r\n$1\r\n0\r\n"
        );
    }

    #[test]
    fn info_fields_are_found() {
        let info = "# Memory\r\nused_memory:1024\r\nmaxmemory:4096\r\n";
        assert_eq!(info_field(info, "maxmemory"), Some("4096"));
        assert_eq!(info_field(info, "used_memory"), Some("1024"));
        assert_eq!(info_field(info, "absent"), None);
    }
}
