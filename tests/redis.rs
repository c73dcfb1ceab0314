//! The Redis backend against real servers: namespaces, sharing, Redis's own expiry, the
//! bookkeeping, connection strings, and an outage of a server this test starts itself.
//!
//! The shared server is `REDIS_URL` (default `redis://127.0.0.1:6379`); every test uses
//! namespaces of its own and removes them. Under `CI=true` a missing Redis fails these tests;
//! locally they say loudly that they were skipped.
#![cfg(feature = "redis")]

mod common;

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use bevy_storage::StorageOperation;
use bevy_storage::backend::{
    Backend, PutMode, Record, RecordMeta, RedisBackend, RedisOptions, Usage, WriteOp,
};
use bevy_storage::clock::Timestamp;
use bevy_storage::prelude::*;
use bevy_storage::{BackendConfig, CustomMetadata, RecordVersion};
use common::{RedisNamespace, check_redis, redis_kind, redis_url, under_ci};

/// Skips (locally) or fails (under CI) the test when the shared Redis is missing.
macro_rules! require_redis {
    () => {
        if redis_kind().is_none() {
            return;
        }
    };
}

fn store(ns: &RedisNamespace) -> Store {
    Store::open(StorageConfig::redis(&ns.url, &ns.namespace)).unwrap()
}

fn raw(url: &str) -> redis::Connection {
    redis::Client::open(url)
        .unwrap()
        .get_connection_with_timeout(Duration::from_secs(2))
        .unwrap()
}

fn load<T: serde::de::DeserializeOwned>(store: &Store, key: &str) -> Option<T> {
    store.load(key, &LoadOptions::default()).unwrap()
}

fn save<T: serde::Serialize>(store: &Store, key: &str, value: &T) {
    store.save(key, value, &SaveOptions::default()).unwrap();
}

fn record(value: &[u8], now: Timestamp, expires_at: Option<Timestamp>) -> Record {
    Record {
        value: value.to_vec(),
        meta: RecordMeta {
            created_at: now,
            modified_at: now,
            accessed_at: now,
            expires_at,
            size: value.len() as u64,
            compressed: false,
            encrypted: false,
            custom: CustomMetadata::new(),
            version: bevy_storage::RecordVersion::fresh(),
        },
    }
}

/// A record string of key layout 3 as Redis holds it (see the Redis backend's module docs).
struct RawRecord {
    created_at: i64,
    expires_at: i64,
    size: u64,
    accessed_at: i64,
    version: u8,
    record_version: u64,
    custom: Vec<u8>,
}

fn raw_record(con: &mut redis::Connection, record_key: &str) -> RawRecord {
    let bytes: Vec<u8> = redis::cmd("GET").arg(record_key).query(con).unwrap();
    assert!(bytes.len() >= 50, "{record_key}: {bytes:?}");
    let i64_at = |at: usize| i64::from_le_bytes(bytes[at..at + 8].try_into().unwrap());
    let u32_at = |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
    let (size, custom_len) = (u32_at(16), u32_at(20));
    assert_eq!(bytes.len(), 50 + custom_len + size, "{record_key}");
    RawRecord {
        created_at: i64_at(0),
        expires_at: i64_at(8),
        size: size as u64,
        accessed_at: i64_at(32),
        version: bytes[41],
        record_version: i64_at(42) as u64,
        custom: bytes[50..50 + custom_len].to_vec(),
    }
}

#[test]
fn namespaces_are_isolated_even_when_one_prefixes_another() {
    require_redis!();
    let a = RedisNamespace::fresh();
    // `{ns}` delimits a namespace: `X` and `X:r` (whose keys would otherwise start with X's
    // record prefix `X:r:`) never see each other, and glob characters stay literal.
    let b = RedisNamespace {
        url: a.url.clone(),
        namespace: format!("{}:r", a.namespace),
    };
    let c = RedisNamespace {
        url: a.url.clone(),
        namespace: format!("{}*", a.namespace),
    };
    let stores = [store(&a), store(&b), store(&c)];
    for (i, s) in stores.iter().enumerate() {
        for key in ["player:1", "player:2", "r:x"] {
            save(s, key, &format!("{key} in store {i}"));
        }
        save(s, &format!("only:{i}"), &i);
    }
    for (i, s) in stores.iter().enumerate() {
        assert_eq!(
            s.list_keys("").unwrap(),
            [
                format!("only:{i}"),
                "player:1".into(),
                "player:2".into(),
                "r:x".into()
            ]
        );
        assert_eq!(
            load::<String>(s, "player:1").unwrap(),
            format!("player:1 in store {i}")
        );
        assert_eq!(s.get_stats().item_count, 4);
    }
    // A key outside every namespace survives clear().
    let mut con = raw(&a.url);
    let foreign = format!("{}:foreign", a.namespace);
    redis::cmd("SET")
        .arg(&foreign)
        .arg("keep me")
        .query::<()>(&mut con)
        .unwrap();

    stores[0].clear().unwrap();
    assert!(stores[0].list_keys("").unwrap().is_empty());
    assert!(
        a.keys().is_empty(),
        "clear leaves nothing behind: {:?}",
        a.keys()
    );
    for (i, s) in stores.iter().enumerate().skip(1) {
        assert_eq!(s.list_keys("").unwrap().len(), 4, "store {i} untouched");
        assert_eq!(s.get_stats().item_count, 4);
    }
    let kept: Option<String> = redis::cmd("GET").arg(&foreign).query(&mut con).unwrap();
    assert_eq!(kept.as_deref(), Some("keep me"));
    redis::cmd("DEL")
        .arg(&foreign)
        .query::<()>(&mut con)
        .unwrap();
}

