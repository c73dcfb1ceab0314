//! Columns of component values: the typed fast path and the reflection fallback.
//!
//! A *typed* column holds `Vec<T>` for a component registered with
//! [`SnapshotRegistry::register_component`](super::SnapshotRegistry::register_component)
//! (`Clone + Serialize + DeserializeOwned`): capture is a query and a clone, encoding is plain
//! serde. Every other reflected component goes through a *reflect* column: values are cloned
//! through reflection and (de)serialized with Bevy's reflect serializers, asset handles by path.

use std::any::TypeId;
use std::marker::PhantomData;
use std::mem::MaybeUninit;
use std::ptr::NonNull;
use std::sync::{Arc, Mutex, OnceLock};

use bevy::asset::{EphemeralHandleBehavior, HandleSerializeProcessor};
use bevy::ecs::component::ComponentId;
use bevy::ecs::entity::{EntityHashMap, EntityMapper};
use bevy::ecs::reflect::ReflectComponent;
use bevy::ecs::relationship::RelationshipHookMode;
use bevy::prelude::*;
use bevy::ptr::OwningPtr;
use bevy::reflect::serde::TypedReflectSerializer;
use bevy::reflect::{PartialReflect, TypeRegistry};
use serde::de::DeserializeOwned;
use serde::ser::SerializeSeq;
use serde::{Serialize, Serializer};

use super::Persist;

mod changes;
use changes::changed_values;
pub(crate) use changes::{DeltaRows, DeltaScope, scan_changed};

/// Maps the entity ids saved in a snapshot to the entities spawned for them. Ids that name no
/// saved entity (a reference to something outside the snapshot) become
/// [`Entity::PLACEHOLDER`].
pub struct SnapshotEntityMapper<'a> {
    pub(crate) map: &'a LoadMap,
    /// References mapped to `PLACEHOLDER` since the counter was last reset.
    pub(crate) unmapped: usize,
}

impl<'a> SnapshotEntityMapper<'a> {
    pub(crate) fn new(map: &'a LoadMap) -> Self {
        Self { map, unmapped: 0 }
    }
}

impl EntityMapper for SnapshotEntityMapper<'_> {
    fn get_mapped(&mut self, source: Entity) -> Entity {
        self.map.get().get(&source).copied().unwrap_or_else(|| {
            self.unmapped += 1;
            Entity::PLACEHOLDER
        })
    }

    fn set_mapped(&mut self, _source: Entity, _target: Entity) {}
}

/// The map from saved entity ids to the live entities of a load, built on another thread
/// for a large load: the main thread inserts components meanwhile, and waits for the map
/// only when a value holds an entity reference to map, or when the load returns it.
///
/// Shared (`&LoadMap`) rather than borrowed mutably, so that [`SnapshotEntityMapper`] keeps
/// the auto traits it had over a plain map (`Send`, `Sync`, `UnwindSafe`).
pub(crate) struct LoadMap {
    ready: OnceLock<EntityHashMap<Entity>>,
    building: Mutex<Option<std::thread::JoinHandle<EntityHashMap<Entity>>>>,
}

impl Default for LoadMap {
    /// The map of a load with no entities.
    fn default() -> Self {
        Self::ready(EntityHashMap::default())
    }
}

/// Loads of fewer entities build their map on the main thread: starting a thread costs more.
const MAP_ON_ANOTHER_THREAD_FROM: usize = 16_384;

impl LoadMap {
    fn ready(map: EntityHashMap<Entity>) -> Self {
        Self {
            ready: OnceLock::from(map),
            building: Mutex::new(None),
        }
    }

    /// Starts building the map of `saved[i]` to `live[i]`.
    pub(crate) fn build(saved: Vec<Entity>, live: Vec<Entity>) -> Self {
        fn collect(saved: Vec<Entity>, live: Vec<Entity>) -> EntityHashMap<Entity> {
            saved.into_iter().zip(live).collect()
        }
        // No threads to be had on the web.
        if live.len() < MAP_ON_ANOTHER_THREAD_FROM || cfg!(target_family = "wasm") {
            return Self::ready(collect(saved, live));
        }
        // Shared, so that the entities are still here if no thread can be started.
        let parts = Arc::new(Mutex::new(Some((saved, live))));
        let theirs = Arc::clone(&parts);
        let spawned = std::thread::Builder::new()
            .name("bevy_storage load map".into())
            .spawn(move || {
                let parts = theirs.lock().map(|mut p| p.take()).ok().flatten();
                parts.map_or_else(EntityHashMap::default, |(saved, live)| collect(saved, live))
            });
        match spawned {
            Ok(handle) => Self {
                ready: OnceLock::new(),
                building: Mutex::new(Some(handle)),
            },
            Err(e) => {
                warn!("building a load's entity map on the main thread: {e}");
                let parts = parts.lock().map(|mut p| p.take()).ok().flatten();
                Self::ready(
                    parts.map_or_else(EntityHashMap::default, |(saved, live)| collect(saved, live)),
                )
            }
        }
    }

