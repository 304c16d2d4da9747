//! PagerDuty Events API v2-compatible events (`POST /v2/enqueue`).
//!
//! Anything configured to send to PagerDuty can send to Tocsin by changing
//! the URL. The routing key authenticates the sender (it must equal one of
//! the ingest tokens), as it does at PagerDuty; a bearer header works too.
//!
//! Mapping: the dedup key names the incident (scoped to the integration, as
//! PagerDuty scopes it to the routing key); `payload.severity`, `source`,
//! `component`, `group` and `class` become labels, `summary`, `client`,
//! `client_url` and `custom_details` (as JSON) become annotations.
//!
//! Change events (`POST /v2/change/enqueue`: deploys, builds, config
//! changes from Grafana or CI) are recorded as `info` alerts that end by
//! themselves ([`CHANGE_EVENT_LASTS`] after they arrive), so they are on
//! the record next to incidents without paging anyone for themselves.

use serde::Deserialize;
use sha2::{Digest, Sha256};
use tocsin_proto::{Alert, AlertStatus, Fingerprint, Labels, Origin, SourceKind, Timestamp};

use super::{check_annotation_value, check_label_value, parse_json, parse_time, require_object};
use crate::config::Limits;

/// How long after it arrived a change event's alert ends (`endsAt`).
pub const CHANGE_EVENT_LASTS: jiff::SignedDuration = jiff::SignedDuration::from_secs(60);

/// Longest `dedup_key` PagerDuty accepts.
pub const MAX_DEDUP_KEY: usize = 255;
/// Longest `payload.summary` PagerDuty accepts.
pub const MAX_SUMMARY: usize = 1024;

#[derive(Debug, Deserialize)]
pub struct Event {
    #[serde(default)]
    pub routing_key: Option<String>,
    #[serde(default)]
    pub event_action: Option<String>,
    #[serde(default)]
    pub dedup_key: Option<String>,
    #[serde(default)]
    pub payload: Option<Payload>,
    #[serde(default)]
    pub client: Option<String>,
    #[serde(default)]
    pub client_url: Option<String>,
    /// `[{"href": …, "text": …}]`, kept as the `links` annotation.
    #[serde(default)]
    pub links: Option<serde_json::Value>,
}

#[derive(Debug, Deserialize)]
pub struct Payload {
    #[serde(default)]
    pub summary: Option<String>,
    #[serde(default)]
    pub source: Option<String>,
    #[serde(default)]
    pub severity: Option<String>,
    #[serde(default)]
    pub timestamp: Option<String>,
    #[serde(default)]
    pub component: Option<String>,
    #[serde(default)]
    pub group: Option<String>,
    #[serde(default)]
    pub class: Option<String>,
    #[serde(default)]
    pub custom_details: Option<serde_json::Value>,
}

/// A validated event: the alert to publish and the dedup key to answer with.
#[derive(Debug)]
pub struct Parsed {
    pub routing_key: String,
    pub dedup_key: String,
    pub alert: Alert,
}

fn blank(s: &Option<String>) -> bool {
    s.as_deref().is_none_or(|s| s.trim().is_empty())
}

/// Parses and validates an event. Every problem is listed, as PagerDuty does.
/// `source` is the integration name the caller authenticated as (it scopes
/// the dedup key); `new_key` makes a dedup key for triggers that lack one.
pub fn parse(
    body: &[u8],
    source: &str,
    received_at: Timestamp,
    limits: &Limits,
    new_key: impl FnOnce() -> String,
) -> Result<Parsed, Vec<String>> {
    require_object(body, "a PagerDuty Events v2 event").map_err(|e| vec![e])?;
    let ev: Event = parse_json(body).map_err(|e| vec![e])?;
    let parsed = validate(ev, source, received_at, new_key)?;
    check_bounds(&parsed.alert, limits)?;
    Ok(parsed)
}

/// A PagerDuty change event (`POST /v2/change/enqueue`).
#[derive(Debug, Deserialize)]
pub struct ChangeEvent {
    #[serde(default)]
    pub routing_key: Option<String>,
    #[serde(default)]
    pub payload: Option<ChangePayload>,
    #[serde(default)]
    pub links: Option<serde_json::Value>,
    #[serde(default)]
    pub images: Option<serde_json::Value>,
}

