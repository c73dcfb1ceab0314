//! Pattern: game settings as a persistent resource, with defaults and a reset.
//!
//! `persist_resource` inserts the settings' `Default` at once, replaces it with the stored
//! value as soon as it is loaded, and saves every change (throttled, and at exit). The example
//! starts the "game" three times over the same store: the first run changes the volume, the
//! second finds it and resets everything to defaults, the third finds the defaults.
//!
//! ```text
//! cargo run --example settings
//! ```

use std::path::Path;
use std::time::Duration;

use bevy::prelude::*;
use bevy_storage::prelude::*;
use serde::{Deserialize, Serialize};

#[derive(Resource, Serialize, Deserialize, Clone, Debug, PartialEq)]
struct Settings {
    music_volume: f32,
    fullscreen: bool,
    language: String,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            music_volume: 0.8,
            fullscreen: false,
            language: "en".into(),
        }
    }
}

/// What a run does once the stored settings arrived.
#[derive(Resource, Clone, Copy)]
enum Action {
    Tweak,
    Reset,
    Show,
}

fn main() {
    let dir = tempfile::tempdir().expect("temp dir");
    let db = dir.path().join("settings.db");
    run(&db, Action::Tweak);
    run(&db, Action::Reset);
    run(&db, Action::Show);
}

fn run(db: &Path, action: Action) {
    let mut app = App::new();
    app.add_plugins((MinimalPlugins, StoragePlugin::sqlite(db)))
        .persist_resource_with::<Settings>(
            "config:settings",
            PersistOptions::default().throttle(Duration::from_millis(200)),
        )
        .insert_resource(action)
        .add_observer(on_loaded);
    // Run until the stored value has been looked up, then exit: the exit flush saves changes.
    for _ in 0..5_000 {
        app.update();
        if app.world().contains_resource::<Done>() {
            break;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    app.world_mut().write_message(AppExit::Success);
    app.update();
}

#[derive(Resource)]
struct Done;

fn on_loaded(
    loaded: On<PersistedResourceLoaded>,
    action: Res<Action>,
    mut settings: ResMut<Settings>,
    mut commands: Commands,
) {
    println!(
        "run {:?}: stored settings {}: {:?}",
        *action as u8 + 1,
        describe(&loaded),
        *settings
    );
    match *action {
        Action::Tweak => {
            settings.music_volume = 0.25;
            settings.language = "fr".into();
            println!("  changed to {:?} (saved on exit)", *settings);
        }
        Action::Reset => {
            *settings = Settings::default();
            println!("  reset to defaults {:?}", *settings);
        }
        Action::Show => {}
    }
    commands.insert_resource(Done);
}

fn describe(loaded: &PersistedResourceLoaded) -> &'static str {
    match &loaded.result {
        Ok(true) => "found",
        Ok(false) => "absent, using defaults",
        Err(_) => "unreadable, using defaults",
    }
}
