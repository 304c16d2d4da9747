//! Queries over NATS request/reply: get an incident (with its timeline from
//! the INCIDENTS stream), list incidents, list silences.

use async_nats::{jetstream, Client};
use tocsin_proto::{
    codec::{self, decode_envelope},
    incident::{IncidentEvent, IncidentStatus, IncidentSummary, LogEntry},
    query::{GetIncident, IncidentDetail, ListIncidents, QueryReply},
    subjects::{query, STREAM_INCIDENTS},
};
use tocsin_runtime::query::Queries;
use tokio_util::sync::CancellationToken;

use crate::{
    core::{IncidentState, Projection},
    matchers::MatcherSet,
    service::Shared,
    store::Store,
};

/// Queue group, so several replicas could share queries.
const QUEUE: &str = "tocsin-incidents";

pub(crate) async fn subscribe(client: &Client) -> Result<Queries, async_nats::SubscribeError> {
    Queries::subscribe(
        client,
        QUEUE,
        &[
            query::GET_INCIDENT,
            query::LIST_INCIDENTS,
            query::LIST_SILENCES,
        ],
    )
    .await
}

pub(crate) async fn serve(
    js: jetstream::Context,
    queries: Queries,
    proj: Shared,
    durable: crate::service::Durable,
    store: Store,
    shutdown: CancellationToken,
) {
    queries
        .serve(shutdown, |subject, payload| {
            let (js, proj, store, durable) = (&js, &proj, &store, &durable);
            async move {
                // Answers show only what is stored: not while a batch of
                // alerts is folded in ahead of JetStream's acknowledgement.
                let _stored = durable.read().await;
                let answer = match subject.as_str() {
                    query::GET_INCIDENT => match codec::decode::<GetIncident>(&payload) {
                        Ok(q) => get(js, proj, store, q).await,
                        Err(e) => QueryReply::Error {
                            reason: format!("bad query: {e}"),
                        },
                    },
                    query::LIST_INCIDENTS => match codec::decode::<ListIncidents>(&payload) {
                        Ok(q) => list(proj, store, q),
                        Err(e) => QueryReply::Error {
                            reason: format!("bad query: {e}"),
                        },
                    },
                    _ => QueryReply::Silences {
                        silences: proj
                            .read()
                            .unwrap_or_else(|e| e.into_inner())
                            .silences
                            .list()
                            .cloned()
                            .collect(),
                    },
                };
                codec::encode(&answer).map_err(|e| e.to_string())
            }
        })
        .await
}

async fn get(js: &jetstream::Context, proj: &Shared, store: &Store, q: GetIncident) -> QueryReply {
    let found = {
        let p = proj.read().unwrap_or_else(|e| e.into_inner());
        match p.id_of(&q.incident) {
            Some(id) => match p.in_memory(&id) {
                Some(i) => Some(Ok(i.clone())),
                None => Some(Err(id)),
            },
            None => None,
        }
    };
    // One that left memory is read from the store, then the stream.
    let found = match found {
        Some(Ok(st)) => Some(st),
        Some(Err(id)) => match cold(js, store, id, u64::MAX).await {
            Ok(st) => Some(st),
            Err(e) => {
                return QueryReply::Error {
                    reason: format!("cannot read incident {}: {e}", q.incident),
                }
            }
        },
        None => None,
    }
    .map(|i| (i.summary, i.alerts.into_values().collect::<Vec<_>>()));
    let Some((incident, alerts)) = found else {
        return QueryReply::Error {
            reason: format!("no incident {}", q.incident),
        };
    };
    let timeline = if q.timeline {
        match timeline(js, &incident).await {
            Ok(t) => t,
            Err(e) => {
                return QueryReply::Error {
                    reason: format!("cannot read the timeline: {e}"),
                }
            }
        }
    } else {
        Vec::new()
    };
    QueryReply::Incident(Box::new(IncidentDetail {
        incident,
        alerts,
        timeline,
    }))
}

