//! What Slack, SMS and the API share: sending a command for someone (with
//! telemetry), queries, and the text answers of `/tocsin`.

use tocsin_proto::{
    command::{Action, IncidentRef},
    incident::{Actor, EventKind, IncidentStatus, IncidentSummary},
    query::{
        GetIncident, IncidentDetail, ListIncidents, ListSchedules, OnCallQuery, OnCallReply,
        OnCallView, QueryReply, ScheduleList,
    },
    subjects::query,
};

use crate::{bus::Outcome, events::ChatopsEvent, http::App, ChatopsError};

/// Sends `action` for `actor` (name, via) and reports it.
pub(crate) async fn command(
    app: &App,
    actor: Actor,
    action: Action,
) -> Result<Outcome, ChatopsError> {
    command_noting(app, actor, action, None).await
}

/// [`command`], telling `stored` once the command is stored on the bus,
/// or why it could not be.
pub(crate) async fn command_noting(
    app: &App,
    actor: Actor,
    action: Action,
    stored: Option<tokio::sync::oneshot::Sender<Result<(), String>>>,
) -> Result<Outcome, ChatopsError> {
    let name = action.name();
    let via = actor.via.clone();
    let who = actor.name.clone();
    let r = app.bus.command(actor, action, stored).await;
    let (outcome, detail) = match &r {
        Ok(Outcome::Accepted { message, .. }) => ("accepted", message.clone()),
        Ok(Outcome::Rejected { reason }) => ("rejected", reason.clone()),
        Err(ChatopsError::NoAnswer) => ("no_answer", String::new()),
        Err(e) => ("failed", e.to_string()),
    };
    ChatopsEvent::Command {
        via: &via,
        action: name,
        outcome,
        actor: &who,
        detail: &detail,
    }
    .emit(&app.metrics);
    r
}

/// The sentence for a command that got no answer or could not be sent.
pub(crate) fn failure_text(e: &ChatopsError) -> String {
    match e {
        ChatopsError::NoAnswer => "Sent, but the incidents service has not answered yet; it applies the command when it can. Check with `show`.".into(),
        other => format!("Could not send the command: {other}. Try again, or use the `tocsin` CLI."),
    }
}

pub(crate) async fn get_incident(
    app: &App,
    incident: IncidentRef,
    timeline: bool,
) -> Result<Result<IncidentDetail, String>, ChatopsError> {
    match app
        .bus
        .query::<_, QueryReply>(query::GET_INCIDENT, &GetIncident { incident, timeline })
        .await?
    {
        QueryReply::Incident(d) => Ok(Ok(*d)),
        QueryReply::Error { reason } => Ok(Err(reason)),
        _ => Err(ChatopsError::Bus("unexpected answer to a get query".into())),
    }
}

/// Up to `q.limit` incidents, newest first. Each answer of the incidents
/// service reads a bounded number of incidents from its store and may stop
/// early with a cursor (`next_before`); this asks again from there, at most
/// [`LIST_FOLLOWS`] times in all, so a chat command never makes the service
/// read more than that many bounded answers' worth.
pub(crate) async fn list_incidents(
    app: &App,
    q: &ListIncidents,
) -> Result<Result<Vec<IncidentSummary>, String>, ChatopsError> {
    let limit = q.wanted();
    let mut q = q.clone();
    let mut out = Vec::new();
    for _ in 0..LIST_FOLLOWS {
        let (page, next) = match list_page(app, &q).await? {
            Ok(p) => p,
            Err(reason) => return Ok(Err(reason)),
        };
        out.extend(page);
        if !q.go_on(limit, out.len(), next) {
            break;
        }
    }
    Ok(Ok(out))
}

/// Answers [`list_incidents`] asks for at most.
const LIST_FOLLOWS: usize = 16;

/// One answer to a list query: incidents newest first, and where the
/// service stopped reading if it stopped before the page was full.
pub(crate) async fn list_page(
    app: &App,
    q: &ListIncidents,
) -> Result<Result<(Vec<IncidentSummary>, Option<u64>), String>, ChatopsError> {
    match app
        .bus
        .query::<_, QueryReply>(query::LIST_INCIDENTS, q)
        .await?
    {
        QueryReply::Incidents {
            incidents,
            next_before,
        } => Ok(Ok((incidents, next_before))),
        QueryReply::Error { reason } => Ok(Err(reason)),
        _ => Err(ChatopsError::Bus(
            "unexpected answer to a list query".into(),
        )),
    }
}

