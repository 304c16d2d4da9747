//! Commands on the COMMANDS stream, answered after their effect is stored.

use jiff::{SignedDuration, Timestamp};
use tocsin_proto::{
    command::{Action, CommandReply, IncidentRef},
    incident::{EventKind, IncidentStatus, LogEntry},
    silence::{MatchOp, Matcher, Silence},
    AlertStatus,
};
use tocsin_tests::{
    eventually,
    incidents::{
        alert, command, get, log, publish_alert, publish_alerts_pipelined, send_command,
        send_command_with_msg_id, wait_for,
    },
    NatsServer, TocsinHarness,
};

fn t(min: i64) -> Timestamp {
    "2026-02-01T08:00:00Z".parse::<Timestamp>().unwrap() + SignedDuration::from_mins(min)
}

fn accepted(r: &CommandReply) -> bool {
    matches!(r, CommandReply::Accepted { .. })
}

fn reason(r: &CommandReply) -> String {
    match r {
        CommandReply::Rejected { reason, .. } => reason.clone(),
        CommandReply::Accepted { message, .. } => panic!("accepted: {message}"),
    }
}

#[tokio::test]
async fn ack_resolve_rejections_and_concurrent_acks() {
    let nats = NatsServer::start().await;
    let _tocsin = TocsinHarness::start(&nats).await;
    let client = nats.client().await;
    let js = async_nats::jetstream::new(client.clone());
    let one = [("alertname", "DiskFull"), ("host", "db1")];
    let two = [("alertname", "DiskFull"), ("host", "db2")];
    publish_alert(
        &js,
        alert(&one, &["alertname", "host"], AlertStatus::Firing, t(0)),
        t(0),
    )
    .await;
    publish_alert(
        &js,
        alert(&two, &["alertname", "host"], AlertStatus::Firing, t(0)),
        t(1),
    )
    .await;
    wait_for(&client, "two incidents", |all| all.len() == 2).await;
    let n1 = IncidentRef::Number(1);

    // Ack then resolve.
    let r = command(
        &client,
        &js,
        "alice",
        Action::Ack {
            incident: n1.clone(),
        },
        t(2),
    )
    .await;
    let CommandReply::Accepted { incident, .. } = &r else {
        panic!("{r:?}")
    };
    let inc = incident.as_ref().unwrap();
    assert_eq!(inc.status, IncidentStatus::Acknowledged);
    assert_eq!(inc.acknowledged_by.as_ref().unwrap().name, "alice");
    assert_eq!(inc.acknowledged_at, Some(t(2)));
    let r = command(
        &client,
        &js,
        "alice",
        Action::Resolve {
            incident: n1.clone(),
        },
        t(5),
    )
    .await;
    assert!(accepted(&r), "{r:?}");

    // Acknowledging a resolved incident is refused, with the reason.
    let r = command(
        &client,
        &js,
        "bob",
        Action::Ack {
            incident: n1.clone(),
        },
        t(6),
    )
    .await;
    assert_eq!(reason(&r), "incident #1 is already resolved");
    let r = command(
        &client,
        &js,
        "bob",
        Action::Ack {
            incident: IncidentRef::Number(99),
        },
        t(6),
    )
    .await;
    assert_eq!(reason(&r), "no incident #99");

    // Two actors acknowledge #2 at the same time: one wins, the other is
    // told who acknowledged first.
    let n2 = IncidentRef::Number(2);
    let (a, b) = tokio::join!(
        command(
            &client,
            &js,
            "carol",
            Action::Ack {
                incident: n2.clone()
            },
            t(7)
        ),
        command(
            &client,
            &js,
            "dave",
            Action::Ack {
                incident: n2.clone()
            },
            t(7)
        ),
    );
    let (winner, loser) = if accepted(&a) {
        ("carol", &b)
    } else {
        ("dave", &a)
    };
    assert!(
        accepted(&a) ^ accepted(&b),
        "exactly one accepted: {a:?} {b:?}"
    );
    let why = reason(loser);
    assert!(
        why.starts_with(&format!(
            "incident #2 was already acknowledged by {winner} (test)"
        )),
        "{why}"
    );
    let acks = log(&js)
        .await
        .into_iter()
        .filter(|(_, e)| matches!(e, LogEntry::Incident(ev) if ev.kind == EventKind::Acknowledged && ev.incident.number == 2))
        .count();
    assert_eq!(acks, 1, "one acknowledgement event");

    // A retried command (same id) is applied once: within the duplicate
    // window JetStream drops it; later the service knows the id.
    let cmd = tocsin_proto::command::Command::new(
        tocsin_proto::incident::Actor::new("erin", "cli"),
        Action::Note {
            incident: n2.clone(),
            text: "looking at the disk".into(),
        },
    );
    let first = send_command(&client, &js, cmd.clone(), t(8)).await;
    assert!(accepted(&first));
    assert_eq!(
        send_command_with_msg_id(&client, &js, cmd.clone(), t(8), Some(&cmd.id)).await,
        None,
        "dropped as a duplicate"
    );
    let again = send_command_with_msg_id(&client, &js, cmd.clone(), t(8), None)
        .await
        .unwrap();
    let CommandReply::Accepted { message, .. } = &again else {
        panic!("{again:?}")
    };
    assert!(message.contains("already applied"), "{message}");
    let notes = get(&client, n2.clone())
        .await
        .timeline
        .iter()
        .filter(|e| matches!(e.kind, EventKind::NoteAdded { .. }))
        .count();
    assert_eq!(notes, 1);

    // Other commands: unack, assign, escalate, snooze out of range, reopen.
    assert!(accepted(
        &command(
            &client,
            &js,
            winner,
            Action::Unack {
                incident: n2.clone()
            },
            t(9)
        )
        .await
    ));
    assert!(accepted(
        &command(
            &client,
            &js,
            "lead",
            Action::Assign {
                incident: n2.clone(),
                user: "frank".into()
            },
            t(9)
        )
        .await
    ));
    assert!(accepted(
        &command(
            &client,
            &js,
            "lead",
            Action::Escalate {
                incident: n2.clone(),
                reason: "no progress".into()
            },
            t(10)
        )
        .await
    ));
    let r = command(
        &client,
        &js,
        "lead",
        Action::Snooze {
            incident: n2.clone(),
            seconds: 0,
        },
        t(10),
    )
    .await;
    assert!(reason(&r).contains("out of range"));
    let r = command(
        &client,
        &js,
        "lead",
        Action::Reopen {
            incident: n2.clone(),
        },
        t(10),
    )
    .await;
    assert!(reason(&r).contains("not resolved"));
    assert!(accepted(
        &command(
            &client,
            &js,
            "lead",
            Action::Reopen {
                incident: n1.clone()
            },
            t(11)
        )
        .await
    ));
    let d = get(&client, n2).await;
    assert_eq!(d.incident.assignee.as_deref(), Some("frank"));
    assert_eq!(d.incident.status, IncidentStatus::Triggered);
}

