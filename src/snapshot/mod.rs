//! World snapshots: the persisted part of a Bevy [`World`] ⇄ bytes, with entity remapping.
//!
//! Entities that carry [`Persist`], with their reflected components, plus the resources a game
//! allowlists in [`SnapshotSettings`], make up a snapshot. The work is split so that a game
//! never stalls on it:
//!
//! 1. [`capture`] (main thread, needs `&mut World`): clones the values out. Components
//!    registered with [`SnapshotRegistry::register_component`] are copied as typed columns (a
//!    query and a `clone`, the fast path); every other reflected component is cloned through
//!    reflection.
//! 2. [`CapturedWorld::encode`] (any thread): serializes to RON or postcard with a small header
//!    (format version, game version). The store then compresses, encrypts and writes it.
//! 3. [`decode`] (any thread): parses, runs registered migrations, resolves every type and
//!    converts every value. Anything wrong (damage, an unknown type, a newer format) is an
//!    error here, before the world is touched.
//! 4. [`DecodedWorld::apply`] (main thread): despawns the currently persisted entities
//!    (configurable), spawns the snapshot's, maps entity references, inserts everything
//!    (each entity's typed components in one archetype move). It cannot fail half way: all
//!    checks happened in step 3. [`DecodedWorld::spread`] does the same a slice per frame,
//!    the persisted entities hidden (Bevy's `Disabled`) until the last slice.
//!
//! Snapshot chains (incremental autosaves, the `delta` module): [`capture_base`] starts a
//! chain with a full capture, [`capture_delta`] captures what changed since the chain's last
//! record (cost proportional to the change), [`decode_chain`] merges a base and its deltas on
//! any thread into one [`DecodedWorld`], and [`compact_chain`] encodes that world again as a new
//! base (a chain compacted without a full capture). The autosave rotation in `slots` stores
//! and loads them ([`store_autosave_record`], [`store_compacted_autosave`],
//! [`load_newest_autosave`], [`load_world`]).
//!
//! Hierarchies: `ChildOf` is saved (typed) and `Children` is rebuilt by Bevy's relationship
//! hooks as children are inserted in their saved order. Save whole subtrees: a reference to an
//! entity outside the snapshot becomes [`Entity::PLACEHOLDER`].
//!
//! # Modules, and the direction of their imports
//! Each file imports only files below it in this list (the settings and the registry in
//! `mod.rs` are read by all of them):
//! ```text
//! slots    ──▶ delta, encode, apply, header   save slots and autosaves in a Store
//! delta    ──▶ capture, encode, apply, columns, header   snapshot chains: deltas, merging
//! encode   ──▶ capture, apply, columns, header   steps 2 and 3: captured world ⇄ bytes
//! capture  ──▶ columns                   step 1: World ─▶ CapturedWorld
//! apply    ──▶ columns, header           step 4: DecodedWorld ─▶ World
//! migrate  ──▶ columns                   older component shapes ─▶ current ones
//! columns                                typed and reflected values, entity mapping
//! header                                 the byte header and the encoding (Bevy-free)
//! ```
//! Without the `bevy` feature only `header` and the Bevy-free half of `slots` (listing and
//! naming slots) are compiled: the CLI and a server read them without compiling Bevy.

#[cfg(feature = "bevy")]
mod apply;
#[cfg(feature = "bevy")]
mod capture;
#[cfg(feature = "bevy")]
mod columns;
#[cfg(feature = "bevy")]
mod delta;
#[cfg(feature = "bevy")]
mod encode;
mod header;
#[cfg(feature = "bevy")]
mod migrate;
mod slots;

#[cfg(feature = "bevy")]
pub use apply::{DecodedWorld, SpreadApply};
#[cfg(feature = "bevy")]
pub use capture::{CapturedWorld, capture};
#[cfg(feature = "bevy")]
pub use columns::{SnapshotComponent, SnapshotEntityMapper, SnapshotStandIn};
#[cfg(feature = "bevy")]
pub use delta::{
    CapturedDelta, ChainCursor, ChainPolicy, ChainStart, ChainStep, ChainTracker, capture_base,
    capture_delta, compact_chain, decode_chain, stop_chain,
};
#[cfg(feature = "bevy")]
pub use encode::{SnapshotContext, decode};
pub use header::{
    DELTA_FORMAT_VERSION, DELTA_HEADER_LEN, DeltaHeader, HEADER_LEN, RecordKind, RecordLink,
    SNAPSHOT_FORMAT_VERSION, SnapshotEncoding, SnapshotHeader, read_delta_header, read_header,
    record_kind,
};
#[cfg(feature = "bevy")]
pub use migrate::Migrations;
pub use slots::{
    ChainInfo, SlotInfo, autosave_key, autosave_keys, chain_of, list_slots, read_snapshot,
};
#[cfg(feature = "bevy")]
pub use slots::{
    LoadedAutosave, load_newest_autosave, load_world, store_autosave, store_autosave_record,
    store_compacted_autosave, store_snapshot,
};

