//! The HTTP API, `/api/v1` (documented in `services/chatops/openapi.yaml`).
//!
//! Bearer tokens from `chatops.api.tokens`, compared in constant time;
//! no token or a wrong one gets 401, a read token that writes 403. What a
//! token does is recorded as `<token name> via api`. Errors are JSON
//! `{"status":"error","error":<code>,"reason":<sentence naming the field>}`.

use std::sync::Arc;

use axum::{
    body::Body,
    extract::{Path, RawQuery, State},
    http::{HeaderMap, StatusCode},
    response::{IntoResponse, Response},
    Json,
};
use serde_json::{json, Map, Value};
use subtle::ConstantTimeEq;
use tocsin_proto::{
    command::{Action, IncidentRef},
    incident::{Actor, Severity},
    query::{ListIncidents, QueryReply},
    silence::Silence,
    subjects::query,
};

use crate::{
    bus::Outcome,
    http::{self, error, App},
    ops,
    parse::{self, MAX_TEXT_CHARS},
    ChatopsError,
};

/// Incidents per page at most, and by default.
const MAX_PAGE: usize = 200;
const DEFAULT_PAGE: usize = 50;

/// The caller's token name, if the token may do this (`write` or read).
fn auth(app: &App, headers: &HeaderMap, write: bool) -> Result<String, Response> {
    let unauthorized = |reason: &str| {
        let mut r = error(StatusCode::UNAUTHORIZED, "unauthorized", reason);
        r.headers_mut().insert(
            "www-authenticate",
            axum::http::HeaderValue::from_static("Bearer realm=\"tocsin\""),
        );
        r
    };
    let Some(value) = http::header(headers, "authorization") else {
        return Err(unauthorized(
            "Authorization: missing; send `Authorization: Bearer <token>` with a token from chatops.api.tokens",
        ));
    };
    let Some((scheme, token)) = value.trim().split_once(' ') else {
        return Err(unauthorized("Authorization: expected `Bearer <token>`"));
    };
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(unauthorized("Authorization: expected the Bearer scheme"));
    }
    let token = token.trim().as_bytes();
    // Every token is compared (no early exit), each in constant time.
    let mut found: Option<&crate::config::ApiToken> = None;
    for t in &app.cfg.api_tokens {
        if bool::from(t.token.expose().as_bytes().ct_eq(token)) {
            found = Some(t);
        }
    }
    let Some(t) = found else {
        return Err(unauthorized("Authorization: unknown token"));
    };
    if write && !t.write {
        return Err(error(
            StatusCode::FORBIDDEN,
            "forbidden",
            &format!(
                "token {:?} has the read scope only; this needs write",
                t.name
            ),
        ));
    }
    Ok(t.name.clone())
}

fn bad(reason: impl AsRef<str>) -> Response {
    error(StatusCode::BAD_REQUEST, "invalid_request", reason.as_ref())
}

fn bus_error(e: ChatopsError) -> Response {
    match e {
        ChatopsError::NoAnswer => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "no_answer",
            "the incidents or escalation service did not answer in time (chatops.answer_timeout); retry",
        ),
        other => error(StatusCode::SERVICE_UNAVAILABLE, "unavailable", &other.to_string()),
    }
}

/// Query parameters, each name once.
fn params(raw: Option<String>) -> Result<Vec<(String, String)>, Response> {
    let v: Vec<(String, String)> = form_urlencoded::parse(raw.unwrap_or_default().as_bytes())
        .into_owned()
        .collect();
    if v.len() > 32 {
        return Err(bad("too many query parameters (at most 32)"));
    }
    Ok(v)
}

fn one<'a>(p: &'a [(String, String)], name: &str) -> Option<&'a str> {
    p.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
}

fn only(p: &[(String, String)], allowed: &[&str]) -> Result<(), Response> {
    match p.iter().find(|(k, _)| !allowed.contains(&k.as_str())) {
        Some((k, _)) => Err(bad(format!(
            "{k}: unknown query parameter; use {}",
            allowed.join(", ")
        ))),
        None => Ok(()),
    }
}

fn incident_ref(s: &str) -> Result<IncidentRef, Response> {
    parse::incident_ref(s).map_err(|e| bad(format!("incident: {e}")))
}

fn ok<T: serde::Serialize>(v: T) -> Response {
    Json(v).into_response()
}

