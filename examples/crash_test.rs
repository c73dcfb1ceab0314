//! Crash test for the persistent backends: nothing acknowledged is lost when the process dies.
//!
//! The parent process re-runs this same binary with `--child`. The child opens a store and does
//! a random mix of saves, deletes and multi-key transactions (with compression, encryption and
//! the binary format on in some runs), printing each operation to stdout before it starts
//! (`S <op> ...`) and again once the store acknowledged it (`A <op>`), flushing every line.
//! After a random delay the parent kills the child with SIGKILL, reopens the store itself and
//! checks that
//!
//! - every acknowledged operation is visible: each key holds exactly the value of the last
//!   acknowledged operation that touched it, or the value of the one operation that was sent
//!   but not acknowledged when the child died (it may or may not have been applied);
//! - no transaction is half applied: every transaction writes its own id into all its keys
//!   and into a check key, and the unacknowledged one is either entirely visible or not at all;
//! - every record decodes, `list_keys` shows exactly the live keys, the file backend's root
//!   holds nothing but its own files (no journal or temp file survives a reopen), and SQLite's
//!   `PRAGMA integrity_check` says `ok`;
//! - PostgreSQL (`--backend postgres`, feature `postgres`, the server at `POSTGRES_URL`,
//!   default `postgres://postgres@127.0.0.1:5432/test`): the child's killed connection is
//!   rolled back by the server, so a transaction is there whole or not at all, and the
//!   namespace's counters equal a recount of its records. Before checking, the parent waits
//!   until the server has finished the dead child's session (`pg_stat_activity`), so a
//!   `COMMIT` the server received before the kill is counted as applied, never as lost. Each
//!   chain uses a namespace of its own, removed when the chain ends.
//!
//! Trials run in chains on one directory (a new child continues on the store the previous
//! one was killed over, so recovery after recovery is exercised), a fresh directory every few
//! trials. Each backend prints `crash-test <backend> trials=N violations=V`; the exit code is
//! non-zero when any violation was found.
//!
//! ```text
//! cargo run --example crash_test -- --backend all --trials 200
//! cargo run --example crash_test -- --backend file --trials 20 --seed 42 --verbose
//! ```
//!
//! `--backend chains` (features `bevy` and `sqlite`) runs the snapshot-chain mode of
//! `common/chains.rs` instead: autosave chains of a world, on the file and SQLite stores.
//!
//! Options: `--backend file|sqlite|postgres|chains|all` (default all: file and SQLite), `--trials N` per backend (default 50),
//! `--seed S` (default: from the clock; printed so a run can be repeated: the operations and
//! delays repeat, the exact kill point depends on timing), `--max-delay-ms MS` (longest time
//! the child runs, default 1000), `--chain N` (trials per directory, default 5), `--dir PATH`
//! (where stores are made, default the system temp dir; directories of failed trials are
//! kept), `--verbose` (one line per trial), `--sabotage tx|ack` (a self-check of the harness:
//! the child runs transactions as separate writes, or acknowledges before writing; the run
//! must then report violations).

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use bevy_storage::{StorageConfig, Store};

#[cfg(all(feature = "bevy", feature = "sqlite"))]
#[path = "common/chains.rs"]
mod chains;
#[path = "common/workload.rs"]
mod workload;
use workload::{
    CHECK, Codec, Line, NKEYS, Op, Rng, Val, answer_line, arg_value, check_file_root,
    check_listing, describe, expected_val, key_name, parse_line, perform, read_all,
};

/// How long a child may run before it stops by itself (the parent kills it long before).
const CHILD_LIFETIME: Duration = Duration::from_secs(60);

/// How one chain of trials opens its store.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Settings {
    backend: BackendKind,
    codec: Codec,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BackendKind {
    File,
    #[cfg(feature = "sqlite")]
    Sqlite,
    #[cfg(feature = "postgres")]
    Postgres,
}

