//! The read cache validated by SQLite's change token (`src/store/cache.rs`,
//! `src/backend/sqlite/token.rs`), against real files and real processes: a write by another
//! process, another store or another thread is never hidden by a cached load.
//!
//! The other process is this test binary again, run with `CACHE_CHILD_DB` set so that only
//! [`cache_child_process`] does anything: it opens the same file with the store's defaults and
//! runs the commands it reads on stdin, answering each on stdout once it has returned (so the
//! write is committed before the parent hears of it).
#![cfg(feature = "sqlite")]

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use bevy_storage::backend::{
    Backend, ChangeToken, KeyEntry, MemoryBackend, Record, RecordMeta, SqliteBackend, WriteOp,
    WriteOutcome,
};
use bevy_storage::clock::Timestamp;
use bevy_storage::{LoadOptions, SaveOptions, StorageConfig, StorageOperation, Store};

const CHILD_ENV: &str = "CACHE_CHILD_DB";

fn load_u64(store: &Store, key: &str) -> Option<u64> {
    store.load(key, &LoadOptions::default()).unwrap()
}

fn save_u64(store: &Store, key: &str, v: u64) {
    store.save(key, &v, &SaveOptions::default()).unwrap();
}

/// The writer in the other process: see the module docs. Does nothing in an ordinary run.
#[test]
fn cache_child_process() {
    let Ok(path) = std::env::var(CHILD_ENV) else {
        return;
    };
    let store = Store::open(StorageConfig::sqlite(&path)).unwrap();
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    for line in std::io::stdin().lock().lines() {
        let line = line.unwrap();
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["burst", key, n] => {
                for i in 1..=n.parse::<u64>().unwrap() {
                    save_u64(&store, key, i);
                    writeln!(out, "{i}").unwrap();
                    out.flush().unwrap();
                }
            }
            ["save", key, v] => save_u64(&store, key, v.parse().unwrap()),
            ["delete", key] => {
                store.delete(key).unwrap();
            }
            ["tx", a, b, v] => {
                let v: u64 = v.parse().unwrap();
                store
                    .transaction(vec![
                        StorageOperation::save(*a, v),
                        StorageOperation::save(*b, v),
                    ])
                    .unwrap();
            }
            ["clear"] => store.clear().unwrap(),
            ["quit"] => break,
            other => panic!("unknown command {other:?}"),
        }
        writeln!(out, "done").unwrap();
        out.flush().unwrap();
    }
}

/// The other process, with its stdin and stdout.
struct Writer {
    child: Child,
    stdin: ChildStdin,
    /// `None` while a thread reads it (the burst).
    stdout: Option<BufReader<ChildStdout>>,
}

impl Writer {
    fn spawn(db: &std::path::Path) -> Self {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "cache_child_process",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_ENV, db)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let stdin = child.stdin.take().unwrap();
        let stdout = Some(BufReader::new(child.stdout.take().unwrap()));
        Self {
            child,
            stdin,
            stdout,
        }
    }

    /// The next line the child prints, skipping the test harness's own lines.
    fn line(&mut self) -> String {
        loop {
            let mut line = String::new();
            let n = self.stdout.as_mut().unwrap().read_line(&mut line).unwrap();
            assert!(n > 0, "the writer process ended early");
            let line = line.trim().to_owned();
            if line == "done" || line.parse::<u64>().is_ok() {
                return line;
            }
        }
    }

    /// Sends a command and waits until the child has run it.
    fn run(&mut self, command: &str) {
        writeln!(self.stdin, "{command}").unwrap();
        self.stdin.flush().unwrap();
        assert_eq!(self.line(), "done", "{command}");
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        let _ = writeln!(self.stdin, "quit");
        let _ = self.stdin.flush();
        let _ = self.child.wait();
    }
}

