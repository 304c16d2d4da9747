//! Resolved incidents leave memory once the reopen window has passed, and
//! the least recently changed open ones beyond `incidents.max_in_memory`;
//! they come back from the store whenever an input or a query touches them:
//! the service's memory stays bounded, not its whole history or a storm's
//! every incident, and no decision changes because of it.

use std::time::Duration;

use futures::StreamExt;
use jiff::SignedDuration;
use tocsin_proto::{
    codec,
    command::{Action, Command, CommandReply, IncidentRef},
    incident::{Actor, IncidentStatus},
    query::ListIncidents,
    subjects::headers,
    AlertStatus, Envelope,
};
use tocsin_tests::{
    incidents::{alert, command, get, list, log, publish_alert, wait_for},
    NatsServer, TocsinHarness,
};

/// The value of an unlabelled metric line `name` in `/metrics`.
fn metric(text: &str, name: &str) -> f64 {
    tocsin_tests::metric_value(text, name).unwrap_or_else(|| panic!("{name} not in /metrics"))
}

/// The test kit's config with the incidents section `yaml` and a data
/// dir in `data`, so a restart finds the store.
fn with_incidents(
    nats: &NatsServer,
    data: &tempfile::TempDir,
    yaml: &str,
) -> tocsin::config::Config {
    let mut config = TocsinHarness::config(nats);
    config.incidents = serde_yaml_ng::from_str(&format!(
        "data_dir: {}\n{yaml}",
        data.path().join("incidents").display()
    ))
    .unwrap();
    config
}

