//! The portable dump written by `export` and read by `import`.
//!
//! A dump is UTF-8 JSON Lines, one JSON object per line:
//!
//! ```text
//! {"format":"bevy_storage dump","version":1,"created_at":"2025-06-01T12:00:00.000Z","source":"sqlite","tool":"bevy-storage 0.1.0"}
//! {"key":"player:ada","value":"QlNUUgEDAQA...","size":91,"created_at":1748779200000,"modified_at":1748779200000,"accessed_at":1748779200000,"expires_at":1751371200000,"compressed":true,"encrypted":true,"custom":{"level":"Crypt of Bones"}}
//! ...
//! {"end":{"records":12,"crc32":"1c291ca3"}}
//! ```
//!
//! - The header names the format and its version; a reader refuses a newer version.
//! - Each record line holds the key, the record **as stored** (`value`: standard base64 of the
//!   envelope bytes, still compressed and encrypted, so no key is needed to move it) and its
//!   metadata (times in milliseconds since the Unix epoch, `expires_at` null for never, the
//!   game's custom fields, the record's `version`, absent in older dumps). Unknown fields are
//!   refused.
//! - The store's own bookkeeping records (keys starting with U+0001, such as the encryption
//!   key check that holds a passphrase's salt) are included, so encrypted records stay readable
//!   with the same key or passphrase after an import into an empty store.
//! - The end line counts the records and holds the CRC-32 (IEEE) of every byte before it, in
//!   8 lowercase hex digits: a dump without it is truncated, one whose checksum differs was
//!   damaged or edited.

use std::collections::HashSet;
use std::fs::File;
use std::io::{self, BufRead, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};

use bevy_storage::StorageError;
use bevy_storage::backend::{CustomMetadata, Record, RecordMeta, RecordVersion};
use bevy_storage::clock::Timestamp;
use bevy_storage::codec::envelope;
use serde::{Deserialize, Serialize};

use crate::failure::Failure;
use crate::render;

/// The `format` field of a dump header.
pub const FORMAT: &str = "bevy_storage dump";
/// The dump version this build writes and the newest it reads.
pub const VERSION: u32 = 1;

/// True for the store's own bookkeeping keys, which user keys can never be.
pub fn is_internal(key: &str) -> bool {
    bevy_storage::key::is_internal(key)
}

/// The first line of a dump.
#[derive(Debug, Serialize, Deserialize)]
pub struct Header {
    /// Always [`FORMAT`].
    pub format: String,
    /// The dump version.
    pub version: u32,
    /// When the export started (RFC 3339, UTC).
    #[serde(default)]
    pub created_at: String,
    /// The backend type it was exported from.
    #[serde(default)]
    pub source: String,
    /// The program that wrote it.
    #[serde(default)]
    pub tool: String,
}

/// One record line.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Line {
    key: String,
    value: String,
    size: u64,
    created_at: i64,
    modified_at: i64,
    accessed_at: i64,
    expires_at: Option<i64>,
    compressed: bool,
    encrypted: bool,
    #[serde(default)]
    custom: CustomMetadata,
    /// The record's version (absent in dumps written before versions existed: the import
    /// then gives the record a new one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    version: Option<u64>,
}

/// The last line.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct End {
    records: u64,
    crc32: String,
}

#[derive(Serialize)]
struct EndLine<'a> {
    end: &'a End,
}

/// Writes a dump to a temporary file beside `path`, renamed over it only when complete.
pub struct DumpWriter {
    path: PathBuf,
    tmp: PathBuf,
    out: Option<BufWriter<File>>,
    crc: crc32fast::Hasher,
    records: u64,
}

impl DumpWriter {
    /// Starts a dump and writes its header.
    pub fn create(path: &Path, source: &str) -> Result<Self, Failure> {
        let name = path
            .file_name()
            .ok_or_else(|| Failure::usage(format!("{} is not a file name", path.display())))?;
        let mut tmp_name = std::ffi::OsString::from(".");
        tmp_name.push(name);
        tmp_name.push(format!(".partial-{}", std::process::id()));
        let tmp = path.with_file_name(tmp_name);
        let file = File::create(&tmp).map_err(|e| {
            Failure::runtime(format!("cannot create the dump {}: {e}", path.display()))
        })?;
        let mut writer = Self {
            path: path.to_owned(),
            tmp,
            out: Some(BufWriter::new(file)),
            crc: crc32fast::Hasher::new(),
            records: 0,
        };
        let header = Header {
            format: FORMAT.into(),
            version: VERSION,
            created_at: render::time_ms(Timestamp::now()),
            source: source.into(),
            tool: concat!("bevy-storage ", env!("CARGO_PKG_VERSION")).into(),
        };
        writer.line(&header)?;
        Ok(writer)
    }

