//! `set`, `clear`, `delete` and `purge-expired`: the commands that change a store.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::time::Duration;

use bevy_storage::{Compression, CustomMetadata, Format, SaveOptions, StorageError};
use serde_json::{Value as Json, json};

use crate::args::Cli;
use crate::failure::{Failure, Outcome};
use crate::open::{check_key, describe, key_material, open_store, store_config};
use crate::output::{format_name, plural, print_json};
use crate::{render, ron_view};

/// How `set` reads its value text.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Syntax {
    /// JSON if the text is valid JSON, else RON
    Auto,
    /// RON, as `get` prints it
    Ron,
    /// JSON, as `get --json` prints a value: objects become structs (or maps), a one-key
    /// object with a capitalised key an enum variant with data, lists sequences, null None.
    /// Tuples and unit variants are not told apart in JSON: write those values in RON
    Json,
}

#[derive(clap::Args, Debug)]
pub struct SetArgs {
    /// The record's key
    key: String,
    /// The value as RON or JSON text (or give --value-file)
    #[arg(required_unless_present = "value_file")]
    value: Option<String>,
    /// Read the value from this file (`-`: standard input)
    #[arg(long, value_name = "PATH", conflicts_with = "value")]
    value_file: Option<PathBuf>,
    /// How to read the text
    #[arg(long = "syntax", value_enum, default_value_t = Syntax::Auto)]
    syntax: Syntax,
    /// Store the bytes unchanged (raw format, as `save_bytes` does) instead of a value
    #[arg(long, conflicts_with = "syntax")]
    raw: bool,
    /// Expire after this long: 1500ms, 90s, 10m, 12h, 30d, 2w (default: never)
    #[arg(long, value_parser = render::parse_duration)]
    ttl: Option<Duration>,
    /// Compression: off or lz4 (the old levels 0-9 still work: 0 is off, 1-9 lz4); default
    /// lz4
    #[arg(long, value_name = "off|lz4", value_parser = parse_compression)]
    compression: Option<Compression>,
    /// Encrypt with the store's key (BEVY_STORAGE_KEY, BEVY_STORAGE_PASSPHRASE, --key-file
    /// or --passphrase-file)
    #[arg(long)]
    encrypt: bool,
    /// A custom metadata field, FIELD=VALUE (VALUE as JSON if it parses, else text);
    /// repeatable
    #[arg(long = "metadata", short = 'm', value_name = "FIELD=VALUE")]
    metadata: Vec<String>,
    /// Fail if the key already has a live record (checked atomically)
    #[arg(long)]
    no_overwrite: bool,
}

/// The value text: the argument, a file, or standard input.
fn value_bytes(args: &SetArgs) -> Outcome<Vec<u8>> {
    if let Some(value) = &args.value {
        return Ok(value.clone().into_bytes());
    }
    let Some(path) = &args.value_file else {
        return Err(Failure::usage("give the value, or --value-file PATH"));
    };
    if path.as_os_str() == "-" {
        let mut bytes = Vec::new();
        std::io::stdin()
            .read_to_end(&mut bytes)
            .map_err(|e| Failure::runtime(format!("cannot read standard input: {e}")))?;
        return Ok(bytes);
    }
    std::fs::read(path)
        .map_err(|e| Failure::runtime(format!("cannot read {}: {e}", path.display())))
}

/// RON text for the value: RON given is kept as written (its struct and variant names are what
/// the game's types read); JSON is converted.
fn ron_payload(text: &str, syntax: Syntax) -> Outcome<(String, &'static str)> {
    let as_ron = || ron_view::is_valid(text).then(|| (text.trim().to_owned(), "RON"));
    let as_json = || -> Result<(String, &'static str), String> {
        let value: Json = serde_json::from_str(text).map_err(|e| e.to_string())?;
        Ok((json_to_ron(&value), "JSON"))
    };
    match syntax {
        Syntax::Ron => as_ron().ok_or_else(|| {
            Failure::usage(format!(
                "the value is not valid RON: {}",
                ron::from_str::<ron::Value>(text)
                    .err()
                    .map_or_else(String::new, |e| e.to_string())
            ))
        }),
        Syntax::Json => {
            as_json().map_err(|e| Failure::usage(format!("the value is not valid JSON: {e}")))
        }
        // JSON first: a JSON object is also a valid RON *map*, which a game's struct would
        // not load; read as JSON it becomes the struct `get --json` printed.
        Syntax::Auto => match as_json() {
            Ok(found) => Ok(found),
            Err(json_error) => as_ron().ok_or_else(|| {
                Failure::usage(format!(
                    "the value is neither JSON ({json_error}) nor RON; quote it for the shell, \
                     for example '(name: \"Ada\", gold: 120)'"
                ))
            }),
        },
    }
}

