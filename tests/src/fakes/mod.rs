//! Fake notification providers: Slack (Web API and incoming webhooks),
//! PagerDuty Events API v2, Twilio Messages and Standard Webhooks receivers,
//! all served by one local axum server on a random port.
//!
//! The fakes check requests the way the real services do (as
//! their public API references document them) and answer with the real
//! response shapes, including the real error shapes. Unknown fields are
//! ignored. Every accepted request is recorded; every request answered with
//! an error (by validation or by [`FakeProviders::fail_next`]) is recorded in
//! [`FakeProviders::rejected`].
//!
//! Slack `ts` values are taken from the wall clock (microseconds, strictly
//! increasing), as Slack's are, so `oldest` filters computed from real time
//! work in `conversations.history`.

use std::{
    collections::{HashMap, HashSet, VecDeque},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex, MutexGuard,
    },
    time::{Duration, Instant},
};

use axum::{
    extract::{DefaultBodyLimit, Path, State},
    http::{HeaderMap, HeaderValue, Method, StatusCode, Uri},
    response::{IntoResponse, Response},
    routing::{any, post},
    Router,
};
use base64::Engine as _;
use bytes::Bytes;
use hmac::{Hmac, Mac};
use serde_json::{json, Map, Value};
use sha2::Sha256;

/// Which fake a request was addressed to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Provider {
    /// Slack Web API (`/slack/api/...`).
    Slack,
    /// Slack incoming webhook (`/slack/services/...`).
    SlackWebhook,
    /// PagerDuty Events API v2 (`/pagerduty/v2/enqueue`).
    PagerDuty,
    /// Twilio Messages (`/twilio/2010-04-01/Accounts/{sid}/Messages.json`).
    Twilio,
    /// Generic Standard Webhooks receiver (`/hooks/{name}`).
    Webhook,
}

/// An injected answer that replaces normal handling (see [`FakeProviders::fail_next`]).
#[derive(Clone, Debug)]
pub enum Failure {
    /// Answer with this HTTP status and a provider-shaped error body.
    Status(u16),
    /// Answer 429 with a `Retry-After` header and a provider-shaped body.
    RateLimited {
        /// Value of the `Retry-After` header, in seconds.
        retry_after_secs: u64,
    },
    /// Sleep this long, then answer as the provider would, but record nothing.
    Hang(Duration),
}

/// An accepted `chat.postMessage` call.
#[derive(Clone, Debug)]
pub struct SlackPost {
    /// Channel id as answered (a user id `U…` becomes the DM id `D…`).
    pub channel: String,
    /// The message's `ts`, as answered.
    pub ts: String,
    /// The `text` argument (`""` if absent).
    pub text: String,
    /// The `blocks` argument (`Null` if absent).
    pub blocks: Value,
    /// The `metadata` argument (`Null` if absent).
    pub metadata: Value,
    /// The whole request body.
    pub body: Value,
    /// When it arrived.
    pub at: Instant,
}

/// An accepted `chat.update` call.
#[derive(Clone, Debug)]
pub struct SlackUpdate {
    /// Channel id of the updated message.
    pub channel: String,
    /// `ts` of the updated message.
    pub ts: String,
    /// The new `text` (`""` if absent).
    pub text: String,
    /// The new `blocks` (`Null` if absent).
    pub blocks: Value,
    /// The whole request body.
    pub body: Value,
    /// When it arrived.
    pub at: Instant,
}

/// A PagerDuty alert as PagerDuty would hold it after deduplication.
#[derive(Clone, Debug)]
pub struct PdAlert {
    /// The alert's dedup key.
    pub dedup_key: String,
    /// `triggered`, `acknowledged` or `resolved`.
    pub status: String,
    /// Summary of the trigger that opened it.
    pub summary: String,
    /// Severity of the trigger that opened it.
    pub severity: String,
    /// Number of trigger events merged into it (1 for a fresh alert).
    pub triggers: usize,
}

/// An accepted Twilio message.
#[derive(Clone, Debug)]
pub struct Sms {
    /// Message sid (`SM` + 32 hex digits).
    pub sid: String,
    /// The `To` parameter.
    pub to: String,
    /// The `From` parameter, if given.
    pub from: Option<String>,
    /// The `MessagingServiceSid` parameter, if given.
    pub messaging_service_sid: Option<String>,
    /// The `Body` parameter.
    pub body: String,
    /// When it arrived.
    pub at: Instant,
}

/// An accepted (and verified, unless unsigned) webhook call.
#[derive(Clone, Debug)]
pub struct WebhookCall {
    /// The `{name}` part of `/hooks/{name}`.
    pub name: String,
    /// The `webhook-id` header.
    pub id: String,
    /// The `webhook-timestamp` header (`""` if absent on an unsigned hook).
    pub timestamp: String,
    /// The JSON body.
    pub body: Value,
    /// When it arrived.
    pub at: Instant,
}

/// A request answered with an error, injected or by validation.
#[derive(Clone, Debug)]
pub struct Rejected {
    /// The fake it was addressed to.
    pub provider: Provider,
    /// HTTP status answered (200 for Slack Web API `ok:false` answers).
    pub status: u16,
    /// Body answered.
    pub body: String,
    /// When it was answered.
    pub at: Instant,
}