#[test]
fn a_write_from_another_process_is_never_hidden_by_the_cache() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("shared.db");
    // The store's defaults: the validated cache is on.
    let store = Store::open(StorageConfig::sqlite(&db)).unwrap();
    let mut writer = Writer::spawn(&db);

    // 1. The other process saves 1, 2, 3, ... as fast as it can, acknowledging each; this
    // process loads in a tight loop. A load that starts after acknowledgement `a` must
    // return at least `a`, and no load returns less than one before it.
    const BURST: u64 = 3000;
    writeln!(writer.stdin, "burst counter {BURST}").unwrap();
    writer.stdin.flush().unwrap();
    let acked = Arc::new(AtomicU64::new(0));
    let mut stdout = writer.stdout.take().unwrap();
    let reader = {
        let acked = acked.clone();
        std::thread::spawn(move || {
            loop {
                let mut line = String::new();
                assert!(stdout.read_line(&mut line).unwrap() > 0);
                match line.trim() {
                    "done" => return stdout,
                    l => {
                        if let Ok(i) = l.parse::<u64>() {
                            acked.store(i, Ordering::SeqCst);
                        }
                    }
                }
            }
        })
    };
    let (mut last, mut loads) = (0u64, 0u64);
    let hits_before = store.get_stats().cache.hits;
    loop {
        let a = acked.load(Ordering::SeqCst);
        let v = load_u64(&store, "counter").unwrap_or(0);
        loads += 1;
        assert!(
            v >= a,
            "load {loads} returned {v} after the other process acknowledged {a}"
        );
        assert!(v >= last, "load {loads} returned {v} after {last}");
        last = v;
        if a == BURST {
            break;
        }
    }
    writer.stdout = Some(reader.join().unwrap());
    let hits = store.get_stats().cache.hits - hits_before;
    eprintln!("{loads} loads during {BURST} writes of another process, {hits} from the cache");
    assert!(
        hits > 0,
        "the cache served nothing: the test proves nothing"
    );

    // 2. Lock step: this process caches a value (two loads: the second a hit), the other
    // process changes it, and the very next load here sees the change: saves, deletes,
    // transactions, a clear, and a write to a key this process never cached.
    for j in 1..=400u64 {
        let _ = load_u64(&store, "x");
        let _ = load_u64(&store, "y");
        let before = load_u64(&store, "x");
        match j % 20 {
            0 => {
                writer.run("clear");
                assert_eq!(load_u64(&store, "x"), None, "{j}: clear");
                assert_eq!(load_u64(&store, "y"), None, "{j}: clear");
                assert_eq!(load_u64(&store, "counter"), None, "{j}: clear");
            }
            5 | 15 => {
                writer.run("delete x");
                assert_eq!(load_u64(&store, "x"), None, "{j}: delete (was {before:?})");
            }
            7 => {
                writer.run(&format!("tx x y {j}"));
                assert_eq!(load_u64(&store, "x"), Some(j), "{j}: transaction");
                assert_eq!(load_u64(&store, "y"), Some(j), "{j}: transaction");
            }
            9 => {
                writer.run(&format!("save fresh{j} {j}"));
                assert_eq!(load_u64(&store, &format!("fresh{j}")), Some(j));
            }
            _ => {
                writer.run(&format!("save x {j}"));
                assert_eq!(load_u64(&store, "x"), Some(j), "{j}: save (was {before:?})");
                assert_eq!(load_u64(&store, "x"), Some(j), "{j}: save, again");
            }
        }
    }
    assert!(store.get_stats().cache.hits > hits);
}

#[test]
fn a_save_then_a_load_sees_the_new_value_and_other_keys_stay_cached() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(StorageConfig::sqlite(dir.path().join("own.db"))).unwrap();
    save_u64(&store, "other", 7);
    assert_eq!(load_u64(&store, "other"), Some(7));
    for i in 0..200 {
        save_u64(&store, "k", i);
        assert_eq!(load_u64(&store, "k"), Some(i));
        assert_eq!(load_u64(&store, "k"), Some(i));
        assert_eq!(load_u64(&store, "other"), Some(7));
    }
    store.delete("k").unwrap();
    assert_eq!(load_u64(&store, "k"), None);
    let stats = store.get_stats().cache;
    // "other" was read 201 times; after the first, every read but the few after a WAL
    // restart (which changes the token) is a hit: own writes keep the other entries.
    assert!(stats.hits >= 300, "{stats:?}");
}

