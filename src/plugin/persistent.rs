//! Persistent resources: a resource loaded from the store at startup and saved when it
//! changes (throttled), the configuration-manager pattern.

use std::any::type_name;
use std::marker::PhantomData;
use std::time::Duration;

use bevy::app::AppExit;
use bevy::ecs::change_detection::Tick;
use bevy::log::{error, info, warn};
use bevy::prelude::*;
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::kind::{Pending, publish};
use super::requests::{
    DeleteCompleted, DeleteRequest, LoadCompleted, LoadRequest, PersistedResourceLoaded,
    PersistedResourceSaved, SaveCompleted, SaveRequest,
};
use super::{StorageRuntime, StorageSystems};
use crate::store::SaveOptions;

/// How a persisted resource is saved.
#[derive(Debug, Clone, PartialEq)]
pub struct PersistOptions {
    /// At most one save per `throttle` (real time): the first change after a quiet period is
    /// saved at once, later ones are folded into one save when the period ends. Default 1 s.
    /// On `AppExit` a pending change is saved at once.
    pub throttle: Duration,
    /// Options of each save (TTL, encryption, format ...).
    pub save_options: SaveOptions,
}

impl Default for PersistOptions {
    fn default() -> Self {
        Self {
            throttle: Duration::from_secs(1),
            save_options: SaveOptions::default(),
        }
    }
}

impl PersistOptions {
    /// Sets the throttle period.
    pub fn throttle(mut self, throttle: Duration) -> Self {
        self.throttle = throttle;
        self
    }

    /// Sets the save options.
    pub fn save_options(mut self, options: SaveOptions) -> Self {
        self.save_options = options;
        self
    }
}

/// Keeps a resource in the store. Add [`StoragePlugin`](super::StoragePlugin) first.
///
/// ```no_run
/// # use bevy::prelude::*;
/// # use bevy_storage::prelude::*;
/// # use serde::{Deserialize, Serialize};
/// #[derive(Resource, Serialize, Deserialize, Clone, Default)]
/// struct Settings { volume: f32 }
///
/// App::new()
///     .add_plugins((MinimalPlugins, StoragePlugin))
///     .persist_resource::<Settings>("config:settings");
/// ```
///
/// - The resource is inserted with its `Default` right away (an existing value is kept), so
///   every system, `Startup` ones included, can use it.
/// - At startup the stored value is loaded on the task pool and replaces it when found
///   (a normal change: `is_changed()` fires); a [`PersistedResourceLoaded`] message and
///   event report the outcome. Until then, the resource holds its default; if it is changed
///   meanwhile and nothing was stored, that change is saved.
/// - When the resource changes it is saved (cloned on the main thread, serialized on the
///   pool), at most once per [`PersistOptions::throttle`], and at once on `AppExit`. Each
///   save reports a [`PersistedResourceSaved`]; a failure is logged once and retried after
///   the throttle period.
/// - A stored value that no longer decodes (the type changed) is reported, the default is
///   kept, and the next change overwrites the stored value.
pub trait PersistResourceExt {
    /// Persists `R` under `key` with default [`PersistOptions`].
    fn persist_resource<R>(&mut self, key: impl Into<String>) -> &mut Self
    where
        R: Resource + Clone + Default + Serialize + DeserializeOwned;

    /// Persists `R` under `key` with `options`.
    fn persist_resource_with<R>(
        &mut self,
        key: impl Into<String>,
        options: PersistOptions,
    ) -> &mut Self
    where
        R: Resource + Clone + Default + Serialize + DeserializeOwned;
}

impl PersistResourceExt for App {
    fn persist_resource<R>(&mut self, key: impl Into<String>) -> &mut Self
    where
        R: Resource + Clone + Default + Serialize + DeserializeOwned,
    {
        self.persist_resource_with::<R>(key, PersistOptions::default())
    }

    fn persist_resource_with<R>(
        &mut self,
        key: impl Into<String>,
        options: PersistOptions,
    ) -> &mut Self
    where
        R: Resource + Clone + Default + Serialize + DeserializeOwned,
    {
        let key = key.into();
        if let Some(existing) = self.world().get_resource::<PersistState<R>>() {
            warn!(
                "bevy_storage: {} is already persisted under {:?}; ignoring persist_resource with {key:?}",
                type_name::<R>(),
                existing.key
            );
            return self;
        }
        self.init_resource::<R>()
            .insert_resource(PersistState::<R> {
                key,
                options,
                phase: Phase::Start,
                dirty: false,
                last_save: None,
                loaded_tick: None,
                save_failing: false,
                missing_plugin_logged: false,
                action: None,
                reverting: false,
                _marker: PhantomData,
            })
            .add_systems(Last, persist_system::<R>.in_set(StorageSystems::Persist))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// The load has not been sent yet.
    Start,
    /// Waiting for the load.
    Loading,
    /// Loaded (or failed to load): changes are saved.
    Ready,
}

/// The state of one persisted resource (public only as the parameter of [`resource_loaded`]).
#[derive(Resource)]
pub struct PersistState<R> {
    key: String,
    options: PersistOptions,
    phase: Phase,
    dirty: bool,
    last_save: Option<Duration>,
    /// The change tick of the value the load inserted: that change is not saved back.
    loaded_tick: Option<Tick>,
    save_failing: bool,
    missing_plugin_logged: bool,
    /// What the game asked for explicitly, done at the next `Persist` step.
    action: Option<PersistAction>,
    /// The load in flight is a revert: nothing stored means the default.
    reverting: bool,
    _marker: PhantomData<fn() -> R>,
}

/// What a game can ask of a persisted resource explicitly (see [`PersistCommandsExt`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PersistAction {
    Persist,
    Revert,
    Reset,
}

