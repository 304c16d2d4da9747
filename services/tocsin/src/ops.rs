//! Operator commands: `tocsin ack 42`, `resolve`, `snooze`, `note`, `list`,
//! `show`. They send commands on the COMMANDS stream and wait for the
//! incidents service's answer, or ask it a query; they need only the `nats:`
//! section of the config.

use std::time::Duration;

use anyhow::{bail, Context as _};
use async_nats::Client;
use futures::StreamExt;
use jiff::{tz::TimeZone, Timestamp};
use tocsin_proto::{
    codec,
    command::{Action, Command, CommandReply, IncidentRef},
    incident::{Actor, IncidentEvent, IncidentStatus, IncidentSummary},
    query::{GetIncident, ListIncidents, QueryReply},
    subjects::{headers, query},
    Envelope,
};
use tocsin_runtime::admin::Metrics;

use crate::config::OperatorConfig as Config;

/// A service answered and refused: an unknown incident or schedule, a
/// command that does not apply. The CLI prints the reason and exits 1.
#[derive(Debug)]
pub struct Refused(pub String);

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Refused {}

/// A command is stored on the COMMANDS stream but no answer came in time
/// (the incidents service is down or busy): it is applied when the service
/// runs. The CLI says so and exits 4.
#[derive(Debug)]
pub struct Queued(pub String);

impl std::fmt::Display for Queued {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Queued {}

fn refused(reason: impl Into<String>) -> anyhow::Error {
    Refused(reason.into()).into()
}

/// NATS cannot be reached (the message names the URL tried).
#[derive(Debug)]
pub struct NatsUnreachable(pub String);

impl std::fmt::Display for NatsUnreachable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for NatsUnreachable {}

/// One attempt to reach NATS (no retries, so no lines of warnings before
/// the answer); the error names the URL tried.
pub(crate) async fn connect(config: &Config) -> anyhow::Result<Client> {
    let patience = config.patience;
    let url = &config.nats.url;
    let client = match tocsin_runtime::nats::connect_once_as(
        &config.nats,
        Config::IDENTITY,
        "tocsin-cli",
        &Metrics::new(),
    )
    .await
    {
        Ok(c) => c,
        Err(e @ tocsin_runtime::RuntimeError::Connect { .. }) => {
            return Err(NatsUnreachable(e.to_string()).into())
        }
        Err(e) => return Err(e.into()),
    };
    match tokio::time::timeout(patience, client.flush()).await {
        Err(_) => {
            Err(NatsUnreachable(format!("cannot reach NATS at {url} within {patience:?}")).into())
        }
        Ok(Err(e)) => Err(NatsUnreachable(format!("cannot reach NATS at {url}: {e}")).into()),
        Ok(Ok(())) => Ok(client),
    }
}

/// Parses `42`, `#42` or an incident UUID.
pub fn incident_ref(s: &str) -> Result<IncidentRef, String> {
    let t = s.trim().trim_start_matches('#');
    if let Ok(n) = t.parse::<u64>() {
        return Ok(IncidentRef::Number(n));
    }
    t.parse::<uuid::Uuid>()
        .map(IncidentRef::Id)
        .map_err(|_| format!("{s:?} is neither an incident number (42, #42) nor an incident id"))
}

/// Sends `action` as `actor` and waits for the answer: the message to
/// print when it was accepted; [`Refused`] with the reason when it was not;
/// [`Queued`] when it is stored but no answer came within the patience.
pub async fn command(config: &Config, actor: &str, action: Action) -> anyhow::Result<String> {
    let patience = config.patience;
    let what = describe(&action);
    let client = connect(config).await?;
    let js = config.jetstream.context(client.clone());
    let cmd = Command::new(Actor::new(actor, "cli"), action);
    let inbox = client.new_inbox();
    let mut replies = client.subscribe(inbox.clone()).await?;
    let env = Envelope::new("cli", Timestamp::now(), cmd.clone());
    let message = tocsin_runtime::bus::message(
        codec::encode(&env)?,
        cmd.id.clone(),
        None,
        &[(headers::REPLY_TO, inbox.as_str())],
    );
    // Sent again while it is not stored (a lost publish, a stream leader
    // being elected), within the patience.
    tocsin_runtime::bus::store(&js, &cmd.subject(), message, patience)
        .await
        .context("JetStream did not confirm storing the command")?;
    let msg = tokio::time::timeout(patience, replies.next())
        .await
        .map_err(|_| {
            anyhow::Error::new(Queued(format!(
                "queued: {what} is stored on the bus (command {}), but the incidents \
                 service did not answer within {patience:?}; it will apply it when it runs \
                 (tocsin show tells when it has)",
                cmd.id
            )))
        })?
        .context("reply subscription closed")?;
    match codec::decode::<CommandReply>(&msg.payload)? {
        CommandReply::Accepted { message, .. } => Ok(message),
        CommandReply::Rejected { reason, .. } => Err(refused(reason)),
    }
}

/// A failed request in words: nobody answering means the service is not
/// running (or not connected to this NATS).
pub(crate) fn request_failed(e: &async_nats::RequestError, service: &str) -> anyhow::Error {
    match e.kind() {
        async_nats::RequestErrorKind::NoResponders => {
            anyhow::anyhow!("no {service} service answers on this NATS; is it running?")
        }
        _ => anyhow::anyhow!("query failed ({e}); is the {service} service running?"),
    }
}

/// `ack of incident #42`, for messages about a command.
fn describe(action: &Action) -> String {
    match action.incident() {
        Some(r) => format!("{} of incident {r}", action.name()),
        None => action.name().to_string(),
    }
}

async fn ask<Q: serde::Serialize>(
    config: &Config,
    client: &Client,
    subject: &'static str,
    q: &Q,
) -> anyhow::Result<QueryReply> {
    let patience = config.patience;
    let resp = tokio::time::timeout(patience, client.request(subject, codec::encode(q)?.into()))
        .await
        .map_err(|_| {
            anyhow::anyhow!("no answer within {patience:?}; is the incidents service running?")
        })?
        .map_err(|e| request_failed(&e, "incidents"))?;
    Ok(codec::decode(&resp.payload)?)
}

/// How an answer is printed: for people (`text`, colour only on a
/// terminal, times in the local zone) or for programs (`json`, stable
/// fields documented in the README, times in RFC 3339 UTC).
#[derive(Clone, Debug)]
pub struct Style {
    pub json: bool,
    pub colour: bool,
    /// The zone of times in text (the system's, `TZ`).
    pub tz: TimeZone,
}

impl Style {
    /// Text or JSON; colour when stdout is a terminal and `NO_COLOR` is not set.
    pub fn new(json: bool) -> Style {
        use std::io::IsTerminal as _;
        Style {
            json,
            colour: std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none(),
            tz: TimeZone::system(),
        }
    }

