//! NATS down: ingest answers 503 with Retry-After and is not ready; NATS back:
//! the same request succeeds and nothing is duplicated.

use std::time::Duration;

use tocsin_tests::{bus, http, NatsServer, TocsinHarness};

const PAYLOAD: &str = include_str!("../fixtures/alertmanager_3_alerts.json");

#[tokio::test]
async fn nats_outage_gives_503_then_the_retry_succeeds_once() {
    let mut nats = NatsServer::start().await;
    let tocsin = TocsinHarness::start(&nats).await;
    let client = reqwest::Client::new();
    let url = format!("{}/api/v1/alerts/alertmanager", tocsin.ingest_url);
    let readyz = format!("{}/readyz", tocsin.admin_url);

    nats.stop();

    let a = http::post(&client, &url, Some(&tocsin.token), PAYLOAD).await;
    assert_eq!(a.status, 503, "{}", a.text);
    assert_eq!(
        a.headers.get("retry-after").map(|v| v.to_str().unwrap()),
        Some("1")
    );
    assert_eq!(a.json["error"], "unavailable");
    assert!(
        a.json["reason"].as_str().unwrap().contains("retry"),
        "{}",
        a.text
    );

    // Readiness follows the connection.
    let mut not_ready = None;
    for _ in 0..200 {
        let r = http::get(&client, &readyz).await;
        if r.status == 503 {
            not_ready = Some(r);
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let r = not_ready.expect("/readyz turned 503 while NATS was down");
    assert!(
        r.json["checks"]["nats"]
            .as_str()
            .unwrap()
            .contains("not connected"),
        "{}",
        r.text
    );
    assert_eq!(r.json["status"], "not ready");
    // Liveness does not: the process is fine.
    assert_eq!(
        http::get(&client, &format!("{}/livez", tocsin.admin_url))
            .await
            .status,
        200
    );

    nats.restart().await;
    tocsin.wait_ready(Duration::from_secs(20)).await;

    // Alertmanager retries the 5xx; now it is stored, exactly once.
    let a = http::post(&client, &url, Some(&tocsin.token), PAYLOAD).await;
    assert_eq!(a.status, 200, "{}", a.text);
    let js = async_nats::jetstream::new(nats.client().await);
    let stored = bus::read_alerts(&js).await;
    assert_eq!(stored.len(), 3, "three alerts, no duplicates");
    let a = http::post(&client, &url, Some(&tocsin.token), PAYLOAD).await;
    assert_eq!((a.status, a.json["duplicates"].as_u64()), (200, Some(3)));
    assert_eq!(bus::count_alerts(&js).await, 3);

    let metrics = http::get(&client, &format!("{}/metrics", tocsin.admin_url))
        .await
        .text;
    assert!(
        metrics.contains(
            r#"tocsin_ingest_requests_total{endpoint="alertmanager",outcome="unavailable"} 1"#
        ),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"tocsin_nats_events_total{event="disconnected"}"#),
        "{metrics}"
    );
}

#[tokio::test]
async fn ingest_starts_before_nats_and_becomes_ready_when_it_arrives() {
    let mut nats = NatsServer::start().await;
    let config = TocsinHarness::config(&nats);
    nats.stop();
    let starting = tokio::spawn(TocsinHarness::start_with(config));
    // A plausibility check, not the proof: that /readyz answers 503 while
    // NATS is away is asserted directly by the test above; this one is
    // about becoming ready once NATS arrives, below.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!starting.is_finished(), "cannot be ready without NATS");
    nats.restart().await;
    let tocsin = starting.await.expect("became ready once NATS was up");
    let a = http::post(
        &reqwest::Client::new(),
        &format!("{}/api/v1/alerts/alertmanager", tocsin.ingest_url),
        Some(&tocsin.token),
        PAYLOAD,
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.text);
}
