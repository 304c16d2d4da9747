//! The sled projection store.
//!
//! One tree, key prefixes: `m/meta` (cursors), `i/<uuid>` (an incident
//! without its alerts), `a/<uuid><fingerprint>` (one alert of it: a change
//! to one alert of an incident of 10,000 writes that alert, not all of
//! them, which cost 11 ms and 2.9 MB a save), `s/<id>` (silences). Each
//! save is one atomic `Batch`, so the cursors are always those of the state
//! stored with them. sled is a cache of the INCIDENTS stream, never the
//! record: if it is missing, unreadable or out of step with the stream, the
//! service wipes it and rebuilds from the stream.
//!
//! A save encodes what changed and hands the batch to the store's writer
//! thread, which applies the batches one after another in the order given:
//! the service decides its next inputs meanwhile instead of waiting for
//! sled (applying took about four fifths of a save, and a save about a
//! seventh of the service's time at 1,000 new incidents a second). What
//! reads the store (`load`, `incident`, `clear`, `flush`) first waits
//! until every batch given is applied; [`Store::applied`] waits too and
//! says whether they were. An incident is read back from the store only
//! once it has left memory, and it leaves memory only after its last save
//! is applied (the service evicts only once `applied` or `settled` says
//! so: at the next save, or as soon as the writer is done).
//!
//! A save sled fails to apply (a full or failing disk) is reported, and no
//! save after it is applied: the store keeps the last state applied whole,
//! with its own cursors, from which a restart catches up on the stream
//! (later batches would have written cursors claiming the lost changes).
//! Until then `applied` keeps failing, so nothing leaves memory that could
//! only be read back as it was before the failure.

use std::{
    collections::{BTreeMap, VecDeque},
    path::Path,
    sync::{mpsc, Arc, Condvar, Mutex},
};

use jiff::Timestamp;
use serde::{Deserialize, Serialize};
use tocsin_proto::{
    incident::{AlertInfo, Cause, IncidentSummary},
    silence::Silence,
    Fingerprint,
};
use uuid::Uuid;

use crate::{
    core::{IncidentState, Projection},
    inhibit::Inhibitor,
};

const META: &[u8] = b"m/meta";
/// 2: alerts apart from their incident. A store of another schema is
/// rebuilt from the stream.
const STORE_SCHEMA: u32 = 2;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("sled: {0}")]
    Sled(#[from] sled::Error),
    #[error("stored record {key} does not decode: {reason}")]
    Corrupt { key: String, reason: String },
    #[error("the projection store's writer thread has stopped")]
    WriterGone,
    #[error(
        "an earlier save of the projection store failed: no save is applied since, \
         so the store holds the state of the last one applied; restart the service \
         to catch up from there on the INCIDENTS stream"
    )]
    OutOfStep,
}

#[derive(Serialize, Deserialize)]
struct Meta {
    schema: u32,
    incidents_seq: u64,
    /// The last alert decided: its ALERTS message, and its place in it.
    alerts_cursor: u64,
    #[serde(default)]
    alerts_index: u32,
    last_cause: Option<Cause>,
    next_number: u64,
    #[serde(default)]
    heartbeats: BTreeMap<String, Timestamp>,
}

/// An incident as stored, without its alerts, by field place
/// ([`encode_compact`]): a new field goes last in both `HeaderRef` and
/// `Header`, with `#[serde(default)]` in `Header`.
#[derive(Serialize)]
struct HeaderRef<'a> {
    summary: &'a IncidentSummary,
    commands: &'a VecDeque<String>,
    batches: &'a VecDeque<u64>,
}

#[derive(Deserialize)]
struct Header {
    summary: IncidentSummary,
    #[serde(default)]
    commands: VecDeque<String>,
    #[serde(default)]
    batches: VecDeque<u64>,
}

#[derive(Clone)]
pub struct Store {
    db: sled::Db,
    tree: sled::Tree,
    writer: Arc<Writer>,
}

