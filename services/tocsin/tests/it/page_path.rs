//! The page path under real conditions: real `tocsin` processes, every
//! channel configured at once (email through a real SMTP server),
//! production-like rate limits, and the fakes counting every request.

use std::{collections::BTreeMap, time::Duration};

use tocsin_proto::notify::Channel;
use tocsin_tests::{
    fakes::{FakeProviders, Provider},
    notifier::{page, publish_pages},
    smtp::SmtpSink,
    NatsServer,
};

use crate::support::{
    alert, free_port, full_config, post_alerts, wait_paged_everywhere, Proc, Setup,
};

const WAIT: Duration = Duration::from_secs(60);

/// Email configured -> the binary must start: `check-config`, `tocsin up`
/// and `tocsin notifier` with every channel configured (the SMTP transport
/// was once built before the runtime existed, and every command aborted).
/// Then one critical alert pages on every channel, email included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_channel_configured_starts_and_pages_everywhere() {
    let nats = NatsServer::start().await;
    let fakes = FakeProviders::start().await;
    let smtp = SmtpSink::start().await;
    let dir = tempfile::tempdir().unwrap();
    let ingest = free_port();
    let config = full_config(&nats, &fakes, &smtp, ingest, dir.path(), &Setup::default());

    let out = std::process::Command::new(crate::support::bin())
        .arg("check-config")
        .arg(&config)
        .env("TOCSIN_INGEST_TOKEN", crate::support::TOKEN)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "check-config with every channel: {:?}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );

    // The notifier alone starts too.
    let mut alone = Proc::start(&config, dir.path(), &["notifier"]);
    alone.ready().await;
    alone.stop();

    let mut up = Proc::start(&config, dir.path(), &["up"]);
    up.ready().await;
    post_alerts(ingest, &serde_json::json!([alert("DiskFull", "firing")])).await;
    wait_paged_everywhere(&fakes, WAIT, || up.log_text()).await;
    let mails = smtp.wait_for(1, WAIT).await;
    assert_eq!(mails.len(), 1, "{}", up.log_text());
    // What the page carries: the alert that fired (its instance), where
    // it came from and its runbook; times with their zone.
    let text = &mails[0].text;
    for want in [
        "instance=DiskFull-host:9100",
        "https://prometheus.example.com/graph",
        "Runbook:   https://runbooks.example.com/DiskFull",
        "DiskFull is down",
        " UTC",
    ] {
        assert!(
            text.contains(want),
            "{want:?} missing from the email:\n{text}"
        );
    }
    let slack = fakes
        .slack_posts()
        .into_iter()
        .find(|p| p.channel == "C0INCIDENTS")
        .unwrap();
    let shown = slack.body.to_string();
    assert!(shown.contains("DiskFull-host:9100"), "{shown}");
    assert!(shown.contains("runbooks.example.com/DiskFull"), "{shown}");
    // "level 1", as the docs number levels.
    let sms = &fakes.sms()[0];
    assert!(sms.body.chars().count() <= 160, "{}", sms.body);
    assert!(sms.body.contains("DiskFull-host"), "{}", sms.body);
    up.stop();
}

/// Pages waiting behind a rate limit longer than `ack_wait` are sent once:
/// 20 SMS at 2 per second take 10 s, five times the 2 s `ack_wait`, and
/// more pages than the notifier handles at once wait on the bus. (Pages
/// waiting behind the limit were redelivered, and both copies sent.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pages_waiting_on_a_rate_limit_are_sent_exactly_once() {
    let nats = NatsServer::start().await;
    let fakes = FakeProviders::start().await;
    let smtp = SmtpSink::start().await;
    let dir = tempfile::tempdir().unwrap();
    let setup = Setup {
        sms_guard: Some("{timeout: 3s, rate_per_second: 2, burst: 1}".into()),
        notifier_extra: "ack_wait: 2s\nconcurrency: 4\n".into(),
        ..Setup::default()
    };
    let config = full_config(&nats, &fakes, &smtp, free_port(), dir.path(), &setup);
    let mut notifier = Proc::start(&config, dir.path(), &["notifier"]);
    notifier.ready().await;
    let js = async_nats::jetstream::new(nats.client().await);
    let pages: Vec<_> = (1..=20u64).map(|n| page(n, Channel::Sms)).collect();
    publish_pages(&js, &pages).await;

    // Done when NOTIFY is empty: every page acknowledged.
    let deadline = tokio::time::Instant::now() + WAIT;
    while tocsin_tests::bus::count_without_markers(&js, "NOTIFY").await > 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{}",
            notifier.log_text()
        );
        // Poll interval of a wait for something to happen (with a deadline), not a wait to prove that nothing did.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let sms = fakes.sms();
    let mut per_number: BTreeMap<String, usize> = BTreeMap::new();
    for s in &sms {
        *per_number.entry(s.to.clone()).or_default() += 1;
    }
    let twice: Vec<_> = per_number.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "the same page twice: {twice:?}");
    assert_eq!(sms.len(), 20);
    assert_eq!(fakes.requests(Provider::Twilio), 20, "one request per page");
    notifier.stop();
}

