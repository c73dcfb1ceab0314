//! The change token ([`Backend::change_token`](crate::backend::Backend::change_token)): the
//! wal-index header at the start of the `<db>-shm` shared memory, read without a lock or a
//! system call.
//!
//! In WAL mode SQLite keeps the wal-index in a file `<db>-shm` that every connection of every
//! process maps (<https://sqlite.org/walformat.html>). Its first 96 bytes are two copies of the
//! 48-byte `WalIndexHdr`, rewritten by every commit (`walIndexWriteHdr` in `sqlite3.c`: the
//! writer fills copy 2, a memory barrier, then copy 1; readers read copy 1, a barrier, copy 2,
//! and trust the header only when the two are equal and its checksum holds):
//!
//! | bytes | field | here |
//! |---|---|---|
//! | 0..4 | `iVersion`, 3007000 | checked |
//! | 4..8 | unused | |
//! | 8..12 | `iChange`: +1 per committed write transaction | [`ChangeToken::commits`] |
//! | 12 | `isInit`, 1 once written | checked |
//! | 13 | `bigEndCksum` | |
//! | 14..16 | `szPage` | |
//! | 16..20 | `mxFrame`: the last valid frame of the WAL | in the checksum |
//! | 20..24 | `nPage`: the database's size in pages | in the checksum |
//! | 24..32 | `aFrameCksum`: checksum of the last frame | in the checksum |
//! | 32..40 | `aSalt`: change when the WAL restarts | the token's state |
//! | 40..48 | `aCksum`: checksum of bytes 0..40, native byte order | checked, the token's state |
//!
//! Two equal headers describe the same committed content: within one WAL generation (the
//! salts) the frames are only appended, so the last frame and its cumulative checksum say which
//! frames are committed, and a restart changes the salts. A checkpoint copies frames into the
//! database without changing the header; a restart (at the first write after a complete
//! checkpoint) changes the salts but not `iChange`. Recovery after a writer died in the middle
//! of writing the header resets `iChange` to 0 (a different token, so the cache is flushed).
//!
//! # Why the mapping, and not a `pread` of the file
//!
//! Reading the file would need a file descriptor of our own on `<db>-shm`, and closing it
//! would drop every POSIX advisory lock this process holds on that file (`fcntl` locks belong
//! to the process, not to the descriptor), including the locks SQLite's connections hold
//! there: another process could then recover the wal-index or checkpoint past our readers.
//! Instead the backend asks SQLite for the region it has mapped already, through the VFS
//! method `xShmMap` of the writer connection's database file (`SQLITE_FCNTL_FILE_POINTER`),
//! and reads it with atomic loads: no system call, no lock, no descriptor.
//!
//! The mapping stays valid while the writer connection is open: SQLite unmaps a process's
//! shared-memory regions only when the last of its connections to the file closes
//! (`unixShmPurge` with `nRef == 0`), never moves a mapped region, and truncates `<db>-shm` only
//! when it takes the dead-man-switch lock exclusively, which our open connections' shared hold
//! on it prevents (`unixLockSharedMemory`). The backend reads it only through `&self`, while the
//! writer is open. A database that is not in WAL mode, a `locking_mode` other than `NORMAL`
//! (which keeps the wal-index in heap memory), a VFS without shared memory or a read-only store
//! gets no token: the store then keeps no validated cache.

use std::ffi::c_void;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, Ordering};

use rusqlite::Connection;
use rusqlite::ffi;

use crate::backend::ChangeToken;

/// `WALINDEX_MAX_VERSION`, the `iVersion` of every header SQLite writes.
const WALINDEX_VERSION: u32 = 3_007_000;
/// Size of a wal-index region (`WALINDEX_PGSZ`).
const REGION_SIZE: i32 = 32 * 1024;
/// Words (u32) of one header copy.
const WORDS: usize = 12;

