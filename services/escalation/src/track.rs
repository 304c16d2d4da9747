//! The pure escalation state machine: one [`Track`] per incident and policy,
//! moved by incident events and by time. No IO: the service feeds it and
//! performs the [`Effect`]s it returns.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use jiff::{SignedDuration, Timestamp};
use serde::{Deserialize, Serialize};
use tocsin_proto::{
    command::{Action, Command, IncidentRef},
    incident::{Actor, EventKind, Fired, IncidentEvent, IncidentStatus, IncidentSummary},
    notify::{Channel, MessageKind, Page, PageTarget},
};
use uuid::Uuid;

use crate::plan::{Next, PlannedPage, Planner};

/// A rule step that pages later than its level fired (`after: 5m`).
/// Stored by field place in a [`Track`]: a new field goes last, with a
/// default (see `store::encode`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pending {
    pub due: Timestamp,
    pub level: u32,
    pub repeat: u32,
    pub target: PageTarget,
    pub channel: Channel,
    pub address: String,
    pub step: u32,
    pub reason: String,
}

/// Where one incident is in one policy. The store keeps it by field place
/// (see `store::encode`): a new field goes last, with `#[serde(default)]`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Track {
    pub incident: IncidentSummary,
    pub policy: String,
    /// The level that fires at `next_at`, in round `repeat`.
    pub level: u32,
    pub repeat: u32,
    /// None while stopped: acknowledged, snoozed, or every level done.
    pub next_at: Option<Timestamp>,
    pub pending: Vec<Pending>,
    /// The last level that fired, to resume from after an unacknowledge.
    pub fired: Option<(u32, u32)>,
    /// When to page the acknowledger again (stale acknowledgement).
    pub renotify_at: Option<Timestamp>,
    #[serde(default)]
    pub renotified: u32,
    /// Changes when the incident reopens or is paged again after an
    /// unacknowledge, a snooze or an escalate-now, so those pages get new ids.
    #[serde(default)]
    pub generation: u32,
    /// While a runbook holds the first level back (`page: on_failure`): when
    /// the level was due before the hold. The hold ends at `next_at`, or
    /// sooner when the run ends.
    #[serde(default)]
    pub held_from: Option<Timestamp>,
    /// Why the next level fires early (an escalate-now reason, a failed
    /// runbook), put on its pages.
    #[serde(default)]
    pub cause: Option<String>,
    /// The last level fired or skipped: generation, level, round. A
    /// `paged` record for it changes nothing ([`Tracks::on_event`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_fired: Option<(u32, u32, u32)>,
    /// The track as it was before its generation last changed, and what
    /// changed it since, until a `paged` record of the new generation comes
    /// back: a record of a level fired before the change is applied to it
    /// and the changes played again ([`Tracks::on_event`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub before: Option<Box<Before>>,
}

/// A track before an unacknowledge, a snooze's end or an escalate-now
/// changed its generation, and the events that changed it since (that one
/// first).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Before {
    pub track: Track,
    pub events: Vec<(EventKind, Timestamp)>,
}

/// How many changes a [`Before`] keeps; past that it is let go.
const BEFORE_EVENTS: usize = 8;

impl Track {
    /// A track whose first level fires at `at`, in `generation`; `cause`
    /// goes on that level's pages.
    fn at_first_level(
        incident: IncidentSummary,
        policy: String,
        at: Timestamp,
        generation: u32,
        cause: Option<String>,
    ) -> Track {
        Track {
            incident,
            policy,
            level: 0,
            repeat: 0,
            next_at: Some(at),
            pending: Vec::new(),
            fired: None,
            renotify_at: None,
            renotified: 0,
            generation,
            held_from: None,
            cause,
            last_fired: None,
            before: None,
        }
    }

    /// The earliest moment this track needs attention.
    pub fn due(&self) -> Option<Timestamp> {
        let pending = self.pending.iter().map(|p| p.due).min();
        [self.next_at, pending, self.renotify_at]
            .into_iter()
            .flatten()
            .min()
    }
}

/// What the service must do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Effect {
    /// Publish to NOTIFY (`Nats-Msg-Id` = page id when sent alone).
    Page(Box<Page>),
    /// Publish to COMMANDS (`Nats-Msg-Id` = command id when sent alone):
    /// the timeline record.
    Record(Box<Command>),
}

impl Effect {
    /// The subject it is published on when sent alone.
    pub fn subject(&self) -> String {
        match self {
            Effect::Page(p) => p.subject(),
            Effect::Record(c) => c.subject(),
        }
    }

    /// Its page or command id.
    pub fn id(&self) -> &str {
        match self {
            Effect::Page(p) => &p.id,
            Effect::Record(c) => &c.id,
        }
    }

    pub fn page(&self) -> Option<&Page> {
        match self {
            Effect::Page(p) => Some(p),
            Effect::Record(_) => None,
        }
    }

