//! Queries over NATS request/reply: get an incident (with its timeline from
//! the INCIDENTS stream), list incidents, list silences.

use async_nats::{jetstream, Client};
use futures::StreamExt;
use tocsin_proto::{
    codec::{self, decode_envelope},
    incident::{IncidentEvent, IncidentSummary, LogEntry},
    query::{GetIncident, IncidentDetail, ListIncidents, QueryReply},
    subjects::{query, STREAM_INCIDENTS},
};
use tokio_util::sync::CancellationToken;

use crate::{matchers::MatcherSet, service::Shared};

/// Queue group, so several replicas could share queries.
const QUEUE: &str = "tocsin-incidents";

pub(crate) type Subscriptions = futures::stream::SelectAll<async_nats::Subscriber>;

pub(crate) async fn subscribe(
    client: &Client,
) -> Result<Subscriptions, async_nats::SubscribeError> {
    let get = client
        .queue_subscribe(query::GET_INCIDENT, QUEUE.into())
        .await?;
    let list = client
        .queue_subscribe(query::LIST_INCIDENTS, QUEUE.into())
        .await?;
    let silences = client
        .queue_subscribe(query::LIST_SILENCES, QUEUE.into())
        .await?;
    // Make sure the server has the subscriptions before we say we are ready.
    client.flush().await.map_err(|e| {
        async_nats::SubscribeError::with_source(async_nats::client::SubscribeErrorKind::Other, e)
    })?;
    Ok(futures::stream::select_all([get, list, silences]))
}

pub(crate) async fn serve(
    client: Client,
    js: jetstream::Context,
    mut subs: Subscriptions,
    proj: Shared,
    shutdown: CancellationToken,
) {
    loop {
        let msg = tokio::select! {
            _ = shutdown.cancelled() => return,
            m = subs.next() => match m { Some(m) => m, None => return },
        };
        let Some(reply) = msg.reply.clone() else {
            continue;
        };
        let answer = match msg.subject.as_str() {
            query::GET_INCIDENT => match codec::decode::<GetIncident>(&msg.payload) {
                Ok(q) => get(&js, &proj, q).await,
                Err(e) => QueryReply::Error {
                    reason: format!("bad query: {e}"),
                },
            },
            query::LIST_INCIDENTS => match codec::decode::<ListIncidents>(&msg.payload) {
                Ok(q) => list(&proj, q),
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
        match codec::encode(&answer) {
            Ok(bytes) => {
                if let Err(e) = client.publish(reply, bytes.into()).await {
                    tracing::warn!(error = %e, "cannot answer a query");
                }
            }
            Err(e) => tracing::error!(error = %e, "cannot encode a query answer"),
        }
    }
}

async fn get(js: &jetstream::Context, proj: &Shared, q: GetIncident) -> QueryReply {
    let found = {
        let p = proj.read().unwrap_or_else(|e| e.into_inner());
        p.find(&q.incident).map(|i| {
            (
                i.summary.clone(),
                i.alerts.values().cloned().collect::<Vec<_>>(),
            )
        })
    };
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
    let filter = format!("tocsin.incidents.inc.{}.>", incident.id.simple());
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

fn list(proj: &Shared, q: ListIncidents) -> QueryReply {
    let matchers = match MatcherSet::new(&q.matchers) {
        Ok(m) => m,
        Err(e) => return QueryReply::Error { reason: e },
    };
    let p = proj.read().unwrap_or_else(|e| e.into_inner());
    let mut incidents: Vec<IncidentSummary> = p
        .incidents
        .values()
        .map(|i| &i.summary)
        .filter(|s| q.status.is_empty() || q.status.contains(&s.status))
        .filter(|s| q.min_severity.is_none_or(|m| s.severity >= m))
        .filter(|s| q.since.is_none_or(|t| s.opened_at >= t))
        .filter(|s| q.before.is_none_or(|n| s.number < n))
        .filter(|s| matchers.matches(&s.labels))
        .cloned()
        .collect();
    incidents.sort_by_key(|s| std::cmp::Reverse(s.number));
    incidents.truncate(q.limit.unwrap_or(100).min(1000));
    QueryReply::Incidents { incidents }
}
