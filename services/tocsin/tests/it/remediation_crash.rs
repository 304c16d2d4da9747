//! Durable runs: a real `tocsin remediation` process is killed with SIGKILL
//! in the middle of two runs and started again. The run whose
//! non-idempotent `exec` step was in flight fails safe (rollback, then
//! escalate, said on the timeline) and runs that step no second time; the
//! run that was in a repeatable step resumes; no completed step runs twice.
//! The recording program appends its argv to a file per runbook.

use crate::support::start_remediation;
use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use tocsin_proto::{incident::EventKind, AlertStatus};
use tocsin_tests::{
    incidents::{alert, publish_alert},
    remediation::{has, steps, wait_timeline, Runbooks},
    NatsServer, TocsinHarness,
};

fn lines(p: &Path) -> Vec<String> {
    std::fs::read_to_string(p)
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

async fn until_recorded(p: &Path, line: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !lines(p).iter().any(|l| l == line) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{line:?} never recorded in {}: {:?}",
            p.display(),
            lines(p)
        );
        // Poll interval of a wait for something to happen (with a deadline), not a wait to prove that nothing did.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_run_resumes_or_fails_safe_and_runs_no_step_twice() {
    let nats = NatsServer::start().await;
    let tocsin = TocsinHarness::start(&nats).await;
    let rb = Runbooks::new();
    let rec = rb.recorder();
    let crashy_out: PathBuf = rb.dir.path().join("crashy.txt");
    let resumable_out: PathBuf = rb.dir.path().join("resumable.txt");
    rb.add(
        "crashy",
        &format!(
            r#"
name: crashy
match: {{labels: ['alertname="Crashy"']}}
steps:
  - id: one
    exec: {{argv: ["{rec}", one], env: {{RECORD_TO: "{out}"}}}}
  - id: two
    exec: {{argv: ["{rec}", two], env: {{RECORD_TO: "{out}", SLEEP: "10"}}}}
  - id: three
    exec: {{argv: ["{rec}", three], env: {{RECORD_TO: "{out}"}}}}
rollback:
  - id: undo
    exec: {{argv: ["{rec}", undo], env: {{RECORD_TO: "{out}"}}}}
"#,
            rec = rec.display(),
            out = crashy_out.display()
        ),
    );
    rb.add(
        "resumable",
        &format!(
            r#"
name: resumable
match: {{labels: ['alertname="Resumable"']}}
steps:
  - id: first
    exec: {{argv: ["{rec}", first], env: {{RECORD_TO: "{out}"}}}}
  - id: settle
    wait: 3s
  - id: last
    exec: {{argv: ["{rec}", last], env: {{RECORD_TO: "{out}"}}}}
"#,
            rec = rec.display(),
            out = resumable_out.display()
        ),
    );
    let config = rb.dir.path().join("tocsin.yaml");
    std::fs::write(
        &config,
        format!(
            "nats:\n  url: {}\n  credentials:\n    remediation: {{user: remediation, password: {}}}\nremediation:\n  runbook_dirs: [\"{}\"]\n  allowed_programs: [\"{}\"]\n  ack_wait: 2s\n",
            nats.address(),
            nats.password("remediation"),
            rb.path().display(),
            rec.display()
        ),
    )
    .unwrap();

    let client = nats.client().await;
    let js = async_nats::jetstream::new(client.clone());
    let log1 = rb.dir.path().join("first.log");
    let mut child = start_remediation(&config, &log1);
    // The consumer starts with new events: open the incidents once it is there.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(s) = js.get_stream("INCIDENTS").await {
            if s.consumer_info("tocsin-remediation").await.is_ok() {
                break;
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no consumer; log: {}",
            std::fs::read_to_string(&log1).unwrap_or_default()
        );
        // Poll interval of a wait for something to happen (with a deadline), not a wait to prove that nothing did.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let t0 = tocsin.clock_now();
    for name in ["Crashy", "Resumable"] {
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
    // Mid-run: crashy's `two` is running (recorded, then sleeping);
    // resumable's `first` is done and it waits in `settle`. Done means in
    // its run record, not only in the file it writes: a kill between the
    // two finds `first` in flight, and a step that is not idempotent is
    // then failed safe instead of resumed (seen once in dev.sh test). The
    // timeline entry of a step is published after its record is saved.
    until_recorded(&crashy_out, "two").await;
    until_recorded(&resumable_out, "first").await;
    wait_timeline(&client, 2, "resumable's first step recorded", |tl| {
        has(tl, "first", "succeeded")
    })
    .await;
    child.kill().expect("SIGKILL");
    child.wait().unwrap();

    let log2 = rb.dir.path().join("second.log");
    let mut child = start_remediation(&config, &log2);
    // The incidents service takes ALERTS in order: Crashy opened #1.
    let (crashy, resumable) = (1, 2);
    let tl = wait_timeline(&client, crashy, "crashy to fail safe", |tl| {
        tl.iter()
            .any(|e| matches!(e.kind, EventKind::Escalated { .. }))
    })
    .await;
    let s = steps(&tl);
    assert!(has(&tl, "run", "resumed"), "{s:#?}");
    let two = s
        .iter()
        .find(|(_, st, status, _)| st == "two" && status == "failed")
        .unwrap_or_else(|| panic!("{s:#?}"));
    assert!(
        two.3.contains("was in flight when the process running it stopped; it is not idempotent, so it is not run again"),
        "{}",
        two.3
    );
    assert!(has(&tl, "undo", "succeeded"), "{s:#?}");
    assert!(has(&tl, "run", "failed"), "{s:#?}");
    let reason = tl
        .iter()
        .find_map(|e| match &e.kind {
            EventKind::Escalated { reason } => Some(reason.clone()),
            _ => None,
        })
        .unwrap();
    assert!(
        reason.contains("runbook crashy failed at step two"),
        "{reason}"
    );
    assert_eq!(lines(&crashy_out), ["one", "two", "undo"]);

    let tl = wait_timeline(&client, resumable, "resumable to finish", |tl| {
        has(tl, "run", "succeeded")
    })
    .await;
    assert!(has(&tl, "run", "resumed"), "{:#?}", steps(&tl));
    assert_eq!(lines(&resumable_out), ["first", "last"]);

    child.kill().unwrap();
    child.wait().unwrap();
}
