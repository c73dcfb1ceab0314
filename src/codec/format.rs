//! The serde formats a value can be written in.

use std::marker::PhantomData;

use serde::de::{DeserializeOwned, DeserializeSeed};
use serde::{Deserialize, Serialize};

use super::depth::{Bounded, BoundedValue, DepthBudget, MAX_DEPTH};
use crate::error::{Result, StorageError};

/// How values are turned into bytes before compression and encryption.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Format {
    /// [RON](https://docs.rs/ron): readable text, handles every serde type (enums, maps,
    /// `serde_json::Value`, untagged enums). The default: a stored record can be read by eye.
    #[default]
    Ron,
    /// [postcard](https://docs.rs/postcard): compact binary, several times faster than RON.
    /// It is not self-describing: types that need `deserialize_any` (`serde_json::Value`,
    /// `#[serde(untagged)]`, `#[serde(flatten)]`) do not round-trip; use RON for those.
    Binary,
    /// Bytes the caller already encoded (used by the snapshot layer and raw-byte APIs).
    Raw,
}

impl Format {
    pub(crate) fn to_byte(self) -> u8 {
        match self {
            Format::Raw => 0,
            Format::Ron => 1,
            Format::Binary => 2,
        }
    }

    pub(crate) fn from_byte(b: u8) -> Option<Self> {
        match b {
            0 => Some(Format::Raw),
            1 => Some(Format::Ron),
            2 => Some(Format::Binary),
            _ => None,
        }
    }
}

/// Serializes a value in the given format. `key` only names the record in errors.
pub fn serialize<T: Serialize + ?Sized>(key: &str, value: &T, format: Format) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    serialize_into(key, value, format, &mut out)?;
    Ok(out)
}

/// Serializes a value in the given format, appending to `out` (for example after the
/// placeholder of an `envelope::payload_buffer`). On error
/// the contents of `out` are unspecified. `key` only names the record in errors.
///
/// A value nested deeper than [`MAX_DEPTH`] is refused with
/// [`StorageError::NestingTooDeep`]: no load would accept it.
pub fn serialize_into<T: Serialize + ?Sized>(
    key: &str,
    value: &T,
    format: Format,
    out: &mut Vec<u8>,
) -> Result<()> {
    let budget = DepthBudget::new(MAX_DEPTH);
    let result = match format {
        Format::Ron => ron::Options::default()
            .to_io_writer(&mut *out, &BoundedValue::for_ron_serializer(value, &budget))
            .map_err(|e| e.to_string()),
        Format::Binary => {
            match postcard::serialize_with_flavor(&BoundedValue::new(value, &budget), AppendTo(out))
            {
                Ok(()) => Ok(()),
                Err(e) => Err(postcard_serialize_failure(value, &e)),
            }
        }
        Format::Raw => {
            Err("the Raw format holds pre-encoded bytes; serialize with Ron or Binary".into())
        }
    };
    result.map_err(|message| {
        if budget.exceeded() {
            StorageError::NestingTooDeep {
                key: key.to_owned(),
                limit: MAX_DEPTH,
            }
        } else {
            StorageError::Serialize {
                key: key.to_owned(),
                message,
            }
        }
    })
}

/// A postcard output that appends to a `Vec<u8>` with `extend_from_slice`: the same bytes as
/// `postcard::to_extend`, whose `Extend<u8>` copies a string or byte slice one byte at a time
/// (0.9M of the 9.7M instructions of postcard behind the depth budget on the bench's 1 MiB
/// value). On an error the bytes written so far stay in the buffer (every caller drops it).
pub(crate) struct AppendTo<'a>(pub(crate) &'a mut Vec<u8>);

impl postcard::ser_flavors::Flavor for AppendTo<'_> {
    type Output = ();

    #[inline(always)]
    fn try_push(&mut self, data: u8) -> postcard::Result<()> {
        self.0.push(data);
        Ok(())
    }

    #[inline(always)]
    fn try_extend(&mut self, data: &[u8]) -> postcard::Result<()> {
        self.0.extend_from_slice(data);
        Ok(())
    }

    fn finalize(self) -> postcard::Result<()> {
        Ok(())
    }
}

/// What went wrong in a postcard serialization, with the cause and the field path: postcard
/// drops the message of a custom error (a `Serialize` impl's own), so the value is run again
/// through RON with the path recorded, which keeps both. Only runs on the error path.
fn postcard_serialize_failure<T: Serialize + ?Sized>(value: &T, error: &postcard::Error) -> String {
    let budget = DepthBudget::new(MAX_DEPTH);
    let mut text = String::new();
    let traced = ron::Serializer::new(&mut text, None)
        .map_err(|e| e.to_string())
        .and_then(|mut serializer| {
            serde_path_to_error::serialize(&BoundedValue::new(value, &budget), &mut serializer)
                .map_err(|e| match e.path().to_string().as_str() {
                    "." | "" => e.inner().to_string(),
                    path => format!("at {path}: {}", e.inner()),
                })
        });
    match (error, traced) {
        (_, Err(cause)) => cause,
        // RON took the value: the limit is postcard's own (for example a sequence of
        // unknown length).
        (error, Ok(())) => format!("{error} (postcard)"),
    }
}

