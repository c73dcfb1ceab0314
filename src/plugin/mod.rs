//! The Bevy integration: [`StoragePlugin`], request and response messages, TTL cleanup,
//! [`StorageStats`], write batching and persistent resources.
//!
//! ```no_run
//! use bevy::prelude::*;
//! use bevy_storage::prelude::*;
//! use serde::{Deserialize, Serialize};
//!
//! #[derive(Serialize, Deserialize, Clone, Debug)]
//! struct Player { name: String, gold: u32 }
//!
//! fn main() {
//!     App::new()
//!         .add_plugins(MinimalPlugins)
//!         .add_plugins(StoragePlugin) // embedded SQLite at saves/storage.db
//!         .add_systems(Startup, |mut saves: MessageWriter<SaveRequest>, mut loads: MessageWriter<LoadRequest>| {
//!             saves.write(SaveRequest::new("player:ada", Player { name: "Ada".into(), gold: 120 }));
//!             loads.write(LoadRequest::new("player:ada")); // same key: runs after the save
//!         })
//!         .add_observer(|done: On<LoadCompleted>| {
//!             match done.decode::<Player>() {
//!                 Ok(Some(player)) => info!("loaded {player:?}"),
//!                 Ok(None) => info!("nothing saved under {}", done.key),
//!                 Err(e) => error!("load of {} failed: {e}", done.key),
//!             }
//!         })
//!         .run();
//! }
//! ```
//!
//! # How it runs
//! - Requests are [messages](requests). The [`StorageSystems::Dispatch`] system (in `Last`)
//!   reads every request sent during the frame, in [`RequestId`] order, and hands them to a
//!   scheduler. Serialization, compression, encryption and backend I/O run on the
//!   [`AsyncComputeTaskPool`](bevy::tasks::AsyncComputeTaskPool); the main thread only moves
//!   requests in and results out, so a slow backend never lengthens a frame.
//! - Requests that touch the same key run one after another, in id order (a save followed by
//!   a load of that key sees the saved value); requests for different keys run in parallel.
//!   A [`ClearRequest`] waits for everything before it and holds back everything after it;
//!   a listing waits for the requests on keys it could list.
//! - Results are delivered by [`StorageSystems::Collect`] (in `PreUpdate`): each request gets
//!   exactly one response with its id, written as a message *and* triggered as an observer
//!   event. Nothing fails silently: bad keys, wrong encryption keys, backend failures, a
//!   store that could not be opened and even a panicking `Serialize` impl all come back as
//!   an `Err` in the response.
//! - On [`AppExit`], [`StorageSystems::Flush`] blocks until every request already sent has
//!   finished (bounded by [`StoragePluginBuilder::exit_timeout`]) and delivers the results:
//!   a game that saves and quits in the same frame loses nothing. Dropping the app without
//!   `AppExit` also waits for requests already dispatched.
//! - The store is opened on the task pool too (SQLite open, Argon2 key derivation). Requests
//!   sent meanwhile wait for it. If it cannot be opened, the error is logged once, the
//!   [`StorageStats`] resource reports `is_healthy: false` with the error, and every request
//!   is answered with that error.
//! - Every `cleanup_interval` (real time; [`StorageConfig::cleanup_interval`], default one
//!   hour) expired records are purged on the pool and an [`ExpiredPurged`] report is sent.
//! - [`StorageStats`] is refreshed on the pool every `stats_interval` (default 1 s) and after
//!   each cleanup; [`StorageActivity`] counts the plugin's own work every frame.
//!
//! # Optional layers
//! - **Read cache**: on by default for SQLite, where decoded loads stay in memory while
//!   SQLite's change token shows no commit by anyone (another process's writes are never
//!   hidden; [`StoragePluginBuilder::read_cache_validated`]); on other backends
//!   [`StoragePluginBuilder::read_cache`] keeps them for a while, and every save, delete,
//!   transaction and clear through the store invalidates it. [`StorageStats::cache`] reports
//!   hits and misses.
//! - **Write batching**: [`StoragePluginBuilder::batch_writes`] commits the saves and deletes
//!   sent within a frame (or a time window) as one backend transaction. Each request's
//!   response reports the outcome of that commit: if the commit fails, every request in it
//!   gets the error. Requests stay ordered per key: a write never joins a batch ahead of an
//!   earlier request for its key. Saves with `overwrite(false)` and writes with an invalid
//!   key never join a batch, so their (expected) failure cannot fail other saves.
//! - **Persistent resources**: [`PersistResourceExt::persist_resource`].

