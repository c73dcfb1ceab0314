//! `bevy-storage`: look into any `bevy_storage` store without writing code.
//!
//! Built with the `cli` feature: `cargo run --features cli --bin bevy-storage -- --help`.
//! It lists, decodes, describes and deletes records, prints statistics, purges expired
//! records, and moves whole stores between backends through a portable dump
//! (see [`dump`] for its format).

mod dump;
mod render;
mod ron_view;
mod salvage;
mod snapshot_view;
mod transfer;
mod write;

use std::collections::BTreeMap;
use std::io::{self, IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use bevy_storage::backend::{Backend, KeyEntry, Record, RecordMeta, Usage, WriteOp, WriteOutcome};
use bevy_storage::clock::Timestamp;
use bevy_storage::codec::envelope;
use bevy_storage::snapshot::{SnapshotEncoding, read_header};
use bevy_storage::{
    BackendConfig, EncryptionKey, Format, LoadOptions, StorageConfig, StorageError, Store,
};
use clap::parser::ValueSource;
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use serde_json::{Value as Json, json};
use zeroize::Zeroizing;

const AFTER_HELP: &str = "\
Stores (--store URL or BEVY_STORAGE_URL, or --app ID for a game's per-user store):
  sqlite:PATH     an embedded SQLite database file
  file:DIR        a file store (one file per key under DIR)
  memory:         an empty in-memory store (for trying commands out)
  redis://HOST[:PORT][/DB][?namespace=NAME]   with the `redis` feature
  PATH            a path alone: *.db, *.sqlite, *.sqlite3 is SQLite, a directory a file store
Every command but `import` and `set` needs an existing store; those two create it.
A Redis password comes from BEVY_STORAGE_REDIS_PASSWORD or --password-file (a password in
the URL works, with a warning when it is on the command line: ps and shell history show it).

Key material (never on the command line; give at most one):
  BEVY_STORAGE_KEY         environment: a raw 256-bit key as 64 hex digits
  BEVY_STORAGE_PASSPHRASE  environment: the store's passphrase
  --key-file PATH          a file holding 64 hex digits, or exactly 32 raw bytes
  --passphrase-file PATH   a file holding the passphrase (a trailing newline is ignored)
Only `get` decrypts and `set --encrypt` encrypts, and they read the key only when a record
needs it. The other commands work on encrypted records without a key: `export` and `import`
move records exactly as stored (still compressed and encrypted).

Quota: a game's store refuses writes beyond its max_size (100 MiB unless the game set
another). `stats` reports the free space under that quota; --quota SIZE (or none) names the
game's own.

Exit codes:
  0  success
  1  runtime error: no store there, backend or I/O failure, corrupt record, damaged dump,
     missing or wrong encryption key
  2  usage error: bad arguments, unknown store scheme, malformed key material or record key
  3  not found: `get`, `meta` or `delete` of a key with no live record

Examples:
  bevy-storage --store saves/storage.db list player:
  bevy-storage --store saves/storage.db set player:ada '(name: \"Ada\", gold: 120)' --ttl 30d
  bevy-storage --store saves/storage.db get autosave/000000000003   # entities and components
  bevy-storage --store saves/storage.db clear --yes
  BEVY_STORAGE_PASSPHRASE=... bevy-storage --store sqlite:saves/storage.db get player:ada --json
  bevy-storage --store sqlite:saves/storage.db export backup.jsonl
  bevy-storage --store file:saves/copy import backup.jsonl";

/// Look into a bevy_storage store: list, decode, describe, delete, export and import records.
#[derive(Parser, Debug)]
#[command(name = "bevy-storage", version, after_help = AFTER_HELP)]
struct Cli {
    /// The store: sqlite:PATH, file:DIR, memory: or redis://HOST[:PORT][/DB]
    #[arg(
        long,
        short = 's',
        env = "BEVY_STORAGE_URL",
        hide_env_values = true,
        value_name = "URL",
        global = true
    )]
    store: Option<String>,

    /// The game's own store, by its application identifier (com.studio.game): the
    /// per-user data directory of StoragePlugin::for_app (BEVY_STORAGE_DIR overrides it)
    #[arg(long, value_name = "ID", global = true)]
    app: Option<String>,

    /// Read the raw encryption key from this file (64 hex digits or 32 raw bytes)
    #[arg(long, value_name = "PATH", global = true)]
    key_file: Option<PathBuf>,

    /// Read the encryption passphrase from this file
    #[arg(long, value_name = "PATH", global = true)]
    passphrase_file: Option<PathBuf>,

    /// Read the Redis password from this file (or set BEVY_STORAGE_REDIS_PASSWORD)
    #[arg(long, value_name = "PATH", global = true)]
    password_file: Option<PathBuf>,

    /// The game's quota (its max_size) for `stats`: 100MiB, 2GiB, 500000 (bytes) or none
    #[arg(long, value_name = "SIZE", global = true, value_parser = parse_quota)]
    quota: Option<Quota>,

    /// Print machine-readable JSON on stdout
    #[arg(long, global = true)]
    json: bool,

    /// No progress bars on stderr
    #[arg(long, short, global = true)]
    quiet: bool,

    #[command(subcommand)]
    command: Command,

    /// True when the store URL came from the command line (not the environment).
    #[arg(skip)]
    store_on_command_line: bool,
}

