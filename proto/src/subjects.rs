//! Stream names, subjects and header names.
//!
//! Subjects are hierarchical so consumers can filter: `tocsin.alerts.<kind>.<fingerprint>`.
//! Every token placed in a subject is checked with [`is_valid_token`] first.

use crate::{alert::SourceKind, fingerprint::Fingerprint};

/// Normalized alert events from ingest.
pub const STREAM_ALERTS: &str = "ALERTS";
/// The incident event log: the source of truth for every timeline.
pub const STREAM_INCIDENTS: &str = "INCIDENTS";
/// Commands to the incidents service (ack, resolve, ...). Work queue.
pub const STREAM_COMMANDS: &str = "COMMANDS";
/// Pages to deliver: one a message, or several for one channel from an
/// escalation burst. Work queue.
pub const STREAM_NOTIFY: &str = "NOTIFY";
/// Messages no service could decode, with the reason, kept for inspection.
pub const STREAM_DEADLETTER: &str = "DEADLETTER";

pub const ALERTS_SUBJECTS: &str = "tocsin.alerts.>";
pub const INCIDENTS_SUBJECTS: &str = "tocsin.incidents.>";
pub const COMMANDS_SUBJECTS: &str = "tocsin.cmd.>";
pub const NOTIFY_SUBJECTS: &str = "tocsin.notify.>";
pub const DEADLETTER_SUBJECTS: &str = "tocsin.dlq.>";

/// How a stream keeps its messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retention {
    /// Kept until they age out (by the stream's max age).
    Limits,
    /// Removed once a consumer acknowledged them.
    WorkQueue,
}

/// One stream of the bus, as the runtime creates it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamDef {
    pub name: &'static str,
    pub subjects: &'static str,
    pub retention: Retention,
    pub description: &'static str,
}

/// Every stream Tocsin uses. The runtime creates or updates all of them at
/// start-up, idempotently.
pub const STREAMS: [StreamDef; 5] = [
    StreamDef {
        name: STREAM_ALERTS,
        subjects: ALERTS_SUBJECTS,
        retention: Retention::Limits,
        description: "Tocsin: normalized alert events from ingest",
    },
    StreamDef {
        name: STREAM_INCIDENTS,
        subjects: INCIDENTS_SUBJECTS,
        retention: Retention::Limits,
        description: "Tocsin: incident event log (source of truth for timelines)",
    },
    StreamDef {
        name: STREAM_COMMANDS,
        subjects: COMMANDS_SUBJECTS,
        retention: Retention::WorkQueue,
        description: "Tocsin: commands to the incidents service",
    },
    StreamDef {
        name: STREAM_NOTIFY,
        subjects: NOTIFY_SUBJECTS,
        retention: Retention::WorkQueue,
        description: "Tocsin: notifications to deliver",
    },
    StreamDef {
        name: STREAM_DEADLETTER,
        subjects: DEADLETTER_SUBJECTS,
        retention: Retention::Limits,
        description: "Tocsin: undecodable or undeliverable messages with the reason",
    },
];

/// NATS header names Tocsin sets.
pub mod headers {
    /// JetStream de-duplication id; derived from what the message means.
    pub const MSG_ID: &str = "Nats-Msg-Id";
    /// W3C trace context, so one incident can be followed through every service.
    pub const TRACEPARENT: &str = "traceparent";
    /// Schema version of the payload, readable without decoding it.
    pub const SCHEMA: &str = "Tocsin-Schema";
    /// On dead-lettered messages: why it was dead-lettered.
    pub const DLQ_REASON: &str = "Tocsin-Dlq-Reason";
    /// On dead-lettered messages: the subject it originally had.
    pub const DLQ_SUBJECT: &str = "Tocsin-Dlq-Subject";
    /// On commands: where to publish the [`crate::command::CommandReply`].
    pub const REPLY_TO: &str = "Tocsin-Reply-To";
    /// On a COMMANDS message of several commands: how many it holds, so the
    /// incidents service can give alerts their turns by command, not by
    /// message, without decoding it first (a hint for scheduling only).
    pub const ITEMS: &str = "Tocsin-Items";
}

/// Subject of an alert event: `tocsin.alerts.<kind>.<fingerprint>`.
pub fn alert_subject(kind: SourceKind, fingerprint: &Fingerprint) -> String {
    format!("tocsin.alerts.{}.{}", kind.as_str(), fingerprint)
}

/// Last token of [`alert_batch_subject`].
pub const ALERT_BATCH: &str = "batch";

