//! How a [`Store`](crate::Store) is set up: which backend, where, and with what limits.

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::backend::Backend;
#[cfg(feature = "sqlite")]
use crate::backend::sqlite::{SqliteOptions, SqliteSynchronous};
use crate::clock::{Clock, SystemClock};
use crate::codec::{Compression, EncryptionKey, Format};
use crate::error::{Result, StorageError};

mod url;
#[cfg(any(feature = "redis", feature = "postgres"))]
pub(crate) use url::split_namespace;
#[cfg(feature = "postgres-tls")]
use url::with_root_cert;
#[cfg(feature = "postgres")]
pub(crate) use url::{join_url, percent_decode};
pub use url::{redact_text, redact_url};

/// Default quota: 100 MiB.
pub const DEFAULT_MAX_SIZE: u64 = 100 * 1024 * 1024;
/// Default interval between TTL cleanups: one hour.
pub const DEFAULT_CLEANUP_INTERVAL: Duration = Duration::from_secs(3600);
/// Default number of pooled connections.
pub const DEFAULT_POOL_SIZE: u32 = 10;
/// Most entries of the read cache by default ([`StorageConfig::read_cache_capacity`](method@StorageConfig::read_cache_capacity)).
pub const DEFAULT_READ_CACHE_ENTRIES: usize = 1024;
/// Most bytes of the read cache by default ([`StorageConfig::read_cache_max_bytes`](method@StorageConfig::read_cache_max_bytes)).
pub const DEFAULT_READ_CACHE_BYTES: usize = 8 * 1024 * 1024;

/// Which backend holds the records, and where.
#[derive(Clone)]
#[non_exhaustive]
pub enum BackendConfig {
    /// In memory; gone when the process ends.
    Memory,
    /// One file per key under `root`.
    File {
        /// The directory (created if missing).
        root: PathBuf,
    },
    /// An embedded SQLite database file.
    #[cfg(feature = "sqlite")]
    Sqlite {
        /// The database file (parent directories are created).
        path: PathBuf,
        /// `synchronous = NORMAL` (default: survives a process crash) or `FULL` (power loss).
        synchronous: SqliteSynchronous,
    },
    /// A Redis server shared by several game servers (feature `redis`).
    #[cfg(feature = "redis")]
    Redis {
        /// `redis://[[user]:password@]host[:port][/db]` or `rediss://...` (TLS, feature
        /// `redis-tls`). `Debug` hides the password.
        url: String,
        /// The key prefix of this store: stores with different namespaces never see each
        /// other's records, stores with the same one share them.
        namespace: String,
    },
    /// A PostgreSQL database shared by several game servers (feature `postgres`).
    #[cfg(feature = "postgres")]
    Postgres {
        /// `postgres://[user[:password]@]host[:port]/dbname` (or `postgresql://`), with
        /// libpq's `sslmode` and `sslrootcert` for TLS (feature `postgres-tls`). `Debug`
        /// hides the password.
        url: String,
        /// The store's namespace: stores with the same one share their records.
        namespace: String,
    },
    /// A backend the game implements.
    Custom(Arc<dyn Backend>),
}

impl fmt::Debug for BackendConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Memory => f.write_str("Memory"),
            Self::File { root } => f.debug_struct("File").field("root", root).finish(),
            #[cfg(feature = "sqlite")]
            Self::Sqlite { path, synchronous } => f
                .debug_struct("Sqlite")
                .field("path", path)
                .field("synchronous", synchronous)
                .finish(),
            #[cfg(feature = "redis")]
            Self::Redis { url, namespace } => f
                .debug_struct("Redis")
                .field("url", &redact_url(url))
                .field("namespace", namespace)
                .finish(),
            #[cfg(feature = "postgres")]
            Self::Postgres { url, namespace } => f
                .debug_struct("Postgres")
                .field("url", &redact_url(url))
                .field("namespace", namespace)
                .finish(),
            Self::Custom(b) => write!(f, "Custom({})", b.backend_type()),
        }
    }
}

