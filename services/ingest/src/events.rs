//! Telemetry: each event logs and counts together, so logs and metrics agree.

use std::{sync::Arc, time::Duration};

use prometheus_client::metrics::{
    counter::Counter,
    family::Family,
    gauge::Gauge,
    histogram::{exponential_buckets, Histogram},
};
use tocsin_runtime::admin::{labels, Labels, Metrics};

use tocsin_runtime::http_server::{Closed, ConnectionEvents};
use tocsin_runtime::telemetry::RateLimitedWarn;

/// The ingest service's metrics.
#[derive(Clone)]
pub struct IngestMetrics {
    requests: Family<Labels, Counter>,
    alerts: Family<Labels, Counter>,
    truncated: Counter,
    publish_seconds: Histogram,
    pub(crate) connections_open: Gauge,
    connections_evicted: Counter,
    connections_rejected: Counter,
    connections_closed: Family<Labels, Counter>,
    accept_errors: Counter,
    /// The connection-limit and accept-error WARNs are rate-limited: under
    /// a flood they would otherwise be written thousands of times a second.
    limit_warn: Arc<RateLimitedWarn>,
    accept_warn: Arc<RateLimitedWarn>,
}

impl IngestMetrics {
    pub fn register(metrics: &Metrics) -> Self {
        let m = IngestMetrics {
            requests: Family::default(),
            alerts: Family::default(),
            truncated: Counter::default(),
            publish_seconds: Histogram::new(exponential_buckets(0.0005, 2.0, 16)),
            connections_open: Gauge::default(),
            connections_evicted: Counter::default(),
            connections_rejected: Counter::default(),
            connections_closed: Family::default(),
            accept_errors: Counter::default(),
            limit_warn: Arc::default(),
            accept_warn: Arc::default(),
        };
        metrics.register(
            "tocsin_ingest_connections_open",
            "Open HTTP connections to ingest (capped by ingest.max_connections)",
            m.connections_open.clone(),
        );
        metrics.register(
            "tocsin_ingest_connections_evicted",
            "Connections without a request in progress closed to make room under ingest.max_connections",
            m.connections_evicted.clone(),
        );
        metrics.register(
            "tocsin_ingest_connections_rejected",
            "New connections refused (503) at ingest.max_connections with a request in progress on every open one",
            m.connections_rejected.clone(),
        );
        metrics.register(
            "tocsin_ingest_connections_closed",
            "Ingest connections closed, by reason (normal, idle_timeout, header_timeout, evicted, shutdown, error)",
            m.connections_closed.clone(),
        );
        metrics.register(
            "tocsin_ingest_accept_errors",
            "Errors accepting ingest connections (e.g. out of file descriptors)",
            m.accept_errors.clone(),
        );
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
    /// A new connection arrived at `ingest.max_connections`: the oldest
    /// idle one was closed for it (`evicted`) or it was refused.
    ConnectionLimit {
        max: usize,
        evicted: bool,
    },
    ConnectionClosed {
        reason: Closed,
    },
    AcceptFailed {
        error: &'a std::io::Error,
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
            IngestEvent::ConnectionLimit { max, evicted } => {
                if evicted {
                    m.connections_evicted.inc();
                } else {
                    m.connections_rejected.inc();
                }
                if let Some(suppressed) = m.limit_warn.admit() {
                    tracing::warn!(
                        max_connections = max,
                        evicted,
                        similar_since_last_warning = suppressed,
                        "ingest is at ingest.max_connections: closing the oldest idle connection for a new one, \
                         or refusing it when every connection has a request in progress. Many idle or slow \
                         connections suggest a flood; see tocsin_ingest_connections_* in /metrics"
                    );
                }
            }
            IngestEvent::ConnectionClosed { reason } => {
                m.connections_closed
                    .get_or_create(&labels(&[("reason", reason.as_str())]))
                    .inc();
            }
            IngestEvent::AcceptFailed { error } => {
                m.accept_errors.inc();
                if let Some(suppressed) = m.accept_warn.admit() {
                    tracing::warn!(
                        %error,
                        similar_since_last_warning = suppressed,
                        "ingest cannot accept connections; if out of file descriptors, raise the open-file \
                         limit or lower ingest.max_connections"
                    );
                }
            }
        }
    }
}

/// The shared connection layer reports here.
impl ConnectionEvents for IngestMetrics {
    fn accept_failed(&self, error: &std::io::Error) {
        IngestEvent::AcceptFailed { error }.emit(self);
    }
    fn limit_reached(&self, max: usize, evicted: bool) {
        IngestEvent::ConnectionLimit { max, evicted }.emit(self);
    }
    fn opened(&self) {
        self.connections_open.inc();
    }
    fn closed(&self, reason: Closed) {
        self.connections_open.dec();
        IngestEvent::ConnectionClosed { reason }.emit(self);
    }
}
