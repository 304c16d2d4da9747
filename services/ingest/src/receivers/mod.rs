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

#[cfg(test)]
mod fuzz;

use serde::Deserialize;
use tocsin_proto::{Labels, Timestamp};

use crate::config::Limits;

/// Parses one JSON document, reporting the path of the offending field.
/// Anything but white space after the document is an error (a truncated or
/// concatenated body is not what the sender meant), and so is a body that
/// is not UTF-8 anywhere (JSON text is UTF-8, RFC 8259; serde passes over
/// the strings of fields a type ignores without checking them).
pub(crate) fn parse_json<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T, String> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err("request body is empty; send a JSON document".into());
    }
    let text = std::str::from_utf8(body).map_err(|e| not_utf8(body, e.valid_up_to()))?;
    let mut de = serde_json::Deserializer::from_str(text);
    let value = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        match inner.classify() {
            serde_json::error::Category::Syntax | serde_json::error::Category::Eof => {
                format!("malformed JSON: {inner}")
            }
            _ if path == "." || path == "?" || path.is_empty() => inner.to_string(),
            _ => format!("{path}: {inner}"),
        }
    })?;
    de.end().map_err(|e| {
        format!("malformed JSON: {e} (the body must hold exactly one JSON document)")
    })?;
    Ok(value)
}

/// The error for a body whose bytes from `at` on are not UTF-8: the
/// place as serde_json names places (line and column, 1-based, the column
/// counted in bytes) and the byte.
fn not_utf8(body: &[u8], at: usize) -> String {
    let before = &body[..at];
    let line = before.iter().filter(|b| **b == b'\n').count() + 1;
    let column = at
        - before
            .iter()
            .rposition(|b| *b == b'\n')
            .map_or(0, |n| n + 1)
        + 1;
    format!(
        "malformed JSON: the body is not UTF-8 (byte {:#04x} at line {line} column {column}); \
         JSON text must be UTF-8",
        body[at]
    )
}

/// Deserializes one element of a request's alert array, naming its path
/// (`alerts[3].labels.a: invalid type ...`).
pub(crate) fn parse_element<'a, T: Deserialize<'a>>(
    i: usize,
    raw: &'a serde_json::value::RawValue,
) -> Result<T, String> {
    let de = &mut serde_json::Deserializer::from_str(raw.get());
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if path == "." || path == "?" || path.is_empty() {
            format!("alerts[{i}]: {inner}")
        } else {
            format!("alerts[{i}].{path}: {inner}")
        }
    })
}

/// Requires the body to be a JSON object (serde would accept a struct
/// written as an array, which no sender means).
pub(crate) fn require_object(body: &[u8], what: &str) -> Result<(), String> {
    match body.iter().find(|b| !b.is_ascii_whitespace()) {
        Some(b'{') | None => Ok(()),
        Some(_) if parse_json::<serde::de::IgnoredAny>(body).is_err() => {
            parse_json::<serde::de::IgnoredAny>(body).map(|_| ())
        }
        Some(_) => Err(format!("expected a JSON object ({what})")),
    }
}

/// The first and last instants Tocsin stores: Go's zero time (which
/// Alertmanager sends for "no end") up to the last one its clock type holds.
pub const EARLIEST: &str = "0001-01-01T00:00:00Z";
pub const LATEST: &str = "9999-12-30T22:00:00Z";

/// Parses an RFC 3339 timestamp (nanoseconds and offsets allowed, also
/// `+0000` as PagerDuty documents it) between [`EARLIEST`] and [`LATEST`].
pub(crate) fn parse_time(field: &str, s: &str) -> Result<Timestamp, String> {
    let out_of_range = || {
        format!(
            "{field}: {s:?} is out of range; timestamps must be between {EARLIEST} and {LATEST}"
        )
    };
    let in_range = |t: Timestamp| {
        if t.as_second() < ZERO_TIME_SECONDS {
            Err(out_of_range())
        } else {
            Ok(t)
        }
    };
    if let Ok(t) = s.parse::<Timestamp>() {
        return in_range(t);
    }
    // `2015-07-17T08:42:58.315+0000`: offset without a colon. The split is
    // at a byte offset, so it must fall on a character boundary.
    if let Some((head, off)) = s
        .len()
        .checked_sub(5)
        .filter(|i| s.is_char_boundary(*i))
        .map(|i| s.split_at(i))
    {
        if (off.starts_with('+') || off.starts_with('-'))
            && off[1..].bytes().all(|b| b.is_ascii_digit())
        {
            let fixed = format!("{head}{}:{}", &off[..3], &off[3..]);
            if let Ok(t) = fixed.parse::<Timestamp>() {
                return in_range(t);
            }
            if is_well_formed(&fixed) {
                return Err(out_of_range());
            }
        }
    }
    if is_well_formed(s) {
        return Err(out_of_range());
    }
    Err(format!(
        "{field}: {s:?} is not an RFC 3339 timestamp (e.g. 2025-01-15T10:00:00Z)"
    ))
}