/// One rate-limited channel delays only itself: with PagerDuty at 1 event
/// per second, the SMS and Slack pages of the same burst go out at their
/// own (much higher) rates. Measured by order, not by clock: when the last
/// SMS and Slack page arrive, PagerDuty has had fewer than half its pages.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rate_limited_channel_delays_only_itself() {
    let nats = NatsServer::start().await;
    let fakes = FakeProviders::start().await;
    let smtp = SmtpSink::start().await;
    let dir = tempfile::tempdir().unwrap();
    let ingest = free_port();
    let setup = Setup {
        pagerduty_guard: Some("{timeout: 3s, rate_per_second: 1, burst: 1}".into()),
        sms_guard: Some("{timeout: 3s, rate_per_second: 20}".into()),
        slack_guard: Some("{timeout: 3s, rate_per_second: 20}".into()),
        // Few pages at once per replica: one limit must not take them all.
        notifier_extra: "concurrency: 2\n".into(),
        ..Setup::default()
    };
    let config = full_config(&nats, &fakes, &smtp, ingest, dir.path(), &setup);
    let mut up = Proc::start(&config, dir.path(), &["up"]);
    up.ready().await;
    const N: usize = 16;
    let alerts: Vec<_> = (0..N)
        .map(|i| alert(&format!("Burst{i}"), "firing"))
        .collect();
    let t0 = std::time::Instant::now();
    post_alerts(ingest, &serde_json::Value::Array(alerts)).await;

    // Every SMS (one per incident) and Slack page (two per incident).
    assert!(
        fakes
            .wait_for(
                |f| f.sms().len() >= N && f.slack_posts().len() >= 2 * N,
                WAIT
            )
            .await,
        "sms {} slack {}\n{}",
        fakes.sms().len(),
        fakes.slack_posts().len(),
        up.log_text()
    );
    let pd_then = fakes.pagerduty_events().len();
    let when = |p: Provider| {
        fakes
            .timeline(p)
            .iter()
            .map(|r| format!("{:.1}", r.received_at.duration_since(t0).as_secs_f64()))
            .collect::<Vec<_>>()
            .join(" ")
    };
    eprintln!(
        "arrivals (s after the post): sms [{}]\nslack [{}]\npagerduty [{}]",
        when(Provider::Twilio),
        when(Provider::Slack),
        when(Provider::PagerDuty)
    );
    assert!(
        pd_then < N / 2,
        "SMS and Slack waited for PagerDuty: {pd_then} of {N} PagerDuty events had gone out when the last SMS and Slack page arrived"
    );
    // PagerDuty's own pages all arrive, once each.
    assert!(
        fakes
            .wait_for(|f| f.pagerduty_events().len() >= N, WAIT)
            .await,
        "{}",
        up.log_text()
    );
    assert_eq!(fakes.pagerduty_alerts().len(), N);
    assert_eq!(fakes.sms().len(), N);
    up.stop();
}

