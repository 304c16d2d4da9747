//! Failover: two `tocsin incidents` and two `tocsin escalation` processes
//! (each pair sharing one lease, each process with its own data directory),
//! ingest, and alerts posted steadily. The active incidents process is
//! SIGKILLed again and again; each time the standby takes over by itself,
//! catches up and opens the next incident. The same for escalation: a page
//! due after the kill is still published exactly once. Afterwards, from the
//! streams: every alert ingest accepted is in exactly one incident, no
//! incident id or number twice, no INCIDENTS entry twice, every page once,
//! and the lease terms in the `Tocsin-Lease` header of every INCIDENTS and
//! NOTIFY message never go back (two instances never both acted).
//!
//! `TOCSIN_TEST_LEASE_TTL` (default 2s) sets `lease_ttl`; the failover times
//! (kill -> the standby's first new incident, as stored by JetStream) are
//! printed with their median.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use async_nats::jetstream;
use tocsin_proto::{
    codec::{decode_envelope, decode_pages},
    incident::{EventKind, LogEntry},
    notify::Page,
    subjects::{STREAM_INCIDENTS, STREAM_NOTIFY},
};
use tocsin_tests::{eventually_within, NatsServer};

use crate::support::{
    alert, every_tenure_fenced, free_port, post_alerts, read_raw, terms_never_go_back, Proc, Raw,
};

/// Kills of the active incidents process.
const INCIDENTS_KILLS: usize = 5;
/// Kills of the active escalation process.
const ESCALATION_KILLS: usize = 2;
/// How long a standby may take (lease TTL, catch-up, process start).
const TAKEOVER: Duration = Duration::from_secs(30);

fn lease_ttl() -> String {
    std::env::var("TOCSIN_TEST_LEASE_TTL").unwrap_or_else(|_| "2s".into())
}

/// A config for one instance (`name`): its own data directories, each
/// service connecting as its own NATS user (so the shipped permissions,
/// lease buckets included, are what the processes run with).
fn config(nats: &NatsServer, dir: &Path, ingest_port: u16, name: &str) -> PathBuf {
    config_with_ttl(nats, dir, ingest_port, name, &lease_ttl())
}

/// [`config`] with the lease TTL `ttl`.
fn config_with_ttl(
    nats: &NatsServer,
    dir: &Path,
    ingest_port: u16,
    name: &str,
    ttl: &str,
) -> PathBuf {
    config_with(nats, dir, ingest_port, name, ttl, "")
}

/// [`config_with_ttl`] with `extra` (top-level YAML sections) added.
fn config_with(
    nats: &NatsServer,
    dir: &Path,
    ingest_port: u16,
    name: &str,
    ttl: &str,
    extra: &str,
) -> PathBuf {
    let cred = |id: &str| {
        format!(
            "    {id}: {{user: {id}, password: {}}}\n",
            nats.password(id)
        )
    };
    let text = format!(
        r#"nats:
  url: {url}
  reconnect_max_delay: 250ms
  credentials:
{ingest}{incidents}{escalation}ingest:
  listen: 127.0.0.1:{ingest_port}
  tokens:
    - source: test
      token: ${{TOCSIN_INGEST_TOKEN}}
incidents:
  data_dir: {data}/incidents-{name}
  lease_ttl: {ttl}
escalation:
  data_dir: {data}/escalation-{name}
  lease_ttl: {ttl}
  route: {{policy: two}}
  policies:
    - name: two
      levels:
        - {{targets: [{{slack_channel: C0FIRST}}], delay: 4s}}
        - {{targets: [{{slack_channel: C0SECOND}}], delay: 1h}}
{extra}"#,
        url = nats.address(),
        ingest = cred("ingest"),
        incidents = cred("incidents"),
        escalation = cred("escalation"),
        data = dir.display(),
    );
    let path = dir.join(format!("tocsin-{name}.yaml"));
    std::fs::write(&path, text).unwrap();
    path
}

/// The alertname of an INCIDENTS `opened` entry, with the incident's id and number.
fn opened(raw: &Raw) -> Option<(String, String, u64)> {
    let env = decode_envelope::<LogEntry>(&raw.payload).ok()?;
    let LogEntry::Incident(e) = env.body else {
        return None;
    };
    let EventKind::Opened { alert, .. } = &e.kind else {
        return None;
    };
    Some((
        alert.labels.get("alertname")?.clone(),
        e.incident.id.to_string(),
        e.incident.number,
    ))
}

/// The number of INCIDENTS `opened` entries, once there are at least `n`.
async fn opened_at_least(n: usize, js: jetstream::Context) -> Result<usize, usize> {
    let have = read_raw(&js, STREAM_INCIDENTS)
        .await
        .iter()
        .filter(|r| opened(r).is_some())
        .count();
    if have >= n {
        Ok(have)
    } else {
        Err(have)
    }
}

fn ns_since_epoch(t: SystemTime) -> i128 {
    t.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_nanos() as i128
}

/// Each process's `/readyz` check for `role`, and its `tocsin_leader` value.
async fn role_state(p: &Proc, role: &str) -> (String, Option<i64>) {
    let client = reqwest::Client::new();
    let base = format!("http://127.0.0.1:{}", p.admin);
    let check = match client.get(format!("{base}/readyz")).send().await {
        Ok(r) => r
            .json::<serde_json::Value>()
            .await
            .ok()
            .and_then(|v| v["checks"][role].as_str().map(str::to_string))
            .unwrap_or_default(),
        Err(e) => format!("unreachable: {e}"),
    };
    let leader = metric(p, &format!("tocsin_leader{{role=\"{role}\"}} "))
        .await
        .map(|v| v as i64);
    (check, leader)
}

