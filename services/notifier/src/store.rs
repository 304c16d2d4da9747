//! Delivery records in sled, one per message id (the page id, or an
//! update's id): written and flushed *before* the provider is called and
//! again before the NOTIFY message is acknowledged, so a redelivered
//! message is looked up instead of sent twice.

use std::path::Path;

use jiff::Timestamp;
use serde::{Deserialize, Serialize};
use tocsin_proto::notify::ProviderRef;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum State {
    /// Not sent yet; the last attempt failed with a retryable error.
    Pending,
    /// A request went out at `since` and its answer is not recorded: after
    /// a crash the provider is asked whether it arrived before sending again.
    InFlight {
        since: Timestamp,
    },
    Sent {
        provider: ProviderRef,
    },
    Failed {
        reason: String,
    },
    GaveUp {
        reason: String,
    },
    /// Not sent: the incident had moved on (resolved, silenced, acknowledged).
    Skipped {
        reason: String,
    },
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub state: State,
    pub attempts: u32,
    pub first_attempt: Timestamp,
    #[serde(default)]
    pub last_error: String,
    /// The receipt for the final state is on the bus.
    #[serde(default)]
    pub receipt_published: bool,
}

impl Record {
    pub fn new(now: Timestamp) -> Record {
        Record {
            state: State::Pending,
            attempts: 0,
            first_attempt: now,
            last_error: String::new(),
            receipt_published: false,
        }
    }

    pub fn is_final(&self) -> bool {
        matches!(
            self.state,
            State::Sent { .. }
                | State::Failed { .. }
                | State::GaveUp { .. }
                | State::Skipped { .. }
        )
    }
}

#[derive(Clone)]
pub struct Store {
    tree: sled::Tree,
    db: sled::Db,
}

impl Store {
    pub fn open(dir: &Path) -> Result<Store, String> {
        let db = sled::Config::new()
            .path(dir)
            .mode(sled::Mode::HighThroughput)
            .open()
            .map_err(|e| e.to_string())?;
        let tree = db.open_tree("deliveries").map_err(|e| e.to_string())?;
        Ok(Store { tree, db })
    }

    pub fn get(&self, id: &str) -> Result<Option<Record>, String> {
        match self.tree.get(id.as_bytes()).map_err(|e| e.to_string())? {
            Some(bytes) => rmp_decode(&bytes).map(Some),
            None => Ok(None),
        }
    }

    /// Writes and flushes to disk (the record must survive a crash that
    /// follows).
    pub async fn put(&self, id: &str, rec: &Record) -> Result<(), String> {
        let bytes = tocsin_proto::codec::encode(rec).map_err(|e| e.to_string())?;
        self.tree
            .insert(id.as_bytes(), bytes)
            .map_err(|e| e.to_string())?;
        // sled's flush_async can stall when many tasks flush at once; the
        // blocking flush on the blocking pool does not (and concurrent
        // flushes share one fsync).
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || db.flush())
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
        Ok(())
    }

    /// Writes without waiting for the disk (for notes whose loss is harmless).
    pub fn put_unflushed(&self, id: &str, rec: &Record) {
        if let Ok(bytes) = tocsin_proto::codec::encode(rec) {
            let _ = self.tree.insert(id.as_bytes(), bytes);
        }
    }

    /// Removes records first attempted before `before` (the pages they
    /// guard have long left the NOTIFY stream). Returns how many.
    pub fn prune(&self, before: Timestamp) -> usize {
        let mut removed = 0;
        for item in self.tree.iter() {
            let Ok((key, value)) = item else { continue };
            let old = match rmp_decode(&value) {
                Ok(r) => r.first_attempt < before,
                Err(_) => true, // unreadable: useless
            };
            if old && self.tree.remove(&key).is_ok() {
                removed += 1;
            }
        }
        removed
    }

    pub async fn flush(&self) {
        let db = self.db.clone();
        let _ = tokio::task::spawn_blocking(move || db.flush()).await;
    }
}

fn rmp_decode(bytes: &[u8]) -> Result<Record, String> {
    tocsin_proto::codec::decode(bytes).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn records_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let now: Timestamp = "2026-01-01T00:00:00Z".parse().unwrap();
        {
            let s = Store::open(dir.path()).unwrap();
            let mut r = Record::new(now);
            r.state = State::Sent {
                provider: ProviderRef::Sms { sid: "SM1".into() },
            };
            r.attempts = 2;
            s.put("page:1", &r).await.unwrap();
        }
        let s = Store::open(dir.path()).unwrap();
        let r = s.get("page:1").unwrap().unwrap();
        assert_eq!(r.attempts, 2);
        assert!(r.is_final());
        assert_eq!(s.get("page:2").unwrap(), None);

        // Pruning keeps what is recent.
        s.put(
            "page:3",
            &Record::new("2026-02-01T00:00:00Z".parse().unwrap()),
        )
        .await
        .unwrap();
        assert_eq!(s.prune("2026-01-15T00:00:00Z".parse().unwrap()), 1);
        assert_eq!(s.get("page:1").unwrap(), None);
        assert!(s.get("page:3").unwrap().is_some());
    }
}
