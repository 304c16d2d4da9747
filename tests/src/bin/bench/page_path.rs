//! `bench all`'s alert-to-page scenario: nats-server and `tocsin ingest`,
//! `incidents`, `escalation` and `notifier` as separate processes (each its
//! own NATS user), new alert groups at a steady rate into ingest's generic
//! endpoint, and the time until the notifier's webhook reaches a receiver
//! in the bench; beside it the same alerts into a real Alertmanager
//! (`group_wait: 0s`, one group per alert) with its webhook at the same
//! kind of receiver. Both sides are sent to as Alertmanager sends: a
//! request shed for load (429, 503, a refused connection) is retried with
//! backoff, and its latency counts from the first attempt.

use std::{
    collections::{BTreeMap, HashMap},
    path::PathBuf,
    process::Command,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{bail, Context as _};
use serde_json::{json, Value};
use tocsin_tests::NatsServer;

use super::{
    all::{cpu_per_1000, Figure, Outcome},
    ms,
    peer::{self, Alertmanager, Grouping, Proc, Receiver},
    percentile,
};

/// The label that makes every alert its own group (and incident), and
/// identifies its page at the receiver.
pub const ID_LABEL: &str = "bench_id";

/// How long after the last send a page may still come before its alert
/// counts as lost.
const LOST_AFTER: Duration = Duration::from_secs(60);

/// What the Tocsin column of the latency figures measures.
const SIDE: &str =
    "separate processes: nats-server, tocsin ingest, incidents, escalation, notifier";

/// The services, each run as `tocsin <service>` with its own NATS user.
const SERVICES: [&str; 4] = ["ingest", "incidents", "escalation", "notifier"];

/// The `tocsin` binary: `TOCSIN_BIN`, else `tocsin` next to this bench
/// (target/release/tocsin; `./deploy/dev.sh bench` builds it).
fn tocsin_bin() -> anyhow::Result<PathBuf> {
    if let Some(p) = std::env::var_os("TOCSIN_BIN") {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe()?;
    let p = exe
        .parent()
        .context("bench binary has no folder")?
        .join("tocsin");
    if !p.is_file() {
        bail!(
            "{} not found: build it first (cargo build --release --locked -p tocsin), or set TOCSIN_BIN",
            p.display()
        );
    }
    Ok(p)
}

/// A phase: alerts/s for so long.
#[derive(Clone, Copy)]
struct Phase {
    rate: u32,
    secs: u32,
}

impl Phase {
    fn alerts(self) -> usize {
        (self.rate * self.secs) as usize
    }
}

/// What one side of one repetition measured, per phase.
struct SideResult {
    /// Per phase: sorted latencies of the alerts paged.
    latencies: Vec<Vec<Duration>>,
    /// Per phase: pages / (first send of the phase -> its last page).
    pages_per_s: Vec<f64>,
    lost: usize,
    duplicated: usize,
    failed: Vec<String>,
    /// CPU seconds per 1,000 alerts of the measured processes.
    cpu_per_1k: f64,
    /// Peak RSS per process (name, MiB).
    rss: Vec<(String, Option<f64>)>,
}

/// Where a side sends its alerts.
#[derive(Clone)]
pub struct Target {
    pub url: String,
    pub bearer: Option<String>,
    /// The v2 API (Alertmanager) or Tocsin's generic JSON.
    pub alertmanager: bool,
}

impl Target {
    /// POSTs `body` on a new connection; an error unless answered 200.
    pub async fn post_one(&self, body: &Value) -> anyhow::Result<()> {
        let mut req = reqwest::Client::new()
            .post(&self.url)
            .header("content-type", "application/json")
            .body(serde_json::to_vec(body)?);
        if let Some(b) = &self.bearer {
            req = req.bearer_auth(b);
        }
        let r = req.send().await.context("not sent")?;
        if r.status() != 200 {
            bail!(
                "refused: {} {}",
                r.status(),
                r.text().await.unwrap_or_default().trim()
            );
        }
        Ok(())
    }

    /// One alert, new group and incident `id`, in a request of its own.
    fn body(&self, id: &str) -> Value {
        self.alerts(&[id])
    }

    /// A request of one alert per id, each a new group and incident.
    pub fn alerts(&self, ids: &[&str]) -> Value {
        Value::Array(ids.iter().map(|id| self.alert(id)).collect())
    }

    fn alert(&self, id: &str) -> Value {
        let labels = json!({
            "alertname": "BenchPage",
            ID_LABEL: id,
            "severity": "critical",
            "service": "bench",
            "instance": format!("{id}:9100"),
        });
        let annotations = json!({"summary": format!("benchmark alert {id}")});
        if self.alertmanager {
            json!({
                "labels": labels,
                "annotations": annotations,
                "startsAt": jiff::Timestamp::now().to_string(),
                "generatorURL": "http://prometheus:9090/graph?g0.expr=bench",
            })
        } else {
            json!({
                "labels": labels,
                "annotations": annotations,
                "status": "firing",
            })
        }
    }
}

/// POSTs `requests` requests (`body(r)` the r-th's) to `target` from
/// `connections` keep-alive connections, each sending its next request as
/// soon as its last is answered; what failed ("request r: why"), or an
/// error if a sender task failed.
pub async fn post_all(
    target: &Target,
    requests: usize,
    connections: usize,
    body: Arc<dyn Fn(usize) -> Vec<u8> + Send + Sync>,
) -> anyhow::Result<Vec<String>> {
    let next = Arc::new(AtomicUsize::new(0));
    let tasks: Vec<_> = (0..connections)
        .map(|_| {
            let client = reqwest::Client::builder()
                .http1_only()
                .tcp_nodelay(true)
                .pool_max_idle_per_host(1)
                .timeout(Duration::from_secs(60))
                .build();
            let (next, body) = (next.clone(), body.clone());
            let (url, bearer) = (target.url.clone(), target.bearer.clone());
            tokio::spawn(async move {
                let client = client.map_err(|e| vec![e.to_string()])?;
                let mut failures = Vec::new();
                loop {
                    let r = next.fetch_add(1, Ordering::Relaxed);
                    if r >= requests {
                        break;
                    }
                    let mut req = client
                        .post(&url)
                        .header("content-type", "application/json")
                        .body(body(r));
                    if let Some(b) = &bearer {
                        req = req.bearer_auth(b);
                    }
                    if let Err(e) = send_as_alertmanager_does(req).await {
                        failures.push(format!("request {r}: {e}"));
                    }
                }
                Ok::<_, Vec<String>>(failures)
            })
        })
        .collect();
    let mut failures = Vec::new();
    for t in tasks {
        match t.await? {
            Ok(f) | Err(f) => failures.extend(f),
        }
    }
    Ok(failures)
}

/// The ids a receiver's POST carries: Tocsin's webhook body has one page
/// (`incident.labels`), Alertmanager's one notification of a group's alerts.
pub fn ids_in(body: &[u8]) -> Vec<String> {
    let Ok(v) = serde_json::from_slice::<Value>(body) else {
        return Vec::new();
    };
    if let Some(id) = v["incident"]["labels"][ID_LABEL].as_str() {
        return vec![id.to_string()];
    }
    v["alerts"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|x| x["labels"][ID_LABEL].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// Sends `phases` of new alerts to `target` at their steady rates (each a
/// request of its own, from a pool of keep-alive connections), then waits
/// until every alert has its page or [`LOST_AFTER`] has passed.
async fn drive(
    side: &str,
    target: &Target,
    receiver: &Receiver,
    phases: &[Phase],
    run: &str,
    check: &mut dyn FnMut() -> anyhow::Result<()>,
) -> anyhow::Result<Driven> {
    let client = reqwest::Client::builder()
        .http1_only()
        .tcp_nodelay(true)
        .timeout(Duration::from_secs(30))
        .build()?;
    let total: usize = phases.iter().map(|p| p.alerts()).sum();
    let mut handles = Vec::with_capacity(total);
    let mut phase_start = Vec::new();
    let mut n = 0usize;
    receiver.take();
    for (pi, phase) in phases.iter().enumerate() {
        let start = Instant::now();
        phase_start.push(start);
        let cpu_before = MachineCpu::read();
        for i in 0..phase.alerts() {
            let due = start + Duration::from_secs_f64(i as f64 / phase.rate as f64);
            tokio::time::sleep_until(due.into()).await;
            let id = format!("{run}-{n}");
            let body = serde_json::to_vec(&target.body(&id))?;
            let mut req = client
                .post(&target.url)
                .header("content-type", "application/json")
                .body(body);
            if let Some(b) = &target.bearer {
                req = req.bearer_auth(b);
            }
            handles.push(tokio::spawn(async move {
                let sent = Instant::now();
                let r = send_as_alertmanager_does(req).await;
                (pi, sent, r, Instant::now())
            }));
            n += 1;
        }
        let cores = match (cpu_before, MachineCpu::read()) {
            (Some(a), Some(b)) => format!("; the machine meanwhile: {}", b.since(&a)),
            _ => String::new(),
        };
        println!(
            "  {side}: phase {} ({} alerts/s for {}s) sent in {:.1}s, {} pages received so far{cores}",
            pi + 1,
            phase.rate,
            phase.secs,
            start.elapsed().as_secs_f64(),
            receiver.count()
        );
        // Each phase is measured alone: the next starts once this one's
        // pages are in (or after SETTLE), so a phase that fell behind does
        // not hand its queue to the next, and the last alerts of a phase
        // never wait behind the next phase's first ones.
        if pi + 1 < phases.len() {
            let settling = Instant::now();
            while receiver.count() < n && settling.elapsed() < SETTLE {
                check()?;
                // The poll interval of a wait for the pages to arrive (it
                // ends as soon as they have, or at SETTLE); it proves
                // nothing by passing.
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            println!(
                "  {side}: phase {} settled in {:.2}s ({} of {n} pages in), the next begins",
                pi + 1,
                settling.elapsed().as_secs_f64(),
                receiver.count()
            );
        }
    }
    let sending_ended = Instant::now();
    let mut sent: Vec<(usize, Instant, Instant)> = Vec::with_capacity(total);
    let mut failed = Vec::new();
    let mut retried = 0usize;
    for (i, h) in handles.into_iter().enumerate() {
        let (pi, at, r, answered_at) = h.await?;
        sent.push((pi, at, answered_at));
        match r {
            Ok(0) => {}
            Ok(_) => retried += 1,
            Err(e) => failed.push(format!("{side}: alert {run}-{i}: {e}")),
        }
    }
    if retried > 0 {
        println!(
            "  {side}: {retried} of {total} requests were answered 429/503 or refused at first and \
             accepted on a retry (latency counts from the first attempt)"
        );
    }
    // Wait for every page (or the lost deadline).
    let mut got: HashMap<usize, Vec<Instant>> = HashMap::new();
    let prefix = format!("{run}-");
    loop {
        for a in receiver.take() {
            for id in ids_in(&a.body) {
                if let Some(k) = id
                    .strip_prefix(&prefix)
                    .and_then(|s| s.parse::<usize>().ok())
                {
                    got.entry(k).or_default().push(a.at);
                }
            }
        }
        let complete = (0..total).all(|k| got.contains_key(&k));
        if complete || sending_ended.elapsed() > LOST_AFTER {
            break;
        }
        check()?;
        // Poll interval of a wait with a deadline.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Late duplicates: a bounded look after the last page (a harness that
    // reports what it saw, not a test; a repeat later than this goes uncounted).
    tokio::time::sleep(Duration::from_millis(500)).await;
    for a in receiver.take() {
        for id in ids_in(&a.body) {
            if let Some(k) = id
                .strip_prefix(&prefix)
                .and_then(|s| s.parse::<usize>().ok())
            {
                got.entry(k).or_default().push(a.at);
            }
        }
    }
    let mut latencies = vec![Vec::new(); phases.len()];
    let mut last_page = vec![None::<Instant>; phases.len()];
    let mut paged = vec![0usize; phases.len()];
    let (mut lost, mut duplicated) = (0, 0);
    let mut timings = Vec::with_capacity(total);
    for (k, (pi, at, answered)) in sent.iter().enumerate() {
        let first = got.get(&k).and_then(|t| t.iter().min().copied());
        timings.push(Timing {
            phase: *pi,
            sent: *at,
            answered: *answered,
            paged: first,
        });
        match (got.get(&k), first) {
            (Some(times), Some(first)) => {
                latencies[*pi].push(first.saturating_duration_since(*at));
                paged[*pi] += 1;
                last_page[*pi] = Some(last_page[*pi].map_or(first, |l: Instant| l.max(first)));
                if times.len() > 1 {
                    duplicated += times.len() - 1;
                }
            }
            // Every alert in `got` has a page time.
            _ => lost += 1,
        }
    }
    let unknown: usize = got.keys().filter(|k| **k >= total).count();
    if unknown > 0 {
        failed.push(format!("{side}: {unknown} pages for alerts never sent"));
    }
    for l in &mut latencies {
        l.sort_unstable();
    }
    let pages_per_s = (0..phases.len())
        .map(|pi| match last_page[pi] {
            Some(end) => paged[pi] as f64 / end.duration_since(phase_start[pi]).as_secs_f64(),
            None => 0.0,
        })
        .collect();
    Ok(Driven {
        latencies,
        pages_per_s,
        lost,
        duplicated,
        failed,
        timings,
    })
}

/// How long [`drive`] waits at most for a phase's pages before the next
/// phase begins.
const SETTLE: Duration = Duration::from_secs(15);

/// The machine's CPU time so far (`/proc/stat`'s `cpu` line, in ticks).
#[derive(Clone, Copy)]
struct MachineCpu {
    busy: u64,
    idle: u64,
    iowait: u64,
    steal: u64,
}

impl MachineCpu {
    fn read() -> Option<MachineCpu> {
        let stat = std::fs::read_to_string("/proc/stat").ok()?;
        MachineCpu::parse(stat.lines().next()?)
    }

    /// `cpu  user nice system idle iowait irq softirq steal ...`
    fn parse(line: &str) -> Option<MachineCpu> {
        let mut f = line.split_whitespace();
        if f.next()? != "cpu" {
            return None;
        }
        let v: Vec<u64> = f.take(8).map(|x| x.parse().ok()).collect::<Option<_>>()?;
        let [user, nice, system, idle, iowait, irq, softirq, steal] = v[..] else {
            return None;
        };
        Some(MachineCpu {
            busy: user + nice + system + irq + softirq,
            idle,
            iowait,
            steal,
        })
    }

    /// The shares of the cores' time since `before`: whether the cores
    /// were full (the CPU bound the phase) or stood idle (something else
    /// did: the disk's syncs, one chain waiting on them).
    fn since(&self, before: &MachineCpu) -> String {
        let d = |a: u64, b: u64| a.saturating_sub(b) as f64;
        let (busy, idle, iowait, steal) = (
            d(self.busy, before.busy),
            d(self.idle, before.idle),
            d(self.iowait, before.iowait),
            d(self.steal, before.steal),
        );
        let all = (busy + idle + iowait + steal).max(1.0);
        format!(
            "cores busy {:.0}%, idle {:.0}%, waiting for the disk {:.0}%, stolen by the host {:.0}%",
            busy / all * 100.0,
            idle / all * 100.0,
            iowait / all * 100.0,
            steal / all * 100.0
        )
    }
}

/// When phase `pi`'s first alert was sent.
fn phase_began(timings: &[Timing], pi: usize) -> Option<Instant> {
    timings
        .iter()
        .filter(|t| t.phase == pi)
        .map(|t| t.sent)
        .min()
}

/// How often [`SyncProbe`] writes and syncs.
const PROBE_EVERY: Duration = Duration::from_millis(10);

/// `--sync-probe`: a 4 KiB write and fsync every [`PROBE_EVERY`], on a
/// thread of its own, to a file in the temp dir the bench's nats-server
/// stores its streams in (the same file system), while the Tocsin side
/// runs. Every synced write of Tocsin's waits for such a sync, so a stall
/// of the disk shows here at the moment it stalled the page path. It adds
/// a hundred small syncs a second to the disk's work.
struct SyncProbe {
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<Vec<(Instant, Duration)>>,
}

impl SyncProbe {
    /// Starts it once its file is written and synced once (not counted: a
    /// file's first sync also stores its allocation).
    fn start() -> anyhow::Result<SyncProbe> {
        use std::{io::Write as _, os::unix::fs::FileExt as _};
        let path =
            std::env::temp_dir().join(format!("tocsin-bench-sync-probe-{}", std::process::id()));
        let mut file = std::fs::File::create(&path).context("the sync probe's file")?;
        let block = [0x5au8; 4096];
        file.write_all(&block)?;
        file.sync_all()?;
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stopped = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut syncs = Vec::new();
            let mut next = Instant::now();
            while !stopped.load(Ordering::Relaxed) {
                let at = Instant::now();
                if file
                    .write_all_at(&block, 0)
                    .and_then(|()| file.sync_all())
                    .is_err()
                {
                    break;
                }
                syncs.push((at, at.elapsed()));
                next += PROBE_EVERY;
                // The probe's pace (a sync every PROBE_EVERY, so that it
                // samples the disk without loading it), not a wait for
                // anything to happen.
                std::thread::sleep(next.saturating_duration_since(Instant::now()));
            }
            let _ = std::fs::remove_file(&path);
            syncs
        });
        Ok(SyncProbe { stop, thread })
    }

    /// Each sync: when it began, how long it took.
    fn stop(self) -> Vec<(Instant, Duration)> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap_or_default()
    }
}

/// The syncs that began in `[from, to)`: p50, p99 and the slowest, with
/// when it began (seconds after `from`).
fn syncs_between(syncs: &[(Instant, Duration)], from: Instant, to: Instant) -> String {
    let of: Vec<&(Instant, Duration)> = syncs
        .iter()
        .filter(|(at, _)| *at >= from && *at < to)
        .collect();
    let Some((at, slowest)) = of.iter().max_by_key(|(_, d)| *d) else {
        return "no syncs".to_string();
    };
    let mut took: Vec<Duration> = of.iter().map(|(_, d)| *d).collect();
    took.sort_unstable();
    format!(
        "{} syncs, p50 {} p99 {}, the slowest {} at {:.2} s",
        took.len(),
        ms(percentile(&took, 0.50)),
        ms(percentile(&took, 0.99)),
        ms(Some(*slowest)),
        at.duration_since(from).as_secs_f64()
    )
}

/// How long a window of [`windows`] is.
const WINDOW: Duration = Duration::from_secs(5);

/// Per phase, the p99 of the alerts sent in each [`WINDOW`] of it, in
/// order: a run whose p99 is high because of one stall the queue then
/// took long to drain shows it there, one that was slow throughout too.
fn windows(
    phases: &[Phase],
    timings: &[Timing],
    syncs: Option<&[(Instant, Duration)]>,
) -> Vec<String> {
    let mut out = Vec::new();
    for (pi, phase) in phases.iter().enumerate() {
        let Some(start) = phase_began(timings, pi) else {
            continue;
        };
        let of_phase = timings.iter().filter(|t| t.phase == pi);
        let mut by_window: Vec<Vec<Duration>> = Vec::new();
        for t in of_phase {
            let w = (t.sent.duration_since(start).as_millis() / WINDOW.as_millis()) as usize;
            if by_window.len() <= w {
                by_window.resize(w + 1, Vec::new());
            }
            if let Some(paged) = t.paged {
                by_window[w].push(paged.saturating_duration_since(t.sent));
            }
        }
        let p99s: Vec<String> = by_window
            .iter_mut()
            .map(|l| {
                l.sort_unstable();
                match percentile(l, 0.99) {
                    Some(d) => format!("{:.0}", d.as_secs_f64() * 1e3),
                    None => "-".to_string(),
                }
            })
            .collect();
        out.push(format!(
            "p99 of the alerts sent in each {} s of phase {} ({}/s), ms: {}",
            WINDOW.as_secs(),
            pi + 1,
            phase.rate,
            p99s.join(", ")
        ));
        if let Some(syncs) = syncs {
            // The slowest probe sync of each window, beside its p99.
            let slowest: Vec<String> = (0..by_window.len())
                .map(|w| {
                    let from = start + WINDOW * w as u32;
                    syncs
                        .iter()
                        .filter(|(at, _)| *at >= from && *at < from + WINDOW)
                        .map(|(_, d)| *d)
                        .max()
                        .map_or("-".to_string(), |d| format!("{:.0}", d.as_secs_f64() * 1e3))
                })
                .collect();
            out.push(format!(
                "the slowest probe sync in each of those {} s, ms: {}",
                WINDOW.as_secs(),
                slowest.join(", ")
            ));
        }
    }
    out
}

/// What [`drive`] measured.
struct Driven {
    /// Per phase, sorted.
    latencies: Vec<Vec<Duration>>,
    pages_per_s: Vec<f64>,
    lost: usize,
    duplicated: usize,
    failed: Vec<String>,
    /// Per alert, in the order sent.
    timings: Vec<Timing>,
}

/// One alert's way: sent, answered (stored by ingest), its first page at
/// the receiver.
struct Timing {
    phase: usize,
    sent: Instant,
    answered: Instant,
    paged: Option<Instant>,
}

/// A core NATS subscription of the bench on INCIDENTS' and NOTIFY's
/// subjects that notes when the first message naming each alert (its
/// `run-n` id, a string in the MessagePack payload: the incident's labels)
/// went by on each (`--stage-times`).
struct StageTap {
    /// Alert number -> first seen on [INCIDENTS, NOTIFY].
    seen: Arc<std::sync::Mutex<HashMap<usize, [Option<Instant>; 2]>>>,
    task: tokio::task::JoinHandle<()>,
}

impl StageTap {
    async fn start(nats_url: &str, run: &str) -> anyhow::Result<StageTap> {
        use futures::StreamExt as _;
        let client = tocsin_tests::nats::connect_url(nats_url).await?;
        let mut incidents = client.subscribe("tocsin.incidents.>").await?;
        let mut notify = client.subscribe("tocsin.notify.>").await?;
        client.flush().await?;
        let seen: Arc<std::sync::Mutex<HashMap<usize, [Option<Instant>; 2]>>> = Arc::default();
        let theirs = seen.clone();
        let prefix = format!("{run}-").into_bytes();
        let task = tokio::spawn(async move {
            let _client = client;
            loop {
                let (stage, msg) = tokio::select! {
                    Some(m) = incidents.next() => (0, m),
                    Some(m) = notify.next() => (1, m),
                    else => break,
                };
                let at = Instant::now();
                let ids = numbers_after(&msg.payload, &prefix);
                let mut seen = theirs.lock().unwrap_or_else(|e| e.into_inner());
                for k in ids {
                    seen.entry(k).or_default()[stage].get_or_insert(at);
                }
            }
        });
        Ok(StageTap { seen, task })
    }

    /// Per phase, the stages' p50 / p99 (ms) over the alerts seen at every
    /// stage, and the stages of the slowest of them, as one line each.
    fn report(
        self,
        phases: &[Phase],
        timings: &[Timing],
        syncs: Option<&[(Instant, Duration)]>,
    ) -> Vec<String> {
        self.task.abort();
        let seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        let mut out = Vec::new();
        for (pi, phase) in phases.iter().enumerate() {
            let mut stages: [Vec<Duration>; 4] = Default::default();
            // The slowest alert's stages: where a stall was.
            let mut slowest: Option<(Duration, [Duration; 4], Instant)> = None;
            let began = phase_began(timings, pi);
            for (k, t) in timings.iter().enumerate() {
                if t.phase != pi {
                    continue;
                }
                let (Some([Some(entry), Some(page)]), Some(paged)) = (seen.get(&k), t.paged) else {
                    continue;
                };
                let these = [
                    t.answered.saturating_duration_since(t.sent),
                    entry.saturating_duration_since(t.answered),
                    page.saturating_duration_since(*entry),
                    paged.saturating_duration_since(*page),
                ];
                for (all, d) in stages.iter_mut().zip(these) {
                    all.push(d);
                }
                let total = paged.saturating_duration_since(t.sent);
                if slowest.is_none_or(|(s, _, _)| total > s) {
                    slowest = Some((total, these, t.sent));
                }
            }
            let n = stages[0].len();
            let parts: Vec<String> = stages
                .iter_mut()
                .zip([
                    "request answered (ingest stored it)",
                    "-> INCIDENTS entry",
                    "-> NOTIFY page",
                    "-> webhook",
                ])
                .map(|(d, name)| {
                    d.sort_unstable();
                    format!(
                        "{name} p50 {} p99 {}",
                        ms(percentile(d, 0.50)),
                        ms(percentile(d, 0.99))
                    )
                })
                .collect();
            let slowest = match slowest {
                Some((total, [a, b, c, d], sent)) => format!(
                    "; the slowest alert (sent {:.2} s into the phase) {} in all: {}, {}, {}, {}{}",
                    began.map_or(0.0, |b| sent.duration_since(b).as_secs_f64()),
                    ms(Some(total)),
                    ms(Some(a)),
                    ms(Some(b)),
                    ms(Some(c)),
                    ms(Some(d)),
                    // The probe's syncs from a second before it was sent
                    // (a sync under way then holds it up too) to its page.
                    syncs.map_or(String::new(), |s| format!(
                        "; probe syncs from 1 s before it to its page: {}",
                        syncs_between(
                            s,
                            sent.checked_sub(Duration::from_secs(1)).unwrap_or(sent),
                            sent + total
                        )
                    ))
                ),
                None => String::new(),
            };
            out.push(format!(
                "{}/s ({n} alerts seen at every stage): {}{slowest}",
                phase.rate,
                parts.join(", ")
            ));
        }
        out
    }
}

/// The numbers n of every `<prefix>n` in `bytes`.
fn numbers_after(bytes: &[u8], prefix: &[u8]) -> Vec<usize> {
    let mut out = Vec::new();
    let mut i = 0;
    while i + prefix.len() <= bytes.len() {
        if &bytes[i..i + prefix.len()] == prefix {
            let start = i + prefix.len();
            let end = bytes[start..]
                .iter()
                .position(|b| !b.is_ascii_digit())
                .map_or(bytes.len(), |p| start + p);
            if let Some(n) = std::str::from_utf8(&bytes[start..end])
                .ok()
                .and_then(|s| s.parse().ok())
            {
                out.push(n);
            }
            i = end.max(i + 1);
        } else {
            i += 1;
        }
    }
    out
}

/// How long a sender keeps retrying one request refused for load.
const RETRY_FOR: Duration = Duration::from_secs(30);

/// Sends one request as a production sender does (Alertmanager's webhook
/// notifier, Prometheus towards Alertmanager): a 429 or 503 answer or a
/// refused connection is load being shed, so it retries with backoff (100
/// ms doubling to 2 s) for up to [`RETRY_FOR`]. Ok(retries) once answered
/// 200; anything else is a failure.
pub async fn send_as_alertmanager_does(req: reqwest::RequestBuilder) -> Result<u32, String> {
    let started = Instant::now();
    let mut backoff = Duration::from_millis(100);
    let mut retries = 0;
    loop {
        let attempt = req
            .try_clone()
            .ok_or_else(|| "request cannot be repeated".to_string())?;
        let shed = match attempt.send().await {
            Ok(r) if r.status() == 200 => return Ok(retries),
            Ok(r) if matches!(r.status().as_u16(), 429 | 503) => format!(
                "{} {}",
                r.status(),
                r.text().await.unwrap_or_default().trim()
            ),
            Ok(r) => {
                let status = r.status();
                return Err(format!(
                    "{status} {}",
                    r.text().await.unwrap_or_default().trim()
                ));
            }
            Err(e) if e.is_connect() || e.is_request() => format!("not sent: {e}"),
            Err(e) => return Err(format!("not sent: {e}")),
        };
        if started.elapsed() + backoff > RETRY_FOR {
            return Err(format!("still refused after {retries} retries: {shed}"));
        }
        // Backoff between attempts of a sender shedding load.
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(2));
        retries += 1;
    }
}

/// Writes a new config file readable by this user only (it holds the NATS
/// passwords).
fn write_private(path: &std::path::Path, text: &str) -> anyhow::Result<()> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    std::io::Write::write_all(&mut f, text.as_bytes())?;
    Ok(())
}

/// nats-server and `tocsin ingest`, `incidents`, `escalation` and
/// `notifier` as separate processes, each with its own NATS user, paging
/// `{webhook: bench}` at `hook` at once for every new incident. Everything
/// is killed and removed on drop.
pub struct TocsinStack {
    // Field order is drop order: the processes before NATS and the dir.
    /// One per [`SERVICES`], in its order.
    pub procs: Vec<Proc>,
    /// Standby instances ([`TocsinStack::start_standbys`]): the service,
    /// its process and its admin port.
    pub standbys: Vec<(String, Proc, u16)>,
    pub nats: NatsServer,
    pub nats_pid: Option<u32>,
    pub ingest_url: String,
    pub token: String,
    /// Each process's admin port (`/readyz`, `/metrics`), as `procs`.
    admin_ports: Vec<u16>,
    bin: PathBuf,
    config_path: PathBuf,
    _dir: tempfile::TempDir,
}

impl TocsinStack {
    /// `incidents_extra`: more keys of the `incidents:` section (indented
    /// two spaces), e.g. `  group_by: [alertname, g]\n`; `top_extra`: more
    /// top-level sections (e.g. `jetstream:`).
    pub async fn start(
        hook: &str,
        incidents_extra: &str,
        top_extra: &str,
    ) -> anyhow::Result<TocsinStack> {
        let bin = tocsin_bin()?;
        let nats = NatsServer::start_monitored().await;
        let nats_pid = super::nats_server_pid(&nats);
        // TOCSIN_BENCH_KEEP=1 keeps the processes' logs and data (the
        // folder is printed) to look at after the run.
        let dir = tempfile::Builder::new()
            .prefix("tocsin-bench-pages-")
            .disable_cleanup(std::env::var_os("TOCSIN_BENCH_KEEP").is_some())
            .tempdir()?;
        if std::env::var_os("TOCSIN_BENCH_KEEP").is_some() {
            eprintln!("  keeping {} (TOCSIN_BENCH_KEEP)", dir.path().display());
        }
        let ingest_port = tocsin_tests::ports::free_port();
        let token = format!("bench-{}", uuid::Uuid::new_v4().simple());
        let cred = |id: &str| {
            format!(
                "    {id}: {{user: {id}, password: \"{}\"}}\n",
                nats.password(id)
            )
        };
        let config = format!(
            r#"nats:
  url: {url}
  reconnect_max_delay: 250ms
  credentials:
{ingest}{incidents}{escalation}{notifier}ingest:
  listen: 127.0.0.1:{ingest_port}
  tokens:
    - source: bench
      token: ${{TOCSIN_INGEST_TOKEN}}
incidents:
  data_dir: {data}/incidents
  group_wait: 0s
{incidents_extra}escalation:
  data_dir: {data}/escalation
  route: {{policy: bench}}
  policies:
    - name: bench
      levels:
        - targets: [{{webhook: bench}}]
notifier:
  concurrency: 256
  webhooks:
    - name: bench
      url: {hook}
      updates: false
      guard: {{timeout: 10s, concurrency: 256, rate_per_second: 0}}
{top_extra}"#,
            url = nats.address(),
            ingest = cred("ingest"),
            incidents = cred("incidents"),
            escalation = cred("escalation"),
            notifier = cred("notifier"),
            data = dir.path().display(),
        );
        let config_path = dir.path().join("tocsin.yaml");
        write_private(&config_path, &config)?;
        let mut stack = TocsinStack {
            procs: Vec::new(),
            standbys: Vec::new(),
            nats,
            nats_pid,
            ingest_url: format!("http://127.0.0.1:{ingest_port}"),
            token,
            admin_ports: Vec::new(),
            bin,
            config_path,
            _dir: dir,
        };
        for service in SERVICES {
            let admin = tocsin_tests::ports::free_port();
            stack.admin_ports.push(admin);
            let mut p = stack.spawn(service, "")?;
            p.wait_http_ok(
                &format!("http://127.0.0.1:{admin}/readyz"),
                Duration::from_secs(60),
            )
            .await?;
            stack.procs.push(p);
        }
        Ok(stack)
    }

    /// Starts a standby of each of `services` (incidents, escalation): the
    /// stack's config with the service's `data_dir` renamed
    /// `<service>-standby`, its own admin port, logging to
    /// `<service>-standby.log`; waits until each answers `/readyz` (a
    /// standby is ready while it waits for the lease).
    pub async fn start_standbys(&mut self, services: &[&str]) -> anyhow::Result<()> {
        let dir = self._dir.path().to_path_buf();
        let mut config = std::fs::read_to_string(&self.config_path)?;
        for s in services {
            let from = format!("data_dir: {}/{s}\n", dir.display());
            let to = format!("data_dir: {}/{s}-standby\n", dir.display());
            anyhow::ensure!(config.contains(&from), "no data_dir of {s} in the config");
            config = config.replace(&from, &to);
        }
        write_private(&self.standby_config(), &config)?;
        for s in services {
            let admin = tocsin_tests::ports::free_port();
            let p = self.spawn_standby(s, admin, "").await?;
            self.standbys.push((s.to_string(), p, admin));
        }
        Ok(())
    }

    /// The standbys' config (written by [`TocsinStack::start_standbys`]).
    fn standby_config(&self) -> PathBuf {
        self._dir.path().join("tocsin-standby.yaml")
    }

    /// Starts a standby of `service` on the standbys' config and `admin`
    /// port, logging to `<service>-standby<log_suffix>.log`; waits until it
    /// answers `/readyz` (a standby is ready while it waits for the lease).
    async fn spawn_standby(
        &self,
        service: &str,
        admin: u16,
        log_suffix: &str,
    ) -> anyhow::Result<Proc> {
        let mut p = self.spawn_with(
            service,
            &self.standby_config(),
            admin,
            &format!("-standby{log_suffix}"),
        )?;
        p.wait_http_ok(
            &format!("http://127.0.0.1:{admin}/readyz"),
            Duration::from_secs(60),
        )
        .await?;
        Ok(p)
    }

    /// SIGKILLs the standby of `service` (started by
    /// [`TocsinStack::start_standbys`]) and leaves it stopped until
    /// [`TocsinStack::restart_standby`]; false if there is none.
    pub fn kill_standby(&mut self, service: &str) -> bool {
        match self.standbys.iter_mut().find(|(s, _, _)| s == service) {
            Some((_, p, _)) => {
                p.kill();
                true
            }
            None => false,
        }
    }

    /// Starts the standby of `service` again on its config, data dir and
    /// admin port (after [`TocsinStack::kill_standby`]), logging to
    /// `<service>-standby<log_suffix>.log`; waits until it answers `/readyz`.
    pub async fn restart_standby(&mut self, service: &str, log_suffix: &str) -> anyhow::Result<()> {
        let i = self
            .standbys
            .iter()
            .position(|(s, _, _)| s == service)
            .with_context(|| format!("no standby of {service}"))?;
        self.standbys[i].1 = self
            .spawn_standby(service, self.standbys[i].2, log_suffix)
            .await?;
        Ok(())
    }

    /// Starts `tocsin <service>` on the stack's config and its admin port,
    /// logging to `<service><log_suffix>.log`; does not wait for it.
    fn spawn(&self, service: &str, log_suffix: &str) -> anyhow::Result<Proc> {
        let admin = self.admin_ports[Self::index(service)?];
        self.spawn_with(service, &self.config_path, admin, log_suffix)
    }

    /// [`TocsinStack::spawn`] with `config` and `admin` port.
    fn spawn_with(
        &self,
        service: &str,
        config: &std::path::Path,
        admin: u16,
        log_suffix: &str,
    ) -> anyhow::Result<Proc> {
        let dir = self._dir.path();
        let mut cmd = Command::new(&self.bin);
        cmd.current_dir(dir)
            .arg("--config")
            .arg(config)
            .args(["--admin-listen", &format!("127.0.0.1:{admin}")])
            // TOCSIN_BENCH_LOG=info (or debug) for the processes' own logs
            // (kept with TOCSIN_BENCH_KEEP): timestamps of start-up and lease.
            .args(["--log-level", &log_level(), "--grace-period", "2s"]);
        match SERVICE_THREADS.get() {
            Some(&n) if n > 0 => {
                cmd.args(["--threads", &n.to_string()]);
            }
            _ => {}
        }
        cmd.arg(service);
        if service == "ingest" {
            cmd.env("TOCSIN_INGEST_TOKEN", &self.token);
        }
        Proc::spawn(
            &format!("tocsin {service}"),
            cmd,
            &dir.join(format!("{service}{log_suffix}.log")),
        )
    }

    fn index(service: &str) -> anyhow::Result<usize> {
        SERVICES
            .iter()
            .position(|s| *s == service)
            .with_context(|| format!("no service {service}"))
    }

    /// `service`'s process.
    pub fn proc(&mut self, service: &str) -> anyhow::Result<&mut Proc> {
        Ok(&mut self.procs[Self::index(service)?])
    }

    /// `service`'s admin URL (`/readyz`, `/metrics` under it).
    pub fn admin_url(&self, service: &str) -> anyhow::Result<String> {
        Ok(format!(
            "http://127.0.0.1:{}",
            self.admin_ports[Self::index(service)?]
        ))
    }

    /// SIGKILLs `service` (if still running: see [`Proc::kill`]) and starts
    /// it again on the same config, data dir and admin port, logging to
    /// `<service><log_suffix>.log`; does not wait for it to be ready.
    pub fn respawn(&mut self, service: &str, log_suffix: &str) -> anyhow::Result<()> {
        let i = Self::index(service)?;
        self.procs[i].kill();
        self.procs[i] = self.spawn(service, log_suffix)?;
        Ok(())
    }

    /// nats-server's and every process's pid.
    pub fn pids(&self) -> Vec<Option<u32>> {
        let mut pids = vec![self.nats_pid];
        pids.extend(self.procs.iter().map(|p| Some(p.pid())));
        pids
    }

    /// Fails if a process has exited.
    pub fn check(&mut self) -> anyhow::Result<()> {
        for p in self.procs.iter_mut() {
            p.check_running()?;
        }
        Ok(())
    }

    /// Peak RSS of nats-server and every process.
    /// Peak RSS (VmHWM) of nats-server and each process.
    pub fn rss(&self) -> Vec<(String, Option<f64>)> {
        self.memory(peer::peak_rss_mib)
    }

    /// RSS now (VmRSS) of nats-server and each process.
    pub fn rss_now(&self) -> Vec<(String, Option<f64>)> {
        self.memory(peer::rss_mib)
    }

    /// PSS now of nats-server and each process ([`peer::pss_mib`]).
    pub fn pss_now(&self) -> Vec<(String, Option<f64>)> {
        self.memory(peer::pss_mib)
    }

    fn memory(&self, of: fn(Option<u32>) -> Option<f64>) -> Vec<(String, Option<f64>)> {
        let mut rss = vec![("nats-server".to_string(), of(self.nats_pid))];
        for p in &self.procs {
            rss.push((p.name.clone(), of(Some(p.pid()))));
        }
        rss
    }
}

/// The processes' log level: `$TOCSIN_BENCH_LOG`, else `warn` (quiet
/// under load).
/// `--threads` for every `tocsin` process a [`TocsinStack`] starts; 0
/// passes none (tocsin's default, a worker per core). Set once by `bench
/// all` before any stack starts.
static SERVICE_THREADS: std::sync::OnceLock<u16> = std::sync::OnceLock::new();

/// Sets [`SERVICE_THREADS`] (the first call wins).
pub fn set_service_threads(n: u16) {
    let _ = SERVICE_THREADS.set(n);
}

fn log_level() -> String {
    std::env::var("TOCSIN_BENCH_LOG").unwrap_or_else(|_| "warn".to_string())
}

/// A fresh [`TocsinStack`] (`incidents_extra`, `top_extra` as there)
/// paging a new receiver, warmed up: the receiver, the stack and where to
/// send alerts (ingest's generic endpoint).
pub async fn tocsin_peer(
    incidents_extra: &str,
    top_extra: &str,
    run: &str,
) -> anyhow::Result<(Receiver, TocsinStack, Target)> {
    let receiver = Receiver::start().await?;
    let stack = TocsinStack::start(&receiver.url, incidents_extra, top_extra).await?;
    let target = Target {
        url: format!("{}/api/v1/alerts", stack.ingest_url),
        bearer: Some(stack.token.clone()),
        alertmanager: false,
    };
    warm_up("Tocsin", &target, &receiver, run).await?;
    Ok((receiver, stack, target))
}

/// Samples a service's busy metric (the incidents service's
/// `tocsin_incidents_busy_seconds`: time spent on input batches, by stage;
/// escalation's `tocsin_escalation_busy_seconds`: its loop's) every 250 ms
/// while the phases are sent, to tell per phase where its time went: near
/// 100% in all, the service is saturated; mostly `stored` (or `pages` and
/// `records`), it waits on the bus's synced writes.
struct BusySampler {
    started: Instant,
    stop: tokio_util::sync::CancellationToken,
    task: tokio::task::JoinHandle<Vec<(Instant, BTreeMap<String, f64>)>>,
}

impl BusySampler {
    const INCIDENTS: &'static str = "tocsin_incidents_busy_seconds_total";
    const ESCALATION: &'static str = "tocsin_escalation_busy_seconds_total";

    fn start(admin: String, metric: &'static str) -> BusySampler {
        let stop = tokio_util::sync::CancellationToken::new();
        let token = stop.clone();
        let task = tokio::spawn(async move {
            let http = reqwest::Client::builder()
                .timeout(Duration::from_secs(2))
                .build()
                .expect("an HTTP client");
            let mut taken = Vec::new();
            // The sampling cadence, not a wait for something to happen.
            let mut every = tokio::time::interval(Duration::from_millis(250));
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = token.cancelled() => break,
                    _ = every.tick() => {}
                }
                let at = Instant::now();
                if let Ok(r) = http.get(format!("{admin}/metrics")).send().await {
                    let text = r.text().await.unwrap_or_default();
                    let stages = super::samples(&text, metric)
                        .into_iter()
                        .map(|(labels, v)| (labels.replace("stage=", "").replace('"', ""), v))
                        .collect();
                    taken.push((at, stages));
                }
            }
            taken
        });
        BusySampler {
            started: Instant::now(),
            stop,
            task,
        }
    }

    /// Per phase (the phases were sent from `started`, one after another
    /// at their rates), each stage's share of the phase's time.
    async fn stop(self, phases: &[Phase]) -> String {
        self.stop.cancel();
        let taken = self.task.await.unwrap_or_default();
        let mut out = Vec::new();
        let mut from = self.started;
        for (pi, phase) in phases.iter().enumerate() {
            let to = from + Duration::from_secs(u64::from(phase.secs));
            let first = taken.iter().find(|(at, _)| *at >= from);
            let last = taken.iter().rev().find(|(at, _)| *at <= to);
            let shares = match (first, last) {
                (Some((a, before)), Some((b, after))) if b > a => {
                    let secs = b.duration_since(*a).as_secs_f64();
                    let mut total = 0.0;
                    let mut parts: Vec<String> = after
                        .iter()
                        .map(|(stage, v)| {
                            let share = (v - before.get(stage).copied().unwrap_or(0.0)) / secs;
                            total += share;
                            format!("{stage} {:.0}%", share * 100.0)
                        })
                        .collect();
                    parts.insert(0, format!("busy {:.0}%:", total * 100.0));
                    parts.join(" ")
                }
                _ => "not sampled".to_string(),
            };
            out.push(format!("phase {} {shares}", pi + 1));
            from = to;
        }
        out.join("; ")
    }
}

