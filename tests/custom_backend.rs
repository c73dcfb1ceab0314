//! The conformance suite against the game backend of `examples/custom_backend.rs` (a JSON
//! file with every record), exactly as a game runs it against its own backend: the feature
//! `testing`, then one `backend_conformance_suite!` line with a factory of fresh instances.

#[allow(dead_code)]
#[path = "../examples/custom_backend.rs"]
mod custom_backend;

use bevy_storage::StorageConfig;
use bevy_storage::testing::TestBackend;
use custom_backend::JsonFileBackend;

bevy_storage::backend_conformance_suite!(json_file, {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("profile.json");
    // Reopening the store opens the file again, as a restart of the game does.
    TestBackend::persistent(move || StorageConfig::custom(JsonFileBackend::open(&path).unwrap()))
        .keep(dir)
});
