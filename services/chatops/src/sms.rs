//! Twilio inbound SMS: `ACK 42`, `RES 42`, `ESC 42`, `ACK ALL` from a
//! known phone number, verified with `X-Twilio-Signature`, answered with
//! TwiML.

use std::sync::Arc;

use axum::{
    body::Body,
    extract::State,
    http::{HeaderMap, StatusCode},
    response::{IntoResponse, Response},
};
use tocsin_proto::{
    command::{Action, IncidentRef},
    incident::{Actor, EventKind, IncidentStatus},
    query::ListIncidents,
};

use crate::{
    bus::Outcome,
    events::ChatopsEvent,
    http::{self, error, App},
    ops,
    parse::{self, SmsAction},
    signing,
};

/// Open incidents looked through for "the sender's one open page" when an
/// SMS leaves the number out, or for all of them (`ACK ALL`).
const OPEN_PAGES_SCAN: usize = 50;
/// Acknowledgements of one `ACK ALL` sent at once.
const ACK_ALL_AT_ONCE: usize = 8;

fn twiml(message: Option<&str>) -> Response {
    let body = match message {
        Some(m) => format!(
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Response><Message>{}</Message></Response>",
            xml_escape(m)
        ),
        None => "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Response></Response>".to_string(),
    };
    (
        StatusCode::OK,
        [("content-type", "text/xml; charset=utf-8")],
        body,
    )
        .into_response()
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&apos;")
}

/// `POST /twilio/sms`.
pub(crate) async fn inbound(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let r = inbound_inner(&app, headers, body).await;
    app.counted("sms", r)
}

async fn inbound_inner(app: &App, headers: HeaderMap, body: Body) -> Response {
    let Some(sms) = &app.cfg.sms else {
        return error(
            StatusCode::NOT_FOUND,
            "not_configured",
            "SMS replies are not configured (chatops.sms)",
        );
    };
    let body = match http::read_body(app, body).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    let params = http::form(&body);
    if let Err(e) = signing::verify_twilio(
        sms.auth_token.expose().as_bytes(),
        &sms.webhook_url,
        &params,
        http::header(&headers, "x-twilio-signature"),
    ) {
        ChatopsEvent::SignatureRefused {
            source: "twilio",
            reason: e.code(),
            detail: &e.to_string(),
        }
        .emit(&app.metrics);
        return error(StatusCode::UNAUTHORIZED, "bad_signature", &e.to_string());
    }
    let from = http::field(&params, "From").unwrap_or("");
    let Some(user) = app.user_by_phone(from) else {
        // Not answered: a reply would cost money and tell a stranger
        // that this number belongs to an incident system.
        tracing::info!("SMS from a number no Tocsin user has; ignored");
        return twiml(None);
    };
    let text = http::field(&params, "Body").unwrap_or("");
    let cmd = match parse::parse_sms(text) {
        Ok(c) => c,
        Err(help) => return twiml(Some(&help)),
    };
    if cmd.all {
        return twiml(Some(&ack_all(app, &user.name).await));
    }
    let number = match cmd.number {
        Some(n) => n,
        None => match sole_open_page(app, &user.name, cmd.action).await {
            Ok(n) => n,
            Err(msg) => return twiml(Some(&msg)),
        },
    };
    let incident = IncidentRef::Number(number);
    let action = match cmd.action {
        SmsAction::Ack => Action::Ack { incident },
        SmsAction::Resolve => Action::Resolve { incident },
        SmsAction::Escalate => Action::Escalate {
            incident,
            reason: "escalated by SMS".into(),
        },
    };
    let answer = match ops::command(app, Actor::new(&user.name, "sms"), action).await {
        Ok(Outcome::Accepted { message, .. }) => message,
        Ok(Outcome::Rejected { reason }) => reason,
        Err(e) => ops::failure_text(&e).replace('`', ""),
    };
    twiml(Some(&answer))
}

/// `ACK ALL`: acknowledges every open incident that paged `user` (among
/// the [`OPEN_PAGES_SCAN`] newest), a few at a time, and says which.
async fn ack_all(app: &App, user: &str) -> String {
    use futures::StreamExt;
    let (paged, more) = match open_pages(app, user, SmsAction::Ack).await {
        Ok(found) => found,
        Err(msg) => return msg,
    };
    if paged.is_empty() {
        return "You have no open page to acknowledge.".into();
    }
    let answers: Vec<(u64, Result<Outcome, String>)> = futures::stream::iter(paged)
        .map(|n| async move {
            let action = Action::Ack {
                incident: IncidentRef::Number(n),
            };
            let r = ops::command(app, Actor::new(user, "sms"), action)
                .await
                .map_err(|e| ops::failure_text(&e).replace('`', ""));
            (n, r)
        })
        .buffer_unordered(ACK_ALL_AT_ONCE)
        .collect()
        .await;
    let mut done: Vec<u64> = Vec::new();
    let mut not: Vec<String> = Vec::new();
    for (n, r) in answers {
        match r {
            Ok(Outcome::Accepted { .. }) => done.push(n),
            Ok(Outcome::Rejected { reason }) => not.push(format!("#{n}: {reason}")),
            Err(e) => not.push(format!("#{n}: {e}")),
        }
    }
    done.sort_unstable();
    not.sort();
    let mut out = match done.len() {
        0 => "Acknowledged none.".to_string(),
        1 => format!("Acknowledged 1 incident: {}.", numbers(&done)),
        n => format!("Acknowledged {n} incidents: {}.", numbers(&done)),
    };
    if !not.is_empty() {
        out.push_str(&format!(" Not acknowledged: {}.", not.join("; ")));
    }
    if more {
        out.push_str(" There may be more: reply ACK ALL again.");
    }
    within_one_message(out)
}

