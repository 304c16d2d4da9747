//! Grouping, lifecycle, reopen window — through the real bus.

use jiff::{SignedDuration, Timestamp};
use tocsin_proto::subjects::STREAM_INCIDENTS;
use tocsin_proto::{
    command::IncidentRef,
    incident::{EventKind, IncidentStatus, LogEntry, ResolveReason, Severity},
    AlertStatus,
};
use tocsin_tests::{
    bus, http,
    incidents::{alert, get, log, publish_alert, wait_for},
    NatsServer, TocsinHarness,
};

fn t(min: i64) -> Timestamp {
    "2026-01-05T10:00:00Z".parse::<Timestamp>().unwrap() + SignedDuration::from_mins(min)
}

#[tokio::test]
async fn grouping_resolve_reopen_and_new_incident_after_the_window() {
    let nats = NatsServer::start().await;
    let tocsin = TocsinHarness::start(&nats).await; // reopen_window: 1h (default)
    let client = nats.client().await;
    let js = async_nats::jetstream::new(client.clone());
    let group = ["alertname", "service"];
    let api = |inst: &'static str, sev: &'static str| {
        [
            ("alertname", "HighLatency"),
            ("service", "api"),
            ("instance", inst),
            ("severity", sev),
        ]
    };
    let start = t(0);

    // Three alerts of one group -> one incident with three alerts.
    for (i, inst) in ["api-1", "api-2", "api-3"].into_iter().enumerate() {
        let sev = if i == 1 { "critical" } else { "warning" };
        publish_alert(
            &js,
            alert(&api(inst, sev), &group, AlertStatus::Firing, start),
            t(i as i64),
        )
        .await;
    }
    // A different group -> a second incident.
    let db = [
        ("alertname", "HighLatency"),
        ("service", "db"),
        ("instance", "db-1"),
        ("severity", "warning"),
    ];
    publish_alert(&js, alert(&db, &group, AlertStatus::Firing, start), t(3)).await;

    let all = wait_for(&client, "two incidents, the first with 3 alerts", |all| {
        all.len() == 2 && all.iter().any(|i| i.alerts_total == 3)
    })
    .await;
    let api_inc = all
        .iter()
        .find(|i| i.labels.get("service").map(String::as_str) == Some("api"))
        .unwrap();
    assert_eq!(api_inc.number, 1);
    assert_eq!(api_inc.status, IncidentStatus::Triggered);
    assert_eq!(
        api_inc.severity,
        Severity::Critical,
        "the highest of its alerts"
    );
    assert_eq!(api_inc.alerts_firing, 3);
    assert_eq!(api_inc.title, "HighLatency (service=api)");
    assert_eq!(api_inc.opened_at, t(0));
    let db_inc = all.iter().find(|i| i.number == 2).unwrap();
    assert_eq!(db_inc.alerts_total, 1);

    // A repeat notification (same alert, same start) changes nothing.
    let before = log(&js).await.len();
    publish_alert(
        &js,
        alert(&api("api-1", "warning"), &group, AlertStatus::Firing, start),
        t(4),
    )
    .await;

    // All three resolve -> the incident resolves by itself.
    for (i, inst) in ["api-1", "api-2", "api-3"].into_iter().enumerate() {
        let sev = if i == 1 { "critical" } else { "warning" };
        publish_alert(
            &js,
            alert(&api(inst, sev), &group, AlertStatus::Resolved, start),
            t(10 + i as i64),
        )
        .await;
    }
    wait_for(&client, "api incident resolved", |all| {
        all.iter()
            .any(|i| i.number == 1 && i.status == IncidentStatus::Resolved)
    })
    .await;
    let entries = log(&js).await;
    assert_eq!(
        entries.len(),
        before + 4,
        "3 alert_resolved + 1 resolved, nothing for the repeat"
    );
    match &entries.last().unwrap().1 {
        LogEntry::Incident(e) => {
            assert_eq!(
                e.kind,
                EventKind::Resolved {
                    reason: ResolveReason::AllAlertsResolved
                }
            );
            assert_eq!(e.incident.resolved_at, Some(t(12)));
        }
        other => panic!("{other:?}"),
    }

    // Fires again 30 min after resolving (within 1h) -> the same incident reopens.
    publish_alert(
        &js,
        alert(
            &api("api-2", "critical"),
            &group,
            AlertStatus::Firing,
            t(40),
        ),
        t(42),
    )
    .await;
    let all = wait_for(&client, "incident #1 reopened", |all| {
        all.iter()
            .any(|i| i.number == 1 && i.status == IncidentStatus::Triggered && i.reopen_count == 1)
    })
    .await;
    assert_eq!(all.len(), 2, "no new incident");
    let detail = get(&client, IncidentRef::Number(1)).await;
    assert_eq!(detail.incident.alerts_firing, 1);
    let kinds: Vec<&str> = detail.timeline.iter().map(|e| e.kind.name()).collect();
    assert_eq!(
        kinds,
        [
            "opened",
            "alert_firing",
            "alert_firing",
            "alert_resolved",
            "alert_resolved",
            "alert_resolved",
            "resolved",
            "reopened",
            "alert_firing"
        ]
    );

    // Resolve again, then fire 2 hours later -> a new incident #3.
    publish_alert(
        &js,
        alert(
            &api("api-2", "critical"),
            &group,
            AlertStatus::Resolved,
            t(40),
        ),
        t(50),
    )
    .await;
    publish_alert(
        &js,
        alert(
            &api("api-2", "critical"),
            &group,
            AlertStatus::Firing,
            t(170),
        ),
        t(171),
    )
    .await;
    let all = wait_for(&client, "incident #3", |all| {
        all.iter().any(|i| i.number == 3)
    })
    .await;
    let third = all.iter().find(|i| i.number == 3).unwrap();
    assert_eq!(third.dedup_key, api_inc.dedup_key);
    assert_eq!(third.status, IncidentStatus::Triggered);
    assert_eq!(
        all.iter().find(|i| i.number == 1).unwrap().status,
        IncidentStatus::Resolved
    );
    tocsin.stop().await.unwrap();
}

