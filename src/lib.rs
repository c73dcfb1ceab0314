//! # bevy_storage
//!
//! Persistent storage for Bevy games: a key-value [`Store`] with TTL, compression, encryption,
//! custom metadata and atomic transactions, over memory, file, SQLite (and Redis) backends or
//! one the game implements; a [`StoragePlugin`] that resolves requests on Bevy's task pool so
//! the frame never waits on disk; and world [`snapshot`]s of the entities marked [`Persist`](snapshot::Persist).
//!
//! ## In a Bevy app
//!
//! ```
//! use bevy::prelude::*;
//! use bevy_storage::prelude::*;
//! use serde::{Deserialize, Serialize};
//!
//! #[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
//! struct Player { name: String, gold: u32 }
//!
//! #[derive(Component, Reflect, Clone, Serialize, Deserialize)]
//! #[reflect(Component)]
//! struct Position { x: f32, y: f32 }
//!
//! #[derive(Resource, Default)]
//! struct Log(Vec<String>);
//!
//! # let dir = tempfile::tempdir().unwrap();
//! let mut app = App::new();
//! app.add_plugins((
//!     MinimalPlugins,
//!     // `StoragePlugin` alone opens saves/storage.db; here a SQLite file of our choosing.
//!     StoragePlugin::sqlite(dir.path().join("game.db")),
//!     SnapshotPlugin::default(),
//! ))
//! .register_snapshot_component::<Position>()
//! .init_resource::<Log>()
//! .add_systems(Startup, |mut commands: Commands, mut saves: MessageWriter<SaveRequest>,
//!                        mut loads: MessageWriter<LoadRequest>, mut world_saves: MessageWriter<SaveWorld>| {
//!     commands.spawn((Persist, Position { x: 1.0, y: 2.0 }));
//!     saves.write(SaveRequest::new("player:ada", Player { name: "Ada".into(), gold: 120 }));
//!     loads.write(LoadRequest::new("player:ada")); // same key: runs after the save
//!     world_saves.write(SaveWorld::new("slot:1"));
//! })
//! // Every request is answered exactly once, as a message and as an observer event.
//! .add_observer(|done: On<LoadCompleted>, mut log: ResMut<Log>| {
//!     let player: Option<Player> = done.decode().unwrap();
//!     log.0.push(format!("loaded {:?}", player.map(|p| p.gold)));
//! })
//! .add_observer(|done: On<WorldSaved>, mut log: ResMut<Log>| {
//!     log.0.push(format!("world saved: {:?}", done.result));
//! });
//!
//! while app.world().resource::<Log>().0.len() < 2 {
//!     app.update(); // the I/O runs on the task pool; frames never wait for it
//! #   std::thread::sleep(std::time::Duration::from_millis(1));
//! }
//! let log = &app.world().resource::<Log>().0;
//! assert!(log.contains(&"loaded Some(120)".to_string()));
//! assert!(log.contains(&"world saved: Ok(1)".to_string()));
//! ```
//!
//! ## The store on its own (tools, servers, tests)
//!
//! ```
//! use bevy_storage::StorageOperation;
//! use bevy_storage::prelude::*;
//! use serde::{Deserialize, Serialize};
//! use std::time::Duration;
//!
//! #[derive(Serialize, Deserialize, Debug, PartialEq, Clone)]
//! struct Player { name: String, gold: u32 }
//!
//! # let dir = tempfile::tempdir().unwrap();
//! # let path = dir.path().join("game.db");
//! // An embedded SQLite store; `StorageConfig::file`, `memory` and `custom` work the same way.
//! let store = Store::open(
//!     StorageConfig::sqlite(&path)
//!         .encryption_key(EncryptionKey::from_passphrase("correct horse battery")?),
//! )?;
//!
//! // Save with a TTL, compression, encryption and the game's own metadata.
//! let ada = Player { name: "Ada".into(), gold: 120 };
//! let opts = SaveOptions::new()
//!     .ttl(Duration::from_secs(30 * 86_400))
//!     .compression(Compression::Lz4)
//!     .encrypt(true)
//!     .metadata("level", "Crypt of Bones");
//! store.save("player:ada", &ada, &opts)?;
//!
//! // Load (with a default when missing), check, list by prefix.
//! let loaded: Option<Player> = store.load("player:ada", &LoadOptions::default())?;
//! assert_eq!(loaded.as_ref(), Some(&ada));
//! let nobody = store.load_or("player:bob", Player { name: "Bob".into(), gold: 0 }, &LoadOptions::default())?;
//! assert_eq!(nobody.gold, 0);
//! assert!(store.exists("player:ada")?);
//! assert_eq!(store.list_keys("player:")?, ["player:ada"]);
//!
//! // Metadata without decoding the value.
//! let meta = store.get_metadata("player:ada")?.unwrap();
//! assert!(meta.encrypted && meta.expires_at.is_some());
//! assert_eq!(meta.custom_field::<String>("level").unwrap()?, "Crypt of Bones");
//!
//! // All or nothing: `overwrite(false)` on an existing key fails the whole transaction.
//! let result = store.transaction(vec![
//!     StorageOperation::save("player:bob", Player { name: "Bob".into(), gold: 5 }),
//!     StorageOperation::save_with("player:ada", ada.clone(), SaveOptions::new().overwrite(false)),
//! ]);
//! assert!(matches!(result, Err(StorageError::AlreadyExists { .. })));
//! assert!(!store.exists("player:bob")?);
//!
//! assert!(store.delete("player:ada")?);
//! let stats = store.get_stats();
//! assert_eq!(stats.item_count, 0);
//! assert!(stats.is_healthy);
//! # Ok::<(), StorageError>(())
//! ```
//!
//! ## Layers (data flows down; nothing below knows what is above it)
//! - [`plugin`]: the Bevy integration: request and response messages, world snapshot
//!   messages and autosave, TTL cleanup, [`StorageStats`] as a resource.
//! - [`snapshot`]: `Persist` entities and allowlisted resources ⇄ bytes, entity remapping.
//! - [`store`]: the key-value API, with the semantics shared by every backend (keys, TTL,
//!   quota, metadata, stats, read cache).
//! - [`codec`]: value ⇄ bytes (serde format, LZ4, AES-256-GCM, versioned envelope).
//! - [`backend`]: where bytes live ([`Backend`] trait; memory, file, SQLite, Redis).
#![warn(missing_docs)]

