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
/// Idempotent: running it on every start is the intended use. A stream
/// already as wanted costs one look-up; only a missing one is created and
/// only a differing one updated (which the shipped NATS permissions leave
/// to the admin user).
pub async fn ensure_streams(
    js: &jetstream::Context,
    config: &JetStreamConfig,
) -> Result<(), RuntimeError> {
    for drift in create_missing_streams(js, config).await? {
        update_stream(js, &drift).await?;
    }
    Ok(())
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
        let existing = match js.get_stream(def.name).await {
            Ok(mut s) => Some(
                s.info()
                    .await
                    .map_err(|e| failed(e.to_string()))?
                    .config
                    .clone(),
            ),
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
                    Err(_) => return Err(failed(e.to_string())),
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
pub async fn update_stream(js: &jetstream::Context, drift: &Drift) -> Result<(), RuntimeError> {
    js.update_stream(drift.wanted.clone())
        .await
        .map(|_| ())
        .map_err(|e| RuntimeError::Stream {
            stream: drift.wanted.name.clone(),
            reason: format!(
                "it differs from the `jetstream:` settings ({}) and cannot be updated: {e}",
                drift.differences.join(", ")
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

/// Moves a message no one can process to `tocsin.dlq.<stream>`, with the
/// reason and its original subject in headers; `seq` (its sequence in
/// `stream`) makes the publish idempotent. One attempt: callers decide
/// whether to retry.
pub async fn dead_letter(
    js: &jetstream::Context,
    stream: &str,
    subject: &str,
    payload: bytes::Bytes,
    seq: u64,
    reason: &str,
) -> Result<(), String> {
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
    js.send_publish(dead_letter_subject(stream), publish)
        .await
        .map_err(|e| e.to_string())?
        .await
        .map(|_| ())
        .map_err(|e| e.to_string())
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
    let mut delay = Duration::from_millis(100);
    let drifts = loop {
        match create_missing_streams(js, config).await {
            Ok(drifts) => break drifts,
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
        match update_stream(js, &drift).await {
            Ok(()) => tracing::info!(stream, differs, "stream {stream} updated ({differs})"),
            Err(e) => tracing::warn!(stream, error = %e, "stream {stream} keeps its settings"),
        }
    }
    true
}