impl BackendConfig {
    /// The backend's type, as [`Backend::backend_type`] names it: `memory`, `file`, `sqlite`,
    /// `redis`, or a custom backend's own.
    pub fn backend_type(&self) -> String {
        match self {
            Self::Memory => "memory".to_owned(),
            Self::File { .. } => "file".to_owned(),
            #[cfg(feature = "sqlite")]
            Self::Sqlite { .. } => "sqlite".to_owned(),
            #[cfg(feature = "redis")]
            Self::Redis { .. } => "redis".to_owned(),
            #[cfg(feature = "postgres")]
            Self::Postgres { .. } => "postgres".to_owned(),
            Self::Custom(b) => b.backend_type().to_owned(),
        }
    }

    /// The connection string [`StorageConfig::from_url`] takes for this backend, with any
    /// password hidden: `memory:`, `file:DIR`, `sqlite:PATH`, or the server's URL with its
    /// `namespace` parameter; `custom:TYPE` for a game's own backend. The CLI names stores
    /// this way.
    pub fn url(&self) -> String {
        #[cfg(any(feature = "redis", feature = "postgres"))]
        let with_namespace = |url: &str, namespace: &str| {
            let url = redact_url(url);
            let join = if url.contains('?') { '&' } else { '?' };
            format!("{url}{join}namespace={namespace}")
        };
        match self {
            Self::Memory => "memory:".to_owned(),
            Self::File { root } => format!("file:{}", root.display()),
            #[cfg(feature = "sqlite")]
            Self::Sqlite { path, .. } => format!("sqlite:{}", path.display()),
            #[cfg(feature = "redis")]
            Self::Redis { url, namespace } => with_namespace(url, namespace),
            #[cfg(feature = "postgres")]
            Self::Postgres { url, namespace } => with_namespace(url, namespace),
            Self::Custom(b) => format!("custom:{}", b.backend_type()),
        }
    }

    /// A short description for logs and messages (`SQLite store at saves/storage.db`); a
    /// Redis password is hidden.
    pub fn describe(&self) -> String {
        match self {
            Self::Memory => "in-memory store".to_owned(),
            Self::File { root } => format!("file store at {}", root.display()),
            #[cfg(feature = "sqlite")]
            Self::Sqlite { path, .. } => format!("SQLite store at {}", path.display()),
            #[cfg(feature = "redis")]
            Self::Redis { url, namespace } => format!(
                "Redis store at {} (namespace {namespace:?})",
                redact_url(url)
            ),
            #[cfg(feature = "postgres")]
            Self::Postgres { url, namespace } => format!(
                "PostgreSQL store at {} (namespace {namespace:?})",
                redact_url(url)
            ),
            Self::Custom(b) => format!("custom {:?} store", b.backend_type()),
        }
    }
}

