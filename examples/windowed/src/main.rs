//! Coin Grid: a small windowed 2D game that saves itself with `bevy_storage`.
//!
//! Walk a square across a grid, collect coins (they reappear elsewhere) and dodge the red
//! blocks that bounce around the arena (a hit costs three points and sends you back to the
//! start). The blocks speed up as your score grows.
//!
//! What it shows of `bevy_storage`:
//! - [`StoragePlugin::sqlite`]: one embedded SQLite file holds every save.
//! - [`SnapshotPlugin`]: the game state (entities marked [`Persist`] and the [`Score`]
//!   resource) saved and loaded as a whole with [`SaveWorld`] / [`LoadWorld`], answered by
//!   [`WorldSaved`] / [`WorldLoaded`]; an autosave every 30 s (the newest three are kept),
//!   one more when the game quits, and the newest one resumed at start.
//! - Game state and visuals kept apart: only the plain game components are saved
//!   ([`SnapshotSettings::allow_component`]); sprites are attached by observers whenever a
//!   game entity appears, whether spawned by the game or by a load.
//! - Slot metadata ([`SnapshotMetadata`]) and [`ListSlots`] for an on-screen slot list that
//!   never touches the disk on the main thread: after each save the plugin lists the slots on
//!   the task pool, in turn with the saves before it, and answers with [`SlotsListed`].
//!
//! ```text
//! cargo run -p windowed_game                          # saves in saves/windowed.db
//! cargo run -p windowed_game -- --save /tmp/cg.db     # another save file (or WINDOWED_GAME_SAVE)
//! cargo run -p windowed_game -- --new                 # ignore the autosave, start over
//! ```
//!
//! Keys: arrows or WASD move, F5 saves to the quick slot, F9 loads it, F8 loads the newest
//! autosave, N starts a new game, Esc quits (after an autosave).
//!
//! For scripts (see `run_test.sh`), the game prints one line per event on stdout:
//! `game ready: ...`, `saved slot quick: score=7 player=(8,5)`,
//! `loaded slot quick: score=7 player=(8,5)`, `autosaved ...`, `quit`.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use bevy::input::ButtonState;
use bevy::input::keyboard::KeyboardInput;
use bevy::prelude::*;
use bevy::window::{WindowCloseRequested, WindowResolution};
use bevy_storage::plugin::{
    ListSlots, LoadWorld, RequestId, SaveWorld, SlotsListed, SnapshotAppExt, SnapshotMetadata,
    SnapshotPlugin, StoragePlugin, WorldLoaded, WorldSaved,
};
use bevy_storage::snapshot::{Persist, SlotInfo, SnapshotSettings};
use serde::{Deserialize, Serialize};

// ------------------------------------------------------------------------------ constants

/// Grid size in cells.
const COLS: i32 = 13;
const ROWS: i32 = 11;
/// Cell size in pixels.
const CELL: f32 = 52.0;
/// Centre of the arena in world coordinates (the right of the window holds the side panel).
const ARENA_CENTER: Vec2 = Vec2::new(-158.0, -10.0);
/// Where the player starts, and returns to after a hit.
const START: GridPos = GridPos { x: 6, y: 5 };
/// Coins on the board at any time.
const COINS: usize = 5;
/// Points lost when a block hits the player.
const HIT_PENALTY: u32 = 3;

/// Every key this game writes starts with this prefix (one store can hold several games).
const SLOT_PREFIX: &str = "windowed/";
/// The F5 / F9 slot.
const QUICK_SLOT: &str = "windowed/quick";
/// Autosaves: `windowed/autosave/000000000001`, ...
const AUTOSAVE_PREFIX: &str = "windowed/autosave/";
/// Time between autosaves.
const AUTOSAVE_EVERY: Duration = Duration::from_secs(30);
/// Autosaves kept (older ones are deleted).
const AUTOSAVES_KEPT: usize = 3;

const BACKGROUND: Color = Color::srgb(0.07, 0.08, 0.11);
const CELL_DARK: Color = Color::srgb(0.13, 0.15, 0.20);
const CELL_LIGHT: Color = Color::srgb(0.16, 0.18, 0.24);
const PLAYER_COLOR: Color = Color::srgb(0.30, 0.85, 0.55);
const COIN_COLOR: Color = Color::srgb(1.0, 0.80, 0.20);
const HAZARD_COLOR: Color = Color::srgb(0.92, 0.28, 0.30);
const PANEL_COLOR: Color = Color::srgba(0.11, 0.12, 0.17, 0.95);
const TEXT_DIM: Color = Color::srgb(0.62, 0.65, 0.72);

