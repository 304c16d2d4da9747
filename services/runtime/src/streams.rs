//! JetStream streams: created or updated idempotently at start-up, each
//! with its share of the storage budget, and watched while running.
//!
//! Every stream has a `max_bytes` limit. NATS reserves that room in its
//! `max_file_store` when the stream is created, so one stream filling up
//! cannot take the others' room: ALERTS (the smallest share) refuses new
//! alerts when full, and ingest answers 503, while INCIDENTS, COMMANDS and
//! NOTIFY keep their room. [`watch_storage`] reports a stream that cannot
//! take new messages on `/readyz` and in `/metrics`.

use std::{fmt, sync::atomic::AtomicU64, time::Duration};

use async_nats::jetstream::{
    self,
    stream::{Config, DiscardPolicy, RetentionPolicy, StorageType},
};
use prometheus_client::metrics::{family::Family, gauge::Gauge};
use serde::{de, Deserialize, Deserializer};
use tocsin_proto::subjects::{
    Retention, StreamDef, STREAMS, STREAM_ALERTS, STREAM_COMMANDS, STREAM_DEADLETTER,
    STREAM_INCIDENTS, STREAM_NOTIFY,
};

use crate::{
    admin::{labels, Health, Labels, Metrics},
    config::HumanDuration,
    RuntimeError,
};

const MIB: u64 = 1024 * 1024;

/// `jetstream:` section.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct JetStreamConfig {
    /// Stream replicas: 1 on one box, 3 on a NATS cluster. Default 1.
    pub replicas: usize,
    /// Window in which a repeated `Nats-Msg-Id` is dropped by the server.
    /// Default 2m. Services stay idempotent beyond it.
    pub duplicate_window: HumanDuration,
    /// How long alert events are kept. Default 7d.
    pub alerts_max_age: HumanDuration,
    /// How long the incident event log is kept. Default 400d.
    pub incidents_max_age: HumanDuration,
    /// How long an unprocessed command or notification is kept. Default 7d.
    pub work_max_age: HumanDuration,
    /// How long dead-lettered messages are kept. Default 30d.
    pub dead_letter_max_age: HumanDuration,
    /// Room of ALERTS in bytes, the smallest share: when full it refuses
    /// new alerts (ingest answers 503) instead of taking the others' room.
    /// Default 536870912 (512 MiB).
    #[serde(deserialize_with = "bytes")]
    pub alerts_max_bytes: u64,
    /// Room of INCIDENTS in bytes; when full, new entries wait (nothing is
    /// dropped). Default 4294967296 (4 GiB).
    #[serde(deserialize_with = "bytes")]
    pub incidents_max_bytes: u64,
    /// Room of COMMANDS in bytes. Default 805306368 (768 MiB).
    #[serde(deserialize_with = "bytes")]
    pub commands_max_bytes: u64,
    /// Room of NOTIFY in bytes. Default 805306368 (768 MiB).
    #[serde(deserialize_with = "bytes")]
    pub notify_max_bytes: u64,
    /// Room of DEADLETTER in bytes; when full the oldest dead letters go.
    /// Default 805306368 (768 MiB).
    #[serde(deserialize_with = "bytes")]
    pub dead_letter_max_bytes: u64,
    /// Room of the notifier's delivery records (the KV bucket
    /// `tocsin_deliveries`). Default 268435456 (256 MiB).
    #[serde(deserialize_with = "bytes")]
    pub deliveries_max_bytes: u64,
    /// How often each process reads the streams' usage for `/readyz` and
    /// `tocsin_stream_usage_ratio`. Default 5s.
    pub storage_check_interval: HumanDuration,
    /// A stream that refuses new messages when full is reported as full
    /// (not ready) from this share of its `max_bytes` on. Default 0.95.
    #[serde(deserialize_with = "ratio")]
    pub full_ratio: f64,
    /// JetStream domain holding Tocsin's streams, for services connected
    /// to a leaf node of it: their JetStream API is `$JS.<domain>.API`.
    /// Letters, digits, `-` and `_`. Default none (`$JS.API`).
    #[serde(deserialize_with = "domain")]
    pub domain: Option<String>,
}

