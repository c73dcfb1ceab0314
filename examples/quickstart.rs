//! The storage plugin's message API end to end, headless: save → load → list → delete, then
//! exit. Every step is a request message; every answer arrives as a response message (read
//! here with `MessageReader`s) and as an observer event.
//!
//! ```text
//! cargo run --example quickstart
//! ```
//!
//! The store is the plugin's default: SQLite at `saves/storage.db` (or files under
//! `saves/storage/` without the `sqlite` feature).

use std::time::Duration;

use bevy::app::{AppExit, ScheduleRunnerPlugin};
use bevy::prelude::*;
use bevy_storage::StorageActivity;
use bevy_storage::prelude::*;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, Debug, Clone)]
struct Player {
    name: String,
    level: u32,
    gold: u64,
}

/// Where the walkthrough is.
#[derive(Resource, Default, Debug, PartialEq, Eq, Clone, Copy)]
enum Step {
    #[default]
    Saving,
    Loading,
    Listing,
    Deleting,
    Checking,
    Done,
}

fn main() -> AppExit {
    App::new()
        .add_plugins(MinimalPlugins.set(ScheduleRunnerPlugin::run_loop(Duration::from_millis(16))))
        .add_plugins(bevy::log::LogPlugin::default()) // shows the plugin's own log lines
        .add_plugins(StoragePlugin)
        .init_resource::<Step>()
        .add_systems(Startup, save_players)
        .add_systems(
            Update,
            (
                on_saved,
                on_loaded,
                on_listed,
                on_deleted,
                exit_when_done,
                give_up_after_a_while,
            )
                .chain(),
        )
        // Observers see every response too; this one only reports failures.
        .add_observer(|done: On<SaveCompleted>| {
            if let Err(e) = &done.result {
                println!(
                    "  (observer) save {} of {:?} failed: {e}",
                    done.id, done.key
                );
            }
        })
        .run()
}

const PLAYERS: [(&str, u32, u64); 3] = [("ada", 7, 120), ("bob", 3, 15), ("cyd", 12, 980)];

fn save_players(
    mut saves: MessageWriter<SaveRequest>,
    mut loads: MessageWriter<LoadRequest>,
    stats: Res<StorageStats>,
) {
    println!("StoragePlugin uses the {} backend", stats.backend_type);
    for (name, level, gold) in PLAYERS {
        let player = Player {
            name: name.into(),
            level,
            gold,
        };
        let request = SaveRequest::new(format!("player:{name}"), player)
            .ttl(Duration::from_secs(30 * 86_400))
            .metadata("level", level);
        println!("-> save {} (request {})", request.key, request.id());
        saves.write(request);
    }
    // Same key as a save above: the plugin runs it after that save, so it sees the value.
    let request = LoadRequest::new("player:ada");
    println!(
        "-> load player:ada (request {}), in the same frame as the saves",
        request.id()
    );
    loads.write(request);
}

fn on_saved(
    mut done: MessageReader<SaveCompleted>,
    mut saved: Local<usize>,
    mut step: ResMut<Step>,
    mut loads: MessageWriter<LoadRequest>,
) {
    for response in done.read() {
        match &response.result {
            Ok(()) => println!("<- saved {} (request {})", response.key, response.id),
            Err(e) => println!("<- save of {} failed: {e}", response.key),
        }
        *saved += 1;
    }
    if *step == Step::Saving && *saved == PLAYERS.len() {
        *step = Step::Loading;
        for key in ["player:ada", "player:zed"] {
            let request = LoadRequest::new(key);
            println!("-> load {key} (request {})", request.id());
            loads.write(request);
        }
    }
}

fn on_loaded(
    mut done: MessageReader<LoadCompleted>,
    mut loaded: Local<usize>,
    mut step: ResMut<Step>,
    mut lists: MessageWriter<ListKeysRequest>,
) {
    for response in done.read() {
        match response.decode::<Player>() {
            Ok(Some(player)) => println!("<- loaded {}: {player:?}", response.key),
            Ok(None) => println!("<- {} is not saved", response.key),
            Err(e) => println!("<- load of {} failed: {e}", response.key),
        }
        *loaded += 1;
    }
    if *step == Step::Loading && *loaded == 3 {
        *step = Step::Listing;
        let request = ListKeysRequest::new("player:");
        println!(
            "-> list keys with prefix \"player:\" (request {})",
            request.id()
        );
        lists.write(request);
    }
}

fn on_listed(
    mut done: MessageReader<ListKeysCompleted>,
    mut step: ResMut<Step>,
    mut deletes: MessageWriter<DeleteRequest>,
) {
    for response in done.read() {
        match (*step, &response.result) {
            (Step::Listing, Ok(keys)) => {
                println!("<- {} keys: {keys:?}", keys.len());
                *step = if keys.is_empty() {
                    Step::Done
                } else {
                    Step::Deleting
                };
                for key in keys {
                    println!("-> delete {key}");
                    deletes.write(DeleteRequest::new(key.clone()));
                }
            }
            (Step::Checking, Ok(keys)) => {
                println!("<- keys left after the deletes: {keys:?}");
                *step = Step::Done;
            }
            (_, Err(e)) => {
                println!("<- listing failed: {e}");
                *step = Step::Done;
            }
            _ => {}
        }
    }
}

fn on_deleted(
    mut done: MessageReader<DeleteCompleted>,
    mut step: ResMut<Step>,
    mut lists: MessageWriter<ListKeysRequest>,
) {
    let mut any = false;
    for response in done.read() {
        match &response.result {
            Ok(existed) => println!("<- deleted {} (it existed: {existed})", response.key),
            Err(e) => println!("<- delete of {} failed: {e}", response.key),
        }
        any = true;
    }
    if any && *step == Step::Deleting {
        // Sent after the deletes, so it runs after them: it must find nothing.
        *step = Step::Checking;
        lists.write(ListKeysRequest::new("player:"));
    }
}

fn exit_when_done(
    step: Res<Step>,
    activity: Res<StorageActivity>,
    mut exit: MessageWriter<AppExit>,
) {
    if *step == Step::Done && step.is_changed() {
        println!(
            "done: {} requests succeeded, {} failed; exiting",
            activity.completed, activity.failed
        );
        exit.write(AppExit::Success);
    }
}

/// A walkthrough that cannot finish (an unusable store) still ends.
fn give_up_after_a_while(
    time: Res<Time<Real>>,
    mut exit: MessageWriter<AppExit>,
    stats: Res<StorageStats>,
) {
    if time.elapsed() > Duration::from_secs(10) {
        println!(
            "gave up after 10 s; storage healthy: {}, last error: {:?}",
            stats.is_healthy, stats.last_error
        );
        exit.write(AppExit::error());
    }
}