/// The thread that applies saved batches, in order. Dropping the last
/// clone of the store ends it once it has applied what it was given, and
/// waits for that, so the store can be opened again at once.
struct Writer {
    batches: Mutex<Option<mpsc::Sender<sled::Batch>>>,
    progress: Arc<Progress>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.batches
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// How far the writer is: batches given and applied, the first error of an
/// apply not yet reported, and a signal for each one applied.
#[derive(Default)]
struct Progress {
    counts: Mutex<Counts>,
    applied: Condvar,
    /// The same signal for a task ([`Store::settled`]).
    wake: tokio::sync::Notify,
    /// Tests: the next apply fails as a full or failing disk would.
    #[cfg(test)]
    fail_next: std::sync::atomic::AtomicBool,
}

#[derive(Default)]
struct Counts {
    given: u64,
    applied: u64,
    failed: Option<StoreError>,
    /// An apply failed, or the writer thread panicked: every batch given
    /// since is dropped unapplied, so the store stays as the last one
    /// applied left it, whole and with
    /// its own cursors (a later batch's cursors would claim the lost
    /// changes). For the rest of the process's life.
    out_of_step: bool,
    /// The thread ended (its last batch panicked, say): nothing given
    /// after it is applied.
    stopped: bool,
}

/// Marks the writer stopped however its thread ends, so no wait for it
/// lasts for ever.
struct Stopped(Arc<Progress>);

impl Drop for Stopped {
    fn drop(&mut self) {
        let mut c = self.0.lock();
        c.stopped = true;
        // Ended by a panic: what it was given is not applied, as after a
        // failed apply.
        if std::thread::panicking() {
            c.failed.get_or_insert(StoreError::WriterGone);
            c.out_of_step = true;
        }
        drop(c);
        self.0.applied.notify_all();
        self.0.wake.notify_one();
    }
}

impl Counts {
    /// Every batch given is applied, or none will be any more.
    fn done(&self) -> bool {
        self.applied >= self.given || self.stopped
    }
}

impl Progress {
    fn lock(&self) -> std::sync::MutexGuard<'_, Counts> {
        self.counts.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Applies `batch` to `tree` (in tests, fails if told to).
    fn apply(&self, tree: &sled::Tree, batch: sled::Batch) -> Result<(), sled::Error> {
        #[cfg(test)]
        if self
            .fail_next
            .swap(false, std::sync::atomic::Ordering::Relaxed)
        {
            return Err(sled::Error::Io(std::io::Error::other("injected")));
        }
        tree.apply_batch(batch)
    }
}

impl Writer {
    fn start(tree: sled::Tree) -> Result<Writer, StoreError> {
        let (tx, rx) = mpsc::channel::<sled::Batch>();
        let progress = Arc::new(Progress::default());
        let theirs = progress.clone();
        let thread = std::thread::Builder::new()
            .name("incidents-store".into())
            .spawn(move || {
                let _stopped = Stopped(theirs.clone());
                for batch in rx {
                    let out_of_step = theirs.lock().out_of_step;
                    let r = if out_of_step {
                        Ok(())
                    } else {
                        theirs.apply(&tree, batch)
                    };
                    let mut c = theirs.lock();
                    c.applied += 1;
                    if let Err(e) = r {
                        c.failed.get_or_insert(e.into());
                        c.out_of_step = true;
                    }
                    drop(c);
                    theirs.applied.notify_all();
                    theirs.wake.notify_one();
                }
            })
            .map_err(|e| StoreError::Sled(sled::Error::Io(e)))?;
        Ok(Writer {
            batches: Mutex::new(Some(tx)),
            progress,
            thread: Some(thread),
        })
    }

    fn give(&self, batch: sled::Batch) -> Result<(), StoreError> {
        let tx = self.batches.lock().unwrap_or_else(|e| e.into_inner());
        let Some(tx) = tx.as_ref() else {
            return Err(StoreError::WriterGone);
        };
        self.progress.lock().given += 1;
        tx.send(batch).map_err(|_| {
            self.progress.lock().given -= 1;
            StoreError::WriterGone
        })
    }

    /// Waits until every batch given is applied; takes the first error,
    /// then says [`StoreError::OutOfStep`] every time after it.
    fn wait(&self) -> Result<(), StoreError> {
        let mut c = self.settled();
        match c.failed.take() {
            Some(e) => Err(e),
            None if c.out_of_step => Err(StoreError::OutOfStep),
            None => Ok(()),
        }
    }

    /// Waits until every batch given is applied, or the thread stopped;
    /// an error stays to be taken by [`Writer::wait`].
    fn settled(&self) -> std::sync::MutexGuard<'_, Counts> {
        let mut c = self.progress.lock();
        while !c.done() {
            c = self
                .progress
                .applied
                .wait(c)
                .unwrap_or_else(|e| e.into_inner());
        }
        c
    }
}

/// sled's page cache (its own default is 1 GiB): incidents keeps what is
/// open in memory and reads its store at start-up and for incidents
/// evicted from memory, so its pages need not stay cached: a quarter of
/// the 64 MiB it had took 35 MiB off the service with 100,000 open and
/// slowed neither restarts nor receipts read back from the store
/// (`bench all --only recovery`, `bench incidents --max-in-memory 1000`).
const CACHE_BYTES: u64 = 16 * 1024 * 1024;

