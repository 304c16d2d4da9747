//! # tocsin-notifier
//!
//! The only service that talks to notification providers. It takes pages
//! from NOTIFY (written by escalation) and delivers them to Slack,
//! PagerDuty, Twilio SMS, SMTP email or a webhook (or, for channels with
//! no provider configured, the console), rendered from handlebars
//! templates; it follows INCIDENTS to keep what it sent in step with the
//! incident (the Slack message is updated and changes colour, the
//! PagerDuty alert is acknowledged, resolved and triggered again on a
//! reopen, notes become status updates); and it records every outcome on
//! the incident's timeline.
//!
//! # Delivered once
//! A delivery record per message lives in the JetStream KV bucket
//! `tocsin_deliveries`, shared by every replica, and every change to it is
//! revision-checked. A page is claimed in its record before it waits for
//! anything; the request is recorded as in flight before it leaves, and
//! the outcome before the NOTIFY message is acknowledged. A redelivered
//! page finds its record: final (nothing is sent), held by a live replica
//! (handed back), or left in flight by a replica that died: then the
//! provider is asked whether the request arrived (Slack's channel history
//! and Twilio's message list, paged back to the attempt) before anything
//! is sent again. PagerDuty (dedup key) and webhooks (`webhook-id`, unless
//! configured `drops_repeats: false`) drop repeats themselves, so for them
//! only the outcome is recorded (no in-flight write: a lost answer means
//! the request goes again with the same key); email keeps its `Message-ID`.
//!
//! # One destination delays only itself
//! Each provider has a circuit breaker; each destination (a PagerDuty
//! service, a Slack channel, the SMS account, ...) a pace at its rate
//! limit and a cap on requests in flight. A page whose turn is further
//! away than `max_hold` goes back to the bus until then. A destination's
//! rate is the replicas' together: while more than one runs (`replicas`:
//! each counts the others through the KV bucket `tocsin_notifier_replicas`)
//! they book its turns in the KV bucket `tocsin_notifier_paces` (`paces`).
//!
//! # Layout
//! - [`config`]: the `notifier:` section.
//! - [`templates`]: handlebars in strict mode, shipped defaults in
//!   config/templates/, checked at start-up and by `tocsin check-config`.
//! - [`providers`]: the [`providers::Provider`] trait and one module per
//!   provider (exact request shapes, look-ups, updates), and the registry.
//! - [`record`]: the delivery state machine (pure); `records`: the KV bucket.
//! - [`guard`]: circuit breaker, pacing and backoff (pure); `lanes`: per
//!   provider and destination.
//! - `deliver`: one delivery, and bringing sent messages up to date;
//!   `pages` and `changes`: the two consumer loops; `receipts`: timeline
//!   receipts; `incident`: the incident now; `events`: telemetry.
#![deny(unreachable_pub)]

pub mod config;
pub mod guard;
pub mod providers;
pub mod record;
pub mod records;
pub mod templates;

mod changes;
mod consumer;
mod deliver;
mod events;
mod incident;
mod lanes;
mod paces;
mod pages;
mod receipts;
mod replicas;

use std::sync::Arc;

use tocsin_runtime::{
    config::{at_least, HumanDuration},
    context::ServiceContext,
};

pub use changes::CHANGES_CONSUMER;
pub use config::NotifierConfig;
pub use pages::PAGES_CONSUMER;
pub use records::BUCKET as RECORDS_BUCKET;

#[derive(Debug, thiserror::Error)]
pub enum NotifierError {
    /// The `notifier:` config or a template is wrong; every problem is listed.
    #[error("notifier config:\n  {}", .0.join("\n  "))]
    Config(Vec<String>),
}

use tocsin_runtime::install_crypto;

/// What `tocsin check-config` learns about the providers, to check the
/// escalation config against them.
pub struct Checked {
    /// Channels that have a provider (or the console).
    pub channels: Vec<tocsin_proto::notify::Channel>,
    /// Channels only the console takes (a warning: fine for development).
    pub console_takes: Vec<tocsin_proto::notify::Channel>,
    /// PagerDuty services and webhooks by name.
    pub pagerduty_services: Vec<String>,
    pub webhooks: Vec<String>,
}

/// Checks the config and every template (for `tocsin check-config`). Builds
/// nothing that needs a runtime.
/// What is out of bounds in a channel's `guard` (a value of 0 that would
/// stop every request, or open the breaker on no failure at all).
fn guard_errors(g: &config::GuardConfig) -> Vec<String> {
    use std::time::Duration;
    let mut errors = Vec::new();
    let timeout = g.timeout.get();
    if !(Duration::from_millis(100)..=Duration::from_secs(600)).contains(&timeout) {
        errors.push(format!(
            "guard.timeout is {}; use 100ms to 10m (default 10s)",
            g.timeout
        ));
    }
    for (key, v) in [
        ("concurrency", g.concurrency),
        ("burst", g.burst),
        ("breaker.failures", Some(g.breaker.failures)),
        ("breaker.successes", Some(g.breaker.successes)),
    ] {
        if v == Some(0) {
            errors.push(format!("guard.{key} is 0; use at least 1"));
        }
    }
    errors.extend(at_least(
        "guard.breaker.open_for",
        g.breaker.open_for,
        HumanDuration::secs(1),
        "60s",
    ));
    errors
}

