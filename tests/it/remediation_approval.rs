//! `require_approval` on a real nats-server, every service in-process on a
//! manual clock: a matching run waits (its record on the bus, a timeline
//! entry saying how to decide, the page held with `page: on_failure`) and
//! survives a restart of every service; approve -> it runs; deny -> it does
//! not run and the incident escalates at once, the timeline saying who
//! denied; no decision before the timeout -> escalates. Decisions travel as
//! commands the incidents service records on the timeline, where the
//! remediation service reads them.

use async_nats::jetstream;
use jiff::{SignedDuration, Timestamp};
use tocsin::config::Config;
use tocsin_proto::{
    command::{Action, CommandReply, IncidentRef},
    incident::{EventKind, IncidentEvent, RunbookRequest},
    AlertStatus,
};
use tocsin_tests::{
    escalation::pages,
    incidents::{alert, command, publish_alert},
    remediation::{config, escalations, has, steps, wait_timeline, waiting_run, Runbooks},
    NatsServer, TocsinHarness,
};

/// A runbook `gated` that needs approval (15 minutes to decide), records
/// its argv, and resolves the incident when it worked.
fn gated(rb: &Runbooks, page: &str) -> Vec<String> {
    let rec = rb.recorder();
    rb.add(
        "gated",
        &format!(
            r#"
name: gated
match: {{labels: ['alertname="Gated"']}}
page: {page}
hold_at_most: 10m
guardrails:
  require_approval: {{timeout: 15m}}
steps:
  - id: restart
    exec: {{argv: ["{rec}", restart, "{{{{labels.service}}}}"], env: {{RECORD_TO: "{out}"}}}}
  - id: done
    resolve: true
"#,
            rec = rec.display(),
            out = rb.record_file().display()
        ),
    );
    vec![rec.display().to_string()]
}

fn decide(run: &str, approve: bool) -> Action {
    let request = if approve {
        RunbookRequest::Approve { run: run.into() }
    } else {
        RunbookRequest::Deny { run: run.into() }
    };
    Action::Runbook {
        incident: IncidentRef::Number(1),
        request,
    }
}

/// Publishes a firing `Gated` alert for `service`, grouped by `group`.
async fn publish_gated(js: &jetstream::Context, service: &str, group: &[&str], at: Timestamp) {
    publish_alert(
        js,
        alert(
            &[("alertname", "Gated"), ("service", service)],
            group,
            AlertStatus::Firing,
            at,
        ),
        at,
    )
    .await;
}

/// Waits until incident `n` has a run waiting for approval; its id.
async fn awaiting(client: &async_nats::Client, n: u64) -> String {
    let tl = wait_timeline(client, n, "the wait for approval", |tl| {
        waiting_run(tl).is_some()
    })
    .await;
    waiting_run(&tl).unwrap()
}

/// `cfg` with the incidents and escalation stores in `dir`, so a restart
/// of every service keeps them.
fn kept_across_restarts(mut cfg: Config, dir: &std::path::Path) -> Config {
    cfg.incidents.data_dir = Some(tocsin_runtime::config::ConfigPath(dir.join("incidents")));
    cfg.escalation.data_dir = Some(tocsin_runtime::config::ConfigPath(dir.join("escalation")));
    cfg
}

