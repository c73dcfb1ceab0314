//! Two headless game servers award gold to the same players on one PostgreSQL database, and
//! no award is ever lost.
//!
//! Each server is a headless Bevy app (its own [`StoragePlugin`], its own connection pool) in
//! a thread of its own, as two server processes would be. Every award is a read-modify-write
//! of a shared profile: a [`LoadRequest::versioned`] load, the change, and a
//! [`SaveRequest::if_version`] save. When the other server wrote the profile in between, the
//! save fails with [`StorageError::VersionConflict`] and changes nothing; the server loads the
//! profile again and retries. At the end every profile holds exactly the sum of its awards.
//!
//! `--unversioned` runs the same servers with plain loads and saves, and counts the awards
//! the two servers silently overwrote (lost updates): what the versions prevent.
//!
//! ```sh
//! cargo run --features postgres --example postgres_servers
//! # POSTGRES_URL, default postgres://postgres@127.0.0.1:5432/test
//! cargo run --features postgres --example postgres_servers -- --unversioned
//! cargo run --features postgres --example postgres_servers -- --cleanup
//! ```
//! Options: `--players N` (default 4), `--awards N` per server (default 150),
//! `--namespace NAME` (default `example:postgres_servers`). The profiles stay in the table
//! `bevy_storage_records` under that namespace after a run; `--cleanup` removes them.

use std::collections::{HashMap, VecDeque};
use std::thread;
use std::time::{Duration, Instant};

use bevy::prelude::*;
use bevy_storage::RecordVersion;
use bevy_storage::plugin::RequestId;
use bevy_storage::prelude::*;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Profile {
    name: String,
    gold: u64,
    /// How many awards this profile received.
    awards: u32,
    /// The server that wrote it last.
    last_server: String,
}

#[derive(Debug, Clone)]
struct Award {
    player: String,
    gold: u64,
}

/// One server's work and what happened to it.
#[derive(Resource)]
struct Awards {
    server: &'static str,
    versioned: bool,
    pending: VecDeque<Award>,
    loading: HashMap<RequestId, Award>,
    saving: HashMap<RequestId, Award>,
    applied: u32,
    conflicts: u32,
    failure: Option<String>,
}

/// Awards being worked on at once by one server.
const IN_FLIGHT: usize = 4;

fn profile_key(player: &str) -> String {
    format!("profile:{player}")
}

/// Starts the next awards: a (versioned) load of the profile.
fn begin_awards(mut awards: ResMut<Awards>, mut loads: MessageWriter<LoadRequest>) {
    while awards.loading.len() + awards.saving.len() < IN_FLIGHT {
        let Some(award) = awards.pending.pop_front() else {
            break;
        };
        let mut request = LoadRequest::new(profile_key(&award.player));
        if awards.versioned {
            request = request.versioned();
        }
        awards.loading.insert(request.id(), award);
        loads.write(request);
    }
}

/// A profile arrived: apply the award and save it back, conditional on the version read.
fn apply_awards(
    mut awards: ResMut<Awards>,
    mut loaded: MessageReader<LoadCompleted>,
    mut saves: MessageWriter<SaveRequest>,
) {
    for done in loaded.read() {
        let Some(award) = awards.loading.remove(&done.id) else {
            continue;
        };
        let mut profile: Profile = match done.decode() {
            Ok(Some(profile)) => profile,
            Ok(None) => {
                awards.failure = Some(format!("the profile of {} is missing", award.player));
                continue;
            }
            Err(e) => {
                awards.failure = Some(format!("loading {}: {e}", done.key));
                continue;
            }
        };
        profile.gold += award.gold;
        profile.awards += 1;
        profile.last_server = awards.server.to_owned();
        let mut request = SaveRequest::new(done.key.clone(), profile);
        if let Some(version) = done.version() {
            request = request.if_version(version);
        }
        awards.saving.insert(request.id(), award);
        saves.write(request);
    }
}

/// A save finished: counted, or retried from a fresh load when another server got there first.
fn finish_awards(mut awards: ResMut<Awards>, mut saved: MessageReader<SaveCompleted>) {
    for done in saved.read() {
        let Some(award) = awards.saving.remove(&done.id) else {
            continue;
        };
        match done.result.as_ref().map_err(|e| &**e) {
            Ok(()) => awards.applied += 1,
            Err(StorageError::VersionConflict { .. }) => {
                // Nothing was written: read the profile again and redo the change.
                awards.conflicts += 1;
                awards.pending.push_front(award);
            }
            Err(e) => awards.failure = Some(format!("saving {}: {e}", done.key)),
        }
    }
}

struct Report {
    server: &'static str,
    applied: u32,
    conflicts: u32,
    frames: u32,
    elapsed: Duration,
}