#[tokio::test]
async fn an_alertmanager_webhook_becomes_an_incident_end_to_end() {
    let nats = NatsServer::start().await;
    let tocsin = TocsinHarness::start(&nats).await;
    let client = nats.client().await;
    let a = http::post(
        &reqwest::Client::new(),
        &format!("{}/api/v1/alerts/alertmanager", tocsin.ingest_url),
        Some(&tocsin.token),
        include_str!("../fixtures/alertmanager_3_alerts.json"),
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.text);
    // Grouped by Alertmanager's groupLabels (alertname, service): one incident,
    // two alerts firing, and the resolved third never seen firing is not attached.
    let all = wait_for(&client, "one incident with 2 alerts", |all| {
        all.len() == 1 && all[0].alerts_total == 2
    })
    .await;
    let inc = &all[0];
    assert_eq!(inc.title, "p99 > 2s");
    assert_eq!(inc.severity, Severity::Critical);
    assert_eq!(inc.status, IncidentStatus::Triggered);
    let detail = get(&client, IncidentRef::Id(inc.id)).await;
    // The two firing alerts of the webhook, one after the other in its
    // message, open the incident in one entry.
    assert_eq!(detail.timeline.len(), 1);
    assert_eq!(detail.timeline[0].kind.name(), "opened");
    assert_eq!(detail.timeline[0].kind.alerts().count(), 2);
}

/// Posts an Alertmanager webhook to ingest and expects it stored (200).
async fn post_alertmanager(tocsin: &TocsinHarness, body: String) {
    let url = format!("{}/api/v1/alerts/alertmanager", tocsin.ingest_url);
    let a = http::post(&reqwest::Client::new(), &url, Some(&tocsin.token), body).await;
    assert_eq!(a.status, 200, "{}", a.text);
}

