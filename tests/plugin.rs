//! The Bevy plugin, driven headless with `app.update()` and manual time.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bevy::app::AppExit;
use bevy::prelude::*;
use bevy::time::TimeUpdateStrategy;
use bevy_storage::backend::{
    Backend, FileBackend, KeyEntry, MemoryBackend, Record, RecordMeta, Usage, WriteOp, WriteOutcome,
};
use bevy_storage::clock::{ManualClock, Timestamp};
use bevy_storage::plugin::{
    ExpiredPurged, PersistOptions, PersistedResourceLoaded, PersistedResourceSaved, RequestId,
};
use bevy_storage::plugin::{SharedError, StorageState};
use bevy_storage::prelude::*;
use bevy_storage::{StorageActivity, StorageOperation, StoragePluginBuilder, WriteBatching};
use serde::{Deserialize, Serialize};

// ---------------------------------------------------------------------------------------------
// Fixtures
// ---------------------------------------------------------------------------------------------

/// A backend wrapper that can be slowed down, made to fail, and counts its writes.
#[derive(Clone)]
struct TestBackend {
    inner: Arc<dyn Backend>,
    write_delay: Duration,
    fail: Arc<AtomicBool>,
    writes: Arc<AtomicUsize>,
    /// Calls of `get` and `get_meta`.
    reads: Arc<AtomicUsize>,
}

impl TestBackend {
    fn memory() -> Self {
        Self::over(MemoryBackend::new())
    }

    fn over(inner: impl Backend) -> Self {
        Self {
            inner: Arc::new(inner),
            write_delay: Duration::ZERO,
            fail: Arc::new(AtomicBool::new(false)),
            writes: Arc::new(AtomicUsize::new(0)),
            reads: Arc::new(AtomicUsize::new(0)),
        }
    }

    fn slow(mut self, delay: Duration) -> Self {
        self.write_delay = delay;
        self
    }

    fn check(&self) -> bevy_storage::Result<()> {
        if self.fail.load(Ordering::SeqCst) {
            Err(StorageError::unavailable(
                "test",
                "the test backend is switched off",
            ))
        } else {
            Ok(())
        }
    }
}

