//! Incident changes from INCIDENTS: a second durable consumer that every
//! replica shares. Each change is handled in its own task and brings the
//! incident's sent messages to the incident's state *now*
//! ([`Deliverer::sync`]), so changes may be handled in any order and a
//! slow channel delays only its own updates. A note becomes a status
//! update in the thread of each message that takes one.

use std::{sync::Arc, time::Duration};

use async_nats::jetstream::{
    self,
    consumer::{pull::Config, AckPolicy, DeliverPolicy},
};
use tocsin_proto::{
    codec::decode_envelope,
    incident::{EventKind, LogEntry},
    subjects::STREAM_INCIDENTS,
    Envelope,
};
use tocsin_runtime::pull::{self, Puller};
use tokio_util::sync::CancellationToken;

use crate::{
    consumer,
    deliver::{Deliverer, Finish, Hint},
};

/// The durable consumer for incident changes.
pub const CHANGES_CONSUMER: &str = "tocsin-notifier-changes";
/// The consumer older versions used (one change at a time); removed at start.
const OLD_CONSUMER: &str = "tocsin-notifier-sync";

/// The kinds of change that alter what a sent message shows.
pub(crate) const KINDS: [&str; 7] = [
    tocsin_proto::incident::kind::ACKNOWLEDGED,
    tocsin_proto::incident::kind::UNACKNOWLEDGED,
    tocsin_proto::incident::kind::RESOLVED,
    tocsin_proto::incident::kind::REOPENED,
    tocsin_proto::incident::kind::SNOOZED,
    tocsin_proto::incident::kind::SNOOZE_ENDED,
    tocsin_proto::incident::kind::NOTE_ADDED,
];

pub(crate) async fn run(d: Arc<Deliverer>, ack_wait: Duration, shutdown: CancellationToken) {
    pull::retire(&d.js, STREAM_INCIDENTS, OLD_CONSUMER).await;
    let config = Config {
        durable_name: Some(CHANGES_CONSUMER.into()),
        description: Some(
            "Tocsin notifier: incident changes that update messages already sent".into(),
        ),
        ack_policy: AckPolicy::Explicit,
        ack_wait,
        max_deliver: -1,
        max_ack_pending: 512,
        // From now on: what happened before the notifier first ran was
        // never sent by it.
        deliver_policy: DeliverPolicy::New,
        filter_subjects: KINDS
            .iter()
            .map(|k| tocsin_proto::subjects::incident_events_kind(k))
            .collect(),
        ..Default::default()
    };
    let tasks = tokio_util::task::TaskTracker::new();
    let mut changes = Puller::new(&d.js, STREAM_INCIDENTS, config, 64);
    while let Some(msg) = changes.next(&shutdown).await {
        let (d, stop) = (d.clone(), shutdown.clone());
        tasks.spawn(async move {
            let alive = pull::keep_alive(&msg, ack_wait);
            let f = handle(&d, &msg, &stop).await;
            alive.abort();
            consumer::finish(&msg, f).await;
        });
    }
    tasks.close();
    tasks.wait().await;
}

async fn handle(
    d: &Arc<Deliverer>,
    msg: &jetstream::Message,
    shutdown: &CancellationToken,
) -> Finish {
    let seq = msg.info().map(|i| i.stream_sequence).unwrap_or(0);
    let ev = match decode_envelope::<LogEntry>(&msg.payload) {
        Ok(Envelope {
            body: LogEntry::Incident(ev),
            ..
        }) => ev,
        // Not ours to judge: the incidents service wrote it.
        _ => return Finish::Ack,
    };
    let actor = ev.actor.as_ref().map(|a| a.name.clone());
    match &ev.kind {
        EventKind::NoteAdded { text } => {
            d.status_updates(&ev.incident, seq, text.clone(), actor, ev.at, shutdown)
                .await
        }
        _ => match d.sync(ev.incident.id, &Hint { actor }, shutdown).await {
            Ok(()) => Finish::Ack,
            Err(delay) => Finish::Later(delay),
        },
    }
}
