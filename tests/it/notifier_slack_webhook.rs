//! Slack through an incoming webhook: the page is posted (no buttons: a
//! webhook message cannot be updated or clicked through to Tocsin), and
//! acknowledge and resolve follow as new messages to the same webhook.

use std::time::Duration;

use tocsin_proto::{
    command::{Action, IncidentRef},
    AlertStatus,
};
use tocsin_tests::{
    fakes::FakeProviders,
    incidents::{alert, command, publish_alert, wait_for},
    notifier, NatsServer, TocsinHarness,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_mode_posts_the_page_then_each_change() {
    let nats = NatsServer::start().await;
    let fakes = FakeProviders::start().await;
    let data = tempfile::tempdir().unwrap();
    let mut cfg = notifier::config(&fakes, None, data.path());
    cfg.slack = Some(
        serde_yaml_ng::from_str(&format!("webhook_url: {}\n", fakes.slack_webhook_url())).unwrap(),
    );
    let mut config = TocsinHarness::config(&nats);
    config.escalation = serde_yaml_ng::from_str(
        "route: {policy: p}\npolicies:\n  - name: p\n    levels:\n      - targets: [{slack_channel: \"#ops\"}]\n",
    )
    .unwrap();
    config.notifier = Some(cfg);
    let tocsin = TocsinHarness::start_with(config).await;
    let client = nats.client().await;
    let js = async_nats::jetstream::new(client.clone());
    let t0 = tocsin.clock_now();
    publish_alert(
        &js,
        alert(
            &[("alertname", "DiskFull"), ("severity", "warning")],
            &["alertname"],
            AlertStatus::Firing,
            t0,
        ),
        t0,
    )
    .await;
    wait_for(&client, "the incident", |l| l.len() == 1).await;
    // Waits until Slack's webhook has `n` posts.
    let posted = |n: usize| {
        let fakes = &fakes;
        async move {
            assert!(
                fakes
                    .wait_for(
                        |f| f.slack_webhook_posts().len() == n,
                        Duration::from_secs(20)
                    )
                    .await,
                "{:?}",
                fakes.slack_webhook_posts()
            );
        }
    };
    posted(1).await;
    let page = &fakes.slack_webhook_posts()[0];
    assert!(
        page["text"].as_str().unwrap().contains("[MEDIUM] INC-1"),
        "{page}"
    );
    let att = &page["attachments"][0];
    assert_eq!(att["color"], "#F2952F");
    assert!(att["blocks"]
        .as_array()
        .unwrap()
        .iter()
        .all(|b| b["type"] != "actions"));

    command(
        &client,
        &js,
        "bob",
        Action::Ack {
            incident: IncidentRef::Number(1),
        },
        t0,
    )
    .await;
    // Each change is posted once the notifier brings the messages to the
    // incident's state then: a resolve before the acknowledgement's post
    // would show only the resolve (the state the incident is in).
    posted(2).await;
    command(
        &client,
        &js,
        "bob",
        Action::Resolve {
            incident: IncidentRef::Number(1),
        },
        t0,
    )
    .await;
    posted(3).await;
    let posts = fakes.slack_webhook_posts();
    assert_eq!(posts[1]["attachments"][0]["color"], "#ECB22E");
    assert!(posts[2]["text"]
        .as_str()
        .unwrap()
        .contains("[RESOLVED] INC-1"));
    assert_eq!(posts[2]["attachments"][0]["color"], "#2EB67D");
    tocsin.settled(&js).await;
    assert_eq!(fakes.slack_webhook_posts().len(), 3);
    assert!(
        fakes.slack_posts().is_empty(),
        "no Web API calls in webhook mode"
    );
    tocsin.stop().await.unwrap();
}
