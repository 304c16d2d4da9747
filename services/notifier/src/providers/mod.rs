//! The providers: each a type implementing [`Provider`] (send, find an
//! earlier send, which updates it takes), registered by channel (and by
//! name for webhooks) in [`Registry`]. Each builds exactly the request its
//! provider expects and classifies the answer into a [`ProviderRef`] or a
//! [`SendError`] that says whether to retry.

pub mod console;
pub mod email;
pub mod gsm;
pub mod pagerduty;
pub mod slack;
pub mod sms;
pub mod webhook;

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use futures::future::BoxFuture;
use jiff::Timestamp;
use tocsin_proto::{
    incident::{IncidentStatus, IncidentSummary},
    notify::{Channel, MessageKind, Page, ProviderRef},
};

use crate::{
    config::NotifierConfig,
    record::Shown,
    templates::{Context, Templates},
};

/// Why a request did not succeed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SendError {
    /// The provider is down, slow or rate limiting: try again later (after
    /// `retry_after` when it said so). Counts against the provider's
    /// breaker unless `rate_limited`: a 429 holds back only the destination
    /// it was for (its pace), since the provider is up and answering.
    /// `maybe_arrived`: the request left and no answer came (a timeout),
    /// so the next attempt asks the provider first.
    Retry {
        reason: String,
        retry_after: Option<Duration>,
        maybe_arrived: bool,
        rate_limited: bool,
    },
    /// Sending this again cannot succeed (bad token, invalid payload,
    /// unknown target): recorded as failed, never retried.
    Permanent { reason: String },
}

impl SendError {
    pub fn retry(reason: impl Into<String>) -> Self {
        SendError::Retry {
            reason: reason.into(),
            retry_after: None,
            maybe_arrived: false,
            rate_limited: false,
        }
    }
    pub fn permanent(reason: impl Into<String>) -> Self {
        SendError::Permanent {
            reason: reason.into(),
        }
    }
    pub fn reason(&self) -> &str {
        match self {
            SendError::Retry { reason, .. } | SendError::Permanent { reason } => reason,
        }
    }
}

/// What asking a provider "did an earlier request arrive?" found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    /// It arrived: this is the message.
    Found(ProviderRef),
    /// It did not (the provider's records back to the attempt were read).
    NotFound,
    /// The provider cannot be asked for this message (email, incoming
    /// webhooks), or de-duplicates repeats itself (PagerDuty, webhooks).
    NotPossible,
    /// The look-up ran out of its bounds (history too long) or the provider
    /// would not tell (a missing scope): counted, and the message is sent.
    Undecided(String),
    /// The provider could not be reached: ask again later.
    Unreachable(SendError),
}

/// One message to deliver: a page, an update of a message sent before, or
/// a status update in its thread.
#[derive(Debug, Clone)]
pub struct Outgoing {
    /// The delivery id: the page id, or the update's id. Stable across
    /// retries (providers that take an idempotency key get it).
    pub id: String,
    pub kind: MessageKind,
    pub channel: Channel,
    /// The incident as the message shows it.
    pub incident: IncidentSummary,
    /// Phone number, email address, Slack user or channel; empty for
    /// PagerDuty and webhooks.
    pub address: String,
    /// `alice`, `#ops`, a PagerDuty service or webhook name.
    pub target: String,
    /// For updates: the message being updated or answered.
    pub reference: Option<ProviderRef>,
    /// The page this is (for pages).
    pub page: Option<Page>,
    pub ctx: Context,
}

impl Outgoing {
    /// The `Message-ID`-, `webhook-id`-safe form of the id.
    pub fn short_id(&self) -> String {
        use sha2::Digest;
        let d = sha2::Sha256::digest(self.id.as_bytes());
        hex::encode(&d[..16])
    }
}

/// A rendered message.
#[derive(Debug, Clone)]
pub enum Rendered {
    Text(String),
    Email(email::Parts),
}

impl Rendered {
    /// The text (the text part of an email, with its subject).
    pub fn text(&self) -> String {
        match self {
            Rendered::Text(t) => t.clone(),
            Rendered::Email(p) => format!("Subject: {}\n\n{}", p.subject, p.text),
        }
    }
}

