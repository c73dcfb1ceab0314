//! What changed since a chain's last capture, read from Bevy's change ticks: the tick
//! columns of the persisted tables (`scan_changed`, the one `unsafe` read of the snapshot
//! capture, next to its safety argument), and the changed values of one component type.

use std::any::TypeId;
use std::cell::UnsafeCell;
use std::collections::HashSet;

use bevy::ecs::change_detection::{MAX_CHANGE_AGE, Tick};
use bevy::ecs::component::{ComponentId, StorageType};
use bevy::ecs::entity::EntityHashSet;
use bevy::ecs::storage::Table;
use bevy::prelude::*;

use crate::snapshot::Persist;

/// What a delta captures besides the values Bevy marks changed.
pub(crate) struct DeltaScope {
    /// Entities that became persisted since the last capture: every saved component of
    /// theirs goes in.
    pub(crate) fresh: EntityHashSet,
    /// Persisted children of a parent whose `Children` changed: their `ChildOf` goes in
    /// again, in the parent's order, so that a load rebuilds the same order.
    pub(crate) reordered: EntityHashSet,
}

/// The rows of a delta: each entity it names gets the next row the first time it is named.
#[derive(Default)]
pub(crate) struct DeltaRows {
    pub(crate) index: bevy::platform::collections::HashMap<Entity, u32>,
    pub(crate) entities: Vec<Entity>,
}

impl DeltaRows {
    pub(crate) fn row(&mut self, entity: Entity) -> u32 {
        *self.index.entry(entity).or_insert_with(|| {
            self.entities.push(entity);
            (self.entities.len() - 1) as u32
        })
    }
}

/// Calls `found` with each persisted entity whose `component` (table-stored) was changed
/// (`added`: added) since the world's last change tick, reading the tick columns of the
/// persisted tables straight: nothing is looked up for an unchanged entity. `false` (and no
/// call) when the component is not table-stored, for the caller to query instead.
pub(crate) fn scan_changed(
    world: &World,
    component: ComponentId,
    added: bool,
    mut found: impl FnMut(Entity),
) -> bool {
    scan_tables(world, component, added, |table, i| {
        found(table.entities()[i])
    })
}

/// [`scan_changed`] with the changed values: `C` read from the same table row.
fn scan_changed_values<C: Component>(
    world: &World,
    component: ComponentId,
    mut found: impl FnMut(Entity, &C),
) -> bool {
    scan_tables(world, component, false, |table, i| {
        // SAFETY: `component` is `C`'s id (the caller got it from `component_id::<C>`), the
        // table has this column (its ticks were just read) and `i` is below its length; we
        // hold `&World`, so nothing writes the value while we read it.
        let value = unsafe {
            let values = table
                .get_data_slice_for::<C>(component)
                .expect("the column whose ticks were read");
            &*values[i].get()
        };
        found(table.entities()[i], value);
    })
}

/// Rows whose ticks [`scan_tables`] tests together before looking at any one of them.
const SCAN_CHUNK: usize = 16;

/// The rows `i` of each persisted table holding `component` whose changed (or added) tick
/// is newer than the world's last change tick.
fn scan_tables(
    world: &World,
    component: ComponentId,
    added: bool,
    mut found: impl FnMut(&Table, usize),
) -> bool {
    let Some(persist) = world.component_id::<Persist>() else {
        return true; // nothing is persisted
    };
    let table_stored = world
        .components()
        .get_info(component)
        .is_some_and(|i| i.storage_type() == StorageType::Table);
    if !table_stored {
        return false;
    }
    // `Tick::is_newer_than`, hoisted: changed when `this - tick < min(this - last, MAX_AGE)`.
    let this_run = world.read_change_tick().get();
    let window = this_run
        .wrapping_sub(world.last_change_tick().get())
        .min(MAX_CHANGE_AGE);
    let tables = &world.storages().tables;
    let mut seen = HashSet::new();
    for archetype in world.archetypes().iter() {
        if archetype.is_empty() || !archetype.contains(component) || !archetype.contains(persist) {
            continue;
        }
        if !seen.insert(archetype.table_id().as_u32()) {
            continue; // archetypes differing in sparse-set components share a table
        }
        let Some(table) = tables.get(archetype.table_id()) else {
            continue;
        };
        let ticks = if added {
            table.get_added_ticks_slice_for(component)
        } else {
            table.get_changed_ticks_slice_for(component)
        };
        let Some(ticks) = ticks else {
            continue;
        };
        // `Persist` is table-stored: every entity of this table is persisted.
        for_each_changed(ticks, this_run, window, |i| found(table, i));
    }
    true
}

/// Calls `found` with the index of each tick of `ticks` newer than `this_run - window`
/// (`Tick::is_newer_than`, hoisted by the caller).
///
/// A chunk of [`SCAN_CHUNK`] rows at a time, a branch-free or-reduction says whether any is
/// changed, and only such a chunk is looked at row by row: at 1% changed the pass over the
/// ticks is the cost (3 columns and `Persist`'s added ticks of a million entities: 16 MB a
/// delta). Where the CPU has AVX2 the same loop is compiled for it, which tests 8 ticks per
/// instruction instead of 4 (SSE2, the baseline of `x86_64`): callgrind counted 2.4-2.7
/// instructions a tick before.
fn for_each_changed(
    ticks: &[UnsafeCell<Tick>],
    this_run: u32,
    window: u32,
    found: impl FnMut(usize),
) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2 (checked just above), the only requirement of a
        // `target_feature` function.
        unsafe { for_each_changed_avx2(ticks, this_run, window, found) };
        return;
    }
    for_each_changed_portable(ticks, this_run, window, found);
}

