//! Dungeon: a headless roguelike that saves itself.
//!
//! A hero crawls a dungeon on autopilot: fights the monsters that hunt it, picks up gold and
//! potions, and when it falls a new hero takes over. The whole run is deterministic from its
//! seed. The world (hero, monsters, items, the run's state) lives in the default embedded
//! SQLite store (`saves/storage.db`): it is autosaved every two seconds, every 100 turns and
//! at exit (the newest 3 kept), and the next run resumes from the newest autosave that loads.
//! A closed stdout (`cargo run --example dungeon | head -3`) does not stop the game: it plays
//! its turns silently and still saves at exit.
//!
//! ```text
//! cargo run --example dungeon                      # play 300 turns (resumes if there is a save)
//! cargo run --example dungeon -- --turns 1000      # play longer
//! cargo run --example dungeon -- --new --seed 7    # start over with another dungeon
//! cargo run --example dungeon -- --slot second     # a separate save slot
//! cargo run --example dungeon -- --list-slots      # show the saves of a slot without playing
//! cargo run --example dungeon -- --autosave-turns 25   # autosave more often
//! ```

use std::time::Duration;

use bevy::app::ScheduleRunnerPlugin;
use bevy::log::{Level, LogPlugin};
use bevy::prelude::*;
use bevy_storage::plugin::{
    LoadWorld, SaveWorld, SnapshotAppExt, SnapshotMetadata, SnapshotPlugin, SnapshotSystems,
    StoragePlugin, WorldLoaded, WorldSaved,
};
use bevy_storage::snapshot::{Persist, SnapshotSettings, list_slots};
use bevy_storage::{StorageConfig, Store};
use clap::Parser;
use serde::{Deserialize, Serialize};

/// `println!` that survives a closed stdout (`| head -3`): the line is dropped, the game goes
/// on and still saves at exit (`println!` would panic inside a system and lose the run).
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

const WIDTH: i32 = 24;
const HEIGHT: i32 = 10;

#[derive(Parser, Debug, Resource, Clone)]
#[command(about = "A headless roguelike that autosaves and resumes")]
struct Args {
    /// Start a new game even if the slot has a save.
    #[arg(long)]
    new: bool,
    /// Save slot name.
    #[arg(long, default_value = "main")]
    slot: String,
    /// Turns to play in this run before saving and exiting.
    #[arg(long, default_value_t = 300)]
    turns: u64,
    /// Dungeon seed for a new game.
    #[arg(long, default_value_t = 2026)]
    seed: u64,
    /// Also autosave every this many turns (besides every 2 s and at exit); 0: never.
    #[arg(long, default_value_t = 100)]
    autosave_turns: u64,
    /// List the slot's saves and exit.
    #[arg(long)]
    list_slots: bool,
}

// ------------------------------------------------------------------------- saved state

#[derive(Component, Reflect, Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[reflect(Component)]
struct Position {
    x: i32,
    y: i32,
}

#[derive(Component, Reflect, Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[reflect(Component)]
struct Health {
    hp: i32,
    max: i32,
}

#[derive(Component, Reflect, Clone, Debug, PartialEq, Default)]
#[reflect(Component)]
struct Hero {
    name: String,
    gold: u32,
    kills: u32,
    potions: u32,
}

#[derive(Component, Reflect, Clone, Copy, Debug, PartialEq)]
#[reflect(Component)]
enum Monster {
    Rat,
    Goblin,
    Ogre,
}

