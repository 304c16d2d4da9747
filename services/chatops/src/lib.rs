//! # tocsin-chatops
//!
//! Where people act on incidents from outside the CLI: Slack's buttons and
//! `/tocsin`, SMS replies through Twilio, the HTTP API (`/api/v1`), the
//! public `/status.json`, and the report behind `tocsin report`. Every
//! action becomes a command on the COMMANDS stream, recorded with who did
//! it and from where (`ana via slack`, `grafana via api`); everything it
//! shows comes from the incidents and escalation services' queries. It
//! keeps no state, so any number of replicas can run.
//!
//! # Endpoints (one listener, `chatops.listen`)
//! - `POST /slack/actions`: Slack interactivity (`block_actions`).
//! - `POST /slack/commands`: the `/tocsin` slash command.
//! - `POST /twilio/sms`: Twilio's inbound SMS webhook.
//! - `/api/v1/...`: the API (`openapi.yaml` beside this crate).
//! - `GET /status.json`: the public status feed.
//!
//! It also answers `tocsin.query.report` over NATS (for `tocsin report`).
//!
//! # Layout
//! - [`config`]: the `chatops:` section; [`signing`]: Slack and Twilio
//!   signatures; [`parse`]: slash commands, SMS replies, matchers (pure).
//! - [`report`]: MTTA/MTTR figures (pure core); `status`: the status page.
//! - `slack`, `sms`, `api`: the endpoints; `ops`: what they share;
//!   `bus`: commands and queries; `http`: routes and bounded bodies;
//!   `events`: telemetry.
#![deny(unreachable_pub)]
// Handlers return `Result<_, Response>`: the error is the HTTP answer,
// built once per refused request, so its size costs nothing worth boxing.
#![allow(clippy::result_large_err)]

pub mod config;
pub mod parse;
pub mod report;
pub mod signing;
pub mod slack;
pub mod status;

mod api;
mod bus;
mod events;
mod http;
mod ops;
mod sms;

use std::{sync::Arc, time::Duration};

use tocsin_runtime::{context::ServiceContext, http_server};
use tokio::net::TcpListener;

pub use config::ChatopsConfig;
pub use http::ROUTES;

#[derive(Debug, thiserror::Error)]
pub enum ChatopsError {
    /// The `chatops:` config is wrong.
    #[error("chatops config: {0}")]
    Config(String),
    /// NATS refused or failed a command or query.
    #[error("{0}")]
    Bus(String),
    /// The incidents or escalation service did not answer in time.
    #[error("no answer in time")]
    NoAnswer,
}

/// Serves the endpoints on `listener` (and report queries over NATS) until
/// `ctx.shutdown`; then finishes requests and follow-ups in flight.
pub async fn run(
    config: ChatopsConfig,
    ctx: &ServiceContext,
    listener: Option<TcpListener>,
) -> Result<(), ChatopsError> {
    let listener = listener.ok_or_else(|| {
        ChatopsError::Config("chatops needs a listener (chatops.listen)".to_string())
    })?;
    tocsin_runtime::install_crypto();
    let metrics = events::ChatopsMetrics::register(&ctx.metrics);
    let http_client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .connect_timeout(Duration::from_secs(5))
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .map_err(|e| ChatopsError::Config(format!("cannot build the HTTP client: {e}")))?;
    let settings = http_server::Settings {
        max_connections: http_server::fit_open_files(
            config.max_connections,
            "chatops.max_connections",
        ),
        idle_timeout: config.idle_timeout.get(),
        header_read_timeout: config.header_read_timeout.get(),
        refusal: r#"{"status":"error","error":"too_many_connections","reason":"chatops is at chatops.max_connections with a request in progress on every connection; retry later"}"#,
    };
    let bus = bus::Bus::new(
        ctx.client(),
        ctx.js.clone(),
        ctx.clock.clone(),
        config.answer_timeout.get(),
    );
    if config.slack.is_none() && config.sms.is_none() && config.api_tokens.is_empty() {
        tracing::warn!("chatops has no slack, sms or api tokens configured: only /status.json and reports are served");
    }
    let app = Arc::new(http::App {
        cfg: config,
        bus,
        metrics: metrics.clone(),
        http: http_client,
        tasks: tokio_util::task::TaskTracker::new(),
        background: Arc::new(tokio::sync::Semaphore::new(http::MAX_BACKGROUND)),
        status_cache: Default::default(),
    });
    let addr = listener
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    tracing::info!(%addr, "chatops listening: /slack/actions /slack/commands /twilio/sms /api/v1 /status.json");
    let reports = tokio::spawn(report::serve(app.clone(), ctx.shutdown.clone()));
    http_server::serve(
        listener,
        http::router(app.clone()),
        settings,
        metrics,
        ctx.shutdown.clone(),
    )
    .await;
    let _ = reports.await;
    app.tasks.close();
    // Follow-ups are bounded by the client's timeout.
    app.tasks.wait().await;
    tracing::info!("chatops stopped");
    Ok(())
}
