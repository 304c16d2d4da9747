//! Many large webhooks at once: more alerts in flight than async-nats lets
//! one client await (5,000), and every request still answered 200.

use std::sync::Arc;

use tocsin_tests::{bus, NatsServer, TocsinHarness};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_large_webhooks_do_not_starve_each_other() {
    let nats = NatsServer::start().await;
    let mut config = TocsinHarness::config(&nats);
    // Generous, so a failure here means starvation, not a slow disk.
    config.ingest.as_mut().unwrap().publish_timeout =
        tocsin_runtime::config::HumanDuration(std::time::Duration::from_secs(120));
    let tocsin = TocsinHarness::start_with(config).await;
    let url = Arc::new(format!("{}/api/v1/alerts", tocsin.ingest_url));
    let (requests, per_request) = (24, 1000);
    let mut tasks = Vec::new();
    for r in 0..requests {
        let (url, token) = (url.clone(), tocsin.token.clone());
        tasks.push(tokio::spawn(async move {
            let alerts: Vec<String> = (0..per_request)
                .map(|n| format!(r#"{{"labels":{{"alertname":"Flood","req":"{r}","n":"{n}"}}}}"#))
                .collect();
            let body = format!("[{}]", alerts.join(","));
            let resp = reqwest::Client::new()
                .post(url.as_str())
                .bearer_auth(token)
                .body(body)
                .send()
                .await
                .unwrap();
            (resp.status().as_u16(), resp.text().await.unwrap())
        }));
    }
    for t in tasks {
        let (status, body) = t.await.unwrap();
        assert_eq!(status, 200, "{body}");
    }
    let js = async_nats::jetstream::new(nats.client().await);
    assert_eq!(
        bus::count_alerts(&js).await,
        (requests * per_request) as u64
    );
}

/// A burst of single-alert webhooks (Alertmanager sends one per group):
/// requests that arrive while ingest's message is waiting for JetStream
/// share the next message (a pack), each request answered 200 once its
/// pack is stored, each alert stored once with its own request's trace
/// context, and each opens its incident as if it had come alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_small_webhooks_shares_messages_and_each_alert_opens_its_incident() {
    use tocsin_proto::{
        incident::{EventKind, LogEntry},
        subjects::{is_alert_pack, STREAM_ALERTS},
    };
    let nats = NatsServer::start().await;
    let tocsin = TocsinHarness::start(&nats).await;
    let url = Arc::new(format!("{}/api/v1/alerts", tocsin.ingest_url));
    let requests = 200;
    // Every request waits here until all are ready, so they arrive at once.
    let ready = Arc::new(tokio::sync::Barrier::new(requests));
    let client = reqwest::Client::new();
    let mut tasks = Vec::new();
    for r in 0..requests {
        let (url, token, ready, client) = (
            url.clone(),
            tocsin.token.clone(),
            ready.clone(),
            client.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let body = format!(r#"[{{"labels":{{"alertname":"Burst","group":"g{r}"}}}}]"#);
            let traceparent = format!("00-{:032x}-{:016x}-01", r + 1, r + 1);
            ready.wait().await;
            let resp = client
                .post(url.as_str())
                .bearer_auth(token)
                .header("traceparent", &traceparent)
                .body(body)
                .send()
                .await
                .unwrap();
            let status = resp.status().as_u16();
            let json: serde_json::Value = resp.json().await.unwrap();
            (status, json, traceparent)
        }));
    }
    let mut sent = std::collections::HashMap::new();
    for (r, t) in tasks.into_iter().enumerate() {
        let (status, json, traceparent) = t.await.unwrap();
        assert_eq!(status, 200, "{json}");
        assert_eq!(json["stored"], 1, "{json}");
        sent.insert(format!("g{r}"), traceparent);
    }

    let js = async_nats::jetstream::new(nats.client().await);
    let stored = bus::read_alerts(&js).await;
    assert_eq!(stored.len(), requests, "every alert stored once");
    for s in &stored {
        let group = &s.envelope.body.labels["group"];
        let traceparent = sent.remove(group).expect("each group once");
        assert_eq!(
            s.envelope.traceparent.as_deref(),
            Some(traceparent.as_str()),
            "each alert keeps its own request's trace context"
        );
    }
    assert!(sent.is_empty(), "alerts never stored: {sent:?}");
    let messages = bus::stored_raw(&js, STREAM_ALERTS).await;
    let packs = messages
        .iter()
        .filter(|(_, m)| is_alert_pack(&m.subject))
        .count();
    assert!(
        packs > 0 && messages.len() < requests,
        "{requests} requests arriving at once took {} messages, {packs} of them packs",
        messages.len()
    );

    // The incidents service reads a pack's alerts as their requests': one
    // incident opened per group, each at its request's receive time.
    tocsin.settled(&js).await;
    let entries = bus::read_entries(&js).await;
    let opened: std::collections::HashSet<uuid::Uuid> = entries
        .iter()
        .filter_map(|e| match &e.envelope.body {
            LogEntry::Incident(i) if matches!(i.kind, EventKind::Opened { .. }) => {
                Some(i.incident.id)
            }
            _ => None,
        })
        .collect();
    assert_eq!(opened.len(), requests, "one incident per group");
}
