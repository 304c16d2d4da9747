//! Incidents and the events of the INCIDENTS stream.
//!
//! The INCIDENTS stream is the truth: every incident's timeline is the
//! ordered list of its [`IncidentEvent`]s, and every event carries the
//! incident's [`IncidentSummary`] after the event, so consumers need no
//! lookups. Subjects: `tocsin.incidents.inc.<incident id>.<kind>` and
//! `tocsin.incidents.silence.<silence id>.<kind>`.

use jiff::Timestamp;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::{alert::Labels, fingerprint::Fingerprint, silence::Silence, AlertStatus};

/// Severity, lowest first (so `max` is the most severe).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Info,
    Low,
    Medium,
    High,
    Critical,
}

impl Severity {
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Info => "info",
            Severity::Low => "low",
            Severity::Medium => "medium",
            Severity::High => "high",
            Severity::Critical => "critical",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum IncidentStatus {
    Triggered,
    Acknowledged,
    Resolved,
}

impl IncidentStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            IncidentStatus::Triggered => "triggered",
            IncidentStatus::Acknowledged => "acknowledged",
            IncidentStatus::Resolved => "resolved",
        }
    }
}

/// Who did something, and through what.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Actor {
    /// User name, runbook name, integration name.
    pub name: String,
    /// `slack`, `sms`, `cli`, `api`, `runbook`, `escalation`, `integration`, `tocsin`.
    pub via: String,
}

impl Actor {
    pub fn new(name: impl Into<String>, via: impl Into<String>) -> Self {
        Actor {
            name: name.into(),
            via: via.into(),
        }
    }
}

/// The incident as it is after an event. Escalation's store keeps it by
/// field place inside its tracks, and the incidents service's store in
/// its incident records: a new field goes last, with `#[serde(default)]`,
/// and no field is left out when empty (`skip_serializing_if`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IncidentSummary {
    pub id: Uuid,
    /// Short human number: `#42`.
    pub number: u64,
    pub dedup_key: String,
    pub title: String,
    pub severity: Severity,
    pub status: IncidentStatus,
    /// Labels shared by every alert of the incident.
    pub labels: Labels,
    pub opened_at: Timestamp,
    /// When escalation may start paging (opened_at + group_wait).
    pub announce_at: Timestamp,
    #[serde(default)]
    pub acknowledged_at: Option<Timestamp>,
    #[serde(default)]
    pub acknowledged_by: Option<Actor>,
    #[serde(default)]
    pub resolved_at: Option<Timestamp>,
    #[serde(default)]
    pub snoozed_until: Option<Timestamp>,
    #[serde(default)]
    pub assignee: Option<String>,
    pub alerts_firing: u32,
    pub alerts_total: u32,
    #[serde(default)]
    pub reopen_count: u32,
    /// Set when every firing alert is silenced or inhibited: the incident is
    /// visible but pages nobody.
    #[serde(default)]
    pub suppressed: Option<String>,
    /// How many entries have changed the incident: every entry about it
    /// but the receipts (`paged`, `delivery`) adds one. Of two copies of
    /// one incident the one with the higher revision is the newer, even
    /// when the newer was stored in a message of several entries and the
    /// older on the incident's own subjects (see [`LogEntry::is_packed`]).
    /// 0 in entries written before it was kept.
    #[serde(default)]
    pub revision: u64,
}

impl IncidentSummary {
    /// A new incident as opened: triggered, no alerts yet, announced at
    /// once, lowest severity until its alerts say otherwise.
    pub fn new(
        id: Uuid,
        number: u64,
        dedup_key: impl Into<String>,
        title: impl Into<String>,
        opened_at: Timestamp,
    ) -> Self {
        IncidentSummary {
            id,
            number,
            dedup_key: dedup_key.into(),
            title: title.into(),
            severity: Severity::Info,
            status: IncidentStatus::Triggered,
            labels: Labels::new(),
            opened_at,
            announce_at: opened_at,
            acknowledged_at: None,
            acknowledged_by: None,
            resolved_at: None,
            snoozed_until: None,
            assignee: None,
            alerts_firing: 0,
            alerts_total: 0,
            reopen_count: 0,
            suppressed: None,
            revision: 0,
        }
    }
}

