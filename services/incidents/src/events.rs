//! Telemetry: each event logs and counts together.

use prometheus_client::metrics::{
    counter::Counter,
    family::Family,
    gauge::Gauge,
    histogram::{exponential_buckets, Histogram},
};
use tocsin_runtime::admin::{labels, Labels, Metrics};

/// Buckets of the time-to-acknowledge and time-to-resolve histograms:
/// 30s, 1m, 2m, 5m, 10m, 15m, 30m, 1h, 2h, 4h, 8h, 24h.
const RESPONSE_BUCKETS: [f64; 12] = [
    30.0, 60.0, 120.0, 300.0, 600.0, 900.0, 1800.0, 3600.0, 7200.0, 14400.0, 28800.0, 86400.0,
];

/// Distinct `service` label values the response-time histograms keep;
/// later ones count as `other`, so an alert's labels cannot grow /metrics.
const MAX_SERVICES: usize = 100;

type ResponseHistograms = Family<Labels, Histogram, fn() -> Histogram>;

fn response_histogram() -> Histogram {
    Histogram::new(RESPONSE_BUCKETS)
}

#[derive(Clone)]
pub struct IncidentsMetrics {
    inputs: Family<Labels, Counter>,
    events: Family<Labels, Counter>,
    dead_letters: Family<Labels, Counter>,
    open: Gauge,
    catch_up: Counter,
    in_memory: Gauge,
    evicted: Counter,
    restored: Counter,
    write_failures: Counter,
    store_out_of_step: Gauge,
    latency: Histogram,
    busy: Family<Labels, Counter<f64, std::sync::atomic::AtomicU64>>,
    time_to_ack: ResponseHistograms,
    time_to_resolve: ResponseHistograms,
    services: std::sync::Arc<std::sync::Mutex<std::collections::BTreeSet<String>>>,
}

impl IncidentsMetrics {
    /// The projection's size: `tocsin_incidents_open` and
    /// `tocsin_incidents_in_memory`, after every change.
    pub(crate) fn sizes(&self, open: u64, in_memory: usize) {
        self.open.set(open as i64);
        self.in_memory.set(in_memory as i64);
    }

    pub fn register(m: &Metrics) -> Self {
        let s = IncidentsMetrics {
            inputs: Family::default(),
            events: Family::default(),
            dead_letters: Family::default(),
            open: Gauge::default(),
            catch_up: Counter::default(),
            in_memory: Gauge::default(),
            evicted: Counter::default(),
            restored: Counter::default(),
            write_failures: Counter::default(),
            store_out_of_step: Gauge::default(),
            latency: Histogram::new(exponential_buckets(0.0005, 2.0, 18)),
            busy: Family::default(),
            time_to_ack: Family::new_with_constructor(response_histogram),
            time_to_resolve: Family::new_with_constructor(response_histogram),
            services: Default::default(),
        };
        m.register(
            "tocsin_incidents_time_to_acknowledge_seconds",
            "From an incident's opening to an acknowledgement (MTTA), by the incident's service label and severity",
            s.time_to_ack.clone(),
        );
        m.register(
            "tocsin_incidents_time_to_resolve_seconds",
            "From an incident's opening to its resolution (MTTR), by the incident's service label and severity",
            s.time_to_resolve.clone(),
        );
        m.register(
            "tocsin_incidents_inputs",
            "Inputs handled by kind (alert, command, timer, heartbeat) and outcome",
            s.inputs.clone(),
        );
        m.register(
            "tocsin_incidents_events",
            "Entries written to the INCIDENTS stream, by kind",
            s.events.clone(),
        );
        m.register(
            "tocsin_incidents_dead_letters",
            "Inputs moved to the DEADLETTER stream, by stream and reason (undecodable, too_large, refused)",
            s.dead_letters.clone(),
        );
        m.register(
            "tocsin_incidents_open",
            "Incidents not resolved",
            s.open.clone(),
        );
        m.register(
            "tocsin_incidents_catch_up_entries",
            "INCIDENTS entries replayed into the projection at start-up",
            s.catch_up.clone(),
        );
        m.register(
            "tocsin_incidents_in_memory",
            "Incidents whose state is held in memory (open ones and those resolved within the reopen window)",
            s.in_memory.clone(),
        );
        m.register(
            "tocsin_incidents_evicted",
            "Resolved incidents taken out of memory after the reopen window",
            s.evicted.clone(),
        );
        m.register(
            "tocsin_incidents_restored",
            "Incidents read back into memory because an input touched them",
            s.restored.clone(),
        );
        m.register(
            "tocsin_incidents_write_failures",
            "Writes to the INCIDENTS stream that failed (not acknowledged, refused or timed out); \
             each is decided again from what the stream stored and retried",
            s.write_failures.clone(),
        );
        m.register(
            "tocsin_incidents_store_out_of_step",
            "1 once a save to the local store failed: no later save is applied and no \
             incident leaves memory until the service restarts (which catches up on the \
             INCIDENTS stream from the last save applied)",
            s.store_out_of_step.clone(),
        );
        m.register(
            "tocsin_incidents_alert_latency_seconds",
            "From ingest receiving an alert to its incident events being stored",
            s.latency.clone(),
        );
        m.register(
            "tocsin_incidents_busy_seconds",
            "Time spent on batches of inputs, by stage: decide (deciding and sending \
             their entries, and inputs taken one at a time), stored (waiting for \
             JetStream to store the entries: the bus's synced writes), save (the local \
             store), answer (waiting for the previous batch's commands to be answered \
             and acknowledged, which runs beside the next batch). The rate of the \
             sum is the share of time the service is busy; near 1 it is saturated",
            s.busy.clone(),
        );
        s
    }

