//! The workload shared by the crash test (`examples/crash_test.rs`) and the power-loss harness
//! (`examples/power_loss.rs`): the keys and values a child writes, its random operations and
//! the one-line wire format in which it reports them, and the checks of a reopened store.
//!
//! A child prints `S <n> <op>` before operation `n` starts and, once the store returned,
//! `A <n>` (acknowledged), `F <n>` (a transaction refused with `AlreadyExists`, as the model
//! predicts) or `E <n> <error>`. Every value names the operation that wrote it, so a checker
//! can tell exactly which write it sees; every transaction also writes a check key, so a half
//! applied one shows.
//!
//! Each example uses part of this module, hence the `dead_code` allowance.
#![allow(dead_code)]

use std::collections::BTreeSet;
use std::path::Path;

use bevy_storage::{
    Compression, EncryptionKey, Format, LoadOptions, SaveOptions, StorageConfig, StorageError,
    StorageOperation, Store,
};
use serde::{Deserialize, Serialize};

/// Keys the child writes with single operations and transactions.
pub const NKEYS: usize = 16;
/// Index of the check key: written (only) by every transaction, with its id.
pub const CHECK: usize = NKEYS;
/// The raw key of encrypted runs (not a secret: this is a test).
pub const TEST_KEY: [u8; 32] = [0x5a; 32];

