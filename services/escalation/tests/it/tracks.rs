//! The escalation state machine without IO: empty levels skipped at once,
//! out-of-hours levels, repeats, pending rule steps cancelled by an ack.

use jiff::{SignedDuration, Timestamp};
use tocsin_escalation::{
    config::EscalationConfig,
    plan::Planner,
    track::{Effect, Tracks},
};
use tocsin_proto::{
    incident::{Cause, EventKind, IncidentEvent, IncidentStatus, IncidentSummary, Severity},
    notify::Page,
    AlertStatus, Fingerprint, Labels,
};

const CONFIG: &str = r##"
route: {policy: p}
policies:
  - name: p
    repeat: 1
    levels:
      - targets: [{schedule: empty}]
        delay: 10m
      - targets: [{user: day}]
        delay: 10m
        active: {weekdays: [mon, tue, wed, thu, fri], start: "09:00", end: "17:00", timezone: UTC}
      - targets: [{user: pager}]
        delay: 20m
schedules:
  - {name: empty, timezone: UTC}
users:
  - {name: day, email: day@example.com}
  - name: pager
    email: pager@example.com
    phone: "+15555550100"
    rules:
      critical: [{channels: [sms]}, {channels: [email], after: 5m}]
"##;

fn at(s: &str) -> Timestamp {
    s.parse().unwrap()
}

fn event(kind: EventKind, status: IncidentStatus, t: Timestamp) -> IncidentEvent {
    let labels = Labels::from([("alertname".to_string(), "X".to_string())]);
    IncidentEvent {
        kind,
        at: t,
        actor: None,
        cause: Cause::Timer { id: "t".into() },
        incident: IncidentSummary {
            severity: Severity::Critical,
            status,
            labels,
            alerts_firing: 1,
            alerts_total: 1,
            ..IncidentSummary::new(uuid::Uuid::from_u128(7), 7, "k", "x", t)
        },
    }
}

fn opened(t: Timestamp) -> IncidentEvent {
    let labels = Labels::from([("alertname".to_string(), "X".to_string())]);
    event(
        EventKind::Opened {
            alert: tocsin_proto::incident::AlertInfo {
                fingerprint: Fingerprint::from_labels(&labels),
                status: AlertStatus::Firing,
                labels,
                annotations: Labels::new(),
                starts_at: t,
                ends_at: None,
                generator_url: None,
                suppressed: None,
            },
        },
        IncidentStatus::Triggered,
        t,
    )
}

/// Fires everything due up to `until`, minute by minute; returns
/// (minute offset from `start`, "level/target/channel") per page.
fn run(
    planner: &Planner,
    tracks: &mut Tracks,
    start: Timestamp,
    minutes: i64,
) -> Vec<(i64, String)> {
    let mut out = Vec::new();
    for m in 0..=minutes {
        let now = start + SignedDuration::from_mins(m);
        for key in tracks.due(now) {
            for e in tracks.fire(planner, &key, now) {
                if let Effect::Page(p) = e {
                    let Page {
                        level,
                        target,
                        channel,
                        ..
                    } = *p;
                    out.push((m, format!("{level}/{}/{}", target.key(), channel.as_str())));
                }
            }
        }
    }
    out
}

#[test]
fn empty_levels_are_skipped_at_once_and_out_of_hours_levels_too() {
    let planner =
        Planner::new(&serde_yaml_ng::from_str::<EscalationConfig>(CONFIG).unwrap()).unwrap();
    // Wednesday 10:00 UTC: the empty schedule is skipped at once, so the
    // day user (in hours) is paged at minute 0, the pager at minute 10.
    let start = at("2026-01-07T10:00:00Z");
    let mut tracks = Tracks::default();
    tracks.on_event(&planner, &opened(start));
    let pages = run(&planner, &mut tracks, start, 70);
    let expected: Vec<(i64, String)> = vec![
        (0, "1/user:day/email".into()),
        (10, "2/user:pager/sms".into()),
        (15, "2/user:pager/email".into()), // the pager's rule: email after 5m
        // repeat round: empty skipped again, day at 30, pager at 40 (+5).
        (30, "1/user:day/email".into()),
        (40, "2/user:pager/sms".into()),
        (45, "2/user:pager/email".into()),
    ];
    assert_eq!(pages, expected);
    assert!(tracks.next_due().is_none(), "exhausted after the repeat");

    // Saturday: the day level is out of hours too, so the pager at once.
    let saturday = at("2026-01-10T10:00:00Z");
    let mut tracks = Tracks::default();
    tracks.on_event(&planner, &opened(saturday));
    let pages = run(&planner, &mut tracks, saturday, 3);
    assert_eq!(pages[0], (0, "2/user:pager/sms".to_string()));
}

#[test]
fn an_ack_cancels_pending_rule_steps_and_levels() {
    let planner =
        Planner::new(&serde_yaml_ng::from_str::<EscalationConfig>(CONFIG).unwrap()).unwrap();
    let start = at("2026-01-10T10:00:00Z"); // Saturday: straight to the pager
    let mut tracks = Tracks::default();
    tracks.on_event(&planner, &opened(start));
    let first = run(&planner, &mut tracks, start, 2);
    assert_eq!(first, vec![(0, "2/user:pager/sms".to_string())]);
    // Acknowledged at minute 3: the email due at 5 and everything after is cancelled.
    tracks.on_event(
        &planner,
        &event(
            EventKind::Acknowledged,
            IncidentStatus::Acknowledged,
            start + SignedDuration::from_mins(3),
        ),
    );
    assert!(tracks.next_due().is_none());
    assert!(run(
        &planner,
        &mut tracks,
        start + SignedDuration::from_mins(3),
        120
    )
    .is_empty());
    // Resolved: the track is gone.
    tracks.on_event(
        &planner,
        &event(
            EventKind::Resolved {
                reason: tocsin_proto::incident::ResolveReason::Manual,
            },
            IncidentStatus::Resolved,
            start + SignedDuration::from_mins(4),
        ),
    );
    assert!(tracks.map.is_empty());
}

