//! The main-thread side of the plugin's machinery: hands requests to the
//! [scheduler](super::scheduler), brings results back through one channel and delivers them,
//! and drains everything on exit.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;
use parking_lot::Mutex;

use super::WriteBatching;
use super::kind::{Intake, Job};
use super::requests::SharedError;
use super::scheduler::{Done, OpenSource, Shared, panic_error, pool};
use crate::config::StorageConfig;
use crate::store::Store;

/// A short description of the configured backend, for logs.
pub(crate) fn describe(config: &StorageConfig) -> String {
    config.backend.describe()
}

/// The main-thread side of the runtime.
pub(crate) struct Runtime {
    pub(crate) shared: Arc<Shared>,
    rx: Receiver<Done>,
    pending_open: Option<OpenSource>,
    pub(crate) batching: WriteBatching,
    pub(crate) exit_timeout: Duration,
    /// Requests from the plugin itself, merged with the game's by id at the next dispatch
    /// (behind a mutex only so that the runtime is `Sync`, as a resource must be).
    internal: Mutex<Vec<Box<dyn Job>>>,
}

impl Runtime {
    pub(crate) fn new(
        source: OpenSource,
        cell: Arc<OnceLock<Result<Store, SharedError>>>,
        batching: WriteBatching,
        exit_timeout: Duration,
    ) -> Self {
        let (tx, rx) = crossbeam_channel::unbounded();
        Self {
            shared: Arc::new(Shared::new(tx, cell)),
            rx,
            pending_open: Some(source),
            batching,
            exit_timeout,
            internal: Mutex::new(Vec::new()),
        }
    }

    /// Starts opening the store, once.
    pub(crate) fn ensure_open_started(&mut self) {
        if let Some(source) = self.pending_open.take() {
            self.shared.start_open(source);
        }
    }

    /// Hands a frame's requests to the scheduler, together with the plugin's own (they are
    /// merged in id order when taken in).
    pub(crate) fn submit(&mut self, mut intake: Intake, now: Duration) {
        self.ensure_open_started();
        let internal = std::mem::take(self.internal.get_mut());
        if !internal.is_empty() {
            intake.push(Box::new(internal));
        }
        self.shared.submit(intake, self.batching, now);
    }

    /// Closes the open write batch when its window is over (nothing to do without batching).
    pub(crate) fn close_due_batch(&self, now: Duration) {
        if self.batching != WriteBatching::Off {
            self.shared.close_due_batch(self.batching, now, false);
        }
    }

    /// Everything that has arrived from the pool.
    pub(crate) fn try_collect(&self) -> Vec<Done> {
        self.rx.try_iter().collect()
    }

    /// Waits up to `timeout` for the next result.
    pub(crate) fn recv_timeout(&self, timeout: Duration) -> Option<Done> {
        self.rx.recv_timeout(timeout).ok()
    }

    /// Spawns a task on the pool that reports through the channel.
    pub(crate) fn spawn_report(
        &self,
        work: impl FnOnce(Store) -> Done + Send + 'static,
        on_panic: impl FnOnce(SharedError) -> Done + Send + 'static,
    ) -> bool {
        let Some(store) = self.shared.store() else {
            return false;
        };
        let tx = self.shared.tx.clone();
        pool()
            .spawn(async move {
                let done = catch_unwind(AssertUnwindSafe(|| work(store)))
                    .unwrap_or_else(|p| on_panic(panic_error(p)));
                let _ = tx.send(done);
            })
            .detach();
        true
    }

    pub(crate) fn is_ready(&self) -> bool {
        self.shared.store().is_some()
    }

    /// (queued requests, running work)
    pub(crate) fn counts(&self) -> (usize, usize) {
        self.shared.counts()
    }

    /// Queues a request of the plugin's own, dispatched with the game's next ones.
    pub(crate) fn push_internal(&mut self, job: Box<dyn Job>) {
        self.internal.get_mut().push(job);
    }

    /// Hands the plugin's own queued requests to the scheduler and closes any open batch
    /// (after everything handed over before): the first step of an exit flush.
    pub(crate) fn submit_everything(&mut self) {
        if !self.internal.get_mut().is_empty() || self.pending_open.is_some() {
            self.submit(Intake::default(), Duration::ZERO);
        }
        self.shared
            .close_due_batch(self.batching, Duration::ZERO, true);
    }
}

impl Drop for Runtime {
    /// Dropping the app without an `AppExit` still finishes every key-value request already
    /// dispatched, the store's open included (world requests, which need the app's world,
    /// cannot be finished then).
    fn drop(&mut self) {
        if self.shared.outstanding_without_world() == 0 && self.internal.get_mut().is_empty() {
            return;
        }
        self.submit_everything();
        let deadline = Instant::now() + self.exit_timeout;
        while self.shared.outstanding_without_world() > 0 {
            if Instant::now() >= deadline {
                bevy::log::error!(
                    "bevy_storage: storage requests were still running {:?} after the app was dropped; their results are lost",
                    self.exit_timeout
                );
                return;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}
