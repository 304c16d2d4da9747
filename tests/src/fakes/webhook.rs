//! The Standard Webhooks receiver fake: `POST /hooks/{name}`.
//!
//! Signed requests are verified as the Standard Webhooks specification
//! says (`webhook-id`, `webhook-timestamp` within 300 s, one valid
//! `v1,<base64 HMAC-SHA256>` among the space-separated signatures); a
//! receiver whose name starts with `unsigned` only needs `webhook-id`. A
//! repeated `webhook-id` is answered 204 again but recorded once, as a
//! receiver that de-duplicates would.

use std::{collections::HashSet, time::Instant};

use base64::Engine as _;
use hmac::{Hmac, Mac};
use serde_json::{json, Value};
use sha2::Sha256;

use super::{
    server::{b64, reason, Ctx, Reply},
    FakeProviders,
};

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

/// What the webhook receivers hold.
#[derive(Clone, Default)]
pub(super) struct State {
    calls: Vec<WebhookCall>,
    ids: HashSet<(String, String)>,
}

impl FakeProviders {
    /// URL of the webhook receiver `name` (names starting `unsigned` skip signature checks).
    pub fn webhook_url(&self, name: &str) -> String {
        format!("{}/hooks/{name}", self.base_url())
    }

    /// Accepted webhook calls (one per `webhook-id`), in arrival order.
    pub fn webhooks(&self) -> Vec<WebhookCall> {
        self.lock().webhook.calls.clone()
    }
}

/// The Standard Webhooks signature header value (`v1,<base64>`) for a request.
pub fn webhook_signature(secret: &str, id: &str, timestamp: &str, body: &[u8]) -> String {
    let mac = webhook_mac(secret, id, timestamp, body);
    format!("v1,{}", b64().encode(mac.finalize().into_bytes()))
}

/// A receiver's answer to an injected failure with HTTP `code`.
pub(super) fn status_reply(code: u16) -> Reply {
    Reply::json(code, json!({"error": reason(code)}))
}

/// A receiver's answer to an injected rate limit.
pub(super) fn rate_limited_reply() -> Reply {
    Reply::json(429, json!({"error": "rate limited"}))
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

/// `POST /hooks/{name}`. A rate limit set with
/// [`FakeProviders::set_rate_limit`] applies per receiver before any
/// check: 429 with `Retry-After`.
pub(super) fn receive(ctx: &mut Ctx<'_>) -> Reply {
    if let Some(after) = ctx.throttled() {
        return rate_limited_reply()
            .with_header("retry-after", after)
            .throttled();
    }
    let req = ctx.req;
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
    let state = &mut ctx.rec.webhook;
    if state.ids.insert((name.clone(), id.clone())) {
        state.calls.push(WebhookCall {
            name,
            id,
            timestamp,
            body,
            at: Instant::now(),
        });
    }
    Reply::empty(204)
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
}
