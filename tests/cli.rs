//! End-to-end tests of the `bevy-storage` inspector CLI: the built binary run against SQLite
//! and file stores populated through the library.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use bevy_storage::clock::{ManualClock, Timestamp};
use bevy_storage::snapshot::{SnapshotSettings, store_snapshot};
use bevy_storage::{
    Compression, CustomMetadata, EncryptionKey, Format, LoadOptions, SaveOptions, StorageConfig,
    StorageOperation, Store,
};
use serde::{Deserialize, Serialize};
use serde_json::{Value as Json, json};

const PASSPHRASE: &str = "correct horse battery staple";
const HEX_KEY: &str = "6b0d2f6f7a1c4e8d9a3b5c7d1e2f3a4b5c6d7e8f9a0b1c2d3e4f5a6b7c8d9e0f";

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
enum Class {
    Idle,
    Warrior { level: u32 },
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
struct Player {
    name: String,
    gold: u32,
    class: Class,
    pos: (f32, f32),
    pet: Option<String>,
    inventory: Vec<String>,
}

fn ada() -> Player {
    Player {
        name: "Ada".into(),
        gold: 120,
        class: Class::Warrior { level: 3 },
        pos: (1.5, -2.0),
        pet: Some("Rex".into()),
        inventory: vec!["healing potion".into(); 20],
    }
}

fn bob() -> Player {
    Player {
        name: "Bob's secret name".into(),
        gold: 5,
        class: Class::Idle,
        pos: (0.0, 0.0),
        pet: None,
        inventory: Vec::new(),
    }
}

/// What a run of the binary gave back.
struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Run {
    fn ok(self) -> Self {
        assert_eq!(
            self.code, 0,
            "expected success\nstdout: {}\nstderr: {}",
            self.stdout, self.stderr
        );
        self
    }

    /// Fails with `code` and exactly one `error: ...` line on stderr containing `needle`.
    fn fails(self, code: i32, needle: &str) -> Self {
        assert_eq!(
            self.code, code,
            "expected exit code {code}\nstdout: {}\nstderr: {}",
            self.stdout, self.stderr
        );
        assert!(
            self.stderr.starts_with("error: ") && self.stderr.lines().count() == 1,
            "one error line expected, got: {:?}",
            self.stderr
        );
        assert!(
            self.stderr.contains(needle),
            "{needle:?} not in {:?}",
            self.stderr
        );
        assert!(!self.stderr.contains("panicked"), "{}", self.stderr);
        self
    }

    fn json(&self) -> Json {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.stdout))
    }
}

/// Runs the binary with a clean environment (none of the developer's `BEVY_STORAGE_*`).
fn run(args: &[&str], env: &[(&str, &str)]) -> Run {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_bevy-storage"));
    cmd.args(args)
        .env_remove("BEVY_STORAGE_URL")
        .env_remove("BEVY_STORAGE_KEY")
        .env_remove("BEVY_STORAGE_PASSPHRASE")
        .env_remove("BEVY_STORAGE_REDIS_PASSWORD");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("the binary runs");
    Run {
        code: out.status.code().expect("exited, not killed by a signal"),
        stdout: String::from_utf8(out.stdout).expect("UTF-8 stdout"),
        stderr: String::from_utf8(out.stderr).expect("UTF-8 stderr"),
    }
}

fn url(scheme: &str, path: &Path) -> String {
    format!("{scheme}:{}", path.display())
}

fn snapshot_bytes(game_version: u32, entities: u32) -> Vec<u8> {
    let mut bytes = b"BSNP".to_vec();
    bytes.extend_from_slice(&1u16.to_le_bytes());
    bytes.extend_from_slice(&[1, 0]);
    bytes.extend_from_slice(&game_version.to_le_bytes());
    bytes.extend_from_slice(&entities.to_le_bytes());
    bytes.extend_from_slice(b"([], [], [])");
    bytes
}

/// Fills a store: RON with TTL and metadata, an encrypted RON record, a postcard record, a
/// world snapshot, opaque raw bytes, and one record that has already expired.
fn populate(config: StorageConfig) -> Store {
    let store = Store::open(config.clone()).unwrap();
    store
        .save(
            "player:ada",
            &ada(),
            &SaveOptions::new()
                .ttl(Duration::from_secs(30 * 86_400))
                .compression(Compression::Lz4)
                .metadata("level", "Crypt of Bones")
                .metadata("play_time_s", 4521),
        )
        .unwrap();
    store
        .save(
            "player:bob",
            &bob(),
            &SaveOptions::new()
                .encrypt(true)
                .ttl(Duration::from_secs(7 * 86_400))
                .metadata("guild", "Night Owls"),
        )
        .unwrap();
    store
        .save(
            "config:audio",
            &(0.8f32, true, "loud"),
            &SaveOptions::new().format(Format::Binary),
        )
        .unwrap();
    let mut custom = CustomMetadata::new();
    custom.insert("slot_name".into(), json!("Before the boss"));
    store_snapshot(
        &store,
        "slot:1",
        &snapshot_bytes(7, 42),
        &SnapshotSettings::default(),
        custom,
    )
    .unwrap();
    store
        .save_bytes(
            "blob:raw",
            &[0xde, 0xad, 0xbe, 0xef, 0, 1, 2],
            &SaveOptions::new(),
        )
        .unwrap();
    // Saved two hours ago with a one-hour TTL: expired for anyone reading now.
    let past = ManualClock::new(Timestamp(Timestamp::now().as_millis() - 2 * 3_600_000));
    let old = Store::with_backend(store.backend().clone(), config.clock(past)).unwrap();
    old.save(
        "player:gone",
        &ada(),
        &SaveOptions::new().ttl(Duration::from_secs(3600)),
    )
    .unwrap();
    store
}

fn passphrase_key() -> EncryptionKey {
    EncryptionKey::from_passphrase(PASSPHRASE).unwrap()
}

/// A populated SQLite store encrypted with [`PASSPHRASE`]; returns its `sqlite:` URL.
fn sqlite_store(dir: &Path) -> String {
    let path = dir.join("saves/storage.db");
    populate(StorageConfig::sqlite(&path).encryption_key(passphrase_key()));
    url("sqlite", &path)
}

const LIVE_KEYS: [&str; 5] = [
    "blob:raw",
    "config:audio",
    "player:ada",
    "player:bob",
    "slot:1",
];

#[test]
fn help_documents_commands_exit_codes_and_key_sources() {
    let help = run(&["--help"], &[]).ok().stdout;
    for needle in [
        "list",
        "get",
        "meta",
        "stats",
        "delete",
        "export",
        "import",
        "purge-expired",
        "set",
        "clear",
        "BEVY_STORAGE_REDIS_PASSWORD",
        "--password-file",
        "--quota",
        "a path alone",
        "BEVY_STORAGE_URL",
        "BEVY_STORAGE_KEY",
        "BEVY_STORAGE_PASSPHRASE",
        "--key-file",
        "--passphrase-file",
        "Exit codes:",
        "2  usage error",
        "3  not found",
    ] {
        assert!(help.contains(needle), "{needle:?} missing from --help");
    }
    let import = run(&["import", "--help"], &[]).ok().stdout;
    assert!(import.contains("--no-overwrite") && import.contains("--allow-internal-keys"));
    let set = run(&["set", "--help"], &[]).ok().stdout;
    for needle in [
        "--ttl",
        "--compression",
        "--encrypt",
        "--metadata",
        "--no-overwrite",
        "--raw",
        "--value-file",
        "--syntax",
    ] {
        assert!(set.contains(needle), "{needle:?} missing from set --help");
    }
    assert!(run(&["clear", "--help"], &[]).ok().stdout.contains("--yes"));
    assert!(
        run(&["--version"], &[])
            .ok()
            .stdout
            .starts_with("bevy-storage ")
    );
}

#[test]
fn list_shows_live_keys_with_size_and_expiry() {
    let dir = tempfile::tempdir().unwrap();
    let store = sqlite_store(dir.path());
    let out = run(&["--store", &store, "list"], &[]).ok().stdout;
    let lines: Vec<&str> = out.lines().collect();
    assert!(
        lines[0].starts_with("KEY") && lines[0].contains("SIZE") && lines[0].contains("EXPIRES")
    );
    let keys: Vec<&str> = lines[1..6]
        .iter()
        .map(|l| l.split_whitespace().next().unwrap())
        .collect();
    assert_eq!(keys, LIVE_KEYS);
    assert!(
        !out.contains("player:gone"),
        "expired records are not listed"
    );
    let ada = lines.iter().find(|l| l.starts_with("player:ada")).unwrap();
    assert!(ada.contains(" B ") && ada.contains("(in 29d 23h)"), "{ada}");
    let slot = lines.iter().find(|l| l.starts_with("slot:1")).unwrap();
    assert!(slot.ends_with("never"), "{slot}");
    assert!(lines[6].starts_with("5 keys, "), "{out}");

    // A prefix, through the environment variable; JSON.
    let out = run(
        &["list", "player:", "--json"],
        &[("BEVY_STORAGE_URL", &store)],
    )
    .ok();
    let rows = out.json();
    let rows = rows.as_array().unwrap();
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0]["key"], "player:ada");
    assert!(rows[0]["size"].as_u64().unwrap() > 0);
    assert!(rows[0]["expires_at"].as_str().unwrap().ends_with('Z'));
    assert_eq!(rows[1]["key"], "player:bob");

    let none = run(&["--store", &store, "list", "nothing:"], &[])
        .ok()
        .stdout;
    assert_eq!(none, "0 keys under \"nothing:\", 0 B\n");
}

