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
//! # Key layout (version 1)
//!
//! Every key of a store lives under its namespace `NS`, written `{NS}` so that no namespace can
//! be a prefix of another's keys (`game` and `game:eu` stay apart) and so that a Redis Cluster
//! would keep a namespace in one slot:
//!
//! | Redis key | type | holds |
//! |---|---|---|
//! | `{NS}:r:<key>` | hash | one record: `v` value bytes, `s` size, `c` created_at, `m` modified_at, `a` accessed_at, `x` expires_at (absent: never), `f` flags (1 compressed, 2 encrypted), `u` custom metadata as JSON (absent when empty); timestamps in ms since the epoch |
//! | `{NS}:usage` | hash | `n` and `b`: count and bytes of the records *without* expiry |
//! | `{NS}:expiry` | sorted set | the keys of the records *with* an expiry, scored by `expires_at` |
//! | `{NS}:expiry-size` | hash | key → size of those records |
//!
//! A record is one hash, so its value and metadata are written, read and expire together: a
//! record with `expires_at` gets `PEXPIREAT expires_at` and Redis removes it by itself at that
//! millisecond, whether or not anyone runs [`purge_expired`](Backend::purge_expired). An empty
//! store leaves no key at all behind.
//!
//! The three bookkeeping keys make [`usage`](Backend::usage) cheap: the counters plus one walk
//! over the live records that have an expiry (in pages), instead of a `SCAN` of the whole
//! database. Every change goes through the scripts below, which keep them exact; a record that
//! Redis expired leaves a stale entry in `{NS}:expiry`, which is ignored (its record is gone)
//! and trimmed by the next writes, `purge_expired` and `clear`.
//!
//! # Atomicity: Lua scripts instead of `WATCH`/`MULTI`/`EXEC`
//!
//! A batch ([`write`](Backend::write)) is one Lua script (`EVALSHA`, loaded again by itself
//! after a server restart), so it is **one round trip** like a `MULTI`/`EXEC`, and Redis runs
//! it with nothing else in between, like a transaction. The script first checks every
//! create-only put against the state it will see (a live record, judged at `now`, refuses the
//! whole batch) and only then writes, so a refused batch changes nothing, and other clients
//! never see half a batch. Keeping a live record's `created_at`, reporting the previous size
//! and the create-only check are read-modify-writes, which with `MULTI`/`EXEC` would need
//! `WATCH` on a dedicated connection and a bounded number of retries; inside one script they
//! need no retry at all: there is no window between the read and the write in which another
//! client could change the record, so no conflict to detect, no retry loop to bound and no
//! dedicated connection to hold. The
//! scripts carry a `#!lua` shebang, so Redis refuses them *before* they start when it is out
//! of memory (`maxmemory`), rather than half-way.
//!
//! # Listing
//!
//! [`scan`](Backend::scan) and [`clear`](Backend::clear) walk the keys with
//! `SCAN MATCH {NS}:r:<prefix>* TYPE hash` (never `KEYS`, which blocks the server), with the
//! glob characters `* ? [ ] \` of the namespace and prefix escaped so that a prefix matches
//! literally; `SCAN` may repeat a key, so results are de-duplicated. `SCAN` walks the whole
//! database whatever the pattern, so a store that lists keys often on a large shared server is
//! better given its own database number (`redis://host/3`).
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
//! the *Redis server's* clock reaches its `expires_at`. Keep the game servers' clocks in sync
//! (NTP) with Redis's. Configure the server with `maxmemory-policy noeviction` (the default):
//! an evicting policy would silently delete records.

use std::collections::HashSet;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
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

/// Applies a batch; see the module docs. KEYS: usage, expiry, expiry-size, then one record key
/// per operation. ARGV: now, record-key prefix, then per operation either `D key` or
/// `U|C key value size expires_at created_at modified_at accessed_at flags custom`
/// (`expires_at` and `custom` empty for none). Returns `{1, previous size or -1 ...}` or
/// `{0, index}` when the create-only put at `index` (1-based) meets a live record.
const WRITE_SCRIPT: &str = r#"#!lua
local usage, expiry, expsize = KEYS[1], KEYS[2], KEYS[3]
local now = tonumber(ARGV[1])
local prefix = ARGV[2]

