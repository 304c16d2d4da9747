//! The pure core: the projection of the INCIDENTS log, and the decisions
//! that turn an input (alert, command, timer) into new log entries.
//!
//! No IO here. The service feeds inputs in order, publishes what
//! [`Decider`] returns, and folds each published entry into the
//! [`Projection`] with [`Projection::apply`] — the same fold that rebuilds
//! the projection from the stream after a crash.
//!
//! **Decisions are convergent**: deciding an input against a projection
//! that already contains some of that input's entries returns only the
//! missing ones. That is what makes a crash between "published" and
//! "recorded in sled" harmless: after catching up from the stream, the
//! service decides the last input again and publishes only what is missing
//! (and JetStream drops any repeat by its message id).
//!
//! "Now" for an alert or command is the time it was received (from its
//! envelope), never the wall clock at processing time, so replaying the same
//! inputs gives the same incidents however often the service restarts.

use std::{
    cell::Cell,
    collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque},
};

use jiff::{SignedDuration, Timestamp};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tocsin_proto::{
    command::{Action, Command, IncidentRef},
    incident::{
        Actor, AlertInfo, Cause, EventKind, IncidentEvent, IncidentStatus, IncidentSummary,
        LogEntry, ResolveReason, ResolvedAlert, RunbookRequest, Severity, SilenceChange,
    },
    silence::Silence,
    Alert, AlertStatus, Envelope, Fingerprint, Labels, SourceKind,
};
use uuid::Uuid;

use crate::{
    inhibit::{Inhibitor, Sources},
    severity::SeverityMap,
    silences::SilenceIndex,
};

/// How many applied command ids an incident remembers, to answer a retried
/// command as "already applied" instead of applying it twice.
const REMEMBERED_COMMANDS: usize = 64;
/// Messages of several entries remembered per incident
/// ([`IncidentState::batches`]): a timeline shows the receipts and alert
/// changes of the newest this many (an answer holds at most a few
/// thousand entries anyway).
pub const REMEMBERED_BATCHES: usize = 1024;

/// Dedup key -> the most recent incident with that key, for every
/// incident in memory or not. Keyed by the first 128 bits of the key's
/// SHA-256 instead of the key: a key is its grouping labels (100-200
/// bytes), and 100,000 of them held some 13 MiB more. Two keys sharing the
/// 128 bits is out of reach (a collision needs about 2^64 keys, and
/// SHA-256 gives no way to make one).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ByKey(HashMap<[u8; 16], Uuid>);

impl ByKey {
    pub(crate) fn digest(key: &str) -> [u8; 16] {
        let d = Sha256::digest(key.as_bytes());
        let mut out = [0u8; 16];
        out.copy_from_slice(&d[..16]);
        out
    }

    /// The most recent incident with dedup key `key`.
    pub fn get(&self, key: &str) -> Option<&Uuid> {
        self.0.get(&Self::digest(key))
    }

    /// `id` is now the most recent incident with `key`.
    pub fn insert(&mut self, key: &str, id: Uuid) {
        self.insert_digest(Self::digest(key), id);
    }

    /// [`ByKey::insert`] with the key's [`ByKey::digest`] at hand.
    pub(crate) fn insert_digest(&mut self, digest: [u8; 16], id: Uuid) {
        self.0.insert(digest, id);
    }

    /// Dedup keys known.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// An incident's alerts by fingerprint. Each alert is boxed: a map's node
/// has room for eleven entries however few it holds, and most incidents
/// hold one alert, so a node of whole alerts (about 170 bytes each) took
/// some 2 KiB an incident in memory where boxed ones take about 360 bytes
/// plus the alert.
pub type Alerts = BTreeMap<Fingerprint, Box<AlertInfo>>;

/// One incident in the projection.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IncidentState {
    pub summary: IncidentSummary,
    pub alerts: Alerts,
    #[serde(default)]
    pub commands: VecDeque<String>,
    /// The stream sequences of the INCIDENTS messages of several entries
    /// (receipts and alert changes, on `tocsin.incidents.batch`) that hold
    /// some of its entries, oldest first, the newest
    /// [`REMEMBERED_BATCHES`]: its timeline reads those entries there,
    /// since no subject of its own names them.
    #[serde(default)]
    pub batches: VecDeque<u64>,
    /// Counts the alert-derived summary follows from (not stored).
    #[serde(skip)]
    pub tally: Tally,
}

/// Counts over an incident's alerts that the alert-derived fields of its
/// summary follow from, kept while the projection knows the severity map
/// ([`Projection::set_severity`]): with them an alert that resolves works
/// out the incident's summary without going through every alert of it
/// ([`resolved_summary`]). Derived, never stored (built again from the
/// alerts at the first change after a state is read); two states compare
/// equal whatever their tallies.
#[derive(Clone, Copy, Debug, Default)]
pub struct Tally(Option<Counts>);

impl PartialEq for Tally {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl Eq for Tally {}

/// Severities, lowest first, as `Severity as usize` numbers them.
const SEVERITIES: [Severity; 5] = [
    Severity::Info,
    Severity::Low,
    Severity::Medium,
    Severity::High,
    Severity::Critical,
];

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Counts {
    /// Alerts by severity (`Severity as usize`): all of them, and the
    /// firing ones.
    all: [u32; SEVERITIES.len()],
    firing: [u32; SEVERITIES.len()],
    /// Firing alerts that are suppressed.
    firing_suppressed: u32,
}

impl Counts {
    fn of(alerts: &Alerts, map: &SeverityMap) -> Counts {
        let mut c = Counts::default();
        for a in alerts.values() {
            c.count(a, map, true);
        }
        c
    }

    /// Counts alert `a` in (`add`) or out.
    fn count(&mut self, a: &AlertInfo, map: &SeverityMap, add: bool) {
        let step = |n: &mut u32| {
            *n = if add { *n + 1 } else { n.saturating_sub(1) };
        };
        let s = map.of(&a.labels) as usize;
        step(&mut self.all[s]);
        if a.status == AlertStatus::Firing {
            step(&mut self.firing[s]);
            if a.suppressed.is_some() {
                step(&mut self.firing_suppressed);
            }
        }
    }
}

/// The highest severity counted in `by_severity`.
fn highest(by_severity: &[u32; SEVERITIES.len()]) -> Option<Severity> {
    (0..SEVERITIES.len())
        .rev()
        .find(|i| by_severity[*i] > 0)
        .map(|i| SEVERITIES[i])
}

/// Where an alert sits on the ALERTS stream: its message's sequence and its
/// place in that message (0 unless the message holds several alerts of one
/// request). Ordered as the alerts are read.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct AlertPos {
    pub seq: u64,
    pub index: u32,
}

impl AlertPos {
    /// The alert an entry's cause names, if an alert caused it.
    pub fn of(cause: &Cause) -> Option<Self> {
        match cause {
            Cause::Alert { seq, index } => Some(AlertPos {
                seq: *seq,
                index: *index,
            }),
            _ => None,
        }
    }

    /// Every alert of message `seq`, however many it holds: where a message
    /// that cannot be read at all is recorded as decided.
    pub fn whole(seq: u64) -> Self {
        AlertPos {
            seq,
            index: u32::MAX,
        }
    }

    /// The place after this one: the next alert of the same message (which
    /// may not exist; reading then goes on with the next message).
    pub fn next(self) -> Self {
        match self.index.checked_add(1) {
            Some(index) => AlertPos { index, ..self },
            None => AlertPos {
                seq: self.seq + 1,
                index: 0,
            },
        }
    }

    pub fn cause(self) -> Cause {
        Cause::Alert {
            seq: self.seq,
            index: self.index,
        }
    }
}

