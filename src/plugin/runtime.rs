//! The machinery behind the plugin: a scheduler that keeps requests for one key in order
//! while running different keys in parallel on the [`AsyncComputeTaskPool`], optional write
//! batching, and the channel that brings results back to the main thread.
//!
//! The scheduler lives behind a mutex shared with the tasks: when a task finishes, it starts
//! the next request for its key itself, so a chain of requests for one key does not wait
//! for frames. Results always travel through one channel, in completion order, and are
//! delivered on the main thread by the `Collect` set (or by the exit flush).

use std::any::Any;
use std::collections::{HashMap, VecDeque};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use bevy::ecs::world::World;
use bevy::tasks::{AsyncComputeTaskPool, TaskPool};
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use parking_lot::Mutex;

use super::WriteBatching;
use super::requests::*;
use crate::config::{BackendConfig, StorageConfig};
use crate::error::StorageError;
use crate::key;
use crate::store::{ErasedValue, LoadOptions, SaveOptions, StorageOperation, StorageStats, Store};

/// A callback of the plugin's own requests, run on the main thread with the outcome.
pub(crate) type InternalReply = Box<dyn FnOnce(&mut World, Outcome) + Send + Sync>;

/// Where a finished request's outcome goes.
pub(crate) enum Reply {
    /// To the game: a response message plus an observer event.
    Public,
    /// To the plugin itself (persisted resources).
    Internal(InternalReply),
}

/// The finished form of one request.
#[derive(Debug)]
pub(crate) enum Outcome {
    Save(SaveCompleted),
    Load(LoadCompleted),
    Delete(DeleteCompleted),
    Exists(ExistsCompleted),
    ListKeys(ListKeysCompleted),
    Transaction(TransactionCompleted),
    Clear(ClearCompleted),
}

impl Outcome {
    pub(crate) fn is_ok(&self) -> bool {
        match self {
            Outcome::Save(r) => r.is_ok(),
            Outcome::Load(r) => r.is_ok(),
            Outcome::Delete(r) => r.is_ok(),
            Outcome::Exists(r) => r.is_ok(),
            Outcome::ListKeys(r) => r.is_ok(),
            Outcome::Transaction(r) => r.is_ok(),
            Outcome::Clear(r) => r.is_ok(),
        }
    }

    /// Writes the response message and triggers the observer event.
    pub(crate) fn publish(self, world: &mut World) {
        match self {
            Outcome::Save(r) => publish(world, r),
            Outcome::Load(r) => publish(world, r),
            Outcome::Delete(r) => publish(world, r),
            Outcome::Exists(r) => publish(world, r),
            Outcome::ListKeys(r) => publish(world, r),
            Outcome::Transaction(r) => publish(world, r),
            Outcome::Clear(r) => publish(world, r),
        }
    }
}

/// Writes `response` as a message and triggers it as an observer event.
pub(crate) fn publish<'a, E>(world: &mut World, response: E)
where
    E: bevy::prelude::Message + bevy::prelude::Event<Trigger<'a>: Default> + Clone,
{
    world.write_message(response.clone());
    world.trigger(response);
}

/// One request, as the scheduler sees it.
#[derive(Debug, Clone)]
pub(crate) enum Op {
    Save {
        id: RequestId,
        key: String,
        value: ErasedValue,
        options: SaveOptions,
    },
    Load {
        id: RequestId,
        key: String,
        options: LoadOptions,
    },
    Delete {
        id: RequestId,
        key: String,
    },
    Exists {
        id: RequestId,
        key: String,
    },
    ListKeys {
        id: RequestId,
        prefix: String,
    },
    Transaction {
        id: RequestId,
        operations: Vec<StorageOperation>,
    },
    Clear {
        id: RequestId,
    },
}