    /// Appends one record.
    pub fn record(&mut self, key: &str, record: &Record) -> Result<(), Failure> {
        let meta = &record.meta;
        let line = Line {
            key: key.to_owned(),
            value: render::base64_encode(&record.value),
            size: record.value.len() as u64,
            created_at: meta.created_at.as_millis(),
            modified_at: meta.modified_at.as_millis(),
            accessed_at: meta.accessed_at.as_millis(),
            expires_at: meta.expires_at.map(Timestamp::as_millis),
            compressed: meta.compressed,
            encrypted: meta.encrypted,
            custom: meta.custom.clone(),
            version: Some(meta.version.0),
        };
        self.line(&line)?;
        self.records += 1;
        Ok(())
    }

    fn line(&mut self, value: &impl Serialize) -> Result<(), Failure> {
        let mut bytes = serde_json::to_vec(value)
            .map_err(|e| Failure::runtime(format!("cannot encode a dump line: {e}")))?;
        bytes.push(b'\n');
        self.crc.update(&bytes);
        self.write(&bytes)
    }

    fn write(&mut self, bytes: &[u8]) -> Result<(), Failure> {
        let result = match &mut self.out {
            Some(out) => out.write_all(bytes),
            None => Ok(()),
        };
        result.map_err(|e| self.io_failure(&e))
    }

    fn io_failure(&self, e: &io::Error) -> Failure {
        Failure::runtime(format!("cannot write the dump {}: {e}", self.tmp.display()))
    }

    /// Writes the end line, syncs the file and moves it to its name. Returns the record count.
    pub fn finish(mut self) -> Result<u64, Failure> {
        let result = self.complete();
        if result.is_err() {
            let _ = std::fs::remove_file(&self.tmp);
        }
        result
    }

    fn complete(&mut self) -> Result<u64, Failure> {
        let end = End {
            records: self.records,
            crc32: format!("{:08x}", self.crc.clone().finalize()),
        };
        let mut bytes = serde_json::to_vec(&EndLine { end: &end })
            .map_err(|e| Failure::runtime(format!("cannot encode a dump line: {e}")))?;
        bytes.push(b'\n');
        self.write(&bytes)?;
        let Some(out) = self.out.take() else {
            return Err(Failure::runtime("the dump was already finished"));
        };
        let file = out.into_inner().map_err(|e| self.io_failure(e.error()))?;
        file.sync_all().map_err(|e| self.io_failure(&e))?;
        drop(file);
        std::fs::rename(&self.tmp, &self.path).map_err(|e| {
            Failure::runtime(format!(
                "cannot move the finished dump to {}: {e}",
                self.path.display()
            ))
        })?;
        Ok(self.records)
    }
}