/// Region 0 of this process's mapping of `<db>-shm`, where the two header copies are.
pub(super) struct ShmHeader {
    base: NonNull<u32>,
}

// SAFETY: the pointer is into a shared mapping that every thread may read; it is only read,
// with atomic loads (see `read`), and stays valid as long as the backend that owns this value
// (the module docs).
unsafe impl Send for ShmHeader {}
// SAFETY: as for `Send`: reads only, atomic.
unsafe impl Sync for ShmHeader {}

impl ShmHeader {
    /// The header as SQLite has mapped it for `conn` (the writer connection, which must stay
    /// open as long as the returned value is read), or `None` when there is no usable shared
    /// wal-index (see the module docs).
    pub(super) fn map(conn: &Connection) -> Option<Self> {
        let mode: String = conn
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))
            .ok()?;
        let locking: String = conn
            .query_row("PRAGMA locking_mode", [], |r| r.get(0))
            .ok()?;
        if !mode.eq_ignore_ascii_case("wal") || !locking.eq_ignore_ascii_case("normal") {
            return None;
        }
        // A read transaction opens the WAL and maps the wal-index if nothing has yet.
        conn.query_row("SELECT count(*) FROM sqlite_master", [], |r| {
            r.get::<_, i64>(0)
        })
        .ok()?;
        let mut file: *mut ffi::sqlite3_file = std::ptr::null_mut();
        // SAFETY: `conn.handle()` is the open connection, used by this thread only (it is
        // borrowed); SQLITE_FCNTL_FILE_POINTER writes the `sqlite3_file*` of its main database
        // into `file`, which lives as long as the connection.
        let rc = unsafe {
            ffi::sqlite3_file_control(
                conn.handle(),
                c"main".as_ptr(),
                ffi::SQLITE_FCNTL_FILE_POINTER,
                (&raw mut file).cast::<c_void>(),
            )
        };
        if rc != ffi::SQLITE_OK || file.is_null() {
            return None;
        }
        let mut region: *mut c_void = std::ptr::null_mut();
        // SAFETY: `file` is the connection's open database file; version 2 of the I/O methods
        // has `xShmMap`, which with `bExtend = 0` only returns the region already mapped (or
        // null), under SQLite's own mutex of the shared-memory node.
        let rc = unsafe {
            let methods = (*file).pMethods;
            if methods.is_null() || (*methods).iVersion < 2 {
                return None;
            }
            let shm_map = (*methods).xShmMap?;
            shm_map(file, 0, REGION_SIZE, 0, &raw mut region)
        };
        if rc != ffi::SQLITE_OK {
            return None;
        }
        let base = NonNull::new(region.cast::<u32>())?;
        if !base.as_ptr().is_aligned() {
            return None;
        }
        let header = Self { base };
        header.read().map(|_| header)
    }

    /// The current token, or `None` while a writer is in the middle of rewriting the header
    /// (the two copies differ or the checksum fails): the caller then trusts nothing cached.
    pub(super) fn read(&self) -> Option<ChangeToken> {
        let mut first = [0u32; WORDS];
        let mut second = [0u32; WORDS];
        // SAFETY: the region is at least 32 KiB, mapped and 4-byte aligned (checked in `map`),
        // and stays mapped while the backend lives (module docs). Other connections and
        // processes write it concurrently; atomic loads never tear a word, and a header torn
        // between words is caught below as SQLite's own readers catch it.
        unsafe {
            for (i, word) in first.iter_mut().enumerate() {
                *word = AtomicU32::from_ptr(self.base.as_ptr().add(i)).load(Ordering::Acquire);
            }
            for (i, word) in second.iter_mut().enumerate() {
                *word =
                    AtomicU32::from_ptr(self.base.as_ptr().add(WORDS + i)).load(Ordering::Acquire);
            }
        }
        parse(&first, &second)
    }
}