#[tokio::test]
async fn silenced_alerts_are_recorded_and_page_nobody() {
    let nats = NatsServer::start().await;
    let _tocsin = TocsinHarness::start(&nats).await;
    let client = nats.client().await;
    let js = async_nats::jetstream::new(client.clone());
    let silence = Silence {
        id: "maint-db".into(),
        matchers: vec![
            Matcher {
                name: "service".into(),
                op: MatchOp::Eq,
                value: "db".into(),
            },
            Matcher {
                name: "instance".into(),
                op: MatchOp::Re,
                value: "db-[12]".into(),
            },
        ],
        starts_at: t(0),
        ends_at: t(60),
        created_by: "alice".into(),
        comment: "disk swap".into(),
        recurrence: None,
    };
    let r = command(
        &client,
        &js,
        "alice",
        Action::CreateSilence { silence },
        t(0),
    )
    .await;
    assert!(accepted(&r), "{r:?}");
    let db = |inst: &'static str| [("alertname", "Down"), ("service", "db"), ("instance", inst)];
    publish_alert(
        &js,
        alert(
            &db("db-1"),
            &["alertname", "instance"],
            AlertStatus::Firing,
            t(1),
        ),
        t(1),
    )
    .await;
    publish_alert(
        &js,
        alert(
            &db("db-12"),
            &["alertname", "instance"],
            AlertStatus::Firing,
            t(1),
        ),
        t(2),
    )
    .await;
    // After the silence ends, the same kind of alert pages.
    publish_alert(
        &js,
        alert(
            &db("db-2"),
            &["alertname", "instance"],
            AlertStatus::Firing,
            t(61),
        ),
        t(61),
    )
    .await;
    let all = wait_for(&client, "three incidents", |all| all.len() == 3).await;
    let by_inst = |i: &str| {
        all.iter()
            .find(|x| x.labels.get("instance").map(String::as_str) == Some(i))
            .unwrap()
    };
    assert_eq!(
        by_inst("db-1").suppressed.as_deref(),
        Some("silenced by maint-db")
    );
    assert_eq!(
        by_inst("db-12").suppressed,
        None,
        "regex is anchored: db-12 is not db-[12]"
    );
    assert_eq!(by_inst("db-2").suppressed, None, "silence over");
    let d = get(&client, IncidentRef::Number(by_inst("db-1").number)).await;
    assert_eq!(
        d.alerts[0].suppressed.as_deref(),
        Some("silenced by maint-db")
    );

    let r = command(
        &client,
        &js,
        "alice",
        Action::ExpireSilence {
            id: "maint-db".into(),
        },
        t(62),
    )
    .await;
    assert!(accepted(&r));
    let r = command(
        &client,
        &js,
        "alice",
        Action::ExpireSilence {
            id: "maint-db".into(),
        },
        t(62),
    )
    .await;
    assert_eq!(reason(&r), "no silence maint-db");
}

