//! `bench all` (every side-by-side scenario, repeated, one table, a JSON
//! file) and `bench compare` (two such files side by side). The module doc
//! of main.rs says what each figure means.

use std::{
    collections::BTreeMap,
    io::Write as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::Arc,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{bail, Context as _};
use async_nats::jetstream;
use bytes::Bytes;
use clap::Args;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tocsin_tests::{NatsServer, TocsinHarness, TEST_TOKEN};

use super::{
    collect, median,
    peer::{self, Alertmanager, Grouping, Receiver},
    AlertGen, RawSide, RoundResult, TaskResult, Tocsin,
};

#[derive(Args, Debug)]
pub struct AllArgs {
    /// One repetition and small sizes (the whole run takes about six
    /// minutes).
    #[arg(long)]
    quick: bool,
    /// Repetitions of every scenario (default 3; 1 with --quick).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=100))]
    repetitions: Option<u32>,
    /// Run only these scenarios (repeat or comma-separate); default all.
    #[arg(long, value_enum, value_delimiter = ',')]
    only: Vec<Scenario>,
    /// Where to write the figures as JSON (default
    /// <target dir>/bench/all-<unix time>.json).
    #[arg(long)]
    json: Option<PathBuf>,
    /// Pending escalation timers of the timers scenario (default 100,000;
    /// 10,000 with --quick).
    #[arg(long, value_parser = clap::value_parser!(u32).range(10..=10_000_000))]
    timers: Option<u32>,
    /// Open incidents of the recovery scenario (default 100,000; 5,000 with
    /// --quick).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=10_000_000))]
    incidents: Option<u32>,
    /// Groups the storm's alerts are spread over (default 10,000; 200 with
    /// --quick): fewer groups, more alerts per incident.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    storm_groups: Option<u32>,
    /// Each storm request holds one group's alerts, as Alertmanager
    /// notifies a group (default: alert i of a request in group i mod
    /// groups, as Prometheus sends alerts to Alertmanager).
    #[arg(long)]
    storm_grouped: bool,
    /// Alert to page: also print per phase where an alert's time went
    /// (answered by ingest, its INCIDENTS entry, its NOTIFY page, the
    /// webhook; the p50 and p99 of each, and the slowest alert's), seen by
    /// a core NATS subscription of the bench on
    /// `tocsin.incidents.>` and `tocsin.notify.>` (which costs nats-server
    /// a delivery per message more).
    #[arg(long)]
    stage_times: bool,
    /// Alert to page: write and fsync a 4 KiB file every 10 ms beside the
    /// Tocsin side (in the temp dir its nats-server stores in) and print
    /// the syncs per phase, the slowest in each 5 s window beside the
    /// window's p99, and (with --stage-times) those around the slowest
    /// alert: whether a stall was the disk's.
    #[arg(long)]
    sync_probe: bool,
    /// Worker threads of each `tocsin` process (`tocsin --threads`); 0 (the
    /// default) passes no `--threads`: tocsin's own default, one per core.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u16).range(0..=1024))]
    service_threads: u16,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scenario {
    Ingest,
    AlertToPage,
    Storm,
    Timers,
    Recovery,
    Notifier,
    ScaleOut,
}

/// The `peer` of a figure nothing runs beside: its `peer_values` are empty
/// (the table prints `—`, `compare` leaves it out).
pub const NO_PEER: &str = "—";

#[derive(Args, Debug)]
pub struct CompareArgs {
    /// The earlier `bench all` JSON file.
    a: PathBuf,
    /// The later one.
    b: PathBuf,
}

/// One figure of the table: Tocsin's value per repetition beside the
/// peer's (`peer` names it: Alertmanager, raw JetStream).
#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct Figure {
    pub scenario: String,
    pub metric: String,
    pub unit: String,
    /// "higher" or "lower" is better.
    pub better: String,
    /// What the Tocsin column measures (e.g. which processes' CPU).
    pub tocsin_side: String,
    /// [`NO_PEER`] where nothing runs beside Tocsin.
    pub peer: String,
    /// Per repetition; a figure that could not be measured is NaN (null in
    /// the JSON). `peer_values` is empty where there is no peer.
    #[serde(deserialize_with = "nulls_as_nan")]
    pub tocsin: Vec<f64>,
    #[serde(deserialize_with = "nulls_as_nan")]
    pub peer_values: Vec<f64>,
}

/// serde_json writes NaN as null; read it back as NaN.
fn nulls_as_nan<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<f64>, D::Error> {
    let v: Vec<Option<f64>> = Deserialize::deserialize(d)?;
    Ok(v.into_iter().map(|x| x.unwrap_or(f64::NAN)).collect())
}

impl Figure {
    pub fn new(scenario: &str, metric: &str, unit: &str, better: &str, peer: &str) -> Figure {
        Figure {
            scenario: scenario.into(),
            metric: metric.into(),
            unit: unit.into(),
            better: better.into(),
            tocsin_side: "Tocsin".into(),
            peer: peer.into(),
            tocsin: Vec::new(),
            peer_values: Vec::new(),
        }
    }

    pub fn side(mut self, what: &str) -> Figure {
        self.tocsin_side = what.into();
        self
    }

    /// One repetition's value, in the Tocsin column or the peer's.
    pub fn push(&mut self, tocsin: bool, v: f64) {
        if tocsin {
            self.tocsin.push(v);
        } else {
            self.peer_values.push(v);
        }
    }

    fn key(&self) -> String {
        format!("{} / {} [{}]", self.scenario, self.metric, self.unit)
    }
}

#[derive(Serialize, Deserialize, Debug)]
pub struct Machine {
    pub cores: usize,
    pub fsync_p50_ms: f64,
    pub fsync_p99_ms: f64,
    pub fsync_dir: String,
    pub nats_server: String,
    pub alertmanager: String,
    pub git_commit: String,
    pub kernel: String,
    /// "release", or "debug" (a smoke run; the figures are not
    /// representative). Files written before it say nothing (read as "").
    #[serde(default)]
    pub build: String,
    /// `tocsin --threads` of every service process; 0: none given (one
    /// worker per core), as in files written before it.
    #[serde(default)]
    pub service_threads: u16,
}

#[derive(Serialize, Deserialize, Debug)]
pub struct Report {
    pub unix_time: u64,
    pub quick: bool,
    pub repetitions: u32,
    pub machine: Machine,
    pub figures: Vec<Figure>,
    /// Peak RSS (MiB) of every process, per scenario, the largest over the
    /// repetitions.
    pub peak_rss_mib: BTreeMap<String, f64>,
    /// Lost, duplicated or failed: must be empty for a valid run.
    pub problems: Vec<String>,
}

/// What a scenario adds to the report.
#[derive(Default)]
pub struct Outcome {
    pub figures: Vec<Figure>,
    pub peak_rss_mib: BTreeMap<String, f64>,
    pub problems: Vec<String>,
}

impl Outcome {
    pub fn rss(&mut self, name: String, mib: Option<f64>) {
        if let Some(v) = mib {
            let e = self.peak_rss_mib.entry(name).or_insert(0.0);
            *e = e.max(v);
        }
    }
}

/// How [`Machine::service_threads`] reads.
fn threads_text(n: u16) -> String {
    match n {
        0 => "a worker thread per core".to_string(),
        n => format!("--threads {n}"),
    }
}

/// The target dir: the bench binary runs from `<target>/<profile>/bench`.
fn target_dir() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|p| Some(p.parent()?.parent()?.to_path_buf()))
        .unwrap_or_else(|| PathBuf::from("target"))
}