    /// `2026-11-29 15:04:05 CET`.
    fn time(&self, t: Timestamp) -> String {
        local_time(t, &self.tz)
    }

    /// `text` in an ANSI colour (`31` red, `32` green, `33` yellow, `1` bold) on a terminal.
    fn paint(&self, code: &str, text: &str) -> String {
        if self.colour {
            format!("\x1b[{code}m{text}\x1b[0m")
        } else {
            text.to_string()
        }
    }

    fn status(&self, i: &IncidentSummary) -> String {
        let word = status_word(i);
        let code = match word {
            "triggered" => "31",
            "acknowledged" | "snoozed" => "33",
            _ => "32",
        };
        self.paint(code, word)
    }
}

/// `2026-11-29 15:04:05 CET` in `tz`.
fn local_time(t: Timestamp, tz: &TimeZone) -> String {
    t.to_zoned_datetime(tz.clone())
        .strftime("%Y-%m-%d %H:%M:%S %Z")
        .to_string()
}

/// `triggered`, `acknowledged`, `snoozed` (acknowledged with a snooze
/// running) or `resolved`.
fn status_word(i: &IncidentSummary) -> &'static str {
    match i.status {
        IncidentStatus::Resolved => "resolved",
        _ if i.snoozed_until.is_some() => "snoozed",
        s => s.as_str(),
    }
}

fn rfc3339(t: Option<Timestamp>) -> serde_json::Value {
    t.map(|t| serde_json::Value::String(t.to_string()))
        .unwrap_or(serde_json::Value::Null)
}