/// An Alertmanager webhook of `n` alerts of one group (instances
/// `from..from + n`), firing or resolved.
fn grouped_webhook(from: usize, n: usize, firing: bool) -> String {
    let status = if firing { "firing" } else { "resolved" };
    let alerts: Vec<serde_json::Value> = (from..from + n)
        .map(|i| {
            serde_json::json!({
                "status": status,
                "labels": {"alertname": "NodeDown", "cluster": "eu-1", "severity": "critical",
                           "instance": format!("node-{i}:9100")},
                "annotations": {"summary": "node down"},
                "startsAt": "2026-01-05T10:00:00Z",
                "endsAt": if firing { "0001-01-01T00:00:00Z" } else { "2026-01-05T11:00:00Z" },
                "generatorURL": "http://prometheus:9090/graph"
            })
        })
        .collect();
    serde_json::json!({
        "receiver": "tocsin", "status": status, "alerts": alerts,
        "groupLabels": {"alertname": "NodeDown", "cluster": "eu-1"},
        "commonLabels": {"alertname": "NodeDown", "cluster": "eu-1", "severity": "critical"},
        "commonAnnotations": {"summary": "node down"},
        "externalURL": "http://alertmanager:9093", "version": "4",
        "groupKey": "{}:{alertname=\"NodeDown\", cluster=\"eu-1\"}", "truncatedAlerts": 0
    })
    .to_string()
}

/// Alertmanager sends a group's alerts together: a webhook of 100 alerts
/// of one group is one INCIDENTS entry (the incident opened with all of
/// them), not a hundred synced writes; the next notification of the group,
/// with 50 alerts more, adds one entry; the group resolved is three (149
/// alerts resolved, then the last one, whose alert comes with the
/// incident's resolution). The incident still shows every alert.
#[tokio::test]
async fn a_webhooks_alerts_of_one_incident_are_written_as_one_entry() {
    let nats = NatsServer::start().await;
    let tocsin = TocsinHarness::start(&nats).await;
    let client = nats.client().await;
    let js = async_nats::jetstream::new(client.clone());
    let post = |body: String| post_alertmanager(&tocsin, body);
    post(grouped_webhook(0, 100, true)).await;
    wait_for(&client, "one incident with 100 alerts", |all| {
        all.len() == 1 && all[0].alerts_total == 100 && all[0].alerts_firing == 100
    })
    .await;
    post(grouped_webhook(0, 150, true)).await;
    let all = wait_for(&client, "one incident with 150 alerts", |all| {
        all.len() == 1 && all[0].alerts_total == 150
    })
    .await;
    let detail = get(&client, IncidentRef::Id(all[0].id)).await;
    assert_eq!(detail.alerts.len(), 150);
    assert!(detail
        .alerts
        .iter()
        .all(|a| a.status == AlertStatus::Firing));
    assert_eq!(detail.timeline.len(), 2);
    post(grouped_webhook(0, 150, false)).await;
    wait_for(&client, "the incident resolved", |all| {
        all.len() == 1 && all[0].status == IncidentStatus::Resolved
    })
    .await;
    let entries: Vec<String> = log(&js)
        .await
        .into_iter()
        .map(|(_, e)| match e {
            LogEntry::Incident(e) => format!(
                "{} ({} alerts)",
                e.kind.name(),
                e.kind.alerts().count() + e.kind.resolved().len()
            ),
            other => format!("{other:?}"),
        })
        .collect();
    assert_eq!(
        entries,
        [
            "opened (100 alerts)",
            "alert_firing (50 alerts)",
            "alert_resolved (149 alerts)",
            "alert_resolved (1 alerts)",
            "resolved (0 alerts)"
        ],
        "INCIDENTS"
    );
    let detail = get(&client, IncidentRef::Id(all[0].id)).await;
    assert!(detail
        .alerts
        .iter()
        .all(|a| a.status == AlertStatus::Resolved));
    tocsin.stop().await.unwrap();
}

