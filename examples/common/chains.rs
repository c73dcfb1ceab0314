//! The crash test's snapshot-chain mode (`--backend chains`, feature `bevy`): autosave chains
//! under SIGKILL.
//!
//! The child keeps a world of persisted `Cell { id, value }` entities and, in a loop, edits
//! it at random (values changed, cells spawned and despawned) and autosaves it as a chain:
//! a whole snapshot, then deltas (after [`MAX_DELTAS`], a new base folded from the chain and
//! one more delta by [`store_compacted_autosave`], as the plugin's compaction does), in the rotation of
//! [`store_autosave_record`] (the newest [`KEEP`] kept, with what their deltas need). Before
//! each autosave it prints `S <step> <digest>` (the digest of the world it saves), and
//! `A <step>` once the store acknowledged it. The parent kills it at a random moment, loads
//! the newest autosave chain with [`load_newest_autosave`] into a fresh world and checks that
//! the world is exactly the last acknowledged one, or the one whose autosave was in flight:
//! never an older state, never a mix of two (a delta applied to the wrong base, a chain cut
//! in the middle), and no autosave that fails to decode. Trials run in chains on one
//! directory: each child starts from the world the last one left (loaded the same way), so
//! it begins a new chain over the old rotation.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use bevy::prelude::*;
use bevy_storage::backend::CustomMetadata;
use bevy_storage::snapshot::{
    ChainCursor, Persist, SnapshotContext, SnapshotEncoding, SnapshotRegistry, SnapshotSettings,
    capture_base, capture_delta, load_newest_autosave, store_autosave_record,
    store_compacted_autosave,
};
use bevy_storage::{StorageConfig, Store};
use serde::{Deserialize, Serialize};

use super::workload::{Rng, arg_value};

/// Autosaves under this prefix.
const PREFIX: &str = "auto/";
/// Deltas before the next autosave is a whole snapshot again.
const MAX_DELTAS: u32 = 4;
/// Autosaves kept by the rotation.
const KEEP: usize = 3;

/// A persisted cell of the test's world.
#[derive(Component, Clone, Serialize, Deserialize, TypePath)]
struct Cell {
    id: u32,
    value: u64,
}

/// The two stores a chain is written to.
#[derive(Clone, Copy, Debug)]
pub enum ChainStore {
    File,
    Sqlite,
}

impl ChainStore {
    pub fn name(self) -> &'static str {
        match self {
            ChainStore::File => "chains-file",
            ChainStore::Sqlite => "chains-sqlite",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        match s {
            "chains-file" => Some(ChainStore::File),
            "chains-sqlite" => Some(ChainStore::Sqlite),
            _ => None,
        }
    }

    fn config(self, dir: &Path) -> StorageConfig {
        match self {
            ChainStore::File => StorageConfig::file(dir.join("records")),
            ChainStore::Sqlite => StorageConfig::sqlite(dir.join("store.db")),
        }
    }
}

fn registry() -> SnapshotRegistry {
    let mut registry = SnapshotRegistry::new();
    registry.register_component::<Cell>();
    registry
}

fn settings(binary: bool) -> SnapshotSettings {
    SnapshotSettings::default().encoding(if binary {
        SnapshotEncoding::Binary
    } else {
        SnapshotEncoding::Ron
    })
}

/// The persisted cells, sorted, as one number: equal worlds give equal digests.
fn digest(world: &mut World) -> u32 {
    let mut cells: Vec<(u32, u64)> = world
        .query_filtered::<&Cell, With<Persist>>()
        .iter(world)
        .map(|c| (c.id, c.value))
        .collect();
    cells.sort_unstable();
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&(cells.len() as u64).to_le_bytes());
    for (id, value) in cells {
        hasher.update(&id.to_le_bytes());
        hasher.update(&value.to_le_bytes());
    }
    hasher.finalize()
}

/// Loads the newest autosave chain of `store` into a fresh world; `Err` says why it failed.
fn load(store: &Store, app: &mut App) -> Result<(), String> {
    let world = app.world_mut();
    let context = SnapshotContext::from_world(world);
    match load_newest_autosave(store, PREFIX, &context) {
        Ok(None) => Ok(()),
        Ok(Some(loaded)) => {
            if let Some((key, e)) = loaded.skipped.first() {
                return Err(format!("autosave {key:?} does not load: {e}"));
            }
            loaded.world.apply(world, true);
            Ok(())
        }
        Err(e) => Err(format!("the newest autosave chain does not load: {e}")),
    }
}

fn app() -> App {
    let mut app = App::new();
    app.insert_resource(registry());
    app
}

fn say(out: &mut impl Write, line: &str) {
    out.write_all(format!("{line}\n").as_bytes())
        .and_then(|()| out.flush())
        .expect("stdout");
}