pub async fn all(args: AllArgs) -> anyhow::Result<()> {
    let quick = args.quick;
    let reps = args.repetitions.unwrap_or(if quick { 1 } else { 3 });
    let started = Instant::now();
    let unix_time = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default();
    let out_dir = target_dir().join("bench");
    std::fs::create_dir_all(&out_dir)
        .with_context(|| format!("cannot create {}", out_dir.display()))?;
    let json_path = args
        .json
        .clone()
        .unwrap_or_else(|| out_dir.join(format!("all-{unix_time}.json")));

    super::page_path::set_service_threads(args.service_threads);
    let machine = Machine {
        service_threads: args.service_threads,
        ..machine_facts(&out_dir).await?
    };
    println!(
        "tocsin bench all{}: {reps} repetition(s) per scenario",
        if quick { " --quick" } else { "" }
    );
    println!(
        "machine: {} cores; fsync of a 4 KiB file in {}: p50 {:.2}ms p99 {:.2}ms; {}; nats-server {}; {}; commit {}; tocsin processes: {}",
        machine.cores,
        machine.fsync_dir,
        machine.fsync_p50_ms,
        machine.fsync_p99_ms,
        machine.kernel,
        machine.nats_server,
        machine.alertmanager,
        machine.git_commit,
        threads_text(machine.service_threads)
    );
    if machine.build == "debug" {
        println!(
            "build: DEBUG (a smoke run: these figures are not representative; \
             ./deploy/dev.sh bench all measures a release build)"
        );
    }
    println!();

    let mut outcomes = Vec::new();
    let run = |s: Scenario| args.only.is_empty() || args.only.contains(&s);
    // How long each scenario took, for the last line.
    let mut took: Vec<(&str, Duration)> = Vec::new();
    if run(Scenario::Ingest) {
        let t = Instant::now();
        println!(
            "== ingest: Tocsin ingest (HTTP) vs raw JetStream vs Alertmanager POST /api/v2/alerts"
        );
        outcomes.push(ingest_side_by_side(quick, reps).await?);
        took.push(("ingest", t.elapsed()));
        println!();
    }
    if run(Scenario::AlertToPage) {
        let t = Instant::now();
        println!("== alert to page: separate processes vs Alertmanager");
        let looks = super::page_path::Looks {
            stage_times: args.stage_times,
            sync_probe: args.sync_probe,
        };
        outcomes.push(super::page_path::page_path(quick, reps, looks).await?);
        took.push(("alert-to-page", t.elapsed()));
        println!();
    }
    if run(Scenario::Storm) {
        let t = Instant::now();
        println!("== storm: many alerts over few groups, separate processes vs Alertmanager");
        outcomes
            .push(super::storm::storm(quick, reps, args.storm_groups, args.storm_grouped).await?);
        took.push(("storm", t.elapsed()));
        println!();
    }
    if run(Scenario::Timers) {
        let t = Instant::now();
        println!("== timers: pending escalation timers, the escalation service alone (no peer)");
        let n = args.timers.unwrap_or(if quick { 10_000 } else { 100_000 });
        outcomes.push(super::timers::timers(n, reps).await?);
        took.push(("timers", t.elapsed()));
        println!();
    }
    if run(Scenario::Recovery) {
        let t = Instant::now();
        println!(
            "== recovery: incidents and escalation SIGKILLed with many open incidents, separate processes (no peer)"
        );
        let n = args
            .incidents
            .unwrap_or(if quick { 5_000 } else { 100_000 });
        outcomes.push(super::recovery::recovery(n, reps).await?);
        took.push(("recovery", t.elapsed()));
        println!();
    }
    if run(Scenario::Notifier) {
        let t = Instant::now();
        println!("== notifier: pages/s to the fake providers, 2 replicas vs 1");
        outcomes.push(super::notifier_all::notifier(quick, reps).await?);
        took.push(("notifier", t.elapsed()));
        println!();
    }

    if run(Scenario::ScaleOut) {
        let t = Instant::now();
        println!(
            "== scale-out: incidents partitioned by dedup key, 2 partitions vs 1, a model (partitioning is not built; see ARCHITECTURE.md, \"Scaling out\")"
        );
        outcomes.push(super::scale_out::scale_out(quick, reps).await?);
        took.push(("scale-out", t.elapsed()));
        println!();
    }

    let mut report = Report {
        unix_time,
        quick,
        repetitions: reps,
        machine,
        figures: Vec::new(),
        peak_rss_mib: BTreeMap::new(),
        problems: Vec::new(),
    };
    for o in outcomes {
        report.figures.extend(o.figures);
        report.peak_rss_mib.extend(o.peak_rss_mib);
        report.problems.extend(o.problems);
    }

    print_table(&report);
    println!();
    println!("peak RSS (VmHWM), MiB:");
    for (name, mib) in &report.peak_rss_mib {
        println!("  {name:<52} {mib:>8.1}");
    }
    std::fs::write(&json_path, serde_json::to_vec_pretty(&report)?)
        .with_context(|| format!("cannot write {}", json_path.display()))?;
    println!();
    println!(
        "figures written to {} (compare two runs: bench compare A.json B.json); took {:.0}s ({})",
        json_path.display(),
        started.elapsed().as_secs_f64(),
        took.iter()
            .map(|(name, d)| format!("{name} {:.0}s", d.as_secs_f64()))
            .collect::<Vec<_>>()
            .join(", ")
    );
    if !report.problems.is_empty() {
        for p in &report.problems {
            eprintln!("problem: {p}");
        }
        bail!(
            "{} problem(s) (lost, duplicated or failed); the figures are not valid",
            report.problems.len()
        );
    }
    Ok(())
}

