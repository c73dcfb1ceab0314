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

use bevy_storage::backend::{
    Backend, PutMode, Record, RecordMeta, RedisBackend, RedisOptions, WriteOp,
};
use bevy_storage::clock::Timestamp;
use bevy_storage::prelude::*;
use bevy_storage::{BackendConfig, CustomMetadata};
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
    store.save(key, value, &SaveOptions::default()).unwrap()
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
        },
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
                            Ok(()) => 1,
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
    let record_key = format!("{{{}}}:r:session:1", ns.namespace);
    let pttl: i64 = redis::cmd("PTTL").arg(&record_key).query(&mut con).unwrap();
    assert!(0 < pttl && pttl <= 400, "PTTL {pttl}");
    // Value and metadata are one hash, so they expire together.
    let fields: Vec<String> = redis::cmd("HKEYS")
        .arg(&record_key)
        .query(&mut con)
        .unwrap();
    for field in ["v", "s", "c", "m", "a", "x", "f", "u"] {
        assert!(fields.iter().any(|f| f == field), "{field} in {fields:?}");
    }
    assert_eq!(s.get_stats().item_count, 2);

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
    assert_eq!(
        left,
        [
            format!("{{{}}}:r:forever", ns.namespace),
            format!("{{{}}}:usage", ns.namespace)
        ]
    );
}

#[test]
fn bookkeeping_matches_a_full_recount() {
    require_redis!();
    let ns = RedisNamespace::fresh();
    let b = RedisBackend::open(&ns.url, &ns.namespace, &RedisOptions::default()).unwrap();
    let recount = |now: Timestamp| {
        let live: Vec<_> = b
            .scan("")
            .unwrap()
            .into_iter()
            .filter(|e| !now.is_past(e.expires_at))
            .collect();
        (live.len() as u64, live.iter().map(|e| e.size).sum::<u64>())
    };
    // A small deterministic generator: no dependency, same run every time.
    let mut state = 0x2545_f491_4f6c_dd1d_u64;
    let mut next = |n: u64| {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state % n
    };
    let start = Timestamp::now();
    for step in 0..400 {
        let now = Timestamp(start.0 + step);
        let key = format!("k{}", next(40));
        let value = vec![b'x'; next(64) as usize];
        let expires_at = match next(5) {
            0 => Some(Timestamp(now.0 - 10_000)), // already past by Redis's clock too
            1 => Some(Timestamp(now.0 + 50)),     // Redis expires it during the run
            2 => Some(Timestamp(now.0 + 200)),    // expired by `now` later, still in Redis
            _ => None,
        };
        let mode = if next(4) == 0 {
            PutMode::CreateOnly
        } else {
            PutMode::Upsert
        };
        let mut ops = vec![WriteOp::Put {
            key: key.clone(),
            record: record(&value, now, expires_at),
            mode,
        }];
        if next(3) == 0 {
            ops.push(WriteOp::Delete {
                key: format!("k{}", next(40)),
            });
        }
        match b.write(ops, now) {
            Ok(_) | Err(StorageError::AlreadyExists { .. }) => {}
            Err(e) => panic!("{e}"),
        }
        if step % 97 == 0 {
            b.purge_expired(now).unwrap();
        }
        if step % 20 == 0 {
            thread::sleep(Duration::from_millis(30));
        }
        // Redis may expire a record between the two reads: retry before calling it a mismatch.
        let mut last = None;
        let agreed = (0..3).any(|_| {
            let usage = b.usage(now).unwrap();
            let counted = recount(now);
            last = Some(((usage.item_count, usage.total_size), counted));
            (usage.item_count, usage.total_size) == counted
        });
        assert!(agreed, "step {step}: usage vs recount {last:?}");
    }
    b.clear().unwrap();
    assert_eq!(b.usage(Timestamp::now()).unwrap().item_count, 0);
    assert!(ns.keys().is_empty(), "{:?}", ns.keys());
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
    // Unavailable, never another error and never a hang.
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
                        Ok(()) => ok += 1,
                        Err(StorageError::Unavailable { .. }) => failed += 1,
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
