//! Every channel through the real bus: an alert opens an incident,
//! escalation pages alice (SMS, email, Slack DM), #incidents, PagerDuty and
//! a webhook; the fakes check each request as the provider would, and the
//! test checks it field by field. Acknowledge, resolve and a note then
//! update what was sent: `chat.update` on the stored ts, PagerDuty
//! acknowledge/resolve with the same dedup key, a thread reply, an email
//! in the same thread.

use std::time::Duration;

use serde_json::Value;
use tocsin_proto::{
    command::{Action, IncidentRef},
    notify::{slack_actions, DeliveryOutcome, MessageKind, ProviderRef},
    AlertStatus,
};
use tocsin_tests::{
    fakes::{Failure, FakeProviders, Provider},
    incidents::{alert, command, publish_alert, wait_for},
    notifier::{self, ALL_CHANNELS},
    smtp::SmtpSink,
    NatsServer, TocsinHarness,
};

const WAIT: Duration = Duration::from_secs(20);

fn action_ids(attachment_blocks: &Value) -> Vec<String> {
    attachment_blocks
        .as_array()
        .unwrap()
        .iter()
        .filter(|b| b["type"] == "actions")
        .flat_map(|b| b["elements"].as_array().unwrap().clone())
        .map(|e| e["action_id"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_channel_gets_exactly_what_its_provider_expects_and_follows_the_incident() {
    let nats = NatsServer::start().await;
    let fakes = FakeProviders::start().await;
    let smtp = SmtpSink::start().await;
    let data = tempfile::tempdir().unwrap();
    let mut config = TocsinHarness::config(&nats);
    config.escalation = serde_yaml_ng::from_str(ALL_CHANNELS).unwrap();
    config.notifier = Some(notifier::config(&fakes, Some(&smtp), data.path()));
    let tocsin = TocsinHarness::start_with(config).await;
    let client = nats.client().await;
    let js = async_nats::jetstream::new(client.clone());
    let t0 = tocsin.clock_now();

    let labels = [
        ("alertname", "HighLatency"),
        ("service", "api"),
        ("instance", "api-1"),
        ("severity", "critical"),
    ];
    publish_alert(
        &js,
        alert(&labels, &["alertname", "service"], AlertStatus::Firing, t0),
        t0,
    )
    .await;
    let inc = wait_for(&client, "the incident", |l| l.len() == 1).await[0].clone();
    let id = inc.id.to_string();
    let url = "https://tocsin.example.com/incidents/1";

    assert!(
        fakes
            .wait_for(
                |f| f.slack_posts().len() == 2
                    && f.pagerduty_events().len() == 1
                    && f.sms().len() == 1
                    && f.webhooks().len() == 1,
                WAIT
            )
            .await,
        "pages did not all arrive: {:?}",
        fakes.rejected()
    );
    let mails = smtp.wait_for_count(1, WAIT).await;

    // --- Slack: a DM to alice (Slack answers with the DM channel) and #incidents.
    let posts = fakes.slack_posts();
    let dm = posts
        .iter()
        .find(|p| p.channel == "D01ALICE")
        .expect("DM to alice");
    let chan = posts
        .iter()
        .find(|p| p.channel == "C0INCIDENTS")
        .expect("post to #incidents");
    for p in [dm, chan] {
        assert!(p.text.contains("[CRITICAL] INC-1: "), "{}", p.text);
        let att = &p.body["attachments"][0];
        assert_eq!(att["color"], "#E01E5A");
        let blocks = &att["blocks"];
        let section = blocks[0]["text"]["text"].as_str().unwrap();
        assert!(
            section.contains(&format!("<{url}|Open incident INC-1>")),
            "{section}"
        );
        assert_eq!(
            action_ids(blocks),
            [
                slack_actions::ACK,
                slack_actions::RESOLVE,
                slack_actions::ESCALATE,
                slack_actions::SNOOZE
            ]
        );
        for b in blocks[1]["elements"].as_array().unwrap() {
            assert_eq!(b["value"], id.as_str(), "button value is the incident id");
        }
        assert_eq!(p.metadata["event_type"], "tocsin_page");
        assert!(p.metadata["event_payload"]["delivery_id"]
            .as_str()
            .unwrap()
            .starts_with("page:"));
    }

    // --- PagerDuty: a trigger keyed by the incident id.
    let ev = &fakes.pagerduty_events()[0];
    assert_eq!(ev["routing_key"], FakeProviders::PD_ROUTING_KEY);
    assert_eq!(ev["event_action"], "trigger");
    assert_eq!(ev["dedup_key"], id.as_str());
    assert_eq!(ev["payload"]["severity"], "critical");
    assert_eq!(ev["payload"]["source"], "api-1");
    assert_eq!(ev["payload"]["component"], "api");
    assert_eq!(ev["payload"]["class"], "HighLatency");
    assert!(ev["payload"]["summary"]
        .as_str()
        .unwrap()
        .starts_with("[CRITICAL] INC-1: "));
    assert_eq!(ev["payload"]["custom_details"]["labels"]["service"], "api");
    assert_eq!(ev["payload"]["custom_details"]["link"], url);
    assert_eq!(ev["links"][0]["href"], url);
    assert_eq!(ev["client"], "Tocsin");

    // --- SMS: one segment, with how to acknowledge.
    let sms = &fakes.sms()[0];
    assert_eq!(sms.to, "+14155550101");
    assert_eq!(sms.from.as_deref(), Some(FakeProviders::TWILIO_FROM));
    assert!(sms.body.chars().count() <= 160, "{}", sms.body);
    assert!(sms.body.starts_with("[CRITICAL] #1 "), "{}", sms.body);
    assert!(
        sms.body
            .ends_with(&format!("Reply ACK 1 to {}", FakeProviders::TWILIO_FROM)),
        "{}",
        sms.body
    );

    // --- Email: multipart text + HTML to alice, with the link.
    let mail = &mails[0];
    assert_eq!(mail.rcpt_tos, ["alice@example.com"]);
    assert_eq!(mail.mail_from, "tocsin@example.com");
    assert!(
        mail.subject.starts_with("[CRITICAL] INC-1: "),
        "{}",
        mail.subject
    );
    assert!(
        mail.content_type.starts_with("multipart/alternative"),
        "{}",
        mail.content_type
    );
    assert!(
        mail.text.contains(&format!("Open the incident: {url}")),
        "{}",
        mail.text
    );
    assert!(
        mail.html.contains(&format!("<a href=\"{url}\">")),
        "{}",
        mail.html
    );
    assert!(mail.text.contains("service=api"), "{}", mail.text);

    // --- Webhook: signed (the fake verified it), typed, with the incident.
    let hook = &fakes.webhooks()[0];
    assert_eq!(hook.name, "teams");
    assert!(hook.id.starts_with("msg_"));
    assert_eq!(hook.body["type"], "incident.page");
    assert_eq!(hook.body["incident"]["id"], id.as_str());
    assert_eq!(hook.body["page"]["target"], "webhook:teams");

    // --- Receipts: six deliveries on the timeline, each with its provider reference.
    let page_receipts = |d: &[tocsin_proto::notify::Delivery]| {
        d.iter()
            .filter(|d| d.kind == MessageKind::Page)
            .cloned()
            .collect::<Vec<_>>()
    };
    let timeline =
        page_receipts(&notifier::wait_receipts(&client, 1, |d| page_receipts(d).len() >= 6).await);
    let mut channels: Vec<&str> = timeline.iter().map(|d| d.channel.as_str()).collect();
    channels.sort();
    assert_eq!(
        channels,
        ["email", "pagerduty", "slack", "slack", "sms", "webhook"]
    );
    for d in &timeline {
        assert_eq!(d.outcome, DeliveryOutcome::Sent, "{d:?}");
        assert_eq!(d.attempts, 1);
    }
    assert!(timeline.iter().any(|d| matches!(
        &d.provider,
        Some(ProviderRef::SlackMessage { channel, ts }) if channel == "D01ALICE" && *ts == dm.ts
    )));

    // --- Acknowledge: the Slack messages turn yellow (chat.update on the
    // stored ts), PagerDuty's alert is acknowledged, the webhook hears it.
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
    assert!(
        fakes
            .wait_for(
                |f| f.slack_updates().len() == 2
                    && f.pagerduty_events().len() == 2
                    && f.webhooks().len() == 2,
                WAIT
            )
            .await,
        "ack updates: {:?}",
        fakes.rejected()
    );
    let updates = fakes.slack_updates();
    for p in [dm, chan] {
        let u = updates
            .iter()
            .find(|u| u.channel == p.channel && u.ts == p.ts)
            .unwrap_or_else(|| panic!("no chat.update of {} {}", p.channel, p.ts));
        assert_eq!(u.body["attachments"][0]["color"], "#ECB22E");
        assert!(u.text.contains("INC-1"), "{}", u.text);
        let section = u.body["attachments"][0]["blocks"][0]["text"]["text"]
            .as_str()
            .unwrap();
        assert!(section.contains("Acknowledged by bob"), "{section}");
        assert_eq!(
            action_ids(&u.body["attachments"][0]["blocks"]),
            [
                slack_actions::RESOLVE,
                slack_actions::ESCALATE,
                slack_actions::UNACK
            ]
        );
    }
    let ack = &fakes.pagerduty_events()[1];
    assert_eq!(ack["event_action"], "acknowledge");
    assert_eq!(ack["dedup_key"], id.as_str());
    assert_eq!(fakes.pagerduty_alerts()[0].status, "acknowledged");
    assert_eq!(fakes.webhooks()[1].body["type"], "incident.acknowledged");

    // --- A note: the reference status update, in the Slack threads and
    // the email thread.
    command(
        &client,
        &js,
        "bob",
        Action::Note {
            incident: IncidentRef::Number(1),
            text: "Impact: 15% of API requests failing\nActions: scaling the API service".into(),
        },
        t0,
    )
    .await;
    let mails = smtp.wait_for_count(2, WAIT).await;
    assert!(fakes.wait_for(|f| f.slack_posts().len() == 4, WAIT).await);
    let replies: Vec<_> = fakes
        .slack_posts()
        .into_iter()
        .filter(|p| p.body["thread_ts"].is_string())
        .collect();
    assert_eq!(replies.len(), 2);
    for r in &replies {
        let parent = [dm, chan]
            .into_iter()
            .find(|p| p.channel == r.channel)
            .unwrap();
        assert_eq!(r.body["thread_ts"], parent.ts.as_str());
        for line in [
            "*[CRITICAL] Incident: ",
            "ID: INC-1",
            "Started: ",
            "Impact: 15% of API requests failing",
            "Next Update: ",
            "Status Page: https://status.example.com",
        ] {
            assert!(r.text.contains(line), "{line:?} missing from {}", r.text);
        }
    }
    let update = &mails[1];
    // The page's subject, answered: mail clients thread it with the page.
    assert_eq!(update.subject, format!("Re: {}", mails[0].subject));
    assert!(
        update
            .raw
            .contains(&format!("In-Reply-To: {}", mails[0].message_id)),
        "{}",
        update.raw
    );
    assert!(update
        .text
        .contains("Status Page: https://status.example.com"));

    // --- Resolve: green, no buttons; PagerDuty resolved with the same key.
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
    assert!(
        fakes
            .wait_for(
                |f| f.slack_updates().len() == 4 && f.pagerduty_events().len() == 3,
                WAIT
            )
            .await
    );
    for u in &fakes.slack_updates()[2..] {
        assert_eq!(u.body["attachments"][0]["color"], "#2EB67D");
        assert!(u.text.contains("[RESOLVED] INC-1"), "{}", u.text);
        assert!(action_ids(&u.body["attachments"][0]["blocks"]).is_empty());
    }
    let res = &fakes.pagerduty_events()[2];
    assert_eq!(res["event_action"], "resolve");
    assert_eq!(res["dedup_key"], id.as_str());
    assert_eq!(fakes.pagerduty_alerts().len(), 1);
    assert_eq!(fakes.pagerduty_alerts()[0].status, "resolved");

    // A page that was still queued when the incident resolved (a backlog
    // after an outage) wakes nobody: it is skipped, and the timeline says so.
    let mut late = notifier::page(1, tocsin_proto::notify::Channel::Sms);
    late.incident = inc.clone();
    late.id = format!("{}-late", late.id);
    notifier::publish_pages(&js, &[late]).await;
    let skipped = notifier::wait_receipts(&client, 1, |d| {
        d.iter().any(|d| d.outcome == DeliveryOutcome::Skipped)
    })
    .await
    .into_iter()
    .find(|d| d.outcome == DeliveryOutcome::Skipped)
    .unwrap();
    assert!(
        skipped.detail.contains("resolved before this page"),
        "{}",
        skipped.detail
    );

    // Nothing was sent twice, and nothing failed.
    tocsin.settled(&js).await;
    assert_eq!(fakes.sms().len(), 1);
    assert_eq!(smtp.messages().len(), 2);
    assert!(fakes.rejected().is_empty(), "{:?}", fakes.rejected());
    assert_eq!(fakes.requests(Provider::PagerDuty), 3);

    // Metrics count the outcomes per channel.
    let m = tocsin.metrics().await;
    assert!(
        m.contains("tocsin_notifications_total{channel=\"sms\",outcome=\"sent\"} 1"),
        "{m}"
    );
    assert!(
        m.lines().any(
            |l| l.starts_with("tocsin_notification_latency_seconds_count{channel=\"slack\"} 2")
        ),
        "{m}"
    );
    tocsin.stop().await.unwrap();
}

/// An incident acknowledged while its page is on the way to Slack: the
/// change's own update finds the message not sent yet and leaves it, so
/// the notifier, once Slack answers, sees that the incident moved on in a
/// way the message shows and updates it (`chat.update` with the
/// acknowledgement). Receipts after a page (`paged`, `delivery`) move the
/// incident on too, but change nothing the message shows, and bring no
/// update.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn acknowledged_while_its_page_is_on_the_way_the_message_is_updated_once_sent() {
    let nats = NatsServer::start().await;
    let fakes = FakeProviders::start().await;
    let data = tempfile::tempdir().unwrap();
    let mut config = TocsinHarness::config(&nats);
    config.escalation = serde_yaml_ng::from_str(
        r##"
route: {policy: channel}
policies:
  - name: channel
    levels:
      - targets: [{slack_channel: C0INCIDENTS}]
        delay: 15m
"##,
    )
    .unwrap();
    config.notifier = Some(notifier::config(&fakes, None, data.path()));
    // Slack takes 2 s to answer the page.
    fakes.fail_next(Provider::Slack, 1, Failure::Slow(Duration::from_secs(2)));
    let tocsin = TocsinHarness::start_with(config).await;
    let client = nats.client().await;
    let js = async_nats::jetstream::new(client.clone());
    let t0 = tocsin.clock_now();
    let labels = [("alertname", "DiskFull"), ("severity", "critical")];
    publish_alert(
        &js,
        alert(&labels, &["alertname"], AlertStatus::Firing, t0),
        t0,
    )
    .await;
    wait_for(&client, "the incident", |l| l.len() == 1).await;
    // The page has reached Slack, which has not answered yet.
    assert!(
        fakes
            .wait_for(|f| f.started(Provider::Slack) >= 1, WAIT)
            .await,
        "the page never reached Slack"
    );
    assert!(fakes.slack_posts().is_empty(), "Slack answered too early");
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
    assert!(
        fakes.wait_for(|f| f.slack_updates().len() == 1, WAIT).await,
        "the message was never updated: posts {:?}, rejected {:?}",
        fakes.slack_posts().len(),
        fakes.rejected()
    );
    let post = &fakes.slack_posts()[0];
    let update = &fakes.slack_updates()[0];
    assert_eq!(update.ts, post.ts, "the page's message is the one updated");
    let section = update.body["attachments"][0]["blocks"][0]["text"]["text"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(section.contains("Acknowledged by bob"), "{section}");
}

/// A firing `Load1` alert of `instance`, as INCIDENTS entries carry it.
fn load_alert(instance: &str, starts_at: jiff::Timestamp) -> tocsin_proto::incident::AlertInfo {
    use tocsin_proto::{Fingerprint, Labels};
    let labels = Labels::from([
        ("alertname".to_string(), "Load1".to_string()),
        ("instance".to_string(), instance.to_string()),
    ]);
    tocsin_proto::incident::AlertInfo {
        fingerprint: Fingerprint::from_labels(&labels),
        status: AlertStatus::Firing,
        labels,
        annotations: Labels::new(),
        starts_at,
        ends_at: None,
        generator_url: None,
        suppressed: None,
    }
}

/// The alert list of a webhook page's body, each alert as its labels'
/// text.
fn alert_list(body: &Value) -> Vec<&str> {
    body["incident"]["alerts"]
        .as_array()
        .unwrap_or_else(|| panic!("no alert list in {body}"))
        .iter()
        .map(|a| a["labels_text"].as_str().unwrap_or(""))
        .collect()
}

/// A notifier replica alone on its NATS, with every provider at the fakes
/// (no incidents service, no escalation): the test writes INCIDENTS and
/// NOTIFY itself.
struct Alone {
    _nats: NatsServer,
    fakes: FakeProviders,
    _dir: tempfile::TempDir,
    replica: notifier::Replica,
    client: async_nats::Client,
    js: async_nats::jetstream::Context,
}

impl Alone {
    async fn start() -> Alone {
        let nats = NatsServer::start().await;
        let fakes = FakeProviders::start().await;
        let dir = tempfile::tempdir().unwrap();
        let replica =
            notifier::Replica::start(&nats, notifier::config(&fakes, None, dir.path())).await;
        replica.wait_ready().await;
        let client = nats.client().await;
        let js = async_nats::jetstream::new(client.clone());
        Alone {
            _nats: nats,
            fakes,
            _dir: dir,
            replica,
            client,
            js,
        }
    }
}

/// Stores `entry` on INCIDENTS alone, on its own subject with its own
/// message id, as the incidents service does.
async fn store_entry(
    js: &async_nats::jetstream::Context,
    entry: &tocsin_proto::incident::LogEntry,
) {
    use tocsin_proto::{codec, subjects::headers, Envelope};
    let mut h = async_nats::HeaderMap::new();
    h.insert(headers::MSG_ID, entry.msg_id().as_str());
    let bytes = codec::encode(&Envelope::new(
        "test",
        jiff::Timestamp::now(),
        entry.clone(),
    ))
    .unwrap();
    js.publish_with_headers(entry.subject(), h, bytes.into())
        .await
        .unwrap()
        .await
        .unwrap();
}

/// Incident `n` opened with alert `web-n` (its opening entry stored on
/// INCIDENTS, as the incidents service stores it) and paged on `channel`:
/// the page, as published to NOTIFY.
async fn open_and_page(
    js: &async_nats::jetstream::Context,
    n: u64,
    channel: tocsin_proto::notify::Channel,
) -> tocsin_proto::notify::Page {
    use tocsin_proto::incident::{Cause, EventKind, IncidentEvent, LogEntry};
    let page = notifier::page(n, channel);
    let entry = LogEntry::Incident(IncidentEvent {
        kind: EventKind::Opened {
            alert: load_alert(&format!("web-{n}"), page.incident.opened_at),
            more: Vec::new(),
        },
        at: page.incident.opened_at,
        actor: None,
        cause: Cause::Timer {
            id: format!("t{n}"),
        },
        incident: page.incident.clone(),
    });
    store_entry(js, &entry).await;
    notifier::publish_pages(js, std::slice::from_ref(&page)).await;
    page
}

/// Alert changes are stored with others in messages of several entries,
/// not on the incident's own subjects: an incident whose second alert
/// joined after its opening has the opening as its last own entry, and
/// the page (made by escalation, which read the change) carries the newer
/// copy (a higher revision). The page shows that copy, the second alert's
/// higher severity included, and lists both alerts, asked of the incidents
/// service (answered here by the test), not the opening's one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_shows_alert_changes_stored_after_the_incidents_last_own_entry() {
    use futures::StreamExt as _;
    use tocsin_proto::{
        codec,
        incident::{Cause, EventKind, IncidentEvent, LogEntry, Severity},
        notify::Channel,
        query::{IncidentDetail, QueryReply},
        subjects::{headers, query, INCIDENTS_BATCH},
        Envelope,
    };
    let alone = Alone::start().await;

    let mut page = notifier::page(1, Channel::Webhook);
    let alert = |instance: &str| load_alert(instance, page.incident.opened_at);
    let (first, second) = (alert("web-1"), alert("web-2"));
    let at = page.incident.opened_at;
    let mut opened = page.incident.clone();
    (opened.alerts_firing, opened.alerts_total) = (1, 1);
    opened.severity = Severity::Low;
    opened.revision = 1;
    let mut joined = opened.clone();
    (joined.alerts_firing, joined.alerts_total) = (2, 2);
    joined.severity = Severity::Critical;
    joined.revision = 2;
    let entry =
        |kind: EventKind, incident: &tocsin_proto::incident::IncidentSummary, cause: &str| {
            LogEntry::Incident(IncidentEvent {
                kind,
                at,
                actor: None,
                cause: Cause::Timer { id: cause.into() },
                incident: incident.clone(),
            })
        };
    let opening = entry(EventKind::opened(first.clone()), &opened, "t1");
    let change = entry(EventKind::alert_firing(second.clone()), &joined, "t2");
    assert!(change.is_packed(), "an alert change is stored with others");
    store_entry(&alone.js, &opening).await;
    let mut h = async_nats::HeaderMap::new();
    h.insert(headers::MSG_ID, "batch:test:1");
    h.insert(headers::ITEMS, "1");
    let bytes = codec::encode(&Envelope::new("test", at, vec![change])).unwrap();
    alone
        .js
        .publish_with_headers(INCIDENTS_BATCH, h, bytes.into())
        .await
        .unwrap()
        .await
        .unwrap();

    // The incidents service's answer: the incident as it stands.
    let mut asked = alone.client.subscribe(query::GET_INCIDENT).await.unwrap();
    let detail = IncidentDetail {
        incident: joined.clone(),
        alerts: vec![first.clone(), second.clone()],
        timeline: Vec::new(),
        alerts_omitted: 0,
        timeline_omitted: 0,
    };
    let answer = codec::encode(&QueryReply::Incident(Box::new(detail))).unwrap();
    let responder = tokio::spawn({
        let client = alone.client.clone();
        async move {
            while let Some(m) = asked.next().await {
                if let Some(reply) = m.reply {
                    let _ = client.publish(reply, answer.clone().into()).await;
                }
            }
        }
    });
    alone.client.flush().await.unwrap();

    page.incident = joined;
    notifier::publish_pages(&alone.js, std::slice::from_ref(&page)).await;
    assert!(
        alone
            .fakes
            .wait_for(|f| !f.webhooks().is_empty(), WAIT)
            .await,
        "no webhook call within {WAIT:?}"
    );
    let body = &alone.fakes.webhooks()[0].body;
    assert_eq!(
        body["incident"]["alerts_firing"], 2,
        "the page's newer copy of the incident: {body}"
    );
    assert_eq!(body["incident"]["severity"], "critical", "{body}");
    let shown = alert_list(body);
    assert_eq!(shown.len(), 2, "both alerts, not the opening's one: {body}");
    responder.abort();
    alone.replica.stop().await;
}

/// A page for an incident whose last INCIDENTS entry is its opening lists
/// the incident's alerts from that entry (ordered as the incidents
/// service's answer is, by fingerprint): the notifier asks the incidents
/// service only when later entries may have changed them, a round trip
/// less on the page path. No incidents service runs here, so a page that
/// asked would go without its alerts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_for_a_just_opened_incident_lists_its_alerts_without_asking_the_incidents_service() {
    use tocsin_proto::{
        incident::{Cause, EventKind, IncidentEvent, LogEntry},
        notify::Channel,
    };
    let alone = Alone::start().await;

    let page = notifier::page(1, Channel::Webhook);
    let alert = |instance: &str| load_alert(instance, page.incident.opened_at);
    let (first, second) = (alert("web-2"), alert("web-1"));
    let mut incident = page.incident.clone();
    (incident.alerts_firing, incident.alerts_total) = (2, 2);
    let entry = LogEntry::Incident(IncidentEvent {
        kind: EventKind::Opened {
            alert: first.clone(),
            more: vec![second.clone()],
        },
        at: incident.opened_at,
        actor: None,
        cause: Cause::Timer { id: "t1".into() },
        incident,
    });
    store_entry(&alone.js, &entry).await;

    notifier::publish_pages(&alone.js, std::slice::from_ref(&page)).await;
    assert!(
        alone
            .fakes
            .wait_for(|f| !f.webhooks().is_empty(), WAIT)
            .await,
        "no webhook call within {WAIT:?}"
    );
    let body = &alone.fakes.webhooks()[0].body;
    let shown = alert_list(body);
    let mut expected = [first, second];
    expected.sort_by(|a, b| a.fingerprint.cmp(&b.fingerprint));
    let expected: Vec<String> = expected
        .iter()
        .map(|a| format!("instance={}", a.labels["instance"]))
        .collect();
    assert_eq!(
        shown, expected,
        "the opening entry's alerts, by fingerprint: {body}"
    );
    alone.replica.stop().await;
}

/// After a page goes out, the notifier asks whether its incident moved on
/// meanwhile, to bring the message up to date; a message its provider
/// never changes (an SMS, an email, a webhook without `updates`) needs no
/// such question. Each page reads its incident's last entry once before
/// it is sent; a webhook page (`updates` on, the default) once more after,
/// an SMS page never. Counted as the direct gets on INCIDENTS naming each
/// incident's subjects, seen by a subscriber of their subject, once the
/// notifier has stopped (which waits for its follow-ups).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_no_provider_can_update_is_not_read_again_after_it_is_sent() {
    use futures::{FutureExt, StreamExt};
    use tocsin_proto::{notify::Channel, subjects::STREAM_INCIDENTS};
    tocsin_tests::init_logs();
    let alone = Alone::start().await;
    let mut gets = alone
        .client
        .subscribe(format!("$JS.API.DIRECT.GET.{STREAM_INCIDENTS}"))
        .await
        .unwrap();
    tocsin_runtime::nats::round_trip(&alone.js).await.unwrap();
    let mut incidents = Vec::new();
    for n in 1..=6u64 {
        let channel = if n % 2 == 0 {
            Channel::Webhook
        } else {
            Channel::Sms
        };
        let page = open_and_page(&alone.js, n, channel).await;
        incidents.push((page.incident.id, channel));
    }
    assert!(
        alone
            .fakes
            .wait_for(|f| f.sms().len() == 3 && f.webhooks().len() == 3, WAIT)
            .await,
        "three SMS and three webhook calls within {WAIT:?}"
    );
    alone.replica.stop().await;
    tocsin_runtime::nats::round_trip(&alone.js).await.unwrap();
    let mut asked: std::collections::HashMap<uuid::Uuid, usize> = Default::default();
    while let Some(Some(m)) = gets.next().now_or_never() {
        let request: serde_json::Value = serde_json::from_slice(&m.payload).unwrap();
        let subject = request["last_by_subj"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        for (id, _) in &incidents {
            if subject == tocsin_proto::subjects::incident_events_of(id) {
                *asked.entry(*id).or_default() += 1;
            }
        }
    }
    let reads: Vec<(Channel, usize)> = incidents
        .iter()
        .map(|(id, c)| (*c, asked.get(id).copied().unwrap_or(0)))
        .collect();
    let expected: Vec<(Channel, usize)> = incidents
        .iter()
        .map(|(_, c)| (*c, if *c == Channel::Webhook { 2 } else { 1 }))
        .collect();
    assert_eq!(
        reads, expected,
        "each incident's last entry read once before its page, and once after only where the provider updates its messages"
    );
}

/// INCIDENTS allows direct gets with one replica, and the notifier reads
/// an incident's last entry that way. If the stream stops allowing them
/// under a running notifier (an admin changed it, or it now has more
/// replicas), the direct get finds nobody to answer: the notifier goes on
/// with `STREAM.MSG.GET`, so the next page still shows its incident as
/// stored, with the opening's alerts, instead of only what the page
/// carries (no alerts at all).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_that_stops_allowing_direct_gets_is_read_the_leaders_way() {
    use tocsin_proto::{notify::Channel, subjects::STREAM_INCIDENTS};
    tocsin_tests::init_logs();
    let alone = Alone::start().await;
    // Incident n opens with alert web-n and pages the webhook: the page
    // lists that alert, which only the stored opening names.
    let paged = async |n: u64| {
        open_and_page(&alone.js, n, Channel::Webhook).await;
        let calls = n as usize;
        assert!(
            alone
                .fakes
                .wait_for(|f| f.webhooks().len() == calls, WAIT)
                .await,
            "no webhook call for incident {n} within {WAIT:?}"
        );
        let body = &alone.fakes.webhooks()[calls - 1].body;
        let list = alert_list(body).join(", ");
        assert!(list.contains(&format!("instance=web-{n}")), "{body}");
    };

    // The first page reads the stream's settings: direct gets allowed.
    let mut config = tocsin_tests::bus::stream_config(&alone.js, STREAM_INCIDENTS).await;
    assert!(config.allow_direct, "INCIDENTS allows direct gets");
    paged(1).await;

    config.allow_direct = false;
    alone.js.update_stream(&config).await.unwrap();
    paged(2).await;
    alone.replica.stop().await;
}
