//! Opening a store: the backend from the configuration, the read cache, the quota's first
//! count, and the encryption key checked against the store's key-check record.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::*;

/// What the first stores sealed in their key check: it authenticates the key-derivation
/// parameters only implicitly (other parameters derive another key, which fails to open it).
const KEYCHECK_PAYLOAD_V1: &[u8] = b"bevy_storage key check v1";
/// What stores seal in their key check now, followed by the key-derivation parameters
/// ([`KdfParams::to_bytes`]) or `raw`: the parameters are authenticated by the key itself.
const KEYCHECK_PAYLOAD_V2: &[u8] = b"bevy_storage key check v2:";
/// A key-check record is a few hundred bytes; a larger one is refused before parsing.
const KEYCHECK_MAX_LEN: usize = 4096;

/// The payload a store seals in its key check for these parameters.
fn keycheck_payload(kdf: Option<&KdfParams>) -> Vec<u8> {
    let mut payload = KEYCHECK_PAYLOAD_V2.to_vec();
    match kdf {
        Some(params) => payload.extend_from_slice(&params.to_bytes()),
        None => payload.extend_from_slice(b"raw"),
    }
    payload
}

/// What the store keeps under its key-check record to recognise its encryption key.
#[derive(Serialize, Deserialize)]
struct KeyCheck {
    kdf: Option<KdfParams>,
    sealed: Vec<u8>,
}

impl Store {
    /// Opens the configured backend and checks the configuration: a bad path, an unreachable
    /// server or an encryption key that does not match the store's is an error here, not later.
    pub fn open(config: StorageConfig) -> Result<Self> {
        if config.enable_encryption && config.encryption_key.is_none() {
            return Err(StorageError::Config(
                "enable_encryption is on but no encryption_key is set".into(),
            ));
        }
        let backend = config.open_backend()?;
        Self::with_backend(backend, config)
    }

    /// Opens a store over an already built backend, with the other settings of `config`
    /// (its `backend` field is ignored).
    pub fn with_backend(backend: Arc<dyn Backend>, config: StorageConfig) -> Result<Self> {
        // A backend that found damage in its files opens anyway (it refuses writes and
        // reports itself unhealthy), so that the records still readable can be read.
        let damaged = |e: StorageError| match backend.damage() {
            Some(_) => Ok(()),
            None => Err(e),
        };
        backend.health_check().or_else(damaged)?;
        let cipher = match &config.encryption_key {
            Some(key) => Some(Self::unlock(&*backend, key, &*config.clock)?),
            None => None,
        };
        let quota = match config.max_size {
            Some(max) => {
                let used = match backend.usage(config.clock.now()) {
                    Ok(usage) => usage.total_size,
                    // Writes are refused anyway: the quota is never consulted.
                    Err(e) => damaged(e).map(|()| 0)?,
                };
                Some(Quota::new(max, used))
            }
            None => None,
        };
        Ok(Self {
            inner: Arc::new(Inner {
                cache: Self::read_cache_for(&*backend, &config),
                backend,
                cipher,
                clock: config.clock,
                format: config.format,
                default_ttl: config.default_ttl,
                default_compression: config.compression,
                default_encrypt: config.enable_encryption,
                quota,
                counters: Counters::default(),
            }),
        })
    }

    /// The read cache `config` asks for over `backend`: validated by its change token when it
    /// has one, time-bounded when `read_cache_ttl` is set, none otherwise.
    fn read_cache_for(backend: &dyn Backend, config: &StorageConfig) -> Option<ReadCache> {
        if config.read_cache_capacity == 0 || config.read_cache_max_bytes == 0 {
            return None;
        }
        // A few tries: a writer may be rewriting the token at this very moment.
        let by_token =
            config.read_cache_validated && (0..3).any(|_| backend.change_token().is_some());
        (by_token || config.read_cache_ttl.is_some()).then(|| {
            ReadCache::new(
                config.read_cache_ttl,
                by_token,
                config.read_cache_capacity,
                config.read_cache_max_bytes,
            )
        })
    }

    /// Builds the cipher, checking it against (or creating) the store's key-check record.
    fn unlock(
        backend: &dyn Backend,
        key: &crate::EncryptionKey,
        clock: &dyn Clock,
    ) -> Result<Cipher> {
        for _ in 0..3 {
            if let Some(record) = backend.get(KEYCHECK_KEY)? {
                // The record is untrusted: bounded before parsing, its parameters bounded
                // before the (costly) key derivation, and bound into what it seals.
                if record.value.len() > KEYCHECK_MAX_LEN {
                    return Err(StorageError::corrupt(
                        KEYCHECK_KEY,
                        format!(
                            "key-check record of {} bytes (at most {KEYCHECK_MAX_LEN}): edited or damaged",
                            record.value.len()
                        ),
                    ));
                }
                let check: KeyCheck = serde_json::from_slice(&record.value).map_err(|e| {
                    StorageError::corrupt(KEYCHECK_KEY, format!("key-check record: {e}"))
                })?;
                if let Some(params) = &check.kdf {
                    params.check_bounds().map_err(|reason| {
                        StorageError::corrupt(
                            KEYCHECK_KEY,
                            format!("key-derivation parameters refused: {reason}"),
                        )
                    })?;
                }
                if key.is_passphrase() != check.kdf.is_some() {
                    return Err(StorageError::WrongEncryptionKey);
                }
                let cipher = Cipher::new(key, check.kdf.as_ref())?;
                return match codec::envelope::open(KEYCHECK_KEY, &check.sealed, Some(&cipher)) {
                    Ok((payload, _))
                        if payload == keycheck_payload(check.kdf.as_ref())
                            || payload == KEYCHECK_PAYLOAD_V1 =>
                    {
                        Ok(cipher)
                    }
                    Ok(_) | Err(StorageError::DecryptionFailed { .. }) => {
                        Err(StorageError::WrongEncryptionKey)
                    }
                    Err(e) => Err(e),
                };
            }
            let kdf = if key.is_passphrase() {
                Some(KdfParams::generate()?)
            } else {
                None
            };
            let cipher = Cipher::new(key, kdf.as_ref())?;
            let seal = SealOptions {
                format: Format::Raw,
                compression: Compression::Off,
                encrypt: true,
            };
            let payload = keycheck_payload(kdf.as_ref());
            let (sealed, _) = codec::envelope::seal(KEYCHECK_KEY, &payload, &seal, Some(&cipher))?;
            let value = serde_json::to_vec(&KeyCheck { kdf, sealed })
                .map_err(|e| StorageError::backend("store", e))?;
            let now = clock.now();
            let record = Record {
                meta: internal_meta(now, value.len()),
                value,
            };
            let op = WriteOp::Put {
                key: KEYCHECK_KEY.to_owned(),
                record,
                mode: PutMode::CreateOnly,
            };
            match backend.write(vec![op], now) {
                Ok(_) => return Ok(cipher),
                // Another process created it first: go round and check against theirs.
                Err(StorageError::AlreadyExists { .. }) => continue,
                Err(e) => return Err(e),
            }
        }
        Err(StorageError::backend(
            backend.backend_type(),
            "the key-check record keeps changing under us",
        ))
    }
}

fn internal_meta(now: Timestamp, size: usize) -> RecordMeta {
    RecordMeta {
        created_at: now,
        modified_at: now,
        accessed_at: now,
        expires_at: None,
        size: size as u64,
        compressed: false,
        encrypted: false,
        custom: CustomMetadata::new(),
        version: RecordVersion::fresh(),
    }
}
