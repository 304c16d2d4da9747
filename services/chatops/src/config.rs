//! The `chatops:` section of the config file.

use std::{net::SocketAddr, time::Duration};

use serde::Deserialize;
use tocsin_proto::silence::Matcher;
use tocsin_runtime::config::{one_secret, HumanDuration, Secret, SecretFile};

/// Shortest API token accepted: a write token can resolve incidents.
pub const MIN_TOKEN_LEN: usize = 16;

/// Configuration of the chat-ops service.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, try_from = "RawChatopsConfig")]
pub struct ChatopsConfig {
    /// Address of the Slack, Twilio, API and status endpoints. Default `127.0.0.1:8082`.
    pub listen: SocketAddr,
    /// Largest request body; larger gets 413. Default 64 KiB.
    pub max_body_bytes: usize,
    /// Open connections at most (the oldest idle one is closed for a new
    /// one). Default 1024.
    pub max_connections: usize,
    /// A connection silent this long outside a request is closed. Default 5s.
    pub idle_timeout: HumanDuration,
    /// Deadline for a request's headers. Default 10s.
    pub header_read_timeout: HumanDuration,
    /// Deadline for a request's body. Default 10s.
    pub body_read_timeout: HumanDuration,
    /// How long to wait for the incidents or escalation service's answer
    /// to a command or query. Default 5s.
    pub answer_timeout: HumanDuration,
    /// Slack interactivity and `/tocsin`; off without it.
    pub slack: Option<SlackConfig>,
    /// Twilio inbound SMS; off without it.
    pub sms: Option<SmsConfig>,
    /// Bearer tokens of the HTTP API (`/api/v1`); none: the API answers 401.
    pub api_tokens: Vec<ApiToken>,
    /// The public `/status.json`.
    pub status: StatusConfig,
    /// `tocsin report`.
    pub report: ReportConfig,
    /// Who is who: names, Slack ids and phone numbers, composed from
    /// `escalation.users` by the `tocsin` crate (not read from `chatops:`).
    #[serde(skip)]
    pub users: Vec<ChatUser>,
}

/// A Tocsin user as chat-ops knows them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatUser {
    pub name: String,
    /// Slack member id (`U024BE7LH`).
    pub slack: Option<String>,
    /// E.164 phone number.
    pub phone: Option<String>,
}

/// What a Slack user without a Tocsin user may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UnknownUsers {
    /// Nothing: every request is answered "not a Tocsin user".
    Refuse,
    /// `list`, `show`, `oncall` and `help` only.
    ReadOnly,
}

#[derive(Debug, Clone)]
pub struct SlackConfig {
    /// The app's signing secret (Basic Information > App Credentials).
    pub signing_secret: Secret,
    /// How far `X-Slack-Request-Timestamp` may be from now. Default 5m.
    pub max_clock_skew: Duration,
    pub unknown_users: UnknownUsers,
    /// `response_url`s are only followed when they start with one of these
    /// (default `https://hooks.slack.com/`): a forged one cannot make
    /// Tocsin post elsewhere.
    pub response_url_prefixes: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct SmsConfig {
    /// The Twilio account's auth token (signs the webhooks).
    pub auth_token: Secret,
    /// The webhook URL exactly as configured at Twilio (scheme, host, path
    /// and query): Twilio signs it, and behind a proxy the request's own
    /// URL differs.
    pub webhook_url: String,
}

/// One API bearer token.
#[derive(Debug, Clone)]
pub struct ApiToken {
    /// Recorded as the actor of what it does (`grafana via api`).
    pub name: String,
    pub token: Secret,
    /// `read`, or `write` (which includes read).
    pub write: bool,
}

/// `/status.json`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StatusConfig {
    /// The page's name. Default "Status".
    pub title: String,
    /// Components and the incidents that affect them.
    pub components: Vec<ComponentConfig>,
    /// A note shows on the page when it starts with this (stripped). Default `public:`.
    pub public_note_prefix: String,
    /// Resolved incidents shown for this long. Default 24h.
    pub resolved_for: HumanDuration,
    /// At most this many resolved incidents. Default 10.
    pub resolved_shown: usize,
    /// The answer is reused for this long (it is public and unauthenticated). Default 5s.
    pub cache_for: HumanDuration,
}

