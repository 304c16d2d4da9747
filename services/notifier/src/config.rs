//! `notifier:` section: providers, templates, retries, breakers, rate limits.

use std::collections::BTreeMap;

use serde::Deserialize;
use tocsin_runtime::config::{
    one_secret, ConfigPath, EnvString, HumanDuration, Secret, SecretFile,
};

/// Configuration of the notifier. Every channel is optional; a page for a
/// channel that is not configured fails at once and lands on the timeline.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NotifierConfig {
    /// No longer used: delivery records live in the JetStream KV bucket
    /// `tocsin_deliveries`, shared by every replica. Accepted (and ignored,
    /// with a warning) so older configs still load.
    pub data_dir: Option<ConfigPath>,
    /// Folder of template overrides (`<channel>/<kind>.hbs`, see
    /// config/templates/). Files not there use the shipped defaults.
    pub templates: Option<ConfigPath>,
    /// Link to an incident, as a template: `https://tocsin.example.com/incidents/{{number}}`.
    /// Shown in every message (`{{incident.url}}`). Default: none.
    pub incident_url: Option<String>,
    /// The status page (`{{tocsin.status_page}}` in status updates). Default: none.
    pub status_page_url: Option<String>,
    /// The SMS number people reply to (`ACK 42`), shown in SMS pages. Default:
    /// the Twilio `from` number.
    pub sms_reply_to: Option<String>,
    /// Messages held at once (waiting for their destination's rate limit
    /// or in a request), across replicas: the shared consumer's
    /// `max_ack_pending` is four times this. A message holds one page, or
    /// up to 64 of an escalation burst for one channel; a replica decodes
    /// and works on at most four times this many pages of a channel at
    /// once (the rest of its messages wait undecoded, as they came).
    /// Default 256.
    pub concurrency: Option<usize>,
    /// Redelivery of a page whose handler died. A page that waits (for a
    /// rate limit, or in a slow request) is kept alive with in-progress
    /// acknowledgements meanwhile. Default 30s.
    pub ack_wait: Option<HumanDuration>,
    /// The longest a page is held waiting for its destination's rate limit;
    /// a longer wait hands it back to the bus (redelivered when its turn
    /// comes), so a backlog on one destination never fills the consumer.
    /// Default 20s.
    pub max_hold: Option<HumanDuration>,
    /// How long booking a turn with the other replicas (in the shared KV
    /// bucket) may take, a failed try asked again every 50ms within it;
    /// longer, each replica books alone, at its share of
    /// the destination's rate, and tries the bucket again 2s later, so
    /// pages are not held up by a slow NATS. Raise it for a cluster whose
    /// KV writes are slower (R3 over a slow network). 10ms to 10s; default
    /// 500ms.
    pub shared_booking_timeout: Option<HumanDuration>,
    /// How long delivery records are kept (the KV bucket's max age). Keep
    /// it above the NOTIFY stream's `work_max_age` (pages older than that
    /// are gone anyway). Default 14d.
    pub records_kept_for: Option<HumanDuration>,
    /// IANA time zone of the times in messages (`Started: 14:30 CET`).
    /// Default UTC.
    pub timezone: Option<String>,
    /// Writes messages to the log and a file instead of a provider that
    /// is not configured (see [`ConsoleConfig`]). Default: off.
    pub console: Option<ConsoleConfig>,
    /// Retry policy shared by the channels (each may override it).
    pub retry: RetryConfig,
    pub slack: Option<SlackConfig>,
    pub pagerduty: Option<PagerdutyConfig>,
    pub sms: Option<SmsConfig>,
    pub email: Option<EmailConfig>,
    pub webhooks: Vec<WebhookConfig>,
}