/// The projection of the INCIDENTS stream plus the input cursor.
#[derive(Clone, Default)]
pub struct Projection {
    /// The incidents in memory. Each state is boxed: the table keeps the
    /// size of its largest moment (a batch's peak), and a slot is then a
    /// pointer instead of a whole state (about 360 bytes).
    pub incidents: HashMap<Uuid, Box<IncidentState>>,
    /// Dedup key -> most recent incident with that key.
    pub by_key: ByKey,
    /// Number -> incident, for every incident (in memory or not), in order.
    pub by_number: BTreeMap<u64, Uuid>,
    /// Incidents whose state is not in memory, only in the store: resolved
    /// ones past the reopen window ([`Projection::evict`]). The service
    /// loads one back ([`Projection::restore`]) when an input touches it.
    pub cold: HashSet<Uuid>,
    /// Resolved incidents in memory by when they were resolved: the
    /// candidates for eviction, oldest first.
    pub resolved: BTreeSet<(Timestamp, Uuid)>,
    /// The latest time of an incident event applied: how far the inputs
    /// have come. Eviction counts the reopen window from here (not from
    /// the wall clock), so a backlog of old alerts does not read back and
    /// evict again the incidents its own alerts keep touching.
    pub inputs_at: Timestamp,
    pub silences: SilenceIndex,
    pub next_number: u64,
    /// Last INCIDENTS stream sequence applied.
    pub incidents_seq: u64,
    /// The last alert decided.
    pub alerts_cursor: AlertPos,
    /// Cause of the last applied entry (to know whether the last input may
    /// be only partly published).
    pub last_cause: Option<Cause>,
    /// Last heartbeat ping per monitor (not part of the log: a lost value
    /// only delays a missed-heartbeat incident by one interval).
    pub heartbeats: BTreeMap<String, Timestamp>,
    /// Incidents not resolved.
    pub open_count: u64,
    /// Incidents changed since the last save.
    pub dirty: std::collections::HashSet<Uuid>,
    /// Alerts changed since the last save, by incident: the store keeps
    /// each alert apart, so a change to one of 10,000 writes one.
    pub dirty_alerts: std::collections::HashSet<(Uuid, Fingerprint)>,
    /// Silence ids changed since the last save.
    pub dirty_silences: std::collections::HashSet<String>,
    /// Snoozed, unresolved incidents by when their snooze ends: the timer
    /// loop reads its head instead of scanning every incident.
    pub snoozes: std::collections::BTreeSet<(Timestamp, Uuid)>,
    /// The firing alerts of open incidents that can inhibit others, by
    /// rule ([`Projection::set_inhibitor`]; none until then).
    pub sources: Sources,
    /// The open incidents among [`Projection::cold`]: their state left
    /// memory to keep it within the limit ([`Projection::evict_over`]).
    pub cold_open: HashSet<Uuid>,
    /// The incidents in memory by when an entry last changed them (or they
    /// came back into memory), least recent first: the order they leave
    /// memory in when there are more than the limit.
    recent: BTreeSet<(u64, Uuid)>,
    recent_at: HashMap<Uuid, u64>,
    /// The clock of [`Projection::recent`].
    touches: u64,
    /// The severity map the incidents' tallies count by
    /// ([`Projection::set_severity`]; no tallies until then).
    severity: Option<std::sync::Arc<SeverityMap>>,
}

impl Projection {
    pub fn new() -> Self {
        Projection {
            next_number: 1,
            ..Default::default()
        }
    }

    /// Indexes the firing alerts of the open incidents in memory by
    /// `inhibitor`'s rules, and keeps them indexed from now on.
    pub fn set_inhibitor(&mut self, inhibitor: std::sync::Arc<Inhibitor>) {
        self.sources = Sources::new(inhibitor);
        for st in self.incidents.values() {
            index_sources(&mut self.sources, st);
        }
    }

    /// Keeps a tally of every incident's alerts by `map` from now on (the
    /// decisions' map: the tallies let an alert that resolves skip going
    /// through every alert of its incident).
    pub fn set_severity(&mut self, map: std::sync::Arc<SeverityMap>) {
        self.severity = Some(map);
        for st in self.incidents.values_mut() {
            st.tally = Tally::default();
        }
    }

    pub fn find(&self, r: &IncidentRef) -> Option<&IncidentState> {
        self.in_memory(&self.id_of(r)?)
    }

    /// Incident `id`'s state, if it is in memory.
    pub fn in_memory(&self, id: &Uuid) -> Option<&IncidentState> {
        self.incidents.get(id).map(Box::as_ref)
    }

    /// The id `r` names, if the incident exists (in memory or not).
    pub fn id_of(&self, r: &IncidentRef) -> Option<Uuid> {
        match r {
            IncidentRef::Id(id) => {
                (self.incidents.contains_key(id) || self.cold.contains(id)).then_some(*id)
            }
            IncidentRef::Number(n) => self.by_number.get(n).copied(),
        }
    }

    /// The incident an entry changes, if its state is not in memory: the
    /// service must [`Projection::restore`] it before folding the entry in.
    pub fn cold_target(&self, entry: &LogEntry) -> Option<Uuid> {
        match entry {
            LogEntry::Incident(e) => Some(e.incident.id).filter(|id| self.cold.contains(id)),
            LogEntry::Silence { .. } => None,
        }
    }

    /// Puts a cold incident's state (read from the store) back in memory.
    pub fn restore(&mut self, st: IncidentState) {
        let id = st.summary.id;
        if !self.cold.remove(&id) {
            return; // already in memory: the copy there is newer
        }
        self.cold_open.remove(&id);
        let resolved_at = resolved_key(&st);
        self.incidents.insert(id, Box::new(st));
        if let Some(at) = resolved_at {
            self.resolved.insert((at, id));
        }
        self.touch(id);
    }

    /// Puts a stored incident's state in memory as [`Store::load`] reads
    /// it, as recent as its number says (the newest stay when there are
    /// more than the limit).
    ///
    /// [`Store::load`]: crate::store::Store::load
    pub fn insert_loaded(&mut self, st: Box<IncidentState>) {
        let id = st.summary.id;
        index_sources(&mut self.sources, &st);
        if let Some(at) = resolved_key(&st) {
            self.resolved.insert((at, id));
        }
        self.recent_at.insert(id, st.summary.number);
        self.recent.insert((st.summary.number, id));
        self.touches = self.touches.max(st.summary.number);
        self.incidents.insert(id, st);
        self.reindex_snooze(id, None);
    }

    /// A stored incident that [`Store::load`] leaves out of memory (there
    /// are more than it keeps): as if loaded and then evicted, its number
    /// counted, its inhibiting alerts (those `st` holds) indexed.
    ///
    /// [`Store::load`]: crate::store::Store::load
    pub fn insert_out_of_memory(&mut self, st: &IncidentState) {
        let id = st.summary.id;
        index_sources(&mut self.sources, st);
        self.touches = self.touches.max(st.summary.number);
        if resolved_key(st).is_none() {
            self.cold_open.insert(id);
        }
        self.cold.insert(id);
    }

    /// A stored incident that stays out of memory as [`Store::load`]
    /// reads it (resolved before the reopen window).
    ///
    /// [`Store::load`]: crate::store::Store::load
    pub fn insert_cold(&mut self, id: Uuid) {
        self.cold.insert(id);
    }

    /// Marks incident `id` as just changed (or just back in memory).
    fn touch(&mut self, id: Uuid) {
        self.touches += 1;
        if let Some(old) = self.recent_at.insert(id, self.touches) {
            self.recent.remove(&(old, id));
        }
        self.recent.insert((self.touches, id));
    }

    /// Takes incident `id`, in memory, out of it (it is in the store).
    fn leave_memory(&mut self, id: Uuid) -> bool {
        let Some(st) = self.incidents.remove(&id) else {
            return false;
        };
        if let Some(t) = self.recent_at.remove(&id) {
            self.recent.remove(&(t, id));
        }
        match resolved_key(&st) {
            Some(at) => {
                self.resolved.remove(&(at, id));
            }
            None => {
                self.cold_open.insert(id);
            }
        }
        self.cold.insert(id);
        true
    }

    /// Takes the least recently changed incidents out of memory until at
    /// most `max` are left, open ones too (they stay in the store, and
    /// their number, dedup key and inhibiting alerts stay indexed; an input
    /// that touches one loads it back). Incidents changed since the last
    /// save and snoozed ones (the timer loop reads them) stay. Returns how
    /// many left.
    ///
    /// One that must stay goes to the back of the order, so the next call
    /// does not look at it again first; each call looks at every incident
    /// in memory at most once.
    pub fn evict_over(&mut self, max: usize) -> usize {
        let mut n = 0;
        let mut looks = self.recent.len();
        while self.incidents.len() > max && looks > 0 {
            looks -= 1;
            let Some((_, id)) = self.recent.pop_first() else {
                break;
            };
            let snoozed = self.in_memory(&id).and_then(snooze_timer).is_some();
            if snoozed || self.dirty.contains(&id) {
                self.touch(id);
            } else if self.leave_memory(id) {
                n += 1;
            }
        }
        n
    }

    /// Takes resolved incidents resolved before `before` out of memory
    /// (they stay in the store; their number and dedup key stay indexed).
    /// Incidents changed since the last save stay until they are saved.
    /// Returns how many left.
    pub fn evict(&mut self, before: Timestamp) -> usize {
        let mut kept = Vec::new();
        let mut n = 0;
        while let Some(&(at, id)) = self.resolved.first() {
            if at >= before {
                break;
            }
            if self.dirty.contains(&id) {
                self.resolved.pop_first();
                kept.push((at, id));
                continue;
            }
            if self.leave_memory(id) {
                n += 1;
            } else {
                self.resolved.pop_first();
            }
        }
        self.resolved.extend(kept);
        n
    }

