//! Poison inputs: an input too big for the INCIDENTS stream, or one
//! JetStream refuses for good, must never stop the line.

use async_nats::jetstream;
use jiff::Timestamp;
use tocsin_proto::{
    command::{Action, CommandReply, IncidentRef},
    incident::{EventKind, IncidentStatus, LogEntry},
    subjects::{headers, STREAM_DEADLETTER, STREAM_INCIDENTS},
    AlertStatus,
};
use tocsin_tests::{
    bus,
    incidents::{alert, command, get, publish_alert, try_publish_alerts, wait_for},
    NatsServer, TocsinHarness,
};

/// The default budget of one INCIDENTS entry (`incidents.max_entry_bytes`).
const ENTRY_BUDGET: usize = 256 * 1024;

#[tokio::test]
async fn a_600_kb_label_is_stored_truncated_and_the_next_100_alerts_become_incidents() {
    let nats = NatsServer::start().await;
    let tocsin = TocsinHarness::start(&nats).await;
    let client = nats.client().await;
    let js = jetstream::new(client.clone());
    let now = Timestamp::now();

    // Straight onto ALERTS, bypassing ingest (as an old message or another
    // publisher could): 600 KB fits NATS's 1 MiB max payload, but the
    // incident entry carrying it twice (alert and summary labels) would not.
    let blob = "x".repeat(600_000);
    publish_alert(
        &js,
        alert(
            &[("alertname", "Poison"), ("blob", &blob)],
            &["alertname"],
            AlertStatus::Firing,
            now,
        ),
        now,
    )
    .await;
    for i in 0..100 {
        let name = format!("Normal{i}");
        publish_alert(
            &js,
            alert(
                &[("alertname", &name), ("host", "db1")],
                &["alertname"],
                AlertStatus::Firing,
                now,
            ),
            now,
        )
        .await;
    }
    let all = wait_for(&client, "101 incidents", |all| all.len() == 101).await;
    for i in 0..100 {
        let title = format!("Normal{i}");
        assert!(all.iter().any(|inc| inc.title == title), "{title} missing");
    }

    // The big one is there, bounded, with a visible marker.
    let poison = all.iter().find(|i| i.title == "Poison").expect("Poison");
    let detail = get(&client, IncidentRef::Number(poison.number)).await;
    let EventKind::Opened { alert: opened, .. } = &detail.timeline[0].kind else {
        panic!("{:?}", detail.timeline[0].kind)
    };
    let value = &opened.labels["blob"];
    assert!(value.len() < 100_000, "blob kept {} bytes", value.len());
    assert!(value.starts_with("xxxx"), "{}", &value[..40]);
    assert!(
        value.contains("…[truncated ") && value.ends_with(" bytes]"),
        "no truncation marker in {:?}",
        &value[value.len().saturating_sub(60)..]
    );

    // Every stored entry is within the budget, and nothing was dead-lettered.
    let stored = bus::read_entries(&js).await;
    assert_eq!(stored.len(), 101);
    let s = js.get_stream(STREAM_INCIDENTS).await.unwrap();
    for m in &stored {
        let raw = s.get_raw_message(m.seq).await.unwrap();
        assert!(
            raw.payload.len() <= ENTRY_BUDGET,
            "entry {} is {} bytes",
            m.seq,
            raw.payload.len()
        );
    }
    assert_eq!(bus::count(&js, STREAM_DEADLETTER).await, 0);

    // The same alert again (Alertmanager repeats) changes nothing: the
    // bounded alert compares equal to what is stored.
    publish_alert(
        &js,
        alert(
            &[("alertname", "Poison"), ("blob", &blob)],
            &["alertname"],
            AlertStatus::Firing,
            now,
        ),
        now,
    )
    .await;
    publish_alert(
        &js,
        alert(
            &[("alertname", "After")],
            &["alertname"],
            AlertStatus::Firing,
            now,
        ),
        now,
    )
    .await;
    wait_for(&client, "the alert after the repeat", |all| {
        all.len() == 102
    })
    .await;
    assert_eq!(
        bus::read_entries(&js).await.len(),
        102,
        "the repeat of the big alert wrote nothing"
    );
    let m = tocsin.metrics().await;
    assert!(
        !m.contains("tocsin_incidents_dead_letters_total{"),
        "nothing dead-lettered: {m}"
    );
}

/// One alert of a message holding several (as ingest stores a webhook)
/// that can never be decided goes to DEADLETTER alone, as a message of its
/// own on its own subject; the alerts around it are decided.
#[tokio::test]
async fn an_undecidable_alert_of_a_batch_is_dead_lettered_alone() {
    let nats = NatsServer::start().await;
    let _tocsin = TocsinHarness::start(&nats).await;
    let client = nats.client().await;
    let js = jetstream::new(client.clone());
    let now = Timestamp::now();
    let one = |name: &str| {
        alert(
            &[("alertname", name)],
            &["alertname"],
            AlertStatus::Firing,
            now,
        )
    };
    // A dedup key of 300 KB: over a quarter of the entry budget, and a key
    // is never cut, so the alert can never be decided.
    let mut poison = one("Poison");
    poison.dedup_key = Some("k".repeat(300_000));
    let seq = try_publish_alerts(&js, vec![one("Before"), poison.clone(), one("After")], now)
        .await
        .expect("published");

    let all = wait_for(&client, "the two decidable alerts", |all| all.len() == 2).await;
    let mut titles: Vec<&str> = all.iter().map(|i| i.title.as_str()).collect();
    titles.sort_unstable();
    assert_eq!(titles, ["After", "Before"]);

    let dead = bus::read_stream::<tocsin_proto::Alert>(&js, STREAM_DEADLETTER).await;
    assert_eq!(dead.len(), 1, "only the poison alert");
    assert_eq!(dead[0].envelope.body, poison, "the alert as it came");
    assert_eq!(
        dead[0]
            .headers
            .get(headers::DLQ_SUBJECT)
            .map(|v| v.as_str().to_string()),
        Some(format!("tocsin.alerts.alertmanager.{}", poison.fingerprint))
    );
    assert_eq!(
        dead[0]
            .headers
            .get("Nats-Msg-Id")
            .map(|v| v.as_str().to_string()),
        Some(format!("dlq:ALERTS:{seq}.1"))
    );
    let reason = dead[0]
        .headers
        .get(headers::DLQ_REASON)
        .map(|v| v.as_str().to_string())
        .unwrap_or_default();
    assert!(reason.contains("dedup key"), "{reason}");

    // The line goes on.
    publish_alert(&js, one("Later"), now).await;
    wait_for(&client, "the alert after", |all| all.len() == 3).await;
    assert_eq!(bus::count(&js, STREAM_DEADLETTER).await, 1);
}

