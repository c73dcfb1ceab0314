//! The PostgreSQL backend against a real server: namespaces, several stores sharing one,
//! connection strings and secrets, the schema version, and a hung or vanished server seen
//! through a proxy this test controls.
//!
//! The server is `POSTGRES_URL` (default `postgres://postgres@127.0.0.1:5432/test`); every
//! test uses namespaces of its own and removes them. Under `CI=true` a missing server fails
//! these tests; locally they say loudly that they were skipped.
#![cfg(feature = "postgres")]

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use bevy_storage::prelude::*;
use bevy_storage::{BackendConfig, StorageOperation};
use common::{PostgresNamespace, check_postgres, postgres_kind, postgres_url};

/// Skips (locally) or fails (under CI) the test when the server is missing.
macro_rules! require_postgres {
    () => {
        if postgres_kind().is_none() {
            return;
        }
    };
}

fn store_at(url: &str, namespace: &str) -> Store {
    Store::open(StorageConfig::postgres(url, namespace)).unwrap()
}

fn load<T: serde::de::DeserializeOwned>(store: &Store, key: &str) -> Option<T> {
    store.load(key, &LoadOptions::default()).unwrap()
}

fn save<T: serde::Serialize>(store: &Store, key: &str, value: &T) {
    store.save(key, value, &SaveOptions::default()).unwrap();
}

/// `host:port` of the test server, from its URL.
fn server_address() -> String {
    let url = postgres_url();
    let after_scheme = url.split_once("://").map_or(url.as_str(), |(_, r)| r);
    let after_user = after_scheme
        .rsplit_once('@')
        .map_or(after_scheme, |(_, r)| r);
    let host_port = after_user.split(['/', '?']).next().unwrap();
    if host_port.contains(':') {
        host_port.to_owned()
    } else {
        format!("{host_port}:5432")
    }
}

/// The test URL with its host and port replaced by `127.0.0.1:port` and a password added.
fn url_through(port: u16, password: &str) -> String {
    let url = postgres_url();
    let database = url.rsplit_once('/').map_or("test", |(_, db)| db);
    format!("postgres://postgres:{password}@127.0.0.1:{port}/{database}")
}

#[test]
fn namespaces_are_isolated_even_when_one_prefixes_another() {
    require_postgres!();
    let (a, b, c) = (
        PostgresNamespace::fresh(),
        PostgresNamespace::fresh(),
        PostgresNamespace::fresh(),
    );
    let game = store_at(&a.url, &a.namespace);
    let game_eu = store_at(&b.url, &format!("{}:eu", a.namespace));
    let wild = store_at(&c.url, &format!("{}%", a.namespace.replace(':', "_")));
    save(&game, "player:1", &1u32);
    save(&game_eu, "player:1", &2u32);
    save(&wild, "player:1", &3u32);
    assert_eq!(load::<u32>(&game, "player:1"), Some(1));
    assert_eq!(load::<u32>(&game_eu, "player:1"), Some(2));
    assert_eq!(load::<u32>(&wild, "player:1"), Some(3));
    assert_eq!(game.list_keys("").unwrap(), vec!["player:1".to_owned()]);
    game.clear().unwrap();
    assert_eq!(load::<u32>(&game, "player:1"), None);
    assert_eq!(load::<u32>(&game_eu, "player:1"), Some(2));
    assert_eq!(load::<u32>(&wild, "player:1"), Some(3));
    game_eu.clear().unwrap();
    wild.clear().unwrap();
}

#[test]
fn stores_sharing_a_namespace_see_each_others_writes_and_race_fairly() {
    require_postgres!();
    let ns = PostgresNamespace::fresh();
    let servers: Vec<Store> = (0..3).map(|_| store_at(&ns.url, &ns.namespace)).collect();
    save(&servers[0], "profile:ada", &"v1".to_owned());
    assert_eq!(
        load::<String>(&servers[1], "profile:ada").as_deref(),
        Some("v1")
    );
    servers[2].delete("profile:ada").unwrap();
    assert_eq!(load::<String>(&servers[0], "profile:ada"), None);

    // Create-only claims from three servers × four threads: exactly one winner per key.
    let wins = AtomicUsize::new(0);
    let refused = AtomicUsize::new(0);
    thread::scope(|s| {
        for (i, server) in servers.iter().enumerate() {
            for t in 0..4 {
                let (wins, refused) = (&wins, &refused);
                s.spawn(move || {
                    for k in 0..25 {
                        let options = SaveOptions::default().overwrite(false);
                        match server.save(&format!("claim:{k}"), &(i, t), &options) {
                            Ok(_) => wins.fetch_add(1, Ordering::Relaxed),
                            Err(StorageError::AlreadyExists { .. }) => {
                                refused.fetch_add(1, Ordering::Relaxed)
                            }
                            Err(e) => panic!("{e}"),
                        };
                    }
                });
            }
        }
    });
    assert_eq!(wins.load(Ordering::Relaxed), 25);
    assert_eq!(refused.load(Ordering::Relaxed), 25 * 11);
    assert_eq!(servers[1].list_keys("claim:").unwrap().len(), 25);
}

