//! Errors of the runtime, named by what the caller must do.

use std::path::PathBuf;

use crate::config::ConfigError;

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// The configuration is wrong; the message says where and how to fix it.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A credentials or certificate file could not be read.
    #[error("cannot read {what} {path}: {source}")]
    ReadFile {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    /// Could not reach NATS at all (only when retrying is off).
    #[error("cannot connect to NATS at {url}: {source}")]
    Connect {
        url: String,
        source: async_nats::ConnectError,
    },
    /// A process asked for the NATS credentials of an identity whose
    /// `nats.credentials` entry was not read when the config was loaded.
    #[error(
        "nats.credentials.{identity} was not read when the config was loaded; \
         load the config for the services this process runs"
    )]
    CredentialsNotRead { identity: String },
    /// JetStream refused a stream definition (e.g. a change it cannot apply in place).
    #[error("cannot create or update stream {stream}: {reason}")]
    Stream { stream: String, reason: String },
}
