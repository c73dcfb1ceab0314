//! Checking: what each crash point allows, and opening a crash state with the real store.
//!
//! The child's `S`/`A`/`F` lines, placed in the trace, give a history: `states[0]` is the store
//! after the warm-up run (the initial directory), `states[j]` the store after the `j`-th
//! traced operation. At a crash point (before call `p`), `m` operations were answered and one
//! more may be in flight (sent, not answered). A state must then show
//!
//! - under a promise that covers power loss (the file backend, SQLite `Full`): `states[m]`,
//!   or `states[m + 1]` when an operation was in flight; per key that is "the last
//!   acknowledged value or the in-flight one", and all keys agree, so no transaction is half
//!   applied;
//! - under SQLite `Normal`: some `states[j]` with `j <= m` (or the in-flight state): a tail of
//!   acknowledged commits may be lost, never one in the middle, never half of one.
//!
//! In every state the store opens, every record decodes, `list_keys` matches the records, the
//! store is healthy, the file backend's root holds no journal or temp file after the open,
//! and SQLite's `PRAGMA integrity_check` says `ok`.

use std::path::Path;

use bevy_storage::Store;

use super::Backend;
use super::workload::{
    Codec, Line, NKEYS, Op, Val, check_listing, describe, key_name, parse_line, read_all,
};

/// One traced operation: where it was sent and answered (call indices).
#[derive(Debug, Clone)]
pub struct Record {
    pub n: u64,
    pub op: Op,
    pub sent: usize,
    pub answered: usize,
}

/// The store's states along the traced run.
pub struct History {
    pub states: Vec<Vec<Option<Val>>>,
    pub ops: Vec<Record>,
}

/// What a crash point allows.
pub struct Allowed {
    /// Operations answered before the crash.
    pub answered: usize,
    /// An operation was sent and not answered.
    pub in_flight: bool,
}

/// Replays child output lines onto `model`; returns the history, or the first problem.
/// `lines` carry the call index at which each was written.
pub fn replay(model: &mut Vec<Option<Val>>, lines: &[(usize, String)]) -> Result<History, String> {
    let mut ops: Vec<Record> = Vec::new();
    let mut states = vec![model.clone()];
    let mut open: Option<(u64, Op, usize)> = None;
    for (at, line) in lines {
        match parse_line(line) {
            Line::Ready => {}
            Line::Sent(n, op) => {
                if open.is_some() {
                    return Err(format!("op {n} sent before the previous one was answered"));
                }
                open = Some((n, op, *at));
            }
            parsed @ (Line::Acked(n) | Line::Refused(n)) => {
                let Some((sent_n, op, sent)) = open.take().filter(|(s, _, _)| *s == n) else {
                    return Err(format!("answer {line:?} without its operation"));
                };
                let mut after = model.clone();
                op.apply(n, &mut after);
                let refused = matches!(parsed, Line::Refused(_));
                if refused != (after == *model && matches!(op, Op::FailingTx(_))) {
                    return Err(format!(
                        "op {n} ({op:?}) was {} against the model",
                        if refused { "refused" } else { "acknowledged" }
                    ));
                }
                *model = after;
                states.push(model.clone());
                ops.push(Record {
                    n: sent_n,
                    op,
                    sent,
                    answered: *at,
                });
            }
            Line::Failed(n, msg) => return Err(format!("op {n} failed in the child: {msg}")),
            Line::OpenFailed(msg) => return Err(format!("the child could not open: {msg}")),
            Line::Garbage(l) => return Err(format!("unreadable line from the child: {l:?}")),
        }
    }
    if let Some((n, _, _)) = open {
        return Err(format!(
            "op {n} was never answered (the child did not finish)"
        ));
    }
    Ok(History { states, ops })
}

impl History {
    /// What a crash before call `p` allows.
    pub fn allowed(&self, p: usize) -> Allowed {
        let answered = self.ops.iter().take_while(|o| o.answered < p).count();
        let in_flight = self.ops.get(answered).is_some_and(|o| o.sent < p);
        Allowed {
            answered,
            in_flight,
        }
    }
}

