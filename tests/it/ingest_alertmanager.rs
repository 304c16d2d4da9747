//! Alertmanager webhooks through the real bus.

use tocsin_proto::{
    subjects::{headers, STREAM_ALERTS},
    AlertStatus, Fingerprint, Labels,
};
use tocsin_tests::{bus, http, NatsServer, TocsinHarness};

const PAYLOAD: &str = include_str!("../fixtures/alertmanager_3_alerts.json");

#[tokio::test]
async fn three_alerts_land_once_and_a_retry_adds_nothing() {
    let nats = NatsServer::start().await;
    let tocsin = TocsinHarness::start(&nats).await;
    let client = reqwest::Client::new();
    let url = format!("{}/api/v1/alerts/alertmanager", tocsin.ingest_url);

    let a = http::post(&client, &url, Some(&tocsin.token), PAYLOAD).await;
    assert_eq!(a.status, 200, "{}", a.text);
    assert_eq!(a.json["stored"], 3);
    assert_eq!(a.json["duplicates"], 0);

    let js = async_nats::jetstream::new(nats.client().await);
    let stored = bus::read_alerts(&js).await;
    assert_eq!(stored.len(), 3);

    // Fingerprints: Alertmanager's when given, computed with its algorithm otherwise.
    let computed = Fingerprint::from_labels(&Labels::from_strs(&[
        ("alertname", "HighLatency"),
        ("instance", "api-2:9100"),
        ("service", "api"),
        ("severity", "critical"),
    ]));
    let expected = [
        (
            "1f6c3a7b0e9d2c44",
            AlertStatus::Firing,
            "2025-01-15T10:00:00.123456789Z",
            None,
        ),
        (
            computed.as_str(),
            AlertStatus::Firing,
            "2025-01-15T10:00:30Z",
            None,
        ),
        (
            "9a0b1c2d3e4f5a6b",
            AlertStatus::Resolved,
            "2025-01-15T09:40:00Z",
            Some("2025-01-15T09:55:00.5Z"),
        ),
    ];
    // One message holds the webhook's alerts, in its order: one sync.
    assert_eq!(bus::count(&js, STREAM_ALERTS).await, 1);
    for (msg, (fp, status, starts, ends)) in stored.iter().zip(expected) {
        let alert = &msg.envelope.body;
        assert_eq!(alert.fingerprint.as_str(), fp);
        assert_eq!(alert.status, status);
        assert_eq!(alert.starts_at.to_string(), starts);
        assert_eq!(alert.ends_at.map(|t| t.to_string()).as_deref(), ends);
        assert_eq!(msg.subject, "tocsin.alerts.alertmanager.batch");
        assert_eq!(msg.envelope.source, "test");
        assert_eq!(alert.origin.receiver.as_deref(), Some("tocsin\\.prod"));
        assert_eq!(
            alert.origin.group_labels,
            Labels::from_strs(&[("alertname", "HighLatency"), ("service", "api")])
        );
        assert!(msg
            .headers
            .get(headers::MSG_ID)
            .is_some_and(|id| id.as_str().starts_with("alerts:")));
        assert!(msg.headers.get(headers::TRACEPARENT).is_some());
        assert_eq!(
            msg.envelope.traceparent.as_deref(),
            msg.headers.get(headers::TRACEPARENT).map(|v| v.as_str())
        );
    }
    assert_eq!(
        stored[0].envelope.body.annotations["runbook_url"],
        "https://runbooks.example/high-latency"
    );
    assert_eq!(
        stored[2].envelope.body.generator_url, None,
        "empty generatorURL is no URL"
    );

    // Alertmanager retries the same webhook: nothing new on the bus.
    let again = http::post(&client, &url, Some(&tocsin.token), PAYLOAD).await;
    assert_eq!(again.status, 200, "{}", again.text);
    assert_eq!(again.json["stored"], 0);
    assert_eq!(again.json["duplicates"], 3);
    assert_eq!(bus::count_alerts(&js).await, 3);

    // The same group later, with the third alert firing again: a new
    // request, stored whole (the incidents service writes nothing for the
    // two alerts it already holds as they are).
    let refire = PAYLOAD
        .replacen(r#""status": "resolved""#, r#""status": "firing""#, 1)
        .replacen(
            r#""startsAt": "2025-01-15T09:40:00Z""#,
            r#""startsAt": "2025-01-15T10:05:00Z""#,
            1,
        );
    let a = http::post(&client, &url, Some(&tocsin.token), refire).await;
    assert_eq!(
        (a.status, a.json["stored"].as_u64()),
        (200, Some(3)),
        "{}",
        a.text
    );
    assert_eq!(bus::count_alerts(&js).await, 6);
    assert_eq!(bus::count(&js, STREAM_ALERTS).await, 2);

    tocsin.stop().await.unwrap();
}

/// A webhook of more alerts than one message holds: stored in order over
/// as few messages as fit, each alert once, and a retry stores nothing.
#[tokio::test]
async fn a_large_webhook_is_stored_in_a_few_messages_in_order() {
    let nats = NatsServer::start().await;
    let tocsin = TocsinHarness::start(&nats).await;
    let client = reqwest::Client::new();
    let url = format!("{}/api/v1/alerts/alertmanager", tocsin.ingest_url);
    let n = 2 * tocsin_ingest::publish::BATCH_ALERTS + 88;
    let alerts: Vec<serde_json::Value> = (0..n)
        .map(|i| {
            serde_json::json!({
                "status": "firing",
                "labels": {"alertname": "Many", "instance": format!("host-{i:04}")},
                "annotations": {"summary": "one of many"},
                "startsAt": "2025-01-15T10:00:00Z",
                "endsAt": "0001-01-01T00:00:00Z",
                "generatorURL": "",
                "fingerprint": format!("{i:016x}"),
            })
        })
        .collect();
    let body = serde_json::json!({
        "version": "4",
        "groupKey": "{}:{alertname=\"Many\"}",
        "truncatedAlerts": 0,
        "status": "firing",
        "receiver": "tocsin",
        "groupLabels": {"alertname": "Many"},
        "commonLabels": {"alertname": "Many"},
        "commonAnnotations": {},
        "externalURL": "http://alertmanager:9093",
        "alerts": alerts,
    })
    .to_string();

    let a = http::post(&client, &url, Some(&tocsin.token), body.clone()).await;
    assert_eq!(a.status, 200, "{}", a.text);
    assert_eq!(a.json["stored"], n);
    let js = async_nats::jetstream::new(nats.client().await);
    assert_eq!(bus::count(&js, STREAM_ALERTS).await, 3);
    let stored = bus::read_alerts(&js).await;
    let fingerprints: Vec<String> = stored
        .iter()
        .map(|m| m.envelope.body.fingerprint.to_string())
        .collect();
    let sent: Vec<String> = (0..n).map(|i| format!("{i:016x}")).collect();
    assert_eq!(
        fingerprints, sent,
        "every alert once, in the request's order"
    );

    let again = http::post(&client, &url, Some(&tocsin.token), body).await;
    assert_eq!(again.status, 200, "{}", again.text);
    assert_eq!(
        (
            again.json["stored"].as_u64(),
            again.json["duplicates"].as_u64()
        ),
        (Some(0), Some(n as u64))
    );
    assert_eq!(bus::count(&js, STREAM_ALERTS).await, 3);
    tocsin.stop().await.unwrap();
}

#[tokio::test]
async fn caller_trace_context_is_carried() {
    let nats = NatsServer::start().await;
    let tocsin = TocsinHarness::start(&nats).await;
    let tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    let resp = reqwest::Client::new()
        .post(format!("{}/api/v1/alerts", tocsin.ingest_url))
        .bearer_auth(&tocsin.token)
        .header("traceparent", tp)
        .body(r#"[{"labels":{"alertname":"Traced"}}]"#)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let js = async_nats::jetstream::new(nats.client().await);
    let stored = bus::read_alerts(&js).await;
    assert_eq!(
        stored[0]
            .headers
            .get(headers::TRACEPARENT)
            .map(|v| v.as_str()),
        Some(tp)
    );
    assert_eq!(stored[0].envelope.traceparent.as_deref(), Some(tp));
}
