//! The global options (`--store`, key material, `--quota`, `--json`, `--quiet`) and the help
//! text. The subcommands are listed in `main.rs`.

use std::path::PathBuf;

use clap::Parser;

use crate::Command;
use crate::render;

pub const AFTER_HELP: &str = "\
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
pub struct Cli {
    /// The store: sqlite:PATH, file:DIR, memory: or redis://HOST[:PORT][/DB]
    #[arg(
        long,
        short = 's',
        env = "BEVY_STORAGE_URL",
        hide_env_values = true,
        value_name = "URL",
        global = true
    )]
    pub store: Option<String>,

    /// The game's own store, by its application identifier (com.studio.game): the
    /// per-user data directory of StoragePlugin::for_app (BEVY_STORAGE_DIR overrides it)
    #[arg(long, value_name = "ID", global = true)]
    pub app: Option<String>,

    /// Read the raw encryption key from this file (64 hex digits or 32 raw bytes)
    #[arg(long, value_name = "PATH", global = true)]
    pub key_file: Option<PathBuf>,

    /// Read the encryption passphrase from this file
    #[arg(long, value_name = "PATH", global = true)]
    pub passphrase_file: Option<PathBuf>,

    /// Read the Redis password from this file (or set BEVY_STORAGE_REDIS_PASSWORD)
    #[arg(long, value_name = "PATH", global = true)]
    pub password_file: Option<PathBuf>,

    /// The game's quota (its max_size) for `stats`: 100MiB, 2GiB, 500000 (bytes) or none
    #[arg(long, value_name = "SIZE", global = true, value_parser = parse_quota)]
    pub quota: Option<Quota>,

    /// Print machine-readable JSON on stdout
    #[arg(long, global = true)]
    pub json: bool,

    /// No progress bars on stderr
    #[arg(long, short, global = true)]
    pub quiet: bool,

    #[command(subcommand)]
    pub command: Command,

    /// True when the store URL came from the command line (not the environment).
    #[arg(skip)]
    pub store_on_command_line: bool,
}

/// `--quota`: a size in bytes, or no quota.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Quota {
    Bytes(u64),
    Unlimited,
}

pub fn parse_quota(text: &str) -> Result<Quota, String> {
    if text.eq_ignore_ascii_case("none") {
        return Ok(Quota::Unlimited);
    }
    render::parse_size(text).map(Quota::Bytes)
}