/// `--quota`: a size in bytes, or no quota.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Quota {
    Bytes(u64),
    Unlimited,
}

fn parse_quota(text: &str) -> Result<Quota, String> {
    if text.eq_ignore_ascii_case("none") {
        return Ok(Quota::Unlimited);
    }
    render::parse_size(text).map(Quota::Bytes)
}

#[derive(Subcommand, Debug)]
enum Command {
    /// List the live keys (under PREFIX, if given) with their stored size and expiry
    List {
        /// Only keys that start with this, byte for byte (no wildcards)
        prefix: Option<String>,
    },
    /// Print a record's value: RON pretty-printed (JSON with --json), binary as a hex dump,
    /// a world snapshot as its entities with their components
    Get {
        /// The record's key
        key: String,
        /// Write the decoded payload bytes to stdout unchanged
        #[arg(long, conflicts_with = "json")]
        raw: bool,
        /// Show every byte of a hex dump (default: the first 4 KiB)
        #[arg(long)]
        full: bool,
    },
    /// Show a record's metadata: size, times, expiry, format, compression, encryption,
    /// custom fields
    Meta {
        /// The record's key
        key: String,
    },
    /// Show the store's record count, size, free space, health and key prefixes
    Stats,
    /// Delete a record
    Delete {
        /// The record's key
        key: String,
    },
    /// Save a value under a key: RON or JSON text (stored as RON, which the game loads as its
    /// own type), with the options of a save; creates the store if needed
    Set(write::SetArgs),
    /// Remove every record of the store (its encryption key check is kept)
    Clear {
        /// Confirm: without it nothing is removed
        #[arg(long)]
        yes: bool,
    },
    /// Write every live record, as stored, to a portable dump file (JSON Lines)
    Export {
        /// The dump to write
        file: PathBuf,
        /// Only records whose key starts with this
        #[arg(long)]
        prefix: Option<String>,
        /// Replace FILE if it exists
        #[arg(long)]
        force: bool,
    },
    /// Write the records of a dump into the store (created if missing), in atomic batches
    Import {
        /// The dump to read
        file: PathBuf,
        /// Fail, before writing anything, if a key of the dump already has a live record
        #[arg(long)]
        no_overwrite: bool,
        /// Also import the store's own bookkeeping records (keys starting with
        /// "\u{1}bevy_storage/", such as the encryption key check encrypted records need);
        /// without it a dump holding any is refused
        #[arg(long)]
        allow_internal_keys: bool,
        /// Records per atomic batch
        #[arg(long, default_value_t = 500, value_name = "N",
              value_parser = clap::value_parser!(u32).range(1..=100_000))]
        batch_size: u32,
    },
    /// Remove the expired records now
    PurgeExpired,
    /// Copy every readable record of a damaged SQLite store into a new one and report what
    /// could not be read (ignores --store)
    Salvage(salvage::SalvageArgs),
}

/// Why the program stops, and with which exit code.
#[derive(Debug)]
enum Failure {
    /// Bad arguments or configuration: exit code 2.
    Usage(String),
    /// Something failed while working: exit code 1.
    Runtime(String),
    /// The key has no live record: exit code 3.
    NotFound(String),
    /// Stdout was closed (`| head`): stop quietly.
    BrokenPipe,
}

impl Failure {
    fn usage(message: impl Into<String>) -> Self {
        Self::Usage(message.into())
    }

    fn runtime(message: impl Into<String>) -> Self {
        Self::Runtime(message.into())
    }

    fn code(&self) -> u8 {
        match self {
            Self::BrokenPipe => 0,
            Self::Runtime(_) => 1,
            Self::Usage(_) => 2,
            Self::NotFound(_) => 3,
        }
    }
}

