//! Generic outbound webhooks (Discord, Teams and anything else through
//! their webhooks), signed the Standard Webhooks way when a secret is set:
//! `webhook-id` (stable across retries, so receivers drop repeats),
//! `webhook-timestamp` and `webhook-signature: v1,<base64 HMAC-SHA256>`.

use base64::Engine;
use hmac::{Hmac, Mac};
use serde_json::json;
use sha2::Sha256;
use tocsin_proto::notify::ProviderRef;
use tocsin_runtime::config::Secret;

use futures::future::BoxFuture;
use tocsin_proto::{
    incident::{IncidentStatus, IncidentSummary},
    notify::MessageKind,
};

use super::{classify_http, exchange, http_client, Outgoing, Provider, Rendered, SendError};
use crate::config::WebhookConfig;
use crate::record::Shown;

pub struct Webhook {
    pub name: String,
    /// `webhook:<name>`: its breaker and metrics are its own.
    provider_name: String,
    timeout: std::time::Duration,
    client: reqwest::Client,
    url: Secret,
    key: Option<Vec<u8>>,
    pub updates: bool,
    drops_repeats: bool,
}

/// Decodes a `whsec_<base64>` secret.
pub fn decode_secret(s: &str) -> Result<Vec<u8>, String> {
    let b64 = s.strip_prefix("whsec_").unwrap_or(s);
    base64::engine::general_purpose::STANDARD
        .decode(b64)
        .map_err(|_| "the webhook secret is not `whsec_` followed by base64".to_string())
}

/// `v1,<base64(HMAC-SHA256(key, "{id}.{timestamp}.{body}"))>`.
pub fn sign(key: &[u8], id: &str, timestamp: i64, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes any key length");
    mac.update(format!("{id}.{timestamp}.").as_bytes());
    mac.update(body);
    format!(
        "v1,{}",
        base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
    )
}

impl Webhook {
    pub fn new(cfg: &WebhookConfig) -> Result<Webhook, String> {
        let url = cfg.url()?;
        if !(url.expose().starts_with("http://") || url.expose().starts_with("https://")) {
            return Err(format!(
                "webhook {:?}: url must start with https:// (or http://)",
                cfg.name
            ));
        }
        let key = match cfg.secret()? {
            Some(s) => Some(
                decode_secret(s.expose()).map_err(|e| format!("webhook {:?}: {e}", cfg.name))?,
            ),
            None => None,
        };
        Ok(Webhook {
            name: cfg.name.clone(),
            provider_name: format!("webhook:{}", cfg.name),
            timeout: cfg.guard.timeout.get(),
            client: http_client(cfg.guard.timeout.get()),
            url,
            key,
            updates: cfg.updates,
            drops_repeats: cfg.drops_repeats,
        })
    }

    pub async fn post(&self, out: &Outgoing, text: &str) -> Result<ProviderRef, SendError> {
        let id = format!("msg_{}", out.short_id());
        let page = out.page.as_ref().map(|p| {
            json!({
                "id": p.id,
                "level": p.level,
                "repeat": p.repeat,
                "reason": p.reason,
                "target": p.target.key(),
            })
        });
        let body = json!({
            "type": format!("incident.{}", out.kind.as_str()),
            "id": out.id,
            "text": text,
            // Discord reads `content`, Teams and Mattermost read `text`.
            "content": text,
            "incident": out.ctx.incident,
            "page": page,
        });
        let bytes = serde_json::to_vec(&body).map_err(|e| SendError::permanent(e.to_string()))?;
        let ts = jiff::Timestamp::now().as_second();
        let mut req = self
            .client
            .post(self.url.expose())
            .header("content-type", "application/json")
            .header("webhook-id", &id)
            .header("webhook-timestamp", ts.to_string());
        if let Some(key) = &self.key {
            req = req.header("webhook-signature", sign(key, &id, ts, &bytes));
        }
        let (status, after, text) = exchange(req.body(bytes)).await?;
        if (200..300).contains(&status) {
            Ok(ProviderRef::Webhook { id })
        } else {
            Err(classify_http(
                status,
                after,
                format!(
                    "webhook {}: HTTP {status}: {}",
                    self.name,
                    text.trim().chars().take(300).collect::<String>()
                ),
            ))
        }
    }
}

impl Provider for Webhook {
    #[allow(clippy::misnamed_getters)] // the provider's name, not the webhook's
    fn name(&self) -> &str {
        &self.provider_name
    }

    /// Receivers drop a repeated `webhook-id` (Standard Webhooks), unless
    /// configured as not doing so.
    fn drops_repeats(&self) -> bool {
        self.drops_repeats
    }

    fn timeout(&self) -> std::time::Duration {
        self.timeout
    }

    fn destination(&self, _: Option<&ProviderRef>, _: &str, _: &str) -> String {
        self.name.clone()
    }

    fn send<'a>(
        &'a self,
        out: &'a Outgoing,
        r: &'a Rendered,
    ) -> BoxFuture<'a, Result<ProviderRef, SendError>> {
        Box::pin(async move { self.post(out, &r.text()).await })
    }

    // No find_sent: receivers drop a repeated `webhook-id`.

    /// One call per change (when `updates` is on).
    fn update(
        &self,
        sent: &ProviderRef,
        shown: &Shown,
        now: &IncidentSummary,
    ) -> Option<MessageKind> {
        if !self.updates
            || !matches!(sent, ProviderRef::Webhook { .. })
            || shown.status == now.status
        {
            return None;
        }
        Some(match now.status {
            IncidentStatus::Triggered => MessageKind::Page,
            IncidentStatus::Acknowledged => MessageKind::Acknowledged,
            IncidentStatus::Resolved => MessageKind::Resolved,
        })
    }

    fn may_update(&self, sent: &ProviderRef) -> bool {
        self.updates && matches!(sent, ProviderRef::Webhook { .. })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_matches_the_standard_webhooks_example() {
        // From the Standard Webhooks specification's test vector.
        let key = decode_secret("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        let sig = sign(
            &key,
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1614265330,
            br#"{"test": 2432232314}"#,
        );
        assert_eq!(sig, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
    }
}
