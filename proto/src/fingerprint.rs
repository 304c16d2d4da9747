//! Alertmanager-compatible alert fingerprints.
//!
//! prometheus/common's `labelSetToFingerprint`: FNV-1a 64-bit over the label
//! names sorted bytewise, hashing `name 0xFF value 0xFF` for each, printed as
//! 16 lowercase hex digits. Only labels count, never annotations.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::alert::Labels;

const FNV_OFFSET: u64 = 14695981039346656037;
const FNV_PRIME: u64 = 1099511628211;
const SEPARATOR: u8 = 0xFF;

/// 16 lowercase hex digits identifying an alert by its label set.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Fingerprint(String);

/// A string that is not 16 lowercase hex digits.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("fingerprint {0:?} is not 16 lowercase hex digits (Alertmanager's format)")]
pub struct InvalidFingerprint(pub String);

impl Fingerprint {
    /// The fingerprint Alertmanager computes for this label set.
    pub fn from_labels(labels: &Labels) -> Self {
        // BTreeMap iterates in bytewise key order, which is what Go's
        // sort.Strings gives for the label names.
        let mut h = FNV_OFFSET;
        let mut feed = |bytes: &[u8]| {
            for &b in bytes {
                h ^= u64::from(b);
                h = h.wrapping_mul(FNV_PRIME);
            }
        };
        for (name, value) in labels {
            feed(name.as_bytes());
            feed(&[SEPARATOR]);
            feed(value.as_bytes());
            feed(&[SEPARATOR]);
        }
        Fingerprint(format!("{h:016x}"))
    }

    /// Accepts exactly 16 lowercase hex digits.
    pub fn parse(s: &str) -> Result<Self, InvalidFingerprint> {
        if s.len() == 16 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            Ok(Fingerprint(s.to_owned()))
        } else {
            Err(InvalidFingerprint(s.to_owned()))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl TryFrom<String> for Fingerprint {
    type Error = InvalidFingerprint;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        Fingerprint::parse(&s)
    }
}

impl From<Fingerprint> for String {
    fn from(f: Fingerprint) -> String {
        f.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(pairs: &[(&str, &str)], expected: &str) {
        let labels: Labels = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        assert_eq!(
            Fingerprint::from_labels(&labels).as_str(),
            expected,
            "{pairs:?}"
        );
    }

    #[test]
    fn alertmanager_test_vectors() {
        check(&[], "cbf29ce484222325");
        check(
            &[("name", "garland, briggs"), ("fear", "love is not enough")],
            "507a62d79ee76c9a",
        );
        check(
            &[
                ("alertname", "HighLatency"),
                ("service", "api"),
                ("severity", "critical"),
            ],
            "6a4f37c34a2d1e4b",
        );
        assert_eq!(
            u64::from_str_radix("507a62d79ee76c9a", 16).unwrap(),
            5799056148416392346
        );
    }

    #[test]
    fn parse_accepts_only_alertmanager_form() {
        assert!(Fingerprint::parse("6a4f37c34a2d1e4b").is_ok());
        for bad in [
            "",
            "6A4F37C34A2D1E4B",
            "6a4f37c34a2d1e4",
            "6a4f37c34a2d1e4bb",
            "zz4f37c34a2d1e4b",
        ] {
            assert!(Fingerprint::parse(bad).is_err(), "{bad}");
        }
    }
}
