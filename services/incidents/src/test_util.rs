//! Helpers the unit tests share.

use jiff::Timestamp;

/// A timestamp from its RFC 3339 text.
pub(crate) fn ts(s: &str) -> Timestamp {
    s.parse().unwrap()
}
