//! HTTP layer: routes, authentication, body limits, and the answer.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};
use tocsin_runtime::clock::Clock;

use axum::{
    body::Body,
    extract::{Path, State},
    http::{header, HeaderMap, HeaderValue, StatusCode},
    response::{IntoResponse, Response},
    routing::post,
    Json, Router,
};
use bytes::Bytes;
use http_body_util::{BodyExt, LengthLimitError, Limited};
use serde_json::json;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tocsin_proto::{Alert, Timestamp};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tracing::Instrument;

use crate::{
    config::{IngestConfig, Limits},
    error::Rejection,
    events::{IngestEvent, IngestMetrics},
    publish::{PublishError, Publisher, Stored},
    receivers::{alertmanager, generic, pagerduty},
};

pub(crate) struct AppState {
    tokens: Vec<(String, [u8; 32])>,
    max_body: usize,
    retry_after: u64,
    publisher: Publisher,
    metrics: IngestMetrics,
    limits: Limits,
    /// One permit per body byte held by requests in progress
    /// (`ingest.max_inflight_bytes`).
    inflight: Arc<Semaphore>,
    max_inflight: usize,
    body_timeout: Duration,
    /// The one clock: stamps each alert's receive time (and a missing
    /// `startsAt`).
    clock: Arc<dyn Clock>,
    /// Heartbeat names a ping may use (`None`: any).
    heartbeats: Option<Vec<String>>,
}

/// A request body and its share of `ingest.max_inflight_bytes`. The bytes
/// are dropped once parsed; the share is kept until the request is
/// answered, since the parsed and encoded alerts take its place.
struct HeldBody {
    bytes: Bytes,
    share: OwnedSemaphorePermit,
}

impl AppState {
    pub(crate) fn new(
        config: &IngestConfig,
        publisher: Publisher,
        metrics: IngestMetrics,
        clock: Arc<dyn Clock>,
    ) -> Self {
        AppState {
            clock,
            tokens: config
                .tokens
                .iter()
                .map(|t| (t.source.clone(), digest(t.token.expose())))
                .collect(),
            max_body: config.max_body_bytes,
            retry_after: config.retry_after.get().as_secs().max(1),
            publisher,
            metrics,
            limits: config.limits.clone(),
            inflight: Arc::new(Semaphore::new(config.max_inflight_bytes)),
            max_inflight: config.max_inflight_bytes,
            body_timeout: config.body_read_timeout.get(),
            heartbeats: config.heartbeats.clone(),
        }
    }

    /// The source name of the token, compared in constant time over all tokens.
    fn source_for(&self, presented: &str) -> Option<&str> {
        let d = digest(presented);
        let mut found = None;
        for (source, expected) in &self.tokens {
            if bool::from(expected.ct_eq(&d)) {
                found = Some(source.as_str());
            }
        }
        found
    }

