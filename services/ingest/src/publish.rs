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
//!
//! Small requests (up to [`PACKED_ALERTS`] alerts) share a message when
//! they come faster than JetStream acknowledges (group commit, [`Packer`]):
//! a request whose message finds the packer idle is sent at once, alone,
//! exactly as above;
//! one that arrives while the packer's message is waiting for its
//! acknowledgement waits for it, and then goes with every request that
//! arrived meanwhile (of its source kind, up to [`BATCH_ALERTS`] alerts and
//! [`BATCH_BYTES`]) in one message on [`alert_pack_subject`], each request
//! in an envelope of its own (its source, receive time and trace context).
//! Each request is answered once the message holding it is acknowledged.
//! A burst of small requests (Alertmanager sends one webhook per group)
//! then costs a sync per pack instead of one per request. A pack's id is
//! derived from every alert it holds, so a retried request that lands in
//! another pack is stored again; the incidents service changes nothing
//! for an alert repeated as it was.

use std::{collections::VecDeque, future::IntoFuture, sync::Arc, time::Duration};

use tokio::sync::{mpsc, oneshot, Semaphore};

use async_nats::{jetstream, Client};
use futures::{future::join_all, stream::FuturesUnordered, StreamExt as _};
use tocsin_proto::{
    codec,
    subjects::{alert_batch_subject, alert_pack_subject, alert_subject, headers},
    Alert, Envelope, SourceKind, Timestamp, SCHEMA_VERSION,
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

impl Stored {
    /// Counts `n` alerts of a message JetStream acknowledged (as a
    /// duplicate, or stored).
    fn add(&mut self, n: usize, duplicate: bool) {
        if duplicate {
            self.duplicates += n;
        } else {
            self.stored += n;
        }
    }
}

/// Messages awaiting their acks at once, across all requests. Kept
/// below async-nats's per-context limit (5,000), and taken all-or-nothing per
/// chunk: if requests each held part of that limit while waiting for the
/// rest, they could block one another until the publish timeout.
const MAX_IN_FLIGHT: usize = 4096;
/// Messages sent before awaiting their acks.
const CHUNK: usize = 256;

/// Packs awaiting their acknowledgement at once: one, so that whatever
/// arrives meanwhile goes in the next (the stream stores its messages one
/// after another, each synced, so a second pack in flight would mostly
/// wait at the server instead of here, alone).
const PACKS_IN_FLIGHT: usize = 1;
/// Most alerts of a request that shares messages. A larger request's
/// message already spreads its sync over many alerts, and is sent at once
/// (its acknowledgement awaited beside others'), as putting it behind the
/// packer's one message in flight would cost more than the sync it saves
/// (webhooks of 100 alerts from 8 connections packed two to a message ran
/// at 0.40x the raw rate; sent at once, 0.45x the same day).
pub const PACKED_ALERTS: usize = 16;
/// Requests handed to the packer not yet taken by it; more wait to be
/// taken. What it holds is bounded by what ingest lets in at once (its
/// in-flight byte budget and `max_connections`).
const PACK_QUEUE: usize = 4096;

/// Publishes alerts with `Nats-Msg-Id` set, and waits for every ack.
#[derive(Clone)]
pub struct Publisher {
    client: Client,
    js: jetstream::Context,
    timeout: Duration,
    in_flight: Arc<Semaphore>,
    /// `ingest.limits.alert_bytes`: largest encoded alert envelope.
    alert_bytes: usize,
    /// Requests of one message each, to the [`Packer`].
    packer: mpsc::Sender<Waiting>,
}

impl Publisher {
    pub fn new(
        client: Client,
        mut js: jetstream::Context,
        timeout: Duration,
        alert_bytes: usize,
    ) -> Self {
        js.set_timeout(timeout);
        let (packer, waiting) = mpsc::channel(PACK_QUEUE);
        tokio::spawn(
            Packer {
                client: client.clone(),
                js: js.clone(),
                timeout,
            }
            .run(waiting),
        );
        Publisher {
            client,
            js,
            timeout,
            in_flight: Arc::new(Semaphore::new(MAX_IN_FLIGHT)),
            alert_bytes,
            packer,
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
        alerts: &[Alert],
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
        let most = most_bytes(max_payload);
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
        let mut prepared = self.prepare(source, received_at, traceparent, &alerts, what)?;
        if !tocsin_runtime::nats::is_connected(&self.client) {
            return Err(PublishError::NotConnected);
        }
        if prepared.len() == 1 && prepared[0].alerts <= PACKED_ALERTS {
            // One small message: it may share one with other requests.
            let (reply, answer) = oneshot::channel();
            let request = Envelope::new(source, received_at, alerts)
                .with_traceparent(Some(traceparent.to_string()));
            let waiting = Waiting {
                kind: request
                    .body
                    .first()
                    .and_then(|a| a.origin.kind)
                    .unwrap_or(SourceKind::Generic),
                request,
                alone: prepared.remove(0),
                reply,
            };
            let stopped = || PublishError::Refused("ingest's packer has stopped".into());
            let work = async {
                self.packer.send(waiting).await.map_err(|_| stopped())?;
                answer.await.map_err(|_| stopped())?
            };
            return match tokio::time::timeout(self.timeout, work).await {
                Ok(r) => r,
                Err(_) => Err(PublishError::TimedOut(self.timeout)),
            };
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
                    out.add(n, ack.duplicate);
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

/// The largest message of several alerts, given the NATS server's
/// `max_payload` (0: unknown).
fn most_bytes(max_payload: usize) -> usize {
    if max_payload > 0 {
        BATCH_BYTES.min(max_payload)
    } else {
        BATCH_BYTES
    }
}

/// A request whose alerts fit in one message, waiting to be sent.
struct Waiting {
    kind: SourceKind,
    /// The request: its source, receive time, trace context and alerts.
    request: Envelope<Vec<Alert>>,
    /// Its message, as it is sent when no other request shares it.
    alone: Prepared,
    reply: oneshot::Sender<Result<Stored, PublishError>>,
}

/// Sends the requests of one message each ([`Waiting`]) in as few
/// messages as fit while JetStream is busy with the ones before (see the
/// module docs), and answers each once its message is acknowledged.
struct Packer {
    client: Client,
    js: jetstream::Context,
    timeout: Duration,
}

/// A message on its way: its acknowledgement, and whom to answer.
type Sending = futures::future::BoxFuture<
    'static,
    (
        Result<jetstream::publish::PublishAck, jetstream::context::PublishError>,
        Vec<(usize, oneshot::Sender<Result<Stored, PublishError>>)>,
    ),
>;

impl Packer {
    async fn run(self, mut arriving: mpsc::Receiver<Waiting>) {
        let mut queue: VecDeque<Waiting> = VecDeque::new();
        let mut sending: FuturesUnordered<Sending> = FuturesUnordered::new();
        let mut open = true;
        loop {
            while let Ok(w) = arriving.try_recv() {
                queue.push_back(w);
            }
            while sending.len() < PACKS_IN_FLIGHT && !queue.is_empty() {
                let pack = take_pack(&mut queue, most_bytes(self.client.max_payload()));
                if let Some(s) = self.send(pack).await {
                    sending.push(s);
                }
            }
            if !open && queue.is_empty() && sending.is_empty() {
                return;
            }
            tokio::select! {
                w = arriving.recv(), if open => match w {
                    Some(w) => queue.push_back(w),
                    None => open = false,
                },
                Some((ack, waiters)) = sending.next(), if !sending.is_empty() => {
                    self.answer(ack, waiters);
                }
            }
        }
    }

    /// Sends `pack` (one request as it is, or several in a pack); None
    /// when it could not be sent (each request answered with why).
    async fn send(&self, pack: Vec<Waiting>) -> Option<Sending> {
        let traceparent = pack[0].request.traceparent.clone().unwrap_or_default();
        let (subject, msg_id, payload, waiters) = if pack.len() == 1 {
            let w = pack.into_iter().next().expect("a pack of one");
            let Prepared {
                subject,
                msg_id,
                payload,
                alerts,
            } = w.alone;
            (subject, msg_id, payload, vec![(alerts, w.reply)])
        } else {
            match self.pack(&pack) {
                Ok((subject, msg_id, payload)) => {
                    let waiters = pack
                        .into_iter()
                        .map(|w| (w.alone.alerts, w.reply))
                        .collect();
                    (subject, msg_id, payload, waiters)
                }
                Err(e) => {
                    let why = e.to_string();
                    for w in pack {
                        let _ = w.reply.send(Err(PublishError::Refused(why.clone())));
                    }
                    return None;
                }
            }
        };
        let message = tocsin_runtime::bus::message(payload, msg_id, Some(&traceparent), &[]);
        match self.js.send_publish(subject, message).await {
            Ok(ack) => Some(Box::pin(async move { (ack.into_future().await, waiters) })),
            Err(e) => {
                for (_, reply) in waiters {
                    let _ = reply.send(Err(PublishError::from_jetstream(&e, self.timeout)));
                }
                None
            }
        }
    }

    /// Subject, message id and payload of a pack of several requests: a
    /// MessagePack array of each request's `Envelope<Vec<Alert>>`, the one
    /// a request of several already has reused as it is. The id is derived
    /// from its requests' own message ids (each derived from its alerts').
    fn pack(&self, pack: &[Waiting]) -> Result<(String, String, Vec<u8>), codec::CodecError> {
        use sha2::{Digest, Sha256};
        let mut payload = Vec::new();
        let n = u32::try_from(pack.len()).unwrap_or(u32::MAX);
        rmp::encode::write_array_len(&mut payload, n).expect("writing to a Vec does not fail");
        let mut ids = Sha256::new();
        for w in pack {
            if w.alone.alerts > 1 {
                payload.extend_from_slice(&w.alone.payload);
            } else {
                payload.extend_from_slice(&codec::encode(&w.request)?);
            }
            ids.update(w.alone.msg_id.as_bytes());
            ids.update(b"\n");
        }
        Ok((
            alert_pack_subject(pack[0].kind),
            format!("alerts-pack:{}", hex::encode(&ids.finalize()[..16])),
            payload,
        ))
    }

    fn answer(
        &self,
        ack: Result<jetstream::publish::PublishAck, jetstream::context::PublishError>,
        waiters: Vec<(usize, oneshot::Sender<Result<Stored, PublishError>>)>,
    ) {
        for (n, reply) in waiters {
            let answer = match &ack {
                Ok(a) => {
                    let mut stored = Stored::default();
                    stored.add(n, a.duplicate);
                    Ok(stored)
                }
                Err(e) => Err(PublishError::from_jetstream(e, self.timeout)),
            };
            let _ = reply.send(answer);
        }
    }
}

/// The requests of the next message: the first waiting, and after it every
/// waiting request of its source kind that still fits (at most
/// [`BATCH_ALERTS`] alerts and `most` bytes); the others keep their order.
fn take_pack(queue: &mut VecDeque<Waiting>, most: usize) -> Vec<Waiting> {
    let Some(first) = queue.pop_front() else {
        return Vec::new();
    };
    let kind = first.kind;
    // Each request's envelope as it is in the pack (a single alert's gains
    // an array header), the pack's array header and the message headers
    // (a trace context and the pack's id) all stay within the slack.
    const SLACK: usize = 512;
    const EACH: usize = 8;
    let mut bytes = SLACK + first.alone.payload.len() + EACH;
    let mut alerts = first.alone.alerts;
    let mut pack = vec![first];
    let mut kept = VecDeque::with_capacity(queue.len());
    while let Some(w) = queue.pop_front() {
        let fits = w.kind == kind
            && alerts + w.alone.alerts <= BATCH_ALERTS
            && bytes + w.alone.payload.len() + EACH <= most;
        if fits {
            bytes += w.alone.payload.len() + EACH;
            alerts += w.alone.alerts;
            pack.push(w);
        } else {
            kept.push_back(w);
        }
    }
    *queue = kept;
    pack
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