    pub fn record(&self) -> Option<&Command> {
        match self {
            Effect::Record(c) => Some(c),
            Effect::Page(_) => None,
        }
    }
}

/// Key of a track: incident and policy.
pub type Key = (Uuid, String);

/// Where [`Tracks::due_after`] left off.
#[derive(Clone, Copy, Debug)]
pub struct DueCursor(Due);

/// One entry of the due-time index: the due time (seconds, then
/// nanoseconds), the incident and the policy's number, packed big-endian
/// into 32 bytes so that the bytes sort as the tuple does. A tuple of the
/// same fields takes 40 (alignment padding): a million pending timers grew
/// the service by 196 MiB instead of 218 (`bench escalation`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Due([u8; 32]);

impl Due {
    fn new(at: Timestamp, incident: Uuid, policy: PolicyId) -> Due {
        // Whole seconds and the nanoseconds past them (both truncated
        // towards zero, so of one sign) order as the timestamps do;
        // flipping the sign bits makes the two's-complement values sort
        // as unsigned big-endian bytes do.
        let secs = (at.as_second() as u64) ^ (1 << 63);
        let nanos = (at.subsec_nanosecond() as u32) ^ (1 << 31);
        let mut b = [0u8; 32];
        b[..8].copy_from_slice(&secs.to_be_bytes());
        b[8..12].copy_from_slice(&nanos.to_be_bytes());
        b[12..28].copy_from_slice(incident.as_bytes());
        b[28..].copy_from_slice(&policy.to_be_bytes());
        Due(b)
    }

    fn field<const N: usize>(&self, from: usize) -> [u8; N] {
        let mut f = [0u8; N];
        f.copy_from_slice(&self.0[from..from + N]);
        f
    }

    fn at(&self) -> Timestamp {
        let secs = (u64::from_be_bytes(self.field(0)) ^ (1 << 63)) as i64;
        let nanos = (u32::from_be_bytes(self.field(8)) ^ (1 << 31)) as i32;
        // Always valid: both parts came from one timestamp.
        Timestamp::new(secs, nanos).unwrap_or(Timestamp::MAX)
    }

    fn incident(&self) -> Uuid {
        Uuid::from_bytes(self.field(12))
    }

    fn policy(&self) -> PolicyId {
        PolicyId::from_be_bytes(self.field(28))
    }
}

/// A policy's number in [`Tracks`]' table of names: the due-time index
/// holds it instead of the name, so each entry is a few dozen bytes
/// whatever the policy is called.
type PolicyId = u32;

/// The tracks and a due-time index over all of them.
///
/// Used alone (the unit tests) `map` holds every track. The service holds
/// only the index in memory (a million pending timers is a normal load for
/// a fleet): the tracks live in its store, and `map` is the working set, the
/// tracks of the incidents being handled. The service loads an incident's
/// tracks before it hands the incident to [`Tracks::on_event`] or
/// [`Tracks::fire`] ([`Tracks::load`]), saves what changed, then lets the
/// working set go ([`Tracks::release`]).
#[derive(Default)]
pub struct Tracks {
    /// The tracks at hand (see above).
    pub map: BTreeMap<Key, Track>,
    /// Every track with a due time, at hand or not.
    index: BTreeSet<Due>,
    /// The tracks at hand and those removed since they were loaded or
    /// created, with the due time each is indexed under (None: not
    /// indexed). A key absent here and in `map` is no track, or a stored
    /// one whose incident is not loaded.
    known: HashMap<Key, Option<Timestamp>>,
    /// Incidents whose stored tracks are all at hand.
    loaded: HashSet<Uuid>,
    /// Policy names by [`PolicyId`], and back.
    policies: Vec<String>,
    policy_ids: HashMap<String, PolicyId>,
    /// How many tracks there are, at hand or not.
    count: usize,
}

fn actor() -> Actor {
    Actor::new("escalation", "escalation")
}

fn add(at: Timestamp, d: std::time::Duration) -> Timestamp {
    SignedDuration::try_from(d)
        .ok()
        .and_then(|d| at.checked_add(d).ok())
        .unwrap_or(Timestamp::MAX)
}

impl Tracks {
    /// Adds a stored track that is not at hand to the index and the count
    /// (the service, reading its store at start-up).
    pub fn index_stored(&mut self, key: &Key, due: Option<Timestamp>) {
        if let Some(d) = due {
            let policy = self.policy_id(&key.1);
            self.index.insert(Due::new(d, key.0, policy));
        }
        self.count += 1;
    }

    /// Whether `incident`'s stored tracks are at hand.
    pub fn is_loaded(&self, incident: Uuid) -> bool {
        self.loaded.contains(&incident)
    }