impl From<StorageError> for Failure {
    fn from(e: StorageError) -> Self {
        let message = e.to_string();
        match e {
            StorageError::InvalidKey { .. }
            | StorageError::Config(_)
            | StorageError::FeatureDisabled { .. }
            | StorageError::InvalidEncryptionKey(_) => Self::Usage(message),
            _ => Self::Runtime(message),
        }
    }
}

impl From<io::Error> for Failure {
    /// Errors writing the output.
    fn from(e: io::Error) -> Self {
        if e.kind() == io::ErrorKind::BrokenPipe {
            Self::BrokenPipe
        } else {
            Self::Runtime(format!("cannot write the output: {e}"))
        }
    }
}

type Outcome<T = ()> = Result<T, Failure>;

fn main() -> ExitCode {
    std::panic::set_hook(Box::new(|info| {
        let message = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_default();
        let place = info
            .location()
            .map(|l| format!(" at {}:{}", l.file(), l.line()))
            .unwrap_or_default();
        eprintln!(
            "error: internal error{place} (a bug in bevy-storage, please report it): {}",
            message.replace('\n', " ")
        );
    }));
    let cli = match Cli::command().try_get_matches().and_then(|matches| {
        let mut cli = Cli::from_arg_matches(&matches)?;
        cli.store_on_command_line = matches.value_source("store") == Some(ValueSource::CommandLine);
        Ok(cli)
    }) {
        Ok(cli) => cli,
        Err(e) => return clap_failure(&e),
    };
    let result = std::panic::catch_unwind(|| {
        let stdout = io::stdout();
        let mut out = stdout.lock();
        run(&cli, &mut out).and_then(|()| out.flush().map_err(Failure::from))
    });
    match result {
        Ok(Ok(())) => ExitCode::SUCCESS,
        Ok(Err(failure)) => {
            match &failure {
                Failure::Usage(m) | Failure::Runtime(m) | Failure::NotFound(m) => {
                    eprintln!("error: {}", m.replace('\n', " "));
                }
                Failure::BrokenPipe => {}
            }
            ExitCode::from(failure.code())
        }
        Err(_) => ExitCode::FAILURE,
    }
}

/// Help and version go out as clap prints them; a usage error becomes one line, exit code 2.
fn clap_failure(e: &clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    if matches!(
        e.kind(),
        ErrorKind::DisplayHelp
            | ErrorKind::DisplayVersion
            | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
    ) {
        let _ = e.print();
        return ExitCode::from(u8::try_from(e.exit_code()).unwrap_or(2));
    }
    let text = e.to_string();
    let mut line = String::new();
    for part in text
        .lines()
        .take_while(|l| !l.starts_with("Usage:"))
        .map(str::trim)
        .filter(|l| !l.is_empty())
    {
        if !line.is_empty() {
            line.push_str(if line.ends_with(':') { " " } else { "; " });
        }
        line.push_str(part);
    }
    let line = line.strip_prefix("error: ").unwrap_or(&line);
    eprintln!("error: {line} (see bevy-storage --help)");
    ExitCode::from(2)
}

fn run(cli: &Cli, out: &mut dyn Write) -> Outcome {
    match &cli.command {
        Command::List { prefix } => list(cli, prefix.as_deref().unwrap_or(""), out),
        Command::Get { key, raw, full } => get(cli, key, *raw, *full, out),
        Command::Meta { key } => meta(cli, key, out),
        Command::Stats => stats(cli, out),
        Command::Delete { key } => delete(cli, key, out),
        Command::Set(args) => write::set(cli, args, out),
        Command::Clear { yes } => write::clear(cli, *yes, out),
        Command::PurgeExpired => purge_expired(cli, out),
        Command::Salvage(args) => salvage::run(cli, args, out),
        Command::Export {
            file,
            prefix,
            force,
        } => transfer::export(cli, file, prefix.as_deref().unwrap_or(""), *force, out),
        Command::Import {
            file,
            no_overwrite,
            allow_internal_keys,
            batch_size,
        } => transfer::import(
            cli,
            file,
            *no_overwrite,
            *allow_internal_keys,
            *batch_size as usize,
            out,
        ),
    }
}

// ---------------------------------------------------------------------------------------------
// Opening the store and the key