/// One alert as attached to an incident. The incidents service's store
/// keeps it by field place: a new field goes last, with
/// `#[serde(default)]`, and no field is left out when empty
/// (`skip_serializing_if`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AlertInfo {
    pub fingerprint: Fingerprint,
    pub status: AlertStatus,
    pub labels: Labels,
    #[serde(default)]
    pub annotations: Labels,
    pub starts_at: Timestamp,
    #[serde(default)]
    pub ends_at: Option<Timestamp>,
    #[serde(default)]
    pub generator_url: Option<String>,
    /// Why this alert pages nobody (`silenced by <id>`, `inhibited by <rule>`).
    #[serde(default)]
    pub suppressed: Option<String>,
}

/// What caused an event. Part of the event's message id, so re-deciding
/// the same input after a crash publishes nothing new.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Cause {
    /// An alert event at this ALERTS stream sequence; `index` is its place
    /// in the message when the message holds several alerts of one request
    /// (see [`crate::subjects::alert_batch_subject`]), 0 otherwise.
    Alert {
        seq: u64,
        #[serde(default, skip_serializing_if = "is_zero")]
        index: u32,
    },
    /// A command with this id.
    Command { id: String },
    /// A timer (snooze end, missed heartbeat) with this id.
    Timer { id: String },
}

impl Cause {
    /// An alert alone in its ALERTS message.
    pub fn alert(seq: u64) -> Self {
        Cause::Alert { seq, index: 0 }
    }

    /// Short form used in message ids: `a:<seq>` (`a:<seq>.<index>` for an
    /// alert after the first of a message), `c:<id>`, `t:<id>`.
    pub fn key(&self) -> String {
        match self {
            Cause::Alert { seq, index: 0 } => format!("a:{seq}"),
            Cause::Alert { seq, index } => format!("a:{seq}.{index}"),
            Cause::Command { id } => format!("c:{id}"),
            Cause::Timer { id } => format!("t:{id}"),
        }
    }
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// One alert of an `alert_resolved` entry's `more`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResolvedAlert {
    pub fingerprint: Fingerprint,
    pub ends_at: Timestamp,
}

/// Why an incident was resolved.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ResolveReason {
    /// Every attached alert resolved (auto-resolve).
    AllAlertsResolved,
    /// Someone (or a runbook) resolved it.
    Manual,
}

/// What happened.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum EventKind {
    /// A new incident, with its first alert.
    Opened {
        alert: AlertInfo,
        /// Alerts of the same ALERTS message (one request) that joined the
        /// incident right after `alert`, in order: the incidents service
        /// writes a run of them as one entry (its cause is the last one's).
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        more: Vec<AlertInfo>,
    },
    /// An alert joined, fired again or changed (annotations, suppression);
    /// `more` as for `Opened`.
    AlertFiring {
        alert: AlertInfo,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        more: Vec<AlertInfo>,
    },
    AlertResolved {
        fingerprint: Fingerprint,
        ends_at: Timestamp,
        /// Alerts of the same ALERTS message that resolved right after it,
        /// in order, written as one entry as for `Opened`.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        more: Vec<ResolvedAlert>,
    },
    Acknowledged,
    Unacknowledged,
    Snoozed {
        until: Timestamp,
    },
    /// A snooze ran out; the incident is triggered again.
    SnoozeEnded,
    /// Someone asked to escalate now.
    Escalated {
        #[serde(default)]
        reason: String,
    },
    Assigned {
        user: String,
    },
    NoteAdded {
        text: String,
    },
    /// A runbook step reported progress.
    Remediation {
        runbook: String,
        step: String,
        status: String,
        #[serde(default)]
        detail: String,
        /// With status `held`: the first escalation level waits until then,
        /// unless the run ends first (step `run`, status `succeeded` or
        /// `failed`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        hold_until: Option<Timestamp>,
    },
    Resolved {
        reason: ResolveReason,
    },
    Reopened,
    /// Escalation paged people (who, on which channel, and why).
    Paged {
        level: u32,
        repeat: u32,
        pages: Vec<String>,
        #[serde(default)]
        reason: String,
        /// Which escalation step this was (absent from entries written
        /// before it was added).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        fired: Option<Fired>,
    },
    /// The notifier's receipt for a message about this incident.
    Delivery {
        delivery: crate::notify::Delivery,
    },
    /// Someone asked the remediation service to start a runbook on this
    /// incident, or decided a run waiting for approval (the actor is who).
    Runbook {
        request: RunbookRequest,
    },
}

