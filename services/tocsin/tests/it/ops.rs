//! `tocsin ack 1`, `resolve`, `list`, `show` against running services.

use std::process::Command;

use tocsin_tests::{http, incidents::wait_for, NatsServer, TocsinHarness};

const BIN: &str = env!("CARGO_BIN_EXE_tocsin");

fn tocsin(config: &std::path::Path, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(BIN)
        .arg("--config")
        .arg(config)
        .args(args)
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
    let a = http::post(
        &reqwest::Client::new(),
        &format!("{}/api/v1/alerts", tocsin_up.ingest_url),
        Some(&tocsin_up.token),
        r#"[{"labels":{"alertname":"QueueBacklog","queue":"billing","severity":"P1"},"annotations":{"summary":"billing queue backlog > 10k"}}]"#,
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.text);
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

    let (code, _, err) = run(&["show", "7"]).await.unwrap();
    assert_eq!(code, 3);
    assert!(err.contains("no incident #7"), "{err}");
    // With the shipped config, an operator needs NATS's address and the
    // operator's NATS password, and none of the services' secrets.
    let shipped = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../config/tocsin.yaml");
    let out = Command::new(BIN)
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
        "schedules:\n  - name: primary\n    timezone: UTC\n    layers: [{name: daily, participants: [alice, bob], rotation: daily, handoff: \"09:00\", start: 2026-01-05}]\nusers:\n  - {name: alice, email: a@example.com}\n  - {name: bob, email: b@example.com}\n",
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
        (all, one, bad)
    })
    .await
    .unwrap();
    let ((c1, all, e1), (c2, one, e2), (c3, _, e3)) = out;
    assert_eq!(c1, 0, "{e1}");
    assert!(
        all.starts_with("primary: alice until 2026-01-06T09:00:00Z"),
        "{all}"
    );
    assert!(all.contains("then bob from 2026-01-06T09:00:00Z"), "{all}");
    assert_eq!(c2, 0, "{e2}");
    assert!(one.starts_with("primary: bob"), "{one}");
    assert_eq!(c3, 3);
    assert!(e3.contains("tertiary") && e3.contains("primary"), "{e3}");
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
        "name: echo\nmatch: {labels: ['alertname=\"Echo\"']}\nsteps:\n  - id: hello\n    exec: {argv: [/bin/echo, \"hello {{labels.host}}\"]}\n",
    );
    let config = tocsin_tests::remediation::config(&nats, &rb.path(), &["/bin/echo"]);
    let tocsin_up = TocsinHarness::start_with(config).await;
    let client = nats.client().await;
    let a = http::post(
        &reqwest::Client::new(),
        &format!("{}/api/v1/alerts", tocsin_up.ingest_url),
        Some(&tocsin_up.token),
        r#"[{"labels":{"alertname":"Echo","host":"web1"}}]"#,
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.text);
    wait_timeline(&client, 1, "the run", |tl| has(tl, "run", "succeeded")).await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("tocsin.yaml");
    std::fs::write(&cfg, format!("nats:\n  url: {}\n", nats.url())).unwrap();
    let (code, out, err) = tokio::task::spawn_blocking(move || tocsin(&cfg, &["show", "1"]))
        .await
        .unwrap();
    assert_eq!(code, 0, "{err}");
    for expected in [
        "remediation echo/run started: runbook echo: 1 step(s)",
        "remediation echo/hello succeeded: exec hello: exit 0 in ",
        "stdout: hello web1",
        "remediation echo/run succeeded: runbook echo succeeded by echo (runbook)",
    ] {
        assert!(out.contains(expected), "{expected:?} not in:\n{out}");
    }
}