#[test]
fn get_decodes_ron_to_pretty_ron_and_to_json() {
    let dir = tempfile::tempdir().unwrap();
    let store = sqlite_store(dir.path());
    let out = run(&["--store", &store, "get", "player:ada"], &[])
        .ok()
        .stdout;
    assert!(
        out.starts_with("(\n    name: \"Ada\",\n    gold: 120,\n"),
        "{out}"
    );
    assert!(out.contains("class: Warrior(level: 3),"), "{out}");
    assert!(out.contains("pet: Some(\"Rex\"),"), "{out}");
    let back: Player = ron::from_str(&out).expect("the pretty output is RON of the same value");
    assert_eq!(back, ada());

    let value = run(&["--store", &store, "get", "player:ada", "--json"], &[])
        .ok()
        .json();
    assert_eq!(value["key"], "player:ada");
    assert_eq!(value["format"], "ron");
    assert_eq!(value["compressed"], true);
    assert_eq!(value["encrypted"], false);
    assert_eq!(value["value"], serde_json::to_value(ada()).unwrap());

    // --raw writes the payload unchanged.
    let raw = run(&["--store", &store, "get", "player:ada", "--raw"], &[])
        .ok()
        .stdout;
    assert_eq!(raw, ron::to_string(&ada()).unwrap());
}

#[test]
fn get_shows_binary_as_hex_and_a_damaged_snapshot_by_its_header() {
    let dir = tempfile::tempdir().unwrap();
    let store = sqlite_store(dir.path());
    let out = run(&["--store", &store, "get", "config:audio"], &[])
        .ok()
        .stdout;
    assert!(out.starts_with("# binary (postcard) payload, "), "{out}");
    assert!(out.contains("not self-describing"), "{out}");
    assert!(out.contains("00000000  "), "{out}");
    assert!(out.contains("|loud|") || out.contains("loud"), "{out}");
    let json = run(&["--store", &store, "get", "config:audio", "--json"], &[])
        .ok()
        .json();
    assert_eq!(json["format"], "binary");
    assert_eq!(json["value"], Json::Null);
    let payload = postcard::to_stdvec(&(0.8f32, true, "loud")).unwrap();
    let hex: String = payload.iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(json["hex"], hex);

    // A snapshot whose body does not match its header (42 entities announced, none there):
    // the header is shown, with why the body is not listed.
    let out = run(&["--store", &store, "get", "slot:1"], &[]).ok().stdout;
    assert!(
        out.starts_with(
            "world snapshot: 42 entities, game version 7, format version 1, ron encoding, "
        ),
        "{out}"
    );
    assert!(
        out.contains("the body cannot be listed: the header says 42 entities, the body has 0"),
        "{out}"
    );
    let json = run(&["--store", &store, "get", "slot:1", "--json"], &[])
        .ok()
        .json();
    assert_eq!(
        json["snapshot"],
        json!({"format_version": 1, "encoding": "ron", "game_version": 7, "entity_count": 42,
               "error": "the header says 42 entities, the body has 0"})
    );

    let out = run(&["--store", &store, "get", "blob:raw"], &[])
        .ok()
        .stdout;
    assert!(
        out.contains("raw bytes encoded by the game itself"),
        "{out}"
    );
    assert!(out.contains("de ad be ef 00 01 02"), "{out}");
}

#[test]
fn get_of_an_encrypted_record_needs_the_right_key() {
    let dir = tempfile::tempdir().unwrap();
    let store = sqlite_store(dir.path());
    let get = ["--store", store.as_str(), "get", "player:bob"];
    run(&get, &[]).fails(
        1,
        "record \"player:bob\" is encrypted: give its key with BEVY_STORAGE_KEY",
    );

    let out = run(&get, &[("BEVY_STORAGE_PASSPHRASE", PASSPHRASE)])
        .ok()
        .stdout;
    assert_eq!(ron::from_str::<Player>(&out).unwrap(), bob());
    let json = run(
        &[&get[..], &["--json"]].concat(),
        &[("BEVY_STORAGE_PASSPHRASE", PASSPHRASE)],
    )
    .ok()
    .json();
    assert_eq!(json["encrypted"], true);
    assert_eq!(json["value"], serde_json::to_value(bob()).unwrap());

    let file = dir.path().join("pass.txt");
    std::fs::write(&file, format!("{PASSPHRASE}\n")).unwrap();
    let with_file = [&get[..], &["--passphrase-file", file.to_str().unwrap()]].concat();
    assert_eq!(
        ron::from_str::<Player>(&run(&with_file, &[]).ok().stdout).unwrap(),
        bob()
    );

    run(&get, &[("BEVY_STORAGE_PASSPHRASE", "not the passphrase")])
        .fails(1, "the encryption key does not match");
    run(&get, &[("BEVY_STORAGE_KEY", HEX_KEY)]).fails(1, "does not match");
    run(&get, &[("BEVY_STORAGE_KEY", "abc123")]).fails(
        2,
        "BEVY_STORAGE_KEY: invalid encryption key: a hex key must be 64 hex digits",
    );
    run(&get, &[("BEVY_STORAGE_PASSPHRASE", "short")]).fails(2, "at least 8 characters");
    run(
        &get,
        &[
            ("BEVY_STORAGE_PASSPHRASE", PASSPHRASE),
            ("BEVY_STORAGE_KEY", HEX_KEY),
        ],
    )
    .fails(2, "key material is given more than once");
    let missing = [&get[..], &["--key-file", "/nonexistent/key"]].concat();
    run(&missing, &[]).fails(1, "cannot read /nonexistent/key");

    // Reading with a key changes nothing, and records without encryption read with it too.
    let ada = run(
        &["--store", &store, "get", "player:ada"],
        &[("BEVY_STORAGE_PASSPHRASE", PASSPHRASE)],
    )
    .ok()
    .stdout;
    assert_eq!(ron::from_str::<Player>(&ada).unwrap(), self::ada());
}

#[test]
fn raw_keys_come_from_the_environment_or_a_key_file() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("files");
    let key = EncryptionKey::from_hex(HEX_KEY).unwrap();
    populate(StorageConfig::file(&root).encryption_key(key));
    let store = url("file", &root);
    let get = ["--store", store.as_str(), "get", "player:bob"];
    let bob_json = serde_json::to_value(bob()).unwrap();

    let json = [&get[..], &["--json"]].concat();
    assert_eq!(
        run(&json, &[("BEVY_STORAGE_KEY", HEX_KEY)]).ok().json()["value"],
        bob_json
    );

    let hex_file = dir.path().join("key.hex");
    std::fs::write(&hex_file, format!("{HEX_KEY}\n")).unwrap();
    let args = [&json[..], &["--key-file", hex_file.to_str().unwrap()]].concat();
    assert_eq!(run(&args, &[]).ok().json()["value"], bob_json);

    let raw_file = dir.path().join("key.bin");
    let raw: Vec<u8> = (0..32)
        .map(|i| u8::from_str_radix(&HEX_KEY[2 * i..2 * i + 2], 16).unwrap())
        .collect();
    std::fs::write(&raw_file, raw).unwrap();
    let args = [&json[..], &["--key-file", raw_file.to_str().unwrap()]].concat();
    assert_eq!(run(&args, &[]).ok().json()["value"], bob_json);

    let bad_file = dir.path().join("key.bad");
    std::fs::write(&bad_file, "0123").unwrap();
    let args = [&get[..], &["--key-file", bad_file.to_str().unwrap()]].concat();
    run(&args, &[]).fails(2, "a hex key must be 64 hex digits");
    run(&get, &[("BEVY_STORAGE_PASSPHRASE", PASSPHRASE)]).fails(1, "does not match");
}

#[test]
fn meta_shows_metadata_without_a_key() {
    let dir = tempfile::tempdir().unwrap();
    let store = sqlite_store(dir.path());
    let out = run(&["--store", &store, "meta", "player:bob"], &[])
        .ok()
        .stdout;
    for needle in [
        "key:         player:bob",
        "format:      ron",
        "encrypted:   yes",
        "compressed:  no",
        "expires:     ",
        "(in 6d 23h)",
        "guild: \"Night Owls\"",
    ] {
        assert!(out.contains(needle), "{needle:?} not in {out}");
    }
    let json = run(&["--store", &store, "meta", "player:ada", "--json"], &[])
        .ok()
        .json();
    assert_eq!(json["format"], "ron");
    assert_eq!(json["compressed"], true);
    assert_eq!(json["encrypted"], false);
    assert_eq!(
        json["custom"],
        json!({"level": "Crypt of Bones", "play_time_s": 4521})
    );
    assert!(json["expires_at"].as_str().unwrap().ends_with('Z'));
    let slot = run(&["--store", &store, "meta", "slot:1", "--json"], &[])
        .ok()
        .json();
    assert_eq!(slot["format"], "raw");
    assert_eq!(slot["expires_at"], Json::Null);
    assert_eq!(slot["custom"]["entity_count"], 42);
}

#[test]
fn stats_counts_records_prefixes_and_expired() {
    let dir = tempfile::tempdir().unwrap();
    let store = sqlite_store(dir.path());
    let out = run(&["--store", &store, "stats"], &[]).ok().stdout;
    for needle in [
        "backend:          sqlite",
        "records:          5",
        "expired:          1 awaiting purge-expired",
        "healthy:          yes",
        "player:",
    ] {
        assert!(out.contains(needle), "{needle:?} not in {out}");
    }
    let json = run(&["--store", &store, "stats", "--json"], &[])
        .ok()
        .json();
    assert_eq!(json["records"], 5);
    assert_eq!(json["expired_awaiting_purge"], 1);
    assert_eq!(json["prefixes"]["player:"]["records"], 2);
    assert_eq!(json["healthy"], true);

    let out = run(&["--store", &store, "purge-expired"], &[]).ok().stdout;
    assert_eq!(out, "purged 1 expired record\n");
    let json = run(&["--store", &store, "purge-expired", "--json"], &[])
        .ok()
        .json();
    assert_eq!(json["purged"], 0);
    let json = run(&["--store", &store, "stats", "--json"], &[])
        .ok()
        .json();
    assert_eq!(json["expired_awaiting_purge"], 0);
    assert_eq!(json["records"], 5);
}

