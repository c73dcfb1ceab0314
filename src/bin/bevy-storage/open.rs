//! Opening the store and the key: `--store` URLs (with the Redis password), the encryption
//! key from the environment or a file, and a read-only view for decrypting.

use std::sync::Arc;

use bevy_storage::backend::{Backend, KeyEntry, Record, RecordMeta, Usage, WriteOp, WriteOutcome};
use bevy_storage::clock::Timestamp;
use bevy_storage::{BackendConfig, EncryptionKey, StorageConfig, StorageError, Store};
use zeroize::Zeroizing;

use crate::args::Cli;
use crate::dump;
use crate::failure::{Failure, Outcome};

/// The store's configuration from `--store` / `BEVY_STORAGE_URL`.
pub fn store_config(cli: &Cli) -> Outcome<StorageConfig> {
    if let Some(app) = &cli.app {
        if cli.store_on_command_line {
            return Err(Failure::usage("give --store or --app, not both"));
        }
        let config = StorageConfig::for_app(app).map_err(|e| Failure::usage(e.to_string()))?;
        return Ok(config.max_size(None).pool_size(2));
    }
    let given = cli
        .store
        .as_deref()
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .ok_or_else(|| {
            Failure::usage(
                "no store given: pass --store URL or set BEVY_STORAGE_URL \
                 (for example saves/storage.db, sqlite:saves/storage.db or file:saves/dir)",
            )
        })?;
    let url = match infer_scheme(given)? {
        Some(url) => url,
        None => given.to_owned(),
    };
    let url = redis_password(cli, &url)?;
    let config = StorageConfig::from_url(&url).map_err(|e| {
        let hidden = bevy_storage::config::redact_url(&url);
        let message = e
            .to_string()
            .replace(&format!("{url:?}"), &format!("{hidden:?}"))
            .replace(url.as_str(), &hidden);
        Failure::usage(format!(
            "{message} (see bevy-storage --help for the stores)"
        ))
    })?;
    // The inspector is no game: no quota (imports may be large) and a small pool.
    Ok(config.max_size(None).pool_size(2))
}

/// The schemes `StorageConfig::from_url` knows.
const SCHEMES: [&str; 5] = ["sqlite", "file", "memory", "redis", "rediss"];

/// A path without a scheme: `*.db`, `*.sqlite`, `*.sqlite3` → `sqlite:PATH`, an existing
/// directory → `file:DIR`; anything else with no known scheme is one clear usage error.
/// `Ok(None)`: the text has a scheme of its own.
fn infer_scheme(given: &str) -> Outcome<Option<String>> {
    if let Some((scheme, _)) = given.split_once(':')
        && (SCHEMES.contains(&scheme)
            || scheme.len() > 1
                && scheme
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c)))
    {
        // A scheme, known or not (`StorageConfig::from_url` names an unknown one); a
        // one-letter "scheme" is a Windows drive.
        return Ok(None);
    }
    let path = std::path::Path::new(given);
    let extension = path
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase);
    let inferred = if matches!(extension.as_deref(), Some("db" | "sqlite" | "sqlite3")) {
        format!("sqlite:{given}")
    } else if path.is_dir() {
        format!("file:{given}")
    } else {
        return Err(Failure::usage(format!(
            "cannot tell which store {:?} is: name it with a scheme, sqlite:PATH (an SQLite \
             file; a path ending in .db, .sqlite or .sqlite3 needs none), file:DIR (a file \
             store; an existing directory needs none), memory: or redis://HOST[:PORT][/DB]",
            bevy_storage::config::redact_url(given)
        )));
    };
    Ok(Some(inferred))
}

