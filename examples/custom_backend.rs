//! A backend written by the game: every record in one human-readable JSON file.
//!
//! Small games often want their settings and profile in one file a player can back up or
//! edit. This backend keeps the records in memory and rewrites the whole file on each write,
//! crash-safely (temp file, fsync, rename). Everything the `Store` offers (TTL, metadata,
//! compression, encryption, transactions, quota) works on top of it unchanged.
//!
//! Run: `cargo run --example custom_backend` (twice: the second launch finds the first's
//! records in `saves/profile.json`, which stays there to be looked at).
//!
//! Tested like a built-in backend: `tests/custom_backend.rs` runs the conformance suite
//! (`bevy_storage::testing`, feature `testing`) against `JsonFileBackend`
//! (`cargo test --features testing --test custom_backend`).

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::PathBuf;

use bevy_storage::backend::memory::{apply_batch, remove_if_unchanged};
use bevy_storage::backend::{KeyEntry, Record, RecordMeta, WriteOp, WriteOutcome};
use bevy_storage::clock::Timestamp;
use bevy_storage::prelude::*;
use bevy_storage::{Backend, StorageOperation};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

/// The game's own backend: a JSON file with every record. (`pub(crate)`: the test target
/// `tests/custom_backend.rs` includes this file and runs the conformance suite against it.)
pub(crate) struct JsonFileBackend {
    path: PathBuf,
    records: Mutex<BTreeMap<String, Record>>,
}

/// How a record looks inside the JSON file.
#[derive(Serialize, Deserialize)]
struct JsonRecord {
    value: Vec<u8>,
    meta: RecordMeta,
}

impl JsonFileBackend {
    pub(crate) fn open(path: impl Into<PathBuf>) -> Result<Self, StorageError> {
        let path = path.into();
        let records = match fs::read(&path) {
            Ok(bytes) => {
                let file: BTreeMap<String, JsonRecord> =
                    serde_json::from_slice(&bytes).map_err(|e| {
                        StorageError::backend("json-file", format!("{}: {e}", path.display()))
                    })?;
                file.into_iter()
                    .map(|(k, r)| {
                        (
                            k,
                            Record {
                                value: r.value,
                                meta: r.meta,
                            },
                        )
                    })
                    .collect()
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(e) => return Err(StorageError::io(format!("reading {}", path.display()), e)),
        };
        Ok(Self {
            path,
            records: Mutex::new(records),
        })
    }

    /// Writes the whole map: temp file, fsync, rename. Called with the lock held.
    fn persist(&self, records: &BTreeMap<String, Record>) -> Result<(), StorageError> {
        let file: BTreeMap<&str, JsonRecord> = records
            .iter()
            .map(|(k, r)| {
                (
                    k.as_str(),
                    JsonRecord {
                        value: r.value.clone(),
                        meta: r.meta.clone(),
                    },
                )
            })
            .collect();
        let json =
            serde_json::to_vec_pretty(&file).map_err(|e| StorageError::backend("json-file", e))?;
        let tmp = self.path.with_extension("json.tmp");
        let io = |what: &str, e| StorageError::io(format!("{what} {}", tmp.display()), e);
        let mut f = fs::File::create(&tmp).map_err(|e| io("creating", e))?;
        f.write_all(&json).map_err(|e| io("writing", e))?;
        f.sync_all().map_err(|e| io("syncing", e))?;
        fs::rename(&tmp, &self.path).map_err(|e| io("renaming", e))
    }
}

impl Backend for JsonFileBackend {
    fn backend_type(&self) -> &str {
        "json-file"
    }

    fn get(&self, key: &str) -> Result<Option<Record>, StorageError> {
        Ok(self.records.lock().get(key).cloned())
    }

    fn write(&self, ops: Vec<WriteOp>, now: Timestamp) -> Result<Vec<WriteOutcome>, StorageError> {
        let mut records = self.records.lock();
        // Apply to a copy, persist it, and only then make it the current state: a failed
        // write leaves both the file and the memory image as they were.
        let mut next = records.clone();
        let outcomes = apply_batch(&mut next, ops, now)?;
        self.persist(&next)?;
        *records = next;
        Ok(outcomes)
    }

