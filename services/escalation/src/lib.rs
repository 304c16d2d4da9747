//! # tocsin-escalation
//!
//! Decides who is paged, on which channel, and when; writes one NOTIFY
//! message per page and never talks to a provider itself.
//!
//! An incident opens; the route tree picks a policy; level 0 pages whoever
//! is on call now, on the channels that person's rules give for the
//! severity; without an acknowledgement the next level follows after its
//! delay, and the policy repeats as configured. An acknowledgement stops it,
//! a resolve ends it, a snooze pauses it; each step lands on the incident's
//! timeline (a `paged` command to the incidents service).
//!
//! # Durable timers
//! Pending steps live in sled with the INCIDENTS cursor they reflect. After
//! a restart the service catches up with INCIDENTS *before* firing anything,
//! so no step fires for an incident acknowledged or resolved meanwhile, and
//! overdue steps fire at once. Every page has a stable id (incident,
//! generation, level, repeat, target, channel, rule step) used as its
//! `Nats-Msg-Id`, so a step fired again after a crash pages nobody twice.
//!
//! # Layout
//! - [`config`]: the `escalation:` section.
//! - [`schedule`], [`ical`]: on-call schedules and their calendar export.
//! - [`plan`]: routes, levels, channels, delays (pure).
//! - [`track`]: the per-incident state machine (pure).
//! - [`store`]: sled; `service`: the loop; `events`: its telemetry (each
//!   event logs and counts together).
//! - `query`: NATS request/reply (`tocsin.query.escalation.*`): who is on
//!   call, an incident's escalation plan, the schedules.
//! - `http`: the calendar server (`calendar_listen`): `.ics` feeds and
//!   `/oncall/<schedule>`.
#![deny(unreachable_pub)]

pub mod config;
pub mod ical;
pub mod plan;
pub mod schedule;
pub mod store;
pub mod track;

mod events;
mod http;
mod query;
mod service;

use std::sync::Arc;
use tocsin_runtime::context::ServiceContext;

use tokio::net::TcpListener;
use tokio_util::task::AbortOnDropHandle;

pub use config::EscalationConfig;
pub use service::PAGES_PER_MESSAGE;

#[derive(Debug, thiserror::Error)]
pub enum EscalationError {
    /// The `escalation:` config is wrong; every problem is listed.
    #[error("escalation config:\n  {}", .0.join("\n  "))]
    Config(Vec<String>),
    /// The store cannot be opened even after wiping it: fix the data directory.
    #[error("escalation store: {0}")]
    Store(String),
}

/// Checks the config (for `tocsin check-config`).
pub fn check(config: &EscalationConfig) -> Result<(), EscalationError> {
    let mut all = plan::Planner::new(config).err().unwrap_or_default();
    all.extend(tocsin_runtime::lease::check_ttl("escalation.lease_ttl", config.lease_ttl()).err());
    all.extend(config.calendar_error());
    if all.is_empty() {
        Ok(())
    } else {
        Err(EscalationError::Config(all))
    }
}

/// Runs the escalation service until `ctx.shutdown` is cancelled, as the
/// active instance while it holds the `escalation` lease and as a standby
/// otherwise (`tocsin_runtime::lease::lead`): while standing by it keeps
/// its tracks caught up with INCIDENTS (`follow`); each time it takes the
/// lease it starts from that (or afresh from its store) and catches up with
/// INCIDENTS before any step fires. While active it answers queries and, given a `calendar`
/// listener (bound to `calendar_listen`), serves the on-call calendars.
pub async fn run(
    config: EscalationConfig,
    ctx: &ServiceContext,
    calendar: Option<TcpListener>,
) -> Result<(), EscalationError> {
    // Checked before waiting: a standby with a bad config fails at start.
    check(&config)?;
    let metrics = events::EscalationMetrics::register(&ctx.metrics);
    // The calendars come from the config alone: served by standbys too, for
    // the whole life of the process.
    let calendar = match calendar {
        Some(listener) => {
            let planner = Arc::new(plan::Planner::new(&config).map_err(EscalationError::Config)?);
            let (names, clock, stop) = (
                planner.schedule_names(),
                ctx.clock.clone(),
                ctx.shutdown.clone(),
            );
            let token = config.calendar_token.clone();
            Some(AbortOnDropHandle::new(tokio::spawn(async move {
                http::serve(listener, planner, clock, names, token.as_ref(), stop).await
            })))
        }
        None => None,
    };
    let ttl = config.lease_ttl();
    let data_dir = config.data_dir();
    let warm = Warm::default();
    let result = tocsin_runtime::lease::lead(
        ctx,
        "escalation",
        ttl,
        &data_dir,
        |tenure| {
            let (config, metrics, warm) = (config.clone(), metrics.clone(), warm.clone());
            async move { run_active(config, &tenure, metrics, warm).await }
        },
        |standby| follow(config.clone(), standby, metrics.clone(), warm.clone()),
    )
    .await;
    if let Some(c) = calendar {
        let _ = c.await;
    }
    result
}