/// CPU seconds per 1,000 alerts between two tick readings (NaN if either
/// could not be read).
fn cpu_between(before: Option<u64>, after: Option<u64>, alerts: usize) -> f64 {
    cpu_per_1000(
        before.zip(after).map(|(a, b)| b.saturating_sub(a)),
        alerts,
        peer::clock_ticks(),
    )
}

/// The bench's own CPU while it sends the alerts and receives the pages:
/// on a small machine it runs on the same cores as the side measured.
struct Harness {
    before: Option<u64>,
}

impl Harness {
    fn start() -> Harness {
        Harness {
            before: peer::cpu_ticks(None),
        }
    }

    fn report(self, side: &str, phases: &[Phase]) {
        let total: usize = phases.iter().map(|p| p.alerts()).sum();
        let cpu = cpu_between(self.before, peer::cpu_ticks(None), total);
        if !cpu.is_nan() {
            println!(
                "  {side}: the bench itself (sending the alerts, receiving the pages) beside it: {cpu:.3} CPU s per 1k alerts"
            );
        }
    }
}

/// One Tocsin repetition: fresh nats-server, processes, data.
async fn tocsin_side(phases: &[Phase], run: &str, looks: Looks) -> anyhow::Result<SideResult> {
    let (receiver, mut stack, target) = tocsin_peer("", "", run).await?;
    let tap = match looks.stage_times {
        true => Some(StageTap::start(&stack.nats.url(), run).await?),
        false => None,
    };
    let pids = stack.pids();
    let js = async_nats::jetstream::new(tocsin_tests::nats::connect_url(&stack.nats.url()).await?);
    let writes_before = stream_writes(&js).await?;
    let clients_before = client_messages(&stack.nats).await;
    let cpu_before = peer::cpu_ticks_of(&pids);
    let each_before: Vec<Option<u64>> = pids.iter().map(|p| peer::cpu_ticks(*p)).collect();
    let busy = BusySampler::start(stack.admin_url("incidents")?, BusySampler::INCIDENTS);
    let busy_escalation =
        BusySampler::start(stack.admin_url("escalation")?, BusySampler::ESCALATION);
    let harness = Harness::start();
    let probe = match looks.sync_probe {
        true => Some(SyncProbe::start()?),
        false => None,
    };
    let Driven {
        latencies,
        pages_per_s,
        lost,
        duplicated,
        failed,
        timings,
    } = {
        let mut check = || stack.check();
        drive("Tocsin", &target, &receiver, phases, run, &mut check).await?
    };
    let syncs = probe.map(SyncProbe::stop);
    harness.report("Tocsin", phases);
    if let Some(syncs) = &syncs {
        for (pi, phase) in phases.iter().enumerate() {
            let (Some(from), Some(to)) = (
                phase_began(&timings, pi),
                timings
                    .iter()
                    .filter(|t| t.phase == pi)
                    .filter_map(|t| t.paged)
                    .max(),
            ) else {
                continue;
            };
            println!(
                "  Tocsin: the probe's 4 KiB write + fsync every {} ms from phase {}'s ({}/s) first alert to its last page: {}",
                PROBE_EVERY.as_millis(),
                pi + 1,
                phase.rate,
                syncs_between(syncs, from, to)
            );
        }
    }
    for line in windows(phases, &timings, syncs.as_deref()) {
        println!("  Tocsin: {line}");
    }
    if let Some(tap) = tap {
        for line in tap.report(phases, &timings, syncs.as_deref()) {
            println!("  Tocsin: where the time went at {line}");
        }
    }
    println!(
        "  Tocsin: the incidents service's time by stage, per phase (stored: waiting for JetStream's synced writes of its entries): {}",
        busy.stop(phases).await
    );
    println!(
        "  Tocsin: the escalation loop's time by stage, per phase (pages, records: waiting for JetStream's synced writes): {}",
        busy_escalation.stop(phases).await
    );
    // The pages are in; their receipts (COMMANDS, then INCIDENTS) may still
    // be queued. Counted once applied, so the CPU and the writes below are
    // a page's whole cost, not what was done by the time it arrived.
    let drain_started = Instant::now();
    let drained = receipts_applied(&js, Duration::from_secs(120)).await;
    println!(
        "  Tocsin: receipts {} {:.1} s after the last page",
        if drained {
            "all applied"
        } else {
            "NOT all applied"
        },
        drain_started.elapsed().as_secs_f64()
    );
    let cpu_after = peer::cpu_ticks_of(&pids);
    let total: usize = phases.iter().map(|p| p.alerts()).sum();
    // Where the CPU went, per process (s per 1k alerts).
    let names = std::iter::once("nats-server".to_string())
        .chain(stack.procs.iter().map(|p| p.name.clone()));
    let each: Vec<String> = names
        .zip(pids.iter().zip(each_before))
        .map(|(name, (pid, before))| {
            let v = match cpu_between(before, peer::cpu_ticks(*pid), total) {
                v if v.is_nan() => "?".into(),
                v => format!("{v:.3}"),
            };
            format!("{name} {v}")
        })
        .collect();
    println!(
        "  Tocsin: CPU s per 1k alerts by process: {}",
        each.join(", ")
    );
    // Every message stored is a synced write (sync_interval: always):
    // what one alert costs the bus, by stream (KV_* are the notifier's
    // delivery records), counted from each stream's last sequence.
    let written: Vec<(String, u64)> = stream_writes(&js)
        .await?
        .into_iter()
        .map(|(name, after)| {
            let d = after - writes_before.get(&name).copied().unwrap_or(0);
            (name, d)
        })
        .filter(|(_, d)| *d > 0)
        .collect();
    let per_alert: Vec<String> = written
        .iter()
        .map(|(name, d)| format!("{name} {:.2}", *d as f64 / total as f64))
        .collect();
    let sum: u64 = written.iter().map(|(_, d)| d).sum();
    println!(
        "  Tocsin: JetStream messages stored per alert: {:.2} ({})",
        sum as f64 / total as f64,
        per_alert.join(", ")
    );
    // Every message to or from the server is a wake-up on both sides:
    // what one alert costs each client in messages (publishes, requests,
    // replies, acks, deliveries), from nats-server's own counts.
    match (clients_before, client_messages(&stack.nats).await) {
        (Ok(before), Ok(after)) => println!(
            "  Tocsin: NATS messages per alert by client, sent / received (KiB sent / received): {}",
            messages_per_alert(&before, &after, total)
        ),
        (Err(e), _) | (_, Err(e)) => println!("  Tocsin: NATS messages per client not read: {e}"),
    }
    let cpu_per_1k = cpu_between(cpu_before, cpu_after, total);
    let rss = stack.rss();
    stack.check()?;
    drop(stack);
    Ok(SideResult {
        latencies,
        pages_per_s,
        lost,
        duplicated,
        failed,
        cpu_per_1k,
        rss,
    })
}

