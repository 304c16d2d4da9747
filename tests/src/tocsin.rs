//! Tocsin's services in-process, started the way `tocsin up` starts them.

use std::time::Duration;

use tocsin::{
    app::{self, Listeners, Options},
    config::{Config, Service},
};
use tocsin_incidents::clock::ManualClock;
use tocsin_ingest::IngestConfig;
use tocsin_runtime::{
    nats::{Credential, NatsConfig},
    progress::Progress,
    streams::JetStreamConfig,
    CancellationToken,
};
use tokio::{net::TcpListener, task::JoinHandle};

use crate::{NatsServer, TEST_TOKEN};

/// Every Tocsin service, by the name `tocsin <service>` runs it under and
/// its NATS user's name.
pub const SERVICES: [&str; 6] = [
    "ingest",
    "incidents",
    "escalation",
    "notifier",
    "chatops",
    "remediation",
];

/// Running services plus what a test needs to talk to them.
pub struct TocsinHarness {
    pub ingest_url: String,
    pub admin_url: String,
    /// The escalation service's calendar server.
    pub calendar_url: String,
    /// The chat-ops service (Slack, Twilio, `/api/v1`, `/status.json`);
    /// it runs when the config has a `chatops:` section.
    pub chatops_url: String,
    pub token: String,
    /// The clock the services' timers run on; tests move it (and then
    /// [`TocsinHarness::settle`]).
    pub clock: ManualClock,
    /// The services' watermarks.
    pub progress: Progress,
    pub shutdown: CancellationToken,
    /// Holds the services' data (sled) while they run.
    _data: Option<tempfile::TempDir>,
    task: Option<JoinHandle<anyhow::Result<()>>>,
}

impl TocsinHarness {
    /// A config for `nats` with one ingest token ([`TEST_TOKEN`], source `test`)
    /// and a short publish timeout, so outage tests answer quickly. Every
    /// service (and the operator) connects with its own NATS user
    /// (`nats.credentials.<service>`), so each runs with the shipped
    /// permissions; there are no shared credentials to fall back on.
    pub fn config(nats: &NatsServer) -> Config {
        let mut ingest = IngestConfig::with_token("test", TEST_TOKEN);
        ingest.publish_timeout = tocsin_runtime::config::HumanDuration(Duration::from_secs(2));
        ingest.retry_after = tocsin_runtime::config::HumanDuration(Duration::from_secs(1));
        let mut nats_cfg = NatsConfig::for_url(nats.address());
        // The services it runs and the operator CLI.
        for identity in SERVICES.into_iter().chain(["operator"]) {
            nats_cfg
                .credentials
                .insert(identity, Credential::Read(nats.auth(identity)));
        }
        nats_cfg.reconnect_max_delay =
            tocsin_runtime::config::HumanDuration(Duration::from_millis(250));
        Config {
            nats: nats_cfg,
            jetstream: JetStreamConfig::default(),
            ingest: Some(ingest),
            incidents: Default::default(),
            escalation: Default::default(),
            notifier: None,
            ..Default::default()
        }
    }

    /// Starts every service against `nats` and waits until `/readyz` is ready.
    pub async fn start(nats: &NatsServer) -> Self {
        Self::start_with(Self::config(nats)).await
    }

    /// Starts every service with `config` and waits until ready. The
    /// incidents data goes to a temp dir unless `config` names one; timers
    /// run on a [`ManualClock`] starting now.
    pub async fn start_with(mut config: Config) -> Self {
        crate::init_logs();
        let dir = tempfile::tempdir().expect("temp dir");
        if config.incidents.data_dir.is_none() {
            config.incidents.data_dir = Some(tocsin_runtime::config::ConfigPath(
                dir.path().join("incidents"),
            ));
        }
        if config.escalation.data_dir.is_none() {
            config.escalation.data_dir = Some(tocsin_runtime::config::ConfigPath(
                dir.path().join("escalation"),
            ));
        }
        let data = Some(dir);
        let clock = ManualClock::new(jiff::Timestamp::now());
        let admin = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let ingest = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let admin_url = format!("http://{}", admin.local_addr().unwrap());
        let ingest_url = format!("http://{}", ingest.local_addr().unwrap());
        let calendar = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let calendar_url = format!("http://{}", calendar.local_addr().unwrap());
        let chatops = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let chatops_url = format!("http://{}", chatops.local_addr().unwrap());
        let shutdown = CancellationToken::new();
        let progress = Progress::new();
        let options = Options {
            admin_listen: admin.local_addr().unwrap(),
            grace_period: Duration::from_secs(10),
            clock: std::sync::Arc::new(clock.clone()),
            progress: progress.clone(),
        };
        let listeners = Listeners {
            admin,
            ingest: Some(ingest),
            calendar: Some(calendar),
            chatops: Some(chatops),
        };
        let task = tokio::spawn(app::run(
            config,
            &Service::ALL,
            options,
            listeners,
            shutdown.clone(),
        ));
        let h = TocsinHarness {
            ingest_url,
            admin_url,
            calendar_url,
            chatops_url,
            token: TEST_TOKEN.to_string(),
            clock,
            progress,
            shutdown,
            _data: data,
            task: Some(task),
        };
        h.wait_ready(Duration::from_secs(20)).await;
        h
    }

