//! A thin [`Commands`] extension over the request messages.

use bevy::prelude::Commands;
use serde::Serialize;

use super::requests::*;
use crate::store::{SaveOptions, StorageOperation};

/// Sends storage requests from any system with [`Commands`]. Each method writes one
/// request message (see [`requests`](super::requests)) and returns its id; the response
/// arrives like that of a message sent directly.
///
/// ```
/// # use bevy::prelude::*;
/// # use bevy_storage::prelude::*;
/// fn save_gold(mut commands: Commands) {
///     let id = commands.save("player:gold", 120u32);
///     let _load = commands.load("player:gold");
///     # let _ = id;
/// }
/// ```
pub trait StorageCommandsExt {
    /// Saves `value` under `key` with default options ([`SaveRequest`]).
    fn save<T: Serialize + Send + Sync + 'static>(
        &mut self,
        key: impl Into<String>,
        value: T,
    ) -> RequestId;
    /// Saves `value` under `key` with `options` ([`SaveRequest`]).
    fn save_with<T: Serialize + Send + Sync + 'static>(
        &mut self,
        key: impl Into<String>,
        value: T,
        options: SaveOptions,
    ) -> RequestId;
    /// Loads `key` ([`LoadRequest`]).
    fn load(&mut self, key: impl Into<String>) -> RequestId;
    /// Deletes `key` ([`DeleteRequest`]).
    fn delete(&mut self, key: impl Into<String>) -> RequestId;
    /// Checks whether `key` exists ([`ExistsRequest`]).
    fn exists(&mut self, key: impl Into<String>) -> RequestId;
    /// Lists the keys starting with `prefix` ([`ListKeysRequest`]).
    fn list_keys(&mut self, prefix: impl Into<String>) -> RequestId;
    /// Applies `operations` all or nothing ([`TransactionRequest`]).
    fn transaction(&mut self, operations: impl IntoIterator<Item = StorageOperation>) -> RequestId;
    /// Removes every record ([`ClearRequest`]); named like [`Store::clear`](crate::Store::clear).
    fn clear(&mut self) -> RequestId;
    /// Removes every record ([`ClearRequest`]).
    #[deprecated(note = "use `clear()`, named like `Store::clear` and `ClearRequest`")]
    fn clear_storage(&mut self) -> RequestId {
        self.clear()
    }
}

impl StorageCommandsExt for Commands<'_, '_> {
    fn save<T: Serialize + Send + Sync + 'static>(
        &mut self,
        key: impl Into<String>,
        value: T,
    ) -> RequestId {
        let request = SaveRequest::new(key, value);
        let id = request.id();
        self.write_message(request);
        id
    }

    fn save_with<T: Serialize + Send + Sync + 'static>(
        &mut self,
        key: impl Into<String>,
        value: T,
        options: SaveOptions,
    ) -> RequestId {
        let request = SaveRequest::new(key, value).with_options(options);
        let id = request.id();
        self.write_message(request);
        id
    }

    fn load(&mut self, key: impl Into<String>) -> RequestId {
        let request = LoadRequest::new(key);
        let id = request.id();
        self.write_message(request);
        id
    }

    fn delete(&mut self, key: impl Into<String>) -> RequestId {
        let request = DeleteRequest::new(key);
        let id = request.id();
        self.write_message(request);
        id
    }

    fn exists(&mut self, key: impl Into<String>) -> RequestId {
        let request = ExistsRequest::new(key);
        let id = request.id();
        self.write_message(request);
        id
    }

    fn list_keys(&mut self, prefix: impl Into<String>) -> RequestId {
        let request = ListKeysRequest::new(prefix);
        let id = request.id();
        self.write_message(request);
        id
    }

    fn transaction(&mut self, operations: impl IntoIterator<Item = StorageOperation>) -> RequestId {
        let request = TransactionRequest::new(operations);
        let id = request.id();
        self.write_message(request);
        id
    }

    fn clear(&mut self) -> RequestId {
        let request = ClearRequest::new();
        let id = request.id();
        self.write_message(request);
        id
    }
}
