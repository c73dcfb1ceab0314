//! What goes out: JSON on stdout, counted nouns, progress bars on stderr.

use std::io::{self, IsTerminal, Write};

use bevy_storage::Format;
use serde_json::Value as Json;

use crate::args::Cli;
use crate::failure::Outcome;

pub fn print_json(out: &mut dyn Write, value: &Json) -> Outcome {
    serde_json::to_writer_pretty(&mut *out, value).map_err(io::Error::from)?;
    writeln!(out)?;
    Ok(())
}

pub fn format_name(format: Format) -> &'static str {
    match format {
        Format::Ron => "ron",
        Format::Binary => "binary",
        Format::Raw => "raw",
    }
}

pub fn plural(n: u64, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

/// A progress bar on stderr, hidden with `--quiet` or when stderr is not a terminal. It
/// counts records, or bytes when `bytes`.
pub fn progress(cli: &Cli, len: u64, what: &str, bytes: bool) -> indicatif::ProgressBar {
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