#[derive(Debug, Deserialize)]
pub struct ChangePayload {
    #[serde(default)]
    pub summary: Option<String>,
    #[serde(default)]
    pub source: Option<String>,
    #[serde(default)]
    pub timestamp: Option<String>,
    #[serde(default)]
    pub custom_details: Option<serde_json::Value>,
}

/// Parses and validates a change event into an `info` alert that is firing
/// from its timestamp and ends [`CHANGE_EVENT_LASTS`] after it arrived.
/// Every problem is listed, as PagerDuty does.
pub fn parse_change(
    body: &[u8],
    source: &str,
    received_at: Timestamp,
    limits: &Limits,
) -> Result<Alert, Vec<String>> {
    require_object(body, "a PagerDuty change event").map_err(|e| vec![e])?;
    let ev: ChangeEvent = parse_json(body).map_err(|e| vec![e])?;
    let mut errors = Vec::new();
    if blank(&ev.routing_key) {
        errors.push("'routing_key' is missing or blank".to_string());
    }
    let Some(p) = ev.payload else {
        errors.push("'payload' is missing".into());
        return Err(errors);
    };
    if blank(&p.summary) {
        errors.push("'payload.summary' is missing or blank".into());
    } else if p.summary.as_deref().unwrap_or("").chars().count() > MAX_SUMMARY {
        errors.push(format!(
            "'payload.summary' is longer than {MAX_SUMMARY} characters"
        ));
    }
    let mut starts_at = received_at;
    if let Some(ts) = p.timestamp.as_deref().filter(|t| !t.is_empty()) {
        match parse_time("'payload.timestamp'", ts) {
            Ok(t) => starts_at = t,
            Err(e) => errors.push(e),
        }
    }
    if !errors.is_empty() {
        return Err(errors);
    }
    let digest = hex::encode(&Sha256::digest(body)[..8]);
    let mut labels: Labels = [
        ("severity".to_string(), "info".to_string()),
        ("event_type".to_string(), "change".to_string()),
    ]
    .into();
    if let Some(s) = p.source.filter(|s| !s.is_empty()) {
        labels.insert("source".into(), s);
    }
    let mut annotations = Labels::new();
    annotations.insert("summary".into(), p.summary.unwrap_or_default());
    if let Some(d) = &p.custom_details {
        annotations.insert("custom_details".into(), d.to_string());
    }
    if let Some(l) = &ev.links {
        annotations.insert("links".into(), l.to_string());
    }
    // Each change event is its own record, named by its content so that a
    // retried request maps to the same alert and message id.
    let dedup_key = format!("change-{digest}");
    labels.insert("dedup_key".into(), dedup_key.clone());
    let identity: Labels = [
        ("dedup_key".to_string(), dedup_key.clone()),
        ("integration".to_string(), source.to_string()),
    ]
    .into();
    let alert = Alert {
        fingerprint: Fingerprint::from_labels(&identity),
        status: AlertStatus::Firing,
        labels,
        annotations,
        starts_at,
        ends_at: Some(starts_at.max(received_at) + CHANGE_EVENT_LASTS),
        generator_url: None,
        dedup_key: Some(dedup_key),
        origin: Origin {
            kind: Some(SourceKind::Pagerduty),
            event_digest: Some(digest),
            ..Origin::default()
        },
    };
    check_bounds(&alert, limits)?;
    Ok(alert)
}

/// Checks an event's labels and annotations against `limits`, naming the
/// event's own fields.
fn check_bounds(alert: &Alert, limits: &Limits) -> Result<(), Vec<String>> {
    let field = |name: &str| match name {
        "dedup_key" | "client" | "client_url" | "links" => format!("'{name}'"),
        other => format!("'payload.{other}'"),
    };
    let mut errors = Vec::new();
    for (name, value) in &alert.labels {
        if let Err(e) = check_label_value(&field(name), value, limits) {
            errors.push(e);
        }
    }
    for (name, value) in &alert.annotations {
        if let Err(e) = check_annotation_value(&field(name), value, limits) {
            errors.push(e);
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors)
    }
}

