//! The one scheduler of every request, key-value and world alike: requests whose
//! [scopes](super::scope) overlap run one after another in id order, the others in parallel
//! on the [`AsyncComputeTaskPool`]; saves and deletes may be committed together as one write
//! batch.
//!
//! The scheduler lives behind a mutex shared with the tasks: when a task finishes, it starts
//! the next request for its keys itself, so a chain of requests for one key does not wait for
//! frames. A world request, whose turn has come, waits for the main thread to take its input
//! (capture the world); it holds its scope until its response was delivered on the main
//! thread (a loaded world applied), so the next world request sees the world it left.
//! Results always travel through one channel, in completion order.
//!
//! The main thread only hands over what a frame sent ([`Intake`]: the cloned messages) and
//! when to close a write batch, as [`Step`]s taken in strictly in order. A small frame's
//! requests (or one with a world request, whose turn needs the main thread) are taken in on
//! the spot when nothing is queued; a large one is taken in by one task on the pool (making
//! the jobs, their scopes, the order by id, queueing them a chunk at a time), so the frame
//! that sends 10,000 saves does not pay for their bookkeeping. Steps queued behind it wait
//! for it, so order per key and across kinds is the order of the ids, as on the spot. A
//! frame with a world request never queues behind the intake task: it waits for the task to
//! take everything in (its own requests too), so that a world request whose turn has come is
//! started in the frame that sent it.

use std::any::Any;
use std::collections::{HashMap, VecDeque};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bevy::tasks::{AsyncComputeTaskPool, TaskPool};
use crossbeam_channel::Sender;
use parking_lot::{Condvar, Mutex};

use super::WriteBatching;
use super::kind::{Intake, Job};
use super::requests::{SharedError, StorageResult};
use super::scope::{Scope, ScopeSet};
use crate::config::StorageConfig;
use crate::error::StorageError;
use crate::store::{StorageStats, Store};

/// Turns a panic payload into an error, so that a panicking `Serialize` impl or backend
/// still gets every request its response.
pub(crate) fn panic_error(payload: Box<dyn Any + Send>) -> SharedError {
    let message = payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".to_owned());
    Arc::new(StorageError::backend(
        "bevy_storage plugin",
        format!("the storage task panicked: {message}"),
    ))
}

/// What the main thread hears from the pool.
pub(crate) enum Done {
    /// The store opened (or failed to).
    Opened(Result<Store, SharedError>),
    /// Requests finished. `batch_committed`: the size of a batch that committed. `release`:
    /// the work holds its scope until these responses are delivered (world requests).
    Work {
        jobs: Vec<Box<dyn Job>>,
        batch_committed: Option<usize>,
        release: Option<u64>,
    },
    /// Fresh statistics (`None`: the refresh panicked).
    Stats(Option<StorageStats>),
    /// A TTL cleanup finished.
    Purged(StorageResult<usize>),
}

/// A unit of work: one request, or a batch of saves and deletes committed together.
struct Work {
    seq: u64,
    scope: Scope,
    jobs: Vec<Box<dyn Job>>,
    batch: Option<BatchState>,
}

struct BatchState {
    /// Still collecting writes; not runnable yet.
    open: bool,
    /// Real time when the batch opened.
    opened_at: Duration,
}

impl Work {
    fn runnable(&self) -> bool {
        !self.batch.as_ref().is_some_and(|b| b.open)
    }

    fn touches_world(&self) -> bool {
        self.jobs.iter().any(|j| j.touches_world())
    }

    /// Runs the work on a pool thread; every job keeps its outcome. Returns the size of a
    /// batch that committed.
    fn execute(&mut self, store: &Store) -> Option<usize> {
        let batched = self.batch.is_some() && self.jobs.len() > 1;
        let jobs = &mut self.jobs;
        let run = catch_unwind(AssertUnwindSafe(|| {
            if batched {
                run_batch(store, jobs)
            } else {
                for job in jobs.iter_mut() {
                    job.execute(store);
                }
                false
            }
        }));
        match run {
            Ok(committed) => committed.then_some(self.jobs.len()),
            Err(payload) => {
                let e = panic_error(payload);
                for job in &mut self.jobs {
                    job.set_failed(Arc::clone(&e));
                }
                None
            }
        }
    }
}

