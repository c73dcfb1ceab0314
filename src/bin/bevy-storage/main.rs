//! `bevy-storage`: look into any `bevy_storage` store without writing code.
//!
//! Built with the `cli` feature: `cargo run --features cli --bin bevy-storage -- --help`.
//! It lists, decodes, describes and deletes records, prints statistics, purges expired
//! records, and moves whole stores between backends through a portable dump
//! (see [`dump`] for its format).
//!
//! One file per concept: `args` (the global options and the help text), `failure` (exit
//! codes), `open` (the store URL, key material), `output` (JSON, progress bars), then one
//! file per command family: `read` (list, get, meta), `stats`, `write` (set, clear, delete,
//! purge-expired), `transfer` (export, import, over the `dump` format), `salvage` (a damaged
//! SQLite store into a new one); `render`, `ron_view`
//! and `snapshot_view` turn stored bytes into text.
//!
//! A new subcommand: a file of its own (or the family it belongs to) with a
//! `pub fn NAME(cli: &Cli, ..., out: &mut dyn Write) -> Outcome`, a variant in `Command`
//! and an arm in `run`, both below.

mod args;
mod dump;
mod failure;
mod open;
mod output;
mod read;
mod render;
mod ron_view;
mod salvage;
mod snapshot_view;
mod stats;
mod transfer;
mod write;

use std::io::{self, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use clap::parser::ValueSource;
use clap::{CommandFactory, FromArgMatches, Subcommand};

use args::Cli;
use failure::{Failure, Outcome};

// The subcommands, in the order `--help` lists them. A new one: a variant here, an arm in
// `run` below, and its code in a file of its own.
#[derive(Subcommand, Debug)]
pub enum Command {
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

/// Runs the command: one arm per subcommand.
fn run(cli: &Cli, out: &mut dyn Write) -> Outcome {
    match &cli.command {
        Command::List { prefix } => read::list(cli, prefix.as_deref().unwrap_or(""), out),
        Command::Get { key, raw, full } => read::get(cli, key, *raw, *full, out),
        Command::Meta { key } => read::meta(cli, key, out),
        Command::Stats => stats::stats(cli, out),
        Command::Delete { key } => write::delete(cli, key, out),
        Command::Set(args) => write::set(cli, args, out),
        Command::Clear { yes } => write::clear(cli, *yes, out),
        Command::PurgeExpired => write::purge_expired(cli, out),
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
