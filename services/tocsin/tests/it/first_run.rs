//! A first run as a new user meets it, through a real `tocsin up`: no
//! warnings about streams it is creating itself, no colour codes in a log
//! file, and `tocsin_incidents_open` right after a restart.

use std::time::Duration;

use tocsin_tests::NatsServer;

use crate::support::{free_port, post_alerts, Proc};

/// The value of a sample in `/metrics` (`name` with its labels, if any).
async fn metric(admin: u16, name: &str) -> Option<f64> {
    let text = reqwest::get(format!("http://127.0.0.1:{admin}/metrics"))
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .and_then(|v| v.trim().parse().ok())
}

/// Polls `/metrics` until `name` reads `want` (up to 15 s); the last value seen.
async fn wait_metric(admin: u16, name: &str, want: f64) -> Option<f64> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let v = metric(admin, name).await;
        if v == Some(want) || tokio::time::Instant::now() > deadline {
            return v;
        }
        // Poll interval of a wait for something to happen (with a deadline), not a wait to prove that nothing did.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_start_is_quiet_and_the_open_count_survives_a_restart() {
    let nats = NatsServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let ingest = free_port();
    let config = dir.path().join("tocsin.yaml");
    std::fs::write(
        &config,
        format!(
            "nats:\n  url: {}\ningest:\n  listen: 127.0.0.1:{ingest}\n  tokens:\n    - source: first-run\n      token: ${{TOCSIN_INGEST_TOKEN}}\n\
             jetstream:\n  storage_check_interval: 100ms\n\
             incidents:\n  data_dir: {d}/incidents\nescalation:\n  data_dir: {d}/escalation\n",
            nats.url(),
            d = dir.path().display()
        ),
    )
    .unwrap();
    // A fresh NATS: the streams do not exist yet.
    let mut up = Proc::start(&config, dir.path(), &["up"]);
    up.ready().await;
    post_alerts(
        ingest,
        &serde_json::json!([
            {"labels": {"alertname": "DiskFull", "severity": "warning"}},
            {"labels": {"alertname": "NodeDown", "severity": "critical"}}
        ]),
    )
    .await;
    assert_eq!(
        wait_metric(up.admin, "tocsin_incidents_open", 2.0).await,
        Some(2.0),
        "{}",
        up.log_text()
    );
    // How far each service has handled each stream, beside the streams'
    // last sequences: the incidents service has handled every alert, and
    // escalation every INCIDENTS entry (the receipts included), once the
    // engine is quiet.
    for (stream, service) in [("ALERTS", "incidents"), ("INCIDENTS", "escalation")] {
        let last = format!("tocsin_stream_last_sequence{{stream=\"{stream}\"}}");
        let handled =
            format!("tocsin_handled_sequence{{service=\"{service}\",stream=\"{stream}\"}}");
        tocsin_tests::eventually_within(Duration::from_secs(15), || async {
            match (
                metric(up.admin, &last).await,
                metric(up.admin, &handled).await,
            ) {
                (Some(l), Some(h)) if l > 0.0 && l == h => Ok(()),
                other => Err(format!("{service} on {stream}: last, handled {other:?}")),
            }
        })
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", up.log_text()));
    }

    let log = up.log_text();
    assert!(
        !log.contains("stream not found"),
        "a first start warns about streams it creates itself:\n{log}"
    );
    assert!(
        !log.lines().any(|l| l.contains(" WARN ")),
        "warnings on a clean first start:\n{log}"
    );
    assert!(
        !log.contains('\x1b'),
        "colour codes written to a log file:\n{log}"
    );

    // After a restart the projection is loaded, nothing is replayed, and
    // the gauge reads the open incidents at once (not 0 until the next event).
    up.stop();
    let mut again = Proc::start(&config, dir.path(), &["up"]);
    again.ready().await;
    assert_eq!(
        wait_metric(again.admin, "tocsin_incidents_open", 2.0).await,
        Some(2.0),
        "{}",
        again.log_text()
    );
}