    /// Puts `incident`'s stored tracks at hand (all of them, as the store
    /// has them: each indexed under its due time already). Once per
    /// incident until [`Tracks::release`]: what is at hand may have
    /// changed since it was stored.
    pub fn load(&mut self, incident: Uuid, stored: Vec<Track>) {
        if !self.loaded.insert(incident) {
            return;
        }
        for t in stored {
            let key = (incident, t.policy.clone());
            self.known.insert(key.clone(), t.due());
            self.map.insert(key, t);
        }
    }

    /// Lets the tracks at hand go (once every change is saved): the index
    /// and the count keep them.
    pub fn release(&mut self) {
        self.map.clear();
        self.known.clear();
        self.loaded.clear();
    }

    /// Lets the tracks of `incidents` at hand go (once every change of them
    /// is saved; `keys`, what was saved for them, may name tracks removed
    /// since they were loaded): a long burst lets each chunk go once it is
    /// saved, while the chunks after it are still on their way.
    pub fn release_incidents(&mut self, incidents: &HashSet<Uuid>, keys: &[Key]) {
        for k in keys {
            if incidents.contains(&k.0) {
                self.known.remove(k);
            }
        }
        for id in incidents {
            if !self.loaded.remove(id) {
                continue;
            }
            let at_hand: Vec<Key> = self
                .map
                .range((*id, String::new())..)
                .take_while(|(k, _)| k.0 == *id)
                .map(|(k, _)| k.clone())
                .collect();
            for k in at_hand {
                self.map.remove(&k);
                self.known.remove(&k);
            }
        }
    }

    /// How many tracks there are.
    pub fn count(&self) -> usize {
        self.count
    }

    fn policy_id(&mut self, name: &str) -> PolicyId {
        if let Some(id) = self.policy_ids.get(name) {
            return *id;
        }
        let id = PolicyId::try_from(self.policies.len()).unwrap_or(PolicyId::MAX);
        self.policies.push(name.to_string());
        self.policy_ids.insert(name.to_string(), id);
        id
    }

    /// Updates the index entry and the count of a track at hand (or just
    /// removed).
    fn touch(&mut self, key: &Key) {
        let policy = self.policy_id(&key.1);
        let old = self.known.remove(key);
        if let Some(Some(d)) = old {
            self.index.remove(&Due::new(d, key.0, policy));
        }
        match self.map.get(key) {
            Some(t) => {
                let due = t.due();
                if let Some(d) = due {
                    self.index.insert(Due::new(d, key.0, policy));
                }
                self.known.insert(key.clone(), due);
                if old.is_none() {
                    self.count += 1;
                }
            }
            None if old.is_some() => self.count -= 1,
            None => {}
        }
    }

    /// The keys of one incident's tracks (keys sort by incident first).
    fn keys_of(&self, id: Uuid) -> Vec<Key> {
        self.map
            .range((id, String::new())..)
            .take_while(|(k, _)| k.0 == id)
            .map(|(k, _)| k.clone())
            .collect()
    }

    /// Keys whose tracks changed are returned (to save them).
    pub fn on_event(&mut self, planner: &Planner, ev: &IncidentEvent) -> Vec<Key> {
        let changed = self.on_event_inner(planner, ev);
        for k in &changed {
            self.touch(k);
        }
        changed
    }

