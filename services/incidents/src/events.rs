//! Telemetry: each event logs and counts together.

use prometheus_client::metrics::{
    counter::Counter,
    family::Family,
    gauge::Gauge,
    histogram::{exponential_buckets, Histogram},
};
use tocsin_runtime::admin::{labels, Labels, Metrics};

#[derive(Clone)]
pub struct IncidentsMetrics {
    inputs: Family<Labels, Counter>,
    events: Family<Labels, Counter>,
    dead_letters: Family<Labels, Counter>,
    pub(crate) open: Gauge,
    catch_up: Counter,
    latency: Histogram,
}

impl IncidentsMetrics {
    pub fn register(m: &Metrics) -> Self {
        let s = IncidentsMetrics {
            inputs: Family::default(),
            events: Family::default(),
            dead_letters: Family::default(),
            open: Gauge::default(),
            catch_up: Counter::default(),
            latency: Histogram::new(exponential_buckets(0.0005, 2.0, 18)),
        };
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
            "tocsin_incidents_alert_latency_seconds",
            "From ingest receiving an alert to its incident events being stored",
            s.latency.clone(),
        );
        s
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
        seq: u64,
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
                seq,
                reason,
                detail,
            } => {
                m.dead_letters
                    .get_or_create(&labels(&[("stream", stream), ("reason", reason)]))
                    .inc();
                tracing::error!(
                    stream,
                    seq,
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
                tracing::info!(
                    entries,
                    incidents,
                    "projection caught up with the INCIDENTS stream"
                );
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
                tracing::warn!(error, "cannot write to the INCIDENTS stream; retrying");
            }
        }
    }
}