fn min_max(v: &[f64]) -> (f64, f64) {
    v.iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), x| {
            (lo.min(*x), hi.max(*x))
        })
}

fn num(x: f64) -> String {
    if !x.is_finite() {
        "-".into()
    } else if x.abs() >= 100.0 {
        format!("{x:.0}")
    } else if x.abs() >= 10.0 {
        format!("{x:.1}")
    } else {
        format!("{x:.2}")
    }
}

fn cell(v: &[f64]) -> String {
    if v.is_empty() {
        return NO_PEER.into();
    }
    let (lo, hi) = min_max(v);
    if v.len() == 1 {
        num(v[0])
    } else {
        format!("{} ({}–{})", num(median(v.to_vec())), num(lo), num(hi))
    }
}

fn print_table(r: &Report) {
    println!(
        "{:<58} {:<10} {:>24} {:>24}  {:<16} {:>7}",
        "scenario / figure",
        "unit",
        "Tocsin median (min–max)",
        "peer median (min–max)",
        "peer",
        "ratio"
    );
    for f in &r.figures {
        let ratio = median(f.tocsin.clone()) / median(f.peer_values.clone());
        println!(
            "{:<58} {:<10} {:>24} {:>24}  {:<16} {:>7}",
            format!("{} / {}", f.scenario, f.metric),
            f.unit,
            cell(&f.tocsin),
            cell(&f.peer_values),
            f.peer,
            if ratio.is_finite() {
                format!("{ratio:.2}x")
            } else {
                "-".into()
            }
        );
    }
    println!("ratio = Tocsin median / peer median (the JSON says per figure whether higher or lower is better)");
    println!("what the Tocsin column measures:");
    let mut sides: BTreeMap<&str, std::collections::BTreeSet<String>> = BTreeMap::new();
    for f in &r.figures {
        sides
            .entry(f.tocsin_side.as_str())
            .or_default()
            .insert(format!("{} / {}", f.scenario, f.metric));
    }
    for (side, figures) in sides {
        let figures: Vec<String> = figures.into_iter().collect();
        println!("  {side}: {}", figures.join(", "));
    }
}