#[tokio::test]
async fn an_evicted_incident_still_answers_repeats_commands_and_queries() {
    let nats = NatsServer::start().await;
    let tocsin = TocsinHarness::start(&nats).await; // reopen_window: 1h (default)
    let client = nats.client().await;
    let js = async_nats::jetstream::new(client.clone());
    let t0 = tocsin.clock_now();
    let at = |min: i64| t0 + SignedDuration::from_mins(min);
    let group = ["alertname", "service"];
    let api = [("alertname", "HighLatency"), ("service", "api")];
    let db = [("alertname", "DiskFull"), ("service", "db")];

    // #1 opens, and a human resolves it while its alert still fires.
    publish_alert(&js, alert(&api, &group, AlertStatus::Firing, at(0)), at(0)).await;
    wait_for(&client, "incident #1", |all| all.len() == 1).await;
    let m = tocsin.metrics().await;
    assert_eq!(metric(&m, "tocsin_incidents_open"), 1.0, "{m}");
    assert_eq!(
        metric(&m, "tocsin_incidents_in_memory"),
        1.0,
        "a new incident is in memory as soon as it opens"
    );
    let reply = command(
        &client,
        &js,
        "alice",
        Action::Resolve {
            incident: IncidentRef::Number(1),
        },
        at(1),
    )
    .await;
    assert!(matches!(reply, CommandReply::Accepted { .. }), "{reply:?}");

    // Two hours on, another incident's input saves the projection: #1,
    // resolved for longer than the reopen window, leaves memory.
    tocsin.settle(&js, at(120)).await;
    publish_alert(
        &js,
        alert(&db, &group, AlertStatus::Firing, at(120)),
        at(120),
    )
    .await;
    wait_for(&client, "incident #2", |all| all.len() == 2).await;
    let m = tocsin.metrics().await;
    assert_eq!(metric(&m, "tocsin_incidents_evicted_total"), 1.0, "{m}");
    assert_eq!(
        metric(&m, "tocsin_incidents_in_memory"),
        1.0,
        "only #2 stays"
    );

    // Queries read it from the store.
    let detail = get(&client, IncidentRef::Number(1)).await;
    assert_eq!(detail.incident.status, IncidentStatus::Resolved);
    assert_eq!(detail.alerts.len(), 1);
    assert_eq!(detail.timeline.len(), 2, "opened, resolved");
    let resolved = list(
        &client,
        ListIncidents {
            status: vec![IncidentStatus::Resolved],
            ..Default::default()
        },
    )
    .await;
    assert_eq!(
        resolved.iter().map(|i| i.number).collect::<Vec<_>>(),
        [1],
        "the resolved list includes the one out of memory"
    );
    let all = list(&client, ListIncidents::default()).await;
    assert_eq!(all.iter().map(|i| i.number).collect::<Vec<_>>(), [2, 1]);

    // Alertmanager repeats #1's alert (same start): it was firing when #1
    // was resolved, so it is not a new problem. Deciding that needs #1's
    // alerts, which only the store has now.
    let before = log(&js).await.len();
    publish_alert(
        &js,
        alert(&api, &group, AlertStatus::Firing, at(0)),
        at(121),
    )
    .await;
    // A note on #1 (a command by number) applies to the incident out of memory.
    let reply = command(
        &client,
        &js,
        "bob",
        Action::Note {
            incident: IncidentRef::Number(1),
            text: "post-mortem filed".into(),
        },
        at(122),
    )
    .await;
    assert!(matches!(reply, CommandReply::Accepted { .. }), "{reply:?}");
    tocsin.settled(&js).await;
    let entries = log(&js).await;
    assert_eq!(
        entries.len(),
        before + 1,
        "the note only: the repeat opened nothing ({:?})",
        &entries[before..]
    );
    let all = list(&client, ListIncidents::default()).await;
    assert_eq!(all.len(), 2, "no third incident");
    let m = tocsin.metrics().await;
    // The repeat and the note each need #1 back from the store: read once
    // each, or once for both when they land in the same batch; every time,
    // #1 leaves memory again once the batch is saved.
    let restored = metric(&m, "tocsin_incidents_restored_total");
    assert!(restored >= 1.0, "{m}");
    assert_eq!(
        metric(&m, "tocsin_incidents_evicted_total"),
        restored + 1.0,
        "each read back is evicted again: {m}"
    );
    assert_eq!(
        metric(&m, "tocsin_incidents_in_memory"),
        1.0,
        "#1 left memory again once saved"
    );

    // A new alert for #1's group after the window opens a new incident.
    publish_alert(
        &js,
        alert(&api, &group, AlertStatus::Firing, at(130)),
        at(130),
    )
    .await;
    let all = wait_for(&client, "incident #3", |all| all.len() == 3).await;
    let third = all.iter().find(|i| i.number == 3).unwrap();
    assert_eq!(
        third.dedup_key,
        all.iter().find(|i| i.number == 1).unwrap().dedup_key
    );
    tocsin.stop().await.unwrap();
}

