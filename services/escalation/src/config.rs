//! `escalation:` section: routes, policies, schedules, users.

use std::collections::BTreeMap;

use serde::Deserialize;
use tocsin_proto::{incident::Severity, notify::Channel, silence::Matcher, silence::Recurrence};
use tocsin_runtime::config::{ConfigPath, HumanDuration, Secret};

use crate::schedule::ScheduleConfig;

/// Configuration of the escalation service.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EscalationConfig {
    /// Where pending escalation steps are kept. Default `.tocsin/data/escalation`.
    pub data_dir: Option<ConfigPath>,
    /// Address of the HTTP server for on-call calendars (iCalendar feeds at
    /// `/calendars/<schedule>.ics`) and `/oncall/<schedule>`. Default: off.
    pub calendar_listen: Option<std::net::SocketAddr>,
    /// The secret that reads the calendar server, given as `?token=` in a
    /// feed's URL (calendar apps send no headers) or as `Authorization:
    /// Bearer`. At least 16 characters. Required when `calendar_listen` is
    /// not a loopback address: the calendars say who is on call.
    #[serde(deserialize_with = "calendar_token")]
    pub calendar_token: Option<Secret>,
    /// The route tree (Alertmanager style): picks a policy per incident.
    pub route: RouteConfig,
    pub policies: Vec<PolicyConfig>,
    pub schedules: Vec<ScheduleConfig>,
    pub users: Vec<UserConfig>,
    /// The lease that makes one escalation instance active and the others
    /// standbys (see `tocsin_runtime::lease`): a standby takes over within
    /// about this long after the active one dies. 1s to 10m. Default 5s.
    pub lease_ttl: Option<HumanDuration>,
}

impl EscalationConfig {
    /// `lease_ttl`, or its default (5s).
    pub fn lease_ttl(&self) -> std::time::Duration {
        self.lease_ttl
            .map(|d| d.get())
            .unwrap_or(std::time::Duration::from_secs(5))
    }

    /// Why the calendar server may not run as configured: one reachable
    /// from other machines without `calendar_token`.
    pub fn calendar_error(&self) -> Option<String> {
        let addr = self.calendar_listen?;
        if addr.ip().is_loopback() || self.calendar_token.is_some() {
            return None;
        }
        Some(format!(
            "escalation.calendar_listen is {addr}, reachable from other machines, and there is no \
             calendar_token: anyone who can reach it would read who is on call. Set \
             escalation.calendar_token (at least {MIN_CALENDAR_TOKEN_LEN} characters, e.g. \
             ${{TOCSIN_CALENDAR_TOKEN}} from openssl rand -hex 24) and subscribe to \
             /calendars/<schedule>.ics?token=<it>, or listen on 127.0.0.1"
        ))
    }

    /// `data_dir`, or its default (`.tocsin/data/escalation`).
    pub fn data_dir(&self) -> std::path::PathBuf {
        self.data_dir
            .as_ref()
            .map(|p| p.0.clone())
            .unwrap_or_else(|| std::path::PathBuf::from(".tocsin/data/escalation"))
    }
}

/// Shortest `calendar_token`.
pub const MIN_CALENDAR_TOKEN_LEN: usize = 16;

fn calendar_token<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Secret>, D::Error> {
    Secret::deserialize_checked(d, |token| {
        let n = token.chars().count();
        if n < MIN_CALENDAR_TOKEN_LEN {
            return Err(format!(
                "the token is {n} characters; use at least {MIN_CALENDAR_TOKEN_LEN} (e.g. openssl rand -hex 24)"
            ));
        }
        Ok(())
    })
    .map(Some)
}

/// A node of the route tree. The root matches every incident; children are
/// tried in order and the first match wins, unless it says `continue: true`.
/// A node without a policy uses its parent's.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// Matched against the incident's common labels (plus `severity`).
    #[serde(
        default,
        deserialize_with = "tocsin_rules::matchers::deserialize_matchers"
    )]
    pub matchers: Vec<Matcher>,
    #[serde(default)]
    pub policy: Option<String>,
    #[serde(default, rename = "continue")]
    pub continue_matching: bool,
    #[serde(default)]
    pub routes: Vec<RouteConfig>,
}

