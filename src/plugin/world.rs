//! World snapshots through the plugin: [`SaveWorld`] / [`LoadWorld`] messages answered by
//! [`WorldSaved`] / [`WorldLoaded`], and rotating autosaves.
//!
//! Only capture (reading the world) and apply (writing it) run on the main thread; encoding,
//! compression, encryption, I/O and decoding run on the `AsyncComputeTaskPool`. World
//! requests are handled one at a time, in the order they were sent (by [`RequestId`]): a save
//! captures the world when its turn comes, after every earlier load has been applied.

use std::collections::VecDeque;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bevy::app::AppExit;
use bevy::ecs::entity::EntityHashMap;
use bevy::ecs::message::MessageCursor;
use bevy::prelude::*;
use bevy::tasks::AsyncComputeTaskPool;
use crossbeam_channel::{Receiver, Sender};
use serde::de::DeserializeOwned;

use super::requests::{RequestId, SharedError, StorageResult};
use super::{Storage, StorageSet};
use crate::backend::CustomMetadata;
use crate::error::StorageError;
use crate::snapshot::{
    self, DecodedWorld, SnapshotComponent, SnapshotContext, SnapshotRegistry, SnapshotSettings,
};
use crate::store::Store;

/// Default key prefix of autosaves (`autosave/000000000001`, ...).
pub const DEFAULT_AUTOSAVE_PREFIX: &str = "autosave/";
/// How many autosaves are kept when [`SnapshotPlugin::autosave`] was not called.
pub const DEFAULT_AUTOSAVE_KEEP: usize = 3;

/// Adds world snapshots to an app that has a [`StoragePlugin`](super::StoragePlugin).
///
/// ```no_run
/// # use bevy::prelude::*;
/// # use bevy_storage::prelude::*;
/// # use std::time::Duration;
/// App::new().add_plugins((
///     MinimalPlugins,
///     StoragePlugin,
///     SnapshotPlugin::new(SnapshotSettings::default().game_version(3))
///         .autosave(Duration::from_secs(300), 5),
/// ));
/// ```
#[derive(Debug, Clone, Default)]
pub struct SnapshotPlugin {
    settings: SnapshotSettings,
    autosave: Option<Autosave>,
}

/// When and where autosaves are written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Autosave {
    /// Time between autosaves (real time).
    pub interval: Duration,
    /// How many autosaves are kept (the oldest are deleted).
    pub keep: usize,
    /// Key prefix of the autosave slots.
    pub prefix: String,
}

impl SnapshotPlugin {
    /// Snapshots with these settings (what to save, format, game version).
    pub fn new(settings: SnapshotSettings) -> Self {
        Self {
            settings,
            autosave: None,
        }
    }

    /// Autosaves every `interval` (real time) under [`DEFAULT_AUTOSAVE_PREFIX`], keeping
    /// the newest `keep`.
    pub fn autosave(mut self, interval: Duration, keep: usize) -> Self {
        let prefix = self
            .autosave
            .take()
            .map_or(DEFAULT_AUTOSAVE_PREFIX.to_owned(), |a| a.prefix);
        self.autosave = Some(Autosave {
            interval,
            keep: keep.max(1),
            prefix,
        });
        self
    }

    /// Changes the autosave key prefix (also used by [`SaveWorld::autosave`] and
    /// [`LoadWorld::newest_autosave`] when there is no timer).
    pub fn autosave_prefix(mut self, prefix: impl Into<String>) -> Self {
        let autosave = self.autosave.get_or_insert(Autosave {
            interval: Duration::MAX,
            keep: DEFAULT_AUTOSAVE_KEEP,
            prefix: String::new(),
        });
        autosave.prefix = prefix.into();
        self
    }
}

impl Plugin for SnapshotPlugin {
    fn build(&self, app: &mut App) {
        let (sender, receiver) = crossbeam_channel::unbounded();
        if !app.world().contains_resource::<SnapshotRegistry>() {
            app.insert_resource(SnapshotRegistry::new());
        }
        app.register_type::<snapshot::Persist>()
            .insert_resource(self.settings.clone())
            .init_resource::<SnapshotMetadata>()
            .add_message::<SaveWorld>()
            .add_message::<LoadWorld>()
            .add_message::<WorldSaved>()
            .add_message::<WorldLoaded>()
            .insert_resource(WorldRuntime {
                autosave: self.autosave.clone(),
                since_autosave: Duration::ZERO,
                autosave_queued: false,
                queue: VecDeque::new(),
                in_flight: None,
                sender,
                receiver,
                save_cursor: MessageCursor::default(),
                load_cursor: MessageCursor::default(),
            })
            .configure_sets(
                Last,
                SnapshotSet
                    .after(StorageSet::Dispatch)
                    .before(StorageSet::Flush),
            )
            .add_systems(
                Last,
                (run_world_requests, flush_world_requests_on_exit)
                    .chain()
                    .in_set(SnapshotSet),
            );
    }
}

