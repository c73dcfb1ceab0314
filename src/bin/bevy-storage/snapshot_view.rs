//! World snapshots for people: the entities with their components, and the resources.
//!
//! The body of a snapshot (see `bevy_storage::snapshot` for the layout) is
//! `(entities, [(type path, rows, values)], [(type path, [value])])`. In RON it describes
//! itself, so it is listed without the game's types; a binary (postcard) body does not, so only
//! its entity ids are read.

use bevy_storage::snapshot::{SnapshotEncoding, SnapshotHeader};
use serde_json::{Value as Json, json};

use crate::ron_view;

/// One snapshot, decoded as far as its encoding allows.
pub struct SnapshotView {
    /// Saved entity ids (bits), in saved order.
    pub entities: Vec<u64>,
    /// For a RON body: per entity (same order), `(component type path, value as RON)`.
    pub components: Option<Vec<Vec<(String, String)>>>,
    /// For a RON body: `(resource type path, value as RON)`.
    pub resources: Vec<(String, String)>,
    /// Why components are not listed, when they are not.
    pub note: Option<String>,
}

/// Reads the body after the 16-byte header.
pub fn read(header: &SnapshotHeader, payload: &[u8]) -> Result<SnapshotView, String> {
    let body = payload
        .get(16..)
        .ok_or("the snapshot is shorter than its header")?;
    match header.encoding {
        SnapshotEncoding::Ron => {
            let text = std::str::from_utf8(body).map_err(|_| "the RON body is not UTF-8")?;
            let (entities, columns, resources) = ron_view::snapshot_body(text)
                .ok_or("the RON body does not have a snapshot's shape")?;
            if entities.len() != header.entity_count as usize {
                return Err(format!(
                    "the header says {} entities, the body has {}",
                    header.entity_count,
                    entities.len()
                ));
            }
            let mut per_entity: Vec<Vec<(String, String)>> = vec![Vec::new(); entities.len()];
            for (type_path, rows, values) in columns {
                if rows.len() != values.len() {
                    return Err(format!(
                        "column {type_path} has {} rows for {} values",
                        rows.len(),
                        values.len()
                    ));
                }
                for (row, value) in rows.into_iter().zip(values) {
                    let slot = per_entity.get_mut(row as usize).ok_or_else(|| {
                        format!("column {type_path} names row {row} of {}", entities.len())
                    })?;
                    slot.push((type_path.clone(), value));
                }
            }
            let resources = resources
                .into_iter()
                .map(|(path, values)| {
                    let text = match values.as_slice() {
                        [one] => one.clone(),
                        many => format!("[{}]", many.join(", ")),
                    };
                    (path, text)
                })
                .collect();
            Ok(SnapshotView {
                entities,
                components: Some(per_entity),
                resources,
                note: None,
            })
        }
        SnapshotEncoding::Binary => {
            let (entities, _rest): (Vec<u64>, &[u8]) = postcard::take_from_bytes(body)
                .map_err(|e| format!("the binary body does not parse: {e}"))?;
            Ok(SnapshotView {
                entities,
                components: None,
                resources: Vec::new(),
                note: Some(
                    "a binary (postcard) snapshot does not describe its values: only the game \
                     can decode its components (RON snapshots, the default in debug builds, are \
                     listed in full)"
                        .into(),
                ),
            })
        }
    }
}

/// An entity id as Bevy prints it (`12v1`), or the raw bits if they are no valid id.
///
/// Bevy's `Entity::to_bits` puts the generation in the high 32 bits and the index, stored as
/// `!index` (a `NonMaxU32`), in the low 32 bits: low bits 0 are no entity, and index
/// `u32::MAX - 1` with generation 0 is `Entity::PLACEHOLDER`. Decoded here by hand so that the
/// CLI builds without Bevy; a test checks it against Bevy's own formatting.
fn entity_name(bits: u64) -> String {
    let low = bits as u32;
    let generation = (bits >> 32) as u32;
    if low == 0 {
        return format!("bits {bits}");
    }
    let index = !low;
    if index == u32::MAX - 1 && generation == 0 {
        "PLACEHOLDER".into()
    } else {
        format!("{index}v{generation}")
    }
}

/// The short name of a type path: `dungeon::Position` → `Position`, generics kept whole.
fn short(type_path: &str) -> &str {
    let head = type_path.split('<').next().unwrap_or(type_path);
    match head.rfind("::") {
        Some(at) => &type_path[at + 2..],
        None => type_path,
    }
}

