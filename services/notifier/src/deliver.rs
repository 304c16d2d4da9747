//! One delivery, start to end: guard (breaker, rate limit), render, record
//! the attempt, call the provider (or, after a crash mid-request, ask it
//! whether the message arrived), record the outcome.

use std::{collections::BTreeMap, num::NonZeroU32, sync::Mutex, time::Duration};

use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use jiff::Timestamp;
use prometheus_client::metrics::{
    counter::Counter,
    family::Family,
    gauge::Gauge,
    histogram::{exponential_buckets, Histogram},
};
use tocsin_proto::notify::{Channel, Delivery, DeliveryOutcome, MessageKind, ProviderRef};
use tocsin_runtime::admin::{labels, Labels, Metrics};

use crate::{
    channels::{
        email::{Email, Parts},
        pagerduty::Pagerduty,
        slack::Slack,
        sms::Sms,
        webhook::Webhook,
        Outgoing, SendError,
    },
    config::{GuardConfig, NotifierConfig, RetryConfig, SlackMode},
    guard::{backoff, Breaker, BreakerState, Permit},
    store::{Record, State, Store},
    templates::Templates,
};

#[derive(Clone)]
pub(crate) struct NotifierMetrics {
    notifications: Family<Labels, Counter>,
    latency: Family<Labels, Histogram>,
    request: Family<Labels, Histogram>,
    retries: Family<Labels, Counter>,
    breaker: Family<Labels, Gauge>,
    breaker_opened: Family<Labels, Counter>,
    pub(crate) dead_letters: Counter,
}

fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.005, 2.0, 16))
}

impl NotifierMetrics {
    pub(crate) fn register(m: &Metrics) -> Self {
        let s = NotifierMetrics {
            notifications: Family::default(),
            latency: Family::new_with_constructor(latency_histogram),
            request: Family::new_with_constructor(latency_histogram),
            retries: Family::default(),
            breaker: Family::default(),
            breaker_opened: Family::default(),
            dead_letters: Counter::default(),
        };
        m.register(
            "tocsin_notifications",
            "Messages delivered or not, by channel and outcome (sent, failed, gave_up)",
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
            "Circuit breaker per channel: 0 closed, 1 half-open, 2 open",
            s.breaker.clone(),
        );
        m.register(
            "tocsin_notifier_breaker_opened",
            "Times a channel's circuit breaker opened",
            s.breaker_opened.clone(),
        );
        m.register(
            "tocsin_notifier_dead_letters",
            "NOTIFY messages that could not be decoded",
            s.dead_letters.clone(),
        );
        s
    }
}

/// A provider's breaker and rate limiter. The limit applies per
/// destination ([`destination`]): providers limit per integration key or
/// channel, not per sender.
struct Guard {
    breaker: Mutex<Breaker>,
    limiter: Option<DefaultKeyedRateLimiter<String>>,
}

/// What a provider rate-limits by: the PagerDuty service (its routing
/// key), the Slack channel or user; SMS and email are limited per account.
fn destination(out: &Outgoing) -> String {
    match out.channel {
        Channel::Pagerduty | Channel::Webhook => out.target.clone(),
        Channel::Slack => match &out.reference {
            Some(ProviderRef::SlackMessage { channel, .. }) => channel.clone(),
            _ => out.address.clone(),
        },
        Channel::Sms | Channel::Email => String::new(),
    }
}

impl Guard {
    fn new(cfg: &GuardConfig) -> Guard {
        let limiter = NonZeroU32::new(cfg.rate_per_second).map(|rate| {
            let burst = cfg.burst.and_then(NonZeroU32::new).unwrap_or(rate);
            RateLimiter::keyed(Quota::per_second(rate).allow_burst(burst))
        });
        Guard {
            breaker: Mutex::new(Breaker::new(cfg.breaker)),
            limiter,
        }
    }
}

/// What the caller does with the bus message.
// One per delivery, moved once: boxing would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub(crate) enum Step {
    /// Final: publish this receipt (unless already published), then ack.
    Done { record: Record, receipt: Delivery },
    /// Not yet: redeliver after this long.
    Later(Duration),
}

pub(crate) struct Deliverer {
    templates: Templates,
    slack: Option<Slack>,
    pagerduty: Option<Pagerduty>,
    sms: Option<Sms>,
    email: Option<Email>,
    webhooks: BTreeMap<String, Webhook>,
    /// Per channel; per webhook for webhooks (each is its own endpoint).
    guards: BTreeMap<(Channel, String), Guard>,
    retry: RetryConfig,
    pub(crate) store: Store,
    pub(crate) metrics: NotifierMetrics,
    pub(crate) incident_url: Option<String>,
    pub(crate) status_page: Option<String>,
    pub(crate) reply_to: Option<String>,
}