/// Commits a batch of saves and deletes as one transaction; every job gets the real result of
/// that one commit, and each delete whether it removed a live record (as the backend found it
/// while committing, after the batch's earlier operations on the same key).
fn run_batch(store: &Store, jobs: &mut [Box<dyn Job>]) -> bool {
    let operations = jobs
        .iter()
        .map(|job| {
            job.batch_operation()
                .expect("only batchable jobs join a batch")
        })
        .collect();
    match store.transaction_outcomes(operations) {
        Ok(outcomes) => {
            for (job, outcome) in jobs.iter_mut().zip(outcomes) {
                job.set_batched(Ok(outcome));
            }
            true
        }
        Err(e) => {
            let e = Arc::new(e);
            for job in jobs.iter_mut() {
                job.set_batched(Err(Arc::clone(&e)));
            }
            false
        }
    }
}

/// A frame with at most this many requests (and nothing queued before it) is taken in on the
/// main thread; a larger one by a task on the pool.
const IN_PLACE: usize = 32;

/// How many jobs the pool's intake queues per lock of the scheduler, so that the main thread
/// and finishing tasks never wait long for it.
const CHUNK: usize = 64;

/// Longest a frame with a world request waits for the intake task to queue the large frames
/// before it (see [`Shared::submit`]); past it the world request is taken in after them, as
/// any other step.
const WORLD_INTAKE_WAIT: Duration = Duration::from_secs(1);

/// What the main thread hands the scheduler, taken in strictly in order.
enum Step {
    /// A frame's requests.
    Requests {
        intake: Intake,
        batching: WriteBatching,
        now: Duration,
    },
    /// Close the open write batch if its window is over at `now` (`force`: whatever the
    /// window).
    CloseBatch {
        batching: WriteBatching,
        now: Duration,
        force: bool,
    },
}

enum StoreState {
    Opening,
    Ready(Store),
    Failed(SharedError),
}

struct Sched {
    state: StoreState,
    /// The open has been started (it may still be running).
    opening_started: bool,
    waiting: VecDeque<Work>,
    running: HashMap<u64, Scope>,
    running_set: ScopeSet,
    /// World work whose turn has come, waiting for the main thread to take its input.
    main_ready: Vec<Work>,
    next_seq: u64,
    /// The batch that new writes may still join.
    open_batch: Option<u64>,
    /// Scopes of the work queued after the open batch: a write for one of those keys must
    /// not jump ahead of them into the batch.
    after_open_batch: ScopeSet,
    /// Steps waiting for the intake task, in the order the main thread handed them over.
    steps: VecDeque<Step>,
    /// The intake task is running: a new step queues behind it.
    taking_in: bool,
    /// Requests handed over and not queued as work yet (in `steps` or being made into jobs).
    unqueued: usize,
    /// How many of them touch the world.
    unqueued_world: usize,
    /// Requests in `waiting` (a batch holds several).
    waiting_jobs: usize,
}

/// State shared by the main thread and the pool tasks.
pub(crate) struct Shared {
    sched: Mutex<Sched>,
    /// Signalled when the intake task has taken every step in and stops.
    intake_idle: Condvar,
    pub(crate) tx: Sender<Done>,
    cell: Arc<OnceLock<Result<Store, SharedError>>>,
    /// [`counts`](Self::counts), kept current under the lock so that the main thread reads
    /// them every frame without taking it.
    queued: AtomicUsize,
    running: AtomicUsize,
    /// World work waits for the main thread (`main_ready` is not empty).
    world_ready: AtomicBool,
}

pub(crate) fn pool() -> &'static AsyncComputeTaskPool {
    AsyncComputeTaskPool::get_or_init(TaskPool::default)
}

