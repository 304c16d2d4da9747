//! Errors: start-up failures ([`IngestError`]) and request rejections ([`Rejection`]).

use axum::{
    http::{header, HeaderValue, StatusCode},
    response::{IntoResponse, Response},
    Json,
};
use serde_json::json;

/// Why the ingest service could not run.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    /// Started without a listener: bind `ingest.listen` first.
    #[error("{0}")]
    Listen(String),
    /// The HTTP server failed (the listener broke).
    #[error("ingest HTTP server on {addr}: {source}")]
    Serve {
        addr: String,
        source: std::io::Error,
    },
}

/// What a rejected request is told. Every rejection names the problem and,
/// where there is one, the fix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub status: StatusCode,
    /// Stable, low-cardinality code (also the metric label).
    pub code: &'static str,
    pub reason: String,
    /// Seconds, for 503s.
    pub retry_after: Option<u64>,
    /// Answer in PagerDuty's error shape (for `/v2/enqueue`).
    pub pagerduty: bool,
    /// All problems found (PagerDuty reports several at once).
    pub errors: Vec<String>,
}

impl Rejection {
    pub fn new(status: StatusCode, code: &'static str, reason: impl Into<String>) -> Self {
        let reason = reason.into();
        Rejection {
            status,
            code,
            errors: vec![reason.clone()],
            reason,
            retry_after: None,
            pagerduty: false,
        }
    }

    pub fn invalid(reason: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_payload", reason)
    }

    pub fn unauthorized(reason: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "unauthorized", reason)
    }

    pub fn unavailable(reason: impl Into<String>, retry_after: u64) -> Self {
        let mut r = Self::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", reason);
        r.retry_after = Some(retry_after);
        r
    }

    /// A request with more alerts than `ingest.limits.alerts_per_request`.
    /// `hint` names the sender's own setting, where it has one.
    pub fn too_many_alerts(count: usize, limit: usize, hint: &str) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_many_alerts",
            format!(
                "{count} alerts in one request, the limit is {limit} (ingest.limits.alerts_per_request); \
                 send fewer per request ({hint}) or raise the limit"
            ),
        )
    }

    /// Something in the request that could never be stored, however often
    /// it is retried (an alert over the size the bus or the config allows).
    pub fn too_large(reason: impl Into<String>) -> Self {
        Self::new(StatusCode::PAYLOAD_TOO_LARGE, "too_large", reason)
    }

    /// A PagerDuty-shaped 400 listing every problem found.
    pub fn pagerduty_invalid(errors: Vec<String>) -> Self {
        Rejection {
            status: StatusCode::BAD_REQUEST,
            code: "invalid_event",
            reason: errors.join("; "),
            retry_after: None,
            pagerduty: true,
            errors,
        }
    }

    pub fn in_pagerduty_shape(mut self) -> Self {
        self.pagerduty = true;
        self
    }
}

impl IntoResponse for Rejection {
    fn into_response(self) -> Response {
        let body = if self.pagerduty {
            let (status, message) = match self.status {
                StatusCode::BAD_REQUEST => ("invalid event", "Event object is invalid"),
                StatusCode::UNAUTHORIZED => ("unauthorized", "Routing key or token is not valid"),
                StatusCode::PAYLOAD_TOO_LARGE => ("invalid event", "Event object is too large"),
                StatusCode::SERVICE_UNAVAILABLE => ("unavailable", "Try again later"),
                _ => ("error", "Event was not processed"),
            };
            json!({ "status": status, "message": message, "errors": self.errors })
        } else {
            json!({ "status": "error", "error": self.code, "reason": self.reason })
        };
        let mut resp = (self.status, Json(body)).into_response();
        if let Some(secs) = self.retry_after {
            if let Ok(v) = HeaderValue::from_str(&secs.to_string()) {
                resp.headers_mut().insert(header::RETRY_AFTER, v);
            }
        }
        resp
    }
}