/// An operator's acknowledgement does not queue behind an alert storm: the
/// incidents service takes commands in turn with alerts, so an ack sent
/// while thousands of alerts wait is applied long before the last of them
/// (it used to read alerts first as long as any were waiting).
#[tokio::test]
async fn an_ack_sent_during_an_alert_storm_is_not_kept_waiting_behind_it() {
    const STORM: usize = 3_000;
    let nats = NatsServer::start().await;
    let _tocsin = TocsinHarness::start(&nats).await;
    let client = nats.client().await;
    let js = async_nats::jetstream::new(client.clone());
    let first = [("alertname", "DiskFull"), ("host", "db1")];
    publish_alert(
        &js,
        alert(&first, &["alertname", "host"], AlertStatus::Firing, t(0)),
        t(0),
    )
    .await;
    wait_for(&client, "the first incident", |all| all.len() == 1).await;

    // The storm: each alert a new group, all stored before the ack.
    let storm = one_group_each("Storm", STORM, t(1));
    publish_alerts_pipelined(&js, storm).await;
    let r = command(
        &client,
        &js,
        "alice",
        Action::Ack {
            incident: IncidentRef::Number(1),
        },
        t(2),
    )
    .await;
    assert!(accepted(&r), "{r:?}");

    // Where the acknowledgement landed among the storm's incidents.
    let entries = eventually("every storm alert has its incident", || async {
        let entries = log(&js).await;
        let opened = entries
            .iter()
            .filter(|(_, e)| matches!(e, LogEntry::Incident(i) if matches!(i.kind, EventKind::Opened { .. })))
            .count();
        if opened == STORM + 1 {
            Ok(entries)
        } else {
            Err(opened)
        }
    })
    .await;
    let ack_at = entries
        .iter()
        .position(|(_, e)| matches!(e, LogEntry::Incident(i) if i.kind == EventKind::Acknowledged))
        .expect("the acknowledgement is stored");
    let opened_after = entries[ack_at..]
        .iter()
        .filter(|(_, e)| matches!(e, LogEntry::Incident(i) if matches!(i.kind, EventKind::Opened { .. })))
        .count();
    assert!(
        opened_after > STORM / 2,
        "the acknowledgement waited for the storm: only {opened_after} of its {STORM} incidents \
         opened after it"
    );
}

