//! Step 4, on the main thread: put a decoded snapshot into the world, at once
//! ([`DecodedWorld::apply`]) or a slice per frame ([`DecodedWorld::spread`]).

use std::collections::VecDeque;
use std::iter::{repeat, repeat_n};
use std::ops::Range;
use std::ptr::NonNull;

use bevy::ecs::component::ComponentId;
use bevy::ecs::entity::EntityHashMap;
use bevy::ecs::entity_disabling::{DefaultQueryFilters, Disabled};
use bevy::ecs::reflect::AppTypeRegistry;
use bevy::prelude::*;
use bevy::ptr::OwningPtr;

use super::columns::{ErasedValues, LoadMap, LoadedColumn, LoadedResource, SnapshotEntityMapper};
use super::header::SnapshotHeader;
use super::{Loading, Persist};

/// A snapshot decoded and checked on a worker thread, ready for [`apply`](Self::apply).
pub struct DecodedWorld {
    pub(crate) header: SnapshotHeader,
    pub(crate) entities: Vec<Entity>,
    pub(crate) columns: Vec<(String, Vec<u32>, Box<dyn LoadedColumn>)>,
    pub(crate) resources: Vec<(String, Box<dyn LoadedResource>)>,
    pub(crate) registry: AppTypeRegistry,
}

impl std::fmt::Debug for DecodedWorld {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DecodedWorld")
            .field("header", &self.header)
            .field("entities", &self.entities.len())
            .field(
                "columns",
                &self.columns.iter().map(|c| &c.0).collect::<Vec<_>>(),
            )
            .field("resources", &self.resources.len())
            .finish()
    }
}

impl DecodedWorld {
    /// The snapshot's header.
    pub fn header(&self) -> SnapshotHeader {
        self.header
    }

    /// Writes the snapshot into `world`: despawns the entities marked [`Persist`] now (when
    /// `despawn_existing`), spawns the saved ones with their components, replaces the saved
    /// resources, and maps every entity reference. Returns the map from saved entity ids to
    /// the live entities. Everything was checked when decoding, so this does not fail.
    ///
    /// Each entity gets [`Persist`] and its typed components in one insert (one archetype
    /// move, `On<Add>`/`On<Insert>` hooks and observers seeing all of them); relationship
    /// components (`ChildOf`: their hooks rebuild `Children` in the saved order) and
    /// reflected ones follow, a column at a time.
    ///
    /// # Panics and aborts
    /// A hook or an observer of the game that panics while that combined insert runs aborts
    /// the process (after printing the panic): Bevy 0.19's `EntityWorldMut::insert_by_ids`
    /// is left unsound to call again for those components, so no caller may catch the panic
    /// and go on. A panic anywhere else unwinds as usual; do not step a load again after one.
    pub fn apply(self, world: &mut World, despawn_existing: bool) -> EntityHashMap<Entity> {
        let mut spread = self.spread(despawn_existing, usize::MAX);
        spread.hide = None;
        loop {
            if let Some(map) = spread.step(world) {
                return map;
            }
        }
    }

    /// The same load as [`apply`](Self::apply), applied by [`SpreadApply::step`] about
    /// `max_per_frame` entities (or values) at a time, one step per frame: a large load never
    /// holds a frame for long.
    ///
    /// What a game sees meanwhile: the first step hides every entity marked [`Persist`]
    /// (when `despawn_existing`) behind a disabling component ([`Loading`] when the app
    /// registered it, as `SnapshotPlugin` does; Bevy's [`Disabled`] otherwise); the loaded
    /// entities are spawned hidden too, and the last step shows them all at once. A game
    /// query (which leaves out disabled entities) therefore sees the old persisted world
    /// until the first step, no persisted entity while the load goes on, and the whole
    /// loaded world after the last step, never a half-loaded one; saved resources are
    /// replaced in the last step. Hooks and observers run as each entity is filled in, while
    /// it is still hidden: one that queries it needs `Allow<Loading>` (or `Allow<Disabled>`);
    /// commands reach it as usual. Entities the game spawns with [`Persist`] meanwhile are
    /// kept. Do not capture the world before the last step (the plugin holds every other
    /// world request until then).
    pub fn spread(self, despawn_existing: bool, max_per_frame: usize) -> SpreadApply {
        SpreadApply {
            stage: Stage::Start,
            despawn_existing,
            hide: Some(Hide::Disabled),
            budget: max_per_frame.max(1),
            old: Vec::new(),
            live: Vec::with_capacity(self.entities.len()),
            entities: self.entities.len(),
            saved: self.entities,
            map: LoadMap::default(),
            columns: self.columns.into(),
            together: Vec::new(),
            dense: false,
            alone: VecDeque::new(),
            next_row: 0,
            resources: self.resources,
            registry: self.registry,
        }
    }
}

