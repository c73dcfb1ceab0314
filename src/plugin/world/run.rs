//! How the world request kinds run (see `kind::RequestKind`): [`SaveWorld`] captures on the
//! main thread and writes on the pool, [`LoadWorld`] reads and decodes on the pool and
//! applies on the main thread, [`ListSlots`] lists on the pool.

use bevy::prelude::*;

use super::*;
use crate::backend::CustomMetadata;
use crate::error::StorageError;
use crate::plugin::kind::{Finish, RequestKind};
use crate::plugin::requests::{RequestId, SharedError, StorageResult};
use crate::plugin::scope::Scope;
use crate::snapshot::{
    self, CapturedDelta, CapturedWorld, ChainCursor, ChainStart, DecodedWorld, SnapshotContext,
    SnapshotRegistry, SnapshotSettings,
};
use crate::store::Store;

/// What a world save takes from the world when its turn comes.
pub(crate) struct SaveInput {
    captured: Captured,
    settings: SnapshotSettings,
    custom: CustomMetadata,
}

/// A whole world (starting a chain when the save is incremental) or a delta of the chain
/// whose base is under the key; with a context when the policy compacts the chain: the pool
/// then folds the chain and the delta into a new base instead of storing the delta.
enum Captured {
    Full(CapturedWorld, Option<ChainStart>),
    Delta(
        CapturedDelta,
        ChainCursor,
        String,
        Option<Box<SnapshotContext>>,
    ),
}

/// What a world save hands back from the pool: the response, and where the chain stands.
pub(crate) struct SaveOutput {
    saved: WorldSaved,
    chain: Option<(ChainCursor, String)>,
}

impl RequestKind for SaveWorld {
    type Response = WorldSaved;
    type Input = Option<SaveInput>;
    type Output = SaveOutput;
    const TOUCHES_WORLD: bool = true;

    fn id(&self) -> RequestId {
        self.id
    }

    fn resolve(&mut self, world: &World) {
        self.rotation = Some(rotation(world));
        let configured = world
            .get_resource::<AutosaveConfig>()
            .and_then(AutosaveConfig::chain);
        self.chain = match self.incremental {
            Some(true) => Some(configured.unwrap_or_default()),
            Some(false) => None,
            None if self.slot == WorldSlot::Autosave => configured,
            None => None,
        };
    }

    fn scope(&self) -> Scope {
        slot_scope(&self.slot, &self.rotation)
    }

    fn input(&self, world: &mut World) -> Result<Option<SaveInput>, SharedError> {
        if self.chain.is_some() && self.slot != WorldSlot::Autosave {
            return Err(shared(StorageError::Config(
                "only autosaves can be incremental: a snapshot chain lives in the autosave rotation"
                    .into(),
            )));
        }
        let settings = world
            .get_resource::<SnapshotSettings>()
            .cloned()
            .unwrap_or_default();
        let registry = world
            .get_resource::<SnapshotRegistry>()
            .cloned()
            .unwrap_or_else(SnapshotRegistry::new);
        let mut custom = world
            .get_resource::<SnapshotMetadata>()
            .map(|m| m.0.clone())
            .unwrap_or_default();
        custom.extend(self.metadata.clone());
        let captured = match (self.chain, self.slot == WorldSlot::Autosave) {
            (Some(policy), _) => {
                // Only ticks too old for change detection need a full capture here: a chain
                // the policy compacts is captured as a delta and folded on the pool.
                let cursor = world
                    .resource_mut::<ChainState>()
                    .cursor
                    .take()
                    .filter(|(cursor, _)| !cursor.ticks_too_old(world));
                match cursor {
                    Some((cursor, base)) => {
                        let compact = cursor
                            .wants_compaction(&policy)
                            .then(|| Box::new(SnapshotContext::from_world(world)));
                        Captured::Delta(
                            snapshot::capture_delta(world, &settings, &registry, &cursor)
                                .map_err(shared)?,
                            cursor,
                            base,
                            compact,
                        )
                    }
                    None => {
                        let (captured, start) =
                            snapshot::capture_base(world, &settings, &registry).map_err(shared)?;
                        Captured::Full(captured, Some(start))
                    }
                }
            }
            (None, autosave) => {
                if autosave {
                    // A full autosave the chain did not ask for: a delta cannot follow it.
                    world.resource_mut::<ChainState>().cursor = None;
                    snapshot::stop_chain(world);
                }
                Captured::Full(
                    snapshot::capture(world, &settings, &registry).map_err(shared)?,
                    None,
                )
            }
        };
        Ok(Some(SaveInput {
            captured,
            settings,
            custom,
        }))
    }

