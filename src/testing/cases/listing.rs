//! Listing keys a page at a time: every key once, in order, while others write.

use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::Duration;

use serde::Serialize;

use crate::error::StorageError;
use crate::store::{SaveOptions, Store};
use crate::testing::{Fixture, TestBackend};

fn save<T: Serialize>(store: &Store, key: &str, value: &T) {
    store.save(key, value, &SaveOptions::default()).unwrap();
}

/// Every page of a listing of `prefix`, `limit` keys at a time.
fn all_pages(store: &Store, prefix: &str, limit: usize) -> Vec<Vec<String>> {
    let mut pages = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let page = store
            .list_keys_page(prefix, after.as_deref(), limit)
            .unwrap();
        assert!(page.keys.len() <= limit);
        let next = page.next.clone();
        pages.push(page.keys);
        match next {
            Some(next) => after = Some(next),
            None => return pages,
        }
        assert!(pages.len() < 10_000, "a listing that never ends");
    }
}

/// Pages of every size cover the listing exactly, in byte order, without expired keys.
pub fn paged_listing_covers_every_key_once_in_order(factory: &dyn Fn() -> TestBackend) {
    let f = Fixture::new(factory);
    for i in 0..57 {
        save(&f.store, &format!("p:{i:03}"), &1u8);
    }
    for k in ["p", "o:1", "q:1", "p%", "p_1", "P:1", "p:é", "p:名"] {
        save(&f.store, k, &2u8);
    }
    let ttl = SaveOptions::default().ttl(Duration::from_secs(5));
    for i in 0..9 {
        f.store.save(&format!("p:0{i}x"), &3u8, &ttl).unwrap();
    }
    f.advance(Duration::from_secs(6));
    let expected = f.store.list_keys("p:").unwrap();
    assert_eq!(expected.len(), 59);
    for limit in [1, 2, 7, 58, 59, 60, 10_000] {
        let pages = all_pages(&f.store, "p:", limit);
        let keys: Vec<String> = pages.concat();
        assert_eq!(keys, expected, "limit {limit}");
        assert!(
            pages.iter().rev().skip(1).all(|p| p.len() == limit),
            "limit {limit}"
        );
    }
    // Literal prefixes, the empty one, and a cursor outside the prefix's range.
    assert_eq!(all_pages(&f.store, "p%", 3).concat(), vec!["p%"]);
    assert_eq!(
        all_pages(&f.store, "", 5).concat(),
        f.store.list_keys("").unwrap()
    );
    let page = f.store.list_keys_page("p:", Some("a"), 3).unwrap();
    assert_eq!(page.keys, expected[..3]);
    assert!(
        f.store
            .list_keys_page("p:", Some("z"), 3)
            .unwrap()
            .keys
            .is_empty()
    );
    for bad in [0, crate::store::MAX_PAGE + 1] {
        let err = f.store.list_keys_page("p:", None, bad).unwrap_err();
        assert!(matches!(err, StorageError::Config(_)), "{err}");
    }
    let err = f.store.list_keys_page("bad\0", None, 5).unwrap_err();
    assert!(matches!(err, StorageError::InvalidKey { .. }), "{err}");
}

/// A listing paged while another thread inserts and deletes keys in its range never repeats
/// a key, and lists every key that exists throughout exactly once.
pub fn paging_while_others_write_never_repeats_or_skips(factory: &dyn Fn() -> TestBackend) {
    let f = Fixture::new(factory);
    let stable: Vec<String> = (0..120).map(|i| format!("k:{i:03}:stable")).collect();
    for k in &stable {
        save(&f.store, k, &1u8);
    }
    let stop = AtomicBool::new(false);
    thread::scope(|s| {
        s.spawn(|| {
            let mut i = 0u32;
            while !stop.load(Ordering::Relaxed) {
                let key = format!("k:{:03}:volatile", i % 130);
                if i % 3 == 2 {
                    f.store.delete(&key).unwrap();
                } else {
                    save(&f.store, &key, &i);
                }
                i += 1;
            }
        });
        for _ in 0..3 {
            let keys = all_pages(&f.store, "k:", 7).concat();
            assert!(keys.windows(2).all(|w| w[0] < w[1]), "in order, no repeats");
            let seen: Vec<&String> = keys.iter().filter(|k| k.ends_with("stable")).collect();
            assert_eq!(seen.len(), stable.len(), "every stable key exactly once");
        }
        stop.store(true, Ordering::Relaxed);
    });
}