/// JSON as `get --json` prints it, back to RON: objects whose keys are all identifiers are
/// structs (`(name: "Ada")`), a one-key object with a capitalised identifier is an enum variant
/// (`{"Warrior": {"level": 3}}` → `Warrior(level: 3)`), other objects are maps, arrays are
/// sequences, `null` is `None`.
fn json_to_ron(value: &Json) -> String {
    let ident = |k: &str| {
        let mut chars = k.chars();
        chars
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
    };
    match value {
        Json::Null => "None".into(),
        Json::Bool(b) => b.to_string(),
        // RON reads an integer (JSON may print 1.0 as 1) into a float field too.
        Json::Number(n) => n.to_string(),
        Json::String(s) => ron::to_string(s).unwrap_or_else(|_| format!("{s:?}")),
        Json::Array(items) => {
            let inner: Vec<String> = items.iter().map(json_to_ron).collect();
            format!("[{}]", inner.join(", "))
        }
        Json::Object(map) => {
            if map.len() == 1 {
                let (name, inner) = map.iter().next().expect("one entry");
                if ident(name) && name.starts_with(|c: char| c.is_ascii_uppercase()) {
                    return match inner {
                        Json::Object(fields)
                            if !fields.is_empty() && fields.keys().all(|k| ident(k)) =>
                        {
                            format!("{name}{}", json_to_ron(inner))
                        }
                        Json::Array(items) => {
                            let inner: Vec<String> = items.iter().map(json_to_ron).collect();
                            format!("{name}({})", inner.join(", "))
                        }
                        other => format!("{name}({})", json_to_ron(other)),
                    };
                }
            }
            if !map.is_empty() && map.keys().all(|k| ident(k)) {
                let fields: Vec<String> = map
                    .iter()
                    .map(|(k, v)| format!("{k}: {}", json_to_ron(v)))
                    .collect();
                format!("({})", fields.join(", "))
            } else {
                let entries: Vec<String> = map
                    .iter()
                    .map(|(k, v)| {
                        format!(
                            "{}: {}",
                            ron::to_string(k).unwrap_or_else(|_| format!("{k:?}")),
                            json_to_ron(v)
                        )
                    })
                    .collect();
                format!("{{{}}}", entries.join(", "))
            }
        }
    }
}

/// `--compression`: `off` or `lz4`, or a level of the releases that took one (`0` off, `1`-`9`
/// lz4, which all compressed the same way).
fn parse_compression(text: &str) -> Result<Compression, String> {
    match text.parse::<u8>() {
        Ok(0) => Ok(Compression::Off),
        Ok(1..=9) => Ok(Compression::Lz4),
        Ok(_) => Err("use off or lz4".to_owned()),
        Err(_) => text.parse().map_err(|e: StorageError| e.to_string()),
    }
}

fn parse_metadata(fields: &[String]) -> Outcome<CustomMetadata> {
    let mut custom = CustomMetadata::new();
    for field in fields {
        let Some((name, value)) = field.split_once('=') else {
            return Err(Failure::usage(format!(
                "--metadata {field:?}: write FIELD=VALUE"
            )));
        };
        if name.is_empty() {
            return Err(Failure::usage(format!(
                "--metadata {field:?}: the field name is empty"
            )));
        }
        let value = serde_json::from_str::<Json>(value).unwrap_or_else(|_| value.into());
        custom.insert(name.to_owned(), value);
    }
    Ok(custom)
}

