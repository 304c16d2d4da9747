//! Publishing alerts to the ALERTS stream, answering only once JetStream
//! acknowledged every one of them.

use std::{future::IntoFuture, time::Duration};

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

/// Publishes alerts with `Nats-Msg-Id` set, and waits for every ack.
#[derive(Clone)]
pub struct Publisher {
    client: Client,
    js: jetstream::Context,
    timeout: Duration,
}

impl Publisher {
    pub fn new(client: Client, mut js: jetstream::Context, timeout: Duration) -> Self {
        js.set_timeout(timeout);
        Publisher {
            client,
            js,
            timeout,
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
            let mut acks = Vec::with_capacity(alerts.len());
            for alert in alerts {
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
                let ack = self
                    .js
                    .send_publish(subject, publish)
                    .await
                    .map_err(|e| PublishError::Refused(e.to_string()))?;
                acks.push(ack);
            }
            let mut out = Stored::default();
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
            Ok(out)
        };
        match tokio::time::timeout(self.timeout, work).await {
            Ok(r) => r,
            Err(_) => Err(PublishError::TimedOut(self.timeout)),
        }
    }
}
