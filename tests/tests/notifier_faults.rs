//! Provider failures: an outage opens the breaker and pages wait without
//! being lost; a 429 is retried after its Retry-After; a 400 is not retried
//! and lands on the timeline with the provider's words.

use std::time::Duration;

use tocsin_proto::{
    command::IncidentRef,
    incident::EventKind,
    notify::{Channel, DeliveryOutcome},
    AlertStatus,
};
use tocsin_tests::{
    fakes::{Failure, FakeProviders, Provider},
    incidents::{alert, get, publish_alert, wait_for},
    notifier::{self, page, publish_pages, Replica},
    NatsServer, TocsinHarness,
};

const WAIT: Duration = Duration::from_secs(20);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_opens_the_breaker_pages_wait_and_each_arrives_once() {
    let nats = NatsServer::start().await;
    let fakes = FakeProviders::start().await;
    let data = tempfile::tempdir().unwrap();
    // Twilio answers 500 five times, then recovers.
    fakes.fail_next(Provider::Twilio, 5, Failure::Status(500));
    let replica = Replica::start(&nats, notifier::config(&fakes, None, data.path())).await;
    let js = async_nats::jetstream::new(nats.client().await);
    let pages: Vec<_> = (1..=3).map(|n| page(n, Channel::Sms)).collect();
    publish_pages(&js, &pages).await;

    assert!(
        fakes.wait_for(|f| f.sms().len() == 3, WAIT).await,
        "SMS after recovery: {:?}",
        fakes.sms()
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let sms = fakes.sms();
    assert_eq!(sms.len(), 3, "each page once");
    let mut to: Vec<_> = sms.iter().map(|s| s.to.clone()).collect();
    to.sort();
    to.dedup();
    assert_eq!(to.len(), 3);
    // Five failures, then one request per page: the open breaker held the
    // pages back instead of hammering the provider.
    assert_eq!(fakes.requests(Provider::Twilio), 8);
    let rejected = fakes.rejected();
    assert_eq!(rejected.len(), 5);
    let fifth = rejected[4].at;
    let first_success = sms.iter().map(|s| s.at).min().unwrap();
    assert!(
        first_success.duration_since(fifth) >= Duration::from_millis(950),
        "the breaker (open for 1s) let a request through after {:?}",
        first_success.duration_since(fifth)
    );
    assert_eq!(replica.count("sms", "sent"), 3);
    let m = replica.metrics.encode();
    assert!(
        m.contains("tocsin_notifier_retries_total{channel=\"sms\"} 5"),
        "{m}"
    );
    assert!(
        m.contains("tocsin_notifier_breaker_state{channel=\"sms\"} 0"),
        "{m}"
    );
    replica.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_429_is_retried_after_its_retry_after() {
    let nats = NatsServer::start().await;
    let fakes = FakeProviders::start().await;
    let data = tempfile::tempdir().unwrap();
    fakes.fail_next(
        Provider::Slack,
        1,
        Failure::RateLimited {
            retry_after_secs: 1,
        },
    );
    let replica = Replica::start(&nats, notifier::config(&fakes, None, data.path())).await;
    let js = async_nats::jetstream::new(nats.client().await);
    publish_pages(&js, &[page(7, Channel::Slack)]).await;
    assert!(fakes.wait_for(|f| f.slack_posts().len() == 1, WAIT).await);
    let limited = fakes.rejected()[0].clone();
    assert_eq!(limited.status, 429);
    let waited = fakes.slack_posts()[0].at.duration_since(limited.at);
    // Retries otherwise start at 100 ms: Retry-After decided the wait.
    assert!(
        waited >= Duration::from_millis(990) && waited < Duration::from_secs(5),
        "retried after {waited:?}"
    );
    assert_eq!(fakes.requests(Provider::Slack), 2);
    replica.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_request_is_not_retried_and_the_timeline_says_why() {
    let nats = NatsServer::start().await;
    let fakes = FakeProviders::start().await;
    let data = tempfile::tempdir().unwrap();
    let mut config = TocsinHarness::config(&nats);
    // The `broken` service has a routing key PagerDuty does not know.
    config.escalation = serde_yaml_ng::from_str(
        "route: {policy: pd}\npolicies:\n  - name: pd\n    levels:\n      - targets: [{pagerduty_service: broken}]\n",
    )
    .unwrap();
    config.notifier = Some(notifier::config(&fakes, None, data.path()));
    let tocsin = TocsinHarness::start_with(config).await;
    let client = nats.client().await;
    let js = async_nats::jetstream::new(client.clone());
    let t0 = tocsin.clock_now();
    publish_alert(
        &js,
        alert(
            &[("alertname", "QueueStuck"), ("severity", "critical")],
            &["alertname"],
            AlertStatus::Firing,
            t0,
        ),
        t0,
    )
    .await;
    wait_for(&client, "the incident", |l| l.len() == 1).await;
    let deadline = tokio::time::Instant::now() + WAIT;
    let failure = loop {
        let detail = get(&client, IncidentRef::Number(1)).await;
        let found = detail.timeline.iter().find_map(|e| match &e.kind {
            EventKind::Delivery { delivery } => Some(delivery.clone()),
            _ => None,
        });
        if let Some(d) = found {
            break d;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no receipt on the timeline"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(failure.outcome, DeliveryOutcome::Failed);
    assert_eq!(failure.channel, Channel::Pagerduty);
    assert_eq!(failure.attempts, 1);
    assert!(failure.detail.contains("HTTP 400"), "{}", failure.detail);
    assert!(
        failure.detail.contains("Event object is invalid"),
        "{}",
        failure.detail
    );
    // No retry.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(fakes.requests(Provider::PagerDuty), 1);
    assert!(fakes.pagerduty_events().is_empty());
    let m = reqwest::get(format!("{}/metrics", tocsin.admin_url))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        m.contains("tocsin_notifications_total{channel=\"pagerduty\",outcome=\"failed\"} 1"),
        "{m}"
    );
    tocsin.stop().await.unwrap();
}
