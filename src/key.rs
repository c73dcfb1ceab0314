//! Key rules, checked once by the [`Store`](crate::Store) for every backend.
//!
//! A key is any UTF-8 string that
//! - is not empty,
//! - is at most [`MAX_KEY_LEN`] bytes long,
//! - contains no control characters (`\0`, `\n`, `\t`, DEL, the C1 range ...).
//!
//! Everything else is allowed, including `/`, `\`, `..`, `:`, `%`, `*` and any Unicode:
//! backends store such keys safely (the file backend encodes them into names that can never
//! leave its root). Keys are compared byte for byte: `"Player"` and `"player"` are different
//! keys, and so are two Unicode spellings that normalize to the same text.
//! A common convention is `kind:id`, e.g. `player:123`, listed with the prefix `player:`.

use crate::error::{Result, StorageError};

/// The longest key accepted, in bytes of UTF-8.
pub const MAX_KEY_LEN: usize = 512;

/// Prefix of the store's own bookkeeping records. It starts with a control character, which
/// user keys cannot contain, so the two can never collide. Tools that copy raw records
/// (the inspector's export) must carry these records along.
#[cfg_attr(feature = "internals", visibility::make(pub), doc(hidden))]
pub(crate) const INTERNAL_PREFIX: &str = "\u{1}bevy_storage/";

/// The record in which a store keeps its encryption key check (and a passphrase's salt).
#[cfg_attr(feature = "internals", visibility::make(pub), doc(hidden))]
pub(crate) const KEYCHECK_KEY: &str = "\u{1}bevy_storage/keycheck";
/// Every bookkeeping key the store writes: statistics subtract these by point reads instead
/// of scanning the internal prefix (a `SCAN` of a whole Redis database on every refresh).
#[cfg_attr(feature = "internals", visibility::make(pub), doc(hidden))]
pub(crate) const INTERNAL_KEYS: &[&str] = &[KEYCHECK_KEY];

/// Checks a key against the rules above.
pub fn validate_key(key: &str) -> Result<()> {
    let reason = if key.is_empty() {
        "a key must not be empty"
    } else if key.len() > MAX_KEY_LEN {
        "a key must be at most 512 bytes of UTF-8"
    } else if key.chars().any(char::is_control) {
        "a key must not contain control characters (NUL, newline, tab, ...)"
    } else {
        return Ok(());
    };
    Err(StorageError::InvalidKey {
        key: shorten(key),
        reason,
    })
}

/// Checks a prefix for `list_keys`: the empty prefix is allowed (it lists everything).
pub fn validate_prefix(prefix: &str) -> Result<()> {
    if prefix.is_empty() {
        Ok(())
    } else {
        validate_key(prefix)
    }
}

/// True for the store's own bookkeeping keys (see [`INTERNAL_PREFIX`]).
#[cfg_attr(feature = "internals", visibility::make(pub), doc(hidden))]
pub(crate) fn is_internal(key: &str) -> bool {
    key.starts_with(INTERNAL_PREFIX)
}

fn shorten(key: &str) -> String {
    if key.len() <= 64 {
        return key.to_owned();
    }
    let mut end = 64;
    while !key.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}... ({} bytes)", &key[..end], key.len())
}

/// The smallest string greater than every string that starts with `prefix`, or `None` when
/// there is none (the prefix is empty or all `char::MAX`). UTF-8 byte order is code point
/// order and UTF-8 is prefix-free, so replacing the last character that can be incremented by
/// its successor (and dropping the `char::MAX`es after it) gives that bound.
#[cfg_attr(not(any(feature = "sqlite", feature = "postgres")), allow(dead_code))]
pub(crate) fn prefix_upper_bound(prefix: &str) -> Option<String> {
    let (i, c) = prefix.char_indices().rev().find(|&(_, c)| c != char::MAX)?;
    let next = match c {
        '\u{D7FF}' => '\u{E000}', // skip the surrogates
        c => char::from_u32(u32::from(c) + 1)?,
    };
    let mut upper = String::with_capacity(i + next.len_utf8());
    upper.push_str(&prefix[..i]);
    upper.push(next);
    Some(upper)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_ordinary_and_odd_but_safe_keys() {
        for k in [
            "player:1",
            "a/b",
            "../../etc/passwd",
            "C:\\x",
            "..",
            "100%",
            "é",
            "名前",
        ] {
            validate_key(k).unwrap();
        }
        validate_key(&"x".repeat(MAX_KEY_LEN)).unwrap();
    }

    #[test]
    fn refuses_bad_keys_with_a_reason() {
        for k in ["", "a\0b", "line\nbreak", "tab\t", "\u{7f}", "\u{85}"] {
            assert!(
                matches!(validate_key(k), Err(StorageError::InvalidKey { .. })),
                "{k:?}"
            );
        }
        let long = "é".repeat(MAX_KEY_LEN);
        let err = validate_key(&long).unwrap_err().to_string();
        assert!(err.contains("512 bytes"), "{err}");
        assert!(err.len() < 300, "the message shortens the key: {err}");
        assert!(is_internal(INTERNAL_PREFIX));
        assert!(
            validate_key(INTERNAL_PREFIX).is_err(),
            "users cannot write internal keys"
        );
    }
}
