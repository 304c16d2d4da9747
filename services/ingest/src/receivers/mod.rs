//! Receivers: pure functions from a request body to normalized [`Alert`]s.
//!
//! No IO here: each receiver parses and validates, and the HTTP layer
//! publishes what they return. Errors name the field (`alerts[1].labels`) and
//! the problem.
//!
//! [`Alert`]: tocsin_proto::Alert

pub mod alertmanager;
pub mod generic;
pub mod pagerduty;

use serde::de::DeserializeOwned;
use tocsin_proto::{Labels, Timestamp};

/// Parses JSON, reporting the path of the offending field.
pub(crate) fn parse_json<T: DeserializeOwned>(body: &[u8]) -> Result<T, String> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err("request body is empty; send a JSON document".into());
    }
    let de = &mut serde_json::Deserializer::from_slice(body);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        match inner.classify() {
            serde_json::error::Category::Syntax | serde_json::error::Category::Eof => {
                format!("malformed JSON: {inner}")
            }
            _ if path == "." || path == "?" || path.is_empty() => inner.to_string(),
            _ => format!("{path}: {inner}"),
        }
    })
}

/// Requires the body to be a JSON object (serde would accept a struct
/// written as an array, which no sender means).
pub(crate) fn require_object(body: &[u8], what: &str) -> Result<(), String> {
    match body.iter().find(|b| !b.is_ascii_whitespace()) {
        Some(b'{') | None => Ok(()),
        Some(_) if serde_json::from_slice::<serde::de::IgnoredAny>(body).is_err() => {
            parse_json::<serde::de::IgnoredAny>(body).map(|_| ())
        }
        Some(_) => Err(format!("expected a JSON object ({what})")),
    }
}

/// Parses an RFC 3339 timestamp (nanoseconds and offsets allowed, also
/// `+0000` as PagerDuty documents it).
pub(crate) fn parse_time(field: &str, s: &str) -> Result<Timestamp, String> {
    if let Ok(t) = s.parse::<Timestamp>() {
        return Ok(t);
    }
    // `2015-07-17T08:42:58.315+0000`: offset without a colon.
    if let Some((head, off)) = s.len().checked_sub(5).map(|i| s.split_at(i)) {
        if (off.starts_with('+') || off.starts_with('-'))
            && off[1..].bytes().all(|b| b.is_ascii_digit())
        {
            let fixed = format!("{head}{}:{}", &off[..3], &off[3..]);
            if let Ok(t) = fixed.parse::<Timestamp>() {
                return Ok(t);
            }
        }
    }
    Err(format!(
        "{field}: {s:?} is not an RFC 3339 timestamp (e.g. 2025-01-15T10:00:00Z)"
    ))
}

/// Go's zero time, which Alertmanager sends as `endsAt` of firing alerts.
pub(crate) fn is_zero_time(t: Timestamp) -> bool {
    t.as_second() <= -62_135_596_800 // 0001-01-01T00:00:00Z
}

/// Drops labels with empty values (as Alertmanager does) and requires at
/// least one label with a non-empty name.
pub(crate) fn clean_labels(field: &str, mut labels: Labels) -> Result<Labels, String> {
    labels.retain(|_, v| !v.is_empty());
    if labels.is_empty() {
        return Err(format!(
            "{field}: must contain at least one label with a value (e.g. \"alertname\")"
        ));
    }
    if labels.contains_key("") {
        return Err(format!("{field}: a label name is empty"));
    }
    Ok(labels)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times() {
        let ok = |s: &str, expected: &str| {
            assert_eq!(parse_time("t", s).unwrap().to_string(), expected, "{s}");
        };
        ok("2025-01-15T10:00:00Z", "2025-01-15T10:00:00Z");
        ok(
            "2025-01-15T10:00:00.123456789Z",
            "2025-01-15T10:00:00.123456789Z",
        );
        ok("2025-01-15T12:00:00+02:00", "2025-01-15T10:00:00Z");
        ok("2015-07-17T08:42:58.315+0000", "2015-07-17T08:42:58.315Z");
        assert!(is_zero_time(
            parse_time("t", "0001-01-01T00:00:00Z").unwrap()
        ));
        assert!(!is_zero_time(
            parse_time("t", "1970-01-01T00:00:00Z").unwrap()
        ));
        for bad in ["", "yesterday", "2025-13-01T00:00:00Z", "2025-01-15"] {
            let e = parse_time("alerts[0].startsAt", bad).unwrap_err();
            assert!(e.starts_with("alerts[0].startsAt: "), "{e}");
        }
    }

    #[test]
    fn labels() {
        let l = |pairs: &[(&str, &str)]| -> Labels {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        assert_eq!(
            clean_labels("x", l(&[("a", "1"), ("b", "")])).unwrap(),
            l(&[("a", "1")])
        );
        assert!(clean_labels("x", l(&[("b", "")]))
            .unwrap_err()
            .contains("at least one"));
        assert!(clean_labels("x", l(&[("", "v")]))
            .unwrap_err()
            .contains("empty"));
    }
}