/// A load applied over several frames: see [`DecodedWorld::spread`].
pub struct SpreadApply {
    stage: Stage,
    despawn_existing: bool,
    /// What hides the entities until the last step (none for [`DecodedWorld::apply`]).
    hide: Option<Hide>,
    budget: usize,
    /// Persisted entities to despawn, the last one first.
    old: Vec<Entity>,
    /// How many entities the snapshot holds.
    entities: usize,
    /// The saved entities' ids (until the map is built), and the live entities spawned for
    /// them so far.
    saved: Vec<Entity>,
    live: Vec<Entity>,
    map: LoadMap,
    columns: VecDeque<(String, Vec<u32>, Box<dyn LoadedColumn>)>,
    together: Vec<Together>,
    /// Every column of `together` is dense: [`insert_dense`] fills the entities in.
    dense: bool,
    alone: VecDeque<Alone>,
    /// The next row of the combined insert.
    next_row: usize,
    resources: Vec<(String, Box<dyn LoadedResource>)>,
    registry: AppTypeRegistry,
}

impl std::fmt::Debug for SpreadApply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SpreadApply")
            .field("stage", &self.stage)
            .field("entities", &self.entities)
            .field("spawned", &self.live.len())
            .field("filled", &self.next_row)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// Hide the old persisted entities.
    Start,
    /// Despawn them, spawn empty entities for the saved ones, then map and sort the columns.
    Despawn,
    Spawn,
    Columns,
    /// Fill the entities in.
    Together,
    Alone,
    /// Resources, and show the loaded entities.
    Finish,
    Done,
}

