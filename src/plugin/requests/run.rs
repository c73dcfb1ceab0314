//! How each key-value request kind runs (see `kind::RequestKind`): its scope of keys, its
//! work against the [`Store`] on the task pool, and how several merge into one batch.

use std::sync::Arc;

use bevy::prelude::World;

use super::*;
use crate::error::StorageError;
use crate::key;
use crate::plugin::kind::{RequestKind, add_request_kind};
use crate::plugin::scope::Scope;
use crate::store::{Committed, StorageOperation, Store};

// ---------------------------------------------------------------------------------------------
// How each kind runs (see `kind::RequestKind`)
// ---------------------------------------------------------------------------------------------

/// Registers the key-value request kinds.
pub(crate) fn add_key_value_kinds(app: &mut bevy::prelude::App) {
    add_request_kind::<SaveRequest>(app);
    add_request_kind::<LoadRequest>(app);
    add_request_kind::<DeleteRequest>(app);
    add_request_kind::<ExistsRequest>(app);
    add_request_kind::<ListKeysRequest>(app);
    add_request_kind::<TransactionRequest>(app);
    add_request_kind::<ClearRequest>(app);
    add_request_kind::<crate::plugin::take::TakeRequest>(app);
}

/// The parts every key-value kind shares: no input from the world, and the pool's output is
/// the response itself.
macro_rules! key_value_kind {
    ($response:ty) => {
        type Response = $response;
        type Input = ();
        type Output = $response;

        fn id(&self) -> RequestId {
            self.id
        }

        fn input(&self, _world: &mut World) -> Result<(), SharedError> {
            Ok(())
        }

        fn finish(&self, _world: &mut World, output: $response) -> $response {
            output
        }
    };
}

fn shared(e: StorageError) -> SharedError {
    Arc::new(e)
}

impl RequestKind for SaveRequest {
    key_value_kind!(SaveCompleted);

    fn scope(&self) -> Scope {
        Scope::key(&self.key)
    }

    fn run(&self, store: &Store, (): ()) -> SaveCompleted {
        match store.transaction_outcomes(vec![self.operation()]) {
            Ok(committed) => self.batched(committed.first().copied().unwrap_or(Committed {
                removed: false,
                version: None,
            })),
            Err(e) => self.fail(shared(e)),
        }
    }

    fn fail(&self, error: SharedError) -> SaveCompleted {
        SaveCompleted {
            id: self.id,
            key: self.key.clone(),
            result: Err(error),
            version: None,
        }
    }

    /// Valid-key saves that may overwrite unconditionally join batches: a bad key, a
    /// create-only or a versioned save fails on its own, never a whole batch.
    fn batch_operation(&self) -> Option<StorageOperation> {
        let batchable = self.options.overwrite
            && self.options.if_version.is_none()
            && key::validate_key(&self.key).is_ok();
        batchable.then(|| self.operation())
    }

    fn batched(&self, committed: Committed) -> SaveCompleted {
        SaveCompleted {
            id: self.id,
            key: self.key.clone(),
            result: Ok(()),
            version: committed.version,
        }
    }
}

impl SaveRequest {
    fn operation(&self) -> StorageOperation {
        StorageOperation::Save {
            key: self.key.clone(),
            value: self.value.clone(),
            options: self.options.clone(),
        }
    }
}

impl RequestKind for LoadRequest {
    key_value_kind!(LoadCompleted);

    fn scope(&self) -> Scope {
        Scope::key(&self.key)
    }

    fn run(&self, store: &Store, (): ()) -> LoadCompleted {
        let result = if self.versioned {
            store
                .load_bytes_versioned(&self.key, &self.options)
                .map(|found| {
                    found.map(|(payload, info, version)| LoadedValue {
                        version: Some(version),
                        ..LoadedValue::new(payload, info.format)
                    })
                })
        } else {
            store
                .load_bytes(&self.key, &self.options)
                .map(|found| found.map(|(payload, info)| LoadedValue::new(payload, info.format)))
        };
        LoadCompleted {
            id: self.id,
            key: self.key.clone(),
            result: result.map_err(shared),
        }
    }