    fn run(&self, store: &Store, input: Option<SaveInput>) -> SaveOutput {
        let label = slot_label(&self.slot, &self.rotation);
        let autosave = self.slot == WorldSlot::Autosave;
        let Some(input) = input else {
            return SaveOutput {
                saved: self.fail(shared(StorageError::Snapshot(
                    "the world was not captured".into(),
                ))),
                chain: None,
            };
        };
        let keep = self
            .rotation
            .as_ref()
            .map_or(DEFAULT_AUTOSAVE_KEEP, |r| r.1);
        let SaveInput {
            captured,
            settings,
            custom,
        } = input;
        let mut delta = matches!(captured, Captured::Delta(..));
        let stored = match captured {
            Captured::Full(captured, start) => {
                let entities = captured.entity_count();
                captured.encode().and_then(|bytes| {
                    let key = if autosave {
                        snapshot::store_autosave(store, &label, keep, &bytes, &settings, custom)?
                    } else {
                        snapshot::store_snapshot(store, &label, &bytes, &settings, custom)?;
                        label.clone()
                    };
                    let chain = start.map(|start| (start.cursor(&bytes), key.clone()));
                    Ok((key, entities, chain))
                })
            }
            Captured::Delta(captured, cursor, base, compact) => {
                let entities = captured.live_count();
                let step = captured.step();
                captured.encode().and_then(|bytes| {
                    // False when a compaction failed for the chain's own sake: the delta then
                    // goes in as an ordinary one and the next autosave captures a full base.
                    let mut chain_continues = true;
                    if let Some(context) = compact {
                        match snapshot::store_compacted_autosave(
                            store,
                            &label,
                            keep,
                            &base,
                            &bytes,
                            &settings,
                            &context,
                            custom.clone(),
                        ) {
                            Ok((key, base_bytes)) => {
                                delta = false;
                                let cursor = ChainCursor::compacted(step, &base_bytes);
                                return Ok((key.clone(), entities, Some((cursor, key))));
                            }
                            Err(e) if e.is_backend_failure() => return Err(e),
                            Err(e) => {
                                // Nothing was written.
                                warn!(
                                    "the autosave chain under {label:?} could not be compacted ({e}); storing a delta, the next autosave is full"
                                );
                                chain_continues = false;
                            }
                        }
                    }
                    let key = snapshot::store_autosave_record(
                        store,
                        &label,
                        keep,
                        &bytes,
                        &settings,
                        custom,
                        Some(&base),
                    )?;
                    let chain = chain_continues.then(|| (cursor.advance(step, &bytes), base));
                    Ok((key, entities, chain))
                })
            }
        };
        match stored {
            Ok((key, entities, chain)) => SaveOutput {
                saved: WorldSaved {
                    id: self.id,
                    key,
                    autosave,
                    delta,
                    result: Ok(entities),
                },
                chain,
            },
            Err(e) => SaveOutput {
                saved: self.fail(shared(e)),
                chain: None,
            },
        }
    }

    fn finish(&self, world: &mut World, output: SaveOutput) -> WorldSaved {
        if let Some(mut timer) = world.get_resource_mut::<AutosaveTimer>()
            && timer.running == Some(self.id)
        {
            timer.running = None;
        }
        let SaveOutput { saved, chain } = output;
        if self.chain.is_some() && self.slot == WorldSlot::Autosave {
            // A failed save leaves no cursor: the removals its delta took are in no record,
            // so the next autosave is full.
            world.resource_mut::<ChainState>().cursor = chain;
        }
        match &saved.result {
            Ok(n) => debug!(
                "world saved to {:?} ({n} entities{})",
                saved.key,
                if saved.delta { ", a delta" } else { "" }
            ),
            Err(e) => error!("world save to {:?} failed: {e}", saved.key),
        }
        saved
    }

    fn fail(&self, error: SharedError) -> WorldSaved {
        WorldSaved {
            id: self.id,
            key: slot_label(&self.slot, &self.rotation),
            autosave: self.slot == WorldSlot::Autosave,
            delta: false,
            result: Err(error),
        }
    }
}

/// What a world load hands back from the pool: the decoded snapshot, to apply.
pub(crate) struct LoadOutput {
    key: String,
    result: StorageResult<DecodedWorld>,
    skipped: Vec<(String, SharedError)>,
}