/// `GET /api/v1/incidents?status=&severity=&matcher=&since=&limit=&cursor=`
pub(crate) async fn list_incidents(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
) -> Response {
    let r = async {
        auth(&app, &headers, false)?;
        let p = params(raw)?;
        only(
            &p,
            &["status", "severity", "matcher", "since", "limit", "cursor"],
        )?;
        let status = parse::status_filter(one(&p, "status").unwrap_or("open"))
            .map_err(|e| bad(format!("status: {e}")))?;
        let min_severity = match one(&p, "severity") {
            None => None,
            Some(s) => Some(
                serde_json::from_value::<Severity>(Value::String(s.to_string())).map_err(|_| {
                    bad("severity: use critical, high, medium, low or info (at least this severe)")
                })?,
            ),
        };
        let matchers = p
            .iter()
            .filter(|(k, _)| k == "matcher")
            .map(|(_, v)| parse::parse_matcher(v))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| bad(format!("matcher: {e}")))?;
        let since = match one(&p, "since") {
            None => None,
            Some(s) => Some(
                s.parse::<jiff::Timestamp>()
                    .map_err(|_| bad("since: an RFC 3339 time, e.g. 2026-01-31T00:00:00Z"))?,
            ),
        };
        let limit = match one(&p, "limit") {
            None => DEFAULT_PAGE,
            Some(s) => match s.parse::<usize>() {
                Ok(n) if (1..=MAX_PAGE).contains(&n) => n,
                _ => return Err(bad(format!("limit: a number from 1 to {MAX_PAGE}"))),
            },
        };
        let before = match one(&p, "cursor") {
            None => None,
            Some(c) => Some(
                c.parse::<u64>()
                    .map_err(|_| bad("cursor: give back the next_cursor of the previous page"))?,
            ),
        };
        let q = ListIncidents {
            status,
            min_severity,
            matchers,
            since,
            limit: Some(limit + 1),
            before,
        };
        let (mut list, stopped) = ops::list_page(&app, &q)
            .await
            .map_err(bus_error)?
            .map_err(bad)?;
        let more = list.len() > limit;
        list.truncate(limit);
        // More below the last one; or the service read as many stored
        // incidents as one answer may before the page was full (it may
        // even be empty): go on from where it stopped.
        let next = if more {
            list.last().map(|i| i.number)
        } else {
            stopped
        }
        .map(|n| n.to_string());
        Ok::<_, Response>(ok(json!({"incidents": list, "next_cursor": next})))
    }
    .await;
    app.counted("api", r.unwrap_or_else(|e| e))
}

/// `GET /api/v1/incidents/{incident}` (number or id), with alerts and timeline.
pub(crate) async fn get_incident(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    Path(incident): Path<String>,
) -> Response {
    let r = async {
        auth(&app, &headers, false)?;
        let i = incident_ref(&incident)?;
        match ops::get_incident(&app, i, true).await.map_err(bus_error)? {
            Ok(d) => Ok(ok(d)),
            Err(reason) => Err(error(StatusCode::NOT_FOUND, "not_found", &reason)),
        }
    }
    .await;
    app.counted("api", r.unwrap_or_else(|e: Response| e))
}

/// The body of an action: a JSON object, or nothing.
fn body_object(bytes: &[u8]) -> Result<Map<String, Value>, Response> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(Map::new());
    }
    match serde_json::from_slice::<Value>(bytes) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(bad("body: expected a JSON object")),
        Err(e) => Err(bad(format!("body: not JSON ({e})"))),
    }
}

fn text_field(m: &Map<String, Value>, name: &str, required: bool) -> Result<String, Response> {
    match m.get(name) {
        None | Some(Value::Null) if !required => Ok(String::new()),
        None | Some(Value::Null) => Err(bad(format!("{name}: required"))),
        Some(Value::String(s)) if s.chars().count() > MAX_TEXT_CHARS => Err(bad(format!(
            "{name}: {} characters, at most {MAX_TEXT_CHARS}",
            s.chars().count()
        ))),
        Some(Value::String(s)) if required && s.trim().is_empty() => {
            Err(bad(format!("{name}: must not be empty")))
        }
        Some(Value::String(s)) => Ok(s.clone()),
        Some(_) => Err(bad(format!("{name}: must be a string"))),
    }
}

fn known_fields(m: &Map<String, Value>, allowed: &[&str]) -> Result<(), Response> {
    match m.keys().find(|k| !allowed.contains(&k.as_str())) {
        Some(k) => Err(bad(format!(
            "{k}: unknown field{}",
            if allowed.is_empty() {
                "; this action takes no body".to_string()
            } else {
                format!("; use {}", allowed.join(", "))
            }
        ))),
        None => Ok(()),
    }
}