/// The entity a monster is chasing: saved as a reference and remapped on load.
#[derive(Component, Reflect, Clone, Copy, Debug, PartialEq)]
#[reflect(Component)]
struct Hunts(#[entities] Entity);

#[derive(Component, Reflect, Clone, Copy, Debug, PartialEq)]
#[reflect(Component)]
enum Item {
    Gold(u32),
    Potion,
}

/// The run: seed and turn counter make every turn's dice reproducible.
#[derive(Resource, Reflect, Clone, Debug, PartialEq, Default)]
#[reflect(Resource)]
struct Run {
    seed: u64,
    turn: u64,
    heroes_lost: u32,
    best_gold: u32,
}

// ------------------------------------------------------------------------- session state

#[derive(Resource, Debug, PartialEq, Eq, Clone, Copy)]
enum Phase {
    Loading,
    Playing,
    Finished,
}

#[derive(Resource, Default)]
struct Session {
    turns_played: u64,
}

fn main() -> AppExit {
    let args = Args::parse();
    let prefix = format!("dungeon/{}/autosave/", args.slot);
    if args.list_slots {
        return list(&prefix);
    }
    let mut app = App::new();
    app.add_plugins((
        MinimalPlugins.set(ScheduleRunnerPlugin::run_loop(Duration::from_millis(5))),
        LogPlugin {
            level: Level::WARN,
            ..default()
        },
        StoragePlugin,
        SnapshotPlugin::new(
            SnapshotSettings::default()
                .game_version(1)
                .allow_resource::<Run>(),
        )
        .autosave(Duration::from_secs(2), 3)
        .autosave_prefix(prefix.clone()),
    ))
    .register_snapshot_component::<Position>()
    .register_snapshot_component::<Health>()
    .insert_resource(args.clone())
    .insert_resource(Session::default())
    .insert_resource(Phase::Loading)
    .add_systems(Startup, start)
    .add_systems(
        Update,
        (on_loaded, take_turn.run_if(resource_equals(Phase::Playing))).chain(),
    )
    .add_systems(Last, report_saves.after(SnapshotSystems));
    say!(
        "dungeon: slot {:?}, store saves/storage.db, {} turns this run",
        args.slot,
        args.turns
    );
    app.run()
}

fn list(prefix: &str) -> AppExit {
    let store = match Store::open(StoragePlugin::default_config()) {
        Ok(store) => store,
        Err(e) => {
            eprintln!("error: {e}");
            return AppExit::from_code(1);
        }
    };
    match list_slots(&store, prefix) {
        Ok(slots) if slots.is_empty() => say!("no saves under {prefix}"),
        Ok(slots) => {
            for s in slots {
                let when = s
                    .saved_at
                    .elapsed()
                    .map_or("just now".into(), |d| format!("{}s ago", d.as_secs()));
                say!(
                    "{}  {when:>10}  turn {:>5}  gold {:>5}  {} entities  {} bytes",
                    s.key,
                    s.custom["turn"],
                    s.custom["gold"],
                    s.entity_count,
                    s.size
                );
            }
        }
        Err(e) => {
            eprintln!("error: {e}");
            return AppExit::from_code(1);
        }
    }
    let _ = StorageConfig::memory(); // the same config types serve tools and games
    AppExit::Success
}

fn start(args: Res<Args>, mut commands: Commands, mut loads: MessageWriter<LoadWorld>) {
    if args.new {
        say!("starting a new game (seed {})", args.seed);
        commands.queue(new_game(args.seed));
        commands.insert_resource(Phase::Playing);
    } else {
        loads.write(LoadWorld::newest_autosave());
    }
}

fn new_game(seed: u64) -> impl FnOnce(&mut World) {
    move |world: &mut World| {
        let mut persisted = world.query_filtered::<Entity, With<Persist>>();
        for e in persisted.iter(world).collect::<Vec<_>>() {
            world.despawn(e);
        }
        world.insert_resource(Run { seed, ..default() });
        spawn_hero(world, 1);
    }
}

fn spawn_hero(world: &mut World, number: u32) -> Entity {
    world
        .spawn((
            Persist,
            Name::new("hero"),
            Hero {
                name: format!("Hero #{number}"),
                ..default()
            },
            Position {
                x: WIDTH / 2,
                y: HEIGHT / 2,
            },
            Health { hp: 30, max: 30 },
        ))
        .id()
}

fn on_loaded(
    mut loaded: MessageReader<WorldLoaded>,
    mut phase: ResMut<Phase>,
    args: Res<Args>,
    run: Option<Res<Run>>,
    mut commands: Commands,
) {
    for response in loaded.read() {
        match &response.result {
            Ok(_) => {
                let turn = run.as_ref().map_or(0, |r| r.turn);
                say!("resumed from autosave at turn {turn} ({})", response.key);
                for (key, why) in &response.skipped {
                    say!("  (skipped the damaged autosave {key}: {why})");
                }
            }
            Err(e) => {
                say!(
                    "no autosave to resume ({e}); starting a new game (seed {})",
                    args.seed
                );
                commands.queue(new_game(args.seed));
            }
        }
        *phase = Phase::Playing;
    }
}

type HeroQuery<'w, 's> = Query<
    'w,
    's,
    (
        Entity,
        &'static mut Position,
        &'static mut Health,
        &'static mut Hero,
    ),
    Without<Monster>,
>;

type MonsterQuery<'w, 's> = Query<
    'w,
    's,
    (
        Entity,
        &'static mut Position,
        &'static mut Health,
        &'static Monster,
        &'static mut Hunts,
    ),
    Without<Hero>,
>;
type ItemQuery<'w, 's> =
    Query<'w, 's, (Entity, &'static Position, &'static Item), (Without<Hero>, Without<Monster>)>;

#[allow(clippy::too_many_arguments)]
fn take_turn(
    mut commands: Commands,
    mut run: ResMut<Run>,
    mut session: ResMut<Session>,
    mut phase: ResMut<Phase>,
    args: Res<Args>,
    mut meta: ResMut<SnapshotMetadata>,
    mut heroes: HeroQuery,
    mut monsters: MonsterQuery,
    items: ItemQuery,
    mut saves: MessageWriter<SaveWorld>,
    mut exit: MessageWriter<AppExit>,
) {
    let mut rng = fastrand::Rng::with_seed(run.seed ^ run.turn.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let Ok((hero_entity, mut hero_pos, mut hero_hp, mut hero)) = heroes.single_mut() else {
        // Between a death and the next hero.
        commands.queue(|world: &mut World| {
            let number = world.resource::<Run>().heroes_lost + 1;
            let hero = spawn_hero(world, number);
            let mut q = world.query::<&mut Hunts>();
            for mut hunts in q.iter_mut(world) {
                hunts.0 = hero;
            }
        });
        return;
    };

    // The hero: drink when low, fight what is adjacent, else walk to the nearest item.
    if hero_hp.hp < hero_hp.max / 3 && hero.potions > 0 {
        hero.potions -= 1;
        hero_hp.hp = hero_hp.max;
    } else if let Some((monster, _, mut hp, kind, _)) = monsters
        .iter_mut()
        .find(|(_, p, ..)| distance(**p, *hero_pos) <= 1)
    {
        hp.hp -= rng.i32(3..=7);
        if hp.hp <= 0 {
            commands.entity(monster).despawn();
            hero.kills += 1;
            hero.gold += match kind {
                Monster::Rat => 1,
                Monster::Goblin => 5,
                Monster::Ogre => 20,
            };
        }
    } else {
        let goal = items
            .iter()
            .min_by_key(|(_, p, _)| distance(**p, *hero_pos))
            .map(|(_, p, _)| *p)
            .unwrap_or(Position {
                x: rng.i32(0..WIDTH),
                y: rng.i32(0..HEIGHT),
            });
        step_towards(&mut hero_pos, goal);
    }
    for (item, pos, kind) in &items {
        if *pos == *hero_pos {
            match kind {
                Item::Gold(n) => hero.gold += n,
                Item::Potion => hero.potions += 1,
            }
            commands.entity(item).despawn();
        }
    }

    // The monsters close in and bite.
    for (_, mut pos, _, kind, mut hunts) in &mut monsters {
        hunts.0 = hero_entity;
        if distance(*pos, *hero_pos) <= 1 {
            hero_hp.hp -= match kind {
                Monster::Rat => rng.i32(0..=1),
                Monster::Goblin => rng.i32(1..=3),
                Monster::Ogre => rng.i32(2..=6),
            };
        } else if rng.u8(0..4) > 0 {
            step_towards(&mut pos, *hero_pos);
        }
    }

    // The dungeon stirs.
    if run.turn.is_multiple_of(6) {
        let (kind, hp) = match rng.u8(0..10) {
            0..=5 => (Monster::Rat, 4),
            6..=8 => (Monster::Goblin, 9),
            _ => (Monster::Ogre, 20),
        };
        let edge = Position {
            x: if rng.bool() { 0 } else { WIDTH - 1 },
            y: rng.i32(0..HEIGHT),
        };
        commands.spawn((
            Persist,
            kind,
            edge,
            Health { hp, max: hp },
            Hunts(hero_entity),
        ));
    }
    if run.turn.is_multiple_of(4) {
        let item = if rng.u8(0..4) == 0 {
            Item::Potion
        } else {
            Item::Gold(rng.u32(1..=10))
        };
        let at = Position {
            x: rng.i32(0..WIDTH),
            y: rng.i32(0..HEIGHT),
        };
        commands.spawn((Persist, item, at));
    }

    if hero_hp.hp <= 0 {
        run.heroes_lost += 1;
        run.best_gold = run.best_gold.max(hero.gold);
        say!(
            "turn {:>5}: {} fell with {} gold and {} kills; a new hero enters",
            run.turn,
            hero.name,
            hero.gold,
            hero.kills
        );
        commands.entity(hero_entity).despawn();
    }

    run.turn += 1;
    session.turns_played += 1;
    meta.0.insert("turn".into(), run.turn.into());
    meta.0.insert("gold".into(), hero.gold.into());
    meta.0.insert("heroes_lost".into(), run.heroes_lost.into());
    if session.turns_played.is_multiple_of(50) || session.turns_played == args.turns {
        say!(
            "turn {:>5} | {} hp {:>2}/{} | gold {:>4} | kills {:>3} | potions {} | monsters {:>2} | items {:>2} | heroes lost {}",
            run.turn,
            hero.name,
            hero_hp.hp.max(0),
            hero_hp.max,
            hero.gold,
            hero.kills,
            hero.potions,
            monsters.iter().len(),
            items.iter().len(),
            run.heroes_lost
        );
    }
    if args.autosave_turns > 0
        && session.turns_played.is_multiple_of(args.autosave_turns)
        && session.turns_played < args.turns
    {
        saves.write(SaveWorld::autosave());
    }
    if session.turns_played >= args.turns {
        *phase = Phase::Finished;
        draw_map(
            *hero_pos,
            monsters.iter().map(|m| *m.1),
            items.iter().map(|i| *i.1),
        );
        say!("saving at turn {} and exiting", run.turn);
        saves.write(SaveWorld::autosave());
        exit.write(AppExit::Success);
    }
}

fn report_saves(mut saved: MessageReader<WorldSaved>) {
    for s in saved.read() {
        match &s.result {
            Ok(n) => say!("  autosaved {n} entities to {}", s.key),
            Err(e) => eprintln!("  save to {} failed: {e}", s.key),
        }
    }
}

fn distance(a: Position, b: Position) -> i32 {
    (a.x - b.x).abs().max((a.y - b.y).abs())
}

fn step_towards(pos: &mut Position, goal: Position) {
    pos.x += (goal.x - pos.x).signum();
    pos.y += (goal.y - pos.y).signum();
}

fn draw_map(
    hero: Position,
    monsters: impl Iterator<Item = Position>,
    items: impl Iterator<Item = Position>,
) {
    let mut grid = vec![vec!['.'; WIDTH as usize]; HEIGHT as usize];
    let mut put = |p: Position, c: char| {
        if (0..WIDTH).contains(&p.x) && (0..HEIGHT).contains(&p.y) {
            grid[p.y as usize][p.x as usize] = c;
        }
    };
    items.for_each(|p| put(p, '$'));
    monsters.for_each(|p| put(p, 'm'));
    put(hero, '@');
    for row in grid {
        say!("  {}", row.into_iter().collect::<String>());
    }
}