/// Everything a store needs to open. Build it with [`StorageConfig::sqlite`],
/// [`file`](StorageConfig::file), [`memory`](StorageConfig::memory),
/// [`custom`](StorageConfig::custom) or [`from_url`](StorageConfig::from_url), then adjust
/// with the builder methods.
///
/// ```
/// use bevy_storage::{StorageConfig, EncryptionKey};
/// use std::time::Duration;
/// let config = StorageConfig::memory()
///     .max_size(Some(10 * 1024 * 1024))
///     .default_ttl(Some(Duration::from_secs(3600)))
///     .encryption_key(EncryptionKey::from_passphrase("a long passphrase").unwrap())
///     .enable_encryption(true);
/// assert!(!format!("{config:?}").contains("long passphrase"));
/// ```
#[derive(Clone, Debug)]
pub struct StorageConfig {
    /// Where the records live.
    pub backend: BackendConfig,
    /// Quota on the total stored size in bytes (`None`: unlimited). Default 100 MiB. A write
    /// that would exceed it fails with `QuotaExceeded` and changes nothing.
    pub max_size: Option<u64>,
    /// TTL applied to saves that do not set one. Default: none (records never expire).
    pub default_ttl: Option<Duration>,
    /// Compression of saves and snapshots that do not choose their own. Default
    /// [`Compression::default()`]: `Lz4` with the `compression` feature, `Off` without.
    pub compression: Compression,
    /// Encrypt saves that do not say otherwise, and refuse to load records that are not
    /// encrypted. Default off. Needs `encryption_key`.
    ///
    /// What an encrypted store guarantees: a value that [`Store::load`](crate::Store::load)
    /// returns was sealed with the store's key under the key it is read from. Values are
    /// confidential and tamper-evident (AES-256-GCM): an edited, truncated or forged record,
    /// one copied from another key, and one written in plaintext by someone without the key
    /// are all errors ([`DecryptionFailed`](StorageError::DecryptionFailed),
    /// [`Corrupt`](StorageError::Corrupt), [`NotEncrypted`](StorageError::NotEncrypted)),
    /// never a value. Plaintext records (saved before encryption was on, or with
    /// `encrypt(false)`) are read only with
    /// [`LoadOptions::accept_plaintext`](crate::LoadOptions::accept_plaintext).
    ///
    /// What it does not: the metadata columns (custom metadata, times, expiry, sizes) are
    /// stored in the clear and are **not** authenticated, so never base a decision that
    /// matters on them (keep such fields inside the value); key names are visible; and a
    /// record can be rolled back to an older version of itself that was sealed with the same
    /// key under the same name, or deleted, by anyone who can write the file.
    pub enable_encryption: bool,
    /// The key for encrypted records. `Debug` never prints it.
    pub encryption_key: Option<EncryptionKey>,
    /// How often the plugin's TTL cleanup runs. Default one hour.
    pub cleanup_interval: Duration,
    /// Pooled connections for backends that pool (SQLite readers, Redis). Default 10.
    pub pool_size: u32,
    /// Serde format for values. Default RON (readable); `Format::Binary` is faster.
    pub format: Format,
    /// Serve repeated loads from memory for at most this long (`None`, the default: no time
    /// bound). On a backend without a change token (memory, file, Redis, PostgreSQL, a
    /// read-only SQLite store) this is the only cache, and writes by *other* processes are
    /// seen once an entry times out; saves, deletes, transactions and clears through the same
    /// `Store` invalidate it at once. With [`read_cache_validated`](field@Self::read_cache_validated)
    /// it only adds a time bound.
    pub read_cache_ttl: Option<Duration>,
    /// Keep recent loads in memory for as long as the backend's
    /// [change token](crate::Backend::change_token) shows that nothing was committed since,
    /// by this process or any other. Default `true`; it takes effect only on backends that
    /// have a token: SQLite in WAL mode (every store this crate opens for writing), where the
    /// token is SQLite's wal-index header in shared memory, read without a lock or a system
    /// call. A write by another process is never hidden: it changes the token before any
    /// reader can see the new value, and the next load empties the cache. This store's own
    /// writes drop only the keys they write (when no one else committed meanwhile). A load
    /// with [`LoadOptions::update_access_time`](crate::LoadOptions::update_access_time)
    /// writes the access time, which empties the cache like any other commit.
    pub read_cache_validated: bool,
    /// Most entries the read cache holds. Default 1024. 0 turns every read cache off. A key
    /// enters the cache on its second load (the first only marks it), so that records read
    /// once neither pay for a copy into the cache nor push the hot ones out.
    pub read_cache_capacity: usize,
    /// Most bytes the read cache holds: decoded payloads, keys, and 128 bytes per entry.
    /// Default 8 MiB; a payload above an eighth of it is never kept. 0 turns every read
    /// cache off.
    pub read_cache_max_bytes: usize,
    /// Source of the current time (a [`ManualClock`](crate::clock::ManualClock) in tests).
    pub clock: Arc<dyn Clock>,
    /// Open the store for reading only (file and SQLite stores). Default false. See
    /// [`read_only`](Self::read_only).
    pub read_only: bool,
}

