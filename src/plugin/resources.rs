//! What the plugin shares with the game and with its own systems: the [`Storage`] resource
//! (the store, once open), [`StorageActivity`], the system sets [`StorageSystems`] and the
//! run condition [`storage_ready`], and the main-thread state behind them.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bevy::prelude::*;

use super::requests::SharedError;
use super::runtime::Runtime;
use crate::error::StorageError;
use crate::store::Store;

/// The plugin's systems, to order a game's own systems around them.
///
/// | Set | Schedule | What |
/// |-----|----------|------|
/// | `Collect` | `PreUpdate` | responses delivered (messages written, observers run), stats updated |
/// | `Persist` | `Last` | changed persisted resources queue their saves |
/// | `Dispatch` | `Last` | requests sent this frame are handed to the task pool |
/// | `Maintenance` | `Last` | TTL cleanup and stats refresh started when due |
/// | `Flush` | `Last` | on `AppExit`: waits for outstanding requests, delivers their responses |
///
/// A request sent in `Last` after `Dispatch` is dispatched in the next frame; order such a
/// system `.before(StorageSystems::Dispatch)` to have it dispatched at once.
#[derive(SystemSet, Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StorageSystems {
    /// Delivers finished work (`PreUpdate`).
    Collect,
    /// Queues saves of changed persisted resources (`Last`).
    Persist,
    /// Reads requests and starts them on the task pool (`Last`).
    Dispatch,
    /// Starts TTL cleanup and stats refresh (`Last`).
    Maintenance,
    /// Completes everything on `AppExit` (`Last`).
    Flush,
}

/// The old name of [`StorageSystems`] (Bevy names system sets `*Systems` since 0.17).
#[deprecated(
    since = "0.2.0",
    note = "renamed to StorageSystems, as Bevy's own sets"
)]
pub type StorageSet = StorageSystems;

/// A run condition: true once the plugin's store is open (`false` while it opens, and for
/// good if it could not be opened: see [`Storage::error`]).
///
/// ```no_run
/// # use bevy::prelude::*;
/// # use bevy_storage::prelude::*;
/// # fn show_save_menu() {}
/// App::new()
///     .add_plugins((MinimalPlugins, StoragePlugin))
///     .add_systems(Update, show_save_menu.run_if(storage_ready));
/// ```
pub fn storage_ready(storage: Option<Res<Storage>>) -> bool {
    storage.is_some_and(|s| s.is_ready())
}

/// The plugin's [`Store`], for code that wants to call it directly (from its own tasks: its
/// methods block on I/O).
///
/// The store opens on the task pool after the app starts, so [`store`](Self::store) is
/// `None` until then (and forever if opening failed: see [`error`](Self::error)).
#[derive(Resource, Clone, Debug)]
pub struct Storage {
    pub(super) cell: Arc<OnceLock<Result<Store, SharedError>>>,
}

impl Storage {
    /// The store, once open.
    pub fn store(&self) -> Option<&Store> {
        self.cell.get().and_then(|r| r.as_ref().ok())
    }

    /// Why the store could not be opened, if it could not.
    pub fn error(&self) -> Option<&StorageError> {
        self.cell.get().and_then(|r| r.as_ref().err()).map(|e| &**e)
    }

    /// True once the store is open.
    pub fn is_ready(&self) -> bool {
        self.store().is_some()
    }
}

/// Whether the plugin's store is usable.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum StorageState {
    /// Being opened on the task pool; requests wait.
    #[default]
    Opening,
    /// Open.
    Ready,
    /// Could not be opened; every request is answered with this error.
    Failed(String),
}

/// What the plugin itself is doing, updated every frame without I/O.
#[derive(Resource, Debug, Clone, Default, PartialEq)]
pub struct StorageActivity {
    /// Whether the store is open.
    pub state: StorageState,
    /// Requests waiting: for the store to open, for an earlier request on their key, or in
    /// an open write batch.
    pub queued: usize,
    /// Jobs running on the task pool (a batch counts once).
    pub running: usize,
    /// Requests that succeeded (the plugin's own, for persisted resources, included).
    pub completed: u64,
    /// Requests that failed (the plugin's own included).
    pub failed: u64,
    /// Write batches (of two or more requests) committed.
    pub batches_committed: u64,
    /// Requests committed in those batches.
    pub batched_requests: u64,
    /// TTL cleanups run.
    pub cleanups: u64,
    /// Expired records removed by all cleanups.
    pub expired_purged: u64,
    /// Records removed by the most recent cleanup.
    pub last_purge_removed: Option<usize>,
}

/// Main-thread state of the plugin.
#[derive(Resource)]
pub(crate) struct StorageRuntime {
    pub(crate) inner: Runtime,
    pub(crate) description: String,
    pub(crate) cleanup_interval: Duration,
    pub(crate) stats_interval: Duration,
    pub(crate) last_cleanup: Duration,
    pub(crate) last_stats: Duration,
    pub(crate) stats_now: bool,
    pub(crate) stats_in_flight: bool,
    pub(crate) purge_in_flight: bool,
}