    /// The map, once built (waits for its thread the first time).
    ///
    /// # Panics
    /// If the thread building it panicked (only an allocation failure can make it), this
    /// panics with its payload, and again on every later call: references are never mapped
    /// against a map that is not there.
    pub(crate) fn get(&self) -> &EntityHashMap<Entity> {
        self.ready.get_or_init(|| {
            let handle = self
                .building
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .take();
            match handle.map(std::thread::JoinHandle::join) {
                Some(Ok(map)) => map,
                Some(Err(panic)) => std::panic::resume_unwind(panic),
                None => panic!("the load's entity map was lost to an earlier panic"),
            }
        })
    }

    /// The map, taken out.
    pub(crate) fn take(&mut self) -> EntityHashMap<Entity> {
        self.get();
        self.ready.take().unwrap_or_default()
    }
}

/// Values of one component type taken from the world, ready to serialize on any thread.
pub(crate) trait CapturedColumn: Send + Sync {
    /// The component's type path (the name written in the snapshot).
    fn type_path(&self) -> &str;
    /// Row (index into the snapshot's entity list) of each value.
    fn rows(&self) -> &[u32];
    /// Sorts values by row so that relationship inserts replay in the saved order.
    fn sort_by_row(&mut self);
    /// The rows, to renumber them (a delta orders its rows after capture).
    fn rows_mut(&mut self) -> &mut Vec<u32>;
    /// The values as one serializable sequence.
    fn values<'a>(&'a self, registry: &'a TypeRegistry) -> Box<dyn erased_serde::Serialize + 'a>;
}

/// Values of one component type decoded from a snapshot, ready to insert.
pub(crate) trait LoadedColumn: Send {
    /// How many values.
    fn len(&self) -> usize;
    /// Keeps value `i` where `keep[i]` (merging a chain: values overwritten, removed or
    /// despawned by a later delta go).
    fn retain(&mut self, keep: &[bool]);
    /// Appends `other`'s values; false (and `other` dropped) if it holds another type.
    fn append(&mut self, other: Box<dyn LoadedColumn>) -> bool;
    /// For [`append`](Self::append)'s downcast.
    fn into_any(self: Box<Self>) -> Box<dyn std::any::Any>;
    /// The type of the values (two columns append only if it is the same).
    fn value_type(&self) -> TypeId;
    /// The values as the snapshot writes them, to encode a decoded world again (compacting a
    /// chain); `None` for values that have no saved form (a migration's output).
    fn saved_values<'a>(
        &'a self,
        registry: &'a TypeRegistry,
    ) -> Option<Box<dyn erased_serde::Serialize + 'a>>;
    /// Maps entity references and inserts value `i` on `targets[i]`.
    fn apply(
        self: Box<Self>,
        world: &mut World,
        targets: Vec<Entity>,
        mapper: &mut SnapshotEntityMapper,
        registry: &TypeRegistry,
    );
    /// Splits the values at `at`: keeps `[..at]`, returns the rest.
    fn split_off(&mut self, at: usize) -> Box<dyn LoadedColumn>;
    /// Maps entity references and hands the values over to be inserted together with each
    /// entity's other components, in one archetype move per entity; `Err(self)` for a column
    /// applied on its own with [`apply`](Self::apply) (relationships, whose hooks replay the
    /// saved order and need a live target, and reflected values).
    fn into_erased(
        self: Box<Self>,
        world: &mut World,
        mapper: &mut SnapshotEntityMapper,
    ) -> Result<ErasedValues, Box<dyn LoadedColumn>>;
}

