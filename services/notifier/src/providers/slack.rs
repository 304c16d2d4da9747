//! Slack: the Web API (`chat.postMessage`, `chat.update` on acknowledge and
//! resolve, thread replies for status updates) or an incoming webhook.
//!
//! Web API messages carry Block Kit buttons whose `action_id`s are
//! [`tocsin_proto::notify::slack_actions`] and whose `value` is the incident
//! id, which the chat-ops service turns into commands. The message sits in
//! an attachment whose colour follows the incident's state. Slack answers
//! HTTP 200 to most failures: `ok` in the body decides.

use serde_json::{json, Value};
use tocsin_proto::{
    incident::{IncidentStatus, Severity},
    notify::{slack_actions, MessageKind, ProviderRef},
};
use tocsin_runtime::config::Secret;

use futures::future::BoxFuture;
use tocsin_proto::incident::IncidentSummary;

use super::{
    classify_http, exchange, http_client, Lookup, Outgoing, Provider, Rendered, SendError,
};
use crate::config::{SlackConfig, SlackMode};
use crate::record::Shown;

/// History pages read when looking for a message whose answer was lost.
pub const LOOKUP_PAGES: usize = 10;
/// Messages per history page (Slack recommends no more than 200).
pub const LOOKUP_PAGE_SIZE: usize = 200;

pub struct Slack {
    client: reqwest::Client,
    timeout: std::time::Duration,
    mode: SlackMode,
    api_url: String,
    token: Option<Secret>,
    webhook_url: Option<Secret>,
    channel_ids: std::collections::BTreeMap<String, String>,
}

/// Errors that cannot succeed on a retry.
const PERMANENT: &[&str] = &[
    "invalid_auth",
    "not_authed",
    "account_inactive",
    "token_revoked",
    "token_expired",
    "no_permission",
    "missing_scope",
    "channel_not_found",
    "not_in_channel",
    "is_archived",
    "msg_too_long",
    "no_text",
    "invalid_blocks",
    "invalid_attachments",
    "too_many_attachments",
    "invalid_arguments",
    "message_not_found",
    "cant_update_message",
    "edit_window_closed",
    "user_not_found",
    "restricted_action",
];

impl Slack {
    pub fn new(cfg: &SlackConfig) -> Result<Slack, String> {
        let token = cfg.token().map_err(|e| format!("slack: {e}"))?;
        let webhook_url = cfg.webhook_url().map_err(|e| format!("slack: {e}"))?;
        let mode = match (cfg.mode, &token, &webhook_url) {
            (Some(SlackMode::WebApi), None, _) => {
                return Err("slack: mode web_api needs `token` or `token_file`".into())
            }
            (Some(SlackMode::Webhook), _, None) => {
                return Err("slack: mode webhook needs `webhook_url` or `webhook_url_file`".into())
            }
            (Some(m), _, _) => m,
            (None, Some(_), _) => SlackMode::WebApi,
            (None, None, Some(_)) => SlackMode::Webhook,
            (None, None, None) => return Err(
                "slack: set `token` (Web API, with buttons) or `webhook_url` (incoming webhook)"
                    .into(),
            ),
        };
        Ok(Slack {
            client: http_client(cfg.guard.timeout.get()),
            timeout: cfg.guard.timeout.get(),
            mode,
            api_url: cfg
                .api_url
                .as_ref()
                .map(|u| u.0.trim_end_matches('/').to_string())
                .unwrap_or_else(|| "https://slack.com/api".into()),
            token,
            webhook_url,
            channel_ids: cfg.channel_ids.clone(),
        })
    }

    pub fn mode(&self) -> SlackMode {
        self.mode
    }