/// Whether `s` is a well-formed date, time and offset (whatever its range).
fn is_well_formed(s: &str) -> bool {
    jiff::fmt::temporal::Pieces::parse(s)
        .is_ok_and(|p| p.time().is_some() && p.to_numeric_offset().is_some())
}

const ZERO_TIME_SECONDS: i64 = -62_135_596_800; // 0001-01-01T00:00:00Z

/// Go's zero time, which Alertmanager sends as `endsAt` of firing alerts.
pub(crate) fn is_zero_time(t: Timestamp) -> bool {
    t.as_second() <= ZERO_TIME_SECONDS
}

/// Drops labels with empty values (as Alertmanager does), requires at least
/// one label, and checks names, values and counts against `limits`.
pub(crate) fn clean_labels(
    field: &str,
    mut labels: Labels,
    limits: &Limits,
) -> Result<Labels, String> {
    labels.retain(|_, v| !v.is_empty());
    if labels.is_empty() {
        return Err(format!(
            "{field}: must contain at least one label with a value (e.g. \"alertname\")"
        ));
    }
    check_labels(field, &labels, limits)?;
    Ok(labels)
}

/// Checks a label set (labels, or Alertmanager's group labels).
pub(crate) fn check_labels(field: &str, labels: &Labels, limits: &Limits) -> Result<(), String> {
    if labels.len() > limits.labels_per_alert {
        return Err(format!(
            "{field}: {} labels, the limit is {} (ingest.limits.labels_per_alert)",
            labels.len(),
            limits.labels_per_alert
        ));
    }
    for (name, value) in labels {
        check_label_name(field, name, limits)?;
        check_label_value(&member(field, name), value, limits)?;
    }
    Ok(())
}

/// Checks annotations: names as for labels but for the character rule
/// (only control characters are refused), values up to
/// `annotation_value_bytes` with tabs and line breaks allowed.
pub(crate) fn check_annotations(
    field: &str,
    annotations: &Labels,
    limits: &Limits,
) -> Result<(), String> {
    if annotations.len() > limits.annotations_per_alert {
        return Err(format!(
            "{field}: {} annotations, the limit is {} (ingest.limits.annotations_per_alert)",
            annotations.len(),
            limits.annotations_per_alert
        ));
    }
    for (name, value) in annotations {
        if name.len() > limits.label_name_bytes {
            return Err(name_too_long(field, "an annotation", name, limits));
        }
        if name.is_empty() {
            return Err(format!("{field}: an annotation name is empty"));
        }
        if let Some(c) = name.chars().find(|c| c.is_control()) {
            return Err(format!(
                "{}: the name contains the control character U+{:04X}; annotation names must be printable",
                member(field, name),
                c as u32
            ));
        }
        check_annotation_value(&member(field, name), value, limits)?;
    }
    Ok(())
}

/// A label value: at most `label_value_bytes`, no control characters.
pub(crate) fn check_label_value(field: &str, value: &str, limits: &Limits) -> Result<(), String> {
    if value.len() > limits.label_value_bytes {
        return Err(format!(
            "{field}: {} bytes, the limit is {} (ingest.limits.label_value_bytes)",
            value.len(),
            limits.label_value_bytes
        ));
    }
    if let Some((at, c)) = value.char_indices().find(|(_, c)| c.is_control()) {
        return Err(format!(
            "{field}: the value contains the control character U+{:04X} at byte {at}; \
             label values must not contain control characters (CR, LF, tab, NUL, ...)",
            c as u32
        ));
    }
    Ok(())
}