/// Values of one component type, type-erased for a combined insert
/// ([`DecodedWorld::apply`](super::DecodedWorld::apply)): each is moved out at most once;
/// those never moved out are dropped with the column.
///
/// A concrete type rather than a trait object: the combined insert takes one value of each
/// column per entity, and a virtual call per value cost more than the rest of its bookkeeping.
pub(crate) struct ErasedValues {
    id: ComponentId,
    /// Value `i` is at `base + i * size` while `live[i]`.
    base: NonNull<u8>,
    size: usize,
    live: Vec<bool>,
    /// Drops one value in place (`None`: the type has no drop glue).
    drop_value: Option<unsafe fn(NonNull<u8>)>,
    /// Owns the values' memory: a `Vec<MaybeUninit<T>>`, whose own drop frees the memory and
    /// drops no value.
    _memory: Box<dyn std::any::Any + Send>,
}

// SAFETY: made only from a `Vec<T>` with `T: Send` (`new`), whose values it owns; the pointer
// is into that vector's buffer, which `_memory` owns and nothing else reaches.
unsafe impl Send for ErasedValues {}

/// Drops the `T` at `value`.
///
/// # Safety
/// `value` points to an initialised `T` that nothing reads or drops afterwards.
unsafe fn drop_value_as<T>(value: NonNull<u8>) {
    // SAFETY: the caller's contract.
    unsafe { value.cast::<T>().drop_in_place() }
}

impl ErasedValues {
    pub(crate) fn new<T: Send + 'static>(id: ComponentId, values: Vec<T>) -> Self {
        let live = vec![true; values.len()];
        // The same size and alignment: collected in place.
        let mut values: Vec<MaybeUninit<T>> = values.into_iter().map(MaybeUninit::new).collect();
        // The buffer stays where it is when the vector moves into `_memory` (it never grows).
        let base = NonNull::new(values.as_mut_ptr())
            .expect("a vector's pointer is never null")
            .cast();
        Self {
            id,
            base,
            size: std::mem::size_of::<T>(),
            live,
            drop_value: std::mem::needs_drop::<T>().then_some(drop_value_as::<T> as _),
            _memory: Box::new(values),
        }
    }

    /// The component the values are of.
    pub(crate) fn component(&self) -> ComponentId {
        self.id
    }

    /// Value `i`, to be moved into the world by the caller (`None` if it was taken or
    /// discarded already). A pointer not moved from leaks the value, nothing worse.
    #[inline]
    pub(crate) fn take(&mut self, i: usize) -> Option<OwningPtr<'_>> {
        if !std::mem::replace(self.live.get_mut(i)?, false) {
            return None;
        }
        // SAFETY: `i` is in bounds (`live` has one flag per value), so the offset stays in
        // the buffer; value `i` was initialised and still owned here (`live`), and is now
        // marked moved, so this column neither reads nor drops it again and the caller is its
        // only owner. The pointer is non-null and aligned for the values' type.
        Some(unsafe { OwningPtr::new(self.base.add(i * self.size)) })
    }

    /// True while value `i` is neither taken nor discarded.
    #[inline]
    pub(crate) fn is_live(&self, i: usize) -> bool {
        self.live.get(i).copied() == Some(true)
    }

    /// Drops value `i` (a later value for the same entity replaces it).
    pub(crate) fn discard(&mut self, i: usize) {
        if self.is_live(i) {
            self.live[i] = false;
            if let Some(drop_value) = self.drop_value {
                // SAFETY: value `i` was initialised and still owned here, and is marked dropped.
                unsafe { drop_value(self.base.add(i * self.size)) };
            }
        }
    }
}

impl Drop for ErasedValues {
    fn drop(&mut self) {
        let Some(drop_value) = self.drop_value else {
            return;
        };
        for (i, live) in self.live.iter().enumerate() {
            if *live {
                // SAFETY: a live value is initialised and owned here; this runs once.
                unsafe { drop_value(self.base.add(i * self.size)) };
            }
        }
    }
}

/// The bookkeeping every loaded column does the same way over its `Vec` of values (the
/// field named): length, merge-time retain and append (same type only), split, type.
macro_rules! loaded_column_bookkeeping {
    ($field:ident) => {
        fn len(&self) -> usize {
            self.$field.len()
        }

        fn retain(&mut self, keep: &[bool]) {
            retain_flagged(&mut self.$field, keep);
        }

        fn append(&mut self, other: Box<dyn LoadedColumn>) -> bool {
            match other.into_any().downcast::<Self>() {
                Ok(other) => {
                    self.$field.extend(other.$field);
                    true
                }
                Err(_) => false,
            }
        }

        fn into_any(self: Box<Self>) -> Box<dyn std::any::Any> {
            self
        }

        fn split_off(&mut self, at: usize) -> Box<dyn LoadedColumn> {
            self.split_values(at)
        }

        fn value_type(&self) -> TypeId {
            TypeId::of::<Self>()
        }
    };
}

