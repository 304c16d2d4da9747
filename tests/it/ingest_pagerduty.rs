//! PagerDuty Events API v2-compatible endpoint through the real bus.

use serde_json::json;
use tocsin_proto::AlertStatus;
use tocsin_tests::{bus, http, NatsServer, TocsinHarness};

#[tokio::test]
async fn trigger_acknowledge_resolve_with_one_dedup_key() {
    let nats = NatsServer::start().await;
    let tocsin = TocsinHarness::start(&nats).await;
    let client = reqwest::Client::new();
    let url = format!("{}/v2/enqueue", tocsin.ingest_url);
    // A PagerDuty sender only knows its routing key: no Authorization header.
    let key = tocsin.token.clone();

    let trigger = json!({
        "routing_key": key, "event_action": "trigger", "dedup_key": "srv01/HTTP",
        "payload": {"summary": "HTTP check failed on srv01", "source": "srv01.example.com",
                    "severity": "error", "component": "nginx", "group": "web", "class": "http-check",
                    "custom_details": {"status": 502}},
        "client": "Monitoring", "client_url": "https://monitoring.example/checks/1"
    });
    let a = http::post(&client, &url, None, trigger.to_string()).await;
    assert_eq!(a.status, 202, "{}", a.text);
    assert_eq!(
        a.json,
        json!({"status": "success", "message": "Event processed", "dedup_key": "srv01/HTTP"})
    );

    for action in ["acknowledge", "resolve"] {
        let ev = json!({"routing_key": key, "event_action": action, "dedup_key": "srv01/HTTP"});
        let a = http::post(&client, &url, None, ev.to_string()).await;
        assert_eq!(a.status, 202, "{action}: {}", a.text);
        assert_eq!(a.json["dedup_key"], "srv01/HTTP");
    }

    let js = async_nats::jetstream::new(nats.client().await);
    let stored = bus::read_alerts(&js).await;
    let statuses: Vec<AlertStatus> = stored.iter().map(|m| m.envelope.body.status).collect();
    assert_eq!(
        statuses,
        [
            AlertStatus::Firing,
            AlertStatus::Acknowledged,
            AlertStatus::Resolved
        ]
    );
    let fp = &stored[0].envelope.body.fingerprint;
    for m in &stored {
        assert_eq!(
            &m.envelope.body.fingerprint, fp,
            "one dedup key, one fingerprint"
        );
        assert_eq!(m.envelope.body.dedup_key.as_deref(), Some("srv01/HTTP"));
        assert!(m.subject.starts_with("tocsin.alerts.pagerduty."));
    }
    let t = &stored[0].envelope.body;
    assert_eq!(t.labels["severity"], "error");
    assert_eq!(t.annotations["summary"], "HTTP check failed on srv01");

    // The same trigger again at the same receive time (the test's clock
    // stands still) has the same message id: stored once. (A retry at a
    // later time is stored and changes nothing: see below.)
    let a = http::post(&client, &url, None, trigger.to_string()).await;
    assert_eq!(a.status, 202);
    assert_eq!(bus::count_alerts(&js).await, 3);

    // A trigger without dedup_key gets one, as at PagerDuty.
    let a = http::post(
        &client,
        &url,
        Some(&tocsin.token),
        json!({"routing_key": "anything-with-bearer", "event_action": "trigger",
               "payload": {"summary": "s", "source": "x", "severity": "info"}})
        .to_string(),
    )
    .await;
    assert_eq!(a.status, 202, "{}", a.text);
    assert_eq!(a.json["dedup_key"].as_str().map(str::len), Some(32));
}

