//! Recording: the child runs under `strace`, and its output is parsed into system calls.
//!
//! Why `strace` and not an `LD_PRELOAD` shim or an I/O layer of the crate's own: it observes the
//! real binary (the real `std::fs` calls of the file backend and the real unix VFS of the
//! bundled SQLite, with their real `fsync`s), needs no change in `src/` and no second code path
//! that could differ from what a game runs, and sees every thread (`-f`). `-xx` prints every
//! byte of every buffer as `\xNN`, so written data is recorded exactly and no string can
//! contain a quote, a comma or a parenthesis that would confuse the parser; `-s` is larger than
//! any write of the workload, and a buffer that was cut short anyway is an error, never a
//! silent loss. The acknowledgement lines the child writes to stdout (fd 1) are recorded in
//! the same trace, so each one has its exact place among the file operations.
//!
//! A call that strace shows in two parts (`<unfinished ...>`, then `<... resumed>`, when another
//! thread's call came in between) is taken at its end: that is where its effect is certain
//! and where the caller can go on.

use std::collections::HashMap;
use std::path::Path;
use std::process::{Command, Stdio};

/// The calls recorded: every call that creates, names, writes, truncates, syncs, duplicates or
/// closes a file descriptor or a directory entry. A name unknown on this architecture is
/// skipped by strace (`?` prefix).
const TRACED: &str = "?open,openat,?creat,write,pwrite64,writev,pwritev,pwritev2,fsync,fdatasync,\
syncfs,sync_file_range,?rename,renameat,renameat2,?unlink,unlinkat,ftruncate,truncate,?mkdir,mkdirat,\
close,dup,?dup2,dup3,fcntl";

/// The longest buffer strace prints in full (bytes). The workload writes at most a few hundred
/// KiB at once (a journal of six 64 KiB records).
const MAX_STRING: usize = 16 * 1024 * 1024;

/// One argument of a call.
#[derive(Debug, Clone, PartialEq)]
pub enum Arg {
    /// A string or buffer (decoded from `\xNN` escapes).
    Bytes(Vec<u8>),
    /// An I/O vector (`writev`): its buffers, concatenated.
    Iov(Vec<u8>),
    /// Anything else, as strace printed it (a number, a flag set, a struct).
    Raw(String),
}

impl Arg {
    /// The argument as a number (`AT_FDCWD` is -100).
    pub fn int(&self) -> Option<i64> {
        match self {
            Arg::Raw(s) if s == "AT_FDCWD" => Some(-100),
            Arg::Raw(s) => s.parse().ok(),
            _ => None,
        }
    }

    /// The argument's bytes (a string or an I/O vector).
    pub fn bytes(&self) -> Option<&[u8]> {
        match self {
            Arg::Bytes(b) | Arg::Iov(b) => Some(b),
            Arg::Raw(_) => None,
        }
    }

    /// The argument as printed (flags).
    pub fn raw(&self) -> &str {
        match self {
            Arg::Raw(s) => s,
            _ => "",
        }
    }
}

/// One completed system call.
#[derive(Debug, Clone)]
pub struct Call {
    /// The thread that made it.
    pub tid: u32,
    /// The call's name (`openat`, `pwrite64`, ...).
    pub name: String,
    /// Its arguments.
    pub args: Vec<Arg>,
    /// Its result (-1 for an error or an unknown result).
    pub ret: i64,
    /// The line as strace printed it (without buffers), for reports.
    pub text: String,
    /// The line of the trace file where the call completed (from 1).
    pub line: usize,
}

/// Runs `program args` under strace, writing the trace to `trace`; stdout is discarded (its
/// writes are in the trace) and stderr goes to `stderr`. Returns an error message when strace
/// cannot run or the child fails.
pub fn record(
    program: &Path,
    args: &[String],
    cwd: &Path,
    trace: &Path,
    stderr: &Path,
) -> Result<(), String> {
    let err_file =
        std::fs::File::create(stderr).map_err(|e| format!("{}: {e}", stderr.display()))?;
    let status = Command::new("strace")
        .args(["-f", "-tt", "-e"])
        .arg(format!("trace={TRACED}"))
        .args(["-e", "abbrev=none", "-xx", "-s"])
        .arg(MAX_STRING.to_string())
        .arg("-o")
        .arg(trace)
        .arg("--")
        .arg(program)
        .args(args)
        .current_dir(cwd)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(err_file)
        .status()
        .map_err(|e| format!("cannot run strace (is it installed?): {e}"))?;
    if status.success() {
        Ok(())
    } else {
        let text = std::fs::read_to_string(stderr).unwrap_or_default();
        Err(format!(
            "the traced child failed ({status}): {}",
            text.lines().rev().take(5).collect::<Vec<_>>().join(" | ")
        ))
    }
}