/// A positive number of bytes, checked while the scalar is read so a
/// wrong value is reported with its line.
fn bytes<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    struct V;
    impl de::Visitor<'_> for V {
        type Value = u64;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a number of bytes, at least 1048576 (1 MiB)")
        }
        fn visit_u64<E: de::Error>(self, v: u64) -> Result<u64, E> {
            if v < MIB {
                return Err(E::custom(format!(
                    "{v} bytes is too small for a stream; give at least 1048576 (1 MiB)"
                )));
            }
            Ok(v)
        }
        fn visit_i64<E: de::Error>(self, v: i64) -> Result<u64, E> {
            match u64::try_from(v) {
                Ok(v) => self.visit_u64(v),
                Err(_) => Err(E::custom(format!(
                    "{v} is negative; give a number of bytes, at least 1048576 (1 MiB)"
                ))),
            }
        }
    }
    d.deserialize_u64(V)
}

/// A share above 0 and at most 1.
fn ratio<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    struct V;
    impl de::Visitor<'_> for V {
        type Value = f64;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a share above 0 and at most 1, such as 0.95")
        }
        fn visit_f64<E: de::Error>(self, v: f64) -> Result<f64, E> {
            if v > 0.0 && v <= 1.0 {
                Ok(v)
            } else {
                Err(E::custom(format!(
                    "{v} is not a share; give a number above 0 and at most 1, such as 0.95"
                )))
            }
        }
        fn visit_u64<E: de::Error>(self, v: u64) -> Result<f64, E> {
            self.visit_f64(v as f64)
        }
        fn visit_i64<E: de::Error>(self, v: i64) -> Result<f64, E> {
            self.visit_f64(v as f64)
        }
    }
    d.deserialize_f64(V)
}

/// A JetStream domain: a single subject token of letters, digits, `-`
/// and `_`, as `$JS.<domain>.API` needs and nats-server accepts.
fn domain<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    // Checked while the scalar is read, so the error has its line.
    struct V;
    impl<'de> de::Visitor<'de> for V {
        type Value = Option<String>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a JetStream domain: letters, digits, '-' and '_'")
        }
        fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_some<D2: Deserializer<'de>>(self, d: D2) -> Result<Self::Value, D2::Error> {
            d.deserialize_str(self)
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
            if v.is_empty()
                || !v
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            {
                return Err(E::custom(format!(
                    "{v:?} is not a JetStream domain; give the name the NATS servers' \
                     `jetstream {{ domain: ... }}` says: letters, digits, '-' and '_'"
                )));
            }
            Ok(Some(v.to_string()))
        }
    }
    d.deserialize_option(V)
}

impl Default for JetStreamConfig {
    fn default() -> Self {
        JetStreamConfig {
            replicas: 1,
            duplicate_window: HumanDuration::secs(120),
            alerts_max_age: HumanDuration::secs(7 * 86_400),
            incidents_max_age: HumanDuration::secs(400 * 86_400),
            work_max_age: HumanDuration::secs(7 * 86_400),
            dead_letter_max_age: HumanDuration::secs(30 * 86_400),
            alerts_max_bytes: 512 * MIB,
            incidents_max_bytes: 4096 * MIB,
            commands_max_bytes: 768 * MIB,
            notify_max_bytes: 768 * MIB,
            dead_letter_max_bytes: 768 * MIB,
            deliveries_max_bytes: 256 * MIB,
            storage_check_interval: HumanDuration::secs(5),
            full_ratio: 0.95,
            domain: None,
        }
    }
}

impl JetStreamConfig {
    fn max_age(&self, def: &StreamDef) -> Duration {
        match def.name {
            tocsin_proto::subjects::STREAM_ALERTS => self.alerts_max_age.get(),
            tocsin_proto::subjects::STREAM_INCIDENTS => self.incidents_max_age.get(),
            tocsin_proto::subjects::STREAM_DEADLETTER => self.dead_letter_max_age.get(),
            _ => self.work_max_age.get(),
        }
    }

    /// The room of `stream` in bytes, and the config key that sets it.
    pub fn max_bytes(&self, stream: &str) -> Option<(u64, &'static str)> {
        Some(match stream {
            STREAM_ALERTS => (self.alerts_max_bytes, "jetstream.alerts_max_bytes"),
            STREAM_INCIDENTS => (self.incidents_max_bytes, "jetstream.incidents_max_bytes"),
            STREAM_COMMANDS => (self.commands_max_bytes, "jetstream.commands_max_bytes"),
            STREAM_NOTIFY => (self.notify_max_bytes, "jetstream.notify_max_bytes"),
            STREAM_DEADLETTER => (
                self.dead_letter_max_bytes,
                "jetstream.dead_letter_max_bytes",
            ),
            _ => return None,
        })
    }

