//! Listing keys a page at a time: [`Store::list_keys_page`] and [`KeyPage`].

use super::Store;
use crate::error::{Result, StorageError};
use crate::key;
use crate::store::stats::OpKind;

/// The most keys one page may hold.
pub const MAX_PAGE: usize = 10_000;

/// One page of a listing: see [`Store::list_keys_page`].
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct KeyPage {
    /// The page's live keys, in byte order.
    pub keys: Vec<String>,
    /// Where the next page starts (pass it as `after`), or `None` when the listing is done.
    pub next: Option<String>,
}

impl Store {
    /// Up to `limit` live keys that start with `prefix` (byte for byte, no wildcards) and
    /// sort after `after`, in byte order; pass the page's [`next`](KeyPage::next) as `after`
    /// to continue. Memory stays bounded by `limit` however large the store, and a listing
    /// never repeats a key, nor skips one that exists from its first page to its last,
    /// whatever other writers insert or delete meanwhile (keys written during the listing
    /// appear if they sort after the current page). `limit` must be 1 to [`MAX_PAGE`].
    ///
    /// The time of a page depends on the backend: SQLite, PostgreSQL and memory seek to
    /// `after`, so a page costs about its own size; Redis and the file backend keep no order
    /// of keys, so each page is one pass over every key (Redis: one `SCAN` of the database,
    /// keeping only the `limit` smallest keys after `after`). There, list in large pages.
    ///
    /// ```
    /// # use bevy_storage::{StorageConfig, Store, SaveOptions};
    /// let store = Store::open(StorageConfig::memory())?;
    /// for i in 0..5 {
    ///     store.save(&format!("player:{i}"), &i, &SaveOptions::default())?;
    /// }
    /// let mut after = None;
    /// let mut seen = Vec::new();
    /// loop {
    ///     let page = store.list_keys_page("player:", after.as_deref(), 2)?;
    ///     seen.extend(page.keys);
    ///     match page.next {
    ///         Some(next) => after = Some(next),
    ///         None => break,
    ///     }
    /// }
    /// assert_eq!(seen.len(), 5);
    /// # Ok::<(), bevy_storage::StorageError>(())
    /// ```
    pub fn list_keys_page(
        &self,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<KeyPage> {
        self.instrument(OpKind::Read, || {
            key::validate_prefix(prefix)?;
            if !(1..=MAX_PAGE).contains(&limit) {
                return Err(StorageError::Config(format!(
                    "a page holds 1 to {MAX_PAGE} keys, not {limit}"
                )));
            }
            let now = self.inner.clock.now();
            let mut page = KeyPage::default();
            let mut cursor = after.map(str::to_owned);
            loop {
                let want = limit - page.keys.len();
                let entries = self
                    .inner
                    .backend
                    .scan_page(prefix, cursor.as_deref(), want)?;
                let exhausted = entries.len() < want;
                if let Some(last) = entries.last() {
                    cursor = Some(last.key.clone());
                }
                page.keys.extend(
                    entries
                        .into_iter()
                        .filter(|e| !now.is_past(e.expires_at) && !key::is_internal(&e.key))
                        .map(|e| e.key),
                );
                if exhausted {
                    return Ok(page);
                }
                if page.keys.len() == limit {
                    // Full: there may be more after the last key scanned.
                    page.next = cursor;
                    return Ok(page);
                }
                // Expired or internal keys made the page short: scan on from where it stopped.
            }
        })
    }
}