    /// Keeps [`Projection::resolved`] in step with incident `id`, which was
    /// resolved at `before` (if it was) before the change.
    fn reindex_resolved(&mut self, id: Uuid, before: Option<Timestamp>) {
        if let Some(at) = before {
            self.resolved.remove(&(at, id));
        }
        if let Some(at) = self.in_memory(&id).and_then(resolved_key) {
            self.resolved.insert((at, id));
        }
    }

    /// Keeps [`Projection::snoozes`] in step with incident `id`, whose
    /// snooze ended at `before` (if it had one) before the change.
    pub fn reindex_snooze(&mut self, id: Uuid, before: Option<Timestamp>) {
        if let Some(at) = before {
            self.snoozes.remove(&(at, id));
        }
        if let Some((at, _)) = self.in_memory(&id).and_then(snooze_timer) {
            self.snoozes.insert((at, id));
        }
    }

    /// Folds one published entry (at stream sequence `seq`) into the projection.
    pub fn apply(&mut self, entry: &LogEntry, seq: u64) {
        if seq != 0 && seq <= self.incidents_seq {
            return; // already applied (a repeat acknowledged as duplicate)
        }
        match entry {
            LogEntry::Incident(e) => {
                let id = e.incident.id;
                let snoozed_until = self.in_memory(&id).and_then(snooze_timer).map(|(at, _)| at);
                let was_resolved_at = self.in_memory(&id).and_then(resolved_key);
                debug_assert!(
                    !self.cold.contains(&id),
                    "an entry for an incident not in memory must be restored first"
                );
                let was_open = self
                    .incidents
                    .get(&id)
                    .map(|st| st.summary.status != IncidentStatus::Resolved);
                let st = self.incidents.entry(id).or_insert_with(|| {
                    Box::new(IncidentState {
                        summary: e.incident.clone(),
                        alerts: BTreeMap::new(),
                        commands: VecDeque::new(),
                        batches: VecDeque::new(),
                        tally: Tally::default(),
                    })
                });
                let is_open = e.incident.status != IncidentStatus::Resolved;
                match (was_open, is_open) {
                    (None | Some(false), true) => self.open_count += 1,
                    (Some(true), false) => self.open_count = self.open_count.saturating_sub(1),
                    _ => {}
                }
                // The inhibiting sources: an incident that stays open
                // changes at most the alerts its entry names; one that
                // opens or resolves adds or takes all of its firing alerts.
                let named = alerts_of(&e.kind);
                let which = match (was_open == Some(true) && is_open, named.is_empty()) {
                    (true, true) => None,
                    (true, false) => Some(Some(&named[..])),
                    (false, _) => Some(None),
                };
                let which = which.filter(|_| self.sources.is_set());
                if let (Some(only), Some(true)) = (which, was_open) {
                    for a in firing(&st.alerts, only) {
                        self.sources.remove(id, &a.fingerprint, &a.labels);
                    }
                }
                match &self.severity {
                    Some(map) => change_tallied(st, &e.kind, &named, map),
                    None => change_alerts(&mut st.alerts, &e.kind),
                }
                if let (Some(only), true) = (which, is_open) {
                    for a in firing(&st.alerts, only) {
                        self.sources.add(id, &a.fingerprint, &a.labels);
                    }
                }
                st.summary = e.incident.clone();
                if let Cause::Command { id: cid } = &e.cause {
                    if !st.commands.contains(cid) {
                        st.commands.push_back(cid.clone());
                        if st.commands.len() > REMEMBERED_COMMANDS {
                            st.commands.pop_front();
                        }
                    }
                }
                self.by_key.insert(&e.incident.dedup_key, id);
                self.by_number.insert(e.incident.number, id);
                self.next_number = self.next_number.max(e.incident.number + 1);
                self.dirty.insert(id);
                self.dirty_alerts
                    .extend(named.into_iter().map(|fp| (id, fp)));
                self.reindex_snooze(id, snoozed_until);
                self.reindex_resolved(id, was_resolved_at);
                self.touch(id);
                self.inputs_at = self.inputs_at.max(e.at);
            }
            LogEntry::Silence { change, .. } => match change {
                SilenceChange::Created { silence } => {
                    // Validated before it was published; an invalid one in an
                    // old log is skipped, not fatal.
                    if let Err(e) = self.silences.insert(silence.clone()) {
                        tracing::warn!(id = %silence.id, error = %e, "skipping invalid silence in the log");
                    }
                    self.dirty_silences.insert(silence.id.clone());
                }
                SilenceChange::Expired { id } => {
                    self.silences.remove(id);
                    self.dirty_silences.insert(id.clone());
                }
            },
        }
        if let Some(at) = AlertPos::of(entry.cause()) {
            self.alerts_cursor = self.alerts_cursor.max(at);
        }
        self.last_cause = Some(entry.cause().clone());
        if seq != 0 {
            self.incidents_seq = seq;
        }
    }

    /// Applies the entries of one INCIDENTS message of several (stream
    /// sequence `seq`), in order, as [`Projection::apply`] applies one,
    /// and notes where each incident's entries are stored.
    pub fn apply_batch(&mut self, entries: &[LogEntry], seq: u64) {
        if seq <= self.incidents_seq {
            return; // already applied
        }
        for e in entries {
            self.apply(e, 0);
        }
        self.batch_stored(entries, seq);
        self.incidents_seq = seq;
    }

    /// Notes that `entries`, already applied, were stored in the message
    /// at stream sequence `seq`, in each of their incidents (see
    /// [`IncidentState::batches`]); each is in memory, as an incident is
    /// while its entries are applied and until it is saved.
    pub fn batch_stored(&mut self, entries: &[LogEntry], seq: u64) {
        for id in entries.iter().filter_map(LogEntry::incident_id) {
            let Some(st) = self.incidents.get_mut(&id) else {
                continue;
            };
            if st.batches.back().is_some_and(|last| *last >= seq) {
                continue; // noted (two of its entries in one message)
            }
            st.batches.push_back(seq);
            if st.batches.len() > REMEMBERED_BATCHES {
                st.batches.pop_front();
            }
            self.dirty.insert(id);
        }
    }

    /// Where to resume reading ALERTS: the last alert again if it may be
    /// only partly published, else the one after it.
    pub fn alerts_resume_from(&self) -> AlertPos {
        match self.last_cause.as_ref().and_then(AlertPos::of) {
            Some(last) if last == self.alerts_cursor => AlertPos {
                seq: last.seq.max(1),
                ..last
            },
            _ => self.alerts_cursor.next(),
        }
    }

    /// Firing alerts of open incidents (for inhibition).
    pub fn firing_alerts(&self) -> impl Iterator<Item = (&Fingerprint, &Labels)> + Clone {
        self.incidents
            .values()
            .filter(|i| i.summary.status != IncidentStatus::Resolved)
            .flat_map(|i| i.alerts.values())
            .filter(|a| a.status == AlertStatus::Firing)
            .map(|a| (&a.fingerprint, &a.labels))
    }
}

/// Adds the firing alerts of `st`, if it is open, to the inhibiting sources.
fn index_sources(sources: &mut Sources, st: &IncidentState) {
    if st.summary.status != IncidentStatus::Resolved {
        for a in firing(&st.alerts, None) {
            sources.add(st.summary.id, &a.fingerprint, &a.labels);
        }
    }
}

/// The alert an event changes, if it changes one.
/// The alerts an entry changes (none for entries that change none).
fn alerts_of(kind: &EventKind) -> Vec<Fingerprint> {
    match kind {
        EventKind::AlertResolved { .. } => {
            kind.resolved().into_iter().map(|r| r.fingerprint).collect()
        }
        _ => kind.alerts().map(|a| a.fingerprint.clone()).collect(),
    }
}

/// The firing alerts among `alerts`: only those of `only`, if given (they
/// may be absent or not firing), or all of them.
fn firing<'a>(alerts: &'a Alerts, only: Option<&[Fingerprint]>) -> Vec<&'a AlertInfo> {
    let pick: Box<dyn Iterator<Item = &'a AlertInfo>> = match only {
        Some(fps) => Box::new(fps.iter().filter_map(|fp| alerts.get(fp).map(|a| &**a))),
        None => Box::new(alerts.values().map(|a| &**a)),
    };
    pick.filter(|a| a.status == AlertStatus::Firing).collect()
}

/// The alert-map part of an event, shared by deciding and applying.
fn change_alerts(alerts: &mut Alerts, kind: &EventKind) {
    match kind {
        EventKind::Opened { .. } | EventKind::AlertFiring { .. } => {
            for alert in kind.alerts() {
                alerts.insert(alert.fingerprint.clone(), Box::new(alert.clone()));
            }
        }
        EventKind::AlertResolved { .. } => {
            for r in kind.resolved() {
                if let Some(a) = alerts.get_mut(&r.fingerprint) {
                    a.status = AlertStatus::Resolved;
                    a.ends_at = Some(r.ends_at);
                }
            }
        }
        _ => {}
    }
}

