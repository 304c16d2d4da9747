//! End to end behind a real Prometheus Alertmanager, as production runs
//! it: a nats-server with a user per service, every Tocsin service as its
//! own `tocsin <service>` process (each given only its own NATS password),
//! the Slack/PagerDuty/Twilio/webhook fakes, a real SMTP server, and
//! Alertmanager with a `webhook_configs` receiver pointing at ingest with a
//! bearer token. Alerts go into Alertmanager's own API (`POST
//! /api/v2/alerts`) as Prometheus sends them. The remediation process runs
//! the shipped `demo-heal` runbook against `tocsin demo-target`: when the
//! target breaks and its alert comes through Alertmanager, the runbook
//! heals it and resolves the incident, and nobody is paged.
//!
//! The services run on the system clock, so nothing here waits for an
//! escalation delay: level 2 is 10 minutes away, and "escalation stopped"
//! is read from the escalation plan (the track paused, no level due).
//!
//! Alertmanager comes from `ALERTMANAGER_BIN`, else `alertmanager` or
//! `prometheus-alertmanager` (Debian's package) on the PATH;
//! `./deploy/dev.sh test` installs it when missing. Without it the test
//! fails saying how to install it: it never skips.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use serde_json::{json, Value};
use tocsin_proto::{
    codec,
    command::IncidentRef,
    incident::{EventKind, IncidentStatus, IncidentSummary},
    notify::slack_actions,
    query::{GetIncident, ListIncidents, PlanQuery, PlanReply, QueryReply, TrackStatus},
    subjects::query,
};
use tocsin_tests::{
    chatops::{block_actions_body, post_slack, SLACK_SECRET},
    fakes::{FakeProviders, SlackPost},
    nats::password_variable,
    smtp::SmtpSink,
    tocsin::SERVICES,
    NatsServer,
};

use crate::support::{
    free_port, full_config, own_credentials, wait_paged_everywhere, Proc, Setup, TOKEN,
};

/// Deadline of every wait (generous: a loaded 2-core machine runs seven
/// processes here; a passing run takes a few seconds).
const WAIT: Duration = Duration::from_secs(60);

/// Level 1 pages alice (SMS, email and Slack DM at once for a critical
/// incident), #incidents, PagerDuty and the `teams` webhook; level 2 (bob)
/// follows 10 minutes later if nobody acknowledges.
const POLICY: &str = r##"
route:
  policy: checkout
policies:
  - name: checkout
    levels:
      - targets: [{user: alice}, {slack_channel: C0INCIDENTS}, {pagerduty_service: payments}, {webhook: teams}]
        delay: 10m
      - targets: [{user: bob}]
        delay: 10m
users:
  - {name: alice, email: alice@example.com, phone: "+14155550101", slack: U01ALICE}
  - {name: bob, email: bob@example.com, phone: "+14155550102", slack: U01BOB}
"##;

const INSTALL_HINT: &str = "install Prometheus Alertmanager: `./deploy/dev.sh deps` \
    (as root with apt-get it installs Debian's prometheus-alertmanager), \
    `apt-get install prometheus-alertmanager`, or a release from \
    https://github.com/prometheus/alertmanager/releases with ALERTMANAGER_BIN \
    set to its binary";

/// `ALERTMANAGER_BIN`, else `alertmanager` or `prometheus-alertmanager` on
/// the PATH; panics saying how to install it.
fn alertmanager_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("ALERTMANAGER_BIN") {
        let p = PathBuf::from(p);
        assert!(
            p.is_file(),
            "ALERTMANAGER_BIN={} is not a file; {INSTALL_HINT}",
            p.display()
        );
        return p;
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    for name in ["alertmanager", "prometheus-alertmanager"] {
        if let Some(p) = std::env::split_paths(&path)
            .map(|d| d.join(name))
            .find(|p| p.is_file())
        {
            return p;
        }
    }
    panic!("Prometheus Alertmanager not found (ALERTMANAGER_BIN unset, neither alertmanager nor prometheus-alertmanager on the PATH); {INSTALL_HINT}");
}