/// Receipts sent together (escalation sends a burst's `paged` records in
/// one message): each is applied once; a command that does not belong on
/// the message's subject is dead-lettered alone (its own message, its own
/// subject, its place `<seq>.<index>`) while the others are applied; and
/// the same receipts sent again in another message (a step fired again
/// after a crash, in another chunk) are found applied.
#[tokio::test]
async fn receipts_sent_together_are_each_applied_once_and_a_misfit_goes_alone() {
    use tocsin_proto::{
        command::Command,
        incident::Actor,
        subjects::{headers, STREAM_DEADLETTER},
    };
    use tocsin_tests::bus;
    let nats = NatsServer::start().await;
    let _tocsin = TocsinHarness::start(&nats).await;
    let client = nats.client().await;
    let js = async_nats::jetstream::new(client.clone());
    three_incidents(&js, &client).await;
    let escalation = Actor::new("escalation", "tocsin");
    let paged = |n: u64, level: u32| paged_receipt(n, level);
    let send = |id: &'static str, body: Vec<Command>| send_receipts(&js, id, body);
    let settled_with = |want: usize| receipts_settled(&js, want);

    // Three receipts in one message.
    send("receipts-1", (1..=3).map(|n| paged(n, 0)).collect()).await;
    settled_with(3).await;

    // Three more with a misfit among them.
    let misfit = Command::new(
        escalation.clone(),
        Action::Resolve {
            incident: IncidentRef::Number(1),
        },
    );
    let together = vec![paged(1, 1), misfit.clone(), paged(2, 1), paged(3, 1)];
    let seq = send("receipts-2", together.clone()).await;
    settled_with(6).await;
    let dead = bus::read_stream::<Command>(&js, STREAM_DEADLETTER).await;
    assert_eq!(dead.len(), 1, "only the misfit");
    assert_eq!(dead[0].envelope.body, misfit);
    let header = |name: &str| {
        dead[0]
            .headers
            .get(name)
            .map(|v| v.as_str().to_string())
            .unwrap_or_default()
    };
    assert_eq!(header(headers::DLQ_SUBJECT), "tocsin.cmd.resolve");
    assert_eq!(header(headers::MSG_ID), format!("dlq:COMMANDS:{seq}.1"));
    assert!(header(headers::DLQ_REASON).contains("tocsin.cmd.paged.batch"));
    let all = wait_for(&client, "three incidents", |l| l.len() == 3).await;
    assert!(all.iter().all(|i| i.status == IncidentStatus::Triggered));

    // The same receipts again, in another message: nothing new.
    let again: Vec<_> = together.into_iter().filter(|c| c.id != misfit.id).collect();
    send("receipts-3", again).await;
    settled_with(6).await;
}

/// The receipts of one COMMANDS message are stored as one INCIDENTS
/// message (`tocsin.incidents.batch`, so JetStream syncs once for all of
/// them), not one each on the incident's subjects; each incident's
/// timeline still shows its own, in the log's order, and so does a store
/// rebuilt from the stream (a fresh data directory).
#[tokio::test]
async fn receipts_of_one_message_are_stored_together_and_on_each_timeline() {
    use tocsin_proto::subjects::{headers, INCIDENTS_BATCH, STREAM_INCIDENTS};
    use tocsin_tests::bus;
    let nats = NatsServer::start().await;
    let tocsin = TocsinHarness::start(&nats).await;
    let client = nats.client().await;
    let js = async_nats::jetstream::new(client.clone());
    three_incidents(&js, &client).await;
    send_receipts(
        &js,
        "receipts-1",
        (1..=3).map(|n| paged_receipt(n, 0)).collect(),
    )
    .await;
    receipts_settled(&js, 3).await;

    // One message holds the three, and no receipt has a message of its own.
    let raw = bus::stored_raw(&js, STREAM_INCIDENTS).await;
    let subjects: Vec<&str> = raw.iter().map(|(_, m)| m.subject.as_str()).collect();
    let batches: Vec<_> = raw
        .iter()
        .filter(|(_, m)| m.subject.as_str() == INCIDENTS_BATCH)
        .collect();
    assert_eq!(batches.len(), 1, "one message of receipts: {subjects:?}");
    assert_eq!(
        batches[0]
            .1
            .headers
            .get(headers::ITEMS)
            .map(|v| v.as_str().to_string()),
        Some("3".to_string())
    );
    assert!(
        !subjects.iter().any(|s| s.ends_with(".paged")),
        "{subjects:?}"
    );

    // Each timeline shows its own receipt, after its opening.
    let timelines = |client: async_nats::Client| async move {
        let mut out = Vec::new();
        for n in 1..=3 {
            let d = get(&client, IncidentRef::Number(n)).await;
            let kinds: Vec<String> = d
                .timeline
                .iter()
                .map(|e| match &e.kind {
                    EventKind::Paged { pages, .. } => format!("paged {}", pages.join(",")),
                    k => k.name().to_string(),
                })
                .collect();
            out.push(kinds);
        }
        out
    };
    let want: Vec<Vec<String>> = (1..=3)
        .map(|n| vec!["opened".to_string(), format!("paged user{n} via sms")])
        .collect();
    assert_eq!(timelines(client.clone()).await, want);

    // A fresh data directory: the store, its index of receipts included,
    // is rebuilt from the stream.
    tocsin.stop().await.unwrap();
    let _again = TocsinHarness::start(&nats).await;
    wait_for(&client, "three incidents", |l| l.len() == 3).await;
    assert_eq!(timelines(client.clone()).await, want);
}

