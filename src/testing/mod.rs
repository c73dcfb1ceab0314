//! The backend conformance suite, for a game's own [`Backend`](crate::Backend) (feature
//! `testing`, off by default).
//!
//! Every built-in backend runs these cases (the crate's `tests/conformance.rs` runs them
//! against memory, file, SQLite and Redis): save and load, prefix listing, transactions that
//! are all or nothing, TTL, create-only saves without a race, metadata, the quota, invalid keys,
//! compression, encryption and key checks, damaged records, clear, stats, reopening, the read
//! cache and concurrent writers. A backend that passes them gives the [`Store`] everything it
//! relies on.
//!
//! # Running it against your backend
//! Enable the feature for your tests only, then invoke
//! [`backend_conformance_suite!`](crate::backend_conformance_suite) in a test file with a
//! factory: an expression that makes a [`TestBackend`] over a fresh, empty instance of your
//! backend each time it is evaluated. It becomes one `#[test]` per case, in a
//! module of the name you give (`my_backend::ttl_hides_expired_records_before_cleanup`), so
//! `cargo test` reports each case by name.
//!
//! ```toml
//! [dev-dependencies]
//! bevy_storage = { version = "*", features = ["testing"] }
//! tempfile = "3"
//! ```
//!
//! ```
//! // tests/my_backend.rs
//! use bevy_storage::StorageConfig;
//! use bevy_storage::testing::TestBackend;
//! # use bevy_storage::backend::FileBackend as MyBackend; // stands in for the game's own
//!
//! bevy_storage::backend_conformance_suite!(my_backend, {
//!     let dir = tempfile::tempdir().unwrap();
//!     let path = dir.path().join("records");
//!     // Persistent: the suite reopens the same records by calling this closure again.
//!     TestBackend::persistent(move || StorageConfig::custom(MyBackend::open(&path).unwrap()))
//!         .keep(dir)
//! });
//! ```
//!
//! A backend that keeps nothing across a reopen uses [`TestBackend::volatile`] (the cases that
//! reopen the store then return early). To skip the whole suite when a service is not there,
//! add `only_if = condition` (evaluated in each test before the factory).
//!
//! The crate's `examples/custom_backend.rs` backend runs the suite in `tests/custom_backend.rs`.
//!
//! # Adding a case
//! A case is a `pub fn name(factory: &dyn Fn() -> TestBackend)` in `cases.rs` that builds its
//! store with [`Fixture::new`] or [`Fixture::with`] and panics on a failure; then one line in
//! the list of [`backend_conformance_suite!`](crate::backend_conformance_suite) (the
//! `__conformance_cases!` macro in this file). Every backend runs it from then on.

use std::any::Any;
use std::sync::Arc;
use std::time::Duration;

use crate::clock::ManualClock;
use crate::codec::EncryptionKey;
use crate::config::StorageConfig;
use crate::error::Result;
use crate::store::Store;

pub mod cases;

/// A backend under test: how to open a store over one fresh instance of it.
///
/// The factory given to [`backend_conformance_suite!`](crate::backend_conformance_suite)
/// makes one per fixture, so each case starts empty; `config` is called once to open the
/// store and again each time a case reopens it, and must reach the same records then (for a
/// persistent backend).
pub struct TestBackend {
    config: Arc<dyn Fn() -> StorageConfig + Send + Sync>,
    persistent: bool,
    guard: Option<Box<dyn Any + Send>>,
}

impl TestBackend {
    /// A backend whose records survive closing and reopening the store (a file, a database,
    /// a server): `config` opens the same records each time it is called.
    pub fn persistent(config: impl Fn() -> StorageConfig + Send + Sync + 'static) -> Self {
        Self {
            config: Arc::new(config),
            persistent: true,
            guard: None,
        }
    }