/// Puts the Redis password from `BEVY_STORAGE_REDIS_PASSWORD` or `--password-file` into a
/// `redis://` URL; warns when the URL itself carries one on the command line.
fn redis_password(cli: &Cli, url: &str) -> Outcome<String> {
    let env = env_secret("BEVY_STORAGE_REDIS_PASSWORD")?;
    let file = match &cli.password_file {
        Some(path) => {
            let bytes = read_secret_file(path)?;
            let text = std::str::from_utf8(&bytes).map_err(|_| {
                Failure::usage(format!(
                    "password file {}: the password is not UTF-8 text",
                    path.display()
                ))
            })?;
            let text = text.strip_suffix('\n').unwrap_or(text);
            Some(Zeroizing::new(
                text.strip_suffix('\r').unwrap_or(text).to_owned(),
            ))
        }
        None => None,
    };
    let Some((scheme, rest)) = url
        .split_once("://")
        .filter(|(s, _)| s.starts_with("redis"))
    else {
        // The variable may be set for a whole shell session: other stores ignore it. The
        // flag was given for this command, so it must be meant for this store.
        if file.is_some() {
            return Err(Failure::usage(
                "--password-file gives a Redis password but the store is not a redis:// URL",
            ));
        }
        return Ok(url.to_owned());
    };
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    let (userinfo, host) = match authority.rfind('@') {
        Some(at) => (Some(&authority[..at]), &authority[at + 1..]),
        None => (None, authority),
    };
    let in_url = userinfo.is_some_and(|u| u.contains(':'));
    let password = match (env, file) {
        (Some(_), Some(_)) => {
            return Err(Failure::usage(
                "the Redis password is given twice (BEVY_STORAGE_REDIS_PASSWORD and \
                 --password-file): give only one",
            ));
        }
        (Some(p), None) | (None, Some(p)) => p,
        (None, None) => {
            if in_url && cli.store_on_command_line {
                eprintln!(
                    "warning: the Redis password in --store is visible to other users (ps) and \
                     in your shell history; set BEVY_STORAGE_REDIS_PASSWORD or pass \
                     --password-file instead"
                );
            }
            return Ok(url.to_owned());
        }
    };
    if in_url {
        return Err(Failure::usage(
            "the Redis password is given twice (in the URL and from BEVY_STORAGE_REDIS_PASSWORD \
             or --password-file): give only one",
        ));
    }
    let user = userinfo.unwrap_or("");
    Ok(format!(
        "{scheme}://{user}:{}@{host}{tail}",
        percent_encode(&password)
    ))
}

/// Percent-encodes everything but RFC 3986's unreserved characters (for a URL's password).
fn percent_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~".contains(&byte) {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// `sqlite:PATH`, `file:DIR`... for messages (a password is hidden).
pub fn describe(config: &StorageConfig) -> String {
    config.backend.url()
}

/// Opens the store; unless `create`, a store that does not exist yet is an error (opening
/// would create an empty one).
pub fn open_store(config: &StorageConfig, create: bool) -> Outcome<Store> {
    if !create {
        let missing = |what: String| {
            Failure::runtime(format!(
                "no store at {what} (only `import` creates a store; check --store)"
            ))
        };
        match &config.backend {
            BackendConfig::File { root } if !root.is_dir() => {
                return Err(if root.exists() {
                    Failure::runtime(format!(
                        "{} is not a directory, so not a file store",
                        root.display()
                    ))
                } else {
                    missing(format!("{}: the directory does not exist", root.display()))
                });
            }
            #[cfg(feature = "sqlite")]
            BackendConfig::Sqlite { path, .. } if !path.is_file() => {
                return Err(if path.exists() {
                    Failure::runtime(format!(
                        "{} is not a file, so not an SQLite store",
                        path.display()
                    ))
                } else {
                    missing(format!("{}: the file does not exist", path.display()))
                });
            }
            _ => {}
        }
    }
    Store::open(config.clone()).map_err(|e| {
        let failure = Failure::from(e);
        match failure {
            Failure::Runtime(m) => {
                Failure::runtime(format!("cannot open the store {}: {m}", describe(config)))
            }
            other => other,
        }
    })
}

/// The encryption key from the environment or a key file, if one is given.
pub fn key_material(cli: &Cli) -> Outcome<Option<EncryptionKey>> {
    let hex = env_secret("BEVY_STORAGE_KEY")?;
    let passphrase = env_secret("BEVY_STORAGE_PASSPHRASE")?;
    let given: Vec<&str> = [
        (hex.is_some(), "BEVY_STORAGE_KEY"),
        (passphrase.is_some(), "BEVY_STORAGE_PASSPHRASE"),
        (cli.key_file.is_some(), "--key-file"),
        (cli.passphrase_file.is_some(), "--passphrase-file"),
    ]
    .into_iter()
    .filter_map(|(set, name)| set.then_some(name))
    .collect();
    if given.len() > 1 {
        return Err(Failure::usage(format!(
            "key material is given more than once ({}): give only one",
            given.join(", ")
        )));
    }
    let key = |source: &str, key: Result<EncryptionKey, StorageError>| {
        key.map_err(|e| Failure::usage(format!("{source}: {e}")))
    };
    if let Some(hex) = hex {
        return key("BEVY_STORAGE_KEY", EncryptionKey::from_hex(&hex)).map(Some);
    }
    if let Some(mut passphrase) = passphrase {
        // Moved, not copied: the only copy left is the key's own (zeroized on drop).
        let owned = std::mem::take(&mut *passphrase);
        return key(
            "BEVY_STORAGE_PASSPHRASE",
            EncryptionKey::from_passphrase(owned),
        )
        .map(Some);
    }
    if let Some(path) = &cli.key_file {
        let source = format!("key file {}", path.display());
        let bytes = read_secret_file(path)?;
        if bytes.len() == bevy_storage::codec::crypto::KEY_LEN {
            return key(&source, EncryptionKey::from_slice(&bytes)).map(Some);
        }
        let text = std::str::from_utf8(&bytes).map_err(|_| {
            Failure::usage(format!(
                "{source}: a key file holds 64 hex digits or exactly 32 raw bytes (this one holds {} bytes)",
                bytes.len()
            ))
        })?;
        return key(&source, EncryptionKey::from_hex(text)).map(Some);
    }
    if let Some(path) = &cli.passphrase_file {
        let source = format!("passphrase file {}", path.display());
        let bytes = read_secret_file(path)?;
        let text = std::str::from_utf8(&bytes)
            .map_err(|_| Failure::usage(format!("{source}: the passphrase is not UTF-8 text")))?;
        let text = text
            .strip_suffix('\n')
            .map(|t| t.strip_suffix('\r').unwrap_or(t))
            .unwrap_or(text);
        return key(&source, EncryptionKey::from_passphrase(text)).map(Some);
    }
    Ok(None)
}

