//! `tocsin report` against running services: a known set of incidents
//! with chosen times, figures computed by hand, the JSON output checked
//! field by field and the text output read; and the MTTA/MTTR histograms
//! on `/metrics`.

use std::process::Command;

use jiff::{SignedDuration, Timestamp};
use serde_json::Value;
use tocsin_proto::{
    command::{Action, Command as Cmd, IncidentRef},
    incident::{Actor, IncidentSummary},
    AlertStatus,
};
use tocsin_tests::{
    chatops,
    fakes::FakeProviders,
    incidents::{alert, command, publish_alert, send_command, wait_for},
    NatsServer, TocsinHarness,
};

const BIN: &str = env!("CARGO_BIN_EXE_tocsin");

fn secs(s: i64) -> SignedDuration {
    SignedDuration::from_secs(s)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn report_figures_match_a_known_set_of_incidents() {
    let nats = NatsServer::start().await;
    let fakes = FakeProviders::start().await;
    let mut config = TocsinHarness::config(&nats);
    config.chatops = Some(chatops::config(&fakes));
    let tocsin = TocsinHarness::start_with(config).await;
    let client = nats.client().await;
    let js = async_nats::jetstream::new(client.clone());
    let t0 = tocsin.clock_now();
    // D: midnight UTC two days ago; nights are 22:00-07:00 UTC (defaults).
    let d = Timestamp::from_second((t0.as_second() / 86_400 - 2) * 86_400).unwrap();
    let at = |h: i64, m: i64| d + secs(h * 3600 + m * 60);
    let fire = |name: &'static str,
                service: &'static str,
                sev: &'static str,
                inst: &'static str,
                t: Timestamp| {
        let js = js.clone();
        async move {
            publish_alert(
                &js,
                alert(
                    &[
                        ("alertname", name),
                        ("service", service),
                        ("severity", sev),
                        ("instance", inst),
                    ],
                    &["alertname", "service", "instance"],
                    AlertStatus::Firing,
                    t,
                ),
                t,
            )
            .await;
        }
    };
    let find = |l: &[IncidentSummary], inst: &str| -> u64 {
        l.iter()
            .find(|i| i.labels.get("instance").map(String::as_str) == Some(inst))
            .unwrap()
            .number
    };
    let act = |n: u64,
               who: (&'static str, &'static str),
               action: fn(IncidentRef) -> Action,
               t: Timestamp| {
        let (client, js) = (client.clone(), js.clone());
        async move {
            let cmd = Cmd::new(Actor::new(who.0, who.1), action(IncidentRef::Number(n)));
            let r = send_command(&client, &js, cmd, t).await;
            assert!(
                matches!(r, tocsin_proto::command::CommandReply::Accepted { .. }),
                "{r:?}"
            );
        }
    };
    let paged = |n: u64, pages: &[&str], t: Timestamp| {
        let (client, js) = (client.clone(), js.clone());
        let pages: Vec<String> = pages.iter().map(|s| s.to_string()).collect();
        async move {
            let action = Action::Paged {
                incident: IncidentRef::Number(n),
                level: 1,
                repeat: 0,
                pages,
                reason: "test".into(),
                fired: None,
            };
            command(&client, &js, "escalation", action, t).await;
        }
    };
    let ack = |i: IncidentRef| Action::Ack { incident: i };
    let resolve = |i: IncidentRef| Action::Resolve { incident: i };

    // Outside the window: 40 days ago.
    fire("Old", "db", "critical", "old-1", t0 - secs(40 * 86_400)).await;
    // A: critical, db. Acked after 120 s, resolved after 600 s by alice.
    fire("DiskFull", "db", "critical", "db-1", at(1, 30)).await;
    // B: high, api. Acked after 300 s, resolved after 1800 s by a runbook.
    fire("HighLatency", "api", "high", "api-1", at(14, 0)).await;
    // C: high, api. Acked after 60 s, still open.
    fire("HighLatency", "api", "high", "api-2", at(20, 0)).await;
    let l = wait_for(&client, "four incidents", |l| l.len() == 4).await;
    let (old, a, b, c) = (
        find(&l, "old-1"),
        find(&l, "db-1"),
        find(&l, "api-1"),
        find(&l, "api-2"),
    );
    // Pages (sent before the acknowledgements, as escalation would): alice at 01:31 (night of D-1) by SMS and email (one page),
    // bob at 14:01 (day), alice at 23:30 (night of D).
    paged(
        a,
        &["alice via sms", "alice via email", "#ops via slack"],
        at(1, 31),
    )
    .await;
    paged(
        b,
        &[
            "bob (on call for primary) via sms",
            "PagerDuty service api via pagerduty",
        ],
        at(14, 1),
    )
    .await;
    paged(
        c,
        &["alice (on call for primary) via sms after 300s"],
        at(23, 30),
    )
    .await;

    act(old, ("alice", "cli"), ack, t0 - secs(40 * 86_400 - 10)).await;
    act(a, ("alice", "slack"), ack, at(1, 32)).await;
    act(a, ("alice", "slack"), resolve, at(1, 40)).await;
    act(b, ("bob", "sms"), ack, at(14, 5)).await;
    act(b, ("restart-api", "runbook"), resolve, at(14, 30)).await;
    act(c, ("alice", "api"), ack, at(20, 1)).await;
    // The CLI, as an operator would run it (the admin's URL carries credentials).
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("tocsin.yaml");
    std::fs::write(&cfg, format!("nats:\n  url: {}\n", nats.url())).unwrap();
    let run = |args: &'static [&'static str]| {
        let cfg = cfg.clone();
        tokio::task::spawn_blocking(move || {
            let out = Command::new(BIN)
                .arg("--config")
                .arg(&cfg)
                .args(args)
                .output()
                .unwrap();
            (
                out.status.code().unwrap_or(-1),
                String::from_utf8_lossy(&out.stdout).into_owned(),
                String::from_utf8_lossy(&out.stderr).into_owned(),
            )
        })
    };
    let (code, out, err) = run(&["report", "--since", "30d", "--output", "json"])
        .await
        .unwrap();
    assert_eq!(code, 0, "{err}");
    let r: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(r["incidents"], 3, "{r:#}");
    assert_eq!(r["truncated"], false);
    assert_eq!(
        r["by_severity"],
        serde_json::json!([{"severity": "critical", "incidents": 1}, {"severity": "high", "incidents": 2}])
    );
    // MTTA over 120, 300, 60: mean 160, nearest-rank p50 120, p90 300.
    assert_eq!(
        r["mtta"],
        serde_json::json!({"count": 3, "mean_seconds": 160, "p50_seconds": 120, "p90_seconds": 300})
    );
    // MTTR over 600, 1800: mean 1200, p50 600, p90 1800.
    assert_eq!(
        r["mttr"],
        serde_json::json!({"count": 2, "mean_seconds": 1200, "p50_seconds": 600, "p90_seconds": 1800})
    );
    assert_eq!(r["resolved"], 2);
    assert_eq!(r["resolved_by_runbook"], 1);
    assert_eq!(r["runbook_share_permille"], 500);
    let api = &r["by_service"][0];
    assert_eq!(api["service"], "api");
    assert_eq!(api["incidents"], 2);
    assert_eq!(api["mtta"]["mean_seconds"], 180);
    assert_eq!(api["mttr"]["mean_seconds"], 1800);
    assert_eq!(r["by_service"][1]["service"], "db");
    assert_eq!(r["by_service"][1]["mttr"]["mean_seconds"], 600);
    assert_eq!(
        r["noisiest_alerts"][0],
        serde_json::json!({"alertname": "HighLatency", "incidents": 2, "alerts": 2})
    );
    assert_eq!(
        r["noisiest_alerts"][1],
        serde_json::json!({"alertname": "DiskFull", "incidents": 1, "alerts": 1})
    );
    assert_eq!(
        r["oncall_load"],
        serde_json::json!([{"user": "alice", "pages": 2, "nights_woken": 2}, {"user": "bob", "pages": 1, "nights_woken": 0}])
    );
    for field in ["since", "until"] {
        assert!(
            r[field].as_str().unwrap().parse::<Timestamp>().is_ok(),
            "{field}"
        );
    }

    let (code, out, err) = run(&["report"]).await.unwrap();
    assert_eq!(code, 0, "{err}");
    for expected in [
        "total: 3",
        "MTTA: mean 2m 40s",
        "p90 5m 00s",
        "MTTR: mean 20m 00s",
        "by a runbook: 1 (50.0%)",
        "HighLatency",
        "alice",
        "2 nights woken",
    ] {
        assert!(out.contains(expected), "{expected:?} not in:\n{out}");
    }

    // The histograms: every acknowledgement and resolution, by service and severity.
    let m = tocsin.metrics().await;
    for line in [
        "tocsin_incidents_time_to_acknowledge_seconds_count{service=\"api\",severity=\"high\"} 2",
        "tocsin_incidents_time_to_acknowledge_seconds_count{service=\"db\",severity=\"critical\"} 2",
        "tocsin_incidents_time_to_resolve_seconds_count{service=\"api\",severity=\"high\"} 1",
        "tocsin_incidents_time_to_resolve_seconds_sum{service=\"api\",severity=\"high\"} 1800.0",
    ] {
        assert!(m.contains(line), "{line} not in /metrics:\n{m}");
    }

    // Without chat-ops running, the CLI says what is missing.
    tocsin.stop().await.unwrap();
    let (code, _, err) = run(&["report"]).await.unwrap();
    assert_eq!(code, 3);
    assert!(err.contains("chatops"), "{err}");
}