/// A real Alertmanager of its own: a free port, its own storage in a temp
/// dir, no cluster gossip. Killed on drop.
struct Alertmanager {
    child: Child,
    port: u16,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Alertmanager {
    /// Starts Alertmanager sending every alert to `webhook` with `token`
    /// as bearer, and waits until it is ready. Groups are sent 1 s after
    /// their first alert and changes every second, so it runs in seconds.
    async fn start(webhook: &str, token: &str) -> Alertmanager {
        let bin = alertmanager_bin();
        let dir = tempfile::Builder::new()
            .prefix("tocsin-alertmanager-")
            .tempdir()
            .unwrap();
        let config = dir.path().join("alertmanager.yml");
        std::fs::write(
            &config,
            format!(
                r#"# Alerts carry their own endsAt (as Prometheus sends them), so the
# resolve timeout never applies; long, so nothing resolves by itself.
global:
  resolve_timeout: 1h
route:
  receiver: tocsin
  group_by: [alertname, service]
  group_wait: 1s
  group_interval: 1s
  repeat_interval: 1h
receivers:
  - name: tocsin
    webhook_configs:
      - url: {webhook}
        send_resolved: true
        http_config:
          authorization:
            credentials: {token}
"#
            ),
        )
        .unwrap();
        let port = free_port();
        let log = dir.path().join("alertmanager.log");
        let out = std::fs::File::create(&log).unwrap();
        let child = Command::new(&bin)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            // Empty: no cluster, no gossip port.
            .arg("--cluster.listen-address=")
            .arg("--log.level=debug")
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}; {INSTALL_HINT}", bin.display()));
        let mut am = Alertmanager {
            child,
            port,
            log,
            _dir: dir,
        };
        let client = reqwest::Client::new();
        let url = format!("http://127.0.0.1:{port}/-/ready");
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            if let Ok(r) = client.get(&url).send().await {
                if r.status() == 200 {
                    return am;
                }
            }
            if let Ok(Some(status)) = am.child.try_wait() {
                panic!("alertmanager exited with {status}:\n{}", am.log_text());
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "alertmanager not ready:\n{}",
                am.log_text()
            );
            // Poll interval of a wait for something to happen (with a deadline), not a wait to prove that nothing did.
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `POST /api/v2/alerts`, as Prometheus sends alerts.
    async fn push(&self, alerts: Value) {
        let r = reqwest::Client::new()
            .post(format!("http://127.0.0.1:{}/api/v2/alerts", self.port))
            .json(&alerts)
            .send()
            .await
            .expect("alertmanager answers");
        let status = r.status();
        assert_eq!(
            status,
            200,
            "alertmanager refused the alerts: {}",
            r.text().await.unwrap_or_default()
        );
    }

    /// Alertmanager's own view of its alerts (`GET /api/v2/alerts`).
    async fn alerts(&self) -> Value {
        reqwest::Client::new()
            .get(format!("http://127.0.0.1:{}/api/v2/alerts", self.port))
            .send()
            .await
            .expect("alertmanager answers")
            .json()
            .await
            .expect("alertmanager answers JSON")
    }
}

impl Drop for Alertmanager {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The alert as Prometheus sends it: firing until `ends_at` (Prometheus
/// sets it a few evaluation intervals ahead and sends it again; here an
/// hour ahead, so it cannot lapse on a slow machine), resolved once
/// `ends_at` is in the past.
fn checkout_alert(starts_at: jiff::Timestamp, ends_at: jiff::Timestamp) -> Value {
    json!([{
        "labels": {
            "alertname": "CheckoutDown",
            "service": "checkout",
            "severity": "critical",
            "instance": "checkout-1:9100",
        },
        "annotations": {
            "summary": "checkout is not answering",
            "runbook_url": "https://runbooks.example.com/CheckoutDown",
        },
        "startsAt": starts_at.to_string(),
        "endsAt": ends_at.to_string(),
        "generatorURL": "https://prometheus.example.com/graph?g0.expr=up%7Bjob%3D%22checkout%22%7D%3D%3D0",
    }])
}

/// The config: NATS with a user per service (each password from its own
/// variable), ingest, incidents (a 2 s group wait, so a runbook that holds
/// pages records its hold first), escalation by [`POLICY`], the notifier
/// with every channel at the fakes and the SMTP server, chat-ops with
/// Slack's signing secret, and remediation with the shipped `demo-heal`
/// runbook aimed at the demo target on `demo`.
fn config(
    nats: &NatsServer,
    fakes: &FakeProviders,
    smtp: &SmtpSink,
    ports: (u16, u16, u16),
    dir: &Path,
) -> PathBuf {
    let (ingest, chatops, demo) = ports;
    let setup = Setup {
        escalation: POLICY.to_string(),
        ..Setup::default()
    };
    let path = full_config(nats, fakes, smtp, ingest, dir, &setup);
    // Each service with its own NATS user (each process gets only its own
    // password, below).
    own_credentials(&path, nats, &SERVICES);
    let mut text = std::fs::read_to_string(&path).unwrap();
    let incidents = format!("incidents:\n  data_dir: {}/incidents\n", dir.display());
    assert!(text.contains(&incidents), "{text}");
    text = text.replace(&incidents, &format!("{incidents}  group_wait: 2s\n"));
    // The shipped runbook as it is, but for where the demo target listens.
    let runbooks = dir.join("runbooks");
    std::fs::create_dir_all(&runbooks).unwrap();
    let shipped = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../runbooks/demo-heal.yaml"),
    )
    .unwrap();
    assert!(shipped.contains("target: http://127.0.0.1:9477"));
    std::fs::write(
        runbooks.join("demo-heal.yaml"),
        shipped.replace(
            "target: http://127.0.0.1:9477",
            &format!("target: http://127.0.0.1:{demo}"),
        ),
    )
    .unwrap();
    text.push_str(&format!(
        "remediation:\n  runbook_dirs: [\"{}\"]\n",
        runbooks.display()
    ));
    text.push_str(&format!(
        "chatops:\n  listen: 127.0.0.1:{chatops}\n  slack:\n    signing_secret: ${{TOCSIN_SLACK_SIGNING_SECRET}}\n    response_url_prefixes: [\"{}/slack/actions/\"]\n",
        fakes.base_url()
    ));
    std::fs::write(&path, text).unwrap();
    path
}

/// The value of the button `action_id` on a posted page.
fn button_value(post: &SlackPost, action_id: &str) -> String {
    post.body["attachments"][0]["blocks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|b| b["type"] == "actions")
        .flat_map(|b| b["elements"].as_array().unwrap().clone())
        .find(|e| e["action_id"] == action_id)
        .and_then(|e| e["value"].as_str().map(str::to_string))
        .expect("the button is on the page")
}

/// Polls the escalation plan of `incident` until `done` holds.
async fn plan_until(
    client: &async_nats::Client,
    incident: uuid::Uuid,
    what: &str,
    done: impl Fn(&PlanReply) -> bool,
) -> PlanReply {
    let done = &done;
    tocsin_tests::eventually_within(WAIT, || async move {
        let reply = client
            .request(
                query::ESCALATION_PLAN,
                codec::encode(&PlanQuery { incident }).unwrap().into(),
            )
            .await
            .ok()
            .and_then(|r| codec::decode::<PlanReply>(&r.payload).ok());
        match reply {
            Some(r) if done(&r) => Ok(r),
            other => Err(other),
        }
    })
    .await
    .unwrap_or_else(|last| panic!("{what}: the escalation plan is {last:?}"))
}

/// Polls the incident list until `done` holds; panics after [`WAIT`]
/// with what it saw last and every log.
async fn incidents_until(
    client: &async_nats::Client,
    what: &str,
    done: impl Fn(&[IncidentSummary]) -> bool,
    procs: &[Proc],
    am: &Alertmanager,
) -> Vec<IncidentSummary> {
    let q = ListIncidents {
        limit: Some(100),
        ..Default::default()
    };
    let (q, done) = (&q, &done);
    let seen = tocsin_tests::eventually_within(WAIT, || async move {
        let answer = client
            .request(query::LIST_INCIDENTS, codec::encode(q).unwrap().into())
            .await
            .ok()
            .and_then(|r| codec::decode::<QueryReply>(&r.payload).ok());
        match answer {
            Some(QueryReply::Incidents { incidents, .. }) if done(&incidents) => Ok(incidents),
            Some(QueryReply::Incidents { incidents, .. }) => Err(incidents),
            _ => Err(Vec::new()),
        }
    })
    .await;
    seen.unwrap_or_else(|last| {
        panic!(
            "{what} did not happen within {WAIT:?}; incidents: {last:?}{}",
            logs(procs, am)
        )
    })
}

/// Every process's log, for a failure message.
fn logs(procs: &[Proc], am: &Alertmanager) -> String {
    let mut s = String::new();
    for p in procs {
        s.push_str(&format!("\n----- {}\n{}", p.log.display(), p.log_text()));
    }
    s.push_str(&format!("\n----- alertmanager\n{}", am.log_text()));
    s
}

/// Alertmanager -> ingest -> incident -> pages on every channel; a signed
/// Slack button press acknowledges, escalation pauses (level 2 is no
/// longer due), Slack and PagerDuty show the acknowledgement; the alert
/// resolves in Prometheus's way (pushed again with `endsAt` in the past),
/// Alertmanager sends its resolved notification, the incident resolves
/// and the resolved notices go out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alertmanager_to_resolved_with_every_service_a_separate_process() {
    let t_start = std::time::Instant::now();
    let nats = NatsServer::start().await;
    let fakes = FakeProviders::start().await;
    let smtp = SmtpSink::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (ingest_port, chatops_port, demo_port) = (free_port(), free_port(), free_port());
    let config = config(
        &nats,
        &fakes,
        &smtp,
        (ingest_port, chatops_port, demo_port),
        dir.path(),
    );

    // Each service its own process, with only its own NATS password.
    // (Every process gets the Slack signing secret: a `${VAR}` outside
    // `nats.credentials` is read by every service that loads the file.)
    let mut procs: Vec<Proc> = SERVICES
        .iter()
        .map(|who| {
            let env = [
                (password_variable(who), nats.password(who).to_string()),
                (
                    "TOCSIN_SLACK_SIGNING_SECRET".to_string(),
                    SLACK_SECRET.to_string(),
                ),
            ];
            Proc::start_with_env(&config, dir.path(), &[who], &env)
        })
        .collect();
    for p in procs.iter_mut() {
        p.ready().await;
    }
    // The demo target (`tocsin demo-target`), healthy for now.
    let mut demo = std::process::Command::new(crate::support::bin())
        .args(["demo-target", "--listen", &format!("127.0.0.1:{demo_port}")])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start tocsin demo-target");
    let am = Alertmanager::start(
        &format!("http://127.0.0.1:{ingest_port}/api/v1/alerts/alertmanager"),
        TOKEN,
    )
    .await;
    let ready_after = t_start.elapsed();

    // Prometheus fires.
    let starts_at = jiff::Timestamp::now() - jiff::SignedDuration::from_secs(30);
    am.push(checkout_alert(
        starts_at,
        jiff::Timestamp::now() + jiff::SignedDuration::from_secs(3600),
    ))
    .await;
    let client = nats.client().await;
    let inc =
        incidents_until(&client, "the incident", |l| l.len() == 1, &procs, &am).await[0].clone();
    assert_eq!(inc.status, IncidentStatus::Triggered);
    assert_eq!(
        inc.labels.get("service").map(String::as_str),
        Some("checkout")
    );

    // Pages on every channel the policy names: alice by SMS, email and
    // Slack DM, #incidents, PagerDuty, the webhook.
    wait_paged_everywhere(&fakes, WAIT, || logs(&procs, &am)).await;
    let mails = smtp.wait_for(1, WAIT).await;
    assert_eq!(mails.len(), 1, "email page{}", logs(&procs, &am));
    assert_eq!(mails[0].rcpt_tos, vec!["alice@example.com".to_string()]);
    assert!(
        mails[0].text.contains("checkout-1:9100"),
        "{}",
        mails[0].text
    );
    assert_eq!(fakes.sms()[0].to, "+14155550101");
    assert_eq!(fakes.pagerduty_events()[0]["event_action"], "trigger");
    let posts = fakes.slack_posts();
    let channel_post = posts
        .iter()
        .find(|p| p.channel == "C0INCIDENTS")
        .expect("a page in #incidents")
        .clone();
    assert!(
        channel_post
            .body
            .to_string()
            .contains("runbooks.example.com/CheckoutDown"),
        "{}",
        channel_post.body
    );
    // Nobody has acknowledged: level 2 (bob) is due in 10 minutes.
    plan_until(&client, inc.id, "level 2 pending", |r| {
        matches!(r, PlanReply::Plan { tracks, .. }
            if tracks.len() == 1
                && tracks[0].status == TrackStatus::Pending
                && tracks[0].next_level == 1
                && tracks[0].next_at.is_some())
    })
    .await;

    // alice presses Acknowledge in #incidents: a request signed as Slack
    // signs it, to the chat-ops process.
    let value = button_value(&channel_post, slack_actions::ACK);
    assert_eq!(value, inc.id.to_string());
    let body = block_actions_body(
        "U01ALICE",
        slack_actions::ACK,
        &value,
        &fakes.slack_response_url(1),
    );
    let now_unix = jiff::Timestamp::now().as_second();
    let r = post_slack(
        &format!("http://127.0.0.1:{chatops_port}/slack/actions"),
        &body,
        now_unix,
    )
    .await;
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap_or_default());
    let acked = incidents_until(
        &client,
        "the acknowledgement",
        |l| l[0].status == IncidentStatus::Acknowledged,
        &procs,
        &am,
    )
    .await;
    let by = acked[0].acknowledged_by.clone().unwrap();
    assert_eq!((by.name.as_str(), by.via.as_str()), ("alice", "slack"));