/// An outbound provider.
pub trait Provider: Send + Sync {
    /// `slack`, `pagerduty`, `sms`, `email`, `webhook:<name>`, `console`:
    /// the breaker and the metrics are per provider.
    fn name(&self) -> &str;

    /// What the rate limit counts per: the PagerDuty service (its routing
    /// key), the Slack channel or user, the webhook; SMS and email per account.
    /// From what an [`Outgoing`] is made of (its `reference`, `target` and
    /// `address`), so a page learns its lane before its message is made.
    fn destination(&self, reference: Option<&ProviderRef>, target: &str, address: &str) -> String {
        let _ = (reference, target, address);
        String::new()
    }

    /// Renders `out` from the templates of its channel and kind.
    fn render(&self, t: &Templates, out: &Outgoing) -> Result<Rendered, String> {
        render_default(t, out)
    }

    fn send<'a>(
        &'a self,
        out: &'a Outgoing,
        r: &'a Rendered,
    ) -> BoxFuture<'a, Result<ProviderRef, SendError>>;

    /// Whether a request made at `since` (whose answer was lost) arrived.
    fn find_sent<'a>(
        &'a self,
        out: &'a Outgoing,
        r: &'a Rendered,
        since: Timestamp,
    ) -> BoxFuture<'a, Lookup> {
        let _ = (out, r, since);
        Box::pin(async { Lookup::NotPossible })
    }

    /// The update that brings a message (`sent`, showing `shown`) to the
    /// incident's state `now`; None when there is nothing this provider
    /// can or should change.
    fn update(
        &self,
        sent: &ProviderRef,
        shown: &Shown,
        now: &IncidentSummary,
    ) -> Option<MessageKind> {
        let _ = (sent, shown, now);
        None
    }

    /// Whether [`Provider::update`] may ever change `sent`: false for a
    /// message nothing can edit or follow (an SMS, an email, a webhook
    /// without `updates`), which is then never read again after it is sent.
    fn may_update(&self, sent: &ProviderRef) -> bool {
        let _ = sent;
        false
    }

    /// Whether a note is posted as a status update for a message it sent:
    /// by default, where the message follows the incident
    /// ([`Provider::may_update`]).
    fn takes_status_updates(&self, sent: &ProviderRef) -> bool {
        self.may_update(sent)
    }

    /// Per-request timeout (leases are sized from it).
    fn timeout(&self) -> Duration;

    /// Whether the provider drops a repeated request itself (PagerDuty by
    /// `dedup_key`, webhook receivers by `webhook-id`). Then a request
    /// needs no record before it leaves: one whose answer was lost (a
    /// crash, a timeout) is sent again and the repeat dropped, so only the
    /// outcome is recorded (one synced write a page instead of two).
    fn drops_repeats(&self) -> bool {
        false
    }
}

/// The status a message shows once an update of `kind` is applied.
pub fn status_after(kind: MessageKind) -> Option<IncidentStatus> {
    match kind {
        MessageKind::Page | MessageKind::Reminder => Some(IncidentStatus::Triggered),
        MessageKind::Acknowledged => Some(IncidentStatus::Acknowledged),
        MessageKind::Resolved => Some(IncidentStatus::Resolved),
        MessageKind::StatusUpdate => None,
    }
}

/// The update kind that shows status `s`.
pub fn kind_showing(s: IncidentStatus) -> MessageKind {
    match s {
        IncidentStatus::Triggered => MessageKind::Page,
        IncidentStatus::Acknowledged => MessageKind::Acknowledged,
        IncidentStatus::Resolved => MessageKind::Resolved,
    }
}