/// What the store is opened from.
pub(crate) enum OpenSource {
    Config(Box<StorageConfig>),
    Store(Store),
    /// The configuration could not be made (an invalid `for_app` identifier): the open fails
    /// with this error, reported like any other open failure.
    Failed(SharedError),
}

impl Shared {
    pub(crate) fn new(tx: Sender<Done>, cell: Arc<OnceLock<Result<Store, SharedError>>>) -> Self {
        Self {
            sched: Mutex::new(Sched {
                state: StoreState::Opening,
                opening_started: false,
                waiting: VecDeque::new(),
                running: HashMap::new(),
                running_set: ScopeSet::default(),
                main_ready: Vec::new(),
                next_seq: 0,
                open_batch: None,
                after_open_batch: ScopeSet::default(),
                steps: VecDeque::new(),
                taking_in: false,
                unqueued: 0,
                unqueued_world: 0,
                waiting_jobs: 0,
            }),
            intake_idle: Condvar::new(),
            tx,
            cell,
            queued: AtomicUsize::new(0),
            running: AtomicUsize::new(0),
            world_ready: AtomicBool::new(false),
        }
    }

    /// Main thread: hands over a frame's requests. A small frame (or one with a world
    /// request) is taken in on the spot when nothing is queued before it; otherwise it queues
    /// behind the steps handed over earlier, for the intake task.
    ///
    /// A frame with a world request that finds the intake task still queueing an earlier
    /// large frame waits for it to take everything in, its own requests included (the
    /// bookkeeping of those requests, a fraction of a microsecond each, at most
    /// [`WORLD_INTAKE_WAIT`]): the world request's turn can then come in this frame, and a
    /// world save captures the world of the frame that sent it, not that of a later one.
    pub(crate) fn submit(self: &Arc<Self>, intake: Intake, batching: WriteBatching, now: Duration) {
        if intake.is_empty() {
            return;
        }
        let mut sched = self.sched.lock();
        sched.unqueued += intake.len();
        sched.unqueued_world += intake.world_len();
        if !sched.taking_in && (intake.world_len() > 0 || intake.len() <= IN_PLACE) {
            // Only the main thread starts the intake task, so nothing can queue ahead of
            // these while the lock is released.
            drop(sched);
            let jobs = intake.into_jobs();
            let mut sched = self.sched.lock();
            self.queue_jobs(&mut sched, jobs, batching, now);
            self.schedule(&mut sched);
            return;
        }
        let world = intake.world_len() > 0;
        sched.steps.push_back(Step::Requests {
            intake,
            batching,
            now,
        });
        self.publish(&sched);
        self.start_intake(&mut sched);
        if world {
            let deadline = std::time::Instant::now() + WORLD_INTAKE_WAIT;
            while sched.taking_in {
                if self
                    .intake_idle
                    .wait_until(&mut sched, deadline)
                    .timed_out()
                {
                    bevy::log::warn!(
                        "bevy_storage: a world request waited {WORLD_INTAKE_WAIT:?} for the \
                         requests before it to be queued; it runs after them, in a later frame"
                    );
                    break;
                }
            }
        }
    }

    /// Main thread: closes the open batch if its window is over (`force`: whatever the
    /// window), after every step handed over before.
    pub(crate) fn close_due_batch(
        self: &Arc<Self>,
        batching: WriteBatching,
        now: Duration,
        force: bool,
    ) {
        let mut sched = self.sched.lock();
        if sched.taking_in {
            sched.steps.push_back(Step::CloseBatch {
                batching,
                now,
                force,
            });
            return;
        }
        self.close_batch_now(&mut sched, batching, now, force);
    }

    fn close_batch_now(
        self: &Arc<Self>,
        sched: &mut Sched,
        batching: WriteBatching,
        now: Duration,
        force: bool,
    ) {
        let Some(seq) = sched.open_batch else {
            return;
        };
        let due = force
            || match batching {
                WriteBatching::Off | WriteBatching::PerFrame => true,
                WriteBatching::Window(window) => sched
                    .waiting
                    .iter()
                    .find(|w| w.seq == seq)
                    .and_then(|w| w.batch.as_ref())
                    .is_none_or(|b| now.saturating_sub(b.opened_at) >= window),
            };
        if due {
            sched.close_batch();
            self.schedule(sched);
        }
    }

