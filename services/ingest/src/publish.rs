//! Publishing alerts to the ALERTS stream, answering only once JetStream
//! acknowledged every one of them.
//!
//! A request of one alert is one message on the alert's own subject. A
//! request of several is stored in as few messages as fit
//! ([`alert_batch_subject`]: up to [`BATCH_ALERTS`] alerts and
//! [`BATCH_BYTES`] each), because JetStream syncs every message to disk on
//! its own: one sync for a webhook's hundred alerts instead of a hundred.
//! Each such message's id is derived from its alerts' ids, so a retried
//! request is still dropped by JetStream's duplicate window.

use std::{future::IntoFuture, sync::Arc, time::Duration};

use tokio::sync::Semaphore;

use async_nats::{jetstream, Client};
use futures::future::join_all;
use tocsin_proto::{
    codec,
    subjects::{alert_batch_subject, alert_subject, headers},
    Alert, Envelope, Timestamp, SCHEMA_VERSION,
};

/// Why a request's alerts could not all be stored.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("the message bus (NATS) is not connected")]
    NotConnected,
    #[error("JetStream did not acknowledge within {0:?}")]
    TimedOut(Duration),
    #[error("JetStream refused the alert: {0}")]
    Refused(String),
    /// The ALERTS stream is full or the server is out of storage: a retry
    /// can succeed once space is freed.
    #[error("the ALERTS stream cannot take more now ({0}); the stream is full or NATS is out of storage")]
    Storage(String),
    /// An alert no retry could ever store (over `ingest.limits.alert_bytes`
    /// or the NATS server's `max_payload`). Nothing of the request was sent.
    #[error("{0}")]
    TooLarge(String),
    #[error("cannot encode alert: {0}")]
    Encode(#[from] codec::CodecError),
}

impl PublishError {
    /// Sorts a JetStream publish or ack error into what a retry can fix
    /// (the default) and what it cannot.
    fn from_jetstream(e: &jetstream::context::PublishError, timeout: Duration) -> Self {
        use jetstream::context::PublishErrorKind as K;
        let text = e.to_string();
        match e.kind() {
            K::TimedOut => PublishError::TimedOut(timeout),
            K::MaxPayloadExceeded => PublishError::TooLarge(format!(
                "the alert is larger than the NATS server accepts ({text}); \
                 lower ingest.limits.alert_bytes below the server's max_payload"
            )),
            _ if text.contains("message size exceeds maximum") => PublishError::TooLarge(format!(
                "the alert is larger than the ALERTS stream accepts ({text})"
            )),
            _ if text.contains("insufficient resources")
                || text.contains("maximum bytes")
                || text.contains("maximum messages") =>
            {
                PublishError::Storage(text)
            }
            _ => PublishError::Refused(text),
        }
    }
}

/// One message encoded and checked, ready to send: one alert, or several
/// of one request.
struct Prepared {
    subject: String,
    msg_id: String,
    payload: Vec<u8>,
    /// How many alerts it holds.
    alerts: usize,
}

/// Most alerts stored in one message.
pub const BATCH_ALERTS: usize = 256;
/// Largest message of several alerts (smaller if the NATS server's
/// `max_payload` is).
pub const BATCH_BYTES: usize = 512 * 1024;

/// What happened to a request's alerts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Stored {
    /// Newly stored.
    pub stored: usize,
    /// Already in the stream (a retried request); dropped by JetStream.
    pub duplicates: usize,
}

/// Messages awaiting their acks at once, across all requests. Kept
/// below async-nats's per-context limit (5,000), and taken all-or-nothing per
/// chunk: if requests each held part of that limit while waiting for the
/// rest, they could block one another until the publish timeout.
const MAX_IN_FLIGHT: usize = 4096;
/// Messages sent before awaiting their acks.
const CHUNK: usize = 256;

