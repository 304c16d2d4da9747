//! Guardrails across replicas, on a real nats-server: a storm of 200
//! matching incidents with two remediation replicas runs at most
//! `max_concurrent` at once (one per `concurrency_key`) and records every
//! other as skipped with the reason; consecutive failures open the breaker,
//! which pages a human and skips later runs; cooldowns and the hourly
//! limit skip with their reasons.

use std::sync::Arc;

use async_nats::jetstream;
use tocsin_proto::{
    command::{Action, CommandReply, IncidentRef},
    incident::EventKind,
    AlertStatus,
};
use tocsin_runtime::context::ServiceContext;
use tocsin_tests::{
    incidents::{alert, command, publish_alert},
    remediation::{config, has, remediation_config, steps, wait_timeline, Runbooks},
    NatsServer, TocsinHarness,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_storm_on_two_replicas_runs_at_most_max_concurrent_and_skips_the_rest_with_the_reason() {
    let nats = NatsServer::start().await;
    let rb = Runbooks::new();
    let rec = rb.recorder();
    let out = rb.record_file();
    rb.add(
        "storm",
        &format!(
            r#"
name: storm
match: {{labels: ['alertname="Storm"']}}
guardrails:
  max_concurrent: 2
  concurrency_key: "{{{{labels.service}}}}"
  max_runs_per_hour: 100
steps:
  - id: restart
    exec: {{argv: ["{rec}", "{{{{labels.service}}}}"], env: {{RECORD_TO: "{out}", SLEEP: "15"}}}}
    timeout: 60s
"#,
            rec = rec.display(),
            out = out.display()
        ),
    );
    let programs = [rec.to_str().unwrap()];
    let cfg = config(&nats, &rb.path(), &programs);
    let tocsin = TocsinHarness::start_with(cfg).await;
    // A second replica on the same bus, as its own process would run it.
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
    for i in 0..200 {
        let host = format!("h{i}");
        let service = format!("s{}", i % 4);
        let labels = [
            ("alertname", "Storm"),
            ("host", host.as_str()),
            ("service", service.as_str()),
        ];
        publish_alert(&js, alert(&labels, &["host"], AlertStatus::Firing, t0), t0).await;
    }
    // Every incident gets its decision: started or skipped with the reason.
    let mut started = Vec::new();
    let mut skipped = 0;
    for n in 1..=200u64 {
        let tl = wait_timeline(&client, n, "a decision", |tl| {
            has(tl, "run", "started") || has(tl, "run", "skipped")
        })
        .await;
        if has(&tl, "run", "started") {
            started.push(n);
        } else {
            skipped += 1;
            let (_, _, _, reason) = steps(&tl)
                .into_iter()
                .find(|(_, s, st, _)| s == "run" && st == "skipped")
                .unwrap();
            assert!(
                reason.starts_with("max_concurrent: 2 run(s) of runbook storm already in progress")
                    || reason.starts_with("concurrency_key: a run for \"s"),
                "#{n}: {reason}"
            );
        }
    }
    // Each run lasts 15 s, far longer than the storm takes to decide.
    if started.is_empty() || started.len() > 2 {
        let mut runs = Vec::new();
        for n in &started {
            let tl = wait_timeline(&client, *n, "its timeline", |_| true).await;
            runs.push((n, steps(&tl)));
        }
        panic!("started: {runs:#?}");
    }
    assert_eq!(skipped + started.len(), 200);
    // Both replicas took part.
    let metrics2 = ctx2.metrics.encode();
    let metrics1 = tocsin.metrics().await;
    for m in [&metrics1, &metrics2] {
        assert!(
            m.contains("tocsin_remediation_runs_total{outcome=\"skipped\"}"),
            "{m}"
        );
    }
    // The runs end, and free their leases: a later incident runs.
    for n in &started {
        wait_timeline(&client, *n, "the run to end", |tl| {
            has(tl, "run", "succeeded")
        })
        .await;
    }
    let services: std::collections::BTreeSet<String> = rb.recorded().into_iter().collect();
    assert_eq!(services.len(), started.len(), "one run per service at most");
    ctx2.shutdown.cancel();
    replica2.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consecutive_failures_open_the_breaker_which_pages_a_human_and_skips_runs() {
    let nats = NatsServer::start().await;
    let rb = Runbooks::new();
    let rec = rb.recorder();
    let out = rb.record_file();
    rb.add(
        "flaky",
        &format!(
            r#"
name: flaky
match: {{labels: ['alertname="Flaky"']}}
guardrails: {{breaker_after: 3, breaker_reset: 1h}}
steps:
  - id: fix
    exec: {{argv: ["{rec}", "{{{{labels.host}}}}"], env: {{RECORD_TO: "{out}", EXIT: "1"}}}}
"#,
            rec = rec.display(),
            out = out.display()
        ),
    );
    let programs = [rec.to_str().unwrap()];
    let tocsin = TocsinHarness::start_with(config(&nats, &rb.path(), &programs)).await;
    let client = nats.client().await;
    let js = jetstream::new(client.clone());
    let t0 = tocsin.clock_now();
    let open = |i: u64| {
        let js = js.clone();
        async move {
            let host = format!("h{i}");
            publish_alert(
                &js,
                alert(
                    &[("alertname", "Flaky"), ("host", host.as_str())],
                    &["host"],
                    AlertStatus::Firing,
                    t0,
                ),
                t0,
            )
            .await;
        }
    };
    for n in 1..=3u64 {
        open(n).await;
        let tl = wait_timeline(&client, n, "the escalation", |tl| {
            tl.iter()
                .any(|e| matches!(e.kind, EventKind::Escalated { .. }))
        })
        .await;
        let reason = tl
            .iter()
            .find_map(|e| match &e.kind {
                EventKind::Escalated { reason } => Some(reason.clone()),
                _ => None,
            })
            .unwrap();
        assert!(
            reason.contains("runbook flaky failed at step fix: exit 1"),
            "{reason}"
        );
        // The third failure opens the breaker, and the page says so.
        assert_eq!(
            reason.contains(
                "breaker open: 3 consecutive failed runs; runbook flaky is skipped until"
            ),
            n == 3,
            "#{n}: {reason}"
        );
    }
    open(4).await;
    let tl = wait_timeline(&client, 4, "the skip", |tl| has(tl, "run", "skipped")).await;
    let (_, _, _, reason) = steps(&tl).into_iter().find(|e| e.2 == "skipped").unwrap();
    assert!(
        reason.starts_with("breaker open after 3 consecutive failed runs, until"),
        "{reason}"
    );
    assert_eq!(
        rb.recorded(),
        ["h1", "h2", "h3"],
        "no run while the breaker is open"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cooldown_and_hourly_limit_skip_with_their_reason() {
    let nats = NatsServer::start().await;
    let rb = Runbooks::new();
    rb.add(
        "limited",
        r#"
name: limited
match: {labels: ['team="db"']}
on: [opened, acknowledged]
guardrails: {cooldown: 10m, max_runs_per_hour: 2}
steps:
  - id: note
    annotate: "looked at {{labels.host}}"
"#,
    );
    let tocsin = TocsinHarness::start_with(config(&nats, &rb.path(), &[])).await;
    let client = nats.client().await;
    let js = jetstream::new(client.clone());
    let t0 = tocsin.clock_now();
    let open = |host: &'static str| {
        let js = js.clone();
        async move {
            publish_alert(
                &js,
                alert(
                    &[("team", "db"), ("host", host)],
                    &["host"],
                    AlertStatus::Firing,
                    t0,
                ),
                t0,
            )
            .await;
        }
    };
    open("a").await;
    wait_timeline(&client, 1, "run 1", |tl| has(tl, "run", "succeeded")).await;
    // Acknowledged: the runbook would start again for the same dedup key.
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
    let tl = wait_timeline(&client, 1, "the cooldown skip", |tl| {
        has(tl, "run", "skipped")
    })
    .await;
    let skip = steps(&tl).into_iter().find(|e| e.2 == "skipped").unwrap().3;
    assert!(
        skip.starts_with("cooldown: a run for this dedup key started less than"),
        "{skip}"
    );

    open("b").await;
    wait_timeline(&client, 2, "run 2", |tl| has(tl, "run", "succeeded")).await;
    open("c").await;
    let tl = wait_timeline(&client, 3, "the hourly skip", |tl| {
        has(tl, "run", "skipped")
    })
    .await;
    let skip = steps(&tl).into_iter().find(|e| e.2 == "skipped").unwrap().3;
    assert!(
        skip.starts_with("max_runs_per_hour: 2 runs already started this hour"),
        "{skip}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dry_run_records_what_would_run_and_runs_nothing() {
    let nats = NatsServer::start().await;
    let rb = Runbooks::new();
    let rec = rb.recorder();
    let out = rb.record_file();
    for (name, dry) in [("dry", "dry_run: true"), ("live", "")] {
        rb.add(
            name,
            &format!(
                r#"
name: {name}
match: {{labels: ['alertname="{name}"']}}
{dry}
page: on_failure
steps:
  - id: act
    exec: {{argv: ["{rec}", "{{{{labels.host}}}}"], env: {{RECORD_TO: "{out}"}}}}
  - id: done
    resolve: true
"#,
                rec = rec.display(),
                out = out.display()
            ),
        );
    }
    let programs = [rec.to_str().unwrap()];
    // The runbook's own switch; then the global one for every runbook.
    for global in [false, true] {
        let mut cfg = config(&nats, &rb.path(), &programs);
        cfg.remediation.as_mut().unwrap().dry_run = global;
        let tocsin = TocsinHarness::start_with(cfg).await;
        let client = nats.client().await;
        let js = jetstream::new(client.clone());
        let t0 = tocsin.clock_now();
        let name = if global { "live" } else { "dry" };
        let host = format!("h-{global}");
        publish_alert(
            &js,
            alert(
                &[("alertname", name), ("host", host.as_str())],
                &["host"],
                AlertStatus::Firing,
                t0,
            ),
            t0,
        )
        .await;
        let n = if global { 2 } else { 1 };
        let tl = wait_timeline(&client, n, "the dry run", |tl| has(tl, "run", "succeeded")).await;
        let s = steps(&tl);
        let act = s.iter().find(|e| e.1 == "act").unwrap();
        assert_eq!(act.2, "dry_run", "{s:#?}");
        assert!(
            act.3
                .contains(&format!("would run [\"{}\", \"{host}\"]", rec.display())),
            "{}",
            act.3
        );
        assert_eq!(s.iter().find(|e| e.1 == "done").unwrap().2, "dry_run");
        // Nothing ran, nothing was resolved, and pages are not held back.
        assert!(!has(&tl, "run", "held"), "{s:#?}");
        assert!(rb.recorded().is_empty(), "{:?}", rb.recorded());
        assert!(!tl
            .iter()
            .any(|e| matches!(e.kind, EventKind::Resolved { .. })));
        tocsin.stop().await.unwrap();
    }
}
