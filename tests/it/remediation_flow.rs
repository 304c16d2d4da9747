//! Runbooks end to end on a real nats-server, every service in-process on a
//! manual clock: the demo heals with no page and every step on the
//! timeline; a failing step rolls back and escalates at once with the
//! runbook and step named on the page; alert values reach a program as
//! literal argv elements; a held page waits for the run, and fires when the
//! hold runs out.

use async_nats::jetstream;
use jiff::SignedDuration;
use tocsin_proto::{
    command::IncidentRef,
    incident::{EventKind, IncidentStatus},
    AlertStatus,
};
use tocsin_runtime::CancellationToken;
use tocsin_tests::{
    escalation::pages,
    incidents::{alert, get, publish_alert},
    remediation::{config, demo_target, has, steps, wait_timeline, Runbooks},
    NatsServer, TocsinHarness,
};

const DEMO: &str = r#"
name: demo-heal
description: Repairs the demo target; resolves the incident once its health is green.
match:
  labels: ['alertname="DemoDown"']
page: on_failure
hold_at_most: 5m
params:
  target: TARGET
steps:
  - id: probe
    http: {url: "{{{params.target}}}/health"}
    on_failure: continue
  - id: repair
    when: "{{ne steps.probe.http_status 200}}"
    http: {method: POST, url: "{{{params.target}}}/repair"}
    idempotent: true
  - id: verify
    check:
      http: {url: "{{{params.target}}}/health"}
      until: '{{eq result.json.status "ok"}}'
      interval: 100ms
    timeout: 10s
  - id: note
    annotate: "healed by {{run.runbook}}: health was {{steps.probe.http_status}}, now {{steps.verify.http_status}}"
  - id: done
    resolve: true
"#;

