//! Tocsin's benchmark harness.
//!
//! ```text
//! cargo run --release -p tocsin-tests --bin bench -- ingest
//! ```
//!
//! (also `./deploy/dev.sh bench ingest`). `ingest` starts a private
//! nats-server (JetStream, `sync_interval: always`, as deployments run it;
//! found through `NATS_SERVER_BIN` or `.tocsin/venv`, which
//! `./deploy/dev.sh deps` installs) or uses `--nats-url`, starts Tocsin's
//! ingest service in-process on it (`--with-incidents`: every service, as
//! `tocsin up` runs them; the incidents service then consumes ALERTS during
//! the measurement), and then, for each round:
//!
//! - **ingest**: POSTs `--requests` Alertmanager v4 webhook payloads of
//!   `--alerts-per-request` alerts each to `/api/v1/alerts/alertmanager`,
//!   from `--connections` HTTP/1.1 keep-alive connections (one client and
//!   one task per connection). Every answer must be 200 with every alert
//!   stored.
//! - **raw JetStream**: publishes the same number of messages, each the size
//!   of one encoded alert envelope with the same headers and a unique
//!   `Nats-Msg-Id`, from its own async-nats client, with the same
//!   concurrency: each task publishes a batch of `--alerts-per-request`
//!   messages and awaits their acks, the work of one ingest request.
//!
//! Every alert and message is unique across the run, so JetStream's
//! de-duplication never skips work. The two sides alternate which goes
//! first. It prints alerts/s per round, the medians and their ratio, and
//! latency percentiles; it exits non-zero if anything failed.

use std::{
    future::IntoFuture,
    process::ExitCode,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{bail, Context as _};
use async_nats::{
    jetstream::{self, message::PublishMessage},
    HeaderMap,
};
use bytes::Bytes;
use clap::{Args, Parser, Subcommand};
use futures::future::join_all;
use serde_json::{json, Value};
use tocsin::{
    app,
    config::{Config, Service},
};
use tocsin_incidents::clock::SystemClock;
use tocsin_proto::{
    codec,
    subjects::{headers, STREAM_ALERTS},
    Envelope, Fingerprint, Labels, Timestamp, SCHEMA_VERSION,
};
use tocsin_runtime::{nats::NatsConfig, CancellationToken};
use tocsin_tests::{NatsServer, TocsinHarness, TEST_TOKEN};
use tokio::net::TcpListener;

/// How many failure messages to print per side.
const SHOW_FAILURES: usize = 5;

/// async-nats's default `max_ack_inflight`: publishes whose acks are not yet
/// awaited hold one of these permits each.
const ASYNC_NATS_MAX_ACK_INFLIGHT: usize = 5_000;

#[derive(Parser)]
#[command(name = "bench", about = "Tocsin benchmark harness")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Alertmanager webhooks over HTTP against raw JetStream publishes of
    /// the same messages to the same server.
    Ingest(IngestArgs),
}

#[derive(Args, Debug)]
struct IngestArgs {
    /// Webhook payloads per round (and raw batches per round).
    #[arg(long, default_value_t = 400, value_parser = clap::value_parser!(u32).range(1..))]
    requests: u32,
    /// Alerts per payload (and messages per raw batch).
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..))]
    alerts_per_request: u32,
    /// Concurrent HTTP connections (and raw publishing tasks).
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..))]
    connections: u32,
    /// Rounds per side; the medians are reported.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    rounds: u32,
    /// Run every service, as `tocsin up` does, instead of ingest alone: the
    /// incidents service then consumes ALERTS (both sides' messages) while
    /// the benchmark runs.
    #[arg(long)]
    with_incidents: bool,
    /// Use this NATS server (JetStream enabled, no auth) instead of starting
    /// a private one.
    #[arg(long)]
    nats_url: Option<String>,
}

