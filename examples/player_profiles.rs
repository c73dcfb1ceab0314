//! Pattern: player data with a TTL and metadata, through the plugin.
//!
//! A lobby keeps a profile per player for 30 days after their last visit (the TTL is renewed
//! by every save) and tags each record with metadata a leaderboard can read without decoding
//! the profiles. Guests get a 10-minute TTL. The store runs on a manual clock so the example
//! can show expiry without waiting: after "31 days" only the regulars remain.
//!
//! ```text
//! cargo run --example player_profiles
//! ```

use std::time::Duration;

use bevy::prelude::*;
use bevy_storage::clock::ManualClock;
use bevy_storage::prelude::*;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
struct Profile {
    name: String,
    level: u32,
    wins: u32,
    inventory: Vec<String>,
}

const DAY: Duration = Duration::from_secs(86_400);

fn profile_options(profile: &Profile, guest: bool) -> SaveOptions {
    SaveOptions::new()
        .ttl(if guest {
            Duration::from_secs(600)
        } else {
            30 * DAY
        })
        .metadata("level", profile.level)
        .metadata("wins", profile.wins)
        .metadata("guest", guest)
}

fn main() {
    let clock = ManualClock::starting_now();
    let dir = tempfile::tempdir().expect("temp dir");
    let mut app = App::new();
    app.add_plugins((
        MinimalPlugins,
        StoragePlugin::sqlite(dir.path().join("lobby.db")).clock(clock.clone()),
    ));

    // Players come and go: every visit saves the profile again, renewing its TTL.
    let visitors = [
        ("ada", 12, 40, false),
        ("bob", 3, 2, false),
        ("cy", 1, 0, true),
        ("dee", 25, 77, false),
    ];
    for (name, level, wins, guest) in visitors {
        let profile = Profile {
            name: name.into(),
            level,
            wins,
            inventory: vec!["sword".into(); (level / 5) as usize],
        };
        let options = profile_options(&profile, guest);
        app.world_mut().write_message(
            SaveRequest::new(format!("profile:{name}"), profile).with_options(options),
        );
    }
    let saved = pump::<SaveCompleted>(&mut app, visitors.len());
    println!(
        "saved {} profiles",
        saved.iter().filter(|r| r.result.is_ok()).count()
    );

    // A leaderboard straight from the metadata: no profile is decoded.
    let store = app
        .world()
        .resource::<Storage>()
        .store()
        .expect("open")
        .clone();
    print_leaderboard(&store);

    // Eleven days pass: the guest's profile expired long ago (invisible at once, before any
    // cleanup); ada visits again, renewing her TTL.
    clock.advance(11 * DAY);
    let ada = load(&mut app, "profile:ada").expect("ada is still there");
    app.world_mut().write_message(
        SaveRequest::new(
            "profile:ada",
            Profile {
                wins: ada.wins + 1,
                ..ada.clone()
            },
        )
        .with_options(profile_options(&ada, false)),
    );
    pump::<SaveCompleted>(&mut app, 1);
    println!(
        "day 11: guest cy -> {:?}",
        load(&mut app, "profile:cy").map(|p| p.name)
    );

    // Twenty more days: bob and dee did not come back and expire; ada renewed and stays.
    clock.advance(20 * DAY);
    let purged = store.purge_expired().expect("purge");
    println!(
        "day 31: purged {purged} expired profiles; left: {:?}",
        store.list_keys("profile:").unwrap()
    );
    let meta = store.get_metadata("profile:ada").unwrap().unwrap();
    let age = meta.modified_at.duration_since(meta.created_at).unwrap();
    println!(
        "ada: created {} days before her last save, expires in {} days, {} bytes stored",
        age.as_secs() / 86_400,
        meta.expires_at
            .unwrap()
            .duration_since(store.now())
            .unwrap()
            .as_secs()
            / 86_400,
        meta.size
    );
}

fn print_leaderboard(store: &Store) {
    let mut rows: Vec<(String, u64, bool)> = store
        .list_keys("profile:")
        .unwrap()
        .into_iter()
        .filter_map(|key| {
            let meta = store.get_metadata(&key).ok()??;
            let wins = meta.custom_field::<u64>("wins")?.ok()?;
            let guest = meta.custom_field::<bool>("guest")?.ok()?;
            Some((key, wins, guest))
        })
        .collect();
    rows.sort_by_key(|row| std::cmp::Reverse(row.1));
    println!("leaderboard (from metadata only):");
    for (key, wins, guest) in rows {
        println!(
            "  {key:<14} {wins:>3} wins{}",
            if guest { "  (guest)" } else { "" }
        );
    }
}

fn load(app: &mut App, key: &str) -> Option<Profile> {
    app.world_mut().write_message(LoadRequest::new(key));
    let answer = pump::<LoadCompleted>(app, 1).remove(0);
    answer.decode::<Profile>().expect("profile decodes")
}

/// Runs frames until `n` responses of type `M` arrived (the work happens on the task pool).
fn pump<M: Message + Clone>(app: &mut App, n: usize) -> Vec<M> {
    let mut cursor = app.world().resource::<Messages<M>>().get_cursor_current();
    let mut out = Vec::new();
    for _ in 0..10_000 {
        app.update();
        out.extend(cursor.read(app.world().resource::<Messages<M>>()).cloned());
        if out.len() >= n {
            return out;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    panic!("no answer after 10000 frames");
}