pub fn compare(args: CompareArgs) -> anyhow::Result<()> {
    let read = |p: &Path| -> anyhow::Result<Report> {
        let text = std::fs::read(p).with_context(|| format!("cannot read {}", p.display()))?;
        serde_json::from_slice(&text)
            .with_context(|| format!("{} is not a bench all file", p.display()))
    };
    let (a, b) = (read(&args.a)?, read(&args.b)?);
    for (name, path, r) in [("A", &args.a, &a), ("B", &args.b, &b)] {
        println!(
            "{name}: {} (commit {}, {} cores, fsync p50 {:.2}ms, {}, tocsin processes: {}{}{})",
            path.display(),
            r.machine.git_commit,
            r.machine.cores,
            r.machine.fsync_p50_ms,
            r.machine.nats_server,
            threads_text(r.machine.service_threads),
            if r.quick { ", quick" } else { "" },
            if r.machine.build == "debug" {
                ", DEBUG build"
            } else {
                ""
            }
        );
    }
    if a.quick != b.quick {
        println!("warning: one run is --quick and the other is not; sizes differ");
    }
    println!();
    println!(
        "{:<80} {:>10} {:>10} {:>9}",
        "figure (median)", "A", "B", "change"
    );
    let index = |r: &Report| -> BTreeMap<String, (f64, String)> {
        let mut m = BTreeMap::new();
        for f in &r.figures {
            m.insert(
                format!("{} (Tocsin)", f.key()),
                (median(f.tocsin.clone()), f.better.clone()),
            );
            if !f.peer_values.is_empty() {
                m.insert(
                    format!("{} ({})", f.key(), f.peer),
                    (median(f.peer_values.clone()), f.better.clone()),
                );
            }
        }
        m
    };
    let (ia, ib) = (index(&a), index(&b));
    let keys: std::collections::BTreeSet<&String> = ia.keys().chain(ib.keys()).collect();
    for k in keys {
        let va = ia.get(k).map(|v| v.0);
        let vb = ib.get(k).map(|v| v.0);
        let better = ia.get(k).or(ib.get(k)).map(|v| v.1.as_str()).unwrap_or("");
        let change = match (va, vb) {
            (Some(x), Some(y)) if x != 0.0 && x.is_finite() && y.is_finite() => {
                let pct = 100.0 * (y - x) / x;
                let verdict = match (better, pct) {
                    (_, p) if p.abs() < 5.0 => "",
                    ("higher", p) if p > 0.0 => "better",
                    ("lower", p) if p < 0.0 => "better",
                    _ => "worse",
                };
                (format!("{pct:+.1}%"), verdict)
            }
            _ => ("-".into(), ""),
        };
        println!(
            "{:<80} {:>10} {:>10} {:>9}  {}",
            k,
            va.map(num).unwrap_or_else(|| "-".into()),
            vb.map(num).unwrap_or_else(|| "-".into()),
            change.0,
            change.1
        );
    }
    for (name, r) in [("A", &a), ("B", &b)] {
        if !r.problems.is_empty() {
            println!(
                "{name} had {} problem(s): its figures are not valid",
                r.problems.len()
            );
        }
    }
    Ok(())
}

