//! Fixtures shared by the integration tests: one store per backend, on a manual clock.
#![allow(dead_code)]

use std::time::Duration;

use bevy_storage::clock::ManualClock;
use bevy_storage::{EncryptionKey, StorageConfig, Store};
use tempfile::TempDir;

/// A store under test with what it needs to stay alive and to be reopened.
pub struct Fixture {
    pub store: Store,
    pub clock: ManualClock,
    pub kind: Kind,
    /// Kept so the directory lives as long as the fixture.
    pub dir: Option<TempDir>,
    /// The fixture's own Redis namespace, removed when the fixture drops.
    #[cfg(feature = "redis")]
    pub redis: Option<RedisNamespace>,
    /// The fixture's own PostgreSQL namespace, removed when the fixture drops.
    #[cfg(feature = "postgres")]
    pub postgres: Option<PostgresNamespace>,
}

/// Which backend a fixture uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Memory,
    File,
    Sqlite,
    #[cfg(feature = "redis")]
    Redis,
    #[cfg(feature = "postgres")]
    Postgres,
}

impl Kind {
    pub fn persistent(self) -> bool {
        !matches!(self, Kind::Memory)
    }
}

/// Test-sized key: Argon2 is not what these tests measure.
pub fn test_key() -> EncryptionKey {
    EncryptionKey::from_bytes([42; 32])
}

impl Fixture {
    pub fn new(kind: Kind) -> Self {
        Self::with(kind, |c| c)
    }

    /// A fixture whose config is adjusted by `tweak` (the backend and clock are set here).
    pub fn with(kind: Kind, tweak: impl Fn(StorageConfig) -> StorageConfig) -> Self {
        let clock = ManualClock::starting_now();
        let dir = kind.persistent().then(|| tempfile::tempdir().unwrap());
        #[cfg(feature = "redis")]
        let redis = (kind == Kind::Redis).then(RedisNamespace::fresh);
        #[cfg(feature = "postgres")]
        let postgres = (kind == Kind::Postgres).then(PostgresNamespace::fresh);
        let mut fixture = Self {
            // Replaced below, once the fixture owns what the backend needs.
            store: Store::open(StorageConfig::memory()).unwrap(),
            clock,
            kind,
            dir,
            #[cfg(feature = "redis")]
            redis,
            #[cfg(feature = "postgres")]
            postgres,
        };
        fixture.store =
            Store::open(tweak(fixture.backend_config()).clock(fixture.clock.clone())).unwrap();
        fixture
    }

    /// This fixture's backend with every other setting at its default.
    fn backend_config(&self) -> StorageConfig {
        let dir = || self.dir.as_ref().unwrap().path().to_path_buf();
        match self.kind {
            Kind::Memory => StorageConfig::memory(),
            Kind::File => StorageConfig::file(dir().join("records")),
            Kind::Sqlite => StorageConfig::sqlite(dir().join("store.db")),
            #[cfg(feature = "redis")]
            Kind::Redis => {
                let ns = self.redis.as_ref().unwrap();
                StorageConfig::redis(&ns.url, &ns.namespace)
            }
            #[cfg(feature = "postgres")]
            Kind::Postgres => {
                let ns = self.postgres.as_ref().unwrap();
                StorageConfig::postgres(&ns.url, &ns.namespace)
            }
        }
    }

    /// The config of this fixture's backend, for opening it again (persistent kinds only).
    pub fn config(&self) -> StorageConfig {
        self.backend_config().clock(self.clock.clone())
    }

    /// Drops the store and opens the same backend again (persistent kinds only).
    pub fn reopen(
        &mut self,
        tweak: impl Fn(StorageConfig) -> StorageConfig,
    ) -> Result<(), bevy_storage::StorageError> {
        assert!(self.kind.persistent());
        // Open the new one only after the old one is gone (file backends lock their root).
        let placeholder = Store::open(StorageConfig::memory()).unwrap();
        drop(std::mem::replace(&mut self.store, placeholder));
        self.store = Store::open(tweak(self.config()))?;
        Ok(())
    }

    pub fn advance(&self, d: Duration) {
        self.clock.advance(d);
    }
}

/// The Redis server the tests use: `REDIS_URL`, default `redis://127.0.0.1:6379`.
#[cfg(feature = "redis")]
pub fn redis_url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// True when the tests run under CI (`CI=true`), where a missing server is a failure.
pub fn under_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// `Some(Kind::Redis)` when the test Redis answers. Otherwise, under CI, the test fails; locally
/// it says loudly that it is skipped and the caller returns.
#[cfg(feature = "redis")]
pub fn redis_kind() -> Option<Kind> {
    require_redis(&redis_url(), under_ci()).then_some(Kind::Redis)
}