#[test]
fn delete_removes_a_record_and_missing_keys_exit_3() {
    let dir = tempfile::tempdir().unwrap();
    let store = sqlite_store(dir.path());
    // An encrypted record is deleted without its key.
    let out = run(&["--store", &store, "delete", "player:bob"], &[])
        .ok()
        .stdout;
    assert_eq!(out, "deleted \"player:bob\"\n");
    for command in ["get", "meta", "delete"] {
        run(&["--store", &store, command, "player:bob"], &[])
            .fails(3, "no record under key \"player:bob\"");
    }
    // Expired is missing too.
    run(&["--store", &store, "get", "player:gone"], &[]).fails(3, "no record under key");
    let json = run(&["--store", &store, "delete", "player:ada", "--json"], &[])
        .ok()
        .json();
    assert_eq!(json, json!({"deleted": "player:ada"}));
    let left = run(&["--store", &store, "list", "--json"], &[]).ok().json();
    assert_eq!(left.as_array().unwrap().len(), 3);
}

#[test]
fn bad_input_gets_one_line_and_the_documented_exit_code() {
    let dir = tempfile::tempdir().unwrap();
    let store = sqlite_store(dir.path());
    let missing_db = url("sqlite", &dir.path().join("nope.db"));
    run(&["--store", &missing_db, "list"], &[]).fails(1, "no store at ");
    assert!(
        !dir.path().join("nope.db").exists(),
        "reading never creates a store"
    );
    let missing_dir = url("file", &dir.path().join("nope"));
    run(&["--store", &missing_dir, "stats"], &[]).fails(1, "the directory does not exist");
    let not_sqlite = dir.path().join("notes.txt");
    std::fs::write(
        &not_sqlite,
        "hello, this is not a database, not at all............",
    )
    .unwrap();
    run(&["--store", &url("sqlite", &not_sqlite), "list"], &[]).fails(1, "cannot open the store");
    run(&["--store", "ftp://host/x", "list"], &[]).fails(2, "unknown or disabled backend \"ftp\"");
    // A path alone: SQLite by its extension (it must exist, as above), else refused.
    let bare = dir.path().join("nope.sqlite");
    run(&["--store", bare.to_str().unwrap(), "list"], &[]).fails(1, "no store at ");
    run(&["--store", not_sqlite.to_str().unwrap(), "list"], &[])
        .fails(2, "cannot tell which store");
    run(&["list"], &[]).fails(
        2,
        "no store given: pass --store URL or set BEVY_STORAGE_URL",
    );
    run(&["--store", &store, "frobnicate"], &[]).fails(2, "unrecognized subcommand");
    run(&["--store", &store, "get"], &[]).fails(2, "required arguments were not provided");
    run(&["--store", &store, "list", "--bogus"], &[]).fails(2, "--bogus");
    let long = "k".repeat(600);
    run(&["--store", &store, "get", &long], &[]).fails(2, "at most 512 bytes");
    run(
        &["--store", &store, "import", "x", "--batch-size", "0"],
        &[],
    )
    .fails(2, "batch-size");
    // Without the `redis` feature: a usage error; with it, the server refuses the password.
    // Either way one line, and the password is never shown.
    // (From the environment: on the command line the password also earns a warning line.)
    let redis = run(
        &["list"],
        &[("BEVY_STORAGE_URL", "redis://:hunter2@127.0.0.1:1/0")],
    );
    assert!(redis.code == 1 || redis.code == 2, "{}", redis.stderr);
    let code = redis.code;
    let redis = redis.fails(code, "redis");
    assert!(!redis.stderr.contains("hunter2"), "{}", redis.stderr);
}

fn dump_lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect()
}

#[test]
fn export_import_round_trips_sqlite_to_file_to_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let source = sqlite_store(dir.path());
    let source_path = dir.path().join("saves/storage.db");
    let dump1 = dir.path().join("dump1.jsonl");
    let dump2 = dir.path().join("dump2.jsonl");
    let files = dir.path().join("copy/files");
    let files_url = url("file", &files);
    let target_path = dir.path().join("again/storage.db");
    let target = url("sqlite", &target_path);

    // No key anywhere: records move as stored.
    let out = run(
        &["--store", &source, "export", dump1.to_str().unwrap()],
        &[],
    )
    .ok()
    .stdout;
    assert!(
        out.starts_with("exported 5 records (1 encrypted, "),
        "{out}"
    );
    let out = run(
        &[
            "--store",
            &files_url,
            "import",
            "--allow-internal-keys",
            dump1.to_str().unwrap(),
        ],
        &[],
    )
    .ok()
    .stdout;
    assert!(
        out.starts_with("imported 5 records (exported from sqlite at "),
        "{out}"
    );
    assert!(out.contains("in 1 batch"), "{out}");
    let json = run(
        &[
            "--store",
            &files_url,
            "export",
            dump2.to_str().unwrap(),
            "--json",
        ],
        &[],
    )
    .ok()
    .json();
    assert_eq!(json["exported"], 5);
    assert_eq!(json["encrypted"], 1);
    assert_eq!(json["bookkeeping_records"], 1);
    let json = run(
        &[
            "--store",
            &target,
            "import",
            "--allow-internal-keys",
            dump2.to_str().unwrap(),
            "--batch-size",
            "2",
            "--json",
        ],
        &[],
    )
    .ok()
    .json();
    assert_eq!(json["imported"], 5);
    assert_eq!(json["batches"], 3);
    assert_eq!(json["source"], "file");

    // The two dumps hold the same records, byte for byte.
    let (a, b) = (dump_lines(&dump1), dump_lines(&dump2));
    assert_eq!(a.len(), 5 + 1 + 2, "header, keycheck, 5 records, end");
    assert_eq!(a[1..a.len() - 1], b[1..b.len() - 1]);
    let dump_text = std::fs::read_to_string(&dump1).unwrap();
    assert!(
        !dump_text.contains("Bob's secret"),
        "encrypted records stay encrypted"
    );
    assert!(
        !dump_text.contains("player:gone"),
        "expired records are not exported"
    );

    // Everything is there again, with its metadata, TTL, and readable with the passphrase.
    let original =
        Store::open(StorageConfig::sqlite(&source_path).encryption_key(passphrase_key())).unwrap();
    for copy in [
        Store::open(StorageConfig::file(&files).encryption_key(passphrase_key())).unwrap(),
        Store::open(StorageConfig::sqlite(&target_path).encryption_key(passphrase_key())).unwrap(),
    ] {
        assert_eq!(copy.list_keys("").unwrap(), LIVE_KEYS);
        for key in LIVE_KEYS {
            assert_eq!(
                copy.get_metadata(key).unwrap(),
                original.get_metadata(key).unwrap(),
                "{key}"
            );
            assert_eq!(
                copy.load_bytes(key, &LoadOptions::default()).unwrap(),
                original.load_bytes(key, &LoadOptions::default()).unwrap(),
                "{key}"
            );
        }
        let bob: Option<Player> = copy.load("player:bob", &LoadOptions::default()).unwrap();
        assert_eq!(bob, Some(self::bob()));
        let meta = copy.get_metadata("player:bob").unwrap().unwrap();
        assert!(meta.encrypted && meta.expires_at.is_some());
        assert_eq!(
            meta.custom_field::<String>("guild").unwrap().unwrap(),
            "Night Owls"
        );
    }
    let out = run(
        &["--store", &target, "get", "player:bob", "--json"],
        &[("BEVY_STORAGE_PASSPHRASE", PASSPHRASE)],
    )
    .ok()
    .json();
    assert_eq!(out["value"], serde_json::to_value(bob()).unwrap());

    // An existing dump is not replaced without --force.
    run(
        &["--store", &source, "export", dump1.to_str().unwrap()],
        &[],
    )
    .fails(1, "already exists: pass --force");
    run(
        &[
            "--store",
            &source,
            "export",
            dump1.to_str().unwrap(),
            "--force",
            "--prefix",
            "player:",
        ],
        &[],
    )
    .ok();
    assert_eq!(
        dump_lines(&dump1).len(),
        2 + 1 + 2,
        "two players and the keycheck"
    );
}

#[test]
fn import_with_no_overwrite_refuses_existing_keys_before_writing() {
    let dir = tempfile::tempdir().unwrap();
    let source = sqlite_store(dir.path());
    let dump = dir.path().join("dump.jsonl");
    run(&["--store", &source, "export", dump.to_str().unwrap()], &[]).ok();

    let root = dir.path().join("other");
    let other = Store::open(StorageConfig::file(&root)).unwrap();
    other
        .save("player:ada", &"someone else", &SaveOptions::new())
        .unwrap();
    drop(other);
    let target = url("file", &root);
    run(
        &[
            "--store",
            &target,
            "import",
            "--allow-internal-keys",
            dump.to_str().unwrap(),
            "--no-overwrite",
        ],
        &[],
    )
    .fails(1, "1 key of the dump already has a live record");
    let other = Store::open(StorageConfig::file(&root)).unwrap();
    assert_eq!(
        other.list_keys("").unwrap(),
        ["player:ada"],
        "nothing was imported"
    );
    assert_eq!(
        other
            .load::<String>("player:ada", &LoadOptions::default())
            .unwrap()
            .unwrap(),
        "someone else"
    );
    drop(other);

    // Without the flag, existing records are replaced.
    run(
        &[
            "--store",
            &target,
            "import",
            "--allow-internal-keys",
            dump.to_str().unwrap(),
        ],
        &[],
    )
    .ok();
    let other = Store::open(StorageConfig::file(&root)).unwrap();
    assert_eq!(other.list_keys("").unwrap(), LIVE_KEYS);
    assert_eq!(
        other
            .load::<Player>("player:ada", &LoadOptions::default())
            .unwrap(),
        Some(ada())
    );
}

