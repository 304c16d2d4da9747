//! Chaos: every Tocsin service twice, each instance its own `tocsin
//! <service>` process (incidents and escalation as an active instance and
//! a standby sharing a lease, the others as replicas), Alertmanager-shaped
//! webhooks (v4, `groupLabels`, a fingerprint per alert) posted to both
//! ingest replicas as a load balancer would, and a chaos driver that
//! SIGKILLs a random process every few seconds and starts it again (every
//! process at least once, standbys included), and takes NATS away: on one
//! server a SIGKILL and a SIGTERM, each followed by a restart; on a 3-node
//! cluster (streams with 3 replicas) one node SIGKILLed and restarted.
//! Meanwhile operators acknowledge a sample of the incidents, half with
//! `tocsin ack` and half with a signed Slack button sent to chat-ops, some
//! before the second level is due and some after.
//!
//! At the end, from the fakes' records and the INCIDENTS stream: every
//! alert ingest answered 2xx is in exactly one incident, one incident per
//! alert group, no INCIDENTS entry twice, lease terms that never go back,
//! every page due to an incident nobody acknowledged delivered exactly
//! once, no page at all for a level that fell due after the incident was
//! acknowledged, and no page delivered twice. The counts are printed as a
//! table.
//!
//! `./deploy/dev.sh chaos` runs these tests with the table shown;
//! `--long` (`TOCSIN_CHAOS_LONG=1`) soaks ten times longer; the seed is
//! printed first, and `TOCSIN_TEST_SEED=<seed>` replays the same kills,
//! acknowledgements and order of alerts.

