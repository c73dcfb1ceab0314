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
use super::delta::{ChainMerge, compact_chain, decode_chain};
#[cfg(feature = "bevy")]
use super::encode::{SnapshotContext, decode};
#[cfg(feature = "bevy")]
use super::header::{RecordKind, read_delta_header, read_header, record_kind};
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
/// On a delta of a snapshot chain: the key of the chain's base.
const FIELD_CHAIN_BASE: &str = "chain_base";
/// On a delta: its position in the chain (1 for the first after the base).
const FIELD_CHAIN_SEQUENCE: &str = "chain_sequence";

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
    /// Entities in it (for a delta: persisted entities in the world it was captured from,
    /// which its chain loads).
    pub entity_count: u32,
    /// For a delta of a snapshot chain: its base and position. `None` for a whole snapshot.
    #[serde(default)]
    pub chain: Option<ChainInfo>,
    /// Stored size in bytes.
    pub size: u64,
    /// The game's own fields (play time, level name ...), as given when saving.
    pub custom: CustomMetadata,
}

/// Where a delta sits in its snapshot chain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChainInfo {
    /// The key of the chain's base (a whole snapshot).
    pub base: String,
    /// Position in the chain: 1 for the first delta after the base.
    pub sequence: u32,
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
    store_record(store, key, bytes, settings, custom, None)
}

#[cfg(feature = "bevy")]
/// Stores a snapshot (`base` is `None`) or a delta of the chain whose base is under `base`.
fn store_record(
    store: &Store,
    key: &str,
    bytes: &[u8],
    settings: &SnapshotSettings,
    custom: CustomMetadata,
    base: Option<&str>,
) -> Result<()> {
    let mut options = SaveOptions::new().no_expiry();
    // Unset: the store's defaults, as for every other save.
    options.compression = settings.compression;
    options.encrypt = settings.encrypt;
    let options = options.metadata_map(custom);
    let options = match base {
        None => {
            let header = read_header(bytes)?;
            options
                .metadata(FIELD_FORMAT, header.format_version)
                .metadata(FIELD_GAME_VERSION, header.game_version)
                .metadata(FIELD_ENTITIES, header.entity_count)
        }
        Some(base) => {
            let header = read_delta_header(bytes)?;
            options
                .metadata(FIELD_FORMAT, header.format_version)
                .metadata(FIELD_GAME_VERSION, header.game_version)
                .metadata(FIELD_ENTITIES, header.live_count)
                .metadata(FIELD_CHAIN_BASE, base)
                .metadata(FIELD_CHAIN_SEQUENCE, header.sequence)
        }
    };
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
            chain: chain_info(&mut custom),
            size: meta.size,
            custom,
        });
    }
    slots.sort_by(|a, b| b.saved_at.cmp(&a.saved_at).then_with(|| b.key.cmp(&a.key)));
    Ok(slots)
}

/// Takes the chain fields out of a record's metadata.
fn chain_info(custom: &mut CustomMetadata) -> Option<ChainInfo> {
    let base = custom.remove(FIELD_CHAIN_BASE)?;
    let sequence = custom.remove(FIELD_CHAIN_SEQUENCE)?;
    Some(ChainInfo {
        base: base.as_str()?.to_owned(),
        sequence: u32::try_from(sequence.as_u64()?).ok()?,
    })
}

/// The chain of the record under `key` from its metadata: `None` for a whole snapshot (or
/// no record).
pub fn chain_of(store: &Store, key: &str) -> Result<Option<ChainInfo>> {
    Ok(store
        .get_metadata(key)?
        .and_then(|mut meta| chain_info(&mut meta.custom)))
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
    store_autosave_record(store, prefix, keep, bytes, settings, custom, None)
}