/// What a typed component needs: the fast path of the snapshot.
pub(crate) trait TypedCodec: Send + Sync + 'static {
    fn type_path(&self) -> &'static str;
    fn type_id(&self) -> TypeId;
    fn capture(&self, world: &mut World, rows: &EntityHashMap<u32>) -> Box<dyn CapturedColumn>;
    /// The values changed since the chain's last capture (Bevy's change ticks: the caller
    /// sets the world's last change tick), plus those of `scope.fresh` entities (and, for
    /// `ChildOf`, of `scope.reordered` ones), each given a row by `rows`.
    fn capture_changed(
        &self,
        world: &mut World,
        scope: &DeltaScope,
        rows: &mut DeltaRows,
    ) -> Box<dyn CapturedColumn>;
    fn deserialize_values(
        &self,
        de: &mut dyn erased_serde::Deserializer<'_>,
    ) -> Result<Box<dyn LoadedColumn>, erased_serde::Error>;
}

pub(crate) struct Typed<T>(PhantomData<fn() -> T>);

impl<T> Typed<T> {
    pub(crate) fn new() -> Self {
        Self(PhantomData)
    }
}

/// The component bound of the typed fast path.
pub trait SnapshotComponent: Component + Clone + Serialize + DeserializeOwned + TypePath {}
impl<T> SnapshotComponent for T where T: Component + Clone + Serialize + DeserializeOwned + TypePath {}

impl<T: SnapshotComponent> TypedCodec for Typed<T> {
    fn type_path(&self) -> &'static str {
        T::type_path()
    }

    fn type_id(&self) -> TypeId {
        TypeId::of::<T>()
    }

    fn capture(&self, world: &mut World, rows: &EntityHashMap<u32>) -> Box<dyn CapturedColumn> {
        let (rows, values) = every_value::<T, T>(world, rows, T::clone);
        Box::new(TypedColumn { rows, values })
    }

    fn capture_changed(
        &self,
        world: &mut World,
        scope: &DeltaScope,
        rows: &mut DeltaRows,
    ) -> Box<dyn CapturedColumn> {
        let (rows, values) = changed_values::<T, T>(world, scope, rows, T::clone);
        Box::new(TypedColumn { rows, values })
    }

    fn deserialize_values(
        &self,
        de: &mut dyn erased_serde::Deserializer<'_>,
    ) -> Result<Box<dyn LoadedColumn>, erased_serde::Error> {
        let values: Vec<T> = erased_serde::deserialize(de)?;
        Ok(Box::new(TypedLoaded {
            values,
            save: Some(save_typed::<T>),
        }))
    }
}

/// The saved form of every persisted entity's `C` (by `save`) with its row in `rows`, for a
/// full capture. The columns are sized for every match up front: grown by doubling, a column
/// of a million entities was copied through every size from a few KiB up, each a fresh
/// allocation the kernel had to fault in (glibc maps allocations above 32 MiB anew every
/// time).
fn every_value<C: Component, S>(
    world: &mut World,
    rows: &EntityHashMap<u32>,
    save: impl Fn(&C) -> S,
) -> (Vec<u32>, Vec<S>) {
    let mut query = world.query_filtered::<(Entity, &C), With<Persist>>();
    let matches = query.iter(world);
    let mut out_rows = Vec::with_capacity(matches.len());
    let mut values = Vec::with_capacity(matches.len());
    for (entity, value) in matches {
        if let Some(&row) = rows.get(&entity) {
            out_rows.push(row);
            values.push(save(value));
        }
    }
    (out_rows, values)
}

/// How a mapped component is saved: converted to a serializable stand-in `S` on capture and
/// back on load (see
/// [`SnapshotRegistry::map_component`](super::SnapshotRegistry::map_component)).
pub(crate) struct Mapped<C, S> {
    to_saved: Arc<dyn Fn(&C) -> S + Send + Sync>,
    from_saved: Arc<dyn Fn(S) -> C + Send + Sync>,
}

