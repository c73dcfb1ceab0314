//! `salvage SRC DEST`: copies every readable record of a damaged SQLite store into a new one
//! (see [`bevy_storage::backend::sqlite::salvage`]).

use std::io::Write;
use std::path::PathBuf;

use crate::args::Cli;
use crate::failure::Outcome;

/// The arguments of `salvage`.
#[derive(Debug, clap::Args)]
pub struct SalvageArgs {
    /// The damaged SQLite database (read only, never changed)
    pub source: PathBuf,
    /// The new SQLite database to write (must not exist)
    pub dest: PathBuf,
}

/// Without the `sqlite` feature there is nothing to salvage with.
#[cfg(not(feature = "sqlite"))]
pub fn run(_cli: &Cli, _args: &SalvageArgs, _out: &mut dyn Write) -> Outcome {
    Err(bevy_storage::StorageError::FeatureDisabled {
        feature: "sqlite",
        what: "salvaging a SQLite store".into(),
    }
    .into())
}

/// Runs `salvage`: the report goes to stdout (JSON with `--json`), progress to stderr about
/// every two seconds. Exit code 0 when every record was copied, 1 (after the report) when some
/// could not be read.
#[cfg(feature = "sqlite")]
pub fn run(cli: &Cli, args: &SalvageArgs, out: &mut dyn Write) -> Outcome {
    use std::time::{Duration, Instant};

    use bevy_storage::backend::sqlite::salvage::{SalvageProgress, salvage};
    use serde_json::json;

    use crate::failure::Failure;
    use crate::output::print_json;

    let started = Instant::now();
    let mut last = Instant::now();
    let quiet = cli.quiet;
    let report = salvage(&args.source, &args.dest, |p: SalvageProgress| {
        if !quiet && last.elapsed() >= Duration::from_secs(2) {
            last = Instant::now();
            let of = p
                .max_rowid
                .map(|m| format!(" of about {m}"))
                .unwrap_or_default();
            eprintln!(
                "salvage: row {}{of}: {} record(s) copied, {} unreadable, {:.0?} elapsed",
                p.rowid,
                p.recovered,
                p.unreadable,
                started.elapsed()
            );
        }
    })?;
    let source = display(&args.source);
    let dest = display(&args.dest);
    if cli.json {
        print_json(
            out,
            &json!({
                "source": source,
                "dest": dest,
                "recovered": report.recovered,
                "unreadable_rows": report.unreadable_rows,
                "skipped_rowid_ranges": report.skipped_rowids,
                "lost_key_count": report.lost_key_count,
                "lost_keys": report.lost_keys.iter().map(|r| json!({
                    "first": r.first, "last": r.last, "count": r.count,
                })).collect::<Vec<_>>(),
                "key_index_incomplete": report.key_index_incomplete,
                "complete": report.is_complete(),
            }),
        )?;
    } else {
        writeln!(
            out,
            "salvaged {} record(s) from {source} into {dest}",
            report.recovered
        )?;
        if report.is_complete() {
            writeln!(out, "every record was readable")?;
        } else {
            writeln!(out, "could not read:")?;
            writeln!(
                out,
                "  {} row(s) reached but unreadable",
                report.unreadable_rows
            )?;
            for (from, to) in &report.skipped_rowids {
                writeln!(out, "  rows {from}..={to} skipped over damaged pages")?;
            }
            writeln!(
                out,
                "  {} key(s) named by the key index and not recovered{}",
                report.lost_key_count,
                if report.key_index_incomplete {
                    " (the key index is damaged too: there may be more)"
                } else {
                    ""
                }
            )?;
            for run in &report.lost_keys {
                if run.count == 1 {
                    writeln!(out, "    {:?}", run.first)?;
                } else {
                    writeln!(
                        out,
                        "    {:?} ..= {:?} ({} keys)",
                        run.first, run.last, run.count
                    )?;
                }
            }
        }
    }
    if report.is_complete() {
        Ok(())
    } else {
        Err(Failure::runtime(format!(
            "{} record(s) of {source} could not be read",
            report.unreadable_rows + report.lost_key_count
        )))
    }
}

#[cfg(feature = "sqlite")]
fn display(path: &std::path::Path) -> String {
    path.display().to_string()
}
