//! The incident as it is now, read right before a message is sent, so a
//! message never shows an older state than the incident's: its last entry
//! on its own INCIDENTS subjects (the state, and that entry's stream
//! sequence as the version), and its alerts (for the alert list in
//! pages): from that entry when it is the incident's opening, which names
//! every alert the incident has at that version, else from the incidents
//! service's query (a page is sent without them when the service does
//! not answer). Alert changes are stored in messages of several entries,
//! not on the incident's subjects, so a page's own copy of the incident
//! can be newer than that entry (a higher `revision`, same status): the
//! page's copy is shown then, with its alerts from the query.

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    sync::Mutex,
    time::{Duration, Instant},
};

use async_nats::jetstream::{self, stream::LastRawMessageErrorKind};
use tocsin_proto::{
    codec::{self, decode_envelope},
    command::IncidentRef,
    incident::{AlertInfo, EventKind, IncidentSummary, LogEntry},
    query::{GetIncident, QueryReply},
    subjects::{query, STREAM_INCIDENTS},
    Envelope,
};
use tokio_util::sync::CancellationToken;

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
    /// `<api prefix>.DIRECT.GET.INCIDENTS`, asked while the stream
    /// allows direct gets (one replica: see [`Incidents::last_entry`]).
    direct_subject: String,
    /// Whether to read with direct gets (see [`Incidents::last_entry`]).
    direct: Mutex<Direct>,
    direct_failed: tocsin_runtime::telemetry::RateLimitedWarn,
    /// Alerts by incident and version, kept briefly: the pages of one
    /// incident (one per channel and person) go out together.
    alerts: Mutex<AlertsCache>,
}

/// An incident, the INCIDENTS sequence of its last own entry, and the
/// revision of the copy shown.
type Version = (uuid::Uuid, u64, u64);

/// Alerts by incident and version, each with when it was read, and the
/// same in the order read, so what is too old leaves from the front (no
/// scan of the whole cache per page).
#[derive(Default)]
struct AlertsCache {
    map: HashMap<Version, (Instant, Vec<AlertInfo>)>,
    order: VecDeque<(Instant, Version)>,
}

impl AlertsCache {
    fn expire(&mut self) {
        while let Some(&(at, key)) = self.order.front() {
            if at.elapsed() < ALERTS_KEPT && self.order.len() <= ALERTS_MAX {
                break;
            }
            self.order.pop_front();
            // Only the entry this was queued for (read again since: kept).
            if self.map.get(&key).is_some_and(|(t, _)| *t == at) {
                self.map.remove(&key);
            }
        }
    }

    fn get(&mut self, key: &Version) -> Option<Vec<AlertInfo>> {
        self.expire();
        self.map.get(key).map(|(_, a)| a.clone())
    }

    fn insert(&mut self, key: Version, alerts: Vec<AlertInfo>) {
        let at = Instant::now();
        self.map.insert(key, (at, alerts));
        self.order.push_back((at, key));
        self.expire();
    }
}

const ALERTS_KEPT: Duration = Duration::from_secs(5);
/// At most this many incidents' alerts are kept.
const ALERTS_MAX: usize = 4096;
const QUERY_TIMEOUT: Duration = Duration::from_secs(2);

/// How long reads go to `STREAM.MSG.GET` after a direct get failed.
const DIRECT_PAUSE: Duration = Duration::from_secs(60);

/// Whether INCIDENTS is read with direct gets.
#[derive(Default)]
struct Direct {
    /// From the stream's settings, once read.
    allowed: Option<bool>,
    /// After a direct get failed: until when not to try another.
    paused_until: Option<Instant>,
}

impl Incidents {
    pub(crate) fn new(js: jetstream::Context, api_prefix: &str) -> Incidents {
        Incidents {
            js,
            stream: tokio::sync::OnceCell::new(),
            direct_subject: format!("{api_prefix}.DIRECT.GET.{STREAM_INCIDENTS}"),
            direct: Mutex::new(Direct::default()),
            direct_failed: tocsin_runtime::telemetry::RateLimitedWarn::every(DIRECT_PAUSE),
            alerts: Mutex::new(AlertsCache::default()),
        }
    }

    /// INCIDENTS, looked up once.
    async fn stream(&self) -> Result<&jetstream::stream::Stream, String> {
        self.stream
            .get_or_try_init(|| self.js.get_stream(STREAM_INCIDENTS))
            .await
            .map_err(|e| format!("cannot read INCIDENTS: {e}"))
    }

