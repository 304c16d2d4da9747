//! A lease tenure's fence on the stream its role writes, enforced by the
//! NATS server.
//!
//! The lease ([`crate::lease`]) stops an instance from *acting* a third of
//! the TTL before anyone else can take the lease. It cannot stop what the
//! instance already handed to its NATS client: publishes made while the
//! connection was away are sent when it is back, and on a starved machine
//! a publish can sit in the client or the socket for longer than that
//! margin. Such a publish may land after the next tenure began writing. A
//! stream position expected by each entry (`Nats-Expected-Last-Sequence`)
//! refuses most of them, but not all: an instance that sent several
//! entries without waiting expects consecutive positions, and when the
//! next tenure has written just enough, one of them matches.
//!
//! So each tenure first writes a **marker** on the role's tenure subject
//! (for incidents, `tocsin.incidents.tenure`, in the INCIDENTS stream),
//! and every entry it writes names that marker:
//! `Nats-Expected-Last-Subject-Sequence: <marker's sequence>` with
//! `Nats-Expected-Last-Subject-Sequence-Subject: <tenure subject>`. The
//! server stores an entry only while the last message on the tenure
//! subject is its tenure's marker. Once a newer tenure's marker is stored,
//! nothing an older tenure sent is ever stored again, however late it
//! arrives: the check is the server's, and no clock is involved.
//!
//! A marker is itself written only after the last marker the writer read
//! (`Nats-Expected-Last-Subject-Sequence` on its own subject), and never
//! over a newer term's: a late marker of an old tenure is refused too.
//! [`take`] returns the marker of the current tenure: the one it finds
//! already written (a retry after a lost acknowledgement), or a new one
//! (also when its earlier marker is gone: the stream's age limit, a purge).
//!
//! The last marker is read with an ordered consumer on the tenure subject
//! (INCIDENTS), or, on a work-queue stream, which admits no such consumer
//! (NOTIFY), with a message get of the last message on that subject.
//!
//! On a **replicated** stream (`jetstream.replicas` above 1) the server
//! checks a fenced message when its leader proposes it, and refuses one
//! that names a tenure subject another fenced message still in flight
//! names ("wrong last sequence", error code 10164, nats-server 2.11+): of
//! several fenced messages sent without waiting, all but the first are
//! refused. There a writer sends its fenced messages one at a time
//! ([`Fence::one_at_a_time`]), each after the previous was acknowledged.
//! That is not quite enough: the leader acknowledges a message as it
//! stores it and only then forgets that it was in flight, so the next
//! message, sent the moment the acknowledgement arrives, can still be
//! refused the same way (nats-server 2.12, `applyStreamEntries`). Such a
//! refusal says nothing about the fence, so [`send`] keeps a fenced
//! message of a replicated stream and [`Ack::get`] sends it again, as it
//! was (the same message id: stored once), after a pause of 1 ms doubling
//! to 100 ms, for up to [`IN_PROCESS_PATIENCE`]. A single server checks
//! each message as it stores it, so writers pipeline there. Naming the
//! marker only on the first of several would not do: the rest, expecting
//! consecutive stream positions, are exactly what a newer tenure's writes
//! can happen to match.

use std::{future::Future, time::Duration};

use async_nats::jetstream::{
    self,
    consumer::{pull::OrderedConfig, DeliverPolicy},
    context::{PublishError, PublishErrorKind},
    stream::{LastRawMessageErrorKind, RetentionPolicy},
};
use futures::StreamExt as _;

use crate::bus::{LEASE, LEASE_HEADER};

/// The header naming the sequence the last message on a subject must have.
pub const EXPECTED_SUBJECT_SEQUENCE: &str = "Nats-Expected-Last-Subject-Sequence";
/// The header naming the subject that check applies to (NATS 2.11+).
pub const EXPECTED_SUBJECT: &str = "Nats-Expected-Last-Subject-Sequence-Subject";

/// The marker a tenure's entries must follow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fence {
    /// The tenure subject.
    pub subject: String,
    /// The stream sequence of this tenure's marker.
    pub seq: u64,
    /// The tenure's term.
    pub term: u64,
    /// Whether the stream is replicated, so its fenced messages must be
    /// sent one at a time (see the module docs).
    pub one_at_a_time: bool,
}

