//! World snapshots through the plugin: [`SaveWorld`] / [`LoadWorld`] messages answered by
//! [`WorldSaved`] / [`WorldLoaded`], and rotating autosaves.
//!
//! World requests go through the plugin's one scheduler with the key-value requests: a world
//! request is ordered by [`RequestId`] against every request on its slot's key (a
//! `DeleteRequest` of the slot, a `ClearRequest`) and against every other world request.
//! Only capture (reading the world) and apply (writing it) run on the main thread, when the
//! request's turn comes; encoding, compression, encryption, I/O and decoding run on the
//! `AsyncComputeTaskPool`. A save captures the world after every earlier load was applied.
//!
//! Incremental autosaves ([`SnapshotPlugin::incremental`], [`SaveWorld::incremental`]) write
//! a snapshot chain into the rotation: a full snapshot, then deltas of what changed since the
//! autosave before (see [`crate::snapshot`], whose chains are in its `delta` module), until the
//! [`ChainPolicy`] asks for a new base, which the pool folds from the chain and a delta
//! captured as usual (the main thread never captures the whole world to compact a chain). A load of the rotation applies the chain's base
//! and deltas as one world, all or nothing; a delta that cannot be loaded falls back to the
//! chain's state before it. A successful load ends the chain: the next autosave is full.

use std::sync::Arc;
use std::time::Duration;

use bevy::ecs::entity::EntityHashMap;
use bevy::prelude::*;
use serde::de::DeserializeOwned;

use super::StorageSystems;
use super::kind::{RequestKind, add_request_kind, publish};
use super::requests::{RequestId, SharedError, StorageResult, impl_response};
use super::scope::Scope;
use crate::backend::CustomMetadata;
use crate::error::StorageError;
use crate::store::Store;

use crate::snapshot::{
    self, ChainCursor, ChainPolicy, SlotInfo, SnapshotComponent, SnapshotRegistry,
    SnapshotSettings, SnapshotStandIn,
};

mod run;

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
    /// Incremental autosaves: a snapshot chain compacted as the policy says. `None` (the
    /// default): every autosave is a full snapshot.
    pub chain: Option<ChainPolicy>,
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
        let (prefix, chain) = self
            .autosave
            .take()
            .map_or((DEFAULT_AUTOSAVE_PREFIX.to_owned(), None), |a| {
                (a.prefix, a.chain)
            });
        self.autosave = Some(Autosave {
            interval,
            keep: keep.max(1),
            prefix,
            chain,
        });
        self
    }

    /// Makes autosaves incremental: each one writes only what changed since the autosave
    /// before (a delta of a snapshot chain), and a full snapshot when `policy` says the chain
    /// is long enough. The main-thread cost of a delta grows with what changed, not with the
    /// world. Only the first autosave (and the first after a load, or after a failed one)
    /// captures the whole world; when the policy compacts the chain, the autosave captures a
    /// delta as usual and the pool folds the chain's base, its deltas and that delta into a new
    /// base (one atomic write: a crash leaves the chain as it was or the new base, never a
    /// mix), answered with [`WorldSaved::delta`] false.
    ///
    /// ```no_run
    /// # use bevy::prelude::*;
    /// # use bevy_storage::prelude::*;
    /// # use bevy_storage::snapshot::ChainPolicy;
    /// # use std::time::Duration;
    /// App::new().add_plugins((
    ///     MinimalPlugins,
    ///     StoragePlugin,
    ///     SnapshotPlugin::new(SnapshotSettings::default())
    ///         .autosave(Duration::from_secs(60), 3)
    ///         .incremental(ChainPolicy::default().max_deltas(20)),
    /// ));
    /// ```
    pub fn incremental(mut self, policy: ChainPolicy) -> Self {
        let autosave = self.autosave.get_or_insert(Autosave {
            interval: Duration::MAX,
            keep: DEFAULT_AUTOSAVE_KEEP,
            prefix: DEFAULT_AUTOSAVE_PREFIX.to_owned(),
            chain: None,
        });
        autosave.chain = Some(policy);
        self
    }

    /// Changes the autosave key prefix (also used by [`SaveWorld::autosave`] and
    /// [`LoadWorld::newest_autosave`] when there is no timer).
    pub fn autosave_prefix(mut self, prefix: impl Into<String>) -> Self {
        let autosave = self.autosave.get_or_insert(Autosave {
            interval: Duration::MAX,
            keep: DEFAULT_AUTOSAVE_KEEP,
            prefix: String::new(),
            chain: None,
        });
        autosave.prefix = prefix.into();
        self
    }
}

