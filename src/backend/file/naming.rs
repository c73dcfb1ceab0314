//! Key ⇄ file name: the name of a key's record file in the root, and the key a name stands for.
//!
//! A key is turned into a name byte by byte (over its UTF-8): `a`-`z`, `0`-`9`, `_` and `-`
//! stay as they are, every other byte, **uppercase letters included**, becomes `%` and two
//! lowercase hex digits. So `Player:1` is stored as `k-%50layer%3a1`, `../x` as
//! `k-%2e%2e%2fx` and `CON` as `k-%43%4f%4e`. This makes names
//!
//! - reversible, and canonical (a `%xx` escape of a byte that could stand for itself, or an
//!   uppercase hex digit, is not a data-file name), so each key has exactly one name;
//! - free of `/`, `\`, `:`, `.`, NUL and every character some file system reserves: a name
//!   can never be `.`, `..`, a path, a Windows device (`CON`, `NUL`, `COM1`, ...), end in a
//!   dot or a space, or differ from another name only in letter case (so keys `Player` and
//!   `player` stay apart on case-insensitive file systems such as NTFS and APFS);
//! - pure ASCII, so no Unicode normalization by the file system can merge two keys.
//!
//! When `k-` plus the encoded key would be longer than 200 bytes (the key can be 512 bytes of
//! UTF-8, which may encode to 1.5 KB), the record goes under a **hashed name** instead,
//! well within the 255-byte limit of common file systems:
//!
//! ```text
//! l-<hint>-<hash>-<slot>
//!   hint  the first (at most) 96 characters of the encoded key, for people browsing the folder
//!   hash  24 hex digits: FNV-1a 64 of the key's bytes, then CRC-32 of the key's bytes
//!   slot  0, 1, 2, ... (decimal) among keys whose hint and hash are the same
//! ```
//!
//! Both hashes are computed by this crate's own code from fixed constants, so names are stable
//! across Rust versions and platforms (unlike `std`'s `DefaultHasher`). A 96-bit collision
//! between two keys is practically impossible, but it is handled anyway: keys with the same
//! `l-<hint>-<hash>-` form a **chain** of slots `0..n` with no holes. A lookup reads the
//! header of each slot until it finds one holding the key (the record file stores its full
//! key, so a file of another key is never returned for this one) or reaches a missing slot.
//! A new key takes the first missing slot; deleting the key in slot `i` moves the chain's last
//! file into slot `i` with one atomic rename, so the chain never gets a hole.

/// Prefix of a data file under its direct name.
const DIRECT_PREFIX: &str = "k-";
/// Prefix of a data file under a hashed name.
const HASHED_PREFIX: &str = "l-";
/// Longest direct name; longer keys get a hashed name.
const MAX_DIRECT_NAME: usize = 200;
/// Longest readable hint (encoded characters) in a hashed name.
const HINT_LEN: usize = 96;
/// Length of the hash part of a hashed name.
const HASH_HEX_LEN: usize = 24;
/// Most files one hashed chain may hold (a bound on lookups, never reached in practice).
pub(super) const MAX_SLOTS: u32 = 1024;

/// Where a key's record lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Place {
    /// Under this direct name.
    Direct(String),
    /// In the hashed chain whose slot names are this base followed by the slot number.
    Chain(String),
}

/// A data-file name, decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum ParsedName {
    /// A direct name and the key it encodes.
    Direct(String),
    /// A hashed name: the decoded bytes of its hint and its chain base.
    Hashed { hint: Vec<u8>, base: String },
}

impl ParsedName {
    /// Whether the file may hold a key that starts with `prefix`, as far as its name tells
    /// (a direct name spells its key; a hashed name only the start of it).
    pub(super) fn may_hold_prefix(&self, prefix: &str) -> bool {
        match self {
            ParsedName::Direct(key) => key.starts_with(prefix),
            ParsedName::Hashed { hint, .. } => {
                let n = hint.len().min(prefix.len());
                hint[..n] == prefix.as_bytes()[..n]
            }
        }
    }
}

