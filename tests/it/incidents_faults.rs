//! Bad input on the bus, timers on an injected clock.

use jiff::{SignedDuration, Timestamp};
use tocsin_proto::{
    command::{Action, IncidentRef},
    incident::IncidentStatus,
    subjects::{headers, STREAM_DEADLETTER},
    AlertStatus,
};
use tocsin_tests::{
    bus, http,
    incidents::{alert, command, get, publish_alert, wait_for},
    NatsServer, TocsinHarness,
};

#[tokio::test]
async fn undecodable_alerts_go_to_the_dead_letter_subject_and_are_counted() {
    let nats = NatsServer::start().await;
    let tocsin = TocsinHarness::start(&nats).await;
    let client = nats.client().await;
    let js = async_nats::jetstream::new(client.clone());
    for junk in [&b"not msgpack at all"[..], b"\x81\xa6schema\x07"] {
        js.publish(
            "tocsin.alerts.generic.cbf29ce484222325",
            junk.to_vec().into(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    }
    // The service keeps running: a good alert after the junk is handled.
    let now = Timestamp::now();
    publish_alert(
        &js,
        alert(
            &[("alertname", "AfterJunk")],
            &["alertname"],
            AlertStatus::Firing,
            now,
        ),
        now,
    )
    .await;
    wait_for(&client, "the good alert's incident", |all| all.len() == 1).await;

    // The payloads are junk by definition: read the raw messages.
    let mut stream = js.get_stream(STREAM_DEADLETTER).await.unwrap();
    let info = stream.info().await.unwrap().state.clone();
    assert_eq!(info.messages, 2);
    for seq in info.first_sequence..=info.last_sequence {
        let m = stream.get_raw_message(seq).await.unwrap();
        assert_eq!(m.subject.as_str(), "tocsin.dlq.alerts");
        let reason = m.headers.get(headers::DLQ_REASON).unwrap().to_string();
        assert!(reason.contains("not valid Tocsin MessagePack"), "{reason}");
        assert_eq!(
            m.headers.get(headers::DLQ_SUBJECT).unwrap().as_str(),
            "tocsin.alerts.generic.cbf29ce484222325"
        );
    }
    let metrics = http::get(
        &reqwest::Client::new(),
        &format!("{}/metrics", tocsin.admin_url),
    )
    .await
    .text;
    assert!(
        metrics.contains(
            r#"tocsin_incidents_dead_letters_total{stream="ALERTS",reason="undecodable"} 2"#
        ),
        "{metrics}"
    );
}

#[tokio::test]
async fn snooze_ends_on_the_clock_and_missed_heartbeats_open_incidents() {
    let nats = NatsServer::start().await;
    let mut config = TocsinHarness::config(&nats);
    config.incidents = serde_yaml_ng::from_str(
        "heartbeats:\n  - name: nightly-backup\n    interval: 1h\n    labels: {severity: high, team: storage}\n",
    )
    .unwrap();
    let tocsin = TocsinHarness::start_with(config).await;
    let client = nats.client().await;
    let js = async_nats::jetstream::new(client.clone());
    let http_client = reqwest::Client::new();
    let ping = format!("{}/api/v1/heartbeat/nightly-backup", tocsin.ingest_url);

    // A ping for a heartbeat nobody configured is refused, naming the
    // configured ones: it would never be checked.
    let unknown = format!("{}/api/v1/heartbeat/nightly-backups", tocsin.ingest_url);
    let a = http::post(&http_client, &unknown, Some(&tocsin.token), "").await;
    assert_eq!(a.status, 404, "{}", a.text);
    assert_eq!(a.json["error"], "unknown_heartbeat", "{}", a.text);
    let reason = a.json["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("\"nightly-backups\"") && reason.contains("configured: nightly-backup"),
        "{}",
        a.text
    );

    // The ingest endpoint puts a heartbeat ping on the bus.
    let a = http::post(&http_client, &ping, Some(&tocsin.token), "").await;
    assert_eq!(a.status, 200, "{}", a.text);
    let pings = bus::read_alerts(&js).await;
    assert_eq!(pings.len(), 1);
    assert_eq!(
        pings[0].envelope.body.origin.kind,
        Some(tocsin_proto::SourceKind::Heartbeat)
    );
    assert_eq!(pings[0].envelope.body.labels["heartbeat"], "nightly-backup");
    assert!(pings[0].subject.starts_with("tocsin.alerts.heartbeat."));

    // Pings at service-clock times (ingest stamps real time, which this
    // test's clock runs ahead of): one at +30m, then silence.
    let start = tocsin.clock_now();
    let at = |m: i64| start + SignedDuration::from_mins(m);
    tocsin.clock.set(at(30));
    publish_alert(&js, heartbeat_ping("nightly-backup"), at(30)).await;
    tocsin.settled(&js).await;
    tocsin.settle(&js, at(89)).await;
    assert!(
        tocsin_tests::incidents::list(&client, Default::default())
            .await
            .is_empty(),
        "not missed before +90m"
    );
    tocsin.clock.set(at(91));
    let all = wait_for(&client, "a missed-heartbeat incident", |all| all.len() == 1).await;
    let hb = &all[0];
    assert_eq!(
        hb.labels.get("heartbeat").map(String::as_str),
        Some("nightly-backup")
    );
    assert_eq!(hb.labels.get("team").map(String::as_str), Some("storage"));
    assert_eq!(hb.severity, tocsin_proto::incident::Severity::High);
    assert_eq!(hb.opened_at, at(90), "opened at the deadline");
    assert!(
        hb.title.starts_with("Heartbeat nightly-backup missed"),
        "{}",
        hb.title
    );

    // The next ping resolves it.
    publish_alert(&js, heartbeat_ping("nightly-backup"), at(92)).await;
    wait_for(&client, "heartbeat incident resolved", |all| {
        all[0].status == IncidentStatus::Resolved
    })
    .await;

    // Snooze: an alert, snoozed for 30 minutes, is triggered again after.
    let now = tocsin.clock_now();
    publish_alert(
        &js,
        alert(
            &[("alertname", "Flappy")],
            &["alertname"],
            AlertStatus::Firing,
            now,
        ),
        now,
    )
    .await;
    let all = wait_for(&client, "Flappy", |all| all.len() == 2).await;
    let n = IncidentRef::Number(all[0].number);
    let r = command(
        &client,
        &js,
        "alice",
        Action::Snooze {
            incident: n.clone(),
            seconds: 1800,
        },
        now,
    )
    .await;
    assert!(
        matches!(r, tocsin_proto::command::CommandReply::Accepted { .. }),
        "{r:?}"
    );
    assert_eq!(
        get(&client, n.clone()).await.incident.status,
        IncidentStatus::Acknowledged
    );
    tocsin.clock.advance(SignedDuration::from_mins(29));
    tocsin.settled(&js).await;
    assert_eq!(
        get(&client, n.clone()).await.incident.status,
        IncidentStatus::Acknowledged
    );
    tocsin.clock.advance(SignedDuration::from_mins(2));
    wait_for(&client, "snooze over", |all| {
        all.iter()
            .any(|i| i.number == 2 && i.status == IncidentStatus::Triggered)
    })
    .await;
    let d = get(&client, n).await;
    assert_eq!(d.timeline.last().unwrap().kind.name(), "snooze_ended");
    assert_eq!(d.incident.snoozed_until, None);
}

/// A ping as ingest's heartbeat endpoint makes it.
fn heartbeat_ping(name: &str) -> tocsin_proto::Alert {
    let mut a = alert(
        &[("alertname", "HeartbeatPing"), ("heartbeat", name)],
        &[],
        AlertStatus::Resolved,
        Timestamp::now(),
    );
    a.origin.kind = Some(tocsin_proto::SourceKind::Heartbeat);
    a
}