/// Subject of a message holding several alerts of one request (an
/// `Envelope<Vec<Alert>>`, in the order the request gave them):
/// `tocsin.alerts.<kind>.batch`. A fingerprint is 16 hex digits, so no
/// alert's subject ends in `batch`. Ingest stores a request of several
/// alerts this way so that JetStream syncs one message for all of them.
pub fn alert_batch_subject(kind: SourceKind) -> String {
    format!("tocsin.alerts.{}.{ALERT_BATCH}", kind.as_str())
}

/// Last token of [`alert_pack_subject`].
pub const ALERT_PACK: &str = "packed";

/// Subject of a message holding the alerts of several requests (a
/// `Vec<Envelope<Vec<Alert>>>`, one envelope per request, in the order
/// ingest took them): `tocsin.alerts.<kind>.packed`. Ingest stores small
/// requests that arrive while its earlier messages wait for JetStream's
/// acknowledgement this way, so that one sync serves them all. No
/// fingerprint (16 hex digits) is `packed`.
pub fn alert_pack_subject(kind: SourceKind) -> String {
    format!("tocsin.alerts.{}.{ALERT_PACK}", kind.as_str())
}

/// Whether an ALERTS message holds several alerts ([`alert_batch_subject`]
/// or [`alert_pack_subject`]).
pub fn is_alert_batch(subject: &str) -> bool {
    subject
        .rsplit('.')
        .next()
        .is_some_and(|last| last == ALERT_BATCH || last == ALERT_PACK)
}

/// Whether an ALERTS message holds several requests' alerts
/// ([`alert_pack_subject`]).
pub fn is_alert_pack(subject: &str) -> bool {
    subject
        .rsplit('.')
        .next()
        .is_some_and(|last| last == ALERT_PACK)
}

/// Subject of an incident event: `tocsin.incidents.inc.<id>.<kind>`.
pub fn incident_subject(id: &uuid::Uuid, kind: &str) -> String {
    format!("tocsin.incidents.inc.{}.{kind}", id.simple())
}

/// Subject of a message holding several incident entries (an
/// `Envelope<Vec<LogEntry>>`, in the order they were decided): the
/// receipts (`paged`, `delivery`) and alert changes (`alert_firing`,
/// `alert_resolved`) of one batch of inputs, which the incidents service
/// stores together so that JetStream syncs one message for all of them
/// ([`crate::incident::LogEntry::is_packed`]). Not under
/// `tocsin.incidents.inc.`: filters by incident or by kind do not take it;
/// readers of those kinds add it to their filter and split it
/// ([`crate::codec::decode_entries`]).
pub const INCIDENTS_BATCH: &str = "tocsin.incidents.batch";

/// Whether an INCIDENTS message holds several entries ([`INCIDENTS_BATCH`]).
pub fn is_incidents_batch(subject: &str) -> bool {
    subject == INCIDENTS_BATCH
}

/// Subject of a silence change: `tocsin.incidents.silence.<id>.<kind>`.
/// Silence ids are generated as UUIDs (simple form) and checked with
/// [`is_valid_token`] when created.
pub fn silence_subject(id: &str, kind: &str) -> String {
    format!("tocsin.incidents.silence.{id}.{kind}")
}

/// Filter for every incident event.
pub const INCIDENT_EVENTS: &str = "tocsin.incidents.inc.>";

/// The tenure markers of the incidents service's lease, in the INCIDENTS
/// stream: one message each time an instance becomes active, and every
/// entry it then writes is accepted only while its marker is the last one
/// (a fence the server enforces; see `tocsin_runtime::fence`). Not an
/// entry: readers of the whole stream skip it ([`is_tenure_marker`]).
pub const INCIDENTS_TENURE: &str = "tocsin.incidents.tenure";

/// The tenure markers of the escalation service's lease, in the NOTIFY
/// stream: every page an escalation instance sends is accepted only while
/// its tenure's marker is the last one here. No notifier consumer's filter
/// takes it (they filter by channel), so it stays in the work queue.
pub const NOTIFY_TENURE: &str = "tocsin.notify.tenure";

/// Whether a message on `subject` is a lease tenure marker, not an entry
/// or a page.
pub fn is_tenure_marker(subject: &str) -> bool {
    subject == INCIDENTS_TENURE || subject == NOTIFY_TENURE
}

/// Filter for every event of one incident: `tocsin.incidents.inc.<id>.>`.
pub fn incident_events_of(id: &uuid::Uuid) -> String {
    format!("tocsin.incidents.inc.{}.>", id.simple())
}

/// Filter for one kind of event of every incident:
/// `tocsin.incidents.inc.*.<kind>` (kind as [`incident_subject`] names it).
pub fn incident_events_kind(kind: &str) -> String {
    format!("tocsin.incidents.inc.*.{kind}")
}

/// Subject of the pages for one channel: `tocsin.notify.<channel>`.
pub fn notify_subject(channel: &str) -> String {
    format!("tocsin.notify.{channel}")
}

