//! Power-loss harness: the crash states a power cut may leave on disk, opened with the real
//! store, in the way of ALICE (OSDI 2014) and SQLite's crash VFS.
//!
//! The crash test (`examples/crash_test.rs`) kills the process, but the page cache survives a
//! killed process: a build without a single `fsync` passes it. This harness instead records
//! every file operation of a child doing random saves, deletes and transactions (the crash
//! test's workload, `examples/common/workload.rs`), builds from that record the states the
//! disk may hold after a power cut at many points of the run, and checks each with the store.
//!
//! For each backend (`file`, `sqlite-full`, `sqlite-normal`) and each trace:
//!
//! 1. A warm-up child (not traced) does some operations in a fresh directory and exits; the
//!    directory it leaves is the initial state, taken as durable.
//! 2. A second child continues on it under `strace` ([`trace`](power_loss/trace.rs) says why
//!    strace): every open, write, `pwrite`, truncate, rename, unlink, `mkdir`, `fsync`,
//!    `fdatasync`, `dup` and close, with the bytes written, and the child's own `S <op>` and
//!    `A <op>` lines on stdout at their exact place among them.
//! 3. The [model](power_loss/model.rs) replays the calls from the initial state. At chosen
//!    crash points it builds crash states: what the barriers made durable (a file's `fsync`
//!    its data, a directory's `fsync` its entries), plus all, none or some of the later
//!    operations, reordered within POSIX's rules and torn at 512-byte sectors; SQLite's `-shm`
//!    is shared memory and is left out. States are deduplicated by a hash of the directory.
//! 4. Each new state is written to a scratch directory and [checked](power_loss/check.rs):
//!    the store opens, every record decodes, nothing acknowledged is lost where the promise
//!    covers power loss (file backend, SQLite `Full`), `Normal` loses at most a tail of
//!    acknowledged commits, no transaction is half applied, SQLite's integrity check passes.
//!
//! Each backend prints `power-loss <backend> states=N violations=V` (N distinct crash states
//! checked, V of them violating); progress goes to stderr. The first violating state of a
//! backend is saved with its trace and a description under `--dir`, and the exit code is
//! non-zero.
//!
//! ```text
//! cargo run --example power_loss -- --backend all --states 1000
//! cargo run --example power_loss -- --backend file --ops 30 --states 200 --seed 7
//! ```
//!
//! Options: `--backend file|sqlite-full|sqlite-normal|all` (default all; the SQLite ones need
//! the `sqlite` feature), `--ops N` traced operations per trace (default 40; the warm-up does
//! half as many), `--states N` distinct crash states to check per backend (default 1000),
//! `--seed S` (default: from the clock, printed), `--dir PATH` (work and evidence directory,
//! default the system temp dir), `--fresh` (no warm-up: the traced child creates the store in
//! an empty directory, so the creation of the store's own directory or database is checked
//! too; the empty directory itself is taken as durable). Needs `strace` (Linux).
//!
//! The harness's own self-check: a build with `--cfg bevy_storage_sabotage_fsync` drops the
//! file backend's directory `fsync` after its renames and turns SQLite `Full` into
//! `synchronous=OFF`; this harness must then report violations for `file` and `sqlite-full`
//! (see DEVELOPERS.md).

#[path = "common/workload.rs"]
mod workload;

#[path = "power_loss/check.rs"]
mod check;
#[path = "power_loss/model.rs"]
mod model;
#[path = "power_loss/trace.rs"]
mod trace;

use std::collections::HashSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::Instant;

use bevy_storage::{StorageConfig, Store};
use check::{Allowed, History, check_state, replay};
use model::{Model, State, Variant, materialize, state_hash};
use workload::{Codec, NKEYS, Op, Rng, Val, answer_line, arg_value, check_file_root, perform};

/// A backend and the promise it makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    File,
    #[cfg(feature = "sqlite")]
    SqliteFull,
    #[cfg(feature = "sqlite")]
    SqliteNormal,
}

const ALL: &[Backend] = &[
    Backend::File,
    #[cfg(feature = "sqlite")]
    Backend::SqliteFull,
    #[cfg(feature = "sqlite")]
    Backend::SqliteNormal,
];