impl Backend for TestBackend {
    fn backend_type(&self) -> &str {
        "test"
    }
    fn get(&self, key: &str) -> bevy_storage::Result<Option<Record>> {
        self.check()?;
        self.reads.fetch_add(1, Ordering::SeqCst);
        self.inner.get(key)
    }
    fn get_meta(&self, key: &str) -> bevy_storage::Result<Option<RecordMeta>> {
        self.check()?;
        self.reads.fetch_add(1, Ordering::SeqCst);
        self.inner.get_meta(key)
    }
    fn write(&self, ops: Vec<WriteOp>, now: Timestamp) -> bevy_storage::Result<Vec<WriteOutcome>> {
        self.writes.fetch_add(1, Ordering::SeqCst);
        std::thread::sleep(self.write_delay);
        self.check()?;
        self.inner.write(ops, now)
    }
    fn delete_if_unchanged(
        &self,
        key: &str,
        value: &[u8],
        expires_at: Option<Timestamp>,
    ) -> bevy_storage::Result<bool> {
        self.writes.fetch_add(1, Ordering::SeqCst);
        self.check()?;
        self.inner.delete_if_unchanged(key, value, expires_at)
    }
    fn touch(&self, key: &str, at: Timestamp) -> bevy_storage::Result<()> {
        self.inner.touch(key, at)
    }
    fn scan(&self, prefix: &str) -> bevy_storage::Result<Vec<KeyEntry>> {
        self.check()?;
        self.inner.scan(prefix)
    }
    fn purge_expired(&self, now: Timestamp) -> bevy_storage::Result<usize> {
        self.check()?;
        self.inner.purge_expired(now)
    }
    fn clear(&self) -> bevy_storage::Result<()> {
        self.check()?;
        self.inner.clear()
    }
    fn usage(&self, now: Timestamp) -> bevy_storage::Result<Usage> {
        self.check()?;
        self.inner.usage(now)
    }
    fn health_check(&self) -> bevy_storage::Result<()> {
        self.check()
    }
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
struct Player {
    name: String,
    gold: u32,
}

fn ada() -> Player {
    Player {
        name: "Ada".into(),
        gold: 120,
    }
}

/// Every response the app delivered, as observer events (in arrival order) and as messages.
#[derive(Resource, Default)]
struct Seen {
    events: Vec<Resp>,
    message_ids: Vec<RequestId>,
    purges: Vec<usize>,
    persisted_loaded: Vec<Result<bool, String>>,
    persisted_saved: usize,
}

#[derive(Debug, Clone)]
enum Resp {
    Save(SaveCompleted),
    Load(LoadCompleted),
    Delete(DeleteCompleted),
    Exists(ExistsCompleted),
    List(ListKeysCompleted),
    Tx(TransactionCompleted),
    Clear(ClearCompleted),
}

impl Resp {
    fn id(&self) -> RequestId {
        match self {
            Resp::Save(r) => r.id,
            Resp::Load(r) => r.id,
            Resp::Delete(r) => r.id,
            Resp::Exists(r) => r.id,
            Resp::List(r) => r.id,
            Resp::Tx(r) => r.id,
            Resp::Clear(r) => r.id,
        }
    }
}

impl Seen {
    fn get(&self, id: RequestId) -> Option<&Resp> {
        self.events.iter().find(|r| r.id() == id)
    }
    fn save(&self, id: RequestId) -> Option<&SaveCompleted> {
        match self.get(id)? {
            Resp::Save(r) => Some(r),
            other => panic!("{id} answered with {other:?}"),
        }
    }
    fn load(&self, id: RequestId) -> Option<&LoadCompleted> {
        match self.get(id)? {
            Resp::Load(r) => Some(r),
            other => panic!("{id} answered with {other:?}"),
        }
    }
    fn has(&self, id: RequestId) -> bool {
        self.get(id).is_some()
    }
}

macro_rules! record {
    ($app:expr, $($ty:ident => $variant:ident),* $(,)?) => {{
        $(
            $app.add_observer(|e: On<$ty>, mut seen: ResMut<Seen>| {
                seen.events.push(Resp::$variant(e.event().clone()));
            });
        )*
    }};
}

#[allow(clippy::too_many_arguments)]
fn record_messages(
    mut seen: ResMut<Seen>,
    mut saves: MessageReader<SaveCompleted>,
    mut loads: MessageReader<LoadCompleted>,
    mut deletes: MessageReader<DeleteCompleted>,
    mut exists: MessageReader<ExistsCompleted>,
    mut lists: MessageReader<ListKeysCompleted>,
    mut txs: MessageReader<TransactionCompleted>,
    mut clears: MessageReader<ClearCompleted>,
) {
    let ids = saves
        .read()
        .map(|r| r.id)
        .chain(loads.read().map(|r| r.id))
        .chain(deletes.read().map(|r| r.id))
        .chain(exists.read().map(|r| r.id))
        .chain(lists.read().map(|r| r.id))
        .chain(txs.read().map(|r| r.id))
        .chain(clears.read().map(|r| r.id))
        .collect::<Vec<_>>();
    seen.message_ids.extend(ids);
}

const FRAME: Duration = Duration::from_millis(16);

/// `MinimalPlugins` with four async-compute threads, whatever the machine, so that requests
/// really run in parallel (the pool is global: every app of this test binary uses the same).
fn minimal() -> impl PluginGroup {
    use bevy::app::{TaskPoolOptions, TaskPoolPlugin, TaskPoolThreadAssignmentPolicy};
    MinimalPlugins.set(TaskPoolPlugin {
        task_pool_options: TaskPoolOptions {
            async_compute: TaskPoolThreadAssignmentPolicy {
                min_threads: 4,
                max_threads: 4,
                percent: 1.0,
                on_thread_spawn: None,
                on_thread_destroy: None,
            },
            ..default()
        },
    })
}

/// A headless app over `plugin` with manual time and response recording.
fn app_with(plugin: StoragePluginBuilder) -> App {
    app_with_step(plugin, FRAME)
}

fn app_with_step(plugin: StoragePluginBuilder, step: Duration) -> App {
    let mut app = App::new();
    app.add_plugins((minimal(), plugin))
        .insert_resource(TimeUpdateStrategy::ManualDuration(step))
        .init_resource::<Seen>()
        .add_systems(Update, record_messages);
    record!(app,
        SaveCompleted => Save,
        LoadCompleted => Load,
        DeleteCompleted => Delete,
        ExistsCompleted => Exists,
        ListKeysCompleted => List,
        TransactionCompleted => Tx,
        ClearCompleted => Clear,
    );
    app.add_observer(|e: On<ExpiredPurged>, mut seen: ResMut<Seen>| seen.purges.push(e.removed()));
    app.add_observer(|e: On<PersistedResourceLoaded>, mut seen: ResMut<Seen>| {
        seen.persisted_loaded
            .push(e.result.clone().map_err(|e| e.to_string()));
    });
    app.add_observer(|_: On<PersistedResourceSaved>, mut seen: ResMut<Seen>| {
        seen.persisted_saved += 1
    });
    app
}

/// Runs frames until `done` holds; false after `timeout` (never loops forever).
fn pump_until(app: &mut App, timeout: Duration, mut done: impl FnMut(&mut World) -> bool) -> bool {
    let start = Instant::now();
    loop {
        app.update();
        if done(app.world_mut()) {
            return true;
        }
        if start.elapsed() > timeout {
            return false;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

const WAIT: Duration = Duration::from_secs(20);

/// Runs frames until every id has its response.
fn pump_for(app: &mut App, ids: &[RequestId]) {
    let ok = pump_until(app, WAIT, |w| {
        let seen = w.resource::<Seen>();
        ids.iter().all(|id| seen.has(*id))
    });
    assert!(ok, "timed out waiting for responses to {ids:?}");
}

fn send<M: Message>(app: &mut App, message: M) {
    app.world_mut().write_message(message);
}

fn save(app: &mut App, key: &str, value: impl Serialize + Send + Sync + 'static) -> RequestId {
    let request = SaveRequest::new(key, value);
    let id = request.id();
    send(app, request);
    id
}

fn load(app: &mut App, key: &str) -> RequestId {
    let request = LoadRequest::new(key);
    let id = request.id();
    send(app, request);
    id
}

fn delete(app: &mut App, key: &str) -> RequestId {
    let request = DeleteRequest::new(key);
    let id = request.id();
    send(app, request);
    id
}

fn loaded<T: serde::de::DeserializeOwned>(app: &App, id: RequestId) -> Option<T> {
    app.world()
        .resource::<Seen>()
        .load(id)
        .expect("no response")
        .decode::<T>()
        .expect("load failed")
}

fn save_ok(app: &App, id: RequestId) -> bool {
    app.world()
        .resource::<Seen>()
        .save(id)
        .expect("no response")
        .result
        .is_ok()
}

fn store_of(app: &App) -> Store {
    app.world()
        .resource::<Storage>()
        .store()
        .expect("store not open")
        .clone()
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

#[test]
fn save_then_load_through_messages() {
    let mut app = app_with(StoragePlugin::memory());
    let s = save(&mut app, "player:ada", ada());
    let l = load(&mut app, "player:ada");
    let missing = load(&mut app, "player:nobody");
    pump_for(&mut app, &[s, l, missing]);

    assert!(save_ok(&app, s));
    assert_eq!(loaded::<Player>(&app, l), Some(ada()));
    assert_eq!(loaded::<Player>(&app, missing), None);
    let seen = app.world().resource::<Seen>();
    let response = seen.load(l).unwrap();
    assert_eq!(response.key, "player:ada");
    assert!(response.found());
    assert!(app.world().resource::<Storage>().is_ready());
    assert_eq!(
        app.world().resource::<StorageActivity>().state,
        StorageState::Ready
    );
}

#[test]
fn every_request_kind_is_answered_exactly_once_as_message_and_event() {
    let mut app = app_with(StoragePlugin::memory());
    let mut ids = Vec::new();
    for i in 0..5 {
        ids.push(save(&mut app, &format!("k:{i}"), i));
        ids.push(load(&mut app, &format!("k:{i}")));
    }
    let r = ExistsRequest::new("k:1");
    ids.push(r.id());
    send(&mut app, r);
    let r = ListKeysRequest::new("k:");
    ids.push(r.id());
    send(&mut app, r);
    let r = TransactionRequest::new([
        StorageOperation::save("t:1", 1u8),
        StorageOperation::delete("k:0"),
    ]);
    ids.push(r.id());
    send(&mut app, r);
    ids.push(delete(&mut app, "k:2"));
    ids.push(load(&mut app, ""));
    let r = ClearRequest::new();
    ids.push(r.id());
    send(&mut app, r);
    pump_for(&mut app, &ids);
    // A few more frames: nothing arrives twice.
    for _ in 0..10 {
        app.update();
    }

    let seen = app.world().resource::<Seen>();
    let mut events: Vec<RequestId> = seen.events.iter().map(Resp::id).collect();
    let mut messages = seen.message_ids.clone();
    events.sort();
    messages.sort();
    let mut expected = ids.clone();
    expected.sort();
    assert_eq!(
        events, expected,
        "each request has exactly one observer event"
    );
    assert_eq!(messages, expected, "each request has exactly one message");

    // Ids are unique and increase in construction order.
    assert!(ids.windows(2).all(|w| w[0] < w[1]));
    let list = seen.events.iter().find_map(|r| match r {
        Resp::List(l) => Some(l.clone()),
        _ => None,
    });
    assert_eq!(
        list.unwrap().result.unwrap(),
        ["k:0", "k:1", "k:2", "k:3", "k:4"],
        "the listing sees the saves sent before it"
    );
    let activity = app.world().resource::<StorageActivity>();
    assert_eq!(activity.completed + activity.failed, ids.len() as u64);
    assert_eq!(activity.failed, 1, "only the empty key fails");
}

#[test]
fn same_key_requests_complete_in_order_under_a_mixed_burst() {
    // A little latency per write, so that parallel work would overtake if allowed.
    let backend = TestBackend::memory().slow(Duration::from_millis(2));
    let mut app = app_with(StoragePlugin::custom(backend));
    let mut expected_loads: Vec<(RequestId, Option<u32>)> = Vec::new();
    let mut expected_exists: Vec<(RequestId, bool)> = Vec::new();
    let mut expected_deletes: Vec<(RequestId, bool)> = Vec::new();
    let mut ids_by_key: HashMap<String, Vec<RequestId>> = HashMap::new();
    let mut state: HashMap<String, Option<u32>> = HashMap::new();
    for step in 0u32..120 {
        let key = format!("k{}", step % 3);
        let current = state.entry(key.clone()).or_default();
        let id = match step % 7 {
            0 | 3 | 5 => {
                *current = Some(step);
                save(&mut app, &key, step)
            }
            1 | 4 => {
                let id = load(&mut app, &key);
                expected_loads.push((id, *current));
                id
            }
            2 => {
                let request = ExistsRequest::new(key.clone());
                let id = request.id();
                send(&mut app, request);
                expected_exists.push((id, current.is_some()));
                id
            }
            _ => {
                let id = delete(&mut app, &key);
                expected_deletes.push((id, current.is_some()));
                *current = None;
                id
            }
        };
        ids_by_key.entry(key).or_default().push(id);
        // Spread the burst over a few frames.
        if step % 40 == 39 {
            app.update();
        }
    }
    let all: Vec<RequestId> = ids_by_key.values().flatten().copied().collect();
    pump_for(&mut app, &all);

    let seen = app.world().resource::<Seen>();
    for (id, value) in expected_loads {
        assert_eq!(
            seen.load(id).unwrap().decode::<u32>().unwrap(),
            value,
            "load {id}"
        );
    }
    for (id, value) in expected_exists {
        match seen.get(id).unwrap() {
            Resp::Exists(r) => assert_eq!(*r.result.as_ref().unwrap(), value, "exists {id}"),
            other => panic!("{other:?}"),
        }
    }
    for (id, value) in expected_deletes {
        match seen.get(id).unwrap() {
            Resp::Delete(r) => assert_eq!(*r.result.as_ref().unwrap(), value, "delete {id}"),
            other => panic!("{other:?}"),
        }
    }
    // Responses of one key arrive in the order the requests were sent.
    for (key, ids) in ids_by_key {
        let arrived: Vec<RequestId> = seen
            .events
            .iter()
            .map(Resp::id)
            .filter(|id| ids.contains(id))
            .collect();
        assert_eq!(arrived, ids, "responses for {key} out of order");
    }
}

/// One request of [`ten_thousand_requests_in_one_frame`], for the model.
#[derive(Debug, Clone)]
enum Op {
    Save(String, u32),
    Load(String),
    Exists(String),
    Delete(String),
    BadSave,
    Tx(String, u32, String),
    List(String),
    Clear,
}

impl Op {
    /// The keys whose responses must arrive in id order (`None`: every key).
    fn keys(&self) -> Option<Vec<String>> {
        match self {
            Op::Save(k, _) | Op::Load(k) | Op::Exists(k) | Op::Delete(k) => Some(vec![k.clone()]),
            Op::Tx(a, _, b) => Some(vec![a.clone(), b.clone()]),
            Op::BadSave | Op::List(_) => Some(Vec::new()),
            Op::Clear => None,
        }
    }
}

/// 10,000 requests of every key-value kind sent in one frame (more than the plugin takes in
/// on the main thread, so the pool takes them in): each is answered once, as a message and an
/// event; the responses of each key arrive in id order; every load, exists, delete and
/// listing sees exactly the requests with smaller ids (two pairs are sent out of id order);
/// bad keys fail alone.
fn ten_thousand_requests_in_one_frame(batching: WriteBatching) {
    let mut app = app_with(StoragePlugin::custom(TestBackend::memory()).batch_writes(batching));
    app.update();
    assert!(pump_until(&mut app, WAIT, |w| w
        .resource::<Storage>()
        .is_ready()));
    let mut ops: Vec<(RequestId, Op)> = Vec::new();
    let world = app.world_mut();
    for i in 0u32..10_000 {
        let key = format!("m{}", i % 40);
        let other = format!("m{}", (i + 1) % 40);
        if i == 5_000 {
            let clear = ClearRequest::new();
            ops.push((clear.id(), Op::Clear));
            world.write_message(clear);
            continue;
        }
        if i % 1_000 == 500 {
            // Two saves of one key and a load, created in one order and sent in another: the
            // ids decide.
            let (first, second) = (SaveRequest::new(&key, i), SaveRequest::new(&key, i + 1));
            let early_load = LoadRequest::new(&key);
            ops.push((first.id(), Op::Save(key.clone(), i)));
            ops.push((second.id(), Op::Save(key.clone(), i + 1)));
            ops.push((early_load.id(), Op::Load(key.clone())));
            world.write_message(second);
            world.write_message(first);
            world.write_message(early_load);
            continue;
        }
        match (i * 7 + i / 40) % 12 {
            0..=3 => {
                let r = SaveRequest::new(&key, i);
                ops.push((r.id(), Op::Save(key, i)));
                world.write_message(r);
            }
            4 | 5 => {
                let r = LoadRequest::new(&key);
                ops.push((r.id(), Op::Load(key)));
                world.write_message(r);
            }
            6 => {
                let r = ExistsRequest::new(&key);
                ops.push((r.id(), Op::Exists(key)));
                world.write_message(r);
            }
            7 => {
                let r = DeleteRequest::new(&key);
                ops.push((r.id(), Op::Delete(key)));
                world.write_message(r);
            }
            8 => {
                let r = SaveRequest::new(format!("bad\n{i}"), i);
                ops.push((r.id(), Op::BadSave));
                world.write_message(r);
            }
            9 => {
                let r = TransactionRequest::new([
                    StorageOperation::save(&key, i),
                    StorageOperation::delete(&other),
                ]);
                ops.push((r.id(), Op::Tx(key, i, other)));
                world.write_message(r);
            }
            _ => {
                let r = ListKeysRequest::new("m1");
                ops.push((r.id(), Op::List("m1".into())));
                world.write_message(r);
            }
        }
    }
    assert!(ops.len() > 10_000);
    app.update(); // the frame that reads them all

    let ids: std::collections::HashSet<RequestId> = ops.iter().map(|(id, _)| *id).collect();
    let ok = pump_until(&mut app, Duration::from_secs(120), |w| {
        w.resource::<Seen>().events.len() >= ops.len()
    });
    assert!(ok, "not every request was answered");
    for _ in 0..3 {
        app.update(); // the last messages reach the reader
    }
    let seen = app.world().resource::<Seen>();
    assert_eq!(seen.events.len(), ops.len(), "one event per request");
    let mut message_ids = seen.message_ids.clone();
    message_ids.sort();
    message_ids.dedup();
    assert_eq!(message_ids.len(), ops.len(), "one message per request");
    assert!(message_ids.iter().all(|id| ids.contains(id)));
    let position: HashMap<RequestId, usize> = seen
        .events
        .iter()
        .enumerate()
        .map(|(at, r)| (r.id(), at))
        .collect();
    assert_eq!(position.len(), ops.len(), "an id answered twice");
    let response: HashMap<RequestId, &Resp> = seen.events.iter().map(|r| (r.id(), r)).collect();

    // The model, in id order.
    ops.sort_by_key(|(id, _)| *id);
    let mut state: HashMap<String, u32> = HashMap::new();
    let mut last_on_key: HashMap<String, usize> = HashMap::new();
    let mut last_anywhere = None::<usize>;
    let mut last_clear = None::<usize>;
    for (id, op) in &ops {
        let at = position[id];
        let r = response[id];
        match op.keys() {
            Some(keys) => {
                for k in keys {
                    if let Some(before) = last_on_key.insert(k.clone(), at) {
                        assert!(
                            before < at,
                            "{id} ({op:?}) overtook an earlier request on {k}"
                        );
                    }
                }
                if let Some(clear) = last_clear {
                    assert!(clear < at, "{id} ({op:?}) overtook the clear");
                }
                last_anywhere = last_anywhere.max(Some(at));
            }
            None => {
                assert!(
                    last_anywhere.is_none_or(|before| before < at),
                    "the clear overtook"
                );
                last_clear = Some(at);
            }
        }
        match (op, r) {
            (Op::Save(k, v), Resp::Save(r)) => {
                assert!(r.result.is_ok(), "{id}: {:?}", r.result);
                state.insert(k.clone(), *v);
            }
            (Op::BadSave, Resp::Save(r)) => assert!(
                matches!(r.error(), Some(StorageError::InvalidKey { .. })),
                "{id}: {:?}",
                r.result
            ),
            (Op::Load(k), Resp::Load(r)) => {
                assert_eq!(
                    r.decode::<u32>().unwrap(),
                    state.get(k).copied(),
                    "{id} {op:?}"
                )
            }
            (Op::Exists(k), Resp::Exists(r)) => {
                assert_eq!(*r.result.as_ref().unwrap(), state.contains_key(k), "{id}")
            }
            (Op::Delete(k), Resp::Delete(r)) => {
                assert_eq!(
                    *r.result.as_ref().unwrap(),
                    state.remove(k).is_some(),
                    "{id}"
                )
            }
            (Op::Tx(k, v, other), Resp::Tx(r)) => {
                assert!(r.result.is_ok(), "{id}: {:?}", r.result);
                state.insert(k.clone(), *v);
                state.remove(other);
            }
            (Op::List(prefix), Resp::List(r)) => {
                let mut expected: Vec<String> = state
                    .keys()
                    .filter(|k| k.starts_with(prefix.as_str()))
                    .cloned()
                    .collect();
                expected.sort();
                assert_eq!(r.result.as_ref().unwrap(), &expected, "{id}");
            }
            (Op::Clear, Resp::Clear(r)) => {
                assert!(r.result.is_ok());
                state.clear();
            }
            (op, r) => panic!("{id}: {op:?} answered with {r:?}"),
        }
    }
}

#[test]
fn ten_thousand_requests_in_one_frame_keep_order_and_errors() {
    ten_thousand_requests_in_one_frame(WriteBatching::Off);
}

#[test]
fn ten_thousand_requests_in_one_frame_keep_order_and_errors_when_batched() {
    ten_thousand_requests_in_one_frame(WriteBatching::PerFrame);
}

#[test]
fn clear_waits_for_earlier_requests_and_holds_back_later_ones() {
    let backend = TestBackend::memory().slow(Duration::from_millis(20));
    let mut app = app_with(StoragePlugin::custom(backend));
    let a = save(&mut app, "a", 1u8);
    let b = save(&mut app, "b", 2u8);
    let clear = ClearRequest::new();
    let c = clear.id();
    send(&mut app, clear);
    let la = load(&mut app, "a");
    let sb = save(&mut app, "b", 3u8);
    let lb = load(&mut app, "b");
    pump_for(&mut app, &[a, b, c, la, sb, lb]);
    assert_eq!(loaded::<u8>(&app, la), None);
    assert_eq!(loaded::<u8>(&app, lb), Some(3));
    let order: Vec<RequestId> = app
        .world()
        .resource::<Seen>()
        .events
        .iter()
        .map(Resp::id)
        .collect();
    let pos = |id| order.iter().position(|x| *x == id).unwrap();
    assert!(pos(a) < pos(c) && pos(b) < pos(c) && pos(c) < pos(la) && pos(c) < pos(sb));
}

#[test]
fn errors_arrive_as_responses() {
    let mut app = app_with(StoragePlugin::memory());
    let bad_key = save(&mut app, "", 1u8);
    let bad_load = load(&mut app, "line\nbreak");
    let no_key = {
        let request = SaveRequest::new("secret", 1u8).encrypt(true);
        let id = request.id();
        send(&mut app, request);
        id
    };
    let s = save(&mut app, "player:ada", ada());
    let wrong_type = load(&mut app, "player:ada");
    pump_for(&mut app, &[bad_key, bad_load, no_key, s, wrong_type]);

    let seen = app.world().resource::<Seen>();
    assert!(matches!(
        seen.save(bad_key).unwrap().error(),
        Some(StorageError::InvalidKey { .. })
    ));
    assert!(matches!(
        seen.load(bad_load).unwrap().error(),
        Some(StorageError::InvalidKey { .. })
    ));
    assert!(matches!(
        seen.save(no_key).unwrap().error(),
        Some(StorageError::EncryptionNotConfigured { .. })
    ));
    let wrong = seen.load(wrong_type).unwrap();
    assert!(wrong.is_ok(), "the load itself worked");
    assert!(matches!(
        wrong.decode::<Vec<u64>>().map_err(|e| e.to_string()),
        Err(msg) if msg.contains("does not decode")
    ));
}

#[derive(Debug)]
struct Explosive;

impl Serialize for Explosive {
    fn serialize<S: serde::Serializer>(&self, _: S) -> Result<S::Ok, S::Error> {
        panic!("this value cannot be serialized");
    }
}

#[test]
fn a_panicking_serialize_impl_gets_an_error_response() {
    let mut app = app_with(StoragePlugin::memory());
    let boom = save(&mut app, "boom", Explosive);
    let after = save(&mut app, "boom", 1u8);
    let l = load(&mut app, "boom");
    pump_for(&mut app, &[boom, after, l]);
    let err = app
        .world()
        .resource::<Seen>()
        .save(boom)
        .unwrap()
        .error()
        .unwrap()
        .to_string();
    assert!(err.contains("panicked"), "{err}");
    assert!(save_ok(&app, after), "the key is usable after the panic");
    assert_eq!(loaded::<u8>(&app, l), Some(1));
}

#[test]
#[cfg(feature = "encryption")]
fn wrong_encryption_key_is_reported_once_and_answers_every_request() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("store");
    {
        let store = Store::open(
            StorageConfig::file(&root).encryption_key(EncryptionKey::from_bytes([1; 32])),
        )
        .unwrap();
        store.save("x", &1u8, &SaveOptions::default()).unwrap();
    }
    let mut app =
        app_with(StoragePlugin::file(&root).encryption_key(EncryptionKey::from_bytes([2; 32])));
    let s = save(&mut app, "y", 2u8);
    let l = load(&mut app, "x");
    pump_for(&mut app, &[s, l]);

    let seen = app.world().resource::<Seen>();
    assert!(matches!(
        seen.save(s).unwrap().error(),
        Some(StorageError::WrongEncryptionKey)
    ));
    assert!(matches!(
        seen.load(l).unwrap().error(),
        Some(StorageError::WrongEncryptionKey)
    ));
    let stats = app.world().resource::<StorageStats>();
    assert!(!stats.is_healthy);
    assert!(
        stats
            .last_error
            .as_deref()
            .unwrap()
            .contains("encryption key")
    );
    assert!(matches!(
        app.world().resource::<StorageActivity>().state,
        StorageState::Failed(_)
    ));
    assert!(matches!(
        app.world().resource::<Storage>().error(),
        Some(StorageError::WrongEncryptionKey)
    ));
    // Requests sent later fail the same way, and the app keeps running.
    let later = load(&mut app, "x");
    pump_for(&mut app, &[later]);
    assert!(
        app.world()
            .resource::<Seen>()
            .load(later)
            .unwrap()
            .error()
            .is_some()
    );
}

#[test]
fn an_unusable_path_is_an_error_response_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("not-a-dir");
    std::fs::write(&file, b"occupied").unwrap();
    let mut app = app_with(StoragePlugin::file(file.join("store")));
    let s = save(&mut app, "a", 1u8);
    pump_for(&mut app, &[s]);
    assert!(!save_ok(&app, s));
    assert!(!app.world().resource::<StorageStats>().is_healthy);
}

#[test]
fn failing_backend_errors_arrive_as_responses_and_mark_stats_unhealthy() {
    let backend = TestBackend::memory();
    let fail = Arc::clone(&backend.fail);
    let mut app = app_with(StoragePlugin::custom(backend).stats_interval(Duration::ZERO));
    let ok = save(&mut app, "a", 1u8);
    pump_for(&mut app, &[ok]);
    assert!(save_ok(&app, ok));

    fail.store(true, Ordering::SeqCst);
    let s = save(&mut app, "b", 2u8);
    let l = load(&mut app, "a");
    let d = delete(&mut app, "a");
    pump_for(&mut app, &[s, l, d]);
    let seen = app.world().resource::<Seen>();
    assert!(matches!(
        seen.save(s).unwrap().error(),
        Some(StorageError::Unavailable { .. })
    ));
    assert!(seen.load(l).unwrap().error().is_some());
    assert!(seen.get(d).is_some());
    assert!(pump_until(&mut app, WAIT, |w| !w
        .resource::<StorageStats>()
        .is_healthy));
    let stats = app.world().resource::<StorageStats>();
    assert!(stats.last_error.is_some());
    let failed_at = stats.last_error_at.expect("the failure carries its time");
    assert!(failed_at.elapsed().unwrap_or_default() < Duration::from_secs(60));

    fail.store(false, Ordering::SeqCst);
    // Reads work again (the stats refresh reads), but writes failed last: still unhealthy
    // until a write succeeds.
    let l = load(&mut app, "a");
    pump_for(&mut app, &[l]);
    assert!(
        app.world()
            .resource::<Seen>()
            .load(l)
            .unwrap()
            .error()
            .is_none()
    );
    for _ in 0..5 {
        app.update();
    }
    assert!(!app.world().resource::<StorageStats>().is_healthy);
    let s = save(&mut app, "c", 3u8);
    pump_for(&mut app, &[s]);
    assert!(save_ok(&app, s));
    assert!(pump_until(&mut app, WAIT, |w| w
        .resource::<StorageStats>()
        .is_healthy));
    // Recovered: the old error is history, not shown beside a healthy store.
    let stats = app.world().resource::<StorageStats>();
    assert_eq!(
        (stats.last_error.as_deref(), stats.last_error_at),
        (None, None),
        "{stats:?}"
    );
}

#[test]
fn frames_stay_short_while_a_slow_backend_works() {
    let backend = TestBackend::memory().slow(Duration::from_millis(200));
    let writes = Arc::clone(&backend.writes);
    let mut app = app_with(StoragePlugin::custom(backend));
    app.update(); // open the store
    assert!(pump_until(&mut app, WAIT, |w| w
        .resource::<Storage>()
        .is_ready()));

    let ids: Vec<RequestId> = (0..4)
        .map(|i| save(&mut app, &format!("slow:{i}"), i))
        .collect();
    let mut longest = Duration::ZERO;
    let mut frames_while_busy = 0;
    let start = Instant::now();
    while !ids.iter().all(|id| app.world().resource::<Seen>().has(*id)) {
        assert!(start.elapsed() < WAIT, "slow saves never finished");
        let t = Instant::now();
        app.update();
        longest = longest.max(t.elapsed());
        if app.world().resource::<StorageActivity>().running > 0 {
            frames_while_busy += 1;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(writes.load(Ordering::SeqCst) >= 4);
    assert!(
        frames_while_busy >= 5,
        "the work was not in flight across frames ({frames_while_busy})"
    );
    assert!(
        longest < Duration::from_millis(100),
        "a frame took {longest:?}"
    );
    for id in ids {
        assert!(save_ok(&app, id));
    }
}

#[test]
fn ttl_cleanup_runs_at_the_interval_and_reports_the_count() {
    let clock = ManualClock::starting_now();
    let step = Duration::from_millis(100);
    let mut app = app_with_step(
        StoragePlugin::memory()
            .clock(clock.clone())
            .cleanup_interval(Duration::from_secs(2)),
        step,
    );
    let short = {
        let request = SaveRequest::new("short", 1u8).ttl(Duration::from_secs(10));
        let id = request.id();
        send(&mut app, request);
        id
    };
    let long = save(&mut app, "long", 2u8);
    pump_for(&mut app, &[short, long]);
    clock.advance(Duration::from_secs(11));

    // Nothing before the first interval has passed (first frame delta is zero).
    let mut frames = 1; // pump_for ran at least one
    while app.world().resource::<Seen>().purges.is_empty() {
        frames += 1;
        assert!(frames < 200, "no cleanup ran");
        app.update();
        std::thread::sleep(Duration::from_millis(1));
    }
    let elapsed = app.world().resource::<Time<Real>>().elapsed();
    assert!(
        elapsed >= Duration::from_secs(2),
        "cleanup ran early, at {elapsed:?}"
    );
    assert_eq!(app.world().resource::<Seen>().purges, [1]);
    let activity = app.world().resource::<StorageActivity>();
    assert_eq!(activity.expired_purged, 1);
    assert_eq!(activity.last_purge_removed, Some(1));
    let store = store_of(&app);
    let keys: Vec<String> = store
        .backend()
        .scan("")
        .unwrap()
        .into_iter()
        .map(|e| e.key)
        .collect();
    assert_eq!(
        keys,
        ["long"],
        "the expired record is gone from the backend"
    );

    // The next one runs an interval later and finds nothing. The first ran no earlier than
    // 2 s (the first frame's delta is zero), so the second runs no earlier than 4 s. (Its
    // answer is seen a frame or more after it ran, so the time between the two answers can
    // be shorter than the interval on a loaded host: 1.8 s was seen once; the start of the
    // second is what the interval bounds.)
    assert!(pump_until(&mut app, WAIT, |w| w
        .resource::<Seen>()
        .purges
        .len()
        == 2));
    let second = app.world().resource::<Time<Real>>().elapsed();
    assert!(
        second >= Duration::from_secs(4),
        "the second cleanup ran at {second:?}, before two intervals had passed"
    );
    assert_eq!(app.world().resource::<Seen>().purges, [1, 0]);
}

#[test]
fn stats_follow_saves_and_deletes() {
    let mut app = app_with(StoragePlugin::memory().stats_interval(Duration::ZERO));
    assert_eq!(
        app.world().resource::<StorageStats>().backend_type,
        "memory"
    );
    let ids: Vec<RequestId> = (0..3)
        .map(|i| save(&mut app, &format!("s:{i}"), i))
        .collect();
    pump_for(&mut app, &ids);
    assert!(pump_until(&mut app, WAIT, |w| w
        .resource::<StorageStats>()
        .item_count
        == 3));
    let stats = app.world().resource::<StorageStats>().clone();
    assert!(stats.total_size > 0);
    assert!(stats.is_healthy);
    assert!(stats.performance.writes >= 3);

    let d = delete(&mut app, "s:0");
    pump_for(&mut app, &[d]);
    assert!(pump_until(&mut app, WAIT, |w| w
        .resource::<StorageStats>()
        .item_count
        == 2));
    let after = app.world().resource::<StorageStats>();
    assert!(after.total_size < stats.total_size);
    assert!(after.performance.writes >= 4);
}

#[test]
fn read_cache_hits_misses_and_invalidation() {
    let mut app = app_with(StoragePlugin::memory().read_cache(Some(Duration::from_secs(60))));
    let s1 = save(&mut app, "c", 1u32);
    pump_for(&mut app, &[s1]);
    let l0 = load(&mut app, "c"); // miss: a key's first miss only marks it
    pump_for(&mut app, &[l0]);
    let l1 = load(&mut app, "c"); // miss, fills
    pump_for(&mut app, &[l1]);
    let l2 = load(&mut app, "c"); // hit
    pump_for(&mut app, &[l2]);
    let cache = store_of(&app).get_stats().cache;
    assert_eq!((cache.hits, cache.misses), (1, 2));

    let s2 = save(&mut app, "c", 2u32); // invalidates
    let l3 = load(&mut app, "c"); // miss, sees the new value
    let l4 = load(&mut app, "c"); // hit
    pump_for(&mut app, &[s2, l3, l4]);
    let cache = store_of(&app).get_stats().cache;
    assert_eq!((cache.hits, cache.misses), (2, 3));
    assert_eq!(loaded::<u32>(&app, l1), Some(1));
    assert_eq!(loaded::<u32>(&app, l2), Some(1));
    assert_eq!(loaded::<u32>(&app, l3), Some(2));
    assert_eq!(loaded::<u32>(&app, l4), Some(2));

    let d = delete(&mut app, "c");
    let l5 = load(&mut app, "c");
    pump_for(&mut app, &[d, l5]);
    assert_eq!(
        loaded::<u32>(&app, l5),
        None,
        "a delete invalidates the cache"
    );

    // The stats resource reports the cache too.
    let s3 = save(&mut app, "c", 3u32);
    let t = TransactionRequest::new([StorageOperation::save("c", 4u32)]);
    let tid = t.id();
    send(&mut app, t);
    let l6 = load(&mut app, "c");
    pump_for(&mut app, &[s3, tid, l6]);
    assert_eq!(
        loaded::<u32>(&app, l6),
        Some(4),
        "a transaction invalidates the cache"
    );
    assert!(pump_until(&mut app, WAIT, |w| w
        .resource::<StorageStats>()
        .cache
        .hits
        >= 2));
}

#[test]
fn batching_commits_a_frame_of_writes_in_one_transaction() {
    let backend = TestBackend::memory();
    let writes = Arc::clone(&backend.writes);
    let reads = Arc::clone(&backend.reads);
    // No periodic stats refresh or cleanup inside the measured frames: each reads the
    // backend, and a slow host pumps enough frames for one to fall due.
    let mut app = app_with(
        StoragePlugin::custom(backend)
            .batch_writes(WriteBatching::PerFrame)
            .stats_interval(Duration::from_secs(86_400))
            .cleanup_interval(Duration::from_secs(86_400)),
    );
    let warm = save(&mut app, "old", 0u8);
    pump_for(&mut app, &[warm]);
    // The first stats refresh (at open) reads the backend on the pool: let it finish, so
    // the reads counted below are the batch's own.
    let mut quiet = 0;
    let mut last = reads.load(Ordering::SeqCst);
    for _ in 0..2000 {
        app.update();
        std::thread::sleep(Duration::from_millis(1));
        let now = reads.load(Ordering::SeqCst);
        let idle = app.world().resource::<StorageActivity>().running == 0;
        quiet = if now == last && idle { quiet + 1 } else { 0 };
        last = now;
        if quiet == 50 {
            break;
        }
    }
    let before = writes.load(Ordering::SeqCst);
    let reads_before = reads.load(Ordering::SeqCst);

    let mut ids: Vec<RequestId> = (0..10)
        .map(|i| save(&mut app, &format!("b:{i}"), i))
        .collect();
    let d_old = delete(&mut app, "old");
    let d_none = delete(&mut app, "never-saved");
    // A delete sees the batch's earlier save of its key, and the next delete sees it gone.
    let s_new = save(&mut app, "new", 1u8);
    let d_new = delete(&mut app, "new");
    let d_again = delete(&mut app, "new");
    ids.extend([d_old, d_none, s_new, d_new, d_again]);
    pump_for(&mut app, &ids);

    assert_eq!(
        writes.load(Ordering::SeqCst) - before,
        1,
        "one backend transaction for the frame"
    );
    assert_eq!(
        reads.load(Ordering::SeqCst),
        reads_before,
        "the deletes learn what they removed from the commit itself"
    );
    let seen = app.world().resource::<Seen>();
    for id in &ids[..10] {
        assert!(seen.save(*id).unwrap().is_ok());
    }
    let existed = |id: RequestId| match seen.get(id).unwrap() {
        Resp::Delete(d) => *d.result.as_ref().unwrap(),
        other => panic!("{other:?}"),
    };
    assert_eq!(
        [d_old, d_none, d_new, d_again].map(existed),
        [true, false, true, false]
    );
    let activity = app.world().resource::<StorageActivity>();
    assert_eq!(activity.batches_committed, 1);
    assert_eq!(activity.batched_requests, 15);
    let l = load(&mut app, "b:7");
    pump_for(&mut app, &[l]);
    assert_eq!(loaded::<i32>(&app, l), Some(7));
}

#[test]
fn a_failing_batch_commit_is_reported_to_every_request_in_it() {
    let backend = TestBackend::memory();
    let fail = Arc::clone(&backend.fail);
    let writes = Arc::clone(&backend.writes);
    let mut app = app_with(StoragePlugin::custom(backend).batch_writes(WriteBatching::PerFrame));
    app.update();
    assert!(pump_until(&mut app, WAIT, |w| w
        .resource::<Storage>()
        .is_ready()));
    fail.store(true, Ordering::SeqCst);
    let before = writes.load(Ordering::SeqCst);
    let ids: Vec<RequestId> = (0..5)
        .map(|i| save(&mut app, &format!("f:{i}"), i))
        .collect();
    pump_for(&mut app, &ids);
    assert_eq!(
        writes.load(Ordering::SeqCst) - before,
        1,
        "one commit attempt"
    );
    let seen = app.world().resource::<Seen>();
    let errors: Vec<&SharedError> = ids
        .iter()
        .map(|id| seen.save(*id).unwrap().result.as_ref().unwrap_err())
        .collect();
    assert!(
        errors.iter().all(|e| Arc::ptr_eq(e, errors[0])),
        "the same commit error for all"
    );
    assert!(matches!(**errors[0], StorageError::Unavailable { .. }));
    assert_eq!(
        app.world().resource::<StorageActivity>().batches_committed,
        0
    );

    fail.store(false, Ordering::SeqCst);
    let l = load(&mut app, "f:0");
    pump_for(&mut app, &[l]);
    assert_eq!(
        loaded::<i32>(&app, l),
        None,
        "nothing of the failed batch was written"
    );
}

#[test]
fn batching_keeps_same_key_order_around_loads() {
    let backend = TestBackend::memory();
    let writes = Arc::clone(&backend.writes);
    let mut app = app_with(StoragePlugin::custom(backend).batch_writes(WriteBatching::PerFrame));
    let s1 = save(&mut app, "k", 1u8);
    let other = save(&mut app, "other", 9u8);
    let l1 = load(&mut app, "k");
    let s2 = save(&mut app, "k", 2u8);
    let l2 = load(&mut app, "k");
    let create_only = {
        let request = SaveRequest::new("other", 10u8).overwrite(false);
        let id = request.id();
        send(&mut app, request);
        id
    };
    let bad = save(&mut app, "", 0u8);
    pump_for(&mut app, &[s1, other, l1, s2, l2, create_only, bad]);
    assert_eq!(loaded::<u8>(&app, l1), Some(1));
    assert_eq!(loaded::<u8>(&app, l2), Some(2));
    assert!(save_ok(&app, s1) && save_ok(&app, other) && save_ok(&app, s2));
    let seen = app.world().resource::<Seen>();
    assert!(matches!(
        seen.save(create_only).unwrap().error(),
        Some(StorageError::AlreadyExists { .. })
    ));
    assert!(matches!(
        seen.save(bad).unwrap().error(),
        Some(StorageError::InvalidKey { .. })
    ));
    // s1+other in one batch, s2 in a second one (it may not jump ahead of l1), the create-only
    // save on its own, and the bad key fails before reaching the backend.
    assert_eq!(writes.load(Ordering::SeqCst), 3);
}

#[test]
fn window_batching_groups_writes_across_frames() {
    let backend = TestBackend::memory();
    let writes = Arc::clone(&backend.writes);
    let mut app = app_with(
        StoragePlugin::custom(backend)
            .batch_writes(WriteBatching::Window(Duration::from_millis(500))),
    );
    app.update();
    assert!(pump_until(&mut app, WAIT, |w| w
        .resource::<Storage>()
        .is_ready()));
    let mut ids = Vec::new();
    for i in 0..5u8 {
        ids.push(save(&mut app, &format!("w:{i}"), i));
        app.update();
    }
    assert_eq!(writes.load(Ordering::SeqCst), 0, "the window is still open");
    pump_for(&mut app, &ids);
    assert_eq!(writes.load(Ordering::SeqCst), 1);
    assert_eq!(
        app.world().resource::<StorageActivity>().batched_requests,
        5
    );
}

#[cfg(feature = "sqlite")]
fn persistent_plugin(path: &std::path::Path) -> StoragePluginBuilder {
    StoragePlugin::sqlite(path)
}

#[cfg(not(feature = "sqlite"))]
fn persistent_plugin(path: &std::path::Path) -> StoragePluginBuilder {
    StoragePlugin::file(path)
}

#[test]
fn nothing_sent_before_app_exit_is_lost() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("exit.db");
    {
        let mut app = app_with(persistent_plugin(&path));
        // Saves and the exit in the very first frame, before the store has even opened.
        let ids: Vec<RequestId> = (0..20)
            .map(|i| save(&mut app, &format!("exit:{i}"), i))
            .collect();
        send(&mut app, AppExit::Success);
        app.update();
        assert!(app.should_exit().is_some());
        let seen = app.world().resource::<Seen>();
        for id in &ids {
            assert!(
                seen.save(*id).is_some_and(|r| r.is_ok()),
                "{id} was not completed in the exit frame"
            );
        }
    }
    let mut app = app_with(persistent_plugin(&path));
    let l = load(&mut app, "exit:19");
    let list = ListKeysRequest::new("exit:");
    let lid = list.id();
    send(&mut app, list);
    pump_for(&mut app, &[l, lid]);
    assert_eq!(loaded::<i32>(&app, l), Some(19));
    match app.world().resource::<Seen>().get(lid).unwrap() {
        Resp::List(r) => assert_eq!(r.result.as_ref().unwrap().len(), 20),
        other => panic!("{other:?}"),
    }
}

#[test]
fn app_exit_commits_an_open_write_batch() {
    let backend = TestBackend::memory();
    let writes = Arc::clone(&backend.writes);
    let mut app = app_with(
        StoragePlugin::custom(backend)
            .batch_writes(WriteBatching::Window(Duration::from_secs(3600))),
    );
    let ids: Vec<RequestId> = (0..3)
        .map(|i| save(&mut app, &format!("x:{i}"), i))
        .collect();
    for _ in 0..3 {
        app.update();
    }
    assert!(
        !app.world().resource::<Seen>().has(ids[0]),
        "the window is open"
    );
    send(&mut app, AppExit::Success);
    app.update();
    for id in &ids {
        assert!(save_ok(&app, *id));
    }
    assert_eq!(writes.load(Ordering::SeqCst), 1);
}

#[derive(Resource, Default)]
struct Quit(Vec<RequestId>);

#[test]
fn a_game_that_saves_and_quits_in_one_frame_loses_nothing_with_a_slow_backend() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("files");
    {
        let backend =
            TestBackend::over(FileBackend::open(&root).unwrap()).slow(Duration::from_millis(30));
        let mut app = App::new();
        app.add_plugins((minimal(), StoragePlugin::custom(backend)))
            .init_resource::<Quit>()
            .add_systems(
                Update,
                |mut commands: Commands,
                 mut quit: ResMut<Quit>,
                 mut exit: MessageWriter<AppExit>| {
                    for i in 0..10 {
                        quit.0.push(commands.save(format!("quit:{i}"), i));
                    }
                    exit.write(AppExit::Success);
                },
            );
        let status = app.run();
        assert!(status.is_success());
    }
    let store = Store::open(StorageConfig::file(&root)).unwrap();
    assert_eq!(store.list_keys("quit:").unwrap().len(), 10);
    assert_eq!(
        store
            .load::<i32>("quit:9", &LoadOptions::default())
            .unwrap(),
        Some(9)
    );
}

#[test]
fn dropping_the_app_still_finishes_dispatched_requests() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("files");
    {
        let backend =
            TestBackend::over(FileBackend::open(&root).unwrap()).slow(Duration::from_millis(50));
        let mut app = app_with(StoragePlugin::custom(backend));
        for i in 0..3 {
            save(&mut app, &format!("drop:{i}"), i);
        }
        app.update();
    }
    let store = Store::open(StorageConfig::file(&root)).unwrap();
    assert_eq!(store.list_keys("drop:").unwrap().len(), 3);
}

#[derive(Resource, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
struct Settings {
    volume: u8,
    name: String,
}

#[derive(Resource, Default)]
struct SeenAtStartup(Option<Settings>);

#[test]
fn a_persistent_resource_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("settings.db");
    let make = |path: &std::path::Path| {
        let mut app = app_with(persistent_plugin(path));
        app.persist_resource_with::<Settings>(
            "config:settings",
            PersistOptions::default().throttle(Duration::ZERO),
        )
        .init_resource::<SeenAtStartup>()
        .add_systems(
            Startup,
            |settings: Res<Settings>, mut seen: ResMut<SeenAtStartup>| {
                seen.0 = Some(settings.clone());
            },
        );
        app
    };
    {
        let mut app = make(&path);
        assert!(pump_until(&mut app, WAIT, |w| !w
            .resource::<Seen>()
            .persisted_loaded
            .is_empty()));
        assert_eq!(app.world().resource::<Seen>().persisted_loaded, [Ok(false)]);
        assert_eq!(
            app.world().resource::<SeenAtStartup>().0,
            Some(Settings::default())
        );
        assert_eq!(
            app.world().resource::<Seen>().persisted_saved,
            0,
            "an unchanged default is not saved"
        );
        app.world_mut().resource_mut::<Settings>().volume = 7;
        app.world_mut().resource_mut::<Settings>().name = "Ada".into();
        assert!(pump_until(&mut app, WAIT, |w| w
            .resource::<Seen>()
            .persisted_saved
            == 1));
    }
    let mut app = make(&path);
    assert!(pump_until(&mut app, WAIT, |w| !w
        .resource::<Seen>()
        .persisted_loaded
        .is_empty()));
    assert_eq!(app.world().resource::<Seen>().persisted_loaded, [Ok(true)]);
    assert_eq!(
        *app.world().resource::<Settings>(),
        Settings {
            volume: 7,
            name: "Ada".into()
        }
    );
    // Startup systems run before the load completes: they see the default.
    assert_eq!(
        app.world().resource::<SeenAtStartup>().0,
        Some(Settings::default())
    );
    // Loading does not save the value straight back.
    for _ in 0..5 {
        app.update();
    }
    assert_eq!(app.world().resource::<Seen>().persisted_saved, 0);
}

#[test]
fn persistent_resource_saves_are_throttled_and_flushed_on_exit() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("files");
    {
        let mut app = app_with_step(StoragePlugin::file(&root), Duration::from_millis(100));
        app.persist_resource_with::<Settings>(
            "config:settings",
            PersistOptions::default().throttle(Duration::from_secs(1)),
        );
        assert!(pump_until(&mut app, WAIT, |w| !w
            .resource::<Seen>()
            .persisted_loaded
            .is_empty()));
        // 3 s of changes every frame.
        for volume in 1..=30u8 {
            app.world_mut().resource_mut::<Settings>().volume = volume;
            app.update();
        }
        app.world_mut().resource_mut::<Settings>().volume = 99;
        send(&mut app, AppExit::Success);
        app.update();
        let saves = app.world().resource::<Seen>().persisted_saved;
        assert!(
            (3..=5).contains(&saves),
            "{saves} saves for 3 s of changes with a 1 s throttle"
        );
    }
    let store = Store::open(StorageConfig::file(&root)).unwrap();
    let stored: Settings = store
        .load("config:settings", &LoadOptions::default())
        .unwrap()
        .unwrap();
    assert_eq!(stored.volume, 99, "the last change was saved on exit");
}

