//! The service loop: catch up, then feed alerts, commands and timers to the
//! core in order, publish what it decides, fold it into the projection,
//! save, and only then move on (ack the command / advance the cursor).

use std::{
    collections::HashSet,
    path::Path,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex, RwLock,
    },
    time::{Duration, Instant},
};

use async_nats::{
    jetstream::{
        self,
        consumer::{pull, AckPolicy},
        context::PublishError,
        AckKind,
    },
    Client,
};
use futures::{stream::BoxStream, FutureExt as _, StreamExt};
use jiff::{SignedDuration, Timestamp};
use tocsin_proto::{
    codec::{self, decode_alerts, decode_commands, decode_entries},
    command::{is_batch as is_command_batch, Command, CommandReply},
    incident::{Cause, EventKind, IncidentStatus, IncidentSummary, LogEntry},
    subjects::{
        headers, is_alert_batch, is_incidents_batch, is_tenure_marker, INCIDENTS_BATCH,
        INCIDENTS_TENURE, STREAM_ALERTS, STREAM_COMMANDS, STREAM_INCIDENTS,
    },
    Alert, Envelope, SourceKind,
};
use tocsin_runtime::{
    admin::Health,
    fence::{self, Ack, Fence, FenceError},
    progress::Watermark,
    pull::Puller,
    streams,
};
use tokio_util::sync::CancellationToken;

use crate::{
    clock::Clock,
    config::{HeartbeatConfig, IncidentsConfig},
    core::{
        heartbeat_alert, heartbeat_key, AlertPos, CoreConfig, Decider, Projection, Verdict,
        HEARTBEAT_SOURCE,
    },
    error::IncidentsError,
    events::{IncidentsEvent, IncidentsMetrics},
    limits::Limits,
    store::{Store, StoreError},
};

/// How long the INCIDENTS stream may be missing at start-up before it is
/// worth a warning: on a first start it is being created alongside.
const STREAMS_CREATED_WITHIN: Duration = Duration::from_secs(30);

/// A resolved incident stays in memory at least this long, even with a
/// shorter reopen window, so the receipts that follow a resolution do not
/// each read it back from the store.
pub(crate) const KEEP_RESOLVED_AT_LEAST: SignedDuration = SignedDuration::from_mins(10);

/// Before when an incident must have been resolved to leave memory at `now`.
pub(crate) fn keep_resolved_until(now: Timestamp, reopen_window: SignedDuration) -> Timestamp {
    now.checked_sub(reopen_window.max(KEEP_RESOLVED_AT_LEAST))
        .unwrap_or(Timestamp::MIN)
}

/// Durable consumer of COMMANDS.
pub const COMMANDS_CONSUMER: &str = "tocsin-incidents";
/// Commands pulled at a time (async-nats's default for a pull stream).
const COMMANDS_PULL: usize = 200;

pub(crate) type Shared = Arc<RwLock<Projection>>;

/// Held (written) while the projection holds entries JetStream has not
/// acknowledged yet; queries take it (read) to answer from stored state
/// only.
pub(crate) type Durable = Arc<tokio::sync::RwLock<()>>;

pub(crate) struct Service {
    core: CoreConfig,
    heartbeats: Vec<HeartbeatConfig>,
    pub(crate) proj: Shared,
    pub(crate) durable: Durable,
    pub(crate) store: Store,
    js: jetstream::Context,
    client: Client,
    metrics: IncidentsMetrics,
    clock: Arc<dyn Clock>,
    started_at: Timestamp,
    ack_wait: Duration,
    health: Health,
    limits: Limits,
    max_attempts: u32,
    /// Incidents held in memory at most ([`Projection::evict_over`]).
    max_in_memory: usize,
    stalled_after: Duration,
    /// Marks each read and write of the local store (see `Watchdog`).
    watchdog: tocsin_runtime::admin::Watchdog,
    /// Timers given up on (their entries could not be written): skipped,
    /// so a timer that cannot fire does not fire again and again.
    abandoned: Mutex<HashSet<Cause>>,
    /// Alerts up to this ALERTS sequence go one at a time, each entry
    /// awaited ([`Service::on_alert`]): set when a batch failed, so what
    /// made it fail is met by the path that retries, reports and
    /// dead-letters.
    careful_until: AtomicU64,
    /// The same for commands, by COMMANDS sequence.
    careful_commands: AtomicU64,
    /// Microseconds spent finishing batches (their entries stored, the
    /// projection saved, commands answered), so the rest of a batch's
    /// time counts as deciding (`tocsin_incidents_busy_seconds`).
    finishing: AtomicU64,
    /// Commands of a failed batch not answered yet.
    give_back: Mutex<Vec<jetstream::Message>>,
    /// The answering of the last finished batch's commands, on a task of
    /// its own ([`Service::answered`] waits for it).
    answering: Mutex<Option<Answering>>,
    /// This tenure's marker, which every entry names (see
    /// `tocsin_runtime::fence`); None outside a lease.
    fence: Mutex<Option<Fence>>,
    /// A save was handed to the store's writer and what it holds may leave
    /// memory once it is applied ([`Service::evict_saved`]).
    evict_due: AtomicBool,
}

/// A batch's commands being answered and acknowledged, awaitable from
/// anywhere (cloned).
type Answering = futures::future::Shared<futures::future::BoxFuture<'static, ()>>;

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// JetStream stores a message only if the stream's last sequence is this
/// (the incidents service is the stream's only writer).
const EXPECTED_LAST_SEQUENCE: &str = "Nats-Expected-Last-Sequence";

/// While both wait, this many ALERTS messages are read for each command.
const ALERTS_PER_COMMAND: u64 = 3;
/// At most this many ALERTS messages are owed to the commands read before
/// (a message of 64 receipts owes 192).
const MAX_ALERTS_OWED: u64 = ALERTS_PER_COMMAND * BATCH as u64;

/// Whose turn it is, ALERTS or COMMANDS, while both have messages waiting:
/// `ALERTS_PER_COMMAND` ALERTS messages for each *command*, so a COMMANDS
/// message holding several (the notifier's receipts, escalation's `paged`
/// records, whose senders put their number in `Tocsin-Items`) takes the
/// turns of that many and does not make receipts outrun a storm's alerts.
/// What alerts are owed is forgotten when ALERTS has nothing waiting: only
/// a backlog is shared out, and a command never waits behind credit that
/// built up while alerts were quiet.
#[derive(Debug)]
struct Turns {
    /// ALERTS messages still owed before the next command.
    owed: u64,
    /// ALERTS messages taken so far (counted as they are taken).
    alerts_taken: Arc<AtomicU64>,
    /// Commands taken beyond one a message, not yet counted here.
    extra_commands: Arc<AtomicU64>,
    /// `alerts_taken` when ALERTS was last given the turn, if it was.
    alerts_turn: Option<u64>,
}

impl Turns {
    fn new() -> Turns {
        Turns {
            owed: 0,
            alerts_taken: Arc::new(AtomicU64::new(0)),
            extra_commands: Arc::new(AtomicU64::new(0)),
            alerts_turn: None,
        }
    }

    /// How many commands a COMMANDS message holds, by its `Tocsin-Items`
    /// header (1 without one; at most `BATCH`).
    fn commands_in(msg: &async_nats::Message) -> u64 {
        tocsin_runtime::pull::items_in(msg).min(BATCH as u64)
    }

    fn next(&mut self) -> futures::stream::PollNext {
        use futures::stream::PollNext;
        let taken = self.alerts_taken.load(Ordering::Relaxed);
        if self.alerts_turn == Some(taken) {
            // ALERTS had its turn and gave nothing: no backlog to share.
            self.owed = 0;
        }
        let extra = self.extra_commands.swap(0, Ordering::Relaxed);
        self.owed = (self.owed + extra * ALERTS_PER_COMMAND).min(MAX_ALERTS_OWED);
        if self.owed > 0 {
            self.owed -= 1;
            self.alerts_turn = Some(taken);
            PollNext::Left
        } else {
            self.owed = ALERTS_PER_COMMAND;
            self.alerts_turn = None;
            PollNext::Right
        }
    }
}

/// At most this many inputs are decided and sent before JetStream's
/// acknowledgements of their entries are awaited.
const BATCH: usize = 64;

/// While a batch's entries are being stored, inputs that come join it
/// (decided and sent at once, so JetStream always has the next entry to
/// store), up to this many more inputs...
const MORE_INPUTS: usize = 4 * BATCH;

/// ...and until this long after the batch began: then it is finished
/// (everything stored, saved, answered) before anything else is taken, a
/// timer due say.
const MORE_FOR: Duration = Duration::from_millis(100);

/// At most this many entries are sent before their acknowledgements are
/// awaited (mid-batch if need be: an ALERTS message can hold a request's
/// hundreds of alerts). async-nats holds a permit for each acknowledgement
/// not yet awaited, 5,000 per context, and waits for one when none is left.
const MAX_SENT: usize = 2048;

/// A message sent to JetStream, with the entry or entries it holds.
type Sent = (Ack, Stored);

/// What one INCIDENTS message holds.
enum Stored {
    /// An entry on its own subject.
    One(Box<LogEntry>),
    /// Several, on [`INCIDENTS_BATCH`]: receipts and alert changes of a
    /// batch of inputs ([`LogEntry::is_packed`]).
    Batch(Vec<LogEntry>),
}

/// Receipts and alert changes decided and folded in, to be sent as one
/// message ([`Service::send_batch`]): those of one batch of inputs up to
/// the next entry of another kind (so the stream keeps the order they
/// were decided in); the bytes they take as single
/// entries (a bound on the message's size: the message has one envelope,
/// not one per entry); the trace context of the first.
#[derive(Default)]
struct Batch {
    entries: Vec<LogEntry>,
    bytes: usize,
    traceparent: Option<String>,
}

/// An input of a batch whose entries are sent: what is left to do once
/// they are stored.
enum Handled {
    /// Where it is on ALERTS, when ingest received it, and how many
    /// entries it wrote.
    Alert(AlertPos, Timestamp, usize),
    /// Answer and acknowledge it: each command it holds (one, or a batch's
    /// several) with its verdict; the reply to a message of one command
    /// carries `incident`, taken before the batch's save (which may send
    /// it out of memory).
    Command {
        msg: Box<jetstream::Message>,
        decided: Vec<(Command, Verdict)>,
        incident: Option<Box<IncidentSummary>>,
    },
}

/// How [`Service::send_alert`] and [`Service::send_command`] dealt with
/// one input of a batch.
enum Fast {
    /// Its entries are sent and folded in.
    Sent(Handled),
    /// Nothing left to do: its alerts are sent (and in `handled`), or
    /// were decided before (below the resume point).
    Done,
    /// It needs the one-at-a-time path: a heartbeat, an undecodable or
    /// oversized input or entry, an incident out of memory that the local
    /// store does not have, or an alert after a failed batch.
    Careful,
    /// A send failed.
    Failed(String),
}

/// Where inputs that come while a batch is being stored are taken from
/// ([`Service::more_input`]), and how many it took.
struct More<'a, S> {
    inputs: &'a mut S,
    /// Until when the batch takes more.
    until: tokio::time::Instant,
    taken: usize,
    /// Either stream ended: the consumers are made anew after this batch.
    ended: bool,
}

impl<'a, S> More<'a, S> {
    fn new(inputs: &'a mut S) -> Self {
        More {
            inputs,
            until: tokio::time::Instant::now() + MORE_FOR,
            taken: 0,
            ended: false,
        }
    }
}

/// An input read with others.
enum Ready {
    Alert(jetstream::Message),
    Command(jetstream::Message),
}

impl Ready {
    /// A command of a failed batch, to give back.
    fn command(self) -> Option<jetstream::Message> {
        match self {
            Ready::Command(m) => Some(m),
            Ready::Alert(_) => None,
        }
    }
}

impl Handled {
    /// A command not answered yet, to give back.
    fn command(self) -> Option<jetstream::Message> {
        match self {
            Handled::Command { msg, .. } => Some(*msg),
            Handled::Alert(..) => None,
        }
    }
}

fn read(p: &Shared) -> std::sync::RwLockReadGuard<'_, Projection> {
    p.read().unwrap_or_else(|e| e.into_inner())
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn write(p: &Shared) -> std::sync::RwLockWriteGuard<'_, Projection> {
    p.write().unwrap_or_else(|e| e.into_inner())
}