// ------------------------------------------------------------------------- saved state
//
// Everything the snapshots hold: plain data, no handles, no transforms. These components are
// on the snapshot fast path (`register_snapshot_component`: serde instead of reflection).

/// A cell of the grid; (0, 0) is the bottom-left cell.
#[derive(Component, Reflect, Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[reflect(Component)]
struct GridPos {
    x: i32,
    y: i32,
}

/// The player's square.
#[derive(Component, Reflect, Clone, Copy, Debug, Default, Serialize, Deserialize)]
#[reflect(Component)]
struct Player;

/// A coin: worth one point, reappears elsewhere once collected.
#[derive(Component, Reflect, Clone, Copy, Debug, Default, Serialize, Deserialize)]
#[reflect(Component)]
struct Coin;

/// A red block bouncing diagonally off the walls; `dx`, `dy` are its heading (±1 each).
#[derive(Component, Reflect, Clone, Copy, Debug, Serialize, Deserialize)]
#[reflect(Component)]
struct Hazard {
    dx: i32,
    dy: i32,
}

/// The run's score sheet: an allowlisted resource, saved with the entities.
#[derive(Resource, Reflect, Clone, Debug, Default, PartialEq)]
#[reflect(Resource)]
struct Score {
    points: u32,
    coins: u32,
    hits: u32,
    /// Seconds played in this run (across saves and loads).
    play_time: f32,
}

// ------------------------------------------------------------------------ session state
//
// Never saved: how this process is doing, what it is waiting for, what is on screen.

/// Command-line options.
#[derive(Resource, Debug, Clone)]
struct Options {
    /// The SQLite file of the saves.
    save: PathBuf,
    /// Start a new game instead of resuming the newest autosave.
    new: bool,
}

/// Where this process is in the game's life.
#[derive(Resource, Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Waiting for the newest autosave (or its absence) at start.
    Starting,
    /// In the game.
    Playing,
    /// Quit was asked for; the final autosave is being written.
    Quitting,
}

/// A save or load the game is waiting for. Play pauses meanwhile, so the logged state is
/// exactly the one saved (a save is captured at the end of the frame it was asked in, or
/// later if an autosave is still being written).
#[derive(Resource, Default)]
struct Pending(Option<(RequestId, Action)>);

/// What a pending request is for (it decides what its answer prints).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Action {
    Resume,
    QuickSave,
    QuickLoad,
    LoadAutosave,
}

/// Game randomness (coin places). Not saved: a loaded game just continues with fresh dice.
#[derive(Resource)]
struct Dice(fastrand::Rng);

/// Meshes and materials shared by every coin.
#[derive(Resource)]
struct CoinLook {
    mesh: Handle<Mesh>,
    material: Handle<ColorMaterial>,
}

/// Blocks step once per tick; the tick shortens as the score grows.
#[derive(Resource)]
struct HazardClock(Timer);

/// A player just hit: cannot be hit again for a moment (and blinks).
#[derive(Component)]
struct Invulnerable(Timer);

/// The save-slot list shown on screen, refreshed off the main thread.
#[derive(Resource, Default)]
struct SlotList {
    slots: Vec<SlotInfo>,
    error: Option<String>,
    /// A refresh is wanted (at start, after every save).
    stale: bool,
    /// The [`ListSlots`] request in flight.
    pending: Option<RequestId>,
}

/// A short message under the slot list ("Saved to quick"), fading out.
#[derive(Resource, Default)]
struct Toast {
    text: String,
    left: f32,
}

#[derive(Component)]
struct ScoreText;
#[derive(Component)]
struct SlotText;
#[derive(Component)]
struct ToastText;

// ---------------------------------------------------------------------------------- app

