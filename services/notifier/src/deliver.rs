//! The delivery engine: one message delivered once, and messages already
//! sent brought up to date with their incident.
//!
//! A message (a page, or a status update in a page's thread) is claimed in
//! its KV record before any wait, asks its lane for a turn, and right
//! before the request reads the incident as it is now: a page whose
//! incident moved on is recorded as skipped instead, and the message shows
//! the incident's current state (alert count, status). The request is
//! recorded as in flight before it leaves and its outcome before the bus
//! message is acknowledged ([`crate::record`] has the rules).
//!
//! Updates follow the incident, not the event that triggered them: a sent
//! message is brought to the incident's state *now*, with that state's
//! version stored beside it, so an update can never land after a newer
//! one and a reopened incident is never shown as resolved.

use std::{
    collections::{HashMap, HashSet, VecDeque},
    sync::{Arc, Mutex},
    time::Duration,
};

use async_nats::jetstream;
use jiff::{SignedDuration, Timestamp};
use tocsin_proto::{
    incident::{IncidentStatus, IncidentSummary},
    notify::{Delivery, DeliveryOutcome, MessageKind, Page, ProviderRef},
};
use tocsin_runtime::clock::Clock;
use tokio_util::sync::CancellationToken;

use crate::{
    config::{NotifierConfig, RetryConfig},
    events::NotifierMetrics,
    guard::backoff,
    incident::{Incidents, Now},
    lanes::{Lanes, Turn},
    providers::{self, Found, Lookup, Outgoing, Provider, Registry, SendError},
    receipts,
    record::{About, Arrival, Record, Shown, State},
    records::{self, Records, Stored, WriteError},
    templates::{Context, EventView, IncidentView, PageView, Templates, Times, TocsinView},
};

/// Added to every lease beyond the time its work may take.
const LEASE_MARGIN: Duration = Duration::from_secs(10);

/// What the caller does with the bus message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Finish {
    Ack,
    /// Hand it back, to come again after this long.
    Later(Duration),
}

impl Finish {
    /// The sooner of two.
    pub(crate) fn and(self, other: Finish) -> Finish {
        match (self, other) {
            (Finish::Ack, x) | (x, Finish::Ack) => x,
            (Finish::Later(a), Finish::Later(b)) => Finish::Later(a.min(b)),
        }
    }
}

/// A message to deliver once.
#[derive(Debug, Clone)]
pub(crate) struct Job {
    /// The delivery id (page id, or `upd:status_update:<seq>:<record>`).
    pub(crate) id: String,
    pub(crate) about: About,
    pub(crate) page: Option<Page>,
    /// For a status update: the message it answers.
    pub(crate) reference: Option<ProviderRef>,
    /// The incident as the bus message has it (used when INCIDENTS has
    /// no entry for it).
    pub(crate) snapshot: IncidentSummary,
    pub(crate) actor: Option<String>,
    pub(crate) note: Option<String>,
    pub(crate) at: Timestamp,
}

impl Job {
    pub(crate) fn page(page: Page) -> Job {
        let target = target_name(&page.target);
        Job {
            id: page.id.clone(),
            about: About {
                incident: page.incident.id,
                number: page.incident.number,
                kind: page.kind,
                channel: page.channel,
                target,
                address: page.address.clone(),
            },
            reference: None,
            snapshot: page.incident.clone(),
            actor: None,
            note: None,
            at: page.due_at,
            page: Some(page),
        }
    }
}

/// `alice`, `#ops`, `payments`, `teams`.
pub(crate) fn target_name(t: &tocsin_proto::notify::PageTarget) -> String {
    use tocsin_proto::notify::PageTarget;
    match t {
        PageTarget::User { name, .. } => name.clone(),
        PageTarget::SlackChannel { channel } => channel.clone(),
        PageTarget::PagerdutyService { service } => service.clone(),
        PageTarget::Webhook { name } => name.clone(),
    }
}

/// One lock per incident, so this replica brings an incident's messages
/// up to date one change at a time (other replicas are kept in line by
/// the records' revisions).
#[derive(Default)]
struct Locks(Mutex<HashMap<uuid::Uuid, Arc<tokio::sync::Mutex<()>>>>);

impl Locks {
    async fn lock(&self, id: uuid::Uuid) -> (tokio::sync::OwnedMutexGuard<()>, LockEntry<'_>) {
        let m = {
            let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
            map.entry(id).or_default().clone()
        };
        (m.lock_owned().await, LockEntry(self, id))
    }
}

/// Removes the incident's lock when nobody else waits on it.
struct LockEntry<'a>(&'a Locks, uuid::Uuid);

impl Drop for LockEntry<'_> {
    fn drop(&mut self) {
        let mut map = self.0 .0.lock().unwrap_or_else(|e| e.into_inner());
        if map.get(&self.1).is_some_and(|m| Arc::strong_count(m) <= 2) {
            map.remove(&self.1);
        }
    }
}

