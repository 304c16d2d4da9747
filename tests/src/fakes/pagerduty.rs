//! The PagerDuty Events API v2 fake: `POST /pagerduty/v2/enqueue`.
//!
//! Events are checked as PagerDuty does (every problem listed in one
//! `400 {"status":"invalid event",…,"errors":[…]}`) and accepted ones are
//! deduplicated into alerts by `dedup_key` as PagerDuty would: a trigger
//! merges into an open alert, acknowledge/resolve change it, and
//! acknowledge/resolve of a missing or resolved alert are accepted and
//! dropped.

use serde_json::{json, Value};

use super::{
    server::{reason, str_arg, Ctx, Reply, Req},
    FakeProviders,
};

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

/// What the PagerDuty fake holds.
#[derive(Clone, Default)]
pub(super) struct State {
    events: Vec<Value>,
    alerts: Vec<PdAlert>,
}

impl FakeProviders {
    /// PagerDuty Events API v2 enqueue URL.
    pub fn pagerduty_url(&self) -> String {
        format!("{}/pagerduty/v2/enqueue", self.base_url())
    }

    /// Accepted (202) PagerDuty events, whole bodies, in arrival order.
    pub fn pagerduty_events(&self) -> Vec<Value> {
        self.lock().pagerduty.events.clone()
    }

    /// PagerDuty alerts after deduplication, in creation order.
    pub fn pagerduty_alerts(&self) -> Vec<PdAlert> {
        self.lock().pagerduty.alerts.clone()
    }
}

/// PagerDuty's answer to an injected failure with HTTP `code`.
pub(super) fn status_reply(code: u16) -> Reply {
    match code {
        400 => pd_invalid(vec!["Injected failure".into()]),
        429 => Reply::json(
            429,
            json!({"status": "throttle event",
                   "message": "Requests for this service are arriving too quickly.  Please retry later."}),
        ),
        _ => Reply::json(code, json!({"status": "error", "message": reason(code)})),
    }
}

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

/// The `routing_key` of an event (`""` if it has none).
pub(super) fn describe(req: &Req) -> String {
    serde_json::from_slice::<Value>(&req.body)
        .ok()
        .and_then(|v| v.get("routing_key")?.as_str().map(str::to_string))
        .unwrap_or_default()
}

/// `POST /v2/enqueue`.
///
/// PagerDuty documents "a limit of approximately 120 calls/minute per
/// integration key"; over it "The response to the API call will say
/// `429 - Request Limit Exceeded` and PagerDuty will not ingest the
/// event", with no `Retry-After`. A limit set with
/// [`FakeProviders::set_window_limit`] (120 events in 60 s is
/// PagerDuty's) or [`FakeProviders::set_rate_limit`] applies once the event names the
/// integration key (an unknown key is no integration's traffic), before
/// the event's other checks.
pub(super) fn enqueue(ctx: &mut Ctx<'_>) -> Reply {
    let req = ctx.req;
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
    let routing_key = event.get("routing_key").and_then(Value::as_str);
    if routing_key == Some(FakeProviders::PD_ROUTING_KEY) && ctx.throttled().is_some() {
        return status_reply(429).throttled();
    }
    let mut errors = Vec::new();
    match routing_key {
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
    let state = &mut ctx.rec.pagerduty;
    let open = state
        .alerts
        .iter_mut()
        .rev()
        .find(|a| a.dedup_key == key && a.status != "resolved");
    match (action, open) {
        ("trigger", Some(a)) => a.triggers += 1,
        ("trigger", None) => state.alerts.push(PdAlert {
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
    state.events.push(Value::Object(event));
    Reply::json(
        202,
        json!({"status": "success", "message": "Event processed", "dedup_key": key}),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iso8601() {
        assert!(parses_as_iso8601("2015-07-17T08:42:58.315+0000"));
        assert!(parses_as_iso8601("2015-07-17T08:42:58.315+00:00"));
        assert!(parses_as_iso8601("2015-07-17T08:42:58Z"));
        assert!(parses_as_iso8601("2015-07-17T08:42:58"));
        assert!(!parses_as_iso8601("yesterday"));
        assert!(!parses_as_iso8601("2015-13-17T08:42:58Z"));
    }
}
