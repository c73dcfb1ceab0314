//! The file-system model: what a power cut may leave on disk, from the recorded calls.
//!
//! The model replays the calls on a tree of nodes (files and directories, by inode, so a file
//! keeps its data across renames and open descriptors follow it), starting from the directory
//! as it was on disk before the traced child started (taken as durable). Each node keeps two
//! versions: what a reader sees now (`data`, `entries`) and what is durable (`synced`,
//! `synced_entries`), plus the operations since its last barrier, in order (`pending`).
//!
//! The rules (POSIX promises no more; real file systems often keep more, never less):
//!
//! - `fsync`/`fdatasync` of a file makes its data and size durable: `synced = data`. It does
//!   **not** make the file's name durable.
//! - `fsync` of a directory makes every entry change in it durable (creates, renames in or
//!   out, unlinks, `mkdir`s): `synced_entries = entries`.
//! - `syncfs` makes everything durable: every file's data and every directory's entries (the
//!   traced directory is one file system).
//! - `sync_file_range`, `close` and everything else are no barrier.
//! - A crash keeps what is durable plus **any subset** of the pending operations, applied in
//!   their original order. A rename is one atomic entry change (the target names the old file
//!   or the new one, never nothing); a rename between two directories is an unlink in one and
//!   a link in the other, each durable with its own directory. A kept write may be **torn**:
//!   only some of its 512-byte sectors (aligned to file offsets) reach the disk, in any
//!   combination; a write past the end that is dropped or torn leaves a hole of zeros.
//! - Nothing written through memory maps is seen (SQLite's `-shm` file is shared memory,
//!   rebuilt from the WAL by the next open): every file whose name ends in `-shm` is left out
//!   of every crash state.
//!
//! A crash state is chosen by a [`Variant`]: everything pending kept (the state a killed
//! process leaves), nothing kept (only what the barriers promise), entry changes without data
//! or data without entry changes (the reorderings of delayed allocation), a random prefix of
//! the pending operations in their global order (an ordered journal) with the next one torn,
//! or a random subset with random tears.

use std::collections::{BTreeMap, HashMap};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::path::Path;

use super::trace::{Arg, Call};
use super::workload::Rng;

/// The sector size of tears.
const SECTOR: u64 = 512;

type Ino = usize;

#[derive(Debug, Clone)]
enum DataOp {
    Write { off: u64, data: Vec<u8> },
    Truncate(u64),
}

#[derive(Debug, Clone)]
enum NameOp {
    Link { name: String, ino: Ino },
    Unlink { name: String },
    Rename { from: String, to: String, ino: Ino },
}

#[derive(Debug, Clone, Default)]
struct Node {
    dir: bool,
    data: Vec<u8>,
    synced: Vec<u8>,
    pending: Vec<(usize, DataOp)>,
    entries: BTreeMap<String, Ino>,
    synced_entries: BTreeMap<String, Ino>,
    name_pending: Vec<(usize, NameOp)>,
}

#[derive(Debug, Clone)]
struct Desc {
    node: Option<Ino>,
    path: String,
    pos: u64,
    append: bool,
}

/// Which of the pending operations a crash state keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Variant {
    /// Every pending operation (what a killed process leaves).
    All,
    /// None: only what the barriers made durable.
    Nothing,
    /// Every entry change, no pending data.
    NamesOnly,
    /// Every pending data write, no entry change.
    DataOnly,
    /// A random prefix of the pending operations in global order, the next one torn.
    Prefix(u64),
    /// A random subset, kept writes torn at random.
    Subset(u64),
}

/// One crash state: every path under the root (relative, `/`-separated) and, for files, its
/// bytes (`None` for a directory).
pub type State = BTreeMap<String, Option<Vec<u8>>>;

/// A hash of a state, to count distinct states.
pub fn state_hash(state: &State) -> u64 {
    let mut h = DefaultHasher::new();
    state.hash(&mut h);
    h.finish()
}