    /// Queues jobs (in id order) as work; once the store failed to open, answers them with
    /// its error instead.
    fn queue_jobs(
        self: &Arc<Self>,
        sched: &mut Sched,
        jobs: Vec<Box<dyn Job>>,
        batching: WriteBatching,
        now: Duration,
    ) {
        let world = jobs.iter().filter(|job| job.touches_world()).count();
        sched.unqueued -= jobs.len();
        sched.unqueued_world -= world;
        for mut job in jobs {
            if let StoreState::Failed(e) = &sched.state {
                job.set_failed(Arc::clone(e));
                let _ = self.tx.send(Done::Work {
                    jobs: vec![job],
                    batch_committed: None,
                    release: None,
                });
                continue;
            }
            sched.enqueue(job, batching, now);
        }
    }

    /// Starts the intake task unless it runs.
    fn start_intake(self: &Arc<Self>, sched: &mut Sched) {
        if sched.taking_in {
            return;
        }
        sched.taking_in = true;
        let shared = Arc::clone(self);
        pool().spawn(async move { shared.take_in() }).detach();
    }

    /// The intake task: takes the queued steps in, in order, until none is left.
    fn take_in(self: &Arc<Self>) {
        loop {
            let step = {
                let mut sched = self.sched.lock();
                match sched.steps.pop_front() {
                    Some(step) => step,
                    None => {
                        sched.taking_in = false;
                        self.intake_idle.notify_all();
                        return;
                    }
                }
            };
            match step {
                Step::Requests {
                    intake,
                    batching,
                    now,
                } => self.take_in_requests(intake, batching, now),
                Step::CloseBatch {
                    batching,
                    now,
                    force,
                } => {
                    let close = catch_unwind(AssertUnwindSafe(|| {
                        let mut sched = self.sched.lock();
                        self.close_batch_now(&mut sched, batching, now, force);
                    }));
                    if let Err(payload) = close {
                        bevy::log::error!(
                            "bevy_storage: closing a write batch failed: {}",
                            panic_error(payload)
                        );
                    }
                }
            }
        }
    }

    /// Makes a frame's requests into jobs outside the lock, then queues them a chunk at a
    /// time.
    fn take_in_requests(self: &Arc<Self>, intake: Intake, batching: WriteBatching, now: Duration) {
        let (len, world) = (intake.len(), intake.world_len());
        let (mut queued, mut queued_world) = (0, 0);
        let run = catch_unwind(AssertUnwindSafe(|| {
            let mut jobs = intake.into_jobs().into_iter();
            loop {
                let chunk: Vec<Box<dyn Job>> = jobs.by_ref().take(CHUNK).collect();
                if chunk.is_empty() {
                    break;
                }
                let n = chunk.len();
                let n_world = chunk.iter().filter(|job| job.touches_world()).count();
                let mut sched = self.sched.lock();
                // Counted as queued first: a panic below loses these, and no count may wait
                // for them.
                queued += n;
                queued_world += n_world;
                self.queue_jobs(&mut sched, chunk, batching, now);
                self.schedule(&mut sched);
            }
        }));
        if let Err(payload) = run {
            // A bug of the plugin's own: say so, and do not leave the exit flush waiting for
            // requests that will never be queued.
            bevy::log::error!(
                "bevy_storage: {} storage requests were lost while queueing them: {}",
                len - queued,
                panic_error(payload)
            );
            let mut sched = self.sched.lock();
            sched.unqueued -= len - queued;
            sched.unqueued_world -= world - queued_world;
            self.publish(&sched);
        }
    }

    /// Starts every waiting work that conflicts with nothing running and nothing queued
    /// before it; world work goes to the main thread first. Every change of the queue ends
    /// here, which publishes the counts.
    fn schedule(self: &Arc<Self>, sched: &mut Sched) {
        self.start_runnable(sched);
        self.publish(sched);
    }