/// Bytes that stand for themselves in a file name.
pub(super) fn is_plain(b: u8) -> bool {
    b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-'
}

fn push_encoded(out: &mut String, b: u8) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    if is_plain(b) {
        out.push(char::from(b));
    } else {
        out.push('%');
        out.push(char::from(HEX[usize::from(b >> 4)]));
        out.push(char::from(HEX[usize::from(b & 0xf)]));
    }
}

fn hex_value(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    }
}

/// Decodes an encoded key (or hint); `None` unless it is in the one canonical encoding.
fn decode(s: &str) -> Option<Vec<u8>> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let byte = hex_value(*b.get(i + 1)?)? << 4 | hex_value(*b.get(i + 2)?)?;
            if is_plain(byte) {
                return None;
            }
            out.push(byte);
            i += 3;
        } else if is_plain(b[i]) {
            out.push(b[i]);
            i += 1;
        } else {
            return None;
        }
    }
    Some(out)
}

/// FNV-1a, 64 bits: fixed constants, so the same on every platform and Rust version.
fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}

/// Where `key`'s record lives (see the module docs).
pub(super) fn place_of(key: &str) -> Place {
    let mut name = String::with_capacity(DIRECT_PREFIX.len() + key.len());
    name.push_str(DIRECT_PREFIX);
    for &b in key.as_bytes() {
        push_encoded(&mut name, b);
        if name.len() > MAX_DIRECT_NAME {
            return Place::Chain(chain_base(key));
        }
    }
    Place::Direct(name)
}

/// `l-<hint>-<hash>-` for a key too long for a direct name.
fn chain_base(key: &str) -> String {
    let mut name = String::from(HASHED_PREFIX);
    for &b in key.as_bytes() {
        let width = if is_plain(b) { 1 } else { 3 };
        if name.len() - HASHED_PREFIX.len() + width > HINT_LEN {
            break;
        }
        push_encoded(&mut name, b);
    }
    let bytes = key.as_bytes();
    name.push_str(&format!(
        "-{:016x}{:08x}-",
        fnv1a64(bytes),
        crc32fast::hash(bytes)
    ));
    name
}

pub(super) fn slot_name(base: &str, slot: u32) -> String {
    format!("{base}{slot}")
}