#[test]
fn connection_strings_and_secrets() {
    require_postgres!();
    let config = StorageConfig::from_url(
        "postgres://game:hunter2@db.example:5432/saves?sslmode=disable&namespace=eu:1",
    )
    .unwrap();
    let debug = format!("{config:?}");
    assert!(!debug.contains("hunter2"), "{debug}");
    match &config.backend {
        BackendConfig::Postgres { url, namespace } => {
            assert_eq!(
                url,
                "postgres://game:hunter2@db.example:5432/saves?sslmode=disable"
            );
            assert_eq!(namespace, "eu:1");
        }
        other => panic!("{other:?}"),
    }
    assert!(!config.backend.describe().contains("hunter2"));
    match StorageConfig::from_url("postgresql://localhost/db")
        .unwrap()
        .backend
    {
        BackendConfig::Postgres { namespace, .. } => assert_eq!(namespace, "bevy_storage"),
        other => panic!("{other:?}"),
    }

    // A refused connection never echoes the password.
    let nowhere = url_through(free_port(), "hunter2");
    let err = Store::open(StorageConfig::postgres(&nowhere, "ok")).unwrap_err();
    assert!(matches!(err, StorageError::Unavailable { .. }), "{err}");
    assert!(!err.to_string().contains("hunter2"), "{err}");
    assert!(!format!("{err:?}").contains("hunter2"), "{err:?}");

    let err = Store::open(StorageConfig::postgres(postgres_url(), "")).unwrap_err();
    assert!(matches!(err, StorageError::Config(_)), "{err}");
    let err = Store::open(StorageConfig::postgres(postgres_url(), "ok").pool_size(0)).unwrap_err();
    assert!(matches!(err, StorageError::Config(_)), "{err}");
    let err = Store::open(StorageConfig::postgres("postgres://h:notaport/db", "ok")).unwrap_err();
    assert!(matches!(err, StorageError::Config(_)), "{err}");
}

