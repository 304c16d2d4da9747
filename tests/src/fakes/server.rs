//! The plumbing every fake shares: the axum server and its routes, the
//! recorded state, and the request pipeline (count, injected failure,
//! provider handler, record).

use std::{
    collections::{HashMap, VecDeque},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex, MutexGuard,
    },
    time::Instant,
};

use axum::{
    extract::{DefaultBodyLimit, Path, State},
    http::{HeaderMap, HeaderValue, Method, StatusCode, Uri},
    response::{IntoResponse, Response},
    routing::{any, post},
    Router,
};
use bytes::Bytes;
use serde_json::{Map, Value};

use super::{
    pagerduty,
    ratelimit::{self, Limiter},
    slack, twilio, webhook, Failure, Outcome, Provider, Rejected, RequestRecord,
};

pub(super) struct Shared {
    records: Mutex<Records>,
    /// Outside `records` so that answers given against a scratch copy
    /// (hung requests) never hand out a `ts` a later message gets too.
    last_ts_micros: AtomicU64,
    /// Requests that have arrived, per provider, counted before any
    /// injected delay (a slow request is "started" while it waits).
    pub(super) started: Mutex<std::collections::HashMap<Provider, usize>>,
}

impl Shared {
    pub(super) fn new() -> Shared {
        Shared {
            records: Mutex::new(Records::default()),
            last_ts_micros: AtomicU64::new(0),
            started: Mutex::new(Default::default()),
        }
    }

    pub(super) fn lock(&self) -> MutexGuard<'_, Records> {
        self.records.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A Slack `ts` from the wall clock, strictly increasing.
    pub(super) fn next_ts(&self) -> String {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_micros() as u64)
            .unwrap_or(0);
        let mut last = self.last_ts_micros.load(Ordering::SeqCst);
        loop {
            let next = now.max(last + 1);
            match self.last_ts_micros.compare_exchange(
                last,
                next,
                Ordering::SeqCst,
                Ordering::SeqCst,
            ) {
                Ok(_) => return format!("{}.{:06}", next / 1_000_000, next % 1_000_000),
                Err(seen) => last = seen,
            }
        }
    }
}

/// Everything the fakes recorded; one lock, so that a handler sees and
/// changes one consistent state. `Clone` for the scratch copy a hung
/// request is answered against.
#[derive(Clone, Default)]
pub(super) struct Records {
    pub failures: HashMap<Provider, VecDeque<Failure>>,
    /// Rate limits in force, by provider and operation.
    pub limits: HashMap<(Provider, String), Arc<Limiter>>,
    pub requests: HashMap<Provider, usize>,
    pub timeline: Vec<RequestRecord>,
    pub rejected: Vec<Rejected>,
    pub slack: slack::State,
    pub pagerduty: pagerduty::State,
    pub twilio: twilio::State,
    pub webhook: webhook::State,
}

/// A request as the handlers see it.
#[derive(Clone)]
pub(super) struct Req {
    pub method: Method,
    /// The route's path parameter: Slack method, Twilio account sid,
    /// webhook name, or the Slack incoming webhook's `T…/B…/…` path.
    pub param: String,
    pub query: String,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Req {
    fn new(method: Method, param: String, uri: &Uri, headers: HeaderMap, body: Bytes) -> Req {
        Req {
            method,
            param,
            query: uri.query().unwrap_or("").to_string(),
            headers,
            body,
        }
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The media type of `Content-Type`, lowercased, without parameters.
    pub fn media_type(&self) -> Option<String> {
        self.header("content-type").map(|ct| {
            ct.split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase()
        })
    }
}

/// A handler's answer.
pub(super) struct Reply {
    pub status: u16,
    pub content_type: Option<&'static str>,
    pub body: String,
    pub headers: Vec<(&'static str, String)>,
    /// Recorded in `rejected` (Slack answers its errors with 200).
    pub error: bool,
    /// Refused by a rate limit.
    pub rate_limited: bool,
}

impl Reply {
    pub fn json(status: u16, v: Value) -> Reply {
        Reply {
            status,
            content_type: Some("application/json; charset=utf-8"),
            body: v.to_string(),
            headers: vec![],
            error: status >= 400,
            rate_limited: false,
        }
    }

    pub fn text(status: u16, s: &str) -> Reply {
        Reply {
            status,
            content_type: Some("text/plain; charset=utf-8"),
            body: s.to_string(),
            headers: vec![],
            error: status >= 400,
            rate_limited: false,
        }
    }

    pub fn empty(status: u16) -> Reply {
        Reply {
            status,
            content_type: None,
            body: String::new(),
            headers: vec![],
            error: status >= 400,
            rate_limited: false,
        }
    }

    /// Marks the answer as an error whatever its status.
    pub fn failed(mut self) -> Reply {
        self.error = true;
        self
    }

    /// Marks the answer as a rate limit's refusal.
    pub fn throttled(mut self) -> Reply {
        self.error = true;
        self.rate_limited = true;
        self
    }

    pub fn with_header(mut self, name: &'static str, value: String) -> Reply {
        self.headers.push((name, value));
        self
    }

    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut resp = (status, self.body).into_response();
        let h = resp.headers_mut();
        h.remove("content-type");
        if let Some(ct) = self.content_type {
            h.insert("content-type", HeaderValue::from_static(ct));
        }
        for (name, value) in self.headers {
            if let Ok(v) = HeaderValue::from_str(&value) {
                h.insert(name, v);
            }
        }
        resp
    }
}

/// What a provider handler works with.
pub(super) struct Ctx<'a> {
    pub shared: &'a Shared,
    pub rec: &'a mut Records,
    pub req: &'a Req,
    provider: Provider,
    operation: &'a str,
    destination: &'a str,
    /// Answering against a scratch copy: rate limits are not consulted.
    scratch: bool,
}

impl Ctx<'_> {
    /// `Some(Retry-After value)` if the rate limit set for this request's
    /// provider and operation refuses it now; otherwise the request takes
    /// a token and goes on. Providers call this where their real
    /// counterpart enforces its limit.
    pub fn throttled(&self) -> Option<String> {
        if self.scratch {
            return None;
        }
        let limiter = self
            .rec
            .limits
            .get(&(self.provider, self.operation.to_string()))?;
        limiter
            .take(self.destination)
            .err()
            .map(ratelimit::retry_after)
    }
}

