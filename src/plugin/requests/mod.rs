//! The messages a game sends to the storage plugin, and the responses it gets back.
//!
//! Every request carries a [`RequestId`] assigned when it is constructed. The plugin answers
//! every request exactly once, with a response that carries the same id, both as a
//! [`Message`] (read it with a `MessageReader`) and as an observer [`Event`] (watch it with
//! `app.add_observer(|done: On<LoadCompleted>| ..)`).
//!
//! | Request              | Response               | `result` on success                   |
//! |----------------------|------------------------|---------------------------------------|
//! | [`SaveRequest`]      | [`SaveCompleted`]      | `()`                                  |
//! | [`LoadRequest`]      | [`LoadCompleted`]      | `Option<LoadedValue>` ([`LoadCompleted::decode`]) |
//! | [`DeleteRequest`]    | [`DeleteCompleted`]    | `bool`: a live record was removed     |
//! | [`ExistsRequest`]    | [`ExistsCompleted`]    | `bool`                                |
//! | [`ListKeysRequest`]  | [`ListKeysCompleted`]  | `Vec<String>`, sorted                 |
//! | [`TransactionRequest`] | [`TransactionCompleted`] | `()`                              |
//! | [`ClearRequest`]     | [`ClearCompleted`]     | `()`                                  |
//! | [`TakeRequest`](super::TakeRequest) | [`TakeCompleted`](super::TakeCompleted) | `Option<LoadedValue>`: the record, now deleted |
//!
//! Errors are [`Arc<StorageError>`](StorageError): the same error value can be shared by the
//! message and the event, and by every request of a failed batch.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bevy::prelude::{Event, Message};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::backend::RecordVersion;
use crate::codec::{self, Compression, Format};
use crate::error::StorageError;
use crate::store::{ErasedValue, LoadOptions, SaveOptions, StorageOperation};

mod run;
pub(crate) use run::add_key_value_kinds;

/// An error shared between a response message, its observer event and the other requests
/// of the same batch.
pub type SharedError = Arc<StorageError>;

/// The result type of every response.
pub type StorageResult<T> = Result<T, SharedError>;

static NEXT_REQUEST_ID: AtomicU64 = AtomicU64::new(1);

/// Identifies one request and its response.
///
/// Ids come from a process-wide counter when a request is constructed, so they are unique
/// and increase in construction order. The plugin runs requests that touch the same key in
/// id order (see [`StoragePlugin`](super::StoragePlugin)). A cloned request keeps its id:
/// sending it twice gives two responses with that id.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RequestId(u64);

impl RequestId {
    /// A fresh id.
    pub(crate) fn next() -> Self {
        Self(NEXT_REQUEST_ID.fetch_add(1, Ordering::Relaxed))
    }

    /// The number behind the id.
    pub fn get(self) -> u64 {
        self.0
    }
}

impl fmt::Display for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "#{}", self.0)
    }
}

// ---------------------------------------------------------------------------------------------
// Requests
// ---------------------------------------------------------------------------------------------

/// Saves a value under a key; answered by [`SaveCompleted`].
///
/// The value is serialized (then compressed and encrypted as configured) on the task pool,
/// not when the request is built.
///
/// ```
/// # use bevy_storage::plugin::SaveRequest;
/// # use std::time::Duration;
/// let request = SaveRequest::new("player:1", vec![1, 2, 3])
///     .ttl(Duration::from_secs(3600))
///     .metadata("level", "Crypt of Bones");
/// let id = request.id(); // keep it to match the response
/// # let _ = id;
/// ```
#[derive(Message, Debug, Clone)]
pub struct SaveRequest {
    id: RequestId,
    /// The key.
    pub key: String,
    /// The value, serialized on the task pool.
    pub value: ErasedValue,
    /// TTL, compression, encryption, metadata, overwrite and format of this save.
    pub options: SaveOptions,
}