/// Records with an expiry are not served from the cache past it.
#[test]
fn a_cached_record_expires_on_time() {
    use bevy_storage::clock::ManualClock;
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(Timestamp(1_000_000));
    let store =
        Store::open(StorageConfig::sqlite(dir.path().join("ttl.db")).clock(clock.clone())).unwrap();
    store
        .save(
            "short",
            &1u64,
            &SaveOptions::default().ttl(Duration::from_secs(10)),
        )
        .unwrap();
    // The second load fills the cache (a key enters on its second miss), the third hits.
    for _ in 0..3 {
        assert_eq!(load_u64(&store, "short"), Some(1));
    }
    assert!(store.get_stats().cache.hits >= 1);
    clock.advance(Duration::from_secs(10));
    assert_eq!(load_u64(&store, "short"), None);
}

/// Two stores over one file in one process, and writer threads racing cached readers: no
/// reader ever sees a value older than one whose save had returned before its load began.
#[test]
fn racing_writers_never_leave_a_stale_cached_value() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("race.db");
    let a = Store::open(StorageConfig::sqlite(&db)).unwrap();
    let b = Store::open(StorageConfig::sqlite(&db)).unwrap();
    const KEYS: usize = 4;
    const WRITES: u64 = 1500;
    let acked: Arc<Vec<AtomicU64>> = Arc::new((0..KEYS).map(|_| AtomicU64::new(0)).collect());
    let stop = Arc::new(AtomicBool::new(false));
    std::thread::scope(|s| {
        // Writers: one per key, alternating between the two stores.
        for k in 0..KEYS {
            let (a, b, acked) = (a.clone(), b.clone(), acked.clone());
            s.spawn(move || {
                for i in 1..=WRITES {
                    let store = if i % 2 == 0 { &a } else { &b };
                    save_u64(store, &format!("k{k}"), i);
                    acked[k].store(i, Ordering::SeqCst);
                }
            });
        }
        // Readers: two on each store.
        let mut readers = Vec::new();
        for r in 0..4 {
            let store = if r % 2 == 0 { a.clone() } else { b.clone() };
            let (acked, stop) = (acked.clone(), stop.clone());
            readers.push(s.spawn(move || {
                let mut last = [0u64; KEYS];
                let mut n = 0u64;
                while !stop.load(Ordering::SeqCst) {
                    for k in 0..KEYS {
                        let floor = acked[k].load(Ordering::SeqCst);
                        let v = load_u64(&store, &format!("k{k}")).unwrap_or(0);
                        assert!(v >= floor, "reader {r}: k{k} = {v} after {floor} was saved");
                        assert!(v >= last[k], "reader {r}: k{k} = {v} after {}", last[k]);
                        last[k] = v;
                        n += 1;
                    }
                }
                n
            }));
        }
        while acked.iter().any(|a| a.load(Ordering::SeqCst) < WRITES) {
            std::thread::sleep(Duration::from_millis(5));
        }
        stop.store(true, Ordering::SeqCst);
        for r in readers {
            assert!(r.join().unwrap() > 0);
        }
    });
    for k in 0..KEYS {
        assert_eq!(load_u64(&a, &format!("k{k}")), Some(WRITES));
        assert_eq!(load_u64(&b, &format!("k{k}")), Some(WRITES));
    }
}