#[derive(Resource, Default)]
struct Sent(Vec<RequestId>);

#[test]
fn the_commands_extension_sends_requests() {
    let mut app = app_with(StoragePlugin::memory());
    app.init_resource::<Sent>().add_systems(
        Update,
        |mut commands: Commands, mut sent: ResMut<Sent>, mut done: Local<bool>| {
            if !*done {
                *done = true;
                sent.0.push(commands.save("cmd:1", ada()));
                sent.0.push(commands.save_with(
                    "cmd:2",
                    2u8,
                    SaveOptions::new().ttl(Duration::from_secs(60)),
                ));
                sent.0.push(commands.load("cmd:1"));
                sent.0.push(commands.exists("cmd:2"));
                sent.0.push(commands.list_keys("cmd:"));
                sent.0.push(commands.delete("cmd:2"));
                sent.0
                    .push(commands.transaction([StorageOperation::save("cmd:3", 3u8)]));
                sent.0.push(commands.clear());
            }
        },
    );
    app.update();
    let ids = app.world().resource::<Sent>().0.clone();
    assert_eq!(ids.len(), 8);
    pump_for(&mut app, &ids);
    assert_eq!(loaded::<Player>(&app, ids[2]), Some(ada()));
    let seen = app.world().resource::<Seen>();
    assert!(ids.iter().all(|id| seen.get(*id).unwrap().id() == *id));
    match seen.get(ids[4]).unwrap() {
        Resp::List(r) => assert_eq!(r.result.as_ref().unwrap(), &["cmd:1", "cmd:2"]),
        other => panic!("{other:?}"),
    }
}