impl NotifierConfig {
    pub fn concurrency(&self) -> usize {
        self.concurrency.unwrap_or(256).clamp(1, 8192)
    }
    pub fn max_hold(&self) -> std::time::Duration {
        self.max_hold
            .map(|d| d.get())
            .unwrap_or(std::time::Duration::from_secs(20))
    }
    /// See [`NotifierConfig::shared_booking_timeout`] (checked by
    /// [`crate::check`]).
    pub fn shared_booking_timeout(&self) -> Result<std::time::Duration, String> {
        let d = self
            .shared_booking_timeout
            .map(|d| d.get())
            .unwrap_or(std::time::Duration::from_millis(500));
        let range = std::time::Duration::from_millis(10)..=std::time::Duration::from_secs(10);
        if range.contains(&d) {
            Ok(d)
        } else {
            Err(format!(
                "shared_booking_timeout is {d:?}: it must be from 10ms to 10s (default 500ms)"
            ))
        }
    }
    /// The time zone of times in messages (checked by [`crate::check`]).
    pub fn zone(&self) -> Result<jiff::tz::TimeZone, String> {
        match &self.timezone {
            None => Ok(jiff::tz::TimeZone::UTC),
            Some(name) => jiff::tz::TimeZone::get(name).map_err(|_| {
                format!("timezone {name:?} is not an IANA time zone (e.g. Europe/Berlin, America/New_York, UTC)")
            }),
        }
    }
    pub fn records_kept_for(&self) -> std::time::Duration {
        self.records_kept_for
            .map(|d| d.get())
            .filter(|d| !d.is_zero())
            .unwrap_or(std::time::Duration::from_secs(14 * 86_400))
    }
    pub fn ack_wait(&self) -> std::time::Duration {
        self.ack_wait
            .map(|d| d.get())
            .filter(|d| !d.is_zero())
            .unwrap_or(std::time::Duration::from_secs(30))
    }
}

/// Retries: exponential backoff with jitter from `initial` to `max`;
/// `Retry-After` is honoured; after `give_up_after` (from the first
/// attempt) the message is given up and recorded as such.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetryConfig {
    /// Default 1s.
    pub initial: HumanDuration,
    /// Default 2m.
    pub max: HumanDuration,
    /// Default 1h.
    pub give_up_after: HumanDuration,
}

impl Default for RetryConfig {
    fn default() -> Self {
        RetryConfig {
            initial: HumanDuration::secs(1),
            max: HumanDuration::secs(120),
            give_up_after: HumanDuration::secs(3600),
        }
    }
}

/// The console provider: messages for channels that have no provider are
/// rendered with that channel's templates and written to the log (INFO)
/// and, with `file`, appended to a file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ConsoleConfig {
    /// File the messages are appended to. Default: the log only.
    pub file: Option<ConfigPath>,
}

/// Per-channel guards.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GuardConfig {
    /// Per request. Default 10s.
    pub timeout: HumanDuration,
    /// Requests in flight at once per destination (per replica), so a
    /// destination that hangs holds only its own pages. Default 8.
    pub concurrency: Option<u32>,
    /// Requests per second (token bucket) per destination: per PagerDuty
    /// service (routing key), Slack channel or user, webhook; for SMS and
    /// email per account. 0 = no limit.
    pub rate_per_second: u32,
    /// Burst allowed above the rate. Default: the rate.
    pub burst: Option<u32>,
    pub breaker: BreakerConfig,
}

impl GuardConfig {
    fn with_rate(rate: u32) -> Self {
        GuardConfig {
            timeout: HumanDuration::secs(10),
            concurrency: None,
            rate_per_second: rate,
            burst: None,
            breaker: BreakerConfig::default(),
        }
    }
}

/// Circuit breaker: after `failures` consecutive failures the channel opens
/// (pages wait); after `open_for` one probe is let through (half-open); after
/// `successes` successes in a row it closes again.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BreakerConfig {
    /// Default 5.
    pub failures: u32,
    /// Default 60s.
    pub open_for: HumanDuration,
    /// Default 2.
    pub successes: u32,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        BreakerConfig {
            failures: 5,
            open_for: HumanDuration::secs(60),
            successes: 2,
        }
    }
}