fn main() -> AppExit {
    let options = match parse_options() {
        Ok(options) => options,
        Err(message) => {
            eprintln!("{message}");
            return AppExit::from_code(2);
        }
    };
    println!("Coin Grid: saves in {}", options.save.display());

    let mut app = App::new();
    app.add_plugins((
        DefaultPlugins.set(WindowPlugin {
            primary_window: Some(Window {
                title: "Coin Grid - bevy_storage".into(),
                resolution: WindowResolution::new(1024, 768).with_scale_factor_override(1.0),
                resizable: false,
                ..default()
            }),
            // Closing the window goes through `quit`, which autosaves first.
            close_when_requested: false,
            ..default()
        }),
        StoragePlugin::sqlite(options.save.clone()),
        SnapshotPlugin::new(
            SnapshotSettings::default()
                .game_version(1)
                .allow_resource::<Score>()
                .allow_component::<GridPos>()
                .allow_component::<Player>()
                .allow_component::<Coin>()
                .allow_component::<Hazard>(),
        )
        .autosave(AUTOSAVE_EVERY, AUTOSAVES_KEPT)
        .autosave_prefix(AUTOSAVE_PREFIX),
    ))
    .register_snapshot_component::<GridPos>()
    .register_snapshot_component::<Player>()
    .register_snapshot_component::<Coin>()
    .register_snapshot_component::<Hazard>()
    .insert_resource(ClearColor(BACKGROUND))
    .insert_resource(options)
    .insert_resource(Phase::Starting)
    .insert_resource(Score::default())
    .insert_resource(Dice(fastrand::Rng::new()))
    .insert_resource(HazardClock(Timer::from_seconds(0.45, TimerMode::Repeating)))
    .insert_resource(SlotList {
        stale: true,
        ..default()
    })
    .init_resource::<Pending>()
    .init_resource::<Toast>()
    .add_observer(dress_player)
    .add_observer(dress_coin)
    .add_observer(dress_hazard)
    .add_observer(on_world_saved)
    .add_observer(on_world_loaded)
    .add_systems(Startup, (setup_scene, setup_panel, start).chain())
    .add_systems(
        Update,
        (
            // Play first, then the keys that save or load what was just played.
            (
                (
                    move_player,
                    move_hazards,
                    collect_coins,
                    hazard_hits,
                    tick_play_time,
                )
                    .chain()
                    .run_if(playing),
                hotkeys,
                quit,
            )
                .chain(),
            (sync_transforms, blink, update_metadata, update_score_text),
            (refresh_slot_list, update_slot_text, update_toast),
        ),
    );
    app.run()
}

/// `--save PATH` (or `WINDOWED_GAME_SAVE`), `--new`.
fn parse_options() -> Result<Options, String> {
    let usage = "usage: windowed_game [--save PATH] [--new]\n  \
                 --save PATH  SQLite file of the saves (default: $WINDOWED_GAME_SAVE or saves/windowed.db)\n  \
                 --new        start a new game instead of resuming the newest autosave";
    let mut options = Options {
        save: std::env::var_os("WINDOWED_GAME_SAVE")
            .map_or_else(|| PathBuf::from("saves/windowed.db"), PathBuf::from),
        new: false,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--save" => {
                options.save = args
                    .next()
                    .ok_or_else(|| format!("--save needs a path\n{usage}"))?
                    .into();
            }
            "--new" => options.new = true,
            "-h" | "--help" => {
                println!("{usage}");
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other:?}\n{usage}")),
        }
    }
    Ok(options)
}

/// Game systems run only while playing, and not while a save or load is pending.
fn playing(phase: Res<Phase>, pending: Res<Pending>) -> bool {
    *phase == Phase::Playing && pending.0.is_none()
}

// ----------------------------------------------------------------------- start and reset

fn setup_scene(
    mut commands: Commands,
    mut meshes: ResMut<Assets<Mesh>>,
    mut materials: ResMut<Assets<ColorMaterial>>,
) {
    commands.spawn(Camera2d);
    // The arena: a frame and a checkerboard of cells.
    let size = Vec2::new(COLS as f32, ROWS as f32) * CELL;
    commands.spawn((
        Sprite::from_color(Color::srgb(0.25, 0.28, 0.36), size + Vec2::splat(8.0)),
        Transform::from_translation(ARENA_CENTER.extend(-1.0)),
    ));
    for y in 0..ROWS {
        for x in 0..COLS {
            let color = if (x + y) % 2 == 0 {
                CELL_DARK
            } else {
                CELL_LIGHT
            };
            commands.spawn((
                Sprite::from_color(color, Vec2::splat(CELL)),
                Transform::from_translation(cell_center(GridPos { x, y }).extend(0.0)),
            ));
        }
    }
    commands.insert_resource(CoinLook {
        mesh: meshes.add(Circle::new(CELL * 0.28)),
        material: materials.add(COIN_COLOR),
    });
}