    /// The incident now; `Ok(None)` when INCIDENTS has no entry for it (a
    /// page made by hand, or an incident older than the stream's max age).
    pub(crate) async fn now(&self, id: uuid::Uuid) -> Result<Option<Now>, String> {
        let Some((sequence, payload)) = self.last_entry(id).await? else {
            return Ok(None);
        };
        match decode_envelope::<LogEntry>(&payload) {
            Ok(Envelope {
                body: LogEntry::Incident(ev),
                ..
            }) => {
                let key = (id, sequence, ev.incident.revision);
                let mut cache = self.alerts.lock().unwrap_or_else(|e| e.into_inner());
                if matches!(ev.kind, EventKind::Opened { .. }) && cache.get(&key).is_none() {
                    // Its alerts at this version are the opening's, as the
                    // incidents service would list them: by fingerprint (a
                    // repeated one as last given).
                    let alerts: BTreeMap<_, _> = ev
                        .kind
                        .alerts()
                        .map(|a| (a.fingerprint.clone(), a.clone()))
                        .collect();
                    cache.insert(key, alerts.into_values().collect());
                }
                drop(cache);
                Ok(Some(Now {
                    summary: ev.incident,
                    version: sequence,
                }))
            }
            Ok(_) => Ok(None),
            Err(e) => Err(format!("incident {id}: undecodable entry: {e}")),
        }
    }

    /// Whether the incident has an entry on its own subjects after
    /// `version` (a change, or a receipt stored alone). The receipts
    /// gathered into batch messages change nothing a message shows, and
    /// are not on the incident's subjects.
    ///
    /// Asked as "the last entry on its subjects", not "the next one after
    /// `version`": nats-server answers the first from its per-block index
    /// of subjects, but the second, with a wildcard filter and a block
    /// holding more than 256 subjects (every incident written meanwhile),
    /// by reading every message after `version` to the end of the block.
    /// At 1,000 new incidents a second that scan was 4.5% of the machine
    /// (`perf record -a -g` during `bench all --only alert-to-page`).
    pub(crate) async fn moved_since(&self, id: uuid::Uuid, version: u64) -> Result<bool, String> {
        Ok(self
            .last_entry(id)
            .await?
            .is_some_and(|(sequence, _)| sequence > version))
    }

    /// The incident's last entry on its own subjects: its INCIDENTS
    /// sequence and payload, `None` when there is none.
    ///
    /// A direct get when the stream allows them, which it does only with
    /// one replica (`JetStreamConfig::stream_config`): the answer is then
    /// the leader's, as `STREAM.MSG.GET`'s always is, and it costs
    /// nats-server far less (no JSON request or answer, no routing
    /// through the system account). Asked with the filter in a JSON
    /// request, not appended to the subject: the filter is a wildcard.
    async fn last_entry(&self, id: uuid::Uuid) -> Result<Option<(u64, bytes::Bytes)>, String> {
        let subject = tocsin_proto::subjects::incident_events_of(&id);
        if self.direct_allowed().await {
            match self.direct_last(&subject).await {
                Ok(found) => return Ok(found),
                Err(e) => {
                    self.direct
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .paused_until = Some(Instant::now() + DIRECT_PAUSE);
                    // The reads in flight when NATS went away all fail
                    // together: one WARN for them.
                    if let Some(held_back) = self.direct_failed.admit() {
                        tracing::warn!(
                            error = %e,
                            held_back,
                            "a direct get on INCIDENTS failed; reading incidents with STREAM.MSG.GET for a minute"
                        );
                    }
                }
            }
        }
        let stream = self.stream().await?;
        match stream.get_last_raw_message_by_subject(&subject).await {
            Ok(m) => Ok(Some((m.sequence, m.payload))),
            Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => Ok(None),
            Err(e) => Err(format!("cannot read incident {id}: {e}")),
        }
    }