impl SpreadApply {
    /// Does the next slice of the load; the map from saved entity ids to live entities once
    /// the load is complete (this step was the last), `None` before. A step after the last
    /// one does nothing and returns an empty map.
    pub fn step(&mut self, world: &mut World) -> Option<EntityHashMap<Entity>> {
        let mut budget = self.budget;
        while budget > 0 {
            match self.stage {
                Stage::Start => {
                    if self.hide.is_some() {
                        self.hide = Some(Hide::choose(world));
                    }
                    if self.despawn_existing {
                        let mut query = world.query_filtered::<Entity, With<Persist>>();
                        self.old = query.iter(world).collect();
                        let old = self.old.iter().copied();
                        match self.hide {
                            Some(Hide::Loading) => world.insert_batch(old.zip(repeat(Loading))),
                            Some(Hide::Disabled) => world.insert_batch(old.zip(repeat(Disabled))),
                            None => {}
                        }
                    }
                    self.stage = Stage::Despawn;
                    if self.hide.is_some() && self.despawn_existing {
                        // Hiding them was this step's work.
                        return None;
                    }
                }
                Stage::Despawn => {
                    // Last table row first: each despawn removes its table's last row, nothing
                    // is moved to fill the hole.
                    let Some(entity) = self.old.pop() else {
                        self.stage = Stage::Spawn;
                        continue;
                    };
                    // Despawning a parent takes its children along: some may be gone already.
                    if let Ok(entity) = world.get_entity_mut(entity) {
                        entity.despawn();
                    }
                    budget -= 1;
                }
                Stage::Spawn => {
                    // Every saved entity exists before any component goes in: a hook or an
                    // observer of the first may look at the others.
                    let n = (self.entities - self.live.len()).min(budget);
                    match self.hide {
                        Some(Hide::Loading) => {
                            self.live.extend(world.spawn_batch(repeat_n(Loading, n)));
                        }
                        Some(Hide::Disabled) => {
                            self.live.extend(world.spawn_batch(repeat_n(Disabled, n)));
                        }
                        None => self.live.extend(world.spawn_batch(repeat_n((), n))),
                    }
                    budget -= n.max(1);
                    if self.live.len() == self.entities {
                        let saved = std::mem::take(&mut self.saved);
                        self.map = LoadMap::build(saved, self.live.clone());
                        self.stage = Stage::Columns;
                    }
                }
                Stage::Columns => {
                    let Some((_, rows, column)) = self.columns.pop_front() else {
                        let entities = self.live.len();
                        self.dense = self.together.iter().all(|column| column.is_dense(entities));
                        self.stage = Stage::Together;
                        continue;
                    };
                    budget = budget.saturating_sub(rows.len());
                    let mut mapper = SnapshotEntityMapper::new(&self.map);
                    match column.into_erased(world, &mut mapper) {
                        Ok(values) => {
                            let id = values.component();
                            if self.together.iter().any(|t| t.values.component() == id)
                                || world.component_id::<Persist>() == Some(id)
                            {
                                // Twice the same component (only hostile bytes say so): the
                                // later column replaces the earlier values, as inserting in
                                // order would.
                                self.alone.push_back(Alone::Erased(rows, values));
                            } else {
                                self.together.push(Together::new(rows, values));
                            }
                        }
                        Err(column) => self.alone.push_back(Alone::Column(rows, column)),
                    }
                }
                Stage::Together => {
                    let end = self.next_row.saturating_add(budget).min(self.live.len());
                    let rows = self.next_row..end;
                    if self.dense {
                        insert_dense(world, &self.live, rows, &mut self.together);
                    } else {
                        insert_together(world, &self.live, rows, &mut self.together);
                    }
                    budget -= (end - self.next_row).max(1);
                    self.next_row = end;
                    if end == self.live.len() {
                        self.together.clear();
                        self.stage = Stage::Alone;
                    }
                }
                Stage::Alone => {
                    let Some(column) = self.alone.pop_front() else {
                        self.stage = Stage::Finish;
                        continue;
                    };
                    let registry = self.registry.read();
                    let mut mapper = SnapshotEntityMapper::new(&self.map);
                    match column {
                        Alone::Column(mut rows, mut column) => {
                            // In order, a slice at a time: relationship hooks rebuild
                            // `Children` in the saved order.
                            if rows.len() > budget {
                                let rest = rows.split_off(budget);
                                let tail = column.split_off(budget);
                                self.alone.push_front(Alone::Column(rest, tail));
                            }
                            budget = budget.saturating_sub(rows.len().max(1));
                            let targets: Vec<Entity> =
                                rows.iter().map(|r| self.live[*r as usize]).collect();
                            column.apply(world, targets, &mut mapper, &registry);
                        }
                        Alone::Erased(rows, mut values) => {
                            budget = budget.saturating_sub(rows.len().max(1));
                            let id = values.component();
                            for (i, row) in rows.iter().enumerate() {
                                let Some(value) = values.take(i) else {
                                    continue;
                                };
                                let Ok(mut entity) = world.get_entity_mut(self.live[*row as usize])
                                else {
                                    continue;
                                };
                                // SAFETY: `id` is the component the values are of, registered
                                // in this world; `value` is one of them, owned and moved in here.
                                unsafe { entity.insert_by_id(id, value) };
                            }
                        }
                    }
                }
                Stage::Finish => {
                    let registry = self.registry.read();
                    let mut mapper = SnapshotEntityMapper::new(&self.map);
                    for (_, resource) in self.resources.drain(..) {
                        resource.apply(world, &mut mapper, &registry);
                    }
                    drop(registry);
                    if let Some(hide) = self.hide {
                        for &entity in &self.live {
                            if let Ok(mut entity) = world.get_entity_mut(entity) {
                                match hide {
                                    Hide::Loading => entity.remove::<Loading>(),
                                    Hide::Disabled => entity.remove::<Disabled>(),
                                };
                            }
                        }
                    }
                    // Relationship hooks queue their half (a parent's `Children`) as
                    // commands: run them now, or a world whose last column was `ChildOf`
                    // would be left without them.
                    world.flush();
                    self.stage = Stage::Done;
                    return Some(self.map.take());
                }
                Stage::Done => return Some(EntityHashMap::default()),
            }
        }
        None
    }