/// Cores, fsync latency (a 4 KiB file written and fsynced 200 times in
/// `dir`), versions and the commit.
async fn machine_facts(dir: &Path) -> anyhow::Result<Machine> {
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let path = dir.join(format!("fsync-probe-{}", std::process::id()));
    let mut times = Vec::with_capacity(200);
    {
        let mut f = std::fs::File::create(&path)?;
        let block = [0x5au8; 4096];
        for _ in 0..200 {
            let t = Instant::now();
            f.write_all(&block)?;
            f.sync_all()?;
            times.push(t.elapsed());
        }
    }
    let _ = std::fs::remove_file(&path);
    times.sort_unstable();
    let at = |q: f64| {
        super::percentile(&times, q)
            .map(|d| d.as_secs_f64() * 1e3)
            .unwrap_or(f64::NAN)
    };
    let nats_server = match tocsin_tests::nats::nats_server_bin() {
        Ok(bin) => peer::version_line(&bin),
        Err(e) => format!("not found: {e}"),
    };
    let alertmanager = match peer::alertmanager_bin() {
        Ok(bin) => peer::version_line(&bin),
        Err(e) => format!("not found: {e}"),
    };
    let git = |args: &[&str]| -> Option<String> {
        let o = Command::new("git")
            .args(args)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .stdin(Stdio::null())
            .output()
            .ok()?;
        o.status
            .success()
            .then(|| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    let git_commit = match git(&["rev-parse", "HEAD"]) {
        Some(c) => {
            let dirty = git(&["status", "--porcelain", "--untracked-files=no"])
                .is_some_and(|s| !s.is_empty());
            if dirty {
                format!("{c}-dirty")
            } else {
                c
            }
        }
        None => "unknown".into(),
    };
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| format!("Linux {}", s.trim()))
        .unwrap_or_else(|_| "kernel unknown".into());
    Ok(Machine {
        cores,
        fsync_p50_ms: at(0.50),
        fsync_p99_ms: at(0.99),
        fsync_dir: dir.display().to_string(),
        nats_server,
        alertmanager,
        git_commit,
        kernel,
        build: BUILD.into(),
        service_threads: 0,
    })
}

/// How this bench (and, from the same build, `tocsin`) was compiled.
const BUILD: &str = if cfg!(debug_assertions) {
    "debug"
} else {
    "release"
};

/// The v2 API body (`POST /api/v2/alerts`) of the same alerts as a webhook
/// body made by [`AlertGen::body`].
fn v2_body(webhook_body: &[u8]) -> anyhow::Result<Bytes> {
    let v: Value = serde_json::from_slice(webhook_body)?;
    let alerts: Vec<Value> = v["alerts"]
        .as_array()
        .context("no alerts")?
        .iter()
        .map(|a| {
            json!({
                "labels": a["labels"],
                "annotations": a["annotations"],
                "startsAt": a["startsAt"],
                "endsAt": a["endsAt"],
                "generatorURL": a["generatorURL"],
            })
        })
        .collect();
    Ok(Bytes::from(serde_json::to_vec(&alerts)?))
}

/// One Alertmanager round: `bodies` POSTed to `POST /api/v2/alerts` from
/// one task per client (as [`super::ingest_round`]); 200 is success.
async fn alertmanager_round(
    clients: &[reqwest::Client],
    url: &Arc<str>,
    bodies: &Arc<Vec<Bytes>>,
    per_request: usize,
) -> RoundResult {
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let started = Instant::now();
    let tasks: Vec<_> = clients
        .iter()
        .map(|client| {
            let (client, url, bodies, next) =
                (client.clone(), url.clone(), bodies.clone(), next.clone());
            tokio::spawn(async move {
                let mut out = TaskResult::default();
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let Some(body) = bodies.get(i) else { break };
                    let t = Instant::now();
                    let r = client
                        .post(&*url)
                        .header("content-type", "application/json")
                        .body(body.clone())
                        .send()
                        .await;
                    match r {
                        Ok(r) if r.status() == 200 => {
                            let _ = r.bytes().await;
                            out.latencies.push(t.elapsed());
                            out.stored += per_request;
                        }
                        Ok(r) => {
                            let status = r.status();
                            let text = r.text().await.unwrap_or_default();
                            out.failures
                                .push(format!("request {i}: {status} {}", text.trim()))
                        }
                        Err(e) => out.failures.push(format!("request {i}: not sent: {e}")),
                    }
                }
                out
            })
        })
        .collect();
    collect(started, tasks).await
}

/// CPU seconds per 1,000 alerts from tick counts.
pub(crate) fn cpu_per_1000(ticks: Option<u64>, alerts: usize, hz: f64) -> f64 {
    match ticks {
        Some(t) if alerts > 0 => t as f64 / hz / alerts as f64 * 1000.0,
        _ => f64::NAN,
    }
}