#[test]
fn import_refuses_a_store_with_another_encryption_key() {
    let dir = tempfile::tempdir().unwrap();
    let source = sqlite_store(dir.path());
    let dump = dir.path().join("dump.jsonl");
    run(&["--store", &source, "export", dump.to_str().unwrap()], &[]).ok();

    // Same passphrase, but its own salt: the records would not decrypt there.
    let path = dir.path().join("mine.db");
    let mine = Store::open(StorageConfig::sqlite(&path).encryption_key(passphrase_key())).unwrap();
    mine.save("x", &1, &SaveOptions::new().encrypt(true))
        .unwrap();
    drop(mine);
    run(
        &[
            "--store",
            &url("sqlite", &path),
            "import",
            "--allow-internal-keys",
            dump.to_str().unwrap(),
        ],
        &[("BEVY_STORAGE_PASSPHRASE", PASSPHRASE)],
    )
    .fails(
        1,
        "already has its own encryption key and a different passphrase salt",
    );
    let mine = Store::open(StorageConfig::sqlite(&path).encryption_key(passphrase_key())).unwrap();
    assert_eq!(mine.list_keys("").unwrap(), ["x"]);
    assert_eq!(
        mine.load::<i32>("x", &LoadOptions::default()).unwrap(),
        Some(1)
    );

    // Raw keys: accepted when the given key opens both, refused without a key.
    let hex_source = dir.path().join("hex_source");
    let key = || EncryptionKey::from_hex(HEX_KEY).unwrap();
    populate(StorageConfig::file(&hex_source).encryption_key(key()));
    let hex_dump = dir.path().join("hex.jsonl");
    run(
        &[
            "--store",
            &url("file", &hex_source),
            "export",
            hex_dump.to_str().unwrap(),
        ],
        &[],
    )
    .ok();
    let hex_target = dir.path().join("hex_target.db");
    let t = Store::open(StorageConfig::sqlite(&hex_target).encryption_key(key())).unwrap();
    t.save("mine", &2, &SaveOptions::new().encrypt(true))
        .unwrap();
    drop(t);
    let import = [
        "--store",
        &url("sqlite", &hex_target),
        "import",
        "--allow-internal-keys",
        hex_dump.to_str().unwrap(),
    ];
    run(&import, &[]).fails(1, "no key was given to check that both use the same one");
    run(&import, &[("BEVY_STORAGE_KEY", HEX_KEY)]).ok();
    let t = Store::open(StorageConfig::sqlite(&hex_target).encryption_key(key())).unwrap();
    assert_eq!(
        t.load::<Player>("player:bob", &LoadOptions::default())
            .unwrap(),
        Some(bob())
    );
    assert_eq!(
        t.load::<i32>("mine", &LoadOptions::default()).unwrap(),
        Some(2)
    );
}

#[test]
fn import_refuses_damaged_dumps_without_touching_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let source = sqlite_store(dir.path());
    let dump = dir.path().join("dump.jsonl");
    run(&["--store", &source, "export", dump.to_str().unwrap()], &[]).ok();
    let good = std::fs::read_to_string(&dump).unwrap();
    let lines: Vec<&str> = good.lines().collect();
    let target_path = dir.path().join("target.db");
    let target = url("sqlite", &target_path);

    let cases: Vec<(&str, String, &str)> = vec![
        ("empty", String::new(), "is empty: not a bevy_storage dump"),
        ("not a dump", "hello\n".into(), "is not a bevy_storage dump"),
        (
            "newer version",
            good.replacen("\"version\":1", "\"version\":9", 1),
            "is a version 9 dump, newer than the version 1",
        ),
        (
            "cut at a line",
            lines[..lines.len() - 1].join("\n") + "\n",
            "without its end line, so it is truncated",
        ),
        (
            "cut mid-line",
            good[..good.len() - lines.last().unwrap().len() - 40].to_owned(),
            "is not valid JSON",
        ),
        (
            "a value byte changed",
            {
                let i = lines[3].find("\"value\":\"").unwrap() + 20;
                let mut l = lines[3].to_owned();
                let c = if &l[i..=i] == "A" { "B" } else { "A" };
                l.replace_range(i..=i, c);
                [&lines[..3], &[l.as_str()], &lines[4..]]
                    .concat()
                    .join("\n")
                    + "\n"
            },
            "line 4",
        ),
        (
            "metadata changed",
            good.replacen("Crypt of Bones", "Crypt of Bonez", 1),
            "its checksum does not match",
        ),
        (
            "a record dropped",
            [&lines[..3], &lines[4..]].concat().join("\n") + "\n",
            "its end line counts 6 records but 5 were read",
        ),
        (
            "unknown field",
            good.replacen("\"size\":", "\"sighs\":1,\"size\":", 1),
            "unknown field `sighs`",
        ),
        (
            "appended",
            good.clone() + &lines[2..4].join("\n") + "\n",
            "there is data after its end line",
        ),
    ];
    for (what, text, needle) in cases {
        let bad = dir.path().join("bad.jsonl");
        std::fs::write(&bad, text).unwrap();
        let result = run(
            &[
                "--store",
                &target,
                "import",
                "--allow-internal-keys",
                bad.to_str().unwrap(),
            ],
            &[],
        );
        assert_eq!(result.code, 1, "{what}: {}", result.stderr);
        result.fails(1, needle);
        assert!(!target_path.exists(), "{what}: the store was not created");
    }
    run(
        &[
            "--store",
            &target,
            "import",
            "--allow-internal-keys",
            "/nonexistent.jsonl",
        ],
        &[],
    )
    .fails(1, "cannot open");
    // The good one still imports.
    run(
        &[
            "--store",
            &target,
            "import",
            "--allow-internal-keys",
            dump.to_str().unwrap(),
        ],
        &[],
    )
    .ok();
}

#[test]
fn no_key_material_ever_appears_in_any_output() {
    let dir = tempfile::tempdir().unwrap();
    let store = sqlite_store(dir.path());
    let dump = dir.path().join("dump.jsonl");
    let s = store.as_str();
    let d = dump.to_str().unwrap();
    let target = url("file", &dir.path().join("copy"));
    let wrong_pass = "wrong horse battery staple";
    let bad_hex = "deadbeefsecretsecretsecret";
    let commands: Vec<Vec<&str>> = vec![
        vec!["--store", s, "list"],
        vec!["--store", s, "get", "player:bob"],
        vec!["--store", s, "get", "player:bob", "--json"],
        vec!["--store", s, "get", "player:ada", "--raw"],
        vec!["--store", s, "meta", "player:bob", "--json"],
        vec!["--store", s, "stats", "--json"],
        vec!["--store", s, "export", d, "--force"],
        vec!["--store", &target, "import", "--allow-internal-keys", d],
        vec!["--store", s, "get", "nothing"],
        vec!["--help"],
    ];
    let envs: Vec<Vec<(&str, &str)>> = vec![
        vec![("BEVY_STORAGE_PASSPHRASE", PASSPHRASE)],
        vec![("BEVY_STORAGE_PASSPHRASE", wrong_pass)],
        vec![("BEVY_STORAGE_KEY", HEX_KEY)],
        vec![("BEVY_STORAGE_KEY", bad_hex)],
        vec![
            ("BEVY_STORAGE_KEY", HEX_KEY),
            ("BEVY_STORAGE_PASSPHRASE", PASSPHRASE),
        ],
    ];
    let secrets = [
        PASSPHRASE,
        wrong_pass,
        HEX_KEY,
        bad_hex,
        "horse",
        "secretsecret",
    ];
    let mut runs = 0;
    for env in &envs {
        for args in &commands {
            let r = run(args, env);
            for secret in secrets {
                assert!(
                    !r.stdout.contains(secret) && !r.stderr.contains(secret),
                    "{secret:?} leaked by {args:?} with {env:?}:\n{}\n{}",
                    r.stdout,
                    r.stderr
                );
            }
            runs += 1;
        }
    }
    assert_eq!(runs, 50);
    // Files named on the command line are read, never echoed.
    let pass_file = dir.path().join("pass");
    std::fs::write(&pass_file, wrong_pass).unwrap();
    let r = run(
        &[
            "--store",
            s,
            "get",
            "player:bob",
            "--passphrase-file",
            pass_file.to_str().unwrap(),
        ],
        &[],
    )
    .fails(1, "does not match");
    assert!(!r.stderr.contains(wrong_pass));
    // The dump carries no key either.
    let dump_text = std::fs::read_to_string(&dump).unwrap();
    assert!(!dump_text.contains(PASSPHRASE) && !dump_text.contains(HEX_KEY));
}