    /// Adds `d` to the time spent on batches of inputs at `stage`.
    pub(crate) fn busy(&self, stage: &str, d: std::time::Duration) {
        self.busy
            .get_or_create(&labels(&[("stage", stage)]))
            .inc_by(d.as_secs_f64());
    }
}

pub(crate) enum IncidentsEvent<'a> {
    Input {
        input: &'a str,
        outcome: &'a str,
    },
    Written {
        kind: &'a str,
    },
    DeadLettered {
        stream: &'a str,
        /// Its place on the stream: the sequence, or `<sequence>.<index>`
        /// for one alert of a message holding several.
        at: &'a str,
        /// Low-cardinality: `undecodable`, `too_large`, `refused`.
        reason: &'a str,
        detail: &'a str,
    },
    /// An input failed for a reason retrying cannot fix; it is tried again
    /// up to `of` times, then dead-lettered.
    InputFailed {
        attempt: u32,
        of: u32,
        error: &'a str,
    },
    /// A timer whose entries cannot be written is skipped until a restart.
    TimerAbandoned {
        timer: &'a str,
        reason: &'a str,
        detail: &'a str,
    },
    CaughtUp {
        entries: u64,
        incidents: usize,
    },
    /// Resolved incidents left memory; `in_memory` remain.
    Evicted {
        incidents: usize,
        in_memory: usize,
    },
    /// An incident was read back into memory.
    Restored,
    AlertLatency {
        seconds: f64,
    },
    CommandAnswered {
        id: &'a str,
        action: &'a str,
        accepted: bool,
        message: &'a str,
    },
    PublishFailed {
        error: &'a str,
    },
    /// The local store failed to apply a save: it keeps the last state
    /// applied, and nothing leaves memory until a restart.
    StoreOutOfStep {
        error: &'a str,
    },
    /// An incident was acknowledged (`resolved` false) or resolved, this
    /// long after it opened.
    ResponseTime {
        resolved: bool,
        service: &'a str,
        severity: &'a str,
        seconds: f64,
    },
}

/// The response time an incident entry records, if any: an acknowledgement
/// or a resolution, measured from the incident's opening.
pub(crate) fn response_time(
    e: &tocsin_proto::incident::IncidentEvent,
) -> Option<IncidentsEvent<'_>> {
    use tocsin_proto::incident::EventKind;
    let resolved = match e.kind {
        EventKind::Acknowledged => false,
        EventKind::Resolved { .. } => true,
        _ => return None,
    };
    let i = &e.incident;
    Some(IncidentsEvent::ResponseTime {
        resolved,
        service: i.labels.get("service").map(String::as_str).unwrap_or(""),
        severity: i.severity.as_str(),
        seconds: e.at.duration_since(i.opened_at).as_secs_f64().max(0.0),
    })
}