/// How Slack messages are sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SlackMode {
    /// `chat.postMessage` with a bot token; messages are updated on
    /// acknowledge and resolve and carry buttons.
    WebApi,
    /// An incoming webhook: one fixed channel, no buttons, changes are new messages.
    Webhook,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SlackConfig {
    /// `web_api` (default when a token is set) or `webhook`.
    #[serde(default)]
    pub mode: Option<SlackMode>,
    /// Web API base. Default `https://slack.com/api`.
    #[serde(default)]
    pub api_url: Option<EnvString>,
    /// Bot token (`xoxb-…`) for the Web API.
    #[serde(default)]
    token: Option<Secret>,
    #[serde(default)]
    token_file: Option<SecretFile>,
    /// Incoming webhook URL (a secret: it authorizes posting).
    #[serde(default)]
    webhook_url: Option<Secret>,
    #[serde(default)]
    webhook_url_file: Option<SecretFile>,
    /// Slack channel names to ids (`"#incidents": C0123456`), so messages to
    /// a named channel can be found again after a crash. Optional.
    #[serde(default)]
    pub channel_ids: BTreeMap<String, String>,
    #[serde(default = "slack_guard")]
    pub guard: GuardConfig,
}

fn slack_guard() -> GuardConfig {
    GuardConfig::with_rate(20)
}