    /// The storage budget: what every stream's room adds up to. Every NATS
    /// node keeping a replica must have this much in its `max_file_store`.
    pub fn storage_budget(&self) -> u64 {
        STREAMS
            .iter()
            .filter_map(|d| self.max_bytes(d.name))
            .map(|(b, _)| b)
            .sum()
    }

    /// The stream configuration Tocsin wants for `def`.
    pub fn stream_config(&self, def: &StreamDef) -> Config {
        let max_age = self.max_age(def);
        Config {
            name: def.name.to_string(),
            description: Some(def.description.to_string()),
            subjects: vec![def.subjects.to_string()],
            retention: match def.retention {
                Retention::Limits => RetentionPolicy::Limits,
                Retention::WorkQueue => RetentionPolicy::WorkQueue,
            },
            storage: StorageType::File,
            num_replicas: self.replicas,
            // The duplicate window may not exceed the max age.
            duplicate_window: self.duplicate_window.get().min(max_age),
            max_age,
            max_bytes: self
                .max_bytes(def.name)
                .map(|(b, _)| i64::try_from(b).unwrap_or(i64::MAX))
                .unwrap_or(-1),
            // Only dead letters may make room by dropping the oldest: the
            // others are alerts not yet decided, the record, and work not
            // yet done, so a full stream refuses the new message instead
            // (the writer retries, and `/readyz` says which stream is full).
            discard: if def.name == STREAM_DEADLETTER {
                DiscardPolicy::Old
            } else {
                DiscardPolicy::New
            },
            // The notifier reads an incident's last entry before a page,
            // and after it where the provider can update the message.
            // A direct get costs nats-server a fraction of a
            // `STREAM.MSG.GET` (no JSON request, no routing through the
            // system account), but any replica may answer it, one that
            // has not yet stored the last write among them: so only a
            // stream with one replica, where the answer is the leader's.
            allow_direct: def.name == STREAM_INCIDENTS && self.replicas <= 1,
            ..Default::default()
        }
    }

    /// The JetStream API's subject prefix: `$JS.API`, or `$JS.<domain>.API`.
    pub fn api_prefix(&self) -> String {
        match &self.domain {
            Some(d) => format!("$JS.{d}.API"),
            None => "$JS.API".to_string(),
        }
    }

    /// A JetStream context for this configuration: its API under
    /// [`JetStreamConfig::api_prefix`].
    pub fn context(&self, client: async_nats::Client) -> jetstream::Context {
        jetstream::with_prefix(client, &self.api_prefix())
    }
}

/// Creates every stream, or updates it to the wanted configuration.
/// Idempotent: running it on every start is the intended use. A stream
/// already as wanted costs one look-up; only a missing one is created and
/// only a differing one updated (which the shipped NATS permissions leave
/// to the admin user).
pub async fn ensure_streams(
    js: &jetstream::Context,
    config: &JetStreamConfig,
) -> Result<(), RuntimeError> {
    for drift in create_missing_streams(js, config).await? {
        update_stream(js, &drift, config).await?;
    }
    Ok(())
}

/// Adds what to do to JetStream's "insufficient storage" refusal.
fn stream_error_hint(reason: &str, config: &JetStreamConfig) -> String {
    if reason.contains("insufficient") || reason.contains("10047") {
        format!(
            "{reason}; NATS reserves each stream's max_bytes, and the jetstream.*_max_bytes \
             settings add up to {} bytes, which every NATS node keeping a replica must have \
             free in its max_file_store: raise max_file_store in the NATS config or lower them",
            config.storage_budget()
        )
    } else {
        reason.to_string()
    }
}

/// A stream whose settings on the server differ from the wanted ones.
#[derive(Debug, Clone)]
pub struct Drift {
    /// The configuration Tocsin wants.
    pub wanted: Config,
    /// What differs, e.g. `max_age 7d -> 14d`.
    pub differences: Vec<String>,
}