impl IncidentsEvent<'_> {
    pub(crate) fn emit(&self, m: &IncidentsMetrics) {
        match *self {
            IncidentsEvent::Input { input, outcome } => {
                m.inputs
                    .get_or_create(&labels(&[("input", input), ("outcome", outcome)]))
                    .inc();
            }
            IncidentsEvent::Written { kind } => {
                m.events.get_or_create(&labels(&[("kind", kind)])).inc();
            }
            IncidentsEvent::DeadLettered {
                stream,
                at,
                reason,
                detail,
            } => {
                m.dead_letters
                    .get_or_create(&labels(&[("stream", stream), ("reason", reason)]))
                    .inc();
                tracing::error!(
                    stream,
                    at,
                    reason,
                    detail,
                    "input moved to the DEADLETTER stream; the next one is processed"
                );
            }
            IncidentsEvent::InputFailed { attempt, of, error } => {
                tracing::warn!(attempt, of, error, "input failed; retrying");
            }
            IncidentsEvent::TimerAbandoned {
                timer,
                reason,
                detail,
            } => {
                m.inputs
                    .get_or_create(&labels(&[("input", "timer"), ("outcome", "abandoned")]))
                    .inc();
                tracing::error!(
                    timer,
                    reason,
                    detail,
                    "timer cannot be recorded; skipped until the service restarts"
                );
            }
            IncidentsEvent::CaughtUp { entries, incidents } => {
                m.catch_up.inc_by(entries);
                m.in_memory.set(incidents as i64);
                tracing::info!(
                    entries,
                    incidents,
                    "projection caught up with the INCIDENTS stream"
                );
            }
            IncidentsEvent::Evicted {
                incidents,
                in_memory,
            } => {
                m.evicted.inc_by(incidents as u64);
                m.in_memory.set(in_memory as i64);
                tracing::debug!(incidents, in_memory, "resolved incidents left memory");
            }
            IncidentsEvent::Restored => {
                m.restored.inc();
            }
            IncidentsEvent::AlertLatency { seconds } => m.latency.observe(seconds),
            IncidentsEvent::CommandAnswered {
                id,
                action,
                accepted,
                message,
            } => {
                m.inputs
                    .get_or_create(&labels(&[
                        ("input", "command"),
                        ("outcome", if accepted { "accepted" } else { "rejected" }),
                    ]))
                    .inc();
                tracing::info!(
                    command_id = id,
                    action,
                    accepted,
                    message,
                    "command answered"
                );
            }
            IncidentsEvent::PublishFailed { error } => {
                m.write_failures.inc();
                tracing::warn!(error, "cannot write to the INCIDENTS stream; retrying");
            }
            IncidentsEvent::StoreOutOfStep { error } => {
                m.store_out_of_step.set(1);
                tracing::error!(
                    error,
                    "the local store failed to apply a save: no later save is applied and no \
                     incident leaves memory until the service restarts, which reads the store \
                     as the last save applied left it and catches up on the INCIDENTS stream"
                );
            }
            IncidentsEvent::ResponseTime {
                resolved,
                service,
                severity,
                seconds,
            } => {
                let service = {
                    let mut seen = m.services.lock().unwrap_or_else(|e| e.into_inner());
                    if service.is_empty() {
                        "none"
                    } else if seen.contains(service) || seen.len() < MAX_SERVICES {
                        seen.insert(service.to_string());
                        service
                    } else {
                        "other"
                    }
                };
                let family = if resolved {
                    &m.time_to_resolve
                } else {
                    &m.time_to_ack
                };
                family
                    .get_or_create(&labels(&[("service", service), ("severity", severity)]))
                    .observe(seconds);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A failed save of the local store shows on /metrics until a restart.
    #[test]
    fn a_store_out_of_step_shows_on_the_metrics() {
        let metrics = Metrics::new();
        let m = IncidentsMetrics::register(&metrics);
        assert!(
            metrics
                .encode()
                .contains("tocsin_incidents_store_out_of_step 0"),
            "{}",
            metrics.encode()
        );
        IncidentsEvent::StoreOutOfStep { error: "sled: io" }.emit(&m);
        assert!(metrics
            .encode()
            .contains("tocsin_incidents_store_out_of_step 1"));
    }
}