#[test]
fn the_default_cache_stays_within_its_bounds() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(
        StorageConfig::sqlite(dir.path().join("bounded.db"))
            .read_cache_capacity(50)
            .read_cache_max_bytes(64 * 1024),
    )
    .unwrap();
    let small = "s".repeat(100);
    let big = "b".repeat(3000);
    let ops = (0..500)
        .flat_map(|i| {
            [
                StorageOperation::save(format!("small{i}"), small.clone()),
                StorageOperation::save(format!("big{i}"), big.clone()),
            ]
        })
        .collect();
    store.transaction(ops).unwrap();
    for round in 0..3 {
        for i in 0..500 {
            let s: String = store.get(&format!("small{i}")).unwrap().unwrap();
            assert_eq!(s, small, "{round}");
            assert!(store.get_stats().cache.entries <= 50);
        }
    }
    // The byte bound: 64 KiB hold at most 20 entries of 3 KiB (and 128 bytes each).
    let bytes = Store::open(
        StorageConfig::sqlite(dir.path().join("bounded.db"))
            .read_cache_capacity(1000)
            .read_cache_max_bytes(64 * 1024),
    )
    .unwrap();
    for round in 0..2 {
        for i in 0..500 {
            let b: String = bytes.get(&format!("big{i}")).unwrap().unwrap();
            assert_eq!(b, big, "{round}");
            assert!(bytes.get_stats().cache.entries <= 20);
        }
    }
    assert!(bytes.get_stats().cache.entries >= 10);
    drop(bytes);

    // Capacity 0: no cache at all.
    drop(store);
    let off =
        Store::open(StorageConfig::sqlite(dir.path().join("bounded.db")).read_cache_capacity(0))
            .unwrap();
    for _ in 0..3 {
        assert_eq!(off.get::<String>("small1").unwrap(), Some(small.clone()));
    }
    assert_eq!(off.get_stats().cache.hits, 0);
}

/// A read-only store has no token (no writer connection to map the wal-index through) and so
/// no validated cache: another store's writes are seen at once.
#[test]
fn a_read_only_store_keeps_no_cache() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("ro.db");
    let rw = Store::open(StorageConfig::sqlite(&db)).unwrap();
    save_u64(&rw, "k", 1);
    let ro = Store::open(StorageConfig::sqlite(&db).read_only(true)).unwrap();
    assert!(ro.backend().change_token().is_none());
    assert!(rw.backend().change_token().is_some());
    for i in 2..50 {
        assert_eq!(load_u64(&ro, "k"), Some(i - 1));
        save_u64(&rw, "k", i);
        assert_eq!(load_u64(&ro, "k"), Some(i));
    }
    assert_eq!(ro.get_stats().cache.hits, 0);
}

/// A backend over a SQLite file whose token can be switched off, as when the wal-index header
/// cannot be read: the store then serves nothing from the cache, and changes made behind its
/// back (here by a second store on the same file) are seen.
struct Flaky {
    inner: SqliteBackend,
    token_on: AtomicBool,
    /// When set, every write first lets this store (on the same file) save `x` = 1000: a
    /// commit of someone else's between the write's two reads of the token.
    interloper: parking_lot::Mutex<Option<Store>>,
}

impl Backend for Flaky {
    fn backend_type(&self) -> &str {
        "flaky"
    }
    fn get(&self, key: &str) -> bevy_storage::Result<Option<Record>> {
        self.inner.get(key)
    }
    fn get_value(&self, key: &str) -> bevy_storage::Result<Option<(Vec<u8>, Option<Timestamp>)>> {
        self.inner.get_value(key)
    }
    fn get_meta(&self, key: &str) -> bevy_storage::Result<Option<RecordMeta>> {
        self.inner.get_meta(key)
    }
    fn write(&self, ops: Vec<WriteOp>, now: Timestamp) -> bevy_storage::Result<Vec<WriteOutcome>> {
        if let Some(other) = &*self.interloper.lock() {
            save_u64(other, "x", 1000);
        }
        self.inner.write(ops, now)
    }
    fn delete_if_unchanged(
        &self,
        key: &str,
        value: &[u8],
        expires_at: Option<Timestamp>,
    ) -> bevy_storage::Result<bool> {
        self.inner.delete_if_unchanged(key, value, expires_at)
    }
    fn touch(&self, key: &str, at: Timestamp) -> bevy_storage::Result<()> {
        self.inner.touch(key, at)
    }
    fn scan(&self, prefix: &str) -> bevy_storage::Result<Vec<KeyEntry>> {
        self.inner.scan(prefix)
    }
    fn purge_expired(&self, now: Timestamp) -> bevy_storage::Result<usize> {
        self.inner.purge_expired(now)
    }
    fn clear(&self) -> bevy_storage::Result<()> {
        self.inner.clear()
    }
    fn change_token(&self) -> Option<ChangeToken> {
        if self.token_on.load(Ordering::SeqCst) {
            self.inner.change_token()
        } else {
            None
        }
    }
}

