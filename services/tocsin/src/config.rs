//! The whole config file: runtime sections plus one section per service.

use std::path::Path;

use serde::Deserialize;
use tocsin_escalation::EscalationConfig;
use tocsin_incidents::IncidentsConfig;
use tocsin_ingest::IngestConfig;
use tocsin_runtime::{
    config::{self, ConfigError},
    nats::NatsConfig,
    streams::JetStreamConfig,
};

/// `config/tocsin.yaml`. Unknown keys are errors.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// How to reach NATS. Default `nats://127.0.0.1:4222`, no auth.
    #[serde(default)]
    pub nats: NatsConfig,
    /// Stream settings (replicas, retention, duplicate window).
    #[serde(default)]
    pub jetstream: JetStreamConfig,
    /// The ingest service; required to run it.
    #[serde(default)]
    pub ingest: Option<IngestConfig>,
    /// The incidents service; every key has a default.
    #[serde(default)]
    pub incidents: IncidentsConfig,
    /// The escalation service: routes, policies, schedules, users.
    #[serde(default)]
    pub escalation: EscalationConfig,
}

/// The part of the config operator commands (`tocsin ack`, `list` ...)
/// need: how to reach NATS. Other sections are not read, so their secrets
/// need not be set on an operator's machine.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct OperatorConfig {
    #[serde(default)]
    pub nats: NatsConfig,
    #[serde(default)]
    pub jetstream: JetStreamConfig,
}

impl OperatorConfig {
    pub fn load(path: &Path) -> Result<OperatorConfig, ConfigError> {
        config::load(path)
    }
}

/// Which services a process runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Service {
    Ingest,
    Incidents,
    Escalation,
}

impl Service {
    pub const ALL: [Service; 3] = [Service::Ingest, Service::Incidents, Service::Escalation];

    pub fn name(self) -> &'static str {
        match self {
            Service::Ingest => "ingest",
            Service::Incidents => "incidents",
            Service::Escalation => "escalation",
        }
    }
}

impl Config {
    /// Loads and validates `path` for running `services`.
    pub fn load(path: &Path, services: &[Service]) -> Result<Config, ConfigError> {
        let cfg: Config = config::load(path)?;
        for s in services {
            match s {
                Service::Ingest if cfg.ingest.is_none() => {
                    return Err(ConfigError::whole_file(
                        path,
                        "no `ingest:` section; add one with at least one token \
                         (see config/tocsin.yaml in the Tocsin repository)",
                    ))
                }
                Service::Ingest => {}
                Service::Incidents => {
                    tocsin_incidents::compile(&cfg.incidents)
                        .map_err(|e| ConfigError::whole_file(path, e.to_string()))?;
                }
                Service::Escalation => {
                    tocsin_escalation::check(&cfg.escalation)
                        .map_err(|e| ConfigError::whole_file(path, e.to_string()))?;
                }
            }
        }
        Ok(cfg)
    }
}
