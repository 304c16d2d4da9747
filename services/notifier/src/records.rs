//! Delivery records in the JetStream KV bucket `tocsin_deliveries`, shared
//! by every notifier replica. Creation is create-if-absent and every
//! change names the revision it read, so two replicas can never both claim
//! one attempt: the loser sees a conflict, reads again and decides again.
//! Records expire with the bucket's `max_age` (`notifier.records_kept_for`).
//!
//! Keys are `d.<incident>.<digest of the message id>`, so the messages sent
//! for an incident are found by one subject filter.

use std::time::Duration;

use crate::record::Record;
use async_nats::jetstream::{
    self,
    kv::{self},
};

/// The bucket's name (its stream is `KV_tocsin_deliveries`).
pub const BUCKET: &str = "tocsin_deliveries";

#[derive(Clone)]
pub struct Records {
    kv: kv::Store,
    js: jetstream::Context,
}

/// A record as read, with the revision to name when changing it.
#[derive(Clone, Debug)]
pub struct Stored {
    pub key: String,
    pub record: Record,
    pub revision: u64,
}

pub use tocsin_runtime::kv::WriteError;

/// The key of message `id` of `incident`.
pub fn key(incident: &uuid::Uuid, id: &str) -> String {
    use sha2::Digest;
    let d = sha2::Sha256::digest(id.as_bytes());
    format!("d.{}.{}", incident.simple(), hex::encode(&d[..12]))
}

impl Records {
    /// Opens the bucket, creating it if needed (retried by the caller).
    pub async fn open(
        js: &jetstream::Context,
        keep_for: Duration,
        replicas: usize,
        max_bytes: u64,
    ) -> Result<Records, String> {
        let kv = tocsin_runtime::kv::open_or_create(
            js,
            kv::Config {
                bucket: BUCKET.into(),
                description: "Tocsin notifier: one delivery record per message".into(),
                history: 1,
                max_age: keep_for,
                storage: jetstream::stream::StorageType::File,
                num_replicas: replicas.max(1),
                // Reserved room (a full bucket refuses new records: the
                // page waits on the bus, nothing is lost).
                max_bytes: i64::try_from(max_bytes).unwrap_or(i64::MAX),
                ..Default::default()
            },
        )
        .await?;
        Ok(Records { kv, js: js.clone() })
    }

    pub async fn get(&self, key: &str) -> Result<Option<Stored>, String> {
        let entry = self
            .kv
            .entry(key)
            .await
            .map_err(|e| format!("cannot read delivery record {key}: {e}"))?;
        let Some(entry) = entry else { return Ok(None) };
        if entry.operation != kv::Operation::Put || entry.value.is_empty() {
            return Ok(None);
        }
        let record = decode(&entry.value).map_err(|e| format!("delivery record {key}: {e}"))?;
        Ok(Some(Stored {
            key: key.to_string(),
            record,
            revision: entry.revision,
        }))
    }

    /// Creates the record (`revision` None) or replaces the revision read.
    /// Returns the new revision.
    pub async fn write(
        &self,
        key: &str,
        record: &Record,
        revision: Option<u64>,
    ) -> Result<u64, WriteError> {
        let bytes =
            tocsin_proto::codec::encode(record).map_err(|e| WriteError::Failed(e.to_string()))?;
        tocsin_runtime::kv::write_checked(&self.kv, key, bytes, revision).await
    }

    /// Every record of `incident` (its messages and updates).
    pub async fn of_incident(&self, incident: &uuid::Uuid) -> Result<Vec<Stored>, String> {
        let filter = format!("$KV.{BUCKET}.d.{}.*", incident.simple());
        let stream = format!("KV_{BUCKET}");
        let msgs = tocsin_runtime::streams::read_matching(&self.js, &stream, filter).await?;
        let prefix = format!("$KV.{BUCKET}.");
        // History 1: one message per key, except a put racing the read; the
        // later one wins (a delete or purge marker leaves none), in the
        // order read. By key, so an incident with many records is read
        // in linear time.
        let mut latest: std::collections::HashMap<String, (usize, u64, Option<Record>)> =
            std::collections::HashMap::new();
        for (read, m) in msgs.into_iter().enumerate() {
            let Some(key) = m.subject.strip_prefix(&prefix) else {
                continue;
            };
            let seq = m.info().map(|i| i.stream_sequence).unwrap_or(0);
            let deleted = m
                .headers
                .as_ref()
                .is_some_and(|h| h.get("KV-Operation").is_some())
                || m.payload.is_empty();
            let record = if deleted {
                None
            } else {
                decode(&m.payload).ok()
            };
            latest.insert(key.to_string(), (read, seq, record));
        }
        let mut out: Vec<(usize, Stored)> = latest
            .into_iter()
            .filter_map(|(key, (read, revision, record))| {
                let record = record?;
                Some((
                    read,
                    Stored {
                        key,
                        record,
                        revision,
                    },
                ))
            })
            .collect();
        out.sort_by_key(|(read, _)| *read);
        Ok(out.into_iter().map(|(_, s)| s).collect())
    }
}

fn decode(bytes: &[u8]) -> Result<Record, String> {
    tocsin_proto::codec::decode(bytes).map_err(|e| e.to_string())
}
