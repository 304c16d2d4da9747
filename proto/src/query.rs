//! Queries served over NATS request/reply by the incidents service (incidents,
//! silences) and the escalation service (on call, escalation plans).

use jiff::Timestamp;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::{
    command::IncidentRef,
    incident::{AlertInfo, IncidentEvent, IncidentStatus, IncidentSummary, Severity},
    silence::{Matcher, Silence},
};

/// `tocsin.query.incidents.get`
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GetIncident {
    pub incident: IncidentRef,
    /// Include the timeline (read from the INCIDENTS stream). Default true.
    #[serde(default = "yes")]
    pub timeline: bool,
}

fn yes() -> bool {
    true
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IncidentDetail {
    pub incident: IncidentSummary,
    /// The incident's alerts, the firing ones first; as many as fit in one
    /// answer (`alerts_omitted` says how many more there are).
    pub alerts: Vec<AlertInfo>,
    /// The timeline, oldest first; the newest entries that fit in one
    /// answer (`timeline_omitted` says how many older ones are left out).
    #[serde(default)]
    pub timeline: Vec<IncidentEvent>,
    /// Alerts not listed: the answer would not fit in one NATS message.
    #[serde(default)]
    pub alerts_omitted: u32,
    /// Older timeline entries not listed, for the same reason.
    #[serde(default)]
    pub timeline_omitted: u32,
}

/// `tocsin.query.incidents.list`; every filter is optional.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListIncidents {
    #[serde(default)]
    pub status: Vec<IncidentStatus>,
    /// At least this severe.
    #[serde(default)]
    pub min_severity: Option<Severity>,
    /// Every matcher must match the incident's common labels.
    #[serde(default)]
    pub matchers: Vec<Matcher>,
    /// Opened at or after.
    #[serde(default)]
    pub since: Option<Timestamp>,
    /// Most recent first; default 100, at most 1000.
    #[serde(default)]
    pub limit: Option<usize>,
    /// Only incidents numbered below this: the cursor of the next page
    /// (the last number of the page before, or the `next_before` of an
    /// answer that stopped early).
    #[serde(default)]
    pub before: Option<u64>,
}

impl ListIncidents {
    /// How many incidents one answer holds at most: `limit`, 100 when
    /// unset, never more than 1,000.
    pub fn wanted(&self) -> usize {
        self.limit.unwrap_or(100).min(1000)
    }

    /// Walking a whole list page by page: after an answer with `page` that
    /// stopped at `next_before`, whether there is more, and if so this query
    /// now asks for the next page (from where the answer stopped, or below
    /// the last incident of a full page).
    pub fn walk_on(&mut self, page: &[IncidentSummary], next_before: Option<u64>) -> bool {
        let next = next_before.or_else(|| {
            (page.len() >= self.wanted())
                .then(|| page.last().map(|i| i.number))
                .flatten()
        });
        self.before = next;
        next.is_some()
    }

    /// After an answer that stopped at `next_before` (see
    /// [`QueryReply::Incidents`]) with `have` of the `want` incidents
    /// gathered so far: whether to ask again, and if so this query now asks
    /// for the rest from where that answer stopped.
    pub fn go_on(&mut self, want: usize, have: usize, next_before: Option<u64>) -> bool {
        match next_before {
            Some(before) if have < want => {
                self.before = Some(before);
                self.limit = Some(want - have);
                true
            }
            _ => false,
        }
    }
}

/// An answer to any query.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum QueryReply {
    Incident(Box<IncidentDetail>),
    /// Newest first. `next_before`: the list stopped at this number
    /// because it had read as many incidents out of the service's memory
    /// as one answer may (`incidents.list_max_reads`) before the page was
    /// full; those numbered below it were not looked at: ask again with
    /// `before` set to it. None when the list went as far as it needed.
    Incidents {
        incidents: Vec<IncidentSummary>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        next_before: Option<u64>,
    },
    /// Every silence in id order, as many as fit in one answer, and how
    /// many more there are.
    Silences {
        silences: Vec<Silence>,
        #[serde(default)]
        omitted: u32,
    },
    Error {
        reason: String,
    },
}

// ---------------------------------------------------------------------------
// Escalation queries
// ---------------------------------------------------------------------------

/// `tocsin.query.escalation.oncall`: who is on call for a schedule.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OnCallQuery {
    pub schedule: String,
    /// The instant to ask about. Default: now (the escalation service's clock).
    #[serde(default)]
    pub at: Option<Timestamp>,
}

/// One stretch of a schedule's timeline: `user` is on call from `start`
/// (inclusive) to `end` (exclusive).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShiftView {
    pub user: String,
    pub start: Timestamp,
    pub end: Timestamp,
}

