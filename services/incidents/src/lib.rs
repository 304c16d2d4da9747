//! # tocsin-incidents
//!
//! Turns alerts into incidents. The single writer of the INCIDENTS stream:
//! every incident's timeline is the ordered list of its entries there.
//!
//! Alerts that mean the same problem (same dedup key: the sender's key, or
//! the grouping labels) become one incident with a human number, a title, a
//! severity (the highest of its firing alerts), the alerts attached and a
//! lifecycle (triggered -> acknowledged -> resolved, snoozed, reopened).
//! Silences, maintenance windows and inhibition rules mark alerts as
//! suppressed: recorded and visible, paging nobody. Commands (ack, resolve,
//! snooze, ...) arrive on COMMANDS and are answered. Heartbeats open an
//! incident when a ping is missed.
//!
//! # Exactly once
//! The INCIDENTS stream is the truth; sled holds a projection with the last
//! applied stream sequence and the ALERTS cursor, saved atomically. After a
//! crash the service catches up from the stream, decides the last input
//! again (decisions are convergent, message ids derive from cause + kind +
//! incident) and goes on. A missing or corrupt store is rebuilt.
//!
//! # Layout
//! - [`config`]: the `incidents:` section.
//! - [`core`]: the pure projection and decisions.
//! - [`matchers`], [`silences`], [`inhibit`], [`severity`]: pure label logic.
//! - [`limits`]: cutting alerts and entries to the size budget.
//! - [`store`]: the sled projection store.
//! - [`clock`]: system or manual time for timers.
//! - `service`: the loop (catch up, consume, publish, save, ack).
//! - `query`: request/reply queries.
//! - [`events`], [`error`]: telemetry and errors.
#![deny(unreachable_pub)]

pub mod clock;
pub mod config;
pub mod core;
#[cfg(test)]
mod core_props;
pub mod error;
pub mod events;
pub mod inhibit;
pub mod limits;
pub use tocsin_rules::matchers;
pub mod severity;
pub mod silences;
pub mod store;
#[cfg(test)]
mod test_util;

mod query;
mod service;

use jiff::SignedDuration;
use tocsin_proto::silence::Silence;
use tocsin_runtime::context::ServiceContext;

pub use config::IncidentsConfig;
pub use error::IncidentsError;
pub use query::replay_incident;
pub use service::COMMANDS_CONSUMER;

/// Longest `group_wait`: a new incident waits this long before anyone is
/// paged, so more is surely a slip of a unit (30d for 30s).
pub const MAX_GROUP_WAIT: std::time::Duration = std::time::Duration::from_secs(3600);