#[cfg(feature = "bevy")]
/// Stores a new autosave under `prefix`: a whole snapshot (`chain_base` is `None`) or a delta
/// of the chain whose base is the autosave `chain_base` (the delta must follow the newest
/// autosave). Then deletes the oldest autosaves beyond the newest `keep`, except those a kept
/// delta needs (its base and the deltas before it). Returns the key.
pub fn store_autosave_record(
    store: &Store,
    prefix: &str,
    keep: usize,
    bytes: &[u8],
    settings: &SnapshotSettings,
    custom: CustomMetadata,
    chain_base: Option<&str>,
) -> Result<String> {
    let existing = autosave_keys(store, prefix)?;
    let next = existing
        .last()
        .and_then(|k| k[prefix.len()..].parse::<u64>().ok())
        .map_or(1, |n| n + 1);
    let key = autosave_key(prefix, next);
    store_record(store, &key, bytes, settings, custom, chain_base)?;
    let keep = keep.max(1);
    let mut all = existing;
    all.push(key.clone());
    let mut first_kept = all.len().saturating_sub(keep);
    for (i, kept) in all.iter().enumerate().skip(first_kept) {
        let base = if i + 1 == all.len() {
            chain_base.map(str::to_owned)
        } else {
            chain_of(store, kept)?.map(|c| c.base)
        };
        if let Some(position) = base.and_then(|b| all.iter().position(|k| *k == b)) {
            first_kept = first_kept.min(position);
        }
    }
    for old in &all[..first_kept] {
        store.delete(old)?;
    }
    Ok(key)
}

#[cfg(feature = "bevy")]
/// Compacts the autosave chain whose base is the autosave `chain_base` without touching the
/// world (run it on a worker thread): reads the chain's records (its base and the deltas
/// after it, up to the newest autosave under `prefix`), merges them with `delta` (a delta
/// captured after the newest of them: it must follow it, or this fails) and stores the merged
/// world as a new whole autosave, with the rotation of [`store_autosave_record`]. Returns the
/// new autosave's key and its bytes; continue with
/// [`ChainCursor::compacted`](super::ChainCursor::compacted)`(step, &bytes)`.
///
/// Only one record is written, the new base, in one atomic write: a crash before it leaves
/// the chain as it was (the newest load is the chain without `delta`), a crash after it
/// leaves the new base, which loads alone; never a mix of the two. On an error nothing was
/// written: `delta` can still be stored as an ordinary delta of the chain.
#[allow(clippy::too_many_arguments)]
pub fn store_compacted_autosave(
    store: &Store,
    prefix: &str,
    keep: usize,
    chain_base: &str,
    delta: &[u8],
    settings: &SnapshotSettings,
    context: &SnapshotContext,
    custom: CustomMetadata,
) -> Result<(String, Vec<u8>)> {
    let keys = autosave_keys(store, prefix)?;
    let first = keys.iter().position(|k| k == chain_base).ok_or_else(|| {
        StorageError::Snapshot(format!(
            "the base {chain_base:?} of the chain to compact is gone"
        ))
    })?;
    let mut records = Vec::with_capacity(keys.len() - first + 1);
    for key in &keys[first..] {
        records.push(read_snapshot(store, key)?.ok_or_else(|| {
            StorageError::Snapshot(format!(
                "{key:?} of the chain to compact vanished while reading it"
            ))
        })?);
    }
    records.push(delta.to_vec());
    let bytes = compact_chain(&records, context, settings)?;
    drop(records);
    let key = store_autosave_record(store, prefix, keep, &bytes, settings, custom, None)?;
    Ok((key, bytes))
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
    let mut end = keys.len();
    while end > 0 {
        // Back from the newest candidate to the nearest whole snapshot that reads.
        let mut records: Vec<(usize, std::result::Result<Vec<u8>, StorageError>)> = Vec::new();
        let mut base = None;
        for i in (0..end).rev() {
            let read = read_snapshot(store, &keys[i]).and_then(|bytes| {
                bytes.ok_or_else(|| StorageError::Snapshot("it vanished while loading".into()))
            });
            match read {
                Err(e) if e.is_backend_failure() => return Err(e),
                Ok(bytes) if record_kind(&bytes) != Some(RecordKind::Delta) => {
                    base = Some((i, bytes));
                    break;
                }
                other => records.push((i, other)),
            }
        }
        let Some((b, base_bytes)) = base else {
            for (i, read) in records {
                let e = read.err().unwrap_or_else(|| {
                    StorageError::Snapshot("a delta whose chain has no readable base".into())
                });
                warn!("autosave {:?} cannot be loaded ({e})", keys[i]);
                skipped.push((keys[i].clone(), e));
            }
            break;
        };
        let decoded = match decode(&base_bytes, context) {
            Ok(decoded) => decoded,
            Err(e) => {
                for (i, _) in records {
                    skipped.push((keys[i].clone(), base_failed(&keys[b])));
                }
                warn!(
                    "autosave {:?} cannot be loaded ({e}); trying the one before it",
                    keys[b]
                );
                skipped.push((keys[b].clone(), e));
                end = b;
                continue;
            }
        };
        let mut merge = ChainMerge::new(decoded, &base_bytes);
        let mut loaded = b;
        let mut failed: Option<(usize, StorageError)> = None;
        let mut after_failed = Vec::new();
        for (i, read) in records.into_iter().rev() {
            if let Some((first, _)) = &failed {
                let e = StorageError::Snapshot(format!(
                    "it follows {:?}, which cannot be loaded",
                    keys[*first]
                ));
                after_failed.push((keys[i].clone(), e));
                continue;
            }
            match read.and_then(|bytes| merge.push(&bytes, context)) {
                Ok(()) => loaded = i,
                Err(e) => failed = Some((i, e)),
            }
        }
        // Newest first, as every list of skipped autosaves.
        skipped.extend(after_failed.into_iter().rev());
        if let Some((i, e)) = failed {
            warn!(
                "autosave {:?} cannot be loaded ({e}); loading its chain up to the record before it",
                keys[i]
            );
            skipped.push((keys[i].clone(), e));
        }
        return Ok(Some(LoadedAutosave {
            key: keys[loaded].clone(),
            world: merge.finish(),
            skipped,
        }));
    }
    match skipped.pop() {
        None => Ok(None),
        Some((key, last)) => Err(StorageError::Snapshot(format!(
            "no autosave under {prefix:?} could be loaded; the oldest, {key:?}, failed with: {last}"
        ))),
    }
}

