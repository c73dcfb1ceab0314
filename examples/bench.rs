//! Benchmarks: each comparison runs ours and a baseline in this one process, alternating,
//! for several rounds, and prints one line:
//!
//! `compare <name> ours=<v> baseline=<v> ratio=<ours/baseline> unit=<unit> better=<higher|lower> <notes>`
//!
//! ```text
//! cargo run --release --features internals --example bench              # full sizes (a few minutes)
//! cargo run --release --features internals --example bench -- --quick   # reduced sizes, under two minutes
//! cargo run --release --features internals --example bench -- snapshot  # only comparisons whose name contains "snapshot"
//! cargo run --release --features internals --example bench -- snapshot --entities 1000000  # snapshot worlds of 1M entities
//! ```
//! Progress goes to stderr; results to stdout. Medians of the rounds are reported.

use std::alloc::{GlobalAlloc, Layout, System};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bevy::ecs::entity::EntityHashMap;
use bevy::prelude::*;
use bevy::world_serialization::serde::WorldDeserializer;
use bevy::world_serialization::{DynamicWorld, DynamicWorldBuilder};
use bevy_storage::StorageOperation;
use bevy_storage::backend::sqlite::SqliteSynchronous;
use bevy_storage::codec::{Cipher, Compression, EncryptionKey, Format, SealOptions};
use bevy_storage::plugin::{SaveCompleted, SaveRequest, StoragePlugin};
use bevy_storage::prelude::*;
use bevy_storage::snapshot::{
    ChainCursor, Persist, SnapshotContext, SnapshotEncoding, SnapshotRegistry, SnapshotSettings,
    capture, capture_base, capture_delta, decode, load_newest_autosave, read_snapshot,
    store_autosave_record, store_compacted_autosave, store_snapshot,
};
use clap::Parser;
use serde::de::DeserializeSeed;
use serde::{Deserialize, Serialize};

// ----------------------------------------------------------------- memory peaks

struct Counting;
static CURRENT: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            let now = CURRENT.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
            PEAK.fetch_max(now, Ordering::Relaxed);
        }
        p
    }
    /// Forwarded, not left to the default (`alloc` and a `memset`): `System` gets zeroed
    /// memory from `calloc`, whose large blocks are fresh zero pages touched only where
    /// written, as in a game's process. The default would fault in every page up front.
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            let now = CURRENT.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
            PEAK.fetch_max(now, Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        CURRENT.fetch_sub(layout.size(), Ordering::Relaxed);
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            if new_size > layout.size() {
                let now = CURRENT.fetch_add(new_size - layout.size(), Ordering::Relaxed) + new_size
                    - layout.size();
                PEAK.fetch_max(now, Ordering::Relaxed);
            } else {
                CURRENT.fetch_sub(layout.size() - new_size, Ordering::Relaxed);
            }
        }
        p
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Runs `f` and returns its result with the allocation peak above the starting level.
fn with_peak<R>(f: impl FnOnce() -> R) -> (R, usize) {
    let base = CURRENT.load(Ordering::Relaxed);
    PEAK.store(base, Ordering::Relaxed);
    let r = f();
    (r, PEAK.load(Ordering::Relaxed).saturating_sub(base))
}

// ----------------------------------------------------------------- harness

#[derive(Parser, Debug)]
struct Args {
    /// Reduced sizes, for a run under two minutes.
    #[arg(long)]
    quick: bool,
    /// Rounds per comparison (alternating ours and baseline).
    #[arg(long)]
    rounds: Option<usize>,
    /// Only comparisons whose name contains this.
    filter: Option<String>,
    /// Entities of the snapshot worlds (default 100,000; 20,000 with --quick).
    #[arg(long)]
    entities: Option<usize>,
}

struct Bench {
    quick: bool,
    rounds: usize,
    filter: Option<String>,
    entities: Option<usize>,
    dir: tempfile::TempDir,
}

#[derive(Clone, Copy)]
enum Better {
    Higher,
    Lower,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

impl Bench {
    fn wants(&self, name: &str) -> bool {
        self.filter
            .as_ref()
            .is_none_or(|f| name.contains(f.as_str()))
    }

    fn path(&self, name: &str) -> std::path::PathBuf {
        self.dir.path().join(name)
    }

    /// Alternates `ours` and `baseline` for the configured rounds; each returns its measure.
    fn compare(
        &self,
        name: &str,
        unit: &str,
        better: Better,
        notes: &str,
        mut ours: impl FnMut(usize) -> f64,
        mut baseline: impl FnMut(usize) -> f64,
    ) -> (f64, f64) {
        let (mut a, mut b) = (Vec::new(), Vec::new());
        for round in 0..self.rounds {
            eprint!("\r  {name}: round {}/{}   ", round + 1, self.rounds);
            a.push(ours(round));
            b.push(baseline(round));
        }
        eprintln!();
        let (a, b) = (median(a), median(b));
        println!(
            "compare {name} ours={} baseline={} ratio={:.3} unit={unit} better={} {notes}",
            fmt(a),
            fmt(b),
            a / b,
            match better {
                Better::Higher => "higher",
                Better::Lower => "lower",
            }
        );
        (a, b)
    }
}

fn fmt(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.3}")
    }
}

fn per_sec(n: usize, d: Duration) -> f64 {
    n as f64 / d.as_secs_f64()
}

fn main() {
    let args = Args::parse();
    let bench = Bench {
        quick: args.quick,
        rounds: args.rounds.unwrap_or(if args.quick { 3 } else { 5 }),
        filter: args.filter,
        entities: args.entities,
        dir: tempfile::tempdir().expect("temp dir"),
    };
    eprintln!(
        "bevy_storage benchmarks ({} build, {} sizes, {} rounds)",
        if cfg!(debug_assertions) {
            "DEBUG: numbers are not meaningful"
        } else {
            "release"
        },
        if bench.quick { "quick" } else { "full" },
        bench.rounds
    );
    let started = Instant::now();
    sqlite(&bench);
    sqlite_defaults(&bench);
    purge_stall(&bench);
    file(&bench);
    file_tx(&bench);
    peer_pkv(&bench);
    codec(&bench);
    snapshots(&bench);
    snapshot_chains(&bench);
    plugin_frame(&bench);
    plugin_dispatch_frame(&bench);
    redis(&bench);
    postgres(&bench);
    eprintln!("done in {:.1} s", started.elapsed().as_secs_f64());
}

// ----------------------------------------------------------------- key-value

/// A 200-byte value (a string, the shape of most saved text data).
fn value_200() -> String {
    (0..200u32)
        .map(|i| char::from(b'a' + (i * 7 % 26) as u8))
        .collect()
}

fn kv_store(config: StorageConfig) -> Store {
    Store::open(
        config
            .compression(Compression::Off)
            .format(Format::Binary)
            .max_size(None),
    )
    .expect("open store")
}

fn raw_sqlite(path: &Path, full: bool) -> rusqlite::Connection {
    let conn = rusqlite::Connection::open(path).unwrap();
    conn.pragma_update(None, "journal_mode", "WAL").unwrap();
    conn.pragma_update(None, "synchronous", if full { "FULL" } else { "NORMAL" })
        .unwrap();
    conn.busy_timeout(Duration::from_secs(5)).unwrap();
    // The same table as the SQLite backend's, so the comparison measures the library's
    // own overhead (validation, serde, envelope, the previous-record lookup, bookkeeping).
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS records (key TEXT PRIMARY KEY NOT NULL, created_at INTEGER NOT NULL, \
         modified_at INTEGER NOT NULL, accessed_at INTEGER NOT NULL, expires_at INTEGER, size INTEGER NOT NULL, \
         compressed INTEGER NOT NULL, encrypted INTEGER NOT NULL, custom TEXT, \
         version INTEGER NOT NULL DEFAULT 0, value BLOB NOT NULL)",
    )
    .unwrap();
    conn
}

/// The backend's own upsert statement.
const UPSERT: &str = "INSERT INTO records (key, created_at, modified_at, accessed_at, expires_at, size, \
     compressed, encrypted, custom, value, version) VALUES (?1, ?2, ?2, ?2, NULL, ?3, 0, 0, NULL, ?4, ?2) \
     ON CONFLICT (key) DO UPDATE SET created_at = excluded.created_at, modified_at = excluded.modified_at, \
     accessed_at = excluded.accessed_at, expires_at = excluded.expires_at, size = excluded.size, \
     compressed = excluded.compressed, encrypted = excluded.encrypted, custom = excluded.custom, \
     value = excluded.value, version = excluded.version";

fn raw_upsert(stmt: &mut rusqlite::CachedStatement<'_>, key: &str, value: &str) {
    let now = bevy_storage::clock::Timestamp::now().as_millis();
    stmt.execute(rusqlite::params![
        key,
        now,
        value.len() as i64,
        value.as_bytes()
    ])
    .unwrap();
}

fn sqlite(b: &Bench) {
    let n = if b.quick { 300 } else { 2000 };
    let value = value_200();
    if b.wants("sqlite_save") {
        let store = kv_store(StorageConfig::sqlite(b.path("ours_save.db")));
        let raw = raw_sqlite(&b.path("raw_save.db"), false);
        b.compare(
            "sqlite_save",
            "writes/s",
            Better::Higher,
            "(200-byte string, one transaction per write, WAL synchronous=NORMAL both, the same upsert into the same table)",
            |round| {
                let t = Instant::now();
                for i in 0..n {
                    store
                        .save(&format!("k{}", round * n + i), &value, &SaveOptions::default())
                        .unwrap();
                }
                per_sec(n, t.elapsed())
            },
            |round| {
                let mut stmt = raw.prepare_cached(UPSERT).unwrap();
                let t = Instant::now();
                for i in 0..n {
                    raw_upsert(&mut stmt, &format!("k{}", round * n + i), &value);
                }
                per_sec(n, t.elapsed())
            },
        );
    }
    if b.wants("versioned_save") {
        let store = kv_store(StorageConfig::sqlite(b.path("ours_versioned.db")));
        let first = |prefix: &str| -> Vec<bevy_storage::RecordVersion> {
            (0..n)
                .map(|i| {
                    store
                        .save(&format!("{prefix}{i}"), &value, &SaveOptions::default())
                        .unwrap()
                })
                .collect()
        };
        let mut versions = first("v");
        first("p");
        b.compare(
            "versioned_save",
            "writes/s",
            Better::Higher,
            "(SQLite: overwrites of 200-byte strings, each conditional on the version the last write returned, vs the same overwrites unconditional in the same store; target >= 0.9)",
            |_| {
                let t = Instant::now();
                for (i, version) in versions.iter_mut().enumerate() {
                    *version = store
                        .save(
                            &format!("v{i}"),
                            &value,
                            &SaveOptions::new().if_version(*version),
                        )
                        .unwrap();
                }
                per_sec(n, t.elapsed())
            },
            |_| {
                let t = Instant::now();
                for i in 0..n {
                    store
                        .save(&format!("p{i}"), &value, &SaveOptions::default())
                        .unwrap();
                }
                per_sec(n, t.elapsed())
            },
        );
    }
    if b.wants("sqlite_save_batch") {
        let batch = 1000;
        let batches = if b.quick { 3 } else { 10 };
        let store = kv_store(StorageConfig::sqlite(b.path("ours_batch.db")));
        let mut raw = raw_sqlite(&b.path("raw_batch.db"), false);
        b.compare(
            "sqlite_save_batch",
            "records/s",
            Better::Higher,
            "(transactions of 1000 saves of 200-byte strings, the same upsert into the same table; target >= 200000 records/s)",
            |round| {
                let t = Instant::now();
                for j in 0..batches {
                    let ops = (0..batch)
                        .map(|i| StorageOperation::save(format!("b{round}:{j}:{i}"), value.clone()))
                        .collect();
                    store.transaction(ops).unwrap();
                }
                per_sec(batch * batches, t.elapsed())
            },
            |round| {
                let t = Instant::now();
                for j in 0..batches {
                    let tx = raw.transaction().unwrap();
                    {
                        let mut stmt = tx.prepare_cached(UPSERT).unwrap();
                        for i in 0..batch {
                            raw_upsert(&mut stmt, &format!("b{round}:{j}:{i}"), &value);
                        }
                    }
                    tx.commit().unwrap();
                }
                per_sec(batch * batches, t.elapsed())
            },
        );
    }
    if b.wants("sqlite_load") {
        // The read cache off: this line measures the store's own path over SQLite.
        let store =
            kv_store(StorageConfig::sqlite(b.path("ours_load.db")).read_cache_validated(false));
        let raw = raw_sqlite(&b.path("raw_load.db"), false);
        let keys = 1000;
        for i in 0..keys {
            store
                .save(&format!("k{i}"), &value, &SaveOptions::default())
                .unwrap();
            raw_upsert(
                &mut raw.prepare_cached(UPSERT).unwrap(),
                &format!("k{i}"),
                &value,
            );
        }
        let reads = n * 10;
        b.compare(
            "sqlite_load",
            "reads/s",
            Better::Higher,
            "(point loads of 200-byte strings from 1000 keys, read cache off; baseline selects the bytes)",
            |_| {
                let t = Instant::now();
                for i in 0..reads {
                    let v: String = store
                        .load(&format!("k{}", i % keys), &LoadOptions::default())
                        .unwrap()
                        .unwrap();
                    std::hint::black_box(v);
                }
                per_sec(reads, t.elapsed())
            },
            |_| {
                let mut stmt = raw
                    .prepare_cached("SELECT value FROM records WHERE key = ?1")
                    .unwrap();
                let t = Instant::now();
                for i in 0..reads {
                    let v: Vec<u8> = stmt
                        .query_row([format!("k{}", i % keys)], |r| r.get(0))
                        .unwrap();
                    std::hint::black_box(v);
                }
                per_sec(reads, t.elapsed())
            },
        );
    }
}