    // Escalation stopped: the track is paused, no level is due.
    plan_until(&client, inc.id, "escalation paused", |r| {
        matches!(r, PlanReply::Plan { tracks, .. }
            if !tracks.is_empty()
                && tracks.iter().all(|t| t.status == TrackStatus::Paused && t.next_at.is_none()))
    })
    .await;

    // Slack's message is updated in place, PagerDuty acknowledged.
    assert!(
        fakes
            .wait_for(
                |f| {
                    f.slack_updates().iter().any(|u| {
                        u.ts == channel_post.ts
                            && u.body.to_string().contains("Acknowledged by alice")
                    }) && f
                        .pagerduty_events()
                        .iter()
                        .any(|e| e["event_action"] == "acknowledge")
                },
                WAIT
            )
            .await,
        "no chat.update or PagerDuty acknowledge: updates {:?} pagerduty {:?}{}",
        fakes.slack_updates(),
        fakes.pagerduty_events(),
        logs(&procs, &am)
    );

    // Prometheus resolves: the alert again, its end in the past.
    am.push(checkout_alert(
        starts_at,
        jiff::Timestamp::now() - jiff::SignedDuration::from_secs(1),
    ))
    .await;
    let resolved = incidents_until(
        &client,
        "the resolve",
        |l| l[0].status == IncidentStatus::Resolved,
        &procs,
        &am,
    )
    .await;
    assert_eq!(resolved.len(), 1, "the same incident, resolved");
    assert_eq!(resolved[0].id, inc.id);

