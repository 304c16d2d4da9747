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

/// Who or what a page is for. Escalation's store keeps it by field place
/// inside its tracks: a new field of a variant goes last, with
/// `#[serde(default)]`.
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
    /// Also the `Nats-Msg-Id` of a message holding it alone (one holding
    /// several has an id made of theirs), and the notifier's delivery-record
    /// key, so a page is delivered once however often it is published.
    pub id: String,
    pub incident: IncidentSummary,
    /// Escalation level and repeat round, 0-based on the wire (level 0 is
    /// the first level; people read it as "level 1").
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
    /// A first page, or a reminder (a repeat round, or a stale acknowledgement).
    #[serde(default)]
    pub kind: MessageKind,
}

impl Page {
    /// `tocsin.notify.<channel>`.
    pub fn subject(&self) -> String {
        crate::subjects::notify_subject(self.channel.as_str())
    }

    /// The destination whose pace and limits the notifier applies to this
    /// page, its lane: a Slack conversation (the page's address), a
    /// PagerDuty service, a webhook; a channel's SMS or email all share
    /// one (the account's: ""). What the notifier's
    /// `Provider::destination` gives for a page not yet sent. Escalation
    /// puts a burst's pages together by lane, so a page that waits for its
    /// destination's turn in a message waits beside pages that wait for
    /// the same turns.
    pub fn lane(&self) -> &str {
        match (&self.channel, &self.target) {
            (Channel::Sms | Channel::Email, _) => "",
            (Channel::Slack, _) => &self.address,
            (_, PageTarget::PagerdutyService { service }) => service,
            (_, PageTarget::Webhook { name }) => name,
            (_, PageTarget::User { name, .. }) => name,
            (_, PageTarget::SlackChannel { channel }) => channel,
        }
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

/// What a message tells: a new page, a reminder, or a change of an incident
/// already paged (each has its own template per channel).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MessageKind {
    #[default]
    Page,
    /// A repeat round, or a reminder to whoever acknowledged.
    Reminder,
    Acknowledged,
    Resolved,
    /// A note on the incident, sent as a status update where a message was posted.
    StatusUpdate,
}

impl MessageKind {
    pub fn as_str(self) -> &'static str {
        match self {
            MessageKind::Page => "page",
            MessageKind::Reminder => "reminder",
            MessageKind::Acknowledged => "acknowledged",
            MessageKind::Resolved => "resolved",
            MessageKind::StatusUpdate => "status_update",
        }
    }
}

/// What became of a message.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeliveryOutcome {
    /// The provider accepted it.
    Sent,
    /// The provider refused it for good (bad token, invalid payload): no retry.
    Failed,
    /// Retries ran out (the provider stayed down past `give_up_after`).
    GaveUp,
    /// Not sent: by the time it could be, the incident was resolved,
    /// silenced, or (for a first page) acknowledged.
    Skipped,
}

impl DeliveryOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            DeliveryOutcome::Sent => "sent",
            DeliveryOutcome::Failed => "failed",
            DeliveryOutcome::GaveUp => "gave_up",
            DeliveryOutcome::Skipped => "skipped",
        }
    }
}

/// Where a provider keeps what was sent, so it can be found and updated
/// later (by any notifier replica: this travels on the incident timeline).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ProviderRef {
    /// A Web API message: `chat.update` needs both.
    SlackMessage { channel: String, ts: String },
    /// An incoming webhook post (cannot be updated).
    SlackWebhook,
    /// A PagerDuty alert: acknowledged and resolved by this dedup key.
    Pagerduty { service: String, dedup_key: String },
    /// A Twilio message sid.
    Sms { sid: String },
    /// The `Message-ID` of an email, and to whom (status updates follow
    /// in the same thread).
    Email {
        message_id: String,
        #[serde(default)]
        to: String,
        /// The page's subject: status updates answer it (`Re: …`).
        #[serde(default)]
        subject: String,
    },
    /// The `webhook-id` of a webhook call.
    Webhook { id: String },
    /// Written to the console provider (log and file) instead of a
    /// provider that is not configured.
    Console,
}

/// A delivery receipt: recorded on the incident's timeline.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Delivery {
    /// The page id, or for an update `<kind>:<incident event>:<provider ref>`.
    pub id: String,
    pub kind: MessageKind,
    pub channel: Channel,
    /// Who or what: `alice`, `#ops`, `pagerduty:payments`.
    pub target: String,
    pub outcome: DeliveryOutcome,
    /// Attempts made (1 = first try).
    pub attempts: u32,
    /// The provider's error text for failures, or a short note.
    #[serde(default)]
    pub detail: String,
    #[serde(default)]
    pub provider: Option<ProviderRef>,
}

impl Delivery {
    /// `alice via sms: sent`, for logs and the CLI.
    pub fn describe(&self) -> String {
        let mut s = format!(
            "{} {} via {}: {}",
            self.kind.as_str(),
            self.target,
            self.channel.as_str(),
            self.outcome.as_str()
        );
        if !self.detail.is_empty() {
            s.push_str(" (");
            s.push_str(&self.detail);
            s.push(')');
        }
        s
    }
}

/// `action_id`s of the buttons on Slack messages; each button's `value` is
/// the incident id (UUID). The chat-ops service maps them to commands.
pub mod slack_actions {
    pub const ACK: &str = "tocsin_ack";
    pub const UNACK: &str = "tocsin_unack";
    pub const RESOLVE: &str = "tocsin_resolve";
    pub const ESCALATE: &str = "tocsin_escalate";
    /// Snooze for one hour.
    pub const SNOOZE: &str = "tocsin_snooze_1h";
}
