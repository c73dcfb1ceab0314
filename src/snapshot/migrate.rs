//! Migrations: turning the values of an older snapshot into the current types.

use std::sync::Arc;

use bevy::prelude::*;
use serde::de::DeserializeOwned;

use super::columns::{LoadedColumn, LoadedResource, TypedLoaded, TypedResourceLoaded};

type ColumnDecoder = dyn Fn(
        &mut dyn erased_serde::Deserializer<'_>,
    ) -> Result<Box<dyn LoadedColumn>, erased_serde::Error>
    + Send
    + Sync;
type ResourceDecoder = dyn Fn(
        &mut dyn erased_serde::Deserializer<'_>,
    ) -> Result<Box<dyn LoadedResource>, erased_serde::Error>
    + Send
    + Sync;

struct Migration<D: ?Sized> {
    old_type_path: String,
    since: u32,
    decode: Box<D>,
}

/// The migrations a game registered, by old type path and the version that changed it.
#[derive(Clone, Default)]
pub struct Migrations {
    components: Vec<Arc<Migration<ColumnDecoder>>>,
    resources: Vec<Arc<Migration<ResourceDecoder>>>,
}

/// The migration that applies to a snapshot of `version`: among those for this type path
/// introduced after `version`, the earliest (it describes the shape `version` wrote).
fn pick<'a, D: ?Sized>(
    list: &'a [Arc<Migration<D>>],
    type_path: &str,
    version: u32,
) -> Option<&'a D> {
    list.iter()
        .filter(|m| m.old_type_path == type_path && m.since > version)
        .min_by_key(|m| m.since)
        .map(|m| &*m.decode)
}

impl Migrations {
    pub(crate) fn add_component<Old, New>(
        &mut self,
        old_type_path: &str,
        since: u32,
        upgrade: impl Fn(Old) -> New + Send + Sync + 'static,
    ) where
        Old: DeserializeOwned + 'static,
        New: Component + 'static,
    {
        let decode = move |de: &mut dyn erased_serde::Deserializer<'_>| {
            let old: Vec<Old> = erased_serde::deserialize(de)?;
            let values: Vec<New> = old.into_iter().map(&upgrade).collect();
            Ok(Box::new(TypedLoaded { values, save: None }) as Box<dyn LoadedColumn>)
        };
        self.components.push(Arc::new(Migration {
            old_type_path: old_type_path.to_owned(),
            since,
            decode: Box::new(decode),
        }));
    }

    pub(crate) fn add_resource<Old, New>(
        &mut self,
        old_type_path: &str,
        since: u32,
        upgrade: impl Fn(Old) -> New + Send + Sync + 'static,
    ) where
        Old: DeserializeOwned + 'static,
        New: Resource + 'static,
    {
        let decode = move |de: &mut dyn erased_serde::Deserializer<'_>| {
            let old: Old = erased_serde::deserialize(de)?;
            Ok(Box::new(TypedResourceLoaded {
                value: upgrade(old),
            }) as Box<dyn LoadedResource>)
        };
        self.resources.push(Arc::new(Migration {
            old_type_path: old_type_path.to_owned(),
            since,
            decode: Box::new(decode),
        }));
    }

    pub(crate) fn component(&self, type_path: &str, version: u32) -> Option<&ColumnDecoder> {
        pick(&self.components, type_path, version)
    }

    pub(crate) fn resource(&self, type_path: &str, version: u32) -> Option<&ResourceDecoder> {
        pick(&self.resources, type_path, version)
    }
}
