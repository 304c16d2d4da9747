//! NATS is not open to anyone: the test kit's nats-server runs with the
//! shipped users and permissions (`deploy/nats/permissions.conf`), so these
//! tests check the permission set Tocsin ships. Each refusal is shown by
//! the server's own answer (a `Permissions Violation` error on the
//! connection), never by waiting for something not to happen; the stream
//! is then checked as the admin, after the server has dropped the message.

use std::time::Duration;

use async_nats::{jetstream, Client, Event};
use tocsin::{config::OperatorConfig, ops};
use tocsin_proto::{
    command::{Action, CommandReply, IncidentRef},
    incident::IncidentStatus,
    notify::Channel,
    subjects::{query, STREAM_ALERTS, STREAM_INCIDENTS, STREAM_NOTIFY},
    AlertStatus,
};
use tocsin_runtime::{
    admin::Metrics,
    nats::{connect_as, Credential, NatsConfig},
    streams::{ensure_streams, JetStreamConfig},
};
use tocsin_tests::{
    bus,
    escalation::REFERENCE,
    http,
    incidents::{alert, command, publish_alert, wait_for},
    notifier, NatsServer, TocsinHarness,
};
use tokio::sync::mpsc;

const PAYLOAD: &str = include_str!("../fixtures/alertmanager_3_alerts.json");

/// How long the server may take to answer.
const WAIT: Duration = Duration::from_secs(10);

/// A client connected as `identity` whose server errors arrive on the
/// returned channel.
async fn watched(nats: &NatsServer, identity: &str) -> (Client, mpsc::UnboundedReceiver<String>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let client = async_nats::ConnectOptions::with_user_and_password(
        identity.to_string(),
        nats.password(identity).to_string(),
    )
    .custom_inbox_prefix(tocsin_runtime::nats::inbox_prefix(identity))
    .event_callback(move |event| {
        let tx = tx.clone();
        async move {
            if let Event::ServerError(e) = event {
                let _ = tx.send(e.to_string());
            }
        }
    })
    .connect(nats.address())
    .await
    .unwrap_or_else(|e| panic!("{identity} cannot connect: {e}"));
    (client, rx)
}

/// Waits for the server to refuse `what` (e.g. `Publish to "tocsin.alerts.x"`).
async fn expect_refused(errors: &mut mpsc::UnboundedReceiver<String>, what: &str) {
    let wanted = format!("Permissions Violation for {what}");
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let e = tokio::time::timeout_at(deadline, errors.recv())
            .await
            .unwrap_or_else(|_| panic!("the server did not refuse {what} within {WAIT:?}"))
            .expect("error channel open");
        if e.contains(&wanted) {
            return;
        }
    }
}

/// A request the server must refuse: sent with a reply inbox, as a NATS
/// client sends JetStream API requests.
async fn refused_request(
    client: &Client,
    errors: &mut mpsc::UnboundedReceiver<String>,
    subject: &str,
    body: &str,
) {
    client
        .publish_with_reply(
            subject.to_string(),
            client.new_inbox(),
            body.to_string().into(),
        )
        .await
        .unwrap();
    client.flush().await.unwrap();
    expect_refused(errors, &format!("Publish to \"{subject}\"")).await;
}

/// Tocsin running with one open incident (#1), opened at the returned time.
async fn one_incident(nats: &NatsServer) -> (TocsinHarness, jiff::Timestamp) {
    let tocsin = TocsinHarness::start(nats).await;
    let admin_client = nats.client().await;
    let admin = jetstream::new(admin_client.clone());
    let t0 = tocsin.clock_now();
    publish_alert(
        &admin,
        alert(
            &[("alertname", "DiskFull"), ("host", "db1")],
            &["alertname"],
            AlertStatus::Firing,
            t0,
        ),
        t0,
    )
    .await;
    wait_for(&admin_client, "the incident", |l| l.len() == 1).await;
    (tocsin, t0)
}

/// One page on NOTIFY, put there as the admin.
async fn one_page(admin: &jetstream::Context) {
    notifier::publish_pages(admin, &[notifier::page(1, Channel::Sms)]).await;
}

