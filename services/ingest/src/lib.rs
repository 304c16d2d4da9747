//! # tocsin-ingest
//!
//! HTTP receivers that put alerts durably on the bus. Three endpoints:
//!
//! - `POST /api/v1/alerts/alertmanager`: Alertmanager's webhook (version 4),
//!   unchanged; point a `webhook_configs` entry at it.
//! - `POST /v2/enqueue`: PagerDuty Events API v2-compatible events.
//! - `POST /api/v1/alerts`: Tocsin's generic JSON (also Alertmanager's
//!   `/api/v2/alerts` array shape).
//! - `POST /api/v1/heartbeat/<name>`: a dead-man's-switch ping for the
//!   incidents service's `heartbeats`.
//!
//! A request is answered 2xx only after JetStream acknowledged every one of
//! its alerts; each alert carries a `Nats-Msg-Id` derived from fingerprint,
//! status and start time, so a retried webhook stores nothing twice. When
//! NATS is unreachable the answer is 503 with `Retry-After`, which
//! Alertmanager retries.
//!
//! # Layout
//! - [`config`]: the `ingest:` section (listen address, tokens, limits).
//! - [`error`]: [`IngestError`] and [`error::Rejection`] (4xx/5xx answers).
//! - [`events`]: metrics and typed telemetry events.
//! - [`receivers`]: pure parsers, one per format, body -> `Vec<Alert>`.
//! - [`publish`]: JetStream publishing with message ids and ack waiting.
//! - `http`: routes, authentication, body limits.
#![deny(unreachable_pub)]

pub mod config;
pub mod error;
pub mod events;
pub mod publish;
pub mod receivers;

mod http;

use std::sync::Arc;

use async_nats::{jetstream, Client};
use tocsin_runtime::admin::Metrics;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use config::IngestConfig;
pub use error::IngestError;

/// Serves the ingest endpoints on `listener` until `shutdown` is cancelled,
/// then stops accepting connections, finishes the requests in flight (each
/// waits for its JetStream acks) and returns.
pub async fn run(
    config: IngestConfig,
    client: Client,
    js: jetstream::Context,
    metrics: &Metrics,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), IngestError> {
    let publisher = publish::Publisher::new(client, js, config.publish_timeout.get());
    let state = Arc::new(http::AppState::new(
        &config,
        publisher,
        events::IngestMetrics::register(metrics),
    ));
    let addr = listener
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    tracing::info!(%addr, "ingest listening");
    axum::serve(listener, http::router(state))
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
        .map_err(|source| IngestError::Serve { addr, source })?;
    tracing::info!("ingest stopped");
    Ok(())
}