/// Item 2: the ingest benchmark's two sides (Tocsin's in-process ingest over
/// HTTP and raw JetStream publishes, on a private nats-server) and a third:
/// the same alerts to a real Alertmanager's v2 API.
async fn ingest_side_by_side(quick: bool, reps: u32) -> anyhow::Result<Outcome> {
    let (requests, per_request, connections) = if quick { (100, 100, 8) } else { (400, 100, 8) };
    let per_round = requests * per_request;
    let hz = peer::clock_ticks();

    let nats = NatsServer::start().await;
    let nats_pid = super::nats_server_pid(&nats);
    let config = TocsinHarness::config(&nats);
    let publish_timeout = config
        .ingest
        .as_ref()
        .map(|i| i.publish_timeout.get())
        .context("no ingest section")?;
    let tocsin = Tocsin::start_ingest_only(config).await?;
    let raw_client = tocsin_tests::nats::connect_url(&nats.url()).await?;
    let mut js = jetstream::new(raw_client.clone());
    js.set_timeout(publish_timeout);

    // Alertmanager: its receiver is the bench's; groups are the webhook
    // bodies' (alertname, run, round, req) and are held an hour, so during
    // the measurement it accepts, stores (in memory) and groups, and sends
    // nothing, as Tocsin's ingest accepts and stores.
    let receiver = Receiver::start().await?;
    let am = Alertmanager::start(
        &receiver.url,
        &Grouping {
            group_by: "[alertname, run, round, req]".into(),
            group_wait: "1h".into(),
            group_interval: "1h".into(),
        },
    )
    .await?;
    let am_pid = Some(am.proc.pid());

    let nonce = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or_default();
    let alerts = AlertGen {
        nonce,
        base_time: tocsin_proto::Timestamp::now()
            .checked_sub(jiff::SignedDuration::from_hours(24))
            .context("clock")?,
        requests,
        per_request,
    };
    let sample_alert =
        tocsin_ingest::receivers::alertmanager::parse(&alerts.body(0, 0), &Default::default())
            .map_err(|e| anyhow::anyhow!("generated webhook body does not parse: {}", e.reason))?
            .alerts
            .into_iter()
            .next()
            .context("no alert")?;
    let envelope =
        tocsin_proto::Envelope::new("test", tocsin_proto::Timestamp::now(), sample_alert.clone())
            .with_traceparent(Some(super::traceparent(nonce, 0)));
    let raw = RawSide {
        js: js.clone(),
        payload: Bytes::from(tocsin_proto::codec::encode(&envelope)?),
        timeout: publish_timeout,
        nonce,
        batches: requests,
        per_batch: per_request,
        tasks: connections,
        mode: super::RawMode::PerAlert,
    };
    // The same messages as ingest stores (a request's alerts in one): the
    // ceiling for Tocsin's design.
    let whole = raw.whole(&sample_alert)?;
    // The same messages as atomic batches (NATS 2.12, ADR-50), one batch a
    // request, on a stream of their own: does one commit per request raise
    // the ceiling? (On nats-server 2.12 it does not: the server still
    // syncs every message of a batch on its own.)
    js.create_stream(jetstream::stream::Config {
        name: super::ATOMIC_STREAM.into(),
        subjects: vec!["bench.atomic.>".into()],
        storage: jetstream::stream::StorageType::File,
        allow_atomic_publish: true,
        ..Default::default()
    })
    .await
    .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", super::ATOMIC_STREAM))?;
    let atomic = RawSide {
        mode: super::RawMode::Atomic,
        ..raw.clone()
    };
    let clients = (0..connections)
        .map(|_| {
            reqwest::Client::builder()
                .http1_only()
                .tcp_nodelay(true)
                .pool_max_idle_per_host(1)
                .timeout(Duration::from_secs(60))
                .build()
        })
        .collect::<Result<Vec<_>, _>>()?;
    let ingest_url: Arc<str> = format!("{}/api/v1/alerts/alertmanager", tocsin.ingest_url()).into();
    let am_url: Arc<str> = am.alerts_url().into();
    println!(
        "{requests} requests x {per_request} alerts = {per_round} alerts per round and side, {connections} keep-alive connections; \
         nats-server private (sync_interval: always); Alertmanager keeps alerts in memory (no fsync), group_wait 1h (sends nothing meanwhile)"
    );
    println!(
        "{:>5}  {:<14} {:>10} {:>8} {:>16} {:>16}",
        "rep", "side", "alerts/s", "elapsed", "CPU s/1k alerts", "bench CPU s/1k"
    );

    let mut rate = [
        Figure::new(
            "ingest",
            "alerts/s",
            "alerts/s",
            "higher",
            "raw JetStream, a message per alert",
        )
        .side("Tocsin ingest over HTTP, in-process"),
        Figure::new(
            "ingest",
            "alerts/s",
            "alerts/s",
            "higher",
            "raw JetStream, atomic batches of a request's alerts",
        )
        .side("Tocsin ingest over HTTP, in-process"),
        Figure::new("ingest", "alerts/s", "alerts/s", "higher", "Alertmanager")
            .side("Tocsin ingest over HTTP, in-process"),
        Figure::new(
            "ingest",
            "alerts/s",
            "alerts/s",
            "higher",
            "raw JetStream, the same messages (a request's alerts in one)",
        )
        .side("Tocsin ingest over HTTP, in-process"),
    ];
    let mut cpu = [
        Figure::new(
            "ingest",
            "CPU per 1k alerts",
            "s",
            "lower",
            "raw JetStream, a message per alert",
        )
        .side("nats-server + bench process (ingest and its HTTP client)"),
        Figure::new(
            "ingest",
            "CPU per 1k alerts",
            "s",
            "lower",
            "raw JetStream, atomic batches of a request's alerts",
        )
        .side("nats-server + bench process (ingest and its HTTP client)"),
        Figure::new("ingest", "CPU per 1k alerts", "s", "lower", "Alertmanager")
            .side("nats-server + bench process (ingest and its HTTP client)"),
        Figure::new(
            "ingest",
            "CPU per 1k alerts",
            "s",
            "lower",
            "raw JetStream, the same messages (a request's alerts in one)",
        )
        .side("nats-server + bench process (ingest and its HTTP client)"),
    ];
    let mut outcome = Outcome::default();
    let mut failures: Vec<String> = Vec::new();
    let mut am_client_cpu = Vec::new();
    for rep in 0..reps as usize {
        let bodies: Vec<Vec<u8>> = (0..requests).map(|i| alerts.body(rep, i)).collect();
        let am_bodies: Arc<Vec<Bytes>> = Arc::new(
            bodies
                .iter()
                .map(|b| v2_body(b))
                .collect::<anyhow::Result<_>>()?,
        );
        let bodies: Arc<Vec<Bytes>> = Arc::new(bodies.into_iter().map(Bytes::from).collect());
        for k in 0..5 {
            match (k + rep) % 5 {
                0 => {
                    let before = (peer::cpu_ticks(nats_pid), peer::cpu_ticks(None));
                    let r = super::ingest_round(
                        &clients,
                        &ingest_url,
                        TEST_TOKEN,
                        &bodies,
                        per_request,
                    )
                    .await;
                    let after = (peer::cpu_ticks(nats_pid), peer::cpu_ticks(None));
                    let ticks = match (before, after) {
                        ((Some(n0), Some(b0)), (Some(n1), Some(b1))) => Some(n1 - n0 + b1 - b0),
                        _ => None,
                    };
                    let bench = after.1.zip(before.1).map(|(a, b)| a - b);
                    let c = cpu_per_1000(ticks, r.stored, hz);
                    print_row(
                        rep,
                        "Tocsin ingest",
                        &r,
                        c,
                        cpu_per_1000(bench, r.stored, hz),
                    );
                    for f in &mut rate {
                        f.tocsin.push(r.rate());
                    }
                    for f in &mut cpu {
                        f.tocsin.push(c);
                    }
                    failures.extend(r.failures.iter().map(|f| format!("ingest: {f}")));
                }
                1..=3 => {
                    let (side, name, i) = match (k + rep) % 5 {
                        1 => (&raw, "raw JetStream", 0),
                        2 => (&atomic, "atomic batches", 1),
                        _ => (&whole, "raw, as ingest", 3),
                    };
                    let before = (peer::cpu_ticks(nats_pid), peer::cpu_ticks(None));
                    let r = side.round(rep).await;
                    let after = (peer::cpu_ticks(nats_pid), peer::cpu_ticks(None));
                    let ticks = match (before, after) {
                        ((Some(n0), Some(b0)), (Some(n1), Some(b1))) => Some(n1 - n0 + b1 - b0),
                        _ => None,
                    };
                    let bench = after.1.zip(before.1).map(|(a, b)| a - b);
                    let c = cpu_per_1000(ticks, r.stored, hz);
                    print_row(rep, name, &r, c, cpu_per_1000(bench, r.stored, hz));
                    rate[i].peer_values.push(r.rate());
                    cpu[i].peer_values.push(c);
                    failures.extend(r.failures.iter().map(|f| format!("{name}: {f}")));
                }
                _ => {
                    let before = (peer::cpu_ticks(am_pid), peer::cpu_ticks(None));
                    let r = alertmanager_round(&clients, &am_url, &am_bodies, per_request).await;
                    let after = (peer::cpu_ticks(am_pid), peer::cpu_ticks(None));
                    let am_ticks = after.0.zip(before.0).map(|(a, b)| a - b);
                    let bench = after.1.zip(before.1).map(|(a, b)| a - b);
                    let c = cpu_per_1000(am_ticks, r.stored, hz);
                    let client = cpu_per_1000(bench, r.stored, hz);
                    am_client_cpu.push(client);
                    print_row(rep, "Alertmanager", &r, c, client);
                    rate[2].peer_values.push(r.rate());
                    cpu[2].peer_values.push(c);
                    failures.extend(r.failures.iter().map(|f| format!("Alertmanager: {f}")));
                }
            }
        }
    }
    println!(
        "CPU: Tocsin and raw JetStream = nats-server + this whole process (ingest runs in it, with the HTTP client \
         or the raw publisher); Alertmanager = its process alone (its HTTP client, in this process, cost {} s/1k alerts: \
         the `bench CPU` column, to subtract from Tocsin's for a like-for-like server-side figure)",
        num(median(am_client_cpu))
    );

    // Stored: the ALERTS stream grew by everything both Tocsin sides sent;
    // Alertmanager holds every alert.
    let stream = super::stream_messages(&js).await?;
    let expected = (reps as usize
        * (super::ingest_messages(requests, per_request)
            + raw.messages_per_round()
            + whole.messages_per_round())) as u64;
    if stream != expected {
        failures.push(format!(
            "ALERTS holds {stream} messages, expected {expected}"
        ));
    }
    let atomic_stored = super::stream_state(&js, super::ATOMIC_STREAM)
        .await?
        .messages;
    let atomic_expected = (reps as usize * per_round) as u64;
    if atomic_stored != atomic_expected {
        failures.push(format!(
            "{} holds {atomic_stored} messages, expected {atomic_expected}",
            super::ATOMIC_STREAM
        ));
    }
    let held = reqwest::Client::new()
        .get(&*am_url)
        .send()
        .await?
        .json::<Value>()
        .await?
        .as_array()
        .map(Vec::len)
        .unwrap_or(0);
    let am_expected = reps as usize * per_round;
    if held != am_expected {
        failures.push(format!(
            "Alertmanager holds {held} alerts, expected {am_expected}"
        ));
    }
    println!(
        "stored: ALERTS +{stream} (expected {expected}); {} {atomic_stored} (expected {atomic_expected}); \
         Alertmanager holds {held} alerts (expected {am_expected})",
        super::ATOMIC_STREAM
    );

    outcome.rss("ingest: nats-server".into(), peer::peak_rss_mib(nats_pid));
    outcome.rss(
        "ingest: bench process (in-process ingest + clients)".into(),
        peer::peak_rss_mib(None),
    );
    outcome.rss("ingest: alertmanager".into(), peer::peak_rss_mib(am_pid));
    let mut rss = Figure::new("ingest", "peak RSS", "MiB", "lower", "Alertmanager")
        .side("nats-server + bench process (ingest in-process)");
    rss.tocsin.push(
        peer::peak_rss_mib(nats_pid).unwrap_or(f64::NAN)
            + peer::peak_rss_mib(None).unwrap_or(f64::NAN),
    );
    rss.peer_values
        .push(peer::peak_rss_mib(am_pid).unwrap_or(f64::NAN));

    outcome.figures.extend(rate);
    outcome.figures.extend(cpu);
    outcome.figures.push(rss);
    if !failures.is_empty() {
        for f in failures.iter().take(super::SHOW_FAILURES) {
            eprintln!("  {f}");
        }
        outcome.problems.push(format!(
            "ingest: {} failures, first: {}",
            failures.len(),
            failures[0]
        ));
    }
    drop(raw_client);
    drop(am);
    tocsin.stop().await.context("stopping tocsin ingest")?;
    drop(nats);
    Ok(outcome)
}

fn print_row(rep: usize, side: &str, r: &RoundResult, cpu: f64, bench_cpu: f64) {
    println!(
        "{:>5}  {:<14} {:>10.0} {:>7.2}s {:>16} {:>16}{}",
        rep + 1,
        side,
        r.rate(),
        r.elapsed.as_secs_f64(),
        num(cpu),
        num(bench_cpu),
        if r.failures.is_empty() {
            String::new()
        } else {
            format!("  ({} FAILED)", r.failures.len())
        }
    );
}