/// The shipped defaults (RON, LZ4 on, the 100 MiB quota), at `path`.
fn default_store(path: &Path) -> Store {
    Store::open(StorageConfig::sqlite(path)).expect("open store")
}

/// A `len`-byte string that LZ4 cannot shrink much (random letters and digits).
fn random_text(rng: &mut fastrand::Rng, len: usize) -> String {
    (0..len).map(|_| rng.alphanumeric()).collect()
}

/// The shipped defaults against the same raw-rusqlite baselines, and a save near the quota.
fn sqlite_defaults(b: &Bench) {
    let n = if b.quick { 300 } else { 2000 };
    let value = value_200();
    if b.wants("sqlite_save_default") {
        let store = default_store(&b.path("default_save.db"));
        let raw = raw_sqlite(&b.path("raw_default_save.db"), false);
        b.compare(
            "sqlite_save_default",
            "writes/s",
            Better::Higher,
            "(200-byte string, store defaults: RON, LZ4, 100 MiB quota; one transaction per write, WAL synchronous=NORMAL both; baseline: the backend's upsert of the raw bytes; target ratio >= 0.7)",
            |round| {
                let t = Instant::now();
                for i in 0..n {
                    store
                        .save(&format!("k{}", round * n + i), &value, &SaveOptions::default())
                        .unwrap();
                }
                per_sec(n, t.elapsed())
            },
            |round| {
                let mut stmt = raw.prepare_cached(UPSERT).unwrap();
                let t = Instant::now();
                for i in 0..n {
                    raw_upsert(&mut stmt, &format!("k{}", round * n + i), &value);
                }
                per_sec(n, t.elapsed())
            },
        );
    }
    if b.wants("sqlite_load_default") {
        let store = default_store(&b.path("default_load.db"));
        let raw = raw_sqlite(&b.path("raw_default_load.db"), false);
        let keys = 1000;
        for i in 0..keys {
            store
                .save(&format!("k{i}"), &value, &SaveOptions::default())
                .unwrap();
            raw_upsert(
                &mut raw.prepare_cached(UPSERT).unwrap(),
                &format!("k{i}"),
                &value,
            );
        }
        let reads = n * 10;
        b.compare(
            "sqlite_load_default",
            "reads/s",
            Better::Higher,
            "(point loads of 200-byte strings from 1000 keys, store defaults: RON, LZ4, 100 MiB quota, read cache validated by the change token (1024 entries: every key stays cached); baseline selects the bytes; target ratio >= 0.7)",
            |_| {
                let t = Instant::now();
                for i in 0..reads {
                    let v: String = store
                        .load(&format!("k{}", i % keys), &LoadOptions::default())
                        .unwrap()
                        .unwrap();
                    std::hint::black_box(v);
                }
                per_sec(reads, t.elapsed())
            },
            |_| {
                let mut stmt = raw
                    .prepare_cached("SELECT value FROM records WHERE key = ?1")
                    .unwrap();
                let t = Instant::now();
                for i in 0..reads {
                    let v: Vec<u8> = stmt
                        .query_row([format!("k{}", i % keys)], |r| r.get(0))
                        .unwrap();
                    std::hint::black_box(v);
                }
                per_sec(reads, t.elapsed())
            },
        );
    }
    if b.wants("sqlite_save_near_quota") {
        // A game re-saving 1000 slots of 2 KiB of state that LZ4 cannot shrink: the same
        // saves into a store 95% full and into an empty one (both with the defaults).
        let mut rng = fastrand::Rng::with_seed(18);
        let slot = random_text(&mut rng, 2048);
        // Quick runs (the CI smoke run, a debug build) fill a quota of 8 MiB instead.
        let max: u64 = if b.quick { 8 << 20 } else { 100 << 20 };
        let open = |name: &str| {
            Store::open(StorageConfig::sqlite(b.path(name)).max_size(Some(max)))
                .expect("open store")
        };
        let near = open("near_quota.db");
        let far = open("far_quota.db");
        // Many small records, as a game's store holds: a recount reads every row.
        let filler = random_text(&mut rng, 1024);
        let mut j = 0;
        let batch = if b.quick { 256 } else { 4096 };
        while near.get_stats().total_size < max * 95 / 100 - (2 << 20) {
            let ops = (0..batch)
                .map(|i| StorageOperation::save(format!("fill:{j}:{i}"), filler.clone()))
                .collect();
            near.transaction(ops).unwrap();
            j += 1;
        }
        for store in [&near, &far] {
            for i in 0..1000 {
                store
                    .save(&format!("slot{i}"), &slot, &SaveOptions::default())
                    .unwrap();
            }
        }
        let full = near.get_stats().total_size as f64 / max as f64;
        let n = if b.quick { 1000 } else { 5000 };
        let saves = |store: &Store, round: usize| {
            let t = Instant::now();
            for i in 0..n {
                store
                    .save(
                        &format!("slot{}", (round * n + i) % 1000),
                        &slot,
                        &SaveOptions::default(),
                    )
                    .unwrap();
            }
            per_sec(n, t.elapsed())
        };
        b.compare(
            "sqlite_save_near_quota",
            "writes/s",
            Better::Higher,
            &format!("(overwrites of 1000 keys with 2 KiB strings LZ4 cannot shrink, store defaults, in a store {:.1}% full of 1 KiB records vs the same saves into an empty store; target ratio >= 0.7)", full * 100.0),
            |round| saves(&near, round),
            |round| saves(&far, round),
        );
    }
}

fn file_mib(path: &Path) -> f64 {
    let size = |p: &Path| std::fs::metadata(p).map_or(0, |m| m.len());
    let wal = std::path::PathBuf::from(format!("{}-wal", path.display()));
    (size(path) + size(&wal)) as f64 / (1u64 << 20) as f64
}

/// Saves one record at a time until `done`; returns the longest save (ms) and how many ran.
fn saves_while(store: &Store, done: &std::sync::atomic::AtomicBool, tag: &str) -> (f64, usize) {
    let value = value_200();
    let (mut longest, mut count) = (0f64, 0);
    while !done.load(Ordering::Acquire) {
        let t = Instant::now();
        store
            .save(&format!("{tag}:{count}"), &value, &SaveOptions::default())
            .unwrap();
        longest = longest.max(t.elapsed().as_secs_f64() * 1000.0);
        count += 1;
    }
    (longest, count)
}

