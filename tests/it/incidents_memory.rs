//! Resolved incidents leave memory once the reopen window has passed, and
//! come back from the store whenever an input or a query touches them: the
//! service's memory follows the open incidents, not its whole history, and
//! no decision changes because of it.

use jiff::SignedDuration;
use tocsin_proto::{
    command::{Action, CommandReply, IncidentRef},
    incident::IncidentStatus,
    query::ListIncidents,
    AlertStatus,
};
use tocsin_tests::{
    incidents::{alert, command, get, list, log, publish_alert, wait_for},
    NatsServer, TocsinHarness,
};

/// The value of an unlabelled metric line `name` in `/metrics`.
fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("{name} not in /metrics"))
}

#[tokio::test]
async fn an_evicted_incident_still_answers_repeats_commands_and_queries() {
    let nats = NatsServer::start().await;
    let tocsin = TocsinHarness::start(&nats).await; // reopen_window: 1h (default)
    let client = nats.client().await;
    let js = async_nats::jetstream::new(client.clone());
    let t0 = tocsin.clock_now();
    let at = |min: i64| t0 + SignedDuration::from_mins(min);
    let group = ["alertname", "service"];
    let api = [("alertname", "HighLatency"), ("service", "api")];
    let db = [("alertname", "DiskFull"), ("service", "db")];

    // #1 opens, and a human resolves it while its alert still fires.
    publish_alert(&js, alert(&api, &group, AlertStatus::Firing, at(0)), at(0)).await;
    wait_for(&client, "incident #1", |all| all.len() == 1).await;
    let m = tocsin.metrics().await;
    assert_eq!(metric(&m, "tocsin_incidents_open"), 1.0, "{m}");
    assert_eq!(
        metric(&m, "tocsin_incidents_in_memory"),
        1.0,
        "a new incident is in memory as soon as it opens"
    );
    let reply = command(
        &client,
        &js,
        "alice",
        Action::Resolve {
            incident: IncidentRef::Number(1),
        },
        at(1),
    )
    .await;
    assert!(matches!(reply, CommandReply::Accepted { .. }), "{reply:?}");

    // Two hours on, another incident's input saves the projection: #1,
    // resolved for longer than the reopen window, leaves memory.
    tocsin.settle(&js, at(120)).await;
    publish_alert(
        &js,
        alert(&db, &group, AlertStatus::Firing, at(120)),
        at(120),
    )
    .await;
    wait_for(&client, "incident #2", |all| all.len() == 2).await;
    let m = tocsin.metrics().await;
    assert_eq!(metric(&m, "tocsin_incidents_evicted_total"), 1.0, "{m}");
    assert_eq!(
        metric(&m, "tocsin_incidents_in_memory"),
        1.0,
        "only #2 stays"
    );

    // Queries read it from the store.
    let detail = get(&client, IncidentRef::Number(1)).await;
    assert_eq!(detail.incident.status, IncidentStatus::Resolved);
    assert_eq!(detail.alerts.len(), 1);
    assert_eq!(detail.timeline.len(), 2, "opened, resolved");
    let resolved = list(
        &client,
        ListIncidents {
            status: vec![IncidentStatus::Resolved],
            ..Default::default()
        },
    )
    .await;
    assert_eq!(
        resolved.iter().map(|i| i.number).collect::<Vec<_>>(),
        [1],
        "the resolved list includes the one out of memory"
    );
    let all = list(&client, ListIncidents::default()).await;
    assert_eq!(all.iter().map(|i| i.number).collect::<Vec<_>>(), [2, 1]);

    // Alertmanager repeats #1's alert (same start): it was firing when #1
    // was resolved, so it is not a new problem. Deciding that needs #1's
    // alerts, which only the store has now.
    let before = log(&js).await.len();
    publish_alert(
        &js,
        alert(&api, &group, AlertStatus::Firing, at(0)),
        at(121),
    )
    .await;
    // A note on #1 (a command by number) applies to the incident out of memory.
    let reply = command(
        &client,
        &js,
        "bob",
        Action::Note {
            incident: IncidentRef::Number(1),
            text: "post-mortem filed".into(),
        },
        at(122),
    )
    .await;
    assert!(matches!(reply, CommandReply::Accepted { .. }), "{reply:?}");
    tocsin.settled(&js).await;
    let entries = log(&js).await;
    assert_eq!(
        entries.len(),
        before + 1,
        "the note only: the repeat opened nothing ({:?})",
        &entries[before..]
    );
    let all = list(&client, ListIncidents::default()).await;
    assert_eq!(all.len(), 2, "no third incident");
    let m = tocsin.metrics().await;
    assert!(metric(&m, "tocsin_incidents_restored_total") >= 2.0, "{m}");
    assert_eq!(
        metric(&m, "tocsin_incidents_in_memory"),
        1.0,
        "#1 left memory again once saved"
    );

    // A new alert for #1's group after the window opens a new incident.
    publish_alert(
        &js,
        alert(&api, &group, AlertStatus::Firing, at(130)),
        at(130),
    )
    .await;
    let all = wait_for(&client, "incident #3", |all| all.len() == 3).await;
    let third = all.iter().find(|i| i.number == 3).unwrap();
    assert_eq!(
        third.dedup_key,
        all.iter().find(|i| i.number == 1).unwrap().dedup_key
    );
    tocsin.stop().await.unwrap();
}