#[tokio::main]
async fn main() -> ExitCode {
    let result = match Cli::parse().command {
        Command::Ingest(args) => ingest(args).await,
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// What one side did in one round.
struct RoundResult {
    elapsed: Duration,
    /// Alerts (messages) stored.
    stored: usize,
    /// Per-request (per-batch) latencies of the successful ones.
    latencies: Vec<Duration>,
    failures: Vec<String>,
}

impl RoundResult {
    fn rate(&self) -> f64 {
        self.stored as f64 / self.elapsed.as_secs_f64()
    }
}

/// Per-task outcome, merged into a [`RoundResult`].
#[derive(Default)]
struct TaskResult {
    stored: usize,
    latencies: Vec<Duration>,
    failures: Vec<String>,
}

async fn ingest(args: IngestArgs) -> anyhow::Result<()> {
    let requests = args.requests as usize;
    let per_request = args.alerts_per_request as usize;
    let connections = args.connections as usize;
    let rounds = args.rounds as usize;
    let per_round = requests * per_request;

    // NATS: private (like the tests) or the one given.
    let private = match &args.nats_url {
        Some(_) => None,
        None => Some(NatsServer::start().await),
    };
    let (nats_url, config) = match (&private, &args.nats_url) {
        (Some(nats), _) => (nats.url(), TocsinHarness::config(nats)),
        (None, Some(url)) => (
            url.clone(),
            Config {
                nats: NatsConfig::for_url(url.clone()),
                ingest: Some(tocsin_ingest::IngestConfig::with_token("test", TEST_TOKEN)),
                ..Default::default()
            },
        ),
        (None, None) => unreachable!("a private server is started when no URL is given"),
    };
    // The raw side waits for its acks as long as ingest does.
    let publish_timeout = config
        .ingest
        .as_ref()
        .map(|i| i.publish_timeout.get())
        .context("no ingest section")?;
    let tocsin = if args.with_incidents {
        Tocsin::All(TocsinHarness::start_with(config).await)
    } else {
        Tocsin::start_ingest_only(config).await?
    };

    // The raw side's own client.
    let raw_client = async_nats::connect(&nats_url)
        .await
        .with_context(|| format!("cannot connect to {nats_url}"))?;
    let mut js = jetstream::new(raw_client.clone());
    js.set_timeout(publish_timeout);
    let server_version = raw_client.server_info().version;
    let stream_before = stream_messages(&js).await?;

    // Unique per run, so runs against a shared server within the duplicate
    // window do not collide either.
    let nonce = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or_default();
    let base_time: Timestamp = Timestamp::now()
        .checked_sub(jiff::SignedDuration::from_hours(24))
        .context("clock")?;
    let alerts = AlertGen {
        nonce,
        base_time,
        requests,
        per_request,
    };

    // A realistic raw payload: one alert of a webhook body, converted the way
    // ingest converts it, in an envelope, encoded.
    let sample_body = alerts.body(0, 0);
    let sample = tocsin_ingest::receivers::alertmanager::parse(&sample_body)
        .map_err(|e| anyhow::anyhow!("generated webhook body does not parse: {e}"))?;
    let sample_alert = sample
        .alerts
        .into_iter()
        .next()
        .context("generated webhook body has no alerts")?;
    let envelope = Envelope::new("test", Timestamp::now(), sample_alert)
        .with_traceparent(Some(traceparent(nonce, 0)));
    let raw_payload = Bytes::from(codec::encode(&envelope)?);

    println!(
        "tocsin bench ingest: {requests} requests x {per_request} alerts = {per_round} alerts per round and side, \
         {connections} connections, {rounds} rounds"
    );
    println!(
        "machine: {} CPUs (available_parallelism); nats-server {}{}",
        std::thread::available_parallelism()
            .map(|n| n.get().to_string())
            .unwrap_or_else(|_| "?".into()),
        if server_version.is_empty() {
            "version unknown".to_string()
        } else {
            format!("v{server_version}")
        },
        if private.is_some() {
            " (private: JetStream file store in a temp dir, sync_interval: always)".to_string()
        } else {
            format!(" at {nats_url}")
        },
    );
    println!(
        "services: {}",
        if args.with_incidents {
            "all (ingest + incidents, as `tocsin up`)"
        } else {
            "ingest only (--with-incidents runs every service)"
        }
    );
    println!(
        "sizes: webhook body {} B per request ({} B per alert); raw message {} B payload + traceparent, {} and {} headers",
        sample_body.len(),
        sample_body.len() / per_request,
        raw_payload.len(),
        headers::SCHEMA,
        headers::MSG_ID,
    );
    if connections * per_request > ASYNC_NATS_MAX_ACK_INFLIGHT {
        println!(
            "warning: {connections} x {per_request} unacknowledged publishes at once exceed async-nats's \
             default max_ack_inflight ({ASYNC_NATS_MAX_ACK_INFLIGHT}); batches that publish before awaiting \
             their acks (ingest's and the raw side's) can block each other until the publish timeout ({publish_timeout:?})"
        );
    }
    println!();

    let http_clients = (0..connections)
        .map(|_| {
            reqwest::Client::builder()
                .http1_only()
                .tcp_nodelay(true)
                .pool_max_idle_per_host(1)
                .timeout(Duration::from_secs(60))
                .build()
        })
        .collect::<Result<Vec<_>, _>>()?;
    let url: Arc<str> = format!("{}/api/v1/alerts/alertmanager", tocsin.ingest_url()).into();

    println!(
        "{:>5}  {:<14} {:>12} {:>9} {:>9} {:>9}",
        "round", "side", "alerts/s", "elapsed", "p50", "p99"
    );
    let raw = RawSide {
        js: js.clone(),
        payload: raw_payload.clone(),
        timeout: publish_timeout,
        nonce,
        batches: requests,
        per_batch: per_request,
        tasks: connections,
    };
    let mut ingest_results = Vec::with_capacity(rounds);
    let mut raw_results = Vec::with_capacity(rounds);
    for round in 0..rounds {
        // Build the bodies before the clock starts.
        let bodies: Arc<Vec<Bytes>> = Arc::new(
            (0..requests)
                .map(|i| Bytes::from(alerts.body(round, i)))
                .collect(),
        );
        let ingest_first = round % 2 == 0;
        for side in 0..2 {
            if (side == 0) == ingest_first {
                let r = ingest_round(&http_clients, &url, TEST_TOKEN, &bodies, per_request).await;
                print_round(round, "ingest (HTTP)", &r);
                ingest_results.push(r);
            } else {
                let r = raw.round(round).await;
                print_round(round, "raw JetStream", &r);
                raw_results.push(r);
            }
        }
    }
    println!();

    let ingest_median = median(ingest_results.iter().map(RoundResult::rate).collect());
    let raw_median = median(raw_results.iter().map(RoundResult::rate).collect());
    println!(
        "median ingest: {ingest_median:.0} alerts/s, median raw JetStream: {raw_median:.0} msgs/s, ratio: {:.1}%",
        100.0 * ingest_median / raw_median
    );
    let all = |rs: &[RoundResult]| {
        let mut v: Vec<Duration> = rs.iter().flat_map(|r| r.latencies.clone()).collect();
        v.sort_unstable();
        v
    };
    let (ingest_lat, raw_lat) = (all(&ingest_results), all(&raw_results));
    println!(
        "ingest per-request latency ({per_request} alerts): p50 {}, p99 {}",
        ms(percentile(&ingest_lat, 0.50)),
        ms(percentile(&ingest_lat, 0.99)),
    );
    println!(
        "raw per-batch latency ({per_request} messages):    p50 {}, p99 {}",
        ms(percentile(&raw_lat, 0.50)),
        ms(percentile(&raw_lat, 0.99)),
    );

    // Nothing was de-duplicated or lost: the stream grew by everything sent.
    let stream_after = stream_messages(&js).await?;
    let expected = (2 * rounds * per_round) as u64;
    let grown = stream_after.saturating_sub(stream_before);
    println!("{STREAM_ALERTS} stream: +{grown} messages (expected +{expected})");

    let mut failed = false;
    for (side, results) in [("ingest", &ingest_results), ("raw", &raw_results)] {
        let failures: Vec<&String> = results.iter().flat_map(|r| &r.failures).collect();
        if !failures.is_empty() {
            failed = true;
            eprintln!("{side}: {} failures, first ones:", failures.len());
            for f in failures.iter().take(SHOW_FAILURES) {
                eprintln!("  {f}");
            }
        }
    }
    if grown != expected {
        if private.is_some() {
            failed = true;
            eprintln!("{STREAM_ALERTS} grew by {grown} messages, expected {expected}");
        } else {
            eprintln!(
                "warning: {STREAM_ALERTS} grew by {grown} messages, expected {expected} \
                 (others publishing to {nats_url}?)"
            );
        }
    }

    drop(raw_client);
    tocsin.stop().await.context("stopping tocsin")?;
    drop(private);
    if failed {
        bail!("the benchmark had failures; its figures are not valid");
    }
    Ok(())
}

/// Tocsin running in this process.
enum Tocsin {
    /// Every service, through the test kit.
    All(TocsinHarness),
    /// The ingest service alone, started the way the test kit starts
    /// every service.
    IngestOnly {
        ingest_url: String,
        shutdown: CancellationToken,
        task: tokio::task::JoinHandle<anyhow::Result<()>>,
    },
}

impl Tocsin {
    async fn start_ingest_only(config: Config) -> anyhow::Result<Tocsin> {
        tocsin_tests::init_logs();
        let admin = TcpListener::bind("127.0.0.1:0").await?;
        let ingest = TcpListener::bind("127.0.0.1:0").await?;
        let admin_addr = admin.local_addr()?;
        let ingest_url = format!("http://{}", ingest.local_addr()?);
        let shutdown = CancellationToken::new();
        let options = app::Options {
            admin_listen: admin_addr,
            grace_period: Duration::from_secs(10),
            clock: Arc::new(SystemClock),
        };
        let listeners = app::Listeners {
            admin,
            ingest: Some(ingest),
        };
        let task = tokio::spawn(app::run(
            config,
            &[Service::Ingest],
            options,
            listeners,
            shutdown.clone(),
        ));
        let tocsin = Tocsin::IngestOnly {
            ingest_url,
            shutdown,
            task,
        };
        // Ready once NATS is connected and the streams exist.
        let client = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let ready = client
                .get(format!("http://{admin_addr}/readyz"))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success());
            if ready {
                return Ok(tocsin);
            }
            if Instant::now() > deadline {
                bail!("tocsin ingest not ready within 20s");
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    fn ingest_url(&self) -> &str {
        match self {
            Tocsin::All(h) => &h.ingest_url,
            Tocsin::IngestOnly { ingest_url, .. } => ingest_url,
        }
    }

    async fn stop(self) -> anyhow::Result<()> {
        match self {
            Tocsin::All(h) => h.stop().await,
            Tocsin::IngestOnly { shutdown, task, .. } => {
                shutdown.cancel();
                task.await?
            }
        }
    }
}

/// Generates the run's unique alerts and webhook bodies.
struct AlertGen {
    nonce: u64,
    base_time: Timestamp,
    requests: usize,
    per_request: usize,
}

impl AlertGen {
    /// The Alertmanager v4 webhook body of request `req` in `round`.
    fn body(&self, round: usize, req: usize) -> Vec<u8> {
        let run = format!("{:x}", self.nonce);
        let (round_s, req_s) = (round.to_string(), req.to_string());
        let common_labels = json!({
            "alertname": "Bench",
            "run": run,
            "round": round_s,
            "req": req_s,
            "service": "bench",
            "severity": "warning",
        });
        let alerts: Vec<Value> = (0..self.per_request)
            .map(|n| {
                let labels: Labels = [
                    ("alertname", "Bench"),
                    ("run", run.as_str()),
                    ("round", round_s.as_str()),
                    ("req", req_s.as_str()),
                    ("n", n.to_string().as_str()),
                    ("service", "bench"),
                    ("severity", "warning"),
                    ("instance", format!("bench-{}:9100", n % 16).as_str()),
                ]
                .into_iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
                let fingerprint = Fingerprint::from_labels(&labels);
                let index = (round * self.requests + req) * self.per_request + n;
                let starts_at = self
                    .base_time
                    .checked_add(jiff::SignedDuration::from_micros(index as i64))
                    .expect("start time in range");
                json!({
                    "status": "firing",
                    "labels": labels,
                    "annotations": {
                        "summary": "synthetic benchmark alert",
                        "runbook_url": "https://runbooks.example/bench",
                    },
                    "startsAt": starts_at.to_string(),
                    "endsAt": "0001-01-01T00:00:00Z",
                    "generatorURL": "http://prometheus:9090/graph?g0.expr=bench&g0.tab=1",
                    "fingerprint": fingerprint.as_str(),
                })
            })
            .collect();
        let body = json!({
            "receiver": "tocsin",
            "status": "firing",
            "alerts": alerts,
            "groupLabels": {"alertname": "Bench", "run": run, "round": round_s, "req": req_s},
            "commonLabels": common_labels,
            "commonAnnotations": {"summary": "synthetic benchmark alert"},
            "externalURL": "http://alertmanager:9093",
            "version": "4",
            "groupKey": format!("{{}}:{{alertname=\"Bench\", req=\"{req}\", round=\"{round}\", run=\"{run}\"}}"),
            "truncatedAlerts": 0,
        });
        serde_json::to_vec(&body).expect("JSON encodes")
    }
}

/// One ingest round: `bodies` POSTed from one task per client, each taking
/// the next body until none is left.
async fn ingest_round(
    clients: &[reqwest::Client],
    url: &Arc<str>,
    token: &str,
    bodies: &Arc<Vec<Bytes>>,
    per_request: usize,
) -> RoundResult {
    let next = Arc::new(AtomicUsize::new(0));
    let auth: Arc<str> = format!("Bearer {token}").into();
    let started = Instant::now();
    let tasks: Vec<_> = clients
        .iter()
        .map(|client| {
            let (client, url, auth, bodies, next) = (
                client.clone(),
                url.clone(),
                auth.clone(),
                bodies.clone(),
                next.clone(),
            );
            tokio::spawn(async move {
                let mut out = TaskResult::default();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(body) = bodies.get(i) else { break };
                    let t = Instant::now();
                    match post(&client, &url, &auth, body.clone(), per_request).await {
                        Ok(()) => {
                            out.latencies.push(t.elapsed());
                            out.stored += per_request;
                        }
                        Err(e) => out.failures.push(format!("request {i}: {e}")),
                    }
                }
                out
            })
        })
        .collect();
    collect(started, tasks).await
}

/// POSTs one webhook; Ok only for a 200 that stored every alert.
async fn post(
    client: &reqwest::Client,
    url: &str,
    auth: &str,
    body: Bytes,
    per_request: usize,
) -> Result<(), String> {
    let resp = client
        .post(url)
        .header("authorization", auth)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .map_err(|e| format!("not sent: {e}"))?;
    let status = resp.status().as_u16();
    let text = resp
        .text()
        .await
        .map_err(|e| format!("{status}, body not read: {e}"))?;
    let json: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
    if status == 200 && json["stored"].as_u64() == Some(per_request as u64) {
        Ok(())
    } else {
        Err(format!("{status} {}", text.trim()))
    }
}

/// The raw side: straight JetStream publishes from its own client.
#[derive(Clone)]
struct RawSide {
    js: jetstream::Context,
    /// One encoded alert envelope, sent as every message's payload.
    payload: Bytes,
    /// How long a batch may wait for its acks (ingest's publish timeout).
    timeout: Duration,
    nonce: u64,
    /// Batches per round (= ingest requests).
    batches: usize,
    /// Messages per batch (= alerts per request).
    per_batch: usize,
    /// Publishing tasks (= HTTP connections).
    tasks: usize,
}

impl RawSide {
    /// One round: the same number of messages as ingest's, in batches, from
    /// tasks sharing one client, each taking the next batch.
    async fn round(&self, round: usize) -> RoundResult {
        let next = Arc::new(AtomicUsize::new(0));
        let started = Instant::now();
        let tasks: Vec<_> = (0..self.tasks)
            .map(|_| {
                let (side, next) = (self.clone(), next.clone());
                tokio::spawn(async move {
                    let mut out = TaskResult::default();
                    loop {
                        let b = next.fetch_add(1, Ordering::Relaxed);
                        if b >= side.batches {
                            break;
                        }
                        let t = Instant::now();
                        let batch = side.batch(round * side.batches + b);
                        let result = tokio::time::timeout(side.timeout, batch)
                            .await
                            .unwrap_or_else(|_| {
                                Err(format!("not acknowledged within {:?}", side.timeout))
                            });
                        match result {
                            Ok(()) => {
                                out.latencies.push(t.elapsed());
                                out.stored += side.per_batch;
                            }
                            Err(e) => out.failures.push(format!("batch {b}: {e}")),
                        }
                    }
                    out
                })
            })
            .collect();
        collect(started, tasks).await
    }

    /// Publishes batch `index` of the run and awaits every ack, the way
    /// ingest's publisher handles one request.
    async fn batch(&self, index: usize) -> Result<(), String> {
        let tp = traceparent(self.nonce, index as u64);
        let first = index * self.per_batch;
        publish_batch(
            &self.js,
            &self.payload,
            self.nonce,
            &tp,
            first,
            self.per_batch,
        )
        .await
    }
}

/// Publishes messages `first..first + count` and awaits every ack.
async fn publish_batch(
    js: &jetstream::Context,
    payload: &Bytes,
    nonce: u64,
    traceparent: &str,
    first: usize,
    count: usize,
) -> Result<(), String> {
    let mut acks = Vec::with_capacity(count);
    for n in first..first + count {
        let mut h = HeaderMap::new();
        h.insert(headers::TRACEPARENT, traceparent);
        h.insert(headers::SCHEMA, SCHEMA_VERSION.to_string().as_str());
        let msg = PublishMessage::build()
            .payload(payload.clone())
            .headers(h)
            .message_id(format!("bench:{nonce:016x}:firing:{n:019}"));
        let ack = js
            .send_publish(format!("tocsin.alerts.bench.{n}"), msg)
            .await
            .map_err(|e| format!("message {n} not sent: {e}"))?;
        acks.push(ack);
    }
    let mut problems = Vec::new();
    for result in join_all(acks.into_iter().map(IntoFuture::into_future)).await {
        match result {
            Ok(ack) if ack.duplicate => problems.push("acknowledged as a duplicate".to_string()),
            Ok(_) => {}
            Err(e) => problems.push(e.to_string()),
        }
    }
    match problems.first() {
        None => Ok(()),
        Some(p) => Err(format!(
            "{} of {count} not stored, e.g. {p}",
            problems.len()
        )),
    }
}

async fn collect(started: Instant, tasks: Vec<tokio::task::JoinHandle<TaskResult>>) -> RoundResult {
    let mut r = RoundResult {
        elapsed: Duration::ZERO,
        stored: 0,
        latencies: Vec::new(),
        failures: Vec::new(),
    };
    for joined in join_all(tasks).await {
        match joined {
            Ok(t) => {
                r.stored += t.stored;
                r.latencies.extend(t.latencies);
                r.failures.extend(t.failures);
            }
            Err(e) => r.failures.push(format!("task failed: {e}")),
        }
    }
    r.elapsed = started.elapsed();
    r.latencies.sort_unstable();
    r
}

fn print_round(round: usize, side: &str, r: &RoundResult) {
    println!(
        "{:>5}  {:<14} {:>12.0} {:>8.2}s {:>9} {:>9}{}",
        round + 1,
        side,
        r.rate(),
        r.elapsed.as_secs_f64(),
        ms(percentile(&r.latencies, 0.50)),
        ms(percentile(&r.latencies, 0.99)),
        if r.failures.is_empty() {
            String::new()
        } else {
            format!("  ({} FAILED)", r.failures.len())
        },
    );
}

/// A W3C traceparent unique to this run and `n`.
fn traceparent(nonce: u64, n: u64) -> String {
    format!("00-{nonce:016x}{n:016x}-{n:016x}-01")
}

async fn stream_messages(js: &jetstream::Context) -> anyhow::Result<u64> {
    let mut stream = js
        .get_stream(STREAM_ALERTS)
        .await
        .with_context(|| format!("no {STREAM_ALERTS} stream"))?;
    Ok(stream.info().await?.state.messages)
}

/// Nearest-rank percentile of sorted `v`.
fn percentile(v: &[Duration], q: f64) -> Option<Duration> {
    if v.is_empty() {
        return None;
    }
    let rank = (q * v.len() as f64).ceil() as usize;
    Some(v[rank.clamp(1, v.len()) - 1])
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

fn ms(d: Option<Duration>) -> String {
    match d {
        Some(d) => format!("{:.1}ms", d.as_secs_f64() * 1e3),
        None => "-".into(),
    }
}