impl From<SaveRequest> for Op {
    fn from(r: SaveRequest) -> Self {
        Op::Save {
            id: r.id(),
            key: r.key,
            value: r.value,
            options: r.options,
        }
    }
}
impl From<LoadRequest> for Op {
    fn from(r: LoadRequest) -> Self {
        Op::Load {
            id: r.id(),
            key: r.key,
            options: r.options,
        }
    }
}
impl From<DeleteRequest> for Op {
    fn from(r: DeleteRequest) -> Self {
        Op::Delete {
            id: r.id(),
            key: r.key,
        }
    }
}
impl From<ExistsRequest> for Op {
    fn from(r: ExistsRequest) -> Self {
        Op::Exists {
            id: r.id(),
            key: r.key,
        }
    }
}
impl From<ListKeysRequest> for Op {
    fn from(r: ListKeysRequest) -> Self {
        Op::ListKeys {
            id: r.id(),
            prefix: r.prefix,
        }
    }
}
impl From<TransactionRequest> for Op {
    fn from(r: TransactionRequest) -> Self {
        Op::Transaction {
            id: r.id(),
            operations: r.operations,
        }
    }
}
impl From<ClearRequest> for Op {
    fn from(r: ClearRequest) -> Self {
        Op::Clear { id: r.id() }
    }
}

impl Op {
    pub(crate) fn id(&self) -> RequestId {
        match self {
            Op::Save { id, .. }
            | Op::Load { id, .. }
            | Op::Delete { id, .. }
            | Op::Exists { id, .. }
            | Op::ListKeys { id, .. }
            | Op::Transaction { id, .. }
            | Op::Clear { id } => *id,
        }
    }

    /// What the request must not run concurrently with.
    fn scope(&self) -> Scope {
        match self {
            Op::Save { key, .. }
            | Op::Load { key, .. }
            | Op::Delete { key, .. }
            | Op::Exists { key, .. } => Scope::Keys(vec![key.clone()]),
            Op::ListKeys { prefix, .. } => Scope::Prefix(prefix.clone()),
            Op::Transaction { operations, .. } => {
                let mut keys: Vec<String> = operations.iter().map(|o| o.key().to_owned()).collect();
                keys.sort_unstable();
                keys.dedup();
                Scope::Keys(keys)
            }
            Op::Clear { .. } => Scope::All,
        }
    }

    /// Whether the request may join a write batch: valid-key saves that may overwrite, and
    /// deletes. A bad key or a create-only save fails on its own, never a whole batch.
    fn batchable(&self) -> bool {
        match self {
            Op::Save { key, options, .. } => options.overwrite && key::validate_key(key).is_ok(),
            Op::Delete { key, .. } => key::validate_key(key).is_ok(),
            _ => false,
        }
    }

    /// The outcome of this request failing with `error`.
    pub(crate) fn fail(&self, error: SharedError) -> Outcome {
        let result = Err(error);
        match self {
            Op::Save { id, key, .. } => Outcome::Save(SaveCompleted {
                id: *id,
                key: key.clone(),
                result,
            }),
            Op::Load { id, key, .. } => Outcome::Load(LoadCompleted {
                id: *id,
                key: key.clone(),
                result: result.map(|()| None),
            }),
            Op::Delete { id, key } => Outcome::Delete(DeleteCompleted {
                id: *id,
                key: key.clone(),
                result: result.map(|()| false),
            }),
            Op::Exists { id, key } => Outcome::Exists(ExistsCompleted {
                id: *id,
                key: key.clone(),
                result: result.map(|()| false),
            }),
            Op::ListKeys { id, prefix } => Outcome::ListKeys(ListKeysCompleted {
                id: *id,
                prefix: prefix.clone(),
                result: result.map(|()| Vec::new()),
            }),
            Op::Transaction { id, operations } => Outcome::Transaction(TransactionCompleted {
                id: *id,
                keys: operations.iter().map(|o| o.key().to_owned()).collect(),
                result,
            }),
            Op::Clear { id } => Outcome::Clear(ClearCompleted { id: *id, result }),
        }
    }