impl Fence {
    /// The headers that make the server store a message only while this
    /// marker is the last on its subject.
    pub fn headers(&self) -> [(&'static str, String); 2] {
        [
            (EXPECTED_SUBJECT_SEQUENCE, self.seq.to_string()),
            (EXPECTED_SUBJECT, self.subject.clone()),
        ]
    }
}

/// A sent message's JetStream acknowledgement (or failure): still to come
/// (messages sent without waiting), still to come for a fenced message of
/// a replicated stream, kept to be sent again while the leader has the
/// one before it in flight (see the module docs), or come already (a
/// fenced message on a replicated stream, awaited before the next is sent:
/// [`Fence::one_at_a_time`]), or being awaited in place ([`Ack::poll_came`]).
pub enum Ack {
    Coming(jetstream::context::PublishAckFuture),
    Fenced(Box<Resend>),
    Came(Result<jetstream::publish::PublishAck, PublishError>),
    Waiting(sync_wrapper::SyncWrapper<AckFuture>),
}

/// An acknowledgement being awaited (its timeout running). Held in a
/// `SyncWrapper`, which only ever lends it out mutably, so an [`Ack`] can
/// still be shared by reference across an await.
pub type AckFuture = std::pin::Pin<
    Box<dyn Future<Output = Result<jetstream::publish::PublishAck, PublishError>> + Send>,
>;

/// A fenced message on its way to a replicated stream, with what it takes
/// to send it again.
pub struct Resend {
    js: jetstream::Context,
    subject: String,
    message: jetstream::message::PublishMessage,
    ack: jetstream::context::PublishAckFuture,
}

/// How long [`Ack::get`] goes on sending a fenced message again while the
/// stream's leader answers that another one naming its tenure subject is
/// in flight (normally for a millisecond or less: the one before it,
/// acknowledged but not yet forgotten).
pub const IN_PROCESS_PATIENCE: Duration = Duration::from_secs(2);

impl Ack {
    /// Awaits the acknowledgement now, if it is still to come.
    pub async fn wait(self) -> Ack {
        match self {
            Ack::Came(_) => self,
            coming => Ack::Came(coming.get().await),
        }
    }

    /// The acknowledgement, awaited if it is still to come; a fenced
    /// message refused only because the one before it was still in flight
    /// is sent again (see the module docs).
    pub async fn get(self) -> Result<jetstream::publish::PublishAck, PublishError> {
        match self {
            Ack::Coming(ack) => ack.await,
            Ack::Came(r) => r,
            Ack::Fenced(resend) => resend.get().await,
            Ack::Waiting(ack) => ack.into_inner().await,
        }
    }

    /// Whether the acknowledgement (or failure) has come.
    pub fn came(&self) -> bool {
        matches!(self, Ack::Came(_))
    }

    /// Awaits the acknowledgement in place: ready once it has come (it is
    /// then [`Ack::Came`]), so a caller can wait for it beside other work
    /// and drop the wait without losing it.
    pub fn poll_came(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<()> {
        use std::future::IntoFuture as _;
        use sync_wrapper::SyncWrapper;
        if let Ack::Coming(_) | Ack::Fenced(_) = self {
            let placeholder = Ack::Came(Err(PublishErrorKind::Other.into()));
            *self = match std::mem::replace(self, placeholder) {
                Ack::Coming(ack) => Ack::Waiting(SyncWrapper::new(ack.into_future())),
                Ack::Fenced(resend) => Ack::Waiting(SyncWrapper::new(Box::pin(resend.get()))),
                other => other,
            };
        }
        if let Ack::Waiting(ack) = self {
            let r = std::task::ready!(ack.get_mut().as_mut().poll(cx));
            *self = Ack::Came(r);
        }
        std::task::Poll::Ready(())
    }
}

impl Resend {
    async fn get(self) -> Result<jetstream::publish::PublishAck, PublishError> {
        let Resend {
            js,
            subject,
            message,
            mut ack,
        } = self;
        let started = tokio::time::Instant::now();
        let mut pause =
            crate::retry::Backoff::new(Duration::from_millis(1), Duration::from_millis(100));
        loop {
            match ack.await {
                Err(e) if is_in_process(&e) && started.elapsed() < IN_PROCESS_PATIENCE => {
                    tracing::debug!(%subject, "the stream's leader still had the message before this one in flight; sending it again");
                    tokio::time::sleep(pause.step()).await;
                    ack = js.send_publish(subject.clone(), message.clone()).await?;
                }
                done => return done,
            }
        }
    }
}

/// Sends a message fenced by `fence` (its headers already set) without
/// waiting for its acknowledgement. On a replicated stream
/// ([`Fence::one_at_a_time`]) the message is kept in the [`Ack`], to be
/// sent again should the leader refuse it only because the message before
/// it is still in flight.
pub async fn send(
    js: &jetstream::Context,
    subject: String,
    message: jetstream::message::PublishMessage,
    fence: Option<&Fence>,
) -> Result<Ack, PublishError> {
    if !fence.is_some_and(|f| f.one_at_a_time) {
        return Ok(Ack::Coming(js.send_publish(subject, message).await?));
    }
    let ack = js.send_publish(subject.clone(), message.clone()).await?;
    Ok(Ack::Fenced(Box::new(Resend {
        js: js.clone(),
        subject,
        message,
        ack,
    })))
}

/// Why no fence could be taken.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FenceError {
    /// A newer tenure's marker is stored: this instance is no longer the
    /// active one (its lease renewal fails next).
    Superseded { ours: u64, theirs: u64 },
    /// NATS did not answer, or refused for another reason; try again.
    Nats(String),
}

impl std::fmt::Display for FenceError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FenceError::Superseded { ours, theirs } => write!(
                f,
                "term {theirs} wrote its tenure marker after this instance's term {ours}: \
                 another instance is active"
            ),
            FenceError::Nats(e) => write!(f, "{e}"),
        }
    }
}

