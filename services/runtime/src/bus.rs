//! The one way a Tocsin message is put on JetStream, and [`store`]: one
//! message stored for someone waiting on it, sent again while it is not.

use std::time::Duration;

use async_nats::{
    jetstream::{self, context::PublishErrorKind, message::PublishMessage, publish::PublishAck},
    HeaderMap,
};
use bytes::Bytes;
use tocsin_proto::{subjects::headers, SCHEMA_VERSION};

use crate::retry::Backoff;

tokio::task_local! {
    /// The lease tenure (`<role>/<term>`) the current task acts under, set
    /// by [`crate::lease::lead`] around a service's run.
    pub static LEASE: String;
}

/// The header naming the lease tenure that published a message.
pub const LEASE_HEADER: &str = "Tocsin-Lease";

/// A JetStream message with the headers every Tocsin message carries: the
/// message id (so JetStream drops a repeat), the schema version, and the
/// W3C `traceparent` when the input had one; `extra` adds others (such as
/// the reply-to inbox of a command). A message published by a service that
/// runs under a lease ([`crate::lease`]) also carries `Tocsin-Lease:
/// <role>/<term>`, so the stream shows which tenure wrote it.
pub fn message(
    payload: impl Into<Bytes>,
    msg_id: impl Into<String>,
    traceparent: Option<&str>,
    extra: &[(&str, &str)],
) -> PublishMessage {
    let mut h = HeaderMap::new();
    h.insert(headers::SCHEMA, SCHEMA_VERSION.to_string().as_str());
    if let Some(tp) = traceparent {
        h.insert(headers::TRACEPARENT, tp);
    }
    for (name, value) in extra {
        h.insert(*name, *value);
    }
    let _ = LEASE.try_with(|tenure| h.insert(LEASE_HEADER, tenure.as_str()));
    // headers() replaces the whole map: set it before message_id().
    PublishMessage::build()
        .payload(payload.into())
        .headers(h)
        .message_id(msg_id.into())
}

/// How long [`store`] waits for the first try's acknowledgement before it
/// sends the message again; each later try waits twice as long, up to
/// [`LONGEST_TRY`]. A stored message is acknowledged in milliseconds, on a
/// cluster too; one unacknowledged for a second was most likely lost.
pub const FIRST_TRY: Duration = Duration::from_secs(1);
/// The longest [`store`] waits for one try's acknowledgement.
pub const LONGEST_TRY: Duration = Duration::from_secs(4);

/// Why [`store`] gave up on a message.
#[derive(Debug, thiserror::Error)]
pub enum NotStored {
    /// No try was acknowledged within the patience. One may still have
    /// been stored (its acknowledgement lost): the command may yet be
    /// applied, once.
    #[error(
        "no try acknowledged within {patience:?} ({tries} tries; the last: {last}); \
         one may still have been stored and be applied"
    )]
    OutOfTime {
        patience: Duration,
        tries: u32,
        last: String,
    },
    /// Refused as no try could change: larger than the server or the
    /// stream takes.
    #[error("{0}")]
    Refused(String),
}

/// Stores `message` on `subject` for someone waiting on it (an operator's
/// command): sent again, under its message id (so JetStream keeps one),
/// while it is not acknowledged, within `patience` in all. A try that is
/// refused at once (no stream answers: a stream leader being elected, or
/// the connection away) is sent again after a pause (100 ms doubling to a
/// second); one that is not acknowledged within [`FIRST_TRY`] (doubling to
/// [`LONGEST_TRY`]) is sent again at once: the publish or its
/// acknowledgement was lost with a connection or a dying stream leader.
/// Only a message too large for the server or the stream is not sent
/// again. The service loops, which have their own way of going on, use
/// `send_publish` directly.
pub async fn store(
    js: &jetstream::Context,
    subject: &str,
    message: PublishMessage,
    patience: Duration,
) -> Result<PublishAck, NotStored> {
    let deadline = tokio::time::Instant::now() + patience;
    let mut wait = FIRST_TRY;
    let mut pause = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
    let mut tries = 0;
    loop {
        tries += 1;
        let limit = wait.min(deadline.saturating_duration_since(tokio::time::Instant::now()));
        let tried = tokio::time::timeout(limit, async {
            js.send_publish(subject.to_string(), message.clone())
                .await?
                .await
        })
        .await;
        let (last, refused_at_once) = match tried {
            Ok(Ok(ack)) => return Ok(ack),
            Ok(Err(e)) if too_large(&e) => return Err(NotStored::Refused(e.to_string())),
            Ok(Err(e)) => (e.to_string(), true),
            Err(_) => (format!("no acknowledgement within {limit:?}"), false),
        };
        wait = (wait * 2).min(LONGEST_TRY);
        let rest = deadline.saturating_duration_since(tokio::time::Instant::now());
        if refused_at_once && !rest.is_zero() {
            tokio::time::sleep(pause.step().min(rest)).await;
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(NotStored::OutOfTime {
                patience,
                tries,
                last,
            });
        }
        tracing::debug!(subject, tries, %last, "not stored yet; sending it again");
    }
}

/// The JetStream error code a publish was refused with (None: no answer,
/// or one async-nats decoded into a kind of its own).
pub fn refusal(e: &jetstream::context::PublishError) -> Option<jetstream::ErrorCode> {
    std::error::Error::source(e)
        .and_then(|s| s.downcast_ref::<jetstream::Error>())
        .map(jetstream::Error::error_code)
}

/// Whether a publish was refused as too large: over the server's
/// `max_payload`, or the stream's largest message or headers. No later try
/// of the same message can change that.
pub fn too_large(e: &jetstream::context::PublishError) -> bool {
    e.kind() == PublishErrorKind::MaxPayloadExceeded
        || matches!(
            refusal(e),
            Some(
                jetstream::ErrorCode::STREAM_MESSAGE_EXCEEDS_MAXIMUM
                    | jetstream::ErrorCode::STREAM_HEADER_EXCEEDS_MAXIMUM
            )
        )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_message_has_its_id_and_schema_version() {
        let m = message(
            b"x".to_vec(),
            "a:1",
            Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
            &[(headers::REPLY_TO, "_INBOX.cli.1")],
        );
        let dbg = format!("{m:?}");
        for want in [
            "a:1",
            &SCHEMA_VERSION.to_string(),
            "0af7651916cd43dd8448eb211c80319c",
            "_INBOX.cli.1",
        ] {
            assert!(dbg.contains(want), "{want} missing from {dbg}");
        }
    }
}
