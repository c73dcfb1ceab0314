//! The read cache: decoded payloads of recent loads, bounded in entries and bytes.
//!
//! Two rules decide how long an entry may be served, and a cache may use both:
//!
//! - **Validated** (on by default where the backend has a
//!   [`change_token`](crate::backend::Backend::change_token): SQLite in WAL mode). The cache
//!   remembers the token under which its entries were read (`validated`). A load reads the
//!   current token *before* it looks anything up or reads the backend; a token other than
//!   `validated` empties the cache and becomes the new `validated`. An entry filled by a load is
//!   therefore never older than the token it is kept under, and a write by anyone (another
//!   process included) empties the cache before the next load can be served from it. The
//!   store's own writes do not empty it: [`ReadCache::after_write`] keeps the other entries when
//!   the token advanced by exactly the one commit the write made.
//! - **Time-bounded** ([`StorageConfig::read_cache`](crate::StorageConfig::read_cache)): an
//!   entry is served for at most `ttl` after it was read, whatever other processes write.
//!
//! Every change of what the cache may hold (an invalidation, a flush, a new token) moves the
//! `epoch`; a load fills the cache only if the epoch it saw before reading the backend is still
//! current, so a racing write or flush can never leave an older value behind.
//!
//! Admission: a key enters the cache the second time a load misses it, remembered in a small
//! table of key hashes (a "doorkeeper"), so that loads of keys read once (a level's worth of
//! records, an import) neither pay for filling the cache nor push the hot records out.
//! Eviction is "second chance" (CLOCK): entries queue in the order they were filled; a hit
//! marks an entry, and the oldest unmarked entry goes first.

use std::collections::{HashMap, VecDeque};
use std::hash::BuildHasher;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::backend::ChangeToken;
use crate::clock::Timestamp;
use crate::codec::EnvelopeInfo;

/// What an entry costs besides its key and payload (the map's slot, the queue's, the `Arc`).
const ENTRY_OVERHEAD: usize = 128;

/// Decoded payloads of recent loads; see the [module docs](self).
pub(super) struct ReadCache {
    /// Entries are served at most this long after they were read (`None`: no time bound).
    ttl: Option<Duration>,
    /// Entries are trusted only while the backend's change token equals `validated`.
    by_token: bool,
    max_entries: usize,
    max_bytes: usize,
    state: Mutex<State>,
    pub(super) hits: AtomicU64,
    pub(super) misses: AtomicU64,
}

struct State {
    map: HashMap<Arc<str>, Slot, foldhash::fast::RandomState>,
    /// Keys in the order they were filled, with the `seq` of the fill (a key removed or
    /// filled again since leaves a stale item, skipped when it comes up).
    queue: VecDeque<(Arc<str>, u64)>,
    bytes: usize,
    next_seq: u64,
    /// See the module docs.
    epoch: u64,
    /// The token the entries were read under (`by_token` only).
    validated: Option<ChangeToken>,
    /// Hashes of keys that missed once, by the hash's low bits (the admission rule).
    seen: Box<[u64]>,
}

struct Slot {
    entry: CachedRead,
    seq: u64,
    size: usize,
    referenced: bool,
}

#[derive(Clone)]
pub(super) struct CachedRead {
    pub(super) loaded_at: Instant,
    pub(super) expires_at: Option<Timestamp>,
    pub(super) payload: Arc<Vec<u8>>,
    pub(super) info: EnvelopeInfo,
}

/// What a missed lookup gives the load that will read the backend: the right to fill the
/// cache if nothing changed meanwhile.
#[derive(Debug, Clone, Copy)]
pub(super) struct Ticket {
    epoch: u64,
}

/// The answer of [`ReadCache::lookup`].
pub(super) enum Lookup {
    Hit(CachedRead),
    /// Read the backend; fill the cache with the ticket if there is one.
    Miss(Option<Ticket>),
}

impl State {
    /// Whether a key that missed may enter the cache: the second miss of its hash in a row
    /// of its slot admits it, the first only marks it.
    fn admit(&mut self, key: &str) -> bool {
        let hash = self.map.hasher().hash_one(key);
        let slot = &mut self.seen[(hash as usize) & (self.seen.len() - 1)];
        if *slot == hash {
            true
        } else {
            *slot = hash;
            false
        }
    }

    fn flush(&mut self) {
        self.map.clear();
        self.queue.clear();
        self.bytes = 0;
        self.epoch += 1;
    }