/// Creates every stream that does not exist yet (a create can neither
/// change nor empty a stream that exists: NATS refuses one whose settings
/// differ) and returns those whose settings differ from the wanted ones.
pub async fn create_missing_streams(
    js: &jetstream::Context,
    config: &JetStreamConfig,
) -> Result<Vec<Drift>, RuntimeError> {
    let mut drifts = Vec::new();
    for def in STREAMS.iter() {
        let wanted = config.stream_config(def);
        let failed = |reason: String| RuntimeError::Stream {
            stream: def.name.to_string(),
            reason,
        };
        let mut wanted = wanted;
        let existing = match js.get_stream(def.name).await {
            Ok(mut s) => {
                let info = s.info().await.map_err(|e| failed(e.to_string()))?;
                // Lowering a room below what a stream holds could delete
                // messages: it keeps its current limit, and the operator is
                // told which key to raise.
                let held = info.state.bytes;
                if wanted.max_bytes >= 0 && held > wanted.max_bytes as u64 {
                    let key = config.max_bytes(def.name).map(|(_, k)| k).unwrap_or("");
                    tracing::error!(
                        stream = def.name,
                        held_bytes = held,
                        wanted_max_bytes = wanted.max_bytes,
                        kept_max_bytes = info.config.max_bytes,
                        "stream holds more than {key}; its current limit is kept so nothing is \
                         deleted: raise {key} to at least what it holds"
                    );
                    wanted.max_bytes = info.config.max_bytes;
                }
                Some(info.config.clone())
            }
            Err(e)
                if matches!(
                    e.kind(),
                    jetstream::context::GetStreamErrorKind::JetStream(j)
                        if j.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND
                ) =>
            {
                None
            }
            Err(e) => return Err(failed(e.to_string())),
        };
        let existing = match existing {
            Some(c) => c,
            None => match js.create_stream(wanted.clone()).await {
                Ok(_) => continue,
                // Someone else created it meanwhile (another process): compare with theirs.
                Err(e) => match js.get_stream(def.name).await {
                    Ok(mut s) => s
                        .info()
                        .await
                        .map_err(|e| failed(e.to_string()))?
                        .config
                        .clone(),
                    Err(_) => return Err(failed(stream_error_hint(&e.to_string(), config))),
                },
            },
        };
        let differences = differences(&existing, &wanted);
        if !differences.is_empty() {
            drifts.push(Drift {
                wanted,
                differences,
            });
        }
    }
    Ok(drifts)
}

/// Updates a stream to the wanted settings.
pub async fn update_stream(
    js: &jetstream::Context,
    drift: &Drift,
    config: &JetStreamConfig,
) -> Result<(), RuntimeError> {
    js.update_stream(drift.wanted.clone())
        .await
        .map(|_| ())
        .map_err(|e| RuntimeError::Stream {
            stream: drift.wanted.name.clone(),
            reason: format!(
                "it differs from the `jetstream:` settings ({}) and cannot be updated: {}",
                drift.differences.join(", "),
                stream_error_hint(&e.to_string(), config)
            ),
        })
}

/// What Tocsin sets on a stream and `existing` has otherwise.
fn differences(existing: &Config, wanted: &Config) -> Vec<String> {
    let mut out = Vec::new();
    let mut differ = |what: &str, is: String, want: String| {
        if is != want {
            out.push(format!("{what} {is} -> {want}"));
        }
    };
    let dur = |d: Duration| HumanDuration(d).to_string();
    differ(
        "subjects",
        existing.subjects.join(","),
        wanted.subjects.join(","),
    );
    differ(
        "retention",
        format!("{:?}", existing.retention),
        format!("{:?}", wanted.retention),
    );
    differ(
        "storage",
        format!("{:?}", existing.storage),
        format!("{:?}", wanted.storage),
    );
    differ(
        "replicas",
        existing.num_replicas.to_string(),
        wanted.num_replicas.to_string(),
    );
    differ("max_age", dur(existing.max_age), dur(wanted.max_age));
    differ(
        "duplicate_window",
        dur(existing.duplicate_window),
        dur(wanted.duplicate_window),
    );
    differ(
        "discard",
        format!("{:?}", existing.discard),
        format!("{:?}", wanted.discard),
    );
    differ(
        "max_bytes",
        existing.max_bytes.to_string(),
        wanted.max_bytes.to_string(),
    );
    differ(
        "allow_direct",
        existing.allow_direct.to_string(),
        wanted.allow_direct.to_string(),
    );
    differ(
        "description",
        format!("{:?}", existing.description),
        format!("{:?}", wanted.description),
    );
    out
}