/// An escalation policy: levels tried in order until someone acknowledges.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyConfig {
    pub name: String,
    pub levels: Vec<LevelConfig>,
    /// How many more times to run through all levels after the last one.
    /// Default 0.
    #[serde(default)]
    pub repeat: u32,
    /// A level with nobody to page (empty schedule, outside its hours) is
    /// skipped at once instead of waiting out its delay. Default true.
    #[serde(default = "yes")]
    pub skip_empty_levels: bool,
    /// Page the acknowledger again when an acknowledgement is older than
    /// this and the incident is still open. Default: never.
    #[serde(default)]
    pub renotify_acknowledged_after: Option<HumanDuration>,
}

fn yes() -> bool {
    true
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LevelConfig {
    pub targets: Vec<TargetConfig>,
    /// Time before the next level if nobody acknowledges. Default 15m.
    #[serde(default = "fifteen_minutes")]
    pub delay: HumanDuration,
    /// Shorter (or longer) delays for some severities.
    #[serde(default)]
    pub delay_by_severity: BTreeMap<Severity, HumanDuration>,
    /// Only page this level inside this weekly window (e.g. business hours);
    /// outside it the level is skipped.
    #[serde(default)]
    pub active: Option<Recurrence>,
}

fn fifteen_minutes() -> HumanDuration {
    HumanDuration::secs(15 * 60)
}

/// Who a level pages; written as a one-key map: `{user: alice}`,
/// `{schedule: primary}`, `{slack_channel: "#ops"}`,
/// `{pagerduty_service: payments}`, `{webhook: teams}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TargetConfig {
    User(String),
    /// Whoever is on call for this schedule when the level fires.
    Schedule(String),
    SlackChannel(String),
    /// A PagerDuty service by its name in the notifier's config.
    PagerdutyService(String),
    /// An outbound webhook by its name in the notifier's config.
    Webhook(String),
}

/// A person who can be paged.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserConfig {
    pub name: String,
    #[serde(default)]
    pub email: Option<String>,
    /// E.164, e.g. `+14155550100`.
    #[serde(default)]
    pub phone: Option<String>,
    /// Slack member id, e.g. `U024BE7LH`.
    #[serde(default)]
    pub slack: Option<String>,
    /// How to reach this user per severity. Default: the reference practice
    /// (critical: SMS + email + Slack at once, SMS again after 5m; high: SMS +
    /// email; medium and low: email + Slack; info: email), using only the
    /// contact methods the user has.
    #[serde(default)]
    pub rules: BTreeMap<Severity, Vec<RuleStep>>,
}

/// Channels to use `after` the user is paged.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleStep {
    pub channels: Vec<Channel>,
    #[serde(default)]
    pub after: HumanDuration,
}

const TARGET_FORMS: &str = "{user: NAME}, {schedule: NAME}, {slack_channel: \"#channel\"}, {pagerduty_service: NAME} or {webhook: NAME}";

impl<'de> Deserialize<'de> for TargetConfig {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        let m: BTreeMap<String, String> = BTreeMap::deserialize(d)
            .map_err(|e| D::Error::custom(format!("a target is {TARGET_FORMS} ({e})")))?;
        let mut it = m.into_iter();
        let (Some((kind, name)), None) = (it.next(), it.next()) else {
            return Err(D::Error::custom(format!(
                "a target has exactly one key: {TARGET_FORMS}"
            )));
        };
        if name.trim().is_empty() {
            return Err(D::Error::custom(format!("target {kind} has an empty name")));
        }
        Ok(match kind.as_str() {
            "user" => TargetConfig::User(name),
            "schedule" => TargetConfig::Schedule(name),
            "slack_channel" => TargetConfig::SlackChannel(name),
            "pagerduty_service" => TargetConfig::PagerdutyService(name),
            "webhook" => TargetConfig::Webhook(name),
            other => {
                return Err(D::Error::custom(format!(
                    "unknown target kind {other:?}; a target is {TARGET_FORMS}"
                )))
            }
        })
    }
}
