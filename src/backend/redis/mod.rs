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
//! | `{NS}:r:<key>` | string | one record: a 42-byte header, the custom metadata, the value bytes |
//! | `{NS}:usage` | hash | `n` and `b`: count and bytes of the records *without* expiry |
//! | `{NS}:expiry` | sorted set | the keys of the records *with* an expiry, scored by `expires_at` |
//! | `{NS}:batch` | string | the batch token of a transaction of new records; set and removed inside it, so never seen between commands |
//!
//! The value and its metadata are written, read and expire together: a record with an expiry
//! is given it with `PEXPIREAT expires_at` in the same script that writes it (a batch is
//! one script, see `batch.rs`), and Redis removes it by itself at that
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
//! The byte layout of a record is described in `redis/record.rs`.
//!
//! # Atomicity
//!
//! A batch ([`write`](Backend::write)) is **one round trip**, and Redis runs it with nothing
//! else in between: new records (with or without an expiry), each key once (the common case
//! of saving new things), as one `MULTI`/`EXEC` of native commands; every other batch as one Lua script that
//! reads every record the batch replaces before it writes anything. So a refused batch (a
//! create-only put over a live record, a key that is not a record) changes nothing, and other
//! clients never see half a batch; no `WATCH`, no retry loop. The scripts carry a `#!lua`
//! shebang, so Redis refuses them *before* they start when it is out of memory (`maxmemory`),
//! rather than half-way. How and why, with measurements: `redis/batch.rs`.
//! [`delete_if_unchanged`](Backend::delete_if_unchanged) (what `Store::take` removes with) is
//! one Lua script too: it compares the stored value and expiry with what was read and removes
//! the record and its share of the counters in the same step.
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
//! read and write of its socket. When Redis is down or hung (stopped, swapping, blocked by a
//! long script) **every operation** fails within `connect_timeout + response_timeout` (3 s
//! by default): the bound is one deadline for the whole operation, and each read and write of
//! the socket is given only what is left of it, however many connections the operation tries
//! (before, a `PING` check plus a retry on a second connection could each take the whole
//! response timeout: 6 s under `SIGSTOP`). Reads fail with [`StorageError::Unavailable`],
//! and immediately while the pool's reconnection attempts keep failing. The pool reconnects
//! in the background, so the store recovers by itself within about half a `connect_timeout`
//! of Redis coming back; connections that were open before an outage are checked with `PING`
//! before a write is sent on them, so a restart does not make writes fail once more per
//! pooled connection. Reads are retried on another connection after a connection failure
//! (within the same deadline). A write whose connection fails or times out *after* it was
//! sent is not retried: it fails with [`StorageError::OutcomeUnknown`], since it may or may
//! not have been applied (a hung server runs it when it wakes up); batches are atomic, so
//! reading back one key of the batch tells whether all of it was applied.
//!
//! Operations of several round trips (a listing: `SCAN` pages and a pipeline of header reads
//! per page; a purge and usage: a script per page) give each round trip only what
//! is left of the one deadline, and keep pipelines small enough that the kernel's rounding of
//! socket timeouts cannot stretch them past it: a server that stops in the middle of a
//! 200,000-key listing fails it at 3.0 s (`tests/durability.rs`; it ran for over 3 minutes
//! before, one response timeout per reply of a 1,000-reply pipeline). [`clear`](Backend::clear)
//! is the exception: each of its pages (a `SCAN` reply and the deletion of its records, then
//! a page of the expiry index) is an operation with a bound of its own, so a hung server
//! still fails it within 3 s, but a large store may take longer than that to clear (200,000
//! records did on a loaded host).
//!
//! A server out of memory (`maxmemory`, `OOM command not allowed`) fails a write with
//! [`StorageError::StorageFull`]: its memory is the store's medium, and the batch was
//! refused whole before it ran.
//!
//! Batches larger than [`MAX_BATCH_OPERATIONS`] operations or [`MAX_BATCH_BYTES`] are
//! refused with [`StorageError::InvalidTransaction`], before anything is sent: one script
//! blocks the whole server while it runs, and splitting a batch would break its
//! all-or-nothing promise.

