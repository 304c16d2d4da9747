//! The escalation loop: follow INCIDENTS, fire due steps on the clock,
//! publish pages (NOTIFY) and timeline records (COMMANDS), save.

use std::{path::Path, sync::Arc, time::Duration};

use async_nats::jetstream::{self, consumer::pull};
use futures::StreamExt;
use jiff::Timestamp;
use prometheus_client::metrics::{
    counter::Counter,
    family::Family,
    gauge::Gauge,
    histogram::{exponential_buckets, Histogram},
};
use tocsin_proto::{
    codec::{self, decode_envelope},
    incident::LogEntry,
    subjects::STREAM_INCIDENTS,
    Envelope,
};
use tocsin_runtime::admin::{labels, Health, Labels, Metrics};
use tocsin_runtime::clock::Clock;
use tocsin_runtime::{progress::Watermark, streams};
use tokio_util::sync::CancellationToken;

use crate::{
    plan::Planner,
    store::Store,
    track::{Effect, Key, Tracks},
    EscalationError,
};

/// Registered once per process (a service that loses its lease and takes
/// it again reuses them).
#[derive(Clone)]
pub(crate) struct EscalationMetrics {
    pages: Family<Labels, Counter>,
    tracks: Gauge,
    lateness: Histogram,
}

impl EscalationMetrics {
    pub(crate) fn register(m: &Metrics) -> Self {
        let s = EscalationMetrics {
            pages: Family::default(),
            tracks: Gauge::default(),
            lateness: Histogram::new(exponential_buckets(0.001, 2.0, 16)),
        };
        m.register(
            "tocsin_escalation_pages",
            "Pages published to NOTIFY, by channel",
            s.pages.clone(),
        );
        m.register(
            "tocsin_escalation_tracks",
            "Incidents (per policy) with escalation pending or paused",
            s.tracks.clone(),
        );
        m.register(
            "tocsin_escalation_timer_lateness_seconds",
            "How late a due escalation step fired",
            s.lateness.clone(),
        );
        s
    }
}

/// A read-only view of the tracks for queries, updated on every save.
pub(crate) type SharedTracks =
    Arc<std::sync::RwLock<std::collections::BTreeMap<Key, crate::track::Track>>>;

/// Due steps fired (and their messages pipelined) at a time.
const FIRE_CHUNK: usize = 128;

pub(crate) struct Service {
    planner: Arc<Planner>,
    pub(crate) shared: SharedTracks,
    tracks: Tracks,
    seq: u64,
    store: Store,
    js: jetstream::Context,
    clock: Arc<dyn Clock>,
    metrics: EscalationMetrics,
}

fn open_store(dir: &Path) -> Result<(Store, Tracks, u64), EscalationError> {
    match Store::open(dir).and_then(|s| s.load().map(|(t, q)| (s, t, q))) {
        Ok(x) => Ok(x),
        Err(e) => {
            tracing::warn!(dir = %dir.display(), error = %e, "escalation store unreadable; rebuilding it from the INCIDENTS stream");
            Store::wipe(dir);
            let s = Store::open(dir)
                .map_err(|e| EscalationError::Store(format!("{}: {e}", dir.display())))?;
            Ok((s, Tracks::default(), 0))
        }
    }
}

impl Service {
    pub(crate) fn new(
        planner: Arc<Planner>,
        dir: &Path,
        js: jetstream::Context,
        clock: Arc<dyn Clock>,
        metrics: EscalationMetrics,
    ) -> Result<Self, EscalationError> {
        let (store, tracks, seq) = open_store(dir)?;
        let shared: SharedTracks = Arc::new(std::sync::RwLock::new(tracks.map.clone()));
        Ok(Service {
            planner,
            shared,
            tracks,
            seq,
            store,
            js,
            clock,
            metrics,
        })
    }

    fn save(&self, changed: &[Key]) {
        if let Err(e) = self.store.save(&self.tracks, changed, self.seq) {
            tracing::error!(error = %e, "cannot save escalation state; it will be rebuilt from the stream on restart");
        }
        let mut shared = self.shared.write().unwrap_or_else(|e| e.into_inner());
        for k in changed {
            match self.tracks.map.get(k) {
                Some(t) => shared.insert(k.clone(), t.clone()),
                None => shared.remove(k),
            };
        }
        self.metrics.tracks.set(self.tracks.map.len() as i64);
    }

