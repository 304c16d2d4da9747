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

fn decode(v: &[u8]) -> Result<Track, StoreError> {
    rmp_serde::from_slice(v).map_err(|e| StoreError::Corrupt(e.to_string()))
}

/// sled's page cache for the tracks (a quarter of the incidents store's).
/// Tracks are read per incident when an entry or a due step needs them,
/// from the operating system's page cache when sled's misses.
const CACHE_BYTES: u64 = 16 * 1024 * 1024;

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
            None => 0,
        };
        for kv in self.tree.scan_prefix(b"t/") {
            let (_, v) = kv?;
            let t = decode(&v)?;
            tracks.index_stored(&(t.incident.id, t.policy.clone()), t.due());
        }
        Ok((tracks, seq))
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

    /// Saves the given tracks (removed ones are deleted) with the cursor.
    pub fn save(
        &self,
        tracks: &Tracks,
        changed: &[Key],
        incidents_seq: u64,
    ) -> Result<(), StoreError> {
        let mut batch = sled::Batch::default();
        for k in changed {
            match tracks.map.get(k) {
                Some(t) => batch.insert(key(k), rmp_serde::to_vec_named(t).expect("tracks encode")),
                None => batch.remove(key(k)),
            }
        }
        batch.insert(
            b"m/meta".as_slice(),
            rmp_serde::to_vec_named(&Meta { incidents_seq }).expect("meta encodes"),
        );
        self.tree.apply_batch(batch)?;
        Ok(())
    }

    pub async fn flush(&self) {
        if let Err(e) = self.db.flush_async().await {
            tracing::warn!(error = %e, "cannot flush the escalation store");
        }
    }
}
