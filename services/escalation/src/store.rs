//! Pending escalation steps in sled, saved with the INCIDENTS cursor in one
//! batch. Like the incidents projection it is rebuilt from the INCIDENTS
//! stream if lost (overdue steps then fire at once, with the same page ids).

use std::path::Path;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::track::{Key, Track, Tracks};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("sled: {0}")]
    Sled(#[from] sled::Error),
    #[error("stored record does not decode: {0}")]
    Corrupt(String),
}

#[derive(Serialize, Deserialize, Default)]
struct Meta {
    incidents_seq: u64,
}

/// Tracks and a cursor encoded for the store, not yet written.
pub struct Batch(sled::Batch);

/// Cheap to clone (sled's handles are shared): the query task reads
/// through a clone.
#[derive(Clone)]
pub struct Store {
    db: sled::Db,
    tree: sled::Tree,
}

fn key(k: &Key) -> Vec<u8> {
    let mut v = b"t/".to_vec();
    v.extend_from_slice(k.0.as_bytes());
    v.extend_from_slice(k.1.as_bytes());
    v
}

/// A track as stored: its fields in order, without their names (about
/// half the bytes: a burst of due steps reads thousands of tracks from the
/// store, and a read that misses sled's page cache decodes a whole node of
/// them), except a track that keeps its copy from before a change
/// ([`crate::track::Before`]): that copy's events are tagged enums whose
/// optional fields are left out when empty, which only a form with field
/// names can tell apart. [`decode`] reads both forms, and so reads the
/// tracks stores written before this one hold (every field named).
///
/// So a new field of [`Track`], or of the types in it (`IncidentSummary`,
/// [`crate::track::Pending`], `PageTarget`), goes at the end of its struct
/// with `#[serde(default)]`: a stored track has no value for it, and a field
/// put anywhere else would be read from another field's place. A track that
/// cannot be read makes the store be rebuilt from INCIDENTS; the test
/// `a_track_stored_in_the_compact_form_reads_back_as_stored_then` holds
/// one as stored today.
fn encode(t: &Track) -> Vec<u8> {
    if t.before.is_none() {
        rmp_serde::to_vec(t).expect("tracks encode")
    } else {
        rmp_serde::to_vec_named(t).expect("tracks encode")
    }
}

fn decode(v: &[u8]) -> Result<Track, StoreError> {
    rmp_serde::from_slice(v).map_err(|e| StoreError::Corrupt(e.to_string()))
}

/// sled's page cache for the tracks (a quarter of the incidents store's).
/// Tracks are read per incident when an entry or a due step needs them,
/// from the operating system's page cache when sled's misses.
const CACHE_BYTES: u64 = 16 * 1024 * 1024;

/// Fewer reads than this each are not worth another thread ([`parts`]).
const MIN_READS_PER_THREAD: usize = 64;

/// `incidents` (each once, in key order) cut into runs of neighbouring
/// keys, at most `threads` of them, for reading side by side: a burst of
/// due steps reads the tracks of thousands of incidents, and a read that
/// misses sled's page cache spends its time decoding a node, which the
/// other reads need not wait for.
pub fn parts(incidents: &[Uuid], threads: usize) -> Vec<Vec<Uuid>> {
    let mut ids = incidents.to_vec();
    ids.sort_unstable();
    ids.dedup();
    let threads = threads.min(ids.len().div_ceil(MIN_READS_PER_THREAD)).max(1);
    let per = ids.len().div_ceil(threads).max(1);
    ids.chunks(per).map(<[Uuid]>::to_vec).collect()
}