    /// Runs the request against the store (on a pool thread).
    fn run(&self, store: &Store) -> Outcome {
        let shared = |e: StorageError| Arc::new(e);
        match self {
            Op::Save {
                id,
                key,
                value,
                options,
            } => Outcome::Save(SaveCompleted {
                id: *id,
                key: key.clone(),
                result: store
                    .transaction(vec![save_op(key, value, options)])
                    .map_err(shared),
            }),
            Op::Load { id, key, options } => Outcome::Load(LoadCompleted {
                id: *id,
                key: key.clone(),
                result: store
                    .load_bytes(key, options)
                    .map(|found| {
                        found.map(|(payload, info)| LoadedValue::new(payload, info.format))
                    })
                    .map_err(shared),
            }),
            Op::Delete { id, key } => Outcome::Delete(DeleteCompleted {
                id: *id,
                key: key.clone(),
                result: store.delete(key).map_err(shared),
            }),
            Op::Exists { id, key } => Outcome::Exists(ExistsCompleted {
                id: *id,
                key: key.clone(),
                result: store.exists(key).map_err(shared),
            }),
            Op::ListKeys { id, prefix } => Outcome::ListKeys(ListKeysCompleted {
                id: *id,
                prefix: prefix.clone(),
                result: store.list_keys(prefix).map_err(shared),
            }),
            Op::Transaction { id, operations } => Outcome::Transaction(TransactionCompleted {
                id: *id,
                keys: operations.iter().map(|o| o.key().to_owned()).collect(),
                result: store.transaction(operations.clone()).map_err(shared),
            }),
            Op::Clear { id } => Outcome::Clear(ClearCompleted {
                id: *id,
                result: store.clear().map_err(shared),
            }),
        }
    }
}

fn save_op(key: &str, value: &ErasedValue, options: &SaveOptions) -> StorageOperation {
    StorageOperation::Save {
        key: key.to_owned(),
        value: value.clone(),
        options: options.clone(),
    }
}

/// Runs a batch of saves and deletes as one transaction; every item gets the real result of
/// that one commit, and each delete whether it removed a live record (as the backend found it
/// while committing, after the batch's earlier operations on the same key).
fn run_batch(store: &Store, ops: &[Op]) -> Vec<Outcome> {
    let operations = ops
        .iter()
        .map(|op| match op {
            Op::Save {
                key,
                value,
                options,
                ..
            } => save_op(key, value, options),
            Op::Delete { key, .. } => StorageOperation::delete(key.clone()),
            _ => unreachable!("only saves and deletes are batched"),
        })
        .collect();
    let outcomes = match store.transaction_outcomes(operations) {
        Ok(outcomes) => outcomes,
        Err(e) => {
            let e = Arc::new(e);
            return ops.iter().map(|op| op.fail(Arc::clone(&e))).collect();
        }
    };
    ops.iter()
        .zip(outcomes)
        .map(|(op, outcome)| match op {
            Op::Save { id, key, .. } => Outcome::Save(SaveCompleted {
                id: *id,
                key: key.clone(),
                result: Ok(()),
            }),
            Op::Delete { id, key } => Outcome::Delete(DeleteCompleted {
                id: *id,
                key: key.clone(),
                result: Ok(outcome.previous_size.is_some()),
            }),
            _ => unreachable!("only saves and deletes are batched"),
        })
        .collect()
}

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

// ---------------------------------------------------------------------------------------------
// Scopes: which requests must wait for which
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
enum Scope {
    /// These exact keys.
    Keys(Vec<String>),
    /// Every key starting with this prefix (a listing).
    Prefix(String),
    /// Everything (clear).
    All,
}

/// A multiset of scopes, to ask "does this scope overlap any of them?".
#[derive(Default, Debug)]
struct ScopeSet {
    keys: HashMap<String, usize>,
    prefixes: Vec<String>,
    all: usize,
}

impl ScopeSet {
    fn is_empty(&self) -> bool {
        self.keys.is_empty() && self.prefixes.is_empty() && self.all == 0
    }

    fn conflicts(&self, scope: &Scope) -> bool {
        if self.all > 0 {
            return true;
        }
        match scope {
            Scope::All => !self.is_empty(),
            Scope::Keys(keys) => keys.iter().any(|k| {
                self.keys.contains_key(k) || self.prefixes.iter().any(|p| k.starts_with(p.as_str()))
            }),
            Scope::Prefix(p) => {
                self.keys.keys().any(|k| k.starts_with(p.as_str()))
                    || self
                        .prefixes
                        .iter()
                        .any(|q| q.starts_with(p.as_str()) || p.starts_with(q.as_str()))
            }
        }
    }

    fn add(&mut self, scope: &Scope) {
        match scope {
            Scope::Keys(keys) => {
                for k in keys {
                    *self.keys.entry(k.clone()).or_default() += 1;
                }
            }
            Scope::Prefix(p) => self.prefixes.push(p.clone()),
            Scope::All => self.all += 1,
        }
    }

