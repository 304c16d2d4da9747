//! PagerDuty Events API v2: `trigger` on a page, `acknowledge` and
//! `resolve` when the incident changes, all with `dedup_key` = the Tocsin
//! incident id, so PagerDuty's alert follows Tocsin's incident (and a
//! trigger sent again after a crash lands on the same alert).

use std::collections::BTreeMap;

use serde_json::{json, Value};
use tocsin_proto::{
    incident::Severity,
    notify::{MessageKind, ProviderRef},
};
use tocsin_runtime::config::Secret;

use futures::future::BoxFuture;
use tocsin_proto::incident::{IncidentStatus, IncidentSummary};

use super::{classify_http, exchange, http_client, Outgoing, Provider, Rendered, SendError};
use crate::config::PagerdutyConfig;
use crate::record::Shown;

/// The Events API's limit on `payload.summary`.
pub const SUMMARY_MAX: usize = 1024;
/// The Events API's limit on a whole event.
const EVENT_MAX: usize = 512_000;

pub struct Pagerduty {
    client: reqwest::Client,
    timeout: std::time::Duration,
    url: String,
    keys: BTreeMap<String, Secret>,
}

/// Tocsin severity -> `payload.severity`.
pub fn severity(s: Severity) -> &'static str {
    match s {
        Severity::Critical => "critical",
        Severity::High => "error",
        Severity::Medium | Severity::Low => "warning",
        Severity::Info => "info",
    }
}

/// Cuts to `max` characters (not bytes), marking the cut.
pub fn cut(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        s.to_string()
    } else {
        let mut t: String = s.chars().take(max - 1).collect();
        t.push('…');
        t
    }
}

impl Pagerduty {
    pub fn new(cfg: &PagerdutyConfig) -> Result<Pagerduty, String> {
        let mut keys = BTreeMap::new();
        for (name, svc) in &cfg.services {
            let key = svc
                .routing_key()
                .map_err(|e| format!("pagerduty service {name:?}: {e}"))?;
            if key.expose().len() != 32 {
                return Err(format!(
                    "pagerduty service {name:?}: the routing key has {} characters; PagerDuty integration keys have 32",
                    key.expose().len()
                ));
            }
            keys.insert(name.clone(), key);
        }
        Ok(Pagerduty {
            client: http_client(cfg.guard.timeout.get()),
            timeout: cfg.guard.timeout.get(),
            url: cfg
                .url
                .as_ref()
                .map(|u| u.0.clone())
                .unwrap_or_else(|| "https://events.pagerduty.com/v2/enqueue".into()),
            keys,
        })
    }

    pub fn has_service(&self, name: &str) -> bool {
        self.keys.contains_key(name)
    }

    /// The event for `out` (exposed for tests of the exact shape).
    pub fn event(out: &Outgoing, summary: &str, routing_key: &str) -> Value {
        let inc = &out.incident;
        let dedup_key = inc.id.to_string();
        let action = match out.kind {
            MessageKind::Acknowledged => "acknowledge",
            MessageKind::Resolved => "resolve",
            _ => "trigger",
        };
        if action != "trigger" {
            return json!({
                "routing_key": routing_key,
                "event_action": action,
                "dedup_key": dedup_key,
            });
        }
        let label = |k: &str| inc.labels.get(k).cloned();
        let source = label("instance")
            .or_else(|| label("host"))
            .or_else(|| label("service"))
            .unwrap_or_else(|| "tocsin".into());
        let mut payload = json!({
            "summary": cut(summary, SUMMARY_MAX),
            "source": source,
            "severity": severity(inc.severity),
            "timestamp": inc.opened_at.to_string(),
            "custom_details": {
                "incident": format!("INC-{}", inc.number),
                "incident_id": dedup_key,
                "status": inc.status.as_str(),
                "reason": out.page.as_ref().map(|p| p.reason.clone()).unwrap_or_default(),
                "alerts_firing": inc.alerts_firing,
                "labels": inc.labels,
                "link": out.ctx.incident.url,
            },
        });
        if let Some(c) = label("service") {
            payload["component"] = json!(c);
        }
        if let Some(g) = label("team").or_else(|| label("cluster")) {
            payload["group"] = json!(g);
        }
        if let Some(c) = label("alertname") {
            payload["class"] = json!(c);
        }
        let mut event = json!({
            "routing_key": routing_key,
            "event_action": "trigger",
            "dedup_key": dedup_key,
            "payload": payload,
            "client": "Tocsin",
        });
        if let Some(url) = &out.ctx.incident.url {
            event["client_url"] = json!(url);
            event["links"] = json!([{"href": url, "text": format!("Tocsin INC-{}", inc.number)}]);
        }
        // Like Alertmanager's notifier: drop the details when over the limit.
        if serde_json::to_vec(&event).map(|v| v.len()).unwrap_or(0) > EVENT_MAX {
            event["payload"]["custom_details"] =
                json!({"note": "details dropped: event over 512 KB"});
        }
        event
    }