/// Who is on call for a schedule at an instant. Also the JSON body of the
/// escalation service's `GET /oncall/<schedule>`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OnCallView {
    pub schedule: String,
    pub at: Timestamp,
    /// `None` when nobody is on call at `at`.
    #[serde(default)]
    pub user: Option<String>,
    /// The layer that decided; `None` when an override decided (or nobody
    /// is on call).
    #[serde(default)]
    pub layer: Option<String>,
    /// When the deciding layer's shift (or the override) took over.
    #[serde(default)]
    pub shift_start: Option<Timestamp>,
    /// When this answer (user and layer) next changes.
    #[serde(default)]
    pub shift_end: Option<Timestamp>,
    /// The next few shifts starting after `at`, earliest first.
    #[serde(default)]
    pub next: Vec<ShiftView>,
    /// The schedule's IANA timezone (its handoffs are local times there).
    #[serde(default)]
    pub timezone: Option<String>,
}

/// The answer to an [`OnCallQuery`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum OnCallReply {
    OnCall(Box<OnCallView>),
    /// E.g. an unknown schedule (the reason lists the defined ones).
    Error {
        reason: String,
    },
}

/// `tocsin.query.escalation.plan`: where an incident's escalation stands and
/// what comes next.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlanQuery {
    pub incident: Uuid,
}

/// The state of one incident's escalation under one policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TrackStatus {
    /// A level is due at `next_at`.
    Pending,
    /// Acknowledged or snoozed: nothing fires until that ends.
    Paused,
    /// Every level and repeat has fired; nobody acknowledged.
    Exhausted,
}

/// A level that will fire if nobody acknowledges, as projected from the
/// current state with the schedules resolved at `at`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpcomingStep {
    pub level: u32,
    /// The round, 0 for the first run through the levels.
    pub repeat: u32,
    pub at: Timestamp,
    /// Who it pages, as on the timeline: `alice (on call for primary) via
    /// sms`, `alice via sms after 300s`.
    #[serde(default)]
    pub pages: Vec<String>,
    /// Set when the level would page nobody, and why; if the policy skips
    /// empty levels, the next step follows at once.
    #[serde(default)]
    pub empty: Option<String>,
}

/// One incident's escalation under one policy.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrackView {
    pub policy: String,
    pub status: TrackStatus,
    /// The level that fires next (or would, once resumed), in round `repeat`.
    pub next_level: u32,
    pub repeat: u32,
    /// When `next_level` fires; `None` unless pending.
    #[serde(default)]
    pub next_at: Option<Timestamp>,
    /// The levels still to come, this round and the next if the policy
    /// repeats; capped at 20. Empty unless pending.
    #[serde(default)]
    pub upcoming: Vec<UpcomingStep>,
}

/// The answer to a [`PlanQuery`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum PlanReply {
    Plan {
        incident: Uuid,
        /// One per policy the incident follows (usually one).
        tracks: Vec<TrackView>,
    },
    /// E.g. the incident is not escalating (unknown, resolved, suppressed).
    Error { reason: String },
}

/// `tocsin.query.escalation.schedules`: the schedules defined. The request
/// payload is ignored (send an empty map).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListSchedules {}

/// The answer to [`ListSchedules`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScheduleList {
    /// Schedule names, sorted.
    pub schedules: Vec<String>,
}

// ---------------------------------------------------------------------------
// Report (answered by the chat-ops service)
// ---------------------------------------------------------------------------

/// `tocsin.query.report`: incident figures over the last `since_seconds`
/// (up to the answering service's clock).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReportQuery {
    pub since_seconds: u64,
}

/// The answer to a [`ReportQuery`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum ReportReply {
    Report(Box<Report>),
    Error { reason: String },
}

/// Mean, median and 90th percentile of durations, in whole seconds
/// (`None` when nothing was measured).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DurationStats {
    /// How many durations were measured.
    pub count: u64,
    pub mean_seconds: Option<u64>,
    pub p50_seconds: Option<u64>,
    pub p90_seconds: Option<u64>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SeverityCount {
    pub severity: Severity,
    pub incidents: u64,
}

/// MTTA and MTTR of the incidents with one `service` label value
/// (`(none)` for incidents without one).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceFigures {
    pub service: String,
    pub incidents: u64,
    pub mtta: DurationStats,
    pub mttr: DurationStats,
}

/// An alert name and how much it fired.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AlertCount {
    pub alertname: String,
    /// Incidents it opened or joined.
    pub incidents: u64,
    /// Alerts of that name attached to them.
    pub alerts: u64,
}

/// Pages one person received.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PersonLoad {
    pub user: String,
    pub pages: u64,
    /// Distinct nights with at least one page in the night hours.
    pub nights_woken: u64,
}

