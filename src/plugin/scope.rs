//! Which requests must wait for which: the keys, prefixes and world a request touches.

use std::collections::HashMap;

/// What a request touches. Two requests whose scopes overlap run one after the other, in
/// id order; requests whose scopes do not overlap run in parallel.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Scope {
    /// These exact keys.
    pub(crate) keys: Vec<String>,
    /// Every key starting with this prefix (a listing, an autosave rotation).
    pub(crate) prefix: Option<String>,
    /// Every key (a clear).
    pub(crate) all: bool,
    /// The live world: world saves and loads, which capture and apply on the main thread,
    /// run one at a time so that a save captures what every earlier load applied.
    pub(crate) world: bool,
}

impl Scope {
    /// One key.
    pub(crate) fn key(key: &str) -> Self {
        Self::keys([key.to_owned()])
    }

    /// These keys (deduplicated).
    pub(crate) fn keys(keys: impl IntoIterator<Item = String>) -> Self {
        let mut keys: Vec<String> = keys.into_iter().collect();
        keys.sort_unstable();
        keys.dedup();
        Self {
            keys,
            ..Self::default()
        }
    }

    /// Every key under `prefix`.
    pub(crate) fn prefix(prefix: &str) -> Self {
        Self {
            prefix: Some(prefix.to_owned()),
            ..Self::default()
        }
    }

    /// Everything.
    pub(crate) fn all() -> Self {
        Self {
            all: true,
            ..Self::default()
        }
    }

    /// This scope, and the live world too.
    pub(crate) fn and_world(mut self) -> Self {
        self.world = true;
        self
    }

    /// Adds `other`'s keys (a write joining a batch).
    pub(crate) fn merge_keys(&mut self, other: &Scope) {
        for k in &other.keys {
            if !self.keys.contains(k) {
                self.keys.push(k.clone());
            }
        }
    }
}

/// A multiset of scopes, to ask "does this scope overlap any of them?".
#[derive(Default, Debug)]
pub(crate) struct ScopeSet {
    keys: HashMap<String, usize>,
    prefixes: Vec<String>,
    pub(crate) all: usize,
    world: usize,
}

impl ScopeSet {
    pub(crate) fn is_empty(&self) -> bool {
        self.keys.is_empty() && self.prefixes.is_empty() && self.all == 0 && self.world == 0
    }

    pub(crate) fn conflicts(&self, scope: &Scope) -> bool {
        if self.all > 0 || (scope.world && self.world > 0) {
            return true;
        }
        if scope.all {
            return !self.is_empty();
        }
        let key_conflict = scope.keys.iter().any(|k| {
            self.keys.contains_key(k) || self.prefixes.iter().any(|p| k.starts_with(p.as_str()))
        });
        let prefix_conflict = scope.prefix.as_ref().is_some_and(|p| {
            self.keys.keys().any(|k| k.starts_with(p.as_str()))
                || self
                    .prefixes
                    .iter()
                    .any(|q| q.starts_with(p.as_str()) || p.starts_with(q.as_str()))
        });
        key_conflict || prefix_conflict
    }

    pub(crate) fn add(&mut self, scope: &Scope) {
        for k in &scope.keys {
            *self.keys.entry(k.clone()).or_default() += 1;
        }
        if let Some(p) = &scope.prefix {
            self.prefixes.push(p.clone());
        }
        self.all += usize::from(scope.all);
        self.world += usize::from(scope.world);
    }

    pub(crate) fn remove(&mut self, scope: &Scope) {
        for k in &scope.keys {
            if let Some(n) = self.keys.get_mut(k) {
                *n -= 1;
                if *n == 0 {
                    self.keys.remove(k);
                }
            }
        }
        if let Some(p) = &scope.prefix
            && let Some(i) = self.prefixes.iter().position(|q| q == p)
        {
            self.prefixes.swap_remove(i);
        }
        self.all = self.all.saturating_sub(usize::from(scope.all));
        self.world = self.world.saturating_sub(usize::from(scope.world));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlaps() {
        let mut set = ScopeSet::default();
        set.add(&Scope::key("a"));
        assert!(set.conflicts(&Scope::key("a")));
        assert!(!set.conflicts(&Scope::key("b")));
        assert!(set.conflicts(&Scope::prefix("")));
        assert!(set.conflicts(&Scope::all()));
        assert!(!set.conflicts(&Scope::key("b").and_world()));
        set.add(&Scope::key("b").and_world());
        // A second world request waits, even on other keys.
        assert!(set.conflicts(&Scope::key("c").and_world()));
        assert!(!set.conflicts(&Scope::key("c")));
        set.remove(&Scope::key("b").and_world());
        set.remove(&Scope::key("a"));
        assert!(set.is_empty());
        set.add(&Scope::all());
        assert!(set.conflicts(&Scope::key("z")));
        assert!(set.conflicts(&Scope::key("z").and_world()));
    }
}