/// The templates and the configured providers.
pub(crate) type Built = (
    Templates,
    Option<Slack>,
    Option<Pagerduty>,
    Option<Sms>,
    Option<Email>,
    BTreeMap<String, Webhook>,
);

/// Builds the providers and templates; every problem is listed.
pub(crate) fn build_parts(cfg: &NotifierConfig) -> Result<Built, Vec<String>> {
    let mut errors = Vec::new();
    let templates = match Templates::load(cfg.templates.as_ref().map(|p| p.0.as_path())) {
        Ok(t) => Some(t),
        Err(e) => {
            errors.extend(e.into_iter().map(|e| format!("template {e}")));
            None
        }
    };
    fn take<T>(errors: &mut Vec<String>, r: Option<Result<T, String>>) -> Option<T> {
        match r {
            Some(Ok(x)) => Some(x),
            Some(Err(e)) => {
                errors.push(e);
                None
            }
            None => None,
        }
    }
    let slack = take(&mut errors, cfg.slack.as_ref().map(Slack::new));
    let pagerduty = take(&mut errors, cfg.pagerduty.as_ref().map(Pagerduty::new));
    let sms = take(&mut errors, cfg.sms.as_ref().map(Sms::new));
    let email = take(&mut errors, cfg.email.as_ref().map(Email::new));
    let mut webhooks = BTreeMap::new();
    for w in &cfg.webhooks {
        if webhooks.contains_key(&w.name) {
            errors.push(format!("webhook {:?} is defined twice", w.name));
            continue;
        }
        match Webhook::new(w) {
            Ok(h) => {
                webhooks.insert(w.name.clone(), h);
            }
            Err(e) => errors.push(e),
        }
    }
    match templates {
        Some(t) if errors.is_empty() => Ok((t, slack, pagerduty, sms, email, webhooks)),
        _ => Err(errors),
    }
}

impl Deliverer {
    pub(crate) fn new(
        cfg: &NotifierConfig,
        store: Store,
        metrics: NotifierMetrics,
    ) -> Result<Deliverer, Vec<String>> {
        let (templates, slack, pagerduty, sms, email, webhooks) = build_parts(cfg)?;
        let mut guards = BTreeMap::new();
        let g = |c: Option<GuardConfig>| Guard::new(&c.unwrap_or_default());
        let all = String::new;
        guards.insert(
            (Channel::Slack, all()),
            g(cfg.slack.as_ref().map(|c| c.guard)),
        );
        guards.insert(
            (Channel::Pagerduty, all()),
            g(cfg.pagerduty.as_ref().map(|c| c.guard)),
        );
        guards.insert((Channel::Sms, all()), g(cfg.sms.as_ref().map(|c| c.guard)));
        guards.insert(
            (Channel::Email, all()),
            g(cfg.email.as_ref().map(|c| c.guard)),
        );
        // Each webhook is its own endpoint: one that is down does not hold
        // back the others. Unknown names fail before any guard is needed.
        guards.insert((Channel::Webhook, all()), g(None));
        for w in &cfg.webhooks {
            guards.insert((Channel::Webhook, w.name.clone()), g(Some(w.guard)));
        }
        let reply_to = cfg
            .sms_reply_to
            .clone()
            .or_else(|| sms.as_ref().and_then(|s| s.from().map(str::to_string)));
        Ok(Deliverer {
            templates,
            slack,
            pagerduty,
            sms,
            email,
            webhooks,
            guards,
            retry: cfg.retry,
            store,
            metrics,
            incident_url: cfg.incident_url.clone(),
            status_page: cfg.status_page_url.clone(),
            reply_to,
        })
    }

    pub(crate) fn slack_mode(&self) -> Option<SlackMode> {
        self.slack.as_ref().map(Slack::mode)
    }

    pub(crate) fn webhook_wants_updates(&self, name: &str) -> bool {
        self.webhooks.get(name).is_some_and(|w| w.updates)
    }

    fn guard(&self, out: &Outgoing) -> &Guard {
        let webhook = (out.channel, out.target.clone());
        self.guards
            .get(&webhook)
            .filter(|_| out.channel == Channel::Webhook)
            .or_else(|| self.guards.get(&(out.channel, String::new())))
            .expect("a guard per channel")
    }