/// Explicit control of a persisted resource, beside the automatic save on change.
///
/// ```no_run
/// # use bevy::prelude::*;
/// # use bevy_storage::prelude::*;
/// # #[derive(Resource, Clone, Default, serde::Serialize, serde::Deserialize)]
/// # struct Settings { volume: f32 }
/// #[derive(Message)]
/// enum MenuButton { Apply, Cancel, Defaults }
///
/// fn settings_menu(mut commands: Commands, mut buttons: MessageReader<MenuButton>) {
///     for button in buttons.read() {
///         match button {
///             // Saved at once, whatever the throttle.
///             MenuButton::Apply => commands.persist_resource_now::<Settings>(),
///             // Back to what is saved; unsaved changes are dropped.
///             MenuButton::Cancel => commands.revert_resource::<Settings>(),
///             // The default, and the stored value removed.
///             MenuButton::Defaults => commands.reset_resource::<Settings>(),
///         }
///     }
/// }
/// ```
pub trait PersistCommandsExt {
    /// Saves the resource now, whatever the throttle, even if it did not change. Answered by
    /// a [`PersistedResourceSaved`].
    fn persist_resource_now<R: Resource>(&mut self);
    /// Replaces the resource with its stored value (its `Default` when nothing is stored),
    /// discarding changes not saved yet. Answered by a [`PersistedResourceLoaded`].
    fn revert_resource<R: Resource>(&mut self);
    /// Replaces the resource with its `Default` and removes the stored value, so the next
    /// launch starts from the default too. Answered by a [`PersistedResourceSaved`] (of the
    /// removal).
    fn reset_resource<R: Resource>(&mut self);
}

impl PersistCommandsExt for Commands<'_, '_> {
    fn persist_resource_now<R: Resource>(&mut self) {
        self.queue(ask::<R>(PersistAction::Persist));
    }

    fn revert_resource<R: Resource>(&mut self) {
        self.queue(ask::<R>(PersistAction::Revert));
    }

    fn reset_resource<R: Resource>(&mut self) {
        self.queue(ask::<R>(PersistAction::Reset));
    }
}

fn ask<R: Resource>(action: PersistAction) -> impl FnOnce(&mut World) {
    move |world: &mut World| match world.get_resource_mut::<PersistState<R>>() {
        Some(mut state) => state.action = Some(action),
        None => warn!(
            "bevy_storage: {action:?} of {}, which is not persisted (call persist_resource first)",
            type_name::<R>()
        ),
    }
}

/// A run condition: true once the persisted resource `R` has its saved value (the load at
/// startup answered: found and inserted, nothing saved yet, or failed and the default kept).
/// Systems that must not see the default in place of the player's saved settings run after it:
///
/// ```no_run
/// # use bevy::prelude::*;
/// # use bevy_storage::prelude::*;
/// # #[derive(Resource, Clone, Default, serde::Serialize, serde::Deserialize)]
/// # struct Settings { volume: f32 }
/// # fn apply_volume(_: Res<Settings>) {}
/// App::new()
///     .add_plugins((MinimalPlugins, StoragePlugin))
///     .persist_resource::<Settings>("settings")
///     .add_systems(Update, apply_volume.run_if(resource_loaded::<Settings>));
/// ```
pub fn resource_loaded<R: Resource>(state: Option<Res<PersistState<R>>>) -> bool {
    state.is_some_and(|s| s.phase == Phase::Ready)
}

