//! The notifier's telemetry: each event logs and counts together, so logs
//! and `/metrics` never disagree. Labels are channels, providers and
//! outcomes, never ids.

use prometheus_client::metrics::{
    counter::Counter,
    family::Family,
    gauge::Gauge,
    histogram::{exponential_buckets, Histogram},
};
use tocsin_proto::notify::DeliveryOutcome;
use tocsin_runtime::admin::{labels, Labels, Metrics};

use crate::{guard::BreakerState, providers::Outgoing};

/// `channel="sms"`, or for a webhook `channel="webhook",webhook="teams"`
/// (each webhook has its own breaker).
fn provider_labels(provider: &str) -> Labels {
    match provider.strip_prefix("webhook:") {
        Some(name) => labels(&[("channel", "webhook"), ("webhook", name)]),
        None => labels(&[("channel", provider)]),
    }
}

#[derive(Clone)]
pub(crate) struct NotifierMetrics {
    notifications: Family<Labels, Counter>,
    latency: Family<Labels, Histogram>,
    request: Family<Labels, Histogram>,
    retries: Family<Labels, Counter>,
    breaker: Family<Labels, Gauge>,
    breaker_opened: Family<Labels, Counter>,
    lookups: Family<Labels, Counter>,
    handed_back: Family<Labels, Counter>,
    done_here: Family<Labels, Counter>,
    booked_alone: Family<Labels, Counter>,
    updates: Family<Labels, Counter>,
    pub(crate) dead_letters: Counter,
    replicas: Gauge,
    shared_paces: Gauge,
}

fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.005, 2.0, 16))
}

impl NotifierMetrics {
    /// `tocsin_notifier_shared_paces`: the bucket is open.
    pub(crate) fn shared_paces_open(&self) {
        self.shared_paces.set(1);
    }

    /// `tocsin_notifier_replicas`.
    pub(crate) fn replicas(&self, n: u32) {
        self.replicas.set(i64::from(n));
    }

    pub(crate) fn register(m: &Metrics) -> Self {
        let s = NotifierMetrics {
            notifications: Family::default(),
            latency: Family::new_with_constructor(latency_histogram),
            request: Family::new_with_constructor(latency_histogram),
            retries: Family::default(),
            breaker: Family::default(),
            breaker_opened: Family::default(),
            lookups: Family::default(),
            handed_back: Family::default(),
            done_here: Family::default(),
            booked_alone: Family::default(),
            updates: Family::default(),
            dead_letters: Counter::default(),
            replicas: Gauge::default(),
            shared_paces: Gauge::default(),
        };
        s.replicas.set(1);
        m.register(
            "tocsin_notifier_replicas",
            "Notifier replicas running, as this one sees them (each destination's rate limit is shared among them)",
            s.replicas.clone(),
        );
        m.register(
            "tocsin_notifier_shared_paces",
            "1 once this replica has the bucket it books turns in with the other replicas \
             (tocsin_notifier_paces) open, 0 until then",
            s.shared_paces.clone(),
        );
        m.register(
            "tocsin_notifications",
            "Messages delivered or not, by channel and outcome (sent, failed, gave_up, skipped)",
            s.notifications.clone(),
        );
        m.register(
            "tocsin_notification_latency_seconds",
            "From the page being due to the provider accepting it, by channel",
            s.latency.clone(),
        );
        m.register(
            "tocsin_notifier_request_seconds",
            "Duration of one provider request, by channel",
            s.request.clone(),
        );
        m.register(
            "tocsin_notifier_retries",
            "Attempts that failed and will be retried, by channel",
            s.retries.clone(),
        );
        m.register(
            "tocsin_notifier_breaker_state",
            "Circuit breaker per channel (and per webhook): 0 closed, 1 half-open, 2 open",
            s.breaker.clone(),
        );
        m.register(
            "tocsin_notifier_breaker_opened",
            "Times a channel's (or webhook's) circuit breaker opened",
            s.breaker_opened.clone(),
        );
        m.register(
            "tocsin_notifier_lookups",
            "Checks with a provider whether a request whose answer was lost arrived, \
             by channel and result (found, not_found, undecided, unreachable)",
            s.lookups.clone(),
        );
        m.register(
            "tocsin_notifier_handed_back",
            "Pages (and message updates) told to come back later, their bus message handed back \
             (a burst's once its other pages are done), by channel and why \
             (rate_limit, breaker, busy, retry)",
            s.handed_back.clone(),
        );
        m.register(
            "tocsin_notifier_done_here",
            "Deliveries that came again (in a burst's message handed back for its other pages) \
             after this replica had finished them: acknowledged without reading their record or \
             sending their receipt again; by channel",
            s.done_here.clone(),
        );
        m.register(
            "tocsin_notifier_booked_alone",
            "Turns this replica booked alone, at its share of a destination's rate, while other \
             replicas run: the bucket they book in together (tocsin_notifier_paces) failed, \
             did not answer or could not be opened; by channel",
            s.booked_alone.clone(),
        );
        m.register(
            "tocsin_notifier_updates",
            "Updates of sent messages (acknowledged, resolved, triggered again), by channel and outcome",
            s.updates.clone(),
        );
        m.register(
            "tocsin_notifier_dead_letters",
            "NOTIFY messages that could not be decoded",
            s.dead_letters.clone(),
        );
        s
    }