/// A webhook of alerts for many open incidents, one each (an ungrouped
/// storm): each changes a different incident, and the alert changes are
/// stored together in messages of several entries instead of one synced
/// message each. Every incident shows its new alert and severity, its
/// timeline lists the change (read from the message of several), each
/// change's copy of its incident is one revision newer than its opening,
/// and a restarted service reads them all back.
#[tokio::test]
async fn an_ungrouped_storms_alert_changes_share_messages() {
    const GROUPS: usize = 40;
    let nats = NatsServer::start().await;
    let mut config = TocsinHarness::config(&nats);
    config.incidents.group_by = vec!["alertname".into()];
    let tocsin = TocsinHarness::start_with(config.clone()).await;
    let client = nats.client().await;
    let js = async_nats::jetstream::new(client.clone());
    let webhook = |instance: &str, severity: &str| {
        let alerts: Vec<serde_json::Value> = (0..GROUPS)
            .map(|g| {
                serde_json::json!({
                    "status": "firing",
                    "labels": {"alertname": format!("Storm{g}"), "severity": severity,
                               "instance": instance},
                    "annotations": {},
                    "startsAt": "2026-01-05T10:00:00Z",
                    "endsAt": "0001-01-01T00:00:00Z",
                })
            })
            .collect();
        serde_json::json!({
            "receiver": "tocsin", "status": "firing", "alerts": alerts,
            "groupLabels": {}, "commonLabels": {}, "commonAnnotations": {},
            "externalURL": "http://alertmanager:9093", "version": "4",
            "groupKey": "{}:{}", "truncatedAlerts": 0
        })
        .to_string()
    };
    let post = |body: String| post_alertmanager(&tocsin, body);
    post(webhook("a:9100", "warning")).await;
    wait_for(&client, "every group opened", |all| all.len() == GROUPS).await;
    let openings = bus::count_without_markers(&js, STREAM_INCIDENTS).await;
    post(webhook("b:9100", "critical")).await;
    let all = wait_for(&client, "every incident with its second alert", |all| {
        all.len() == GROUPS
            && all
                .iter()
                .all(|i| i.alerts_firing == 2 && i.severity == Severity::Critical)
    })
    .await;
    let changes = bus::count_without_markers(&js, STREAM_INCIDENTS).await - openings;
    assert!(
        changes < GROUPS as u64 / 4,
        "{GROUPS} alert changes took {changes} INCIDENTS messages"
    );
    let entries = log(&js).await;
    let firing: Vec<_> = entries
        .iter()
        .filter_map(|(_, e)| match e {
            LogEntry::Incident(e) if matches!(e.kind, EventKind::AlertFiring { .. }) => Some(e),
            _ => None,
        })
        .collect();
    assert_eq!(firing.len(), GROUPS, "one alert change per incident");
    assert!(
        firing.iter().all(|e| e.incident.revision == 2),
        "each change one revision newer than its incident's opening"
    );
    let detail = get(&client, IncidentRef::Id(all[0].id)).await;
    let kinds: Vec<&str> = detail.timeline.iter().map(|e| e.kind.name()).collect();
    assert_eq!(kinds, ["opened", "alert_firing"], "the timeline");
    // What the service reads back when its store lost an incident: its
    // own subjects and the messages of several together.
    let replayed = tocsin_incidents::replay_incident(&js, all[0].id, u64::MAX)
        .await
        .unwrap()
        .expect("the incident is on the stream");
    assert_eq!(
        replayed.summary, detail.incident,
        "replayed from the stream"
    );
    assert_eq!(replayed.alerts.len(), 2, "both alerts replayed");
    tocsin.stop().await.unwrap();

    let tocsin = TocsinHarness::start_with(config).await;
    wait_for(&client, "the same incidents after a restart", |all| {
        all.len() == GROUPS && all.iter().all(|i| i.alerts_firing == 2 && i.revision == 2)
    })
    .await;
    tocsin.stop().await.unwrap();
}

