//! Small text helpers: sizes, UTC times, durations, hex dumps and base64.

use std::fmt::Write as _;

use bevy_storage::clock::Timestamp;

/// `1234` → `1.2 KiB`.
pub fn size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

/// A stored size for `meta`: `905 bytes as stored`, `1.2 KiB (1234 bytes as stored)`.
pub fn size_as_stored(bytes: u64) -> String {
    let exact = if bytes == 1 {
        "1 byte as stored".to_owned()
    } else {
        format!("{bytes} bytes as stored")
    };
    if bytes < 1024 {
        exact
    } else {
        format!("{} ({exact})", size(bytes))
    }
}

/// Parses a size: `500000`, `500000B`, `64KiB`, `100MiB`, `2GiB`, `1TiB` (also `KB`, `MB`,
/// `GB`, `TB` as powers of 1000, and `K`/`M`/`G`/`T` as powers of 1024).
pub fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: f64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a size (examples: 100MiB, 2GiB, 500000)"))?;
    let scale: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kib" => 1024.0,
        "m" | "mib" => 1024.0 * 1024.0,
        "g" | "gib" => 1024.0 * 1024.0 * 1024.0,
        "t" | "tib" => 1024.0 * 1024.0 * 1024.0 * 1024.0,
        "kb" => 1e3,
        "mb" => 1e6,
        "gb" => 1e9,
        "tb" => 1e12,
        other => {
            return Err(format!(
                "unknown size unit {other:?} in {text:?} (B, KiB, MiB, GiB, TiB, KB, MB, GB, TB)"
            ));
        }
    };
    let bytes = number * scale;
    if !bytes.is_finite() || bytes < 0.0 || bytes > u64::MAX as f64 {
        return Err(format!("{text:?} is out of range"));
    }
    Ok(bytes.round() as u64)
}

/// Parses a duration: `90s`, `10m`, `12h`, `30d`, `2w`, `1500ms`, or a number of seconds.
pub fn parse_duration(text: &str) -> Result<std::time::Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: f64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a duration (examples: 90s, 10m, 12h, 30d)"))?;
    let seconds = match unit.trim() {
        "" | "s" => 1.0,
        "ms" => 0.001,
        "m" | "min" => 60.0,
        "h" => 3600.0,
        "d" => 86_400.0,
        "w" => 7.0 * 86_400.0,
        other => {
            return Err(format!(
                "unknown duration unit {other:?} in {text:?} (ms, s, m, h, d, w)"
            ));
        }
    };
    std::time::Duration::try_from_secs_f64(number * seconds)
        .ok()
        .filter(|d| !d.is_zero())
        .ok_or_else(|| format!("{text:?} is not a positive duration"))
}

/// A timestamp as RFC 3339 UTC, to the second (`2025-06-01T12:00:00Z`).
pub fn time(at: Timestamp) -> String {
    let (date, secs, _) = split(at);
    format!("{date}T{secs}Z")
}

/// A timestamp as RFC 3339 UTC, to the millisecond (`2025-06-01T12:00:00.123Z`).
pub fn time_ms(at: Timestamp) -> String {
    let (date, secs, millis) = split(at);
    format!("{date}T{secs}.{millis:03}Z")
}

fn split(at: Timestamp) -> (String, String, i64) {
    let ms = at.as_millis();
    let secs = ms.div_euclid(1000);
    let millis = ms.rem_euclid(1000);
    let days = secs.div_euclid(86_400);
    let sod = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    (
        format!("{y:04}-{m:02}-{d:02}"),
        format!("{:02}:{:02}:{:02}", sod / 3600, sod % 3600 / 60, sod % 60),
        millis,
    )
}

/// Days since 1970-01-01 → (year, month, day), proleptic Gregorian (H. Hinnant's algorithm).
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// How far `to` is from `now`, two units at most: `in 29d 23h`, `3m 5s ago`.
pub fn relative(now: Timestamp, to: Timestamp) -> String {
    let delta = to.as_millis().saturating_sub(now.as_millis());
    let secs = delta.unsigned_abs() / 1000;
    let parts = [
        (secs / 86_400, "d"),
        (secs % 86_400 / 3600, "h"),
        (secs % 3600 / 60, "m"),
        (secs % 60, "s"),
    ];
    let first = parts.iter().position(|(n, _)| *n > 0).unwrap_or(3);
    let mut text = String::new();
    for (n, unit) in parts.iter().skip(first).take(2) {
        if !text.is_empty() {
            if *n == 0 {
                break;
            }
            text.push(' ');
        }
        let _ = write!(text, "{n}{unit}");
    }
    if delta >= 0 {
        format!("in {text}")
    } else {
        format!("{text} ago")
    }
}

