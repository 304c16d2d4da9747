//! Helpers the unit tests share.

use tocsin_proto::alert::Labels;

/// Labels from name/value pairs.
pub(crate) fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}