impl Default for StatusConfig {
    fn default() -> Self {
        StatusConfig {
            title: "Status".into(),
            components: vec![],
            public_note_prefix: "public:".into(),
            resolved_for: HumanDuration::secs(86_400),
            resolved_shown: 10,
            cache_for: HumanDuration::secs(5),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ComponentConfig {
    pub name: String,
    /// Alertmanager matchers on an incident's labels; all must match.
    #[serde(deserialize_with = "matchers")]
    pub matchers: Vec<Matcher>,
}

fn matchers<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<Matcher>, D::Error> {
    let raw: Vec<String> = Deserialize::deserialize(d)?;
    let ms = raw
        .iter()
        .map(|s| crate::parse::parse_matcher(s))
        .collect::<Result<Vec<_>, _>>()
        .map_err(serde::de::Error::custom)?;
    if ms.is_empty() {
        return Err(serde::de::Error::custom(
            "a component needs at least one matcher, e.g. service=payments",
        ));
    }
    Ok(ms)
}

/// `tocsin report`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReportConfig {
    /// Time zone of "nights" (IANA). Default UTC.
    pub timezone: String,
    /// A page between these local hours wakes someone. Default 22 to 7.
    pub night_starts: u8,
    pub night_ends: u8,
    /// Incidents looked at, at most (the newest). Default 5000.
    pub max_incidents: usize,
    /// Noisiest alerts listed. Default 10.
    pub top_alerts: usize,
}

impl Default for ReportConfig {
    fn default() -> Self {
        ReportConfig {
            timezone: "UTC".into(),
            night_starts: 22,
            night_ends: 7,
            max_incidents: 5000,
            top_alerts: 10,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawChatopsConfig {
    #[serde(default = "default_listen")]
    listen: SocketAddr,
    #[serde(default = "default_max_body")]
    max_body_bytes: usize,
    #[serde(default = "default_max_connections")]
    max_connections: usize,
    #[serde(default = "default_idle")]
    idle_timeout: HumanDuration,
    #[serde(default = "default_header")]
    header_read_timeout: HumanDuration,
    #[serde(default = "default_body")]
    body_read_timeout: HumanDuration,
    #[serde(default = "default_answer")]
    answer_timeout: HumanDuration,
    #[serde(default)]
    slack: Option<RawSlack>,
    #[serde(default)]
    sms: Option<RawSms>,
    #[serde(default)]
    api: RawApi,
    #[serde(default)]
    status: StatusConfig,
    #[serde(default)]
    report: ReportConfig,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSlack {
    #[serde(default)]
    signing_secret: Option<Secret>,
    #[serde(default)]
    signing_secret_file: Option<SecretFile>,
    #[serde(default = "default_skew")]
    max_clock_skew: HumanDuration,
    #[serde(default = "default_unknown")]
    unknown_users: UnknownUsers,
    #[serde(default = "default_prefixes")]
    response_url_prefixes: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSms {
    #[serde(default)]
    auth_token: Option<Secret>,
    #[serde(default)]
    auth_token_file: Option<SecretFile>,
    webhook_url: String,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawApi {
    #[serde(default)]
    tokens: Vec<RawToken>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawToken {
    name: String,
    #[serde(default, deserialize_with = "token_value")]
    token: Option<Secret>,
    #[serde(default, deserialize_with = "token_file")]
    token_file: Option<SecretFile>,
    /// `[read]` or `[read, write]`.
    scopes: Vec<String>,
}

/// An API token is checked where it is written, so `check-config` points
/// at its line.
fn long_enough(token: &str) -> Result<(), String> {
    let n = token.chars().count();
    if n < MIN_TOKEN_LEN {
        return Err(format!(
            "the token is {n} characters; use at least {MIN_TOKEN_LEN} (e.g. openssl rand -hex 24)"
        ));
    }
    Ok(())
}

fn token_value<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Secret>, D::Error> {
    Secret::deserialize_checked(d, long_enough).map(Some)
}

fn token_file<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<SecretFile>, D::Error> {
    SecretFile::deserialize_checked(d, long_enough).map(Some)
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8082))
}
fn default_max_body() -> usize {
    64 * 1024
}
fn default_max_connections() -> usize {
    1024
}
fn default_idle() -> HumanDuration {
    HumanDuration::secs(5)
}
fn default_header() -> HumanDuration {
    HumanDuration::secs(10)
}
fn default_body() -> HumanDuration {
    HumanDuration::secs(10)
}
fn default_answer() -> HumanDuration {
    HumanDuration::secs(5)
}
fn default_skew() -> HumanDuration {
    HumanDuration::secs(300)
}
fn default_unknown() -> UnknownUsers {
    UnknownUsers::Refuse
}
fn default_prefixes() -> Vec<String> {
    vec!["https://hooks.slack.com/".into()]
}

impl TryFrom<RawChatopsConfig> for ChatopsConfig {
    type Error = String;
    fn try_from(r: RawChatopsConfig) -> Result<Self, String> {
        if !(1024..=16 * 1024 * 1024).contains(&r.max_body_bytes) {
            return Err(format!(
                "chatops.max_body_bytes is {}; use between 1024 and 16777216 (default 65536)",
                r.max_body_bytes
            ));
        }
        if r.max_connections < 16 {
            return Err(format!(
                "chatops.max_connections is {}; use at least 16 (default 1024)",
                r.max_connections
            ));
        }
        for (name, d) in [
            ("idle_timeout", r.idle_timeout),
            ("header_read_timeout", r.header_read_timeout),
            ("body_read_timeout", r.body_read_timeout),
            ("answer_timeout", r.answer_timeout),
        ] {
            if d.get().is_zero() {
                return Err(format!("chatops.{name} is 0; give a duration such as 5s"));
            }
        }
        let slack = match r.slack {
            None => None,
            Some(s) => {
                let secret = one_secret("signing_secret", s.signing_secret, s.signing_secret_file)?
                    .ok_or("chatops.slack needs signing_secret (or signing_secret_file): the app's signing secret, e.g. ${TOCSIN_SLACK_SIGNING_SECRET}")?;
                if s.max_clock_skew.get() > Duration::from_secs(300)
                    || s.max_clock_skew.get().is_zero()
                {
                    return Err("chatops.slack.max_clock_skew must be between 1s and 5m (Slack's own limit)".into());
                }
                if s.response_url_prefixes.is_empty() {
                    return Err("chatops.slack.response_url_prefixes is empty: follow-ups could go nowhere; keep https://hooks.slack.com/".into());
                }
                Some(SlackConfig {
                    signing_secret: secret,
                    max_clock_skew: s.max_clock_skew.get(),
                    unknown_users: s.unknown_users,
                    response_url_prefixes: s.response_url_prefixes,
                })
            }
        };
        let sms = match r.sms {
            None => None,
            Some(s) => {
                let token = one_secret("auth_token", s.auth_token, s.auth_token_file)?.ok_or(
                    "chatops.sms needs auth_token (or auth_token_file): the Twilio account's auth token",
                )?;
                if !(s.webhook_url.starts_with("https://") || s.webhook_url.starts_with("http://"))
                {
                    return Err(format!(
                        "chatops.sms.webhook_url {:?} is not an http(s) URL; give the URL configured at Twilio",
                        s.webhook_url
                    ));
                }
                Some(SmsConfig {
                    auth_token: token,
                    webhook_url: s.webhook_url,
                })
            }
        };
        let mut api_tokens = Vec::new();
        for (i, t) in r.api.tokens.into_iter().enumerate() {
            let token = one_secret("token", t.token, t.token_file)?.ok_or_else(|| {
                format!(
                    "chatops.api.tokens[{i}] ({}) needs token or token_file",
                    t.name
                )
            })?;
            if token.expose().len() < MIN_TOKEN_LEN {
                return Err(format!(
                    "chatops.api.tokens[{i}] ({}): the token is {} characters; use at least {MIN_TOKEN_LEN} (e.g. openssl rand -hex 24)",
                    t.name,
                    token.expose().len()
                ));
            }
            let mut write = false;
            for s in &t.scopes {
                match s.as_str() {
                    "read" => {}
                    "write" => write = true,
                    other => {
                        return Err(format!(
                        "chatops.api.tokens[{i}] ({}): unknown scope {other:?}; use read or write",
                        t.name
                    ))
                    }
                }
            }
            if t.scopes.is_empty() {
                return Err(format!(
                    "chatops.api.tokens[{i}] ({}): scopes is empty; use [read] or [read, write]",
                    t.name
                ));
            }
            if api_tokens.iter().any(|a: &ApiToken| a.name == t.name) {
                return Err(format!(
                    "chatops.api.tokens: the name {:?} is used twice",
                    t.name
                ));
            }
            api_tokens.push(ApiToken {
                name: t.name,
                token,
                write,
            });
        }
        if r.report.night_starts > 23 || r.report.night_ends > 23 {
            return Err("chatops.report.night_starts and night_ends are hours, 0 to 23".into());
        }
        if jiff::tz::TimeZone::get(&r.report.timezone).is_err() {
            return Err(format!(
                "chatops.report.timezone {:?} is not an IANA time zone (e.g. Europe/Berlin)",
                r.report.timezone
            ));
        }
        if r.report.max_incidents == 0 || r.report.max_incidents > 100_000 {
            return Err("chatops.report.max_incidents must be between 1 and 100000".into());
        }
        if r.status.resolved_shown > 100 {
            return Err("chatops.status.resolved_shown is at most 100".into());
        }
        if let Some(e) = tocsin_runtime::config::at_least(
            "chatops.status.cache_for",
            r.status.cache_for,
            HumanDuration::secs(1),
            "5s",
        ) {
            return Err(format!(
                "{e}: the page is public, and each rebuild asks the incidents service"
            ));
        }
        Ok(ChatopsConfig {
            listen: r.listen,
            max_body_bytes: r.max_body_bytes,
            max_connections: r.max_connections,
            idle_timeout: r.idle_timeout,
            header_read_timeout: r.header_read_timeout,
            body_read_timeout: r.body_read_timeout,
            answer_timeout: r.answer_timeout,
            slack,
            sms,
            api_tokens,
            status: r.status,
            report: r.report,
            users: vec![],
        })
    }
}

impl Default for ChatopsConfig {
    fn default() -> Self {
        all_defaults()
    }
}

/// Every key at its default (what an empty `chatops: {}` gives).
fn all_defaults() -> ChatopsConfig {
    ChatopsConfig::try_from(RawChatopsConfig {
        listen: default_listen(),
        max_body_bytes: default_max_body(),
        max_connections: default_max_connections(),
        idle_timeout: default_idle(),
        header_read_timeout: default_header(),
        body_read_timeout: default_body(),
        answer_timeout: default_answer(),
        slack: None,
        sms: None,
        api: RawApi::default(),
        status: StatusConfig::default(),
        report: ReportConfig::default(),
    })
    .expect("defaults are valid")
}

impl ChatopsConfig {
    /// The same settings for tests and examples: a Slack signing secret, a
    /// Twilio auth token and webhook URL, API tokens by `(name, token, write)`.
    pub fn with(
        slack_secret: Option<&str>,
        sms: Option<(&str, &str)>,
        tokens: &[(&str, &str, bool)],
    ) -> ChatopsConfig {
        ChatopsConfig {
            slack: slack_secret.map(|s| SlackConfig {
                signing_secret: Secret::new(s),
                max_clock_skew: Duration::from_secs(300),
                unknown_users: UnknownUsers::Refuse,
                response_url_prefixes: default_prefixes(),
            }),
            sms: sms.map(|(token, url)| SmsConfig {
                auth_token: Secret::new(token),
                webhook_url: url.into(),
            }),
            api_tokens: tokens
                .iter()
                .map(|(n, t, w)| ApiToken {
                    name: n.to_string(),
                    token: Secret::new(*t),
                    write: *w,
                })
                .collect(),
            ..ChatopsConfig::default()
        }
    }
}