/// Renders `<channel>/<kind>` (email: `.subject`, `.txt`, `.html`).
pub fn render_default(t: &Templates, out: &Outgoing) -> Result<Rendered, String> {
    let kind = out.kind.as_str();
    let ch = out.channel.as_str();
    let render = |n: String| -> Result<String, String> {
        if !t.has(&n) {
            return Err(format!("{ch} messages have no {kind} template ({n}.hbs)"));
        }
        t.render(&n, &out.ctx)
            .map_err(|e| format!("template {n}.hbs: {e}"))
    };
    Ok(match out.channel {
        Channel::Email => {
            let subject = match (&out.reference, out.kind) {
                // A status update keeps the page's subject, so mail clients
                // thread it with the page.
                (Some(ProviderRef::Email { subject, .. }), MessageKind::StatusUpdate)
                    if !subject.is_empty() =>
                {
                    if subject.starts_with("Re: ") {
                        subject.clone()
                    } else {
                        format!("Re: {subject}")
                    }
                }
                _ => render(format!("email/{kind}.subject"))?,
            };
            Rendered::Email(email::Parts {
                subject,
                text: render(format!("email/{kind}.txt"))?,
                html: render(format!("email/{kind}.html"))?,
            })
        }
        Channel::Pagerduty => match out.kind {
            MessageKind::Page | MessageKind::Reminder => {
                Rendered::Text(render("pagerduty/page".to_string())?)
            }
            _ => Rendered::Text(String::new()),
        },
        _ => Rendered::Text(render(format!("{ch}/{kind}"))?),
    })
}

/// The configured providers.
pub struct Registry {
    by_channel: BTreeMap<Channel, Arc<dyn Provider>>,
    webhooks: BTreeMap<String, Arc<dyn Provider>>,
    /// Takes what no configured provider takes (dev set-ups).
    console: Option<Arc<dyn Provider>>,
    pub slack_mode: Option<crate::config::SlackMode>,
    pub sms_from: Option<String>,
}

/// What [`Registry::get`] found.
pub enum Found<'a> {
    Provider(&'a Arc<dyn Provider>),
    /// Nothing takes it; the reason names the config key to set.
    Missing(String),
}

impl Registry {
    /// Builds every configured provider; every problem is listed.
    pub fn build(cfg: &NotifierConfig) -> Result<Registry, Vec<String>> {
        let mut errors = Vec::new();
        let mut by_channel: BTreeMap<Channel, Arc<dyn Provider>> = BTreeMap::new();
        let mut slack_mode = None;
        let mut sms_from = None;
        if let Some(c) = &cfg.slack {
            match slack::Slack::new(c) {
                Ok(p) => {
                    slack_mode = Some(p.mode());
                    by_channel.insert(Channel::Slack, Arc::new(p));
                }
                Err(e) => errors.push(e),
            }
        }
        if let Some(c) = &cfg.pagerduty {
            match pagerduty::Pagerduty::new(c) {
                Ok(p) => {
                    by_channel.insert(Channel::Pagerduty, Arc::new(p));
                }
                Err(e) => errors.push(e),
            }
        }
        if let Some(c) = &cfg.sms {
            match sms::Sms::new(c) {
                Ok(p) => {
                    sms_from = p.from().map(str::to_string);
                    by_channel.insert(Channel::Sms, Arc::new(p));
                }
                Err(e) => errors.push(e),
            }
        }
        if let Some(c) = &cfg.email {
            match email::Email::new(c) {
                Ok(p) => {
                    by_channel.insert(Channel::Email, Arc::new(p));
                }
                Err(e) => errors.push(e),
            }
        }
        let mut webhooks: BTreeMap<String, Arc<dyn Provider>> = BTreeMap::new();
        for w in &cfg.webhooks {
            if webhooks.contains_key(&w.name) {
                errors.push(format!("webhook {:?} is defined twice", w.name));
                continue;
            }
            match webhook::Webhook::new(w) {
                Ok(h) => {
                    webhooks.insert(w.name.clone(), Arc::new(h));
                }
                Err(e) => errors.push(e),
            }
        }
        let console = match &cfg.console {
            Some(c) => match console::Console::new(c) {
                Ok(p) => Some(Arc::new(p) as Arc<dyn Provider>),
                Err(e) => {
                    errors.push(e);
                    None
                }
            },
            None => None,
        };
        if errors.is_empty() {
            Ok(Registry {
                by_channel,
                webhooks,
                console,
                slack_mode,
                sms_from,
            })
        } else {
            Err(errors)
        }
    }

