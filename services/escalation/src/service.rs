//! The escalation loop: follow INCIDENTS, fire due steps on the clock,
//! publish pages (NOTIFY) and timeline records (COMMANDS), save.

use std::{collections::HashSet, path::Path, sync::Arc, time::Duration};

use async_nats::jetstream::{self, consumer::pull};
use futures::{FutureExt as _, StreamExt};
use jiff::Timestamp;
use tocsin_proto::{
    codec::{self, decode_entries},
    command::{batch_subject, Command},
    incident::LogEntry,
    notify::Page,
    subjects::{
        headers, is_tenure_marker, notify_batch_subject, NOTIFY_TENURE, STREAM_INCIDENTS,
        STREAM_NOTIFY,
    },
    Envelope,
};
use tocsin_runtime::admin::{Health, Watchdog};
use tocsin_runtime::clock::Clock;
use tocsin_runtime::fence::{self, Ack, Fence};
use tocsin_runtime::{progress::Watermark, streams};
use tokio_util::sync::CancellationToken;

use crate::{
    events::{EscalationEvent, EscalationMetrics},
    plan::Planner,
    store::{self, Store},
    track::{Effect, Key, Tracks},
    EscalationError,
};

/// Due steps fired (and their messages pipelined) at a time.
const FIRE_CHUNK: usize = 1024;
/// Most threads reading a chunk's tracks from the store at once.
const READ_THREADS: usize = 4;

/// A chunk's pages sent, their acks not yet awaited
/// ([`Service::send_all`], [`Service::finish`]).
struct InFlight {
    /// The chunk's due steps, saved once every message is acknowledged.
    keys: Vec<Key>,
    effects: Vec<Effect>,
    /// Each message's effects (places in `effects`) and its ack.
    pending: Vec<(Vec<usize>, Ack)>,
    /// Effects whose message could not be sent: sent again one at a time.
    retry: Vec<usize>,
    /// The chunk's timeline records (places in `effects`), sent once every
    /// page of the chunk is stored: an instance following INCIDENTS takes
    /// a `paged` record as "these pages were sent" and will not send them.
    records: Vec<usize>,
    now: Timestamp,
}

/// A chunk's tracks being written to the store on a blocking thread while
/// a burst fires the next chunk ([`Service::save_behind`]).
struct Saving {
    /// The keys written, and the entries applied the cursor covers: both
    /// go back to `unsaved` if the write fails.
    keys: Vec<Key>,
    entries: usize,
    task: tokio::task::JoinHandle<Result<(), store::StoreError>>,
}

/// Why [`Service::drain`] stopped short.
enum DrainError {
    /// Reading INCIDENTS failed: read again.
    Read(String),
    /// The store cannot be read: the service cannot go on.
    Store(EscalationError),
    /// The stream is behind the stored cursor (a new or reset NATS): the
    /// tracks were dropped; read again from the stream's start.
    StartedOver,
}

/// INCIDENTS entries applied at most between two saves while catching up
/// (bounds the tracks held in memory at once), and entries the stored
/// cursor may lag behind when none of them changed a track.
const SAVE_EVERY: usize = 1024;