/// `xxd`-style lines: offset, 16 bytes in hex, and their printable ASCII.
pub fn hex_dump(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len() * 4 + 16);
    for (row, chunk) in bytes.chunks(16).enumerate() {
        let _ = write!(out, "{:08x}  ", row * 16);
        for i in 0..16 {
            match chunk.get(i) {
                Some(b) => {
                    let _ = write!(out, "{b:02x} ");
                }
                None => out.push_str("   "),
            }
            if i == 7 {
                out.push(' ');
            }
        }
        out.push_str(" |");
        out.extend(chunk.iter().map(|&b| {
            if b.is_ascii_graphic() || b == b' ' {
                b as char
            } else {
                '.'
            }
        }));
        out.push_str("|\n");
    }
    out
}

/// Lowercase hex without separators.
pub fn hex(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(out, "{b:02x}");
    }
    out
}

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Standard base64 with padding (RFC 4648 §4).
pub fn base64_encode(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let n = chunk.len();
        let word = u32::from(chunk[0]) << 16
            | u32::from(chunk.get(1).copied().unwrap_or(0)) << 8
            | u32::from(chunk.get(2).copied().unwrap_or(0));
        for i in 0..4 {
            if i <= n {
                out.push(B64[(word >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Decodes standard padded base64; `None` for anything else (wrong length, stray characters,
/// misplaced padding, non-zero trailing bits).
pub fn base64_decode(text: &str) -> Option<Vec<u8>> {
    let bytes = text.as_bytes();
    if !bytes.len().is_multiple_of(4) {
        return None;
    }
    let value = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    };
    let mut out = Vec::with_capacity(bytes.len() / 4 * 3);
    let quads = bytes.len() / 4;
    for (q, quad) in bytes.chunks(4).enumerate() {
        let pad = quad.iter().rev().take_while(|&&c| c == b'=').count();
        if pad > 2 || (pad > 0 && q + 1 != quads) {
            return None;
        }
        let mut word = 0u32;
        for &c in &quad[..4 - pad] {
            word = word << 6 | value(c)?;
        }
        word <<= 6 * pad as u32;
        let decoded = [(word >> 16) as u8, (word >> 8) as u8, word as u8];
        let keep = 3 - pad;
        if decoded[keep..].iter().any(|&b| b != 0) {
            return None;
        }
        out.extend_from_slice(&decoded[..keep]);
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_round_trips_and_rejects_garbage() {
        for len in 0..40 {
            let data: Vec<u8> = (0..len).map(|i| (i * 37 + 11) as u8).collect();
            let text = base64_encode(&data);
            assert_eq!(base64_decode(&text).as_deref(), Some(&data[..]), "{text}");
        }
        assert_eq!(base64_encode(b"foobar"), "Zm9vYmFy");
        assert_eq!(base64_encode(b"fo"), "Zm8=");
        for bad in [
            "Zm8", "Zm8==", "Z===", "Zm9v!mFy", "Zm==Zm9v", "Zm9=", "Zn==",
        ] {
            assert_eq!(base64_decode(bad), None, "{bad}");
        }
    }

    #[test]
    fn times_and_sizes_read_well() {
        assert_eq!(time(Timestamp(0)), "1970-01-01T00:00:00Z");
        assert_eq!(
            time_ms(Timestamp(951_782_400_123)),
            "2000-02-29T00:00:00.123Z"
        );
        assert_eq!(time(Timestamp(-1000)), "1969-12-31T23:59:59Z");
        assert_eq!(time(Timestamp(1_767_225_599_000)), "2025-12-31T23:59:59Z");
        assert_eq!(size(999), "999 B");
        assert_eq!(size(1536), "1.5 KiB");
        assert_eq!(size(5 * 1024 * 1024), "5.0 MiB");
        let now = Timestamp(1_000_000_000);
        assert_eq!(
            relative(
                now,
                Timestamp(now.0 + (29 * 86_400 + 23 * 3600 + 59) * 1000)
            ),
            "in 29d 23h"
        );
        assert_eq!(relative(now, Timestamp(now.0 + 86_400_000)), "in 1d");
        assert_eq!(relative(now, Timestamp(now.0 - 65_000)), "1m 5s ago");
        assert_eq!(relative(now, now), "in 0s");
    }

    #[test]
    fn hex_dump_shows_offsets_and_ascii() {
        let dump = hex_dump(b"BSTR\x01\x00 hello, world!!");
        assert!(
            dump.starts_with("00000000  42 53 54 52 01 00 20 68  "),
            "{dump}"
        );
        assert!(dump.contains("|BSTR.. hello, wo|"), "{dump}");
        assert!(dump.contains("00000010  72 6c 64 21 21"), "{dump}");
    }
}
