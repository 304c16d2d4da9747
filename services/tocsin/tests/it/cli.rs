//! The `tocsin` binary itself: check-config errors, and SIGTERM mid-burst.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::Arc,
    time::Duration,
};

use tocsin_tests::{bus, ports::free_port, NatsServer};
use tokio::sync::Mutex;

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Runs `tocsin check-config FILE` with `env`; returns (exit code, stdout, stderr).
fn check_config(file: &Path, env: &[(&str, &str)]) -> (i32, String, String) {
    let mut cmd = Command::new(crate::support::bin());
    cmd.arg("check-config")
        .arg(file)
        .env_remove("TOCSIN_INGEST_TOKEN");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("run tocsin");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

const VALID: &str = "\
nats:
  url: nats://127.0.0.1:4222
ingest:
  listen: 127.0.0.1:8080
  tokens:
    - source: alertmanager
      token: ${TOCSIN_INGEST_TOKEN}
";

#[test]
fn shipped_config_is_valid() {
    let file = repo_root().join("config/tocsin.yaml");
    // The services' NATS passwords (nats.credentials); not the operator's,
    // which only operator commands read.
    let (code, stdout, stderr) = check_config(
        &file,
        &[
            ("TOCSIN_INGEST_TOKEN", "0123456789abcdef0123"),
            ("TOCSIN_NATS_INGEST_PASSWORD", "p0123456789abcdef"),
            ("TOCSIN_NATS_INCIDENTS_PASSWORD", "p0123456789abcdef"),
            ("TOCSIN_NATS_ESCALATION_PASSWORD", "p0123456789abcdef"),
            ("TOCSIN_NATS_NOTIFIER_PASSWORD", "p0123456789abcdef"),
            ("TOCSIN_NATS_CHATOPS_PASSWORD", "p0123456789abcdef"),
            ("TOCSIN_NATS_REMEDIATION_PASSWORD", "p0123456789abcdef"),
        ],
    );
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains(": ok"), "{stdout}");
}

