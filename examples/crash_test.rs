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
//!   `PRAGMA integrity_check` says `ok`.
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
//! Options: `--backend file|sqlite|all` (default all), `--trials N` per backend (default 50),
//! `--seed S` (default: from the clock; printed so a run can be repeated: the operations and
//! delays repeat, the exact kill point depends on timing), `--max-delay-ms MS` (longest time
//! the child runs, default 1000), `--chain N` (trials per directory, default 5), `--dir PATH`
//! (where stores are made, default the system temp dir; directories of failed trials are
//! kept), `--verbose` (one line per trial), `--sabotage tx|ack` (a self-check of the harness:
//! the child runs transactions as separate writes, or acknowledges before writing; the run
//! must then report violations).

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use bevy_storage::{
    Compression, EncryptionKey, Format, LoadOptions, SaveOptions, StorageConfig, StorageError,
    StorageOperation, Store,
};
use serde::{Deserialize, Serialize};

/// Keys the child writes with single operations and transactions.
const NKEYS: usize = 16;
/// Index of the check key: written (only) by every transaction, with its id.
const CHECK: usize = NKEYS;
/// The raw key of encrypted runs (not a secret: this is a test).
const TEST_KEY: [u8; 32] = [0x5a; 32];
/// How long a child may run before it stops by itself (the parent kills it long before).
const CHILD_LIFETIME: Duration = Duration::from_secs(60);

fn key_name(i: usize) -> String {
    match i {
        0..=11 => format!("k{i}"),
        // Uppercase and non-ASCII bytes are escaped in file names.
        12 => "Player:Ünïcode/ключ".to_owned(),
        // Long keys get hashed file names.
        13 => format!("long:{}", "x".repeat(300)),
        14 => format!("long:{}", "y".repeat(300)),
        15 => format!("Long:{}:end", "Z".repeat(150)),
        CHECK => "tx:check".to_owned(),
        _ => unreachable!("key index {i}"),
    }
}

/// What every record holds: the operation that wrote it, the transaction (if any), its own key
/// and a deterministic padding, so the parent can tell exactly which write it sees.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
struct Val {
    op: u64,
    tx: Option<u64>,
    key: String,
    pad: String,
}

fn expected_val(op: u64, key: usize, tx: bool) -> Val {
    Val {
        op,
        tx: tx.then_some(op),
        key: key_name(key),
        pad: pad(op, key),
    }
}

/// Deterministic padding: mostly small, sometimes 64 KiB; half compressible text, half hex.
fn pad(op: u64, key: usize) -> String {
    let mut rng = Rng::new(op.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ key as u64);
    let len = if rng.below(20) == 0 {
        64 * 1024
    } else {
        rng.below(1500) as usize
    };
    let mut s = String::with_capacity(len + 16);
    if rng.below(2) == 0 {
        while s.len() < len {
            s.push_str(&format!("op{op}-key{key}-"));
        }
    } else {
        while s.len() < len {
            s.push_str(&format!("{:016x}", rng.next()));
        }
    }
    s.truncate(len);
    s
}

/// SplitMix64: small, seedable, good enough for choosing operations.
#[derive(Clone)]
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Self(seed)
    }
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// One operation of the child.
#[derive(Debug, Clone, PartialEq)]
enum Op {
    Save(usize),
    Delete(usize),
    /// A transaction: `(key, save?)` for each part, then a save of the check key. All saves
    /// carry the operation number as their transaction id.
    Tx(Vec<(usize, bool)>),
    /// The same, but the check key is saved with `overwrite(false)`: when it exists the whole
    /// transaction must fail with `AlreadyExists` and change nothing.
    FailingTx(Vec<(usize, bool)>),
}

impl Op {
    fn random(rng: &mut Rng) -> Self {
        match rng.below(10) {
            0..=3 => Op::Save(rng.below(NKEYS as u64) as usize),
            4 => Op::Delete(rng.below(NKEYS as u64) as usize),
            kind => {
                let n = 2 + rng.below(4) as usize;
                let mut keys = BTreeSet::new();
                while keys.len() < n {
                    keys.insert(rng.below(NKEYS as u64) as usize);
                }
                let parts = keys.into_iter().map(|k| (k, rng.below(5) != 0)).collect();
                if kind == 9 {
                    Op::FailingTx(parts)
                } else {
                    Op::Tx(parts)
                }
            }
        }
    }

    fn to_wire(&self) -> String {
        let parts = |p: &[(usize, bool)]| {
            p.iter()
                .map(|(k, save)| format!("{}{k}", if *save { 's' } else { 'd' }))
                .collect::<Vec<_>>()
                .join(",")
        };
        match self {
            Op::Save(k) => format!("s {k}"),
            Op::Delete(k) => format!("d {k}"),
            Op::Tx(p) => format!("t {}", parts(p)),
            Op::FailingTx(p) => format!("f {}", parts(p)),
        }
    }