/// The longest a save waits while expired records are purged.
fn purge_stall(b: &Bench) {
    if !b.wants("purge_stall") {
        return;
    }
    let total = if b.quick { 50_000 } else { 1_000_000 };
    let expired = total / 10;
    let path = b.path("purge.db");
    let store = Store::open(StorageConfig::sqlite(&path).max_size(None)).expect("open store");
    let value = value_200();
    eprintln!("  purge_stall: writing {} live records", total - expired);
    for j in 0..(total - expired) / 1000 {
        let ops = (0..1000)
            .map(|i| StorageOperation::save(format!("live:{j}:{i}"), value.clone()))
            .collect();
        store.transaction(ops).unwrap();
    }
    let plant = |tag: &str| {
        for j in 0..expired / 1000 {
            let ops = (0..1000)
                .map(|i| {
                    StorageOperation::save_with(
                        format!("expired:{tag}:{j}:{i}"),
                        value.clone(),
                        SaveOptions::default().ttl(Duration::from_millis(1)),
                    )
                })
                .collect();
            store.transaction(ops).unwrap();
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let mut space = (0.0, 0.0, 0usize);
    let mut purge_time = Duration::ZERO;
    b.compare(
        "purge_stall",
        "ms",
        Better::Lower,
        &format!("(longest single save, one after another, while Store::purge_expired removes {expired} expired of {total} records, store defaults without quota; baseline: the same saves while one DELETE statement removes them, as before; target ours <= 20 ms)"),
        |round| {
            plant(&format!("o{round}"));
            let before = file_mib(&path);
            let done = std::sync::atomic::AtomicBool::new(false);
            let purge_started = Instant::now();
            let (longest, saves) = std::thread::scope(|scope| {
                let purge = scope.spawn(|| {
                    let removed = store.purge_expired().unwrap();
                    done.store(true, Ordering::Release);
                    removed
                });
                let r = saves_while(&store, &done, &format!("so{round}"));
                assert_eq!(purge.join().unwrap(), expired);
                r
            });
            space = (before, file_mib(&path), saves);
            purge_time = purge_started.elapsed();
            longest
        },
        |round| {
            plant(&format!("b{round}"));
            let raw = raw_sqlite(&path, false);
            let done = &std::sync::atomic::AtomicBool::new(false);
            std::thread::scope(|scope| {
                let purge = scope.spawn(move || {
                    let now = bevy_storage::clock::Timestamp::now().as_millis();
                    let removed = raw
                        .execute(
                            "DELETE FROM records WHERE expires_at IS NOT NULL AND expires_at <= ?1",
                            [now],
                        )
                        .unwrap();
                    done.store(true, Ordering::Release);
                    removed
                });
                let r = saves_while(&store, done, &format!("sb{round}"));
                assert_eq!(purge.join().unwrap(), expired);
                r.0
            })
        },
    );
    // The same saves for as long as the last purge took, with no purge: the stalls a save
    // meets anyway (a WAL checkpoint's fsync, the host).
    let done = std::sync::atomic::AtomicBool::new(false);
    let (control, _) = std::thread::scope(|scope| {
        scope.spawn(|| {
            std::thread::sleep(purge_time);
            done.store(true, Ordering::Release);
        });
        saves_while(&store, &done, "control")
    });
    println!(
        "space purge_stall database+WAL before={:.1} MiB after={:.1} MiB (ours, last round: the file shrinks by incremental vacuum; {} saves ran during the purge, which took {:.0} ms; the longest save of the same loop for as long without a purge: {control:.3} ms)",
        space.0,
        space.1,
        space.2,
        purge_time.as_secs_f64() * 1000.0
    );
}

/// The baseline's durable write: temp file, fsync, rename, fsync of the directory (the same
/// guarantees as the file backend).
fn fs_durable_write(dir: &Path, name: &str, bytes: &[u8]) {
    use std::io::Write;
    let tmp = dir.join(format!(".tmp-{name}"));
    let mut f = std::fs::File::create(&tmp).unwrap();
    f.write_all(bytes).unwrap();
    f.sync_all().unwrap();
    std::fs::rename(&tmp, dir.join(name)).unwrap();
    std::fs::File::open(dir).unwrap().sync_all().unwrap();
}

fn file(b: &Bench) {
    let n = if b.quick { 100 } else { 500 };
    let value = value_200();
    let store = kv_store(StorageConfig::file(b.path("ours_files")));
    let raw_dir = b.path("raw_files");
    std::fs::create_dir_all(&raw_dir).unwrap();
    if b.wants("file_save") {
        b.compare(
            "file_save",
            "writes/s",
            Better::Higher,
            "(200 bytes; both: temp file, fsync, rename, fsync of the directory)",
            |round| {
                let t = Instant::now();
                for i in 0..n {
                    store
                        .save(
                            &format!("k{}", (round * n + i) % 1000),
                            &value,
                            &SaveOptions::default(),
                        )
                        .unwrap();
                }
                per_sec(n, t.elapsed())
            },
            |round| {
                let t = Instant::now();
                for i in 0..n {
                    fs_durable_write(
                        &raw_dir,
                        &format!("k{}", (round * n + i) % 1000),
                        value.as_bytes(),
                    );
                }
                per_sec(n, t.elapsed())
            },
        );
    }
    if b.wants("file_load") {
        for i in 0..200 {
            store
                .save(&format!("k{i}"), &value, &SaveOptions::default())
                .unwrap();
            fs_durable_write(&raw_dir, &format!("k{i}"), value.as_bytes());
        }
        let reads = n * 20;
        b.compare(
            "file_load",
            "reads/s",
            Better::Higher,
            "(200 bytes; ours checks header, checksums and key; baseline std::fs::read)",
            |_| {
                let t = Instant::now();
                for i in 0..reads {
                    let v: String = store
                        .load(&format!("k{}", i % 200), &LoadOptions::default())
                        .unwrap()
                        .unwrap();
                    std::hint::black_box(v);
                }
                per_sec(reads, t.elapsed())
            },
            |_| {
                let t = Instant::now();
                for i in 0..reads {
                    let v = std::fs::read(raw_dir.join(format!("k{}", i % 200))).unwrap();
                    std::hint::black_box(v);
                }
                per_sec(reads, t.elapsed())
            },
        );
    }
}

/// A file-backend transaction against single saves of the same records.
fn file_tx(b: &Bench) {
    if !b.wants("file_tx") {
        return;
    }
    let value = value_200();
    let store = kv_store(StorageConfig::file(b.path("ours_file_tx")));
    let batch = 1000;
    let singles = if b.quick { 50 } else { 200 };
    b.compare(
        "file_tx",
        "records/s",
        Better::Higher,
        &format!("(one transaction of {batch} saves of 200 bytes vs {singles} single saves, file backend, binary, no compression, no quota; target ratio >= 5)"),
        |round| {
            let ops = (0..batch)
                .map(|i| StorageOperation::save(format!("t{round}:{i}"), value.clone()))
                .collect();
            let t = Instant::now();
            store.transaction(ops).unwrap();
            per_sec(batch, t.elapsed())
        },
        |round| {
            let t = Instant::now();
            for i in 0..singles {
                store
                    .save(&format!("s{round}:{i}"), &value, &SaveOptions::default())
                    .unwrap();
            }
            per_sec(singles, t.elapsed())
        },
    );
}

fn peer_pkv(b: &Bench) {
    let n = if b.quick { 100 } else { 500 };
    let value = value_200();
    if b.wants("peer_pkv_save") || b.wants("peer_pkv_load") || b.wants("peer_pkv_load_cold") {
        let store = kv_store(StorageConfig::sqlite(b.path("ours_pkv.db")));
        let full = kv_store(
            StorageConfig::sqlite(b.path("ours_pkv_full.db"))
                .sqlite_synchronous(SqliteSynchronous::Full),
        );
        let mut pkv = bevy_pkv::PkvStore::new_in_dir(b.path("pkv"));
        if b.wants("peer_pkv_save") {
            for (name, ours, durability) in [
                (
                    "peer_pkv_save",
                    &store,
                    "ours=SQLite WAL NORMAL (survives a process crash)",
                ),
                (
                    "peer_pkv_save_full",
                    &full,
                    "ours=SQLite WAL FULL (survives power loss)",
                ),
            ] {
                b.compare(
                    name,
                    "writes/s",
                    Better::Higher,
                    &format!("(200 bytes; {durability}; baseline=bevy_pkv 0.16 redb, fsync per commit (survives power loss))"),
                    |round| {
                        let t = Instant::now();
                        for i in 0..n {
                            ours.save(&format!("k{}", (round * n + i) % 1000), &value, &SaveOptions::default())
                                .unwrap();
                        }
                        per_sec(n, t.elapsed())
                    },
                    |round| {
                        let t = Instant::now();
                        for i in 0..n {
                            pkv.set(format!("k{}", (round * n + i) % 1000), &value).unwrap();
                        }
                        per_sec(n, t.elapsed())
                    },
                );
            }
        }
        // The loads run the store a game gets: every default (RON, LZ4, the 100 MiB quota,
        // the read cache validated by SQLite's change token).
        let defaults = (b.wants("peer_pkv_load") || b.wants("peer_pkv_load_cold"))
            .then(|| default_store(&b.path("ours_pkv_defaults.db")));
        if b.wants("peer_pkv_load") {
            let store = defaults.as_ref().unwrap();
            for i in 0..200 {
                store
                    .save(&format!("k{i}"), &value, &SaveOptions::default())
                    .unwrap();
                pkv.set(format!("k{i}"), &value).unwrap();
            }
            let reads = n * 20;
            b.compare(
                "peer_pkv_load",
                "reads/s",
                Better::Higher,
                "(200 bytes, 200 keys read in turn; ours=SQLite with the store's defaults (RON, LZ4, quota, read cache validated by the change token), baseline=bevy_pkv 0.16 redb; target ratio >= 1.0)",
                |_| {
                    let t = Instant::now();
                    for i in 0..reads {
                        let v: String = store
                            .load(&format!("k{}", i % 200), &LoadOptions::default())
                            .unwrap()
                            .unwrap();
                        std::hint::black_box(v);
                    }
                    per_sec(reads, t.elapsed())
                },
                |_| {
                    let t = Instant::now();
                    for i in 0..reads {
                        let v: String = pkv.get(format!("k{}", i % 200)).unwrap();
                        std::hint::black_box(v);
                    }
                    per_sec(reads, t.elapsed())
                },
            );
        }
        if b.wants("peer_pkv_load_cold") {
            // Each key read once per round, in a shuffled order: nothing a hot-record cache
            // could keep (the files stay in the OS page cache for both).
            let store = defaults.as_ref().unwrap();
            let keys = if b.quick { 2000 } else { 10_000 };
            for j in 0..keys / 1000 {
                let ops = (0..1000)
                    .map(|i| StorageOperation::save(format!("c{}", j * 1000 + i), value.clone()))
                    .collect();
                store.transaction(ops).unwrap();
            }
            for i in 0..keys {
                pkv.set(format!("c{i}"), &value).unwrap();
            }
            let mut order: Vec<usize> = (0..keys).collect();
            fastrand::Rng::with_seed(5).shuffle(&mut order);
            b.compare(
                "peer_pkv_load_cold",
                "reads/s",
                Better::Higher,
                &format!("(200 bytes, each of {keys} keys read once per round in a shuffled order; ours=SQLite with the store's defaults (its read cache holds 1024 entries: every load misses), baseline=bevy_pkv 0.16 redb; no target)"),
                |_| {
                    let t = Instant::now();
                    for &i in &order {
                        let v: String = store
                            .load(&format!("c{i}"), &LoadOptions::default())
                            .unwrap()
                            .unwrap();
                        std::hint::black_box(v);
                    }
                    per_sec(keys, t.elapsed())
                },
                |_| {
                    let t = Instant::now();
                    for &i in &order {
                        let v: String = pkv.get(format!("c{i}")).unwrap();
                        std::hint::black_box(v);
                    }
                    per_sec(keys, t.elapsed())
                },
            );
        }
    }
}

// ----------------------------------------------------------------- codec

#[derive(Serialize, Deserialize, Clone)]
struct Doc {
    id: u64,
    name: String,
    tags: Vec<String>,
    position: [f32; 3],
    inventory: Vec<(String, u32)>,
    active: bool,
}

fn corpus(bytes: usize) -> Vec<Doc> {
    let mut rng = fastrand::Rng::with_seed(7);
    let words = [
        "sword", "shield", "potion", "goblin", "dungeon", "gold", "arrow", "torch", "map", "key",
    ];
    let mut docs = Vec::new();
    let mut size = 0;
    while size < bytes {
        let doc = Doc {
            id: rng.u64(..),
            name: format!("{}-{}", words[rng.usize(..words.len())], rng.u32(..1000)),
            tags: (0..rng.usize(1..5))
                .map(|_| words[rng.usize(..words.len())].to_string())
                .collect(),
            position: [rng.f32() * 100.0, rng.f32() * 100.0, rng.f32()],
            inventory: (0..rng.usize(0..6))
                .map(|_| (words[rng.usize(..words.len())].to_string(), rng.u32(..99)))
                .collect(),
            active: rng.bool(),
        };
        size += 120;
        docs.push(doc);
    }
    docs
}

/// This process's minor page faults so far (0 where `/proc/self/stat` is missing).
fn minor_faults() -> u64 {
    std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|stat| {
            // The fields after the command name, which is in parentheses; minflt is the 10th
            // field of the line, the 8th after the name.
            let rest = &stat[stat.rfind(')')? + 2..];
            rest.split(' ').nth(7)?.parse().ok()
        })
        .unwrap_or(0)
}

fn gib_per_sec(bytes: usize, d: Duration) -> f64 {
    bytes as f64 / d.as_secs_f64() / (1u64 << 30) as f64
}

fn codec(b: &Bench) {
    if !["codec_lz4", "codec_aes", "codec_envelope"]
        .iter()
        .any(|c| b.wants(c))
    {
        return;
    }
    let json = serde_json::to_vec(&corpus(if b.quick { 8 << 20 } else { 32 << 20 })).unwrap();
    let cipher = Cipher::new(&EncryptionKey::from_bytes([9; 32]), None).unwrap();
    if b.wants("codec_lz4") {
        let opts = SealOptions {
            format: Format::Raw,
            compression: Compression::Lz4,
            encrypt: false,
        };
        // Both sides compress the same bytes from a buffer of their own, allocated the same
        // way before the clock starts and released inside the timing: `seal_vec` consumes
        // the serialized payload's buffer (as `Store::save` hands it over), and a program
        // calling lz4_flex on its serialized bytes releases them too. Until this was so, only
        // our side paid for unmapping the 32 MiB input (about 2 ms of 100).
        let owned_input = || {
            let mut buf = bevy_storage::codec::envelope::payload_buffer(&opts, json.len());
            buf.extend_from_slice(&json);
            buf
        };
        let offset = bevy_storage::codec::envelope::payload_offset(&opts);
        let faults = std::cell::Cell::new((0u64, 0u64));
        let lz4_flex_direct = |_| {
            let input = owned_input();
            let f = minor_faults();
            let t = Instant::now();
            let c = lz4_flex::block::compress_prepend_size(&input[offset..]);
            drop(input);
            let d = t.elapsed();
            faults.set((faults.get().0, minor_faults() - f));
            std::hint::black_box(c);
            gib_per_sec(json.len(), d)
        };
        let (_, lz4_flex_speed) = b.compare(
            "codec_lz4",
            "GiB/s",
            Better::Higher,
            &format!("(compress {} MiB of JSON through the envelope vs lz4_flex directly, each from a buffer it owns and releases; target ratio >= 0.9)", json.len() >> 20),
            |_| {
                let buf = owned_input();
                let f = minor_faults();
                let t = Instant::now();
                let sealed = bevy_storage::codec::envelope::seal_vec("k", buf, &opts, None).unwrap();
                let d = t.elapsed();
                faults.set((minor_faults() - f, faults.get().1));
                std::hint::black_box(sealed);
                gib_per_sec(json.len(), d)
            },
            lz4_flex_direct,
        );
        let (ours, theirs) = faults.get();
        println!(
            "faults codec_lz4 ours={ours} baseline={theirs} (minor page faults of the last round's call, from /proc/self/stat)"
        );
        // How fast can LZ4 go on this CPU at all? The reference C library (liblz4, default
        // acceleration) on the same bytes, against lz4_flex.
        b.compare(
            "codec_lz4_reference",
            "GiB/s",
            Better::Higher,
            &format!("(liblz4 C reference vs lz4_flex on the same JSON, each from a buffer it owns and releases; lz4_flex median above {lz4_flex_speed:.3})"),
            |_| {
                let input = owned_input();
                let t = Instant::now();
                let c = lz4::block::compress(&input[offset..], None, true).unwrap();
                drop(input);
                let d = t.elapsed();
                std::hint::black_box(c);
                gib_per_sec(json.len(), d)
            },
            lz4_flex_direct,
        );
    }
    if b.wants("codec_aes") {
        let opts = SealOptions {
            format: Format::Raw,
            compression: Compression::Off,
            encrypt: true,
        };
        b.compare(
            "codec_aes",
            "GiB/s",
            Better::Higher,
            "(AES-256-GCM through the envelope, sealing a serialized payload in its buffer as Store::save does, vs ring's AES-256-GCM in place; target >= 1 GiB/s)",
            |_| {
                let mut buf = bevy_storage::codec::envelope::payload_buffer(&opts, json.len());
                buf.extend_from_slice(&json);
                let t = Instant::now();
                let sealed =
                    bevy_storage::codec::envelope::seal_vec("k", buf, &opts, Some(&cipher)).unwrap();
                let d = t.elapsed();
                std::hint::black_box(sealed);
                gib_per_sec(json.len(), d)
            },
            |_| {
                let mut buf = json.clone();
                let t = Instant::now();
                let tag = cipher.encrypt_in_place(&[b"k"], &mut buf).unwrap();
                let d = t.elapsed();
                std::hint::black_box((buf, tag));
                gib_per_sec(json.len(), d)
            },
        );
    }
    if b.wants("codec_envelope") {
        let value = corpus(1 << 20);
        let opts = SealOptions {
            format: Format::Binary,
            compression: Compression::Lz4,
            encrypt: true,
        };
        let iterations = if b.quick { 5 } else { 20 };
        // Where the time goes: each step alone on the same bytes, timed in the same rounds as
        // the envelope (a round times the envelope, then postcard, LZ4 and AES-GCM alone), so
        // that the load of a shared host weighs on both sides of envelope_over_parts alike.
        // Postcard plus LZ4 alone is the floor of the compare line's ratio.
        let serialized = postcard::to_stdvec(&value).unwrap();
        let compressed = lz4_flex::block::compress_prepend_size(&serialized);
        let aes_opts = SealOptions {
            format: Format::Raw,
            compression: Compression::Off,
            encrypt: true,
        };
        // Milliseconds per call of `f` over `iterations` calls, and its minor page faults
        // per call.
        let timed = |f: &mut dyn FnMut()| {
            let faults = minor_faults();
            let t = Instant::now();
            for _ in 0..iterations {
                f();
            }
            let ms = t.elapsed().as_secs_f64() * 1000.0 / iterations as f64;
            (ms, (minor_faults() - faults) / iterations as u64)
        };
        let envelope_faults = std::cell::Cell::new(0);
        let parts = std::cell::RefCell::new((Vec::new(), Vec::new(), [0u64; 3], Vec::new()));
        let (envelope_ms, postcard_ms) = b.compare(
            "codec_envelope",
            "ms",
            Better::Lower,
            "(1 MiB value: postcard + LZ4 + AES-GCM + envelope vs postcard alone; target: at most 1.15 x the sum of its parts, the envelope_over_parts of the parts line below)",
            |_| {
                let (ms, faults) = timed(&mut || {
                    std::hint::black_box(
                        bevy_storage::codec::encode("k", &value, &opts, Some(&cipher)).unwrap(),
                    );
                });
                envelope_faults.set(faults);
                ms
            },
            |_| {
                let (postcard_ms, postcard_faults) = timed(&mut || {
                    std::hint::black_box(postcard::to_stdvec(&value).unwrap());
                });
                let (lz4_ms, lz4_faults) = timed(&mut || {
                    std::hint::black_box(lz4_flex::block::compress_prepend_size(&serialized));
                });
                let (aes_ms, aes_faults) = timed(&mut || {
                    let mut buf =
                        bevy_storage::codec::envelope::payload_buffer(&aes_opts, compressed.len());
                    buf.extend_from_slice(&compressed);
                    std::hint::black_box(
                        bevy_storage::codec::envelope::seal_vec("k", buf, &aes_opts, Some(&cipher))
                            .unwrap(),
                    );
                });
                // Not a part of the floor: postcard behind the depth budget that every save
                // serializes through (`codec::depth`, so that a save that succeeds always
                // loads), to show what the budget itself costs.
                let (bounded_ms, _) = timed(&mut || {
                    let mut buf = bevy_storage::codec::envelope::payload_buffer(&opts, 0);
                    bevy_storage::codec::format::serialize_into("k", &value, Format::Binary, &mut buf)
                        .unwrap();
                    std::hint::black_box(buf);
                });
                let mut parts = parts.borrow_mut();
                parts.0.push(lz4_ms);
                parts.1.push(aes_ms);
                parts.3.push(bounded_ms);
                parts.2 = [postcard_faults, lz4_faults, aes_faults];
                postcard_ms
            },
        );
        let (lz4_ms, aes_ms, [postcard_faults, lz4_faults, aes_faults], bounded_ms) =
            parts.into_inner();
        let (lz4_ms, aes_ms, bounded_ms) = (median(lz4_ms), median(aes_ms), median(bounded_ms));
        println!(
            "parts codec_envelope postcard={postcard_ms:.3} ms lz4={lz4_ms:.3} ms aes={aes_ms:.3} ms \
             floor_ratio={:.3} envelope_over_parts={:.3} (each step alone, in the same rounds as \
             the envelope: postcard of the value ({} KiB), lz4_flex of those bytes, sealing the \
             compressed {} KiB with AES-GCM; (postcard + lz4) / postcard is the lowest ratio LZ4 \
             allows; envelope_over_parts is codec_envelope's time over postcard + lz4 + aes, \
             target <= 1.15)",
            (postcard_ms + lz4_ms) / postcard_ms,
            envelope_ms / (postcard_ms + lz4_ms + aes_ms),
            serialized.len() >> 10,
            compressed.len() >> 10,
        );
        println!(
            "parts codec_envelope_depth postcard_bounded={bounded_ms:.3} ms over_postcard={:.3} \
             envelope_over_bounded_parts={:.3} (postcard behind the depth budget every save \
             serializes through, in the same rounds; envelope_over_bounded_parts takes it for \
             the postcard part)",
            bounded_ms / postcard_ms,
            envelope_ms / (bounded_ms + lz4_ms + aes_ms),
        );
        println!(
            "faults codec_envelope envelope={} postcard={postcard_faults} lz4={lz4_faults} aes={aes_faults} \
             (minor page faults per call in the last round)",
            envelope_faults.get()
        );
    }
}

// ----------------------------------------------------------------- snapshots

#[derive(Component, Reflect, Clone, Copy, Serialize, Deserialize)]
#[reflect(Component)]
struct Position {
    x: f32,
    y: f32,
    z: f32,
}

#[derive(Component, Reflect, Clone, Copy, Serialize, Deserialize)]
#[reflect(Component)]
struct Velocity {
    x: f32,
    y: f32,
}

#[derive(Component, Reflect, Clone, Serialize, Deserialize)]
#[reflect(Component)]
struct Unit {
    hp: u32,
    team: u8,
    name: String,
}

fn snapshot_app(entities: usize) -> App {
    let mut app = App::new();
    let mut registry = SnapshotRegistry::new();
    registry
        .register_component::<Position>()
        .register_component::<Velocity>()
        .register_component::<Unit>();
    app.insert_resource(registry);
    let world = app.world_mut();
    // What `SnapshotPlugin` does: spread loads hide their entities behind `Loading`.
    world.register_disabling_component::<bevy_storage::snapshot::Loading>();
    world.spawn_batch((0..entities).map(|i| {
        let (position, velocity, unit) = snapshot_values(i);
        (Persist, position, velocity, unit)
    }));
    app
}

/// The components of the snapshot worlds' entity `i`.
fn snapshot_values(i: usize) -> (Position, Velocity, Unit) {
    let f = i as f32;
    let position = Position {
        x: f,
        y: f * 0.5,
        z: 1.0,
    };
    let unit = Unit {
        hp: (i % 100) as u32,
        team: (i % 4) as u8,
        name: format!("unit{i}"),
    };
    (position, Velocity { x: 1.0, y: -1.0 }, unit)
}

fn baseline_dynamic_world(world: &mut World) -> DynamicWorld {
    let registry = world.resource::<AppTypeRegistry>().clone();
    let reg = registry.read();
    let entities: Vec<Entity> = world
        .query_filtered::<Entity, With<Persist>>()
        .iter(world)
        .collect();
    DynamicWorldBuilder::from_world(world, &reg)
        .deny_component::<bevy::ecs::observer::ObservedBy>()
        .extract_entities(entities.into_iter())
        .build()
}

struct NoAssets;
impl bevy::asset::LoadFromPath for NoAssets {
    fn load_from_path_erased(
        &mut self,
        _type_id: std::any::TypeId,
        path: bevy::asset::AssetPath<'static>,
    ) -> bevy::asset::UntypedHandle {
        panic!("benchmark worlds hold no assets ({path})")
    }
}

impl Bench {
    /// Entities of the snapshot worlds.
    fn snapshot_entities(&self) -> usize {
        self.entities
            .unwrap_or(if self.quick { 20_000 } else { 100_000 })
    }
}

fn snapshots(b: &Bench) {
    let n = b.snapshot_entities();
    let wanted = [
        "snapshot_stall",
        "snapshot_save_total",
        "snapshot_load_total",
        "snapshot_size",
    ];
    if !wanted.iter().any(|w| b.wants(w)) {
        return;
    }
    eprintln!("  building a world of {n} entities x 3 components");
    let app = std::cell::RefCell::new(snapshot_app(n));
    let settings = SnapshotSettings::default().encoding(SnapshotEncoding::Binary);
    let registry = app.borrow().world().resource::<SnapshotRegistry>().clone();
    let store = Store::open(StorageConfig::sqlite(b.path("snap.db")).max_size(None)).unwrap();
    let ron_path = b.path("baseline.scn.ron");
    let mut peaks = (0usize, 0usize);

    if b.wants("snapshot_stall") {
        b.compare(
            "snapshot_stall",
            "ms",
            Better::Lower,
            &format!("(main-thread time of one save of {n} entities x 3 components: ours capture only, the rest runs on the pool; baseline DynamicWorldBuilder + RON + file write; target < 16 ms)"),
            |_| {
                let mut app = app.borrow_mut();
                let world = app.world_mut();
                let t = Instant::now();
                let captured = capture(world, &settings, &registry).unwrap();
                let d = t.elapsed();
                drop(captured);
                d.as_secs_f64() * 1000.0
            },
            |_| {
                let mut app = app.borrow_mut();
                let world = app.world_mut();
                let t = Instant::now();
                let dw = baseline_dynamic_world(world);
                let reg = world.resource::<AppTypeRegistry>().read();
                let text = dw.serialize(&reg).unwrap();
                std::fs::write(&ron_path, text).unwrap();
                t.elapsed().as_secs_f64() * 1000.0
            },
        );
    }
    if b.wants("snapshot_save_total") || b.wants("snapshot_size") {
        let (mut ours_size, mut ron_size) = (0, 0);
        b.compare(
            "snapshot_save_total",
            "ms",
            Better::Lower,
            "(capture + encode (postcard) + LZ4 + write to SQLite vs DynamicWorldBuilder + RON + file write; target ratio <= 0.2)",
            |_| {
                let (ms, peak) = with_peak(|| {
                    let mut app = app.borrow_mut();
                let world = app.world_mut();
                    let t = Instant::now();
                    let captured = capture(world, &settings, &registry).unwrap();
                    let bytes = captured.encode().unwrap();
                    store_snapshot(&store, "bench", &bytes, &settings, Default::default()).unwrap();
                    t.elapsed().as_secs_f64() * 1000.0
                });
                ours_size = store.get_metadata("bench").unwrap().unwrap().size as usize;
                peaks.0 = peaks.0.max(peak);
                ms
            },
            |_| {
                let (ms, peak) = with_peak(|| {
                    let mut app = app.borrow_mut();
                let world = app.world_mut();
                    let t = Instant::now();
                    let dw = baseline_dynamic_world(world);
                    let reg = world.resource::<AppTypeRegistry>().read();
                    let text = dw.serialize(&reg).unwrap();
                    std::fs::write(&ron_path, &text).unwrap();
                    ron_size = text.len();
                    t.elapsed().as_secs_f64() * 1000.0
                });
                peaks.1 = peaks.1.max(peak);
                ms
            },
        );
        println!(
            "compare snapshot_size ours={ours_size} baseline={ron_size} ratio={:.3} unit=bytes better=lower (stored record vs RON file; target ratio <= 0.3)",
            ours_size as f64 / ron_size as f64
        );
        println!(
            "memory snapshot_save peak ours={} MiB baseline={} MiB",
            peaks.0 >> 20,
            peaks.1 >> 20
        );
    }
    if b.wants("snapshot_load_total") {
        let mut load_peaks = (0usize, 0usize);
        let mut target_ours = snapshot_app(0);
        let mut target_base = snapshot_app(0);
        let context = SnapshotContext::from_world(target_ours.world_mut());
        b.compare(
            "snapshot_load_total",
            "ms",
            Better::Lower,
            "(read + decode + apply into a world vs file read + RON WorldDeserializer + write_to_world; target ratio <= 0.2)",
            |_| {
                let (ms, peak) = with_peak(|| {
                    let t = Instant::now();
                    let bytes = read_snapshot(&store, "bench").unwrap().unwrap();
                    let decoded = decode(&bytes, &context).unwrap();
                    let map = decoded.apply(target_ours.world_mut(), true);
                    assert_eq!(map.len(), n);
                    t.elapsed().as_secs_f64() * 1000.0
                });
                load_peaks.0 = load_peaks.0.max(peak);
                ms
            },
            |_| {
                let (ms, peak) = with_peak(|| {
                    let world = target_base.world_mut();
                    // Same semantics as ours: the previous load's entities go first.
                    let old: Vec<Entity> = world.query_filtered::<Entity, With<Persist>>().iter(world).collect();
                    let t = Instant::now();
                    for e in old {
                        world.despawn(e);
                    }
                    let text = std::fs::read_to_string(&ron_path).unwrap();
                    let registry = world.resource::<AppTypeRegistry>().clone();
                    let dw = {
                        let reg = registry.read();
                        let mut de = ron::de::Deserializer::from_str(&text).unwrap();
                        WorldDeserializer {
                            type_registry: &reg,
                            load_from_path: &mut NoAssets,
                        }
                        .deserialize(&mut de)
                        .unwrap()
                    };
                    let mut map = EntityHashMap::default();
                    dw.write_to_world(world, &mut map).unwrap();
                    assert_eq!(map.len(), n);
                    t.elapsed().as_secs_f64() * 1000.0
                });
                load_peaks.1 = load_peaks.1.max(peak);
                ms
            },
        );
        println!(
            "memory snapshot_load peak ours={} MiB baseline={} MiB",
            load_peaks.0 >> 20,
            load_peaks.1 >> 20
        );
    }
}

// ----------------------------------------------------------------- snapshot chains

/// Changes `Position` of every 100th persisted entity (1%), starting at `round % 100`.
fn touch_one_percent(world: &mut World, entities: &[Entity], round: usize) {
    for &e in entities.iter().skip(round % 100).step_by(100) {
        world.get_mut::<Position>(e).unwrap().x += 1.0;
    }
}

fn snapshot_chains(b: &Bench) {
    let wanted = [
        "snapshot_incremental_stall",
        "snapshot_incremental_bytes",
        "snapshot_compaction_stall",
        "snapshot_chain_load_total",
        "snapshot_load_stall",
        "snapshot_load_stall_spread",
    ];
    if !wanted.iter().any(|w| b.wants(w)) {
        return;
    }
    let n = b.snapshot_entities();
    eprintln!("  building a world of {n} entities x 3 components (chains)");
    let mut app = snapshot_app(n);
    let settings = SnapshotSettings::default().encoding(SnapshotEncoding::Binary);
    let registry = app.world().resource::<SnapshotRegistry>().clone();
    let store = Store::open(StorageConfig::sqlite(b.path("chain.db")).max_size(None)).unwrap();
    let entities: Vec<Entity> = {
        let world = app.world_mut();
        world
            .query_filtered::<Entity, With<Persist>>()
            .iter(world)
            .collect()
    };
    let meta = Default::default;

    if b.wants("snapshot_incremental_stall") || b.wants("snapshot_incremental_bytes") {
        let (captured, start) = capture_base(app.world_mut(), &settings, &registry).unwrap();
        let base = captured.encode().unwrap();
        let base_key =
            store_autosave_record(&store, "stall/", 1000, &base, &settings, meta(), None).unwrap();
        let mut cursor = start.cursor(&base);
        let app = std::cell::RefCell::new(app);
        let mut last_delta_key = None;
        b.compare(
            "snapshot_incremental_stall",
            "ms",
            Better::Lower,
            &format!("(main-thread time of an incremental autosave after 1% of {n} entities changed: capture_delta vs a full capture of the same world; target ratio <= 0.02)"),
            |round| {
                let mut app = app.borrow_mut();
                let world = app.world_mut();
                touch_one_percent(world, &entities, round);
                let t = Instant::now();
                let delta = capture_delta(world, &settings, &registry, &cursor).unwrap();
                let ms = t.elapsed().as_secs_f64() * 1000.0;
                assert_eq!(delta.entity_count(), entities.len().div_ceil(100));
                let step = delta.step();
                let bytes = delta.encode().unwrap();
                cursor = cursor.advance(step, &bytes);
                last_delta_key = Some(
                    store_autosave_record(&store, "stall/", 1000, &bytes, &settings, meta(), Some(&base_key))
                        .unwrap(),
                );
                ms
            },
            |_| {
                let mut app = app.borrow_mut();
                let world = app.world_mut();
                let t = Instant::now();
                let captured = capture(world, &settings, &registry).unwrap();
                let ms = t.elapsed().as_secs_f64() * 1000.0;
                drop(captured);
                ms
            },
        );
        let mut app = app.into_inner();
        if b.wants("snapshot_incremental_bytes") {
            let delta_size = store
                .get_metadata(last_delta_key.as_deref().unwrap())
                .unwrap()
                .unwrap()
                .size;
            let full = capture(app.world_mut(), &settings, &registry)
                .unwrap()
                .encode()
                .unwrap();
            store_snapshot(&store, "full", &full, &settings, meta()).unwrap();
            let full_size = store.get_metadata("full").unwrap().unwrap().size;
            println!(
                "compare snapshot_incremental_bytes ours={delta_size} baseline={full_size} ratio={:.3} unit=bytes better=lower (stored record of an autosave after 1% of {n} entities changed: a delta vs a full snapshot; target ratio <= 0.03)",
                delta_size as f64 / full_size as f64
            );
        }
        snapshot_compaction(b, &mut app, &entities, &store, n);
        snapshot_chain_loads(b, &mut app, &entities, &store, n);
    } else {
        snapshot_compaction(b, &mut app, &entities, &store, n);
        snapshot_chain_loads(b, &mut app, &entities, &store, n);
    }
}

/// A compacting autosave: the main thread captures a delta (1% changed) as for any other,
/// the pool folds the chain's base, its delta and this one into a new base
/// (`store_compacted_autosave`); against a full capture of the same world, which is what a
/// compaction cost on the main thread before.
fn snapshot_compaction(b: &Bench, app: &mut App, entities: &[Entity], store: &Store, n: usize) {
    if !b.wants("snapshot_compaction_stall") {
        return;
    }
    let settings = SnapshotSettings::default().encoding(SnapshotEncoding::Binary);
    let registry = app.world().resource::<SnapshotRegistry>().clone();
    let context = SnapshotContext::from_world(app.world_mut());
    let meta = Default::default;
    let (captured, start) = capture_base(app.world_mut(), &settings, &registry).unwrap();
    let base = captured.encode().unwrap();
    let base_key =
        store_autosave_record(store, "compact/", 3, &base, &settings, meta(), None).unwrap();
    let mut chain: (ChainCursor, String) = (start.cursor(&base), base_key);
    let mut pool_ms = Vec::new();
    let app = std::cell::RefCell::new(app);
    b.compare(
        "snapshot_compaction_stall",
        "ms",
        Better::Lower,
        &format!("(main-thread time of an autosave that compacts its chain after 1% of {n} entities changed: a delta capture, the fold into a new base runs on the pool; vs a full capture of the same world, what a compaction cost before)"),
        |round| {
            let mut app = app.borrow_mut();
            let world = app.world_mut();
            // One delta in the chain before the compacting one.
            touch_one_percent(world, entities, 2 * round);
            let delta = capture_delta(world, &settings, &registry, &chain.0).unwrap();
            let step = delta.step();
            let bytes = delta.encode().unwrap();
            store_autosave_record(store, "compact/", 3, &bytes, &settings, meta(), Some(&chain.1))
                .unwrap();
            chain.0 = chain.0.advance(step, &bytes);
            touch_one_percent(world, entities, 2 * round + 1);
            let t = Instant::now();
            let delta = capture_delta(world, &settings, &registry, &chain.0).unwrap();
            let ms = t.elapsed().as_secs_f64() * 1000.0;
            let step = delta.step();
            let t = Instant::now();
            let bytes = delta.encode().unwrap();
            let (key, base) = store_compacted_autosave(
                store, "compact/", 3, &chain.1, &bytes, &settings, &context, meta(),
            )
            .unwrap();
            pool_ms.push(t.elapsed().as_secs_f64() * 1000.0);
            chain = (ChainCursor::compacted(step, &base), key);
            ms
        },
        |_| {
            let mut app = app.borrow_mut();
            let world = app.world_mut();
            let t = Instant::now();
            let captured = capture(world, &settings, &registry).unwrap();
            let ms = t.elapsed().as_secs_f64() * 1000.0;
            drop(captured);
            ms
        },
    );
    pool_ms.sort_by(f64::total_cmp);
    println!(
        "time snapshot_compaction_pool median={:.1} ms (the compaction's pool side: encode the delta, read the chain, decode and merge it, encode and store the new base; {n} entities)",
        pool_ms[pool_ms.len() / 2]
    );
}

/// What Bevy's own primitives take for the load `snapshot_load_stall` measures, in the same
/// run: despawning the previous load's entities, then spawning the new ones empty and
/// inserting their components by id (what a loader of components known only at run time
/// can do) or spawning them as a bundle known at compile time. `baseline_ms` is the line's
/// baseline, for the ratios.
fn bevy_load_floors(b: &Bench, n: usize, baseline_ms: f64) {
    use bevy::ptr::OwningPtr;
    let mut app = snapshot_app(n);
    let world = app.world_mut();
    let ids = [
        world.register_component::<Persist>(),
        world.register_component::<Position>(),
        world.register_component::<Velocity>(),
        world.register_component::<Unit>(),
    ];
    // Inserts `Persist` and row `i`'s three values into `live[i]` by component id, one
    // `insert_by_ids` an entity (a replace where the entity has them already); returns ms.
    let insert_by_ids =
        |world: &mut World, live: &[Entity], rows: Vec<(Position, Velocity, Unit)>| -> f64 {
            let mut rows: Vec<std::mem::MaybeUninit<_>> =
                rows.into_iter().map(std::mem::MaybeUninit::new).collect();
            let t = Instant::now();
            for (entity, row) in live.iter().zip(&mut rows) {
                let row: *mut (Position, Velocity, Unit) = row.as_mut_ptr();
                // SAFETY: `ids` are this world's ids of `Persist` (zero-sized: a dangling
                // pointer is a valid one) and of the three values, whose pointers follow in
                // that order; each value is initialised and moved into the world once (`rows`
                // holds `MaybeUninit`s, which never drop it again).
                unsafe {
                    let pointers = [
                        OwningPtr::new(std::ptr::NonNull::<Persist>::dangling().cast()),
                        OwningPtr::new(std::ptr::NonNull::from(&mut (*row).0).cast()),
                        OwningPtr::new(std::ptr::NonNull::from(&mut (*row).1).cast()),
                        OwningPtr::new(std::ptr::NonNull::from(&mut (*row).2).cast()),
                    ];
                    world
                        .entity_mut(*entity)
                        .insert_by_ids(&ids, pointers.into_iter());
                }
            }
            t.elapsed().as_secs_f64() * 1000.0
        };
    let values =
        |n: usize| -> Vec<(Position, Velocity, Unit)> { (0..n).map(snapshot_values).collect() };
    let despawn_all = |world: &mut World| -> f64 {
        let old: Vec<Entity> = world
            .query_filtered::<Entity, With<Persist>>()
            .iter(world)
            .collect();
        let t = Instant::now();
        for entity in old.into_iter().rev() {
            world.despawn(entity);
        }
        t.elapsed().as_secs_f64() * 1000.0
    };
    /// Hides an entity from game queries, moving no table row.
    #[derive(Component)]
    #[component(storage = "SparseSet")]
    struct Retired;
    let (mut despawn, mut empty, mut by_id, mut typed) = (vec![], vec![], vec![], vec![]);
    let (mut replace, mut hide) = (vec![], vec![]);
    for round in 0..b.rounds {
        eprint!(
            "\r  snapshot_load_stall floors: round {}/{}   ",
            round + 1,
            b.rounds
        );
        despawn.push(despawn_all(world));
        let t = Instant::now();
        let live: Vec<Entity> = world.spawn_batch(std::iter::repeat_n((), n)).collect();
        empty.push(t.elapsed().as_secs_f64() * 1000.0);
        by_id.push(insert_by_ids(world, &live, values(n)));
        despawn_all(world);
        let rows = values(n);
        let t = Instant::now();
        let live: Vec<Entity> = world
            .spawn_batch(rows.into_iter().map(|(p, v, u)| (Persist, p, v, u)))
            .collect();
        typed.push(t.elapsed().as_secs_f64() * 1000.0);
        // Routes that change what a load means, for the record: replacing the values of
        // entities that already have the components (reusing the old entities), and hiding
        // the old entities behind a sparse marker (despawning them in later frames).
        replace.push(insert_by_ids(world, &live, values(n)));
        let t = Instant::now();
        world.insert_batch(live.iter().map(|entity| (*entity, Retired)));
        hide.push(t.elapsed().as_secs_f64() * 1000.0);
        for entity in &live {
            world.entity_mut(*entity).remove::<Retired>();
        }
    }
    eprintln!();
    let (despawn, empty, by_id, typed) =
        (median(despawn), median(empty), median(by_id), median(typed));
    let (replace, hide) = (median(replace), median(hide));
    println!(
        "parts snapshot_load_stall bevy_despawn={despawn:.3} ms bevy_spawn_empty={empty:.3} ms \
         bevy_insert_by_ids={by_id:.3} ms bevy_spawn_batch_typed={typed:.3} ms \
         runtime_components_floor_ratio={:.3} compile_time_bundle_floor_ratio={:.3} (Bevy's own \
         primitives for the same load of {n} entities, in the same run: despawn the previous \
         load, then spawn empty and insert the 4 components by id, as any loader of components \
         known only at run time must, or spawn one bundle type known at compile time; ratios \
         to the line's baseline)",
        (despawn + empty + by_id) / baseline_ms,
        (despawn + typed) / baseline_ms,
    );
    println!(
        "parts snapshot_load_stall_other_meanings bevy_replace_by_ids={replace:.3} ms \
         bevy_hide_sparse={hide:.3} ms reuse_floor_ratio={:.3} \
         despawn_later_floor_ratio={:.3} despawn_later_bundle_floor_ratio={:.3} (floors of loads \
         that mean something else: writing the saved values into the old entities, which then \
         stand for other saved entities, or hiding the old entities and despawning them in \
         later frames, with runtime components or a compile-time bundle)",
        replace / baseline_ms,
        (hide + empty + by_id) / baseline_ms,
        (hide + typed) / baseline_ms,
    );
}

fn snapshot_chain_loads(b: &Bench, app: &mut App, entities: &[Entity], store: &Store, n: usize) {
    let settings = SnapshotSettings::default().encoding(SnapshotEncoding::Binary);
    let registry = app.world().resource::<SnapshotRegistry>().clone();
    let meta = Default::default;
    if b.wants("snapshot_chain_load_total") {
        // A base and 10 deltas of 1% each, and one full snapshot of the same final world.
        let (captured, start) = capture_base(app.world_mut(), &settings, &registry).unwrap();
        let base = captured.encode().unwrap();
        let base_key =
            store_autosave_record(store, "chain/", 100, &base, &settings, meta(), None).unwrap();
        let mut cursor = start.cursor(&base);
        for round in 0..10 {
            touch_one_percent(app.world_mut(), entities, round);
            let delta = capture_delta(app.world_mut(), &settings, &registry, &cursor).unwrap();
            let step = delta.step();
            let bytes = delta.encode().unwrap();
            cursor = cursor.advance(step, &bytes);
            store_autosave_record(
                store,
                "chain/",
                100,
                &bytes,
                &settings,
                meta(),
                Some(&base_key),
            )
            .unwrap();
        }
        let full = capture(app.world_mut(), &settings, &registry)
            .unwrap()
            .encode()
            .unwrap();
        store_snapshot(store, "final", &full, &settings, meta()).unwrap();
        let mut target_ours = snapshot_app(0);
        let mut target_base = snapshot_app(0);
        let context = SnapshotContext::from_world(target_ours.world_mut());
        b.compare(
            "snapshot_chain_load_total",
            "ms",
            Better::Lower,
            &format!("(read + decode + merge + apply of a base and 10 deltas (1% of {n} entities each) vs read + decode + apply of one full snapshot of the same final world; target ratio <= 1.3)"),
            |_| {
                let t = Instant::now();
                let loaded = load_newest_autosave(store, "chain/", &context).unwrap().unwrap();
                assert!(loaded.skipped.is_empty());
                let map = loaded.world.apply(target_ours.world_mut(), true);
                assert_eq!(map.len(), n);
                t.elapsed().as_secs_f64() * 1000.0
            },
            |_| {
                let t = Instant::now();
                let bytes = read_snapshot(store, "final").unwrap().unwrap();
                let decoded = decode(&bytes, &context).unwrap();
                let map = decoded.apply(target_base.world_mut(), true);
                assert_eq!(map.len(), n);
                t.elapsed().as_secs_f64() * 1000.0
            },
        );
    }
    if b.wants("snapshot_load_stall") {
        let bytes = capture(app.world_mut(), &settings, &registry)
            .unwrap()
            .encode()
            .unwrap();
        let mut target_ours = snapshot_app(0);
        let mut target_base = snapshot_app(0);
        let context = SnapshotContext::from_world(target_ours.world_mut());
        let (_, baseline_ms) = b.compare(
            "snapshot_load_stall",
            "ms",
            Better::Lower,
            &format!("(main-thread time of a load of {n} entities x 3 components: ours DecodedWorld::apply (read and decode run on the pool) vs Bevy's DynamicWorld::write_to_world of the same entities (extracted beforehand), both replacing the previous load's entities; target ratio <= 0.1)"),
            |_| {
                let decoded = decode(&bytes, &context).unwrap();
                let t = Instant::now();
                let map = decoded.apply(target_ours.world_mut(), true);
                let ms = t.elapsed().as_secs_f64() * 1000.0;
                assert_eq!(map.len(), n);
                ms
            },
            |_| {
                let dw = baseline_dynamic_world(app.world_mut());
                let world = target_base.world_mut();
                let old: Vec<Entity> = world
                    .query_filtered::<Entity, With<Persist>>()
                    .iter(world)
                    .collect();
                let t = Instant::now();
                for e in old {
                    world.despawn(e);
                }
                let mut map = EntityHashMap::default();
                dw.write_to_world(world, &mut map).unwrap();
                let ms = t.elapsed().as_secs_f64() * 1000.0;
                assert_eq!(map.len(), n);
                ms
            },
        );
        bevy_load_floors(b, n, baseline_ms);
    }
    if b.wants("snapshot_load_stall_spread") {
        let bytes = capture(app.world_mut(), &settings, &registry)
            .unwrap()
            .encode()
            .unwrap();
        let mut target_ours = snapshot_app(0);
        let mut target_base = snapshot_app(0);
        let context = SnapshotContext::from_world(target_ours.world_mut());
        // `BENCH_SPREAD_PER_FRAME` overrides the slice, to see each stage's cost.
        let per_frame = std::env::var("BENCH_SPREAD_PER_FRAME")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or((n / 10).clamp(1000, 10_000));
        b.compare(
            "snapshot_load_stall_spread",
            "ms",
            Better::Lower,
            &format!("(longest frame of a load of {n} entities x 3 components spread over frames: ours DecodedWorld::spread(max_per_frame = {per_frame}), one step per frame, vs Bevy's DynamicWorld::write_to_world of the same entities in one frame, both replacing the previous load's entities; target ratio <= 0.1)"),
            |round| {
                let decoded = decode(&bytes, &context).unwrap();
                let mut spread = decoded.spread(true, per_frame);
                let mut frames = Vec::new();
                let map = loop {
                    let t = Instant::now();
                    let done = spread.step(target_ours.world_mut());
                    frames.push(t.elapsed().as_secs_f64() * 1000.0);
                    if let Some(map) = done {
                        break map;
                    }
                };
                assert_eq!(map.len(), n);
                if round == 0 || round + 1 == b.rounds {
                    // The first round loads into an empty world, the others replace a load.
                    let shown: Vec<String> = frames.iter().map(|f| format!("{f:.1}")).collect();
                    eprintln!(
                        "\n    round {}: {} frames (ms): {}",
                        round + 1,
                        frames.len(),
                        shown.join(" ")
                    );
                }
                frames.into_iter().fold(0.0, f64::max)
            },
            |_| {
                let dw = baseline_dynamic_world(app.world_mut());
                let world = target_base.world_mut();
                let old: Vec<Entity> = world
                    .query_filtered::<Entity, With<Persist>>()
                    .iter(world)
                    .collect();
                let t = Instant::now();
                for e in old {
                    world.despawn(e);
                }
                let mut map = EntityHashMap::default();
                dw.write_to_world(world, &mut map).unwrap();
                let ms = t.elapsed().as_secs_f64() * 1000.0;
                assert_eq!(map.len(), n);
                ms
            },
        );
    }
}

// ----------------------------------------------------------------- plugin

#[derive(Resource, Default)]
struct Answered(usize);

/// A plain message of the same shape as a save request, for the no-plugin baseline.
#[derive(Message)]
struct PlainMessage {
    #[allow(dead_code)]
    key: String,
    #[allow(dead_code)]
    value: String,
}

/// How many messages the writing system writes in the next frame.
#[derive(Resource, Default)]
struct ToWrite(usize);

fn percentile(mut v: Vec<f64>, p: f64) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[((v.len() - 1) as f64 * p).round() as usize]
}