    fn on_event_inner(&mut self, planner: &Planner, ev: &IncidentEvent) -> Vec<Key> {
        let inc = &ev.incident;
        let keys: Vec<Key> = self.keys_of(inc.id);
        if inc.status == IncidentStatus::Resolved || inc.suppressed.is_some() {
            for k in &keys {
                self.map.remove(k);
            }
            return keys;
        }
        // The tracks whose copy of the incident this event changes.
        let mut differ = Vec::new();
        for k in &keys {
            if let Some(t) = self.map.get_mut(k) {
                if t.incident != *inc {
                    t.incident = inc.clone();
                    differ.push(k.clone());
                }
            }
        }
        let start = |tracks: &mut Self, at: Timestamp| -> Vec<Key> {
            // The incident's own tracks (a range: keys sort by incident).
            for k in tracks.keys_of(inc.id) {
                tracks.map.remove(&k);
            }
            let mut out = Vec::new();
            for policy in planner.route(inc) {
                let key = (inc.id, policy.clone());
                let generation = inc.reopen_count.saturating_mul(1000);
                tracks.map.insert(
                    key.clone(),
                    Track::at_first_level(inc.clone(), policy, at, generation, None),
                );
                out.push(key);
            }
            out
        };
        match &ev.kind {
            EventKind::Opened { .. } => {
                let mut changed = start(self, inc.announce_at.max(ev.at));
                changed.extend(keys);
                changed
            }
            EventKind::Reopened => {
                let mut changed = start(self, ev.at);
                changed.extend(keys);
                changed
            }
            EventKind::Unacknowledged | EventKind::SnoozeEnded | EventKind::Escalated { .. }
                if keys.is_empty() =>
            {
                start(self, ev.at)
            }
            kind if moves_tracks(kind) => {
                let followed = policies(&keys);
                for k in &keys {
                    if let Some(t) = self.map.get_mut(k) {
                        remember(t, kind, ev.at);
                        apply(t, planner, kind, ev.at, &followed);
                    }
                }
                keys
            }
            // A `paged` record is written once the step's pages are stored:
            // the step fired. The instance that fired it has moved on and
            // this changes nothing there; one that follows the log (a
            // standby, or this one after a crash before it saved) moves
            // its track as firing did, so a takeover does not fire it
            // again.
            EventKind::Paged {
                level,
                repeat,
                fired: Some(fired),
                ..
            } => {
                let key = (inc.id, fired.policy.clone());
                let followed = policies(&keys);
                let marked = self
                    .map
                    .get_mut(&key)
                    .is_some_and(|t| mark(t, planner, &followed, fired, *level, *repeat, ev.at));
                if marked && !differ.contains(&key) {
                    differ.push(key);
                }
                differ
            }
            // The notifier's receipt for a page: it was stored on NOTIFY.
            // A rule step that pages later than its level (`after: 5m`)
            // has no record of its own; its receipt takes it off the
            // pending steps of a track that did not fire it. The page may
            // have been sent in the generation before this one (an
            // escalate-now came between the page and its receipt; it keeps
            // the pending steps).
            EventKind::Delivery { delivery } => {
                for k in &keys {
                    let Some(t) = self.map.get_mut(k) else {
                        continue;
                    };
                    let mut changed = drop_delivered(t, inc.id, &delivery.id);
                    if let Some(b) = t.before.as_deref_mut() {
                        changed |= drop_delivered(&mut b.track, inc.id, &delivery.id);
                    }
                    if changed && !differ.contains(k) {
                        differ.push(k.clone());
                    }
                }
                differ
            }
            // Notes and other runbook progress change nothing here but the
            // tracks' copy of the incident, and only when the incident
            // itself changed (a receipt usually leaves it as it was):
            // nothing else is to be saved.
            EventKind::NoteAdded { .. }
            | EventKind::Paged { .. }
            | EventKind::Remediation { .. }
            | EventKind::Runbook { .. }
            | EventKind::Assigned { .. } => differ,
            _ => {
                // An incident that was suppressed at first and now pages.
                if keys.is_empty() && inc.status == IncidentStatus::Triggered {
                    return start(self, ev.at);
                }
                keys
            }
        }
    }

    /// The earliest due moment over all tracks (from the index).
    pub fn next_due(&self) -> Option<Timestamp> {
        self.index.first().map(Due::at)
    }

    /// Keys due at `now`, earliest first (from the index).
    pub fn due(&self, now: Timestamp) -> Vec<Key> {
        self.due_after(now, None, usize::MAX).0
    }

    /// Up to `n` keys due at `now` that come after `after` in the index,
    /// earliest first, and where the next call starts (None: no more). A
    /// burst of a million due steps is taken a chunk at a time, without a
    /// list of them all; a track fired meanwhile is indexed under a later
    /// time, and one whose time did not change is not taken twice.
    pub fn due_after(
        &self,
        now: Timestamp,
        after: Option<&DueCursor>,
        n: usize,
    ) -> (Vec<Key>, Option<DueCursor>) {
        use std::ops::Bound::{Excluded, Unbounded};
        let from = after.map_or(Unbounded, |c| Excluded(c.0));
        // Every entry due at `now` sorts at or before this one.
        let last = Due::new(now, Uuid::max(), PolicyId::MAX);
        let entries: Vec<Due> = self
            .index
            .range((from, Unbounded))
            .take_while(|d| **d <= last)
            .take(n)
            .copied()
            .collect();
        let next = (entries.len() == n)
            .then(|| entries.last().copied().map(DueCursor))
            .flatten();
        let keys = entries
            .into_iter()
            .map(|d| {
                let policy = self
                    .policies
                    .get(d.policy() as usize)
                    .cloned()
                    .unwrap_or_default();
                (d.incident(), policy)
            })
            .collect();
        (keys, next)
    }

    /// Fires what is due on `key` at `now`, keeping the index up to date.
    /// The keys of tracks this starts besides `key` are added to `started`
    /// (to be saved with it).
    pub fn fire(
        &mut self,
        planner: &Planner,
        key: &Key,
        now: Timestamp,
        started: &mut Vec<Key>,
    ) -> Vec<Effect> {
        let mut effects = self.fire_inner(planner, key, now);
        self.touch(key);
        if !planner.has_policy(&key.1) {
            effects.extend(self.follow_the_route(planner, key, now, started));
        }
        effects
    }