/// The side panel (score, keys, save slots, messages) and a caption above the arena.
fn setup_panel(mut commands: Commands) {
    let text = |size: f32, color: Color| (TextFont::from_font_size(size), TextColor(color));
    commands.spawn((
        Text::new("Collect the coins, dodge the red blocks"),
        text(18.0, TEXT_DIM),
        Node {
            position_type: PositionType::Absolute,
            left: Val::Px(20.0),
            top: Val::Px(44.0),
            ..default()
        },
    ));
    commands
        .spawn((
            Node {
                position_type: PositionType::Absolute,
                right: Val::Px(16.0),
                top: Val::Px(16.0),
                width: Val::Px(300.0),
                height: Val::Px(736.0),
                flex_direction: FlexDirection::Column,
                padding: UiRect::all(Val::Px(16.0)),
                row_gap: Val::Px(10.0),
                border_radius: BorderRadius::all(Val::Px(10.0)),
                ..default()
            },
            BackgroundColor(PANEL_COLOR),
        ))
        .with_children(|panel| {
            panel.spawn((Text::new("COIN GRID"), text(34.0, COIN_COLOR)));
            panel.spawn((Text::new("a bevy_storage example"), text(14.0, TEXT_DIM)));
            panel.spawn((Text::new(""), text(22.0, Color::WHITE), ScoreText));
            panel.spawn((
                Text::new(
                    "Arrows/WASD  move\n\
                     F5   save to quick slot\n\
                     F9   load quick slot\n\
                     F8   load newest autosave\n\
                     N    new game\n\
                     Esc  save and quit",
                ),
                text(15.0, TEXT_DIM),
            ));
            panel.spawn((Text::new("SAVE SLOTS"), text(18.0, COIN_COLOR)));
            panel.spawn((
                Text::new("(reading...)"),
                text(15.0, Color::WHITE),
                SlotText,
            ));
            panel.spawn((Text::new(""), text(16.0, PLAYER_COLOR), ToastText));
        });
}

/// Resumes the newest autosave, or starts a new game with `--new`.
fn start(
    options: Res<Options>,
    mut commands: Commands,
    mut loads: MessageWriter<LoadWorld>,
    mut pending: ResMut<Pending>,
    mut phase: ResMut<Phase>,
) {
    if options.new {
        commands.queue(new_game);
        *phase = Phase::Playing;
        println!("game ready: new game (--new)");
    } else {
        let request = LoadWorld::newest_autosave();
        pending.0 = Some((request.id, Action::Resume));
        loads.write(request);
    }
}

/// Replaces the persisted part of the world with a fresh game.
fn new_game(world: &mut World) {
    let mut persisted = world.query_filtered::<Entity, With<Persist>>();
    for entity in persisted.iter(world).collect::<Vec<_>>() {
        world.despawn(entity);
    }
    world.insert_resource(Score::default());
    world.spawn((Persist, Player, START));
    // One coin two steps to the right to get going, the others anywhere.
    world.spawn((
        Persist,
        Coin,
        GridPos {
            x: START.x + 2,
            y: START.y,
        },
    ));
    for _ in 1..COINS {
        let cell = free_cell(world);
        world.spawn((Persist, Coin, cell));
    }
    // Three blocks from the edges, heading diagonally.
    for (x, y, dx, dy) in [(0, 0, 1, 1), (COLS - 1, 3, -1, -1), (6, ROWS - 1, 1, -1)] {
        world.spawn((Persist, Hazard { dx, dy }, GridPos { x, y }));
    }
}

/// A random cell with no coin, not on the player and at least three steps away from it
/// (the grid is far larger than the coins, so the search ends quickly).
fn free_cell(world: &mut World) -> GridPos {
    let mut taken = world.query_filtered::<&GridPos, Or<(With<Coin>, With<Player>)>>();
    let taken: Vec<GridPos> = taken.iter(world).copied().collect();
    let player = world
        .query_filtered::<&GridPos, With<Player>>()
        .iter(world)
        .next()
        .copied()
        .unwrap_or(START);
    let mut dice = world.resource_mut::<Dice>();
    loop {
        let cell = GridPos {
            x: dice.0.i32(0..COLS),
            y: dice.0.i32(0..ROWS),
        };
        let far = (cell.x - player.x).abs() + (cell.y - player.y).abs() >= 3;
        if far && !taken.contains(&cell) {
            return cell;
        }
    }
}