#[test]
fn a_stale_acknowledgement_reminds_whoever_acknowledged() {
    let yaml = r#"
route: {policy: p}
policies:
  - name: p
    renotify_acknowledged_after: 2h
    levels: [{targets: [{user: pager}]}]
users:
  - {name: pager, email: pager@example.com, phone: "+15555550100"}
"#;
    let planner =
        Planner::new(&serde_yaml_ng::from_str::<EscalationConfig>(yaml).unwrap()).unwrap();
    let start = at("2026-01-07T10:00:00Z");
    let mut tracks = Tracks::default();
    tracks.on_event(&planner, &opened(start));
    assert_eq!(
        run(&planner, &mut tracks, start, 0).len(),
        2,
        "critical: sms + email"
    );
    let mut ack = event(
        EventKind::Acknowledged,
        IncidentStatus::Acknowledged,
        start + SignedDuration::from_mins(10),
    );
    ack.incident.acknowledged_by = Some(tocsin_proto::incident::Actor::new("pager", "slack"));
    tracks.on_event(&planner, &ack);
    // Still open two hours after the acknowledgement: a reminder, then every 2h.
    let pages = run(
        &planner,
        &mut tracks,
        start + SignedDuration::from_mins(11),
        300,
    );
    let minutes: Vec<i64> = pages.iter().map(|(m, _)| *m + 11).collect();
    assert_eq!(minutes, [130, 130, 250, 250], "{pages:?}");
    assert!(pages.iter().all(|(_, p)| p.starts_with("0/user:pager/")));
    // Resolved: no more reminders.
    tracks.on_event(
        &planner,
        &event(
            EventKind::Resolved {
                reason: tocsin_proto::incident::ResolveReason::Manual,
            },
            IncidentStatus::Resolved,
            start + SignedDuration::from_mins(300),
        ),
    );
    assert!(tracks.next_due().is_none());
}

fn remediation(status: &str, hold: Option<Timestamp>, detail: &str, t: Timestamp) -> IncidentEvent {
    event(
        EventKind::Remediation {
            runbook: "rb".into(),
            step: "run".into(),
            status: status.into(),
            detail: detail.into(),
            hold_until: hold,
        },
        IncidentStatus::Triggered,
        t,
    )
}

/// (minute, reason) of each page fired from `start` to `minutes`, with
/// `events` (minute, event) fed in before firing at their minute.
fn held_run(events: &[(i64, IncidentEvent)], start: Timestamp, minutes: i64) -> Vec<(i64, String)> {
    let planner = Planner::new(
        &serde_yaml_ng::from_str::<EscalationConfig>(
            "route: {policy: p}\npolicies:\n  - name: p\n    levels:\n      - targets: [{user: pager}]\nusers:\n  - {name: pager, email: pager@example.com}\n",
        )
        .unwrap(),
    )
    .unwrap();
    let mut tracks = Tracks::default();
    let mut out = Vec::new();
    for m in 0..=minutes {
        let now = start + SignedDuration::from_mins(m);
        for (_, ev) in events.iter().filter(|(at, _)| *at == m) {
            tracks.on_event(&planner, ev);
        }
        for key in tracks.due(now) {
            for e in tracks.fire(&planner, &key, now) {
                if let Effect::Page(p) = e {
                    out.push((m, p.reason.clone()));
                }
            }
        }
    }
    out
}

#[test]
fn a_runbooks_hold_keeps_the_first_level_back_until_the_run_ends_or_the_hold_runs_out() {
    let t = at("2026-01-07T10:00:00Z");
    let min = |m: i64| t + SignedDuration::from_mins(m);
    // Announced at minute 1 (group wait), held until minute 5.
    let mut open = opened(t);
    open.incident.announce_at = min(1);
    let held = remediation("held", Some(min(5)), "", t);
    // The hold runs out: the page at minute 5, not at 1.
    let pages = held_run(&[(0, open.clone()), (0, held.clone())], t, 8);
    assert_eq!(pages.iter().map(|p| p.0).collect::<Vec<_>>(), [5]);
    // The run fails at minute 2: the page at once, saying why.
    let failed = remediation(
        "failed",
        None,
        "runbook rb failed at step fix: exit 1",
        min(2),
    );
    let pages = held_run(&[(0, open.clone()), (0, held.clone()), (2, failed)], t, 8);
    assert_eq!(pages.len(), 1, "{pages:?}");
    assert_eq!(pages[0].0, 2);
    assert!(
        pages[0]
            .1
            .ends_with(": runbook rb failed at step fix: exit 1"),
        "{}",
        pages[0].1
    );
    // The run succeeds before the level was due: it comes when it was due.
    let ok = remediation("succeeded", None, "", t);
    let pages = held_run(&[(0, open.clone()), (0, held.clone()), (0, ok)], t, 8);
    assert_eq!(pages.iter().map(|p| p.0).collect::<Vec<_>>(), [1]);
    // A hold after the level fired changes nothing.
    let late = remediation("held", Some(min(9)), "", min(2));
    let pages = held_run(&[(0, open), (2, late)], t, 8);
    assert_eq!(pages.iter().map(|p| p.0).collect::<Vec<_>>(), [1]);
}
