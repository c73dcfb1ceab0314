//! Steps 2 and 3, on any thread: a captured world ⇄ bytes. The bytes are a
//! header (`header.rs`) followed by the body
//! `(entities, [(type path, rows, values)], [(type path, value)])` in RON or postcard.

use std::any::TypeId;
use std::cell::RefCell;
use std::fmt;

use bevy::asset::AssetPath;
use bevy::asset::{AssetId, AssetServer, HandleDeserializeProcessor, LoadFromPath, UntypedHandle};
use bevy::ecs::reflect::{AppTypeRegistry, ReflectComponent, ReflectResource};
use bevy::prelude::*;
use bevy::reflect::serde::TypedReflectDeserializer;
use bevy::reflect::{PartialReflect, ReflectFromReflect, TypeRegistration, TypeRegistry};
use serde::de::{DeserializeSeed, Error as _, SeqAccess, Visitor};
use serde::ser::{SerializeSeq, SerializeTuple};
use serde::{Deserializer, Serialize, Serializer};

use super::SnapshotRegistry;
use super::apply::DecodedWorld;
use super::capture::CapturedWorld;
use super::columns::{
    CapturedColumn, LoadedColumn, LoadedResource, ReflectLoaded, ReflectResourceLoaded,
    ReflectValues,
};
use super::header::{
    HEADER_LEN, SNAPSHOT_FORMAT_VERSION, SnapshotEncoding, SnapshotHeader, read_header,
};
use crate::codec::depth::{Bounded, BoundedValue, DepthBudget, MAX_DEPTH};
use crate::codec::format::{AppendTo, ron_options};
use crate::error::{Result, StorageError};

impl CapturedWorld {
    /// Serializes the captured world (run it on a task pool: this is the expensive part).
    pub fn encode(mut self) -> Result<Vec<u8>> {
        for column in &mut self.columns {
            column.sort_by_row();
        }
        let reg = self.registry.read();
        let body = Body {
            entities: &self.entities,
            columns: &self.columns,
            resources: &self.resources,
            registry: &reg,
        };
        let header = SnapshotHeader {
            format_version: SNAPSHOT_FORMAT_VERSION,
            encoding: self.encoding,
            game_version: self.game_version,
            entity_count: self.entities.len() as u32,
        };
        encode_body(
            self.encoding,
            &header.to_bytes(),
            64 * self.entities.len(),
            &body,
        )
    }
}

impl DecodedWorld {
    /// Serializes a decoded world again as a whole snapshot of `encoding` and
    /// `game_version` (run it on a task pool): how a chain merged by `ChainMerge` becomes
    /// a new base without capturing the world. Decoding the result gives this world back,
    /// value for value and in the same row order (so relationships replay in the same
    /// order). Fails for values that have no saved form (a migration's output).
    pub(crate) fn encode(&self, encoding: SnapshotEncoding, game_version: u32) -> Result<Vec<u8>> {
        let reg = self.registry.read();
        let no_saved_form = |what: &str| {
            StorageError::Snapshot(format!(
                "{what} was migrated while loading and cannot be written back as it was saved"
            ))
        };
        let mut columns = Vec::with_capacity(self.columns.len());
        for (type_path, rows, column) in &self.columns {
            let values = column
                .saved_values(&reg)
                .ok_or_else(|| no_saved_form(type_path))?;
            columns.push((type_path.as_str(), rows.as_slice(), values));
        }
        let mut resources = Vec::with_capacity(self.resources.len());
        for (type_path, resource) in &self.resources {
            let value = resource
                .saved_value(&reg)
                .ok_or_else(|| no_saved_form(type_path))?;
            resources.push((type_path.as_str(), value));
        }
        let entities: Vec<u64> = self.entities.iter().map(|e| e.to_bits()).collect();
        let body = ReencodedBody {
            entities: &entities,
            columns: &columns,
            resources: &resources,
        };
        let header = SnapshotHeader {
            format_version: SNAPSHOT_FORMAT_VERSION,
            encoding,
            game_version,
            entity_count: entities.len() as u32,
        };
        encode_body(encoding, &header.to_bytes(), 64 * entities.len(), &body)
    }
}

type SavedValues<'a> = Box<dyn erased_serde::Serialize + 'a>;