/// The frame in which a system writes 10,000 save requests, against the same frame writing
/// 10,000 plain messages with no storage plugin; and the frames after it.
fn plugin_dispatch_frame(b: &Bench) {
    if !b.wants("plugin_dispatch_frame") {
        return;
    }
    let requests = 10_000;
    let value = value_200();
    let mut plugin_app = App::new();
    let v = value.clone();
    plugin_app
        .add_plugins((
            MinimalPlugins,
            StoragePlugin::config(StorageConfig::sqlite(b.path("dispatch.db"))),
        ))
        .init_resource::<Answered>()
        .init_resource::<ToWrite>()
        .add_systems(
            Update,
            (
                move |mut n: ResMut<ToWrite>, mut saves: MessageWriter<SaveRequest>| {
                    for i in 0..std::mem::take(&mut n.0) {
                        saves.write(SaveRequest::new(format!("d{i}"), v.clone()));
                    }
                },
                |mut done: MessageReader<SaveCompleted>, mut n: ResMut<Answered>| {
                    n.0 += done.read().count();
                },
            ),
        );
    for _ in 0..20 {
        plugin_app.update(); // let the store open
        std::thread::sleep(Duration::from_millis(5));
    }
    let mut plain_app = App::new();
    let v = value.clone();
    plain_app
        .add_plugins(MinimalPlugins)
        .add_message::<PlainMessage>()
        .init_resource::<ToWrite>()
        .add_systems(
            Update,
            move |mut n: ResMut<ToWrite>, mut out: MessageWriter<PlainMessage>| {
                for i in 0..std::mem::take(&mut n.0) {
                    out.write(PlainMessage {
                        key: format!("d{i}"),
                        value: v.clone(),
                    });
                }
            },
        );
    plain_app.update();
    let mut in_flight = Vec::new();
    b.compare(
        "plugin_dispatch_frame",
        "ms",
        Better::Lower,
        "(app.update() of the frame whose system writes 10000 SaveRequests of 200-byte strings, plugin defaults (SQLite, RON, LZ4, quota, no write batching), vs the same frame writing 10000 plain messages of the same key and value with no storage plugin; target ratio <= 1.5)",
        |_| {
            plugin_app.world_mut().resource_mut::<Answered>().0 = 0;
            plugin_app.world_mut().resource_mut::<ToWrite>().0 = requests;
            let t = Instant::now();
            plugin_app.update();
            let ms = t.elapsed().as_secs_f64() * 1000.0;
            let deadline = Instant::now() + Duration::from_secs(120);
            while plugin_app.world().resource::<Answered>().0 < requests && Instant::now() < deadline {
                let t = Instant::now();
                plugin_app.update();
                in_flight.push(t.elapsed().as_secs_f64() * 1000.0);
            }
            ms
        },
        |_| {
            plain_app.world_mut().resource_mut::<ToWrite>().0 = requests;
            let t = Instant::now();
            plain_app.update();
            t.elapsed().as_secs_f64() * 1000.0
        },
    );
    println!(
        "frames plugin_dispatch_frame in_flight median={:.3} ms p99={:.3} ms max={:.3} ms (the {} frames after the dispatching one until every SaveCompleted arrived, all rounds)",
        percentile(in_flight.clone(), 0.5),
        percentile(in_flight.clone(), 0.99),
        percentile(in_flight.clone(), 1.0),
        in_flight.len()
    );
}