    /// True once the last step ran.
    pub fn is_done(&self) -> bool {
        self.stage == Stage::Done
    }
}

/// The disabling component that hides a spread load.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Hide {
    /// [`Loading`], when the app registered it as disabling (sparse: nothing moves).
    Loading,
    /// Bevy's own, otherwise.
    Disabled,
}

impl Hide {
    fn choose(world: &mut World) -> Self {
        let loading = world.register_component::<Loading>();
        let registered = world
            .get_resource::<DefaultQueryFilters>()
            .is_some_and(|filters| filters.disabling_ids().any(|id| id == loading));
        if registered {
            Hide::Loading
        } else {
            Hide::Disabled
        }
    }
}

/// A column applied on its own, after the combined insert.
enum Alone {
    Column(Vec<u32>, Box<dyn LoadedColumn>),
    Erased(Vec<u32>, ErasedValues),
}

/// A column of the combined insert, read in row order.
struct Together {
    rows: Vec<u32>,
    /// Value indices sorted by row (stable: a repeated row keeps its values' order); `None`
    /// when `rows` is sorted already (always, for a snapshot this crate wrote).
    order: Option<Vec<u32>>,
    /// The next position in row order.
    next: usize,
    values: ErasedValues,
}

impl Together {
    fn new(rows: Vec<u32>, values: ErasedValues) -> Self {
        let order = (!rows.is_sorted()).then(|| {
            let mut order: Vec<u32> = (0..rows.len() as u32).collect();
            order.sort_by_key(|i| rows[*i as usize]);
            order
        });
        Self {
            rows,
            order,
            next: 0,
            values,
        }
    }

    /// Value `i` is row `i`'s, for each of the `entities` rows: [`insert_dense`]'s case.
    fn is_dense(&self, entities: usize) -> bool {
        self.rows.len() == entities && self.rows.iter().enumerate().all(|(i, r)| *r as usize == i)
    }

    fn index(&self, position: usize) -> usize {
        match &self.order {
            Some(order) => order[position] as usize,
            None => position,
        }
    }

    /// The index of the value for `row`, if the column has one: rows are visited in
    /// increasing order. When a row repeats, the earlier values are dropped and the last
    /// one is kept.
    fn value_for(&mut self, row: u32) -> Option<usize> {
        let mut found = None;
        while self.next < self.rows.len() {
            let i = self.index(self.next);
            if self.rows[i] != row {
                break;
            }
            if let Some(earlier) = found.replace(i) {
                self.values.discard(earlier);
            }
            self.next += 1;
        }
        found
    }
}

/// A pointer to a value of the zero-sized marker `T`.
fn marker_ptr<T: Component + Default>() -> OwningPtr<'static> {
    const { assert!(std::mem::size_of::<T>() == 0) };
    // SAFETY: `T` is zero-sized, so a dangling, aligned, non-null pointer is a valid pointer
    // to a `T`: reading it reads nothing, and no value is owned by anyone (markers have no
    // drop glue that could observe the difference).
    unsafe { OwningPtr::new(NonNull::<T>::dangling().cast()) }
}