    /// Whether to read with a direct get: INCIDENTS allows them and has
    /// one replica, as its settings said when last read, and none failed
    /// in the last [`DIRECT_PAUSE`]. The settings are read at the first
    /// read and again once such a pause is over.
    async fn direct_allowed(&self) -> bool {
        {
            let mut d = self.direct.lock().unwrap_or_else(|e| e.into_inner());
            match (d.allowed, d.paused_until) {
                (_, Some(until)) if Instant::now() < until => return false,
                (Some(allowed), None) => return allowed,
                (None, None) => {}
                // A pause is over: this caller reads the settings again,
                // the others meanwhile read as in the pause.
                (_, Some(_)) => d.paused_until = Some(Instant::now() + DIRECT_PAUSE),
            }
        }
        let config = match self.js.get_stream(STREAM_INCIDENTS).await {
            Ok(s) => s.cached_info().config.clone(),
            Err(_) => return false,
        };
        let allowed = config.allow_direct && config.num_replicas <= 1;
        *self.direct.lock().unwrap_or_else(|e| e.into_inner()) = Direct {
            allowed: Some(allowed),
            paused_until: None,
        };
        allowed
    }

    async fn direct_last(&self, subject: &str) -> Result<Option<(u64, bytes::Bytes)>, String> {
        let request = serde_json::json!({ "last_by_subj": subject }).to_string();
        let answer = tokio::time::timeout(
            QUERY_TIMEOUT,
            self.js
                .client()
                .request(self.direct_subject.clone(), request.into()),
        )
        .await
        .map_err(|_| "no answer in time".to_string())?
        .map_err(|e| e.to_string())?;
        match answer.status {
            Some(s) if s == async_nats::StatusCode::NOT_FOUND => return Ok(None),
            Some(s) if s != async_nats::StatusCode::OK => {
                return Err(format!(
                    "{s} {}",
                    answer.description.as_deref().unwrap_or("")
                ))
            }
            _ => {}
        }
        let sequence = answer
            .headers
            .as_ref()
            .and_then(|h| h.get(async_nats::header::NATS_SEQUENCE))
            .and_then(|v| v.as_str().parse::<u64>().ok())
            .ok_or("a direct get answered without Nats-Sequence")?;
        Ok(Some((sequence, answer.payload)))
    }

    /// Forgets the alerts kept longer than they are of use, as often as
    /// they expire, until `shutdown`. The cache otherwise forgets only
    /// when it is used, so a notifier gone quiet after a burst of pages
    /// kept up to 4,096 incidents' alerts (about 7 MiB) until the next page.
    pub(crate) async fn sweep_until(&self, shutdown: CancellationToken) {
        let mut every = tokio::time::interval(ALERTS_KEPT);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = every.tick() => self.alerts.lock().unwrap_or_else(|e| e.into_inner()).expire(),
            }
        }
    }

    /// The incident's alerts at `version` and `revision` (empty when the
    /// incidents service does not answer in time: the page goes out with
    /// the summary only).
    pub(crate) async fn alerts(
        &self,
        id: uuid::Uuid,
        version: u64,
        revision: u64,
    ) -> Vec<AlertInfo> {
        let key = (id, version, revision);
        let cached = self
            .alerts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&key);
        if let Some(a) = cached {
            return a;
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
            .insert(key, alerts.clone());
        alerts
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_alerts_cache_keeps_at_most_its_bound_and_forgets_the_oldest_first() {
        let mut c = AlertsCache::default();
        let id = uuid::Uuid::from_u128(1);
        for v in 0..(ALERTS_MAX as u64 + 10) {
            c.insert((id, v, 0), Vec::new());
        }
        assert_eq!(c.map.len(), ALERTS_MAX);
        assert_eq!(c.order.len(), ALERTS_MAX);
        assert!(c.get(&(id, 0, 0)).is_none(), "the oldest left first");
        assert!(c.get(&(id, ALERTS_MAX as u64 + 9, 0)).is_some());
    }

    #[test]
    fn the_alerts_cache_forgets_what_is_too_old_without_being_used() {
        let mut c = AlertsCache::default();
        let id = uuid::Uuid::from_u128(1);
        let old = Instant::now() - ALERTS_KEPT - Duration::from_secs(1);
        let new = Instant::now();
        c.map.insert((id, 1, 0), (old, Vec::new()));
        c.order.push_back((old, (id, 1, 0)));
        c.map.insert((id, 2, 0), (new, Vec::new()));
        c.order.push_back((new, (id, 2, 0)));
        // What the sweep does while no page comes.
        c.expire();
        assert_eq!(c.map.len(), 1, "the entry past ALERTS_KEPT left");
        assert!(c.map.contains_key(&(id, 2, 0)));
    }
}