    /// `channel`, plus `webhook` for a webhook's own breaker.
    fn guard_labels(out: &Outgoing) -> Labels {
        match out.channel {
            Channel::Webhook => labels(&[("channel", "webhook"), ("webhook", &out.target)]),
            c => labels(&[("channel", c.as_str())]),
        }
    }

    fn set_breaker_metric(&self, out: &Outgoing, s: BreakerState) {
        let v = match s {
            BreakerState::Closed => 0,
            BreakerState::HalfOpen => 1,
            BreakerState::Open { .. } => 2,
        };
        self.metrics
            .breaker
            .get_or_create(&Self::guard_labels(out))
            .set(v);
    }

    fn receipt(out: &Outgoing, rec: &Record) -> Delivery {
        let (outcome, detail, provider) = match &rec.state {
            State::Sent { provider } => (
                DeliveryOutcome::Sent,
                if rec.attempts > 1 {
                    format!("after {} attempts", rec.attempts)
                } else {
                    String::new()
                },
                Some(provider.clone()),
            ),
            State::Failed { reason } => (DeliveryOutcome::Failed, reason.clone(), None),
            State::GaveUp { reason } => (DeliveryOutcome::GaveUp, reason.clone(), None),
            State::Skipped { reason } => (DeliveryOutcome::Skipped, reason.clone(), None),
            State::Pending | State::InFlight { .. } => {
                (DeliveryOutcome::GaveUp, rec.last_error.clone(), None)
            }
        };
        Delivery {
            id: out.id.clone(),
            kind: out.kind,
            channel: out.channel,
            target: out.target.clone(),
            outcome,
            attempts: rec.attempts,
            detail,
            provider,
        }
    }

    fn done(&self, out: &Outgoing, record: Record) -> Step {
        let receipt = Self::receipt(out, &record);
        Step::Done { record, receipt }
    }

    /// Counts a final outcome (once: when it is first recorded).
    fn count(&self, out: &Outgoing, rec: &Record, receipt: &Delivery) {
        let l = labels(&[
            ("channel", out.channel.as_str()),
            ("outcome", receipt.outcome.as_str()),
        ]);
        self.metrics.notifications.get_or_create(&l).inc();
        if receipt.outcome == DeliveryOutcome::Sent {
            if let Some(p) = &out.page {
                let late = Timestamp::now().duration_since(p.due_at);
                self.metrics
                    .latency
                    .get_or_create(&labels(&[("channel", out.channel.as_str())]))
                    .observe(late.as_secs_f64().max(0.0));
            }
        }
        match receipt.outcome {
            DeliveryOutcome::Skipped => tracing::info!(
                delivery = %out.id, incident = out.incident.number, channel = out.channel.as_str(),
                target = %out.target, reason = %receipt.detail, "not sent: the incident moved on"
            ),
            DeliveryOutcome::Sent => tracing::info!(
                delivery = %out.id, incident = out.incident.number, channel = out.channel.as_str(),
                target = %out.target, kind = out.kind.as_str(), attempts = rec.attempts, "delivered"
            ),
            _ => tracing::warn!(
                delivery = %out.id, incident = out.incident.number, channel = out.channel.as_str(),
                target = %out.target, outcome = receipt.outcome.as_str(), reason = %receipt.detail,
                "not delivered"
            ),
        }
    }

    /// Marks the receipt of `id` as published.
    pub(crate) async fn receipt_published(&self, id: &str, mut rec: Record) {
        rec.receipt_published = true;
        if let Err(e) = self.store.put(id, &rec).await {
            tracing::warn!(error = %e, "cannot mark a receipt published; it may be published again");
        }
    }

    /// Delivers `out` once. `redelivered`: the bus delivered this message
    /// before (to this or another replica), so a request may have gone out
    /// without its answer being recorded.
    /// `skip`: why this message should not be sent after all (the incident
    /// moved on while it waited); recorded like any outcome.
    pub(crate) async fn process(
        &self,
        out: &Outgoing,
        redelivered: bool,
        skip: Option<String>,
    ) -> Step {
        let now = Timestamp::now();
        let existing = match self.store.get(&out.id) {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(error = %e, delivery = %out.id, "cannot read the delivery record; retrying later");
                return Step::Later(Duration::from_secs(1));
            }
        };
        if let Some(r) = &existing {
            if r.is_final() {
                return self.done(out, r.clone());
            }
        }
        // A page redelivered that this replica has no record of may have
        // been attempted by another replica (or before the store was lost).
        let unknown = existing.is_none();
        let mut rec = existing.unwrap_or_else(|| Record::new(now));
        if let Some(reason) = skip {
            rec.state = State::Skipped { reason };
            return self.finish(out, rec).await;
        }
        let doubt_since = match rec.state {
            State::InFlight { since } => Some(since),
            _ if unknown && redelivered => Some(rec.first_attempt),
            _ => None,
        };