#[test]
fn config_errors_name_file_line_and_reason() {
    let dir = tempfile::tempdir().unwrap();
    let token = ("TOCSIN_INGEST_TOKEN", "0123456789abcdef0123");
    // (file contents, env, expected "file:line", expected reason fragment)
    type Case<'a> = (&'a str, &'a [(&'a str, &'a str)], usize, &'a str);
    let cases: &[Case] = &[
        (
            "nats:\n  url: nats://x:4222\ningest:\n  tokens:\n    - source: am\n      token: ${TOCSIN_INGEST_TOKEN}\n  listn: 1.2.3.4:5\n",
            &[token],
            7,
            "unknown field `listn`",
        ),
        (VALID, &[], 7, "environment variable TOCSIN_INGEST_TOKEN is not set"),
        ("nats:\n  url: [unclosed\n", &[], 2, ""),
        ("nats:\n  url: nats://x\n   bad: indentation\n", &[], 3, ""),
        (
            "ingest:\n  publish_timeout: soon\n  tokens:\n    - source: am\n      token: ${TOCSIN_INGEST_TOKEN}\n",
            &[token],
            2,
            "ingest.publish_timeout: invalid duration",
        ),
        (
            "ingest:\n  tokens:\n    - source: am\n      token_file: missing-secret.txt\n",
            &[],
            4,
            "cannot read secret file",
        ),
        ("jetstream:\n  replicas: three\n", &[], 2, "jetstream.replicas: invalid type"),
        // Checks made once a section is read point at the key they name.
        (
            "nats:\n  url: nats://x:4222\ningest:\n  tokens:\n    - source: am\n      token: ${TOCSIN_INGEST_TOKEN}\n  idle_timeout: 0s\n",
            &[token],
            7,
            "ingest.idle_timeout is 0",
        ),
        (
            "ingest:\n  tokens:\n    - source: am\n      token: ${TOCSIN_INGEST_TOKEN}\n    - source: no good\n      token: abcdefabcdefabcdefabcdef\n",
            &[token],
            5,
            "ingest.tokens[1].source \"no good\" is not a valid name",
        ),
        (
            "ingest:\n  tokens:\n    - source: am\n      token: ${TOCSIN_INGEST_TOKEN}\nchatops:\n  listen: 127.0.0.1:8082\n  max_connections: 2\n",
            &[token],
            7,
            "chatops.max_connections is 2",
        ),
        (
            "ingest:\n  tokens:\n    - source: am\n      token: ${TOCSIN_INGEST_TOKEN}\nchatops:\n  status:\n    cache_for: 0s\n",
            &[token],
            7,
            "chatops.status.cache_for is 0ms; use at least 1s",
        ),
        (
            "ingest:\n  tokens:\n    - source: am\n      token: ${TOCSIN_INGEST_TOKEN}\nincidents:\n  group_wait: 0s\n  max_in_memory: 0\n",
            &[token],
            7,
            "max_in_memory is 0",
        ),
        // A slip of a unit (30d for 30s) would hold every page that long.
        (
            "ingest:\n  tokens:\n    - source: am\n      token: ${TOCSIN_INGEST_TOKEN}\nincidents:\n  reopen_window: 1h\n  group_wait: 30d\n",
            &[token],
            7,
            "incidents: group_wait is 30d; use at most 1h: every new incident waits that long before anyone is paged",
        ),
        (
            "ingest:\n  tokens:\n    - source: am\n      token: ${TOCSIN_INGEST_TOKEN}\nincidents:\n  group_by: ['...', alertname]\n",
            &[token],
            6,
            "incidents: group_by: \"...\" (every label) cannot be combined with other labels",
        ),
        // Out of range is refused, not quietly raised or lowered.
        (
            "ingest:\n  tokens:\n    - source: am\n      token: ${TOCSIN_INGEST_TOKEN}\nnotifier:\n  concurrency: 0\n",
            &[token],
            6,
            "notifier: concurrency is 0; use 1 to 8192",
        ),
        (
            "ingest:\n  tokens:\n    - source: am\n      token: ${TOCSIN_INGEST_TOKEN}\nnotifier:\n  ack_wait: 0s\n",
            &[token],
            6,
            "notifier: ack_wait is 0ms; use at least 1s",
        ),
        (
            "ingest:\n  tokens:\n    - source: am\n      token: ${TOCSIN_INGEST_TOKEN}\nnotifier:\n  records_kept_for: 0s\n",
            &[token],
            6,
            "notifier: records_kept_for is 0ms; use at least 1h",
        ),
        (
            "ingest:\n  tokens:\n    - source: am\n      token: ${TOCSIN_INGEST_TOKEN}\nnotifier:\n  retry:\n    initial: 0s\n",
            &[token],
            7,
            "notifier: retry.initial is 0ms; use at least 100ms",
        ),
        (
            "ingest:\n  tokens:\n    - source: am\n      token: ${TOCSIN_INGEST_TOKEN}\nnotifier:\n  retry:\n    initial: 10m\n    max: 2m\n",
            &[token],
            8,
            "notifier: retry.max (2m) is below retry.initial (10m)",
        ),
        (
            "ingest:\n  tokens:\n    - source: am\n      token: ${TOCSIN_INGEST_TOKEN}\nnotifier:\n  webhooks:\n    - name: teams\n      url: https://example.com/hook\n      guard: {timeout: 0s, burst: 0}\n",
            &[token],
            7,
            "notifier: webhook \"teams\": guard.timeout is 0ms; use 100ms to 10m",
        ),
        (
            "ingest:\n  tokens:\n    - source: am\n      token: ${TOCSIN_INGEST_TOKEN}\nnotifier:\n  webhooks:\n    - name: teams\n      url: https://example.com/hook\n      guard: {concurrency: 0, breaker: {failures: 0}}\n",
            &[token],
            7,
            "notifier: webhook \"teams\": guard.concurrency is 0; use at least 1",
        ),
        (
            "ingest:\n  tokens:\n    - source: am\n      token: ${TOCSIN_INGEST_TOKEN}\nremediation:\n  runbook_dirs: []\n  max_output_bytes: 10485760\n",
            &[token],
            7,
            "remediation: max_output_bytes is 10485760; use 64 to 1048576",
        ),
        (
            "ingest:\n  tokens:\n    - source: am\n      token: ${TOCSIN_INGEST_TOKEN}\nremediation:\n  lease_ttl: 0s\n",
            &[token],
            6,
            "remediation: lease_ttl is 0ms; use at least 1s",
        ),
        (
            "ingest:\n  tokens:\n    - source: am\n      token: ${TOCSIN_INGEST_TOKEN}\nremediation:\n  runs_kept_for: 10m\n",
            &[token],
            6,
            "remediation: runs_kept_for is 10m; use at least 1h",
        ),
    ];
    for (i, (text, env, line, reason)) in cases.iter().enumerate() {
        let file = write(dir.path(), &format!("case{i}.yaml"), text);
        let (code, _, stderr) = check_config(&file, env);
        assert_eq!(code, 2, "case {i}: {stderr}");
        let place = format!("{}:{line}:", file.display());
        assert!(
            stderr.starts_with(&place),
            "case {i}: expected {place} in {stderr}"
        );
        assert!(
            stderr.contains(reason),
            "case {i}: expected {reason:?} in {stderr}"
        );
    }

    // A config without an ingest section cannot run ingest.
    let file = write(
        dir.path(),
        "no-ingest.yaml",
        "nats:\n  url: nats://x:4222\n",
    );
    let (code, _, stderr) = check_config(&file, &[]);
    assert_eq!(code, 2);
    assert!(stderr.contains("no `ingest:` section"), "{stderr}");

    let (code, _, stderr) = check_config(&dir.path().join("nope.yaml"), &[]);
    assert_eq!(code, 2);
    assert!(stderr.contains("cannot read config file"), "{stderr}");
}