/// [`change_alerts`], keeping `st`'s tally by `map` (`named`: the alerts
/// `kind` names): the alerts it names are counted out before and in after;
/// a state without a tally gets one counted over all its alerts.
fn change_tallied(
    st: &mut IncidentState,
    kind: &EventKind,
    named: &[Fingerprint],
    map: &SeverityMap,
) {
    let IncidentState { alerts, tally, .. } = st;
    match tally.0.as_mut() {
        Some(c) => {
            let named: BTreeSet<&Fingerprint> = named.iter().collect();
            for fp in &named {
                if let Some(a) = alerts.get(*fp) {
                    c.count(a, map, false);
                }
            }
            change_alerts(alerts, kind);
            for fp in &named {
                if let Some(a) = alerts.get(*fp) {
                    c.count(a, map, true);
                }
            }
        }
        None => {
            change_alerts(alerts, kind);
            *tally = Tally(Some(Counts::of(alerts, map)));
        }
    }
}

/// Settings the decisions depend on.
pub struct CoreConfig {
    pub group_by: Vec<String>,
    pub group_wait: SignedDuration,
    pub reopen_window: SignedDuration,
    pub auto_resolve: bool,
    pub severity: std::sync::Arc<SeverityMap>,
    pub inhibitor: std::sync::Arc<Inhibitor>,
    /// Silences from config (maintenance windows).
    pub windows: SilenceIndex,
    /// Silences that may exist at once (`incidents.max_silences`).
    pub max_silences: usize,
}

/// The answer to a command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Accepted(String),
    Rejected(String),
}

/// Decides inputs against a projection.
pub struct Decider<'a> {
    pub cfg: &'a CoreConfig,
    pub proj: &'a Projection,
    /// An incident the decision needed whose state is not in memory. A
    /// decision that sets it is not to be used: the caller restores that
    /// incident and decides again.
    pub missed: Cell<Option<Uuid>>,
}

/// Accumulates the entries of one input, stepping a scratch copy of each
/// incident so every event carries the incident as it is after it.
struct Batch<'a> {
    cfg: &'a CoreConfig,
    cause: Cause,
    at: Timestamp,
    actor: Option<Actor>,
    entries: Vec<LogEntry>,
}

impl Batch<'_> {
    /// An entry whose incident-after is already known (see
    /// [`joined_summary`]), taken from the incident as stored: its
    /// revision moves on here.
    fn push_summary(&mut self, mut summary: IncidentSummary, kind: EventKind) {
        next_revision(&mut summary, &kind);
        self.push_entry(summary, kind);
    }

    fn push_entry(&mut self, incident: IncidentSummary, kind: EventKind) {
        self.entries.push(LogEntry::Incident(IncidentEvent {
            kind,
            at: self.at,
            actor: self.actor.clone(),
            cause: self.cause.clone(),
            incident,
        }));
    }

    /// Steps the scratch incident `st` (its revision too, so a second
    /// entry of the same input stepped from it is newer again) and pushes
    /// the entry.
    fn push(&mut self, st: &mut IncidentState, kind: EventKind) {
        step(st, &kind, self.at, self.actor.as_ref(), self.cfg);
        next_revision(&mut st.summary, &kind);
        self.push_entry(st.summary.clone(), kind);
    }
}

/// Moves `summary`'s revision on for an entry of `kind`: every entry but a
/// receipt changes the incident ([`IncidentSummary::revision`]).
fn next_revision(summary: &mut IncidentSummary, kind: &EventKind) {
    if !kind.is_receipt() {
        summary.revision += 1;
    }
}

/// Applies `kind` to a scratch incident and recomputes what derives from it.
fn step(
    st: &mut IncidentState,
    kind: &EventKind,
    at: Timestamp,
    actor: Option<&Actor>,
    cfg: &CoreConfig,
) {
    change_alerts(&mut st.alerts, kind);
    let s = &mut st.summary;
    let clear_ack = |s: &mut IncidentSummary| {
        s.acknowledged_at = None;
        s.acknowledged_by = None;
        s.snoozed_until = None;
    };
    match kind {
        EventKind::Acknowledged => {
            s.status = IncidentStatus::Acknowledged;
            s.acknowledged_at = Some(at);
            s.acknowledged_by = actor.cloned();
        }
        EventKind::Unacknowledged | EventKind::SnoozeEnded | EventKind::Escalated { .. } => {
            s.status = IncidentStatus::Triggered;
            clear_ack(s);
        }
        EventKind::Snoozed { until } => {
            if s.status == IncidentStatus::Triggered {
                s.status = IncidentStatus::Acknowledged;
                s.acknowledged_at = Some(at);
                s.acknowledged_by = actor.cloned();
            }
            s.snoozed_until = Some(*until);
        }
        EventKind::Assigned { user } => s.assignee = Some(user.clone()),
        EventKind::Resolved { .. } => {
            s.status = IncidentStatus::Resolved;
            s.resolved_at = Some(at);
            s.snoozed_until = None;
        }
        EventKind::Reopened => {
            s.status = IncidentStatus::Triggered;
            s.resolved_at = None;
            s.reopen_count += 1;
            clear_ack(s);
        }
        EventKind::Opened { .. }
        | EventKind::AlertFiring { .. }
        | EventKind::AlertResolved { .. }
        | EventKind::NoteAdded { .. }
        | EventKind::Remediation { .. }
        | EventKind::Paged { .. }
        | EventKind::Delivery { .. }
        | EventKind::Runbook { .. } => {}
    }
    recompute(st, cfg);
}

/// The summary of open incident `inc` after firing alert `info` joins it
/// or fires again, worked out from the summary alone, without copying the
/// incident's alerts or looking at each of them: an incident with 10,000
/// alerts would otherwise cost 10,000 copies for every alert that joins
/// it. `None` where that cannot be done exactly (suppression, which
/// depends on every firing alert; an alert whose labels changed; no
/// alerts yet): the caller then steps a copy as for any other event.
/// Exact because the alert-derived fields are counts, a maximum over the
/// firing alerts (or over all of them while none fires) and an
/// intersection, all of which only grow or stay when a firing alert is
/// added; debug builds check every use against the full recomputation.
/// One difference: the severity kept is the one worked out under the
/// config of its time, so a severity map changed since reaches an open
/// incident at its next full recomputation (a resolved alert, a command).
fn joined_summary(
    inc: &IncidentState,
    info: &AlertInfo,
    cfg: &CoreConfig,
) -> Option<IncidentSummary> {
    if info.status != AlertStatus::Firing
        || info.suppressed.is_some()
        || inc.summary.suppressed.is_some()
        || inc.alerts.is_empty()
    {
        return None;
    }
    let old = inc.alerts.get(&info.fingerprint);
    if old.is_some_and(|o| o.labels != info.labels || o.suppressed.is_some()) {
        return None;
    }
    let was_firing = old.is_some_and(|o| o.status == AlertStatus::Firing);
    let mut s = inc.summary.clone();
    if old.is_none() {
        s.alerts_total += 1;
        s.labels.retain(|k, v| info.labels.get(k) == Some(v));
    }
    if !was_firing {
        s.alerts_firing += 1;
    }
    let severity = cfg.severity.of(&info.labels);
    // While no alert fired, the severity was over every alert; now it is
    // over the firing ones, and this is the only one.
    s.severity = if inc.summary.alerts_firing == 0 {
        severity
    } else {
        s.severity.max(severity)
    };
    #[cfg(debug_assertions)]
    {
        // The full path, for comparison (an alert event does not use
        // its time or actor).
        let mut st = inc.clone();
        let kind = EventKind::alert_firing(info.clone());
        step(&mut st, &kind, inc.summary.opened_at, None, cfg);
        debug_assert_eq!(st.summary, s, "incremental summary");
    }
    Some(s)
}

