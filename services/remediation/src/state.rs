//! State on the bus, shared by every replica: run records in the KV bucket
//! `tocsin_remediation_runs`, concurrency leases in
//! `tocsin_remediation_locks`, and the guardrails' counters (cooldowns,
//! hourly counts, breakers, disabled runbooks) in `tocsin_remediation`.
//! Every change is create-if-absent or names the revision it read, so two
//! replicas never both move one record on: the loser reads again.
//! Records are JSON (readable with `nats kv get`).

use std::time::Duration;

use async_nats::jetstream::{
    self,
    kv::{self},
};
use jiff::Timestamp;
use serde::{de::DeserializeOwned, Deserialize, Serialize};

pub const RUNS: &str = "tocsin_remediation_runs";
pub const LOCKS: &str = "tocsin_remediation_locks";
pub const GUARDS: &str = "tocsin_remediation";

pub use tocsin_runtime::kv::WriteError;

/// One bucket of JSON records.
#[derive(Clone)]
pub struct Bucket {
    kv: kv::Store,
}

impl Bucket {
    pub async fn open(
        js: &jetstream::Context,
        name: &str,
        description: &str,
        max_age: Duration,
        replicas: usize,
    ) -> Result<Bucket, String> {
        let kv = tocsin_runtime::kv::open_or_create(
            js,
            kv::Config {
                bucket: name.into(),
                description: description.into(),
                history: 1,
                max_age,
                storage: jetstream::stream::StorageType::File,
                num_replicas: replicas.max(1),
                ..Default::default()
            },
        )
        .await?;
        Ok(Bucket { kv })
    }

    /// The record and its revision (None when absent or deleted).
    pub async fn get<T: DeserializeOwned>(&self, key: &str) -> Result<Option<(T, u64)>, String> {
        let entry = self
            .kv
            .entry(key)
            .await
            .map_err(|e| format!("cannot read {key}: {e}"))?;
        let Some(entry) = entry else { return Ok(None) };
        if entry.operation != kv::Operation::Put || entry.value.is_empty() {
            return Ok(None);
        }
        let v = serde_json::from_slice(&entry.value).map_err(|e| format!("record {key}: {e}"))?;
        Ok(Some((v, entry.revision)))
    }

    /// Creates (`revision` None) or replaces the revision read; the new revision.
    pub async fn write<T: Serialize>(
        &self,
        key: &str,
        value: &T,
        revision: Option<u64>,
    ) -> Result<u64, WriteError> {
        let bytes = serde_json::to_vec(value).map_err(|e| WriteError::Failed(e.to_string()))?;
        tocsin_runtime::kv::write_checked(&self.kv, key, bytes, revision).await
    }

    /// Writes `value` whether the key is there or not (last writer wins:
    /// for switches an operator sets).
    pub async fn put<T: Serialize>(&self, key: &str, value: &T) -> Result<(), String> {
        let bytes = serde_json::to_vec(value).map_err(|e| e.to_string())?;
        self.kv
            .put(key, bytes.into())
            .await
            .map(|_| ())
            .map_err(|e| format!("cannot write {key}: {e}"))
    }
}

/// A concurrency lease: held by a run until it ends or `expires_at`
/// passes without a renewal.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Lease {
    /// The run holding it; empty when free.
    pub run: String,
    pub expires_at: Option<Timestamp>,
}

impl Lease {
    pub fn free_at(&self, now: Timestamp) -> bool {
        self.run.is_empty() || self.expires_at.is_none_or(|e| e <= now)
    }
}

/// Takes the lease `key` for `run` until `until`, if it is free (or
/// already `run`'s). Ok(false): someone else holds it.
pub async fn take_lease(
    locks: &Bucket,
    key: &str,
    run: &str,
    now: Timestamp,
    until: Timestamp,
) -> Result<bool, String> {
    let mine = Lease {
        run: run.to_string(),
        expires_at: Some(until),
    };
    for _ in 0..10 {
        let current = locks.get::<Lease>(key).await?;
        let rev = match current {
            Some((l, _)) if !l.free_at(now) && l.run != run => return Ok(false),
            Some((_, rev)) => Some(rev),
            // Absent: create it (a concurrent creator makes this conflict).
            None => None,
        };
        match locks.write(key, &mine, rev).await {
            Ok(_) => return Ok(true),
            Err(WriteError::Conflict) => continue,
            Err(WriteError::Failed(e)) => return Err(e),
        }
    }
    Ok(false)
}

/// Frees the lease `key` if `run` holds it.
pub async fn release_lease(locks: &Bucket, key: &str, run: &str) -> Result<(), String> {
    for _ in 0..10 {
        match locks.get::<Lease>(key).await? {
            Some((l, rev)) if l.run == run => {
                match locks.write(key, &Lease::default(), Some(rev)).await {
                    Ok(_) => return Ok(()),
                    Err(WriteError::Conflict) => continue,
                    Err(WriteError::Failed(e)) => return Err(e),
                }
            }
            _ => return Ok(()),
        }
    }
    Ok(())
}

/// A runbook's breaker.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Breaker {
    pub consecutive_failures: u32,
    /// Open (runs skipped) until then; the first run after is a trial.
    pub open_until: Option<Timestamp>,
}

/// A counter (runs started in one clock hour).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Count {
    pub n: u32,
}

/// The last start of a runbook for a dedup key.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Cooldown {
    pub until: Option<Timestamp>,
}

/// A disabled runbook (or `_all`: the kill switch).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Disabled {
    pub disabled: bool,
    #[serde(default)]
    pub by: String,
}

/// A digest short enough for a key token.
pub fn digest(s: &str) -> String {
    use sha2::Digest;
    hex::encode(&sha2::Sha256::digest(s.as_bytes())[..10])
}