/// Publishes alerts with `Nats-Msg-Id` set, and waits for every ack.
#[derive(Clone)]
pub struct Publisher {
    client: Client,
    js: jetstream::Context,
    timeout: Duration,
    in_flight: Arc<Semaphore>,
    /// `ingest.limits.alert_bytes`: largest encoded alert envelope.
    alert_bytes: usize,
}

impl Publisher {
    pub fn new(
        client: Client,
        mut js: jetstream::Context,
        timeout: Duration,
        alert_bytes: usize,
    ) -> Self {
        js.set_timeout(timeout);
        Publisher {
            client,
            js,
            timeout,
            in_flight: Arc::new(Semaphore::new(MAX_IN_FLIGHT)),
            alert_bytes,
        }
    }

    /// Encodes every alert and checks its size before anything is sent, so
    /// a request with one alert that can never be stored stores nothing
    /// and gets a 4xx instead of a 503 that would be retried forever. The
    /// alerts of a request of several are then put together in messages
    /// of up to [`BATCH_ALERTS`] alerts and [`BATCH_BYTES`].
    fn prepare(
        &self,
        source: &str,
        received_at: Timestamp,
        traceparent: &str,
        alerts: Vec<Alert>,
        what: &str,
    ) -> Result<Vec<Prepared>, PublishError> {
        // max_payload covers headers and payload together.
        let max_payload = self.client.max_payload();
        let mut out = Vec::with_capacity(alerts.len());
        for (i, alert) in alerts.iter().enumerate() {
            let subject = alert_subject(
                alert
                    .origin
                    .kind
                    .unwrap_or(tocsin_proto::SourceKind::Generic),
                &alert.fingerprint,
            );
            let msg_id = alert.msg_id();
            let env = Envelope::new(source, received_at, alert)
                .with_traceparent(Some(traceparent.to_string()));
            let payload = codec::encode(&env)?;
            let name = if what == "alerts" {
                format!("alerts[{i}]")
            } else {
                what.to_string()
            };
            if payload.len() > self.alert_bytes {
                return Err(PublishError::TooLarge(format!(
                    "{name}: {} bytes as stored, the limit is {} (ingest.limits.alert_bytes); \
                     shorten its labels, annotations or links",
                    payload.len(),
                    self.alert_bytes
                )));
            }
            let wire = payload.len() + header_bytes(traceparent, &msg_id);
            if max_payload > 0 && wire > max_payload {
                return Err(PublishError::TooLarge(format!(
                    "{name}: {wire} bytes with its headers, the NATS server's max_payload is {max_payload}; \
                     lower ingest.limits.alert_bytes below it, or raise max_payload on the server"
                )));
            }
            out.push(Prepared {
                subject,
                msg_id,
                payload,
                alerts: 1,
            });
        }
        if out.len() < 2 {
            return Ok(out);
        }
        let most = if max_payload > 0 {
            BATCH_BYTES.min(max_payload)
        } else {
            BATCH_BYTES
        };
        let mut messages = Vec::new();
        let mut each = out.into_iter().peekable();
        let mut from = 0;
        while let Some(first) = each.next() {
            // A batch's encoding is smaller than the sum of its alerts'
            // (one envelope instead of one each), and its header block is
            // about one alert's.
            let mut bytes = first.payload.len() + header_bytes(traceparent, &first.msg_id);
            let mut chunk = vec![first];
            while chunk.len() < BATCH_ALERTS {
                let Some(next) = each.next_if(|p| bytes + p.payload.len() <= most) else {
                    break;
                };
                bytes += next.payload.len();
                chunk.push(next);
            }
            let to = from + chunk.len();
            if chunk.len() == 1 {
                messages.extend(chunk);
            } else {
                messages.push(self.batch(
                    source,
                    received_at,
                    traceparent,
                    &alerts[from..to],
                    &chunk,
                )?);
            }
            from = to;
        }
        Ok(messages)
    }