impl BackendKind {
    fn name(self) -> &'static str {
        match self {
            BackendKind::File => "file",
            #[cfg(feature = "sqlite")]
            BackendKind::Sqlite => "sqlite",
            #[cfg(feature = "postgres")]
            BackendKind::Postgres => "postgres",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        match s {
            "file" => Some(BackendKind::File),
            #[cfg(feature = "sqlite")]
            "sqlite" => Some(BackendKind::Sqlite),
            #[cfg(feature = "postgres")]
            "postgres" => Some(BackendKind::Postgres),
            _ => None,
        }
    }
}

impl Settings {
    fn config(&self, dir: &Path) -> StorageConfig {
        let config = match self.backend {
            BackendKind::File => StorageConfig::file(dir.join("records")),
            #[cfg(feature = "sqlite")]
            BackendKind::Sqlite => StorageConfig::sqlite(dir.join("store.db")),
            #[cfg(feature = "postgres")]
            BackendKind::Postgres => {
                let url = pg::url();
                let sep = if url.contains('?') { '&' } else { '?' };
                StorageConfig::postgres(
                    format!("{url}{sep}application_name={}", pg::session_name(dir)),
                    pg::namespace(dir),
                )
            }
        };
        self.codec.configure(config)
    }

    fn to_args(self) -> Vec<String> {
        let mut args = vec!["--backend".into(), self.backend.name().into()];
        args.extend(self.codec.to_args());
        args
    }
}

// ------------------------------------------------------------------------------------ child

fn run_child(args: &[String]) -> ExitCode {
    let need = |name: &str| arg_value(args, name).unwrap_or_else(|| panic!("child needs {name}"));
    let settings = Settings {
        backend: BackendKind::parse(&need("--backend")).expect("backend"),
        codec: Codec::from_args(args).expect("child needs --compress, --encrypt and --binary"),
    };
    let dir = PathBuf::from(need("--dir"));
    let seed: u64 = need("--seed").parse().expect("seed");
    let mut op: u64 = need("--first-op").parse().expect("first op");
    let sabotage = arg_value(args, "--sabotage").unwrap_or_default();
    let mut rng = Rng::new(seed);
    let store = match Store::open(settings.config(&dir)) {
        Ok(store) => store,
        Err(e) => {
            println!("OPENFAIL {e}");
            return ExitCode::from(2);
        }
    };
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    writeln!(out, "READY")
        .and_then(|()| out.flush())
        .expect("stdout");
    let started = Instant::now();
    while started.elapsed() < CHILD_LIFETIME {
        op += 1;
        let next = match Op::random(&mut rng) {
            // With early acknowledgements the parent cannot tell a refusal apart.
            Op::FailingTx(parts) if sabotage == "ack" => Op::Tx(parts),
            op => op,
        };
        let opts = settings.codec.save_options(&mut rng);
        // One write per line, so a kill never leaves half a line.
        let line = format!("S {op} {}\n", next.to_wire());
        out.write_all(line.as_bytes())
            .and_then(|()| out.flush())
            .expect("stdout");
        if sabotage == "ack" {
            // Acknowledge before writing: a kill in between loses an acknowledged write.
            out.write_all(format!("A {op}\n").as_bytes())
                .and_then(|()| out.flush())
                .expect("stdout");
            std::thread::sleep(Duration::from_millis(2));
        }
        let result = match &next {
            Op::Tx(parts) if sabotage == "tx" => {
                // Not atomic: every part on its own, the check key last.
                for &(k, save) in parts {
                    if save {
                        store
                            .save(&key_name(k), &expected_val(op, k, true), &opts)
                            .expect("sabotaged save");
                    } else {
                        store.delete(&key_name(k)).expect("sabotaged delete");
                    }
                }
                store
                    .save(&key_name(CHECK), &expected_val(op, CHECK, true), &opts)
                    .map(drop)
            }
            next => perform(&store, op, next, &opts),
        };
        let line = match result {
            Ok(()) if sabotage == "ack" => continue,
            result => answer_line(op, &next, result),
        };
        out.write_all(format!("{line}\n").as_bytes())
            .and_then(|()| out.flush())
            .expect("stdout");
    }
    ExitCode::from(3)
}

