//! The `nats` and `notify` step types on a real nats-server: a request
//! with a JSON payload (alert values as JSON strings) gets its reply, which
//! `expect` checks and later steps read; a reply `expect` refuses, and a
//! subject nobody answers, fail the step with the reason; `notify` puts a
//! message for a Slack channel on NOTIFY, for the notifier.

use async_nats::jetstream;
use futures::StreamExt;
use tocsin_proto::{notify::PageTarget, AlertStatus};
use tocsin_tests::{
    escalation::pages,
    incidents::{alert, publish_alert},
    remediation::{config, has, steps, wait_timeline, Runbooks},
    NatsServer, TocsinHarness,
};

const FLUSH: &str = r##"
name: flush
match: {labels: ['alertname="Flush"']}
steps:
  - id: flush
    nats:
      subject: "remediation.cache.{{labels.service}}"
      payload: {action: flush, service: "{{labels.service}}", note: "{{labels.note}}"}
      expect: "{{eq result.json.ok true}}"
    timeout: 5s
  - id: tell
    notify: {slack: "#ops", message: "flushed {{steps.flush.json.flushed}}"}
  - id: refused
    nats: {subject: remediation.cache.bad, payload: "text {{labels.service}}", expect: "{{eq result.json.ok true}}"}
    timeout: 5s
    on_failure: continue
  - id: nobody
    nats: {subject: remediation.nobody.home}
    timeout: 2s
    on_failure: continue
"##;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_requests_get_their_reply_and_notify_posts_through_the_notifier() {
    let nats = NatsServer::start().await;
    let rb = Runbooks::new();
    rb.add("flush", FLUSH);
    let tocsin = TocsinHarness::start_with(config(&nats, &rb.path(), &[])).await;
    let client = nats.client().await;
    let js = jetstream::new(client.clone());
    // A service answering on remediation.cache.*: what it got, and ok
    // unless it is `bad`.
    let mut sub = client.subscribe("remediation.cache.*").await.unwrap();
    let responder = client.clone();
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::<(String, Vec<u8>)>::new()));
    let seen2 = seen.clone();
    tokio::spawn(async move {
        while let Some(m) = sub.next().await {
            seen2
                .lock()
                .unwrap()
                .push((m.subject.to_string(), m.payload.to_vec()));
            let bad = m.subject.as_str().ends_with(".bad");
            let body =
                serde_json::json!({"ok": !bad, "flushed": m.subject.as_str().rsplit('.').next()});
            if let Some(r) = m.reply {
                responder
                    .publish(r, serde_json::to_vec(&body).unwrap().into())
                    .await
                    .unwrap();
            }
        }
    });
    client.flush().await.unwrap();
    let t0 = tocsin.clock_now();
    publish_alert(
        &js,
        alert(
            &[
                ("alertname", "Flush"),
                ("service", "api"),
                ("note", "\"}; $(reboot)"),
            ],
            &["alertname"],
            AlertStatus::Firing,
            t0,
        ),
        t0,
    )
    .await;
    let tl = wait_timeline(&client, 1, "the run's end", |tl| {
        has(tl, "run", "succeeded") || has(tl, "run", "failed")
    })
    .await;
    let s = steps(&tl);
    let detail = |step: &str, status: &str| {
        s.iter()
            .find(|(_, st, stat, _)| st == step && stat == status)
            .map(|(_, _, _, d)| d.clone())
            .unwrap_or_else(|| panic!("no {step}/{status} in {s:#?}"))
    };
    assert!(has(&tl, "run", "succeeded"), "{s:#?}");
    let flush = detail("flush", "succeeded");
    assert!(
        flush.contains("reply on remediation.cache.api") && flush.contains(r#""flushed":"api""#),
        "{flush}"
    );
    assert!(
        detail("tell", "succeeded").contains("posted to slack #ops through the notifier"),
        "{s:#?}"
    );
    assert!(
        detail("refused", "failed")
            .contains("the reply on remediation.cache.bad is not what `expect` wants"),
        "{s:#?}"
    );
    assert!(
        detail("nobody", "failed").contains("nobody answers on remediation.nobody.home"),
        "{s:#?}"
    );
    // The payload carried the label as a JSON string, untouched.
    let got = seen.lock().unwrap().clone();
    let (subject, payload) = &got[0];
    assert_eq!(subject, "remediation.cache.api");
    let v: serde_json::Value = serde_json::from_slice(payload).unwrap();
    assert_eq!(
        v,
        serde_json::json!({"action": "flush", "service": "api", "note": "\"}; $(reboot)"})
    );
    assert_eq!(got[1].1, b"text api");
    // The message for #ops is on NOTIFY, for the incident.
    let p = pages(&js).await;
    let msg = p
        .iter()
        .find(|p| {
            p.target
                == PageTarget::SlackChannel {
                    channel: "#ops".into(),
                }
        })
        .unwrap_or_else(|| panic!("{p:#?}"));
    assert_eq!(msg.incident.number, 1);
    assert_eq!(msg.reason, "runbook flush: flushed api");
}