    /// The provider for a message on `channel` to `target`.
    pub fn get(&self, channel: Channel, target: &str) -> Found<'_> {
        let found = match channel {
            Channel::Webhook => self.webhooks.get(target),
            c => self.by_channel.get(&c),
        };
        match (found, &self.console) {
            (Some(p), _) => Found::Provider(p),
            (None, Some(c)) if channel != Channel::Webhook => Found::Provider(c),
            (None, _) => Found::Missing(match channel {
                Channel::Webhook => format!(
                    "no webhook {target:?} in notifier.webhooks (defined: {})",
                    if self.webhooks.is_empty() {
                        "none".to_string()
                    } else {
                        self.webhooks.keys().cloned().collect::<Vec<_>>().join(", ")
                    }
                ),
                c => format!("{} is not configured (notifier.{})", c.as_str(), c.as_str()),
            }),
        }
    }

    /// Every provider (for metrics and checks).
    pub fn all(&self) -> impl Iterator<Item = &Arc<dyn Provider>> {
        self.by_channel
            .values()
            .chain(self.webhooks.values())
            .chain(self.console.iter())
    }

    /// Channels that nothing takes but the console (for warnings).
    pub fn console_takes(&self) -> Vec<Channel> {
        if self.console.is_none() {
            return Vec::new();
        }
        [
            Channel::Slack,
            Channel::Pagerduty,
            Channel::Sms,
            Channel::Email,
        ]
        .into_iter()
        .filter(|c| !self.by_channel.contains_key(c))
        .collect()
    }

    pub fn has_webhook(&self, name: &str) -> bool {
        self.webhooks.contains_key(name)
    }

    pub fn has_channel(&self, c: Channel) -> bool {
        self.by_channel.contains_key(&c) || (self.console.is_some() && c != Channel::Webhook)
    }
}

/// Classifies an HTTP status the way the providers document it: 429 and
/// 5xx (and 408) are worth retrying, other 4xx are not.
pub fn classify_http(status: u16, retry_after: Option<Duration>, reason: String) -> SendError {
    match status {
        408 | 429 | 500..=599 => SendError::Retry {
            reason,
            retry_after,
            maybe_arrived: false,
            rate_limited: status == 429,
        },
        _ => SendError::Permanent { reason },
    }
}

/// `Retry-After` in seconds (the HTTP-date form is read as "soon").
pub fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    let v = headers.get(reqwest::header::RETRY_AFTER)?.to_str().ok()?;
    match v.trim().parse::<f64>() {
        Ok(s) if (0.0..86_400.0).contains(&s) => Some(Duration::from_secs_f64(s)),
        _ => Some(Duration::from_secs(5)),
    }
}

/// A transport error (no answer): always retryable. A timeout (or a
/// connection lost after the request was written) may have delivered it.
pub fn transport_error(e: &reqwest::Error) -> SendError {
    let (what, maybe) = if e.is_timeout() {
        ("timed out", true)
    } else if e.is_connect() {
        ("cannot connect", false)
    } else {
        ("request failed", true)
    };
    // reqwest errors name the URL, which can hold a secret (webhook URLs).
    SendError::Retry {
        reason: format!("{what}: {}", without_url(e)),
        retry_after: None,
        maybe_arrived: maybe,
        rate_limited: false,
    }
}

fn without_url(e: &reqwest::Error) -> String {
    let mut s = e.to_string();
    if let Some(url) = e.url() {
        s = s.replace(url.as_str(), "<url>");
    }
    s
}

/// Sends a request and reads the answer: status, `Retry-After` and body.
/// No answer at all is a retryable error.
pub async fn exchange(
    req: reqwest::RequestBuilder,
) -> Result<(u16, Option<Duration>, String), SendError> {
    let resp = req.send().await.map_err(|e| transport_error(&e))?;
    let status = resp.status().as_u16();
    let after = retry_after(resp.headers());
    Ok((status, after, body_text(resp).await))
}