impl Store {
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        let db = sled::Config::new()
            .path(dir)
            .mode(sled::Mode::HighThroughput)
            .cache_capacity(CACHE_BYTES)
            .open()?;
        let tree = db.open_tree("projection")?;
        let writer = Arc::new(Writer::start(tree.clone())?);
        Ok(Store { db, tree, writer })
    }

    /// Tests: sled fails to apply the next save given.
    #[cfg(test)]
    fn fail_next_apply(&self) {
        self.writer
            .progress
            .fail_next
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// Waits until every save given so far is applied; the first error of
    /// one that failed since the last call, if any, and once a save has
    /// failed [`StoreError::OutOfStep`] (no save is applied after it: the
    /// store holds the state and cursors of the last save applied, an
    /// incident changed since is only right in memory, so none may leave
    /// it).
    pub fn applied(&self) -> Result<(), StoreError> {
        self.writer.wait()
    }

    /// Returns once every save given so far is applied (or the writer
    /// stopped), without blocking the task's thread meanwhile.
    pub async fn settled(&self) {
        let progress = &self.writer.progress;
        loop {
            if progress.lock().done() {
                return;
            }
            // A signal given since the check above is kept for this wait.
            progress.wake.notified().await;
        }
    }

    /// Loads the projection; an empty store gives an empty projection.
    /// Incidents resolved before `evict_before` stay in the store (only
    /// their number and dedup key are indexed in memory), and of the rest
    /// at most `max_in_memory` are held in memory (the newest, and every
    /// snoozed one); the firing alerts of every open one are indexed by
    /// `inhibitor`'s rules, if given.
    pub fn load(
        &self,
        evict_before: Timestamp,
        max_in_memory: usize,
        inhibitor: Option<Arc<Inhibitor>>,
    ) -> Result<Projection, StoreError> {
        // What was saved last is part of what is loaded (a failed save is
        // reported by the next `applied`).
        drop(self.writer.settled());
        let mut p = Projection::new();
        if let Some(i) = inhibitor {
            p.set_inhibitor(i);
        }
        let Some(meta) = self.tree.get(META)? else {
            // Every save writes the cursors, and a clear removes them
            // first: records without them are what a clear cut short left.
            if self.tree.first()?.is_some() {
                return Err(StoreError::Corrupt {
                    key: "m/meta".into(),
                    reason: "records without cursors (a clear cut short)".into(),
                });
            }
            return Ok(p);
        };
        let meta: Meta = decode("m/meta", &meta)?;
        if meta.schema != STORE_SCHEMA {
            return Err(StoreError::Corrupt {
                key: "m/meta".into(),
                reason: format!("store schema {} is not {STORE_SCHEMA}", meta.schema),
            });
        }
        p.incidents_seq = meta.incidents_seq;
        p.alerts_cursor = crate::core::AlertPos {
            seq: meta.alerts_cursor,
            index: meta.alerts_index,
        };
        p.last_cause = meta.last_cause;
        p.next_number = meta.next_number.max(1);
        p.heartbeats = meta.heartbeats;
        // Number of the incident each dedup key names so far (the newest wins).
        let mut key_numbers: std::collections::HashMap<[u8; 16], u64> = Default::default();
        // The incidents that stay in memory: the newest `max_in_memory` by
        // number (as if each were loaded and the oldest evicted past the
        // limit), and every snoozed one (the timer loop reads them). Their
        // alerts are read once the headers are, so those of incidents that
        // do not stay are not read at all, unless inhibition rules need
        // them (an open incident's firing alerts stay indexed out of memory).
        // Boxed, so the map and the list hold pointers, not states (10,000
        // states inline in them were 11 MB at the peak of a restart).
        let mut newest: BTreeMap<u64, Box<IncidentState>> = BTreeMap::new();
        let mut snoozed: Vec<Box<IncidentState>> = Vec::new();
        for kv in self.tree.scan_prefix(b"i/") {
            let (k, v) = kv?;
            let h: Header = decode(&String::from_utf8_lossy(&k), &v)?;
            let id = h.summary.id;
            let st = Box::new(IncidentState {
                summary: h.summary,
                alerts: BTreeMap::new(),
                commands: h.commands,
                batches: h.batches,
                tally: Default::default(),
            });
            let number = st.summary.number;
            let digest = crate::core::ByKey::digest(&st.summary.dedup_key);
            let newer = key_numbers.get(&digest).is_none_or(|n| *n < number);
            if newer {
                key_numbers.insert(digest, number);
                p.by_key.insert_digest(digest, id);
            }
            p.by_number.insert(number, id);
            let resolved = st.summary.status == tocsin_proto::incident::IncidentStatus::Resolved;
            if !resolved {
                p.open_count += 1;
            }
            let resolved_at = st.summary.resolved_at.unwrap_or(st.summary.opened_at);
            if resolved && resolved_at < evict_before {
                p.insert_cold(id);
                continue;
            }
            if crate::core::snooze_timer(&st).is_some() {
                snoozed.push(st);
            } else {
                newest.insert(number, st);
            }
            while newest.len() + snoozed.len() > max_in_memory {
                let Some((_, out)) = newest.pop_first() else {
                    break;
                };
                self.leave_out(&mut p, out)?;
            }
        }
        let mut stay: Vec<Box<IncidentState>> = newest.into_values().chain(snoozed).collect();
        stay.sort_unstable_by_key(|st| st.summary.number);
        for mut st in stay {
            st.alerts = self.alerts_of(&st.summary.id)?;
            p.insert_loaded(st);
        }
        for kv in self.tree.scan_prefix(b"s/") {
            let (k, v) = kv?;
            let s: Silence = decode(&String::from_utf8_lossy(&k), &v)?;
            p.silences.insert(s).map_err(|reason| StoreError::Corrupt {
                key: String::from_utf8_lossy(&k).into(),
                reason,
            })?;
        }
        Ok(p)
    }

    /// One stored incident (one that left memory), if the store has it.
    pub fn incident(&self, id: &Uuid) -> Result<Option<IncidentState>, StoreError> {
        // Its last save is applied before it leaves memory; waiting here
        // keeps a read of one still in memory from finding an older save.
        drop(self.writer.settled());
        let Some(v) = self.tree.get(incident_key(id))? else {
            return Ok(None);
        };
        let h: Header = decode(&format!("i/{id}"), &v)?;
        Ok(Some(IncidentState {
            summary: h.summary,
            alerts: self.alerts_of(id)?,
            commands: h.commands,
            batches: h.batches,
            tally: Default::default(),
        }))
    }

    /// Incident `st` (its header read, its alerts not) as [`Store::load`]
    /// leaves it out of memory: only indexed, with its inhibiting alerts
    /// (read for that, if rules are set and it is open).
    fn leave_out(&self, p: &mut Projection, mut st: Box<IncidentState>) -> Result<(), StoreError> {
        let open = st.summary.status != tocsin_proto::incident::IncidentStatus::Resolved;
        if open && p.sources.is_set() {
            st.alerts = self.alerts_of(&st.summary.id)?;
        }
        p.insert_out_of_memory(&st);
        Ok(())
    }

    /// Incident `id`'s stored alerts.
    fn alerts_of(&self, id: &Uuid) -> Result<crate::core::Alerts, StoreError> {
        let mut alerts = BTreeMap::new();
        for kv in self.tree.scan_prefix(alerts_prefix(id)) {
            let (k, v) = kv?;
            let a: AlertInfo = decode(&String::from_utf8_lossy(&k), &v)?;
            alerts.insert(a.fingerprint.clone(), Box::new(a));
        }
        Ok(alerts)
    }

    /// Hands what changed since the last save, with the cursors, to the
    /// writer thread, to be applied atomically after the saves before it;
    /// returns without waiting for it ([`Store::applied`] does).
    pub fn save(&self, p: &mut Projection) -> Result<(), StoreError> {
        if self.writer.progress.lock().out_of_step {
            // Dropped unapplied anyway (see `Counts::out_of_step`).
            p.dirty.clear();
            p.dirty_alerts.clear();
            p.dirty_silences.clear();
            return Ok(());
        }
        let mut batch = sled::Batch::default();
        for id in p.dirty.drain() {
            if let Some(st) = p.incidents.get(&id) {
                let header = HeaderRef {
                    summary: &st.summary,
                    commands: &st.commands,
                    batches: &st.batches,
                };
                batch.insert(incident_key(&id), encode_compact(&header));
            }
        }
        for (id, fp) in p.dirty_alerts.drain() {
            if let Some(a) = p.incidents.get(&id).and_then(|st| st.alerts.get(&fp)) {
                batch.insert(alert_key(&id, &fp), encode_compact(a));
            }
        }
        for id in p.dirty_silences.drain() {
            let key = format!("s/{id}");
            match p.silences.get(&id) {
                Some(s) => batch.insert(key.as_bytes(), encode(s)),
                None => batch.remove(key.as_bytes()),
            }
        }
        let meta = Meta {
            schema: STORE_SCHEMA,
            incidents_seq: p.incidents_seq,
            alerts_cursor: p.alerts_cursor.seq,
            alerts_index: p.alerts_cursor.index,
            last_cause: p.last_cause.clone(),
            next_number: p.next_number,
            heartbeats: p.heartbeats.clone(),
        };
        batch.insert(META, encode(&meta));
        self.writer.give(batch)
    }

    /// Removes everything, the cursors first (see [`Store::load`]): for a
    /// projection started over from the stream, so no record of what the
    /// stream does not hold is read back at the next start.
    pub fn clear(&self) -> Result<(), StoreError> {
        // A save still to be applied would write records back after it.
        drop(self.writer.settled());
        self.tree.remove(META)?;
        self.tree.clear()?;
        Ok(())
    }

    pub async fn flush(&self) {
        if let Err(e) = self.writer.wait() {
            tracing::warn!(error = %e, "the last save of the projection store failed");
        }
        if let Err(e) = self.db.flush_async().await {
            tracing::warn!(error = %e, "cannot flush the projection store");
        }
    }
}