/// Deserializes a value written in `format`. `key` only names the record in errors.
///
/// The bytes are treated as hostile: nesting deeper than [`MAX_DEPTH`] is refused with
/// [`StorageError::NestingTooDeep`] before it can exhaust the stack, and lengths are checked
/// against the bytes there are (see [`depth`](super::depth)).
pub fn deserialize<T: DeserializeOwned>(key: &str, bytes: &[u8], format: Format) -> Result<T> {
    let budget = DepthBudget::new(MAX_DEPTH);
    let seed = Bounded::seed(PhantomData::<T>, &budget);
    let result = match format {
        Format::Ron => ron_options()
            .from_bytes_seed(bytes, seed)
            .map_err(|e| e.to_string()),
        Format::Binary => {
            let mut de = postcard::Deserializer::from_bytes(bytes);
            match seed.deserialize(&mut de) {
                Ok(value) => match de.finalize() {
                    Ok([]) => Ok(value),
                    Ok(rest) => Err(format!(
                        "{} bytes left over after the value: it was saved as another type",
                        rest.len()
                    )),
                    Err(e) => Err(e.to_string()),
                },
                Err(e) => Err(e.to_string()),
            }
        }
        Format::Raw => Err("the record holds raw bytes; read it with Store::load_bytes".into()),
    };
    result.map_err(|message| {
        if budget.exceeded() || message.contains("Exceeded recursion limit") {
            StorageError::NestingTooDeep {
                key: key.to_owned(),
                limit: MAX_DEPTH,
            }
        } else {
            StorageError::Deserialize {
                key: key.to_owned(),
                message,
            }
        }
    })
}

/// RON's reader options. RON keeps a recursion limit of its own, which also bounds what it
/// skips (unknown fields); it counts up to two steps per level (an enum and its newtype
/// variant, a sequence and its element), so it is set above twice [`MAX_DEPTH`] and the
/// shared budget, which counts levels as saves do, speaks first.
pub(crate) fn ron_options() -> ron::Options {
    ron::Options::default().with_recursion_limit(2 * MAX_DEPTH + 8)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use serde::Serialize;

    use super::*;

    /// What RON itself writes for `value`, and what [`serialize_into`] writes, which hands
    /// plain strings to RON already quoted (see `depth.rs`).
    fn both<T: Serialize + ?Sized>(value: &T) -> (String, String) {
        let theirs = ron::Options::default().to_string(value).unwrap();
        let mut ours = Vec::new();
        serialize_into("k", value, Format::Ron, &mut ours).unwrap();
        (theirs, String::from_utf8(ours).unwrap())
    }

    #[derive(Serialize)]
    enum Shape {
        Named(String),
        Pair(String, u8),
        Fields { label: String, tags: Vec<String> },
    }

    #[derive(Serialize)]
    struct Profile {
        name: String,
        motto: Option<String>,
        shapes: Vec<Shape>,
        notes: BTreeMap<String, String>,
    }

    #[test]
    fn ron_strings_are_written_as_ron_writes_them() {
        let mut strings: Vec<String> = [
            "",
            "plain text 123 ~!@#$%^&*()_+-={}[]|:;<>,.?/`",
            "a \"quoted\" word",
            "it's",
            "back\\slash",
            "tab\tnew\nline\rreturn",
            "\u{0}\u{1f}\u{7f}",
            "héllo wörld ✓ 日本",
            "\u{301}combining",
            "r#\"raw\"#",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        // Every single byte of ASCII, and a few mixtures, as strings of their own.
        strings.extend((0u8..128).map(|b| format!("x{}y", char::from(b))));
        strings.push((0u8..128).map(char::from).collect());
        for s in &strings {
            let (theirs, ours) = both(s);
            assert_eq!(ours, theirs, "{s:?}");
        }
        let profile = Profile {
            name: "Ada".into(),
            motto: Some("never \"stop\"".into()),
            shapes: vec![
                Shape::Named("circle".into()),
                Shape::Pair("it's".into(), 3),
                Shape::Fields {
                    label: "plain".into(),
                    tags: strings.clone(),
                },
            ],
            notes: strings
                .iter()
                .enumerate()
                .map(|(i, s)| (format!("key {i}"), s.clone()))
                .collect(),
        };
        let (theirs, ours) = both(&profile);
        assert_eq!(ours, theirs);
        // Near the depth limit RON gets the strings to escape itself (the raw value would
        // count as one more level of its own limit): the same bytes at every depth.
        for depth in [1, 60, 63, 64, 65, 100, MAX_DEPTH - 1] {
            let mut value = serde_json::Value::String("deep".into());
            for _ in 0..depth {
                value = serde_json::Value::Array(vec![value]);
            }
            let (theirs, ours) = both(&value);
            assert_eq!(ours, theirs, "depth {depth}");
        }
    }

    #[test]
    fn binary_saves_are_postcard_bytes_after_the_buffer() {
        let long = "x".repeat(300);
        let value = Profile {
            name: "é \"quoted\" \u{1F600}".into(),
            motto: Some(long.clone()),
            shapes: vec![
                Shape::Named(String::new()),
                Shape::Pair(long.clone(), 7),
                Shape::Fields {
                    label: "l".into(),
                    tags: vec!["a".into(), long],
                },
            ],
            notes: BTreeMap::from([("k".into(), "v".into())]),
        };
        let mut ours = b"header".to_vec();
        serialize_into("k", &value, Format::Binary, &mut ours).unwrap();
        let mut theirs = b"header".to_vec();
        theirs.extend(postcard::to_stdvec(&value).unwrap());
        assert_eq!(ours, theirs);
    }
}