#[tokio::test]
async fn an_anonymous_client_cannot_connect() {
    let nats = NatsServer::start().await;
    let anonymous = async_nats::ConnectOptions::new()
        .connect(nats.address())
        .await;
    assert!(
        anonymous.is_err(),
        "a client without credentials was let in"
    );

    // A known user with another user's password is refused as well.
    let wrong = async_nats::ConnectOptions::with_user_and_password(
        "operator".into(),
        nats.password("admin").into(),
    )
    .connect(nats.address())
    .await;
    assert!(wrong.is_err(), "a wrong password was accepted");

    // Tocsin keeps retrying then, and says whose credentials were refused.
    let metrics = Metrics::new();
    let mut config = NatsConfig::for_url(nats.address());
    config.credentials.insert(
        "ingest",
        Credential::Read(tocsin_runtime::nats::NatsAuth::UserPassword {
            user: "ingest".into(),
            password: tocsin_runtime::config::Secret::new("not-the-password-of-ingest"),
        }),
    );
    let client = connect_as(&config, "ingest", "tocsin-ingest", &metrics)
        .await
        .unwrap();
    wait_for_metric(
        &metrics,
        r#"tocsin_nats_events_total{event="authorization_violation"}"#,
    )
    .await;
    assert!(!tocsin_runtime::nats::is_connected(&client));
}

