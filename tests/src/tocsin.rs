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
    streams::JetStreamConfig,
    CancellationToken,
};
use tokio::{net::TcpListener, task::JoinHandle};

use crate::{NatsServer, TEST_TOKEN};

/// The NATS identities the harness gives credentials: the services it runs
/// and the operator CLI.
pub const SERVICE_IDENTITIES: [&str; 7] = [
    "ingest",
    "incidents",
    "escalation",
    "notifier",
    "chatops",
    "remediation",
    "operator",
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
    /// The clock the services' timers run on; tests move it.
    pub clock: ManualClock,
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
        for identity in SERVICE_IDENTITIES {
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
        let options = Options {
            admin_listen: admin.local_addr().unwrap(),
            grace_period: Duration::from_secs(10),
            clock: std::sync::Arc::new(clock.clone()),
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
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if let Ok(r) = client
                .get(format!("{}/readyz", self.admin_url))
                .send()
                .await
            {
                if r.status().is_success() {
                    return;
                }
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "tocsin not ready within {within:?}"
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
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
