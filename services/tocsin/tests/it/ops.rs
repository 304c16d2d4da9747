//! `tocsin ack 1`, `resolve`, `list`, `show` against running services.

use std::process::Command;

use tocsin_tests::{faults::NatsProxy, http, incidents::wait_for, NatsServer, TocsinHarness};

fn tocsin(config: &std::path::Path, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(crate::support::bin())
        .arg("--config")
        .arg(config)
        .args(args)
        // Times in text are in the local zone: make it known.
        .env("TZ", "Europe/Berlin")
        .output()
        .expect("run tocsin");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operators_ack_resolve_list_and_show_from_the_command_line() {
    let nats = NatsServer::start().await;
    let tocsin_up = TocsinHarness::start(&nats).await;
    let client = nats.client().await;
    post_alerts(
        &tocsin_up,
        r#"[{"labels":{"alertname":"QueueBacklog","queue":"billing","severity":"P1"},"annotations":{"summary":"billing queue backlog > 10k"}}]"#,
    )
    .await;
    wait_for(&client, "an incident", |all| all.len() == 1).await;

    // The CLI needs only the nats section.
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("tocsin.yaml");
    std::fs::write(&config, format!("nats:\n  url: {}\n", nats.url())).unwrap();
    let run = |args: &'static [&'static str]| {
        let config = config.clone();
        tokio::task::spawn_blocking(move || tocsin(&config, args))
    };

    let (code, out, err) = run(&["list"]).await.unwrap();
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("#1")
            && out.contains("triggered")
            && out.contains("high")
            && out.contains("billing queue backlog > 10k"),
        "{out}"
    );

    let (code, out, err) = run(&["ack", "#1", "--as", "alice"]).await.unwrap();
    assert_eq!((code, out.trim()), (0, "incident #1 acknowledged"), "{err}");
    let (code, _, err) = run(&["ack", "1", "--as", "bob"]).await.unwrap();
    assert_eq!(code, 1);
    assert!(
        err.contains("rejected: incident #1 was already acknowledged by alice (cli)"),
        "{err}"
    );
    let (code, _, err) = run(&["note", "1", "drained the queue", "--as", "alice"])
        .await
        .unwrap();
    assert_eq!(code, 0, "{err}");
    // Text that holds terminal control sequences (a title set by OSC, a
    // screen cleared) is refused, naming what is wrong.
    let (code, _, err) = run(&["note", "1", "see \x1b]0;pwned\x07 and \x1b[2J here"])
        .await
        .unwrap();
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("rejected: the note holds the control character U+001B"),
        "{err}"
    );
    assert!(!err.contains('\x1b'), "{err:?}");
    let (code, out, err) = run(&["resolve", "1", "--as", "alice"]).await.unwrap();
    assert_eq!((code, out.trim()), (0, "incident #1 resolved"), "{err}");

    let (code, out, _) = run(&["list"]).await.unwrap();
    assert_eq!(code, 0);
    assert!(out.contains("no open incidents"), "{out}");
    let (code, out, err) = run(&["show", "1"]).await.unwrap();
    assert_eq!(code, 0, "{err}");
    for expected in [
        "#1 billing queue backlog > 10k",
        "status:    resolved",
        "opened",
        "acknowledged by alice (cli)",
        "note: drained the queue by alice (cli)",
        "resolved by alice (cli)",
    ] {
        assert!(out.contains(expected), "{expected:?} not in:\n{out}");
    }
    assert!(
        !out.chars().any(|c| c.is_control() && c != '\n'),
        "a control character in:\n{out:?}"
    );

    // An unknown incident is a refusal (1), not "cannot reach" (3).
    let (code, _, err) = run(&["show", "7"]).await.unwrap();
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("no incident #7"), "{err}");
    // With the shipped config, an operator needs NATS's address and the
    // operator's NATS password, and none of the services' secrets.
    let shipped = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../config/tocsin.yaml");
    let out = Command::new(crate::support::bin())
        .arg("--config")
        .arg(&shipped)
        .arg("list")
        .env("TOCSIN_NATS_URL", nats.address())
        .env("TOCSIN_NATS_OPERATOR_PASSWORD", nats.password("operator"))
        .env_remove("TOCSIN_INGEST_TOKEN")
        .env_remove("TOCSIN_NATS_INGEST_PASSWORD")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let (code, _, err) = run(&["ack", "seven"]).await.unwrap();
    assert_eq!(code, 2, "bad arguments are usage errors");
    assert!(err.contains("neither an incident number"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oncall_names_who_is_on_call_now_and_next() {
    let nats = NatsServer::start().await;
    let mut config = TocsinHarness::config(&nats);
    config.escalation = serde_yaml_ng::from_str(
        "schedules:\n  - name: primary\n    timezone: Europe/Berlin\n    layers: [{name: daily, participants: [alice, bob], rotation: daily, handoff: \"09:00\", start: 2026-01-05}]\nusers:\n  - {name: alice, email: a@example.com}\n  - {name: bob, email: b@example.com}\n",
    )
    .unwrap();
    let _tocsin_up = TocsinHarness::start_with(config).await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("tocsin.yaml");
    std::fs::write(&cfg, format!("nats:\n  url: {}\n", nats.url())).unwrap();
    let out = tokio::task::spawn_blocking(move || {
        let all = tocsin(&cfg, &["oncall", "--at", "2026-01-05T10:00:00Z"]);
        let one = tocsin(&cfg, &["oncall", "primary", "--at", "2026-01-06T10:00:00Z"]);
        let bad = tocsin(&cfg, &["oncall", "tertiary"]);
        let json = tocsin(
            &cfg,
            &["oncall", "--at", "2026-01-05T10:00:00Z", "--output", "json"],
        );
        (all, one, bad, json)
    })
    .await
    .unwrap();
    let ((c1, all, e1), (c2, one, e2), (c3, _, e3), json) = out;
    assert_eq!(c1, 0, "{e1}");
    // Times in the schedule's zone, with the zone (handoff 09:00 Berlin).
    assert!(
        all.starts_with("primary: alice until 2026-01-06 09:00:00 CET"),
        "{all}"
    );
    assert!(
        all.contains("then bob from 2026-01-06 09:00:00 CET to 2026-01-07 09:00:00 CET"),
        "{all}"
    );
    assert_eq!(c2, 0, "{e2}");
    assert!(one.starts_with("primary: bob"), "{one}");
    // An unknown schedule is a refusal (1) naming the defined ones.
    assert_eq!(c3, 1, "{e3}");
    assert!(e3.contains("tertiary") && e3.contains("primary"), "{e3}");
    assert_eq!(json.0, 0, "{}", json.2);
    let v: serde_json::Value = serde_json::from_str(&json.1).expect(&json.1);
    let p = &v["schedules"][0];
    assert_eq!(p["schedule"], "primary");
    assert_eq!(p["timezone"], "Europe/Berlin");
    assert_eq!(p["user"], "alice");
    assert_eq!(p["shift_end"], "2026-01-06T08:00:00Z");
    assert_eq!(p["next"][0]["user"], "bob");
    for field in ["at", "layer", "shift_start"] {
        assert!(p.get(field).is_some(), "{field} in {p}");
    }
}

/// Posts `body` to ingest's generic endpoint (`/api/v1/alerts`) and
/// checks it was taken.
async fn post_alerts(tocsin_up: &TocsinHarness, body: &'static str) {
    let a = http::post(
        &reqwest::Client::new(),
        &format!("{}/api/v1/alerts", tocsin_up.ingest_url),
        Some(&tocsin_up.token),
        body,
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.text);
}

/// A critical DiskFull alert through ingest, once its incident (#1) is open.
async fn disk_full(tocsin_up: &TocsinHarness, client: &async_nats::Client) {
    post_alerts(
        tocsin_up,
        r#"[{"labels":{"alertname":"DiskFull","severity":"critical"}}]"#,
    )
    .await;
    wait_for(client, "an incident", |all| all.len() == 1).await;
}

/// `tocsin ack` while the incidents service is down: the command is stored
/// on the COMMANDS stream, so the CLI says it is queued and exits 4 (not
/// "error" and 3); the incidents service applies it when it runs again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ack_while_incidents_is_down_is_queued_and_applied_later() {
    let nats = NatsServer::start().await;
    let config = TocsinHarness::config(&nats);
    let tocsin_up = TocsinHarness::start_with(config.clone()).await;
    let client = nats.client().await;
    disk_full(&tocsin_up, &client).await;
    tocsin_up.stop().await.unwrap();

    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("tocsin.yaml");
    std::fs::write(&cfg, format!("nats:\n  url: {}\n", nats.url())).unwrap();
    let (code, out, err) = tokio::task::spawn_blocking(move || {
        tocsin(&cfg, &["--timeout", "1s", "ack", "1", "--as", "alice"])
    })
    .await
    .unwrap();
    assert_eq!(code, 4, "stdout: {out}\nstderr: {err}");
    assert!(
        out.contains("queued") && out.contains("ack") && out.contains("#1"),
        "{out}"
    );
    assert!(!err.contains("error"), "{err}");
    // A query has nobody to answer it: exit 3, saying which service.
    let cfg = dir.path().join("tocsin.yaml");
    let (code, _, err) = tokio::task::spawn_blocking(move || tocsin(&cfg, &["list"]))
        .await
        .unwrap();
    assert_eq!(code, 3, "{err}");
    assert!(
        err.contains("no incidents service answers on this NATS; is it running?"),
        "{err}"
    );

    // The incidents service applies it when it runs again.
    let _again = TocsinHarness::start_with(config).await;
    wait_for(&client, "the queued ack applied", |all| {
        all.len() == 1 && all[0].status == tocsin_proto::incident::IncidentStatus::Acknowledged
    })
    .await;
    let d =
        tocsin_tests::incidents::get(&client, tocsin_proto::command::IncidentRef::Number(1)).await;
    assert_eq!(
        d.incident.acknowledged_by.map(|a| a.name),
        Some("alice".to_string())
    );
}

/// `tocsin ack` whose command is lost on its way to JetStream (the
/// publish written and never acknowledged: a connection that broke, or a
/// stream leader that died before storing it, as when a NATS node of a
/// cluster is killed) sends it again under the same message id within its
/// `--timeout`: applied once, exit 0, nothing for the operator to repeat.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ack_whose_command_is_lost_on_its_way_is_sent_again() {
    let nats = NatsServer::start().await;
    let tocsin_up = TocsinHarness::start(&nats).await;
    let client = nats.client().await;
    disk_full(&tocsin_up, &client).await;

    let proxy = NatsProxy::start(nats.port()).await;
    proxy.swallow(&["tocsin.cmd.ack"]);
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("tocsin.yaml");
    std::fs::write(
        &cfg,
        format!("nats:\n  url: {}\n", proxy.url_for(&nats.url())),
    )
    .unwrap();
    let run = tokio::task::spawn_blocking(move || tocsin(&cfg, &["ack", "1", "--as", "alice"]));
    tocsin_tests::eventually("the command sent", || async {
        match proxy.swallowed() {
            0 => Err("not yet"),
            _ => Ok(()),
        }
    })
    .await;
    // The way to NATS is whole again; the one `tocsin ack` must do.
    proxy.swallow(&[]);
    let (code, out, err) = run.await.unwrap();
    assert_eq!((code, out.trim()), (0, "incident #1 acknowledged"), "{err}");
    assert_eq!(proxy.swallowed_subjects(), ["tocsin.cmd.ack"]);
    let d =
        tocsin_tests::incidents::get(&client, tocsin_proto::command::IncidentRef::Number(1)).await;
    assert_eq!(
        d.incident.acknowledged_by.map(|a| a.name),
        Some("alice".to_string())
    );
}