fn actor_json(a: Option<&Actor>) -> serde_json::Value {
    a.map(|a| serde_json::json!({"name": a.name, "via": a.via}))
        .unwrap_or(serde_json::Value::Null)
}

/// The fields `list` and `show` print in JSON for an incident.
fn incident_json(i: &IncidentSummary) -> serde_json::Value {
    serde_json::json!({
        "number": i.number,
        "id": i.id.to_string(),
        "title": i.title,
        "status": status_word(i),
        "severity": i.severity.as_str(),
        "labels": i.labels,
        "alerts_firing": i.alerts_firing,
        "alerts_total": i.alerts_total,
        "opened_at": i.opened_at.to_string(),
        "acknowledged_at": rfc3339(i.acknowledged_at),
        "acknowledged_by": actor_json(i.acknowledged_by.as_ref()),
        "snoozed_until": rfc3339(i.snoozed_until),
        "resolved_at": rfc3339(i.resolved_at),
        "assignee": i.assignee,
        "reopen_count": i.reopen_count,
        "suppressed": i.suppressed,
    })
}

pub(crate) fn to_json(v: &serde_json::Value) -> anyhow::Result<String> {
    Ok(format!("{}\n", serde_json::to_string_pretty(v)?))
}

/// `tocsin list`: one line per incident, most recent first.
pub async fn list(
    config: &Config,
    all: bool,
    limit: usize,
    style: &Style,
) -> anyhow::Result<String> {
    let client = connect(config).await?;
    let mut q = ListIncidents {
        status: if all {
            vec![]
        } else {
            vec![IncidentStatus::Triggered, IncidentStatus::Acknowledged]
        },
        limit: Some(limit),
        ..Default::default()
    };
    // One answer reads a bounded number of incidents from the service's
    // store and may stop short with where it stopped: ask again from there
    // until the page is full or the list ends.
    let mut incidents = Vec::new();
    loop {
        let QueryReply::Incidents {
            incidents: page,
            next_before,
        } = ask(config, &client, query::LIST_INCIDENTS, &q).await?
        else {
            bail!("unexpected answer to a list query");
        };
        incidents.extend(page);
        if !q.go_on(limit, incidents.len(), next_before) {
            break;
        }
    }
    if style.json {
        let list: Vec<_> = incidents.iter().map(incident_json).collect();
        return to_json(&serde_json::json!({ "incidents": list }));
    }
    let mut out = style.paint(
        "1",
        &format!(
            "{:<7} {:<13} {:<9} {:<7} {:<24} {:<12} {:<24} TITLE",
            "#", "STATUS", "SEVERITY", "ALERTS", "OPENED", "ASSIGNEE", "SNOOZED UNTIL"
        ),
    );
    out.push('\n');
    for i in &incidents {
        let mark = if i.suppressed.is_some() { "*" } else { "" };
        // Padding counts visible characters, not colour codes.
        let status = format!("{}{mark}", status_word(i));
        let pad = " ".repeat(13usize.saturating_sub(status.chars().count()));
        out.push_str(&format!(
            "{:<7} {}{mark}{pad} {:<9} {:<7} {:<24} {:<12} {:<24} {}\n",
            format!("#{}", i.number),
            style.status(i),
            i.severity.as_str(),
            format!("{}/{}", i.alerts_firing, i.alerts_total),
            style.time(i.opened_at),
            i.assignee.as_deref().unwrap_or("-"),
            i.snoozed_until
                .filter(|_| i.status != IncidentStatus::Resolved)
                .map(|t| style.time(t))
                .unwrap_or_else(|| "-".into()),
            i.title
        ));
    }
    if incidents.is_empty() {
        out.push_str(if all {
            "(no incidents)\n"
        } else {
            "(no open incidents; --all shows resolved ones)\n"
        });
    }
    if incidents.iter().any(|i| i.suppressed.is_some()) {
        out.push_str("* silenced, inhibited or in a maintenance window: pages nobody\n");
    }
    Ok(out)
}