/// Writes a state under `dir` (which must not exist yet).
pub fn materialize(state: &State, dir: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    for (path, content) in state {
        let full = dir.join(path);
        match content {
            None => std::fs::create_dir_all(&full)?,
            Some(bytes) => {
                if let Some(parent) = full.parent() {
                    std::fs::create_dir_all(parent)?;
                }
                std::fs::write(&full, bytes)?;
            }
        }
    }
    Ok(())
}

/// The model of one traced run.
#[derive(Clone)]
pub struct Model {
    root: String,
    cwd: String,
    nodes: Vec<Node>,
    fds: HashMap<i64, usize>,
    descs: Vec<Desc>,
    stdout: Vec<u8>,
    /// Lines the child wrote to stdout, with the index of the call that completed each.
    pub lines: Vec<(usize, String)>,
    /// Indices of the calls that changed or synced something under the root.
    pub relevant: Vec<usize>,
}

impl Model {
    /// A model of the directory `root` as it is on disk now (every byte taken as durable);
    /// `cwd` is the traced child's working directory.
    pub fn from_disk(root: &Path, cwd: &Path) -> std::io::Result<Self> {
        let mut model = Model {
            root: root.to_string_lossy().trim_end_matches('/').to_owned(),
            cwd: cwd.to_string_lossy().into_owned(),
            nodes: vec![Node {
                dir: true,
                ..Node::default()
            }],
            fds: HashMap::new(),
            descs: Vec::new(),
            stdout: Vec::new(),
            lines: Vec::new(),
            relevant: Vec::new(),
        };
        model.load(root, 0)?;
        Ok(model)
    }

    fn load(&mut self, path: &Path, ino: Ino) -> std::io::Result<()> {
        let mut entries: Vec<_> = std::fs::read_dir(path)?.collect::<Result<_, _>>()?;
        entries.sort_by_key(|e| e.file_name());
        for entry in entries {
            let name = entry.file_name().to_string_lossy().into_owned();
            let child = self.nodes.len();
            if entry.file_type()?.is_dir() {
                self.nodes.push(Node {
                    dir: true,
                    ..Node::default()
                });
                self.load(&entry.path(), child)?;
            } else {
                let data = std::fs::read(entry.path())?;
                self.nodes.push(Node {
                    synced: data.clone(),
                    data,
                    ..Node::default()
                });
            }
            self.nodes[ino].entries.insert(name.clone(), child);
            self.nodes[ino].synced_entries.insert(name, child);
        }
        Ok(())
    }

    /// The absolute, normalized path of `path` relative to the directory descriptor `dirfd`.
    fn resolve(&self, dirfd: i64, path: &[u8]) -> String {
        let path = String::from_utf8_lossy(path);
        let base = if path.starts_with('/') {
            String::new()
        } else if dirfd == -100 {
            self.cwd.clone()
        } else {
            self.fds
                .get(&dirfd)
                .map(|d| self.descs[*d].path.clone())
                .unwrap_or_default()
        };
        let mut parts: Vec<&str> = Vec::new();
        for part in base.split('/').chain(path.split('/')) {
            match part {
                "" | "." => {}
                ".." => {
                    parts.pop();
                }
                p => parts.push(p),
            }
        }
        format!("/{}", parts.join("/"))
    }