#[test]
fn a_closed_stdout_is_not_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    let path: PathBuf = dir.path().join("many.db");
    let store = Store::open(StorageConfig::sqlite(&path)).unwrap();
    let saves = (0..3000)
        .map(|i| StorageOperation::save(format!("item:{i:05}"), i))
        .collect();
    store.transaction(saves).unwrap();
    drop(store);
    let mut child = Command::new(env!("CARGO_BIN_EXE_bevy-storage"))
        .args(["--store", &url("sqlite", &path), "list"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(out.status.code() == Some(0), "{stderr}");
}

// ---------------------------------------------------------------------------------------------
// First contact (issue 16) and the inspector's items of issue 13

/// A store with one plain and one encrypted record (passphrase [`PASSPHRASE`]).
fn small_store(dir: &Path) -> (std::path::PathBuf, Store) {
    let path = dir.join("saves/storage.db");
    let store = Store::open(StorageConfig::sqlite(&path).encryption_key(passphrase_key())).unwrap();
    store.set("plain", &5u32).unwrap();
    store
        .save("secret", &bob(), &SaveOptions::new().encrypt(true))
        .unwrap();
    (path, store)
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
struct Profile {
    name: String,
    level: u32,
    class: Class,
    pet: Option<String>,
    tags: Vec<String>,
    stash: std::collections::BTreeMap<String, u32>,
}

/// `set --compression` takes `off` or `lz4`, and still the levels of the releases that took
/// one (`0` off, `1`-`9` lz4); anything else is a usage error.
#[test]
fn set_compression_takes_a_name_or_an_old_level() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("saves/storage.db");
    let store = url("sqlite", &path);
    let text = format!("{:?}", "compress me ".repeat(50));
    for (flag, compressed) in [
        ("off", false),
        ("lz4", true),
        ("LZ4", true),
        ("0", false),
        ("9", true),
    ] {
        let key = format!("k:{flag}");
        run(
            &["--store", &store, "set", &key, &text, "--compression", flag],
            &[],
        )
        .ok();
        let game = Store::open(StorageConfig::sqlite(&path)).unwrap();
        let meta = game.get_metadata(&key).unwrap().unwrap();
        assert_eq!(meta.compressed, compressed, "--compression {flag}");
    }
    for bad in ["zip", "10"] {
        run(
            &[
                "--store",
                &store,
                "set",
                "k:bad",
                &text,
                "--compression",
                bad,
            ],
            &[],
        )
        .fails(2, "use off or lz4");
    }
}

#[test]
fn set_writes_ron_and_json_that_the_game_loads_as_its_own_type() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("saves/storage.db");
    let store = url("sqlite", &path);

    // RON as `get` prints it; `set` creates the store.
    let ron_text = ron::to_string(&ada()).unwrap();
    let out = run(
        &[
            "--store",
            &store,
            "set",
            "player:ada",
            &ron_text,
            "--ttl",
            "30d",
            "-m",
            "level=3",
            "-m",
            "zone=Crypt of Bones",
            "--compression",
            "off",
        ],
        &[],
    )
    .ok()
    .stdout;
    assert!(out.starts_with("set \"player:ada\": "), "{out}");
    assert!(out.contains("RON, stored as written"), "{out}");
    assert!(out.contains("expires in 30 days"), "{out}");
    let game = Store::open(StorageConfig::sqlite(&path)).unwrap();
    assert_eq!(game.get::<Player>("player:ada").unwrap(), Some(ada()));
    let meta = game.get_metadata("player:ada").unwrap().unwrap();
    assert_eq!(meta.custom["level"], json!(3));
    assert_eq!(meta.custom["zone"], json!("Crypt of Bones"));
    assert!(!meta.compressed);
    let ttl = meta.expires_at.unwrap().duration_since(game.now()).unwrap();
    assert!(ttl > Duration::from_secs(29 * 86_400) && ttl <= Duration::from_secs(30 * 86_400));

    // JSON as `get --json` prints it, from a file: structs, enums with data (tagged),
    // options, lists, maps.
    let file = dir.path().join("profile.json");
    std::fs::write(
        &file,
        r#"{"name": "Ada", "level": 3, "class": {"Warrior": {"level": 3}}, "pet": null,
            "tags": ["brave", "fast"], "stash": {"Gold coins": 12, "gems": 3}}"#,
    )
    .unwrap();
    let out = run(
        &[
            "--store",
            &store,
            "set",
            "profile:ada",
            "--value-file",
            file.to_str().unwrap(),
        ],
        &[],
    )
    .ok()
    .stdout;
    assert!(out.contains("JSON, stored as RON"), "{out}");
    let profile: Profile = game.get("profile:ada").unwrap().unwrap();
    assert_eq!(
        profile,
        Profile {
            name: "Ada".into(),
            level: 3,
            class: Class::Warrior { level: 3 },
            pet: None,
            tags: vec!["brave".into(), "fast".into()],
            stash: [("Gold coins".to_owned(), 12), ("gems".to_owned(), 3)].into(),
        }
    );
    // From standard input.
    let mut child = Command::new(env!("CARGO_BIN_EXE_bevy-storage"))
        .args(["--store", &store, "set", "motd", "--value-file", "-"])
        .env_remove("BEVY_STORAGE_URL")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    {
        use std::io::Write as _;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(b"\"welcome back\"")
            .unwrap();
    }
    assert!(child.wait().unwrap().success());
    assert_eq!(
        game.get::<String>("motd").unwrap().as_deref(),
        Some("welcome back")
    );
    // Scalars and --syntax.
    run(
        &["--store", &store, "set", "gold", "42", "--syntax", "json"],
        &[],
    )
    .ok();
    assert_eq!(game.get::<u32>("gold").unwrap(), Some(42));
    run(
        &[
            "--store",
            &store,
            "set",
            "pos",
            "(1.5, -2.0)",
            "--syntax",
            "ron",
        ],
        &[],
    )
    .ok();
    assert_eq!(game.get::<(f32, f32)>("pos").unwrap(), Some((1.5, -2.0)));

    // --raw stores bytes, as save_bytes does.
    let blob = dir.path().join("blob.bin");
    std::fs::write(&blob, [0u8, 159, 146, 150]).unwrap();
    run(
        &[
            "--store",
            &store,
            "set",
            "blob",
            "--raw",
            "--value-file",
            blob.to_str().unwrap(),
        ],
        &[],
    )
    .ok();
    let (bytes, info) = game
        .load_bytes("blob", &LoadOptions::default())
        .unwrap()
        .unwrap();
    assert_eq!(
        (bytes, info.format),
        (vec![0u8, 159, 146, 150], Format::Raw)
    );

    // --no-overwrite is atomic and changes nothing; bad values and options are usage errors.
    run(
        &["--store", &store, "set", "gold", "7", "--no-overwrite"],
        &[],
    )
    .fails(1, "already has a live record and --no-overwrite was given");
    assert_eq!(game.get::<u32>("gold").unwrap(), Some(42));
    run(&["--store", &store, "set", "gold", "{oops"], &[]).fails(2, "the value is neither JSON");
    run(
        &["--store", &store, "set", "gold", "(a: 1", "--syntax", "ron"],
        &[],
    )
    .fails(2, "the value is not valid RON");
    run(
        &["--store", &store, "set", "gold", "1", "--ttl", "soon"],
        &[],
    )
    .fails(2, "is not a duration");
    run(
        &["--store", &store, "set", "gold", "1", "-m", "novalue"],
        &[],
    )
    .fails(2, "write FIELD=VALUE");
    run(&["--store", &store, "set", "gold"], &[]).fails(2, "");
    assert_eq!(game.get::<u32>("gold").unwrap(), Some(42));
}

#[test]
fn set_encrypts_only_with_a_key_and_reads_it_only_then() {
    let dir = tempfile::tempdir().unwrap();
    let (path, _store) = small_store(dir.path());
    let store = url("sqlite", &path);
    // Without --encrypt a malformed key is never read.
    run(
        &["--store", &store, "set", "open", "1"],
        &[("BEVY_STORAGE_KEY", "nonsense")],
    )
    .ok();
    run(
        &["--store", &store, "set", "sealed", "\"x\"", "--encrypt"],
        &[],
    )
    .fails(2, "--encrypt needs the store's key");
    run(
        &["--store", &store, "set", "sealed", "\"x\"", "--encrypt"],
        &[("BEVY_STORAGE_PASSPHRASE", "not the passphrase")],
    )
    .fails(1, "");
    let out = run(
        &[
            "--store",
            &store,
            "set",
            "sealed",
            "\"the vault code\"",
            "--encrypt",
        ],
        &[("BEVY_STORAGE_PASSPHRASE", PASSPHRASE)],
    )
    .ok()
    .stdout;
    assert!(out.contains("encrypted"), "{out}");
    let raw = std::fs::read(&path).unwrap();
    assert!(!raw.windows(10).any(|w| w == b"vault code"));
    let game = Store::open(StorageConfig::sqlite(&path).encryption_key(passphrase_key())).unwrap();
    assert_eq!(
        game.get::<String>("sealed").unwrap().as_deref(),
        Some("the vault code")
    );
    assert!(game.get_metadata("sealed").unwrap().unwrap().encrypted);
}

#[test]
fn get_reads_key_material_only_for_an_encrypted_record() {
    let dir = tempfile::tempdir().unwrap();
    let (path, _store) = small_store(dir.path());
    let store = url("sqlite", &path);
    // A passphrase too short to be one: no matter for a plain record.
    let short = [("BEVY_STORAGE_PASSPHRASE", "short")];
    let out = run(&["--store", &store, "get", "plain"], &short)
        .ok()
        .stdout;
    assert_eq!(out.trim(), "5");
    run(&["--store", &store, "get", "secret"], &short).fails(2, "BEVY_STORAGE_PASSPHRASE");
    run(&["--store", &store, "get", "secret"], &[]).fails(1, "is encrypted");
    let out = run(
        &["--store", &store, "get", "secret"],
        &[("BEVY_STORAGE_PASSPHRASE", PASSPHRASE)],
    )
    .ok()
    .stdout;
    assert!(out.contains("secret name"), "{out}");
}