    /// A backend whose records live only as long as its store (in memory): the cases that
    /// reopen the store return early.
    pub fn volatile(config: impl Fn() -> StorageConfig + Send + Sync + 'static) -> Self {
        Self {
            persistent: false,
            ..Self::persistent(config)
        }
    }

    /// Keeps `guard` alive as long as the fixture, and drops it after the store: a temporary
    /// directory, or a handle that removes a server namespace on drop.
    pub fn keep(mut self, guard: impl Any + Send) -> Self {
        self.guard = Some(Box::new(guard));
        self
    }
}

impl std::fmt::Debug for TestBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestBackend")
            .field("persistent", &self.persistent)
            .finish_non_exhaustive()
    }
}

/// A store under test, on a [`ManualClock`], with what it needs to be reopened.
pub struct Fixture {
    /// The store over the backend under test.
    pub store: Store,
    /// The store's clock: [`advance`](Self::advance) moves it.
    pub clock: ManualClock,
    // Declared after `store`, so the store is dropped before the guard it may need.
    backend: TestBackend,
}

impl Fixture {
    /// A store with default options over a fresh backend from `factory`.
    pub fn new(factory: &dyn Fn() -> TestBackend) -> Self {
        Self::with(factory, |c| c)
    }

    /// A store over a fresh backend from `factory`, its config adjusted by `tweak` (the
    /// backend and the clock are set here).
    pub fn with(
        factory: &dyn Fn() -> TestBackend,
        tweak: impl Fn(StorageConfig) -> StorageConfig,
    ) -> Self {
        let backend = factory();
        let clock = ManualClock::starting_now();
        let store = Store::open(tweak((backend.config)()).clock(clock.clone()))
            .expect("the backend under test opens");
        Self {
            store,
            clock,
            backend,
        }
    }

    /// Whether the records survive reopening ([`TestBackend::persistent`]).
    pub fn persistent(&self) -> bool {
        self.backend.persistent
    }

    /// The config of this fixture's backend with the fixture's clock, for opening it again.
    pub fn config(&self) -> StorageConfig {
        (self.backend.config)().clock(self.clock.clone())
    }

    /// Drops the store and opens the same backend again with `tweak` applied (persistent
    /// backends only).
    pub fn reopen(&mut self, tweak: impl Fn(StorageConfig) -> StorageConfig) -> Result<()> {
        assert!(
            self.persistent(),
            "only a persistent backend can be reopened"
        );
        // Open the new store only after the old one is gone (a backend may lock its files).
        let placeholder = Store::open(StorageConfig::memory())?;
        drop(std::mem::replace(&mut self.store, placeholder));
        self.store = Store::open(tweak(self.config()))?;
        Ok(())
    }

    /// Stores the record of `from`, byte for byte, under `to` through the backend (the way
    /// an attacker copies a save file): its authentication names `from`, so it must fail.
    pub fn copy_record(&self, from: &str, to: &str) {
        let record = self.store.backend().get(from).unwrap().unwrap();
        let put = crate::backend::WriteOp::Put {
            key: to.into(),
            record,
            mode: crate::backend::PutMode::Upsert,
        };
        self.store
            .backend()
            .write(vec![put], crate::clock::Timestamp::now())
            .unwrap();
    }

    /// Moves the store's clock forward.
    pub fn advance(&self, by: Duration) {
        self.clock.advance(by);
    }
}

/// A fixed, cheap key for the encryption cases (Argon2 is not what they measure).
pub fn test_key() -> EncryptionKey {
    EncryptionKey::from_bytes([42; 32])
}

