//! Provider failures: an outage opens the breaker and pages wait without
//! being lost; a 429 is retried after its Retry-After; a 400 is not retried
//! and lands on the timeline with the provider's words.

use std::time::Duration;

use tocsin_proto::{
    notify::{Channel, DeliveryOutcome},
    AlertStatus,
};
use tocsin_tests::{
    fakes::{Failure, FakeProviders, Provider},
    incidents::{alert, publish_alert, wait_for},
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
    let mut config = notifier::config(&fakes, None, data.path());
    // Retries alone never wait more than 0.36 s: a longer pause is the breaker.
    config.retry.max = tocsin_runtime::config::HumanDuration(Duration::from_millis(300));
    let replica = Replica::start(&nats, config).await;
    let js = async_nats::jetstream::new(nats.client().await);
    // One page fails five times in a row: the breaker opens.
    publish_pages(&js, &[page(1, Channel::Sms)]).await;
    let opened = "tocsin_notifier_breaker_opened_total{channel=\"sms\"} 1";
    let deadline = tokio::time::Instant::now() + WAIT;
    while !replica.metrics.encode().contains(opened) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the breaker never opened"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(fakes.rejected().len(), 5);
    // Pages arriving while it is open wait too.
    publish_pages(&js, &[page(2, Channel::Sms), page(3, Channel::Sms)]).await;

    assert!(
        fakes.wait_for(|f| f.sms().len() == 3, WAIT).await,
        "SMS after recovery: {:?}",
        fakes.sms()
    );
    notifier::settled(&js, WAIT).await;
    let sms = fakes.sms();
    assert_eq!(sms.len(), 3, "each page once");
    let mut to: Vec<_> = sms.iter().map(|s| s.to.clone()).collect();
    to.sort();
    to.dedup();
    assert_eq!(to.len(), 3);
    // Five failures, then one request per page: while open (1 s) the
    // breaker let nothing through, then a probe, then the rest.
    assert_eq!(fakes.requests(Provider::Twilio), 8);
    let fifth = fakes.rejected()[4].at;
    for s in &sms {
        let after = s.at.duration_since(fifth);
        assert!(
            after >= Duration::from_millis(950),
            "a page went out {after:?} after the breaker opened"
        );
    }
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
    let failure = notifier::wait_receipts(&client, 1, |d| !d.is_empty()).await[0].clone();
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
    tocsin.settled(&js).await;
    assert_eq!(fakes.requests(Provider::PagerDuty), 1);
    assert!(fakes.pagerduty_events().is_empty());
    let m = tocsin.metrics().await;
    assert!(
        m.contains("tocsin_notifications_total{channel=\"pagerduty\",outcome=\"failed\"} 1"),
        "{m}"
    );
    tocsin.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_that_never_recovers_is_given_up_on_and_a_slow_one_times_out() {
    let nats = NatsServer::start().await;
    let fakes = FakeProviders::start().await;
    let data = tempfile::tempdir().unwrap();
    let mut config = notifier::config(&fakes, None, data.path());
    config.retry.give_up_after = tocsin_runtime::config::HumanDuration(Duration::from_millis(600));
    if let Some(s) = config.slack.as_mut() {
        s.guard.timeout = tocsin_runtime::config::HumanDuration(Duration::from_millis(300));
    }
    // PagerDuty is down for good; Slack hangs once, past the timeout.
    fakes.fail_next(Provider::PagerDuty, 1000, Failure::Status(503));
    fakes.fail_next(Provider::Slack, 1, Failure::Hang(Duration::from_secs(2)));
    let replica = Replica::start(&nats, config).await;
    let js = async_nats::jetstream::new(nats.client().await);
    publish_pages(&js, &[page(1, Channel::Pagerduty), page(2, Channel::Slack)]).await;

    let deadline = tokio::time::Instant::now() + WAIT;
    while replica.count("pagerduty", "gave_up") == 0 || fakes.slack_posts().is_empty() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "gave up: {}, slack posts: {}",
            replica.count("pagerduty", "gave_up"),
            fakes.slack_posts().len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The timed-out request was retried and the page posted once.
    assert_eq!(fakes.slack_posts().len(), 1);
    assert_eq!(replica.count("slack", "sent"), 1);
    // The receipt for the given-up page is on the bus for the timeline. It
    // follows the outcome's count (receipts within 10 ms of each other go
    // in one message), so it is waited for.
    let gave_up = tocsin_tests::eventually("a gave_up receipt on COMMANDS", || async {
        let receipts = tocsin_tests::bus::read_commands(&js).await;
        receipts
            .iter()
            .find_map(|m| match &m.envelope.body.action {
                tocsin_proto::command::Action::Delivery { delivery, .. }
                    if delivery.outcome == DeliveryOutcome::GaveUp =>
                {
                    Some(delivery.clone())
                }
                _ => None,
            })
            .ok_or(receipts.len())
    })
    .await;
    assert!(gave_up.attempts >= 2, "{gave_up:?}");
    assert!(gave_up.detail.contains("HTTP 503"), "{}", gave_up.detail);
    replica.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_undecodable_page_is_dead_lettered_not_lost_and_the_rest_go_on() {
    let nats = NatsServer::start().await;
    let fakes = FakeProviders::start().await;
    let data = tempfile::tempdir().unwrap();
    let replica = Replica::start(&nats, notifier::config(&fakes, None, data.path())).await;
    let js = async_nats::jetstream::new(nats.client().await);
    js.publish("tocsin.notify.sms", "{\"not\":\"a page\"}".into())
        .await
        .unwrap()
        .await
        .unwrap();
    publish_pages(&js, &[page(5, Channel::Sms)]).await;
    assert!(fakes.wait_for(|f| f.sms().len() == 1, WAIT).await);
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let mut dlq = js
            .get_stream(tocsin_proto::subjects::STREAM_DEADLETTER)
            .await
            .unwrap();
        let state = dlq.info().await.unwrap().state.clone();
        if state.messages > 0 {
            let m = dlq.get_raw_message(state.first_sequence).await.unwrap();
            assert_eq!(&m.payload[..], b"{\"not\":\"a page\"}");
            let reason = m
                .headers
                .get(tocsin_proto::subjects::headers::DLQ_REASON)
                .map(|v| v.to_string())
                .unwrap_or_default();
            assert!(reason.contains("not a page"), "{reason}");
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "nothing dead-lettered"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(replica
        .metrics
        .encode()
        .contains("tocsin_notifier_dead_letters_total 1"));
    replica.stop().await;
}

/// A destination's request slots are held for the request only, not for
/// the records and the receipt after it: with one slot, a page whose
/// receipt cannot be stored yet (COMMANDS is gone) does not keep the next
/// page for the same destination from being sent. Once COMMANDS is back,
/// both receipts are stored, each once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receipt_that_cannot_be_stored_yet_does_not_hold_the_destinations_request_slot() {
    let nats = NatsServer::start().await;
    let fakes = FakeProviders::start().await;
    let data = tempfile::tempdir().unwrap();
    let mut config = notifier::config(&fakes, None, data.path());
    config.webhooks[0].guard.concurrency = Some(1);
    let replica = Replica::start(&nats, config).await;
    replica.wait_ready().await;
    let js = async_nats::jetstream::new(nats.client().await);
    let commands =
        tocsin_tests::bus::stream_config(&js, tocsin_proto::subjects::STREAM_COMMANDS).await;
    js.delete_stream(tocsin_proto::subjects::STREAM_COMMANDS)
        .await
        .unwrap();
    publish_pages(&js, &[page(1, Channel::Webhook), page(2, Channel::Webhook)]).await;
    assert!(
        fakes
            .wait_for(|f| f.counts(Provider::Webhook).accepted == 2, WAIT)
            .await,
        "both pages sent while the first one's receipt waits: {:?}",
        fakes.counts(Provider::Webhook)
    );
    js.create_stream(commands).await.unwrap();
    notifier::settled(&js, WAIT).await;
    let receipts = tocsin_tests::bus::read_commands(&js).await;
    let ids: std::collections::BTreeSet<&str> = receipts
        .iter()
        .map(|c| c.envelope.body.id.as_str())
        .collect();
    assert_eq!((receipts.len(), ids.len()), (2, 2), "{ids:?}");
    assert_eq!(fakes.counts(Provider::Webhook).accepted, 2);
    replica.stop().await;
}