    fn from_wire(kind: &str, rest: &str) -> Option<Self> {
        let parts = || -> Option<Vec<(usize, bool)>> {
            rest.split(',')
                .map(|p| {
                    let (save, k) = match p.as_bytes().first()? {
                        b's' => (true, &p[1..]),
                        b'd' => (false, &p[1..]),
                        _ => return None,
                    };
                    let k: usize = k.parse().ok()?;
                    (k < NKEYS).then_some((k, save))
                })
                .collect()
        };
        let key = || rest.parse().ok().filter(|k| *k < NKEYS);
        Some(match kind {
            "s" => Op::Save(key()?),
            "d" => Op::Delete(key()?),
            "t" => Op::Tx(parts()?),
            "f" => Op::FailingTx(parts()?),
            _ => return None,
        })
    }

    /// Applies the operation to the model (what the store must show after it succeeded).
    fn apply(&self, op: u64, model: &mut [Option<Val>]) {
        match self {
            Op::Save(k) => model[*k] = Some(expected_val(op, *k, false)),
            Op::Delete(k) => model[*k] = None,
            Op::Tx(parts) | Op::FailingTx(parts) => {
                if matches!(self, Op::FailingTx(_)) && model[CHECK].is_some() {
                    return; // refused: the check key exists
                }
                for (k, save) in parts {
                    model[*k] = save.then(|| expected_val(op, *k, true));
                }
                model[CHECK] = Some(expected_val(op, CHECK, true));
            }
        }
    }

    fn is_tx(&self) -> bool {
        matches!(self, Op::Tx(_) | Op::FailingTx(_))
    }
}

/// How one chain of trials opens its store.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Settings {
    backend: BackendKind,
    compress: bool,
    encrypt: bool,
    binary: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BackendKind {
    File,
    #[cfg(feature = "sqlite")]
    Sqlite,
}

impl BackendKind {
    fn name(self) -> &'static str {
        match self {
            BackendKind::File => "file",
            #[cfg(feature = "sqlite")]
            BackendKind::Sqlite => "sqlite",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        match s {
            "file" => Some(BackendKind::File),
            #[cfg(feature = "sqlite")]
            "sqlite" => Some(BackendKind::Sqlite),
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
        };
        let mut config = config
            .max_size(None)
            .compression(Compression::from(self.compress))
            .format(if self.binary {
                Format::Binary
            } else {
                Format::Ron
            });
        if self.encrypt {
            config = config.encryption_key(EncryptionKey::from_bytes(TEST_KEY));
        }
        config
    }

    fn to_args(self) -> Vec<String> {
        vec![
            "--backend".into(),
            self.backend.name().into(),
            "--compress".into(),
            u8::from(self.compress).to_string(),
            "--encrypt".into(),
            u8::from(self.encrypt).to_string(),
            "--binary".into(),
            u8::from(self.binary).to_string(),
        ]
    }
}

// ------------------------------------------------------------------------------------ child

