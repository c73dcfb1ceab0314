//! The plugin's systems: dispatch requests, collect results, TTL cleanup, stats, exit flush.

use std::sync::Arc;
use std::time::Duration;

use bevy::log::{error, info};
use bevy::prelude::*;

use super::requests::*;
use super::runtime::{Done, Op, Reply};
use super::{StorageActivity, StorageRuntime, StorageState};
use crate::store::StorageStats;

/// PreStartup: start opening the store as early as possible.
pub(crate) fn start_opening(mut runtime: ResMut<StorageRuntime>) {
    runtime.inner.ensure_open_started();
}

/// The request readers, as one parameter.
#[derive(bevy::ecs::system::SystemParam)]
pub(crate) struct RequestReaders<'w, 's> {
    saves: MessageReader<'w, 's, SaveRequest>,
    loads: MessageReader<'w, 's, LoadRequest>,
    deletes: MessageReader<'w, 's, DeleteRequest>,
    exists: MessageReader<'w, 's, ExistsRequest>,
    lists: MessageReader<'w, 's, ListKeysRequest>,
    transactions: MessageReader<'w, 's, TransactionRequest>,
    clears: MessageReader<'w, 's, ClearRequest>,
}

impl RequestReaders<'_, '_> {
    fn read_all(&mut self) -> Vec<(Reply, Op)> {
        let mut ops: Vec<(Reply, Op)> = Vec::new();
        let mut push = |op: Op| ops.push((Reply::Public, op));
        self.saves.read().cloned().map(Op::from).for_each(&mut push);
        self.loads.read().cloned().map(Op::from).for_each(&mut push);
        self.deletes
            .read()
            .cloned()
            .map(Op::from)
            .for_each(&mut push);
        self.exists
            .read()
            .cloned()
            .map(Op::from)
            .for_each(&mut push);
        self.lists.read().cloned().map(Op::from).for_each(&mut push);
        self.transactions
            .read()
            .cloned()
            .map(Op::from)
            .for_each(&mut push);
        self.clears
            .read()
            .cloned()
            .map(Op::from)
            .for_each(&mut push);
        ops
    }
}

/// Last: reads this frame's requests (all kinds, in id order) and hands them to the
/// scheduler; closes a write batch whose window is over.
pub(crate) fn dispatch_requests(
    mut runtime: ResMut<StorageRuntime>,
    mut readers: RequestReaders,
    time: Res<Time<Real>>,
) {
    let now = time.elapsed();
    let ops = readers.read_all();
    runtime.inner.submit(ops, now);
    runtime.inner.close_due_batch(now);
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

/// PreUpdate: delivers what the pool finished: responses (messages and observer events),
/// cleanup reports and fresh stats.
pub(crate) fn collect_results(world: &mut World) {
    let done = world.resource::<StorageRuntime>().inner.try_collect();
    apply(world, done);
}

/// Last, on `AppExit`: finishes every request already sent, then delivers the results.
pub(crate) fn flush_on_exit(world: &mut World) {
    let (done, complete) = world
        .resource_mut::<StorageRuntime>()
        .inner
        .drain_blocking();
    apply(world, done);
    if !complete {
        let (queued, running) = world.resource::<StorageRuntime>().inner.counts();
        let timeout = world.resource::<StorageRuntime>().inner.exit_timeout;
        error!(
            "bevy_storage: {} storage requests were still pending {timeout:?} after AppExit; they may be lost",
            queued + running
        );
    }
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
                world.resource_mut::<StorageActivity>().state = StorageState::Failed(e.to_string());
            }
            Done::Job {
                outcomes,
                batch_committed,
            } => {
                if let Some(n) = batch_committed {
                    let mut activity = world.resource_mut::<StorageActivity>();
                    activity.batches_committed += 1;
                    activity.batched_requests += n as u64;
                }
                for (reply, outcome) in outcomes {
                    if outcome.is_ok() {
                        completed += 1;
                    } else {
                        failed += 1;
                    }
                    match reply {
                        Reply::Public => outcome.publish(world),
                        Reply::Internal(f) => f(world, outcome),
                    }
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