/// Runs every conformance case against a backend, one `#[test]` each, in a module named
/// `$module`: `backend_conformance_suite!(my_backend, factory)`, where `factory` is an
/// expression giving a [`TestBackend`] over a fresh instance (evaluated once per fixture).
/// `backend_conformance_suite!(my_backend, factory, only_if = condition)` first checks
/// `condition` in each test and passes without running the case when it is false. See the
/// [module docs](crate::testing).
#[macro_export]
macro_rules! backend_conformance_suite {
    ($module:ident, $factory:expr $(,)?) => {
        $crate::backend_conformance_suite!($module, $factory, only_if = true);
    };
    ($module:ident, $factory:expr, only_if = $condition:expr $(,)?) => {
        $crate::__conformance_cases!(__conformance_tests {
            $module,
            $factory,
            $condition
        });
    };
}

/// The one list of conformance cases: calls `$callback!` with the given arguments followed by
/// every case name, `[encryption]` before the cases that need the `encryption` feature.
#[doc(hidden)]
#[macro_export]
macro_rules! __conformance_cases {
    ($callback:ident $args:tt) => {
        $crate::$callback! { $args
            save_then_load_returns_equal_data,
            missing_key_loads_as_none_and_as_default,
            list_by_prefix_finds_exactly_the_matching_keys,
            prefix_matches_literally,
            balance_transfer_in_one_transaction,
            failed_transaction_changes_nothing,
            ttl_hides_expired_records_before_cleanup,
            default_ttl_and_no_expiry,
            overwrite_false_refuses_live_keys_only,
            overwrite_false_has_no_race,
            metadata_timestamps_follow_writes_and_reads,
            custom_metadata_round_trips,
            quota_refuses_writes_and_keeps_old_values,
            invalid_keys_are_typed_errors_everywhere,
            compression_round_trips_and_shrinks,
            damaged_records_are_typed_errors_and_harm_nothing_else,
            clear_removes_everything,
            stats_report_items_size_health_and_timings,
            reopening_keeps_every_record,
            read_cache_serves_and_invalidates,
            concurrent_writers_lose_nothing,
            readers_never_see_half_a_transaction,
            paged_listing_covers_every_key_once_in_order,
            paging_while_others_write_never_repeats_or_skips,
            [encryption] encryption_round_trips_and_hides_plaintext,
            [encryption] wrong_or_missing_key_is_a_clear_error,
            [encryption] passphrase_keys_survive_reopen,
            take_returns_the_value_and_removes_it,
            take_of_a_missing_or_expired_key_is_none,
            take_of_the_wrong_type_fails_and_keeps_the_record,
            [encryption] take_that_cannot_decrypt_keeps_the_record,
            take_race_has_exactly_one_winner,
            every_write_gives_a_new_version,
            conditional_save_checks_the_version,
            transactions_check_each_version_all_or_nothing,
            read_modify_write_counter_loses_no_update,
        }
    };
}

/// One `#[test]` per case (see [`backend_conformance_suite!`](crate::backend_conformance_suite)).
#[doc(hidden)]
#[macro_export]
macro_rules! __conformance_tests {
    ({ $module:ident, $factory:expr, $condition:expr }
        $($([$gate:ident])? $case:ident),* $(,)?) => {
        mod $module {
            #[allow(unused_imports)]
            use super::*;
            $(
                $crate::__conformance_gate! { [$($gate)?]
                    #[test]
                    fn $case() {
                        if !$condition {
                            return;
                        }
                        $crate::testing::cases::$case(&|| $factory);
                    }
                }
            )*
        }
    };
}

/// Emits its items when the feature in brackets is on in *this* crate (a `cfg` written in the
/// caller's crate would test the caller's features).
#[doc(hidden)]
#[macro_export]
macro_rules! __conformance_gate {
    ([] $($item:item)*) => { $($item)* };
    ([encryption] $($item:item)*) => { $crate::__if_encryption! { $($item)* } };
}

#[cfg(feature = "encryption")]
#[doc(hidden)]
#[macro_export]
macro_rules! __if_encryption {
    ($($item:item)*) => { $($item)* };
}

#[cfg(not(feature = "encryption"))]
#[doc(hidden)]
#[macro_export]
macro_rules! __if_encryption {
    ($($item:item)*) => {};
}
