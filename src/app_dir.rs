//! Where a game's saves live by default: the per-user data directory of the platform.
//!
//! [`StorageConfig::for_app`](crate::StorageConfig::for_app) and
//! [`StoragePlugin::for_app`](crate::plugin::StoragePlugin::for_app) put the store in the
//! data directory the platform gives each user for an application, found with the
//! [`directories`] crate (`ProjectDirs`, the same crate bevy_pkv uses, so a game moving from
//! bevy_pkv keeps its saves beside the old ones):
//!
//! | platform | directory for `com.studio.game` |
//! |---|---|
//! | Linux, BSD | `$XDG_DATA_HOME/game`, else `~/.local/share/game` |
//! | Windows | `%APPDATA%\studio\game\data` (`C:\Users\Ada\AppData\Roaming\studio\game\data`) |
//! | macOS | `~/Library/Application Support/com.studio.game` |
//!
//! The store is `storage.db` in that directory ([`APP_SQLITE_FILE`]; the folder
//! [`APP_FILE_ROOT`] without the `sqlite` feature). Nothing is created when the configuration
//! is made: the directory is created when the store first opens.
//!
//! # The environment variable
//!
//! When [`DIR_ENV`] (`BEVY_STORAGE_DIR`) is set and not empty, it **replaces** the
//! platform's directory: the store is `$BEVY_STORAGE_DIR/storage.db`, whatever the
//! identifier. For tests (a temporary directory per run), modding (a second profile) and
//! portable installs. The inspector's `--app` follows it too.
//!
//! # The identifier
//!
//! A reverse domain name: two or more segments separated by dots, read as
//! `[qualifier.]organization.application` (`com.studio.game`, `io.github.ada.roguelike`, or
//! `studio.game` without a qualifier). Each segment is 1 to 64 ASCII letters, digits, `-` or
//! `_`, starting with a letter or a digit; the whole is at most 255 bytes. So an identifier is
//! never a path (no `/`, `\`, `..`, spaces or drive letters) and means the same directory on
//! every platform. Anything else is [`StorageError::InvalidAppId`]. Choose it once: changing
//! it moves the saves.
//!
//! On Linux and the BSDs only the application segment names the directory (lowercased, as
//! the XDG convention and `directories` have it): `com.a.game` and `com.b.game` share
//! `~/.local/share/game`. Give the application segment a name only your game uses
//! (`com.studio.dungeon-crawler`, not `com.studio.game`).

use std::ffi::OsString;
use std::path::PathBuf;

use crate::error::{Result, StorageError};

/// The environment variable that replaces the platform's data directory (see the
/// [module docs](self)).
pub const DIR_ENV: &str = "BEVY_STORAGE_DIR";
/// The SQLite database of a `for_app` store, in its data directory.
pub const APP_SQLITE_FILE: &str = "storage.db";
/// The file store of a `for_app` store without the `sqlite` feature, in its data directory.
pub const APP_FILE_ROOT: &str = "storage";

const MAX_SEGMENT: usize = 64;
const MAX_ID: usize = 255;

/// An application identifier split as the platforms use it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct AppId<'a> {
    qualifier: String,
    organization: &'a str,
    application: &'a str,
}

fn invalid(id: &str, reason: impl Into<String>) -> StorageError {
    let mut shown: String = id.chars().take(80).collect();
    if shown.len() < id.len() {
        shown.push('…');
    }
    StorageError::InvalidAppId {
        id: shown,
        reason: reason.into(),
    }
}

fn parse(id: &str) -> Result<AppId<'_>> {
    if id.len() > MAX_ID {
        return Err(invalid(id, format!("it is longer than {MAX_ID} bytes")));
    }
    let segments: Vec<&str> = id.split('.').collect();
    if segments.len() < 2 {
        return Err(invalid(
            id,
            "it needs at least an organization and an application, separated by a dot \
             (for example com.studio.game)",
        ));
    }
    for segment in &segments {
        let problem = if segment.is_empty() {
            Some("it has an empty segment (two dots in a row, or a dot at an end)".to_owned())
        } else if segment.len() > MAX_SEGMENT {
            Some(format!(
                "the segment {segment:?} is longer than {MAX_SEGMENT} bytes"
            ))
        } else if !segment
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            Some(format!(
                "the segment {segment:?} holds a character other than ASCII letters, digits, \
                 `-` and `_`"
            ))
        } else if !segment.as_bytes()[0].is_ascii_alphanumeric() {
            Some(format!(
                "the segment {segment:?} does not start with a letter or a digit"
            ))
        } else {
            None
        };
        if let Some(reason) = problem {
            return Err(invalid(id, reason));
        }
    }
    let (application, rest) = segments.split_last().expect("two segments at least");
    let (organization, qualifier) = rest.split_last().expect("two segments at least");
    Ok(AppId {
        qualifier: qualifier.join("."),
        organization,
        application,
    })
}

