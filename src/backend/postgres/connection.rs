//! Connections: a pool of `r2d2` connections, each a `tokio-postgres` client with its own
//! single-thread Tokio runtime.
//!
//! A call takes a connection from the pool and drives its query *and* its connection task on
//! the calling thread (`block_on` of the connection's own runtime), as the synchronous
//! `postgres` crate does, so a round trip costs no hand-off between threads. Unlike that
//! crate, every call runs under a deadline (`tokio::time`), so a hung server cannot hold the
//! game's thread; a connection that missed its deadline or broke is marked broken and the
//! pool closes it instead of reusing it. Statements are prepared once per connection.
//! Connections are plaintext or TLS as the URL's `sslmode` says (`postgres/tls.rs`).

use std::collections::HashMap;
use std::time::Duration;

use tokio::runtime::Runtime;
use tokio_postgres::{Client, Statement};

use super::tls::{Connector, TlsParams};

/// One pooled connection: the runtime that drives it and its session.
pub(super) struct Connection {
    pub(super) runtime: Runtime,
    pub(super) session: Session,
    /// Set after a timeout or a lost connection: the pool closes it.
    pub(super) broken: bool,
}

/// What an operation works with: the client and the statements prepared on it.
pub(super) struct Session {
    pub(super) client: Client,
    statements: HashMap<&'static str, Statement>,
}

impl Session {
    /// `sql` prepared on this connection (once; later calls reuse it).
    pub(super) async fn prepare(
        &mut self,
        sql: &'static str,
    ) -> Result<Statement, tokio_postgres::Error> {
        if let Some(statement) = self.statements.get(sql) {
            return Ok(statement.clone());
        }
        let statement = self.client.prepare(sql).await?;
        self.statements.insert(sql, statement.clone());
        Ok(statement)
    }
}

/// Why a connection could not be made.
#[derive(Debug)]
pub(super) enum ConnectError {
    Runtime(std::io::Error),
    /// The client's error, and what it means in words (a refused certificate says so).
    Postgres(tokio_postgres::Error, String),
    TimedOut(Duration),
}

impl std::fmt::Display for ConnectError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Runtime(e) => write!(f, "starting the client's runtime: {e}"),
            Self::Postgres(_, explained) => f.write_str(explained),
            Self::TimedOut(d) => write!(f, "no connection within {d:?}"),
        }
    }
}

impl std::error::Error for ConnectError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Runtime(e) => Some(e),
            Self::Postgres(e, _) => Some(e),
            Self::TimedOut(_) => None,
        }
    }
}

/// Opens connections for the pool.
pub(super) struct Manager {
    pub(super) config: tokio_postgres::Config,
    pub(super) connect_timeout: Duration,
    /// Plaintext or TLS, per the URL's `sslmode`.
    pub(super) tls: Connector,
    pub(super) tls_params: TlsParams,
    /// Why the last connection attempt failed: the pool itself only says that it timed out.
    pub(super) last_error: std::sync::Arc<parking_lot::Mutex<Option<String>>>,
}

impl r2d2::ManageConnection for Manager {
    type Connection = Connection;
    type Error = ConnectError;

    fn connect(&self) -> Result<Connection, ConnectError> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(ConnectError::Runtime)?;
        // The timer is made inside the runtime: a `Sleep` needs the runtime's clock.
        let connected = runtime
            .block_on(async {
                tokio::time::timeout(self.connect_timeout, self.tls.connect(&self.config)).await
            })
            .map_err(|_| ConnectError::TimedOut(self.connect_timeout))
            .and_then(|r| {
                r.map_err(|e| {
                    let explained = super::tls::explain(&e, &self.tls_params);
                    ConnectError::Postgres(e, explained)
                })
            });
        let client = match connected {
            Ok(pair) => pair,
            Err(e) => {
                *self.last_error.lock() = Some(e.to_string());
                return Err(e);
            }
        };
        Ok(Connection {
            runtime,
            session: Session {
                client,
                statements: HashMap::new(),
            },
            broken: false,
        })
    }

    fn is_valid(&self, _conn: &mut Connection) -> Result<(), ConnectError> {
        // Not tested on checkout (a round trip per call); a dead one fails its call and is
        // dropped then.
        Ok(())
    }

    fn has_broken(&self, conn: &mut Connection) -> bool {
        conn.broken || conn.session.client.is_closed()
    }
}