    // The resolved notices: both Slack messages show it resolved,
    // PagerDuty resolves its alert, the webhook gets the resolve.
    assert!(
        fakes
            .wait_for(
                |f| {
                    f.pagerduty_alerts().iter().all(|a| a.status == "resolved")
                        && f.pagerduty_alerts().len() == 1
                        && f.slack_posts().iter().all(|p| {
                            f.slack_message(&p.channel, &p.ts).is_some_and(|m| {
                                let m = m.to_string();
                                m.contains("[RESOLVED]") && !m.contains(slack_actions::ACK)
                            })
                        })
                        && f.webhooks().len() >= 3
                },
                WAIT
            )
            .await,
        "resolved notices: pagerduty {:?} slack {:?} webhooks {}{}",
        fakes.pagerduty_alerts(),
        fakes
            .slack_posts()
            .iter()
            .map(|p| fakes.slack_message(&p.channel, &p.ts))
            .collect::<Vec<_>>(),
        fakes.webhooks().len(),
        logs(&procs, &am)
    );
    let js = async_nats::jetstream::new(client.clone());
    tocsin_tests::notifier::settled(&js, WAIT).await;
    // Settled: one page per channel and target, no level 2 (bob was never
    // paged), no second SMS or email (those channels take no updates).
    assert_eq!(fakes.sms().len(), 1, "{:?}", fakes.sms());
    assert_eq!(smtp.messages().len(), 1);
    assert_eq!(fakes.slack_posts().len(), 2);
    let pd: Vec<String> = fakes
        .pagerduty_events()
        .iter()
        .map(|e| e["event_action"].as_str().unwrap_or_default().to_string())
        .collect();
    assert_eq!(pd, ["trigger", "acknowledge", "resolve"]);
    let webhooks_before = fakes.webhooks().len();
    // Everything came in through Alertmanager's webhook: its firing and
    // its resolved notification (at least; Alertmanager retries a request
    // that timed out on a slow machine, and JetStream drops the copy).
    let metrics = reqwest::get(format!("http://127.0.0.1:{}/metrics", procs[0].admin))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let accepted: u64 = metrics
        .lines()
        .find_map(|l| {
            l.strip_prefix(
                "tocsin_ingest_requests_total{endpoint=\"alertmanager\",outcome=\"accepted\"} ",
            )
        })
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0);
    assert!(accepted >= 2, "{metrics}");
    // Alertmanager sees the alert resolved too.
    let am_alerts = am.alerts().await;
    assert!(
        am_alerts
            .as_array()
            .is_some_and(|a| a.iter().all(|x| x["status"]["state"] != "active")),
        "{am_alerts}"
    );