// ----------------------------------------------------------------------------------- parent

struct Options {
    backends: Vec<BackendKind>,
    trials: usize,
    seed: u64,
    max_delay_ms: u64,
    chain: usize,
    dir: PathBuf,
    verbose: bool,
    sabotage: Option<String>,
}

fn parse_options(args: &[String]) -> Result<Options, String> {
    let mut o = Options {
        backends: vec![
            BackendKind::File,
            #[cfg(feature = "sqlite")]
            BackendKind::Sqlite,
        ],
        trials: 50,
        seed: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1),
        max_delay_ms: 1000,
        chain: 5,
        dir: std::env::temp_dir(),
        verbose: false,
        sabotage: None,
    };
    let mut i = 0;
    while i < args.len() {
        let value = |i: usize| {
            args.get(i + 1)
                .cloned()
                .ok_or_else(|| format!("{} needs a value", args[i]))
        };
        let number = |i: usize| -> Result<u64, String> {
            value(i)?
                .parse()
                .map_err(|_| format!("{} needs a number", args[i]))
        };
        match args[i].as_str() {
            "--backend" => {
                let v = value(i)?;
                o.backends = if v == "all" {
                    vec![
                        BackendKind::File,
                        #[cfg(feature = "sqlite")]
                        BackendKind::Sqlite,
                    ]
                } else {
                    vec![BackendKind::parse(&v).ok_or_else(|| {
                        format!(
                            "unknown backend {v:?}: use file, sqlite (feature `sqlite`), \
                             postgres (feature `postgres`) or all"
                        )
                    })?]
                };
                i += 1;
            }
            "--trials" => {
                o.trials = number(i)? as usize;
                i += 1;
            }
            "--seed" => {
                o.seed = number(i)?;
                i += 1;
            }
            "--max-delay-ms" => {
                o.max_delay_ms = number(i)?.max(1);
                i += 1;
            }
            "--chain" => {
                o.chain = (number(i)? as usize).max(1);
                i += 1;
            }
            "--dir" => {
                o.dir = PathBuf::from(value(i)?);
                i += 1;
            }
            "--verbose" => o.verbose = true,
            "--sabotage" => {
                let v = value(i)?;
                if v != "tx" && v != "ack" {
                    return Err(format!("--sabotage takes tx or ack, not {v:?}"));
                }
                o.sabotage = Some(v);
                i += 1;
            }
            "-h" | "--help" => {
                return Err(
                    "usage: crash_test [--backend file|sqlite|postgres|all] [--trials N] [--seed S] \
                     [--max-delay-ms MS] [--chain N] [--dir PATH] [--verbose] [--sabotage tx|ack]"
                        .into(),
                );
            }
            other => return Err(format!("unknown argument {other:?} (try --help)")),
        }
        i += 1;
    }
    Ok(o)
}

#[derive(Default)]
struct Totals {
    trials: usize,
    violations: usize,
    acked: u64,
    in_flight: u64,
    in_flight_applied: u64,
    in_flight_tx: u64,
    in_flight_tx_applied: u64,
}

/// A chain of trials over one directory, and what its store must hold.
struct Chain {
    dir: PathBuf,
    settings: Settings,
    model: Vec<Option<Val>>,
    next_op: u64,
    trials_left: usize,
}

