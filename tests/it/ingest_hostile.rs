//! Hostile and careless input found by attacking a running Tocsin: oversized
//! labels, huge batches, bodies that can never be stored, lax parsing, and
//! the small things senders trip over. Each is answered with a 4xx naming
//! the field (or 2xx where the input is valid HTTP), and what follows it is
//! still stored.

use serde_json::{json, Value};
use tocsin_proto::AlertStatus;
use tocsin_tests::{bus, http, NatsServer, TocsinHarness};

fn generic_alert(labels: Value) -> Value {
    json!({"labels": labels, "annotations": {"summary": "s"}})
}

fn am_payload(alert: Value) -> String {
    json!({"version": "4", "status": "firing", "receiver": "r", "groupLabels": {},
           "commonLabels": {}, "commonAnnotations": {}, "externalURL": "", "groupKey": "{}:{}",
           "truncatedAlerts": 0, "alerts": [alert]})
    .to_string()
}

fn am_alert(labels: Value, starts_at: &str) -> Value {
    json!({"status": "firing", "labels": labels, "annotations": {}, "startsAt": starts_at,
           "endsAt": "0001-01-01T00:00:00Z", "generatorURL": "", "fingerprint": ""})
}

fn reason(a: &http::Answer) -> String {
    a.json["reason"].as_str().unwrap_or_default().to_string()
}

/// Defect 1: a 600 KB label was stored (200) and later made an incident log
/// entry over NATS's 1 MiB limit. It is refused with the field and the limit
/// named, and a normal batch after it is stored.
#[tokio::test]
async fn an_oversized_label_is_refused_and_the_next_batch_is_stored() {
    let nats = NatsServer::start().await;
    let tocsin = TocsinHarness::start(&nats).await;
    let client = reqwest::Client::new();
    let generic = format!("{}/api/v1/alerts", tocsin.ingest_url);
    let token = Some(tocsin.token.as_str());

    let mut alerts: Vec<Value> = (0..3)
        .map(|n| generic_alert(json!({"alertname": "Fine", "n": n.to_string()})))
        .collect();
    alerts.push(generic_alert(
        json!({"alertname": "Huge", "instance": "x".repeat(600_000)}),
    ));
    let a = http::post(&client, &generic, token, json!(alerts).to_string()).await;
    assert_eq!(a.status, 400, "{}", a.text);
    assert_eq!(a.json["error"], "invalid_payload");
    assert_eq!(
        reason(&a),
        "alerts[3].labels.instance: 600000 bytes, the limit is 4096 (ingest.limits.label_value_bytes)"
    );

    // Every other bound names its field and its key.
    let many_labels: serde_json::Map<String, Value> =
        (0..65).map(|n| (format!("l{n}"), json!("v"))).collect();
    let many_annotations: serde_json::Map<String, Value> =
        (0..65).map(|n| (format!("a{n}"), json!("v"))).collect();
    for (alert, expected) in [
        (
            json!({"labels": many_labels}),
            "alerts[0].labels: 65 labels, the limit is 64 (ingest.limits.labels_per_alert)",
        ),
        (
            json!({"labels": {"alertname": "A"}, "annotations": many_annotations}),
            "alerts[0].annotations: 65 annotations, the limit is 64 (ingest.limits.annotations_per_alert)",
        ),
        (
            json!({"labels": {"alertname": "A"}, "annotations": {"description": "d".repeat(20_000)}}),
            "alerts[0].annotations.description: 20000 bytes, the limit is 16384 (ingest.limits.annotation_value_bytes)",
        ),
        (
            json!({"labels": {"alertname": "A", "n".repeat(300): "v"}}),
            "bytes, the limit is 256 (ingest.limits.label_name_bytes)",
        ),
    ] {
        let a = http::post(&client, &generic, token, json!([alert]).to_string()).await;
        assert_eq!(a.status, 400, "{}", a.text);
        assert!(reason(&a).contains(expected), "{} lacks {expected}", a.text);
    }

    // The same bound on the Alertmanager receiver.
    let am = format!("{}/api/v1/alerts/alertmanager", tocsin.ingest_url);
    let body = am_payload(am_alert(
        json!({"alertname": "Huge", "instance": "x".repeat(600_000)}),
        "2025-01-15T10:00:00Z",
    ));
    let a = http::post(&client, &am, token, body).await;
    assert_eq!(a.status, 400, "{}", a.text);
    assert!(
        reason(&a).contains("alerts[0].labels.instance: 600000 bytes"),
        "{}",
        a.text
    );

    let js = async_nats::jetstream::new(nats.client().await);
    assert_eq!(bus::count_alerts(&js).await, 0, "nothing was stored");

    let batch: Vec<Value> = (0..100)
        .map(|n| generic_alert(json!({"alertname": "Normal", "n": n.to_string()})))
        .collect();
    let a = http::post(&client, &generic, token, json!(batch).to_string()).await;
    assert_eq!(a.status, 200, "{}", a.text);
    assert_eq!(a.json["stored"], 100);
    assert_eq!(bus::count_alerts(&js).await, 100);
}