/// The snapshot plugin's systems (in `Last`, after the storage requests are dispatched).
#[derive(SystemSet, Debug, Clone, PartialEq, Eq, Hash)]
pub struct SnapshotSet;

/// The game's own fields written into every snapshot's slot metadata (play time, level
/// name ...). Keep it current; [`SaveWorld::metadata`] adds per-save fields on top.
#[derive(Resource, Debug, Clone, Default, PartialEq)]
pub struct SnapshotMetadata(pub CustomMetadata);

/// Saves the persisted part of the world; answered by [`WorldSaved`].
#[derive(Message, Debug, Clone)]
pub struct SaveWorld {
    /// The request's id.
    pub id: RequestId,
    /// Where it goes: a named slot, or the next autosave in the rotation.
    pub slot: WorldSlot,
    /// Fields added to the slot metadata for this save.
    pub metadata: CustomMetadata,
}

impl SaveWorld {
    /// A save to the slot `key`.
    pub fn new(key: impl Into<String>) -> Self {
        Self::to(WorldSlot::Key(key.into()))
    }

    /// A save into the autosave rotation now (as the autosave timer does).
    pub fn autosave() -> Self {
        Self::to(WorldSlot::Autosave)
    }

    fn to(slot: WorldSlot) -> Self {
        Self {
            id: RequestId::next(),
            slot,
            metadata: CustomMetadata::new(),
        }
    }

    /// Adds a slot metadata field.
    pub fn metadata(
        mut self,
        field: impl Into<String>,
        value: impl Into<serde_json::Value>,
    ) -> Self {
        self.metadata.insert(field.into(), value.into());
        self
    }
}

/// Which snapshot a [`SaveWorld`] writes or a [`LoadWorld`] reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WorldSlot {
    /// A named slot (a store key).
    Key(String),
    /// The autosave rotation: a save adds the next autosave (deleting the oldest beyond the
    /// number kept); a load takes the newest autosave that decodes, falling back to older ones.
    Autosave,
}

/// Replaces the persisted part of the world with a snapshot; answered by [`WorldLoaded`].
#[derive(Message, Debug, Clone)]
pub struct LoadWorld {
    /// The request's id.
    pub id: RequestId,
    /// What to load.
    pub slot: WorldSlot,
}

impl LoadWorld {
    /// A load of the slot `key`.
    pub fn new(key: impl Into<String>) -> Self {
        Self {
            id: RequestId::next(),
            slot: WorldSlot::Key(key.into()),
        }
    }

    /// A load of the newest autosave that decodes.
    pub fn newest_autosave() -> Self {
        Self {
            id: RequestId::next(),
            slot: WorldSlot::Autosave,
        }
    }
}

/// The answer to a [`SaveWorld`] (and to each autosave, with an id of its own). A message
/// and an observer event.
#[derive(Message, Event, Debug, Clone)]
pub struct WorldSaved {
    /// The request's id.
    pub id: RequestId,
    /// The slot written.
    pub key: String,
    /// True for an autosave.
    pub autosave: bool,
    /// How many entities were saved, or why nothing was.
    pub result: StorageResult<usize>,
}

/// The answer to a [`LoadWorld`]. A message and an observer event.
#[derive(Message, Event, Debug, Clone)]
pub struct WorldLoaded {
    /// The request's id.
    pub id: RequestId,
    /// The slot that was loaded (for an autosave load, the one that decoded).
    pub key: String,
    /// The map from saved entity ids to the live entities, or why the world was left as it was.
    pub result: StorageResult<EntityHashMap<Entity>>,
    /// Newer autosaves that could not be loaded, with why (autosave loads only).
    pub skipped: Vec<(String, SharedError)>,
}

/// App methods for the typed fast path and migrations.
pub trait SnapshotAppExt {
    /// Puts component `T` on the snapshot fast path (see
    /// [`SnapshotRegistry::register_component`]).
    fn register_snapshot_component<T: SnapshotComponent>(&mut self) -> &mut Self;