/// What a request is (the provider's operation) and where it goes (its
/// destination), read from the request alone so that it is known for
/// injected failures too.
fn describe(provider: Provider, req: &Req) -> (String, String) {
    match provider {
        Provider::Slack => slack::describe_api(req),
        Provider::SlackWebhook => ("POST".into(), req.param.clone()),
        Provider::SlackResponse => ("POST".into(), req.param.clone()),
        Provider::PagerDuty => ("POST".into(), pagerduty::describe(req)),
        Provider::Twilio => (req.method.as_str().into(), twilio::describe(req)),
        Provider::Webhook => ("POST".into(), req.param.clone()),
    }
}

type Handler = fn(&mut Ctx<'_>) -> Reply;

/// The routes of every fake, on one server.
pub(super) fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/slack/api/{method}", any(slack_api))
        .route("/slack/services/{a}/{b}/{c}", post(slack_webhook))
        .route("/slack/actions/{a}/{b}/{c}", post(slack_response))
        .route("/pagerduty/v2/enqueue", post(pagerduty_enqueue))
        .route(
            "/twilio/2010-04-01/Accounts/{sid}/Messages.json",
            any(twilio_messages),
        )
        .route("/hooks/{name}", post(webhook_receiver))
        .layer(DefaultBodyLimit::max(64 << 20))
        .with_state(shared)
}

/// Counts the request and notes it in the timeline; applies an injected
/// failure if one is queued, else runs `handler`; records an error answer
/// in `rejected`.
async fn handle(shared: Arc<Shared>, provider: Provider, req: Req, handler: Handler) -> Response {
    *shared
        .started
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .entry(provider)
        .or_default() += 1;
    // A slow answer: wait first, then answer (and record) as usual.
    let delay = {
        let mut rec = shared.lock();
        match rec.failures.get(&provider).and_then(|q| q.front()) {
            Some(Failure::Slow(d)) => {
                let d = *d;
                rec.failures.get_mut(&provider).and_then(|q| q.pop_front());
                Some(d)
            }
            _ => None,
        }
    };
    if let Some(d) = delay {
        // The provider takes the request and answers late: what it does
        // happens even if the client gave up waiting (as at a real
        // provider), so it runs in a task of its own.
        let (shared, req) = (shared.clone(), req.clone());
        let task = tokio::spawn(async move {
            tokio::time::sleep(d).await;
            match answer(&shared, provider, &req, handler) {
                Ok(reply) => reply.into_response(),
                Err(_) => Reply::json(500, serde_json::json!({})).into_response(),
            }
        });
        return task
            .await
            .unwrap_or_else(|_| axum::http::StatusCode::INTERNAL_SERVER_ERROR.into_response());
    }
    match answer(&shared, provider, &req, handler) {
        Ok(reply) => reply.into_response(),
        Err(hang) => {
            tokio::time::sleep(hang).await;
            // Answer as the provider would, against a scratch copy of the
            // state, so that nothing is recorded.
            let mut scratch = shared.lock().clone();
            handler(&mut Ctx {
                shared: &shared,
                rec: &mut scratch,
                req: &req,
                provider,
                operation: "",
                destination: "",
                scratch: true,
            })
            .into_response()
        }
    }
}

