//! Queries over NATS request/reply: who is on call for a schedule, where an
//! incident's escalation stands and what comes next, which schedules exist.
//!
//! The answers are pure functions of the planner, the tracks and an instant
//! ([`on_call`], [`plan`], [`upcoming`]); [`serve`] only decodes, calls them
//! and replies.

use std::sync::Arc;

use async_nats::jetstream;
use jiff::{SignedDuration, Timestamp};
use tocsin_proto::{
    codec,
    incident::IncidentStatus,
    query::{
        OnCallQuery, OnCallReply, OnCallView, PlanQuery, PlanReply, ScheduleList, ShiftView,
        TrackStatus, TrackView, UpcomingStep,
    },
    subjects::query,
};
use tocsin_runtime::clock::Clock;
use tocsin_runtime::query::Queries;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::{
    plan::{Next, Planner},
    schedule::Schedule,
    store::Store,
    track::{describe, Track},
};

/// Queue group, so several replicas could share queries.
const QUEUE: &str = "tocsin-escalation";

/// How many shifts after the current one an on-call answer lists.
pub(crate) const NEXT_SHIFTS: usize = 5;

/// The most upcoming steps a plan lists per track.
pub(crate) const MAX_UPCOMING: usize = 20;

pub(crate) async fn subscribe(
    js: &jetstream::Context,
) -> Result<Queries, async_nats::SubscribeError> {
    Queries::subscribe(
        js,
        QUEUE,
        &[
            query::ESCALATION_ONCALL,
            query::ESCALATION_PLAN,
            query::ESCALATION_SCHEDULES,
        ],
    )
    .await
}

/// Answers queries until `shutdown` is cancelled. `schedules` is every
/// schedule name, for listing and for errors naming the defined ones.
pub(crate) async fn serve(
    queries: Queries,
    planner: Arc<Planner>,
    store: Store,
    clock: Arc<dyn Clock>,
    schedules: Vec<String>,
    shutdown: CancellationToken,
) {
    queries
        .serve(shutdown, |subject, payload| {
            let answer = match subject.as_str() {
                query::ESCALATION_ONCALL => {
                    codec::encode(&match codec::decode::<OnCallQuery>(&payload) {
                        Ok(q) => on_call(
                            &planner,
                            &schedules,
                            &q.schedule,
                            q.at.unwrap_or(clock.now()),
                        ),
                        Err(e) => OnCallReply::Error {
                            reason: format!("bad query: {e}"),
                        },
                    })
                }
                query::ESCALATION_PLAN => {
                    codec::encode(&match codec::decode::<PlanQuery>(&payload) {
                        Ok(q) => match store.tracks_of(q.incident) {
                            Ok(tracks) => plan(&planner, &tracks, q.incident, clock.now()),
                            Err(e) => PlanReply::Error {
                                reason: format!("cannot read the escalation store: {e}"),
                            },
                        },
                        Err(e) => PlanReply::Error {
                            reason: format!("bad query: {e}"),
                        },
                    })
                }
                // The request carries nothing, so any payload will do.
                _ => codec::encode(&ScheduleList {
                    schedules: schedules.clone(),
                }),
            };
            std::future::ready(answer.map_err(|e| e.to_string()))
        })
        .await
}

/// The schedule called `name`, or an error naming the defined ones.
pub(crate) fn find_schedule<'a>(
    planner: &'a Planner,
    schedules: &[String],
    name: &str,
) -> Result<&'a Schedule, String> {
    planner.schedule(name).ok_or_else(|| {
        let defined = if schedules.is_empty() {
            "none".to_string()
        } else {
            schedules.join(", ")
        };
        format!("no schedule {name:?} (defined: {defined})")
    })
}

/// Who is on call for `schedule` at `at`, and the next shifts.
pub(crate) fn on_call(
    planner: &Planner,
    schedules: &[String],
    schedule: &str,
    at: Timestamp,
) -> OnCallReply {
    match find_schedule(planner, schedules, schedule) {
        Ok(s) => OnCallReply::OnCall(Box::new(on_call_view(s, at))),
        Err(reason) => OnCallReply::Error { reason },
    }
}