impl Backend {
    fn name(self) -> &'static str {
        match self {
            Backend::File => "file",
            #[cfg(feature = "sqlite")]
            Backend::SqliteFull => "sqlite-full",
            #[cfg(feature = "sqlite")]
            Backend::SqliteNormal => "sqlite-normal",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        ALL.iter().copied().find(|b| b.name() == s)
    }

    /// The store's configuration in `dir` (without the codec).
    fn config(self, dir: &Path) -> StorageConfig {
        match self {
            Backend::File => StorageConfig::file(dir.join("records")),
            #[cfg(feature = "sqlite")]
            Backend::SqliteFull => StorageConfig::sqlite(dir.join("store.db"))
                .sqlite_synchronous(bevy_storage::backend::sqlite::SqliteSynchronous::Full),
            #[cfg(feature = "sqlite")]
            Backend::SqliteNormal => StorageConfig::sqlite(dir.join("store.db"))
                .sqlite_synchronous(bevy_storage::backend::sqlite::SqliteSynchronous::Normal),
        }
    }

    /// `Normal` may lose the last acknowledged commits on a power cut.
    fn may_lose_tail(self) -> bool {
        match self {
            Backend::File => false,
            #[cfg(feature = "sqlite")]
            Backend::SqliteFull => false,
            #[cfg(feature = "sqlite")]
            Backend::SqliteNormal => true,
        }
    }

    /// Backend-specific checks of the directory after the store opened and closed it.
    fn check_medium(self, dir: &Path) -> Vec<String> {
        match self {
            Backend::File => check_file_root(dir, "records"),
            #[cfg(feature = "sqlite")]
            Backend::SqliteFull | Backend::SqliteNormal => {
                workload::check_sqlite_integrity(&dir.join("store.db"))
            }
        }
    }
}

// ------------------------------------------------------------------------------------ child

fn run_child(args: &[String]) -> ExitCode {
    let need = |name: &str| arg_value(args, name).unwrap_or_else(|| panic!("child needs {name}"));
    let backend = Backend::parse(&need("--backend")).expect("backend");
    let codec = Codec::from_args(args).expect("codec arguments");
    let dir = PathBuf::from(need("--dir"));
    let mut rng = Rng::new(need("--seed").parse().expect("seed"));
    let first: u64 = need("--first-op").parse().expect("first op");
    let count: u64 = need("--ops").parse().expect("ops");
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let mut say = |line: String| {
        // One write per line: the trace places it as one call.
        out.write_all(format!("{line}\n").as_bytes())
            .and_then(|()| out.flush())
            .expect("stdout");
    };
    let store = match Store::open(codec.configure(backend.config(&dir))) {
        Ok(store) => store,
        Err(e) => {
            say(format!("OPENFAIL {e}"));
            return ExitCode::from(2);
        }
    };
    say("READY".into());
    for n in first + 1..=first + count {
        let op = Op::random(&mut rng);
        let opts = codec.save_options(&mut rng);
        say(format!("S {n} {}", op.to_wire()));
        let result = perform(&store, n, &op, &opts);
        say(answer_line(n, &op, result));
    }
    drop(store);
    ExitCode::SUCCESS
}

// ----------------------------------------------------------------------------------- parent

struct Options {
    backends: Vec<Backend>,
    ops: u64,
    states: usize,
    seed: u64,
    dir: PathBuf,
    fresh: bool,
}

fn parse_options(args: &[String]) -> Result<Options, String> {
    let mut o = Options {
        backends: ALL.to_vec(),
        ops: 40,
        states: 1000,
        seed: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1),
        dir: std::env::temp_dir(),
        fresh: false,
    };
    let mut i = 0;
    while i < args.len() {
        let value = || {
            args.get(i + 1)
                .cloned()
                .ok_or_else(|| format!("{} needs a value", args[i]))
        };
        let number = || -> Result<u64, String> {
            value()?
                .parse()
                .map_err(|_| format!("{} needs a number", args[i]))
        };
        match args[i].as_str() {
            "--backend" => {
                let v = value()?;
                o.backends = if v == "all" {
                    ALL.to_vec()
                } else {
                    vec![Backend::parse(&v).ok_or_else(|| {
                        format!(
                            "unknown backend {v:?}: use {} or all",
                            ALL.iter().map(|b| b.name()).collect::<Vec<_>>().join(", ")
                        )
                    })?]
                };
            }
            "--ops" => o.ops = number()?.max(1),
            "--states" => o.states = number()?.max(1) as usize,
            "--seed" => o.seed = number()?,
            "--dir" => o.dir = PathBuf::from(value()?),
            "--fresh" => {
                o.fresh = true;
                i += 1;
                continue;
            }
            "-h" | "--help" => {
                return Err(
                    "usage: power_loss [--backend file|sqlite-full|sqlite-normal|all] \
                     [--ops N] [--states N] [--seed S] [--dir PATH] [--fresh]"
                        .into(),
                );
            }
            other => return Err(format!("unknown argument {other:?} (try --help)")),
        }
        i += 2;
    }
    Ok(o)
}

