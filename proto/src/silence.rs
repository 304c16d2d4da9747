//! Silences and maintenance windows: label matchers plus a time range,
//! optionally recurring (weekdays + time of day in an IANA timezone).

use jiff::Timestamp;
use serde::{Deserialize, Serialize};

/// How a matcher compares a label value, with Alertmanager's operators.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum MatchOp {
    #[serde(rename = "=")]
    Eq,
    #[serde(rename = "!=")]
    NotEq,
    /// Regex, anchored at both ends (`^(?:…)$`) as in Alertmanager.
    #[serde(rename = "=~")]
    Re,
    #[serde(rename = "!~")]
    NotRe,
}

impl MatchOp {
    pub fn as_str(self) -> &'static str {
        match self {
            MatchOp::Eq => "=",
            MatchOp::NotEq => "!=",
            MatchOp::Re => "=~",
            MatchOp::NotRe => "!~",
        }
    }
}

/// `name op "value"`. A missing label matches as the empty string.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Matcher {
    pub name: String,
    pub op: MatchOp,
    pub value: String,
}

/// A weekly recurrence: active on `weekdays` from `start` to `end` local
/// time in `timezone`. `end` <= `start` means the window runs past midnight.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Recurrence {
    /// `mon`, `tue`, `wed`, `thu`, `fri`, `sat`, `sun`; empty means every day.
    #[serde(default)]
    pub weekdays: Vec<String>,
    /// `HH:MM` local time.
    pub start: String,
    /// `HH:MM` local time.
    pub end: String,
    /// IANA timezone, e.g. `Europe/Berlin`.
    pub timezone: String,
}

/// A silence or maintenance window.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Silence {
    pub id: String,
    pub matchers: Vec<Matcher>,
    pub starts_at: Timestamp,
    pub ends_at: Timestamp,
    #[serde(default)]
    pub created_by: String,
    #[serde(default)]
    pub comment: String,
    /// When set, the silence is active only inside the recurring window
    /// (and still only between `starts_at` and `ends_at`).
    #[serde(default)]
    pub recurrence: Option<Recurrence>,
}