        // Give up once retries have gone on long enough.
        let give_up = self.retry.give_up_after.get();
        if rec.attempts > 0
            && !give_up.is_zero()
            && now.duration_since(rec.first_attempt).unsigned_abs() > give_up
        {
            rec.state = State::GaveUp {
                reason: format!(
                    "gave up after {} attempts over {}: {}",
                    rec.attempts,
                    tocsin_runtime::config::HumanDuration(give_up),
                    rec.last_error
                ),
            };
            return self.finish(out, rec).await;
        }

        // Render first: a template that cannot render will never send.
        let rendered = match self.render(out) {
            Ok(r) => r,
            Err(e) => {
                rec.state = State::Failed { reason: e };
                return self.finish(out, rec).await;
            }
        };

        let guard = self.guard(out);
        let probe = {
            let mut b = guard.breaker.lock().unwrap_or_else(|e| e.into_inner());
            let permit = b.permit(tokio::time::Instant::now());
            self.set_breaker_metric(out, b.state());
            match permit {
                Permit::Wait(d) => {
                    // Pages wait while the provider is down; spread them out.
                    // Noting that this one was never attempted here spares a
                    // look-up at the provider when it comes back (no flush
                    // needed: losing the note only costs that look-up).
                    if unknown {
                        self.store.put_unflushed(&out.id, &rec);
                    }
                    let jitter = Duration::from_millis(rand::random::<u64>() % 500);
                    return Step::Later(d + jitter);
                }
                Permit::Go { probe } => probe,
            }
        };
        if let Some(l) = &guard.limiter {
            l.until_key_ready(&destination(out)).await;
        }

        // The attempt is on disk before the request leaves.
        rec.attempts += 1;
        rec.state = State::InFlight { since: now };
        if let Err(e) = self.store.put(&out.id, &rec).await {
            if probe {
                guard
                    .breaker
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .release();
            }
            tracing::error!(error = %e, delivery = %out.id, "cannot record a delivery attempt; retrying later");
            return Step::Later(Duration::from_secs(1));
        }

        let started = std::time::Instant::now();
        let result = match doubt_since {
            None => self.send(out, &rendered).await,
            Some(since) => match self.find_sent(out, &rendered, since).await {
                Ok(Some(r)) => {
                    tracing::info!(delivery = %out.id, "an earlier attempt had reached the provider; not sending again");
                    Ok(r)
                }
                Ok(None) => self.send(out, &rendered).await,
                // The provider is unreachable: check again later rather
                // than risk a duplicate.
                Err(e @ SendError::Retry { .. }) => Err(e),
                // The provider will not tell (e.g. a missing scope): send.
                Err(SendError::Permanent { reason }) => {
                    tracing::warn!(delivery = %out.id, reason = %reason, "cannot check whether an earlier attempt arrived; sending again");
                    self.send(out, &rendered).await
                }
            },
        };
        self.metrics
            .request
            .get_or_create(&labels(&[("channel", out.channel.as_str())]))
            .observe(started.elapsed().as_secs_f64());

        {
            let mut b = guard.breaker.lock().unwrap_or_else(|e| e.into_inner());
            match &result {
                Ok(_) | Err(SendError::Permanent { .. }) => b.success(),
                Err(SendError::Retry { .. }) => {
                    if b.failure(tokio::time::Instant::now()) {
                        self.metrics
                            .breaker_opened
                            .get_or_create(&Self::guard_labels(out))
                            .inc();
                        tracing::warn!(
                            channel = out.channel.as_str(),
                            "circuit breaker open: pages on this channel wait"
                        );
                    }
                }
            }
            self.set_breaker_metric(out, b.state());
        }