/// The term of the tenure the current task runs under (the lease's
/// `<role>/<term>`), if it runs under one.
pub fn current_term() -> Option<u64> {
    LEASE.try_with(|t| term_of(t)).ok().flatten()
}

/// The term of a tenure label (`<role>/<term>`, the `Tocsin-Lease` header).
pub fn term_of(tenure: &str) -> Option<u64> {
    tenure.rsplit_once('/').and_then(|(_, n)| n.parse().ok())
}

/// Whether a publish failed because an expected sequence did not match
/// (the stream's last, or the last on the tenure subject).
pub fn is_wrong_sequence(e: &PublishError) -> bool {
    match e.kind() {
        PublishErrorKind::WrongLastSequence => true,
        PublishErrorKind::Other => {
            crate::bus::refusal(e) == Some(jetstream::ErrorCode::STREAM_WRONG_LAST_SEQUENCE)
        }
        _ => false,
    }
}

/// Whether a publish was refused only because the stream's leader has
/// another message naming the same tenure subject in flight (error code
/// 10164, "wrong last sequence" without a sequence): the message may be
/// sent again as it is.
pub fn is_in_process(e: &PublishError) -> bool {
    crate::bus::refusal(e) == Some(jetstream::ErrorCode::STREAM_WRONG_LAST_SEQUENCE_CONSTANT)
}

/// How many times [`take`] reads and writes before it gives up (each
/// round lost only to another marker written meanwhile).
const ROUNDS: usize = 8;

/// Takes the fence of the current tenure on `subject` of `stream`: finds
/// this tenure's marker, or writes it after the last one (see the module
/// docs). None when the task runs under no lease (nothing to fence).
pub async fn take(
    js: &jetstream::Context,
    stream: &str,
    subject: &str,
) -> Result<Option<Fence>, FenceError> {
    let Some(term) = current_term() else {
        return Ok(None);
    };
    let stream = js
        .get_stream(stream)
        .await
        .map_err(|e| FenceError::Nats(format!("cannot look up stream {stream}: {e}")))?;
    let one_at_a_time = stream.cached_info().config.num_replicas > 1;
    for _ in 0..ROUNDS {
        let (last_seq, last_term) = last_marker(&stream, subject).await?;
        if last_term > term {
            return Err(FenceError::Superseded {
                ours: term,
                theirs: last_term,
            });
        }
        if last_term == term && last_seq > 0 {
            return Ok(Some(Fence {
                subject: subject.to_string(),
                seq: last_seq,
                term,
                one_at_a_time,
            }));
        }
        let tenure = LEASE.try_with(Clone::clone).unwrap_or_default();
        // A message id of its own each time: a marker is never dropped as
        // a repeat of one the stream no longer holds (purged). A marker
        // stored whose acknowledgement was lost is found by the next read;
        // two in flight at once cannot both be stored (each names the
        // last marker before it).
        let marker = crate::bus::message(
            tenure.clone().into_bytes(),
            format!("tenure:{tenure}:{}", uuid::Uuid::new_v4().simple()),
            None,
            &[(EXPECTED_SUBJECT_SEQUENCE, &last_seq.to_string())],
        );
        let acked = match js.send_publish(subject.to_string(), marker).await {
            Ok(ack) => ack.await,
            Err(e) => Err(e),
        };
        match acked {
            Ok(ack) => {
                return Ok(Some(Fence {
                    subject: subject.to_string(),
                    seq: ack.sequence,
                    term,
                    one_at_a_time,
                }))
            }
            // Another marker was written since it was read, or a message
            // naming this subject is still in flight: read again.
            Err(e) if is_wrong_sequence(&e) || is_in_process(&e) => continue,
            Err(e) => {
                return Err(FenceError::Nats(format!(
                    "cannot write the tenure marker on {subject}: {e}"
                )))
            }
        }
    }
    Err(FenceError::Nats(format!(
        "the tenure marker on {subject} kept changing while it was written"
    )))
}