#[test]
fn a_newer_schema_is_refused_and_an_older_one_migrated() {
    require_postgres!();
    // A database of its own: the shared one's schema must not change under other tests.
    let mut admin = postgres::Client::connect(&postgres_url(), postgres::NoTls).unwrap();
    let mut bytes = [0u8; 6];
    getrandom::fill(&mut bytes).unwrap();
    let db: String = format!(
        "bevy_storage_{}",
        bytes.iter().map(|b| format!("{b:02x}")).collect::<String>()
    );
    admin
        .batch_execute(&format!("CREATE DATABASE {db}"))
        .unwrap();
    let url = format!(
        "{}/{db}",
        postgres_url().rsplit_once('/').map_or("", |(base, _)| base)
    );
    let result = std::panic::catch_unwind(|| {
        let store = store_at(&url, "game");
        save(&store, "kept", &7u8);
        drop(store);
        let mut con = postgres::Client::connect(&url, postgres::NoTls).unwrap();
        con.batch_execute("UPDATE bevy_storage_schema SET version = 99")
            .unwrap();
        let err = Store::open(StorageConfig::postgres(&url, "game")).unwrap_err();
        assert!(matches!(err, StorageError::Config(_)), "{err}");
        assert!(err.to_string().contains("newer"), "{err}");
        // Schema version 1 (before records had versions): opening adds the column, and its
        // records read as version 0 until written again.
        con.batch_execute(
            "ALTER TABLE bevy_storage_records DROP COLUMN version; \
             UPDATE bevy_storage_schema SET version = 1",
        )
        .unwrap();
        let store = store_at(&url, "game");
        assert_eq!(load::<u8>(&store, "kept"), Some(7));
        assert_eq!(
            store.get_metadata("kept").unwrap().unwrap().version,
            bevy_storage::RecordVersion(0)
        );
        let v = store
            .save(
                "kept",
                &8u8,
                &SaveOptions::new().if_version(bevy_storage::RecordVersion(0)),
            )
            .unwrap();
        assert_eq!(store.get_metadata("kept").unwrap().unwrap().version, v);
        let row = con
            .query_one("SELECT version FROM bevy_storage_schema", &[])
            .unwrap();
        assert_eq!(row.get::<_, i32>(0), 2);
        // A schema-2 database of the releases before the single-put functions (the write
        // function only): opening installs them, single saves go through `_put_v3`, batches
        // still through the write function, and `_put_v2` is left to servers of the release
        // before (called by none here). Functions are counted for this database only.
        drop(store);
        con.batch_execute(&format!(
            "DROP FUNCTION bevy_storage_put_v2; DROP FUNCTION bevy_storage_put_v3; \
             ALTER DATABASE {db} SET track_functions = 'pl'"
        ))
        .unwrap();
        let store = store_at(&url, "game");
        for name in ["bevy_storage_put_v2", "bevy_storage_put_v3"] {
            let present = con
                .query_one("SELECT count(*) FROM pg_proc WHERE proname = $1", &[&name])
                .unwrap();
            assert_eq!(present.get::<_, i64>(0), 1, "{name}");
        }
        let v = store
            .save("kept", &9u8, &SaveOptions::new().if_version(v))
            .unwrap();
        assert_eq!(load::<u8>(&store, "kept"), Some(9));
        assert_eq!(store.get_metadata("kept").unwrap().unwrap().version, v);
        let err = store
            .save("kept", &10u8, &SaveOptions::new().overwrite(false))
            .unwrap_err();
        assert!(matches!(err, StorageError::AlreadyExists { .. }), "{err}");
        save(&store, "c", &3u8);
        store
            .transaction(vec![
                bevy_storage::StorageOperation::save("a", 1u8),
                bevy_storage::StorageOperation::save("b", 2u8),
            ])
            .unwrap();
        assert_eq!(load::<u8>(&store, "b"), Some(2));
        let stats = store.get_stats();
        let now = bevy_storage::clock::Timestamp::now().0;
        assert_eq!(
            (stats.item_count, stats.total_size),
            recount(&url, "game", now)
        );
        assert_eq!(stats.item_count, 4);
        // A backend reports its function calls when it ends: close the store's connections
        // and wait for them.
        drop(store);
        let calls = |con: &mut postgres::Client, name: &str| -> i64 {
            con.query_one(
                "SELECT coalesce(sum(calls), 0)::bigint FROM pg_stat_user_functions \
                 WHERE funcname = $1",
                &[&name],
            )
            .unwrap()
            .get(0)
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while calls(&mut con, "bevy_storage_put_v3") < 2 && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(50));
        }
        // The two saves that wrote (a refused call may go uncounted: it ends in an error).
        assert!(calls(&mut con, "bevy_storage_put_v3") >= 2);
        assert_eq!(calls(&mut con, "bevy_storage_put_v2"), 0);
        assert!(calls(&mut con, "bevy_storage_write_v2") >= 1);
    });
    admin
        .batch_execute(&format!("DROP DATABASE {db} WITH (FORCE)"))
        .unwrap();
    result.unwrap();
}

#[test]
fn ci_requires_postgres_and_local_runs_skip_loudly() {
    let nowhere = url_through(free_port(), "secret");
    let notice = check_postgres(&nowhere, false).expect_err("nothing listens there");
    assert!(notice.contains("SKIPPED"), "{notice}");
    assert!(!notice.contains("secret"), "{notice}");
    let under_ci = std::panic::catch_unwind(|| check_postgres(&nowhere, true));
    let message = under_ci.expect_err("under CI a missing server is a failure");
    let message = message
        .downcast_ref::<String>()
        .cloned()
        .unwrap_or_default();
    assert!(message.contains("CI=true"), "{message}");
}

// ------------------------------------------------------------ a server that hangs or goes away

/// A TCP proxy in front of the test server that can stop answering (as a server stopped with
/// `SIGSTOP` does: the connection stays open, nothing comes back) or drop every connection.
struct Proxy {
    port: u16,
    frozen: Arc<AtomicBool>,
    cut: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
}

impl Proxy {
    fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let proxy = Self {
            port: listener.local_addr().unwrap().port(),
            frozen: Arc::default(),
            cut: Arc::default(),
            stop: Arc::default(),
        };
        let (frozen, cut, stop) = (
            Arc::clone(&proxy.frozen),
            Arc::clone(&proxy.cut),
            Arc::clone(&proxy.stop),
        );
        let upstream = server_address();
        thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((client, _)) => {
                        if cut.load(Ordering::Relaxed) {
                            drop(client);
                            continue;
                        }
                        let Ok(server) = TcpStream::connect(&upstream) else {
                            continue;
                        };
                        for (from, to) in [
                            (client.try_clone().unwrap(), server.try_clone().unwrap()),
                            (server, client),
                        ] {
                            let (frozen, cut) = (Arc::clone(&frozen), Arc::clone(&cut));
                            thread::spawn(move || pump(from, to, &frozen, &cut));
                        }
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {
                        thread::sleep(Duration::from_millis(5))
                    }
                    Err(_) => return,
                }
            }
        });
        proxy
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        self.cut.store(true, Ordering::Relaxed);
    }
}

