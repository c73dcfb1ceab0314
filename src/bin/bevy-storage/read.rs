//! `list`, `get` and `meta`: the commands that read records.

use std::io::Write;

use bevy_storage::Store;
use bevy_storage::backend::{Backend, KeyEntry};
use bevy_storage::clock::Timestamp;
use bevy_storage::codec::envelope;
use bevy_storage::snapshot::{
    RecordKind, SnapshotEncoding, read_delta_header, read_header, record_kind,
};
use bevy_storage::{Format, LoadOptions, StorageError};
use serde_json::{Value as Json, json};

use crate::args::Cli;
use crate::failure::{Failure, Outcome};
use crate::open::{check_key, key_material, keyed_reader, open_store, store_config};
use crate::output::{format_name, plural, print_json};
use crate::{dump, render, ron_view, snapshot_view};

/// Keys per page when the CLI walks a store: memory stays bounded by it, whatever the store's
/// size. Large, because a page of the Redis and file backends costs one pass over all keys
/// (they keep no order), so fewer pages make an export of a big store faster.
pub const PAGE: usize = 10_000;

/// Calls `each` with every page of the entries under `prefix` (expired and bookkeeping
/// entries included), in key order, [`PAGE`] at a time.
pub fn each_page(
    backend: &dyn Backend,
    prefix: &str,
    mut each: impl FnMut(Vec<KeyEntry>) -> Outcome,
) -> Outcome {
    let mut after: Option<String> = None;
    loop {
        let page = backend.scan_page(prefix, after.as_deref(), PAGE)?;
        let full = page.len() == PAGE;
        after = page.last().map(|e| e.key.clone());
        each(page)?;
        if !full {
            return Ok(());
        }
    }
}

/// `list`: one page at a time, so a store of millions of keys lists in bounded memory. The
/// table's columns are as wide as the first page needs.
pub fn list(cli: &Cli, prefix: &str, out: &mut dyn Write) -> Outcome {
    let config = store_config(cli)?;
    bevy_storage::key::validate_prefix(prefix)?;
    let store = open_store(&config, false)?;
    let now = Timestamp::now();
    let expiry = |e: &KeyEntry| match e.expires_at {
        Some(at) => format!("{} ({})", render::time(at), render::relative(now, at)),
        None => "never".into(),
    };
    let (mut count, mut total) = (0u64, 0u64);
    let mut widths: Option<(usize, usize)> = None;
    if cli.json {
        write!(out, "[")?;
    }
    each_page(store.backend().as_ref(), prefix, |page| {
        let entries: Vec<KeyEntry> = page
            .into_iter()
            .filter(|e| !now.is_past(e.expires_at) && !dump::is_internal(&e.key))
            .collect();
        for e in &entries {
            if cli.json {
                let row = json!({
                    "key": e.key,
                    "size": e.size,
                    "expires_at": e.expires_at.map(render::time_ms),
                });
                let sep = if count == 0 { "\n  " } else { ",\n  " };
                write!(out, "{sep}{row}")?;
            }
            count += 1;
            total += e.size;
        }
        if cli.json || entries.is_empty() {
            return Ok(());
        }
        let rows: Vec<(String, String, String)> = entries
            .iter()
            .map(|e| (e.key.clone(), render::size(e.size), expiry(e)))
            .collect();
        let (kw, sw) = *widths.get_or_insert_with(|| {
            let width = |pick: fn(&(String, String, String)) -> &String, title: &str| {
                rows.iter()
                    .map(|r| pick(r).chars().count())
                    .chain([title.len()])
                    .max()
                    .unwrap_or(0)
            };
            (width(|r| &r.0, "KEY"), width(|r| &r.1, "SIZE"))
        });
        if count as usize == rows.len() {
            writeln!(out, "{:<kw$}  {:>sw$}  EXPIRES", "KEY", "SIZE")?;
        }
        for (key, size, expires) in &rows {
            writeln!(out, "{key:<kw$}  {size:>sw$}  {expires}")?;
        }
        Ok(())
    })?;
    if cli.json {
        writeln!(out, "{}]", if count == 0 { "" } else { "\n" })?;
        return Ok(());
    }
    let under = if prefix.is_empty() {
        String::new()
    } else {
        format!(" under {prefix:?}")
    };
    writeln!(
        out,
        "{}{under}, {}",
        plural(count, "key", "keys"),
        render::size(total)
    )?;
    Ok(())
}

const HEX_LIMIT: usize = 4096;

