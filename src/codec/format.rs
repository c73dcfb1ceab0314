//! The serde formats a value can be written in.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

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
/// placeholder of an [`envelope::payload_buffer`](super::envelope::payload_buffer)). On error
/// the contents of `out` are unspecified. `key` only names the record in errors.
pub fn serialize_into<T: Serialize + ?Sized>(
    key: &str,
    value: &T,
    format: Format,
    out: &mut Vec<u8>,
) -> Result<()> {
    let err = |message: String| StorageError::Serialize {
        key: key.to_owned(),
        message,
    };
    match format {
        Format::Ron => ron::Options::default()
            .to_io_writer(&mut *out, value)
            .map_err(|e| err(e.to_string())),
        Format::Binary => {
            *out =
                postcard::to_extend(value, std::mem::take(out)).map_err(|e| err(e.to_string()))?;
            Ok(())
        }
        Format::Raw => Err(err(
            "the Raw format holds pre-encoded bytes; serialize with Ron or Binary".into(),
        )),
    }
}

/// Deserializes a value written in `format`. `key` only names the record in errors.
pub fn deserialize<T: DeserializeOwned>(key: &str, bytes: &[u8], format: Format) -> Result<T> {
    let err = |message: String| StorageError::Deserialize {
        key: key.to_owned(),
        message,
    };
    match format {
        Format::Ron => ron::de::from_bytes(bytes).map_err(|e| err(e.to_string())),
        Format::Binary => {
            let (value, rest) = postcard::take_from_bytes(bytes).map_err(|e| err(e.to_string()))?;
            if rest.is_empty() {
                Ok(value)
            } else {
                Err(err(format!(
                    "{} bytes left over after the value: it was saved as another type",
                    rest.len()
                )))
            }
        }
        Format::Raw => Err(err(
            "the record holds raw bytes; read it with Store::load_bytes".into(),
        )),
    }
}