    fn remove(&mut self, scope: &Scope) {
        match scope {
            Scope::Keys(keys) => {
                for k in keys {
                    if let Some(n) = self.keys.get_mut(k) {
                        *n -= 1;
                        if *n == 0 {
                            self.keys.remove(k);
                        }
                    }
                }
            }
            Scope::Prefix(p) => {
                if let Some(i) = self.prefixes.iter().position(|q| q == p) {
                    self.prefixes.swap_remove(i);
                }
            }
            Scope::All => self.all = self.all.saturating_sub(1),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The scheduler
// ---------------------------------------------------------------------------------------------

/// A unit of work: one request, or a batch of saves and deletes committed together.
struct Job {
    seq: u64,
    scope: Scope,
    items: Vec<(Reply, Op)>,
    batch: Option<BatchState>,
}

struct BatchState {
    /// Still collecting writes; not runnable yet.
    open: bool,
    /// Real time when the batch opened.
    opened_at: Duration,
}

impl Job {
    fn runnable(&self) -> bool {
        !self.batch.as_ref().is_some_and(|b| b.open)
    }

    /// Runs the job on a pool thread.
    fn execute(self, store: &Store) -> Done {
        let batch_size = self.batch.as_ref().map(|_| self.items.len());
        let (replies, ops): (Vec<Reply>, Vec<Op>) = self.items.into_iter().unzip();
        let outcomes = match catch_unwind(AssertUnwindSafe(|| {
            if ops.len() == 1 {
                vec![ops[0].run(store)]
            } else {
                run_batch(store, &ops)
            }
        })) {
            Ok(outcomes) => outcomes,
            Err(payload) => {
                let e = panic_error(payload);
                ops.iter().map(|op| op.fail(Arc::clone(&e))).collect()
            }
        };
        let committed = batch_size.filter(|&n| n > 1 && outcomes.iter().all(Outcome::is_ok));
        Done::Job {
            outcomes: replies.into_iter().zip(outcomes).collect(),
            batch_committed: committed,
        }
    }
}

/// What the main thread hears from the pool.
pub(crate) enum Done {
    /// The store opened (or failed to).
    Opened(Result<Store, SharedError>),
    /// Requests finished. `batch_committed`: the size of a batch that committed.
    Job {
        outcomes: Vec<(Reply, Outcome)>,
        batch_committed: Option<usize>,
    },
    /// Fresh statistics (`None`: the refresh panicked).
    Stats(Option<StorageStats>),
    /// A TTL cleanup finished.
    Purged(StorageResult<usize>),
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
    waiting: VecDeque<Job>,
    running: HashMap<u64, Scope>,
    running_set: ScopeSet,
    next_seq: u64,
    /// The batch that new writes may still join.
    open_batch: Option<u64>,
    /// Scopes of the jobs queued after the open batch: a write for one of those keys must
    /// not jump ahead of them into the batch.
    after_open_batch: ScopeSet,
}

/// State shared by the main thread and the pool tasks.
pub(crate) struct Shared {
    sched: Mutex<Sched>,
    tx: Sender<Done>,
    cell: Arc<OnceLock<Result<Store, SharedError>>>,
}

fn pool() -> &'static AsyncComputeTaskPool {
    AsyncComputeTaskPool::get_or_init(TaskPool::default)
}

impl Shared {
    /// Queues requests (already in id order) and starts what can start.
    fn submit(self: &Arc<Self>, items: Vec<(Reply, Op)>, batching: WriteBatching, now: Duration) {
        let mut sched = self.sched.lock();
        for (reply, op) in items {
            if let StoreState::Failed(e) = &sched.state {
                let outcome = op.fail(Arc::clone(e));
                let _ = self.tx.send(Done::Job {
                    outcomes: vec![(reply, outcome)],
                    batch_committed: None,
                });
                continue;
            }
            sched.enqueue(reply, op, batching, now);
        }
        self.schedule(&mut sched);
    }

    /// Closes the open batch if its window is over (`force`: whatever the window).
    fn close_due_batch(self: &Arc<Self>, batching: WriteBatching, now: Duration, force: bool) {
        let mut sched = self.sched.lock();
        let Some(seq) = sched.open_batch else {
            return;
        };
        let due = force
            || match batching {
                WriteBatching::Off | WriteBatching::PerFrame => true,
                WriteBatching::Window(window) => sched
                    .waiting
                    .iter()
                    .find(|j| j.seq == seq)
                    .and_then(|j| j.batch.as_ref())
                    .is_none_or(|b| now.saturating_sub(b.opened_at) >= window),
            };
        if due {
            sched.close_batch();
            self.schedule(&mut sched);
        }
    }

    /// Starts every waiting job that conflicts with nothing running and nothing queued
    /// before it.
    fn schedule(self: &Arc<Self>, sched: &mut Sched) {
        let StoreState::Ready(store) = &sched.state else {
            return;
        };
        let store = store.clone();
        let mut blocked = ScopeSet::default();
        let mut i = 0;
        while i < sched.waiting.len() {
            let job = &sched.waiting[i];
            if job.runnable()
                && !sched.running_set.conflicts(&job.scope)
                && !blocked.conflicts(&job.scope)
            {
                let job = sched.waiting.remove(i).expect("index is in bounds");
                sched.running_set.add(&job.scope);
                sched.running.insert(job.seq, job.scope.clone());
                self.start(job, store.clone());
            } else {
                blocked.add(&job.scope);
                if blocked.all > 0 {
                    break;
                }
                i += 1;
            }
        }
    }

    fn start(self: &Arc<Self>, job: Job, store: Store) {
        let shared = Arc::clone(self);
        pool()
            .spawn(async move {
                let seq = job.seq;
                let done = job.execute(&store);
                // Send before releasing the keys: once nothing is outstanding, every result
                // is already in the channel (the exit flush relies on it).
                let _ = shared.tx.send(done);
                let mut sched = shared.sched.lock();
                if let Some(scope) = sched.running.remove(&seq) {
                    sched.running_set.remove(&scope);
                }
                shared.schedule(&mut sched);
            })
            .detach();
    }

    /// Opens the store on the pool.
    fn start_open(self: &Arc<Self>, source: OpenSource) {
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
                        for job in std::mem::take(&mut sched.waiting) {
                            let outcomes = job
                                .items
                                .into_iter()
                                .map(|(reply, op)| {
                                    let outcome = op.fail(Arc::clone(&e));
                                    (reply, outcome)
                                })
                                .collect();
                            let _ = shared.tx.send(Done::Job {
                                outcomes,
                                batch_committed: None,
                            });
                        }
                        sched.state = StoreState::Failed(e);
                    }
                }
            })
            .detach();
    }

    /// Requests queued or running, plus an open in progress.
    fn outstanding(&self) -> usize {
        let sched = self.sched.lock();
        let opening =
            usize::from(sched.opening_started && matches!(sched.state, StoreState::Opening));
        sched.waiting.len() + sched.running.len() + opening
    }

    fn counts(&self) -> (usize, usize) {
        let sched = self.sched.lock();
        (
            sched.waiting.iter().map(|j| j.items.len()).sum(),
            sched.running.len(),
        )
    }

    fn store(&self) -> Option<Store> {
        match &self.sched.lock().state {
            StoreState::Ready(store) => Some(store.clone()),
            _ => None,
        }
    }
}

