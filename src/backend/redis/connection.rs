//! Connections: the pool, what the backend knows about the health of each connection, and
//! how failures are retried and reported (see "Connections and failures" in the
//! [module docs](super)).

use std::cell::Cell;
use std::fmt;
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use r2d2::{Pool, PooledConnection};
use redis::{ConnectionLike, RedisError};

use super::{BACKEND, RedisBackend, RedisOptions};
use crate::error::{Result, StorageError};

/// A pooled connection unused for longer than this is checked with `PING` before a write is
/// sent on it (the server may have restarted meanwhile).
const IDLE_CHECK: Duration = Duration::from_secs(1);

/// Attempts an operation makes on different connections after connection failures.
const MAX_ATTEMPTS: u32 = 3;

thread_local! {
    /// The deadline of the operation this thread runs (set by `run_replies` around its
    /// closure), so that an operation of several round trips (a listing, a purge) gives each
    /// one only what is left: see [`rebound`].
    static DEADLINE: Cell<Option<Instant>> = const { Cell::new(None) };
}

/// Before another round trip of an operation of several (a `SCAN` page, a script page):
/// gives `con`'s socket only what is left of the operation's deadline, shared among
/// `replies` reads, and fails with a timeout when nothing is left, so the operation's bound
/// holds however many round trips it makes.
pub(super) fn rebound(con: &mut redis::Connection, replies: usize) -> redis::RedisResult<()> {
    let Some(deadline) = DEADLINE.get() else {
        return Ok(());
    };
    let left = deadline.saturating_duration_since(Instant::now());
    if left < Duration::from_millis(1) {
        return Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "the operation's time bound passed between its round trips",
        )
        .into());
    }
    // The kernel rounds a socket timeout up to its timer tick (10 ms on some kernels): ask for
    // a tick less, so that the rounded timeouts of all `replies` still end by the deadline.
    let share = (left / u32::try_from(replies.max(1)).unwrap_or(u32::MAX))
        .saturating_sub(TIMER_TICK)
        .max(Duration::from_millis(1));
    let share = Some(share);
    con.set_read_timeout(share)?;
    con.set_write_timeout(share)?;
    Ok(())
}

/// The coarsest timer tick a kernel rounds socket timeouts up to (`HZ=100`).
const TIMER_TICK: Duration = Duration::from_millis(10);

/// How many replies the next pipeline of a multi-step operation may wait for: few enough
/// that each gets at least 100 ms of the time left. A socket timeout is rounded up to the
/// kernel's timer tick, and the client reads every reply of a pipeline even after one timed
/// out, so a pipeline of a thousand replies given 3 ms each once waited 10 s, and one of 71
/// given 40 ms each waited 3.5 s. At most 128, at least 1.
pub(super) fn pipeline_chunk() -> usize {
    const MIN_SHARE: Duration = Duration::from_millis(100);
    let Some(deadline) = DEADLINE.get() else {
        return 128;
    };
    let left = deadline.saturating_duration_since(Instant::now());
    usize::try_from(left.as_millis() / MIN_SHARE.as_millis())
        .unwrap_or(128)
        .clamp(1, 128)
}

/// Sets [`DEADLINE`] for as long as it lives.
struct DeadlineScope;

impl DeadlineScope {
    fn enter(deadline: Instant) -> Self {
        DEADLINE.set(Some(deadline));
        Self
    }
}

impl Drop for DeadlineScope {
    fn drop(&mut self) {
        DEADLINE.set(None);
    }
}

/// State shared between the backend and its connection manager.
pub(super) struct Shared {
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
pub(super) struct RedisConn {
    pub(super) con: redis::Connection,
    /// Failed mid-command (I/O error or timeout): the pool drops it.
    broken: bool,
    last_ok: Instant,
    generation: u64,
}

/// Opens connections with the configured timeouts for the pool.
pub(super) struct Manager {
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

/// The pool of connections to the server of `client`, and the state it shares with the
/// backend. No connection is opened yet.
pub(super) fn pool(client: redis::Client, options: &RedisOptions) -> (Pool<Manager>, Arc<Shared>) {
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
    (pool, shared)
}

/// Whether an operation may be sent again after its connection failed.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Retry {
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

/// The next answer on `con`, passing over push messages (which a RESP3 server may send at any
/// time).
pub(super) fn recv_reply(con: &mut redis::Connection) -> redis::RedisResult<redis::Value> {
    loop {
        match con.recv_response()? {
            redis::Value::Push { .. } => continue,
            reply => return Ok(reply),
        }
    }
}

/// True when Redis refused a command for the type of the key it names.
/// For a transaction, when any of its commands was.
pub(super) fn is_wrong_type(e: &RedisError) -> bool {
    e.code() == Some("WRONGTYPE")
        || e.detail().is_some_and(|d| d.contains("WRONGTYPE"))
        || e.clone()
            .into_server_errors()
            .is_some_and(|errors| errors.iter().any(|(_, error)| error.code() == "WRONGTYPE"))
}

impl RedisBackend {
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
                // Every connection busy is a pool too small; fewer means a new connection
                // was being opened and the server did not complete it (a hung server).
                None if self.pool.state().connections < self.pool.max_size() => {
                    self.unavailable(format_args!(
                        "the server did not complete a new connection within {wait:?} ({e})"
                    ))
                }
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
    pub(super) fn run<T>(
        &self,
        doing: &str,
        retry: Retry,
        f: impl FnMut(&mut redis::Connection) -> redis::RedisResult<T>,
    ) -> Result<T> {
        self.run_replies(doing, retry, 1, f)
    }