    fn fail(&self, error: SharedError) -> LoadCompleted {
        LoadCompleted {
            id: self.id,
            key: self.key.clone(),
            result: Err(error),
        }
    }
}

impl RequestKind for DeleteRequest {
    key_value_kind!(DeleteCompleted);

    fn scope(&self) -> Scope {
        Scope::key(&self.key)
    }

    fn run(&self, store: &Store, (): ()) -> DeleteCompleted {
        self.batched_result(store.delete(&self.key).map_err(shared))
    }

    fn fail(&self, error: SharedError) -> DeleteCompleted {
        self.batched_result(Err(error))
    }

    fn batch_operation(&self) -> Option<StorageOperation> {
        key::validate_key(&self.key)
            .is_ok()
            .then(|| StorageOperation::delete(self.key.clone()))
    }

    fn batched(&self, committed: Committed) -> DeleteCompleted {
        self.batched_result(Ok(committed.removed))
    }
}

impl DeleteRequest {
    fn batched_result(&self, result: StorageResult<bool>) -> DeleteCompleted {
        DeleteCompleted {
            id: self.id,
            key: self.key.clone(),
            result,
        }
    }
}

impl RequestKind for ExistsRequest {
    key_value_kind!(ExistsCompleted);

    fn scope(&self) -> Scope {
        Scope::key(&self.key)
    }

    fn run(&self, store: &Store, (): ()) -> ExistsCompleted {
        ExistsCompleted {
            id: self.id,
            key: self.key.clone(),
            result: store.exists(&self.key).map_err(shared),
        }
    }

    fn fail(&self, error: SharedError) -> ExistsCompleted {
        ExistsCompleted {
            id: self.id,
            key: self.key.clone(),
            result: Err(error),
        }
    }
}

impl RequestKind for ListKeysRequest {
    key_value_kind!(ListKeysCompleted);

    fn scope(&self) -> Scope {
        Scope::prefix(&self.prefix)
    }

    fn run(&self, store: &Store, (): ()) -> ListKeysCompleted {
        ListKeysCompleted {
            id: self.id,
            prefix: self.prefix.clone(),
            result: store.list_keys(&self.prefix).map_err(shared),
        }
    }

    fn fail(&self, error: SharedError) -> ListKeysCompleted {
        ListKeysCompleted {
            id: self.id,
            prefix: self.prefix.clone(),
            result: Err(error),
        }
    }
}

impl RequestKind for TransactionRequest {
    key_value_kind!(TransactionCompleted);

    fn scope(&self) -> Scope {
        Scope::keys(self.operations.iter().map(|o| o.key().to_owned()))
    }

    fn run(&self, store: &Store, (): ()) -> TransactionCompleted {
        self.completed(store.transaction(self.operations.clone()).map_err(shared))
    }

    fn fail(&self, error: SharedError) -> TransactionCompleted {
        self.completed(Err(error))
    }
}

impl TransactionRequest {
    fn completed(&self, result: StorageResult<()>) -> TransactionCompleted {
        TransactionCompleted {
            id: self.id,
            keys: self.operations.iter().map(|o| o.key().to_owned()).collect(),
            result,
        }
    }
}

impl RequestKind for ClearRequest {
    key_value_kind!(ClearCompleted);

    fn scope(&self) -> Scope {
        Scope::all()
    }

    fn run(&self, store: &Store, (): ()) -> ClearCompleted {
        ClearCompleted {
            id: self.id,
            result: store.clear().map_err(shared),
        }
    }

    fn fail(&self, error: SharedError) -> ClearCompleted {
        ClearCompleted {
            id: self.id,
            result: Err(error),
        }
    }
}