fn spawn_child(chain: &Chain, seed: u64, sabotage: Option<&str>) -> std::io::Result<Child> {
    let exe = std::env::current_exe()?;
    let mut command = Command::new(exe);
    if let Some(s) = sabotage {
        command.args(["--sabotage", s]);
    }
    command
        .arg("--child")
        .args(chain.settings.to_args())
        .arg("--dir")
        .arg(&chain.dir)
        .arg("--seed")
        .arg(seed.to_string())
        .arg("--first-op")
        .arg(chain.next_op.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
}

/// Runs one trial: child, kill, check. Returns the violations found (empty: all good).
fn trial(chain: &mut Chain, rng: &mut Rng, options: &Options, totals: &mut Totals) -> Vec<String> {
    let max_delay_ms = options.max_delay_ms;
    let mut violations = Vec::new();
    let mut child = match spawn_child(chain, rng.next(), options.sabotage.as_deref()) {
        Ok(child) => child,
        Err(e) => return vec![format!("could not start the child: {e}")],
    };
    let stdout = child.stdout.take().expect("piped stdout");
    let mut stderr = child.stderr.take().expect("piped stderr");
    // Drain both pipes continuously so the child never blocks on a full pipe.
    let (tx, rx) = mpsc::channel::<String>();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });

    let mut lines = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut ready = false;
    while !ready {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => {
                ready = line == "READY";
                lines.push(line);
            }
            Err(_) => break,
        }
    }
    if ready {
        // A random moment: often right away, usually within tens of milliseconds, sometimes later.
        let delay_ms = match rng.below(10) {
            0 | 1 => rng.below(5.min(max_delay_ms)),
            2..=5 => rng.below(100.min(max_delay_ms)),
            _ => rng.below(max_delay_ms),
        };
        std::thread::sleep(Duration::from_micros(delay_ms * 1000 + rng.below(1000)));
    }
    let exited_early = child.try_wait().ok().flatten();
    let _ = child.kill(); // SIGKILL on Unix
    let status = child.wait();
    violations.extend(settle_after_kill(chain));
    let _ = reader.join();
    lines.extend(rx.try_iter());
    let child_stderr = err_reader.join().unwrap_or_default();
    if let Some(status) = exited_early {
        violations.push(format!(
            "the child exited by itself ({status}) before it was killed; stderr: {}",
            child_stderr.trim()
        ));
    } else if let Err(e) = status {
        violations.push(format!("waiting for the child: {e}"));
    }
    if !ready {
        violations.push(format!(
            "the child never became ready; output: {lines:?}; stderr: {}",
            child_stderr.trim()
        ));
        return violations;
    }

    // Replay what the child reported onto the model.
    let mut in_flight: Option<(u64, Op)> = None;
    for line in &lines {
        match parse_line(line) {
            Line::Ready => {}
            Line::OpenFailed(msg) => violations.push(format!("child could not open: {msg}")),
            Line::Sent(n, op) => {
                if let Some((prev, _)) = &in_flight {
                    violations.push(format!("op {n} sent while op {prev} was unanswered"));
                }
                chain.next_op = chain.next_op.max(n);
                in_flight = Some((n, op));
            }
            Line::Acked(n) | Line::Refused(n) => match in_flight.take() {
                Some((sent, op)) if sent == n => {
                    let refused = matches!(parse_line(line), Line::Refused(_));
                    let mut after = chain.model.clone();
                    op.apply(n, &mut after);
                    if refused != (after == chain.model && matches!(op, Op::FailingTx(_))) {
                        violations.push(format!(
                            "op {n} ({op:?}) was {} but the model says it {}",
                            if refused { "refused" } else { "acknowledged" },
                            if refused { "applies" } else { "is refused" }
                        ));
                    }
                    chain.model = after;
                    totals.acked += 1;
                }
                other => violations.push(format!("answer {line:?} does not match {other:?}")),
            },
            Line::Failed(n, msg) => {
                violations.push(format!("op {n} failed in the child: {msg}"));
                in_flight = None;
            }
            Line::Garbage(l) => violations.push(format!("unreadable line from the child: {l:?}")),
        }
    }
    if !violations.is_empty() {
        return violations;
    }

    // Reopen and check.
    let before = chain.model.clone();
    let mut after = chain.model.clone();
    if let Some((n, op)) = &in_flight {
        op.apply(*n, &mut after);
    }
    let store = match Store::open(chain.settings.config(&chain.dir)) {
        Ok(store) => store,
        Err(e) => return vec![format!("the store does not reopen after the kill: {e}")],
    };
    let (observed, decode_failures) = read_all(&store);
    violations.extend(decode_failures);
    let mut applied_keys = Vec::new();
    let mut unapplied_keys = Vec::new();
    for k in 0..=NKEYS {
        let seen = &observed[k];
        if *seen == before[k] && *seen == after[k] {
            continue;
        }
        if *seen == after[k] {
            applied_keys.push(k);
        } else if *seen == before[k] {
            unapplied_keys.push(k);
        } else {
            violations.push(format!(
                "key {k} ({}) holds {} but the last acknowledged state is {} and the operation in flight ({in_flight:?}) would make it {}",
                key_name(k).chars().take(40).collect::<String>(),
                describe(seen),
                describe(&before[k]),
                describe(&after[k]),
            ));
        }
    }
    if !applied_keys.is_empty() && !unapplied_keys.is_empty() {
        violations.push(format!(
            "half-applied operation {in_flight:?}: keys {applied_keys:?} show it, keys {unapplied_keys:?} do not"
        ));
    }
    violations.extend(check_listing(&store, &observed));
    drop(store);
    violations.extend(check_medium(chain));

    if let Some((_, op)) = &in_flight {
        totals.in_flight += 1;
        let applied = !applied_keys.is_empty();
        totals.in_flight_applied += u64::from(applied);
        if op.is_tx() {
            totals.in_flight_tx += 1;
            totals.in_flight_tx_applied += u64::from(applied);
        }
    }
    chain.model = observed;
    violations
}