impl Store {
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        let db = sled::Config::new()
            .path(dir)
            .mode(sled::Mode::HighThroughput)
            .cache_capacity(CACHE_BYTES)
            .open()?;
        let tree = db.open_tree("tracks")?;
        Ok(Store { db, tree })
    }

    /// The due-time index and count of the stored tracks (not the tracks:
    /// those are read when needed, [`Store::tracks_of`]) and the INCIDENTS
    /// sequence they reflect.
    pub fn load(&self) -> Result<(Tracks, u64), StoreError> {
        let mut tracks = Tracks::default();
        let seq = match self.tree.get(b"m/meta")? {
            Some(v) => {
                rmp_serde::from_slice::<Meta>(&v)
                    .map_err(|e| StoreError::Corrupt(e.to_string()))?
                    .incidents_seq
            }
            // Every save writes the cursor, and a clear removes it first:
            // tracks without it are what a clear cut short left.
            None if self.tree.first()?.is_some() => {
                return Err(StoreError::Corrupt(
                    "tracks without a cursor (m/meta; a clear cut short)".into(),
                ))
            }
            None => 0,
        };
        for kv in self.tree.scan_prefix(b"t/") {
            let (_, v) = kv?;
            let t = decode(&v)?;
            tracks.index_stored(&(t.incident.id, t.policy.clone()), t.due());
        }
        Ok((tracks, seq))
    }

    /// Removes everything, the cursor first (see [`Store::load`]).
    pub fn clear(&self) -> Result<(), StoreError> {
        self.tree.remove(b"m/meta")?;
        self.tree.clear()?;
        Ok(())
    }

    /// Every stored track of `incident`, by policy name.
    pub fn tracks_of(&self, incident: Uuid) -> Result<Vec<Track>, StoreError> {
        let mut prefix = b"t/".to_vec();
        prefix.extend_from_slice(incident.as_bytes());
        self.tree
            .scan_prefix(prefix)
            .map(|kv| decode(&kv?.1))
            .collect()
    }

    /// The stored tracks of each of `incidents`, in their order.
    pub fn tracks_of_each(
        &self,
        incidents: &[Uuid],
    ) -> Result<Vec<(Uuid, Vec<Track>)>, StoreError> {
        incidents
            .iter()
            .map(|id| Ok((*id, self.tracks_of(*id)?)))
            .collect()
    }

    /// Saves the given tracks (removed ones are deleted) with the cursor.
    pub fn save(
        &self,
        tracks: &Tracks,
        changed: &[Key],
        incidents_seq: u64,
    ) -> Result<(), StoreError> {
        self.apply(Self::batch(tracks, changed, incidents_seq))
    }

    /// What [`Store::save`] writes, encoded now: a burst applies it
    /// ([`Store::apply`]) on another thread while it fires the next chunk.
    pub fn batch(tracks: &Tracks, changed: &[Key], incidents_seq: u64) -> Batch {
        let mut batch = sled::Batch::default();
        for k in changed {
            match tracks.map.get(k) {
                Some(t) => batch.insert(key(k), encode(t)),
                None => batch.remove(key(k)),
            }
        }
        batch.insert(
            b"m/meta".as_slice(),
            rmp_serde::to_vec_named(&Meta { incidents_seq }).expect("meta encodes"),
        );
        Batch(batch)
    }

    /// Writes a [`Store::batch`] at once.
    pub fn apply(&self, batch: Batch) -> Result<(), StoreError> {
        self.tree.apply_batch(batch.0)?;
        Ok(())
    }

    pub async fn flush(&self) {
        if let Err(e) = self.db.flush_async().await {
            tracing::warn!(error = %e, "cannot flush the escalation store");
        }
    }
}

#[cfg(test)]
mod tests {
    use jiff::Timestamp;
    use std::collections::HashSet;
    use tocsin_proto::incident::IncidentSummary;

    use super::*;

    fn track(n: u128, policy: &str) -> Track {
        Track {
            incident: IncidentSummary::new(
                Uuid::from_u128(n),
                n as u64,
                format!("k{n}"),
                format!("incident {n}"),
                Timestamp::UNIX_EPOCH,
            ),
            policy: policy.into(),
            level: 1,
            repeat: 0,
            next_at: Some(Timestamp::UNIX_EPOCH),
            pending: Vec::new(),
            fired: None,
            renotify_at: None,
            renotified: 0,
            generation: 0,
            held_from: None,
            cause: None,
            last_fired: None,
            before: None,
        }
    }

