//! Alertmanager webhook payload, version 4, exactly as Alertmanager sends it.

use serde::Deserialize;
use tocsin_proto::{Alert, AlertStatus, Fingerprint, Labels, Origin, SourceKind};

use super::{clean_labels, is_zero_time, parse_json, parse_time, require_object};

/// The webhook body (`webhook_configs`). Field names are Alertmanager's.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WebhookMessage {
    #[serde(default)]
    pub version: Option<String>,
    #[serde(default)]
    pub group_key: String,
    #[serde(default)]
    pub truncated_alerts: u64,
    #[serde(default)]
    pub status: Option<String>,
    #[serde(default)]
    pub receiver: String,
    #[serde(default)]
    pub group_labels: Labels,
    #[serde(default)]
    pub common_labels: Labels,
    #[serde(default)]
    pub common_annotations: Labels,
    #[serde(default, rename = "externalURL")]
    pub external_url: String,
    pub alerts: Vec<WebhookAlert>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WebhookAlert {
    pub status: String,
    pub labels: Labels,
    #[serde(default)]
    pub annotations: Labels,
    pub starts_at: String,
    #[serde(default)]
    pub ends_at: Option<String>,
    #[serde(default, rename = "generatorURL")]
    pub generator_url: Option<String>,
    #[serde(default)]
    pub fingerprint: Option<String>,
}

/// A parsed webhook: its alerts and how many Alertmanager left out.
#[derive(Debug)]
pub struct Parsed {
    pub alerts: Vec<Alert>,
    pub truncated: u64,
}

/// Parses and normalizes one webhook body.
pub fn parse(body: &[u8]) -> Result<Parsed, String> {
    require_object(body, "an Alertmanager webhook payload")?;
    let msg: WebhookMessage = parse_json(body)?;
    if let Some(v) = &msg.version {
        if v != "4" {
            return Err(format!(
                "version: webhook payload version {v:?} is not supported; Tocsin reads version \"4\" (Alertmanager 0.16 and later)"
            ));
        }
    }
    if let Some(s) = &msg.status {
        if s != "firing" && s != "resolved" {
            return Err(format!(
                "status: {s:?} is neither \"firing\" nor \"resolved\""
            ));
        }
    }
    let origin = Origin {
        kind: Some(SourceKind::Alertmanager),
        receiver: non_empty(msg.receiver),
        group_key: non_empty(msg.group_key),
        group_labels: msg.group_labels,
        external_url: non_empty(msg.external_url),
        event_digest: None,
    };
    let alerts = msg
        .alerts
        .into_iter()
        .enumerate()
        .map(|(i, a)| convert(i, a, &origin))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Parsed {
        alerts,
        truncated: msg.truncated_alerts,
    })
}

fn convert(i: usize, a: WebhookAlert, origin: &Origin) -> Result<Alert, String> {
    let status = match a.status.as_str() {
        "firing" => AlertStatus::Firing,
        "resolved" => AlertStatus::Resolved,
        other => {
            return Err(format!(
                "alerts[{i}].status: {other:?} is neither \"firing\" nor \"resolved\""
            ))
        }
    };
    let labels = clean_labels(&format!("alerts[{i}].labels"), a.labels)?;
    let starts_at = parse_time(&format!("alerts[{i}].startsAt"), &a.starts_at)?;
    let ends_at = match a.ends_at.as_deref() {
        None | Some("") => None,
        Some(s) => {
            Some(parse_time(&format!("alerts[{i}].endsAt"), s)?).filter(|t| !is_zero_time(*t))
        }
    };
    let fingerprint = match a.fingerprint.as_deref() {
        None | Some("") => Fingerprint::from_labels(&labels),
        Some(fp) => Fingerprint::parse(fp).map_err(|e| format!("alerts[{i}].fingerprint: {e}"))?,
    };
    Ok(Alert {
        fingerprint,
        status,
        labels,
        annotations: a.annotations,
        starts_at,
        ends_at,
        generator_url: a.generator_url.filter(|u| !u.is_empty()),
        dedup_key: None,
        origin: origin.clone(),
    })
}

