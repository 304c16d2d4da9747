//! # tocsin-remediation
//!
//! Runbooks that act on incidents with no human, inside guardrails. Reads
//! INCIDENTS (the durable consumer `tocsin-remediation`, shared by every
//! replica), runs the steps of the runbooks an event starts, and writes
//! COMMANDS: a `remediation` record per step for the timeline, and the
//! incident actions (note, ack, resolve, escalate).
//!
//! Every guardrail holds across replicas because its state is on the bus
//! (JetStream KV): concurrency leases with an expiry, cooldowns, hourly
//! counts, breakers, disabled runbooks and the kill switch, and each run's
//! progress, so a crash resumes the run (or fails it safe) instead of
//! repeating what was done.
//!
//! # Layout
//! - [`config`]: the `remediation:` section.
//! - [`runbook`]: the runbook format, loading and checking (pure).
//! - [`template`]: handlebars in strict mode; values stay data.
//! - [`steps`]: one attempt of `http`, `exec` (argv, allowlist, process
//!   group), `check`.
//! - [`state`]: the KV buckets (runs, leases, guardrails).
//! - [`engine`]: guardrails, runs, resume, timeline, escalation.
//! - `service`: the consumer loop.
//! - [`control`]: requests on `tocsin.query.remediation` (runbooks, a
//!   run's state, switches).
//! - [`events`]: telemetry (each event logs and counts together).
//! - [`error`]: the error type, [`RemediationError`].
#![deny(unreachable_pub)]

pub mod config;
pub mod control;
pub mod engine;
pub mod error;
pub mod events;
pub mod runbook;
pub mod state;
pub mod steps;
pub mod template;

mod service;

use std::sync::Arc;

use tocsin_runtime::{config::ConfigError, context::ServiceContext};
use tokio::net::TcpListener;

pub use config::RemediationConfig;
pub use error::RemediationError;
pub use service::CONSUMER;

/// Loads the runbooks of `config`: the good ones, and an error per bad file.
pub fn load_runbooks(config: &RemediationConfig) -> (Vec<runbook::Loaded>, Vec<ConfigError>) {
    let dirs: Vec<_> = config.runbook_dirs.iter().map(|d| d.0.clone()).collect();
    runbook::load_dirs(&dirs, &config.allowed_programs)
}

/// Runs the remediation service until `ctx.shutdown` is cancelled. A bad
/// runbook file is refused (logged with file and line); the others run.
/// SIGHUP loads the runbooks again.
pub async fn run(
    config: RemediationConfig,
    ctx: &ServiceContext,
    _listener: Option<TcpListener>,
) -> Result<(), RemediationError> {
    tocsin_runtime::install_crypto();
    let (loaded, errors) = load_runbooks(&config);
    for e in &errors {
        tracing::error!(error = %e, "runbook refused; the others run");
    }
    tracing::info!(
        runbooks = loaded.len(),
        names = %loaded.iter().map(|l| l.runbook.name.as_str()).collect::<Vec<_>>().join(","),
        "runbooks loaded"
    );
    let replicas = ctx.jetstream.replicas;
    let kept = config
        .runs_kept_for
        .0
        .max(std::time::Duration::from_secs(3600));
    let open = |name: &'static str, what: &'static str, age| {
        let js = ctx.js.clone();
        async move { state::Bucket::open(&js, name, what, age, replicas).await }
    };
    let shutdown = ctx.shutdown.clone();
    let (runs, locks, guards) = loop {
        let r = async {
            Ok::<_, String>((
                open(state::RUNS, "Tocsin remediation: run progress", kept).await?,
                open(
                    state::LOCKS,
                    "Tocsin remediation: concurrency leases",
                    std::time::Duration::ZERO,
                )
                .await?,
                open(
                    state::GUARDS,
                    "Tocsin remediation: cooldowns, hourly counts, breakers, switches",
                    std::time::Duration::ZERO,
                )
                .await?,
            ))
        }
        .await;
        match r {
            Ok(b) => break b,
            Err(e) => {
                ctx.health.set_failing("remediation", e.clone());
                tracing::warn!(error = %e, "remediation state not available yet; retrying");
                tokio::select! {
                    _ = shutdown.cancelled() => return Ok(()),
                    _ = tokio::time::sleep(std::time::Duration::from_secs(1)) => {}
                }
            }
        }
    };
    let metrics = events::RemediationMetrics::register(&ctx.metrics);
    let limits = steps::Limits {
        max_output: config.max_output_bytes.clamp(64, 1 << 20),
        path: config.exec_path.clone(),
    };
    let http = reqwest::Client::builder()
        .connect_timeout(std::time::Duration::from_secs(5))
        .user_agent(concat!("Tocsin-remediation/", env!("CARGO_PKG_VERSION")))
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .map_err(|e| RemediationError::Config(format!("HTTP client: {e}")))?;
    let engine = Arc::new(engine::Engine {
        js: ctx.js.clone(),
        runs,
        locks,
        guards,
        config: config.clone(),
        runbooks: std::sync::RwLock::new(Arc::new(loaded)),
        clock: ctx.clock.clone(),
        http,
        limits,
        metrics,
        active: Default::default(),
        waiting: Default::default(),
    });
    let reload = reload_on_hangup(engine.clone(), shutdown.clone());
    let sweeper = tokio::spawn(engine.clone().sweep_approvals(shutdown.clone()));
    let control = tokio::spawn(control::serve(engine.clone(), shutdown.clone()));
    service::run(engine, ctx.health.clone(), shutdown).await;
    reload.abort();
    sweeper.abort();
    control.abort();
    Ok(())
}

fn reload_on_hangup(
    engine: Arc<engine::Engine>,
    shutdown: tokio_util::sync::CancellationToken,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let Ok(mut hup) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        else {
            return;
        };
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = hup.recv() => {}
            }
            let (loaded, errors) = load_runbooks(&engine.config);
            for e in &errors {
                tracing::error!(error = %e, "runbook refused on reload; the others run");
            }
            tracing::info!(runbooks = loaded.len(), "runbooks reloaded (SIGHUP)");
            engine.set_runbooks(loaded);
        }
    })
}