impl StorageConfig {
    /// A config with every default and the given backend.
    pub fn new(backend: BackendConfig) -> Self {
        Self {
            backend,
            max_size: Some(DEFAULT_MAX_SIZE),
            default_ttl: None,
            compression: Compression::default(),
            enable_encryption: false,
            encryption_key: None,
            cleanup_interval: DEFAULT_CLEANUP_INTERVAL,
            pool_size: DEFAULT_POOL_SIZE,
            format: Format::Ron,
            read_cache_ttl: None,
            read_cache_validated: true,
            read_cache_capacity: DEFAULT_READ_CACHE_ENTRIES,
            read_cache_max_bytes: DEFAULT_READ_CACHE_BYTES,
            clock: Arc::new(SystemClock),
            read_only: false,
        }
    }

    /// An in-memory store.
    pub fn memory() -> Self {
        Self::new(BackendConfig::Memory)
    }

    /// A store with one file per key under `root`.
    pub fn file(root: impl Into<PathBuf>) -> Self {
        Self::new(BackendConfig::File { root: root.into() })
    }

    /// An embedded SQLite store at `path`.
    #[cfg(feature = "sqlite")]
    pub fn sqlite(path: impl Into<PathBuf>) -> Self {
        Self::new(BackendConfig::Sqlite {
            path: path.into(),
            synchronous: SqliteSynchronous::default(),
        })
    }

    /// A store in the Redis server at `url` (`redis://[:password@]host[:port][/db]`), under
    /// `namespace`. Needs the `redis` feature.
    #[cfg(feature = "redis")]
    pub fn redis(url: impl Into<String>, namespace: impl Into<String>) -> Self {
        Self::new(BackendConfig::Redis {
            url: url.into(),
            namespace: namespace.into(),
        })
    }

    /// The game's store in the per-user data directory of the platform, for the application
    /// identifier `id` (a reverse domain name such as `com.studio.game`): an embedded SQLite
    /// database `storage.db` there (a file store `storage` without the `sqlite` feature),
    /// created when the store first opens. `BEVY_STORAGE_DIR`, when set, replaces the
    /// directory. Where that is on each platform and the identifier rule:
    /// [`app_dir`](crate::app_dir).
    ///
    /// Fails with [`StorageError::InvalidAppId`] for an
    /// identifier that breaks the rule, or `Config` when the user has no data directory.
    ///
    /// ```no_run
    /// # use bevy_storage::prelude::*;
    /// // ~/.local/share/game/storage.db on Linux, %APPDATA%\studio\game\data\storage.db on
    /// // Windows, ~/Library/Application Support/com.studio.game/storage.db on macOS
    /// let store = Store::open(StorageConfig::for_app("com.studio.game")?)?;
    /// # Ok::<(), StorageError>(())
    /// ```
    pub fn for_app(id: &str) -> Result<Self> {
        let path = crate::app_dir::store_path(id)?;
        #[cfg(feature = "sqlite")]
        {
            Ok(Self::sqlite(path))
        }
        #[cfg(not(feature = "sqlite"))]
        {
            Ok(Self::file(path))
        }
    }

    /// A store over the game's own backend.
    pub fn custom(backend: impl Backend) -> Self {
        Self::new(BackendConfig::Custom(Arc::new(backend)))
    }

