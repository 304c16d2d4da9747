//! The escalation loop: follow INCIDENTS, fire due steps on the clock,
//! publish pages (NOTIFY) and timeline records (COMMANDS), save.

use std::{path::Path, sync::Arc, time::Duration};

use async_nats::jetstream::{self, consumer::pull};
use futures::StreamExt;
use jiff::Timestamp;
use tocsin_proto::{
    codec::{self, decode_envelope},
    incident::LogEntry,
    subjects::STREAM_INCIDENTS,
    Envelope,
};
use tocsin_runtime::admin::Health;
use tocsin_runtime::clock::Clock;
use tocsin_runtime::{progress::Watermark, streams};
use tokio_util::sync::CancellationToken;

use crate::{
    events::{EscalationEvent, EscalationMetrics},
    plan::Planner,
    store::Store,
    track::{Effect, Key, Tracks},
    EscalationError,
};

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
    tocsin_runtime::store::open_or_rebuild(dir, "escalation store", |d| {
        Store::open(d).and_then(|s| s.load().map(|(t, q)| (s, t, q)))
    })
    .map_err(|e| EscalationError::Store(format!("{}: {e}", dir.display())))
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
            EscalationEvent::SaveFailed {
                error: &e.to_string(),
            }
            .emit(&self.metrics);
        }
        let mut shared = self.shared.write().unwrap_or_else(|e| e.into_inner());
        for k in changed {
            match self.tracks.map.get(k) {
                Some(t) => shared.insert(k.clone(), t.clone()),
                None => shared.remove(k),
            };
        }
        EscalationEvent::Tracks {
            count: self.tracks.map.len(),
        }
        .emit(&self.metrics);
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
                EscalationEvent::Undecodable {
                    seq,
                    error: &e.to_string(),
                }
                .emit(&self.metrics);
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
        let mut reconnect = tocsin_runtime::retry::Backoff::standard();
        'outer: while !shutdown.is_cancelled() {
            let mut msgs = match self.consumer().await {
                Ok(m) => m,
                Err(e) => {
                    tracing::debug!(error = %e, "INCIDENTS not available yet; retrying");
                    if !reconnect.wait(&shutdown).await {
                        break;
                    }
                    continue;
                }
            };
            reconnect.reset();
            // Catch up before any timer fires: a step due during an outage
            // must see the acknowledgement that came before it.
            if let Err(e) = self.drain(&mut msgs).await {
                EscalationEvent::ReadFailed {
                    during: "catch-up",
                    error: &e,
                }
                .emit(&self.metrics);
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
                            EscalationEvent::ReadFailed { during: "before firing", error: &e }.emit(&self.metrics);
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
                    EscalationEvent::ReadFailed {
                        during: "a burst",
                        error: &e,
                    }
                    .emit(&self.metrics);
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
                    EscalationEvent::Fired {
                        late_seconds: late.as_secs_f64(),
                    }
                    .emit(&self.metrics);
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
                    EscalationEvent::PublishFailed {
                        subject: &effect_subject(effect),
                        error: &e.to_string(),
                    }
                    .emit(&self.metrics);
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
                EscalationEvent::PublishFailed {
                    subject: &effect_subject(effect),
                    error: &e.to_string(),
                }
                .emit(&self.metrics);
                None
            }
        }
    }

    fn count(&self, effect: &Effect, duplicate: bool) {
        if let Effect::Page(p) = effect {
            if !duplicate {
                EscalationEvent::PageSent {
                    page: &p.id,
                    incident: p.incident.number,
                    channel: p.channel.as_str(),
                }
                .emit(&self.metrics);
            }
        }
    }

    /// Sends one effect until JetStream acknowledges it (or the service stops).
    async fn publish(&self, effect: &Effect, now: Timestamp, shutdown: &CancellationToken) -> bool {
        let mut backoff = tocsin_runtime::retry::Backoff::standard();
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
                    Err(e) => EscalationEvent::PublishFailed {
                        subject: &subject,
                        error: &e.to_string(),
                    }
                    .emit(&self.metrics),
                }
            }
            if !backoff.wait(shutdown).await {
                return false;
            }
        }
    }
}

/// Subject, message id and payload of an effect (None if it cannot be
/// encoded, which is logged: plain data always encodes).
fn effect_subject(effect: &Effect) -> String {
    match effect {
        Effect::Page(p) => p.subject(),
        Effect::Record(c) => c.subject(),
    }
}

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