/// The child: `--child-chains --backend chains-file|chains-sqlite --dir D --seed S
/// [--binary] [--sabotage ack]`.
pub fn run_child(args: &[String]) -> ExitCode {
    let need = |name: &str| arg_value(args, name).unwrap_or_else(|| panic!("child needs {name}"));
    let which = ChainStore::parse(&need("--backend")).expect("backend");
    let dir = PathBuf::from(need("--dir"));
    let mut rng = Rng::new(need("--seed").parse().expect("seed"));
    let settings = settings(args.iter().any(|a| a == "--binary"));
    let early_ack = arg_value(args, "--sabotage").as_deref() == Some("ack");
    let store = match Store::open(which.config(&dir)) {
        Ok(store) => store,
        Err(e) => {
            println!("OPENFAIL {e}");
            return ExitCode::from(2);
        }
    };
    let mut app = app();
    if let Err(e) = load(&store, &mut app) {
        println!("LOADFAIL {e}");
        return ExitCode::from(2);
    }
    let snapshots = registry();
    let context = SnapshotContext::from_world(app.world_mut());
    let world = app.world_mut();
    let mut next_id = world
        .query::<&Cell>()
        .iter(world)
        .map(|c| c.id + 1)
        .max()
        .unwrap_or(0);
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    say(&mut out, &format!("READY {}", digest(world)));
    // The chain this run writes: its cursor, its base's key and its deltas so far.
    let mut chain: Option<(ChainCursor, String, u32)> = None;
    let started = Instant::now();
    let mut step = 0u64;
    while started.elapsed() < Duration::from_secs(60) {
        step += 1;
        for _ in 0..1 + rng.below(12) {
            let cells: Vec<Entity> = world
                .query_filtered::<Entity, With<Cell>>()
                .iter(world)
                .collect();
            match rng.below(4) {
                0 | 1 if !cells.is_empty() => {
                    let e = cells[rng.below(cells.len() as u64) as usize];
                    world.get_mut::<Cell>(e).expect("cell").value = rng.next();
                }
                2 if !cells.is_empty() => {
                    world.despawn(cells[rng.below(cells.len() as u64) as usize]);
                }
                _ => {
                    world.spawn((
                        Persist,
                        Cell {
                            id: next_id,
                            value: rng.next(),
                        },
                    ));
                    next_id += 1;
                }
            }
        }
        say(&mut out, &format!("S {step} {}", digest(world)));
        if early_ack {
            // Acknowledge before writing: a kill in between loses an acknowledged autosave.
            say(&mut out, &format!("A {step}"));
            std::thread::sleep(Duration::from_millis(2));
        }
        let stored = match chain.take() {
            Some((cursor, base, deltas)) if deltas < MAX_DELTAS => {
                let delta = capture_delta(world, &settings, &snapshots, &cursor)
                    .and_then(|d| {
                        let step = d.step();
                        d.encode().map(|bytes| (bytes, step))
                    })
                    .expect("delta capture");
                store_autosave_record(
                    &store,
                    PREFIX,
                    KEEP,
                    &delta.0,
                    &settings,
                    CustomMetadata::new(),
                    Some(&base),
                )
                .map(|_| chain = Some((cursor.advance(delta.1, &delta.0), base, deltas + 1)))
            }
            // The policy's new base: a delta captured as usual, folded with the chain into
            // a new base off the world (what the plugin does on the pool).
            Some((cursor, base, _)) => {
                let delta = capture_delta(world, &settings, &snapshots, &cursor)
                    .and_then(|d| {
                        let step = d.step();
                        d.encode().map(|bytes| (bytes, step))
                    })
                    .expect("delta capture");
                store_compacted_autosave(
                    &store,
                    PREFIX,
                    KEEP,
                    &base,
                    &delta.0,
                    &settings,
                    &context,
                    CustomMetadata::new(),
                )
                .map(|(key, bytes)| {
                    chain = Some((ChainCursor::compacted(delta.1, &bytes), key, 0));
                })
            }
            None => {
                let (captured, start) =
                    capture_base(world, &settings, &snapshots).expect("base capture");
                let bytes = captured.encode().expect("base encode");
                store_autosave_record(
                    &store,
                    PREFIX,
                    KEEP,
                    &bytes,
                    &settings,
                    CustomMetadata::new(),
                    None,
                )
                .map(|key| chain = Some((start.cursor(&bytes), key, 0)))
            }
        };
        match stored {
            Ok(()) if early_ack => {}
            Ok(()) => say(&mut out, &format!("A {step}")),
            Err(e) => {
                say(&mut out, &format!("F {step} {e}"));
                return ExitCode::from(2);
            }
        }
    }
    ExitCode::from(3)
}

/// What a run of chain trials found.
#[derive(Default)]
pub struct ChainTotals {
    pub trials: usize,
    pub violations: usize,
    pub acked: u64,
    pub in_flight: u64,
    pub in_flight_applied: u64,
}

/// How a run of chain trials goes.
pub struct RunOptions<'a> {
    pub trials: usize,
    pub seed: u64,
    /// The child is killed 10 ms to this long after it is ready.
    pub max_delay_ms: u64,
    /// Trials per directory (each continues on the store the last one was killed over).
    pub per_dir: usize,
    /// Where the trial directories are made.
    pub root: &'a Path,
    pub verbose: bool,
    pub sabotage: Option<&'a str>,
}

