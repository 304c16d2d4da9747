//! `incidents:` section of the config file.

use std::{collections::BTreeMap, path::PathBuf};

use serde::Deserialize;
use tocsin_proto::{
    incident::Severity,
    silence::{Matcher, Recurrence},
};
use tocsin_runtime::config::{ConfigPath, HumanDuration};

use crate::inhibit::InhibitRuleConfig;

/// Configuration of the incidents service. Every field has a default.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IncidentsConfig {
    /// Where the sled projection lives. Default `.tocsin/data/incidents`.
    /// Losing it is harmless: it is rebuilt from the INCIDENTS stream.
    pub data_dir: Option<ConfigPath>,
    /// Labels whose values make the dedup key. Default: `alertname` plus the
    /// labels Alertmanager grouped the notification by; for other senders,
    /// all of the alert's labels.
    pub group_by: Vec<String>,
    /// How long a new incident is held before escalation may page, to
    /// collect sibling alerts. Default 0s.
    pub group_wait: HumanDuration,
    /// An alert firing again within this time after its incident resolved
    /// reopens it instead of opening a new one. Default 1h.
    pub reopen_window: HumanDuration,
    /// Resolve an incident when every attached alert has resolved. Default true.
    pub auto_resolve: bool,
    /// Labels read for the severity, first found wins. Default `[severity, priority]`.
    pub severity_labels: Vec<String>,
    /// Extra label value -> severity mappings (case-insensitive), added to
    /// the built-in ones (critical/P0/SEV1 ..., see `severity::DEFAULTS`).
    pub severity_map: BTreeMap<String, Severity>,
    /// Severity when no label says. Default `medium`.
    pub default_severity: Severity,
    /// Alertmanager-style inhibition rules.
    pub inhibit_rules: Vec<InhibitRuleConfig>,
    /// Recurring maintenance windows (silences defined in config).
    pub maintenance_windows: Vec<MaintenanceWindow>,
    /// Dead-man's switches: a ping is expected at least every interval.
    pub heartbeats: Vec<HeartbeatConfig>,
    /// How long a command may wait for redelivery if the service dies while
    /// handling it. Default 30s.
    pub command_ack_wait: HumanDuration,
    /// Largest encoded INCIDENTS entry written, in bytes. An alert is cut
    /// to a quarter of it before it is decided, and an entry still larger
    /// has its longest texts cut (with a `…[truncated N bytes]` marker);
    /// one that cannot be cut enough is dead-lettered. Kept well under
    /// NATS's `max_payload` (1 MiB by default). Default 262144 (256 KiB).
    pub max_entry_bytes: usize,
    /// Annotations an alert keeps when it must be cut; the rest are dropped
    /// (their count is noted). Default 64.
    pub max_annotations: usize,
    /// Attempts at an input that fails for a reason retrying cannot fix
    /// (JetStream refuses the entry, it cannot be made small enough) before
    /// it goes to the DEADLETTER stream and the next input is taken.
    /// Failures that can pass (NATS down, a full stream) are retried
    /// without limit. Default 5.
    pub max_attempts: u32,
    /// `/readyz` reports `incidents: cannot make progress: <reason>` once
    /// one input has been failing for this long. Default 30s.
    pub stalled_after: HumanDuration,
    /// The lease that makes one incidents instance active and the others
    /// standbys (see `tocsin_runtime::lease`): a standby takes over within
    /// about this long after the active one dies. 1s to 10m. Default 5s.
    pub lease_ttl: HumanDuration,
    /// Incidents whose whole state (alerts, labels) is held in memory; the
    /// least recently changed of the rest wait in the data dir's store,
    /// open ones too, and come back when an alert or command touches them
    /// (a read of the local store). Every incident's number and dedup key,
    /// and the firing alerts that can inhibit others, stay in memory
    /// whatever this is. Snoozed incidents always stay. Bounds the
    /// service's memory in an alert storm that opens many incidents. At
    /// least 1. Default 10000.
    pub max_in_memory: usize,
    /// Incidents out of memory one list query may read from the store
    /// (`tocsin list`, the chat-ops API and commands). A list whose page is
    /// not full by then answers with what it found and where it stopped
    /// (`next_before`; the API's `next_cursor`), and the caller asks again
    /// from there: a filter that matches few of many stored incidents costs
    /// a bounded read per answer, not one read of every incident. At least
    /// 1. Default 1000.
    pub list_max_reads: usize,
    /// Silences that may exist at once (pending, active, or ended and not
    /// yet collected); creating one more is refused with the reason, as
    /// Alertmanager's `--silences.max-silences` does. Every alert is checked
    /// against every silence. Maintenance windows from the config are not
    /// counted. At least 1. Default 1000.
    pub max_silences: usize,
}

/// Bounds of `max_entry_bytes`: room for an incident with its alert, and
/// well under the 1 MiB NATS `max_payload` default.
pub const MAX_ENTRY_BYTES_RANGE: std::ops::RangeInclusive<usize> = 16 * 1024..=768 * 1024;

impl Default for IncidentsConfig {
    fn default() -> Self {
        IncidentsConfig {
            data_dir: None,
            group_by: Vec::new(),
            group_wait: HumanDuration::secs(0),
            reopen_window: HumanDuration::secs(3600),
            auto_resolve: true,
            severity_labels: vec!["severity".into(), "priority".into()],
            severity_map: BTreeMap::new(),
            default_severity: Severity::Medium,
            inhibit_rules: Vec::new(),
            maintenance_windows: Vec::new(),
            heartbeats: Vec::new(),
            command_ack_wait: HumanDuration::secs(30),
            max_entry_bytes: 256 * 1024,
            max_annotations: 64,
            max_attempts: 5,
            stalled_after: HumanDuration::secs(30),
            lease_ttl: HumanDuration::secs(5),
            max_in_memory: 10_000,
            list_max_reads: 1000,
            max_silences: 1000,
        }
    }
}

impl IncidentsConfig {
    pub fn data_dir(&self) -> PathBuf {
        self.data_dir
            .as_ref()
            .map(|p| p.0.clone())
            .unwrap_or_else(|| PathBuf::from(".tocsin/data/incidents"))
    }
}

/// A recurring maintenance window: alerts matching are recorded but page nobody.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MaintenanceWindow {
    pub name: String,
    #[serde(deserialize_with = "crate::matchers::deserialize_matchers")]
    pub matchers: Vec<Matcher>,
    pub recurrence: Recurrence,
    #[serde(default)]
    pub comment: String,
}

/// A dead-man's switch.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeartbeatConfig {
    /// Pinged at `POST /api/v1/heartbeat/<name>` on ingest.
    pub name: String,
    /// A ping is expected at least this often.
    pub interval: HumanDuration,
    /// Labels of the incident opened when a ping is missed (alertname
    /// `HeartbeatMissed` and `heartbeat: <name>` are added).
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Summary of that incident.
    #[serde(default)]
    pub summary: Option<String>,
}
