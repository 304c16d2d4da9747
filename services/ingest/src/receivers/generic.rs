//! Tocsin's generic JSON format (`POST /api/v1/alerts`).
//!
//! Either `{"alerts": [ ... ]}` or a bare array of alerts, so anything that
//! pushes to Alertmanager's `/api/v2/alerts` can push here unchanged. Each
//! alert:
//!
//! | field | required | meaning |
//! |---|---|---|
//! | `labels` | yes | at least one label; empty values are dropped |
//! | `annotations` | no | free text (summary, description, runbook_url) |
//! | `status` | no | `firing` or `resolved`; by default `resolved` when `endsAt` is in the past, else `firing` |
//! | `startsAt` | no | RFC 3339; default: when Tocsin received it |
//! | `endsAt` | no | RFC 3339 |
//! | `generatorURL` | no | link to the source |
//! | `fingerprint` | no | 16 lowercase hex digits; default: Alertmanager's hash of the labels |
//! | `dedup_key` | no | any string naming the incident directly (up to 255 characters) |
//!
//! `starts_at`, `ends_at` and `generator_url` are accepted as aliases.

use serde::Deserialize;
use tocsin_proto::{Alert, AlertStatus, Fingerprint, Labels, Origin, SourceKind, Timestamp};

use super::{clean_labels, is_zero_time, parse_json, parse_time};

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Body {
    Wrapped { alerts: Vec<serde_json::Value> },
    Bare(Vec<serde_json::Value>),
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct GenericAlert {
    labels: Labels,
    #[serde(default)]
    annotations: Labels,
    #[serde(default)]
    status: Option<String>,
    #[serde(default, alias = "starts_at")]
    starts_at: Option<String>,
    #[serde(default, alias = "ends_at")]
    ends_at: Option<String>,
    #[serde(default, rename = "generatorURL", alias = "generator_url")]
    generator_url: Option<String>,
    #[serde(default)]
    fingerprint: Option<String>,
    #[serde(default)]
    dedup_key: Option<String>,
}

/// Parses a generic request body.
pub fn parse(body: &[u8], received_at: Timestamp) -> Result<Vec<Alert>, String> {
    let items = match parse_json::<serde_json::Value>(body)? {
        v @ serde_json::Value::Array(_) | v @ serde_json::Value::Object(_) => {
            serde_json::from_value::<Body>(v)
                .map_err(|_| "expected {\"alerts\": [...]} or a JSON array of alerts".to_string())?
        }
        _ => return Err("expected {\"alerts\": [...]} or a JSON array of alerts".into()),
    };
    let items = match items {
        Body::Wrapped { alerts } | Body::Bare(alerts) => alerts,
    };
    items
        .into_iter()
        .enumerate()
        .map(|(i, v)| {
            let raw: GenericAlert = serde_path_to_error::deserialize(v).map_err(|e| {
                let path = e.path().to_string();
                if path == "." {
                    format!("alerts[{i}]: {}", e.into_inner())
                } else {
                    format!("alerts[{i}].{path}: {}", e.into_inner())
                }
            })?;
            convert(i, raw, received_at)
        })
        .collect()
}

fn convert(i: usize, a: GenericAlert, received_at: Timestamp) -> Result<Alert, String> {
    let labels = clean_labels(&format!("alerts[{i}].labels"), a.labels)?;
    let starts_at = match a.starts_at.as_deref() {
        None | Some("") => received_at,
        Some(s) => parse_time(&format!("alerts[{i}].startsAt"), s)?,
    };
    let ends_at = match a.ends_at.as_deref() {
        None | Some("") => None,
        Some(s) => {
            Some(parse_time(&format!("alerts[{i}].endsAt"), s)?).filter(|t| !is_zero_time(*t))
        }
    };
    if let Some(end) = ends_at {
        if end < starts_at {
            return Err(format!(
                "alerts[{i}]: endsAt ({end}) is before startsAt ({starts_at})"
            ));
        }
    }
    let status = match a.status.as_deref() {
        Some("firing") => AlertStatus::Firing,
        Some("resolved") => AlertStatus::Resolved,
        None | Some("") => match ends_at {
            Some(end) if end <= received_at => AlertStatus::Resolved,
            _ => AlertStatus::Firing,
        },
        Some(other) => {
            return Err(format!(
                "alerts[{i}].status: {other:?} is neither \"firing\" nor \"resolved\""
            ))
        }
    };
    let fingerprint = match a.fingerprint.as_deref() {
        None | Some("") => Fingerprint::from_labels(&labels),
        Some(fp) => Fingerprint::parse(fp).map_err(|e| {
            format!("alerts[{i}].fingerprint: {e}; omit it to have Tocsin compute it, or use dedup_key for a free-form key")
        })?,
    };
    let dedup_key = a.dedup_key.filter(|k| !k.is_empty());
    if let Some(k) = &dedup_key {
        if k.chars().count() > 255 {
            return Err(format!(
                "alerts[{i}].dedup_key is longer than 255 characters"
            ));
        }
    }
    Ok(Alert {
        fingerprint,
        status,
        labels,
        annotations: a.annotations,
        starts_at,
        ends_at: if status == AlertStatus::Resolved {
            ends_at.or(Some(received_at))
        } else {
            ends_at
        },
        generator_url: a.generator_url.filter(|u| !u.is_empty()),
        dedup_key,
        origin: Origin {
            kind: Some(SourceKind::Generic),
            ..Origin::default()
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn now() -> Timestamp {
        "2025-01-15T10:00:00Z".parse().unwrap()
    }

    #[test]
    fn both_shapes_and_defaults() {
        let one =
            json!({"labels":{"alertname":"DiskFull","host":"db1"},"annotations":{"summary":"92%"}});
        for body in [json!({"alerts":[one.clone()]}), json!([one])] {
            let alerts = parse(body.to_string().as_bytes(), now()).unwrap();
            assert_eq!(alerts.len(), 1);
            let a = &alerts[0];
            assert_eq!(a.status, AlertStatus::Firing);
            assert_eq!(a.starts_at, now());
            assert_eq!(a.fingerprint, Fingerprint::from_labels(&a.labels));
        }
    }

    #[test]
    fn status_follows_ends_at_like_alertmanager() {
        let check = |ends_at: &str, expected: AlertStatus| {
            let body =
                json!([{"labels":{"a":"b"},"startsAt":"2025-01-15T09:00:00Z","endsAt":ends_at}]);
            assert_eq!(
                parse(body.to_string().as_bytes(), now()).unwrap()[0].status,
                expected,
                "{ends_at}"
            );
        };
        check("2025-01-15T09:30:00Z", AlertStatus::Resolved);
        check("2025-01-15T11:00:00Z", AlertStatus::Firing);
        check("0001-01-01T00:00:00Z", AlertStatus::Firing);
    }

    #[test]
    fn rejections() {
        let check = |body: serde_json::Value, fragment: &str| {
            let err = parse(body.to_string().as_bytes(), now()).unwrap_err();
            assert!(err.contains(fragment), "{body}: {err}");
        };
        check(
            json!({"alerts":[{"annotations":{}}]}),
            "alerts[0]: missing field `labels`",
        );
        check(
            json!([{"labels":{"a":1}}]),
            "alerts[0].labels.a: invalid type",
        );
        check(
            json!([{"labels":{"a":"b"},"status":"meh"}]),
            "alerts[0].status",
        );
        check(
            json!([{"labels":{"a":"b"},"fingerprint":"nope"}]),
            "alerts[0].fingerprint",
        );
        check(
            json!([{"labels":{"a":"b"},"startsAt":"2025-01-15T09:00:00Z","endsAt":"2025-01-15T08:00:00Z"}]),
            "before startsAt",
        );
        check(
            json!([{"labels":{"a":"b"},"lables":{}}]),
            "unknown field `lables`",
        );
        check(json!("hello"), "expected {\"alerts\"");
        check(json!({"alert":[]}), "expected {\"alerts\"");
    }
}