pub(crate) struct Deliverer {
    pub(crate) templates: Templates,
    pub(crate) registry: Registry,
    pub(crate) lanes: Lanes,
    pub(crate) records: Records,
    pub(crate) incidents: Incidents,
    pub(crate) metrics: NotifierMetrics,
    pub(crate) clock: Arc<dyn Clock>,
    pub(crate) js: jetstream::Context,
    /// This replica, as record owners name it.
    pub(crate) me: String,
    retry: RetryConfig,
    incident_url: Option<String>,
    status_page: Option<String>,
    reply_to: Option<String>,
    times: Times,
    locks: Locks,
    working: Working,
    finished: Finished,
    /// Follow-up syncs spawned after a page was sent.
    pub(crate) tasks: tokio_util::task::TaskTracker,
    receipts: receipts::Receipts,
}

/// The deliveries this replica is working on (by record key): a second
/// copy of a page that arrives meanwhile (the page published again, or in
/// another NOTIFY message) waits for the first to finish and then finds
/// its record, rather than racing it to the provider. Across replicas the
/// records' revisions decide, and for providers that drop repeats the
/// provider does (see [`Provider::drops_repeats`]).
#[derive(Default)]
struct Working(Mutex<HashSet<String>>);

impl Working {
    /// `None` when `key` is being delivered here already.
    fn start(&self, key: &str) -> Option<WorkingOn<'_>> {
        let mut set = self.0.lock().unwrap_or_else(|e| e.into_inner());
        set.insert(key.to_string())
            .then(|| WorkingOn(self, key.to_string()))
    }
}

/// Pages this replica finished (their outcome recorded, their receipt
/// stored) in a burst's message it handed back, the newest
/// [`Finished::KEPT`] by record key. Such a message comes back whole, once
/// for each wait of its other pages; the pages of it already done here are
/// then acknowledged at once, not read from their records and receipted
/// again each time. A replica that did not send them (the message went to
/// another, or this one restarted) reads their records as before.
#[derive(Default)]
struct Finished(Mutex<(HashSet<String>, VecDeque<String>)>);

impl Finished {
    /// 64 full messages' pages, about 100 bytes each; one forgotten is
    /// read from its record when it comes back, as any other.
    const KEPT: usize = 4096;

    fn contains(&self, key: &str) -> bool {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .0
            .contains(key)
    }

    fn insert(&self, key: &str) {
        let mut g = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let (set, order) = &mut *g;
        if set.insert(key.to_string()) {
            order.push_back(key.to_string());
            while order.len() > Self::KEPT {
                if let Some(old) = order.pop_front() {
                    set.remove(&old);
                }
            }
        }
    }
}

/// Takes the delivery off [`Working`] when it is done (or abandoned).
struct WorkingOn<'a>(&'a Working, String);

impl Drop for WorkingOn<'_> {
    fn drop(&mut self) {
        let mut set = self.0 .0.lock().unwrap_or_else(|e| e.into_inner());
        set.remove(&self.1);
    }
}

