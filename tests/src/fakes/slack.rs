//! The Slack fake: the Web API (`chat.postMessage`, `chat.update`,
//! `conversations.open`, `conversations.history`) under `/slack/api/`,
//! incoming webhooks under `/slack/services/`, and the `response_url`s
//! Slack hands to interactions under `/slack/actions/`.
//!
//! Requests are checked as Slack does: a bot token (bearer header, or a
//! `token` argument in a form body), JSON bodies for `chat.*`, JSON, form
//! or query arguments for `conversations.*`, Block Kit checks for what the
//! engine can get wrong. Errors are Slack's: HTTP 200 with
//! `{"ok":false,"error":…}`. Message `ts` values come from the wall clock
//! (microseconds, strictly increasing), as Slack's do, so `oldest` filters
//! computed from real time work in `conversations.history`.

use std::{
    collections::{BTreeMap, HashSet},
    time::Instant,
};

use axum::http::Method;
use base64::Engine as _;
use serde_json::{json, Map, Value};

use super::{
    form::form_decode,
    server::{b64, str_arg, Ctx, Reply, Req},
    FakeProviders,
};

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

/// An accepted post to an interaction's `response_url`.
#[derive(Clone, Debug)]
pub struct SlackResponse {
    /// The URL's `T…/…/…` path, as handed out by
    /// [`FakeProviders::slack_response_url`].
    pub path: String,
    /// `response_type` (`ephemeral` when absent, as at Slack).
    pub response_type: String,
    /// The `text` (`""` if absent).
    pub text: String,
    /// The whole body.
    pub body: Value,
    /// When it arrived.
    pub at: Instant,
}

/// What the Slack fake holds.
#[derive(Clone, Default)]
pub(super) struct State {
    posts: Vec<SlackPost>,
    updates: Vec<SlackUpdate>,
    messages: Vec<SlackMessage>,
    webhook_posts: Vec<Value>,
    responses: Vec<SlackResponse>,
}

/// A Slack message as it stands now (after updates), for `conversations.history`.
#[derive(Clone)]
struct SlackMessage {
    channel: String,
    ts: String,
    text: String,
    blocks: Value,
    attachments: Value,
    metadata: Value,
    thread_ts: Option<String>,
}

impl FakeProviders {
    /// Slack Web API base; append `/chat.postMessage` etc.
    pub fn slack_api_url(&self) -> String {
        format!("{}/slack/api", self.base_url())
    }

    /// A Slack incoming-webhook URL.
    pub fn slack_webhook_url(&self) -> String {
        format!("{}/slack/services/T000/B000/XXXX", self.base_url())
    }

    /// Accepted `chat.postMessage` calls, in arrival order.
    pub fn slack_posts(&self) -> Vec<SlackPost> {
        self.lock().slack.posts.clone()
    }

    /// Accepted `chat.update` calls, in arrival order.
    pub fn slack_updates(&self) -> Vec<SlackUpdate> {
        self.lock().slack.updates.clone()
    }

    /// How many accepted `chat.update`s each posted message got, by its
    /// `ts` (0 for a message never updated).
    pub fn slack_updates_per_ts(&self) -> BTreeMap<String, usize> {
        let rec = self.lock();
        let mut counts: BTreeMap<String, usize> =
            rec.slack.posts.iter().map(|p| (p.ts.clone(), 0)).collect();
        for u in &rec.slack.updates {
            *counts.entry(u.ts.clone()).or_default() += 1;
        }
        counts
    }

    /// A message as it stands now (after every `chat.update`): `text`,
    /// `blocks`, `attachments` (colour and the blocks with the buttons)
    /// and `metadata`; None if no such message was posted.
    pub fn slack_message(&self, channel: &str, ts: &str) -> Option<Value> {
        self.lock()
            .slack
            .messages
            .iter()
            .find(|m| m.channel == channel && m.ts == ts)
            .map(|m| {
                json!({"text": m.text, "blocks": m.blocks, "attachments": m.attachments,
                       "metadata": m.metadata})
            })
    }