pub fn set(cli: &Cli, args: &SetArgs, out: &mut dyn Write) -> Outcome {
    let config = store_config(cli)?;
    check_key(&args.key)?;
    let bytes = value_bytes(args)?;
    let mut options = SaveOptions::new()
        .overwrite(!args.no_overwrite)
        .metadata_map(parse_metadata(&args.metadata)?);
    if let Some(ttl) = args.ttl {
        options = options.ttl(ttl);
    }
    if let Some(compression) = args.compression {
        options = options.compression(compression);
    }
    let (payload, format, read_as) = if args.raw {
        (bytes, Format::Raw, "raw bytes")
    } else {
        let text = String::from_utf8(bytes)
            .map_err(|_| Failure::usage("the value is not UTF-8 text (--raw stores bytes)"))?;
        let (ron, read_as) = ron_payload(&text, args.syntax)?;
        (ron.into_bytes(), Format::Ron, read_as)
    };
    // The key is read (and a passphrase stretched) only to encrypt.
    let config = if args.encrypt {
        let Some(key) = key_material(cli)? else {
            return Err(Failure::usage(
                "--encrypt needs the store's key: set BEVY_STORAGE_KEY or \
                 BEVY_STORAGE_PASSPHRASE, or pass --key-file / --passphrase-file",
            ));
        };
        options = options.encrypt(true);
        config.encryption_key(key)
    } else {
        config
    };
    let store = open_store(&config, true)?;
    match store.save_encoded(&args.key, &payload, format, &options) {
        Ok(_) => {}
        Err(StorageError::AlreadyExists { .. }) => {
            return Err(Failure::runtime(format!(
                "{:?} already has a live record and --no-overwrite was given; nothing was written",
                args.key
            )));
        }
        Err(e) => return Err(e.into()),
    }
    let meta = store.get_metadata(&args.key)?;
    let size = meta.as_ref().map_or(0, |m| m.size);
    if cli.json {
        return print_json(
            out,
            &json!({
                "set": args.key,
                "read_as": read_as,
                "format": format_name(format),
                "size": size,
                "compressed": meta.as_ref().is_some_and(|m| m.compressed),
                "encrypted": meta.as_ref().is_some_and(|m| m.encrypted),
                "expires_in_secs": args.ttl.map(|t| t.as_secs_f64()),
                "store": describe(&config),
            }),
        );
    }
    let mut notes = vec![match format {
        Format::Raw => "raw bytes".to_owned(),
        _ if read_as == "RON" => "RON, stored as written".to_owned(),
        _ => format!("{read_as}, stored as RON"),
    }];
    if meta.as_ref().is_some_and(|m| m.compressed) {
        notes.push("compressed".into());
    }
    if meta.as_ref().is_some_and(|m| m.encrypted) {
        notes.push("encrypted".into());
    }
    if let Some(ttl) = args.ttl {
        notes.push(format!("expires in {}", humanize(ttl)));
    }
    writeln!(
        out,
        "set {:?}: {} ({}) in {}",
        args.key,
        render::size_as_stored(size),
        notes.join(", "),
        describe(&config)
    )?;
    Ok(())
}

fn humanize(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0 => format!("{} ms", d.as_millis()),
        1..=119 => format!("{s} s"),
        120..=7199 => format!("{} min", s / 60),
        7200..=172_799 => format!("{} h", s / 3600),
        _ => format!("{} days", s / 86_400),
    }
}

pub fn clear(cli: &Cli, yes: bool, out: &mut dyn Write) -> Outcome {
    let config = store_config(cli)?;
    let store = open_store(&config, false)?;
    let count = store.list_keys("")?.len() as u64;
    if !yes {
        return Err(Failure::usage(format!(
            "clear removes all {} of {}: pass --yes to do it (nothing was removed)",
            plural(count, "record", "records"),
            describe(&config)
        )));
    }
    store.clear()?;
    if cli.json {
        return print_json(
            out,
            &json!({ "cleared": count, "store": describe(&config) }),
        );
    }
    writeln!(
        out,
        "cleared {} from {}",
        plural(count, "record", "records"),
        describe(&config)
    )?;
    Ok(())
}

pub fn delete(cli: &Cli, key: &str, out: &mut dyn Write) -> Outcome {
    let config = store_config(cli)?;
    check_key(key)?;
    let store = open_store(&config, false)?;
    if !store.delete(key)? {
        return Err(Failure::NotFound(format!("no record under key {key:?}")));
    }
    if cli.json {
        return print_json(out, &json!({ "deleted": key }));
    }
    writeln!(out, "deleted {key:?}")?;
    Ok(())
}

pub fn purge_expired(cli: &Cli, out: &mut dyn Write) -> Outcome {
    let config = store_config(cli)?;
    let store = open_store(&config, false)?;
    let purged = store.purge_expired()?;
    if cli.json {
        return print_json(out, &json!({ "purged": purged }));
    }
    writeln!(
        out,
        "purged {}",
        plural(purged as u64, "expired record", "expired records")
    )?;
    Ok(())
}
