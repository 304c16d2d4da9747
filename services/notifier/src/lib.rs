//! # tocsin-notifier
//!
//! The only service that talks to notification providers. It takes pages
//! from NOTIFY (written by escalation) and delivers them to Slack,
//! PagerDuty, Twilio SMS, SMTP email or a webhook, rendered from handlebars
//! templates; it follows INCIDENTS to keep what it sent in step with the
//! incident (the Slack message is updated and changes colour, the
//! PagerDuty alert is acknowledged and resolved, notes become status
//! updates); and it records every outcome on the incident's timeline.
//!
//! # Delivered once
//! A delivery record per message id (the page id) lives in sled. The
//! attempt is recorded (and flushed) before the request leaves and the
//! outcome before the NOTIFY message is acknowledged, so a redelivered page
//! is looked up, not sent again. When a request went out but its answer was
//! lost (a crash mid-request, or the page redelivered to another replica),
//! the provider is asked: Slack's channel history (the message carries the
//! delivery id as metadata) and Twilio's message list are searched;
//! PagerDuty (dedup key) and webhooks (`webhook-id`) drop repeats
//! themselves; email keeps its `Message-ID`.
//!
//! # Guarded
//! Retries back off exponentially with jitter and honour `Retry-After`; a
//! 4xx that cannot succeed is not retried and lands on the timeline with
//! the provider's error text. Each channel has a circuit breaker (open
//! after 5 failures, half-open after 60 s, closed after 2 successes), a
//! rate limit and a request timeout. While a provider is down its pages
//! wait on the bus (negatively acknowledged with a delay), none is lost.
//!
//! # Layout
//! - [`config`]: the `notifier:` section.
//! - [`templates`]: handlebars in strict mode, shipped defaults in
//!   config/templates/, checked at start-up and by `tocsin check-config`.
//! - [`channels`]: one module per provider (exact request shapes).
//! - [`guard`]: circuit breaker and backoff (pure).
//! - [`store`]: the sled delivery records.
//! - `deliver`: one delivery from guard to record; `service`: the loops.
#![deny(unreachable_pub)]

pub mod channels;
pub mod config;
pub mod guard;
pub mod store;
pub mod templates;

mod deliver;
mod service;

use std::sync::Arc;

use async_nats::jetstream;
use tocsin_runtime::admin::{Health, Metrics};
use tokio_util::sync::CancellationToken;

pub use config::NotifierConfig;
pub use service::{PAGES_CONSUMER, SYNC_CONSUMER};

#[derive(Debug, thiserror::Error)]
pub enum NotifierError {
    /// The `notifier:` config or a template is wrong; every problem is listed.
    #[error("notifier config:\n  {}", .0.join("\n  "))]
    Config(Vec<String>),
    /// The delivery records cannot be opened: fix the data directory.
    #[error("notifier store: {0}")]
    Store(String),
}

use tocsin_runtime::install_crypto;

/// Checks the config and every template (for `tocsin check-config`).
pub fn check(config: &NotifierConfig) -> Result<(), NotifierError> {
    install_crypto();
    deliver::build_parts(config)
        .map(|_| ())
        .map_err(NotifierError::Config)
}

/// Runs the notifier until `shutdown` is cancelled.
pub async fn run(
    config: NotifierConfig,
    js: jetstream::Context,
    metrics: &Metrics,
    health: &Health,
    shutdown: CancellationToken,
) -> Result<(), NotifierError> {
    install_crypto();
    health.set_failing("notifier", "connecting to NOTIFY");
    let dir = config
        .data_dir
        .as_ref()
        .map(|p| p.0.clone())
        .unwrap_or_else(|| std::path::PathBuf::from(".tocsin/data/notifier"));
    // Unlike the other services' stores this one is not a projection of a
    // stream. An unreadable one is moved aside (kept for inspection), not
    // deleted; with a fresh store every redelivered page is checked with
    // its provider before it is sent (see "Delivered once").
    let store = match store::Store::open(&dir) {
        Ok(s) => s,
        Err(e) => {
            let aside =
                dir.with_extension(format!("unreadable-{}", jiff::Timestamp::now().as_second()));
            tracing::error!(dir = %dir.display(), error = %e, aside = %aside.display(), "notifier store unreadable; moved aside, starting a new one");
            let _ = std::fs::rename(&dir, &aside);
            store::Store::open(&dir)
                .map_err(|e| NotifierError::Store(format!("{}: {e}", dir.display())))?
        }
    };
    let d = deliver::Deliverer::new(&config, store, deliver::NotifierMetrics::register(metrics))
        .map_err(NotifierError::Config)?;
    let shared = Arc::new(service::Shared {
        d,
        js,
        ack_wait: config.ack_wait(),
        incidents: tokio::sync::OnceCell::new(),
    });
    let sync = tokio::spawn(service::run_sync(shared.clone(), shutdown.clone()));
    let prune = {
        let (store, keep, stop) = (
            shared.d.store.clone(),
            config.records_kept_for(),
            shutdown.clone(),
        );
        tokio::spawn(async move {
            loop {
                let before = jiff::Timestamp::now()
                    .checked_sub(jiff::SignedDuration::try_from(keep).unwrap_or_default())
                    .unwrap_or(jiff::Timestamp::UNIX_EPOCH);
                let s = store.clone();
                if let Ok(n) = tokio::task::spawn_blocking(move || s.prune(before)).await {
                    if n > 0 {
                        tracing::info!(removed = n, "old delivery records pruned");
                    }
                }
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tokio::time::sleep(std::time::Duration::from_secs(3600)) => {}
                }
            }
        })
    };
    service::run_pages(
        shared.clone(),
        config.concurrency(),
        health.clone(),
        shutdown.clone(),
    )
    .await;
    let _ = sync.await;
    prune.abort();
    shared.d.store.flush().await;
    tracing::info!("notifier stopped");
    Ok(())
}