/// A storm that opens more incidents than `max_in_memory` keeps only that
/// many in memory; the others still take their alerts, commands and
/// queries, still inhibit (their firing sources stay indexed), and a
/// restart on the same store loads no more than the limit either.
#[tokio::test]
async fn open_incidents_beyond_the_limit_leave_memory_and_still_answer() {
    let nats = NatsServer::start().await;
    let data = tempfile::tempdir().unwrap();
    let config = with_incidents(
        &nats,
        &data,
        "max_in_memory: 2\ninhibit_rules:\n  - name: node-down\n    source_matchers: ['alertname=\"NodeDown\"']\n    target_matchers: ['severity=\"warning\"']\n    equal: [instance]\n",
    );
    let tocsin = TocsinHarness::start_with(config.clone()).await;
    let client = nats.client().await;
    let js = async_nats::jetstream::new(client.clone());
    let t0 = tocsin.clock_now();
    let at = |min: i64| t0 + SignedDuration::from_mins(min);
    let group = ["alertname", "instance"];
    let node_down = [
        ("alertname", "NodeDown"),
        ("instance", "n1"),
        ("severity", "critical"),
    ];
    let others: Vec<[(&str, &str); 3]> = ["a", "b", "c"]
        .iter()
        .map(|i| {
            [
                ("alertname", "HighLatency"),
                ("instance", *i),
                ("severity", "critical"),
            ]
        })
        .collect();

    // #1 (the inhibiting source), then #2-#4: four open, two in memory.
    publish_alert(
        &js,
        alert(&node_down, &group, AlertStatus::Firing, at(0)),
        at(0),
    )
    .await;
    for (k, labels) in others.iter().enumerate() {
        let t = at(1 + k as i64);
        publish_alert(&js, alert(labels, &group, AlertStatus::Firing, t), t).await;
    }
    wait_for(&client, "four incidents", |all| all.len() == 4).await;
    tocsin.settled(&js).await;
    let m = tocsin.metrics().await;
    assert_eq!(metric(&m, "tocsin_incidents_open"), 4.0, "{m}");
    assert_eq!(
        metric(&m, "tocsin_incidents_in_memory"),
        2.0,
        "only max_in_memory stay: {m}"
    );

    // #1 left memory first; its firing NodeDown still inhibits a new
    // warning of its instance.
    let warning = [
        ("alertname", "DiskSlow"),
        ("instance", "n1"),
        ("severity", "warning"),
    ];
    publish_alert(
        &js,
        alert(&warning, &group, AlertStatus::Firing, at(5)),
        at(5),
    )
    .await;
    let all = wait_for(&client, "incident #5", |all| all.len() == 5).await;
    let five = all.iter().find(|i| i.number == 5).unwrap();
    let reason = five.suppressed.as_deref().expect("#5 is inhibited");
    assert!(
        reason.starts_with("inhibited by rule \"node-down\""),
        "{reason}"
    );

    // #2's alert resolves: #2 (out of memory) resolves, nothing new opens.
    publish_alert(
        &js,
        alert(&others[0], &group, AlertStatus::Resolved, at(1)),
        at(6),
    )
    .await;
    // #3 (out of memory) is acknowledged by number.
    let reply = command(
        &client,
        &js,
        "alice",
        Action::Ack {
            incident: IncidentRef::Number(3),
        },
        at(7),
    )
    .await;
    assert!(matches!(reply, CommandReply::Accepted { .. }), "{reply:?}");
    tocsin.settled(&js).await;
    let two = get(&client, IncidentRef::Number(2)).await;
    assert_eq!(two.incident.status, IncidentStatus::Resolved);
    let open = list(
        &client,
        ListIncidents {
            status: vec![IncidentStatus::Triggered, IncidentStatus::Acknowledged],
            ..Default::default()
        },
    )
    .await;
    assert_eq!(
        open.iter()
            .map(|i| (i.number, i.status))
            .collect::<Vec<_>>(),
        [
            (5, IncidentStatus::Triggered),
            (4, IncidentStatus::Triggered),
            (3, IncidentStatus::Acknowledged),
            (1, IncidentStatus::Triggered),
        ],
        "the open list holds those out of memory too"
    );
    let m = tocsin.metrics().await;
    assert_eq!(metric(&m, "tocsin_incidents_open"), 4.0, "{m}");
    assert!(metric(&m, "tocsin_incidents_in_memory") <= 2.0, "{m}");

    // Restarted on the same store: still at most two in memory, and #1
    // (read from the store, not into memory) still inhibits.
    tocsin.stop().await.unwrap();
    let tocsin = TocsinHarness::start_with(config).await;
    let m = tocsin.metrics().await;
    assert_eq!(metric(&m, "tocsin_incidents_open"), 4.0, "{m}");
    assert!(metric(&m, "tocsin_incidents_in_memory") <= 2.0, "{m}");
    let warning2 = [
        ("alertname", "MemoryLow"),
        ("instance", "n1"),
        ("severity", "warning"),
    ];
    let t = tocsin.clock_now();
    publish_alert(&js, alert(&warning2, &group, AlertStatus::Firing, t), t).await;
    let all = wait_for(&client, "incident #6", |all| all.len() == 6).await;
    let six = all.iter().find(|i| i.number == 6).unwrap();
    assert!(
        six.suppressed
            .as_deref()
            .is_some_and(|r| r.starts_with("inhibited by rule \"node-down\"")),
        "{six:?}"
    );
    tocsin.stop().await.unwrap();
}