    /// Keeps [`counts`](Self::counts) and the main thread's flag current (under the lock).
    fn publish(&self, sched: &Sched) {
        self.queued
            .store(sched.unqueued + sched.waiting_jobs, Ordering::Relaxed);
        self.running.store(sched.running.len(), Ordering::Relaxed);
        self.world_ready
            .store(!sched.main_ready.is_empty(), Ordering::Release);
    }

    fn start_runnable(self: &Arc<Self>, sched: &mut Sched) {
        let StoreState::Ready(store) = &sched.state else {
            return;
        };
        let store = store.clone();
        let mut blocked = ScopeSet::default();
        let mut i = 0;
        while i < sched.waiting.len() {
            let work = &sched.waiting[i];
            if work.runnable()
                && !sched.running_set.conflicts(&work.scope)
                && !blocked.conflicts(&work.scope)
            {
                let work = sched.waiting.remove(i).expect("index is in bounds");
                sched.waiting_jobs -= work.jobs.len();
                sched.running_set.add(&work.scope);
                sched.running.insert(work.seq, work.scope.clone());
                if work.touches_world() {
                    sched.main_ready.push(work);
                } else {
                    self.start(work, store.clone(), false);
                }
            } else {
                blocked.add(&work.scope);
                if blocked.all > 0 {
                    break;
                }
                i += 1;
            }
        }
    }

    /// Runs `work` on the pool. `hold_scope`: keep its scope until its responses are
    /// delivered ([`release`](Self::release)).
    fn start(self: &Arc<Self>, mut work: Work, store: Store, hold_scope: bool) {
        let shared = Arc::clone(self);
        pool()
            .spawn(async move {
                let seq = work.seq;
                let batch_committed = work.execute(&store);
                // Send before releasing the keys: once nothing is outstanding, every result
                // is already in the channel (the exit flush relies on it).
                let _ = shared.tx.send(Done::Work {
                    jobs: work.jobs,
                    batch_committed,
                    release: hold_scope.then_some(seq),
                });
                let mut sched = shared.sched.lock();
                if !hold_scope {
                    sched.release(seq);
                }
                shared.schedule(&mut sched);
            })
            .detach();
    }

    /// Main thread: gives the world work whose turn has come its input, and starts it.
    pub(crate) fn start_world_work(self: &Arc<Self>, world: &mut bevy::prelude::World) {
        if !self.world_ready.load(Ordering::Acquire) {
            return;
        }
        let (ready, store) = {
            let mut sched = self.sched.lock();
            let StoreState::Ready(store) = &sched.state else {
                return;
            };
            let store = store.clone();
            let ready = std::mem::take(&mut sched.main_ready);
            self.publish(&sched);
            (ready, store)
        };
        for mut work in ready {
            for job in &mut work.jobs {
                job.take_input(world);
            }
            self.start(work, store.clone(), true);
        }
    }

    /// Main thread, after delivering held work: frees its scope and starts what waited.
    pub(crate) fn release(self: &Arc<Self>, seq: u64) {
        let mut sched = self.sched.lock();
        sched.release(seq);
        self.schedule(&mut sched);
    }

    /// Opens the store on the pool.
    pub(crate) fn start_open(self: &Arc<Self>, source: OpenSource) {
        {
            let mut sched = self.sched.lock();
            if sched.opening_started {
                return;
            }
            sched.opening_started = true;
        }
        let shared = Arc::clone(self);
        pool()
            .spawn(async move {
                let result = match source {
                    OpenSource::Store(store) => Ok(store),
                    OpenSource::Failed(error) => Err(error),
                    OpenSource::Config(config) => {
                        catch_unwind(AssertUnwindSafe(|| Store::open(*config)))
                            .unwrap_or_else(|p| {
                                Err(StorageError::Config(panic_error(p).to_string()))
                            })
                            .map_err(Arc::new)
                    }
                };
                let _ = shared.cell.set(result.clone());
                let mut sched = shared.sched.lock();
                // Under the lock, so that "nothing outstanding" implies "all results sent".
                let _ = shared.tx.send(Done::Opened(result.clone()));
                match result {
                    Ok(store) => {
                        sched.state = StoreState::Ready(store);
                        shared.schedule(&mut sched);
                    }
                    Err(e) => {
                        sched.open_batch = None;
                        sched.waiting_jobs = 0;
                        for mut work in std::mem::take(&mut sched.waiting) {
                            for job in &mut work.jobs {
                                job.set_failed(Arc::clone(&e));
                            }
                            let _ = shared.tx.send(Done::Work {
                                jobs: work.jobs,
                                batch_committed: None,
                                release: None,
                            });
                        }
                        sched.state = StoreState::Failed(e);
                        shared.publish(&sched);
                    }
                }
            })
            .detach();
    }