//! # Time
//!
//! Liveness is judged by the store's clock (`now`), expiry by Redis's: a record disappears when
//! the *Redis server's* clock reaches its `expires_at`, and a record written with an
//! `expires_at` already past by that clock is not stored at all. Keep the game servers' clocks
//! in sync (NTP) with Redis's. Configure the server with `maxmemory-policy noeviction` (the
//! default): an evicting policy would silently delete records.
//!
//! # Where the code is
//!
//! | file | holds |
//! |---|---|
//! | `redis/mod.rs` | [`RedisBackend`], [`RedisOptions`], listing, the [`Backend`] impl |
//! | `redis/record.rs` | the record string (its byte table), the Redis keys of a namespace |
//! | `redis/batch.rs` | batches: the transaction of new records, the write script's call |
//! | `redis/scripts.rs` | the Lua scripts of `redis/scripts/*.lua`, built with `header.lua` |
//! | `redis/connection.rs` | the connection pool, retries and failures |
//! | `redis/resp.rs` | the RESP encoder that packs batches |
//! | `redis/hasher.rs` | the hasher of the check that no key repeats in a batch |

mod batch;
pub use batch::{MAX_BATCH_BYTES, MAX_BATCH_OPERATIONS};
mod connection;
mod hasher;
mod record;
mod resp;
mod scripts;

use std::collections::{BTreeSet, HashSet};
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::AtomicU32;

use r2d2::Pool;

use super::{Backend, KeyEntry, Record, RecordMeta, Usage, WriteOp, WriteOutcome};
use crate::clock::Timestamp;
use crate::error::{Result, StorageError};
use connection::{Manager, Retry, Shared, is_wrong_type};
use record::{HEADER_LEN, Header, Keys, LAYOUT_VERSION, parse_record};
use scripts::Scripts;

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

/// Bytes of custom metadata [`get_meta`](Backend::get_meta) reads along with the header, so
/// that most records need a single `GETRANGE`.
const CUSTOM_READ_AHEAD: usize = 214;