/// Parses a trace written by [`record`] into its completed calls, in the order they finished.
pub fn parse(text: &str) -> Result<Vec<Call>, String> {
    let mut calls = Vec::new();
    let mut unfinished: HashMap<u32, String> = HashMap::new();
    for (number, line) in text.lines().enumerate() {
        let mut rest = line;
        let tid = match rest.split_once(' ') {
            Some((first, tail)) if first.bytes().all(|b| b.is_ascii_digit()) => {
                rest = tail.trim_start();
                first.parse().unwrap_or(0)
            }
            _ => 0,
        };
        // The time stamp (-tt).
        if let Some((first, tail)) = rest.split_once(' ')
            && first.len() >= 8
            && first.as_bytes()[2] == b':'
        {
            rest = tail.trim_start();
        }
        if rest.starts_with("+++") || rest.starts_with("---") || rest.is_empty() {
            continue;
        }
        let whole = if let Some(head) = rest.strip_suffix("<unfinished ...>") {
            unfinished.insert(tid, head.trim_end().to_owned());
            continue;
        } else if let Some(tail) = rest.strip_prefix("<... ") {
            let Some((_, tail)) = tail.split_once(" resumed>") else {
                return Err(format!("trace line {}: unreadable: {line}", number + 1));
            };
            let Some(head) = unfinished.remove(&tid) else {
                return Err(format!(
                    "trace line {}: resumed call without its start: {line}",
                    number + 1
                ));
            };
            format!("{head}{tail}")
        } else {
            rest.to_owned()
        };
        let mut call = parse_call(tid, &whole)
            .map_err(|e| format!("trace line {}: {e}: {}", number + 1, shorten(line)))?;
        call.line = number + 1;
        calls.push(call);
    }
    Ok(calls)
}

fn shorten(s: &str) -> String {
    if s.len() > 200 {
        format!("{}...", &s[..s.floor_char_boundary(200)])
    } else {
        s.to_owned()
    }
}

/// Parses `name(arg, arg, ...) = ret [ERRNO (text)]`.
fn parse_call(tid: u32, s: &str) -> Result<Call, String> {
    let open = s.find('(').ok_or("no argument list")?;
    let name = s[..open].trim().to_owned();
    // strace pads the result to a column: `close(3)          = 0`.
    let eq = s.rfind(" = ").ok_or("no result")?;
    let close = s[..eq].trim_end().len() - 1;
    if s.as_bytes().get(close) != Some(&b')') || close < open {
        return Err("no closing parenthesis".into());
    }
    let ret_text = s[eq + 3..].split_whitespace().next().unwrap_or("?");
    let ret = ret_text.parse::<i64>().unwrap_or(-1);
    let args = split_args(&s[open + 1..close])?
        .into_iter()
        .map(|a| parse_arg(a.trim()))
        .collect::<Result<Vec<_>, _>>()?;
    let text = format!(
        "{name}({}) = {ret_text}",
        args.iter()
            .map(|a| match a {
                Arg::Bytes(b)
                    if b.len() <= 300
                        && b.iter().all(|c| c.is_ascii_graphic() || b" \n".contains(c)) =>
                    format!("{:?}", String::from_utf8_lossy(b)),
                Arg::Bytes(b) => format!("<{} bytes>", b.len()),
                Arg::Iov(b) => format!("[<{} bytes>]", b.len()),
                Arg::Raw(r) => r.clone(),
            })
            .collect::<Vec<_>>()
            .join(", ")
    );
    Ok(Call {
        tid,
        name,
        args,
        ret,
        text,
        line: 0,
    })
}

