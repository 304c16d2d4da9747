//! The bounds that need their own configuration to be seen: the in-flight
//! byte budget, the body deadline, the request head size, NATS's
//! max_payload, and a full ALERTS stream. Each answer says which bound and
//! whether a retry can help (503 + Retry-After) or not (4xx).

use std::time::Duration;

use serde_json::json;
use tocsin_proto::subjects::STREAM_ALERTS;
use tocsin_runtime::config::HumanDuration;
use tocsin_tests::{bus, http, NatsServer, TocsinHarness};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

const ONE: &str = r#"[{"labels":{"alertname":"Small"}}]"#;

/// Opens a connection that sends a request head announcing `length` body
/// bytes and then only a few of them.
async fn stalled_body(addr: &str, length: usize) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    let head = format!(
        "POST /api/v1/alerts HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\n\
         Content-Type: application/json\r\nContent-Length: {length}\r\n\r\n[",
        tocsin_tests::TEST_TOKEN
    );
    s.write_all(head.as_bytes()).await.expect("write head");
    s
}

/// Reads an HTTP/1.1 answer until the server closes or the JSON body ends.
async fn read_answer(s: &mut TcpStream) -> String {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
        }
        let text = String::from_utf8_lossy(&out);
        if let Some((_, body)) = text.split_once("\r\n\r\n") {
            if body.ends_with('}') {
                break;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test]
async fn the_in_flight_byte_budget_answers_503_and_frees_up() {
    let nats = NatsServer::start().await;
    let mut config = TocsinHarness::config(&nats);
    {
        let ingest = config.ingest.as_mut().unwrap();
        ingest.max_body_bytes = 1 << 20;
        ingest.max_inflight_bytes = 2 << 20;
    }
    let tocsin = TocsinHarness::start_with(config).await;
    let addr = tocsin.ingest_url.trim_start_matches("http://").to_string();
    let url = format!("{}/api/v1/alerts", tocsin.ingest_url);
    let client = reqwest::Client::new();

    // Two requests announcing 1 MiB each and sending almost nothing hold
    // the whole budget until their bodies arrive (or time out).
    let held = [
        stalled_body(&addr, 1 << 20).await,
        stalled_body(&addr, 1 << 20).await,
    ];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let busy = loop {
        let a = http::post(&client, &url, Some(&tocsin.token), ONE).await;
        if a.status == 503 {
            break a;
        }
        assert_eq!(a.status, 200, "{}", a.text);
        assert!(
            tokio::time::Instant::now() < deadline,
            "the budget never filled"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(busy.json["error"], "overloaded", "{}", busy.text);
    assert!(
        busy.json["reason"]
            .as_str()
            .unwrap()
            .contains("ingest.max_inflight_bytes"),
        "{}",
        busy.text
    );
    assert_eq!(
        busy.headers.get("retry-after").map(|v| v.to_str().unwrap()),
        Some("1")
    );

    // The senders give up: the budget is free again.
    drop(held);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let a = http::post(&client, &url, Some(&tocsin.token), ONE).await;
        if a.status == 200 {
            break;
        }
        assert_eq!(a.status, 503, "{}", a.text);
        assert!(
            tokio::time::Instant::now() < deadline,
            "the budget was not given back"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_body_that_does_not_arrive_in_time_gets_408_and_a_huge_head_431() {
    let nats = NatsServer::start().await;
    let mut config = TocsinHarness::config(&nats);
    {
        let ingest = config.ingest.as_mut().unwrap();
        ingest.body_read_timeout = HumanDuration(Duration::from_secs(1));
    }
    let tocsin = TocsinHarness::start_with(config).await;
    let addr = tocsin.ingest_url.trim_start_matches("http://").to_string();

    let mut s = stalled_body(&addr, 100).await;
    let answer = read_answer(&mut s).await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("ingest.body_read_timeout"), "{answer}");

    let mut s = TcpStream::connect(&addr).await.unwrap();
    let head = format!(
        "POST /api/v1/alerts HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "b".repeat(32 * 1024)
    );
    // The server may answer and close before it has read all of it.
    let _ = s.write_all(head.as_bytes()).await;
    let answer = read_answer(&mut s).await;
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer}");
}

#[tokio::test]
async fn an_alert_over_the_servers_max_payload_is_413_and_a_full_stream_is_503() {
    let nats = NatsServer::start().await;
    let mut config = TocsinHarness::config(&nats);
    {
        // Limits raised past what NATS carries (1 MiB by default), so the
        // max_payload check is what refuses the alert.
        let ingest = config.ingest.as_mut().unwrap();
        ingest.max_body_bytes = 3 << 20;
        ingest.max_inflight_bytes = 8 << 20;
        ingest.limits.annotation_value_bytes = 4 << 20;
        ingest.limits.alert_bytes = 4 << 20;
    }
    let tocsin = TocsinHarness::start_with(config).await;
    let client = reqwest::Client::new();
    let url = format!("{}/api/v1/alerts", tocsin.ingest_url);
    let body = json!([
        {"labels": {"alertname": "Fine"}},
        {"labels": {"alertname": "Big"}, "annotations": {"description": "d".repeat(1_500_000)}}
    ])
    .to_string();
    let a = http::post(&client, &url, Some(&tocsin.token), body).await;
    assert_eq!(a.status, 413, "{}", a.text);
    assert!(a.headers.get("retry-after").is_none());
    let reason = a.json["reason"].as_str().unwrap();
    assert!(
        reason.starts_with("alerts[1]: ") && reason.contains("max_payload is 1048576"),
        "{reason}"
    );
    let js = async_nats::jetstream::new(nats.client().await);
    assert_eq!(
        bus::count_alerts(&js).await,
        0,
        "nothing of the request was stored"
    );

    // A full stream is something a retry can fix: 503 + Retry-After, with
    // the reason named.
    let a = http::post(&client, &url, Some(&tocsin.token), ONE).await;
    assert_eq!(a.status, 200, "{}", a.text);
    let mut stream = js.get_stream(STREAM_ALERTS).await.unwrap();
    let mut cfg = stream.info().await.unwrap().config.clone();
    cfg.max_messages = 1;
    cfg.discard = async_nats::jetstream::stream::DiscardPolicy::New;
    js.update_stream(cfg).await.expect("stream updated");
    let a = http::post(
        &client,
        &url,
        Some(&tocsin.token),
        r#"[{"labels":{"alertname":"Another"}}]"#,
    )
    .await;
    assert_eq!(a.status, 503, "{}", a.text);
    assert_eq!(
        a.headers.get("retry-after").map(|v| v.to_str().unwrap()),
        Some("1")
    );
    let reason = a.json["reason"].as_str().unwrap();
    assert!(
        reason.contains("maximum messages") && reason.contains("stream is full"),
        "{reason}"
    );
}