pub(crate) struct Service {
    planner: Arc<Planner>,
    /// The due-time index of every track; the tracks of the incidents being
    /// handled (the rest are in `store`).
    tracks: Tracks,
    /// Keys changed and not saved yet (a save failed): saved with the next
    /// change, and their tracks stay at hand until then.
    unsaved: Vec<Key>,
    seq: u64,
    /// Entries applied since the cursor was last stored (a message of
    /// several receipts counts as that many).
    unsaved_entries: usize,
    /// The tracks (queries read them through a clone).
    pub(crate) store: Store,
    js: jetstream::Context,
    clock: Arc<dyn Clock>,
    metrics: EscalationMetrics,
    /// Marks each read and write of the store (see `Watchdog`).
    watchdog: Watchdog,
    /// This tenure's fence on NOTIFY: a page is stored only while its
    /// tenure's marker is the last one there (see
    /// `tocsin_runtime::fence`); None outside a lease.
    fence: std::sync::Mutex<Option<Fence>>,
    /// Set when the tracks started over from the stream's start (see
    /// `start_over_if_behind`): the reader must start there too.
    started_over: bool,
    /// A burst's chunk being saved behind the next one, if any.
    saving: Option<Saving>,
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
        watchdog: Watchdog,
    ) -> Result<Self, EscalationError> {
        let (store, tracks, seq) = open_store(dir)?;
        Ok(Service {
            planner,
            tracks,
            unsaved: Vec::new(),
            seq,
            unsaved_entries: 0,
            store,
            js,
            clock,
            metrics,
            watchdog,
            fence: std::sync::Mutex::new(None),
            started_over: false,
            saving: None,
        })
    }

    /// Saves the changed tracks with the INCIDENTS cursor, then lets the
    /// tracks at hand go (if the save failed they stay, and are saved with
    /// the next change).
    ///
    /// With nothing changed nothing is written until the stored cursor is
    /// [`SAVE_EVERY`] entries behind: the entries after it, read again
    /// after a restart, change nothing again, and a restart reads at most
    /// about that many of them again (a backlog of receipts, which change
    /// no track, made a restart read 150,000 entries again: 5 s).
    fn save(&mut self, changed: &[Key]) {
        self.unsaved.extend_from_slice(changed);
        if self.unsaved.is_empty() {
            self.tracks.release();
            if self.unsaved_entries < SAVE_EVERY {
                return;
            }
        }
        let saving = std::time::Instant::now();
        let saved = self
            .watchdog
            .during("saving tracks to the local store", || {
                self.store.save(&self.tracks, &self.unsaved, self.seq)
            });
        self.metrics.busy("save", saving.elapsed());
        match saved {
            Ok(()) => {
                self.unsaved.clear();
                self.unsaved_entries = 0;
                self.tracks.release();
            }
            Err(e) => EscalationEvent::SaveFailed {
                error: &e.to_string(),
            }
            .emit(&self.metrics),
        }
        EscalationEvent::Tracks {
            count: self.tracks.count(),
        }
        .emit(&self.metrics);
    }

    /// Like [`Service::save`], for a burst, but keeps the tracks at hand
    /// (some are fired and not yet saved: the next chunk's, whose acks are
    /// not all in). The tracks are encoded now and written on a blocking
    /// thread while the loop fires the next chunk (the write is a chunk's
    /// thousand sled inserts, a quarter of a burst's time when the loop
    /// made them itself). The save before it, if any, is awaited first, so
    /// saves land in order; every other use of the store or release of the
    /// tracks at hand comes after [`Service::saved`].
    ///
    /// The keys of the save before it, once it landed (None if there was
    /// none or it failed).
    async fn save_behind(&mut self, changed: &[Key]) -> Option<Vec<Key>> {
        let before = self.saved().await;
        self.unsaved.extend_from_slice(changed);
        if self.unsaved.is_empty() && self.unsaved_entries < SAVE_EVERY {
            return before;
        }
        let encoding = std::time::Instant::now();
        let batch = Store::batch(&self.tracks, &self.unsaved, self.seq);
        self.metrics.busy("save", encoding.elapsed());
        let store = self.store.clone();
        let busy = self.watchdog.busy("saving tracks to the local store");
        let task = tokio::task::spawn_blocking(move || {
            let _busy = busy;
            store.apply(batch)
        });
        self.saving = Some(Saving {
            keys: std::mem::take(&mut self.unsaved),
            entries: std::mem::take(&mut self.unsaved_entries),
            task,
        });
        before
    }

    /// Awaits the save [`Service::save_behind`] started, if any; if it
    /// failed, its keys are saved with the next change (their tracks stay
    /// at hand until then). The keys saved, if it landed.
    async fn saved(&mut self) -> Option<Vec<Key>> {
        let saving = self.saving.take()?;
        let waiting = std::time::Instant::now();
        let written = saving.task.await;
        self.metrics.busy("save", waiting.elapsed());
        let error = match written {
            Ok(Ok(())) => return Some(saving.keys),
            Ok(Err(e)) => e.to_string(),
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(e) => format!("the save stopped: {e}"),
        };
        EscalationEvent::SaveFailed { error: &error }.emit(&self.metrics);
        self.unsaved.extend(saving.keys);
        self.unsaved_entries += saving.entries;
        None
    }

    /// Puts `incident`'s stored tracks at hand, if they are not yet.
    fn fetch(&mut self, incident: uuid::Uuid) -> Result<(), EscalationError> {
        if !self.tracks.is_loaded(incident) {
            let stored = self
                .watchdog
                .during("reading tracks from the local store", || {
                    self.store.tracks_of(incident)
                })
                .map_err(|e| {
                    EscalationError::Store(format!("cannot read the tracks of {incident}: {e}"))
                })?;
            self.tracks.load(incident, stored);
        }
        Ok(())
    }

    /// [`Service::fetch`] for many incidents: those whose tracks are not at
    /// hand are read ([`read_tracks`]) and put at hand.
    async fn fetch_many(&mut self, incidents: &[uuid::Uuid]) -> Result<(), EscalationError> {
        let incidents = self.not_at_hand(incidents);
        if incidents.is_empty() {
            return Ok(());
        }
        let _busy = self.watchdog.busy("reading tracks from the local store");
        let read = read_tracks(self.store.clone(), incidents).await?;
        self.put_at_hand(read);
        Ok(())
    }

    /// Those of `incidents` whose tracks are not at hand.
    fn not_at_hand(&self, incidents: &[uuid::Uuid]) -> Vec<uuid::Uuid> {
        incidents
            .iter()
            .copied()
            .filter(|id| !self.tracks.is_loaded(*id))
            .collect()
    }

    /// Tracks read from the store put at hand (those of an incident already
    /// at hand are not: what is at hand may have changed since it was
    /// stored).
    fn put_at_hand(&mut self, read: ReadTracks) {
        for (incident, tracks) in read {
            self.tracks.load(incident, tracks);
        }
    }

    /// This tenure's fence, if taken.
    fn fence(&self) -> Option<Fence> {
        self.fence.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Takes this tenure's fence on NOTIFY (its marker: found, or written
    /// after the last one), trying until it is taken; false if the service
    /// stopped first. From its marker on, no page an earlier tenure sent is
    /// stored, however late it reaches the server.
    async fn take_fence(&self, shutdown: &CancellationToken) -> bool {
        let mut backoff = tocsin_runtime::retry::Backoff::standard();
        for tried in 1.. {
            match self.try_take_fence().await {
                Ok(()) => return true,
                // At start-up NATS, or the stream, may not be there yet.
                Err(e) if tried <= 5 => {
                    tracing::debug!(error = %e, "cannot take this tenure's fence on NOTIFY yet; retrying")
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot take this tenure's fence on NOTIFY yet; retrying")
                }
            }
            if !backoff.wait(shutdown).await {
                break;
            }
        }
        false
    }

    async fn try_take_fence(&self) -> Result<(), fence::FenceError> {
        let taken = fence::take(&self.js, STREAM_NOTIFY, NOTIFY_TENURE).await?;
        let mut held = self.fence.lock().unwrap_or_else(|e| e.into_inner());
        if *held != taken {
            if let Some(f) = &taken {
                tracing::info!(
                    term = f.term,
                    marker = f.seq,
                    "took this tenure's fence on NOTIFY"
                );
            }
            *held = taken;
        }
        Ok(())
    }

    /// Applies one INCIDENTS message at stream sequence `seq`: the keys of
    /// the tracks it changed, and how many entries it held.
    fn apply(
        &mut self,
        subject: &str,
        payload: &[u8],
        seq: u64,
    ) -> Result<(Vec<Key>, usize), EscalationError> {
        // The incidents lease's tenure markers are not entries: read past.
        if seq <= self.seq || is_tenure_marker(subject) {
            if seq > self.seq {
                self.unsaved_entries += 1;
            }
            self.seq = self.seq.max(seq);
            return Ok((Vec::new(), 1));
        }
        let before = self.unsaved_entries;
        // A message of several entries (receipts) gives each in order.
        let changed = match decode_entries(subject, payload) {
            Ok(Envelope { body, .. }) => {
                self.unsaved_entries += body.len();
                let mut changed = Vec::new();
                for entry in body {
                    if let LogEntry::Incident(ev) = entry {
                        self.fetch(ev.incident.id)?;
                        changed.extend(self.tracks.on_event(&self.planner, &ev));
                    }
                }
                changed.sort_unstable();
                changed.dedup();
                changed
            }
            Err(e) => {
                self.unsaved_entries += 1;
                EscalationEvent::Undecodable {
                    seq,
                    error: &e.to_string(),
                }
                .emit(&self.metrics);
                Vec::new()
            }
        };
        self.seq = seq;
        Ok((changed, self.unsaved_entries - before))
    }

    async fn consumer(&self) -> Result<pull::Ordered, String> {
        streams::read_from(&self.js, STREAM_INCIDENTS, self.seq + 1).await
    }

    async fn last_seq(&self) -> Result<u64, String> {
        streams::last_sequence(&self.js, STREAM_INCIDENTS).await
    }

    /// One round of a standby's following (see `crate::follow`): applies
    /// every INCIDENTS entry up to the stream's end as of now and saves
    /// the tracks, reading with `reading` (made when None, dropped on a
    /// failure to be made again). Returns the sequence applied up to.
    pub(crate) async fn follow(
        &mut self,
        reading: &mut Option<pull::Ordered>,
    ) -> Result<u64, String> {
        let msgs = match reading {
            Some(m) => m,
            None => reading.insert(self.consumer().await?),
        };
        match self.drain(msgs).await {
            Ok(()) => Ok(self.seq),
            Err(DrainError::Read(e)) => {
                *reading = None;
                Err(e)
            }
            Err(DrainError::Store(e)) => {
                *reading = None;
                Err(e.to_string())
            }
            Err(DrainError::StartedOver) => {
                *reading = None;
                Ok(self.seq)
            }
        }
    }

    /// When the stream is behind the stored cursor (a new NATS, or one
    /// whose streams were reset), the stream is the record: the tracks and
    /// the store start over empty, so no step of an incident the stream
    /// does not hold fires, and its entries are read from its start.
    fn start_over_if_behind(&mut self, last: u64) -> Result<(), DrainError> {
        if self.seq <= last {
            return Ok(());
        }
        tracing::warn!(
            stored = self.seq,
            stream = last,
            "the stored tracks are ahead of the INCIDENTS stream; starting over from the stream"
        );
        self.watchdog
            .during("clearing the local store", || self.store.clear())
            .map_err(|e| DrainError::Store(EscalationError::Store(e.to_string())))?;
        self.tracks = Tracks::default();
        self.unsaved.clear();
        self.seq = 0;
        self.unsaved_entries = 0;
        self.started_over = true;
        Err(DrainError::StartedOver)
    }

    /// Applies every INCIDENTS entry up to the stream's end as of now, and
    /// saves what changed.
    async fn drain(&mut self, msgs: &mut pull::Ordered) -> Result<(), DrainError> {
        self.drain_then(msgs, true).await
    }

    /// [`Service::drain`]; with `save` false the tracks the entries changed
    /// are left unsaved (at hand, in `unsaved`) for the firing that comes
    /// next to save with its own ([`Service::fire_due`]): one save a turn,
    /// not two. A read that fails half way saves what was applied.
    async fn drain_then(&mut self, msgs: &mut pull::Ordered, save: bool) -> Result<(), DrainError> {
        let asking = std::time::Instant::now();
        let last = self.last_seq().await;
        self.metrics.busy("info", asking.elapsed());
        let last = last.map_err(DrainError::Read)?;
        self.start_over_if_behind(last)?;
        // Summed here and counted once: a catch-up reads many entries.
        let (mut reading, mut applying) = (Duration::ZERO, Duration::ZERO);
        let mut changed = Vec::new();
        let mut applied = 0usize;
        let result = loop {
            if self.seq >= last {
                break Ok(());
            }
            let started = std::time::Instant::now();
            let msg = tokio::time::timeout(Duration::from_secs(5), msgs.next()).await;
            reading += started.elapsed();
            let started = std::time::Instant::now();
            let msg = match msg {
                Ok(Some(Ok(m))) => m,
                Ok(Some(Err(e))) => break Err(DrainError::Read(e.to_string())),
                Ok(None) => break Err(DrainError::Read("INCIDENTS consumer ended".into())),
                Err(_) => break Err(DrainError::Read("INCIDENTS stalled".into())),
            };
            let seq = match msg.info() {
                Ok(info) => info.stream_sequence,
                Err(e) => break Err(DrainError::Read(e.to_string())),
            };
            // A long catch-up (a cold start reads the whole stream) saves
            // as it goes, so it holds a bounded number of tracks at once. A
            // message of several entries (receipts, each loading its
            // incident's tracks) counts as that many.
            let done = self.apply(&msg.subject, &msg.payload, seq);
            applying += started.elapsed();
            match done {
                Ok((c, entries)) => {
                    changed.extend(c);
                    applied += entries;
                }
                Err(e) => break Err(DrainError::Store(e)),
            }
            if applied >= SAVE_EVERY {
                self.save(&changed);
                changed.clear();
                applied = 0;
            }
        };
        self.metrics.busy("read", reading);
        self.metrics.busy("apply", applying);
        // What was applied is saved, also when reading stopped half way.
        if save || result.is_err() {
            self.save(&changed);
        } else {
            self.unsaved.extend(changed);
        }
        result
    }

    /// [`Service::drain`]'s errors turned into what the loop does next:
    /// Ok(false) to read again (a read failure, reported), Err to stop (the
    /// store cannot be read).
    fn drained(
        &self,
        result: Result<(), DrainError>,
        during: &'static str,
    ) -> Result<bool, EscalationError> {
        match result {
            Ok(()) => Ok(true),
            Err(DrainError::Read(e)) => {
                EscalationEvent::ReadFailed { during, error: &e }.emit(&self.metrics);
                Ok(false)
            }
            Err(DrainError::Store(e)) => Err(e),
            Err(DrainError::StartedOver) => Ok(false),
        }
    }

    pub(crate) async fn run(
        mut self,
        health: &Health,
        shutdown: CancellationToken,
        watermark: Watermark,
    ) -> Result<(), EscalationError> {
        // The fence first: from its marker on, no page an earlier tenure
        // sent is stored (it may still be on its way), and what this
        // tenure decides follows from everything read after it.
        if !self.take_fence(&shutdown).await {
            return Ok(());
        }
        let mut reconnect = tocsin_runtime::retry::Backoff::standard();
        'outer: while !shutdown.is_cancelled() {
            self.started_over = false;
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
            let drained = self.drain(&mut msgs).await;
            if !self.drained(drained, "catch-up")? {
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
                        // Saved with what fires (see `fire_due`).
                        let drained = self.drain_then(&mut msgs, false).await;
                        if !self.drained(drained, "before firing")? {
                            continue 'outer;
                        }
                        if !self.fire_due(&mut msgs, &shutdown).await? {
                            break 'outer;
                        }
                        if self.started_over {
                            continue 'outer;
                        }
                    }
                    m = msgs.next() => match m {
                        Some(Ok(msg)) => {
                            // The entries already here are applied with it
                            // and saved once: a save per entry took a sixth
                            // of the loop's time at 1,000 new incidents a
                            // second (17,000 saves in 30 s).
                            let applying = std::time::Instant::now();
                            let mut changed = Vec::new();
                            let mut next = Some(msg);
                            let mut applied = 0usize;
                            let mut ended = false;
                            while let Some(msg) = next.take() {
                                let seq = msg.info().map(|i| i.stream_sequence).unwrap_or(0);
                                let (c, entries) = self.apply(&msg.subject, &msg.payload, seq)?;
                                changed.extend(c);
                                applied += entries;
                                if applied >= SAVE_EVERY {
                                    break;
                                }
                                match msgs.next().now_or_never() {
                                    Some(Some(Ok(m))) => next = Some(m),
                                    Some(Some(Err(e))) => {
                                        tracing::warn!(error = %e, "INCIDENTS consumer error")
                                    }
                                    Some(None) => ended = true,
                                    None => {}
                                }
                            }
                            self.metrics.busy("apply", applying.elapsed());
                            self.save(&changed);
                            if ended {
                                continue 'outer;
                            }
                        }
                        Some(Err(e)) => tracing::warn!(error = %e, "INCIDENTS consumer error"),
                        None => continue 'outer,
                    },
                }
            }
        }
        self.saved().await;
        self.store.flush().await;
        tracing::info!("escalation service stopped");
        Ok(())
    }

    /// Fires every due track. Pages are published, then once they are
    /// stored the timeline records, then the track is saved: a crash before
    /// the records are stored fires the step again with the same page ids,
    /// which JetStream (and the notifier's delivery records) drop; after
    /// that, the records found on INCIDENTS at the restart mark the step
    /// fired (so does a standby taking over).
    ///
    /// Ok(false) if the service stopped meanwhile; Err if the store cannot
    /// be read.
    async fn fire_due(
        &mut self,
        msgs: &mut pull::Ordered,
        shutdown: &CancellationToken,
    ) -> Result<bool, EscalationError> {
        let now = self.clock.now();
        let mut drained_at = std::time::Instant::now();
        // Steps are fired a chunk at a time: the chunk's pages are all
        // sent, then the next chunk is read from the store and fired while
        // their acks come in (each waits for an fsync); once they are in,
        // the chunk's records are sent, and their acks come in while the
        // chunk after is fired; once those are in, its tracks are saved
        // (written on a blocking thread while the next chunk fires). A
        // crash before that fires them again with the same ids, unless the
        // records were stored. A record goes only after its own chunk's
        // pages are stored, so a standby taking a `paged` record as "sent"
        // is right; a chunk's records may be stored before an earlier
        // chunk's that failed and were sent again, which only orders two
        // incidents' timelines differently. Three chunks' messages (about
        // 20 each) stay far below async-nats's 5,000 in-flight publishes,
        // which ingest shares in `tocsin up`.
        let mut after = None;
        let mut on_its_way: Option<InFlight> = None;
        let mut recording: Option<InFlight> = None;
        // The next chunk's tracks, being read.
        let mut read_ahead: Option<tokio::task::JoinHandle<Result<ReadTracks, EscalationError>>> =
            None;
        loop {
            // A long burst takes seconds: take in acknowledgements that came
            // meanwhile, so a step is not fired for an incident acknowledged
            // after the burst began. (A step they make due at once, such as
            // an escalate-now, fires on the loop's next turn.) It first
            // finishes the chunks on their way: an entry applied must find
            // its tracks saved.
            let drain = drained_at.elapsed() > Duration::from_millis(250);
            if drain {
                if !self
                    .land(on_its_way.take(), recording.take(), shutdown)
                    .await
                {
                    return Ok(false);
                }
                // What is read ahead may be changed by the entries.
                read_ahead = None;
                let drained = self.drain(msgs).await;
                self.drained(drained, "a burst")?;
                if self.started_over {
                    // The tracks of this burst are gone with the old store.
                    break;
                }
                drained_at = std::time::Instant::now();
            }
            // The due steps a chunk at a time, from the index.
            let firing = std::time::Instant::now();
            let (chunk, next) = self.tracks.due_after(now, after.as_ref(), FIRE_CHUNK);
            // The tracks the entries read before firing changed are saved
            // with the chunk when it is the only one; before a burst of
            // several they are saved first: a chunk saved while the next
            // is on its way saves the cursor too, and must not pass an
            // entry whose track is saved only with that next chunk.
            if after.is_none() && next.is_some() {
                self.save(&[]);
            }
            if chunk.is_empty() {
                break;
            }
            if let Some(ahead) = read_ahead.take() {
                match ahead.await {
                    Ok(Ok(read)) => self.put_at_hand(read),
                    // Read again below, where a failure counts.
                    Ok(Err(_)) => {}
                    Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
                    Err(_) => {}
                }
            }
            let incidents: Vec<uuid::Uuid> = chunk.iter().map(|k| k.0).collect();
            self.fetch_many(&incidents).await?;
            // The next chunk's tracks are read while this one fires and
            // its acks come in (those fired again at once are at hand; a
            // step that comes due meanwhile is read when its chunk is).
            if let Some(c) = &next {
                let (ahead, _) = self.tracks.due_after(now, Some(c), FIRE_CHUNK);
                let ids = self.not_at_hand(&ahead.iter().map(|k| k.0).collect::<Vec<_>>());
                if !ids.is_empty() {
                    let store = self.store.clone();
                    let busy = self.watchdog.busy("reading tracks from the local store");
                    read_ahead = Some(tokio::spawn(async move {
                        let _busy = busy;
                        read_tracks(store, ids).await
                    }));
                }
            }
            self.metrics.busy("load", firing.elapsed());
            let firing = std::time::Instant::now();
            let mut effects = Vec::new();
            let mut started = Vec::new();
            for key in &chunk {
                let due = self.tracks.map.get(key).and_then(|t| t.due());
                effects.extend(self.tracks.fire(&self.planner, key, now, &mut started));
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
            // Tracks started in place of one whose policy is gone are
            // saved with the chunk.
            let mut chunk = chunk;
            chunk.extend(started);
            self.metrics.busy("fire", firing.elapsed());
            let firing = std::time::Instant::now();
            let sent = self.send_all(chunk, effects, now).await;
            self.metrics.busy("send", firing.elapsed());
            if let Some(mut before) = on_its_way.replace(sent) {
                if !self.pages_stored(&mut before, shutdown).await {
                    return Ok(false);
                }
                self.send_records(&mut before).await;
                if let Some(mut older) = recording.replace(before) {
                    if !self.records_stored(&mut older, shutdown).await {
                        return Ok(false);
                    }
                    // The two chunks after it are at hand, fired but not
                    // saved: they must stay so until their own acks are
                    // in. A step of two (fired again at once, a level with
                    // no delay) is saved with the later one.
                    let later: HashSet<&Key> = on_its_way
                        .iter()
                        .chain(recording.iter())
                        .flat_map(|s| &s.keys)
                        .collect();
                    let keys: Vec<Key> = older
                        .keys
                        .into_iter()
                        .filter(|k| !later.contains(k))
                        .collect();
                    self.unsaved.retain(|k| !later.contains(k));
                    if let Some(saved) = self.save_behind(&keys).await {
                        // The chunk before it is saved: its tracks go, but
                        // for those of an incident still on its way (the
                        // save just started took every unsaved key). A long
                        // burst holds four chunks' tracks at most (about
                        // 1.5 KiB each).
                        let keep: HashSet<uuid::Uuid> =
                            later.iter().copied().chain(&keys).map(|k| k.0).collect();
                        let go: HashSet<uuid::Uuid> = saved
                            .iter()
                            .map(|k| k.0)
                            .filter(|id| !keep.contains(id))
                            .collect();
                        self.tracks.release_incidents(&go, &saved);
                    }
                }
            }
            match next {
                Some(c) => after = Some(c),
                None => break,
            }
        }
        Ok(self.land(on_its_way, recording, shutdown).await)
    }

    /// Finishes the chunks on their way, if any (`recording`: the older,
    /// whose records are sent; `on_its_way`: the newer, whose pages are),
    /// saves their tracks and lets the tracks at hand go. False if the
    /// service stopped first.
    async fn land(
        &mut self,
        on_its_way: Option<InFlight>,
        recording: Option<InFlight>,
        shutdown: &CancellationToken,
    ) -> bool {
        self.saved().await;
        let mut keys = Vec::new();
        if let Some(mut older) = recording {
            if !self.records_stored(&mut older, shutdown).await {
                return false;
            }
            keys.extend(older.keys);
        }
        if let Some(mut sent) = on_its_way {
            if !self.finish(&mut sent, shutdown).await {
                return false;
            }
            keys.extend(sent.keys);
        }
        // With nothing fired: what the entries read before changed.
        self.save(&keys);
        true
    }

    /// Sends the pages of a chunk without awaiting the acks
    /// ([`Service::finish`] does, then sends the chunk's timeline records).
    /// The pages of a channel and the records of an action go together, as
    /// few messages as fit ([`batches`]): a burst costs one synced write per
    /// message, not one per page and record.
    async fn send_all(&self, keys: Vec<Key>, effects: Vec<Effect>, now: Timestamp) -> InFlight {
        let (records, mut pages): (Vec<usize>, Vec<usize>) =
            (0..effects.len()).partition(|i| matches!(effects[*i], Effect::Record(_)));
        page_order(&effects, &mut pages);
        let (pending, retry) = self.send_group(&effects, &pages, now).await;
        InFlight {
            keys,
            effects,
            pending,
            retry,
            records,
            now,
        }
    }

    /// Sends the effects `order` (places in `effects`) grouped into
    /// messages ([`batches`]); each message's effects with its ack, and
    /// the effects whose message could not be sent.
    async fn send_group(
        &self,
        effects: &[Effect],
        order: &[usize],
        now: Timestamp,
    ) -> (Vec<(Vec<usize>, Ack)>, Vec<usize>) {
        let mut pending = Vec::new();
        let mut retry = Vec::new();
        let refs: Vec<&Effect> = order.iter().map(|i| &effects[*i]).collect();
        // On a replicated NOTIFY a message of pages is acknowledged before
        // the next is sent: its leader refuses a fenced message while
        // another is in flight (`Fence::one_at_a_time`). Pages of the next
        // chunk are sent only after this returns, and timeline records
        // are not fenced.
        let one_at_a_time = self.fence().is_some_and(|f| f.one_at_a_time);
        // A message's effects are consecutive ones of `order`.
        let mut at = 0;
        for batch in batches(&refs) {
            let which = order[at..at + batch.len()].to_vec();
            at += batch.len();
            let sent = match batch.as_slice() {
                [one] => self.send(one, now).await,
                several => self.send_batch(several, now).await,
            };
            match sent {
                Some(ack) if one_at_a_time && matches!(batch[0], Effect::Page(_)) => {
                    pending.push((which, ack.wait().await))
                }
                Some(ack) => pending.push((which, ack)),
                None => retry.extend(which),
            }
        }
        (pending, retry)
    }

    /// Awaits the acks of the pages [`Service::send_all`] sent, then sends
    /// the chunk's records and awaits theirs; any effect whose message
    /// failed is sent again on its own until it succeeds. False if the
    /// service stopped first.
    async fn finish(&self, sent: &mut InFlight, shutdown: &CancellationToken) -> bool {
        if !self.pages_stored(sent, shutdown).await {
            return false;
        }
        self.send_records(sent).await;
        self.records_stored(sent, shutdown).await
    }

    /// Awaits the acks of the pages [`Service::send_all`] sent (any whose
    /// message failed is sent again on its own until it is stored). False
    /// if the service stopped first.
    async fn pages_stored(&self, sent: &mut InFlight, shutdown: &CancellationToken) -> bool {
        let pending = std::mem::take(&mut sent.pending);
        let retry = std::mem::take(&mut sent.retry);
        let waiting = std::time::Instant::now();
        let stored = self.settle(sent, pending, retry, shutdown).await;
        self.metrics.busy("pages", waiting.elapsed());
        stored
    }

    /// Sends the chunk's timeline records, once its pages are stored
    /// ([`Service::pages_stored`]); [`Service::records_stored`] awaits
    /// them.
    async fn send_records(&self, sent: &mut InFlight) {
        let sending = std::time::Instant::now();
        let records = std::mem::take(&mut sent.records);
        let (pending, retry) = self.send_group(&sent.effects, &records, sent.now).await;
        sent.pending = pending;
        sent.retry = retry;
        self.metrics.busy("records", sending.elapsed());
    }

    /// Awaits the acks of the records [`Service::send_records`] sent (any
    /// whose message failed is sent again on its own until it is stored).
    /// False if the service stopped first.
    async fn records_stored(&self, sent: &mut InFlight, shutdown: &CancellationToken) -> bool {
        let pending = std::mem::take(&mut sent.pending);
        let retry = std::mem::take(&mut sent.retry);
        let waiting = std::time::Instant::now();
        let stored = self.settle(sent, pending, retry, shutdown).await;
        self.metrics.busy("records", waiting.elapsed());
        stored
    }

    /// Awaits `pending`'s acks; sends the effects of any that failed, and
    /// `retry`, again one at a time until each is stored. False if the
    /// service stopped first.
    ///
    /// The acks are awaited side by side: each one's timeout (the
    /// JetStream context's, 5 s) starts when it is awaited, so a chunk
    /// whose messages were all lost (a stream leader lost them) would
    /// otherwise wait 5 s for each of its messages before sending any again.
    async fn settle(
        &self,
        sent: &InFlight,
        pending: Vec<(Vec<usize>, Ack)>,
        mut retry: Vec<usize>,
        shutdown: &CancellationToken,
    ) -> bool {
        let acks = futures::future::join_all(
            pending
                .into_iter()
                .map(|(which, ack)| async move { (which, ack.get().await) }),
        )
        .await;
        for (which, ack) in acks {
            match ack {
                Ok(ack) => {
                    for i in &which {
                        self.count(&sent.effects[*i], ack.duplicate);
                    }
                }
                Err(e) => {
                    EscalationEvent::PublishFailed {
                        subject: &sent.effects[which[0]].subject(),
                        error: &e.to_string(),
                    }
                    .emit(&self.metrics);
                    retry.extend(which);
                }
            }
        }
        for i in retry {
            if !self.publish(&sent.effects[i], sent.now, shutdown).await {
                return false;
            }
        }
        true
    }

    /// One attempt to send several effects of one subject in one message
    /// (timeline records of one action, or pages for one channel); its
    /// acknowledgement to come on success. Its message id comes from the
    /// effects' ids, so the same effects sent again are dropped. Effects
    /// fired again after a crash in another grouping get through: the
    /// incidents service finds such a record applied (an incident
    /// remembers the commands it took), and the notifier finds such a page
    /// in its delivery records.
    async fn send_batch(&self, effects: &[&Effect], now: Timestamp) -> Option<Ack> {
        use sha2::{Digest, Sha256};
        let mut ids = Sha256::new();
        for e in effects {
            ids.update(e.id().as_bytes());
            ids.update(b"\n");
        }
        let digest = hex::encode(&ids.finalize()[..16]);
        let (subject, id, payload) = match effects[0] {
            Effect::Record(c) => {
                let cmds: Vec<&Command> = effects.iter().filter_map(|e| e.record()).collect();
                (
                    batch_subject(c.action.name()),
                    format!("records:{digest}"),
                    codec::encode(&Envelope::new("escalation", now, &cmds)),
                )
            }
            Effect::Page(p) => {
                let pages: Vec<&Page> = effects.iter().filter_map(|e| e.page()).collect();
                (
                    notify_batch_subject(p.channel.as_str()),
                    format!("pages:{digest}"),
                    codec::encode(&Envelope::new("escalation", now, &pages)),
                )
            }
        };
        let payload = match payload {
            Ok(p) => p,
            Err(e) => {
                tracing::error!(error = %e, "cannot encode escalation messages");
                return None;
            }
        };
        let items = effects.len().to_string();
        let (publish, fence) =
            self.message(effects[0], payload, id, &[(headers::ITEMS, items.as_str())]);
        match fence::send(&self.js, subject.clone(), publish, fence.as_ref()).await {
            Ok(ack) => Some(ack),
            Err(e) => {
                EscalationEvent::PublishFailed {
                    subject: &subject,
                    error: &e.to_string(),
                }
                .emit(&self.metrics);
                None
            }
        }
    }

    /// One attempt to send an effect; its acknowledgement to come on
    /// success.
    async fn send(&self, effect: &Effect, now: Timestamp) -> Option<Ack> {
        let (subject, id, payload) = encode_effect(effect, now)?;
        let (publish, fence) = self.message(effect, payload, id, &[]);
        match fence::send(&self.js, subject, publish, fence.as_ref()).await {
            Ok(ack) => Some(ack),
            Err(e) => {
                EscalationEvent::PublishFailed {
                    subject: &effect.subject(),
                    error: &e.to_string(),
                }
                .emit(&self.metrics);
                None
            }
        }
    }

    /// The message of `effect` (or of several of its kind) with `extra`
    /// headers, and a page's with this tenure's fence (returned beside it,
    /// for `fence::send`). Timeline records
    /// are not fenced: a record only says that a step's pages are stored,
    /// and is sent only once they are (a page refused by the fence never
    /// gets its record), so a late one is still true; one that comes twice
    /// is applied once (the incidents service remembers the commands it
    /// took).
    fn message(
        &self,
        effect: &Effect,
        payload: Vec<u8>,
        id: String,
        extra: &[(&str, &str)],
    ) -> (
        async_nats::jetstream::message::PublishMessage,
        Option<Fence>,
    ) {
        let fence = match effect {
            Effect::Page(_) => self.fence(),
            Effect::Record(_) => None,
        };
        let fenced = fence.as_ref().map(Fence::headers);
        let mut all = extra.to_vec();
        all.extend(fenced.iter().flatten().map(|(k, v)| (*k, v.as_str())));
        (tocsin_runtime::bus::message(payload, id, None, &all), fence)
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
                match ack.get().await {
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
            // The fence is checked before the next attempt: its marker
            // may have aged out of NOTIFY or been purged (then it is
            // written anew), or a newer tenure wrote one (then this one
            // ends when its lease renewal fails, and its page is never
            // stored).
            if let Effect::Page(_) = effect {
                if let Err(e) = self.try_take_fence().await {
                    tracing::warn!(error = %e, "cannot check this tenure's fence on NOTIFY");
                }
            }
            if !backoff.wait(shutdown).await {
                return false;
            }
        }
    }
}

