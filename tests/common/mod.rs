//! Fixtures shared by the integration tests: one store per backend, on a manual clock.
#![allow(dead_code)]

use std::path::PathBuf;
use std::time::Duration;

use bevy_storage::clock::ManualClock;
use bevy_storage::{EncryptionKey, StorageConfig, Store};
use tempfile::TempDir;

/// A store under test with what it needs to stay alive and to be reopened.
pub struct Fixture {
    pub store: Store,
    pub clock: ManualClock,
    pub kind: Kind,
    /// Kept so the directory lives as long as the fixture.
    pub dir: Option<TempDir>,
}

/// Which backend a fixture uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Memory,
    File,
    Sqlite,
}

impl Kind {
    pub fn persistent(self) -> bool {
        !matches!(self, Kind::Memory)
    }
}

/// Test-sized key: Argon2 is not what these tests measure.
pub fn test_key() -> EncryptionKey {
    EncryptionKey::from_bytes([42; 32])
}

impl Fixture {
    pub fn new(kind: Kind) -> Self {
        Self::with(kind, |c| c)
    }

    /// A fixture whose config is adjusted by `tweak` (the backend and clock are set here).
    pub fn with(kind: Kind, tweak: impl Fn(StorageConfig) -> StorageConfig) -> Self {
        let clock = ManualClock::starting_now();
        let dir = kind.persistent().then(|| tempfile::tempdir().unwrap());
        let fixture_config = Self::config_for(kind, dir.as_ref().map(|d| d.path().to_path_buf()));
        let store = Store::open(tweak(fixture_config).clock(clock.clone())).unwrap();
        Self {
            store,
            clock,
            kind,
            dir,
        }
    }

    fn config_for(kind: Kind, dir: Option<PathBuf>) -> StorageConfig {
        match kind {
            Kind::Memory => StorageConfig::memory(),
            Kind::File => StorageConfig::file(dir.unwrap().join("records")),
            Kind::Sqlite => StorageConfig::sqlite(dir.unwrap().join("store.db")),
        }
    }

    /// The config of this fixture's backend, for opening it again (persistent kinds only).
    pub fn config(&self) -> StorageConfig {
        Self::config_for(self.kind, self.dir.as_ref().map(|d| d.path().to_path_buf()))
            .clock(self.clock.clone())
    }

    /// Drops the store and opens the same backend again (persistent kinds only).
    pub fn reopen(&mut self, tweak: impl Fn(StorageConfig) -> StorageConfig) -> Result<(), bevy_storage::StorageError> {
        assert!(self.kind.persistent());
        // Open the new one only after the old one is gone (file backends lock their root).
        let placeholder = Store::open(StorageConfig::memory()).unwrap();
        drop(std::mem::replace(&mut self.store, placeholder));
        self.store = Store::open(tweak(self.config()))?;
        Ok(())
    }

    pub fn advance(&self, d: Duration) {
        self.clock.advance(d);
    }
}
