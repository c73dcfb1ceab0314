//! Save slots in a [`Store`]: snapshots with metadata that can be listed without decoding,
//! and rotating autosaves with fallback to the newest one that decodes.

//!
//! Listing and naming slots is Bevy-free; storing a snapshot and loading an autosave need the
//! `bevy` feature (they take [`SnapshotSettings`](super::SnapshotSettings) and decode worlds).

use std::time::SystemTime;

#[cfg(feature = "bevy")]
use bevy::log::warn;
use serde::{Deserialize, Serialize};

#[cfg(feature = "bevy")]
use super::encode::{SnapshotContext, decode};
#[cfg(feature = "bevy")]
use super::header::read_header;
#[cfg(feature = "bevy")]
use super::{DecodedWorld, SnapshotSettings};
use crate::backend::CustomMetadata;
use crate::error::Result;
#[cfg(feature = "bevy")]
use crate::error::StorageError;
#[cfg(feature = "bevy")]
use crate::store::SaveOptions;
use crate::store::{LoadOptions, Store};

const FIELD_FORMAT: &str = "snapshot_format";
const FIELD_GAME_VERSION: &str = "game_version";
const FIELD_ENTITIES: &str = "entity_count";

/// What a slot listing tells about one saved snapshot, read from record metadata only.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SlotInfo {
    /// The record key.
    pub key: String,
    /// When it was saved.
    pub saved_at: SystemTime,
    /// Game version that saved it.
    pub game_version: u32,
    /// Snapshot format version.
    pub format_version: u16,
    /// Entities in it.
    pub entity_count: u32,
    /// Stored size in bytes.
    pub size: u64,
    /// The game's own fields (play time, level name ...), as given when saving.
    pub custom: CustomMetadata,
}

#[cfg(feature = "bevy")]
/// Stores encoded snapshot bytes under `key` with the slot metadata (the snapshot's header
/// fields plus the game's own `custom` fields), compressed and encrypted as `settings` say,
/// or as the store does by default where they say nothing.
pub fn store_snapshot(
    store: &Store,
    key: &str,
    bytes: &[u8],
    settings: &SnapshotSettings,
    custom: CustomMetadata,
) -> Result<()> {
    let header = read_header(bytes)?;
    let mut options = SaveOptions::new().no_expiry();
    // Unset: the store's defaults, as for every other save.
    options.compression = settings.compression;
    options.encrypt = settings.encrypt;
    let options = options
        .metadata_map(custom)
        .metadata(FIELD_FORMAT, header.format_version)
        .metadata(FIELD_GAME_VERSION, header.game_version)
        .metadata(FIELD_ENTITIES, header.entity_count);
    store.save_bytes(key, bytes, &options).map(drop)
}

/// Reads the snapshot bytes under `key`, `None` if there is none.
pub fn read_snapshot(store: &Store, key: &str) -> Result<Option<Vec<u8>>> {
    Ok(store
        .load_bytes(key, &LoadOptions::default())?
        .map(|(bytes, _)| bytes))
}

/// The snapshots stored under `prefix`, newest first, from their metadata alone. Records
/// under the prefix that are not snapshots are skipped.
pub fn list_slots(store: &Store, prefix: &str) -> Result<Vec<SlotInfo>> {
    let mut slots = Vec::new();
    for key in store.list_keys(prefix)? {
        let Some(meta) = store.get_metadata(&key)? else {
            continue; // deleted or expired since the listing
        };
        let mut custom = meta.custom;
        let field = |c: &mut CustomMetadata, name: &str| c.remove(name).and_then(|v| v.as_u64());
        let (Some(format_version), Some(game_version), Some(entity_count)) = (
            field(&mut custom, FIELD_FORMAT),
            field(&mut custom, FIELD_GAME_VERSION),
            field(&mut custom, FIELD_ENTITIES),
        ) else {
            continue;
        };
        slots.push(SlotInfo {
            key,
            saved_at: meta.modified_at,
            game_version: game_version as u32,
            format_version: format_version as u16,
            entity_count: entity_count as u32,
            size: meta.size,
            custom,
        });
    }
    slots.sort_by(|a, b| b.saved_at.cmp(&a.saved_at).then_with(|| b.key.cmp(&a.key)));
    Ok(slots)
}

/// Key of autosave number `sequence` under `prefix` (zero-padded so keys sort by number).
pub fn autosave_key(prefix: &str, sequence: u64) -> String {
    format!("{prefix}{sequence:012}")
}

/// The autosave keys under `prefix`, oldest first.
pub fn autosave_keys(store: &Store, prefix: &str) -> Result<Vec<String>> {
    let mut keys: Vec<String> = store
        .list_keys(prefix)?
        .into_iter()
        .filter(|k| {
            k.len() == prefix.len() + 12 && k[prefix.len()..].bytes().all(|b| b.is_ascii_digit())
        })
        .collect();
    keys.sort();
    Ok(keys)
}

#[cfg(feature = "bevy")]
/// Stores a new autosave under `prefix` and deletes all but the newest `keep`. Returns the key.
pub fn store_autosave(
    store: &Store,
    prefix: &str,
    keep: usize,
    bytes: &[u8],
    settings: &SnapshotSettings,
    custom: CustomMetadata,
) -> Result<String> {
    let existing = autosave_keys(store, prefix)?;
    let next = existing
        .last()
        .and_then(|k| k[prefix.len()..].parse::<u64>().ok())
        .map_or(1, |n| n + 1);
    let key = autosave_key(prefix, next);
    store_snapshot(store, &key, bytes, settings, custom)?;
    let keep = keep.max(1);
    let mut all = existing;
    all.push(key.clone());
    let excess = all.len().saturating_sub(keep);
    for old in &all[..excess] {
        store.delete(old)?;
    }
    Ok(key)
}

#[cfg(feature = "bevy")]
/// The autosave [`load_newest_autosave`] found.
#[derive(Debug)]
pub struct LoadedAutosave {
    /// The key that decoded.
    pub key: String,
    /// Its decoded world, ready to apply.
    pub world: DecodedWorld,
    /// Newer autosaves that failed, newest first, with why.
    pub skipped: Vec<(String, StorageError)>,
}

#[cfg(feature = "bevy")]
/// Loads the newest autosave under `prefix` that reads and decodes. Each newer one that
/// fails is skipped with a warning (one corrupt write never loses the game) and reported in
/// the returned list. `Ok(None)` when there is no autosave at all.
pub fn load_newest_autosave(
    store: &Store,
    prefix: &str,
    context: &SnapshotContext,
) -> Result<Option<LoadedAutosave>> {
    let keys = autosave_keys(store, prefix)?;
    let mut skipped = Vec::new();
    for key in keys.into_iter().rev() {
        let attempt = read_snapshot(store, &key).and_then(|bytes| match bytes {
            Some(bytes) => decode(&bytes, context),
            None => Err(StorageError::Snapshot("it vanished while loading".into())),
        });
        match attempt {
            Ok(world) => {
                return Ok(Some(LoadedAutosave {
                    key,
                    world,
                    skipped,
                }));
            }
            Err(e) if e.is_backend_failure() => return Err(e),
            Err(e) => {
                warn!("autosave {key:?} cannot be loaded ({e}); trying the one before it");
                skipped.push((key, e));
            }
        }
    }
    match skipped.pop() {
        None => Ok(None),
        Some((key, last)) => Err(StorageError::Snapshot(format!(
            "no autosave under {prefix:?} could be loaded; the oldest, {key:?}, failed with: {last}"
        ))),
    }
}