/// Commands that come together (here: waiting while the service was down)
/// for more incidents than `max_in_memory`, most of them out of memory:
/// they are applied together, and each reply carries its incident as the
/// command left it, although the save after them sends some of those
/// incidents out of memory again before the replies go.
#[tokio::test]
async fn commands_on_incidents_out_of_memory_are_answered_with_their_incident() {
    let nats = NatsServer::start().await;
    let data = tempfile::tempdir().unwrap();
    let config = with_incidents(&nats, &data, "max_in_memory: 2\n");
    let tocsin = TocsinHarness::start_with(config.clone()).await;
    let client = nats.client().await;
    let js = async_nats::jetstream::new(client.clone());
    let t0 = tocsin.clock_now();
    let group = ["alertname", "instance"];
    let instances = ["a", "b", "c", "d", "e", "f"];
    for (k, instance) in instances.iter().enumerate() {
        let t = t0 + SignedDuration::from_mins(k as i64);
        let labels = [("alertname", "HighLatency"), ("instance", *instance)];
        publish_alert(&js, alert(&labels, &group, AlertStatus::Firing, t), t).await;
    }
    wait_for(&client, "six incidents", |all| all.len() == 6).await;
    tocsin.settled(&js).await;
    tocsin.stop().await.unwrap();

    // While it is down, one acknowledgement for each incident waits.
    let inbox = client.new_inbox();
    let mut replies = client.subscribe(inbox.clone()).await.unwrap();
    for n in 1..=6u64 {
        let cmd = Command::new(
            Actor::new("alice", "test"),
            Action::Ack {
                incident: IncidentRef::Number(n),
            },
        );
        let mut h = async_nats::HeaderMap::new();
        h.insert(headers::REPLY_TO, inbox.as_str());
        h.insert(headers::MSG_ID, cmd.id.as_str());
        let env = Envelope::new("test", t0, cmd.clone());
        js.publish_with_headers(cmd.subject(), h, codec::encode(&env).unwrap().into())
            .await
            .unwrap()
            .await
            .unwrap();
    }

    let tocsin = TocsinHarness::start_with(config).await;
    let mut answered = Vec::new();
    while answered.len() < 6 {
        let msg = tokio::time::timeout(Duration::from_secs(20), replies.next())
            .await
            .expect("every acknowledgement answered within 20s")
            .expect("reply");
        match codec::decode(&msg.payload).unwrap() {
            CommandReply::Accepted {
                incident: Some(summary),
                ..
            } => answered.push((summary.number, summary.status)),
            other => panic!("an acknowledgement answered without its incident: {other:?}"),
        }
    }
    answered.sort_unstable_by_key(|(n, _)| *n);
    assert_eq!(
        answered,
        (1..=6u64)
            .map(|n| (n, IncidentStatus::Acknowledged))
            .collect::<Vec<_>>()
    );
    tocsin.settled(&js).await;
    let m = tocsin.metrics().await;
    assert!(metric(&m, "tocsin_incidents_restored_total") >= 4.0, "{m}");
    assert!(metric(&m, "tocsin_incidents_in_memory") <= 2.0, "{m}");
    tocsin.stop().await.unwrap();
}