fn detail_of(tl: &[IncidentEvent], step: &str, status: &str) -> String {
    steps(tl)
        .into_iter()
        .find(|(_, s, st, _)| s == step && st == status)
        .map(|(_, _, _, d)| d)
        .unwrap_or_else(|| panic!("no {step}/{status} in {:#?}", steps(tl)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_run_holds_the_page_survives_a_restart_and_runs_when_approved() {
    let nats = NatsServer::start().await;
    let rb = Runbooks::new();
    let programs = gated(&rb, "on_failure");
    let programs: Vec<&str> = programs.iter().map(String::as_str).collect();
    let data = tempfile::tempdir().unwrap();
    let cfg = kept_across_restarts(config(&nats, &rb.path(), &programs), data.path());
    let tocsin = TocsinHarness::start_with(cfg.clone()).await;
    let client = nats.client().await;
    let js = jetstream::new(client.clone());
    let t0 = tocsin.clock_now();
    let mins = |m: i64| t0 + SignedDuration::from_mins(m);
    publish_gated(&js, "api", &["alertname"], t0).await;
    let tl = wait_timeline(&client, 1, "the wait for approval", |tl| {
        waiting_run(tl).is_some() && has(tl, "run", "held")
    })
    .await;
    let run = waiting_run(&tl).unwrap();
    let detail = detail_of(&tl, "run", "awaiting_approval");
    assert!(
        detail.contains(&format!("tocsin runbook deny {run}")),
        "{detail}"
    );
    // The record on the bus says it waits.
    let kv = js.get_key_value("tocsin_remediation_runs").await.unwrap();
    let record: serde_json::Value =
        serde_json::from_slice(&kv.get(format!("run.{run}")).await.unwrap().unwrap()).unwrap();
    assert_eq!(record["state"], "awaiting_approval", "{record}");

    // Every service restarts while the run waits.
    tocsin.stop().await.unwrap();
    let tocsin = TocsinHarness::start_with(cfg).await;
    // Past the group wait: the held incident is not paged (the engine has
    // settled there: what is due has happened).
    tocsin.settle(&js, mins(3)).await;
    let p = pages(&js).await;
    assert!(p.iter().all(|p| p.incident.number != 1), "{p:#?}");
    assert!(rb.recorded().is_empty(), "{:?}", rb.recorded());

    let reply = command(&client, &js, "alice", decide(&run, true), mins(3)).await;
    assert!(matches!(reply, CommandReply::Accepted { .. }), "{reply:?}");
    let tl = wait_timeline(&client, 1, "the approved run", |tl| {
        has(tl, "run", "succeeded")
    })
    .await;
    let approved = detail_of(&tl, "run", "approved");
    assert!(approved.contains("alice"), "{approved}");
    assert_eq!(rb.recorded(), ["restart", "api"]);
    // Who approved is on the timeline as the actor of the request, too.
    assert!(tl
        .iter()
        .any(|e| matches!(&e.kind, EventKind::Runbook { .. })
            && e.actor.as_ref().is_some_and(|a| a.name == "alice")));
    // The run resolved the incident: a request about it is refused now.
    let reply = command(&client, &js, "alice", decide(&run, true), mins(3)).await;
    assert!(matches!(reply, CommandReply::Rejected { .. }), "{reply:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deny_escalates_at_once_and_the_timeline_says_who_denied() {
    let nats = NatsServer::start().await;
    let rb = Runbooks::new();
    let programs = gated(&rb, "immediately");
    let programs: Vec<&str> = programs.iter().map(String::as_str).collect();
    let tocsin = TocsinHarness::start_with(config(&nats, &rb.path(), &programs)).await;
    let client = nats.client().await;
    let js = jetstream::new(client.clone());
    let t0 = tocsin.clock_now();
    publish_gated(&js, "api", &["alertname"], t0).await;
    let run = awaiting(&client, 1).await;
    let reply = command(&client, &js, "bob", decide(&run, false), t0).await;
    assert!(matches!(reply, CommandReply::Accepted { .. }), "{reply:?}");
    let tl = wait_timeline(&client, 1, "the escalation", |tl| {
        !escalations(tl).is_empty()
    })
    .await;
    let failed = detail_of(&tl, "run", "failed");
    assert!(
        failed.contains("runbook gated did not run: approval denied by bob"),
        "{failed}"
    );
    let reasons = escalations(&tl);
    assert!(
        reasons.iter().any(|r| r.contains("approval denied by bob")),
        "{reasons:?}"
    );
    // A late approval is refused by the remediation service, said on the
    // timeline; the run never ran.
    let reply = command(&client, &js, "alice", decide(&run, true), t0).await;
    assert!(matches!(reply, CommandReply::Accepted { .. }), "{reply:?}");
    let tl = wait_timeline(&client, 1, "the ignored approval", |tl| {
        has(tl, "run", "ignored")
    })
    .await;
    let ignored = detail_of(&tl, "run", "ignored");
    assert!(
        ignored.contains("approve by alice (test) ignored") && ignored.contains("is failed"),
        "{ignored}"
    );
    assert!(rb.recorded().is_empty(), "{:?}", rb.recorded());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_decision_before_the_timeout_escalates_even_across_a_restart() {
    let nats = NatsServer::start().await;
    let rb = Runbooks::new();
    let programs = gated(&rb, "immediately");
    let programs: Vec<&str> = programs.iter().map(String::as_str).collect();
    let data = tempfile::tempdir().unwrap();
    let cfg = kept_across_restarts(config(&nats, &rb.path(), &programs), data.path());
    let tocsin = TocsinHarness::start_with(cfg.clone()).await;
    let client = nats.client().await;
    let js = jetstream::new(client.clone());
    let t0 = tocsin.clock_now();
    publish_gated(&js, "api", &["alertname"], t0).await;
    awaiting(&client, 1).await;
    // Every service restarts while the run waits; the new remediation
    // service finds the waiting run on the bus.
    tocsin.stop().await.unwrap();
    let tocsin = TocsinHarness::start_with(cfg).await;
    tocsin.clock.set(t0 + SignedDuration::from_mins(16));
    let tl = wait_timeline(&client, 1, "the timeout's escalation", |tl| {
        has(tl, "run", "failed") && !escalations(tl).is_empty()
    })
    .await;
    let failed = detail_of(&tl, "run", "failed");
    assert!(
        failed.contains("runbook gated did not run: no approve or deny by"),
        "{failed}"
    );
    assert!(
        escalations(&tl)
            .iter()
            .any(|r| r.contains("no approve or deny by")),
        "{:?}",
        escalations(&tl)
    );
    assert!(rb.recorded().is_empty(), "{:?}", rb.recorded());
}

/// `/tocsin approve <run>` in Slack approves as the mapped user.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slack_slash_command_approves_as_the_slack_user() {
    use tocsin_tests::{
        chatops::{harness_config, post_slack, slash_body},
        fakes::FakeProviders,
        remediation::remediation_config,
    };
    let nats = NatsServer::start().await;
    let fakes = FakeProviders::start().await;
    let data = tempfile::tempdir().unwrap();
    let rb = Runbooks::new();
    let programs = gated(&rb, "immediately");
    let programs: Vec<&str> = programs.iter().map(String::as_str).collect();
    let mut cfg = harness_config(&nats, &fakes, data.path());
    cfg.remediation = Some(remediation_config(&rb.path(), &programs));
    let tocsin = TocsinHarness::start_with(cfg).await;
    let client = nats.client().await;
    let js = jetstream::new(client.clone());
    let t0 = tocsin.clock_now();
    publish_gated(&js, "api", &["alertname"], t0).await;
    let run = awaiting(&client, 1).await;
    let r = post_slack(
        &format!("{}/slack/commands", tocsin.chatops_url),
        &slash_body(
            "U01ALICE",
            &format!("approve {run}"),
            "https://hooks.slack.com/x",
        ),
        t0.as_second(),
    )
    .await;
    assert_eq!(r.status(), 200);
    let answer: serde_json::Value = r.json().await.unwrap();
    let text = answer["text"].as_str().unwrap_or_default();
    assert!(
        text.contains(&format!("of run {run} recorded on incident #1")),
        "{text}"
    );
    let tl = wait_timeline(&client, 1, "the approved run", |tl| {
        has(tl, "run", "succeeded")
    })
    .await;
    let approved = detail_of(&tl, "run", "approved");
    assert!(approved.contains("alice (slack)"), "{approved}");
    assert_eq!(rb.recorded(), ["restart", "api"]);
}

/// An incident resolved while its run waits: the run ends as skipped, and
/// leaves the waiting runs, so its deadline pages nobody.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resolving_the_incident_ends_a_waiting_run_as_skipped() {
    let nats = NatsServer::start().await;
    let rb = Runbooks::new();
    let programs = gated(&rb, "immediately");
    let programs: Vec<&str> = programs.iter().map(String::as_str).collect();
    let tocsin = TocsinHarness::start_with(config(&nats, &rb.path(), &programs)).await;
    let client = nats.client().await;
    let js = jetstream::new(client.clone());
    let t0 = tocsin.clock_now();
    publish_gated(&js, "api", &["alertname"], t0).await;
    let run = awaiting(&client, 1).await;
    let reply = command(
        &client,
        &js,
        "alice",
        Action::Resolve {
            incident: IncidentRef::Number(1),
        },
        t0,
    )
    .await;
    assert!(matches!(reply, CommandReply::Accepted { .. }), "{reply:?}");
    let tl = wait_timeline(&client, 1, "the skipped run", |tl| {
        has(tl, "run", "skipped")
    })
    .await;
    assert_eq!(
        detail_of(&tl, "run", "skipped"),
        "the incident was resolved before anyone approved or denied the run"
    );
    let runs = js.get_key_value("tocsin_remediation_runs").await.unwrap();
    let record: serde_json::Value =
        serde_json::from_slice(&runs.get(format!("run.{run}")).await.unwrap().unwrap()).unwrap();
    assert_eq!(record["state"], "skipped", "{record}");
    let guards = js.get_key_value("tocsin_remediation").await.unwrap();
    let waiting: serde_json::Value =
        serde_json::from_slice(&guards.get("approvals").await.unwrap().unwrap()).unwrap();
    assert!(waiting.get(&run).is_none(), "{waiting}");
    assert!(rb.recorded().is_empty(), "{:?}", rb.recorded());
}

/// Two replicas share the waiting runs: an approval runs its run once, a
/// denial and a timeout each end theirs once, whichever replica reads the
/// decision or sweeps the deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_decide_each_waiting_run_once() {
    use std::sync::Arc;
    use tocsin_runtime::context::ServiceContext;
    use tocsin_tests::remediation::remediation_config;
    let nats = NatsServer::start().await;
    let rb = Runbooks::new();
    let programs = gated(&rb, "immediately");
    let programs: Vec<&str> = programs.iter().map(String::as_str).collect();
    let tocsin = TocsinHarness::start_with(config(&nats, &rb.path(), &programs)).await;
    let client2 = nats.client_as("remediation").await.unwrap();
    let ctx2 = ServiceContext::standalone(
        jetstream::new(client2.clone()),
        Arc::new(tocsin.clock.clone()),
    );
    let replica2 = {
        let (c, ctx) = (remediation_config(&rb.path(), &programs), ctx2.clone());
        tokio::spawn(async move { tocsin_remediation::run(c, &ctx, None).await })
    };
    let client = nats.client().await;
    let js = jetstream::new(client.clone());
    let t0 = tocsin.clock_now();
    for service in ["s1", "s2", "s3"] {
        publish_gated(&js, service, &["alertname", "service"], t0).await;
    }
    let mut runs = Vec::new();
    for n in 1..=3u64 {
        runs.push(awaiting(&client, n).await);
    }
    let on = |n: u64, run: &str, approve: bool| {
        let request = if approve {
            RunbookRequest::Approve { run: run.into() }
        } else {
            RunbookRequest::Deny { run: run.into() }
        };
        Action::Runbook {
            incident: IncidentRef::Number(n),
            request,
        }
    };
    let r = command(&client, &js, "alice", on(1, &runs[0], true), t0).await;
    assert!(matches!(r, CommandReply::Accepted { .. }), "{r:?}");
    let r = command(&client, &js, "bob", on(2, &runs[1], false), t0).await;
    assert!(matches!(r, CommandReply::Accepted { .. }), "{r:?}");
    let ended = |n: u64, status: &'static str| {
        let client = client.clone();
        async move {
            wait_timeline(&client, n, "the run's end", move |tl| {
                has(tl, "run", status) && (status == "succeeded" || !escalations(tl).is_empty())
            })
            .await
        }
    };
    let tl1 = ended(1, "succeeded").await;
    let tl2 = ended(2, "failed").await;
    // Past the deadline only once both decisions were read.
    tocsin.clock.set(t0 + SignedDuration::from_mins(16));
    let tl3 = ended(3, "failed").await;
    let denied = detail_of(&tl2, "run", "failed");
    assert!(denied.contains("approval denied by bob"), "{denied}");
    let timed_out = detail_of(&tl3, "run", "failed");
    assert!(timed_out.contains("no approve or deny by"), "{timed_out}");
    // The approved run ran once; the others never ran.
    assert_eq!(rb.recorded(), ["restart", "s1"]);
    assert!(!has(&tl1, "run", "failed"), "{:#?}", steps(&tl1));
    let kv = js.get_key_value("tocsin_remediation_runs").await.unwrap();
    for (run, state) in runs.iter().zip(["succeeded", "failed", "failed"]) {
        let record: serde_json::Value =
            serde_json::from_slice(&kv.get(format!("run.{run}")).await.unwrap().unwrap()).unwrap();
        assert_eq!(record["state"], state, "{record}");
    }
    ctx2.shutdown.cancel();
    replica2.await.unwrap().unwrap();
}
