//! JetStream storage: every stream has its room; a full one is refused
//! loudly (503, `/readyz`, metrics) instead of starving the others, and
//! everything accepted is processed once room returns.

use std::time::Duration;

use async_nats::jetstream::{self, stream::DiscardPolicy};
use jiff::Timestamp;
use serde_json::Value;
use tocsin_proto::{
    subjects::{STREAMS, STREAM_ALERTS, STREAM_DEADLETTER, STREAM_INCIDENTS},
    AlertStatus,
};
use tocsin_runtime::streams::{ensure_streams, JetStreamConfig};
use tocsin_tests::{
    bus, http,
    incidents::{alert, publish_alert, wait_for},
    NatsServer, TocsinHarness,
};

/// Sets `max_bytes` of `stream` as an operator would (`nats stream edit`).
async fn set_max_bytes(js: &jetstream::Context, stream: &str, max_bytes: i64) {
    let mut s = js.get_stream(stream).await.unwrap();
    let mut cfg = s.info().await.unwrap().config.clone();
    cfg.max_bytes = max_bytes;
    js.update_stream(cfg).await.unwrap();
}

async fn held_bytes(js: &jetstream::Context, stream: &str) -> u64 {
    let mut s = js.get_stream(stream).await.unwrap();
    s.info().await.unwrap().state.bytes
}

/// Polls `/readyz` until `done(status, checks)` holds.
async fn wait_readyz(tocsin: &TocsinHarness, what: &str, done: impl Fn(u16, &Value) -> bool) {
    let client = reqwest::Client::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let a = http::get(&client, &format!("{}/readyz", tocsin.admin_url)).await;
        if done(a.status, &a.json["checks"]) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for /readyz: {what}; last answer: {} {}",
            a.status,
            a.text
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn check<'a>(checks: &'a Value, name: &str) -> &'a str {
    checks[name].as_str().unwrap_or("")
}