/// Checks an application identifier against the rule of the [module docs](self).
pub fn validate_app_id(id: &str) -> Result<()> {
    parse(id).map(drop)
}

/// The data directory of the application `id`: `$BEVY_STORAGE_DIR` when it is set and not
/// empty, else the platform's per-user data directory (see the [module docs](self)). Not
/// created here.
///
/// Fails with [`StorageError::InvalidAppId`] for an identifier that breaks the rule (even
/// when the environment variable is set, so a game that runs in tests also runs shipped), and
/// with [`StorageError::Config`] when the platform has no data directory for the user (no
/// home directory): set `BEVY_STORAGE_DIR` there.
pub fn data_dir(id: &str) -> Result<PathBuf> {
    resolve(id, std::env::var_os(DIR_ENV))
}

/// [`data_dir`] with the environment variable's value given.
fn resolve(id: &str, env_dir: Option<OsString>) -> Result<PathBuf> {
    let app = parse(id)?;
    if let Some(dir) = env_dir.filter(|d| !d.is_empty()) {
        return Ok(PathBuf::from(dir));
    }
    directories::ProjectDirs::from(&app.qualifier, app.organization, app.application)
        .map(|dirs| dirs.data_dir().to_path_buf())
        .ok_or_else(|| {
            StorageError::Config(format!(
                "the platform has no per-user data directory for {id:?} (no home directory?); \
                 set {DIR_ENV} to the directory the saves should go to"
            ))
        })
}

/// Where the store of the application `id` lives: [`APP_SQLITE_FILE`] (or [`APP_FILE_ROOT`]
/// without the `sqlite` feature) in its [`data_dir`].
pub fn store_path(id: &str) -> Result<PathBuf> {
    let dir = data_dir(id)?;
    #[cfg(feature = "sqlite")]
    {
        Ok(dir.join(APP_SQLITE_FILE))
    }
    #[cfg(not(feature = "sqlite"))]
    {
        Ok(dir.join(APP_FILE_ROOT))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers_split_into_qualifier_organization_application() {
        let id = parse("com.studio.game").unwrap();
        assert_eq!(
            (id.qualifier.as_str(), id.organization, id.application),
            ("com", "studio", "game")
        );
        let id = parse("io.github.ada.rogue-like_2").unwrap();
        assert_eq!(
            (id.qualifier.as_str(), id.organization, id.application),
            ("io.github", "ada", "rogue-like_2")
        );
        let id = parse("studio.game").unwrap();
        assert_eq!((id.qualifier.as_str(), id.organization), ("", "studio"));
    }

    #[test]
    fn bad_identifiers_are_typed_errors() {
        let long_segment = format!("com.{}.game", "s".repeat(65));
        let long_id = ["abc"; 70].join(".");
        for bad in [
            "",
            "game",
            "com..game",
            ".com.game",
            "com.game.",
            "com.studio/evil.game",
            "com.studio.ga me",
            "com.studio.../..",
            "C:\\games.x",
            "com.stüdio.game",
            "com.-studio.game",
            "com.studio.game\n",
            long_segment.as_str(),
            long_id.as_str(),
        ] {
            let err = validate_app_id(bad).unwrap_err();
            assert!(
                matches!(err, StorageError::InvalidAppId { .. }),
                "{bad:?}: {err}"
            );
        }
    }

    #[test]
    fn the_environment_variable_replaces_the_platform_directory() {
        let dir = resolve("com.studio.game", Some("/tmp/mod-profile".into())).unwrap();
        assert_eq!(dir, PathBuf::from("/tmp/mod-profile"));
        // Empty means unset.
        let platform = resolve("com.studio.game", Some(OsString::new()));
        if let Ok(platform) = platform {
            assert_ne!(platform, PathBuf::from(""));
        }
        // The identifier is checked either way.
        let err = resolve("bad id", Some("/tmp/x".into())).unwrap_err();
        assert!(matches!(err, StorageError::InvalidAppId { .. }), "{err}");
    }
}
