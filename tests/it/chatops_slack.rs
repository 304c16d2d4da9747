//! Slack through the real bus: the notifier posts the page with its
//! buttons, a signed `block_actions` press acknowledges the incident as
//! the mapped user, escalation pauses, the notifier updates the message
//! and PagerDuty; a second press gets "already acknowledged by". Requests
//! badly signed are refused with 401 and change nothing. `/tocsin`
//! commands answer in the request.

use std::time::Duration;

use serde_json::Value;
use tocsin_proto::{
    codec,
    command::IncidentRef,
    incident::{EventKind, IncidentStatus},
    notify::slack_actions,
    query::{PlanQuery, PlanReply, TrackStatus},
    subjects::query,
    AlertStatus,
};
use tocsin_tests::{
    chatops::{self, block_actions_body, post_slack, slash_body, SLACK_SECRET},
    fakes::FakeProviders,
    faults::NatsProxy,
    incidents::{alert, get, publish_alert, wait_for},
    NatsServer, TocsinHarness,
};

const WAIT: Duration = Duration::from_secs(20);

struct Setup {
    _nats: NatsServer,
    /// Between the services and NATS, when the test asked for it.
    proxy: Option<NatsProxy>,
    fakes: FakeProviders,
    tocsin: TocsinHarness,
    client: async_nats::Client,
    _data: tempfile::TempDir,
}

/// Every service with the fakes, chat-ops, and one critical incident
/// paged to alice (Slack id U01ALICE) and #incidents.
async fn setup() -> (Setup, tocsin_proto::incident::IncidentSummary) {
    setup_with(false).await
}

/// [`setup`], with the services talking to NATS through a [`NatsProxy`]
/// when `proxied`.
async fn setup_with(proxied: bool) -> (Setup, tocsin_proto::incident::IncidentSummary) {
    let nats = NatsServer::start().await;
    let fakes = FakeProviders::start().await;
    let data = tempfile::tempdir().unwrap();
    let mut config = chatops::harness_config(&nats, &fakes, data.path());
    let proxy = match proxied {
        true => Some(NatsProxy::start(nats.port()).await),
        false => None,
    };
    if let Some(proxy) = &proxy {
        config.nats.url.0 = proxy.url_for(&nats.address());
    }
    let tocsin = TocsinHarness::start_with(config).await;
    let client = nats.client().await;
    let js = async_nats::jetstream::new(client.clone());
    let t0 = tocsin.clock_now();
    publish_alert(
        &js,
        alert(
            &[
                ("alertname", "HighLatency"),
                ("service", "api"),
                ("severity", "critical"),
            ],
            &["alertname", "service"],
            AlertStatus::Firing,
            t0,
        ),
        t0,
    )
    .await;
    let inc = wait_for(&client, "the incident", |l| l.len() == 1).await[0].clone();
    assert!(
        fakes.wait_for(|f| f.slack_posts().len() == 2, WAIT).await,
        "Slack pages: {:?}",
        fakes.rejected()
    );
    (
        Setup {
            _nats: nats,
            proxy,
            fakes,
            tocsin,
            client,
            _data: data,
        },
        inc,
    )
}

fn now_unix(t: &TocsinHarness) -> i64 {
    t.clock_now().as_second()
}