    /// The path's components under the root, or `None` when it is outside.
    fn under_root<'a>(&self, path: &'a str) -> Option<Vec<&'a str>> {
        if path == self.root {
            return Some(Vec::new());
        }
        let rest = path.strip_prefix(&self.root)?.strip_prefix('/')?;
        Some(rest.split('/').collect())
    }

    fn lookup(&self, parts: &[&str]) -> Option<Ino> {
        let mut ino = 0;
        for part in parts {
            ino = *self.nodes[ino].entries.get(*part)?;
        }
        Some(ino)
    }

    /// The directory holding the path's last component, and that component.
    fn parent_of(&self, path: &str) -> Option<(Ino, String)> {
        let parts = self.under_root(path)?;
        let (last, dirs) = parts.split_last()?;
        Some((self.lookup(dirs)?, (*last).to_owned()))
    }

    fn new_node(&mut self, dir: bool) -> Ino {
        self.nodes.push(Node {
            dir,
            ..Node::default()
        });
        self.nodes.len() - 1
    }

    fn write_at(&mut self, i: usize, ino: Ino, off: u64, data: &[u8]) {
        let node = &mut self.nodes[ino];
        apply_data(
            &mut node.data,
            &DataOp::Write {
                off,
                data: data.to_vec(),
            },
        );
        node.pending.push((
            i,
            DataOp::Write {
                off,
                data: data.to_vec(),
            },
        ));
        self.relevant.push(i);
    }

    fn truncate(&mut self, i: usize, ino: Ino, len: u64) {
        let node = &mut self.nodes[ino];
        apply_data(&mut node.data, &DataOp::Truncate(len));
        node.pending.push((i, DataOp::Truncate(len)));
        self.relevant.push(i);
    }

    fn name_op(&mut self, i: usize, dir: Ino, op: NameOp) {
        apply_name(&mut self.nodes[dir].entries, &op);
        self.nodes[dir].name_pending.push((i, op));
        self.relevant.push(i);
    }

    fn desc_of(&self, fd: Option<i64>) -> Option<usize> {
        fd.and_then(|fd| self.fds.get(&fd).copied())
    }

    fn open(&mut self, i: usize, dirfd: i64, path: &[u8], flags: &str, fd: i64) {
        let full = self.resolve(dirfd, path);
        let mut node = None;
        if let Some(parts) = self.under_root(&full) {
            node = self.lookup(&parts);
            if node.is_none()
                && flags.contains("O_CREAT")
                && let Some((dir, name)) = self.parent_of(&full)
            {
                let ino = self.new_node(false);
                self.name_op(i, dir, NameOp::Link { name, ino });
                node = Some(ino);
            } else if let Some(ino) = node
                && flags.contains("O_TRUNC")
                && !self.nodes[ino].dir
                && !self.nodes[ino].data.is_empty()
            {
                self.truncate(i, ino, 0);
            }
        }
        self.descs.push(Desc {
            node,
            path: full,
            pos: 0,
            append: flags.contains("O_APPEND"),
        });
        self.fds.insert(fd, self.descs.len() - 1);
    }

    /// Applies call `i` to the model.
    pub fn apply(&mut self, i: usize, call: &Call) {
        if call.ret < 0 {
            return;
        }
        let a = &call.args;
        let int = |n: usize| a.get(n).and_then(Arg::int);
        let bytes = |n: usize| a.get(n).and_then(Arg::bytes).unwrap_or(&[]);
        let raw = |n: usize| a.get(n).map(Arg::raw).unwrap_or("");
        match call.name.as_str() {
            "openat" => self.open(i, int(0).unwrap_or(-100), bytes(1), raw(2), call.ret),
            "open" => self.open(i, -100, bytes(0), raw(1), call.ret),
            "creat" => self.open(i, -100, bytes(0), "O_CREAT|O_WRONLY|O_TRUNC", call.ret),
            "write" | "writev" | "pwrite64" | "pwritev" | "pwritev2" => {
                let fd = int(0).unwrap_or(-1);
                let data = &bytes(1)[..(call.ret as usize).min(bytes(1).len())];
                if fd == 1 && !self.fds.contains_key(&1) {
                    self.stdout.extend_from_slice(data);
                    while let Some(nl) = self.stdout.iter().position(|b| *b == b'\n') {
                        let line: Vec<u8> = self.stdout.drain(..=nl).collect();
                        let line = String::from_utf8_lossy(&line[..nl]).into_owned();
                        self.lines.push((i, line));
                    }
                    return;
                }
                let Some(d) = self.desc_of(Some(fd)) else {
                    return;
                };
                let Some(ino) = self.descs[d].node else {
                    return;
                };
                let positional = call.name.starts_with('p');
                let off = if positional {
                    int(3).unwrap_or(0) as u64
                } else if self.descs[d].append {
                    self.nodes[ino].data.len() as u64
                } else {
                    self.descs[d].pos
                };
                if !positional {
                    self.descs[d].pos = off + data.len() as u64;
                }
                self.write_at(i, ino, off, data);
            }
            "fsync" | "fdatasync" => {
                let Some(d) = self.desc_of(int(0)) else {
                    return;
                };
                let Some(ino) = self.descs[d].node else {
                    return;
                };
                let node = &mut self.nodes[ino];
                if node.dir {
                    node.synced_entries = node.entries.clone();
                    node.name_pending.clear();
                } else {
                    node.synced = node.data.clone();
                    node.pending.clear();
                }
                self.relevant.push(i);
            }
            "syncfs" => {
                // The whole file system: every file's data and every directory's entries.
                for node in &mut self.nodes {
                    if node.dir {
                        node.synced_entries = node.entries.clone();
                        node.name_pending.clear();
                    } else {
                        node.synced = node.data.clone();
                        node.pending.clear();
                    }
                }
                self.relevant.push(i);
            }
            "rename" | "renameat" | "renameat2" => {
                let (from, to) = if call.name == "rename" {
                    (self.resolve(-100, bytes(0)), self.resolve(-100, bytes(1)))
                } else {
                    (
                        self.resolve(int(0).unwrap_or(-100), bytes(1)),
                        self.resolve(int(2).unwrap_or(-100), bytes(3)),
                    )
                };
                let (Some((fdir, fname)), Some((tdir, tname))) =
                    (self.parent_of(&from), self.parent_of(&to))
                else {
                    return;
                };
                let Some(&ino) = self.nodes[fdir].entries.get(&fname) else {
                    return;
                };
                if fdir == tdir {
                    self.name_op(
                        i,
                        fdir,
                        NameOp::Rename {
                            from: fname,
                            to: tname,
                            ino,
                        },
                    );
                } else {
                    self.name_op(i, fdir, NameOp::Unlink { name: fname });
                    self.name_op(i, tdir, NameOp::Link { name: tname, ino });
                }
            }
            "unlink" | "unlinkat" => {
                let path = if call.name == "unlink" {
                    self.resolve(-100, bytes(0))
                } else {
                    self.resolve(int(0).unwrap_or(-100), bytes(1))
                };
                if let Some((dir, name)) = self.parent_of(&path) {
                    self.name_op(i, dir, NameOp::Unlink { name });
                }
            }
            "mkdir" | "mkdirat" => {
                let path = if call.name == "mkdir" {
                    self.resolve(-100, bytes(0))
                } else {
                    self.resolve(int(0).unwrap_or(-100), bytes(1))
                };
                if let Some((dir, name)) = self.parent_of(&path) {
                    let ino = self.new_node(true);
                    self.name_op(i, dir, NameOp::Link { name, ino });
                }
            }
            "ftruncate" => {
                if let Some(d) = self.desc_of(int(0))
                    && let Some(ino) = self.descs[d].node
                {
                    self.truncate(i, ino, int(1).unwrap_or(0) as u64);
                }
            }
            "truncate" => {
                let path = self.resolve(-100, bytes(0));
                if let Some(parts) = self.under_root(&path)
                    && let Some(ino) = self.lookup(&parts)
                {
                    self.truncate(i, ino, int(1).unwrap_or(0) as u64);
                }
            }
            "close" => {
                if let Some(fd) = int(0) {
                    self.fds.remove(&fd);
                }
            }
            "dup" => {
                if let Some(d) = self.desc_of(int(0)) {
                    self.fds.insert(call.ret, d);
                }
            }
            "dup2" | "dup3" => match self.desc_of(int(0)) {
                Some(d) => {
                    self.fds.insert(call.ret, d);
                }
                None => {
                    self.fds.remove(&call.ret);
                }
            },
            "fcntl" if raw(1).starts_with("F_DUPFD") => {
                if let Some(d) = self.desc_of(int(0)) {
                    self.fds.insert(call.ret, d);
                }
            }
            _ => {}
        }
    }

    /// Every pending operation's call index, in order, without repeats.
    fn pending_indices(&self) -> Vec<usize> {
        let mut all: Vec<usize> = self
            .nodes
            .iter()
            .flat_map(|n| {
                n.pending
                    .iter()
                    .map(|(i, _)| *i)
                    .chain(n.name_pending.iter().map(|(i, _)| *i))
            })
            .collect();
        all.sort_unstable();
        all.dedup();
        all
    }

    /// How many operations are pending (not yet made durable by a barrier).
    pub fn pending_count(&self) -> usize {
        self.pending_indices().len()
    }

    /// The crash state the variant chooses, from the model as it is now.
    pub fn crash_state(&self, variant: Variant) -> State {
        let mut rng = Rng::new(match variant {
            Variant::Prefix(s) | Variant::Subset(s) => s,
            _ => 0,
        });
        // The prefix variant: keep the calls before `cut`, tear the call at `cut`.
        let cut = match variant {
            Variant::Prefix(_) => {
                let all = self.pending_indices();
                if all.is_empty() {
                    usize::MAX
                } else {
                    all[rng.below(all.len() as u64 + 1) as usize..]
                        .first()
                        .copied()
                        .unwrap_or(usize::MAX)
                }
            }
            _ => usize::MAX,
        };
        let keep_name = |i: usize, rng: &mut Rng| match variant {
            Variant::All | Variant::NamesOnly => true,
            Variant::Nothing | Variant::DataOnly => false,
            Variant::Prefix(_) => i < cut,
            Variant::Subset(_) => rng.below(2) == 0,
        };
        // Directory entries as they are after the crash.
        let mut dirs: HashMap<Ino, BTreeMap<String, Ino>> = HashMap::new();
        for (ino, node) in self.nodes.iter().enumerate().filter(|(_, n)| n.dir) {
            let mut entries = node.synced_entries.clone();
            for (i, op) in &node.name_pending {
                if keep_name(*i, &mut rng) {
                    apply_name(&mut entries, op);
                }
            }
            dirs.insert(ino, entries);
        }
        let mut state = State::new();
        let mut stack = vec![(0usize, String::new())];
        let mut seen = vec![false; self.nodes.len()];
        while let Some((dir, prefix)) = stack.pop() {
            if std::mem::replace(&mut seen[dir], true) {
                continue; // a directory reachable twice: keep the first
            }
            for (name, &ino) in &dirs[&dir] {
                if name.ends_with("-shm") {
                    continue;
                }
                let path = format!("{prefix}{name}");
                if self.nodes[ino].dir {
                    state.insert(path.clone(), None);
                    stack.push((ino, format!("{path}/")));
                } else {
                    state.insert(path, Some(self.file_content(ino, variant, cut, &mut rng)));
                }
            }
        }
        state
    }

    fn file_content(&self, ino: Ino, variant: Variant, cut: usize, rng: &mut Rng) -> Vec<u8> {
        let node = &self.nodes[ino];
        let mut data = node.synced.clone();
        for (i, op) in &node.pending {
            let (keep, tear) = match variant {
                Variant::All | Variant::DataOnly => (true, false),
                Variant::Nothing | Variant::NamesOnly => (false, false),
                Variant::Prefix(_) => (*i <= cut, *i == cut),
                Variant::Subset(_) => (rng.below(2) == 0, rng.below(4) == 0),
            };
            if !keep {
                continue;
            }
            match op {
                DataOp::Write { off, data: bytes } if tear => {
                    // Keep a random set of the write's sectors.
                    let mut start = *off;
                    let end = off + bytes.len() as u64;
                    while start < end {
                        let next = ((start / SECTOR) + 1) * SECTOR;
                        let stop = next.min(end);
                        if rng.below(2) == 0 {
                            let piece = &bytes[(start - off) as usize..(stop - off) as usize];
                            apply_data(
                                &mut data,
                                &DataOp::Write {
                                    off: start,
                                    data: piece.to_vec(),
                                },
                            );
                        }
                        start = stop;
                    }
                }
                DataOp::Truncate(_) if tear => {}
                op => apply_data(&mut data, op),
            }
        }
        data
    }
}