impl SaveRequest {
    /// Saves `value` under `key` with default options.
    pub fn new<T: Serialize + Send + Sync + 'static>(key: impl Into<String>, value: T) -> Self {
        Self {
            id: RequestId::next(),
            key: key.into(),
            value: ErasedValue::new(value),
            options: SaveOptions::default(),
        }
    }

    /// This request's id.
    pub fn id(&self) -> RequestId {
        self.id
    }

    /// Replaces all save options.
    pub fn with_options(mut self, options: SaveOptions) -> Self {
        self.options = options;
        self
    }

    /// Expire `ttl` after the save.
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.options = self.options.ttl(ttl);
        self
    }

    /// Never expire, even if the store has a default TTL.
    pub fn no_expiry(mut self) -> Self {
        self.options = self.options.no_expiry();
        self
    }

    /// Compresses (or not) regardless of the store default ([`SaveOptions::compression`]).
    pub fn compression(mut self, compression: Compression) -> Self {
        self.options = self.options.compression(compression);
        self
    }

    /// Encrypt (or not) regardless of the store default.
    pub fn encrypt(mut self, on: bool) -> Self {
        self.options = self.options.encrypt(on);
        self
    }

    /// Adds one custom metadata field.
    pub fn metadata(
        mut self,
        field: impl Into<String>,
        value: impl Into<serde_json::Value>,
    ) -> Self {
        self.options = self.options.metadata(field, value);
        self
    }

    /// Whether an existing live record may be replaced (default `true`). A save with
    /// `overwrite(false)` is never merged into a write batch: its failure is an expected
    /// outcome that must not fail other saves.
    pub fn overwrite(mut self, allowed: bool) -> Self {
        self.options = self.options.overwrite(allowed);
        self
    }

    /// Serde format of this value.
    pub fn format(mut self, format: Format) -> Self {
        self.options = self.options.format(format);
        self
    }

    /// Writes only over the live record of `version` (from [`LoadCompleted::version`] of a
    /// [`LoadRequest::versioned`] load, or [`SaveCompleted::version`] of an earlier save);
    /// otherwise the save fails with [`StorageError::VersionConflict`] and writes nothing
    /// (see [`SaveOptions::if_version`]). Like `overwrite(false)`, such a save is never merged
    /// into a write batch.
    pub fn if_version(mut self, version: RecordVersion) -> Self {
        self.options = self.options.if_version(version);
        self
    }
}

/// Loads the value under a key; answered by [`LoadCompleted`].
#[derive(Message, Debug, Clone)]
pub struct LoadRequest {
    id: RequestId,
    /// The key.
    pub key: String,
    /// Load options.
    pub options: LoadOptions,
    /// Read the version too ([`versioned`](Self::versioned)).
    pub versioned: bool,
}

impl LoadRequest {
    /// Loads `key`.
    pub fn new(key: impl Into<String>) -> Self {
        Self {
            id: RequestId::next(),
            key: key.into(),
            options: LoadOptions::default(),
            versioned: false,
        }
    }

    /// This request's id.
    pub fn id(&self) -> RequestId {
        self.id
    }

    /// Also reads the record's version, for a save conditional on it
    /// ([`SaveRequest::if_version`]): [`LoadCompleted::version`] then has it. Such a load
    /// reads the backend even when the read cache holds the value.
    pub fn versioned(mut self) -> Self {
        self.versioned = true;
        self
    }

    /// Records this read as the record's last access.
    pub fn update_access_time(mut self, on: bool) -> Self {
        self.options = self.options.update_access_time(on);
        self
    }
}

/// Deletes a key; answered by [`DeleteCompleted`]. A missing key is not an error.
#[derive(Message, Debug, Clone)]
pub struct DeleteRequest {
    id: RequestId,
    /// The key.
    pub key: String,
}

impl DeleteRequest {
    /// Deletes `key`.
    pub fn new(key: impl Into<String>) -> Self {
        Self {
            id: RequestId::next(),
            key: key.into(),
        }
    }

    /// This request's id.
    pub fn id(&self) -> RequestId {
        self.id
    }
}

/// Asks whether a live record exists under a key; answered by [`ExistsCompleted`].
#[derive(Message, Debug, Clone)]
pub struct ExistsRequest {
    id: RequestId,
    /// The key.
    pub key: String,
}

impl ExistsRequest {
    /// Checks `key`.
    pub fn new(key: impl Into<String>) -> Self {
        Self {
            id: RequestId::next(),
            key: key.into(),
        }
    }

    /// This request's id.
    pub fn id(&self) -> RequestId {
        self.id
    }
}

/// Lists the live keys starting with a prefix; answered by [`ListKeysCompleted`].
#[derive(Message, Debug, Clone)]
pub struct ListKeysRequest {
    id: RequestId,
    /// The prefix, matched byte for byte (no wildcards); empty lists every key.
    pub prefix: String,
}

impl ListKeysRequest {
    /// Lists the keys starting with `prefix`.
    pub fn new(prefix: impl Into<String>) -> Self {
        Self {
            id: RequestId::next(),
            prefix: prefix.into(),
        }
    }

    /// Lists every key.
    pub fn all() -> Self {
        Self::new("")
    }

    /// This request's id.
    pub fn id(&self) -> RequestId {
        self.id
    }
}