/// Every message of `stream` in order from sequence `start` (at least 1).
/// An ordered consumer: nothing to clean up on the server, and it recreates
/// itself after a reconnect.
pub async fn read_from(
    js: &jetstream::Context,
    stream: &str,
    start: u64,
) -> Result<jetstream::consumer::pull::Ordered, String> {
    // No STREAM.INFO first: creating the consumer names the stream.
    js.get_stream_no_info(stream)
        .await
        .map_err(|e| e.to_string())?
        .create_consumer(jetstream::consumer::pull::OrderedConfig {
            deliver_policy: jetstream::consumer::DeliverPolicy::ByStartSequence {
                start_sequence: start.max(1),
            },
            ..Default::default()
        })
        .await
        .map_err(|e| e.to_string())?
        .messages()
        .await
        .map_err(|e| e.to_string())
}

/// Every message of `stream` on subjects matching `filter`, in order, as
/// of now (an ordered consumer read until nothing is pending).
pub async fn read_matching(
    js: &jetstream::Context,
    stream: &str,
    filter: String,
) -> Result<Vec<jetstream::Message>, String> {
    let mut out = Vec::new();
    read_matching_each(js, stream, filter, |m| out.push(m)).await?;
    Ok(out)
}

/// As [`read_matching`], handing each message to `each` as it comes
/// instead of holding them all: for a reader that keeps a bounded part.
pub async fn read_matching_each(
    js: &jetstream::Context,
    stream: &str,
    filter: String,
    each: impl FnMut(jetstream::Message),
) -> Result<(), String> {
    read_matching_any_each(js, stream, vec![filter], each).await
}

/// As [`read_matching_each`], for the messages that match any of
/// `filters`, in stream order.
pub async fn read_matching_any_each(
    js: &jetstream::Context,
    stream: &str,
    mut filters: Vec<String>,
    mut each: impl FnMut(jetstream::Message),
) -> Result<(), String> {
    use futures::StreamExt;
    let (filter_subject, filter_subjects) = match filters.len() {
        1 => (filters.pop().unwrap_or_default(), Vec::new()),
        _ => (String::new(), filters),
    };
    let consumer = js
        .get_stream_no_info(stream)
        .await
        .map_err(|e| e.to_string())?
        .create_consumer(jetstream::consumer::pull::OrderedConfig {
            filter_subject,
            filter_subjects,
            deliver_policy: jetstream::consumer::DeliverPolicy::All,
            ..Default::default()
        })
        .await
        .map_err(|e| e.to_string())?;
    if consumer.cached_info().num_pending == 0 {
        return Ok(());
    }
    let mut msgs = consumer.messages().await.map_err(|e| e.to_string())?;
    loop {
        let msg = match tokio::time::timeout(Duration::from_secs(5), msgs.next()).await {
            Ok(Some(Ok(m))) => m,
            Ok(Some(Err(e))) => return Err(e.to_string()),
            Ok(None) => break,
            Err(_) => return Err(format!("reading {stream} timed out")),
        };
        let pending = msg.info().map(|i| i.pending).unwrap_or(0);
        each(msg);
        if pending == 0 {
            break;
        }
    }
    Ok(())
}

/// What of a dead-lettered payload is kept when the whole does not fit in
/// one message (an input of nearly NATS's `max_payload` plus the headers).
const DEAD_LETTER_KEEP: usize = 64 * 1024;

/// Moves a message no one can process to `tocsin.dlq.<stream>`, with the
/// reason and its original subject in headers; `at` (its place in
/// `stream`: the sequence, or `<sequence>.<index>` for one alert of a
/// message holding several) makes the publish idempotent. One attempt: callers decide
/// whether to retry. A payload too large to go with the headers is cut to
/// its first 64 KiB (the reason says so), so a dead letter never fails
/// for its size.
pub async fn dead_letter(
    js: &jetstream::Context,
    stream: &str,
    subject: &str,
    payload: bytes::Bytes,
    at: &str,
    reason: &str,
) -> Result<(), String> {
    match publish_dead_letter(js, stream, subject, payload.clone(), at, reason).await {
        Err(DeadLetterError::TooLarge(e)) if payload.len() > DEAD_LETTER_KEEP => {
            tracing::warn!(
                stream,
                at,
                error = e,
                "dead letter too large; keeping the first 64 KiB of its payload"
            );
            let reason = format!(
                "{reason} (payload cut to its first {DEAD_LETTER_KEEP} of {} bytes)",
                payload.len()
            );
            publish_dead_letter(
                js,
                stream,
                subject,
                payload.slice(..DEAD_LETTER_KEEP),
                at,
                &reason,
            )
            .await
            .map_err(DeadLetterError::into_string)
        }
        other => other.map_err(DeadLetterError::into_string),
    }
}

