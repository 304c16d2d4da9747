//! Telemetry: each event logs and counts together (as every service's
//! `events.rs` does), so a log line and its metric cannot drift apart.

use prometheus_client::metrics::{counter::Counter, family::Family};
use tocsin_runtime::admin::{labels, Labels, Metrics};

/// The remediation service's metrics (labels: outcome only; never ids).
#[derive(Clone, Default)]
pub struct RemediationMetrics {
    runs: Family<Labels, Counter>,
    steps: Family<Labels, Counter>,
}

impl RemediationMetrics {
    pub fn register(m: &Metrics) -> Self {
        let s = RemediationMetrics::default();
        m.register(
            "tocsin_remediation_runs",
            "Runbook runs ended, by outcome (succeeded, failed, skipped, refused)",
            s.runs.clone(),
        );
        m.register(
            "tocsin_remediation_steps",
            "Runbook steps ended, by outcome (succeeded, failed, skipped, dry_run)",
            s.steps.clone(),
        );
        s
    }
}

/// How a run ended.
#[derive(Debug, Clone, Copy)]
pub(crate) enum RunEnd {
    Succeeded,
    Failed,
    /// Not started: a guardrail, a switch or a resolved incident.
    Skipped,
    /// Denied, or no decision before the approval timeout.
    Refused,
}

impl RunEnd {
    fn as_str(self) -> &'static str {
        match self {
            RunEnd::Succeeded => "succeeded",
            RunEnd::Failed => "failed",
            RunEnd::Skipped => "skipped",
            RunEnd::Refused => "refused",
        }
    }
}

pub(crate) enum RemediationEvent<'a> {
    /// A run ended; `reason` says why when it did not succeed.
    RunEnded {
        runbook: &'a str,
        incident: u64,
        end: RunEnd,
        reason: &'a str,
    },
    /// A step ended with `outcome` (succeeded, failed, skipped, dry_run).
    StepEnded { outcome: &'a str },
}

impl RemediationEvent<'_> {
    pub(crate) fn emit(self, m: &RemediationMetrics) {
        match self {
            RemediationEvent::RunEnded {
                runbook,
                incident,
                end,
                reason,
            } => {
                m.runs
                    .get_or_create(&labels(&[("outcome", end.as_str())]))
                    .inc();
                match end {
                    RunEnd::Succeeded => tracing::info!(runbook, incident, "run succeeded"),
                    RunEnd::Skipped => tracing::info!(runbook, incident, reason, "run skipped"),
                    RunEnd::Failed => tracing::warn!(runbook, incident, reason, "run failed"),
                    RunEnd::Refused => tracing::warn!(runbook, incident, reason, "run refused"),
                }
            }
            RemediationEvent::StepEnded { outcome } => {
                m.steps
                    .get_or_create(&labels(&[("outcome", outcome)]))
                    .inc();
            }
        }
    }
}