fn check_medium(chain: &Chain) -> Vec<String> {
    match chain.settings.backend {
        BackendKind::File => check_file_root(&chain.dir, "records"),
        #[cfg(feature = "sqlite")]
        BackendKind::Sqlite => workload::check_sqlite_integrity(&chain.dir.join("store.db")),
        #[cfg(feature = "postgres")]
        BackendKind::Postgres => pg::check_counters(&chain.dir),
    }
}

/// What a killed child leaves to settle before the parent looks at the store.
fn settle_after_kill(chain: &Chain) -> Vec<String> {
    match chain.settings.backend {
        #[cfg(feature = "postgres")]
        BackendKind::Postgres => pg::wait_for_sessions_to_end(&chain.dir),
        _ => Vec::new(),
    }
}

/// Removes what a finished chain left (its directory; on PostgreSQL its namespace).
fn discard_chain(chain: &Chain) {
    let _ = std::fs::remove_dir_all(&chain.dir);
    #[cfg(feature = "postgres")]
    if chain.settings.backend == BackendKind::Postgres {
        pg::drop_namespace(&chain.dir);
    }
}

/// The PostgreSQL side: each chain's namespace and the sessions of its children.
#[cfg(feature = "postgres")]
mod pg {
    use std::path::Path;
    use std::time::{Duration, Instant};