pub fn get(cli: &Cli, key: &str, raw: bool, full: bool, out: &mut dyn Write) -> Outcome {
    let config = store_config(cli)?;
    check_key(key)?;
    let store = open_store(&config, false)?;
    // The key is read (and a passphrase stretched) only for a record that is encrypted.
    let (payload, info) = match store.load_bytes(key, &LoadOptions::default()) {
        Ok(Some(found)) => found,
        Ok(None) => return Err(Failure::NotFound(format!("no record under key {key:?}"))),
        Err(StorageError::EncryptionKeyMissing { .. }) => {
            let Some(material) = key_material(cli)? else {
                return Err(Failure::runtime(format!(
                    "record {key:?} is encrypted: give its key with BEVY_STORAGE_KEY or \
                     BEVY_STORAGE_PASSPHRASE (or --key-file / --passphrase-file)"
                )));
            };
            let keyed = keyed_reader(store.backend(), &config, material)?;
            match keyed.load_bytes(key, &LoadOptions::default())? {
                Some(found) => found,
                None => return Err(Failure::NotFound(format!("no record under key {key:?}"))),
            }
        }
        Err(e) => return Err(e.into()),
    };
    if raw {
        out.write_all(&payload)?;
        return Ok(());
    }
    let shown = if full {
        &payload[..]
    } else {
        &payload[..payload.len().min(HEX_LIMIT)]
    };
    let cut = payload.len() - shown.len();
    let more = |out: &mut dyn Write| -> Outcome {
        if cut > 0 {
            writeln!(
                out,
                "... {cut} more bytes (--full shows them all, --raw writes the payload)"
            )?;
        }
        Ok(())
    };
    // A payload this tool cannot decode: shown as hex, with a note saying why.
    let undecoded =
        |out: &mut dyn Write, mut report: Json, note: &str, heading: String| -> Outcome {
            if cli.json {
                report["value"] = Json::Null;
                report["note"] = note.into();
                report["hex"] = render::hex(shown).into();
                report["truncated"] = (cut > 0).into();
                return print_json(out, &report);
            }
            writeln!(out, "{heading}")?;
            out.write_all(render::hex_dump(shown).as_bytes())?;
            more(out)
        };
    let mut report = json!({
        "key": key,
        "format": format_name(info.format),
        "compressed": info.compressed,
        "encrypted": info.encrypted,
        "payload_size": payload.len(),
    });
    match info.format {
        Format::Ron => {
            let text = std::str::from_utf8(&payload)
                .ok()
                .filter(|t| ron_view::is_valid(t));
            let Some(text) = text else {
                let note = "the record says RON but the payload is not valid RON text";
                let heading = format!("# {note}; its {} bytes:", payload.len());
                return undecoded(out, report, note, heading);
            };
            if cli.json {
                match ron_view::to_json(text) {
                    Some(value) => report["value"] = value,
                    None => {
                        report["value"] = Json::Null;
                        report["ron"] = text.into();
                        report["note"] =
                            "this RON value has no JSON form; it is given as text".into();
                    }
                }
                return print_json(out, &report);
            }
            let pretty = ron_view::pretty(text).unwrap_or_else(|| text.to_owned());
            writeln!(out, "{pretty}")?;
        }
        Format::Binary => {
            let note = "postcard binary is not self-describing: only the game's own type can \
                        decode it (Store::load::<T>); here are its bytes";
            let heading = format!(
                "# binary (postcard) payload, {} bytes: {note}",
                payload.len()
            );
            return undecoded(out, report, note, heading);
        }
        Format::Raw => match read_header(&payload) {
            Ok(header) => {
                let encoding = encoding_name(header.encoding);
                let view = snapshot_view::read(&header, &payload);
                if cli.json {
                    report["value"] = Json::Null;
                    report["snapshot"] = json!({
                        "format_version": header.format_version,
                        "encoding": encoding,
                        "game_version": header.game_version,
                        "entity_count": header.entity_count,
                    });
                    match &view {
                        Ok(view) => {
                            let listing = snapshot_view::to_json(view);
                            for field in ["entities", "resources", "note"] {
                                if let Some(value) = listing.get(field) {
                                    report["snapshot"][field] = value.clone();
                                }
                            }
                        }
                        Err(why) => report["snapshot"]["error"] = why.clone().into(),
                    }
                    return print_json(out, &report);
                }
                writeln!(
                    out,
                    "world snapshot: {}, game version {}, format version {}, {} encoding, {}",
                    plural(u64::from(header.entity_count), "entity", "entities"),
                    header.game_version,
                    header.format_version,
                    encoding,
                    render::size(payload.len() as u64)
                )?;
                match &view {
                    Ok(view) => {
                        let mut text = String::new();
                        snapshot_view::render(view, &mut text);
                        out.write_all(text.as_bytes())?;
                    }
                    Err(why) => writeln!(
                        out,
                        "(the body cannot be listed: {why}; --raw writes the snapshot bytes)"
                    )?,
                }
            }
            Err(_) if record_kind(&payload) == Some(RecordKind::Delta) => {
                return delta(cli, &store, key, &payload, report, out);
            }
            Err(snapshot_error) => {
                let note = match snapshot_error {
                    e @ StorageError::SnapshotFormatTooNew { .. } => e.to_string(),
                    _ => "raw bytes encoded by the game itself (not a world snapshot)".into(),
                };
                let heading = format!("# {note}, {} bytes:", payload.len());
                return undecoded(out, report, &note, heading);
            }
        },
    }
    Ok(())
}