/// Totals of one backend.
#[derive(Default)]
struct Totals {
    states: usize,
    violations: usize,
    traces: usize,
    calls: usize,
    acked: usize,
    /// States in which `Normal` lost acknowledged commits (a tail, as allowed).
    lost_tail: usize,
    /// States with an operation in flight at the crash.
    in_flight: usize,
    /// States holding a file backend journal, or a SQLite WAL (recovery had work to do).
    journal: usize,
    /// States holding a file backend temp file (left by the crash, removed by the open).
    temp: usize,
    evidence: Option<PathBuf>,
}

/// Everything one trace needs to check its states.
struct TraceRun<'a> {
    backend: Backend,
    codec: Codec,
    history: History,
    work: &'a Path,
    calls: &'a [trace::Call],
    trace_file: PathBuf,
}

fn child_args(
    backend: Backend,
    codec: Codec,
    dir: &Path,
    seed: u64,
    first: u64,
    ops: u64,
) -> Vec<String> {
    let mut args = vec![
        "--child".into(),
        "--backend".into(),
        backend.name().into(),
        "--dir".into(),
        dir.to_string_lossy().into_owned(),
        "--seed".into(),
        seed.to_string(),
        "--first-op".into(),
        first.to_string(),
        "--ops".into(),
        ops.to_string(),
    ];
    args.extend(codec.to_args());
    args
}