#[test]
fn the_bare_plugin_uses_sqlite_under_saves() {
    // The only test that relies on the working directory; the others use absolute paths.
    let dir = tempfile::tempdir().unwrap();
    std::env::set_current_dir(dir.path()).unwrap();
    let mut app = App::new();
    app.add_plugins((minimal(), StoragePlugin))
        .insert_resource(TimeUpdateStrategy::ManualDuration(FRAME))
        .init_resource::<Seen>();
    record!(app, SaveCompleted => Save, LoadCompleted => Load);
    let s = save(&mut app, "hello", "world".to_string());
    let l = load(&mut app, "hello");
    pump_for(&mut app, &[s, l]);
    assert_eq!(loaded::<String>(&app, l).as_deref(), Some("world"));
    let expected_backend = if cfg!(feature = "sqlite") {
        "sqlite"
    } else {
        "file"
    };
    assert_eq!(
        app.world().resource::<StorageStats>().backend_type,
        expected_backend
    );
    if cfg!(feature = "sqlite") {
        assert!(dir.path().join("saves/storage.db").is_file());
    } else {
        assert!(dir.path().join("saves/storage").is_dir());
    }
}

/// A change made by an observer of the load (in the same frame as the load) is a real change
/// and is saved, not mistaken for the loaded value.
#[test]
fn a_change_made_when_the_persisted_resource_arrives_is_saved() {
    #[derive(Resource, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
    struct Volume(u32);

    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("settings.db");
    let run = |db: &std::path::Path, change_to: Option<u32>| -> Volume {
        let mut app = App::new();
        app.add_plugins((MinimalPlugins, StoragePlugin::sqlite(db)))
            .persist_resource_with::<Volume>(
                "config:volume",
                PersistOptions::default().throttle(Duration::ZERO),
            )
            .init_resource::<SeenLoad>()
            .add_observer(
                move |_: On<PersistedResourceLoaded>,
                      mut v: ResMut<Volume>,
                      mut seen: ResMut<SeenLoad>| {
                    seen.0 = true;
                    if let Some(to) = change_to {
                        v.0 = to;
                    }
                },
            );
        assert!(pump_until(&mut app, Duration::from_secs(10), |w| w
            .resource::<SeenLoad>()
            .0));
        let value = app.world().resource::<Volume>().clone();
        app.world_mut().write_message(AppExit::Success);
        app.update();
        value
    };
    #[derive(Resource, Default)]
    struct SeenLoad(bool);

    assert_eq!(
        run(&db, Some(7)),
        Volume(7),
        "first run: nothing stored, changed to 7"
    );
    assert_eq!(
        run(&db, Some(0)),
        Volume(0),
        "second run: loaded 7, reset to 0 at once"
    );
    assert_eq!(run(&db, None), Volume(0), "the reset was saved");
}