/// Inserts [`Persist`] and the values of `together` into the entities `live[rows]`, one
/// insert per entity.
fn insert_together(
    world: &mut World,
    live: &[Entity],
    rows: Range<usize>,
    together: &mut [Together],
) {
    let _abort_on_unwind = AbortOnUnwind;
    let persist = world.register_component::<Persist>();
    let mut ids: Vec<ComponentId> = Vec::with_capacity(together.len() + 1);
    let mut hits: Vec<Option<usize>> = vec![None; together.len()];
    for row in rows {
        ids.clear();
        ids.push(persist);
        for (column, hit) in together.iter_mut().zip(hits.iter_mut()) {
            *hit = column
                .value_for(row as u32)
                .filter(|i| column.values.is_live(*i));
            if hit.is_some() {
                ids.push(column.values.component());
            }
        }
        let Ok(mut entity) = world.get_entity_mut(live[row]) else {
            continue; // an observer of an earlier entity despawned it
        };
        let markers = std::iter::once(marker_ptr::<Persist>());
        let values = together
            .iter_mut()
            .zip(&hits)
            .filter_map(|(column, hit)| hit.map(|i| column.values.take(i).expect("a live value")));
        // SAFETY: `ids` are components of this world (registered above and by the columns)
        // and follow the pointers in order: `Persist`, then one value of
        // each column that has this row, of that column's component (`hits` holds only live
        // values, so `take` hands each over: nothing ran since they were checked); each is
        // handed over once, and `insert_by_ids` moves it into the table.
        unsafe { entity.insert_by_ids(&ids, markers.chain(values)) };
    }
}

/// [`insert_together`] when every column has a value for every entity, in entity order (a
/// world whose persisted entities all have the same typed components): the same components
/// for each entity, value `row` of each column for entity `live[row]`.
fn insert_dense(world: &mut World, live: &[Entity], rows: Range<usize>, together: &mut [Together]) {
    let _abort_on_unwind = AbortOnUnwind;
    let ids: Vec<ComponentId> = std::iter::once(world.register_component::<Persist>())
        .chain(together.iter().map(|column| column.values.component()))
        .collect();
    for row in rows {
        // Taken already only if a hook panicked in an earlier step and the caller went on:
        // those entities were filled in.
        if !together.iter().all(|column| column.values.is_live(row)) {
            continue;
        }
        let Ok(mut entity) = world.get_entity_mut(live[row]) else {
            continue; // an observer of an earlier entity despawned it
        };
        let markers = std::iter::once(marker_ptr::<Persist>());
        let values = together
            .iter_mut()
            .map(|column| column.values.take(row).expect("a dense column's value"));
        // SAFETY: `ids` are components of this world (registered above and by the columns)
        // and follow the pointers in order: `Persist`, then value `row` of each column, of
        // that column's component (checked live just above, and nothing ran since: each
        // `take` hands its value over, once); `insert_by_ids` moves each into the table.
        unsafe { entity.insert_by_ids(&ids, markers.chain(values)) };
    }
}

/// Aborts the process when dropped during a panic. Held while the combined insert calls
/// `EntityWorldMut::insert_by_ids`: Bevy 0.19 takes that component list's storage types out
/// of its bundle table for the duration of the call and puts them back only when the call
/// returns, so a panic from a hook or an observer inside it (a game's) leaves the list without
/// them, and the next `insert_by_ids` of the same list (the next load of the same entities)
/// moves entities into a table without writing their components: reading or dropping those
/// is undefined behaviour (a test saw a segmentation fault). Nothing outside Bevy can put them
/// back, so the process stops here, after the panic's message, before anything can catch the
/// panic and go on (the plugin catches a request's panics).
struct AbortOnUnwind;

impl Drop for AbortOnUnwind {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "bevy_storage: a hook or observer panicked while a snapshot load was inserting \
                 components; Bevy 0.19's `EntityWorldMut::insert_by_ids` cannot be used safely \
                 again for those components after that, so the process aborts rather than \
                 corrupt memory"
            );
            std::process::abort();
        }
    }
}
