//! `export` and `import`: whole stores through a portable dump (see [`crate::dump`]).

use std::collections::HashSet;
use std::io::Write;
use std::path::Path;
use std::sync::Arc;

use bevy_storage::backend::{Backend, KeyEntry, MemoryBackend, PutMode, Record, WriteOp};
use bevy_storage::clock::Timestamp;
use bevy_storage::{StorageConfig, StorageError};
use serde_json::{Value as Json, json};

use crate::args::Cli;
use crate::dump::{self, DumpReader, DumpRecord, DumpWriter};
use crate::failure::{Failure, Outcome};
use crate::open::{describe, key_material, keyed_reader, open_store, store_config};
use crate::output::{plural, print_json, progress};
use crate::read::each_page;
use crate::render;

/// The store's encryption key check (it holds a passphrase's salt).
use bevy_storage::key::KEYCHECK_KEY;
/// A batch is also cut when its records reach this many bytes.
const MAX_BATCH_BYTES: usize = 32 * 1024 * 1024;

pub fn export(cli: &Cli, file: &Path, prefix: &str, force: bool, out: &mut dyn Write) -> Outcome {
    let config = store_config(cli)?;
    bevy_storage::key::validate_prefix(prefix)?;
    if file.is_dir() {
        return Err(Failure::usage(format!(
            "{} is a directory: name the dump file to write",
            file.display()
        )));
    }
    if file.exists() && !force {
        return Err(Failure::runtime(format!(
            "{} already exists: pass --force to replace it",
            file.display()
        )));
    }
    let store = open_store(&config, false)?;
    let backend = store.backend();
    let now = Timestamp::now();
    // One page at a time (bounded memory); the bar's length is the store's record count.
    let estimate = backend.usage(now).map(|u| u.item_count).unwrap_or(0);
    let bar = progress(cli, estimate, "exporting", false);
    let mut writer = DumpWriter::create(file, backend.backend_type())?;
    let (mut records, mut encrypted, mut bytes) = (0u64, 0u64, 0u64);
    let mut export_page = |page: Vec<KeyEntry>| -> Outcome {
        for entry in page {
            if now.is_past(entry.expires_at) {
                continue;
            }
            // Read again: it may have changed or gone since the listing.
            if let Some(record) = backend.get(&entry.key)?
                && record.meta.is_live(now)
            {
                writer.record(&entry.key, &record)?;
                if !dump::is_internal(&entry.key) {
                    records += 1;
                    bytes += record.value.len() as u64;
                    encrypted += u64::from(record.meta.encrypted);
                }
            }
            bar.inc(1);
        }
        Ok(())
    };
    if !prefix.is_empty() {
        // The store's bookkeeping (its key check) goes along whatever the prefix; its keys
        // sort before every user key, so the dump stays in key order.
        each_page(
            backend.as_ref(),
            bevy_storage::key::INTERNAL_PREFIX,
            &mut export_page,
        )?;
    }
    each_page(backend.as_ref(), prefix, &mut export_page)?;
    let written = writer.finish()?;
    bar.finish_and_clear();
    if cli.json {
        return print_json(
            out,
            &json!({
                "exported": records,
                "encrypted": encrypted,
                "bytes": bytes,
                "bookkeeping_records": written - records,
                "store": describe(&config),
                "file": file.display().to_string(),
            }),
        );
    }
    writeln!(
        out,
        "exported {} ({} encrypted, {}) from {} to {}",
        plural(records, "record", "records"),
        encrypted,
        render::size(bytes),
        describe(&config),
        file.display()
    )?;
    Ok(())
}