/// Splits an argument list at the commas outside quotes, brackets and braces.
fn split_args(s: &str) -> Result<Vec<&str>, String> {
    let mut out = Vec::new();
    let mut depth = 0i32;
    let mut quoted = false;
    let mut start = 0;
    for (i, c) in s.char_indices() {
        match c {
            '"' => quoted = !quoted,
            '[' | '{' | '(' if !quoted => depth += 1,
            ']' | '}' | ')' if !quoted => depth -= 1,
            ',' if !quoted && depth == 0 => {
                out.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    if quoted || depth != 0 {
        return Err("unbalanced argument list".into());
    }
    if !s.trim().is_empty() {
        out.push(&s[start..]);
    }
    Ok(out)
}

fn parse_arg(a: &str) -> Result<Arg, String> {
    if a.starts_with('"') {
        let (bytes, rest) = parse_string(a)?;
        if !rest.is_empty() {
            return Err(format!(
                "a buffer was cut short (`{}` after it): raise -s",
                shorten(rest)
            ));
        }
        Ok(Arg::Bytes(bytes))
    } else if a.starts_with('[') && a.contains("iov_base=") {
        let mut data = Vec::new();
        let mut rest = a;
        while let Some(at) = rest.find("iov_base=\"") {
            let (bytes, tail) = parse_string(&rest[at + 9..])?;
            if tail.starts_with("...") {
                return Err("a buffer was cut short: raise -s".into());
            }
            data.extend(bytes);
            rest = tail;
        }
        Ok(Arg::Iov(data))
    } else {
        Ok(Arg::Raw(a.to_owned()))
    }
}

/// Decodes a `"\xNN..."` string; returns the bytes and what follows the closing quote.
fn parse_string(a: &str) -> Result<(Vec<u8>, &str), String> {
    let body = &a[1..];
    let end = body.find('"').ok_or("unterminated string")?;
    let hex = &body[..end];
    let mut bytes = Vec::with_capacity(hex.len() / 4);
    let raw = hex.as_bytes();
    let mut i = 0;
    while i < raw.len() {
        if raw[i] == b'\\' && raw.get(i + 1) == Some(&b'x') && i + 3 < raw.len() + 1 {
            let pair = hex.get(i + 2..i + 4).ok_or("short escape")?;
            bytes.push(u8::from_str_radix(pair, 16).map_err(|_| "bad escape")?);
            i += 4;
        } else {
            // strace -xx escapes everything, but accept plain bytes too.
            bytes.push(raw[i]);
            i += 1;
        }
    }
    Ok((bytes, &body[end + 1..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calls_and_resumed_calls_parse() {
        let text = "\
12 19:30:01.000001 openat(AT_FDCWD, \"\\x2f\\x61\", O_RDWR|O_CREAT|O_CLOEXEC, 0666) = 3
12 19:30:01.000002 pwrite64(3, \"\\x41\\x42\", 2, 512 <unfinished ...>
13 19:30:01.000003 fsync(4)        = -1 EBADF (Bad file descriptor)
12 19:30:01.000004 <... pwrite64 resumed>) = 2
12 19:30:01.000005 writev(3, [{iov_base=\"\\x41\", iov_len=1}, {iov_base=\"\\x42\", iov_len=1}], 2) = 2
12 19:30:01.000006 +++ exited with 0 +++
";
        let calls = parse(text).unwrap();
        assert_eq!(calls.len(), 4);
        assert_eq!(calls[0].args[1], Arg::Bytes(b"/a".to_vec()));
        assert_eq!(calls[0].ret, 3);
        assert_eq!(calls[1].name, "fsync");
        assert_eq!(calls[1].ret, -1);
        assert_eq!(calls[2].name, "pwrite64");
        assert_eq!(
            calls[2].line, 4,
            "a resumed call is placed where it completed"
        );
        assert_eq!(calls[2].args[3].int(), Some(512));
        assert_eq!(calls[3].args[1], Arg::Iov(b"AB".to_vec()));
    }

    #[test]
    fn a_cut_buffer_is_an_error() {
        assert!(parse("1 write(3, \"\\x41\"..., 100) = 100\n").is_err());
    }
}