// ----------------------------------------------------------------------------- visuals
//
// Observers give each game entity its look when it appears: spawned by `new_game` or by a
// snapshot load, which spawns entities with the saved components only.

fn dress_player(add: On<Add, Player>, mut commands: Commands) {
    commands.entity(add.entity).try_insert((
        Sprite::from_color(PLAYER_COLOR, Vec2::splat(CELL * 0.74)),
        Transform::from_xyz(0.0, 0.0, 3.0),
    ));
}

fn dress_coin(add: On<Add, Coin>, look: Res<CoinLook>, mut commands: Commands) {
    commands.entity(add.entity).try_insert((
        Mesh2d(look.mesh.clone()),
        MeshMaterial2d(look.material.clone()),
        Transform::from_xyz(0.0, 0.0, 1.0),
    ));
}

fn dress_hazard(add: On<Add, Hazard>, mut commands: Commands) {
    commands.entity(add.entity).try_insert((
        Sprite::from_color(HAZARD_COLOR, Vec2::splat(CELL * 0.62)),
        Transform::from_xyz(0.0, 0.0, 2.0),
    ));
}

fn cell_center(pos: GridPos) -> Vec2 {
    ARENA_CENTER
        + (Vec2::new(pos.x as f32, pos.y as f32)
            - Vec2::new(COLS as f32 - 1.0, ROWS as f32 - 1.0) / 2.0)
            * CELL
}

/// Moves each sprite towards its cell: a short glide for a step, a jump for anything longer
/// (a coin reappearing, the player sent back to the start, a load).
fn sync_transforms(time: Res<Time>, mut query: Query<(Ref<GridPos>, &mut Transform)>) {
    let blend = 1.0 - (-25.0 * time.delta_secs()).exp();
    for (pos, mut transform) in &mut query {
        let target = cell_center(*pos);
        let here = transform.translation.truncate();
        let next = if pos.is_added() || here.distance(target) > CELL * 1.5 {
            target
        } else {
            here.lerp(target, blend)
        };
        transform.translation = next.extend(transform.translation.z);
    }
}

/// A player just hit blinks until it can be hit again.
fn blink(mut query: Query<(&Invulnerable, &mut Visibility)>) {
    for (invulnerable, mut visibility) in &mut query {
        let on = ((invulnerable.0.elapsed_secs() * 8.0) as u32).is_multiple_of(2);
        visibility.set_if_neq(if on {
            Visibility::Inherited
        } else {
            Visibility::Hidden
        });
    }
}

// -------------------------------------------------------------------------------- play

/// One step per key press (so quick taps all count, whatever the frame rate), steps that
/// repeat while a key is held, and at most one step per frame (so that every cell walked
/// through is checked for coins and blocks).
fn move_player(
    time: Res<Time>,
    mut presses: MessageReader<KeyboardInput>,
    keys: Res<ButtonInput<KeyCode>>,
    mut held: Local<Option<(KeyCode, f32)>>,
    mut steps: Local<VecDeque<IVec2>>,
    mut player: Single<&mut GridPos, With<Player>>,
) {
    const FIRST_REPEAT: f32 = 0.25;
    const REPEAT: f32 = 0.1;
    /// Steps typed ahead beyond this are dropped (a slow frame never makes the player run on).
    const MAX_QUEUED: usize = 4;
    // A key held since an earlier frame repeats: each time its hold time crosses
    // FIRST_REPEAT + k * REPEAT.
    if let Some((key, since)) = held.as_mut() {
        if keys.pressed(*key) {
            let before = *since;
            *since += time.delta_secs();
            let count = |t: f32| ((t - FIRST_REPEAT) / REPEAT).floor() as i32;
            if *since >= FIRST_REPEAT && count(*since) > count(before).max(-1) {
                steps.extend(direction(*key));
            }
        } else {
            *held = None;
        }
    }
    // New presses, after the repeats: a slow frame never turns a tap into a repeat.
    for press in presses.read() {
        if press.state == ButtonState::Pressed
            && !press.repeat
            && let Some(step) = direction(press.key_code)
        {
            steps.push_back(step);
            *held = Some((press.key_code, 0.0));
        }
    }
    steps.truncate(MAX_QUEUED);
    if let Some(step) = steps.pop_front() {
        player.x = (player.x + step.x).clamp(0, COLS - 1);
        player.y = (player.y + step.y).clamp(0, ROWS - 1);
    }
}

