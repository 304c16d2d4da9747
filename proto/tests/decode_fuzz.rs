//! The MessagePack decoders over hostile bytes: every consumer decodes what
//! it reads from a stream, and a message it cannot decode must be an error
//! (dead-lettered by the consumer), never a panic or a stack overflow.
//!
//! Cases per property: 256, or `PROPTEST_CASES`. A failure prints the
//! seed and the minimal input; proptest also saves it under
//! `proptest-regressions/` so the next run tries it first.

use proptest::prelude::*;
use serde::de::DeserializeOwned;
use serde_json::{json, Value};
use tocsin_proto::{
    codec::decode_envelope, command::Command, incident::LogEntry, notify::Page, Alert,
};

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

/// Decodes `bytes` as every envelope type consumers read; the result does
/// not matter, only that there is one.
fn decode_all(bytes: &[u8]) {
    fn one<T: DeserializeOwned>(bytes: &[u8]) {
        let _ = decode_envelope::<T>(bytes);
    }
    one::<Alert>(bytes);
    one::<LogEntry>(bytes);
    one::<Page>(bytes);
    one::<Command>(bytes);
    // Messages of several: a request's alerts, a burst's records and pages.
    one::<Vec<Alert>>(bytes);
    one::<Vec<Command>>(bytes);
    one::<Vec<Page>>(bytes);
}

fn golden() -> Vec<u8> {
    let hex: String = include_str!("golden/alert_envelope.hex")
        .split_whitespace()
        .collect();
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).expect("golden file is hex"))
        .collect()
}

/// JSON values of any shape, a few levels deep.
fn any_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        ".{0,12}".prop_map(Value::String),
        prop::sample::select(vec![
            "firing",
            "resolved",
            "opened",
            "acknowledged",
            "critical",
            "slack",
            "email",
            "2025-01-15T10:00:00Z",
            "9999-12-31T23:59:59Z",
            "cbf29ce484222325",
            "",
        ])
        .prop_map(|s| Value::String(s.into())),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map(field_name(), inner, 0..8)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// Field names of the wire types, so generated maps reach deep into the
/// decoders, plus arbitrary ones.
fn field_name() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => prop::sample::select(vec![
            "schema", "source", "received_at", "traceparent", "body", "fingerprint", "status",
            "labels", "annotations", "starts_at", "ends_at", "generator_url", "dedup_key",
            "origin", "kind", "incident", "event", "cause", "actor", "id", "number", "severity",
            "page", "channel", "target", "action", "command", "at", "seq", "alert", "reason",
        ])
        .prop_map(String::from),
        1 => ".{0,8}",
    ]
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        decode_all(&bytes);
    }

    #[test]
    fn well_formed_msgpack_of_any_shape_never_panics(body in any_value(), schema in 0u32..3) {
        let env = json!({"schema": schema, "source": "s", "received_at": "2025-01-15T10:00:00Z",
                         "body": body});
        decode_all(&rmp_serde::to_vec_named(&env).unwrap());
        decode_all(&rmp_serde::to_vec_named(&body).unwrap());
    }

    #[test]
    fn mutated_golden_bytes_never_panic(
        edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>(), 0u8..3), 1..8)
    ) {
        let mut bytes = golden();
        for (at, byte, op) in edits {
            let i = at.index(bytes.len().max(1));
            match op {
                0 if !bytes.is_empty() => bytes[i] = byte,
                1 => bytes.insert(i.min(bytes.len()), byte),
                _ if !bytes.is_empty() => {
                    bytes.remove(i);
                }
                _ => {}
            }
        }
        decode_all(&bytes);
    }
}

#[test]
fn deep_nesting_is_an_error_not_a_stack_overflow() {
    // 100,000 nested one-element arrays (0x91), then one map (0x81).
    for lead in [0x91u8, 0x81] {
        let mut bytes = vec![lead; 100_000];
        if lead == 0x81 {
            // A map of one entry needs a key before each nested value.
            bytes = std::iter::repeat_n([0x81u8, 0xa1, b'k'], 50_000)
                .flatten()
                .collect();
        }
        bytes.push(0xc0);
        decode_all(&bytes);
    }
}

#[test]
fn the_golden_bytes_still_decode() {
    assert!(decode_envelope::<Alert>(&golden()).is_ok());
}