/// Every event of one incident, from the stream (the truth).
pub(crate) async fn timeline(
    js: &jetstream::Context,
    incident: &IncidentSummary,
) -> Result<Vec<IncidentEvent>, String> {
    let filter = tocsin_proto::subjects::incident_events_of(&incident.id);
    let msgs = tocsin_runtime::streams::read_matching(js, STREAM_INCIDENTS, filter).await?;
    let out = msgs
        .iter()
        .filter_map(|m| match decode_envelope::<LogEntry>(&m.payload) {
            Ok(env) => match env.body {
                LogEntry::Incident(e) => Some(e),
                LogEntry::Silence { .. } => None,
            },
            Err(_) => None,
        })
        .collect();
    Ok(out)
}

/// An incident no longer in memory: from the store, else from its entries
/// on the INCIDENTS stream up to sequence `upto`.
pub(crate) async fn cold(
    js: &jetstream::Context,
    store: &Store,
    id: uuid::Uuid,
    upto: u64,
) -> Result<IncidentState, String> {
    match store.incident(&id) {
        Ok(Some(st)) => return Ok(st),
        Ok(None) => {}
        Err(e) => {
            tracing::warn!(incident = %id, error = %e, "stored incident unreadable; reading it from the stream")
        }
    }
    replay_incident(js, id, upto)
        .await?
        .ok_or_else(|| format!("incident {id} is neither stored nor on the INCIDENTS stream"))
}

/// Incident `id` as its entries on the INCIDENTS stream up to sequence
/// `upto` make it (None if it has none).
pub(crate) async fn replay_incident(
    js: &jetstream::Context,
    id: uuid::Uuid,
    upto: u64,
) -> Result<Option<IncidentState>, String> {
    let filter = tocsin_proto::subjects::incident_events_of(&id);
    let msgs = tocsin_runtime::streams::read_matching(js, STREAM_INCIDENTS, filter).await?;
    let mut scratch = Projection::new();
    for m in &msgs {
        let seq = m.info().map_err(|e| e.to_string())?.stream_sequence;
        if seq > upto {
            break;
        }
        if let Ok(env) = decode_envelope::<LogEntry>(&m.payload) {
            scratch.apply(&env.body, seq);
        }
    }
    Ok(scratch.incidents.remove(&id).map(|st| *st))
}

/// Incidents newest first. Those in memory are filtered under the lock;
/// those that left memory (resolved long ago, or beyond
/// `incidents.max_in_memory`) are read from the store after it, only as
/// far as the page needs.
fn list(proj: &Shared, store: &Store, q: ListIncidents) -> QueryReply {
    let matchers = match MatcherSet::new(&q.matchers) {
        Ok(m) => m,
        Err(e) => return QueryReply::Error { reason: e },
    };
    let limit = q.limit.unwrap_or(100).min(1000);
    let keep = |s: &IncidentSummary| {
        (q.status.is_empty() || q.status.contains(&s.status))
            && q.min_severity.is_none_or(|m| s.severity >= m)
            && q.since.is_none_or(|t| s.opened_at >= t)
            && matchers.matches(&s.labels)
    };
    let want_cold = q.status.is_empty() || q.status.contains(&IncidentStatus::Resolved);
    // Newest first: an incident in memory (already filtered) or the id of
    // one to read from the store.
    let candidates: Vec<Result<IncidentSummary, uuid::Uuid>> = {
        let p = proj.read().unwrap_or_else(|e| e.into_inner());
        let mut out = Vec::new();
        let mut found = 0;
        let upper = q.before.unwrap_or(u64::MAX);
        for (_, id) in p.by_number.range(..upper).rev() {
            match p.incidents.get(id) {
                Some(i) if keep(&i.summary) => {
                    out.push(Ok(i.summary.clone()));
                    found += 1;
                    if found >= limit {
                        break;
                    }
                }
                Some(_) => {}
                None if want_cold || p.cold_open.contains(id) => out.push(Err(*id)),
                None => {}
            }
        }
        out
    };
    let mut incidents = Vec::new();
    for c in candidates {
        if incidents.len() >= limit {
            break;
        }
        match c {
            Ok(s) => incidents.push(s),
            Err(id) => {
                if let Ok(Some(st)) = store.incident(&id) {
                    if keep(&st.summary) {
                        incidents.push(st.summary);
                    }
                }
            }
        }
    }
    QueryReply::Incidents { incidents }
}