/// Compiles the config into what the core needs, checking matchers,
/// regexes and timezones. `tocsin check-config` calls this too.
pub fn compile(config: &IncidentsConfig) -> Result<core::CoreConfig, IncidentsError> {
    let err = IncidentsError::Config;
    let every = core::GROUP_BY_EVERY_LABEL;
    if config.group_by.iter().any(|n| n == every) && config.group_by.len() > 1 {
        return Err(IncidentsError::Config(format!(
            "group_by: {every:?} (every label) cannot be combined with other labels, as in \
             Alertmanager; keep either {every:?} alone or the label names"
        )));
    }
    if let Some(bad) = config.group_by.iter().find(|n| {
        *n != every
            && !(n.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
                && n.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'))
    }) {
        return Err(IncidentsError::Config(format!(
            "group_by: {bad:?} is not a label name (letters, digits and _, not starting with a \
             digit), nor {every:?} for every label"
        )));
    }
    let inhibitor = inhibit::Inhibitor::new(&config.inhibit_rules).map_err(err)?;
    let mut windows = silences::SilenceIndex::default();
    for w in &config.maintenance_windows {
        windows
            .insert(Silence {
                id: w.name.clone(),
                matchers: w.matchers.clone(),
                starts_at: jiff::Timestamp::MIN,
                ends_at: jiff::Timestamp::MAX,
                created_by: "config".into(),
                comment: w.comment.clone(),
                recurrence: Some(w.recurrence.clone()),
            })
            .map_err(|e| IncidentsError::Config(format!("maintenance window {:?}: {e}", w.name)))?;
    }
    for h in &config.heartbeats {
        if !tocsin_proto::subjects::is_valid_token(&h.name) {
            return Err(IncidentsError::Config(format!(
                "heartbeat name {:?} must be 1-64 letters, digits, - or _",
                h.name
            )));
        }
        if h.interval.get().is_zero() {
            return Err(IncidentsError::Config(format!(
                "heartbeat {:?} has a zero interval",
                h.name
            )));
        }
    }
    if !config::MAX_ENTRY_BYTES_RANGE.contains(&config.max_entry_bytes) {
        return Err(IncidentsError::Config(format!(
            "max_entry_bytes is {}; use {} to {} (well under NATS's 1 MiB max_payload)",
            config.max_entry_bytes,
            config::MAX_ENTRY_BYTES_RANGE.start(),
            config::MAX_ENTRY_BYTES_RANGE.end()
        )));
    }
    if config.max_attempts == 0 {
        return Err(IncidentsError::Config(
            "max_attempts is 0; use at least 1 (default 5)".into(),
        ));
    }
    tocsin_runtime::lease::check_ttl("incidents.lease_ttl", config.lease_ttl.get())
        .map_err(IncidentsError::Config)?;
    if config.group_wait.get() > MAX_GROUP_WAIT {
        return Err(IncidentsError::Config(format!(
            "group_wait is {}; use at most 1h: every new incident waits that long before anyone is paged (Alertmanager's default is 30s)",
            config.group_wait
        )));
    }
    if config.max_in_memory == 0 {
        return Err(IncidentsError::Config(
            "max_in_memory is 0; use at least 1 (default 10000)".into(),
        ));
    }
    if config.max_silences == 0 {
        return Err(IncidentsError::Config(
            "max_silences is 0; use at least 1 (default 1000)".into(),
        ));
    }
    if config.list_max_reads == 0 {
        return Err(IncidentsError::Config(
            "list_max_reads is 0; use at least 1 (default 1000)".into(),
        ));
    }
    if config.max_annotations == 0 {
        return Err(IncidentsError::Config(
            "max_annotations is 0; use at least 1 (default 64)".into(),
        ));
    }
    let dur = |d: std::time::Duration| SignedDuration::try_from(d).unwrap_or(SignedDuration::MAX);
    Ok(core::CoreConfig {
        group_by: config.group_by.clone(),
        group_wait: dur(config.group_wait.get()),
        reopen_window: dur(config.reopen_window.get()),
        auto_resolve: config.auto_resolve,
        severity: std::sync::Arc::new(severity::SeverityMap::new(
            &config.severity_labels,
            &config.severity_map,
            config.default_severity,
        )),
        inhibitor: std::sync::Arc::new(inhibitor),
        windows,
        max_silences: config.max_silences,
    })
}

/// Runs the incidents service until `ctx.shutdown` is cancelled, as the
/// active instance while it holds the `incidents` lease and as a standby
/// otherwise (`tocsin_runtime::lease::lead`): while standing by it keeps
/// its store caught up with INCIDENTS (`follow`); each time it takes the
/// lease it starts from that (or afresh from its store) and catches up from
/// the INCIDENTS stream before it consumes or publishes anything. It serves
/// no HTTP (`_listener` is for the one signature every service has).
pub async fn run(
    config: IncidentsConfig,
    ctx: &ServiceContext,
    _listener: Option<tokio::net::TcpListener>,
) -> Result<(), IncidentsError> {
    // Checked before waiting: a standby with a bad config fails at start.
    compile(&config)?;
    let m = events::IncidentsMetrics::register(&ctx.metrics);
    let ttl = config.lease_ttl.get();
    let data_dir = config.data_dir();
    let warm = Warm::default();
    tocsin_runtime::lease::lead(
        ctx,
        "incidents",
        ttl,
        &data_dir,
        |tenure| {
            let (config, m, warm) = (config.clone(), m.clone(), warm.clone());
            async move { run_active(config, &tenure, m, warm).await }
        },
        |standby| follow(config.clone(), standby, m.clone(), warm.clone()),
    )
    .await
}

/// The service a standby keeps caught up, handed to the next tenure.
type Warm = std::sync::Arc<tokio::sync::Mutex<Option<service::Service>>>;

/// How often a standby reads what INCIDENTS gained.
const FOLLOW_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// While standing by: opens the store and keeps the projection caught up
/// with INCIDENTS (every [`FOLLOW_EVERY`]), saving it as the active
/// instance would, so taking the lease costs what a restart on a current
/// store costs rather than a fold of everything the active instance
/// wrote meanwhile (up to `jetstream.incidents_max_age` of it for a
/// standby started fresh). It writes nothing to NATS. Returns when asked
/// to stop (`ctx.shutdown`), between rounds, leaving the service in `warm`.
async fn follow(
    config: IncidentsConfig,
    ctx: ServiceContext,
    m: events::IncidentsMetrics,
    warm: Warm,
) {
    let shutdown = ctx.shutdown.clone();
    if !streams_in_place(&ctx.js, &shutdown).await {
        return;
    }
    let Ok(core) = compile(&config) else { return };
    {
        let mut slot = warm.clone().lock_owned().await;
        if slot.is_none() {
            // Loaded with the slot held, so the tenure waits for it rather
            // than opening the store a second time.
            let (client, js, health, clock) = (
                ctx.client(),
                ctx.js.clone(),
                ctx.health.clone(),
                ctx.clock.clone(),
            );
            let loading = tokio::task::spawn_blocking(move || {
                match service::Service::new(&config, core, client, js, m, health, clock) {
                    Ok(svc) => *slot = Some(svc),
                    Err(e) => {
                        tracing::warn!(error = %e, "standby: cannot read the store; it is read when this instance takes the lease")
                    }
                }
            });
            let _ = loading.await;
        }
    }
    loop {
        {
            let slot = warm.lock().await;
            let Some(svc) = slot.as_ref() else { return };
            match svc.follow().await {
                Ok(seq) => tocsin_runtime::lease::followed(&ctx.metrics, "incidents", seq),
                Err(e) => {
                    tracing::debug!(error = %e, "standby: cannot follow INCIDENTS yet; retrying")
                }
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(FOLLOW_EVERY) => {}
        }
    }
}

/// One tenure as the active instance: catches up from the INCIDENTS
/// stream, then consumes ALERTS and COMMANDS, fires timers by `ctx.clock`,
/// and answers queries, until `ctx.shutdown` is cancelled (or the lease is
/// lost, and this future dropped). The `incidents` health check passes once
/// it has caught up and answers queries.
async fn run_active(
    config: IncidentsConfig,
    ctx: &ServiceContext,
    m: events::IncidentsMetrics,
    warm: Warm,
) -> Result<(), IncidentsError> {
    let (client, js, health, clock, shutdown) = (
        ctx.client(),
        ctx.js.clone(),
        &ctx.health,
        ctx.clock.clone(),
        ctx.shutdown.clone(),
    );
    health.set_failing("incidents", "catching up with the INCIDENTS stream");
    if !streams_in_place(&js, &shutdown).await {
        return Ok(());
    }
    let core = compile(&config)?;
    // Reading the store takes seconds with many incidents: off the async
    // threads, so the lease goes on being renewed meanwhile.
    let standing_by = warm.lock().await.take();
    let svc = match standing_by {
        Some(mut svc) => {
            svc.starting_now();
            svc
        }
        None => {
            let (config, client, js, health) =
                (config.clone(), client.clone(), js.clone(), health.clone());
            tokio::task::spawn_blocking(move || {
                service::Service::new(&config, core, client, js, m, health, clock)
            })
            .await
            .map_err(|e| IncidentsError::StoreRead(e.to_string()))??
        }
    };
    // The fence first: from its marker on, nothing an earlier tenure
    // still has on its way is stored, and the catch-up folds in what was.
    if !svc.take_fence(&shutdown).await || !svc.catch_up(&shutdown).await {
        return Ok(());
    }
    let subs = query::subscribe(&js)
        .await
        .map_err(|e| IncidentsError::JetStream(format!("cannot subscribe to queries: {e}")))?;
    health.set_ok("incidents");
    // Aborted with this future too (a lost lease drops it): no stale
    // responder outlives the tenure.
    let queries = tokio_util::task::AbortOnDropHandle::new(tokio::spawn(query::serve(
        js,
        subs,
        svc.proj.clone(),
        svc.durable.clone(),
        svc.store.clone(),
        config.list_max_reads,
        shutdown.clone(),
    )));
    let result = svc.run(shutdown, ctx.watermark.clone()).await;
    let _ = queries.await;
    result
}

/// Waits until the streams incidents reads and writes exist; false if shut
/// down first. On a first start they are being created alongside (app
/// start-up, in some order): a missing one is worth a warning only if it
/// stays missing.
async fn streams_in_place(
    js: &async_nats::jetstream::Context,
    shutdown: &tokio_util::sync::CancellationToken,
) -> bool {
    use tocsin_proto::subjects::{STREAM_ALERTS, STREAM_COMMANDS, STREAM_INCIDENTS};
    let started = std::time::Instant::now();
    let mut backoff = tocsin_runtime::retry::Backoff::standard();
    loop {
        let mut missing = None;
        for stream in [STREAM_INCIDENTS, STREAM_ALERTS, STREAM_COMMANDS] {
            if let Err(e) = js.get_stream(stream).await {
                missing = Some((stream, e));
                break;
            }
        }
        match missing {
            None => return true,
            Some((stream, e)) if started.elapsed() < std::time::Duration::from_secs(30) => {
                tracing::debug!(stream, error = %e, "waiting for the stream to be created")
            }
            Some((stream, e)) => {
                tracing::warn!(stream, error = %e, "cannot find the stream yet; retrying")
            }
        }
        if !backoff.wait(shutdown).await {
            return false;
        }
    }
}