/// Runs one trace of `backend` and checks its crash states; returns an error message when the
/// harness itself could not run.
fn run_trace(
    options: &Options,
    backend: Backend,
    rng: &mut Rng,
    seen: &mut HashSet<u64>,
    totals: &mut Totals,
) -> Result<(), String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let work = options.dir.join(format!(
        "bevy_storage_power_loss_{}_{}_{}_{}",
        std::process::id(),
        backend.name(),
        options.seed,
        totals.traces
    ));
    let _ = std::fs::remove_dir_all(&work);
    let store_dir = work.join("store");
    std::fs::create_dir_all(&store_dir).map_err(|e| e.to_string())?;
    let store_dir = store_dir.canonicalize().map_err(|e| e.to_string())?;
    let codec = Codec::random(rng);

    // 1. The warm-up: its directory is the initial state (with --fresh: an empty directory,
    // the store's own files made by the traced child).
    let warm = if options.fresh {
        0
    } else {
        (options.ops / 2).max(1)
    };
    let mut state: Vec<Option<Val>> = vec![None; NKEYS + 1];
    if warm > 0 {
        let output = Command::new(&exe)
            .args(child_args(backend, codec, &store_dir, rng.next(), 0, warm))
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("warm-up child: {e}"))?;
        if !output.status.success() {
            return Err(format!(
                "the warm-up child failed: {}",
                String::from_utf8_lossy(&output.stderr)
            ));
        }
        let warm_lines: Vec<(usize, String)> = String::from_utf8_lossy(&output.stdout)
            .lines()
            .map(|l| (0, l.to_owned()))
            .collect();
        replay(&mut state, &warm_lines).map_err(|e| format!("warm-up: {e}"))?;
    }
    let initial = Model::from_disk(&store_dir, &work).map_err(|e| e.to_string())?;

    // 2. The traced run.
    let trace_file = work.join("trace.txt");
    trace::record(
        &exe,
        &child_args(backend, codec, &store_dir, rng.next(), warm, options.ops),
        &work,
        &trace_file,
        &work.join("child.stderr"),
    )?;
    let text = std::fs::read_to_string(&trace_file).map_err(|e| e.to_string())?;
    let calls = trace::parse(&text)?;
    drop(text);

    // 3. A first replay finds the child's lines and the calls that matter.
    let mut first = initial.clone();
    for (i, call) in calls.iter().enumerate() {
        first.apply(i, call);
    }
    let history = replay(&mut state, &first.lines)?;
    if history.ops.len() as u64 != options.ops {
        return Err(format!(
            "the trace holds {} of {} operations",
            history.ops.len(),
            options.ops
        ));
    }
    totals.acked += history.ops.len();
    totals.calls += calls.len();
    let run = TraceRun {
        backend,
        codec,
        history,
        work: &work,
        calls: &calls,
        trace_file,
    };

    // Crash points: just before and just after every call that matters, and the end.
    let mut points: Vec<usize> = first
        .relevant
        .iter()
        .chain(first.lines.iter().map(|(i, _)| i))
        .flat_map(|i| [*i, *i + 1])
        .chain([calls.len()])
        .collect();
    points.sort_unstable();
    points.dedup();
    // Spread the budget over several traces: about a quarter of it here, 3 states per point.
    let wanted = (options.states / 4).max(30) / 3 + 1;
    let mut chosen: Vec<usize> = Vec::new();
    for (k, p) in points.iter().enumerate() {
        let left = points.len() - k;
        let need = wanted.saturating_sub(chosen.len());
        if rng.below(left as u64) < need as u64 {
            chosen.push(*p);
        }
    }

    // 4. The second replay builds and checks the states at the chosen points.
    let mut model = initial;
    let mut next = 0;
    for p in chosen {
        while next < p {
            model.apply(next, &calls[next]);
            next += 1;
        }
        let variants = if model.pending_count() == 0 {
            vec![Variant::All]
        } else {
            vec![
                Variant::All,
                Variant::Nothing,
                Variant::NamesOnly,
                Variant::DataOnly,
                Variant::Prefix(rng.next()),
                Variant::Prefix(rng.next()),
                Variant::Subset(rng.next()),
                Variant::Subset(rng.next()),
            ]
        };
        for variant in variants {
            let state = model.crash_state(variant);
            if !seen.insert(state_hash(&state)) {
                continue;
            }
            check_one(&run, &state, p, variant, totals)?;
            if totals.states >= options.states {
                break;
            }
        }
        if totals.states >= options.states {
            break;
        }
    }
    let _ = std::fs::remove_dir_all(&work);
    Ok(())
}

fn check_one(
    run: &TraceRun,
    state: &State,
    p: usize,
    variant: Variant,
    totals: &mut Totals,
) -> Result<(), String> {
    let scratch = run.work.join("check");
    let _ = std::fs::remove_dir_all(&scratch);
    materialize(state, &scratch).map_err(|e| format!("writing a crash state: {e}"))?;
    let allowed: Allowed = run.history.allowed(p);
    let outcome = check_state(run.backend, run.codec, &scratch, &run.history, &allowed);
    let _ = std::fs::remove_dir_all(&scratch);
    totals.states += 1;
    totals.lost_tail += usize::from(outcome.lost > 0);
    totals.in_flight += usize::from(allowed.in_flight);
    totals.journal += usize::from(
        state
            .keys()
            .any(|p| p.ends_with("/.journal") || p.ends_with("-wal")),
    );
    totals.temp += usize::from(state.keys().any(|p| p.contains("/.tmp-")));
    if outcome.violations.is_empty() {
        return Ok(());
    }
    totals.violations += 1;
    if totals.evidence.is_none() {
        totals.evidence = Some(save_evidence(
            run,
            state,
            p,
            variant,
            &allowed,
            &outcome.violations,
        ));
    }
    Ok(())
}