    /// Registers a component migration (see [`SnapshotRegistry::migrate_component`]).
    fn migrate_snapshot_component<Old: DeserializeOwned + 'static, New: Component + 'static>(
        &mut self,
        old_type_path: &str,
        since_version: u32,
        upgrade: impl Fn(Old) -> New + Send + Sync + 'static,
    ) -> &mut Self;

    /// Registers a resource migration (see [`SnapshotRegistry::migrate_resource`]).
    fn migrate_snapshot_resource<Old: DeserializeOwned + 'static, New: Resource + 'static>(
        &mut self,
        old_type_path: &str,
        since_version: u32,
        upgrade: impl Fn(Old) -> New + Send + Sync + 'static,
    ) -> &mut Self;
}

/// The app's snapshot registry, created on first use.
fn snapshot_registry(app: &mut App) -> Mut<'_, SnapshotRegistry> {
    app.world_mut()
        .get_resource_or_insert_with(SnapshotRegistry::new)
}

impl SnapshotAppExt for App {
    fn register_snapshot_component<T: SnapshotComponent>(&mut self) -> &mut Self {
        snapshot_registry(self).register_component::<T>();
        self
    }

    fn migrate_snapshot_component<Old: DeserializeOwned + 'static, New: Component + 'static>(
        &mut self,
        old_type_path: &str,
        since_version: u32,
        upgrade: impl Fn(Old) -> New + Send + Sync + 'static,
    ) -> &mut Self {
        snapshot_registry(self).migrate_component(old_type_path, since_version, upgrade);
        self
    }

    fn migrate_snapshot_resource<Old: DeserializeOwned + 'static, New: Resource + 'static>(
        &mut self,
        old_type_path: &str,
        since_version: u32,
        upgrade: impl Fn(Old) -> New + Send + Sync + 'static,
    ) -> &mut Self {
        snapshot_registry(self).migrate_resource(old_type_path, since_version, upgrade);
        self
    }
}

enum WorldOp {
    Save {
        id: RequestId,
        slot: WorldSlot,
        metadata: CustomMetadata,
    },
    Load {
        id: RequestId,
        slot: WorldSlot,
    },
}

enum Done {
    Saved {
        id: RequestId,
        key: String,
        autosave: bool,
        result: StorageResult<usize>,
    },
    Decoded {
        id: RequestId,
        key: String,
        result: StorageResult<DecodedWorld>,
        skipped: Vec<(String, SharedError)>,
    },
}

/// A snapshot decoded on the pool, on its way to the main thread.
struct Decoded {
    key: String,
    world: DecodedWorld,
    skipped: Vec<(String, SharedError)>,
}

#[derive(Resource)]
struct WorldRuntime {
    autosave: Option<Autosave>,
    since_autosave: Duration,
    autosave_queued: bool,
    queue: VecDeque<WorldOp>,
    in_flight: Option<RequestId>,
    sender: Sender<Done>,
    receiver: Receiver<Done>,
    save_cursor: MessageCursor<SaveWorld>,
    load_cursor: MessageCursor<LoadWorld>,
}

fn shared(e: StorageError) -> SharedError {
    Arc::new(e)
}

/// Reads new requests, ticks the autosave timer, delivers finished work and starts the next.
fn run_world_requests(world: &mut World) {
    let delta = world.resource::<Time<Real>>().delta();
    world.resource_scope(|world, mut runtime: Mut<WorldRuntime>| {
        let runtime = &mut *runtime;
        let mut new: Vec<WorldOp> = Vec::new();
        let saves = world.resource::<Messages<SaveWorld>>();
        new.extend(runtime.save_cursor.read(saves).map(|m| WorldOp::Save {
            id: m.id,
            slot: m.slot.clone(),
            metadata: m.metadata.clone(),
        }));
        let loads = world.resource::<Messages<LoadWorld>>();
        new.extend(runtime.load_cursor.read(loads).map(|m| WorldOp::Load {
            id: m.id,
            slot: m.slot.clone(),
        }));
        new.sort_by_key(|op| match op {
            WorldOp::Save { id, .. } | WorldOp::Load { id, .. } => *id,
        });
        runtime.queue.extend(new);

        if let Some(autosave) = &runtime.autosave {
            runtime.since_autosave += delta;
            if runtime.since_autosave >= autosave.interval && !runtime.autosave_queued {
                runtime.since_autosave = Duration::ZERO;
                runtime.autosave_queued = true;
                runtime.queue.push_back(WorldOp::Save {
                    id: RequestId::next(),
                    slot: WorldSlot::Autosave,
                    metadata: CustomMetadata::new(),
                });
            }
        }
        pump(world, runtime, None);
    });
}