/// The body of [`DecodedWorld::encode`]: the shape of [`Body`] from decoded values.
struct ReencodedBody<'a> {
    entities: &'a [u64],
    columns: &'a [(&'a str, &'a [u32], SavedValues<'a>)],
    resources: &'a [(&'a str, SavedValues<'a>)],
}

impl Serialize for ReencodedBody<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let columns: Vec<(&str, &[u32], &dyn erased_serde::Serialize)> = self
            .columns
            .iter()
            .map(|(path, rows, values)| (*path, *rows, &**values))
            .collect();
        let resources: Vec<(&str, &dyn erased_serde::Serialize)> = self
            .resources
            .iter()
            .map(|(path, value)| (*path, &**value))
            .collect();
        let mut t = serializer.serialize_tuple(3)?;
        t.serialize_element(self.entities)?;
        t.serialize_element(&columns)?;
        t.serialize_element(&resources)?;
        t.end()
    }
}

/// `header` followed by `body` serialized as `encoding`, with the decoder's depth count.
pub(super) fn encode_body<B: Serialize>(
    encoding: SnapshotEncoding,
    header: &[u8],
    size_hint: usize,
    body: &B,
) -> Result<Vec<u8>> {
    let mut out = Vec::with_capacity(header.len() + size_hint);
    out.extend_from_slice(header);
    // The same depth count as the decoder's: a world holding a value nested too deeply
    // to load back is refused here, not written.
    let budget = DepthBudget::new(SNAPSHOT_MAX_DEPTH);
    let bounded = BoundedValue::new(body, &budget);
    let failed = |e: &dyn fmt::Display| {
        if budget.exceeded() {
            nesting_too_deep()
        } else {
            StorageError::Snapshot(format!("could not serialize the world: {e}"))
        }
    };
    match encoding {
        SnapshotEncoding::Ron => {
            let text = ron::ser::to_string_pretty(&bounded, ron::ser::PrettyConfig::default())
                .map_err(|e| failed(&e))?;
            out.extend_from_slice(text.as_bytes());
        }
        SnapshotEncoding::Binary => {
            postcard::serialize_with_flavor(&bounded, AppendTo(&mut out))
                .map_err(|e| failed(&e))?;
        }
    }
    Ok(out)
}

struct Body<'a> {
    entities: &'a [u64],
    columns: &'a [Box<dyn CapturedColumn>],
    resources: &'a [(String, Box<dyn PartialReflect>)],
    registry: &'a TypeRegistry,
}

impl Serialize for Body<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut t = serializer.serialize_tuple(3)?;
        t.serialize_element(self.entities)?;
        t.serialize_element(&Columns(self.columns, self.registry))?;
        t.serialize_element(&Resources(self.resources, self.registry))?;
        t.end()
    }
}

pub(super) struct Columns<'a>(
    pub(super) &'a [Box<dyn CapturedColumn>],
    pub(super) &'a TypeRegistry,
);

impl Serialize for Columns<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut seq = serializer.serialize_seq(Some(self.0.len()))?;
        for column in self.0 {
            let values = column.values(self.1);
            seq.serialize_element(&(column.type_path(), column.rows(), &*values))?;
        }
        seq.end()
    }
}

pub(super) struct Resources<'a>(
    pub(super) &'a [(String, Box<dyn PartialReflect>)],
    pub(super) &'a TypeRegistry,
);

impl Serialize for Resources<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut seq = serializer.serialize_seq(Some(self.0.len()))?;
        for (type_path, value) in self.0 {
            let one = ReflectValues {
                values: std::slice::from_ref(value),
                registry: self.1,
            };
            seq.serialize_element(&(type_path, one))?;
        }
        seq.end()
    }
}

/// What decoding needs from the app: the type registry, the snapshot registry (typed columns,
/// migrations), the current game version, and the asset server if there is one. Cheap to
/// clone; build it on the main thread with [`SnapshotContext::from_world`] and move it into a task.
#[derive(Clone)]
pub struct SnapshotContext {
    /// Bevy's type registry.
    pub registry: AppTypeRegistry,
    /// Typed columns and migrations.
    pub snapshots: SnapshotRegistry,
    /// The game version snapshots are migrated to; newer ones are refused.
    pub game_version: u32,
    /// Loads asset handles by path; without it, a snapshot holding handles fails to decode.
    pub asset_server: Option<AssetServer>,
}