#[test]
fn escalation_mistakes_are_located_with_the_fix() {
    let dir = tempfile::tempdir().unwrap();
    let token = ("TOCSIN_INGEST_TOKEN", "0123456789abcdef0123");
    let base = "ingest:\n  tokens:\n    - source: am\n      token: ${TOCSIN_INGEST_TOKEN}\n";
    // (escalation section, expected line, expected fragments)
    let cases: &[(&str, usize, &[&str])] = &[
        // Settings that would page in a loop with no pause: reminders to
        // whoever acknowledged with no time between them, rounds of a
        // repeating policy that take no time.
        (
            "escalation:\n  route: {policy: p}\n  policies:\n    - name: p\n      renotify_acknowledged_after: 0s\n      levels: [{targets: [{user: a}]}]\n  users: [{name: a, email: a@example.com}]\n",
            8,
            &["policy \"p\": renotify_acknowledged_after is 0ms; use at least 1m"],
        ),
        (
            "escalation:\n  route: {policy: p}\n  policies:\n    - name: p\n      repeat: 3\n      levels:\n        - targets: [{user: a}]\n          delay: 20s\n          delay_by_severity: {critical: 0s}\n        - targets: [{user: a}]\n          delay: 30s\n  users: [{name: a, email: a@example.com}]\n",
            8,
            &["policy \"p\" repeats 3 times, but a round of its levels takes 30s for critical incidents; give its levels delays of at least 1m in all, or repeat: 0"],
        ),
        // A channel or a name where a user's Slack member ID belongs would
        // send their pages elsewhere.
        (
            "escalation:\n  route: {policy: p}\n  policies:\n    - name: p\n      levels: [{targets: [{user: a}]}]\n  users:\n    - name: a\n      slack: \"#general\"\n",
            12,
            &["user \"a\": slack \"#general\" is not a Slack member ID"],
        ),
        (
            "escalation:\n  route:\n    policy: web-oncall\n  policies:\n    - name: default\n      levels: [{targets: [{user: a}]}]\n  users: [{name: a, email: a@example.com}]\n",
            7,
            &["route names policy \"web-oncall\", which is not defined (defined: default)"],
        ),
        (
            "escalation:\n  schedules:\n    - name: primary\n      timezone: Europe/Berln\n      layers: []\n",
            8,
            &["Europe/Berln", "did you mean \"Europe/Berlin\""],
        ),
        (
            "escalation:\n  route: {policy: p}\n  policies:\n    - name: p\n      levels:\n        - targets: [{user: ghost}]\n  users: [{name: nobody, email: n@example.com}]\n",
            10,
            &["pages user \"ghost\", who is not defined (defined: nobody)"],
        ),
        (
            "escalation:\n  route: {policy: p}\n  policies:\n    - name: p\n      levels:\n        - targets: [{user: mute}]\n  users:\n    - name: mute\n",
            10,
            &["pages user \"mute\", who has no contact method; give them an email, phone or slack id"],
        ),
        // Calendars served beyond this machine say who is on call to
        // anyone: they need a token, and a long one.
        (
            "escalation:\n  calendar_listen: 0.0.0.0:8081\n  route: {policy: p}\n  policies:\n    - name: p\n      levels: [{targets: [{user: a}]}]\n  users: [{name: a, email: a@example.com}]\n",
            6,
            &["escalation.calendar_listen is 0.0.0.0:8081, reachable from other machines, and there is no calendar_token", "Set escalation.calendar_token", "or listen on 127.0.0.1"],
        ),
        (
            "escalation:\n  calendar_listen: 0.0.0.0:8081\n  calendar_token: short\n",
            7,
            &["the token is 5 characters; use at least 16"],
        ),
    ];
    for (i, (section, line, fragments)) in cases.iter().enumerate() {
        let file = write(
            dir.path(),
            &format!("esc{i}.yaml"),
            &format!("{base}{section}"),
        );
        let (code, _, stderr) = check_config(&file, &[token]);
        assert_eq!(code, 2, "case {i}: {stderr}");
        let place = format!("{}:{line}:", file.display());
        assert!(
            stderr.starts_with(&place),
            "case {i}: expected {place} in {stderr}"
        );
        for f in *fragments {
            assert!(stderr.contains(f), "case {i}: expected {f:?} in {stderr}");
        }
    }
}