/// Applies saves and deletes all or nothing; answered by [`TransactionCompleted`].
#[derive(Message, Debug, Clone)]
pub struct TransactionRequest {
    id: RequestId,
    /// The operations, applied in order.
    pub operations: Vec<StorageOperation>,
}

impl TransactionRequest {
    /// A transaction of `operations`.
    pub fn new(operations: impl IntoIterator<Item = StorageOperation>) -> Self {
        Self {
            id: RequestId::next(),
            operations: operations.into_iter().collect(),
        }
    }

    /// This request's id.
    pub fn id(&self) -> RequestId {
        self.id
    }
}

/// Removes every record of the store; answered by [`ClearCompleted`]. It runs after every
/// request sent before it and before every request sent after it.
#[derive(Message, Debug, Clone)]
pub struct ClearRequest {
    id: RequestId,
}

impl ClearRequest {
    /// Clears the store.
    pub fn new() -> Self {
        Self {
            id: RequestId::next(),
        }
    }

    /// This request's id.
    pub fn id(&self) -> RequestId {
        self.id
    }
}

impl Default for ClearRequest {
    /// Same as [`ClearRequest::new`] (a fresh id).
    fn default() -> Self {
        Self::new()
    }
}

// ---------------------------------------------------------------------------------------------
// Responses
// ---------------------------------------------------------------------------------------------

/// What every response has: the id of its request and success or failure. Handy for code
/// that tracks requests of any kind.
pub trait StorageResponse {
    /// The id of the request this answers.
    fn id(&self) -> RequestId;
    /// The error, if the request failed.
    fn error(&self) -> Option<&StorageError>;
    /// True when the request succeeded.
    fn is_ok(&self) -> bool {
        self.error().is_none()
    }
}

/// `StorageResponse` for responses with an `id` and a `result` (the world responses use it
/// too).
macro_rules! impl_response {
    ($($ty:ty),* $(,)?) => {$(
        impl $crate::plugin::requests::StorageResponse for $ty {
            fn id(&self) -> $crate::plugin::requests::RequestId {
                self.id
            }
            fn error(&self) -> Option<&$crate::StorageError> {
                self.result.as_ref().err().map(|e| &**e)
            }
        }
    )*};
}
pub(crate) use impl_response;

impl_response!(
    SaveCompleted,
    LoadCompleted,
    DeleteCompleted,
    ExistsCompleted,
    ListKeysCompleted,
    TransactionCompleted,
    ClearCompleted,
);

/// The answer to a [`SaveRequest`].
#[derive(Message, Event, Debug, Clone)]
pub struct SaveCompleted {
    /// The request's id.
    pub id: RequestId,
    /// The key.
    pub key: String,
    /// `Ok(())` once the record is durably stored (or committed with its batch).
    pub result: StorageResult<()>,
    /// The version the save gave the record (`None` when it failed), for a later
    /// [`SaveRequest::if_version`].
    pub version: Option<RecordVersion>,
}

/// The decoded payload of a loaded record (decompressed and decrypted on the task pool),
/// not yet deserialized into a type. Cheap to clone.
#[derive(Clone)]
pub struct LoadedValue {
    payload: Arc<[u8]>,
    format: Format,
    version: Option<RecordVersion>,
}

impl LoadedValue {
    pub(crate) fn new(payload: Vec<u8>, format: Format) -> Self {
        Self {
            payload: payload.into(),
            format,
            version: None,
        }
    }

    /// The record's version, when the load asked for it ([`LoadRequest::versioned`]).
    pub fn version(&self) -> Option<RecordVersion> {
        self.version
    }

    /// Deserializes the value as `T`; `key` names it in errors.
    pub fn decode<T: DeserializeOwned>(&self, key: &str) -> Result<T, StorageError> {
        codec::format::deserialize(key, &self.payload, self.format)
    }

    /// The serialized payload (RON text, postcard bytes, or raw bytes).
    pub fn bytes(&self) -> &[u8] {
        &self.payload
    }

    /// The serde format the payload is in.
    pub fn format(&self) -> Format {
        self.format
    }
}

impl fmt::Debug for LoadedValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LoadedValue")
            .field("format", &self.format)
            .field("len", &self.payload.len())
            .finish()
    }
}

/// The answer to a [`LoadRequest`].
///
/// ```
/// # use bevy_storage::plugin::LoadCompleted;
/// fn on_loaded(done: &LoadCompleted) {
///     match done.decode::<u32>() {
///         Ok(Some(gold)) => println!("{}: {gold}", done.key),
///         Ok(None) => println!("{} is not saved yet", done.key),
///         Err(e) => eprintln!("{e}"),
///     }
/// }
/// ```
#[derive(Message, Event, Debug, Clone)]
pub struct LoadCompleted {
    /// The request's id.
    pub id: RequestId,
    /// The key.
    pub key: String,
    /// The payload (`None`: no live record), or why the load failed.
    pub result: StorageResult<Option<LoadedValue>>,
}

