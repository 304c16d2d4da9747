//! The incident as it is now, read right before a message is sent, so a
//! message never shows an older state than the incident's: its last entry
//! on INCIDENTS (the state, and that entry's stream sequence as the
//! version), and its alerts from the incidents service's query (for the
//! alert list in pages; a page is sent without it when the service does
//! not answer).

use std::{
    collections::HashMap,
    sync::Mutex,
    time::{Duration, Instant},
};

use async_nats::jetstream::{self, stream::LastRawMessageErrorKind};
use tocsin_proto::{
    codec::{self, decode_envelope},
    command::IncidentRef,
    incident::{AlertInfo, IncidentSummary, LogEntry},
    query::{GetIncident, QueryReply},
    subjects::{query, STREAM_INCIDENTS},
    Envelope,
};

/// An incident's state and its version (the INCIDENTS sequence of its
/// last entry).
#[derive(Clone, Debug)]
pub(crate) struct Now {
    pub(crate) summary: IncidentSummary,
    pub(crate) version: u64,
}

pub(crate) struct Incidents {
    js: jetstream::Context,
    stream: tokio::sync::OnceCell<jetstream::stream::Stream>,
    /// Alerts by incident and version, kept briefly: the pages of one
    /// incident (one per channel and person) go out together.
    alerts: Mutex<HashMap<(uuid::Uuid, u64), Cached>>,
}

/// Alerts read at an instant.
type Cached = (Instant, Vec<AlertInfo>);

const ALERTS_KEPT: Duration = Duration::from_secs(5);
const QUERY_TIMEOUT: Duration = Duration::from_secs(2);

impl Incidents {
    pub(crate) fn new(js: jetstream::Context) -> Incidents {
        Incidents {
            js,
            stream: tokio::sync::OnceCell::new(),
            alerts: Mutex::new(HashMap::new()),
        }
    }

    /// The incident now; `Ok(None)` when INCIDENTS has no entry for it (a
    /// page made by hand, or an incident older than the stream's max age).
    pub(crate) async fn now(&self, id: uuid::Uuid) -> Result<Option<Now>, String> {
        let stream = self
            .stream
            .get_or_try_init(|| self.js.get_stream(STREAM_INCIDENTS))
            .await
            .map_err(|e| format!("cannot read INCIDENTS: {e}"))?;
        let msg = match stream
            .get_last_raw_message_by_subject(&tocsin_proto::subjects::incident_events_of(&id))
            .await
        {
            Ok(m) => m,
            Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => return Ok(None),
            Err(e) => return Err(format!("cannot read incident {id}: {e}")),
        };
        match decode_envelope::<LogEntry>(&msg.payload) {
            Ok(Envelope {
                body: LogEntry::Incident(ev),
                ..
            }) => Ok(Some(Now {
                summary: ev.incident,
                version: msg.sequence,
            })),
            Ok(_) => Ok(None),
            Err(e) => Err(format!("incident {id}: undecodable entry: {e}")),
        }
    }

    /// The incident's alerts (empty when the incidents service does not
    /// answer in time: the page goes out with the summary only).
    pub(crate) async fn alerts(&self, id: uuid::Uuid, version: u64) -> Vec<AlertInfo> {
        {
            let mut cache = self.alerts.lock().unwrap_or_else(|e| e.into_inner());
            cache.retain(|_, (at, _)| at.elapsed() < ALERTS_KEPT);
            if let Some((_, a)) = cache.get(&(id, version)) {
                return a.clone();
            }
        }
        let q = GetIncident {
            incident: IncidentRef::Id(id),
            timeline: false,
        };
        let Ok(payload) = codec::encode(&q) else {
            return Vec::new();
        };
        let answer = tokio::time::timeout(
            QUERY_TIMEOUT,
            self.js
                .client()
                .request(query::GET_INCIDENT, payload.into()),
        )
        .await;
        let alerts = match answer {
            Ok(Ok(msg)) => match codec::decode::<QueryReply>(&msg.payload) {
                Ok(QueryReply::Incident(d)) => d.alerts,
                _ => Vec::new(),
            },
            _ => {
                tracing::debug!(incident = %id, "incidents service did not answer; page without its alert list");
                Vec::new()
            }
        };
        self.alerts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert((id, version), (Instant::now(), alerts.clone()));
        alerts
    }
}