fn non_empty(s: String) -> Option<String> {
    (!s.is_empty()).then_some(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = r#"{"receiver":"incident\\-engine","status":"firing",
     "alerts":[{"status":"firing",
       "labels":{"alertname":"HighLatency","service":"api","severity":"critical"},
       "annotations":{"summary":"p99 > 2s"},
       "startsAt":"2025-01-15T10:00:00.123456789Z","endsAt":"0001-01-01T00:00:00Z",
       "generatorURL":"http://prometheus:9090/graph?g0.expr=...","fingerprint":"6a4f37c34a2d1e4b"}],
     "groupLabels":{"alertname":"HighLatency"},
     "commonLabels":{"alertname":"HighLatency","service":"api","severity":"critical"},
     "commonAnnotations":{"summary":"p99 > 2s"},
     "externalURL":"http://alertmanager:9093",
     "version":"4","groupKey":"{}:{alertname=\"HighLatency\"}","truncatedAlerts":0,
     "notification_reason":"first notification","routeLabels":{}}"#;

    #[test]
    fn parses_the_reference_payload() {
        let p = parse(SAMPLE.as_bytes()).unwrap();
        assert_eq!(p.alerts.len(), 1);
        let a = &p.alerts[0];
        assert_eq!(a.fingerprint.as_str(), "6a4f37c34a2d1e4b");
        assert_eq!(a.status, AlertStatus::Firing);
        assert_eq!(a.ends_at, None, "Go zero time means no end");
        assert_eq!(a.starts_at.to_string(), "2025-01-15T10:00:00.123456789Z");
        assert_eq!(a.origin.receiver.as_deref(), Some("incident\\-engine"));
        assert_eq!(
            a.origin.group_labels.get("alertname").map(String::as_str),
            Some("HighLatency")
        );
        assert_eq!(a.annotations["summary"], "p99 > 2s");
    }

    #[test]
    fn computes_missing_fingerprints_like_alertmanager() {
        let body = SAMPLE.replace(r#","fingerprint":"6a4f37c34a2d1e4b""#, "");
        let p = parse(body.as_bytes()).unwrap();
        assert_eq!(p.alerts[0].fingerprint.as_str(), "6a4f37c34a2d1e4b");
    }

    #[test]
    fn rejections_name_the_field() {
        let check = |from: &str, to: &str, fragment: &str| {
            let body = SAMPLE.replacen(from, to, 1);
            assert_ne!(body, SAMPLE, "replacement of {from} did not apply");
            let err = parse(body.as_bytes()).unwrap_err();
            assert!(err.contains(fragment), "{from} -> {to}: {err}");
        };
        check(
            r#""status":"firing","#,
            r#""status":"burning","#,
            "status: \"burning\"",
        );
        check(
            r#""startsAt":"2025-01-15T10:00:00.123456789Z""#,
            r#""startsAt":"soon""#,
            "alerts[0].startsAt",
        );
        check(
            r#""service":"api""#,
            r#""service":5"#,
            "alerts[0].labels.service: invalid type: integer `5`, expected a string",
        );
        check(
            r#""labels":{"alertname":"HighLatency","service":"api","severity":"critical"},"#,
            "",
            "alerts[0]: missing field `labels`",
        );
        check(
            r#""labels":{"alertname":"HighLatency","service":"api","severity":"critical"}"#,
            r#""labels":{}"#,
            "alerts[0].labels: must contain at least one label",
        );
        check(
            r#""fingerprint":"6a4f37c34a2d1e4b""#,
            r#""fingerprint":"xyz""#,
            "alerts[0].fingerprint",
        );
        check(r#""version":"4""#, r#""version":"3""#, "version");
        check(
            r#""alerts":["#,
            r#""alerts":5,"x":["#,
            "alerts: invalid type",
        );
    }

    #[test]
    fn malformed_json_is_reported() {
        for (body, fragment) in [
            ("", "empty"),
            ("{", "malformed JSON"),
            ("[]", "expected a JSON object"),
            ("{}", "missing field `alerts`"),
        ] {
            let err = parse(body.as_bytes()).unwrap_err();
            assert!(err.contains(fragment), "{body:?}: {err}");
        }
    }
}