    /// Sends a page, or for `Acknowledged`/`Resolved` updates the message
    /// named by `out.reference`; a status update is a thread reply.
    pub async fn send_text(&self, out: &Outgoing, text: &str) -> Result<ProviderRef, SendError> {
        if self.mode == SlackMode::Webhook {
            return self.webhook(out, text).await;
        }
        match (&out.kind, &out.reference) {
            (MessageKind::StatusUpdate, Some(ProviderRef::SlackMessage { channel, ts })) => {
                let body = json!({
                    "channel": channel,
                    "thread_ts": ts,
                    "text": text,
                    "unfurl_links": false,
                });
                let answer = self.call("chat.postMessage", &body).await?;
                Ok(ProviderRef::SlackMessage {
                    channel: answer["channel"].as_str().unwrap_or(channel).to_string(),
                    ts: answer["ts"].as_str().unwrap_or_default().to_string(),
                })
            }
            (_, Some(ProviderRef::SlackMessage { channel, ts })) => {
                let mut body = message(out, text);
                body["channel"] = json!(channel);
                body["ts"] = json!(ts);
                self.call("chat.update", &body).await?;
                Ok(ProviderRef::SlackMessage {
                    channel: channel.clone(),
                    ts: ts.clone(),
                })
            }
            _ => {
                let mut body = message(out, text);
                body["channel"] = json!(out.address);
                body["unfurl_links"] = json!(false);
                // Lets a notifier that crashed mid-request find the message
                // (conversations.history) instead of posting it twice.
                body["metadata"] = json!({
                    "event_type": "tocsin_page",
                    "event_payload": {"delivery_id": out.id, "incident": out.incident.id.to_string()},
                });
                let answer = self.call("chat.postMessage", &body).await?;
                match (answer["channel"].as_str(), answer["ts"].as_str()) {
                    (Some(c), Some(ts)) => Ok(ProviderRef::SlackMessage {
                        channel: c.to_string(),
                        ts: ts.to_string(),
                    }),
                    _ => Err(SendError::permanent(
                        "Slack answered ok without channel and ts",
                    )),
                }
            }
        }
    }

    /// After a crash mid-request: was this message posted? Pages through
    /// the channel's history (newest first, `cursor` after `cursor`) back
    /// to a minute before the attempt, looking for the delivery id the
    /// message carries as metadata. Bounded: past [`LOOKUP_PAGES`] pages it
    /// cannot decide.
    pub async fn find_posted(&self, out: &Outgoing, since: jiff::Timestamp) -> Lookup {
        if self.mode == SlackMode::Webhook || out.reference.is_some() {
            // An incoming webhook cannot be read back; updates are idempotent.
            return Lookup::NotPossible;
        }
        let channel = if out.address.starts_with('U') || out.address.starts_with('W') {
            match self
                .call("conversations.open", &json!({"users": out.address}))
                .await
            {
                Ok(answer) => match answer["channel"]["id"].as_str() {
                    Some(id) => id.to_string(),
                    None => {
                        return Lookup::Undecided(
                            "Slack conversations.open answered without a channel id".into(),
                        )
                    }
                },
                Err(e @ SendError::Retry { .. }) => return Lookup::Unreachable(e),
                Err(e) => return Lookup::Undecided(e.reason().to_string()),
            }
        } else if let Some(id) = self.channel_ids.get(&out.address) {
            id.clone()
        } else if out.address.starts_with('#') {
            return Lookup::Undecided(format!(
                "cannot read the history of {} by name: map it to its id in notifier.slack.channel_ids",
                out.address
            ));
        } else {
            out.address.clone()
        };
        let oldest = since
            .checked_sub(jiff::SignedDuration::from_secs(60))
            .unwrap_or(since);
        let mut cursor: Option<String> = None;
        for _ in 0..LOOKUP_PAGES {
            let mut args = json!({
                "channel": channel,
                "oldest": super::epoch_string(oldest),
                "include_all_metadata": true,
                "limit": LOOKUP_PAGE_SIZE,
            });
            if let Some(c) = &cursor {
                args["cursor"] = json!(c);
            }
            let answer = match self.call("conversations.history", &args).await {
                Ok(a) => a,
                Err(e @ SendError::Retry { .. }) => return Lookup::Unreachable(e),
                Err(e) => return Lookup::Undecided(e.reason().to_string()),
            };
            let found = answer["messages"].as_array().and_then(|ms| {
                ms.iter().find(|m| {
                    m["metadata"]["event_payload"]["delivery_id"].as_str() == Some(out.id.as_str())
                })
            });
            if let Some(ts) = found.and_then(|m| m["ts"].as_str()) {
                return Lookup::Found(ProviderRef::SlackMessage {
                    channel: channel.clone(),
                    ts: ts.to_string(),
                });
            }
            let next = answer["response_metadata"]["next_cursor"]
                .as_str()
                .filter(|c| !c.is_empty());
            match (answer["has_more"].as_bool().unwrap_or(false), next) {
                (true, Some(c)) => cursor = Some(c.to_string()),
                _ => return Lookup::NotFound,
            }
        }
        Lookup::Undecided(format!(
            "more than {} messages in {channel} since the attempt",
            LOOKUP_PAGES * LOOKUP_PAGE_SIZE
        ))
    }