impl<C, S> Mapped<C, S> {
    pub(crate) fn new(
        to_saved: impl Fn(&C) -> S + Send + Sync + 'static,
        from_saved: impl Fn(S) -> C + Send + Sync + 'static,
    ) -> Self {
        Self {
            to_saved: Arc::new(to_saved),
            from_saved: Arc::new(from_saved),
        }
    }
}

/// The stand-in bound of a mapped component.
pub trait SnapshotStandIn: Serialize + DeserializeOwned + Send + Sync + 'static {}
impl<S> SnapshotStandIn for S where S: Serialize + DeserializeOwned + Send + Sync + 'static {}

impl<C: Component + TypePath, S: SnapshotStandIn> TypedCodec for Mapped<C, S> {
    fn type_path(&self) -> &'static str {
        C::type_path()
    }

    fn type_id(&self) -> TypeId {
        TypeId::of::<C>()
    }

    fn capture(&self, world: &mut World, rows: &EntityHashMap<u32>) -> Box<dyn CapturedColumn> {
        let (rows, values) = every_value::<C, S>(world, rows, |c| (self.to_saved)(c));
        Box::new(MappedColumn::<C, S> {
            rows,
            values,
            component: PhantomData,
        })
    }

    fn capture_changed(
        &self,
        world: &mut World,
        scope: &DeltaScope,
        rows: &mut DeltaRows,
    ) -> Box<dyn CapturedColumn> {
        let (rows, values) = changed_values::<C, S>(world, scope, rows, |c| (self.to_saved)(c));
        Box::new(MappedColumn::<C, S> {
            rows,
            values,
            component: PhantomData,
        })
    }

    fn deserialize_values(
        &self,
        de: &mut dyn erased_serde::Deserializer<'_>,
    ) -> Result<Box<dyn LoadedColumn>, erased_serde::Error> {
        let saved: Vec<S> = erased_serde::deserialize(de)?;
        Ok(Box::new(MappedLoaded::<C, S> {
            saved,
            from_saved: Arc::clone(&self.from_saved),
        }))
    }
}

/// Loaded stand-ins of a mapped component, rebuilt into components only as they are applied:
/// `from_saved` runs once for each value of the loaded world, never for a value that a later
/// delta of a chain overwrote (a game's rebuild may register a handle somewhere).
struct MappedLoaded<C, S> {
    saved: Vec<S>,
    from_saved: Arc<dyn Fn(S) -> C + Send + Sync>,
}

impl<C: Component, S: SnapshotStandIn> LoadedColumn for MappedLoaded<C, S> {
    loaded_column_bookkeeping!(saved);

    fn saved_values<'a>(
        &'a self,
        _registry: &'a TypeRegistry,
    ) -> Option<Box<dyn erased_serde::Serialize + 'a>> {
        Some(Box::new(&self.saved))
    }

    fn apply(
        self: Box<Self>,
        world: &mut World,
        targets: Vec<Entity>,
        mapper: &mut SnapshotEntityMapper,
        registry: &TypeRegistry,
    ) {
        let values: Vec<C> = self
            .saved
            .into_iter()
            .map(|s| (self.from_saved)(s))
            .collect();
        Box::new(TypedLoaded { values, save: None }).apply(world, targets, mapper, registry);
    }

    fn into_erased(
        self: Box<Self>,
        world: &mut World,
        mapper: &mut SnapshotEntityMapper,
    ) -> Result<ErasedValues, Box<dyn LoadedColumn>> {
        let values: Vec<C> = self
            .saved
            .into_iter()
            .map(|s| (self.from_saved)(s))
            .collect();
        Box::new(TypedLoaded { values, save: None }).into_erased(world, mapper)
    }
}

impl<C: Component, S: SnapshotStandIn> MappedLoaded<C, S> {
    fn split_values(&mut self, at: usize) -> Box<dyn LoadedColumn> {
        Box::new(Self {
            saved: self.saved.split_off(at.min(self.saved.len())),
            from_saved: Arc::clone(&self.from_saved),
        })
    }
}

/// The stand-ins of a mapped component, written under the component's type path.
struct MappedColumn<C, S> {
    rows: Vec<u32>,
    values: Vec<S>,
    component: PhantomData<fn() -> C>,
}

impl<C: TypePath, S: SnapshotStandIn> CapturedColumn for MappedColumn<C, S> {
    fn type_path(&self) -> &str {
        C::type_path()
    }