/// `on: [{escalated_to: 2}]` starts when the second level fires (not the
/// first), once; `on: [acknowledged]` when someone acknowledges.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_start_when_a_given_escalation_level_fires_and_on_acknowledge() {
    use jiff::SignedDuration;
    use tocsin_proto::{
        command::{Action, IncidentRef},
        incident::EventKind,
    };
    let nats = NatsServer::start().await;
    let rb = Runbooks::new();
    rb.add(
        "second",
        "name: second\nmatch: {labels: ['alertname=\"Slow\"']}\non: [{escalated_to: 2}]\nsteps:\n  - id: note\n    annotate: second level reached\n",
    );
    rb.add(
        "acked",
        "name: acked\nmatch: {labels: ['alertname=\"Slow\"']}\non: [acknowledged]\nsteps:\n  - id: note\n    annotate: thanks for acknowledging\n",
    );
    let tocsin = TocsinHarness::start_with(config(&nats, &rb.path(), &[])).await;
    let client = nats.client().await;
    let js = jetstream::new(client.clone());
    let t0 = tocsin.clock_now();
    publish_alert(
        &js,
        alert(
            &[("alertname", "Slow")],
            &["alertname"],
            AlertStatus::Firing,
            t0,
        ),
        t0,
    )
    .await;
    // Level 1 after the group wait, level 2 fifteen minutes later.
    tocsin.settle(&js, t0 + SignedDuration::from_mins(1)).await;
    tocsin.settle(&js, t0 + SignedDuration::from_mins(17)).await;
    let tl = wait_timeline(&client, 1, "the second level's run", |tl| {
        steps(tl)
            .iter()
            .any(|(r, s, st, _)| r == "second" && s == "run" && st == "succeeded")
    })
    .await;
    let position = |f: &dyn Fn(&EventKind) -> bool| tl.iter().position(|e| f(&e.kind));
    let level2 = position(&|k| matches!(k, EventKind::Paged { level: 1, .. })).unwrap();
    let started: Vec<usize> = tl
        .iter()
        .enumerate()
        .filter(|(_, e)| {
            matches!(&e.kind, EventKind::Remediation { runbook, step, status, .. }
                if runbook == "second" && step == "run" && status == "started")
        })
        .map(|(i, _)| i)
        .collect();
    assert_eq!(started.len(), 1, "{:#?}", steps(&tl));
    assert!(started[0] > level2, "{:#?}", steps(&tl));
    assert!(!steps(&tl).iter().any(|(r, ..)| r == "acked"));

    let reply = tocsin_tests::incidents::command(
        &client,
        &js,
        "alice",
        Action::Ack {
            incident: IncidentRef::Number(1),
        },
        t0 + SignedDuration::from_mins(18),
    )
    .await;
    assert!(
        matches!(reply, tocsin_proto::command::CommandReply::Accepted { .. }),
        "{reply:?}"
    );
    wait_timeline(&client, 1, "the acknowledge's run", |tl| {
        steps(tl)
            .iter()
            .any(|(r, s, st, _)| r == "acked" && s == "run" && st == "succeeded")
    })
    .await;
}
