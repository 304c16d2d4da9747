//! Running Tocsin as an operator does: real `tocsin` processes, one per
//! service or `tocsin up`, with a config that names every channel at once
//! (Slack, PagerDuty, Twilio and webhooks at the fakes, email at a real
//! SMTP server).
//!
//! `TOCSIN_TEST_BIN` runs the tests against another `tocsin` binary (an
//! older build, to see a test fail on the defect it was written for).

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

pub use tocsin_tests::ports::free_port;
use tocsin_tests::{fakes::FakeProviders, notifier::config_yaml, smtp::SmtpSink, NatsServer};

pub const TOKEN: &str = "process-test-token-0123456789";

pub fn bin() -> String {
    std::env::var("TOCSIN_TEST_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_tocsin").to_string())
}

/// Starts `tocsin remediation` with `config`, its log (stderr) in `log`.
pub fn start_remediation(config: &Path, log: &Path) -> Child {
    Command::new(bin())
        .arg("--config")
        .arg(config)
        .args([
            "--admin-listen",
            "127.0.0.1:0",
            "--log-level",
            "info",
            "remediation",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .expect("start tocsin remediation")
}

/// A running `tocsin` process, killed on drop. Its log goes to a file
/// (printed when a test fails to become ready).
pub struct Proc {
    pub child: Option<Child>,
    pub admin: u16,
    pub log: PathBuf,
    args: Vec<String>,
    config: PathBuf,
    cwd: PathBuf,
    env: Vec<(String, String)>,
    /// RLIMIT_NOFILE (soft and hard) of the process, when set.
    open_files: Option<u64>,
}

impl Proc {
    /// Starts `tocsin <args>` with `config`, in `cwd`.
    pub fn start(config: &Path, cwd: &Path, args: &[&str]) -> Proc {
        Self::start_with_env(config, cwd, args, &[])
    }

    /// [`Proc::start`] with extra environment variables.
    pub fn start_with_env(
        config: &Path,
        cwd: &Path,
        args: &[&str],
        env: &[(String, String)],
    ) -> Proc {
        Self::start_limited(config, cwd, args, env, None)
    }

    /// [`Proc::start`] with at most `open_files` file descriptors (soft and
    /// hard limit, so the process cannot raise it).
    pub fn start_with_open_files(
        config: &Path,
        cwd: &Path,
        args: &[&str],
        open_files: u64,
    ) -> Proc {
        Self::start_limited(config, cwd, args, &[], Some(open_files))
    }

    fn start_limited(
        config: &Path,
        cwd: &Path,
        args: &[&str],
        env: &[(String, String)],
        open_files: Option<u64>,
    ) -> Proc {
        let mut p = Proc {
            child: None,
            admin: 0,
            log: PathBuf::new(),
            args: args.iter().map(|s| s.to_string()).collect(),
            config: config.to_path_buf(),
            cwd: cwd.to_path_buf(),
            env: env.to_vec(),
            open_files,
        };
        p.spawn();
        p
    }

    fn spawn(&mut self) {
        self.admin = free_port();
        self.log = self
            .cwd
            .join(format!("tocsin-{}-{}.log", self.args.join("-"), self.admin));
        let log = std::fs::File::create(&self.log).unwrap();
        let mut command = Command::new(bin());
        if let Some(n) = self.open_files {
            use std::os::unix::process::CommandExt;
            // SAFETY: only setrlimit runs between fork and exec; it is
            // async-signal-safe and touches none of the parent's memory.
            unsafe {
                command.pre_exec(move || rlimit::setrlimit(rlimit::Resource::NOFILE, n, n));
            }
        }
        let child = command
            .current_dir(&self.cwd)
            .arg("--config")
            .arg(&self.config)
            .args([
                "--admin-listen",
                &format!("127.0.0.1:{}", self.admin),
                "--log-level",
                "info",
                "--grace-period",
                "2s",
            ])
            .args(&self.args)
            .env("TOCSIN_INGEST_TOKEN", TOKEN)
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start tocsin");
        self.child = Some(child);
    }

    /// Waits until `/readyz` answers 200 (panics with the log after 30 s).
    pub async fn ready(&mut self) {
        let url = format!("http://127.0.0.1:{}/readyz", self.admin);
        let client = reqwest::Client::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(r) = client.get(&url).send().await {
                if r.status() == 200 {
                    return;
                }
            }
            if let Some(c) = self.child.as_mut() {
                if let Ok(Some(status)) = c.try_wait() {
                    panic!(
                        "tocsin {:?} exited with {status}:\n{}",
                        self.args,
                        std::fs::read_to_string(&self.log).unwrap_or_default()
                    );
                }
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "tocsin {:?} not ready:\n{}",
                self.args,
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGTERM, and wait for it to drain and exit.
    pub fn stop(&mut self) {
        if let Some(c) = self.child.take() {
            tocsin_tests::terminate(c);
        }
    }

    /// SIGKILL.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again with the same arguments.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Knobs of [`full_config`].
pub struct Setup {
    /// Replaces the notifier's guard of every channel.
    pub guard: String,
    /// Per-channel guard overrides (`sms`, `pagerduty`, `slack`).
    pub sms_guard: Option<String>,
    pub pagerduty_guard: Option<String>,
    pub slack_guard: Option<String>,
    /// Extra notifier keys (`concurrency: 8`).
    pub notifier_extra: String,
    pub escalation: String,
}

impl Default for Setup {
    fn default() -> Self {
        Setup {
            guard: "{timeout: 3s, rate_per_second: 0, breaker: {failures: 5, open_for: 1s, successes: 2}}".into(),
            sms_guard: None,
            pagerduty_guard: None,
            slack_guard: None,
            notifier_extra: String::new(),
            escalation: tocsin_tests::notifier::ALL_CHANNELS.to_string(),
        }
    }
}

/// A whole config: NATS at `nats`, ingest on `ingest_port`, incidents with
/// its data under `dir`, escalation from `setup`, and a notifier with every
/// channel (email at `smtp`).
pub fn full_config(
    nats: &NatsServer,
    fakes: &FakeProviders,
    smtp: &SmtpSink,
    ingest_port: u16,
    dir: &Path,
    setup: &Setup,
) -> PathBuf {
    let notifier = notifier_section(fakes, smtp, setup);
    let indent = |s: &str| -> String { s.lines().map(|l| format!("  {l}\n")).collect() };
    let config = format!(
        "nats:\n  url: {url}\n  reconnect_max_delay: 250ms\n\
         ingest:\n  listen: 127.0.0.1:{ingest_port}\n  tokens:\n    - source: test\n      token: ${{TOCSIN_INGEST_TOKEN}}\n\
         incidents:\n  data_dir: {data}/incidents\n\
         escalation:\n  data_dir: {data}/escalation\n{esc}\
         notifier:\n{notifier}",
        url = nats.url(),
        data = dir.display(),
        esc = indent(setup.escalation.trim_start_matches('\n')),
        notifier = indent(&notifier),
    );
    let path = dir.join("tocsin.yaml");
    std::fs::write(&path, config).unwrap();
    path
}

/// The `notifier:` section (unindented) of [`full_config`]: every channel
/// at the fakes and email at `smtp`, with `setup`'s guards and extra keys.
pub fn notifier_section(fakes: &FakeProviders, smtp: &SmtpSink, setup: &Setup) -> String {
    let default_guard =
        "{timeout: 3s, rate_per_second: 0, breaker: {failures: 5, open_for: 1s, successes: 2}}";
    // TOCSIN_TEST_WITHOUT_EMAIL leaves email out, to run these tests
    // against an old binary that aborts when email is configured.
    let email = std::env::var_os("TOCSIN_TEST_WITHOUT_EMAIL").is_none();
    let mut notifier = config_yaml(fakes, email.then_some(smtp), Path::new("unused"));
    // Each channel's `guard:` line, in the order config_yaml writes them:
    // slack, pagerduty, sms, webhooks, email.
    let guards = [
        setup.slack_guard.clone(),
        setup.pagerduty_guard.clone(),
        setup.sms_guard.clone(),
        None,
        None,
    ];
    let mut out = String::new();
    let mut i = 0;
    for line in notifier.lines() {
        if line.trim_start().starts_with("guard: ") && line.contains(default_guard) {
            let g = guards
                .get(i)
                .cloned()
                .flatten()
                .unwrap_or_else(|| setup.guard.clone());
            out.push_str(&line.replace(default_guard, &g));
            i += 1;
        } else {
            out.push_str(line);
        }
        out.push('\n');
    }
    notifier = out;
    // Extra keys replace the ones config_yaml wrote.
    for extra in setup
        .notifier_extra
        .lines()
        .filter(|l| !l.trim().is_empty())
    {
        let key = extra.split(':').next().unwrap_or_default();
        let mut replaced = false;
        notifier = notifier
            .lines()
            .map(|l| {
                if l.starts_with(&format!("{key}:")) {
                    replaced = true;
                    extra.to_string()
                } else {
                    l.to_string()
                }
            })
            .collect::<Vec<_>>()
            .join("\n")
            + "\n";
        if !replaced {
            notifier.push_str(extra);
            notifier.push('\n');
        }
    }
    notifier
}

/// Posts alerts (generic JSON) to ingest until it answers 200.
pub async fn post_alerts(ingest_port: u16, alerts: &serde_json::Value) {
    let client = reqwest::Client::new();
    let url = format!("http://127.0.0.1:{ingest_port}/api/v1/alerts");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        match client
            .post(&url)
            .bearer_auth(TOKEN)
            .json(alerts)
            .send()
            .await
        {
            Ok(r) if r.status() == 200 => return,
            Ok(r) if r.status().is_client_error() => {
                panic!(
                    "ingest refused: {} {}",
                    r.status(),
                    r.text().await.unwrap_or_default()
                )
            }
            _ => {}
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "ingest never took the alerts"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A critical alert of group `name`.
pub fn alert(name: &str, status: &str) -> serde_json::Value {
    serde_json::json!({
        "labels": {"alertname": name, "severity": "critical", "instance": format!("{name}-host:9100")},
        "annotations": {"summary": format!("{name} is down"), "runbook_url": format!("https://runbooks.example.com/{name}")},
        "generatorURL": format!("https://prometheus.example.com/graph?g0.expr=up%7Bjob%3D%22{name}%22%7D"),
        "status": status,
    })
}

/// One stored message: sequence, server time (ns since the epoch), its
/// subject, its `Tocsin-Lease` header, its message id and payload.
pub struct Raw {
    pub seq: u64,
    pub subject: String,
    pub time_ns: i128,
    pub lease: Option<(String, u64)>,
    pub msg_id: String,
    /// The `Nats-Expected-Last-Sequence` it was published with, if any.
    pub expected: Option<u64>,
    pub payload: Vec<u8>,
}

impl Raw {
    /// Whether this is a lease tenure marker (not an entry or a page).
    pub fn is_marker(&self) -> bool {
        self.msg_id.starts_with("tenure:")
    }

    /// The entries an INCIDENTS message holds: none (a tenure marker),
    /// one, or several (on `tocsin.incidents.batch`, split as every reader
    /// of the stream splits them); None if it does not decode.
    pub fn entries(&self) -> Option<Vec<tocsin_proto::incident::LogEntry>> {
        if self.is_marker() {
            return Some(Vec::new());
        }
        tocsin_proto::codec::decode_entries(&self.subject, &self.payload)
            .ok()
            .map(|e| e.body)
    }

    /// One line for a failure message: sequence, time, tenure, id and
    /// the sequence it was published to follow.
    pub fn line(&self) -> String {
        format!(
            "seq {} at {:.3} s, lease {:?}, msg id {}, expected last {:?}",
            self.seq,
            self.time_ns as f64 / 1e9,
            self.lease,
            self.msg_id,
            self.expected
        )
    }
}

/// Every message of `stream` now (panics if it cannot be read).
pub async fn read_raw(js: &async_nats::jetstream::Context, stream: &str) -> Vec<Raw> {
    try_read(js, stream, 1, &[])
        .await
        .unwrap_or_else(|e| panic!("cannot read {stream}: {e:#}"))
}

/// The messages of `stream` from sequence `from` on (only those on the
/// `filters` subjects, unless empty), up to the last one stored when the
/// read began; an error when NATS does not answer (it may be restarting).
pub async fn try_read(
    js: &async_nats::jetstream::Context,
    stream: &str,
    from: u64,
    filters: &[String],
) -> anyhow::Result<Vec<Raw>> {
    use async_nats::jetstream::consumer::{pull::OrderedConfig, DeliverPolicy};
    use futures::StreamExt as _;
    let mut s = js.get_stream(stream).await?;
    let raw = |seq: u64,
               time_ns: i128,
               subject: &str,
               headers: Option<&async_nats::HeaderMap>,
               payload: &[u8]| {
        let header = |name: &str| headers.and_then(|h| h.get(name)).map(|v| v.to_string());
        let lease = header("Tocsin-Lease").and_then(|v| {
            let (role, term) = v.split_once('/')?;
            Some((role.to_string(), term.parse().ok()?))
        });
        Raw {
            seq,
            subject: subject.to_string(),
            time_ns,
            lease,
            msg_id: header("Nats-Msg-Id").unwrap_or_default(),
            expected: header("Nats-Expected-Last-Sequence").and_then(|v| v.parse().ok()),
            payload: payload.to_vec(),
        }
    };
    // A work queue takes no ordered consumer: message by message.
    if s.cached_info().config.retention == async_nats::jetstream::stream::RetentionPolicy::WorkQueue
    {
        assert!(filters.is_empty(), "{stream}: no filters on a work queue");
        let state = s.info().await?.state.clone();
        let mut out = Vec::new();
        if state.messages == 0 {
            return Ok(out);
        }
        for seq in from.max(state.first_sequence)..=state.last_sequence {
            // A gap: acknowledged (gone) meanwhile.
            if let Ok(m) = s.get_raw_message(seq).await {
                out.push(raw(
                    seq,
                    m.time.unix_timestamp_nanos(),
                    &m.subject,
                    Some(&m.headers),
                    &m.payload,
                ));
            }
        }
        return Ok(out);
    }
    let mut consumer = s
        .create_consumer(OrderedConfig {
            filter_subjects: filters.to_vec(),
            deliver_policy: DeliverPolicy::ByStartSequence {
                start_sequence: from.max(1),
            },
            ..Default::default()
        })
        .await?;
    let mut out = Vec::new();
    if consumer.info().await?.num_pending == 0 {
        return Ok(out);
    }
    let mut messages = consumer.messages().await?;
    loop {
        let m = tokio::time::timeout(Duration::from_secs(5), messages.next())
            .await
            .map_err(|_| anyhow::anyhow!("{stream}: no message within 5 s"))?
            .ok_or_else(|| anyhow::anyhow!("{stream}: the consumer ended"))??;
        let info = m.info().map_err(|e| anyhow::anyhow!("{e}"))?;
        let (seq, pending) = (info.stream_sequence, info.pending);
        let time_ns = info.published.unix_timestamp_nanos();
        out.push(raw(
            seq,
            time_ns,
            &m.subject,
            m.headers.as_ref(),
            &m.payload,
        ));
        if pending == 0 {
            return Ok(out);
        }
    }
}

/// Every tenure that wrote to `stream` (INCIDENTS, or NOTIFY) wrote its
/// fence marker first (on `tocsin.incidents.tenure` or
/// `tocsin.notify.tenure`, message id `tenure:...`): the server refused
/// whatever an earlier tenure sent after it.
pub fn every_tenure_fenced(raws: &[Raw], stream: &str) {
    let mut seen = std::collections::BTreeSet::new();
    for r in raws {
        let Some((_, term)) = &r.lease else { continue };
        if seen.insert(*term) {
            assert!(
                r.is_marker(),
                "{stream} seq {} is term {term}'s first message but not its tenure marker: {}",
                r.seq,
                r.line()
            );
        }
    }
}

/// Every message of `stream` carries `role`'s lease header, and the terms
/// never go back: once a newer tenure wrote, no older one ever did again.
/// Returns the terms in the order they first wrote.
pub fn terms_never_go_back(raws: &[Raw], role: &str, stream: &str) -> Vec<u64> {
    let mut terms = Vec::new();
    let mut last = 0;
    for (i, r) in raws.iter().enumerate() {
        let Some((rl, term)) = &r.lease else {
            panic!("{stream} seq {} has no Tocsin-Lease header", r.seq);
        };
        assert_eq!(rl, role, "{stream} seq {} written under {rl}", r.seq);
        if *term < last {
            let around: Vec<String> = raws[i.saturating_sub(12)..(i + 6).min(raws.len())]
                .iter()
                .map(Raw::line)
                .collect();
            let first = |t: u64| {
                raws.iter()
                    .find(|r| r.lease.as_ref().is_some_and(|(_, x)| *x == t))
                    .map(Raw::line)
            };
            panic!(
                "{stream} seq {} written by term {term} after term {last} had written: two \
                 instances acted at once; term {last} first wrote {:?}, term {term} first \
                 wrote {:?}; around it:\n  {}",
                r.seq,
                first(last),
                first(*term),
                around.join("\n  ")
            );
        }
        if *term > last {
            terms.push(*term);
        }
        last = *term;
    }
    terms
}

/// Waits up to `within` until the first page of an incident has reached
/// every channel the tests' policies name once: an SMS, two Slack posts
/// (a DM and #incidents), a PagerDuty event and a webhook call (the email
/// is the SMTP server's to wait for);
/// panics with what arrived and `context()` (the processes' logs).
pub async fn wait_paged_everywhere(
    fakes: &FakeProviders,
    within: Duration,
    context: impl Fn() -> String,
) {
    assert!(
        fakes
            .wait_for(
                |f| f.sms().len() == 1
                    && f.slack_posts().len() == 2
                    && f.pagerduty_events().len() == 1
                    && f.webhooks().len() == 1,
                within
            )
            .await,
        "pages on every channel: sms {} slack {} pd {} hooks {}; rejected {:?}\n{}",
        fakes.sms().len(),
        fakes.slack_posts().len(),
        fakes.pagerduty_events().len(),
        fakes.webhooks().len(),
        fakes.rejected(),
        context()
    );
}

/// Rewrites the config at `path` (as [`full_config`] wrote it for `nats`,
/// connecting as the admin) so that each of `who` connects as its own
/// NATS user, its password from `$TOCSIN_NATS_<WHO>_PASSWORD`; the
/// environment that sets them.
pub fn own_credentials(path: &Path, nats: &NatsServer, who: &[&str]) -> Vec<(String, String)> {
    use tocsin_tests::nats::password_variable;
    let mut credentials = String::from("  credentials:\n");
    let mut env = Vec::new();
    for w in who {
        credentials.push_str(&format!(
            "    {w}:\n      user: {w}\n      password: ${{{}}}\n",
            password_variable(w)
        ));
        env.push((password_variable(w), nats.password(w).to_string()));
    }
    let text = std::fs::read_to_string(path).unwrap();
    let with_admin = format!("  url: {}\n", nats.url());
    assert!(text.contains(&with_admin), "{text}");
    let text = text.replace(
        &with_admin,
        &format!("  url: {}\n{credentials}", nats.address()),
    );
    std::fs::write(path, text).unwrap();
    env
}
