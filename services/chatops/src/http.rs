//! Routes and what every handler shares: the state, bounded body reads,
//! JSON errors, the follow-up poster.

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use axum::{
    body::{Body, Bytes},
    http::{HeaderMap, StatusCode},
    response::{IntoResponse, Response},
    routing::{delete, get, post},
    Router,
};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use serde_json::{json, Value};
use tokio_util::task::TaskTracker;

use crate::{
    bus::Bus,
    config::{ChatUser, ChatopsConfig},
    events::{ChatopsEvent, ChatopsMetrics},
};

pub(crate) struct App {
    pub cfg: ChatopsConfig,
    pub bus: Bus,
    pub metrics: ChatopsMetrics,
    /// For Slack `response_url` follow-ups (never the Web API: that is the
    /// notifier's, with its token).
    pub http: reqwest::Client,
    /// Follow-ups in flight; awaited at shutdown.
    pub tasks: TaskTracker,
    /// Work that outlives its request (button presses, slow slash
    /// commands), at most [`MAX_BACKGROUND`] at once.
    pub background: Arc<tokio::sync::Semaphore>,
    /// The last `/status.json` and when it was made.
    pub status_cache: Mutex<Option<(Instant, Bytes)>>,
}

impl App {
    pub(crate) fn user_by_slack(&self, id: &str) -> Option<&ChatUser> {
        self.cfg
            .users
            .iter()
            .find(|u| u.slack.as_deref() == Some(id))
    }

    pub(crate) fn user_by_phone(&self, phone: &str) -> Option<&ChatUser> {
        let norm = |p: &str| {
            p.chars()
                .filter(|c| c.is_ascii_digit() || *c == '+')
                .collect::<String>()
        };
        let want = norm(phone);
        self.cfg
            .users
            .iter()
            .find(|u| u.phone.as_deref().map(norm).as_deref() == Some(want.as_str()))
    }

    pub(crate) fn user_by_name(&self, name: &str) -> Option<&ChatUser> {
        self.cfg.users.iter().find(|u| u.name == name)
    }

    /// Counts a request's answer.
    pub(crate) fn counted(&self, endpoint: &'static str, r: Response) -> Response {
        ChatopsEvent::Request {
            endpoint,
            status: r.status().as_u16(),
        }
        .emit(&self.metrics);
        r
    }

    /// Posts `body` to a Slack `response_url`, if it is one of the allowed
    /// prefixes; bounded by the client's timeout.
    pub(crate) async fn follow_up(&self, url: &str, body: Value) {
        let allowed = self.cfg.slack.as_ref().is_some_and(|s| {
            s.response_url_prefixes
                .iter()
                .any(|p| url.starts_with(p.as_str()))
        });
        if !allowed {
            ChatopsEvent::FollowUp {
                ok: false,
                detail:
                    "response_url is not under chatops.slack.response_url_prefixes; not followed",
            }
            .emit(&self.metrics);
            return;
        }
        let r = self.http.post(url).json(&body).send().await;
        let detail = match &r {
            Ok(resp) if resp.status().is_success() => None,
            Ok(resp) => Some(format!("HTTP {}", resp.status())),
            Err(e) => Some(e.to_string()),
        };
        ChatopsEvent::FollowUp {
            ok: detail.is_none(),
            detail: detail.as_deref().unwrap_or(""),
        }
        .emit(&self.metrics);
    }
}

pub(crate) fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/slack/actions", post(crate::slack::actions))
        .route("/slack/commands", post(crate::slack::command))
        .route("/twilio/sms", post(crate::sms::inbound))
        .route("/status.json", get(crate::status::status_json))
        .route("/api/v1/incidents", get(crate::api::list_incidents))
        .route(
            "/api/v1/incidents/{incident}",
            get(crate::api::get_incident),
        )
        .route(
            "/api/v1/incidents/{incident}/{action}",
            post(crate::api::incident_action),
        )
        .route(
            "/api/v1/silences",
            get(crate::api::list_silences).post(crate::api::create_silence),
        )
        .route("/api/v1/silences/{id}", delete(crate::api::expire_silence))
        .route("/api/v1/oncall", get(crate::api::oncall_all))
        .route("/api/v1/oncall/{schedule}", get(crate::api::oncall_one))
        .route("/api/v1/schedules", get(crate::api::schedules))
        .route("/api/v1/report", get(crate::api::report))
        .fallback(not_found)
        .with_state(app)
}