/// Copies bytes from `from` to `to` until either side closes or the proxy is cut; while
/// frozen, nothing is read or forwarded.
fn pump(mut from: TcpStream, mut to: TcpStream, frozen: &AtomicBool, cut: &AtomicBool) {
    from.set_read_timeout(Some(Duration::from_millis(20)))
        .unwrap();
    let mut buf = [0u8; 16 * 1024];
    loop {
        if cut.load(Ordering::Relaxed) {
            let _ = from.shutdown(Shutdown::Both);
            let _ = to.shutdown(Shutdown::Both);
            return;
        }
        if frozen.load(Ordering::Relaxed) {
            thread::sleep(Duration::from_millis(10));
            continue;
        }
        match from.read(&mut buf) {
            Ok(0) => {
                let _ = to.shutdown(Shutdown::Write);
                return;
            }
            Ok(n) => {
                if to.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => return,
        }
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The documented bound (connect + response timeout, 3 s) with room for a loaded machine.
const BOUND: Duration = Duration::from_millis(3_500);

/// Runs every kind of operation at once against `store` and returns, per operation, its
/// result as `Err(message)` and how long it took.
fn every_operation(store: &Store) -> Vec<(&'static str, Result<(), StorageError>, Duration)> {
    type Op = fn(&Store) -> Result<(), StorageError>;
    let ops: [(&'static str, Op); 8] = [
        ("save", |s| {
            s.save("k", &1u32, &SaveOptions::default()).map(drop)
        }),
        ("load", |s| {
            s.load::<u32>("k", &LoadOptions::default()).map(drop)
        }),
        ("exists", |s| s.exists("k").map(drop)),
        ("list", |s| s.list_keys("").map(drop)),
        ("delete", |s| s.delete("other").map(drop)),
        ("metadata", |s| s.get_metadata("k").map(drop)),
        ("transaction", |s| {
            s.transaction(vec![
                StorageOperation::save("a", 1u8),
                StorageOperation::delete("b"),
            ])
        }),
        ("purge", |s| s.purge_expired().map(drop)),
    ];
    thread::scope(|scope| {
        let handles: Vec<_> = ops
            .iter()
            .map(|(name, op)| {
                scope.spawn(move || {
                    let started = Instant::now();
                    let result = op(store);
                    (*name, result, started.elapsed())
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

/// Asserts an operation of [`every_operation`] failed as unreachable (or, for a write sent,
/// with an unknown outcome) within the bound, and returns its error.
fn bounded_failure(name: &str, result: Result<(), StorageError>, took: Duration) -> StorageError {
    let err = result.expect_err(name);
    assert!(
        matches!(
            err,
            StorageError::Unavailable { .. } | StorageError::OutcomeUnknown { .. }
        ),
        "{name}: {err}"
    );
    assert!(
        took < BOUND,
        "{name} took {took:?} with the server gone or hung"
    );
    err
}

#[test]
fn a_hung_server_fails_every_operation_within_the_bound_and_recovery_follows() {
    require_postgres!();
    let ns = PostgresNamespace::fresh();
    let proxy = Proxy::start();
    let url = url_through(proxy.port, "hunter2");
    let store = store_at(&url, &ns.namespace);
    save(&store, "k", &1u32);

    proxy.frozen.store(true, Ordering::Relaxed);
    // A pump already in its 20 ms read still forwards what arrives meanwhile: let every pump
    // see the freeze before the write (a batch is one round trip, so it would slip through).
    thread::sleep(Duration::from_millis(60));
    // A write sent on the idle connection, then no answer: its outcome is unknown, and it says so.
    let started = Instant::now();
    let err = store.save("k", &2u32, &SaveOptions::default()).unwrap_err();
    assert!(started.elapsed() < BOUND, "{:?}", started.elapsed());
    assert!(matches!(err, StorageError::OutcomeUnknown { .. }), "{err}");
    assert!(
        err.to_string().contains("may or may not have been applied"),
        "{err}"
    );
    // Every kind of operation at once: each gets no connection or no answer, within the bound.
    for (name, result, took) in every_operation(&store) {
        let err = bounded_failure(name, result, took);
        assert!(!err.to_string().contains("hunter2"), "{name}: {err}");
        let message = err.to_string();
        assert!(
            message.contains("no connection") || message.contains("did not answer"),
            "{name}: {err}"
        );
    }
    let stats = store.get_stats();
    assert!(!stats.is_healthy, "{stats:?}");

    // The server answers again: the connections that hung were closed, new ones work.
    proxy.frozen.store(false, Ordering::Relaxed);
    let started = Instant::now();
    for (name, result, _) in every_operation(&store) {
        result.unwrap_or_else(|e| panic!("{name} after recovery: {e}"));
    }
    assert!(started.elapsed() < BOUND);
    // The write whose outcome was unknown either happened whole or not at all.
    assert!(matches!(load::<u32>(&store, "k"), Some(1 | 2)));
    assert!(store.get_stats().is_healthy);
}

#[test]
fn a_vanished_server_is_unavailable_at_once_and_recovery_follows() {
    require_postgres!();
    let ns = PostgresNamespace::fresh();
    let proxy = Proxy::start();
    let store = store_at(&url_through(proxy.port, "pw"), &ns.namespace);
    save(&store, "k", &1u32);

    proxy.cut.store(true, Ordering::Relaxed);
    thread::sleep(Duration::from_millis(100));
    for (name, result, took) in every_operation(&store) {
        bounded_failure(name, result, took);
    }
    let err = Store::open(StorageConfig::postgres(
        url_through(proxy.port, "pw"),
        &ns.namespace,
    ))
    .unwrap_err();
    assert!(matches!(err, StorageError::Unavailable { .. }), "{err}");

    proxy.cut.store(false, Ordering::Relaxed);
    for (name, result, _) in every_operation(&store) {
        result.unwrap_or_else(|e| panic!("{name} after recovery: {e}"));
    }
    assert_eq!(load::<u32>(&store, "k"), Some(1));
}

// ------------------------------------------------------------ one quota for every server

/// Bytes that do not compress, so sizes on disk follow sizes saved.
fn noise(len: usize) -> Vec<u8> {
    let mut bytes = vec![0u8; len];
    getrandom::fill(&mut bytes).unwrap();
    bytes
}

/// The live records' count and size, counted from the table itself.
fn recount(url: &str, namespace: &str, now: i64) -> (u64, u64) {
    let mut con = postgres::Client::connect(url, postgres::NoTls).unwrap();
    let row = con
        .query_one(
            "SELECT count(*), coalesce(sum(size), 0)::bigint FROM bevy_storage_records \
             WHERE namespace = $1 AND (expires_at IS NULL OR expires_at > $2)",
            &[&namespace, &now],
        )
        .unwrap();
    (row.get::<_, i64>(0) as u64, row.get::<_, i64>(1) as u64)
}

#[test]
fn the_quota_holds_across_servers_racing_to_fill_it() {
    require_postgres!();
    let ns = PostgresNamespace::fresh();
    const MAX: u64 = 20_000;
    let servers: Vec<Store> = (0..3)
        .map(|_| {
            Store::open(StorageConfig::postgres(&ns.url, &ns.namespace).max_size(Some(MAX)))
                .unwrap()
        })
        .collect();
    let saved = AtomicUsize::new(0);
    let refused = AtomicUsize::new(0);
    thread::scope(|s| {
        for (i, server) in servers.iter().enumerate() {
            for t in 0..3 {
                let (saved, refused) = (&saved, &refused);
                s.spawn(move || {
                    for k in 0..40 {
                        let value = noise(400);
                        match server.save(
                            &format!("s{i}:t{t}:{k}"),
                            &value,
                            &SaveOptions::default(),
                        ) {
                            Ok(_) => saved.fetch_add(1, Ordering::Relaxed),
                            Err(StorageError::QuotaExceeded { max_size, .. }) => {
                                assert_eq!(max_size, MAX);
                                refused.fetch_add(1, Ordering::Relaxed)
                            }
                            Err(e) => panic!("{e}"),
                        };
                    }
                });
            }
        }
    });
    let now = bevy_storage::clock::Timestamp::now().0;
    let (items, size) = recount(&ns.url, &ns.namespace, now);
    assert!(size <= MAX, "{size} bytes stored under a quota of {MAX}");
    assert!(
        refused.load(Ordering::Relaxed) > 0,
        "the race must reach the quota"
    );
    assert_eq!(items as usize, saved.load(Ordering::Relaxed));
    // Every server reports the same usage, read from the shared counters.
    for server in &servers {
        let stats = server.get_stats();
        assert_eq!((stats.item_count, stats.total_size), (items, size));
    }
    // Space freed by one server is usable by another.
    let first = servers[0].list_keys("s0:").unwrap();
    for key in &first {
        servers[0].delete(key).unwrap();
    }
    servers[1]
        .save("after", &noise(400), &SaveOptions::default())
        .unwrap();
}

#[test]
fn expired_records_do_not_count_and_the_counters_match_a_recount() {
    require_postgres!();
    let ns = PostgresNamespace::fresh();
    let clock = bevy_storage::clock::ManualClock::starting_now();
    let config = |max: u64| {
        StorageConfig::postgres(&ns.url, &ns.namespace)
            .max_size(Some(max))
            .clock(clock.clone())
    };
    let store = Store::open(config(1 << 20)).unwrap();
    let ttl = SaveOptions::default().ttl(Duration::from_secs(60));
    for k in 0..8 {
        store
            .save(&format!("short:{k}"), &noise(1_000), &ttl)
            .unwrap();
    }
    // A second server whose quota leaves 4,000 bytes free: the big save (about 8 KiB once
    // encoded) does not fit while the short-lived records live.
    let used = store.get_stats().total_size;
    let other = Store::open(config(used + 4_000)).unwrap();
    let err = other
        .save("big", &noise(3_000), &SaveOptions::default())
        .unwrap_err();
    assert!(matches!(err, StorageError::QuotaExceeded { .. }), "{err}");
    clock.advance(Duration::from_secs(61));
    // Expired, not yet purged: no longer counted, so the save fits.
    other
        .save("big", &noise(3_000), &SaveOptions::default())
        .unwrap();

    // Random mixed batches from two stores: the counters always equal a full recount.
    let mut rng = fastrand::Rng::with_seed(7);
    for round in 0..60 {
        let s = if round % 2 == 0 { &store } else { &other };
        let mut ops = Vec::new();
        for _ in 0..rng.usize(1..5) {
            let key = format!("k{}", rng.usize(0..12));
            ops.push(if rng.bool() {
                StorageOperation::save(key, vec![0u8; rng.usize(1..300)])
            } else {
                StorageOperation::delete(key)
            });
        }
        s.transaction(ops).unwrap();
        if round % 10 == 0 {
            clock.advance(Duration::from_secs(1));
            s.purge_expired().unwrap();
        }
        let stats = other.get_stats();
        assert_eq!(
            (stats.item_count, stats.total_size),
            recount(
                &ns.url,
                &ns.namespace,
                bevy_storage::clock::Clock::now(&clock).0
            ),
            "round {round}"
        );
    }
    store.clear().unwrap();
    assert_eq!(other.get_stats().item_count, 0);
}

/// Servers of the release before `bevy_storage_put_v3` write through `_put_v2` and
/// `_write_v2` while this build's single saves go through `_put_v3`, on the same keys of one
/// namespace. Every writer locks the namespace's counters before any record, so none
/// deadlocks (the old writers here do not retry: a deadlock fails the test) and the counters
/// equal a recount.
#[test]
fn single_saves_race_the_previous_release_s_writers_without_deadlock_or_miscount() {
    require_postgres!();
    let ns = PostgresNamespace::fresh();
    let stores: Vec<Store> = (0..2).map(|_| store_at(&ns.url, &ns.namespace)).collect();
    const KEYS: usize = 4;
    const ROUNDS: usize = 150;
    thread::scope(|s| {
        for (i, store) in stores.iter().enumerate() {
            for t in 0..2 {
                s.spawn(move || {
                    let mut rng = fastrand::Rng::with_seed((i * 2 + t) as u64);
                    for _ in 0..ROUNDS {
                        let key = format!("k{}", rng.usize(0..KEYS));
                        let value = noise(rng.usize(1..200));
                        let done = match rng.usize(0..5) {
                            0 => store.delete(&key).map(drop),
                            1 => store
                                .transaction(vec![
                                    StorageOperation::save(key.clone(), value),
                                    StorageOperation::delete(format!("k{}", rng.usize(0..KEYS))),
                                ])
                                .map(drop),
                            _ => store.save(&key, &value, &SaveOptions::default()).map(drop),
                        };
                        done.unwrap();
                    }
                });
            }
        }
        for t in 0..2u64 {
            let (url, namespace) = (&ns.url, ns.namespace.as_str());
            s.spawn(move || {
                let mut con = postgres::Client::connect(url, postgres::NoTls).unwrap();
                let put = con
                    .prepare(
                        "SELECT bevy_storage_put_v2($1, $2, NULL, 'U', $3, $2, $2, $2, NULL, $4, \
                         false, false, NULL, $5, $6, 0)",
                    )
                    .unwrap();
                let write = con
                    .prepare(
                        "SELECT bevy_storage_write_v2($1, $2, NULL, $3, $4, $5, $5, $5, $6, $7, \
                         $8, $8, $9, $10, $11, $12)",
                    )
                    .unwrap();
                let mut rng = fastrand::Rng::with_seed(100 + t);
                for round in 0..ROUNDS {
                    let now = bevy_storage::clock::Timestamp::now().0;
                    let key = format!("k{}", rng.usize(0..KEYS));
                    let value = noise(rng.usize(1..200));
                    let size = value.len() as i64;
                    let version = (t * 1_000 + round as u64) as i64;
                    if rng.bool() {
                        con.query_one(&put, &[&namespace, &now, &key, &size, &value, &version])
                            .unwrap();
                    } else {
                        let other = format!("k{}", rng.usize(0..KEYS));
                        con.query_one(
                            &write,
                            &[
                                &namespace,
                                &now,
                                &vec![b'U' as i8, b'D' as i8],
                                &vec![key, other],
                                &vec![now, 0],
                                &vec![None::<i64>; 2],
                                &vec![size, 0],
                                &vec![false; 2],
                                &vec![None::<String>; 2],
                                &vec![value, Vec::new()],
                                &vec![version, 0],
                                &vec![0i64; 2],
                            ],
                        )
                        .unwrap();
                    }
                }
            });
        }
    });
    let now = bevy_storage::clock::Timestamp::now().0;
    let stats = stores[0].get_stats();
    assert_eq!(
        (stats.item_count, stats.total_size),
        recount(&ns.url, &ns.namespace, now)
    );
}

// ------------------------------------------------------------ TLS (feature postgres-tls)

#[cfg(feature = "postgres-tls")]
mod tls {
    use super::*;
    use common::{check_postgres_tls, postgres_tls, with_query};
    use std::path::Path;

    /// Skips (locally) or fails (under CI) the test when the server has no TLS; else its CA.
    macro_rules! require_tls {
        () => {
            match postgres_tls() {
                Some(ca) => ca,
                None => return,
            }
        };
    }

    /// A name no other test's connections carry, to find this store's in `pg_stat_activity`.
    fn unique_name() -> String {
        let mut bytes = [0u8; 6];
        getrandom::fill(&mut bytes).unwrap();
        let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        format!("bevy_storage_tls_{hex}")
    }

    /// The test URL with a password (trust auth ignores it; messages must hide it) and `params`.
    fn tls_url(params: &str) -> String {
        let url =
            postgres_url().replacen("postgres://postgres@", "postgres://postgres:hunter2@", 1);
        with_query(&url, params)
    }

    /// Whether the server reports every session of `application_name` encrypted, asked over a
    /// connection of its own (plaintext: the answer is the server's view of the others).
    fn server_sees_encrypted(application_name: &str) -> bool {
        let mut con = postgres::Client::connect(&postgres_url(), postgres::NoTls).unwrap();
        let row = con
            .query_one(
                "SELECT count(*), coalesce(bool_and(s.ssl), false) FROM pg_stat_activity a \
                 JOIN pg_stat_ssl s USING (pid) WHERE a.application_name = $1",
                &[&application_name],
            )
            .unwrap();
        let (sessions, all_ssl): (i64, bool) = (row.get(0), row.get(1));
        assert!(sessions >= 1, "no session named {application_name}");
        all_ssl
    }

    /// Saves and loads through a store at `url` and returns whether the server saw its
    /// sessions encrypted.
    fn round_trip(url: &str) -> bool {
        let name = unique_name();
        let ns = PostgresNamespace::fresh();
        let store = store_at(
            &with_query(url, &format!("application_name={name}")),
            &ns.namespace,
        );
        save(&store, "profile:ada", &"over TLS".to_owned());
        assert_eq!(
            load::<String>(&store, "profile:ada").as_deref(),
            Some("over TLS")
        );
        store.delete("profile:ada").unwrap();
        // The pool keeps the connection open: the server still lists it.
        server_sees_encrypted(&name)
    }

    /// A CA of its own, which signed nothing the server holds.
    fn other_ca(dir: &Path) -> std::path::PathBuf {
        let (key, cert) = (dir.join("other.key"), dir.join("other.crt"));
        let status = std::process::Command::new("openssl")
            .args([
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
            ])
            .args([
                "-nodes",
                "-days",
                "2",
                "-subj",
                "/CN=not the server's CA",
                "-keyout",
            ])
            .arg(&key)
            .arg("-out")
            .arg(&cert)
            .stderr(std::process::Stdio::null())
            .status()
            .expect("the openssl command (Debian's openssl package)");
        assert!(status.success());
        cert
    }

    /// A server whose certificate the CA did not sign (or no TLS, or no CA file) fails the TLS
    /// tests under CI and skips them loudly otherwise.
    #[test]
    fn ci_requires_tls_and_local_runs_skip_loudly() {
        require_postgres!();
        let missing = std::path::Path::new("/nonexistent/ca.crt");
        let notice = check_postgres_tls(&postgres_url(), missing, false).expect_err("no CA");
        assert!(notice.contains("SKIPPED"), "{notice}");
        let under_ci =
            std::panic::catch_unwind(|| check_postgres_tls(&postgres_url(), missing, true));
        let message = under_ci.expect_err("under CI a server without TLS is a failure");
        let message = message
            .downcast_ref::<String>()
            .cloned()
            .unwrap_or_default();
        assert!(message.contains("CI=true"), "{message}");
    }

    #[test]
    fn verify_full_with_the_ca_saves_loads_and_the_session_is_encrypted() {
        let ca = require_tls!();
        let url = tls_url(&format!("sslmode=verify-full&sslrootcert={}", ca.display()));
        assert!(round_trip(&url), "the server saw a plaintext session");
        // The same through the config's builder.
        let ns = PostgresNamespace::fresh();
        let store = Store::open(
            StorageConfig::postgres(postgres_url(), &ns.namespace).postgres_root_cert(&ca),
        )
        .unwrap();
        save(&store, "k", &1u8);
        assert_eq!(load::<u8>(&store, "k"), Some(1));
    }

    #[test]
    fn require_encrypts_without_a_ca_and_disable_does_not() {
        require_tls!();
        assert!(round_trip(&tls_url("sslmode=require")));
        // The default (prefer) takes TLS when the server offers it, as libpq does.
        assert!(round_trip(&tls_url("")));
        assert!(!round_trip(&tls_url("sslmode=disable")));
    }

    #[test]
    fn verify_ca_checks_the_chain_and_verify_full_the_host_name_too() {
        let ca = require_tls!();
        // The certificate names localhost and 127.0.0.1, not db.invalid; `hostaddr` still
        // connects to the test server.
        let database = postgres_url()
            .rsplit_once('/')
            .map_or("test".to_owned(), |(_, d)| d.to_owned());
        let address = server_address();
        let (host, port) = address.rsplit_once(':').unwrap();
        let base =
            format!("postgres://postgres:hunter2@db.invalid:{port}/{database}?hostaddr={host}");
        let root = format!("sslrootcert={}", ca.display());
        for mode in ["verify-ca", "require"] {
            assert!(
                round_trip(&format!("{base}&sslmode={mode}&{root}")),
                "{mode}"
            );
        }
        let started = Instant::now();
        let err = Store::open(StorageConfig::postgres(
            format!("{base}&sslmode=verify-full&{root}"),
            "test:tls",
        ))
        .unwrap_err();
        assert!(started.elapsed() < BOUND, "{:?}", started.elapsed());
        assert!(matches!(err, StorageError::Unavailable { .. }), "{err}");
        let message = err.to_string();
        eprintln!("verify-full, another host name: {message}");
        assert!(message.contains("not trusted"), "{message}");
        assert!(message.contains("NotValidForName"), "{message}");
        assert!(!message.contains("hunter2"), "{message}");
    }

    #[test]
    fn a_certificate_from_another_ca_is_refused_with_a_typed_error_within_the_bound() {
        require_tls!();
        let dir = tempfile::tempdir().unwrap();
        let wrong = other_ca(dir.path());
        for mode in ["verify-full", "verify-ca", "require"] {
            let url = tls_url(&format!("sslmode={mode}&sslrootcert={}", wrong.display()));
            let started = Instant::now();
            let err = Store::open(StorageConfig::postgres(&url, "test:tls")).unwrap_err();
            let took = started.elapsed();
            assert!(took < BOUND, "{mode}: {took:?}");
            assert!(
                matches!(err, StorageError::Unavailable { .. }),
                "{mode}: {err}"
            );
            let message = err.to_string();
            eprintln!("{mode}, another CA, {took:?}: {message}");
            assert!(message.contains("not trusted"), "{mode}: {message}");
            assert!(message.contains("UnknownIssuer"), "{mode}: {message}");
            assert!(
                message.contains(&wrong.display().to_string()),
                "{mode}: {message}"
            );
            assert!(!message.contains("hunter2"), "{mode}: {message}");
            assert!(!format!("{err:?}").contains("hunter2"), "{mode}: {err:?}");
        }
        // A file that is no certificate is a configuration error at once.
        let garbage = dir.path().join("garbage.pem");
        std::fs::write(&garbage, "not a certificate").unwrap();
        let url = tls_url(&format!(
            "sslmode=verify-full&sslrootcert={}",
            garbage.display()
        ));
        let err = Store::open(StorageConfig::postgres(&url, "test:tls")).unwrap_err();
        assert!(matches!(err, StorageError::Config(_)), "{err}");
    }
}