/// The store's configuration from `--store` / `BEVY_STORAGE_URL`.
fn store_config(cli: &Cli) -> Outcome<StorageConfig> {
    if let Some(app) = &cli.app {
        if cli.store_on_command_line {
            return Err(Failure::usage("give --store or --app, not both"));
        }
        let config = StorageConfig::for_app(app).map_err(|e| Failure::usage(e.to_string()))?;
        return Ok(config.max_size(None).pool_size(2));
    }
    let given = cli
        .store
        .as_deref()
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .ok_or_else(|| {
            Failure::usage(
                "no store given: pass --store URL or set BEVY_STORAGE_URL \
                 (for example saves/storage.db, sqlite:saves/storage.db or file:saves/dir)",
            )
        })?;
    let url = match infer_scheme(given)? {
        Some(url) => url,
        None => given.to_owned(),
    };
    let url = redis_password(cli, &url)?;
    let config = StorageConfig::from_url(&url).map_err(|e| {
        let hidden = bevy_storage::config::redact_url(&url);
        let message = e
            .to_string()
            .replace(&format!("{url:?}"), &format!("{hidden:?}"))
            .replace(url.as_str(), &hidden);
        Failure::usage(format!(
            "{message} (see bevy-storage --help for the stores)"
        ))
    })?;
    // The inspector is no game: no quota (imports may be large) and a small pool.
    Ok(config.max_size(None).pool_size(2))
}

/// The schemes `StorageConfig::from_url` knows.
const SCHEMES: [&str; 5] = ["sqlite", "file", "memory", "redis", "rediss"];

/// A path without a scheme: `*.db`, `*.sqlite`, `*.sqlite3` → `sqlite:PATH`, an existing
/// directory → `file:DIR`; anything else with no known scheme is one clear usage error.
/// `Ok(None)`: the text has a scheme of its own.
fn infer_scheme(given: &str) -> Outcome<Option<String>> {
    if let Some((scheme, _)) = given.split_once(':')
        && (SCHEMES.contains(&scheme)
            || scheme.len() > 1
                && scheme
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c)))
    {
        // A scheme, known or not (`StorageConfig::from_url` names an unknown one); a
        // one-letter "scheme" is a Windows drive.
        return Ok(None);
    }
    let path = std::path::Path::new(given);
    let extension = path
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase);
    let inferred = if matches!(extension.as_deref(), Some("db" | "sqlite" | "sqlite3")) {
        format!("sqlite:{given}")
    } else if path.is_dir() {
        format!("file:{given}")
    } else {
        return Err(Failure::usage(format!(
            "cannot tell which store {:?} is: name it with a scheme, sqlite:PATH (an SQLite \
             file; a path ending in .db, .sqlite or .sqlite3 needs none), file:DIR (a file \
             store; an existing directory needs none), memory: or redis://HOST[:PORT][/DB]",
            bevy_storage::config::redact_url(given)
        )));
    };
    Ok(Some(inferred))
}

/// Puts the Redis password from `BEVY_STORAGE_REDIS_PASSWORD` or `--password-file` into a
/// `redis://` URL; warns when the URL itself carries one on the command line.
fn redis_password(cli: &Cli, url: &str) -> Outcome<String> {
    let env = env_secret("BEVY_STORAGE_REDIS_PASSWORD")?;
    let file = match &cli.password_file {
        Some(path) => {
            let bytes = read_secret_file(path)?;
            let text = std::str::from_utf8(&bytes).map_err(|_| {
                Failure::usage(format!(
                    "password file {}: the password is not UTF-8 text",
                    path.display()
                ))
            })?;
            let text = text.strip_suffix('\n').unwrap_or(text);
            Some(Zeroizing::new(
                text.strip_suffix('\r').unwrap_or(text).to_owned(),
            ))
        }
        None => None,
    };
    let Some((scheme, rest)) = url
        .split_once("://")
        .filter(|(s, _)| s.starts_with("redis"))
    else {
        // The variable may be set for a whole shell session: other stores ignore it. The
        // flag was given for this command, so it must be meant for this store.
        if file.is_some() {
            return Err(Failure::usage(
                "--password-file gives a Redis password but the store is not a redis:// URL",
            ));
        }
        return Ok(url.to_owned());
    };
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    let (userinfo, host) = match authority.rfind('@') {
        Some(at) => (Some(&authority[..at]), &authority[at + 1..]),
        None => (None, authority),
    };
    let in_url = userinfo.is_some_and(|u| u.contains(':'));
    let password = match (env, file) {
        (Some(_), Some(_)) => {
            return Err(Failure::usage(
                "the Redis password is given twice (BEVY_STORAGE_REDIS_PASSWORD and \
                 --password-file): give only one",
            ));
        }
        (Some(p), None) | (None, Some(p)) => p,
        (None, None) => {
            if in_url && cli.store_on_command_line {
                eprintln!(
                    "warning: the Redis password in --store is visible to other users (ps) and \
                     in your shell history; set BEVY_STORAGE_REDIS_PASSWORD or pass \
                     --password-file instead"
                );
            }
            return Ok(url.to_owned());
        }
    };
    if in_url {
        return Err(Failure::usage(
            "the Redis password is given twice (in the URL and from BEVY_STORAGE_REDIS_PASSWORD \
             or --password-file): give only one",
        ));
    }
    let user = userinfo.unwrap_or("");
    Ok(format!(
        "{scheme}://{user}:{}@{host}{tail}",
        percent_encode(&password)
    ))
}