impl LoadCompleted {
    /// Deserializes the loaded value as `T`: `Ok(None)` when the key had no live record,
    /// `Err` when the load failed or the record is another type. Decompression and
    /// decryption already ran on the task pool; this runs serde only.
    pub fn decode<T: DeserializeOwned>(&self) -> StorageResult<Option<T>> {
        match &self.result {
            Ok(Some(value)) => value.decode(&self.key).map(Some).map_err(Arc::new),
            Ok(None) => Ok(None),
            Err(e) => Err(Arc::clone(e)),
        }
    }

    /// Like [`decode`](Self::decode), with `T::default()` for a missing record.
    pub fn decode_or_default<T: DeserializeOwned + Default>(&self) -> StorageResult<T> {
        self.decode().map(Option::unwrap_or_default)
    }

    /// The record's version, for a save conditional on it ([`SaveRequest::if_version`]):
    /// `Some` when the request was [`versioned`](LoadRequest::versioned) and found a live
    /// record.
    pub fn version(&self) -> Option<RecordVersion> {
        self.result.as_ref().ok()?.as_ref()?.version
    }

    /// True when the load succeeded and found a live record.
    pub fn found(&self) -> bool {
        matches!(self.result, Ok(Some(_)))
    }
}

/// The answer to a [`DeleteRequest`].
#[derive(Message, Event, Debug, Clone)]
pub struct DeleteCompleted {
    /// The request's id.
    pub id: RequestId,
    /// The key.
    pub key: String,
    /// `Ok(true)` when a live record was removed, `Ok(false)` when there was none.
    pub result: StorageResult<bool>,
}

/// The answer to an [`ExistsRequest`].
#[derive(Message, Event, Debug, Clone)]
pub struct ExistsCompleted {
    /// The request's id.
    pub id: RequestId,
    /// The key.
    pub key: String,
    /// Whether a live record exists.
    pub result: StorageResult<bool>,
}

/// The answer to a [`ListKeysRequest`].
#[derive(Message, Event, Debug, Clone)]
pub struct ListKeysCompleted {
    /// The request's id.
    pub id: RequestId,
    /// The prefix that was listed.
    pub prefix: String,
    /// The live keys with that prefix, sorted.
    pub result: StorageResult<Vec<String>>,
}

/// The answer to a [`TransactionRequest`].
#[derive(Message, Event, Debug, Clone)]
pub struct TransactionCompleted {
    /// The request's id.
    pub id: RequestId,
    /// The keys the transaction touched, in operation order.
    pub keys: Vec<String>,
    /// `Ok(())` when every operation was applied; on error none was.
    pub result: StorageResult<()>,
}

/// The answer to a [`ClearRequest`].
#[derive(Message, Event, Debug, Clone)]
pub struct ClearCompleted {
    /// The request's id.
    pub id: RequestId,
    /// `Ok(())` once the store is empty.
    pub result: StorageResult<()>,
}

/// Sent after each TTL cleanup (every `cleanup_interval`), as a message and an event.
#[derive(Message, Event, Debug, Clone)]
pub struct ExpiredPurged {
    /// How many expired records were removed, or why the cleanup failed.
    pub result: StorageResult<usize>,
}

impl ExpiredPurged {
    /// How many records were removed (0 when the cleanup failed).
    pub fn removed(&self) -> usize {
        self.result.as_ref().copied().unwrap_or(0)
    }
}

/// Sent when the startup load of a persisted resource (see
/// [`PersistResourceExt`](super::PersistResourceExt)) finishes, as a message and an event.
#[derive(Message, Event, Debug, Clone)]
pub struct PersistedResourceLoaded {
    /// The storage key of the resource.
    pub key: String,
    /// The resource's type name.
    pub type_name: &'static str,
    /// `Ok(true)`: the stored value replaced the default; `Ok(false)`: nothing was stored,
    /// the default stays; `Err`: the load failed and the default stays.
    pub result: StorageResult<bool>,
}

/// Sent when a persisted resource was saved after a change, as a message and an event.
#[derive(Message, Event, Debug, Clone)]
pub struct PersistedResourceSaved {
    /// The storage key of the resource.
    pub key: String,
    /// The resource's type name.
    pub type_name: &'static str,
    /// The outcome of the save.
    pub result: StorageResult<()>,
}