    /// A track whose policy is no longer configured (renamed or removed
    /// while its incident was open) must not end the paging: when its next
    /// level is due, the incident follows the policies its route gives now,
    /// from their first level, in a new generation (new page ids: nobody's
    /// page is taken for one already sent), each page saying why. The old
    /// track keeps only its rule steps still to come, if any.
    fn follow_the_route(
        &mut self,
        planner: &Planner,
        key: &Key,
        now: Timestamp,
        started: &mut Vec<Key>,
    ) -> Vec<Effect> {
        let Some(t) = self.map.get_mut(key) else {
            return Vec::new();
        };
        if t.incident.status != IncidentStatus::Triggered || t.next_at.is_none_or(|at| at > now) {
            return Vec::new();
        }
        t.next_at = None;
        let (incident, generation) = (t.incident.clone(), t.generation + 1);
        if t.due().is_none() {
            self.map.remove(key);
        }
        self.touch(key);
        let cause = format!("policy {} is no longer configured", key.1);
        let mut out = Vec::new();
        let mut now_following = Vec::new();
        for policy in planner.route(&incident) {
            let k = (incident.id, policy.clone());
            if self.map.contains_key(&k) {
                continue;
            }
            self.map.insert(
                k.clone(),
                Track::at_first_level(
                    incident.clone(),
                    policy.clone(),
                    now,
                    generation,
                    Some(cause.clone()),
                ),
            );
            out.extend(self.fire_inner(planner, &k, now));
            self.touch(&k);
            started.push(k);
            now_following.push(policy);
        }
        if now_following.is_empty() {
            tracing::warn!(
                incident = incident.number,
                policy = %key.1,
                "the incident's escalation policy is no longer configured and its route names no other it is not already following; it escalates no further"
            );
        } else {
            tracing::warn!(
                incident = incident.number,
                policy = %key.1,
                now = %now_following.join(", "),
                "the incident's escalation policy is no longer configured; it follows the policies its route names now, from their first level"
            );
        }
        out
    }

    fn fire_inner(&mut self, planner: &Planner, key: &Key, now: Timestamp) -> Vec<Effect> {
        // Only a track whose policy is gone asks which others it follows.
        let followed = match planner.has_policy(&key.1) {
            true => Vec::new(),
            false => policies(&self.keys_of(key.0)),
        };
        let Some(t) = self.map.get_mut(key) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        let inc_id = t.incident.id;
        let generation = t.generation;
        // Delayed rule steps.
        let (due, later): (Vec<Pending>, Vec<Pending>) =
            t.pending.drain(..).partition(|p| p.due <= now);
        t.pending = later;
        for p in due {
            out.push(page(
                &t.incident,
                generation,
                p.level,
                p.repeat,
                p.target,
                p.channel,
                p.address,
                p.step,
                p.reason,
                p.due,
            ));
        }
        // A stale acknowledgement.
        if let Some(at) = t.renotify_at.filter(|at| *at <= now) {
            if t.incident.status == IncidentStatus::Acknowledged {
                let who = t
                    .incident
                    .acknowledged_by
                    .as_ref()
                    .map(|a| a.name.clone())
                    .unwrap_or_default();
                let (level, repeat) = t.fired.unwrap_or((0, 0));
                let reason = format!(
                    "acknowledged by {who} but still open; reminder {}",
                    t.renotified + 1
                );
                let mut descriptions = Vec::new();
                for pg in planner
                    .user_pages(&who, t.incident.severity, None)
                    .into_iter()
                    .filter(|p| p.step == 0)
                {
                    descriptions.push(describe(&pg));
                    out.push(page(
                        &t.incident,
                        generation,
                        level,
                        repeat,
                        pg.target,
                        pg.channel,
                        pg.address,
                        100 + t.renotified,
                        reason.clone(),
                        at,
                    ));
                }
                if !descriptions.is_empty() {
                    out.push(record(
                        inc_id,
                        generation,
                        &t.policy,
                        level,
                        repeat,
                        Some(t.renotified),
                        descriptions,
                        reason,
                    ));
                }
                t.renotified += 1;
                t.renotify_at = planner
                    .reminder_interval(&t.policy, &t.incident, &followed)
                    .map(|d| add(now, d));
            } else {
                t.renotify_at = None;
            }
        }
        // A policy no longer configured has no levels: the caller moves
        // the incident on ([`Tracks::follow_the_route`]).
        if !planner.has_policy(&t.policy) {
            return out;
        }
        // The next level, skipping empty ones when the policy says so.
        let mut guard = 0;
        while let Some(at) = t.next_at.filter(|at| *at <= now) {
            guard += 1;
            if t.incident.status != IncidentStatus::Triggered || guard > 64 {
                t.next_at = None;
                break;
            }
            if !fire_level(t, planner, at, now, &mut out) {
                break;
            }
        }
        out
    }
}