/// Mistakes an operator meets first, each reported once at its own line:
/// a short token (not at the start of `ingest:`), a user defined twice
/// (at the second definition, without errors about the ignored copy), a
/// phone number that is not E.164, an email without `@`, and a
/// `tocsin_severity` matcher that names no severity.
#[test]
fn check_config_points_at_each_mistake_once() {
    let dir = tempfile::tempdir().unwrap();
    let token = ("TOCSIN_INGEST_TOKEN", "0123456789abcdef0123");
    let base = "ingest:\n  tokens:\n    - source: am\n      token: ${TOCSIN_INGEST_TOKEN}\n";
    let policy = "escalation:\n  route: {policy: p}\n  policies:\n    - name: p\n      levels:\n        - targets: [{user: alice}]\n";
    let secret = write(dir.path(), "short-secret", "tooshort\n");
    // (file, expected line, expected fragments, fragments that must not appear)
    let cases: Vec<(String, usize, &[&str], &[&str])> = vec![
        (
            format!("nats:\n  url: nats://x:4222\n{base}    - source: grafana\n      token: short-token\n"),
            8,
            &["shorter than 16 characters", "openssl rand"],
            &[],
        ),
        (
            format!("{base}    - source: grafana\n      token_file: {}\n", secret.display()),
            6,
            &["shorter than 16 characters"],
            &[],
        ),
        (
            format!("{base}chatops:\n  api:\n    tokens:\n      - name: grafana\n        token: short\n        scopes: [read]\n"),
            9,
            &["the token is 5 characters; use at least 16"],
            &[],
        ),
        (
            format!("{base}{policy}  users:\n    - {{name: alice, email: a@example.com}}\n    - name: alice\n      slack: U0000BOB\n"),
            13,
            &["user \"alice\" is defined twice"],
            &["no contact method", "\n"],
        ),
        (
            format!("{base}{policy}  users:\n    - name: alice\n      email: a@example.com\n      phone: \"555-0100\"\n"),
            14,
            &["phone \"555-0100\" is not an E.164 number", "+14155550100"],
            &[],
        ),
        (
            format!("{base}{policy}  users:\n    - {{name: alice, email: alice.example.com}}\n"),
            12,
            &["email \"alice.example.com\" is not an email address"],
            &[],
        ),
        (
            format!("{base}escalation:\n  route:\n    policy: p\n    routes:\n      - matchers: ['tocsin_severity=\"crit\"']\n        policy: p\n  policies:\n    - name: p\n      levels:\n        - targets: [{{user: alice}}]\n  users:\n    - {{name: alice, email: a@example.com}}\n"),
            9,
            &["tocsin_severity=\"crit\" names no severity", "critical, high, medium, low, info"],
            &[],
        ),
        (
            format!("{base}escalation:\n  route:\n    policy: p\n    routes:\n      - matchers: ['tocsin_severity=~\"crit|hgh\"']\n        policy: p\n  policies:\n    - name: p\n      levels:\n        - targets: [{{user: alice}}]\n  users:\n    - {{name: alice, email: a@example.com}}\n"),
            9,
            &["names no severity"],
            &[],
        ),
    ];
    for (i, (text, line, fragments, absent)) in cases.iter().enumerate() {
        let file = write(dir.path(), &format!("mistake{i}.yaml"), text);
        let (code, _, stderr) = check_config(&file, &[token]);
        assert_eq!(code, 2, "case {i}: {stderr}");
        let place = format!("{}:{line}:", file.display());
        assert!(
            stderr.starts_with(&place),
            "case {i}: expected {place} in {stderr}"
        );
        for f in *fragments {
            assert!(stderr.contains(f), "case {i}: expected {f:?} in {stderr}");
        }
        for f in *absent {
            assert!(
                !stderr.trim_end().contains(f),
                "case {i}: {f:?} should not be in {stderr}"
            );
        }
    }
    // Matchers that do name severities pass.
    let file = write(
        dir.path(),
        "severities-ok.yaml",
        &format!("{base}escalation:\n  route:\n    policy: p\n    routes:\n      - matchers: ['tocsin_severity=~\"critical|high\"', 'tocsin_severity!=\"info\"']\n        policy: p\n  policies:\n    - name: p\n      levels:\n        - targets: [{{user: alice}}]\n  users:\n    - {{name: alice, email: a@example.com, phone: \"+4915112345678\"}}\n"),
    );
    let (code, _, stderr) = check_config(&file, &[token]);
    assert_eq!(code, 0, "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_a_burst_keeps_every_acknowledged_alert() {
    let nats = NatsServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (ingest_port, admin_port) = (free_port(), free_port());
    let config = write(
        dir.path(),
        "tocsin.yaml",
        &format!(
            "nats:\n  url: {}\ningest:\n  listen: 127.0.0.1:{ingest_port}\n  tokens:\n    - source: burst\n      token: ${{TOCSIN_INGEST_TOKEN}}\n\
             incidents:\n  data_dir: {data}/incidents\nescalation:\n  data_dir: {data}/escalation\n",
            nats.url(),
            data = dir.path().display()
        ),
    );
    let token = "burst-token-0123456789abcdef";
    let mut child = tokio::process::Command::new(crate::support::bin())
        .args(["--config"])
        .arg(&config)
        .args([
            "--admin-listen",
            &format!("127.0.0.1:{admin_port}"),
            "--log-level",
            "warn",
            "up",
        ])
        .env("TOCSIN_INGEST_TOKEN", token)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("start tocsin up");
    let pid = child.id().expect("pid");

    let http = reqwest::Client::new();
    let ready = format!("http://127.0.0.1:{admin_port}/readyz");
    let mut ok = false;
    for _ in 0..400 {
        if matches!(http.get(&ready).send().await, Ok(r) if r.status().is_success()) {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(ok, "tocsin up did not become ready");

    let url = format!("http://127.0.0.1:{ingest_port}/api/v1/alerts");
    let acked: Arc<Mutex<BTreeSet<String>>> = Arc::default();
    let mut senders = Vec::new();
    for worker in 0..6 {
        let (url, acked) = (url.clone(), acked.clone());
        senders.push(tokio::spawn(async move {
            let client = reqwest::Client::new();
            for n in 0.. {
                let id = format!("w{worker}-{n}");
                let body = format!(r#"[{{"labels":{{"alertname":"Term","id":"{id}"}}}}]"#);
                match client.post(&url).bearer_auth(token).body(body).send().await {
                    Ok(r) if r.status().is_success() => {
                        acked.lock().await.insert(id);
                    }
                    _ => break,
                }
            }
        }));
    }
    while acked.lock().await.len() < 150 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let killed = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .expect("tocsin exits after SIGTERM")
        .unwrap();
    assert!(status.success(), "exit status after SIGTERM: {status}");
    for s in senders {
        s.await.unwrap();
    }

    let js = async_nats::jetstream::new(nats.client().await);
    let on_bus: BTreeSet<String> = bus::read_alerts(&js)
        .await
        .into_iter()
        .map(|m| m.envelope.body.labels["id"].clone())
        .collect();
    let acked = acked.lock().await;
    let lost: Vec<&String> = acked.iter().filter(|id| !on_bus.contains(*id)).collect();
    assert!(lost.is_empty(), "answered 2xx but not on the bus: {lost:?}");
}

#[test]
fn a_template_naming_a_field_that_does_not_exist_fails_check_config_with_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("templates/sms")).unwrap();
    write(
        &dir.path().join("templates/sms"),
        "page.hbs",
        "[{{incident.severity_upper}}] #{{incident.number}}\n{{incident.titel}} reply ACK\n",
    );
    let file = write(
        dir.path(),
        "tocsin.yaml",
        &format!("{VALID}notifier:\n  templates: templates\n"),
    );
    let (code, _, stderr) = check_config(&file, &[("TOCSIN_INGEST_TOKEN", "0123456789abcdef0123")]);
    assert_eq!(code, 2, "{stderr}");
    let template = dir.path().join("templates/sms/page.hbs");
    assert!(stderr.contains(&template.display().to_string()), "{stderr}");
    assert!(stderr.contains("line 2"), "{stderr}");
    assert!(stderr.contains("incident.titel"), "{stderr}");
    // The same file is refused at start-up too, before anything is sent.
    let out = Command::new(crate::support::bin())
        .arg("--config")
        .arg(&file)
        .arg("notifier")
        .env("TOCSIN_INGEST_TOKEN", "0123456789abcdef0123")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("line 2"), "{err}");
}

#[test]
fn a_notifier_channel_without_its_secret_fails_check_config() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(
        dir.path(),
        "tocsin.yaml",
        &format!("{VALID}notifier:\n  sms:\n    account_sid: AC0000\n    from: \"+15005550006\"\n"),
    );
    let (code, _, stderr) = check_config(&file, &[("TOCSIN_INGEST_TOKEN", "0123456789abcdef0123")]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("auth_token"), "{stderr}");
    assert!(stderr.contains("tocsin.yaml:"), "{stderr}");
}