fn apply_data(data: &mut Vec<u8>, op: &DataOp) {
    match op {
        DataOp::Write { off, data: bytes } => {
            let off = *off as usize;
            let end = off + bytes.len();
            if data.len() < end {
                data.resize(end, 0);
            }
            data[off..end].copy_from_slice(bytes);
        }
        DataOp::Truncate(len) => data.resize(*len as usize, 0),
    }
}

fn apply_name(entries: &mut BTreeMap<String, Ino>, op: &NameOp) {
    match op {
        NameOp::Link { name, ino } => {
            entries.insert(name.clone(), *ino);
        }
        NameOp::Unlink { name } => {
            entries.remove(name);
        }
        NameOp::Rename { from, to, ino } => {
            entries.remove(from);
            entries.insert(to.clone(), *ino);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(name: &str, args: Vec<Arg>, ret: i64) -> Call {
        Call {
            tid: 1,
            name: name.into(),
            args,
            ret,
            text: String::new(),
            line: 0,
        }
    }
    fn s(v: &str) -> Arg {
        Arg::Bytes(v.as_bytes().to_vec())
    }
    fn r(v: &str) -> Arg {
        Arg::Raw(v.into())
    }

    /// Temp file, write, fsync, rename, directory fsync: the classic safe replacement.
    #[test]
    fn barriers_decide_what_survives() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("k"), b"old").unwrap();
        let root = dir.path().to_string_lossy().into_owned();
        let mut m = Model::from_disk(dir.path(), dir.path()).unwrap();
        let calls = [
            call(
                "openat",
                vec![
                    r("AT_FDCWD"),
                    s(&format!("{root}/t")),
                    r("O_WRONLY|O_CREAT"),
                    r("0666"),
                ],
                3,
            ),
            call("write", vec![r("3"), s("new"), r("3")], 3),
            call("fsync", vec![r("3")], 0),
            call(
                "rename",
                vec![s(&format!("{root}/t")), s(&format!("{root}/k"))],
                0,
            ),
            call(
                "openat",
                vec![r("AT_FDCWD"), s(&root), r("O_RDONLY|O_CLOEXEC")],
                4,
            ),
            call("fsync", vec![r("4")], 0),
        ];
        let content = |m: &Model, v| m.crash_state(v).get("k").cloned().flatten();
        for (i, c) in calls.iter().enumerate().take(4) {
            m.apply(i, c);
        }
        // Before the directory's fsync the rename may be lost, never the data behind it.
        assert_eq!(content(&m, Variant::Nothing), Some(b"old".to_vec()));
        assert_eq!(content(&m, Variant::All), Some(b"new".to_vec()));
        assert_eq!(m.crash_state(Variant::All).len(), 1, "t was renamed away");
        m.apply(4, &calls[4]);
        m.apply(5, &calls[5]);
        assert_eq!(content(&m, Variant::Nothing), Some(b"new".to_vec()));
        assert_eq!(m.pending_count(), 0);
    }

    /// Without the file's fsync, a renamed file may be empty or torn.
    #[test]
    fn unsynced_data_may_be_lost_or_torn() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_string_lossy().into_owned();
        let mut m = Model::from_disk(dir.path(), dir.path()).unwrap();
        m.apply(
            0,
            &call(
                "openat",
                vec![
                    r("AT_FDCWD"),
                    s(&format!("{root}/f")),
                    r("O_RDWR|O_CREAT"),
                    r("0666"),
                ],
                3,
            ),
        );
        m.apply(
            1,
            &call(
                "pwrite64",
                vec![r("3"), Arg::Bytes(vec![7; 2048]), r("2048"), r("0")],
                2048,
            ),
        );
        m.apply(
            2,
            &call("openat", vec![r("AT_FDCWD"), s(&root), r("O_RDONLY")], 4),
        );
        m.apply(3, &call("fsync", vec![r("4")], 0));
        assert_eq!(
            m.crash_state(Variant::NamesOnly).get("f"),
            Some(&Some(Vec::new()))
        );
        let torn: Vec<usize> = (0..40)
            .map(|s| {
                m.crash_state(Variant::Subset(s))["f"]
                    .as_ref()
                    .unwrap()
                    .iter()
                    .filter(|b| **b == 7)
                    .count()
            })
            .collect();
        assert!(
            torn.iter().any(|n| *n > 0 && *n < 2048 && n % 512 == 0),
            "{torn:?}"
        );
    }
}