impl RequestKind for LoadWorld {
    type Response = WorldLoaded;
    type Input = Option<SnapshotContext>;
    type Output = LoadOutput;
    const TOUCHES_WORLD: bool = true;

    fn id(&self) -> RequestId {
        self.id
    }

    fn resolve(&mut self, world: &World) {
        self.rotation = Some(rotation(world));
    }

    fn scope(&self) -> Scope {
        slot_scope(&self.slot, &self.rotation)
    }

    fn input(&self, world: &mut World) -> Result<Option<SnapshotContext>, SharedError> {
        Ok(Some(SnapshotContext::from_world(world)))
    }

    fn run(&self, store: &Store, context: Option<SnapshotContext>) -> LoadOutput {
        let label = slot_label(&self.slot, &self.rotation);
        let failed = |e: StorageError| LoadOutput {
            key: label.clone(),
            result: Err(shared(e)),
            skipped: Vec::new(),
        };
        let Some(context) = context else {
            return failed(StorageError::Snapshot("the world was not read".into()));
        };
        match &self.slot {
            WorldSlot::Key(key) => {
                let decoded = snapshot::load_world(store, key, &context).and_then(|world| {
                    world.ok_or_else(|| StorageError::NoSnapshot { key: key.clone() })
                });
                match decoded {
                    Ok(world) => LoadOutput {
                        key: key.clone(),
                        result: Ok(world),
                        skipped: Vec::new(),
                    },
                    Err(e) => failed(e),
                }
            }
            WorldSlot::Autosave => match snapshot::load_newest_autosave(store, &label, &context) {
                Ok(Some(found)) => LoadOutput {
                    key: found.key,
                    result: Ok(found.world),
                    skipped: found
                        .skipped
                        .into_iter()
                        .map(|(k, e)| (k, shared(e)))
                        .collect(),
                },
                Ok(None) => failed(StorageError::NoSnapshot { key: label.clone() }),
                Err(e) => failed(e),
            },
        }
    }

    fn finish(&self, world: &mut World, output: LoadOutput) -> WorldLoaded {
        match self.finish_over_frames(world, output) {
            Finish::Now(loaded) => loaded,
            Finish::Later(mut step) => loop {
                if let Some(loaded) = step(world) {
                    break loaded;
                }
            },
        }
    }

    fn finish_over_frames(&self, world: &mut World, output: LoadOutput) -> Finish<WorldLoaded> {
        let LoadOutput {
            key,
            result,
            skipped,
        } = output;
        let id = self.id;
        let decoded = match result {
            Ok(decoded) => decoded,
            Err(e) => {
                // Nothing saved yet is an ordinary answer (a first run), not a failure.
                if matches!(*e, StorageError::NoSnapshot { .. }) {
                    info!("{e}");
                } else {
                    error!("world load from {key:?} failed, the world is unchanged: {e}");
                }
                return Finish::Now(WorldLoaded {
                    id,
                    key,
                    result: Err(e),
                    skipped,
                });
            }
        };
        // The persisted entities are replaced: the chain being written no longer
        // describes this world (and its observers need not see the despawns).
        snapshot::stop_chain(world);
        if let Some(mut chain) = world.get_resource_mut::<ChainState>() {
            chain.cursor = None;
        }
        let despawn = world
            .get_resource::<SnapshotSettings>()
            .is_none_or(|s| s.despawn_existing);
        let Some(max_per_frame) = self.spread else {
            let map = decoded.apply(world, despawn);
            return Finish::Now(WorldLoaded {
                id,
                key,
                result: Ok(map),
                skipped,
            });
        };
        // The first step (hiding the old world) runs now, the others one a frame.
        let mut spread = decoded.spread(despawn, max_per_frame);
        let loaded = move |map| WorldLoaded {
            id,
            key: key.clone(),
            result: Ok(map),
            skipped: skipped.clone(),
        };
        if let Some(map) = spread.step(world) {
            return Finish::Now(loaded(map));
        }
        let spread = std::sync::Mutex::new(spread);
        Finish::Later(Box::new(move |world: &mut World| {
            let mut spread = spread.lock().unwrap_or_else(|p| p.into_inner());
            spread.step(world).map(&loaded)
        }))
    }

    fn fail(&self, error: SharedError) -> WorldLoaded {
        WorldLoaded {
            id: self.id,
            key: slot_label(&self.slot, &self.rotation),
            result: Err(error),
            skipped: Vec::new(),
        }
    }
}
