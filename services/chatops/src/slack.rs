//! Slack: the interactivity endpoint (`block_actions` from the notifier's
//! buttons) and the `/tocsin` slash command.
//!
//! Every request is verified with the signing secret first; a bad one is
//! answered 401 and issues nothing. Slack waits 3 seconds: a button press
//! is answered 200 once its command is stored on the bus (Slack's 200 is
//! the press's acknowledgement, so a crash after it loses nothing), 503
//! when it could not be or that takes over 2.5 s (Slack shows the presser
//! it failed; chat-ops goes on sending it within `answer_timeout`), and
//! its follow-up ("already acknowledged by …") goes to the
//! `response_url`; a slash command is answered in the request when its
//! work is done within 2.5 s, else "working on it" and the rest through
//! the `response_url`. The message itself is updated by the
//! notifier, which follows the incident (only it holds the bot token).

use std::sync::Arc;

use axum::{
    body::Body,
    extract::State,
    http::{HeaderMap, StatusCode},
    response::{IntoResponse, Response},
    Json,
};
use serde_json::{json, Value};
use tocsin_proto::{
    command::{Action, IncidentRef},
    incident::{Actor, IncidentStatus},
    notify::slack_actions,
    query::ListIncidents,
    silence::Silence,
};

use crate::{
    bus::Outcome,
    config::UnknownUsers,
    events::ChatopsEvent,
    http::{self, error, App, SLACK_INLINE},
    ops,
    parse::{self, SlashCommand},
    signing,
};

/// What a button asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Button {
    /// One of the notifier's incident buttons.
    Incident(Action),
    /// A button this service does not handle (yet): remediation's
    /// approve/deny buttons will be dispatched here by their `action_id`
    /// prefix once that service exists.
    Unknown(String),
}

/// The command a button press means: `action_id` and `value` (the
/// incident id) as the notifier sets them.
pub fn button(action_id: &str, value: &str) -> Result<Button, String> {
    let id = || -> Result<IncidentRef, String> {
        value
            .parse::<uuid::Uuid>()
            .map(IncidentRef::Id)
            .map_err(|_| format!("the button's value {value:?} is not an incident id"))
    };
    Ok(Button::Incident(match action_id {
        slack_actions::ACK => Action::Ack { incident: id()? },
        slack_actions::UNACK => Action::Unack { incident: id()? },
        slack_actions::RESOLVE => Action::Resolve { incident: id()? },
        slack_actions::ESCALATE => Action::Escalate {
            incident: id()?,
            reason: "escalate button".into(),
        },
        slack_actions::SNOOZE => Action::Snooze {
            incident: id()?,
            seconds: 3600,
        },
        other => return Ok(Button::Unknown(other.to_string())),
    }))
}

/// Verifies the signature; the refusal is counted and answered 401.
fn verify(app: &App, headers: &HeaderMap, body: &[u8]) -> Result<(), Response> {
    let Some(slack) = &app.cfg.slack else {
        return Err(error(
            StatusCode::NOT_FOUND,
            "not_configured",
            "Slack is not configured (chatops.slack)",
        ));
    };
    let now = app.bus.now().as_second();
    signing::verify_slack(
        slack.signing_secret.expose().as_bytes(),
        http::header(headers, "x-slack-request-timestamp"),
        http::header(headers, "x-slack-signature"),
        body,
        now,
        slack.max_clock_skew,
    )
    .map_err(|e| {
        ChatopsEvent::SignatureRefused {
            source: "slack",
            reason: e.code(),
            detail: &e.to_string(),
        }
        .emit(&app.metrics);
        error(StatusCode::UNAUTHORIZED, "bad_signature", &e.to_string())
    })
}

fn ephemeral(text: impl Into<String>) -> Value {
    json!({"response_type": "ephemeral", "replace_original": false, "text": text.into()})
}

const NOT_A_USER: &str = "You are not a Tocsin user: ask an admin to add your Slack member id to `escalation.users` (`slack:`).";

/// `POST /slack/actions`: Slack's interactivity requests.
pub(crate) async fn actions(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let r = actions_inner(&app, headers, body).await;
    app.counted("slack_actions", r)
}