impl Deliverer {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        cfg: &NotifierConfig,
        templates: Templates,
        registry: Registry,
        records: Records,
        metrics: NotifierMetrics,
        clock: Arc<dyn Clock>,
        js: jetstream::Context,
        api_prefix: &str,
    ) -> Result<Deliverer, Vec<String>> {
        let zone = cfg.zone().map_err(|e| vec![e])?;
        let reply_to = cfg
            .sms_reply_to
            .clone()
            .or_else(|| registry.sms_from.clone());
        let receipts = receipts::Receipts::start(js.clone(), clock.clone());
        Ok(Deliverer {
            templates,
            lanes: Lanes::new(cfg, metrics.clone()),
            registry,
            records,
            incidents: Incidents::new(js.clone(), api_prefix),
            metrics,
            clock,
            me: uuid::Uuid::new_v4().simple().to_string(),
            js,
            retry: cfg.retry,
            incident_url: cfg.incident_url.clone(),
            status_page: cfg.status_page_url.clone(),
            reply_to,
            times: Times { zone },
            locks: Locks::default(),
            working: Working::default(),
            finished: Finished::default(),
            tasks: tokio_util::task::TaskTracker::new(),
            receipts,
        })
    }

    fn give_up_after(&self) -> Duration {
        self.retry.give_up_after.get()
    }

    #[allow(clippy::too_many_arguments)]
    fn context(
        &self,
        inc: &IncidentSummary,
        alerts: &[tocsin_proto::incident::AlertInfo],
        kind: MessageKind,
        page: PageView,
        actor: Option<String>,
        note: Option<String>,
        at: Timestamp,
    ) -> Context {
        let resolved = inc.status == IncidentStatus::Resolved;
        Context {
            incident: IncidentView::new(inc, alerts, self.incident_url.as_deref(), &self.times),
            page,
            event: EventView {
                kind: kind.as_str().into(),
                actor,
                at: self.times.long(at),
                note,
                // A resolved incident promises no further update.
                next_update: if kind == MessageKind::StatusUpdate && !resolved {
                    at.checked_add(SignedDuration::from_mins(30))
                        .ok()
                        .map(|t| self.times.short(t))
                } else {
                    None
                },
            },
            tocsin: TocsinView {
                status_page: self.status_page.clone(),
                reply_to: self.reply_to.clone(),
            },
        }
    }

    fn page_view(&self, job: &Job) -> PageView {
        match &job.page {
            Some(p) => PageView {
                level: p.level + 1,
                repeat: p.repeat,
                reason: p.reason.clone(),
                target: job.about.target.clone(),
                address: job.about.address.clone(),
            },
            None => PageView {
                level: 0,
                repeat: 0,
                reason: String::new(),
                target: job.about.target.clone(),
                address: String::new(),
            },
        }
    }

    /// The message as it would be sent with `summary` (and `alerts`).
    fn outgoing(
        &self,
        job: &Job,
        summary: &IncidentSummary,
        alerts: &[tocsin_proto::incident::AlertInfo],
    ) -> Outgoing {
        let ctx = self.context(
            summary,
            alerts,
            job.about.kind,
            self.page_view(job),
            job.actor.clone(),
            job.note.clone(),
            job.at,
        );
        Outgoing {
            id: job.id.clone(),
            kind: job.about.kind,
            channel: job.about.channel,
            incident: summary.clone(),
            address: job.about.address.clone(),
            target: job.about.target.clone(),
            reference: job.reference.clone(),
            page: job.page.clone(),
            ctx,
        }
    }

    fn jitter(max_ms: u64) -> Duration {
        Duration::from_millis(rand::random::<u64>() % max_ms.max(1))
    }

    /// Writes `rec` before a wait (a claim) or a request (in flight). On
    /// failure the provider's probe is given back and `Err` holds what the
    /// attempt returns: `None` after a conflict (decide again), else later.
    async fn write_first(
        &self,
        key: &str,
        rec: &Record,
        rev: Option<u64>,
        probe: bool,
        provider: &str,
    ) -> Result<u64, Option<Finish>> {
        self.records.write(key, rec, rev).await.map_err(|e| {
            if probe {
                self.lanes.release_probe(provider);
            }
            match e {
                WriteError::Conflict => None,
                WriteError::Failed(e) => {
                    tracing::warn!(error = %e, "cannot record a claim or an attempt; later");
                    Some(Finish::Later(Duration::from_secs(1)))
                }
            }
        })
    }

    /// Waits until `until` on the clock (false: shutting down).
    async fn wait(&self, until: Timestamp, shutdown: &CancellationToken) -> bool {
        loop {
            if self.clock.now() >= until {
                return true;
            }
            tokio::select! {
                _ = shutdown.cancelled() => return false,
                _ = self.clock.wait(Some(until)) => {}
            }
        }
    }

    /// Why a page that waited should no longer be sent: nobody is woken
    /// for an incident that is over.
    fn stale(job: &Job, now: &IncidentSummary) -> Option<String> {
        let page = job.page.as_ref()?;
        let n = now.number;
        if now.status == IncidentStatus::Resolved {
            return Some(format!(
                "incident #{n} was resolved before this page could be sent"
            ));
        }
        if let Some(why) = &now.suppressed {
            return Some(format!("incident #{n} pages nobody now ({why})"));
        }
        if now.status == IncidentStatus::Acknowledged && page.kind == MessageKind::Page {
            let by = now
                .acknowledged_by
                .as_ref()
                .map(|a| format!(" by {}", a.name))
                .unwrap_or_default();
            return Some(format!(
                "incident #{n} was acknowledged{by} before this page could be sent"
            ));
        }
        None
    }

    /// The receipt of a final record.
    fn receipt(id: &str, rec: &Record) -> Delivery {
        let (outcome, detail, provider) = match &rec.state {
            State::Sent { provider, .. } => (
                DeliveryOutcome::Sent,
                if rec.attempts > 1 {
                    format!("after {} attempts", rec.attempts)
                } else {
                    String::new()
                },
                Some(provider.clone()),
            ),
            State::Failed { reason } => (DeliveryOutcome::Failed, reason.clone(), None),
            State::GaveUp { reason } => (DeliveryOutcome::GaveUp, reason.clone(), None),
            State::Skipped { reason } => (DeliveryOutcome::Skipped, reason.clone(), None),
            _ => (DeliveryOutcome::GaveUp, rec.last_error.clone(), None),
        };
        Delivery {
            id: id.to_string(),
            kind: rec.about.kind,
            channel: rec.about.channel,
            target: rec.about.target.clone(),
            outcome,
            attempts: rec.attempts,
            detail,
            provider,
        }
    }

    /// Publishes a final record's receipt (idempotent: its id is stable).
    async fn publish_receipt(
        &self,
        id: &str,
        rec: &Record,
        shutdown: &CancellationToken,
    ) -> Finish {
        let receipt = Self::receipt(id, rec);
        if self
            .receipts
            .publish(rec.about.incident, &receipt, shutdown)
            .await
        {
            Finish::Ack
        } else {
            Finish::Later(Duration::from_secs(1))
        }
    }

    /// Writes a final record (whatever else happened to it meanwhile: our
    /// outcome is what the provider told us) and publishes its receipt.
    async fn finish(
        &self,
        job: &Job,
        out: Option<&Outgoing>,
        key: &str,
        mut rec: Record,
        mut rev: Option<u64>,
        shutdown: &CancellationToken,
    ) -> Finish {
        let mut backoff = tocsin_runtime::retry::Backoff::standard();
        loop {
            match self.records.write(key, &rec, rev).await {
                Ok(_) => break,
                Err(WriteError::Conflict) => match self.records.get(key).await {
                    Ok(Some(other)) if other.record.is_final() => {
                        tracing::warn!(delivery = %job.id, theirs = ?other.record.state, ours = ?rec.state,
                            "another replica recorded this message's outcome too");
                        rec = other.record;
                        break;
                    }
                    Ok(other) => rev = other.map(|o| o.revision),
                    Err(e) => tracing::warn!(error = %e, "cannot read a delivery record; retrying"),
                },
                Err(WriteError::Failed(e)) => {
                    tracing::warn!(error = %e, delivery = %job.id, "cannot record a delivery outcome; retrying");
                    if !backoff.wait(shutdown).await {
                        return Finish::Later(Duration::from_secs(1));
                    }
                }
            }
        }
        let receipt = Self::receipt(&job.id, &rec);
        let fallback;
        let out = match out {
            Some(o) => o,
            None => {
                fallback = self.outgoing(job, &job.snapshot, &[]);
                &fallback
            }
        };
        self.metrics.outcome(
            out,
            receipt.outcome,
            &receipt.detail,
            rec.attempts,
            self.clock.now(),
        );
        self.publish_receipt(&job.id, &rec, shutdown).await
    }

    /// Delivers `job` once.
    pub(crate) async fn deliver(
        self: &Arc<Self>,
        job: &Job,
        shutdown: &CancellationToken,
    ) -> Finish {
        let key = records::key(&job.about.incident, &job.id);
        if self.finished.contains(&key) {
            self.metrics.done_here(job.about.channel.as_str());
            return Finish::Ack;
        }
        let Some(_working) = self.working.start(&key) else {
            self.metrics.handed_back(job.about.channel.as_str(), "busy");
            return Finish::Later(Duration::from_millis(500) + Self::jitter(500));
        };
        // A few rounds: each conflict means another replica moved the
        // record on, and the next round decides again from what it wrote.
        for _ in 0..5 {
            match self.attempt(job, &key, shutdown).await {
                Some(f) => return f,
                None => continue,
            }
        }
        self.metrics.handed_back(job.about.channel.as_str(), "busy");
        Finish::Later(Duration::from_millis(500) + Self::jitter(500))
    }

    /// The jobs of `keys` were acknowledged ([`Self::deliver`] gave
    /// [`Finish::Ack`]: their final record is written and their receipt
    /// stored) in a message that goes back to the bus for its other pages:
    /// when it comes back here they are acknowledged at once.
    pub(crate) fn finished_in_handed_back(&self, keys: impl IntoIterator<Item = String>) {
        for k in keys {
            self.finished.insert(&k);
        }
    }

    /// One round; `None` after a conflict (decide again).
    async fn attempt(
        self: &Arc<Self>,
        job: &Job,
        key: &str,
        shutdown: &CancellationToken,
    ) -> Option<Finish> {
        let channel = job.about.channel.as_str();
        let now = self.clock.now();
        let stored = match self.records.get(key).await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read a delivery record; later");
                return Some(Finish::Later(Duration::from_secs(1)));
            }
        };
        let doubt = match Record::arrival(
            stored.as_ref().map(|s| &s.record),
            now,
            self.give_up_after(),
        ) {
            Arrival::Done => {
                let s = stored.expect("a final record exists");
                return Some(self.publish_receipt(&job.id, &s.record, shutdown).await);
            }
            Arrival::Busy(d) => {
                self.metrics.handed_back(channel, "busy");
                return Some(Finish::Later(
                    // Not the whole lease: the holder usually finishes well before it.
                    d.clamp(Duration::from_millis(200), Duration::from_secs(3)) + Self::jitter(300),
                ));
            }
            Arrival::GiveUp(state) => {
                let s = stored.expect("a record to give up on");
                let mut rec = s.record;
                rec.state = state;
                return Some(
                    self.finish(job, None, key, rec, Some(s.revision), shutdown)
                        .await,
                );
            }
            Arrival::Go { doubt } => doubt,
        };
        let mut rev = stored.as_ref().map(|s| s.revision);
        let mut rec = stored
            .map(|s| s.record)
            .unwrap_or_else(|| Record::new(job.about.clone(), now));

        let provider: Arc<dyn Provider> =
            match self.registry.get(job.about.channel, &job.about.target) {
                Found::Provider(p) => p.clone(),
                Found::Missing(why) => {
                    rec.failed(why);
                    return Some(self.finish(job, None, key, rec, rev, shutdown).await);
                }
            };
        let dest = provider.destination(
            job.reference.as_ref(),
            &job.about.target,
            &job.about.address,
        );
        let (at, probe, held) = match self.lanes.turn(provider.name(), &dest, &*self.clock).await {
            Turn::BreakerOpen(d) => {
                self.metrics.handed_back(channel, "breaker");
                return Some(Finish::Later(d + Self::jitter(500)));
            }
            Turn::TooFar(d) => {
                self.metrics.handed_back(channel, "rate_limit");
                // Back a little before the turn would come, to queue again.
                let back = d
                    .saturating_sub(Duration::from_secs(1))
                    .max(Duration::from_millis(200));
                return Some(Finish::Later(back + Self::jitter(200)));
            }
            Turn::At { at, probe, held } => (at, probe, held),
        };
        let lookups = if doubt.is_some() {
            1 + providers::slack::LOOKUP_PAGES as u32
        } else {
            1
        };
        let lease = |from: Timestamp, extra: Duration| {
            from.checked_add(
                SignedDuration::try_from(extra + provider.timeout() * lookups + LEASE_MARGIN)
                    .unwrap_or_default(),
            )
            .unwrap_or(from)
        };

        // Claimed before any wait: a copy of this message redelivered to
        // another replica meanwhile finds it held, and waits. A turn given
        // for "now" is the clock's time when it was booked, after the `now`
        // above: compared with that, every page would wait and write a claim
        // (a synced write) for nothing.
        let now = self.clock.now();
        if at > now {
            let wait = Duration::try_from(at.duration_since(now)).unwrap_or_default();
            rec.hold(&self.me, lease(now, wait));
            match self
                .write_first(key, &rec, rev, probe, provider.name())
                .await
            {
                Ok(r) => rev = Some(r),
                Err(f) => return f,
            }
            if !self.wait(at, shutdown).await {
                return Some(Finish::Later(Duration::from_secs(1)));
            }
        }
        drop(held);

        // The incident right before sending: nothing that changed while
        // the page waited is missed, and the message shows it as it is.
        let current: Option<Now> = match self.incidents.now(job.about.incident).await {
            Ok(n) => n,
            Err(e) => {
                tracing::debug!(error = %e, "cannot read the incident; sending what the page carries");
                None
            }
        };
        let (summary, version) = match &current {
            // The page's copy is the newer when alert changes of the
            // incident were stored after its last entry on its own
            // subjects, in a message of several (`LogEntry::is_packed`):
            // its status is the same, its alerts have moved on.
            Some(n) if n.summary.revision < job.snapshot.revision => {
                (job.snapshot.clone(), n.version)
            }
            Some(n) => (n.summary.clone(), n.version),
            None => (job.snapshot.clone(), 0),
        };
        if let Some(why) = Self::stale(job, &summary) {
            if probe {
                self.lanes.release_probe(provider.name());
            }
            rec.skipped(why);
            let out = self.outgoing(job, &summary, &[]);
            return Some(self.finish(job, Some(&out), key, rec, rev, shutdown).await);
        }
        let alerts =
            if matches!(job.about.kind, MessageKind::Page | MessageKind::Reminder) && version > 0 {
                self.incidents
                    .alerts(job.about.incident, version, summary.revision)
                    .await
            } else {
                Vec::new()
            };
        let out = self.outgoing(job, &summary, &alerts);
        let rendered = match provider.render(&self.templates, &out) {
            Ok(r) => r,
            Err(e) => {
                if probe {
                    self.lanes.release_probe(provider.name());
                }
                rec.failed(e);
                return Some(self.finish(job, Some(&out), key, rec, rev, shutdown).await);
            }
        };

        // At most `concurrency` requests in flight per destination: the
        // slot is held for the request only, not for the records and the
        // receipt around it.
        let slots = self.lanes.slots(provider.name(), &dest);
        let slot = tokio::select! {
            _ = shutdown.cancelled() => return Some(Finish::Later(Duration::from_secs(1))),
            s = slots.acquire_owned() => s.ok(),
        };

        // On record before the request leaves (its answer may be lost:
        // the next attempt then asks the provider whether it arrived).
        // A provider that drops repeats itself needs only the outcome
        // recorded: a request sent again is dropped there.
        let sent_at = self.clock.now();
        rec.in_flight(&self.me, sent_at, lease(sent_at, Duration::ZERO));
        if !provider.drops_repeats() {
            match self
                .write_first(key, &rec, rev, probe, provider.name())
                .await
            {
                Ok(r) => rev = Some(r),
                Err(f) => return f,
            }
        }

        let started = std::time::Instant::now();
        let result = match doubt {
            None => provider.send(&out, &rendered).await,
            Some(since) => match provider.find_sent(&out, &rendered, since).await {
                Lookup::Found(r) => {
                    self.metrics.lookup(&out, "found", "");
                    Ok(r)
                }
                Lookup::NotFound => {
                    self.metrics.lookup(&out, "not_found", "");
                    rec.doubt_cleared();
                    provider.send(&out, &rendered).await
                }
                Lookup::NotPossible => {
                    rec.doubt_cleared();
                    provider.send(&out, &rendered).await
                }
                Lookup::Undecided(why) => {
                    self.metrics.lookup(&out, "undecided", &why);
                    rec.doubt_cleared();
                    provider.send(&out, &rendered).await
                }
                Lookup::Unreachable(e) => {
                    self.metrics.lookup(&out, "unreachable", e.reason());
                    self.lanes
                        .failure(provider.name(), &dest, self.clock.now(), None, false)
                        .await;
                    rec.lookup_failed(e.reason().to_string());
                    let _ = self.records.write(key, &rec, rev).await;
                    let delay = backoff(&self.retry, rec.attempts.max(1), None);
                    self.metrics.handed_back(channel, "retry");
                    return Some(Finish::Later(delay));
                }
            },
        };
        drop(slot);
        self.metrics
            .request(channel, started.elapsed().as_secs_f64());
        match &result {
            Ok(_) | Err(SendError::Permanent { .. }) => self.lanes.success(provider.name()),
            Err(SendError::Retry {
                retry_after,
                rate_limited,
                ..
            }) => {
                self.lanes
                    .failure(
                        provider.name(),
                        &dest,
                        self.clock.now(),
                        *retry_after,
                        *rate_limited,
                    )
                    .await
            }
        }
        match result {
            Ok(pref) => {
                let shown = Shown {
                    status: summary.status,
                    version,
                    by: summary.acknowledged_by.as_ref().map(|a| a.name.clone()),
                };
                let sent = (pref.clone(), shown.clone());
                rec.sent_as(pref, Some(shown));
                let f = self.finish(job, Some(&out), key, rec, rev, shutdown).await;
                // The incident may have changed while the page was on its
                // way: bring the message up to date (the change's own sync
                // may have run before this record said "sent"), unless
                // nothing can change it (one read of INCIDENTS less a page).
                if version > 0
                    && matches!(job.about.kind, MessageKind::Page | MessageKind::Reminder)
                    && provider.may_update(&sent.0)
                {
                    self.follow_up(job.about.incident, provider, sent, shutdown);
                }
                Some(f)
            }
            Err(SendError::Permanent { reason }) => {
                rec.failed(reason);
                Some(self.finish(job, Some(&out), key, rec, rev, shutdown).await)
            }
            Err(SendError::Retry {
                reason,
                retry_after,
                maybe_arrived,
                ..
            }) => {
                self.metrics.retry(&out, rec.attempts, &reason);
                rec.retry_later(reason, maybe_arrived);
                if let Err(e) = self.records.write(key, &rec, rev).await {
                    tracing::warn!(error = ?e, "cannot record a failed attempt");
                }
                self.metrics.handed_back(channel, "retry");
                Some(Finish::Later(backoff(
                    &self.retry,
                    rec.attempts,
                    retry_after,
                )))
            }
        }
    }

    /// After a page went out (`sent`: as what, showing what): if the
    /// incident has moved on so that the message would be updated, bring
    /// its messages up to date (in the background; bounded retries — the
    /// change's own sync retries too, through its bus message). Most later
    /// entries are receipts (`paged`, `delivery`) that change nothing the
    /// message shows: then nothing more is read.
    fn follow_up(
        self: &Arc<Self>,
        incident: uuid::Uuid,
        provider: Arc<dyn Provider>,
        sent: (ProviderRef, Shown),
        shutdown: &CancellationToken,
    ) {
        let (d, stop) = (self.clone(), shutdown.clone());
        self.tasks.spawn(async move {
            let (pref, shown) = sent;
            for _ in 0..10 {
                // Nothing after the version sent: nothing to bring up to
                // date (the usual case, read without the entry itself).
                if let Ok(false) = d.incidents.moved_since(incident, shown.version).await {
                    return;
                }
                match d.incidents.now(incident).await {
                    Ok(Some(n))
                        if n.version > shown.version
                            && provider.update(&pref, &shown, &n.summary).is_some() => {}
                    Ok(_) => return,
                    Err(_) => {}
                }
                match d.sync(incident, &Hint::default(), &stop).await {
                    Ok(()) => return,
                    Err(delay) => tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tokio::time::sleep(delay) => {}
                    },
                }
            }
        });
    }
}