    fn rows(&self) -> &[u32] {
        &self.rows
    }

    fn rows_mut(&mut self) -> &mut Vec<u32> {
        &mut self.rows
    }

    fn sort_by_row(&mut self) {
        if self.rows.is_sorted() {
            return;
        }
        let mut pairs: Vec<(u32, S)> = self.rows.drain(..).zip(self.values.drain(..)).collect();
        pairs.sort_by_key(|(row, _)| *row);
        (self.rows, self.values) = pairs.into_iter().unzip();
    }

    fn values<'a>(&'a self, _registry: &'a TypeRegistry) -> Box<dyn erased_serde::Serialize + 'a> {
        Box::new(&self.values)
    }
}

struct TypedColumn<T> {
    rows: Vec<u32>,
    values: Vec<T>,
}

impl<T: SnapshotComponent> CapturedColumn for TypedColumn<T> {
    fn type_path(&self) -> &str {
        T::type_path()
    }

    fn rows(&self) -> &[u32] {
        &self.rows
    }

    fn rows_mut(&mut self) -> &mut Vec<u32> {
        &mut self.rows
    }

    fn sort_by_row(&mut self) {
        if self.rows.is_sorted() {
            return;
        }
        let mut pairs: Vec<(u32, T)> = self.rows.drain(..).zip(self.values.drain(..)).collect();
        pairs.sort_by_key(|(row, _)| *row);
        (self.rows, self.values) = pairs.into_iter().unzip();
    }

    fn values<'a>(&'a self, _registry: &'a TypeRegistry) -> Box<dyn erased_serde::Serialize + 'a> {
        Box::new(&self.values)
    }
}

/// Keeps the values whose flag in `keep` (one per value, in order) is set.
fn retain_flagged<T>(values: &mut Vec<T>, keep: &[bool]) {
    let mut flags = keep.iter();
    values.retain(|_| flags.next().copied().unwrap_or(false));
}

/// Writes typed values as the snapshot does.
type SaveTyped<T> = for<'a> fn(&'a [T]) -> Box<dyn erased_serde::Serialize + 'a>;

fn save_typed<T: SnapshotComponent>(values: &[T]) -> Box<dyn erased_serde::Serialize + '_> {
    Box::new(values)
}

/// Decoded values of a typed component (also what migrations produce).
pub(crate) struct TypedLoaded<T> {
    pub(crate) values: Vec<T>,
    /// How the values are written again (`None`: a migration's output, which has no saved
    /// form).
    pub(crate) save: Option<SaveTyped<T>>,
}

impl<T: Component> LoadedColumn for TypedLoaded<T> {
    loaded_column_bookkeeping!(values);

    fn saved_values<'a>(
        &'a self,
        _registry: &'a TypeRegistry,
    ) -> Option<Box<dyn erased_serde::Serialize + 'a>> {
        self.save.map(|save| save(&self.values))
    }

    fn apply(
        self: Box<Self>,
        world: &mut World,
        targets: Vec<Entity>,
        mapper: &mut SnapshotEntityMapper,
        _registry: &TypeRegistry,
    ) {
        let id = world.register_component::<T>();
        let relationship = T::relationship_accessor().is_some();
        let total = targets.len();
        let mut rows = Vec::with_capacity(total);
        for (target, mut value) in targets.into_iter().zip(self.values) {
            mapper.unmapped = 0;
            T::map_entities(&mut value, mapper);
            if relationship && mapper.unmapped > 0 {
                continue;
            }
            rows.push((target, value));
        }
        warn_dropped::<T>(world, id, total - rows.len());
        world.insert_batch(rows);
    }

    fn into_erased(
        self: Box<Self>,
        world: &mut World,
        mapper: &mut SnapshotEntityMapper,
    ) -> Result<ErasedValues, Box<dyn LoadedColumn>> {
        if T::relationship_accessor().is_some() {
            return Err(self);
        }
        let id = world.register_component::<T>();
        let mut values = self.values;
        for value in &mut values {
            T::map_entities(value, mapper);
        }
        Ok(ErasedValues::new(id, values))
    }
}

impl<T: Component> TypedLoaded<T> {
    fn split_values(&mut self, at: usize) -> Box<dyn LoadedColumn> {
        Box::new(Self {
            values: self.values.split_off(at.min(self.values.len())),
            save: self.save,
        })
    }
}