impl SnapshotContext {
    /// Gathers the context from a world (its registries, settings and asset server).
    pub fn from_world(world: &mut World) -> Self {
        Self {
            registry: world.get_resource_or_init::<AppTypeRegistry>().clone(),
            snapshots: world
                .get_resource::<SnapshotRegistry>()
                .cloned()
                .unwrap_or_else(SnapshotRegistry::new),
            game_version: world
                .get_resource::<super::SnapshotSettings>()
                .map_or(0, |s| s.game_version),
            asset_server: world.get_resource::<AssetServer>().cloned(),
        }
    }
}

/// Stands in for an asset server in an app without one: remembers what was asked for.
struct NoAssetServer {
    requested: Option<String>,
}

impl LoadFromPath for NoAssetServer {
    fn load_from_path_erased(
        &mut self,
        type_id: TypeId,
        path: AssetPath<'static>,
    ) -> UntypedHandle {
        self.requested.get_or_insert_with(|| path.to_string());
        UntypedHandle::Uuid {
            type_id,
            uuid: AssetId::<()>::DEFAULT_UUID,
        }
    }
}

/// How deeply a snapshot body may nest: [`MAX_DEPTH`] levels for a component's or resource's
/// own value, plus the levels of the body around it (columns, rows, values).
pub const SNAPSHOT_MAX_DEPTH: usize = MAX_DEPTH + 8;

/// The error of a snapshot nested deeper than [`SNAPSHOT_MAX_DEPTH`]; its `key` names the
/// snapshot rather than a record (the caller that knows the slot's key puts it in).
fn nesting_too_deep() -> StorageError {
    StorageError::NestingTooDeep {
        key: "world snapshot".into(),
        limit: SNAPSHOT_MAX_DEPTH,
    }
}

pub(super) struct DecodeState<'a> {
    registry: &'a TypeRegistry,
    snapshots: &'a SnapshotRegistry,
    snapshot_version: u32,
    loader: RefCell<&'a mut dyn LoadFromPath>,
    /// The first typed failure (serde errors only carry text).
    failure: RefCell<Option<StorageError>>,
}

impl DecodeState<'_> {
    fn fail<E: serde::de::Error>(&self, error: StorageError) -> E {
        let message = error.to_string();
        self.failure.borrow_mut().get_or_insert(error);
        E::custom(message)
    }
}

/// Decodes a snapshot (run it on a task pool). Checks the header, migrates older game
/// versions, resolves every type and converts every value, so that
/// [`DecodedWorld::apply`] cannot fail half way.
pub fn decode(bytes: &[u8], context: &SnapshotContext) -> Result<DecodedWorld> {
    let header = read_header(bytes)?;
    if header.game_version > context.game_version {
        return Err(StorageError::SnapshotGameVersionTooNew {
            found: header.game_version,
            current: context.game_version,
        });
    }
    let (entities, columns, resources) = decode_body::<FullBody>(
        header.encoding,
        header.game_version,
        &bytes[HEADER_LEN..],
        context,
    )?;
    let entities = saved_entities(entities)?;
    if entities.len() != header.entity_count as usize {
        return Err(StorageError::Snapshot(format!(
            "header says {} entities, body has {}",
            header.entity_count,
            entities.len()
        )));
    }
    check_columns(&columns, entities.len())?;
    Ok(DecodedWorld {
        header,
        entities,
        columns,
        resources,
        registry: context.registry.clone(),
    })
}

/// Decoded component columns: (type path, rows, values).
pub(super) type LoadedColumns = Vec<(String, Vec<u32>, Box<dyn LoadedColumn>)>;
/// Decoded resources: (type path, value).
pub(super) type LoadedResources = Vec<(String, Box<dyn LoadedResource>)>;

type Parts = (Vec<u64>, LoadedColumns, LoadedResources);

/// The shape of a record body: a tuple of `LEN` elements read by `visit`.
pub(super) trait BodyShape {
    type Value;
    const LEN: usize;
    const WHAT: &'static str;
    fn visit<'de, A: SeqAccess<'de>>(
        state: &DecodeState<'_>,
        seq: A,
    ) -> Result<Self::Value, A::Error>;
}

/// A whole snapshot's body: (entities, columns, resources).
struct FullBody;

