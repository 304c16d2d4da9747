//! The one way a Tocsin message is put on JetStream.

use async_nats::{jetstream::message::PublishMessage, HeaderMap};
use bytes::Bytes;
use tocsin_proto::{subjects::headers, SCHEMA_VERSION};

/// A JetStream message with the headers every Tocsin message carries: the
/// message id (so JetStream drops a repeat), the schema version, and the
/// W3C `traceparent` when the input had one; `extra` adds others (such as
/// the reply-to inbox of a command).
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
