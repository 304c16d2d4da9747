//! The normalized alert.
//!
//! Every ingest endpoint (Alertmanager webhook, PagerDuty Events v2, generic
//! JSON, heartbeats) produces [`Alert`]s. Everything a sender says about the
//! problem is carried as labels and annotations, the way Alertmanager users
//! already think about alerts; protocol details that matter later (receiver,
//! group key, dedup key) are kept in [`Origin`] and [`Alert::dedup_key`].

use jiff::Timestamp;
use serde::{Deserialize, Serialize};

use crate::fingerprint::Fingerprint;

pub use crate::labels::Labels;

/// One alert event, as published on the ALERTS stream.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Alert {
    /// Alertmanager's fingerprint when the sender gave one, else computed
    /// from `labels` with Alertmanager's algorithm.
    pub fingerprint: Fingerprint,
    pub status: AlertStatus,
    pub labels: Labels,
    #[serde(default)]
    pub annotations: Labels,
    pub starts_at: Timestamp,
    /// `None` while firing (Alertmanager sends Go's zero time, which ingest maps to `None`).
    #[serde(default)]
    pub ends_at: Option<Timestamp>,
    #[serde(default)]
    pub generator_url: Option<String>,
    /// A sender-chosen key that names the incident directly (PagerDuty's
    /// `dedup_key`, or the generic format's `dedup_key`). When set, the
    /// incidents service uses it instead of grouping labels.
    #[serde(default)]
    pub dedup_key: Option<String>,
    pub origin: Origin,
}

/// What the sender says about the alert.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AlertStatus {
    Firing,
    Resolved,
    /// Only from PagerDuty-compatible `acknowledge` events: the sender
    /// acknowledges the incident carrying this alert's dedup key.
    Acknowledged,
}

impl AlertStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            AlertStatus::Firing => "firing",
            AlertStatus::Resolved => "resolved",
            AlertStatus::Acknowledged => "acknowledged",
        }
    }
}

/// Which protocol an alert arrived by.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SourceKind {
    Alertmanager,
    Pagerduty,
    Generic,
    Heartbeat,
}

impl SourceKind {
    pub fn as_str(self) -> &'static str {
        match self {
            SourceKind::Alertmanager => "alertmanager",
            SourceKind::Pagerduty => "pagerduty",
            SourceKind::Generic => "generic",
            SourceKind::Heartbeat => "heartbeat",
        }
    }
}

/// Protocol-level facts about where an alert came from.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Origin {
    pub kind: Option<SourceKind>,
    /// Alertmanager receiver name (as sent: regexp-quoted by Alertmanager).
    #[serde(default)]
    pub receiver: Option<String>,
    /// Alertmanager's opaque group key.
    #[serde(default)]
    pub group_key: Option<String>,
    /// The labels Alertmanager grouped this notification by.
    #[serde(default)]
    pub group_labels: Labels,
    /// Link back to the sender (Alertmanager's externalURL, PagerDuty `client_url`).
    #[serde(default)]
    pub external_url: Option<String>,
    /// For records named by their content (PagerDuty change events): a
    /// digest of the event. It replaces the start time in the message id,
    /// so a retried event keeps the same id. Not for alerts that can fire
    /// again: the same body after a resolve would be dropped as a retry.
    #[serde(default)]
    pub event_digest: Option<String>,
}

impl Alert {
    /// The `Nats-Msg-Id` of this alert event: fingerprint + status + startsAt,
    /// or fingerprint + status + event digest for senders whose events carry
    /// no start time. A webhook retried by its sender maps to the same id and
    /// is dropped by JetStream's duplicate window.
    pub fn msg_id(&self) -> String {
        match &self.origin.event_digest {
            Some(d) => format!("alert:{}:{}:d{}", self.fingerprint, self.status.as_str(), d),
            None => format!(
                "alert:{}:{}:{}",
                self.fingerprint,
                self.status.as_str(),
                self.starts_at.as_nanosecond()
            ),
        }
    }

    /// `labels["alertname"]`, if any.
    pub fn alertname(&self) -> Option<&str> {
        self.labels.get("alertname").map(String::as_str)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn msg_id_depends_on_meaning_only() {
        let labels: Labels = [("alertname".to_string(), "X".to_string())].into();
        let mut a = Alert {
            fingerprint: Fingerprint::from_labels(&labels),
            status: AlertStatus::Firing,
            labels,
            annotations: Labels::new(),
            starts_at: "2025-01-15T10:00:00.123456789Z".parse().unwrap(),
            ends_at: None,
            generator_url: None,
            dedup_key: None,
            origin: Origin::default(),
        };
        let firing = a.msg_id();
        a.annotations.insert("summary".into(), "changed".into());
        assert_eq!(a.msg_id(), firing, "annotations do not change the id");
        a.status = AlertStatus::Resolved;
        assert_ne!(a.msg_id(), firing);
        assert!(firing.ends_with(":firing:1736935200123456789"), "{firing}");
    }
}
