//! `tocsin runbook run|approve|deny|disable|enable`: the real binary, as
//! the operator NATS user, against services in-process on the test kit's
//! nats-server. Exit codes: 0 done, 1 refused (unknown runbook or run, a
//! run not waiting), 2 usage; `--output json` for programs.

use std::{path::Path, process::Command};

use async_nats::jetstream;
use tocsin_proto::AlertStatus;
use tocsin_tests::{
    incidents::{alert, publish_alert},
    remediation::{config, has, steps, wait_timeline, waiting_run, Runbooks},
    NatsServer, TocsinHarness,
};

fn tocsin(config: &Path, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(crate::support::bin())
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
async fn runbook_run_approve_deny_disable_and_the_kill_switch_from_the_command_line() {
    let nats = NatsServer::start().await;
    let rb = Runbooks::new();
    let rec = rb.recorder();
    let out = rb.record_file();
    rb.add(
        "gated",
        &format!(
            r#"
name: gated
match: {{labels: ['alertname="Gated"']}}
guardrails:
  require_approval: {{timeout: 15m}}
steps:
  - id: restart
    exec: {{argv: ["{rec}", gated], env: {{RECORD_TO: "{out}"}}}}
"#,
            rec = rec.display(),
            out = out.display()
        ),
    );
    rb.add(
        "echo",
        &format!(
            r#"
name: echo
match: {{labels: ['alertname="Echo"']}}
steps:
  - id: hello
    exec: {{argv: ["{rec}", "echo {{{{labels.alertname}}}}"], env: {{RECORD_TO: "{out}"}}}}
"#,
            rec = rec.display(),
            out = out.display()
        ),
    );
    let programs = [rec.to_str().unwrap()];
    let tocsin_up = TocsinHarness::start_with(config(&nats, &rb.path(), &programs)).await;
    let client = nats.client().await;
    let js = jetstream::new(client.clone());
    let t0 = tocsin_up.clock_now();
    for name in ["Gated", "Other"] {
        publish_alert(
            &js,
            alert(
                &[("alertname", name)],
                &["alertname"],
                AlertStatus::Firing,
                t0,
            ),
            t0,
        )
        .await;
    }
    let tl = wait_timeline(&client, 1, "the wait for approval", |tl| {
        waiting_run(tl).is_some()
    })
    .await;
    let run = waiting_run(&tl).unwrap();

    // The operator's NATS user, as an operator's config names it.
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("tocsin.yaml");
    std::fs::write(
        &cfg,
        format!(
            "nats:\n  url: {}\n  credentials:\n    operator: {{user: operator, password: {}}}\n",
            nats.address(),
            nats.password("operator")
        ),
    )
    .unwrap();
    let run_cli = |args: Vec<String>| {
        let cfg = cfg.clone();
        tokio::task::spawn_blocking(move || {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            tocsin(&cfg, &args)
        })
    };
    let args = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();

    // Not a run id: usage (2). A run id nobody started: refused (1).
    let (code, _, err) = run_cli(args(&["runbook", "approve", "bogus"]))
        .await
        .unwrap();
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("is not a run id"), "{err}");
    let other = format!("{}.gated.999999", run.split('.').next().unwrap());
    let (code, _, err) = run_cli(args(&["runbook", "approve", &other]))
        .await
        .unwrap();
    assert_eq!(code, 1, "{err}");
    assert!(err.contains(&format!("no run {other}")), "{err}");
    // A run id of a run started by an entry stored with others (its place
    // in the message after the sequence) is a run id too.
    let packed = format!("{other}.3");
    let (code, _, err) = run_cli(args(&["runbook", "approve", &packed]))
        .await
        .unwrap();
    assert_eq!(code, 1, "{err}");
    assert!(err.contains(&format!("no run {packed}")), "{err}");

    // Approve: it runs.
    let (code, stdout, err) = run_cli(args(&["runbook", "approve", &run, "--as", "alice"]))
        .await
        .unwrap();
    assert_eq!(code, 0, "{err}");
    assert!(stdout.contains("it runs now"), "{stdout}");
    let tl = wait_timeline(&client, 1, "the approved run", |tl| {
        has(tl, "run", "succeeded")
    })
    .await;
    assert!(
        steps(&tl)
            .iter()
            .any(|(_, s, st, d)| s == "run" && st == "approved" && d.contains("alice (cli)")),
        "{:#?}",
        steps(&tl)
    );
    // Deciding again: the run does not wait any more (1).
    let (code, _, err) = run_cli(args(&["runbook", "deny", &run])).await.unwrap();
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("is succeeded, not waiting for approval"),
        "{err}"
    );

    // A runbook by hand, on an incident its match does not take (#2):
    // refused while disabled (the run is skipped, saying by whom), runs
    // once enabled; the kill switch skips it too.
    let (code, _, err) = run_cli(args(&["runbook", "run", "nope", "--incident", "2"]))
        .await
        .unwrap();
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("no runbook \"nope\" is loaded"), "{err}");
    let (code, stdout, err) = run_cli(args(&[
        "runbook", "disable", "echo", "--as", "carol", "-o", "json",
    ]))
    .await
    .unwrap();
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(
        (v["runbook"].as_str(), v["disabled"].as_bool()),
        (Some("echo"), Some(true)),
        "{v}"
    );
    let (code, _, err) = run_cli(args(&["runbook", "run", "echo", "--incident", "2"]))
        .await
        .unwrap();
    assert_eq!(code, 0, "{err}");
    let tl = wait_timeline(&client, 2, "the skipped run", |tl| {
        has(tl, "run", "skipped")
    })
    .await;
    assert!(
        steps(&tl)
            .iter()
            .any(|(_, _, st, d)| st == "skipped" && d == "runbook echo is disabled by carol"),
        "{:#?}",
        steps(&tl)
    );
    let (code, _, err) = run_cli(args(&["runbook", "enable", "echo"])).await.unwrap();
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = run_cli(args(&["runbook", "disable", "--all", "--as", "carol"]))
        .await
        .unwrap();
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = run_cli(args(&["runbook", "run", "echo", "--incident", "#2"]))
        .await
        .unwrap();
    assert_eq!(code, 0, "{err}");
    wait_timeline(&client, 2, "the run the kill switch skips", |tl| {
        steps(tl).iter().any(|(_, _, st, d)| {
            st == "skipped" && d == "remediation is switched off (kill switch) by carol"
        })
    })
    .await;
    let (code, _, err) = run_cli(args(&["runbook", "enable", "--all"]))
        .await
        .unwrap();
    assert_eq!(code, 0, "{err}");
    let (code, stdout, err) = run_cli(args(&[
        "runbook",
        "run",
        "echo",
        "--incident",
        "2",
        "--as",
        "dave",
    ]))
    .await
    .unwrap();
    assert_eq!(code, 0, "{err}");
    assert!(stdout.contains("recorded on incident #2"), "{stdout}");
    let tl = wait_timeline(&client, 2, "the manual run", |tl| {
        has(tl, "run", "succeeded")
    })
    .await;
    assert!(
        steps(&tl).iter().any(|(_, s, st, d)| s == "run"
            && st == "started"
            && d.contains("started by hand by dave (cli)")),
        "{:#?}",
        steps(&tl)
    );
    assert_eq!(rb.recorded(), ["gated", "echo Other"]);
    // Unknown names are refused by the service that keeps the switches.
    let (code, _, err) = run_cli(args(&["runbook", "disable", "nope"]))
        .await
        .unwrap();
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("no runbook \"nope\" is loaded"), "{err}");
}
