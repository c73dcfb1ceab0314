//! `StorageConfig::for_app` / `StoragePlugin::for_app`: the per-user data directory, its
//! `BEVY_STORAGE_DIR` override and `XDG_DATA_HOME` on Linux.
//!
//! One test, because it changes the process environment: every step runs in order, and the
//! environment is only changed before any thread of this binary reads it.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bevy::log::tracing_subscriber;

use bevy::prelude::*;
use bevy_storage::app_dir::{APP_SQLITE_FILE, DIR_ENV};
use bevy_storage::plugin::{SaveCompleted, SaveRequest, StoragePlugin};
use bevy_storage::{StorageConfig, StorageError, Store};

/// A log writer into a shared buffer.
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[derive(Resource, Default)]
struct Saved(Vec<SaveCompleted>);

/// Runs an app over `plugin` until one save of `key` is answered; returns the answer.
fn save_through(plugin: impl Plugin, key: &str, value: u32) -> SaveCompleted {
    let mut app = App::new();
    app.add_plugins((MinimalPlugins, plugin))
        .init_resource::<Saved>()
        .add_observer(|e: On<SaveCompleted>, mut s: ResMut<Saved>| s.0.push(e.event().clone()));
    app.world_mut().write_message(SaveRequest::new(key, value));
    let start = Instant::now();
    loop {
        app.update();
        if let Some(done) = app.world().resource::<Saved>().0.first() {
            return done.clone();
        }
        assert!(start.elapsed() < Duration::from_secs(20), "no answer");
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn for_app_finds_the_per_user_directory_and_honours_the_override() {
    let xdg = tempfile::tempdir().unwrap();
    let over = tempfile::tempdir().unwrap();
    let game_id = "com.studio.game";

    // SAFETY: the only test of this binary, and no other thread runs yet.
    unsafe {
        std::env::remove_var(DIR_ENV);
        std::env::set_var("XDG_DATA_HOME", xdg.path());
    }

    // The identifier rule holds whatever the environment.
    let err = StorageConfig::for_app("my game").unwrap_err();
    assert!(matches!(err, StorageError::InvalidAppId { .. }), "{err}");

    // Linux: $XDG_DATA_HOME/<application>/storage.db, created on first open.
    #[cfg(target_os = "linux")]
    {
        let expected = xdg.path().join("game").join(APP_SQLITE_FILE);
        assert_eq!(
            bevy_storage::app_dir::store_path(game_id).unwrap(),
            expected
        );
        assert!(
            !expected.exists(),
            "nothing is created before the store opens"
        );
        let store = Store::open(StorageConfig::for_app(game_id).unwrap()).unwrap();
        store.set("profile", &"Ada").unwrap();
        drop(store);
        assert!(expected.is_file());
        let store = Store::open(StorageConfig::sqlite(&expected)).unwrap();
        assert_eq!(
            store.get::<String>("profile").unwrap().as_deref(),
            Some("Ada")
        );
    }

    // The override replaces the directory (a test run, a mod profile).
    let dir = over.path().join("profile-2");
    // SAFETY: as above, still no other thread.
    unsafe { std::env::set_var(DIR_ENV, &dir) };
    let path = bevy_storage::app_dir::store_path(game_id).unwrap();
    assert_eq!(path, dir.join(APP_SQLITE_FILE));
    let store = Store::open(StorageConfig::for_app(game_id).unwrap()).unwrap();
    assert_eq!(
        store.get::<String>("profile").unwrap(),
        None,
        "another directory"
    );
    drop(store);

    // The plugin logs where the saves are, once, when it is added.
    let logged = Arc::new(Mutex::new(Vec::new()));
    let writer = Arc::clone(&logged);
    let subscriber = tracing_subscriber::fmt()
        .with_ansi(false)
        .with_writer(move || Captured(Arc::clone(&writer)))
        .finish();
    bevy::log::tracing::subscriber::with_default(subscriber, || {
        App::new().add_plugins((MinimalPlugins, StoragePlugin::for_app(game_id)));
    });
    let logged = String::from_utf8(logged.lock().unwrap().clone()).unwrap();
    let lines: Vec<&str> = logged
        .lines()
        .filter(|l| l.contains("the saves of com.studio.game are in"))
        .collect();
    assert_eq!(lines.len(), 1, "{logged}");
    assert!(
        lines[0].contains(" INFO ") && lines[0].contains("profile-2"),
        "{logged}"
    );

    // The plugin saves there too.
    let done = save_through(StoragePlugin::for_app(game_id), "level", 3);
    assert!(done.result.is_ok(), "{:?}", done.result);
    let store = Store::open(StorageConfig::sqlite(&path)).unwrap();
    assert_eq!(store.get::<u32>("level").unwrap(), Some(3));
    drop(store);

    // An invalid identifier in the plugin: no panic, an error response.
    let done = save_through(StoragePlugin::for_app("../evil"), "level", 4);
    let err = done.result.unwrap_err();
    assert!(matches!(*err, StorageError::InvalidAppId { .. }), "{err}");
}
