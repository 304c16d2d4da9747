//! Bad input: auth, size and shape errors, each named, none reaching the bus.

use tocsin_tests::{bus, http, NatsServer, TocsinHarness};

const GOOD: &str = r#"{"version":"4","status":"firing","receiver":"r","groupLabels":{},"commonLabels":{},
  "commonAnnotations":{},"externalURL":"","groupKey":"{}:{}","truncatedAlerts":0,
  "alerts":[{"status":"firing","labels":{"alertname":"A"},"annotations":{},
  "startsAt":"2025-01-15T10:00:00Z","endsAt":"0001-01-01T00:00:00Z","generatorURL":"","fingerprint":""}]}"#;

#[tokio::test]
async fn every_bad_request_is_named_and_nothing_reaches_the_bus() {
    let nats = NatsServer::start().await;
    let mut config = TocsinHarness::config(&nats);
    config.ingest.as_mut().unwrap().max_body_bytes = 64 * 1024;
    let tocsin = TocsinHarness::start_with(config).await;
    let client = reqwest::Client::new();
    let am = format!("{}/api/v1/alerts/alertmanager", tocsin.ingest_url);
    let generic = format!("{}/api/v1/alerts", tocsin.ingest_url);
    let token = Some(tocsin.token.as_str());

    // Auth.
    for (t, fragment) in [
        (None, "missing bearer token"),
        (Some("wrong-token-0123456789abcdef"), "not valid"),
        (Some(""), "Bearer <token>"),
    ] {
        for url in [&am, &generic] {
            let a = http::post(&client, url, t, GOOD).await;
            assert_eq!(a.status, 401, "{t:?} {url}: {}", a.text);
            assert_eq!(a.json["error"], "unauthorized");
            assert!(
                a.json["reason"].as_str().unwrap().contains(fragment),
                "{}",
                a.text
            );
        }
    }
    let basic = client
        .post(&am)
        .basic_auth("u", Some("p"))
        .body(GOOD)
        .send()
        .await
        .unwrap();
    assert_eq!(basic.status(), 401);

    // Oversized bodies: declared, and streamed without a length.
    let big = format!(
        r#"{{"alerts":[{{"labels":{{"a":"{}"}}}}]}}"#,
        "x".repeat(70 * 1024)
    );
    let a = http::post(&client, &generic, token, big.clone()).await;
    assert_eq!(a.status, 413, "{}", a.text);
    assert!(a.json["reason"]
        .as_str()
        .unwrap()
        .contains("ingest.max_body_bytes"));
    let chunks: Vec<Result<String, std::io::Error>> = big
        .as_bytes()
        .chunks(8 * 1024)
        .map(|c| Ok(String::from_utf8_lossy(c).to_string()))
        .collect();
    let streamed = client
        .post(&generic)
        .bearer_auth(&tocsin.token)
        .body(reqwest::Body::wrap_stream(futures::stream::iter(chunks)))
        .send()
        .await
        .unwrap();
    assert_eq!(streamed.status(), 413);

    // Shape errors, each naming the problem.
    let cases: &[(&str, &str, &str)] = &[
        (&am, "{not json", "malformed JSON"),
        (&am, "", "request body is empty"),
        (&am, "[1,2]", "expected a JSON object"),
        (
            &am,
            r#"{"alerts":[{"status":"firing","labels":{"alertname":5},"startsAt":"2025-01-15T10:00:00Z"}]}"#,
            "alerts[0].labels.alertname: invalid type: integer `5`, expected a string",
        ),
        (
            &am,
            r#"{"alerts":[{"status":"firing","startsAt":"2025-01-15T10:00:00Z"}]}"#,
            "alerts[0]: missing field `labels`",
        ),
        (
            &am,
            r#"{"alerts":[{"status":"firing","labels":{},"startsAt":"2025-01-15T10:00:00Z"}]}"#,
            "alerts[0].labels: must contain at least one label",
        ),
        (
            &am,
            r#"{"alerts":[{"status":"firing","labels":{"a":"b"},"startsAt":"noon"}]}"#,
            "alerts[0].startsAt",
        ),
        (
            &am,
            r#"{"alerts":[{"status":"smouldering","labels":{"a":"b"},"startsAt":"2025-01-15T10:00:00Z"}]}"#,
            "alerts[0].status",
        ),
        (&am, r#"{"alerts":"none"}"#, "alerts: invalid type"),
        (
            &generic,
            r#"{"alerts":[{"labels":["a"]}]}"#,
            "alerts[0].labels: invalid type",
        ),
        (
            &generic,
            r#"{"alerts":[{"annotations":{}}]}"#,
            "missing field `labels`",
        ),
        (&generic, r#"42"#, "expected {\"alerts\""),
    ];
    for (url, body, fragment) in cases {
        let a = http::post(&client, url, token, body.to_string()).await;
        assert_eq!(a.status, 400, "{body}: {}", a.text);
        assert_eq!(a.json["error"], "invalid_payload");
        let reason = a.json["reason"].as_str().unwrap();
        assert!(
            reason.contains(fragment),
            "{body}: {reason} lacks {fragment}"
        );
    }

    // Bytes that are not UTF-8, even in a field ingest ignores, are not
    // JSON: a 400 naming where they are.
    for url in [&am, &generic] {
        let (head, tail) = GOOD
            .split_once(r#""receiver":"r""#)
            .expect("GOOD names its receiver");
        let body = [head.as_bytes(), b"\"receiver\":\"\xff\"", tail.as_bytes()].concat();
        let a = http::post(&client, url, token, body).await;
        assert_eq!(a.status, 400, "{url}: {}", a.text);
        let reason = a.json["reason"].as_str().unwrap();
        assert!(
            reason.contains("not UTF-8 (byte 0xff at line"),
            "{url}: {reason}"
        );
    }

    // Unknown endpoint: a JSON 404 listing the real ones.
    let a = http::post(
        &client,
        &format!("{}/api/v2/alerts", tocsin.ingest_url),
        token,
        "[]",
    )
    .await;
    assert_eq!(a.status, 404);
    assert!(a.json["reason"]
        .as_str()
        .unwrap()
        .contains("/api/v1/alerts/alertmanager"));

    // The service is still fine and nothing bad was stored.
    let js = async_nats::jetstream::new(nats.client().await);
    assert_eq!(bus::count_alerts(&js).await, 0);
    let a = http::post(&client, &am, token, GOOD).await;
    assert_eq!(a.status, 200, "{}", a.text);
    assert_eq!(bus::count_alerts(&js).await, 1);

    // Rejections are counted.
    let metrics = http::get(&client, &format!("{}/metrics", tocsin.admin_url))
        .await
        .text;
    assert!(
        metrics.contains(
            r#"tocsin_ingest_requests_total{endpoint="alertmanager",outcome="unauthorized"}"#
        ),
        "{metrics}"
    );
    assert!(
        metrics
            .contains(r#"tocsin_ingest_requests_total{endpoint="generic",outcome="too_large"} 2"#),
        "{metrics}"
    );
}

#[tokio::test]
async fn arbitrary_bytes_never_crash_the_service() {
    let nats = NatsServer::start().await;
    let tocsin = TocsinHarness::start(&nats).await;
    let client = reqwest::Client::new();
    // A deterministic pseudo-random byte soup, plus near-valid mutations of a good payload.
    let mut seed: u64 = 0x9e3779b97f4a7c15;
    let mut next = || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for i in 0..300 {
        let body: Vec<u8> = if i % 2 == 0 {
            (0..(next() % 512)).map(|_| next() as u8).collect()
        } else {
            let mut b = GOOD.as_bytes().to_vec();
            let n = b.len();
            for _ in 0..3 {
                b[(next() as usize) % n] = next() as u8;
            }
            b
        };
        for path in [
            "/api/v1/alerts/alertmanager",
            "/api/v1/alerts",
            "/v2/enqueue",
        ] {
            let resp = client
                .post(format!("{}{path}", tocsin.ingest_url))
                .bearer_auth(&tocsin.token)
                .body(body.clone())
                .send()
                .await
                .expect("the service answers");
            let s = resp.status().as_u16();
            assert!(s == 200 || s == 202 || s == 400, "{path} answered {s}");
        }
    }
    let ready = http::get(&client, &format!("{}/readyz", tocsin.admin_url)).await;
    assert_eq!(ready.status, 200);
}
