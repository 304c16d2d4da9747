//! Property tests: every receiver over arbitrary bytes and over JSON shaped
//! like its payload. A receiver never panics; it returns alerts within the
//! limits, or a 4xx naming the problem.
//!
//! Cases per property: 256, or `PROPTEST_CASES`. A failure prints the seed
//! and the minimal input (also saved under `proptest-regressions/`).

use proptest::prelude::*;
use serde_json::{json, Map, Value};
use tocsin_proto::{Alert, Timestamp};

use super::{alertmanager, generic, pagerduty};
use crate::{config::Limits, error::Rejection};

fn config() -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256);
    ProptestConfig {
        cases,
        ..ProptestConfig::default()
    }
}

/// Small limits, so generated input reaches them.
fn limits() -> Limits {
    Limits {
        alerts_per_request: 5,
        labels_per_alert: 6,
        label_name_bytes: 12,
        label_value_bytes: 24,
        annotations_per_alert: 4,
        annotation_value_bytes: 48,
        alert_bytes: 4096,
    }
}

fn now() -> Timestamp {
    "2025-01-15T10:00:00Z".parse().unwrap()
}

/// What a receiver may answer: alerts that respect every limit, or a 4xx.
fn check(result: Result<Vec<Alert>, Rejection>, l: &Limits) -> Result<(), TestCaseError> {
    match result {
        Ok(alerts) => {
            prop_assert!(alerts.len() <= l.alerts_per_request);
            for a in &alerts {
                prop_assert!(!a.labels.is_empty());
                prop_assert!(a.labels.len() <= l.labels_per_alert);
                for (k, v) in &a.labels {
                    prop_assert!(k.len() <= l.label_name_bytes, "{k}");
                    prop_assert!(v.len() <= l.label_value_bytes, "{v}");
                    prop_assert!(!v.chars().any(char::is_control), "{v:?}");
                    let mut b = k.bytes();
                    prop_assert!(b
                        .next()
                        .is_some_and(|c| c.is_ascii_alphabetic() || c == b'_'));
                    prop_assert!(b.all(|c| c.is_ascii_alphanumeric() || c == b'_'), "{k}");
                }
                prop_assert!(a.annotations.len() <= l.annotations_per_alert);
                for v in a.annotations.values() {
                    prop_assert!(v.len() <= l.annotation_value_bytes);
                }
                prop_assert!(tocsin_proto::codec::encode(a).is_ok());
            }
        }
        Err(r) => {
            prop_assert!(r.status.is_client_error(), "{} {}", r.status, r.reason);
            prop_assert!(!r.reason.is_empty());
        }
    }
    Ok(())
}

fn run_all(body: &[u8]) -> Result<(), TestCaseError> {
    let l = limits();
    check(alertmanager::parse(body, &l).map(|p| p.alerts), &l)?;
    check(generic::parse(body, now(), &l), &l)?;
    let pd = pagerduty::parse(body, "fuzz", now(), &l, || "generated".into())
        .map(|p| vec![p.alert])
        .map_err(Rejection::pagerduty_invalid);
    check(pd, &l)?;
    let change = pagerduty::parse_change(body, "fuzz", now(), &l)
        .map(|a| vec![a])
        .map_err(Rejection::pagerduty_invalid);
    check(change, &l)?;
    let _ = pagerduty::routing_key(body);
    Ok(())
}

/// Strings that stress the parsers: empty, unicode, control characters,
/// timestamps valid, malformed and out of range.
fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        ".{0,30}",
        "[a-z_]{1,14}",
        prop::sample::select(vec![
            "",
            "firing",
            "resolved",
            "trigger",
            "acknowledge",
            "resolve",
            "critical",
            "info",
            "2025-01-15T10:00:00Z",
            "2015-07-17T08:42:58.315+0000",
            "0001-01-01T00:00:00Z",
            "9999-12-31T00:00:00Z",
            "€abcd",
            "2025-01-15T10:00:00€0000",
            "a\r\nb",
            "\u{0}",
            "6a4f37c34a2d1e4b",
            "4",
        ])
        .prop_map(String::from),
    ]
}

fn scalar() -> impl Strategy<Value = Value> {
    prop_oneof![
        4 => text().prop_map(Value::String),
        1 => any::<i64>().prop_map(Value::from),
        1 => any::<bool>().prop_map(Value::Bool),
        1 => Just(Value::Null),
    ]
}

