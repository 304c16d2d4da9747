//! Escalation through the real bus on a manual clock: levels at the
//! reference timings, channels by severity, ack stops it, resolve ends it,
//! every step on the timeline, no page twice.

use jiff::SignedDuration;
use tocsin_proto::{
    command::{Action, CommandReply, IncidentRef},
    incident::EventKind,
    notify::{Channel, Page, PageTarget},
    AlertStatus,
};
use tocsin_tests::{
    escalation::{expect_pages, pages, REFERENCE},
    incidents::{alert, command, get, publish_alert, wait_for},
    NatsServer, TocsinHarness,
};

fn who(p: &Page) -> String {
    match &p.target {
        PageTarget::User { name, .. } => format!("{name}/{}", p.channel.as_str()),
        other => format!("{}/{}", other.key(), p.channel.as_str()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn levels_fire_on_time_and_an_ack_stops_them() {
    let nats = NatsServer::start().await;
    let mut config = TocsinHarness::config(&nats);
    config.escalation = serde_yaml_ng::from_str(REFERENCE).unwrap();
    let tocsin = TocsinHarness::start_with(config).await;
    let client = nats.client().await;
    let js = async_nats::jetstream::new(client.clone());
    let t0 = tocsin.clock_now();
    let mins = |m: i64| t0 + SignedDuration::from_mins(m);

    // A medium incident: level 0 pages alice (primary) by email and Slack.
    let labels = [
        ("alertname", "DiskFilling"),
        ("host", "db1"),
        ("severity", "warning"),
    ];
    publish_alert(
        &js,
        alert(&labels, &["alertname", "host"], AlertStatus::Firing, t0),
        t0,
    )
    .await;
    let p = expect_pages(&tocsin, &js, 2).await;
    assert_eq!(
        p.iter().map(who).collect::<Vec<_>>(),
        ["alice/email", "alice/slack"]
    );
    assert_eq!(p[0].level, 0);
    assert_eq!(p[0].address, "alice@example.com");
    assert_eq!(p[1].address, "U01ALICE");
    assert!(matches!(&p[0].target, PageTarget::User { schedule: Some(s), .. } if s == "primary"));
    assert_eq!(p[0].incident.number, 1);
    assert_eq!(p[0].subject(), "tocsin.notify.email");

    // Nothing more before 15 minutes; level 1 (bob, email only) at 15.
    tocsin.clock.set(mins(14));
    expect_pages(&tocsin, &js, 2).await;
    tocsin.clock.set(mins(15));
    let p = expect_pages(&tocsin, &js, 3).await;
    assert_eq!(who(&p[2]), "bob/email");
    assert_eq!(p[2].level, 1);
    assert_eq!(p[2].due_at, mins(15));

    // Level 2 (the lead) at 30.
    tocsin.clock.set(mins(30));
    let p = expect_pages(&tocsin, &js, 5).await;
    assert_eq!(
        p[3..].iter().map(who).collect::<Vec<_>>(),
        ["lead/email", "lead/slack"]
    );

    // Bob acknowledges: level 3 (at 60) never comes.
    let r = command(
        &client,
        &js,
        "bob",
        Action::Ack {
            incident: IncidentRef::Number(1),
        },
        mins(31),
    )
    .await;
    assert!(matches!(r, CommandReply::Accepted { .. }), "{r:?}");
    tocsin.clock.set(mins(61));
    expect_pages(&tocsin, &js, 5).await;

    // Every step is on the timeline, with who was paged.
    let d = get(&client, IncidentRef::Number(1)).await;
    let paged: Vec<(u32, Vec<String>)> = d
        .timeline
        .iter()
        .filter_map(|e| match &e.kind {
            EventKind::Paged { level, pages, .. } => Some((*level, pages.clone())),
            _ => None,
        })
        .collect();
    assert_eq!(paged.len(), 3, "{paged:?}");
    assert_eq!(
        paged[0].1,
        [
            "alice (on call for primary) via email",
            "alice (on call for primary) via slack"
        ]
    );
    assert_eq!(paged[2].1, ["lead via email", "lead via slack"]);

    // No page twice: ids unique.
    let mut ids: Vec<String> = pages(&js).await.into_iter().map(|p| p.id).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 5);

    // `tocsin_escalation_busy_seconds` tells where the loop's time went
    // (applying entries, asking INCIDENTS where it ends, firing, waiting
    // for the pages and the timeline records to be stored, saving), so an
    // operator whose pages leave late can see whether it waits on the bus
    // or works: each of those stages was counted.
    tocsin_tests::assert_busy_stages_counted(
        &tocsin.metrics().await,
        "tocsin_escalation_busy_seconds_total",
        &["apply", "info", "fire", "pages", "records", "save"],
        "three levels paged",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn high_severity_escalates_faster_and_resolve_ends_it() {
    let nats = NatsServer::start().await;
    let mut config = TocsinHarness::config(&nats);
    config.escalation = serde_yaml_ng::from_str(REFERENCE).unwrap();
    let tocsin = TocsinHarness::start_with(config).await;
    let client = nats.client().await;
    let js = async_nats::jetstream::new(client.clone());
    let t0 = tocsin.clock_now();
    let mins = |m: i64| t0 + SignedDuration::from_mins(m);

    let labels = [("alertname", "ApiDown"), ("severity", "P1")];
    publish_alert(
        &js,
        alert(&labels, &["alertname"], AlertStatus::Firing, t0),
        t0,
    )
    .await;
    // High: SMS + email for alice at once.
    let p = expect_pages(&tocsin, &js, 2).await;
    assert_eq!(
        p.iter().map(who).collect::<Vec<_>>(),
        ["alice/sms", "alice/email"]
    );
    assert_eq!(p[0].channel, Channel::Sms);
    assert_eq!(p[0].address, "+14155550101");
    // Level 1 after 5 minutes, not 15.
    tocsin.clock.set(mins(5));
    let p = expect_pages(&tocsin, &js, 4).await;
    assert_eq!(
        p[2..].iter().map(who).collect::<Vec<_>>(),
        ["bob/sms", "bob/email"]
    );

    // Resolved: nothing more, ever.
    publish_alert(
        &js,
        alert(&labels, &["alertname"], AlertStatus::Resolved, t0),
        mins(6),
    )
    .await;
    wait_for(&client, "resolved", |all| {
        all[0].status == tocsin_proto::incident::IncidentStatus::Resolved
    })
    .await;
    tocsin.settled(&js).await;
    tocsin.clock.set(mins(200));
    expect_pages(&tocsin, &js, 4).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snooze_pauses_then_resumes_and_escalate_now_skips_the_wait() {
    let nats = NatsServer::start().await;
    let mut config = TocsinHarness::config(&nats);
    config.escalation = serde_yaml_ng::from_str(REFERENCE).unwrap();
    let tocsin = TocsinHarness::start_with(config).await;
    let client = nats.client().await;
    let js = async_nats::jetstream::new(client.clone());
    let t0 = tocsin.clock_now();
    let mins = |m: i64| t0 + SignedDuration::from_mins(m);
    let n1 = || IncidentRef::Number(1);

    let labels = [("alertname", "QueueLag"), ("severity", "warning")];
    publish_alert(
        &js,
        alert(&labels, &["alertname"], AlertStatus::Firing, t0),
        t0,
    )
    .await;
    expect_pages(&tocsin, &js, 2).await; // alice: email + slack

    // Snoozed for 30 minutes: level 1, due at 15, does not come.
    tocsin.clock.set(mins(1));
    let r = command(
        &client,
        &js,
        "alice",
        Action::Snooze {
            incident: n1(),
            seconds: 1800,
        },
        mins(1),
    )
    .await;
    assert!(matches!(r, CommandReply::Accepted { .. }), "{r:?}");
    tocsin.clock.set(mins(20));
    expect_pages(&tocsin, &js, 2).await;

    // The snooze ends at 31: the current responder is paged again (new page
    // ids: a new generation), and the levels go on from there.
    tocsin.clock.set(mins(31));
    let p = expect_pages(&tocsin, &js, 4).await;
    assert_eq!(
        p[2..].iter().map(who).collect::<Vec<_>>(),
        ["alice/email", "alice/slack"]
    );
    assert_ne!(p[2].id, p[0].id);

    // Escalate now: level 1 at once instead of at 46.
    tocsin.clock.set(mins(32));
    let r = command(
        &client,
        &js,
        "alice",
        Action::Escalate {
            incident: n1(),
            reason: "need the DB expert".into(),
        },
        mins(32),
    )
    .await;
    assert!(matches!(r, CommandReply::Accepted { .. }), "{r:?}");
    let p = expect_pages(&tocsin, &js, 5).await;
    assert_eq!(who(&p[4]), "bob/email");
    assert_eq!(p[4].level, 1);
    // ...and level 2 follows 15 minutes after that.
    tocsin.clock.set(mins(46));
    expect_pages(&tocsin, &js, 5).await;
    tocsin.clock.set(mins(47));
    let p = expect_pages(&tocsin, &js, 7).await;
    assert_eq!(
        p[5..].iter().map(who).collect::<Vec<_>>(),
        ["lead/email", "lead/slack"]
    );
}