/// What an operator reads: `show` says "snoozed until", the assignee, the
/// escalate reason, who was paged, the annotations, the alert's link and
/// PagerDuty's details and links; `list` has assignee and snooze columns
/// and times with a zone; no colour codes when not on a terminal; and
/// `--output json` of list, show, oncall and silence list holds the
/// documented fields. `tocsin silence add|list|expire` and `completions`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn show_list_json_silences_and_completions() {
    let nats = NatsServer::start().await;
    let mut config = TocsinHarness::config(&nats);
    config.escalation = serde_yaml_ng::from_str(
        "route: {policy: p}\npolicies:\n  - name: p\n    levels:\n      - targets: [{user: alice}]\nusers:\n  - {name: alice, email: alice@example.com}\n",
    )
    .unwrap();
    let tocsin_up = TocsinHarness::start_with(config).await;
    let client = nats.client().await;
    let http_client = reqwest::Client::new();
    post_alerts(
        &tocsin_up,
        r#"[{"labels":{"alertname":"DiskFull","severity":"critical","host":"db1"},
             "annotations":{"summary":"/var is 97% full","description":"grows 1 GB an hour\nsince the deploy","runbook_url":"https://runbooks.example.com/disk"},
             "generatorURL":"https://prometheus.example.com/graph?g0.expr=disk"}]"#,
    )
    .await;
    wait_for(&client, "incident #1", |all| all.len() == 1).await;
    let pd = serde_json::json!({
        "routing_key": tocsin_up.token, "event_action": "trigger", "dedup_key": "pd-1",
        "payload": {"summary": "Checkout latency high", "source": "grafana", "severity": "warning",
                    "custom_details": {"p99_ms": 2400}},
        "links": [{"href": "https://grafana.example.com/d/checkout", "text": "dashboard"}]
    });
    let a = http::post(
        &http_client,
        &format!("{}/v2/enqueue", tocsin_up.ingest_url),
        None,
        pd.to_string(),
    )
    .await;
    assert_eq!(a.status, 202, "{}", a.text);
    wait_for(&client, "incident #2", |all| all.len() == 2).await;
    // The first level pages alice once the services' clock passes the opening.
    tocsin_up
        .clock
        .set(jiff::Timestamp::now() + jiff::SignedDuration::from_secs(1));
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let d =
            tocsin_tests::incidents::get(&client, tocsin_proto::command::IncidentRef::Number(1))
                .await;
        if d.timeline.iter().any(|e| e.kind.name() == "paged") {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never paged: {:#?}",
            d.timeline
        );
        // Poll interval of a wait for something to happen (with a deadline), not a wait to prove that nothing did.
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }

    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("tocsin.yaml");
    std::fs::write(&cfg, format!("nats:\n  url: {}\n", nats.url())).unwrap();
    let run = |args: Vec<&'static str>| {
        let cfg = cfg.clone();
        tokio::task::spawn_blocking(move || tocsin(&cfg, &args))
    };
    for args in [
        vec!["assign", "1", "bob", "--as", "carol"],
        vec!["escalate", "1", "--reason", "no progress", "--as", "carol"],
        vec!["snooze", "1", "30m", "--as", "carol"],
    ] {
        let (code, out, err) = run(args.clone()).await.unwrap();
        assert_eq!(code, 0, "{args:?}: {out}{err}");
        if args[0] == "snooze" {
            // To the second, not the nanosecond.
            let until = out.trim().rsplit(' ').next().unwrap();
            assert!(
                until.len() == 20 && until.ends_with('Z') && !until.contains('.'),
                "{out}"
            );
        }
    }

    let (code, out, err) = run(vec!["show", "1"]).await.unwrap();
    assert_eq!(code, 0, "{err}");
    for expected in [
        "status:    snoozed until 20",
        "(by carol via cli)",
        "assignee:  bob",
        "escalated: no progress",
        "summary: /var is 97% full",
        "description: grows 1 GB an hour\n        since the deploy",
        "runbook_url: https://runbooks.example.com/disk",
        "source: https://prometheus.example.com/graph?g0.expr=disk",
        "paged alice via email",
        "level 1 of policy p",
        "snoozed until 20",
        "assigned to bob by carol (cli)",
        "escalated: no progress by carol (cli)",
    ] {
        assert!(out.contains(expected), "{expected:?} not in:\n{out}");
    }
    assert!(!out.contains("acknowledged by"), "{out}");
    assert!(
        out.contains(" CET") || out.contains(" CEST"),
        "times with a zone:\n{out}"
    );
    assert!(
        !out.contains('\x1b'),
        "no colour codes off a terminal:\n{out}"
    );

    let (code, out, err) = run(vec!["show", "2"]).await.unwrap();
    assert_eq!(code, 0, "{err}");
    for expected in [
        "custom_details: ",
        "2400",
        "links: ",
        "https://grafana.example.com/d/checkout",
    ] {
        assert!(out.contains(expected), "{expected:?} not in:\n{out}");
    }

    let (code, out, err) = run(vec!["list"]).await.unwrap();
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("ASSIGNEE") && out.contains("SNOOZED UNTIL"),
        "{out}"
    );
    let row = out.lines().find(|l| l.starts_with("#1 ")).expect("row #1");
    assert!(row.contains("snoozed") && row.contains(" bob "), "{row}");
    assert!(
        row.matches(" CET").count() + row.matches(" CEST").count() == 2,
        "{row}"
    );
    assert!(!out.contains('\x1b'), "{out}");

    // JSON: the documented fields.
    let (code, out, err) = run(vec!["list", "--output", "json"]).await.unwrap();
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).expect(&out);
    let one = v["incidents"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["number"] == 1)
        .expect("#1 listed")
        .clone();
    for field in [
        "number",
        "id",
        "title",
        "status",
        "severity",
        "labels",
        "alerts_firing",
        "alerts_total",
        "opened_at",
        "acknowledged_at",
        "acknowledged_by",
        "snoozed_until",
        "resolved_at",
        "assignee",
        "reopen_count",
        "suppressed",
    ] {
        assert!(one.get(field).is_some(), "{field} missing in {one}");
    }
    assert_eq!(one["status"], "snoozed");
    assert_eq!(one["assignee"], "bob");
    assert!(
        one["snoozed_until"].as_str().unwrap().ends_with('Z'),
        "{one}"
    );
    let (code, out, err) = run(vec!["show", "1", "-o", "json"]).await.unwrap();
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).expect(&out);
    assert_eq!(v["escalate_reason"], "no progress");
    assert_eq!(
        v["alerts"][0]["annotations"]["runbook_url"],
        "https://runbooks.example.com/disk"
    );
    assert_eq!(
        v["alerts"][0]["generator_url"],
        "https://prometheus.example.com/graph?g0.expr=disk"
    );
    let events: Vec<&str> = v["timeline"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["event"].as_str().unwrap())
        .collect();
    assert!(
        events.contains(&"opened") && events.contains(&"paged") && events.contains(&"snoozed"),
        "{events:?}"
    );
    for e in v["timeline"].as_array().unwrap() {
        for field in ["at", "event", "actor", "text"] {
            assert!(e.get(field).is_some(), "{field} missing in {e}");
        }
    }

    // Silences: add, list (text and JSON), expire.
    let (code, out, err) = run(vec![
        "silence",
        "add",
        "service=payments",
        "severity=~\"high|critical\"",
        "--for",
        "2h",
        "--comment",
        "maintenance",
        "--as",
        "carol",
    ])
    .await
    .unwrap();
    assert_eq!(code, 0, "{err}");
    let id = out.lines().last().unwrap().trim().to_string();
    assert!(out.contains("created"), "{out}");
    let (code, out, err) = run(vec!["silence", "list"]).await.unwrap();
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains(&id)
            && out.contains("active")
            && out.contains("service=\"payments\"")
            && out.contains("maintenance"),
        "{out}"
    );
    let (code, out, err) = run(vec!["silence", "list", "--output", "json"])
        .await
        .unwrap();
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).expect(&out);
    let s = &v["silences"][0];
    assert_eq!(s["id"], id.as_str());
    assert_eq!(s["state"], "active");
    assert_eq!(s["matchers"][1], "severity=~\"high|critical\"");
    assert_eq!(s["created_by"], "carol");
    assert_eq!(s["comment"], "maintenance");
    for field in ["starts_at", "ends_at"] {
        assert!(s[field].is_string(), "{field} in {s}");
    }
    let expire: &'static str = Box::leak(id.clone().into_boxed_str());
    let (code, out, err) = run(vec!["silence", "expire", expire]).await.unwrap();
    assert_eq!(code, 0, "{out}{err}");
    let (code, _, err) = run(vec!["silence", "expire", "no-such-silence"])
        .await
        .unwrap();
    assert_eq!(code, 1, "{err}");
    let (code, _, err) = run(vec!["silence", "add", "service", "--for", "2h"])
        .await
        .unwrap();
    assert_eq!(code, 2, "a bad matcher is a usage error: {err}");
    assert!(err.contains("invalid matcher"), "{err}");

    // Completions for three shells.
    for shell in ["bash", "zsh", "fish"] {
        let (code, out, err) = run(vec!["completions", shell]).await.unwrap();
        assert_eq!(code, 0, "{err}");
        assert!(
            out.contains("silence") && out.contains("snooze"),
            "{shell}: {out}"
        );
    }
}

