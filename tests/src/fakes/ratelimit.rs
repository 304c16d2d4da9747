//! Production-like rate limits, off until a test sets one.

use std::{num::NonZeroU32, time::Duration};

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
///   integration key", counted over the 60 seconds before each call
///   (`per_second: 2.0`, [`RateLimitKey::PerChannel`]; a bucket refills
///   steadily where PagerDuty's window does not).
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

/// A [`RateLimit`] in force.
pub(super) struct Limiter {
    key: RateLimitKey,
    // governor's GCRA is the token bucket the notifier itself paces with.
    buckets: DefaultKeyedRateLimiter<String>,
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
            buckets: DefaultKeyedRateLimiter::keyed(quota),
        }
    }

    /// Takes a token for `destination`; `Err(wait)` if there is none yet.
    pub fn take(&self, destination: &str) -> Result<(), Duration> {
        let key = match self.key {
            RateLimitKey::Global => String::new(),
            RateLimitKey::PerChannel => destination.to_string(),
        };
        self.buckets
            .check_key(&key)
            .map_err(|refused| refused.wait_time_from(self.buckets.clock().now()))
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
}