/// Tracks read from the store, by incident.
type ReadTracks = Vec<(uuid::Uuid, Vec<crate::track::Track>)>;

/// The stored tracks of `incidents`, read side by side on up to
/// [`READ_THREADS`] of the runtime's blocking threads ([`store::parts`];
/// the same few threads through a burst, so the allocator's per-thread
/// arenas stay few).
async fn read_tracks(
    store: Store,
    incidents: Vec<uuid::Uuid>,
) -> Result<ReadTracks, EscalationError> {
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(READ_THREADS);
    let mut parts = store::parts(&incidents, threads);
    let reads: Vec<_> = if parts.len() == 1 {
        vec![Ok(store.tracks_of_each(&parts.remove(0)))]
    } else {
        let handles: Vec<_> = parts
            .into_iter()
            .map(|part| {
                let store = store.clone();
                tokio::task::spawn_blocking(move || store.tracks_of_each(&part))
            })
            .collect();
        futures::future::join_all(handles).await
    };
    let mut out = Vec::with_capacity(incidents.len());
    for read in reads {
        match read {
            Ok(stored) => out.extend(
                stored.map_err(|e| EscalationError::Store(format!("cannot read tracks: {e}")))?,
            ),
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(e) => {
                return Err(EscalationError::Store(format!(
                    "reading tracks stopped: {e}"
                )))
            }
        }
    }
    Ok(out)
}