#[cfg(feature = "bevy")]
use std::any::TypeId;
#[cfg(feature = "bevy")]
use std::collections::HashSet;
#[cfg(feature = "bevy")]
use std::sync::Arc;

#[cfg(feature = "bevy")]
use bevy::ecs::observer::ObservedBy;
#[cfg(feature = "bevy")]
use bevy::prelude::*;
#[cfg(feature = "bevy")]
use serde::de::DeserializeOwned;

#[cfg(feature = "bevy")]
use crate::codec::Compression;
#[cfg(feature = "bevy")]
use columns::{Mapped, Typed, TypedCodec};

#[cfg(feature = "bevy")]
/// Marks an entity whose components are saved in world snapshots.
#[derive(Component, Reflect, Default, Clone, Copy, Debug, PartialEq, Eq)]
#[reflect(Component, Default)]
pub struct Persist;

#[cfg(feature = "bevy")]
/// Hides the entities of a load spread over frames ([`DecodedWorld::spread`]) until its last
/// step: a disabling component (game queries leave its entities out, like Bevy's
/// `Disabled`), stored in a sparse set so that adding it and taking it off moves no
/// component data. [`SnapshotPlugin`](crate::plugin::SnapshotPlugin) registers it as
/// disabling; an app that spreads loads without the plugin calls
/// `world.register_disabling_component::<Loading>()` before its systems first run, or the
/// loads fall back to `Disabled` (a table move per entity in the first and the last step).
#[derive(Component, Default, Clone, Copy, Debug, PartialEq, Eq)]
#[component(storage = "SparseSet")]
pub struct Loading;

#[cfg(feature = "bevy")]
/// What goes into a snapshot and how it is written. A resource; insert your own to change it.
#[derive(Resource, Debug, Clone)]
pub struct SnapshotSettings {
    /// RON or binary.
    pub encoding: SnapshotEncoding,
    /// The game's own version of its saved data, recorded in every snapshot. Migrations
    /// registered for a later version run when an older snapshot is loaded; a snapshot from a
    /// newer game version is refused.
    pub game_version: u32,
    /// Compression of the stored record. `None` (the default): the store's own
    /// ([`StorageConfig::compression`](crate::StorageConfig::compression)), so a build without
    /// the `compression` feature saves worlds uncompressed.
    pub compression: Option<Compression>,
    /// Encrypt snapshots with the store's key. `None` (the default): the store's own default
    /// ([`StorageConfig::enable_encryption`](crate::StorageConfig)), so a store that encrypts
    /// every save encrypts its worlds too.
    pub encrypt: Option<bool>,
    /// On load, despawn the entities marked [`Persist`] that exist now. Default on.
    pub despawn_existing: bool,
    /// When set, only these component types are saved (besides the deny list).
    pub allowed_components: Option<HashSet<TypeId>>,
    /// Component types never saved. By default Bevy's bookkeeping: `Children` (rebuilt from
    /// `ChildOf`), `ObservedBy`, and the `Persist` marker itself (every loaded entity gets it).
    pub denied_components: HashSet<TypeId>,
    /// Resource types saved (an allowlist: engine resources are never saved by accident).
    pub resources: HashSet<TypeId>,
}

#[cfg(feature = "bevy")]
impl Default for SnapshotSettings {
    fn default() -> Self {
        Self {
            encoding: SnapshotEncoding::default(),
            game_version: 0,
            compression: None,
            encrypt: None,
            despawn_existing: true,
            allowed_components: None,
            denied_components: [
                TypeId::of::<Children>(),
                TypeId::of::<ObservedBy>(),
                TypeId::of::<Persist>(),
            ]
            .into(),
            resources: HashSet::new(),
        }
    }
}

#[cfg(feature = "bevy")]
impl SnapshotSettings {
    /// Sets the encoding.
    pub fn encoding(mut self, encoding: SnapshotEncoding) -> Self {
        self.encoding = encoding;
        self
    }
    /// Sets the game version recorded in snapshots.
    pub fn game_version(mut self, version: u32) -> Self {
        self.game_version = version;
        self
    }
    /// Compresses snapshots (or not) instead of the store's default.
    pub fn compression(mut self, compression: Compression) -> Self {
        self.compression = Some(compression);
        self
    }
    /// Encrypts snapshots with the store's key (or not), instead of the store's default.
    pub fn encrypt(mut self, on: bool) -> Self {
        self.encrypt = Some(on);
        self
    }
    /// Whether loading despawns the persisted entities that exist now.
    pub fn despawn_existing(mut self, on: bool) -> Self {
        self.despawn_existing = on;
        self
    }
    /// Saves resource `R` (it must be reflected with `#[reflect(Resource)]`).
    pub fn allow_resource<R: Resource>(mut self) -> Self {
        self.resources.insert(TypeId::of::<R>());
        self
    }
    /// Never saves component `C`.
    pub fn deny_component<C: Component>(mut self) -> Self {
        self.denied_components.insert(TypeId::of::<C>());
        self
    }
    /// Saves component `C` and, once any component is allowed this way, only allowed ones.
    pub fn allow_component<C: Component>(mut self) -> Self {
        self.allowed_components
            .get_or_insert_with(HashSet::new)
            .insert(TypeId::of::<C>());
        self
    }