/// Which escalation step a `paged` record stands for: the policy, the
/// generation of the incident's track in it (it changes when the incident
/// reopens or is paged again after an unacknowledge, a snooze or an
/// escalate-now), the level and round (on the record itself) and, for a
/// reminder to whoever acknowledged, the reminder's number. A `paged` record
/// is written only once the step's pages are stored, so an escalation
/// instance that follows INCIDENTS (a standby, or the active one after a
/// crash) takes the step as fired and does not fire it again.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fired {
    pub policy: String,
    pub generation: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reminder: Option<u32>,
}

/// The incident a runbook run id names: `<incident id>.<runbook>.<seq>`
/// for a run started by an entry stored alone at INCIDENTS sequence
/// `seq`, `<incident id>.<runbook>.<seq>.<index>` for one started by the
/// entry at `index` of a message of several (a `paged` receipt stored
/// with others). None if `run` is neither.
pub fn run_incident(run: &str) -> Option<uuid::Uuid> {
    let parts: Vec<&str> = run.split('.').collect();
    let [id, name, place @ ..] = parts.as_slice() else {
        return None;
    };
    if name.is_empty()
        || !(1..=2).contains(&place.len())
        || place.iter().any(|n| n.parse::<u64>().is_err())
    {
        return None;
    }
    uuid::Uuid::parse_str(id).ok()
}

/// What a person asks of the remediation service about an incident
/// (`tocsin runbook run|approve|deny`); it reads these from INCIDENTS.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum RunbookRequest {
    /// Start runbook `runbook` now (its `match` is not checked).
    Run {
        runbook: String,
        #[serde(default)]
        dry_run: bool,
    },
    /// Let run `run`, waiting for approval, go ahead.
    Approve { run: String },
    /// Refuse run `run`: it does not run and the incident escalates.
    Deny { run: String },
}

impl RunbookRequest {
    /// `run`, `approve` or `deny`.
    pub fn op(&self) -> &'static str {
        match self {
            RunbookRequest::Run { .. } => "run",
            RunbookRequest::Approve { .. } => "approve",
            RunbookRequest::Deny { .. } => "deny",
        }
    }
}

impl EventKind {
    /// Whether this is a receipt (`paged`, `delivery`): it changes nothing
    /// of its incident but the timeline, and so not its
    /// [`IncidentSummary::revision`].
    pub fn is_receipt(&self) -> bool {
        matches!(self, EventKind::Paged { .. } | EventKind::Delivery { .. })
    }

    /// A new incident opened by `alert` alone.
    pub fn opened(alert: AlertInfo) -> Self {
        EventKind::Opened {
            alert,
            more: Vec::new(),
        }
    }

    /// `alert` firing, alone.
    pub fn alert_firing(alert: AlertInfo) -> Self {
        EventKind::AlertFiring {
            alert,
            more: Vec::new(),
        }
    }

    /// The alerts an `opened` or `alert_firing` entry attaches, in order
    /// (none for other kinds).
    pub fn alerts(&self) -> impl Iterator<Item = &AlertInfo> {
        let (first, more): (Option<&AlertInfo>, &[AlertInfo]) = match self {
            EventKind::Opened { alert, more } | EventKind::AlertFiring { alert, more } => {
                (Some(alert), more)
            }
            _ => (None, &[]),
        };
        first.into_iter().chain(more)
    }

