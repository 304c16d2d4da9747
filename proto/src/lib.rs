//! # tocsin-proto
//!
//! Every type that crosses Tocsin's bus lives here, together with the stream
//! and subject names and the codec. Services convert to and from these types
//! at their edges and never define wire types of their own.
//!
//! # Layout
//! - [`subjects`]: stream names, subjects, header names, the stream catalogue.
//! - [`alert`]: the normalized [`Alert`] every ingest endpoint produces.
//! - [`envelope`]: the [`Envelope`] around every payload (schema version,
//!   source, received-at, trace context).
//! - [`codec`]: MessagePack with named fields (`rmp_serde::to_vec_named`), so
//!   fields can be added without breaking older readers.
//! - [`fingerprint`]: Alertmanager-compatible alert fingerprints.
//! - [`incident`]: incidents and the INCIDENTS stream's [`incident::LogEntry`].
//! - [`command`]: commands (COMMANDS stream) and their replies.
//! - [`notify`]: pages (NOTIFY stream).
//! - [`silence`]: silences, matchers and recurring windows.
//!
//! # Compatibility rules
//! New fields get `#[serde(default)]`; fields are never renamed or re-typed in
//! place. A breaking change bumps [`SCHEMA_VERSION`]. The golden-bytes tests in
//! `codec` pin the encoding: if they fail, you changed the wire format.
#![deny(unreachable_pub)]

pub mod alert;
pub mod codec;
pub mod command;
pub mod envelope;
pub mod fingerprint;
pub mod incident;
pub mod labels;
pub mod notify;
pub mod query;
pub mod silence;
pub mod subjects;

pub use alert::{Alert, AlertStatus, Origin, SourceKind};
pub use codec::{decode, encode, CodecError};
pub use envelope::{Envelope, SCHEMA_VERSION};
pub use fingerprint::Fingerprint;
pub use jiff::Timestamp;
pub use labels::Labels;