/// The summary of open incident `inc` after its firing alert `known`
/// resolves, worked out from the summary and the incident's tally instead
/// of a copy of the incident stepped through every alert: an incident with
/// 10,000 alerts whose alerts all resolve would otherwise cost 10,000
/// copies for each. `None` where that cannot be done exactly (no tally:
/// the projection has no severity map; every firing alert left would be
/// suppressed, where the reason is the first one's): the caller then
/// steps a copy. Exact because resolving changes neither the alerts nor
/// their common labels, only which fire: the count, and the highest
/// severity among the firing ones (or all, once none fires), which the
/// tally counts by severity; debug builds check every use against the
/// full recomputation.
fn resolved_summary(
    inc: &IncidentState,
    known: &AlertInfo,
    cfg: &CoreConfig,
) -> Option<IncidentSummary> {
    let mut c = inc.tally.0?;
    if known.status != AlertStatus::Firing || inc.summary.alerts_firing == 0 {
        return None;
    }
    let s = cfg.severity.of(&known.labels) as usize;
    c.firing[s] = c.firing[s].checked_sub(1)?;
    if known.suppressed.is_some() {
        c.firing_suppressed = c.firing_suppressed.checked_sub(1)?;
    }
    let mut summary = inc.summary.clone();
    summary.alerts_firing -= 1;
    if summary.alerts_firing > 0 && c.firing_suppressed == summary.alerts_firing {
        return None;
    }
    summary.suppressed = None;
    let pool = if summary.alerts_firing > 0 {
        &c.firing
    } else {
        &c.all
    };
    summary.severity = highest(pool).unwrap_or(Severity::Info);
    #[cfg(debug_assertions)]
    {
        // The full path, for comparison (resolving does not use the
        // event's time or actor).
        let mut st = inc.clone();
        let kind = EventKind::AlertResolved {
            fingerprint: known.fingerprint.clone(),
            ends_at: inc.summary.opened_at,
            more: Vec::new(),
        };
        step(&mut st, &kind, inc.summary.opened_at, None, cfg);
        debug_assert_eq!(st.summary, summary, "incremental summary on resolve");
        debug_assert_eq!(
            Some(Counts::of(&inc.alerts, &cfg.severity)),
            inc.tally.0,
            "the tally counts the incident's alerts"
        );
    }
    Some(summary)
}

/// Fields that follow from the attached alerts.
fn recompute(st: &mut IncidentState, cfg: &CoreConfig) {
    let firing: Vec<&AlertInfo> = st
        .alerts
        .values()
        .map(|a| &**a)
        .filter(|a| a.status == AlertStatus::Firing)
        .collect();
    let s = &mut st.summary;
    s.alerts_total = st.alerts.len() as u32;
    s.alerts_firing = firing.len() as u32;
    let pool: Vec<&AlertInfo> = if firing.is_empty() {
        st.alerts.values().map(|a| &**a).collect()
    } else {
        firing.clone()
    };
    s.severity = pool
        .iter()
        .map(|a| cfg.severity.of(&a.labels))
        .max()
        .unwrap_or(Severity::Info);
    s.suppressed = if !firing.is_empty() && firing.iter().all(|a| a.suppressed.is_some()) {
        firing[0].suppressed.clone()
    } else {
        None
    };
    let mut common: Option<Labels> = None;
    for a in st.alerts.values() {
        common = Some(match common {
            None => a.labels.clone(),
            Some(mut c) => {
                c.retain(|k, v| a.labels.get(k) == Some(v));
                c
            }
        });
    }
    s.labels = common.unwrap_or_default();
}

/// What is wrong with a person's text in `cmd` (a note, a user, a reason,
/// a silence's comment, the actor's name) that holds a control character
/// other than a line break or a tab: such text is refused, as ingest
/// refuses it in annotations, so a timeline never carries sequences that
/// would drive the terminal or chat client showing it.
fn control_text(cmd: &Command) -> Option<String> {
    let mut fields: Vec<(&str, &str)> = vec![("the actor's name", &cmd.actor.name)];
    match &cmd.action {
        Action::Note { text, .. } => fields.push(("the note", text)),
        Action::Assign { user, .. } => fields.push(("the user", user)),
        Action::Escalate { reason, .. } => fields.push(("the reason", reason)),
        Action::CreateSilence { silence } => {
            fields.push(("the silence's comment", &silence.comment));
            fields.push(("the silence's creator", &silence.created_by));
        }
        _ => {}
    }
    fields.into_iter().find_map(|(what, text)| {
        text.chars()
            .find(|c| c.is_control() && !matches!(c, '\n' | '\t' | '\r'))
            .map(|c| {
                format!(
                    "{what} holds the control character U+{:04X}; text may hold line breaks and \
                     tabs, no other control characters",
                    c as u32
                )
            })
    })
}

/// `group_by: ['...']`, as in Alertmanager: group by every label (so each
/// distinct alert is an incident of its own).
pub const GROUP_BY_EVERY_LABEL: &str = "...";

/// The dedup key of an alert: the sender's key when it gives one (scoped to
/// the integration, as PagerDuty scopes keys to a routing key), else the
/// grouping labels.
pub fn dedup_key(cfg: &CoreConfig, source: &str, alert: &Alert) -> String {
    if let Some(k) = &alert.dedup_key {
        return sender_key(source, k);
    }
    let group: Labels = if cfg.group_by.iter().any(|n| n == GROUP_BY_EVERY_LABEL) {
        // Alertmanager's `group_by: ['...']`: every label.
        alert.labels.clone()
    } else if !cfg.group_by.is_empty() {
        cfg.group_by
            .iter()
            .map(|n| (n.clone(), alert.labels.get(n).cloned().unwrap_or_default()))
            .collect()
    } else if !alert.origin.group_labels.is_empty() {
        let mut g = alert.origin.group_labels.clone();
        if let Some(name) = alert.labels.get("alertname") {
            g.insert("alertname".into(), name.clone());
        }
        g
    } else {
        alert.labels.clone()
    };
    let body: Vec<String> = group.iter().map(|(k, v)| format!("{k}={v:?}")).collect();
    format!("labels:{{{}}}", body.join(","))
}

fn title_for(alert: &Alert, key: &str) -> String {
    if let Some(s) = alert
        .annotations
        .get("summary")
        .filter(|s| !s.trim().is_empty())
    {
        return s.chars().take(200).collect();
    }
    if let Some(name) = alert.alertname() {
        let extra: Vec<String> = alert
            .origin
            .group_labels
            .iter()
            .filter(|(k, _)| k.as_str() != "alertname")
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        return if extra.is_empty() {
            name.to_string()
        } else {
            format!("{name} ({})", extra.join(", "))
        };
    }
    key.chars().take(200).collect()
}

/// A UUID v7 derived from the input, so deciding the same input twice
/// names the same incident.
fn incident_id(at: Timestamp, cause: &Cause, key: &str) -> Uuid {
    let digest = Sha256::digest(format!("{}|{key}", cause.key()).as_bytes());
    let mut rand = [0u8; 10];
    rand.copy_from_slice(&digest[..10]);
    let ms = at.as_millisecond().max(0) as u64;
    uuid::Builder::from_unix_timestamp_millis(ms, &rand).into_uuid()
}

fn alert_info(alert: &Alert, suppressed: Option<String>) -> AlertInfo {
    AlertInfo {
        fingerprint: alert.fingerprint.clone(),
        status: alert.status,
        labels: alert.labels.clone(),
        annotations: alert.annotations.clone(),
        starts_at: alert.starts_at,
        ends_at: alert.ends_at,
        generator_url: alert.generator_url.clone(),
        suppressed,
    }
}

/// Most alerts one `opened` or `alert_firing` entry carries.
pub const MAX_RUN: usize = 256;

/// Joins `next`, the one entry of the alert after `run`'s last in the same
/// ALERTS message, to `run` when both attach firing alerts to the same
/// incident at the same time (`opened` or `alert_firing`, then
/// `alert_firing`), or both resolve alerts of it (`alert_resolved`): `run`
/// then ends with `next`'s alert and takes its incident (as it is after
/// that alert) and its cause, so the entry stands for the run's alerts
/// decided one after another. Gives `next` back otherwise.
pub fn join_run(run: &mut LogEntry, next: LogEntry) -> Option<LogEntry> {
    let (LogEntry::Incident(r), LogEntry::Incident(n)) = (&mut *run, &next) else {
        return Some(next);
    };
    let same_message = matches!(
        (&r.cause, &n.cause),
        (Cause::Alert { seq: a, .. }, Cause::Alert { seq: b, .. }) if a == b
    );
    let room = match &r.kind {
        EventKind::Opened { more, .. } | EventKind::AlertFiring { more, .. } => {
            more.len() + 1 < MAX_RUN
        }
        EventKind::AlertResolved { more, .. } => more.len() + 1 < MAX_RUN,
        _ => false,
    };
    let fits = match (&r.kind, &n.kind) {
        (
            EventKind::Opened { .. } | EventKind::AlertFiring { .. },
            EventKind::AlertFiring { more, .. },
        ) => more.is_empty(),
        (EventKind::AlertResolved { .. }, EventKind::AlertResolved { more, .. }) => more.is_empty(),
        _ => false,
    };
    if !(same_message
        && room
        && fits
        && r.incident.id == n.incident.id
        && r.at == n.at
        && r.actor == n.actor)
    {
        return Some(next);
    }
    let LogEntry::Incident(n) = next else {
        return None; // checked above
    };
    match (&mut r.kind, n.kind) {
        (
            EventKind::Opened { more, .. } | EventKind::AlertFiring { more, .. },
            EventKind::AlertFiring { alert, .. },
        ) => more.push(alert),
        (
            EventKind::AlertResolved { more, .. },
            EventKind::AlertResolved {
                fingerprint,
                ends_at,
                ..
            },
        ) => more.push(ResolvedAlert {
            fingerprint,
            ends_at,
        }),
        _ => {} // checked above
    }
    r.incident = n.incident;
    r.cause = n.cause;
    None
}