pub(crate) fn on_call_view(schedule: &Schedule, at: Timestamp) -> OnCallView {
    let now = schedule.on_call(at);
    OnCallView {
        schedule: schedule.name().to_string(),
        at,
        user: now.as_ref().map(|o| o.user.clone()),
        layer: now.as_ref().and_then(|o| o.layer.clone()),
        shift_start: now.as_ref().map(|o| o.shift_start),
        shift_end: now.as_ref().map(|o| o.shift_end),
        next: next_shifts(schedule, at, NEXT_SHIFTS),
        timezone: schedule.timezone().iana_name().map(str::to_string),
    }
}

/// Up to `n` shifts starting after `at`. Looks four weeks ahead first and
/// further (up to about a year) for long rotations; a shift cut off by the
/// window's end is not listed, since its end would be wrong.
fn next_shifts(schedule: &Schedule, at: Timestamp, n: usize) -> Vec<ShiftView> {
    const MAX_DAYS: i64 = 448;
    let mut days = 28;
    loop {
        let to = plus(at, SignedDuration::from_hours(24 * days));
        let last = days >= MAX_DAYS;
        let found: Vec<ShiftView> = schedule
            .shifts(at, to)
            .into_iter()
            .filter(|s| s.start > at && (last || s.end < to))
            .take(n)
            .map(|s| ShiftView {
                user: s.user,
                start: s.start,
                end: s.end,
            })
            .collect();
        if found.len() >= n || last {
            return found;
        }
        days *= 2;
    }
}

/// Every track of `incident` (among `tracks`: the store's for that
/// incident) with what comes next, projected from `now`.
pub(crate) fn plan(
    planner: &Planner,
    tracks: &[Track],
    incident: Uuid,
    now: Timestamp,
) -> PlanReply {
    let views: Vec<TrackView> = tracks
        .iter()
        .filter(|t| t.incident.id == incident)
        .map(|t| track_view(planner, t, now))
        .collect();
    if views.is_empty() {
        return PlanReply::Error {
            reason: format!(
                "incident {incident} is not escalating: it is unknown, resolved, \
                 suppressed, or no route gives it a policy"
            ),
        };
    }
    PlanReply::Plan {
        incident,
        tracks: views,
    }
}

pub(crate) fn track_view(planner: &Planner, t: &Track, now: Timestamp) -> TrackView {
    let status = if t.next_at.is_some() {
        TrackStatus::Pending
    } else if t.incident.status != IncidentStatus::Triggered || t.incident.snoozed_until.is_some() {
        TrackStatus::Paused
    } else {
        TrackStatus::Exhausted
    };
    TrackView {
        policy: t.policy.clone(),
        status,
        next_level: t.level,
        repeat: t.repeat,
        next_at: t.next_at,
        upcoming: upcoming(planner, t, now, MAX_UPCOMING),
    }
}

/// The levels `t` will fire if nobody acknowledges, in this round and the
/// next (if the policy repeats), at most `limit`. Follows the service's own
/// rules: each level's targets are resolved when it would fire (an overdue
/// one fires `now`), the next comes after [`Planner::next`]'s delay from
/// when the level was due, and an empty level that the policy skips is
/// followed at once.
pub(crate) fn upcoming(
    planner: &Planner,
    t: &Track,
    now: Timestamp,
    limit: usize,
) -> Vec<UpcomingStep> {
    let mut out = Vec::new();
    if t.incident.status != IncidentStatus::Triggered {
        return out;
    }
    let Some(mut at) = t.next_at else {
        return out;
    };
    let (mut level, mut repeat) = (t.level, t.repeat);
    let skip_empty = planner.skip_empty_levels(&t.policy);
    while out.len() < limit && repeat <= t.repeat.saturating_add(1) {
        let plan = planner.level(&t.policy, level, &t.incident, at.max(now));
        let skip = plan.empty.is_some() && skip_empty;
        out.push(UpcomingStep {
            level,
            repeat,
            at,
            pages: plan.pages.iter().map(describe).collect(),
            empty: plan.empty,
        });
        match planner.next(&t.policy, level, repeat, t.incident.severity) {
            Next::Level {
                level: l,
                repeat: r,
                after,
            } => {
                if !skip {
                    at = plus(
                        at,
                        SignedDuration::try_from(after).unwrap_or(SignedDuration::MAX),
                    );
                }
                (level, repeat) = (l, r);
            }
            Next::Exhausted => break,
        }
    }
    out
}