impl BodyShape for FullBody {
    type Value = Parts;
    const LEN: usize = 3;
    const WHAT: &'static str = "a snapshot body (entities, components, resources)";
    fn visit<'de, A: SeqAccess<'de>>(
        state: &DecodeState<'_>,
        mut seq: A,
    ) -> Result<Parts, A::Error> {
        let missing = |what| A::Error::custom(format!("snapshot body ends before its {what}"));
        let entities: Vec<u64> = seq.next_element()?.ok_or_else(|| missing("entities"))?;
        let columns = seq
            .next_element_seed(ColumnsSeed(state))?
            .ok_or_else(|| missing("components"))?;
        let resources = seq
            .next_element_seed(ResourcesSeed(state))?
            .ok_or_else(|| missing("resources"))?;
        Ok((entities, columns, resources))
    }
}

/// Decodes a record body of shape `K` (untrusted bytes: bounded nesting, typed errors).
pub(super) fn decode_body<K: BodyShape>(
    encoding: SnapshotEncoding,
    snapshot_version: u32,
    body: &[u8],
    context: &SnapshotContext,
) -> Result<K::Value> {
    let reg = context.registry.read();
    let mut no_assets = NoAssetServer { requested: None };
    let mut server = context.asset_server.clone();
    let loader: &mut dyn LoadFromPath = match server.as_mut() {
        Some(server) => server,
        None => &mut no_assets,
    };
    let state = DecodeState {
        registry: &reg,
        snapshots: &context.snapshots,
        snapshot_version,
        loader: RefCell::new(loader),
        failure: RefCell::new(None),
    };
    // The body is untrusted: its nesting is bounded (see `codec::depth`) on every path, the
    // reflected component values included.
    let budget = DepthBudget::new(SNAPSHOT_MAX_DEPTH);
    let seed = Bounded::seed(BodySeed::<K>(&state, std::marker::PhantomData), &budget);
    let parsed = match encoding {
        SnapshotEncoding::Ron => {
            let mut de = ron::de::Deserializer::from_bytes_with_options(body, &ron_options())
                .map_err(|e| StorageError::Snapshot(format!("snapshot body is not RON: {e}")))?;
            let parsed = seed.deserialize(&mut de);
            parsed
                .and_then(|p| de.end().map(|()| p))
                .map_err(|e| e.to_string())
        }
        SnapshotEncoding::Binary => {
            let mut de = postcard::Deserializer::from_bytes(body);
            let parsed = seed.deserialize(&mut de).map_err(|e| e.to_string());
            parsed.and_then(|p| match de.finalize() {
                Ok([]) => Ok(p),
                Ok(rest) => Err(format!(
                    "{} bytes of garbage after the snapshot",
                    rest.len()
                )),
                Err(e) => Err(e.to_string()),
            })
        }
    };
    let failure = state.failure.into_inner();
    drop(reg);
    let value = match (parsed, failure) {
        _ if budget.exceeded() => return Err(nesting_too_deep()),
        (Err(message), None) if message.contains("Exceeded recursion limit") => {
            return Err(nesting_too_deep());
        }
        (_, Some(typed)) => return Err(typed),
        (Err(message), None) => {
            return Err(StorageError::Snapshot(format!(
                "snapshot is damaged or incompatible: {message}"
            )));
        }
        (Ok(value), None) => value,
    };
    if let Some(path) = no_assets.requested {
        return Err(StorageError::Snapshot(format!(
            "the snapshot refers to the asset {path:?} but the app has no AssetServer (add AssetPlugin) to load it"
        )));
    }
    Ok(value)
}

/// Saved entity ids to entities, refusing bits that are no entity.
pub(super) fn saved_entities(bits: Vec<u64>) -> Result<Vec<Entity>> {
    bits.into_iter()
        .map(|bits| {
            Entity::try_from_bits(bits)
                .ok_or_else(|| StorageError::Snapshot(format!("invalid saved entity id {bits}")))
        })
        .collect()
}

/// Checks that every column has as many rows as values and names rows below `entities`.
pub(super) fn check_columns(columns: &LoadedColumns, entities: usize) -> Result<()> {
    for (type_path, rows, column) in columns {
        if rows.len() != column.len() {
            return Err(StorageError::Snapshot(format!(
                "column {type_path} has {} rows for {} values",
                rows.len(),
                column.len()
            )));
        }
        if let Some(bad) = rows.iter().find(|r| **r as usize >= entities) {
            return Err(StorageError::Snapshot(format!(
                "column {type_path} names entity row {bad} of {entities}"
            )));
        }
    }
    Ok(())
}

struct BodySeed<'s, 'a, K>(&'s DecodeState<'a>, std::marker::PhantomData<fn() -> K>);