impl Plugin for SnapshotPlugin {
    fn build(&self, app: &mut App) {
        if !app.world().contains_resource::<SnapshotRegistry>() {
            app.insert_resource(SnapshotRegistry::new());
        }
        add_request_kind::<SaveWorld>(app);
        add_request_kind::<LoadWorld>(app);
        add_request_kind::<ListSlots>(app);
        // Before any system's queries exist: they then leave out a spread load's entities.
        app.world_mut()
            .register_disabling_component::<snapshot::Loading>();
        app.register_type::<snapshot::Persist>()
            .insert_resource(self.settings.clone())
            .init_resource::<SnapshotMetadata>()
            .insert_resource(AutosaveConfig {
                autosave: self.autosave.clone(),
            })
            .init_resource::<AutosaveTimer>()
            .init_resource::<ChainState>()
            .configure_sets(Last, SnapshotSystems.before(StorageSystems::Dispatch))
            .add_systems(Last, tick_autosave.in_set(SnapshotSystems));
    }

    fn finish(&self, app: &mut App) {
        if !app.world().contains_resource::<super::StorageRuntime>() {
            error!(
                "bevy_storage: SnapshotPlugin needs StoragePlugin in the app; world requests will be answered with an error"
            );
            app.add_systems(Last, answer_without_storage.in_set(SnapshotSystems));
        }
    }
}

/// The snapshot plugin's systems (in `Last`, after the storage requests are dispatched).
#[derive(SystemSet, Debug, Clone, PartialEq, Eq, Hash)]
pub struct SnapshotSystems;

