//! The loop: the durable consumer `tocsin-remediation` on INCIDENTS (shared
//! by every replica), each event in its own task (at most
//! `max_parallel_runs` at once), kept alive with in-progress acks while its
//! runs work, acknowledged when they ended. A replica that dies leaves its
//! events unacknowledged; JetStream hands them to another replica after
//! `ack_wait`, which resumes the runs from their records.

use std::{sync::Arc, time::Duration};

use async_nats::jetstream::{
    self,
    consumer::{pull::Config, AckPolicy, DeliverPolicy},
    AckKind,
};
use tocsin_proto::{
    codec::decode_entries,
    incident::LogEntry,
    subjects::{is_incidents_batch, INCIDENTS_BATCH, STREAM_INCIDENTS},
    Envelope,
};
use tocsin_runtime::pull::{self, Puller};
use tokio_util::sync::CancellationToken;

use crate::engine::Engine;

/// The durable consumer every replica shares.
pub const CONSUMER: &str = "tocsin-remediation";

/// The incident events a runbook can start on (`paged`: a level fired),
/// people's requests (`runbook`: run by hand, approve, deny), and
/// `resolved` (which ends the incident's runs waiting for approval). The
/// consumer also takes the incidents service's messages of several
/// entries ([`INCIDENTS_BATCH`]), which hold the `paged` receipts.
const KINDS: [&str; 7] = [
    tocsin_proto::incident::kind::OPENED,
    tocsin_proto::incident::kind::REOPENED,
    tocsin_proto::incident::kind::ESCALATED,
    tocsin_proto::incident::kind::ACKNOWLEDGED,
    tocsin_proto::incident::kind::PAGED,
    tocsin_proto::incident::kind::RUNBOOK,
    tocsin_proto::incident::kind::RESOLVED,
];

pub(crate) async fn run(
    engine: Arc<Engine>,
    health: tocsin_runtime::admin::Health,
    shutdown: CancellationToken,
) {
    let ack_wait = engine.config.ack_wait();
    let parallel = engine.config.max_parallel_runs.max(1);
    let config = Config {
        durable_name: Some(CONSUMER.into()),
        description: Some("Tocsin remediation: incident events that start runbooks".into()),
        ack_policy: AckPolicy::Explicit,
        ack_wait,
        max_deliver: -1,
        // No more than can run at once: an event waiting in the client
        // buffer would otherwise come back while its run has not started.
        max_ack_pending: i64::try_from(parallel).unwrap_or(32),
        // From now on: runbooks do not act on incidents older than the service.
        deliver_policy: DeliverPolicy::New,
        filter_subjects: KINDS
            .iter()
            .map(|k| tocsin_proto::subjects::incident_events_kind(k))
            .chain([INCIDENTS_BATCH.to_string()])
            .collect(),
        ..Default::default()
    };
    let permits = Arc::new(tokio::sync::Semaphore::new(parallel));
    let tasks = tokio_util::task::TaskTracker::new();
    health.set_failing("remediation", "consumer not open yet");
    let mut events = Puller::new(&engine.js, STREAM_INCIDENTS, config, parallel.min(256));
    if events.open(&shutdown).await.is_some() {
        health.set_ok("remediation");
        loop {
            let permit = tokio::select! {
                _ = shutdown.cancelled() => break,
                p = permits.clone().acquire_owned() => p.expect("never closed"),
            };
            let Some(msg) = events.next(&shutdown).await else {
                break;
            };
            let (engine, stop) = (engine.clone(), shutdown.clone());
            tasks.spawn(async move {
                let alive = pull::keep_alive(&msg, ack_wait);
                tokio::select! {
                    // Stopping: the event stays unacknowledged and
                    // comes back to a replica, which resumes the run.
                    _ = stop.cancelled() => {}
                    r = handle(&engine, &msg) => {
                        let ack = match r {
                            Ok(()) => msg.double_ack().await,
                            Err(delay) => msg.ack_with(AckKind::Nak(Some(delay))).await,
                        };
                        if let Err(e) = ack {
                            tracing::warn!(error = %e, "cannot acknowledge an incident event; it comes back and its run records say what is done");
                        }
                    }
                }
                alive.abort();
                drop(permit);
            });
        }
    }
    tasks.close();
    tasks.wait().await;
}

async fn handle(engine: &Arc<Engine>, msg: &jetstream::Message) -> Result<(), Duration> {
    let seq = msg.info().map(|i| i.stream_sequence).unwrap_or(0);
    let batch = is_incidents_batch(&msg.subject);
    let entries = match decode_entries(&msg.subject, &msg.payload) {
        Ok(Envelope { body, .. }) => body,
        // Not ours to judge: the incidents service wrote it.
        Err(_) => return Ok(()),
    };
    // A message of several (receipts) holds kinds this service does not
    // start on too; its entries are worked on side by side, and it comes
    // back whole if one must wait (its runs already started are found by
    // their ids).
    let work = entries
        .iter()
        .enumerate()
        .filter_map(|(i, entry)| match entry {
            LogEntry::Incident(ev) if KINDS.contains(&ev.kind.name()) => {
                let index = if batch {
                    u32::try_from(i + 1).unwrap_or(u32::MAX)
                } else {
                    0
                };
                Some(async move { (ev, engine.on_event(ev, seq, index).await) })
            }
            _ => None,
        });
    let mut again = false;
    for (ev, r) in futures::future::join_all(work).await {
        if let Err(e) = r {
            tracing::warn!(error = %e.0, incident = ev.incident.number, "cannot work on an incident event now; retrying");
            again = true;
        }
    }
    if again {
        Err(Duration::from_secs(2))
    } else {
        Ok(())
    }
}
