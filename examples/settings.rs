//! Pattern: game settings as a persistent resource, kept across launches of the game.
//!
//! `persist_resource` inserts the settings' `Default` at once, replaces it with the stored
//! value as soon as it is loaded, and saves every change (throttled, and at exit). The
//! settings live in `saves/settings.db` under the current directory, so each launch finds
//! what the last one left: launch it a few times and watch the volume go down and the
//! fullscreen flag flip; `--reset` puts the defaults back.
//!
//! ```text
//! cargo run --example settings            # launch 1: defaults, changed and saved
//! cargo run --example settings            # launch 2: finds launch 1's change, changes again
//! cargo run --example settings -- --reset # back to the defaults
//! ```

use std::time::Duration;

use bevy::app::ScheduleRunnerPlugin;
use bevy::prelude::*;
use bevy_storage::plugin::{PersistOptions, PersistedResourceLoaded, PersistedResourceSaved};
use bevy_storage::prelude::*;
use serde::{Deserialize, Serialize};

const DB: &str = "saves/settings.db";

#[derive(Resource, Serialize, Deserialize, Clone, Debug, PartialEq)]
struct Settings {
    music_volume: f32,
    fullscreen: bool,
    language: String,
    /// How many launches changed these settings.
    launches: u32,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            music_volume: 1.0,
            fullscreen: false,
            language: "en".into(),
            launches: 0,
        }
    }
}

/// What this launch does once the stored settings arrived.
#[derive(Resource, Clone, Copy, PartialEq)]
enum Action {
    /// Turn the volume down a step and flip fullscreen.
    Tweak,
    /// Put the defaults back.
    Reset,
}

fn main() {
    let action = match std::env::args().nth(1).as_deref() {
        None => Action::Tweak,
        Some("--reset") => Action::Reset,
        Some(other) => {
            eprintln!("unknown argument {other:?}; usage: settings [--reset]");
            std::process::exit(2);
        }
    };
    App::new()
        .add_plugins((
            // A frame every 10 ms: no busy loop while the store answers.
            MinimalPlugins.set(ScheduleRunnerPlugin::run_loop(Duration::from_millis(10))),
            StoragePlugin::sqlite(DB),
        ))
        .persist_resource_with::<Settings>(
            "config:settings",
            PersistOptions::default().throttle(Duration::from_millis(200)),
        )
        .insert_resource(action)
        .add_observer(on_loaded)
        .add_observer(on_saved)
        .run();
}

/// The stored value (or its absence) arrived: show it, change it.
fn on_loaded(
    loaded: On<PersistedResourceLoaded>,
    action: Res<Action>,
    mut settings: ResMut<Settings>,
    mut exit: MessageWriter<AppExit>,
) {
    match &loaded.result {
        Ok(true) => println!(
            "found the settings the last launch saved in {DB}: {:?}",
            *settings
        ),
        Ok(false) => println!("no settings in {DB} yet: defaults {:?}", *settings),
        Err(e) => println!("stored settings unreadable ({e}): defaults {:?}", *settings),
    }
    let before = settings.clone();
    match *action {
        Action::Tweak => {
            settings.music_volume = ((before.music_volume - 0.1).max(0.0) * 10.0).round() / 10.0;
            settings.fullscreen = !before.fullscreen;
            settings.launches = before.launches + 1;
            println!(
                "launch {}: music volume {} -> {}, fullscreen {} -> {}",
                settings.launches,
                before.music_volume,
                settings.music_volume,
                before.fullscreen,
                settings.fullscreen
            );
        }
        Action::Reset => {
            *settings = Settings::default();
            println!("reset to the defaults {:?}", *settings);
        }
    }
    if *settings == before {
        // Nothing to save (a reset of defaults): done.
        exit.write(AppExit::Success);
    }
}

/// The change is stored: the next launch will find it.
fn on_saved(
    saved: On<PersistedResourceSaved>,
    settings: Res<Settings>,
    mut exit: MessageWriter<AppExit>,
) {
    match &saved.result {
        Ok(()) => println!("saved {:?} to {DB}", *settings),
        Err(e) => eprintln!("saving the settings failed: {e}"),
    }
    exit.write(AppExit::Success);
}