fn direction(key: KeyCode) -> Option<IVec2> {
    match key {
        KeyCode::ArrowLeft | KeyCode::KeyA => Some(IVec2::NEG_X),
        KeyCode::ArrowRight | KeyCode::KeyD => Some(IVec2::X),
        KeyCode::ArrowUp | KeyCode::KeyW => Some(IVec2::Y),
        KeyCode::ArrowDown | KeyCode::KeyS => Some(IVec2::NEG_Y),
        _ => None,
    }
}

/// Blocks step diagonally and bounce off the walls; they get faster as the score grows.
fn move_hazards(
    time: Res<Time>,
    score: Res<Score>,
    mut clock: ResMut<HazardClock>,
    mut hazards: Query<(&mut GridPos, &mut Hazard)>,
) {
    let period = (0.45 - 0.012 * score.points as f32).max(0.18);
    clock.0.set_duration(Duration::from_secs_f32(period));
    if !clock.0.tick(time.delta()).just_finished() {
        return;
    }
    for (mut pos, mut hazard) in &mut hazards {
        if !(0..COLS).contains(&(pos.x + hazard.dx)) {
            hazard.dx = -hazard.dx;
        }
        if !(0..ROWS).contains(&(pos.y + hazard.dy)) {
            hazard.dy = -hazard.dy;
        }
        pos.x += hazard.dx;
        pos.y += hazard.dy;
    }
}

fn collect_coins(
    mut commands: Commands,
    mut score: ResMut<Score>,
    player: Single<&GridPos, (With<Player>, Without<Coin>)>,
    coins: Query<(Entity, &GridPos), With<Coin>>,
) {
    for (coin, pos) in &coins {
        if pos == *player {
            score.points += 1;
            score.coins += 1;
            // The coin reappears somewhere else (the same entity, moved).
            commands.queue(move |world: &mut World| {
                let cell = free_cell(world);
                if let Some(mut pos) = world.get_mut::<GridPos>(coin) {
                    *pos = cell;
                }
            });
        }
    }
}

/// The player as [`hazard_hits`] sees it.
type HitPlayer = (
    Entity,
    &'static mut GridPos,
    Option<&'static mut Invulnerable>,
);

/// A block on the player's cell costs points and sends the player back to the start.
fn hazard_hits(
    mut commands: Commands,
    time: Res<Time>,
    mut score: ResMut<Score>,
    player: Single<HitPlayer, (With<Player>, Without<Hazard>)>,
    hazards: Query<&GridPos, With<Hazard>>,
) {
    let (entity, mut pos, invulnerable) = player.into_inner();
    if let Some(mut invulnerable) = invulnerable {
        if invulnerable.0.tick(time.delta()).is_finished() {
            commands
                .entity(entity)
                .remove::<Invulnerable>()
                .insert(Visibility::Inherited);
        }
        return;
    }
    if hazards.iter().any(|h| *h == *pos) {
        score.points = score.points.saturating_sub(HIT_PENALTY);
        score.hits += 1;
        *pos = START;
        commands
            .entity(entity)
            .insert(Invulnerable(Timer::from_seconds(1.5, TimerMode::Once)));
    }
}

fn tick_play_time(time: Res<Time>, mut score: ResMut<Score>) {
    score.play_time += time.delta_secs();
}

// ------------------------------------------------------------------------ save and load

/// F5 saves to the quick slot, F9 loads it, F8 loads the newest autosave, N starts over.
fn hotkeys(
    keys: Res<ButtonInput<KeyCode>>,
    phase: Res<Phase>,
    mut pending: ResMut<Pending>,
    mut saves: MessageWriter<SaveWorld>,
    mut loads: MessageWriter<LoadWorld>,
    mut toast: ResMut<Toast>,
    mut commands: Commands,
) {
    if *phase != Phase::Playing || pending.0.is_some() {
        return;
    }
    if keys.just_pressed(KeyCode::F5) {
        let request = SaveWorld::new(QUICK_SLOT);
        pending.0 = Some((request.id, Action::QuickSave));
        saves.write(request);
    } else if keys.just_pressed(KeyCode::F9) {
        let request = LoadWorld::new(QUICK_SLOT);
        pending.0 = Some((request.id, Action::QuickLoad));
        loads.write(request);
    } else if keys.just_pressed(KeyCode::F8) {
        let request = LoadWorld::newest_autosave();
        pending.0 = Some((request.id, Action::LoadAutosave));
        loads.write(request);
    } else if keys.just_pressed(KeyCode::KeyN) {
        commands.queue(new_game);
        toast.show("New game");
        println!("new game");
    }
}

