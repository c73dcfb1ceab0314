//! The Lua scripts, one `.lua` file each in `scripts/`, and the handles that run them.
//!
//! Every script but the short [`COUNT_NEW_RECORDS_SCRIPT`] is built at compile time from its
//! shebang line, the helpers of `scripts/header.lua` (the check that a string is a record of
//! key layout 2, see [`record`](super::record)) and its own file, so the repository holds one
//! copy of that check. The shebang comes first, as Redis requires: with it Redis refuses a
//! script *before* it starts when the server is out of memory, rather than half-way (see the
//! [`batch`](super::batch) docs).

use redis::Script;

/// A script's source: its shebang line, the shared helpers, then `scripts/<file>`.
macro_rules! script {
    ($shebang:literal, $file:literal) => {
        concat!(
            $shebang,
            "\n",
            include_str!("scripts/header.lua"),
            include_str!(concat!("scripts/", $file))
        )
    };
}

/// Applies a batch; see [`batch`](super::batch). KEYS: usage, expiry, then one record key per
/// operation. ARGV: now, kinds (one byte per operation, see [`kind`](super::batch::kind)), the
/// count and bytes of the puts without expiry, the record-key prefix, `1` when no key repeats
/// in the batch (else `0`), then one encoded record per operation (empty for a delete). Returns
/// `{1, index, previous size, ...}` with a pair for each operation (1-based) that replaced or
/// deleted a live record, `{0, index}` when the create-only put at `index` meets a live
/// record, or `{2, index, problem}` when the key of the operation at `index` holds something
/// else than a layout-2 record (`problem` 1: another Redis type; 2: a string that is not a
/// record). Nothing is changed in the last two cases.
///
/// A batch of new keys without expiry, each key once (the common case of saving new things),
/// is one `MSETNX`, which sets every record or, when any of the keys exists, nothing; it is
/// tried when the first and last keys are free. Otherwise everything is read before anything
/// is written: one `EXISTS` over all the keys (it counts keys of any type) and, only when
/// some exist, one `MGET` of the records they hold. The operations are then applied in order
/// in Lua (to a copy of the records when a key repeats), and only the final state of each key
/// is written: one `MSET` of every record, then a `PEXPIREAT` per record with an expiry (with
/// the expiry as a decimal string formatted once per distinct value), a `SETRANGE` of the
/// 8 bytes of `created_at` per live record replaced when each key is written once (cheaper
/// than copying the record in Lua), one `DEL` for the rest. The counters are updated once,
/// the expiry index (one `ZADD` of every new member, one `ZREM`) only for records with an
/// expiry, old or new. `TIME` (the server's clock, which decides whether a record with an
/// expiry is stored at all) is read once, and only when a record has an expiry.
pub(super) const WRITE_SCRIPT: &str = script!("#!lua", "write.lua");

/// The second half of a batch of new records, none with an expiry, written natively (see
/// [`RedisBackend::pack_new_records`](super::RedisBackend::pack_new_records)): runs inside the
/// batch's `MULTI`/`EXEC` right after its `MSETNX`, which sets the batch token to this batch's
/// own value along with the records or, when any of the keys exists, nothing at all. The token
/// therefore holds this batch's value exactly when the records were written: the script
/// removes it and only then counts the records. A token holding anything else (even a key of
/// another type) cannot be one of a transaction, which never outlives one, and made the
/// `MSETNX` fail: it is removed so that the next batch goes through. KEYS: the batch token,
/// usage. ARGV: the count and bytes of the records, this batch's token value. Returns 1 when
/// the records were written, else 0.
///
/// Sent whole with every such batch (`EVAL`, inside the transaction), so it is kept short and
/// does not take the shared helpers, which it does not need.
pub(super) const COUNT_NEW_RECORDS_SCRIPT: &str =
    concat!("#!lua\n", include_str!("scripts/count_new_records.lua"));

/// The second half of a batch of new records of which some have an expiry, written natively
/// (see [`RedisBackend::pack_new_records`](super::RedisBackend::pack_new_records)): what
/// [`COUNT_NEW_RECORDS_SCRIPT`] does (the records without expiry counted only when the batch
/// token holds this batch's value), then, for each record with an expiry, Redis's expiry
/// (`PEXPIREAT`) and its entry of the expiry index (`ZADD`, skipped for a record whose expiry
/// is already past by the server's clock: its `PEXPIREAT` removes it at once, so it is not
/// stored). KEYS: the batch token, usage, expiry, then the record key of each record with an
/// expiry. ARGV: the count and bytes of the records without expiry, this batch's token value,
/// the earliest expiry, then for each record with an expiry (in the order of KEYS) its expiry
/// in ms as the header holds it and its key (the index's member), both in decimal. Returns 1
/// when the records were written, else 0.
///
/// Sent whole with every such batch (`EVAL`, inside the transaction), like
/// [`COUNT_NEW_RECORDS_SCRIPT`], and without the shared helpers.
pub(super) const EXPIRE_NEW_RECORDS_SCRIPT: &str =
    concat!("#!lua\n", include_str!("scripts/expire_new_records.lua"));

