//! Telemetry: each event logs and counts together, so logs and metrics agree.

use std::time::Duration;

use prometheus_client::metrics::{
    counter::Counter,
    family::Family,
    histogram::{exponential_buckets, Histogram},
};
use tocsin_runtime::admin::{labels, Labels, Metrics};

/// The ingest service's metrics.
#[derive(Clone)]
pub struct IngestMetrics {
    requests: Family<Labels, Counter>,
    alerts: Family<Labels, Counter>,
    truncated: Counter,
    publish_seconds: Histogram,
}

impl IngestMetrics {
    pub fn register(metrics: &Metrics) -> Self {
        let m = IngestMetrics {
            requests: Family::default(),
            alerts: Family::default(),
            truncated: Counter::default(),
            publish_seconds: Histogram::new(exponential_buckets(0.0005, 2.0, 16)),
        };
        metrics.register(
            "tocsin_ingest_requests",
            "Ingest requests by endpoint and outcome (accepted, or the rejection code)",
            m.requests.clone(),
        );
        metrics.register(
            "tocsin_ingest_alerts",
            "Alerts stored on the ALERTS stream by endpoint; outcome=duplicate when JetStream had it already",
            m.alerts.clone(),
        );
        metrics.register(
            "tocsin_ingest_truncated_alerts",
            "Alerts Alertmanager left out of webhooks (truncatedAlerts; raise max_alerts)",
            m.truncated.clone(),
        );
        metrics.register(
            "tocsin_ingest_publish_seconds",
            "Time from request parsed to every alert acknowledged by JetStream",
            m.publish_seconds.clone(),
        );
        m
    }
}

/// Something worth logging and counting.
pub(crate) enum IngestEvent<'a> {
    Accepted {
        endpoint: &'a str,
        source: &'a str,
        stored: usize,
        duplicates: usize,
        elapsed: Duration,
    },
    Rejected {
        endpoint: &'a str,
        code: &'a str,
        status: u16,
        reason: &'a str,
    },
    Truncated {
        endpoint: &'a str,
        source: &'a str,
        count: u64,
    },
}

impl IngestEvent<'_> {
    pub(crate) fn emit(&self, m: &IngestMetrics) {
        match *self {
            IngestEvent::Accepted {
                endpoint,
                source,
                stored,
                duplicates,
                elapsed,
            } => {
                m.requests
                    .get_or_create(&labels(&[("endpoint", endpoint), ("outcome", "accepted")]))
                    .inc();
                m.alerts
                    .get_or_create(&labels(&[("endpoint", endpoint), ("outcome", "stored")]))
                    .inc_by(stored as u64);
                m.alerts
                    .get_or_create(&labels(&[("endpoint", endpoint), ("outcome", "duplicate")]))
                    .inc_by(duplicates as u64);
                m.publish_seconds.observe(elapsed.as_secs_f64());
                tracing::debug!(
                    endpoint,
                    source,
                    stored,
                    duplicates,
                    ?elapsed,
                    "alerts stored"
                );
            }
            IngestEvent::Rejected {
                endpoint,
                code,
                status,
                reason,
            } => {
                m.requests
                    .get_or_create(&labels(&[("endpoint", endpoint), ("outcome", code)]))
                    .inc();
                if status >= 500 {
                    tracing::warn!(endpoint, status, code, reason, "request not accepted");
                } else {
                    tracing::info!(endpoint, status, code, reason, "request rejected");
                }
            }
            IngestEvent::Truncated {
                endpoint,
                source,
                count,
            } => {
                m.truncated.inc_by(count);
                tracing::warn!(
                    endpoint,
                    source,
                    count,
                    "Alertmanager truncated this webhook; raise max_alerts in its webhook_config"
                );
            }
        }
    }
}