/// A list reads at most `incidents.list_max_reads` incidents out of memory
/// from the store, then answers with what it found and where it stopped
/// (`next_before`): a filter that matches few of many stored incidents
/// costs a bounded amount of work per query, and following the cursor
/// still finds every match. Without the bound one query read every stored
/// incident.
#[tokio::test]
async fn a_list_reads_a_bounded_number_of_stored_incidents_and_says_where_it_stopped() {
    use tocsin_proto::{
        query::QueryReply,
        silence::{MatchOp, Matcher},
        subjects::query,
    };
    use tocsin_tests::incidents::ask;

    let nats = NatsServer::start().await;
    let data = tempfile::tempdir().unwrap();
    let config = with_incidents(&nats, &data, "max_in_memory: 1\nlist_max_reads: 2\n");
    let tocsin = TocsinHarness::start_with(config).await;
    let client = nats.client().await;
    let js = async_nats::jetstream::new(client.clone());
    let t0 = tocsin.clock_now();
    let group = ["alertname", "team"];
    // #1 is the database team's; #2 to #6 the web team's. Only #6 stays in
    // memory.
    for k in 0..6i64 {
        let name = format!("Alert{k}");
        let team = if k == 0 { "db" } else { "web" };
        let labels = [("alertname", name.as_str()), ("team", team)];
        let t = t0 + SignedDuration::from_mins(k);
        publish_alert(&js, alert(&labels, &group, AlertStatus::Firing, t), t).await;
    }
    tocsin.settled(&js).await;
    let m = tocsin.metrics().await;
    assert_eq!(metric(&m, "tocsin_incidents_open"), 6.0, "{m}");
    assert_eq!(metric(&m, "tocsin_incidents_in_memory"), 1.0, "{m}");

    // The reply as the bus carries it: the numbers, and where it stopped.
    #[derive(serde::Deserialize)]
    struct Page {
        incidents: Vec<Numbered>,
        #[serde(default)]
        next_before: Option<u64>,
    }
    #[derive(serde::Deserialize)]
    struct Numbered {
        number: u64,
    }
    let page = |q: ListIncidents| {
        let client = client.clone();
        async move {
            let p: Page = ask(&client, query::LIST_INCIDENTS, &q).await;
            let numbers: Vec<u64> = p.incidents.iter().map(|i| i.number).collect();
            (numbers, p.next_before)
        }
    };
    let db = |before: Option<u64>| ListIncidents {
        matchers: vec![Matcher {
            name: "team".into(),
            op: MatchOp::Eq,
            value: "db".into(),
        }],
        before,
        ..Default::default()
    };
    // #6 is looked at in memory, #5 and #4 read from the store: then the
    // answer stops, having found nothing yet.
    assert_eq!(page(db(None)).await, (vec![], Some(4)));
    assert_eq!(page(db(Some(4))).await, (vec![], Some(2)));
    assert_eq!(
        page(db(Some(2))).await,
        (vec![1], None),
        "found, and nothing older"
    );
    // Unfiltered: as many as two reads allow, then the cursor.
    let all = |before: Option<u64>| ListIncidents {
        before,
        ..Default::default()
    };
    assert_eq!(page(all(None)).await, (vec![6, 5, 4], Some(4)));
    assert_eq!(page(all(Some(4))).await, (vec![3, 2], Some(2)));
    assert_eq!(page(all(Some(2))).await, (vec![1], None));
    // A page filled before the budget runs out needs no cursor: the caller
    // goes on below its last number, as always.
    let two = ListIncidents {
        limit: Some(2),
        ..Default::default()
    };
    assert_eq!(page(two).await, (vec![6, 5], None));
    // The test kit's `list` follows the cursor: every incident.
    let every = list(&client, ListIncidents::default()).await;
    assert_eq!(
        every.iter().map(|i| i.number).collect::<Vec<_>>(),
        [6, 5, 4, 3, 2, 1]
    );
    // A reply the service's callers understand.
    let r: QueryReply = ask(&client, query::LIST_INCIDENTS, &all(None)).await;
    assert!(matches!(r, QueryReply::Incidents { .. }), "{r:?}");
    tocsin.stop().await.unwrap();
}