/// Whether Redis answers `PING` at `url`; when it does not, panics if `ci`, else prints a
/// skip notice on stderr and returns false.
#[cfg(feature = "redis")]
pub fn require_redis(url: &str, ci: bool) -> bool {
    match check_redis(url, ci) {
        Ok(()) => true,
        Err(notice) => {
            // Straight to stderr: the test harness captures `eprintln!` of passing tests.
            use std::io::Write as _;
            let _ = writeln!(std::io::stderr(), "{notice}");
            false
        }
    }
}

/// `Ok` when Redis answers at `url`; otherwise panics if `ci`, else returns the skip notice.
#[cfg(feature = "redis")]
pub fn check_redis(url: &str, ci: bool) -> Result<(), String> {
    let Err(e) = redis_ping(url) else {
        return Ok(());
    };
    if ci {
        panic!(
            "CI=true and Redis does not answer at {url} ({e}): the Redis tests must run under CI. \
             .ci/run starts redis-server when it is down (see DEVELOPERS.md); set REDIS_URL if \
             it listens elsewhere."
        );
    }
    let test = std::thread::current().name().unwrap_or("?").to_owned();
    Err(format!(
        "!!!!! SKIPPED {test}: no Redis at {url} ({e}). Start one (`redis-server`, see \
         DEVELOPERS.md) or set REDIS_URL to run the Redis tests; under CI=true this fails."
    ))
}

#[cfg(feature = "redis")]
fn redis_ping(url: &str) -> Result<(), String> {
    let client = redis::Client::open(url).map_err(|e| e.to_string())?;
    let mut con = client
        .get_connection_with_timeout(Duration::from_secs(1))
        .map_err(|e| e.to_string())?;
    redis::cmd("PING")
        .query::<()>(&mut con)
        .map_err(|e| e.to_string())
}

/// A namespace of its own for one fixture; every key under it is deleted on drop.
#[cfg(feature = "redis")]
pub struct RedisNamespace {
    pub url: String,
    pub namespace: String,
}

#[cfg(feature = "redis")]
impl RedisNamespace {
    /// A namespace no other test uses: `test:<16 random hex digits>`.
    pub fn fresh() -> Self {
        let mut bytes = [0u8; 8];
        getrandom::fill(&mut bytes).unwrap();
        let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        Self {
            url: redis_url(),
            namespace: format!("test:{hex}"),
        }
    }

    /// The Redis key `{NS}:<suffix>` of this namespace (`r:<key>` for a record, `usage`,
    /// `expiry`, `batch`).
    pub fn redis_key(&self, suffix: &str) -> String {
        format!("{{{}}}:{suffix}", self.namespace)
    }

    /// The Redis key of the record of `key`: `{NS}:r:<key>`.
    pub fn record_key(&self, key: &str) -> String {
        self.redis_key(&format!("r:{key}"))
    }

    /// Every Redis key of this namespace (records and bookkeeping).
    pub fn keys(&self) -> Vec<String> {
        let client = redis::Client::open(self.url.as_str()).unwrap();
        let mut con = client
            .get_connection_with_timeout(Duration::from_secs(2))
            .unwrap();
        let pattern = format!(
            "{{{}}}:*",
            self.namespace.replace(['*', '?', '[', ']', '\\'], "?")
        );
        let keys: Vec<String> = redis::cmd("SCAN")
            .cursor_arg(0)
            .arg("MATCH")
            .arg(&pattern)
            .arg("COUNT")
            .arg(1000)
            .clone()
            .iter(&mut con)
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        let prefix = format!("{{{}}}:", self.namespace);
        keys.into_iter()
            .filter(|k| k.starts_with(&prefix))
            .collect()
    }
}

#[cfg(feature = "redis")]
impl Drop for RedisNamespace {
    fn drop(&mut self) {
        // Best effort: never turn a passing test into a panic while unwinding.
        let result = std::panic::catch_unwind(|| {
            let keys = self.keys();
            if !keys.is_empty() {
                let client = redis::Client::open(self.url.as_str()).unwrap();
                let mut con = client
                    .get_connection_with_timeout(Duration::from_secs(2))
                    .unwrap();
                for chunk in keys.chunks(500) {
                    redis::cmd("UNLINK")
                        .arg(chunk)
                        .query::<()>(&mut con)
                        .unwrap();
                }
            }
        });
        if result.is_err() {
            eprintln!("could not remove the Redis namespace {:?}", self.namespace);
        }
    }
}