    /// The alerts an `alert_resolved` entry resolves, with when each ended
    /// (none for other kinds).
    pub fn resolved(&self) -> Vec<ResolvedAlert> {
        match self {
            EventKind::AlertResolved {
                fingerprint,
                ends_at,
                more,
            } => std::iter::once(ResolvedAlert {
                fingerprint: fingerprint.clone(),
                ends_at: *ends_at,
            })
            .chain(more.iter().cloned())
            .collect(),
            _ => Vec::new(),
        }
    }

    /// The last subject token: `opened`, `alert_firing`, ...
    pub fn name(&self) -> &'static str {
        match self {
            EventKind::Opened { .. } => kind::OPENED,
            EventKind::AlertFiring { .. } => kind::ALERT_FIRING,
            EventKind::AlertResolved { .. } => kind::ALERT_RESOLVED,
            EventKind::Acknowledged => kind::ACKNOWLEDGED,
            EventKind::Unacknowledged => kind::UNACKNOWLEDGED,
            EventKind::Snoozed { .. } => kind::SNOOZED,
            EventKind::SnoozeEnded => kind::SNOOZE_ENDED,
            EventKind::Escalated { .. } => kind::ESCALATED,
            EventKind::Assigned { .. } => kind::ASSIGNED,
            EventKind::NoteAdded { .. } => kind::NOTE_ADDED,
            EventKind::Remediation { .. } => kind::REMEDIATION,
            EventKind::Resolved { .. } => kind::RESOLVED,
            EventKind::Reopened => kind::REOPENED,
            EventKind::Paged { .. } => kind::PAGED,
            EventKind::Delivery { .. } => kind::DELIVERY,
            EventKind::Runbook { .. } => kind::RUNBOOK,
        }
    }
}

/// The names of incident event kinds: the last token of an incident event's
/// subject ([`crate::subjects::incident_subject`]) and [`EventKind::name`].
pub mod kind {
    pub const OPENED: &str = "opened";
    pub const ALERT_FIRING: &str = "alert_firing";
    pub const ALERT_RESOLVED: &str = "alert_resolved";
    pub const ACKNOWLEDGED: &str = "acknowledged";
    pub const UNACKNOWLEDGED: &str = "unacknowledged";
    pub const SNOOZED: &str = "snoozed";
    pub const SNOOZE_ENDED: &str = "snooze_ended";
    pub const ESCALATED: &str = "escalated";
    pub const ASSIGNED: &str = "assigned";
    pub const NOTE_ADDED: &str = "note_added";
    pub const REMEDIATION: &str = "remediation";
    pub const RESOLVED: &str = "resolved";
    pub const REOPENED: &str = "reopened";
    pub const PAGED: &str = "paged";
    pub const DELIVERY: &str = "delivery";
    pub const RUNBOOK: &str = "runbook";
}

/// One entry of an incident's timeline.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IncidentEvent {
    pub kind: EventKind,
    pub at: Timestamp,
    #[serde(default)]
    pub actor: Option<Actor>,
    pub cause: Cause,
    /// The incident after this event.
    pub incident: IncidentSummary,
}

/// A change to the set of silences.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum SilenceChange {
    Created { silence: Silence },
    Expired { id: String },
}

/// One record of the INCIDENTS stream.
// Built and read one at a time: boxing the event would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "entry", rename_all = "snake_case")]
pub enum LogEntry {
    Incident(IncidentEvent),
    Silence {
        change: SilenceChange,
        at: Timestamp,
        actor: Actor,
        cause: Cause,
    },
}

impl LogEntry {
    pub fn cause(&self) -> &Cause {
        match self {
            LogEntry::Incident(e) => &e.cause,
            LogEntry::Silence { cause, .. } => cause,
        }
    }