    pub(crate) fn saves_component(&self, type_id: TypeId) -> bool {
        !self.denied_components.contains(&type_id)
            && self
                .allowed_components
                .as_ref()
                .is_none_or(|allowed| allowed.contains(&type_id))
    }
}

#[cfg(feature = "bevy")]
/// Components on the typed fast path (plain or [mapped](Self::map_component)), and
/// migrations. A resource; the snapshot plugin inserts
/// it, and `App` extension methods add to it.
#[derive(Resource, Clone, Default)]
pub struct SnapshotRegistry {
    pub(crate) typed: Vec<Arc<dyn TypedCodec>>,
    pub(crate) migrations: Migrations,
}

#[cfg(feature = "bevy")]
impl SnapshotRegistry {
    /// A registry with Bevy's `ChildOf` on the typed path.
    pub fn new() -> Self {
        let mut registry = Self::default();
        registry.register_component::<ChildOf>();
        registry
    }

    /// Puts component `T` on the typed fast path: captured by a query and `clone`,
    /// serialized with serde. Use it for components present on many entities. Other reflected
    /// components are saved too, through reflection.
    pub fn register_component<T: SnapshotComponent>(&mut self) -> &mut Self {
        if !self.typed.iter().any(|c| c.type_id() == TypeId::of::<T>()) {
            self.typed.push(Arc::new(Typed::<T>::new()));
        }
        self
    }

    /// Saves component `C` as a stand-in `S` (moonshine-save's `map_component`): on capture
    /// `to_saved` turns each `C` of a persisted entity into an `S`, which is serialized in its
    /// place (under `C`'s type path); on load `from_saved` turns each `S` back into a `C`.
    /// For components that cannot be serialized themselves: a runtime handle (an audio
    /// voice, a network session, an `Arc<Mutex<..>>`) saved as what rebuilds it. `C` needs
    /// neither `Serialize` nor `Reflect`, only `TypePath` (`#[derive(TypePath)]`) for its
    /// name in the snapshot. `from_saved` runs on the main thread as the load is applied,
    /// once for each `C` of the loaded world (a value that a later delta of a chain replaced
    /// is never rebuilt), so it may register the handle with the engine; a load that fails
    /// while decoding never calls it. Capture runs `to_saved` on the main thread. Registering
    /// `C` again (mapped or typed) keeps the first registration.
    ///
    /// ```
    /// use std::sync::{Arc, Mutex};
    /// use bevy::prelude::*;
    /// use bevy_storage::snapshot::SnapshotRegistry;
    ///
    /// /// A voice of the audio engine: the handle is runtime-only, its sound is not.
    /// #[derive(Component, TypePath)]
    /// struct Voice { sound: String, handle: Arc<Mutex<Option<u64>>> }
    ///
    /// let mut registry = SnapshotRegistry::new();
    /// registry.map_component::<Voice, String>(
    ///     |voice| voice.sound.clone(),
    ///     |sound| Voice { sound, handle: Arc::new(Mutex::new(None)) }, // reconnected later
    /// );
    /// ```
    pub fn map_component<C, S>(
        &mut self,
        to_saved: impl Fn(&C) -> S + Send + Sync + 'static,
        from_saved: impl Fn(S) -> C + Send + Sync + 'static,
    ) -> &mut Self
    where
        C: Component + TypePath,
        S: SnapshotStandIn,
    {
        if !self.typed.iter().any(|c| c.type_id() == TypeId::of::<C>()) {
            self.typed
                .push(Arc::new(Mapped::<C, S>::new(to_saved, from_saved)));
        }
        self
    }

    /// Registers a migration: snapshots from game versions before `since_version` stored the
    /// component under `old_type_path` with the shape `Old`; `upgrade` turns each value into
    /// the current `New`. For a type that changed more than once, register one migration per
    /// old shape, each converting straight to the current type.
    pub fn migrate_component<Old, New>(
        &mut self,
        old_type_path: &str,
        since_version: u32,
        upgrade: impl Fn(Old) -> New + Send + Sync + 'static,
    ) -> &mut Self
    where
        Old: DeserializeOwned + 'static,
        New: Component + 'static,
    {
        self.migrations
            .add_component(old_type_path, since_version, upgrade);
        self
    }

    /// Like [`migrate_component`](Self::migrate_component), for an allowlisted resource.
    pub fn migrate_resource<Old, New>(
        &mut self,
        old_type_path: &str,
        since_version: u32,
        upgrade: impl Fn(Old) -> New + Send + Sync + 'static,
    ) -> &mut Self
    where
        Old: DeserializeOwned + 'static,
        New: Resource + 'static,
    {
        self.migrations
            .add_resource(old_type_path, since_version, upgrade);
        self
    }

    pub(crate) fn typed_by_path(&self, type_path: &str) -> Option<&Arc<dyn TypedCodec>> {
        self.typed.iter().find(|c| c.type_path() == type_path)
    }
}
