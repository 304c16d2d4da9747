//! Lanes: what lets a slow or rate-limited destination delay only itself.
//! Each provider has its circuit breaker; each destination (a PagerDuty
//! service, a Slack channel, a webhook, the SMS or email account) has its
//! own pace (turns handed out at its rate) and its own limit of requests
//! in flight. A message asks its lane for a turn before it waits; a turn
//! further away than `max_hold` is not taken, and the message goes back
//! to the bus to return when its turn is near.

use std::{
    collections::{BTreeMap, HashMap},
    num::NonZeroU32,
    sync::{Arc, Mutex},
    time::Duration,
};

use jiff::{SignedDuration, Timestamp};
use tocsin_runtime::clock::Clock;
use tokio::sync::Semaphore;

use crate::{
    config::{GuardConfig, NotifierConfig},
    events::NotifierMetrics,
    guard::{Breaker, Pace, Permit},
    paces::SharedPaces,
};

/// After a booking in the shared bucket failed or took longer than
/// `notifier.shared_booking_timeout`, the replica books alone (at its
/// share of the rate) for this long, so pages are not held up by a slow or
/// unreachable NATS.
const SHARED_RETRY: Duration = Duration::from_secs(2);

/// The pause before the shared bucket is asked again after a failure,
/// within `notifier.shared_booking_timeout`.
const ASK_AGAIN_AFTER: Duration = Duration::from_millis(50);

/// What a message may do now.
#[derive(Debug)]
pub(crate) enum Turn {
    /// Go at `at` on the clock (the `now` the turn was asked at: at
    /// once). A time, not a wait, so nothing that passes between booking
    /// and waiting is waited again. `probe`: a half-open breaker's trial
    /// request. `held`: counts this message among those its lane holds
    /// while it waits (released on drop).
    At {
        at: Timestamp,
        probe: bool,
        held: Option<Held>,
    },
    /// The breaker is open: come back after this long.
    BreakerOpen(Duration),
    /// The turn is further than `max_hold`: come back after this long.
    TooFar(Duration),
}

/// One message held by a lane while it waits for its turn.
#[derive(Debug)]
pub(crate) struct Held(Arc<std::sync::atomic::AtomicUsize>);

impl Drop for Held {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Something kept per destination: (provider, destination).
type PerDestination<T> = Mutex<HashMap<(String, String), T>>;

pub(crate) struct Lanes {
    guards: BTreeMap<String, GuardConfig>,
    /// Messages waiting per destination, and how many may: a backlog on
    /// one destination must never take the consumer's whole capacity.
    waiting: PerDestination<Arc<std::sync::atomic::AtomicUsize>>,
    max_waiting: usize,
    breakers: Mutex<HashMap<String, Breaker>>,
    paces: PerDestination<Pace>,
    slots: PerDestination<Arc<Semaphore>>,
    max_hold: Duration,
    /// `notifier.shared_booking_timeout`.
    shared_timeout: Duration,
    /// Notifier replicas running (this one included), who share every
    /// destination's rate (see [`crate::replicas`]).
    replicas: std::sync::atomic::AtomicU32,
    /// Where the replicas book turns together (see [`crate::paces`]).
    shared: Mutex<Option<Arc<SharedPaces>>>,
    /// One booking in the shared bucket per destination at a time from
    /// this replica (held by the booking and those waiting for it).
    booking: PerDestination<Arc<tokio::sync::Mutex<()>>>,
    /// When a booking there last failed (cleared by one that worked).
    shared_failed: Mutex<Option<std::time::Instant>>,
    metrics: NotifierMetrics,
}

impl Lanes {
    pub(crate) fn new(cfg: &NotifierConfig, metrics: NotifierMetrics) -> Lanes {
        let mut guards = BTreeMap::new();
        if let Some(c) = &cfg.slack {
            guards.insert("slack".to_string(), c.guard);
        }
        if let Some(c) = &cfg.pagerduty {
            guards.insert("pagerduty".to_string(), c.guard);
        }
        if let Some(c) = &cfg.sms {
            guards.insert("sms".to_string(), c.guard);
        }
        if let Some(c) = &cfg.email {
            guards.insert("email".to_string(), c.guard);
        }
        for w in &cfg.webhooks {
            guards.insert(format!("webhook:{}", w.name), w.guard);
        }
        Lanes {
            guards,
            breakers: Mutex::new(HashMap::new()),
            paces: Mutex::new(HashMap::new()),
            slots: Mutex::new(HashMap::new()),
            waiting: Mutex::new(HashMap::new()),
            max_waiting: (cfg.concurrency() / 2).max(1),
            max_hold: cfg.max_hold(),
            // Checked when the config is loaded; the default if not.
            shared_timeout: cfg
                .shared_booking_timeout()
                .unwrap_or(Duration::from_millis(500)),
            replicas: std::sync::atomic::AtomicU32::new(1),
            shared: Mutex::new(None),
            booking: Mutex::new(HashMap::new()),
            shared_failed: Mutex::new(None),
            metrics,
        }
    }

