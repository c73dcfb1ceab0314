//! `stats`: the store's size, free space, health and key prefixes.

use std::collections::BTreeMap;
use std::io::Write;

use bevy_storage::StorageConfig;
use bevy_storage::clock::Timestamp;
use serde_json::{Value as Json, json};

use crate::args::{Cli, Quota};
use crate::failure::Outcome;
use crate::open::{describe, open_store, store_config};
use crate::output::print_json;
use crate::{dump, render};

pub fn stats(cli: &Cli, out: &mut dyn Write) -> Outcome {
    let config = store_config(cli)?;
    let store = open_store(&config, false)?;
    let stats = store.get_stats();
    let now = Timestamp::now();
    let mut expired = 0u64;
    let mut groups: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    // One page at a time: memory follows the number of key groups, not of keys.
    crate::read::each_page(store.backend().as_ref(), "", |page| {
        for entry in page {
            if dump::is_internal(&entry.key) {
                continue;
            }
            if now.is_past(entry.expires_at) {
                expired += 1;
                continue;
            }
            let group = match entry.key.find([':', '/']) {
                Some(at) => entry.key[..=at].to_owned(),
                None => "(no prefix)".to_owned(),
            };
            let slot = groups.entry(group).or_default();
            slot.0 += 1;
            slot.1 += entry.size;
        }
        Ok(())
    })?;
    let mut groups: Vec<(String, (u64, u64))> = groups.into_iter().collect();
    groups.sort_by(|a, b| b.1.0.cmp(&a.1.0).then_with(|| a.0.cmp(&b.0)));
    // The store is opened without a quota; the game's is StorageConfig's default unless
    // --quota names another.
    let default_quota = StorageConfig::memory().max_size;
    let (quota, quota_source) = match cli.quota {
        Some(Quota::Bytes(n)) => (Some(n), "--quota"),
        Some(Quota::Unlimited) => (None, "--quota"),
        None => (default_quota, "StorageConfig's default max_size"),
    };
    let disk = store.backend().available_space();
    let under_quota = quota.map(|q| q.saturating_sub(stats.total_size));
    let available = match (under_quota, disk) {
        (Some(q), Some(d)) => Some(q.min(d)),
        (q, d) => q.or(d),
    };
    if cli.json {
        let prefixes: serde_json::Map<String, Json> = groups
            .iter()
            .map(|(p, (n, size))| (p.clone(), json!({"records": n, "size": size})))
            .collect();
        return print_json(
            out,
            &json!({
                "store": describe(&config),
                "backend": stats.backend_type,
                "records": stats.item_count,
                "total_size": stats.total_size,
                "expired_awaiting_purge": expired,
                "quota": quota,
                "quota_source": quota_source,
                "available_under_quota": under_quota,
                "disk_available": disk,
                "available_space": available,
                "healthy": stats.is_healthy,
                "last_error": stats.last_error,
                "prefixes": prefixes,
            }),
        );
    }
    writeln!(out, "store:            {}", describe(&config))?;
    writeln!(out, "backend:          {}", stats.backend_type)?;
    writeln!(out, "records:          {}", stats.item_count)?;
    writeln!(
        out,
        "total size:       {} ({} bytes)",
        render::size(stats.total_size),
        stats.total_size
    )?;
    writeln!(out, "expired:          {expired} awaiting purge-expired")?;
    match quota {
        Some(q) => writeln!(
            out,
            "quota:            {} ({quota_source}; --quota SIZE if the game sets another), {:.1}% used",
            render::size(q),
            if q == 0 {
                100.0
            } else {
                stats.total_size as f64 * 100.0 / q as f64
            }
        )?,
        None => writeln!(out, "quota:            none ({quota_source})")?,
    }
    let disk_text = disk.map_or("unknown".to_owned(), render::size);
    match (under_quota, available) {
        (Some(q), Some(space)) if Some(q) == available => writeln!(
            out,
            "available space:  {} under the quota ({disk_text} free on disk)",
            render::size(space)
        )?,
        (Some(_), Some(space)) => writeln!(
            out,
            "available space:  {} (the disk has less free than the quota allows)",
            render::size(space)
        )?,
        (None, Some(space)) => writeln!(out, "available space:  {} on disk", render::size(space))?,
        (_, None) => writeln!(out, "available space:  unknown")?,
    }
    match &stats.last_error {
        Some(e) if !stats.is_healthy => writeln!(out, "healthy:          no ({e})")?,
        _ => writeln!(
            out,
            "healthy:          {}",
            if stats.is_healthy { "yes" } else { "no" }
        )?,
    }
    if !groups.is_empty() {
        writeln!(out, "key prefixes:")?;
        let width = groups
            .iter()
            .map(|g| g.0.chars().count())
            .max()
            .unwrap_or(0);
        const SHOWN: usize = 20;
        for (prefix, (n, size)) in groups.iter().take(SHOWN) {
            writeln!(out, "  {prefix:<width$}  {n:>6}  {}", render::size(*size))?;
        }
        if groups.len() > SHOWN {
            writeln!(out, "  ... and {} more prefixes", groups.len() - SHOWN)?;
        }
    }
    Ok(())
}