async fn actions_inner(app: &Arc<App>, headers: HeaderMap, body: Body) -> Response {
    let body = match http::read_body(app, body).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    if let Err(r) = verify(app, &headers, &body) {
        return r;
    }
    let form = http::form(&body);
    let Some(payload) = http::field(&form, "payload") else {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_payload",
            "payload: missing (Slack sends the interaction as a form field `payload`)",
        );
    };
    let Ok(payload) = serde_json::from_str::<Value>(payload) else {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_payload",
            "payload: not JSON",
        );
    };
    if payload["type"] != "block_actions" {
        // Other interactions (view submissions, shortcuts) are not used.
        return StatusCode::OK.into_response();
    }
    let user_id = payload["user"]["id"].as_str().unwrap_or("").to_string();
    let response_url = payload["response_url"].as_str().unwrap_or("").to_string();
    let Some(action) = payload["actions"]
        .as_array()
        .and_then(|a| a.first())
        .cloned()
    else {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_payload",
            "payload.actions: empty",
        );
    };
    let action_id = action["action_id"].as_str().unwrap_or("").to_string();
    let value = action["value"].as_str().unwrap_or("").to_string();
    // Answered once the command is stored (or there is none to store);
    // the answer to it and the follow-up run after.
    let Ok(permit) = app.background.clone().try_acquire_owned() else {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "busy",
            "too many button presses in progress; press again",
        );
    };
    let (stored, is_stored) = tokio::sync::oneshot::channel();
    let app2 = app.clone();
    app.tasks.spawn(async move {
        let _permit = permit;
        let text = press(&app2, &user_id, &action_id, &value, stored).await;
        if let Some(text) = text {
            app2.follow_up(&response_url, ephemeral(text)).await;
        }
    });
    match tokio::time::timeout(SLACK_INLINE, is_stored).await {
        // Stored; or nothing to store (the follow-up says why).
        Ok(Ok(Ok(()))) | Ok(Err(_)) => StatusCode::OK.into_response(),
        Ok(Ok(Err(reason))) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "not_stored",
            &format!("the command could not be stored on the bus ({reason}); press again"),
        ),
        Err(_) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "not_stored",
            "the command is not stored on the bus yet (NATS is slow or away); chat-ops goes on \
             sending it: if the message does not change, press again",
        ),
    }
}

/// Runs a button press; returns what to tell the presser, if anything
/// (a success shows in the message, which the notifier updates).
/// `stored` is told once the press's command is stored, or why it could
/// not be; dropped untold when there is no command.
async fn press(
    app: &App,
    user_id: &str,
    action_id: &str,
    value: &str,
    stored: tokio::sync::oneshot::Sender<Result<(), String>>,
) -> Option<String> {
    let Some(user) = app.user_by_slack(user_id) else {
        return Some(NOT_A_USER.into());
    };
    let action = match button(action_id, value) {
        Ok(Button::Incident(a)) => a,
        Ok(Button::Unknown(id)) => {
            return Some(format!("This Tocsin does not handle the button `{id}`."));
        }
        Err(e) => return Some(e),
    };
    let incident = action.incident().cloned();
    let was_ack = matches!(action, Action::Ack { .. });
    match ops::command_noting(app, Actor::new(&user.name, "slack"), action, Some(stored)).await {
        Ok(Outcome::Accepted { .. }) => None,
        Ok(Outcome::Rejected { reason }) => {
            // "already acknowledged by @ana": name who, as a mention.
            if let (true, Some(i)) = (was_ack, incident) {
                if let Ok(Ok(d)) = ops::get_incident(app, i, false).await {
                    if let (IncidentStatus::Acknowledged, Some(by)) =
                        (d.incident.status, &d.incident.acknowledged_by)
                    {
                        return Some(format!(
                            "#{} was already acknowledged by {} (via {}).",
                            d.incident.number,
                            ops::mention(app, &by.name),
                            by.via
                        ));
                    }
                }
            }
            Some(capitalise(&reason))
        }
        Err(e) => Some(ops::failure_text(&e)),
    }
}

fn capitalise(s: &str) -> String {
    let mut c = s.chars();
    match c.next() {
        Some(f) => f.to_uppercase().chain(c).collect(),
        None => String::new(),
    }
}

/// `POST /slack/commands`: `/tocsin …`.
pub(crate) async fn command(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let r = command_inner(&app, headers, body).await;
    app.counted("slack_command", r)
}

async fn command_inner(app: &Arc<App>, headers: HeaderMap, body: Body) -> Response {
    let body = match http::read_body(app, body).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    if let Err(r) = verify(app, &headers, &body) {
        return r;
    }
    let form = http::form(&body);
    let text = http::field(&form, "text").unwrap_or("").to_string();
    let user_id = http::field(&form, "user_id").unwrap_or("").to_string();
    let response_url = http::field(&form, "response_url").unwrap_or("").to_string();
    let cmd = match parse::parse_slash(&text) {
        Ok(c) => c,
        Err(e) => return Json(ephemeral(format!("{e}\n\n{}", parse::HELP))).into_response(),
    };
    let unknown = app
        .cfg
        .slack
        .as_ref()
        .map(|s| s.unknown_users)
        .unwrap_or(UnknownUsers::Refuse);
    let user = app.user_by_slack(&user_id).map(|u| u.name.clone());
    let actor = match (&user, unknown, cmd.writes()) {
        (Some(name), _, _) => name.clone(),
        (None, UnknownUsers::ReadOnly, false) => String::new(),
        (None, UnknownUsers::ReadOnly, true) => {
            return Json(ephemeral(format!(
                "{NOT_A_USER} Until then you may use list, show, oncall and help."
            )))
            .into_response()
        }
        (None, UnknownUsers::Refuse, _) => return Json(ephemeral(NOT_A_USER)).into_response(),
    };
    let Ok(permit) = app.background.clone().try_acquire_owned() else {
        return Json(ephemeral("Tocsin is busy; try again in a moment.")).into_response();
    };
    let mut work = {
        let app = app.clone();
        tokio::spawn(async move {
            let _permit = permit;
            run(&app, &actor, cmd).await
        })
    };
    match tokio::time::timeout(SLACK_INLINE, &mut work).await {
        Ok(Ok(text)) => Json(ephemeral(text)).into_response(),
        Ok(Err(_)) => Json(ephemeral("Something went wrong; try again.")).into_response(),
        Err(_) => {
            let app2 = app.clone();
            app.tasks.spawn(async move {
                let text = work
                    .await
                    .unwrap_or_else(|_| "Something went wrong; try again.".into());
                app2.follow_up(&response_url, ephemeral(text)).await;
            });
            Json(ephemeral("Working on it…")).into_response()
        }
    }
}