#[tokio::test]
async fn invalid_events_get_pagerdutys_400_shape() {
    let nats = NatsServer::start().await;
    let tocsin = TocsinHarness::start(&nats).await;
    let client = reqwest::Client::new();
    let url = format!("{}/v2/enqueue", tocsin.ingest_url);

    let check = |body: serde_json::Value, status: u16, fragment: &'static str| {
        let (client, url) = (client.clone(), url.clone());
        async move {
            let a = http::post(&client, &url, None, body.to_string()).await;
            assert_eq!(a.status, status, "{body}: {}", a.text);
            let errors = a.json["errors"].as_array().expect("errors array");
            assert!(
                errors
                    .iter()
                    .any(|e| e.as_str().unwrap_or("").contains(fragment)),
                "{body}: {errors:?} lacks {fragment}"
            );
            a
        }
    };
    let a = check(json!({"event_action": "trigger", "payload": {"summary": "s", "source": "x", "severity": "info"}}), 400, "'routing_key' is missing").await;
    assert_eq!(a.json["status"], "invalid event");
    assert_eq!(a.json["message"], "Event object is invalid");
    check(
        json!({"routing_key": tocsin.token, "event_action": "fire", "dedup_key": "k"}),
        400,
        "'event_action' is invalid",
    )
    .await;
    check(
        json!({"routing_key": tocsin.token, "event_action": "resolve"}),
        400,
        "'dedup_key' is missing",
    )
    .await;
    check(json!({"routing_key": tocsin.token, "event_action": "trigger", "payload": {"summary": "s", "source": "x", "severity": "fatal"}}), 400, "'payload.severity' is invalid").await;
    let a = check(
        json!({"routing_key": "not-a-known-key-0000000000000000", "event_action": "trigger"}),
        401,
        "not a known integration key",
    )
    .await;
    assert_eq!(a.json["status"], "unauthorized");

    let js = async_nats::jetstream::new(nats.client().await);
    assert_eq!(
        bus::count_alerts(&js).await,
        0,
        "nothing invalid reached the bus"
    );
}

/// A check that flaps sends the same trigger body again after its resolve
/// (PagerDuty events carry no time unless `payload.timestamp` is set). At
/// PagerDuty that trigger is a new problem; here it reopens the incident.
/// Before, the message id of an event without a timestamp was a digest of
/// its body, so within JetStream's duplicate window (2 minutes) the second
/// trigger was dropped as a retry: answered 202 and lost. A retried
/// trigger (the same body again while it fires) still changes nothing:
/// the incidents service holds the alert as it is.
#[tokio::test]
async fn the_same_trigger_after_a_resolve_reopens_and_a_retry_changes_nothing() {
    use jiff::SignedDuration;
    use tocsin_proto::{command::IncidentRef, incident::IncidentStatus};
    use tocsin_tests::incidents::{get, wait_for};

    let nats = NatsServer::start().await;
    let tocsin = TocsinHarness::start(&nats).await;
    let client = reqwest::Client::new();
    let nc = nats.client().await;
    let js = async_nats::jetstream::new(nc.clone());
    let url = format!("{}/v2/enqueue", tocsin.ingest_url);
    let key = tocsin.token.clone();
    let event = |action: &str| {
        json!({
            "routing_key": key, "event_action": action, "dedup_key": "srv02/disk",
            "payload": {"summary": "disk full on srv02", "source": "srv02", "severity": "critical"}
        })
        .to_string()
    };
    let send = |action: &'static str| {
        let (client, url, body) = (client.clone(), url.clone(), event(action));
        async move {
            let a = http::post(&client, &url, None, body).await;
            assert_eq!(a.status, 202, "{action}: {}", a.text);
        }
    };
    send("trigger").await;
    let all = wait_for(&nc, "one incident triggered", |all| {
        all.len() == 1 && all[0].status == IncidentStatus::Triggered
    })
    .await;
    let id = all[0].id;
    // The sender retries the trigger (its answer was lost) a second later.
    tocsin.clock.advance(SignedDuration::from_secs(1));
    send("trigger").await;
    tocsin.clock.advance(SignedDuration::from_secs(10));
    send("resolve").await;
    wait_for(&nc, "the incident resolved", |all| {
        all.len() == 1 && all[0].status == IncidentStatus::Resolved
    })
    .await;
    // The check fails again a minute later: the same body.
    tocsin.clock.advance(SignedDuration::from_mins(1));
    send("trigger").await;
    assert_eq!(
        bus::count_alerts(&js).await,
        4,
        "every event is stored, the trigger after the resolve too"
    );
    let all = wait_for(&nc, "the incident reopened", |all| {
        all.len() == 1 && all[0].status == IncidentStatus::Triggered
    })
    .await;
    assert_eq!(all[0].reopen_count, 1);
    let detail = get(&nc, IncidentRef::Id(id)).await;
    let kinds: Vec<&str> = detail.timeline.iter().map(|e| e.kind.name()).collect();
    assert_eq!(
        kinds,
        [
            "opened",
            "alert_resolved",
            "resolved",
            "reopened",
            "alert_firing"
        ],
        "the retried trigger wrote nothing"
    );
}