    pub async fn send_event(
        &self,
        out: &Outgoing,
        summary: &str,
    ) -> Result<ProviderRef, SendError> {
        let service = match &out.reference {
            Some(ProviderRef::Pagerduty { service, .. }) => service.clone(),
            _ => out.target.clone(),
        };
        let key = self.keys.get(&service).ok_or_else(|| {
            SendError::permanent(format!(
                "no PagerDuty service {service:?} in notifier.pagerduty.services (known: {})",
                self.keys.keys().cloned().collect::<Vec<_>>().join(", ")
            ))
        })?;
        let event = Self::event(out, summary, key.expose());
        let (status, after, text) = exchange(self.client.post(&self.url).json(&event)).await?;
        if status == 202 || (200..300).contains(&status) {
            let answer: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
            return Ok(ProviderRef::Pagerduty {
                service,
                dedup_key: answer["dedup_key"]
                    .as_str()
                    .map(str::to_string)
                    .unwrap_or_else(|| out.incident.id.to_string()),
            });
        }
        let reason = match serde_json::from_str::<Value>(&text) {
            Ok(v) if v["errors"].is_array() => format!(
                "PagerDuty: HTTP {status}: {}: {}",
                v["message"].as_str().unwrap_or("error"),
                v["errors"]
                    .as_array()
                    .map(|e| e
                        .iter()
                        .filter_map(|x| x.as_str())
                        .collect::<Vec<_>>()
                        .join("; "))
                    .unwrap_or_default()
            ),
            _ => format!("PagerDuty: HTTP {status}"),
        };
        // PagerDuty asks for tens of seconds after a 429.
        let after = if status == 429 {
            after.or(Some(std::time::Duration::from_secs(30)))
        } else {
            after
        };
        Err(classify_http(status, after, reason))
    }
}

impl Provider for Pagerduty {
    fn name(&self) -> &str {
        "pagerduty"
    }

    /// PagerDuty drops a repeated trigger by its `dedup_key`.
    fn drops_repeats(&self) -> bool {
        true
    }

    fn timeout(&self) -> std::time::Duration {
        self.timeout
    }

    /// PagerDuty limits events per integration key: per service.
    fn destination(&self, reference: Option<&ProviderRef>, target: &str, _: &str) -> String {
        match reference {
            Some(ProviderRef::Pagerduty { service, .. }) => service.clone(),
            _ => target.to_string(),
        }
    }

    fn send<'a>(
        &'a self,
        out: &'a Outgoing,
        r: &'a Rendered,
    ) -> BoxFuture<'a, Result<ProviderRef, SendError>> {
        Box::pin(async move { self.send_event(out, &r.text()).await })
    }

    // No find_sent: PagerDuty drops a repeated trigger by its dedup_key.

    fn may_update(&self, sent: &ProviderRef) -> bool {
        matches!(sent, ProviderRef::Pagerduty { .. })
    }

    /// PagerDuty's alert follows the incident's status; notes are not sent.
    fn takes_status_updates(&self, _sent: &ProviderRef) -> bool {
        false
    }

    /// PagerDuty's alert follows the incident: acknowledged, resolved, and
    /// triggered again when it reopens. It has no "unacknowledge".
    fn update(
        &self,
        sent: &ProviderRef,
        shown: &Shown,
        now: &IncidentSummary,
    ) -> Option<MessageKind> {
        if !matches!(sent, ProviderRef::Pagerduty { .. }) {
            return None;
        }
        use IncidentStatus::*;
        match (shown.status, now.status) {
            (Triggered, Acknowledged) => Some(MessageKind::Acknowledged),
            (Triggered | Acknowledged, Resolved) => Some(MessageKind::Resolved),
            (Resolved, Triggered | Acknowledged) => Some(MessageKind::Page),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::templates::Context;
    use tocsin_proto::incident::IncidentSummary;

    fn outgoing(kind: MessageKind, severity: Severity) -> Outgoing {
        let mut inc = IncidentSummary::new(
            uuid::Uuid::nil(),
            7,
            "k",
            "t",
            "2026-01-01T00:00:00Z".parse().unwrap(),
        );
        inc.severity = severity;
        Outgoing {
            id: "page:x".into(),
            kind,
            channel: tocsin_proto::notify::Channel::Pagerduty,
            incident: inc,
            address: String::new(),
            target: "payments".into(),
            reference: None,
            page: None,
            ctx: Context::sample(),
        }
    }

    #[test]
    fn summary_is_cut_to_1024_characters_and_severity_is_mapped() {
        let long = "é".repeat(3000);
        let ev = Pagerduty::event(&outgoing(MessageKind::Page, Severity::High), &long, "k");
        let summary = ev["payload"]["summary"].as_str().unwrap();
        assert_eq!(summary.chars().count(), SUMMARY_MAX);
        assert!(summary.ends_with('…'));
        assert_eq!(ev["payload"]["severity"], "error");
        for (s, want) in [
            (Severity::Critical, "critical"),
            (Severity::Medium, "warning"),
            (Severity::Low, "warning"),
            (Severity::Info, "info"),
        ] {
            assert_eq!(severity(s), want);
        }
    }

    #[test]
    fn acknowledge_and_resolve_carry_only_the_key_and_dedup_key() {
        for (kind, action) in [
            (MessageKind::Acknowledged, "acknowledge"),
            (MessageKind::Resolved, "resolve"),
        ] {
            let ev = Pagerduty::event(&outgoing(kind, Severity::High), "", "key");
            assert_eq!(
                ev,
                serde_json::json!({
                    "routing_key": "key",
                    "event_action": action,
                    "dedup_key": uuid::Uuid::nil().to_string(),
                })
            );
        }
    }
}