    /// A store from a connection string: `memory:`, `file:PATH`, `sqlite:PATH`
    /// (or `sqlite://PATH`), `redis://[:password@]host[:port][/db][?namespace=NAME]` or
    /// `rediss://...` (the namespace defaults to `bevy_storage`).
    pub fn from_url(url: &str) -> Result<Self> {
        let (scheme, rest) = url.split_once(':').ok_or_else(|| {
            StorageError::Config(format!(
                "{:?} has no scheme: use memory:, file:PATH or sqlite:PATH",
                redact_url(url)
            ))
        })?;
        let rest = rest.strip_prefix("//").unwrap_or(rest);
        match scheme {
            "memory" => Ok(Self::memory()),
            "file" if !rest.is_empty() => Ok(Self::file(rest)),
            #[cfg(feature = "sqlite")]
            "sqlite" if !rest.is_empty() => Ok(Self::sqlite(rest)),
            "file" | "sqlite" => Err(StorageError::Config(format!(
                "{:?} names no path",
                redact_url(url)
            ))),
            #[cfg(feature = "redis")]
            "redis" | "rediss" => {
                let (url, namespace) =
                    split_namespace(url, crate::backend::redis::DEFAULT_NAMESPACE);
                Ok(Self::redis(url, namespace))
            }
            #[cfg(feature = "postgres")]
            "postgres" | "postgresql" => {
                let (url, namespace) =
                    split_namespace(url, crate::backend::postgres::DEFAULT_NAMESPACE);
                Ok(Self::postgres(url, namespace))
            }
            #[cfg(not(feature = "postgres"))]
            "postgres" | "postgresql" => Err(StorageError::FeatureDisabled {
                feature: "postgres",
                what: "a postgres:// store".into(),
            }),
            #[cfg(not(feature = "redis"))]
            "redis" | "rediss" => Err(StorageError::FeatureDisabled {
                feature: "redis",
                what: "a redis:// store".into(),
            }),
            other => Err(StorageError::Config(format!(
                "unknown or disabled backend {other:?} in {:?}",
                redact_url(url)
            ))),
        }
    }

    /// A store in the PostgreSQL database at `url`
    /// (`postgres://[user[:password]@]host[:port]/dbname`), under `namespace`. Needs the
    /// `postgres` feature. TLS follows libpq's `sslmode` and `sslrootcert` URL parameters
    /// (feature `postgres-tls`; see [TLS](crate::backend::postgres#tls)) or
    /// [`postgres_root_cert`](Self::postgres_root_cert).
    #[cfg(feature = "postgres")]
    pub fn postgres(url: impl Into<String>, namespace: impl Into<String>) -> Self {
        Self::new(BackendConfig::Postgres {
            url: url.into(),
            namespace: namespace.into(),
        })
    }

    /// PostgreSQL only (feature `postgres-tls`): check the server's TLS certificate against
    /// the CA certificates in the PEM file `path`. Sets the URL's `sslrootcert` (replacing
    /// one there) and, when the URL names no `sslmode`, `sslmode=verify-full`: the chain and
    /// the host name are checked, and the connection is never plaintext. An `sslmode` in the
    /// URL is kept (`require` then checks the chain but not the host name, as libpq's
    /// `verify-ca`). Needs a `postgres://` URL, not a `key=value` string; other backends
    /// ignore it. The path shows in `Debug` and messages (it is no secret).
    ///
    /// ```
    /// use bevy_storage::{BackendConfig, StorageConfig};
    /// let config = StorageConfig::postgres("postgres://game@db.example/saves", "eu")
    ///     .postgres_root_cert("/etc/game/db-ca.pem");
    /// let BackendConfig::Postgres { url, .. } = &config.backend else { unreachable!() };
    /// assert_eq!(
    ///     url,
    ///     "postgres://game@db.example/saves?sslrootcert=/etc/game/db-ca.pem&sslmode=verify-full"
    /// );
    /// ```
    #[cfg(feature = "postgres-tls")]
    pub fn postgres_root_cert(mut self, path: impl AsRef<std::path::Path>) -> Self {
        if let BackendConfig::Postgres { url, .. } = &mut self.backend {
            *url = with_root_cert(url, &path.as_ref().to_string_lossy());
        }
        self
    }

    /// Sets the quota in bytes (`None`: unlimited).
    pub fn max_size(mut self, bytes: Option<u64>) -> Self {
        self.max_size = bytes;
        self
    }

    /// Sets the TTL for saves that do not set their own.
    pub fn default_ttl(mut self, ttl: Option<Duration>) -> Self {
        self.default_ttl = ttl;
        self
    }

    /// Sets the compression of saves and snapshots that do not choose their own.
    pub fn compression(mut self, compression: Compression) -> Self {
        self.compression = compression;
        self
    }