/// Subject of a message holding several pages for one channel (an
/// `Envelope<Vec<Page>>`, escalation's pages of one burst):
/// `tocsin.notify.<channel>.batch`.
pub fn notify_batch_subject(channel: &str) -> String {
    format!("tocsin.notify.{channel}.batch")
}

/// Whether a NOTIFY message holds several pages ([`notify_batch_subject`]).
pub fn is_notify_batch(subject: &str) -> bool {
    subject.starts_with("tocsin.notify.") && subject.ends_with(".batch")
}

/// Request/reply subjects served by the incidents and escalation services
/// (core NATS, not stored: a query has no effect to keep).
pub mod query {
    /// Get one incident with its timeline.
    pub const GET_INCIDENT: &str = "tocsin.query.incidents.get";
    /// List incidents by filter.
    pub const LIST_INCIDENTS: &str = "tocsin.query.incidents.list";
    /// List silences.
    pub const LIST_SILENCES: &str = "tocsin.query.silences.list";
    /// Who is on call for a schedule ([`crate::query::OnCallQuery`]).
    pub const ESCALATION_ONCALL: &str = "tocsin.query.escalation.oncall";
    /// An incident's escalation state and upcoming levels
    /// ([`crate::query::PlanQuery`]).
    pub const ESCALATION_PLAN: &str = "tocsin.query.escalation.plan";
    /// The schedules defined ([`crate::query::ListSchedules`]).
    pub const ESCALATION_SCHEDULES: &str = "tocsin.query.escalation.schedules";
    /// MTTA, MTTR and on-call load over a window, answered by chat-ops
    /// ([`crate::query::ReportQuery`]).
    pub const REPORT: &str = "tocsin.query.report";
}

/// Subject of a dead-lettered message from `stream`: `tocsin.dlq.<stream>`.
pub fn dead_letter_subject(stream: &str) -> String {
    format!("tocsin.dlq.{}", stream.to_ascii_lowercase())
}

/// Whether `s` may be used as one token of a subject: non-empty, at most 64
/// bytes, and only ASCII letters, digits, `-` and `_` (no `.`, `*`, `>` or
/// white space, which NATS gives meaning to).
pub fn is_valid_token(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_name_the_subjects_they_select() {
        let id = uuid::Uuid::from_u128(0xabc);
        let subject = incident_subject(&id, "opened");
        assert_eq!(
            subject,
            "tocsin.incidents.inc.00000000000000000000000000000abc.opened"
        );
        assert_eq!(
            incident_events_of(&id),
            "tocsin.incidents.inc.00000000000000000000000000000abc.>"
        );
        assert_eq!(
            incident_events_kind("opened"),
            "tocsin.incidents.inc.*.opened"
        );
        assert_eq!(notify_subject("sms"), "tocsin.notify.sms");
        assert_eq!(notify_batch_subject("sms"), "tocsin.notify.sms.batch");
        assert!(is_notify_batch(&notify_batch_subject("slack")));
        assert!(!is_notify_batch(&notify_subject("slack")));
        assert!(!is_notify_batch("tocsin.cmd.paged.batch"));
    }

    #[test]
    fn alert_subject_is_hierarchical() {
        let fp = Fingerprint::parse("6a4f37c34a2d1e4b").unwrap();
        assert_eq!(
            alert_subject(SourceKind::Alertmanager, &fp),
            "tocsin.alerts.alertmanager.6a4f37c34a2d1e4b"
        );
        assert_eq!(dead_letter_subject("ALERTS"), "tocsin.dlq.alerts");
        let batch = alert_batch_subject(SourceKind::Alertmanager);
        assert_eq!(batch, "tocsin.alerts.alertmanager.batch");
        assert!(is_alert_batch(&batch));
        assert!(!is_alert_pack(&batch));
        let pack = alert_pack_subject(SourceKind::Alertmanager);
        assert_eq!(pack, "tocsin.alerts.alertmanager.packed");
        assert!(is_alert_batch(&pack) && is_alert_pack(&pack));
        assert!(!is_alert_batch(&alert_subject(
            SourceKind::Alertmanager,
            &fp
        )));
    }

    #[test]
    fn tokens() {
        for ok in ["a", "prod-am", "grafana_1"] {
            assert!(is_valid_token(ok), "{ok}");
        }
        for bad in ["", "a.b", "a b", "*", ">", "é", &"x".repeat(65)] {
            assert!(!is_valid_token(bad), "{bad}");
        }
    }

    #[test]
    fn every_stream_subject_is_under_tocsin() {
        for s in STREAMS {
            assert!(s.subjects.starts_with("tocsin.") && s.subjects.ends_with(".>"));
        }
    }
}
