//! The escalation planner against a config that follows the reference
//! practice (the escalation levels of a common SRE on-call guide): primary at once, secondary after 15 minutes, team
//! lead at 30, engineering manager and CTO at 60; faster for high severity.

use std::time::Duration;

use jiff::Timestamp;
use tocsin_escalation::{
    config::EscalationConfig,
    plan::{Next, Planner},
};
use tocsin_proto::{
    incident::{IncidentSummary, Severity},
    notify::{Channel, PageTarget},
    Labels,
};

const CONFIG: &str = r##"
route:
  policy: default
  routes:
    - matchers: ['team="db"']
      policy: db
    - matchers: ['tocsin_severity="critical"']
      policy: default
      continue: true
    - matchers: ['service="payments"']
      policy: payments
policies:
  - name: default
    repeat: 1
    levels:
      - targets: [{schedule: primary}]
        delay: 15m
        delay_by_severity: {high: 5m, low: 60m}
      - targets: [{schedule: secondary}]
        delay: 15m
      - targets: [{user: lead}]
        delay: 30m
      - targets: [{user: em}, {user: cto}]
        delay: 60m
  - name: db
    levels:
      - targets: [{schedule: nobody-home}, {slack_channel: "#db-alerts"}]
      - targets: [{user: lead}]
        active: {weekdays: [mon, tue, wed, thu, fri], start: "09:00", end: "17:00", timezone: Europe/Berlin}
      - targets: [{pagerduty_service: dba-vendor}]
  - name: payments
    levels:
      - targets: [{user: alice}, {webhook: teams-payments}]
schedules:
  - name: primary
    timezone: Europe/Berlin
    layers:
      - name: weekly
        participants: [alice, bob]
        rotation: weekly
        start: 2026-01-05
  - name: secondary
    timezone: Europe/Berlin
    layers:
      - name: weekly
        participants: [bob, alice]
        rotation: weekly
        start: 2026-01-05
  - name: nobody-home
    timezone: Europe/Berlin
users:
  - {name: alice, email: alice@example.com, phone: "+14155550101", slack: U01ALICE}
  - {name: bob, email: bob@example.com, phone: "+14155550102"}
  - {name: lead, email: lead@example.com, slack: U01LEAD}
  - {name: em, email: em@example.com, phone: "+14155550104"}
  - name: cto
    email: cto@example.com
    phone: "+14155550105"
    rules:
      critical: [{channels: [sms]}, {channels: [email], after: 10m}]
"##;

fn planner() -> Planner {
    let cfg: EscalationConfig = serde_yaml_ng::from_str(CONFIG).unwrap();
    Planner::new(&cfg).unwrap_or_else(|e| panic!("{e:#?}"))
}

fn incident(severity: Severity, labels: &[(&str, &str)]) -> IncidentSummary {
    let at: Timestamp = "2026-01-07T10:00:00Z".parse().unwrap();
    IncidentSummary {
        severity,
        labels: labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect::<Labels>(),
        alerts_firing: 1,
        alerts_total: 1,
        ..IncidentSummary::new(uuid::Uuid::nil(), 1, "k", "t", at)
    }
}

#[test]
fn routes_pick_policies_like_alertmanager() {
    let p = planner();
    let check = |severity: Severity, labels: &[(&str, &str)], expected: &[&str]| {
        assert_eq!(
            p.route(&incident(severity, labels)),
            expected,
            "{severity:?} {labels:?}"
        );
    };
    check(Severity::Medium, &[("alertname", "X")], &["default"]);
    check(Severity::Medium, &[("team", "db")], &["db"]);
    check(Severity::Medium, &[("service", "payments")], &["payments"]);
    // `continue: true` lets later siblings match too.
    check(
        Severity::Critical,
        &[("service", "payments")],
        &["default", "payments"],
    );
    // The first match wins: team=db is checked before severity.
    check(
        Severity::Critical,
        &[("team", "db"), ("service", "payments")],
        &["db"],
    );
}

#[test]
fn the_reference_timings_through_four_levels_and_a_repeat() {
    let p = planner();
    let walk = |severity: Severity| -> Vec<(u32, u32, u64)> {
        let (mut level, mut repeat, mut t) = (0u32, 0u32, 0u64);
        let mut out = vec![(level, repeat, t)];
        while let Next::Level {
            level: l,
            repeat: r,
            after,
        } = p.next("default", level, repeat, severity)
        {
            t += after.as_secs() / 60;
            (level, repeat) = (l, r);
            out.push((level, repeat, t));
        }
        out
    };
    // (level, repeat, minutes after the incident opened)
    assert_eq!(
        walk(Severity::Medium),
        [
            (0, 0, 0),
            (1, 0, 15),
            (2, 0, 30),
            (3, 0, 60),
            (0, 1, 120),
            (1, 1, 135),
            (2, 1, 150),
            (3, 1, 180)
        ]
    );
    // High escalates off level 0 after 5 minutes; low after an hour.
    assert_eq!(walk(Severity::High)[1], (1, 0, 5));
    assert_eq!(walk(Severity::Low)[1], (1, 0, 60));
    assert_eq!(p.next("default", 3, 1, Severity::Medium), Next::Exhausted);
}