    /// Compress saves by default (`true`: [`Compression::Lz4`]).
    #[deprecated(note = "use `compression(Compression::Lz4)` or `compression(Compression::Off)`")]
    pub fn enable_compression(self, on: bool) -> Self {
        self.compression(Compression::from(on))
    }

    /// Encrypt saves by default and refuse plaintext records on load (needs
    /// [`encryption_key`](Self::encryption_key); see
    /// [the field](StorageConfig#structfield.enable_encryption) for what it guarantees).
    pub fn enable_encryption(mut self, on: bool) -> Self {
        self.enable_encryption = on;
        self
    }

    /// Sets the encryption key. Records can be encrypted per save even when
    /// `enable_encryption` is off.
    pub fn encryption_key(mut self, key: EncryptionKey) -> Self {
        self.encryption_key = Some(key);
        self
    }

    /// Sets the plugin's TTL cleanup interval.
    pub fn cleanup_interval(mut self, every: Duration) -> Self {
        self.cleanup_interval = every;
        self
    }

    /// Sets the number of pooled connections.
    pub fn pool_size(mut self, n: u32) -> Self {
        self.pool_size = n;
        self
    }

    /// Sets the serde format of values.
    pub fn format(mut self, format: Format) -> Self {
        self.format = format;
        self
    }

    /// Serves loads from memory for at most `ttl` after they were read (`None`, the default:
    /// no time bound): on backends without a change token this turns the read cache on, and
    /// other processes' writes are seen once an entry times out. Takes an `Option` like
    /// [`max_size`](Self::max_size) and [`default_ttl`](Self::default_ttl), so one call sets
    /// either state (from a settings file, say), the same on the plugin builder. SQLite stores
    /// cache without it ([`read_cache_validated`](field@Self::read_cache_validated)).
    pub fn read_cache(mut self, ttl: Option<Duration>) -> Self {
        self.read_cache_ttl = ttl;
        self
    }

    /// Turns the cache validated by the backend's change token on (the default) or off: see
    /// [`read_cache_validated`](field@Self::read_cache_validated).
    pub fn read_cache_validated(mut self, on: bool) -> Self {
        self.read_cache_validated = on;
        self
    }

    /// Sets how many entries the read cache holds (0: no read cache at all).
    pub fn read_cache_capacity(mut self, entries: usize) -> Self {
        self.read_cache_capacity = entries;
        self
    }

    /// Sets how many bytes the read cache holds (0: no read cache at all).
    pub fn read_cache_max_bytes(mut self, bytes: usize) -> Self {
        self.read_cache_max_bytes = bytes;
        self
    }

    /// Sets the clock.
    pub fn clock(mut self, clock: impl Clock) -> Self {
        self.clock = Arc::new(clock);
        self
    }

    /// SQLite only: `synchronous = FULL`, so acknowledged writes also survive power loss.
    #[cfg(feature = "sqlite")]
    pub fn sqlite_synchronous(mut self, sync: SqliteSynchronous) -> Self {
        if let BackendConfig::Sqlite { synchronous, .. } = &mut self.backend {
            *synchronous = sync;
        }
        self
    }

    /// Opens a file or SQLite store for reading only: loads, `exists`, `list_keys`, metadata
    /// and stats work, and every write (save, delete, clear, transaction, purge, a load that
    /// updates the access time) fails with [`StorageError::ReadOnly`] and changes nothing.
    /// The file backend then takes no lock and creates nothing; SQLite opens the database
    /// read-only (`immutable` on a read-only medium). A store whose medium refuses writes (a
    /// read-only mount) opens read-only by itself, and
    /// [`StorageStats::read_only`](crate::StorageStats::read_only) says why. Other backends
    /// refuse the option with [`StorageError::Config`].
    ///
    /// ```
    /// use bevy_storage::{SaveOptions, StorageConfig, StorageError, Store};
    /// let dir = tempfile::tempdir().unwrap();
    /// Store::open(StorageConfig::file(dir.path()))?.save("k", &1, &SaveOptions::default())?;
    /// let store = Store::open(StorageConfig::file(dir.path()).read_only(true))?;
    /// assert_eq!(store.load::<i32>("k", &Default::default())?, Some(1));
    /// let err = store.save("k", &2, &SaveOptions::default()).unwrap_err();
    /// assert!(matches!(err, StorageError::ReadOnly { .. }));
    /// # Ok::<(), StorageError>(())
    /// ```
    pub fn read_only(mut self, on: bool) -> Self {
        self.read_only = on;
        self
    }