/// The token of a header read as its two copies, or `None` when they are not one consistent,
/// initialised header.
fn parse(first: &[u32; WORDS], second: &[u32; WORDS]) -> Option<ChangeToken> {
    if first != second || first[0] != WALINDEX_VERSION || first[3].to_ne_bytes()[0] != 1 {
        return None;
    }
    if checksum(&first[..10]) != (first[10], first[11]) {
        return None;
    }
    let state = (u128::from(first[8]) << 96)
        | (u128::from(first[9]) << 64)
        | (u128::from(first[10]) << 32)
        | u128::from(first[11]);
    Some(ChangeToken::new(first[2], state))
}

/// `walChecksumBytes` with native byte order, as SQLite checksums the wal-index header.
fn checksum(words: &[u32]) -> (u32, u32) {
    let (mut s1, mut s2) = (0u32, 0u32);
    for pair in words.chunks_exact(2) {
        s1 = s1.wrapping_add(pair[0]).wrapping_add(s2);
        s2 = s2.wrapping_add(pair[1]).wrapping_add(s1);
    }
    (s1, s2)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(change: u32) -> [u32; WORDS] {
        let mut h = [0u32; WORDS];
        h[0] = WALINDEX_VERSION;
        h[2] = change;
        h[3] = u32::from_ne_bytes([1, 0, 0x10, 0]);
        h[4] = 7;
        h[8] = 0xdead;
        h[9] = 0xbeef;
        let (a, b) = checksum(&h[..10]);
        h[10] = a;
        h[11] = b;
        h
    }

    #[test]
    fn a_consistent_header_is_a_token_and_a_torn_one_is_none() {
        let h = header(5);
        let token = parse(&h, &h).unwrap();
        assert_eq!(token.commits(), 5);
        assert_ne!(parse(&header(6), &header(6)).unwrap(), token);
        // The copies differ: a writer is between them.
        assert_eq!(parse(&h, &header(6)), None);
        // A word changed without its checksum.
        let mut torn = h;
        torn[4] = 8;
        assert_eq!(parse(&torn, &torn), None);
        // Not initialised.
        let mut blank = h;
        blank[3] = 0;
        assert_eq!(parse(&blank, &blank), None);
    }

    #[test]
    fn the_token_of_a_wal_database_changes_with_each_commit_of_any_connection() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        let writer = Connection::open(&path).unwrap();
        writer
            .execute_batch("PRAGMA journal_mode=WAL; CREATE TABLE t (a);")
            .unwrap();
        let shm = ShmHeader::map(&writer).expect("a WAL database has a token");
        let t0 = shm.read().unwrap();
        assert_eq!(shm.read(), Some(t0), "no commit, no change");
        let other = Connection::open(&path).unwrap();
        other.execute("INSERT INTO t VALUES (1)", []).unwrap();
        let t1 = shm.read().unwrap();
        assert_ne!(t1, t0);
        assert_eq!(t1.commits(), t0.commits().wrapping_add(1));
        // A read changes nothing.
        let _: i64 = other
            .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
            .unwrap();
        assert_eq!(shm.read(), Some(t1));
        writer.execute("INSERT INTO t VALUES (2)", []).unwrap();
        assert_eq!(shm.read().unwrap().commits(), t1.commits().wrapping_add(1));
    }

    #[test]
    fn a_database_not_in_wal_mode_has_no_token() {
        let dir = tempfile::tempdir().unwrap();
        let conn = Connection::open(dir.path().join("d.db")).unwrap();
        conn.execute_batch("CREATE TABLE t (a);").unwrap();
        assert!(ShmHeader::map(&conn).is_none());
        let wal_excl = Connection::open(dir.path().join("x.db")).unwrap();
        wal_excl
            .execute_batch(
                "PRAGMA locking_mode=EXCLUSIVE; PRAGMA journal_mode=WAL; CREATE TABLE t (a);",
            )
            .unwrap();
        assert!(ShmHeader::map(&wal_excl).is_none());
    }
}