/// Up to eight fingerprints, then how many more.
fn fingerprints<'a>(all: impl ExactSizeIterator<Item = &'a tocsin_proto::Fingerprint>) -> String {
    let n = all.len();
    let shown: Vec<String> = all.take(8).map(ToString::to_string).collect();
    match n.saturating_sub(8) {
        0 => shown.join(", "),
        rest => format!("{}, … ({rest} more)", shown.join(", ")),
    }
}

/// One timeline entry in words: `paged alice via sms, alice via email
/// (level 1 of policy standard)`, `snoozed until ...`, `escalated: no
/// progress`.
pub fn describe_event(e: &IncidentEvent, style: &Style) -> String {
    use tocsin_proto::incident::{EventKind, ResolveReason};
    match &e.kind {
        EventKind::Opened { alert, more } if more.is_empty() => {
            format!("opened by alert {}", alert.fingerprint)
        }
        EventKind::Opened { alert, more } => format!(
            "opened by alert {} and {} more: {}",
            alert.fingerprint,
            more.len(),
            fingerprints(more.iter().map(|a| &a.fingerprint))
        ),
        EventKind::AlertFiring { alert, more } if more.is_empty() => {
            format!("alert {} firing", alert.fingerprint)
        }
        EventKind::AlertFiring { alert, more } => format!(
            "{} alerts firing: {}, {}",
            more.len() + 1,
            alert.fingerprint,
            fingerprints(more.iter().map(|a| &a.fingerprint))
        ),
        EventKind::AlertResolved {
            fingerprint, more, ..
        } if more.is_empty() => format!("alert {fingerprint} resolved"),
        EventKind::AlertResolved {
            fingerprint, more, ..
        } => format!(
            "{} alerts resolved: {fingerprint}, {}",
            more.len() + 1,
            fingerprints(more.iter().map(|r| &r.fingerprint))
        ),
        EventKind::Acknowledged => "acknowledged".into(),
        EventKind::Unacknowledged => "unacknowledged".into(),
        EventKind::Snoozed { until } => format!("snoozed until {}", style.time(*until)),
        EventKind::SnoozeEnded => "snooze ended: triggered again".into(),
        EventKind::Escalated { reason } if reason.is_empty() => "escalated".into(),
        EventKind::Escalated { reason } => format!("escalated: {reason}"),
        EventKind::Assigned { user } => format!("assigned to {user}"),
        EventKind::NoteAdded { text } => format!("note: {text}"),
        EventKind::Remediation {
            runbook,
            step,
            status,
            detail,
            ..
        } => {
            // Step output is multi-line: indent it under the entry.
            let detail = detail.replace('\n', "\n        ");
            format!("remediation {runbook}/{step} {status}: {detail}")
        }
        EventKind::Resolved {
            reason: ResolveReason::AllAlertsResolved,
        } => "resolved: every alert resolved".into(),
        EventKind::Resolved { .. } => "resolved".into(),
        EventKind::Reopened => "reopened".into(),
        EventKind::Paged {
            level,
            repeat,
            pages,
            reason,
            ..
        } => {
            // The wire's levels count from 0; people's from 1.
            let why = if reason.is_empty() {
                match repeat {
                    0 => format!("level {}", level + 1),
                    r => format!("level {} (round {})", level + 1, r + 1),
                }
            } else {
                reason.clone()
            };
            let who = if pages.is_empty() {
                "nobody".to_string()
            } else {
                pages.join(", ")
            };
            format!("paged {who} ({why})")
        }
        EventKind::Delivery { delivery } => format!("delivery: {}", delivery.describe()),
        EventKind::Runbook { request } => match request {
            tocsin_proto::incident::RunbookRequest::Run { runbook, dry_run } => format!(
                "asked to run runbook {runbook}{}",
                if *dry_run { " (dry run)" } else { "" }
            ),
            tocsin_proto::incident::RunbookRequest::Approve { run } => {
                format!("approved runbook run {run}")
            }
            tocsin_proto::incident::RunbookRequest::Deny { run } => {
                format!("denied runbook run {run}")
            }
        },
    }
}

/// The last escalate reason on the timeline, if any.
fn escalate_reason(timeline: &[IncidentEvent]) -> Option<&str> {
    timeline.iter().rev().find_map(|e| match &e.kind {
        tocsin_proto::incident::EventKind::Escalated { reason } if !reason.is_empty() => {
            Some(reason.as_str())
        }
        _ => None,
    })
}