/// Waits (up to `limit`) until COMMANDS and NOTIFY are empty (both work
/// queues: every receipt and page taken and acknowledged; escalation's
/// tenure markers stay on NOTIFY and are not counted); whether they
/// emptied.
async fn receipts_applied(js: &async_nats::jetstream::Context, limit: Duration) -> bool {
    use tocsin_proto::subjects::{STREAM_COMMANDS, STREAM_NOTIFY};
    tocsin_tests::eventually_within(limit, || async {
        let mut left = 0;
        for name in [STREAM_COMMANDS, STREAM_NOTIFY] {
            left += tocsin_tests::bus::try_count_without_markers(js, name)
                .await
                .unwrap_or(1);
        }
        if left == 0 {
            Ok(())
        } else {
            Err(left)
        }
    })
    .await
    .is_ok()
}

/// Every stream's last sequence: how many messages it has stored.
async fn stream_writes(
    js: &async_nats::jetstream::Context,
) -> anyhow::Result<std::collections::BTreeMap<String, u64>> {
    use futures::TryStreamExt as _;
    let infos: Vec<_> = js
        .streams()
        .try_collect()
        .await
        .map_err(|e| anyhow::anyhow!("cannot list streams: {e}"))?;
    Ok(infos
        .into_iter()
        .map(|i| (i.config.name, i.state.last_sequence))
        .collect())
}