/// The answer to a command.
fn outcome(r: Result<Outcome, ChatopsError>) -> Response {
    match r {
        Ok(Outcome::Accepted { message, incident }) => ok(json!({
            "status": "accepted", "message": message, "incident": incident
        })),
        Ok(Outcome::Rejected { reason }) => error(StatusCode::CONFLICT, "rejected", &reason),
        Err(ChatopsError::NoAnswer) => (
            StatusCode::ACCEPTED,
            Json(json!({"status": "pending",
                "message": "stored; the incidents service has not answered yet and applies it when it can"})),
        )
            .into_response(),
        Err(e) => bus_error(e),
    }
}

/// `POST /api/v1/incidents/{incident}/{action}`: ack, unack, resolve,
/// reopen, snooze `{"duration"}`, escalate `{"reason"}`, note `{"text"}`,
/// assign `{"user"}`.
pub(crate) async fn incident_action(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    Path((incident, action)): Path<(String, String)>,
    body: Body,
) -> Response {
    let r = async {
        let name = auth(&app, &headers, true)?;
        let incident = incident_ref(&incident)?;
        let bytes = http::read_body(&app, body).await?;
        let m = body_object(&bytes)?;
        let action = match action.as_str() {
            "ack" | "unack" | "resolve" | "reopen" => {
                known_fields(&m, &[])?;
                match action.as_str() {
                    "ack" => Action::Ack { incident },
                    "unack" => Action::Unack { incident },
                    "resolve" => Action::Resolve { incident },
                    _ => Action::Reopen { incident },
                }
            }
            "snooze" => {
                known_fields(&m, &["duration"])?;
                let d = text_field(&m, "duration", true)?;
                let d = parse::duration(&d).map_err(|e| bad(format!("duration: {e}")))?;
                if d.is_zero() || d > parse::MAX_SNOOZE {
                    return Err(bad("duration: between 1s and 7d"));
                }
                Action::Snooze {
                    incident,
                    seconds: d.as_secs().max(1),
                }
            }
            "escalate" => {
                known_fields(&m, &["reason"])?;
                Action::Escalate {
                    incident,
                    reason: text_field(&m, "reason", false)?,
                }
            }
            "note" => {
                known_fields(&m, &["text"])?;
                Action::Note {
                    incident,
                    text: text_field(&m, "text", true)?,
                }
            }
            "assign" => {
                known_fields(&m, &["user"])?;
                let user = text_field(&m, "user", true)?;
                if user.len() > 128 {
                    return Err(bad("user: at most 128 bytes"));
                }
                Action::Assign { incident, user }
            }
            other => {
                return Err(error(
                    StatusCode::NOT_FOUND,
                    "not_found",
                    &format!("action {other:?}: use ack, unack, resolve, reopen, snooze, escalate, note or assign"),
                ))
            }
        };
        Ok(outcome(
            ops::command(&app, Actor::new(name, "api"), action).await,
        ))
    }
    .await;
    app.counted("api", r.unwrap_or_else(|e: Response| e))
}

/// `GET /api/v1/silences`
pub(crate) async fn list_silences(State(app): State<Arc<App>>, headers: HeaderMap) -> Response {
    let r = async {
        auth(&app, &headers, false)?;
        match app
            .bus
            .query::<_, QueryReply>(query::LIST_SILENCES, &Map::new())
            .await
            .map_err(bus_error)?
        {
            QueryReply::Silences { silences, omitted } => {
                Ok(ok(json!({ "silences": silences, "omitted": omitted })))
            }
            QueryReply::Error { reason } => Err(error(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                &reason,
            )),
            _ => Err(error(
                StatusCode::BAD_GATEWAY,
                "unexpected",
                "unexpected answer",
            )),
        }
    }
    .await;
    app.counted("api", r.unwrap_or_else(|e: Response| e))
}

/// `POST /api/v1/silences` `{"matchers": ["service=payments"], "duration": "2h", "comment": "…"}`
pub(crate) async fn create_silence(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let r = async {
        let name = auth(&app, &headers, true)?;
        let bytes = http::read_body(&app, body).await?;
        let m = body_object(&bytes)?;
        known_fields(&m, &["matchers", "duration", "comment"])?;
        let Some(Value::Array(raw)) = m.get("matchers") else {
            return Err(bad(
                "matchers: required, a list of strings such as \"service=payments\"",
            ));
        };
        let mut matchers = Vec::new();
        for (k, v) in raw.iter().enumerate() {
            let Value::String(s) = v else {
                return Err(bad(format!("matchers[{k}]: must be a string")));
            };
            matchers.push(parse::parse_matcher(s).map_err(|e| bad(format!("matchers[{k}]: {e}")))?);
        }
        parse::check_matchers(&matchers).map_err(|e| bad(format!("matchers: {e}")))?;
        let d = text_field(&m, "duration", true)?;
        let seconds = parse::silence_duration(&d).map_err(|e| bad(format!("duration: {e}")))?;
        let comment = text_field(&m, "comment", false)?;
        let now = app.bus.now();
        let silence = Silence {
            id: uuid::Uuid::now_v7().to_string(),
            matchers,
            starts_at: now,
            ends_at: now
                .checked_add(jiff::SignedDuration::from_secs(seconds as i64))
                .unwrap_or(now),
            created_by: name.clone(),
            comment,
            recurrence: None,
        };
        let id = silence.id.clone();
        let r = ops::command(
            &app,
            Actor::new(name, "api"),
            Action::CreateSilence {
                silence: silence.clone(),
            },
        )
        .await;
        Ok(match r {
            Ok(Outcome::Accepted { .. }) => (
                StatusCode::CREATED,
                Json(json!({"id": id, "silence": silence})),
            )
                .into_response(),
            other => outcome(other),
        })
    }
    .await;
    app.counted("api", r.unwrap_or_else(|e: Response| e))
}