/// `tocsin show 42`: the incident, its alerts (with their annotations and
/// links) and its timeline.
pub async fn show(config: &Config, incident: IncidentRef, style: &Style) -> anyhow::Result<String> {
    let client = connect(config).await?;
    let d = match ask(
        config,
        &client,
        query::GET_INCIDENT,
        &GetIncident {
            incident,
            timeline: true,
        },
    )
    .await?
    {
        QueryReply::Incident(d) => d,
        QueryReply::Error { reason } => return Err(refused(reason)),
        _ => bail!("unexpected answer to a get query"),
    };
    let i = &d.incident;
    if style.json {
        let mut v = incident_json(i);
        v["escalate_reason"] = escalate_reason(&d.timeline).into();
        v["alerts"] = d
            .alerts
            .iter()
            .map(|a| {
                serde_json::json!({
                    "fingerprint": a.fingerprint.to_string(),
                    "status": a.status.as_str(),
                    "labels": a.labels,
                    "annotations": a.annotations,
                    "starts_at": a.starts_at.to_string(),
                    "ends_at": rfc3339(a.ends_at),
                    "generator_url": a.generator_url,
                    "suppressed": a.suppressed,
                })
            })
            .collect();
        v["timeline"] = d
            .timeline
            .iter()
            .map(|e| {
                serde_json::json!({
                    "at": e.at.to_string(),
                    "event": e.kind.name(),
                    "actor": actor_json(e.actor.as_ref()),
                    "text": describe_event(e, &Style { colour: false, tz: TimeZone::UTC, json: true }),
                })
            })
            .collect();
        v["alerts_omitted"] = d.alerts_omitted.into();
        v["timeline_omitted"] = d.timeline_omitted.into();
        return to_json(&v);
    }
    let mut out = style.paint("1", &format!("#{} {}", i.number, i.title));
    out.push('\n');
    out.push_str(&format!(
        "  id:        {}\n  status:    {}",
        i.id,
        style.status(i)
    ));
    match (i.status, i.snoozed_until, &i.acknowledged_by) {
        (IncidentStatus::Resolved, _, _) => {}
        (_, Some(until), by) => {
            out.push_str(&format!(" until {}", style.time(until)));
            if let Some(a) = by {
                out.push_str(&format!(" (by {} via {})", a.name, a.via));
            }
        }
        (IncidentStatus::Acknowledged, None, Some(a)) => {
            out.push_str(&format!(" (acknowledged by {} via {})", a.name, a.via));
        }
        _ => {}
    }
    out.push_str(&format!(
        "\n  severity:  {}\n  opened:    {}\n",
        i.severity.as_str(),
        style.time(i.opened_at)
    ));
    if let Some(t) = i
        .acknowledged_at
        .filter(|_| i.status == IncidentStatus::Acknowledged)
    {
        out.push_str(&format!("  acknowledged: {}\n", style.time(t)));
    }
    if let Some(r) = i.resolved_at {
        out.push_str(&format!("  resolved:  {}\n", style.time(r)));
    }
    out.push_str(&format!(
        "  assignee:  {}\n",
        i.assignee.as_deref().unwrap_or("-")
    ));
    if let Some(r) = escalate_reason(&d.timeline) {
        out.push_str(&format!("  escalated: {r}\n"));
    }
    if let Some(s) = &i.suppressed {
        out.push_str(&format!("  suppressed: {s}\n"));
    }
    out.push_str(&format!(
        "  alerts ({} firing of {}):\n",
        i.alerts_firing, i.alerts_total
    ));
    for a in &d.alerts {
        let labels: Vec<String> = a.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        out.push_str(&format!(
            "    {} {:<8} {}\n",
            a.fingerprint,
            a.status.as_str(),
            labels.join(" ")
        ));
        // The well-known annotations first, then the rest.
        let known = ["summary", "description", "runbook_url"];
        for k in known {
            if let Some(v) = a.annotations.get(k) {
                out.push_str(&format!("      {k}: {}\n", one_block(v)));
            }
        }
        for (k, v) in a
            .annotations
            .iter()
            .filter(|(k, _)| !known.contains(&k.as_str()))
        {
            out.push_str(&format!("      {k}: {}\n", one_block(v)));
        }
        if let Some(u) = &a.generator_url {
            out.push_str(&format!("      source: {u}\n"));
        }
        if let Some(s) = &a.suppressed {
            out.push_str(&format!("      suppressed: {s}\n"));
        }
    }
    if d.alerts_omitted > 0 {
        out.push_str(&format!(
            "    ... {} more alerts not shown (one answer holds at most the NATS server's max_payload)\n",
            d.alerts_omitted
        ));
    }
    out.push_str("  timeline:\n");
    if d.timeline_omitted > 0 {
        out.push_str(&format!(
            "    ... {} older entries not shown\n",
            d.timeline_omitted
        ));
    }
    for e in &d.timeline {
        let who = e
            .actor
            .as_ref()
            .map(|a| format!(" by {} ({})", a.name, a.via))
            .unwrap_or_default();
        let what = describe_event(e, style);
        let what = match &e.kind {
            tocsin_proto::incident::EventKind::Paged { .. } => style.paint("31", &what),
            tocsin_proto::incident::EventKind::Acknowledged
            | tocsin_proto::incident::EventKind::Snoozed { .. } => style.paint("33", &what),
            tocsin_proto::incident::EventKind::Resolved { .. } => style.paint("32", &what),
            _ => what,
        };
        out.push_str(&format!("    {}  {}{}\n", style.time(e.at), what, who));
    }
    Ok(out)
}