pub fn import(
    cli: &Cli,
    file: &Path,
    no_overwrite: bool,
    allow_internal_keys: bool,
    batch_size: usize,
    out: &mut dyn Write,
) -> Outcome {
    let config = store_config(cli)?;

    // Pass 1: check the whole dump before the store is opened (or created).
    let file_size = std::fs::metadata(file).map(|m| m.len()).unwrap_or(0);
    let mut reader = DumpReader::open(file)?;
    let bar = progress(cli, file_size, "checking", true);
    let now = Timestamp::now();
    let mut keys = Vec::new();
    let mut bookkeeping: Vec<DumpRecord> = Vec::new();
    let mut encrypted = 0u64;
    while let Some(record) = reader.next_record()? {
        bar.set_position(reader.bytes_read());
        if dump::is_internal(&record.key) {
            bookkeeping.push(record);
        } else if record.record.meta.is_live(now) {
            encrypted += u64::from(record.record.meta.encrypted);
            keys.push(record.key);
        }
    }
    bar.finish_and_clear();
    if !bookkeeping.is_empty() && !allow_internal_keys {
        let names: Vec<String> = bookkeeping.iter().map(|r| format!("{:?}", r.key)).collect();
        let why = if encrypted > 0 {
            format!(
                "the encryption key check that {} of the dump {} to be read",
                plural(encrypted, "encrypted record", "encrypted records"),
                if encrypted == 1 { "needs" } else { "need" }
            )
        } else {
            "no encrypted record of the dump needs it".to_owned()
        };
        return Err(Failure::usage(format!(
            "the dump holds {} of the store's own bookkeeping ({}: {why}); they replace a \
             store's internals, so importing them needs --allow-internal-keys (only for a dump \
             you trust, such as your own export); nothing was imported",
            plural(bookkeeping.len() as u64, "internal key", "internal keys"),
            names.join(", ")
        )));
    }
    let origin = format!(
        "exported from {} at {}",
        reader.header.source, reader.header.created_at
    );
    let (source, exported_at) = (
        reader.header.source.clone(),
        reader.header.created_at.clone(),
    );

    let store = open_store(&config, true)?;
    let backend = Arc::clone(store.backend());
    let target = describe(&config);

    // The store's bookkeeping: copied into a store that has none, else checked.
    let mut first = Vec::new();
    for record in bookkeeping {
        match backend.get(&record.key)? {
            None => first.push(WriteOp::Put {
                key: record.key,
                record: record.record,
                mode: PutMode::CreateOnly,
            }),
            Some(existing) if existing.value == record.record.value => {}
            Some(existing) if record.key == KEYCHECK_KEY && encrypted > 0 => {
                same_key(
                    cli, &config, &backend, &existing, &record, encrypted, &target,
                )?;
            }
            // Nothing encrypted comes along: the target keeps its own.
            Some(_) => {}
        }
    }

    if no_overwrite {
        let now = Timestamp::now();
        let present: HashSet<String> = backend
            .scan("")?
            .into_iter()
            .filter(|e| !now.is_past(e.expires_at))
            .map(|e| e.key)
            .collect();
        let clashes: Vec<&String> = keys.iter().filter(|k| present.contains(*k)).collect();
        if let Some(first) = clashes.first() {
            return Err(Failure::runtime(format!(
                "{} of the dump already {} a live record in {target} (first: {first:?}); \
                 nothing was imported (without --no-overwrite they are replaced)",
                plural(clashes.len() as u64, "key", "keys"),
                if clashes.len() == 1 { "has" } else { "have" }
            )));
        }
    }
    if !first.is_empty() {
        backend.write(first, Timestamp::now()).map_err(|e| {
            Failure::runtime(format!(
                "cannot write the store's bookkeeping to {target}: {e}; nothing was imported"
            ))
        })?;
    }

    // Pass 2: write the records in atomic batches.
    let mode = if no_overwrite {
        PutMode::CreateOnly
    } else {
        PutMode::Upsert
    };
    let mut reader = DumpReader::open(file)?;
    let bar = progress(cli, keys.len() as u64, "importing", false);
    let mut batches = Batches {
        backend: &backend,
        ops: Vec::with_capacity(batch_size),
        bytes: 0,
        imported: 0,
        committed: 0,
        bar: &bar,
        target: &target,
    };
    let mut expired = 0u64;
    while let Some(record) = reader.next_record()? {
        if dump::is_internal(&record.key) {
            continue;
        }
        if !record.record.meta.is_live(Timestamp::now()) {
            expired += 1;
            continue;
        }
        batches.bytes += record.record.value.len();
        batches.ops.push(WriteOp::Put {
            key: record.key,
            record: record.record,
            mode,
        });
        if batches.ops.len() >= batch_size || batches.bytes >= MAX_BATCH_BYTES {
            batches.commit()?;
        }
    }
    batches.commit()?;
    let (imported, committed) = (batches.imported, batches.committed);
    bar.finish_and_clear();
    if cli.json {
        return print_json(
            out,
            &json!({
                "imported": imported,
                "batches": committed,
                "skipped_expired": expired,
                "source": source,
                "exported_at": exported_at,
                "store": target,
                "file": file.display().to_string(),
            }),
        );
    }
    let skipped = if expired > 0 {
        format!(
            "; skipped {} that expired since the export",
            plural(expired, "record", "records")
        )
    } else {
        String::new()
    };
    writeln!(
        out,
        "imported {} ({origin}) into {target} in {}{skipped}",
        plural(imported, "record", "records"),
        plural(committed, "batch", "batches"),
    )?;
    Ok(())
}