/// An incident of 1,000 alerts with long annotations (a fleet in one
/// group), 1.6 MB of alerts, is shown within the bus's message size: the
/// answer lists what fits, the firing alerts first, and of the timeline
/// what was done (here its opening) before the newest alert changes, and
/// says how many it left out.
/// Without the bound the answer was larger than NATS carries (1 MiB by
/// default) and never came: `tocsin show` timed out, and a page for the
/// incident waited for the query's timeout and went out without alerts.
#[tokio::test]
async fn an_incident_too_large_for_one_answer_is_shown_in_part_and_says_what_it_left_out() {
    use tocsin_proto::{
        query::{GetIncident, QueryReply},
        subjects::query,
    };
    use tocsin_tests::incidents::{ask, try_publish_alerts};

    let nats = NatsServer::start().await;
    let data = tempfile::tempdir().unwrap();
    let config = with_incidents(&nats, &data, "");
    let tocsin = TocsinHarness::start_with(config).await;
    let client = nats.client().await;
    let js = async_nats::jetstream::new(client.clone());
    let t0 = tocsin.clock_now();
    let group = ["alertname"];
    const ALERTS: usize = 1_000;
    const PER_MESSAGE: usize = 100;
    let summary = "x".repeat(1_500);
    for m in 0..ALERTS / PER_MESSAGE {
        let at = t0 + SignedDuration::from_secs(m as i64);
        let alerts = (0..PER_MESSAGE)
            .map(|i| {
                let instance = format!("host-{}:9100", m * PER_MESSAGE + i);
                let mut a = alert(
                    &[("alertname", "FleetDown"), ("instance", &instance)],
                    &group,
                    AlertStatus::Firing,
                    at,
                );
                a.annotations.insert("summary".into(), summary.clone());
                a
            })
            .collect();
        try_publish_alerts(&js, alerts, at).await.expect("stored");
    }
    // The first 100 resolve: the firing ones are listed first.
    let at = t0 + SignedDuration::from_mins(60);
    let resolved = (0..100)
        .map(|i| {
            let instance = format!("host-{i}:9100");
            alert(
                &[("alertname", "FleetDown"), ("instance", &instance)],
                &group,
                AlertStatus::Resolved,
                at,
            )
        })
        .collect();
    try_publish_alerts(&js, resolved, at).await.expect("stored");
    // Then one alert flaps, an entry each time: the timeline outgrows
    // what a read of it holds (twice an answer's room of alert changes),
    // so the oldest changes are let go as it is read, and counted.
    const FLAPS: usize = 1_501;
    let flaps = (0..FLAPS)
        .map(|i| {
            let at = t0 + SignedDuration::from_mins(61) + SignedDuration::from_secs(i as i64);
            let status = if i % 2 == 0 {
                AlertStatus::Resolved
            } else {
                AlertStatus::Firing
            };
            let mut a = alert(
                &[("alertname", "FleetDown"), ("instance", "host-999:9100")],
                &group,
                status,
                at,
            );
            a.annotations.insert("summary".into(), summary.clone());
            (a, at)
        })
        .collect();
    tocsin_tests::incidents::publish_alerts_pipelined(&js, flaps).await;
    tocsin.settled(&js).await;

    let max = client.server_info().max_payload;
    for timeline in [false, true] {
        let q = GetIncident {
            incident: IncidentRef::Number(1),
            timeline,
        };
        let d = match ask::<_, QueryReply>(&client, query::GET_INCIDENT, &q).await {
            QueryReply::Incident(d) => d,
            other => panic!("unexpected answer {other:?}"),
        };
        assert_eq!(d.incident.alerts_total as usize, ALERTS);
        assert_eq!(d.incident.alerts_firing as usize, ALERTS - 101);
        let shown = d.alerts.len();
        assert!(
            shown > 0 && shown < ALERTS,
            "{shown} alerts shown (timeline {timeline})"
        );
        assert_eq!(
            shown + d.alerts_omitted as usize,
            ALERTS,
            "shown and left out add up (timeline {timeline})"
        );
        assert!(
            d.alerts.iter().all(|a| a.status == AlertStatus::Firing),
            "the firing alerts come first"
        );
        if timeline {
            // The opening, 9 joins of 100, one of 100 resolving, the flaps.
            let entries = d.timeline.len() + d.timeline_omitted as usize;
            assert_eq!(
                entries,
                ALERTS / PER_MESSAGE + 1 + FLAPS,
                "timeline entries"
            );
            assert!(d.timeline_omitted > 0, "some of the timeline is left out");
            assert!(
                matches!(
                    d.timeline.first().map(|e| &e.kind),
                    Some(tocsin_proto::incident::EventKind::Opened { .. })
                ),
                "the opening is kept before alert changes"
            );
            assert!(
                matches!(
                    d.timeline.last().map(|e| &e.kind),
                    Some(tocsin_proto::incident::EventKind::AlertResolved { .. })
                ),
                "the newest entries are kept"
            );
        } else {
            assert_eq!(d.timeline_omitted, 0);
        }
        let size = codec::encode(&QueryReply::Incident(d)).unwrap().len();
        assert!(size <= max, "{size} bytes answered, at most {max}");
    }
}