pub fn key_name(i: usize) -> String {
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
pub struct Val {
    pub op: u64,
    pub tx: Option<u64>,
    pub key: String,
    pub pad: String,
}

pub fn expected_val(op: u64, key: usize, tx: bool) -> Val {
    Val {
        op,
        tx: tx.then_some(op),
        key: key_name(key),
        pad: pad(op, key),
    }
}

/// Deterministic padding: mostly small, sometimes 64 KiB; half compressible text, half hex.
pub fn pad(op: u64, key: usize) -> String {
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
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// One operation of the child.
#[derive(Debug, Clone, PartialEq)]
pub enum Op {
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
    pub fn random(rng: &mut Rng) -> Self {
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

    pub fn to_wire(&self) -> String {
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

    pub fn from_wire(kind: &str, rest: &str) -> Option<Self> {
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
    pub fn apply(&self, op: u64, model: &mut [Option<Val>]) {
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

    pub fn is_tx(&self) -> bool {
        matches!(self, Op::Tx(_) | Op::FailingTx(_))
    }
}

/// What the child printed.
#[derive(Debug)]
pub enum Line {
    Ready,
    OpenFailed(String),
    Sent(u64, Op),
    Acked(u64),
    Refused(u64),
    Failed(u64, String),
    Garbage(String),
}

pub fn parse_line(line: &str) -> Line {
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

pub fn describe(v: &Option<Val>) -> String {
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

/// How a store encodes its records: chosen at random per run, passed to a child as arguments.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Codec {
    pub compress: bool,
    pub encrypt: bool,
    pub binary: bool,
}

impl Codec {
    /// A random choice: compression and encryption half the time (where their features are
    /// on), the binary format a third.
    pub fn random(rng: &mut Rng) -> Self {
        Codec {
            compress: rng.below(2) == 0 && cfg!(feature = "compression"),
            encrypt: rng.below(2) == 0 && cfg!(feature = "encryption"),
            binary: rng.below(3) == 0,
        }
    }

    /// Applies the choice to a store's configuration (no quota: the workload is small).
    pub fn configure(&self, config: StorageConfig) -> StorageConfig {
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

    /// Random save options for one operation: compressed or not, encrypted or not.
    pub fn save_options(&self, rng: &mut Rng) -> SaveOptions {
        let mut opts =
            SaveOptions::new().compression(Compression::from(self.compress && rng.below(10) != 0));
        if self.encrypt {
            opts = opts.encrypt(rng.below(3) != 0);
        }
        opts
    }

    /// The choice as child arguments (`--compress 0|1 --encrypt 0|1 --binary 0|1`).
    pub fn to_args(self) -> Vec<String> {
        vec![
            "--compress".into(),
            u8::from(self.compress).to_string(),
            "--encrypt".into(),
            u8::from(self.encrypt).to_string(),
            "--binary".into(),
            u8::from(self.binary).to_string(),
        ]
    }

    /// Reads [`Codec::to_args`] back; `None` if an argument is missing.
    pub fn from_args(args: &[String]) -> Option<Self> {
        let flag = |name: &str| arg_value(args, name).map(|v| v == "1");
        Some(Codec {
            compress: flag("--compress")?,
            encrypt: flag("--encrypt")?,
            binary: flag("--binary")?,
        })
    }
}

/// The value following `name` in `args`.
pub fn arg_value(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

/// Runs operation `n` against the store, as one atomic store call.
pub fn perform(store: &Store, n: u64, op: &Op, opts: &SaveOptions) -> Result<(), StorageError> {
    match op {
        Op::Save(k) => store
            .save(&key_name(*k), &expected_val(n, *k, false), opts)
            .map(drop),
        Op::Delete(k) => store.delete(&key_name(*k)).map(drop),
        Op::Tx(parts) | Op::FailingTx(parts) => {
            let mut ops: Vec<StorageOperation> = parts
                .iter()
                .map(|&(k, save)| {
                    if save {
                        StorageOperation::save_with(
                            key_name(k),
                            expected_val(n, k, true),
                            opts.clone(),
                        )
                    } else {
                        StorageOperation::delete(key_name(k))
                    }
                })
                .collect();
            let check_opts = opts.clone().overwrite(!matches!(op, Op::FailingTx(_)));
            ops.push(StorageOperation::save_with(
                key_name(CHECK),
                expected_val(n, CHECK, true),
                check_opts,
            ));
            store.transaction(ops)
        }
    }
}

/// The answer line (without its newline) for operation `n`'s result.
pub fn answer_line(n: u64, op: &Op, result: Result<(), StorageError>) -> String {
    match result {
        Ok(()) => format!("A {n}"),
        Err(StorageError::AlreadyExists { .. }) if matches!(op, Op::FailingTx(_)) => {
            format!("F {n}")
        }
        Err(e) => format!("E {n} {e}"),
    }
}

/// Every key's value in a reopened store, and a violation for each record that does not
/// decode.
pub fn read_all(store: &Store) -> (Vec<Option<Val>>, Vec<String>) {
    let mut violations = Vec::new();
    let mut observed = Vec::with_capacity(NKEYS + 1);
    for k in 0..=NKEYS {
        match store.load::<Val>(&key_name(k), &LoadOptions::default()) {
            Ok(v) => observed.push(v),
            Err(e) => {
                violations.push(format!("key {k} does not decode: {e}"));
                observed.push(None);
            }
        }
    }
    (observed, violations)
}

/// Checks that `list_keys` shows exactly the keys that hold a value and that the store is
/// healthy.
pub fn check_listing(store: &Store, observed: &[Option<Val>]) -> Vec<String> {
    let mut violations = Vec::new();
    match store.list_keys("") {
        Ok(keys) => {
            let mut expected: Vec<String> = (0..=NKEYS)
                .filter(|k| observed[*k].is_some())
                .map(key_name)
                .collect();
            expected.sort();
            if keys != expected {
                violations.push(format!(
                    "list_keys shows {} keys, the records say {}: {keys:?}",
                    keys.len(),
                    expected.len()
                ));
            }
        }
        Err(e) => violations.push(format!("list_keys fails: {e}")),
    }
    let stats = store.get_stats();
    if !stats.is_healthy {
        violations.push(format!(
            "store unhealthy after reopen: {:?}",
            stats.last_error
        ));
    }
    violations
}

/// The file backend's root after a reopen holds nothing but its lock and records (no journal
/// or temp file survives an open), and nothing appeared beside it in `parent`.
pub fn check_file_root(parent: &Path, root_name: &str) -> Vec<String> {
    let mut violations = Vec::new();
    match std::fs::read_dir(parent.join(root_name)) {
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
    if let Ok(entries) = std::fs::read_dir(parent) {
        for entry in entries.flatten() {
            if entry.file_name() != root_name {
                violations.push(format!(
                    "an entry {:?} appeared beside the file root",
                    entry.file_name()
                ));
            }
        }
    }
    violations
}

/// SQLite's `PRAGMA integrity_check` of the database at `path`: a violation unless `ok`.
#[cfg(feature = "sqlite")]
pub fn check_sqlite_integrity(path: &Path) -> Vec<String> {
    let check = rusqlite::Connection::open(path)
        .and_then(|c| c.query_row("PRAGMA integrity_check", [], |r| r.get::<_, String>(0)));
    match check {
        Ok(s) if s == "ok" => Vec::new(),
        Ok(s) => vec![format!("SQLite integrity_check: {s}")],
        Err(e) => vec![format!("SQLite integrity_check failed to run: {e}")],
    }
}