fn plugin_frame(b: &Bench) {
    if !b.wants("plugin_frame") {
        return;
    }
    let requests = 10_000;
    let frames = if b.quick { 30 } else { 100 };
    let mut plugin_app = App::new();
    plugin_app
        .add_plugins((
            MinimalPlugins,
            StoragePlugin::config(StorageConfig::sqlite(b.path("plugin.db")).max_size(None)),
        ))
        .init_resource::<Answered>()
        .add_systems(
            Update,
            |mut done: MessageReader<SaveCompleted>, mut n: ResMut<Answered>| {
                n.0 += done.read().count();
            },
        );
    for _ in 0..20 {
        plugin_app.update(); // let the store open
        std::thread::sleep(Duration::from_millis(5));
    }
    let app = std::cell::RefCell::new(plugin_app);
    let value = value_200();
    b.compare(
        "plugin_frame",
        "us",
        Better::Lower,
        "(median app.update() while 10000 saves are in flight vs an idle frame; target ratio <= 1.2)",
        |round| {
            let mut app = app.borrow_mut();
            app.world_mut().resource_mut::<Answered>().0 = 0;
            for i in 0..requests {
                app.world_mut()
                    .write_message(SaveRequest::new(format!("p{round}:{i}"), value.clone()));
            }
            app.update(); // the frame that dispatches them
            let mut times = Vec::new();
            while times.len() < frames && app.world().resource::<Answered>().0 < requests {
                let t = Instant::now();
                app.update();
                times.push(t.elapsed().as_secs_f64() * 1e6);
            }
            // Let the rest finish before the idle measurement.
            let deadline = Instant::now() + Duration::from_secs(120);
            while app.world().resource::<Answered>().0 < requests && Instant::now() < deadline {
                app.update();
                std::thread::sleep(Duration::from_millis(1));
            }
            median(times)
        },
        |_| {
            let mut app = app.borrow_mut();
            let mut times = Vec::new();
            for _ in 0..frames {
                let t = Instant::now();
                app.update();
                times.push(t.elapsed().as_secs_f64() * 1e6);
            }
            median(times)
        },
    );
}