/// `DELETE /api/v1/silences/{id}`: expires it now.
pub(crate) async fn expire_silence(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    let r = async {
        let name = auth(&app, &headers, true)?;
        if !tocsin_proto::subjects::is_valid_token(&id) {
            return Err(bad("id: 1-64 letters, digits, - or _"));
        }
        Ok(outcome(
            ops::command(&app, Actor::new(name, "api"), Action::ExpireSilence { id }).await,
        ))
    }
    .await;
    app.counted("api", r.unwrap_or_else(|e: Response| e))
}

fn at_param(p: &[(String, String)]) -> Result<Option<jiff::Timestamp>, Response> {
    one(p, "at")
        .map(|s| {
            s.parse::<jiff::Timestamp>()
                .map_err(|_| bad("at: an RFC 3339 time, e.g. 2026-12-24T20:00:00Z"))
        })
        .transpose()
}

/// `GET /api/v1/oncall?at=`: every schedule.
pub(crate) async fn oncall_all(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
) -> Response {
    let r = async {
        auth(&app, &headers, false)?;
        let p = params(raw)?;
        only(&p, &["at"])?;
        let at = at_param(&p)?;
        let names = ops::schedules(&app).await.map_err(bus_error)?;
        let mut out = Vec::new();
        for n in names.iter().take(100) {
            match ops::oncall(&app, n, at).await.map_err(bus_error)? {
                Ok(v) => out.push(serde_json::to_value(v).unwrap_or_default()),
                Err(reason) => out.push(json!({"schedule": n, "error": reason})),
            }
        }
        Ok(ok(json!({ "oncall": out })))
    }
    .await;
    app.counted("api", r.unwrap_or_else(|e: Response| e))
}

/// `GET /api/v1/oncall/{schedule}?at=`: who now (or at T), until when, and next.
pub(crate) async fn oncall_one(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    Path(schedule): Path<String>,
    RawQuery(raw): RawQuery,
) -> Response {
    let r = async {
        auth(&app, &headers, false)?;
        let p = params(raw)?;
        only(&p, &["at"])?;
        let at = at_param(&p)?;
        match ops::oncall(&app, &schedule, at).await.map_err(bus_error)? {
            Ok(v) => Ok(ok(v)),
            Err(reason) => Err(error(StatusCode::NOT_FOUND, "not_found", &reason)),
        }
    }
    .await;
    app.counted("api", r.unwrap_or_else(|e: Response| e))
}

/// `GET /api/v1/schedules`
pub(crate) async fn schedules(State(app): State<Arc<App>>, headers: HeaderMap) -> Response {
    let r = async {
        auth(&app, &headers, false)?;
        let s = ops::schedules(&app).await.map_err(bus_error)?;
        Ok(ok(json!({ "schedules": s })))
    }
    .await;
    app.counted("api", r.unwrap_or_else(|e: Response| e))
}

/// `GET /api/v1/report?since=30d`
pub(crate) async fn report(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
) -> Response {
    let r = async {
        auth(&app, &headers, false)?;
        let p = params(raw)?;
        only(&p, &["since"])?;
        let since = parse::duration(one(&p, "since").unwrap_or("30d"))
            .map_err(|e| bad(format!("since: {e}")))?;
        if since > std::time::Duration::from_secs(400 * 86_400) {
            return Err(bad("since: at most 400d (the INCIDENTS stream's age)"));
        }
        match crate::report::build(&app, since.as_secs()).await {
            tocsin_proto::query::ReportReply::Report(r) => Ok(ok(r)),
            tocsin_proto::query::ReportReply::Error { reason } => Err(error(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                &reason,
            )),
        }
    }
    .await;
    app.counted("api", r.unwrap_or_else(|e: Response| e))
}
