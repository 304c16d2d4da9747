//! Reading what landed on a stream.

use async_nats::{jetstream, HeaderMap};
use serde::de::DeserializeOwned;
use tocsin_proto::{codec::decode_envelope, Envelope};

/// One stored message, decoded.
#[derive(Debug)]
pub struct Stored<T> {
    pub seq: u64,
    pub subject: String,
    pub headers: HeaderMap,
    pub envelope: Envelope<T>,
}

/// Every message currently in `stream`, in order, decoded as `Envelope<T>`.
pub async fn read_stream<T: DeserializeOwned>(
    js: &jetstream::Context,
    stream: &str,
) -> Vec<Stored<T>> {
    let mut s = js.get_stream(stream).await.expect("stream exists");
    let info = s.info().await.expect("stream info").state.clone();
    let mut out = Vec::new();
    if info.messages == 0 {
        return out;
    }
    for seq in info.first_sequence..=info.last_sequence {
        let Ok(msg) = s.get_raw_message(seq).await else {
            continue; // deleted
        };
        let envelope = decode_envelope::<T>(&msg.payload).expect("stored message decodes");
        out.push(Stored {
            seq,
            subject: msg.subject.to_string(),
            headers: msg.headers,
            envelope,
        });
    }
    out
}

/// Number of messages in `stream`.
pub async fn count(js: &jetstream::Context, stream: &str) -> u64 {
    let mut s = js.get_stream(stream).await.expect("stream exists");
    s.info().await.expect("stream info").state.messages
}
