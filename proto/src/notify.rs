//! Pages: one message per notification to deliver (NOTIFY stream), written
//! by escalation, delivered by the notifier.
//!
//! Provider secrets never travel on the bus: a page names a PagerDuty
//! service or a webhook by its configured name, and the notifier holds the
//! routing key or URL.

use jiff::Timestamp;
use serde::{Deserialize, Serialize};

use crate::incident::IncidentSummary;

/// How a page reaches someone.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Channel {
    Sms,
    Email,
    Slack,
    Pagerduty,
    Webhook,
}

impl Channel {
    pub fn as_str(self) -> &'static str {
        match self {
            Channel::Sms => "sms",
            Channel::Email => "email",
            Channel::Slack => "slack",
            Channel::Pagerduty => "pagerduty",
            Channel::Webhook => "webhook",
        }
    }
}

/// Who or what a page is for.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum PageTarget {
    /// A user, directly or as whoever was on call for `schedule`.
    User {
        name: String,
        #[serde(default)]
        schedule: Option<String>,
    },
    SlackChannel {
        channel: String,
    },
    /// A PagerDuty service by its name in the notifier's config.
    PagerdutyService {
        service: String,
    },
    /// An outbound webhook by its name in the notifier's config.
    Webhook {
        name: String,
    },
}

impl PageTarget {
    /// Short stable form used in page ids: `user:alice`, `slack:#ops` ...
    pub fn key(&self) -> String {
        match self {
            PageTarget::User { name, .. } => format!("user:{name}"),
            PageTarget::SlackChannel { channel } => format!("slack:{channel}"),
            PageTarget::PagerdutyService { service } => format!("pagerduty:{service}"),
            PageTarget::Webhook { name } => format!("webhook:{name}"),
        }
    }
}

/// One notification to deliver.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Page {
    /// Stable: incident + generation + level + repeat + target + channel +
    /// rule step (the generation changes when an incident is reopened or
    /// paged again after an unacknowledge or a snooze).
    /// Also the `Nats-Msg-Id`, and the notifier's delivery-record key, so a
    /// page is delivered once however often it is published.
    pub id: String,
    pub incident: IncidentSummary,
    /// Escalation level (0 = first) and repeat round (0 = first pass).
    pub level: u32,
    pub repeat: u32,
    pub target: PageTarget,
    pub channel: Channel,
    /// Where to: phone number, email address, Slack user or channel id;
    /// empty for PagerDuty services and webhooks (the notifier knows them).
    #[serde(default)]
    pub address: String,
    /// Why this page: "level 1 of policy web-oncall (no acknowledgement after 15m)".
    pub reason: String,
    pub due_at: Timestamp,
}

impl Page {
    /// `tocsin.notify.<channel>`.
    pub fn subject(&self) -> String {
        format!("tocsin.notify.{}", self.channel.as_str())
    }

    /// The stable page id for these coordinates.
    pub fn make_id(
        incident: &uuid::Uuid,
        generation: u32,
        level: u32,
        repeat: u32,
        target: &PageTarget,
        channel: Channel,
        step: u32,
    ) -> String {
        format!(
            "page:{}:{generation}:{level}:{repeat}:{}:{}:{step}",
            incident.simple(),
            target.key(),
            channel.as_str()
        )
    }
}
