//! Fake notification providers: Slack (Web API and incoming webhooks),
//! PagerDuty Events API v2, Twilio Messages and Standard Webhooks receivers,
//! all served by one local axum server on a random port.
//!
//! The fakes check requests the way the real services do (as
//! their public API references document them) and answer with the real
//! response shapes, including the real error shapes. Unknown fields are
//! ignored. Every accepted request is recorded; every request answered with
//! an error (by validation, by a rate limit or by
//! [`FakeProviders::fail_next`]) is recorded in [`FakeProviders::rejected`].
//! Lists page as the real ones do: Slack `conversations.history` by
//! cursor, Twilio's message list by `next_page_uri`.
//!
//! Every request is also noted in a timeline ([`FakeProviders::timeline`]):
//! its operation, its destination, when it arrived and how it was
//! answered, so that a test can count requests per page
//! ([`FakeProviders::counts`]) and measure latency per destination.
//!
//! Rate limits are off until a test sets one
//! ([`FakeProviders::set_rate_limit`]); then a provider refuses what is
//! over it as the real one does (Slack 429 with `Retry-After`, Twilio 429
//! with error 20429, PagerDuty 429).
//!
//! # Layout
//! One module per provider, each holding its handlers, its checks, what it
//! records and the [`FakeProviders`] methods that read it: `slack` (Web API
//! and incoming webhooks), `pagerduty`, `twilio`, `webhook`. `server` holds
//! what they share: the routes, the recorded state behind one lock, and the
//! request pipeline (count and note, injected failure, provider handler
//! with its rate limit, record); `ratelimit` the limits; `form` the form
//! encoding.

use std::{
    sync::{Arc, MutexGuard},
    time::{Duration, Instant},
};

mod form;
mod pagerduty;
mod ratelimit;
mod server;
mod slack;
mod twilio;
mod webhook;

pub use form::{form_decode, form_encode};
pub use pagerduty::PdAlert;
pub use ratelimit::{RateLimit, RateLimitKey, WindowLimit};
pub use slack::{SlackPost, SlackResponse, SlackUpdate};
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
    /// Slack interaction `response_url`s (`/slack/actions/...`).
    SlackResponse,
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
    /// Sleep this long, then answer (and record) as the provider would: a
    /// slow provider.
    Slow(Duration),
}

/// The operation that sends a message at `provider` (what its rate limit
/// applies to).
fn sending_operation(provider: Provider) -> &'static str {
    match provider {
        Provider::Slack => "chat.postMessage",
        _ => "POST",
    }
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

/// One request as a fake saw it (see [`FakeProviders::timeline`]).
#[derive(Clone, Debug)]
pub struct RequestRecord {
    /// The fake it was addressed to.
    pub provider: Provider,
    /// For Slack's Web API the method (`chat.postMessage`), for the other
    /// fakes the HTTP method (`POST`; Twilio's message list is `GET`).
    pub operation: String,
    /// Where it goes: the Slack `channel` (a user id as its DM `D…`; the
    /// `users` of `conversations.open`), the Slack incoming webhook's
    /// `T…/B…/…` path, the PagerDuty `routing_key`, the Twilio `To`, the
    /// webhook receiver's name; `""` if the request names none.
    pub destination: String,
    /// How it was answered.
    pub outcome: Outcome,
    /// HTTP status answered (Slack answers its errors with 200; 0 for a
    /// hung request, whose answer is not recorded).
    pub status: u16,
    /// When it reached the fake, before it waited for anything.
    pub received_at: Instant,
}

/// How a request was answered.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// Accepted: it took effect (or was a read or a repeat the provider
    /// answers as success).
    Accepted,
    /// Refused by the provider's own checks (4xx, or Slack's `ok:false`).
    Invalid,
    /// Refused by a rate limit set with [`FakeProviders::set_rate_limit`].
    RateLimited,
    /// Answered by an injected [`Failure::Status`] or [`Failure::RateLimited`].
    Injected,
    /// Held by an injected [`Failure::Hang`]; nothing recorded.
    Hung,
}