/// Percent-encodes everything but RFC 3986's unreserved characters (for a URL's password).
fn percent_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~".contains(&byte) {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// `sqlite:PATH`, `file:DIR`... for messages (a Redis password is hidden).
fn describe(config: &StorageConfig) -> String {
    match &config.backend {
        BackendConfig::Memory => "memory:".into(),
        BackendConfig::File { root } => format!("file:{}", root.display()),
        #[cfg(feature = "sqlite")]
        BackendConfig::Sqlite { path, .. } => format!("sqlite:{}", path.display()),
        #[cfg(feature = "redis")]
        BackendConfig::Redis { url, namespace } => {
            format!(
                "{} (namespace {namespace:?})",
                bevy_storage::config::redact_url(url)
            )
        }
        other => format!("{other:?}"),
    }
}

/// Opens the store; unless `create`, a store that does not exist yet is an error (opening
/// would create an empty one).
fn open_store(config: &StorageConfig, create: bool) -> Outcome<Store> {
    if !create {
        let missing = |what: String| {
            Failure::runtime(format!(
                "no store at {what} (only `import` creates a store; check --store)"
            ))
        };
        match &config.backend {
            BackendConfig::File { root } if !root.is_dir() => {
                return Err(if root.exists() {
                    Failure::runtime(format!(
                        "{} is not a directory, so not a file store",
                        root.display()
                    ))
                } else {
                    missing(format!("{}: the directory does not exist", root.display()))
                });
            }
            #[cfg(feature = "sqlite")]
            BackendConfig::Sqlite { path, .. } if !path.is_file() => {
                return Err(if path.exists() {
                    Failure::runtime(format!(
                        "{} is not a file, so not an SQLite store",
                        path.display()
                    ))
                } else {
                    missing(format!("{}: the file does not exist", path.display()))
                });
            }
            _ => {}
        }
    }
    Store::open(config.clone()).map_err(|e| {
        let failure = Failure::from(e);
        match failure {
            Failure::Runtime(m) => {
                Failure::runtime(format!("cannot open the store {}: {m}", describe(config)))
            }
            other => other,
        }
    })
}

/// The encryption key from the environment or a key file, if one is given.
fn key_material(cli: &Cli) -> Outcome<Option<EncryptionKey>> {
    let hex = env_secret("BEVY_STORAGE_KEY")?;
    let passphrase = env_secret("BEVY_STORAGE_PASSPHRASE")?;
    let given: Vec<&str> = [
        (hex.is_some(), "BEVY_STORAGE_KEY"),
        (passphrase.is_some(), "BEVY_STORAGE_PASSPHRASE"),
        (cli.key_file.is_some(), "--key-file"),
        (cli.passphrase_file.is_some(), "--passphrase-file"),
    ]
    .into_iter()
    .filter_map(|(set, name)| set.then_some(name))
    .collect();
    if given.len() > 1 {
        return Err(Failure::usage(format!(
            "key material is given more than once ({}): give only one",
            given.join(", ")
        )));
    }
    let key = |source: &str, key: Result<EncryptionKey, StorageError>| {
        key.map_err(|e| Failure::usage(format!("{source}: {e}")))
    };
    if let Some(hex) = hex {
        return key("BEVY_STORAGE_KEY", EncryptionKey::from_hex(&hex)).map(Some);
    }
    if let Some(mut passphrase) = passphrase {
        // Moved, not copied: the only copy left is the key's own (zeroized on drop).
        let owned = std::mem::take(&mut *passphrase);
        return key(
            "BEVY_STORAGE_PASSPHRASE",
            EncryptionKey::from_passphrase(owned),
        )
        .map(Some);
    }
    if let Some(path) = &cli.key_file {
        let source = format!("key file {}", path.display());
        let bytes = read_secret_file(path)?;
        if bytes.len() == bevy_storage::codec::crypto::KEY_LEN {
            return key(&source, EncryptionKey::from_slice(&bytes)).map(Some);
        }
        let text = std::str::from_utf8(&bytes).map_err(|_| {
            Failure::usage(format!(
                "{source}: a key file holds 64 hex digits or exactly 32 raw bytes (this one holds {} bytes)",
                bytes.len()
            ))
        })?;
        return key(&source, EncryptionKey::from_hex(text)).map(Some);
    }
    if let Some(path) = &cli.passphrase_file {
        let source = format!("passphrase file {}", path.display());
        let bytes = read_secret_file(path)?;
        let text = std::str::from_utf8(&bytes)
            .map_err(|_| Failure::usage(format!("{source}: the passphrase is not UTF-8 text")))?;
        let text = text
            .strip_suffix('\n')
            .map(|t| t.strip_suffix('\r').unwrap_or(t))
            .unwrap_or(text);
        return key(&source, EncryptionKey::from_passphrase(text)).map(Some);
    }
    Ok(None)
}