impl<'a> Decider<'a> {
    pub fn new(cfg: &'a CoreConfig, proj: &'a Projection) -> Self {
        Decider {
            cfg,
            proj,
            missed: Cell::new(None),
        }
    }

    /// Incident `id`'s state, noting in [`Decider::missed`] when it is
    /// not in memory.
    fn state(&self, id: Uuid) -> Option<&'a IncidentState> {
        let proj: &'a Projection = self.proj;
        if proj.cold.contains(&id) {
            self.missed.set(Some(id));
        }
        proj.in_memory(&id)
    }

    fn batch(&self, cause: Cause, at: Timestamp, actor: Option<Actor>) -> Batch<'_> {
        Batch {
            cfg: self.cfg,
            cause,
            at,
            actor,
            entries: Vec::new(),
        }
    }

    fn suppression(&self, alert: &Alert, at: Timestamp) -> Option<String> {
        if let Some(id) = self.proj.silences.silenced_by(&alert.labels, at) {
            return Some(format!("silenced by {id}"));
        }
        if let Some(id) = self.cfg.windows.silenced_by(&alert.labels, at) {
            return Some(format!("in maintenance window {id}"));
        }
        if self.cfg.inhibitor.is_empty() {
            return None;
        }
        // A projection built without the rules (the core's unit tests)
        // goes through every firing alert; the service's looks its index
        // up, which debug builds check against that.
        let scan = || {
            // Sorted, so the source named in the reason is the same on every run.
            let mut firing: Vec<(&Fingerprint, &Labels)> = self.proj.firing_alerts().collect();
            firing.sort_by(|a, b| a.0.cmp(b.0));
            self.cfg
                .inhibitor
                .inhibited_by(&alert.labels, firing.iter().copied())
        };
        if !self.proj.sources.is_set() {
            return scan();
        }
        let indexed = self.proj.sources.inhibited_by(&alert.labels);
        // (The scan sees only the incidents in memory.)
        debug_assert!(
            !self.proj.cold_open.is_empty() || indexed == scan(),
            "the index of inhibiting sources is stale"
        );
        indexed
    }

    /// Entries for one alert event received at `env.received_at`.
    pub fn alert(&self, cause: Cause, env: &Envelope<Alert>) -> Vec<LogEntry> {
        let alert = &env.body;
        let at = env.received_at;
        let key = dedup_key(self.cfg, &env.source, alert);
        let latest = self.proj.by_key.get(&key).and_then(|id| self.state(*id));
        match alert.status {
            AlertStatus::Acknowledged => {
                let actor = Actor::new(env.source.clone(), "integration");
                let mut b = self.batch(cause, at, Some(actor));
                if let Some(inc) = latest.filter(|i| i.summary.status == IncidentStatus::Triggered)
                {
                    let mut st = inc.clone();
                    b.push(&mut st, EventKind::Acknowledged);
                }
                b.entries
            }
            AlertStatus::Firing => self.firing(cause, at, &key, alert, latest),
            AlertStatus::Resolved => {
                let mut b = self.batch(cause, at, None);
                let Some((inc, known)) =
                    latest.and_then(|i| Some((i, i.alerts.get(&alert.fingerprint)?)))
                else {
                    return b.entries;
                };
                if known.status == AlertStatus::Firing {
                    let kind = EventKind::AlertResolved {
                        fingerprint: alert.fingerprint.clone(),
                        ends_at: alert.ends_at.unwrap_or(at),
                        more: Vec::new(),
                    };
                    // Alerts still fire (or nothing resolves with the
                    // last): the summary alone says what changes.
                    if let Some(summary) = resolved_summary(inc, known, self.cfg)
                        .filter(|s| s.alerts_firing > 0 || !self.cfg.auto_resolve)
                    {
                        b.push_summary(summary, kind);
                        return b.entries;
                    }
                    let mut st = inc.clone();
                    b.push(&mut st, kind);
                    self.auto_resolve(&mut b, &mut st);
                } else if self.resolves_with_last_alert(inc) {
                    // Resolved already (a repeat, as Alertmanager lists a
                    // group's resolved alerts in each notification): a copy
                    // only when the incident resolves with it.
                    let mut st = inc.clone();
                    self.auto_resolve(&mut b, &mut st);
                }
                b.entries
            }
        }
    }

    /// Whether `st` resolves now that none of its alerts fires.
    fn resolves_with_last_alert(&self, st: &IncidentState) -> bool {
        self.cfg.auto_resolve
            && st.summary.status != IncidentStatus::Resolved
            && st.summary.alerts_firing == 0
            && !st.alerts.is_empty()
            && st
                .alerts
                .values()
                .all(|a| a.status == AlertStatus::Resolved)
    }

    fn auto_resolve(&self, b: &mut Batch<'_>, st: &mut IncidentState) {
        if self.resolves_with_last_alert(st) {
            b.push(
                st,
                EventKind::Resolved {
                    reason: ResolveReason::AllAlertsResolved,
                },
            );
        }
    }

    fn firing(
        &self,
        cause: Cause,
        at: Timestamp,
        key: &str,
        alert: &Alert,
        latest: Option<&IncidentState>,
    ) -> Vec<LogEntry> {
        let suppressed = self.suppression(alert, at);
        let info = alert_info(alert, suppressed);
        let mut b = self.batch(cause.clone(), at, None);
        // The alert as the incident would hold it, and whether it already
        // does. An alert that is still firing keeps its earliest start, as
        // Alertmanager merges an alert that is still active: a sender that
        // leaves out `startsAt` (the alert then starts when received) and
        // posts the same alert again, a retry after a lost answer or a
        // re-post of what still fires, changes nothing.
        let held = |inc: &IncidentState| {
            let mut info = info.clone();
            let held = inc.alerts.get(&alert.fingerprint);
            if let Some(a) = held.filter(|a| a.status == AlertStatus::Firing) {
                info.starts_at = info.starts_at.min(a.starts_at);
            }
            let unchanged = held.is_some_and(|a| {
                a.status == AlertStatus::Firing
                    && a.starts_at == info.starts_at
                    && a.labels == info.labels
                    && a.annotations == info.annotations
                    && a.suppressed == info.suppressed
            });
            (info, unchanged)
        };
        match latest {
            Some(inc) if inc.summary.status != IncidentStatus::Resolved => {
                let (info, unchanged) = held(inc);
                if !unchanged {
                    match joined_summary(inc, &info, self.cfg) {
                        Some(summary) => b.push_summary(summary, EventKind::alert_firing(info)),
                        None => {
                            let mut st = inc.clone();
                            b.push(&mut st, EventKind::alert_firing(info));
                        }
                    }
                }
            }
            Some(inc) => {
                let resolved_at = inc.summary.resolved_at.unwrap_or(inc.summary.opened_at);
                let repeat = inc.alerts.get(&alert.fingerprint).is_some_and(|a| {
                    a.status == AlertStatus::Firing && a.starts_at == alert.starts_at
                });
                if repeat {
                    // A repeat notification of an alert that was still firing
                    // when someone resolved the incident: not a new problem.
                } else if at.duration_since(resolved_at) <= self.cfg.reopen_window {
                    // Reopened; the alert as the open incident would take
                    // it (so a crash between the two entries decides the
                    // second the same way).
                    let (merged, unchanged) = held(inc);
                    let mut st = inc.clone();
                    b.push(&mut st, EventKind::Reopened);
                    if !unchanged {
                        b.push(&mut st, EventKind::alert_firing(merged));
                    }
                } else {
                    self.open(&mut b, key, alert, info);
                }
            }
            None => self.open(&mut b, key, alert, info),
        }
        b.entries
    }

    fn open(&self, b: &mut Batch<'_>, key: &str, alert: &Alert, info: AlertInfo) {
        let at = b.at;
        let mut st = IncidentState {
            summary: IncidentSummary {
                announce_at: at.checked_add(self.cfg.group_wait).unwrap_or(at),
                ..IncidentSummary::new(
                    incident_id(at, &b.cause, key),
                    self.proj.next_number,
                    key,
                    title_for(alert, key),
                    at,
                )
            },
            alerts: BTreeMap::new(),
            commands: VecDeque::new(),
            batches: VecDeque::new(),
            tally: Tally::default(),
        };
        b.push(&mut st, EventKind::opened(info));
    }

    /// Entries for a command, and the answer to give.
    pub fn command(&self, cmd: &Command, at: Timestamp) -> (Vec<LogEntry>, Verdict) {
        if let Some(reason) = control_text(cmd) {
            return (vec![], Verdict::Rejected(reason));
        }
        let cause = Cause::Command { id: cmd.id.clone() };
        let mut b = self.batch(cause.clone(), at, Some(cmd.actor.clone()));
        let verdict = match &cmd.action {
            Action::CreateSilence { silence } => {
                if self
                    .proj
                    .silences
                    .get(&silence.id)
                    .is_some_and(|s| s == silence)
                {
                    return (
                        vec![],
                        Verdict::Accepted(format!("silence {} already exists", silence.id)),
                    );
                }
                if !tocsin_proto::subjects::is_valid_token(&silence.id) {
                    return (
                        vec![],
                        Verdict::Rejected(format!(
                            "silence id {:?} must be 1-64 letters, digits, - or _",
                            silence.id
                        )),
                    );
                }
                let count = self.proj.silences.len();
                if count >= self.cfg.max_silences && self.proj.silences.get(&silence.id).is_none() {
                    return (
                        vec![],
                        Verdict::Rejected(format!(
                            "{count} silences exist, at most {} (incidents.max_silences): expire one first, or raise the limit",
                            self.cfg.max_silences
                        )),
                    );
                }
                match crate::silences::validate_silence(silence) {
                    Err(e) => return (vec![], Verdict::Rejected(format!("invalid silence: {e}"))),
                    Ok(()) => {
                        let entry = LogEntry::Silence {
                            change: SilenceChange::Created {
                                silence: silence.clone(),
                            },
                            at,
                            actor: cmd.actor.clone(),
                            cause,
                        };
                        return (
                            vec![entry],
                            Verdict::Accepted(format!("silence {} created", silence.id)),
                        );
                    }
                }
            }
            Action::ExpireSilence { id } => {
                if self.proj.silences.get(id).is_none() {
                    return (vec![], Verdict::Rejected(format!("no silence {id}")));
                }
                let entry = LogEntry::Silence {
                    change: SilenceChange::Expired { id: id.clone() },
                    at,
                    actor: cmd.actor.clone(),
                    cause,
                };
                return (
                    vec![entry],
                    Verdict::Accepted(format!("silence {id} expired")),
                );
            }
            other => {
                let Some(r) = other.incident() else {
                    return (
                        vec![],
                        Verdict::Rejected("command names no incident".into()),
                    );
                };
                let Some(inc) = self.proj.id_of(r).and_then(|id| self.state(id)) else {
                    return (vec![], Verdict::Rejected(format!("no incident {r}")));
                };
                if inc.commands.contains(&cmd.id) {
                    return (
                        vec![],
                        Verdict::Accepted(format!("command {} was already applied", cmd.id)),
                    );
                }
                let mut st = inc.clone();
                let n = st.summary.number;
                let status = st.summary.status;
                let resolved = status == IncidentStatus::Resolved;
                let resolved_msg =
                    || Verdict::Rejected(format!("incident #{n} is already resolved"));
                match other {
                    Action::Ack { .. } => match status {
                        IncidentStatus::Resolved => resolved_msg(),
                        IncidentStatus::Acknowledged => {
                            let by = st
                                .summary
                                .acknowledged_by
                                .as_ref()
                                .map(|a| format!("{} ({})", a.name, a.via))
                                .unwrap_or_else(|| "someone".into());
                            let when = st
                                .summary
                                .acknowledged_at
                                .map(|t| format!(" at {t}"))
                                .unwrap_or_default();
                            Verdict::Rejected(format!(
                                "incident #{n} was already acknowledged by {by}{when}"
                            ))
                        }
                        IncidentStatus::Triggered => {
                            b.push(&mut st, EventKind::Acknowledged);
                            Verdict::Accepted(format!("incident #{n} acknowledged"))
                        }
                    },
                    Action::Unack { .. } => {
                        if status == IncidentStatus::Acknowledged {
                            b.push(&mut st, EventKind::Unacknowledged);
                            Verdict::Accepted(format!("incident #{n} is triggered again"))
                        } else {
                            Verdict::Rejected(format!(
                                "incident #{n} is {}, not acknowledged",
                                status.as_str()
                            ))
                        }
                    }
                    Action::Resolve { .. } => {
                        if resolved {
                            resolved_msg()
                        } else {
                            b.push(
                                &mut st,
                                EventKind::Resolved {
                                    reason: ResolveReason::Manual,
                                },
                            );
                            Verdict::Accepted(format!("incident #{n} resolved"))
                        }
                    }
                    Action::Snooze { seconds, .. } => {
                        if resolved {
                            resolved_msg()
                        } else if *seconds == 0 || *seconds > 7 * 86_400 {
                            Verdict::Rejected(format!(
                                "snooze of {seconds}s is out of range (1s to 7 days)"
                            ))
                        } else {
                            let until = at
                                .checked_add(SignedDuration::from_secs(*seconds as i64))
                                .unwrap_or(at);
                            b.push(&mut st, EventKind::Snoozed { until });
                            // To the second: people read this answer.
                            Verdict::Accepted(format!(
                                "incident #{n} snoozed until {}",
                                until.strftime("%Y-%m-%dT%H:%M:%SZ")
                            ))
                        }
                    }
                    Action::Reopen { .. } => {
                        if resolved {
                            b.push(&mut st, EventKind::Reopened);
                            Verdict::Accepted(format!("incident #{n} reopened"))
                        } else {
                            Verdict::Rejected(format!(
                                "incident #{n} is {}, not resolved",
                                status.as_str()
                            ))
                        }
                    }
                    Action::Escalate { reason, .. } => {
                        if resolved {
                            resolved_msg()
                        } else {
                            b.push(
                                &mut st,
                                EventKind::Escalated {
                                    reason: reason.clone(),
                                },
                            );
                            Verdict::Accepted(format!("incident #{n} escalated"))
                        }
                    }
                    Action::Assign { user, .. } => {
                        if user.trim().is_empty() {
                            Verdict::Rejected("assign needs a user".into())
                        } else {
                            b.push(&mut st, EventKind::Assigned { user: user.clone() });
                            Verdict::Accepted(format!("incident #{n} assigned to {user}"))
                        }
                    }
                    Action::Note { text, .. } => {
                        if text.trim().is_empty() || text.len() > 10_000 {
                            Verdict::Rejected("a note must have 1 to 10000 characters".into())
                        } else {
                            b.push(&mut st, EventKind::NoteAdded { text: text.clone() });
                            Verdict::Accepted(format!("note added to incident #{n}"))
                        }
                    }
                    Action::Remediation {
                        runbook,
                        step,
                        status,
                        detail,
                        hold_until,
                        ..
                    } => {
                        b.push(
                            &mut st,
                            EventKind::Remediation {
                                runbook: runbook.clone(),
                                step: step.clone(),
                                status: status.clone(),
                                detail: detail.clone(),
                                hold_until: *hold_until,
                            },
                        );
                        Verdict::Accepted(format!("remediation step recorded on incident #{n}"))
                    }
                    Action::Paged {
                        level,
                        repeat,
                        pages,
                        reason,
                        fired,
                        ..
                    } => {
                        if resolved {
                            resolved_msg()
                        } else {
                            b.push(
                                &mut st,
                                EventKind::Paged {
                                    level: *level,
                                    repeat: *repeat,
                                    pages: pages.clone(),
                                    reason: reason.clone(),
                                    fired: fired.clone(),
                                },
                            );
                            Verdict::Accepted(format!("pages recorded on incident #{n}"))
                        }
                    }
                    Action::Delivery { delivery, .. } => {
                        // Recorded whatever the incident's state: a page
                        // sent just before a resolve still happened.
                        b.push(
                            &mut st,
                            EventKind::Delivery {
                                delivery: delivery.clone(),
                            },
                        );
                        Verdict::Accepted(format!("delivery recorded on incident #{n}"))
                    }
                    Action::Runbook { request, .. } => {
                        let (what, name) = match request {
                            RunbookRequest::Run { runbook, .. } => ("runbook", runbook),
                            RunbookRequest::Approve { run } | RunbookRequest::Deny { run } => {
                                ("run", run)
                            }
                        };
                        let ok = !name.is_empty()
                            && name.len() <= 200
                            && name.bytes().all(|c| {
                                c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.')
                            });
                        if resolved {
                            resolved_msg()
                        } else if !ok {
                            Verdict::Rejected(format!(
                                "{what} {name:?} must be 1 to 200 letters, digits, `-`, `_` or `.`"
                            ))
                        } else {
                            b.push(
                                &mut st,
                                EventKind::Runbook {
                                    request: request.clone(),
                                },
                            );
                            Verdict::Accepted(format!(
                                "{} of {what} {name} recorded on incident #{n} for the remediation service",
                                request.op()
                            ))
                        }
                    }
                    Action::CreateSilence { .. } | Action::ExpireSilence { .. } => {
                        unreachable!("handled above")
                    }
                }
            }
        };
        (b.entries, verdict)
    }

    /// Entries for timers due at `now`: snoozes that ran out. The timer id
    /// names the incident and the snooze, so a restart repeats nothing.
    /// Timers `skip` names are left out (the service gave up on them).
    pub fn timers(&self, now: Timestamp, skip: impl Fn(&Cause) -> bool) -> Vec<LogEntry> {
        let mut due: Vec<(&IncidentState, Timestamp, Cause)> = self
            .proj
            .snoozes
            .iter()
            .take_while(|(at, _)| *at <= now)
            .filter_map(|(_, id)| self.proj.in_memory(id))
            .filter_map(|i| snooze_timer(i).map(|(at, cause)| (i, at, cause)))
            .filter(|(_, _, cause)| !skip(cause))
            .collect();
        due.sort_by_key(|(i, _, _)| i.summary.number);
        let mut out = Vec::new();
        for (inc, until, cause) in due {
            let mut b = self.batch(cause, until, Some(Actor::new("tocsin", "tocsin")));
            let mut st = inc.clone();
            b.push(&mut st, EventKind::SnoozeEnded);
            out.extend(b.entries);
        }
        out
    }

    /// The earliest snooze end not skipped, for the timer loop.
    pub fn next_timer(&self, skip: impl Fn(&Cause) -> bool) -> Option<Timestamp> {
        let next = self
            .proj
            .snoozes
            .iter()
            .filter_map(|(_, id)| self.proj.in_memory(id).and_then(snooze_timer))
            .find(|(_, cause)| !skip(cause))
            .map(|(at, _)| at);
        debug_assert_eq!(
            next,
            self.proj
                .incidents
                .values()
                .filter_map(|st| snooze_timer(st))
                .filter(|(_, cause)| !skip(cause))
                .map(|(at, _)| at)
                .min(),
            "the snooze index is stale"
        );
        next
    }
}