fn label_set() -> impl Strategy<Value = Value> {
    prop_oneof![
        6 => prop::collection::btree_map(text(), text(), 0..8)
            .prop_map(|m| Value::Object(m.into_iter().map(|(k, v)| (k, Value::String(v))).collect())),
        1 => scalar(),
    ]
}

/// An object with some of `fields` (each a plausible or wrong value) and
/// sometimes an unknown key.
fn object(fields: Vec<(&'static str, BoxedStrategy<Value>)>) -> impl Strategy<Value = Value> {
    let n = fields.len();
    let values: Vec<_> = fields
        .into_iter()
        .map(|(k, s)| prop::option::weighted(0.8, s).prop_map(move |v| (k, v)))
        .collect();
    (values, prop::option::weighted(0.1, (text(), scalar()))).prop_map(move |(vals, extra)| {
        let mut m = Map::with_capacity(n + 1);
        for (k, v) in vals {
            if let Some(v) = v {
                m.insert(k.to_string(), v);
            }
        }
        if let Some((k, v)) = extra {
            m.insert(k, v);
        }
        Value::Object(m)
    })
}

fn am_alert() -> impl Strategy<Value = Value> {
    object(vec![
        ("status", scalar().boxed()),
        ("labels", label_set().boxed()),
        ("annotations", label_set().boxed()),
        ("startsAt", scalar().boxed()),
        ("endsAt", scalar().boxed()),
        ("generatorURL", scalar().boxed()),
        ("fingerprint", scalar().boxed()),
    ])
}

fn webhook() -> impl Strategy<Value = Value> {
    object(vec![
        ("version", scalar().boxed()),
        ("status", scalar().boxed()),
        ("receiver", scalar().boxed()),
        ("groupKey", scalar().boxed()),
        ("groupLabels", label_set().boxed()),
        ("commonLabels", label_set().boxed()),
        ("externalURL", scalar().boxed()),
        ("truncatedAlerts", scalar().boxed()),
        (
            "alerts",
            prop::collection::vec(am_alert(), 0..8)
                .prop_map(Value::Array)
                .boxed(),
        ),
    ])
}

fn generic_body() -> impl Strategy<Value = Value> {
    let alert = object(vec![
        ("labels", label_set().boxed()),
        ("annotations", label_set().boxed()),
        ("status", scalar().boxed()),
        ("startsAt", scalar().boxed()),
        ("ends_at", scalar().boxed()),
        ("generatorURL", scalar().boxed()),
        ("fingerprint", scalar().boxed()),
        ("dedup_key", scalar().boxed()),
        ("dedupKey", scalar().boxed()),
    ]);
    prop::collection::vec(alert, 0..8).prop_flat_map(|alerts| {
        prop_oneof![
            Just(Value::Array(alerts.clone())),
            Just(json!({ "alerts": alerts })),
        ]
    })
}

fn pd_event() -> impl Strategy<Value = Value> {
    let payload = object(vec![
        ("summary", scalar().boxed()),
        ("source", scalar().boxed()),
        ("severity", scalar().boxed()),
        ("timestamp", scalar().boxed()),
        ("component", scalar().boxed()),
        ("group", scalar().boxed()),
        ("class", scalar().boxed()),
        ("custom_details", label_set().boxed()),
    ]);
    object(vec![
        ("routing_key", scalar().boxed()),
        ("event_action", scalar().boxed()),
        ("dedup_key", scalar().boxed()),
        ("payload", payload.boxed()),
        ("client", scalar().boxed()),
        ("client_url", scalar().boxed()),
        ("links", label_set().boxed()),
    ])
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn arbitrary_bytes(body in prop::collection::vec(any::<u8>(), 0..300)) {
        run_all(&body)?;
    }

    #[test]
    fn arbitrary_utf8(body in ".{0,300}") {
        run_all(body.as_bytes())?;
    }

    #[test]
    fn alertmanager_shaped(v in webhook(), garbage in prop::option::weighted(0.1, ".{1,4}")) {
        let body = format!("{v}{}", garbage.unwrap_or_default());
        run_all(body.as_bytes())?;
    }

    #[test]
    fn generic_shaped(v in generic_body()) {
        run_all(v.to_string().as_bytes())?;
    }

    #[test]
    fn pagerduty_shaped(v in pd_event()) {
        run_all(v.to_string().as_bytes())?;
    }
}