#[test]
fn clear_needs_yes_and_keeps_the_key_check() {
    let dir = tempfile::tempdir().unwrap();
    let (path, _store) = small_store(dir.path());
    let store = url("sqlite", &path);
    run(&["--store", &store, "clear"], &[])
        .fails(2, "clear removes all 2 records of sqlite:")
        .stderr
        .contains("pass --yes");
    let game = Store::open(StorageConfig::sqlite(&path).encryption_key(passphrase_key())).unwrap();
    assert_eq!(
        game.list_keys("").unwrap().len(),
        2,
        "nothing removed without --yes"
    );
    let out = run(&["--store", &store, "clear", "--yes"], &[]).ok().stdout;
    assert!(out.starts_with("cleared 2 records from sqlite:"), "{out}");
    assert!(game.list_keys("").unwrap().is_empty());
    // The key check stayed: the right passphrase still opens it, a wrong one does not.
    drop(game);
    Store::open(StorageConfig::sqlite(&path).encryption_key(passphrase_key())).unwrap();
    let wrong = EncryptionKey::from_passphrase("another passphrase entirely").unwrap();
    assert!(Store::open(StorageConfig::sqlite(&path).encryption_key(wrong)).is_err());
    let json = run(&["--store", &store, "clear", "--yes", "--json"], &[])
        .ok()
        .json();
    assert_eq!(json["cleared"], 0);
}

mod world {
    use bevy::prelude::*;
    use bevy_storage::snapshot::{
        Persist, SnapshotEncoding, SnapshotRegistry, SnapshotSettings, capture,
    };
    use serde::{Deserialize, Serialize};

    #[derive(Component, Reflect, Clone, Serialize, Deserialize)]
    #[reflect(Component)]
    pub struct Position {
        pub x: f32,
        pub y: f32,
    }

    #[derive(Component, Reflect)]
    #[reflect(Component)]
    pub enum Monster {
        Rat,
        Ogre { rage: u8 },
    }

    #[derive(Component, Reflect)]
    #[reflect(Component)]
    pub struct Hunts(#[entities] pub Entity);

    #[derive(Resource, Reflect, Default)]
    #[reflect(Resource)]
    pub struct Score(pub u64);

    /// An autosave chain of that world in `store` under `prefix`: its base, then one delta
    /// in which the hero moved. Returns the keys.
    pub fn chain(store: &bevy_storage::Store, prefix: &str) -> (String, String) {
        use bevy_storage::backend::CustomMetadata;
        use bevy_storage::snapshot::{capture_base, capture_delta, store_autosave_record};
        let mut app = App::new();
        app.register_type::<Position>();
        let world = app.world_mut();
        world.spawn((Persist, Name::new("hero"), Position { x: 1.5, y: -2.0 }));
        world.spawn((Persist, Monster::Rat));
        let mut snapshots = SnapshotRegistry::new();
        snapshots.register_component::<Position>();
        let settings = SnapshotSettings::default()
            .encoding(SnapshotEncoding::Ron)
            .game_version(3);
        let (base, start) = capture_base(world, &settings, &snapshots).unwrap();
        let base = base.encode().unwrap();
        let cursor = start.cursor(&base);
        let base_key = store_autosave_record(
            store,
            prefix,
            5,
            &base,
            &settings,
            CustomMetadata::new(),
            None,
        )
        .unwrap();
        let mut hero = world.query::<&mut Position>();
        for mut position in hero.iter_mut(world) {
            position.x += 1.0;
        }
        let delta = capture_delta(world, &settings, &snapshots, &cursor)
            .unwrap()
            .encode()
            .unwrap();
        let delta_key = store_autosave_record(
            store,
            prefix,
            5,
            &delta,
            &settings,
            CustomMetadata::new(),
            Some(&base_key),
        )
        .unwrap();
        (base_key, delta_key)
    }

    /// A real world's snapshot: a hero, an ogre hunting it, a rat, the score.
    pub fn snapshot(encoding: SnapshotEncoding) -> Vec<u8> {
        let mut app = App::new();
        app.register_type::<Position>()
            .register_type::<Monster>()
            .register_type::<Hunts>()
            .register_type::<Score>();
        let world = app.world_mut();
        let hero = world
            .spawn((Persist, Name::new("hero"), Position { x: 1.5, y: -2.0 }))
            .id();
        world.spawn((
            Persist,
            Monster::Ogre { rage: 3 },
            Position { x: 4.0, y: 0.0 },
            Hunts(hero),
        ));
        world.spawn((Persist, Monster::Rat));
        world.spawn(Position { x: 9.0, y: 9.0 }); // not Persist: not saved
        world.insert_resource(Score(7));
        let mut snapshots = SnapshotRegistry::new();
        snapshots.register_component::<Position>(); // the typed fast path
        let settings = SnapshotSettings::default()
            .encoding(encoding)
            .game_version(3)
            .allow_resource::<Score>();
        capture(world, &settings, &snapshots)
            .unwrap()
            .encode()
            .unwrap()
    }
}

#[test]
fn get_and_meta_describe_a_delta_of_a_snapshot_chain() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("saves/storage.db");
    let game = Store::open(StorageConfig::sqlite(&path)).unwrap();
    let (base, delta) = world::chain(&game, "auto/");
    drop(game);
    let store = url("sqlite", &path);
    let out = run(&["--store", &store, "get", &delta], &[]).ok().stdout;
    assert!(
        out.starts_with(&format!(
            "world snapshot delta 1 of the chain based on {base:?}: 1 entity added or changed, \
             2 entities in the world it was captured from, game version 3, format version 1, \
             ron encoding"
        )),
        "{out}"
    );
    assert!(!out.contains("not a world snapshot"), "{out}");
    let json = run(&["--store", &store, "--json", "get", &delta], &[])
        .ok()
        .json();
    let d = &json["snapshot_delta"];
    assert_eq!(d["sequence"], 1, "{json}");
    assert_eq!(d["changed_entities"], 1, "{json}");
    assert_eq!(d["world_entities"], 2, "{json}");
    assert_eq!(d["base"], base.as_str(), "{json}");
    let meta = run(&["--store", &store, "meta", &delta], &[]).ok().stdout;
    assert!(
        meta.contains(&format!(
            "format:      raw (a world snapshot delta of the chain based on \"{base}\")"
        )),
        "{meta}"
    );
    // The base is a whole snapshot, listed as before.
    let out = run(&["--store", &store, "get", &base], &[]).ok().stdout;
    assert!(out.starts_with("world snapshot: 2 entities"), "{out}");
}

#[test]
fn get_lists_a_snapshots_entities_and_components() {
    use bevy_storage::snapshot::SnapshotEncoding;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("saves/storage.db");
    let game = Store::open(StorageConfig::sqlite(&path)).unwrap();
    for (key, encoding) in [
        ("slot:ron", SnapshotEncoding::Ron),
        ("slot:bin", SnapshotEncoding::Binary),
    ] {
        let settings = SnapshotSettings::default().encoding(encoding);
        let bytes = world::snapshot(encoding);
        store_snapshot(&game, key, &bytes, &settings, CustomMetadata::new()).unwrap();
    }
    let store = url("sqlite", &path);
    let out = run(&["--store", &store, "get", "slot:ron"], &[])
        .ok()
        .stdout;
    assert!(
        out.starts_with(
            "world snapshot: 3 entities, game version 3, format version 1, ron encoding"
        ),
        "{out}"
    );
    // Every saved entity with its components, values readable (names of variants kept).
    assert_eq!(out.matches("\nentity ").count(), 3, "{out}");
    assert!(out.contains("  Name: \"hero\""), "{out}");
    assert!(out.contains("  Position: (x: 1.5, y: -2.0)"), "{out}");
    assert!(out.contains("  Monster: Ogre(rage: 3)"), "{out}");
    assert!(out.contains("  Monster: Rat"), "{out}");
    assert!(
        !out.contains("x: 9.0"),
        "entities without Persist are not saved: {out}"
    );
    // The reference to the hero is shown as that entity.
    let hero_line = out
        .lines()
        .position(|l| l.contains("Name: \"hero\""))
        .unwrap();
    let hero_header = out
        .lines()
        .take(hero_line)
        .filter(|l| l.starts_with("entity "))
        .last()
        .unwrap();
    let hero_id = hero_header.split_whitespace().nth(1).unwrap();
    let hunts = out.lines().find(|l| l.contains("Hunts:")).unwrap();
    assert!(
        hunts.ends_with(&format!("is entity {hero_id})")),
        "{hunts} / {hero_header}"
    );
    assert!(out.contains("resources:\n  Score: (7)"), "{out}");
    assert!(out.contains("types: "), "{out}");
    assert!(out.contains("Position, "), "{out}");

    let json = run(&["--store", &store, "get", "slot:ron", "--json"], &[])
        .ok()
        .json();
    let snapshot = &json["snapshot"];
    assert_eq!(snapshot["entity_count"], 3);
    let entities = snapshot["entities"].as_array().unwrap();
    assert_eq!(entities.len(), 3);
    let ogre = entities
        .iter()
        .find(|e| {
            e["components"]
                .as_object()
                .unwrap()
                .keys()
                .any(|k| k.ends_with("Hunts"))
        })
        .unwrap();
    let components = ogre["components"].as_object().unwrap();
    let monster = components
        .iter()
        .find(|(k, _)| k.ends_with("::Monster"))
        .unwrap()
        .1;
    assert_eq!(monster, &json!({"Ogre": {"rage": 3}}));
    let position = components
        .iter()
        .find(|(k, _)| k.ends_with("::Position"))
        .unwrap()
        .1;
    assert_eq!(position, &json!({"x": 4.0, "y": 0.0}));
    let score = snapshot["resources"]
        .as_object()
        .unwrap()
        .iter()
        .next()
        .unwrap();
    assert!(score.0.ends_with("::Score"), "{score:?}");

    let meta = run(&["--store", &store, "meta", "slot:ron"], &[])
        .ok()
        .stdout;
    assert!(
        meta.contains("format:      raw (a world snapshot: `get` lists it)"),
        "{meta}"
    );

    // Binary snapshots do not describe their values: the ids, and why no more.
    let out = run(&["--store", &store, "get", "slot:bin"], &[])
        .ok()
        .stdout;
    assert!(
        out.contains("3 entities, game version 3, format version 1, binary encoding"),
        "{out}"
    );
    assert!(out.contains("entity ids: "), "{out}");
    assert!(
        out.contains("only the game can decode its components"),
        "{out}"
    );
    let json = run(&["--store", &store, "get", "slot:bin", "--json"], &[])
        .ok()
        .json();
    assert_eq!(json["snapshot"]["entities"].as_array().unwrap().len(), 3);
}