/// Per client connection (its id): its name and the messages and bytes
/// it sent to the server and received from it, from nats-server's
/// `/connz` (counted since the connection was made).
async fn client_messages(nats: &NatsServer) -> anyhow::Result<BTreeMap<u64, ClientCounts>> {
    let url = nats
        .monitor_url()
        .context("the bench's nats-server has no monitoring port")?;
    let connz: Value = reqwest::Client::new()
        .get(format!("{url}/connz?limit=4096"))
        .timeout(Duration::from_secs(5))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    let n = |c: &Value, k: &str| c.get(k).and_then(Value::as_u64).unwrap_or(0);
    Ok(connz
        .get("connections")
        .and_then(Value::as_array)
        .context("/connz without connections")?
        .iter()
        .map(|c| {
            (
                n(c, "cid"),
                ClientCounts {
                    name: c
                        .get("name")
                        .and_then(Value::as_str)
                        .unwrap_or("unnamed")
                        .to_string(),
                    // The server's "in" is what the client sent.
                    sent: n(c, "in_msgs"),
                    received: n(c, "out_msgs"),
                    sent_bytes: n(c, "in_bytes"),
                    received_bytes: n(c, "out_bytes"),
                },
            )
        })
        .collect())
}

#[derive(Clone, Debug, Default)]
struct ClientCounts {
    name: String,
    sent: u64,
    received: u64,
    sent_bytes: u64,
    received_bytes: u64,
}