    fn authenticate_bearer(&self, headers: &HeaderMap) -> Result<&str, Rejection> {
        let value = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| {
                Rejection::unauthorized(
                    "missing bearer token: send `Authorization: Bearer <token>` with a token from ingest.tokens",
                )
            })?;
        // The scheme is case-insensitive (RFC 9110, 11.1): `BEARER x` is valid.
        let token = value
            .trim()
            .split_once([' ', '\t'])
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, token)| token.trim())
            .filter(|token| !token.is_empty())
            .ok_or_else(|| {
                Rejection::unauthorized("the Authorization header must be `Bearer <token>`")
            })?;
        self.source_for(token)
            .ok_or_else(|| Rejection::unauthorized("the bearer token is not valid"))
    }

    /// Reads the body within `ingest.body_read_timeout`, holding its size
    /// against `ingest.max_inflight_bytes` until the request is answered.
    async fn read_body(&self, headers: &HeaderMap, body: Body) -> Result<HeldBody, Rejection> {
        let too_large = || {
            Rejection::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "too_large",
                format!(
                    "request body is larger than {} bytes (ingest.max_body_bytes); send fewer alerts per request or raise the limit",
                    self.max_body
                ),
            )
        };
        let declared = headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > self.max_body as u64) {
            return Err(too_large());
        }
        // A body of unknown length may be as large as max_body_bytes: hold
        // that much until it is read, then give back what it did not use.
        let reserved = declared.map_or(self.max_body, |n| n as usize);
        let mut permit = u32::try_from(reserved)
            .ok()
            .and_then(|n| self.inflight.clone().try_acquire_many_owned(n).ok())
            .ok_or_else(|| {
                let mut r = Rejection::unavailable(
                    format!(
                        "ingest is busy: requests holding its {} bytes of ingest.max_inflight_bytes are \
                         being processed; retry after the Retry-After delay",
                        self.max_inflight
                    ),
                    self.retry_after,
                );
                r.code = "overloaded";
                r
            })?;
        let collected = tokio::time::timeout(
            self.body_timeout,
            Limited::new(body, self.max_body).collect(),
        )
        .await
        .map_err(|_| {
            Rejection::new(
                StatusCode::REQUEST_TIMEOUT,
                "timeout",
                format!(
                    "the request body did not arrive within {:?} (ingest.body_read_timeout); \
                     send it faster or in smaller requests",
                    self.body_timeout
                ),
            )
        })?;
        let bytes = match collected {
            Ok(collected) => collected.to_bytes(),
            Err(e) if e.downcast_ref::<LengthLimitError>().is_some() => return Err(too_large()),
            Err(e) => {
                return Err(Rejection::invalid(format!(
                    "cannot read the request body: {e}"
                )))
            }
        };
        if let Some(unused) = reserved.checked_sub(bytes.len()).filter(|n| *n > 0) {
            drop(permit.split(unused));
        }
        Ok(HeldBody {
            bytes,
            share: permit,
        })
    }

    async fn store(
        &self,
        source: &str,
        received_at: Timestamp,
        traceparent: &str,
        alerts: Vec<Alert>,
        what: &str,
    ) -> Result<Stored, Rejection> {
        self.publisher
            .publish(source, received_at, traceparent, alerts, what)
            .await
            .map_err(|e| match e {
                PublishError::Encode(e) => Rejection::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal",
                    format!("cannot encode alert: {e}"),
                ),
                // No retry can store it: a 4xx, so the sender stops trying.
                PublishError::TooLarge(reason) => Rejection::too_large(reason),
                other => Rejection::unavailable(
                    format!(
                        "alerts not stored: {other}; retry later (alerts already stored are not applied twice)"
                    ),
                    self.retry_after,
                ),
            })
    }
}

fn digest(s: &str) -> [u8; 32] {
    Sha256::digest(s.as_bytes()).into()
}

/// A W3C traceparent: the caller's if it is well-formed, else a new one.
fn traceparent(headers: &HeaderMap) -> String {
    if let Some(tp) = headers.get("traceparent").and_then(|v| v.to_str().ok()) {
        let parts: Vec<&str> = tp.split('-').collect();
        let hex = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_hexdigit());
        if parts.len() == 4
            && hex(parts[0], 2)
            && hex(parts[1], 32)
            && hex(parts[2], 16)
            && hex(parts[3], 2)
        {
            return tp.to_ascii_lowercase();
        }
    }
    let trace = uuid::Uuid::new_v4().simple().to_string();
    let span = uuid::Uuid::new_v4().simple().to_string();
    format!("00-{trace}-{}-01", &span[..16])
}

pub(crate) fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/api/v1/alerts/alertmanager", post(alertmanager_handler))
        .route("/v2/enqueue", post(pagerduty_handler))
        .route("/v2/change/enqueue", post(pagerduty_change_handler))
        .route("/api/v1/alerts", post(generic_handler))
        .route("/api/v1/heartbeat/{name}", post(heartbeat_handler))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state)
}

/// Every endpoint takes POST only.
async fn method_not_allowed(method: axum::http::Method) -> Response {
    let mut resp = Rejection::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        format!("{method} is not accepted here; send the alerts with POST"),
    )
    .into_response();
    resp.headers_mut()
        .insert(header::ALLOW, HeaderValue::from_static("POST"));
    resp
}

async fn not_found() -> Response {
    Rejection::new(
        StatusCode::NOT_FOUND,
        "not_found",
        "no such endpoint; Tocsin ingest serves POST /api/v1/alerts/alertmanager, POST /v2/enqueue, POST /v2/change/enqueue, POST /api/v1/alerts and POST /api/v1/heartbeat/<name>",
    )
    .into_response()
}