struct Batches<'a> {
    backend: &'a Arc<dyn Backend>,
    ops: Vec<WriteOp>,
    bytes: usize,
    imported: u64,
    committed: u64,
    bar: &'a indicatif::ProgressBar,
    target: &'a str,
}

impl Batches<'_> {
    fn commit(&mut self) -> Outcome {
        if self.ops.is_empty() {
            return Ok(());
        }
        let n = self.ops.len() as u64;
        let ops = std::mem::take(&mut self.ops);
        self.bytes = 0;
        self.backend.write(ops, Timestamp::now()).map_err(|e| {
            Failure::runtime(format!(
                "import into {} stopped: {e}; the {} before this batch were imported (each batch is all or nothing)",
                self.target,
                plural(self.imported, "record", "records"),
            ))
        })?;
        self.imported += n;
        self.committed += 1;
        self.bar.inc(n);
        Ok(())
    }
}

/// The target already has a key check that differs from the dump's, and encrypted records are
/// coming: they stay readable only if both stores derive the same cipher key. Checks that with
/// the given key, or refuses.
fn same_key(
    cli: &Cli,
    config: &StorageConfig,
    backend: &Arc<dyn Backend>,
    existing: &Record,
    incoming: &DumpRecord,
    encrypted: u64,
    target: &str,
) -> Outcome {
    let refuse = |why: &str| {
        Failure::runtime(format!(
            "the dump holds {} but {target} already has its own encryption key and {why}; \
             nothing was imported (import into a new store, or one that never used encryption)",
            plural(encrypted, "encrypted record", "encrypted records"),
        ))
    };
    let kdf = |r: &Record| {
        serde_json::from_slice::<Json>(&r.value)
            .ok()
            .map(|v| v.get("kdf").cloned().unwrap_or(Json::Null))
    };
    let (Some(theirs), Some(ours)) = (kdf(existing), kdf(&incoming.record)) else {
        return Err(refuse("its key check cannot be read"));
    };
    if theirs != ours {
        return Err(refuse(match (theirs.is_null(), ours.is_null()) {
            (false, false) => "a different passphrase salt, so the records would not decrypt there",
            _ => "a different kind of key (raw key or passphrase)",
        }));
    }
    let Some(key) = key_material(cli)? else {
        return Err(refuse(
            "no key was given to check that both use the same one (set BEVY_STORAGE_KEY or \
             BEVY_STORAGE_PASSPHRASE, or pass --key-file / --passphrase-file)",
        ));
    };
    let mismatch = |which: &'static str| {
        move |e: StorageError| match e {
            StorageError::WrongEncryptionKey => refuse(&format!(
                "the given key does not match {which}, so the records would not decrypt there"
            )),
            other => other.into(),
        }
    };
    keyed_reader(backend, config, key.clone()).map_err(mismatch("the target store's key"))?;
    let copy: Arc<dyn Backend> = Arc::new(MemoryBackend::new());
    copy.write(
        vec![WriteOp::Put {
            key: incoming.key.clone(),
            record: incoming.record.clone(),
            mode: PutMode::Upsert,
        }],
        Timestamp::now(),
    )?;
    keyed_reader(&copy, &StorageConfig::memory(), key).map_err(mismatch("the dump's key"))?;
    Ok(())
}