local ops = {}
local i = 3
while i <= #ARGV do
  local op = {kind = ARGV[i], key = ARGV[i + 1], rkey = KEYS[4 + #ops]}
  if op.kind == 'D' then
    i = i + 2
  else
    op.value, op.size, op.expires = ARGV[i + 2], ARGV[i + 3], ARGV[i + 4]
    op.created, op.modified, op.accessed = ARGV[i + 5], ARGV[i + 6], ARGV[i + 7]
    op.flags, op.custom = ARGV[i + 8], ARGV[i + 9]
    i = i + 10
  end
  ops[#ops + 1] = op
end

-- The record under a record key (size, expiry, creation time, liveness at now), or nil.
local function stored(rkey)
  local f = redis.call('HMGET', rkey, 's', 'x', 'c')
  if not f[1] then return nil end
  return {size = f[1], expires = f[2], created = f[3],
          live = (not f[2]) or tonumber(f[2]) > now}
end

-- Check every create-only put against the state it will see, before changing anything.
local seen = {}
for n, op in ipairs(ops) do
  local live = seen[op.rkey]
  if live == nil then
    local old = stored(op.rkey)
    live = old ~= nil and old.live
  end
  if op.kind == 'C' and live then return {0, n} end
  seen[op.rkey] = op.kind ~= 'D'
end

local result = {1}
for n, op in ipairs(ops) do
  local old = stored(op.rkey)
  local previous = -1
  local created = op.created
  redis.call('ZREM', expiry, op.key)
  redis.call('HDEL', expsize, op.key)
  if old then
    if old.live then
      previous = tonumber(old.size)
      created = old.created or created
    end
    if not old.expires then
      if redis.call('HINCRBY', usage, 'n', -1) <= 0 then
        redis.call('DEL', usage)
      else
        redis.call('HINCRBY', usage, 'b', 0 - tonumber(old.size))
      end
    end
  end
  redis.call('DEL', op.rkey)
  if op.kind ~= 'D' then
    local fields = {'v', op.value, 's', op.size, 'c', created, 'm', op.modified,
                    'a', op.accessed, 'f', op.flags}
    if op.custom ~= '' then
      fields[#fields + 1] = 'u'
      fields[#fields + 1] = op.custom
    end
    if op.expires ~= '' then
      fields[#fields + 1] = 'x'
      fields[#fields + 1] = op.expires
    end
    redis.call('HSET', op.rkey, unpack(fields))
    if op.expires ~= '' then
      redis.call('PEXPIREAT', op.rkey, op.expires)
    end
    -- A record whose expiry has already passed by the server's clock is gone at once.
    if redis.call('EXISTS', op.rkey) == 1 then
      if op.expires ~= '' then
        redis.call('ZADD', expiry, op.expires, op.key)
        redis.call('HSET', expsize, op.key, op.size)
      else
        redis.call('HINCRBY', usage, 'n', 1)
        redis.call('HINCRBY', usage, 'b', op.size)
      end
    end
  end
  result[n + 1] = previous
end

-- Forget a few records that Redis expired by itself (the earliest expiries go first).
for _, member in ipairs(redis.call('ZRANGE', expiry, 0, 7)) do
  if redis.call('EXISTS', prefix .. member) == 0 then
    redis.call('ZREM', expiry, member)
    redis.call('HDEL', expsize, member)
  end
end
return result
"#;

/// Sets the access time of an existing record. KEYS: the record. ARGV: the time.
const TOUCH_SCRIPT: &str = r#"#!lua
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('HSET', KEYS[1], 'a', ARGV[1])
end
return 0
"#;

/// One page of usage. KEYS: usage, expiry, expiry-size. ARGV: now, record-key prefix, offset,
/// page size. Returns `{count, bytes, examined}`: the records without expiry (first page only)
/// plus the live ones with an expiry in this page.
const USAGE_SCRIPT: &str = r#"#!lua flags=no-writes
local count, bytes = 0, 0
if tonumber(ARGV[3]) == 0 then
  local u = redis.call('HMGET', KEYS[1], 'n', 'b')
  count, bytes = tonumber(u[1] or 0), tonumber(u[2] or 0)
end
local members = redis.call('ZRANGEBYSCORE', KEYS[2], '(' .. ARGV[1], '+inf',
                           'LIMIT', ARGV[3], ARGV[4])
for _, m in ipairs(members) do
  if redis.call('EXISTS', ARGV[2] .. m) == 1 then
    count = count + 1
    bytes = bytes + tonumber(redis.call('HGET', KEYS[3], m) or 0)
  end
end
return {count, bytes, #members}
"#;

/// Removes up to a page of records with `expires_at <= now`. KEYS: usage, expiry,
/// expiry-size. ARGV: now, record-key prefix, page size. Returns `{removed, examined}`.
const PURGE_SCRIPT: &str = r#"#!lua
local members = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', ARGV[1], 'LIMIT', 0, ARGV[3])
local removed = 0
for _, m in ipairs(members) do
  removed = removed + redis.call('DEL', ARGV[2] .. m)
  redis.call('ZREM', KEYS[2], m)
  redis.call('HDEL', KEYS[3], m)
end
return {removed, #members}
"#;

/// Forgets the expiry entries whose record is gone, a page at a time. KEYS: usage, expiry,
/// expiry-size. ARGV: record-key prefix, offset, page size. Returns `{examined, removed}`.
const TRIM_SCRIPT: &str = r#"#!lua
local offset = tonumber(ARGV[2])
local members = redis.call('ZRANGE', KEYS[2], offset, offset + tonumber(ARGV[3]) - 1)
local removed = 0
for _, m in ipairs(members) do
  if redis.call('EXISTS', ARGV[1] .. m) == 0 then
    redis.call('ZREM', KEYS[2], m)
    redis.call('HDEL', KEYS[3], m)
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
    expiry_size: String,
}

impl Keys {
    fn new(namespace: &str) -> Self {
        let base = format!("{{{namespace}}}:");
        Self {
            record_prefix: format!("{base}r:"),
            usage: format!("{base}usage"),
            expiry: format!("{base}expiry"),
            expiry_size: format!("{base}expiry-size"),
        }
    }

    fn record(&self, key: &str) -> String {
        let mut k = String::with_capacity(self.record_prefix.len() + key.len());
        k.push_str(&self.record_prefix);
        k.push_str(key);
        k
    }

    /// The three bookkeeping keys, in the order the scripts take them.
    fn bookkeeping(&self) -> [&str; 3] {
        [&self.usage, &self.expiry, &self.expiry_size]
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
                e.detail().unwrap_or(e.category())
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
                .arg("hash")
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

    /// The script invocation that deletes the given raw record keys with their bookkeeping.
    fn delete_invocation(
        &self,
        raw_keys: &[Vec<u8>],
        now: Timestamp,
    ) -> redis::ScriptInvocation<'_> {
        let mut inv = self.scripts.write.prepare_invoke();
        for k in self.keys.bookkeeping() {
            inv.key(k);
        }
        inv.arg(now.0).arg(&self.keys.record_prefix);
        let prefix = self.keys.record_prefix.as_bytes();
        for raw in raw_keys {
            inv.key(raw.as_slice());
            inv.arg("D").arg(&raw[prefix.len().min(raw.len())..]);
        }
        inv
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

/// `url` with the password of its user info replaced by `***`, for messages and `Debug`.
pub(crate) fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split_once(':').map_or(userinfo, |(user, _)| user);
            let hidden = if userinfo.contains(':') { ":***" } else { "" };
            format!("{scheme}://{user}{hidden}@{host}{tail}")
        }
        None => url.to_owned(),
    }
}

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

/// Parses a stored integer field.
fn parse_int(key: &str, field: &str, raw: &[u8]) -> Result<i64> {
    std::str::from_utf8(raw)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| {
            StorageError::corrupt(key, format!("Redis field `{field}` is not an integer"))
        })
}

/// The metadata fields of a record hash, in the order [`META_FIELDS`] asks for them.
const META_FIELDS: [&str; 7] = ["s", "c", "m", "a", "x", "f", "u"];

/// Builds the metadata from the [`META_FIELDS`] of a record; `None` if there is no record.
fn parse_meta(key: &str, fields: &[Option<Vec<u8>>]) -> Result<Option<RecordMeta>> {
    let [s, c, m, a, x, f, u] = fields else {
        return Err(StorageError::backend(BACKEND, "unexpected answer to HMGET"));
    };
    let Some(s) = s else {
        return Ok(None);
    };
    let required = |field: &str, raw: &Option<Vec<u8>>| match raw {
        Some(raw) => parse_int(key, field, raw),
        None => Err(StorageError::corrupt(
            key,
            format!("Redis field `{field}` is missing"),
        )),
    };
    let size = u64::try_from(parse_int(key, "s", s)?)
        .map_err(|_| StorageError::corrupt(key, "negative size"))?;
    let flags = required("f", f)?;
    let custom = match u {
        None => CustomMetadata::new(),
        Some(json) => serde_json::from_slice(json).map_err(|e| {
            StorageError::corrupt(key, format!("custom metadata is not a JSON object: {e}"))
        })?,
    };
    Ok(Some(RecordMeta {
        created_at: Timestamp(required("c", c)?),
        modified_at: Timestamp(required("m", m)?),
        accessed_at: Timestamp(required("a", a)?),
        expires_at: x
            .as_deref()
            .map(|x| parse_int(key, "x", x))
            .transpose()?
            .map(Timestamp),
        size,
        compressed: flags & 1 != 0,
        encrypted: flags & 2 != 0,
        custom,
    }))
}

impl Backend for RedisBackend {
    fn backend_type(&self) -> &str {
        BACKEND
    }

    fn get(&self, key: &str) -> Result<Option<Record>> {
        let rkey = self.keys.record(key);
        let mut fields: Vec<Option<Vec<u8>>> =
            self.run("reading a record", Retry::Safe, |con| {
                redis::cmd("HMGET")
                    .arg(&rkey)
                    .arg("v")
                    .arg(&META_FIELDS)
                    .query(con)
            })?;
        if fields.is_empty() {
            return Err(StorageError::backend(BACKEND, "unexpected answer to HMGET"));
        }
        let value = fields.remove(0);
        match (parse_meta(key, &fields)?, value) {
            (Some(meta), Some(value)) => Ok(Some(Record { value, meta })),
            (Some(_), None) => Err(StorageError::corrupt(key, "Redis field `v` is missing")),
            (None, _) => Ok(None),
        }
    }

    fn get_value(&self, key: &str) -> Result<Option<(Vec<u8>, Option<Timestamp>)>> {
        let rkey = self.keys.record(key);
        let (value, expires_at): (Option<Vec<u8>>, Option<Vec<u8>>) =
            self.run("reading a record", Retry::Safe, |con| {
                redis::cmd("HMGET").arg(&rkey).arg("v").arg("x").query(con)
            })?;
        let expires_at = expires_at
            .map(|x| parse_int(key, "x", &x).map(Timestamp))
            .transpose()?;
        Ok(value.map(|value| (value, expires_at)))
    }

    fn get_meta(&self, key: &str) -> Result<Option<RecordMeta>> {
        let rkey = self.keys.record(key);
        let fields: Vec<Option<Vec<u8>>> =
            self.run("reading record metadata", Retry::Safe, |con| {
                redis::cmd("HMGET").arg(&rkey).arg(&META_FIELDS).query(con)
            })?;
        parse_meta(key, &fields)
    }

    fn write(&self, ops: Vec<WriteOp>, now: Timestamp) -> Result<Vec<WriteOutcome>> {
        if ops.is_empty() {
            return Ok(Vec::new());
        }
        let mut inv = self.scripts.write.prepare_invoke();
        for k in self.keys.bookkeeping() {
            inv.key(k);
        }
        inv.arg(now.0).arg(&self.keys.record_prefix);
        for op in &ops {
            inv.key(self.keys.record(op.key()));
            match op {
                WriteOp::Delete { key } => {
                    inv.arg("D").arg(key);
                }
                WriteOp::Put { key, record, mode } => {
                    let meta = &record.meta;
                    let custom = if meta.custom.is_empty() {
                        String::new()
                    } else {
                        serde_json::to_string(&meta.custom).map_err(|e| {
                            StorageError::backend(BACKEND, format!("encoding custom metadata: {e}"))
                        })?
                    };
                    let expires = meta.expires_at.map(|t| t.0.to_string()).unwrap_or_default();
                    inv.arg(if *mode == PutMode::CreateOnly {
                        "C"
                    } else {
                        "U"
                    })
                    .arg(key)
                    .arg(&record.value)
                    .arg(record.value.len())
                    .arg(expires)
                    .arg(meta.created_at.0)
                    .arg(meta.modified_at.0)
                    .arg(meta.accessed_at.0)
                    .arg(flags(meta))
                    .arg(custom);
                }
            }
        }
        let count = ops.len();
        let doing = format!("writing a batch of {count} operation(s)");
        let reply: Vec<i64> = self.run(&doing, Retry::Never, |con| inv.invoke(con))?;
        match reply.as_slice() {
            [1, sizes @ ..] if sizes.len() == count => Ok(sizes
                .iter()
                .map(|&s| WriteOutcome {
                    previous_size: u64::try_from(s).ok(),
                })
                .collect()),
            [0, index] => {
                let key = usize::try_from(*index)
                    .ok()
                    .and_then(|i| ops.get(i.wrapping_sub(1)))
                    .map(|op| op.key().to_owned())
                    .unwrap_or_default();
                Err(StorageError::AlreadyExists { key })
            }
            _ => Err(StorageError::backend(
                BACKEND,
                format!("{doing}: unexpected answer {reply:?} from the write script"),
            )),
        }
    }

    fn touch(&self, key: &str, at: Timestamp) -> Result<()> {
        let rkey = self.keys.record(key);
        self.run("updating an access time", Retry::Safe, |con| {
            self.scripts.touch.key(&rkey).arg(at.0).invoke::<()>(con)
        })
    }

    fn scan(&self, prefix: &str) -> Result<Vec<KeyEntry>> {
        let skip = self.keys.record_prefix.len();
        self.run("listing keys", Retry::Safe, |con| {
            let mut entries = Vec::new();
            self.scan_records(con, prefix, |con, raw_keys| {
                let mut pipe = redis::pipe();
                for raw in &raw_keys {
                    pipe.cmd("HMGET").arg(raw).arg("s").arg("x");
                }
                let rows: Vec<(Option<i64>, Option<i64>)> = pipe.query(con)?;
                for (raw, (size, expires_at)) in raw_keys.into_iter().zip(rows) {
                    // Gone since SCAN saw it (or not a record): skip.
                    let Some(size) = size else { continue };
                    let Ok(key) = String::from_utf8(raw[skip..].to_vec()) else {
                        continue;
                    };
                    entries.push(KeyEntry {
                        key,
                        size: u64::try_from(size).unwrap_or(0),
                        expires_at: expires_at.map(Timestamp),
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
                    .key(&self.keys.expiry_size)
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
        self.run("removing every record", Retry::Safe, |con| {
            // Each page is deleted by the write script, so the bookkeeping stays exact even
            // while another store writes to the same namespace.
            self.scan_records(con, "", |con, raw_keys| {
                self.delete_invocation(&raw_keys, Timestamp::now())
                    .invoke::<Vec<i64>>(con)
                    .map(drop)
            })?;
            // Then forget the records Redis expired by itself.
            let mut offset = 0usize;
            loop {
                let (examined, removed): (usize, usize) = self
                    .scripts
                    .trim
                    .key(&self.keys.usage)
                    .key(&self.keys.expiry)
                    .key(&self.keys.expiry_size)
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
                    .key(&self.keys.expiry_size)
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
        assert_eq!(redact_url("redis://alice@host"), "redis://alice@host");
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

    #[test]
    fn info_fields_are_found() {
        let info = "# Memory\r\nused_memory:1024\r\nmaxmemory:4096\r\n";
        assert_eq!(info_field(info, "maxmemory"), Some("4096"));
        assert_eq!(info_field(info, "used_memory"), Some("1024"));
        assert_eq!(info_field(info, "absent"), None);
    }
}
