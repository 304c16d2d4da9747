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
//! | `startsAt` | no | RFC 3339; default: when Tocsin received it (the incidents service keeps the earliest start of an alert that is still firing, so a re-post changes nothing) |
//! | `endsAt` | no | RFC 3339 |
//! | `generatorURL` | no | link to the source |
//! | `fingerprint` | no | 16 lowercase hex digits; default: Alertmanager's hash of the labels |
//! | `dedup_key` | no | any string naming the incident directly (up to 255 characters) |
//!
//! `starts_at`, `ends_at`, `generator_url` and `dedupKey` are accepted as
//! aliases.

use serde::Deserialize;
use serde_json::value::RawValue;
use tocsin_proto::{Alert, AlertStatus, Fingerprint, Labels, Origin, SourceKind, Timestamp};

use super::{
    check_annotations, check_url, clean_labels, is_zero_time, parse_element, parse_json, parse_time,
};
use crate::{config::Limits, error::Rejection};

/// `{"alerts": [...]}`; other keys are ignored. The alerts stay raw JSON
/// until their number is checked.
#[derive(Debug, Deserialize)]
struct Wrapped<'a> {
    #[serde(borrow)]
    alerts: Vec<&'a RawValue>,
}

const SHAPE: &str = "expected {\"alerts\": [...]} or a JSON array of alerts";

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
    // camelCase would make this `dedupKey` only; the documented spelling
    // is `dedup_key`, and both are accepted.
    #[serde(default, alias = "dedup_key")]
    dedup_key: Option<String>,
}

/// Parses a generic request body, checking it against `limits`: too many
/// alerts is a 413, anything else wrong a 400 naming the field.
pub fn parse(
    body: &[u8],
    received_at: Timestamp,
    limits: &Limits,
) -> Result<Vec<Alert>, Rejection> {
    let items: Vec<&RawValue> = match body.iter().find(|b| !b.is_ascii_whitespace()) {
        Some(b'[') => parse_json(body).map_err(Rejection::invalid)?,
        Some(b'{') => {
            // Syntax errors first, so they are named as such.
            parse_json::<serde::de::IgnoredAny>(body).map_err(Rejection::invalid)?;
            parse_json::<Wrapped>(body)
                .map_err(|_| Rejection::invalid(SHAPE))?
                .alerts
        }
        _ => {
            parse_json::<serde::de::IgnoredAny>(body).map_err(Rejection::invalid)?;
            return Err(Rejection::invalid(SHAPE));
        }
    };
    if items.len() > limits.alerts_per_request {
        return Err(Rejection::too_many_alerts(
            items.len(),
            limits.alerts_per_request,
            "split the batch",
        ));
    }
    items
        .into_iter()
        .enumerate()
        .map(|(i, raw)| convert(i, parse_element(i, raw)?, received_at, limits))
        .collect::<Result<_, String>>()
        .map_err(Rejection::invalid)
}

fn convert(
    i: usize,
    a: GenericAlert,
    received_at: Timestamp,
    limits: &Limits,
) -> Result<Alert, String> {
    let labels = clean_labels(&format!("alerts[{i}].labels"), a.labels, limits)?;
    check_annotations(&format!("alerts[{i}].annotations"), &a.annotations, limits)?;
    if let Some(u) = &a.generator_url {
        check_url(&format!("alerts[{i}].generatorURL"), u, limits)?;
    }
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

    fn parse(body: &[u8], received_at: Timestamp) -> Result<Vec<Alert>, String> {
        super::parse(body, received_at, &Limits::default()).map_err(|r| r.reason)
    }

    #[test]
    fn a_generator_url_holding_control_characters_is_refused() {
        let body = br#"[{"labels":{"alertname":"x"},"generatorURL":"http://g\u001b]0;t\u0007"}]"#;
        let err = parse(body, now()).unwrap_err();
        assert!(
            err.starts_with("alerts[0].generatorURL") && err.contains("control character"),
            "{err}"
        );
    }

    #[test]
    fn a_body_that_is_not_utf8_is_named_so_in_either_shape() {
        for body in [
            &b"{\"alerts\":[{\"labels\":{\"alertname\":\"\xff\xfe\"}}]}"[..],
            b"{\"alerts\":[{\"labels\":{\"alertname\":\"x\"}}],\"other\":\"\xff\"}",
            b"[{\"labels\":{\"alertname\":\"\xff\"}}]",
        ] {
            let err = parse(body, now()).unwrap_err();
            assert!(
                err.starts_with("malformed JSON: ") && err.contains("not UTF-8"),
                "{}: {err}",
                String::from_utf8_lossy(body)
            );
        }
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
        check(json!({"alerts":{}}), "expected {\"alerts\"");
        check(
            json!([{"labels":{"a":"b"},"annotations":{"x":"\u{1b}[31m"}}]),
            "alerts[0].annotations.x: the value contains the control character U+001B",
        );
        for body in ["[]]", "[] x", "{\"alerts\":[]}}"] {
            let err = parse(body.as_bytes(), now()).unwrap_err();
            assert!(err.contains("trailing characters"), "{body}: {err}");
        }
    }

    #[test]
    fn both_dedup_key_spellings() {
        for field in ["dedup_key", "dedupKey"] {
            let body = json!([{"labels":{"a":"b"}, field: "k1"}]);
            let a = parse(body.to_string().as_bytes(), now()).unwrap();
            assert_eq!(a[0].dedup_key.as_deref(), Some("k1"), "{field}");
        }
    }

    #[test]
    fn too_many_alerts_is_a_413() {
        let body = json!({"alerts": [{"labels":{"a":"b"}}, {"labels":{"a":"c"}}], "other": 1});
        let limits = Limits {
            alerts_per_request: 1,
            ..Limits::default()
        };
        let r = super::parse(body.to_string().as_bytes(), now(), &limits).unwrap_err();
        assert_eq!(r.status.as_u16(), 413);
        assert!(
            r.reason.contains("2 alerts in one request, the limit is 1"),
            "{}",
            r.reason
        );
        let ok = super::parse(body.to_string().as_bytes(), now(), &Limits::default()).unwrap();
        assert_eq!(ok.len(), 2);
    }
}