impl Drop for DumpWriter {
    fn drop(&mut self) {
        // Not finished (an error on the way): leave no half-written dump behind.
        if self.out.take().is_some() {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

/// A record read back from a dump, checked.
pub struct DumpRecord {
    pub key: String,
    pub record: Record,
}

/// Reads and checks a dump line by line. Every problem is an error naming the line.
pub struct DumpReader {
    path: PathBuf,
    input: BufReader<File>,
    line_no: u64,
    crc: crc32fast::Hasher,
    records: u64,
    bytes_read: u64,
    seen: HashSet<String>,
    done: bool,
    /// The header of the dump.
    pub header: Header,
}

impl DumpReader {
    /// Opens a dump and checks its header.
    pub fn open(path: &Path) -> Result<Self, Failure> {
        let file = File::open(path)
            .map_err(|e| Failure::runtime(format!("cannot open {}: {e}", path.display())))?;
        let mut input = BufReader::new(file);
        let mut first = Vec::new();
        read_line(&mut input, &mut first, path)?;
        let not_a_dump = || {
            Failure::runtime(format!(
                "{} is not a bevy_storage dump (its first line is not a dump header)",
                path.display()
            ))
        };
        if first.is_empty() {
            return Err(Failure::runtime(format!(
                "{} is empty: not a bevy_storage dump",
                path.display()
            )));
        }
        let header: Header = serde_json::from_slice(&first).map_err(|_| not_a_dump())?;
        if header.format != FORMAT {
            return Err(not_a_dump());
        }
        if header.version > VERSION {
            return Err(Failure::runtime(format!(
                "{} is a version {} dump, newer than the version {VERSION} this bevy-storage reads; upgrade bevy_storage",
                path.display(),
                header.version
            )));
        }
        if header.version == 0 {
            return Err(Failure::runtime(format!(
                "{} claims dump version 0, which does not exist: the dump is damaged",
                path.display()
            )));
        }
        let mut crc = crc32fast::Hasher::new();
        crc.update(&first);
        Ok(Self {
            path: path.to_owned(),
            input,
            line_no: 1,
            crc,
            records: 0,
            bytes_read: first.len() as u64,
            seen: HashSet::new(),
            done: false,
            header,
        })
    }

    /// Bytes of the file read so far (for a progress bar).
    pub fn bytes_read(&self) -> u64 {
        self.bytes_read
    }

    /// The next record, or `None` after a valid end line (checked: count, checksum, and
    /// nothing after it).
    pub fn next_record(&mut self) -> Result<Option<DumpRecord>, Failure> {
        if self.done {
            return Ok(None);
        }
        let mut line = Vec::new();
        read_line(&mut self.input, &mut line, &self.path)?;
        self.bytes_read += line.len() as u64;
        if line.is_empty() {
            return Err(self.damaged(format!(
                "it ends after line {} without its end line, so it is truncated ({} records read); export it again",
                self.line_no, self.records
            )));
        }
        self.line_no += 1;
        let value: serde_json::Value = serde_json::from_slice(&line).map_err(|e| {
            self.damaged(format!(
                "line {} is not valid JSON ({e}){}",
                self.line_no,
                if line.ends_with(b"\n") {
                    ""
                } else {
                    ": the dump is truncated"
                }
            ))
        })?;
        if let Some(end) = value.get("end") {
            let end: End = serde_json::from_value(end.clone())
                .map_err(|e| self.damaged(format!("line {}: bad end line: {e}", self.line_no)))?;
            return self.finish(end).map(|()| None);
        }
        self.crc.update(&line);
        let parsed: Line = serde_json::from_value(value)
            .map_err(|e| self.damaged(format!("line {}: {e}", self.line_no)))?;
        let record = self.check(parsed)?;
        self.records += 1;
        Ok(Some(record))
    }

    fn finish(&mut self, end: End) -> Result<(), Failure> {
        if end.records != self.records {
            return Err(self.damaged(format!(
                "its end line counts {} records but {} were read",
                end.records, self.records
            )));
        }
        let crc = format!("{:08x}", self.crc.clone().finalize());
        if end.crc32 != crc {
            return Err(self.damaged(
                "its checksum does not match: it was changed or damaged after the export".into(),
            ));
        }
        let mut rest = Vec::new();
        read_line(&mut self.input, &mut rest, &self.path)?;
        if rest.iter().any(|b| !b.is_ascii_whitespace()) {
            return Err(self.damaged(format!(
                "there is data after its end line (line {})",
                self.line_no + 1
            )));
        }
        self.done = true;
        Ok(())
    }

    fn check(&mut self, line: Line) -> Result<DumpRecord, Failure> {
        let n = self.line_no;
        let key = line.key;
        let at = |what: String| format!("line {n} (key {key:?}): {what}");
        if !is_internal(&key) {
            bevy_storage::key::validate_key(&key)
                .map_err(|e| self.damaged(format!("line {n}: {e}")))?;
        }
        if !self.seen.insert(key.clone()) {
            return Err(self.damaged(at("the key appears twice".into())));
        }
        let value = render::base64_decode(&line.value)
            .ok_or_else(|| self.damaged(at("the value is not valid base64".into())))?;
        if value.len() as u64 != line.size {
            return Err(self.damaged(at(format!(
                "the value is {} bytes but the record says {}",
                value.len(),
                line.size
            ))));
        }
        if !is_internal(&key) {
            // Checks the checksum of every record, and decompresses the unencrypted ones.
            let info = match envelope::open(&key, &value, None) {
                Ok((_, info)) => info,
                Err(StorageError::EncryptionKeyMissing { .. }) => {
                    envelope::inspect(&key, &value)
                        .map_err(|e| self.damaged(format!("line {n}: {e}")))?
                }
                Err(e) => return Err(self.damaged(format!("line {n}: {e}"))),
            };
            if info.compressed != line.compressed || info.encrypted != line.encrypted {
                return Err(self.damaged(at(format!(
                    "the metadata says compressed={} encrypted={} but the record's header says compressed={} encrypted={}",
                    line.compressed, line.encrypted, info.compressed, info.encrypted
                ))));
            }
        }
        Ok(DumpRecord {
            record: Record {
                meta: RecordMeta {
                    created_at: Timestamp(line.created_at),
                    modified_at: Timestamp(line.modified_at),
                    accessed_at: Timestamp(line.accessed_at),
                    expires_at: line.expires_at.map(Timestamp),
                    size: line.size,
                    compressed: line.compressed,
                    encrypted: line.encrypted,
                    custom: line.custom,
                    // The version the record had where it was exported, so a copy of a
                    // store is the same store; a new one for dumps without versions.
                    version: line
                        .version
                        .map_or_else(RecordVersion::fresh, RecordVersion),
                },
                value,
            },
            key,
        })
    }

    fn damaged(&self, what: String) -> Failure {
        Failure::runtime(format!("damaged dump {}: {what}", self.path.display()))
    }
}

fn read_line(input: &mut impl BufRead, buf: &mut Vec<u8>, path: &Path) -> Result<(), Failure> {
    input
        .read_until(b'\n', buf)
        .map(drop)
        .map_err(|e| Failure::runtime(format!("cannot read {}: {e}", path.display())))
}