/// The fake providers' server; stopped when dropped.
pub struct FakeProviders {
    addr: std::net::SocketAddr,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl FakeProviders {
    /// Bot token the Slack fake accepts.
    pub const SLACK_TOKEN: &'static str = "xoxb-test-token";
    /// The only routing key the PagerDuty fake accepts (32 chars).
    pub const PD_ROUTING_KEY: &'static str = "0123456789abcdef0123456789abcdef";
    /// Twilio account sid the fake accepts.
    pub const TWILIO_SID: &'static str = "AC00000000000000000000000000000000";
    /// Twilio auth token the fake accepts.
    pub const TWILIO_TOKEN: &'static str = "twilio-auth-token";
    /// A sender number to configure as `From`.
    pub const TWILIO_FROM: &'static str = "+15005550006";
    /// Standard Webhooks secret: `whsec_` + base64 of `b"tocsin-webhook-test-key"`.
    pub const WEBHOOK_SECRET: &'static str = "whsec_dG9jc2luLXdlYmhvb2stdGVzdC1rZXk=";

    /// Starts the server on `127.0.0.1:0`.
    pub async fn start() -> FakeProviders {
        let shared = Arc::new(Shared {
            records: Mutex::new(Records::default()),
            last_ts_micros: AtomicU64::new(0),
        });
        let app = Router::new()
            .route("/slack/api/{method}", any(slack_api))
            .route("/slack/services/{a}/{b}/{c}", post(slack_webhook))
            .route("/pagerduty/v2/enqueue", post(pagerduty))
            .route(
                "/twilio/2010-04-01/Accounts/{sid}/Messages.json",
                any(twilio),
            )
            .route("/hooks/{name}", post(webhook))
            .layer(DefaultBodyLimit::max(64 << 20))
            .with_state(shared.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind fake providers");
        let addr = listener.local_addr().expect("local addr");
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        FakeProviders { addr, shared, task }
    }

    /// `http://127.0.0.1:PORT`.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Slack Web API base; append `/chat.postMessage` etc.
    pub fn slack_api_url(&self) -> String {
        format!("{}/slack/api", self.base_url())
    }

    /// A Slack incoming-webhook URL.
    pub fn slack_webhook_url(&self) -> String {
        format!("{}/slack/services/T000/B000/XXXX", self.base_url())
    }

    /// PagerDuty Events API v2 enqueue URL.
    pub fn pagerduty_url(&self) -> String {
        format!("{}/pagerduty/v2/enqueue", self.base_url())
    }

    /// Twilio API base; append `/2010-04-01/Accounts/{sid}/Messages.json`.
    pub fn twilio_url(&self) -> String {
        format!("{}/twilio", self.base_url())
    }

    /// URL of the webhook receiver `name` (names starting `unsigned` skip signature checks).
    pub fn webhook_url(&self, name: &str) -> String {
        format!("{}/hooks/{name}", self.base_url())
    }

    /// The next `n` requests to `provider` (in arrival order, before validation) get `failure`.
    pub fn fail_next(&self, provider: Provider, n: usize, failure: Failure) {
        let mut rec = self.lock();
        let queue = rec.failures.entry(provider).or_default();
        queue.extend(std::iter::repeat_n(failure, n));
    }

    /// Accepted `chat.postMessage` calls, in arrival order.
    pub fn slack_posts(&self) -> Vec<SlackPost> {
        self.lock().slack_posts.clone()
    }

    /// Accepted `chat.update` calls, in arrival order.
    pub fn slack_updates(&self) -> Vec<SlackUpdate> {
        self.lock().slack_updates.clone()
    }

    /// Accepted Slack incoming-webhook bodies, in arrival order.
    pub fn slack_webhook_posts(&self) -> Vec<Value> {
        self.lock().slack_webhook_posts.clone()
    }

    /// Accepted (202) PagerDuty events, whole bodies, in arrival order.
    pub fn pagerduty_events(&self) -> Vec<Value> {
        self.lock().pd_events.clone()
    }

    /// PagerDuty alerts after deduplication, in creation order.
    pub fn pagerduty_alerts(&self) -> Vec<PdAlert> {
        self.lock().pd_alerts.clone()
    }

    /// Accepted Twilio messages, in arrival order.
    pub fn sms(&self) -> Vec<Sms> {
        self.lock().sms.iter().map(|m| m.sms.clone()).collect()
    }

    /// Accepted webhook calls (one per `webhook-id`), in arrival order.
    pub fn webhooks(&self) -> Vec<WebhookCall> {
        self.lock().webhooks.clone()
    }

    /// Every request that reached `provider`, including failed, injected and repeated ones.
    pub fn requests(&self, provider: Provider) -> usize {
        self.lock().requests.get(&provider).copied().unwrap_or(0)
    }

    /// Requests answered with an error, in answer order.
    pub fn rejected(&self) -> Vec<Rejected> {
        self.lock().rejected.clone()
    }

    /// Polls `what` every 20 ms until it holds (true) or `timeout` passes (false).
    pub async fn wait_for(&self, what: impl Fn(&FakeProviders) -> bool, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if what(self) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn lock(&self) -> MutexGuard<'_, Records> {
        self.shared.lock()
    }
}

impl Drop for FakeProviders {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The Standard Webhooks signature header value (`v1,<base64>`) for a request.
pub fn webhook_signature(secret: &str, id: &str, timestamp: &str, body: &[u8]) -> String {
    let mac = webhook_mac(secret, id, timestamp, body);
    format!("v1,{}", b64().encode(mac.finalize().into_bytes()))
}

/// Encodes pairs as an `application/x-www-form-urlencoded` body or query.
pub fn form_encode(pairs: &[(&str, &str)]) -> String {
    pairs
        .iter()
        .map(|(k, v)| format!("{}={}", form_escape(k), form_escape(v)))
        .collect::<Vec<_>>()
        .join("&")
}

/// Decodes an `application/x-www-form-urlencoded` body or query.
pub fn form_decode(s: &str) -> Vec<(String, String)> {
    s.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

// ---------------------------------------------------------------------------
// Server internals

struct Shared {
    records: Mutex<Records>,
    last_ts_micros: AtomicU64,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Records> {
        self.records.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A Slack `ts` from the wall clock, strictly increasing.
    fn next_ts(&self) -> String {
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

#[derive(Clone, Default)]
struct Records {
    failures: HashMap<Provider, VecDeque<Failure>>,
    requests: HashMap<Provider, usize>,
    slack_posts: Vec<SlackPost>,
    slack_updates: Vec<SlackUpdate>,
    slack_messages: Vec<SlackMessage>,
    slack_webhook_posts: Vec<Value>,
    pd_events: Vec<Value>,
    pd_alerts: Vec<PdAlert>,
    sms: Vec<TwilioMessage>,
    webhooks: Vec<WebhookCall>,
    webhook_ids: HashSet<(String, String)>,
    rejected: Vec<Rejected>,
}

/// A Slack message as it stands now (after updates), for `conversations.history`.
#[derive(Clone)]
struct SlackMessage {
    channel: String,
    ts: String,
    text: String,
    blocks: Value,
    metadata: Value,
    thread_ts: Option<String>,
}

#[derive(Clone)]
struct TwilioMessage {
    sms: Sms,
    created: jiff::Timestamp,
    segments: usize,
}

struct Req {
    method: Method,
    param: String,
    query: String,
    headers: HeaderMap,
    body: Bytes,
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

    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The media type of `Content-Type`, lowercased, without parameters.
    fn media_type(&self) -> Option<String> {
        self.header("content-type").map(|ct| {
            ct.split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase()
        })
    }
}

struct Reply {
    status: u16,
    content_type: Option<&'static str>,
    body: String,
    headers: Vec<(&'static str, String)>,
    error: bool,
}

impl Reply {
    fn json(status: u16, v: Value) -> Reply {
        Reply {
            status,
            content_type: Some("application/json; charset=utf-8"),
            body: v.to_string(),
            headers: vec![],
            error: status >= 400,
        }
    }

    fn text(status: u16, s: &str) -> Reply {
        Reply {
            status,
            content_type: Some("text/plain; charset=utf-8"),
            body: s.to_string(),
            headers: vec![],
            error: status >= 400,
        }
    }

    fn empty(status: u16) -> Reply {
        Reply {
            status,
            content_type: None,
            body: String::new(),
            headers: vec![],
            error: status >= 400,
        }
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

type Handler = fn(&Shared, &mut Records, &Req) -> Reply;

/// Counts the request, applies an injected failure if one is queued, else
/// runs `handler` and records an error answer in `rejected`.
async fn handle(shared: Arc<Shared>, provider: Provider, req: Req, handler: Handler) -> Response {
    let injected = {
        let mut rec = shared.lock();
        *rec.requests.entry(provider).or_default() += 1;
        rec.failures.get_mut(&provider).and_then(|q| q.pop_front())
    };
    let reply = match injected {
        None => {
            let mut rec = shared.lock();
            let reply = handler(&shared, &mut rec, &req);
            if reply.error {
                rec.rejected.push(Rejected {
                    provider,
                    status: reply.status,
                    body: reply.body.clone(),
                    at: Instant::now(),
                });
            }
            reply
        }
        Some(Failure::Hang(d)) => {
            tokio::time::sleep(d).await;
            // Answer as the provider would, against a scratch copy of the
            // state, so that nothing is recorded.
            let mut scratch = shared.lock().clone();
            handler(&shared, &mut scratch, &req)
        }
        Some(failure) => {
            let reply = failure_reply(provider, &failure);
            shared.lock().rejected.push(Rejected {
                provider,
                status: reply.status,
                body: reply.body.clone(),
                at: Instant::now(),
            });
            reply
        }
    };
    reply.into_response()
}

fn failure_reply(provider: Provider, failure: &Failure) -> Reply {
    match failure {
        Failure::RateLimited { retry_after_secs } => {
            let mut r = match provider {
                Provider::Slack => Reply::json(429, json!({"ok": false, "error": "ratelimited"})),
                Provider::SlackWebhook => Reply::text(429, "rate_limited"),
                Provider::PagerDuty => Reply::json(
                    429,
                    json!({"status": "throttle event",
                           "message": "Requests for this service are arriving too quickly.  Please retry later."}),
                ),
                Provider::Twilio => twilio_error(429, 20429, "Too Many Requests"),
                Provider::Webhook => Reply::json(429, json!({"error": "rate limited"})),
            };
            r.headers
                .push(("retry-after", retry_after_secs.to_string()));
            r.error = true;
            r
        }
        Failure::Status(code) => {
            let code = *code;
            let reason = StatusCode::from_u16(code)
                .ok()
                .and_then(|s| s.canonical_reason())
                .unwrap_or("Error");
            let mut r = match provider {
                Provider::Slack => {
                    let error = match code {
                        429 => "ratelimited",
                        500.. => "fatal_error",
                        _ => "request_failed",
                    };
                    Reply::json(code, json!({"ok": false, "error": error}))
                }
                Provider::SlackWebhook => Reply::text(
                    code,
                    match code {
                        400 => "invalid_payload",
                        403 => "action_prohibited",
                        404 => "channel_not_found",
                        410 => "channel_is_archived",
                        429 => "rate_limited",
                        _ => "rollup_error",
                    },
                ),
                Provider::PagerDuty => match code {
                    400 => pd_invalid(vec!["Injected failure".into()]),
                    429 => Reply::json(
                        429,
                        json!({"status": "throttle event",
                               "message": "Requests for this service are arriving too quickly.  Please retry later."}),
                    ),
                    _ => Reply::json(code, json!({"status": "error", "message": reason})),
                },
                Provider::Twilio => {
                    let tw = match code {
                        401 => 20003,
                        404 => 20404,
                        429 => 20429,
                        500.. => 20500,
                        _ => 21000 + code as u32 % 1000,
                    };
                    twilio_error(code, tw, reason)
                }
                Provider::Webhook => Reply::json(code, json!({"error": reason})),
            };
            r.error = true;
            r
        }
        Failure::Hang(_) => unreachable!("hang is handled by the caller"),
    }
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
    handle(s, Provider::Slack, req, slack_api_reply).await
}

async fn slack_webhook(
    State(s): State<Arc<Shared>>,
    Path((_a, _b, _c)): Path<(String, String, String)>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let req = Req::new(Method::POST, String::new(), &uri, headers, body);
    handle(s, Provider::SlackWebhook, req, slack_webhook_reply).await
}

async fn pagerduty(
    State(s): State<Arc<Shared>>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let req = Req::new(Method::POST, String::new(), &uri, headers, body);
    handle(s, Provider::PagerDuty, req, pagerduty_reply).await
}

async fn twilio(
    State(s): State<Arc<Shared>>,
    Path(sid): Path<String>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let req = Req::new(method, sid, &uri, headers, body);
    handle(s, Provider::Twilio, req, twilio_reply).await
}

async fn webhook(
    State(s): State<Arc<Shared>>,
    Path(name): Path<String>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let req = Req::new(Method::POST, name, &uri, headers, body);
    handle(s, Provider::Webhook, req, webhook_reply).await
}

// ---------------------------------------------------------------------------
// Slack Web API

fn slack_err(error: &str) -> Reply {
    let mut r = Reply::json(200, json!({"ok": false, "error": error}));
    r.error = true;
    r
}

fn slack_err_msg(error: &str, message: String) -> Reply {
    let mut r = Reply::json(
        200,
        json!({"ok": false, "error": error,
               "response_metadata": {"messages": [format!("[ERROR] {message}")]}}),
    );
    r.error = true;
    r
}

fn slack_api_reply(shared: &Shared, rec: &mut Records, req: &Req) -> Reply {
    let method = req.param.as_str();
    let json_only = match method {
        "chat.postMessage" | "chat.update" => true,
        "conversations.open" | "conversations.history" => false,
        _ => {
            let mut r = Reply::json(404, json!({"ok": false, "error": "unknown_method"}));
            r.error = true;
            return r;
        }
    };
    // Arguments: JSON body, or (conversations.*) a form body or a GET query.
    let mut form_token = None;
    let args: Map<String, Value> = if req.method == Method::GET && !json_only {
        form_args(&req.query, &mut form_token)
    } else {
        match req.media_type().as_deref() {
            None => return slack_err("missing_post_type"),
            Some("application/json") => {
                let charset_ok = req
                    .header("content-type")
                    .and_then(|ct| {
                        ct.split(';').skip(1).find_map(|p| {
                            let (k, v) = p.split_once('=')?;
                            (k.trim().eq_ignore_ascii_case("charset"))
                                .then(|| v.trim().trim_matches('"').to_ascii_lowercase())
                        })
                    })
                    .is_none_or(|cs| cs == "utf-8" || cs == "utf8");
                if !charset_ok {
                    return slack_err("invalid_charset");
                }
                match serde_json::from_slice::<Value>(&req.body) {
                    Ok(Value::Object(m)) => m,
                    _ => return slack_err("invalid_json"),
                }
            }
            Some("application/x-www-form-urlencoded") if !json_only => {
                form_args(&String::from_utf8_lossy(&req.body), &mut form_token)
            }
            Some(_) => return slack_err("invalid_post_type"),
        }
    };
    // Auth: the bearer header (or, for form bodies, a `token` argument).
    let token = match req.header("authorization") {
        Some(h) => Some(h.strip_prefix("Bearer ").unwrap_or("").trim().to_string()),
        None => form_token,
    };
    match token {
        None => return slack_err("not_authed"),
        Some(t) if t != FakeProviders::SLACK_TOKEN => return slack_err("invalid_auth"),
        Some(_) => {}
    }
    match method {
        "chat.postMessage" => slack_post_message(shared, rec, args),
        "chat.update" => slack_update(rec, args),
        "conversations.open" => slack_open(&args),
        _ => slack_history(rec, &args),
    }
}

fn form_args(s: &str, token: &mut Option<String>) -> Map<String, Value> {
    let mut m = Map::new();
    for (k, v) in form_decode(s) {
        if k == "token" {
            *token = Some(v);
        } else {
            m.insert(k, Value::String(v));
        }
    }
    m
}

fn str_arg<'a>(args: &'a Map<String, Value>, key: &str) -> &'a str {
    args.get(key).and_then(Value::as_str).unwrap_or("")
}

/// `blocks`/`attachments`/`metadata` may be given as JSON or as a JSON string.
fn json_arg(args: &Map<String, Value>, key: &str) -> Result<Value, ()> {
    match args.get(key) {
        None | Some(Value::Null) => Ok(Value::Null),
        Some(Value::String(s)) if s.is_empty() => Ok(Value::Null),
        Some(Value::String(s)) => serde_json::from_str(s).map_err(|_| ()),
        Some(v) => Ok(v.clone()),
    }
}

fn non_empty(v: &Value) -> bool {
    match v {
        Value::Null => false,
        Value::Array(a) => !a.is_empty(),
        _ => true,
    }
}

/// Checks the message arguments shared by postMessage and update:
/// returns (text, blocks, metadata) or the error answer.
fn slack_content(args: &Map<String, Value>) -> Result<(String, Value, Value), Reply> {
    let text = match args.get("text") {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(s)) => s.clone(),
        Some(v) => v.to_string(),
    };
    let blocks = json_arg(args, "blocks")
        .map_err(|_| slack_err_msg("invalid_blocks", "blocks is not valid JSON".into()))?;
    let attachments =
        json_arg(args, "attachments").map_err(|_| slack_err("invalid_attachments"))?;
    if blocks != Value::Null {
        check_blocks(&blocks).map_err(|m| slack_err_msg("invalid_blocks", m))?;
    }
    // Attachments hold blocks of their own (Slack checks them the same
    // way) and an optional `color`: a hex colour or good/warning/danger.
    if attachments != Value::Null {
        let list = attachments
            .as_array()
            .ok_or_else(|| slack_err("invalid_attachments"))?;
        if list.len() > 100 {
            return Err(slack_err("too_many_attachments"));
        }
        for a in list {
            let a = a
                .as_object()
                .ok_or_else(|| slack_err("invalid_attachments"))?;
            if let Some(b) = a.get("blocks") {
                check_blocks(b).map_err(|m| slack_err_msg("invalid_blocks", m))?;
            }
            if let Some(c) = a.get("color") {
                let c = c.as_str().unwrap_or_default();
                let hex = c.len() == 7
                    && c.starts_with('#')
                    && c[1..].chars().all(|ch| ch.is_ascii_hexdigit());
                if !hex && !["good", "warning", "danger"].contains(&c) {
                    return Err(slack_err("invalid_attachments"));
                }
            }
        }
    }
    if text.is_empty() && !non_empty(&blocks) && !non_empty(&attachments) {
        return Err(slack_err("no_text"));
    }
    if text.chars().count() > 40_000 {
        return Err(slack_err("msg_too_long"));
    }
    let metadata = json_arg(args, "metadata").map_err(|_| slack_err("invalid_metadata_format"))?;
    if metadata != Value::Null {
        let ok = metadata
            .get("event_type")
            .and_then(Value::as_str)
            .is_some_and(|t| !t.is_empty())
            && metadata.get("event_payload").is_some_and(Value::is_object);
        if !ok {
            return Err(slack_err("invalid_metadata_format"));
        }
    }
    Ok((text, blocks, metadata))
}

fn slack_post_message(shared: &Shared, rec: &mut Records, args: Map<String, Value>) -> Reply {
    let channel = str_arg(&args, "channel");
    if channel.is_empty() {
        return slack_err("channel_not_found");
    }
    let (text, blocks, metadata) = match slack_content(&args) {
        Ok(c) => c,
        Err(r) => return r,
    };
    // Posting to a user id goes to the DM with that user.
    let channel = match channel.strip_prefix('U') {
        Some(rest) => format!("D{rest}"),
        None => channel.to_string(),
    };
    let ts = shared.next_ts();
    let thread_ts = args
        .get("thread_ts")
        .and_then(Value::as_str)
        .filter(|t| !t.is_empty())
        .map(str::to_string);
    let mut message = json!({"type": "message", "text": text, "ts": ts, "bot_id": "B0FAKE"});
    if blocks != Value::Null {
        message["blocks"] = blocks.clone();
    }
    if let Some(t) = &thread_ts {
        message["thread_ts"] = json!(t);
    }
    rec.slack_messages.push(SlackMessage {
        channel: channel.clone(),
        ts: ts.clone(),
        text: text.clone(),
        blocks: blocks.clone(),
        metadata: metadata.clone(),
        thread_ts,
    });
    rec.slack_posts.push(SlackPost {
        channel: channel.clone(),
        ts: ts.clone(),
        text,
        blocks,
        metadata,
        body: Value::Object(args),
        at: Instant::now(),
    });
    Reply::json(
        200,
        json!({"ok": true, "channel": channel, "ts": ts, "message": message}),
    )
}

fn slack_update(rec: &mut Records, args: Map<String, Value>) -> Reply {
    let channel = str_arg(&args, "channel").to_string();
    if channel.is_empty() {
        return slack_err("channel_not_found");
    }
    let ts = str_arg(&args, "ts").to_string();
    let Some(idx) = rec
        .slack_messages
        .iter()
        .position(|m| m.channel == channel && m.ts == ts)
    else {
        return slack_err("message_not_found");
    };
    let (text, blocks, metadata) = match slack_content(&args) {
        Ok(c) => c,
        Err(r) => return r,
    };
    let stored = &mut rec.slack_messages[idx];
    stored.text = text.clone();
    if blocks != Value::Null {
        stored.blocks = blocks.clone();
    }
    if metadata != Value::Null {
        stored.metadata = metadata;
    }
    let mut message = json!({"type": "message", "text": text, "ts": ts});
    if stored.blocks != Value::Null {
        message["blocks"] = stored.blocks.clone();
    }
    rec.slack_updates.push(SlackUpdate {
        channel: channel.clone(),
        ts: ts.clone(),
        text: text.clone(),
        blocks,
        body: Value::Object(args),
        at: Instant::now(),
    });
    Reply::json(
        200,
        json!({"ok": true, "channel": channel, "ts": ts, "text": text, "message": message}),
    )
}

fn slack_open(args: &Map<String, Value>) -> Reply {
    let existing = str_arg(args, "channel");
    if !existing.is_empty() {
        return Reply::json(200, json!({"ok": true, "channel": {"id": existing}}));
    }
    let users: Vec<String> = match args.get("users") {
        Some(Value::String(s)) => s
            .split(',')
            .map(|u| u.trim().to_string())
            .filter(|u| !u.is_empty())
            .collect(),
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(|u| u.as_str().map(str::to_string))
            .collect(),
        _ => vec![],
    };
    let id = match users.as_slice() {
        [] => return slack_err("users_list_not_supplied"),
        [one] => match one.strip_prefix('U') {
            Some(rest) => format!("D{rest}"),
            None => return slack_err("user_not_found"),
        },
        many => format!(
            "G{}",
            many.iter()
                .map(|u| u.trim_start_matches('U'))
                .collect::<String>()
        ),
    };
    Reply::json(200, json!({"ok": true, "channel": {"id": id}}))
}

fn truthy(v: Option<&Value>) -> bool {
    match v {
        Some(Value::Bool(b)) => *b,
        Some(Value::String(s)) => s == "true" || s == "1",
        Some(Value::Number(n)) => n.as_u64() == Some(1),
        _ => false,
    }
}

/// `"1700000000.000123"` → (1700000000, 123); fractions are padded to 6 digits.
fn ts_key(v: Option<&Value>) -> Option<(u64, u64)> {
    let s = match v? {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        _ => return None,
    };
    let s = s.trim();
    if s.is_empty() {
        return None;
    }
    let (secs, frac) = s.split_once('.').unwrap_or((s, ""));
    let frac: String = frac.chars().chain(std::iter::repeat('0')).take(6).collect();
    Some((secs.parse().ok()?, frac.parse().ok()?))
}

fn slack_history(rec: &Records, args: &Map<String, Value>) -> Reply {
    let channel = str_arg(args, "channel");
    if channel.is_empty() {
        return slack_err("channel_not_found");
    }
    let oldest = ts_key(args.get("oldest"));
    let latest = ts_key(args.get("latest"));
    let inclusive = truthy(args.get("inclusive"));
    let with_metadata = truthy(args.get("include_all_metadata"));
    let limit = match args.get("limit") {
        Some(Value::Number(n)) => n.as_u64().unwrap_or(100),
        Some(Value::String(s)) => s.parse().unwrap_or(100),
        _ => 100,
    }
    .clamp(1, 999) as usize;
    let mut found: Vec<&SlackMessage> = rec
        .slack_messages
        .iter()
        .filter(|m| m.channel == channel)
        .filter(|m| {
            let key = ts_key(Some(&Value::String(m.ts.clone())));
            let after = oldest.is_none_or(|o| {
                if inclusive {
                    key >= Some(o)
                } else {
                    key > Some(o)
                }
            });
            let before = latest.is_none_or(|l| {
                if inclusive {
                    key <= Some(l)
                } else {
                    key < Some(l)
                }
            });
            after && before
        })
        .collect();
    found.sort_by_key(|m| std::cmp::Reverse(ts_key(Some(&Value::String(m.ts.clone())))));
    let has_more = found.len() > limit;
    let messages: Vec<Value> = found
        .into_iter()
        .take(limit)
        .map(|m| {
            let mut v = json!({"type": "message", "ts": m.ts, "text": m.text, "bot_id": "B0FAKE"});
            if m.blocks != Value::Null {
                v["blocks"] = m.blocks.clone();
            }
            if let Some(t) = &m.thread_ts {
                v["thread_ts"] = json!(t);
            }
            if with_metadata && m.metadata != Value::Null {
                v["metadata"] = m.metadata.clone();
            }
            v
        })
        .collect();
    Reply::json(
        200,
        json!({"ok": true, "messages": messages, "has_more": has_more}),
    )
}

/// Block Kit checks: what Slack answers `invalid_blocks` for (the subset
/// the engine can get wrong). The error names the JSON pointer, as Slack does.
fn check_blocks(blocks: &Value) -> Result<(), String> {
    let arr = blocks
        .as_array()
        .ok_or("must provide an array [json-pointer:/blocks]")?;
    if arr.len() > 50 {
        return Err("no more than 50 items allowed [json-pointer:/blocks]".into());
    }
    let mut block_ids = HashSet::new();
    for (i, b) in arr.iter().enumerate() {
        let at = format!("/blocks/{i}");
        let obj = b
            .as_object()
            .ok_or(format!("must be an object [json-pointer:{at}]"))?;
        let ty = obj
            .get("type")
            .and_then(Value::as_str)
            .ok_or(format!("missing required field: type [json-pointer:{at}]"))?;
        if let Some(id) = obj.get("block_id") {
            let id = id
                .as_str()
                .ok_or(format!("must be a string [json-pointer:{at}/block_id]"))?;
            if id.chars().count() > 255 {
                return Err(format!(
                    "must be less than 256 characters [json-pointer:{at}/block_id]"
                ));
            }
            if !block_ids.insert(id.to_string()) {
                return Err(format!(
                    "duplicate block_id {id:?} [json-pointer:{at}/block_id]"
                ));
            }
        }
        if ty == "actions" {
            let els = obj
                .get("elements")
                .and_then(Value::as_array)
                .ok_or(format!(
                    "missing required field: elements [json-pointer:{at}]"
                ))?;
            if els.is_empty() || els.len() > 25 {
                return Err(format!(
                    "must have between 1 and 25 elements [json-pointer:{at}/elements]"
                ));
            }
            let mut action_ids = HashSet::new();
            for (j, e) in els.iter().enumerate() {
                let eat = format!("{at}/elements/{j}");
                let eobj = e
                    .as_object()
                    .ok_or(format!("must be an object [json-pointer:{eat}]"))?;
                let ety = eobj
                    .get("type")
                    .and_then(Value::as_str)
                    .ok_or(format!("missing required field: type [json-pointer:{eat}]"))?;
                if let Some(aid) = eobj.get("action_id").and_then(Value::as_str) {
                    if !action_ids.insert(aid.to_string()) {
                        return Err(format!(
                            "duplicate action_id {aid:?} [json-pointer:{eat}/action_id]"
                        ));
                    }
                }
                if ety == "button" {
                    check_button(eobj, &eat)?;
                }
            }
        }
        if let Some(acc) = obj.get("accessory").and_then(Value::as_object) {
            if acc.get("type").and_then(Value::as_str) == Some("button") {
                check_button(acc, &format!("{at}/accessory"))?;
            }
        }
    }
    Ok(())
}

fn check_button(b: &Map<String, Value>, at: &str) -> Result<(), String> {
    let text = b
        .get("text")
        .and_then(Value::as_object)
        .ok_or(format!("missing required field: text [json-pointer:{at}]"))?;
    if text.get("type").and_then(Value::as_str) != Some("plain_text") {
        return Err(format!(
            "must be a plain_text text object [json-pointer:{at}/text/type]"
        ));
    }
    let t = text.get("text").and_then(Value::as_str).ok_or(format!(
        "missing required field: text [json-pointer:{at}/text]"
    ))?;
    if t.is_empty() || t.chars().count() > 75 {
        return Err(format!(
            "must be between 1 and 75 characters [json-pointer:{at}/text/text]"
        ));
    }
    for (field, max) in [("action_id", 255), ("value", 2000), ("url", 3000)] {
        if let Some(v) = b.get(field) {
            let s = v
                .as_str()
                .ok_or(format!("must be a string [json-pointer:{at}/{field}]"))?;
            if s.chars().count() > max {
                return Err(format!(
                    "must be less than {} characters [json-pointer:{at}/{field}]",
                    max + 1
                ));
            }
        }
    }
    match b.get("style") {
        None => Ok(()),
        Some(Value::String(s)) if s == "primary" || s == "danger" => Ok(()),
        Some(_) => Err(format!(
            "must be one of: primary, danger [json-pointer:{at}/style]"
        )),
    }
}

// ---------------------------------------------------------------------------
// Slack incoming webhook

fn slack_webhook_reply(_: &Shared, rec: &mut Records, req: &Req) -> Reply {
    let parsed = if req.media_type().as_deref() == Some("application/x-www-form-urlencoded") {
        form_decode(&String::from_utf8_lossy(&req.body))
            .into_iter()
            .find(|(k, _)| k == "payload")
            .and_then(|(_, v)| serde_json::from_str::<Value>(&v).ok())
    } else {
        serde_json::from_slice::<Value>(&req.body).ok()
    };
    let Some(Value::Object(body)) = parsed else {
        return Reply::text(400, "invalid_payload");
    };
    let text = str_arg(&body, "text");
    let Ok(blocks) = json_arg(&body, "blocks") else {
        return Reply::text(400, "invalid_blocks");
    };
    let attachments = json_arg(&body, "attachments").unwrap_or(Value::Null);
    if text.is_empty() && !non_empty(&blocks) && !non_empty(&attachments) {
        return Reply::text(400, "no_text");
    }
    if blocks != Value::Null && check_blocks(&blocks).is_err() {
        return Reply::text(400, "invalid_blocks");
    }
    rec.slack_webhook_posts.push(Value::Object(body));
    Reply::text(200, "ok")
}

// ---------------------------------------------------------------------------
// PagerDuty Events API v2

fn pd_invalid(errors: Vec<String>) -> Reply {
    Reply::json(
        400,
        json!({"status": "invalid event", "message": "Event object is invalid", "errors": errors}),
    )
}

fn parses_as_iso8601(s: &str) -> bool {
    if s.parse::<jiff::Timestamp>().is_ok() || s.parse::<jiff::civil::DateTime>().is_ok() {
        return true;
    }
    // `2015-07-17T08:42:58.315+0000`: an offset without a colon.
    let b = s.as_bytes();
    if b.len() > 5 && matches!(b[b.len() - 5], b'+' | b'-') {
        let (head, off) = s.split_at(s.len() - 2);
        return format!("{head}:{off}").parse::<jiff::Timestamp>().is_ok();
    }
    false
}

fn pagerduty_reply(_: &Shared, rec: &mut Records, req: &Req) -> Reply {
    if req.body.len() > 512_000 {
        return pd_invalid(vec![format!(
            "Event object is too large ({} bytes; the limit is 512000 bytes)",
            req.body.len()
        )]);
    }
    let event = match serde_json::from_slice::<Value>(&req.body) {
        Ok(Value::Object(m)) => m,
        Ok(_) => return pd_invalid(vec!["Event object must be a JSON object".into()]),
        Err(e) => return pd_invalid(vec![format!("Invalid JSON: {e}")]),
    };
    let mut errors = Vec::new();
    match event.get("routing_key").and_then(Value::as_str) {
        None | Some("") => errors.push("'routing_key' is missing or blank".to_string()),
        Some(k) if k.chars().count() != 32 => errors
            .push("Length of 'routing_key' is incorrect (should be 32 characters)".to_string()),
        Some(k) if k != FakeProviders::PD_ROUTING_KEY => errors.push(format!(
            "'routing_key' {k:?} is not the integration key of any service"
        )),
        Some(_) => {}
    }
    let action = event
        .get("event_action")
        .and_then(Value::as_str)
        .unwrap_or("");
    match action {
        "" => errors.push("'event_action' is missing or blank".to_string()),
        "trigger" | "acknowledge" | "resolve" => {}
        other => errors.push(format!(
            "'event_action' {other:?} is invalid (must be one of trigger, acknowledge, resolve)"
        )),
    }
    let dedup_key = match event.get("dedup_key") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(_) => {
            errors.push("'dedup_key' must be a string".to_string());
            None
        }
    };
    if let Some(k) = &dedup_key {
        if k.chars().count() > 255 {
            errors.push("'dedup_key' is too long (max 255 characters)".to_string());
        }
    }
    if matches!(action, "acknowledge" | "resolve") && dedup_key.as_deref().unwrap_or("").is_empty()
    {
        errors.push(format!(
            "'dedup_key' is missing or blank (required for {action} events)"
        ));
    }
    let mut summary = String::new();
    let mut severity = String::new();
    if action == "trigger" {
        match event.get("payload").and_then(Value::as_object) {
            None => errors.push("'payload' is missing or not an object".to_string()),
            Some(p) => {
                summary = str_arg(p, "summary").to_string();
                severity = str_arg(p, "severity").to_string();
                if summary.trim().is_empty() {
                    errors.push("'payload.summary' is missing or blank".to_string());
                } else if summary.chars().count() > 1024 {
                    errors.push("'payload.summary' is too long (max 1024 characters)".to_string());
                }
                if str_arg(p, "source").trim().is_empty() {
                    errors.push("'payload.source' is missing or blank".to_string());
                }
                match severity.as_str() {
                    "" => errors.push("'payload.severity' is missing or blank".to_string()),
                    "critical" | "error" | "warning" | "info" => {}
                    other => errors.push(format!(
                        "'payload.severity' {other:?} is invalid (must be one of critical, error, warning, info)"
                    )),
                }
                match p.get("timestamp") {
                    None | Some(Value::Null) => {}
                    Some(Value::String(t)) if parses_as_iso8601(t) => {}
                    Some(_) => errors
                        .push("'payload.timestamp' is not a valid ISO 8601 timestamp".to_string()),
                }
            }
        }
    }
    for (field, required) in [("links", "href"), ("images", "src")] {
        match event.get(field) {
            None | Some(Value::Null) => {}
            Some(Value::Array(items)) => {
                for (i, item) in items.iter().enumerate() {
                    let ok = item
                        .get(required)
                        .and_then(Value::as_str)
                        .is_some_and(|s| !s.is_empty());
                    if !ok {
                        errors.push(format!("'{field}[{i}].{required}' is missing or blank"));
                    }
                }
            }
            Some(_) => errors.push(format!("'{field}' must be an array")),
        }
    }
    if !errors.is_empty() {
        return pd_invalid(errors);
    }
    let key = dedup_key
        .filter(|k| !k.is_empty())
        .unwrap_or_else(|| uuid::Uuid::new_v4().simple().to_string());
    let open = rec
        .pd_alerts
        .iter_mut()
        .rev()
        .find(|a| a.dedup_key == key && a.status != "resolved");
    match (action, open) {
        ("trigger", Some(a)) => a.triggers += 1,
        ("trigger", None) => rec.pd_alerts.push(PdAlert {
            dedup_key: key.clone(),
            status: "triggered".into(),
            summary,
            severity,
            triggers: 1,
        }),
        ("acknowledge", Some(a)) => a.status = "acknowledged".into(),
        ("resolve", Some(a)) => a.status = "resolved".into(),
        _ => {} // acknowledge/resolve of a missing or resolved alert: dropped
    }
    rec.pd_events.push(Value::Object(event));
    Reply::json(
        202,
        json!({"status": "success", "message": "Event processed", "dedup_key": key}),
    )
}

// ---------------------------------------------------------------------------
// Twilio Messages

fn twilio_error(status: u16, code: u32, message: &str) -> Reply {
    Reply::json(
        status,
        json!({"code": code, "message": message,
               "more_info": format!("https://www.twilio.com/docs/errors/{code}"),
               "status": status}),
    )
}

fn basic_auth(req: &Req) -> Option<(String, String)> {
    let h = req.header("authorization")?;
    let (scheme, cred) = h.trim().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = b64().decode(cred.trim()).ok()?;
    let decoded = String::from_utf8(decoded).ok()?;
    let (u, p) = decoded.split_once(':')?;
    Some((u.to_string(), p.to_string()))
}

fn twilio_reply(_: &Shared, rec: &mut Records, req: &Req) -> Reply {
    let authed = basic_auth(req).is_some_and(|(u, p)| {
        u == FakeProviders::TWILIO_SID && p == FakeProviders::TWILIO_TOKEN && req.param == u
    });
    if !authed {
        return twilio_error(401, 20003, "Authenticate");
    }
    match req.method {
        Method::POST => twilio_create(rec, req),
        Method::GET => twilio_list(rec, req),
        _ => twilio_error(405, 20004, "Method not allowed"),
    }
}

fn is_e164(s: &str) -> bool {
    let s = s.strip_prefix("whatsapp:").unwrap_or(s);
    s.strip_prefix('+')
        .is_some_and(|d| (8..=15).contains(&d.len()) && d.bytes().all(|b| b.is_ascii_digit()))
}

/// Twilio's segment count: GSM-7 (160, or 153 per part) else UCS-2 (70, or 67 per part).
fn sms_segments(body: &str) -> usize {
    const GSM: &str = "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?\
                       ¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà";
    const GSM_EXT: &str = "^{}\\[~]|€\u{c}";
    let mut septets = 0usize;
    for c in body.chars() {
        if GSM.contains(c) {
            septets += 1;
        } else if GSM_EXT.contains(c) {
            septets += 2;
        } else {
            let units = body.encode_utf16().count();
            return if units <= 70 { 1 } else { units.div_ceil(67) };
        }
    }
    if septets <= 160 {
        1
    } else {
        septets.div_ceil(153)
    }
}

fn twilio_create(rec: &mut Records, req: &Req) -> Reply {
    let params = if req.media_type().as_deref() == Some("application/x-www-form-urlencoded") {
        form_decode(&String::from_utf8_lossy(&req.body))
    } else {
        vec![]
    };
    let get = |k: &str| {
        params
            .iter()
            .find(|(pk, _)| pk == k)
            .map(|(_, v)| v.clone())
            .filter(|v| !v.is_empty())
    };
    let Some(to) = get("To") else {
        return twilio_error(400, 21604, "A 'To' phone number is required.");
    };
    if !is_e164(&to) {
        return twilio_error(
            400,
            21211,
            &format!("The 'To' number {to} is not a valid phone number."),
        );
    }
    let from = get("From");
    let mss = get("MessagingServiceSid");
    if from.is_none() && mss.is_none() {
        return twilio_error(400, 21603, "A 'From' phone number is required.");
    }
    if let Some(m) = &mss {
        if !(m.starts_with("MG") && m.len() == 34) {
            return twilio_error(
                400,
                21701,
                &format!("The Messaging Service Sid {m} is invalid."),
            );
        }
    }
    let Some(body) = get("Body") else {
        return twilio_error(400, 21602, "Message body is required.");
    };
    if body.chars().count() > 1600 {
        return twilio_error(
            400,
            21617,
            "The concatenated message body exceeds the 1600 character limit.",
        );
    }
    let msg = TwilioMessage {
        segments: sms_segments(&body),
        sms: Sms {
            sid: format!("SM{}", uuid::Uuid::new_v4().simple()),
            to,
            from,
            messaging_service_sid: mss,
            body,
            at: Instant::now(),
        },
        created: jiff::Timestamp::now(),
    };
    let answer = twilio_json(&msg, false);
    rec.sms.push(msg);
    Reply::json(201, answer)
}

fn rfc2822(t: jiff::Timestamp) -> String {
    t.strftime("%a, %d %b %Y %H:%M:%S +0000").to_string()
}

/// The message resource; `listed` shows it as sent (as a later GET would).
fn twilio_json(m: &TwilioMessage, listed: bool) -> Value {
    let sid = &m.sms.sid;
    let acc = FakeProviders::TWILIO_SID;
    let created = rfc2822(m.created);
    json!({
        "sid": sid,
        "account_sid": acc,
        "api_version": "2010-04-01",
        "status": if listed { "sent" } else { "queued" },
        "direction": "outbound-api",
        "from": m.sms.from,
        "to": m.sms.to,
        "body": m.sms.body,
        "num_segments": m.segments.to_string(),
        "num_media": "0",
        "price": null,
        "price_unit": null,
        "error_code": null,
        "error_message": null,
        "messaging_service_sid": m.sms.messaging_service_sid,
        "date_created": created,
        "date_sent": if listed { Value::String(created.clone()) } else { Value::Null },
        "date_updated": created,
        "uri": format!("/2010-04-01/Accounts/{acc}/Messages/{sid}.json"),
        "subresource_uris": {"media": format!("/2010-04-01/Accounts/{acc}/Messages/{sid}/Media.json")},
    })
}

/// A `DateSent` bound: a whole UTC day or an instant.
enum DateBound {
    Day(jiff::civil::Date),
    At(jiff::Timestamp),
}

fn twilio_list(rec: &Records, req: &Req) -> Reply {
    let query = form_decode(&req.query);
    let get = |k: &str| {
        query
            .iter()
            .find(|(qk, _)| qk == k)
            .map(|(_, v)| v.as_str())
    };
    let mut bounds = Vec::new();
    for key in ["DateSent", "DateSent>", "DateSent<"] {
        if let Some(v) = get(key) {
            let b = if let Ok(t) = v.parse::<jiff::Timestamp>() {
                DateBound::At(t)
            } else if let Ok(d) = v.parse::<jiff::civil::Date>() {
                DateBound::Day(d)
            } else {
                return twilio_error(
                    400,
                    20001,
                    &format!("Invalid value for {key}: {v:?} is not a date (YYYY-MM-DD)"),
                );
            };
            bounds.push((key, b));
        }
    }
    let page_size = get("PageSize")
        .and_then(|p| p.parse::<usize>().ok())
        .unwrap_or(50)
        .clamp(1, 1000);
    let to = get("To");
    let from = get("From");
    let messages: Vec<Value> = rec
        .sms
        .iter()
        .rev()
        .filter(|m| to.is_none_or(|t| m.sms.to == t))
        .filter(|m| from.is_none_or(|f| m.sms.from.as_deref() == Some(f)))
        .filter(|m| {
            let day = m.created.to_zoned_datetime(jiff::tz::TimeZone::UTC).date();
            bounds.iter().all(|(key, b)| {
                let ord = match b {
                    DateBound::Day(d) => day.cmp(d),
                    DateBound::At(t) => m.created.cmp(t),
                };
                match *key {
                    "DateSent>" => ord.is_ge(),
                    "DateSent<" => ord.is_le(),
                    _ => ord.is_eq(),
                }
            })
        })
        .take(page_size)
        .map(|m| twilio_json(m, true))
        .collect();
    let uri = format!(
        "/2010-04-01/Accounts/{}/Messages.json?PageSize={page_size}&Page=0",
        FakeProviders::TWILIO_SID
    );
    Reply::json(
        200,
        json!({"messages": messages, "next_page_uri": null, "previous_page_uri": null,
               "first_page_uri": uri, "uri": uri, "page": 0, "page_size": page_size,
               "start": 0, "end": messages.len().saturating_sub(1)}),
    )
}

// ---------------------------------------------------------------------------
// Standard Webhooks receiver

fn b64() -> base64::engine::GeneralPurpose {
    base64::engine::general_purpose::STANDARD
}

fn webhook_mac(secret: &str, id: &str, timestamp: &str, body: &[u8]) -> Hmac<Sha256> {
    let key = b64()
        .decode(secret.strip_prefix("whsec_").unwrap_or(secret))
        .expect("webhook secret is whsec_<base64>");
    let mut mac = Hmac::<Sha256>::new_from_slice(&key).expect("hmac takes any key length");
    mac.update(id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.as_bytes());
    mac.update(b".");
    mac.update(body);
    mac
}

fn webhook_reply(_: &Shared, rec: &mut Records, req: &Req) -> Reply {
    let name = req.param.clone();
    let unsigned = name.starts_with("unsigned");
    let id = req.header("webhook-id").unwrap_or("").to_string();
    let timestamp = req.header("webhook-timestamp").unwrap_or("").to_string();
    let bad_signature = || Reply::json(401, json!({"error": "invalid signature"}));
    if unsigned {
        if id.is_empty() {
            return Reply::json(400, json!({"error": "missing webhook-id header"}));
        }
    } else {
        let signatures = req.header("webhook-signature").unwrap_or("");
        if id.is_empty() || timestamp.is_empty() || signatures.is_empty() {
            return bad_signature();
        }
        let Ok(ts) = timestamp.parse::<i64>() else {
            return bad_signature();
        };
        let now = jiff::Timestamp::now().as_second();
        if (now - ts).abs() > 300 {
            return Reply::json(
                401,
                json!({"error": "timestamp outside the 300 s tolerance"}),
            );
        }
        let mac = webhook_mac(FakeProviders::WEBHOOK_SECRET, &id, &timestamp, &req.body);
        let verified = signatures.split_whitespace().any(|s| {
            s.strip_prefix("v1,")
                .and_then(|sig| b64().decode(sig).ok())
                .is_some_and(|sig| mac.clone().verify_slice(&sig).is_ok())
        });
        if !verified {
            return bad_signature();
        }
    }
    let body = match serde_json::from_slice::<Value>(&req.body) {
        Ok(v @ Value::Object(_)) => v,
        _ => return Reply::json(400, json!({"error": "body must be a JSON object"})),
    };
    if rec.webhook_ids.insert((name.clone(), id.clone())) {
        rec.webhooks.push(WebhookCall {
            name,
            id,
            timestamp,
            body,
            at: Instant::now(),
        });
    }
    Reply::empty(204)
}

// ---------------------------------------------------------------------------
// Form encoding

fn form_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'*' | b'-' | b'.' | b'_' => {
                out.push(b as char)
            }
            b' ' => out.push('+'),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => {
                let hex = std::str::from_utf8(&b[i + 1..i + 3]).ok();
                match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(v) => {
                        out.push(v);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn webhook_secret_is_the_documented_key() {
        let key = b64()
            .decode(
                FakeProviders::WEBHOOK_SECRET
                    .strip_prefix("whsec_")
                    .unwrap(),
            )
            .unwrap();
        assert_eq!(key, b"tocsin-webhook-test-key");
    }

    #[test]
    fn form_round_trip() {
        let enc = form_encode(&[("To", "+1 555"), ("Body", "a&b=c é%")]);
        assert_eq!(enc, "To=%2B1+555&Body=a%26b%3Dc+%C3%A9%25");
        assert_eq!(
            form_decode(&enc),
            vec![
                ("To".to_string(), "+1 555".to_string()),
                ("Body".to_string(), "a&b=c é%".to_string())
            ]
        );
        assert_eq!(form_decode("DateSent>=2024-01-02&x")[0].0, "DateSent>");
        assert_eq!(percent_decode("100%"), "100%");
        assert_eq!(percent_decode("%4"), "%4");
    }

    #[test]
    fn segments() {
        assert_eq!(sms_segments(&"a".repeat(160)), 1);
        assert_eq!(sms_segments(&"a".repeat(161)), 2);
        assert_eq!(sms_segments(&"a".repeat(306)), 2);
        assert_eq!(sms_segments(&"a".repeat(307)), 3);
        assert_eq!(sms_segments(&"€".repeat(80)), 1);
        assert_eq!(sms_segments(&"€".repeat(81)), 2);
        assert_eq!(sms_segments(&"é".repeat(160)), 1);
        assert_eq!(sms_segments(&"ł".repeat(70)), 1);
        assert_eq!(sms_segments(&"ł".repeat(71)), 2);
    }

    #[test]
    fn iso8601() {
        assert!(parses_as_iso8601("2015-07-17T08:42:58.315+0000"));
        assert!(parses_as_iso8601("2015-07-17T08:42:58.315+00:00"));
        assert!(parses_as_iso8601("2015-07-17T08:42:58Z"));
        assert!(parses_as_iso8601("2015-07-17T08:42:58"));
        assert!(!parses_as_iso8601("yesterday"));
        assert!(!parses_as_iso8601("2015-13-17T08:42:58Z"));
    }

    #[test]
    fn ts_keys_compare_numerically() {
        let k = |s: &str| ts_key(Some(&Value::String(s.into())));
        assert_eq!(k("1700000000.000123"), Some((1_700_000_000, 123)));
        assert_eq!(k("1700000000.5"), Some((1_700_000_000, 500_000)));
        assert_eq!(k("1700000000"), Some((1_700_000_000, 0)));
        assert!(k("1700000000.000123") < k("1700000000.1"));
        assert_eq!(k(""), None);
    }

    #[test]
    fn blocks_checks() {
        let button = |extra: Value| {
            let mut b = json!({"type": "button", "action_id": "ack", "value": "INC-1",
                               "text": {"type": "plain_text", "text": "Acknowledge"}});
            for (k, v) in extra.as_object().unwrap() {
                b[k] = v.clone();
            }
            json!([{"type": "actions", "block_id": "b", "elements": [b]}])
        };
        assert!(check_blocks(&button(json!({}))).is_ok());
        assert!(check_blocks(&button(json!({"style": "primary"}))).is_ok());
        assert!(check_blocks(&button(json!({"style": "default"}))).is_err());
        assert!(check_blocks(&button(json!({"text": {"type": "mrkdwn", "text": "x"}}))).is_err());
        assert!(check_blocks(&button(
            json!({"text": {"type": "plain_text", "text": "x".repeat(76)}})
        ))
        .is_err());
        assert!(check_blocks(&button(json!({"value": "x".repeat(2001)}))).is_err());
        assert!(check_blocks(&button(json!({"action_id": "x".repeat(256)}))).is_err());
        assert!(check_blocks(&json!([{"text": "no type"}])).is_err());
        assert!(check_blocks(&json!({"type": "section"})).is_err());
        assert!(check_blocks(&json!([{"type": "divider", "block_id": "a"},
                                     {"type": "divider", "block_id": "a"}]))
        .is_err());
    }
}