/// A multi-line text on one line per line, indented under its key.
fn one_block(v: &str) -> String {
    v.trim_end().replace('\n', "\n        ")
}

/// `tocsin oncall [SCHEDULE] [--at T]`: who is on call (for every schedule
/// when none is named), until when, and who is next; times in the
/// schedule's zone.
pub async fn oncall(
    config: &Config,
    schedule: Option<String>,
    at: Option<Timestamp>,
    style: &Style,
) -> anyhow::Result<String> {
    use tocsin_proto::query::{ListSchedules, OnCallQuery, OnCallReply, ScheduleList};
    let patience = config.patience;
    let client = connect(config).await?;
    let names = match schedule {
        Some(s) => vec![s],
        None => {
            let resp = tokio::time::timeout(
                patience,
                client.request(
                    query::ESCALATION_SCHEDULES,
                    codec::encode(&ListSchedules {})?.into(),
                ),
            )
            .await
            .map_err(|_| {
                anyhow::anyhow!("no answer within {patience:?}; is the escalation service running?")
            })?
            .map_err(|e| request_failed(&e, "escalation"))?;
            codec::decode::<ScheduleList>(&resp.payload)?.schedules
        }
    };
    let mut views = Vec::new();
    for name in names {
        let q = OnCallQuery {
            schedule: name.clone(),
            at,
        };
        let resp = tokio::time::timeout(
            patience,
            client.request(query::ESCALATION_ONCALL, codec::encode(&q)?.into()),
        )
        .await
        .map_err(|_| {
            anyhow::anyhow!("no answer within {patience:?}; is the escalation service running?")
        })?
        .map_err(|e| request_failed(&e, "escalation"))?;
        match codec::decode::<OnCallReply>(&resp.payload)? {
            OnCallReply::OnCall(v) => views.push(*v),
            OnCallReply::Error { reason } => return Err(refused(reason)),
        }
    }
    if style.json {
        let list: Vec<_> = views
            .iter()
            .map(|v| {
                serde_json::json!({
                    "schedule": v.schedule,
                    "timezone": v.timezone,
                    "at": v.at.to_string(),
                    "user": v.user,
                    "layer": v.layer,
                    "shift_start": rfc3339(v.shift_start),
                    "shift_end": rfc3339(v.shift_end),
                    "next": v.next.iter().map(|s| serde_json::json!({
                        "user": s.user, "start": s.start.to_string(), "end": s.end.to_string()
                    })).collect::<Vec<_>>(),
                })
            })
            .collect();
        return to_json(&serde_json::json!({ "schedules": list }));
    }
    if views.is_empty() {
        return Ok("(no schedules configured under escalation.schedules)\n".into());
    }
    let mut out = String::new();
    for v in &views {
        let tz = v
            .timezone
            .as_deref()
            .and_then(|z| TimeZone::get(z).ok())
            .unwrap_or(TimeZone::UTC);
        let t = |at: Timestamp| local_time(at, &tz);
        let who = v.user.clone().unwrap_or_else(|| "nobody".into());
        let until = v
            .shift_end
            .map(|e| format!(" until {}", t(e)))
            .unwrap_or_default();
        out.push_str(&format!(
            "{}: {}{until}\n",
            v.schedule,
            style.paint("1", &who)
        ));
        for s in v.next.iter().take(3) {
            out.push_str(&format!(
                "  then {} from {} to {}\n",
                s.user,
                t(s.start),
                t(s.end)
            ));
        }
    }
    Ok(out)
}