    /// A track keeps its copy from before an escalate-now (and what came
    /// since) through the store: a takeover after a restart still applies
    /// a late record to it.
    #[test]
    fn a_track_comes_back_from_the_store_with_its_copy_from_before_a_change() {
        use tocsin_proto::incident::EventKind;
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let mut t = track(1, "default");
        t.generation = 1;
        t.before = Some(Box::new(crate::track::Before {
            track: track(1, "default"),
            events: vec![
                (
                    EventKind::Escalated {
                        reason: "now".into(),
                    },
                    Timestamp::UNIX_EPOCH,
                ),
                (EventKind::Acknowledged, Timestamp::UNIX_EPOCH),
            ],
        }));
        let key = (t.incident.id, t.policy.clone());
        let mut tracks = Tracks::default();
        tracks.map.insert(key.clone(), t.clone());
        store.save(&tracks, &[key], 1).unwrap();
        assert_eq!(store.tracks_of(t.incident.id).unwrap(), vec![t]);
    }

    /// A track with every optional part set: labels, an acknowledger,
    /// pending steps for each kind of target, a cause, a hold, the last
    /// level fired.
    fn full_track(n: u128) -> Track {
        use tocsin_proto::{
            incident::{Actor, IncidentStatus, Severity},
            notify::{Channel, PageTarget},
        };
        let at = |s: &str| s.parse::<Timestamp>().unwrap();
        let mut t = track(n, "db");
        t.incident.severity = Severity::High;
        t.incident.status = IncidentStatus::Acknowledged;
        t.incident
            .labels
            .insert("alertname".into(), "DiskFull".into());
        t.incident.labels.insert("host".into(), "db1".into());
        t.incident.acknowledged_at = Some(at("2026-05-04T08:05:00Z"));
        t.incident.acknowledged_by = Some(Actor::new("alice", "slack"));
        t.incident.snoozed_until = Some(at("2026-05-04T09:00:00Z"));
        t.incident.assignee = Some("bob".into());
        t.incident.alerts_firing = 2;
        t.incident.alerts_total = 3;
        t.incident.reopen_count = 1;
        t.incident.suppressed = Some("silence 7".into());
        t.incident.revision = 9;
        let targets = [
            PageTarget::User {
                name: "alice".into(),
                schedule: Some("primary".into()),
            },
            PageTarget::User {
                name: "bob".into(),
                schedule: None,
            },
            PageTarget::SlackChannel {
                channel: "#ops".into(),
            },
            PageTarget::PagerdutyService {
                service: "db".into(),
            },
            PageTarget::Webhook {
                name: "hook".into(),
            },
        ];
        t.pending = targets
            .into_iter()
            .zip([
                Channel::Sms,
                Channel::Email,
                Channel::Slack,
                Channel::Pagerduty,
                Channel::Webhook,
            ])
            .enumerate()
            .map(|(i, (target, channel))| crate::track::Pending {
                due: at("2026-05-04T08:10:00Z"),
                level: 1,
                repeat: 2,
                target,
                channel,
                address: format!("address {i}"),
                step: i as u32,
                reason: "after 5m".into(),
            })
            .collect();
        t.fired = Some((0, 2));
        t.renotify_at = Some(at("2026-05-04T10:00:00Z"));
        t.renotified = 1;
        t.generation = 3;
        t.held_from = Some(at("2026-05-04T08:01:00Z"));
        t.cause = Some("escalated by alice".into());
        t.last_fired = Some((3, 0, 2));
        t
    }

