//! MessagePack codec with named fields.
//!
//! `to_vec_named` writes structs as maps keyed by field name, so a reader
//! ignores fields it does not know and defaults ones it does not find.

use serde::{de::DeserializeOwned, Serialize};

use crate::envelope::{Envelope, SCHEMA_VERSION};

/// Why a payload could not be encoded or decoded.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("cannot encode payload: {0}")]
    Encode(#[from] rmp_serde::encode::Error),
    #[error("payload is not valid Tocsin MessagePack: {0}")]
    Decode(#[from] rmp_serde::decode::Error),
    #[error("payload schema version {found} is newer than this reader's {supported}; upgrade this service")]
    UnsupportedSchema { found: u32, supported: u32 },
    #[error("the message holds no alerts")]
    Empty,
}

/// Encodes a value as MessagePack with field names.
pub fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, CodecError> {
    Ok(rmp_serde::to_vec_named(value)?)
}

/// The size of `value` as [`encode`] writes it, counted as it is written
/// rather than kept: no buffer grown, nothing copied. For sizing messages
/// before they are made (escalation groups pages by it).
pub fn encoded_len<T: Serialize>(value: &T) -> Result<usize, CodecError> {
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 += buf.len();
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut count = Count(0);
    rmp_serde::encode::write_named(&mut count, value)?;
    Ok(count.0)
}

/// Deepest nesting accepted. Tocsin's types nest well under ten levels;
/// rmp-serde's own limit (1024) lets a hostile message overflow a thread's
/// stack through fields the reader ignores, before the limit is reached.
pub const MAX_DEPTH: usize = 64;

/// Decodes a value written by [`encode`].
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, CodecError> {
    let mut de = rmp_serde::Deserializer::from_read_ref(bytes);
    de.set_max_depth(MAX_DEPTH);
    Ok(T::deserialize(&mut de)?)
}

/// Decodes an envelope and checks its schema version.
pub fn decode_envelope<T: DeserializeOwned>(bytes: &[u8]) -> Result<Envelope<T>, CodecError> {
    let env: Envelope<T> = decode(bytes)?;
    if env.schema > SCHEMA_VERSION {
        return Err(CodecError::UnsupportedSchema {
            found: env.schema,
            supported: SCHEMA_VERSION,
        });
    }
    Ok(env)
}

/// Decodes an ALERTS message: the alerts it holds, in order, in one
/// envelope per request they came in. A message on an alert's own subject
/// holds one (`Envelope<Alert>`); one on
/// [`crate::subjects::alert_batch_subject`] holds a request's several
/// (`Envelope<Vec<Alert>>`); one on [`crate::subjects::alert_pack_subject`]
/// holds several requests' (`Vec<Envelope<Vec<Alert>>>`, never empty).
pub fn decode_alerts(
    subject: &str,
    bytes: &[u8],
) -> Result<Vec<Envelope<Vec<crate::Alert>>>, CodecError> {
    if crate::subjects::is_alert_pack(subject) {
        let pack: Vec<Envelope<Vec<crate::Alert>>> = decode(bytes)?;
        if pack.is_empty() {
            return Err(CodecError::Empty);
        }
        if let Some(env) = pack.iter().find(|e| e.schema > SCHEMA_VERSION) {
            return Err(CodecError::UnsupportedSchema {
                found: env.schema,
                supported: SCHEMA_VERSION,
            });
        }
        return Ok(pack);
    }
    Ok(vec![decode_one_or_many(
        crate::subjects::is_alert_batch(subject),
        bytes,
    )?])
}

/// Decodes a COMMANDS message: the commands it holds, in order (several
/// on a [`crate::command::batch_subject`], else one).
pub fn decode_commands(
    subject: &str,
    bytes: &[u8],
) -> Result<Envelope<Vec<crate::command::Command>>, CodecError> {
    decode_one_or_many(crate::command::is_batch(subject), bytes)
}

/// Decodes a NOTIFY message: the pages it holds, in order (several on a
/// [`crate::subjects::notify_batch_subject`], else one).
pub fn decode_pages(
    subject: &str,
    bytes: &[u8],
) -> Result<Envelope<Vec<crate::notify::Page>>, CodecError> {
    decode_one_or_many(crate::subjects::is_notify_batch(subject), bytes)
}

/// Decodes an INCIDENTS message: the entries it holds, in order (several
/// on [`crate::subjects::INCIDENTS_BATCH`], else one). A message's entries
/// share its stream sequence; their place in the log is (sequence, index).
pub fn decode_entries(
    subject: &str,
    bytes: &[u8],
) -> Result<Envelope<Vec<crate::incident::LogEntry>>, CodecError> {
    decode_one_or_many(crate::subjects::is_incidents_batch(subject), bytes)
}

/// An `Envelope<Vec<T>>` if `many`, else an `Envelope<T>` as one of one.
fn decode_one_or_many<T: DeserializeOwned>(
    many: bool,
    bytes: &[u8],
) -> Result<Envelope<Vec<T>>, CodecError> {
    if many {
        return decode_envelope(bytes);
    }
    let one = decode_envelope::<T>(bytes)?;
    Ok(Envelope {
        schema: one.schema,
        source: one.source,
        received_at: one.received_at,
        traceparent: one.traceparent,
        body: vec![one.body],
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Alert, AlertStatus, Fingerprint, Labels, Origin, SourceKind};

    fn sample() -> Envelope<Alert> {
        let labels: Labels = [
            ("alertname", "HighLatency"),
            ("service", "api"),
            ("severity", "critical"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        Envelope {
            schema: 1,
            source: "prod-am".into(),
            received_at: "2025-01-15T10:00:01Z".parse().unwrap(),
            traceparent: Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into()),
            body: Alert {
                fingerprint: Fingerprint::from_labels(&labels),
                status: AlertStatus::Firing,
                labels,
                annotations: [("summary".to_string(), "p99 > 2s".to_string())].into(),
                starts_at: "2025-01-15T10:00:00.123456789Z".parse().unwrap(),
                ends_at: None,
                generator_url: Some("http://prometheus:9090/graph".into()),
                dedup_key: None,
                origin: Origin {
                    kind: Some(SourceKind::Alertmanager),
                    receiver: Some("incident-engine".into()),
                    group_key: Some("{}:{alertname=\"HighLatency\"}".into()),
                    group_labels: [("alertname".to_string(), "HighLatency".to_string())].into(),
                    external_url: Some("http://alertmanager:9093".into()),
                    event_digest: None,
                },
            },
        }
    }

    /// The pinned encoding of [`sample`]. If this fails you changed the wire
    /// format: make the change compatible (new fields with `#[serde(default)]`)
    /// and re-pin, or bump SCHEMA_VERSION.
    const GOLDEN: &str = include_str!("../tests/golden/alert_envelope.hex");

    fn golden_bytes() -> Vec<u8> {
        let hex: String = GOLDEN.split_whitespace().collect();
        hex::decode(hex).expect("golden file is hex")
    }

    #[test]
    fn the_encoded_length_is_the_length_of_what_encode_writes() {
        let env = sample();
        assert_eq!(encoded_len(&env).unwrap(), encode(&env).unwrap().len());
        let many = vec![env.body.clone(); 40];
        assert_eq!(encoded_len(&many).unwrap(), encode(&many).unwrap().len());
    }

    #[test]
    fn an_incidents_batch_gives_its_entries_in_order_and_another_message_one() {
        use crate::incident::{Cause, EventKind, IncidentEvent, IncidentSummary, LogEntry};
        let at: jiff::Timestamp = "2025-01-15T10:00:00Z".parse().unwrap();
        let entry = |n: u64, kind: EventKind| {
            LogEntry::Incident(IncidentEvent {
                kind,
                at,
                actor: None,
                cause: Cause::Command {
                    id: format!("c{n}"),
                },
                incident: IncidentSummary::new(uuid::Uuid::from_u128(n.into()), n, "k", "t", at),
            })
        };
        let paged = entry(
            1,
            EventKind::Paged {
                level: 0,
                repeat: 0,
                pages: vec!["alice".into()],
                reason: String::new(),
                fired: None,
            },
        );
        assert!(paged.is_packed());
        let acked = entry(2, EventKind::Acknowledged);
        assert!(!acked.is_packed());
        // An alert change is packed unless it leaves its incident
        // suppressed, which a notifier reading the incident's own subjects
        // must see before it pages.
        let resolved = EventKind::AlertResolved {
            fingerprint: crate::Fingerprint::from_labels(&crate::Labels::new()),
            ends_at: at,
            more: Vec::new(),
        };
        let mut change = entry(3, resolved);
        assert!(change.is_packed());
        if let LogEntry::Incident(e) = &mut change {
            e.incident.suppressed = Some("silenced by s1".into());
        }
        assert!(
            !change.is_packed(),
            "a suppressing change has its own message"
        );
        let both = vec![paged.clone(), acked.clone()];
        let bytes = encode(&Envelope::new("incidents", at, both.clone())).unwrap();
        let got = decode_entries(crate::subjects::INCIDENTS_BATCH, &bytes).unwrap();
        assert_eq!(got.body, both);
        let one = encode(&Envelope::new("incidents", at, acked.clone())).unwrap();
        let got = decode_entries(&acked.subject(), &one).unwrap();
        assert_eq!(got.body, vec![acked]);
        // A batch read as one entry, or one entry as a batch, is refused.
        assert!(decode_entries("tocsin.incidents.inc.x.opened", &bytes).is_err());
        assert!(decode_entries(crate::subjects::INCIDENTS_BATCH, &one).is_err());
    }

    #[test]
    fn golden_bytes_pin_the_encoding() {
        let encoded = encode(&sample()).unwrap();
        assert_eq!(
            hex::encode(&encoded),
            hex::encode(golden_bytes()),
            "the MessagePack encoding of Envelope<Alert> changed"
        );
    }

    #[test]
    fn golden_bytes_decode() {
        let decoded: Envelope<Alert> = decode_envelope(&golden_bytes()).unwrap();
        assert_eq!(decoded, sample());
    }

    #[test]
    fn encoding_is_a_map_with_field_names() {
        let encoded = encode(&sample()).unwrap();
        // fixmap marker, then the first key "schema" as a fixstr.
        assert_eq!(encoded[0] & 0xf0, 0x80);
        assert_eq!(&encoded[1..8], b"\xa6schema");
    }

    #[test]
    fn unknown_fields_are_ignored_and_missing_optional_fields_default() {
        #[derive(serde::Serialize)]
        struct Future<'a> {
            schema: u32,
            source: &'a str,
            received_at: &'a str,
            body: FutureAlert<'a>,
            added_in_v1_5: bool,
        }
        #[derive(serde::Serialize)]
        struct FutureAlert<'a> {
            fingerprint: &'a str,
            status: &'a str,
            labels: Labels,
            starts_at: &'a str,
            origin: Origin,
            brand_new: u8,
        }
        let bytes = encode(&Future {
            schema: 1,
            source: "x",
            received_at: "2025-01-15T10:00:01Z",
            body: FutureAlert {
                fingerprint: "cbf29ce484222325",
                status: "resolved",
                labels: Labels::new(),
                starts_at: "2025-01-15T10:00:00Z",
                origin: Origin::default(),
                brand_new: 7,
            },
            added_in_v1_5: true,
        })
        .unwrap();
        let env: Envelope<Alert> = decode_envelope(&bytes).unwrap();
        assert_eq!(env.body.status, AlertStatus::Resolved);
        assert!(env.body.annotations.is_empty());
        assert_eq!(env.traceparent, None);
    }

    #[test]
    fn newer_schema_is_refused_with_a_reason() {
        let mut env = sample();
        env.schema = SCHEMA_VERSION + 1;
        let err = decode_envelope::<Alert>(&encode(&env).unwrap()).unwrap_err();
        assert!(err.to_string().contains("upgrade this service"), "{err}");
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        for bytes in [&b""[..], b"\xc1", b"{\"json\":1}", b"\x81\xa6schema\xc0"] {
            assert!(decode_envelope::<Alert>(bytes).is_err());
        }
    }

    #[test]
    fn an_alerts_message_holds_one_alert_or_a_requests_several() {
        use crate::subjects::{alert_batch_subject, alert_subject};
        let one = sample();
        let subject = alert_subject(SourceKind::Alertmanager, &one.body.fingerprint);
        let decoded = decode_alerts(&subject, &encode(&one).unwrap()).unwrap();
        assert_eq!(decoded.len(), 1);
        assert_eq!(decoded[0].body, vec![one.body.clone()]);
        assert_eq!(decoded[0].source, one.source);

        let mut second = one.body.clone();
        second.status = AlertStatus::Resolved;
        let batch = Envelope::new(
            "am",
            one.received_at,
            vec![one.body.clone(), second.clone()],
        );
        let bytes = encode(&batch).unwrap();
        let subject = alert_batch_subject(SourceKind::Alertmanager);
        let decoded = decode_alerts(&subject, &bytes).unwrap();
        assert_eq!(decoded.len(), 1);
        assert_eq!(decoded[0].body, vec![one.body.clone(), second.clone()]);
        // A batch on an alert's own subject (or the reverse) is refused, not
        // read as something else.
        let single = alert_subject(SourceKind::Alertmanager, &one.body.fingerprint);
        assert!(decode_alerts(&single, &bytes).is_err());
        assert!(decode_alerts(&subject, &encode(&one).unwrap()).is_err());
    }

    #[test]
    fn a_pack_holds_several_requests_each_with_its_source_time_and_trace() {
        use crate::subjects::{alert_batch_subject, alert_pack_subject};
        let one = sample();
        let mut second = one.body.clone();
        second.status = AlertStatus::Resolved;
        let first = Envelope::new("am", one.received_at, vec![one.body.clone()]).with_traceparent(
            Some("00-11111111111111111111111111111111-1111111111111111-01".into()),
        );
        let later = Envelope::new(
            "other",
            "2025-01-15T10:00:02Z".parse().unwrap(),
            vec![one.body.clone(), second],
        );
        let pack = vec![first.clone(), later.clone()];
        let bytes = encode(&pack).unwrap();
        let subject = alert_pack_subject(SourceKind::Alertmanager);
        let decoded = decode_alerts(&subject, &bytes).unwrap();
        assert_eq!(decoded.len(), 2);
        assert_eq!(decoded[0].body, first.body);
        assert_eq!(decoded[0].traceparent, first.traceparent);
        assert_eq!(decoded[1].source, "other");
        assert_eq!(decoded[1].received_at, later.received_at);
        assert_eq!(decoded[1].body, later.body);
        // Neither read as a batch of one request, nor the reverse.
        let batch = alert_batch_subject(SourceKind::Alertmanager);
        assert!(decode_alerts(&batch, &bytes).is_err());
        assert!(decode_alerts(&subject, &encode(&first).unwrap()).is_err());
        // An empty pack, or one with a newer schema inside, is refused.
        let empty: Vec<Envelope<Vec<Alert>>> = Vec::new();
        let err = decode_alerts(&subject, &encode(&empty).unwrap()).unwrap_err();
        assert!(err.to_string().contains("no alerts"), "{err}");
        let mut newer = later;
        newer.schema = SCHEMA_VERSION + 1;
        let err = decode_alerts(&subject, &encode(&vec![first, newer]).unwrap()).unwrap_err();
        assert!(err.to_string().contains("upgrade this service"), "{err}");
    }
}