/// Runs one `/tocsin` command as `actor` and says what happened.
async fn run(app: &App, actor: &str, cmd: SlashCommand) -> String {
    let who = || Actor::new(actor, "slack");
    let send = |action: Action| async move {
        match ops::command(app, who(), action).await {
            Ok(Outcome::Accepted { message, .. }) => capitalise(&message),
            Ok(Outcome::Rejected { reason }) => capitalise(&reason),
            Err(e) => ops::failure_text(&e),
        }
    };
    match cmd {
        SlashCommand::Help => parse::HELP.into(),
        SlashCommand::Ack(incident) => send(Action::Ack { incident }).await,
        SlashCommand::Unack(incident) => send(Action::Unack { incident }).await,
        SlashCommand::Resolve { incident, note } => {
            if let Some(text) = note {
                let noted = send(Action::Note {
                    incident: incident.clone(),
                    text,
                })
                .await;
                tracing::debug!(noted, "note before resolve");
            }
            send(Action::Resolve { incident }).await
        }
        SlashCommand::Snooze { incident, seconds } => {
            send(Action::Snooze { incident, seconds }).await
        }
        SlashCommand::Escalate { incident, reason } => {
            send(Action::Escalate { incident, reason }).await
        }
        SlashCommand::Note { incident, text } => send(Action::Note { incident, text }).await,
        SlashCommand::Runbook { incident, request } => {
            send(Action::Runbook { incident, request }).await
        }
        SlashCommand::Show(incident) => match ops::get_incident(app, incident, true).await {
            Ok(Ok(d)) => ops::show_text(&d),
            Ok(Err(reason)) => capitalise(&reason),
            Err(e) => ops::failure_text(&e),
        },
        SlashCommand::List { status } => {
            let q = ListIncidents {
                status,
                limit: Some(20),
                ..Default::default()
            };
            match ops::list_incidents(app, &q).await {
                Ok(Ok(list)) if list.is_empty() => "No incidents.".into(),
                Ok(Ok(list)) => list
                    .iter()
                    .map(ops::incident_line)
                    .collect::<Vec<_>>()
                    .join("\n"),
                Ok(Err(reason)) => reason,
                Err(e) => ops::failure_text(&e),
            }
        }
        SlashCommand::Oncall { schedule } => ops::oncall_text(app, schedule)
            .await
            .unwrap_or_else(|e| ops::failure_text(&e)),
        SlashCommand::Silence {
            matchers,
            seconds,
            comment,
        } => {
            let now = app.bus.now();
            let silence = Silence {
                id: uuid::Uuid::now_v7().to_string(),
                matchers,
                starts_at: now,
                ends_at: now
                    .checked_add(jiff::SignedDuration::from_secs(seconds as i64))
                    .unwrap_or(now),
                created_by: actor.to_string(),
                comment,
                recurrence: None,
            };
            let id = silence.id.clone();
            let ends = silence.ends_at;
            match ops::command(app, who(), Action::CreateSilence { silence }).await {
                Ok(Outcome::Accepted { .. }) => format!("Silence {id} created, until {ends}."),
                Ok(Outcome::Rejected { reason }) => capitalise(&reason),
                Err(e) => ops::failure_text(&e),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buttons_map_to_commands() {
        let id = "0191e0a4-55f2-7c1e-9a6b-2b1b8d0e4f11";
        let r = IncidentRef::Id(id.parse().unwrap());
        assert_eq!(
            button("tocsin_ack", id),
            Ok(Button::Incident(Action::Ack {
                incident: r.clone()
            }))
        );
        assert_eq!(
            button("tocsin_snooze_1h", id),
            Ok(Button::Incident(Action::Snooze {
                incident: r.clone(),
                seconds: 3600
            }))
        );
        assert_eq!(
            button("tocsin_unack", id),
            Ok(Button::Incident(Action::Unack {
                incident: r.clone()
            }))
        );
        assert_eq!(
            button("tocsin_resolve", id),
            Ok(Button::Incident(Action::Resolve {
                incident: r.clone()
            }))
        );
        assert!(matches!(
            button("tocsin_escalate", id),
            Ok(Button::Incident(Action::Escalate { .. }))
        ));
        assert_eq!(
            button("remediation_approve", "x"),
            Ok(Button::Unknown("remediation_approve".into()))
        );
        assert!(button("tocsin_ack", "42").is_err());
    }
}