/// Puts `pages` (places in `effects`) in the order they are sent: a
/// channel's pages together (each channel has its own consumer), and
/// within it a destination's ([`Page::lane`]: the notifier paces each
/// destination on its own, and works on a message's pages together,
/// handing it back whole once the last is done or must come again, so a
/// page of one destination that waits for its turn would hold up another
/// destination's beside it); channels and destinations in the order they
/// first come, pages in theirs.
fn page_order(effects: &[Effect], pages: &mut [usize]) {
    use std::collections::HashMap;
    // Each key's place in the order it first comes (a burst may page a
    // thousand different people: looked up, not searched for).
    fn place<K: std::hash::Hash + Eq>(first: &mut HashMap<K, usize>, key: K) -> usize {
        let next = first.len();
        *first.entry(key).or_insert(next)
    }
    let mut channels: HashMap<String, usize> = HashMap::new();
    let mut lanes: HashMap<(usize, &str), usize> = HashMap::new();
    pages.sort_by_cached_key(|i| {
        let channel = place(&mut channels, effects[*i].subject());
        (channel, place(&mut lanes, (channel, lane(&effects[*i]))))
    });
}

/// A page's lane ([`Page::lane`]); "" for a record.
fn lane(effect: &Effect) -> &str {
    match effect {
        Effect::Page(p) => p.lane(),
        Effect::Record(_) => "",
    }
}

