//! Why the program stops, and its exit code.

use std::io;

use bevy_storage::StorageError;

/// Why the program stops, and with which exit code.
#[derive(Debug)]
pub enum Failure {
    /// Bad arguments or configuration: exit code 2.
    Usage(String),
    /// Something failed while working: exit code 1.
    Runtime(String),
    /// The key has no live record: exit code 3.
    NotFound(String),
    /// Stdout was closed (`| head`): stop quietly.
    BrokenPipe,
}

impl Failure {
    pub fn usage(message: impl Into<String>) -> Self {
        Self::Usage(message.into())
    }

    pub fn runtime(message: impl Into<String>) -> Self {
        Self::Runtime(message.into())
    }

    pub fn code(&self) -> u8 {
        match self {
            Self::BrokenPipe => 0,
            Self::Runtime(_) => 1,
            Self::Usage(_) => 2,
            Self::NotFound(_) => 3,
        }
    }
}

impl From<StorageError> for Failure {
    fn from(e: StorageError) -> Self {
        let message = e.to_string();
        match e {
            StorageError::InvalidKey { .. }
            | StorageError::Config(_)
            | StorageError::FeatureDisabled { .. }
            | StorageError::InvalidEncryptionKey(_) => Self::Usage(message),
            _ => Self::Runtime(message),
        }
    }
}

impl From<io::Error> for Failure {
    /// Errors writing the output.
    fn from(e: io::Error) -> Self {
        if e.kind() == io::ErrorKind::BrokenPipe {
            Self::BrokenPipe
        } else {
            Self::Runtime(format!("cannot write the output: {e}"))
        }
    }
}

/// What every command returns.
pub type Outcome<T = ()> = Result<T, Failure>;
