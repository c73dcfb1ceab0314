//! The plugin's systems: dispatch requests, collect results, TTL cleanup, stats, exit flush.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bevy::log::{error, info};
use bevy::prelude::*;

use super::kind::{Continuing, Delivered, RequestKinds};
use super::requests::*;
use super::scheduler::Done;
use super::{StorageActivity, StorageRuntime, StorageState};
use crate::store::StorageStats;

/// PreStartup: start opening the store as early as possible.
pub(crate) fn start_opening(mut runtime: ResMut<StorageRuntime>) {
    runtime.inner.ensure_open_started();
}

/// Last: reads this frame's requests (every kind, in id order) and hands them to the
/// scheduler; closes a write batch whose window is over; starts the world requests whose turn
/// has come.
pub(crate) fn dispatch_requests(world: &mut World) {
    let now = world.resource::<Time<Real>>().elapsed();
    let intake = RequestKinds::read_all(world);
    let mut runtime = world.resource_mut::<StorageRuntime>();
    runtime.inner.submit(intake, now);
    runtime.inner.close_due_batch(now);
    start_world_work(world);
}

/// Starts the world requests whose turn has come (they take their input from `world`).
fn start_world_work(world: &mut World) {
    let shared = Arc::clone(&world.resource::<StorageRuntime>().inner.shared);
    shared.start_world_work(world);
}

/// Last: starts the TTL cleanup and the stats refresh when they are due.
pub(crate) fn run_maintenance(mut runtime: ResMut<StorageRuntime>, time: Res<Time<Real>>) {
    let now = time.elapsed();
    let runtime = &mut *runtime;
    if !runtime.inner.is_ready() {
        return;
    }
    if !runtime.purge_in_flight
        && now.saturating_sub(runtime.last_cleanup) >= runtime.cleanup_interval
    {
        runtime.last_cleanup = now;
        runtime.purge_in_flight = runtime.inner.spawn_report(
            |store| Done::Purged(store.purge_expired().map_err(Arc::new)),
            |e| Done::Purged(Err(e)),
        );
    }
    let stats_due =
        runtime.stats_now || now.saturating_sub(runtime.last_stats) >= runtime.stats_interval;
    if !runtime.stats_in_flight && stats_due {
        runtime.last_stats = now;
        runtime.stats_now = false;
        runtime.stats_in_flight = runtime.inner.spawn_report(
            |store| Done::Stats(Some(store.get_stats())),
            |_| Done::Stats(None),
        );
    }
}

/// PreUpdate: delivers what the pool finished: responses (messages and observer events,
/// loaded worlds applied), cleanup reports and fresh stats; then starts the world requests
/// whose turn came.
pub(crate) fn collect_results(world: &mut World) {
    step_continuing(world);
    let done = world.resource::<StorageRuntime>().inner.try_collect();
    apply(world, done);
    start_world_work(world);
}

