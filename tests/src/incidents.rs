//! Talking to the incidents service over the bus: alerts with chosen
//! receive times, commands with replies, queries, and the INCIDENTS log.

use std::time::Duration;

use async_nats::{jetstream, Client, HeaderMap};
use futures::StreamExt;
use jiff::Timestamp;
use tocsin_proto::{
    codec,
    command::{Action, Command, CommandReply, IncidentRef},
    incident::{Actor, IncidentSummary, LogEntry},
    query::{GetIncident, IncidentDetail, ListIncidents, QueryReply},
    subjects::{alert_batch_subject, alert_subject, headers, is_incidents_batch, query},
    Alert, AlertStatus, Envelope, Fingerprint, Labels, Origin, SourceKind,
};

use crate::bus;

/// Builds labels from pairs.
pub fn labels(pairs: &[(&str, &str)]) -> Labels {
    Labels::from_strs(pairs)
}

/// An Alertmanager-style alert grouped by `group` labels.
pub fn alert(
    pairs: &[(&str, &str)],
    group: &[&str],
    status: AlertStatus,
    starts_at: Timestamp,
) -> Alert {
    let l = labels(pairs);
    let group_labels = l
        .iter()
        .filter(|(k, _)| group.contains(&k.as_str()))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    Alert {
        fingerprint: Fingerprint::from_labels(&l),
        status,
        labels: l,
        annotations: Labels::new(),
        starts_at,
        ends_at: (status == AlertStatus::Resolved).then_some(starts_at),
        generator_url: None,
        dedup_key: None,
        origin: Origin {
            kind: Some(SourceKind::Alertmanager),
            group_labels,
            ..Default::default()
        },
    }
}

/// Publishes an alert as ingest would, received at `at`. Returns its ALERTS sequence.
pub async fn publish_alert(js: &jetstream::Context, alert: Alert, at: Timestamp) -> u64 {
    try_publish_alert(js, alert, at)
        .await
        .expect("alert published")
}

/// [`publish_alert`] that reports failure instead of panicking (fault tests).
pub async fn try_publish_alert(
    js: &jetstream::Context,
    alert: Alert,
    at: Timestamp,
) -> Result<u64, String> {
    let (subject, h, payload) = alert_message(alert, at);
    Ok(js
        .publish_with_headers(subject, h, payload.into())
        .await
        .map_err(|e| e.to_string())?
        .await
        .map_err(|e| e.to_string())?
        .sequence)
}

/// Publishes several alerts received together at `at` in one message, as
/// ingest stores a request of several (one alert: as
/// [`try_publish_alert`]). Returns its ALERTS sequence.
pub async fn try_publish_alerts(
    js: &jetstream::Context,
    alerts: Vec<Alert>,
    at: Timestamp,
) -> Result<u64, String> {
    if alerts.len() == 1 {
        let one = alerts.into_iter().next().expect("one alert");
        return try_publish_alert(js, one, at).await;
    }
    let first = alerts.first().ok_or("no alerts")?;
    let subject = alert_batch_subject(first.origin.kind.unwrap_or(SourceKind::Generic));
    let msg_id = format!(
        "batch:{}:{}:{}",
        first.msg_id(),
        alerts.len(),
        at.as_nanosecond()
    );
    let env = Envelope::new("test", at, alerts);
    let mut h = HeaderMap::new();
    h.insert(headers::MSG_ID, msg_id.as_str());
    Ok(js
        .publish_with_headers(subject, h, codec::encode(&env).unwrap().into())
        .await
        .map_err(|e| e.to_string())?
        .await
        .map_err(|e| e.to_string())?
        .sequence)
}