/// How `get` names a snapshot's encoding.
fn encoding_name(encoding: SnapshotEncoding) -> &'static str {
    match encoding {
        SnapshotEncoding::Ron => "ron",
        SnapshotEncoding::Binary => "binary",
    }
}

/// `get` of a delta of a snapshot chain: what its header says and which base it builds on.
/// Its body holds only changes, so it is not listed: a game loads the whole chain.
fn delta(
    cli: &Cli,
    store: &Store,
    key: &str,
    payload: &[u8],
    mut report: Json,
    out: &mut dyn Write,
) -> Outcome {
    let header = read_delta_header(payload)?;
    let encoding = encoding_name(header.encoding);
    let base = store.get_metadata(key)?.and_then(|m| {
        m.custom
            .get("chain_base")
            .and_then(|b| b.as_str().map(str::to_owned))
    });
    if cli.json {
        report["value"] = Json::Null;
        report["snapshot_delta"] = json!({
            "format_version": header.format_version,
            "encoding": encoding,
            "game_version": header.game_version,
            "sequence": header.sequence,
            "changed_entities": header.entity_count,
            "world_entities": header.live_count,
            "base": base,
            "parent": { "len": header.parent.len, "crc32": header.parent.crc },
        });
        return print_json(out, &report);
    }
    writeln!(
        out,
        "world snapshot delta {} of the chain based on {}: {} added or changed, {} in the \
         world it was captured from, game version {}, format version {}, {} encoding, {}",
        header.sequence,
        base.as_deref()
            .map_or("an unknown key".to_owned(), |b| format!("{b:?}")),
        plural(u64::from(header.entity_count), "entity", "entities"),
        plural(u64::from(header.live_count), "entity", "entities"),
        header.game_version,
        header.format_version,
        encoding,
        render::size(payload.len() as u64)
    )?;
    writeln!(
        out,
        "(a delta holds only what changed since the record before it; `get` on the base lists \
         the world it starts from, and a game loads the chain as one world)"
    )?;
    Ok(())
}

pub fn meta(cli: &Cli, key: &str, out: &mut dyn Write) -> Outcome {
    let config = store_config(cli)?;
    check_key(key)?;
    let store = open_store(&config, false)?;
    let now = Timestamp::now();
    let record = store
        .backend()
        .get(key)?
        .filter(|r| r.meta.is_live(now))
        .ok_or_else(|| Failure::NotFound(format!("no record under key {key:?}")))?;
    let m = &record.meta;
    let header = envelope::inspect(key, &record.value);
    if cli.json {
        let mut report = json!({
            "key": key,
            "size": m.size,
            "created_at": render::time_ms(m.created_at),
            "modified_at": render::time_ms(m.modified_at),
            "accessed_at": render::time_ms(m.accessed_at),
            "expires_at": m.expires_at.map(render::time_ms),
            "compressed": m.compressed,
            "encrypted": m.encrypted,
            "format": header.as_ref().ok().map(|i| format_name(i.format)),
            "custom": m.custom,
        });
        if let Err(e) = &header {
            report["header_error"] = e.to_string().into();
        }
        return print_json(out, &report);
    }
    let yes = |b: bool| if b { "yes" } else { "no" };
    writeln!(out, "key:         {key}")?;
    match &header {
        Ok(info) if info.format == Format::Raw && m.custom.contains_key("chain_base") => {
            writeln!(
                out,
                "format:      raw (a world snapshot delta of the chain based on {})",
                m.custom["chain_base"]
            )?;
        }
        Ok(info) if info.format == Format::Raw && m.custom.contains_key("snapshot_format") => {
            writeln!(out, "format:      raw (a world snapshot: `get` lists it)")?;
        }
        Ok(info) => writeln!(out, "format:      {}", format_name(info.format))?,
        Err(e) => writeln!(out, "format:      unknown ({e})")?,
    }
    writeln!(out, "size:        {}", render::size_as_stored(m.size))?;
    writeln!(out, "compressed:  {}", yes(m.compressed))?;
    writeln!(out, "encrypted:   {}", yes(m.encrypted))?;
    writeln!(out, "created:     {}", render::time(m.created_at))?;
    writeln!(out, "modified:    {}", render::time(m.modified_at))?;
    writeln!(out, "accessed:    {}", render::time(m.accessed_at))?;
    match m.expires_at {
        Some(at) => writeln!(
            out,
            "expires:     {} ({})",
            render::time(at),
            render::relative(now, at)
        )?,
        None => writeln!(out, "expires:     never")?,
    }
    if m.custom.is_empty() {
        writeln!(out, "custom:      none")?;
    } else {
        writeln!(out, "custom:")?;
        for (field, value) in &m.custom {
            writeln!(out, "  {field}: {value}")?;
        }
    }
    Ok(())
}