    /// The services' clock now.
    pub fn clock_now(&self) -> jiff::Timestamp {
        use tocsin_incidents::clock::Clock;
        self.clock.now()
    }

    /// Moves the clock to `t`, then waits until the engine has settled
    /// there (see [`TocsinHarness::settled`]).
    pub async fn settle(&self, js: &async_nats::jetstream::Context, t: jiff::Timestamp) {
        self.clock.set(t);
        self.settled(js).await;
    }

    /// Waits until the engine has done everything that is due: incidents
    /// has handled every alert and command on the bus and fired every timer
    /// due by now, escalation has applied every INCIDENTS entry and fired
    /// every step due by now, and every notifier consumer has settled every
    /// page (none pending, none unacknowledged); repeated until a round adds
    /// nothing to any stream. Each service reports its watermark only once
    /// the effects are acknowledged by JetStream, so after this returns,
    /// what has not happened will not happen until the clock moves or new
    /// input arrives: tests assert absence after it, never after a sleep.
    pub async fn settled(&self, js: &async_nats::jetstream::Context) {
        use tocsin_incidents::clock::Clock;
        use tocsin_proto::subjects::{
            STREAM_ALERTS, STREAM_COMMANDS, STREAM_INCIDENTS, STREAM_NOTIFY,
        };
        // A bound on a hang, not a timing: a slow machine running tests
        // side by side took more than 30 s for a storm of 1,500 alerts.
        const LIMIT: Duration = Duration::from_secs(120);
        let last = |stream: &'static str| async move {
            tocsin_runtime::streams::last_sequence(js, stream)
                .await
                .unwrap_or(0)
        };
        let mut round = 0;
        loop {
            round += 1;
            assert!(round < 50, "the engine never settled: streams keep growing");
            let now = self.clock.now();
            let before = [
                last(STREAM_ALERTS).await,
                last(STREAM_COMMANDS).await,
                last(STREAM_INCIDENTS).await,
                last(STREAM_NOTIFY).await,
            ];
            let (alerts, commands) = (before[0], before[1]);
            self.progress
                .wait_until("incidents", LIMIT, |m| {
                    m.read(STREAM_ALERTS) >= alerts
                        && m.read(STREAM_COMMANDS) >= commands
                        && m.timers_reached(now)
                })
                .await
                .unwrap_or_else(|m| panic!("incidents did not settle at {now} (alerts {alerts}, commands {commands}): {m:?}"));
            let incidents = last(STREAM_INCIDENTS).await;
            self.progress
                .wait_until("escalation", LIMIT, |m| {
                    m.read(STREAM_INCIDENTS) >= incidents && m.timers_reached(now)
                })
                .await
                .unwrap_or_else(|m| {
                    panic!("escalation did not settle at {now} (INCIDENTS {incidents}): {m:?}")
                });
            crate::notifier::settled(js, LIMIT).await;
            let after = [
                last(STREAM_ALERTS).await,
                last(STREAM_COMMANDS).await,
                last(STREAM_INCIDENTS).await,
                last(STREAM_NOTIFY).await,
            ];
            if after == before {
                return;
            }
        }
    }

    /// The `/metrics` text.
    pub async fn metrics(&self) -> String {
        reqwest::get(format!("{}/metrics", self.admin_url))
            .await
            .expect("metrics answered")
            .text()
            .await
            .expect("metrics text")
    }

    /// Polls `/readyz` until 200.
    pub async fn wait_ready(&self, within: Duration) {
        let client = reqwest::Client::new();
        let url = format!("{}/readyz", self.admin_url);
        let (client, url) = (&client, &url);
        let ready = crate::eventually_within(within, || async move {
            match client.get(url).send().await {
                Ok(r) if r.status().is_success() => Ok(()),
                Ok(r) => Err(r.text().await.unwrap_or_default()),
                Err(e) => Err(e.to_string()),
            }
        })
        .await;
        if let Err(last) = ready {
            panic!("tocsin not ready within {within:?}: {last}");
        }
    }

    /// Cancels and waits for the services to return.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        match self.task.take() {
            Some(t) => t.await.expect("app task panicked"),
            None => Ok(()),
        }
    }
}

impl Drop for TocsinHarness {
    fn drop(&mut self) {
        self.shutdown.cancel();
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}