/// When `inc` was resolved, if it is resolved (the eviction order).
fn resolved_key(inc: &IncidentState) -> Option<Timestamp> {
    (inc.summary.status == IncidentStatus::Resolved)
        .then(|| inc.summary.resolved_at.unwrap_or(inc.summary.opened_at))
}

/// The timer that ends `inc`'s snooze, if it is snoozed and not resolved:
/// when it is due, and its cause.
pub fn snooze_timer(inc: &IncidentState) -> Option<(Timestamp, Cause)> {
    if inc.summary.status == IncidentStatus::Resolved {
        return None;
    }
    let until = inc.summary.snoozed_until?;
    let cause = Cause::Timer {
        id: format!("snooze-{}-{}", inc.summary.id.simple(), until.as_second()),
    };
    Some((until, cause))
}

fn sender_key(source: &str, key: &str) -> String {
    format!("key:{source}:{key}")
}

/// The source name heartbeat alerts are decided under.
pub const HEARTBEAT_SOURCE: &str = "heartbeat";

/// The dedup key of heartbeat `name`'s incident (what [`dedup_key`] gives
/// for [`heartbeat_alert`] under [`HEARTBEAT_SOURCE`]).
pub fn heartbeat_key(name: &str) -> String {
    sender_key(HEARTBEAT_SOURCE, &heartbeat_sender_key(name))
}