#[test]
fn severity_picks_the_reference_channel_sets() {
    let p = planner();
    let check = |severity: Severity, expected: &[(Channel, u64)]| {
        let got: Vec<(Channel, u64)> = p
            .user_pages("alice", severity, None)
            .iter()
            .map(|pg| (pg.channel, pg.after.as_secs()))
            .collect();
        assert_eq!(got, expected, "{severity:?}");
    };
    check(
        Severity::Critical,
        &[
            (Channel::Sms, 0),
            (Channel::Email, 0),
            (Channel::Slack, 0),
            (Channel::Sms, 300),
        ],
    );
    check(Severity::High, &[(Channel::Sms, 0), (Channel::Email, 0)]);
    check(
        Severity::Medium,
        &[(Channel::Email, 0), (Channel::Slack, 0)],
    );
    check(Severity::Low, &[(Channel::Email, 0), (Channel::Slack, 0)]);
    check(Severity::Info, &[(Channel::Email, 0)]);
    // Only channels the user can be reached on: bob has no Slack.
    let bob: Vec<Channel> = p
        .user_pages("bob", Severity::Medium, None)
        .iter()
        .map(|pg| pg.channel)
        .collect();
    assert_eq!(bob, [Channel::Email]);
    // A user's own rules win.
    let cto: Vec<(Channel, u64)> = p
        .user_pages("cto", Severity::Critical, None)
        .iter()
        .map(|pg| (pg.channel, pg.after.as_secs()))
        .collect();
    assert_eq!(cto, [(Channel::Sms, 0), (Channel::Email, 600)]);
}

#[test]
fn levels_page_whoever_is_on_call_and_report_empty_levels() {
    let p = planner();
    let inc = incident(Severity::High, &[]);
    let wednesday_week1: Timestamp = "2026-01-07T10:00:00Z".parse().unwrap();
    let wednesday_week2: Timestamp = "2026-01-14T10:00:00Z".parse().unwrap();
    let who = |level: u32, at: Timestamp| -> Vec<String> {
        p.level("default", level, &inc, at)
            .pages
            .iter()
            .map(|pg| format!("{}/{}", pg.target.key(), pg.channel.as_str()))
            .collect()
    };
    // Weekly rotation from Monday 2026-01-05: alice, then bob.
    assert_eq!(
        who(0, wednesday_week1),
        ["user:alice/sms", "user:alice/email"]
    );
    assert_eq!(who(0, wednesday_week2), ["user:bob/sms", "user:bob/email"]);
    assert_eq!(who(1, wednesday_week1), ["user:bob/sms", "user:bob/email"]);
    let l0 = p.level("default", 0, &inc, wednesday_week1);
    assert!(
        matches!(&l0.pages[0].target, PageTarget::User { schedule: Some(s), .. } if s == "primary")
    );

    // db level 0: the schedule is empty but the Slack channel is paged.
    let db = p.level("db", 0, &inc, wednesday_week1);
    assert_eq!(db.pages.len(), 1);
    assert_eq!(
        db.pages[0].target,
        PageTarget::SlackChannel {
            channel: "#db-alerts".into()
        }
    );
    assert_eq!(db.empty, None);
    // db level index 1 (the second level, "level 2" to people) only pages in Berlin business hours.
    let saturday: Timestamp = "2026-01-10T10:00:00Z".parse().unwrap();
    // High pages by SMS and email; the lead has no phone, so email only.
    let lead = p.level("db", 1, &inc, wednesday_week1);
    assert_eq!(
        lead.pages.iter().map(|pg| pg.channel).collect::<Vec<_>>(),
        [Channel::Email]
    );
    let off = p.level("db", 1, &inc, saturday);
    assert!(off.pages.is_empty());
    assert_eq!(
        off.empty.as_deref(),
        Some("level 2 is outside its active hours")
    );
    assert!(p.skip_empty_levels("db"));
    assert_eq!(
        p.level("db", 2, &inc, saturday).pages[0].channel,
        Channel::Pagerduty
    );
    let next = p.next("db", 0, 0, Severity::High);
    assert_eq!(
        next,
        Next::Level {
            level: 1,
            repeat: 0,
            after: Duration::from_secs(900)
        },
        "default delay 15m"
    );
}

#[test]
fn config_mistakes_are_all_reported_with_the_fix() {
    let check = |yaml: &str, expected: &[&str]| {
        let cfg: EscalationConfig = serde_yaml_ng::from_str(yaml).unwrap();
        let errors = Planner::new(&cfg).err().unwrap_or_default();
        for e in expected {
            assert!(
                errors.iter().any(|x| x.contains(e)),
                "{yaml}\n{errors:#?}\nlacks {e:?}"
            );
        }
    };
    check(
        "route: {policy: web-oncall}\npolicies: [{name: default, levels: [{targets: [{user: a}]}]}]\nusers: [{name: a, email: a@x}]\n",
        &["route names policy \"web-oncall\", which is not defined (defined: default)"],
    );
    check(
        "route: {policy: p}\npolicies: [{name: p, levels: [{targets: [{schedule: nope}, {user: ghost}, {user: mute}]}]}]\nusers: [{name: mute}]\n",
        &[
            "names schedule \"nope\", which is not defined",
            "pages user \"ghost\", who is not defined (defined: mute)",
            "pages user \"mute\", who has no contact method",
        ],
    );
    check(
        "schedules: [{name: s, timezone: Mars/Olympus, layers: []}]\n",
        &["Mars/Olympus"],
    );
    check(
        "users: [{name: a, email: a@x, rules: {critical: [{channels: [sms]}]}}]\n",
        &["rule for critical uses sms but the user has no phone"],
    );
    check(
        "route: {}\npolicies: [{name: p, levels: []}]\n",
        &[
            "policy \"p\" has no levels",
            "route (the root) has no policy",
        ],
    );
}