/// [`for_each_changed`] compiled for AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn for_each_changed_avx2(
    ticks: &[UnsafeCell<Tick>],
    this_run: u32,
    window: u32,
    found: impl FnMut(usize),
) {
    for_each_changed_portable(ticks, this_run, window, found);
}

/// The loop of [`for_each_changed`], inlined into each of its builds.
#[inline(always)]
fn for_each_changed_portable(
    ticks: &[UnsafeCell<Tick>],
    this_run: u32,
    window: u32,
    mut found: impl FnMut(usize),
) {
    let changed = |tick: &UnsafeCell<Tick>| {
        // SAFETY: the tick cells are only written through `&mut World` or a system's
        // exclusive access to this column; the caller holds `&World`, so nothing writes them
        // now (Bevy's own read-only queries read them the same way).
        let tick = unsafe { *tick.get() }.get();
        this_run.wrapping_sub(tick) < window
    };
    let chunks = ticks.chunks_exact(SCAN_CHUNK);
    let rest = chunks.remainder();
    for (c, chunk) in chunks.enumerate() {
        if chunk
            .iter()
            .fold(0u32, |any, tick| any | u32::from(changed(tick)))
            == 0
        {
            continue;
        }
        for (j, tick) in chunk.iter().enumerate() {
            if changed(tick) {
                found(c * SCAN_CHUNK + j);
            }
        }
    }
    let start = ticks.len() - rest.len();
    for (j, tick) in rest.iter().enumerate() {
        if changed(tick) {
            found(start + j);
        }
    }
}

/// The `C`s of persisted entities changed since the world's last change tick (set by the
/// caller to the chain's), plus those of `scope`'s entities, converted by `save`.
pub(super) fn changed_values<C: Component, S>(
    world: &mut World,
    scope: &DeltaScope,
    rows: &mut DeltaRows,
    save: impl Fn(&C) -> S,
) -> (Vec<u32>, Vec<S>) {
    let mut out_rows = Vec::new();
    let mut values = Vec::new();
    let mut seen = EntityHashSet::default();
    let track = !scope.fresh.is_empty() || !scope.reordered.is_empty();
    let mut take = |entity: Entity, value: &C| {
        out_rows.push(rows.row(entity));
        values.push(save(value));
        if track {
            seen.insert(entity);
        }
    };
    let scanned = match world.component_id::<C>() {
        None => true, // never inserted anywhere
        Some(id) => scan_changed_values::<C>(world, id, |entity, value| take(entity, value)),
    };
    if !scanned {
        let mut query = world.query_filtered::<(Entity, &C), (With<Persist>, Changed<C>)>();
        for (entity, value) in query.iter(world) {
            take(entity, value);
        }
    }
    let extra = scope.fresh.iter().chain(
        (TypeId::of::<C>() == TypeId::of::<ChildOf>())
            .then_some(scope.reordered.iter())
            .into_iter()
            .flatten(),
    );
    for &entity in extra {
        if !seen.insert(entity) {
            continue;
        }
        if let Some(value) = world.get::<C>(entity) {
            out_rows.push(rows.row(entity));
            values.push(save(value));
        }
    }
    (out_rows, values)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Both builds of the scan find exactly the ticks `Tick::is_newer_than` calls changed,
    /// across chunk boundaries, in the remainder and across the wrap of the tick counter.
    #[test]
    fn each_build_of_the_scan_finds_exactly_the_changed_ticks() {
        let mut rng = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        for (this_run, last_run) in [(1_000, 900), (5, u32::MAX - 5), (u32::MAX, 0)] {
            let window = this_run.wrapping_sub(last_run).min(MAX_CHANGE_AGE);
            for len in [0, 1, 15, 16, 17, 100, 1_003] {
                let ticks: Vec<UnsafeCell<Tick>> = (0..len)
                    .map(|_| {
                        let back = match next() % 4 {
                            0 => (next() % 200) as u32, // around the last run
                            1 => 0,
                            _ => (next() % u64::from(u32::MAX)) as u32,
                        };
                        UnsafeCell::new(Tick::new(this_run.wrapping_sub(back)))
                    })
                    .collect();
                let expected: Vec<usize> = ticks
                    .iter()
                    .enumerate()
                    .filter(|(_, t)| {
                        // SAFETY: the test owns the cells.
                        let tick = unsafe { *t.get() };
                        tick.is_newer_than(Tick::new(last_run), Tick::new(this_run))
                    })
                    .map(|(i, _)| i)
                    .collect();
                let mut found = Vec::new();
                for_each_changed(&ticks, this_run, window, |i| found.push(i));
                assert_eq!(found, expected, "dispatched build, len {len}");
                found.clear();
                for_each_changed_portable(&ticks, this_run, window, |i| found.push(i));
                assert_eq!(found, expected, "portable build, len {len}");
            }
        }
    }
}
