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