#[test]
fn a_store_given_as_a_path_is_inferred_from_its_extension_or_directory() {
    let dir = tempfile::tempdir().unwrap();
    let (path, _store) = small_store(dir.path());
    let out = run(&["--store", path.to_str().unwrap(), "list"], &[])
        .ok()
        .stdout;
    assert!(out.contains("2 keys"), "{out}");
    let stats = run(&["--store", path.to_str().unwrap(), "stats"], &[])
        .ok()
        .stdout;
    assert!(
        stats.contains(&format!("store:            sqlite:{}", path.display())),
        "{stats}"
    );
    // Through the environment too.
    run(&["list"], &[("BEVY_STORAGE_URL", path.to_str().unwrap())]).ok();
    // An existing directory is a file store.
    let files = dir.path().join("files");
    Store::open(StorageConfig::file(&files))
        .unwrap()
        .set("k", &1u8)
        .unwrap();
    let out = run(&["--store", files.to_str().unwrap(), "get", "k"], &[])
        .ok()
        .stdout;
    assert_eq!(out.trim(), "1");
    // .sqlite and .sqlite3 too; `set` creates the file.
    let created = dir.path().join("new.sqlite3");
    run(
        &["--store", created.to_str().unwrap(), "set", "k", "2"],
        &[],
    )
    .ok();
    assert!(created.is_file());
    // Anything else: one message, the choices listed once.
    let bad = run(&["--store", "saves/thing.bin", "list"], &[]).fails(2, "cannot tell which store");
    assert_eq!(
        bad.stderr.matches("sqlite:PATH").count(),
        1,
        "{}",
        bad.stderr
    );
    let bad =
        run(&["--store", "ftp://host/x", "list"], &[]).fails(2, "unknown or disabled backend");
    assert_eq!(
        bad.stderr.matches("sqlite:PATH").count(),
        0,
        "{}",
        bad.stderr
    );
    assert!(
        bad.stderr.contains("see bevy-storage --help"),
        "{}",
        bad.stderr
    );
}

#[test]
fn stats_report_space_under_the_quota() {
    let dir = tempfile::tempdir().unwrap();
    let (path, store) = small_store(dir.path());
    let url = url("sqlite", &path);
    let total = store.get_stats().total_size;
    let out = run(&["--store", &url, "stats"], &[]).ok().stdout;
    assert!(
        out.contains("quota:            100.0 MiB (StorageConfig's default max_size"),
        "{out}"
    );
    assert!(out.contains("MiB under the quota ("), "{out}");
    let json = run(&["--store", &url, "stats", "--json"], &[]).ok().json();
    assert_eq!(json["quota"], 100 * 1024 * 1024);
    assert_eq!(json["available_under_quota"], 100 * 1024 * 1024 - total);
    assert_eq!(json["available_space"], 100 * 1024 * 1024 - total);
    assert!(json["disk_available"].as_u64().unwrap() > 0);
    // The game's own quota.
    let json = run(
        &["--store", &url, "stats", "--json", "--quota", "1KiB"],
        &[],
    )
    .ok()
    .json();
    assert_eq!(json["quota"], 1024);
    assert_eq!(json["available_space"], 1024 - total);
    let json = run(
        &["--store", &url, "stats", "--json", "--quota", "none"],
        &[],
    )
    .ok()
    .json();
    assert_eq!(json["quota"], Json::Null);
    assert_eq!(json["available_space"], json["disk_available"]);
    run(&["--store", &url, "stats", "--quota", "lots"], &[]).fails(2, "is not a size");
}

#[test]
fn meta_prints_a_small_size_once() {
    let dir = tempfile::tempdir().unwrap();
    let (path, store) = small_store(dir.path());
    let size = store.get_metadata("plain").unwrap().unwrap().size;
    let out = run(&["--store", &url("sqlite", &path), "meta", "plain"], &[])
        .ok()
        .stdout;
    assert!(
        out.contains(&format!("size:        {size} bytes as stored\n")),
        "{out}"
    );
    store
        .save(
            "big",
            &vec![7u64; 4000],
            &SaveOptions::new().compression(Compression::Off),
        )
        .unwrap();
    let big = store.get_metadata("big").unwrap().unwrap().size;
    let out = run(&["--store", &url("sqlite", &path), "meta", "big"], &[])
        .ok()
        .stdout;
    assert!(
        out.contains(&format!("KiB ({big} bytes as stored)")),
        "{out}"
    );
}