pub mod app_dir;
pub mod backend;
pub mod clock;
pub mod codec;
pub mod config;
pub mod error;
pub mod key;
#[cfg(feature = "bevy")]
pub mod plugin;
pub mod snapshot;
pub mod store;
#[cfg(feature = "testing")]
pub mod testing;

pub use backend::{Backend, ChangeToken, CustomMetadata, RecordVersion};
pub use codec::{Compression, EncryptionKey, Format};
pub use config::{BackendConfig, StorageConfig};
pub use error::{Result, StorageError};
pub use store::{
    CacheStats, ErasedValue, Expiry, KeyPage, LoadOptions, PerformanceStats, SaveOptions,
    StorageMetadata, StorageOperation, StorageStats, Store,
};

#[cfg(feature = "bevy")]
pub use plugin::{
    PersistResourceExt, Storage, StorageActivity, StorageCommandsExt, StoragePlugin,
    StoragePluginBuilder, StorageSystems, WriteBatching,
};

/// The names a game uses in ordinary code: the plugins, the request and response messages,
/// snapshot markers and settings, the store and its options, the extension traits and run
/// conditions. Everything else stays at its own path: the [`Backend`] trait
/// and its types under [`backend`]; `StorageOperation`, `StorageMetadata`,
/// `Format`, `Expiry`, `WriteBatching`, `StoragePluginBuilder` and `StorageActivity` at the
/// crate root; the rarer plugin types (`RequestId`, `ExpiredPurged`, `PersistOptions`,
/// `SnapshotMetadata`, `WorldSlot` ...) under `plugin` and `SnapshotEncoding` under
/// `snapshot`.
pub mod prelude {
    #[cfg(feature = "bevy")]
    pub use crate::plugin::{
        ClearCompleted, ClearRequest, DeleteCompleted, DeleteRequest, ExistsCompleted,
        ExistsRequest, ListKeysCompleted, ListKeysRequest, LoadCompleted, LoadRequest,
        PersistCommandsExt, PersistResourceExt, SaveCompleted, SaveRequest, Storage,
        StorageCommandsExt, StoragePlugin, StorageResponse, StorageSystems, TakeCompleted,
        TakeRequest, TransactionCompleted, TransactionRequest, resource_loaded, storage_ready,
    };
    #[cfg(feature = "bevy")]
    pub use crate::plugin::{
        ListSlots, LoadWorld, SaveWorld, SlotsListed, SnapshotAppExt, SnapshotPlugin,
        SnapshotSystems, WorldLoaded, WorldSaved,
    };
    #[cfg(feature = "bevy")]
    pub use crate::snapshot::{Persist, SnapshotSettings};
    pub use crate::{
        Compression, EncryptionKey, LoadOptions, SaveOptions, StorageConfig, StorageError,
        StorageStats, Store,
    };
}

/// README.md's Rust blocks, compiled and run as doctests (`cargo test --doc readme`). Each is
/// a complete program a user can paste into `src/main.rs`, so none may warn.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
#[doc(test(attr(deny(warnings))))]
pub mod readme {}