pub fn check(config: &NotifierConfig) -> Result<Checked, NotifierError> {
    install_crypto();
    let mut errors = Vec::new();
    if let Err(e) = config.zone() {
        errors.push(e);
    }
    if let Err(e) = config.shared_booking_timeout() {
        errors.push(e);
    }
    if let Some(c) = config.concurrency {
        if !(1..=8192).contains(&c) {
            errors.push(format!("concurrency is {c}; use 1 to 8192 (default 256)"));
        }
    }
    // Out of bounds is refused, not quietly replaced by the default.
    let (second, hour) = (HumanDuration::secs(1), HumanDuration::secs(3600));
    for (name, d, least, default) in [
        ("ack_wait", config.ack_wait, second, "30s"),
        ("records_kept_for", config.records_kept_for, hour, "14d"),
    ] {
        errors.extend(d.and_then(|d| at_least(name, d, least, default)));
    }
    let mut guards: Vec<(String, &config::GuardConfig)> = Vec::new();
    if let Some(c) = &config.slack {
        guards.push(("slack".into(), &c.guard));
    }
    if let Some(c) = &config.pagerduty {
        guards.push(("pagerduty".into(), &c.guard));
    }
    if let Some(c) = &config.sms {
        guards.push(("sms".into(), &c.guard));
    }
    if let Some(c) = &config.email {
        guards.push(("email".into(), &c.guard));
    }
    for w in &config.webhooks {
        guards.push((format!("webhook {:?}", w.name), &w.guard));
    }
    for (name, g) in guards {
        errors.extend(guard_errors(g).into_iter().map(|e| format!("{name}: {e}")));
    }
    let retry = &config.retry;
    if retry.initial.get() < std::time::Duration::from_millis(100) {
        errors.push(format!(
            "retry.initial is {}; use at least 100ms (default 1s): a failing provider would be asked again at once",
            retry.initial
        ));
    } else if retry.max.get() < retry.initial.get() {
        errors.push(format!(
            "retry.max ({}) is below retry.initial ({}); raise max (default 2m) or lower initial",
            retry.max, retry.initial
        ));
    }
    if let Err(e) = templates::Templates::load(config.templates.as_ref().map(|p| p.0.as_path())) {
        errors.extend(e.into_iter().map(|e| format!("template {e}")));
    }
    let registry = match providers::Registry::build(config) {
        Ok(r) => Some(r),
        Err(e) => {
            errors.extend(e);
            None
        }
    };
    if !errors.is_empty() {
        return Err(NotifierError::Config(errors));
    }
    let registry = registry.expect("no errors");
    use tocsin_proto::notify::Channel;
    Ok(Checked {
        channels: [
            Channel::Sms,
            Channel::Email,
            Channel::Slack,
            Channel::Pagerduty,
        ]
        .into_iter()
        .filter(|c| registry.has_channel(*c))
        .collect(),
        console_takes: registry.console_takes(),
        pagerduty_services: config
            .pagerduty
            .as_ref()
            .map(|p| p.services.keys().cloned().collect())
            .unwrap_or_default(),
        webhooks: config.webhooks.iter().map(|w| w.name.clone()).collect(),
    })
}

/// Runs the notifier until `ctx.shutdown` is cancelled. It serves no HTTP
/// (`_listener` is for the one signature every service has).
pub async fn run(
    config: NotifierConfig,
    ctx: &ServiceContext,
    _listener: Option<tokio::net::TcpListener>,
) -> Result<(), NotifierError> {
    install_crypto();
    ctx.health.set_failing("notifier", "connecting to NOTIFY");
    if config.data_dir.is_some() {
        tracing::warn!("notifier.data_dir is no longer used: delivery records live in the JetStream KV bucket {}", records::BUCKET);
    }
    let templates = templates::Templates::load(config.templates.as_ref().map(|p| p.0.as_path()))
        .map_err(|e| {
            NotifierError::Config(e.into_iter().map(|e| format!("template {e}")).collect())
        })?;
    let registry = providers::Registry::build(&config).map_err(NotifierError::Config)?;
    for c in registry.console_takes() {
        tracing::warn!(
            channel = c.as_str(),
            "no {} provider configured: its messages go to the console",
            c.as_str()
        );
    }
    let metrics = events::NotifierMetrics::register(&ctx.metrics);
    // The records bucket, created if needed (retried until NATS is there).
    let records = {
        let mut backoff = tocsin_runtime::retry::Backoff::standard();
        loop {
            match records::Records::open(
                &ctx.js,
                config.records_kept_for(),
                ctx.jetstream.replicas,
                ctx.jetstream.deliveries_max_bytes,
            )
            .await
            {
                Ok(r) => break r,
                Err(e) => {
                    ctx.health.set_failing("notifier", &e);
                    tracing::debug!(error = %e, "delivery records not available yet; retrying");
                }
            }
            if !backoff.wait(&ctx.shutdown).await {
                return Ok(());
            }
        }
    };
    let d = Arc::new(
        deliver::Deliverer::new(
            &config,
            templates,
            registry,
            records,
            metrics,
            ctx.clock.clone(),
            ctx.js.clone(),
            &ctx.jetstream.api_prefix(),
        )
        .map_err(NotifierError::Config)?,
    );
    let ack_wait = config.ack_wait();
    let changes = tokio::spawn(changes::run(d.clone(), ack_wait, ctx.shutdown.clone()));
    let sweeps = {
        let (d, stop) = (d.clone(), ctx.shutdown.clone());
        tokio::spawn(async move { d.incidents.sweep_until(stop).await })
    };
    let beats = {
        let (d, js, stop) = (d.clone(), ctx.js.clone(), ctx.shutdown.clone());
        let n = ctx.jetstream.replicas;
        tokio::spawn(async move { replicas::run(js, &d.lanes, n, stop).await })
    };
    pages::run(
        d.clone(),
        ack_wait,
        config.concurrency(),
        ctx.health.clone(),
        ctx.shutdown.clone(),
    )
    .await;
    let _ = changes.await;
    let _ = beats.await;
    let _ = sweeps.await;
    d.tasks.close();
    d.tasks.wait().await;
    tracing::info!("notifier stopped");
    Ok(())
}
