//! Queries served by the incidents service over NATS request/reply.

use jiff::Timestamp;
use serde::{Deserialize, Serialize};

use crate::{
    command::IncidentRef,
    incident::{AlertInfo, IncidentEvent, IncidentStatus, IncidentSummary, Severity},
    silence::{Matcher, Silence},
};

/// `tocsin.query.incidents.get`
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GetIncident {
    pub incident: IncidentRef,
    /// Include the timeline (read from the INCIDENTS stream). Default true.
    #[serde(default = "yes")]
    pub timeline: bool,
}

fn yes() -> bool {
    true
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IncidentDetail {
    pub incident: IncidentSummary,
    pub alerts: Vec<AlertInfo>,
    #[serde(default)]
    pub timeline: Vec<IncidentEvent>,
}

/// `tocsin.query.incidents.list`; every filter is optional.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListIncidents {
    #[serde(default)]
    pub status: Vec<IncidentStatus>,
    /// At least this severe.
    #[serde(default)]
    pub min_severity: Option<Severity>,
    /// Every matcher must match the incident's common labels.
    #[serde(default)]
    pub matchers: Vec<Matcher>,
    /// Opened at or after.
    #[serde(default)]
    pub since: Option<Timestamp>,
    /// Most recent first; default 100, at most 1000.
    #[serde(default)]
    pub limit: Option<usize>,
}

/// An answer to any query.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum QueryReply {
    Incident(Box<IncidentDetail>),
    Incidents { incidents: Vec<IncidentSummary> },
    Silences { silences: Vec<Silence> },
    Error { reason: String },
}