/// The listing, one entity per block.
pub fn render(view: &SnapshotView, out: &mut String) {
    use std::fmt::Write as _;
    match &view.components {
        Some(per_entity) => {
            for (bits, components) in view.entities.iter().zip(per_entity) {
                let _ = writeln!(
                    out,
                    "entity {} ({}):",
                    entity_name(*bits),
                    crate::output::plural(components.len() as u64, "component", "components")
                );
                for (path, value) in components {
                    let refs = references(value, &view.entities);
                    let _ = writeln!(out, "  {}: {}{refs}", short(path), ron_display(value));
                }
            }
            if view.resources.is_empty() {
                let _ = writeln!(out, "resources: none");
            } else {
                let _ = writeln!(out, "resources:");
                for (path, value) in &view.resources {
                    let _ = writeln!(out, "  {}: {}", short(path), ron_display(value));
                }
            }
            let mut paths: Vec<&str> = per_entity
                .iter()
                .flatten()
                .map(|(p, _)| p.as_str())
                .chain(view.resources.iter().map(|(p, _)| p.as_str()))
                .collect();
            paths.sort_unstable();
            paths.dedup();
            if !paths.is_empty() {
                let _ = writeln!(out, "types: {}", paths.join(", "));
            }
        }
        None => {
            let ids: Vec<String> = view.entities.iter().map(|b| entity_name(*b)).collect();
            let _ = writeln!(out, "entity ids: {}", ids.join(", "));
            if let Some(note) = &view.note {
                let _ = writeln!(out, "({note})");
            }
        }
    }
}

/// The saved entities a value refers to, as `  (4294967249 is entity 46v0)`: entity fields
/// are saved as their id bits, which say nothing to a reader.
fn references(text: &str, entities: &[u64]) -> String {
    let mut found: Vec<String> = Vec::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i].is_ascii_digit() && (i == 0 || !is_word(bytes[i - 1])) {
            let start = i;
            while i < bytes.len() && bytes[i].is_ascii_digit() {
                i += 1;
            }
            if (i == bytes.len() || !is_word(bytes[i]) && bytes[i] != b'.')
                && let Ok(bits) = text[start..i].parse::<u64>()
                && entities.contains(&bits)
            {
                let note = format!("{bits} is entity {}", entity_name(bits));
                if !found.contains(&note) {
                    found.push(note);
                }
            }
        } else {
            i += 1;
        }
    }
    if found.is_empty() {
        String::new()
    } else {
        format!("  ({})", found.join(", "))
    }
}

fn is_word(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || byte == b'_' || byte == b'.'
}

/// RON text cut to one screen line.
fn ron_display(text: &str) -> String {
    const MAX: usize = 200;
    if text.chars().count() <= MAX {
        return text.to_owned();
    }
    let cut: String = text.chars().take(MAX).collect();
    format!("{cut} ... (--json or --raw for all of it)")
}

/// The listing as JSON: `{"entities": [{"id", "components": {path: value}}], "resources": {...}}`.
pub fn to_json(view: &SnapshotView) -> Json {
    let value = |text: &str| ron_view::to_json(text).unwrap_or_else(|| Json::String(text.into()));
    let entities: Vec<Json> = match &view.components {
        Some(per_entity) => view
            .entities
            .iter()
            .zip(per_entity)
            .map(|(bits, components)| {
                let map: serde_json::Map<String, Json> = components
                    .iter()
                    .map(|(path, text)| (path.clone(), value(text)))
                    .collect();
                json!({ "id": entity_name(*bits), "bits": bits, "components": map })
            })
            .collect(),
        None => view
            .entities
            .iter()
            .map(|bits| json!({ "id": entity_name(*bits), "bits": bits }))
            .collect(),
    };
    let resources: serde_json::Map<String, Json> = view
        .resources
        .iter()
        .map(|(path, text)| (path.clone(), value(text)))
        .collect();
    let mut report = json!({ "entities": entities, "resources": resources });
    if let Some(note) = &view.note {
        report["note"] = note.clone().into();
    }
    report
}

#[cfg(all(test, feature = "bevy"))]
mod tests {
    use bevy::ecs::entity::Entity;

    use super::entity_name;

    #[test]
    fn entity_names_match_bevys_formatting() {
        let mut cases = vec![
            0,
            1,
            2,
            u64::MAX,
            u32::MAX as u64,
            1 << 32,
            (7 << 32) | 0xffff_fff0,
        ];
        cases.extend([
            Entity::PLACEHOLDER.to_bits(),
            Entity::from_raw_u32(0).unwrap().to_bits(),
        ]);
        cases.extend((0..200u64).map(|i| i.wrapping_mul(0x9e37_79b9_7f4a_7c15)));
        for bits in cases {
            let bevy = Entity::try_from_bits(bits)
                .map_or_else(|| format!("bits {bits}"), |e| e.to_string());
            assert_eq!(entity_name(bits), bevy, "bits {bits:#x}");
        }
    }
}