    pub fn url() -> String {
        std::env::var("POSTGRES_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
    }

    /// The chain's namespace: its directory's name, unique per run and chain.
    pub fn namespace(dir: &Path) -> String {
        format!(
            "crash:{}",
            dir.file_name().unwrap_or_default().to_string_lossy()
        )
    }

    /// The `application_name` of the chain's children, to find their sessions (at most 63
    /// bytes, so a hash of the directory).
    pub fn session_name(dir: &Path) -> String {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        dir.hash(&mut h);
        format!("bevy_storage_crash_{:016x}", h.finish())
    }

    fn client() -> Result<postgres::Client, String> {
        postgres::Client::connect(&url(), postgres::NoTls)
            .map_err(|e| format!("connecting to PostgreSQL at {}: {e}", url()))
    }

    /// Waits until the server has ended every session of the chain's (killed) children: a
    /// backend ends only after it finished what it had received, so a transaction is then
    /// committed or rolled back for good.
    pub fn wait_for_sessions_to_end(dir: &Path) -> Vec<String> {
        let mut client = match client() {
            Ok(c) => c,
            Err(e) => return vec![e],
        };
        let name = session_name(dir);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let left: i64 = match client.query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1",
                &[&name],
            ) {
                Ok(row) => row.get(0),
                Err(e) => return vec![format!("reading pg_stat_activity: {e}")],
            };
            if left == 0 {
                return Vec::new();
            }
            if Instant::now() > deadline {
                return vec![format!(
                    "{left} session(s) of the killed child still open on the server after 30 s"
                )];
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// The namespace's counters equal a recount of its records: no write committed the
    /// records without the counters or the other way round.
    pub fn check_counters(dir: &Path) -> Vec<String> {
        let mut client = match client() {
            Ok(c) => c,
            Err(e) => return vec![e],
        };
        let ns = namespace(dir);
        let counted = client.query_opt(
            "SELECT item_count, total_size FROM bevy_storage_namespaces WHERE namespace = $1",
            &[&ns],
        );
        let recount = client.query_one(
            "SELECT count(*), coalesce(sum(size), 0)::bigint FROM bevy_storage_records \
             WHERE namespace = $1",
            &[&ns],
        );
        match (counted, recount) {
            (Ok(Some(c)), Ok(r)) => {
                let (c, r): ((i64, i64), (i64, i64)) = ((c.get(0), c.get(1)), (r.get(0), r.get(1)));
                if c == r {
                    Vec::new()
                } else {
                    vec![format!(
                        "the namespace's counters say {c:?} (records, bytes) but its records \
                         are {r:?}"
                    )]
                }
            }
            (Ok(None), _) => vec![format!("the namespace {ns:?} has no counters")],
            (Err(e), _) | (_, Err(e)) => vec![format!("recounting {ns:?}: {e}")],
        }
    }

    pub fn drop_namespace(dir: &Path) {
        let Ok(mut client) = client() else { return };
        let ns = namespace(dir);
        let _ = client.execute(
            "DELETE FROM bevy_storage_records WHERE namespace = $1",
            &[&ns],
        );
        let _ = client.execute(
            "DELETE FROM bevy_storage_namespaces WHERE namespace = $1",
            &[&ns],
        );
    }
}

fn new_chain(options: &Options, backend: BackendKind, rng: &mut Rng, index: usize) -> Chain {
    let dir = options.dir.join(format!(
        "bevy_storage_crash_{}_{}_{}_{index}",
        std::process::id(),
        backend.name(),
        options.seed
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("creating the trial directory");
    Chain {
        dir,
        settings: Settings {
            backend,
            codec: Codec::random(rng),
        },
        model: vec![None; NKEYS + 1],
        next_op: 0,
        trials_left: options.chain,
    }
}

fn run_backend(options: &Options, backend: BackendKind) -> Totals {
    let mut rng = Rng::new(options.seed ^ (backend as u64).wrapping_mul(0x1234_5678_9abc_def1));
    let mut totals = Totals::default();
    let mut chain_index = 0;
    let mut chain = new_chain(options, backend, &mut rng, chain_index);
    let started = Instant::now();
    let mut kept = Vec::new();
    for t in 1..=options.trials {
        if chain.trials_left == 0 {
            discard_chain(&chain);
            chain_index += 1;
            chain = new_chain(options, backend, &mut rng, chain_index);
        }
        chain.trials_left -= 1;
        let acked_before = totals.acked;
        let violations = trial(&mut chain, &mut rng, options, &mut totals);
        totals.trials += 1;
        if !violations.is_empty() {
            totals.violations += violations.len();
            println!(
                "[{}] trial {t}: {} violation(s) ({:?}); store kept at {}",
                backend.name(),
                violations.len(),
                chain.settings,
                chain.dir.display()
            );
            for v in &violations {
                println!("    {v}");
            }
            // Keep the evidence and start over in a fresh directory.
            kept.push(chain.dir.clone());
            chain_index += 1;
            chain = new_chain(options, backend, &mut rng, chain_index);
        } else if options.verbose {
            println!(
                "[{}] trial {t}: ok, {} ops acknowledged ({:?})",
                backend.name(),
                totals.acked - acked_before,
                chain.settings
            );
        }
        if !options.verbose && (t % 10 == 0 || t == options.trials) {
            println!(
                "[{}] {t}/{} trials, {} violations, {} ops acknowledged, {:.0?}",
                backend.name(),
                options.trials,
                totals.violations,
                totals.acked,
                started.elapsed()
            );
        }
        let _ = std::io::stdout().flush();
    }
    if !kept.contains(&chain.dir) {
        discard_chain(&chain);
    }
    totals
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--child") {
        return run_child(&args);
    }
    #[cfg(all(feature = "bevy", feature = "sqlite"))]
    if args.iter().any(|a| a == "--child-chains") {
        return chains::run_child(&args);
    }
    #[cfg(all(feature = "bevy", feature = "sqlite"))]
    if args
        .windows(2)
        .any(|w| w[0] == "--backend" && w[1] == "chains")
    {
        return run_chains(&args);
    }
    let options = match parse_options(&args) {
        Ok(o) => o,
        Err(msg) => {
            eprintln!("{msg}");
            return ExitCode::from(2);
        }
    };
    println!(
        "crash test: backends {:?}, {} trials each, seed {}, max delay {} ms",
        options
            .backends
            .iter()
            .map(|b| b.name())
            .collect::<Vec<_>>(),
        options.trials,
        options.seed,
        options.max_delay_ms
    );
    let mut any = false;
    let mut summary = Vec::new();
    for &backend in &options.backends {
        let started = Instant::now();
        let t = run_backend(&options, backend);
        any |= t.violations > 0;
        summary.push(format!(
            "crash-test {} trials={} violations={}\n    ({} ops acknowledged; killed with an op in flight {} times, applied {}; a transaction in flight {} times, applied {}; {:.1?})",
            backend.name(),
            t.trials,
            t.violations,
            t.acked,
            t.in_flight,
            t.in_flight_applied,
            t.in_flight_tx,
            t.in_flight_tx_applied,
            started.elapsed()
        ));
    }
    for line in summary {
        println!("{line}");
    }
    if any {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

/// `--backend chains`: autosave chains of a world on the file and SQLite stores (see
/// `common/chains.rs`). Takes `--trials`, `--seed`, `--max-delay-ms`, `--chain`, `--dir`,
/// `--verbose` and `--sabotage ack`.
#[cfg(all(feature = "bevy", feature = "sqlite"))]
fn run_chains(args: &[String]) -> ExitCode {
    let rest: Vec<String> = args
        .iter()
        .map(|a| {
            if a == "chains" {
                "all".to_owned()
            } else {
                a.clone()
            }
        })
        .collect();
    let options = match parse_options(&rest) {
        Ok(o) => o,
        Err(msg) => {
            eprintln!("{msg}");
            return ExitCode::from(2);
        }
    };
    if options.sabotage.as_deref().is_some_and(|s| s != "ack") {
        eprintln!("chains take --sabotage ack only");
        return ExitCode::from(2);
    }
    println!(
        "crash test: snapshot chains, {} trials per store, seed {}, max delay {} ms",
        options.trials, options.seed, options.max_delay_ms
    );
    let mut any = false;
    for which in [chains::ChainStore::File, chains::ChainStore::Sqlite] {
        let started = Instant::now();
        let t = chains::run_trials(
            which,
            &chains::RunOptions {
                trials: options.trials,
                seed: options.seed,
                max_delay_ms: options.max_delay_ms,
                per_dir: options.chain,
                root: &options.dir,
                verbose: options.verbose,
                sabotage: options.sabotage.as_deref(),
            },
        );
        any |= t.violations > 0;
        println!(
            "crash-test {} trials={} violations={}\n    ({} autosaves acknowledged; killed with one in flight {} times, applied {}; {:.1?})",
            which.name(),
            t.trials,
            t.violations,
            t.acked,
            t.in_flight,
            t.in_flight_applied,
            started.elapsed()
        );
    }
    if any {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