/// The silences (and their state now) in text or JSON.
pub async fn silences(config: &Config, style: &Style) -> anyhow::Result<String> {
    let client = connect(config).await?;
    let reply = ask(
        config,
        &client,
        query::LIST_SILENCES,
        &serde_json::Map::new(),
    )
    .await?;
    let QueryReply::Silences {
        mut silences,
        omitted,
    } = reply
    else {
        if let QueryReply::Error { reason } = reply {
            return Err(refused(reason));
        }
        bail!("unexpected answer to a silences query");
    };
    silences.sort_by_key(|s| std::cmp::Reverse(s.starts_at));
    let now = Timestamp::now();
    let state = |s: &tocsin_proto::silence::Silence| {
        if s.ends_at <= now {
            "expired"
        } else if s.starts_at > now {
            "pending"
        } else {
            "active"
        }
    };
    let matchers = |s: &tocsin_proto::silence::Silence| -> Vec<String> {
        s.matchers
            .iter()
            .map(|m| format!("{}{}\"{}\"", m.name, m.op.as_str(), m.value))
            .collect()
    };
    if style.json {
        let list: Vec<_> = silences
            .iter()
            .map(|s| {
                serde_json::json!({
                    "id": s.id,
                    "state": state(s),
                    "matchers": matchers(s),
                    "starts_at": s.starts_at.to_string(),
                    "ends_at": s.ends_at.to_string(),
                    "created_by": s.created_by,
                    "comment": s.comment,
                })
            })
            .collect();
        return to_json(&serde_json::json!({ "silences": list, "omitted": omitted }));
    }
    if silences.is_empty() && omitted == 0 {
        return Ok("(no silences)\n".into());
    }
    let mut out = style.paint(
        "1",
        &format!(
            "{:<38} {:<8} {:<24} {:<12} MATCHERS  COMMENT",
            "ID", "STATE", "ENDS", "BY"
        ),
    );
    out.push('\n');
    for s in &silences {
        out.push_str(&format!(
            "{:<38} {:<8} {:<24} {:<12} {}  {}\n",
            s.id,
            state(s),
            style.time(s.ends_at),
            s.created_by,
            matchers(s).join(" "),
            s.comment
        ));
    }
    if omitted > 0 {
        out.push_str(&format!(
            "... {omitted} more silences not shown (one answer holds at most the NATS server's max_payload)\n"
        ));
    }
    Ok(out)
}

/// `tocsin silence add`: matchers (`service=payments`,
/// `severity=~"high|critical"`), for `duration` (1m to 90d), from now.
pub fn new_silence(
    matchers: &[String],
    duration: &str,
    comment: &str,
    actor: &str,
) -> Result<tocsin_proto::silence::Silence, String> {
    use tocsin_chatops::parse;
    let mut parsed = Vec::new();
    for m in matchers {
        parsed.push(parse::parse_matcher(m)?);
    }
    parse::check_matchers(&parsed)?;
    let seconds = parse::silence_duration(duration)?;
    let now = Timestamp::now();
    Ok(tocsin_proto::silence::Silence {
        id: uuid::Uuid::now_v7().to_string(),
        matchers: parsed,
        starts_at: now,
        ends_at: now
            .checked_add(jiff::SignedDuration::from_secs(seconds as i64))
            .map_err(|e| format!("duration: {e}"))?,
        created_by: actor.to_string(),
        comment: comment.to_string(),
        recurrence: None,
    })
}