/// Sets the access time of an existing record, keeping its expiry. KEYS: the record. ARGV:
/// the time, 8 bytes little-endian. Fails on a key of another type, passes over a string that
/// is not a record.
pub(super) const TOUCH_SCRIPT: &str = script!("#!lua", "touch.lua");

/// [`Backend::delete_if_unchanged`](crate::backend::Backend::delete_if_unchanged): removes a
/// record only if it still holds this value and expiry, updating the counters (or the expiry
/// index) as the write script does for a delete. KEYS: usage, expiry, the record. ARGV: the
/// expiry as the header stores it (0 for never), the value bytes, the record-key prefix.
/// Returns 1 when the record was removed, 0 when the key is missing or holds another record,
/// -1 for a key of another Redis type, -2 for a string that is not a record (both unchanged).
pub(super) const DELETE_IF_UNCHANGED_SCRIPT: &str = script!("#!lua", "delete_if_unchanged.lua");

/// One page of usage. KEYS: usage, expiry. ARGV: now, record-key prefix, offset, page size.
/// Returns `{count, bytes, examined}`: the records without expiry (first page only) plus the
/// live ones with an expiry in this page, their sizes read from their headers.
pub(super) const USAGE_SCRIPT: &str = script!("#!lua flags=no-writes", "usage.lua");

/// Removes up to a page of records with `expires_at <= now`. KEYS: usage, expiry. ARGV: now,
/// record-key prefix, page size. Returns `{removed, examined}`. Only a record whose own header
/// says it has expired is removed; entries of records gone or without expiry are forgotten.
pub(super) const PURGE_SCRIPT: &str = script!("#!lua", "purge.lua");

/// Forgets the expiry entries whose record is gone (or has no expiry), a page at a time.
/// KEYS: usage, expiry. ARGV: record-key prefix, offset, page size. Returns
/// `{examined, removed}`.
pub(super) const TRIM_SCRIPT: &str = script!("#!lua", "trim.lua");

/// The scripts a backend runs by their SHA-1 (`EVALSHA`, loaded again after a restart).
pub(super) struct Scripts {
    pub(super) write: Script,
    pub(super) touch: Script,
    pub(super) usage: Script,
    pub(super) purge: Script,
    pub(super) trim: Script,
    pub(super) delete_if_unchanged: Script,
}

impl Scripts {
    pub(super) fn new() -> Self {
        Self {
            write: Script::new(WRITE_SCRIPT),
            touch: Script::new(TOUCH_SCRIPT),
            usage: Script::new(USAGE_SCRIPT),
            purge: Script::new(PURGE_SCRIPT),
            trim: Script::new(TRIM_SCRIPT),
            delete_if_unchanged: Script::new(DELETE_IF_UNCHANGED_SCRIPT),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEADER: &str = include_str!("scripts/header.lua");

    #[test]
    fn scripts_start_with_their_shebang_then_the_shared_helpers() {
        for (script, shebang) in [
            (WRITE_SCRIPT, "#!lua\n"),
            (TOUCH_SCRIPT, "#!lua\n"),
            (USAGE_SCRIPT, "#!lua flags=no-writes\n"),
            (PURGE_SCRIPT, "#!lua\n"),
            (TRIM_SCRIPT, "#!lua\n"),
            (DELETE_IF_UNCHANGED_SCRIPT, "#!lua\n"),
        ] {
            let rest = script
                .strip_prefix(shebang)
                .expect("the shebang comes first");
            let body = rest.strip_prefix(HEADER).expect("then the shared helpers");
            assert!(!body.contains("#!lua"), "one shebang only");
            // The header check itself lives in header.lua only.
            assert!(!body.contains("byte(h, 42)") && !body.contains("byte(old, 42)"));
        }
        assert!(COUNT_NEW_RECORDS_SCRIPT.starts_with("#!lua\n"));
        assert!(!COUNT_NEW_RECORDS_SCRIPT.contains(HEADER));
        assert!(EXPIRE_NEW_RECORDS_SCRIPT.starts_with("#!lua\n"));
        assert!(!EXPIRE_NEW_RECORDS_SCRIPT.contains(HEADER));
    }
}