/// A list whose incidents would not fit in one answer (20 incidents whose
/// alerts carry 56 KB of labels each, all of them shared) stops at what
/// fits and says where it stopped, so a lister that follows the cursor
/// (`tocsin list`, chat-ops, the API) gets them all. Without the bound the
/// answer was larger than NATS carries and never came.
#[tokio::test]
async fn a_list_too_large_for_one_answer_stops_at_what_fits_and_says_where() {
    use tocsin_proto::{query::QueryReply, subjects::query};
    use tocsin_tests::incidents::ask;

    let nats = NatsServer::start().await;
    let data = tempfile::tempdir().unwrap();
    let config = with_incidents(&nats, &data, "");
    let tocsin = TocsinHarness::start_with(config).await;
    let client = nats.client().await;
    let js = async_nats::jetstream::new(client.clone());
    let t0 = tocsin.clock_now();
    let value = "v".repeat(4_000);
    const INCIDENTS: usize = 20;
    for k in 0..INCIDENTS {
        let name = format!("Wide{k}");
        let names: Vec<String> = (0..14).map(|l| format!("label_{l}")).collect();
        let mut pairs: Vec<(&str, &str)> = vec![("alertname", name.as_str())];
        pairs.extend(names.iter().map(|n| (n.as_str(), value.as_str())));
        let t = t0 + SignedDuration::from_secs(k as i64);
        publish_alert(
            &js,
            alert(&pairs, &["alertname"], AlertStatus::Firing, t),
            t,
        )
        .await;
    }
    tocsin.settled(&js).await;

    let max = client.server_info().max_payload;
    let q = ListIncidents {
        limit: Some(100),
        ..Default::default()
    };
    let (first, next_before) = match ask::<_, QueryReply>(&client, query::LIST_INCIDENTS, &q).await
    {
        QueryReply::Incidents {
            incidents,
            next_before,
        } => (incidents, next_before),
        other => panic!("unexpected answer {other:?}"),
    };
    assert!(
        !first.is_empty() && first.len() < INCIDENTS,
        "{} incidents in the first answer",
        first.len()
    );
    let lowest = first.last().map(|i| i.number);
    assert_eq!(next_before, lowest, "it says where it stopped");
    let size = codec::encode(&QueryReply::Incidents {
        incidents: first,
        next_before,
    })
    .unwrap()
    .len();
    assert!(size <= max, "{size} bytes answered, at most {max}");
    // Following the cursor finds every one, newest first.
    let all = list(&client, q).await;
    let numbers: Vec<u64> = all.iter().map(|i| i.number).collect();
    let expected: Vec<u64> = (1..=INCIDENTS as u64).rev().collect();
    assert_eq!(numbers, expected);
}