mod commands;
mod kind;
mod persistent;
pub mod requests;
mod resources;
mod runtime;
mod scheduler;
mod scope;
mod systems;
mod take;
pub mod world;

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bevy::app::AppExit;
use bevy::prelude::*;

pub use commands::StorageCommandsExt;
pub use persistent::{
    PersistCommandsExt, PersistOptions, PersistResourceExt, PersistState, resource_loaded,
};
pub use requests::{
    ClearCompleted, ClearRequest, DeleteCompleted, DeleteRequest, ExistsCompleted, ExistsRequest,
    ExpiredPurged, ListKeysCompleted, ListKeysRequest, LoadCompleted, LoadRequest, LoadedValue,
    PersistedResourceLoaded, PersistedResourceSaved, RequestId, SaveCompleted, SaveRequest,
    SharedError, StorageResponse, StorageResult, TransactionCompleted, TransactionRequest,
};
pub(crate) use resources::StorageRuntime;
#[allow(deprecated)]
pub use resources::StorageSet;
pub use resources::{Storage, StorageActivity, StorageState, StorageSystems, storage_ready};
pub use take::{TakeCompleted, TakeRequest};

#[allow(deprecated)]
pub use world::SnapshotSet;
pub use world::{
    Autosave, ListSlots, LoadWorld, SaveWorld, SlotsListed, SnapshotAppExt, SnapshotMetadata,
    SnapshotPlugin, SnapshotSystems, WorldLoaded, WorldSaved, WorldSlot,
};

use crate::backend::Backend;
use crate::clock::Clock;
use crate::codec::{Compression, EncryptionKey, Format};
use crate::config::StorageConfig;
use crate::store::{StorageStats, Store};
use runtime::Runtime;
use scheduler::OpenSource;

/// Where the default [`StoragePlugin`] keeps its SQLite database.
pub const DEFAULT_SQLITE_PATH: &str = "saves/storage.db";
/// Where the default [`StoragePlugin`] keeps its files when built without the `sqlite` feature.
pub const DEFAULT_FILE_ROOT: &str = "saves/storage";
/// How long the exit flush waits for outstanding requests by default.
pub const DEFAULT_EXIT_TIMEOUT: Duration = Duration::from_secs(30);

/// The storage plugin with its defaults: an embedded SQLite store at
/// [`DEFAULT_SQLITE_PATH`] (directories created), or a file store at [`DEFAULT_FILE_ROOT`]
/// without the `sqlite` feature.
///
/// ```no_run
/// # use bevy::prelude::*;
/// # use bevy_storage::prelude::*;
/// # use bevy_storage::WriteBatching;
/// # use std::time::Duration;
/// App::new().add_plugins((MinimalPlugins, StoragePlugin));
/// // or configured:
/// App::new().add_plugins((
///     MinimalPlugins,
///     StoragePlugin::file("saves/slot1")
///         .default_ttl(Some(Duration::from_secs(30 * 86_400)))
///         .cleanup_interval(Duration::from_secs(600))
///         .read_cache(Some(Duration::from_secs(5)))
///         .batch_writes(WriteBatching::PerFrame),
/// ));
/// ```
///
/// The associated functions return a [`StoragePluginBuilder`], which is a plugin too.
#[derive(Debug, Clone, Copy, Default)]
pub struct StoragePlugin;

impl StoragePlugin {
    /// The store configuration the bare `StoragePlugin` uses.
    pub fn default_config() -> StorageConfig {
        #[cfg(feature = "sqlite")]
        {
            StorageConfig::sqlite(DEFAULT_SQLITE_PATH)
        }
        #[cfg(not(feature = "sqlite"))]
        {
            StorageConfig::file(DEFAULT_FILE_ROOT)
        }
    }

