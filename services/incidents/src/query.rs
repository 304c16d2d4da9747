//! Queries over NATS request/reply: get an incident (with its timeline from
//! the INCIDENTS stream), list incidents, list silences.

use async_nats::jetstream::{self, stream::LastRawMessageErrorKind};
use tocsin_proto::{
    codec::{self, decode_entries, decode_envelope},
    incident::{EventKind, IncidentEvent, IncidentStatus, IncidentSummary, LogEntry},
    query::{GetIncident, IncidentDetail, ListIncidents, QueryReply},
    subjects::{is_incidents_batch, query, STREAM_INCIDENTS},
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

pub(crate) async fn subscribe(
    js: &jetstream::Context,
) -> Result<Queries, async_nats::SubscribeError> {
    Queries::subscribe(
        js,
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
    list_max_reads: usize,
    shutdown: CancellationToken,
) {
    queries
        .serve(shutdown, |subject, payload| {
            let (js, proj, store, durable) = (&js, &proj, &store, &durable);
            async move {
                let answer = match subject.as_str() {
                    query::GET_INCIDENT => match codec::decode::<GetIncident>(&payload) {
                        Ok(q) => get(js, proj, durable, store, q).await,
                        Err(e) => QueryReply::Error {
                            reason: format!("bad query: {e}"),
                        },
                    },
                    query::LIST_INCIDENTS => match codec::decode::<ListIncidents>(&payload) {
                        Ok(q) => {
                            let most = js.client().max_payload().saturating_sub(ANSWER_MARGIN);
                            list(proj, durable, store, list_max_reads, most, q).await
                        }
                        Err(e) => QueryReply::Error {
                            reason: format!("bad query: {e}"),
                        },
                    },
                    _ => {
                        let _stored = durable.read().await;
                        let p = proj.read().unwrap_or_else(|e| e.into_inner());
                        let mut room = js.client().max_payload().saturating_sub(ANSWER_MARGIN);
                        let mut silences = Vec::new();
                        let all = p.silences.len();
                        // As many as fit in one answer, in id order.
                        for s in p.silences.list() {
                            let size = encoded_len(s);
                            if size > room {
                                break;
                            }
                            room -= size;
                            silences.push(s.clone());
                        }
                        let omitted = u32::try_from(all - silences.len()).unwrap_or(u32::MAX);
                        QueryReply::Silences { silences, omitted }
                    }
                };
                codec::encode(&answer).map_err(|e| e.to_string())
            }
        })
        .await
}

/// Answers show only what is stored, never a batch folded in ahead of
/// JetStream's acknowledgement: what is in memory is looked at while no
/// batch is ahead (`durable`), and that lock is let go before anything is
/// read from the store or the stream, so a slow read never holds up the
/// service's next batch.
async fn get(
    js: &jetstream::Context,
    proj: &Shared,
    durable: &crate::service::Durable,
    store: &Store,
    q: GetIncident,
) -> QueryReply {
    let found = {
        let _stored = durable.read().await;
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
    .map(|i| {
        (
            i.summary,
            i.alerts.into_values().map(|a| *a).collect::<Vec<_>>(),
            i.batches,
        )
    });
    let Some((incident, alerts, batches)) = found else {
        return QueryReply::Error {
            reason: format!("no incident {}", q.incident),
        };
    };
    let most = js.client().max_payload().saturating_sub(ANSWER_MARGIN);
    let (timeline, left) = if q.timeline {
        match timeline(js, &incident, &batches, 2 * most).await {
            Ok(t) => t,
            Err(e) => {
                return QueryReply::Error {
                    reason: format!("cannot read the timeline: {e}"),
                }
            }
        }
    } else {
        (Vec::new(), 0)
    };
    let mut detail = fit(incident, alerts, timeline, q.timeline, most);
    detail.timeline_omitted = detail
        .timeline_omitted
        .saturating_add(u32::try_from(left).unwrap_or(u32::MAX));
    QueryReply::Incident(Box::new(detail))
}

/// Bytes of an answer kept free of the listed alerts and entries: the
/// reply's framing (the lists' lengths, the answer's tag) with room over.
const ANSWER_MARGIN: usize = 4096;

/// The answer for `incident`, with as many of its `alerts` (the firing ones
/// first, each kind in fingerprint order) and of its `timeline` as fit in
/// `most` bytes encoded, and how many of each it left out: an incident of
/// thousands of alerts would otherwise be an answer larger than NATS
/// carries, which never arrives. With a timeline asked for, the alerts get
/// half the room first, the timeline what is left, then the alerts the
/// rest. Of the timeline, the entries of what people and the engine did
/// (opened, paged, acknowledged, notes, resolved, ...) go first, newest
/// first, then the alert changes, newest first; kept in their order.
fn fit(
    incident: IncidentSummary,
    mut alerts: Vec<tocsin_proto::incident::AlertInfo>,
    timeline: Vec<IncidentEvent>,
    with_timeline: bool,
    most: usize,
) -> IncidentDetail {
    use tocsin_proto::AlertStatus;
    // Stable: fingerprint order within firing and within resolved.
    alerts.sort_by_key(|a| a.status != AlertStatus::Firing);
    let mut room = most.saturating_sub(encoded_len(&incident));
    let alert_sizes: Vec<usize> = alerts.iter().map(encoded_len).collect();
    let entry_sizes: Vec<usize> = timeline.iter().map(encoded_len).collect();
    // Takes items of `sizes` in order while they fit in `budget`; how many.
    let take = |sizes: &[usize], from: usize, budget: &mut usize| {
        let mut n = 0;
        for s in &sizes[from..] {
            if *s > *budget {
                break;
            }
            *budget -= s;
            n += 1;
        }
        n
    };
    let mut first = if with_timeline { room / 2 } else { room };
    let mut shown = take(&alert_sizes, 0, &mut first);
    room -= alert_sizes[..shown].iter().sum::<usize>();
    let mut keep = vec![false; timeline.len()];
    for changes in [false, true] {
        for (i, e) in timeline.iter().enumerate().rev() {
            if alert_change(e) == changes && entry_sizes[i] <= room {
                room -= entry_sizes[i];
                keep[i] = true;
            }
        }
    }
    shown += take(&alert_sizes, shown, &mut room);
    let alerts_omitted = alerts.len() - shown;
    alerts.truncate(shown);
    let timeline_omitted = keep.iter().filter(|k| !**k).count();
    let timeline = timeline
        .into_iter()
        .zip(keep)
        .filter_map(|(e, k)| k.then_some(e))
        .collect();
    IncidentDetail {
        incident,
        alerts,
        timeline,
        alerts_omitted: u32::try_from(alerts_omitted).unwrap_or(u32::MAX),
        timeline_omitted: u32::try_from(timeline_omitted).unwrap_or(u32::MAX),
    }
}

/// `v`'s size as the answer encodes it (one that does not encode takes
/// all the room, so it is left out).
fn encoded_len<T: serde::Serialize>(v: &T) -> usize {
    codec::encoded_len(v).unwrap_or(usize::MAX)
}

/// An alert change, as against what people and the engine did.
fn alert_change(e: &IncidentEvent) -> bool {
    matches!(
        e.kind,
        EventKind::AlertFiring { .. } | EventKind::AlertResolved { .. }
    )
}

/// The newest events of one incident from the stream (the truth), in
/// order: of what was done and of the alert changes each, the newest that
/// come to `keep_bytes` as stored (an answer holds less than half that, see
/// [`fit`]); and how many older ones were let go while reading. An
/// incident whose alerts flapped for weeks has hundreds of thousands of
/// entries: they are read one by one, never all held at once. Its entries
/// on its own subjects are read in order; its receipts and alert changes,
/// stored in messages of several
/// ([`tocsin_proto::subjects::INCIDENTS_BATCH`]), are read from the
/// messages at `batches` (the incident's own list of them,
/// [`IncidentState::batches`]), one at a time, newest first, until
/// [`BATCH_READ_FACTOR`] times `keep_bytes` of them were read (a storm's
/// messages hold many incidents' entries; one that aged out of the stream
/// is passed over).
/// A timeline reads at most this many times the bytes it keeps from
/// messages of several entries.
const BATCH_READ_FACTOR: usize = 8;

pub(crate) async fn timeline(
    js: &jetstream::Context,
    incident: &IncidentSummary,
    batches: &std::collections::VecDeque<u64>,
    keep_bytes: usize,
) -> Result<(Vec<IncidentEvent>, usize), String> {
    let id = incident.id;
    let filter = tocsin_proto::subjects::incident_events_of(&id);
    let mut newest = Newest::new(keep_bytes);
    tocsin_runtime::streams::read_matching_each(js, STREAM_INCIDENTS, filter, |m| {
        let seq = m.info().map_or(0, |i| i.stream_sequence);
        if let Ok(env) = decode_envelope::<LogEntry>(&m.payload) {
            if let LogEntry::Incident(e) = env.body {
                newest.push((seq, 0), e, m.payload.len());
            }
        }
    })
    .await?;
    if batches.is_empty() {
        return Ok(newest.into_events());
    }
    let stream = js
        .get_stream_no_info(STREAM_INCIDENTS)
        .await
        .map_err(|e| e.to_string())?;
    let mut budget = keep_bytes.saturating_mul(BATCH_READ_FACTOR);
    for &seq in batches.iter().rev() {
        if budget == 0 {
            break;
        }
        let m = match stream.get_raw_message(seq).await {
            Ok(m) => m,
            Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => continue,
            Err(e) => return Err(format!("cannot read INCIDENTS message {seq}: {e}")),
        };
        budget = budget.saturating_sub(m.payload.len());
        let Ok(env) = decode_entries(&m.subject, &m.payload) else {
            continue;
        };
        for (i, entry) in env.body.into_iter().enumerate() {
            if let LogEntry::Incident(e) = entry {
                if e.incident.id == id {
                    let size = encoded_len(&e);
                    let index = u32::try_from(i + 1).unwrap_or(u32::MAX);
                    newest.push((seq, index), e, size);
                }
            }
        }
    }
    Ok(newest.into_events())
}

/// An entry's place in the log: its message's stream sequence and its
/// place in that message (0 for a message of one entry, from 1 in a
/// message of several).
type Place = (u64, u32);

/// The newest events of each kind (see [`alert_change`]) up to a number
/// of bytes each, in log order, whatever order they are pushed in: the
/// oldest is let go first while a kind is over its bytes, so one pushed
/// later that is older than all kept goes at once.
struct Newest {
    keep_bytes: usize,
    /// What was done, and the alert changes: place -> (size, event).
    kinds: [std::collections::BTreeMap<Place, (usize, IncidentEvent)>; 2],
    bytes: [usize; 2],
    let_go: usize,
}

impl Newest {
    fn new(keep_bytes: usize) -> Newest {
        Newest {
            keep_bytes,
            kinds: Default::default(),
            bytes: [0; 2],
            let_go: 0,
        }
    }

    fn push(&mut self, place: Place, e: IncidentEvent, size: usize) {
        let k = usize::from(alert_change(&e));
        if self.kinds[k].insert(place, (size, e)).is_some() {
            return; // the same entry twice: kept once
        }
        self.bytes[k] += size;
        // The newest always stays, however large.
        while self.bytes[k] > self.keep_bytes && self.kinds[k].len() > 1 {
            let (_, (s, _)) = self.kinds[k].pop_first().expect("more than one");
            self.bytes[k] -= s;
            self.let_go += 1;
        }
    }

    fn into_events(self) -> (Vec<IncidentEvent>, usize) {
        let [done, changes] = self.kinds;
        let mut all: Vec<_> = done.into_iter().chain(changes).collect();
        all.sort_by_key(|(place, _)| *place);
        (all.into_iter().map(|(_, (_, e))| e).collect(), self.let_go)
    }
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
/// `upto` make it (None if it has none): those on its own subjects and
/// its alert changes and receipts in messages of several, which are read
/// whole, every one of them up to `upto` (the store lost the incident, so
/// which of them hold its entries is not known: slow on a long stream,
/// and only taken when the local store lost the incident).
pub async fn replay_incident(
    js: &jetstream::Context,
    id: uuid::Uuid,
    upto: u64,
) -> Result<Option<IncidentState>, String> {
    let filters = vec![
        tocsin_proto::subjects::incident_events_of(&id),
        tocsin_proto::subjects::INCIDENTS_BATCH.to_string(),
    ];
    let mut scratch = Projection::new();
    let mut failed = None;
    tocsin_runtime::streams::read_matching_any_each(js, STREAM_INCIDENTS, filters, |m| {
        let seq = match m.info() {
            Ok(i) => i.stream_sequence,
            Err(e) => {
                failed.get_or_insert_with(|| e.to_string());
                return;
            }
        };
        if seq > upto {
            return;
        }
        let Ok(env) = decode_entries(&m.subject, &m.payload) else {
            return;
        };
        let mine: Vec<LogEntry> = env
            .body
            .into_iter()
            .filter(|e| e.incident_id() == Some(id))
            .collect();
        match mine.as_slice() {
            [] => {}
            [one] if !is_incidents_batch(&m.subject) => scratch.apply(one, seq),
            _ => scratch.apply_batch(&mine, seq),
        }
    })
    .await?;
    if let Some(e) = failed {
        return Err(e);
    }
    Ok(scratch.incidents.remove(&id).map(|st| *st))
}

/// Incidents newest first. Those in memory are filtered under the lock;
/// those that left memory (resolved long ago, or beyond
/// `incidents.max_in_memory`) are read from the store after it, only as
/// far as the page needs and at most `max_reads` of them: a filter that
/// matches few of many stored incidents would otherwise read every one of
/// them for one answer. Where the reads ran out before the page was full,
/// the answer says where it stopped (`next_before`).
async fn list(
    proj: &Shared,
    durable: &crate::service::Durable,
    store: &Store,
    max_reads: usize,
    most: usize,
    q: ListIncidents,
) -> QueryReply {
    let matchers = match MatcherSet::new(&q.matchers) {
        Ok(m) => m,
        Err(e) => return QueryReply::Error { reason: e },
    };
    let limit = q.wanted();
    let keep = |s: &IncidentSummary| {
        (q.status.is_empty() || q.status.contains(&s.status))
            && q.min_severity.is_none_or(|m| s.severity >= m)
            && q.since.is_none_or(|t| s.opened_at >= t)
            && matchers.matches(&s.labels)
    };
    let want_cold = q.status.is_empty() || q.status.contains(&IncidentStatus::Resolved);
    // Newest first: an incident in memory (already filtered) or the number
    // and id of one to read from the store; and whether the walk stopped
    // at `max_reads` of those with older numbers left.
    let (candidates, cut) = {
        let _stored = durable.read().await;
        let p = proj.read().unwrap_or_else(|e| e.into_inner());
        let mut out: Vec<Result<IncidentSummary, (u64, uuid::Uuid)>> = Vec::new();
        let (mut found, mut to_read, mut cut) = (0, 0, false);
        let upper = q.before.unwrap_or(u64::MAX);
        for (number, id) in p.by_number.range(..upper).rev() {
            if found >= limit {
                break;
            }
            if to_read == max_reads {
                cut = true;
                break;
            }
            match p.incidents.get(id) {
                Some(i) if keep(&i.summary) => {
                    out.push(Ok(i.summary.clone()));
                    found += 1;
                }
                Some(_) => {}
                None if want_cold || p.cold_open.contains(id) => {
                    out.push(Err((*number, *id)));
                    to_read += 1;
                }
                None => {}
            }
        }
        (out, cut)
    };
    // Read without holding up the service: the store holds saved, so
    // stored, states only. At most `most` bytes of incidents: an answer
    // larger than NATS carries never arrives, so one that would be stops
    // there and says where (at least one incident goes, each being far
    // smaller than a message).
    let mut incidents = Vec::new();
    let mut lowest = None;
    let mut room = most;
    let mut full = false;
    for c in candidates {
        if incidents.len() >= limit {
            break;
        }
        let (number, summary) = match c {
            Ok(s) => (s.number, Some(s)),
            Err((number, id)) => match store.incident(&id) {
                Ok(Some(st)) if keep(&st.summary) => (number, Some(st.summary)),
                _ => (number, None),
            },
        };
        if let Some(s) = summary {
            let size = encoded_len(&s);
            if size > room && !incidents.is_empty() {
                full = true;
                break;
            }
            room = room.saturating_sub(size);
            incidents.push(s);
        }
        lowest = Some(number);
    }
    // Every number from the top down to `lowest` was looked at.
    let next_before = ((cut || full) && incidents.len() < limit)
        .then_some(lowest)
        .flatten();
    QueryReply::Incidents {
        incidents,
        next_before,
    }
}

#[cfg(test)]
mod tests {
    use jiff::Timestamp;
    use tocsin_proto::{
        incident::{Cause, EventKind, IncidentEvent, IncidentSummary},
        Fingerprint,
    };

    use super::Newest;

    /// The timer ids `event` gave the events as their causes, in order.
    fn causes(kept: &[IncidentEvent]) -> Vec<String> {
        kept.iter()
            .map(|e| match &e.cause {
                Cause::Timer { id } => id.clone(),
                other => panic!("{other:?}"),
            })
            .collect()
    }

    fn event(kind: EventKind, n: u64) -> IncidentEvent {
        IncidentEvent {
            kind,
            at: Timestamp::UNIX_EPOCH,
            actor: None,
            cause: Cause::Timer { id: n.to_string() },
            incident: IncidentSummary::new(
                uuid::Uuid::from_u128(1),
                1,
                "k",
                "t",
                Timestamp::UNIX_EPOCH,
            ),
        }
    }

    /// A timeline read keeps the newest of each kind up to its bytes, in
    /// the order they came, and counts what it let go.
    #[test]
    fn the_newest_of_each_kind_are_kept_in_order() {
        let mut newest = Newest::new(1_000);
        for n in 0..1_000 {
            let kind = if n % 100 == 0 {
                EventKind::NoteAdded {
                    text: format!("note {n}"),
                }
            } else {
                EventKind::AlertResolved {
                    fingerprint: Fingerprint::from_labels(&Default::default()),
                    ends_at: Timestamp::UNIX_EPOCH,
                    more: Vec::new(),
                }
            };
            newest.push((n, 0), event(kind, n), 100);
        }
        let (kept, let_go) = newest.into_events();
        let causes = causes(&kept);
        // Every note (ten of 100 bytes), and the ten newest alert changes.
        let mut want: Vec<String> = (0..10).map(|i| (i * 100).to_string()).collect();
        want.extend((990..1_000).map(|n| n.to_string()));
        assert_eq!(causes, want);
        assert_eq!(let_go, 1_000 - 20);
        // One larger than the bytes alone is still kept.
        let mut newest = Newest::new(10);
        newest.push((0, 0), event(EventKind::Acknowledged, 0), 500);
        assert_eq!(newest.into_events().0.len(), 1);
    }

    /// The receipts, read after the entries on the incident's own subjects
    /// (from messages of several), take their place in the log's order,
    /// and the oldest of all are the ones let go.
    #[test]
    fn entries_pushed_out_of_order_are_kept_newest_first_in_log_order() {
        let note = |n: u64| {
            event(
                EventKind::NoteAdded {
                    text: format!("{n}"),
                },
                n,
            )
        };
        // Room for five of what was done.
        let mut newest = Newest::new(500);
        for seq in [10, 20, 30, 40] {
            newest.push((seq, 0), note(seq), 100);
        }
        // Receipts in messages at 5, 25 and 50 (two there).
        newest.push((5, 1), note(5), 100);
        newest.push((25, 3), note(25), 100);
        newest.push((50, 1), note(50), 100);
        newest.push((50, 2), note(51), 100);
        // The same receipt again (an index read twice) counts once.
        newest.push((50, 2), note(51), 100);
        let (kept, let_go) = newest.into_events();
        let causes = causes(&kept);
        assert_eq!(causes, ["25", "30", "40", "50", "51"]);
        assert_eq!(let_go, 3);
    }
}