impl<'de, K: BodyShape> DeserializeSeed<'de> for BodySeed<'_, '_, K> {
    type Value = K::Value;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<K::Value, D::Error> {
        d.deserialize_tuple(K::LEN, self)
    }
}

impl<'de, K: BodyShape> Visitor<'de> for BodySeed<'_, '_, K> {
    type Value = K::Value;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(K::WHAT)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<K::Value, A::Error> {
        K::visit(self.0, seq)
    }
}

pub(super) struct ColumnsSeed<'s, 'a>(pub(super) &'s DecodeState<'a>);

impl<'de> DeserializeSeed<'de> for ColumnsSeed<'_, '_> {
    type Value = LoadedColumns;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for ColumnsSeed<'_, '_> {
    type Value = LoadedColumns;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a list of component columns")
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut columns = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(4096));
        while let Some(column) = seq.next_element_seed(ColumnSeed(self.0))? {
            columns.push(column);
        }
        Ok(columns)
    }
}

struct ColumnSeed<'s, 'a>(&'s DecodeState<'a>);

impl<'de> DeserializeSeed<'de> for ColumnSeed<'_, '_> {
    type Value = (String, Vec<u32>, Box<dyn LoadedColumn>);
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_tuple(3, self)
    }
}

impl<'de> Visitor<'de> for ColumnSeed<'_, '_> {
    type Value = (String, Vec<u32>, Box<dyn LoadedColumn>);
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a component column (type path, rows, values)")
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let state = self.0;
        let type_path: String = seq
            .next_element()?
            .ok_or_else(|| A::Error::custom("column without a type"))?;
        let rows: Vec<u32> = seq
            .next_element()?
            .ok_or_else(|| A::Error::custom("column without rows"))?;
        let values = if let Some(migrate) = state
            .snapshots
            .migrations
            .component(&type_path, state.snapshot_version)
        {
            seq.next_element_seed(ErasedSeed(|de: &mut dyn erased_serde::Deserializer<'de>| {
                migrate(de)
            }))?
        } else if let Some(codec) = state.snapshots.typed_by_path(&type_path) {
            seq.next_element_seed(ErasedSeed(|de: &mut dyn erased_serde::Deserializer<'de>| {
                codec.deserialize_values(de)
            }))?
        } else {
            let registration =
                reflected(state, &type_path, false).map_err(|e| state.fail::<A::Error>(e))?;
            let component = registration
                .data::<ReflectComponent>()
                .cloned()
                .ok_or_else(|| {
                    state.fail::<A::Error>(StorageError::UnregisteredType {
                        type_path: type_path.clone(),
                    })
                })?;
            let values = seq.next_element_seed(ReflectSeqSeed {
                state,
                registration,
            })?;
            values.map(|values| {
                Box::new(ReflectLoaded { component, values }) as Box<dyn LoadedColumn>
            })
        };
        let values =
            values.ok_or_else(|| A::Error::custom(format!("column {type_path} without values")))?;
        Ok((type_path, rows, values))
    }
}

/// The registration of a reflected type that can be rebuilt from a snapshot.
fn reflected<'r>(
    state: &DecodeState<'r>,
    type_path: &str,
    resource: bool,
) -> Result<&'r TypeRegistration> {
    let registration = state.registry.get_with_type_path(type_path);
    let usable = registration.filter(|r| {
        r.data::<ReflectFromReflect>().is_some()
            && r.data::<ReflectComponent>().is_some()
            && (!resource || r.data::<ReflectResource>().is_some())
    });
    usable.ok_or_else(|| StorageError::UnregisteredType {
        type_path: type_path.to_owned(),
    })
}

/// Hands the format's deserializer, type-erased, to a typed decoder.
struct ErasedSeed<F>(F);