    /// Every shape of track comes back from the store as it was saved:
    /// without its copy from before a change in the compact form (an
    /// array: fields by place), with it in the named one (a map); each with
    /// and without the fields left out when empty.
    #[test]
    fn every_shape_of_track_comes_back_from_the_store() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let plain = track(1, "default");
        let full = full_track(2);
        let mut not_fired = full_track(3);
        not_fired.last_fired = None;
        let mut with_before = full_track(4);
        with_before.before = Some(Box::new(crate::track::Before {
            track: full_track(4),
            events: vec![(
                tocsin_proto::incident::EventKind::Acknowledged,
                Timestamp::UNIX_EPOCH,
            )],
        }));
        let cases = [
            (plain, false),
            (full, false),
            (not_fired, false),
            (with_before, true),
        ];
        let mut tracks = Tracks::default();
        let mut keys = Vec::new();
        for (t, _) in &cases {
            let k = (t.incident.id, t.policy.clone());
            tracks.map.insert(k.clone(), t.clone());
            keys.push(k);
        }
        store.save(&tracks, &keys, 1).unwrap();
        for ((t, named), k) in cases.iter().zip(&keys) {
            let stored = store.tree.get(key(k)).unwrap().unwrap();
            let is_map = matches!(stored[0], 0x80..=0x8f | 0xde | 0xdf);
            assert_eq!(is_map, *named, "form of {}", t.incident.id);
            assert_eq!(store.tracks_of(t.incident.id).unwrap(), vec![t.clone()]);
        }
    }

    /// A store written before the compact form holds every track with its
    /// field names: they read back as they were.
    #[test]
    fn a_track_stored_with_field_names_still_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let t = full_track(5);
        let k = (t.incident.id, t.policy.clone());
        store
            .tree
            .insert(key(&k), rmp_serde::to_vec_named(&t).unwrap())
            .unwrap();
        store
            .tree
            .insert(
                b"m/meta",
                rmp_serde::to_vec_named(&Meta { incidents_seq: 4 }).unwrap(),
            )
            .unwrap();
        assert_eq!(store.tracks_of(t.incident.id).unwrap(), vec![t.clone()]);
        let (tracks, seq) = store.load().unwrap();
        assert_eq!((tracks.count(), tracks.next_due(), seq), (1, t.due(), 4));
    }

    /// The compact form reads fields by their place: this is a track as
    /// stored today, which every later version must read as this track. A
    /// new field goes at the end of its struct, with a default (it is then
    /// missing here and takes it); one put elsewhere, or fields reordered,
    /// fail here.
    #[test]
    fn a_track_stored_in_the_compact_form_reads_back_as_stored_then() {
        let t = full_track(6);
        let stored = hex::decode(COMPACT_TRACK).unwrap();
        assert_eq!(decode(&stored).unwrap(), t);
    }

    const COMPACT_TRACK: &str = concat!(
        "9ddc0013c4100000000000000000000000000000000606a26b36aa696e636964",
        "656e742036a468696768ac61636b6e6f776c656467656482a9616c6572746e61",
        "6d65a84469736b46756c6ca4686f7374a3646231b4313937302d30312d303154",
        "30303a30303a30305ab4313937302d30312d30315430303a30303a30305ab432",
        "3032362d30352d30345430383a30353a30305a92a5616c696365a5736c61636b",
        "c0b4323032362d30352d30345430393a30303a30305aa3626f62020301a97369",
        "6c656e6365203709a264620100b4313937302d30312d30315430303a30303a30",
        "305a9598b4323032362d30352d30345430383a31303a30305a010293a4757365",
        "72a5616c696365a77072696d617279a3736d73a961646472657373203000a861",
        "6674657220356d98b4323032362d30352d30345430383a31303a30305a010293",
        "a475736572a3626f62c0a5656d61696ca961646472657373203101a861667465",
        "7220356d98b4323032362d30352d30345430383a31303a30305a010292ad736c",
        "61636b5f6368616e6e656ca4236f7073a5736c61636ba9616464726573732032",
        "02a8616674657220356d98b4323032362d30352d30345430383a31303a30305a",
        "010292b17061676572647574795f73657276696365a26462a970616765726475",
        "7479a961646472657373203303a8616674657220356d98b4323032362d30352d",
        "30345430383a31303a30305a010292a7776562686f6f6ba4686f6f6ba7776562",
        "686f6f6ba961646472657373203404a8616674657220356d920002b432303236",
        "2d30352d30345431303a30303a30305a0103b4323032362d30352d3034543038",
        "3a30313a30305ab2657363616c6174656420627920616c69636593030002",
    );

    /// A clear cut short after the cursor leaves tracks without it: they
    /// are refused (the service wipes the store and rebuilds it), never
    /// read as tracks at cursor 0.
    #[test]
    fn tracks_without_a_cursor_are_refused_and_a_clear_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let t = track(1, "default");
        let key = (t.incident.id, t.policy.clone());
        let mut tracks = Tracks::default();
        tracks.map.insert(key.clone(), t);
        store.save(&tracks, &[key], 3).unwrap();
        assert_eq!(store.load().unwrap().1, 3);
        store.tree.remove(b"m/meta").unwrap();
        let err = store.load().err().expect("refused");
        assert!(err.to_string().contains("m/meta"), "{err}");
        store.clear().unwrap();
        assert!(store.tree.is_empty());
        let (tracks, seq) = store.load().unwrap();
        assert_eq!((tracks.count(), tracks.next_due(), seq), (0, None, 0));
    }

    /// Tracks at hand of `incidents`, each under its first `policies(n)` of
    /// "default" and "db", and their keys.
    fn at_hand(
        incidents: std::ops::RangeInclusive<u128>,
        policies: impl Fn(u128) -> usize,
    ) -> (Tracks, Vec<Key>) {
        let mut tracks = Tracks::default();
        let mut keys = Vec::new();
        for n in incidents {
            for policy in ["default", "db"].iter().take(policies(n)) {
                let t = track(n, policy);
                let key = (t.incident.id, t.policy.clone());
                tracks.map.insert(key.clone(), t);
                keys.push(key);
            }
        }
        (tracks, keys)
    }

    /// A burst lets a saved chunk's incidents go while later chunks stay at
    /// hand: only the named incidents' tracks go (every policy of them),
    /// the index and the count keep them, and they come back from the
    /// store as saved.
    #[test]
    fn letting_some_incidents_go_keeps_the_others_at_hand_and_every_track_indexed() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let (stored, keys) = at_hand(1..=4, |_| 2);
        store.save(&stored, &keys, 3).unwrap();
        let (mut tracks, _) = store.load().unwrap();
        let due = tracks.next_due();
        for n in 1..=4u128 {
            let id = Uuid::from_u128(n);
            tracks.load(id, store.tracks_of(id).unwrap());
        }
        assert_eq!(tracks.map.len(), 8);

        let go: HashSet<Uuid> = [1u128, 3].into_iter().map(Uuid::from_u128).collect();
        let saved: Vec<_> = keys.iter().filter(|k| go.contains(&k.0)).cloned().collect();
        tracks.release_incidents(&go, &saved);
        for n in 1..=4u128 {
            let id = Uuid::from_u128(n);
            let at_hand = tracks.map.keys().filter(|k| k.0 == id).count();
            if go.contains(&id) {
                assert!(!tracks.is_loaded(id), "incident {n} let go");
                assert_eq!(at_hand, 0, "incident {n}: no track at hand");
            } else {
                assert!(tracks.is_loaded(id), "incident {n} kept");
                assert_eq!(at_hand, 2, "incident {n}: both tracks at hand");
            }
        }
        assert_eq!(tracks.count(), 8, "the count keeps every track");
        assert_eq!(tracks.next_due(), due, "the index keeps every track");
        let id = Uuid::from_u128(1);
        tracks.load(id, store.tracks_of(id).unwrap());
        assert_eq!(tracks.map.keys().filter(|k| k.0 == id).count(), 2);
    }

    #[test]
    fn incidents_read_in_parts_are_each_read_once_with_every_stored_track() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        // 500 incidents, every third under two policies, and one with none.
        let (tracks, keys) = at_hand(1..=500, |n| 1 + usize::from(n % 3 == 0));
        store.save(&tracks, &keys, 7).unwrap();

        let mut wanted: Vec<Uuid> = (1..=501u128).rev().map(Uuid::from_u128).collect();
        wanted.push(Uuid::from_u128(3)); // twice: read once
        for (threads, expected) in [(1, 1), (2, 2), (4, 4), (64, 8)] {
            let cut = parts(&wanted, threads);
            assert_eq!(cut.len(), expected, "{threads} threads");
            let ids: Vec<Uuid> = cut.concat();
            let mut sorted: Vec<Uuid> = (1..=501u128).map(Uuid::from_u128).collect();
            sorted.sort_unstable();
            assert_eq!(
                ids, sorted,
                "{threads} threads: each incident once, in key order"
            );
            let mut total = 0;
            for part in &cut {
                for (id, got) in store.tracks_of_each(part).unwrap() {
                    assert_eq!(got, store.tracks_of(id).unwrap(), "{threads} threads, {id}");
                    total += got.len();
                }
            }
            assert_eq!(total, keys.len(), "{threads} threads: every stored track");
        }
        assert_eq!(
            parts(&wanted[..10], 4).len(),
            1,
            "a few reads stay together"
        );
        assert!(parts(&[], 4).iter().all(Vec::is_empty));
    }
}
