//! Reading what landed on a stream.

use async_nats::{jetstream, HeaderMap};
use serde::de::DeserializeOwned;
use tocsin_proto::{
    codec::{decode_alerts, decode_commands, decode_entries, decode_envelope, decode_pages},
    command::Command,
    subjects::{STREAM_ALERTS, STREAM_COMMANDS},
    Alert, Envelope,
};

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
    stored(js, stream)
        .await
        .into_iter()
        .map(|(seq, msg)| Stored {
            seq,
            subject: msg.subject.to_string(),
            envelope: decode_envelope::<T>(&msg.payload).expect("stored message decodes"),
            headers: msg.headers,
        })
        .collect()
}

/// Every alert currently on ALERTS, in order: a message holding several
/// alerts of one request gives each of them (with the message's sequence,
/// subject and headers).
pub async fn read_alerts(js: &jetstream::Context) -> Vec<Stored<Alert>> {
    read_each(js, STREAM_ALERTS, |subject, bytes| {
        decode_alerts(subject, bytes).map(|requests| requests.into_iter().flat_map(Envelope::split))
    })
    .await
}

/// Every command currently on COMMANDS, in order: a message holding
/// several gives each of them (with the message's sequence, subject and
/// headers).
pub async fn read_commands(js: &jetstream::Context) -> Vec<Stored<Command>> {
    read_each(js, STREAM_COMMANDS, |s, b| {
        decode_commands(s, b).map(Envelope::split)
    })
    .await
}

/// Every entry currently on INCIDENTS, in order: a message holding
/// several (the receipts the incidents service stores together) gives
/// each of them, with the message's sequence, subject and headers.
pub async fn read_entries(
    js: &jetstream::Context,
) -> Vec<Stored<tocsin_proto::incident::LogEntry>> {
    read_each(js, tocsin_proto::subjects::STREAM_INCIDENTS, |s, b| {
        decode_entries(s, b).map(Envelope::split)
    })
    .await
}

/// Every page currently on NOTIFY, in order: a message holding several
/// (an escalation burst's, for one channel) gives each of them.
pub async fn read_pages(js: &jetstream::Context) -> Vec<Stored<tocsin_proto::notify::Page>> {
    read_each(js, tocsin_proto::subjects::STREAM_NOTIFY, |s, b| {
        decode_pages(s, b).map(Envelope::split)
    })
    .await
}

/// `stream`'s configuration as the server has it.
pub async fn stream_config(js: &jetstream::Context, stream: &str) -> jetstream::stream::Config {
    js.get_stream(stream)
        .await
        .expect("stream exists")
        .info()
        .await
        .expect("stream info")
        .config
        .clone()
}

/// Every item of every message on `stream`, as `decode` splits them.
async fn read_each<T, I: IntoIterator<Item = Envelope<T>>, E: std::fmt::Debug>(
    js: &jetstream::Context,
    stream: &str,
    decode: impl Fn(&str, &[u8]) -> Result<I, E>,
) -> Vec<Stored<T>> {
    let mut out = Vec::new();
    for (seq, msg) in stored(js, stream).await {
        let each = decode(&msg.subject, &msg.payload).expect("stored messages decode");
        out.extend(each.into_iter().map(|envelope| Stored {
            seq,
            subject: msg.subject.to_string(),
            headers: msg.headers.clone(),
            envelope,
        }));
    }
    out
}

/// Every message currently in `stream` with its sequence, in order; the
/// lease's tenure markers, which are not entries, left out.
async fn stored(
    js: &jetstream::Context,
    stream: &str,
) -> Vec<(u64, async_nats::jetstream::message::StreamMessage)> {
    let mut all = stored_raw(js, stream).await;
    all.retain(|(_, m)| !tocsin_proto::subjects::is_tenure_marker(&m.subject));
    all
}

/// Every message currently in `stream` with its sequence, in order,
/// tenure markers included.
pub async fn stored_raw(
    js: &jetstream::Context,
    stream: &str,
) -> Vec<(u64, async_nats::jetstream::message::StreamMessage)> {
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
        out.push((seq, msg));
    }
    out
}

/// Number of alerts on ALERTS (a message may hold several).
pub async fn count_alerts(js: &jetstream::Context) -> u64 {
    read_alerts(js).await.len() as u64
}

/// Number of messages in `stream`, the lease's tenure markers included
/// (one request: [`count_without_markers`] leaves them out).
pub async fn count(js: &jetstream::Context, stream: &str) -> u64 {
    let mut s = js.get_stream(stream).await.expect("stream exists");
    s.info().await.expect("stream info").state.messages
}

/// Number of messages in `stream`, the lease's tenure markers (which are
/// not entries or pages) left out: e.g. the pages still on NOTIFY, where
/// escalation's markers stay.
pub async fn count_without_markers(js: &jetstream::Context, stream: &str) -> u64 {
    try_count_without_markers(js, stream)
        .await
        .unwrap_or_else(|e| panic!("cannot count the messages of {stream}: {e}"))
}

/// [`count_without_markers`], or why NATS did not answer.
pub async fn try_count_without_markers(
    js: &jetstream::Context,
    stream: &str,
) -> Result<u64, String> {
    use futures::TryStreamExt as _;
    let mut s = js.get_stream(stream).await.map_err(|e| e.to_string())?;
    let all = s.info().await.map_err(|e| e.to_string())?.state.messages;
    let mut markers = 0;
    for subject in [
        tocsin_proto::subjects::INCIDENTS_TENURE,
        tocsin_proto::subjects::NOTIFY_TENURE,
    ] {
        let mut per = s
            .info_with_subjects(subject)
            .await
            .map_err(|e| e.to_string())?;
        while let Some((_, n)) = per.try_next().await.map_err(|e| e.to_string())? {
            markers += n as u64;
        }
    }
    Ok(all.saturating_sub(markers))
}

/// The revision of `role`'s lease key (`tocsin_runtime::lease`): the
/// stream sequence of its last write, the acquisition then each renewal;
/// 0 while there is none.
pub async fn lease_revision(js: &jetstream::Context, role: &str) -> u64 {
    let Ok(kv) = js.get_key_value(tocsin_runtime::lease::bucket(role)).await else {
        return 0;
    };
    match kv.entry(tocsin_runtime::lease::KEY).await {
        Ok(Some(e)) => e.revision,
        _ => 0,
    }
}