#[test]
fn stores_sharing_a_namespace_see_each_others_writes() {
    require_redis!();
    let ns = RedisNamespace::fresh();
    // Two game servers: two stores, two connection pools, one namespace.
    let eu = store(&ns);
    let us = store(&ns);
    save(&eu, "player:ada", &120u32);
    assert_eq!(load::<u32>(&us, "player:ada"), Some(120));
    us.transaction(vec![
        StorageOperation::save("player:ada", 90u32),
        StorageOperation::save("player:bob", 30u32),
    ])
    .unwrap();
    assert_eq!(load::<u32>(&eu, "player:ada"), Some(90));
    assert_eq!(
        eu.list_keys("player:").unwrap(),
        ["player:ada", "player:bob"]
    );
    let meta_eu = eu.get_metadata("player:ada").unwrap().unwrap();
    let meta_us = us.get_metadata("player:ada").unwrap().unwrap();
    assert_eq!(meta_eu, meta_us);
    assert!(eu.delete("player:bob").unwrap());
    assert!(!us.exists("player:bob").unwrap());
    assert!(!us.delete("player:bob").unwrap(), "already gone");
    assert_eq!(eu.get_stats().item_count, 1);
    assert_eq!(us.get_stats().item_count, 1);
    assert_eq!(eu.get_stats().total_size, us.get_stats().total_size);

    // A create-only save raced from both servers: exactly one wins per key.
    for round in 0..5 {
        let key = format!("guild:{round}");
        let winners: usize = thread::scope(|s| {
            let handles: Vec<_> = (0..8)
                .map(|i| {
                    let store = if i % 2 == 0 { eu.clone() } else { us.clone() };
                    let key = key.clone();
                    s.spawn(move || {
                        match store.save(&key, &i, &SaveOptions::new().overwrite(false)) {
                            Ok(_) => 1,
                            Err(StorageError::AlreadyExists { .. }) => 0,
                            Err(e) => panic!("{e}"),
                        }
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).sum()
        });
        assert_eq!(winners, 1, "round {round}");
    }
    eu.clear().unwrap();
    assert!(us.list_keys("").unwrap().is_empty());
    assert!(ns.keys().is_empty(), "{:?}", ns.keys());
}

#[test]
fn records_expire_in_redis_by_themselves() {
    require_redis!();
    let ns = RedisNamespace::fresh();
    let s = store(&ns);
    let ttl = SaveOptions::new()
        .ttl(Duration::from_millis(400))
        .metadata("kind", "session");
    s.save("session:1", &"token", &ttl).unwrap();
    save(&s, "forever", &1);
    let mut con = raw(&ns.url);
    let record_key = ns.record_key("session:1");
    let pttl: i64 = redis::cmd("PTTL").arg(&record_key).query(&mut con).unwrap();
    assert!(0 < pttl && pttl <= 400, "PTTL {pttl}");
    // Value and metadata are one string (key layout 3), so they expire together.
    let kind: String = redis::cmd("TYPE").arg(&record_key).query(&mut con).unwrap();
    assert_eq!(kind, "string");
    let stored = raw_record(&mut con, &record_key);
    assert_eq!(stored.version, 3, "key layout version");
    let meta = s.backend().get_meta("session:1").unwrap().unwrap();
    assert_eq!(RecordVersion(stored.record_version), meta.version);
    assert_eq!(stored.expires_at, meta.expires_at.unwrap().0);
    assert_eq!(stored.created_at, meta.created_at.0);
    assert_eq!(stored.accessed_at, meta.accessed_at.0);
    assert_eq!(stored.size, meta.size);
    assert_eq!(
        serde_json::from_slice::<CustomMetadata>(&stored.custom).unwrap(),
        meta.custom
    );
    assert_eq!(meta.custom["kind"], "session");
    assert_eq!(s.get_stats().item_count, 2);
    // A touch rewrites the access time in place and keeps the expiry.
    let later = Timestamp(meta.accessed_at.0 + 7);
    s.backend().touch("session:1", later).unwrap();
    assert_eq!(raw_record(&mut con, &record_key).accessed_at, later.0);
    let pttl: i64 = redis::cmd("PTTL").arg(&record_key).query(&mut con).unwrap();
    assert!(0 < pttl && pttl <= 400, "PTTL {pttl} after a touch");
    // Touching a missing key creates nothing.
    s.backend().touch("nobody", later).unwrap();
    assert!(!s.exists("nobody").unwrap());

    thread::sleep(Duration::from_millis(600));
    let exists: bool = redis::cmd("EXISTS")
        .arg(&record_key)
        .query(&mut con)
        .unwrap();
    assert!(!exists, "Redis removed the record without any cleanup");
    assert_eq!(load::<String>(&s, "session:1"), None);
    assert_eq!(s.list_keys("").unwrap(), ["forever"]);
    assert_eq!(s.get_stats().item_count, 1);
    assert_eq!(
        s.purge_expired().unwrap(),
        0,
        "nothing left for purge to remove"
    );
    // The expiry index forgot it too: only the counters and the live record are left.
    let mut left = ns.keys();
    left.sort();
    assert_eq!(left, [ns.record_key("forever"), ns.redis_key("usage")]);
}

/// A small deterministic generator (xorshift64): no dependency, same run every time.
struct XorShift(u64);

impl XorShift {
    /// The next number below `n`.
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

/// Count and bytes of the records live at `now`, from a full listing.
fn recount(b: &RedisBackend, now: Timestamp) -> (u64, u64) {
    let live: Vec<_> = b
        .scan("")
        .unwrap()
        .into_iter()
        .filter(|e| !now.is_past(e.expires_at))
        .collect();
    (live.len() as u64, live.iter().map(|e| e.size).sum::<u64>())
}

/// Checks the bookkeeping of the namespace against its records in one step (a script, so
/// nothing expires or changes in between): the counters hold the count and value bytes of the
/// records without expiry, and every record with an expiry has Redis's expiry at that time
/// and an entry of the expiry index scored by it; every record key holds a record.
fn assert_bookkeeping_exact(ns: &RedisNamespace, con: &mut redis::Connection, what: &str) {
    const CHECK: &str = r"
        local u = redis.call('HMGET', KEYS[1], 'n', 'b')
        local n, b, problems = 0, 0, {}
        for _, k in ipairs(redis.call('KEYS', ARGV[1])) do
          local v = redis.call('GET', k)
          local at = redis.call('PEXPIRETIME', k)
          if #v < 50 or string.byte(v, 42) ~= 3 then
            problems[#problems + 1] = k .. ' holds ' .. #v .. ' bytes, not a record'
          else
            local e, size = struct.unpack('<i8I4', v, 9)
            if e == 0 then
              n, b = n + 1, b + size
              if at ~= -1 then problems[#problems + 1] = k .. ': no expiry, TTL ' .. at end
            else
              local score = redis.call('ZSCORE', KEYS[2], string.sub(k, #ARGV[2] + 1))
              if at ~= e then problems[#problems + 1] = k .. ': expiry ' .. e .. ', TTL ' .. at end
              if tonumber(score) ~= e then
                problems[#problems + 1] = k .. ': expiry ' .. e .. ', indexed ' .. tostring(score)
              end
            end
          end
        end
        return {tonumber(u[1] or 0), tonumber(u[2] or 0), n, b, table.concat(problems, '; ')}
    ";
    let (counted_n, counted_b, n, b, problems): (u64, u64, u64, u64, String) =
        redis::Script::new(CHECK)
            .key(ns.redis_key("usage"))
            .key(ns.redis_key("expiry"))
            .arg(format!(
                "{}*",
                ns.record_key("").replace(['*', '?', '[', ']', '\\'], "?")
            ))
            .arg(ns.record_key(""))
            .invoke(con)
            .unwrap();
    assert_eq!(
        (counted_n, counted_b),
        (n, b),
        "{what}: the counters against the records without expiry"
    );
    assert!(problems.is_empty(), "{what}: {problems}");
}

/// Redis's clock, in ms since the epoch.
fn redis_time(con: &mut redis::Connection) -> i64 {
    let (secs, micros): (i64, i64) = redis::cmd("TIME").query(con).unwrap();
    secs * 1000 + micros / 1000
}

/// The backend's usage at `now` and a full recount at `now`, read while no record can expire:
/// `Some((usage, recount))`, or `None` when the expiry index holds an entry between Redis's
/// clock before the two reads and after them. Redis removes a record when its own clock
/// passes the expiry, so a record that expires between the usage script and the listing is
/// counted by the first and not by the second, however exact the bookkeeping: the two reads
/// are not one snapshot, and a retry right away can meet the next such record. Every record
/// with an expiry has its entry, scored by that expiry (stale entries only make a try count
/// as unquiet), and nothing here removes entries.
#[allow(clippy::type_complexity)]
fn quiet_usage_and_recount(
    b: &RedisBackend,
    ns: &RedisNamespace,
    con: &mut redis::Connection,
    now: Timestamp,
) -> Option<((u64, u64), (u64, u64))> {
    let before = redis_time(con);
    let usage = b.usage(now).unwrap();
    let counted = recount(b, now);
    let after = redis_time(con);
    let expiring: u64 = redis::cmd("ZCOUNT")
        .arg(ns.redis_key("expiry"))
        .arg(before - 1)
        .arg(after + 1)
        .query(con)
        .unwrap();
    (expiring == 0).then_some(((usage.item_count, usage.total_size), counted))
}

/// Checks that the usage at `now` matches a full recount, on the first try during which no
/// record could expire (within 5 s).
fn assert_usage_matches_recount(
    b: &RedisBackend,
    ns: &RedisNamespace,
    con: &mut redis::Connection,
    now: Timestamp,
    what: &str,
) {
    let give_up = Instant::now() + Duration::from_secs(5);
    loop {
        if let Some((usage, counted)) = quiet_usage_and_recount(b, ns, con, now) {
            assert_eq!(usage, counted, "{what}: usage vs recount");
            return;
        }
        assert!(
            Instant::now() < give_up,
            "{what}: records kept expiring during every try"
        );
        thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn bookkeeping_matches_a_full_recount() {
    require_redis!();
    let ns = RedisNamespace::fresh();
    let b = RedisBackend::open(&ns.url, &ns.namespace, &RedisOptions::default()).unwrap();
    let mut con = raw(&ns.url);
    let mut rng = XorShift(0x2545_f491_4f6c_dd1d);
    let mut next = |n: u64| rng.below(n);
    let start = Timestamp::now();
    let (mut applied, mut refused) = (0, 0);
    for step in 0..400 {
        let now = Timestamp(start.0 + step);
        // Batches of one to six operations over few keys: records with and without expiry
        // overwrite each other, keys repeat within a batch, deletes and create-only puts mix in.
        let mut ops = Vec::new();
        for _ in 0..=next(6) {
            let key = format!("k{}", next(24));
            if next(5) == 0 {
                ops.push(WriteOp::Delete { key });
                continue;
            }
            let value = vec![b'x'; next(64) as usize];
            let expires_at = match next(6) {
                0 => Some(Timestamp(now.0 - 10_000)), // already past by Redis's clock too
                1 => Some(Timestamp(now.0 + 50)),     // Redis expires it during the run
                2 => Some(Timestamp(now.0 + 200)),    // expired by `now` later, still in Redis
                3 => Some(Timestamp(now.0 + 600_000)), // outlives the run
                _ => None,
            };
            let mode = if next(5) == 0 {
                PutMode::CreateOnly
            } else {
                PutMode::Upsert
            };
            ops.push(WriteOp::Put {
                key,
                record: record(&value, now, expires_at),
                mode,
            });
        }
        match b.write(ops, now) {
            Ok(_) => applied += 1,
            Err(StorageError::AlreadyExists { .. }) => refused += 1,
            Err(e) => panic!("{e}"),
        }
        if step % 97 == 0 {
            b.purge_expired(now).unwrap();
        }
        if step % 20 == 0 {
            thread::sleep(Duration::from_millis(30));
        }
        // The bookkeeping itself, in one step; then usage against a listing: Redis may expire
        // a record between the two reads, so they are compared when none could.
        assert_bookkeeping_exact(&ns, &mut con, &format!("step {step}"));
        assert_usage_matches_recount(&b, &ns, &mut con, now, &format!("step {step}"));
    }
    assert!(
        applied > 100 && refused > 20,
        "{applied} applied, {refused} refused"
    );
    b.clear().unwrap();
    assert_eq!(b.usage(Timestamp::now()).unwrap().item_count, 0);
    assert!(ns.keys().is_empty(), "{:?}", ns.keys());
}

/// Usage and a full recount compared while records expire one per millisecond, by Redis's
/// clock, and all of them are live by the store's `now` (the records Redis removes are gone
/// for both). The bookkeeping is exact throughout, but two reads are not one snapshot: three
/// tries in a row, as `bookkeeping_matches_a_full_recount` once compared, each met a record
/// expiring between the usage script and the listing (usage one record above the recount,
/// the cold CI failure). Compared only during tries when no record could expire, they agree;
/// once every record has expired, the entries they left in the expiry index count for nothing.
#[test]
fn usage_matches_a_recount_while_records_expire_every_millisecond() {
    require_redis!();
    let ns = RedisNamespace::fresh();
    let b = RedisBackend::open(&ns.url, &ns.namespace, &RedisOptions::default()).unwrap();
    let mut con = raw(&ns.url);
    let start = Timestamp::now();
    let n: i64 = 300;
    let ops: Vec<WriteOp> = (0..n)
        .map(|i| WriteOp::Put {
            key: format!("k{i}"),
            record: record(
                &vec![b'x'; 1 + i as usize % 50],
                start,
                Some(Timestamp(start.0 + 30 + i)),
            ),
            mode: PutMode::Upsert,
        })
        .chain([WriteOp::Put {
            key: "forever".into(),
            record: record(b"kept", start, None),
            mode: PutMode::Upsert,
        }])
        .collect();
    b.write(ops, start).unwrap();
    let (mut quiet, mut unquiet) = (0, 0);
    while Timestamp::now().0 < start.0 + 30 + n + 20 {
        match quiet_usage_and_recount(&b, &ns, &mut con, start) {
            Some((usage, counted)) => {
                assert_eq!(usage, counted, "usage vs recount");
                quiet += 1;
            }
            None => unquiet += 1,
        }
    }
    assert!(quiet + unquiet > 0);
    assert_usage_matches_recount(&b, &ns, &mut con, start, "after every expiry");
    let usage = b.usage(start).unwrap();
    assert_eq!((usage.item_count, usage.total_size), (1, 4));
    b.clear().unwrap();
    assert!(ns.keys().is_empty(), "{:?}", ns.keys());
}

/// Several stores writing one namespace at once, with batches that take the native path
/// (new keys), batches that find their keys taken and fall back to the script, and batches
/// that always take it (expiries, deletes, repeated keys): every batch is all or nothing and
/// the counters still match a full recount.
#[test]
fn concurrent_native_and_script_batches_keep_the_counters_exact() {
    require_redis!();
    let ns = RedisNamespace::fresh();
    let stores: Vec<Arc<RedisBackend>> = (0..4)
        .map(|_| {
            Arc::new(RedisBackend::open(&ns.url, &ns.namespace, &RedisOptions::default()).unwrap())
        })
        .collect();
    let start = Timestamp::now();
    let workers: Vec<_> = stores
        .iter()
        .enumerate()
        .map(|(w, b)| {
            let b = Arc::clone(b);
            thread::spawn(move || {
                let mut rng = XorShift(0x9e37_79b9_7f4a_7c15 ^ (w as u64 + 1));
                let mut next = |n: u64| rng.below(n);
                let mut refused = 0;
                for step in 0..150 {
                    let now = Timestamp(start.0 + step);
                    // Keys shared by every worker, so batches collide: on even steps keys new
                    // to the store (the native path, unless another worker got there first),
                    // on odd steps a mix over 40 keys.
                    let ops: Vec<WriteOp> = (0..1 + next(8))
                        .map(|i| {
                            if step % 2 == 0 {
                                // Some with an expiry: the native path sets it too.
                                let expires_at =
                                    (next(4) == 0).then_some(Timestamp(now.0 + 600_000));
                                return WriteOp::Put {
                                    key: format!("f{step}:{i}"),
                                    record: record(&vec![b'n'; 1 + i as usize], now, expires_at),
                                    mode: if next(3) == 0 {
                                        PutMode::CreateOnly
                                    } else {
                                        PutMode::Upsert
                                    },
                                };
                            }
                            let key = format!("k{}", next(40));
                            match next(10) {
                                0 => WriteOp::Delete { key },
                                1 => WriteOp::Put {
                                    key,
                                    record: record(
                                        b"expiring",
                                        now,
                                        Some(Timestamp(now.0 + 600_000)),
                                    ),
                                    mode: PutMode::Upsert,
                                },
                                n => WriteOp::Put {
                                    key,
                                    record: record(&vec![b'v'; next(50) as usize], now, None),
                                    mode: if n < 4 {
                                        PutMode::CreateOnly
                                    } else {
                                        PutMode::Upsert
                                    },
                                },
                            }
                        })
                        .collect();
                    match b.write(ops, now) {
                        Ok(_) => {}
                        Err(StorageError::AlreadyExists { .. }) => refused += 1,
                        Err(e) => panic!("worker {w}: {e}"),
                    }
                }
                refused
            })
        })
        .collect();
    let refused: usize = workers.into_iter().map(|w| w.join().unwrap()).sum();
    assert!(refused > 0, "create-only puts met taken keys");
    let b = &stores[0];
    let now = Timestamp(start.0 + 150);
    let usage = b.usage(now).unwrap();
    assert_eq!((usage.item_count, usage.total_size), recount(b, now));
    let mut con = raw(&ns.url);
    let token: bool = redis::cmd("EXISTS")
        .arg(ns.redis_key("batch"))
        .query(&mut con)
        .unwrap();
    assert!(!token, "the batch token never outlives its transaction");
    assert_bookkeeping_exact(&ns, &mut con, "after the concurrent batches");
    b.clear().unwrap();
    assert!(ns.keys().is_empty(), "{:?}", ns.keys());
}

#[test]
fn batches_keep_created_at_and_report_previous_sizes() {
    require_redis!();
    let ns = RedisNamespace::fresh();
    let b = RedisBackend::open(&ns.url, &ns.namespace, &RedisOptions::default()).unwrap();
    let mut con = raw(&ns.url);
    let expiry_count = |con: &mut redis::Connection| -> u64 {
        redis::cmd("ZCARD")
            .arg(ns.redis_key("expiry"))
            .query(con)
            .unwrap()
    };
    let put =
        |key: &str, size: usize, now: Timestamp, expires_at: Option<Timestamp>| WriteOp::Put {
            key: key.into(),
            record: record(&vec![b'v'; size], now, expires_at),
            mode: PutMode::Upsert,
        };
    let previous = |ops: Vec<WriteOp>, now: Timestamp| -> Vec<Option<u64>> {
        b.write(ops, now)
            .unwrap()
            .into_iter()
            .map(|o| o.previous_size)
            .collect()
    };
    let t0 = Timestamp::now();
    let at = |ms: i64| Timestamp(t0.0 + ms);
    let in_a_minute = |t: Timestamp| Some(Timestamp(t.0 + 60_000));

    assert_eq!(previous(vec![put("a", 3, t0, None)], t0), [None]);
    // Without expiry, then with, then without again: created_at stays, the size follows.
    assert_eq!(
        previous(
            vec![
                put("a", 5, at(1), in_a_minute(at(1))),
                put("a", 7, at(1), None)
            ],
            at(1)
        ),
        [Some(3), Some(5)]
    );
    let meta = b.get_meta("a").unwrap().unwrap();
    assert_eq!((meta.created_at, meta.modified_at), (t0, at(1)));
    assert_eq!((meta.size, meta.expires_at), (7, None));
    let pttl: i64 = redis::cmd("PTTL")
        .arg(ns.record_key("a"))
        .query(&mut con)
        .unwrap();
    assert_eq!(pttl, -1, "no expiry left on the record");
    assert_eq!(expiry_count(&mut con), 0);

    assert_eq!(
        previous(vec![put("a", 4, at(2), in_a_minute(at(2)))], at(2)),
        [Some(7)]
    );
    let meta = b.get_meta("a").unwrap().unwrap();
    assert_eq!((meta.created_at, meta.size), (t0, 4));
    assert_eq!(meta.expires_at, in_a_minute(at(2)));
    let pttl: i64 = redis::cmd("PTTL")
        .arg(ns.record_key("a"))
        .query(&mut con)
        .unwrap();
    // `at(2)` may be a little ahead of Redis's clock.
    assert!(50_000 < pttl && pttl <= 60_002, "PTTL {pttl}");
    assert_eq!(expiry_count(&mut con), 1);
    assert_eq!(
        b.usage(at(2)).unwrap(),
        Usage {
            item_count: 1,
            total_size: 4
        }
    );

    // A delete in between: the record written after it is new.
    assert_eq!(
        previous(
            vec![
                WriteOp::Delete { key: "a".into() },
                put("a", 2, at(3), None)
            ],
            at(3)
        ),
        [Some(4), None]
    );
    assert_eq!(b.get_meta("a").unwrap().unwrap().created_at, at(3));
    assert_eq!(expiry_count(&mut con), 0);
    assert_eq!(
        b.usage(at(3)).unwrap(),
        Usage {
            item_count: 1,
            total_size: 2
        }
    );

    // New keys around an existing one: the existing record is found, and keeps its created_at.
    assert_eq!(
        previous(
            vec![
                put("n1", 1, at(4), None),
                put("a", 6, at(4), None),
                put("n2", 1, at(4), None)
            ],
            at(4)
        ),
        [None, Some(2), None]
    );
    assert_eq!(b.get_meta("a").unwrap().unwrap().created_at, at(3));
    assert_eq!(b.get_meta("n2").unwrap().unwrap().created_at, at(4));
    assert_eq!(
        previous(
            vec![
                WriteOp::Delete { key: "n1".into() },
                WriteOp::Delete { key: "n2".into() }
            ],
            at(4)
        ),
        [Some(1), Some(1)]
    );
    assert_eq!(
        b.usage(at(4)).unwrap(),
        Usage {
            item_count: 1,
            total_size: 6
        }
    );

    // Expired by `now` but still in Redis: absent for the size, create-only and created_at.
    assert_eq!(
        previous(vec![put("b", 9, at(4), Some(at(50_000)))], at(4)),
        [None]
    );
    let create = WriteOp::Put {
        key: "b".into(),
        record: record(b"new", at(60_000), None),
        mode: PutMode::CreateOnly,
    };
    assert_eq!(previous(vec![create], at(60_000)), [None]);
    assert_eq!(b.get_meta("b").unwrap().unwrap().created_at, at(60_000));

    // Already past by Redis's clock: not stored at all, and what it replaced is gone.
    let past = Some(Timestamp(t0.0 - 10_000));
    assert_eq!(
        previous(vec![put("b", 5, at(60_001), past)], at(60_001)),
        [Some(3)]
    );
    assert_eq!(b.get("b").unwrap(), None);
    let exists: bool = redis::cmd("EXISTS")
        .arg(ns.record_key("b"))
        .query(&mut con)
        .unwrap();
    assert!(!exists);
    assert_eq!(
        b.usage(at(60_001)).unwrap(),
        Usage {
            item_count: 1,
            total_size: 6
        }
    );

    // Long custom metadata (past what get_meta reads ahead) round-trips.
    let mut long = record(b"value", at(60_002), None);
    long.meta
        .custom
        .insert("blob".into(), "m".repeat(5000).into());
    long.meta.compressed = true;
    b.write(
        vec![WriteOp::Put {
            key: "c".into(),
            record: long.clone(),
            mode: PutMode::Upsert,
        }],
        at(60_002),
    )
    .unwrap();
    assert_eq!(b.get_meta("c").unwrap().unwrap(), long.meta);
    assert_eq!(b.get("c").unwrap().unwrap(), long);
    assert_eq!(
        b.get_value("c").unwrap().unwrap(),
        (b"value".to_vec(), None)
    );

    b.clear().unwrap();
    assert!(ns.keys().is_empty(), "{:?}", ns.keys());
}

/// Records of key layout 2, written before records had versions (a 42-byte header without
/// the version), keep working: they load, list, count and expire as before, read as version 0,
/// and a save conditional on version 0 replaces them with a layout-3 record.
#[test]
fn layout_2_records_read_as_version_0_and_take_conditional_saves() {
    require_redis!();
    let ns = RedisNamespace::fresh();
    let s = store(&ns);
    let mut con = raw(&ns.url);
    s.save("old", &"from an older build", &SaveOptions::default())
        .unwrap();
    s.save(
        "lease",
        &1u32,
        &SaveOptions::new().ttl(Duration::from_secs(60)),
    )
    .unwrap();
    // Rewrite both as the previous build stored them: layout byte 2, no version field.
    for key in ["old", "lease"] {
        let rkey = ns.record_key(key);
        let layout3: Vec<u8> = redis::cmd("GET").arg(&rkey).query(&mut con).unwrap();
        assert_eq!(layout3[41], 3, "this build writes key layout 3");
        let mut layout2 = layout3[..42].to_vec();
        layout2[41] = 2;
        layout2.extend_from_slice(&layout3[50..]);
        let ttl: i64 = redis::cmd("PTTL").arg(&rkey).query(&mut con).unwrap();
        let mut set = redis::cmd("SET");
        set.arg(&rkey).arg(layout2);
        if ttl > 0 {
            set.arg("PX").arg(ttl);
        }
        set.query::<()>(&mut con).unwrap();
    }
    let before = s.get_stats();
    assert_eq!(
        load::<String>(&s, "old").as_deref(),
        Some("from an older build")
    );
    assert_eq!(load::<u32>(&s, "lease"), Some(1));
    for key in ["old", "lease"] {
        assert_eq!(
            s.get_metadata(key).unwrap().unwrap().version,
            RecordVersion(0)
        );
    }
    assert_eq!(s.list_keys("").unwrap(), ["lease", "old"]);
    match s.save(
        "old",
        &"stale",
        &SaveOptions::new().if_version(RecordVersion(42)),
    ) {
        Err(StorageError::VersionConflict { found, .. }) => {
            assert_eq!(found, Some(RecordVersion(0)))
        }
        other => panic!("expected a conflict, got {other:?}"),
    }
    let v = s
        .save(
            "old",
            &"rewritten",
            &SaveOptions::new().if_version(RecordVersion(0)),
        )
        .unwrap();
    let (value, version) = s
        .load_versioned::<String>("old", &LoadOptions::default())
        .unwrap()
        .unwrap();
    assert_eq!((value.as_str(), version), ("rewritten", v));
    let rewritten: Vec<u8> = redis::cmd("GET")
        .arg(ns.record_key("old"))
        .query(&mut con)
        .unwrap();
    assert_eq!(rewritten[41], 3);
    let after = s.get_stats();
    assert_eq!(after.item_count, before.item_count);
    // The expiring layout-2 record is still in the expiry index: a purge finds it.
    let clock = bevy_storage::clock::ManualClock::starting_now();
    let later =
        Store::open(StorageConfig::redis(&ns.url, &ns.namespace).clock(clock.clone())).unwrap();
    clock.advance(Duration::from_secs(61));
    assert_eq!(later.purge_expired().unwrap(), 1);
    assert_eq!(later.list_keys("").unwrap(), ["old"]);
}

#[test]
fn keys_of_another_layout_are_typed_errors_and_change_nothing() {
    require_redis!();
    let ns = RedisNamespace::fresh();
    let s = store(&ns);
    let mut con = raw(&ns.url);
    // A record of key layout 1 (one hash), as only unreleased builds wrote it, and a string
    // that is no record at all.
    redis::cmd("HSET")
        .arg(ns.record_key("legacy"))
        .arg(&["v", "old", "s", "3", "c", "1", "m", "1", "a", "1", "f", "0"])
        .query::<()>(&mut con)
        .unwrap();
    redis::cmd("SET")
        .arg(ns.record_key("foreign"))
        .arg("not a record")
        .query::<()>(&mut con)
        .unwrap();
    s.save(
        "keep",
        &1u32,
        &SaveOptions::new().ttl(Duration::from_secs(60)),
    )
    .unwrap();
    save(&s, "plain", &"plain");
    let kept = s.backend().get("keep").unwrap().unwrap();
    let stats = |s: &Store| {
        let st = s.get_stats();
        (st.item_count, st.total_size)
    };
    let before = stats(&s);

    for key in ["legacy", "foreign"] {
        let layout = |err: StorageError, what: &str| match err {
            StorageError::Corrupt { key: k, reason } => {
                assert_eq!(k, key, "{what}");
                if key == "legacy" {
                    assert!(reason.contains("layout"), "{what}: {reason}");
                    assert!(reason.contains(&ns.record_key(key)), "{what}: {reason}");
                }
            }
            other => panic!("{what} of {key}: expected Corrupt, got {other:?}"),
        };
        layout(
            s.load::<u32>(key, &LoadOptions::default()).unwrap_err(),
            "load",
        );
        layout(s.get_metadata(key).unwrap_err(), "get_metadata");
        layout(s.exists(key).unwrap_err(), "exists");
        layout(
            s.save(key, &2u32, &SaveOptions::default()).unwrap_err(),
            "save",
        );
        layout(s.delete(key).unwrap_err(), "delete");
        layout(
            s.take::<u32>(key, &LoadOptions::default()).unwrap_err(),
            "take",
        );
        // The take script's own check, reached directly.
        layout(
            s.backend()
                .delete_if_unchanged(key, b"not a record", None)
                .unwrap_err(),
            "delete_if_unchanged",
        );
        let batches = [
            // Changes first, the key last: the changes are undone.
            vec![
                StorageOperation::save("keep", 2u32),
                StorageOperation::save("fresh", 3u32),
                StorageOperation::delete("plain"),
                StorageOperation::save(key, 4u32),
            ],
            // With a create-only put, before and after it.
            vec![
                StorageOperation::save_with("fresh", 1u32, SaveOptions::new().overwrite(false)),
                StorageOperation::delete("keep"),
                StorageOperation::delete(key),
            ],
            vec![
                StorageOperation::save("plain", "changed"),
                StorageOperation::save(key, 5u32),
                StorageOperation::save_with("fresh", 1u32, SaveOptions::new().overwrite(false)),
            ],
            // Saves that look new at both ends of the batch.
            vec![
                StorageOperation::save("fresh", 1u32),
                StorageOperation::save(key, 6u32),
                StorageOperation::save("fresh2", 2u32),
            ],
        ];
        for (i, batch) in batches.into_iter().enumerate() {
            layout(s.transaction(batch).unwrap_err(), &format!("batch {i}"));
            let now = s.backend().get("keep").unwrap().unwrap();
            assert_eq!(now, kept, "batch {i}");
            let pttl: i64 = redis::cmd("PTTL")
                .arg(ns.record_key("keep"))
                .query(&mut con)
                .unwrap();
            assert!(50_000 < pttl && pttl <= 60_000, "batch {i}: PTTL {pttl}");
            assert_eq!(load::<String>(&s, "plain").as_deref(), Some("plain"));
            assert!(!s.exists("fresh").unwrap(), "batch {i}");
            assert!(!s.exists("fresh2").unwrap(), "batch {i}");
            assert_eq!(stats(&s), before, "batch {i}");
        }
    }
    let legacy: Option<String> = redis::cmd("HGET")
        .arg(ns.record_key("legacy"))
        .arg("v")
        .query(&mut con)
        .unwrap();
    assert_eq!(legacy.as_deref(), Some("old"), "left as it was");
    let foreign: Option<String> = redis::cmd("GET")
        .arg(ns.record_key("foreign"))
        .query(&mut con)
        .unwrap();
    assert_eq!(foreign.as_deref(), Some("not a record"));
    assert_eq!(s.list_keys("").unwrap(), ["keep", "plain"]);

    // clear removes every record and leaves what is not one be.
    s.clear().unwrap();
    assert!(s.list_keys("").unwrap().is_empty());
    assert_eq!(stats(&s), (0, 0));
    let mut left = ns.keys();
    left.sort();
    assert_eq!(left, [ns.record_key("foreign"), ns.record_key("legacy")]);
    redis::cmd("DEL")
        .arg(ns.record_key("legacy"))
        .arg(ns.record_key("foreign"))
        .query::<()>(&mut con)
        .unwrap();
    save(&s, "legacy", &"new");
    assert_eq!(load::<String>(&s, "legacy").as_deref(), Some("new"));
    s.clear().unwrap();
    assert!(ns.keys().is_empty(), "{:?}", ns.keys());
}

/// A record string cut short, run long or empty (by hand, or a torn copy) is corrupt for
/// every read, the metadata included; a save replaces a damaged record, and refuses an empty
/// string like any other non-record.
#[test]
fn records_of_the_wrong_length_are_corrupt_for_every_read() {
    require_redis!();
    let ns = RedisNamespace::fresh();
    let s = store(&ns);
    let mut con = raw(&ns.url);
    let long_custom = "x".repeat(500);
    s.save("plain", &"a value", &SaveOptions::default())
        .unwrap();
    s.save(
        "annotated",
        &"a value",
        &SaveOptions::new().metadata("note", long_custom.as_str()),
    )
    .unwrap();
    for key in ["plain", "annotated"] {
        let intact: Vec<u8> = redis::cmd("GET")
            .arg(ns.record_key(key))
            .query(&mut con)
            .unwrap();
        let cut = intact[..intact.len() - 1].to_vec();
        let long = [&intact[..], b"!"].concat();
        for (what, bytes) in [("cut", cut), ("long", long), ("empty", Vec::new())] {
            redis::cmd("SET")
                .arg(ns.record_key(key))
                .arg(&bytes)
                .query::<()>(&mut con)
                .unwrap();
            let corrupt = |r: Result<bool, StorageError>, op: &str| match r {
                Err(StorageError::Corrupt { key: k, reason }) => {
                    assert_eq!(k, key, "{what} {op}");
                    assert!(reason.contains("bytes long"), "{what} {op}: {reason}");
                }
                other => panic!("{what} {key} {op}: expected Corrupt, got {other:?}"),
            };
            corrupt(
                s.load::<String>(key, &LoadOptions::default())
                    .map(|v| v.is_some()),
                "load",
            );
            corrupt(s.get_metadata(key).map(|m| m.is_some()), "get_metadata");
            corrupt(s.exists(key), "exists");
            if what == "empty" {
                // Too short to be a record at all: writes refuse it as well and leave it for
                // a person to remove (see the layout test).
                assert!(matches!(
                    s.save(key, &"again", &SaveOptions::default()),
                    Err(StorageError::Corrupt { .. })
                ));
                redis::cmd("DEL")
                    .arg(ns.record_key(key))
                    .query::<()>(&mut con)
                    .unwrap();
            }
            s.save(key, &"again", &SaveOptions::default()).unwrap();
            assert_eq!(load::<String>(&s, key).as_deref(), Some("again"), "{what}");
            assert!(s.exists(key).unwrap(), "{what}");
        }
    }
    s.clear().unwrap();
}

#[test]
fn connection_strings_and_secrets() {
    require_redis!();
    let config =
        StorageConfig::from_url("redis://:hunter2@127.0.0.1:6379/0?namespace=game:eu").unwrap();
    let debug = format!("{config:?}");
    assert!(!debug.contains("hunter2"), "{debug}");
    assert!(debug.contains(":***@127.0.0.1:6379/0"), "{debug}");
    match &config.backend {
        BackendConfig::Redis { url, namespace } => {
            assert_eq!(url, "redis://:hunter2@127.0.0.1:6379/0");
            assert_eq!(namespace, "game:eu");
        }
        other => panic!("{other:?}"),
    }
    match StorageConfig::from_url("redis://localhost")
        .unwrap()
        .backend
    {
        BackendConfig::Redis { namespace, .. } => assert_eq!(namespace, "bevy_storage"),
        other => panic!("{other:?}"),
    }
    // The shared server has no password: the one given is refused, and never echoed.
    let url = redis_url().replacen("redis://", "redis://:hunter2@", 1);
    if !url.contains("@127.0.0.1") && !url.contains("@localhost") {
        return; // REDIS_URL carries credentials of its own
    }
    let err = Store::open(StorageConfig::redis(&url, "secrets")).unwrap_err();
    assert!(!err.to_string().contains("hunter2"), "{err}");
    assert!(!format!("{err:?}").contains("hunter2"), "{err:?}");

    for bad in ["", "a{b}", "line\nbreak"] {
        let err = Store::open(StorageConfig::redis(redis_url(), bad)).unwrap_err();
        assert!(matches!(err, StorageError::Config(_)), "{bad:?}: {err}");
    }
    let err = Store::open(StorageConfig::redis(redis_url(), "ok").pool_size(0)).unwrap_err();
    assert!(matches!(err, StorageError::Config(_)), "{err}");
    let err = Store::open(StorageConfig::redis("http://127.0.0.1:6379", "ok")).unwrap_err();
    assert!(matches!(err, StorageError::Config(_)), "{err}");
    #[cfg(not(feature = "redis-tls"))]
    {
        let err = Store::open(StorageConfig::redis("rediss://127.0.0.1:6379", "ok")).unwrap_err();
        assert!(
            matches!(
                err,
                StorageError::FeatureDisabled {
                    feature: "redis-tls",
                    ..
                }
            ),
            "{err}"
        );
    }
}

#[test]
fn ci_requires_redis_and_local_runs_skip_loudly() {
    let nowhere = format!("redis://127.0.0.1:{}", free_port());
    let notice = check_redis(&nowhere, false).expect_err("nothing listens there");
    assert!(
        notice.contains("SKIPPED"),
        "local: skipped loudly, not failed: {notice}"
    );
    assert!(notice.contains(&nowhere), "{notice}");
    let under_ci = std::panic::catch_unwind(|| check_redis(&nowhere, true));
    let message = under_ci.expect_err("under CI a missing Redis is a failure");
    let message = message
        .downcast_ref::<String>()
        .cloned()
        .unwrap_or_default();
    assert!(message.contains("CI=true"), "{message}");
    assert!(message.contains(&nowhere), "{message}");
}

// ---------------------------------------------------------------- servers of our own

/// A `redis-server` this test owns, on a port of its own; killed on drop.
struct OwnServer {
    child: Option<Child>,
    port: u16,
    dir: tempfile::TempDir,
    args: Vec<String>,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl OwnServer {
    /// Starts one, or returns `None` (skipping loudly, or failing under CI) when
    /// `redis-server` cannot be run.
    fn start(extra: &[&str]) -> Option<Self> {
        let mut server = Self {
            child: None,
            port: free_port(),
            dir: tempfile::tempdir().unwrap(),
            args: extra.iter().map(|s| s.to_string()).collect(),
        };
        match server.spawn() {
            Ok(()) => Some(server),
            Err(e) if under_ci() => panic!("CI=true and redis-server cannot be started: {e}"),
            Err(e) => {
                use std::io::Write as _;
                let _ = writeln!(
                    std::io::stderr(),
                    "!!!!! SKIPPED {}: cannot start redis-server ({e}); install Redis to run it",
                    thread::current().name().unwrap_or("?")
                );
                None
            }
        }
    }

    fn spawn(&mut self) -> Result<(), String> {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            .arg("--dir")
            .arg(self.dir.path())
            .args(&self.args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| e.to_string())?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if self.ping() {
                return Ok(());
            }
            thread::sleep(Duration::from_millis(20));
        }
        Err(format!("no answer on port {} within 10 s", self.port))
    }

    fn ping(&self) -> bool {
        let Ok(client) = redis::Client::open(self.url_with("").as_str()) else {
            return false;
        };
        let Ok(mut con) = client.get_connection_with_timeout(Duration::from_millis(200)) else {
            return false;
        };
        // A NOAUTH answer still means the server is up.
        match redis::cmd("PING").query::<()>(&mut con) {
            Ok(()) => true,
            Err(e) => e.code().is_some(),
        }
    }

    fn url_with(&self, credentials: &str) -> String {
        format!("redis://{credentials}127.0.0.1:{}", self.port)
    }

    fn url(&self) -> String {
        self.url_with("")
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn restart(&mut self) {
        self.kill();
        self.spawn().unwrap();
    }
}

impl Drop for OwnServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Asserts `result` is an `Unavailable` error that came back within `limit`.
fn assert_unavailable<T: std::fmt::Debug>(
    what: &str,
    started: Instant,
    result: Result<T, StorageError>,
) {
    let took = started.elapsed();
    match result {
        Err(StorageError::Unavailable { .. }) => {}
        other => panic!("{what}: expected Unavailable, got {other:?}"),
    }
    assert!(took < Duration::from_secs(3), "{what} took {took:?}");
}

/// Calls of `command` the server has run since its start.
fn calls(con: &mut redis::Connection, command: &str) -> u64 {
    let info: String = redis::cmd("INFO").arg("commandstats").query(con).unwrap();
    info.lines()
        .find_map(|l| l.strip_prefix(&format!("cmdstat_{command}:calls=")))
        .and_then(|rest| rest.split(',').next()?.parse().ok())
        .unwrap_or(0)
}

/// Batches of new records without expiry go to Redis as `MULTI`/`MSETNX`/`EXEC`; when a key
/// turns out to be taken nothing of that attempt stays, and the write script does the batch
/// with the usual semantics. Checked on a server of its own, whose command counts show which
/// path ran.
#[test]
fn new_records_go_native_and_taken_keys_fall_back_to_the_script() {
    let Some(server) = OwnServer::start(&[]) else {
        return;
    };
    let url = server.url();
    let b = RedisBackend::open(&url, "native", &RedisOptions::default()).unwrap();
    let mut con = raw(&url);
    let paths = |con: &mut redis::Connection| (calls(con, "exec"), calls(con, "evalsha"));
    let put = |key: String, size: usize, now: Timestamp, mode: PutMode| WriteOp::Put {
        key,
        record: record(&vec![b'v'; size], now, None),
        mode,
    };
    let new_batch = |from: usize, to: usize, now: Timestamp, mode: PutMode| -> Vec<WriteOp> {
        (from..to)
            .map(|i| put(format!("k{i}"), i, now, mode))
            .collect()
    };
    let usage = |now: Timestamp| {
        let u = b.usage(now).unwrap();
        (u.item_count, u.total_size)
    };
    let bytes = |from: usize, to: usize| (from..to).sum::<usize>() as u64;
    let token_left = |con: &mut redis::Connection| -> bool {
        redis::cmd("EXISTS")
            .arg("{native}:batch")
            .query(con)
            .unwrap()
    };
    let t0 = Timestamp::now();
    // A delete takes the script: the server knows it from now on (a first EVALSHA would
    // count twice, once refused with NOSCRIPT).
    b.write(vec![WriteOp::Delete { key: "none".into() }], t0)
        .unwrap();

    // New keys: native, one EXEC and no script.
    let before = paths(&mut con);
    let outcomes = b.write(new_batch(0, 100, t0, PutMode::Upsert), t0).unwrap();
    assert_eq!(outcomes.len(), 100);
    assert!(outcomes.iter().all(|o| o.previous_size.is_none()));
    assert_eq!(paths(&mut con), (before.0 + 1, before.1));
    assert_eq!(usage(t0), (100, bytes(0, 100)));
    assert!(!token_left(&mut con));
    let meta = b.get_meta("k7").unwrap().unwrap();
    assert_eq!((meta.created_at, meta.size, meta.expires_at), (t0, 7, None));
    let created_only = new_batch(100, 150, t0, PutMode::CreateOnly);
    b.write(created_only, t0).unwrap();
    assert_eq!(usage(t0), (150, bytes(0, 150)));

    // One key taken (k149, the last): the native attempt writes nothing, the script writes
    // the batch, keeps k149's created_at and reports its size.
    let t1 = Timestamp(t0.0 + 1_000);
    let before = paths(&mut con);
    let outcomes = b
        .write(new_batch(149, 200, t1, PutMode::Upsert), t1)
        .unwrap();
    assert_eq!(paths(&mut con), (before.0 + 1, before.1 + 1));
    assert_eq!(outcomes[0].previous_size, Some(149));
    assert!(outcomes[1..].iter().all(|o| o.previous_size.is_none()));
    let meta = b.get_meta("k149").unwrap().unwrap();
    assert_eq!((meta.created_at, meta.modified_at), (t0, t1));
    assert_eq!(usage(t1), (200, bytes(0, 200)));
    assert!(!token_left(&mut con));

    // Create-only with a key taken (k150, the first): refused whole, nothing written.
    let err = b
        .write(new_batch(150, 260, t1, PutMode::CreateOnly), t1)
        .unwrap_err();
    assert!(
        matches!(&err, StorageError::AlreadyExists { key } if key == "k150"),
        "{err:?}"
    );
    assert!(b.get_meta("k200").unwrap().is_none());
    assert_eq!(usage(t1), (200, bytes(0, 200)));

    // After a taken key, the next 15 new-record batches take the script (the refused one
    // above was the first); then native again.
    let before = paths(&mut con);
    for i in 0..14 {
        let from = 1_000 + 10 * i;
        b.write(new_batch(from, from + 10, t1, PutMode::Upsert), t1)
            .unwrap();
    }
    assert_eq!(paths(&mut con), (before.0, before.1 + 14));
    b.write(new_batch(2_000, 2_010, t1, PutMode::Upsert), t1)
        .unwrap();
    assert_eq!(paths(&mut con), (before.0 + 1, before.1 + 14));
    assert_eq!(
        usage(t1),
        (
            200 + 140 + 10,
            bytes(0, 200) + bytes(1_000, 1_140) + bytes(2_000, 2_010)
        )
    );

    // A record dead by the store's clock but still in Redis takes the script, which
    // replaces it as a new record.
    let t2 = Timestamp(t1.0 + 1_000);
    b.write(
        vec![WriteOp::Put {
            key: "short".into(),
            record: record(b"old", t2, Some(Timestamp(t2.0 + 100))),
            mode: PutMode::Upsert,
        }],
        t2,
    )
    .unwrap();
    let t3 = Timestamp(t2.0 + 200);
    let outcomes = b
        .write(
            vec![
                put("short".into(), 5, t3, PutMode::CreateOnly),
                put("other".into(), 6, t3, PutMode::CreateOnly),
            ],
            t3,
        )
        .unwrap();
    assert_eq!(outcomes[0].previous_size, None);
    let meta = b.get_meta("short").unwrap().unwrap();
    assert_eq!((meta.created_at, meta.size, meta.expires_at), (t3, 5, None));

    // Out of memory: the native batch is refused whole, nothing is written or counted, and
    // the store writes again once there is room. A backend of its own, whose first batch of
    // new records takes the native path (no backoff yet): the script never runs.
    let fresh = || RedisBackend::open(&url, "native", &RedisOptions::default()).unwrap();
    let oom = fresh();
    let counted = usage(t3);
    let before = paths(&mut con);
    redis::cmd("CONFIG")
        .arg(&["SET", "maxmemory", "1"])
        .query::<()>(&mut con)
        .unwrap();
    let err = oom
        .write(new_batch(5_000, 5_100, t3, PutMode::Upsert), t3)
        .unwrap_err();
    redis::cmd("CONFIG")
        .arg(&["SET", "maxmemory", "0"])
        .query::<()>(&mut con)
        .unwrap();
    assert!(matches!(&err, StorageError::StorageFull { .. }), "{err:?}");
    assert!(err.to_string().contains("OOM"), "{err}");
    assert_eq!(paths(&mut con).1, before.1, "refused on the native path");
    assert!(b.get_meta("k5000").unwrap().is_none());
    assert_eq!(usage(t3), counted);
    assert!(!token_left(&mut con));
    let before = paths(&mut con);
    oom.write(new_batch(5_000, 5_100, t3, PutMode::Upsert), t3)
        .unwrap();
    assert_eq!(paths(&mut con), (before.0 + 1, before.1), "native");
    let counted = (counted.0 + 100, counted.1 + bytes(5_000, 5_100));
    assert_eq!(usage(t3), counted);

    // A batch token left behind by hand, a string or a key of another type, only sends one
    // batch of new records to the script, and is removed.
    for (i, make) in [
        vec!["SET", "{native}:batch", "left"],
        vec!["HSET", "{native}:batch", "f", "v"],
    ]
    .into_iter()
    .enumerate()
    {
        redis::cmd(make[0])
            .arg(&make[1..])
            .query::<()>(&mut con)
            .unwrap();
        let from = 6_000 + 100 * i;
        let before = paths(&mut con);
        fresh()
            .write(new_batch(from, from + 10, t3, PutMode::Upsert), t3)
            .unwrap();
        assert_eq!(paths(&mut con), (before.0 + 1, before.1 + 1), "{make:?}");
        assert!(!token_left(&mut con), "{make:?}");
        let before = paths(&mut con);
        fresh()
            .write(new_batch(from + 10, from + 20, t3, PutMode::Upsert), t3)
            .unwrap();
        assert_eq!(paths(&mut con), (before.0 + 1, before.1), "{make:?}");
    }
    assert_eq!(
        usage(t3),
        (
            counted.0 + 40,
            counted.1 + bytes(6_000, 6_020) + bytes(6_100, 6_120)
        )
    );

    b.clear().unwrap();
    assert_eq!(usage(t3), (0, 0));
    let keys: Vec<String> = redis::cmd("KEYS").arg("*").query(&mut con).unwrap();
    assert!(keys.is_empty(), "{keys:?}");
}

/// Batches of new records with an expiry (alone or mixed with records without) go to Redis
/// as `MULTI`/`MSETNX`/`EXEC` too, the expiries and the expiry index set in the same
/// transaction: the bookkeeping is exact, a record whose expiry passed by the server's clock
/// is not stored, and a taken key leaves nothing of the native attempt (no expiry put on the
/// record that was there) before the write script does the batch. On a server of its own,
/// whose command counts show which path ran.
#[test]
fn new_records_with_expiries_go_native() {
    let Some(server) = OwnServer::start(&[]) else {
        return;
    };
    let ns = RedisNamespace {
        url: server.url(),
        namespace: "native-ttl".into(),
    };
    let b = RedisBackend::open(&ns.url, &ns.namespace, &RedisOptions::default()).unwrap();
    let mut con = raw(&ns.url);
    let paths = |con: &mut redis::Connection| (calls(con, "exec"), calls(con, "evalsha"));
    let t0 = Timestamp(redis_time(&mut con));
    let hour = Some(Timestamp(t0.0 + 3_600_000));
    let put = |key: String, size: usize, expires_at: Option<Timestamp>| WriteOp::Put {
        key,
        record: record(&vec![b'v'; size], t0, expires_at),
        mode: PutMode::Upsert,
    };
    // A delete takes the script: the server knows it from now on.
    b.write(vec![WriteOp::Delete { key: "none".into() }], t0)
        .unwrap();

    // New keys, every one with an expiry: native, one EXEC and no script.
    let before = paths(&mut con);
    let outcomes = b
        .write(
            (0..100).map(|i| put(format!("t{i}"), i, hour)).collect(),
            t0,
        )
        .unwrap();
    assert!(outcomes.iter().all(|o| o.previous_size.is_none()));
    assert_eq!(paths(&mut con), (before.0 + 1, before.1), "native");
    assert_bookkeeping_exact(&ns, &mut con, "new records with an expiry");
    let meta = b.get_meta("t7").unwrap().unwrap();
    assert_eq!((meta.created_at, meta.size, meta.expires_at), (t0, 7, hour));
    let u = b.usage(t0).unwrap();
    assert_eq!(
        (u.item_count, u.total_size),
        (100, (0..100).sum::<usize>() as u64)
    );

    // Mixed: expiries of their own, none, and one already past by the server's clock (not
    // stored, not indexed, not counted).
    let before = paths(&mut con);
    let mixed: Vec<WriteOp> = (0..50)
        .map(|i| match i % 3 {
            0 => put(format!("m{i}"), 10, Some(Timestamp(t0.0 + 600_000 + i))),
            1 => put(format!("m{i}"), 20, None),
            _ if i == 5 => put(format!("m{i}"), 30, Some(Timestamp(t0.0 - 1_000))),
            _ => put(format!("m{i}"), 30, hour),
        })
        .collect();
    b.write(mixed, t0).unwrap();
    assert_eq!(paths(&mut con), (before.0 + 1, before.1), "native");
    assert!(b.get_meta("m5").unwrap().is_none(), "past its expiry");
    assert!(b.get_meta("m8").unwrap().is_some());
    let indexed: Option<f64> = redis::cmd("ZSCORE")
        .arg(ns.redis_key("expiry"))
        .arg("m5")
        .query(&mut con)
        .unwrap();
    assert_eq!(indexed, None);
    assert_bookkeeping_exact(&ns, &mut con, "a mixed batch of new records");
    let u = b.usage(t0).unwrap();
    assert_eq!(
        (u.item_count, u.total_size),
        (
            100 + 49,
            (0..100).sum::<usize>() as u64 + 17 * 10 + 17 * 20 + 15 * 30
        )
    );

    // One key taken by a record without expiry: the native attempt leaves nothing (no expiry
    // on that record), the script writes the batch and keeps its created_at.
    let t1 = Timestamp(t0.0 + 1_000);
    let before = paths(&mut con);
    let taken: Vec<WriteOp> = ["n1", "m1", "n2"]
        .into_iter()
        .map(|k| WriteOp::Put {
            key: k.into(),
            record: record(b"later", t1, hour),
            mode: PutMode::Upsert,
        })
        .collect();
    let outcomes = b.write(taken, t1).unwrap();
    assert_eq!(paths(&mut con), (before.0 + 1, before.1 + 1));
    assert_eq!(outcomes[1].previous_size, Some(20));
    let meta = b.get_meta("m1").unwrap().unwrap();
    assert_eq!((meta.created_at, meta.expires_at), (t0, hour));
    assert_bookkeeping_exact(&ns, &mut con, "after a taken key");
    let token: bool = redis::cmd("EXISTS")
        .arg(ns.redis_key("batch"))
        .query(&mut con)
        .unwrap();
    assert!(!token, "the batch token never outlives its transaction");

    // A key of another type among new records with an expiry: the batch is refused whole,
    // and that key keeps its value and gets no expiry. A backend of its own, whose first
    // batch of new records tries the native path (no backoff yet).
    let fresh = RedisBackend::open(&ns.url, &ns.namespace, &RedisOptions::default()).unwrap();
    let before = paths(&mut con);
    redis::cmd("HSET")
        .arg(ns.record_key("foreign"))
        .arg(&["f", "v"])
        .query::<()>(&mut con)
        .unwrap();
    let err = fresh
        .write(
            vec![put("f1".into(), 3, hour), put("foreign".into(), 3, hour)],
            t1,
        )
        .unwrap_err();
    assert!(matches!(&err, StorageError::Corrupt { .. }), "{err:?}");
    assert_eq!(
        paths(&mut con),
        (before.0 + 1, before.1 + 1),
        "native, then the script"
    );
    assert!(b.get_meta("f1").unwrap().is_none());
    let ttl: i64 = redis::cmd("PTTL")
        .arg(ns.record_key("foreign"))
        .query(&mut con)
        .unwrap();
    assert_eq!(ttl, -1, "no expiry put on the key of another type");
    redis::cmd("DEL")
        .arg(ns.record_key("foreign"))
        .query::<()>(&mut con)
        .unwrap();
    assert_bookkeeping_exact(&ns, &mut con, "after a refused batch");

    b.clear().unwrap();
    assert!(ns.keys().is_empty(), "{:?}", ns.keys());
}

#[test]
fn outage_fails_fast_reports_unhealthy_and_recovers_by_itself() {
    let Some(mut server) = OwnServer::start(&[]) else {
        return;
    };
    let pool_size = 4;
    let s = Store::open(StorageConfig::redis(server.url(), "outage").pool_size(pool_size)).unwrap();
    save(&s, "before", &1);
    assert!(s.get_stats().is_healthy);

    // Writers keep going through the outage: every call ends, in bounded time, with Ok or
    // Unavailable (or, for a save already sent when the server died, OutcomeUnknown), never
    // another error and never a hang.
    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (0..2)
        .map(|t| {
            let s = s.clone();
            let stop = Arc::clone(&stop);
            thread::spawn(move || {
                let (mut ok, mut failed, mut slowest) = (0, 0, Duration::ZERO);
                let mut i = 0u64;
                while !stop.load(Ordering::SeqCst) {
                    let started = Instant::now();
                    match s.save(&format!("w{t}:{}", i % 20), &i, &SaveOptions::default()) {
                        Ok(_) => ok += 1,
                        Err(
                            StorageError::Unavailable { .. } | StorageError::OutcomeUnknown { .. },
                        ) => failed += 1,
                        Err(e) => panic!("writer {t}: {e}"),
                    }
                    slowest = slowest.max(started.elapsed());
                    i += 1;
                    thread::sleep(Duration::from_millis(2));
                }
                (ok, failed, slowest)
            })
        })
        .collect();
    thread::sleep(Duration::from_millis(200));

    server.kill();
    // Long enough for the writers to meet the outage however the threads are scheduled.
    thread::sleep(Duration::from_millis(300));
    let started = Instant::now();
    assert_unavailable(
        "save",
        started,
        s.save("during", &1, &SaveOptions::default()),
    );
    let started = Instant::now();
    assert_unavailable(
        "load",
        started,
        s.load::<i32>("before", &LoadOptions::default()),
    );
    let started = Instant::now();
    assert_unavailable("exists", started, s.exists("before"));
    let started = Instant::now();
    assert_unavailable("list_keys", started, s.list_keys(""));
    let started = Instant::now();
    assert_unavailable(
        "transaction",
        started,
        s.transaction(vec![
            StorageOperation::save("a", 1),
            StorageOperation::delete("b"),
        ]),
    );
    // While the server stays down, operations fail at once rather than each waiting out a
    // timeout.
    let started = Instant::now();
    for i in 0..50 {
        assert!(
            s.save(&format!("x{i}"), &i, &SaveOptions::default())
                .is_err()
        );
    }
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "50 saves during the outage took {:?}",
        started.elapsed()
    );
    let stats = s.get_stats();
    assert!(!stats.is_healthy);
    let last_error = stats.last_error.unwrap();
    assert!(last_error.contains("unavailable"), "{last_error}");
    assert!(
        last_error.contains(&format!("127.0.0.1:{}", server.port)),
        "{last_error}"
    );

    // Redis comes back (empty: this server keeps nothing on disk). The same store recovers
    // without being reopened.
    server.restart();
    let started = Instant::now();
    while s.save("after", &2, &SaveOptions::default()).is_err() {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "no recovery within 5 s"
        );
        thread::sleep(Duration::from_millis(50));
    }
    // Once it works it keeps working: no stale pooled connection fails a later call.
    for i in 0..(3 * pool_size) {
        s.save(&format!("k{i}"), &i, &SaveOptions::default())
            .unwrap();
        assert_eq!(load::<u32>(&s, &format!("k{i}")), Some(i));
        s.transaction(vec![StorageOperation::save("pair", i)])
            .unwrap();
    }
    let stats = s.get_stats();
    assert!(stats.is_healthy, "{stats:?}");
    assert_eq!(load::<i32>(&s, "after"), Some(2));

    stop.store(true, Ordering::SeqCst);
    for w in writers {
        let (ok, failed, slowest) = w.join().unwrap();
        assert!(ok > 0 && failed > 0, "ok {ok}, failed {failed}");
        assert!(slowest < Duration::from_secs(3), "slowest call {slowest:?}");
    }
}

#[test]
fn passwords_databases_and_pool_size() {
    let Some(server) = OwnServer::start(&["--requirepass", "s3cret-pass"]) else {
        return;
    };
    // Right password, database 3.
    let url = format!("{}/3", server.url_with(":s3cret-pass@"));
    let s = Store::open(StorageConfig::redis(&url, "auth").pool_size(3)).unwrap();
    save(&s, "k", &1);
    assert_eq!(load::<i32>(&s, "k"), Some(1));
    assert!(!format!("{s:?}").contains("s3cret"));
    let mut con = raw(&url);
    let in_db3: u64 = redis::cmd("DBSIZE").query(&mut con).unwrap();
    assert_eq!(in_db3, 2, "the record and the counters live in database 3");
    redis::cmd("SELECT").arg(0).query::<()>(&mut con).unwrap();
    let in_db0: u64 = redis::cmd("DBSIZE").query(&mut con).unwrap();
    assert_eq!(in_db0, 0);

    // The pool never opens more than pool_size connections, however many threads call.
    thread::scope(|scope| {
        for t in 0..8 {
            let s = s.clone();
            scope.spawn(move || {
                for i in 0..100 {
                    s.save(&format!("t{t}:{i}"), &i, &SaveOptions::default())
                        .unwrap();
                }
            });
        }
        let mut con = raw(&url);
        for _ in 0..20 {
            let info: String = redis::cmd("INFO").arg("clients").query(&mut con).unwrap();
            let clients: u32 = info
                .lines()
                .find_map(|l| l.strip_prefix("connected_clients:"))
                .unwrap()
                .trim()
                .parse()
                .unwrap();
            // Ours, plus this monitoring connection and the one above.
            assert!(clients <= 3 + 2, "{clients} connections");
            thread::sleep(Duration::from_millis(5));
        }
    });

    // A wrong password is refused with a message that neither says "unreachable" nor
    // repeats the password.
    let wrong = format!("{}/3", server.url_with(":not-the-pass@"));
    let err = Store::open(StorageConfig::redis(&wrong, "auth")).unwrap_err();
    assert!(matches!(err, StorageError::Backend { .. }), "{err:?}");
    let message = err.to_string();
    assert!(!message.contains("not-the-pass"), "{message}");
    assert!(message.contains("password"), "{message}");
}

// ---------------------------------------------------------------- TLS

/// Set for the child process of [`tls_connection_checks_the_server_certificate`]: the
/// `rediss://` URL to use; `TLS_CHILD_EXPECT` says whether the store should open.
#[cfg(feature = "redis-tls")]
const TLS_CHILD_URL: &str = "BEVY_STORAGE_TLS_CHILD_URL";
#[cfg(feature = "redis-tls")]
const TLS_CHILD_EXPECT: &str = "BEVY_STORAGE_TLS_CHILD_EXPECT";

#[cfg(feature = "redis-tls")]
#[test]
#[ignore = "helper run as a child process by tls_connection_checks_the_server_certificate"]
fn tls_child() {
    let Ok(url) = std::env::var(TLS_CHILD_URL) else {
        return;
    };
    let opened = Store::open(StorageConfig::redis(&url, "tls"));
    if std::env::var(TLS_CHILD_EXPECT).as_deref() == Ok("refused") {
        let err = opened.expect_err("a server certificate from an unknown CA is refused");
        assert!(!err.to_string().contains("tls-secret"), "{err}");
        return;
    }
    let s = opened.unwrap();
    save(&s, "over-tls", &"sealed");
    assert_eq!(load::<String>(&s, "over-tls").as_deref(), Some("sealed"));
    assert!(!format!("{:?}", StorageConfig::redis(&url, "tls")).contains("tls-secret"));
}

#[cfg(feature = "redis-tls")]
#[test]
fn tls_connection_checks_the_server_certificate() {
    let certs = tempfile::tempdir().unwrap();
    let dir = certs.path();
    let openssl = |args: &[&str]| {
        Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map_err(|e| e.to_string())
            .and_then(|s| {
                s.success()
                    .then_some(())
                    .ok_or(format!("openssl {args:?}: {s}"))
            })
    };
    std::fs::write(
        dir.join("server.ext"),
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n\
         keyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let made = openssl(
        &[
            &[
                "req",
                "-x509",
                "-days",
                "1",
                "-subj",
                "/CN=bevy_storage test CA",
            ][..],
            &ec,
            &["-keyout", "ca.key", "-out", "ca.pem"],
            &["-addext", "basicConstraints=critical,CA:TRUE"],
            &["-addext", "keyUsage=critical,keyCertSign,cRLSign"],
        ]
        .concat(),
    )
    .and_then(|()| {
        openssl(
            &[
                &["req", "-subj", "/CN=127.0.0.1"][..],
                &ec,
                &["-keyout", "server.key", "-out", "server.csr"],
            ]
            .concat(),
        )
    })
    .and_then(|()| {
        openssl(&[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "1",
            "-extfile",
            "server.ext",
            "-out",
            "server.pem",
        ])
    });
    if let Err(e) = made {
        assert!(
            !under_ci(),
            "CI=true and the test certificates cannot be made: {e}"
        );
        eprintln!("SKIPPED: cannot make test certificates with openssl ({e})");
        return;
    }
    let tls_port = free_port().to_string();
    let path = |name: &str| dir.join(name).to_string_lossy().into_owned();
    let Some(server) = OwnServer::start(&[
        "--tls-port",
        &tls_port,
        "--tls-cert-file",
        &path("server.pem"),
        "--tls-key-file",
        &path("server.key"),
        "--tls-ca-cert-file",
        &path("ca.pem"),
        "--tls-auth-clients",
        "no",
        "--requirepass",
        "tls-secret",
    ]) else {
        return;
    };
    let url = format!("rediss://:tls-secret@127.0.0.1:{tls_port}/0");
    // A child process, so that SSL_CERT_FILE (the roots rustls trusts) is set for it alone.
    let child = |ca: Option<&str>, expect: &str| {
        let mut cmd = Command::new(std::env::current_exe().unwrap());
        cmd.args(["--exact", "tls_child", "--ignored", "--test-threads=1"])
            .env(TLS_CHILD_URL, &url)
            .env(TLS_CHILD_EXPECT, expect)
            .env_remove("SSL_CERT_DIR")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        match ca {
            Some(ca) => cmd.env("SSL_CERT_FILE", ca),
            None => cmd.env("SSL_CERT_FILE", path("server.ext")), // no certificate at all
        };
        let out = cmd.output().unwrap();
        assert!(
            out.status.success(),
            "child ({expect}) failed:\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    };
    child(Some(&path("ca.pem")), "opens");
    child(None, "refused");
    drop(server);
}

/// A large batch of distinct keys over existing records (the write script's `MSET`, then
/// `PEXPIREAT` for the records with an expiry and `SETRANGE` of `created_at` for the ones it
/// replaces): every record keeps its `created_at`, gets or loses its expiry, reports the size
/// it replaced, and the counters and the expiry index agree with a full recount.
#[test]
fn large_batches_over_existing_records_keep_created_at_and_expiries() {
    require_redis!();
    let ns = RedisNamespace::fresh();
    let b = RedisBackend::open(&ns.url, &ns.namespace, &RedisOptions::default()).unwrap();
    let mut con = raw(&ns.url);
    let t0 = Timestamp::now();
    let later = Timestamp(t0.0 + 1_000);
    let hour = |t: Timestamp| Some(Timestamp(t.0 + 3_600_000));
    let n = 600;
    let put = |i: usize, size: usize, now: Timestamp, expiring: bool| WriteOp::Put {
        key: format!("k{i}"),
        record: record(
            &vec![b'a' + (i % 26) as u8; size],
            now,
            hour(now).filter(|_| expiring),
        ),
        mode: PutMode::Upsert,
    };
    // Every third key has an expiry at first.
    let first: Vec<WriteOp> = (0..n).map(|i| put(i, 10 + i % 7, t0, i % 3 == 0)).collect();
    let outcomes = b.write(first, t0).unwrap();
    assert!(outcomes.iter().all(|o| o.previous_size.is_none()));
    // Then every key is replaced (every other one with an expiry), but every fifth deleted.
    let second: Vec<WriteOp> = (0..n)
        .map(|i| {
            if i % 5 == 4 {
                WriteOp::Delete {
                    key: format!("k{i}"),
                }
            } else {
                put(i, 20 + i % 11, later, i % 2 == 0)
            }
        })
        .collect();
    let outcomes = b.write(second, later).unwrap();
    let mut expiring = 0;
    for (i, outcome) in outcomes.iter().enumerate() {
        assert_eq!(outcome.previous_size, Some(10 + i as u64 % 7), "k{i}");
        let key = format!("k{i}");
        let meta = b.get_meta(&key).unwrap();
        let pttl: i64 = redis::cmd("PTTL")
            .arg(ns.record_key(&key))
            .query(&mut con)
            .unwrap();
        if i % 5 == 4 {
            assert!(meta.is_none(), "{key} deleted");
            assert_eq!(pttl, -2);
            continue;
        }
        let meta = meta.unwrap();
        assert_eq!((meta.created_at, meta.modified_at), (t0, later), "{key}");
        assert_eq!(meta.size, 20 + i as u64 % 11, "{key}");
        let record = b.get(&key).unwrap().unwrap();
        assert_eq!(
            record.value,
            vec![b'a' + (i % 26) as u8; 20 + i % 11],
            "{key}"
        );
        if i % 2 == 0 {
            expiring += 1;
            assert_eq!(meta.expires_at, hour(later), "{key}");
            assert!(3_500_000 < pttl && pttl <= 3_601_000, "{key}: PTTL {pttl}");
        } else {
            assert_eq!(meta.expires_at, None, "{key}");
            assert_eq!(pttl, -1, "{key}: no expiry left");
        }
    }
    let indexed: u64 = redis::cmd("ZCARD")
        .arg(ns.redis_key("expiry"))
        .query(&mut con)
        .unwrap();
    assert_eq!(indexed, expiring);
    let usage = b.usage(later).unwrap();
    assert_eq!(
        (usage.item_count, usage.total_size),
        recount(&b, later),
        "usage against a full recount"
    );
}

/// Records whose expiry passes while the write script runs. The script reads Redis's clock
/// once (`TIME`) to drop records already past, before it writes anything; a record whose
/// expiry comes after that reading but before its own `PEXPIREAT` is deleted by the
/// `PEXPIREAT` (Redis 7.0 compares with its clock of the moment). Over a live record, the
/// `SETRANGE` that carries the replaced record's `created_at` over once ran after the
/// `PEXPIREAT` and recreated such a deleted key as an 8-byte string with no expiry, which no
/// later operation could read, write or delete. The expiries are spread over 400 ms from
/// the batch's start, so whatever the host's speed some fall between the script's clock
/// reading and their `PEXPIREAT` (several milliseconds for 5,000 records).
#[test]
fn expiries_passing_while_a_batch_runs_leave_no_stray_keys() {
    require_redis!();
    let ns = RedisNamespace::fresh();
    let b = RedisBackend::open(&ns.url, &ns.namespace, &RedisOptions::default()).unwrap();
    let n = 5_000;
    let t0 = Timestamp::now();
    let first: Vec<WriteOp> = (0..n)
        .map(|i| WriteOp::Put {
            key: format!("k{i}"),
            record: record(&[b'v'; 100], t0, None),
            mode: PutMode::Upsert,
        })
        .collect();
    b.write(first, t0).unwrap();
    let now = Timestamp::now();
    let second: Vec<WriteOp> = (0..n)
        .map(|i| WriteOp::Put {
            key: format!("k{i}"),
            record: record(&[b'w'; 100], now, Some(Timestamp(now.0 + i * 400 / n))),
            mode: PutMode::Upsert,
        })
        .collect();
    b.write(second, now).unwrap();
    while Timestamp::now().0 < now.0 + 450 {
        thread::sleep(Duration::from_millis(50));
    }
    let records: Vec<String> = ns
        .keys()
        .into_iter()
        .filter(|k| k.starts_with(&ns.record_key("")))
        .collect();
    assert!(
        records.is_empty(),
        "{} record keys left after every expiry passed, such as {:?}",
        records.len(),
        records.first()
    );
    let usage = b.usage(Timestamp::now()).unwrap();
    assert_eq!((usage.item_count, usage.total_size), (0, 0));
    b.clear().unwrap();
    assert!(ns.keys().is_empty(), "{:?}", ns.keys());
}

/// `clear` goes page by page, each page an operation with the time bound of its own: a store
/// whose bound (connect and response timeouts) is 1.5 s clears 200,000 records, which takes
/// a debug build longer than that in all (5-9 s here; one bound for the whole clear failed
/// it, and a clear of about 200,000 records outlasted the default 3 s on a loaded host). Every record goes, and
/// the bookkeeping with them. On a server of its own: 200,000 keys in the shared one would
/// slow down every listing of the tests running beside it (`SCAN` walks the whole database).
#[test]
fn clearing_many_records_keeps_the_bound_per_page() {
    let Some(server) = OwnServer::start(&[]) else {
        return;
    };
    let mut ns = RedisNamespace::fresh();
    ns.url = server.url();
    let writer = RedisBackend::open(&ns.url, &ns.namespace, &RedisOptions::default()).unwrap();
    let now = Timestamp::now();
    let hour = Some(Timestamp(now.0 + 3_600_000));
    for chunk in 0..20 {
        let ops: Vec<WriteOp> = (0..10_000)
            .map(|i| WriteOp::Put {
                key: format!("k{chunk}:{i}"),
                record: record(b"a value", now, hour.filter(|_| i % 4 == 0)),
                mode: PutMode::Upsert,
            })
            .collect();
        writer.write(ops, now).unwrap();
    }
    let usage = writer.usage(now).unwrap();
    assert_eq!(usage.item_count, 200_000);
    let options = RedisOptions {
        connect_timeout: Duration::from_millis(500),
        response_timeout: Duration::from_millis(1000),
        ..RedisOptions::default()
    };
    let b = RedisBackend::open(&ns.url, &ns.namespace, &options).unwrap();
    let started = Instant::now();
    b.clear().unwrap();
    eprintln!("cleared 200,000 records in {:?}", started.elapsed());
    let usage = b.usage(Timestamp::now()).unwrap();
    assert_eq!((usage.item_count, usage.total_size), (0, 0));
    assert!(ns.keys().is_empty(), "{} keys left", ns.keys().len());
}