/// Defect 3: eight concurrent ~945 KB requests of 45,000 alerts each pushed
/// RSS to 456 MB and still ended in 503. Each is refused with 413 naming
/// the per-request limit before its alerts are built.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huge_batches_are_refused_without_blowing_up_memory() {
    if !tocsin_tests::in_own_process(&format!(
        "{}::huge_batches_are_refused_without_blowing_up_memory",
        module_path!()
    )) {
        return;
    }
    let nats = NatsServer::start().await;
    let tocsin = TocsinHarness::start(&nats).await;
    let url = format!("{}/api/v1/alerts", tocsin.ingest_url);
    let body: String = {
        let alerts: Vec<String> = (0..45_000)
            .map(|_| r#"{"labels":{"a":"x"}}"#.to_string())
            .collect();
        format!("[{}]", alerts.join(","))
    };
    assert!(body.len() < 1 << 20, "under max_body_bytes: {}", body.len());
    let before = tocsin_tests::rss_bytes();
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let (url, token, body) = (url.clone(), tocsin.token.clone(), body.clone());
        tasks.push(tokio::spawn(async move {
            let a = http::post(&reqwest::Client::new(), &url, Some(&token), body).await;
            (a.status, a.text, a.json)
        }));
    }
    for t in tasks {
        let (status, text, json) = t.await.unwrap();
        assert_eq!(status, 413, "{text}");
        let reason = json["reason"].as_str().unwrap_or_default();
        assert!(
            reason.contains("45000 alerts") && reason.contains("ingest.limits.alerts_per_request"),
            "{text}"
        );
    }
    let grown = tocsin_tests::rss_bytes().saturating_sub(before);
    println!(
        "RSS before {} MiB, grown by {} MiB",
        before >> 20,
        grown >> 20
    );
    // Eight bodies of 0.9 MiB are 7 MiB; 45,000 parsed alerts each were ~50 MiB.
    assert!(
        grown < 100 << 20,
        "RSS grew by {} MiB for eight refused requests",
        grown >> 20
    );
    let js = async_nats::jetstream::new(nats.client().await);
    assert_eq!(bus::count_alerts(&js).await, 0);
}

/// Defect 4: a body just under max_body_bytes whose alert is larger than
/// NATS can carry got 503 + Retry-After, so Alertmanager retried it forever.
/// What can never be stored is a 4xx.
#[tokio::test]
async fn an_alert_that_can_never_be_stored_is_a_4xx_not_a_503() {
    let nats = NatsServer::start().await;
    let tocsin = TocsinHarness::start(&nats).await;
    let client = reqwest::Client::new();
    let url = format!("{}/api/v1/alerts", tocsin.ingest_url);
    let body = json!([{"labels": {"alertname": "Big"},
                       "annotations": {"description": "d".repeat(1_000_000)}}])
    .to_string();
    assert!(body.len() < 1 << 20);
    let a = http::post(&client, &url, Some(&tocsin.token), body).await;
    assert!(
        a.status == 400 || a.status == 413,
        "answered {}: {}",
        a.status,
        a.text
    );
    assert!(a.headers.get("retry-after").is_none());
    assert!(
        reason(&a).contains("alerts[0].annotations.description"),
        "{}",
        a.text
    );
}