    /// Accepted Slack incoming-webhook bodies, in arrival order.
    pub fn slack_webhook_posts(&self) -> Vec<Value> {
        self.lock().slack.webhook_posts.clone()
    }

    /// A fresh interaction `response_url` (Slack's are
    /// `https://hooks.slack.com/actions/T…/<n>/<secret>`); `n` tells them apart.
    pub fn slack_response_url(&self, n: u64) -> String {
        format!("{}/slack/actions/T000/{n}/R{n:06}", self.base_url())
    }

    /// Accepted posts to response URLs, in arrival order.
    pub fn slack_responses(&self) -> Vec<SlackResponse> {
        self.lock().slack.responses.clone()
    }
}

/// The Web API's answer to an injected failure with HTTP `code`.
pub(super) fn api_status_reply(code: u16) -> Reply {
    let error = match code {
        429 => "ratelimited",
        500.. => "fatal_error",
        _ => "request_failed",
    };
    Reply::json(code, json!({"ok": false, "error": error}))
}

/// An incoming webhook's answer to an injected failure with HTTP `code`.
pub(super) fn webhook_status_reply(code: u16) -> Reply {
    Reply::text(
        code,
        match code {
            400 => "invalid_payload",
            403 => "action_prohibited",
            404 => "channel_not_found",
            410 => "channel_is_archived",
            429 => "rate_limited",
            _ => "rollup_error",
        },
    )
}

// ---------------------------------------------------------------------------
// Web API

fn slack_err(error: &str) -> Reply {
    Reply::json(200, json!({"ok": false, "error": error})).failed()
}

fn slack_err_msg(error: &str, message: String) -> Reply {
    Reply::json(
        200,
        json!({"ok": false, "error": error,
               "response_metadata": {"messages": [format!("[ERROR] {message}")]}}),
    )
    .failed()
}

/// Whether the method takes JSON bodies only (`chat.*`) or also form
/// bodies and queries (`conversations.*`); `None` for a method the fake
/// does not know.
fn json_only(method: &str) -> Option<bool> {
    match method {
        "chat.postMessage" | "chat.update" => Some(true),
        "conversations.open" | "conversations.history" => Some(false),
        _ => None,
    }
}

/// The arguments (JSON body, or for `conversations.*` a form body or a
/// GET query) and a `token` argument given in a form.
fn parse_args(req: &Req, json_only: bool) -> Result<(Map<String, Value>, Option<String>), Reply> {
    let mut form_token = None;
    let args = if req.method == Method::GET && !json_only {
        form_args(&req.query, &mut form_token)
    } else {
        match req.media_type().as_deref() {
            None => return Err(slack_err("missing_post_type")),
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
                    return Err(slack_err("invalid_charset"));
                }
                match serde_json::from_slice::<Value>(&req.body) {
                    Ok(Value::Object(m)) => m,
                    _ => return Err(slack_err("invalid_json")),
                }
            }
            Some("application/x-www-form-urlencoded") if !json_only => {
                form_args(&String::from_utf8_lossy(&req.body), &mut form_token)
            }
            Some(_) => return Err(slack_err("invalid_post_type")),
        }
    };
    Ok((args, form_token))
}

/// Posting to a user id goes to the DM with that user.
fn conversation_of(channel: &str) -> String {
    match channel.strip_prefix('U') {
        Some(rest) => format!("D{rest}"),
        None => channel.to_string(),
    }
}

/// The method, and the conversation it is about (`""` if none is named).
pub(super) fn describe_api(req: &Req) -> (String, String) {
    let method = req.param.clone();
    let args = json_only(&method).and_then(|j| parse_args(req, j).ok());
    let destination = match args {
        Some((args, _)) if method == "conversations.open" => match args.get("users") {
            Some(Value::Array(users)) => users
                .iter()
                .filter_map(Value::as_str)
                .collect::<Vec<_>>()
                .join(","),
            _ => str_arg(&args, "users").to_string(),
        },
        Some((args, _)) => conversation_of(str_arg(&args, "channel")),
        None => String::new(),
    };
    (method, destination)
}