/// Esc or the window's close button: a last autosave, then exit. The storage plugin
/// finishes the save before the process ends.
fn quit(
    keys: Res<ButtonInput<KeyCode>>,
    mut close: MessageReader<WindowCloseRequested>,
    mut phase: ResMut<Phase>,
    mut saves: MessageWriter<SaveWorld>,
    mut exit: MessageWriter<AppExit>,
) {
    let asked = keys.just_pressed(KeyCode::Escape) | (close.read().count() > 0);
    if !asked || *phase == Phase::Quitting {
        return;
    }
    // Before the first load answered there is no game to save yet.
    if *phase == Phase::Playing {
        saves.write(SaveWorld::autosave());
    }
    *phase = Phase::Quitting;
    println!("quit");
    exit.write(AppExit::Success);
}

/// Keeps the slot metadata (shown in the slot list) in step with the score.
fn update_metadata(score: Res<Score>, mut metadata: ResMut<SnapshotMetadata>) {
    if score.is_changed() {
        metadata.0.insert("score".into(), score.points.into());
        metadata
            .0
            .insert("play_time".into(), (score.play_time.round() as u64).into());
    }
}

/// The one line scripts look for: the score and where the player stands.
fn describe(score: &Score, player: Option<&GridPos>) -> String {
    match player {
        Some(p) => format!("score={} player=({},{})", score.points, p.x, p.y),
        None => format!("score={} player=none", score.points),
    }
}

/// `windowed/quick` -> `quick`, `windowed/autosave/000000000012` -> `autosave/000000000012`.
fn slot_name(key: &str) -> &str {
    key.strip_prefix(SLOT_PREFIX).unwrap_or(key)
}

/// How the slot list names a slot: `quick`, `auto #12`.
fn slot_label(key: &str) -> String {
    match key
        .strip_prefix(AUTOSAVE_PREFIX)
        .and_then(|n| n.parse::<u64>().ok())
    {
        Some(n) => format!("auto #{n}"),
        None => slot_name(key).to_owned(),
    }
}

fn on_world_saved(
    saved: On<WorldSaved>,
    mut pending: ResMut<Pending>,
    mut slots: ResMut<SlotList>,
    mut toast: ResMut<Toast>,
    phase: Res<Phase>,
    score: Res<Score>,
    player: Query<&GridPos, With<Player>>,
) {
    let ours = matches!(pending.0, Some((id, _)) if id == saved.id);
    if ours {
        pending.0 = None;
    }
    slots.stale = true;
    let name = slot_name(&saved.key);
    match &saved.result {
        // Play was paused since F5, or the game is quitting: the world is as it was saved.
        Ok(_) if ours || *phase == Phase::Quitting => {
            let kind = if saved.autosave {
                "autosaved"
            } else {
                "saved slot"
            };
            println!("{kind} {name}: {}", describe(&score, player.iter().next()));
            toast.show(format!("Saved to {name}"));
        }
        Ok(n) => {
            println!("autosaved {name} ({n} entities)");
            toast.show("Autosaved");
        }
        Err(e) => {
            println!("save to {name} failed: {e}");
            toast.show(format!("Save failed: {e}"));
        }
    }
}