fn arg_value(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn run_child(args: &[String]) -> ExitCode {
    let need = |name: &str| arg_value(args, name).unwrap_or_else(|| panic!("child needs {name}"));
    let flag = |name: &str| need(name) == "1";
    let settings = Settings {
        backend: BackendKind::parse(&need("--backend")).expect("backend"),
        compress: flag("--compress"),
        encrypt: flag("--encrypt"),
        binary: flag("--binary"),
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
        let mut opts = SaveOptions::new()
            .compression(Compression::from(settings.compress && rng.below(10) != 0));
        if settings.encrypt {
            opts = opts.encrypt(rng.below(3) != 0);
        }
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
                store.save(&key_name(CHECK), &expected_val(op, CHECK, true), &opts)
            }
            Op::Save(k) => store.save(&key_name(*k), &expected_val(op, *k, false), &opts),
            Op::Delete(k) => store.delete(&key_name(*k)).map(drop),
            Op::Tx(parts) | Op::FailingTx(parts) => {
                let mut ops: Vec<StorageOperation> = parts
                    .iter()
                    .map(|&(k, save)| {
                        if save {
                            StorageOperation::save_with(
                                key_name(k),
                                expected_val(op, k, true),
                                opts.clone(),
                            )
                        } else {
                            StorageOperation::delete(key_name(k))
                        }
                    })
                    .collect();
                let check_opts = opts.clone().overwrite(!matches!(next, Op::FailingTx(_)));
                ops.push(StorageOperation::save_with(
                    key_name(CHECK),
                    expected_val(op, CHECK, true),
                    check_opts,
                ));
                store.transaction(ops)
            }
        };
        let line = match result {
            Ok(()) if sabotage == "ack" => continue,
            Ok(()) => format!("A {op}"),
            Err(StorageError::AlreadyExists { .. }) if matches!(next, Op::FailingTx(_)) => {
                format!("F {op}")
            }
            Err(e) => format!("E {op} {e}"),
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
                        format!("unknown backend {v:?}: use file, sqlite (feature `sqlite`) or all")
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
                    "usage: crash_test [--backend file|sqlite|all] [--trials N] [--seed S] \
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

/// What the child printed.
#[derive(Debug)]
enum Line {
    Ready,
    OpenFailed(String),
    Sent(u64, Op),
    Acked(u64),
    Refused(u64),
    Failed(u64, String),
    Garbage(String),
}

fn parse_line(line: &str) -> Line {
    let mut it = line.splitn(3, ' ');
    let tag = it.next().unwrap_or("");
    let n = it.next().and_then(|n| n.parse::<u64>().ok());
    let rest = it.next().unwrap_or("");
    match (tag, n) {
        ("READY", _) => Line::Ready,
        ("OPENFAIL", _) => Line::OpenFailed(line.to_owned()),
        ("S", Some(n)) => {
            let (kind, args) = rest.split_once(' ').unwrap_or((rest, ""));
            match Op::from_wire(kind, args) {
                Some(op) => Line::Sent(n, op),
                None => Line::Garbage(line.to_owned()),
            }
        }
        ("A", Some(n)) => Line::Acked(n),
        ("F", Some(n)) => Line::Refused(n),
        ("E", Some(n)) => Line::Failed(n, rest.to_owned()),
        _ => Line::Garbage(line.to_owned()),
    }
}

/// Totals of one backend's run.
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
    let mut observed: Vec<Option<Val>> = Vec::with_capacity(NKEYS + 1);
    for k in 0..=NKEYS {
        match store.load::<Val>(&key_name(k), &LoadOptions::default()) {
            Ok(v) => observed.push(v),
            Err(e) => {
                violations.push(format!("key {k} does not decode after the kill: {e}"));
                observed.push(None);
            }
        }
    }
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
    match store.list_keys("") {
        Ok(keys) => {
            let expected: Vec<String> = {
                let mut v: Vec<String> = (0..=NKEYS)
                    .filter(|k| observed[*k].is_some())
                    .map(key_name)
                    .collect();
                v.sort();
                v
            };
            if keys != expected {
                violations.push(format!(
                    "list_keys shows {} keys, the records say {}: {keys:?}",
                    keys.len(),
                    expected.len()
                ));
            }
        }
        Err(e) => violations.push(format!("list_keys fails after the kill: {e}")),
    }
    let stats = store.get_stats();
    if !stats.is_healthy {
        violations.push(format!(
            "store unhealthy after reopen: {:?}",
            stats.last_error
        ));
    }
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

fn describe(v: &Option<Val>) -> String {
    match v {
        None => "nothing".into(),
        Some(v) => format!(
            "op {} (tx {:?}, {} bytes of padding)",
            v.op,
            v.tx,
            v.pad.len()
        ),
    }
}

/// Backend-specific checks of what is on disk after a reopen.
fn check_medium(chain: &Chain) -> Vec<String> {
    let mut violations = Vec::new();
    match chain.settings.backend {
        BackendKind::File => {
            let root = chain.dir.join("records");
            match std::fs::read_dir(&root) {
                Ok(entries) => {
                    for entry in entries.flatten() {
                        let name = entry.file_name().to_string_lossy().into_owned();
                        let ok = name == ".lock"
                            || ((name.starts_with("k-") || name.starts_with("l-"))
                                && entry.file_type().is_ok_and(|t| t.is_file()));
                        if !ok {
                            violations.push(format!(
                                "the file root holds {name:?} after a reopen (journal, temp file or stray entry)"
                            ));
                        }
                    }
                }
                Err(e) => violations.push(format!("cannot list the file root: {e}")),
            }
            // Nothing but the root itself beside it.
            if let Ok(entries) = std::fs::read_dir(&chain.dir) {
                for entry in entries.flatten() {
                    if entry.file_name() != "records" {
                        violations.push(format!(
                            "an entry {:?} appeared beside the file root",
                            entry.file_name()
                        ));
                    }
                }
            }
        }
        #[cfg(feature = "sqlite")]
        BackendKind::Sqlite => {
            let check = rusqlite::Connection::open(chain.dir.join("store.db"))
                .and_then(|c| c.query_row("PRAGMA integrity_check", [], |r| r.get::<_, String>(0)));
            match check {
                Ok(s) if s == "ok" => {}
                Ok(s) => violations.push(format!("SQLite integrity_check: {s}")),
                Err(e) => violations.push(format!("SQLite integrity_check failed to run: {e}")),
            }
        }
    }
    violations
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
            compress: rng.below(2) == 0,
            encrypt: rng.below(2) == 0,
            binary: rng.below(3) == 0,
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
            let _ = std::fs::remove_dir_all(&chain.dir);
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
        let _ = std::fs::remove_dir_all(&chain.dir);
    }
    totals
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