/// Runs the trials on `which`; prints each violation.
pub fn run_trials(which: ChainStore, o: &RunOptions<'_>) -> ChainTotals {
    let RunOptions {
        trials,
        seed,
        max_delay_ms,
        per_dir,
        root,
        verbose,
        sabotage,
    } = *o;
    let mut totals = ChainTotals::default();
    let mut rng = Rng::new(seed ^ 0xC4A1_5EED);
    let mut dir: Option<tempfile::TempDir> = None;
    for trial in 0..trials {
        if trial % per_dir.max(1) == 0 || dir.is_none() {
            dir = Some(
                tempfile::Builder::new()
                    .prefix("bevy_storage_chains_")
                    .tempdir_in(root)
                    .expect("trial directory"),
            );
        }
        let path = dir.as_ref().expect("dir").path().to_path_buf();
        let binary = rng.below(2) == 0;
        let delay = Duration::from_millis(10 + rng.below(max_delay_ms));
        match trial_once(which, &path, rng.next(), binary, delay, sabotage) {
            Ok(outcome) => {
                totals.acked += outcome.acked;
                totals.in_flight += u64::from(outcome.in_flight);
                totals.in_flight_applied += u64::from(outcome.in_flight_applied);
                if verbose {
                    println!(
                        "[{}] trial {trial}: {} autosaves acknowledged, in flight {}, applied {}",
                        which.name(),
                        outcome.acked,
                        outcome.in_flight,
                        outcome.in_flight_applied
                    );
                }
            }
            Err(why) => {
                totals.violations += 1;
                let kept = dir.take().expect("dir").keep();
                println!(
                    "VIOLATION [{}] trial {trial}: {why} (store kept in {})",
                    which.name(),
                    kept.display()
                );
            }
        }
        totals.trials += 1;
    }
    totals
}

struct Outcome {
    acked: u64,
    in_flight: bool,
    in_flight_applied: bool,
}

fn trial_once(
    which: ChainStore,
    dir: &Path,
    seed: u64,
    binary: bool,
    delay: Duration,
    sabotage: Option<&str>,
) -> Result<Outcome, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut command = Command::new(exe);
    command
        .args(["--child-chains", "--backend", which.name(), "--seed"])
        .arg(seed.to_string())
        .arg("--dir")
        .arg(dir);
    if binary {
        command.arg("--binary");
    }
    if let Some(s) = sabotage {
        command.args(["--sabotage", s]);
    }
    let mut child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot start the child: {e}"))?;
    let stdout = child.stdout.take().expect("piped");
    let (lines_tx, lines) = mpsc::channel();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if lines_tx.send(line).is_err() {
                break;
            }
        }
    });
    // The kill comes `delay` after the child is ready.
    let ready = lines
        .recv_timeout(Duration::from_secs(30))
        .map_err(|_| "the child never became ready".to_owned())?;
    let Some(start) = ready.strip_prefix("READY ") else {
        let _ = child.kill();
        return Err(format!("the child could not start: {ready}"));
    };
    std::thread::sleep(delay);
    child.kill().map_err(|e| e.to_string())?;
    child.wait().map_err(|e| e.to_string())?;
    reader.join().expect("reader");
    let mut acked: String = start.to_owned();
    let mut acked_steps = 0u64;
    let mut sent: Option<(u64, String)> = None;
    for line in lines.try_iter() {
        let mut parts = line.split(' ');
        match (parts.next(), parts.next(), parts.next()) {
            (Some("S"), Some(step), Some(digest)) => {
                sent = Some((step.parse().expect("step"), digest.to_owned()));
            }
            (Some("A"), Some(step), None) => {
                let step: u64 = step.parse().expect("step");
                let (s, digest) = sent.take().expect("an acknowledgement follows its send");
                assert_eq!(s, step, "acknowledged in order");
                acked = digest;
                acked_steps += 1;
            }
            (Some("F"), _, _) => return Err(format!("the child's autosave failed: {line}")),
            _ => return Err(format!("the child printed {line:?}")),
        }
    }
    let store = Store::open(which.config(dir)).map_err(|e| format!("reopen failed: {e}"))?;
    let mut app = app();
    load(&store, &mut app)?;
    let found = digest(app.world_mut()).to_string();
    let in_flight = sent.is_some();
    let in_flight_applied = sent.as_ref().is_some_and(|(_, d)| *d == found);
    if found == acked || in_flight_applied {
        Ok(Outcome {
            acked: acked_steps,
            in_flight,
            in_flight_applied,
        })
    } else {
        Err(format!(
            "the loaded world (digest {found}) is neither the last acknowledged autosave \
             ({acked}, after {acked_steps} autosaves) nor the one in flight ({:?})",
            sent.map(|(_, d)| d)
        ))
    }
}