fn env_secret(name: &str) -> Outcome<Option<Zeroizing<String>>> {
    match std::env::var(name) {
        Ok(value) if value.is_empty() => Ok(None),
        Ok(value) => Ok(Some(Zeroizing::new(value))),
        Err(std::env::VarError::NotPresent) => Ok(None),
        Err(std::env::VarError::NotUnicode(_)) => {
            Err(Failure::usage(format!("{name} is not valid UTF-8 text")))
        }
    }
}

fn read_secret_file(path: &std::path::Path) -> Outcome<Zeroizing<Vec<u8>>> {
    std::fs::read(path)
        .map(Zeroizing::new)
        .map_err(|e| Failure::runtime(format!("cannot read {}: {e}", path.display())))
}

/// A view of a backend for reading with a key: the store may record its key check (which
/// opening with a key does on a store that has none) without anything reaching the backend;
/// every other write fails. The inspector never changes a store it only reads.
struct ReadOnly(Arc<dyn Backend>);

impl Backend for ReadOnly {
    fn backend_type(&self) -> &str {
        self.0.backend_type()
    }
    fn get(&self, key: &str) -> bevy_storage::Result<Option<Record>> {
        self.0.get(key)
    }
    fn get_meta(&self, key: &str) -> bevy_storage::Result<Option<RecordMeta>> {
        self.0.get_meta(key)
    }
    fn write(&self, ops: Vec<WriteOp>, _now: Timestamp) -> bevy_storage::Result<Vec<WriteOutcome>> {
        if ops.iter().all(|op| dump::is_internal(op.key())) {
            Ok(vec![WriteOutcome::default(); ops.len()])
        } else {
            Err(StorageError::backend(
                "inspector",
                "this view of the store is read-only",
            ))
        }
    }
    fn delete_if_unchanged(
        &self,
        _key: &str,
        _value: &[u8],
        _expires_at: Option<Timestamp>,
    ) -> bevy_storage::Result<bool> {
        Err(StorageError::backend(
            "inspector",
            "this view of the store is read-only",
        ))
    }
    fn touch(&self, _key: &str, _at: Timestamp) -> bevy_storage::Result<()> {
        Ok(())
    }
    fn scan(&self, prefix: &str) -> bevy_storage::Result<Vec<KeyEntry>> {
        self.0.scan(prefix)
    }
    fn purge_expired(&self, _now: Timestamp) -> bevy_storage::Result<usize> {
        Err(StorageError::backend(
            "inspector",
            "this view of the store is read-only",
        ))
    }
    fn clear(&self) -> bevy_storage::Result<()> {
        Err(StorageError::backend(
            "inspector",
            "this view of the store is read-only",
        ))
    }
    fn usage(&self, now: Timestamp) -> bevy_storage::Result<Usage> {
        self.0.usage(now)
    }
    fn available_space(&self) -> Option<u64> {
        self.0.available_space()
    }
    fn health_check(&self) -> bevy_storage::Result<()> {
        self.0.health_check()
    }
}

/// A store over `backend` that decrypts with `key`, checked against the store's key check,
/// and writes nothing.
fn keyed_reader(
    backend: &Arc<dyn Backend>,
    config: &StorageConfig,
    key: EncryptionKey,
) -> Result<Store, StorageError> {
    Store::with_backend(
        Arc::new(ReadOnly(Arc::clone(backend))),
        config.clone().encryption_key(key),
    )
}