/// Tuning of the Redis backend: the pool and time bounds every server backend shares.
pub type RedisOptions = super::ServerOptions;

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
    /// tried again; set when `MSETNX` found a key taken (see `batch.rs`).
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
        let (pool, shared) = connection::pool(client, options);
        let backend = Self {
            pool,
            shared,
            address,
            namespace: namespace.to_owned(),
            keys: Keys::new(namespace),
            scripts: Scripts::new(),
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

    /// Walks the record keys that start with `prefix` with `SCAN`, handing each page
    /// (de-duplicated raw Redis keys) to `page`. The de-duplication holds every key seen, so
    /// this is for callers that collect every key anyway; [`Self::scan_raw_keys`] holds none.
    fn scan_records(
        &self,
        con: &mut redis::Connection,
        prefix: &str,
        mut page: impl FnMut(&mut redis::Connection, Vec<Vec<u8>>) -> redis::RedisResult<()>,
    ) -> redis::RedisResult<()> {
        let mut seen: HashSet<Vec<u8>> = HashSet::new();
        self.scan_raw_keys(con, prefix, |con, keys| {
            let fresh: Vec<Vec<u8>> = keys
                .into_iter()
                .filter(|k| seen.insert(k.clone()))
                .collect();
            if fresh.is_empty() {
                Ok(())
            } else {
                page(con, fresh)
            }
        })
    }

    /// One pass of `SCAN` over the record keys that start with `prefix`, handing each reply's
    /// raw Redis keys to `page` as they come: a key may come twice (`SCAN` promises every key
    /// that exists for the whole pass at least once), and nothing is kept between replies.
    fn scan_raw_keys(
        &self,
        con: &mut redis::Connection,
        prefix: &str,
        mut page: impl FnMut(&mut redis::Connection, Vec<Vec<u8>>) -> redis::RedisResult<()>,
    ) -> redis::RedisResult<()> {
        let pattern = self.record_pattern(prefix);
        let mut cursor: u64 = 0;
        loop {
            let (next, keys) = self.scan_step(con, &pattern, cursor)?;
            if !keys.is_empty() {
                page(con, keys)?;
            }
            if next == 0 {
                return Ok(());
            }
            cursor = next;
        }
    }

    /// The `SCAN` pattern of the record keys that start with `prefix`.
    fn record_pattern(&self, prefix: &str) -> String {
        let mut pattern = glob_escape(&self.keys.record_prefix);
        pattern.push_str(&glob_escape(prefix));
        pattern.push('*');
        pattern
    }

    /// One `SCAN` reply from `cursor` over the keys matching `pattern` (see
    /// [`record_pattern`](Self::record_pattern)): the next cursor (0 at the end) and the raw
    /// keys, which may repeat keys of earlier replies.
    fn scan_step(
        &self,
        con: &mut redis::Connection,
        pattern: &str,
        cursor: u64,
    ) -> redis::RedisResult<(u64, Vec<Vec<u8>>)> {
        connection::rebound(con, 1)?;
        redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(pattern)
            .arg("COUNT")
            .arg(SCAN_COUNT)
            .arg("TYPE")
            .arg("string")
            .query(con)
    }

    /// The headers of the records at `raw_keys` (raw Redis keys of this store), as entries;
    /// keys gone since they were listed, or holding something else than a record, are left
    /// out. Reads in pipelines small enough that each reply gets a share of the time left
    /// well above the kernel's timer granularity (see `connection::pipeline_chunk`): a server
    /// that stops mid-listing cannot make the reads outlast the operation's deadline.
    fn read_entries(
        &self,
        con: &mut redis::Connection,
        raw_keys: &[Vec<u8>],
        entries: &mut Vec<KeyEntry>,
    ) -> redis::RedisResult<()> {
        let skip = self.keys.record_prefix.len();
        let mut rest = raw_keys;
        while !rest.is_empty() {
            let (chunk, tail) = rest.split_at(connection::pipeline_chunk().min(rest.len()));
            rest = tail;
            let mut pipe = redis::pipe();
            for raw in chunk {
                pipe.cmd("GETRANGE").arg(raw).arg(0).arg(HEADER_LEN - 1);
            }
            connection::rebound(con, chunk.len())?;
            let headers: Vec<Vec<u8>> = pipe.query(con)?;
            for (raw, header) in chunk.iter().zip(headers) {
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
        }
        Ok(())
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
            "a string that is not a record of key layout 2 or 3"
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

impl Backend for RedisBackend {
    fn backend_type(&self) -> &str {
        BACKEND
    }

    fn get(&self, key: &str) -> Result<Option<Record>> {
        let Some(mut bytes) = self.get_record(key)? else {
            return Ok(None);
        };
        let header = parse_record(key, &bytes)?;
        let meta = header.meta(key, header.custom(&bytes))?;
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
                // MULTI, three commands, EXEC: five replies.
                self.run_replies("reading record metadata", Retry::Safe, 5, |con| {
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
                return header.meta(key, header.custom(&bytes)).map(Some);
            }
            want = end;
        }
        Ok(self.get(key)?.map(|r| r.meta))
    }

    fn write(&self, ops: Vec<WriteOp>, now: Timestamp) -> Result<Vec<WriteOutcome>> {
        // One round trip: a transaction of new records or the write script (see `batch.rs`).
        self.write_batch(ops, now)
    }

    fn delete_if_unchanged(
        &self,
        key: &str,
        value: &[u8],
        expires_at: Option<Timestamp>,
    ) -> Result<bool> {
        let rkey = self.keys.record(key);
        // Never resent: a removal that was applied but not acknowledged, sent again, would
        // answer "changed" and the taken value would reach no one.
        let answer: i64 = self.run("taking a record", Retry::Never, |con| {
            self.scripts
                .delete_if_unchanged
                .key(&self.keys.usage)
                .key(&self.keys.expiry)
                .key(&rkey)
                .arg(expires_at.map_or(0, |t| t.0))
                .arg(value)
                .arg(&self.keys.record_prefix)
                .invoke(con)
        })?;
        match answer {
            1 => Ok(true),
            0 => Ok(false),
            problem => Err(self.layout_error(key, -problem)),
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
        self.run("listing keys", Retry::Safe, |con| {
            let mut entries = Vec::new();
            self.scan_records(con, prefix, |con, raw_keys| {
                self.read_entries(con, &raw_keys, &mut entries)
            })?;
            Ok(entries)
        })
    }

    /// Redis keeps no order of keys, so each page is one pass of `SCAN` over the database
    /// that keeps only the `limit` smallest keys after `after` (a bounded set, never the
    /// whole listing), then reads their headers: memory stays bounded by `limit`, and the
    /// time of a page grows with the number of keys in the database. A key `SCAN` returns
    /// twice is kept once; a key that exists for the whole pass is seen (`SCAN`'s promise),
    /// so a page never skips a key that lives through the listing.
    fn scan_page(&self, prefix: &str, after: Option<&str>, limit: usize) -> Result<Vec<KeyEntry>> {
        let skip = self.keys.record_prefix.len();
        self.run("listing a page of keys", Retry::Safe, |con| {
            let mut entries = Vec::with_capacity(limit.min(SCAN_COUNT));
            let mut cursor: Option<Vec<u8>> = after.map(|a| a.as_bytes().to_vec());
            while entries.len() < limit {
                let want = limit - entries.len();
                let mut smallest: BTreeSet<Vec<u8>> = BTreeSet::new();
                self.scan_raw_keys(con, prefix, |_, raw_keys| {
                    for raw in raw_keys {
                        let key = &raw[skip..];
                        if cursor.as_deref().is_some_and(|c| key <= c) {
                            continue;
                        }
                        if smallest.len() == want {
                            match smallest.last() {
                                Some(largest) if raw < *largest => {}
                                _ => continue,
                            }
                            smallest.pop_last();
                        }
                        smallest.insert(raw);
                    }
                    Ok(())
                })?;
                let exhausted = smallest.len() < want;
                let chosen: Vec<Vec<u8>> = smallest.into_iter().collect();
                self.read_entries(con, &chosen, &mut entries)?;
                if exhausted {
                    break;
                }
                // Keys deleted between the pass and the header reads left the page short:
                // go on after the last key chosen.
                cursor = chosen.last().map(|raw| raw[skip..].to_vec());
            }
            Ok(entries)
        })
    }

    fn purge_expired(&self, now: Timestamp) -> Result<usize> {
        self.run("removing expired records", Retry::Safe, |con| {
            let mut removed = 0usize;
            loop {
                connection::rebound(con, 1)?;
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

    /// Page by page, each page one operation with the time bound of its own (a `SCAN` reply
    /// and the deletion of its records, then a page of the expiry index): a hung server
    /// fails the clear within the bound, while clearing a large store may take longer than
    /// it in all (200,000 records on a loaded host did).
    fn clear(&self) -> Result<()> {
        let pattern = self.record_pattern("");
        let mut cursor: u64 = 0;
        loop {
            cursor = self.run("removing every record", Retry::Safe, |con| {
                // Each page is deleted by the write script, so the bookkeeping stays exact
                // even while another store writes to the same namespace. A key that is not a
                // record makes the script refuse its page: it is left alone and the rest
                // deleted again. A key `SCAN` repeats is only deleted again, which is nothing.
                let (next, raw_keys) = self.scan_step(con, &pattern, cursor)?;
                if !raw_keys.is_empty() {
                    connection::rebound(con, 1)?;
                    self.delete_records(con, raw_keys)?;
                }
                Ok(next)
            })?;
            if cursor == 0 {
                break;
            }
        }
        // Then forget the records Redis expired by itself.
        let mut offset = 0usize;
        loop {
            let (examined, removed): (usize, usize) =
                self.run("forgetting expired records", Retry::Safe, |con| {
                    self.scripts
                        .trim
                        .key(&self.keys.usage)
                        .key(&self.keys.expiry)
                        .arg(&self.keys.record_prefix)
                        .arg(offset)
                        .arg(SCRIPT_PAGE)
                        .invoke(con)
                })?;
            if examined < SCRIPT_PAGE {
                return Ok(());
            }
            offset += examined - removed;
        }
    }

    fn usage(&self, now: Timestamp) -> Result<Usage> {
        self.run("computing usage", Retry::Safe, |con| {
            let mut usage = Usage::default();
            let mut offset = 0usize;
            loop {
                connection::rebound(con, 1)?;
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
            crate::config::split_namespace("redis://h:1/2?namespace=game:eu", DEFAULT_NAMESPACE),
            ("redis://h:1/2".to_owned(), "game:eu".to_owned())
        );
        assert_eq!(
            crate::config::split_namespace(
                "redis://h/?protocol=resp3&namespace=g#insecure",
                DEFAULT_NAMESPACE
            ),
            (
                "redis://h/?protocol=resp3#insecure".to_owned(),
                "g".to_owned()
            )
        );
        assert_eq!(
            crate::config::split_namespace("redis://h", DEFAULT_NAMESPACE),
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
    fn info_fields_are_found() {
        let info = "# Memory\r\nused_memory:1024\r\nmaxmemory:4096\r\n";
        assert_eq!(info_field(info, "maxmemory"), Some("4096"));
        assert_eq!(info_field(info, "used_memory"), Some("1024"));
        assert_eq!(info_field(info, "absent"), None);
    }
}