fn heartbeat_sender_key(name: &str) -> String {
    format!("heartbeat-{name}")
}

/// A synthetic alert for a missed heartbeat (firing) or a ping (resolved).
pub fn heartbeat_alert(
    name: &str,
    labels: &BTreeMap<String, String>,
    summary: Option<&str>,
    firing: bool,
    at: Timestamp,
    since: Timestamp,
) -> Alert {
    let l: Labels = labels
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .chain([
            ("alertname".to_string(), "HeartbeatMissed".to_string()),
            ("heartbeat".to_string(), name.to_string()),
        ])
        .collect();
    let mut annotations = Labels::new();
    annotations.insert(
        "summary".into(),
        summary
            .map(str::to_string)
            .unwrap_or_else(|| format!("Heartbeat {name} missed: no ping since {since}")),
    );
    let identity: Labels = [("heartbeat".to_string(), name.to_string())].into();
    Alert {
        fingerprint: Fingerprint::from_labels(&identity),
        status: if firing {
            AlertStatus::Firing
        } else {
            AlertStatus::Resolved
        },
        labels: l,
        annotations,
        starts_at: since,
        ends_at: (!firing).then_some(at),
        generator_url: None,
        dedup_key: Some(heartbeat_sender_key(name)),
        origin: tocsin_proto::Origin {
            kind: Some(SourceKind::Heartbeat),
            ..Default::default()
        },
    }
}

/// Silences in a log-independent form, for the store.
pub fn silence_list(proj: &Projection) -> Vec<Silence> {
    proj.silences.list().cloned().collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limits::tests::alert;

    #[test]
    fn group_by_every_label_is_alertmanager_s_three_dots() {
        // `group_by: ['...']` in Alertmanager groups by every label: no two
        // alerts with different labels share an incident.
        let cfg = crate::compile(&crate::config::IncidentsConfig {
            group_by: vec!["...".into()],
            ..Default::default()
        })
        .unwrap();
        let a = alert(&[("alertname", "Down"), ("instance", "a")]);
        let b = alert(&[("alertname", "Down"), ("instance", "b")]);
        assert_ne!(dedup_key(&cfg, "am", &a), dedup_key(&cfg, "am", &b));
        assert_eq!(dedup_key(&cfg, "am", &a), dedup_key(&cfg, "am", &a.clone()));
        // Named labels still group: both are one `Down`.
        let cfg = crate::compile(&crate::config::IncidentsConfig {
            group_by: vec!["alertname".into()],
            ..Default::default()
        })
        .unwrap();
        assert_eq!(dedup_key(&cfg, "am", &a), dedup_key(&cfg, "am", &b));
    }

    #[test]
    fn a_person_s_text_with_control_characters_is_refused() {
        use tocsin_proto::{command::IncidentRef, incident::Actor};
        let cmd = |name: &str, action: Action| Command::new(Actor::new(name, "cli"), action);
        let note = |text: &str| Action::Note {
            incident: IncidentRef::Number(1),
            text: text.into(),
        };
        assert_eq!(
            control_text(&cmd("alice", note("line one\n\tline two"))),
            None
        );
        let refused = [
            cmd("alice", note("see \u{1b}]0;t\u{7}")),
            cmd("al\u{1b}[2Jice", note("fine")),
            cmd(
                "alice",
                Action::Assign {
                    incident: IncidentRef::Number(1),
                    user: "bob\u{0}".into(),
                },
            ),
        ];
        for (c, what) in refused
            .iter()
            .zip(["the note", "the actor's name", "the user"])
        {
            let reason = control_text(c).unwrap_or_default();
            assert!(reason.starts_with(what), "{reason}");
        }
    }

    #[test]
    fn group_by_takes_label_names_only() {
        for (group_by, reason) in [
            (vec!["...", "alertname"], "cannot be combined"),
            (vec!["alert name"], "not a label name"),
            (vec![""], "not a label name"),
        ] {
            let err = crate::compile(&crate::config::IncidentsConfig {
                group_by: group_by.iter().map(|s| s.to_string()).collect(),
                ..Default::default()
            })
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
            assert!(err.contains(reason), "{group_by:?}: {err}");
        }
    }

    #[test]
    fn keys_index_their_newest_incident_by_digest_and_keys_differing_anywhere_stay_apart() {
        let mut keys = ByKey::default();
        let (a, b, c) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
        let k1 = r#"labels:{alertname="Down",instance="a:9100"}"#;
        // Differs from k1 in its last byte only.
        let k2 = r#"labels:{alertname="Down",instance="a:9101"}"#;
        keys.insert(k1, a);
        keys.insert(k2, b);
        assert_eq!(keys.get(k1), Some(&a));
        assert_eq!(keys.get(k2), Some(&b));
        assert_eq!(keys.get("labels:{}"), None);
        // A newer incident with the key replaces the older one.
        keys.insert(k1, c);
        assert_eq!(keys.get(k1), Some(&c));
        assert_eq!(keys.len(), 2);
    }
}