/// `check-config` refuses configs that page into the void: an escalation
/// target naming a PagerDuty service or webhook the notifier does not
/// define, and user rules using a channel that is not configured. Each is
/// an error with the file and the line of the culprit; with the console
/// taking unconfigured channels (development) it is a warning instead.
#[test]
fn pages_that_could_never_be_delivered_are_config_errors() {
    let dir = tempfile::tempdir().unwrap();
    let token = ("TOCSIN_INGEST_TOKEN", "0123456789abcdef0123");
    let base = |escalation: &str, notifier: &str| {
        format!("{VALID}escalation:\n{escalation}notifier:\n{notifier}")
    };
    let policy = "  route: {policy: p}
  policies:
    - name: p
      levels:
        - targets: [{user: alice}]
        - targets: [{pagerduty_service: payments}, {webhook: teams}]
  users:
    - {name: alice, email: alice@example.com}
";
    let pd = "  pagerduty:
    services:
      billing: {routing_key: 0123456789abcdef0123456789abcdef}
  webhooks:
    - {name: chat, url: https://chat.example.com/hook}
  email: {host: smtp.example.com, from: tocsin@example.com}
";
    let file = write(dir.path(), "void.yaml", &base(policy, pd));
    let (code, _, stderr) = check_config(&file, &[token]);
    assert_eq!(code, 2, "{stderr}");
    let line_of = |needle: &str| {
        std::fs::read_to_string(&file)
            .unwrap()
            .lines()
            .position(|l| l.contains(needle))
            .unwrap()
            + 1
    };
    let targets = line_of("{pagerduty_service: payments}");
    assert!(
        stderr.contains(&format!("void.yaml:{targets}:"))
            && stderr.contains("pagerduty_service \"payments\", which notifier.pagerduty.services does not define (defined: billing)"),
        "{stderr}"
    );
    assert!(
        stderr
            .contains("webhook \"teams\", which notifier.webhooks does not define (defined: chat)"),
        "{stderr}"
    );

    // Alice has an email only, so only email matters: configured here.
    // Give her a phone (SMS in the default rules) with no SMS provider.
    let users_sms = policy.replace(
        "{name: alice, email: alice@example.com}",
        "{name: alice, email: alice@example.com, phone: \"+14155550101\"}",
    );
    let fixed_targets = users_sms.replace(
        "        - targets: [{pagerduty_service: payments}, {webhook: teams}]\n",
        "",
    );
    let file = write(dir.path(), "sms.yaml", &base(&fixed_targets, pd));
    let (code, _, stderr) = check_config(&file, &[token]);
    assert_eq!(code, 2, "{stderr}");
    let alice = line_of_in(&file, "{name: alice");
    assert!(
        stderr.contains(&format!("sms.yaml:{alice}:"))
            && stderr.contains("user \"alice\" is paged by sms")
            && stderr.contains("notifier.sms is not configured"),
        "{stderr}"
    );

    // The console takes unconfigured channels: a warning, exit 0.
    let with_console = format!("{pd}  console: {{}}\n");
    let file = write(dir.path(), "dev.yaml", &base(&fixed_targets, &with_console));
    let (code, stdout, stderr) = check_config(&file, &[token]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains(": ok"), "{stdout}");
    assert!(
        stderr.contains("warning: ")
            && stderr
                .contains("notifier.sms is not configured, so these pages only go to the console"),
        "{stderr}"
    );
}

fn line_of_in(file: &Path, needle: &str) -> usize {
    std::fs::read_to_string(file)
        .unwrap()
        .lines()
        .position(|l| l.contains(needle))
        .unwrap()
        + 1
}

/// What an operator meets first: with no NATS at the configured address,
/// one line names the URL tried (no lines of warnings, no 10 s wait) and
/// the exit code is 3; the service flags are not in operator commands'
/// help; `snooze --help` says the whole sentence.
#[test]
fn operator_commands_fail_fast_naming_the_nats_url_and_keep_their_help_short() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let config = write(
        dir.path(),
        "tocsin.yaml",
        &format!("nats:\n  url: nats://127.0.0.1:{port}\n"),
    );
    let started = std::time::Instant::now();
    let out = Command::new(crate::support::bin())
        .current_dir(dir.path())
        .args(["--config", config.to_str().unwrap(), "list"])
        .env_remove("TOCSIN_NATS_URL")
        .env_remove("TOCSIN_NATS_OPERATOR_PASSWORD")
        .env_remove("TOCSIN_LOG")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    assert!(
        stderr.contains(&format!("nats://127.0.0.1:{port}")),
        "names the URL: {stderr}"
    );
    assert_eq!(stderr.trim_end().lines().count(), 1, "one line: {stderr}");
    assert!(!stderr.contains("WARN"), "{stderr}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );

    for cmd in ["list", "ack", "show", "snooze", "oncall", "silence"] {
        let out = Command::new(crate::support::bin())
            .args([cmd, "--help"])
            .output()
            .unwrap();
        let help = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{cmd}: {help}");
        assert!(
            !help.contains("--admin-listen") && !help.contains("--grace-period"),
            "service flags in `{cmd} --help`:\n{help}"
        );
    }
    let out = Command::new(crate::support::bin())
        .args(["snooze", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(
        help.starts_with(
            "Snooze an incident: nobody is paged until the snooze ends, then it is triggered again and escalation resumes\n"
        ),
        "{help}"
    );
    // The services still take them.
    let out = Command::new(crate::support::bin())
        .args(["--help"])
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(
        help.contains("--admin-listen") && help.contains("--grace-period"),
        "{help}"
    );
}

/// `./deploy/dev.sh up` writes `.tocsin/env` (mode 0600) with the dev
/// NATS's address and the operator's password: operator commands run from
/// the checkout read it, so no `TOCSIN_NATS_URL=` prefix is needed; an
/// address set by the operator wins, and a file others may read is ignored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_commands_find_the_dev_nats_from_the_checkout() {
    use std::os::unix::fs::PermissionsExt as _;
    let nats = NatsServer::start().await;
    let _tocsin = tocsin_tests::TocsinHarness::start(&nats).await;
    let checkout = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(checkout.path().join(".tocsin")).unwrap();
    let env = checkout.path().join(".tocsin/env");
    std::fs::write(
        &env,
        format!(
            "# The operator's NATS credentials\nexport TOCSIN_NATS_URL={}\nexport TOCSIN_NATS_OPERATOR_PASSWORD={}\n",
            nats.address(),
            nats.password("operator")
        ),
    )
    .unwrap();
    std::fs::set_permissions(&env, std::fs::Permissions::from_mode(0o600)).unwrap();
    let shipped = repo_root().join("config/tocsin.yaml");
    let run = move |cwd: PathBuf, url: Option<String>| {
        let shipped = shipped.clone();
        tokio::task::spawn_blocking(move || {
            let mut cmd = Command::new(crate::support::bin());
            cmd.current_dir(cwd)
                .arg("--config")
                .arg(&shipped)
                .arg("list")
                .env_remove("TOCSIN_NATS_URL")
                .env_remove("TOCSIN_NATS_OPERATOR_PASSWORD");
            if let Some(u) = url {
                cmd.env("TOCSIN_NATS_URL", u);
            }
            let out = cmd.output().unwrap();
            (
                out.status.code().unwrap_or(-1),
                String::from_utf8_lossy(&out.stdout).into_owned(),
                String::from_utf8_lossy(&out.stderr).into_owned(),
            )
        })
    };
    let (code, out, err) = run(checkout.path().to_path_buf(), None).await.unwrap();
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("no open incidents"), "{out}");

    // An operator's own setting wins: the file is not read at all (its
    // password is not sent to another address).
    let other = format!("nats://127.0.0.1:{}", free_port());
    let (code, _, err) = run(checkout.path().to_path_buf(), Some(other.clone()))
        .await
        .unwrap();
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("TOCSIN_NATS_OPERATOR_PASSWORD is not set"),
        "{err}"
    );

    // A file others may read is not trusted.
    std::fs::set_permissions(&env, std::fs::Permissions::from_mode(0o644)).unwrap();
    let (code, _, err) = run(checkout.path().to_path_buf(), None).await.unwrap();
    assert_ne!(code, 0, "{err}");
}