/// Requests to a provider by outcome (see [`FakeProviders::counts`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RequestCounts {
    /// [`Outcome::Accepted`].
    pub accepted: usize,
    /// [`Outcome::Invalid`].
    pub invalid: usize,
    /// [`Outcome::RateLimited`].
    pub rate_limited: usize,
    /// [`Outcome::Injected`].
    pub injected: usize,
    /// [`Outcome::Hung`].
    pub hung: usize,
}

impl RequestCounts {
    /// Every request: what [`FakeProviders::requests`] counts.
    pub fn total(&self) -> usize {
        self.accepted + self.invalid + self.rate_limited + self.injected + self.hung
    }

    /// Requests answered with an error: what [`FakeProviders::rejected`] holds.
    pub fn rejected(&self) -> usize {
        self.invalid + self.rate_limited + self.injected
    }

    fn of<'a>(records: impl Iterator<Item = &'a RequestRecord>) -> RequestCounts {
        let mut c = RequestCounts::default();
        for r in records {
            *match r.outcome {
                Outcome::Accepted => &mut c.accepted,
                Outcome::Invalid => &mut c.invalid,
                Outcome::RateLimited => &mut c.rate_limited,
                Outcome::Injected => &mut c.injected,
                Outcome::Hung => &mut c.hung,
            } += 1;
        }
        c
    }
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
    /// Requests to `provider` that have arrived, including those still
    /// waiting on an injected [`Failure::Slow`].
    pub fn started(&self, provider: Provider) -> usize {
        self.shared
            .started
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&provider)
            .copied()
            .unwrap_or(0)
    }

    pub fn requests(&self, provider: Provider) -> usize {
        self.lock().requests.get(&provider).copied().unwrap_or(0)
    }

    /// Requests answered with an error, in answer order.
    pub fn rejected(&self) -> Vec<Rejected> {
        self.lock().rejected.clone()
    }

    /// Every request to `provider`, in arrival order.
    pub fn timeline(&self, provider: Provider) -> Vec<RequestRecord> {
        self.lock()
            .timeline
            .iter()
            .filter(|r| r.provider == provider)
            .cloned()
            .collect()
    }

    /// Requests to `provider` by outcome.
    pub fn counts(&self, provider: Provider) -> RequestCounts {
        let rec = self.lock();
        RequestCounts::of(rec.timeline.iter().filter(|r| r.provider == provider))
    }

    /// Requests to `provider` for one operation (see
    /// [`RequestRecord::operation`]) by outcome.
    pub fn operation_counts(&self, provider: Provider, operation: &str) -> RequestCounts {
        let rec = self.lock();
        RequestCounts::of(
            rec.timeline
                .iter()
                .filter(|r| r.provider == provider && r.operation == operation),
        )
    }

    /// Limits what `provider` accepts for its sending operation: Slack
    /// `chat.postMessage`, Twilio message creation, PagerDuty events,
    /// webhook and Slack incoming-webhook posts. Requests over the limit
    /// are answered as the provider answers them (see [`RateLimit`] and
    /// each provider's handler) and recorded as [`Outcome::RateLimited`].
    /// Replaces a limit set before; limits are off until set.
    pub fn set_rate_limit(&self, provider: Provider, limit: RateLimit) {
        self.set_operation_rate_limit(provider, sending_operation(provider), limit);
    }

    /// Limits one operation of `provider` (see [`RequestRecord::operation`]),
    /// e.g. Slack `chat.update` or Twilio `GET` (listing).
    pub fn set_operation_rate_limit(&self, provider: Provider, operation: &str, limit: RateLimit) {
        let limiter = Arc::new(ratelimit::Limiter::new(limit));
        self.lock()
            .limits
            .insert((provider, operation.to_string()), limiter);
    }

    /// Limits what `provider` accepts for its sending operation (as
    /// [`FakeProviders::set_rate_limit`]) by a count over a sliding window:
    /// PagerDuty's "approximately 120 calls/minute per integration key".
    pub fn set_window_limit(&self, provider: Provider, limit: WindowLimit) {
        self.lock().limits.insert(
            (provider, sending_operation(provider).to_string()),
            Arc::new(ratelimit::Limiter::window(limit)),
        );
    }

    /// Removes every rate limit.
    pub fn clear_rate_limits(&self) {
        self.lock().limits.clear();
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