#[cfg(feature = "bevy")]
fn base_failed(base: &str) -> StorageError {
    StorageError::Snapshot(format!("its chain's base {base:?} cannot be loaded"))
}

#[cfg(feature = "bevy")]
/// Reads and decodes the world under `key`: a whole snapshot, or a delta with its chain (the
/// base and every delta before it, read from the autosave rotation the key belongs to), all
/// or nothing. `Ok(None)` when there is no record under `key`.
pub fn load_world(
    store: &Store,
    key: &str,
    context: &SnapshotContext,
) -> Result<Option<DecodedWorld>> {
    let Some(bytes) = read_snapshot(store, key)? else {
        return Ok(None);
    };
    if record_kind(&bytes) != Some(RecordKind::Delta) {
        return decode(&bytes, context).map(Some);
    }
    let chain = chain_of(store, key)?.ok_or_else(|| {
        StorageError::Snapshot(format!("the delta {key:?} does not name its chain's base"))
    })?;
    let prefix = key.get(..key.len().saturating_sub(12)).unwrap_or_default();
    let keys = autosave_keys(store, prefix)?;
    let (Some(first), Some(last)) = (
        keys.iter().position(|k| *k == chain.base),
        keys.iter().position(|k| k == key),
    ) else {
        return Err(StorageError::Snapshot(format!(
            "the base {:?} of the delta {key:?} is gone",
            chain.base
        )));
    };
    let mut records = Vec::with_capacity(last + 1 - first);
    for k in &keys[first..last] {
        records.push(read_snapshot(store, k)?.ok_or_else(|| {
            StorageError::Snapshot(format!(
                "{k:?} of the chain of {key:?} vanished while loading"
            ))
        })?);
    }
    records.push(bytes);
    decode_chain(&records, context).map(Some)
}