/// Passes entities through: for values already mapped.
struct AlreadyMapped;

impl EntityMapper for AlreadyMapped {
    fn get_mapped(&mut self, source: Entity) -> Entity {
        source
    }

    fn set_mapped(&mut self, _source: Entity, _target: Entity) {}
}

/// True for relationship components (`ChildOf` and the game's own `#[relationship]`s) once
/// Bevy knows both sides: their hooks need a live target, so one that points outside the
/// snapshot is left out rather than inserted with a placeholder target (which Bevy's hooks
/// refuse with a panic).
fn is_relationship(world: &World, id: bevy::ecs::component::ComponentId) -> bool {
    world
        .components()
        .get_info(id)
        .is_some_and(|info| info.relationship_accessor().is_some())
}

fn warn_dropped<T>(world: &World, id: bevy::ecs::component::ComponentId, dropped: usize) {
    if dropped > 0 {
        let name = world.components().get_info(id).map_or_else(
            || std::any::type_name::<T>().to_string(),
            |i| i.name().to_string(),
        );
        warn!(
            "{dropped} {name} relationship(s) in the snapshot point at entities it does not hold (saved without their target?) and were left out"
        );
    }
}

/// Reflected values of one component type, cloned out of the world.
pub(crate) struct ReflectColumn {
    pub(crate) type_path: String,
    pub(crate) rows: Vec<u32>,
    pub(crate) values: Vec<Box<dyn PartialReflect>>,
}

impl CapturedColumn for ReflectColumn {
    fn type_path(&self) -> &str {
        &self.type_path
    }

    fn rows(&self) -> &[u32] {
        &self.rows
    }

    fn rows_mut(&mut self) -> &mut Vec<u32> {
        &mut self.rows
    }

    fn sort_by_row(&mut self) {
        if self.rows.is_sorted() {
            return;
        }
        let mut pairs: Vec<(u32, Box<dyn PartialReflect>)> =
            self.rows.drain(..).zip(self.values.drain(..)).collect();
        pairs.sort_by_key(|(row, _)| *row);
        (self.rows, self.values) = pairs.into_iter().unzip();
    }

    fn values<'a>(&'a self, registry: &'a TypeRegistry) -> Box<dyn erased_serde::Serialize + 'a> {
        Box::new(ReflectValues {
            values: &self.values,
            registry,
        })
    }
}

/// A sequence of reflected values, serialized with asset handles written as paths.
pub(crate) struct ReflectValues<'a> {
    pub(crate) values: &'a [Box<dyn PartialReflect>],
    pub(crate) registry: &'a TypeRegistry,
}

impl Serialize for ReflectValues<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serialize_reflected(
            serializer,
            self.values.iter().map(|value| value.as_ref()),
            self.registry,
        )
    }
}

/// Writes reflected values as a sequence, asset handles as paths. A handle to an asset that
/// was not loaded from a path cannot be restored: it is refused rather than silently written
/// as a default handle.
fn serialize_reflected<'v, S: Serializer>(
    serializer: S,
    values: impl ExactSizeIterator<Item = &'v dyn PartialReflect>,
    registry: &TypeRegistry,
) -> Result<S::Ok, S::Error> {
    let processor = HandleSerializeProcessor {
        ephemeral_handle_behavior: EphemeralHandleBehavior::Error,
    };
    let mut seq = serializer.serialize_seq(Some(values.len()))?;
    for value in values {
        seq.serialize_element(&TypedReflectSerializer::with_processor(
            value, registry, &processor,
        ))?;
    }
    seq.end()
}

/// Reflected values decoded from a snapshot, written again as [`ReflectValues`] writes them.
pub(crate) struct LoadedReflectValues<'a> {
    pub(crate) values: &'a [Box<dyn Reflect>],
    pub(crate) registry: &'a TypeRegistry,
}

impl Serialize for LoadedReflectValues<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serialize_reflected(
            serializer,
            self.values.iter().map(|value| value.as_partial_reflect()),
            self.registry,
        )
    }
}

/// Reflected values decoded (and converted to concrete types) from a snapshot.
pub(crate) struct ReflectLoaded {
    pub(crate) component: ReflectComponent,
    pub(crate) values: Vec<Box<dyn Reflect>>,
}

impl LoadedColumn for ReflectLoaded {
    loaded_column_bookkeeping!(values);

