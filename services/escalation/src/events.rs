//! Telemetry: each event logs and counts together (as every service's
//! `events.rs` does), so a log line and its metric cannot drift apart.

use prometheus_client::metrics::{
    counter::Counter,
    family::Family,
    gauge::Gauge,
    histogram::{exponential_buckets, Histogram},
};
use tocsin_runtime::admin::{labels, Labels, Metrics};

#[derive(Clone)]
pub(crate) struct EscalationMetrics {
    pages: Family<Labels, Counter>,
    tracks: Gauge,
    lateness: Histogram,
    skipped: Counter,
    publish_failures: Counter,
    busy: Family<Labels, Counter<f64, std::sync::atomic::AtomicU64>>,
}

impl EscalationMetrics {
    pub(crate) fn register(m: &Metrics) -> Self {
        let s = EscalationMetrics {
            pages: Family::default(),
            tracks: Gauge::default(),
            lateness: Histogram::new(exponential_buckets(0.001, 2.0, 16)),
            skipped: Counter::default(),
            publish_failures: Counter::default(),
            busy: Family::default(),
        };
        m.register(
            "tocsin_escalation_pages",
            "Pages published to NOTIFY, by channel",
            s.pages.clone(),
        );
        m.register(
            "tocsin_escalation_tracks",
            "Incidents (per policy) with escalation pending or paused",
            s.tracks.clone(),
        );
        m.register(
            "tocsin_escalation_timer_lateness_seconds",
            "How late a due escalation step fired",
            s.lateness.clone(),
        );
        m.register(
            "tocsin_escalation_undecodable_entries",
            "INCIDENTS entries that did not decode and were skipped",
            s.skipped.clone(),
        );
        m.register(
            "tocsin_escalation_publish_failures",
            "Messages to NOTIFY or COMMANDS (pages, timeline records) that failed or were \
             refused; each is sent again until stored",
            s.publish_failures.clone(),
        );
        m.register(
            "tocsin_escalation_busy_seconds",
            "Time spent by the escalation loop, by stage: apply (applying INCIDENTS \
             entries), read (waiting for them while catching up to the stream's end), info \
             (asking INCIDENTS for its last sequence before firing), \
             load (reading a burst's due tracks from the local store), fire (firing \
             them), send (sending their pages), pages (waiting for JetStream to store \
             the pages), records (sending the timeline records and waiting for them to \
             be stored), save (the local store; a burst's chunk is written on another \
             thread while the next fires, and this is the wait for it). The \
             rate of the sum is the share of time the loop is busy; near 1 it is saturated",
            s.busy.clone(),
        );
        s
    }

    /// Adds `d` to the loop's time at `stage`.
    pub(crate) fn busy(&self, stage: &str, d: std::time::Duration) {
        self.busy
            .get_or_create(&labels(&[("stage", stage)]))
            .inc_by(d.as_secs_f64());
    }
}

pub(crate) enum EscalationEvent<'a> {
    /// A page was stored on NOTIFY for the first time.
    PageSent {
        page: &'a str,
        incident: u64,
        channel: &'a str,
    },
    /// How many tracks there are after a save.
    Tracks { count: usize },
    /// A due step fired this late.
    Fired { late_seconds: f64 },
    /// An INCIDENTS entry did not decode; skipped.
    Undecodable { seq: u64, error: &'a str },
    /// The local store could not be written (only a longer rebuild after a
    /// restart: the stream has everything).
    SaveFailed { error: &'a str },
    /// A publish failed or was not acknowledged; retried.
    PublishFailed { subject: &'a str, error: &'a str },
    /// Reading INCIDENTS failed; retried.
    ReadFailed {
        during: &'static str,
        error: &'a str,
    },
}

impl EscalationEvent<'_> {
    pub(crate) fn emit(self, m: &EscalationMetrics) {
        match self {
            EscalationEvent::PageSent {
                page,
                incident,
                channel,
            } => {
                m.pages
                    .get_or_create(&labels(&[("channel", channel)]))
                    .inc();
                tracing::info!(page, incident, channel, "page sent to NOTIFY");
            }
            EscalationEvent::Tracks { count } => {
                m.tracks.set(count as i64);
            }
            EscalationEvent::Fired { late_seconds } => m.lateness.observe(late_seconds.max(0.0)),
            EscalationEvent::Undecodable { seq, error } => {
                m.skipped.inc();
                tracing::error!(seq, error, "undecodable INCIDENTS entry skipped");
            }
            EscalationEvent::SaveFailed { error } => tracing::error!(
                error,
                "cannot save escalation state; it will be rebuilt from the stream on restart"
            ),
            EscalationEvent::PublishFailed { subject, error } => {
                m.publish_failures.inc();
                tracing::warn!(error, subject, "publish not acknowledged; retrying")
            }
            EscalationEvent::ReadFailed { during, error } => {
                tracing::warn!(error, during, "cannot read INCIDENTS; retrying")
            }
        }
    }
}
