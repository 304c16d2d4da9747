//! JetStream streams: created or updated idempotently at start-up.

use std::time::Duration;

use async_nats::jetstream::{
    self,
    stream::{Config, DiscardPolicy, RetentionPolicy, StorageType},
};
use serde::Deserialize;
use tocsin_proto::subjects::{Retention, StreamDef, STREAMS};

use crate::{config::HumanDuration, RuntimeError};

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
    /// JetStream domain, for leaf-node set-ups. Default none.
    pub domain: Option<String>,
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
            discard: DiscardPolicy::Old,
            ..Default::default()
        }
    }

    /// A JetStream context for this configuration.
    pub fn context(&self, client: async_nats::Client) -> jetstream::Context {
        match &self.domain {
            Some(d) => jetstream::with_domain(client, d),
            None => jetstream::new(client),
        }
    }
}

/// Creates every stream, or updates it to the wanted configuration.
/// Idempotent: running it on every start is the intended use.
pub async fn ensure_streams(
    js: &jetstream::Context,
    config: &JetStreamConfig,
) -> Result<(), RuntimeError> {
    for def in STREAMS.iter() {
        let wanted = config.stream_config(def);
        js.create_or_update_stream(wanted)
            .await
            .map_err(|e| RuntimeError::Stream {
                stream: def.name.to_string(),
                reason: e.to_string(),
            })?;
    }
    Ok(())
}

/// Every message of `stream` in order from sequence `start` (at least 1).
/// An ordered consumer: nothing to clean up on the server, and it recreates
/// itself after a reconnect.
pub async fn read_from(
    js: &jetstream::Context,
    stream: &str,
    start: u64,
) -> Result<jetstream::consumer::pull::Ordered, String> {
    js.get_stream(stream)
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
    use futures::StreamExt;
    let consumer = js
        .get_stream(stream)
        .await
        .map_err(|e| e.to_string())?
        .create_consumer(jetstream::consumer::pull::OrderedConfig {
            filter_subject: filter,
            deliver_policy: jetstream::consumer::DeliverPolicy::All,
            ..Default::default()
        })
        .await
        .map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    if consumer.cached_info().num_pending == 0 {
        return Ok(out);
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
        out.push(msg);
        if pending == 0 {
            break;
        }
    }
    Ok(out)
}

/// What of a dead-lettered payload is kept when the whole does not fit in
/// one message (an input of nearly NATS's `max_payload` plus the headers).
const DEAD_LETTER_KEEP: usize = 64 * 1024;

/// Moves a message no one can process to `tocsin.dlq.<stream>`, with the
/// reason and its original subject in headers; `seq` (its sequence in
/// `stream`) makes the publish idempotent. One attempt: callers decide
/// whether to retry. A payload too large to go with the headers is cut to
/// its first 64 KiB (the reason says so), so a dead letter never fails
/// for its size.
pub async fn dead_letter(
    js: &jetstream::Context,
    stream: &str,
    subject: &str,
    payload: bytes::Bytes,
    seq: u64,
    reason: &str,
) -> Result<(), String> {
    match publish_dead_letter(js, stream, subject, payload.clone(), seq, reason).await {
        Err(DeadLetterError::TooLarge(e)) if payload.len() > DEAD_LETTER_KEEP => {
            tracing::warn!(
                stream,
                seq,
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
                seq,
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
    seq: u64,
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
        .message_id(format!("dlq:{stream}:{seq}"));
    let sort = |e: PublishError| {
        let too_large = e.kind() == PublishErrorKind::MaxPayloadExceeded
            || std::error::Error::source(&e)
                .and_then(|s| s.downcast_ref::<jetstream::Error>())
                .is_some_and(|j| {
                    j.error_code() == jetstream::ErrorCode::STREAM_MESSAGE_EXCEEDS_MAXIMUM
                });
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
    let mut s = js.get_stream(stream).await.map_err(|e| e.to_string())?;
    Ok(s.info()
        .await
        .map_err(|e| e.to_string())?
        .state
        .last_sequence)
}

/// Keeps trying [`ensure_streams`] until it succeeds (NATS may not be up
/// yet), then marks the `jetstream` health check as passing. Returns early
/// if `shutdown` is cancelled. An error JetStream will never accept (a
/// changed retention policy, say) is logged at ERROR on every attempt, since
/// an operator must act.
pub async fn ensure_streams_until_ready(
    js: &jetstream::Context,
    config: &JetStreamConfig,
    health: &crate::admin::Health,
    shutdown: &tokio_util::sync::CancellationToken,
) -> bool {
    let mut delay = Duration::from_millis(100);
    loop {
        match ensure_streams(js, config).await {
            Ok(()) => {
                health.set_ok("jetstream");
                tracing::info!("JetStream streams are in place");
                return true;
            }
            Err(e) => {
                health.set_failing("jetstream", e.to_string());
                tracing::error!(error = %e, retry_in = ?delay, "cannot set up JetStream streams");
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return false,
            _ = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(Duration::from_secs(5));
    }
}