/// `at + d`, saturating: a query may ask about any instant.
pub(crate) fn plus(at: Timestamp, d: SignedDuration) -> Timestamp {
    at.checked_add(d).unwrap_or(if d.is_negative() {
        Timestamp::MIN
    } else {
        Timestamp::MAX
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::config::EscalationConfig;
    use tocsin_proto::incident::{IncidentSummary, Severity};

    /// The reference four-level policy (as in `tests/escalation_flow.rs`),
    /// with `secondary` a daily rotation handing off at 09:00 Berlin time,
    /// plus a repeating policy and one with a business-hours level.
    pub(crate) const ESCALATION: &str = r##"
route:
  policy: default
policies:
  - name: default
    levels:
      - targets: [{schedule: primary}]
        delay: 15m
        delay_by_severity: {high: 5m}
      - targets: [{schedule: secondary}]
        delay: 15m
      - targets: [{user: lead}]
        delay: 30m
      - targets: [{user: em}, {user: cto}]
  - name: twice
    repeat: 1
    levels:
      - targets: [{user: lead}]
        delay: 10m
      - targets: [{user: em}]
        delay: 5m
  - name: office
    levels:
      - targets: [{user: lead}]
        delay: 10m
        active: {weekdays: [mon, tue, wed, thu, fri], start: "09:00", end: "17:00", timezone: Europe/Berlin}
      - targets: [{user: em}]
        delay: 10m
schedules:
  - name: primary
    timezone: Europe/Berlin
    layers: [{name: weekly, participants: [alice, dave], rotation: weekly, start: 2026-01-05}]
  - name: secondary
    timezone: Europe/Berlin
    layers: [{name: daily, participants: [bob, carol], rotation: daily, handoff: "09:00", start: 2026-01-05}]
users:
  - {name: alice, email: alice@example.com, phone: "+14155550101", slack: U01ALICE}
  - {name: bob, email: bob@example.com, phone: "+14155550102"}
  - {name: carol, email: carol@example.com}
  - {name: dave, email: dave@example.com}
  - {name: lead, email: lead@example.com, slack: U01LEAD}
  - {name: em, email: em@example.com}
  - {name: cto, email: cto@example.com}
"##;

    pub(crate) fn planner() -> Planner {
        let cfg: EscalationConfig = serde_yaml_ng::from_str(ESCALATION).unwrap();
        Planner::new(&cfg).unwrap()
    }

    pub(crate) fn names() -> Vec<String> {
        vec!["primary".into(), "secondary".into()]
    }

    fn ts(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    fn mins(at: Timestamp, m: i64) -> Timestamp {
        at + SignedDuration::from_mins(m)
    }

    fn incident(severity: Severity) -> IncidentSummary {
        let t0 = ts("2026-03-02T07:00:00Z");
        IncidentSummary {
            severity,
            alerts_firing: 1,
            alerts_total: 1,
            ..IncidentSummary::new(Uuid::from_u128(42), 42, "k", "DiskFilling", t0)
        }
    }

    fn track(policy: &str, severity: Severity, level: u32, next_at: Option<Timestamp>) -> Track {
        Track {
            incident: incident(severity),
            policy: policy.into(),
            level,
            repeat: 0,
            next_at,
            pending: Vec::new(),
            fired: level.checked_sub(1).map(|l| (l, 0)),
            renotify_at: None,
            renotified: 0,
            generation: 0,
            held_from: None,
            cause: None,
            last_fired: level.checked_sub(1).map(|l| (0, l, 0)),
            before: None,
        }
    }

    /// Checks the projection as `(level, repeat, minutes after next_at,
    /// pages)` per step.
    fn check(t: &Track, now: Timestamp, expected: &[(u32, u32, i64, &[&str])]) {
        let p = planner();
        let base = t.next_at.unwrap();
        let got: Vec<(u32, u32, i64, Vec<String>)> = upcoming(&p, t, now, MAX_UPCOMING)
            .into_iter()
            .map(|s| {
                (
                    s.level,
                    s.repeat,
                    s.at.duration_since(base).as_mins(),
                    s.pages,
                )
            })
            .collect();
        let expected: Vec<(u32, u32, i64, Vec<String>)> = expected
            .iter()
            .map(|(l, r, m, pages)| (*l, *r, *m, pages.iter().map(|s| s.to_string()).collect()))
            .collect();
        assert_eq!(got, expected);
    }

    // 2026-03-02 is a Monday, 56 days after the rotations' start. Both
    // schedules hand off at 09:00 Berlin (08:00Z): primary from dave (week
    // 7) to alice (week 8), secondary from carol (day 55) to bob (day 56).
    const BEFORE_HANDOFF: &str = "2026-03-02T07:50:00Z";

    #[test]
    fn a_track_at_level_1_projects_the_remaining_levels_at_their_delays() {
        let at = ts(BEFORE_HANDOFF);
        check(
            &track("default", Severity::Medium, 1, Some(at)),
            at,
            &[
                (1, 0, 0, &["carol (on call for secondary) via email"]),
                (2, 0, 15, &["lead via email", "lead via slack"]),
                (3, 0, 45, &["cto via email", "em via email"]),
            ],
        );
    }

    #[test]
    fn schedules_are_resolved_when_each_level_would_fire() {
        let at = ts(BEFORE_HANDOFF);
        // Level 0 fires at 07:58Z (dave); high waits 5m, so level 1 fires
        // at 08:03Z, after secondary's handoff: bob, not carol (on call now).
        check(
            &track("default", Severity::High, 0, Some(mins(at, 8))),
            at,
            &[
                (0, 0, 0, &["dave (on call for primary) via email"]),
                (
                    1,
                    0,
                    5,
                    &[
                        "bob (on call for secondary) via sms",
                        "bob (on call for secondary) via email",
                    ],
                ),
                (2, 0, 20, &["lead via email"]),
                (3, 0, 50, &["cto via email", "em via email"]),
            ],
        );
        // Critical, after the handoff: alice's rule SMSes again after 5m.
        let steps = upcoming(
            &planner(),
            &track("default", Severity::Critical, 0, Some(mins(at, 10))),
            at,
            MAX_UPCOMING,
        );
        assert_eq!(
            steps[0].pages,
            [
                "alice (on call for primary) via sms",
                "alice (on call for primary) via email",
                "alice (on call for primary) via slack",
                "alice (on call for primary) via sms after 300s",
            ]
        );
    }

    #[test]
    fn an_overdue_level_is_resolved_now() {
        // Due at 07:50Z but the service is only now (08:10Z) firing it.
        let at = ts(BEFORE_HANDOFF);
        let steps = upcoming(
            &planner(),
            &track("default", Severity::Medium, 1, Some(at)),
            mins(at, 20),
            MAX_UPCOMING,
        );
        assert_eq!(steps[0].at, at);
        assert_eq!(steps[0].pages, ["bob (on call for secondary) via email"]);
        assert_eq!(steps[1].at, mins(at, 15));
    }

    #[test]
    fn a_repeating_policy_projects_this_round_and_the_next() {
        let at = ts(BEFORE_HANDOFF);
        check(
            &track("twice", Severity::Info, 1, Some(at)),
            at,
            &[
                (1, 0, 0, &["em via email"]),
                (0, 1, 5, &["lead via email"]),
                (1, 1, 15, &["em via email"]),
            ],
        );
        let mut t = track("twice", Severity::Info, 0, Some(at));
        check(
            &t,
            at,
            &[
                (0, 0, 0, &["lead via email"]),
                (1, 0, 10, &["em via email"]),
                (0, 1, 15, &["lead via email"]),
                (1, 1, 25, &["em via email"]),
            ],
        );
        // At most `limit` steps.
        t.repeat = 0;
        assert_eq!(upcoming(&planner(), &t, at, 3).len(), 3);
    }

    #[test]
    fn a_skipped_empty_level_is_followed_at_once() {
        // Sunday: the business-hours level is empty and skipped.
        let at = ts("2026-03-01T12:00:00Z");
        let steps = upcoming(
            &planner(),
            &track("office", Severity::Low, 0, Some(at)),
            at,
            MAX_UPCOMING,
        );
        assert_eq!(steps.len(), 2);
        assert!(steps[0].pages.is_empty());
        assert_eq!(
            steps[0].empty.as_deref(),
            Some("level 1 is outside its active hours")
        );
        assert_eq!((steps[1].level, steps[1].at), (1, at));
        assert_eq!(steps[1].pages, ["em via email"]);
    }

    #[test]
    fn plan_reports_each_tracks_status() {
        let p = planner();
        let at = ts(BEFORE_HANDOFF);
        let id = Uuid::from_u128(42);
        let pending = track("default", Severity::Medium, 1, Some(at));
        let mut exhausted = track("twice", Severity::Medium, 1, None);
        exhausted.repeat = 1;
        // Another incident's track is not listed.
        let mut other = track("default", Severity::Medium, 0, Some(at));
        other.incident.id = Uuid::from_u128(43);
        let mut tracks = vec![pending, exhausted, other];
        let PlanReply::Plan {
            incident,
            tracks: views,
        } = plan(&p, &tracks, id, at)
        else {
            panic!("expected a plan");
        };
        assert_eq!(incident, id);
        let summary: Vec<_> = views
            .iter()
            .map(|v| (v.policy.as_str(), v.status, v.next_level, v.upcoming.len()))
            .collect();
        assert_eq!(
            summary,
            [
                ("default", TrackStatus::Pending, 1, 3),
                ("twice", TrackStatus::Exhausted, 1, 0)
            ]
        );

        // Acknowledged (or snoozed): paused, nothing upcoming.
        for t in tracks.iter_mut() {
            t.next_at = None;
            t.incident.status = IncidentStatus::Acknowledged;
        }
        let PlanReply::Plan { tracks: views, .. } = plan(&p, &tracks, id, at) else {
            panic!("expected a plan");
        };
        assert!(views
            .iter()
            .all(|v| v.status == TrackStatus::Paused && v.upcoming.is_empty()));

        let PlanReply::Error { reason } = plan(&p, &tracks, Uuid::from_u128(7), at) else {
            panic!("expected an error");
        };
        assert!(
            reason.contains("00000000-0000-0000-0000-000000000007"),
            "{reason}"
        );
    }

    #[test]
    fn on_call_names_the_user_and_the_next_shifts() {
        let p = planner();
        let at = ts(BEFORE_HANDOFF);
        let OnCallReply::OnCall(v) = on_call(&p, &names(), "secondary", at) else {
            panic!("expected an answer");
        };
        assert_eq!(v.user.as_deref(), Some("carol"));
        assert_eq!(v.layer.as_deref(), Some("daily"));
        assert_eq!(v.shift_start, Some(ts("2026-03-01T08:00:00Z")));
        assert_eq!(v.shift_end, Some(ts("2026-03-02T08:00:00Z")));
        let next: Vec<_> = v
            .next
            .iter()
            .map(|s| (s.user.as_str(), s.start.to_string()))
            .collect();
        assert_eq!(
            next,
            [
                ("bob", "2026-03-02T08:00:00Z".to_string()),
                ("carol", "2026-03-03T08:00:00Z".to_string()),
                ("bob", "2026-03-04T08:00:00Z".to_string()),
                ("carol", "2026-03-05T08:00:00Z".to_string()),
                ("bob", "2026-03-06T08:00:00Z".to_string()),
            ]
        );
        assert_eq!(v.next[0].end, ts("2026-03-03T08:00:00Z"));
        // Weekly shifts: five of them need more than four weeks.
        let OnCallReply::OnCall(v) = on_call(&p, &names(), "primary", at) else {
            panic!("expected an answer");
        };
        assert_eq!(v.next.len(), NEXT_SHIFTS);
        assert_eq!(v.user.as_deref(), Some("dave"));
        assert_eq!(v.next[0].user, "alice");
        // Summer time starts on 2026-03-29: the handoff stays at 09:00 local.
        assert_eq!(v.next[3].start, ts("2026-03-23T08:00:00Z"));
        assert_eq!(v.next[4].start, ts("2026-03-30T07:00:00Z"));

        let OnCallReply::Error { reason } = on_call(&p, &names(), "tertiary", at) else {
            panic!("expected an error");
        };
        assert_eq!(
            reason,
            "no schedule \"tertiary\" (defined: primary, secondary)"
        );
    }

    #[test]
    fn on_call_at_the_ends_of_time_does_not_panic() {
        let p = planner();
        for at in [Timestamp::MIN, Timestamp::MAX] {
            assert!(matches!(
                on_call(&p, &names(), "primary", at),
                OnCallReply::OnCall(_)
            ));
        }
    }
}