fn incident_key(id: &Uuid) -> Vec<u8> {
    let mut k = b"i/".to_vec();
    k.extend_from_slice(id.as_bytes());
    k
}

fn alerts_prefix(id: &Uuid) -> Vec<u8> {
    let mut k = b"a/".to_vec();
    k.extend_from_slice(id.as_bytes());
    k
}

fn alert_key(id: &Uuid, fp: &Fingerprint) -> Vec<u8> {
    let mut k = alerts_prefix(id);
    k.extend_from_slice(fp.as_str().as_bytes());
    k
}

/// The cursors and silences (one record, and few) are stored with their
/// field names: the cursors hold a [`Cause`], whose alert `index` is left
/// out when 0, which only the named form can tell apart.
fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    // Encoding plain data structs to a Vec cannot fail.
    rmp_serde::to_vec_named(v).expect("projection records encode")
}

/// Incidents and their alerts, nearly all the store, are stored without
/// field names (MessagePack by field place): about half the bytes, so more
/// of the store fits sled's page cache and a start reads it back sooner.
/// [`decode`] reads both forms, so a store written with the names (by a
/// Tocsin before this) reads as it was. The place is the field's order:
/// a new field of [`IncidentSummary`] or [`AlertInfo`] (or of the header)
/// goes last, with `#[serde(default)]`; the test
/// `records_stored_in_the_compact_form_read_back_as_stored_then` holds
/// one of each as stored today. A record that cannot be read makes the
/// store be rebuilt from INCIDENTS. Neither type leaves a field out when
/// it is empty (`skip_serializing_if`): by place, every later field would
/// be read from the wrong one.
fn encode_compact<T: Serialize>(v: &T) -> Vec<u8> {
    rmp_serde::to_vec(v).expect("projection records encode")
}