/// Runs one headless server until its awards are all applied.
fn run_server(
    server: &'static str,
    config: StorageConfig,
    versioned: bool,
    awards: Vec<Award>,
) -> Result<Report, String> {
    let total = awards.len() as u32;
    let mut app = App::new();
    app.add_plugins((MinimalPlugins, StoragePlugin::config(config)))
        .insert_resource(Awards {
            server,
            versioned,
            pending: awards.into(),
            loading: HashMap::new(),
            saving: HashMap::new(),
            applied: 0,
            conflicts: 0,
            failure: None,
        })
        .add_systems(
            Update,
            (begin_awards, apply_awards, finish_awards)
                .chain()
                .run_if(storage_ready),
        );
    let start = Instant::now();
    let mut frames = 0;
    loop {
        app.update();
        frames += 1;
        if let Some(e) = app.world().resource::<Storage>().error() {
            return Err(format!("[{server}] the store did not open: {e}"));
        }
        let awards = app.world().resource::<Awards>();
        if let Some(failure) = &awards.failure {
            return Err(format!("[{server}] {failure}"));
        }
        if awards.applied == total {
            return Ok(Report {
                server,
                applied: awards.applied,
                conflicts: awards.conflicts,
                frames,
                elapsed: start.elapsed(),
            });
        }
        if start.elapsed() > Duration::from_secs(120) {
            return Err(format!(
                "[{server}] only {} of {total} awards applied after two minutes",
                awards.applied
            ));
        }
        thread::sleep(Duration::from_millis(1));
    }
}

struct Options {
    url: String,
    namespace: String,
    players: usize,
    awards: usize,
    versioned: bool,
    cleanup: bool,
}

fn parse_options() -> Options {
    let mut options = Options {
        url: std::env::var("POSTGRES_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into()),
        namespace: "example:postgres_servers".into(),
        players: 4,
        awards: 150,
        versioned: true,
        cleanup: false,
    };
    let usage = || -> ! {
        eprintln!(
            "usage: postgres_servers [--players N] [--awards N] [--namespace NAME] \
             [--unversioned] [--cleanup]"
        );
        std::process::exit(2)
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut number = || -> usize {
            args.next()
                .and_then(|n| n.parse().ok())
                .filter(|n| *n > 0)
                .unwrap_or_else(|| usage())
        };
        match arg.as_str() {
            "--players" => options.players = number(),
            "--awards" => options.awards = number(),
            "--namespace" => options.namespace = args.next().unwrap_or_else(|| usage()),
            "--unversioned" => options.versioned = false,
            "--cleanup" => options.cleanup = true,
            _ => usage(),
        }
    }
    options
}

fn main() {
    let options = parse_options();
    if let Err(e) = run(&options) {
        eprintln!("error: {e}");
        eprintln!("(start PostgreSQL, or point POSTGRES_URL at one)");
        std::process::exit(1);
    }
}

fn run(options: &Options) -> Result<(), String> {
    let config = StorageConfig::postgres(&options.url, &options.namespace).pool_size(4);
    let store = Store::open(config.clone()).map_err(|e| e.to_string())?;
    if options.cleanup {
        store.clear().map_err(|e| e.to_string())?;
        println!("removed the namespace {:?}", options.namespace);
        return Ok(());
    }
    // Fresh profiles, so the expected totals are known.
    let players: Vec<String> = (0..options.players).map(|i| format!("player{i}")).collect();
    for player in &players {
        let profile = Profile {
            name: player.clone(),
            ..Profile::default()
        };
        store
            .save(&profile_key(player), &profile, &SaveOptions::default())
            .map_err(|e| e.to_string())?;
    }
    // Each server awards every player in turn, 1..=10 gold at a time.
    let awards_of = |seed: usize| -> Vec<Award> {
        (0..options.awards)
            .map(|i| Award {
                player: players[(i + seed) % players.len()].clone(),
                gold: ((i * 7 + seed * 3) % 10 + 1) as u64,
            })
            .collect()
    };
    let plans = [("eu-1", awards_of(0)), ("us-1", awards_of(1))];
    let mut expected: HashMap<String, (u64, u32)> = HashMap::new();
    for award in plans.iter().flat_map(|(_, awards)| awards) {
        let entry = expected.entry(award.player.clone()).or_default();
        entry.0 += award.gold;
        entry.1 += 1;
    }
    println!(
        "two servers, {} players, {} awards each, {}",
        players.len(),
        options.awards,
        if options.versioned {
            "each a versioned read-modify-write"
        } else {
            "plain loads and saves (--unversioned)"
        }
    );
    let reports = thread::scope(|s| {
        let handles: Vec<_> = plans
            .into_iter()
            .map(|(server, awards)| {
                let config = config.clone();
                let versioned = options.versioned;
                s.spawn(move || run_server(server, config, versioned, awards))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("a server thread panicked"))
            .collect::<Result<Vec<_>, _>>()
    })?;
    for r in &reports {
        println!(
            "[{}] {} awards applied, {} version conflicts caught and retried ({} frames, {:.1?})",
            r.server, r.applied, r.conflicts, r.frames, r.elapsed
        );
    }
    let mut lost = 0;
    for player in &players {
        let profile: Profile = store
            .load(&profile_key(player), &LoadOptions::default())
            .map_err(|e| e.to_string())?
            .ok_or_else(|| format!("the profile of {player} is gone"))?;
        let version: Option<RecordVersion> = store
            .get_metadata(&profile_key(player))
            .map_err(|e| e.to_string())?
            .map(|m| m.version);
        let (gold, awards) = expected[player];
        lost += awards - profile.awards;
        println!(
            "{player}: {} gold from {} awards (expected {gold} from {awards}), last written by {} \
             at version {}",
            profile.gold,
            profile.awards,
            profile.last_server,
            version.unwrap_or_default()
        );
    }
    if lost == 0 {
        println!("no update lost: every profile holds the sum of its awards");
        Ok(())
    } else if options.versioned {
        Err(format!("{lost} awards were lost despite the versions"))
    } else {
        println!(
            "{lost} awards lost: a server saved over a profile the other had changed since it \
             read it (run without --unversioned to catch these)"
        );
        Ok(())
    }
}
