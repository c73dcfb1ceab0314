//! [`TakeRequest`]: load and delete a key atomically, answered by [`TakeCompleted`].
//!
//! A key-value request kind like the others of [`requests`](super::requests): ordered per key
//! with them (a save, a take and a load of one key sent in one frame run in that order), run
//! on the task pool with [`Store::take`].

use std::sync::Arc;

use bevy::prelude::{Event, Message, World};
use serde::de::DeserializeOwned;

use super::kind::RequestKind;
use super::requests::{LoadedValue, RequestId, SharedError, StorageResult};
use super::scope::Scope;
use crate::codec::{self, EnvelopeInfo, Format};
use crate::error::StorageError;
use crate::store::{LoadOptions, Store};

/// Checks on the pool that a payload decodes as the requested type, before the record is
/// removed.
type Check = fn(&str, &[u8], Format) -> Result<(), StorageError>;

fn decodes_as<T: DeserializeOwned>(
    key: &str,
    payload: &[u8],
    format: Format,
) -> Result<(), StorageError> {
    codec::format::deserialize::<T>(key, payload, format).map(drop)
}

/// Loads the value under a key and deletes it, atomically (bevy_pkv's `remove_and_get`);
/// answered by [`TakeCompleted`]. Of several takes of one key (from this app or another
/// process sharing the store) exactly one gets the value.
///
/// [`TakeRequest::new::<T>`](Self::new) checks on the task pool that the record decodes as
/// `T` **before** it is deleted: a record of another type (or one that cannot be decrypted)
/// fails the request and stays stored. [`TakeRequest::bytes`] removes the record once its
/// envelope opened, whatever its payload.
///
/// ```
/// # use bevy::prelude::*;
/// # use bevy_storage::plugin::{TakeCompleted, TakeRequest};
/// fn claim_reward(mut takes: MessageWriter<TakeRequest>) {
///     takes.write(TakeRequest::new::<u32>("reward:daily"));
/// }
/// fn on_taken(mut done: MessageReader<TakeCompleted>) {
///     for taken in done.read() {
///         if let Ok(Some(gold)) = taken.decode::<u32>() {
///             println!("claimed {gold} gold");
///         }
///     }
/// }
/// ```
#[derive(Message, Debug, Clone)]
pub struct TakeRequest {
    id: RequestId,
    /// The key.
    pub key: String,
    /// Load options (`accept_plaintext`; an access time is not recorded, the record goes).
    pub options: LoadOptions,
    check: Option<Check>,
}

impl TakeRequest {
    /// Takes `key`, deleting it only if it decodes as `T`.
    pub fn new<T: DeserializeOwned>(key: impl Into<String>) -> Self {
        Self {
            id: RequestId::next(),
            key: key.into(),
            options: LoadOptions::default(),
            check: Some(decodes_as::<T>),
        }
    }

    /// Takes `key` without a type: the record is deleted once it was read, checked and
    /// decrypted, and its payload arrives in [`TakeCompleted`] to decode as any type.
    pub fn bytes(key: impl Into<String>) -> Self {
        Self {
            id: RequestId::next(),
            key: key.into(),
            options: LoadOptions::default(),
            check: None,
        }
    }

    /// Replaces the load options.
    pub fn with_options(mut self, options: LoadOptions) -> Self {
        self.options = options;
        self
    }

    /// This request's id.
    pub fn id(&self) -> RequestId {
        self.id
    }

    fn completed(&self, result: StorageResult<Option<LoadedValue>>) -> TakeCompleted {
        TakeCompleted {
            id: self.id,
            key: self.key.clone(),
            result,
        }
    }
}

/// The answer to a [`TakeRequest`].
#[derive(Message, Event, Debug, Clone)]
pub struct TakeCompleted {
    /// The request's id.
    pub id: RequestId,
    /// The key.
    pub key: String,
    /// The taken payload (`None`: there was no live record), or why the take failed (then
    /// nothing was deleted).
    pub result: StorageResult<Option<LoadedValue>>,
}

impl TakeCompleted {
    /// Deserializes the taken value as `T`: `Ok(None)` when there was no live record.
    pub fn decode<T: DeserializeOwned>(&self) -> StorageResult<Option<T>> {
        match &self.result {
            Ok(Some(value)) => value.decode(&self.key).map(Some).map_err(Arc::new),
            Ok(None) => Ok(None),
            Err(e) => Err(Arc::clone(e)),
        }
    }

    /// True when the take succeeded and removed a live record.
    pub fn found(&self) -> bool {
        matches!(self.result, Ok(Some(_)))
    }
}

super::requests::impl_response!(TakeCompleted);

impl RequestKind for TakeRequest {
    type Response = TakeCompleted;
    type Input = ();
    type Output = TakeCompleted;

    fn id(&self) -> RequestId {
        self.id
    }

    fn scope(&self) -> Scope {
        Scope::key(&self.key)
    }

    fn input(&self, _world: &mut World) -> Result<(), SharedError> {
        Ok(())
    }

    fn run(&self, store: &Store, (): ()) -> TakeCompleted {
        let key = &self.key;
        let check = |payload: &[u8], info: EnvelopeInfo| match self.check {
            Some(check) => check(key, payload, info.format),
            None => Ok(()),
        };
        let result = store
            .take_with(key, &self.options, check)
            .map(|taken| taken.map(|((), payload, info)| LoadedValue::new(payload, info.format)))
            .map_err(Arc::new);
        self.completed(result)
    }

    fn finish(&self, _world: &mut World, output: TakeCompleted) -> TakeCompleted {
        output
    }

    fn fail(&self, error: SharedError) -> TakeCompleted {
        self.completed(Err(error))
    }
}