fn on_world_loaded(
    loaded: On<WorldLoaded>,
    mut pending: ResMut<Pending>,
    mut phase: ResMut<Phase>,
    mut toast: ResMut<Toast>,
    mut commands: Commands,
    score: Res<Score>,
    player: Query<&GridPos, With<Player>>,
) {
    let Some((id, action)) = pending.0 else {
        return;
    };
    if id != loaded.id {
        return;
    }
    pending.0 = None;
    let name = slot_name(&loaded.key);
    for (key, why) in &loaded.skipped {
        println!("skipped the damaged autosave {}: {why}", slot_name(key));
    }
    match (&loaded.result, action) {
        (Ok(_), Action::Resume) => {
            *phase = Phase::Playing;
            let state = describe(&score, player.iter().next());
            println!("game ready: resumed {name}: {state}");
            toast.show(format!("Resumed {name}"));
        }
        (Err(e), Action::Resume) => {
            commands.queue(new_game);
            *phase = Phase::Playing;
            println!("game ready: new game (nothing to resume: {e})");
            toast.show("New game");
        }
        (Ok(_), _) => {
            let kind = if action == Action::QuickLoad {
                "slot"
            } else {
                "autosave"
            };
            println!(
                "loaded {kind} {name}: {}",
                describe(&score, player.iter().next())
            );
            toast.show(format!("Loaded {name}"));
        }
        (Err(e), _) => {
            println!("load of {name} failed: {e}");
            toast.show(format!("Nothing to load: {name}"));
        }
    }
}

// ------------------------------------------------------------------------------- panel

impl Toast {
    fn show(&mut self, text: impl Into<String>) {
        self.text = text.into();
        self.left = 3.0;
    }
}

fn update_score_text(score: Res<Score>, mut text: Single<&mut Text, With<ScoreText>>) {
    if score.is_changed() {
        let secs = score.play_time as u32;
        let new = format!(
            "Score {}\nCoins {}   Hits {}\nTime  {:02}:{:02}",
            score.points,
            score.coins,
            score.hits,
            secs / 60,
            secs % 60
        );
        // Only a real change re-lays the text out.
        if text.0 != new {
            text.0 = new;
        }
    }
}

/// Asks the plugin for the slot list when it is stale, and takes the answer when it comes:
/// the listing runs on the task pool, after the saves sent before it.
fn refresh_slot_list(
    mut list: ResMut<SlotList>,
    mut lists: MessageWriter<ListSlots>,
    mut listed: MessageReader<SlotsListed>,
) {
    for done in listed.read() {
        if list.pending != Some(done.id) {
            continue;
        }
        list.pending = None;
        match &done.result {
            Ok(slots) => {
                list.slots = slots.clone();
                list.error = None;
            }
            Err(e) => list.error = Some(e.to_string()),
        }
    }
    if list.stale && list.pending.is_none() {
        // Asking is not a change: the list is redrawn only when the answer comes in.
        let request = ListSlots::new(SLOT_PREFIX);
        let list = list.bypass_change_detection();
        list.stale = false;
        list.pending = Some(request.id);
        lists.write(request);
    }
}

/// The slot list: name, age and score of each save, newest first. Redrawn once a second
/// (for the ages) and whenever the list changes.
fn update_slot_text(
    time: Res<Time>,
    list: Res<SlotList>,
    mut since: Local<f32>,
    mut text: Single<&mut Text, With<SlotText>>,
) {
    *since += time.delta_secs();
    if !list.is_changed() && *since < 1.0 {
        return;
    }
    *since = 0.0;
    let now = SystemTime::now();
    let mut lines = Vec::new();
    if let Some(e) = &list.error {
        lines.push(format!("(cannot list: {e})"));
    } else if list.slots.is_empty() {
        lines.push("(no saves yet)".to_owned());
    }
    for slot in &list.slots {
        let age = now.duration_since(slot.saved_at).map_or(0, |d| d.as_secs());
        let age = if age < 120 {
            format!("{age}s ago")
        } else {
            format!("{}m ago", age / 60)
        };
        let score = slot.custom.get("score").and_then(|v| v.as_u64());
        lines.push(format!(
            "{:<9} {age:>8}  score {}",
            slot_label(&slot.key),
            score.map_or("?".to_owned(), |s| s.to_string())
        ));
    }
    let new = lines.join("\n");
    if text.0 != new {
        text.0 = new;
    }
}

fn update_toast(
    time: Res<Time>,
    mut toast: ResMut<Toast>,
    text: Single<(&mut Text, &mut TextColor), With<ToastText>>,
) {
    if toast.left <= 0.0 {
        return;
    }
    toast.left = (toast.left - time.delta_secs()).max(0.0);
    let (mut body, mut color) = text.into_inner();
    if body.0 != toast.text {
        body.0 = toast.text.clone();
    }
    color.0 = PLAYER_COLOR.with_alpha(toast.left.min(1.0));
}