/// Why an input could not be finished.
enum Failure {
    /// May pass (NATS down, a timeout, a full stream): retried without limit.
    Transient(String),
    /// Retrying cannot help (JetStream refuses the entry, it is too large):
    /// retried `max_attempts` times, then dead-lettered.
    Permanent {
        /// Low-cardinality metric label: `refused`, `too_large`.
        reason: &'static str,
        detail: String,
        /// Cause of the entry that failed.
        cause: Cause,
    },
}

/// Why [`Service::settle`] stopped without finishing an input.
enum Stop {
    Shutdown,
    GaveUp {
        reason: &'static str,
        /// Why, for the dead-letter header and the command's answer.
        detail: String,
        cause: Cause,
    },
}

/// Sorts a publish failure: only a refusal the same message would get
/// again is permanent.
fn classify(e: &PublishError, cause: &Cause) -> Failure {
    if tocsin_runtime::bus::too_large(e) {
        Failure::Permanent {
            reason: "refused",
            detail: e.to_string(),
            cause: cause.clone(),
        }
    } else {
        Failure::Transient(e.to_string())
    }
}

/// Reports on `/readyz` an input that keeps failing past `stalled_after`,
/// and clears the report once it moves.
struct Stall<'a> {
    health: &'a Health,
    since: Instant,
    after: Duration,
    reported: bool,
}

impl<'a> Stall<'a> {
    fn new(health: &'a Health, after: Duration) -> Self {
        Stall {
            health,
            since: Instant::now(),
            after,
            reported: false,
        }
    }

    fn failing(&mut self, reason: &str) {
        if self.since.elapsed() >= self.after {
            self.health
                .set_failing("incidents", format!("cannot make progress: {reason}"));
            self.reported = true;
        }
    }

    fn moving(&mut self) {
        if self.reported {
            self.health.set_ok("incidents");
            self.reported = false;
        }
    }
}

impl Service {
    pub(crate) fn new(
        config: &IncidentsConfig,
        core: CoreConfig,
        client: Client,
        js: jetstream::Context,
        metrics: IncidentsMetrics,
        health: Health,
        clock: Arc<dyn Clock>,
    ) -> Result<Self, IncidentsError> {
        let dir = config.data_dir();
        let started_at = clock.now();
        let (store, mut proj) = open_store(
            &dir,
            keep_resolved_until(started_at, core.reopen_window),
            config.max_in_memory,
            rules(&core),
        )?;
        proj.set_severity(core.severity.clone());
        Ok(Service {
            core,
            heartbeats: config.heartbeats.clone(),
            proj: Arc::new(RwLock::new(proj)),
            durable: Arc::new(tokio::sync::RwLock::new(())),
            store,
            js,
            client,
            metrics,
            clock,
            started_at,
            ack_wait: config.command_ack_wait.get(),
            health: health.clone(),
            limits: Limits {
                max_entry_bytes: config.max_entry_bytes,
                max_annotations: config.max_annotations,
            },
            max_attempts: config.max_attempts,
            max_in_memory: config.max_in_memory,
            stalled_after: config.stalled_after.get(),
            watchdog: health.watchdog("incidents", tocsin_runtime::admin::STUCK_AFTER),
            abandoned: Mutex::new(HashSet::new()),
            careful_until: AtomicU64::new(0),
            careful_commands: AtomicU64::new(0),
            evict_due: AtomicBool::new(false),
            finishing: AtomicU64::new(0),
            give_back: Mutex::new(Vec::new()),
            answering: Mutex::new(None),
            fence: Mutex::new(None),
        })
    }

    /// A service built while standing by starts its tenure now: a
    /// heartbeat never pinged is given its grace from now, as after a
    /// start.
    pub(crate) fn starting_now(&mut self) {
        self.started_at = self.clock.now();
    }

    fn is_abandoned(&self, cause: &Cause) -> bool {
        self.abandoned
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(cause)
    }

    /// Replays INCIDENTS entries the projection lacks. Retries until NATS
    /// answers; returns false if shut down first.
    pub(crate) async fn catch_up(&self, shutdown: &CancellationToken) -> bool {
        let mut backoff = tocsin_runtime::retry::Backoff::standard();
        let started = std::time::Instant::now();
        loop {
            match self.try_catch_up().await {
                Ok(()) => return true,
                // On a first start the streams are being created alongside
                // (app start-up): not worth a warning unless it lasts.
                Err(e)
                    if e.contains("stream not found")
                        && started.elapsed() < STREAMS_CREATED_WITHIN =>
                {
                    tracing::debug!(error = %e, "waiting for the INCIDENTS stream to be created")
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot catch up with the INCIDENTS stream yet; retrying")
                }
            }
            if !backoff.wait(shutdown).await {
                return false;
            }
        }
    }

    /// One round of a standby's following (see `crate::follow`): applies
    /// what INCIDENTS holds beyond the projection and saves it, without
    /// reporting sizes or a catch-up (the active instance does). Returns
    /// the sequence applied up to.
    pub(crate) async fn follow(&self) -> Result<u64, String> {
        self.fold_stream(false).await?;
        Ok(read(&self.proj).incidents_seq)
    }

    async fn try_catch_up(&self) -> Result<(), String> {
        self.fold_stream(true).await
    }

    /// This tenure's fence, if taken.
    fn fence(&self) -> Option<Fence> {
        self.fence.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Takes this tenure's fence on INCIDENTS (its marker: found, or
    /// written after the last one), so that nothing an earlier tenure
    /// still has on its way is stored from now on. Called as the tenure
    /// starts, before the catch-up (which then folds in whatever an earlier
    /// tenure got stored before the marker), and again after a refused
    /// publish (the marker may be gone with the stream's age limit).
    /// Retries until it has one; false if shut down first.
    pub(crate) async fn take_fence(&self, shutdown: &CancellationToken) -> bool {
        let mut backoff = tocsin_runtime::retry::Backoff::standard();
        loop {
            match self.try_take_fence().await {
                Ok(()) => return true,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot take this tenure's fence on INCIDENTS yet; retrying")
                }
            }
            if !backoff.wait(shutdown).await {
                return false;
            }
        }
    }

    async fn try_take_fence(&self) -> Result<(), FenceError> {
        let taken = fence::take(&self.js, STREAM_INCIDENTS, INCIDENTS_TENURE).await?;
        let mut held = self.fence.lock().unwrap_or_else(|e| e.into_inner());
        if *held != taken {
            if let Some(f) = &taken {
                tracing::info!(
                    term = f.term,
                    marker = f.seq,
                    "took this tenure's fence on INCIDENTS"
                );
            }
            *held = taken;
        }
        Ok(())
    }

    /// Applies what INCIDENTS holds beyond the projection, saving as it
    /// goes; `report`: with the sizes and a `CaughtUp` event.
    async fn fold_stream(&self, report: bool) -> Result<(), String> {
        let last = streams::last_sequence(&self.js, STREAM_INCIDENTS).await?;
        let from = {
            let mut p = write(&self.proj);
            if p.incidents_seq > last {
                // The stream is behind the projection: a new or reset NATS.
                // The stream is the truth; start over from it, and from an
                // empty store (what is saved from now on is the stream's:
                // no incident or silence it lacks comes back at a restart).
                tracing::warn!(
                    stored = p.incidents_seq,
                    stream = last,
                    "projection is ahead of the INCIDENTS stream; rebuilding from the stream"
                );
                self.watchdog
                    .during("clearing the local store", || self.store.clear())
                    .map_err(|e| format!("cannot clear the projection store: {e}"))?;
                let heartbeats = std::mem::take(&mut p.heartbeats);
                *p = Projection::new();
                p.heartbeats = heartbeats;
                if let Some(r) = rules(&self.core) {
                    p.set_inhibitor(r);
                }
                p.set_severity(self.core.severity.clone());
            }
            p.incidents_seq + 1
        };
        if from > last {
            // Nothing to replay: the saved projection is current. Its open
            // count is what /metrics shows from now on.
            if report {
                let p = read(&self.proj);
                self.metrics.sizes(p.open_count, p.incidents.len());
            }
            return Ok(());
        }
        let mut msgs = streams::read_from(&self.js, STREAM_INCIDENTS, from).await?;
        let mut n = 0u64;
        // Entries applied since the last save: a message of receipts holds
        // many, each may bring an incident back into memory, and only a
        // save lets them leave again.
        let mut unsaved = 0u64;
        loop {
            if read(&self.proj).incidents_seq >= last {
                break;
            }
            let msg = match tokio::time::timeout(Duration::from_secs(10), msgs.next()).await {
                Ok(Some(Ok(m))) => m,
                Ok(Some(Err(e))) => return Err(e.to_string()),
                Ok(None) => return Err("INCIDENTS consumer ended".into()),
                Err(_) => return Err("INCIDENTS catch-up stalled".into()),
            };
            let seq = msg.info().map_err(|e| e.to_string())?.stream_sequence;
            if is_tenure_marker(&msg.subject) {
                write(&self.proj).incidents_seq = seq;
                continue;
            }
            let decoded = decode_entries(&msg.subject, &msg.payload);
            let entries = decoded.as_ref().map_or(1, |env| env.body.len() as u64);
            if let Ok(env) = &decoded {
                for entry in &env.body {
                    let cold = read(&self.proj).cold_target(entry);
                    if let Some(id) = cold {
                        // Its state as it was before this message.
                        self.restore(id, Some(seq - 1)).await?;
                    }
                }
            }
            {
                let mut p = write(&self.proj);
                match decoded {
                    Ok(env) if is_incidents_batch(&msg.subject) => p.apply_batch(&env.body, seq),
                    Ok(env) => {
                        for entry in &env.body {
                            p.apply(entry, seq);
                        }
                    }
                    Err(e) => {
                        tracing::error!(seq, error = %e, "undecodable INCIDENTS entry skipped");
                        p.incidents_seq = seq;
                    }
                }
            }
            n += entries;
            unsaved += entries;
            if unsaved >= 1000 {
                self.save().await;
                unsaved = 0;
            }
        }
        self.save().await;
        if report {
            let p = read(&self.proj);
            IncidentsEvent::CaughtUp {
                entries: n,
                incidents: p.incidents.len(),
            }
            .emit(&self.metrics);
            self.metrics.sizes(p.open_count, p.incidents.len());
        }
        Ok(())
    }

    /// Saves what changed to the local store. First the saves before it
    /// are waited for, as a task (neither the projection's lock nor the
    /// runtime's thread is held meanwhile: blocked inside the lock, a
    /// storm stopped one of the service's two threads for 84 s in all);
    /// what they hold may then leave memory ([`Service::evict_saved`]).
    /// This one's changes go to the store's writer thread, and deciding
    /// goes on while it applies them.
    async fn save(&self) {
        {
            // A store that never finishes is reported.
            let _busy = self
                .watchdog
                .busy("saving the projection to the local store");
            self.store.settled().await;
        }
        let mut p = write(&self.proj);
        self.evict_saved(&mut p);
        // A failed save only costs a longer catch-up after a restart: the
        // stream has everything. Operators should still hear about it.
        match self.store.save(&mut p) {
            Ok(()) => self.evict_due.store(true, Ordering::Relaxed),
            Err(e) => self.store_out_of_step(&e),
        }
    }

    /// Reports that the local store takes no more saves (once: later
    /// calls find it `OutOfStep`): on /metrics, and in /readyz beside the
    /// checks (it does not fail readiness: deciding goes on, memory is
    /// what grows).
    fn store_out_of_step(&self, e: &StoreError) {
        IncidentsEvent::StoreOutOfStep {
            error: &e.to_string(),
        }
        .emit(&self.metrics);
        self.health.set_passing(
            "incidents_store",
            format!("out of step since a failed save ({e}); restart the service"),
        );
    }