/// Defect 5: lax parsing. Trailing garbage, bad label names and values, a
/// non-ASCII timestamp (which panicked the handler), an out-of-range
/// timestamp, and an upper-case auth scheme.
#[tokio::test]
async fn parsing_is_strict_and_never_panics() {
    let nats = NatsServer::start().await;
    let tocsin = TocsinHarness::start(&nats).await;
    let client = reqwest::Client::new();
    let token = Some(tocsin.token.as_str());
    let am = format!("{}/api/v1/alerts/alertmanager", tocsin.ingest_url);
    let generic = format!("{}/api/v1/alerts", tocsin.ingest_url);
    let pd = format!("{}/v2/enqueue", tocsin.ingest_url);

    // Trailing garbage after a valid document, on all three receivers.
    let good_am = am_payload(am_alert(json!({"alertname": "A"}), "2025-01-15T10:00:00Z"));
    let good_generic = json!([generic_alert(json!({"alertname": "A"}))]).to_string();
    let good_pd = json!({"routing_key": tocsin.token, "event_action": "trigger",
                         "payload": {"summary": "s", "source": "x", "severity": "info"}})
    .to_string();
    for (url, good) in [(&am, &good_am), (&generic, &good_generic), (&pd, &good_pd)] {
        let a = http::post(&client, url, token, format!("{good}}}}}garbage")).await;
        assert_eq!(a.status, 400, "{url}: {}", a.text);
        assert!(a.text.contains("trailing characters"), "{url}: {}", a.text);
    }

    // Label names and values.
    for (labels, fragment) in [
        (
            json!({"alertname": "A", "bad-name": "v"}),
            r#"alerts[0].labels."bad-name": not a valid label name"#,
        ),
        (
            json!({"alertname": "A", "x\r\nInjected": "v"}),
            "not a valid label name",
        ),
        (
            json!({"alertname": "A", "9lives": "v"}),
            "not a valid label name",
        ),
        (
            json!({"alertname": "A", "instance": "db1\r\nX-Injected: 1"}),
            "alerts[0].labels.instance: the value contains the control character U+000D",
        ),
    ] {
        let a = http::post(
            &client,
            &generic,
            token,
            json!([generic_alert(labels.clone())]).to_string(),
        )
        .await;
        assert_eq!(a.status, 400, "{labels}: {}", a.text);
        assert!(reason(&a).contains(fragment), "{labels}: {}", a.text);
    }

    // A non-ASCII timestamp panicked the handler (the connection dropped).
    for starts_at in ["€abcd", "2025-01-15T10:00:00€0000", "ü"] {
        let body = am_payload(am_alert(json!({"alertname": "A"}), starts_at));
        let a = http::post(&client, &am, token, body).await;
        assert_eq!(a.status, 400, "{starts_at}: {}", a.text);
        assert!(reason(&a).contains("alerts[0].startsAt"), "{}", a.text);
    }
    // Valid RFC 3339, but outside what Tocsin stores: say so, with the range.
    let body = am_payload(am_alert(json!({"alertname": "A"}), "9999-12-31T00:00:00Z"));
    let a = http::post(&client, &am, token, body).await;
    assert_eq!(a.status, 400, "{}", a.text);
    let r = reason(&a);
    assert!(
        r.contains("alerts[0].startsAt") && r.contains("out of range") && r.contains("0001-01-01"),
        "{r}"
    );
    assert!(!r.contains("not an RFC 3339"), "{r}");

    // Any case of the Bearer scheme is valid HTTP.
    for scheme in ["BEARER", "bearer", "Bearer", "bEaReR"] {
        let a = client
            .post(&generic)
            .header("authorization", format!("{scheme} {}", tocsin.token))
            .body(good_generic.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(a.status(), 200, "{scheme}");
    }

    let ready = http::get(&client, &format!("{}/readyz", tocsin.admin_url)).await;
    assert_eq!(ready.status, 200);
}

/// Defect 7: small things users hit.
#[tokio::test]
async fn dedup_key_spellings_405_json_and_pagerduty_change_events() {
    let nats = NatsServer::start().await;
    let tocsin = TocsinHarness::start(&nats).await;
    let client = reqwest::Client::new();
    let token = Some(tocsin.token.as_str());
    let generic = format!("{}/api/v1/alerts", tocsin.ingest_url);
    let js = async_nats::jetstream::new(nats.client().await);

    // The README documents `dedup_key`; `dedupKey` is accepted too.
    for (field, key) in [("dedup_key", "snake-key"), ("dedupKey", "camel-key")] {
        let body = json!([{"labels": {"alertname": key}, field: key}]).to_string();
        let a = http::post(&client, &generic, token, body).await;
        assert_eq!(a.status, 200, "{field}: {}", a.text);
    }
    let stored = bus::read_alerts(&js).await;
    let keys: Vec<Option<String>> = stored
        .iter()
        .map(|m| m.envelope.body.dedup_key.clone())
        .collect();
    assert_eq!(
        keys,
        [Some("snake-key".to_string()), Some("camel-key".to_string())]
    );

    // A wrong method gets a JSON body like every other error.
    let a = http::get(&client, &generic).await;
    assert_eq!(a.status, 405, "{}", a.text);
    assert_eq!(a.json["error"], "method_not_allowed", "{}", a.text);
    assert!(reason(&a).contains("POST"), "{}", a.text);
    assert_eq!(
        a.headers.get("allow").map(|v| v.to_str().unwrap()),
        Some("POST")
    );

    // PagerDuty change events (Grafana, CI tools): 202, stored as an info
    // alert that ends by itself.
    let change = json!({
        "routing_key": tocsin.token,
        "payload": {"summary": "Deployed api v1.42", "timestamp": "2025-01-15T10:00:00Z",
                    "source": "ci.example.com", "custom_details": {"build": 4711}},
        "links": [{"href": "https://ci.example.com/builds/4711", "text": "build 4711"}]
    });
    let url = format!("{}/v2/change/enqueue", tocsin.ingest_url);
    let a = http::post(&client, &url, None, change.to_string()).await;
    assert_eq!(a.status, 202, "{}", a.text);
    assert_eq!(a.json["status"], "success", "{}", a.text);
    let stored = bus::read_alerts(&js).await;
    assert_eq!(stored.len(), 3);
    let c = &stored[2].envelope.body;
    assert_eq!(c.status, AlertStatus::Firing);
    assert_eq!(c.labels["severity"], "info");
    assert_eq!(c.labels["source"], "ci.example.com");
    assert_eq!(c.annotations["summary"], "Deployed api v1.42");
    assert!(c.annotations["custom_details"].contains("4711"));
    assert!(c.annotations["links"].contains("https://ci.example.com/builds/4711"));
    assert_eq!(c.starts_at.to_string(), "2025-01-15T10:00:00Z");
    let ends = c.ends_at.expect("a change event ends by itself");
    assert!(ends > c.starts_at);
    // A retried change event is stored once.
    let a = http::post(&client, &url, None, change.to_string()).await;
    assert_eq!(a.status, 202, "{}", a.text);
    assert_eq!(bus::count_alerts(&js).await, 3);
    // A change event without a summary is refused in PagerDuty's shape.
    let a = http::post(
        &client,
        &url,
        None,
        json!({"routing_key": tocsin.token, "payload": {"source": "x"}}).to_string(),
    )
    .await;
    assert_eq!(a.status, 400, "{}", a.text);
    assert!(
        a.text.contains("'payload.summary' is missing"),
        "{}",
        a.text
    );
}

/// The sizing documented for `ingest.max_inflight_bytes`: with the budget
/// full of the largest accepted requests (1 MiB, 1,000 alerts of ~1 KiB),
/// ingest's memory grows by about 4 x the budget (5 x allowed for noise).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_in_flight_budget_stays_within_the_documented_memory() {
    // Measures this process's RSS: alone, so no other test's memory counts.
    if !tocsin_tests::in_own_process(&format!(
        "{}::a_full_in_flight_budget_stays_within_the_documented_memory",
        module_path!()
    )) {
        return;
    }
    const BUDGET: usize = 16 << 20;
    let nats = NatsServer::start().await;
    let mut config = TocsinHarness::config(&nats);
    {
        let ingest = config.ingest.as_mut().unwrap();
        ingest.max_inflight_bytes = BUDGET;
        ingest.publish_timeout =
            tocsin_runtime::config::HumanDuration(std::time::Duration::from_secs(30));
    }
    let tocsin = TocsinHarness::start_with(config).await;
    let url = format!("{}/api/v1/alerts", tocsin.ingest_url);
    // Built before the baseline: the client's copies are not ingest's.
    let bodies: Vec<bytes::Bytes> = (0..BUDGET >> 20)
        .map(|r| {
            let alerts: Vec<Value> = (0..1000)
                .map(|n| {
                    json!({"labels": {"alertname": "Sizing", "req": r.to_string(), "n": n.to_string(),
                                      "instance": format!("host-{n:05}.example.com:9100"),
                                      "job": "node", "severity": "warning"},
                           "annotations": {"summary": "x".repeat(700)}})
                })
                .collect();
            let body = json!(alerts).to_string();
            assert!(body.len() <= 1 << 20, "{}", body.len());
            bytes::Bytes::from(body)
        })
        .collect();
    let before = tocsin_tests::rss_bytes();
    let peak = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(before));
    let sampler = {
        let peak = peak.clone();
        tokio::spawn(async move {
            loop {
                peak.fetch_max(
                    tocsin_tests::rss_bytes(),
                    std::sync::atomic::Ordering::Relaxed,
                );
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
        })
    };
    let mut tasks = Vec::new();
    for body in bodies {
        let (url, token) = (url.clone(), tocsin.token.clone());
        tasks.push(tokio::spawn(async move {
            let client = reqwest::Client::new();
            // A 503 (budget full at that instant) is retried, as senders do.
            loop {
                let a = http::post(&client, &url, Some(&token), body.clone()).await;
                if a.status != 503 {
                    return (a.status, a.text);
                }
            }
        }));
    }
    for t in tasks {
        let (status, text) = t.await.unwrap();
        assert_eq!(status, 200, "{text}");
    }
    sampler.abort();
    let grown = peak
        .load(std::sync::atomic::Ordering::Relaxed)
        .saturating_sub(before);
    println!(
        "in-flight budget {} MiB: RSS before {} MiB, peak growth {} MiB ({:.1} x the budget)",
        BUDGET >> 20,
        before >> 20,
        grown >> 20,
        grown as f64 / BUDGET as f64
    );
    assert!(
        grown < 5 * BUDGET as u64,
        "RSS grew by {} MiB, over 5 x the {} MiB budget",
        grown >> 20,
        BUDGET >> 20
    );
}