    async fn call(&self, method: &str, body: &Value) -> Result<Value, SendError> {
        let token = self
            .token
            .as_ref()
            .ok_or_else(|| SendError::permanent("no Slack token configured"))?;
        let (status, after, text) = exchange(
            self.client
                .post(format!("{}/{method}", self.api_url))
                .bearer_auth(token.expose())
                .header("content-type", "application/json; charset=utf-8")
                .json(body),
        )
        .await?;
        if status != 200 {
            return Err(classify_http(
                status,
                after,
                format!("Slack {method}: HTTP {status}: {}", short(&text)),
            ));
        }
        let answer: Value = serde_json::from_str(&text)
            .map_err(|_| SendError::retry(format!("Slack {method}: not JSON: {}", short(&text))))?;
        if answer["ok"].as_bool() == Some(true) {
            return Ok(answer);
        }
        let error = answer["error"]
            .as_str()
            .unwrap_or("unknown_error")
            .to_string();
        let reason = format!("Slack {method}: {error}");
        if error == "ratelimited" {
            Err(SendError::Retry {
                reason,
                retry_after: after,
                maybe_arrived: false,
                rate_limited: true,
            })
        } else if PERMANENT.contains(&error.as_str()) {
            Err(SendError::permanent(reason))
        } else {
            Err(SendError::retry(reason))
        }
    }

    async fn webhook(&self, out: &Outgoing, text: &str) -> Result<ProviderRef, SendError> {
        let url = self
            .webhook_url
            .as_ref()
            .ok_or_else(|| SendError::permanent("no Slack webhook URL configured"))?;
        let mut body = message(out, text);
        // Incoming-webhook messages cannot be interactive here.
        strip_actions(&mut body);
        let (status, after, text) = exchange(self.client.post(url.expose()).json(&body)).await?;
        if status == 200 {
            Ok(ProviderRef::SlackWebhook)
        } else {
            Err(classify_http(
                status,
                after,
                format!("Slack webhook: HTTP {status}: {}", short(&text)),
            ))
        }
    }
}

impl Provider for Slack {
    fn name(&self) -> &str {
        "slack"
    }

    fn timeout(&self) -> std::time::Duration {
        self.timeout
    }

    /// Slack limits posting per channel.
    fn destination(&self, reference: Option<&ProviderRef>, _: &str, address: &str) -> String {
        match reference {
            Some(ProviderRef::SlackMessage { channel, .. }) => channel.clone(),
            _ => address.to_string(),
        }
    }