/// How long a report may take (it reads every incident of the window).
const REPORT_PATIENCE: Duration = Duration::from_secs(120);

/// `tocsin report --since 30d [--output json]`: asks the chat-ops service
/// (`tocsin.query.report`), which computes it from the incidents service's
/// answers with its clock as "now".
pub async fn report(config: &Config, since: Duration, json: bool) -> anyhow::Result<String> {
    use tocsin_proto::query::{ReportQuery, ReportReply};
    let client = connect(config).await?;
    let q = ReportQuery {
        since_seconds: since.as_secs(),
    };
    let resp = tokio::time::timeout(
        REPORT_PATIENCE,
        client.request(query::REPORT, codec::encode(&q)?.into()),
    )
    .await
    .map_err(|_| {
        anyhow::anyhow!("no report within {REPORT_PATIENCE:?}; is the chatops service running?")
    })?
    .map_err(|e| {
        anyhow::anyhow!(
            "report query failed ({e}); is the chatops service running (a `chatops:` section)?"
        )
    })?;
    let report = match codec::decode::<ReportReply>(&resp.payload)? {
        ReportReply::Report(r) => r,
        ReportReply::Error { reason } => return Err(refused(reason)),
    };
    if json {
        return Ok(format!("{}\n", serde_json::to_string_pretty(&report)?));
    }
    Ok(report_text(&report))
}

/// Seconds as `1h 05m`, `4m 10s`, `12s`; `-` for none.
fn human(s: Option<u64>) -> String {
    match s {
        None => "-".into(),
        Some(s) if s >= 3600 => format!("{}h {:02}m", s / 3600, (s % 3600) / 60),
        Some(s) if s >= 60 => format!("{}m {:02}s", s / 60, s % 60),
        Some(s) => format!("{s}s"),
    }
}

fn report_text(r: &tocsin_proto::query::Report) -> String {
    let stats = |d: &tocsin_proto::query::DurationStats| {
        format!(
            "mean {:<9} p50 {:<9} p90 {:<9} (n={})",
            human(d.mean_seconds),
            human(d.p50_seconds),
            human(d.p90_seconds),
            d.count
        )
    };
    let mut out = format!("Incidents opened {} .. {}\n", r.since, r.until);
    if r.truncated {
        out.push_str("(only the newest incidents: raise chatops.report.max_incidents for all)\n");
    }
    out.push_str(&format!("  total: {}", r.incidents));
    for s in &r.by_severity {
        out.push_str(&format!("  {}: {}", s.severity.as_str(), s.incidents));
    }
    out.push_str(&format!(
        "\n  MTTA: {}\n  MTTR: {}\n",
        stats(&r.mtta),
        stats(&r.mttr)
    ));
    out.push_str(&format!(
        "  resolved: {}, by a runbook: {} ({}.{}%)\n",
        r.resolved,
        r.resolved_by_runbook,
        r.runbook_share_permille / 10,
        r.runbook_share_permille % 10
    ));
    if !r.by_service.is_empty() {
        out.push_str("\nBy service:\n");
        for s in &r.by_service {
            out.push_str(&format!(
                "  {:<20} {:>5} incidents  MTTA {:<9} MTTR {}\n",
                s.service,
                s.incidents,
                human(s.mtta.mean_seconds),
                human(s.mttr.mean_seconds)
            ));
        }
    }
    if !r.noisiest_alerts.is_empty() {
        out.push_str("\nNoisiest alerts:\n");
        for a in &r.noisiest_alerts {
            out.push_str(&format!(
                "  {:<30} {:>5} incidents {:>6} alerts\n",
                a.alertname, a.incidents, a.alerts
            ));
        }
    }
    if !r.oncall_load.is_empty() {
        out.push_str("\nOn-call load:\n");
        for p in &r.oncall_load {
            out.push_str(&format!(
                "  {:<20} {:>5} pages {:>4} nights woken\n",
                p.user, p.pages, p.nights_woken
            ));
        }
    }
    out
}