    // A failure a runbook knows: the demo target breaks, Prometheus fires
    // DemoTargetDown through Alertmanager; `demo-heal` holds the pages,
    // repairs the target, checks it and resolves the incident. Nobody is
    // paged: once everything settled, the providers hold exactly what they
    // held before.
    let http = reqwest::Client::new();
    let demo_url = format!("http://127.0.0.1:{demo_port}");
    tocsin_tests::eventually_within(WAIT, || async {
        match http.post(format!("{demo_url}/break")).send().await {
            Ok(r) if r.status() == 200 => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await
    .expect("the demo target breaks");
    am.push(json!([{
        "labels": {"alertname": "DemoTargetDown", "service": "demo-target", "severity": "critical"},
        "annotations": {"summary": "the demo target's /health is failing"},
        "startsAt": (jiff::Timestamp::now() - jiff::SignedDuration::from_secs(10)).to_string(),
        "endsAt": (jiff::Timestamp::now() + jiff::SignedDuration::from_secs(3600)).to_string(),
    }]))
    .await;
    let healed = incidents_until(
        &client,
        "the runbook resolving the demo incident",
        |l| {
            l.iter().any(|i| {
                i.labels.get("alertname").map(String::as_str) == Some("DemoTargetDown")
                    && i.status == IncidentStatus::Resolved
            })
        },
        &procs,
        &am,
    )
    .await;
    let demo_incident = healed
        .iter()
        .find(|i| i.labels.get("alertname").map(String::as_str) == Some("DemoTargetDown"))
        .unwrap()
        .clone();
    let health = http
        .get(format!("{demo_url}/health"))
        .send()
        .await
        .expect("the demo target answers");
    assert_eq!(health.status(), 200, "the runbook repaired the target");
    let detail = client
        .request(
            query::GET_INCIDENT,
            codec::encode(&GetIncident {
                incident: IncidentRef::Id(demo_incident.id),
                timeline: true,
            })
            .unwrap()
            .into(),
        )
        .await
        .expect("the incidents service answers");
    let Ok(QueryReply::Incident(detail)) = codec::decode::<QueryReply>(&detail.payload) else {
        panic!("no detail for the demo incident");
    };
    let steps: Vec<(String, String)> = detail
        .timeline
        .iter()
        .filter_map(|e| match &e.kind {
            EventKind::Remediation { step, status, .. } => Some((step.clone(), status.clone())),
            _ => None,
        })
        .collect();
    for (step, status) in [
        ("run", "held"),
        ("repair", "succeeded"),
        ("verify", "succeeded"),
    ] {
        assert!(
            steps.iter().any(|(s, st)| s == step && st == status),
            "no {step} {status} on the timeline: {steps:?}{}",
            logs(&procs, &am)
        );
    }
    assert!(
        !detail
            .timeline
            .iter()
            .any(|e| matches!(e.kind, EventKind::Paged { .. })),
        "the demo incident paged: {:?}",
        detail.timeline
    );
    tocsin_tests::notifier::settled(&js, WAIT).await;
    assert_eq!(fakes.sms().len(), 1, "{:?}", fakes.sms());
    assert_eq!(smtp.messages().len(), 1);
    assert_eq!(fakes.slack_posts().len(), 2);
    assert_eq!(fakes.pagerduty_events().len(), 3);
    assert_eq!(fakes.webhooks().len(), webhooks_before);
    let _ = demo.kill();
    let _ = demo.wait();

    eprintln!(
        "alertmanager end to end: {:.1} s ({:.1} s to start the processes)",
        t_start.elapsed().as_secs_f64(),
        ready_after.as_secs_f64()
    );
    for p in procs.iter_mut() {
        p.stop();
    }
}