pub(crate) async fn schedules(app: &App) -> Result<Vec<String>, ChatopsError> {
    Ok(app
        .bus
        .query::<_, ScheduleList>(query::ESCALATION_SCHEDULES, &ListSchedules {})
        .await?
        .schedules)
}

pub(crate) async fn oncall(
    app: &App,
    schedule: &str,
    at: Option<jiff::Timestamp>,
) -> Result<Result<OnCallView, String>, ChatopsError> {
    Ok(
        match app
            .bus
            .query::<_, OnCallReply>(
                query::ESCALATION_ONCALL,
                &OnCallQuery {
                    schedule: schedule.to_string(),
                    at,
                },
            )
            .await?
        {
            OnCallReply::OnCall(v) => Ok(*v),
            OnCallReply::Error { reason } => Err(reason),
        },
    )
}

/// `#42 acknowledged critical — Title (acknowledged by ana via slack)`.
pub(crate) fn incident_line(i: &IncidentSummary) -> String {
    let mut s = format!(
        "#{} {} {} — {}",
        i.number,
        i.status.as_str(),
        i.severity.as_str(),
        i.title
    );
    if let (IncidentStatus::Acknowledged, Some(a)) = (i.status, &i.acknowledged_by) {
        s.push_str(&format!(" (acknowledged by {} via {})", a.name, a.via));
    }
    if i.suppressed.is_some() {
        s.push_str(" (suppressed)");
    }
    s
}

/// `/tocsin show 42`.
pub(crate) fn show_text(d: &IncidentDetail) -> String {
    let i = &d.incident;
    let mut out = format!("*{}*\nopened {}", incident_line(i), i.opened_at);
    if let Some(r) = i.resolved_at {
        out.push_str(&format!(", resolved {r}"));
    }
    if let Some(a) = &i.assignee {
        out.push_str(&format!(", assigned to {a}"));
    }
    out.push_str(&format!(
        "\nalerts: {} firing of {}\n",
        i.alerts_firing, i.alerts_total
    ));
    // The last few timeline entries: a chat answer stays short.
    let skip = d.timeline.len().saturating_sub(10);
    for e in d.timeline.iter().skip(skip) {
        let who = e
            .actor
            .as_ref()
            .map(|a| format!(" by {} ({})", a.name, a.via))
            .unwrap_or_default();
        let what = match &e.kind {
            EventKind::NoteAdded { text } => format!("note: {text}"),
            other => other.name().replace('_', " "),
        };
        out.push_str(&format!("• {} {what}{who}\n", e.at.strftime("%H:%M:%S")));
    }
    out
}

/// `/tocsin oncall [schedule]`.
pub(crate) async fn oncall_text(
    app: &App,
    schedule: Option<String>,
) -> Result<String, ChatopsError> {
    let names = match schedule {
        Some(s) => vec![s],
        None => schedules(app).await?,
    };
    if names.is_empty() {
        return Ok("No schedules are configured.".into());
    }
    let mut out = String::new();
    for name in names.iter().take(20) {
        match oncall(app, name, None).await? {
            Ok(v) => {
                let who = v
                    .user
                    .as_deref()
                    .map(|u| mention(app, u))
                    .unwrap_or_else(|| "nobody".into());
                out.push_str(&format!("*{name}*: {who}"));
                if let Some(end) = v.shift_end {
                    out.push_str(&format!(" until {end}"));
                }
                if let Some(next) = v.next.first() {
                    out.push_str(&format!(", then {}", mention(app, &next.user)));
                }
                out.push('\n');
            }
            Err(reason) => out.push_str(&format!("*{name}*: {reason}\n")),
        }
    }
    Ok(out)
}

/// A user as a Slack mention when their Slack id is known.
pub(crate) fn mention(app: &App, user: &str) -> String {
    match app.user_by_name(user).and_then(|u| u.slack.as_deref()) {
        Some(id) => format!("<@{id}>"),
        None => user.to_string(),
    }
}