fn persist_system<R>(
    mut state: ResMut<PersistState<R>>,
    resource: Option<Res<R>>,
    runtime: Option<ResMut<StorageRuntime>>,
    time: Res<Time<Real>>,
    mut exit: MessageReader<AppExit>,
) where
    R: Resource + Clone + Default + Serialize + DeserializeOwned,
{
    let exiting = exit.read().count() > 0;
    let Some(mut runtime) = runtime else {
        if !state.missing_plugin_logged {
            error!(
                "bevy_storage: persist_resource::<{}> needs StoragePlugin; the resource is not persisted",
                type_name::<R>()
            );
            state.missing_plugin_logged = true;
        }
        return;
    };
    let Some(resource) = resource else {
        return;
    };
    if state.phase == Phase::Start {
        state.phase = Phase::Loading;
        // A change made after the default was inserted (by a Startup system) counts.
        state.dirty = resource.last_changed() != resource.added();
        let load = LoadRequest::new(state.key.clone());
        runtime
            .inner
            .push_internal(Box::new(Pending::internal(load, on_loaded::<R>)));
        return;
    }
    if resource.is_changed() && state.loaded_tick != Some(resource.last_changed()) {
        state.dirty = true;
    }
    if state.phase == Phase::Ready
        && let Some(action) = state.action.take()
    {
        match action {
            PersistAction::Persist => {
                state.dirty = true;
                state.last_save = None; // due now
            }
            PersistAction::Revert => {
                state.phase = Phase::Loading;
                state.reverting = true;
                state.dirty = false;
                let load = LoadRequest::new(state.key.clone());
                runtime
                    .inner
                    .push_internal(Box::new(Pending::internal(load, on_loaded::<R>)));
                return;
            }
            PersistAction::Reset => {
                state.dirty = false;
                let delete = DeleteRequest::new(state.key.clone());
                runtime
                    .inner
                    .push_internal(Box::new(Pending::internal(delete, on_reset::<R>)));
                return;
            }
        }
    }
    if state.phase != Phase::Ready || !state.dirty {
        return;
    }
    let now = time.elapsed();
    let due = exiting
        || state
            .last_save
            .is_none_or(|t| now.saturating_sub(t) >= state.options.throttle);
    if !due {
        return;
    }
    state.dirty = false;
    state.last_save = Some(now);
    let save = SaveRequest::new(state.key.clone(), resource.clone())
        .with_options(state.options.save_options.clone());
    runtime
        .inner
        .push_internal(Box::new(Pending::internal(save, on_saved::<R>)));
}

/// Inserts `value` as the resource's stored value: a change that is not saved back.
fn insert_as_stored<R>(world: &mut World, value: R)
where
    R: Resource + Clone + Default + Serialize + DeserializeOwned,
{
    world.insert_resource(value);
    let tick = world.get_resource_ref::<R>().map(|r| r.last_changed());
    if let Some(mut state) = world.get_resource_mut::<PersistState<R>>() {
        state.loaded_tick = tick;
        state.dirty = false;
    }
    // A change made right after this (by an observer, in this same exclusive system) must
    // carry a newer tick, or it would pass for the load itself.
    world.increment_change_tick();
}

fn on_reset<R>(world: &mut World, done: DeleteCompleted)
where
    R: Resource + Clone + Default + Serialize + DeserializeOwned,
{
    let result = done.result.map(drop);
    match &result {
        Ok(()) => insert_as_stored(world, R::default()),
        Err(e) => warn!(
            "bevy_storage: could not reset the persisted resource {} under {:?}: {e}; keeping its current value",
            type_name::<R>(),
            done.key
        ),
    }
    publish(
        world,
        PersistedResourceSaved {
            key: done.key,
            type_name: type_name::<R>(),
            result,
        },
    );
}

fn on_loaded<R>(world: &mut World, done: LoadCompleted)
where
    R: Resource + Clone + Default + Serialize + DeserializeOwned,
{
    let reverting = world
        .get_resource_mut::<PersistState<R>>()
        .is_some_and(|mut s| std::mem::take(&mut s.reverting));
    let result = match done.decode::<R>() {
        Ok(Some(value)) => {
            insert_as_stored(world, value);
            Ok(true)
        }
        Ok(None) => {
            if reverting {
                // Nothing stored: what the resource reverts to is its default.
                insert_as_stored(world, R::default());
            }
            Ok(false)
        }
        Err(e) => {
            warn!(
                "bevy_storage: could not load the persisted resource {} from {:?}: {e}; keeping its current value",
                type_name::<R>(),
                done.key
            );
            Err(e)
        }
    };
    if let Some(mut state) = world.get_resource_mut::<PersistState<R>>() {
        state.phase = Phase::Ready;
    }
    publish(
        world,
        PersistedResourceLoaded {
            key: done.key,
            type_name: type_name::<R>(),
            result,
        },
    );
}

fn on_saved<R>(world: &mut World, done: SaveCompleted)
where
    R: Resource + Clone + Default + Serialize + DeserializeOwned,
{
    if let Some(mut state) = world.get_resource_mut::<PersistState<R>>() {
        match &done.result {
            Err(e) => {
                if !state.save_failing {
                    error!(
                        "bevy_storage: could not save the persisted resource {} under {:?}: {e}; retrying on the next change period",
                        type_name::<R>(),
                        done.key
                    );
                }
                state.save_failing = true;
                // Retry after the throttle period: the change is not lost.
                state.dirty = true;
            }
            Ok(()) => {
                if state.save_failing {
                    info!(
                        "bevy_storage: the persisted resource {} is saved again under {:?}",
                        type_name::<R>(),
                        done.key
                    );
                }
                state.save_failing = false;
            }
        }
    }
    publish(
        world,
        PersistedResourceSaved {
            key: done.key,
            type_name: type_name::<R>(),
            result: done.result,
        },
    );
}