// ----------------------------------------------------------------- redis

#[cfg(feature = "redis")]
fn redis(b: &Bench) {
    if !["redis_tx", "redis_tx_overwrite", "redis_tx_ttl"]
        .iter()
        .any(|name| b.wants(name))
    {
        return;
    }
    let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let namespace = format!("bench:{}:", std::process::id());
    let store = match Store::open(
        StorageConfig::redis(&url, &namespace)
            .max_size(None)
            .compression(Compression::Off)
            .format(Format::Binary),
    ) {
        Ok(s) => s,
        Err(e) => {
            println!("compare redis_tx skipped: Redis not reachable at {url}: {e}");
            return;
        }
    };
    let value = value_200();
    let batches = if b.quick { 5 } else { 20 };
    // Builds the transactions before the clock starts, as redis-benchmark builds its commands
    // before it sends them, then runs them: the records per second of the transactions.
    let run = |store: &Store, all: Vec<Vec<StorageOperation>>| {
        let n: usize = all.iter().map(Vec::len).sum();
        let t = Instant::now();
        for ops in all {
            store.transaction(ops).unwrap();
        }
        per_sec(n, t.elapsed())
    };
    if b.wants("redis_tx") {
        b.compare(
            "redis_tx",
            "records/s",
            Better::Higher,
            "(transactions of 1000 saves of 200 bytes vs redis-benchmark -q -t set -P 100 -c 1 -d 200 -n 100000)",
            |round| {
                let all = (0..batches)
                    .map(|j| {
                        (0..1000)
                            .map(|i| {
                                StorageOperation::save(format!("r{round}:{j}:{i}"), value.clone())
                            })
                            .collect()
                    })
                    .collect();
                run(&store, all)
            },
            |_| redis_benchmark(&url, None),
        );
    }
    clear(&store, &url, &namespace);
    drop(store);

    // The paths issue 18 names, with the store's defaults (RON, LZ4, the 100 MiB quota).
    let store = Store::open(StorageConfig::redis(&url, &namespace)).expect("open store");
    if b.wants("redis_tx_overwrite") {
        let key = |j: usize, i: usize| format!("o:{j}:{i}");
        // The keys exist before the first round; every round overwrites all of them.
        for j in 0..batches {
            store
                .transaction(
                    (0..1000)
                        .map(|i| StorageOperation::save(key(j, i), value.clone()))
                        .collect(),
                )
                .unwrap();
        }
        b.compare(
            "redis_tx_overwrite",
            "records/s",
            Better::Higher,
            "(transactions of 1000 saves of 200 bytes over existing keys, no TTL, store defaults, vs redis-benchmark -q -t set -P 100 -c 1 -d 200 -n 100000: SET over one existing key)",
            |_| {
                let all = (0..batches)
                    .map(|j| {
                        (0..1000)
                            .map(|i| StorageOperation::save(key(j, i), value.clone()))
                            .collect()
                    })
                    .collect();
                run(&store, all)
            },
            |_| redis_benchmark(&url, None),
        );
    }
    if b.wants("redis_tx_ttl") {
        let ttl = SaveOptions::new().ttl(Duration::from_secs(3600));
        b.compare(
            "redis_tx_ttl",
            "records/s",
            Better::Higher,
            "(transactions of 1000 saves of 200 bytes to new keys with a 1 h TTL, store defaults, vs redis-benchmark -q -P 100 -c 1 -n 100000 -r 1000000000 SET bench_ttl:<pid>:__rand_int__ <200 bytes> EX 3600: new keys with an expiry, removed after each round)",
            |round| {
                let all = (0..batches)
                    .map(|j| {
                        (0..1000)
                            .map(|i| {
                                StorageOperation::save_with(
                                    format!("t{round}:{j}:{i}"),
                                    value.clone(),
                                    ttl.clone(),
                                )
                            })
                            .collect()
                    })
                    .collect();
                run(&store, all)
            },
            |_| {
                let pattern = format!("bench_ttl:{}:", std::process::id());
                let key = format!("{pattern}__rand_int__");
                let rate = redis_benchmark(&url, Some(&["SET", &key, &value, "EX", "3600"]));
                remove_matching(&url, &format!("{pattern}*"));
                rate
            },
        );
    }
    clear(&store, &url, &namespace);
}