    /// A plugin over an embedded SQLite database at `path` (parent directories created).
    #[cfg(feature = "sqlite")]
    pub fn sqlite(path: impl Into<PathBuf>) -> StoragePluginBuilder {
        Self::config(StorageConfig::sqlite(path))
    }

    /// A plugin over the game's store in the per-user data directory of the platform, for
    /// the application identifier `id` (a reverse domain name such as `com.studio.game`);
    /// see [`StorageConfig::for_app`] and [`app_dir`](crate::app_dir) for where that is, the
    /// identifier rule and the `BEVY_STORAGE_DIR` override. The directory is logged once
    /// (`info!`) when the plugin is added. An invalid identifier does not panic: the store
    /// fails to open with [`StorageError::InvalidAppId`](crate::StorageError::InvalidAppId), reported as every open failure is
    /// (the log, `StorageStats`, an error response to every request).
    ///
    /// Use it for a shipped game (installed read-only, or shared by several users of one
    /// machine); the bare [`StoragePlugin`] keeps `saves/storage.db` in the working directory.
    ///
    /// ```no_run
    /// # use bevy::prelude::*;
    /// # use bevy_storage::prelude::*;
    /// App::new().add_plugins((MinimalPlugins, StoragePlugin::for_app("com.studio.game")));
    /// ```
    pub fn for_app(id: &str) -> StoragePluginBuilder {
        match StorageConfig::for_app(id) {
            Ok(config) => StoragePluginBuilder {
                app: Some(id.to_owned()),
                ..Self::config(config)
            },
            Err(error) => StoragePluginBuilder {
                app: Some(id.to_owned()),
                app_error: Some(Arc::new(error)),
                ..Self::builder()
            },
        }
    }

    /// A plugin over a file store (one file per key) under `root`.
    pub fn file(root: impl Into<PathBuf>) -> StoragePluginBuilder {
        Self::config(StorageConfig::file(root))
    }

    /// A plugin over an in-memory store (nothing survives the process; for tests and tools).
    pub fn memory() -> StoragePluginBuilder {
        Self::config(StorageConfig::memory())
    }

    /// A plugin over a Redis server at `url`, under `namespace` (feature `redis`). An
    /// unreachable server is reported like any open failure.
    #[cfg(feature = "redis")]
    pub fn redis(url: impl Into<String>, namespace: impl Into<String>) -> StoragePluginBuilder {
        Self::config(StorageConfig::redis(url, namespace))
    }

    /// A plugin over the game's own [`Backend`].
    pub fn custom(backend: impl Backend) -> StoragePluginBuilder {
        Self::config(StorageConfig::custom(backend))
    }

    /// A plugin with a complete [`StorageConfig`] (backend and every option).
    pub fn config(config: StorageConfig) -> StoragePluginBuilder {
        StoragePluginBuilder {
            config,
            store: None,
            app: None,
            app_error: None,
            store_options_set: false,
            batching: WriteBatching::Off,
            stats_interval: systems::DEFAULT_STATS_INTERVAL,
            exit_timeout: DEFAULT_EXIT_TIMEOUT,
        }
    }

    /// A plugin over a store the game already opened (for example to share it with a tool
    /// thread). The store's own options are fixed; the plugin options (batching, intervals)
    /// still apply.
    pub fn store(store: Store) -> StoragePluginBuilder {
        StoragePluginBuilder {
            store: Some(store),
            ..Self::config(StorageConfig::memory())
        }
    }

    /// The default plugin as a builder, to change some options.
    pub fn builder() -> StoragePluginBuilder {
        Self::config(Self::default_config())
    }
}

impl Plugin for StoragePlugin {
    fn build(&self, app: &mut App) {
        Self::builder().build(app);
    }
}

/// How saves and deletes are grouped into backend transactions.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum WriteBatching {
    /// Every write is its own commit. The default.
    #[default]
    Off,
    /// The writes sent during one frame are committed together.
    PerFrame,
    /// The writes sent within this window (real time, from the first write of the batch)
    /// are committed together. Requests for a key in an open batch wait for its commit.
    Window(Duration),
}