    /// One message holding `alerts` (checked one by one as `each`).
    fn batch(
        &self,
        source: &str,
        received_at: Timestamp,
        traceparent: &str,
        alerts: &[Alert],
        each: &[Prepared],
    ) -> Result<Prepared, PublishError> {
        use sha2::{Digest, Sha256};
        let kind = alerts[0]
            .origin
            .kind
            .unwrap_or(tocsin_proto::SourceKind::Generic);
        let env = Envelope::new(source, received_at, alerts)
            .with_traceparent(Some(traceparent.to_string()));
        let mut ids = Sha256::new();
        for p in each {
            ids.update(p.msg_id.as_bytes());
            ids.update(b"\n");
        }
        Ok(Prepared {
            subject: alert_batch_subject(kind),
            msg_id: format!("alerts:{}", hex::encode(&ids.finalize()[..16])),
            payload: codec::encode(&env)?,
            alerts: alerts.len(),
        })
    }

    /// Stores every alert or fails. On failure some alerts may be stored
    /// already; a retry of the same request is safe because their message
    /// ids are derived from what they mean.
    ///
    /// `what` names the alerts in errors: `"alerts"` gives `alerts[3]`, any
    /// other word (`"event"`) is used as is for a request of one alert.
    pub async fn publish(
        &self,
        source: &str,
        received_at: Timestamp,
        traceparent: &str,
        alerts: Vec<Alert>,
        what: &str,
    ) -> Result<Stored, PublishError> {
        let prepared = self.prepare(source, received_at, traceparent, alerts, what)?;
        if !tocsin_runtime::nats::is_connected(&self.client) {
            return Err(PublishError::NotConnected);
        }
        let work = async {
            let mut out = Stored::default();
            let mut messages = prepared.into_iter().peekable();
            while messages.peek().is_some() {
                let chunk: Vec<Prepared> = messages.by_ref().take(CHUNK).collect();
                let _permits = self
                    .in_flight
                    .acquire_many(chunk.len() as u32)
                    .await
                    .map_err(|e| PublishError::Refused(e.to_string()))?;
                let mut acks = Vec::with_capacity(chunk.len());
                let mut counts = Vec::with_capacity(chunk.len());
                for message in chunk {
                    counts.push(message.alerts);
                    acks.push(self.send(traceparent, message).await?);
                }
                let results = join_all(acks.into_iter().map(|a| a.into_future())).await;
                for (result, n) in results.into_iter().zip(counts) {
                    let ack = result.map_err(|e| PublishError::from_jetstream(&e, self.timeout))?;
                    if ack.duplicate {
                        out.duplicates += n;
                    } else {
                        out.stored += n;
                    }
                }
            }
            Ok(out)
        };
        match tokio::time::timeout(self.timeout, work).await {
            Ok(r) => r,
            Err(_) => Err(PublishError::TimedOut(self.timeout)),
        }
    }

    async fn send(
        &self,
        traceparent: &str,
        alert: Prepared,
    ) -> Result<jetstream::context::PublishAckFuture, PublishError> {
        let publish =
            tocsin_runtime::bus::message(alert.payload, alert.msg_id, Some(traceparent), &[]);
        self.js
            .send_publish(alert.subject, publish)
            .await
            .map_err(|e| PublishError::from_jetstream(&e, self.timeout))
    }
}

/// The size of the header block [`Publisher::send`] writes (NATS counts it
/// against `max_payload`): `NATS/1.0\r\n`, one `Name: value\r\n` per header,
/// and a blank line.
fn header_bytes(traceparent: &str, msg_id: &str) -> usize {
    let line = |name: &str, value: &str| name.len() + 2 + value.len() + 2;
    "NATS/1.0\r\n".len()
        + line(headers::TRACEPARENT, traceparent)
        + line(headers::SCHEMA, &SCHEMA_VERSION.to_string())
        + line("Nats-Msg-Id", msg_id)
        + 2
}