/// Reads a response body, at most 8 MiB of it (a Twilio list page of
/// 1,000 messages is about 1 MiB; a cut body fails to parse, and a look-up
/// then says it cannot decide).
pub async fn body_text(mut resp: reqwest::Response) -> String {
    const MAX: usize = 8 << 20;
    let mut out = Vec::new();
    while let Ok(Some(chunk)) = resp.chunk().await {
        out.extend_from_slice(&chunk[..chunk.len().min(MAX - out.len())]);
        if out.len() >= MAX {
            break;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// One HTTP client per provider, with its timeout.
pub fn http_client(timeout: Duration) -> reqwest::Client {
    tocsin_runtime::install_crypto();
    reqwest::Client::builder()
        .timeout(if timeout.is_zero() {
            Duration::from_secs(10)
        } else {
            timeout
        })
        .connect_timeout(Duration::from_secs(5))
        .user_agent(concat!("Tocsin/", env!("CARGO_PKG_VERSION")))
        .build()
        .unwrap_or_default()
}

/// Seconds since the epoch as a Slack `ts`-like string, for `oldest`.
pub fn epoch_string(t: Timestamp) -> String {
    format!("{}.{:06}", t.as_second(), t.subsec_microsecond().max(0))
}

#[cfg(test)]
mod tests {
    use tocsin_proto::{
        incident::IncidentSummary,
        notify::{Page, PageTarget},
    };

    use super::*;

    /// Escalation puts a burst's pages together by [`Page::lane`]; that is
    /// only worth it while it is the destination the provider paces a page
    /// by (`Provider::destination`, for a page not yet sent).
    #[test]
    fn a_pages_lane_is_the_destination_its_provider_paces_it_by() {
        let cfg: NotifierConfig = serde_yaml_ng::from_str(
            r#"
slack: {api_url: "http://127.0.0.1:1/api", token: xoxb-test-token}
pagerduty:
  url: "http://127.0.0.1:1/v2/enqueue"
  services: {payments: {routing_key: 0123456789abcdef0123456789abcdef}}
sms: {api_url: "http://127.0.0.1:1", account_sid: AC00000000000000000000000000000000, auth_token: twilio-auth-token, from: "+15005550006"}
email: {host: 127.0.0.1, port: 2525, tls: none, from: "Tocsin <tocsin@example.com>"}
webhooks:
  - {name: teams, url: "http://127.0.0.1:1/hook", secret: "whsec_dG9jc2luLXdlYmhvb2stdGVzdC1rZXk="}
"#,
        )
        .expect("config");
        let registry = Registry::build(&cfg).expect("providers");
        let user = |name: &str| PageTarget::User {
            name: name.into(),
            schedule: None,
        };
        let pages = [
            (Channel::Slack, user("alice"), "U0ALICE"),
            (
                Channel::Slack,
                PageTarget::SlackChannel {
                    channel: "#incidents".into(),
                },
                "C0INCIDENTS",
            ),
            (Channel::Sms, user("alice"), "+15550001"),
            (Channel::Email, user("bob"), "bob@example.com"),
            (
                Channel::Pagerduty,
                PageTarget::PagerdutyService {
                    service: "payments".into(),
                },
                "",
            ),
            (
                Channel::Webhook,
                PageTarget::Webhook {
                    name: "teams".into(),
                },
                "",
            ),
        ];
        for (channel, target, address) in pages {
            let page = Page {
                id: "p".into(),
                incident: IncidentSummary::new(
                    uuid::Uuid::nil(),
                    1,
                    "k",
                    "t",
                    Timestamp::UNIX_EPOCH,
                ),
                level: 0,
                repeat: 0,
                target: target.clone(),
                channel,
                address: address.into(),
                reason: String::new(),
                due_at: Timestamp::UNIX_EPOCH,
                kind: Default::default(),
            };
            let name = crate::deliver::target_name(&target);
            let Found::Provider(p) = registry.get(channel, &name) else {
                panic!("no provider for {channel:?}");
            };
            assert_eq!(
                p.destination(None, &name, address),
                page.lane(),
                "{channel:?} to {target:?}"
            );
        }
    }
}