/// Incident figures over a window: incidents opened in `[since, until]`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    pub since: Timestamp,
    pub until: Timestamp,
    pub incidents: u64,
    /// More incidents were opened than the report looks at; it covers the newest.
    #[serde(default)]
    pub truncated: bool,
    pub by_severity: Vec<SeverityCount>,
    /// Time to acknowledge: from opened to the first acknowledgement.
    pub mtta: DurationStats,
    /// Time to resolve: from opened to the first resolution.
    pub mttr: DurationStats,
    pub by_service: Vec<ServiceFigures>,
    pub resolved: u64,
    /// Of the resolved, those a runbook resolved.
    pub resolved_by_runbook: u64,
    /// `resolved_by_runbook / resolved`, in thousandths (0 when none resolved).
    pub runbook_share_permille: u64,
    pub noisiest_alerts: Vec<AlertCount>,
    pub oncall_load: Vec<PersonLoad>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{decode, encode};

    #[test]
    fn a_list_goes_on_from_where_an_answer_stopped_until_it_has_enough() {
        let mut q = ListIncidents {
            limit: Some(10),
            ..Default::default()
        };
        assert!(q.go_on(10, 3, Some(40)), "stopped short: ask again");
        assert_eq!((q.before, q.limit), (Some(40), Some(7)));
        assert!(!q.go_on(10, 10, Some(20)), "enough");
        assert!(!q.go_on(10, 4, None), "the list ended");
        let at: Timestamp = "2026-03-02T07:50:00Z".parse().unwrap();
        let numbered = |n: u64| IncidentSummary::new(uuid::Uuid::nil(), n, "k", "t", at);
        let mut walk = ListIncidents {
            limit: Some(2),
            ..Default::default()
        };
        assert!(
            walk.walk_on(&[numbered(9), numbered(8)], None),
            "a full page"
        );
        assert_eq!(walk.before, Some(8));
        assert!(walk.walk_on(&[], Some(5)), "cut short, even empty");
        assert_eq!(walk.before, Some(5));
        assert!(
            !walk.walk_on(&[numbered(3)], None),
            "a short page is the last"
        );
        // An older answer without the field decodes as "went as far as it needed".
        #[derive(Serialize)]
        #[serde(tag = "result", rename_all = "snake_case")]
        enum Old {
            Incidents { incidents: Vec<IncidentSummary> },
        }
        let old = encode(&Old::Incidents { incidents: vec![] }).unwrap();
        assert_eq!(
            decode::<QueryReply>(&old).unwrap(),
            QueryReply::Incidents {
                incidents: vec![],
                next_before: None
            }
        );
    }

    #[test]
    fn escalation_queries_round_trip() {
        let at: Timestamp = "2026-03-02T07:50:00Z".parse().unwrap();
        let on_call = OnCallReply::OnCall(Box::new(OnCallView {
            schedule: "primary".into(),
            at,
            user: Some("alice".into()),
            layer: Some("weekly".into()),
            shift_start: Some(at),
            shift_end: Some(at),
            next: vec![ShiftView {
                user: "bob".into(),
                start: at,
                end: at,
            }],
            timezone: Some("Europe/Berlin".into()),
        }));
        assert_eq!(
            decode::<OnCallReply>(&encode(&on_call).unwrap()).unwrap(),
            on_call
        );
        let plan = PlanReply::Plan {
            incident: Uuid::nil(),
            tracks: vec![TrackView {
                policy: "default".into(),
                status: TrackStatus::Pending,
                next_level: 1,
                repeat: 0,
                next_at: Some(at),
                upcoming: vec![UpcomingStep {
                    level: 1,
                    repeat: 0,
                    at,
                    pages: vec!["bob via sms".into()],
                    empty: None,
                }],
            }],
        };
        assert_eq!(decode::<PlanReply>(&encode(&plan).unwrap()).unwrap(), plan);
        // The request is an empty map.
        assert_eq!(
            decode::<ListSchedules>(&encode(&ListSchedules {}).unwrap()).unwrap(),
            ListSchedules {}
        );
    }

    /// Pins the encoding: if this fails, the wire format changed.
    #[test]
    fn on_call_query_golden_bytes() {
        let q = OnCallQuery {
            schedule: "p".into(),
            at: None,
        };
        // {"schedule": "p", "at": nil}
        assert_eq!(
            encode(&q).unwrap(),
            [
                0x82, 0xa8, b's', b'c', b'h', b'e', b'd', b'u', b'l', b'e', 0xa1, b'p', 0xa2, b'a',
                b't', 0xc0
            ]
        );
        // A query without `at` asks about now.
        let short = [
            0x81, 0xa8, b's', b'c', b'h', b'e', b'd', b'u', b'l', b'e', 0xa1, b'p',
        ];
        assert_eq!(decode::<OnCallQuery>(&short).unwrap(), q);
        let reply = OnCallReply::Error { reason: "x".into() };
        // {"result": "error", "reason": "x"}
        let mut expected = vec![0x82, 0xa6];
        expected.extend_from_slice(b"result");
        expected.push(0xa5);
        expected.extend_from_slice(b"error");
        expected.push(0xa6);
        expected.extend_from_slice(b"reason");
        expected.extend_from_slice(&[0xa1, b'x']);
        assert_eq!(encode(&reply).unwrap(), expected);
    }
}
