//! # tocsin-runtime
//!
//! What every Tocsin service shares: configuration loading, the NATS
//! connection (auth, TLS), JetStream stream setup, the admin HTTP server
//! (`/livez`, `/readyz`, `/metrics`), tracing initialisation and graceful
//! shutdown. Services get a connected client and a cancellation token from
//! here and never deal with these concerns themselves.
//!
//! # Layout
//! - [`context`]: [`context::ServiceContext`], what every service is given.
//! - [`config`]: YAML loading with `${ENV}` and `*_file` secrets, durations,
//!   and errors that name file, line and fix.
//! - [`nats`]: [`nats::NatsConfig`] and [`nats::connect`].
//! - [`streams`]: [`streams::JetStreamConfig`] and idempotent stream creation.
//! - [`admin`]: [`admin::Health`], [`admin::Metrics`] and the admin server.
//! - [`http_server`]: the bounded connection layer under a service's HTTP
//!   router (header timeout, head size, idle timeout, connection cap).
//! - [`lease`]: one active instance per role (incidents, escalation), the
//!   others standing by: a lease in JetStream KV.
//! - [`fence`]: a tenure's fence on the stream its role writes (a marker
//!   each entry must follow, checked by the NATS server).
//! - [`pull`]: [`pull::Puller`], a durable pull consumer that keeps pulling
//!   (opened again after a pull that went nowhere).
//! - [`retry`]: [`retry::Backoff`], the one retry pacing of the service loops.
//! - [`store`]: open a local cache store, or wipe and rebuild it.
//! - [`query`]: the one request/reply query loop.
//! - [`clock`]: the one injected clock (system time, or manual in tests).
//! - [`telemetry`]: tracing subscriber set-up, human or JSON.
//! - [`shutdown`]: SIGTERM/SIGINT to a cancellation token.
//! - [`error`]: the [`RuntimeError`] enum.
#![deny(unreachable_pub)]

pub mod admin;
pub mod bus;
pub mod clock;
pub mod config;
pub mod context;
pub mod error;
pub mod fence;
pub mod http_server;
pub mod kv;
pub mod lease;
pub mod nats;
pub mod progress;
pub mod pull;
pub mod query;
pub mod retry;
pub mod shutdown;
pub mod store;
pub mod streams;
pub mod telemetry;

pub use error::RuntimeError;
pub use tokio_util::sync::CancellationToken;

/// Makes rustls use the ring provider process-wide. HTTP clients (reqwest,
/// lettre) are built without a default provider so that only ring, which
/// the NATS client already uses, is compiled in. Call before building any
/// HTTP client; calling again is harmless.
pub fn install_crypto() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}
