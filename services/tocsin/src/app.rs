//! Start-up and shutdown, shared by `tocsin up` and the single-service commands.
//!
//! Order: admin server (so `/livez` answers at once), NATS clients (one per
//! service, each as that service's NATS identity with its own credentials,
//! retrying in the background), streams (ensured until they exist;
//! `/readyz` says "not ready" until then), then the services. On shutdown
//! the services get the cancellation first and have the grace period to
//! finish in-flight work; then the NATS clients are drained so every
//! buffered publish is sent.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use tocsin_runtime::{clock::Clock, progress::Progress};

use anyhow::Context as _;
use tocsin_runtime::context::ServiceContext;
use tocsin_runtime::{
    admin::{self, Health, Metrics},
    nats, streams, CancellationToken,
};
use tokio::{net::TcpListener, task::JoinSet};

use crate::config::{Config, Service};

/// Runtime knobs that come from flags and environment, not the file.
#[derive(Clone)]
pub struct Options {
    pub admin_listen: SocketAddr,
    pub grace_period: Duration,
    /// Time for timers (snooze ends, heartbeats); tests pass a manual clock.
    pub clock: Arc<dyn Clock>,
    /// Where the services report their watermarks (tests wait on it).
    pub progress: Progress,
}

/// The sockets a process serves on, bound before anything starts (tests bind
/// port 0 and read the address back).
pub struct Listeners {
    pub admin: TcpListener,
    pub ingest: Option<TcpListener>,
    /// The escalation service's calendar server (`escalation.calendar_listen`).
    pub calendar: Option<TcpListener>,
    /// The chat-ops service's endpoints (`chatops.listen`).
    pub chatops: Option<TcpListener>,
}

impl Listeners {
    /// Binds the addresses from `options` and `config` for `services`.
    pub async fn bind(
        config: &Config,
        services: &[Service],
        options: &Options,
    ) -> anyhow::Result<Self> {
        let admin = TcpListener::bind(options.admin_listen)
            .await
            .with_context(|| format!("cannot listen on admin address {}", options.admin_listen))?;
        let mut ingest = None;
        if services.contains(&Service::Ingest) {
            let addr = config.ingest.as_ref().context("no ingest section")?.listen;
            ingest = Some(
                TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("ingest cannot listen on {addr}"))?,
            );
        }
        let mut calendar = None;
        if let (true, Some(addr)) = (
            services.contains(&Service::Escalation),
            config.escalation.calendar_listen,
        ) {
            calendar = Some(
                TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("escalation cannot serve calendars on {addr}"))?,
            );
        }
        let mut chatops = None;
        if let (true, Some(c)) = (services.contains(&Service::Chatops), &config.chatops) {
            chatops = Some(
                TcpListener::bind(c.listen)
                    .await
                    .with_context(|| format!("chatops cannot listen on {}", c.listen))?,
            );
        }
        Ok(Listeners {
            admin,
            ingest,
            calendar,
            chatops,
        })
    }
}

/// Runs one service: its section of the config, its context, its
/// listener. Returns its name and how it ended.
async fn start(
    service: Service,
    config: Config,
    ctx: ServiceContext,
    listener: Option<TcpListener>,
) -> (&'static str, anyhow::Result<()>) {
    let r = match service {
        Service::Ingest => match config.ingest {
            Some(mut c) => {
                // Pings name the incidents service's heartbeats (same file).
                c.heartbeats = Some(
                    config
                        .incidents
                        .heartbeats
                        .iter()
                        .map(|h| h.name.clone())
                        .collect(),
                );
                tocsin_ingest::run(c, &ctx, listener)
                    .await
                    .map_err(Into::into)
            }
            None => Err(anyhow::anyhow!("no ingest section")),
        },
        Service::Incidents => tocsin_incidents::run(config.incidents, &ctx, listener)
            .await
            .map_err(Into::into),
        Service::Escalation => tocsin_escalation::run(config.escalation, &ctx, listener)
            .await
            .map_err(Into::into),
        Service::Chatops => match config.chatops {
            Some(c) => tocsin_chatops::run(c, &ctx, listener)
                .await
                .map_err(Into::into),
            None => Ok(()),
        },
        Service::Remediation => match config.remediation {
            Some(c) => tocsin_remediation::run(c, &ctx, listener)
                .await
                .map_err(Into::into),
            None => Ok(()),
        },
        Service::Notifier => match config.notifier {
            Some(c) => tocsin_notifier::run(c, &ctx, listener)
                .await
                .map_err(Into::into),
            None => Ok(()),
        },
    };
    (service.name(), r)
}