impl SlackConfig {
    pub fn token(&self) -> Result<Option<Secret>, String> {
        one_secret("token", self.token.clone(), self.token_file.clone())
    }
    pub fn webhook_url(&self) -> Result<Option<Secret>, String> {
        one_secret(
            "webhook_url",
            self.webhook_url.clone(),
            self.webhook_url_file.clone(),
        )
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PagerdutyConfig {
    /// Events API v2 endpoint. Default `https://events.pagerduty.com/v2/enqueue`.
    #[serde(default)]
    pub url: Option<EnvString>,
    /// Services by the name escalation targets use (`{pagerduty_service: payments}`).
    pub services: BTreeMap<String, PagerdutyService>,
    /// Default: 2 per second per service; PagerDuty documents about 120 events/min per integration key.
    #[serde(default = "pagerduty_guard")]
    pub guard: GuardConfig,
}

fn pagerduty_guard() -> GuardConfig {
    GuardConfig::with_rate(2)
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PagerdutyService {
    /// The 32-character integration key.
    #[serde(default)]
    routing_key: Option<Secret>,
    #[serde(default)]
    routing_key_file: Option<SecretFile>,
}

impl PagerdutyService {
    pub fn routing_key(&self) -> Result<Secret, String> {
        one_secret(
            "routing_key",
            self.routing_key.clone(),
            self.routing_key_file.clone(),
        )?
        .ok_or_else(|| "set `routing_key` or `routing_key_file`".to_string())
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SmsConfig {
    /// Twilio API base. Default `https://api.twilio.com`.
    #[serde(default)]
    pub api_url: Option<EnvString>,
    pub account_sid: EnvString,
    #[serde(default)]
    auth_token: Option<Secret>,
    #[serde(default)]
    auth_token_file: Option<SecretFile>,
    /// Sender number (E.164); this or `messaging_service_sid`.
    #[serde(default)]
    pub from: Option<EnvString>,
    #[serde(default)]
    pub messaging_service_sid: Option<EnvString>,
    /// `gsm7` (default: characters GSM-7 lacks are transliterated or
    /// dropped, 160 characters a segment) or `unicode` (kept, 70 a segment).
    #[serde(default)]
    pub encoding: Option<crate::providers::gsm::Encoding>,
    /// Segments a message may cost; longer bodies are cut to fit. Default 1.
    #[serde(default)]
    pub max_segments: Option<usize>,
    #[serde(default = "sms_guard")]
    pub guard: GuardConfig,
}

fn sms_guard() -> GuardConfig {
    GuardConfig::with_rate(10)
}

impl SmsConfig {
    pub fn auth_token(&self) -> Result<Secret, String> {
        one_secret(
            "auth_token",
            self.auth_token.clone(),
            self.auth_token_file.clone(),
        )?
        .ok_or_else(|| "set `auth_token` or `auth_token_file`".to_string())
    }
}

/// How the SMTP connection is secured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SmtpTls {
    /// Plain text (local relays only).
    None,
    /// STARTTLS, required (port 587).
    Starttls,
    /// Implicit TLS (port 465).
    Tls,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmailConfig {
    pub host: EnvString,
    /// Default: 587 for starttls, 465 for tls, 25 for none.
    #[serde(default)]
    pub port: Option<u16>,
    /// Default `starttls`.
    #[serde(default)]
    pub tls: Option<SmtpTls>,
    #[serde(default)]
    pub username: Option<EnvString>,
    #[serde(default)]
    password: Option<Secret>,
    #[serde(default)]
    password_file: Option<SecretFile>,
    /// `Tocsin <tocsin@example.com>`.
    pub from: EnvString,
    /// PEM file of an extra CA to trust (a private relay).
    #[serde(default)]
    pub ca_file: Option<ConfigPath>,
    #[serde(default = "email_guard")]
    pub guard: GuardConfig,
}

fn email_guard() -> GuardConfig {
    GuardConfig::with_rate(20)
}

impl EmailConfig {
    pub fn password(&self) -> Result<Option<Secret>, String> {
        one_secret(
            "password",
            self.password.clone(),
            self.password_file.clone(),
        )
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    /// The name escalation targets use (`{webhook: teams}`).
    pub name: String,
    /// The URL (a secret: webhook URLs often carry a token).
    #[serde(default)]
    url: Option<Secret>,
    #[serde(default)]
    url_file: Option<SecretFile>,
    /// Standard Webhooks signing secret (`whsec_<base64>`). Default: unsigned.
    #[serde(default)]
    secret: Option<Secret>,
    #[serde(default)]
    secret_file: Option<SecretFile>,
    /// Also send acknowledged, resolved and status updates. Default true.
    #[serde(default = "yes")]
    pub updates: bool,
    /// The receiver drops a repeated `webhook-id`, as Standard Webhooks
    /// asks. Default true: only a request's outcome is recorded. False for
    /// a receiver that does not (a chat service's incoming webhook): the
    /// attempt is recorded before each request too (one more synced write
    /// a page), so two replicas never send one page at once; a request
    /// whose answer was lost is still sent again (a webhook cannot be
    /// asked whether it arrived).
    #[serde(default = "yes")]
    pub drops_repeats: bool,
    #[serde(default = "webhook_guard")]
    pub guard: GuardConfig,
}

fn yes() -> bool {
    true
}

fn webhook_guard() -> GuardConfig {
    GuardConfig::with_rate(20)
}

impl WebhookConfig {
    pub fn url(&self) -> Result<Secret, String> {
        one_secret("url", self.url.clone(), self.url_file.clone())?
            .ok_or_else(|| format!("webhook {:?}: set `url` or `url_file`", self.name))
    }
    pub fn secret(&self) -> Result<Option<Secret>, String> {
        one_secret("secret", self.secret.clone(), self.secret_file.clone())
    }
}

impl Default for GuardConfig {
    fn default() -> Self {
        GuardConfig::with_rate(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shared_booking_timeout_defaults_and_is_bounded() {
        let mut c = NotifierConfig::default();
        assert_eq!(
            c.shared_booking_timeout(),
            Ok(std::time::Duration::from_millis(500))
        );
        c.shared_booking_timeout = Some(HumanDuration::secs(3));
        assert_eq!(
            c.shared_booking_timeout(),
            Ok(std::time::Duration::from_secs(3))
        );
        for bad in [HumanDuration::secs(0), HumanDuration::secs(11)] {
            c.shared_booking_timeout = Some(bad);
            let e = c.shared_booking_timeout().unwrap_err();
            assert!(
                e.contains("shared_booking_timeout") && e.contains("10ms to 10s"),
                "{e}"
            );
        }
    }
}
