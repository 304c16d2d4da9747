//! Twilio inbound SMS: `ACK 42`, `RES 42`, `ESC 42` from a known phone
//! number, verified with `X-Twilio-Signature`, answered with TwiML.

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
/// SMS leaves the number out.
const OPEN_PAGES_SCAN: usize = 50;

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

/// The number of the one open incident that paged `user`, or what to
/// tell them when there is none or several.
async fn sole_open_page(app: &App, user: &str, action: SmsAction) -> Result<u64, String> {
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
    match paged.as_slice() {
        [n] => Ok(*n),
        [] => Err("You have no open page. Reply with the number, e.g. ACK 42.".into()),
        many => Err(format!(
            "You have {} open pages ({}); reply with the number, e.g. ACK {}.",
            many.len(),
            many.iter()
                .map(|n| format!("#{n}"))
                .collect::<Vec<_>>()
                .join(", "),
            many[0]
        )),
    }
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
    fn twiml_is_escaped() {
        assert_eq!(xml_escape("a<b & \"c\""), "a&lt;b &amp; &quot;c&quot;");
    }
}