fn env_secret(name: &str) -> Outcome<Option<Zeroizing<String>>> {
    match std::env::var(name) {
        Ok(value) if value.is_empty() => Ok(None),
        Ok(value) => Ok(Some(Zeroizing::new(value))),
        Err(std::env::VarError::NotPresent) => Ok(None),
        Err(std::env::VarError::NotUnicode(_)) => {
            Err(Failure::usage(format!("{name} is not valid UTF-8 text")))
        }
    }
}

fn read_secret_file(path: &std::path::Path) -> Outcome<Zeroizing<Vec<u8>>> {
    std::fs::read(path)
        .map(Zeroizing::new)
        .map_err(|e| Failure::runtime(format!("cannot read {}: {e}", path.display())))
}

/// A view of a backend for reading with a key: the store may record its key check (which
/// opening with a key does on a store that has none) without anything reaching the backend;
/// every other write fails. The inspector never changes a store it only reads.
struct ReadOnly(Arc<dyn Backend>);

impl Backend for ReadOnly {
    fn backend_type(&self) -> &str {
        self.0.backend_type()
    }
    fn get(&self, key: &str) -> bevy_storage::Result<Option<Record>> {
        self.0.get(key)
    }
    fn get_meta(&self, key: &str) -> bevy_storage::Result<Option<RecordMeta>> {
        self.0.get_meta(key)
    }
    fn write(&self, ops: Vec<WriteOp>, _now: Timestamp) -> bevy_storage::Result<Vec<WriteOutcome>> {
        if ops.iter().all(|op| dump::is_internal(op.key())) {
            Ok(vec![WriteOutcome::default(); ops.len()])
        } else {
            Err(StorageError::backend(
                "inspector",
                "this view of the store is read-only",
            ))
        }
    }
    fn delete_if_unchanged(
        &self,
        _key: &str,
        _value: &[u8],
        _expires_at: Option<Timestamp>,
    ) -> bevy_storage::Result<bool> {
        Err(StorageError::backend(
            "inspector",
            "this view of the store is read-only",
        ))
    }
    fn touch(&self, _key: &str, _at: Timestamp) -> bevy_storage::Result<()> {
        Ok(())
    }
    fn scan(&self, prefix: &str) -> bevy_storage::Result<Vec<KeyEntry>> {
        self.0.scan(prefix)
    }
    fn purge_expired(&self, _now: Timestamp) -> bevy_storage::Result<usize> {
        Err(StorageError::backend(
            "inspector",
            "this view of the store is read-only",
        ))
    }
    fn clear(&self) -> bevy_storage::Result<()> {
        Err(StorageError::backend(
            "inspector",
            "this view of the store is read-only",
        ))
    }
    fn usage(&self, now: Timestamp) -> bevy_storage::Result<Usage> {
        self.0.usage(now)
    }
    fn available_space(&self) -> Option<u64> {
        self.0.available_space()
    }
    fn health_check(&self) -> bevy_storage::Result<()> {
        self.0.health_check()
    }
}

/// A store over `backend` that decrypts with `key`, checked against the store's key check,
/// and writes nothing.
pub fn keyed_reader(
    backend: &Arc<dyn Backend>,
    config: &StorageConfig,
    key: EncryptionKey,
) -> Result<Store, StorageError> {
    Store::with_backend(
        Arc::new(ReadOnly(Arc::clone(backend))),
        config.clone().encryption_key(key),
    )
}

/// Checks a record key given on the command line.
pub fn check_key(key: &str) -> Outcome {
    bevy_storage::key::validate_key(key).map_err(Failure::from)
}