/// Longest reply, in characters: Twilio refuses a message over 1,600.
const MAX_REPLY_CHARS: usize = 1_500;

/// `text`, cut to [`MAX_REPLY_CHARS`] (ending in `...`) when longer.
fn within_one_message(text: String) -> String {
    if text.chars().count() <= MAX_REPLY_CHARS {
        return text;
    }
    let mut cut: String = text.chars().take(MAX_REPLY_CHARS - 3).collect();
    cut.push_str("...");
    cut
}

/// The number of the one open incident that paged `user`, or what to
/// tell them when there is none or several.
async fn sole_open_page(app: &App, user: &str, action: SmsAction) -> Result<u64, String> {
    let (paged, _) = open_pages(app, user, action).await?;
    match paged.as_slice() {
        [n] => Ok(*n),
        [] => Err("You have no open page. Reply with the number, e.g. ACK 42.".into()),
        many => Err(format!(
            "You have {} open pages ({}); reply with the number, e.g. ACK {}.",
            many.len(),
            numbers(many),
            many[0]
        )),
    }
}

/// `#4, #5, #7`.
fn numbers(ns: &[u64]) -> String {
    ns.iter()
        .map(|n| format!("#{n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The numbers of the open incidents (triggered; for other actions also
/// acknowledged) that paged `user`, among the [`OPEN_PAGES_SCAN`] newest,
/// and whether there were more open incidents than that; or what to tell
/// the sender when the incidents service cannot say.
async fn open_pages(app: &App, user: &str, action: SmsAction) -> Result<(Vec<u64>, bool), String> {
    let status = match action {
        SmsAction::Ack => vec![IncidentStatus::Triggered],
        _ => vec![IncidentStatus::Triggered, IncidentStatus::Acknowledged],
    };
    let q = ListIncidents {
        status,
        limit: Some(OPEN_PAGES_SCAN),
        ..Default::default()
    };
    let open = match ops::list_incidents(app, &q).await {
        Ok(Ok(l)) => l,
        Ok(Err(r)) => return Err(r),
        Err(e) => return Err(ops::failure_text(&e).replace('`', "")),
    };
    let more = open.len() >= OPEN_PAGES_SCAN;
    let mut paged = Vec::new();
    for i in open {
        if let Ok(Ok(d)) = ops::get_incident(app, IncidentRef::Id(i.id), true).await {
            let hit = d.timeline.iter().any(|e| match &e.kind {
                EventKind::Paged { pages, .. } => pages.iter().any(|p| pages_user(p, user)),
                _ => false,
            });
            if hit {
                paged.push(i.number);
            }
        }
    }
    Ok((paged, more))
}

/// Whether a page on the timeline (`alice via sms`, `alice (on call for
/// primary) via sms`) went to `user`.
fn pages_user(page: &str, user: &str) -> bool {
    page.strip_prefix(user)
        .is_some_and(|rest| rest.starts_with(" via ") || rest.starts_with(" ("))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_name_their_user() {
        assert!(pages_user("alice via sms", "alice"));
        assert!(pages_user("alice (on call for primary) via sms", "alice"));
        assert!(!pages_user("alicia via sms", "alice"));
        assert!(!pages_user("#ops via slack", "alice"));
    }

    #[test]
    fn a_long_reply_is_cut_to_one_message() {
        let short = "Acknowledged 2 incidents: #1, #2.".to_string();
        assert_eq!(within_one_message(short.clone()), short);
        let long = format!(
            "Not acknowledged: {}",
            "#7: é already acknowledged; ".repeat(100)
        );
        let cut = within_one_message(long);
        assert_eq!(cut.chars().count(), MAX_REPLY_CHARS);
        assert!(cut.ends_with("..."));
    }

    #[test]
    fn twiml_is_escaped() {
        assert_eq!(xml_escape("a<b & \"c\""), "a&lt;b &amp; &quot;c&quot;");
    }
}
