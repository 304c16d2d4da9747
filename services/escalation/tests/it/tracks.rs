//! The escalation state machine without IO: empty levels skipped at once,
//! out-of-hours levels, repeats, pending rule steps cancelled by an ack.

use jiff::{SignedDuration, Timestamp};
use tocsin_escalation::{
    config::EscalationConfig,
    plan::Planner,
    track::{Effect, Key, Track, Tracks},
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

/// The planner of a config in YAML.
fn planner(yaml: &str) -> Planner {
    Planner::new(&serde_yaml_ng::from_str::<EscalationConfig>(yaml).unwrap()).unwrap()
}

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
        EventKind::opened(tocsin_proto::incident::AlertInfo {
            fingerprint: Fingerprint::from_labels(&labels),
            status: AlertStatus::Firing,
            labels,
            annotations: Labels::new(),
            starts_at: t,
            ends_at: None,
            generator_url: None,
            suppressed: None,
        }),
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
            for e in tracks.fire(planner, &key, now, &mut Vec::new()) {
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
    let planner = planner(CONFIG);
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
    let planner = planner(CONFIG);
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
    let planner = planner(yaml);
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
    let planner = planner(
        "route: {policy: p}\npolicies:\n  - name: p\n    levels:\n      - targets: [{user: pager}]\nusers:\n  - {name: pager, email: pager@example.com}\n",
    );
    let mut tracks = Tracks::default();
    let mut out = Vec::new();
    for m in 0..=minutes {
        let now = start + SignedDuration::from_mins(m);
        for (_, ev) in events.iter().filter(|(at, _)| *at == m) {
            tracks.on_event(&planner, ev);
        }
        for key in tracks.due(now) {
            for e in tracks.fire(&planner, &key, now, &mut Vec::new()) {
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

/// Two policies for every incident, so an incident has several tracks,
/// loaded and saved together.
const TWO_POLICIES: &str = r##"
route:
  policy: q
  routes:
    - {policy: p, continue: true}
    - {policy: q}
policies:
  - name: p
    repeat: 2
    renotify_acknowledged_after: 30m
    levels:
      - targets: [{user: a}]
        delay: 5m
      - targets: [{user: b}]
        delay: 5m
  - name: q
    levels:
      - targets: [{user: b}]
        delay: 7m
users:
  - {name: a, email: a@example.com}
  - name: b
    email: b@example.com
    rules:
      critical: [{channels: [email]}, {channels: [email], after: 3m}]
"##;

fn event_of(id: u128, kind: EventKind, status: IncidentStatus, t: Timestamp) -> IncidentEvent {
    let mut ev = event(kind, status, t);
    ev.incident.id = uuid::Uuid::from_u128(id);
    ev.incident.number = id as u64;
    ev
}

/// Incident `id` (also its number) opened at `t`.
fn opened_of(id: u128, t: Timestamp) -> IncidentEvent {
    let mut ev = opened(t);
    ev.incident.id = uuid::Uuid::from_u128(id);
    ev.incident.number = id as u64;
    ev
}

fn resolved() -> EventKind {
    EventKind::Resolved {
        reason: tocsin_proto::incident::ResolveReason::Manual,
    }
}

/// What happens at a minute: events (applied together, then saved once),
/// a restart (the stored side rebuilds its index from the store), or
/// nothing but firing what is due.
enum Step {
    Events(Vec<IncidentEvent>),
    Restart,
}

/// Tracks as the service keeps them: the index in memory, the tracks in a
/// store, loaded per incident when needed and let go once saved.
struct Stored {
    tracks: Tracks,
    store: std::collections::BTreeMap<Key, Track>,
    changed: Vec<Key>,
}

impl Stored {
    fn load(&mut self, id: uuid::Uuid) {
        if self.tracks.is_loaded(id) {
            return;
        }
        let stored: Vec<Track> = self
            .store
            .range((id, String::new())..)
            .take_while(|(k, _)| k.0 == id)
            .map(|(_, t)| t.clone())
            .collect();
        self.tracks.load(id, stored);
    }

    fn save(&mut self) {
        for k in self.changed.drain(..) {
            match self.tracks.map.get(&k) {
                Some(t) => self.store.insert(k, t.clone()),
                None => self.store.remove(&k),
            };
        }
        self.tracks.release();
    }

    fn restart(&mut self) {
        self.tracks = Tracks::default();
        for (k, t) in &self.store {
            self.tracks.index_stored(k, t.due());
        }
    }
}

/// (minute, incident number, "level/target/channel") per page.
type Paged = Vec<(i64, u64, String)>;

/// Whether `pages` has one of incident `n` at minute `minute` or later.
fn paged_from(pages: &Paged, n: u64, minute: i64) -> bool {
    pages.iter().any(|(m, i, _)| *i == n && *m >= minute)
}

fn pages_of(effects: Vec<Effect>, minute: i64, out: &mut Paged) {
    for e in effects {
        if let Effect::Page(p) = e {
            let Page {
                level,
                target,
                channel,
                incident,
                ..
            } = *p;
            out.push((
                minute,
                incident.number,
                format!("{level}/{}/{}", target.key(), channel.as_str()),
            ));
        }
    }
}

#[test]
fn tracks_kept_in_a_store_page_exactly_as_tracks_kept_in_memory() {
    let planner = planner(TWO_POLICIES);
    let start = at("2026-01-07T10:00:00Z");
    let t = |m: i64| start + SignedDuration::from_mins(m);
    use EventKind as K;
    use IncidentStatus as S;
    let script: Vec<(i64, Step)> = vec![
        (
            0,
            Step::Events(vec![opened_of(1, t(0)), opened_of(2, t(0))]),
        ),
        (
            6,
            Step::Events(vec![event_of(1, K::Acknowledged, S::Acknowledged, t(6))]),
        ),
        (
            12,
            Step::Events(vec![
                event_of(1, K::Unacknowledged, S::Triggered, t(12)),
                event_of(
                    2,
                    K::Escalated {
                        reason: "now".into(),
                    },
                    S::Triggered,
                    t(12),
                ),
            ]),
        ),
        (13, Step::Restart),
        (
            40,
            Step::Events(vec![
                event_of(2, resolved(), S::Resolved, t(40)),
                event_of(2, K::Reopened, S::Triggered, t(40)),
                {
                    let mut ack = event_of(1, K::Acknowledged, S::Acknowledged, t(40));
                    ack.incident.acknowledged_by =
                        Some(tocsin_proto::incident::Actor::new("a", "slack"));
                    ack
                },
            ]),
        ),
        (
            80,
            Step::Events(vec![
                opened_of(3, t(80)),
                event_of(3, resolved(), S::Resolved, t(80)),
                opened_of(4, t(80)),
            ]),
        ),
        (95, Step::Restart),
    ];
    let end = 160;

    // In memory: every track in `map`, never let go.
    let mut memory = Tracks::default();
    let mut memory_pages = Paged::new();
    // Stored: the service's way.
    let mut stored = Stored {
        tracks: Tracks::default(),
        store: Default::default(),
        changed: Vec::new(),
    };
    let mut stored_pages = Paged::new();
    for minute in 0..=end {
        for (_, step) in script.iter().filter(|(m, _)| *m == minute) {
            match step {
                Step::Events(events) => {
                    for ev in events {
                        memory.on_event(&planner, ev);
                        stored.load(ev.incident.id);
                        let changed = stored.tracks.on_event(&planner, ev);
                        stored.changed.extend(changed);
                    }
                    stored.save();
                }
                Step::Restart => stored.restart(),
            }
        }
        let now = t(minute);
        let due = memory.due(now);
        assert_eq!(due, stored.tracks.due(now), "due at minute {minute}");
        for key in due {
            pages_of(
                memory.fire(&planner, &key, now, &mut Vec::new()),
                minute,
                &mut memory_pages,
            );
        }
        // The service fires a chunk at a time from the index, saving each.
        let mut after = None;
        loop {
            let (chunk, next) = stored.tracks.due_after(now, after.as_ref(), 2);
            for key in chunk {
                stored.load(key.0);
                pages_of(
                    stored.tracks.fire(&planner, &key, now, &mut Vec::new()),
                    minute,
                    &mut stored_pages,
                );
                stored.changed.push(key);
            }
            stored.save();
            match next {
                Some(c) => after = Some(c),
                None => break,
            }
        }
        assert_eq!(
            memory.next_due(),
            stored.tracks.next_due(),
            "minute {minute}"
        );
        assert_eq!(memory.count(), memory.map.len(), "minute {minute}");
        assert_eq!(stored.tracks.count(), memory.count(), "minute {minute}");
        assert!(stored.tracks.map.is_empty(), "let go once saved");
        assert_eq!(stored.store, memory.map, "the store after minute {minute}");
    }
    assert_eq!(stored_pages, memory_pages);
    // The script did page: both policies, repeats, the rule's later email,
    // the stale-acknowledgement reminder, the reopened incident, not the
    // incident resolved as it opened.
    let incidents: std::collections::BTreeSet<u64> =
        memory_pages.iter().map(|(_, n, _)| *n).collect();
    assert_eq!(incidents, [1, 2, 4].into());
    assert!(memory_pages.len() > 20, "{memory_pages:?}");
    assert!(
        paged_from(&memory_pages, 2, 40),
        "the reopened incident pages again: {memory_pages:?}"
    );
    assert!(
        paged_from(&memory_pages, 1, 70),
        "the acknowledger of #1 is reminded after 30m: {memory_pages:?}"
    );
}

/// A receipt (a `paged` entry, a delivery, a note) that leaves the incident
/// as it was changes no track, so the service writes nothing for it: two
/// of the three INCIDENTS entries of every page are receipts. One that
/// does change the incident (here its assignee) still reaches the tracks'
/// copy of it.
#[test]
fn receipts_that_leave_the_incident_as_it_was_change_no_track() {
    let planner = planner(CONFIG);
    let start = at("2026-01-07T10:00:00Z");
    let mut tracks = Tracks::default();
    let open = opened(start);
    assert!(!tracks.on_event(&planner, &open).is_empty());
    let later = start + SignedDuration::from_secs(1);
    let same = |kind: EventKind| IncidentEvent {
        kind,
        at: later,
        actor: None,
        cause: Cause::Timer { id: "r".into() },
        incident: open.incident.clone(),
    };
    for kind in [
        EventKind::Paged {
            level: 1,
            repeat: 0,
            pages: vec!["p1".into()],
            reason: String::new(),
            fired: None,
        },
        EventKind::NoteAdded {
            text: "looking".into(),
        },
    ] {
        let changed = tracks.on_event(&planner, &same(kind.clone()));
        assert!(changed.is_empty(), "{} changed {changed:?}", kind.name());
    }
    let mut assigned = same(EventKind::NoteAdded {
        text: "mine".into(),
    });
    assigned.incident.assignee = Some("alice".into());
    let changed = tracks.on_event(&planner, &assigned);
    assert_eq!(changed.len(), 1, "the incident changed: its track is saved");
    let track = tracks.map.values().next().expect("the track");
    assert_eq!(track.incident.assignee.as_deref(), Some("alice"));
}

/// What a fire's effects come back as on INCIDENTS: each `paged` record as
/// the incidents service writes it, each page's delivery receipt from the
/// notifier (incident id and event kind; the incident's copy is the one of
/// when the receipt is applied).
fn receipts(effects: &[Effect]) -> Vec<(uuid::Uuid, EventKind)> {
    use tocsin_proto::{
        command::{Action, IncidentRef},
        notify::{Delivery, DeliveryOutcome},
    };
    effects
        .iter()
        .map(|e| match e {
            Effect::Record(c) => match &c.action {
                Action::Paged {
                    incident: IncidentRef::Id(id),
                    level,
                    repeat,
                    pages,
                    reason,
                    fired,
                } => (
                    *id,
                    EventKind::Paged {
                        level: *level,
                        repeat: *repeat,
                        pages: pages.clone(),
                        reason: reason.clone(),
                        fired: fired.clone(),
                    },
                ),
                other => panic!("escalation records only pages: {other:?}"),
            },
            Effect::Page(p) => (
                p.incident.id,
                EventKind::Delivery {
                    delivery: Delivery {
                        id: p.id.clone(),
                        kind: p.kind,
                        channel: p.channel,
                        target: p.target.key(),
                        outcome: DeliveryOutcome::Sent,
                        attempts: 1,
                        detail: String::new(),
                        provider: None,
                    },
                },
            ),
        })
        .collect()
}

/// A minute of a script for [`follow`]: events before anything fires, and
/// events that land between a fire and its receipts (an acknowledgement
/// racing the pages).
type Minute = (i64, Vec<IncidentEvent>, Vec<IncidentEvent>);

/// Runs `script` minute by minute on an instance that fires (`active`) and
/// on one that only follows the log (`follower`: the script's events and
/// the receipts of the active's fires, as a standby reads INCIDENTS). After
/// every minute the follower's tracks are exactly the active's, so a
/// takeover at any minute fires what the active would have fired next and
/// nothing it already did. The active gets its own receipts too, and they
/// change nothing there. Returns the active's pages.
fn follow(planner: &Planner, start: Timestamp, script: &[Minute], end: i64) -> Paged {
    let t = |m: i64| start + SignedDuration::from_mins(m);
    let mut active = Tracks::default();
    let mut follower = Tracks::default();
    let mut pages = Paged::new();
    for minute in 0..=end {
        let now = t(minute);
        let (before, racing) = script
            .iter()
            .find(|(m, _, _)| *m == minute)
            .map_or((&[][..], &[][..]), |(_, b, r)| (&b[..], &r[..]));
        for ev in before {
            active.on_event(planner, ev);
            follower.on_event(planner, ev);
        }
        let mut effects = Vec::new();
        for key in active.due(now) {
            effects.extend(active.fire(planner, &key, now, &mut Vec::new()));
        }
        for ev in racing {
            active.on_event(planner, ev);
            follower.on_event(planner, ev);
        }
        for (id, kind) in receipts(&effects) {
            let Some(incident) = active
                .map
                .range((id, String::new())..)
                .find(|(k, _)| k.0 == id)
                .map(|(_, t)| t.incident.clone())
            else {
                continue; // resolved meanwhile: the incidents service refuses the record
            };
            let ev = IncidentEvent {
                kind,
                at: now,
                actor: None,
                cause: Cause::Timer { id: "r".into() },
                incident,
            };
            let was = active.map.clone();
            // Only by letting go of a track's copy from before its last
            // change of generation.
            for k in active.on_event(planner, &ev) {
                let [a, b] = [was.get(&k), active.map.get(&k)].map(|t| {
                    t.cloned().map(|mut t| {
                        t.before = None;
                        t
                    })
                });
                assert_eq!(
                    a, b,
                    "minute {minute}: a receipt changed the instance that fired it: {:?}",
                    ev.kind
                );
            }
            follower.on_event(planner, &ev);
        }
        pages_of(effects, minute, &mut pages);
        for (k, a) in &active.map {
            assert_eq!(
                follower.map.get(k),
                Some(a),
                "track {k:?} after minute {minute}"
            );
        }
        assert_eq!(follower.map.len(), active.map.len(), "minute {minute}");
        assert_eq!(follower.next_due(), active.next_due(), "minute {minute}");
    }
    pages
}

/// An instance that follows the log (a standby, or the active one after a
/// crash before it saved) moves its tracks by the `paged` records and the
/// delivery receipts exactly as firing moved the active instance's: two
/// policies with repeats, later rule steps, stale-acknowledgement
/// reminders, an unacknowledge, an escalate-now, a reopen, and an
/// acknowledgement landing between a level's pages and its record.
#[test]
fn a_follower_of_the_log_keeps_its_tracks_where_firing_moved_the_active_ones() {
    let planner = planner(TWO_POLICIES);
    let start = at("2026-01-07T10:00:00Z");
    let t = |m: i64| start + SignedDuration::from_mins(m);
    use EventKind as K;
    use IncidentStatus as S;
    let acked_by = |id: u128, m: i64, who: &str| {
        let mut ack = event_of(id, K::Acknowledged, S::Acknowledged, t(m));
        ack.incident.acknowledged_by = Some(tocsin_proto::incident::Actor::new(who, "slack"));
        ack
    };
    let script: Vec<Minute> = vec![
        (
            0,
            vec![opened_of(1, t(0)), opened_of(2, t(0)), opened_of(3, t(0))],
            vec![],
        ),
        // #3's later email (policy q) is sent at 3 and an escalate-now
        // comes before its delivery receipt; its second level (policy p)
        // fires at 4 and is acknowledged before its record comes back.
        (
            3,
            vec![],
            vec![event_of(
                3,
                K::Escalated {
                    reason: "now".into(),
                },
                S::Triggered,
                t(3),
            )],
        ),
        (4, vec![], vec![acked_by(3, 4, "b")]),
        (6, vec![acked_by(1, 6, "a")], vec![]),
        (
            12,
            vec![
                event_of(1, K::Unacknowledged, S::Triggered, t(12)),
                event_of(
                    2,
                    K::Escalated {
                        reason: "now".into(),
                    },
                    S::Triggered,
                    t(12),
                ),
            ],
            vec![],
        ),
        (
            40,
            vec![
                event_of(2, resolved(), S::Resolved, t(40)),
                event_of(2, K::Reopened, S::Triggered, t(40)),
                acked_by(1, 40, "a"),
            ],
            vec![],
        ),
        (
            90,
            vec![event_of(3, resolved(), S::Resolved, t(90))],
            vec![],
        ),
    ];
    let pages = follow(&planner, start, &script, 160);
    // The script did page: both policies' levels and repeats, the rule's
    // later email, reminders to the acknowledger, the reopened incident.
    let of = |n: u64| pages.iter().filter(|(_, i, _)| *i == n).count();
    assert!(of(1) > 5 && of(2) > 5 && of(3) >= 2, "{pages:?}");
    assert!(
        paged_from(&pages, 1, 70),
        "the acknowledger of #1 is reminded: {pages:?}"
    );
    assert!(
        paged_from(&pages, 2, 43),
        "a later email of the reopened #2: {pages:?}"
    );
}

/// The same with empty levels skipped at once (several records from one
/// fire) and a level out of hours, over a weekend into Monday.
#[test]
fn a_follower_of_the_log_skips_the_levels_the_active_instance_skipped() {
    let planner = planner(CONFIG);
    let start = at("2026-01-07T16:30:00Z"); // Wednesday, half an hour before the day user's end
    let t = |m: i64| start + SignedDuration::from_mins(m);
    let script: Vec<Minute> = vec![
        (0, vec![opened(t(0))], vec![]),
        (
            75,
            vec![event(
                EventKind::Escalated {
                    reason: "again".into(),
                },
                IncidentStatus::Triggered,
                t(75),
            )],
            vec![],
        ),
    ];
    let pages = follow(&planner, start, &script, 200);
    assert!(pages.len() >= 4, "{pages:?}");
}

/// A `paged` record can come back after an escalate-now, an unacknowledge
/// or a snooze's end that changed the track's generation in the meantime
/// (the record is written only once the level's pages are stored, a few
/// milliseconds later). The follower still ends where the active instance
/// is: the level taken as fired before that event, the event applied
/// after it.
#[test]
fn a_follower_of_the_log_keeps_up_when_the_generation_changes_before_a_levels_record() {
    let planner = planner(TWO_POLICIES);
    let start = at("2026-01-07T10:00:00Z");
    let t = |m: i64| start + SignedDuration::from_mins(m);
    use EventKind as K;
    use IncidentStatus as S;
    let escalated = |id: u128, m: i64| {
        event_of(
            id,
            K::Escalated {
                reason: "now".into(),
            },
            S::Triggered,
            t(m),
        )
    };
    let acked = |id: u128, m: i64| {
        let mut ack = event_of(id, K::Acknowledged, S::Acknowledged, t(m));
        ack.incident.acknowledged_by = Some(tocsin_proto::incident::Actor::new("a", "slack"));
        ack
    };
    let script: Vec<Minute> = vec![
        (
            0,
            vec![
                opened_of(1, t(0)),
                opened_of(2, t(0)),
                opened_of(3, t(0)),
                opened_of(4, t(0)),
                opened_of(5, t(0)),
            ],
            // #1: both policies' first level (q's is its last) fired, then
            // escalated before their records; #5 escalated and
            // acknowledged.
            vec![escalated(1, 0), escalated(5, 0), acked(5, 0)],
        ),
        (
            5,
            vec![],
            // #2: p's second level fired, then acknowledged and
            // unacknowledged before its record; #3 escalated instead.
            vec![
                acked(2, 5),
                event_of(2, K::Unacknowledged, S::Triggered, t(5)),
                escalated(3, 5),
            ],
        ),
        // #5 pages again from the level it was at.
        (
            8,
            vec![event_of(5, K::Unacknowledged, S::Triggered, t(8))],
            vec![],
        ),
        // #4: p's last level of its last round, then escalated.
        (15, vec![], vec![escalated(4, 15)]),
        (
            30,
            vec![
                event_of(1, resolved(), S::Resolved, t(30)),
                event_of(2, resolved(), S::Resolved, t(30)),
                event_of(3, resolved(), S::Resolved, t(30)),
                event_of(4, resolved(), S::Resolved, t(30)),
                event_of(5, resolved(), S::Resolved, t(30)),
            ],
            vec![],
        ),
    ];
    let pages = follow(&planner, start, &script, 40);
    assert!(paged_from(&pages, 4, 16), "#4 paged again: {pages:?}");
    assert!(paged_from(&pages, 5, 8), "#5 paged again: {pages:?}");
}

/// An incident opened and paged under `old` (`first` pages), acknowledged
/// by `pager` at minute 10 under `acknowledged_with`, then run under `new`
/// up to minute `until`: the minutes of the reminders.
fn reminders_after_a_change(
    old: &Planner,
    new: &Planner,
    acknowledged_with: &Planner,
    first: usize,
    until: i64,
) -> Vec<i64> {
    let start = at("2026-01-07T10:00:00Z");
    let mut ack = event(
        EventKind::Acknowledged,
        IncidentStatus::Acknowledged,
        start + SignedDuration::from_mins(10),
    );
    ack.incident.acknowledged_by = Some(tocsin_proto::incident::Actor::new("pager", "slack"));
    let mut tracks = Tracks::default();
    tracks.on_event(old, &opened(start));
    assert_eq!(
        run(old, &mut tracks, start, 0).len(),
        first,
        "paged at the opening"
    );
    tracks.on_event(acknowledged_with, &ack);
    let from = start + SignedDuration::from_mins(11);
    let pages = run(new, &mut tracks, from, until - 11);
    pages.iter().map(|(m, _)| *m + 11).collect()
}

/// An acknowledged incident whose policy was renamed while it was open
/// keeps being reminded, at the interval of the policy its route names
/// now: before, the reminder due went out once and none came after it
/// (the old name has no `renotify_acknowledged_after`), and an incident
/// acknowledged after the rename was never reminded.
#[test]
fn an_acknowledged_incident_whose_policy_was_renamed_is_still_reminded() {
    let before = r#"
route: {policy: p}
policies:
  - name: p
    renotify_acknowledged_after: 2h
    levels: [{targets: [{user: pager}], delay: 30m}, {targets: [{user: pager}]}]
users:
  - {name: pager, email: pager@example.com}
"#;
    let after = before
        .replace("{policy: p}", "{policy: q}")
        .replace("- name: p\n", "- name: q\n")
        .replace("after: 2h", "after: 1h");
    let (old, new) = (planner(before), planner(&after));
    let reminders = |acknowledged_with: &Planner, until: i64| {
        reminders_after_a_change(&old, &new, acknowledged_with, 1, until)
    };
    // Acknowledged before the rename: the reminder p set (2h) comes, then
    // q's (every hour).
    assert_eq!(reminders(&old, 311), [130, 190, 250, 310]);
    // Acknowledged after the rename (its level 2 not yet due): reminded
    // every hour, as q says.
    assert_eq!(reminders(&new, 211), [70, 130, 190]);
}

/// An acknowledged incident following two policies, one of which is then
/// removed from the config, is reminded by the one still configured, once
/// each time: the removed one's track must not remind at that policy's
/// interval too (before, the acknowledger got every reminder twice), since
/// its route names no policy the incident does not already follow.
#[test]
fn an_incident_following_a_removed_policy_and_one_still_configured_is_reminded_once() {
    let before = r#"
route:
  policy: b
  routes:
    - {policy: p, continue: true}
    - {policy: b}
policies:
  - name: p
    renotify_acknowledged_after: 2h
    levels: [{targets: [{user: pager}], delay: 30m}, {targets: [{user: pager}]}]
  - name: b
    renotify_acknowledged_after: 1h
    levels: [{targets: [{user: pager}], delay: 30m}, {targets: [{user: pager}]}]
users:
  - {name: pager, email: pager@example.com}
"#;
    let after = r#"
route: {policy: b}
policies:
  - name: b
    renotify_acknowledged_after: 1h
    levels: [{targets: [{user: pager}], delay: 30m}, {targets: [{user: pager}]}]
users:
  - {name: pager, email: pager@example.com}
"#;
    let (old, new) = (planner(before), planner(after));
    // p and b page at the opening.
    let reminders = |acknowledged_with: &Planner, until: i64| {
        reminders_after_a_change(&old, &new, acknowledged_with, 2, until)
    };
    // Acknowledged before p was removed: b reminds every hour; the
    // reminder p set (2h) still comes, once, as it was set before.
    assert_eq!(reminders(&old, 251), [70, 130, 130, 190, 250]);
    // Acknowledged after: only b reminds.
    assert_eq!(reminders(&new, 251), [70, 130, 190, 250]);
}
