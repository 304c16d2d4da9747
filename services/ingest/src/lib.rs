//! # tocsin-ingest
//!
//! HTTP receivers that put alerts durably on the bus. Three endpoints:
//!
//! - `POST /api/v1/alerts/alertmanager`: Alertmanager's webhook (version 4),
//!   unchanged; point a `webhook_configs` entry at it.
//! - `POST /v2/enqueue`: PagerDuty Events API v2-compatible events.
//! - `POST /v2/change/enqueue`: PagerDuty change events, recorded as `info`
//!   alerts that end by themselves.
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
//! - `http`: routes, authentication, body limits and deadlines, the
//!   in-flight byte budget.
//! - connections: `tocsin_runtime::http_server` (hyper HTTP/1 with a header
//!   read timeout, an idle timeout and a cap on open connections that evicts
//!   the oldest idle one), reporting to [`events`].
//!
//! Every bound on what comes from outside is in [`config::IngestConfig`]
//! and [`config::Limits`]; what exceeds one gets a 4xx naming the field and
//! the key, and only what a retry can fix gets 503 + `Retry-After`.
#![deny(unreachable_pub)]

pub mod config;
pub mod error;
pub mod events;
pub mod publish;
pub mod receivers;

mod http;

use std::sync::Arc;

use tocsin_runtime::{context::ServiceContext, http_server};
use tokio::net::TcpListener;

pub use config::IngestConfig;
pub use error::IngestError;

/// Serves the ingest endpoints on `listener` until `ctx.shutdown` is
/// cancelled, then stops accepting connections, finishes the requests in
/// flight (each waits for its JetStream acks) and returns.
pub async fn run(
    config: IngestConfig,
    ctx: &ServiceContext,
    listener: Option<TcpListener>,
) -> Result<(), IngestError> {
    let listener = listener.ok_or_else(|| {
        IngestError::Listen("ingest needs a listener (ingest.listen)".to_string())
    })?;
    let metrics = &ctx.metrics;
    let shutdown = ctx.shutdown.clone();
    let publisher = publish::Publisher::new(
        ctx.client(),
        ctx.js.clone(),
        config.publish_timeout.get(),
        config.limits.alert_bytes,
    );
    let ingest_metrics = events::IngestMetrics::register(metrics);
    let state = Arc::new(http::AppState::new(
        &config,
        publisher,
        ingest_metrics.clone(),
        ctx.clock.clone(),
    ));
    let addr = listener
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    let settings = http_server::Settings {
        max_connections: http_server::fit_open_files(
            config.max_connections,
            "ingest.max_connections",
        ),
        idle_timeout: config.idle_timeout.get(),
        header_read_timeout: config.header_read_timeout.get(),
        refusal: r#"{"status":"error","error":"too_many_connections","reason":"ingest is at ingest.max_connections with a request in progress on every connection; retry later"}"#,
    };
    tracing::info!(%addr, max_connections = settings.max_connections, "ingest listening");
    http_server::serve(
        listener,
        http::router(state),
        settings,
        ingest_metrics,
        shutdown,
    )
    .await;
    tracing::info!("ingest stopped");
    Ok(())
}