/// `storage_ready` holds systems back until the store is open; `resource_loaded` until a
/// persisted resource has its saved value, so such a system never sees the default instead.
#[cfg(feature = "sqlite")]
#[test]
fn run_conditions_wait_for_the_store_and_for_persisted_resources() {
    #[derive(Resource, Default)]
    struct Observed {
        ready_frames: usize,
        first_volume: Option<u8>,
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("conditions.db");
    {
        let store = bevy_storage::Store::open(StorageConfig::sqlite(&path)).unwrap();
        let saved = Settings {
            volume: 9,
            name: "saved".into(),
        };
        store
            .save("config:settings", &saved, &SaveOptions::new())
            .unwrap();
    }
    let mut app = app_with(persistent_plugin(&path));
    app.persist_resource::<Settings>("config:settings")
        .init_resource::<Observed>()
        .add_systems(
            Update,
            (
                (|mut o: ResMut<Observed>| o.ready_frames += 1).run_if(storage_ready),
                (|settings: Res<Settings>, mut o: ResMut<Observed>| {
                    o.first_volume.get_or_insert(settings.volume);
                })
                .run_if(resource_loaded::<Settings>),
            ),
        );
    assert!(!storage_ready(None));
    app.update();
    assert!(pump_until(&mut app, WAIT, |w| w
        .resource::<Observed>()
        .first_volume
        .is_some()));
    assert_eq!(
        app.world().resource::<Observed>().first_volume,
        Some(9),
        "the first run saw the saved value, never the default"
    );
    assert!(app.world().resource::<Observed>().ready_frames > 0);
}

/// Explicit control of a persisted resource: persist now (whatever the throttle), revert to
/// the stored value (dropping unsaved changes), reset to the default (and remove the stored
/// value, so the next launch starts from the default too).
#[cfg(feature = "sqlite")]
#[test]
fn persisted_resources_persist_revert_and_reset_on_demand() {
    use bevy::ecs::system::RunSystemOnce;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("explicit.db");
    let make = || {
        let mut app = app_with(persistent_plugin(&path));
        // A throttle that never ends: only the explicit actions save.
        app.persist_resource_with::<Settings>(
            "config:settings",
            PersistOptions::default().throttle(Duration::from_secs(3600)),
        );
        app
    };
    let stored = |app: &App| -> Option<Settings> {
        app.world()
            .resource::<Storage>()
            .store()
            .and_then(|s| s.get::<Settings>("config:settings").unwrap())
    };
    let act = |app: &mut App, f: fn(Commands)| {
        app.world_mut().run_system_once(f).unwrap();
    };
    let mut app = make();
    assert!(pump_until(&mut app, WAIT, |w| !w
        .resource::<Seen>()
        .persisted_loaded
        .is_empty()));

    // The first change is saved at once (the throttle starts with it); the second waits.
    app.world_mut().resource_mut::<Settings>().volume = 3;
    assert!(pump_until(&mut app, WAIT, |w| w
        .resource::<Seen>()
        .persisted_saved
        == 1));
    app.world_mut().resource_mut::<Settings>().volume = 4;
    for _ in 0..10 {
        app.update();
    }
    assert_eq!(stored(&app).unwrap().volume, 3, "throttled");

    // Persist now.
    act(&mut app, |mut c| c.persist_resource_now::<Settings>());
    assert!(pump_until(&mut app, WAIT, |w| w
        .resource::<Seen>()
        .persisted_saved
        == 2));
    assert_eq!(stored(&app).unwrap().volume, 4);

    // Revert drops an unsaved change.
    app.world_mut().resource_mut::<Settings>().volume = 99;
    act(&mut app, |mut c| c.revert_resource::<Settings>());
    assert!(pump_until(&mut app, WAIT, |w| w
        .resource::<Seen>()
        .persisted_loaded
        .len()
        == 2));
    assert_eq!(app.world().resource::<Settings>().volume, 4);
    for _ in 0..5 {
        app.update();
    }
    assert_eq!(
        app.world().resource::<Seen>().persisted_saved,
        2,
        "the reverted value is not saved back"
    );

    // Reset: the default, and nothing stored.
    act(&mut app, |mut c| c.reset_resource::<Settings>());
    assert!(pump_until(&mut app, WAIT, |w| w
        .resource::<Seen>()
        .persisted_saved
        == 3));
    assert_eq!(*app.world().resource::<Settings>(), Settings::default());
    assert_eq!(stored(&app), None);
    drop(app);

    // The next launch starts from the default.
    let mut app = make();
    assert!(pump_until(&mut app, WAIT, |w| !w
        .resource::<Seen>()
        .persisted_loaded
        .is_empty()));
    assert_eq!(app.world().resource::<Seen>().persisted_loaded, [Ok(false)]);
    assert_eq!(*app.world().resource::<Settings>(), Settings::default());
}

/// Versioned writes through the plugin: a versioned load gives the version, two saves
/// conditional on it race and exactly one wins, the loser gets the typed conflict, and batched
/// saves report the versions they wrote.
#[test]
fn versioned_requests_catch_a_lost_update() {
    let mut app = app_with(StoragePlugin::memory().batch_writes(WriteBatching::PerFrame));
    let first = save(&mut app, "profile", 10u32);
    pump_for(&mut app, &[first]);
    let written = app.world().resource::<Seen>().save(first).unwrap().version;
    assert!(written.is_some(), "a batched save reports its version");

    let read = LoadRequest::new("profile").versioned();
    let read_id = read.id();
    send(&mut app, read);
    pump_for(&mut app, &[read_id]);
    let seen = app.world().resource::<Seen>();
    let version = seen.load(read_id).unwrap().version();
    assert_eq!(
        version, written,
        "the load reads the version the save wrote"
    );
    assert_eq!(loaded::<u32>(&app, read_id), Some(10));
    // A plain load does not pay for the version.
    let plain = load(&mut app, "profile");
    pump_for(&mut app, &[plain]);
    assert_eq!(
        app.world()
            .resource::<Seen>()
            .load(plain)
            .unwrap()
            .version(),
        None
    );

    // Two servers' worth of changes from the same read, in one frame: one wins.
    let version = version.unwrap();
    let a = SaveRequest::new("profile", 11u32).if_version(version);
    let b = SaveRequest::new("profile", 12u32).if_version(version);
    let (a_id, b_id) = (a.id(), b.id());
    send(&mut app, a);
    send(&mut app, b);
    pump_for(&mut app, &[a_id, b_id]);
    let seen = app.world().resource::<Seen>();
    let winner = seen.save(a_id).unwrap();
    assert!(winner.result.is_ok(), "{:?}", winner.result);
    let new_version = winner.version.expect("the winner reports its version");
    assert_ne!(new_version, version);
    let loser = seen.save(b_id).unwrap();
    assert_eq!(loser.version, None);
    match loser.result.as_ref().map_err(|e| &**e) {
        Err(StorageError::VersionConflict {
            expected, found, ..
        }) => {
            assert_eq!(*expected, version);
            assert_eq!(*found, Some(new_version));
        }
        other => panic!("expected a version conflict, got {other:?}"),
    }
    let check = load(&mut app, "profile");
    pump_for(&mut app, &[check]);
    assert_eq!(loaded::<u32>(&app, check), Some(11));
}
