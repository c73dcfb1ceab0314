//! One conformance suite, the same cases against every built-in backend.
//!
//! The cases live in the library (`bevy_storage::testing`, feature `testing`) so that a game's
//! own backend runs them too. Each `backend_conformance_suite!` line below instantiates every
//! case for one backend, so a failure names both the backend and the case
//! (`sqlite::ttl_hides_expired_records_before_cleanup`).

mod common;

use bevy_storage::StorageConfig;
use bevy_storage::testing::TestBackend;

/// A fresh temporary directory and a path inside it.
fn temp_path(name: &str) -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(name);
    (dir, path)
}

bevy_storage::backend_conformance_suite!(memory, TestBackend::volatile(StorageConfig::memory));

bevy_storage::backend_conformance_suite!(file, {
    let (dir, root) = crate::temp_path("records");
    TestBackend::persistent(move || StorageConfig::file(&root)).keep(dir)
});

#[cfg(feature = "sqlite")]
bevy_storage::backend_conformance_suite!(sqlite, {
    let (dir, path) = crate::temp_path("store.db");
    TestBackend::persistent(move || StorageConfig::sqlite(&path)).keep(dir)
});

// Each fixture gets a namespace of its own, removed when the fixture drops. Under CI a missing
// Redis fails every case; locally each case says it is skipped and passes.
#[cfg(feature = "redis")]
bevy_storage::backend_conformance_suite!(
    redis,
    {
        let ns = crate::common::RedisNamespace::fresh();
        let (url, namespace) = (ns.url.clone(), ns.namespace.clone());
        TestBackend::persistent(move || StorageConfig::redis(&url, &namespace)).keep(ns)
    },
    only_if = crate::common::redis_kind().is_some()
);

// Each fixture gets a namespace of its own, cleared when the fixture drops. Under CI a missing
// PostgreSQL fails every case; locally each case says it is skipped and passes.
#[cfg(feature = "postgres")]
bevy_storage::backend_conformance_suite!(
    postgres,
    {
        let ns = crate::common::PostgresNamespace::fresh();
        let (url, namespace) = (ns.url.clone(), ns.namespace.clone());
        TestBackend::persistent(move || StorageConfig::postgres(&url, &namespace)).keep(ns)
    },
    only_if = crate::common::postgres_kind().is_some()
);

// The same over TLS, the certificate checked against the test server's CA (`.ci/postgres`).
// Under CI a server without TLS fails every case; locally each case says it is skipped.
#[cfg(feature = "postgres-tls")]
bevy_storage::backend_conformance_suite!(
    postgres_tls,
    {
        let ca = crate::common::postgres_tls_ca();
        let url = crate::common::with_query(
            &crate::common::postgres_url(),
            &format!("sslmode=verify-full&sslrootcert={}", ca.display()),
        );
        let mut ns = crate::common::PostgresNamespace::fresh();
        ns.url = url;
        let (url, namespace) = (ns.url.clone(), ns.namespace.clone());
        TestBackend::persistent(move || StorageConfig::postgres(&url, &namespace)).keep(ns)
    },
    only_if = crate::common::postgres_tls().is_some()
);