/// A configured [`StoragePlugin`]: backend, every [`StorageConfig`] option and the plugin's
/// own options. Reached from [`StoragePlugin::sqlite`], [`file`](StoragePlugin::file),
/// [`memory`](StoragePlugin::memory), [`custom`](StoragePlugin::custom),
/// [`config`](StoragePlugin::config) or [`store`](StoragePlugin::store).
#[derive(Debug, Clone)]
pub struct StoragePluginBuilder {
    config: StorageConfig,
    store: Option<Store>,
    /// The application identifier of [`StoragePlugin::for_app`].
    app: Option<String>,
    /// Why [`StoragePlugin::for_app`] could not make its configuration.
    app_error: Option<SharedError>,
    store_options_set: bool,
    batching: WriteBatching,
    stats_interval: Duration,
    exit_timeout: Duration,
}

impl StoragePluginBuilder {
    fn store_option(mut self, f: impl FnOnce(StorageConfig) -> StorageConfig) -> Self {
        self.config = f(self.config);
        self.store_options_set = true;
        self
    }

    /// The store configuration so far.
    pub fn storage_config(&self) -> &StorageConfig {
        &self.config
    }

    /// Changes the store configuration with a function of it.
    pub fn map_config(self, f: impl FnOnce(StorageConfig) -> StorageConfig) -> Self {
        self.store_option(f)
    }

    /// Quota on the total stored size in bytes (`None`: unlimited).
    pub fn max_size(self, bytes: Option<u64>) -> Self {
        self.store_option(|c| c.max_size(bytes))
    }

    /// TTL of saves that do not set their own.
    pub fn default_ttl(self, ttl: Option<Duration>) -> Self {
        self.store_option(|c| c.default_ttl(ttl))
    }

    /// Compression of saves and snapshots that do not choose their own
    /// ([`StorageConfig::compression`]).
    pub fn compression(self, compression: Compression) -> Self {
        self.store_option(|c| c.compression(compression))
    }

    /// Encrypt every save by default with `key`.
    pub fn encryption(self, key: EncryptionKey) -> Self {
        self.store_option(|c| c.encryption_key(key).enable_encryption(true))
    }

    /// Sets the encryption key without encrypting by default (saves opt in with
    /// `encrypt(true)`).
    pub fn encryption_key(self, key: EncryptionKey) -> Self {
        self.store_option(|c| c.encryption_key(key))
    }

    /// Serde format of values.
    pub fn format(self, format: Format) -> Self {
        self.store_option(|c| c.format(format))
    }

    /// Opens the store read-only (file and SQLite stores): loads work, every write fails
    /// with [`StorageError::ReadOnly`](crate::StorageError::ReadOnly). See
    /// [`StorageConfig::read_only`](crate::StorageConfig::read_only).
    pub fn read_only(self, on: bool) -> Self {
        self.store_option(|c| c.read_only(on))
    }

    /// Pooled connections of backends that pool.
    pub fn pool_size(self, n: u32) -> Self {
        self.store_option(|c| c.pool_size(n))
    }

    /// The clock for TTLs and timestamps (a `ManualClock` in tests).
    pub fn clock(self, clock: impl Clock) -> Self {
        self.store_option(|c| c.clock(clock))
    }

    /// Serves repeated loads from memory for at most `ttl` (`None`: no time bound, the
    /// default); the only read cache of backends without a change token, a time bound on
    /// SQLite's validated one ([`StorageConfig::read_cache`]).
    pub fn read_cache(self, ttl: Option<Duration>) -> Self {
        self.store_option(|c| c.read_cache(ttl))
    }

    /// How many entries the read cache holds (0: none).
    pub fn read_cache_capacity(self, entries: usize) -> Self {
        self.store_option(|c| c.read_cache_capacity(entries))
    }

    /// Turns SQLite's read cache validated by its change token on (the default) or off
    /// ([`StorageConfig::read_cache_validated`](field@crate::StorageConfig::read_cache_validated)).
    pub fn read_cache_validated(self, on: bool) -> Self {
        self.store_option(|c| c.read_cache_validated(on))
    }

    /// SQLite only: the `synchronous` level.
    #[cfg(feature = "sqlite")]
    pub fn sqlite_synchronous(self, sync: crate::backend::sqlite::SqliteSynchronous) -> Self {
        self.store_option(|c| c.sqlite_synchronous(sync))
    }