    fn send<'a>(
        &'a self,
        out: &'a Outgoing,
        r: &'a Rendered,
    ) -> BoxFuture<'a, Result<ProviderRef, SendError>> {
        Box::pin(async move { self.send_text(out, &r.text()).await })
    }

    fn find_sent<'a>(
        &'a self,
        out: &'a Outgoing,
        _: &'a Rendered,
        since: jiff::Timestamp,
    ) -> BoxFuture<'a, Lookup> {
        Box::pin(self.find_posted(out, since))
    }

    /// A Web API message is edited to show the incident now (colour,
    /// buttons, who acknowledged); an incoming webhook posts a new message
    /// for an acknowledgement or a resolve.
    fn update(
        &self,
        sent: &ProviderRef,
        shown: &Shown,
        now: &IncidentSummary,
    ) -> Option<MessageKind> {
        let by = now.acknowledged_by.as_ref().map(|a| a.name.clone());
        let same = shown.status == now.status
            && (now.status != IncidentStatus::Acknowledged || shown.by == by);
        if same {
            return None;
        }
        match sent {
            ProviderRef::SlackMessage { .. } => Some(super::kind_showing(now.status)),
            ProviderRef::SlackWebhook if now.status != IncidentStatus::Triggered => {
                Some(super::kind_showing(now.status))
            }
            ProviderRef::SlackWebhook => Some(MessageKind::Page),
            _ => None,
        }
    }

    fn may_update(&self, sent: &ProviderRef) -> bool {
        matches!(
            sent,
            ProviderRef::SlackMessage { .. } | ProviderRef::SlackWebhook
        )
    }
}

fn short(s: &str) -> String {
    let s = s.trim();
    if s.chars().count() > 300 {
        s.chars().take(300).collect::<String>() + "…"
    } else {
        s.to_string()
    }
}

/// Colour of the attachment bar: red/orange while open, yellow once
/// acknowledged, green when resolved.
fn colour(out: &Outgoing) -> &'static str {
    match out.incident.status {
        IncidentStatus::Resolved => "#2EB67D",
        IncidentStatus::Acknowledged => "#ECB22E",
        IncidentStatus::Triggered => match out.incident.severity {
            Severity::Critical | Severity::High => "#E01E5A",
            _ => "#F2952F",
        },
    }
}

/// The message: fallback `text`, and one attachment (for the colour) with
/// the rendered section and the buttons the incident's state allows.
fn message(out: &Outgoing, text: &str) -> Value {
    let value = out.incident.id.to_string();
    let button = |action: &str, label: &str, style: Option<&str>| {
        let mut b = json!({
            "type": "button",
            "action_id": action,
            "value": value,
            "text": {"type": "plain_text", "text": label},
        });
        if let Some(s) = style {
            b["style"] = json!(s);
        }
        b
    };
    let buttons: Vec<Value> = match out.incident.status {
        IncidentStatus::Triggered => vec![
            button(slack_actions::ACK, "Acknowledge", Some("primary")),
            button(slack_actions::RESOLVE, "Resolve", None),
            button(slack_actions::ESCALATE, "Escalate", Some("danger")),
            button(slack_actions::SNOOZE, "Snooze 1h", None),
        ],
        IncidentStatus::Acknowledged => vec![
            button(slack_actions::RESOLVE, "Resolve", Some("primary")),
            button(slack_actions::ESCALATE, "Escalate", Some("danger")),
            button(slack_actions::UNACK, "Unacknowledge", None),
        ],
        IncidentStatus::Resolved => vec![],
    };
    // Section text is limited to 3000 characters.
    let section: String = text.chars().take(3000).collect();
    let mut blocks = vec![json!({
        "type": "section",
        "text": {"type": "mrkdwn", "text": section},
    })];
    if !buttons.is_empty() {
        blocks.push(json!({
            "type": "actions",
            "block_id": format!("tocsin_{}", out.incident.number),
            "elements": buttons,
        }));
    }
    let fallback: String = text
        .lines()
        .next()
        .unwrap_or_default()
        .chars()
        .take(3000)
        .collect();
    json!({
        "text": fallback,
        "attachments": [{"color": colour(out), "fallback": fallback, "blocks": blocks}],
    })
}

fn strip_actions(body: &mut Value) {
    if let Some(atts) = body["attachments"].as_array_mut() {
        for a in atts {
            if let Some(blocks) = a["blocks"].as_array_mut() {
                blocks.retain(|b| b["type"] != "actions");
            }
        }
    }
}