/// The outcome of checking one state.
pub struct Outcome {
    /// What is wrong (empty: nothing).
    pub violations: Vec<String>,
    /// Acknowledged operations the state lost (only `Normal` may lose any).
    pub lost: usize,
}

/// Opens the state in `dir` with the real store and checks it against the history.
pub fn check_state(
    backend: Backend,
    codec: Codec,
    dir: &Path,
    history: &History,
    allowed: &Allowed,
) -> Outcome {
    let mut violations = Vec::new();
    let store = match Store::open(codec.configure(backend.config(dir))) {
        Ok(store) => store,
        Err(e) => {
            return Outcome {
                violations: vec![format!("the store does not open: {e}")],
                lost: 0,
            };
        }
    };
    let (observed, failures) = read_all(&store);
    violations.extend(failures);
    violations.extend(check_listing(&store, &observed));
    drop(store);
    violations.extend(backend.check_medium(dir));

    let m = allowed.answered;
    let last = m + usize::from(allowed.in_flight);
    let candidates = if backend.may_lose_tail() { 0 } else { m }..=last;
    let mut lost = 0;
    match candidates
        .clone()
        .rev()
        .find(|j| history.states[*j] == observed)
    {
        Some(j) => lost = m.saturating_sub(j),
        None => {
            let before = &history.states[m];
            let after = &history.states[last];
            let mut diffs = Vec::new();
            for k in 0..=NKEYS {
                if observed[k] != before[k] || observed[k] != after[k] {
                    diffs.push(format!(
                        "key {k} ({}) holds {}; last acknowledged: {}; in flight: {}",
                        key_name(k).chars().take(30).collect::<String>(),
                        describe(&observed[k]),
                        describe(&before[k]),
                        describe(&after[k]),
                    ));
                }
            }
            let in_flight = if allowed.in_flight {
                format!(
                    "op {} ({:?}) in flight",
                    history.ops[m].n,
                    history.ops[m].op.to_wire()
                )
            } else {
                "nothing in flight".to_owned()
            };
            violations.push(format!(
                "the state matches no allowed state ({} traced operations acknowledged{}, {in_flight}): {}",
                m,
                if backend.may_lose_tail() {
                    ", any prefix allowed"
                } else {
                    ""
                },
                diffs.join("; ")
            ));
        }
    }
    Outcome { violations, lost }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An operation is in flight from its `S` line to its answer, acknowledged after it.
    #[test]
    fn crash_points_allow_the_acknowledged_and_the_in_flight_state() {
        let mut model = vec![None; NKEYS + 1];
        let lines: Vec<(usize, String)> =
            [(0, "READY"), (3, "S 1 s 2"), (9, "A 1"), (10, "S 2 d 2")]
                .iter()
                .map(|(i, l)| (*i, (*l).to_owned()))
                .chain([(15, "A 2".to_owned())])
                .collect();
        let history = replay(&mut model, &lines).unwrap();
        assert_eq!(history.states.len(), 3);
        assert!(history.states[1][2].is_some() && history.states[2][2].is_none());
        let at = |p| {
            let a = history.allowed(p);
            (a.answered, a.in_flight)
        };
        assert_eq!(at(3), (0, false));
        assert_eq!(at(4), (0, true));
        assert_eq!(at(9), (0, true));
        assert_eq!(at(10), (1, false));
        assert_eq!(at(11), (1, true));
        assert_eq!(at(16), (2, false));
    }

    #[test]
    fn an_unanswered_or_failed_operation_is_a_harness_error() {
        let mut model = vec![None; NKEYS + 1];
        assert!(replay(&mut model, &[(1, "S 1 s 2".to_owned())]).is_err());
        let failed = [(1, "S 1 s 2".to_owned()), (2, "E 1 disk full".to_owned())];
        assert!(replay(&mut model, &failed).is_err());
    }
}
