//! Alertmanager webhook payload, version 4, exactly as Alertmanager sends it.

use serde::Deserialize;
use serde_json::value::RawValue;
use tocsin_proto::{Alert, AlertStatus, Fingerprint, Labels, Origin, SourceKind};

use super::{
    check_annotations, check_labels, check_url, clean_labels, is_zero_time, parse_element,
    parse_json, parse_time, require_object,
};
use crate::{config::Limits, error::Rejection};

/// The webhook body (`webhook_configs`). Field names are Alertmanager's.
/// `alerts` are kept as raw JSON until their number is checked, so a body
/// of 45,000 tiny alerts costs a pointer each, not a parsed alert each.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WebhookMessage<'a> {
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
    #[serde(borrow)]
    pub alerts: Vec<&'a RawValue>,
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

/// Parses and normalizes one webhook body, checking it against `limits`:
/// too many alerts is a 413, anything else wrong a 400 naming the field.
pub fn parse(body: &[u8], limits: &Limits) -> Result<Parsed, Rejection> {
    parse_inner(body, limits).map_err(|e| e.unwrap_or_else(Rejection::invalid))
}

fn parse_inner(body: &[u8], limits: &Limits) -> Result<Parsed, Result<Rejection, String>> {
    require_object(body, "an Alertmanager webhook payload").map_err(Err)?;
    let msg: WebhookMessage = parse_json(body).map_err(Err)?;
    if msg.alerts.len() > limits.alerts_per_request {
        return Err(Ok(Rejection::too_many_alerts(
            msg.alerts.len(),
            limits.alerts_per_request,
            "lower max_alerts in the webhook_config",
        )));
    }
    validate(msg, limits).map_err(Err)
}

fn validate(msg: WebhookMessage<'_>, limits: &Limits) -> Result<Parsed, String> {
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
    check_labels("groupLabels", &msg.group_labels, limits)?;
    check_url("externalURL", &msg.external_url, limits)?;
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
        .map(|(i, raw)| convert(i, parse_element(i, raw)?, &origin, limits))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Parsed {
        alerts,
        truncated: msg.truncated_alerts,
    })
}

fn convert(i: usize, a: WebhookAlert, origin: &Origin, limits: &Limits) -> Result<Alert, String> {
    let status = match a.status.as_str() {
        "firing" => AlertStatus::Firing,
        "resolved" => AlertStatus::Resolved,
        other => {
            return Err(format!(
                "alerts[{i}].status: {other:?} is neither \"firing\" nor \"resolved\""
            ))
        }
    };
    let labels = clean_labels(&format!("alerts[{i}].labels"), a.labels, limits)?;
    check_annotations(&format!("alerts[{i}].annotations"), &a.annotations, limits)?;
    if let Some(u) = &a.generator_url {
        check_url(&format!("alerts[{i}].generatorURL"), u, limits)?;
    }
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

    fn parse(body: &[u8]) -> Result<Parsed, String> {
        super::parse(body, &Limits::default()).map_err(|r| r.reason)
    }

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
        check(
            r#""groupLabels":{"alertname":"HighLatency"}"#,
            r#""groupLabels":{"alert-name":"HighLatency"}"#,
            r#"groupLabels."alert-name": not a valid label name"#,
        );
        check(
            r#""annotations":{"summary":"p99 > 2s"}"#,
            r#""annotations":{"summary":"\u0000"}"#,
            "alerts[0].annotations.summary: the value contains the control character U+0000",
        );
    }

    #[test]
    fn too_many_alerts_is_a_413_before_they_are_parsed() {
        let one = r#"{"status":"firing","labels":{"a":"b"},"startsAt":"2025-01-15T10:00:00Z"}"#;
        // Broken alerts past the limit: refused for their number, unparsed.
        let body = format!(r#"{{"alerts":[{one},{one},{one},{{"broken":1}}]}}"#);
        let limits = Limits {
            alerts_per_request: 3,
            ..Limits::default()
        };
        let r = super::parse(body.as_bytes(), &limits).unwrap_err();
        assert_eq!(r.status.as_u16(), 413);
        assert!(
            r.reason.contains(
                "4 alerts in one request, the limit is 3 (ingest.limits.alerts_per_request)"
            ),
            "{}",
            r.reason
        );
        let limits = Limits {
            alerts_per_request: 4,
            ..Limits::default()
        };
        let r = super::parse(body.as_bytes(), &limits).unwrap_err();
        assert_eq!(r.status.as_u16(), 400);
        assert!(
            r.reason.starts_with("alerts[3]: missing field"),
            "{}",
            r.reason
        );
    }

    #[test]
    fn urls_holding_control_characters_are_refused() {
        // Shown in pages and by `tocsin show`: no terminal or chat
        // control sequences ride in on a link.
        let good = r#"{"version":"4","status":"firing","receiver":"r","groupLabels":{},"commonLabels":{},"commonAnnotations":{},"externalURL":"http://am:9093","alerts":[{"status":"firing","labels":{"alertname":"A"},"annotations":{},"startsAt":"2025-01-15T10:00:00Z","generatorURL":"http://prom/graph"}]}"#;
        assert!(parse(good.as_bytes()).is_ok());
        for (bad, field) in [
            (
                good.replace("http://prom/graph", "http://prom/\\u001b[2J"),
                "alerts[0].generatorURL",
            ),
            (
                good.replace("http://am:9093", "http://am\\u0007"),
                "externalURL",
            ),
        ] {
            let err = parse(bad.as_bytes()).unwrap_err();
            assert!(
                err.starts_with(field) && err.contains("control character"),
                "{err}"
            );
        }
    }

    #[test]
    fn malformed_json_is_reported() {
        for (body, fragment) in [
            ("", "empty"),
            ("{", "malformed JSON"),
            ("[]", "expected a JSON object"),
            ("{}", "missing field `alerts`"),
            ("{\"alerts\":[]}}}}garbage", "trailing characters"),
        ] {
            let err = parse(body.as_bytes()).unwrap_err();
            assert!(err.contains(fragment), "{body:?}: {err}");
        }
    }
}