/// An alert received at `at` as ingest stores it: subject, headers (its
/// message id) and the encoded envelope.
fn alert_message(alert: Alert, at: Timestamp) -> (String, HeaderMap, Vec<u8>) {
    let subject = alert_subject(
        alert.origin.kind.unwrap_or(SourceKind::Generic),
        &alert.fingerprint,
    );
    let mut msg_id = alert.msg_id();
    msg_id.push_str(&format!(":{}", at.as_nanosecond()));
    let env = Envelope::new("test", at, alert);
    let mut h = HeaderMap::new();
    h.insert(headers::MSG_ID, msg_id.as_str());
    (subject, h, codec::encode(&env).unwrap())
}

/// Publishes many alerts at once, as a storm arrives: every publish is
/// sent before any acknowledgement is awaited. Returns their sequences.
///
/// The acknowledgements may take longer than the context's 5 s: nats-server
/// syncs each message on its own, so the last of 1,500 waits for all the
/// syncs before it, and a slow machine running tests side by side took
/// more than 5 s (CI failed with `TimedOut`).
pub async fn publish_alerts_pipelined(
    js: &jetstream::Context,
    alerts: Vec<(Alert, Timestamp)>,
) -> Vec<u64> {
    let mut js = js.clone();
    js.set_timeout(std::time::Duration::from_secs(60));
    let mut pending = Vec::with_capacity(alerts.len());
    for (alert, at) in alerts {
        let (subject, h, payload) = alert_message(alert, at);
        pending.push(
            js.publish_with_headers(subject, h, payload.into())
                .await
                .expect("alert sent"),
        );
    }
    let mut seqs = Vec::with_capacity(pending.len());
    for ack in pending {
        seqs.push(ack.await.expect("alert stored").sequence);
    }
    seqs
}

/// Publishes `cmds` received at `at` (each with its id as message id) all
/// at once, as operators acting together would, and waits until JetStream
/// stored them, not for their answers.
pub async fn publish_commands(js: &jetstream::Context, cmds: Vec<Command>, at: Timestamp) {
    let mut acks = Vec::with_capacity(cmds.len());
    for cmd in cmds {
        let (h, payload) = command_message(&cmd, at, Some(&cmd.id), None);
        acks.push(
            js.publish_with_headers(cmd.subject(), h, payload.into())
                .await
                .expect("command sent"),
        );
    }
    for ack in acks {
        ack.await.expect("command stored");
    }
}

/// Sends a command received at `at` and waits for the reply.
pub async fn command(
    client: &Client,
    js: &jetstream::Context,
    actor: &str,
    action: Action,
    at: Timestamp,
) -> CommandReply {
    let cmd = Command::new(Actor::new(actor, "test"), action);
    send_command(client, js, cmd, at).await
}

/// Sends `cmd` (its id is the message id) and waits for the reply.
pub async fn send_command(
    client: &Client,
    js: &jetstream::Context,
    cmd: Command,
    at: Timestamp,
) -> CommandReply {
    let id = cmd.id.clone();
    send_command_with_msg_id(client, js, cmd, at, Some(&id))
        .await
        .expect("not a duplicate")
}

/// Sends `cmd` with the given `Nats-Msg-Id` (None: none, as a retry after
/// the duplicate window would look). Returns None when JetStream dropped it
/// as a duplicate (no reply comes then).
pub async fn send_command_with_msg_id(
    client: &Client,
    js: &jetstream::Context,
    cmd: Command,
    at: Timestamp,
    msg_id: Option<&str>,
) -> Option<CommandReply> {
    let inbox = client.new_inbox();
    let mut sub = client.subscribe(inbox.clone()).await.unwrap();
    let (h, payload) = command_message(&cmd, at, msg_id, Some(&inbox));
    let ack = js
        .publish_with_headers(cmd.subject(), h, payload.into())
        .await
        .unwrap()
        .await
        .unwrap();
    if ack.duplicate {
        return None;
    }
    let msg = tokio::time::timeout(Duration::from_secs(20), sub.next())
        .await
        .expect("command answered within 20s")
        .expect("reply");
    Some(codec::decode(&msg.payload).expect("reply decodes"))
}