/// Per client name, what its connections sent and received between the
/// two readings (a connection made between them counts from zero), per
/// alert; the bench's own connections left out.
fn messages_per_alert(
    before: &BTreeMap<u64, ClientCounts>,
    after: &BTreeMap<u64, ClientCounts>,
    alerts: usize,
) -> String {
    let mut by_name: BTreeMap<&str, ClientCounts> = BTreeMap::new();
    for (cid, now) in after {
        if !now.name.starts_with("tocsin") {
            continue;
        }
        let was = before.get(cid).cloned().unwrap_or_default();
        let sum = by_name.entry(&now.name).or_default();
        sum.sent += now.sent.saturating_sub(was.sent);
        sum.received += now.received.saturating_sub(was.received);
        sum.sent_bytes += now.sent_bytes.saturating_sub(was.sent_bytes);
        sum.received_bytes += now.received_bytes.saturating_sub(was.received_bytes);
    }
    let a = alerts.max(1) as f64;
    by_name
        .iter()
        .map(|(name, c)| {
            format!(
                "{} {:.2} / {:.2} ({:.2} / {:.2})",
                name.trim_start_matches("tocsin-"),
                c.sent as f64 / a,
                c.received as f64 / a,
                c.sent_bytes as f64 / a / 1024.0,
                c.received_bytes as f64 / a / 1024.0
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// A fresh Alertmanager grouping by `alertname` and `label`, sending at
/// once (`group_wait: 0s`, then every `group_interval`) to a new receiver,
/// warmed up: the receiver, Alertmanager and where to send alerts.
pub async fn alertmanager_peer(
    label: &str,
    group_interval: &str,
    run: &str,
) -> anyhow::Result<(Receiver, Alertmanager, Target)> {
    let receiver = Receiver::start().await?;
    let am = Alertmanager::start(
        &receiver.url,
        &Grouping {
            group_by: format!("[alertname, {label}]"),
            group_wait: "0s".into(),
            group_interval: group_interval.into(),
        },
    )
    .await?;
    let target = Target {
        url: am.alerts_url(),
        bearer: None,
        alertmanager: true,
    };
    warm_up("Alertmanager", &target, &receiver, run).await?;
    Ok((receiver, am, target))
}

/// One alert through before the clock starts (connections open, consumers
/// created); an error if its page does not come within 60 s.
pub async fn warm_up(
    side: &str,
    target: &Target,
    receiver: &Receiver,
    run: &str,
) -> anyhow::Result<()> {
    let id = format!("{run}-warmup");
    target
        .post_one(&target.body(&id))
        .await
        .with_context(|| format!("{side}: the warm-up alert"))?;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if receiver.count() > 0 {
            let got = receiver.take();
            if got.iter().any(|a| ids_in(&a.body).contains(&id)) {
                return Ok(());
            }
        }
        if Instant::now() > deadline {
            bail!("{side}: the warm-up alert's page did not come within 60s");
        }
        // Poll interval of a wait with a deadline.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// One Alertmanager repetition: a fresh Alertmanager.
async fn alertmanager_side(phases: &[Phase], run: &str) -> anyhow::Result<SideResult> {
    let (receiver, mut am, target) = alertmanager_peer(ID_LABEL, "1m", run).await?;
    let pid = Some(am.proc.pid());
    let cpu_before = peer::cpu_ticks(pid);
    let harness = Harness::start();
    let Driven {
        latencies,
        pages_per_s,
        lost,
        duplicated,
        failed,
        ..
    } = {
        let proc = &mut am.proc;
        let mut check = || proc.check_running();
        drive("Alertmanager", &target, &receiver, phases, run, &mut check).await?
    };
    harness.report("Alertmanager", phases);
    let cpu_after = peer::cpu_ticks(pid);
    let total: usize = phases.iter().map(|p| p.alerts()).sum();
    let cpu_per_1k = cpu_between(cpu_before, cpu_after, total);
    let rss = vec![("alertmanager".to_string(), peer::peak_rss_mib(pid))];
    Ok(SideResult {
        latencies,
        pages_per_s,
        lost,
        duplicated,
        failed,
        cpu_per_1k,
        rss,
    })
}

fn print_side(rep: usize, side: &str, phases: &[Phase], r: &SideResult) {
    for (pi, phase) in phases.iter().enumerate() {
        let l = &r.latencies[pi];
        println!(
            "{:>5}  {:<13} {:>6}/s  p50 {:>9} p90 {:>9} p99 {:>9} max {:>9}  {:>7.0} pages/s",
            rep + 1,
            side,
            phase.rate,
            ms(percentile(l, 0.50)),
            ms(percentile(l, 0.90)),
            ms(percentile(l, 0.99)),
            ms(l.last().copied()),
            r.pages_per_s[pi],
        );
    }
    println!(
        "{:>5}  {:<13} lost {}, duplicated {}, failed requests {}, CPU {:.3} s per 1k alerts; peak RSS {}",
        rep + 1,
        side,
        r.lost,
        r.duplicated,
        r.failed.len(),
        r.cpu_per_1k,
        peer::describe_rss(&r.rss)
    );
}

/// Item 3: alert to page, Tocsin as separate processes vs Alertmanager.
/// What the Tocsin side prints beyond the figures (`bench all` flags).
#[derive(Clone, Copy, Debug, Default)]
pub struct Looks {
    /// `--stage-times`: where each phase's alerts spent their time.
    pub stage_times: bool,
    /// `--sync-probe`: the disk's syncs beside the page path ([`SyncProbe`]).
    pub sync_probe: bool,
}

pub async fn page_path(quick: bool, reps: u32, looks: Looks) -> anyhow::Result<Outcome> {
    let phases = if quick {
        [
            Phase {
                rate: 100,
                secs: 10,
            },
            Phase {
                rate: 1000,
                secs: 5,
            },
        ]
    } else {
        [
            Phase {
                rate: 100,
                secs: 30,
            },
            Phase {
                rate: 1000,
                secs: 30,
            },
        ]
    };
    println!(
        "phases: {}; a new group (and incident) per alert; lost = no page {}s after the last send",
        phases
            .iter()
            .map(|p| format!("{} alerts/s for {}s", p.rate, p.secs))
            .collect::<Vec<_>>()
            .join(", then "),
        LOST_AFTER.as_secs()
    );
    let nonce = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or_default();
    let mut figures: Vec<Figure> = Vec::new();
    for p in &phases {
        for (metric, better) in [
            ("p50", "lower"),
            ("p90", "lower"),
            ("p99", "lower"),
            ("max", "lower"),
        ] {
            figures.push(
                Figure::new(
                    &format!("alert→page {}/s", p.rate),
                    metric,
                    "ms",
                    better,
                    "Alertmanager",
                )
                .side(SIDE),
            );
        }
        figures.push(
            Figure::new(
                &format!("alert→page {}/s", p.rate),
                "pages/s sustained",
                "pages/s",
                "higher",
                "Alertmanager",
            )
            .side(SIDE),
        );
    }
    figures.push(
        Figure::new(
            "alert→page",
            "CPU per 1k alerts",
            "s",
            "lower",
            "Alertmanager",
        )
        .side("nats-server + the 4 tocsin processes"),
    );
    figures.push(
        Figure::new(
            "alert→page",
            "peak RSS, all processes",
            "MiB",
            "lower",
            "Alertmanager",
        )
        .side("nats-server + the 4 tocsin processes"),
    );
    let mut outcome = Outcome::default();
    println!(
        "{:>5}  {:<13} {:>8}  latency from the request sent to the webhook receiver's receipt",
        "rep", "side", "rate"
    );
    for rep in 0..reps as usize {
        let run = format!("{nonce:x}r{rep}");
        let order: [bool; 2] = if rep % 2 == 0 {
            [true, false]
        } else {
            [false, true]
        };
        for tocsin in order {
            let (side, r) = if tocsin {
                (
                    "Tocsin",
                    tocsin_side(&phases, &format!("{run}t"), looks).await?,
                )
            } else {
                (
                    "Alertmanager",
                    alertmanager_side(&phases, &format!("{run}a")).await?,
                )
            };
            print_side(rep, side, &phases, &r);
            let mut i = 0;
            let mut push = |v: f64| {
                figures[i].push(tocsin, v);
                i += 1;
            };
            for (pi, l) in r.latencies.iter().enumerate() {
                for q in [0.50, 0.90, 0.99, 1.0] {
                    push(super::percentile_ms(l, q));
                }
                push(r.pages_per_s[pi]);
            }
            push(r.cpu_per_1k);
            push(r.rss.iter().filter_map(|(_, m)| *m).sum());
            for (name, mib) in &r.rss {
                outcome.rss(format!("alert→page: {name}"), *mib);
            }
            if r.lost > 0 || r.duplicated > 0 || !r.failed.is_empty() {
                for f in r.failed.iter().take(super::SHOW_FAILURES) {
                    eprintln!("  {f}");
                }
                outcome.problems.push(format!(
                    "alert→page, {side}, repetition {}: {} lost, {} duplicated, {} failed requests{}",
                    rep + 1,
                    r.lost,
                    r.duplicated,
                    r.failed.len(),
                    r.failed.first().map(|f| format!(" (first: {f})")).unwrap_or_default()
                ));
            }
        }
    }
    outcome.figures = figures;
    Ok(outcome)
}

#[cfg(test)]
mod tests {
    use super::MachineCpu;
    use std::time::Duration;

    #[test]
    fn the_syncs_of_a_span_are_summed_up_with_the_slowest_and_when() {
        let t0 = std::time::Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let syncs: Vec<(std::time::Instant, Duration)> = (0..100)
            .map(|i| {
                (
                    at(i * 10),
                    Duration::from_micros(if i == 42 { 133_000 } else { 500 }),
                )
            })
            .collect();
        assert_eq!(
            super::syncs_between(&syncs, at(0), at(1000)),
            "100 syncs, p50 0.5ms p99 0.5ms, the slowest 133.0ms at 0.42 s"
        );
        // Only those that began in the span; times from its start.
        assert_eq!(
            super::syncs_between(&syncs, at(400), at(450)),
            "5 syncs, p50 0.5ms p99 133.0ms, the slowest 133.0ms at 0.02 s"
        );
        assert_eq!(super::syncs_between(&syncs, at(2000), at(3000)), "no syncs");
    }

    #[test]
    fn the_machines_cpu_shares_come_from_proc_stat() {
        let before = MachineCpu::parse("cpu  100 0 50 800 10 0 0 40 0 0").unwrap();
        let after = MachineCpu::parse("cpu  250 0 100 900 20 0 0 80 0 0").unwrap();
        // 200 busy, 100 idle, 10 iowait, 40 stolen: 350 ticks.
        assert_eq!(
            after.since(&before),
            "cores busy 57%, idle 29%, waiting for the disk 3%, stolen by the host 11%"
        );
        assert!(MachineCpu::parse("cpu0 1 2 3 4 5 6 7 8").is_none());
        assert!(MachineCpu::parse("cpu  1 2 3").is_none());
    }
}
