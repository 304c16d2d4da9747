//! Shutdown during a burst: every request answered 2xx is on the bus.

use std::{collections::BTreeSet, sync::Arc, time::Duration};

use tocsin_tests::{bus, NatsServer, TocsinHarness};
use tokio::sync::Mutex;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_acknowledged_request_survives_a_shutdown_mid_burst() {
    let nats = NatsServer::start().await;
    let tocsin = TocsinHarness::start(&nats).await;
    let url = format!("{}/api/v1/alerts", tocsin.ingest_url);
    let acked: Arc<Mutex<BTreeSet<String>>> = Arc::default();

    let mut senders = Vec::new();
    for worker in 0..8 {
        let (url, token, acked) = (url.clone(), tocsin.token.clone(), acked.clone());
        senders.push(tokio::spawn(async move {
            let client = reqwest::Client::new();
            for n in 0.. {
                let id = format!("w{worker}-n{n}");
                let body = format!(
                    r#"[{{"labels":{{"alertname":"Burst","id":"{id}"}}}},{{"labels":{{"alertname":"Burst","id":"{id}-b"}}}}]"#
                );
                match client.post(&url).bearer_auth(&token).body(body).send().await {
                    Ok(r) if r.status().is_success() => {
                        acked.lock().await.insert(id);
                    }
                    // Refused or cut off by the shutdown: no promise was made.
                    _ => break,
                }
            }
        }));
    }
    // Let the burst run, then shut down while requests are in flight.
    while acked.lock().await.len() < 200 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    tocsin.stop().await.expect("clean shutdown");
    for s in senders {
        tokio::time::timeout(Duration::from_secs(10), s)
            .await
            .expect("senders stop once the listener is gone")
            .unwrap();
    }

    let js = async_nats::jetstream::new(nats.client().await);
    let on_bus: BTreeSet<String> = bus::read_alerts(&js)
        .await
        .into_iter()
        .map(|m| m.envelope.body.labels["id"].clone())
        .collect();
    let acked = acked.lock().await;
    assert!(acked.len() >= 200);
    for id in acked.iter() {
        assert!(
            on_bus.contains(id),
            "{id} was answered 2xx but is not on the bus"
        );
        assert!(
            on_bus.contains(&format!("{id}-b")),
            "{id}-b was answered 2xx but is not on the bus"
        );
    }
}