    fn remove(&mut self, key: &str) {
        if let Some(slot) = self.map.remove(key) {
            self.bytes -= slot.size;
        }
    }

    /// Drops the queue's stale items once they outnumber the entries.
    fn compact_queue(&mut self) {
        if self.queue.len() > 2 * self.map.len() + 64 {
            let map = &self.map;
            self.queue
                .retain(|(key, seq)| map.get(&**key).is_some_and(|s| s.seq == *seq));
        }
    }

    /// Evicts one entry (the oldest not hit since it last came up); false when empty.
    fn evict_one(&mut self) -> bool {
        while let Some((key, seq)) = self.queue.pop_front() {
            let Some(slot) = self.map.get_mut(&*key) else {
                continue;
            };
            if slot.seq != seq {
                continue;
            }
            if slot.referenced {
                slot.referenced = false;
                self.queue.push_back((key, seq));
                continue;
            }
            self.remove(&key);
            return true;
        }
        false
    }
}

impl ReadCache {
    /// A cache of at most `max_entries` entries and `max_bytes` bytes (keys, payloads and a
    /// fixed overhead per entry).
    pub(super) fn new(
        ttl: Option<Duration>,
        by_token: bool,
        max_entries: usize,
        max_bytes: usize,
    ) -> Self {
        Self {
            ttl,
            by_token,
            max_entries: max_entries.max(1),
            max_bytes,
            state: Mutex::new(State {
                map: HashMap::default(),
                queue: VecDeque::new(),
                bytes: 0,
                next_seq: 0,
                epoch: 0,
                validated: None,
                seen: vec![0; (max_entries.max(1) * 4).next_power_of_two().min(1 << 16)]
                    .into_boxed_slice(),
            }),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
        }
    }

    /// Whether entries are validated by the backend's change token (read it before
    /// [`lookup`](Self::lookup) and around writes).
    pub(super) fn by_token(&self) -> bool {
        self.by_token
    }

    /// Looks `key` up at `now`, with the backend's change token read just before (`None`
    /// when the backend could not tell, or when the cache is not validated by tokens).
    pub(super) fn lookup(&self, key: &str, now: Timestamp, token: Option<ChangeToken>) -> Lookup {
        let mut st = self.state.lock();
        if self.by_token {
            match token {
                Some(token) if st.validated != Some(token) => {
                    st.flush();
                    st.validated = Some(token);
                }
                Some(_) => {}
                // Nothing can be trusted without a token, unless the user accepted a time
                // bound instead.
                None if self.ttl.is_none() => {
                    drop(st);
                    self.misses.fetch_add(1, Ordering::Relaxed);
                    return Lookup::Miss(None);
                }
                None => {}
            }
        }
        let ttl = self.ttl;
        let fresh = st.map.get_mut(key).map(|slot| {
            let live = ttl.is_none_or(|ttl| slot.entry.loaded_at.elapsed() < ttl)
                && !now.is_past(slot.entry.expires_at);
            if live {
                slot.referenced = true;
            }
            live.then(|| slot.entry.clone())
        });
        match fresh {
            Some(Some(entry)) => {
                drop(st);
                self.hits.fetch_add(1, Ordering::Relaxed);
                Lookup::Hit(entry)
            }
            found => {
                // An entry that timed out or expired was admitted already.
                let admitted = found.is_some() || st.admit(key);
                if found.is_some() {
                    st.remove(key);
                }
                let ticket = admitted.then_some(Ticket { epoch: st.epoch });
                drop(st);
                self.misses.fetch_add(1, Ordering::Relaxed);
                Lookup::Miss(ticket)
            }
        }
    }

    /// Keeps what a load read with `ticket`, unless the cache changed since its lookup or the
    /// entry is larger than an eighth of the byte budget.
    pub(super) fn insert(&self, key: &str, ticket: Ticket, entry: CachedRead) {
        let size = key.len() + entry.payload.len() + ENTRY_OVERHEAD;
        if size > self.max_bytes / 8 {
            return;
        }
        let mut st = self.state.lock();
        if st.epoch != ticket.epoch {
            return;
        }
        st.remove(key);
        while (st.map.len() >= self.max_entries || st.bytes + size > self.max_bytes)
            && st.evict_one()
        {}
        let seq = st.next_seq;
        st.next_seq += 1;
        let key: Arc<str> = Arc::from(key);
        st.queue.push_back((key.clone(), seq));
        st.bytes += size;
        st.map.insert(
            key,
            Slot {
                entry,
                seq,
                size,
                referenced: false,
            },
        );
        st.compact_queue();
    }