    /// Requests queued, running or waiting for the main thread, plus an open in progress.
    pub(crate) fn outstanding(&self) -> usize {
        let sched = self.sched.lock();
        let opening =
            usize::from(sched.opening_started && matches!(sched.state, StoreState::Opening));
        sched.waiting.len() + sched.running.len() + sched.unqueued + opening
    }

    /// Like [`outstanding`](Self::outstanding), leaving out world requests (which need the
    /// app's world to finish): what dropping the app can still wait for.
    pub(crate) fn outstanding_without_world(&self) -> usize {
        let sched = self.sched.lock();
        let opening =
            usize::from(sched.opening_started && matches!(sched.state, StoreState::Opening));
        let waiting = sched.waiting.iter().filter(|w| !w.scope.world).count();
        let running = sched.running.values().filter(|s| !s.world).count();
        let unqueued = sched.unqueued - sched.unqueued_world;
        opening + waiting + running + unqueued
    }

    /// (queued requests, running work), as of the last change of the queue; read without
    /// the lock.
    pub(crate) fn counts(&self) -> (usize, usize) {
        (
            self.queued.load(Ordering::Relaxed),
            self.running.load(Ordering::Relaxed),
        )
    }

    pub(crate) fn store(&self) -> Option<Store> {
        match &self.sched.lock().state {
            StoreState::Ready(store) => Some(store.clone()),
            _ => None,
        }
    }
}

impl Sched {
    fn enqueue(&mut self, job: Box<dyn Job>, batching: WriteBatching, now: Duration) {
        let scope = job.scope().clone();
        if batching != WriteBatching::Off && job.batch_operation().is_some() {
            if let Some(seq) = self.open_batch {
                if !self.after_open_batch.conflicts(&scope)
                    && let Some(work) = self.waiting.iter_mut().find(|w| w.seq == seq)
                {
                    work.scope.merge_keys(&scope);
                    work.jobs.push(job);
                    self.waiting_jobs += 1;
                    return;
                }
                self.close_batch();
            }
            let seq = self.next_seq();
            self.open_batch = Some(seq);
            self.after_open_batch = ScopeSet::default();
            self.waiting_jobs += 1;
            self.waiting.push_back(Work {
                seq,
                scope,
                jobs: vec![job],
                batch: Some(BatchState {
                    open: true,
                    opened_at: now,
                }),
            });
            return;
        }
        if self.open_batch.is_some() {
            self.after_open_batch.add(&scope);
        }
        let seq = self.next_seq();
        self.waiting_jobs += 1;
        self.waiting.push_back(Work {
            seq,
            scope,
            jobs: vec![job],
            batch: None,
        });
    }

    fn release(&mut self, seq: u64) {
        if let Some(scope) = self.running.remove(&seq) {
            self.running_set.remove(&scope);
        }
    }

    fn close_batch(&mut self) {
        if let Some(seq) = self.open_batch.take()
            && let Some(work) = self.waiting.iter_mut().find(|w| w.seq == seq)
            && let Some(batch) = &mut work.batch
        {
            batch.open = false;
        }
        self.after_open_batch = ScopeSet::default();
    }

    fn next_seq(&mut self) -> u64 {
        self.next_seq += 1;
        self.next_seq
    }
}