    /// [`run`](Self::run) for an `f` that sends a pipeline of `replies` commands: the client
    /// reads every reply of a pipeline even after one timed out, so each read is given only
    /// its share of the time left.
    pub(super) fn run_replies<T>(
        &self,
        doing: &str,
        retry: Retry,
        replies: u32,
        mut f: impl FnMut(&mut redis::Connection) -> redis::RedisResult<T>,
    ) -> Result<T> {
        let deadline =
            Instant::now() + self.options.connect_timeout + self.options.response_timeout;
        let mut attempt = 0;
        loop {
            attempt += 1;
            let may_retry = attempt < MAX_ATTEMPTS && Instant::now() < deadline;
            let mut conn = self.checkout(deadline)?;
            // Every read and write on the socket ends by the deadline, however many attempts
            // and commands came before: the bound holds for the whole operation.
            if !self.bound_by(&mut conn.con, deadline, replies) {
                return Err(self.out_of_time(doing, retry, false));
            }
            let generation = self.shared.generation.load(Ordering::SeqCst);
            if retry == Retry::Never
                && (conn.generation != generation || conn.last_ok.elapsed() > IDLE_CHECK)
            {
                // Nothing is sent yet, so a failure here can always be retried.
                match redis::cmd("PING").query::<()>(&mut conn.con) {
                    Ok(()) => {
                        conn.generation = generation;
                        if !self.bound_by(&mut conn.con, deadline, replies) {
                            return Err(self.out_of_time(doing, retry, false));
                        }
                    }
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
            let scope = DeadlineScope::enter(deadline);
            let result = f(&mut conn.con);
            drop(scope);
            match result {
                Ok(value) => {
                    conn.last_ok = Instant::now();
                    return Ok(value);
                }
                Err(e) if is_connection_failure(&e) => {
                    self.connection_failed(&mut conn);
                    if retry == Retry::Safe && may_retry {
                        continue;
                    }
                    if retry == Retry::Never {
                        return Err(StorageError::OutcomeUnknown {
                            backend: BACKEND.into(),
                            message: format!("{doing}: {e}"),
                            batch_token: None,
                        });
                    }
                    return Err(self.fail(e, doing));
                }
                Err(e) => return Err(self.fail(e, doing)),
            }
        }
    }

    /// Sets the socket timeouts of `con` to what is left until `deadline`, shared among
    /// `replies` reads (at most the response timeout each); false when nothing is left.
    fn bound_by(&self, con: &mut redis::Connection, deadline: Instant, replies: u32) -> bool {
        let left = deadline.saturating_duration_since(Instant::now());
        if left < Duration::from_millis(1) {
            return false;
        }
        let timeout = Some((left / replies.max(1)).min(self.options.response_timeout));
        con.set_read_timeout(timeout).is_ok() && con.set_write_timeout(timeout).is_ok()
    }

    /// The operation ran out of its time bound before (or, `sent`, after) sending.
    fn out_of_time(&self, doing: &str, retry: Retry, sent: bool) -> StorageError {
        let bound = self.options.connect_timeout + self.options.response_timeout;
        if sent && retry == Retry::Never {
            return StorageError::OutcomeUnknown {
                backend: BACKEND.into(),
                message: format!("{doing}: no answer within {bound:?}"),
                batch_token: None,
            };
        }
        self.unavailable(format_args!(
            "{doing}: the server did not answer within {bound:?}"
        ))
    }

    fn connection_failed(&self, conn: &mut RedisConn) {
        conn.broken = true;
        self.shared.generation.fetch_add(1, Ordering::SeqCst);
    }

    fn unavailable(&self, message: fmt::Arguments<'_>) -> StorageError {
        StorageError::unavailable(BACKEND, format!("Redis at {}: {message}", self.address))
    }

    /// Maps a failure of `doing`.
    pub(super) fn fail(&self, e: RedisError, doing: &str) -> StorageError {
        if e.code() == Some("OOM") {
            // The server's memory is this store's medium: full, as a disk would be. Scripts
            // and transactions are refused whole before they run, so nothing was written.
            return StorageError::StorageFull {
                backend: BACKEND.into(),
                message: format!(
                    "{doing}: the Redis server at {} is out of memory (maxmemory): {e}",
                    self.address
                ),
            };
        }
        if is_connection_failure(&e) || is_server_unavailable(&e) {
            self.unavailable(format_args!("{doing}: {e}"))
        } else {
            StorageError::backend(
                BACKEND,
                format!("{doing} on Redis at {}: {e}", self.address),
            )
        }
    }
}