/// Removes the bench's records. Should `Store::clear` fail (each of its pages has the store's
/// 3 s bound), the namespace's keys go by hand rather than stay in a shared server. (Clearing
/// after each round instead changes what is measured: Redis shrinks its tables and grows them
/// again in the next round.)
#[cfg(feature = "redis")]
fn clear(store: &Store, url: &str, namespace: &str) {
    if let Err(e) = store.clear() {
        eprintln!("clear: {e}; removing the namespace's keys with SCAN and UNLINK");
        remove_matching(url, &format!("{{{namespace}}}:*"));
    }
}

/// Removes the keys matching `pattern` (the TTL baseline's, so that they neither pile up in a
/// shared server nor slow down the next round's writes).
#[cfg(feature = "redis")]
fn remove_matching(url: &str, pattern: &str) {
    let mut con = redis::Client::open(url)
        .and_then(|c| c.get_connection())
        .expect("connect to Redis");
    let mut cursor: u64 = 0;
    loop {
        let (next, keys): (u64, Vec<Vec<u8>>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(pattern)
            .arg("COUNT")
            .arg(10_000)
            .query(&mut con)
            .expect("SCAN");
        if !keys.is_empty() {
            redis::cmd("UNLINK")
                .arg(&keys)
                .exec(&mut con)
                .expect("UNLINK");
        }
        if next == 0 {
            break;
        }
        cursor = next;
    }
}

/// Requests per second of `redis-benchmark -P 100 -c 1 -n 100000` against the server of `url`:
/// `-t set -d 200` (SET of 200 bytes over one key), or the given command (`-r 1000000000`
/// replaces its `__rand_int__` with a random number of 12 digits).
#[cfg(feature = "redis")]
fn redis_benchmark(url: &str, command: Option<&[&str]>) -> f64 {
    let rest = url.trim_start_matches("redis://");
    let hostport = rest.split('/').next().unwrap_or("127.0.0.1:6379");
    let (host, port) = hostport.rsplit_once(':').unwrap_or((hostport, "6379"));
    let mut args = vec![
        "-h", host, "-p", port, "-q", "-P", "100", "-c", "1", "-n", "100000",
    ];
    match command {
        None => args.extend(["-t", "set", "-d", "200"]),
        Some(command) => {
            args.extend(["-r", "1000000000"]);
            args.extend(command);
        }
    }
    let out = std::process::Command::new("redis-benchmark")
        .args(args)
        .output()
        .expect("redis-benchmark");
    let text = String::from_utf8_lossy(&out.stdout);
    // "SET: 1234567.00 requests per second, p50=..." (possibly after \r progress lines; a
    // custom command's line starts with the command instead)
    text.split(['\r', '\n'])
        .filter_map(|line| line.split_once(" requests per second")?.0.rsplit_once(": "))
        .filter_map(|(_, number)| number.trim().parse::<f64>().ok())
        .next_back()
        .unwrap_or(f64::NAN)
}

#[cfg(not(feature = "redis"))]
fn redis(b: &Bench) {
    if b.wants("redis_tx") && b.filter.is_some() {
        println!("compare redis_tx skipped: build with --features redis");
    }
}

// ----------------------------------------------------------------- PostgreSQL

/// The raw baseline's table: the same columns and key as the backend's, without its
/// namespace counters.
#[cfg(feature = "postgres")]
const PG_RAW_TABLE: &str = "CREATE TABLE IF NOT EXISTS bench_raw_records (
    namespace text COLLATE \"C\" NOT NULL, key text COLLATE \"C\" NOT NULL,
    created_at bigint NOT NULL, modified_at bigint NOT NULL, accessed_at bigint NOT NULL,
    expires_at bigint, size bigint NOT NULL, compressed boolean NOT NULL,
    encrypted boolean NOT NULL, custom text, value bytea NOT NULL,
    PRIMARY KEY (namespace, key))";