/// Silences are bounded in number (`incidents.max_silences`, as
/// Alertmanager's `--silences.max-silences`): one more is refused with the
/// reason, a silence replaced under its id or one made after another
/// expired is not; and a silence list too large for one answer (long
/// comments) lists what fits and counts the rest. Every alert is checked
/// against every silence, so their number is what an alert costs.
#[tokio::test]
async fn silences_beyond_the_limit_are_refused_and_their_list_fits_one_answer() {
    use tocsin_proto::{codec, query::QueryReply, subjects::query};
    use tocsin_tests::incidents::ask;

    let nats = NatsServer::start().await;
    let mut config = TocsinHarness::config(&nats);
    config.incidents = serde_yaml_ng::from_str("max_silences: 4").unwrap();
    let _tocsin = TocsinHarness::start_with(config).await;
    let client = nats.client().await;
    let js = async_nats::jetstream::new(client.clone());
    let silence = |id: &str, comment: &str| Silence {
        id: id.into(),
        matchers: vec![Matcher {
            name: "service".into(),
            op: MatchOp::Eq,
            value: id.into(),
        }],
        starts_at: t(0),
        ends_at: t(600),
        created_by: "alice".into(),
        comment: comment.into(),
        recurrence: None,
    };
    let long = "c".repeat(300_000);
    let create = |s: Silence| {
        let (client, js) = (client.clone(), js.clone());
        async move {
            command(
                &client,
                &js,
                "alice",
                Action::CreateSilence { silence: s },
                t(0),
            )
            .await
        }
    };
    for id in ["s0", "s1", "s2", "s3"] {
        let r = create(silence(id, &long)).await;
        assert!(accepted(&r), "{id}: {r:?}");
    }
    let r = create(silence("s4", "one more")).await;
    let why = reason(&r);
    assert!(
        why.contains("4 silences") && why.contains("max_silences"),
        "{why}"
    );
    // Replaced under its id (another long comment): not one more.
    let r = create(silence("s0", &"d".repeat(300_000))).await;
    assert!(accepted(&r), "{r:?}");

    let max = client.server_info().max_payload;
    let answer: QueryReply = ask(&client, query::LIST_SILENCES, &serde_json::Map::new()).await;
    let size = codec::encode(&answer).unwrap().len();
    let QueryReply::Silences { silences, omitted } = answer else {
        panic!("unexpected answer {answer:?}");
    };
    assert_eq!(silences.len() + omitted as usize, 4, "listed and left out");
    assert!(
        omitted > 0,
        "four comments of about 256 KB do not fit in 1 MiB"
    );
    assert!(size <= max, "{size} bytes answered, at most {max}");

    let r = command(
        &client,
        &js,
        "alice",
        Action::ExpireSilence { id: "s1".into() },
        t(1),
    )
    .await;
    assert!(accepted(&r), "{r:?}");
    let r = create(silence("s4", "room again")).await;
    assert!(accepted(&r), "{r:?}");
}

/// Incidents #1, #2 and #3, opened by alerts A, B and C.
async fn three_incidents(js: &async_nats::jetstream::Context, client: &async_nats::Client) {
    for name in ["A", "B", "C"] {
        publish_alert(
            js,
            alert(
                &[("alertname", name)],
                &["alertname"],
                AlertStatus::Firing,
                t(0),
            ),
            t(0),
        )
        .await;
    }
    wait_for(client, "three incidents", |l| l.len() == 3).await;
}

/// Escalation's `paged` receipt for level `level` of incident #`n`.
fn paged_receipt(n: u64, level: u32) -> tocsin_proto::command::Command {
    tocsin_proto::command::Command::new(
        tocsin_proto::incident::Actor::new("escalation", "tocsin"),
        Action::Paged {
            incident: IncidentRef::Number(n),
            level,
            repeat: 0,
            pages: vec![format!("user{n} via sms")],
            reason: format!("level {}", level + 1),
            fired: None,
        },
    )
}