/// Saves that each change a storm's worth of alerts, one after another
/// (what the service saves after each batch of inputs once it has fallen
/// behind: hundreds of ALERTS messages of 100 alerts each), let go of the
/// store's nodes they replace as they go. sled writes each change as a
/// new copy of its leaf and frees the old copy only once no thread is
/// pinned in an older epoch, and it ran a save's writes under one pin:
/// the old copies piled up faster than they were freed (here 40 MiB more
/// each round, 406 MiB after ten), and the service's peak in a storm
/// reached several GB.
#[test]
fn a_large_save_lets_the_store_nodes_it_replaces_go_as_it_goes() {
    use std::collections::{BTreeMap, VecDeque};
    use tocsin_incidents::{
        core::{IncidentState, Projection},
        store::Store,
    };
    use tocsin_proto::{
        incident::{AlertInfo, IncidentSummary},
        Fingerprint, Labels,
    };
    // Measures this process's peak memory: alone.
    if !tocsin_tests::in_own_process(&format!(
        "{}::a_large_save_lets_the_store_nodes_it_replaces_go_as_it_goes",
        module_path!()
    )) {
        return;
    }
    const INCIDENTS: u128 = 1_000;
    const ALERTS: usize = 40;
    const ROUNDS: usize = 10;
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let mut p = Projection::new();
    let at = jiff::Timestamp::UNIX_EPOCH;
    for i in 0..INCIDENTS {
        let id = uuid::Uuid::from_u128(i + 1);
        let mut alerts = BTreeMap::new();
        for a in 0..ALERTS {
            let labels: Labels = [
                ("alertname".to_string(), "DiskFull".to_string()),
                (
                    "instance".to_string(),
                    format!("host-{i}-{a}.example.com:9100"),
                ),
                ("job".to_string(), "node".to_string()),
                ("storm_group".to_string(), format!("g{i}")),
            ]
            .into_iter()
            .collect();
            let fingerprint = Fingerprint::from_labels(&labels);
            let annotations: Labels = [(
                "summary".to_string(),
                format!("disk of host-{i}-{a} is 97% full"),
            )]
            .into_iter()
            .collect();
            let alert = AlertInfo {
                fingerprint: fingerprint.clone(),
                status: AlertStatus::Firing,
                labels,
                annotations,
                starts_at: at,
                ends_at: None,
                generator_url: None,
                suppressed: None,
            };
            alerts.insert(fingerprint.clone(), Box::new(alert));
            p.dirty_alerts.insert((id, fingerprint));
        }
        p.insert_loaded(Box::new(IncidentState {
            summary: IncidentSummary::new(id, i as u64 + 1, format!("g{i}"), "DiskFull", at),
            alerts,
            commands: VecDeque::new(),
            batches: VecDeque::new(),
            tally: Default::default(),
        }));
        p.dirty.insert(id);
        // Stored as the storm stores them, a batch at a time.
        if (i + 1) % 100 == 0 {
            p.incidents_seq = i as u64 + 1;
            store.save(&mut p).unwrap();
            store.applied().unwrap();
        }
    }

    // Every alert of every incident resolves, fires again, and so on;
    // one save stores each round, each given once the one before is
    // applied.
    let before = tocsin_tests::rss_bytes();
    // Resets VmHWM to the RSS of now (Linux 4.0 and later).
    std::fs::write("/proc/self/clear_refs", "5").expect("reset the peak RSS");
    for round in 0..ROUNDS {
        let ends = at + jiff::SignedDuration::from_mins(5 + round as i64);
        for st in p.incidents.values_mut() {
            for (fp, a) in st.alerts.iter_mut() {
                if a.status == AlertStatus::Firing {
                    a.status = AlertStatus::Resolved;
                    a.ends_at = Some(ends);
                } else {
                    a.status = AlertStatus::Firing;
                    a.ends_at = None;
                }
                p.dirty_alerts.insert((st.summary.id, fp.clone()));
            }
        }
        p.incidents_seq += 1;
        store.save(&mut p).unwrap();
        store.applied().unwrap();
    }
    let grew = tocsin_tests::peak_rss_bytes().saturating_sub(before);
    let changed = INCIDENTS as usize * ALERTS;
    assert!(
        grew < 128 << 20,
        "{ROUNDS} saves of {changed} changed alerts each raised the peak RSS by {} MiB",
        grew >> 20
    );
}