/// An annotation value: at most `annotation_value_bytes`; tab, CR and LF
/// are text, other control characters are refused.
pub(crate) fn check_annotation_value(
    field: &str,
    value: &str,
    limits: &Limits,
) -> Result<(), String> {
    check_annotation_bytes(field, value, limits)?;
    if let Some((at, c)) = value
        .char_indices()
        .find(|(_, c)| c.is_control() && !matches!(c, '\t' | '\n' | '\r'))
    {
        return Err(format!(
            "{field}: the value contains the control character U+{:04X} at byte {at}; \
             annotation values may hold tabs and line breaks but no other control characters",
            c as u32
        ));
    }
    Ok(())
}

/// `ingest.limits.annotation_value_bytes`, the bound of free text.
fn check_annotation_bytes(field: &str, value: &str, limits: &Limits) -> Result<(), String> {
    if value.len() > limits.annotation_value_bytes {
        return Err(format!(
            "{field}: {} bytes, the limit is {} (ingest.limits.annotation_value_bytes)",
            value.len(),
            limits.annotation_value_bytes
        ));
    }
    Ok(())
}

/// A link a sender gives (an alert's `generatorURL`, Alertmanager's
/// `externalURL`): at most `annotation_value_bytes`, and no control
/// characters (it is shown in pages and by `tocsin show`).
pub(crate) fn check_url(field: &str, value: &str, limits: &Limits) -> Result<(), String> {
    check_annotation_bytes(field, value, limits)?;
    if let Some((at, c)) = value.char_indices().find(|(_, c)| c.is_control()) {
        return Err(format!(
            "{field}: the URL contains the control character U+{:04X} at byte {at}; \
             percent-encode it (%{:02X}) or leave it out",
            c as u32, c as u32
        ));
    }
    Ok(())
}

/// Prometheus's label name rule, `[a-zA-Z_][a-zA-Z0-9_]*`, and the length bound.
fn check_label_name(field: &str, name: &str, limits: &Limits) -> Result<(), String> {
    if name.len() > limits.label_name_bytes {
        return Err(name_too_long(field, "a label", name, limits));
    }
    let mut bytes = name.bytes();
    let valid = bytes
        .next()
        .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_');
    if !valid {
        return Err(format!(
            "{}: not a valid label name; label names are letters, digits and _, \
             not starting with a digit ([a-zA-Z_][a-zA-Z0-9_]*)",
            member(field, name)
        ));
    }
    Ok(())
}

fn name_too_long(field: &str, what: &str, name: &str, limits: &Limits) -> String {
    format!(
        "{field}: {what} name ({}) is {} bytes, the limit is {} (ingest.limits.label_name_bytes)",
        shown(name),
        name.len(),
        limits.label_name_bytes
    )
}

/// `field.name`, quoting a name that is not a plain identifier.
fn member(field: &str, name: &str) -> String {
    let plain = !name.is_empty()
        && name.len() <= 64
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
    if plain {
        format!("{field}.{name}")
    } else {
        format!("{field}.{}", shown(name))
    }
}