/// The headers (`msg_id` as `Nats-Msg-Id`, the reply inbox) and payload
/// of `cmd` received at `at`, as chat-ops or the CLI publish it.
fn command_message(
    cmd: &Command,
    at: Timestamp,
    msg_id: Option<&str>,
    reply_to: Option<&str>,
) -> (HeaderMap, Vec<u8>) {
    let mut h = HeaderMap::new();
    if let Some(inbox) = reply_to {
        h.insert(headers::REPLY_TO, inbox);
    }
    if let Some(id) = msg_id {
        h.insert(headers::MSG_ID, id);
    }
    let env = Envelope::new("test", at, cmd.clone());
    (h, codec::encode(&env).unwrap())
}

/// Asks a request/reply query (MessagePack both ways) and decodes the answer.
pub async fn ask<Q: serde::Serialize, R: serde::de::DeserializeOwned>(
    client: &Client,
    subject: &'static str,
    q: &Q,
) -> R {
    let resp = tokio::time::timeout(
        Duration::from_secs(5),
        client.request(subject, codec::encode(q).unwrap().into()),
    )
    .await
    .expect("query answered in time")
    .expect("query answered");
    codec::decode(&resp.payload).expect("query reply decodes")
}

/// Every incident the query selects, up to its limit (most recent first),
/// following the service's cursor when an answer stops short (it reads at
/// most `incidents.list_max_reads` incidents from its store per answer).
pub async fn list(client: &Client, mut q: ListIncidents) -> Vec<IncidentSummary> {
    let limit = q.wanted();
    let mut out = Vec::new();
    loop {
        match ask::<_, QueryReply>(client, query::LIST_INCIDENTS, &q).await {
            QueryReply::Incidents {
                incidents,
                next_before,
            } => {
                out.extend(incidents);
                if !q.go_on(limit, out.len(), next_before) {
                    return out;
                }
            }
            other => panic!("unexpected answer {other:?}"),
        }
    }
}

pub async fn get(client: &Client, r: IncidentRef) -> IncidentDetail {
    match ask::<_, QueryReply>(
        client,
        query::GET_INCIDENT,
        &GetIncident {
            incident: r,
            timeline: true,
        },
    )
    .await
    {
        QueryReply::Incident(d) => *d,
        other => panic!("unexpected answer {other:?}"),
    }
}

/// Polls `list` until `done` holds (the service works asynchronously, and
/// may not answer queries yet while it starts).
pub async fn wait_for<F: Fn(&[IncidentSummary]) -> bool>(
    client: &Client,
    what: &str,
    done: F,
) -> Vec<IncidentSummary> {
    let q = ListIncidents {
        limit: Some(1000),
        ..Default::default()
    };
    let q = &q;
    let done = &done;
    crate::eventually(what, || async move {
        let answer = client
            .request(query::LIST_INCIDENTS, codec::encode(q).unwrap().into())
            .await
            .ok()
            .and_then(|r| codec::decode::<QueryReply>(&r.payload).ok());
        match answer {
            Some(QueryReply::Incidents { incidents, .. }) if done(&incidents) => Ok(incidents),
            Some(QueryReply::Incidents { incidents, .. }) => Err(incidents),
            // No answer yet: the service may still be starting.
            _ => Err(Vec::new()),
        }
    })
    .await
}

/// Every entry of the INCIDENTS stream with its message id; an entry of
/// a message of several (receipts stored together) with the id it would
/// have on its own ([`LogEntry::msg_id`]), so a receipt stored twice, in
/// one such message and another, or alone, shows as the same id twice.
pub async fn log(js: &jetstream::Context) -> Vec<(String, LogEntry)> {
    bus::read_entries(js)
        .await
        .into_iter()
        .map(|m| {
            let id = if is_incidents_batch(&m.subject) {
                m.envelope.body.msg_id()
            } else {
                m.headers
                    .get(headers::MSG_ID)
                    .map(|v| v.to_string())
                    .unwrap_or_default()
            };
            (id, m.envelope.body)
        })
        .collect()
}