    /// `n` (at least 1) replicas are running: each destination's pace takes
    /// its share from its next turn on.
    pub(crate) fn set_replicas(&self, n: u32) {
        self.replicas.store(n, std::sync::atomic::Ordering::Relaxed);
        self.metrics.replicas(n);
    }

    fn guard(&self, provider: &str) -> GuardConfig {
        self.guards.get(provider).copied().unwrap_or_default()
    }

    /// The bucket the replicas book their turns in (see [`crate::paces`]),
    /// once it is open.
    pub(crate) fn set_shared(&self, shared: Arc<SharedPaces>) {
        *self.shared.lock().unwrap_or_else(|e| e.into_inner()) = Some(shared);
        self.metrics.shared_paces_open();
    }

    /// The shared bucket, when more than one replica is running (and it
    /// did not fail in the last [`SHARED_RETRY`]).
    fn shared(&self) -> Option<Arc<SharedPaces>> {
        if self.replicas.load(std::sync::atomic::Ordering::Relaxed) < 2 {
            return None;
        }
        let failed = *self.shared_failed.lock().unwrap_or_else(|e| e.into_inner());
        if failed.is_some_and(|at| at.elapsed() < SHARED_RETRY) {
            return None;
        }
        self.shared
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// What the shared bucket answers to `asked` within `shared_timeout`,
    /// asked again after [`ASK_AGAIN_AFTER`] while time is left: a read
    /// or write that failed on a busy cluster (a request timed out while
    /// the bucket's leader was slow) must not send every replica off to
    /// book alone at once. `None` if no answer came in time (the last
    /// failure said once, and the bucket is left alone for
    /// [`SHARED_RETRY`]). Asking again after a write that failed but was
    /// stored books one turn more: slower, never faster than the rate.
    async fn ask_shared<T, F, Fut>(&self, mut asked: F) -> Option<T>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, String>>,
    {
        let deadline = tokio::time::Instant::now() + self.shared_timeout;
        let mut failed = None;
        loop {
            match tokio::time::timeout_at(deadline, asked()).await {
                Ok(Ok(answer)) => {
                    self.shared_failing(None);
                    return Some(answer);
                }
                Ok(Err(e)) => failed = Some(e),
                Err(_) => break,
            }
            let again = tokio::time::Instant::now() + ASK_AGAIN_AFTER;
            if again >= deadline {
                break;
            }
            tokio::time::sleep_until(again).await;
        }
        let error = failed.unwrap_or_else(|| {
            format!(
                "no answer from {} within {:?} (notifier.shared_booking_timeout)",
                crate::paces::BUCKET,
                self.shared_timeout
            )
        });
        self.shared_failing(Some(&error));
        None
    }

    /// The shared bucket answered (`None`) or failed: said once per change.
    fn shared_failing(&self, error: Option<&str>) {
        let was = std::mem::replace(
            &mut *self.shared_failed.lock().unwrap_or_else(|e| e.into_inner()),
            error.map(|_| std::time::Instant::now()),
        )
        .is_some();
        match error {
            Some(e) if !was => tracing::warn!(
                error = %e,
                "cannot book turns with the other notifier replicas; each books its share of every rate limit alone until it can"
            ),
            None if was => tracing::info!("booking turns with the other notifier replicas again"),
            _ => {}
        }
    }

    /// Asks for a turn for `provider`'s `destination` now on `clock`: with
    /// other replicas running, booked with them in the shared bucket (at
    /// the destination's whole rate), else (or when the bucket fails) here,
    /// at this replica's share of the rate.
    pub(crate) async fn turn(&self, provider: &str, destination: &str, clock: &dyn Clock) -> Turn {
        let now = clock.now();
        let g = self.guard(provider);
        let probe = {
            let mut bs = self.breakers.lock().unwrap_or_else(|e| e.into_inner());
            let b = bs
                .entry(provider.to_string())
                .or_insert_with(|| Breaker::new(g.breaker));
            let permit = b.permit(now);
            self.metrics.breaker(provider, b.state());
            match permit {
                Permit::Wait(d) => return Turn::BreakerOpen(d),
                Permit::Go { probe } => probe,
            }
        };
        let Some(whole) = whole_pace(g) else {
            return Turn::At {
                at: now,
                probe,
                held: None,
            };
        };
        let key = (provider.to_string(), destination.to_string());
        let waiting = {
            let mut w = self.waiting.lock().unwrap_or_else(|e| e.into_inner());
            w.entry(key.clone()).or_default().clone()
        };
        // A message that would wait, when the lane already holds its share,
        // goes back to the bus too (with the wait it would have had).
        let full = waiting.load(std::sync::atomic::Ordering::Relaxed) >= self.max_waiting;
        let max_wait = if full { Duration::ZERO } else { self.max_hold };
        let (booked, now) = match self.shared() {
            Some(_) => self.book_shared(&key, &whole, clock, max_wait).await,
            None => (None, now),
        };
        let booked = booked.unwrap_or_else(|| {
            let replicas = self.replicas.load(std::sync::atomic::Ordering::Relaxed);
            if replicas > 1 {
                self.metrics.booked_alone(provider);
            }
            let mut paces = self.paces.lock().unwrap_or_else(|e| e.into_inner());
            let pace = paces.entry(key).or_insert(whole);
            pace.share(replicas);
            pace.reserve(now, max_wait)
        });
        match booked {
            Ok(wait) if wait.is_zero() => Turn::At {
                at: now,
                probe,
                held: None,
            },
            Ok(wait) => {
                waiting.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                Turn::At {
                    at: now
                        .checked_add(SignedDuration::try_from(wait).unwrap_or_default())
                        .unwrap_or(now),
                    probe,
                    held: Some(Held(waiting)),
                }
            }
            Err(far) => {
                if probe {
                    self.release_probe(provider);
                }
                Turn::TooFar(far)
            }
        }
    }

    /// Books the destination's next turn in the shared bucket, one booking
    /// per destination at a time from this replica, at the clock's time
    /// once it is this booking's go (also returned). Otherwise a burst of
    /// pages for one destination races itself for its key, and a booking
    /// that keeps losing until `shared_timeout` is made alone; this way
    /// only the replicas race. The wait for the other bookings does not count
    /// against `shared_timeout`: each of them does, and once one fails
    /// the others book alone at once.
    async fn book_shared(
        &self,
        key: &(String, String),
        whole: &Pace,
        clock: &dyn Clock,
        max_wait: Duration,
    ) -> (Option<Result<Duration, Duration>>, Timestamp) {
        let lock = self
            .booking
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(key.clone())
            .or_default()
            .clone();
        let booked = {
            let _go = lock.lock().await;
            let now = clock.now();
            // The bucket may have failed while this booking waited.
            let booked = match self.shared() {
                Some(shared) => {
                    self.ask_shared(|| shared.book(&key.0, &key.1, whole, now, max_wait))
                        .await
                }
                None => None,
            };
            (booked, now)
        };
        // Forgotten once no other booking holds or waits for it (the map
        // and this one hold the only references).
        let mut locks = self.booking.lock().unwrap_or_else(|e| e.into_inner());
        if locks.get(key).is_some_and(|l| Arc::ptr_eq(l, &lock)) && Arc::strong_count(&lock) == 2 {
            locks.remove(key);
        }
        booked
    }

    /// A probe that did not happen (the message went elsewhere).
    pub(crate) fn release_probe(&self, provider: &str) {
        let mut bs = self.breakers.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(b) = bs.get_mut(provider) {
            b.release();
        }
    }

    /// A request slot for the destination (at most `guard.concurrency`
    /// requests in flight per destination).
    pub(crate) fn slots(&self, provider: &str, destination: &str) -> Arc<Semaphore> {
        let n = self.guard(provider).concurrency.unwrap_or(8).max(1) as usize;
        let mut s = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        s.entry((provider.to_string(), destination.to_string()))
            .or_insert_with(|| Arc::new(Semaphore::new(n)))
            .clone()
    }

    /// The provider answered (a success, or a refusal that is not an outage).
    pub(crate) fn success(&self, provider: &str) {
        let mut bs = self.breakers.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(b) = bs.get_mut(provider) {
            b.success();
            self.metrics.breaker(provider, b.state());
        }
    }

    /// The provider failed (5xx, 429, timeout). `retry_after`: it asked
    /// to wait, so the destination's next turns move. A rate limit
    /// (`rate_limited`: a 429) is about that destination only: the
    /// provider answered, so it counts as an answer for the breaker, and
    /// other destinations go on at their own pace.
    pub(crate) async fn failure(
        &self,
        provider: &str,
        destination: &str,
        now: Timestamp,
        retry_after: Option<Duration>,
        rate_limited: bool,
    ) {
        if rate_limited {
            self.success(provider);
        } else {
            let mut bs = self.breakers.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(b) = bs.get_mut(provider) {
                if b.failure(now) {
                    self.metrics.breaker_opened(provider);
                }
                self.metrics.breaker(provider, b.state());
            }
        }
        let Some(until) = retry_after.and_then(|ra| {
            now.checked_add(jiff::SignedDuration::try_from(ra).unwrap_or_default())
                .ok()
        }) else {
            return;
        };
        let Some(whole) = whole_pace(self.guard(provider)) else {
            return;
        };
        self.paces
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry((provider.to_string(), destination.to_string()))
            .or_insert_with(|| whole.clone())
            .hold_until(until);
        if let Some(shared) = self.shared() {
            self.ask_shared(|| shared.hold_until(provider, destination, &whole, until))
                .await;
        }
    }
}

/// A destination's pace at its whole rate and burst; `None` unpaced.
fn whole_pace(g: GuardConfig) -> Option<Pace> {
    let rate = NonZeroU32::new(g.rate_per_second)?;
    let burst = g.burst.and_then(NonZeroU32::new).unwrap_or(rate);
    Some(Pace::new(rate.get(), burst.get()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lanes() -> Lanes {
        let metrics = NotifierMetrics::register(&tocsin_runtime::admin::Metrics::new());
        Lanes::new(&NotifierConfig::default(), metrics)
    }

    async fn open(l: &Lanes, destination: &str, now: Timestamp) -> bool {
        let clock = tocsin_runtime::clock::ManualClock::new(now);
        matches!(
            l.turn("slack", destination, &clock).await,
            Turn::BreakerOpen(_)
        )
    }

    #[tokio::test]
    async fn rate_limits_on_one_destination_do_not_open_the_providers_breaker() {
        let l = lanes();
        let now = Timestamp::from_second(1_000_000).unwrap();
        let clock = tocsin_runtime::clock::ManualClock::new(now);
        let _ = l.turn("slack", "#incidents", &clock).await;
        for _ in 0..20 {
            l.failure(
                "slack",
                "#incidents",
                now,
                Some(Duration::from_secs(1)),
                true,
            )
            .await;
        }
        assert!(
            !open(&l, "D0ALICE", now).await,
            "a DM waits for #incidents' 429s"
        );
        // Failures of the provider itself still open it.
        for _ in 0..20 {
            l.failure("slack", "#incidents", now, None, false).await;
        }
        assert!(open(&l, "D0ALICE", now).await);
    }
}
