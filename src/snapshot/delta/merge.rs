//! Decoding deltas and merging a chain (its base, then every delta in order) into one
//! [`DecodedWorld`] on a worker thread: a value overwritten, removed or despawned by a later
//! delta is dropped here, so the main thread applies a chain as it would one snapshot.

use std::collections::HashMap;

use bevy::ecs::reflect::AppTypeRegistry;
use bevy::prelude::*;
use serde::de::{Error as _, SeqAccess};

use crate::error::{Result, StorageError};
use crate::snapshot::SnapshotSettings;
use crate::snapshot::apply::DecodedWorld;
use crate::snapshot::encode::{
    BodyShape, ColumnsSeed, DecodeState, LoadedColumns, LoadedResources, ResourcesSeed,
    SnapshotContext, check_columns, decode, decode_body, saved_entities,
};
use crate::snapshot::header::{
    DELTA_HEADER_LEN, RecordKind, RecordLink, SnapshotHeader, read_delta_header, record_kind,
};

/// A delta decoded and checked on a worker thread, ready to merge onto its chain.
pub(crate) struct DecodedDelta {
    entities: Vec<Entity>,
    despawned: Vec<Entity>,
    removed: Vec<(String, Vec<u32>)>,
    columns: LoadedColumns,
    resources: LoadedResources,
}

type DeltaParts = (
    Vec<u64>,
    Vec<u64>,
    Vec<(String, Vec<u32>)>,
    LoadedColumns,
    LoadedResources,
);

/// A delta's body: (entities, despawned, removed, columns, resources).
struct DeltaBody;

impl BodyShape for DeltaBody {
    type Value = DeltaParts;
    const LEN: usize = 5;
    const WHAT: &'static str =
        "a snapshot delta body (entities, despawned, removed, components, resources)";
    fn visit<'de, A: SeqAccess<'de>>(
        state: &DecodeState<'_>,
        mut seq: A,
    ) -> std::result::Result<DeltaParts, A::Error> {
        let missing = |what| A::Error::custom(format!("delta body ends before its {what}"));
        let entities: Vec<u64> = seq.next_element()?.ok_or_else(|| missing("entities"))?;
        let despawned: Vec<u64> = seq.next_element()?.ok_or_else(|| missing("despawned"))?;
        let removed: Vec<(String, Vec<u32>)> =
            seq.next_element()?.ok_or_else(|| missing("removed"))?;
        let columns = seq
            .next_element_seed(ColumnsSeed(state))?
            .ok_or_else(|| missing("components"))?;
        let resources = seq
            .next_element_seed(ResourcesSeed(state))?
            .ok_or_else(|| missing("resources"))?;
        Ok((entities, despawned, removed, columns, resources))
    }
}

/// Decodes a delta record (untrusted bytes: bounded nesting, typed errors, every row checked).
pub(crate) fn decode_delta(bytes: &[u8], context: &SnapshotContext) -> Result<DecodedDelta> {
    let header = read_delta_header(bytes)?;
    if header.game_version > context.game_version {
        return Err(StorageError::SnapshotGameVersionTooNew {
            found: header.game_version,
            current: context.game_version,
        });
    }
    let (entities, despawned, removed, columns, resources) = decode_body::<DeltaBody>(
        header.encoding,
        header.game_version,
        &bytes[DELTA_HEADER_LEN..],
        context,
    )?;
    let entities = saved_entities(entities)?;
    let despawned = saved_entities(despawned)?;
    if entities.len() != header.entity_count as usize {
        return Err(StorageError::Snapshot(format!(
            "delta header says {} entities, body has {}",
            header.entity_count,
            entities.len()
        )));
    }
    check_columns(&columns, entities.len())?;
    for (type_path, rows) in &removed {
        if let Some(bad) = rows.iter().find(|r| **r as usize >= entities.len()) {
            return Err(StorageError::Snapshot(format!(
                "removal of {type_path} names entity row {bad} of {}",
                entities.len()
            )));
        }
    }
    Ok(DecodedDelta {
        entities,
        despawned,
        removed,
        columns,
        resources,
    })
}

/// A chain being merged on a worker thread: the base, then each delta in turn.
pub(crate) struct ChainMerge {
    header: SnapshotHeader,
    registry: AppTypeRegistry,
    entities: Vec<Entity>,
    alive: Vec<bool>,
    /// Saved id to merged row.
    index: bevy::platform::collections::HashMap<Entity, u32>,
    columns: LoadedColumns,
    resources: LoadedResources,
    last: RecordLink,
    sequence: u32,
}

impl ChainMerge {
    /// Starts from a decoded base whose record is `base_bytes`.
    pub(crate) fn new(base: DecodedWorld, base_bytes: &[u8]) -> Self {
        let index = base
            .entities
            .iter()
            .enumerate()
            .map(|(i, e)| (*e, i as u32))
            .collect();
        Self {
            header: base.header,
            registry: base.registry,
            alive: vec![true; base.entities.len()],
            entities: base.entities,
            index,
            columns: base.columns,
            resources: base.resources,
            last: RecordLink::of(base_bytes),
            sequence: 0,
        }
    }