/// Whether a dead letter failed for its size (then cut and sent again).
enum DeadLetterError {
    TooLarge(String),
    Other(String),
}

impl DeadLetterError {
    fn into_string(self) -> String {
        match self {
            DeadLetterError::TooLarge(s) | DeadLetterError::Other(s) => s,
        }
    }
}

async fn publish_dead_letter(
    js: &jetstream::Context,
    stream: &str,
    subject: &str,
    payload: bytes::Bytes,
    at: &str,
    reason: &str,
) -> Result<(), DeadLetterError> {
    use jetstream::context::{PublishError, PublishErrorKind};
    use tocsin_proto::subjects::{dead_letter_subject, headers};
    let mut h = async_nats::HeaderMap::new();
    let reason: String = reason.chars().take(512).collect();
    h.insert(
        headers::DLQ_REASON,
        reason.replace(['\r', '\n'], " ").as_str(),
    );
    h.insert(headers::DLQ_SUBJECT, subject);
    let publish = jetstream::message::PublishMessage::build()
        .payload(payload)
        .headers(h)
        .message_id(format!("dlq:{stream}:{at}"));
    let sort = |e: PublishError| {
        let too_large = e.kind() == PublishErrorKind::MaxPayloadExceeded
            || crate::bus::refusal(&e)
                == Some(jetstream::ErrorCode::STREAM_MESSAGE_EXCEEDS_MAXIMUM);
        if too_large {
            DeadLetterError::TooLarge(e.to_string())
        } else {
            DeadLetterError::Other(e.to_string())
        }
    };
    js.send_publish(dead_letter_subject(stream), publish)
        .await
        .map_err(sort)?
        .await
        .map(|_| ())
        .map_err(sort)
}

/// The sequence of the last message in `stream` (0 when empty).
pub async fn last_sequence(js: &jetstream::Context, stream: &str) -> Result<u64, String> {
    // One STREAM.INFO request: `get_stream` makes it and keeps its answer
    // (asking `info()` after it was a second one; the escalation service
    // asks before every step it fires, and JetStream's API requests wait
    // in one queue on the server: 4.9 ms p50 for both at 1,000 pages/s).
    let s = js.get_stream(stream).await.map_err(|e| e.to_string())?;
    Ok(s.cached_info().state.last_sequence)
}

/// Keeps trying until every stream exists (NATS may not be up yet), then
/// marks the `jetstream` health check as passing. Returns early if
/// `shutdown` is cancelled. An error JetStream will never accept is logged
/// at ERROR on every attempt, since an operator must act.
///
/// A stream that exists with other settings than the `jetstream:` section
/// (after the section was changed) keeps working as it is: with `update`
/// (the connection's user may change streams: the admin, or a shared user)
/// it is updated, otherwise a WARN says what differs and how to apply it.
/// The shipped NATS permissions let services create streams but not
/// change them, since a change (a shorter max age) can drop stored messages.
pub async fn ensure_streams_until_ready(
    js: &jetstream::Context,
    config: &JetStreamConfig,
    update: bool,
    health: &crate::admin::Health,
    shutdown: &tokio_util::sync::CancellationToken,
) -> bool {
    let mut backoff =
        crate::retry::Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
    let drifts = loop {
        match create_missing_streams(js, config).await {
            Ok(drifts) => break drifts,
            Err(e) => {
                health.set_failing("jetstream", e.to_string());
                tracing::error!(error = %e, retry_in = ?backoff.delay(), "cannot set up JetStream streams");
            }
        }
        if !backoff.wait(shutdown).await {
            return false;
        }
    };
    health.set_ok("jetstream");
    tracing::info!("JetStream streams are in place");
    for drift in drifts {
        let stream = drift.wanted.name.as_str();
        let differs = drift.differences.join(", ");
        if !update {
            tracing::warn!(
                stream,
                differs,
                "stream {stream} differs from the `jetstream:` settings ({differs}); it keeps \
                 working as it is. A service's NATS user may create streams but not change them: \
                 start Tocsin once with nats.credentials.admin set, or change it as the NATS admin"
            );
            continue;
        }
        match update_stream(js, &drift, config).await {
            Ok(()) => tracing::info!(stream, differs, "stream {stream} updated ({differs})"),
            Err(e) => tracing::warn!(stream, error = %e, "stream {stream} keeps its settings"),
        }
    }
    true
}