impl<'de, F, T> DeserializeSeed<'de> for ErasedSeed<F>
where
    F: FnOnce(&mut dyn erased_serde::Deserializer<'de>) -> Result<T, erased_serde::Error>,
{
    type Value = T;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<T, D::Error> {
        let mut erased = <dyn erased_serde::Deserializer>::erase(d);
        (self.0)(&mut erased).map_err(D::Error::custom)
    }
}

/// A sequence of reflected values of one type, converted to concrete values.
struct ReflectSeqSeed<'s, 'a> {
    state: &'s DecodeState<'a>,
    registration: &'a TypeRegistration,
}

impl<'de> DeserializeSeed<'de> for ReflectSeqSeed<'_, '_> {
    type Value = Vec<Box<dyn Reflect>>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for ReflectSeqSeed<'_, '_> {
    type Value = Vec<Box<dyn Reflect>>;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "a list of {}", self.registration.type_info().type_path())
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let type_path = self.registration.type_info().type_path();
        let from_reflect = self
            .registration
            .data::<ReflectFromReflect>()
            .ok_or_else(|| {
                self.state.fail::<A::Error>(StorageError::UnregisteredType {
                    type_path: type_path.into(),
                })
            })?;
        let mut values = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(1 << 16));
        loop {
            let mut loader = self.state.loader.borrow_mut();
            let mut processor = HandleDeserializeProcessor {
                load_from_path: &mut **loader,
            };
            let seed = TypedReflectDeserializer::with_processor(
                self.registration,
                self.state.registry,
                &mut processor,
            );
            let Some(partial) = seq.next_element_seed(seed)? else {
                break;
            };
            let value = from_reflect.from_reflect(partial.as_ref()).ok_or_else(|| {
                self.state.fail::<A::Error>(StorageError::Snapshot(format!(
                    "a saved {type_path} does not fit the current type (changed shape? register a migration)"
                )))
            })?;
            values.push(value);
        }
        Ok(values)
    }
}

pub(super) struct ResourcesSeed<'s, 'a>(pub(super) &'s DecodeState<'a>);

impl<'de> DeserializeSeed<'de> for ResourcesSeed<'_, '_> {
    type Value = LoadedResources;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for ResourcesSeed<'_, '_> {
    type Value = LoadedResources;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a list of resources")
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut resources = Vec::new();
        while let Some(resource) = seq.next_element_seed(ResourceSeed(self.0))? {
            resources.push(resource);
        }
        Ok(resources)
    }
}

struct ResourceSeed<'s, 'a>(&'s DecodeState<'a>);

impl<'de> DeserializeSeed<'de> for ResourceSeed<'_, '_> {
    type Value = (String, Box<dyn LoadedResource>);
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_tuple(2, self)
    }
}

impl<'de> Visitor<'de> for ResourceSeed<'_, '_> {
    type Value = (String, Box<dyn LoadedResource>);
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a resource (type path, value)")
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let state = self.0;
        let type_path: String = seq
            .next_element()?
            .ok_or_else(|| A::Error::custom("resource without a type"))?;
        let loaded = if let Some(migrate) = state
            .snapshots
            .migrations
            .resource(&type_path, state.snapshot_version)
        {
            seq.next_element_seed(OneOf(ErasedSeed(
                |de: &mut dyn erased_serde::Deserializer<'de>| migrate(de),
            )))?
        } else {
            let registration =
                reflected(state, &type_path, true).map_err(|e| state.fail::<A::Error>(e))?;
            let component = registration
                .data::<ReflectComponent>()
                .cloned()
                .expect("checked by `reflected`");
            let values = seq.next_element_seed(ReflectSeqSeed {
                state,
                registration,
            })?;
            match values {
                Some(mut values) if values.len() == 1 => Some(Box::new(ReflectResourceLoaded {
                    component,
                    value: values.remove(0),
                })
                    as Box<dyn LoadedResource>),
                Some(_) => {
                    return Err(A::Error::custom(format!(
                        "resource {type_path} must hold one value"
                    )));
                }
                None => None,
            }
        };
        let loaded = loaded
            .ok_or_else(|| A::Error::custom(format!("resource {type_path} without a value")))?;
        Ok((type_path, loaded))
    }
}

/// A resource value is written as a one-element list (the same shape as a column); this
/// reads that list with an inner seed for its single element.
struct OneOf<S>(S);

impl<'de, S: DeserializeSeed<'de>> DeserializeSeed<'de> for OneOf<S> {
    type Value = S::Value;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<S::Value, D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de, S: DeserializeSeed<'de>> Visitor<'de> for OneOf<S> {
    type Value = S::Value;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a one-element list")
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<S::Value, A::Error> {
        let value = seq
            .next_element_seed(self.0)?
            .ok_or_else(|| A::Error::custom("empty resource value list"))?;
        if seq.next_element::<serde::de::IgnoredAny>()?.is_some() {
            return Err(A::Error::custom(
                "resource value list holds more than one value",
            ));
        }
        Ok(value)
    }
}