    /// A final outcome, counted once (when it is first recorded).
    pub(crate) fn outcome(
        &self,
        out: &Outgoing,
        outcome: DeliveryOutcome,
        detail: &str,
        attempts: u32,
        now: jiff::Timestamp,
    ) {
        let l = labels(&[
            ("channel", out.channel.as_str()),
            ("outcome", outcome.as_str()),
        ]);
        self.notifications.get_or_create(&l).inc();
        if outcome == DeliveryOutcome::Sent {
            if let Some(p) = &out.page {
                let late = now.duration_since(p.due_at);
                self.latency
                    .get_or_create(&labels(&[("channel", out.channel.as_str())]))
                    .observe(late.as_secs_f64().max(0.0));
            }
        }
        match outcome {
            DeliveryOutcome::Skipped => tracing::info!(
                delivery = %out.id, incident = out.incident.number, channel = out.channel.as_str(),
                target = %out.target, reason = %detail, "not sent: the incident moved on"
            ),
            DeliveryOutcome::Sent => tracing::info!(
                delivery = %out.id, incident = out.incident.number, channel = out.channel.as_str(),
                target = %out.target, kind = out.kind.as_str(), attempts, "delivered"
            ),
            _ => tracing::warn!(
                delivery = %out.id, incident = out.incident.number, channel = out.channel.as_str(),
                target = %out.target, outcome = outcome.as_str(), reason = %detail,
                "not delivered"
            ),
        }
    }

    pub(crate) fn request(&self, channel: &str, seconds: f64) {
        self.request
            .get_or_create(&labels(&[("channel", channel)]))
            .observe(seconds);
    }

    pub(crate) fn retry(&self, out: &Outgoing, attempt: u32, reason: &str) {
        self.retries
            .get_or_create(&labels(&[("channel", out.channel.as_str())]))
            .inc();
        tracing::info!(delivery = %out.id, channel = out.channel.as_str(), attempt, reason = %reason,
            "delivery failed; will retry");
    }

    pub(crate) fn breaker(&self, provider: &str, s: BreakerState) {
        let v = match s {
            BreakerState::Closed => 0,
            BreakerState::HalfOpen => 1,
            BreakerState::Open { .. } => 2,
        };
        self.breaker
            .get_or_create(&provider_labels(provider))
            .set(v);
    }

    pub(crate) fn breaker_opened(&self, provider: &str) {
        self.breaker_opened
            .get_or_create(&provider_labels(provider))
            .inc();
        tracing::warn!(
            provider,
            "circuit breaker open: messages for this provider wait"
        );
    }

    pub(crate) fn lookup(&self, out: &Outgoing, result: &str, detail: &str) {
        self.lookups
            .get_or_create(&labels(&[
                ("channel", out.channel.as_str()),
                ("result", result),
            ]))
            .inc();
        match result {
            "found" => tracing::info!(delivery = %out.id,
                "an earlier attempt had reached the provider; not sending again"),
            "undecided" => tracing::warn!(delivery = %out.id, reason = %detail,
                "cannot tell whether an earlier attempt arrived; sending again"),
            _ => tracing::debug!(delivery = %out.id, result, "looked up an earlier attempt"),
        }
    }

    /// A turn booked alone while other replicas run.
    pub(crate) fn booked_alone(&self, provider: &str) {
        self.booked_alone
            .get_or_create(&provider_labels(provider))
            .inc();
    }

    pub(crate) fn done_here(&self, channel: &str) {
        self.done_here
            .get_or_create(&labels(&[("channel", channel)]))
            .inc();
    }

    pub(crate) fn handed_back(&self, channel: &str, why: &str) {
        self.handed_back
            .get_or_create(&labels(&[("channel", channel), ("why", why)]))
            .inc();
    }

    pub(crate) fn update(&self, out: &Outgoing, outcome: &str, detail: &str) {
        self.updates
            .get_or_create(&labels(&[
                ("channel", out.channel.as_str()),
                ("outcome", outcome),
            ]))
            .inc();
        if outcome == "sent" {
            tracing::info!(delivery = %out.id, incident = out.incident.number,
                channel = out.channel.as_str(), kind = out.kind.as_str(), "message updated");
        } else {
            tracing::warn!(delivery = %out.id, incident = out.incident.number,
                channel = out.channel.as_str(), kind = out.kind.as_str(), outcome, reason = %detail,
                "message not updated");
        }
    }
}
