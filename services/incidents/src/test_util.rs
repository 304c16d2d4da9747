//! Helpers the unit tests share.

use jiff::Timestamp;
use tocsin_proto::alert::Labels;

/// Labels from name/value pairs.
pub(crate) fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// A timestamp from its RFC 3339 text.
pub(crate) fn ts(s: &str) -> Timestamp {
    s.parse().unwrap()
}