pub(crate) fn check_key(key: &str) -> Outcome {
    bevy_storage::key::validate_key(key).map_err(Failure::from)
}

fn print_json(out: &mut dyn Write, value: &Json) -> Outcome {
    serde_json::to_writer_pretty(&mut *out, value).map_err(io::Error::from)?;
    writeln!(out)?;
    Ok(())
}

/// The live user records under `prefix`, sorted by key.
fn live_entries(store: &Store, prefix: &str, now: Timestamp) -> Outcome<Vec<KeyEntry>> {
    let mut entries: Vec<KeyEntry> = store
        .backend()
        .scan(prefix)?
        .into_iter()
        .filter(|e| !now.is_past(e.expires_at) && !dump::is_internal(&e.key))
        .collect();
    entries.sort_unstable_by(|a, b| a.key.cmp(&b.key));
    Ok(entries)
}

fn format_name(format: Format) -> &'static str {
    match format {
        Format::Ron => "ron",
        Format::Binary => "binary",
        Format::Raw => "raw",
    }
}

fn plural(n: u64, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

// ---------------------------------------------------------------------------------------------
// Commands

fn list(cli: &Cli, prefix: &str, out: &mut dyn Write) -> Outcome {
    let config = store_config(cli)?;
    bevy_storage::key::validate_prefix(prefix)?;
    let store = open_store(&config, false)?;
    let now = Timestamp::now();
    let entries = live_entries(&store, prefix, now)?;
    if cli.json {
        let rows: Vec<Json> = entries
            .iter()
            .map(|e| {
                json!({
                    "key": e.key,
                    "size": e.size,
                    "expires_at": e.expires_at.map(render::time_ms),
                })
            })
            .collect();
        return print_json(out, &Json::Array(rows));
    }
    let expiry = |e: &KeyEntry| match e.expires_at {
        Some(at) => format!("{} ({})", render::time(at), render::relative(now, at)),
        None => "never".into(),
    };
    let rows: Vec<(String, String, String)> = entries
        .iter()
        .map(|e| (e.key.clone(), render::size(e.size), expiry(e)))
        .collect();
    let width = |pick: fn(&(String, String, String)) -> &String, title: &str| {
        rows.iter()
            .map(|r| pick(r).chars().count())
            .chain([title.len()])
            .max()
            .unwrap_or(0)
    };
    let (kw, sw) = (width(|r| &r.0, "KEY"), width(|r| &r.1, "SIZE"));
    if !rows.is_empty() {
        writeln!(out, "{:<kw$}  {:>sw$}  EXPIRES", "KEY", "SIZE")?;
        for (key, size, expires) in &rows {
            writeln!(out, "{key:<kw$}  {size:>sw$}  {expires}")?;
        }
    }
    let total: u64 = entries.iter().map(|e| e.size).sum();
    let under = if prefix.is_empty() {
        String::new()
    } else {
        format!(" under {prefix:?}")
    };
    writeln!(
        out,
        "{}{under}, {}",
        plural(entries.len() as u64, "key", "keys"),
        render::size(total)
    )?;
    Ok(())
}

const HEX_LIMIT: usize = 4096;

fn get(cli: &Cli, key: &str, raw: bool, full: bool, out: &mut dyn Write) -> Outcome {
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
                let encoding = match header.encoding {
                    SnapshotEncoding::Ron => "ron",
                    SnapshotEncoding::Binary => "binary",
                };
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

fn meta(cli: &Cli, key: &str, out: &mut dyn Write) -> Outcome {
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

fn stats(cli: &Cli, out: &mut dyn Write) -> Outcome {
    let config = store_config(cli)?;
    let store = open_store(&config, false)?;
    let stats = store.get_stats();
    let now = Timestamp::now();
    let mut expired = 0u64;
    let mut groups: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    for entry in store.backend().scan("")? {
        if dump::is_internal(&entry.key) {
            continue;
        }
        if now.is_past(entry.expires_at) {
            expired += 1;
            continue;
        }
        let group = match entry.key.find([':', '/']) {
            Some(at) => entry.key[..=at].to_owned(),
            None => "(no prefix)".to_owned(),
        };
        let slot = groups.entry(group).or_default();
        slot.0 += 1;
        slot.1 += entry.size;
    }
    let mut groups: Vec<(String, (u64, u64))> = groups.into_iter().collect();
    groups.sort_by(|a, b| b.1.0.cmp(&a.1.0).then_with(|| a.0.cmp(&b.0)));
    // The store is opened without a quota; the game's is StorageConfig's default unless
    // --quota names another.
    let default_quota = StorageConfig::memory().max_size;
    let (quota, quota_source) = match cli.quota {
        Some(Quota::Bytes(n)) => (Some(n), "--quota"),
        Some(Quota::Unlimited) => (None, "--quota"),
        None => (default_quota, "StorageConfig's default max_size"),
    };
    let disk = store.backend().available_space();
    let under_quota = quota.map(|q| q.saturating_sub(stats.total_size));
    let available = match (under_quota, disk) {
        (Some(q), Some(d)) => Some(q.min(d)),
        (q, d) => q.or(d),
    };
    if cli.json {
        let prefixes: serde_json::Map<String, Json> = groups
            .iter()
            .map(|(p, (n, size))| (p.clone(), json!({"records": n, "size": size})))
            .collect();
        return print_json(
            out,
            &json!({
                "store": describe(&config),
                "backend": stats.backend_type,
                "records": stats.item_count,
                "total_size": stats.total_size,
                "expired_awaiting_purge": expired,
                "quota": quota,
                "quota_source": quota_source,
                "available_under_quota": under_quota,
                "disk_available": disk,
                "available_space": available,
                "healthy": stats.is_healthy,
                "last_error": stats.last_error,
                "prefixes": prefixes,
            }),
        );
    }
    writeln!(out, "store:            {}", describe(&config))?;
    writeln!(out, "backend:          {}", stats.backend_type)?;
    writeln!(out, "records:          {}", stats.item_count)?;
    writeln!(
        out,
        "total size:       {} ({} bytes)",
        render::size(stats.total_size),
        stats.total_size
    )?;
    writeln!(out, "expired:          {expired} awaiting purge-expired")?;
    match quota {
        Some(q) => writeln!(
            out,
            "quota:            {} ({quota_source}; --quota SIZE if the game sets another), {:.1}% used",
            render::size(q),
            if q == 0 {
                100.0
            } else {
                stats.total_size as f64 * 100.0 / q as f64
            }
        )?,
        None => writeln!(out, "quota:            none ({quota_source})")?,
    }
    let disk_text = disk.map_or("unknown".to_owned(), render::size);
    match (under_quota, available) {
        (Some(q), Some(space)) if Some(q) == available => writeln!(
            out,
            "available space:  {} under the quota ({disk_text} free on disk)",
            render::size(space)
        )?,
        (Some(_), Some(space)) => writeln!(
            out,
            "available space:  {} (the disk has less free than the quota allows)",
            render::size(space)
        )?,
        (None, Some(space)) => writeln!(out, "available space:  {} on disk", render::size(space))?,
        (_, None) => writeln!(out, "available space:  unknown")?,
    }
    match &stats.last_error {
        Some(e) if !stats.is_healthy => writeln!(out, "healthy:          no ({e})")?,
        _ => writeln!(
            out,
            "healthy:          {}",
            if stats.is_healthy { "yes" } else { "no" }
        )?,
    }
    if !groups.is_empty() {
        writeln!(out, "key prefixes:")?;
        let width = groups
            .iter()
            .map(|g| g.0.chars().count())
            .max()
            .unwrap_or(0);
        const SHOWN: usize = 20;
        for (prefix, (n, size)) in groups.iter().take(SHOWN) {
            writeln!(out, "  {prefix:<width$}  {n:>6}  {}", render::size(*size))?;
        }
        if groups.len() > SHOWN {
            writeln!(out, "  ... and {} more prefixes", groups.len() - SHOWN)?;
        }
    }
    Ok(())
}

fn delete(cli: &Cli, key: &str, out: &mut dyn Write) -> Outcome {
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

fn purge_expired(cli: &Cli, out: &mut dyn Write) -> Outcome {
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

/// A progress bar on stderr, hidden with `--quiet` or when stderr is not a terminal. It
/// counts records, or bytes when `bytes`.
fn progress(cli: &Cli, len: u64, what: &str, bytes: bool) -> indicatif::ProgressBar {
    use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
    if cli.quiet || !io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let template = if bytes {
        "{msg:9} [{bar:30}] {bytes}/{total_bytes}, {eta} left"
    } else {
        "{msg:9} [{bar:30}] {pos}/{len} records, {eta} left"
    };
    let style = ProgressStyle::with_template(template)
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
    let bar = ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::stderr());
    bar.set_style(style);
    bar.set_message(what.to_owned());
    bar
}