fn decode<T: serde::de::DeserializeOwned>(key: &str, bytes: &[u8]) -> Result<T, StoreError> {
    rmp_serde::from_slice(bytes).map_err(|e| StoreError::Corrupt {
        key: key.to_string(),
        reason: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(s: &Store) -> Result<Projection, StoreError> {
        s.load(Timestamp::MIN, usize::MAX, None)
    }

    #[test]
    fn records_without_cursors_are_refused_and_a_clear_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        let mut p = Projection::new();
        p.incidents_seq = 7;
        s.save(&mut p).unwrap();
        s.applied().unwrap();
        s.tree.insert(b"s/left-over", b"a record".to_vec()).unwrap();
        // What a clear cut short after the cursors leaves: refused, so the
        // service wipes the store and rebuilds it from the stream.
        s.tree.remove(META).unwrap();
        let err = load(&s).err().expect("refused");
        assert!(err.to_string().contains("m/meta"), "{err}");
        s.clear().unwrap();
        assert!(s.tree.is_empty());
        assert_eq!(load(&s).unwrap().incidents_seq, 0);
        // A saved store loads its cursors.
        let mut p = Projection::new();
        p.incidents_seq = 9;
        s.save(&mut p).unwrap();
        assert_eq!(load(&s).unwrap().incidents_seq, 9);
    }

    /// Opens a store just dropped as the service does: sled's IO threads
    /// may hold its folder's lock a moment after the drop.
    fn reopen(dir: &std::path::Path) -> Result<Store, StoreError> {
        tocsin_runtime::store::open_when_unlocked(dir, Store::open)
    }

    /// Saves return before sled has applied them; what reads the store
    /// waits for them, they are applied in the order given, and a store
    /// dropped right after a save holds it when opened again at once.
    #[test]
    fn saves_are_applied_in_order_before_the_store_is_read_or_opened_again() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        let mut p = Projection::new();
        for seq in 1..=200 {
            p.incidents_seq = seq;
            s.save(&mut p).unwrap();
        }
        assert_eq!(load(&s).unwrap().incidents_seq, 200);
        p.incidents_seq = 201;
        s.save(&mut p).unwrap();
        drop(s);
        let s = reopen(dir.path()).expect("opened again at once");
        assert_eq!(load(&s).unwrap().incidents_seq, 201);
        s.applied().expect("nothing failed");
    }

    /// A save sled could not apply leaves the store at the last save it
    /// did apply: no later save is applied over it (their cursors would
    /// claim the lost changes), and every later `applied` says so, so the
    /// service evicts nothing it could only read back as it was before.
    #[test]
    fn after_a_failed_save_no_later_save_is_applied_and_the_failure_stays_reported() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        let id = Uuid::from_u128(7);
        let mut p = Projection::new();
        p.insert_loaded(Box::new(IncidentState {
            summary: IncidentSummary::new(id, 1, "k", "opened", Timestamp::UNIX_EPOCH),
            alerts: BTreeMap::new(),
            commands: VecDeque::new(),
            batches: VecDeque::new(),
            tally: Default::default(),
        }));
        p.dirty.insert(id);
        p.incidents_seq = 1;
        s.save(&mut p).unwrap();
        s.applied().expect("the first save is applied");

        // The incident changes; sled fails to apply that save.
        p.incidents.get_mut(&id).unwrap().summary.title = "changed".into();
        p.dirty.insert(id);
        p.incidents_seq = 2;
        s.fail_next_apply();
        s.save(&mut p).unwrap();
        assert!(s.applied().is_err(), "the failed save is reported");

        // Later saves, with later cursors, change nothing stored.
        p.incidents_seq = 3;
        s.save(&mut p).unwrap();
        assert!(
            s.applied().is_err(),
            "the store stays out of step until the service starts again"
        );
        drop(s);
        let s = reopen(dir.path()).unwrap();
        let loaded = load(&s).unwrap();
        assert_eq!(
            loaded.incidents_seq, 1,
            "the cursor is that of the last save applied whole"
        );
        assert_eq!(loaded.incidents[&id].summary.title, "opened");
    }

    /// The messages of receipts an incident's entries are in are noted
    /// once each, the newest `REMEMBERED_BATCHES` kept, and stored with
    /// the incident.
    #[test]
    fn an_incidents_messages_of_receipts_are_bounded_and_stored_with_it() {
        use tocsin_proto::incident::{EventKind, IncidentEvent, LogEntry};
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        let id = Uuid::from_u128(7);
        let summary = IncidentSummary::new(id, 1, "k", "t", Timestamp::UNIX_EPOCH);
        let mut p = Projection::new();
        p.insert_loaded(Box::new(IncidentState {
            summary: summary.clone(),
            alerts: BTreeMap::new(),
            commands: VecDeque::new(),
            batches: VecDeque::new(),
            tally: Default::default(),
        }));
        let receipt = LogEntry::Incident(IncidentEvent {
            kind: EventKind::Acknowledged,
            at: Timestamp::UNIX_EPOCH,
            actor: None,
            cause: Cause::Command { id: "c".into() },
            incident: summary,
        });
        let max = crate::core::REMEMBERED_BATCHES as u64;
        for seq in 1..=max + 10 {
            // Two of its entries in one message: noted once.
            p.batch_stored(&[receipt.clone(), receipt.clone()], seq);
        }
        let want: VecDeque<u64> = (11..=max + 10).collect();
        assert_eq!(p.incidents[&id].batches, want);
        s.save(&mut p).unwrap();
        assert_eq!(s.incident(&id).unwrap().unwrap().batches, want);
    }

    use tocsin_proto::{
        alert::{AlertStatus, Labels},
        incident::{Actor, IncidentStatus, Severity},
    };

    use crate::test_util::ts;

    /// Incident `number` with one firing alert named `alertname` on
    /// `instance`; its id is not in the order of the numbers.
    fn incident(number: u64, alertname: &str, instance: &str) -> IncidentState {
        let id =
            Uuid::from_u128(u128::from(number).wrapping_mul(0x9e37_79b9_7f4a_7c15_f39c) ^ 0xabc);
        let labels = Labels::from_strs(&[
            ("alertname", alertname),
            ("instance", instance),
            ("severity", "critical"),
        ]);
        let fingerprint = Fingerprint::from_labels(&labels);
        let mut summary = IncidentSummary::new(
            id,
            number,
            format!("key-{number}"),
            alertname,
            ts("2026-05-04T08:00:00Z"),
        );
        summary.alerts_firing = 1;
        summary.alerts_total = 1;
        let alert = AlertInfo {
            fingerprint: fingerprint.clone(),
            status: AlertStatus::Firing,
            labels,
            annotations: Labels::new(),
            starts_at: ts("2026-05-04T08:00:00Z"),
            ends_at: None,
            generator_url: None,
            suppressed: None,
        };
        IncidentState {
            summary,
            alerts: [(fingerprint, Box::new(alert))].into(),
            commands: Default::default(),
            batches: Default::default(),
            tally: Default::default(),
        }
    }

    /// An incident with every optional part of its header and its alert set.
    fn full_incident(number: u64) -> IncidentState {
        let mut st = incident(number, "DiskFull", "db1");
        let s = &mut st.summary;
        s.title = "disk full on db1".into();
        s.severity = Severity::High;
        s.status = IncidentStatus::Acknowledged;
        s.labels = Labels::from_strs(&[("alertname", "DiskFull"), ("instance", "db1")]);
        s.announce_at = ts("2026-05-04T08:05:00Z");
        s.acknowledged_at = Some(ts("2026-05-04T08:10:00Z"));
        s.acknowledged_by = Some(Actor::new("alice", "slack"));
        s.resolved_at = Some(ts("2026-05-04T09:00:00Z"));
        s.snoozed_until = Some(ts("2026-05-04T10:00:00Z"));
        s.assignee = Some("bob".into());
        s.alerts_firing = 2;
        s.alerts_total = 3;
        s.reopen_count = 1;
        s.suppressed = Some("silenced by 7".into());
        s.revision = 9;
        st.commands = ["cmd-1".to_string(), "cmd-2".to_string()].into();
        st.batches = [11, 12].into();
        let a = st.alerts.values_mut().next().unwrap();
        a.status = AlertStatus::Resolved;
        a.annotations = Labels::from_strs(&[("summary", "the disk is full")]);
        a.ends_at = Some(ts("2026-05-04T08:30:00Z"));
        a.generator_url = Some("http://prometheus:9090/graph".into());
        a.suppressed = Some("inhibited by node-down".into());
        st
    }

    fn save_all(s: &Store, incidents: &[IncidentState]) {
        let mut p = Projection::new();
        for st in incidents {
            let id = st.summary.id;
            for fp in st.alerts.keys() {
                p.dirty_alerts.insert((id, fp.clone()));
            }
            p.incidents.insert(id, Box::new(st.clone()));
            p.dirty.insert(id);
        }
        p.incidents_seq = 1;
        s.save(&mut p).unwrap();
        s.applied().unwrap();
    }

    fn is_map(stored: &[u8]) -> bool {
        matches!(stored[0], 0x80..=0x8f | 0xde | 0xdf)
    }

    /// Incidents and alerts are stored by field place (an array), every
    /// optional part set or empty, and read back as they were.
    #[test]
    fn every_shape_of_incident_and_alert_comes_back_from_the_store() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        let cases = [incident(1, "Plain", "h1"), full_incident(2)];
        save_all(&s, &cases);
        for st in &cases {
            let id = st.summary.id;
            assert!(!is_map(&s.tree.get(incident_key(&id)).unwrap().unwrap()));
            for fp in st.alerts.keys() {
                assert!(!is_map(&s.tree.get(alert_key(&id, fp)).unwrap().unwrap()));
            }
            assert_eq!(s.incident(&id).unwrap().as_ref(), Some(st));
        }
        let p = load(&s).unwrap();
        for st in &cases {
            assert_eq!(p.incidents.get(&st.summary.id).map(|b| &**b), Some(st));
        }
    }

    /// A store written before the compact form holds its incidents and
    /// alerts with their field names: they read back as they were.
    #[test]
    fn records_stored_with_field_names_still_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        save_all(&s, &[]);
        let st = full_incident(3);
        let id = st.summary.id;
        let header = HeaderRef {
            summary: &st.summary,
            commands: &st.commands,
            batches: &st.batches,
        };
        s.tree
            .insert(incident_key(&id), rmp_serde::to_vec_named(&header).unwrap())
            .unwrap();
        for (fp, a) in &st.alerts {
            s.tree
                .insert(alert_key(&id, fp), rmp_serde::to_vec_named(a).unwrap())
                .unwrap();
        }
        assert_eq!(s.incident(&id).unwrap(), Some(st.clone()));
        assert_eq!(
            load(&s).unwrap().incidents.get(&id).map(|b| &**b),
            Some(&st)
        );
    }

    /// The compact form reads fields by their place: these are an incident
    /// and its alert as stored today, which every later version must read
    /// as they were. A new field goes at the end of its struct, with a
    /// default (it is then missing here and takes it); one put elsewhere,
    /// or fields reordered, fail here.
    #[test]
    fn records_stored_in_the_compact_form_read_back_as_stored_then() {
        let st = full_incident(4);
        let header: Header = decode("i/", &hex::decode(COMPACT_HEADER).unwrap()).unwrap();
        assert_eq!(
            (header.summary, header.commands, header.batches),
            (st.summary.clone(), st.commands.clone(), st.batches.clone())
        );
        let alert: AlertInfo = decode("a/", &hex::decode(COMPACT_ALERT).unwrap()).unwrap();
        assert_eq!(&alert, &**st.alerts.values().next().unwrap());
    }

    const COMPACT_HEADER: &str = concat!(
        "93dc0013c41000000000000278dde6e5fd29f057c4cc04a56b65792d34b06469",
        "736b2066756c6c206f6e20646231a468696768ac61636b6e6f776c6564676564",
        "82a9616c6572746e616d65a84469736b46756c6ca8696e7374616e6365a36462",
        "31b4323032362d30352d30345430383a30303a30305ab4323032362d30352d30",
        "345430383a30353a30305ab4323032362d30352d30345430383a31303a30305a",
        "92a5616c696365a5736c61636bb4323032362d30352d30345430393a30303a30",
        "305ab4323032362d30352d30345431303a30303a30305aa3626f62020301ad73",
        "696c656e63656420627920370992a5636d642d31a5636d642d32920b0c",
    );
    const COMPACT_ALERT: &str = concat!(
        "98b065393463373434616533643434646638a87265736f6c76656483a9616c65",
        "72746e616d65a84469736b46756c6ca8696e7374616e6365a3646231a8736576",
        "6572697479a8637269746963616c81a773756d6d617279b0746865206469736b",
        "2069732066756c6cb4323032362d30352d30345430383a30303a30305ab43230",
        "32362d30352d30345430383a33303a30305abc687474703a2f2f70726f6d6574",
        "686575733a393039302f6772617068b6696e68696269746564206279206e6f64",
        "652d646f776e",
    );

    /// A load keeps in memory the newest `max_in_memory` incidents and the
    /// snoozed ones, and reads no alerts of the others unless inhibition
    /// rules need them: the projection is the one loading every incident
    /// and evicting the oldest past the limit gave.
    #[test]
    fn a_load_keeps_what_loading_all_and_evicting_past_the_limit_kept() {
        let rules: Vec<crate::inhibit::InhibitRuleConfig> = serde_json::from_str(
            r#"[{"source_matchers": ["alertname=\"NodeDown\""], "target_matchers": ["severity=\"critical\""], "equal": ["instance"]}]"#,
        )
        .unwrap();
        let rules = Arc::new(Inhibitor::new(&rules).unwrap());
        let mut incidents: Vec<IncidentState> = (1..=9)
            .map(|n| incident(n, "Up", &format!("h{n}")))
            .collect();
        // #1, old and open, inhibits what fires on its instance.
        incidents[0] = incident(1, "NodeDown", "h1");
        // #2 resolved lately; #3 resolved before the reopen window.
        for (i, resolved_at) in [(1, "2026-05-04T09:00:00Z"), (2, "2026-05-01T00:00:00Z")] {
            incidents[i].summary.status = IncidentStatus::Resolved;
            incidents[i].summary.resolved_at = Some(ts(resolved_at));
        }
        // #4, old, snoozed: stays in memory.
        incidents[3].summary.status = IncidentStatus::Acknowledged;
        incidents[3].summary.snoozed_until = Some(ts("2026-05-04T12:00:00Z"));
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        save_all(&s, &incidents);
        let evict_before = ts("2026-05-02T00:00:00Z");
        for (max, rules) in [
            (3, Some(rules.clone())),
            (4, None),
            (1, Some(rules.clone())),
        ] {
            let lean = s.load(evict_before, max, rules.clone()).unwrap();
            let mut all = s.load(evict_before, usize::MAX, rules.clone()).unwrap();
            all.evict_over(max);
            let mut kept: Vec<u64> = lean
                .incidents
                .values()
                .map(|st| st.summary.number)
                .collect();
            kept.sort_unstable();
            let mut expected: Vec<u64> =
                all.incidents.values().map(|st| st.summary.number).collect();
            expected.sort_unstable();
            assert_eq!(kept, expected, "in memory, at most {max}");
            for (id, st) in &lean.incidents {
                assert_eq!(Some(st), all.incidents.get(id), "incident in memory");
            }
            assert_eq!(lean.cold, all.cold);
            assert_eq!(lean.cold_open, all.cold_open);
            assert_eq!(lean.resolved, all.resolved);
            assert_eq!(lean.snoozes, all.snoozes);
            assert_eq!(lean.by_number, all.by_number);
            assert_eq!(lean.open_count, all.open_count);
            assert_eq!(lean.open_count, 7);
            for n in 1..=9 {
                let key = format!("key-{n}");
                assert_eq!(lean.by_key.get(&key), all.by_key.get(&key));
            }
            // The old open #1 is out of memory, and still inhibits.
            assert!(
                lean.incidents.len() <= max.max(1)
                    && !lean.incidents.contains_key(&incidents[0].summary.id)
            );
            let target = Labels::from_strs(&[
                ("alertname", "Disk"),
                ("instance", "h1"),
                ("severity", "critical"),
            ]);
            assert_eq!(
                lean.sources.inhibited_by(&target),
                all.sources.inhibited_by(&target)
            );
            assert_eq!(
                lean.sources.inhibited_by(&target).is_some(),
                rules.is_some()
            );
        }
    }
}