#[tokio::test]
async fn a_command_the_incidents_stream_refuses_is_dead_lettered_after_bounded_retries() {
    let nats = NatsServer::start().await;
    let tocsin = TocsinHarness::start(&nats).await;
    let client = nats.client().await;
    let js = jetstream::new(client.clone());
    let now = Timestamp::now();
    publish_alert(
        &js,
        alert(
            &[("alertname", "DiskFull"), ("host", "db1")],
            &["alertname"],
            AlertStatus::Firing,
            now,
        ),
        now,
    )
    .await;
    wait_for(&client, "the incident", |all| all.len() == 1).await;
    let n = IncidentRef::Number(1);

    // A real refusal: the INCIDENTS stream takes no message over 4 KiB.
    let mut cfg = tocsin_tests::bus::stream_config(&js, STREAM_INCIDENTS).await;
    cfg.max_message_size = 4096;
    js.update_stream(cfg).await.unwrap();

    // A note of 8,000 characters is a valid command (the limit is 10,000)
    // whose entry cannot be stored.
    let r = command(
        &client,
        &js,
        "alice",
        Action::Note {
            incident: n.clone(),
            text: "n".repeat(8000),
        },
        now,
    )
    .await;
    let CommandReply::Rejected { reason, .. } = &r else {
        panic!("{r:?}")
    };
    assert!(reason.contains("could not be applied"), "{reason}");
    assert!(reason.contains("dead-letter"), "{reason}");

    // The next command is processed.
    let r = command(
        &client,
        &js,
        "bob",
        Action::Ack {
            incident: n.clone(),
        },
        now,
    )
    .await;
    assert!(matches!(r, CommandReply::Accepted { .. }), "{r:?}");
    assert_eq!(
        get(&client, n).await.incident.status,
        IncidentStatus::Acknowledged
    );

    // The refused command is on DEADLETTER with the reason.
    let mut dlq = js.get_stream(STREAM_DEADLETTER).await.unwrap();
    let info = dlq.info().await.unwrap().state.clone();
    assert_eq!(info.messages, 1);
    let m = dlq.get_raw_message(info.last_sequence).await.unwrap();
    assert_eq!(m.subject.as_str(), "tocsin.dlq.commands");
    assert_eq!(
        m.headers.get(headers::DLQ_SUBJECT).unwrap().as_str(),
        "tocsin.cmd.note"
    );
    let why = m.headers.get(headers::DLQ_REASON).unwrap().to_string();
    assert!(why.contains("after 5 attempts"), "{why}");
    assert!(why.contains("message size exceeds maximum"), "{why}");
    let metrics = tocsin.metrics().await;
    assert!(
        metrics.contains(
            r#"tocsin_incidents_dead_letters_total{stream="COMMANDS",reason="refused"} 1"#
        ),
        "{metrics}"
    );
}

#[tokio::test]
async fn a_cut_alert_decided_again_after_a_restart_writes_nothing_new() {
    let nats = NatsServer::start().await;
    let data = tempfile::tempdir().unwrap();
    let mut config = TocsinHarness::config(&nats);
    config.incidents.data_dir = Some(tocsin_runtime::config::ConfigPath(
        data.path().join("incidents"),
    ));
    let client = nats.client().await;
    let js = jetstream::new(client.clone());
    let now = Timestamp::now();
    let big = alert(
        &[("alertname", "Poison"), ("blob", &"y".repeat(400_000))],
        &["alertname"],
        AlertStatus::Firing,
        now,
    );

    let tocsin = TocsinHarness::start_with(config.clone()).await;
    publish_alert(&js, big, now).await;
    wait_for(&client, "the cut alert's incident", |all| all.len() == 1).await;
    tocsin.stop().await.unwrap();

    // On start the service decides its last input again (it may have been
    // only partly published): the same cut gives the same alert, so
    // nothing is written for it.
    let _tocsin = TocsinHarness::start_with(config).await;
    publish_alert(
        &js,
        alert(
            &[("alertname", "After")],
            &["alertname"],
            AlertStatus::Firing,
            now,
        ),
        now,
    )
    .await;
    wait_for(&client, "the next alert's incident", |all| all.len() == 2).await;
    let kinds: Vec<&str> = bus::read_entries(&js)
        .await
        .iter()
        .map(|m| match &m.envelope.body {
            LogEntry::Incident(e) => e.kind.name(),
            LogEntry::Silence { .. } => "silence",
        })
        .collect();
    assert_eq!(kinds, ["opened", "opened"]);
}