/// Most timeline records in one message.
const RECORDS_PER_MESSAGE: usize = 256;
/// Most pages in one message: the notifier works on a message's pages at
/// once and acknowledges them as one (handing it back whole if any must
/// come again), and waits for room for as many pages as its
/// `Tocsin-Items` says before it decodes it.
pub const PAGES_PER_MESSAGE: usize = 64;
/// Most bytes in one message (the effects' encoded sizes summed; far below
/// NATS's 1 MiB `max_payload`).
const BYTES_PER_MESSAGE: usize = 256 * 1024;

/// The effects of a chunk grouped into messages: in order, consecutive
/// effects of one subject each (records of one action, pages for one
/// channel and destination, [`page_order`]), at most [`RECORDS_PER_MESSAGE`] records or
/// [`PAGES_PER_MESSAGE`] pages and [`BYTES_PER_MESSAGE`] a message (an
/// effect too large to share goes alone).
fn batches<'a>(effects: &[&'a Effect]) -> Vec<Vec<&'a Effect>> {
    let mut out: Vec<Vec<&'a Effect>> = Vec::new();
    let mut bytes: usize = 0;
    let mut subject = String::new();
    let mut dest = "";
    for effect in effects {
        // Counted, not encoded: the message's payload is encoded once, when
        // it is sent.
        let (size, most) = match effect {
            Effect::Record(c) => (
                codec::encoded_len(c.as_ref()).unwrap_or(usize::MAX),
                RECORDS_PER_MESSAGE,
            ),
            Effect::Page(p) => (
                codec::encoded_len(p.as_ref()).unwrap_or(usize::MAX),
                PAGES_PER_MESSAGE,
            ),
        };
        let (this, its_lane) = (effect.subject(), lane(effect));
        let fits = out.last().is_some_and(|last| {
            last.len() < most
                && subject == this
                && dest == its_lane
                && bytes.saturating_add(size) <= BYTES_PER_MESSAGE
        });
        if fits {
            bytes += size;
        } else {
            out.push(Vec::new());
            bytes = size;
            subject = this;
            dest = its_lane;
        }
        out.last_mut().expect("pushed above").push(*effect);
    }
    out
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