/// Delivers what finished and starts queued work until something is in flight (or, when
/// `block_until` is set, until everything is done or the deadline passes).
fn pump(world: &mut World, runtime: &mut WorldRuntime, block_until: Option<Instant>) {
    loop {
        let done = match block_until {
            Some(deadline) if runtime.in_flight.is_some() => {
                let left = deadline.saturating_duration_since(Instant::now());
                match runtime.receiver.recv_timeout(left) {
                    Ok(done) => Some(done),
                    Err(_) => {
                        warn!(
                            "world snapshot still running at exit after the timeout; it may be lost"
                        );
                        return;
                    }
                }
            }
            _ => runtime.receiver.try_recv().ok(),
        };
        if let Some(done) = done {
            runtime.in_flight = None;
            deliver(world, runtime, done);
            continue;
        }
        if runtime.in_flight.is_some() {
            return;
        }
        let Some(op) = runtime.queue.pop_front() else {
            return;
        };
        let store = {
            let storage = world.get_resource::<Storage>();
            match storage {
                None => Err(shared(StorageError::Config(
                    "SnapshotPlugin needs StoragePlugin in the app".into(),
                ))),
                Some(storage) => match (storage.store(), storage.error()) {
                    (Some(store), _) => Ok(store.clone()),
                    (None, Some(e)) => Err(shared(StorageError::Config(format!(
                        "the store could not be opened: {e}"
                    )))),
                    (None, None) => {
                        // Still opening: wait for it (blocking only at exit).
                        runtime.queue.push_front(op);
                        if block_until.is_some_and(|d| Instant::now() < d) {
                            std::thread::sleep(Duration::from_millis(5));
                            continue;
                        }
                        return;
                    }
                },
            }
        };
        start(world, runtime, op, store);
    }
}