/// Fires the level `t` is at, due at `at`: its pages due now go to `out`
/// with its record, its later rule steps to `t.pending`; `t` moves on to
/// the next level. Returns whether the level was skipped (empty, and the
/// policy skips empty levels): then the next one fires at once too.
fn fire_level(
    t: &mut Track,
    planner: &Planner,
    at: Timestamp,
    now: Timestamp,
    out: &mut Vec<Effect>,
) -> bool {
    let (level, repeat, generation) = (t.level, t.repeat, t.generation);
    let plan = planner.level(&t.policy, level, &t.incident, now);
    let next = planner.next(&t.policy, level, repeat, t.incident.severity);
    let skip = plan.empty.is_some() && planner.skip_empty_levels(&t.policy);
    // Levels are numbered from 1 for people (the wire's are 0-based).
    let shown = level + 1;
    let reason = if skip {
        format!(
            "level {shown} of policy {} skipped: {}",
            t.policy,
            plan.empty.clone().unwrap_or_default()
        )
    } else if level == 0 && repeat == 0 {
        format!("level 1 of policy {}", t.policy)
    } else {
        format!(
            "level {shown} (round {}) of policy {}: not acknowledged",
            repeat + 1,
            t.policy
        )
    };
    let reason = match t.cause.take() {
        Some(c) if !skip => format!("{reason}: {c}"),
        _ => reason,
    };
    t.held_from = None;
    let mut descriptions = Vec::new();
    for pg in plan.pages {
        descriptions.push(describe(&pg));
        if pg.after.is_zero() {
            out.push(page(
                &t.incident,
                generation,
                level,
                repeat,
                pg.target,
                pg.channel,
                pg.address,
                pg.step,
                reason.clone(),
                at,
            ));
        } else {
            t.pending.push(Pending {
                due: add(at, pg.after),
                level,
                repeat,
                target: pg.target,
                channel: pg.channel,
                address: pg.address,
                step: pg.step,
                reason: reason.clone(),
            });
        }
    }
    out.push(record(
        t.incident.id,
        generation,
        &t.policy,
        level,
        repeat,
        None,
        descriptions,
        reason,
    ));
    if !skip {
        t.fired = Some((level, repeat));
    }
    t.last_fired = Some((generation, level, repeat));
    match next {
        Next::Level {
            level: l,
            repeat: r,
            after,
        } => {
            t.level = l;
            t.repeat = r;
            t.next_at = Some(if skip { at } else { add(at, after) });
        }
        Next::Exhausted => t.next_at = None,
    }
    skip
}

/// Takes the rule step whose page `page_id` was delivered off `t`'s pending
/// steps (sent in `t`'s generation or the one before). Returns whether it
/// was there.
fn drop_delivered(t: &mut Track, incident: Uuid, page_id: &str) -> bool {
    let before = t.pending.len();
    let generations = [t.generation, t.generation.saturating_sub(1)];
    t.pending.retain(|p| {
        generations.iter().all(|g| {
            Page::make_id(
                &incident, *g, p.level, p.repeat, &p.target, p.channel, p.step,
            ) != page_id
        })
    });
    t.pending.len() != before
}

/// Whether [`apply`] changes a track for `kind`.
fn moves_tracks(kind: &EventKind) -> bool {
    match kind {
        EventKind::Acknowledged
        | EventKind::Snoozed { .. }
        | EventKind::Unacknowledged
        | EventKind::SnoozeEnded
        | EventKind::Escalated { .. } => true,
        EventKind::Remediation { step, .. } => step == "run",
        _ => false,
    }
}

/// The policies of an incident's tracks (`keys`, all of one incident).
fn policies(keys: &[Key]) -> Vec<String> {
    keys.iter().map(|k| k.1.clone()).collect()
}