/// The service a standby keeps caught up, handed to the next tenure.
type Warm = Arc<tokio::sync::Mutex<Option<service::Service>>>;

/// How often a standby reads what INCIDENTS gained.
const FOLLOW_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// While standing by: opens the store and applies what INCIDENTS gains to
/// the tracks (every [`FOLLOW_EVERY`]), saving them as the active instance
/// would, so taking the lease costs what a restart on a current store
/// costs rather than applying everything written meanwhile. It fires
/// nothing and writes nothing to NATS. Returns when asked to stop
/// (`ctx.shutdown`), between rounds (every applied entry saved), leaving
/// the service in `warm`.
async fn follow(
    config: EscalationConfig,
    ctx: ServiceContext,
    metrics: events::EscalationMetrics,
    warm: Warm,
) {
    let Ok(planner) = plan::Planner::new(&config) else {
        return;
    };
    {
        let mut slot = warm.clone().lock_owned().await;
        if slot.is_none() {
            // Loaded with the slot held, so the tenure waits for it rather
            // than opening the store a second time.
            let (dir, js, clock) = (config.data_dir(), ctx.js.clone(), ctx.clock.clone());
            let watchdog = ctx
                .health
                .watchdog("escalation", tocsin_runtime::admin::STUCK_AFTER);
            let loading = tokio::task::spawn_blocking(move || {
                match service::Service::new(Arc::new(planner), &dir, js, clock, metrics, watchdog) {
                    Ok(svc) => *slot = Some(svc),
                    Err(e) => {
                        tracing::warn!(error = %e, "standby: cannot read the store; it is read when this instance takes the lease")
                    }
                }
            });
            let _ = loading.await;
        }
    }
    let mut reading = None;
    loop {
        {
            let mut slot = warm.lock().await;
            let Some(svc) = slot.as_mut() else { return };
            match svc.follow(&mut reading).await {
                Ok(seq) => tocsin_runtime::lease::followed(&ctx.metrics, "escalation", seq),
                Err(e) => {
                    tracing::debug!(error = %e, "standby: cannot follow INCIDENTS yet; retrying")
                }
            }
        }
        tokio::select! {
            _ = ctx.shutdown.cancelled() => return,
            _ = tokio::time::sleep(FOLLOW_EVERY) => {}
        }
    }
}

/// One tenure as the active instance.
async fn run_active(
    config: EscalationConfig,
    ctx: &ServiceContext,
    metrics: events::EscalationMetrics,
    warm: Warm,
) -> Result<(), EscalationError> {
    let (js, health, clock, shutdown) = (
        ctx.js.clone(),
        &ctx.health,
        ctx.clock.clone(),
        ctx.shutdown.clone(),
    );
    health.set_failing("escalation", "catching up with the INCIDENTS stream");
    let planner = Arc::new(plan::Planner::new(&config).map_err(EscalationError::Config)?);
    let dir = config.data_dir();
    let queries_js = js.clone();
    // Reading the store takes seconds with a million tracks: off the async
    // threads, so the lease goes on being renewed meanwhile.
    let watchdog = health.watchdog("escalation", tocsin_runtime::admin::STUCK_AFTER);
    let standing_by = warm.lock().await.take();
    let svc = match standing_by {
        Some(svc) => svc,
        None => {
            let (planner, clock) = (planner.clone(), clock.clone());
            tokio::task::spawn_blocking(move || {
                service::Service::new(planner, &dir, js, clock, metrics, watchdog)
            })
            .await
            .map_err(|e| EscalationError::Store(format!("reading the store stopped: {e}")))??
        }
    };
    // Subscribed before the service reports ready. NATS may not be up yet
    // when Tocsin starts: keep trying rather than fail.
    let mut backoff = tocsin_runtime::retry::Backoff::standard();
    let subs = loop {
        match tokio::time::timeout(
            std::time::Duration::from_secs(2),
            query::subscribe(&queries_js),
        )
        .await
        {
            Ok(Ok(s)) => break s,
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "cannot subscribe to escalation queries yet; retrying")
            }
            Err(_) => tracing::debug!("NATS not reachable yet for escalation queries; retrying"),
        }
        if !backoff.wait(&shutdown).await {
            return Ok(());
        }
    };
    // The query task ends with this future, also if it is dropped (a lost
    // lease, an in-process crash in tests), so no stale responder outlives
    // the tenure.
    let queries = AbortOnDropHandle::new(tokio::spawn(query::serve(
        subs,
        planner.clone(),
        svc.store.clone(),
        clock.clone(),
        planner.schedule_names(),
        shutdown.clone(),
    )));
    let result = svc.run(health, shutdown, ctx.watermark.clone()).await;
    let _ = queries.await;
    result
}