        match result {
            Ok(provider) => {
                rec.state = State::Sent { provider };
                self.finish(out, rec).await
            }
            Err(SendError::Permanent { reason }) => {
                rec.state = State::Failed { reason };
                self.finish(out, rec).await
            }
            Err(SendError::Retry {
                reason,
                retry_after,
            }) => {
                self.metrics
                    .retries
                    .get_or_create(&labels(&[("channel", out.channel.as_str())]))
                    .inc();
                tracing::info!(delivery = %out.id, channel = out.channel.as_str(), attempt = rec.attempts, reason = %reason, "delivery failed; will retry");
                rec.state = State::Pending;
                rec.last_error = reason;
                let delay = backoff(&self.retry, rec.attempts, retry_after);
                if let Err(e) = self.store.put(&out.id, &rec).await {
                    tracing::warn!(error = %e, "cannot record a failed attempt");
                }
                Step::Later(delay)
            }
        }
    }

    async fn finish(&self, out: &Outgoing, rec: Record) -> Step {
        // Recorded before the bus message is acknowledged: a redelivery
        // finds it and sends nothing.
        loop {
            match self.store.put(&out.id, &rec).await {
                Ok(()) => break,
                Err(e) => {
                    tracing::error!(error = %e, "cannot record a delivery outcome; retrying");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
        let receipt = Self::receipt(out, &rec);
        self.count(out, &rec, &receipt);
        Step::Done {
            record: rec,
            receipt,
        }
    }

    fn render(&self, out: &Outgoing) -> Result<Rendered, String> {
        let t = &self.templates;
        let kind = out.kind.as_str();
        let name = |ch: &str, part: Option<&str>| match part {
            Some(p) => format!("{ch}/{kind}.{p}"),
            None => format!("{ch}/{kind}"),
        };
        let render = |n: String| -> Result<String, String> {
            if !t.has(&n) {
                return Err(format!(
                    "{} messages have no {kind} template ({n}.hbs)",
                    out.channel.as_str()
                ));
            }
            t.render(&n, &out.ctx)
                .map_err(|e| format!("template {n}.hbs: {e}"))
        };
        Ok(match out.channel {
            Channel::Slack => Rendered::Text(render(name("slack", None))?),
            Channel::Sms => Rendered::Text(render(name("sms", None))?),
            Channel::Webhook => Rendered::Text(render(name("webhook", None))?),
            Channel::Pagerduty => match out.kind {
                MessageKind::Page | MessageKind::Reminder => {
                    Rendered::Text(render("pagerduty/page".to_string())?)
                }
                _ => Rendered::Text(String::new()),
            },
            Channel::Email => Rendered::Email(Parts {
                subject: render(name("email", Some("subject")))?,
                text: render(name("email", Some("txt")))?,
                html: render(name("email", Some("html")))?,
            }),
        })
    }

    async fn send(&self, out: &Outgoing, r: &Rendered) -> Result<ProviderRef, SendError> {
        let missing = |what: &str| {
            Err(SendError::permanent(format!(
                "{what} is not configured (notifier.{what})"
            )))
        };
        match (out.channel, r) {
            (Channel::Slack, Rendered::Text(t)) => match &self.slack {
                Some(s) => s.send(out, t).await,
                None => missing("slack"),
            },
            (Channel::Pagerduty, Rendered::Text(t)) => match &self.pagerduty {
                Some(p) => p.send(out, t).await,
                None => missing("pagerduty"),
            },
            (Channel::Sms, Rendered::Text(t)) => match &self.sms {
                Some(s) => s.send(out, t).await,
                None => missing("sms"),
            },
            (Channel::Webhook, Rendered::Text(t)) => match self.webhooks.get(&out.target) {
                Some(w) => w.send(out, t).await,
                None => Err(SendError::permanent(format!(
                    "no webhook {:?} in notifier.webhooks",
                    out.target
                ))),
            },
            (Channel::Email, Rendered::Email(parts)) => match &self.email {
                Some(e) => e.send(out, parts).await,
                None => missing("email"),
            },
            _ => Err(SendError::permanent("internal: rendered the wrong shape")),
        }
    }

    /// Whether an earlier attempt (whose answer was lost) reached the
    /// provider. Providers that de-duplicate themselves (PagerDuty by
    /// dedup_key, webhooks by `webhook-id`) and updates (idempotent) are
    /// simply sent again.
    async fn find_sent(
        &self,
        out: &Outgoing,
        r: &Rendered,
        since: Timestamp,
    ) -> Result<Option<ProviderRef>, SendError> {
        match (out.channel, r) {
            (Channel::Slack, _) => match &self.slack {
                Some(s) => s.find_sent(out, since).await,
                None => Ok(None),
            },
            (Channel::Sms, Rendered::Text(t)) => match &self.sms {
                Some(s) => s.find_sent(out, t, since).await,
                None => Ok(None),
            },
            _ => Ok(None),
        }
    }
}

enum Rendered {
    Text(String),
    Email(Parts),
}