impl Sched {
    fn enqueue(&mut self, reply: Reply, op: Op, batching: WriteBatching, now: Duration) {
        let scope = op.scope();
        if batching != WriteBatching::Off && op.batchable() {
            if let Some(seq) = self.open_batch {
                if !self.after_open_batch.conflicts(&scope)
                    && let Some(job) = self.waiting.iter_mut().find(|j| j.seq == seq)
                {
                    if let (Scope::Keys(keys), Scope::Keys(new)) = (&mut job.scope, &scope) {
                        for k in new {
                            if !keys.contains(k) {
                                keys.push(k.clone());
                            }
                        }
                    }
                    job.items.push((reply, op));
                    return;
                }
                self.close_batch();
            }
            let seq = self.next_seq();
            self.open_batch = Some(seq);
            self.after_open_batch = ScopeSet::default();
            self.waiting.push_back(Job {
                seq,
                scope,
                items: vec![(reply, op)],
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
        self.waiting.push_back(Job {
            seq,
            scope,
            items: vec![(reply, op)],
            batch: None,
        });
    }

    fn close_batch(&mut self) {
        if let Some(seq) = self.open_batch.take()
            && let Some(job) = self.waiting.iter_mut().find(|j| j.seq == seq)
            && let Some(batch) = &mut job.batch
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

/// What the store is opened from.
pub(crate) enum OpenSource {
    Config(Box<StorageConfig>),
    Store(Store),
}

/// A short description of the configured backend, for logs.
pub(crate) fn describe(config: &StorageConfig) -> String {
    match &config.backend {
        BackendConfig::Memory => "in-memory store".to_owned(),
        BackendConfig::File { root } => format!("file store at {}", root.display()),
        #[cfg(feature = "sqlite")]
        BackendConfig::Sqlite { path, .. } => format!("SQLite store at {}", path.display()),
        BackendConfig::Custom(b) => format!("custom {:?} store", b.backend_type()),
        #[allow(unreachable_patterns)]
        other => format!("{other:?} store"),
    }
}

/// The main-thread side of the runtime.
pub(crate) struct Runtime {
    pub(crate) shared: Arc<Shared>,
    rx: Receiver<Done>,
    pending_open: Option<OpenSource>,
    pub(crate) batching: WriteBatching,
    pub(crate) exit_timeout: Duration,
    /// Requests from the plugin itself, merged with the game's by id at the next dispatch.
    pub(crate) internal: Vec<(Reply, Op)>,
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
            shared: Arc::new(Shared {
                sched: Mutex::new(Sched {
                    state: StoreState::Opening,
                    opening_started: false,
                    waiting: VecDeque::new(),
                    running: HashMap::new(),
                    running_set: ScopeSet::default(),
                    next_seq: 0,
                    open_batch: None,
                    after_open_batch: ScopeSet::default(),
                }),
                tx,
                cell,
            }),
            rx,
            pending_open: Some(source),
            batching,
            exit_timeout,
            internal: Vec::new(),
        }
    }

    /// Starts opening the store, once.
    pub(crate) fn ensure_open_started(&mut self) {
        if let Some(source) = self.pending_open.take() {
            self.shared.start_open(source);
        }
    }

    /// Queues requests; together with the plugin's own, in id order.
    pub(crate) fn submit(&mut self, mut items: Vec<(Reply, Op)>, now: Duration) {
        self.ensure_open_started();
        items.append(&mut self.internal);
        if items.is_empty() {
            return;
        }
        items.sort_by_key(|(_, op)| op.id());
        self.shared.submit(items, self.batching, now);
    }

    pub(crate) fn close_due_batch(&self, now: Duration) {
        self.shared.close_due_batch(self.batching, now, false);
    }

    /// Everything that has arrived from the pool.
    pub(crate) fn try_collect(&self) -> Vec<Done> {
        self.rx.try_iter().collect()
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

    /// (queued requests, running jobs)
    pub(crate) fn counts(&self) -> (usize, usize) {
        self.shared.counts()
    }

    /// Blocks until every queued and running request has finished (or `exit_timeout`
    /// passes), and returns what arrived. The one place the plugin blocks the main thread.
    pub(crate) fn drain_blocking(&mut self) -> (Vec<Done>, bool) {
        let mut items = Vec::new();
        items.append(&mut self.internal);
        if !items.is_empty() || self.pending_open.is_some() {
            self.submit(items, Duration::ZERO);
        }
        self.shared
            .close_due_batch(self.batching, Duration::ZERO, true);
        let deadline = Instant::now() + self.exit_timeout;
        let mut out = Vec::new();
        loop {
            out.extend(self.rx.try_iter());
            if self.shared.outstanding() == 0 {
                out.extend(self.rx.try_iter());
                return (out, true);
            }
            let now = Instant::now();
            if now >= deadline {
                return (out, false);
            }
            match self
                .rx
                .recv_timeout((deadline - now).min(Duration::from_millis(5)))
            {
                Ok(done) => out.push(done),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return (out, false),
            }
        }
    }
}

impl Drop for Runtime {
    /// Dropping the app without an `AppExit` still finishes what was started.
    fn drop(&mut self) {
        if self.shared.outstanding() > 0 || !self.internal.is_empty() {
            let (_, complete) = self.drain_blocking();
            if !complete {
                bevy::log::error!(
                    "bevy_storage: storage requests were still running {:?} after the app was dropped; their results are lost",
                    self.exit_timeout
                );
            }
        }
    }
}