/// Last, on `AppExit`: finishes every request already sent, world requests included, and
/// delivers the results. The one place the plugin blocks the main thread.
pub(crate) fn flush_on_exit(world: &mut World) {
    world
        .resource_mut::<StorageRuntime>()
        .inner
        .submit_everything();
    let timeout = world.resource::<StorageRuntime>().inner.exit_timeout;
    let deadline = Instant::now() + timeout;
    loop {
        step_continuing(world);
        let done = world.resource::<StorageRuntime>().inner.try_collect();
        apply(world, done);
        start_world_work(world);
        if world
            .resource::<StorageRuntime>()
            .inner
            .shared
            .outstanding()
            == 0
            && !continuing(world)
        {
            let done = world.resource::<StorageRuntime>().inner.try_collect();
            apply(world, done);
            return;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        let next = world
            .resource::<StorageRuntime>()
            .inner
            .recv_timeout(left.min(Duration::from_millis(5)));
        if let Some(done) = next {
            apply(world, vec![done]);
        }
    }
    let (queued, running) = world.resource::<StorageRuntime>().inner.counts();
    error!(
        "bevy_storage: {} storage requests were still pending {timeout:?} after AppExit; they may be lost",
        queued + running
    );
}

/// Requests whose finish goes on over frames (a load spread over frames), with the work
/// whose scope they hold.
#[derive(Resource, Default)]
pub(crate) struct ContinuingWork(Vec<HeldWork>);

/// The requests of one work still finishing, and the work to release after them.
type HeldWork = (Vec<Box<dyn Continuing>>, Option<u64>);

/// The next step of each request finishing over frames; a work whose requests all finished
/// frees its scope.
fn step_continuing(world: &mut World) {
    let Some(mut work) = world
        .get_resource_mut::<ContinuingWork>()
        .map(|mut w| std::mem::take(&mut w.0))
    else {
        return;
    };
    if work.is_empty() {
        return;
    }
    let (mut completed, mut failed) = (0, 0);
    work.retain_mut(|(jobs, release)| {
        jobs.retain_mut(|job| match job.step(world) {
            None => true,
            Some(ok) => {
                if ok {
                    completed += 1;
                } else {
                    failed += 1;
                }
                false
            }
        });
        if !jobs.is_empty() {
            return true;
        }
        if let Some(seq) = release.take() {
            world.resource::<StorageRuntime>().inner.shared.release(seq);
        }
        false
    });
    world.resource_mut::<ContinuingWork>().0.extend(work);
    let mut activity = world.resource_mut::<StorageActivity>();
    activity.completed += completed;
    activity.failed += failed;
}

/// True while a request finishes over frames.
fn continuing(world: &World) -> bool {
    world
        .get_resource::<ContinuingWork>()
        .is_some_and(|w| !w.0.is_empty())
}

/// Applies results on the main thread.
fn apply(world: &mut World, done: Vec<Done>) {
    let mut completed = 0u64;
    let mut failed = 0u64;
    for done in done {
        match done {
            Done::Opened(Ok(store)) => {
                info!(
                    "bevy_storage: opened the {} ({store:?})",
                    world.resource::<StorageRuntime>().description
                );
                world.resource_mut::<StorageRuntime>().stats_now = true;
                world.resource_mut::<StorageActivity>().state = StorageState::Ready;
            }
            Done::Opened(Err(e)) => {
                let description = world.resource::<StorageRuntime>().description.clone();
                error!(
                    "bevy_storage: could not open the {description}: {e}. Every storage request will be answered with this error."
                );
                let mut stats = world.resource_mut::<StorageStats>();
                stats.is_healthy = false;
                stats.last_error = Some(e.to_string());
                stats.last_error_at = Some(std::time::SystemTime::now());
                world.resource_mut::<StorageActivity>().state = StorageState::Failed(e.to_string());
            }
            Done::Work {
                jobs,
                batch_committed,
                release,
            } => {
                if let Some(n) = batch_committed {
                    let mut activity = world.resource_mut::<StorageActivity>();
                    activity.batches_committed += 1;
                    activity.batched_requests += n as u64;
                }
                let mut later = Vec::new();
                for job in jobs {
                    match job.deliver(world) {
                        Delivered::Done(true) => completed += 1,
                        Delivered::Done(false) => failed += 1,
                        Delivered::Later(rest) => later.push(rest),
                    }
                }
                if later.is_empty() {
                    if let Some(seq) = release {
                        world.resource::<StorageRuntime>().inner.shared.release(seq);
                    }
                } else {
                    // Its scope stays held until the last step (`step_continuing`).
                    world
                        .get_resource_or_init::<ContinuingWork>()
                        .0
                        .push((later, release));
                }
            }
            Done::Stats(stats) => {
                world.resource_mut::<StorageRuntime>().stats_in_flight = false;
                if let Some(stats) = stats {
                    world.resource_mut::<StorageStats>().set_if_neq(stats);
                }
            }
            Done::Purged(result) => {
                {
                    let mut runtime = world.resource_mut::<StorageRuntime>();
                    runtime.purge_in_flight = false;
                    runtime.stats_now = true;
                }
                let mut activity = world.resource_mut::<StorageActivity>();
                activity.cleanups += 1;
                match &result {
                    Ok(removed) => {
                        activity.expired_purged += *removed as u64;
                        activity.last_purge_removed = Some(*removed);
                    }
                    Err(e) => error!("bevy_storage: TTL cleanup failed: {e}"),
                }
                let report = ExpiredPurged { result };
                world.write_message(report.clone());
                world.trigger(report);
            }
        }
    }
    let (queued, running) = world.resource::<StorageRuntime>().inner.counts();
    let mut activity = world.resource_mut::<StorageActivity>();
    activity.completed += completed;
    activity.failed += failed;
    if activity.queued != queued || activity.running != running {
        activity.queued = queued;
        activity.running = running;
    }
}

/// Keeps [`StorageActivity::queued`]/`running` current after dispatch.
pub(crate) fn update_activity(runtime: Res<StorageRuntime>, mut activity: ResMut<StorageActivity>) {
    let (queued, running) = runtime.inner.counts();
    if activity.queued != queued || activity.running != running {
        activity.queued = queued;
        activity.running = running;
    }
}

/// The default interval of the stats refresh.
pub(crate) const DEFAULT_STATS_INTERVAL: Duration = Duration::from_secs(1);
