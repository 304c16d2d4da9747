//! Fake notification providers: Slack (Web API and incoming webhooks),
//! PagerDuty Events API v2, Twilio Messages and Standard Webhooks receivers,
//! all served by one local axum server on a random port.
//!
//! The fakes check requests the way the real services do (as
//! their public API references document them) and answer with the real
//! response shapes, including the real error shapes. Unknown fields are
//! ignored. Every accepted request is recorded; every request answered with
//! an error (by validation or by [`FakeProviders::fail_next`]) is recorded in
//! [`FakeProviders::rejected`].
//!
//! # Layout
//! One module per provider, each holding its handlers, its checks, what it
//! records and the [`FakeProviders`] methods that read it: `slack` (Web API
//! and incoming webhooks), `pagerduty`, `twilio`, `webhook`. `server` holds
//! what they share: the routes, the recorded state behind one lock, and the
//! request pipeline (count, injected failure, provider handler, record);
//! `form` the form encoding.

use std::{
    sync::{Arc, MutexGuard},
    time::{Duration, Instant},
};

mod form;
mod pagerduty;
mod server;
mod slack;
mod twilio;
mod webhook;

pub use form::{form_decode, form_encode};
pub use pagerduty::PdAlert;
pub use slack::{SlackPost, SlackUpdate};
pub use twilio::Sms;
pub use webhook::{webhook_signature, WebhookCall};

use server::{Records, Shared};

/// Which fake a request was addressed to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Provider {
    /// Slack Web API (`/slack/api/...`).
    Slack,
    /// Slack incoming webhook (`/slack/services/...`).
    SlackWebhook,
    /// PagerDuty Events API v2 (`/pagerduty/v2/enqueue`).
    PagerDuty,
    /// Twilio Messages (`/twilio/2010-04-01/Accounts/{sid}/Messages.json`).
    Twilio,
    /// Generic Standard Webhooks receiver (`/hooks/{name}`).
    Webhook,
}

/// An injected answer that replaces normal handling (see [`FakeProviders::fail_next`]).
#[derive(Clone, Debug)]
pub enum Failure {
    /// Answer with this HTTP status and a provider-shaped error body.
    Status(u16),
    /// Answer 429 with a `Retry-After` header and a provider-shaped body.
    RateLimited {
        /// Value of the `Retry-After` header, in seconds.
        retry_after_secs: u64,
    },
    /// Sleep this long, then answer as the provider would, but record nothing.
    Hang(Duration),
}

/// A request answered with an error, injected or by validation.
#[derive(Clone, Debug)]
pub struct Rejected {
    /// The fake it was addressed to.
    pub provider: Provider,
    /// HTTP status answered (200 for Slack Web API `ok:false` answers).
    pub status: u16,
    /// Body answered.
    pub body: String,
    /// When it was answered.
    pub at: Instant,
}

/// The fake providers' server; stopped when dropped.
pub struct FakeProviders {
    addr: std::net::SocketAddr,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl FakeProviders {
    /// Bot token the Slack fake accepts.
    pub const SLACK_TOKEN: &'static str = "xoxb-test-token";
    /// The only routing key the PagerDuty fake accepts (32 chars).
    pub const PD_ROUTING_KEY: &'static str = "0123456789abcdef0123456789abcdef";
    /// Twilio account sid the fake accepts.
    pub const TWILIO_SID: &'static str = "AC00000000000000000000000000000000";
    /// Twilio auth token the fake accepts.
    pub const TWILIO_TOKEN: &'static str = "twilio-auth-token";
    /// A sender number to configure as `From`.
    pub const TWILIO_FROM: &'static str = "+15005550006";
    /// Standard Webhooks secret: `whsec_` + base64 of `b"tocsin-webhook-test-key"`.
    pub const WEBHOOK_SECRET: &'static str = "whsec_dG9jc2luLXdlYmhvb2stdGVzdC1rZXk=";

    /// Starts the server on `127.0.0.1:0`.
    pub async fn start() -> FakeProviders {
        let shared = Arc::new(Shared::new());
        let app = server::router(shared.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind fake providers");
        let addr = listener.local_addr().expect("local addr");
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        FakeProviders { addr, shared, task }
    }

    /// `http://127.0.0.1:PORT`.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The next `n` requests to `provider` (in arrival order, before validation) get `failure`.
    pub fn fail_next(&self, provider: Provider, n: usize, failure: Failure) {
        let mut rec = self.lock();
        let queue = rec.failures.entry(provider).or_default();
        queue.extend(std::iter::repeat_n(failure, n));
    }

    /// Every request that reached `provider`, including failed, injected and repeated ones.
    pub fn requests(&self, provider: Provider) -> usize {
        self.lock().requests.get(&provider).copied().unwrap_or(0)
    }

    /// Requests answered with an error, in answer order.
    pub fn rejected(&self) -> Vec<Rejected> {
        self.lock().rejected.clone()
    }

    /// Polls `what` every 20 ms until it holds (true) or `timeout` passes (false).
    pub async fn wait_for(&self, what: impl Fn(&FakeProviders) -> bool, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if what(self) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn lock(&self) -> MutexGuard<'_, Records> {
        self.shared.lock()
    }
}

impl Drop for FakeProviders {
    fn drop(&mut self) {
        self.task.abort();
    }
}