#[tokio::test]
async fn a_full_alerts_stream_gets_503_from_ingest_is_reported_and_recovers() {
    let nats = NatsServer::start().await;
    let tocsin = TocsinHarness::start(&nats).await;
    let client = nats.client().await;
    let js = jetstream::new(client.clone());
    let http_client = reqwest::Client::new();
    let url = format!("{}/api/v1/alerts", tocsin.ingest_url);

    // ALERTS with 64 KiB of room; every alert carries ~1 KB.
    set_max_bytes(&js, STREAM_ALERTS, 64 * 1024).await;
    let post = |i: usize| {
        let body = serde_json::json!([{
            "labels": {"alertname": format!("Fill{i}"), "severity": "warning"},
            "annotations": {"description": "d".repeat(1000)},
        }])
        .to_string();
        let (c, u, t) = (http_client.clone(), url.clone(), tocsin.token.clone());
        async move { http::post(&c, &u, Some(&t), body).await }
    };
    let mut accepted = 0;
    let refused = loop {
        assert!(accepted < 500, "ALERTS never refused an alert");
        let a = post(accepted).await;
        match a.status {
            200 => accepted += 1,
            503 => break a,
            other => panic!("unexpected {other}: {}", a.text),
        }
    };
    assert!(accepted > 10, "only {accepted} alerts fitted in 64 KiB");
    assert!(refused.headers.contains_key("retry-after"), "{refused:?}");
    assert!(
        refused.text.contains("maximum bytes exceeded"),
        "{}",
        refused.text
    );
    // Refused again, never a 2xx, while it is full.
    assert_eq!(post(accepted).await.status, 503);

    // Every process says which stream is full and why.
    wait_readyz(&tocsin, "ALERTS reported full", |status, checks| {
        status == 503 && check(checks, "storage").contains("ALERTS is full")
    })
    .await;
    let m = tocsin.metrics().await;
    assert!(
        m.contains(r#"tocsin_stream_full{stream="ALERTS"} 1"#),
        "{m}"
    );
    assert!(
        m.contains(r#"tocsin_stream_full{stream="INCIDENTS"} 0"#),
        "{m}"
    );

    // The record streams kept their room: every accepted alert became an
    // incident while ALERTS was full.
    wait_for(&client, "every accepted alert's incident", |all| {
        all.len() == accepted
    })
    .await;

    // Room returns: ready again, and new alerts are taken and processed.
    set_max_bytes(&js, STREAM_ALERTS, 16 * 1024 * 1024).await;
    wait_readyz(&tocsin, "ready again", |status, checks| {
        status == 200 && check(checks, "storage") == "ok"
    })
    .await;
    let a = post(accepted).await;
    assert_eq!(a.status, 200, "{}", a.text);
    wait_for(&client, "the alert after room returned", |all| {
        all.len() == accepted + 1
    })
    .await;
    assert!(tocsin
        .metrics()
        .await
        .contains(r#"tocsin_stream_full{stream="ALERTS"} 0"#));
}

#[tokio::test]
async fn a_full_incidents_stream_stalls_incidents_visibly_and_loses_nothing() {
    let nats = NatsServer::start().await;
    let mut config = TocsinHarness::config(&nats);
    config.incidents = serde_yaml_ng::from_str("stalled_after: 300ms").unwrap();
    let tocsin = TocsinHarness::start_with(config).await;
    let client = nats.client().await;
    let js = jetstream::new(client.clone());
    let now = Timestamp::now();
    let fire = |name: &str| {
        alert(
            &[("alertname", name)],
            &["alertname"],
            AlertStatus::Firing,
            now,
        )
    };
    publish_alert(&js, fire("First"), now).await;
    wait_for(&client, "the first incident", |all| all.len() == 1).await;

    // INCIDENTS has no room left: the next entries are refused.
    let held = held_bytes(&js, STREAM_INCIDENTS).await;
    set_max_bytes(&js, STREAM_INCIDENTS, held as i64).await;
    for name in ["Second", "Third"] {
        publish_alert(&js, fire(name), now).await;
    }
    wait_readyz(
        &tocsin,
        "incidents stalled on a full INCIDENTS",
        |status, checks| {
            status == 503
                && check(checks, "incidents").starts_with("cannot make progress: ")
                && check(checks, "incidents").contains("maximum bytes exceeded")
                && check(checks, "storage").contains("INCIDENTS is full")
        },
    )
    .await;

    // A full stream is not a poison input: nothing is dead-lettered, and
    // once room returns every alert becomes an incident.
    set_max_bytes(&js, STREAM_INCIDENTS, 64 * 1024 * 1024).await;
    wait_for(&client, "all three incidents", |all| all.len() == 3).await;
    wait_readyz(&tocsin, "ready again", |status, _| status == 200).await;
    assert_eq!(bus::count(&js, STREAM_DEADLETTER).await, 0);
}

#[tokio::test]
async fn ensure_gives_existing_streams_their_room_without_deleting_anything() {
    let nats = NatsServer::start().await;
    let js = jetstream::new(nats.client().await);

    // Streams as an older Tocsin made them: no max_bytes, discard old; and
    // ALERTS already holding more than the new limit.
    let unlimited = JetStreamConfig::default();
    for def in STREAMS.iter() {
        let mut c = unlimited.stream_config(def);
        c.max_bytes = -1;
        c.discard = DiscardPolicy::Old;
        js.create_stream(c).await.unwrap();
    }
    for i in 0..3 {
        js.publish(
            format!("tocsin.alerts.generic.{i:016x}"),
            vec![b'a'; 600_000].into(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    }

    let config: JetStreamConfig = serde_yaml_ng::from_str(
        "alerts_max_bytes: 1048576\nincidents_max_bytes: 8388608\ndead_letter_max_bytes: 2097152\n",
    )
    .unwrap();
    ensure_streams(&js, &config).await.unwrap();
    let info = |name: &'static str| {
        let js = js.clone();
        async move {
            js.get_stream(name)
                .await
                .unwrap()
                .info()
                .await
                .unwrap()
                .clone()
        }
    };
    let incidents = info(STREAM_INCIDENTS).await;
    assert_eq!(incidents.config.max_bytes, 8 * 1024 * 1024);
    assert_eq!(incidents.config.discard, DiscardPolicy::New);
    let dlq = info(STREAM_DEADLETTER).await;
    assert_eq!(dlq.config.max_bytes, 2 * 1024 * 1024);
    assert_eq!(
        dlq.config.discard,
        DiscardPolicy::Old,
        "dead letters make room by dropping the oldest"
    );
    // ALERTS holds 1.8 MB > 1 MiB: its limit stays, nothing is deleted,
    // but it refuses new messages when full from now on.
    let alerts = info(STREAM_ALERTS).await;
    assert_eq!(alerts.state.messages, 3);
    assert_eq!(alerts.config.max_bytes, -1);
    assert_eq!(alerts.config.discard, DiscardPolicy::New);

    // A budget NATS cannot reserve is refused with what to do.
    let too_big: JetStreamConfig =
        serde_yaml_ng::from_str("incidents_max_bytes: 1125899906842624\n").unwrap();
    let err = ensure_streams(&js, &too_big).await.unwrap_err().to_string();
    assert!(err.contains("INCIDENTS"), "{err}");
    assert!(err.contains("max_file_store"), "{err}");
}