/// The Web API: `/slack/api/{method}`.
///
/// Slack limits each method "per API method per app per workspace", and
/// `chat.postMessage` also per channel ("generally allows posting one
/// message per second per channel"); over a limit it answers HTTP 429 with
/// `{"ok":false,"error":"ratelimited"}` and a `Retry-After` header of
/// seconds ("Refer to the `Retry-After` header for when to retry the
/// request").
/// The fake applies a limit set with
/// [`FakeProviders::set_rate_limit`] (`chat.postMessage`) or
/// [`FakeProviders::set_operation_rate_limit`] (any method) once the token
/// is checked (a limit is the app's) and before the method's own checks.
pub(super) fn api(ctx: &mut Ctx<'_>) -> Reply {
    let req = ctx.req;
    let method = req.param.as_str();
    let Some(json_only) = json_only(method) else {
        return Reply::json(404, json!({"ok": false, "error": "unknown_method"}));
    };
    let (args, form_token) = match parse_args(req, json_only) {
        Ok(parsed) => parsed,
        Err(reply) => return reply,
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
    if let Some(after) = ctx.throttled() {
        return api_status_reply(429)
            .with_header("retry-after", after)
            .throttled();
    }
    match method {
        "chat.postMessage" => post_message(ctx, args),
        "chat.update" => update(ctx, args),
        "conversations.open" => open(&args),
        _ => history(&ctx.rec.slack, &args),
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
fn content(args: &Map<String, Value>) -> Result<(String, Value, Value), Reply> {
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

fn post_message(ctx: &mut Ctx<'_>, args: Map<String, Value>) -> Reply {
    let channel = str_arg(&args, "channel");
    if channel.is_empty() {
        return slack_err("channel_not_found");
    }
    let (text, blocks, metadata) = match content(&args) {
        Ok(c) => c,
        Err(r) => return r,
    };
    let channel = conversation_of(channel);
    let ts = ctx.shared.next_ts();
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
    let state = &mut ctx.rec.slack;
    state.messages.push(SlackMessage {
        channel: channel.clone(),
        ts: ts.clone(),
        text: text.clone(),
        blocks: blocks.clone(),
        attachments: json_arg(&args, "attachments").unwrap_or(Value::Null),
        metadata: metadata.clone(),
        thread_ts,
    });
    state.posts.push(SlackPost {
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

fn update(ctx: &mut Ctx<'_>, args: Map<String, Value>) -> Reply {
    let state = &mut ctx.rec.slack;
    let channel = str_arg(&args, "channel").to_string();
    if channel.is_empty() {
        return slack_err("channel_not_found");
    }
    let ts = str_arg(&args, "ts").to_string();
    let Some(idx) = state
        .messages
        .iter()
        .position(|m| m.channel == channel && m.ts == ts)
    else {
        return slack_err("message_not_found");
    };
    let (text, blocks, metadata) = match content(&args) {
        Ok(c) => c,
        Err(r) => return r,
    };
    let stored = &mut state.messages[idx];
    stored.text = text.clone();
    if blocks != Value::Null {
        stored.blocks = blocks.clone();
    }
    // chat.update replaces the attachments it is given.
    if let Ok(a) = json_arg(&args, "attachments") {
        if a != Value::Null {
            stored.attachments = a;
        }
    }
    if metadata != Value::Null {
        stored.metadata = metadata;
    }
    let mut message = json!({"type": "message", "text": text, "ts": ts});
    if stored.blocks != Value::Null {
        message["blocks"] = stored.blocks.clone();
    }
    state.updates.push(SlackUpdate {
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

fn open(args: &Map<String, Value>) -> Reply {
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

/// A timestamp argument: `Ok(None)` if absent or empty, `Err` if it does
/// not parse.
fn ts_arg(args: &Map<String, Value>, key: &str) -> Result<Option<(u64, u64)>, ()> {
    match args.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.trim().is_empty() => Ok(None),
        v => ts_key(v).map(Some).ok_or(()),
    }
}

/// The cursor naming the message a page starts at. Slack's cursors for
/// this method are opaque strings; the ones it hands out decode as
/// base64 of `next_ts:` and that message's `ts` without its dot (the
/// reference's example `bmV4dF90czoxNTEyMDg1ODYxMDAwNTQz` is
/// `next_ts:1512085861000543`), and so are the fake's.
fn cursor_for(ts: (u64, u64)) -> String {
    b64().encode(format!("next_ts:{}{:06}", ts.0, ts.1))
}

/// The `ts` a cursor names, or `None` if it is not one this method handed out.
fn cursor_ts(cursor: &str) -> Option<(u64, u64)> {
    let decoded = String::from_utf8(b64().decode(cursor.trim()).ok()?).ok()?;
    let digits = decoded.strip_prefix("next_ts:")?;
    if digits.len() <= 6 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let (secs, micros) = digits.split_at(digits.len() - 6);
    Some((secs.parse().ok()?, micros.parse().ok()?))
}

/// `conversations.history`, paginated as the Slack API reference says:
///
/// - `limit`: "The maximum number of items to return. Fewer than the
///   requested number of items may be returned, even if the end of the
///   conversation history hasn't been reached. Maximum of 999." Default
///   100; "We recommend no more than 200 results at a time." The
///   reference documents no error for a larger value; the fake caps it
///   at 999.
/// - "The most recent messages in the time range are returned first."
/// - `oldest`: "Only messages after this Unix timestamp will be included
///   in results." `latest`: "Only messages before this Unix timestamp will
///   be included in results. Default is the current time." `inclusive`:
///   "Include messages with `oldest` or `latest` timestamps in results.
///   Ignored unless either timestamp is specified." A timestamp that does
///   not parse is `invalid_ts_oldest` / `invalid_ts_latest`.
/// - "Responses will include a top-level `response_metadata` attribute
///   containing a `next_cursor` value. By using this value as a `cursor`
///   parameter in a subsequent request, along with `limit`, you may
///   navigate through the collection page by virtual page." The fake
///   includes it only while `has_more` is true ("An empty, null, or
///   non-existent `next_cursor` in the response indicates no further
///   results"); the next call repeats the other arguments and adds
///   `cursor`. A cursor this method did not hand out is `invalid_cursor`
///   ("Value passed for `cursor` was not valid or is no longer valid.").
/// - `include_all_metadata`: "Return all metadata associated with this
///   message." Default false: messages carry `metadata` only when it is
///   true.
fn history(state: &State, args: &Map<String, Value>) -> Reply {
    let channel = str_arg(args, "channel");
    if channel.is_empty() {
        return slack_err("channel_not_found");
    }
    let Ok(oldest) = ts_arg(args, "oldest") else {
        return slack_err("invalid_ts_oldest");
    };
    let Ok(latest) = ts_arg(args, "latest") else {
        return slack_err("invalid_ts_latest");
    };
    let start = match str_arg(args, "cursor") {
        "" => None,
        c => match cursor_ts(c) {
            Some(ts) => Some(ts),
            None => return slack_err("invalid_cursor"),
        },
    };
    let inclusive = truthy(args.get("inclusive"));
    let with_metadata = truthy(args.get("include_all_metadata"));
    let limit = match args.get("limit") {
        Some(Value::Number(n)) => n.as_u64().unwrap_or(100),
        Some(Value::String(s)) => s.parse().unwrap_or(100),
        _ => 100,
    }
    .clamp(1, 999) as usize;
    let mut found: Vec<((u64, u64), &SlackMessage)> = state
        .messages
        .iter()
        .filter(|m| m.channel == channel)
        .filter_map(|m| Some((ts_key(Some(&Value::String(m.ts.clone())))?, m)))
        .filter(|(key, _)| {
            let after = oldest.is_none_or(|o| if inclusive { *key >= o } else { *key > o });
            let before = latest.is_none_or(|l| if inclusive { *key <= l } else { *key < l });
            // The cursor names the first message of its page.
            let from_cursor = start.is_none_or(|s| *key <= s);
            after && before && from_cursor
        })
        .collect();
    found.sort_by_key(|(key, _)| std::cmp::Reverse(*key));
    let next = found.get(limit).map(|(key, _)| *key);
    let messages: Vec<Value> = found
        .into_iter()
        .take(limit)
        .map(|(_, m)| {
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
    let mut answer = json!({"ok": true, "messages": messages, "has_more": next.is_some(),
                            "pin_count": 0});
    if let Some(ts) = next {
        answer["response_metadata"] = json!({"next_cursor": cursor_for(ts)});
    }
    Reply::json(200, answer)
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
// Incoming webhooks

/// An incoming webhook: `/slack/services/T…/B…/…`. A rate limit applies
/// per webhook URL before any check, answered as Slack does: 429,
/// `Retry-After`, `rate_limited`.
pub(super) fn incoming_webhook(ctx: &mut Ctx<'_>) -> Reply {
    if let Some(after) = ctx.throttled() {
        return webhook_status_reply(429)
            .with_header("retry-after", after)
            .throttled();
    }
    let req = ctx.req;
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
    ctx.rec.slack.webhook_posts.push(Value::Object(body));
    Reply::text(200, "ok")
}

// ---------------------------------------------------------------------------
// Response URLs

/// A post to an interaction's `response_url`: JSON with `text` or
/// `blocks`; `response_type` `ephemeral` or `in_channel`;
/// `replace_original` / `delete_original` booleans. Slack answers `ok`.
pub(super) fn response_url(ctx: &mut Ctx<'_>) -> Reply {
    let req = ctx.req;
    if req.media_type().as_deref() != Some("application/json") {
        return Reply::text(400, "invalid_payload").failed();
    }
    let Ok(Value::Object(body)) = serde_json::from_slice::<Value>(&req.body) else {
        return Reply::text(400, "invalid_payload");
    };
    let text = str_arg(&body, "text").to_string();
    let Ok(blocks) = json_arg(&body, "blocks") else {
        return Reply::text(400, "invalid_blocks");
    };
    if text.is_empty() && !non_empty(&blocks) {
        return Reply::text(400, "no_text");
    }
    let response_type = match body.get("response_type") {
        None => "ephemeral".to_string(),
        Some(Value::String(t)) if t == "ephemeral" || t == "in_channel" => t.clone(),
        Some(_) => return Reply::text(400, "invalid_response_type"),
    };
    for flag in ["replace_original", "delete_original"] {
        if body.get(flag).is_some_and(|v| !v.is_boolean()) {
            return Reply::text(400, "invalid_payload");
        }
    }
    ctx.rec.slack.responses.push(SlackResponse {
        path: req.param.clone(),
        response_type,
        text,
        body: Value::Object(body),
        at: Instant::now(),
    });
    Reply::json(200, json!({"ok": true}))
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn cursors_are_slack_shaped() {
        // The reference's example cursor names the message it starts at.
        assert_eq!(
            cursor_ts("bmV4dF90czoxNTEyMDg1ODYxMDAwNTQz"),
            Some((1_512_085_861, 543))
        );
        assert_eq!(
            cursor_for((1_512_085_861, 543)),
            "bmV4dF90czoxNTEyMDg1ODYxMDAwNTQz"
        );
        assert_eq!(cursor_ts("bmV4dF90czo="), None, "next_ts: without digits");
        assert_eq!(cursor_ts("!"), None);
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