/// Which of `pair` is active (`/readyz` `ok` and `tocsin_leader` 1) while
/// the other stands by (`standby: ...`, 0).
async fn active_of(pair: &[Proc; 2], role: &str) -> usize {
    let found = eventually_within(TAKEOVER, || async {
        let a = role_state(&pair[0], role).await;
        let b = role_state(&pair[1], role).await;
        let ok = |s: &(String, Option<i64>)| s.0 == "ok" && s.1 == Some(1);
        let standby = |s: &(String, Option<i64>)| s.0.starts_with("standby: ") && s.1 == Some(0);
        match (ok(&a) && standby(&b), ok(&b) && standby(&a)) {
            (true, _) => Ok(0),
            (_, true) => Ok(1),
            _ => Err(format!("{a:?} / {b:?}")),
        }
    })
    .await;
    found.unwrap_or_else(|e| panic!("no one active {role} with a standby: {e}"))
}

/// Posts one new alert every 100 ms until told to stop; the names ingest
/// accepted (answered 200).
struct Poster {
    accepted: Arc<Mutex<Vec<String>>>,
    stop: tocsin_runtime::CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Poster {
    fn start(ingest_port: u16, prefix: &'static str) -> Poster {
        let accepted = Arc::new(Mutex::new(Vec::new()));
        let stop = tocsin_runtime::CancellationToken::new();
        let (acc, halt) = (accepted.clone(), stop.clone());
        let task = tokio::spawn(async move {
            let mut n = 0;
            while !halt.is_cancelled() {
                let name = format!("{prefix}{n:04}");
                post_alerts(ingest_port, &serde_json::json!([alert(&name, "firing")])).await;
                acc.lock().unwrap().push(name);
                n += 1;
                // Pacing of the steady flow, not a wait for an outcome.
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
        Poster {
            accepted,
            stop,
            task,
        }
    }

    async fn finish(self) -> Vec<String> {
        self.stop.cancel();
        self.task.await.unwrap();
        let v = self.accepted.lock().unwrap().clone();
        v
    }

    fn count(&self) -> usize {
        self.accepted.lock().unwrap().len()
    }
}

/// When the lease of `role` was last written (JetStream's time, ns).
async fn lease_writes(js: &jetstream::Context, role: &str) -> i128 {
    let stream = format!("KV_{}", tocsin_runtime::lease::bucket(role));
    let mut s = js.get_stream(&stream).await.expect("lease bucket");
    let last = s.info().await.expect("stream info").state.last_sequence;
    match s.get_raw_message(last).await {
        Ok(m) => m.time.unix_timestamp_nanos(),
        Err(_) => 0,
    }
}

/// The highest term of `role` seen on `stream`.
async fn max_term(js: &jetstream::Context, stream: &str, role: &str) -> u64 {
    read_raw(js, stream)
        .await
        .iter()
        .filter_map(|r| r.lease.as_ref())
        .filter(|(r, _)| r == role)
        .map(|(_, t)| *t)
        .max()
        .unwrap_or(0)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn kill_signal(p: &Proc, signal: &str) {
    let pid = p.child.as_ref().expect("running").id().to_string();
    let status = std::process::Command::new("kill")
        .args([signal, &pid])
        .status()
        .unwrap();
    assert!(status.success(), "kill {signal} {pid}");
}

/// What [`pairs`] started.
struct Pairs {
    ingest_port: u16,
    _ingest: Proc,
    incidents: [Proc; 2],
    escalation: [Proc; 2],
}

/// Two configs (instances `a` and `b`) on `nats`, ingest on `a`, and two
/// incidents and two escalation processes (one on each config), each
/// ready: one of each pair active, the other its standby.
async fn pairs(nats: &NatsServer, dir: &Path) -> Pairs {
    pairs_with(nats, dir, "").await
}

/// [`pairs`] with `extra` added to both configs ([`config_with`]).
async fn pairs_with(nats: &NatsServer, dir: &Path, extra: &str) -> Pairs {
    let ingest_port = free_port();
    let ttl = lease_ttl();
    let (cfg_a, cfg_b) = (
        &config_with(nats, dir, ingest_port, "a", &ttl, extra),
        &config_with(nats, dir, ingest_port, "b", &ttl, extra),
    );
    let mut ingest = Proc::start(cfg_a, dir, &["ingest"]);
    ingest.ready().await;
    let mut incidents = [
        Proc::start(cfg_a, dir, &["incidents"]),
        Proc::start(cfg_b, dir, &["incidents"]),
    ];
    let mut escalation = [
        Proc::start(cfg_a, dir, &["escalation"]),
        Proc::start(cfg_b, dir, &["escalation"]),
    ];
    for p in incidents.iter_mut().chain(escalation.iter_mut()) {
        // A standby is ready too: it is doing its job, waiting.
        p.ready().await;
    }
    Pairs {
        ingest_port,
        _ingest: ingest,
        incidents,
        escalation,
    }
}

/// When the first incident opened under a lease term after `term` was
/// stored (ns); if none comes, panics with `what` and `standby`'s log.
async fn first_opened_after(
    js: &jetstream::Context,
    term: u64,
    standby: &Proc,
    what: &str,
) -> i128 {
    eventually_within(TAKEOVER, || async {
        read_raw(js, STREAM_INCIDENTS)
            .await
            .into_iter()
            .find(|r| r.lease.as_ref().is_some_and(|(_, t)| *t > term) && opened(r).is_some())
            .map(|r| r.time_ns)
            .ok_or("no incident opened by a new term yet")
    })
    .await
    .unwrap_or_else(|e| panic!("{what}{e}\n{}", standby.log_text()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_takes_over_and_nothing_is_lost_or_duplicated() {
    let nats = NatsServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let js = jetstream::new(nats.client().await);
    let Pairs {
        ingest_port,
        _ingest,
        mut incidents,
        mut escalation,
    } = pairs(&nats, dir.path()).await;
    active_of(&incidents, "incidents").await;
    active_of(&escalation, "escalation").await;

    let poster = Poster::start(ingest_port, "Failover");
    let mut failovers = Vec::new();
    for kill in 0..INCIDENTS_KILLS {
        // Alerts are flowing and being handled by the active one.
        let posted = poster.count();
        eventually_within(TAKEOVER, || opened_at_least(posted + 1, js.clone()))
            .await
            .expect("incidents opened before the kill");
        let active = active_of(&incidents, "incidents").await;
        let term = max_term(&js, STREAM_INCIDENTS, "incidents").await;
        let killed_at = ns_since_epoch(SystemTime::now());
        incidents[active].kill();
        let last_renewal = lease_writes(&js, "incidents").await;
        // The standby's first new incident, as stored by JetStream.
        let first =
            first_opened_after(&js, term, &incidents[1 - active], &format!("kill {kill}: ")).await;
        let secs = (first - killed_at) as f64 / 1e9;
        let taken = lease_writes(&js, "incidents").await;
        eprintln!(
            "failover {kill}: kill -> first new incident {secs:.2}s (last renewal {:.2}s \
             before the kill, the lease taken {:.2}s after it)",
            (killed_at - last_renewal) as f64 / 1e9,
            (taken - killed_at) as f64 / 1e9,
        );
        failovers.push(secs);
        // The killed one comes back as the standby.
        incidents[active].restart();
        incidents[active].ready().await;
        assert_eq!(active_of(&incidents, "incidents").await, 1 - active);
    }

    // Escalation: kill the active one while level-1 pages are due (4 s after
    // each incident opens, and an incident opens every 100 ms).
    let mut escalation_kills = Vec::new();
    for _ in 0..ESCALATION_KILLS {
        let active = active_of(&escalation, "escalation").await;
        let term = max_term(&js, STREAM_NOTIFY, "escalation").await;
        let killed_at = ns_since_epoch(SystemTime::now());
        escalation[active].kill();
        escalation_kills.push((killed_at, term));
        let first = eventually_within(TAKEOVER, || async {
            read_raw(&js, STREAM_NOTIFY)
                .await
                .into_iter()
                .find(|r| !r.is_marker() && r.lease.as_ref().is_some_and(|(_, t)| *t > term))
                .map(|r| r.time_ns)
                .ok_or("no page from a new escalation term yet")
        })
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", escalation[1 - active].log_text()));
        eprintln!(
            "escalation failover: kill -> first page from the standby {:.2}s",
            (first - killed_at) as f64 / 1e9
        );
        escalation[active].restart();
        escalation[active].ready().await;
    }

    let accepted = poster.finish().await;
    // Every accepted alert opens its incident, and each incident pages
    // level 0 and, 4 s later, level 1.
    let expected: BTreeSet<String> = accepted.iter().cloned().collect();
    assert_eq!(expected.len(), accepted.len());
    let incidents_log = eventually_within(Duration::from_secs(60), || async {
        let raws = read_raw(&js, STREAM_INCIDENTS).await;
        let n = raws.iter().filter(|r| opened(r).is_some()).count();
        if n >= expected.len() {
            Ok(raws)
        } else {
            Err(format!("{n} of {} incidents", expected.len()))
        }
    })
    .await
    .expect("every accepted alert has its incident");
    let pages = eventually_within(Duration::from_secs(60), || async {
        let raws = read_raw(&js, STREAM_NOTIFY).await;
        let distinct = raws
            .iter()
            .flat_map(pages_of)
            .map(|p| p.id)
            .collect::<BTreeSet<_>>()
            .len();
        if distinct >= 2 * expected.len() {
            Ok(raws)
        } else {
            Err(format!("{distinct} of {} pages", 2 * expected.len()))
        }
    })
    .await
    .expect("every incident paged at both levels");

    // INCIDENTS: every accepted alert in exactly one incident; ids and
    // numbers unique; no entry twice.
    let mut by_alert: BTreeMap<String, usize> = BTreeMap::new();
    let (mut ids, mut numbers) = (BTreeSet::new(), BTreeSet::new());
    for (name, id, number) in incidents_log.iter().filter_map(opened) {
        *by_alert.entry(name.clone()).or_default() += 1;
        assert!(ids.insert(id.clone()), "incident id {id} opened twice");
        assert!(
            numbers.insert(number),
            "incident number {number} used twice"
        );
    }
    let seen: BTreeSet<String> = by_alert.keys().cloned().collect();
    assert_eq!(
        seen, expected,
        "incidents opened for exactly the accepted alerts"
    );
    assert!(
        by_alert.values().all(|n| *n == 1),
        "an alert in two incidents"
    );
    let mut msg_ids = BTreeSet::new();
    for r in &incidents_log {
        assert!(
            msg_ids.insert(r.msg_id.clone()),
            "INCIDENTS entry {} stored twice (seq {})",
            r.msg_id,
            r.seq
        );
    }
    let incident_terms = terms_never_go_back(&incidents_log, "incidents", STREAM_INCIDENTS);
    every_tenure_fenced(&incidents_log, STREAM_INCIDENTS);
    assert!(
        incident_terms.len() > INCIDENTS_KILLS,
        "a new incidents term after every kill: {incident_terms:?}"
    );

    // NOTIFY: one page per incident and level. A page alone has its id as
    // the message id, so JetStream never stores it alone twice; a burst's
    // pages go several to a message, and one fired again by the next term
    // in another grouping may be there twice (the notifier's delivery
    // records make that one delivery).
    let mut per: BTreeMap<(u64, u32), BTreeSet<String>> = BTreeMap::new();
    let mut alone = BTreeSet::new();
    for r in &pages {
        for p in pages_of(r) {
            if !r.msg_id.starts_with("pages:") {
                assert!(alone.insert(p.id.clone()), "page {} sent alone twice", p.id);
            }
            per.entry((p.incident.number, p.level))
                .or_default()
                .insert(p.id);
        }
    }
    for n in &numbers {
        for level in [0, 1] {
            assert_eq!(
                per.get(&(*n, level)).map(BTreeSet::len),
                Some(1),
                "incident {n} level {level}: pages {:?}",
                per.get(&(*n, level))
            );
        }
    }
    assert_eq!(per.len(), 2 * numbers.len());
    let page_terms = terms_never_go_back(&pages, "escalation", STREAM_NOTIFY);
    every_tenure_fenced(&pages, STREAM_NOTIFY);
    assert!(
        page_terms.len() > ESCALATION_KILLS,
        "a new escalation term after every kill: {page_terms:?}"
    );
    // Level-1 pages that fell due after each kill were sent by a later
    // term (and, as above, once).
    for (killed_at, term) in escalation_kills {
        let due_after = pages.iter().any(|r| {
            r.lease.as_ref().is_some_and(|(_, t)| *t > term)
                && pages_of(r)
                    .iter()
                    .any(|p| p.level == 1 && p.due_at.as_nanosecond() > killed_at)
        });
        assert!(
            due_after,
            "no level-1 page due after the escalation kill was sent by the next term"
        );
    }

    let mut f = failovers.clone();
    eprintln!(
        "failover (lease_ttl {}): kill -> standby's first new incident: {:?} s, median {:.2} s",
        lease_ttl(),
        failovers
            .iter()
            .map(|s| (s * 100.0).round() / 100.0)
            .collect::<Vec<_>>(),
        median(&mut f)
    );
}

/// A frozen active instance (SIGSTOP, as a VM pause or a long GC would do)
/// loses its lease; the standby takes over; when the old one resumes it
/// must not act: it stands down before it publishes anything, so every
/// INCIDENTS entry after the takeover comes from the new holder.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_active_instance_never_acts_after_its_standby_took_over() {
    let nats = NatsServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let ingest_port = free_port();
    let (cfg_a, cfg_b) = (
        config(&nats, dir.path(), ingest_port, "a"),
        config(&nats, dir.path(), ingest_port, "b"),
    );
    let js = jetstream::new(nats.client().await);
    let mut ingest = Proc::start(&cfg_a, dir.path(), &["ingest"]);
    ingest.ready().await;
    let mut incidents = [
        Proc::start(&cfg_a, dir.path(), &["incidents"]),
        Proc::start(&cfg_b, dir.path(), &["incidents"]),
    ];
    for p in incidents.iter_mut() {
        p.ready().await;
    }
    let active = active_of(&incidents, "incidents").await;

    // Some incidents, all handled: nothing is in flight when it freezes.
    for i in 0..5 {
        post_alerts(
            ingest_port,
            &serde_json::json!([alert(&format!("Before{i}"), "firing")]),
        )
        .await;
    }
    eventually_within(TAKEOVER, || opened_at_least(5, js.clone()))
        .await
        .expect("the first incidents");
    let old_term = max_term(&js, STREAM_INCIDENTS, "incidents").await;
    kill_signal(&incidents[active], "-STOP");

    // Alerts keep coming while it is frozen; the standby takes over.
    let poster = Poster::start(ingest_port, "Frozen");
    let first_new = eventually_within(TAKEOVER, || async {
        read_raw(&js, STREAM_INCIDENTS)
            .await
            .into_iter()
            .find(|r| r.lease.as_ref().is_some_and(|(_, t)| *t > old_term))
            .map(|r| r.seq)
            .ok_or("no entry from a new term yet")
    })
    .await
    .expect("the standby took over");
    // The frozen one resumes (past its deadline) while alerts keep coming,
    // and stands down: /readyz says standby, tocsin_leader is 0.
    kill_signal(&incidents[active], "-CONT");
    let new_active = active_of(&incidents, "incidents").await;
    assert_eq!(new_active, 1 - active);
    let resumed_log = eventually_within(TAKEOVER, || async {
        let log = incidents[active].log_text();
        if log.contains("standing down") || log.contains("stopped acting") {
            Ok(log)
        } else {
            Err("the resumed instance has not said it stood down")
        }
    })
    .await
    .expect("the resumed instance stands down");
    let accepted = poster.finish().await;
    let total = 5 + accepted.len();
    eventually_within(TAKEOVER, || opened_at_least(total, js.clone()))
        .await
        .expect("every alert has its incident");

    let raws = read_raw(&js, STREAM_INCIDENTS).await;
    terms_never_go_back(&raws, "incidents", STREAM_INCIDENTS);
    every_tenure_fenced(&raws, STREAM_INCIDENTS);
    let late: Vec<u64> = raws
        .iter()
        .filter(|r| r.seq > first_new)
        .filter(|r| r.lease.as_ref().is_some_and(|(_, t)| *t <= old_term))
        .map(|r| r.seq)
        .collect();
    assert!(
        late.is_empty(),
        "the frozen instance wrote {late:?} after the takeover\n{resumed_log}"
    );
    let names: Vec<String> = raws
        .iter()
        .filter_map(opened)
        .map(|(name, _, _)| name)
        .collect();
    let unique: BTreeSet<&String> = names.iter().collect();
    assert_eq!(unique.len(), names.len(), "an alert in two incidents");
    assert_eq!(names.len(), total);
}

/// NATS goes away: the active instance cannot renew its lease and stands
/// down (2/3 of the TTL after its last renewal, `tocsin_leader` 0 on both);
/// when NATS is back exactly one instance is active again, and every alert
/// is in exactly one incident, written by terms that never go back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_cut_off_from_nats_stands_down_and_one_is_active_again() {
    let mut nats = NatsServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let ingest_port = free_port();
    let (cfg_a, cfg_b) = (
        config(&nats, dir.path(), ingest_port, "a"),
        config(&nats, dir.path(), ingest_port, "b"),
    );
    let mut ingest = Proc::start(&cfg_a, dir.path(), &["ingest"]);
    ingest.ready().await;
    let mut incidents = [
        Proc::start(&cfg_a, dir.path(), &["incidents"]),
        Proc::start(&cfg_b, dir.path(), &["incidents"]),
    ];
    for p in incidents.iter_mut() {
        p.ready().await;
    }
    let active = active_of(&incidents, "incidents").await;
    for i in 0..3 {
        post_alerts(
            ingest_port,
            &serde_json::json!([alert(&format!("Outage{i}"), "firing")]),
        )
        .await;
    }
    let js = jetstream::new(nats.client().await);
    eventually_within(TAKEOVER, || opened_at_least(3, js.clone()))
        .await
        .expect("the first incidents");

    nats.stop();
    eventually_within(TAKEOVER, || async {
        let states = [
            role_state(&incidents[0], "incidents").await,
            role_state(&incidents[1], "incidents").await,
        ];
        if states.iter().all(|(_, leader)| *leader == Some(0)) {
            Ok(())
        } else {
            Err(format!("{states:?}"))
        }
    })
    .await
    .unwrap_or_else(|e| panic!("the active instance never stood down: {e}"));
    assert!(incidents[active].log_text().contains("standing down"));

    nats.restart().await;
    active_of(&incidents, "incidents").await;
    for i in 3..6 {
        post_alerts(
            ingest_port,
            &serde_json::json!([alert(&format!("Outage{i}"), "firing")]),
        )
        .await;
    }
    let js = jetstream::new(nats.client().await);
    eventually_within(TAKEOVER, || opened_at_least(6, js.clone()))
        .await
        .expect("every alert has its incident");
    let raws = read_raw(&js, STREAM_INCIDENTS).await;
    terms_never_go_back(&raws, "incidents", STREAM_INCIDENTS);
    every_tenure_fenced(&raws, STREAM_INCIDENTS);
    let names: BTreeSet<String> = raws
        .iter()
        .filter_map(opened)
        .map(|(name, _, _)| name)
        .collect();
    assert_eq!(names.len(), 6);
    assert_eq!(raws.iter().filter_map(opened).count(), 6);
}

/// Waits until `p` is the active instance of `role` (`/readyz` `ok`,
/// `tocsin_leader` 1).
async fn becomes_active(p: &Proc, role: &str) {
    eventually_within(TAKEOVER, || async {
        match role_state(p, role).await {
            (check, Some(1)) if check == "ok" => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await
    .unwrap_or_else(|e| panic!("{role} never became active again: {e}\n{}", p.log_text()));
}

/// A restarted instance (the same host and data directory) takes back the
/// lease its SIGKILLed predecessor held at once, instead of waiting for it
/// to expire: holding the lock on the data directory proves the predecessor
/// is gone. With a 10-minute lease TTL, the restarted incidents and
/// escalation processes are active again, and the next alert has its
/// incident, well within `TAKEOVER` (30 s); each restart starts a new term.
/// A second process on the same data directory stands by while the first
/// lives (it cannot take the lock, so it waits like any standby) and takes
/// over as soon as the first is killed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_instance_takes_its_own_lease_back_at_once() {
    let nats = NatsServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let ingest_port = free_port();
    let cfg = config_with_ttl(&nats, dir.path(), ingest_port, "a", "10m");
    let mut ingest = Proc::start(&cfg, dir.path(), &["ingest"]);
    ingest.ready().await;
    let mut procs = [
        Proc::start(&cfg, dir.path(), &["incidents"]),
        Proc::start(&cfg, dir.path(), &["escalation"]),
    ];
    for p in procs.iter_mut() {
        p.ready().await;
    }
    becomes_active(&procs[0], "incidents").await;
    becomes_active(&procs[1], "escalation").await;
    post_alerts(
        ingest_port,
        &serde_json::json!([alert("Outage0", "firing")]),
    )
    .await;
    let js = jetstream::new(nats.client().await);
    eventually_within(TAKEOVER, || opened_at_least(1, js.clone()))
        .await
        .expect("the first incident");
    let first_term = max_term(&js, STREAM_INCIDENTS, "incidents").await;
    assert!(first_term > 0, "INCIDENTS entries carry the lease term");

    for p in procs.iter_mut() {
        p.restart();
    }
    becomes_active(&procs[0], "incidents").await;
    becomes_active(&procs[1], "escalation").await;
    for p in &procs {
        assert!(
            p.log_text()
                .contains("took back the lease of its predecessor"),
            "the restarted process says how it got the lease:\n{}",
            p.log_text()
        );
    }
    post_alerts(
        ingest_port,
        &serde_json::json!([alert("Outage1", "firing")]),
    )
    .await;
    eventually_within(TAKEOVER, || opened_at_least(2, js.clone()))
        .await
        .expect("the restarted instance opens the next incident");
    let second_term = max_term(&js, STREAM_INCIDENTS, "incidents").await;
    assert!(
        second_term > first_term,
        "a new tenure, a new term ({first_term} -> {second_term})"
    );

    // A twin on the same data directory while the first one lives: a
    // standby, seeing the active instance.
    let mut twin = Proc::start(&cfg, dir.path(), &["incidents"]);
    twin.ready().await;
    eventually_within(TAKEOVER, || async {
        match role_state(&twin, "incidents").await {
            (check, Some(0)) if check.starts_with("standby: ") && check.contains(" is active") => {
                Ok(())
            }
            other => Err(format!("{other:?}")),
        }
    })
    .await
    .unwrap_or_else(|e| panic!("the twin is not a standby: {e}\n{}", twin.log_text()));
    assert_eq!(role_state(&procs[0], "incidents").await.1, Some(1));
    procs[0].kill();
    becomes_active(&twin, "incidents").await;
    post_alerts(
        ingest_port,
        &serde_json::json!([alert("Outage2", "firing")]),
    )
    .await;
    eventually_within(TAKEOVER, || opened_at_least(3, js.clone()))
        .await
        .expect("the twin opens the next incident");

    let raws = read_raw(&js, STREAM_INCIDENTS).await;
    let terms = terms_never_go_back(&raws, "incidents", STREAM_INCIDENTS);
    every_tenure_fenced(&raws, STREAM_INCIDENTS);
    assert!(terms.len() >= 3, "three tenures wrote INCIDENTS: {terms:?}");
    let names: BTreeSet<String> = raws
        .iter()
        .filter_map(opened)
        .map(|(name, _, _)| name)
        .collect();
    assert_eq!(names.len(), 3, "{names:?}");
    assert_eq!(raws.iter().filter_map(opened).count(), 3);
}

/// The pages a NOTIFY message holds: none (a tenure marker), one, or
/// several (an escalation burst's, on the batch subject), split as the
/// notifier splits them.
fn pages_of(r: &Raw) -> Vec<Page> {
    if r.is_marker() {
        Vec::new()
    } else {
        decode_pages(&r.subject, &r.payload).unwrap().body
    }
}

/// A `tocsin_*` sample of `p`'s `/metrics` (the first line starting with
/// `sample`, e.g. `tocsin_leader{role="incidents"}`), if there is one.
async fn metric(p: &Proc, sample: &str) -> Option<f64> {
    let url = format!("http://127.0.0.1:{}/metrics", p.admin);
    let text = reqwest::get(url).await.ok()?.text().await.ok()?;
    text.lines().find_map(|l| {
        l.strip_prefix(sample)
            .and_then(|v| v.trim().parse::<f64>().ok())
    })
}

/// How many alerts the history before the kill holds
/// (`TOCSIN_TEST_HISTORY`, default 2,000; each opens an incident).
fn history() -> usize {
    std::env::var("TOCSIN_TEST_HISTORY")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2_000)
}

/// A standby follows INCIDENTS while it waits: its store keeps up with
/// what the active instance writes, so a takeover folds what came since
/// the standby's last round (nothing, here), not the whole log. The
/// standby's `tocsin_standby_followed_sequence` reaches the stream's last
/// sequence for both roles; after the active incidents process is killed,
/// the standby takes over having replayed almost nothing
/// (`tocsin_incidents_catch_up_entries`), and opens the next incident.
/// The kill -> first new incident time and the entries replayed are
/// printed (`TOCSIN_TEST_HISTORY` sets the history's size).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_follows_the_log_and_takes_over_warm() {
    let nats = NatsServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let js = jetstream::new(nats.client().await);
    let Pairs {
        ingest_port,
        _ingest,
        mut incidents,
        escalation,
    } = pairs(&nats, dir.path()).await;
    active_of(&incidents, "incidents").await;
    let esc_active = active_of(&escalation, "escalation").await;

    // The history: that many new incidents, 100 alerts a request.
    let n = history();
    for r in 0..n.div_ceil(100) {
        let alerts: Vec<_> = (r * 100..((r + 1) * 100).min(n))
            .map(|i| alert(&format!("History{i:06}"), "firing"))
            .collect();
        post_alerts(ingest_port, &serde_json::json!(alerts)).await;
    }
    eventually_within(TAKEOVER.max(Duration::from_secs(n as u64 / 20)), || {
        opened_at_least(n, js.clone())
    })
    .await
    .expect("the history's incidents opened");
    // The incidents instance active now: on a busy machine the lease may
    // have changed hands during the history.
    let active = active_of(&incidents, "incidents").await;
    // Both standbys catch up with the log (which grows a while longer:
    // the first level's pages come back as `paged` entries). Escalation's
    // pair is asked both: only a standby shows the metric, and on a busy
    // machine its lease may have changed hands during the history (it is
    // not killed below).
    let esc_standby = [&escalation[1 - esc_active], &escalation[esc_active]];
    for (procs, role) in [
        (&[&incidents[1 - active]][..], "incidents"),
        (&esc_standby[..], "escalation"),
    ] {
        let sample = format!("tocsin_standby_followed_sequence{{role=\"{role}\"}} ");
        eventually_within(TAKEOVER.max(Duration::from_secs(n as u64 / 20)), || async {
            let last = tocsin_runtime::streams::last_sequence(&js, STREAM_INCIDENTS)
                .await
                .unwrap_or(u64::MAX);
            let mut seen: Option<u64> = None;
            for p in procs {
                seen = seen.max(metric(p, &sample).await.map(|v| v as u64));
            }
            match seen {
                Some(seq) if seq >= last && last > n as u64 => Ok(()),
                seq => Err(format!("followed {seq:?} of {last}")),
            }
        })
        .await
        .unwrap_or_else(|e| panic!("the {role} standby never caught up: {e}"));
    }
    let entries = tocsin_runtime::streams::last_sequence(&js, STREAM_INCIDENTS)
        .await
        .unwrap();

    let term = max_term(&js, STREAM_INCIDENTS, "incidents").await;
    let killed_at = ns_since_epoch(SystemTime::now());
    incidents[active].kill();
    let poster = Poster::start(ingest_port, "AfterKill");
    let first = first_opened_after(&js, term, &incidents[1 - active], "").await;
    poster.finish().await;
    let replayed = metric(
        &incidents[1 - active],
        "tocsin_incidents_catch_up_entries_total ",
    )
    .await
    .expect("the catch-up counter");
    eprintln!(
        "warm takeover with {entries} INCIDENTS entries: kill -> first new incident {:.2}s, \
         {replayed} entries replayed at the takeover",
        (first - killed_at) as f64 / 1e9
    );
    assert!(
        replayed < 100.0,
        "the standby replayed {replayed} of {entries} entries when it took over"
    );
    // Active now, it no longer says how far it followed.
    let followed = metric(
        &incidents[1 - active],
        "tocsin_standby_followed_sequence{role=\"incidents\"} ",
    )
    .await;
    assert_eq!(
        followed, None,
        "the new active instance's followed sequence"
    );
}

/// The pages on NOTIFY now, each with the lease term it was sent under.
async fn notified(js: &jetstream::Context) -> Vec<(u64, Page)> {
    read_raw(js, STREAM_NOTIFY)
        .await
        .iter()
        .flat_map(|r| {
            let term = r.lease.as_ref().map_or(0, |(_, t)| *t);
            pages_of(r).into_iter().map(move |p| (term, p))
        })
        .collect()
}

/// A takeover pages nothing the active escalation instance paged: the
/// `paged` records, written once a level's pages are stored, move a
/// standby's tracks as firing moved the active one's. 300 incidents each
/// get both levels of their policy (the second 4 s after the first), the
/// standby follows all of it, then the active escalation process is
/// SIGKILLed. The standby takes over and pages a new incident's two
/// levels; no earlier page is sent again. JetStream's duplicate window is
/// 1 s here, so nothing but the tracks keeps an earlier page from being
/// stored again after the takeover. (Before the kill a step may be stored
/// twice: fired again after a lost acknowledgement, or by the other
/// instance when the lease changed hands during the history, as it may on
/// a busy machine, before the step's record was stored; the notifier's
/// delivery records drop such a copy. That is not what this test is
/// about, and it does not count them.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_escalation_takeover_pages_nothing_the_active_instance_paged() {
    let nats = NatsServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let js = jetstream::new(nats.client().await);
    let Pairs {
        ingest_port,
        _ingest,
        incidents: _incidents,
        mut escalation,
    } = pairs_with(&nats, dir.path(), "jetstream:\n  duplicate_window: 1s\n").await;
    active_of(&escalation, "escalation").await;

    const N: usize = 300;
    for r in 0..N / 100 {
        let alerts: Vec<_> = (r * 100..(r + 1) * 100)
            .map(|i| alert(&format!("Paged{i:03}"), "firing"))
            .collect();
        post_alerts(ingest_port, &serde_json::json!(alerts)).await;
    }
    // Both levels of every incident paged, and their records stored.
    eventually_within(Duration::from_secs(60), || async {
        let pages = notified(&js).await.len();
        let records = paged_records(&js).await.len();
        if pages >= 2 * N && records == 2 * N {
            Ok(())
        } else {
            Err(format!("{pages} pages and {records} records of {}", 2 * N))
        }
    })
    .await
    .expect("both levels of the first incidents paged");
    // The instance active now (the lease may have changed hands during
    // the history on a busy machine) and its standby, which has read
    // every entry.
    let active = active_of(&escalation, "escalation").await;
    let standby = 1 - active;
    eventually_within(TAKEOVER, || async {
        let last = tocsin_runtime::streams::last_sequence(&js, STREAM_INCIDENTS)
            .await
            .unwrap_or(u64::MAX);
        let sample = "tocsin_standby_followed_sequence{role=\"escalation\"} ";
        match metric(&escalation[standby], sample).await {
            Some(seq) if seq as u64 >= last => Ok(()),
            seq => Err(format!("followed {seq:?} of {last}")),
        }
    })
    .await
    .expect("the standby followed INCIDENTS");
    let before: BTreeSet<String> = notified(&js).await.into_iter().map(|(_, p)| p.id).collect();
    assert_eq!(before.len(), 2 * N, "each page stored before the kill");

    let term = max_term(&js, STREAM_NOTIFY, "escalation").await;
    escalation[active].kill();
    post_alerts(
        ingest_port,
        &serde_json::json!([alert("AfterKill", "firing")]),
    )
    .await;
    // The new active instance pages the new incident's second level 4 s
    // after its first: by then it has fired all it found due when it took
    // over.
    let after = eventually_within(TAKEOVER, || async {
        let after: Vec<Page> = notified(&js)
            .await
            .into_iter()
            .filter(|(t, _)| *t > term)
            .map(|(_, p)| p)
            .collect();
        let new = after.iter().filter(|p| p.incident.number == N as u64 + 1);
        if new.clone().any(|p| p.level == 1) {
            Ok(after)
        } else {
            Err(format!("{} pages from the new term", after.len()))
        }
    })
    .await
    .unwrap_or_else(|e| {
        panic!(
            "the standby never paged the new incident's second level: {e}\n{}",
            escalation[standby].log_text()
        )
    });
    let again: Vec<String> = after
        .iter()
        .filter(|p| p.incident.number != N as u64 + 1)
        .map(|p| format!("#{} level {}", p.incident.number, p.level + 1))
        .collect();
    assert!(
        again.is_empty(),
        "the standby paged {} of the earlier incidents again, e.g. {:?}",
        again.len(),
        &again[..again.len().min(5)]
    );
}

/// The escalation steps whose `paged` record is stored on INCIDENTS, by
/// (incident number, level, repeat).
async fn paged_records(js: &jetstream::Context) -> BTreeSet<(u64, u32, u32)> {
    let mut steps = BTreeSet::new();
    for r in read_raw(js, STREAM_INCIDENTS).await {
        for e in r.entries().expect("an INCIDENTS message that decodes") {
            if let LogEntry::Incident(ev) = e {
                if let EventKind::Paged { level, repeat, .. } = ev.kind {
                    steps.insert((ev.incident.number, level, repeat));
                }
            }
        }
    }
    steps
}

/// `--threads` (or `TOCSIN_THREADS`) sets a service process's runtime
/// worker threads: each process reports what it was given
/// (`tocsin_runtime_worker_threads`), and with one worker each, ingest,
/// incidents and escalation still take an alert to its page. `--threads 0`
/// is refused, naming the option.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_processes_run_with_the_worker_threads_they_are_given() {
    let out = std::process::Command::new(crate::support::bin())
        .args(["--threads", "0", "ingest"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("invalid value '0' for '--threads"), "{err}");

    let nats = NatsServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let ingest_port = free_port();
    let cfg = config(&nats, dir.path(), ingest_port, "a");
    let js = jetstream::new(nats.client().await);
    let mut procs = [
        Proc::start(&cfg, dir.path(), &["--threads", "1", "ingest"]),
        Proc::start(&cfg, dir.path(), &["--threads", "1", "incidents"]),
        Proc::start_with_env(
            &cfg,
            dir.path(),
            &["escalation"],
            &[("TOCSIN_THREADS".into(), "3".into())],
        ),
    ];
    for p in procs.iter_mut() {
        p.ready().await;
    }
    for (p, n) in procs.iter().zip([1.0, 1.0, 3.0]) {
        assert_eq!(
            metric(p, "tocsin_runtime_worker_threads").await,
            Some(n),
            "{}",
            p.log_text()
        );
    }

    post_alerts(
        ingest_port,
        &serde_json::json!([alert("OneWorkerEach", "firing")]),
    )
    .await;
    let pages = eventually_within(TAKEOVER, || async {
        let pages = notified(&js).await;
        if pages.is_empty() {
            Err("no page yet")
        } else {
            Ok(pages)
        }
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", procs[2].log_text()));
    assert_eq!(pages.len(), 1, "{pages:?}");
    let page = &pages[0].1;
    assert_eq!(
        (
            page.level,
            page.address.as_str(),
            page.incident.title.as_str()
        ),
        (0, "C0FIRST", "OneWorkerEach is down"),
        "{page:?}"
    );
}