/// The old name of [`SnapshotSystems`].
#[deprecated(
    since = "0.2.0",
    note = "renamed to SnapshotSystems, as Bevy's own sets"
)]
pub type SnapshotSet = SnapshotSystems;

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
    /// Write a delta of the rotation's snapshot chain (`Some(true)`), a full snapshot
    /// (`Some(false)`), or as the plugin's autosaves do (`None`, the default).
    pub incremental: Option<bool>,
    /// The autosave rotation's prefix and size, resolved when the request is read.
    rotation: Option<(String, usize)>,
    /// The chain policy when the save is incremental, resolved when the request is read.
    chain: Option<ChainPolicy>,
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
            incremental: None,
            rotation: None,
            chain: None,
        }
    }

    /// Asks for an incremental save (a delta of the autosave rotation's chain) or a full one.
    /// Only autosaves can be incremental: a named slot asked for one fails with
    /// [`StorageError::Config`].
    pub fn incremental(mut self, on: bool) -> Self {
        self.incremental = Some(on);
        self
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
///
/// The snapshot is read and decoded on the pool; by default it is applied on the main thread
/// in the frame it arrives. [`spread_over_frames`](Self::spread_over_frames) applies it a
/// slice per frame instead.
#[derive(Message, Debug, Clone)]
pub struct LoadWorld {
    /// The request's id.
    pub id: RequestId,
    /// What to load.
    pub slot: WorldSlot,
    /// The autosave rotation's prefix and size, resolved when the request is read.
    rotation: Option<(String, usize)>,
    /// Entities (or values) applied per frame, when the load is spread over frames.
    pub(crate) spread: Option<usize>,
}

impl LoadWorld {
    /// A load of the slot `key`.
    pub fn new(key: impl Into<String>) -> Self {
        Self {
            id: RequestId::next(),
            slot: WorldSlot::Key(key.into()),
            rotation: None,
            spread: None,
        }
    }

    /// A load of the newest autosave that decodes.
    pub fn newest_autosave() -> Self {
        Self {
            id: RequestId::next(),
            slot: WorldSlot::Autosave,
            rotation: None,
            spread: None,
        }
    }

    /// Applies the loaded world over several frames, about `max_per_frame` entities (or
    /// component values) a frame, so that a large load never holds a frame for long (see
    /// [`DecodedWorld::spread`](crate::snapshot::DecodedWorld::spread) for the details).
    ///
    /// The guarantee: game queries see the old persisted world until the frame the load
    /// starts applying, then no persisted entity (old or loaded: both carry the disabling
    /// component [`Loading`](crate::snapshot::Loading)), then the whole loaded world from
    /// the frame of the last step on, never a half-loaded one. Saved resources are replaced
    /// in the last step. [`WorldLoaded`] is sent once, after the last step; no other world
    /// request (a save, an autosave, another load) starts before it. Hooks and observers run
    /// as each entity is filled in, while it is still hidden: an observer that queries it
    /// needs `Allow<Loading>`; commands reach it as usual.
    ///
    /// ```
    /// # use bevy::prelude::*;
    /// # use bevy_storage::prelude::*;
    /// fn load(mut loads: MessageWriter<LoadWorld>) {
    ///     loads.write(LoadWorld::new("slot1").spread_over_frames(10_000));
    /// }
    /// ```
    pub fn spread_over_frames(mut self, max_per_frame: usize) -> Self {
        self.spread = Some(max_per_frame.max(1));
        self
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
    /// True when a delta of a snapshot chain was written (an incremental autosave); false
    /// for a whole snapshot, a chain's compacted new base included.
    pub delta: bool,
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

impl_response!(WorldSaved);

impl_response!(WorldLoaded);

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

    /// Saves component `C` as the stand-in `S` and back (see
    /// [`SnapshotRegistry::map_component`]).
    fn map_snapshot_component<C: Component + TypePath, S: SnapshotStandIn>(
        &mut self,
        to_saved: impl Fn(&C) -> S + Send + Sync + 'static,
        from_saved: impl Fn(S) -> C + Send + Sync + 'static,
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

    fn map_snapshot_component<C: Component + TypePath, S: SnapshotStandIn>(
        &mut self,
        to_saved: impl Fn(&C) -> S + Send + Sync + 'static,
        from_saved: impl Fn(S) -> C + Send + Sync + 'static,
    ) -> &mut Self {
        snapshot_registry(self).map_component(to_saved, from_saved);
        self
    }
}

/// The snapshot plugin's settings the world requests read when they run.
#[derive(Resource, Debug, Clone)]
struct AutosaveConfig {
    autosave: Option<Autosave>,
}

impl AutosaveConfig {
    fn prefix(&self) -> String {
        self.autosave
            .as_ref()
            .map_or(DEFAULT_AUTOSAVE_PREFIX.to_owned(), |a| a.prefix.clone())
    }

    fn chain(&self) -> Option<ChainPolicy> {
        self.autosave.as_ref().and_then(|a| a.chain)
    }

    fn keep(&self) -> usize {
        self.autosave
            .as_ref()
            .map_or(DEFAULT_AUTOSAVE_KEEP, |a| a.keep)
    }
}

/// The autosave timer: real time since the last autosave, and the one still running.
#[derive(Resource, Default)]
struct AutosaveTimer {
    since: Duration,
    running: Option<RequestId>,
}

fn shared(e: StorageError) -> SharedError {
    Arc::new(e)
}

/// The slot a request names, as a key (an autosave's prefix before its key is chosen).
fn slot_label(slot: &WorldSlot, rotation: &Option<(String, usize)>) -> String {
    match (slot, rotation) {
        (WorldSlot::Key(key), _) => key.clone(),
        (WorldSlot::Autosave, Some((prefix, _))) => prefix.clone(),
        (WorldSlot::Autosave, None) => DEFAULT_AUTOSAVE_PREFIX.to_owned(),
    }
}

/// The scope of a world request on `slot`: its key, or every key of the rotation.
fn slot_scope(slot: &WorldSlot, rotation: &Option<(String, usize)>) -> Scope {
    match slot {
        WorldSlot::Key(key) => Scope::key(key),
        WorldSlot::Autosave => Scope::prefix(&slot_label(slot, rotation)),
    }
}

/// The rotation's prefix and size, as the app configures them.
fn rotation(world: &World) -> (String, usize) {
    match world.get_resource::<AutosaveConfig>() {
        Some(config) => (config.prefix(), config.keep()),
        None => (DEFAULT_AUTOSAVE_PREFIX.to_owned(), DEFAULT_AUTOSAVE_KEEP),
    }
}

/// The snapshot chain the autosaves of this app are writing.
#[derive(Resource, Default)]
struct ChainState {
    /// The newest record's cursor and the chain's base key; `None`: the next incremental
    /// autosave is full.
    cursor: Option<(ChainCursor, String)>,
}

/// Lists the world snapshots under a prefix, newest first, from their metadata alone;
/// answered by [`SlotsListed`]. For a load menu: the listing runs on the task pool in turn with
/// the saves and deletes of those slots.
///
/// ```no_run
/// # use bevy::prelude::*;
/// # use bevy_storage::prelude::*;
/// fn open_load_menu(mut lists: MessageWriter<ListSlots>) {
///     lists.write(ListSlots::new("slot:"));
/// }
/// fn show_slots(listed: On<SlotsListed>) {
///     for slot in listed.result.as_deref().unwrap_or_default() {
///         println!("{}: {} entities", slot.key, slot.entity_count);
///     }
/// }
/// ```
#[derive(Message, Debug, Clone)]
pub struct ListSlots {
    /// The request's id.
    pub id: RequestId,
    /// The key prefix of the slots (`""`: every snapshot in the store).
    pub prefix: String,
}

impl ListSlots {
    /// Lists the snapshots whose keys start with `prefix`.
    pub fn new(prefix: impl Into<String>) -> Self {
        Self {
            id: RequestId::next(),
            prefix: prefix.into(),
        }
    }
}

/// The answer to a [`ListSlots`]. A message and an observer event.
#[derive(Message, Event, Debug, Clone)]
pub struct SlotsListed {
    /// The request's id.
    pub id: RequestId,
    /// The prefix listed.
    pub prefix: String,
    /// The slots, newest first.
    pub result: StorageResult<Vec<SlotInfo>>,
}

impl_response!(SlotsListed);

impl RequestKind for ListSlots {
    type Response = SlotsListed;
    type Input = ();
    type Output = SlotsListed;

    fn id(&self) -> RequestId {
        self.id
    }

    fn scope(&self) -> Scope {
        Scope::prefix(&self.prefix)
    }

    fn input(&self, _world: &mut World) -> Result<(), SharedError> {
        Ok(())
    }

    fn run(&self, store: &Store, (): ()) -> SlotsListed {
        SlotsListed {
            id: self.id,
            prefix: self.prefix.clone(),
            result: snapshot::list_slots(store, &self.prefix).map_err(shared),
        }
    }

    fn finish(&self, _world: &mut World, listed: SlotsListed) -> SlotsListed {
        listed
    }

    fn fail(&self, error: SharedError) -> SlotsListed {
        SlotsListed {
            id: self.id,
            prefix: self.prefix.clone(),
            result: Err(error),
        }
    }
}

/// Writes an autosave request when the timer is due and the last one has finished.
fn tick_autosave(
    config: Res<AutosaveConfig>,
    mut timer: ResMut<AutosaveTimer>,
    time: Res<Time<Real>>,
    mut saves: MessageWriter<SaveWorld>,
) {
    let Some(autosave) = &config.autosave else {
        return;
    };
    timer.since += time.delta();
    if timer.since >= autosave.interval && timer.running.is_none() {
        timer.since = Duration::ZERO;
        let request = SaveWorld::autosave();
        timer.running = Some(request.id);
        saves.write(request);
    }
}

/// Without a [`StoragePlugin`](super::StoragePlugin) nothing would answer world requests:
/// answer each with the error that says so.
fn answer_without_storage(
    mut saves: MessageReader<SaveWorld>,
    mut loads: MessageReader<LoadWorld>,
    mut commands: Commands,
) {
    let missing = || {
        shared(StorageError::Config(
            "SnapshotPlugin needs StoragePlugin in the app".into(),
        ))
    };
    for save in saves.read() {
        let response = save.fail(missing());
        commands.queue(move |world: &mut World| publish(world, response));
    }
    for load in loads.read() {
        let response = load.fail(missing());
        commands.queue(move |world: &mut World| publish(world, response));
    }
}
