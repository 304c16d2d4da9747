//! Two notifier replicas on the same durable consumer share 1,000 pages:
//! each is delivered exactly once in total, and both did part of the work.

use std::{collections::BTreeMap, time::Duration};

use tocsin_proto::notify::Channel;
use tocsin_tests::{
    fakes::FakeProviders,
    notifier::{self, page, publish_pages, Replica},
    NatsServer,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_replicas_deliver_a_thousand_pages_exactly_once() {
    let nats = NatsServer::start().await;
    let fakes = FakeProviders::start().await;
    let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = Replica::start(&nats, notifier::config(&fakes, None, d1.path())).await;
    let b = Replica::start(&nats, notifier::config(&fakes, None, d2.path())).await;
    // Both pulling before the pages arrive, so both get a share.
    a.wait_ready().await;
    b.wait_ready().await;
    let js = async_nats::jetstream::new(nats.client().await);
    let channels = [
        Channel::Slack,
        Channel::Sms,
        Channel::Webhook,
        Channel::Pagerduty,
    ];
    let pages: Vec<_> = (1..=1000u64)
        .map(|n| page(n, channels[(n % 4) as usize]))
        .collect();
    publish_pages(&js, &pages).await;

    let done = |f: &FakeProviders| {
        f.slack_posts().len() + f.sms().len() + f.webhooks().len() + f.pagerduty_events().len()
            >= 1000
    };
    assert!(
        fakes.wait_for(done, Duration::from_secs(90)).await,
        "not all delivered: {} slack, {} sms, {} webhooks, {} pagerduty",
        fakes.slack_posts().len(),
        fakes.sms().len(),
        fakes.webhooks().len(),
        fakes.pagerduty_events().len()
    );
    // Settled: every page acknowledged, so no request is still to come.
    notifier::settled(&js, Duration::from_secs(30)).await;

    // Exactly once per page, counted by what identifies it at each provider.
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    for p in fakes.slack_posts() {
        *seen
            .entry(
                p.metadata["event_payload"]["delivery_id"]
                    .as_str()
                    .unwrap()
                    .to_string(),
            )
            .or_default() += 1;
    }
    for s in fakes.sms() {
        *seen.entry(format!("sms:{}", s.to)).or_default() += 1;
    }
    for w in fakes.webhooks() {
        *seen
            .entry(w.body["id"].as_str().unwrap().to_string())
            .or_default() += 1;
    }
    for e in fakes.pagerduty_events() {
        *seen
            .entry(format!("pd:{}", e["dedup_key"].as_str().unwrap()))
            .or_default() += 1;
    }
    assert_eq!(seen.len(), 1000, "distinct pages delivered");
    let twice: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "delivered more than once: {twice:?}");

    let per = |r: &Replica| -> u64 {
        ["slack", "sms", "webhook", "pagerduty"]
            .iter()
            .map(|c| r.count(c, "sent"))
            .sum()
    };
    let (na, nb) = (per(&a), per(&b));
    assert_eq!(na + nb, 1000, "replica a {na}, b {nb}");
    assert!(na > 0 && nb > 0, "both replicas worked: a {na}, b {nb}");
    a.stop().await;
    b.stop().await;
}