/// The synchronous part of [`handle`], under one lock so that the
/// timeline is in arrival order and a handler sees one consistent state:
/// the answer, or `Err(how long to hang)`.
fn answer(
    shared: &Shared,
    provider: Provider,
    req: &Req,
    handler: Handler,
) -> Result<Reply, std::time::Duration> {
    let received_at = Instant::now();
    let (operation, destination) = describe(provider, req);
    let mut rec = shared.lock();
    *rec.requests.entry(provider).or_default() += 1;
    let injected = rec.failures.get_mut(&provider).and_then(|q| q.pop_front());
    let mut record = RequestRecord {
        provider,
        operation,
        destination,
        outcome: Outcome::Accepted,
        status: 0,
        received_at,
    };
    let reply = match injected {
        Some(Failure::Hang(d)) => {
            record.outcome = Outcome::Hung;
            rec.timeline.push(record);
            return Err(d);
        }
        Some(failure) => {
            record.outcome = Outcome::Injected;
            failure_reply(provider, &failure)
        }
        None => {
            let reply = handler(&mut Ctx {
                shared,
                rec: &mut rec,
                req,
                provider,
                operation: &record.operation,
                destination: &record.destination,
                scratch: false,
            });
            record.outcome = if reply.rate_limited {
                Outcome::RateLimited
            } else if reply.error {
                Outcome::Invalid
            } else {
                Outcome::Accepted
            };
            reply
        }
    };
    record.status = reply.status;
    rec.timeline.push(record);
    if reply.error {
        rec.rejected.push(Rejected {
            provider,
            status: reply.status,
            body: reply.body.clone(),
            at: Instant::now(),
        });
    }
    Ok(reply)
}

/// The provider-shaped answer to an injected failure.
fn failure_reply(provider: Provider, failure: &Failure) -> Reply {
    let reply = match failure {
        Failure::RateLimited { retry_after_secs } => {
            let r = match provider {
                Provider::Slack => slack::api_status_reply(429),
                Provider::SlackWebhook | Provider::SlackResponse => {
                    slack::webhook_status_reply(429)
                }
                Provider::PagerDuty => pagerduty::status_reply(429),
                Provider::Twilio => twilio::status_reply(429),
                Provider::Webhook => webhook::rate_limited_reply(),
            };
            r.with_header("retry-after", retry_after_secs.to_string())
        }
        Failure::Status(code) => match provider {
            Provider::Slack => slack::api_status_reply(*code),
            Provider::SlackWebhook | Provider::SlackResponse => slack::webhook_status_reply(*code),
            Provider::PagerDuty => pagerduty::status_reply(*code),
            Provider::Twilio => twilio::status_reply(*code),
            Provider::Webhook => webhook::status_reply(*code),
        },
        Failure::Hang(_) | Failure::Slow(_) => unreachable!("handled by the caller"),
    };
    reply.failed()
}

/// A string argument of a JSON object (`""` if absent or not a string).
pub(super) fn str_arg<'a>(args: &'a Map<String, Value>, key: &str) -> &'a str {
    args.get(key).and_then(Value::as_str).unwrap_or("")
}

/// Standard base64, as HTTP basic auth and Standard Webhooks use it.
pub(super) fn b64() -> base64::engine::GeneralPurpose {
    base64::engine::general_purpose::STANDARD
}

/// The canonical reason phrase of an HTTP status.
pub(super) fn reason(code: u16) -> &'static str {
    StatusCode::from_u16(code)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("Error")
}

// ---------------------------------------------------------------------------
// axum handlers

async fn slack_api(
    State(s): State<Arc<Shared>>,
    Path(method): Path<String>,
    http_method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let req = Req::new(http_method, method, &uri, headers, body);
    handle(s, Provider::Slack, req, slack::api).await
}

async fn slack_webhook(
    State(s): State<Arc<Shared>>,
    Path((a, b, c)): Path<(String, String, String)>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let req = Req::new(Method::POST, format!("{a}/{b}/{c}"), &uri, headers, body);
    handle(s, Provider::SlackWebhook, req, slack::incoming_webhook).await
}

async fn slack_response(
    State(s): State<Arc<Shared>>,
    Path((a, b, c)): Path<(String, String, String)>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let req = Req::new(Method::POST, format!("{a}/{b}/{c}"), &uri, headers, body);
    handle(s, Provider::SlackResponse, req, slack::response_url).await
}

async fn pagerduty_enqueue(
    State(s): State<Arc<Shared>>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let req = Req::new(Method::POST, String::new(), &uri, headers, body);
    handle(s, Provider::PagerDuty, req, pagerduty::enqueue).await
}

async fn twilio_messages(
    State(s): State<Arc<Shared>>,
    Path(sid): Path<String>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let req = Req::new(method, sid, &uri, headers, body);
    handle(s, Provider::Twilio, req, twilio::messages).await
}

async fn webhook_receiver(
    State(s): State<Arc<Shared>>,
    Path(name): Path<String>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let req = Req::new(Method::POST, name, &uri, headers, body);
    handle(s, Provider::Webhook, req, webhook::receive).await
}