    /// Once every save is applied (its callers wait for that first,
    /// [`Store::settled`]; `applied` here only takes a failure), resolved
    /// incidents past the reopen window and those beyond `max_in_memory`
    /// leave memory: they are read back when an input touches them. Those
    /// changed since the last save are in `dirty` and stay until saved.
    fn evict_saved(&self, p: &mut Projection) {
        self.evict_due.store(false, Ordering::Relaxed);
        match self.store.applied() {
            Ok(()) => {}
            // Reported when it failed: nothing leaves memory from then on.
            Err(StoreError::OutOfStep) => return,
            Err(e) => {
                self.store_out_of_step(&e);
                return;
            }
        }
        let evicted = p.evict(keep_resolved_until(
            self.clock.now().min(p.inputs_at),
            self.core.reopen_window,
        )) + p.evict_over(self.max_in_memory);
        if evicted > 0 {
            IncidentsEvent::Evicted {
                incidents: evicted,
                in_memory: p.incidents.len(),
            }
            .emit(&self.metrics);
        }
    }

    /// Loads incident `id`, which left memory, back into the projection:
    /// from the store, or (if the store lacks it) from its entries on the
    /// INCIDENTS stream up to sequence `upto` (default: what the
    /// projection has applied).
    async fn restore(&self, id: uuid::Uuid, upto: Option<u64>) -> Result<(), String> {
        let upto = upto.unwrap_or_else(|| read(&self.proj).incidents_seq);
        let st = crate::query::cold(&self.js, &self.store, id, upto).await?;
        self.put_back(st);
        Ok(())
    }

    /// Puts an incident read back from the store (or the stream) into the
    /// projection.
    fn put_back(&self, st: crate::core::IncidentState) {
        write(&self.proj).restore(st);
        IncidentsEvent::Restored.emit(&self.metrics);
    }

