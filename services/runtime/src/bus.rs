//! The one way a Tocsin message is put on JetStream.

use async_nats::{jetstream::message::PublishMessage, HeaderMap};
use bytes::Bytes;
use tocsin_proto::{subjects::headers, SCHEMA_VERSION};

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