#[cfg(test)]
mod batch_tests {
    use super::*;
    use tocsin_proto::{
        command::{Action, IncidentRef},
        incident::Actor,
    };

    fn record(n: u128, note: bool, text: usize) -> Effect {
        let incident = IncidentRef::Id(uuid::Uuid::from_u128(n));
        let action = if note {
            Action::Note {
                incident,
                text: "x".repeat(text),
            }
        } else {
            Action::Paged {
                incident,
                level: 0,
                repeat: 0,
                pages: vec!["x".repeat(text)],
                reason: String::new(),
                fired: None,
            }
        };
        Effect::Record(Box::new(Command {
            id: format!("r{n}"),
            actor: Actor::new("escalation", "tocsin"),
            action,
        }))
    }

    fn sizes(effects: &[Effect]) -> Vec<usize> {
        let refs: Vec<&Effect> = effects.iter().collect();
        batches(&refs).iter().map(Vec::len).collect()
    }

    #[test]
    fn records_are_grouped_in_order_by_count_bytes_and_action() {
        let many: Vec<Effect> = (0..600).map(|n| record(n, false, 10)).collect();
        assert_eq!(sizes(&many), [256, 256, 88]);
        let mixed = [
            record(1, false, 10),
            record(2, false, 10),
            record(3, true, 10),
            record(4, false, 10),
        ];
        assert_eq!(sizes(&mixed), [2, 1, 1]);
        // 100 KiB each: two to a message; one over the bound goes alone.
        let big: Vec<Effect> = (0..5).map(|n| record(n, false, 100 * 1024)).collect();
        assert_eq!(sizes(&big), [2, 2, 1]);
        let huge = [
            record(1, false, 10),
            record(2, false, 300 * 1024),
            record(3, false, 10),
        ];
        assert_eq!(sizes(&huge), [1, 1, 1]);
        assert!(sizes(&[]).is_empty());
    }