    fn apply(&mut self, payload: &[u8], seq: u64) -> Vec<Key> {
        if seq <= self.seq {
            return Vec::new();
        }
        self.seq = seq;
        match decode_envelope::<LogEntry>(payload) {
            Ok(Envelope {
                body: LogEntry::Incident(ev),
                ..
            }) => self.tracks.on_event(&self.planner, &ev),
            Ok(_) => Vec::new(),
            Err(e) => {
                tracing::error!(seq, error = %e, "undecodable INCIDENTS entry skipped");
                Vec::new()
            }
        }
    }

    async fn consumer(&self) -> Result<pull::Ordered, String> {
        streams::read_from(&self.js, STREAM_INCIDENTS, self.seq + 1).await
    }

    async fn last_seq(&self) -> Result<u64, String> {
        streams::last_sequence(&self.js, STREAM_INCIDENTS).await
    }

    /// Applies every INCIDENTS entry up to the stream's end as of now.
    async fn drain(&mut self, msgs: &mut pull::Ordered) -> Result<(), String> {
        let last = self.last_seq().await?;
        let mut changed = Vec::new();
        while self.seq < last {
            let msg = match tokio::time::timeout(Duration::from_secs(5), msgs.next()).await {
                Ok(Some(Ok(m))) => m,
                Ok(Some(Err(e))) => return Err(e.to_string()),
                Ok(None) => return Err("INCIDENTS consumer ended".into()),
                Err(_) => return Err("INCIDENTS stalled".into()),
            };
            let seq = msg.info().map_err(|e| e.to_string())?.stream_sequence;
            changed.extend(self.apply(&msg.payload, seq));
        }
        self.save(&changed);
        Ok(())
    }