/// A resolve never lands after a reopen. Page, stop the notifier, resolve
/// and fire again (the incident reopens and pages again), start the
/// notifier: PagerDuty and Slack must show the incident triggered, as
/// Tocsin does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resolve_then_refire_while_the_notifier_is_down_ends_triggered_everywhere() {
    let nats = NatsServer::start().await;
    let fakes = FakeProviders::start().await;
    let smtp = SmtpSink::start().await;
    let dir = tempfile::tempdir().unwrap();
    let ingest = free_port();
    let config = full_config(&nats, &fakes, &smtp, ingest, dir.path(), &Setup::default());
    let mut ingest_p = Proc::start(&config, dir.path(), &["ingest"]);
    let mut incidents = Proc::start(&config, dir.path(), &["incidents"]);
    let mut escalation = Proc::start(&config, dir.path(), &["escalation"]);
    let mut notifier = Proc::start(&config, dir.path(), &["notifier"]);
    for p in [
        &mut ingest_p,
        &mut incidents,
        &mut escalation,
        &mut notifier,
    ] {
        p.ready().await;
    }
    post_alerts(ingest, &serde_json::json!([alert("Flappy", "firing")])).await;
    assert!(
        fakes
            .wait_for(
                |f| f.pagerduty_alerts().len() == 1 && f.slack_posts().len() == 2,
                WAIT
            )
            .await,
        "{}",
        notifier.log_text()
    );
    notifier.stop();

    post_alerts(ingest, &serde_json::json!([alert("Flappy", "resolved")])).await;
    let client = nats.client().await;
    tocsin_tests::incidents::wait_for(&client, "resolved", |l| {
        l.iter()
            .any(|i| i.status == tocsin_proto::incident::IncidentStatus::Resolved)
    })
    .await;
    post_alerts(ingest, &serde_json::json!([alert("Flappy", "firing")])).await;
    tocsin_tests::incidents::wait_for(&client, "reopened", |l| {
        l.iter().any(|i| {
            i.status == tocsin_proto::incident::IncidentStatus::Triggered && i.reopen_count == 1
        })
    })
    .await;
    // The reopened incident's pages are on NOTIFY before the notifier is back.
    let js = async_nats::jetstream::new(client.clone());
    let deadline = tokio::time::Instant::now() + WAIT;
    while tocsin_tests::bus::count_without_markers(&js, "NOTIFY").await == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no pages for the reopen"
        );
        // Poll interval of a wait for something to happen (with a deadline), not a wait to prove that nothing did.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    notifier.restart();
    notifier.ready().await;
    // Settled: every page sent and every change handled.
    assert!(
        fakes.wait_for(|f| f.slack_posts().len() == 4, WAIT).await,
        "{}",
        notifier.log_text()
    );
    tocsin_tests::notifier::settled(&js, WAIT).await;

    let pd = fakes.pagerduty_alerts();
    assert_eq!(pd.len(), 1, "one PagerDuty alert (one dedup key)");
    assert_eq!(
        pd[0].status,
        "triggered",
        "PagerDuty shows the reopened incident as {}; events: {:#?}",
        pd[0].status,
        fakes.pagerduty_events()
    );
    // The newest Slack messages (the reopen's pages) show it open: red, with buttons.
    let posts = fakes.slack_posts();
    for p in &posts[2..] {
        let now = fakes
            .slack_message(&p.channel, &p.ts)
            .expect("the message is there");
        assert!(
            now.to_string().contains("tocsin_ack"),
            "message {} no longer has an Acknowledge button: {now}",
            p.ts
        );
    }
    for p in [
        &mut ingest_p,
        &mut incidents,
        &mut escalation,
        &mut notifier,
    ] {
        p.stop();
    }
}

/// The quick start shows a page: the shipped config, as `./deploy/dev.sh
/// up` runs it (only the NATS address, passwords and ports differ), opens
/// an incident for an alert and writes each page, rendered as Slack, SMS
/// and email would have received it, to the console file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shipped_config_starts_and_shows_the_first_page() {
    let nats = NatsServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (ingest, chatops) = (free_port(), free_port());
    let shipped = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../config/tocsin.yaml");
    let text = std::fs::read_to_string(shipped)
        .unwrap()
        .replace(
            "listen: 127.0.0.1:8080",
            &format!("listen: 127.0.0.1:{ingest}"),
        )
        .replace(
            "listen: 127.0.0.1:8082",
            &format!("listen: 127.0.0.1:{chatops}"),
        );
    std::fs::create_dir_all(dir.path().join("config")).unwrap();
    let config = dir.path().join("config/tocsin.yaml");
    std::fs::write(&config, text).unwrap();
    let mut cmd_env = vec![("TOCSIN_NATS_URL".to_string(), nats.address())];
    for who in tocsin_tests::tocsin::SERVICES {
        cmd_env.push((
            tocsin_tests::nats::password_variable(who),
            nats.password(who).to_string(),
        ));
    }
    let mut up = Proc::start_with_env(&config, dir.path(), &["up"], &cmd_env);
    up.ready().await;
    post_alerts(
        ingest,
        &serde_json::json!([{"labels": {"alertname": "DiskFull", "severity": "critical", "instance": "db1:9100"},
                             "annotations": {"summary": "/var is 97% full"}}]),
    )
    .await;
    let pages = dir.path().join(".tocsin/pages.txt");
    let deadline = tokio::time::Instant::now() + WAIT;
    let text = loop {
        let t = std::fs::read_to_string(&pages).unwrap_or_default();
        if t.contains("sms to ") && t.contains("email to ") && t.contains("slack to #incidents") {
            break t;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no pages in {}:\n{t}\n{}",
            pages.display(),
            up.log_text()
        );
        // Poll interval of a wait for something to happen (with a deadline), not a wait to prove that nothing did.
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(text.contains("INC-1"), "{text}");
    assert!(text.contains("/var is 97% full"), "{text}");
    assert!(
        text.contains("Reply ACK 1"),
        "the SMS as it would be sent: {text}"
    );
    assert!(
        text.contains("Subject: [CRITICAL] INC-1"),
        "the email: {text}"
    );
    up.stop();
}