/// Publishes `body` as one COMMANDS message of receipts with message id
/// `id`, as escalation sends a burst's; its stream sequence.
async fn send_receipts(
    js: &async_nats::jetstream::Context,
    id: &str,
    body: Vec<tocsin_proto::command::Command>,
) -> u64 {
    use tocsin_proto::{codec, command::batch_subject, subjects::headers, Envelope};
    let mut h = async_nats::HeaderMap::new();
    h.insert(headers::MSG_ID, id);
    let env = Envelope::new("escalation", t(1), body);
    js.publish_with_headers(
        batch_subject("paged"),
        h,
        codec::encode(&env).unwrap().into(),
    )
    .await
    .unwrap()
    .await
    .unwrap()
    .sequence
}

/// Waits until `want` `paged` entries are on INCIDENTS and COMMANDS is empty.
async fn receipts_settled(js: &async_nats::jetstream::Context, want: usize) {
    use tocsin_proto::subjects::STREAM_COMMANDS;
    eventually("the receipts applied and their message taken", || async {
        let paged = log(js)
            .await
            .into_iter()
            .filter(|(_, e)| {
                matches!(e, LogEntry::Incident(ev) if matches!(ev.kind, EventKind::Paged { .. }))
            })
            .count();
        match (paged, tocsin_tests::bus::count(js, STREAM_COMMANDS).await) {
            (n, 0) if n == want => Ok(()),
            other => Err(other),
        }
    })
    .await
}

/// A write to INCIDENTS that fails (here refused: something else was
/// stored there first, as after a NATS leader change or a lost
/// acknowledgement) makes the service roll back and read the streams
/// again. The commands it had already pulled from COMMANDS but not yet
/// decided must come again at once, not after `command_ack_wait` (set to
/// 10 minutes here, so the test would hang): an operator's
/// acknowledgement sent during a NATS hiccup is applied within moments.
#[tokio::test]
async fn commands_pulled_before_a_failed_write_are_applied_at_once_not_after_ack_wait() {
    const INCIDENTS: usize = 150;
    let nats = NatsServer::start().await;
    let mut config = TocsinHarness::config(&nats);
    config.incidents.command_ack_wait = tocsin_runtime::config::HumanDuration::secs(600);
    let tocsin = TocsinHarness::start_with(config).await;
    let client = nats.client().await;
    let js = async_nats::jetstream::new(client.clone());
    let burst = one_group_each("Down", INCIDENTS, t(0));
    publish_alerts_pipelined(&js, burst).await;
    let open = wait_for(&client, "every incident", |all| all.len() == INCIDENTS).await;
    tocsin.settled(&js).await;

    // A message the service did not write: its next write expects the
    // stream's last sequence to be its own last entry, and is refused.
    js.publish("tocsin.incidents.inc.0.opened", "not an entry".into())
        .await
        .unwrap()
        .await
        .unwrap();
    // Every incident acknowledged at once, without waiting for answers.
    let acks = open
        .iter()
        .map(|i| {
            tocsin_proto::command::Command::new(
                tocsin_proto::incident::Actor::new("alice", "test"),
                Action::Ack {
                    incident: IncidentRef::Id(i.id),
                },
            )
        })
        .collect();
    tocsin_tests::incidents::publish_commands(&js, acks, t(1)).await;
    eventually("every incident acknowledged", || async {
        let q = tocsin_proto::query::ListIncidents {
            limit: Some(1000),
            ..Default::default()
        };
        let all = tocsin_tests::incidents::list(&client, q).await;
        let not: Vec<u64> = all
            .iter()
            .filter(|i| i.status != IncidentStatus::Acknowledged)
            .map(|i| i.number)
            .collect();
        if all.len() == INCIDENTS && not.is_empty() {
            Ok(())
        } else {
            Err(format!(
                "{} incidents listed, not acknowledged: {not:?}",
                all.len()
            ))
        }
    })
    .await;
    let m = tocsin.metrics().await;
    assert!(
        tocsin_tests::metric_value(&m, "tocsin_incidents_write_failures_total")
            .is_some_and(|n| n >= 1.0),
        "the foreign message made a write fail"
    );
}

/// `n` firing alerts named `alertname`, each of its own group (host
/// `web00000` on), at `at`: what a fleet going down sends.
fn one_group_each(
    alertname: &str,
    n: usize,
    at: Timestamp,
) -> Vec<(tocsin_proto::Alert, Timestamp)> {
    (0..n)
        .map(|i| {
            let host = format!("web{i:05}");
            let a = alert(
                &[("alertname", alertname), ("host", host.as_str())],
                &["alertname", "host"],
                AlertStatus::Firing,
                at,
            );
            (a, at)
        })
        .collect()
}