    pub(crate) async fn run(
        mut self,
        health: &Health,
        shutdown: CancellationToken,
        watermark: Watermark,
    ) -> Result<(), EscalationError> {
        'outer: while !shutdown.is_cancelled() {
            let mut msgs = match self.consumer().await {
                Ok(m) => m,
                Err(e) => {
                    tracing::debug!(error = %e, "INCIDENTS not available yet; retrying");
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = tokio::time::sleep(Duration::from_millis(250)) => continue,
                    }
                }
            };
            // Catch up before any timer fires: a step due during an outage
            // must see the acknowledgement that came before it.
            if let Err(e) = self.drain(&mut msgs).await {
                tracing::warn!(error = %e, "cannot catch up with INCIDENTS; retrying");
                continue;
            }
            health.set_ok("escalation");
            loop {
                // Everything read is applied and every step due before
                // `due` has fired (its pages acknowledged by JetStream).
                let due = self.tracks.next_due();
                watermark.report(&[(STREAM_INCIDENTS, self.seq)], due);
                tokio::select! {
                    biased;
                    _ = shutdown.cancelled() => break 'outer,
                    // Timers before new entries: under a steady stream of
                    // entries the timer arm would otherwise never win, and
                    // no step would fire until the stream went quiet. A due
                    // step first takes in every entry stored so far (drain).
                    _ = self.clock.wait(due) => {
                        if let Err(e) = self.drain(&mut msgs).await {
                            tracing::warn!(error = %e, "cannot read INCIDENTS before firing; retrying");
                            continue 'outer;
                        }
                        if !self.fire_due(&mut msgs, &shutdown).await {
                            break 'outer;
                        }
                    }
                    m = msgs.next() => match m {
                        Some(Ok(msg)) => {
                            let seq = msg.info().map(|i| i.stream_sequence).unwrap_or(0);
                            let changed = self.apply(&msg.payload, seq);
                            self.save(&changed);
                        }
                        Some(Err(e)) => tracing::warn!(error = %e, "INCIDENTS consumer error"),
                        None => continue 'outer,
                    },
                }
            }
        }
        self.store.flush().await;
        tracing::info!("escalation service stopped");
        Ok(())
    }

    /// Fires every due track. Effects are published before the track is
    /// saved: a crash in between fires the step again with the same page
    /// ids, which JetStream (and the notifier's delivery records) drop.
    async fn fire_due(&mut self, msgs: &mut pull::Ordered, shutdown: &CancellationToken) -> bool {
        let now = self.clock.now();
        let mut drained_at = std::time::Instant::now();
        // Steps are fired a chunk at a time: the chunk's messages are all
        // sent before any ack is awaited (each ack waits for an fsync), then
        // the chunk's tracks are saved. A crash in between fires them again
        // with the same ids. The chunk stays far below async-nats's 5,000
        // in-flight publishes, which ingest shares in `tocsin up`.
        let due = self.tracks.due(now);
        for chunk in due.chunks(FIRE_CHUNK) {
            // A long burst takes seconds: take in acknowledgements that came
            // meanwhile, so a step is not fired for an incident acknowledged
            // after the burst began.
            if drained_at.elapsed() > Duration::from_millis(250) {
                if let Err(e) = self.drain(msgs).await {
                    tracing::warn!(error = %e, "cannot read INCIDENTS during a burst");
                }
                drained_at = std::time::Instant::now();
            }
            let mut effects = Vec::new();
            for key in chunk {
                let due = self.tracks.map.get(key).and_then(|t| t.due());
                effects.extend(self.tracks.fire(&self.planner, key, now));
                if let Some(d) = due {
                    // Measured when the step fires, not when the burst
                    // began: earlier steps of a burst are part of the delay.
                    let late = self.clock.now().duration_since(d);
                    self.metrics.lateness.observe(late.as_secs_f64().max(0.0));
                }
            }
            if !self.publish_all(&effects, now, shutdown).await {
                return false;
            }
            self.save(chunk);
        }
        true
    }

    /// Sends every effect, then awaits the acks; any that failed is sent
    /// again on its own until it succeeds (or the service stops).
    async fn publish_all(
        &self,
        effects: &[Effect],
        now: Timestamp,
        shutdown: &CancellationToken,
    ) -> bool {
        let mut pending = Vec::with_capacity(effects.len());
        let mut retry = Vec::new();
        for effect in effects {
            match self.send(effect, now).await {
                Some(ack) => pending.push((effect, ack)),
                None => retry.push(effect),
            }
        }
        for (effect, ack) in pending {
            match ack.await {
                Ok(ack) => self.count(effect, ack.duplicate),
                Err(e) => {
                    tracing::warn!(error = %e, "publish not acknowledged; retrying");
                    retry.push(effect);
                }
            }
        }
        for effect in retry {
            if !self.publish(effect, now, shutdown).await {
                return false;
            }
        }
        true
    }

    /// One attempt to send an effect; the ack future on success.
    async fn send(
        &self,
        effect: &Effect,
        now: Timestamp,
    ) -> Option<jetstream::context::PublishAckFuture> {
        let (subject, id, payload) = encode_effect(effect, now)?;
        let publish = tocsin_runtime::bus::message(payload, id, None, &[]);
        match self.js.send_publish(subject, publish).await {
            Ok(ack) => Some(ack),
            Err(e) => {
                tracing::warn!(error = %e, "cannot publish; retrying");
                None
            }
        }
    }

    fn count(&self, effect: &Effect, duplicate: bool) {
        if let Effect::Page(p) = effect {
            if !duplicate {
                self.metrics
                    .pages
                    .get_or_create(&labels(&[("channel", p.channel.as_str())]))
                    .inc();
                tracing::info!(page = %p.id, incident = p.incident.number, channel = p.channel.as_str(), "page sent to NOTIFY");
            }
        }
    }

    /// Sends one effect until JetStream acknowledges it (or the service stops).
    async fn publish(&self, effect: &Effect, now: Timestamp, shutdown: &CancellationToken) -> bool {
        let mut delay = Duration::from_millis(100);
        loop {
            let Some((subject, _, _)) = encode_effect(effect, now) else {
                return true; // logged; retrying cannot help
            };
            if let Some(ack) = self.send(effect, now).await {
                match ack.await {
                    Ok(ack) => {
                        self.count(effect, ack.duplicate);
                        return true;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, subject, "publish not acknowledged; retrying")
                    }
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => return false,
                _ = tokio::time::sleep(delay) => {}
            }
            delay = (delay * 2).min(Duration::from_secs(2));
        }
    }
}

/// Subject, message id and payload of an effect (None if it cannot be
/// encoded, which is logged: plain data always encodes).
fn encode_effect(effect: &Effect, now: Timestamp) -> Option<(String, String, Vec<u8>)> {
    let encoded = match effect {
        Effect::Page(p) => (
            p.subject(),
            p.id.clone(),
            codec::encode(&Envelope::new("escalation", now, p.as_ref().clone())),
        ),
        Effect::Record(c) => (
            c.subject(),
            c.id.clone(),
            codec::encode(&Envelope::new("escalation", now, c.as_ref().clone())),
        ),
    };
    match encoded {
        (subject, id, Ok(payload)) => Some((subject, id, payload)),
        (_, _, Err(e)) => {
            tracing::error!(error = %e, "cannot encode an escalation message");
            None
        }
    }
}
