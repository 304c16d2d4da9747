//! The escalation service's queries over the real bus and its calendar
//! server, on a manual clock: who is on call, an incident's plan (pending,
//! then paused by an acknowledgement), the schedules, the `.ics` feed.

use std::time::Duration;

use async_nats::Client;
use jiff::SignedDuration;
use tocsin_proto::{
    command::{Action, CommandReply, IncidentRef},
    query::{
        ListSchedules, OnCallQuery, OnCallReply, PlanQuery, PlanReply, ScheduleList, TrackStatus,
    },
    subjects::query,
    AlertStatus,
};
use tocsin_tests::{
    escalation::REFERENCE,
    incidents::{alert, ask, command, publish_alert, wait_for},
    NatsServer, TocsinHarness,
};

async fn plan(client: &Client, incident: uuid::Uuid) -> PlanReply {
    ask(client, query::ESCALATION_PLAN, &PlanQuery { incident }).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_call_plan_and_calendar() {
    let nats = NatsServer::start().await;
    let mut config = TocsinHarness::config(&nats);
    config.escalation = serde_yaml_ng::from_str(REFERENCE).unwrap();
    let tocsin = TocsinHarness::start_with(config).await;
    let client = nats.client().await;
    let js = async_nats::jetstream::new(client.clone());
    let t0 = tocsin.clock_now();
    let mins = |m: i64| t0 + SignedDuration::from_mins(m);

    // On call now (the service's clock) and at a chosen instant.
    let q = OnCallQuery {
        schedule: "primary".into(),
        at: None,
    };
    let OnCallReply::OnCall(v) = ask(&client, query::ESCALATION_ONCALL, &q).await else {
        panic!("expected an answer");
    };
    assert_eq!((v.at, v.user.as_deref()), (t0, Some("alice")));
    let q = OnCallQuery {
        schedule: "secondary".into(),
        at: Some(mins(60)),
    };
    let OnCallReply::OnCall(v) = ask(&client, query::ESCALATION_ONCALL, &q).await else {
        panic!("expected an answer");
    };
    assert_eq!((v.at, v.user.as_deref()), (mins(60), Some("bob")));
    let q = OnCallQuery {
        schedule: "tertiary".into(),
        at: None,
    };
    let r: OnCallReply = ask(&client, query::ESCALATION_ONCALL, &q).await;
    assert_eq!(
        r,
        OnCallReply::Error {
            reason: "no schedule \"tertiary\" (defined: primary, secondary)".into()
        }
    );
    let s: ScheduleList = ask(&client, query::ESCALATION_SCHEDULES, &ListSchedules {}).await;
    assert_eq!(s.schedules, ["primary", "secondary"]);

    // An incident: level 0 pages at once; the plan shows what comes next.
    let labels = [("alertname", "DiskFilling"), ("severity", "warning")];
    publish_alert(
        &js,
        alert(&labels, &["alertname"], AlertStatus::Firing, t0),
        t0,
    )
    .await;
    let id = wait_for(&client, "the incident", |all| all.len() == 1).await[0].id;
    let mut tracks = Vec::new();
    for _ in 0..200 {
        if let PlanReply::Plan { tracks: t, .. } = plan(&client, id).await {
            if t.iter().all(|t| t.next_level == 1) {
                tracks = t;
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(tracks.len(), 1, "level 0 never fired");
    let t = &tracks[0];
    assert_eq!(
        (t.policy.as_str(), t.status, t.next_at),
        ("default", TrackStatus::Pending, Some(mins(15)))
    );
    let upcoming: Vec<_> = t
        .upcoming
        .iter()
        .map(|s| (s.level, s.at, s.pages.clone()))
        .collect();
    assert_eq!(
        upcoming,
        [
            (
                1,
                mins(15),
                vec!["bob (on call for secondary) via email".to_string()]
            ),
            (
                2,
                mins(30),
                vec!["lead via email".into(), "lead via slack".into()]
            ),
            (
                3,
                mins(60),
                vec!["cto via email".into(), "em via email".into()]
            ),
        ]
    );

    // Acknowledged: paused, nothing upcoming.
    let r = command(
        &client,
        &js,
        "alice",
        Action::Ack {
            incident: IncidentRef::Id(id),
        },
        mins(1),
    )
    .await;
    assert!(matches!(r, CommandReply::Accepted { .. }), "{r:?}");
    let mut status = None;
    for _ in 0..200 {
        if let PlanReply::Plan { tracks, .. } = plan(&client, id).await {
            status = Some(tracks[0].status);
            if status == Some(TrackStatus::Paused) {
                assert!(tracks[0].upcoming.is_empty());
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(status, Some(TrackStatus::Paused));
    let r: PlanReply = ask(
        &client,
        query::ESCALATION_PLAN,
        &PlanQuery {
            incident: uuid::Uuid::nil(),
        },
    )
    .await;
    assert!(matches!(r, PlanReply::Error { .. }), "{r:?}");

    // The calendar server.
    let http = reqwest::Client::new();
    let r = http
        .get(format!("{}/calendars/primary.ics", tocsin.calendar_url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.headers()["content-type"].to_str().unwrap(),
        "text/calendar; charset=utf-8"
    );
    let body = r.text().await.unwrap();
    assert!(
        body.contains("SUMMARY:On call: alice (primary)\r\n"),
        "{body}"
    );
    let r = http
        .get(format!("{}/oncall/secondary", tocsin.calendar_url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["user"], "bob");
    assert_eq!(v["at"], t0.to_string());
    let r = http
        .get(format!("{}/oncall/nope", tocsin.calendar_url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["error"], "not_found");

    tocsin.stop().await.unwrap();
}