    /// Drops the entries of `keys` (before and after a write of them).
    pub(super) fn invalidate<'a>(&self, keys: impl IntoIterator<Item = &'a str>) {
        let mut st = self.state.lock();
        st.epoch += 1;
        for key in keys {
            st.remove(key);
        }
        st.compact_queue();
    }

    /// After a write of `keys` by this store: drops their entries, and keeps the others only
    /// if the token shows no other commit. `before` was read before the write was sent,
    /// `after` once it returned; `changed` says the write changed at least one record (a put,
    /// or a delete of a live record), so that it made exactly one commit.
    pub(super) fn after_write<'a>(
        &self,
        keys: impl IntoIterator<Item = &'a str>,
        before: Option<ChangeToken>,
        after: Option<ChangeToken>,
        changed: bool,
    ) {
        let mut st = self.state.lock();
        st.epoch += 1;
        for key in keys {
            st.remove(key);
        }
        st.compact_queue();
        if !self.by_token {
            return;
        }
        let only_ours = match (before, after) {
            (Some(before), Some(after)) if st.validated == Some(before) => {
                after == before || (changed && after.commits() == before.commits().wrapping_add(1))
            }
            _ => false,
        };
        if only_ours {
            st.validated = after;
        } else {
            st.flush();
            st.validated = after;
        }
    }

    /// Empties the cache.
    pub(super) fn invalidate_all(&self) {
        self.state.lock().flush();
    }

    /// Entries held now.
    pub(super) fn len(&self) -> usize {
        self.state.lock().map.len()
    }

    /// Bytes held now (keys, payloads and the per-entry overhead).
    #[cfg(test)]
    pub(super) fn bytes(&self) -> usize {
        self.state.lock().bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::Format;

    fn entry(len: usize) -> CachedRead {
        CachedRead {
            loaded_at: Instant::now(),
            expires_at: None,
            payload: Arc::new(vec![1; len]),
            info: EnvelopeInfo {
                format: Format::Raw,
                compressed: false,
                encrypted: false,
            },
        }
    }

    fn token(commits: u32) -> Option<ChangeToken> {
        Some(ChangeToken::new(commits, u128::from(commits) * 7))
    }

    /// The ticket of a miss of `key`: its second miss, the first only marks it.
    fn ticket(cache: &ReadCache, key: &str, tok: Option<ChangeToken>) -> Ticket {
        for _ in 0..2 {
            match cache.lookup(key, Timestamp(0), tok) {
                Lookup::Miss(Some(ticket)) => return ticket,
                Lookup::Miss(None) => {}
                Lookup::Hit(_) => panic!("{key}: expected a miss"),
            }
        }
        panic!("{key}: no ticket on the second miss")
    }

    fn fill(cache: &ReadCache, key: &str, tok: Option<ChangeToken>, len: usize) {
        let ticket = ticket(cache, key, tok);
        cache.insert(key, ticket, entry(len));
    }

    fn hit(cache: &ReadCache, key: &str, tok: Option<ChangeToken>) -> bool {
        matches!(cache.lookup(key, Timestamp(0), tok), Lookup::Hit(_))
    }

    #[test]
    fn the_cache_stays_within_its_entries_and_bytes() {
        let cache = ReadCache::new(None, true, 100, 64 * 1024);
        for i in 0..10_000 {
            fill(&cache, &format!("k{i}"), token(1), 10);
            assert!(cache.len() <= 100);
        }
        assert_eq!(cache.len(), 100);
        // Larger payloads: the byte budget binds first.
        for i in 0..10_000 {
            fill(&cache, &format!("b{i}"), token(1), 4000);
            assert!(cache.bytes() <= 64 * 1024, "{}", cache.bytes());
        }
        assert!(cache.len() < 100);
        // An entry above an eighth of the budget is never kept.
        let t = ticket(&cache, "huge", token(1));
        cache.insert("huge", t, entry(10_000));
        assert!(!hit(&cache, "huge", token(1)));
        // Invalidations leave stale queue items; the queue stays bounded too.
        for i in 0..10_000 {
            let key = format!("q{i}");
            fill(&cache, &key, token(1), 10);
            cache.invalidate([key.as_str()]);
        }
        assert!(cache.state.lock().queue.len() <= 2 * 100 + 65);
    }

    #[test]
    fn a_key_enters_on_its_second_miss() {
        let cache = ReadCache::new(None, true, 10, 1 << 20);
        assert!(matches!(
            cache.lookup("a", Timestamp(0), token(1)),
            Lookup::Miss(None)
        ));
        assert!(matches!(
            cache.lookup("a", Timestamp(0), token(1)),
            Lookup::Miss(Some(_))
        ));
        // Still remembered after a flush: a hot key comes back on its first miss.
        fill(&cache, "a", token(1), 1);
        assert!(!hit(&cache, "a", token(2)));
        assert!(matches!(
            cache.lookup("a", Timestamp(0), token(2)),
            Lookup::Miss(Some(_))
        ));
    }

    #[test]
    fn hit_entries_get_a_second_chance() {
        let cache = ReadCache::new(None, true, 4, 1 << 20);
        for key in ["a", "b", "c", "d"] {
            fill(&cache, key, token(1), 1);
        }
        assert!(hit(&cache, "a", token(1)));
        fill(&cache, "e", token(1), 1);
        assert!(hit(&cache, "a", token(1)), "a was hit: kept");
        assert!(
            !hit(&cache, "b", token(1)),
            "b was the oldest unmarked: evicted"
        );
    }

    #[test]
    fn another_token_flushes_and_no_token_trusts_nothing() {
        let cache = ReadCache::new(None, true, 10, 1 << 20);
        fill(&cache, "a", token(1), 1);
        assert!(hit(&cache, "a", token(1)));
        assert!(matches!(
            cache.lookup("a", Timestamp(0), None),
            Lookup::Miss(None)
        ));
        assert!(!hit(&cache, "a", token(2)));
        assert_eq!(cache.len(), 0);
    }

    #[test]
    fn a_fill_that_raced_a_flush_or_a_write_is_dropped() {
        let cache = ReadCache::new(None, true, 10, 1 << 20);
        let t = ticket(&cache, "a", token(1));
        // Another load saw a newer token while this one read the backend.
        assert!(!hit(&cache, "b", token(2)));
        cache.insert("a", t, entry(1));
        assert!(!hit(&cache, "a", token(2)));
        let t = ticket(&cache, "a", token(2));
        cache.invalidate(["a"]);
        cache.insert("a", t, entry(1));
        assert!(!hit(&cache, "a", token(2)));
    }

    #[test]
    fn an_own_write_keeps_the_other_entries_only_when_it_was_the_one_commit() {
        let cache = ReadCache::new(None, true, 10, 1 << 20);
        fill(&cache, "a", token(1), 1);
        fill(&cache, "b", token(1), 1);
        cache.after_write(["a"], token(1), token(2), true);
        assert!(!hit(&cache, "a", token(2)));
        assert!(
            hit(&cache, "b", token(2)),
            "one commit, ours: b is still current"
        );
        // Two commits: someone else wrote too.
        cache.after_write(["a"], token(2), token(4), true);
        assert!(!hit(&cache, "b", token(4)));
        // One commit, but the write changed nothing: the commit was someone else's.
        fill(&cache, "b", token(4), 1);
        cache.after_write(["a"], token(4), token(5), false);
        assert!(!hit(&cache, "b", token(5)));
        // The cache was behind the token before the write: nothing to keep.
        fill(&cache, "b", token(5), 1);
        cache.after_write(["a"], token(6), token(7), true);
        assert!(!hit(&cache, "b", token(7)));
        // No change at all.
        fill(&cache, "b", token(7), 1);
        cache.after_write(["a"], token(7), token(7), false);
        assert!(hit(&cache, "b", token(7)));
    }

    #[test]
    fn time_bounded_entries_expire_and_need_no_token() {
        let cache = ReadCache::new(Some(Duration::from_millis(30)), false, 10, 1 << 20);
        fill(&cache, "a", None, 1);
        assert!(hit(&cache, "a", None));
        std::thread::sleep(Duration::from_millis(40));
        assert!(!hit(&cache, "a", None));
        // Records that expire are not served past their expiry.
        let t = ticket(&cache, "e", None);
        let mut e = entry(1);
        e.expires_at = Some(Timestamp(10));
        cache.insert("e", t, e);
        assert!(matches!(
            cache.lookup("e", Timestamp(5), None),
            Lookup::Hit(_)
        ));
        assert!(matches!(
            cache.lookup("e", Timestamp(10), None),
            Lookup::Miss(_)
        ));
    }
}