use std::{
    collections::{BTreeMap, BTreeSet, VecDeque},
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use async_nats::jetstream;
use serde_json::{json, Value};
use tocsin_proto::{
    codec::decode_envelope,
    incident::{kind, EventKind, LogEntry},
    notify::slack_actions,
    subjects::{incident_events_kind, STREAM_INCIDENTS},
};
use tocsin_runtime::CancellationToken;
use tocsin_tests::{
    chatops::{block_actions_body, slack_signature, SLACK_SECRET},
    eventually_within,
    fakes::FakeProviders,
    smtp::SmtpSink,
    tocsin::SERVICES,
    NatsCluster, NatsServer, TestRng,
};

use crate::support::{
    bin, every_tenure_fenced, free_port, notifier_section, read_raw, terms_never_go_back, try_read,
    Proc, Setup, TOKEN,
};

/// The second level is due this long after an incident opens.
const LEVEL_DELAY: Duration = Duration::from_secs(10);
/// An acknowledgement stored this long before a level's due time must
/// stop that level's page (it gives the escalation service time to read
/// the acknowledgement while it is running; one that was down must read
/// it before it fires what fell due meanwhile).
const ACK_MARGIN: Duration = Duration::from_secs(1);
/// How long anything may take to settle after the chaos: 3 minutes, 15
/// with `TOCSIN_CHAOS_LONG` (PagerDuty's 2 events/s alone then needs most
/// of the soak for its backlog).
fn settle_limit() -> Duration {
    if std::env::var_os("TOCSIN_CHAOS_LONG").is_some() {
        Duration::from_secs(900)
    } else {
        Duration::from_secs(180)
    }
}

/// Level 0 pages the `teams` webhook and PagerDuty at once; level 1 pages
/// the webhook again 10 s later unless someone acknowledged. alice is who
/// presses Slack's button.
const POLICY: &str = r##"
route:
  policy: chaos
policies:
  - name: chaos
    levels:
      - targets: [{webhook: teams}, {pagerduty_service: payments}]
        delay: 10s
      - targets: [{webhook: teams}]
        delay: 1h
users:
  - {name: alice, email: alice@example.com, phone: "+14155550101", slack: U01ALICE}
"##;

/// How big a run is.
struct Scale {
    groups: usize,
    alerts_per_group: usize,
    alerts_per_request: usize,
    /// Requests are spread evenly over this long.
    load: Duration,
    kill_every: Duration,
    min_kills: usize,
}

impl Scale {
    /// 10,000 alerts in 100 groups over a minute, a kill every 2.5 s; ten
    /// times that with `TOCSIN_CHAOS_LONG`.
    fn from_env() -> Scale {
        let long = std::env::var_os("TOCSIN_CHAOS_LONG").is_some();
        let k = if long { 10 } else { 1 };
        Scale {
            groups: 100 * k,
            alerts_per_group: 100,
            alerts_per_request: 10,
            load: Duration::from_secs(60 * k as u64),
            kill_every: Duration::from_millis(2500),
            min_kills: 20 * k,
        }
    }

    fn alerts(&self) -> usize {
        self.groups * self.alerts_per_group
    }

    fn batches(&self) -> usize {
        self.alerts_per_group / self.alerts_per_request
    }
}

/// The NATS the services run on: one server, or a 3-node cluster.
enum Bus {
    Single(Box<NatsServer>),
    Cluster(NatsCluster),
}

impl Bus {
    fn address(&self) -> String {
        match self {
            Bus::Single(n) => n.address(),
            Bus::Cluster(c) => c.address(),
        }
    }

    fn password(&self, who: &str) -> &str {
        match self {
            Bus::Single(n) => n.password(who),
            Bus::Cluster(c) => c.password(who),
        }
    }

    fn replicas(&self) -> usize {
        match self {
            Bus::Single(_) => 1,
            Bus::Cluster(_) => 3,
        }
    }

    /// An admin client that reconnects by itself (to any node).
    async fn client(&self) -> async_nats::Client {
        async_nats::ConnectOptions::with_user_and_password(
            "admin".into(),
            self.password("admin").to_string(),
        )
        .retry_on_initial_connect()
        .connect(
            self.address()
                .split(',')
                .map(str::to_string)
                .collect::<Vec<_>>(),
        )
        .await
        .expect("connect as admin")
    }

    fn log(&self) -> String {
        match self {
            Bus::Single(n) => n.log(),
            Bus::Cluster(c) => c.logs(),
        }
    }
}

/// One instance's config (`name` a or b): its own ingest and chat-ops
/// ports and data directories, every service with its own NATS user, the
/// notifier with every channel at the fakes and production rate limits
/// (PagerDuty 2 events/s, webhooks 5/s, Slack 1/s, SMS 1/s).
fn config(
    bus: &Bus,
    fakes: &FakeProviders,
    smtp: &SmtpSink,
    dir: &Path,
    name: &str,
    ports: (u16, u16),
) -> PathBuf {
    let (ingest_port, chatops_port) = ports;
    let guard = |rate: u32| {
        Some(format!(
            "{{timeout: 5s, rate_per_second: {rate}, burst: {rate}, breaker: {{failures: 5, open_for: 1s, successes: 2}}}}"
        ))
    };
    let setup = Setup {
        guard: guard(5).unwrap(),
        slack_guard: guard(1),
        pagerduty_guard: guard(2),
        sms_guard: guard(1),
        ..Setup::default()
    };
    let indent = |s: &str| -> String { s.lines().map(|l| format!("  {l}\n")).collect() };
    let mut credentials = String::new();
    for who in SERVICES {
        credentials.push_str(&format!(
            "    {who}: {{user: {who}, password: {}}}\n",
            bus.password(who)
        ));
    }
    let runbooks = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../runbooks");
    let text = format!(
        r#"nats:
  url: {url}
  reconnect_max_delay: 250ms
  credentials:
{credentials}jetstream:
  replicas: {replicas}
  alerts_max_bytes: 268435456
  incidents_max_bytes: 268435456
  commands_max_bytes: 67108864
  notify_max_bytes: 67108864
  dead_letter_max_bytes: 67108864
ingest:
  listen: 127.0.0.1:{ingest_port}
  tokens:
    - source: alertmanager
      token: ${{TOCSIN_INGEST_TOKEN}}
incidents:
  data_dir: {data}/incidents-{name}
  lease_ttl: 2s
escalation:
  data_dir: {data}/escalation-{name}
  lease_ttl: 2s
{policy}notifier:
{notifier}chatops:
  listen: 127.0.0.1:{chatops_port}
  slack:
    signing_secret: {SLACK_SECRET}
    response_url_prefixes: ["{fakes_url}/slack/actions/"]
remediation:
  runbook_dirs: ["{runbooks}"]
  allowed_programs: [kubectl, systemctl, find]
  ack_wait: 5s
"#,
        url = bus.address(),
        replicas = bus.replicas(),
        data = dir.display(),
        policy = indent(POLICY.trim_start_matches('\n')),
        notifier = indent(&notifier_section(fakes, smtp, &setup)),
        fakes_url = fakes.base_url(),
        runbooks = runbooks.display(),
    );
    let path = dir.join(format!("tocsin-{name}.yaml"));
    std::fs::write(&path, text).unwrap();
    path
}

/// The operator's config for `tocsin ack`.
fn operator_config(bus: &Bus, dir: &Path) -> PathBuf {
    let path = dir.join("operator.yaml");
    std::fs::write(
        &path,
        format!(
            "nats:\n  url: {}\n  credentials:\n    operator: {{user: operator, password: {}}}\n",
            bus.address(),
            bus.password("operator")
        ),
    )
    .unwrap();
    path
}

/// Group `g`'s webhook with its alerts `batch * n .. (batch + 1) * n`, as
/// Alertmanager (v4) sends it.
fn webhook(g: usize, batch: usize, n: usize, starts_at: &str) -> Value {
    let service = format!("chaos-{g:04}");
    let alerts: Vec<Value> = (batch * n..(batch + 1) * n)
        .map(|i| {
            json!({
                "status": "firing",
                "labels": {
                    "alertname": "ChaosDown",
                    "service": service,
                    "severity": "critical",
                    "instance": instance(g, i),
                },
                "annotations": {"summary": format!("{service} is down")},
                "startsAt": starts_at,
                "endsAt": "0001-01-01T00:00:00Z",
                "generatorURL": "http://prometheus:9090/graph?g0.expr=up%3D%3D0",
                "fingerprint": format!("{:016x}", (g as u64) << 32 | i as u64),
            })
        })
        .collect();
    json!({
        "version": "4",
        "groupKey": format!("{{}}:{{alertname=\"ChaosDown\", service=\"{service}\"}}"),
        "truncatedAlerts": 0,
        "status": "firing",
        "receiver": "tocsin",
        "groupLabels": {"alertname": "ChaosDown", "service": service},
        "commonLabels": {"alertname": "ChaosDown", "service": service, "severity": "critical"},
        "commonAnnotations": {"summary": format!("{service} is down")},
        "externalURL": "http://alertmanager:9093",
        "alerts": alerts,
    })
}

fn instance(g: usize, i: usize) -> String {
    format!("chaos-{g:04}-{i:03}:9100")
}

/// The order of the requests: five groups at a time, each sending its
/// batches in turn, a new group starting when one is done, so incidents
/// open all through the run while others grow.
fn schedule(scale: &Scale) -> Vec<(usize, usize)> {
    let mut active: VecDeque<(usize, usize)> = VecDeque::new();
    let mut next_group = 0;
    let mut order = Vec::new();
    while order.len() < scale.groups * scale.batches() {
        while active.len() < 5 && next_group < scale.groups {
            active.push_back((next_group, 0));
            next_group += 1;
        }
        let (g, b) = active.pop_front().expect("a group is sending");
        order.push((g, b));
        if b + 1 < scale.batches() {
            active.push_back((g, b + 1));
        }
    }
    order
}

/// What the senders saw.
#[derive(Default)]
struct Sent {
    /// Alerts (by instance) in a request ingest answered 2xx.
    answered: BTreeSet<String>,
    requests: usize,
    /// Attempts that got no 2xx (refused, 503, timeout) and were sent again.
    retried: usize,
}

/// Posts the scheduled requests, spread over the load time, to the ingest
/// replicas in turn; a request that gets no 2xx goes to the other replica
/// after 200 ms, again and again (Alertmanager retries too).
async fn send_all(scale: &Scale, ports: [u16; 2], sent: Arc<Mutex<Sent>>) {
    let order = Arc::new(schedule(scale));
    let next = Arc::new(AtomicUsize::new(0));
    let started = tokio::time::Instant::now();
    let gap = scale.load / order.len() as u32;
    let n = scale.alerts_per_request;
    let starts_at = jiff::Timestamp::now().to_string();
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let (order, next, sent, client, starts_at) = (
            order.clone(),
            next.clone(),
            sent.clone(),
            client.clone(),
            starts_at.clone(),
        );
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                let Some(&(g, b)) = order.get(i) else { return };
                // Pacing of the steady flow, not a wait for an outcome.
                tokio::time::sleep_until(started + gap * i as u32).await;
                let body = webhook(g, b, n, &starts_at);
                let mut attempt = 0usize;
                let deadline = Instant::now() + settle_limit();
                loop {
                    let port = ports[(i + attempt) % 2];
                    let r = client
                        .post(format!(
                            "http://127.0.0.1:{port}/api/v1/alerts/alertmanager"
                        ))
                        .bearer_auth(TOKEN)
                        .json(&body)
                        .send()
                        .await;
                    match r {
                        Ok(r) if r.status().is_success() => break,
                        Ok(r) if r.status().is_client_error() => panic!(
                            "ingest refused a webhook: {} {}",
                            r.status(),
                            r.text().await.unwrap_or_default()
                        ),
                        _ => {}
                    }
                    attempt += 1;
                    assert!(
                        Instant::now() < deadline,
                        "no ingest replica took webhook {i} within {:?}",
                        settle_limit()
                    );
                    // Alertmanager's retry pause, not a wait for an outcome.
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                let mut s = sent.lock().unwrap();
                s.requests += 1;
                s.retried += attempt;
                s.answered
                    .extend((b * n..(b + 1) * n).map(|a| instance(g, a)));
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

/// What the INCIDENTS stream says so far about openings and
/// acknowledgements (read while the chaos runs, to pick what to ack).
#[derive(Default)]
struct Seen {
    /// id -> (number, when escalation starts counting: the opening's
    /// own time, or the end of its group wait; ns).
    opened: BTreeMap<uuid::Uuid, (u64, i128)>,
    /// id -> when the first acknowledgement was stored, ns.
    acked: BTreeMap<uuid::Uuid, i128>,
}

/// Follows the opened and acknowledged entries of INCIDENTS into `seen`
/// until `stop`; NATS going away only pauses it.
async fn follow(js: jetstream::Context, seen: Arc<Mutex<Seen>>, stop: CancellationToken) {
    let filters = [kind::OPENED, kind::ACKNOWLEDGED].map(incident_events_kind);
    let mut from = 1;
    while !stop.is_cancelled() {
        if let Ok(raws) = try_read(&js, STREAM_INCIDENTS, from, &filters).await {
            let mut s = seen.lock().unwrap();
            for r in raws {
                from = r.seq + 1;
                let Ok(env) = decode_envelope::<LogEntry>(&r.payload) else {
                    continue;
                };
                let LogEntry::Incident(e) = env.body else {
                    continue;
                };
                match e.kind {
                    EventKind::Opened { .. } => {
                        let start = e.incident.announce_at.max(e.at).as_nanosecond();
                        s.opened.insert(e.incident.id, (e.incident.number, start));
                    }
                    EventKind::Acknowledged => {
                        s.acked.entry(e.incident.id).or_insert(r.time_ns);
                    }
                    _ => {}
                }
            }
        }
        // Poll interval of a follower, not a wait to prove anything.
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// How each acknowledgement went.
#[derive(Default)]
struct Acks {
    cli: usize,
    slack: usize,
    /// Presses/commands that had to be repeated (chat-ops, incidents or
    /// NATS was down): tried again while no acknowledgement was stored.
    repeated: usize,
    /// Tries made again although the acknowledgement was already stored
    /// (the stream's own time of the entry is before the try): this
    /// test's reader of INCIDENTS, which pauses while a NATS node is away,
    /// had not seen it within the operator's 8 s. Not the engine's doing.
    seen_late: usize,
    /// Milliseconds from an operator's first try to the stored
    /// acknowledgement, per incident acked.
    waits_ms: Vec<i128>,
    /// What the tries that were not followed by an acknowledgement within
    /// 8 s were answered (the answer's start), and how often.
    unheeded: BTreeMap<String, usize>,
}

/// Acknowledges a sample of incidents as operators would: 30% between
/// 0.5 and 4 s after they open (before level 1 is due), 10% between 12
/// and 16 s after (after it was due); alternately with `tocsin ack` and a
/// signed Slack button press at either chat-ops replica. An operator who
/// sees no acknowledgement within 8 s acts again.
async fn operators(
    mut rng: TestRng,
    seen: Arc<Mutex<Seen>>,
    operator_cfg: PathBuf,
    chatops: [u16; 2],
    fakes_url: String,
    acks: Arc<Mutex<Acks>>,
    stop: CancellationToken,
) -> Vec<(uuid::Uuid, String)> {
    let mut decided = BTreeSet::new();
    let mut tasks = Vec::new();
    let mut turn = 0usize;
    while !stop.is_cancelled() {
        let new: Vec<(uuid::Uuid, u64, i128)> = {
            let s = seen.lock().unwrap();
            s.opened
                .iter()
                .filter(|(id, _)| !decided.contains(*id))
                .map(|(id, (n, t))| (*id, *n, *t))
                .collect()
        };
        for (id, number, opened_ns) in new {
            decided.insert(id);
            let roll = rng.below(100);
            let after_ms = match roll {
                0..30 => 500 + rng.below(3500),
                30..40 => 12_000 + rng.below(4000),
                _ => continue,
            };
            turn += 1;
            let via_slack = turn.is_multiple_of(2);
            let (seen, cfg, acks, fakes_url) = (
                seen.clone(),
                operator_cfg.clone(),
                acks.clone(),
                fakes_url.clone(),
            );
            let port = chatops[turn / 2 % 2];
            tasks.push(tokio::spawn(async move {
                let now_ns = now_ns();
                let at = opened_ns + after_ms as i128 * 1_000_000;
                if at > now_ns {
                    // The operator's reaction time, not a wait for an outcome.
                    tokio::time::sleep(Duration::from_nanos((at - now_ns) as u64)).await;
                }
                let deadline = Instant::now() + settle_limit();
                let first_try_ns = self::now_ns();
                let mut tries = 0;
                let mut unheeded = Vec::new();
                let mut tried_ns = Vec::new();
                loop {
                    tries += 1;
                    tried_ns.push(self::now_ns());
                    let answer = if via_slack {
                        press_ack(port, id, &fakes_url).await
                    } else {
                        cli_ack(&cfg, number).await
                    };
                    let done = eventually_within(Duration::from_secs(8), || async {
                        if seen.lock().unwrap().acked.contains_key(&id) {
                            Ok(())
                        } else {
                            Err(())
                        }
                    })
                    .await;
                    if done.is_ok() {
                        break;
                    }
                    unheeded.push(answer.chars().take(70).collect::<String>());
                    if Instant::now() >= deadline {
                        return Err((
                            id,
                            format!(
                                "incident #{number} ({id}) never acknowledged: {tries} tries by {}, the last answered {answer}",
                                if via_slack { "Slack" } else { "tocsin ack" }
                            ),
                        ));
                    }
                }
                let acked_ns = seen.lock().unwrap().acked[&id];
                // The try after each unheeded one: made before or after
                // the acknowledgement was stored.
                let again = &tried_ns[1..];
                let seen_late = again.iter().filter(|t| **t > acked_ns).count();
                let mut a = acks.lock().unwrap();
                a.waits_ms.push((acked_ns - first_try_ns) / 1_000_000);
                for (u, then) in unheeded.into_iter().zip(again) {
                    let u = if *then > acked_ns {
                        format!("{u} (stored by then, seen late)")
                    } else {
                        u
                    };
                    *a.unheeded.entry(u).or_default() += 1;
                }
                a.seen_late += seen_late;
                if via_slack {
                    a.slack += 1;
                } else {
                    a.cli += 1;
                }
                a.repeated += tries - 1 - seen_late;
                Ok(())
            }));
        }
        // Poll interval of the operators' screen, not a wait for an outcome.
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut failed = Vec::new();
    for t in tasks {
        if let Err(e) = t.await.unwrap() {
            failed.push(e);
        }
    }
    failed
}

fn now_ns() -> i128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as i128
}

/// `tocsin ack <number> --as bob` (whatever it answers: the operator
/// checks the incident afterwards); what it answered, for a report.
async fn cli_ack(config: &Path, number: u64) -> String {
    let out = tokio::process::Command::new(bin())
        .arg("--config")
        .arg(config)
        .args(["ack", &number.to_string(), "--as", "bob"])
        .stdin(std::process::Stdio::null())
        .output()
        .await;
    match out {
        Ok(o) => format!(
            "{}: {}{}",
            o.status,
            String::from_utf8_lossy(&o.stdout).trim(),
            String::from_utf8_lossy(&o.stderr).trim()
        ),
        Err(e) => format!("not started: {e}"),
    }
}

/// alice presses Acknowledge on the incident's Slack message; a request
/// signed as Slack signs it, to chat-ops on `port`.
async fn press_ack(port: u16, id: uuid::Uuid, fakes_url: &str) -> String {
    let body = block_actions_body(
        "U01ALICE",
        slack_actions::ACK,
        &id.to_string(),
        &format!("{fakes_url}/slack/actions/1"),
    );
    let ts = jiff::Timestamp::now().as_second();
    let r = reqwest::Client::new()
        .post(format!("http://127.0.0.1:{port}/slack/actions"))
        .timeout(Duration::from_secs(10))
        .header("content-type", "application/x-www-form-urlencoded")
        .header("x-slack-request-timestamp", ts.to_string())
        .header(
            "x-slack-signature",
            slack_signature(SLACK_SECRET, ts, &body),
        )
        .body(body)
        .send()
        .await;
    match r {
        Ok(r) => format!("{} {}", r.status(), r.text().await.unwrap_or_default()),
        Err(e) => format!("no answer: {e}"),
    }
}

/// Every process: two instances of each service.
struct Fleet {
    procs: Vec<(String, Proc)>,
}

impl Fleet {
    fn start(configs: &[PathBuf; 2], dir: &Path) -> Fleet {
        let mut procs = Vec::new();
        for (i, cfg) in configs.iter().enumerate() {
            for svc in SERVICES {
                let name = format!("{svc}-{}", ["a", "b"][i]);
                procs.push((name, Proc::start(cfg, dir, &[svc])));
            }
        }
        Fleet { procs }
    }

    async fn ready(&mut self) {
        for (_, p) in self.procs.iter_mut() {
            p.ready().await;
        }
    }

    fn logs(&self) -> String {
        self.procs
            .iter()
            .map(|(n, p)| {
                let log = p.log_text();
                let tail: Vec<&str> = log.lines().rev().take(40).collect();
                format!(
                    "\n----- {n} (last 40 lines)\n{}",
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                )
            })
            .collect()
    }

    /// Every line of `service`'s processes that speaks of its lease or of
    /// NATS coming and going, in time order (each line starts with its
    /// time): what a failed tenure check needs.
    fn lease_story(&self, service: &str) -> String {
        self.lines(
            |n| n.starts_with(&format!("{service}-")),
            |l| l.contains("lease") || l.contains("NATS") || l.contains("Starting"),
        )
    }

    /// Every line of every process that names one of `words`, in time
    /// order.
    fn lines_naming(&self, words: &[String]) -> String {
        self.lines(|_| true, |l| words.iter().any(|w| l.contains(w.as_str())))
    }

    /// The lines `line` keeps of the processes `process` keeps (by name),
    /// each with its process's name, in time order (each line starts with
    /// its time).
    fn lines(&self, process: impl Fn(&str) -> bool, line: impl Fn(&str) -> bool) -> String {
        let mut lines: Vec<String> = self
            .procs
            .iter()
            .filter(|(n, _)| process(n))
            .flat_map(|(n, p)| {
                p.log_text()
                    .lines()
                    .filter(|l| line(l))
                    .map(|l| format!("{l} [{n}]"))
                    .collect::<Vec<_>>()
            })
            .collect();
        lines.sort();
        lines.join("\n")
    }
}

/// What the chaos driver did.
#[derive(Default)]
struct Chaos {
    kills: BTreeMap<String, usize>,
    nats: Vec<String>,
}

/// Kills a random process every `kill_every` (every process once first, in
/// a random order) and starts it again at once, until the load is done and
/// at least `min_kills` were made; takes NATS away twice on the way.
async fn run_chaos(
    scale: &Scale,
    mut rng: TestRng,
    fleet: &mut Fleet,
    bus: &mut Bus,
    load_done: &CancellationToken,
) -> Chaos {
    let mut chaos = Chaos::default();
    let n = fleet.procs.len();
    let mut first_round: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        first_round.swap(i, rng.below(i as u64 + 1) as usize);
    }
    // When NATS goes away (after that many kills): one server is SIGKILLed
    // and later SIGTERMed; one node of a cluster is SIGKILLed.
    let nats_at: Vec<usize> = match bus {
        Bus::Single(_) => vec![scale.min_kills / 3, 2 * scale.min_kills / 3],
        Bus::Cluster(_) => vec![scale.min_kills / 2],
    };
    let mut made = 0usize;
    let mut tick = tokio::time::interval(scale.kill_every);
    tick.tick().await;
    while made < scale.min_kills || !load_done.is_cancelled() {
        tick.tick().await;
        let i = first_round
            .get(made)
            .copied()
            .unwrap_or_else(|| rng.below(n as u64) as usize);
        let (name, p) = &mut fleet.procs[i];
        p.restart();
        *chaos
            .kills
            .entry(name.rsplit_once('-').unwrap().0.to_string())
            .or_default() += 1;
        made += 1;
        if !nats_at.contains(&made) {
            continue;
        }
        let what = match bus {
            Bus::Single(s) if chaos.nats.is_empty() => {
                s.stop();
                "nats-server SIGKILL".to_string()
            }
            Bus::Single(s) => {
                s.terminate();
                "nats-server SIGTERM".to_string()
            }
            Bus::Cluster(c) => {
                let node = rng.below(c.len() as u64) as usize;
                c.node(node).stop();
                format!("nats node {} SIGKILL", node + 1)
            }
        };
        // NATS stays away for a moment (clients notice, ingest answers
        // 503, a cluster elects new stream leaders), not a wait for an
        // outcome.
        tokio::time::sleep(Duration::from_secs(3)).await;
        match bus {
            Bus::Single(s) => s.restart().await,
            Bus::Cluster(c) => {
                for node in 0..c.len() {
                    if !c.node(node).is_running() {
                        c.node(node).restart().await;
                    }
                }
            }
        }
        chaos.nats.push(what);
    }
    chaos
}

/// The whole scenario on `bus`; prints the table and asserts on it.
async fn scenario(test: &str, mut bus: Bus) {
    let t0 = Instant::now();
    let scale = Scale::from_env();
    let mut rng = TestRng::new(test);
    let fakes = FakeProviders::start().await;
    let smtp = SmtpSink::start().await;
    let mut dir = tempfile::tempdir().unwrap();
    if std::env::var_os("TOCSIN_CHAOS_KEEP").is_some() {
        // Every process's log (one file per start) stays for a look.
        dir.disable_cleanup(true);
        eprintln!("{test}: logs and data kept in {}", dir.path().display());
    }
    let ingest = [free_port(), free_port()];
    let chatops = [free_port(), free_port()];
    let configs = [
        config(
            &bus,
            &fakes,
            &smtp,
            dir.path(),
            "a",
            (ingest[0], chatops[0]),
        ),
        config(
            &bus,
            &fakes,
            &smtp,
            dir.path(),
            "b",
            (ingest[1], chatops[1]),
        ),
    ];
    let operator_cfg = operator_config(&bus, dir.path());
    let mut fleet = Fleet::start(&configs, dir.path());
    fleet.ready().await;
    let client = bus.client().await;
    let js = jetstream::new(client.clone());

    let stop = CancellationToken::new();
    let seen = Arc::new(Mutex::new(Seen::default()));
    let follower = tokio::spawn(follow(js.clone(), seen.clone(), stop.clone()));
    let acks = Arc::new(Mutex::new(Acks::default()));
    let stop_operators = CancellationToken::new();
    let operators = tokio::spawn(operators(
        rng.fork(),
        seen.clone(),
        operator_cfg,
        chatops,
        fakes.base_url(),
        acks.clone(),
        stop_operators.clone(),
    ));
    let sent = Arc::new(Mutex::new(Sent::default()));
    let load_done = CancellationToken::new();
    let load = {
        let (sent, done) = (sent.clone(), load_done.clone());
        let scale = Scale::from_env();
        tokio::spawn(async move {
            send_all(&scale, ingest, sent).await;
            done.cancel();
        })
    };
    let chaos = run_chaos(&scale, rng.fork(), &mut fleet, &mut bus, &load_done).await;
    load.await.unwrap();
    let chaos_secs = t0.elapsed().as_secs_f64();
    fleet.ready().await;

    // Settle: every group has its incident, and every incident opened has
    // been seen by the operators (so the sampled acks are under way).
    eventually_within(settle_limit(), || async {
        let n = seen.lock().unwrap().opened.len();
        if n >= scale.groups {
            Ok(())
        } else {
            Err(n)
        }
    })
    .await
    .unwrap_or_else(|n| {
        panic!(
            "{n} of {} incidents opened{}\n{}",
            scale.groups,
            fleet.logs(),
            bus.log()
        )
    });
    // One last look at the screen after every incident is known.
    let last_open = seen
        .lock()
        .unwrap()
        .opened
        .values()
        .map(|(_, t)| *t)
        .max()
        .unwrap();
    // Every level-1 due time has passed, and the late acks (up to 16 s
    // after opening) were made.
    let wait_until = last_open + 17_000_000_000;
    let now = now_ns();
    if wait_until > now {
        // The policy's own clock: level 1 and the late acks are due by
        // then; this waits for them to be due, not to prove anything.
        tokio::time::sleep(Duration::from_nanos((wait_until - now) as u64)).await;
    }
    // The operators stop looking and finish what they started (they wait
    // for their acknowledgements through the follower, stopped after them).
    stop_operators.cancel();
    let unacked = operators.await.unwrap();
    if !unacked.is_empty() {
        let (ids, reports): (Vec<String>, Vec<String>) = unacked
            .into_iter()
            .map(|(id, report)| (id.to_string(), report))
            .unzip();
        panic!(
            "{}\nwhat the processes said of those incidents:\n{}\nthe incidents and chat-ops instances' lease and NATS lines:\n{}\n{}{}",
            reports.join("\n"),
            fleet.lines_naming(&ids),
            fleet.lease_story("incidents"),
            fleet.lease_story("chatops"),
            fleet.logs()
        );
    }
    stop.cancel();
    follower.await.unwrap();
    let (opened, acked) = {
        let s = seen.lock().unwrap();
        (s.opened.clone(), s.acked.clone())
    };
    let sent = std::mem::take(&mut *sent.lock().unwrap());

    // Pages due to incidents nobody acknowledged: level 0 to the webhook
    // and PagerDuty, level 1 to the webhook. Wait for those, then for the
    // pipeline to be idle.
    let never_acked: BTreeSet<u64> = opened
        .iter()
        .filter(|(id, _)| !acked.contains_key(id))
        .map(|(_, (n, _))| *n)
        .collect();
    let pages_of = |f: &FakeProviders| -> BTreeMap<(u64, u64), Vec<String>> {
        let mut m: BTreeMap<(u64, u64), Vec<String>> = BTreeMap::new();
        for w in f.webhooks() {
            if w.body["page"].is_null() {
                continue;
            }
            let n = w.body["incident"]["number"].as_u64().unwrap_or(0);
            let level = w.body["page"]["level"].as_u64().unwrap_or(99);
            m.entry((n, level))
                .or_default()
                .push(w.body["page"]["id"].as_str().unwrap_or("").to_string());
        }
        m
    };
    let waited = eventually_within(settle_limit(), || async {
        let pages = pages_of(&fakes);
        let missing = never_acked
            .iter()
            .filter(|n| !pages.contains_key(&(**n, 0)) || !pages.contains_key(&(**n, 1)))
            .count();
        if missing == 0 {
            Ok(())
        } else {
            Err(missing)
        }
    })
    .await;
    if let Err(missing) = waited {
        panic!(
            "{missing} unacknowledged incidents still lack a page after {:?}; rejected {:?}{}",
            settle_limit(),
            fakes.rejected(),
            fleet.logs()
        );
    }
    tocsin_tests::notifier::settled(&js, settle_limit()).await;

    // The record. An alert stored just before a kill (of incidents, or of
    // the NATS node it read from) may be decided after everything above
    // settled: the incidents service reads ALERTS again from its saved
    // cursor. So the record is read until every alert answered 2xx is in
    // it, or the settle limit passes (then the count below says how many
    // never came).
    let log = match eventually_within(settle_limit(), || async {
        let log = read_raw(&js, STREAM_INCIDENTS).await;
        let decided = incidents_by_label(&log, "instance");
        if sent.answered.iter().all(|a| decided.contains_key(a)) {
            Ok(log)
        } else {
            Err(log)
        }
    })
    .await
    {
        Ok(log) | Err(log) => log,
    };
    // Each alert's incidents (by its `instance`), each group's (`service`).
    let incident_of = incidents_by_label(&log, "instance");
    let groups = incidents_by_label(&log, "service");
    let mut msg_ids = BTreeSet::new();
    let entries_twice = log.iter().filter(|r| !msg_ids.insert(&r.msg_id)).count();
    let in_none = sent
        .answered
        .iter()
        .filter(|a| !incident_of.contains_key(*a))
        .count();
    let in_several = incident_of.values().filter(|s| s.len() > 1).count();
    let groups_duplicated = groups.values().filter(|s| s.len() > 1).count();
    let incident_terms =
        std::panic::catch_unwind(|| terms_never_go_back(&log, "incidents", STREAM_INCIDENTS))
            .unwrap_or_else(|e| {
                eprintln!(
                    "the incidents instances' lease and NATS log lines:\n{}",
                    fleet.lease_story("incidents")
                );
                std::panic::resume_unwind(e)
            });
    every_tenure_fenced(&log, STREAM_INCIDENTS);

    // Pages, from the receivers: per incident and level, the page ids
    // delivered (one webhook call per webhook-id, as a de-duplicating
    // receiver records them).
    let pages = pages_of(&fakes);
    let number_of: BTreeMap<u64, uuid::Uuid> =
        opened.iter().map(|(id, (n, _))| (*n, *id)).collect();
    let due_ns = |n: u64, level: u64| -> i128 {
        let (_, t) = opened[&number_of[&n]];
        t + level as i128 * LEVEL_DELAY.as_nanos() as i128
    };
    let (mut expected, mut delivered, mut duplicated, mut lost, mut after_ack, mut skipped) =
        (0, 0, 0, 0, 0, 0);
    let mut after_ack_detail = Vec::new();
    for (n, id) in &number_of {
        let ack = acked.get(id).copied();
        for level in [0u64, 1] {
            let got = pages.get(&(*n, level)).map_or(0, Vec::len);
            delivered += got;
            if got > 1 {
                duplicated += got - 1;
            }
            let due = due_ns(*n, level);
            match ack {
                None => {
                    expected += 1;
                    if got == 0 {
                        lost += 1;
                    }
                }
                Some(a) if a + (ACK_MARGIN.as_nanos() as i128) < due => {
                    after_ack += got;
                    if got > 0 {
                        let start = due_ns(*n, 0);
                        after_ack_detail.push(format!(
                            "#{n} level {level}: acknowledged {:.2} s after the start, due {:.2} s after it",
                            (a - start) as f64 / 1e9,
                            (due - start) as f64 / 1e9
                        ));
                    }
                }
                // Acknowledged after it fell due: sent once, or not at all
                // when the acknowledgement overtook it.
                Some(_) => {
                    expected += 1;
                    if got == 0 {
                        skipped += 1;
                    }
                }
            }
        }
    }
    let pd_alerts = fakes.pagerduty_alerts();
    let pd_triggers = fakes
        .pagerduty_events()
        .iter()
        .filter(|e| e["event_action"] == "trigger")
        .count();
    let acks = std::mem::take(&mut *acks.lock().unwrap());
    let acked_early = acked
        .iter()
        .filter(|(id, t)| {
            let (n, _) = opened[*id];
            **t + (ACK_MARGIN.as_nanos() as i128) < due_ns(n, 1)
        })
        .count();

    let row = |k: &str, v: String| eprintln!("  {k:<44} {v}");
    eprintln!(
        "\nchaos table ({test}; seed above; {:.0} s of chaos, {:.0} s in all):",
        chaos_secs,
        t0.elapsed().as_secs_f64()
    );
    row(
        "alerts sent / answered 2xx",
        format!("{} / {}", scale.alerts(), sent.answered.len()),
    );
    row(
        "webhook requests / attempts retried",
        format!("{} / {}", sent.requests, sent.retried),
    );
    row(
        "alerts in no incident / in two or more",
        format!("{in_none} / {in_several}"),
    );
    row(
        "incidents expected / opened / duplicated",
        format!("{} / {} / {groups_duplicated}", scale.groups, opened.len()),
    );
    row(
        "INCIDENTS entries / stored twice",
        format!("{} / {entries_twice}", log.len()),
    );
    row(
        "incidents acked (before level 1 due / after)",
        format!(
            "{} ({acked_early} / {}), cli {} slack {}, repeated {} (+{} already stored, seen late)",
            acked.len(),
            acked.len() - acked_early,
            acks.cli,
            acks.slack,
            acks.repeated,
            acks.seen_late
        ),
    );
    let mut waits = acks.waits_ms.clone();
    waits.sort();
    row(
        "first ack try to its entry (median / max)",
        match (waits.get(waits.len() / 2), waits.last()) {
            (Some(m), Some(x)) => format!("{m} ms / {x} ms"),
            _ => "-".into(),
        },
    );
    for (answer, n) in &acks.unheeded {
        row(
            "  a try not heeded within 8 s, answered",
            format!("{n}x {answer}"),
        );
    }
    row(
        "webhook pages due / sent / duplicated / lost",
        format!("{expected} / {delivered} / {duplicated} / {lost}"),
    );
    row("pages after ack", after_ack.to_string());
    row(
        "pages not sent, ack came first (allowed)",
        skipped.to_string(),
    );
    row(
        "PagerDuty alerts / triggers sent",
        format!("{} / {pd_triggers}", pd_alerts.len()),
    );
    row(
        "kills per service",
        chaos
            .kills
            .iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect::<Vec<_>>()
            .join(", "),
    );
    row(
        "kills in all",
        chaos.kills.values().sum::<usize>().to_string(),
    );
    row("NATS restarts", chaos.nats.join(", "));
    row("incidents lease terms", incident_terms.len().to_string());

    assert_eq!(
        sent.answered.len(),
        scale.alerts(),
        "every alert answered 2xx"
    );
    assert_eq!(in_none, 0, "alerts answered 2xx but in no incident");
    assert_eq!(in_several, 0, "alerts in two incidents");
    assert_eq!(opened.len(), scale.groups, "one incident per group");
    assert_eq!(groups_duplicated, 0, "a group in two incidents");
    assert_eq!(entries_twice, 0, "INCIDENTS entries stored twice");
    assert_eq!(lost, 0, "pages lost");
    assert_eq!(duplicated, 0, "pages delivered twice");
    assert_eq!(
        after_ack, 0,
        "pages after an acknowledgement: {after_ack_detail:?}"
    );
    // PagerDuty: an alert (dedup key = incident id) for every incident
    // nobody acknowledged, none for anything else.
    let pd_keys: BTreeSet<String> = pd_alerts.iter().map(|a| a.dedup_key.clone()).collect();
    for (id, (n, _)) in &opened {
        if never_acked.contains(n) {
            assert!(
                pd_keys.contains(&id.to_string()),
                "no PagerDuty alert for #{n}"
            );
        }
    }
    assert!(pd_keys.len() <= opened.len());
    assert!(chaos.kills.values().sum::<usize>() >= scale.min_kills);
    assert_eq!(
        chaos.kills.len(),
        SERVICES.len(),
        "every service was killed"
    );
    assert!(fakes.rejected().is_empty(), "{:?}", fakes.rejected());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_every_process_killed_and_nats_restarted_nothing_lost_or_duplicated() {
    scenario(
        "chaos_every_process_killed_and_nats_restarted_nothing_lost_or_duplicated",
        Bus::Single(Box::new(NatsServer::start().await)),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_on_a_three_node_nats_cluster_with_a_node_killed() {
    scenario(
        "chaos_on_a_three_node_nats_cluster_with_a_node_killed",
        Bus::Cluster(NatsCluster::start().await),
    )
    .await;
}

/// For each value of `label` on an alert that opened or joined an incident
/// in an INCIDENTS record, the incidents it went to.
fn incidents_by_label(
    log: &[crate::support::Raw],
    label: &str,
) -> BTreeMap<String, BTreeSet<uuid::Uuid>> {
    let mut out: BTreeMap<String, BTreeSet<uuid::Uuid>> = BTreeMap::new();
    for r in log {
        for entry in r.entries().unwrap_or_default() {
            let LogEntry::Incident(e) = entry else {
                continue;
            };
            for alert in e.kind.alerts() {
                if let Some(v) = alert.labels.get(label) {
                    out.entry(v.clone()).or_default().insert(e.incident.id);
                }
            }
        }
    }
    out
}