    /// A page of `channel` to the Slack conversation, phone or webhook
    /// `to` (its lane, [`Page::lane`]).
    fn page_to(n: u64, channel: tocsin_proto::notify::Channel, to: &str) -> Effect {
        use tocsin_proto::notify::{Channel, PageTarget};
        let Effect::Page(mut p) = page(n, channel) else {
            unreachable!("a page")
        };
        match channel {
            Channel::Webhook => p.target = PageTarget::Webhook { name: to.into() },
            Channel::Pagerduty => p.target = PageTarget::PagerdutyService { service: to.into() },
            _ => p.address = to.into(),
        }
        Effect::Page(p)
    }

    /// The sizes of the messages a chunk's pages go in, in the order
    /// [`Service::send_all`] sends them.
    fn page_sizes(effects: &[Effect]) -> Vec<usize> {
        let mut order: Vec<usize> = (0..effects.len()).collect();
        page_order(effects, &mut order);
        let refs: Vec<&Effect> = order.iter().map(|i| &effects[*i]).collect();
        batches(&refs).iter().map(Vec::len).collect()
    }

    /// A burst's pages for a channel go together by destination (lane): a
    /// page that waits in its message for its destination's turn then
    /// waits only beside pages that wait for the same turns, never in front
    /// of a Slack DM to someone else. (Mixed in one message, `bench notifier
    /// --mixed --per-message 64` with 2 replicas had DMs 20 s late at p99
    /// behind the #incidents channel's pages, 3 s a page a message.) SMS
    /// and email share their account's lane.
    #[test]
    fn a_bursts_pages_go_together_by_channel_and_destination() {
        use tocsin_proto::notify::Channel;
        let burst = [
            page_to(1, Channel::Slack, "U1"),
            page_to(2, Channel::Slack, "C0INCIDENTS"),
            page_to(3, Channel::Sms, "+15550001"),
            page_to(4, Channel::Slack, "U2"),
            page_to(5, Channel::Slack, "C0INCIDENTS"),
            page_to(6, Channel::Sms, "+15550002"),
            page_to(7, Channel::Slack, "U1"),
            page_to(8, Channel::Webhook, "teams"),
            page_to(9, Channel::Webhook, "ops"),
            page_to(10, Channel::Webhook, "teams"),
        ];
        // Slack: U1 (1, 7), #incidents (2, 5), U2 (4); SMS (3, 6);
        // webhooks teams (8, 10), ops (9).
        assert_eq!(page_sizes(&burst), [2, 2, 1, 2, 2, 1]);
        let mut order: Vec<usize> = (0..burst.len()).collect();
        page_order(&burst, &mut order);
        assert_eq!(order, [0, 6, 1, 4, 3, 2, 5, 7, 9, 8]);
        // One destination's pages still go 64 to a message.
        let many: Vec<Effect> = (0..150)
            .map(|n| page_to(n, Channel::Slack, "C0INCIDENTS"))
            .collect();
        let p = PAGES_PER_MESSAGE;
        assert_eq!(page_sizes(&many), [p, p, 150 - 2 * p]);
    }