    fn saved_values<'a>(
        &'a self,
        registry: &'a TypeRegistry,
    ) -> Option<Box<dyn erased_serde::Serialize + 'a>> {
        Some(Box::new(LoadedReflectValues {
            values: &self.values,
            registry,
        }))
    }

    fn apply(
        self: Box<Self>,
        world: &mut World,
        targets: Vec<Entity>,
        mapper: &mut SnapshotEntityMapper,
        registry: &TypeRegistry,
    ) {
        let id = self.component.register_component(world);
        let relationship = is_relationship(world, id);
        let mut dropped = 0;
        for (entity, mut value) in targets.into_iter().zip(self.values) {
            mapper.unmapped = 0;
            self.component.map_entities(value.as_mut(), mapper);
            if mapper.unmapped == 0 {
                self.component.insert(
                    &mut world.entity_mut(entity),
                    value.as_partial_reflect(),
                    registry,
                );
            } else if relationship {
                dropped += 1;
            } else {
                // A reference outside the snapshot. Bevy tells relationships apart only once
                // both sides are registered, so insert without relationship hooks: a
                // relationship whose target was not saved must not reach its hook.
                self.component.apply_or_insert_mapped(
                    &mut world.entity_mut(entity),
                    value.as_partial_reflect(),
                    registry,
                    &mut AlreadyMapped,
                    RelationshipHookMode::Skip,
                );
            }
        }
        warn_dropped::<()>(world, id, dropped);
    }

    fn into_erased(
        self: Box<Self>,
        _world: &mut World,
        _mapper: &mut SnapshotEntityMapper,
    ) -> Result<ErasedValues, Box<dyn LoadedColumn>> {
        Err(self)
    }
}

impl ReflectLoaded {
    fn split_values(&mut self, at: usize) -> Box<dyn LoadedColumn> {
        Box::new(Self {
            component: self.component.clone(),
            values: self.values.split_off(at.min(self.values.len())),
        })
    }
}

/// A resource decoded from a snapshot, ready to insert.
pub(crate) trait LoadedResource: Send {
    /// The value as the snapshot writes it (a one-element list), to encode a decoded world
    /// again; `None` for a migration's output.
    fn saved_value<'a>(
        &'a self,
        registry: &'a TypeRegistry,
    ) -> Option<Box<dyn erased_serde::Serialize + 'a>>;

    /// Maps entity references and inserts (or replaces) the resource.
    fn apply(
        self: Box<Self>,
        world: &mut World,
        mapper: &mut SnapshotEntityMapper,
        registry: &TypeRegistry,
    );
}

/// A resource produced by a migration.
pub(crate) struct TypedResourceLoaded<R> {
    pub(crate) value: R,
}

impl<R: Resource> LoadedResource for TypedResourceLoaded<R> {
    fn saved_value<'a>(
        &'a self,
        _registry: &'a TypeRegistry,
    ) -> Option<Box<dyn erased_serde::Serialize + 'a>> {
        None
    }

    fn apply(
        self: Box<Self>,
        world: &mut World,
        mapper: &mut SnapshotEntityMapper,
        _registry: &TypeRegistry,
    ) {
        let mut value = self.value;
        R::map_entities(&mut value, mapper);
        world.insert_resource(value);
    }
}

/// A reflected resource.
pub(crate) struct ReflectResourceLoaded {
    pub(crate) component: ReflectComponent,
    pub(crate) value: Box<dyn Reflect>,
}

impl LoadedResource for ReflectResourceLoaded {
    fn saved_value<'a>(
        &'a self,
        registry: &'a TypeRegistry,
    ) -> Option<Box<dyn erased_serde::Serialize + 'a>> {
        Some(Box::new(LoadedReflectValues {
            values: std::slice::from_ref(&self.value),
            registry,
        }))
    }

    fn apply(
        self: Box<Self>,
        world: &mut World,
        mapper: &mut SnapshotEntityMapper,
        registry: &TypeRegistry,
    ) {
        let mut value = self.value;
        self.component.map_entities(value.as_mut(), mapper);
        // Resources are entities holding the resource component (Bevy 0.19).
        let resource_id = self.component.register_component(world);
        let entity = match world.resource_entities().get(resource_id) {
            Some(entity) => entity,
            None => world.spawn_empty().id(),
        };
        self.component.insert(
            &mut world.entity_mut(entity),
            value.as_partial_reflect(),
            registry,
        );
    }
}