    /// How often expired records are purged (real time). Default one hour.
    pub fn cleanup_interval(mut self, every: Duration) -> Self {
        self.config = self.config.cleanup_interval(every);
        self
    }

    /// Groups writes into transactions; see [`WriteBatching`].
    pub fn batch_writes(mut self, batching: WriteBatching) -> Self {
        self.batching = batching;
        self
    }

    /// How often [`StorageStats`] is refreshed (real time). Default 1 s; `Duration::ZERO`
    /// refreshes every frame (one refresh in flight at a time).
    pub fn stats_interval(mut self, every: Duration) -> Self {
        self.stats_interval = every;
        self
    }

    /// How long the exit flush waits for outstanding requests. Default 30 s.
    pub fn exit_timeout(mut self, timeout: Duration) -> Self {
        self.exit_timeout = timeout;
        self
    }
}

impl Plugin for StoragePluginBuilder {
    fn build(&self, app: &mut App) {
        assert!(
            !app.world().contains_resource::<StorageRuntime>(),
            "bevy_storage: a StoragePlugin was already added to this app; add it once (one store per app)"
        );
        if let Some(app) = &self.app {
            match &self.app_error {
                None => info!(
                    "bevy_storage: the saves of {app} are in {}",
                    runtime::describe(&self.config)
                ),
                Some(e) => error!("bevy_storage: no store for {app}: {e}"),
            }
        }
        let (source, description) = match (&self.store, &self.app_error) {
            (_, Some(error)) => (
                OpenSource::Failed(Arc::clone(error)),
                format!("for_app({:?})", self.app.as_deref().unwrap_or_default()),
            ),
            (Some(store), None) => {
                if self.store_options_set {
                    warn!(
                        "bevy_storage: StoragePlugin::store was given an open store; store options set on the plugin are ignored"
                    );
                }
                (OpenSource::Store(store.clone()), format!("{store:?}"))
            }
            (None, None) => (
                OpenSource::Config(Box::new(self.config.clone())),
                runtime::describe(&self.config),
            ),
        };
        let backend_type = match &self.store {
            Some(store) => store.backend().backend_type().to_owned(),
            None => backend_type(&self.config),
        };
        let cell = Arc::new(OnceLock::new());
        let storage = Storage {
            cell: Arc::clone(&cell),
        };
        let runtime = StorageRuntime {
            inner: Runtime::new(source, cell, self.batching, self.exit_timeout),
            description,
            cleanup_interval: self.config.cleanup_interval,
            stats_interval: self.stats_interval,
            last_cleanup: Duration::ZERO,
            last_stats: Duration::ZERO,
            stats_now: false,
            stats_in_flight: false,
            purge_in_flight: false,
        };
        let max_size = match &self.store {
            Some(_) => None,
            None => self.config.max_size,
        };

        requests::add_key_value_kinds(app);
        app.add_message::<ExpiredPurged>()
            .add_message::<PersistedResourceLoaded>()
            .add_message::<PersistedResourceSaved>()
            .add_message::<AppExit>()
            .insert_resource(storage)
            .insert_resource(StorageStats {
                backend_type,
                is_healthy: true,
                max_size,
                ..StorageStats::default()
            })
            .init_resource::<StorageActivity>()
            .insert_resource(runtime)
            .configure_sets(PreUpdate, StorageSystems::Collect)
            .configure_sets(
                Last,
                (
                    StorageSystems::Persist,
                    StorageSystems::Dispatch,
                    StorageSystems::Maintenance,
                    StorageSystems::Flush,
                )
                    .chain(),
            )
            .add_systems(PreStartup, systems::start_opening)
            .add_systems(
                PreUpdate,
                systems::collect_results.in_set(StorageSystems::Collect),
            )
            .add_systems(
                Last,
                (
                    (systems::dispatch_requests, systems::update_activity)
                        .chain()
                        .in_set(StorageSystems::Dispatch),
                    systems::run_maintenance.in_set(StorageSystems::Maintenance),
                    systems::flush_on_exit
                        .run_if(on_message::<AppExit>)
                        .in_set(StorageSystems::Flush),
                ),
            );
    }
}

fn backend_type(config: &StorageConfig) -> String {
    config.backend.backend_type()
}