/// The sequence and term of the last marker on `subject` ((0, 0): none).
/// Read with an ordered consumer on that subject alone, so the role needs
/// no permission beyond the ordered reads it already makes; on a
/// work-queue stream (whose consumers must acknowledge) with a message get.
async fn last_marker(
    stream: &jetstream::stream::Stream,
    subject: &str,
) -> Result<(u64, u64), FenceError> {
    let nats = |what: &str, e: &dyn std::fmt::Display| {
        FenceError::Nats(format!(
            "cannot read the last marker on {subject} ({what}): {e}"
        ))
    };
    if stream.cached_info().config.retention == RetentionPolicy::WorkQueue {
        return match stream.get_last_raw_message_by_subject(subject).await {
            Ok(m) => Ok((m.sequence, term_in(&m.headers))),
            Err(e) if matches!(e.kind(), LastRawMessageErrorKind::NoMessageFound) => Ok((0, 0)),
            // A user not allowed to ask gets no answer at all (the server
            // says so on the connection only): name the permission.
            Err(e) => Err(nats(
                "get",
                &format!(
                    "{e}; the service's NATS user needs permission to publish to \
                     $JS.API.STREAM.MSG.GET.{} ($JS.<domain>.API.… with jetstream.domain)",
                    stream.cached_info().config.name
                ),
            )),
        };
    }
    let mut consumer = stream
        .create_consumer(OrderedConfig {
            filter_subject: subject.to_string(),
            deliver_policy: DeliverPolicy::Last,
            ..Default::default()
        })
        .await
        .map_err(|e| nats("consumer", &e))?;
    if consumer
        .info()
        .await
        .map_err(|e| nats("info", &e))?
        .num_pending
        == 0
    {
        return Ok((0, 0));
    }
    let mut messages = consumer
        .messages()
        .await
        .map_err(|e| nats("messages", &e))?;
    let m = match tokio::time::timeout(Duration::from_secs(5), messages.next()).await {
        Ok(Some(Ok(m))) => m,
        Ok(Some(Err(e))) => return Err(nats("next", &e)),
        Ok(None) => return Err(nats("next", &"the consumer ended")),
        Err(_) => return Err(nats("next", &"no answer within 5 s")),
    };
    let seq = m.info().map_err(|e| nats("info", &e))?.stream_sequence;
    Ok((seq, m.headers.as_ref().map_or(0, term_in)))
}

/// The term a marker's lease header names (0: none).
fn term_in(headers: &async_nats::HeaderMap) -> u64 {
    headers
        .get(LEASE_HEADER)
        .and_then(|v| term_of(v.as_str()))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A publish refused by JetStream with `code` (as async-nats 0.51
    /// builds it from the server's answer).
    fn refused(code: u64, description: &str) -> PublishError {
        let error: jetstream::Error = serde_json::from_value(serde_json::json!({
            "code": 400,
            "err_code": code,
            "description": description,
        }))
        .unwrap();
        let kind = if code == 10071 {
            PublishErrorKind::WrongLastSequence
        } else {
            PublishErrorKind::Other
        };
        PublishError::with_source(kind, error)
    }

    #[test]
    fn in_flight_is_told_apart_from_a_sequence_that_did_not_match() {
        let in_flight = refused(10164, "wrong last sequence");
        let mismatch = refused(10071, "wrong last sequence: 41");
        let other = refused(10060, "expected stream does not match");
        assert!(is_in_process(&in_flight));
        assert!(
            !is_wrong_sequence(&in_flight),
            "sent again as it is, not read again"
        );
        assert!(is_wrong_sequence(&mismatch));
        assert!(
            !is_in_process(&mismatch),
            "a newer marker: never sent again"
        );
        assert!(!is_in_process(&other) && !is_wrong_sequence(&other));
        assert!(!is_in_process(&PublishError::new(
            PublishErrorKind::TimedOut
        )));
    }
}