    /// Whether the incidents service stores this entry with others of a
    /// batch in one message on [`crate::subjects::INCIDENTS_BATCH`]: the
    /// receipts (`paged`, `delivery`), which change nothing of the incident
    /// but its timeline, and the alert changes of an incident already open
    /// (`alert_firing`, `alert_resolved`), of which a storm brings many,
    /// unless the incident is suppressed after it (every firing alert
    /// silenced or inhibited: it pages nobody). Every other entry (an
    /// opening, a change of status, a note, a suppression) has a message
    /// of its own on [`LogEntry::subject`]. So the last message of an
    /// incident's subjects tells whether it pages anyone as it stands (its
    /// status, and whether it is suppressed, unless an alert change since
    /// ended that), but its alert counts, severity and common labels may
    /// have moved on since in a packed entry: [`IncidentSummary::revision`]
    /// says which of two copies is the newer.
    pub fn is_packed(&self) -> bool {
        match self {
            LogEntry::Incident(e) if e.kind.is_receipt() => true,
            LogEntry::Incident(IncidentEvent {
                kind: EventKind::AlertFiring { .. } | EventKind::AlertResolved { .. },
                incident,
                ..
            }) => incident.suppressed.is_none(),
            _ => false,
        }
    }

    /// Whether this entry is a receipt (`paged`, `delivery`): it changes
    /// nothing of its incident but the timeline, and so not its
    /// [`IncidentSummary::revision`].
    pub fn is_receipt(&self) -> bool {
        matches!(self, LogEntry::Incident(e) if e.kind.is_receipt())
    }

    /// The incident this entry is about (None for a silence's).
    pub fn incident_id(&self) -> Option<uuid::Uuid> {
        match self {
            LogEntry::Incident(e) => Some(e.incident.id),
            LogEntry::Silence { .. } => None,
        }
    }

    /// The subject this entry is published on.
    pub fn subject(&self) -> String {
        match self {
            LogEntry::Incident(e) => {
                crate::subjects::incident_subject(&e.incident.id, e.kind.name())
            }
            LogEntry::Silence { change, .. } => match change {
                SilenceChange::Created { silence } => {
                    crate::subjects::silence_subject(&silence.id, "created")
                }
                SilenceChange::Expired { id } => crate::subjects::silence_subject(id, "expired"),
            },
        }
    }

    /// The `Nats-Msg-Id`: cause + what + which. One input never yields two
    /// entries with the same kind for the same incident (or silence), so a
    /// re-decided input after a crash maps to the same ids.
    pub fn msg_id(&self) -> String {
        match self {
            LogEntry::Incident(e) => {
                let extra = match &e.kind {
                    // A run's entry: its last alert's, as its cause is.
                    EventKind::AlertFiring { alert, more } => {
                        format!(":{}", more.last().unwrap_or(alert).fingerprint)
                    }
                    EventKind::AlertResolved {
                        fingerprint, more, ..
                    } => format!(":{}", more.last().map_or(fingerprint, |r| &r.fingerprint)),
                    EventKind::Delivery { delivery } => format!(":{}", delivery.id),
                    _ => String::new(),
                };
                format!(
                    "inc:{}:{}:{}{}",
                    e.cause.key(),
                    e.kind.name(),
                    e.incident.id,
                    extra
                )
            }
            LogEntry::Silence { change, cause, .. } => match change {
                SilenceChange::Created { silence } => {
                    format!("sil:{}:created:{}", cause.key(), silence.id)
                }
                SilenceChange::Expired { id } => format!("sil:{}:expired:{id}", cause.key()),
            },
        }
    }
}

#[cfg(test)]
mod run_id_tests {
    use super::run_incident;

    #[test]
    fn a_run_id_names_its_incident_whether_its_entry_was_stored_alone_or_with_others() {
        let id = uuid::Uuid::from_u128(7);
        let alone = format!("{}.restart-api.42", id.simple());
        let packed = format!("{}.restart-api.42.3", id.simple());
        assert_eq!(run_incident(&alone), Some(id));
        assert_eq!(
            run_incident(&packed),
            Some(id),
            "started by a batched entry"
        );
        for bad in [
            format!("{}..42", id.simple()),
            format!("{}.r.x", id.simple()),
            format!("{}.r.42.x", id.simple()),
            format!("{}.r.42.3.1", id.simple()),
            "nope.r.42".to_string(),
        ] {
            assert_eq!(run_incident(&bad), None, "{bad}");
        }
    }
}