/// Polls `/metrics` text until `line` is there with a count of at least 1.
async fn wait_for_metric(metrics: &Metrics, line: &str) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let text = metrics.encode();
        if text
            .lines()
            .any(|l| l.starts_with(line) && !l.ends_with(" 0"))
        {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{line} not counted within {WAIT:?}:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_service_works_with_its_own_credentials() {
    let nats = NatsServer::start().await;
    let mut config = TocsinHarness::config(&nats);
    // No shared credentials to fall back on: a service without its own
    // user could not connect at all.
    assert!(matches!(
        config.nats.auth,
        tocsin_runtime::nats::NatsAuth::None
    ));
    config.escalation = serde_yaml_ng::from_str(REFERENCE).unwrap();
    let operator = OperatorConfig {
        nats: config.nats.clone(),
        jetstream: config.jetstream.clone(),
        ..Default::default()
    };
    let tocsin = TocsinHarness::start_with(config).await;
    let admin = jetstream::new(nats.client().await);

    // ingest (HTTP) -> ALERTS -> incidents -> INCIDENTS -> escalation -> NOTIFY.
    let client = reqwest::Client::new();
    let url = format!("{}/api/v1/alerts/alertmanager", tocsin.ingest_url);
    let answer = http::post(&client, &url, Some(&tocsin.token), PAYLOAD).await;
    assert_eq!(answer.status, 200, "{}", answer.text);
    wait_for(&nats.client().await, "the incident", |l| l.len() == 1).await;
    // The services' timers run on the harness's manual clock; the alert was
    // received on the wall clock, after it: the first level is due now.
    tocsin
        .clock
        .set(jiff::Timestamp::now() + jiff::SignedDuration::from_secs(1));
    let deadline = tokio::time::Instant::now() + WAIT;
    while bus::count_without_markers(&admin, STREAM_NOTIFY).await == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no page on NOTIFY within {WAIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let pages = bus::read_pages(&admin).await;
    assert!(pages.iter().all(|p| p.envelope.body.incident.number == 1));

    // The operator CLI, as the operator: a list (a query) and an ack (a
    // command answered on the operator's inbox).
    let text = ops::Style::new(false);
    let listed = ops::list(&operator, false, 10, &text).await.unwrap();
    assert!(listed.contains("#1 "), "{listed}");
    let message = ops::command(
        &operator,
        "alice",
        Action::Ack {
            incident: IncidentRef::Number(1),
        },
    )
    .await
    .unwrap();
    assert!(message.contains("acknowledged"), "{message}");
    let shown = ops::show(&operator, IncidentRef::Number(1), &text)
        .await
        .unwrap();
    assert!(shown.contains("acknowledged by alice (cli)"), "{shown}");
}

#[tokio::test]
async fn the_notifiers_credentials_cannot_publish_alerts() {
    let nats = NatsServer::start().await;
    let admin = jetstream::new(nats.client().await);
    ensure_streams(&admin, &JetStreamConfig::default())
        .await
        .unwrap();

    // Through Tocsin's own connection, which counts the refusal (and logs
    // it at ERROR, naming the service).
    let metrics = Metrics::new();
    let mut config = NatsConfig::for_url(nats.address());
    config
        .credentials
        .insert("notifier", Credential::Read(nats.auth("notifier")));
    let client = connect_as(&config, "notifier", "tocsin-notifier", &metrics)
        .await
        .unwrap();
    client
        .publish("tocsin.alerts.generic.6a4f37c34a2d1e4b", "forged".into())
        .await
        .unwrap();
    client.flush().await.unwrap();
    wait_for_metric(
        &metrics,
        r#"tocsin_nats_events_total{event="permissions_violation"}"#,
    )
    .await;
    assert_eq!(bus::count_alerts(&admin).await, 0);

    // The same with the raw error in hand.
    let (client, mut errors) = watched(&nats, "notifier").await;
    client
        .publish(
            "tocsin.alerts.alertmanager.6a4f37c34a2d1e4b",
            "forged".into(),
        )
        .await
        .unwrap();
    expect_refused(
        &mut errors,
        "Publish to \"tocsin.alerts.alertmanager.6a4f37c34a2d1e4b\"",
    )
    .await;
    assert_eq!(bus::count_alerts(&admin).await, 0);
}

#[tokio::test]
async fn the_operator_cannot_purge_delete_or_publish_alerts() {
    let nats = NatsServer::start().await;
    let admin = jetstream::new(nats.client().await);
    ensure_streams(&admin, &JetStreamConfig::default())
        .await
        .unwrap();
    one_page(&admin).await;
    let (client, mut errors) = watched(&nats, "operator").await;

    refused_request(&client, &mut errors, "$JS.API.STREAM.PURGE.NOTIFY", "{}").await;
    refused_request(&client, &mut errors, "$JS.API.STREAM.DELETE.NOTIFY", "").await;
    refused_request(
        &client,
        &mut errors,
        "$JS.API.CONSUMER.DELETE.COMMANDS.tocsin-incidents",
        "",
    )
    .await;
    refused_request(
        &client,
        &mut errors,
        "$JS.API.STREAM.UPDATE.NOTIFY",
        r#"{"name":"NOTIFY","subjects":["tocsin.notify.>"],"max_age":1000000000}"#,
    )
    .await;
    assert_eq!(
        bus::count_without_markers(&admin, STREAM_NOTIFY).await,
        1,
        "NOTIFY was emptied"
    );

    client
        .publish("tocsin.alerts.generic.6a4f37c34a2d1e4b", "forged".into())
        .await
        .unwrap();
    client.flush().await.unwrap();
    expect_refused(
        &mut errors,
        "Publish to \"tocsin.alerts.generic.6a4f37c34a2d1e4b\"",
    )
    .await;
    assert_eq!(bus::count_alerts(&admin).await, 0);
}

#[tokio::test]
async fn ingest_cannot_read_notify() {
    let nats = NatsServer::start().await;
    let admin = jetstream::new(nats.client().await);
    ensure_streams(&admin, &JetStreamConfig::default())
        .await
        .unwrap();
    one_page(&admin).await;
    let (client, mut errors) = watched(&nats, "ingest").await;

    // Not through JetStream: no consumer, no pull from the notifier's, no get.
    refused_request(
        &client,
        &mut errors,
        "$JS.API.CONSUMER.CREATE.NOTIFY",
        r#"{"stream_name":"NOTIFY","config":{"deliver_policy":"all","ack_policy":"none"}}"#,
    )
    .await;
    refused_request(
        &client,
        &mut errors,
        "$JS.API.CONSUMER.MSG.NEXT.NOTIFY.tocsin-notifier-sms",
        r#"{"batch":1}"#,
    )
    .await;
    refused_request(
        &client,
        &mut errors,
        "$JS.API.STREAM.MSG.GET.NOTIFY",
        r#"{"seq":1}"#,
    )
    .await;
    refused_request(
        &client,
        &mut errors,
        "$JS.API.DIRECT.GET.NOTIFY",
        r#"{"seq":1}"#,
    )
    .await;
    // Not by listening: neither to the pages' subjects nor to the inbox the
    // notifier's consumer delivers to.
    let _pages = client.subscribe("tocsin.notify.>").await.unwrap();
    expect_refused(&mut errors, "Subscription to \"tocsin.notify.>\"").await;
    let _inbox = client.subscribe("_INBOX.notifier.>").await.unwrap();
    expect_refused(&mut errors, "Subscription to \"_INBOX.notifier.>\"").await;
    let _all = client.subscribe(">").await.unwrap();
    expect_refused(&mut errors, "Subscription to \">\"").await;
    assert_eq!(bus::count_without_markers(&admin, STREAM_NOTIFY).await, 1);
}

#[tokio::test]
async fn no_service_can_take_over_another_ones_durable_consumer() {
    let nats = NatsServer::start().await;
    let admin = jetstream::new(nats.client().await);
    ensure_streams(&admin, &JetStreamConfig::default())
        .await
        .unwrap();
    let (client, mut errors) = watched(&nats, "escalation").await;
    // By name: refused.
    refused_request(
        &client,
        &mut errors,
        "$JS.API.CONSUMER.CREATE.INCIDENTS.tocsin-notifier-changes",
        r#"{"stream_name":"INCIDENTS","config":{"durable_name":"tocsin-notifier-changes","ack_policy":"explicit"}}"#,
    )
    .await;
    refused_request(
        &client,
        &mut errors,
        "$JS.API.CONSUMER.DELETE.INCIDENTS.tocsin-notifier-changes",
        "",
    )
    .await;
    // Through the unnamed create it may use for its ordered reads: JetStream
    // itself refuses a durable there.
    let reply = client
        .request(
            "$JS.API.CONSUMER.CREATE.INCIDENTS",
            r#"{"stream_name":"INCIDENTS","config":{"durable_name":"tocsin-notifier-changes","ack_policy":"explicit"}}"#.into(),
        )
        .await
        .unwrap();
    let answer: serde_json::Value = serde_json::from_slice(&reply.payload).unwrap();
    assert!(answer.get("error").is_some(), "{answer}");
    let mut incidents = admin.get_stream(STREAM_INCIDENTS).await.unwrap();
    assert_eq!(incidents.info().await.unwrap().state.consumer_count, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn services_being_built_can_do_their_jobs() {
    let nats = NatsServer::start().await;
    let (_tocsin, t0) = one_incident(&nats).await;

    // remediation: reads INCIDENTS through its durable consumer, keeps
    // state in its KV buckets, sends the commands a runbook sends and gets
    // the answers; nothing else.
    let (client, mut errors) = watched(&nats, "remediation").await;
    let js = jetstream::new(client.clone());
    use futures::StreamExt;
    let durable = js
        .get_stream(STREAM_INCIDENTS)
        .await
        .unwrap()
        .get_or_create_consumer(
            "tocsin-remediation",
            jetstream::consumer::pull::Config {
                durable_name: Some("tocsin-remediation".into()),
                ack_policy: jetstream::consumer::AckPolicy::Explicit,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let mut batch = durable.fetch().max_messages(1).messages().await.unwrap();
    let msg = tokio::time::timeout(WAIT, batch.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    msg.double_ack().await.unwrap();
    let kv = js
        .create_key_value(jetstream::kv::Config {
            bucket: "tocsin_remediation_runs".into(),
            history: 5,
            ..Default::default()
        })
        .await
        .unwrap();
    kv.put("run-1", "started".into()).await.unwrap();
    assert_eq!(kv.get("run-1").await.unwrap().unwrap(), "started");
    let reply = command(
        &client,
        &js,
        "remediation",
        Action::Note {
            incident: IncidentRef::Number(1),
            text: "restarted the disk cleaner".into(),
        },
        t0,
    )
    .await;
    assert!(matches!(reply, CommandReply::Accepted { .. }), "{reply:?}");
    client
        .publish("tocsin.cmd.create_silence", "x".into())
        .await
        .unwrap();
    expect_refused(&mut errors, "Publish to \"tocsin.cmd.create_silence\"").await;
    // Its `notify` steps reach Slack channels and webhooks, never a person.
    client
        .publish("tocsin.notify.sms", "x".into())
        .await
        .unwrap();
    expect_refused(&mut errors, "Publish to \"tocsin.notify.sms\"").await;
    refused_request(
        &client,
        &mut errors,
        "$JS.API.CONSUMER.CREATE.INCIDENTS",
        r#"{"stream_name":"INCIDENTS","config":{"ack_policy":"none"}}"#,
    )
    .await;

    // chatops: commands (a button press) and queries.
    let client = nats.client_as("chatops").await.unwrap();
    let js = jetstream::new(client.clone());
    let reply = command(
        &client,
        &js,
        "alice",
        Action::Ack {
            incident: IncidentRef::Number(1),
        },
        t0,
    )
    .await;
    assert!(matches!(reply, CommandReply::Accepted { .. }), "{reply:?}");
    let listed = tocsin_tests::incidents::list(&client, Default::default()).await;
    assert_eq!(listed[0].status, IncidentStatus::Acknowledged);
    let schedules = client
        .request(query::ESCALATION_SCHEDULES, rmp_list_schedules())
        .await
        .unwrap();
    assert!(!schedules.payload.is_empty());
}

fn rmp_list_schedules() -> bytes::Bytes {
    tocsin_proto::codec::encode(&tocsin_proto::query::ListSchedules {})
        .unwrap()
        .into()
}

#[tokio::test]
async fn the_notifier_keeps_its_delivery_records_in_its_kv_bucket() {
    let nats = NatsServer::start().await;
    let client = nats.client_as("notifier").await.unwrap();
    let js = jetstream::new(client);
    let kv = js
        .create_key_value(jetstream::kv::Config {
            bucket: "tocsin_deliveries".into(),
            history: 1,
            ..Default::default()
        })
        .await
        .unwrap();
    let mut watch = kv.watch_all().await.unwrap();
    kv.put("page-1", "sending".into()).await.unwrap();
    kv.put("page-1", "sent".into()).await.unwrap();
    assert_eq!(kv.get("page-1").await.unwrap().unwrap(), "sent");
    use futures::StreamExt;
    let seen = tokio::time::timeout(WAIT, watch.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(seen.key, "page-1");
    let keys: Vec<String> = kv.keys().await.unwrap().map(|k| k.unwrap()).collect().await;
    assert_eq!(keys, ["page-1"]);
    kv.delete("page-1").await.unwrap();
    kv.purge("page-1").await.unwrap();
    assert!(kv.get("page-1").await.unwrap().is_none());

    // Another service cannot read it.
    let (other, mut errors) = watched(&nats, "escalation").await;
    refused_request(
        &other,
        &mut errors,
        "$JS.API.DIRECT.GET.KV_tocsin_deliveries.$KV.tocsin_deliveries.page-1",
        "",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn services_create_streams_but_only_the_admin_changes_them() {
    let nats = NatsServer::start().await;
    let admin = jetstream::new(nats.client().await);
    let max_age = |js: jetstream::Context| async move {
        tocsin_tests::bus::stream_config(&js, STREAM_ALERTS)
            .await
            .max_age
    };

    // A fresh server: the services create the streams themselves.
    let tocsin = TocsinHarness::start(&nats).await;
    assert_eq!(
        max_age(admin.clone()).await,
        Duration::from_secs(7 * 86_400)
    );
    tocsin.stop().await.unwrap();

    // A service's user may not change one (a shorter max age drops messages).
    let (client, mut errors) = watched(&nats, "ingest").await;
    refused_request(
        &client,
        &mut errors,
        "$JS.API.STREAM.UPDATE.ALERTS",
        r#"{"name":"ALERTS","subjects":["tocsin.alerts.>"],"max_age":1000000000}"#,
    )
    .await;

    // Tocsin with other settings still starts; the stream keeps its own
    // (no update is attempted without the admin's credentials).
    let mut config = TocsinHarness::config(&nats);
    config.jetstream.alerts_max_age = tocsin_runtime::config::HumanDuration::secs(3 * 86_400);
    let tocsin = TocsinHarness::start_with(config.clone()).await;
    tocsin.stop().await.unwrap();
    assert_eq!(
        max_age(admin.clone()).await,
        Duration::from_secs(7 * 86_400)
    );

    // Given the admin's credentials, it applies them.
    config
        .nats
        .credentials
        .insert("admin", Credential::Read(nats.auth("admin")));
    let _tocsin = TocsinHarness::start_with(config).await;
    let deadline = tokio::time::Instant::now() + WAIT;
    while max_age(admin.clone()).await != Duration::from_secs(3 * 86_400) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "ALERTS not updated within {WAIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// The leases (one active incidents and escalation instance, the others
/// standing by): each service creates its own lease bucket and writes and
/// reads its one key there, and nothing else: not another key, not the
/// other service's lease, not a purge.
#[tokio::test]
async fn each_service_holds_only_its_own_lease() {
    let nats = NatsServer::start().await;
    for (role, other) in [("incidents", "escalation"), ("escalation", "incidents")] {
        let (client, mut errors) = watched(&nats, role).await;
        let js = jetstream::new(client.clone());
        let bucket = tocsin_runtime::lease::bucket(role);
        let kv = js
            .create_key_value(jetstream::kv::Config {
                bucket: bucket.clone(),
                history: 1,
                max_age: Duration::from_secs(5),
                ..Default::default()
            })
            .await
            .unwrap_or_else(|e| panic!("{role} cannot create {bucket}: {e}"));
        let key = tocsin_runtime::lease::KEY;
        let rev = kv.create(key, "a".into()).await.unwrap();
        let rev = kv.update(key, "b".into(), rev).await.unwrap();
        let entry = kv.entry(key).await.unwrap().unwrap();
        assert_eq!((entry.revision, &entry.value[..]), (rev, &b"b"[..]));
        kv.delete_expect_revision(key, Some(rev)).await.unwrap();

        client
            .publish(format!("$KV.{bucket}.other"), "x".into())
            .await
            .unwrap();
        expect_refused(&mut errors, &format!("Publish to \"$KV.{bucket}.other\"")).await;
        let theirs = tocsin_runtime::lease::bucket(other);
        client
            .publish(format!("$KV.{theirs}.{key}"), "x".into())
            .await
            .unwrap();
        expect_refused(&mut errors, &format!("Publish to \"$KV.{theirs}.{key}\"")).await;
        refused_request(
            &client,
            &mut errors,
            &format!("$JS.API.DIRECT.GET.KV_{theirs}.$KV.{theirs}.{key}"),
            "",
        )
        .await;
        refused_request(
            &client,
            &mut errors,
            &format!("$JS.API.STREAM.PURGE.KV_{bucket}"),
            "{}",
        )
        .await;
    }
}

/// A service may publish only its own commands' subjects (the notifier:
/// `tocsin.cmd.delivery`), and a command is applied only on the subject
/// of its action: otherwise a notifier's credentials could resolve any
/// incident by sending a resolve on the receipt subject. Such a command is
/// dead-lettered with the reason, never applied.
#[tokio::test]
async fn a_command_on_another_actions_subject_is_dead_lettered_not_applied() {
    use tocsin_proto::{
        codec,
        command::Command,
        incident::Actor,
        subjects::{headers, STREAM_DEADLETTER},
        Envelope,
    };
    let nats = NatsServer::start().await;
    let (_tocsin, t0) = one_incident(&nats).await;
    let admin_client = nats.client().await;
    let admin = jetstream::new(admin_client.clone());

    let js = jetstream::new(nats.client_as("notifier").await.unwrap());
    let forged = Command::new(
        Actor::new("mallory", "notifier"),
        Action::Resolve {
            incident: IncidentRef::Number(1),
        },
    );
    let mut h = async_nats::HeaderMap::new();
    h.insert(headers::MSG_ID, forged.id.as_str());
    let payload = codec::encode(&Envelope::new("notifier", t0, forged)).unwrap();
    js.publish_with_headers("tocsin.cmd.delivery", h, payload.into())
        .await
        .expect("the notifier may publish receipts")
        .await
        .expect("stored on COMMANDS");

    let why = tocsin_tests::eventually("the forged command dead-lettered", || async {
        let mut dlq = admin.get_stream(STREAM_DEADLETTER).await.unwrap();
        let last = dlq.info().await.unwrap().state.last_sequence;
        match dlq.get_raw_message(last).await {
            Ok(m) if last > 0 => Ok(m.headers.get(headers::DLQ_REASON).unwrap().to_string()),
            _ => Err("nothing dead-lettered yet"),
        }
    })
    .await;
    assert!(why.contains("tocsin.cmd.resolve"), "{why}");
    let listed = tocsin_tests::incidents::list(&admin_client, Default::default()).await;
    assert_eq!(listed[0].status, IncidentStatus::Triggered);
}