    /// Opens the configured backend.
    pub(crate) fn open_backend(&self) -> Result<Arc<dyn Backend>> {
        if self.pool_size == 0 {
            return Err(StorageError::Config("pool_size must be at least 1".into()));
        }
        let supports_read_only = match &self.backend {
            BackendConfig::File { .. } => true,
            #[cfg(feature = "sqlite")]
            BackendConfig::Sqlite { .. } => true,
            _ => false,
        };
        if self.read_only && !supports_read_only {
            return Err(StorageError::Config(format!(
                "read_only is supported by file and SQLite stores, not by a {}",
                self.backend.describe()
            )));
        }
        Ok(match &self.backend {
            BackendConfig::Memory => Arc::new(crate::backend::MemoryBackend::new()),
            BackendConfig::File { root } => Arc::new(crate::backend::FileBackend::open_with(
                root,
                crate::backend::file::FileOptions {
                    read_only: self.read_only,
                },
            )?),
            #[cfg(feature = "sqlite")]
            BackendConfig::Sqlite { path, synchronous } => {
                let options = SqliteOptions {
                    synchronous: *synchronous,
                    pool_size: self.pool_size,
                    read_only: self.read_only,
                    ..SqliteOptions::default()
                };
                Arc::new(crate::backend::SqliteBackend::open(path, &options)?)
            }
            #[cfg(feature = "redis")]
            BackendConfig::Redis { url, namespace } => {
                let options = crate::backend::RedisOptions {
                    pool_size: self.pool_size,
                    ..crate::backend::RedisOptions::default()
                };
                let backend = crate::backend::RedisBackend::open(url, namespace, &options)?;
                Arc::new(backend)
            }
            #[cfg(feature = "postgres")]
            BackendConfig::Postgres { url, namespace } => {
                let options = crate::backend::PostgresOptions {
                    pool_size: self.pool_size,
                    ..crate::backend::PostgresOptions::default()
                };
                let backend = crate::backend::PostgresBackend::open(url, namespace, &options)?;
                Arc::new(backend)
            }
            BackendConfig::Custom(backend) => Arc::clone(backend),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A backend's `url` is what `from_url` takes back, with the password hidden.
    #[test]
    fn a_backends_url_opens_the_same_backend() {
        let mut urls = vec!["memory:", "file:saves/x"];
        if cfg!(feature = "sqlite") {
            urls.push("sqlite:saves/a b.db");
        }
        if cfg!(feature = "redis") {
            urls.push("redis://host:6380/2?namespace=game:eu");
        }
        if cfg!(feature = "postgres") {
            urls.push("postgres://host/db?namespace=eu");
        }
        for url in urls {
            let config = StorageConfig::from_url(url).unwrap();
            assert_eq!(config.backend.url(), url);
            let again = StorageConfig::from_url(&config.backend.url()).unwrap();
            assert_eq!(again.backend.describe(), config.backend.describe());
        }
        #[cfg(feature = "redis")]
        {
            let config = StorageConfig::from_url("redis://:hunter2@host/0").unwrap();
            assert_eq!(
                config.backend.url(),
                "redis://:***@host/0?namespace=bevy_storage"
            );
        }
    }

    /// The builder's CA file replaces one the URL had, keeps its `sslmode` and the rest of
    /// the query, and is percent-encoded.
    #[cfg(feature = "postgres-tls")]
    #[test]
    fn postgres_root_cert_edits_the_url() {
        let url_of = |config: StorageConfig| match config.backend {
            BackendConfig::Postgres { url, .. } => url,
            other => panic!("{other:?}"),
        };
        let config = StorageConfig::from_url(
            "postgres://u:pw@h/db?sslrootcert=/old.pem&sslmode=require&namespace=n#x",
        )
        .unwrap()
        .postgres_root_cert("/etc/my ca&.pem");
        assert_eq!(
            url_of(config),
            "postgres://u:pw@h/db?sslmode=require&sslrootcert=/etc/my%20ca%26.pem#x"
        );
        let config = StorageConfig::postgres("postgres://h/db", "n").postgres_root_cert("ca.pem");
        assert_eq!(
            url_of(config),
            "postgres://h/db?sslrootcert=ca.pem&sslmode=verify-full"
        );
    }

    /// Every form a credential can take in a URL: whatever the characters of the password,
    /// encoded or not, the redacted URL holds none of it and keeps what locates the server.
    #[test]
    fn redaction_table() {
        let table: &[(&str, &str, &[&str])] = &[
            (
                "redis://:hunter2@host:6379/1",
                "redis://:***@host:6379/1",
                &["hunter2"],
            ),
            (
                "redis://:s3/cr3t@host",
                "redis://:***@host",
                &["s3/cr3t", "cr3t"],
            ),
            (
                "redis://alice:p@ss:w@rd@host/0?protocol=resp3",
                "redis://alice:***@host/0?protocol=resp3",
                &["p@ss", "w@rd"],
            ),
            (
                "rediss://bob:a?b#c@host:6380",
                "rediss://bob:***@host:6380",
                &["a?b#c"],
            ),
            (
                "redis://:pct%2Fenc%40pw@host",
                "redis://:***@host",
                &["pct%2Fenc%40pw", "pct/enc@pw"],
            ),
            (
                "redis://only-a-secret@host",
                "redis://***@host",
                &["only-a-secret"],
            ),
            (
                "redis://we/ird:pw@host",
                "redis://***@host",
                &["we/ird", "pw@"],
            ),
            ("redis://user:@host", "redis://user:***@host", &[]),
            (
                "redis:pw-no-slashes@host",
                "redis:***@host",
                &["pw-no-slashes"],
            ),
            (
                "postgres://u:pg!pw@db:5432/test?sslmode=require",
                "postgres://u:***@db:5432/test?sslmode=require",
                &["pg!pw"],
            ),
            (
                "postgres://db/test?user=u&password=qwerty&sslmode=disable",
                "postgres://db/test?user=u&password=***&sslmode=disable",
                &["qwerty"],
            ),
            (
                "redis://host/0?Token=t0k3n#frag",
                "redis://host/0?Token=***#frag",
                &["t0k3n"],
            ),
            ("redis://host:6379", "redis://host:6379", &[]),
            ("sqlite:saves/storage.db", "sqlite:saves/storage.db", &[]),
            ("file:saves/dir", "file:saves/dir", &[]),
            ("memory:", "memory:", &[]),
            ("no scheme at all", "no scheme at all", &[]),
        ];
        for (url, redacted, secrets) in table {
            let got = redact_url(url);
            assert_eq!(&got, redacted, "{url}");
            for secret in *secrets {
                assert!(!got.contains(secret), "{url} -> {got} leaks {secret}");
            }
            // Redacting twice changes nothing more.
            assert_eq!(redact_url(&got), got, "{url}");
        }
    }

    #[test]
    fn client_messages_lose_every_spelling_of_the_password() {
        let url = "redis://:pct%2Fenc%40pw@host";
        let message = "could not connect with password pct/enc@pw (pct%2Fenc%40pw)";
        let clean = redact_text(message, url);
        assert!(
            !clean.contains("pct/enc@pw") && !clean.contains("pct%2Fenc%40pw"),
            "{clean}"
        );
        assert_eq!(
            redact_text("no secret here", "redis://host"),
            "no secret here"
        );
    }
}