/// The hint a change event gives a sync: who did it.
#[derive(Debug, Clone, Default)]
pub(crate) struct Hint {
    pub(crate) actor: Option<String>,
}

impl Deliverer {
    /// Brings every message sent for `incident` to the incident's state
    /// now. `Err(delay)`: something must be tried again later.
    pub(crate) async fn sync(
        &self,
        incident: uuid::Uuid,
        hint: &Hint,
        shutdown: &CancellationToken,
    ) -> Result<(), Duration> {
        let (_guard, _entry) = self.locks.lock(incident).await;
        let now = match self.incidents.now(incident).await {
            Ok(Some(n)) => n,
            Ok(None) => return Ok(()),
            Err(e) => {
                tracing::warn!(error = %e, "cannot read an incident to update its messages; later");
                return Err(Duration::from_secs(1));
            }
        };
        let stored = self.records.of_incident(&incident).await.map_err(|e| {
            tracing::warn!(error = %e, "cannot list the messages sent for an incident; later");
            Duration::from_secs(1)
        })?;
        let sent: Vec<Stored> = stored
            .into_iter()
            .filter(|s| {
                matches!(
                    s.record.about.kind,
                    MessageKind::Page | MessageKind::Reminder
                ) && s.record.sent().is_some()
            })
            .collect();
        if sent.is_empty() {
            return Ok(());
        }
        // Each message on its own: a slow channel does not hold the others.
        let results = futures::future::join_all(
            sent.into_iter()
                .map(|s| self.sync_one(s, now.clone(), hint, shutdown)),
        )
        .await;
        // The soonest retry any message asked for.
        match results.into_iter().filter_map(Result::err).min() {
            Some(d) => Err(d),
            None => Ok(()),
        }
    }