/// `tocsin show` lists a runbook's steps with their outcome, duration and
/// output.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn show_lists_runbook_steps_with_their_output() {
    use tocsin_tests::remediation::{has, wait_timeline, Runbooks};
    let nats = NatsServer::start().await;
    let rb = Runbooks::new();
    rb.add(
        "echo",
        "name: echo\nmatch: {labels: ['alertname=\"Echo\"']}\nsteps:\n  - id: hello\n    exec: {argv: [/bin/echo, \"hello {{labels.host}}\"]}\n  - id: noisy\n    exec: {argv: [/usr/bin/printf, 'clear \\033[2J title \\033]0;x\\007 done']}\n",
    );
    let config =
        tocsin_tests::remediation::config(&nats, &rb.path(), &["/bin/echo", "/usr/bin/printf"]);
    let tocsin_up = TocsinHarness::start_with(config).await;
    let client = nats.client().await;
    post_alerts(
        &tocsin_up,
        r#"[{"labels":{"alertname":"Echo","host":"web1"}}]"#,
    )
    .await;
    wait_timeline(&client, 1, "the run", |tl| has(tl, "run", "succeeded")).await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("tocsin.yaml");
    std::fs::write(&cfg, format!("nats:\n  url: {}\n", nats.url())).unwrap();
    let (code, out, err) = tokio::task::spawn_blocking(move || tocsin(&cfg, &["show", "1"]))
        .await
        .unwrap();
    assert_eq!(code, 0, "{err}");
    for expected in [
        "remediation echo/run started: runbook echo: 2 step(s)",
        "remediation echo/hello succeeded: exec hello: exit 0 in ",
        "stdout: hello web1",
        // A program's output is shown, never sent to the terminal as it is.
        r"stdout: clear \e[2J title \e]0;x\u{7} done",
        "remediation echo/run succeeded: runbook echo succeeded by echo (runbook)",
    ] {
        assert!(out.contains(expected), "{expected:?} not in:\n{out}");
    }
    assert!(
        !out.chars().any(|c| c.is_control() && c != '\n'),
        "a control character in:\n{out:?}"
    );
}