#[cfg(feature = "postgres")]
const PG_RAW_UPSERT: &str = "INSERT INTO bench_raw_records VALUES ($1, $2, $3, $3, $3, NULL, $4, \
     false, false, NULL, $5) ON CONFLICT (namespace, key) DO UPDATE SET modified_at = \
     EXCLUDED.modified_at, size = EXCLUDED.size, value = EXCLUDED.value";

#[cfg(feature = "postgres")]
fn postgres(b: &Bench) {
    if !b.wants("postgres") {
        return;
    }
    let url = std::env::var("POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
    let namespace = format!("bench:{}", std::process::id());
    let store = match Store::open(StorageConfig::postgres(&url, &namespace)) {
        Ok(s) => s,
        Err(e) => {
            println!("compare postgres skipped: PostgreSQL not reachable: {e}");
            return;
        }
    };
    let mut raw = postgres::Client::connect(&url, postgres::NoTls).expect("raw client");
    raw.batch_execute(PG_RAW_TABLE).unwrap();
    raw.execute(
        "DELETE FROM bench_raw_records WHERE namespace = $1",
        &[&namespace],
    )
    .unwrap();
    let value = value_200();
    let bytes = value.as_bytes().to_vec();
    let n = if b.quick { 200 } else { 2000 };
    // A game's common save is over a slot that exists: `postgres_overwrite` saves over 50
    // keys, written once here.
    const SLOTS: usize = 50;
    if b.wants("postgres_overwrite") {
        for i in 0..SLOTS {
            let key = format!("o{i}");
            store.save(&key, &value, &SaveOptions::default()).unwrap();
            raw.execute(PG_RAW_UPSERT, &[&namespace, &key, &0i64, &200i64, &bytes])
                .unwrap();
        }
    }
    // `n` single saves to the keys `key(round, i)`, ours against the same upsert prepared on
    // the raw client, each in autocommit.
    let mut single_saves = |name: &str, what: &str, key: &dyn Fn(usize, usize) -> String| {
        if !b.wants(name) {
            return;
        }
        b.compare(
            name,
            "writes/s",
            Better::Higher,
            &format!("(200-byte string {what}, one transaction per write, store defaults: RON, LZ4, 100 MiB quota shared through the namespace counters; baseline: the same upsert with the synchronous postgres crate, autocommit)"),
            |round| {
                let t = Instant::now();
                for i in 0..n {
                    store
                        .save(&key(round, i), &value, &SaveOptions::default())
                        .unwrap();
                }
                per_sec(n, t.elapsed())
            },
            |round| {
                let stmt = raw.prepare(PG_RAW_UPSERT).unwrap();
                let t = Instant::now();
                for i in 0..n {
                    raw.execute(&stmt, &[&namespace, &key(round, i), &0i64, &200i64, &bytes])
                        .unwrap();
                }
                per_sec(n, t.elapsed())
            },
        );
    };
    single_saves("postgres_save", "to a new key", &|round, i| {
        format!("k{}", round * n + i)
    });
    single_saves(
        "postgres_overwrite",
        &format!("over one of {SLOTS} existing keys"),
        &|_, i| format!("o{}", i % SLOTS),
    );
    if b.wants("postgres_load") {
        for i in 0..n {
            store
                .save(&format!("l{i}"), &value, &SaveOptions::default())
                .unwrap();
            raw.execute(
                PG_RAW_UPSERT,
                &[&namespace, &format!("l{i}"), &0i64, &200i64, &bytes],
            )
            .unwrap();
        }
        b.compare(
            "postgres_load",
            "reads/s",
            Better::Higher,
            "(200-byte string, store defaults; baseline: the same point SELECT with the synchronous postgres crate)",
            |_| {
                let t = Instant::now();
                for i in 0..n {
                    let v: Option<String> =
                        store.load(&format!("l{i}"), &LoadOptions::default()).unwrap();
                    assert!(v.is_some());
                }
                per_sec(n, t.elapsed())
            },
            |_| {
                let stmt = raw
                    .prepare(
                        "SELECT value, expires_at FROM bench_raw_records \
                         WHERE namespace = $1 AND key = $2",
                    )
                    .unwrap();
                let t = Instant::now();
                for i in 0..n {
                    let row = raw
                        .query_opt(&stmt, &[&namespace, &format!("l{i}")])
                        .unwrap();
                    assert!(row.is_some());
                }
                per_sec(n, t.elapsed())
            },
        );
    }
    if b.wants("postgres_tx") {
        let batches = if b.quick { 2 } else { 10 };
        b.compare(
            "postgres_tx",
            "records/s",
            Better::Higher,
            "(transactions of 1000 saves of 200-byte strings, store defaults; baseline: 1000 upserts in one transaction with the synchronous postgres crate)",
            |round| {
                let all: Vec<Vec<StorageOperation>> = (0..batches)
                    .map(|j| {
                        (0..1000)
                            .map(|i| StorageOperation::save(format!("t{round}:{j}:{i}"), value.clone()))
                            .collect()
                    })
                    .collect();
                let t = Instant::now();
                for ops in all {
                    store.transaction(ops).unwrap();
                }
                per_sec(1000 * batches, t.elapsed())
            },
            |round| {
                let t = Instant::now();
                for j in 0..batches {
                    let mut tx = raw.transaction().unwrap();
                    let stmt = tx.prepare(PG_RAW_UPSERT).unwrap();
                    for i in 0..1000 {
                        let key = format!("t{round}:{j}:{i}");
                        tx.execute(&stmt, &[&namespace, &key, &0i64, &200i64, &bytes])
                            .unwrap();
                    }
                    tx.commit().unwrap();
                }
                per_sec(1000 * batches, t.elapsed())
            },
        );
    }
    store.clear().unwrap();
    raw.execute(
        "DELETE FROM bench_raw_records WHERE namespace = $1",
        &[&namespace],
    )
    .unwrap();
}

#[cfg(not(feature = "postgres"))]
fn postgres(b: &Bench) {
    if b.wants("postgres") && b.filter.is_some() {
        println!("compare postgres skipped: build with --features postgres");
    }
}