/// A name for an error message: quoted and escaped, cut at 64 characters.
fn shown(name: &str) -> String {
    let cut: String = name.chars().take(64).collect();
    if cut.len() < name.len() {
        format!("{cut:?}…")
    } else {
        format!("{cut:?}")
    }
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
        for bad in [
            "",
            "yesterday",
            "2025-13-01T00:00:00Z",
            "2025-01-15",
            "€abcd",
            "2025-01-15T10:00:00€0000",
            "ü",
            "aaaa€",
        ] {
            let e = parse_time("alerts[0].startsAt", bad).unwrap_err();
            assert!(e.starts_with("alerts[0].startsAt: "), "{e}");
            assert!(e.contains("not an RFC 3339 timestamp"), "{e}");
        }
        for far in [
            "9999-12-31T00:00:00Z",
            "9999-12-31T00:00:00.000+0000",
            "0000-06-01T00:00:00Z",
        ] {
            let e = parse_time("t", far).unwrap_err();
            assert!(
                e.contains("out of range") && e.contains(EARLIEST) && e.contains(LATEST),
                "{far}: {e}"
            );
        }
        ok(LATEST, LATEST);
    }

    #[test]
    fn json_must_be_one_document() {
        assert!(parse_json::<serde_json::Value>(b" {\"a\":1} \n").is_ok());
        for bad in [&b"{\"a\":1}}}}garbage"[..], b"{} {}", b"[1] x"] {
            let e = parse_json::<serde_json::Value>(bad).unwrap_err();
            assert!(e.contains("trailing characters"), "{e}");
        }
    }

    #[test]
    fn a_body_that_is_not_utf8_is_malformed_json_wherever_the_bytes_are() {
        // JSON text is UTF-8 (RFC 8259): a byte that is not, even in a
        // field Tocsin ignores, is named with its place, not passed over.
        for (bad, place) in [
            (&b"{\"a\":\"\xff\"}"[..], "line 1 column 7"),
            (b"{\"a\":1,\n \"b\":\"x\xc3\"}", "line 2 column 8"),
            (b"[\"\xfe\"]", "line 1 column 3"),
        ] {
            for e in [
                parse_json::<serde::de::IgnoredAny>(bad).unwrap_err(),
                parse_json::<serde_json::Value>(bad).unwrap_err(),
            ] {
                assert!(
                    e.starts_with("malformed JSON: ")
                        && e.contains("not UTF-8")
                        && e.contains(place),
                    "{bad:?}: {e}"
                );
            }
        }
        assert!(require_object(b"[\"\xfe\"]", "x")
            .unwrap_err()
            .contains("not UTF-8"));
    }

    #[test]
    fn labels() {
        let l = |pairs: &[(&str, &str)]| -> Labels {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let lim = Limits::default();
        assert_eq!(
            clean_labels("x", l(&[("a", "1"), ("b", "")]), &lim).unwrap(),
            l(&[("a", "1")])
        );
        let check = |labels: Labels, fragment: &str| {
            let e = clean_labels("alerts[0].labels", labels.clone(), &lim).unwrap_err();
            assert!(e.contains(fragment), "{labels:?}: {e}");
        };
        check(l(&[("b", "")]), "at least one");
        check(
            l(&[("", "v")]),
            r#"alerts[0].labels."": not a valid label name"#,
        );
        check(l(&[("a-b", "v")]), r#"alerts[0].labels."a-b": not a valid"#);
        check(l(&[("1a", "v")]), "not a valid label name");
        check(
            l(&[("a\nb", "v")]),
            r#"alerts[0].labels."a\nb": not a valid"#,
        );
        check(l(&[("é", "v")]), "not a valid label name");
        check(
            l(&[("a", "x\ty")]),
            "alerts[0].labels.a: the value contains the control character U+0009 at byte 1",
        );
        check(l(&[("a", "\u{85}")]), "U+0085");
        let long_name = "n".repeat(257);
        check(
            l(&[(long_name.as_str(), "v")]),
            "is 257 bytes, the limit is 256 (ingest.limits.label_name_bytes)",
        );
        let long_value = "v".repeat(4097);
        check(
            l(&[("a", long_value.as_str())]),
            "alerts[0].labels.a: 4097 bytes, the limit is 4096 (ingest.limits.label_value_bytes)",
        );
        let many: Labels = (0..65).map(|n| (format!("l{n}"), "v".into())).collect();
        check(many, "65 labels, the limit is 64");
        assert!(clean_labels("x", l(&[("_ok_9", "any üñíçødé / value")]), &lim).is_ok());
    }

    #[test]
    fn annotations() {
        let lim = Limits::default();
        let one = |k: &str, v: &str| -> Labels { [(k.to_string(), v.to_string())].into() };
        assert!(check_annotations("a", &one("runbook-url", "line 1\n\tline 2\r\n"), &lim).is_ok());
        let e = check_annotations("a", &one("s", "bell\u{7}"), &lim).unwrap_err();
        assert!(
            e.contains("a.s: the value contains the control character U+0007"),
            "{e}"
        );
        let e = check_annotations("a", &one("s", &"x".repeat(16_385)), &lim).unwrap_err();
        assert!(
            e.contains("16385 bytes, the limit is 16384 (ingest.limits.annotation_value_bytes)"),
            "{e}"
        );
        let e = check_annotations("a", &one("x\ny", "v"), &lim).unwrap_err();
        assert!(
            e.contains(r#"a."x\ny": the name contains the control character U+000A"#),
            "{e}"
        );
        let many: Labels = (0..65).map(|n| (format!("a{n}"), "v".into())).collect();
        let e = check_annotations("a", &many, &lim).unwrap_err();
        assert!(e.contains("65 annotations, the limit is 64"), "{e}");
    }
}