/// The PostgreSQL database the tests use: `POSTGRES_URL`, default
/// `postgres://postgres@127.0.0.1:5432/test`.
#[cfg(feature = "postgres")]
pub fn postgres_url() -> String {
    std::env::var("POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

/// `Some(Kind::Postgres)` when the test database answers. Otherwise, under CI, the test fails;
/// locally it says loudly that it is skipped and the caller returns.
#[cfg(feature = "postgres")]
pub fn postgres_kind() -> Option<Kind> {
    match check_postgres(&postgres_url(), under_ci()) {
        Ok(()) => Some(Kind::Postgres),
        Err(notice) => {
            use std::io::Write as _;
            let _ = writeln!(std::io::stderr(), "{notice}");
            None
        }
    }
}

/// `Ok` when PostgreSQL answers at `url`; otherwise panics if `ci`, else returns the skip
/// notice.
#[cfg(feature = "postgres")]
pub fn check_postgres(url: &str, ci: bool) -> Result<(), String> {
    let options = bevy_storage::backend::PostgresOptions::default();
    let Err(e) = bevy_storage::backend::PostgresBackend::open(url, "test:ping", &options) else {
        return Ok(());
    };
    let shown = bevy_storage::config::redact_url(url);
    if ci {
        panic!(
            "CI=true and PostgreSQL does not answer at {shown} ({e}): the PostgreSQL tests must \
             run under CI. .ci/run starts it when it is down (see DEVELOPERS.md); set \
             POSTGRES_URL if it listens elsewhere."
        );
    }
    let test = std::thread::current().name().unwrap_or("?").to_owned();
    Err(format!(
        "!!!!! SKIPPED {test}: no PostgreSQL at {shown} ({e}). Start one or set POSTGRES_URL to \
         run the PostgreSQL tests; under CI=true this fails."
    ))
}

/// `url` with `params` (`a=1&b=2`) added to its query.
#[cfg(feature = "postgres")]
pub fn with_query(url: &str, params: &str) -> String {
    let joiner = if url.contains('?') { '&' } else { '?' };
    format!("{url}{joiner}{params}")
}

/// The CA that signed the test server's TLS certificate: `POSTGRES_TLS_CA`, by default the
/// file `.ci/postgres` writes.
#[cfg(feature = "postgres-tls")]
pub fn postgres_tls_ca() -> std::path::PathBuf {
    std::env::var_os("POSTGRES_TLS_CA").map_or_else(
        || "/var/lib/postgresql/bevy-storage-tls/ca.crt".into(),
        std::path::PathBuf::from,
    )
}

/// The CA of the test server when it answers over TLS with a certificate that CA signed
/// (checked with `sslmode=verify-full`). Otherwise, under CI, the test fails; locally it says
/// loudly that it is skipped and returns `None`.
#[cfg(feature = "postgres-tls")]
pub fn postgres_tls() -> Option<std::path::PathBuf> {
    postgres_kind()?;
    let ca = postgres_tls_ca();
    match check_postgres_tls(&postgres_url(), &ca, under_ci()) {
        Ok(()) => Some(ca),
        Err(notice) => {
            eprintln!("{notice}");
            None
        }
    }
}

/// `Ok` when the server at `url` answers with `sslmode=verify-full` against `ca`; otherwise
/// panics if `ci`, else returns the skip notice.
#[cfg(feature = "postgres-tls")]
pub fn check_postgres_tls(url: &str, ca: &std::path::Path, ci: bool) -> Result<(), String> {
    let url = with_query(
        url,
        &format!("sslmode=verify-full&sslrootcert={}", ca.display()),
    );
    let options = bevy_storage::backend::PostgresOptions::default();
    let Err(e) = bevy_storage::backend::PostgresBackend::open(&url, "test:ping", &options) else {
        return Ok(());
    };
    let shown = bevy_storage::config::redact_url(&url);
    if ci {
        panic!(
            "CI=true and PostgreSQL does not answer over TLS at {shown} ({e}): the TLS tests \
             must run under CI. .ci/postgres turns TLS on and writes the CA (see \
             DEVELOPERS.md); set POSTGRES_TLS_CA if it is elsewhere."
        );
    }
    let test = std::thread::current().name().unwrap_or("?").to_owned();
    Err(format!(
        "!!!!! SKIPPED {test}: no TLS PostgreSQL at {shown} ({e}). Run .ci/postgres or set \
         POSTGRES_TLS_CA to run the TLS tests; under CI=true this fails."
    ))
}

/// A namespace of its own for one fixture; its records are deleted on drop.
#[cfg(feature = "postgres")]
pub struct PostgresNamespace {
    pub url: String,
    pub namespace: String,
}

#[cfg(feature = "postgres")]
impl PostgresNamespace {
    /// A namespace no other test uses: `test:<16 random hex digits>`.
    pub fn fresh() -> Self {
        let mut bytes = [0u8; 8];
        getrandom::fill(&mut bytes).unwrap();
        let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        Self {
            url: postgres_url(),
            namespace: format!("test:{hex}"),
        }
    }
}

#[cfg(feature = "postgres")]
impl Drop for PostgresNamespace {
    fn drop(&mut self) {
        use bevy_storage::backend::{Backend, PostgresBackend, PostgresOptions};
        let removed =
            PostgresBackend::open(&self.url, &self.namespace, &PostgresOptions::default())
                .and_then(|backend| backend.clear());
        if let Err(e) = removed {
            eprintln!(
                "could not remove the PostgreSQL namespace {:?}: {e}",
                self.namespace
            );
        }
    }
}