/// Runs `services` until `shutdown` is cancelled or one of them fails.
pub async fn run(
    config: Config,
    services: &[Service],
    options: Options,
    listeners: Listeners,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let metrics = Metrics::new();
    let health = Health::new();
    health.set_failing("jetstream", "streams not set up yet");

    if let Ok(addr) = listeners.admin.local_addr() {
        tracing::info!(%addr, "admin endpoints: /livez /readyz /metrics");
    }
    let admin_stop = CancellationToken::new();
    let admin_task = tokio::spawn(admin::serve(
        listeners.admin,
        health.clone(),
        metrics.clone(),
        admin_stop.clone(),
    ));

    // How far each service has handled each stream it reads.
    {
        let (progress, metrics, stop) = (
            options.progress.clone(),
            metrics.clone(),
            admin_stop.clone(),
        );
        tokio::spawn(async move { progress.export(metrics, stop).await });
    }

    // One client per service, as that service's NATS identity: in `tocsin
    // up` each service works with exactly the permissions it has when it
    // runs alone. The notifier connects only when it runs.
    let mut clients: Vec<(Service, async_nats::Client)> = Vec::new();
    for service in services {
        if *service == Service::Notifier && config.notifier.is_none() {
            continue;
        }
        if *service == Service::Chatops && config.chatops.is_none() {
            continue;
        }
        if *service == Service::Remediation && config.remediation.is_none() {
            continue;
        }
        let name = service.name();
        let client =
            nats::connect_as(&config.nats, name, &format!("tocsin-{name}"), &metrics).await?;
        clients.push((*service, client));
    }
    health.watch_nats_clients(
        clients
            .iter()
            .map(|(s, c)| (s.name().to_string(), c.clone()))
            .collect(),
    );
    let client_of = |service: Service| -> anyhow::Result<async_nats::Client> {
        clients
            .iter()
            .find(|(s, _)| *s == service)
            .map(|(_, c)| c.clone())
            .with_context(|| format!("no NATS client for {}", service.name()))
    };

    let mut tasks: JoinSet<(&'static str, anyhow::Result<()>)> = JoinSet::new();
    // Streams: set up by the admin identity when it has credentials (it may
    // also change them), else by the first service, whose NATS user may
    // create the streams but, with its own credentials, not change them.
    {
        let (setup, update) = if config.nats.has_own_credentials(Config::ADMIN) {
            // Its own metrics: a connection closed after set-up is no outage.
            let admin = nats::connect_as(
                &config.nats,
                Config::ADMIN,
                "tocsin-admin-setup",
                &Metrics::new(),
            )
            .await?;
            (Some(admin), true)
        } else {
            let update = clients
                .first()
                .is_none_or(|(s, _)| !config.nats.has_own_credentials(s.name()));
            (None, update)
        };
        let js = match (&setup, clients.first()) {
            (Some(admin), _) => config.jetstream.context(admin.clone()),
            (None, Some((_, c))) => config.jetstream.context(c.clone()),
            (None, None) => anyhow::bail!("no service to run"),
        };
        // Storage is watched (read-only) with the first service's client.
        let watch = clients
            .first()
            .map(|(_, c)| config.jetstream.context(c.clone()));
        let (cfg, health, metrics, stop) = (
            config.jetstream.clone(),
            health.clone(),
            metrics.clone(),
            shutdown.clone(),
        );
        tokio::spawn(async move {
            let ready =
                streams::ensure_streams_until_ready(&js, &cfg, update, &health, &stop).await;
            if let Some(admin) = setup {
                let _ = tokio::time::timeout(Duration::from_secs(5), admin.drain()).await;
            }
            if let (true, Some(watch)) = (ready, watch) {
                streams::watch_storage(&watch, &cfg, &health, &metrics, &stop).await;
            }
        });
    }

    // One context per service (its own NATS identity), one signature:
    // `run(config, &ctx, listener)`.
    let mut ingest_listener = listeners.ingest;
    let mut calendar_listener = listeners.calendar;
    let mut chatops_listener = listeners.chatops;
    for service in services {
        if *service == Service::Notifier && config.notifier.is_none() {
            tracing::info!(
                "no `notifier:` section: pages wait on the NOTIFY stream for a notifier"
            );
            continue;
        }
        if *service == Service::Chatops && config.chatops.is_none() {
            tracing::info!("no `chatops:` section: no Slack, SMS, API or status endpoints");
            continue;
        }
        if *service == Service::Remediation && config.remediation.is_none() {
            tracing::info!("no `remediation:` section: no runbooks run");
            continue;
        }
        let ctx = ServiceContext {
            js: config.jetstream.context(client_of(*service)?),
            metrics: metrics.clone(),
            health: health.clone(),
            clock: options.clock.clone(),
            jetstream: config.jetstream.clone(),
            shutdown: shutdown.clone(),
            watermark: options.progress.of(service.name()),
        };
        let listener = match service {
            Service::Ingest => Some(
                ingest_listener
                    .take()
                    .context("no ingest listener was bound")?,
            ),
            Service::Escalation => calendar_listener.take(),
            Service::Chatops => Some(
                chatops_listener
                    .take()
                    .context("no chatops listener was bound")?,
            ),
            _ => None,
        };
        // Not ready until the service says so: a service that reads from
        // "now on" (remediation's consumer) must not miss what comes in
        // between the admin server answering and the service's task
        // starting. Ingest and chat-ops answer requests and keep no check.
        if matches!(
            service,
            Service::Incidents | Service::Escalation | Service::Notifier | Service::Remediation
        ) {
            health.set_failing(service.name(), "starting");
        }
        tasks.spawn(start(*service, config.clone(), ctx, listener));
    }

    // Wait for the shutdown request, or for a service to stop by itself
    // (which is a failure: services run until cancelled).
    let mut failure = None;
    tokio::select! {
        // A service that returns because it was told to stop is no failure:
        // look at the request first.
        biased;
        _ = shutdown.cancelled() => {}
        Some(joined) = tasks.join_next() => {
            let (name, result) = joined.unwrap_or(("unknown", Err(anyhow::anyhow!("service task panicked"))));
            let err = result.err().unwrap_or_else(|| anyhow::anyhow!("stopped unexpectedly"));
            tracing::error!(service = name, error = %err, "service stopped; shutting down");
            failure = Some(err.context(format!("service {name} stopped")));
            shutdown.cancel();
        }
    }

    let drained = tokio::time::timeout(options.grace_period, async {
        while let Some(joined) = tasks.join_next().await {
            if let Ok((name, Err(e))) = joined {
                tracing::error!(service = name, error = %e, "service failed while stopping");
            }
        }
    })
    .await;
    if drained.is_err() {
        tracing::warn!(grace = ?options.grace_period, "grace period over; abandoning in-flight work");
        tasks.abort_all();
    }
    let drains = futures::future::join_all(clients.iter().map(|(_, c)| c.drain()));
    if let Err(e) = tokio::time::timeout(Duration::from_secs(5), drains).await {
        tracing::warn!(error = %e, "NATS drain did not finish");
    }
    admin_stop.cancel();
    let _ = admin_task.await;
    tracing::info!("stopped");
    match failure {
        Some(e) => Err(e),
        None => Ok(()),
    }
}