    /// What `Store::take` needs: compare and remove under the same lock as `write`, so no
    /// other change comes in between (the memory backend's helper does the comparison).
    fn delete_if_unchanged(
        &self,
        key: &str,
        value: &[u8],
        expires_at: Option<Timestamp>,
    ) -> Result<bool, StorageError> {
        let mut records = self.records.lock();
        let mut next = records.clone();
        if !remove_if_unchanged(&mut next, key, value, expires_at) {
            return Ok(false);
        }
        self.persist(&next)?;
        *records = next;
        Ok(true)
    }

    fn touch(&self, key: &str, at: Timestamp) -> Result<(), StorageError> {
        let mut records = self.records.lock();
        if let Some(r) = records.get_mut(key) {
            r.meta.accessed_at = at;
            self.persist(&records)?;
        }
        Ok(())
    }

    fn scan(&self, prefix: &str) -> Result<Vec<KeyEntry>, StorageError> {
        Ok(self
            .records
            .lock()
            .iter()
            .filter(|(k, _)| k.starts_with(prefix))
            .map(|(k, r)| KeyEntry {
                key: k.clone(),
                size: r.meta.size,
                expires_at: r.meta.expires_at,
            })
            .collect())
    }

    fn purge_expired(&self, now: Timestamp) -> Result<usize, StorageError> {
        let mut records = self.records.lock();
        let before = records.len();
        let mut next = records.clone();
        next.retain(|_, r| r.meta.is_live(now));
        let removed = before - next.len();
        if removed > 0 {
            self.persist(&next)?;
            *records = next;
        }
        Ok(removed)
    }

    fn clear(&self) -> Result<(), StorageError> {
        let mut records = self.records.lock();
        self.persist(&BTreeMap::new())?;
        records.clear();
        Ok(())
    }
}

#[derive(Serialize, Deserialize, Debug, PartialEq, Default)]
struct Settings {
    music_volume: f32,
    fullscreen: bool,
    key_bindings: BTreeMap<String, String>,
}

fn main() -> Result<(), StorageError> {
    // Under the current directory, and left there: look at it after a run, run again.
    let path = PathBuf::from("saves/profile.json");
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).map_err(|e| StorageError::io("creating saves/", e))?;
    }

    let store = Store::open(StorageConfig::custom(JsonFileBackend::open(&path)?))?;
    let launches = match store.get::<u32>("profile:launches")? {
        Some(n) => {
            let name: String = store.get("profile:name")?.unwrap_or_default();
            println!(
                "found the last launch's records in {}: {:?} (player {name}, {n} launches so far)",
                path.display(),
                store.list_keys("")?
            );
            n + 1
        }
        None => {
            println!("{} holds no profile yet", path.display());
            1
        }
    };
    let settings = Settings {
        music_volume: 0.6,
        fullscreen: true,
        key_bindings: [("jump".to_string(), "Space".to_string())].into(),
    };
    store.save(
        "settings",
        &settings,
        &SaveOptions::new().compression(Compression::Off),
    )?;
    store.transaction(vec![
        StorageOperation::save("profile:name", "Ada"),
        StorageOperation::save("profile:launches", launches),
    ])?;
    println!("launch {launches}: saved 3 records");
    // A one-off record, taken (loaded and deleted atomically) through the backend's
    // delete_if_unchanged: the second take finds nothing.
    store.set("mail:welcome", &"a wooden sword")?;
    let gift: Option<String> = store.take("mail:welcome", &LoadOptions::default())?;
    assert_eq!(gift.as_deref(), Some("a wooden sword"));
    assert_eq!(
        store.take::<String>("mail:welcome", &LoadOptions::default())?,
        None
    );
    println!("took the welcome mail once: {gift:?}");

    // A second store over the same file (a restart) sees everything.
    drop(store);
    let store = Store::open(StorageConfig::custom(JsonFileBackend::open(&path)?))?;
    let back: Settings = store.load_or_default("settings", &LoadOptions::default())?;
    assert_eq!(back, settings);
    println!("after a restart: {:?}", store.list_keys("")?);
    println!("settings: {back:?}");
    let stats = store.get_stats();
    println!(
        "backend={} items={} bytes={} healthy={}",
        stats.backend_type, stats.item_count, stats.total_size, stats.is_healthy
    );
    let shown = fs::canonicalize(&path).unwrap_or(path);
    println!(
        "the records are in {} (run again to find them)",
        shown.display()
    );
    Ok(())
}