    /// Decodes the delta `bytes` and merges it, if it follows the last record merged. On an
    /// error the merge is as it was (the chain's state up to the record before).
    pub(crate) fn push(&mut self, bytes: &[u8], context: &SnapshotContext) -> Result<()> {
        if record_kind(bytes) != Some(RecordKind::Delta) {
            return Err(StorageError::Snapshot(
                "a record in the middle of a snapshot chain is not a delta".into(),
            ));
        }
        let header = read_delta_header(bytes)?;
        if header.parent != self.last || header.sequence != self.sequence + 1 {
            return Err(StorageError::Snapshot(format!(
                "delta {} of the chain does not follow the record before it (it names a parent of {} bytes, CRC {:08x}; the record before is delta {} of {} bytes, CRC {:08x}): it belongs to another base",
                header.sequence,
                header.parent.len,
                header.parent.crc,
                self.sequence,
                self.last.len,
                self.last.crc
            )));
        }
        let delta = decode_delta(bytes, context)?;
        for (type_path, _, column) in &delta.columns {
            if let Some((_, _, ours)) = self.columns.iter().find(|c| &c.0 == type_path)
                && ours.value_type() != column.value_type()
            {
                return Err(StorageError::Snapshot(format!(
                    "delta {} holds {type_path} in another shape than its base",
                    header.sequence
                )));
            }
        }
        self.merge(delta);
        self.last = RecordLink::of(bytes);
        self.sequence = header.sequence;
        Ok(())
    }

    fn merge(&mut self, delta: DecodedDelta) {
        let mut dead = Vec::new();
        for entity in &delta.despawned {
            if let Some(row) = self.index.remove(entity) {
                self.alive[row as usize] = false;
                dead.push(row);
            }
        }
        let rows: Vec<u32> = delta
            .entities
            .iter()
            .map(|entity| {
                *self.index.entry(*entity).or_insert_with(|| {
                    self.entities.push(*entity);
                    self.alive.push(true);
                    (self.entities.len() - 1) as u32
                })
            })
            .collect();
        let mut dropped: HashMap<&str, Vec<u32>> = HashMap::new();
        for (type_path, list) in &delta.removed {
            dropped
                .entry(type_path)
                .or_default()
                .extend(list.iter().map(|r| rows[*r as usize]));
        }
        for (type_path, list, _) in &delta.columns {
            dropped
                .entry(type_path)
                .or_default()
                .extend(list.iter().map(|r| rows[*r as usize]));
        }
        let mut drop_mask = vec![false; self.entities.len()];
        for row in &dead {
            drop_mask[*row as usize] = true;
        }
        for (type_path, column_rows, column) in &mut self.columns {
            let own = dropped.get(type_path.as_str());
            if dead.is_empty() && own.is_none_or(Vec::is_empty) {
                continue;
            }
            if let Some(own) = own {
                for row in own {
                    drop_mask[*row as usize] = true;
                }
            }
            let keep: Vec<bool> = column_rows
                .iter()
                .map(|r| !drop_mask[*r as usize])
                .collect();
            if keep.iter().any(|k| !k) {
                column.retain(&keep);
                let mut i = 0;
                column_rows.retain(|_| {
                    i += 1;
                    keep[i - 1]
                });
            }
            if let Some(own) = own {
                for row in own {
                    drop_mask[*row as usize] = false;
                }
                for row in &dead {
                    drop_mask[*row as usize] = true;
                }
            }
        }
        for (type_path, list, column) in delta.columns {
            let mapped = list.iter().map(|r| rows[*r as usize]);
            match self.columns.iter_mut().find(|c| c.0 == type_path) {
                Some((_, ours_rows, ours)) => {
                    ours_rows.extend(mapped);
                    let appended = ours.append(column);
                    debug_assert!(appended, "checked in push");
                }
                None => self.columns.push((type_path, mapped.collect(), column)),
            }
        }
        for (type_path, resource) in delta.resources {
            match self.resources.iter_mut().find(|r| r.0 == type_path) {
                Some(ours) => ours.1 = resource,
                None => self.resources.push((type_path, resource)),
            }
        }
    }

    /// The merged world, ready to apply.
    pub(crate) fn finish(self) -> DecodedWorld {
        let mut new_row = vec![u32::MAX; self.entities.len()];
        let mut entities = Vec::with_capacity(self.index.len());
        for (old, entity) in self.entities.into_iter().enumerate() {
            if self.alive[old] {
                new_row[old] = entities.len() as u32;
                entities.push(entity);
            }
        }
        let columns = self
            .columns
            .into_iter()
            .filter(|c| !c.1.is_empty())
            .map(|(path, rows, column)| {
                (
                    path,
                    rows.into_iter().map(|r| new_row[r as usize]).collect(),
                    column,
                )
            })
            .collect();
        DecodedWorld {
            header: SnapshotHeader {
                entity_count: entities.len() as u32,
                ..self.header
            },
            entities,
            columns,
            resources: self.resources,
            registry: self.registry,
        }
    }
}

/// Decodes a whole chain, its base first then every delta in order, into one world to apply:
/// all or nothing (any record that fails fails the chain).
pub fn decode_chain<B: AsRef<[u8]>>(
    records: &[B],
    context: &SnapshotContext,
) -> Result<DecodedWorld> {
    let Some((base, deltas)) = records.split_first() else {
        return Err(StorageError::Snapshot("an empty snapshot chain".into()));
    };
    let decoded = decode(base.as_ref(), context)?;
    let mut merge = ChainMerge::new(decoded, base.as_ref());
    for delta in deltas {
        merge.push(delta.as_ref(), context)?;
    }
    Ok(merge.finish())
}

/// Compacts a chain into one whole snapshot without the world: decodes its records (the
/// base, then every delta in order, as [`decode_chain`]) and encodes the merged world with
/// `settings`' encoding and game version. Loading the result gives what loading the chain
/// gives. Runs on a worker thread; fails as [`decode_chain`] does, or for a chain that had to
/// be migrated while decoding (a migration's output has no saved form).
pub fn compact_chain<B: AsRef<[u8]>>(
    records: &[B],
    context: &SnapshotContext,
    settings: &SnapshotSettings,
) -> Result<Vec<u8>> {
    decode_chain(records, context)?.encode(settings.encoding, settings.game_version)
}