fn start(world: &mut World, runtime: &mut WorldRuntime, op: WorldOp, store: StorageResult<Store>) {
    let sender = runtime.sender.clone();
    match op {
        WorldOp::Save { id, slot, metadata } => {
            let autosave = slot == WorldSlot::Autosave;
            let slot = match slot {
                WorldSlot::Key(key) => key,
                WorldSlot::Autosave => autosave_prefix(runtime),
            };
            let fail = |runtime: &mut WorldRuntime, world: &mut World, e: SharedError| {
                deliver(
                    world,
                    runtime,
                    Done::Saved {
                        id,
                        key: slot.clone(),
                        autosave,
                        result: Err(e),
                    },
                )
            };
            let store = match store {
                Ok(store) => store,
                Err(e) => return fail(runtime, world, e),
            };
            let settings = world.resource::<SnapshotSettings>().clone();
            let registry = world.resource::<SnapshotRegistry>().clone();
            let mut custom = world.resource::<SnapshotMetadata>().0.clone();
            custom.extend(metadata);
            let captured = match snapshot::capture(world, &settings, &registry) {
                Ok(c) => c,
                Err(e) => return fail(runtime, world, shared(e)),
            };
            let entities = captured.entity_count();
            let keep = runtime
                .autosave
                .as_ref()
                .map_or(DEFAULT_AUTOSAVE_KEEP, |a| a.keep);
            runtime.in_flight = Some(id);
            AsyncComputeTaskPool::get()
                .spawn(async move {
                    let work = || -> crate::Result<String> {
                        let bytes = captured.encode()?;
                        if autosave {
                            snapshot::store_autosave(&store, &slot, keep, &bytes, &settings, custom)
                        } else {
                            snapshot::store_snapshot(&store, &slot, &bytes, &settings, custom)
                                .map(|()| slot.clone())
                        }
                    };
                    let (key, result) = match catch_unwind(AssertUnwindSafe(work)) {
                        Ok(Ok(key)) => (key, Ok(entities)),
                        Ok(Err(e)) => (slot, Err(shared(e))),
                        Err(_) => (
                            slot,
                            Err(shared(StorageError::Snapshot("encoding panicked".into()))),
                        ),
                    };
                    let _ = sender.send(Done::Saved {
                        id,
                        key,
                        autosave,
                        result,
                    });
                })
                .detach();
        }
        WorldOp::Load { id, slot } => {
            let label = match &slot {
                WorldSlot::Key(k) => k.clone(),
                WorldSlot::Autosave => autosave_prefix(runtime),
            };
            let store = match store {
                Ok(store) => store,
                Err(e) => {
                    return deliver(
                        world,
                        runtime,
                        Done::Decoded {
                            id,
                            key: label,
                            result: Err(e),
                            skipped: Vec::new(),
                        },
                    );
                }
            };
            let context = SnapshotContext::from_world(world);
            runtime.in_flight = Some(id);
            AsyncComputeTaskPool::get()
                .spawn(async move {
                    let work = || -> crate::Result<Decoded> {
                        match &slot {
                            WorldSlot::Key(key) => {
                                let bytes = snapshot::read_snapshot(&store, key)?
                                    .ok_or_else(|| StorageError::NoSnapshot { key: key.clone() })?;
                                Ok(Decoded {
                                    key: key.clone(),
                                    world: snapshot::decode(&bytes, &context)?,
                                    skipped: Vec::new(),
                                })
                            }
                            WorldSlot::Autosave => {
                                match snapshot::load_newest_autosave(&store, &label, &context)? {
                                    Some(found) => Ok(Decoded {
                                        key: found.key,
                                        world: found.world,
                                        skipped: found
                                            .skipped
                                            .into_iter()
                                            .map(|(k, e)| (k, shared(e)))
                                            .collect(),
                                    }),
                                    None => Err(StorageError::NoSnapshot { key: label.clone() }),
                                }
                            }
                        }
                    };
                    let done = match catch_unwind(AssertUnwindSafe(work)) {
                        Ok(Ok(decoded)) => Done::Decoded {
                            id,
                            key: decoded.key,
                            result: Ok(decoded.world),
                            skipped: decoded.skipped,
                        },
                        Ok(Err(e)) => Done::Decoded {
                            id,
                            key: label,
                            result: Err(shared(e)),
                            skipped: Vec::new(),
                        },
                        Err(_) => Done::Decoded {
                            id,
                            key: label,
                            result: Err(shared(StorageError::Snapshot("decoding panicked".into()))),
                            skipped: Vec::new(),
                        },
                    };
                    let _ = sender.send(done);
                })
                .detach();
        }
    }
}

fn autosave_prefix(runtime: &WorldRuntime) -> String {
    runtime
        .autosave
        .as_ref()
        .map_or(DEFAULT_AUTOSAVE_PREFIX.to_owned(), |a| a.prefix.clone())
}

fn deliver(world: &mut World, runtime: &mut WorldRuntime, done: Done) {
    match done {
        Done::Saved {
            id,
            key,
            autosave,
            result,
        } => {
            if autosave {
                runtime.autosave_queued = false;
            }
            match &result {
                Ok(n) => debug!("world saved to {key:?} ({n} entities)"),
                Err(e) => error!("world save to {key:?} failed: {e}"),
            }
            let response = WorldSaved {
                id,
                key,
                autosave,
                result,
            };
            world.write_message(response.clone());
            world.trigger(response);
        }
        Done::Decoded {
            id,
            key,
            result,
            skipped,
        } => {
            let result = result.map(|decoded| {
                let despawn = world.resource::<SnapshotSettings>().despawn_existing;
                decoded.apply(world, despawn)
            });
            match &result {
                // Nothing saved yet is an ordinary answer (a first run), not a failure.
                Err(e) if matches!(**e, StorageError::NoSnapshot { .. }) => info!("{e}"),
                Err(e) => error!("world load from {key:?} failed, the world is unchanged: {e}"),
                Ok(_) => {}
            }
            let response = WorldLoaded {
                id,
                key,
                result,
                skipped,
            };
            world.write_message(response.clone());
            world.trigger(response);
        }
    }
}

/// On `AppExit`, finishes every world request already sent (a game that saves and quits in
/// the same frame loses nothing).
fn flush_world_requests_on_exit(world: &mut World, mut exits: Local<MessageCursor<AppExit>>) {
    let exiting = exits
        .read(world.resource::<Messages<AppExit>>())
        .next()
        .is_some();
    if !exiting {
        return;
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    world.resource_scope(|world, mut runtime: Mut<WorldRuntime>| {
        pump(world, &mut runtime, Some(deadline));
    });
}