    async fn sync_one(
        &self,
        mut stored: Stored,
        mut now: Now,
        hint: &Hint,
        shutdown: &CancellationToken,
    ) -> Result<(), Duration> {
        let about = stored.record.about.clone();
        let provider: Arc<dyn Provider> = match self.registry.get(about.channel, &about.target) {
            Found::Provider(p) => p.clone(),
            Found::Missing(_) => return Ok(()),
        };
        for _ in 0..8 {
            let Some((pref, shown)) = stored.record.sent() else {
                return Ok(());
            };
            let (pref, shown) = (
                pref.clone(),
                shown.cloned().unwrap_or(Shown {
                    status: IncidentStatus::Triggered,
                    version: 0,
                    by: None,
                }),
            );
            if shown.version >= now.version {
                return Ok(());
            }
            let Some(kind) = provider.update(&pref, &shown, &now.summary) else {
                return Ok(());
            };
            debug_assert!(
                provider.may_update(&pref),
                "{} updated a message it says it never updates",
                provider.name()
            );
            let job = Job {
                id: format!("upd:{}:{}:{}", kind.as_str(), now.version, stored.key),
                about: About {
                    kind,
                    ..about.clone()
                },
                page: None,
                reference: Some(pref.clone()),
                snapshot: now.summary.clone(),
                actor: match kind {
                    MessageKind::Acknowledged => {
                        now.summary.acknowledged_by.as_ref().map(|a| a.name.clone())
                    }
                    _ => hint.actor.clone(),
                },
                note: None,
                at: self.clock.now(),
            };
            let out = self.outgoing(&job, &now.summary, &[]);
            let dest = provider.destination(out.reference.as_ref(), &out.target, &out.address);
            let probe = match self.lanes.turn(provider.name(), &dest, &*self.clock).await {
                Turn::BreakerOpen(d) | Turn::TooFar(d) => {
                    self.metrics
                        .handed_back(about.channel.as_str(), "rate_limit");
                    return Err(d.max(Duration::from_millis(200)));
                }
                Turn::At { at, probe, held } => {
                    if !self.wait(at, shutdown).await {
                        return Err(Duration::from_secs(1));
                    }
                    drop(held);
                    probe
                }
            };
            let rendered = match provider.render(&self.templates, &out) {
                Ok(r) => r,
                Err(e) => {
                    if probe {
                        self.lanes.release_probe(provider.name());
                    }
                    self.metrics.update(&out, "failed", &e);
                    return Ok(());
                }
            };
            let slots = self.lanes.slots(provider.name(), &dest);
            let _slot = slots.acquire_owned().await.ok();
            let started = std::time::Instant::now();
            let result = provider.send(&out, &rendered).await;
            self.metrics
                .request(about.channel.as_str(), started.elapsed().as_secs_f64());
            let shown_now = match &result {
                Ok(_) => {
                    self.lanes.success(provider.name());
                    self.metrics.update(&out, "sent", "");
                    let status = providers::status_after(kind).unwrap_or(shown.status);
                    Shown {
                        status,
                        version: if status == now.summary.status {
                            now.version
                        } else {
                            shown.version
                        },
                        by: now.summary.acknowledged_by.as_ref().map(|a| a.name.clone()),
                    }
                }
                Err(SendError::Permanent { reason }) => {
                    // It cannot be changed (deleted, too old to edit): stop
                    // trying, and say so on the timeline.
                    self.lanes.success(provider.name());
                    self.metrics.update(&out, "failed", reason);
                    Shown {
                        version: now.version,
                        ..shown.clone()
                    }
                }
                Err(SendError::Retry {
                    reason,
                    retry_after,
                    rate_limited,
                    ..
                }) => {
                    self.lanes
                        .failure(
                            provider.name(),
                            &dest,
                            self.clock.now(),
                            *retry_after,
                            *rate_limited,
                        )
                        .await;
                    self.metrics.update(&out, "retry", reason);
                    return Err(backoff(&self.retry, 1, *retry_after));
                }
            };
            let receipt = Delivery {
                id: out.id.clone(),
                kind,
                channel: about.channel,
                target: about.target.clone(),
                outcome: if result.is_ok() {
                    DeliveryOutcome::Sent
                } else {
                    DeliveryOutcome::Failed
                },
                attempts: 1,
                detail: result
                    .as_ref()
                    .err()
                    .map(|e| e.reason().to_string())
                    .unwrap_or_default(),
                provider: result.as_ref().ok().cloned(),
            };
            let mut rec = stored.record.clone();
            rec.state = State::Sent {
                provider: pref.clone(),
                shown: Some(shown_now),
            };
            match self
                .records
                .write(&stored.key, &rec, Some(stored.revision))
                .await
            {
                Ok(r) => {
                    stored.record = rec;
                    stored.revision = r;
                }
                Err(WriteError::Conflict) => {
                    // Another replica updated it meanwhile: read what it
                    // did and check again below.
                    match self.records.get(&stored.key).await {
                        Ok(Some(s)) => stored = s,
                        _ => return Err(Duration::from_millis(500)),
                    }
                }
                Err(WriteError::Failed(e)) => {
                    tracing::warn!(error = %e, "cannot record a message update; later");
                    return Err(Duration::from_secs(1));
                }
            }
            if !self
                .receipts
                .publish(about.incident, &receipt, shutdown)
                .await
            {
                return Err(Duration::from_secs(1));
            }
            // The incident may have moved while the update was on its way.
            match self.incidents.now(about.incident).await {
                Ok(Some(n)) => now = n,
                Ok(None) => return Ok(()),
                Err(_) => return Err(Duration::from_secs(1)),
            }
        }
        Ok(())
    }