/// What an acknowledgement, a snooze, an unacknowledge, a snooze's end,
/// an escalate-now or a runbook run's progress does to one of the
/// incident's tracks (`followed`: the policies of all of them).
fn apply(t: &mut Track, planner: &Planner, kind: &EventKind, at: Timestamp, followed: &[String]) {
    match kind {
        EventKind::Acknowledged | EventKind::Snoozed { .. } => {
            t.next_at = None;
            t.pending.clear();
            t.renotify_at = match kind {
                EventKind::Acknowledged => planner
                    .reminder_interval(&t.policy, &t.incident, followed)
                    .map(|d| add(at, d)),
                _ => None,
            };
        }
        // Paged again from the last level that fired.
        EventKind::Unacknowledged | EventKind::SnoozeEnded => {
            if let Some((l, r)) = t.fired {
                (t.level, t.repeat) = (l, r);
            }
            t.next_at = Some(at);
            t.renotify_at = None;
            t.generation += 1;
        }
        EventKind::Escalated { reason } => {
            t.held_from = None;
            if !reason.is_empty() {
                t.cause = Some(reason.clone());
            }
            // Escalate now: the next level fires at once (the first one
            // again if every level has run).
            if t.next_at.is_none() && t.fired.is_some() && t.renotify_at.is_none() {
                (t.level, t.repeat) = (0, t.repeat + 1);
            }
            t.next_at = Some(at);
            t.renotify_at = None;
            t.generation += 1;
        }
        // A runbook holds the first level back while it works, until
        // `hold_until`; its run's end releases the hold: a failure fires
        // the level at once (with the runbook's reason), a success lets it
        // come when it was due (usually the incident is resolved by then).
        EventKind::Remediation {
            step,
            status,
            detail,
            hold_until,
            ..
        } if step == "run" => match (status.as_str(), hold_until) {
            ("held", Some(until)) if t.fired.is_none() => {
                if let Some(n) = t.next_at {
                    t.held_from = Some(t.held_from.unwrap_or(n));
                    t.next_at = Some(n.max(*until));
                }
            }
            ("failed", _) if t.held_from.is_some() => {
                t.held_from = None;
                t.next_at = Some(at);
                t.cause = Some(detail.clone());
            }
            ("succeeded" | "released", _) => {
                if let Some(from) = t.held_from.take() {
                    t.next_at = Some(from.max(at));
                }
            }
            _ => {}
        },
        _ => {}
    }
}

/// Keeps what [`mark`] needs for a `paged` record that comes back after the
/// event `kind` (about to be applied to `t`): the track before a change of
/// generation, then each change after it (at most [`BEFORE_EVENTS`]).
fn remember(t: &mut Track, kind: &EventKind, at: Timestamp) {
    let bumps = matches!(
        kind,
        EventKind::Unacknowledged | EventKind::SnoozeEnded | EventKind::Escalated { .. }
    );
    match t.before.as_deref_mut() {
        Some(b) if b.events.len() < BEFORE_EVENTS => b.events.push((kind.clone(), at)),
        Some(_) => t.before = None,
        None if bumps => {
            let mut track = t.clone();
            track.before = None;
            t.before = Some(Box::new(Before {
                track,
                events: vec![(kind.clone(), at)],
            }));
        }
        None => {}
    }
}

/// Applies a `paged` record of level `level`, round `repeat`, to `t`. Of
/// the track's generation: [`mark_fired`], and the track before its last
/// change of generation is let go (the records of this one are coming
/// back, so none of an earlier one is still on its way; the track is saved
/// without it, or a later change of generation would keep the stale
/// copy). Of the generation before that change (the level
/// fired, then an escalate-now, say, came before its record): the level
/// is marked on the track as it was then and what changed it since is
/// applied again, so `t` ends where the instance that fired it is. Returns
/// whether `t` changed.
fn mark(
    t: &mut Track,
    planner: &Planner,
    followed: &[String],
    fired: &Fired,
    level: u32,
    repeat: u32,
    when: Timestamp,
) -> bool {
    if t.generation == fired.generation {
        let let_go = t.before.take().is_some();
        return mark_fired(t, planner, followed, fired, level, repeat, when) || let_go;
    }
    let Some(before) = t.before.as_deref() else {
        return false;
    };
    let mut base = before.track.clone();
    if !mark_fired(&mut base, planner, followed, fired, level, repeat, when) {
        return false;
    }
    let events = before.events.clone();
    let mut now = base.clone();
    for (kind, at) in &events {
        apply(&mut now, planner, kind, *at, followed);
    }
    now.incident = t.incident.clone();
    now.before = Some(Box::new(Before {
        track: base,
        events,
    }));
    *t = now;
    true
}

/// Moves `t` as firing the step a `paged` record stands for did (level
/// `level` in round `repeat`, or the reminder `fired.reminder`), if `t` has
/// not fired it: the instance that fired it has moved on, so this changes
/// nothing there. Returns whether `t` changed.
///
/// The level is taken as fired when it was due (the instance that fired it
/// did so then or a little later); its pages are dropped (they are
/// stored), its later rule steps kept pending (their own receipts come
/// when they are sent). If the track stopped meanwhile (an acknowledgement
/// or snooze came between the firing and its record), it moves on and
/// stays stopped, as the firing instance's did.
fn mark_fired(
    t: &mut Track,
    planner: &Planner,
    followed: &[String],
    fired: &Fired,
    level: u32,
    repeat: u32,
    when: Timestamp,
) -> bool {
    if t.generation != fired.generation {
        return false;
    }
    if let Some(n) = fired.reminder {
        if t.renotified != n {
            return false;
        }
        let at = t.renotify_at.unwrap_or(when);
        t.renotified = n + 1;
        t.renotify_at = planner
            .reminder_interval(&t.policy, &t.incident, followed)
            .map(|d| add(at, d));
        return true;
    }
    if (t.level, t.repeat) != (level, repeat)
        || t.last_fired == Some((fired.generation, level, repeat))
    {
        return false;
    }
    let stopped = t.next_at.is_none();
    let at = t.next_at.unwrap_or(when);
    fire_level(t, planner, at, at, &mut Vec::new());
    if stopped {
        t.next_at = None;
        t.pending.clear();
    }
    true
}