#[test]
fn import_refuses_internal_keys_unless_allowed() {
    let dir = tempfile::tempdir().unwrap();
    let source = sqlite_store(dir.path());
    let dump = dir.path().join("dump.jsonl");
    run(&["--store", &source, "export", dump.to_str().unwrap()], &[]).ok();
    let target_path = dir.path().join("target.db");
    let target = url("sqlite", &target_path);
    let refused = run(&["--store", &target, "import", dump.to_str().unwrap()], &[])
        .fails(2, "needs --allow-internal-keys");
    assert!(
        refused.stderr.contains(r#""\u{1}bevy_storage/keycheck""#),
        "{}",
        refused.stderr
    );
    assert!(
        refused.stderr.contains("nothing was imported"),
        "{}",
        refused.stderr
    );
    assert!(
        !target_path.exists(),
        "refused before the store was created"
    );
    // A store that exists keeps what it had.
    let existing = Store::open(StorageConfig::sqlite(&target_path)).unwrap();
    existing.set("mine", &1u8).unwrap();
    run(&["--store", &target, "import", dump.to_str().unwrap()], &[])
        .fails(2, "--allow-internal-keys");
    assert_eq!(existing.list_keys("").unwrap(), ["mine"]);
    assert!(
        existing
            .backend()
            .get(bevy_storage::key::KEYCHECK_KEY)
            .unwrap()
            .is_none()
    );
    // Asked for: imported, and the encrypted record reads with the passphrase.
    run(
        &[
            "--store",
            &target,
            "import",
            "--allow-internal-keys",
            dump.to_str().unwrap(),
        ],
        &[],
    )
    .ok();
    drop(existing);
    let copy =
        Store::open(StorageConfig::sqlite(&target_path).encryption_key(passphrase_key())).unwrap();
    assert_eq!(copy.get::<Player>("player:bob").unwrap(), Some(bob()));
}

/// A `redis-server` of this test's own, with a password; killed on drop.
struct PasswordRedis {
    child: std::process::Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Drop for PasswordRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

const REDIS_PASSWORD: &str = "p@ss:w/rd with spaces";

fn password_redis() -> Option<PasswordRedis> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dir = tempfile::tempdir().unwrap();
    let child = match Command::new("redis-server")
        .args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .args([
            "--requirepass",
            REDIS_PASSWORD,
            "--dir",
            dir.path().to_str().unwrap(),
        ])
        .stdout(std::process::Stdio::null())
        .spawn()
    {
        Ok(child) => child,
        Err(e) if std::env::var("CI").as_deref() == Ok("true") => {
            panic!("CI=true and redis-server cannot be started: {e}")
        }
        Err(e) => {
            eprintln!("!!!!! SKIPPED: cannot start redis-server ({e})");
            return None;
        }
    };
    let server = PasswordRedis {
        child,
        port,
        _dir: dir,
    };
    for _ in 0..100 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Some(server);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("redis-server did not start on port {port}");
}

#[test]
fn the_redis_password_comes_from_the_environment_or_a_file_not_argv() {
    let Some(server) = password_redis() else {
        return;
    };
    let store = format!("redis://127.0.0.1:{}/0?namespace=cli", server.port);
    let env = [("BEVY_STORAGE_REDIS_PASSWORD", REDIS_PASSWORD)];
    // Without the password Redis refuses, and says so.
    run(&["--store", &store, "set", "k", "1"], &[]).fails(1, "");
    // From the environment.
    let out = run(&["--store", &store, "set", "k", "1"], &env).ok();
    assert!(out.stderr.is_empty(), "{}", out.stderr);
    assert_eq!(
        run(&["--store", &store, "get", "k"], &env)
            .ok()
            .stdout
            .trim(),
        "1"
    );
    // From a file (a trailing newline is not part of it).
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("redis-password");
    std::fs::write(&file, format!("{REDIS_PASSWORD}\n")).unwrap();
    let out = run(
        &[
            "--store",
            &store,
            "--password-file",
            file.to_str().unwrap(),
            "list",
        ],
        &[],
    )
    .ok();
    assert!(out.stdout.contains("1 key"), "{}", out.stdout);
    // In the URL on the command line: it works, with a warning; the password is never printed.
    let encoded = "p%40ss%3Aw%2Frd%20with%20spaces";
    let in_url = format!(
        "redis://:{encoded}@127.0.0.1:{}/0?namespace=cli",
        server.port
    );
    let out = run(&["--store", &in_url, "list"], &[]).ok();
    assert!(
        out.stderr
            .starts_with("warning: the Redis password in --store is visible"),
        "{}",
        out.stderr
    );
    assert!(
        out.stderr.contains("BEVY_STORAGE_REDIS_PASSWORD"),
        "{}",
        out.stderr
    );
    assert!(!out.stderr.contains(encoded) && !out.stdout.contains(encoded));
    // The same URL from BEVY_STORAGE_URL is not on the command line: no warning.
    let out = run(&["list"], &[("BEVY_STORAGE_URL", &in_url)]).ok();
    assert!(out.stderr.is_empty(), "{}", out.stderr);
    // Twice, or for a store that is not Redis: usage errors naming the sources, not the value.
    let twice = run(&["--store", &in_url, "list"], &env).fails(2, "given twice");
    assert!(!twice.stderr.contains(REDIS_PASSWORD));
    // The variable may be set for a whole shell: other stores ignore it. The flag is explicit.
    run(&["--store", "memory:", "list"], &env).ok();
    run(
        &[
            "--store",
            "memory:",
            "--password-file",
            file.to_str().unwrap(),
            "list",
        ],
        &[],
    )
    .fails(
        2,
        "--password-file gives a Redis password but the store is not a redis:// URL",
    );
    // A wrong password: refused, and not printed either.
    let wrong = run(
        &["--store", &store, "list"],
        &[("BEVY_STORAGE_REDIS_PASSWORD", "nope-nope")],
    )
    .fails(1, "");
    assert!(!wrong.stderr.contains("nope-nope"), "{}", wrong.stderr);
}

/// Runs the binary as [`run`] does, on a main thread with the 2 MiB stack of a game's threads.
fn run_on_a_small_stack(args: &[&str]) -> Run {
    use std::os::unix::process::CommandExt;
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_bevy-storage"));
    cmd.args(args)
        .env_remove("BEVY_STORAGE_URL")
        .env_remove("BEVY_STORAGE_KEY")
        .env_remove("BEVY_STORAGE_PASSPHRASE")
        .env_remove("BEVY_STORAGE_REDIS_PASSWORD");
    // SAFETY: setrlimit is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            let limit = libc::rlimit {
                rlim_cur: 2 * 1024 * 1024,
                rlim_max: libc::RLIM_INFINITY,
            };
            if libc::setrlimit(libc::RLIMIT_STACK, &limit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let out = cmd.output().expect("the binary runs");
    Run {
        code: out
            .status
            .code()
            .unwrap_or_else(|| panic!("killed by a signal: {:?}", out.status)),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Hostile saves and dumps (issue 13): nesting 100,000 deep in a dump line, in a RON record
/// and in a postcard record never crash the inspector on a 2 MiB stack: each is one error
/// line (or, for `get`, the record shown as text), and the store is left as it was.
#[test]
fn hostile_dumps_and_records_never_crash_the_inspector() {
    use bevy_storage::backend::{PutMode, Record, RecordMeta, WriteOp};
    use bevy_storage::codec::envelope::{self, SealOptions};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("hostile.db");
    let store_url = url("sqlite", &path);
    let store = Store::open(StorageConfig::sqlite(&path)).unwrap();
    store.set("mine", &1u8).unwrap();
    let plant = |key: &str, payload: &[u8], format: Format| {
        let options = SealOptions {
            format,
            compression: Compression::Off,
            encrypt: false,
        };
        let (value, _) = envelope::seal(key, payload, &options, None).unwrap();
        let now = bevy_storage::clock::Timestamp::now();
        let record = Record {
            meta: RecordMeta {
                created_at: now,
                modified_at: now,
                accessed_at: now,
                expires_at: None,
                size: value.len() as u64,
                compressed: false,
                encrypted: false,
                custom: Default::default(),
                version: Default::default(),
            },
            value,
        };
        let op = WriteOp::Put {
            key: key.to_owned(),
            record,
            mode: PutMode::Upsert,
        };
        store.backend().write(vec![op], now).unwrap();
    };
    let deep_ron = format!("{}1{}", "[".repeat(100_000), "]".repeat(100_000));
    plant("deep:ron", deep_ron.as_bytes(), Format::Ron);
    plant("deep:postcard", &vec![1u8; 100_000], Format::Binary);
    for key in ["deep:ron", "deep:postcard"] {
        for args in [
            vec!["--store", &store_url, "get", key],
            vec!["--store", &store_url, "get", "--json", key],
        ] {
            let out = run_on_a_small_stack(&args);
            println!(
                "get {key}: exit {}, {}",
                out.code,
                out.stderr.trim().chars().take(160).collect::<String>()
            );
            assert!(!out.stderr.contains("panicked"), "{}", out.stderr);
            assert!(
                out.code == 0 || out.stderr.starts_with("error: "),
                "{args:?}: exit {} {}",
                out.code,
                out.stderr
            );
        }
    }

    // A dump whose record line nests 100,000 deep, and one with a deep custom field.
    let dump = dir.path().join("good.jsonl");
    run(
        &["--store", &store_url, "export", dump.to_str().unwrap()],
        &[],
    )
    .ok();
    let good = std::fs::read_to_string(&dump).unwrap();
    let lines: Vec<&str> = good.lines().collect();
    let header = lines[0];
    for (name, line) in [
        ("a deep line", deep_ron.clone()),
        (
            "a deep custom field",
            format!(
                r#"{{"key":"x","value":"","size":0,"created_at":0,"modified_at":0,"accessed_at":0,"expires_at":null,"compressed":false,"encrypted":false,"custom":{{"a":{deep_ron}}}}}"#
            ),
        ),
    ] {
        let hostile = dir.path().join(format!("{}.jsonl", name.replace(' ', "-")));
        std::fs::write(&hostile, format!("{header}\n{line}\n")).unwrap();
        let target = url("sqlite", &dir.path().join("target.db"));
        let out = run_on_a_small_stack(&["--store", &target, "import", hostile.to_str().unwrap()]);
        println!("import {name}: exit {}, {}", out.code, out.stderr.trim());
        assert_ne!(out.code, 0, "{name} was imported");
        assert!(
            out.stderr.starts_with("error: ") && !out.stderr.contains("panicked"),
            "{name}: {}",
            out.stderr
        );
    }
    assert_eq!(store.list_keys("mine").unwrap(), ["mine"]);
}

/// `--app ID` opens the game's per-user store (here through `BEVY_STORAGE_DIR`), and refuses
/// an invalid identifier or a `--store` beside it.
#[test]
fn app_finds_the_games_per_user_store() {
    let dir = tempfile::tempdir().unwrap();
    let env = [("BEVY_STORAGE_DIR", dir.path().to_str().unwrap())];
    let set = run(&["--app", "com.studio.game", "set", "gold", "120"], &env);
    assert_eq!(set.code, 0, "{}", set.stderr);
    assert!(dir.path().join("storage.db").is_file());
    let get = run(&["--app", "com.studio.game", "get", "gold"], &env);
    assert_eq!(get.code, 0, "{}", get.stderr);
    assert!(get.stdout.contains("120"), "{}", get.stdout);
    let bad = run(&["--app", "not an id", "list"], &env);
    assert_eq!(bad.code, 2, "{}", bad.stderr);
    assert!(
        bad.stderr.contains("invalid application identifier"),
        "{}",
        bad.stderr
    );
    let both = run(
        &["--app", "com.studio.game", "--store", "memory:", "list"],
        &env,
    );
    assert_eq!(both.code, 2, "{}", both.stderr);
}

/// `list`, `stats` and `export` walk the store a page (1,000 keys) at a time: a store of
/// several pages lists, counts and exports every live key once, in order.
#[test]
fn list_stats_and_export_walk_a_store_larger_than_a_page() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("big.db");
    let store = Store::open(StorageConfig::sqlite(&path).max_size(None)).unwrap();
    let n = 2_345;
    let ops = (0..n)
        .map(|i| StorageOperation::save(format!("item:{i:05}"), i))
        .collect();
    store.transaction(ops).unwrap();
    store
        .save(
            "item:gone",
            &0u32,
            &SaveOptions::default().ttl(std::time::Duration::from_millis(1)),
        )
        .unwrap();
    drop(store);
    std::thread::sleep(std::time::Duration::from_millis(5));
    let source = url("sqlite", &path);

    let rows = run(&["--store", &source, "list", "item:", "--json"], &[])
        .ok()
        .json();
    let keys: Vec<&str> = rows
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["key"].as_str().unwrap())
        .collect();
    let expected: Vec<String> = (0..n).map(|i| format!("item:{i:05}")).collect();
    assert_eq!(
        keys, expected,
        "every live key once, in order, no expired one"
    );

    let table = run(&["--store", &source, "list"], &[]).ok().stdout;
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), n + 2, "a header, one line per key, the total");
    assert!(lines[0].starts_with("KEY"), "{}", lines[0]);
    assert!(lines[n + 1].starts_with("2345 keys, "), "{}", lines[n + 1]);

    let stats = run(&["--store", &source, "stats", "--json"], &[])
        .ok()
        .json();
    assert_eq!(stats["expired_awaiting_purge"], 1, "{stats}");

    let dump = dir.path().join("big.jsonl");
    let out = run(
        &[
            "--store",
            &source,
            "export",
            dump.to_str().unwrap(),
            "--json",
        ],
        &[],
    )
    .ok()
    .json();
    assert_eq!(out["exported"], n as u64);
    let copy = url("file", &dir.path().join("copy"));
    run(
        &[
            "--store",
            &copy,
            "import",
            "--allow-internal-keys",
            dump.to_str().unwrap(),
        ],
        &[],
    )
    .ok();
    let copied = run(&["--store", &copy, "list", "--json"], &[]).ok().json();
    assert_eq!(copied.as_array().unwrap().len(), n);
}