/// The value of the button `action_id` on a posted page.
fn button_value(post: &tocsin_tests::fakes::SlackPost, action_id: &str) -> String {
    post.body["attachments"][0]["blocks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|b| b["type"] == "actions")
        .flat_map(|b| b["elements"].as_array().unwrap().clone())
        .find(|e| e["action_id"] == action_id)
        .and_then(|e| e["value"].as_str().map(str::to_string))
        .expect("the button is on the page")
}

async fn plan(client: &async_nats::Client, id: uuid::Uuid) -> PlanReply {
    let r = client
        .request(
            query::ESCALATION_PLAN,
            codec::encode(&PlanQuery { incident: id }).unwrap().into(),
        )
        .await
        .unwrap();
    codec::decode(&r.payload).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ack_button_acknowledges_as_the_slack_user_stops_escalation_and_updates_the_message() {
    let (s, inc) = setup().await;
    let post = s
        .fakes
        .slack_posts()
        .into_iter()
        .find(|p| p.channel == "C0INCIDENTS")
        .unwrap();
    let value = button_value(&post, slack_actions::ACK);
    assert_eq!(value, inc.id.to_string());
    let url = format!("{}/slack/actions", s.tocsin.chatops_url);

    // The press: answered at once, acknowledged as alice via Slack.
    let body = block_actions_body(
        "U01ALICE",
        slack_actions::ACK,
        &value,
        &s.fakes.slack_response_url(1),
    );
    let r = post_slack(&url, &body, now_unix(&s.tocsin)).await;
    assert_eq!(r.status(), 200);
    let acked = wait_for(&s.client, "the acknowledgement", |l| {
        l[0].status == IncidentStatus::Acknowledged
    })
    .await;
    let by = acked[0].acknowledged_by.clone().unwrap();
    assert_eq!((by.name.as_str(), by.via.as_str()), ("alice", "slack"));
    let d = get(&s.client, IncidentRef::Id(inc.id)).await;
    let entry = d
        .timeline
        .iter()
        .find(|e| e.kind == EventKind::Acknowledged)
        .unwrap();
    assert_eq!(entry.actor.as_ref().unwrap().name, "alice");
    assert_eq!(entry.actor.as_ref().unwrap().via, "slack");

    // Escalation stopped: its track is paused, no level is due.
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match plan(&s.client, inc.id).await {
            PlanReply::Plan { tracks, .. }
                if tracks.iter().all(|t| t.status == TrackStatus::Paused) =>
            {
                assert!(tracks.iter().all(|t| t.next_at.is_none()));
                break;
            }
            other => assert!(
                tokio::time::Instant::now() < deadline,
                "escalation not paused: {other:?}"
            ),
        }
        // Poll interval of a wait for something to happen (with a deadline), not a wait to prove that nothing did.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // The message is updated in place, PagerDuty acknowledged.
    assert!(
        s.fakes
            .wait_for(
                |f| {
                    f.slack_updates().iter().any(|u| u.ts == post.ts)
                        && f.pagerduty_events()
                            .iter()
                            .any(|e| e["event_action"] == "acknowledge")
                },
                WAIT
            )
            .await,
        "no chat.update or PagerDuty acknowledge: {:?}",
        s.fakes.rejected()
    );
    let update = s
        .fakes
        .slack_updates()
        .into_iter()
        .rfind(|u| u.ts == post.ts)
        .unwrap();
    assert!(
        update.body.to_string().contains(slack_actions::UNACK),
        "acknowledged message offers Unacknowledge: {}",
        update.body
    );
    assert!(
        update.body.to_string().contains("Acknowledged by alice"),
        "the message shows who acknowledged: {}",
        update.body
    );

    // A second press: the presser is told who acknowledged, as a mention.
    let body = block_actions_body(
        "U01ALICE",
        slack_actions::ACK,
        &value,
        &s.fakes.slack_response_url(2),
    );
    let r = post_slack(&url, &body, now_unix(&s.tocsin)).await;
    assert_eq!(r.status(), 200);
    assert!(
        s.fakes
            .wait_for(|f| !f.slack_responses().is_empty(), WAIT)
            .await,
        "no follow-up: {:?}",
        s.fakes.rejected()
    );
    let resp = &s.fakes.slack_responses()[0];
    assert_eq!(resp.path, "T000/2/R000002");
    assert_eq!(resp.response_type, "ephemeral");
    assert_eq!(resp.body["replace_original"], Value::Bool(false));
    assert!(
        resp.text.contains("already acknowledged by <@U01ALICE>"),
        "{}",
        resp.text
    );
    let metrics = s.tocsin.metrics().await;
    assert!(
        metrics.contains(
            "tocsin_chatops_commands_total{via=\"slack\",action=\"ack\",outcome=\"accepted\"} 1"
        ),
        "{metrics}"
    );
    assert!(metrics.contains(
        "tocsin_chatops_commands_total{via=\"slack\",action=\"ack\",outcome=\"rejected\"} 1"
    ));
}

/// The services behind a proxy that swallows every ack command they
/// publish, and alice's press of Acknowledge on the incident: the URL and
/// the body.
async fn acks_swallowed() -> (Setup, String, String) {
    let (s, inc) = setup_with(true).await;
    s.proxy.as_ref().unwrap().swallow(&["tocsin.cmd.ack"]);
    let body = block_actions_body(
        "U01ALICE",
        slack_actions::ACK,
        &inc.id.to_string(),
        &s.fakes.slack_response_url(1),
    );
    let url = format!("{}/slack/actions", s.tocsin.chatops_url);
    (s, url, body)
}

/// A press whose command is lost on its way to JetStream (the publish
/// written and never acknowledged: a connection that broke, or a stream
/// leader that died before storing it, as when a NATS node of a cluster is
/// killed) is stored by chat-ops sending it again under the same message
/// id, within `chatops.answer_timeout`; the operator does not have to press
/// again, and is not told it failed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_press_whose_command_is_lost_on_its_way_is_sent_again_not_left_to_the_operator() {
    let (s, url, body) = acks_swallowed().await;
    let proxy = s.proxy.as_ref().unwrap();
    let at = now_unix(&s.tocsin);
    let pressed = tokio::spawn(async move { post_slack(&url, &body, at).await });
    tocsin_tests::eventually_within(WAIT, || async {
        match proxy.swallowed() {
            0 => Err("the command not sent yet"),
            _ => Ok(()),
        }
    })
    .await
    .unwrap();
    // The way to NATS is whole again; the one press must do, answered 200
    // once its command is stored.
    proxy.swallow(&[]);
    assert_eq!(pressed.await.unwrap().status(), 200);
    let acked = wait_for(&s.client, "the acknowledgement", |l| {
        l[0].status == IncidentStatus::Acknowledged
    })
    .await;
    let by = acked[0].acknowledged_by.clone().unwrap();
    assert_eq!((by.name.as_str(), by.via.as_str()), ("alice", "slack"));
    assert_eq!(proxy.swallowed_subjects(), ["tocsin.cmd.ack"]);
    // Counted once chat-ops has the incidents service's answer.
    let accepted =
        "tocsin_chatops_commands_total{via=\"slack\",action=\"ack\",outcome=\"accepted\"} 1";
    tocsin_tests::eventually("the press counted as accepted", || async {
        match s.tocsin.metrics().await {
            m if m.contains(accepted) => Ok(()),
            m => Err(m),
        }
    })
    .await;
    assert!(
        s.fakes.slack_responses().is_empty(),
        "the presser was told something went wrong: {:?}",
        s.fakes
            .slack_responses()
            .iter()
            .map(|r| &r.text)
            .collect::<Vec<_>>()
    );
}

/// Slack's 200 to a press is its acknowledgement: chat-ops gives it only
/// once the press's command is stored on the bus, as ingest answers 2xx
/// only once an alert is. A press whose command cannot be stored within
/// Slack's 3 s gets 503 with the reason (Slack shows the presser that it
/// failed) instead of a 200 that a chat-ops crash right after would turn
/// into a lost press; chat-ops goes on sending it within
/// `chatops.answer_timeout`, so it is applied once the way to NATS is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_press_is_answered_200_only_once_its_command_is_stored() {
    let (s, url, body) = acks_swallowed().await;
    let proxy = s.proxy.as_ref().unwrap();
    let r = post_slack(&url, &body, now_unix(&s.tocsin)).await;
    assert_eq!(r.status(), 503);
    let reason: Value = r.json().await.unwrap();
    assert_eq!(reason["error"], "not_stored", "{reason}");
    assert!(
        reason["reason"].as_str().unwrap().contains("press again"),
        "{reason}"
    );
    assert!(!proxy.swallowed_subjects().is_empty());
    // Sent again until it is stored.
    proxy.swallow(&[]);
    let acked = wait_for(&s.client, "the acknowledgement", |l| {
        l[0].status == IncidentStatus::Acknowledged
    })
    .await;
    let by = acked[0].acknowledged_by.clone().unwrap();
    assert_eq!((by.name.as_str(), by.via.as_str()), ("alice", "slack"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsigned_badly_signed_or_stale_requests_get_401_and_issue_nothing() {
    let (s, inc) = setup().await;
    let url = format!("{}/slack/actions", s.tocsin.chatops_url);
    let id = inc.id.to_string();
    let body = block_actions_body(
        "U01ALICE",
        slack_actions::RESOLVE,
        &id,
        &s.fakes.slack_response_url(1),
    );
    let now = now_unix(&s.tocsin);
    let http = reqwest::Client::new();
    let send = |ts: Option<String>, sig: Option<String>, body: String| {
        let mut r = http
            .post(&url)
            .header("content-type", "application/x-www-form-urlencoded")
            .body(body);
        if let Some(ts) = ts {
            r = r.header("x-slack-request-timestamp", ts);
        }
        if let Some(sig) = sig {
            r = r.header("x-slack-signature", sig);
        }
        r.send()
    };
    let good_sig = chatops::slack_signature(SLACK_SECRET, now, &body);
    // One changed byte of the body.
    let mut changed = body.clone().into_bytes();
    let at = changed.len() / 2;
    changed[at] = if changed[at] == b'A' { b'B' } else { b'A' };
    let changed = String::from_utf8(changed).unwrap();
    let stale = now - 301;
    let cases: Vec<(&str, Option<String>, Option<String>, String)> = vec![
        (
            "changed byte",
            Some(now.to_string()),
            Some(good_sig.clone()),
            changed,
        ),
        (
            "stale",
            Some(stale.to_string()),
            Some(chatops::slack_signature(SLACK_SECRET, stale, &body)),
            body.clone(),
        ),
        ("no signature", Some(now.to_string()), None, body.clone()),
        ("no timestamp", None, Some(good_sig.clone()), body.clone()),
        (
            "wrong secret",
            Some(now.to_string()),
            Some(chatops::slack_signature("another-secret", now, &body)),
            body.clone(),
        ),
    ];
    for (what, ts, sig, b) in cases {
        let r = send(ts, sig, b).await.unwrap();
        assert_eq!(r.status(), 401, "{what}");
        let j: Value = r.json().await.unwrap();
        assert_eq!(j["error"], "bad_signature", "{what}");
    }
    // The same for the slash command endpoint.
    let slash = slash_body("U01ALICE", &format!("resolve {}", inc.number), "x");
    let r = send(Some(now.to_string()), Some("v0=00".into()), slash)
        .await
        .unwrap();
    assert_eq!(r.status(), 401);

    // A correctly signed note goes through; by then nothing else did.
    let note = slash_body("U01ALICE", &format!("note {} checked", inc.number), "");
    let r = post_slack(
        &format!("{}/slack/commands", s.tocsin.chatops_url),
        &note,
        now,
    )
    .await;
    assert_eq!(r.status(), 200);
    let j: Value = r.json().await.unwrap();
    assert_eq!(j["response_type"], "ephemeral");
    let d = get(&s.client, IncidentRef::Id(inc.id)).await;
    assert!(d.timeline.iter().any(|e| e.kind
        == EventKind::NoteAdded {
            text: "checked".into()
        }));
    assert_eq!(d.incident.status, IncidentStatus::Triggered, "not resolved");
    assert!(!d
        .timeline
        .iter()
        .any(|e| matches!(e.kind, EventKind::Resolved { .. })));
    let metrics = s.tocsin.metrics().await;
    for (reason, n) in [("mismatch", 3), ("stale", 1), ("missing", 2)] {
        let line = format!(
            "tocsin_chatops_signatures_refused_total{{source=\"slack\",reason=\"{reason}\"}} {n}"
        );
        assert!(metrics.contains(&line), "{line}\n{metrics}");
    }
    assert!(!metrics.contains("action=\"resolve\""), "{metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slash_commands_act_answer_and_refuse_strangers() {
    let (s, inc) = setup().await;
    let url = format!("{}/slack/commands", s.tocsin.chatops_url);
    let now = now_unix(&s.tocsin);
    let ask = |user: &'static str, text: String| {
        let url = url.clone();
        async move {
            let r = post_slack(
                &url,
                &slash_body(user, &text, "https://hooks.slack.com/x"),
                now,
            )
            .await;
            assert_eq!(r.status(), 200, "{text}");
            let j: Value = r.json().await.unwrap();
            assert_eq!(j["response_type"], "ephemeral");
            j["text"].as_str().unwrap().to_string()
        }
    };
    let n = inc.number;
    assert!(ask("U01ALICE", "help".into()).await.contains("/tocsin"));
    let junk = ask("U01ALICE", "dance".into()).await;
    assert!(junk.contains("unknown command `dance`"), "{junk}");
    assert!(ask("U01ALICE", "ack".into())
        .await
        .contains("needs an incident number"));
    // A stranger is refused (the default for unknown users).
    let refused = ask("U0STRANGER", format!("ack {n}")).await;
    assert!(refused.contains("not a Tocsin user"), "{refused}");

    let list = ask("U01ALICE", "list".into()).await;
    assert!(list.contains(&format!("#{n} triggered critical")), "{list}");
    let acked = ask("U01ALICE", format!("ack {n}")).await;
    assert!(acked.to_lowercase().contains("acknowledged"), "{acked}");
    let again = ask("U01ALICE", format!("ack #{n}")).await;
    assert!(again.contains("already acknowledged"), "{again}");
    let shown = ask("U01ALICE", format!("show {n}")).await;
    assert!(shown.contains("acknowledged by alice via slack"), "{shown}");
    let snoozed = ask("U01ALICE", format!("snooze {n} 30m")).await;
    assert!(snoozed.to_lowercase().contains("snooze"), "{snoozed}");
    let oncall = ask("U01ALICE", "oncall".into()).await;
    assert!(oncall.contains("No schedules"), "{oncall}");
    let silence = ask("U01ALICE", "silence service=db for 2h maintenance".into()).await;
    assert!(silence.starts_with("Silence "), "{silence}");
    let resolved = ask("U01ALICE", format!("resolve {n} rolled back")).await;
    assert!(resolved.to_lowercase().contains("resolved"), "{resolved}");
    let d = get(&s.client, IncidentRef::Id(inc.id)).await;
    assert_eq!(d.incident.status, IncidentStatus::Resolved);
    assert!(d.timeline.iter().any(|e| e.kind
        == EventKind::NoteAdded {
            text: "rolled back".into()
        }));
    let missing = ask("U01ALICE", "show 999".into()).await;
    assert!(missing.contains("999"), "{missing}");
}