/// The routing key of a body, if it parses at all (for authentication
/// before full validation).
pub fn routing_key(body: &[u8]) -> Option<String> {
    #[derive(Deserialize)]
    struct Key {
        routing_key: Option<String>,
    }
    serde_json::from_slice::<Key>(body).ok()?.routing_key
}

fn validate(
    ev: Event,
    source: &str,
    received_at: Timestamp,
    new_key: impl FnOnce() -> String,
) -> Result<Parsed, Vec<String>> {
    let mut errors = Vec::new();
    if blank(&ev.routing_key) {
        errors.push("'routing_key' is missing or blank".to_string());
    }
    let status = match ev.event_action.as_deref() {
        Some("trigger") => Some(AlertStatus::Firing),
        Some("acknowledge") => Some(AlertStatus::Acknowledged),
        Some("resolve") => Some(AlertStatus::Resolved),
        None | Some("") => {
            errors.push("'event_action' is missing or blank".to_string());
            None
        }
        Some(other) => {
            errors.push(format!(
                "'event_action' is invalid ({other:?}); use trigger, acknowledge or resolve"
            ));
            None
        }
    };
    if let Some(k) = &ev.dedup_key {
        if k.chars().count() > MAX_DEDUP_KEY {
            errors.push(format!(
                "'dedup_key' is longer than {MAX_DEDUP_KEY} characters"
            ));
        }
    }
    if matches!(
        status,
        Some(AlertStatus::Acknowledged | AlertStatus::Resolved)
    ) && blank(&ev.dedup_key)
    {
        errors.push(
            "'dedup_key' is missing or blank; it is required for acknowledge and resolve".into(),
        );
    }
    let mut starts_at = received_at;
    let mut labels = Labels::new();
    let mut annotations = Labels::new();
    if status == Some(AlertStatus::Firing) {
        match &ev.payload {
            None => errors.push("'payload' is missing; it is required for trigger".into()),
            Some(p) => {
                if blank(&p.summary) {
                    errors.push("'payload.summary' is missing or blank".into());
                } else if p.summary.as_deref().unwrap_or("").chars().count() > MAX_SUMMARY {
                    errors.push(format!(
                        "'payload.summary' is longer than {MAX_SUMMARY} characters"
                    ));
                }
                if blank(&p.source) {
                    errors.push("'payload.source' is missing or blank".into());
                }
                match p.severity.as_deref() {
                    Some("critical" | "error" | "warning" | "info") => {}
                    None | Some("") => errors.push("'payload.severity' is missing or blank".into()),
                    Some(other) => errors.push(format!(
                        "'payload.severity' is invalid ({other:?}); use critical, error, warning or info"
                    )),
                }
            }
        }
    }
    if let Some(p) = &ev.payload {
        if let Some(ts) = p.timestamp.as_deref().filter(|t| !t.is_empty()) {
            match parse_time("'payload.timestamp'", ts) {
                Ok(t) if status == Some(AlertStatus::Firing) => starts_at = t,
                Ok(_) => {}
                Err(e) => errors.push(e),
            }
        }
        for (name, value) in [
            ("severity", &p.severity),
            ("source", &p.source),
            ("component", &p.component),
            ("group", &p.group),
            ("class", &p.class),
        ] {
            if let Some(v) = value.as_deref().filter(|v| !v.is_empty()) {
                labels.insert(name.to_string(), v.to_string());
            }
        }
        if let Some(s) = p.summary.as_deref().filter(|s| !s.is_empty()) {
            annotations.insert("summary".into(), s.to_string());
        }
        if let Some(d) = &p.custom_details {
            annotations.insert("custom_details".into(), d.to_string());
        }
    }
    if !errors.is_empty() {
        return Err(errors);
    }
    let status = status.expect("validated above");
    let dedup_key = match ev.dedup_key.filter(|k| !k.trim().is_empty()) {
        Some(k) => k,
        None => new_key(),
    };
    labels.insert("dedup_key".into(), dedup_key.clone());
    if let Some(c) = ev.client.filter(|c| !c.is_empty()) {
        annotations.insert("client".into(), c);
    }
    let client_url = ev.client_url.filter(|u| !u.is_empty());
    if let Some(u) = &client_url {
        annotations.insert("client_url".into(), u.clone());
    }
    if let Some(l) = ev.links.filter(|l| !l.is_null()) {
        annotations.insert("links".into(), l.to_string());
    }
    // The same dedup key from two integrations is two incidents, as at
    // PagerDuty where keys are scoped to the routing key.
    let identity: Labels = [
        ("dedup_key".to_string(), dedup_key.clone()),
        ("integration".to_string(), source.to_string()),
    ]
    .into();
    // Events carry no start time unless payload.timestamp is set; the
    // start is then the receive time, so the message id is new for every
    // event received. It is not a digest of the body: the same trigger
    // sent again after its resolve (a check that flaps) is a new problem,
    // and would have been dropped as a retry within JetStream's duplicate
    // window. A retry is stored and decided again instead, and changes
    // nothing: the incidents service keeps the earliest start of an alert
    // still firing, and an acknowledge or resolve already applied writes
    // nothing.
    let alert = Alert {
        fingerprint: Fingerprint::from_labels(&identity),
        status,
        labels,
        annotations,
        starts_at,
        ends_at: (status == AlertStatus::Resolved).then_some(received_at),
        generator_url: client_url.clone(),
        dedup_key: Some(dedup_key.clone()),
        origin: Origin {
            kind: Some(SourceKind::Pagerduty),
            external_url: client_url,
            ..Origin::default()
        },
    };
    Ok(Parsed {
        routing_key: ev.routing_key.unwrap_or_default(),
        dedup_key,
        alert,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn now() -> Timestamp {
        "2025-01-15T10:00:00Z".parse().unwrap()
    }

    fn run(v: serde_json::Value) -> Result<Parsed, Vec<String>> {
        parse(
            v.to_string().as_bytes(),
            "grafana",
            now(),
            &Limits::default(),
            || "generated".into(),
        )
    }

    fn trigger() -> serde_json::Value {
        json!({"routing_key":"0123456789abcdef0123456789abcdef","event_action":"trigger",
               "dedup_key":"srv01/HTTP",
               "payload":{"summary":"HTTP down on srv01","source":"srv01","severity":"critical",
                          "timestamp":"2015-07-17T08:42:58.315+0000","component":"nginx",
                          "custom_details":{"ping":"timeout"}},
               "client":"Grafana","client_url":"https://grafana.example/d/1"})
    }

    #[test]
    fn trigger_maps_to_a_firing_alert() {
        let p = run(trigger()).unwrap();
        assert_eq!(p.dedup_key, "srv01/HTTP");
        let a = p.alert;
        assert_eq!(a.status, AlertStatus::Firing);
        assert_eq!(a.labels["severity"], "critical");
        assert_eq!(a.labels["component"], "nginx");
        assert_eq!(a.annotations["summary"], "HTTP down on srv01");
        assert_eq!(a.annotations["custom_details"], r#"{"ping":"timeout"}"#);
        assert_eq!(a.starts_at.to_string(), "2015-07-17T08:42:58.315Z");
        assert_eq!(a.dedup_key.as_deref(), Some("srv01/HTTP"));
    }

    #[test]
    fn ack_and_resolve_keep_the_fingerprint_of_the_trigger() {
        let t = run(trigger()).unwrap().alert;
        for (action, status) in [
            ("acknowledge", AlertStatus::Acknowledged),
            ("resolve", AlertStatus::Resolved),
        ] {
            let a = run(json!({"routing_key":"k","event_action":action,"dedup_key":"srv01/HTTP"}))
                .unwrap()
                .alert;
            assert_eq!(a.status, status);
            assert_eq!(a.fingerprint, t.fingerprint);
        }
        let other_integration = parse(
            trigger().to_string().as_bytes(),
            "datadog",
            now(),
            &Limits::default(),
            || unreachable!(),
        )
        .unwrap();
        assert_ne!(other_integration.alert.fingerprint, t.fingerprint);
    }

    #[test]
    fn trigger_without_dedup_key_gets_one() {
        let mut ev = trigger();
        ev.as_object_mut().unwrap().remove("dedup_key");
        assert_eq!(run(ev).unwrap().dedup_key, "generated");
    }

    #[test]
    fn every_problem_is_listed() {
        let check = |ev: serde_json::Value, expected: &[&str]| {
            let errors = run(ev.clone()).unwrap_err();
            for e in expected {
                assert!(
                    errors.iter().any(|x| x.contains(e)),
                    "{ev}: {errors:?} lacks {e}"
                );
            }
        };
        check(
            json!({"event_action":"trigger"}),
            &["'routing_key' is missing", "'payload' is missing"],
        );
        check(
            json!({"routing_key":"k","event_action":"explode"}),
            &["'event_action' is invalid"],
        );
        check(json!({"routing_key":"k"}), &["'event_action' is missing"]);
        check(
            json!({"routing_key":"k","event_action":"resolve"}),
            &["'dedup_key' is missing"],
        );
        check(
            json!({"routing_key":"k","event_action":"trigger","payload":{"severity":"bad"}}),
            &[
                "'payload.summary' is missing",
                "'payload.source' is missing",
                "'payload.severity' is invalid",
            ],
        );
        check(
            json!({"routing_key":"k","event_action":"trigger","dedup_key":"x".repeat(256),
                   "payload":{"summary":"s".repeat(1025),"source":"a","severity":"info","timestamp":"nope"}}),
            &[
                "'dedup_key' is longer",
                "'payload.summary' is longer",
                "'payload.timestamp'",
            ],
        );
        check(
            json!({"routing_key":"k","event_action":"trigger","payload":{"summary":5}}),
            &["payload.summary: invalid type"],
        );
        check(json!([1]), &["expected a JSON object"]);
        check(
            json!({"routing_key":"k","event_action":"trigger",
                   "payload":{"summary":"s","source":"a\r\nb","severity":"info",
                              "custom_details":{"x":"y".repeat(20_000)}}}),
            &[
                "'payload.source': the value contains the control character U+000D",
                "'payload.custom_details': 20008 bytes, the limit is 16384",
            ],
        );
    }

    #[test]
    fn change_events_are_info_alerts_that_end_by_themselves() {
        let ev = json!({"routing_key":"k",
            "payload":{"summary":"Deployed v2","timestamp":"2025-01-15T09:59:00Z","source":"ci",
                       "custom_details":{"build":7}},
            "links":[{"href":"https://ci/7","text":"build"}]});
        let body = ev.to_string();
        let a = parse_change(body.as_bytes(), "grafana", now(), &Limits::default()).unwrap();
        assert_eq!(a.status, AlertStatus::Firing);
        assert_eq!(a.labels["severity"], "info");
        assert_eq!(a.labels["event_type"], "change");
        assert_eq!(a.labels["source"], "ci");
        assert_eq!(a.annotations["summary"], "Deployed v2");
        assert_eq!(
            a.annotations["links"],
            r#"[{"href":"https://ci/7","text":"build"}]"#
        );
        assert_eq!(a.starts_at.to_string(), "2025-01-15T09:59:00Z");
        assert_eq!(a.ends_at.unwrap().to_string(), "2025-01-15T10:01:00Z");
        let again = parse_change(body.as_bytes(), "grafana", now(), &Limits::default()).unwrap();
        assert_eq!(again.msg_id(), a.msg_id(), "a retry is the same message");
        let errors = parse_change(
            json!({"payload":{"timestamp":"nope"}})
                .to_string()
                .as_bytes(),
            "g",
            now(),
            &Limits::default(),
        )
        .unwrap_err();
        for e in [
            "'routing_key' is missing",
            "'payload.summary' is missing",
            "'payload.timestamp'",
        ] {
            assert!(errors.iter().any(|x| x.contains(e)), "{errors:?} lacks {e}");
        }
    }
}