    pub(crate) async fn run(
        self,
        shutdown: CancellationToken,
        watermark: Watermark,
    ) -> Result<(), IncidentsError> {
        let mut reconnect = tocsin_runtime::retry::Backoff::standard();
        // The COMMANDS consumer's messages, opened once: after a failed
        // batch only ALERTS is read again from the resume point. Commands
        // it has pulled but not yet handed over stay in it (a new pull
        // stream would leave them with the old one's subscription, to come
        // again only after `command_ack_wait`), and the commands given
        // back come to it again at once.
        let mut commands: Option<BoxStream<'static, jetstream::Message>> = None;
        // How far COMMANDS is handled: up to the consumer's ack floor.
        let mut commands_seq = 0;
        // COMMANDS handled up to here, their answers still on their way.
        let mut unanswered: Option<u64> = None;
        'outer: while !shutdown.is_cancelled() {
            if commands.is_none() {
                let Some((c, floor)) = self.commands(&shutdown).await else {
                    break;
                };
                commands = Some(c);
                commands_seq = commands_seq.max(floor);
            }
            // Commands of a failed batch, given back to come again at once.
            let given_back = std::mem::take(&mut *lock(&self.give_back));
            for msg in given_back {
                if let Err(e) = msg.ack_with(AckKind::Nak(None)).await {
                    tracing::debug!(error = %e, "cannot give a command back; it comes again after ack_wait");
                }
            }
            let resume = read(&self.proj).alerts_resume_from().seq.max(1);
            let alerts = match streams::read_from(&self.js, STREAM_ALERTS, resume).await {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot subscribe to ALERTS yet; retrying");
                    if !reconnect.wait(&shutdown).await {
                        break;
                    }
                    continue;
                }
            };
            let commands = commands.as_mut().expect("opened above");
            reconnect.reset();
            tracing::info!(alerts_from = resume, "incidents service consuming");
            // Alerts and commands in turn, ALERTS_PER_COMMAND alerts to a
            // command while both wait (`Turns`): an operator's
            // acknowledgement never waits behind an alert storm, and the
            // receipts of the pages a storm sends (two commands a page) do
            // not halve how fast it opens incidents. Either stream ending
            // makes both anew.
            let ended = || futures::stream::once(futures::future::ready(Input::Ended));
            let mut turns = Turns::new();
            let (alerts_taken, extra_commands) =
                (turns.alerts_taken.clone(), turns.extra_commands.clone());
            let mut inputs = futures::stream::select_with_strategy(
                alerts
                    .map(move |m| {
                        alerts_taken.fetch_add(1, Ordering::Relaxed);
                        Input::Alert(m.map_err(|e| e.to_string()))
                    })
                    .chain(ended()),
                commands
                    .map(move |m| {
                        extra_commands.fetch_add(Turns::commands_in(&m) - 1, Ordering::Relaxed);
                        Input::Command(Ok(m))
                    })
                    .chain(ended()),
                move |_: &mut ()| turns.next(),
            );
            // How far ALERTS is handled: up to the cursor.
            let mut alerts_seq = resume.saturating_sub(1);
            // What is reported as handled: up to the batch whose save is
            // applied and whose incidents may have left memory (one batch
            // behind while a save is on its way to the store), so a reader
            // that waits for the service to settle sees it whole.
            let mut shown = (alerts_seq, commands_seq);
            loop {
                if !self.evict_due.load(Ordering::Relaxed) {
                    shown = (alerts_seq, commands_seq);
                }
                // Every input read is handled and every timer due before
                // `deadline` has fired, its entries written.
                let deadline = self.next_deadline();
                watermark.report(
                    &[(STREAM_ALERTS, shown.0), (STREAM_COMMANDS, shown.1)],
                    deadline,
                );
                tokio::select! {
                    biased;
                    _ = shutdown.cancelled() => break 'outer,
                    _ = self.answered(), if unanswered.is_some() => {
                        commands_seq = commands_seq.max(unanswered.take().unwrap_or(0));
                    }
                    // What the last save held leaves memory once the store
                    // has it, also while no input comes to save again.
                    _ = self.store.settled(), if self.evict_due.load(Ordering::Relaxed) => {
                        self.evict_saved(&mut write(&self.proj));
                    }
                    // Timers before inputs: under a steady stream of alerts
                    // a snooze end or a missed heartbeat must still fire on
                    // time, not when the stream goes quiet.
                    _ = self.clock.wait(deadline) => self.on_timers(&shutdown).await,
                    m = inputs.next() => {
                        let Some(first) = m else { continue 'outer };
                        // Inputs already waiting join it, up to a batch.
                        let mut ready = vec![first];
                        while ready.len() < BATCH && ready.last().is_some_and(Input::is_ok) {
                            match inputs.next().now_or_never() {
                                Some(Some(i)) => ready.push(i),
                                _ => break,
                            }
                        }
                        let mut batch = Vec::new();
                        for input in ready {
                            match input.taken() {
                                Taken::Ready(r) => batch.push(r),
                                Taken::Passed => {}
                                Taken::Ended => {
                                    // Commands gathered before it come
                                    // again at once, not after ack_wait
                                    // (alerts are read again anyway).
                                    lock(&self.give_back)
                                        .extend(batch.into_iter().filter_map(Ready::command));
                                    continue 'outer;
                                }
                            }
                        }
                        // This batch's save let what the one before it
                        // held leave memory.
                        let before = (alerts_seq, commands_seq);
                        let mut more = More::new(&mut inputs);
                        let handled = self.on_inputs(batch, &mut more, &shutdown).await;
                        let ended = more.ended;
                        match handled {
                            Some((a, c)) => {
                                shown = before;
                                alerts_seq = alerts_seq.max(a);
                                unanswered = Some(unanswered.unwrap_or(0).max(c));
                            }
                            None => continue 'outer,
                        }
                        if ended {
                            continue 'outer;
                        }
                    }
                }
            }
        }
        self.answered().await;
        self.save().await;
        self.store.flush().await;
        tracing::info!("incidents service stopped");
        Ok(())
    }

    /// The COMMANDS consumer's messages (a stream that ends only once
    /// `shutdown` is cancelled), and the COMMANDS sequence up to which
    /// every command was already handled (acknowledged) before; None once
    /// `shutdown` is cancelled.
    async fn commands(
        &self,
        shutdown: &CancellationToken,
    ) -> Option<(BoxStream<'static, jetstream::Message>, u64)> {
        let mut commands = Puller::new(
            &self.js,
            STREAM_COMMANDS,
            pull::Config {
                durable_name: Some(COMMANDS_CONSUMER.into()),
                ack_policy: AckPolicy::Explicit,
                ack_wait: self.ack_wait,
                ..Default::default()
            },
            COMMANDS_PULL,
        );
        let info = commands.open(shutdown).await?;
        let floor = info.ack_floor.stream_sequence;
        Some((commands.into_stream(shutdown.clone()).boxed(), floor))
    }

    fn next_deadline(&self) -> Option<Timestamp> {
        let p = read(&self.proj);
        let snooze = Decider::new(&self.core, &p).next_timer(|c| self.is_abandoned(c));
        let hb = self
            .heartbeats
            .iter()
            .filter(|h| !heartbeat_open(&p, &h.name))
            .map(|h| (h, heartbeat_deadline(&p, h, self.started_at)))
            .filter(|(h, d)| !self.is_abandoned(&heartbeat_cause(&h.name, *d)))
            .map(|(_, d)| d)
            .min();
        match (snooze, hb) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Publishes entries in order, folding each into the projection once
    /// JetStream acknowledged it. An entry over the size budget is cut
    /// first (deterministically), and the cut entry is what is published
    /// and folded in, so a rebuild from the stream gives the same state.
    async fn publish_and_apply(
        &self,
        entries: Vec<LogEntry>,
        traceparent: Option<&str>,
    ) -> Result<usize, Failure> {
        let n = entries.len();
        let mut stored = Vec::with_capacity(n);
        let mut failure = None;
        // Each entry names the stream sequence it must follow, as in a
        // batch: a publish of an instance whose tenure ended (held in its
        // client while NATS was away, say) is refused once another wrote.
        let mut last = read(&self.proj).incidents_seq;
        for mut entry in entries {
            match self.publish_entry(&mut entry, traceparent, last).await {
                Ok(seq) => {
                    last = last.max(seq);
                    stored.push((entry, seq))
                }
                Err(e) => {
                    failure = Some(e);
                    break;
                }
            }
        }
        // Folded in together, so queries never see half an input. What was
        // stored before a failure is folded in too: deciding again then
        // yields only the rest.
        {
            let mut p = write(&self.proj);
            for (entry, seq) in &stored {
                p.apply(entry, *seq);
            }
            self.metrics.sizes(p.open_count, p.incidents.len());
        }
        // Saved by the caller, once per input, together with the cursor.
        match failure {
            Some(e) => Err(e),
            None => Ok(n),
        }
    }

    /// Publishes one entry and waits for JetStream; returns its sequence.
    /// An entry over `max_entry_bytes` is cut first (in place: the cut
    /// entry is what the caller folds in).
    async fn publish_entry(
        &self,
        entry: &mut LogEntry,
        traceparent: Option<&str>,
        last_seq: u64,
    ) -> Result<u64, Failure> {
        let mut payload = encode_entry(entry, traceparent)?;
        if payload.len() > self.limits.max_entry_bytes {
            match self.limits.fit_entry(entry) {
                Ok(_) => tracing::warn!(
                    subject = %entry.subject(),
                    bytes = payload.len(),
                    max_entry_bytes = self.limits.max_entry_bytes,
                    "entry over incidents.max_entry_bytes: its longest texts were cut"
                ),
                Err(e) => {
                    return Err(Failure::Permanent {
                        reason: "too_large",
                        detail: e.0,
                        cause: entry.cause().clone(),
                    })
                }
            }
            payload = encode_entry(entry, traceparent)?;
        }
        let entry = &*entry;
        let fence = self.fence();
        let publish = entry_message(entry.msg_id(), payload, traceparent, last_seq, &fence, None);
        let ack = fence::send(&self.js, entry.subject(), publish, fence.as_ref())
            .await
            .map_err(|e| classify(&e, entry.cause()))?
            .get()
            .await
            .map_err(|e| classify(&e, entry.cause()))?;
        if !ack.duplicate {
            self.written(entry);
        }
        Ok(ack.sequence)
    }

    /// Counts an entry JetStream stored for the first time.
    fn written(&self, entry: &LogEntry) {
        let kind = match entry {
            LogEntry::Incident(e) => e.kind.name(),
            LogEntry::Silence { .. } => "silence",
        };
        IncidentsEvent::Written { kind }.emit(&self.metrics);
        // MTTA/MTTR: observed once, when the entry is first stored.
        if let Some(t) = match entry {
            LogEntry::Incident(e) => crate::events::response_time(e),
            LogEntry::Silence { .. } => None,
        } {
            t.emit(&self.metrics);
        }
    }

    /// Counts a handled alert, and how long it took from ingest when it
    /// changed something.
    fn alert_done(&self, written: usize, received_at: Timestamp, now: Timestamp) {
        let outcome = if written > 0 { "changed" } else { "unchanged" };
        IncidentsEvent::Input {
            input: "alert",
            outcome,
        }
        .emit(&self.metrics);
        if written > 0 {
            let lag = now.duration_since(received_at).as_secs_f64();
            IncidentsEvent::AlertLatency {
                seconds: lag.max(0.0),
            }
            .emit(&self.metrics);
        }
    }

    /// Decides with `decide` and publishes until it works, the service
    /// stops, or a failure retrying cannot fix has happened `max_attempts`
    /// times. Deciding afresh each time is safe: decisions are convergent,
    /// so a half-published input only gets its missing part. An input that
    /// keeps failing past `stalled_after` is reported on `/readyz`.
    async fn settle<F>(
        &self,
        shutdown: &CancellationToken,
        traceparent: Option<&str>,
        decide: F,
    ) -> Result<usize, Stop>
    where
        F: Fn(&Decider<'_>) -> Vec<LogEntry>,
    {
        let mut backoff = tocsin_runtime::retry::Backoff::standard();
        let mut attempts = 0u32;
        let mut stall = Stall::new(&self.health, self.stalled_after);
        let mut restored = 0;
        loop {
            let (entries, missed) = {
                let p = read(&self.proj);
                let d = Decider::new(&self.core, &p);
                let entries = decide(&d);
                (entries, d.missed.get())
            };
            if let Some(id) = missed {
                // The input touches an incident no longer in memory:
                // load it and decide again. One input touches one
                // incident, so this ends; the bound is a guard.
                restored += 1;
                let loaded: Result<(), String> = match self.restore(id, None).await {
                    Ok(()) if restored <= 4 => continue,
                    Ok(()) => Err(format!(
                        "incident {id} left memory again as soon as it was loaded"
                    )),
                    Err(e) => Err(e),
                };
                if let Err(e) = loaded {
                    IncidentsEvent::PublishFailed { error: &e }.emit(&self.metrics);
                    stall.failing(&e);
                    if !backoff.wait(shutdown).await {
                        return Err(Stop::Shutdown);
                    }
                    continue;
                }
            }
            match self.publish_and_apply(entries, traceparent).await {
                Ok(n) => {
                    stall.moving();
                    return Ok(n);
                }
                Err(Failure::Transient(e)) => {
                    IncidentsEvent::PublishFailed { error: &e }.emit(&self.metrics);
                    stall.failing(&e);
                    // The fence is checked (its marker may have aged out
                    // of the stream, or a newer tenure wrote one: then
                    // this one ends when its lease renewal fails), and
                    // what the stream holds beyond the projection (an
                    // entry stored whose acknowledgement was lost; refused
                    // as not following the stream's last) is folded in
                    // before deciding again.
                    if let Err(e) = self.try_take_fence().await {
                        tracing::warn!(error = %e, "cannot check this tenure's fence on INCIDENTS");
                    }
                    if let Err(e) = self.try_catch_up().await {
                        tracing::debug!(error = %e, "cannot catch up before trying an input again");
                    }
                }
                Err(Failure::Permanent {
                    reason,
                    detail,
                    cause,
                }) => {
                    attempts += 1;
                    if attempts >= self.max_attempts {
                        stall.moving();
                        return Err(Stop::GaveUp {
                            reason,
                            detail: format!("after {attempts} attempts: {detail}"),
                            cause,
                        });
                    }
                    IncidentsEvent::InputFailed {
                        attempt: attempts,
                        of: self.max_attempts,
                        error: &detail,
                    }
                    .emit(&self.metrics);
                    stall.failing(&detail);
                }
            }
            if !backoff.wait(shutdown).await {
                return Err(Stop::Shutdown);
            }
        }
    }

    /// Inputs read together. Each is decided on the projection with the
    /// entries of the ones before it folded in, and its entries are sent
    /// without waiting; the acknowledgements are awaited together, the
    /// projection saved once, then commands are answered and acknowledged.
    /// So a storm costs one round trip to JetStream per batch, not one per
    /// entry. Inputs that come from `more` while the acknowledgements are
    /// awaited join the batch the same way ([`Service::more_input`], up to
    /// [`MORE_INPUTS`] and [`MORE_FOR`]): such an input is decided and its
    /// entries sent then, not once the batch is stored, saved and answered.
    ///
    /// Exactly once still holds: entries are stored in the order of their
    /// inputs or not at all (each names the stream sequence it must follow,
    /// so after a lost one every later one is refused), every entry's
    /// message id comes from its cause, and nothing is saved, answered or
    /// acknowledged before every entry it depends on is stored. A crash
    /// before the save is a crash mid-input: the restart folds in what was
    /// stored and decides the rest again (a command not acknowledged comes
    /// again and is recognised as applied). A failed send or
    /// acknowledgement does the same without the crash
    /// ([`Service::roll_back`]). Inputs that need more care (see [`Fast`])
    /// go one at a time after what is in flight is finished.
    ///
    /// Returns the highest ALERTS and COMMANDS sequences handled, or None
    /// when the consumers must be made again.
    async fn on_inputs<S>(
        &self,
        inputs: Vec<Ready>,
        more: &mut More<'_, S>,
        shutdown: &CancellationToken,
    ) -> Option<(u64, u64)>
    where
        S: futures::Stream<Item = Input> + Unpin,
    {
        // What is not finishing (stored, save, answer) is deciding.
        let started = Instant::now();
        let finishing = self.finishing.load(Ordering::Relaxed);
        let r = self.on_inputs_timed(inputs, more, shutdown).await;
        let finished = self.finishing.load(Ordering::Relaxed) - finishing;
        let total = micros(started.elapsed());
        self.metrics.busy(
            "decide",
            Duration::from_micros(total.saturating_sub(finished)),
        );
        r
    }

    /// [`Service::on_inputs`] itself; the caller counts its time, less
    /// what [`Service::finish`] counted, as `decide`.
    async fn on_inputs_timed<S>(
        &self,
        inputs: Vec<Ready>,
        more: &mut More<'_, S>,
        shutdown: &CancellationToken,
    ) -> Option<(u64, u64)>
    where
        S: futures::Stream<Item = Input> + Unpin,
    {
        // Taken before the first entry is folded in ahead of its
        // acknowledgement, let go before an input goes the careful way
        // (which may wait long, on a full stream say).
        let mut ahead = None;
        let mut sent: Vec<Sent> = Vec::new();
        let mut handled: Vec<Handled> = Vec::new();
        let (mut top_alert, mut top_command) = (0, 0);
        // The stream's last sequence each entry expects: if one is lost (a
        // reconnect drops what was on the wire), every later one is refused
        // instead of being stored after a gap, out of order.
        let mut last_seq = read(&self.proj).incidents_seq;
        let mut batch = Batch::default();
        let mut inputs = inputs.into_iter();
        loop {
            let input = match inputs.next() {
                Some(input) => input,
                None => match self
                    .more_input(more, &mut batch, &mut sent, &mut last_seq)
                    .await
                {
                    Ok(Some(input)) => input,
                    Ok(None) => break,
                    Err(e) => {
                        let rest = handled.into_iter().filter_map(Handled::command);
                        self.roll_back((top_alert, top_command), &e, rest, shutdown)
                            .await;
                        return None;
                    }
                },
            };
            let (msg, is_alert) = match input {
                Ready::Alert(m) => (m, true),
                Ready::Command(m) => (m, false),
            };
            let Ok(info) = msg.info() else {
                tracing::warn!("input without JetStream info; skipped");
                continue;
            };
            let seq = info.stream_sequence;
            if ahead.is_none() {
                ahead = Some(self.durable.write().await);
            }
            let fast = if is_alert {
                top_alert = top_alert.max(seq);
                // Its alert changes join the entries gathered so far;
                // anything else goes after them, in order.
                self.send_alert(
                    &msg,
                    seq,
                    &mut batch,
                    &mut sent,
                    &mut handled,
                    &mut last_seq,
                )
                .await
            } else {
                top_command = top_command.max(seq);
                if seq <= self.careful_commands.load(Ordering::Relaxed) {
                    Fast::Careful
                } else {
                    self.send_command(
                        msg.clone(),
                        &mut batch,
                        &mut sent,
                        &mut handled,
                        &mut last_seq,
                    )
                    .await
                }
            };
            // What goes the careful way is decided on what is stored.
            let fast = match fast {
                Fast::Careful => {
                    match self.send_batch(&mut batch, &mut sent, &mut last_seq).await {
                        Ok(()) => Fast::Careful,
                        Err(e) => Fast::Failed(e),
                    }
                }
                other => other,
            };
            match fast {
                Fast::Sent(h) => handled.push(h),
                Fast::Done => {}
                Fast::Careful => {
                    if let Err(e) = self.finish(&mut sent, &mut handled).await {
                        // This command too: it was not handled yet.
                        let current = (!is_alert).then_some(msg);
                        let rest = handled
                            .into_iter()
                            .filter_map(Handled::command)
                            .chain(current)
                            .chain(inputs.filter_map(Ready::command));
                        self.roll_back((top_alert, top_command), &e, rest, shutdown)
                            .await;
                        return None;
                    }
                    ahead = None;
                    if is_alert {
                        self.on_alert(msg, shutdown).await;
                    } else {
                        self.on_command(msg, shutdown).await;
                    }
                    last_seq = read(&self.proj).incidents_seq;
                }
                Fast::Failed(e) => {
                    let current = (!is_alert).then_some(msg);
                    let rest = handled
                        .into_iter()
                        .filter_map(Handled::command)
                        .chain(current)
                        .chain(inputs.filter_map(Ready::command));
                    self.roll_back((top_alert, top_command), &e, rest, shutdown)
                        .await;
                    return None;
                }
            }
        }
        let finished = match self.send_batch(&mut batch, &mut sent, &mut last_seq).await {
            Ok(()) => self.finish(&mut sent, &mut handled).await,
            Err(e) => Err(e),
        };
        if let Err(e) = finished {
            let rest = handled.into_iter().filter_map(Handled::command);
            self.roll_back((top_alert, top_command), &e, rest, shutdown)
                .await;
            return None;
        }
        Some((top_alert, top_command))
    }

    /// The next input to join a batch whose inputs so far are decided and
    /// sent: one from `more` that is there at once, or else (the entries
    /// gathered so far sent) the first to come before everything sent is
    /// stored. None once it is (or an acknowledgement failed: finishing
    /// finds out), or the batch took its share of inputs or time
    /// ([`MORE_INPUTS`], [`MORE_FOR`]), or either stream ended. The time
    /// waiting counts as `stored`.
    async fn more_input<S>(
        &self,
        more: &mut More<'_, S>,
        batch: &mut Batch,
        sent: &mut Vec<Sent>,
        last_seq: &mut u64,
    ) -> Result<Option<Ready>, String>
    where
        S: futures::Stream<Item = Input> + Unpin,
    {
        let mut waited = None;
        let next = loop {
            if more.ended || more.taken >= MORE_INPUTS || tokio::time::Instant::now() >= more.until
            {
                break None;
            }
            let input = match waited {
                None => match more.inputs.next().now_or_never() {
                    Some(input) => input,
                    None => {
                        self.send_batch(batch, sent, last_seq).await?;
                        waited = Some(Instant::now());
                        continue;
                    }
                },
                Some(_) => {
                    tokio::select! {
                        biased;
                        input = more.inputs.next() => input,
                        _ = all_came(sent) => break None,
                        _ = tokio::time::sleep_until(more.until) => break None,
                    }
                }
            };
            match input.map_or(Taken::Ended, Input::taken) {
                Taken::Ready(r) => break Some(r),
                Taken::Passed => {}
                Taken::Ended => more.ended = true,
            }
        };
        if let Some(waited) = waited {
            let waited = waited.elapsed();
            self.finishing.fetch_add(micros(waited), Ordering::Relaxed);
            self.metrics.busy("stored", waited);
        }
        more.taken += usize::from(next.is_some());
        Ok(next)
    }

    /// Decides the alerts of one ALERTS message in a batch and sends their
    /// entries, folding each into the projection as it goes (see
    /// [`Service::on_alerts`]); each decided alert joins `handled`. On
    /// `Careful` the alerts before the one that needs care are in `sent`
    /// and `handled`, and the careful way goes on from there.
    async fn send_alert(
        &self,
        msg: &jetstream::Message,
        seq: u64,
        batch: &mut Batch,
        sent: &mut Vec<Sent>,
        handled: &mut Vec<Handled>,
        last_seq: &mut u64,
    ) -> Fast {
        let resume = read(&self.proj).alerts_resume_from();
        if seq < resume.seq {
            return Fast::Done; // already decided
        }
        let several = is_alert_batch(&msg.subject);
        let budget = self.limits.max_alert_bytes();
        if seq <= self.careful_until.load(Ordering::Relaxed)
            || (!several && msg.payload.len() > budget)
        {
            return Fast::Careful;
        }
        let Ok(env) = decode_alerts(&msg.subject, &msg.payload) else {
            return Fast::Careful;
        };
        // Each alert of a small message is small; in a larger one each is
        // measured.
        let measure = several && msg.payload.len() > budget;
        // Each alert's trace context is its request's (a pack holds
        // several requests'); the message's header is the first's.
        let traceparent = header(msg, headers::TRACEPARENT);
        // Consecutive alerts of the message that join one incident are
        // written as one entry (`run`): each is decided and folded into the
        // projection as before, and the entry is sent when the run ends,
        // always before anything else is sent, awaited or handed to the
        // careful way.
        let mut run: Option<Run> = None;
        for (at, one) in each_alert(seq, env) {
            if at < resume {
                continue;
            }
            let tp_one = one.traceparent.clone().or_else(|| traceparent.clone());
            let tp = tp_one.as_deref();
            if one.body.origin.kind == Some(SourceKind::Heartbeat)
                || (measure && codec::encoded_len(&one.body).unwrap_or(usize::MAX) > budget)
            {
                return self
                    .end_run(&mut run, batch, sent, last_seq)
                    .await
                    .err()
                    .unwrap_or(Fast::Careful);
            }
            let Some(mut entries) = self.decide_in_batch(|d| d.alert(at.cause(), &one)) else {
                return self
                    .end_run(&mut run, batch, sent, last_seq)
                    .await
                    .err()
                    .unwrap_or(Fast::Careful);
            };
            let n = entries.len();
            let most = self.most_entry_bytes();
            // A lone entry that can join a run, or start one: its payload.
            let joins = match entries.as_slice() {
                [LogEntry::Incident(e)]
                    if matches!(
                        e.kind,
                        EventKind::Opened { .. }
                            | EventKind::AlertFiring { .. }
                            | EventKind::AlertResolved { .. }
                    ) =>
                {
                    encode_entry(&entries[0], tp)
                        .ok()
                        .filter(|p| p.len() <= most)
                }
                _ => None,
            };
            let Some(payload) = joins else {
                if let Err(fast) = self.end_run(&mut run, batch, sent, last_seq).await {
                    return fast;
                }
                if let Err(fast) = self
                    .send_or_gather(entries, batch, tp, sent, last_seq)
                    .await
                {
                    return fast;
                }
                handled.push(Handled::Alert(at, one.received_at, n));
                // A request's alerts can be many: their acknowledgements
                // are awaited before async-nats runs out of permits.
                if sent.len() >= MAX_SENT {
                    if let Err(e) = self.send_and_finish(batch, sent, handled, last_seq).await {
                        return Fast::Failed(e);
                    }
                }
                continue;
            };
            let next = entries.pop().expect("one entry");
            write(&self.proj).apply(&next, 0);
            handled.push(Handled::Alert(at, one.received_at, n));
            let next = match run.as_mut() {
                Some(r) if r.bound + payload.len() <= most => {
                    match crate::core::join_run(&mut r.entry, next) {
                        None => {
                            r.bound += payload.len();
                            r.payload = None;
                            continue;
                        }
                        Some(next) => next,
                    }
                }
                _ => next,
            };
            // A run of its own, after the one before.
            if let Err(fast) = self.end_run(&mut run, batch, sent, last_seq).await {
                return fast;
            }
            run = Some(Run {
                entry: next,
                bound: payload.len(),
                payload: Some(payload),
                traceparent: tp_one,
            });
            if sent.len() >= MAX_SENT {
                if let Err(fast) = self.end_run(&mut run, batch, sent, last_seq).await {
                    return fast;
                }
                if let Err(e) = self.send_and_finish(batch, sent, handled, last_seq).await {
                    return Fast::Failed(e);
                }
            }
        }
        match self.end_run(&mut run, batch, sent, last_seq).await {
            Ok(()) => Fast::Done,
            Err(fast) => fast,
        }
    }

    /// The largest entry the fast way sends.
    fn most_entry_bytes(&self) -> usize {
        self.limits.max_entry_bytes.min(self.client.max_payload())
    }

    /// Sends the run of alerts joined so far as one entry (already folded
    /// into the projection, alert by alert): an opening on its own
    /// subject, after the entries gathered so far; alert changes join
    /// them ([`LogEntry::is_packed`]).
    async fn end_run(
        &self,
        run: &mut Option<Run>,
        batch: &mut Batch,
        sent: &mut Vec<Sent>,
        last_seq: &mut u64,
    ) -> Result<(), Fast> {
        let Some(Run {
            entry,
            payload,
            traceparent,
            ..
        }) = run.take()
        else {
            return Ok(());
        };
        let traceparent = traceparent.as_deref();
        let payload = match payload.map_or_else(|| encode_entry(&entry, traceparent), Ok) {
            Ok(p) if p.len() <= self.most_entry_bytes() => p,
            // Bounded by the sum of its alerts' own entries: not reached.
            _ => return Err(Fast::Failed("a run of alerts outgrew its entry".into())),
        };
        if entry.is_packed() {
            return self
                .gather_folded(entry, payload.len(), traceparent, batch, sent, last_seq)
                .await
                .map_err(Fast::Failed);
        }
        self.send_batch(batch, sent, last_seq)
            .await
            .map_err(Fast::Failed)?;
        self.publish_folded(entry, payload, traceparent, sent, last_seq)
            .await
            .map_err(Fast::Failed)
    }

    /// Sends what `batch` gathered, then waits for everything sent (see
    /// [`Service::finish`]): nothing folded in is left unsent when the
    /// projection is saved.
    async fn send_and_finish(
        &self,
        batch: &mut Batch,
        sent: &mut Vec<Sent>,
        handled: &mut Vec<Handled>,
        last_seq: &mut u64,
    ) -> Result<(), String> {
        self.send_batch(batch, sent, last_seq).await?;
        self.finish(sent, handled).await
    }

    /// On a replicated INCIDENTS, waits for the acknowledgement of the
    /// message sent last, so that no two fenced messages are in flight at
    /// once (the stream's leader would refuse the second:
    /// `Fence::one_at_a_time`); elsewhere returns at once. Deciding the
    /// next input still overlaps with the last message's replication.
    async fn one_at_a_time(&self, sent: &mut Vec<Sent>) -> Result<(), String> {
        if !self.fence().is_some_and(|f| f.one_at_a_time) {
            return Ok(());
        }
        if let Some((ack, stored)) = sent.pop() {
            let ack = ack.get().await.map_err(|e| e.to_string())?;
            sent.push((Ack::Came(Ok(ack)), stored));
        }
        Ok(())
    }

    /// Publishes an entry already folded into the projection, after the
    /// stream's last sequence `last_seq`.
    async fn publish_folded(
        &self,
        entry: LogEntry,
        payload: Vec<u8>,
        traceparent: Option<&str>,
        sent: &mut Vec<Sent>,
        last_seq: &mut u64,
    ) -> Result<(), String> {
        self.one_at_a_time(sent).await?;
        let fence = self.fence();
        let message = entry_message(
            entry.msg_id(),
            payload,
            traceparent,
            *last_seq,
            &fence,
            None,
        );
        let ack = fence::send(&self.js, entry.subject(), message, fence.as_ref())
            .await
            .map_err(|e| e.to_string())?;
        sent.push((ack, Stored::One(Box::new(entry))));
        *last_seq += 1;
        Ok(())
    }

    /// Sends the receipts and alert changes gathered in `batch` (already folded into the
    /// projection; none: nothing is sent) as one message on
    /// [`INCIDENTS_BATCH`], after the
    /// stream's last sequence `last_seq`, so JetStream syncs one message
    /// for all of them. Its message id is derived from its entries' ids,
    /// so the same batch sent again is stored once; a batch decided again
    /// after a failure is not the same batch, but then its commands are
    /// found applied (the stream is folded in before deciding again) and
    /// the sequence each message names refuses one sent after a gap.
    async fn send_batch(
        &self,
        batch: &mut Batch,
        sent: &mut Vec<Sent>,
        last_seq: &mut u64,
    ) -> Result<(), String> {
        let entries = std::mem::take(&mut batch.entries);
        let traceparent = batch.traceparent.take();
        let traceparent = traceparent.as_deref();
        batch.bytes = 0;
        let (Some(first), Some(last)) = (entries.first(), entries.last()) else {
            return Ok(());
        };
        let msg_id = format!(
            "batch:{}:{}:{}",
            entries.len(),
            first.msg_id(),
            last.msg_id()
        );
        let at = match last {
            LogEntry::Incident(e) => e.at,
            LogEntry::Silence { at, .. } => *at,
        };
        let env = Envelope::new("incidents", at, &entries)
            .with_traceparent(traceparent.map(str::to_string));
        let payload = codec::encode(&env).map_err(|e| e.to_string())?;
        self.one_at_a_time(sent).await?;
        let fence = self.fence();
        let items = Some(entries.len());
        let message = entry_message(msg_id, payload, traceparent, *last_seq, &fence, items);
        let ack = fence::send(&self.js, INCIDENTS_BATCH.into(), message, fence.as_ref())
            .await
            .map_err(|e| e.to_string())?;
        sent.push((ack, Stored::Batch(entries)));
        *last_seq += 1;
        Ok(())
    }

    /// Decides one input of a batch on the projection. An incident it
    /// touches that left memory is loaded back from the local store first,
    /// so receipts and alerts for incidents out of memory stay in the
    /// batch (a storm's receipts mostly name such incidents). None: the
    /// input must go the careful way (the store does not have the
    /// incident, or it cannot be read; that way reads the stream).
    ///
    /// Loading back mid-batch is safe: nothing leaves memory before the
    /// save of its last change is applied, so an incident out of memory
    /// has no entry in flight, and the store holds its state as of that
    /// save, which is its whole state.
    fn decide_in_batch<T>(&self, decide: impl Fn(&Decider<'_>) -> T) -> Option<T> {
        // One input touches one incident; the bound is a guard.
        for _ in 0..4 {
            let (decided, missed) = {
                let p = read(&self.proj);
                let d = Decider::new(&self.core, &p);
                let decided = decide(&d);
                (decided, d.missed.get())
            };
            let Some(id) = missed else {
                return Some(decided);
            };
            let stored = self
                .watchdog
                .during("reading an incident from the local store", || {
                    self.store.incident(&id)
                });
            match stored {
                Ok(Some(st)) => self.put_back(st),
                Ok(None) => return None,
                Err(e) => {
                    tracing::warn!(incident = %id, error = %e, "stored incident unreadable; reading it from the stream");
                    return None;
                }
            }
        }
        None
    }

    /// Sends one input's entries (each naming the stream sequence it must
    /// follow) and folds each into the projection; `Err` says how the input
    /// must go instead (nothing is sent if an entry is too large).
    async fn send_entries(
        &self,
        entries: Vec<LogEntry>,
        traceparent: Option<&str>,
        sent: &mut Vec<Sent>,
        last_seq: &mut u64,
    ) -> Result<(), Fast> {
        let most = self.most_entry_bytes();
        let mut payloads = Vec::with_capacity(entries.len());
        for entry in &entries {
            match encode_entry(entry, traceparent) {
                Ok(p) if p.len() <= most => payloads.push(p),
                _ => return Err(Fast::Careful),
            }
        }
        for (entry, payload) in entries.into_iter().zip(payloads) {
            write(&self.proj).apply(&entry, 0);
            self.publish_folded(entry, payload, traceparent, sent, last_seq)
                .await
                .map_err(Fast::Failed)?;
        }
        Ok(())
    }

    /// Sends one command's entries: receipts join `batch` (folded in now,
    /// sent when it is full, before an entry of another kind, or at the
    /// end of the batch of inputs), anything else goes at once on its own
    /// subject, after the batch gathered so far (so the stream keeps the
    /// order they were decided in).
    async fn send_or_gather(
        &self,
        entries: Vec<LogEntry>,
        batch: &mut Batch,
        traceparent: Option<&str>,
        sent: &mut Vec<Sent>,
        last_seq: &mut u64,
    ) -> Result<(), Fast> {
        if entries.is_empty() {
            return Ok(()); // applied before, or refused
        }
        if !entries.iter().all(LogEntry::is_packed) {
            self.send_batch(batch, sent, last_seq)
                .await
                .map_err(Fast::Failed)?;
            return self
                .send_entries(entries, traceparent, sent, last_seq)
                .await;
        }
        let most = self.most_entry_bytes();
        let mut sizes = Vec::with_capacity(entries.len());
        for entry in &entries {
            match encode_entry(entry, traceparent) {
                Ok(p) if p.len() <= most => sizes.push(p.len()),
                _ => return Err(Fast::Careful),
            }
        }
        for (entry, size) in entries.into_iter().zip(sizes) {
            write(&self.proj).apply(&entry, 0);
            self.gather_folded(entry, size, traceparent, batch, sent, last_seq)
                .await
                .map_err(Fast::Failed)?;
        }
        Ok(())
    }

    /// Adds an entry already folded into the projection (`size` bytes as
    /// a message of its own, at most the largest entry) to `batch`,
    /// sending the batch first if it would outgrow the largest entry.
    async fn gather_folded(
        &self,
        entry: LogEntry,
        size: usize,
        traceparent: Option<&str>,
        batch: &mut Batch,
        sent: &mut Vec<Sent>,
        last_seq: &mut u64,
    ) -> Result<(), String> {
        if batch.bytes + size > self.most_entry_bytes() {
            self.send_batch(batch, sent, last_seq).await?;
        }
        if batch.entries.is_empty() {
            batch.traceparent = traceparent.map(str::to_string);
        }
        batch.entries.push(entry);
        batch.bytes += size;
        Ok(())
    }

    /// Decides the commands of one COMMANDS message in a batch (one, or a
    /// batch's several) and sends their entries (see
    /// [`Service::on_inputs`]). The message is answered and acknowledged
    /// once all of them are stored; a command that needs care sends the
    /// whole message the careful way, where the ones already decided are
    /// found applied (an incident remembers the commands it took).
    async fn send_command(
        &self,
        msg: jetstream::Message,
        batch: &mut Batch,
        sent: &mut Vec<Sent>,
        handled: &mut Vec<Handled>,
        last_seq: &mut u64,
    ) -> Fast {
        let Ok(env) = decode_commands(&msg.subject, &msg.payload) else {
            return Fast::Careful;
        };
        if env.body.iter().any(|c| !c.fits_subject(&msg.subject)) {
            return Fast::Careful;
        }
        let traceparent = header(&msg, headers::TRACEPARENT);
        let tp = traceparent.as_deref();
        let mut decided = Vec::with_capacity(env.body.len());
        // Its receipts join `batch`, which the caller sends before anything
        // else (what is folded in must be sent before any way out of the
        // batch: deciding again would find it applied).
        for one in env.split() {
            let decision = self.decide_in_batch(|d| d.command(&one.body, one.received_at));
            let fast = match decision {
                Some((entries, verdict)) => {
                    let r = self
                        .send_or_gather(entries, batch, tp, sent, last_seq)
                        .await;
                    decided.push((one.body, verdict));
                    r
                }
                None => Err(Fast::Careful),
            };
            if let Err(fast) = fast {
                return fast;
            }
            // The message is acknowledged only at its end; what it decided
            // so far may be saved before (a redelivery finds it applied).
            if sent.len() + batch.entries.len() >= MAX_SENT {
                if let Err(e) = self.send_batch(batch, sent, last_seq).await {
                    return Fast::Failed(e);
                }
                if let Err(e) = self.finish(sent, handled).await {
                    return Fast::Failed(e);
                }
            }
        }
        Fast::Sent(Handled::Command {
            msg: Box::new(msg),
            decided,
            incident: None, // taken in finish
        })
    }

    /// Awaits the acknowledgements of what a batch sent, saves the
    /// projection once with the alerts recorded as handled, then answers
    /// and acknowledges the commands.
    async fn finish(&self, sent: &mut Vec<Sent>, handled: &mut Vec<Handled>) -> Result<(), String> {
        let started = Instant::now();
        let r = self.finish_timed(sent, handled).await;
        self.finishing
            .fetch_add(micros(started.elapsed()), Ordering::Relaxed);
        r
    }

    /// [`Service::finish`] itself, counting each stage's time (`stored`,
    /// `save`, `answer`) in `tocsin_incidents_busy_seconds`.
    async fn finish_timed(
        &self,
        sent: &mut Vec<Sent>,
        handled: &mut Vec<Handled>,
    ) -> Result<(), String> {
        let mut top = 0;
        let started = Instant::now();
        let mut batches = Vec::new();
        let stored = async {
            for (ack, stored) in sent.drain(..) {
                let ack = ack.get().await.map_err(|e| e.to_string())?;
                top = top.max(ack.sequence);
                let entries = match &stored {
                    Stored::One(entry) => std::slice::from_ref(entry.as_ref()),
                    Stored::Batch(entries) => entries.as_slice(),
                };
                if !ack.duplicate {
                    entries.iter().for_each(|e| self.written(e));
                }
                if let Stored::Batch(entries) = stored {
                    batches.push((entries, ack.sequence));
                }
            }
            Ok::<_, String>(())
        }
        .await;
        self.metrics.busy("stored", started.elapsed());
        stored?;
        if handled.is_empty() && batches.is_empty() {
            return Ok(());
        }
        let saving = Instant::now();
        {
            let mut p = write(&self.proj);
            p.incidents_seq = p.incidents_seq.max(top);
            for (entries, seq) in &batches {
                p.batch_stored(entries, *seq);
            }
            for h in handled.iter_mut() {
                match h {
                    Handled::Alert(at, _, _) => p.alerts_cursor = p.alerts_cursor.max(*at),
                    Handled::Command {
                        decided, incident, ..
                    } => {
                        if let [(cmd, _)] = decided.as_slice() {
                            *incident = summary_of(&p, cmd).map(Box::new)
                        }
                    }
                }
            }
            self.metrics.sizes(p.open_count, p.incidents.len());
        }
        self.save().await;
        self.metrics.busy("save", saving.elapsed());
        let answering = Instant::now();
        let now = Timestamp::now();
        // Commands are answered and acknowledged all at once (each
        // acknowledgement is a round trip to JetStream), on a task of their
        // own while the next batch is decided: their effects are stored,
        // so a crash before the acknowledgements only brings them again,
        // to be found applied. One batch's at a time, in order.
        let mut done = Vec::new();
        for h in handled.drain(..) {
            match h {
                Handled::Alert(_, received_at, written) => {
                    self.alert_done(written, received_at, now)
                }
                Handled::Command {
                    msg,
                    decided,
                    incident,
                } => done.push((*msg, decided, incident.map(|i| *i))),
            }
        }
        self.answered().await;
        if !done.is_empty() {
            let answerer = self.answerer();
            let task = tokio::spawn(async move {
                let all = done
                    .into_iter()
                    .map(|(msg, decided, incident)| answerer.commands_done(msg, decided, incident));
                futures::future::join_all(all).await;
            });
            let pending = async move {
                if let Err(e) = task.await {
                    tracing::error!(error = %e, "answering a batch's commands failed; they come again and are found applied");
                }
            };
            *lock(&self.answering) = Some(pending.boxed().shared());
        }
        self.metrics.busy("answer", answering.elapsed());
        Ok(())
    }

    /// A batch failed (`error`): the projection may hold entries JetStream
    /// never stored. Starts again from what is saved plus what the stream
    /// holds; the batch's inputs after the stored prefix then go one at a
    /// time (alerts and commands up to `last`), and its commands not yet
    /// answered (`unfinished`) are given back at once to come again.
    async fn roll_back(
        &self,
        last: (u64, u64),
        error: &str,
        unfinished: impl IntoIterator<Item = jetstream::Message>,
        shutdown: &CancellationToken,
    ) {
        IncidentsEvent::PublishFailed { error }.emit(&self.metrics);
        self.careful_until.fetch_max(last.0, Ordering::Relaxed);
        self.careful_commands.fetch_max(last.1, Ordering::Relaxed);
        // Given back once this reader of COMMANDS is gone (see run), or a
        // message given back now would come to it and wait for ack_wait.
        lock(&self.give_back).extend(unfinished);
        let mut backoff = tocsin_runtime::retry::Backoff::standard();
        loop {
            let keep = keep_resolved_until(self.clock.now(), self.core.reopen_window);
            let loaded = self
                .watchdog
                .during("reloading the projection from the local store", || {
                    self.store.load(keep, self.max_in_memory, rules(&self.core))
                });
            match loaded {
                Ok(mut p) => {
                    p.set_severity(self.core.severity.clone());
                    *write(&self.proj) = p;
                    break;
                }
                Err(e) => {
                    tracing::error!(error = %e, "cannot reload the projection after a failed batch; retrying");
                    if !backoff.wait(shutdown).await {
                        return;
                    }
                }
            }
        }
        // What the batch stored is a prefix of it (see on_alerts): folded
        // in, its cursor is where deciding must go on. (Deciding again an
        // alert before it, on a projection with later alerts folded in,
        // could decide differently.)
        self.catch_up(shutdown).await;
    }

    /// Decides the alerts of one ALERTS message one at a time, from where
    /// deciding stands (an earlier try may have decided some of them).
    async fn on_alert(&self, msg: jetstream::Message, shutdown: &CancellationToken) {
        let Ok(info) = msg.info() else {
            tracing::warn!("ALERTS message without JetStream info; skipped");
            return;
        };
        let seq = info.stream_sequence;
        let resume = read(&self.proj).alerts_resume_from();
        if seq < resume.seq {
            return; // already decided
        }
        let traceparent = header(&msg, headers::TRACEPARENT);
        let env = match decode_alerts(&msg.subject, &msg.payload) {
            Ok(env) => env,
            Err(e) => {
                let whole = AlertPos::whole(seq);
                let at = seq.to_string();
                self.give_up_alert(
                    &msg.subject,
                    &msg.payload,
                    whole,
                    &at,
                    "undecodable",
                    &e.to_string(),
                    shutdown,
                )
                .await;
                return;
            }
        };
        let batch = is_alert_batch(&msg.subject);
        // A message of one alert holds the encoded alert: a small one needs
        // no look.
        let small = !batch && msg.payload.len() <= self.limits.max_alert_bytes();
        for (at, one) in each_alert(seq, env) {
            if at < resume {
                continue;
            }
            // Its request's trace context (a pack holds several requests').
            let tp = one.traceparent.clone().or_else(|| traceparent.clone());
            let went_on = self
                .on_one_alert(&msg, batch, at, one, small, tp.as_deref(), shutdown)
                .await;
            if !went_on {
                return; // shut down
            }
        }
    }

    /// Decides one alert (the careful way); false if the service stopped
    /// before it was decided.
    #[allow(clippy::too_many_arguments)]
    async fn on_one_alert(
        &self,
        msg: &jetstream::Message,
        batch: bool,
        at: AlertPos,
        mut env: Envelope<Alert>,
        small: bool,
        traceparent: Option<&str>,
        shutdown: &CancellationToken,
    ) -> bool {
        // What goes to DEADLETTER if it cannot be decided: the message, or
        // this alert of a batch as a message of its own (as it came).
        let dead_letter_payload = |env: &Envelope<Alert>| -> (String, Vec<u8>, String) {
            if !batch {
                return (
                    msg.subject.to_string(),
                    msg.payload.to_vec(),
                    at.seq.to_string(),
                );
            }
            let kind = env.body.origin.kind.unwrap_or(SourceKind::Generic);
            (
                tocsin_proto::subjects::alert_subject(kind, &env.body.fingerprint),
                codec::encode(env).unwrap_or_default(),
                format!("{}.{}", at.seq, at.index),
            )
        };
        let as_came = (!small).then(|| dead_letter_payload(&env));
        let bounded = if small {
            Ok(false)
        } else {
            self.limits.bound_alert(&mut env.body)
        };
        match bounded {
            Ok(false) => {}
            Ok(true) => tracing::warn!(
                seq = at.seq,
                index = at.index,
                fingerprint = %env.body.fingerprint,
                max_alert_bytes = self.limits.max_alert_bytes(),
                "alert over a quarter of incidents.max_entry_bytes: its longest labels and annotations were cut"
            ),
            Err(e) => {
                let (subject, payload, key) = as_came.unwrap_or_else(|| dead_letter_payload(&env));
                return self
                    .give_up_alert(&subject, &payload, at, &key, "too_large", &e.0, shutdown)
                    .await;
            }
        }
        let cause = at.cause();
        let settled = if env.body.origin.kind == Some(SourceKind::Heartbeat) {
            self.on_ping(&env, cause, traceparent, shutdown).await
        } else {
            self.settle(shutdown, traceparent, |d| d.alert(cause.clone(), &env))
                .await
        };
        let written = match settled {
            Ok(n) => n,
            Err(Stop::Shutdown) => return false,
            Err(Stop::GaveUp { reason, detail, .. }) => {
                let (subject, payload, key) = as_came.unwrap_or_else(|| dead_letter_payload(&env));
                return self
                    .give_up_alert(&subject, &payload, at, &key, reason, &detail, shutdown)
                    .await;
            }
        };
        self.alert_done(written, env.received_at, Timestamp::now());
        self.advance(at).await;
        true
    }

    /// Moves an alert that cannot be decided or applied to DEADLETTER (as
    /// `subject` and `payload`, `key` its place on ALERTS) and goes past it;
    /// false if the service stopped first.
    #[allow(clippy::too_many_arguments)]
    async fn give_up_alert(
        &self,
        subject: &str,
        payload: &[u8],
        at: AlertPos,
        key: &str,
        reason: &'static str,
        detail: &str,
        shutdown: &CancellationToken,
    ) -> bool {
        if !self
            .dead_letter(
                STREAM_ALERTS,
                subject,
                payload,
                key,
                reason,
                detail,
                shutdown,
            )
            .await
        {
            return false;
        }
        self.advance(at).await;
        true
    }

    async fn advance(&self, at: AlertPos) {
        {
            let mut p = write(&self.proj);
            p.alerts_cursor = p.alerts_cursor.max(at);
        }
        self.save().await;
    }

    async fn on_ping(
        &self,
        env: &Envelope<Alert>,
        cause: Cause,
        tp: Option<&str>,
        shutdown: &CancellationToken,
    ) -> Result<usize, Stop> {
        let name = env
            .body
            .labels
            .get("heartbeat")
            .cloned()
            .unwrap_or_default();
        let Some(hb) = self.heartbeats.iter().find(|h| h.name == name) else {
            tracing::warn!(heartbeat = %name, "ping for a heartbeat that is not configured (incidents.heartbeats); ignored");
            IncidentsEvent::Input {
                input: "heartbeat",
                outcome: "unknown",
            }
            .emit(&self.metrics);
            return Ok(0);
        };
        write(&self.proj)
            .heartbeats
            .insert(name.clone(), env.received_at);
        if !heartbeat_open(&read(&self.proj), &name) {
            return Ok(0);
        }
        let alert = heartbeat_alert(
            &name,
            &hb.labels,
            hb.summary.as_deref(),
            false,
            env.received_at,
            env.received_at,
        );
        let synthetic = Envelope::new(HEARTBEAT_SOURCE, env.received_at, alert);
        self.settle(shutdown, tp, |d| d.alert(cause.clone(), &synthetic))
            .await
    }

    /// Records that a timer's entries cannot be written: it is skipped from
    /// now on (until a restart), so it neither blocks nor spins.
    fn abandon_timer(&self, reason: &'static str, detail: &str, cause: Cause) {
        IncidentsEvent::TimerAbandoned {
            timer: &cause.key(),
            reason,
            detail,
        }
        .emit(&self.metrics);
        self.abandoned
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(cause);
    }

    async fn on_timers(&self, shutdown: &CancellationToken) {
        let now = self.clock.now();
        let n = match self
            .settle(shutdown, None, |d| d.timers(now, |c| self.is_abandoned(c)))
            .await
        {
            Ok(n) => n,
            Err(Stop::Shutdown) => return,
            Err(Stop::GaveUp {
                reason,
                detail,
                cause,
            }) => {
                // The timers stored before the failing one are folded in;
                // the next round takes those after it.
                self.abandon_timer(reason, &detail, cause);
                self.save().await;
                return;
            }
        };
        self.save().await;
        if n > 0 {
            IncidentsEvent::Input {
                input: "timer",
                outcome: "changed",
            }
            .emit(&self.metrics);
        }
        for hb in &self.heartbeats {
            let (open, deadline, last) = {
                let p = read(&self.proj);
                (
                    heartbeat_open(&p, &hb.name),
                    heartbeat_deadline(&p, hb, self.started_at),
                    p.heartbeats.get(&hb.name).copied(),
                )
            };
            let cause = heartbeat_cause(&hb.name, deadline);
            if open || now < deadline || self.is_abandoned(&cause) {
                continue;
            }
            let since = last.unwrap_or(self.started_at);
            let alert = heartbeat_alert(
                &hb.name,
                &hb.labels,
                hb.summary.as_deref(),
                true,
                deadline,
                since,
            );
            let env = Envelope::new(HEARTBEAT_SOURCE, deadline, alert);
            match self
                .settle(shutdown, None, |d| d.alert(cause.clone(), &env))
                .await
            {
                Ok(_) => {}
                Err(Stop::Shutdown) => return,
                Err(Stop::GaveUp { reason, detail, .. }) => {
                    self.abandon_timer(reason, &detail, cause);
                    continue;
                }
            }
            IncidentsEvent::Input {
                input: "heartbeat",
                outcome: "missed",
            }
            .emit(&self.metrics);
            self.save().await;
        }
    }

    /// The careful way for a COMMANDS message: each command it holds (one,
    /// or a batch's several) settled on its own. A command that cannot be
    /// applied is dead-lettered (a message of one is answered "rejected");
    /// of several, it goes alone, as a message of its own on its own
    /// subject with its place (`<seq>.<index>`), and the others are applied.
    async fn on_command(&self, msg: jetstream::Message, shutdown: &CancellationToken) {
        let reply_to = header(&msg, headers::REPLY_TO);
        let traceparent = header(&msg, headers::TRACEPARENT);
        let seq = msg.info().map(|i| i.stream_sequence).unwrap_or(0);
        let env = match decode_commands(&msg.subject, &msg.payload) {
            Ok(env) => env,
            Err(e) => {
                self.give_up_command(&msg, seq, "undecodable", &e.to_string(), None, shutdown)
                    .await;
                return;
            }
        };
        let batch = is_command_batch(&msg.subject);
        let mut decided = Vec::with_capacity(env.body.len());
        for (index, one) in env.split().enumerate() {
            let cmd = &one.body;
            let (reason, detail) = if !cmd.fits_subject(&msg.subject) {
                (
                    "wrong_subject",
                    format!(
                        "a {} command is applied only when published on {}, not on {}",
                        cmd.action.name(),
                        cmd.subject(),
                        msg.subject
                    ),
                )
            } else {
                let verdict = std::sync::Mutex::new(Verdict::Rejected("not decided".into()));
                let settled = self
                    .settle(shutdown, traceparent.as_deref(), |d| {
                        let (entries, v) = d.command(cmd, one.received_at);
                        *verdict.lock().unwrap_or_else(|e| e.into_inner()) = v;
                        entries
                    })
                    .await;
                match settled {
                    Ok(_) => {
                        let verdict = verdict.into_inner().unwrap_or_else(|e| e.into_inner());
                        decided.push((one.body, verdict));
                        continue;
                    }
                    // Shutting down: the message stays un-acked and is
                    // redelivered; what it applied is found applied.
                    Err(Stop::Shutdown) => return,
                    Err(Stop::GaveUp { reason, detail, .. }) => {
                        self.save().await;
                        (reason, detail)
                    }
                }
            };
            if !batch {
                let answer = reply_to.map(|to| {
                    let reply = CommandReply::Rejected {
                        command_id: cmd.id.clone(),
                        reason: format!(
                            "the command could not be applied and was moved to the \
                             dead-letter stream: {detail}"
                        ),
                    };
                    (to, reply)
                });
                self.give_up_command(&msg, seq, reason, &detail, answer, shutdown)
                    .await;
                return;
            }
            let payload = match codec::encode(&one) {
                Ok(p) => p,
                Err(e) => {
                    tracing::error!(error = %e, command_id = %cmd.id, "cannot encode a command to dead-letter it");
                    continue;
                }
            };
            // A message of one command, with that command's own subject.
            let at = format!("{seq}.{index}");
            if !self
                .dead_letter(
                    STREAM_COMMANDS,
                    &cmd.subject(),
                    &payload,
                    &at,
                    reason,
                    &detail,
                    shutdown,
                )
                .await
            {
                return;
            }
        }
        let incident = match decided.as_slice() {
            [(cmd, _)] => summary_of(&read(&self.proj), cmd),
            _ => None,
        };
        self.save().await;
        self.commands_done(msg, decided, incident).await;
    }

    /// Answers the commands of a message whose effects are stored (see
    /// [`Answerer::commands_done`]), then acknowledges the message.
    async fn commands_done(
        &self,
        msg: jetstream::Message,
        decided: Vec<(Command, Verdict)>,
        incident: Option<IncidentSummary>,
    ) {
        self.answerer().commands_done(msg, decided, incident).await
    }

    async fn reply(&self, to: String, reply: &CommandReply) {
        self.answerer().reply(to, reply).await
    }

    fn answerer(&self) -> Answerer {
        Answerer {
            client: self.client.clone(),
            metrics: self.metrics.clone(),
        }
    }

    /// Waits until the commands of the batches finished so far are
    /// answered and acknowledged (see [`Service::finish_timed`]).
    pub(crate) async fn answered(&self) {
        let pending = lock(&self.answering).clone();
        if let Some(p) = pending {
            p.await;
        }
    }

    /// Moves a command that cannot be decoded or applied to DEADLETTER,
    /// answers it if it can, and acks it so the next one comes.
    async fn give_up_command(
        &self,
        msg: &jetstream::Message,
        seq: u64,
        reason: &'static str,
        detail: &str,
        answer: Option<(String, CommandReply)>,
        shutdown: &CancellationToken,
    ) {
        if !self
            .dead_letter(
                STREAM_COMMANDS,
                &msg.subject,
                &msg.payload,
                &seq.to_string(),
                reason,
                detail,
                shutdown,
            )
            .await
        {
            return;
        }
        if let Some((to, reply)) = answer {
            self.reply(to, &reply).await;
        }
        if let Err(e) = msg.double_ack().await {
            tracing::warn!(error = %e, "cannot ack a dead-lettered command; it will be dead-lettered again (once: same message id)");
        }
    }

    /// Moves a message (or one alert or command of a message, `at`
    /// `<seq>.<index>`) to `tocsin.dlq.<stream>` with the reason, counted as
    /// an input dead-lettered. Retries until it is stored (reporting a stall
    /// on `/readyz`); returns false if shut down first.
    #[allow(clippy::too_many_arguments)]
    async fn dead_letter(
        &self,
        stream: &str,
        subject: &str,
        payload: &[u8],
        at: &str,
        reason: &'static str,
        detail: &str,
        shutdown: &CancellationToken,
    ) -> bool {
        let mut stall = Stall::new(&self.health, self.stalled_after);
        let mut backoff = tocsin_runtime::retry::Backoff::standard();
        loop {
            let result = streams::dead_letter(
                &self.js,
                stream,
                subject,
                payload.to_vec().into(),
                at,
                detail,
            )
            .await;
            match result {
                Ok(()) => {
                    stall.moving();
                    IncidentsEvent::DeadLettered {
                        stream,
                        at,
                        reason,
                        detail,
                    }
                    .emit(&self.metrics);
                    IncidentsEvent::Input {
                        input: if stream == STREAM_ALERTS {
                            "alert"
                        } else {
                            "command"
                        },
                        outcome: "dead_letter",
                    }
                    .emit(&self.metrics);
                    return true;
                }
                Err(e) => {
                    IncidentsEvent::PublishFailed { error: &e }.emit(&self.metrics);
                    stall.failing(&format!("cannot dead-letter {stream} message {at}: {e}"));
                }
            }
            if !backoff.wait(shutdown).await {
                return false;
            }
        }
    }
}

/// The alerts of ALERTS message `seq`, each with its place and in an
/// envelope of its own.
/// The alerts of ALERTS message `seq`, each with its place: its index in
/// the message, counted across the requests a pack holds.
fn each_alert(
    seq: u64,
    requests: Vec<Envelope<Vec<Alert>>>,
) -> impl Iterator<Item = (AlertPos, Envelope<Alert>)> {
    requests
        .into_iter()
        .flat_map(Envelope::split)
        .enumerate()
        .map(move |(index, one)| {
            let at = AlertPos {
                seq,
                index: index as u32,
            };
            (at, one)
        })
}

/// Consecutive alerts of one ALERTS message joined into one entry
/// ([`crate::core::join_run`]), not sent yet.
struct Run {
    entry: LogEntry,
    /// The joined alerts' own entries' sizes together: a bound on the
    /// entry's.
    bound: usize,
    /// The entry's payload while it holds one alert (sent as it is if
    /// nothing joins it).
    payload: Option<Vec<u8>>,
    /// The trace context of the run's first alert.
    traceparent: Option<String>,
}

/// What answering and acknowledging commands needs, owned, so a batch's
/// commands are answered on a task of their own while the next batch is
/// decided.
struct Answerer {
    client: Client,
    metrics: IncidentsMetrics,
}

impl Answerer {
    /// Answers the commands of a message whose effects are stored (a
    /// message of one command, to its reply subject if it has one, with its
    /// incident as it was once the effect was folded in; a batch's are not
    /// answered), then acknowledges the message.
    async fn commands_done(
        &self,
        msg: jetstream::Message,
        decided: Vec<(Command, Verdict)>,
        incident: Option<IncidentSummary>,
    ) {
        for (cmd, verdict) in &decided {
            let (accepted, message) = match verdict {
                Verdict::Accepted(m) => (true, m),
                Verdict::Rejected(m) => (false, m),
            };
            IncidentsEvent::CommandAnswered {
                id: &cmd.id,
                action: cmd.action.name(),
                accepted,
                message,
            }
            .emit(&self.metrics);
        }
        let reply_to = header(&msg, headers::REPLY_TO);
        if let (Some(to), false, [(cmd, verdict)]) =
            (reply_to, is_command_batch(&msg.subject), decided.as_slice())
        {
            let reply = match verdict {
                Verdict::Accepted(message) => CommandReply::Accepted {
                    command_id: cmd.id.clone(),
                    message: message.clone(),
                    incident,
                },
                Verdict::Rejected(reason) => CommandReply::Rejected {
                    command_id: cmd.id.clone(),
                    reason: reason.clone(),
                },
            };
            self.reply(to, &reply).await;
        }
        // Acked only now: the effects are on the stream and in the projection.
        if let Err(e) = msg.double_ack().await {
            tracing::warn!(error = %e, subject = %msg.subject, "command ack failed; it will be redelivered and answered as already applied");
        }
    }

    async fn reply(&self, to: String, reply: &CommandReply) {
        match codec::encode(reply) {
            Ok(bytes) => {
                if let Err(e) = self.client.publish(to, bytes.into()).await {
                    tracing::warn!(error = %e, "cannot send a command reply");
                }
            }
            Err(e) => tracing::error!(error = %e, "cannot encode a command reply"),
        }
    }
}

/// An INCIDENTS message: its id (an entry's from its cause), the stream
/// sequence it must follow (the incidents service is INCIDENTS' only
/// writer), and for a message of several entries how many it holds.
fn entry_message(
    msg_id: String,
    payload: Vec<u8>,
    traceparent: Option<&str>,
    last_seq: u64,
    fence: &Option<Fence>,
    items: Option<usize>,
) -> async_nats::jetstream::message::PublishMessage {
    let last = last_seq.to_string();
    let items = items.map(|n| n.to_string());
    let fenced = fence.as_ref().map(Fence::headers);
    let mut headers = vec![(EXPECTED_LAST_SEQUENCE, last.as_str())];
    if let Some(n) = &items {
        headers.push((headers::ITEMS, n.as_str()));
    }
    if let Some(f) = &fenced {
        headers.extend(f.iter().map(|(k, v)| (*k, v.as_str())));
    }
    tocsin_runtime::bus::message(payload, msg_id, traceparent, &headers)
}

/// The envelope of `entry` as published.
fn encode_entry(entry: &LogEntry, traceparent: Option<&str>) -> Result<Vec<u8>, Failure> {
    let at = match entry {
        LogEntry::Incident(e) => e.at,
        LogEntry::Silence { at, .. } => *at,
    };
    let env =
        Envelope::new("incidents", at, entry).with_traceparent(traceparent.map(str::to_string));
    codec::encode(&env).map_err(|e| Failure::Permanent {
        reason: "too_large",
        detail: e.to_string(),
        cause: entry.cause().clone(),
    })
}

/// The incident `cmd` names, as a reply carries it (None: it names none,
/// or none that exists).
fn summary_of(p: &Projection, cmd: &Command) -> Option<IncidentSummary> {
    cmd.action
        .incident()
        .and_then(|r| p.find(r))
        .map(|i| i.summary.clone())
}

/// The cause of heartbeat `name`'s missed-ping incident due at `deadline`.
fn heartbeat_cause(name: &str, deadline: Timestamp) -> Cause {
    Cause::Timer {
        id: format!("hb-{}-{}", name, deadline.as_second()),
    }
}

fn heartbeat_open(p: &Projection, name: &str) -> bool {
    p.by_key
        .get(&heartbeat_key(name))
        .is_some_and(|id| match p.incidents.get(id) {
            Some(i) => i.summary.status != IncidentStatus::Resolved,
            None => p.cold_open.contains(id),
        })
}

fn heartbeat_deadline(p: &Projection, hb: &HeartbeatConfig, started_at: Timestamp) -> Timestamp {
    let last = p.heartbeats.get(&hb.name).copied().unwrap_or(started_at);
    let interval = SignedDuration::try_from(hb.interval.get()).unwrap_or(SignedDuration::MAX);
    last.checked_add(interval).unwrap_or(Timestamp::MAX)
}

/// The inhibition rules a projection indexes the firing alerts by (none
/// if there are none).
fn rules(core: &CoreConfig) -> Option<Arc<crate::inhibit::Inhibitor>> {
    (!core.inhibitor.is_empty()).then(|| core.inhibitor.clone())
}

/// Opens the store; a store that cannot be read is wiped and rebuilt.
fn open_store(
    dir: &Path,
    evict_before: Timestamp,
    max_in_memory: usize,
    rules: Option<Arc<crate::inhibit::Inhibitor>>,
) -> Result<(Store, Projection), IncidentsError> {
    tocsin_runtime::store::open_or_rebuild(dir, "projection store", |d| {
        Store::open(d).and_then(|s| {
            s.load(evict_before, max_in_memory, rules.clone())
                .map(|p| (s, p))
        })
    })
    .map_err(|source| IncidentsError::Store {
        dir: dir.display().to_string(),
        source,
    })
}

/// What the service reads next: an alert, a command, or the end of either
/// stream.
enum Input {
    Alert(Result<jetstream::Message, String>),
    Command(Result<jetstream::Message, String>),
    Ended,
}

/// An input as the batch takes it (matched at once, never kept: its size
/// does not matter).
#[allow(clippy::large_enum_variant)]
enum Taken {
    Ready(Ready),
    /// A consumer's error, logged and passed over.
    Passed,
    /// Either stream ended: the consumers are made anew.
    Ended,
}

impl Input {
    fn is_ok(&self) -> bool {
        matches!(self, Input::Alert(Ok(_)) | Input::Command(Ok(_)))
    }

    fn taken(self) -> Taken {
        match self {
            Input::Alert(Ok(msg)) => Taken::Ready(Ready::Alert(msg)),
            Input::Command(Ok(msg)) => Taken::Ready(Ready::Command(msg)),
            Input::Alert(Err(e)) => {
                tracing::warn!(error = %e, "ALERTS consumer error");
                Taken::Passed
            }
            Input::Command(Err(e)) => {
                tracing::warn!(error = %e, "COMMANDS consumer error");
                Taken::Passed
            }
            Input::Ended => Taken::Ended,
        }
    }
}

/// Ready once every acknowledgement in `sent` has come (or failed).
async fn all_came(sent: &mut [Sent]) {
    std::future::poll_fn(|cx| {
        for (ack, _) in sent.iter_mut() {
            std::task::ready!(ack.poll_came(cx));
        }
        std::task::Poll::Ready(())
    })
    .await
}

/// A header of `msg`, if it has it.
fn header(msg: &jetstream::Message, name: &str) -> Option<String> {
    msg.headers
        .as_ref()
        .and_then(|h| h.get(name))
        .map(|v| v.to_string())
}

#[cfg(test)]
mod turns_tests {
    use super::*;
    use futures::stream::PollNext;

    /// Runs `n` turns with both streams waiting: an alert is taken on each
    /// ALERTS turn, and each COMMANDS turn takes a message of the next size
    /// in `commands` (1 once they run out). Returns the turns as 'A'/'C'.
    fn run(turns: &mut Turns, n: usize, commands: &[u64]) -> String {
        let mut sizes = commands.iter();
        (0..n)
            .map(|_| match turns.next() {
                PollNext::Left => {
                    turns.alerts_taken.fetch_add(1, Ordering::Relaxed);
                    'A'
                }
                PollNext::Right => {
                    let k = sizes.next().copied().unwrap_or(1);
                    turns.extra_commands.fetch_add(k - 1, Ordering::Relaxed);
                    'C'
                }
            })
            .collect()
    }

    #[test]
    fn three_alerts_messages_to_a_command_while_both_wait() {
        assert_eq!(run(&mut Turns::new(), 12, &[]), "CAAACAAACAAA");
    }

    #[test]
    fn a_message_of_several_commands_takes_the_turns_of_that_many() {
        let s = run(&mut Turns::new(), 24, &[6, 1, 1]);
        assert_eq!(s, format!("C{}CAAAC", "A".repeat(18)));
    }

    #[test]
    fn what_alerts_are_owed_is_forgotten_while_alerts_are_quiet() {
        let mut t = Turns::new();
        // A message of 64 receipts, ALERTS empty: its turn gives nothing.
        assert_eq!(t.next(), PollNext::Right);
        t.extra_commands.fetch_add(63, Ordering::Relaxed);
        assert_eq!(t.next(), PollNext::Left);
        // ... so the next command is not kept waiting behind 192 alerts.
        assert_eq!(t.next(), PollNext::Right);
        // Owed turns never exceed the bound.
        t.extra_commands.fetch_add(10_000, Ordering::Relaxed);
        let s = run(&mut t, 300, &[]);
        assert_eq!(s.find('C'), Some(MAX_ALERTS_OWED as usize));
    }

    #[test]
    fn the_number_of_commands_comes_from_the_header_within_bounds() {
        let msg = |v: Option<&str>| {
            let mut h = async_nats::HeaderMap::new();
            if let Some(v) = v {
                h.insert(headers::ITEMS, v);
            }
            async_nats::Message {
                subject: "tocsin.cmd.delivery.batch".into(),
                reply: None,
                payload: bytes::Bytes::new(),
                headers: Some(h),
                status: None,
                description: None,
                length: 0,
            }
        };
        let n = |v| Turns::commands_in(&msg(v));
        assert_eq!(n(Some("6")), 6);
        assert_eq!(n(None), 1);
        assert_eq!(n(Some("0")), 1);
        assert_eq!(n(Some("junk")), 1);
        assert_eq!(n(Some("100000")), BATCH as u64);
    }
}