    /// Status updates (a note) in the thread of every message sent for
    /// the incident that takes them.
    pub(crate) async fn status_updates(
        self: &Arc<Self>,
        incident: &IncidentSummary,
        seq: u64,
        note: String,
        actor: Option<String>,
        at: Timestamp,
        shutdown: &CancellationToken,
    ) -> Finish {
        let stored = match self.records.of_incident(&incident.id).await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "cannot list the messages sent for an incident; later");
                return Finish::Later(Duration::from_secs(1));
            }
        };
        let mut jobs = Vec::new();
        for s in stored {
            if !matches!(
                s.record.about.kind,
                MessageKind::Page | MessageKind::Reminder
            ) {
                continue;
            }
            let Some((pref, _)) = s.record.sent() else {
                continue;
            };
            let Found::Provider(p) = self
                .registry
                .get(s.record.about.channel, &s.record.about.target)
            else {
                continue;
            };
            if !p.takes_status_updates(pref) {
                continue;
            }
            let address = match pref {
                ProviderRef::Email { to, .. } => to.clone(),
                _ => s.record.about.address.clone(),
            };
            jobs.push(Job {
                id: format!("upd:status_update:{seq}:{}", s.key),
                about: About {
                    kind: MessageKind::StatusUpdate,
                    address,
                    ..s.record.about.clone()
                },
                page: None,
                reference: Some(pref.clone()),
                snapshot: incident.clone(),
                actor: actor.clone(),
                note: Some(note.clone()),
                at,
            });
        }
        let results =
            futures::future::join_all(jobs.iter().map(|j| self.deliver(j, shutdown))).await;
        results.into_iter().fold(Finish::Ack, Finish::and)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finished_deliveries_are_kept_newest_first_within_the_bound() {
        let f = Finished::default();
        for i in 0..Finished::KEPT + 10 {
            f.insert(&format!("k{i}"));
        }
        // The same key twice takes one place.
        f.insert(&format!("k{}", Finished::KEPT + 9));
        {
            let g = f.0.lock().unwrap();
            assert_eq!((g.0.len(), g.1.len()), (Finished::KEPT, Finished::KEPT));
        }
        assert!(!f.contains("k9"), "the oldest went first");
        assert!(f.contains("k10"));
        assert!(f.contains(&format!("k{}", Finished::KEPT + 9)));
    }
}