/// Waits until NOTIFY holds a page for incident `n`; every page so far.
async fn page_for(js: &jetstream::Context, n: u64) -> Vec<tocsin_proto::notify::Page> {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let p = pages(js).await;
        if p.iter().any(|p| p.incident.number == n) {
            return p;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no page for #{n}; pages: {p:#?}"
        );
        // Poll interval of a wait for something to happen (with a deadline), not a wait to prove that nothing did.
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_heals_with_no_page_and_every_step_on_the_timeline() {
    let nats = NatsServer::start().await;
    let stop = CancellationToken::new();
    let target = demo_target(stop.clone()).await;
    let http = reqwest::Client::new();
    http.post(format!("{target}/break")).send().await.unwrap();
    assert_eq!(
        http.get(format!("{target}/health"))
            .send()
            .await
            .unwrap()
            .status(),
        503
    );
    let rb = Runbooks::new();
    rb.add("demo", &DEMO.replace("TARGET", &target));
    let tocsin = TocsinHarness::start_with(config(&nats, &rb.path(), &[])).await;
    let client = nats.client().await;
    let js = jetstream::new(client.clone());
    let t0 = tocsin.clock_now();
    let labels = [("alertname", "DemoDown"), ("severity", "critical")];
    publish_alert(
        &js,
        alert(&labels, &["alertname"], AlertStatus::Firing, t0),
        t0,
    )
    .await;

    let tl = wait_timeline(&client, 1, "the run to succeed", |tl| {
        has(tl, "run", "succeeded")
    })
    .await;
    let s: Vec<(String, String)> = steps(&tl)
        .into_iter()
        .map(|(_, step, status, _)| (step, status))
        .collect();
    let expected = [
        ("run", "held"),
        ("run", "started"),
        ("probe", "failed"),
        ("repair", "succeeded"),
        ("verify", "succeeded"),
        ("note", "succeeded"),
        ("done", "succeeded"),
        ("run", "succeeded"),
    ];
    assert_eq!(
        s,
        expected
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect::<Vec<_>>()
    );
    // Each step with its output and duration.
    let probe = &steps(&tl)[2].3;
    assert!(
        probe.contains("HTTP 503") && probe.contains("broken") && probe.contains("s"),
        "{probe}"
    );
    assert!(
        steps(&tl)[4].3.contains("holds after"),
        "{:?}",
        steps(&tl)[4]
    );
    assert!(tl.iter().any(
        |e| matches!(&e.kind, EventKind::NoteAdded { text } if text == "healed by demo-heal: health was 503, now 200")
    ));
    assert_eq!(
        get(&client, IncidentRef::Number(1)).await.incident.status,
        IncidentStatus::Resolved
    );
    assert_eq!(
        http.get(format!("{target}/health"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );

    // No page, ever: past the group wait and the hold, an incident no
    // runbook takes pages (escalation handles INCIDENTS in order, so the
    // healed one would have paged before it).
    let later = t0 + SignedDuration::from_mins(10);
    tocsin.clock.set(later);
    publish_alert(
        &js,
        alert(
            &[("alertname", "Other"), ("severity", "critical")],
            &["alertname"],
            AlertStatus::Firing,
            later,
        ),
        later,
    )
    .await;
    tocsin.clock.set(later + SignedDuration::from_mins(1));
    let p = page_for(&js, 2).await;
    assert!(p.iter().all(|p| p.incident.number == 2), "{p:#?}");
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_step_rolls_back_and_escalates_at_once_naming_runbook_and_step() {
    let nats = NatsServer::start().await;
    let rb = Runbooks::new();
    let rec = rb.recorder();
    let out = rb.record_file();
    rb.add(
        "restart",
        &format!(
            r#"
name: restart-api
match: {{labels: ['alertname="ApiDown"']}}
steps:
  - id: restart
    exec: {{argv: ["{rec}", restart, "{{{{labels.service}}}}"], env: {{RECORD_TO: "{out}", EXIT: "3"}}}}
    on_failure: rollback
  - id: never
    annotate: not reached
rollback:
  - id: undo
    exec: {{argv: ["{rec}", undo, "{{{{labels.service}}}}"], env: {{RECORD_TO: "{out}"}}}}
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
    publish_alert(
        &js,
        alert(
            &[("alertname", "ApiDown"), ("service", "api")],
            &["alertname"],
            AlertStatus::Firing,
            t0,
        ),
        t0,
    )
    .await;
    let tl = wait_timeline(&client, 1, "the escalation", |tl| {
        tl.iter()
            .any(|e| matches!(e.kind, EventKind::Escalated { .. }))
    })
    .await;
    let s = steps(&tl);
    let find = |step: &str, status: &str| {
        s.iter()
            .find(|(_, a, b, _)| a == step && b == status)
            .unwrap_or_else(|| panic!("no {step} {status} in {s:#?}"))
            .3
            .clone()
    };
    assert!(find("restart", "failed").contains("exit 3"));
    find("run", "rolling_back");
    find("undo", "succeeded");
    let failed = find("run", "failed");
    assert!(
        failed.contains("runbook restart-api failed at step restart: exit 3"),
        "{failed}"
    );
    assert!(!has(&tl, "never", "succeeded"));
    let reason = tl
        .iter()
        .find_map(|e| match &e.kind {
            EventKind::Escalated { reason } => Some(reason.clone()),
            _ => None,
        })
        .unwrap();
    assert!(
        reason.contains("runbook restart-api failed at step restart"),
        "{reason}"
    );
    assert_eq!(rb.recorded(), ["restart", "api", "undo", "api"]);
    // At once: the group wait (30 s on a clock that does not move) is not
    // waited for, and the page says why.
    let p = page_for(&js, 1).await;
    assert!(
        p.iter().all(|p| p
            .reason
            .contains("runbook restart-api failed at step restart")),
        "{p:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alert_values_reach_a_program_as_literal_argv() {
    let nats = NatsServer::start().await;
    let rb = Runbooks::new();
    let rec = rb.recorder();
    let out = rb.record_file();
    let pwned = rb.dir.path().join("pwned");
    rb.add(
        "inject",
        &format!(
            r#"
name: inject
match: {{labels: ['alertname="Inject"']}}
steps:
  - id: record
    exec:
      argv: ["{rec}", "{{{{labels.target}}}}", "{{{{labels.cmd}}}}", "--name={{{{labels.target}}}}"]
      env: {{RECORD_TO: "{out}"}}
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
    let cmd = format!("$(touch {})", pwned.display());
    let evil = [
        ("alertname", "Inject"),
        ("target", "x; rm -rf /"),
        ("cmd", cmd.as_str()),
    ];
    publish_alert(
        &js,
        alert(&evil, &["alertname"], AlertStatus::Firing, t0),
        t0,
    )
    .await;
    wait_timeline(&client, 1, "the run to succeed", |tl| {
        has(tl, "run", "succeeded")
    })
    .await;
    assert_eq!(
        rb.recorded(),
        ["x; rm -rf /", cmd.as_str(), "--name=x; rm -rf /"]
    );
    assert!(!pwned.exists(), "a label was run as a command");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_page_waits_for_the_run_and_fires_when_the_hold_runs_out() {
    let nats = NatsServer::start().await;
    let rb = Runbooks::new();
    let rec = rb.recorder();
    let out = rb.record_file();
    rb.add(
        "slow",
        &format!(
            r#"
name: slow
match: {{labels: ['alertname="Slow"']}}
page: on_failure
hold_at_most: 5m
steps:
  - id: stuck
    exec: {{argv: ["{rec}", working], env: {{RECORD_TO: "{out}", SLEEP: "30"}}}}
    timeout: 60s
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
    let mins = |m: i64| t0 + SignedDuration::from_mins(m);
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
    let tl = wait_timeline(&client, 1, "the hold", |tl| {
        has(tl, "stuck", "failed") || has(tl, "run", "started")
    })
    .await;
    assert!(has(&tl, "run", "held"));

    // Past the group wait, within the hold: an incident no runbook takes
    // pages; the held one does not.
    tocsin.clock.set(mins(2));
    publish_alert(
        &js,
        alert(
            &[("alertname", "Other")],
            &["alertname"],
            AlertStatus::Firing,
            mins(2),
        ),
        mins(2),
    )
    .await;
    tocsin.clock.set(mins(3));
    let p = page_for(&js, 2).await;
    assert!(p.iter().all(|p| p.incident.number == 2), "{p:#?}");

    // The run is stuck past the hold: the page goes out.
    tocsin.clock.set(mins(6));
    let p = page_for(&js, 1).await;
    assert!(p.iter().any(|p| p.incident.number == 1 && p.level == 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hold_survives_a_restart_and_pages_when_it_runs_out() {
    let nats = NatsServer::start().await;
    let rb = Runbooks::new();
    rb.add(
        "slow",
        r#"
name: slow
match: {labels: ['alertname="Slow"']}
page: on_failure
hold_at_most: 5m
steps:
  - id: settle
    wait: 10m
    timeout: 1h
"#,
    );
    let data = tempfile::tempdir().unwrap();
    let mut cfg = config(&nats, &rb.path(), &[]);
    cfg.incidents.data_dir = Some(tocsin_runtime::config::ConfigPath(
        data.path().join("incidents"),
    ));
    cfg.escalation.data_dir = Some(tocsin_runtime::config::ConfigPath(
        data.path().join("escalation"),
    ));
    let tocsin = TocsinHarness::start_with(cfg.clone()).await;
    let client = nats.client().await;
    let js = jetstream::new(client.clone());
    let t0 = tocsin.clock_now();
    let mins = |m: i64| t0 + SignedDuration::from_mins(m);
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
    wait_timeline(&client, 1, "the run", |tl| has(tl, "run", "started")).await;
    assert!(has(
        &wait_timeline(&client, 1, "the hold", |tl| has(tl, "run", "held")).await,
        "run",
        "held"
    ));

    // Every service restarts mid-hold (escalation from its store and the
    // stream; remediation takes the run over).
    tocsin.stop().await.unwrap();
    let tocsin = TocsinHarness::start_with(cfg).await;
    tocsin.clock.set(mins(2));
    wait_timeline(&client, 1, "the takeover", |tl| has(tl, "run", "resumed")).await;
    publish_alert(
        &js,
        alert(
            &[("alertname", "Other")],
            &["alertname"],
            AlertStatus::Firing,
            mins(2),
        ),
        mins(2),
    )
    .await;
    tocsin.clock.set(mins(3));
    let p = page_for(&js, 2).await;
    assert!(p.iter().all(|p| p.incident.number == 2), "{p:#?}");

    tocsin.clock.set(mins(6));
    let p = page_for(&js, 1).await;
    assert!(p.iter().any(|p| p.incident.number == 1 && p.level == 0));
}

/// The quick-start demo as shipped: `tocsin demo-target` fires its own
/// alert through ingest when broken; runbooks/demo-heal.yaml repairs it, the
/// alert resolves, and nobody is paged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shipped_demo_runbook_heals_the_demo_target_through_ingest() {
    let nats = NatsServer::start().await;
    let rb = Runbooks::new();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let target = format!("http://{}", listener.local_addr().unwrap());
    let shipped = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../runbooks/demo-heal.yaml"),
    )
    .unwrap();
    assert!(shipped.contains("http://127.0.0.1:9477"));
    rb.add(
        "demo-heal",
        &shipped.replace("http://127.0.0.1:9477", &target),
    );
    let tocsin = TocsinHarness::start_with(config(&nats, &rb.path(), &[])).await;
    let stop = CancellationToken::new();
    let alerter = tocsin::demo::Alerter {
        url: format!("{}/api/v1/alerts", tocsin.ingest_url),
        token: tocsin.token.clone(),
        client: reqwest::Client::new(),
    };
    tokio::spawn(tocsin::demo::serve_with(
        listener,
        Some(alerter),
        stop.clone(),
    ));
    let http = reqwest::Client::new();
    let r = http.post(format!("{target}/break")).send().await.unwrap();
    assert_eq!(r.status(), 200);

    let client = nats.client().await;
    let js = jetstream::new(client.clone());
    let tl = wait_timeline(&client, 1, "the run to succeed", |tl| {
        has(tl, "run", "succeeded")
    })
    .await;
    for step in ["repair", "verify", "note", "done"] {
        assert!(has(&tl, step, "succeeded"), "{step}: {:#?}", steps(&tl));
    }
    assert_eq!(
        get(&client, IncidentRef::Number(1)).await.incident.status,
        IncidentStatus::Resolved
    );
    assert_eq!(
        http.get(format!("{target}/health"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    // Nobody paged: past the group wait and the hold, an incident no
    // runbook takes pages, the demo's never.
    let t0 = tocsin.clock_now();
    let later = t0 + SignedDuration::from_mins(10);
    tocsin.clock.set(later);
    publish_alert(
        &js,
        alert(
            &[("alertname", "Other")],
            &["alertname"],
            AlertStatus::Firing,
            later,
        ),
        later,
    )
    .await;
    tocsin.clock.set(later + SignedDuration::from_mins(1));
    let p = page_for(&js, 2).await;
    assert!(p.iter().all(|p| p.incident.number == 2), "{p:#?}");
    stop.cancel();
}
