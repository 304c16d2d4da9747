//! Production-like rate limits, off until a test sets one.

use std::{
    collections::{HashMap, VecDeque},
    num::NonZeroU32,
    sync::Mutex,
    time::{Duration, Instant},
};

use governor::{clock::Clock, DefaultKeyedRateLimiter, Quota};

/// A rate limit for one provider operation (see
/// [`FakeProviders::set_rate_limit`](super::FakeProviders::set_rate_limit)):
/// a token bucket of `burst` requests refilled at `per_second`, one bucket
/// per [`RateLimitKey`].
///
/// What the real services document, to choose values from:
/// - Slack: "chat.postMessage generally allows posting one message per
///   second per channel, while also maintaining a workspace-wide limit";
///   posting messages and incoming webhooks "1 per second. Short bursts >1
///   allowed" (`per_second: 1.0`, a small `burst`,
///   [`RateLimitKey::PerChannel`]).
/// - PagerDuty Events API v2: "approximately 120 calls/minute per
///   integration key", counted over the 60 seconds before each call: a
///   [`WindowLimit`] of 120 events in 60 s, [`RateLimitKey::PerChannel`]
///   (a bucket at `per_second: 2.0` is stricter: it refills steadily
///   where PagerDuty's window does not).
/// - Twilio: error 20429 when an account exceeds its allowed REST API
///   concurrency; no rate is published ([`RateLimitKey::Global`]).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RateLimit {
    /// Sustained rate, requests per second (> 0; fractions allowed).
    pub per_second: f64,
    /// Requests allowed at once before the rate applies (≥ 1).
    pub burst: u32,
    /// What the buckets are kept per.
    pub key: RateLimitKey,
}

/// A limit counted over a sliding window (see
/// [`FakeProviders::set_window_limit`](super::FakeProviders::set_window_limit)):
/// at most `events` requests in any `window`, per [`RateLimitKey`]; a
/// request over it is refused until the oldest counted one is `window`
/// old. PagerDuty's Events API v2 counts this way.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct WindowLimit {
    /// Requests allowed in any window (≥ 1).
    pub events: u32,
    /// The window (> 0).
    pub window: Duration,
    /// What the windows are kept per.
    pub key: RateLimitKey,
}

/// What a [`RateLimit`]'s buckets are kept per.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RateLimitKey {
    /// One bucket for every request of the operation.
    Global,
    /// One bucket per destination: the Slack `channel` (a user id counts
    /// as its DM), the Slack incoming webhook's URL, the PagerDuty
    /// `routing_key` (the integration), the Twilio `To` number, the
    /// webhook receiver's name.
    PerChannel,
}

/// A [`RateLimit`] or [`WindowLimit`] in force.
pub(super) struct Limiter {
    key: RateLimitKey,
    kind: Kind,
}

enum Kind {
    // governor's GCRA is the token bucket the notifier itself paces with.
    Buckets(DefaultKeyedRateLimiter<String>),
    Window {
        events: usize,
        window: Duration,
        /// Per key, when each request counted in the window came.
        seen: Mutex<HashMap<String, VecDeque<Instant>>>,
    },
}

impl Limiter {
    pub fn new(limit: RateLimit) -> Limiter {
        assert!(
            limit.per_second.is_finite() && limit.per_second > 0.0,
            "RateLimit.per_second must be a positive number, not {}",
            limit.per_second
        );
        let burst = NonZeroU32::new(limit.burst).expect("RateLimit.burst must be at least 1");
        let quota = Quota::with_period(Duration::from_secs_f64(1.0 / limit.per_second))
            .expect("a positive rate has a period")
            .allow_burst(burst);
        Limiter {
            key: limit.key,
            kind: Kind::Buckets(DefaultKeyedRateLimiter::keyed(quota)),
        }
    }

    pub fn window(limit: WindowLimit) -> Limiter {
        assert!(limit.events >= 1, "WindowLimit.events must be at least 1");
        assert!(
            !limit.window.is_zero(),
            "WindowLimit.window must be longer than zero"
        );
        Limiter {
            key: limit.key,
            kind: Kind::Window {
                events: limit.events as usize,
                window: limit.window,
                seen: Mutex::new(HashMap::new()),
            },
        }
    }

    /// Takes a token for `destination`; `Err(wait)` if there is none yet.
    pub fn take(&self, destination: &str) -> Result<(), Duration> {
        self.take_at(destination, Instant::now())
    }

    /// [`Limiter::take`] at `now` (a window's clock; a bucket keeps its own).
    fn take_at(&self, destination: &str, now: Instant) -> Result<(), Duration> {
        let key = match self.key {
            RateLimitKey::Global => String::new(),
            RateLimitKey::PerChannel => destination.to_string(),
        };
        match &self.kind {
            Kind::Buckets(b) => b
                .check_key(&key)
                .map_err(|refused| refused.wait_time_from(b.clock().now())),
            Kind::Window {
                events,
                window,
                seen,
            } => {
                let mut seen = seen.lock().unwrap_or_else(|e| e.into_inner());
                let q = seen.entry(key).or_default();
                while q.front().is_some_and(|t| now.duration_since(*t) >= *window) {
                    q.pop_front();
                }
                match q.front() {
                    Some(oldest) if q.len() >= *events => {
                        Err(*window - now.duration_since(*oldest))
                    }
                    _ => {
                        q.push_back(now);
                        Ok(())
                    }
                }
            }
        }
    }
}

/// A `Retry-After` value: whole seconds, rounded up, at least 1.
pub(super) fn retry_after(wait: Duration) -> String {
    (wait.as_secs_f64().ceil() as u64).max(1).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_per_destination_and_the_wait() {
        let l = Limiter::new(RateLimit {
            per_second: 0.5,
            burst: 2,
            key: RateLimitKey::PerChannel,
        });
        assert_eq!(l.take("C1"), Ok(()));
        assert_eq!(l.take("C1"), Ok(()));
        let wait = l.take("C1").unwrap_err();
        assert!(wait > Duration::from_millis(1500) && wait <= Duration::from_secs(2));
        assert_eq!(retry_after(wait), "2");
        assert_eq!(l.take("C2"), Ok(()));
        let g = Limiter::new(RateLimit {
            per_second: 1.0,
            burst: 1,
            key: RateLimitKey::Global,
        });
        assert_eq!(g.take("C1"), Ok(()));
        assert!(g.take("C2").is_err());
        assert_eq!(retry_after(Duration::from_millis(10)), "1");
    }

    #[test]
    fn a_window_takes_its_events_at_any_pace_then_refuses_until_the_oldest_ages_out() {
        let l = Limiter::window(WindowLimit {
            events: 3,
            window: Duration::from_millis(300),
            key: RateLimitKey::PerChannel,
        });
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        // All at once: a window has no steady refill, only its count.
        for ms in [0, 1, 2] {
            assert_eq!(l.take_at("K1", at(ms)), Ok(()));
        }
        assert_eq!(
            l.take_at("K1", at(100)),
            Err(Duration::from_millis(200)),
            "until the first is 300 ms old"
        );
        assert_eq!(
            l.take_at("K2", at(100)),
            Ok(()),
            "another key has its own window"
        );
        assert_eq!(
            l.take_at("K1", at(300)),
            Ok(()),
            "the oldest left the window"
        );
        assert!(
            l.take_at("K1", at(300)).is_err(),
            "three in the window again"
        );
    }
}