    fn page(n: u64, channel: tocsin_proto::notify::Channel) -> Effect {
        let incident = tocsin_proto::incident::IncidentSummary::new(
            uuid::Uuid::from_u128(n.into()),
            n,
            format!("k{n}"),
            format!("incident {n}"),
            Timestamp::UNIX_EPOCH,
        );
        Effect::Page(Box::new(Page {
            id: format!("p{n}"),
            incident,
            level: 0,
            repeat: 0,
            target: tocsin_proto::notify::PageTarget::Webhook { name: "w".into() },
            channel,
            address: String::new(),
            reason: String::new(),
            due_at: Timestamp::UNIX_EPOCH,
            kind: Default::default(),
        }))
    }

    #[test]
    fn pages_are_grouped_by_channel_a_few_to_a_message() {
        use tocsin_proto::notify::Channel;
        let many: Vec<Effect> = (0..150).map(|n| page(n, Channel::Webhook)).collect();
        let p = PAGES_PER_MESSAGE;
        assert_eq!(sizes(&many), [p, p, 150 - 2 * p]);
        let mixed = [
            page(1, Channel::Sms),
            page(2, Channel::Sms),
            page(3, Channel::Email),
            page(4, Channel::Sms),
        ];
        assert_eq!(sizes(&mixed), [2, 1, 1], "consecutive pages of one channel");
        // A record never shares a message with a page.
        let both = [page(1, Channel::Sms), record(2, false, 10)];
        assert_eq!(sizes(&both), [1, 1]);
    }
}