#[test]
fn without_a_token_nothing_is_served_from_the_cache() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("flaky.db");
    let flaky = Arc::new(Flaky {
        inner: SqliteBackend::open(&db, &Default::default()).unwrap(),
        token_on: AtomicBool::new(true),
        interloper: parking_lot::Mutex::new(None),
    });
    let store = Store::with_backend(flaky.clone(), StorageConfig::sqlite(&db)).unwrap();
    let other = Store::open(StorageConfig::sqlite(&db)).unwrap();
    save_u64(&other, "k", 1);
    for _ in 0..3 {
        assert_eq!(load_u64(&store, "k"), Some(1));
    }
    let hits = store.get_stats().cache.hits;
    assert!(hits >= 1);
    flaky.token_on.store(false, Ordering::SeqCst);
    for i in 2..20 {
        save_u64(&other, "k", i);
        assert_eq!(load_u64(&store, "k"), Some(i));
        assert_eq!(load_u64(&store, "k"), Some(i));
    }
    assert_eq!(store.get_stats().cache.hits, hits);
    // Back on: the token differs from the one the entries were read under.
    flaky.token_on.store(true, Ordering::SeqCst);
    assert_eq!(load_u64(&store, "k"), Some(19));
    save_u64(&other, "k", 20);
    assert_eq!(load_u64(&store, "k"), Some(20));

    // A backend without any token (memory) keeps no cache unless a time bound is asked for.
    let memory =
        Store::with_backend(Arc::new(MemoryBackend::new()), StorageConfig::memory()).unwrap();
    save_u64(&memory, "m", 1);
    assert_eq!(load_u64(&memory, "m"), Some(1));
    assert_eq!(load_u64(&memory, "m"), Some(1));
    assert_eq!(memory.get_stats().cache.hits, 0);
}

/// Another store's commit that lands between this store's two reads of the token around its
/// own write: the cache must not take the new token as the mark of its own write alone.
#[test]
fn another_commit_inside_an_own_write_empties_the_cache() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("inside.db");
    let flaky = Arc::new(Flaky {
        inner: SqliteBackend::open(&db, &Default::default()).unwrap(),
        token_on: AtomicBool::new(true),
        interloper: parking_lot::Mutex::new(None),
    });
    let store = Store::with_backend(flaky.clone(), StorageConfig::sqlite(&db)).unwrap();
    save_u64(&store, "x", 1);
    save_u64(&store, "y", 1);
    *flaky.interloper.lock() = Some(Store::open(StorageConfig::sqlite(&db)).unwrap());
    for (round, write) in ["save", "delete missing", "delete y"]
        .into_iter()
        .enumerate()
    {
        save_u64(
            &Store::open(StorageConfig::sqlite(&db)).unwrap(),
            "x",
            round as u64,
        );
        assert_eq!(load_u64(&store, "x"), Some(round as u64));
        assert_eq!(load_u64(&store, "x"), Some(round as u64), "cached");
        match write {
            // Our write is one commit, the interloper's another: two in the window.
            "save" => save_u64(&store, "y", 2),
            // Our write commits nothing: the one commit in the window is not ours.
            "delete missing" => assert!(!store.delete("missing").unwrap()),
            // Our write removes a live record: one commit each.
            _ => assert!(store.delete("y").unwrap()),
        }
        assert_eq!(load_u64(&store, "x"), Some(1000), "after {write}");
    }
}
