//! Publishing alerts to the ALERTS stream, answering only once JetStream
//! acknowledged every one of them.

use std::{future::IntoFuture, sync::Arc, time::Duration};

use tokio::sync::Semaphore;

use async_nats::{
    jetstream::{self, message::PublishMessage},
    Client, HeaderMap,
};
use futures::future::join_all;
use tocsin_proto::{
    codec,
    subjects::{alert_subject, headers},
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
    #[error("cannot encode alert: {0}")]
    Encode(#[from] codec::CodecError),
}

/// What happened to a request's alerts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Stored {
    /// Newly stored.
    pub stored: usize,
    /// Already in the stream (a retried request); dropped by JetStream.
    pub duplicates: usize,
}

/// Alert publishes awaiting their acks at once, across all requests. Kept
/// below async-nats's per-context limit (5,000), and taken all-or-nothing per
/// chunk: if requests each held part of that limit while waiting for the
/// rest, they could block one another until the publish timeout.
const MAX_IN_FLIGHT: usize = 4096;
/// Alerts sent before awaiting their acks.
const CHUNK: usize = 256;

/// Publishes alerts with `Nats-Msg-Id` set, and waits for every ack.
#[derive(Clone)]
pub struct Publisher {
    client: Client,
    js: jetstream::Context,
    timeout: Duration,
    in_flight: Arc<Semaphore>,
}

impl Publisher {
    pub fn new(client: Client, mut js: jetstream::Context, timeout: Duration) -> Self {
        js.set_timeout(timeout);
        Publisher {
            client,
            js,
            timeout,
            in_flight: Arc::new(Semaphore::new(MAX_IN_FLIGHT)),
        }
    }

    /// Stores every alert or fails. On failure some alerts may be stored
    /// already; a retry of the same request is safe because their message
    /// ids are derived from what they mean.
    pub async fn publish(
        &self,
        source: &str,
        received_at: Timestamp,
        traceparent: &str,
        alerts: Vec<Alert>,
    ) -> Result<Stored, PublishError> {
        if !tocsin_runtime::nats::is_connected(&self.client) {
            return Err(PublishError::NotConnected);
        }
        let work = async {
            let mut out = Stored::default();
            let mut alerts = alerts.into_iter().peekable();
            while alerts.peek().is_some() {
                let chunk: Vec<Alert> = alerts.by_ref().take(CHUNK).collect();
                let _permits = self
                    .in_flight
                    .acquire_many(chunk.len() as u32)
                    .await
                    .map_err(|e| PublishError::Refused(e.to_string()))?;
                let mut acks = Vec::with_capacity(chunk.len());
                for alert in chunk {
                    acks.push(self.send(source, received_at, traceparent, alert).await?);
                }
                for result in join_all(acks.into_iter().map(|a| a.into_future())).await {
                    let ack = result.map_err(|e| match e.kind() {
                        jetstream::context::PublishErrorKind::TimedOut => {
                            PublishError::TimedOut(self.timeout)
                        }
                        _ => PublishError::Refused(e.to_string()),
                    })?;
                    if ack.duplicate {
                        out.duplicates += 1;
                    } else {
                        out.stored += 1;
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
        source: &str,
        received_at: Timestamp,
        traceparent: &str,
        alert: Alert,
    ) -> Result<jetstream::context::PublishAckFuture, PublishError> {
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
        let mut h = HeaderMap::new();
        h.insert(headers::TRACEPARENT, traceparent);
        h.insert(headers::SCHEMA, SCHEMA_VERSION.to_string().as_str());
        // headers() replaces the whole map: set it before message_id().
        let publish = PublishMessage::build()
            .payload(payload.into())
            .headers(h)
            .message_id(msg_id);
        self.js
            .send_publish(subject, publish)
            .await
            .map_err(|e| PublishError::Refused(e.to_string()))
    }
}