/// Runs [`ensure_streams_until_ready`], then [`watch_storage`] until
/// `shutdown`: what every process runs beside its services.
pub async fn ensure_and_watch(
    js: jetstream::Context,
    config: JetStreamConfig,
    update: bool,
    health: Health,
    metrics: Metrics,
    shutdown: tokio_util::sync::CancellationToken,
) {
    if ensure_streams_until_ready(&js, &config, update, &health, &shutdown).await {
        watch_storage(&js, &config, &health, &metrics, &shutdown).await;
    }
}

/// Reads every stream's usage each `storage_check_interval` and reports:
/// `tocsin_stream_usage_ratio{stream}` (bytes held / max_bytes),
/// `tocsin_stream_last_sequence{stream}`,
/// `tocsin_stream_full{stream}` (1 while a stream that refuses new
/// messages is at `full_ratio` or more), and the `storage` check of
/// `/readyz`, which fails naming each full stream (or a JetStream account
/// out of storage) and why. A stream that drops its oldest messages
/// (DEADLETTER) is never reported as full.
pub async fn watch_storage(
    js: &jetstream::Context,
    config: &JetStreamConfig,
    health: &Health,
    metrics: &Metrics,
    shutdown: &tokio_util::sync::CancellationToken,
) {
    let usage = Family::<Labels, Gauge<f64, AtomicU64>>::default();
    let full = Family::<Labels, Gauge>::default();
    let last = Family::<Labels, Gauge>::default();
    metrics.register(
        "tocsin_stream_last_sequence",
        "The sequence of a stream's last message",
        last.clone(),
    );
    metrics.register(
        "tocsin_stream_usage_ratio",
        "Bytes held by a stream over its max_bytes",
        usage.clone(),
    );
    metrics.register(
        "tocsin_stream_full",
        "1 while a stream is full and refuses new messages",
        full.clone(),
    );
    loop {
        match storage_problems(js, config, &usage, &full, &last).await {
            Ok(problems) if problems.is_empty() => health.set_ok("storage"),
            Ok(problems) => {
                let reason = problems.join("; ");
                tracing::warn!(
                    reason,
                    "JetStream storage: a stream cannot take new messages"
                );
                health.set_failing("storage", reason);
            }
            // NATS unreachable: the `nats` check says so; keep the last state.
            Err(e) => tracing::debug!(error = e, "cannot read stream usage"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(config.storage_check_interval.get()) => {}
        }
    }
}

async fn storage_problems(
    js: &jetstream::Context,
    config: &JetStreamConfig,
    usage: &Family<Labels, Gauge<f64, AtomicU64>>,
    full: &Family<Labels, Gauge>,
    last: &Family<Labels, Gauge>,
) -> Result<Vec<String>, String> {
    let mut problems = Vec::new();
    for def in STREAMS.iter() {
        let stream = js.get_stream(def.name).await.map_err(|e| e.to_string())?;
        let info = stream.cached_info();
        let l = labels(&[("stream", def.name)]);
        last.get_or_create(&l)
            .set(i64::try_from(info.state.last_sequence).unwrap_or(i64::MAX));
        let max = info.config.max_bytes;
        if max <= 0 {
            usage.get_or_create(&l).set(0.0);
            full.get_or_create(&l).set(0);
            continue;
        }
        let held = info.state.bytes;
        let ratio = held as f64 / max as f64;
        usage.get_or_create(&l).set(ratio);
        let is_full = info.config.discard == DiscardPolicy::New && ratio >= config.full_ratio;
        full.get_or_create(&l).set(i64::from(is_full));
        if is_full {
            let key = config
                .max_bytes(def.name)
                .map(|(_, k)| k)
                .unwrap_or("its max_bytes");
            problems.push(format!(
                "{} is full ({held} of {max} bytes, {:.0}%): new messages are refused; \
                 free room (consume or purge it, or wait for max_age) or raise {key}",
                def.name,
                ratio * 100.0
            ));
        }
    }
    // The account's own storage limit, when NATS sets one.
    let account = js.query_account().await.map_err(|e| e.to_string())?;
    if let Some(max) = account.limits.max_storage.filter(|m| *m > 0) {
        let ratio = account.storage as f64 / max as f64;
        if ratio >= config.full_ratio {
            problems.push(format!(
                "the JetStream account's storage is full ({} of {max} bytes): writes fail \
                 with insufficient resources; raise the account's max_file limit in NATS",
                account.storage
            ));
        }
    }
    Ok(problems)
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    /// Only INCIDENTS allows direct gets, and only with one replica: with
    /// more, a replica that has not yet stored the last write could answer.
    #[test]
    fn only_incidents_with_one_replica_allows_direct_gets() {
        for replicas in [1, 3] {
            let c = JetStreamConfig {
                replicas,
                ..JetStreamConfig::default()
            };
            let direct: Vec<&str> = STREAMS
                .iter()
                .filter(|d| c.stream_config(d).allow_direct)
                .map(|d| d.name)
                .collect();
            let want: &[&str] = if replicas == 1 {
                &[STREAM_INCIDENTS]
            } else {
                &[]
            };
            assert_eq!(direct, want, "{replicas} replicas");
        }
        let mut existing = JetStreamConfig::default().stream_config(&STREAMS[1]);
        existing.allow_direct = false;
        let wanted = JetStreamConfig::default().stream_config(&STREAMS[1]);
        assert_eq!(wanted.name, STREAM_INCIDENTS);
        assert_eq!(
            differences(&existing, &wanted),
            ["allow_direct false -> true"]
        );
    }

    #[test]
    fn the_default_budget_fits_the_shipped_nats_configs() {
        let c = JetStreamConfig::default();
        // deploy/k8s has max_file_store 8GB, deploy/nats 20GB; leave room
        // for the notifier's own bucket and compaction.
        assert!(
            c.storage_budget() <= 7 * 1024 * MIB,
            "{}",
            c.storage_budget()
        );
        let share = |s| c.max_bytes(s).unwrap().0;
        for other in [
            STREAM_INCIDENTS,
            STREAM_COMMANDS,
            STREAM_NOTIFY,
            STREAM_DEADLETTER,
        ] {
            assert!(
                share(STREAM_ALERTS) < share(other),
                "ALERTS is the smallest"
            );
        }
        for def in STREAMS.iter() {
            let s = c.stream_config(def);
            assert!(s.max_bytes > 0, "{} has a limit", def.name);
            let discard = if def.name == STREAM_DEADLETTER {
                DiscardPolicy::Old
            } else {
                DiscardPolicy::New
            };
            assert_eq!(s.discard, discard, "{}", def.name);
        }
    }

    #[test]
    fn bad_sizes_ratios_and_domains_are_located_errors() {
        let load = |yaml: &str| {
            crate::config::from_str::<JetStreamConfig>(Path::new("tocsin.yaml"), yaml)
                .unwrap_err()
                .to_string()
        };
        let e = load("replicas: 1\nalerts_max_bytes: 1000\n");
        assert!(e.starts_with("tocsin.yaml:2:"), "{e}");
        assert!(e.contains("at least 1048576"), "{e}");
        let e = load("incidents_max_bytes: -5\n");
        assert!(e.starts_with("tocsin.yaml:1:"), "{e}");
        assert!(e.contains("a number of bytes"), "{e}");
        let e = load("full_ratio: 1.5\n");
        assert!(e.starts_with("tocsin.yaml:1:"), "{e}");
        assert!(e.contains("above 0 and at most 1"), "{e}");
        let e = load("replicas: 1\ndomain: hub.east\n");
        assert!(e.starts_with("tocsin.yaml:2:"), "{e}");
        assert!(e.contains("\"hub.east\" is not a JetStream domain"), "{e}");
        let ok: JetStreamConfig = crate::config::from_str(
            Path::new("tocsin.yaml"),
            "alerts_max_bytes: 1073741824\nfull_ratio: 0.9\ndomain: hub-east_1\n",
        )
        .unwrap();
        assert_eq!(ok.api_prefix(), "$JS.hub-east_1.API");
        let none: JetStreamConfig =
            crate::config::from_str(Path::new("tocsin.yaml"), "domain:\n").unwrap();
        assert_eq!(none.api_prefix(), "$JS.API");
        assert_eq!(ok.alerts_max_bytes, 1024 * MIB);
        assert_eq!(ok.full_ratio, 0.9);
    }
}