async fn not_found() -> Response {
    error(
        StatusCode::NOT_FOUND,
        "no_such_endpoint",
        "no such endpoint; see the OpenAPI file (services/chatops/openapi.yaml)",
    )
}

/// Every route of [`router`] as (method, path) in OpenAPI's path syntax;
/// keep in step with it. A test checks that each answers and that
/// `openapi.yaml` documents exactly the `/api/v1` ones and `/status.json`.
pub const ROUTES: &[(&str, &str)] = &[
    ("post", "/slack/actions"),
    ("post", "/slack/commands"),
    ("post", "/twilio/sms"),
    ("get", "/status.json"),
    ("get", "/api/v1/incidents"),
    ("get", "/api/v1/incidents/{incident}"),
    ("post", "/api/v1/incidents/{incident}/ack"),
    ("post", "/api/v1/incidents/{incident}/unack"),
    ("post", "/api/v1/incidents/{incident}/resolve"),
    ("post", "/api/v1/incidents/{incident}/reopen"),
    ("post", "/api/v1/incidents/{incident}/snooze"),
    ("post", "/api/v1/incidents/{incident}/escalate"),
    ("post", "/api/v1/incidents/{incident}/note"),
    ("post", "/api/v1/incidents/{incident}/assign"),
    ("get", "/api/v1/silences"),
    ("post", "/api/v1/silences"),
    ("delete", "/api/v1/silences/{id}"),
    ("get", "/api/v1/oncall"),
    ("get", "/api/v1/oncall/{schedule}"),
    ("get", "/api/v1/schedules"),
    ("get", "/api/v1/report"),
];

/// A JSON error: `{"error": code, "reason": …}`.
pub(crate) fn error(status: StatusCode, code: &str, reason: &str) -> Response {
    (
        status,
        axum::Json(json!({"status": "error", "error": code, "reason": reason})),
    )
        .into_response()
}

/// Reads a body of at most `chatops.max_body_bytes` within
/// `chatops.body_read_timeout`.
pub(crate) async fn read_body(app: &App, body: Body) -> Result<Bytes, Response> {
    let limited = Limited::new(body, app.cfg.max_body_bytes);
    match tokio::time::timeout(app.cfg.body_read_timeout.get(), limited.collect()).await {
        Err(_) => Err(error(
            StatusCode::REQUEST_TIMEOUT,
            "body_timeout",
            "the body did not arrive within chatops.body_read_timeout",
        )),
        Ok(Err(e)) if e.downcast_ref::<LengthLimitError>().is_some() => Err(error(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            &format!(
                "the body is over chatops.max_body_bytes ({} bytes)",
                app.cfg.max_body_bytes
            ),
        )),
        Ok(Err(e)) => Err(error(StatusCode::BAD_REQUEST, "bad_body", &e.to_string())),
        Ok(Ok(c)) => Ok(c.to_bytes()),
    }
}

pub(crate) fn header<'a>(h: &'a HeaderMap, name: &str) -> Option<&'a str> {
    h.get(name).and_then(|v| v.to_str().ok())
}

/// Form fields in order.
pub(crate) fn form(body: &[u8]) -> Vec<(String, String)> {
    form_urlencoded::parse(body).into_owned().collect()
}

pub(crate) fn field<'a>(f: &'a [(String, String)], name: &str) -> Option<&'a str> {
    f.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
}

/// Button presses and slow slash commands worked on after their request
/// was answered, at most; past it a press is answered 503 (Slack shows
/// the button failed) and a command "busy, try again".
pub(crate) const MAX_BACKGROUND: usize = 256;

/// How long a Slack answer may take in the request itself: Slack gives
/// up after 3 s, so anything slower goes through the `response_url`.
pub(crate) const SLACK_INLINE: Duration = Duration::from_millis(2_500);