/// Saves the first violating state of a backend: the state as the crash left it (before the
/// store opened it), the trace and a description. Returns the directory.
fn save_evidence(
    run: &TraceRun,
    state: &State,
    p: usize,
    variant: Variant,
    allowed: &Allowed,
    violations: &[String],
) -> PathBuf {
    let dir = run.work.with_file_name(format!(
        "{}-violation",
        run.work.file_name().unwrap_or_default().to_string_lossy()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    let _ = materialize(state, &dir.join("state"));
    let _ = std::fs::copy(&run.trace_file, dir.join("trace.txt"));
    let mut text = format!(
        "backend {}, codec {:?}\ncrash before call {p} of {} (variant {variant:?}); {} traced operations acknowledged, {}\n\nviolations:\n",
        run.backend.name(),
        run.codec,
        run.calls.len(),
        allowed.answered,
        if allowed.in_flight {
            "one in flight"
        } else {
            "none in flight"
        },
    );
    for v in violations {
        text.push_str(&format!("- {v}\n"));
    }
    text.push_str("\nthe calls around the crash point (the crash comes just before the call marked >>; the child's stdout is fd 1):\n");
    for i in p.saturating_sub(25)..(p + 5).min(run.calls.len()) {
        text.push_str(&format!(
            "{} {i:6} (trace.txt line {}) [{}] {}\n",
            if i == p { ">>" } else { "  " },
            run.calls[i].line,
            run.calls[i].tid,
            run.calls[i].text
        ));
    }
    text.push_str("\nfiles in the state (state/):\n");
    for (path, content) in state {
        match content {
            Some(bytes) => text.push_str(&format!("  {path} ({} bytes)\n", bytes.len())),
            None => text.push_str(&format!("  {path}/\n")),
        }
    }
    let _ = std::fs::create_dir_all(&dir);
    let _ = std::fs::write(dir.join("description.txt"), &text);
    println!(
        "[{}] first violation, saved to {}:\n{}",
        run.backend.name(),
        dir.display(),
        violations
            .iter()
            .map(|v| format!("    {v}"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    dir
}

fn run_backend(options: &Options, backend: Backend) -> Result<Totals, String> {
    let mut rng = Rng::new(options.seed ^ (backend as u64 + 1).wrapping_mul(0x1234_5678_9abc_def1));
    let mut totals = Totals::default();
    let mut seen = HashSet::new();
    let started = Instant::now();
    // A trace that adds no new state would repeat forever: give up after many.
    let max_traces = 8 + options.states / 10;
    while totals.states < options.states && totals.traces < max_traces {
        let before = totals.states;
        run_trace(options, backend, &mut rng, &mut seen, &mut totals)?;
        totals.traces += 1;
        eprintln!(
            "[{}] trace {}: {} new states, {}/{} checked, {} violations, {:.1?}",
            backend.name(),
            totals.traces,
            totals.states - before,
            totals.states,
            options.states,
            totals.violations,
            started.elapsed()
        );
    }
    Ok(totals)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--child") {
        return run_child(&args);
    }
    let options = match parse_options(&args) {
        Ok(o) => o,
        Err(msg) => {
            eprintln!("{msg}");
            return ExitCode::from(2);
        }
    };
    println!(
        "power-loss harness: backends {:?}, {} states each, {} ops per trace, seed {}{}",
        options
            .backends
            .iter()
            .map(|b| b.name())
            .collect::<Vec<_>>(),
        options.states,
        options.ops,
        options.seed,
        if options.fresh {
            ", fresh stores (no warm-up)"
        } else {
            ""
        }
    );
    let mut failed = false;
    for &backend in &options.backends {
        let started = Instant::now();
        match run_backend(&options, backend) {
            Ok(t) => {
                failed |= t.violations > 0 || t.states < options.states;
                println!(
                    "power-loss {} states={} violations={}\n    ({} traces, {} calls recorded, {} ops acknowledged; states with an op in flight {}, with a journal or WAL {}, with a temp file {}{}{}; {:.1?})",
                    backend.name(),
                    t.states,
                    t.violations,
                    t.traces,
                    t.calls,
                    t.acked,
                    t.in_flight,
                    t.journal,
                    t.temp,
                    if backend.may_lose_tail() {
                        format!(
                            ", {} states lost a tail of acknowledged commits",
                            t.lost_tail
                        )
                    } else {
                        String::new()
                    },
                    t.evidence
                        .map(|d| format!(", first violation saved to {}", d.display()))
                        .unwrap_or_default(),
                    started.elapsed()
                );
                if t.states < options.states {
                    println!("    fewer distinct states than asked for: raise --ops");
                }
            }
            Err(e) => {
                failed = true;
                println!("power-loss {} could not run: {e}", backend.name());
            }
        }
        let _ = std::io::stdout().flush();
    }
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