/// `tocsin_incidents_busy_seconds` tells where the service's time goes, so
/// an operator can see whether it decides or waits on the bus: every stage
/// of a batch (deciding, JetStream storing the entries, the local store,
/// answering a command) is counted once an alert and a command went
/// through.
#[tokio::test]
async fn the_time_spent_on_each_stage_of_a_batch_is_on_metrics() {
    use tocsin_proto::command::{Action, CommandReply};
    let nats = NatsServer::start().await;
    let tocsin = TocsinHarness::start(&nats).await;
    let client = nats.client().await;
    let js = async_nats::jetstream::new(client.clone());
    let labels = [("alertname", "DiskFull"), ("service", "db")];
    publish_alert(
        &js,
        alert(&labels, &["alertname"], AlertStatus::Firing, t(0)),
        t(0),
    )
    .await;
    wait_for(&client, "incident #1", |all| all.len() == 1).await;
    let reply = tocsin_tests::incidents::command(
        &client,
        &js,
        "alice",
        Action::Ack {
            incident: IncidentRef::Number(1),
        },
        t(1),
    )
    .await;
    assert!(matches!(reply, CommandReply::Accepted { .. }), "{reply:?}");

    tocsin_tests::assert_busy_stages_counted(
        &tocsin.metrics().await,
        "tocsin_incidents_busy_seconds_total",
        &["decide", "stored", "save", "answer"],
        "one alert and one command",
    );
}

/// Tocsin's generic JSON lets a sender leave out `startsAt` (the alert then
/// starts when Tocsin receives it). The same firing alert posted again
/// later, as a sender's retry after a lost answer or a script re-posting
/// what still fires, is the same alert still firing: it keeps the time it
/// was first seen (as Alertmanager keeps the earliest start of an alert
/// that is still active) and writes nothing. Before, every such post wrote
/// an `alert_firing` entry (a synced write) and moved the alert's start,
/// so under load each retry of a timed-out request added work.
#[tokio::test]
async fn a_generic_alert_posted_again_without_a_start_time_keeps_its_start_and_adds_nothing() {
    let nats = NatsServer::start().await;
    let tocsin = TocsinHarness::start(&nats).await;
    let client = nats.client().await;
    let url = format!("{}/api/v1/alerts", tocsin.ingest_url);
    let post = |summary: &'static str| {
        let (url, token) = (url.clone(), tocsin.token.clone());
        async move {
            let body = serde_json::json!([{
                "labels": {"alertname": "DiskFull", "instance": "db-1:9100", "severity": "critical"},
                "annotations": {"summary": summary},
            }])
            .to_string();
            let a = http::post(&reqwest::Client::new(), &url, Some(&token), body).await;
            assert_eq!(a.status, 200, "{}", a.text);
            assert_eq!(a.json["stored"], 1, "{}", a.text);
        }
    };
    post("disk full").await;
    let all = wait_for(&client, "one incident", |all| all.len() == 1).await;
    let first = get(&client, IncidentRef::Id(all[0].id)).await;
    let started = first.alerts[0].starts_at;

    // The same alert again a minute later (a new receive time, so a new
    // message on the bus), then once more with a new summary: the last is
    // a change, decided after the repeat, so once it shows the repeat was
    // decided too.
    tocsin.clock.advance(SignedDuration::from_mins(1));
    post("disk full").await;
    tocsin.clock.advance(SignedDuration::from_mins(1));
    post("disk full on /var").await;
    let detail = tocsin_tests::eventually("the new summary", || async {
        let d = get(&client, IncidentRef::Id(all[0].id)).await;
        if d.alerts[0].annotations["summary"] == "disk full on /var" {
            Ok(d)
        } else {
            Err(d.alerts[0].annotations.clone())
        }
    })
    .await;
    let kinds: Vec<&str> = detail.timeline.iter().map(|e| e.kind.name()).collect();
    assert_eq!(
        kinds,
        ["opened", "alert_firing"],
        "the repeat wrote nothing, the new summary one entry"
    );
    assert_eq!(detail.alerts.len(), 1);
    assert_eq!(
        detail.alerts[0].starts_at, started,
        "the alert keeps the time it was first seen"
    );
}