/// `alice (on call for primary) via sms`, for timelines and plans.
pub(crate) fn describe(p: &PlannedPage) -> String {
    let who = match &p.target {
        PageTarget::User {
            name,
            schedule: Some(s),
        } => format!("{name} (on call for {s})"),
        PageTarget::User {
            name,
            schedule: None,
        } => name.clone(),
        PageTarget::SlackChannel { channel } => channel.clone(),
        PageTarget::PagerdutyService { service } => format!("PagerDuty service {service}"),
        PageTarget::Webhook { name } => format!("webhook {name}"),
    };
    if p.after.is_zero() {
        format!("{who} via {}", p.channel.as_str())
    } else {
        format!(
            "{who} via {} after {}s",
            p.channel.as_str(),
            p.after.as_secs()
        )
    }
}

#[allow(clippy::too_many_arguments)] // the coordinates of a page; named at every call
fn page(
    inc: &IncidentSummary,
    generation: u32,
    level: u32,
    repeat: u32,
    target: PageTarget,
    channel: Channel,
    address: String,
    step: u32,
    reason: String,
    due_at: Timestamp,
) -> Effect {
    Effect::Page(Box::new(Page {
        id: Page::make_id(&inc.id, generation, level, repeat, &target, channel, step),
        incident: inc.clone(),
        level,
        repeat,
        target,
        channel,
        address,
        reason,
        due_at,
        // Steps from 100 remind whoever acknowledged; repeat rounds page again.
        kind: if repeat > 0 || step >= 100 {
            MessageKind::Reminder
        } else {
            MessageKind::Page
        },
    }))
}

#[allow(clippy::too_many_arguments)] // the coordinates of a record; named at every call
fn record(
    inc: Uuid,
    generation: u32,
    policy: &str,
    level: u32,
    repeat: u32,
    reminder: Option<u32>,
    pages: Vec<String>,
    reason: String,
) -> Effect {
    let what = match reminder {
        Some(n) => format!("renotify-{n}"),
        None => "level".to_string(),
    };
    Effect::Record(Box::new(Command {
        id: format!(
            "esc-{}-{generation}-{policy}-{level}-{repeat}-{what}",
            inc.simple()
        ),
        actor: actor(),
        action: Action::Paged {
            incident: IncidentRef::Id(inc),
            level,
            repeat,
            pages,
            reason,
            fired: Some(Fired {
                policy: policy.to_string(),
                generation,
                reminder,
            }),
        },
    }))
}

#[cfg(test)]
mod due_tests {
    use super::*;

    /// The packed index entry sorts exactly as the tuple it packs, and
    /// gives back what was packed, for timestamps before and after the
    /// epoch, with and without fractions, and at jiff's limits.
    #[test]
    fn the_packed_due_entry_sorts_as_its_fields_and_gives_them_back() {
        let times: Vec<Timestamp> = [
            (
                Timestamp::MIN.as_second(),
                Timestamp::MIN.subsec_nanosecond(),
            ),
            (-86_400, 0),
            (-5, -999_999_999),
            (-5, -1),
            (-5, 0),
            (-1, -1),
            (0, 0),
            (0, 1),
            (1, 0),
            (5, 999_999_999),
            (1_777_881_600, 500_000_000),
            (
                Timestamp::MAX.as_second(),
                Timestamp::MAX.subsec_nanosecond(),
            ),
        ]
        .into_iter()
        .map(|(s, n)| Timestamp::new(s, n).expect("a valid timestamp"))
        .collect();
        let ids = [
            Uuid::nil(),
            Uuid::from_u128(7),
            Uuid::from_u128(1 << 127),
            Uuid::max(),
        ];
        let policies = [0, 1, 256, PolicyId::MAX];
        let mut tuples = Vec::new();
        for t in &times {
            for id in &ids {
                for p in &policies {
                    tuples.push((*t, *id, *p));
                }
            }
        }
        let mut by_tuple = tuples.clone();
        by_tuple.sort();
        let mut by_bytes: Vec<Due> = tuples
            .iter()
            .map(|(t, i, p)| Due::new(*t, *i, *p))
            .collect();
        by_bytes.sort();
        let back: Vec<(Timestamp, Uuid, PolicyId)> = by_bytes
            .iter()
            .map(|d| (d.at(), d.incident(), d.policy()))
            .collect();
        assert_eq!(back, by_tuple);
    }
}