/// The shipped (development) config opens no incident that nothing could
/// prevent: a heartbeat there would open a critical "stopped arriving"
/// incident ten minutes into every `./deploy/dev.sh up`, where nothing
/// pings it. It is shipped commented out, as an example.
#[test]
fn the_shipped_config_has_no_heartbeat_nothing_pings() {
    let text = std::fs::read_to_string(repo_root().join("config/tocsin.yaml")).unwrap();
    let doc: serde_yaml_ng::Value = serde_yaml_ng::from_str(&text).unwrap();
    let heartbeats = &doc["incidents"]["heartbeats"];
    assert!(
        heartbeats.is_null() || heartbeats.as_sequence().is_some_and(|s| s.is_empty()),
        "config/tocsin.yaml turns on heartbeats {heartbeats:?}, which nothing pings in ./deploy/dev.sh up"
    );
    assert!(
        text.contains("#   - name: alertmanager-watchdog"),
        "the example stays, commented out"
    );
}

/// `tocsin runbook lint`: every shipped runbook passes with the shipped
/// config; a bad file fails with file:line and the reason, exit 1.
#[test]
fn runbook_lint_names_file_line_and_reason() {
    let root = repo_root();
    let shipped: Vec<PathBuf> = std::fs::read_dir(root.join("runbooks"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    assert!(!shipped.is_empty());
    let out = Command::new(crate::support::bin())
        .arg("--config")
        .arg(root.join("config/tocsin.yaml"))
        .args(["runbook", "lint"])
        .args(&shipped)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    assert_eq!(stdout.matches(": ok (").count(), shipped.len(), "{stdout}");

    let dir = tempfile::tempdir().unwrap();
    let bad = write(
        dir.path(),
        "bad.yaml",
        "name: bad\nmatch: {}\nsteps:\n  - id: wipe\n    exec: {argv: [sh, -c, \"rm -rf {{labels.dir}}\"]}\n",
    );
    let out = Command::new(crate::support::bin())
        .arg("--config")
        .arg(root.join("config/tocsin.yaml"))
        .args(["runbook", "lint"])
        .arg(&bad)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(
        stdout.contains(&format!("{}:5", bad.display()))
            && stdout.contains("program \"sh\" is not on remediation.allowed_programs"),
        "{stdout}"
    );
}

/// A process needs the secrets of the services it runs, not the others':
/// an ingest host has no Slack signing secret, SMTP password or Twilio
/// token, and must start without them; the service that uses a secret
/// still refuses to start without it, naming the variable.
#[test]
fn a_service_starts_without_the_secrets_of_services_it_does_not_run() {
    use tocsin::config::{Config, Service};
    let shipped = std::fs::read_to_string(repo_root().join("config/tocsin.yaml")).unwrap();
    assert!(
        std::env::var_os("TOCSIN_SLACK_SIGNING_SECRET").is_none(),
        "this test needs TOCSIN_SLACK_SIGNING_SECRET unset"
    );
    let dir = tempfile::tempdir().unwrap();
    let text = shipped
        .replace("${TOCSIN_INGEST_TOKEN}", "ingest-token-0123456789abcdef")
        .replace(
            "${TOCSIN_NATS_INGEST_PASSWORD}",
            "ingest-password-0123456789",
        )
        .replace(
            "${TOCSIN_NATS_CHATOPS_PASSWORD}",
            "chatops-password-0123456789",
        )
        .replace(
            "  # slack:\n  #   signing_secret: ${TOCSIN_SLACK_SIGNING_SECRET}",
            "  slack:\n    signing_secret: ${TOCSIN_SLACK_SIGNING_SECRET}",
        );
    assert!(text.contains("\n    signing_secret: ${TOCSIN_SLACK_SIGNING_SECRET}"));
    let file = write(dir.path(), "tocsin.yaml", &text);

    let ingest = Config::load(&file, &[Service::Ingest]);
    assert!(
        ingest.is_ok(),
        "ingest alone: {:?}",
        ingest.err().map(|e| e.to_string())
    );

    let chatops = Config::load(&file, &[Service::Chatops])
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(
        chatops.contains("TOCSIN_SLACK_SIGNING_SECRET"),
        "chat-ops needs its own secret: {chatops:?}"
    );
}

/// A runbook that holds pages only holds them if its hold is recorded
/// before escalation pages the first level (after `incidents.group_wait`):
/// with a shorter group_wait, `check-config` warns, naming the runbook file
/// and the fix; with enough, it says nothing.
#[test]
fn a_held_runbook_without_group_wait_is_a_warning() {
    let dir = tempfile::tempdir().unwrap();
    let books = dir.path().join("runbooks");
    std::fs::create_dir(&books).unwrap();
    write(
        &books,
        "heal.yaml",
        "name: heal\nmatch: {labels: ['alertname=\"Down\"']}\npage: on_failure\nhold_at_most: 2m\n\
         steps:\n  - id: note\n    annotate: healing\n",
    );
    let config = |group_wait: &str| {
        format!(
            "nats: {{url: \"nats://127.0.0.1:1\"}}\n\
             ingest:\n  tokens:\n    - {{source: am, token: \"${{TOCSIN_INGEST_TOKEN}}\"}}\n\
             incidents:\n  group_wait: {group_wait}\n\
             remediation:\n  runbook_dirs: [\"{}\"]\n",
            books.display()
        )
    };
    let token = ("TOCSIN_INGEST_TOKEN", "0123456789abcdef0123");
    let file = write(dir.path(), "zero.yaml", &config("0s"));
    let (code, stdout, stderr) = check_config(&file, &[token]);
    assert_eq!(code, 0, "a warning, not an error: {stdout}{stderr}");
    assert!(
        stderr.contains("warning: ")
            && stderr.contains("heal.yaml")
            && stderr.contains("runbook \"heal\" holds pages (page: on_failure)")
            && stderr.contains("set incidents.group_wait to at least 2s"),
        "{stderr}"
    );
    let file = write(dir.path(), "five.yaml", &config("5s"));
    let (code, stdout, stderr) = check_config(&file, &[token]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(!stderr.contains("holds pages"), "{stderr}");
}