/// Decodes a file name of the root; `None` for anything that is not a data-file name.
pub(super) fn parse_name(name: &str) -> Option<ParsedName> {
    if let Some(encoded) = name.strip_prefix(DIRECT_PREFIX) {
        if name.len() > MAX_DIRECT_NAME {
            return None;
        }
        let key = String::from_utf8(decode(encoded)?).ok()?;
        return Some(ParsedName::Direct(key));
    }
    let rest = name.strip_prefix(HASHED_PREFIX)?;
    let (front, slot) = rest.rsplit_once('-')?;
    let canonical_slot = !slot.is_empty()
        && slot.bytes().all(|b| b.is_ascii_digit())
        && (slot == "0" || !slot.starts_with('0'));
    if !canonical_slot || slot.parse::<u32>().ok()? >= MAX_SLOTS {
        return None;
    }
    let (hint, hash) = front.rsplit_once('-')?;
    if hash.len() != HASH_HEX_LEN || !hash.bytes().all(|b| hex_value(b).is_some()) {
        return None;
    }
    if hint.len() > HINT_LEN {
        return None;
    }
    let hint = decode(hint)?;
    Some(ParsedName::Hashed {
        hint,
        base: name[..name.len() - slot.len()].to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;
    use crate::backend::Backend;
    use crate::backend::file::lock::LOCK_FILE;
    use crate::backend::file::testing::*;
    use crate::clock::Timestamp;

    fn hostile_keys() -> Vec<String> {
        let mut keys: Vec<String> = [
            "../../etc/passwd",
            "a/b",
            "/abs",
            "C:\\x",
            "\\\\server\\share",
            "..",
            ".",
            "...",
            "%",
            "%25",
            "%2e",
            "k-x",
            "l-x-000000000000000000000000-0",
            ".lock",
            ".journal",
            ".tmp-0000000000000000",
            "CON",
            "con",
            "NUL",
            "nul.txt",
            "COM1",
            "LPT9",
            "aux",
            "trailing.",
            "trailing ",
            " leading",
            "a b",
            "*?<>|\":",
            "名前",
            "é",
            "e\u{301}",
            "\u{1}bevy_storage/meta",
            "💾 save",
            "Player",
            "player",
            "PLAYER",
            "/",
            "\\",
            "\u{202e}rtl",
            "",
            "-",
            "_",
            "0",
        ]
        .iter()
        .map(|k| (*k).to_owned())
        .collect();
        keys.push("é".repeat(256));
        keys.push("名".repeat(170) + "ab");
        keys.push("a".repeat(512));
        keys.push("A".repeat(512));
        keys.push("/".repeat(512));
        keys.push("../".repeat(170));
        keys.push("a".repeat(198));
        keys.push("a".repeat(199));
        keys.push("\u{1}bevy_storage/".to_owned() + &"x".repeat(400));
        keys
    }

    fn assert_safe_name(name: &str) {
        assert!(name.len() <= 255, "{name} is too long");
        assert!(name != "." && name != "..");
        assert!(name.starts_with(DIRECT_PREFIX) || name.starts_with(HASHED_PREFIX));
        assert!(
            name.bytes().all(|b| is_plain(b) || b == b'%'),
            "{name:?} has a character outside [a-z0-9_%-]"
        );
    }

    #[test]
    fn name_mapping_round_trips_hostile_keys() {
        let mut names = BTreeSet::new();
        for key in hostile_keys() {
            let name = match place_of(&key) {
                Place::Direct(name) => {
                    assert_eq!(parse_name(&name), Some(ParsedName::Direct(key.clone())));
                    name
                }
                Place::Chain(base) => {
                    assert!(key.len() > 60, "{key:?} should have had a direct name");
                    let name = slot_name(&base, 0);
                    match parse_name(&name) {
                        Some(ParsedName::Hashed { hint, base: parsed }) => {
                            assert_eq!(parsed, base);
                            assert!(key.as_bytes().starts_with(&hint));
                        }
                        other => panic!("{name} parsed as {other:?}"),
                    }
                    name
                }
            };
            assert_safe_name(&name);
            assert!(names.insert(name.clone()), "{name} used twice");
        }
        // Names that are not canonical are not data-file names.
        let hash = "0".repeat(HASH_HEX_LEN);
        for foreign in [
            "k-%61",
            "k-A",
            "k-%2E",
            "k-%2",
            "k-a/b",
            "k-a.b",
            "k-%ff",
            "K-abc",
            "kabc",
            "l-abc-0-0",
            &format!("l-abc-{hash}-01"),
            &format!("l-abc-{hash}-"),
            &format!("l-abc-{hash}-9999"),
            &format!("l-A-{hash}-0"),
            ".lock",
            ".journal",
            ".tmp-0123",
        ] {
            assert_eq!(parse_name(foreign), None, "{foreign}");
        }
        assert_eq!(
            parse_name(&format!("l-abc-{hash}-12")),
            Some(ParsedName::Hashed {
                hint: b"abc".to_vec(),
                base: format!("l-abc-{hash}-"),
            })
        );
    }

    #[test]
    fn hostile_keys_stay_inside_the_root() {
        let (tmp, b) = setup();
        let keys = hostile_keys();
        // One batch (through the journal) and one write per key.
        let ops = keys
            .iter()
            .map(|k| put(k, k.as_bytes(), 1))
            .collect::<Vec<_>>();
        b.write(ops, NOW).unwrap();
        for key in &keys {
            b.write(vec![put(key, format!("v2 {key}").as_bytes(), 2)], NOW)
                .unwrap();
        }
        for key in &keys {
            let rec = b
                .get(key)
                .unwrap()
                .unwrap_or_else(|| panic!("{key:?} lost"));
            assert_eq!(rec.value, format!("v2 {key}").as_bytes());
            assert_eq!(rec.meta.created_at, Timestamp(1), "{key:?}");
            let path = b.path_of(key).unwrap().unwrap();
            assert_eq!(path.parent().unwrap(), b.root());
            assert_safe_name(path.file_name().unwrap().to_str().unwrap());
        }
        let expected: BTreeSet<String> = keys.iter().cloned().collect();
        assert_eq!(
            listed_keys(&b, "").into_iter().collect::<BTreeSet<_>>(),
            expected
        );
        let dotted: BTreeSet<String> = keys
            .iter()
            .filter(|k| k.starts_with("../"))
            .cloned()
            .collect();
        assert_eq!(
            listed_keys(&b, "../").into_iter().collect::<BTreeSet<_>>(),
            dotted
        );
        // Nothing appeared next to the root, and nothing but data files and the lock inside it.
        assert_eq!(names_in(tmp.path()), BTreeSet::from(["store".to_owned()]));
        for name in names_in(b.root()) {
            let path = b.root().join(&name);
            assert!(path.is_file(), "{name} is not a plain file");
            assert!(name == LOCK_FILE || parse_name(&name).is_some(), "{name}");
        }
        assert_eq!(names_in(b.root()).len(), keys.len() + 1);
        for key in &keys {
            b.write(vec![del(key)], NOW).unwrap();
        }
        assert_eq!(names_in(b.root()), BTreeSet::from([LOCK_FILE.to_owned()]));
    }

    #[test]
    fn case_distinct_keys_are_distinct_files() {
        let (_tmp, b) = setup();
        let variants = ["Player", "player", "PLAYER", "pLaYeR"];
        b.write(
            variants.iter().map(|k| put(k, k.as_bytes(), 1)).collect(),
            NOW,
        )
        .unwrap();
        let lowered: BTreeSet<String> = variants
            .iter()
            .map(|k| {
                let path = b.path_of(k).unwrap().unwrap();
                path.file_name().unwrap().to_str().unwrap().to_lowercase()
            })
            .collect();
        assert_eq!(lowered.len(), variants.len(), "names collide ignoring case");
        for k in variants {
            assert_eq!(value_of(&b, k).unwrap(), k.as_bytes());
        }
    }

    #[test]
    fn long_multibyte_keys() {
        let (_tmp, b) = setup();
        let base = "é".repeat(255);
        let k1 = base.clone() + "a"; // 511 bytes
        let k2 = base.clone() + "b"; // same hint, other hash
        let k3 = "名".repeat(170) + "ab"; // 512 bytes
        for k in [&k1, &k2, &k3] {
            assert!(matches!(place_of(k), Place::Chain(_)));
        }
        b.write(vec![put(&k1, b"1", 1), put(&k2, b"2", 1)], NOW)
            .unwrap();
        b.write(vec![put(&k3, b"3", 1)], NOW).unwrap();
        assert_eq!(value_of(&b, &k1).unwrap(), b"1");
        assert_eq!(value_of(&b, &k2).unwrap(), b"2");
        assert_eq!(value_of(&b, &k3).unwrap(), b"3");
        let p1 = b.path_of(&k1).unwrap().unwrap();
        let p2 = b.path_of(&k2).unwrap().unwrap();
        assert_ne!(p1, p2);
        for p in [&p1, &p2] {
            assert!(p.file_name().unwrap().len() <= 255);
        }
        let mut listed = listed_keys(&b, &"é".repeat(10));
        listed.sort();
        assert_eq!(listed, vec![k1.clone(), k2.clone()]);
        assert_eq!(listed_keys(&b, &k2), vec![k2.clone()]);
        assert_eq!(listed_keys(&b, "名"), vec![k3.clone()]);
        assert_eq!(listed_keys(&b, "x"), Vec::<String>::new());
        b.write(vec![del(&k1)], NOW).unwrap();
        assert_eq!(b.get(&k1).unwrap(), None);
        assert_eq!(value_of(&b, &k2).unwrap(), b"2");
    }
}