/// Runs one request through `work` and turns the outcome into the answer,
/// logging and counting it.
async fn handle<Fut>(s: &AppState, endpoint: &'static str, tp: &str, work: Fut) -> Response
where
    Fut: std::future::Future<Output = Result<(String, Stored, Response), Rejection>>,
{
    let span = tracing::info_span!("ingest", endpoint, traceparent = %tp);
    async move {
        let started = Instant::now();
        match work.await {
            Ok((source, stored, response)) => {
                IngestEvent::Accepted {
                    endpoint,
                    source: &source,
                    stored: stored.stored,
                    duplicates: stored.duplicates,
                    elapsed: started.elapsed(),
                }
                .emit(&s.metrics);
                response
            }
            Err(rejection) => {
                IngestEvent::Rejected {
                    endpoint,
                    code: rejection.code,
                    status: rejection.status.as_u16(),
                    reason: &rejection.reason,
                }
                .emit(&s.metrics);
                rejection.into_response()
            }
        }
    }
    .instrument(span)
    .await
}

async fn alertmanager_handler(
    State(s): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let tp = traceparent(&headers);
    handle(&s, "alertmanager", &tp, async {
        let source = s.authenticate_bearer(&headers)?.to_string();
        let HeldBody {
            bytes,
            share: _held,
        } = s.read_body(&headers, body).await?;
        let received_at = s.clock.now();
        let parsed = alertmanager::parse(&bytes, &s.limits)?;
        drop(bytes);
        if parsed.truncated > 0 {
            IngestEvent::Truncated {
                endpoint: "alertmanager",
                source: &source,
                count: parsed.truncated,
            }
            .emit(&s.metrics);
        }
        let stored = s
            .store(&source, received_at, &tp, parsed.alerts, "alerts")
            .await?;
        Ok((source, stored, accepted(stored)))
    })
    .await
}

async fn generic_handler(
    State(s): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let tp = traceparent(&headers);
    handle(&s, "generic", &tp, async {
        let source = s.authenticate_bearer(&headers)?.to_string();
        let HeldBody {
            bytes,
            share: _held,
        } = s.read_body(&headers, body).await?;
        let received_at = s.clock.now();
        let alerts = generic::parse(&bytes, received_at, &s.limits)?;
        drop(bytes);
        let stored = s.store(&source, received_at, &tp, alerts, "alerts").await?;
        Ok((source, stored, accepted(stored)))
    })
    .await
}

/// Who sent a PagerDuty-style request: the bearer token if there is an
/// Authorization header, else the `routing_key` in the body (as at
/// PagerDuty). `shape_errors` says what is wrong with a body that has no
/// usable routing key at all.
fn pagerduty_source(
    s: &AppState,
    headers: &HeaderMap,
    bytes: &[u8],
    shape_errors: impl FnOnce() -> Vec<String>,
) -> Result<String, Rejection> {
    let pd = Rejection::in_pagerduty_shape;
    if headers.contains_key(header::AUTHORIZATION) {
        return Ok(s.authenticate_bearer(headers).map_err(pd)?.to_string());
    }
    match pagerduty::routing_key(bytes) {
        Some(key) => Ok(s
            .source_for(&key)
            .ok_or_else(|| {
                pd(Rejection::unauthorized(
                    "'routing_key' is not a known integration key (it must equal one of ingest.tokens)",
                ))
            })?
            .to_string()),
        // Unauthenticated: say what is wrong with the event shape first
        // when it is not even an event.
        None => {
            let mut errors = shape_errors();
            if errors.is_empty() {
                errors.push("'routing_key' is missing or blank".to_string());
            }
            Err(Rejection::pagerduty_invalid(errors))
        }
    }
}

async fn pagerduty_handler(
    State(s): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let tp = traceparent(&headers);
    handle(&s, "pagerduty", &tp, async {
        let pd = Rejection::in_pagerduty_shape;
        let HeldBody {
            bytes,
            share: _held,
        } = s.read_body(&headers, body).await.map_err(pd)?;
        let bytes = &bytes;
        let source = pagerduty_source(&s, &headers, bytes, || {
            pagerduty::parse(bytes, "", s.clock.now(), &s.limits, String::new)
                .err()
                .unwrap_or_default()
        })?;
        let received_at = s.clock.now();
        let parsed = pagerduty::parse(bytes, &source, received_at, &s.limits, || {
            uuid::Uuid::new_v4().simple().to_string()
        })
        .map_err(Rejection::pagerduty_invalid)?;
        let dedup_key = parsed.dedup_key.clone();
        let stored = s
            .store(&source, received_at, &tp, vec![parsed.alert], "event")
            .await
            .map_err(pd)?;
        let response = (
            StatusCode::ACCEPTED,
            Json(
                json!({"status": "success", "message": "Event processed", "dedup_key": dedup_key}),
            ),
        )
            .into_response();
        Ok((source, stored, response))
    })
    .await
}

/// PagerDuty change events (deploys, builds): recorded as `info` alerts
/// that end by themselves; answered 202 like PagerDuty.
async fn pagerduty_change_handler(
    State(s): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let tp = traceparent(&headers);
    handle(&s, "pagerduty_change", &tp, async {
        let pd = Rejection::in_pagerduty_shape;
        let HeldBody {
            bytes,
            share: _held,
        } = s.read_body(&headers, body).await.map_err(pd)?;
        let bytes = &bytes;
        let source = pagerduty_source(&s, &headers, bytes, || {
            pagerduty::parse_change(bytes, "", s.clock.now(), &s.limits)
                .err()
                .unwrap_or_default()
        })?;
        let received_at = s.clock.now();
        let alert = pagerduty::parse_change(bytes, &source, received_at, &s.limits)
            .map_err(Rejection::pagerduty_invalid)?;
        let stored = s
            .store(&source, received_at, &tp, vec![alert], "event")
            .await
            .map_err(pd)?;
        let response = (
            StatusCode::ACCEPTED,
            Json(json!({"status": "success", "message": "Change event processed"})),
        )
            .into_response();
        Ok((source, stored, response))
    })
    .await
}

/// A dead-man's-switch ping: the incidents service expects one per
/// configured interval and opens an incident when it is missed.
async fn heartbeat_handler(
    State(s): State<Arc<AppState>>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Response {
    let tp = traceparent(&headers);
    handle(&s, "heartbeat", &tp, async {
        let source = s.authenticate_bearer(&headers)?.to_string();
        if !tocsin_proto::subjects::is_valid_token(&name) {
            return Err(Rejection::invalid(format!(
                "heartbeat name {name:?} is not valid; use 1-64 letters, digits, - or _"
            )));
        }
        if let Some(known) = &s.heartbeats {
            if !known.contains(&name) {
                let configured = if known.is_empty() {
                    "none are configured".to_string()
                } else {
                    format!("configured: {}", known.join(", "))
                };
                return Err(Rejection::new(
                    StatusCode::NOT_FOUND,
                    "unknown_heartbeat",
                    format!(
                        "no heartbeat {name:?} under incidents.heartbeats ({configured}); \
                         a ping for it would never be checked"
                    ),
                ));
            }
        }
        let received_at = s.clock.now();
        let alert = heartbeat_ping(&name, received_at);
        let stored = s
            .store(&source, received_at, &tp, vec![alert], "heartbeat")
            .await?;
        Ok((source, stored, accepted(stored)))
    })
    .await
}

fn heartbeat_ping(name: &str, at: Timestamp) -> Alert {
    let labels: tocsin_proto::Labels = [
        ("alertname".to_string(), "HeartbeatPing".to_string()),
        ("heartbeat".to_string(), name.to_string()),
    ]
    .into();
    Alert {
        fingerprint: tocsin_proto::Fingerprint::from_labels(&labels),
        status: tocsin_proto::AlertStatus::Resolved,
        labels,
        annotations: Default::default(),
        starts_at: at,
        ends_at: Some(at),
        generator_url: None,
        dedup_key: None,
        origin: tocsin_proto::Origin {
            kind: Some(tocsin_proto::SourceKind::Heartbeat),
            ..Default::default()
        },
    }
}

fn accepted(stored: Stored) -> Response {
    (
        StatusCode::OK,
        Json(json!({
            "status": "success",
            "stored": stored.stored,
            "duplicates": stored.duplicates,
        })),
    )
        .into_response()
}
